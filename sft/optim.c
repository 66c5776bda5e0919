/* optim.c: AdamW, gradient norm/clip/finite check, and optimizer state I/O (see optim.h).
 *
 * Determinism: the update is elementwise; the gradient reductions cut each entry into fixed chunks of
 * GRAD_CHUNK floats, sum each chunk sequentially in double (threads take whole chunks), then add the chunks of
 * an entry and the entries of the table in order. The partition depends on the layout only, never on the
 * thread count. */
#include "sft/optim.h"

#include <assert.h>
#include <errno.h>
#include <inttypes.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "core/mem.h"
#include "core/safetensors.h"
#include "kernels/backend.h"

#define GRAD_CHUNK OPTIM_SUMSQ_CHUNK /* kernels/cpu/dense.h: the device ops sum the same chunks */
#define GRAD_BATCH 256
#define STATE_FILE "optimizer.safetensors"
#define STATE_FORMAT "moerl.adamw.v1"

static int trainable(const param_entry *pe) {
    return !(pe->flags & PARAM_BUFFER);
}

adamw_cfg adamw_defaults(void) {
    return (adamw_cfg){.beta1 = 0.9, .beta2 = 0.999, .eps = 1e-8, .weight_decay = 0.01};
}

int adamw_init(adamw *o, const model_params *p, adamw_cfg cfg, mr_err *e) {
    memset(o, 0, sizeof *o);
    if (!(cfg.beta1 >= 0 && cfg.beta1 < 1))
        return err_set(e, MR_EINVAL, "adamw: beta1 must be >= 0 and < 1, got %g", cfg.beta1);
    if (!(cfg.beta2 >= 0 && cfg.beta2 < 1))
        return err_set(e, MR_EINVAL, "adamw: beta2 must be >= 0 and < 1, got %g", cfg.beta2);
    if (!(cfg.eps > 0) || !isfinite(cfg.eps))
        return err_set(e, MR_EINVAL, "adamw: eps must be a finite number > 0, got %g", cfg.eps);
    if (!(cfg.weight_decay >= 0) || !isfinite(cfg.weight_decay))
        return err_set(e, MR_EINVAL, "adamw: weight_decay must be a finite number >= 0, got %g", cfg.weight_decay);
    o->cfg = cfg;
    o->n = p->n;
    size_t bytes;
    if (size_mul(p->n ? p->n : 1, sizeof(float), &bytes)) {
        err_set(e, MR_ENOMEM, "adamw: %zu parameters overflow the state size", p->n);
        goto fail;
    }
    o->be = p->be;
    o->m = o->be ? o->be->alloc(bytes) : mem_alloc_aligned(bytes);
    o->v = o->be ? o->be->alloc(bytes) : mem_alloc_aligned(bytes);
    if (!o->m || !o->v) {
        err_set(e, MR_ENOMEM, "adamw: out of memory for the state (2 x %zu bytes%s%s)", bytes,
                o->be ? " on backend " : "", o->be ? o->be->name : "");
        goto fail;
    }
    if (o->be) {
        o->be->zero(o->m, bytes);
        o->be->zero(o->v, bytes);
        if (o->be->sync(e)) goto fail;
    } else {
        memset(o->m, 0, bytes);
        memset(o->v, 0, bytes);
    }
    return MR_OK;
fail:
    adamw_free(o);
    return e ? e->code : MR_ENOMEM;
}

void adamw_free(adamw *o) {
    if (!o) return;
    if (o->be) {
        o->be->free(o->m);
        o->be->free(o->v);
    } else {
        mem_free_aligned(o->m);
        mem_free_aligned(o->v);
    }
    memset(o, 0, sizeof *o);
}

