/* safetensors.c: the safetensors reader (mmap + full header validation), sharded checkpoints behind
 * model.safetensors.index.json, and the atomic writer. Format: MODEL-SPEC §10.1-10.2; API: safetensors.h.
 *
 * The one idea of the reader: trust nothing in the header. Every number is checked as an exact non-negative
 * integer, every product for overflow, every range against the data section, and tensors are sorted by offset
 * to find overlaps, before any view is handed out; after that, reading a tensor cannot go out of the mapping.
 * cJSON allocates through mem_alloc (hooks installed before each parse), so failure injection reaches it and
 * a parse that failed for lack of memory reports MR_ENOMEM, not a syntax error. */
#include "core/safetensors.h"

#include <cjson/cJSON.h>
#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "core/mem.h"
#include "core/strbuf.h"

#define INDEX_NAME "model.safetensors.index.json"
#define SINGLE_NAME "model.safetensors"
#define MAX_INDEX_BYTES ((size_t)1 << 30)
#define EXACT_INT_MAX 9007199254740992.0 /* 2^53: every integer up to here is exact in a double */

/* ================= helpers ================= */

static _Thread_local int json_oom; /* set by json_alloc when an allocation failed during this parse */

static void *json_alloc(size_t n) {
    void *p = mem_alloc(n);
    if (!p) json_oom = 1;
    return p;
}
static void json_free(void *p) { mem_free(p); }

/* Parses buf[0..len) (not NUL-terminated). On failure returns NULL with *oom telling why and *stop at the
 * offending byte; on success *stop is the first byte after the value. */
static cJSON *json_parse(const char *buf, size_t len, const char **stop, int *oom) {
    cJSON_Hooks h = {json_alloc, json_free};
    cJSON_InitHooks(&h); /* idempotent: the same two functions every time */
    json_oom = 0;
    *stop = buf;
    cJSON *j = len ? cJSON_ParseWithLengthOpts(buf, len, stop, 0) : NULL;
    *oom = json_oom;
    return j;
}

static const char *json_type(const cJSON *j) {
    if (!j) return "nothing";
    if (cJSON_IsObject(j)) return "an object";
    if (cJSON_IsArray(j)) return "an array";
    if (cJSON_IsString(j)) return "a string";
    if (cJSON_IsNumber(j)) return "a number";
    if (cJSON_IsBool(j)) return "a boolean";
    if (cJSON_IsNull(j)) return "null";
    return "an invalid value";
}

/* "got ..." text for a value: numbers and short strings verbatim, others by type. */
static const char *json_describe(const cJSON *j, char *buf, size_t cap) {
    if (cJSON_IsNumber(j)) snprintf(buf, cap, "%.17g", j->valuedouble);
    else if (cJSON_IsString(j)) snprintf(buf, cap, "\"%.40s\"", j->valuestring);
    else snprintf(buf, cap, "%s", json_type(j));
    return buf;
}

/* 0 and *out when j is an exact integer in [0, 2^53]; -1 when not a non-negative integer; -2 when too large. */
static int json_uint(const cJSON *j, uint64_t *out) {
    if (!cJSON_IsNumber(j)) return -1;
    double d = j->valuedouble;
    if (!(d >= 0) || d != floor(d)) return -1;
    if (d > EXACT_INT_MAX) return -2;
    *out = (uint64_t)d;
    return 0;
}

static char *path_join(const char *dir, const char *name) {
    size_t a = strlen(dir), b = strlen(name);
    char *p = mem_alloc(a + b + 2);
    if (!p) return NULL;
    memcpy(p, dir, a);
    p[a] = '/';
    memcpy(p + a + 1, name, b + 1);
    return p;
}

/* Directory part of a path ("." when it has none). */
static char *path_dir(const char *path) {
    const char *slash = strrchr(path, '/');
    if (!slash) return mem_strdup(".");
    if (slash == path) return mem_strdup("/");
    return mem_strndup(path, (size_t)(slash - path));
}

static const char *path_base(const char *path) {
    const char *slash = strrchr(path, '/');
    return slash ? slash + 1 : path;
}

static void fmt_shape(char *buf, size_t cap, const int64_t *shape, int ndim) {
    size_t n = 0;
    n += (size_t)snprintf(buf, cap, "[");
    for (int i = 0; i < ndim && n < cap; i++)
        n += (size_t)snprintf(buf + n, cap - n, "%s%lld", i ? ", " : "", (long long)shape[i]);
    if (n < cap) snprintf(buf + n, cap - n, "]");
}

/* ================= one file ================= */

typedef struct st_meta {
    const char *key, *value;
} st_meta;

struct st_file {
    char *path;
    unsigned char *map;
    size_t map_size;
    const unsigned char *data; /* start of the data section */
    size_t data_size;
    st_tensor *tensors; /* file order */
    size_t n;
    const st_tensor **by_name;
    st_meta *meta; /* sorted by key */
    size_t n_meta;
    char *arena; /* names, metadata keys and values */
};

void st_close(st_file *f) {
    if (!f) return;
    if (f->map) munmap(f->map, f->map_size);
    mem_free(f->tensors);
    mem_free(f->by_name);
    mem_free(f->meta);
    mem_free(f->arena);
    mem_free(f->path);
    mem_free(f);
}

static int cmp_file_order(const void *a, const void *b) {
    const st_tensor *x = a, *y = b;
    if (x->begin != y->begin) return x->begin < y->begin ? -1 : 1;
    if (x->end != y->end) return x->end < y->end ? -1 : 1;
    return strcmp(x->name, y->name);
}

static int cmp_tensor_ptr_name(const void *a, const void *b) {
    return strcmp((*(const st_tensor *const *)a)->name, (*(const st_tensor *const *)b)->name);
}

static int cmp_meta(const void *a, const void *b) {
    return strcmp(((const st_meta *)a)->key, ((const st_meta *)b)->key);
}

static char *arena_copy(char **cursor, const char *s) {
    size_t n = strlen(s) + 1;
    char *d = *cursor;
    memcpy(d, s, n);
    *cursor += n;
    return d;
}

