/* checkpoint.c: see checkpoint.h. */
#include "sft/checkpoint.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "core/mem.h"

int dir_make(const char *path, mr_err *e) {
    char buf[4096];
    size_t n = strlen(path);
    if (n == 0 || n >= sizeof buf) return err_set(e, MR_EINVAL, "directory path \"%s\" is empty or too long", path);
    memcpy(buf, path, n + 1);
    for (size_t i = 1; i <= n; i++) {
        if (buf[i] != '/' && buf[i] != '\0') continue;
        char c = buf[i];
        buf[i] = '\0';
        if (mkdir(buf, 0755) != 0 && errno != EEXIST)
            return err_set(e, MR_EIO, "%s: cannot create directory: %s", buf, strerror(errno));
        buf[i] = c;
    }
    return MR_OK;
}

static int fsync_path(const char *path, int dir) {
    int fd = open(path, dir ? O_RDONLY | O_DIRECTORY : O_RDONLY);
    if (fd < 0) return -1;
    int rc = fsync(fd);
    close(fd);
    return rc;
}

int file_write_atomic(const char *path, const void *data, size_t n, mr_err *e) {
    char tmp[4200];
    snprintf(tmp, sizeof tmp, "%s.tmp.%d", path, (int)getpid());
    FILE *f = fopen(tmp, "wb");
    if (!f) return err_set(e, MR_EIO, "%s: cannot write: %s", path, strerror(errno));
    size_t w = fwrite(data, 1, n, f);
    int bad = w != n || fflush(f) != 0 || fsync(fileno(f)) != 0;
    int saved = errno;
    if (fclose(f) != 0) bad = 1;
    if (bad || rename(tmp, path) != 0) {
        if (!bad) saved = errno;
        remove(tmp);
        return err_set(e, MR_EIO, "%s: write failed: %s", path, strerror(saved));
    }
    return MR_OK;
}

int file_copy(const char *src, const char *dst, mr_err *e) {
    FILE *in = fopen(src, "rb");
    if (!in) return err_set(e, MR_EIO, "%s: cannot read: %s", src, strerror(errno));
    FILE *out = fopen(dst, "wb");
    if (!out) {
        fclose(in);
        return err_set(e, MR_EIO, "%s: cannot write: %s", dst, strerror(errno));
    }
    char buf[1 << 16];
    size_t r;
    int bad = 0;
    while ((r = fread(buf, 1, sizeof buf, in)) > 0)
        if (fwrite(buf, 1, r, out) != r) bad = 1;
    if (ferror(in)) bad = 1;
    fclose(in);
    if (fflush(out) != 0 || fsync(fileno(out)) != 0) bad = 1;
    if (fclose(out) != 0) bad = 1;
    return bad ? err_set(e, MR_EIO, "%s: copy to %s failed: %s", src, dst, strerror(errno)) : MR_OK;
}

static int rm_tree(const char *path) {
    struct stat sb;
    if (lstat(path, &sb) != 0) return errno == ENOENT ? 0 : -1;
    if (!S_ISDIR(sb.st_mode)) return unlink(path);
    DIR *d = opendir(path);
    if (!d) return -1;
    struct dirent *de;
    int rc = 0;
    while ((de = readdir(d))) {
        if (!strcmp(de->d_name, ".") || !strcmp(de->d_name, "..")) continue;
        char sub[4200];
        snprintf(sub, sizeof sub, "%s/%s", path, de->d_name);
        rc |= rm_tree(sub);
    }
    closedir(d);
    return rc | rmdir(path);
}

/* step-NNNNNNNN -> NNNNNNNN, or -1 */
static int64_t step_of(const char *name) {
    if (strncmp(name, "step-", 5) != 0) return -1;
    char *end;
    long long v = strtoll(name + 5, &end, 10);
    return (*end || end == name + 5 || v < 0) ? -1 : (int64_t)v;
}

static int cmp_i64(const void *a, const void *b) {
    int64_t x = *(const int64_t *)a, y = *(const int64_t *)b;
    return (x > y) - (x < y);
}

/* Steps of the complete checkpoints, ascending (mem_alloc'd), and removes stale .tmp directories. */
static int list_steps(const char *out_dir, int64_t **steps, size_t *n, int clean_tmp) {
    *steps = NULL;
    *n = 0;
    DIR *d = opendir(out_dir);
    if (!d) return errno == ENOENT ? 0 : -1;
    size_t cap = 0;
    struct dirent *de;
    while ((de = readdir(d))) {
        if (clean_tmp && de->d_name[0] == '.' && !strncmp(de->d_name, ".step-", 6)) {
            char sub[4200];
            snprintf(sub, sizeof sub, "%s/%s", out_dir, de->d_name);
            rm_tree(sub);
            continue;
        }
        int64_t s = step_of(de->d_name);
        if (s < 0) continue;
        if (*n == cap) {
            cap = cap ? 2 * cap : 16;
            int64_t *g = mem_realloc(*steps, cap * sizeof(int64_t));
            if (!g) {
                closedir(d);
                return -1;
            }
            *steps = g;
        }
        (*steps)[(*n)++] = s;
    }
    closedir(d);
    if (*n) qsort(*steps, *n, sizeof(int64_t), cmp_i64);
    return 0;
}