void adamw_step(adamw *o, model_params *p, double lr) {
    assert(o->m && p->grad && o->n == p->n && o->be == p->be &&
           "adamw_step: no gradient, or the layout or the backend changed since adamw_init");
    if (!o->m || !p->grad || o->n != p->n || o->be != p->be) return;
    o->step++;
    const adamw_cfg c = o->cfg;
    for (int k = 0; k < p->n_entries; k++) {
        const param_entry *pe = &p->entries[k];
        if (!trainable(pe)) continue;
        const double wd = (pe->flags & PARAM_NO_DECAY) ? 0.0 : c.weight_decay;
        const size_t off = pe->offset;
        if (o->be) /* a failure is reported by the backend's next sync */
            o->be->adamw_update(p->data + off, p->grad + off, o->m + off, o->v + off, pe->numel, c.beta1, c.beta2,
                                c.eps, wd, o->step, lr, NULL);
        else
            adamw_update_f32(p->data + off, p->grad + off, o->m + off, o->v + off, pe->numel, c.beta1, c.beta2, c.eps,
                             wd, o->step, lr);
    }
}

/* ---------------- gradient utilities ---------------- */

typedef struct grad_chunk {
    int entry;
    size_t off, len; /* into grad */
} grad_chunk;

typedef struct chunk_iter {
    const model_params *p;
    int entry;
    size_t pos; /* within the entry */
} chunk_iter;

/* Fills b with up to GRAD_BATCH chunks of trainable entries, in table order; returns how many. */
static int chunk_next(chunk_iter *it, grad_chunk *b) {
    int k = 0;
    while (k < GRAD_BATCH && it->entry < it->p->n_entries) {
        const param_entry *pe = &it->p->entries[it->entry];
        if (!trainable(pe) || it->pos >= pe->numel) {
            it->entry++;
            it->pos = 0;
            continue;
        }
        size_t len = pe->numel - it->pos < GRAD_CHUNK ? pe->numel - it->pos : GRAD_CHUNK;
        b[k++] = (grad_chunk){it->entry, pe->offset + it->pos, len};
        it->pos += len;
    }
    return k;
}

/* The sum of squares of each trainable entry on the parameters' device (NULL e: failures are the sync's). */
static double device_entry_sumsq(const model_params *p, const param_entry *pe) {
    double s = 0.0;
    mr_err e = {0};
    if (p->be->grad_sumsq(&s, p->grad + pe->offset, pe->numel, &e)) return NAN;
    return s;
}

double grad_sumsq(const model_params *p) {
    if (!p->grad) return 0.0;
    if (p->be) { /* entries in table order, each the chunked sum: grad_sumsq's bits */
        double total = 0.0;
        for (int k = 0; k < p->n_entries; k++)
            if (trainable(&p->entries[k])) total += device_entry_sumsq(p, &p->entries[k]);
        return total;
    }
    grad_chunk b[GRAD_BATCH];
    double part[GRAD_BATCH];
    chunk_iter it = {p, 0, 0};
    double total = 0.0, entry_sum = 0.0;
    int cur = -1, k;
    while ((k = chunk_next(&it, b)) > 0) {
#pragma omp parallel for schedule(dynamic, 1)
        for (int j = 0; j < k; j++) part[j] = sumsq_f64(p->grad + b[j].off, b[j].len);
        for (int j = 0; j < k; j++) {
            if (b[j].entry != cur) { /* entries are added to the total in table order */
                total += entry_sum;
                entry_sum = 0.0;
                cur = b[j].entry;
            }
            entry_sum += part[j];
        }
    }
    return total + entry_sum;
}

double grad_norm(const model_params *p) {
    return sqrt(grad_sumsq(p));
}

void grad_scale(model_params *p, float s) {
    if (!p->grad) return;
    if (p->be) {
        for (int k = 0; k < p->n_entries; k++)
            if (trainable(&p->entries[k])) p->be->scale(p->grad + p->entries[k].offset, s, p->entries[k].numel);
        return;
    }
    float *g = p->grad;
#pragma omp parallel
    for (int k = 0; k < p->n_entries; k++) {
        const param_entry *pe = &p->entries[k];
        if (!trainable(pe)) continue;
#pragma omp for schedule(static)
        for (size_t i = pe->offset; i < pe->offset + pe->numel; i++) g[i] *= s;
    }
}

float grad_clip_coef(double norm, double max_norm) {
    if (!(max_norm > 0) || !isfinite(norm) || !(norm > max_norm)) return 1.0f;
    return (float)(max_norm / (norm + 1e-6)); /* clip_grad_norm_: max_norm / (total_norm + 1e-6) */
}