/* Validates one header entry into t (name already set). */
static int parse_tensor(const st_file *f, const cJSON *j, st_tensor *t, mr_err *e) {
    char got[64], shp[256];
    const char *P = f->path, *N = t->name;
    if (!cJSON_IsObject(j))
        return err_set(e, MR_EFORMAT, "%s: tensor \"%s\": expected an object {dtype, shape, data_offsets}, got %s",
                       P, N, json_describe(j, got, sizeof got));
    const cJSON *dt = cJSON_GetObjectItemCaseSensitive(j, "dtype");
    const cJSON *shape = cJSON_GetObjectItemCaseSensitive(j, "shape");
    const cJSON *off = cJSON_GetObjectItemCaseSensitive(j, "data_offsets");
    if (!dt) return err_set(e, MR_EFORMAT, "%s: tensor \"%s\": missing \"dtype\"", P, N);
    if (!cJSON_IsString(dt))
        return err_set(e, MR_EFORMAT, "%s: tensor \"%s\": \"dtype\" must be a string, got %s", P, N,
                       json_describe(dt, got, sizeof got));
    if (dtype_from_name(dt->valuestring, &t->dtype) != 0)
        return err_set(e, MR_EFORMAT, "%s: tensor \"%s\": unknown dtype \"%.40s\" (expected one of %s)", P, N,
                       dt->valuestring, dtype_all_names());
    if (!shape) return err_set(e, MR_EFORMAT, "%s: tensor \"%s\": missing \"shape\"", P, N);
    if (!cJSON_IsArray(shape))
        return err_set(e, MR_EFORMAT, "%s: tensor \"%s\": \"shape\" must be an array of non-negative integers, got %s",
                       P, N, json_describe(shape, got, sizeof got));
    int nd = cJSON_GetArraySize(shape);
    if (nd > ST_MAX_DIMS)
        return err_set(e, MR_EFORMAT, "%s: tensor \"%s\": shape has %d dims, at most %d are supported", P, N, nd,
                       ST_MAX_DIMS);
    t->ndim = nd;
    int i = 0, has_zero = 0;
    for (const cJSON *d = shape->child; d; d = d->next, i++) {
        uint64_t v;
        int rc = json_uint(d, &v);
        if (rc == -1)
            return err_set(e, MR_EFORMAT, "%s: tensor \"%s\": shape[%d] must be a non-negative integer, got %s", P, N,
                           i, json_describe(d, got, sizeof got));
        if (rc == -2)
            return err_set(e, MR_EFORMAT, "%s: tensor \"%s\": shape[%d] = %s is too large (limit 2^53)", P, N, i,
                           json_describe(d, got, sizeof got));
        t->shape[i] = (int64_t)v;
        if (v == 0) has_zero = 1;
    }
    fmt_shape(shp, sizeof shp, t->shape, nd);
    size_t numel = 1;
    for (int k = 0; k < nd && !has_zero; k++) /* with a zero dim there are no elements, whatever the others */
        if (size_mul(numel, (size_t)t->shape[k], &numel) != 0)
            return err_set(e, MR_EFORMAT, "%s: tensor \"%s\": shape %s has more elements than fit in 64 bits", P, N,
                           shp);
    if (has_zero) numel = 0;
    t->numel = numel;
    if (size_mul(numel, dtype_size(t->dtype), &t->nbytes) != 0)
        return err_set(e, MR_EFORMAT, "%s: tensor \"%s\": %s shape %s has more bytes than fit in 64 bits", P, N,
                       dtype_name(t->dtype), shp);
    if (!off) return err_set(e, MR_EFORMAT, "%s: tensor \"%s\": missing \"data_offsets\"", P, N);
    if (!cJSON_IsArray(off))
        return err_set(e, MR_EFORMAT, "%s: tensor \"%s\": \"data_offsets\" must be [begin, end], got %s", P, N,
                       json_describe(off, got, sizeof got));
    if (cJSON_GetArraySize(off) != 2)
        return err_set(e, MR_EFORMAT, "%s: tensor \"%s\": \"data_offsets\" must be [begin, end], got %d values", P, N,
                       cJSON_GetArraySize(off));
    uint64_t be[2] = {0, 0};
    i = 0;
    for (const cJSON *d = off->child; d; d = d->next, i++) {
        if (json_uint(d, &be[i]) != 0)
            return err_set(e, MR_EFORMAT, "%s: tensor \"%s\": data_offsets[%d] must be a non-negative integer, got %s",
                           P, N, i, json_describe(d, got, sizeof got));
    }
    t->begin = be[0];
    t->end = be[1];
    if (t->begin > t->end)
        return err_set(e, MR_EFORMAT, "%s: tensor \"%s\": data_offsets [%llu, %llu]: begin is after end", P, N,
                       (unsigned long long)t->begin, (unsigned long long)t->end);
    if (t->end > f->data_size)
        return err_set(e, MR_EFORMAT,
                       "%s: tensor \"%s\": data_offsets [%llu, %llu] run past the end of the data section (%zu bytes)",
                       P, N, (unsigned long long)t->begin, (unsigned long long)t->end, f->data_size);
    if (t->end - t->begin != t->nbytes)
        return err_set(e, MR_EFORMAT, "%s: tensor \"%s\": data_offsets [%llu, %llu] hold %llu bytes, but %s shape %s needs %zu",
                       P, N, (unsigned long long)t->begin, (unsigned long long)t->end,
                       (unsigned long long)(t->end - t->begin), dtype_name(t->dtype), shp, t->nbytes);
    t->data = f->data + t->begin;
    return 0;
}