int ckpt_save(const char *out_dir, int64_t step, const model_params *p, const adamw *o, const char *state_json,
              const char *tokenizer_dir, int keep, char *path_out, size_t path_cap, mr_err *e) {
    int rc = dir_make(out_dir, e);
    if (rc) return rc;
    int64_t *steps;
    size_t n;
    list_steps(out_dir, &steps, &n, 1); /* removes a killed writer's .tmp */
    mem_free(steps);
    char tmp[4200], fin[4200], f[4300];
    snprintf(tmp, sizeof tmp, "%s/.step-%08lld.tmp", out_dir, (long long)step);
    snprintf(fin, sizeof fin, "%s/step-%08lld", out_dir, (long long)step);
    rm_tree(tmp);
    if ((rc = dir_make(tmp, e))) return rc;
    if ((rc = params_save(p, tmp, 0, 0, e))) goto fail;
    if (o && (rc = adamw_save(o, p, tmp, e))) goto fail;
    if (state_json) {
        snprintf(f, sizeof f, "%s/trainer_state.json", tmp);
        if ((rc = file_write_atomic(f, state_json, strlen(state_json), e))) goto fail;
    }
    if (tokenizer_dir) {
        static const char *const files[] = {"tokenizer.json", "tokenizer_config.json"};
        for (int i = 0; i < 2; i++) {
            char src[4300];
            snprintf(src, sizeof src, "%s/%s", tokenizer_dir, files[i]);
            snprintf(f, sizeof f, "%s/%s", tmp, files[i]);
            if (access(src, R_OK) == 0 && (rc = file_copy(src, f, e))) goto fail;
        }
    }
    fsync_path(tmp, 1);
    rm_tree(fin); /* a resumed run may save the same step again */
    if (rename(tmp, fin) != 0) {
        rc = err_set(e, MR_EIO, "%s: cannot rename into place: %s", fin, strerror(errno));
        goto fail;
    }
    fsync_path(out_dir, 1);
    if (path_out) snprintf(path_out, path_cap, "%s", fin);
    if (keep > 0 && list_steps(out_dir, &steps, &n, 0) == 0) {
        for (size_t i = 0; i + (size_t)keep < n; i++) {
            snprintf(f, sizeof f, "%s/step-%08lld", out_dir, (long long)steps[i]);
            rm_tree(f);
        }
        mem_free(steps);
    }
    return MR_OK;
fail:
    rm_tree(tmp);
    return err_prefix(e, "checkpoint %s", fin);
}

int ckpt_latest(const char *out_dir, char *path, size_t cap, int64_t *step, mr_err *e) {
    int64_t *steps;
    size_t n;
    if (list_steps(out_dir, &steps, &n, 0) != 0)
        return err_set(e, MR_EIO, "%s: cannot list checkpoints: %s", out_dir, strerror(errno));
    if (n == 0) {
        mem_free(steps);
        return err_set(e, MR_ENOTFOUND, "%s: no checkpoint (step-*) to resume from", out_dir);
    }
    *step = steps[n - 1];
    snprintf(path, cap, "%s/step-%08lld", out_dir, (long long)*step);
    mem_free(steps);
    return MR_OK;
}

int ckpt_read_state(const char *ckpt_dir, char **json, mr_err *e) {
    char f[4200];
    snprintf(f, sizeof f, "%s/trainer_state.json", ckpt_dir);
    FILE *in = fopen(f, "rb");
    if (!in) return err_set(e, MR_EIO, "%s: cannot read: %s", f, strerror(errno));
    fseek(in, 0, SEEK_END);
    long sz = ftell(in);
    fseek(in, 0, SEEK_SET);
    if (sz < 0 || sz > (64 << 20)) {
        fclose(in);
        return err_set(e, MR_EFORMAT, "%s: unexpected size %ld", f, sz);
    }
    char *buf = mem_alloc((size_t)sz + 1);
    if (!buf) {
        fclose(in);
        return err_set(e, MR_ENOMEM, "%s: out of memory", f);
    }
    size_t r = fread(buf, 1, (size_t)sz, in);
    fclose(in);
    buf[r] = '\0';
    *json = buf;
    return MR_OK;
}