double grad_clip(model_params *p, double max_norm) {
    double norm = grad_norm(p);
    float coef = grad_clip_coef(norm, max_norm);
    if (coef != 1.0f) grad_scale(p, coef);
    return norm;
}

/* On a device: an entry whose sum of squares is finite has only finite elements (a float's square fits a double
 * with room to spare); the first entry that does not is copied to the host to name the element. */
static int device_check_finite(const model_params *p, mr_err *e) {
    for (int k = 0; k < p->n_entries; k++) {
        const param_entry *pe = &p->entries[k];
        if (!trainable(pe) || isfinite(device_entry_sumsq(p, pe))) continue;
        float *h = mem_alloc(pe->numel * sizeof(float));
        if (!h) return err_set(e, MR_ENOMEM, "gradient of %s is not finite (out of memory to say where)", pe->name);
        int rc = p->be->to_host(h, p->grad + pe->offset, pe->numel * sizeof(float), e);
        for (size_t i = 0; !rc && i < pe->numel; i++)
            if (!isfinite(h[i])) {
                rc = err_set(e, MR_ERANGE, "gradient of %s[%zu] is not finite (%g)", pe->name, i, (double)h[i]);
                break;
            }
        mem_free(h);
        return rc ? rc : err_set(e, MR_ERANGE, "gradient of %s is not finite", pe->name);
    }
    return p->be->sync(e);
}

int grad_check_finite(const model_params *p, mr_err *e) {
    if (!p->grad) return MR_OK;
    if (p->be) return device_check_finite(p, e);
    grad_chunk b[GRAD_BATCH];
    size_t bad[GRAD_BATCH];
    chunk_iter it = {p, 0, 0};
    int k;
    while ((k = chunk_next(&it, b)) > 0) {
#pragma omp parallel for schedule(dynamic, 1)
        for (int j = 0; j < k; j++) {
            const float *g = p->grad + b[j].off;
            size_t first = SIZE_MAX;
            for (size_t i = 0; i < b[j].len; i++) {
                if (!isfinite(g[i])) {
                    first = i;
                    break;
                }
            }
            bad[j] = first;
        }
        for (int j = 0; j < k; j++) {
            if (bad[j] == SIZE_MAX) continue;
            const param_entry *pe = &p->entries[b[j].entry];
            size_t at = b[j].off + bad[j];
            return err_set(e, MR_ERANGE, "gradient of %s[%zu] is not finite (%g)", pe->name, at - pe->offset,
                           (double)p->grad[at]);
        }
    }
    return MR_OK;
}

/* ---------------- state I/O ---------------- */

static char *state_path(const char *dir) {
    size_t n = strlen(dir) + sizeof("/" STATE_FILE);
    char *s = mem_alloc(n);
    if (s) snprintf(s, n, "%s/%s", dir, STATE_FILE);
    return s;
}

static void tensor_name(char *buf, size_t cap, const param_entry *pe, int sq) {
    snprintf(buf, cap, "%s.%s", pe->name, sq ? "exp_avg_sq" : "exp_avg");
}

static int set_meta_double(st_writer *w, const char *key, double x, mr_err *e) {
    char buf[40];
    snprintf(buf, sizeof buf, "%.17g", x);
    return st_writer_set_meta(w, key, buf, e);
}