static int parse_header(st_file *f, const char *hdr, size_t len, mr_err *e) {
    const char *P = f->path, *stop;
    int oom;
    char got[64];
    cJSON *root = json_parse(hdr, len, &stop, &oom);
    if (!root) {
        if (oom) return err_set(e, MR_ENOMEM, "%s: out of memory parsing the header", P);
        size_t at = (size_t)(stop - hdr);
        char near[24];
        size_t k = 0;
        for (size_t q = at; q < len && k < 20; q++) near[k++] = (hdr[q] >= 0x20 && hdr[q] < 0x7f) ? hdr[q] : '?';
        near[k] = '\0';
        return err_set(e, MR_EFORMAT, "%s: header is not valid JSON (at byte %zu of %zu: \"%s\")", P, at, len, near);
    }
    int rc = 0;
    if (!cJSON_IsObject(root)) {
        rc = err_set(e, MR_EFORMAT, "%s: header must be a JSON object, got %s", P, json_describe(root, got, sizeof got));
        goto done;
    }
    for (const char *c = stop; c < hdr + len; c++) {
        if (*c != ' ' && *c != '\t' && *c != '\n' && *c != '\r') {
            rc = err_set(e, MR_EFORMAT, "%s: header has bytes after its JSON object (at byte %zu; only spaces may pad it)",
                         P, (size_t)(c - hdr));
            goto done;
        }
    }
    /* Count and size everything, then one arena for all strings. */
    size_t n = 0, n_meta = 0, bytes = 0;
    const cJSON *meta = NULL;
    for (const cJSON *it = root->child; it; it = it->next) {
        bytes += strlen(it->string) + 1;
        if (!strcmp(it->string, "__metadata__")) {
            if (meta) {
                rc = err_set(e, MR_EFORMAT, "%s: \"__metadata__\" appears twice in the header", P);
                goto done;
            }
            meta = it;
            if (!cJSON_IsObject(it)) {
                rc = err_set(e, MR_EFORMAT, "%s: \"__metadata__\" must be an object of strings, got %s", P,
                             json_describe(it, got, sizeof got));
                goto done;
            }
            for (const cJSON *m = it->child; m; m = m->next) {
                if (!cJSON_IsString(m)) {
                    rc = err_set(e, MR_EFORMAT, "%s: __metadata__ \"%s\" must be a string, got %s", P, m->string,
                                 json_describe(m, got, sizeof got));
                    goto done;
                }
                bytes += strlen(m->string) + strlen(m->valuestring) + 2;
                n_meta++;
            }
        } else {
            n++;
        }
    }
    f->arena = mem_alloc(bytes + 1);
    f->tensors = mem_calloc(n, sizeof *f->tensors);
    f->by_name = mem_calloc(n, sizeof *f->by_name);
    f->meta = mem_calloc(n_meta, sizeof *f->meta);
    if (!f->arena || !f->tensors || !f->by_name || !f->meta) {
        rc = err_set(e, MR_ENOMEM, "%s: out of memory for %zu tensor entries", P, n);
        goto done;
    }
    char *cur = f->arena;
    for (const cJSON *it = root->child; it; it = it->next) {
        if (it == meta) {
            for (const cJSON *m = it->child; m; m = m->next) {
                f->meta[f->n_meta].key = arena_copy(&cur, m->string);
                f->meta[f->n_meta].value = arena_copy(&cur, m->valuestring);
                f->n_meta++;
            }
            continue;
        }
        st_tensor *t = &f->tensors[f->n];
        t->name = arena_copy(&cur, it->string);
        if ((rc = parse_tensor(f, it, t, e)) != 0) goto done;
        f->n++;
    }
    qsort(f->meta, f->n_meta, sizeof *f->meta, cmp_meta);
    for (size_t i = 1; i < f->n_meta; i++) {
        if (!strcmp(f->meta[i - 1].key, f->meta[i].key)) {
            rc = err_set(e, MR_EFORMAT, "%s: __metadata__ key \"%s\" appears twice", P, f->meta[i].key);
            goto done;
        }
    }
    /* File order, then overlaps: after sorting by begin, a tensor overlaps an earlier one exactly when it starts
     * before the furthest end seen so far. Empty tensors hold no bytes and overlap nothing. */
    qsort(f->tensors, f->n, sizeof *f->tensors, cmp_file_order);
    const st_tensor *reach = NULL;
    for (size_t i = 0; i < f->n; i++) {
        const st_tensor *t = &f->tensors[i];
        if (t->begin == t->end) continue;
        if (reach && t->begin < reach->end) {
            rc = err_set(e, MR_EFORMAT, "%s: tensors \"%s\" data_offsets [%llu, %llu] and \"%s\" data_offsets [%llu, %llu] overlap",
                         P, reach->name, (unsigned long long)reach->begin, (unsigned long long)reach->end, t->name,
                         (unsigned long long)t->begin, (unsigned long long)t->end);
            goto done;
        }
        if (!reach || t->end > reach->end) reach = t;
    }
    for (size_t i = 0; i < f->n; i++) f->by_name[i] = &f->tensors[i];
    qsort(f->by_name, f->n, sizeof *f->by_name, cmp_tensor_ptr_name);
    for (size_t i = 1; i < f->n; i++) {
        if (!strcmp(f->by_name[i - 1]->name, f->by_name[i]->name)) {
            rc = err_set(e, MR_EFORMAT, "%s: tensor \"%s\" appears twice in the header", P, f->by_name[i]->name);
            goto done;
        }
    }
done:
    cJSON_Delete(root);
    return rc;
}

int st_open(st_file **out, const char *path, mr_err *e) {
    *out = NULL;
    st_file *f = mem_calloc(1, sizeof *f);
    if (!f || !(f->path = mem_strdup(path))) {
        mem_free(f);
        return err_set(e, MR_ENOMEM, "%s: out of memory opening the file", path);
    }
    int rc, fd = open(path, O_RDONLY | O_CLOEXEC);
    struct stat sb;
    if (fd < 0) {
        rc = err_set(e, errno == ENOENT ? MR_ENOTFOUND : MR_EIO, "%s: cannot open: %s", path, strerror(errno));
        goto fail;
    }
    if (fstat(fd, &sb) != 0 || !S_ISREG(sb.st_mode)) {
        rc = err_set(e, MR_EIO, "%s: not a regular file", path);
        close(fd);
        goto fail;
    }
    size_t size = (size_t)sb.st_size;
    if (size < 8) {
        rc = err_set(e, MR_EFORMAT, "%s: file is %zu bytes, too short for the 8-byte header length", path, size);
        close(fd);
        goto fail;
    }
    void *map = mmap(NULL, size, PROT_READ, MAP_PRIVATE, fd, 0);
    close(fd);
    if (map == MAP_FAILED) {
        rc = err_set(e, MR_EIO, "%s: cannot mmap %zu bytes: %s", path, size, strerror(errno));
        goto fail;
    }
    f->map = map;
    f->map_size = size;
    uint64_t hlen = 0;
    for (int i = 7; i >= 0; i--) hlen = (hlen << 8) | f->map[i]; /* little-endian on any host */
    if (hlen > ST_MAX_HEADER) {
        rc = err_set(e, MR_EFORMAT, "%s: header length %llu exceeds the %llu-byte limit", path,
                     (unsigned long long)hlen, (unsigned long long)ST_MAX_HEADER);
        goto fail;
    }
    if (hlen > size - 8) {
        rc = err_set(e, MR_EFORMAT, "%s: header length %llu runs past the end of the file (%zu bytes after the length)",
                     path, (unsigned long long)hlen, size - 8);
        goto fail;
    }
    f->data = f->map + 8 + hlen;
    f->data_size = size - 8 - (size_t)hlen;
    if ((rc = parse_header(f, (const char *)f->map + 8, (size_t)hlen, e)) != 0) goto fail;
    *out = f;
    return 0;
fail:
    st_close(f);
    return rc;
}

const char *st_path(const st_file *f) { return f->path; }
size_t st_count(const st_file *f) { return f->n; }
const st_tensor *st_tensor_at(const st_file *f, size_t i) { return i < f->n ? &f->tensors[i] : NULL; }
size_t st_data_size(const st_file *f) { return f->data_size; }
size_t st_meta_count(const st_file *f) { return f->n_meta; }

void st_meta_at(const st_file *f, size_t i, const char **key, const char **value) {
    *key = i < f->n_meta ? f->meta[i].key : NULL;
    *value = i < f->n_meta ? f->meta[i].value : NULL;
}

