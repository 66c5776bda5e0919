/* cmd_inspect.c: `moerl inspect PATH [--json]`: list a checkpoint's tensors (name, dtype, shape) and totals.
 * PATH is a .safetensors file, a model.safetensors.index.json, or a checkpoint directory. Every shard is opened
 * and every header validated (st_model_check), so a clean listing also means a loadable checkpoint. */
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>

#include "cli/cli.h"
#include "core/err.h"
#include "core/safetensors.h"
#include "model/config.h"

static void usage(FILE *f) {
    fprintf(f,
            "usage: moerl inspect PATH [--json]\n\n"
            "List the tensors of a safetensors checkpoint: name, dtype, shape, and totals (tensors, parameters,\n"
            "bytes). PATH is a .safetensors file, a model.safetensors.index.json, or a directory holding one of\n"
            "model.safetensors / model.safetensors.index.json. Every header is validated; the first problem is\n"
            "reported as one line and the exit status is 1.\n\n"
            "options:\n"
            "  --json     print one JSON object instead of a table\n"
            "  -h, --help show this help\n");
}

static void json_str(FILE *f, const char *s) {
    fputc('"', f);
    for (const unsigned char *c = (const unsigned char *)s; *c; c++) {
        if (*c == '"' || *c == '\\') fprintf(f, "\\%c", *c);
        else if (*c < 0x20) fprintf(f, "\\u%04x", *c);
        else fputc(*c, f);
    }
    fputc('"', f);
}

static void shape_str(char *buf, size_t cap, const st_tensor *t) {
    size_t n = (size_t)snprintf(buf, cap, "[");
    for (int d = 0; d < t->ndim && n < cap; d++)
        n += (size_t)snprintf(buf + n, cap - n, "%s%lld", d ? ", " : "", (long long)t->shape[d]);
    if (n < cap) snprintf(buf + n, cap - n, "]");
}

/* The directory of a checkpoint path (the path itself when it is a directory), for sibling files. */
static void checkpoint_dir(const char *path, char *buf, size_t cap) {
    struct stat sb;
    if (stat(path, &sb) == 0 && S_ISDIR(sb.st_mode)) {
        snprintf(buf, cap, "%s", path);
        return;
    }
    const char *slash = strrchr(path, '/');
    if (!slash) snprintf(buf, cap, ".");
    else snprintf(buf, cap, "%.*s", (int)(slash - path), path);
}