int adamw_save(const adamw *o, const model_params *p, const char *dir, mr_err *e) {
    if (o->n != p->n || !o->m)
        return err_set(e, MR_EINVAL, "adamw_save: the optimizer state holds %zu floats, the parameters %zu", o->n,
                       p->n);
    if (mkdir(dir, 0755) != 0 && errno != EEXIST)
        return err_set(e, MR_EIO, "%s: cannot create directory: %s", dir, strerror(errno));
    char *path = state_path(dir);
    st_writer *w = NULL;
    float *hm = NULL, *hv = NULL; /* host copies of a device state */
    const float *sm = o->m, *sv = o->v;
    int rc;
    if (!path) {
        rc = err_set(e, MR_ENOMEM, "%s: out of memory", dir);
        goto done;
    }
    if (o->be) {
        hm = mem_alloc_aligned(o->n * sizeof(float));
        hv = mem_alloc_aligned(o->n * sizeof(float));
        if (!hm || !hv) {
            rc = err_set(e, MR_ENOMEM, "%s: out of memory for a host copy of the optimizer state", dir);
            goto done;
        }
        if ((rc = o->be->to_host(hm, o->m, o->n * sizeof(float), e)) ||
            (rc = o->be->to_host(hv, o->v, o->n * sizeof(float), e)))
            goto done;
        sm = hm;
        sv = hv;
    }
    if ((rc = st_writer_init(&w, e))) goto done;
    char step[32];
    snprintf(step, sizeof step, "%" PRId64, o->step);
    if ((rc = st_writer_set_meta(w, "format", STATE_FORMAT, e)) || (rc = st_writer_set_meta(w, "step", step, e)) ||
        (rc = set_meta_double(w, "beta1", o->cfg.beta1, e)) || (rc = set_meta_double(w, "beta2", o->cfg.beta2, e)) ||
        (rc = set_meta_double(w, "eps", o->cfg.eps, e)) ||
        (rc = set_meta_double(w, "weight_decay", o->cfg.weight_decay, e)))
        goto done;
    for (int k = 0; k < p->n_entries; k++) {
        const param_entry *pe = &p->entries[k];
        if (!trainable(pe)) continue;
        for (int sq = 0; sq < 2; sq++) {
            char name[sizeof pe->name + 16];
            tensor_name(name, sizeof name, pe, sq);
            const float *src = (sq ? sv : sm) + pe->offset;
            if ((rc = st_writer_add(w, name, DT_F32, pe->ndim, pe->shape, src, e))) goto done;
        }
    }
    rc = st_writer_write(w, path, e);
done:
    st_writer_free(w);
    mem_free_aligned(hm);
    mem_free_aligned(hv);
    mem_free(path);
    return rc;
}

/* A metadata double that must equal the configured one exactly (both printed with %.17g). */
static int check_meta_double(const st_file *f, const char *key, double want, mr_err *e) {
    const char *s = st_meta_get(f, key);
    if (!s) return err_set(e, MR_EFORMAT, "%s: metadata \"%s\" is missing", st_path(f), key);
    char *end;
    errno = 0;
    double got = strtod(s, &end);
    if (end == s || *end || errno)
        return err_set(e, MR_EFORMAT, "%s: metadata \"%s\": expected a number, got \"%s\"", st_path(f), key, s);
    if (got != want)
        return err_set(e, MR_EFORMAT,
                       "%s: metadata \"%s\" is %.17g but the optimizer is configured with %.17g (the state was "
                       "saved with other AdamW settings)",
                       st_path(f), key, got, want);
    return MR_OK;
}

static void shape_str(char *buf, size_t cap, int ndim, const int64_t *shape) {
    size_t n = (size_t)snprintf(buf, cap, "[");
    for (int d = 0; d < ndim && n < cap; d++)
        n += (size_t)snprintf(buf + n, cap - n, "%s%" PRId64, d ? ", " : "", shape[d]);
    if (n < cap) snprintf(buf + n, cap - n, "]");
}

/* Checks one expected tensor: present, F32, the entry's shape. */
static int check_tensor(const st_file *f, const param_entry *pe, int sq, const st_tensor **out, mr_err *e) {
    char name[sizeof pe->name + 16];
    tensor_name(name, sizeof name, pe, sq);
    const st_tensor *t = st_find(f, name);
    if (!t)
        return err_set(e, MR_ENOTFOUND,
                       "%s: tensor \"%s\" is missing (the state was saved for a different parameter set)",
                       st_path(f), name);
    if (t->dtype != DT_F32)
        return err_set(e, MR_EFORMAT, "%s: tensor \"%s\": expected dtype F32, got %s", st_path(f), name,
                       dtype_name(t->dtype));
    int same = t->ndim == pe->ndim;
    for (int d = 0; same && d < pe->ndim; d++) same = t->shape[d] == pe->shape[d];
    if (!same) {
        char want[64], got[8 * 24];
        shape_str(want, sizeof want, pe->ndim, pe->shape);
        shape_str(got, sizeof got, t->ndim, t->shape);
        return err_set(e, MR_EFORMAT, "%s: tensor \"%s\": expected shape %s, got %s", st_path(f), name, want, got);
    }
    *out = t;
    return MR_OK;
}