const st_tensor *st_find(const st_file *f, const char *name) {
    size_t lo = 0, hi = f->n;
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        int c = strcmp(name, f->by_name[mid]->name);
        if (c == 0) return f->by_name[mid];
        if (c < 0) hi = mid;
        else lo = mid + 1;
    }
    return NULL;
}

const char *st_meta_get(const st_file *f, const char *key) {
    size_t lo = 0, hi = f->n_meta;
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        int c = strcmp(key, f->meta[mid].key);
        if (c == 0) return f->meta[mid].value;
        if (c < 0) hi = mid;
        else lo = mid + 1;
    }
    return NULL;
}

int st_read_f32(const st_file *f, const st_tensor *t, float *dst, size_t cap, mr_err *e) {
    if (cap < t->numel)
        return err_set(e, MR_ERANGE, "%s: tensor \"%s\": buffer holds %zu floats, the tensor has %zu", f->path,
                       t->name, cap, t->numel);
    int rc = dtype_to_f32(dst, t->data, t->dtype, t->numel, e);
    if (rc) err_prefix(e, "%s: tensor \"%s\"", f->path, t->name);
    return rc;
}

/* ================= a checkpoint ================= */

typedef struct st_mentry {
    const char *name;
    size_t shard;
    const st_tensor *t; /* resolved on first use */
} st_mentry;

typedef struct st_shard {
    const char *name; /* relative to dir */
    st_file *file;    /* opened on first use */
} st_shard;

struct st_model {
    char *path; /* index or single file */
    char *dir;
    int sharded;
    int64_t total_size;
    st_shard *shards;
    size_t n_shards;
    st_mentry *tensors; /* sorted by name */
    size_t n;
    char *arena;
    char *first_shard_name; /* single-file mode: the base name */
};

void st_model_close(st_model *m) {
    if (!m) return;
    for (size_t i = 0; i < m->n_shards; i++) st_close(m->shards[i].file);
    mem_free(m->shards);
    mem_free(m->tensors);
    mem_free(m->arena);
    mem_free(m->first_shard_name);
    mem_free(m->dir);
    mem_free(m->path);
    mem_free(m);
}

static int cmp_mentry(const void *a, const void *b) {
    return strcmp(((const st_mentry *)a)->name, ((const st_mentry *)b)->name);
}
static int cmp_str_ptr(const void *a, const void *b) {
    return strcmp(*(const char *const *)a, *(const char *const *)b);
}

static int model_open_single(st_model *m, mr_err *e) {
    st_file *f;
    int rc = st_open(&f, m->path, e);
    if (rc) return rc;
    m->shards = mem_calloc(1, sizeof *m->shards);
    m->tensors = mem_calloc(f->n, sizeof *m->tensors);
    m->first_shard_name = mem_strdup(path_base(m->path));
    if (!m->shards || !m->tensors || !m->first_shard_name) {
        st_close(f);
        return err_set(e, MR_ENOMEM, "%s: out of memory", m->path);
    }
    m->shards[0].name = m->first_shard_name;
    m->shards[0].file = f;
    m->n_shards = 1;
    for (size_t i = 0; i < f->n; i++) {
        m->tensors[i].name = f->by_name[i]->name;
        m->tensors[i].shard = 0;
        m->tensors[i].t = f->by_name[i];
    }
    m->n = f->n;
    return 0;
}

static int read_small_file(const char *path, size_t cap, char **out, size_t *len, mr_err *e) {
    *out = NULL;
    FILE *fp = fopen(path, "rb");
    if (!fp) return err_set(e, errno == ENOENT ? MR_ENOTFOUND : MR_EIO, "%s: cannot open: %s", path, strerror(errno));
    struct stat sb;
    if (fstat(fileno(fp), &sb) != 0 || !S_ISREG(sb.st_mode)) {
        fclose(fp);
        return err_set(e, MR_EIO, "%s: not a regular file", path);
    }
    if ((uint64_t)sb.st_size > cap) {
        fclose(fp);
        return err_set(e, MR_EFORMAT, "%s: %lld bytes is larger than the %zu-byte limit", path,
                       (long long)sb.st_size, cap);
    }
    size_t n = (size_t)sb.st_size;
    char *buf = mem_alloc(n + 1);
    if (!buf) {
        fclose(fp);
        return err_set(e, MR_ENOMEM, "%s: out of memory reading %zu bytes", path, n);
    }
    size_t got = fread(buf, 1, n, fp);
    int bad = ferror(fp);
    fclose(fp);
    if (got != n || bad) {
        mem_free(buf);
        return err_set(e, MR_EIO, "%s: read failed (%zu of %zu bytes)", path, got, n);
    }
    buf[n] = '\0';
    *out = buf;
    *len = n;
    return 0;
}

/* A shard name must be a plain file name in the checkpoint directory: a hostile index must not reach out. */
static int shard_name_ok(const char *s) {
    return *s && !strchr(s, '/') && !strchr(s, '\\') && !strstr(s, "..");
}

