/* testutil.c: see testutil.h. */
#include "tests/testutil.h"
#include <ctype.h>
#include <dirent.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>

#include "model/config.h"

char *tu_tmpdir(void) {
    const char *base = getenv("TMPDIR");
    char tmpl[4096];
    snprintf(tmpl, sizeof tmpl, "%s/moerl-test-XXXXXX", base && *base ? base : "/tmp");
    char *d = mkdtemp(tmpl);
    return d ? strdup(d) : NULL;
}

void tu_rmtree(const char *dir) {
    if (!dir || !*dir) return;
    char cmd[4200];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", dir);
    if (system(cmd) != 0) fprintf(stderr, "warning: could not remove %s\n", dir);
}

char *tu_path(const char *dir, const char *name) {
    size_t n = strlen(dir) + strlen(name) + 2;
    char *p = malloc(n);
    snprintf(p, n, "%s/%s", dir, name);
    return p;
}

int tu_write(const char *path, const void *data, size_t n) {
    if (n == (size_t)-1) n = strlen(data);
    FILE *f = fopen(path, "wb");
    if (!f) return -1;
    size_t w = fwrite(data, 1, n, f);
    return (fclose(f) == 0 && w == n) ? 0 : -1;
}

char *tu_read(const char *path, size_t *n) {
    FILE *f = fopen(path, "rb");
    if (!f) return NULL;
    size_t cap = 4096, len = 0;
    char *buf = malloc(cap);
    size_t r;
    while ((r = fread(buf + len, 1, cap - len - 1, f)) > 0) {
        len += r;
        if (cap - len - 1 == 0) buf = realloc(buf, cap *= 2);
    }
    fclose(f);
    buf[len] = '\0';
    if (n) *n = len;
    return buf;
}

int tu_run(const char *cmdline, char **out) {
    char *full = malloc(strlen(cmdline) + 16);
    sprintf(full, "(%s) 2>&1", cmdline);
    FILE *p = popen(full, "r");
    free(full);
    if (!p) return -1;
    size_t cap = 4096, len = 0;
    char *buf = malloc(cap);
    size_t r;
    while ((r = fread(buf + len, 1, cap - len - 1, p)) > 0) {
        len += r;
        if (cap - len - 1 == 0) buf = realloc(buf, cap *= 2);
    }
    buf[len] = '\0';
    int st = pclose(p);
    if (out) *out = buf;
    else free(buf);
    if (WIFEXITED(st)) return WEXITSTATUS(st);
    if (WIFSIGNALED(st)) return 128 + WTERMSIG(st);
    return -1;
}

const char *tu_bin(void) {
    const char *b = getenv("MOERL_BIN");
    return b && *b ? b : "./moerl";
}

const char *tu_src(void) {
    const char *s = getenv("MOERL_SRC");
    return s && *s ? s : ".";
}

int tu_procs_of_uids(unsigned uid0, unsigned n) {
    DIR *d = opendir("/proc");
    if (!d) return -1;
    int count = 0;
    struct dirent *de;
    while ((de = readdir(d))) {
        if (!isdigit((unsigned char)de->d_name[0])) continue;
        char path[300], line[256];
        snprintf(path, sizeof path, "/proc/%s/status", de->d_name);
        FILE *f = fopen(path, "r");
        if (!f) continue;
        while (fgets(line, sizeof line, f)) {
            unsigned ru;
            if (sscanf(line, "Uid: %u", &ru) == 1) {
                count += ru >= uid0 && ru - uid0 < n;
                break;
            }
        }
        fclose(f);
    }
    closedir(d);
    return count;
}

void tu_config_all_options(model_config *c) {
    config_tiny(c);
    c->vocab_size = 53;
    c->hidden_size = 24;
    c->intermediate_size = 40;
    c->moe_intermediate_size = 12;
    c->num_hidden_layers = 3;
    c->first_k_dense_replace = 1;
    c->num_attention_heads = 2;
    c->num_key_value_heads = 2;
    c->q_lora_rank = 16;
    c->kv_lora_rank = 12;
    c->qk_nope_head_dim = 8;
    c->qk_rope_head_dim = 4;
    c->v_head_dim = 6;
    c->n_routed_experts = 8;
    c->num_experts_per_tok = 2;
    c->n_group = 4;
    c->topk_group = 2;
    c->n_shared_experts = 1;
    c->num_nextn_predict_layers = 2;
    c->routed_scaling_factor = 1.5;
    c->max_position_embeddings = 64;
    c->rope_scaling.type = CONFIG_ROPE_YARN;
    c->rope_scaling.factor = 4;
    c->rope_scaling.original_max_position_embeddings = 4;
    c->rope_scaling.beta_fast = 32;
    c->rope_scaling.beta_slow = 1;
    c->rope_scaling.mscale = 0.707;
    c->rope_scaling.mscale_all_dim = 0.707;
}