/* The name of a file tensor adamw_save would not have written for p, or NULL. */
static const char *unexpected_tensor(const st_file *f, const model_params *p) {
    for (size_t i = 0; i < st_count(f); i++) {
        const char *name = st_tensor_at(f, i)->name;
        size_t n = strlen(name), base;
        if (n > 11 && strcmp(name + n - 11, ".exp_avg_sq") == 0)
            base = n - 11;
        else if (n > 8 && strcmp(name + n - 8, ".exp_avg") == 0)
            base = n - 8;
        else
            return name;
        char pname[sizeof p->entries[0].name];
        if (base >= sizeof pname) return name;
        memcpy(pname, name, base);
        pname[base] = '\0';
        const param_entry *pe = params_find(p, pname);
        if (!pe || !trainable(pe)) return name;
    }
    return NULL;
}

int adamw_load(adamw *o, const model_params *p, const char *dir, mr_err *e) {
    if (o->n != p->n || !o->m)
        return err_set(e, MR_EINVAL, "adamw_load: the optimizer state holds %zu floats, the parameters %zu", o->n,
                       p->n);
    char *path = state_path(dir);
    if (!path) return err_set(e, MR_ENOMEM, "%s: out of memory", dir);
    st_file *f = NULL;
    float *h = NULL; /* host staging of a device state */
    int rc = st_open(&f, path, e);
    if (rc) goto done;
    const char *fmt = st_meta_get(f, "format");
    if (!fmt || strcmp(fmt, STATE_FORMAT) != 0) {
        rc = err_set(e, MR_EFORMAT, "%s: metadata \"format\": expected \"%s\", got %s%s%s", path, STATE_FORMAT,
                     fmt ? "\"" : "", fmt ? fmt : "none", fmt ? "\"" : "");
        goto done;
    }
    const char *s = st_meta_get(f, "step");
    char *end = NULL;
    errno = 0;
    long long step = s ? strtoll(s, &end, 10) : -1;
    if (!s || end == s || *end || errno || step < 0) {
        rc = err_set(e, MR_EFORMAT, "%s: metadata \"step\": expected an integer >= 0, got %s%s%s", path,
                     s ? "\"" : "", s ? s : "none", s ? "\"" : "");
        goto done;
    }
    if ((rc = check_meta_double(f, "beta1", o->cfg.beta1, e)) || (rc = check_meta_double(f, "beta2", o->cfg.beta2, e)) ||
        (rc = check_meta_double(f, "eps", o->cfg.eps, e)))
        goto done;
    /* validate everything before touching o, so a failed load leaves the state as it was */
    const st_tensor *t;
    for (int k = 0; k < p->n_entries; k++) {
        const param_entry *pe = &p->entries[k];
        if (!trainable(pe)) continue;
        for (int sq = 0; sq < 2; sq++)
            if ((rc = check_tensor(f, pe, sq, &t, e))) goto done;
    }
    const char *extra = unexpected_tensor(f, p);
    if (extra) {
        rc = err_set(e, MR_EFORMAT,
                     "%s: tensor \"%s\" matches no trainable parameter (the state was saved for a different "
                     "parameter set)",
                     path, extra);
        goto done;
    }
    for (int k = 0; k < p->n_entries; k++) {
        const param_entry *pe = &p->entries[k];
        if (!trainable(pe)) continue;
        for (int sq = 0; sq < 2; sq++) {
            check_tensor(f, pe, sq, &t, e);
            float *dst = (sq ? o->v : o->m) + pe->offset;
            if (!o->be) {
                if ((rc = st_read_f32(f, t, dst, pe->numel, e))) goto done;
                continue;
            }
            if (!h && !(h = mem_alloc_aligned(p->n * sizeof(float)))) {
                rc = err_set(e, MR_ENOMEM, "%s: out of memory for a host copy of the optimizer state", path);
                goto done;
            }
            if ((rc = st_read_f32(f, t, h, pe->numel, e)) ||
                (rc = o->be->to_device(dst, h, pe->numel * sizeof(float), e)))
                goto done;
        }
    }
    o->step = (int64_t)step;
done:
    mem_free_aligned(h);
    st_close(f);
    mem_free(path);
    return rc;
}