static int model_parse_index(st_model *m, const char *buf, size_t len, mr_err *e) {
    const char *P = m->path, *stop;
    char got[64];
    int oom;
    cJSON *root = json_parse(buf, len, &stop, &oom);
    if (!root) {
        if (oom) return err_set(e, MR_ENOMEM, "%s: out of memory parsing the index", P);
        return err_set(e, MR_EFORMAT, "%s: not valid JSON (at byte %zu of %zu)", P, (size_t)(stop - buf), len);
    }
    int rc = 0;
    const char **names = NULL;
    if (!cJSON_IsObject(root)) {
        rc = err_set(e, MR_EFORMAT, "%s: index must be a JSON object, got %s", P, json_describe(root, got, sizeof got));
        goto done;
    }
    const cJSON *meta = cJSON_GetObjectItemCaseSensitive(root, "metadata");
    if (meta && !cJSON_IsObject(meta) && !cJSON_IsNull(meta)) {
        rc = err_set(e, MR_EFORMAT, "%s: \"metadata\" must be an object, got %s", P, json_describe(meta, got, sizeof got));
        goto done;
    }
    m->total_size = -1;
    uint64_t ts;
    if (cJSON_IsObject(meta) && json_uint(cJSON_GetObjectItemCaseSensitive(meta, "total_size"), &ts) == 0)
        m->total_size = (int64_t)ts;
    const cJSON *wm = cJSON_GetObjectItemCaseSensitive(root, "weight_map");
    if (!wm) {
        rc = err_set(e, MR_EFORMAT, "%s: missing \"weight_map\" (tensor name -> shard file)", P);
        goto done;
    }
    if (!cJSON_IsObject(wm)) {
        rc = err_set(e, MR_EFORMAT, "%s: \"weight_map\" must be an object, got %s", P, json_describe(wm, got, sizeof got));
        goto done;
    }
    size_t n = 0, bytes = 0;
    for (const cJSON *it = wm->child; it; it = it->next) {
        if (!cJSON_IsString(it)) {
            rc = err_set(e, MR_EFORMAT, "%s: weight_map \"%s\" must name a shard file, got %s", P, it->string,
                         json_describe(it, got, sizeof got));
            goto done;
        }
        if (!shard_name_ok(it->valuestring)) {
            rc = err_set(e, MR_EFORMAT,
                         "%s: weight_map \"%s\" names shard \"%.200s\", which is not a plain file name (no \"/\" or \"..\")",
                         P, it->string, it->valuestring);
            goto done;
        }
        bytes += strlen(it->string) + strlen(it->valuestring) + 2;
        n++;
    }
    m->arena = mem_alloc(bytes + 1);
    m->tensors = mem_calloc(n, sizeof *m->tensors);
    names = mem_calloc(n, sizeof *names);
    if (!m->arena || !m->tensors || !names) {
        rc = err_set(e, MR_ENOMEM, "%s: out of memory for %zu index entries", P, n);
        goto done;
    }
    char *cur = m->arena;
    for (const cJSON *it = wm->child; it; it = it->next, m->n++) {
        m->tensors[m->n].name = arena_copy(&cur, it->string);
        names[m->n] = arena_copy(&cur, it->valuestring);
    }
    /* Distinct shard names, sorted; then each entry finds its shard by binary search. */
    const char **sorted = mem_calloc(n, sizeof *sorted);
    if (!sorted) {
        rc = err_set(e, MR_ENOMEM, "%s: out of memory", P);
        goto done;
    }
    memcpy(sorted, names, n * sizeof *names);
    qsort(sorted, n, sizeof *sorted, cmp_str_ptr);
    size_t ns = 0;
    for (size_t i = 0; i < n; i++)
        if (ns == 0 || strcmp(sorted[ns - 1], sorted[i])) sorted[ns++] = sorted[i];
    m->shards = mem_calloc(ns, sizeof *m->shards);
    if (!m->shards) {
        mem_free(sorted);
        rc = err_set(e, MR_ENOMEM, "%s: out of memory", P);
        goto done;
    }
    for (size_t i = 0; i < ns; i++) m->shards[i].name = sorted[i];
    m->n_shards = ns;
    mem_free(sorted);
    for (size_t i = 0; i < n; i++) {
        size_t lo = 0, hi = ns;
        while (lo < hi) {
            size_t mid = lo + (hi - lo) / 2;
            int c = strcmp(names[i], m->shards[mid].name);
            if (c == 0) {
                lo = mid;
                break;
            }
            if (c < 0) hi = mid;
            else lo = mid + 1;
        }
        m->tensors[i].shard = lo;
    }
    /* Every shard must exist before anything is read: a missing file is reported with one tensor it holds. */
    for (size_t s = 0; s < ns; s++) {
        char *sp = path_join(m->dir, m->shards[s].name);
        if (!sp) {
            rc = err_set(e, MR_ENOMEM, "%s: out of memory", P);
            goto done;
        }
        struct stat sb;
        int ok = stat(sp, &sb) == 0 && S_ISREG(sb.st_mode);
        int why = errno;
        mem_free(sp);
        if (!ok) {
            const char *who = "";
            for (size_t i = 0; i < n; i++)
                if (m->tensors[i].shard == s) {
                    who = m->tensors[i].name;
                    break;
                }
            rc = err_set(e, MR_ENOTFOUND, "%s: shard \"%s\" (holding tensor \"%s\") is missing from %s: %s", P,
                         m->shards[s].name, who, m->dir, why == ENOENT ? "no such file" : strerror(why));
            goto done;
        }
    }
    qsort(m->tensors, n, sizeof *m->tensors, cmp_mentry);
    for (size_t i = 1; i < n; i++) {
        if (!strcmp(m->tensors[i - 1].name, m->tensors[i].name)) {
            rc = err_set(e, MR_EFORMAT, "%s: weight_map lists tensor \"%s\" twice", P, m->tensors[i].name);
            goto done;
        }
    }
done:
    mem_free(names);
    cJSON_Delete(root);
    return rc;
}

static int model_open_index(st_model *m, mr_err *e) {
    char *buf;
    size_t len = 0;
    int rc = read_small_file(m->path, MAX_INDEX_BYTES, &buf, &len, e);
    if (rc) return rc;
    m->sharded = 1;
    rc = model_parse_index(m, buf, len, e);
    mem_free(buf);
    return rc;
}

static int ends_with(const char *s, const char *suffix) {
    size_t a = strlen(s), b = strlen(suffix);
    return a >= b && !strcmp(s + a - b, suffix);
}

int st_model_open(st_model **out, const char *path, mr_err *e) {
    *out = NULL;
    st_model *m = mem_calloc(1, sizeof *m);
    if (!m) return err_set(e, MR_ENOMEM, "%s: out of memory", path);
    m->total_size = -1;
    int rc;
    struct stat sb;
    if (stat(path, &sb) != 0) {
        rc = err_set(e, errno == ENOENT ? MR_ENOTFOUND : MR_EIO, "%s: %s", path,
                     errno == ENOENT ? "no such file or directory" : strerror(errno));
        goto fail;
    }
    if (S_ISDIR(sb.st_mode)) {
        char *idx = path_join(path, INDEX_NAME), *one = path_join(path, SINGLE_NAME);
        m->dir = mem_strdup(path);
        if (!idx || !one || !m->dir) {
            mem_free(idx);
            mem_free(one);
            rc = err_set(e, MR_ENOMEM, "%s: out of memory", path);
            goto fail;
        }
        struct stat s1, s2;
        int has_idx = stat(idx, &s1) == 0, has_one = stat(one, &s2) == 0;
        if (has_idx && has_one) {
            mem_free(idx);
            mem_free(one);
            rc = err_set(e, MR_EFORMAT, "%s: holds both %s and %s; remove the stale one", path, SINGLE_NAME, INDEX_NAME);
            goto fail;
        }
        if (!has_idx && !has_one) {
            mem_free(idx);
            mem_free(one);
            rc = err_set(e, MR_ENOTFOUND, "%s: no %s or %s in this directory", path, SINGLE_NAME, INDEX_NAME);
            goto fail;
        }
        m->path = has_idx ? idx : one;
        mem_free(has_idx ? one : idx);
        rc = has_idx ? model_open_index(m, e) : model_open_single(m, e);
    } else {
        m->path = mem_strdup(path);
        m->dir = path_dir(path);
        if (!m->path || !m->dir) {
            rc = err_set(e, MR_ENOMEM, "%s: out of memory", path);
            goto fail;
        }
        rc = ends_with(path, ".json") ? model_open_index(m, e) : model_open_single(m, e);
    }
    if (rc) goto fail;
    *out = m;
    return 0;
fail:
    st_model_close(m);
    return rc;
}