int cmd_inspect(int argc, char **argv) {
    if (cli_wants_help(argc, argv)) {
        usage(stdout);
        return 0;
    }
    const char *path = NULL;
    int as_json = 0;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--json")) {
            as_json = 1;
        } else if (argv[i][0] == '-' && argv[i][1] != '\0') {
            fprintf(stderr, "moerl inspect: unknown option '%s' (try 'moerl inspect --help')\n", argv[i]);
            return 2;
        } else if (path) {
            fprintf(stderr, "moerl inspect: expected one PATH, got '%s' and '%s'\n", path, argv[i]);
            return 2;
        } else {
            path = argv[i];
        }
    }
    if (!path) {
        fprintf(stderr, "moerl inspect: missing PATH (try 'moerl inspect --help')\n");
        return 2;
    }

    mr_err e = {0};
    size_t plen = strlen(path);
    if (plen >= 11 && !strcmp(path + plen - 11, "config.json")) { /* a config.json alone: validate it */
        model_config c;
        config_params pc;
        if (config_load_file(&c, path, &e)) {
            fprintf(stderr, "moerl inspect: %s\n", e.msg);
            return 1;
        }
        int over = config_param_breakdown(&c, &pc);
        printf("%s: valid %s config; %llu parameters (%llu active per token)%s\n", path,
               config_model_type_name(c.model_type), (unsigned long long)pc.total, (unsigned long long)pc.activated,
               over ? " (count overflows)" : "");
        return 0;
    }
    st_model *m = NULL;
    if (st_model_open(&m, path, &e) != 0 || st_model_check(m, &e) != 0) {
        fprintf(stderr, "moerl inspect: %s\n", e.msg);
        st_model_close(m);
        return 1;
    }

    char dir[4096];
    checkpoint_dir(path, dir, sizeof dir);
    /* A checkpoint directory's config.json must be valid too: its first error is the command's error. */
    char cfg_path[4200];
    snprintf(cfg_path, sizeof cfg_path, "%s/config.json", dir);
    struct stat cs;
    if (stat(cfg_path, &cs) == 0) {
        model_config c;
        if (config_load_file(&c, cfg_path, &e)) {
            fprintf(stderr, "moerl inspect: %s\n", e.msg);
            st_model_close(m);
            return 1;
        }
    }

    size_t n = st_model_count(m), width = 4;
    uint64_t params = 0, bytes = 0;
    for (size_t i = 0; i < n; i++) {
        const st_tensor *t;
        st_model_get_at(m, i, &t, &e); /* cannot fail: st_model_check resolved every tensor */
        params += t->numel;
        bytes += t->nbytes;
        size_t w = strlen(t->name);
        if (w > width) width = w;
    }
    if (width > 100) width = 100;
    int sharded = st_model_is_sharded(m);
    int64_t declared = st_model_declared_total_size(m);
    char shp[256];

    if (as_json) {
        printf("{\"path\": ");
        json_str(stdout, st_model_path(m));
        printf(", \"sharded\": %s, \"shards\": [", sharded ? "true" : "false");
        for (size_t s = 0; s < st_model_shard_count(m); s++) {
            if (s) printf(", ");
            json_str(stdout, st_model_shard_name(m, s));
        }
        printf("]");
        const st_file *f0 = st_model_shard_file(m, 0);
        if (!sharded && f0) {
            printf(", \"metadata\": {");
            for (size_t k = 0; k < st_meta_count(f0); k++) {
                const char *key, *val;
                st_meta_at(f0, k, &key, &val);
                printf("%s", k ? ", " : "");
                json_str(stdout, key);
                printf(": ");
                json_str(stdout, val);
            }
            printf("}");
        }
        printf(", \"tensors\": [");
        for (size_t i = 0; i < n; i++) {
            const st_tensor *t;
            st_model_get_at(m, i, &t, &e);
            printf("%s\n  {\"name\": ", i ? "," : "");
            json_str(stdout, t->name);
            printf(", \"dtype\": \"%s\", \"shape\": [", dtype_name(t->dtype));
            for (int d = 0; d < t->ndim; d++) printf("%s%lld", d ? ", " : "", (long long)t->shape[d]);
            printf("], \"bytes\": %zu, \"shard\": ", t->nbytes);
            json_str(stdout, st_model_shard_name(m, st_model_shard_of(m, i)));
            printf("}");
        }
        printf("%s], \"total\": {\"tensors\": %zu, \"parameters\": %llu, \"bytes\": %llu}", n ? "\n" : "", n,
               (unsigned long long)params, (unsigned long long)bytes);
        if (declared >= 0) printf(", \"declared_total_size\": %lld", (long long)declared);
        printf("}\n");
    } else {
        printf("%s: %zu tensor%s in %zu file%s\n", st_model_path(m), n, n == 1 ? "" : "s", st_model_shard_count(m),
               st_model_shard_count(m) == 1 ? "" : "s");
        const st_file *f0 = st_model_shard_file(m, 0);
        for (size_t k = 0; !sharded && f0 && k < st_meta_count(f0); k++) {
            const char *key, *val;
            st_meta_at(f0, k, &key, &val);
            printf("metadata: %s = %s\n", key, val);
        }
        for (size_t i = 0; i < n; i++) {
            const st_tensor *t;
            st_model_get_at(m, i, &t, &e);
            shape_str(shp, sizeof shp, t);
            printf("%-*s  %-7s  %s", (int)width, t->name, dtype_name(t->dtype), shp);
            if (sharded) printf("  %s", st_model_shard_name(m, st_model_shard_of(m, i)));
            printf("\n");
        }
        printf("total: %zu tensor%s, %llu parameters, %llu bytes\n", n, n == 1 ? "" : "s", (unsigned long long)params,
               (unsigned long long)bytes);
        if (declared >= 0 && (uint64_t)declared != bytes)
            printf("note: the index declares metadata.total_size = %lld, the tensors hold %llu bytes\n",
                   (long long)declared, (unsigned long long)bytes);
    }
    st_model_close(m);
    return 0;
}