const char *st_model_path(const st_model *m) { return m->path; }
int st_model_is_sharded(const st_model *m) { return m->sharded; }
size_t st_model_shard_count(const st_model *m) { return m->n_shards; }
const char *st_model_shard_name(const st_model *m, size_t i) { return i < m->n_shards ? m->shards[i].name : NULL; }
int64_t st_model_declared_total_size(const st_model *m) { return m->total_size; }
const st_file *st_model_shard_file(const st_model *m, size_t i) { return i < m->n_shards ? m->shards[i].file : NULL; }
size_t st_model_count(const st_model *m) { return m->n; }
const char *st_model_name_at(const st_model *m, size_t i) { return i < m->n ? m->tensors[i].name : NULL; }
size_t st_model_shard_of(const st_model *m, size_t i) { return i < m->n ? m->tensors[i].shard : 0; }

int st_model_get_at(st_model *m, size_t i, const st_tensor **t, mr_err *e) {
    *t = NULL;
    if (i >= m->n) return err_set(e, MR_ENOTFOUND, "%s: tensor index %zu out of range (%zu tensors)", m->path, i, m->n);
    st_mentry *me = &m->tensors[i];
    if (!me->t) {
        st_shard *s = &m->shards[me->shard];
        if (!s->file) {
            char *sp = path_join(m->dir, s->name);
            if (!sp) return err_set(e, MR_ENOMEM, "%s: out of memory", m->path);
            int rc = st_open(&s->file, sp, e);
            mem_free(sp);
            if (rc) return rc;
        }
        me->t = st_find(s->file, me->name);
        if (!me->t)
            return err_set(e, MR_EFORMAT, "%s: tensor \"%s\" is mapped to shard \"%s\", which does not contain it",
                           m->path, me->name, s->name);
    }
    *t = me->t;
    return 0;
}

/* Position of name in the sorted table, or m->n when absent. */
static size_t model_find(const st_model *m, const char *name) {
    size_t lo = 0, hi = m->n;
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        int c = strcmp(name, m->tensors[mid].name);
        if (c == 0) return mid;
        if (c < 0) hi = mid;
        else lo = mid + 1;
    }
    return m->n;
}

int st_model_get(st_model *m, const char *name, const st_tensor **t, mr_err *e) {
    size_t i = model_find(m, name);
    if (i < m->n) return st_model_get_at(m, i, t, e);
    *t = NULL;
    return err_set(e, MR_ENOTFOUND, "%s: no tensor \"%s\"", m->path, name);
}

int st_model_read_f32(st_model *m, const char *name, float *dst, size_t cap, mr_err *e) {
    const st_tensor *t;
    int rc = st_model_get(m, name, &t, e);
    if (rc) return rc;
    return st_read_f32(m->shards[m->tensors[model_find(m, name)].shard].file, t, dst, cap, e);
}

int st_model_check(st_model *m, mr_err *e) {
    for (size_t i = 0; i < m->n; i++) {
        const st_tensor *t;
        int rc = st_model_get_at(m, i, &t, e);
        if (rc) return rc;
    }
    return 0;
}

/* ================= writer ================= */

typedef struct st_wtensor {
    char *name;
    mr_dtype dtype;
    int ndim;
    int64_t shape[ST_MAX_DIMS];
    const void *data;
    size_t nbytes;
    uint64_t begin; /* assigned per output file */
} st_wtensor;

struct st_writer {
    st_wtensor *t;
    size_t n, cap;
    st_meta *meta; /* owned strings (cast away const on free) */
    size_t n_meta, cap_meta;
};

int st_writer_init(st_writer **out, mr_err *e) {
    *out = mem_calloc(1, sizeof **out);
    return *out ? 0 : err_set(e, MR_ENOMEM, "st_writer: out of memory");
}

void st_writer_free(st_writer *w) {
    if (!w) return;
    for (size_t i = 0; i < w->n; i++) mem_free(w->t[i].name);
    for (size_t i = 0; i < w->n_meta; i++) {
        mem_free((char *)w->meta[i].key);
        mem_free((char *)w->meta[i].value);
    }
    mem_free(w->t);
    mem_free(w->meta);
    mem_free(w);
}

int st_writer_add(st_writer *w, const char *name, mr_dtype dtype, int ndim, const int64_t *shape, const void *data,
                  mr_err *e) {
    if (!name || !*name || !strcmp(name, "__metadata__"))
        return err_set(e, MR_EINVAL, "st_writer: tensor name \"%s\" is not allowed", name ? name : "(null)");
    if (dtype_size(dtype) == 0) return err_set(e, MR_EINVAL, "st_writer: tensor \"%s\": unknown dtype %d", name, (int)dtype);
    if (ndim < 0 || ndim > ST_MAX_DIMS)
        return err_set(e, MR_EINVAL, "st_writer: tensor \"%s\": %d dims (0..%d supported)", name, ndim, ST_MAX_DIMS);
    size_t numel = 1, nbytes;
    for (int i = 0; i < ndim; i++) {
        if (shape[i] < 0 || (uint64_t)shape[i] > (uint64_t)EXACT_INT_MAX)
            return err_set(e, MR_EINVAL, "st_writer: tensor \"%s\": shape[%d] = %lld", name, i, (long long)shape[i]);
        if (size_mul(numel, (size_t)shape[i], &numel) != 0)
            return err_set(e, MR_EINVAL, "st_writer: tensor \"%s\": shape overflows", name);
    }
    if (size_mul(numel, dtype_size(dtype), &nbytes) != 0)
        return err_set(e, MR_EINVAL, "st_writer: tensor \"%s\": shape overflows", name);
    if (nbytes && !data) return err_set(e, MR_EINVAL, "st_writer: tensor \"%s\": no data", name);
    if (w->n == w->cap) {
        size_t cap = w->cap ? 2 * w->cap : 16;
        st_wtensor *t = mem_realloc(w->t, cap * sizeof *t);
        if (!t) return err_set(e, MR_ENOMEM, "st_writer: out of memory adding \"%s\"", name);
        w->t = t;
        w->cap = cap;
    }
    st_wtensor *t = &w->t[w->n];
    memset(t, 0, sizeof *t);
    if (!(t->name = mem_strdup(name))) return err_set(e, MR_ENOMEM, "st_writer: out of memory adding \"%s\"", name);
    t->dtype = dtype;
    t->ndim = ndim;
    for (int i = 0; i < ndim; i++) t->shape[i] = shape[i];
    t->data = data;
    t->nbytes = nbytes;
    w->n++;
    return 0;
}

int st_writer_set_meta(st_writer *w, const char *key, const char *value, mr_err *e) {
    for (size_t i = 0; i < w->n_meta; i++) {
        if (!strcmp(w->meta[i].key, key)) {
            char *v = mem_strdup(value);
            if (!v) return err_set(e, MR_ENOMEM, "st_writer: out of memory");
            mem_free((char *)w->meta[i].value);
            w->meta[i].value = v;
            return 0;
        }
    }
    if (w->n_meta == w->cap_meta) {
        size_t cap = w->cap_meta ? 2 * w->cap_meta : 8;
        st_meta *m = mem_realloc(w->meta, cap * sizeof *m);
        if (!m) return err_set(e, MR_ENOMEM, "st_writer: out of memory");
        w->meta = m;
        w->cap_meta = cap;
    }
    char *k = mem_strdup(key), *v = mem_strdup(value);
    if (!k || !v) {
        mem_free(k);
        mem_free(v);
        return err_set(e, MR_ENOMEM, "st_writer: out of memory");
    }
    w->meta[w->n_meta].key = k;
    w->meta[w->n_meta].value = v;
    w->n_meta++;
    return 0;
}

/* Atomic replace: the content goes to a temp file beside path, is flushed to disk, then renamed over path, and
 * the directory entry is flushed too. Any failure removes the temp file and leaves path as it was. */
typedef int (*emit_fn)(FILE *fp, void *ctx);

static int write_atomic(const char *path, emit_fn emit, void *ctx, mr_err *e) {
    size_t n = strlen(path);
    char *tmp = mem_alloc(n + 16), *dir = path_dir(path); /* both before anything touches the disk */
    if (!tmp || !dir) {
        mem_free(tmp);
        mem_free(dir);
        return err_set(e, MR_ENOMEM, "%s: out of memory", path);
    }
    memcpy(tmp, path, n);
    memcpy(tmp + n, ".tmp-XXXXXX", 12);
    int rc = 0, fd = mkstemp(tmp);
    if (fd < 0) {
        rc = err_set(e, MR_EIO, "%s: cannot create a temporary file beside it: %s", path, strerror(errno));
        goto out;
    }
    FILE *fp = NULL;
    if (fchmod(fd, 0644) != 0 || !(fp = fdopen(fd, "wb"))) {
        rc = err_set(e, MR_EIO, "%s: cannot open the temporary file %s: %s", path, tmp, strerror(errno));
        close(fd);
        goto fail;
    }
    errno = 0;
    int bad = emit(fp, ctx) != 0 || fflush(fp) != 0 || fsync(fileno(fp)) != 0;
    int why = errno;
    if (fclose(fp) != 0 && !bad) {
        bad = 1;
        why = errno;
    }
    if (bad) {
        rc = err_set(e, MR_EIO, "%s: write failed: %s", path, why ? strerror(why) : "short write");
        goto fail;
    }
    if (rename(tmp, path) != 0) {
        rc = err_set(e, MR_EIO, "%s: cannot move the temporary file into place: %s", path, strerror(errno));
        goto fail;
    }
    int dfd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (dfd >= 0) {
        /* Some filesystems refuse fsync on a directory (EINVAL); the rename itself has happened. */
        if (fsync(dfd) != 0 && errno != EINVAL)
            rc = err_set(e, MR_EIO, "%s: fsync of directory %s failed: %s", path, dir, strerror(errno));
        close(dfd);
    }
    goto out;
fail:
    unlink(tmp);
out:
    mem_free(tmp);
    mem_free(dir);
    return rc;
}

/* One output file: a subset of the writer's tensors, in layout order. */
typedef struct st_plan {
    const st_writer *w;
    st_wtensor **v; /* layout order */
    size_t n;
    strbuf header;    /* padded JSON */
} st_plan;

static int cmp_layout(const void *a, const void *b) {
    const st_wtensor *x = *(st_wtensor *const *)a, *y = *(st_wtensor *const *)b;
    size_t sx = dtype_size(x->dtype), sy = dtype_size(y->dtype);
    if (sx != sy) return sx > sy ? -1 : 1; /* largest element first: every tensor stays aligned */
    return strcmp(x->name, y->name);
}
static int cmp_wname(const void *a, const void *b) {
    return strcmp((*(st_wtensor *const *)a)->name, (*(st_wtensor *const *)b)->name);
}

/* Lays out v[0..n) (reordered in place) and builds the header. by_name is scratch of n pointers. */
static int plan_build(st_plan *p, st_wtensor **v, size_t n, st_wtensor **by_name, const char *path, mr_err *e) {
    p->v = v;
    p->n = n;
    qsort(v, n, sizeof *v, cmp_layout);
    uint64_t off = 0;
    for (size_t i = 0; i < n; i++) {
        v[i]->begin = off;
        off += v[i]->nbytes;
    }
    memcpy(by_name, v, n * sizeof *v);
    qsort(by_name, n, sizeof *by_name, cmp_wname);
    strbuf *b = &p->header;
    strbuf_puts(b, "{");
    const st_writer *w = p->w;
    if (w->n_meta) {
        st_meta *ms = mem_alloc(w->n_meta * sizeof *ms);
        if (!ms) return err_set(e, MR_ENOMEM, "%s: out of memory building the header", path);
        memcpy(ms, w->meta, w->n_meta * sizeof *ms);
        qsort(ms, w->n_meta, sizeof *ms, cmp_meta);
        strbuf_puts(b, "\"__metadata__\":{");
        for (size_t i = 0; i < w->n_meta; i++) {
            if (i) strbuf_puts(b, ",");
            strbuf_json_str(b, ms[i].key);
            strbuf_puts(b, ":");
            strbuf_json_str(b, ms[i].value);
        }
        strbuf_puts(b, n ? "}," : "}");
        mem_free(ms);
    }
    for (size_t i = 0; i < n; i++) {
        const st_wtensor *t = by_name[i];
        if (i && !strcmp(by_name[i - 1]->name, t->name))
            return err_set(e, MR_EINVAL, "%s: tensor \"%s\" was added twice", path, t->name);
        if (i) strbuf_puts(b, ",");
        strbuf_json_str(b, t->name);
        strbuf_printf(b, ":{\"dtype\":\"%s\",\"shape\":[", dtype_name(t->dtype));
        for (int d = 0; d < t->ndim; d++) strbuf_printf(b, "%s%lld", d ? "," : "", (long long)t->shape[d]);
        strbuf_printf(b, "],\"data_offsets\":[%llu,%llu]}", (unsigned long long)t->begin,
                  (unsigned long long)(t->begin + t->nbytes));
    }
    strbuf_puts(b, "}");
    while (!b->oom && (8 + b->n) % 8 != 0) strbuf_puts(b, " ");
    if (b->oom) return err_set(e, MR_ENOMEM, "%s: out of memory building the header", path);
    if (b->n > ST_MAX_HEADER)
        return err_set(e, MR_ERANGE, "%s: header of %zu bytes exceeds the %llu-byte limit", path, b->n,
                       (unsigned long long)ST_MAX_HEADER);
    return 0;
}

static int plan_emit(FILE *fp, void *ctx) {
    const st_plan *p = ctx;
    unsigned char len[8];
    uint64_t hl = p->header.n;
    for (int i = 0; i < 8; i++) len[i] = (unsigned char)(hl >> (8 * i));
    if (fwrite(len, 1, 8, fp) != 8 || fwrite(p->header.p, 1, p->header.n, fp) != p->header.n) return -1;
    for (size_t i = 0; i < p->n; i++)
        if (p->v[i]->nbytes && fwrite(p->v[i]->data, 1, p->v[i]->nbytes, fp) != p->v[i]->nbytes) return -1;
    return 0;
}

static int write_subset(st_writer *w, st_wtensor **v, size_t n, const char *path, mr_err *e) {
    st_plan p = {.w = w};
    st_wtensor **scratch = mem_calloc(n, sizeof *scratch);
    if (!scratch) return err_set(e, MR_ENOMEM, "%s: out of memory", path);
    int rc = plan_build(&p, v, n, scratch, path, e);
    mem_free(scratch);
    if (!rc) rc = write_atomic(path, plan_emit, &p, e);
    mem_free(p.header.p);
    return rc;
}

static st_wtensor **writer_ptrs(st_writer *w) {
    st_wtensor **v = mem_calloc(w->n, sizeof *v);
    if (v)
        for (size_t i = 0; i < w->n; i++) v[i] = &w->t[i];
    return v;
}

int st_writer_write(st_writer *w, const char *path, mr_err *e) {
    st_wtensor **v = writer_ptrs(w);
    if (!v) return err_set(e, MR_ENOMEM, "%s: out of memory", path);
    int rc = write_subset(w, v, w->n, path, e);
    mem_free(v);
    return rc;
}

typedef struct index_ctx {
    const strbuf *text;
} index_ctx;

static int index_emit(FILE *fp, void *ctx) {
    const strbuf *b = ((const index_ctx *)ctx)->text;
    return fwrite(b->p, 1, b->n, fp) == b->n ? 0 : -1;
}

static int remove_stale(const char *dir, const char *name, mr_err *e) {
    char *p = path_join(dir, name);
    if (!p) return err_set(e, MR_ENOMEM, "%s: out of memory", dir);
    int rc = 0;
    if (unlink(p) != 0 && errno != ENOENT) rc = err_set(e, MR_EIO, "%s: cannot remove the stale file: %s", p, strerror(errno));
    mem_free(p);
    return rc;
}

int st_writer_write_dir(st_writer *w, const char *dir, size_t max_shard_bytes, mr_err *e) {
    size_t total = 0;
    for (size_t i = 0; i < w->n; i++)
        if (size_add(total, w->t[i].nbytes, &total) != 0) return err_set(e, MR_ERANGE, "%s: checkpoint too large", dir);
    int rc;
    if (max_shard_bytes == 0 || total <= max_shard_bytes) {
        char *p = path_join(dir, SINGLE_NAME);
        if (!p) return err_set(e, MR_ENOMEM, "%s: out of memory", dir);
        rc = st_writer_write(w, p, e);
        mem_free(p);
        return rc ? rc : remove_stale(dir, INDEX_NAME, e);
    }
    /* Shards: greedy in name order (neighbouring names, e.g. one layer, share a shard), as HF does. */
    st_wtensor **v = writer_ptrs(w);
    size_t *first = mem_calloc(w->n + 1, sizeof *first);
    strbuf idx = {0};
    if (!v || !first) {
        rc = err_set(e, MR_ENOMEM, "%s: out of memory", dir);
        goto done;
    }
    qsort(v, w->n, sizeof *v, cmp_wname);
    size_t ns = 0, acc = 0;
    for (size_t i = 0; i < w->n; i++) {
        if (i == 0 || (acc > 0 && acc + v[i]->nbytes > max_shard_bytes)) {
            first[ns++] = i;
            acc = 0;
        }
        acc += v[i]->nbytes;
    }
    first[ns] = w->n;
    if (ns > 99999) {
        rc = err_set(e, MR_ERANGE, "%s: %zu shards exceed the 99999 the naming scheme allows", dir, ns);
        goto done;
    }
    strbuf_printf(&idx, "{\n  \"metadata\": {\n    \"total_size\": %zu\n  },\n  \"weight_map\": {\n", total);
    for (size_t s = 0; s < ns; s++) {
        char name[64];
        snprintf(name, sizeof name, "model-%05zu-of-%05zu.safetensors", s + 1, ns);
        for (size_t i = first[s]; i < first[s + 1]; i++) {
            strbuf_puts(&idx, "    ");
            strbuf_json_str(&idx, v[i]->name);
            strbuf_printf(&idx, ": \"%s\"%s\n", name, i + 1 < w->n ? "," : "");
        }
    }
    strbuf_puts(&idx, "  }\n}\n");
    if (idx.oom) {
        rc = err_set(e, MR_ENOMEM, "%s: out of memory building the index", dir);
        goto done;
    }
    for (size_t i = 1; i < w->n; i++) {
        if (!strcmp(v[i - 1]->name, v[i]->name)) {
            rc = err_set(e, MR_EINVAL, "%s: tensor \"%s\" was added twice", dir, v[i]->name);
            goto done;
        }
    }
    for (size_t s = 0; s < ns; s++) {
        char name[64];
        snprintf(name, sizeof name, "model-%05zu-of-%05zu.safetensors", s + 1, ns);
        char *p = path_join(dir, name);
        if (!p) {
            rc = err_set(e, MR_ENOMEM, "%s: out of memory", dir);
            goto done;
        }
        rc = write_subset(w, v + first[s], first[s + 1] - first[s], p, e);
        mem_free(p);
        if (rc) goto done;
    }
    char *ip = path_join(dir, INDEX_NAME);
    if (!ip) {
        rc = err_set(e, MR_ENOMEM, "%s: out of memory", dir);
        goto done;
    }
    index_ctx ic = {&idx};
    rc = write_atomic(ip, index_emit, &ic, e);
    mem_free(ip);
    if (!rc) rc = remove_stale(dir, SINGLE_NAME, e);
done:
    mem_free(idx.p);
    mem_free(first);
    mem_free(v);
    return rc;
}
