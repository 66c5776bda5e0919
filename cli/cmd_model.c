/* cmd_model.c: model utilities: `moerl init-model`, `moerl info`, `moerl logits`. */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli/cli.h"
#include "core/mem.h"
#include "model/config.h"
#include "model/model.h"
#include "model/params.h"
#include "model/setup.h"

/* --name VALUE or --name=VALUE at argv[*i]; returns the value and advances *i, or NULL. */
static const char *opt_value(int argc, char **argv, int *i, const char *name) {
    size_t n = strlen(name);
    if (strncmp(argv[*i], name, n) != 0) return NULL;
    if (argv[*i][n] == '=') return argv[*i] + n + 1;
    if (argv[*i][n] != '\0') return NULL;
    if (*i + 1 >= argc) return "";
    return argv[++*i];
}

static int parse_u64(const char *s, unsigned long long *out) {
    char *end;
    errno = 0;
    *out = strtoull(s, &end, 10);
    return (errno || end == s || *end || *s == '-') ? -1 : 0;
}

int cmd_init_model(int argc, char **argv) {
    if (cli_wants_help(argc, argv)) {
        printf("usage: moerl init-model (--config CONFIG.json | --preset tiny) --out DIR [--seed N] [--std S] [--bf16]\n\n"
               "Writes DIR/config.json and DIR/model.safetensors (HF tensor names) for a model initialized from\n"
               "scratch: every weight ~ N(0, S) (default 0.006, DeepSeek-V3 paper §4.2), norm gains 1, router\n"
               "bias 0; the draws depend only on the seed (default 0). F32 unless --bf16.\n");
        return 0;
    }
    const char *cfg_path = NULL, *preset = NULL, *out = NULL, *v;
    unsigned long long seed = 0;
    double stdv = 0.006;
    int bf16 = 0;
    for (int i = 1; i < argc; i++) {
        if ((v = opt_value(argc, argv, &i, "--config"))) cfg_path = v;
        else if ((v = opt_value(argc, argv, &i, "--preset"))) preset = v;
        else if ((v = opt_value(argc, argv, &i, "--out"))) out = v;
        else if ((v = opt_value(argc, argv, &i, "--seed"))) {
            if (parse_u64(v, &seed)) {
                fprintf(stderr, "moerl init-model: --seed: expected a non-negative integer, got \"%s\"\n", v);
                return 2;
            }
        } else if ((v = opt_value(argc, argv, &i, "--std"))) {
            char *end;
            stdv = strtod(v, &end);
            if (end == v || *end || !(stdv > 0 && stdv < 10)) {
                fprintf(stderr, "moerl init-model: --std: expected a number in (0, 10), got \"%s\"\n", v);
                return 2;
            }
        } else if (!strcmp(argv[i], "--bf16")) bf16 = 1;
        else {
            fprintf(stderr, "moerl init-model: unexpected argument '%s' (see --help)\n", argv[i]);
            return 2;
        }
    }
    if (!out || !*out || (!cfg_path) == (!preset)) {
        fprintf(stderr, "moerl init-model: needs --out DIR and exactly one of --config FILE / --preset tiny\n");
        return 2;
    }
    mr_err e = {0};
    model_config c;
    if (preset) {
        if (strcmp(preset, "tiny") != 0) {
            fprintf(stderr, "moerl init-model: --preset: expected tiny, got \"%s\"\n", preset);
            return 2;
        }
        config_tiny(&c);
    } else if (config_load_file(&c, cfg_path, &e)) {
        fprintf(stderr, "moerl init-model: %s\n", e.msg);
        return 1;
    }
    model_params p;
    if (params_init(&p, &c, &e)) {
        fprintf(stderr, "moerl init-model: %s\n", e.msg);
        return 1;
    }
    params_init_random(&p, seed, (float)stdv);
    int rc = params_save(&p, out, bf16, 0, &e);
    if (rc) fprintf(stderr, "moerl init-model: %s\n", e.msg);
    else printf("wrote %s: %zu parameters in %d tensors (%s), seed %llu, std %g\n", out, p.n, p.n_entries,
                bf16 ? "BF16" : "F32", seed, stdv);
    params_free(&p);
    return rc ? 1 : 0;
}

static void print_count(const char *label, uint64_t n) {
    printf("  %-34s %20llu  (%.3g)\n", label, (unsigned long long)n, (double)n);
}

int cmd_info(int argc, char **argv) {
    if (cli_wants_help(argc, argv) || argc != 2) {
        FILE *f = argc == 2 ? stdout : stderr;
        fprintf(f, "usage: moerl info DIR|CONFIG.json\n\n"
                   "Parameter counts (total, and active per token, by the formulas of MODEL-SPEC §12) and KV-cache\n"
                   "bytes per token: MLA's latent cache against a full multi-head K/V cache.\n");
        return argc == 2 ? 0 : 2;
    }
    mr_err e = {0};
    model_config c;
    if (config_load_file(&c, argv[1], &e)) {
        fprintf(stderr, "moerl info: %s\n", e.msg);
        return 1;
    }
    config_params pc;
    if (config_param_breakdown(&c, &pc)) {
        fprintf(stderr, "moerl info: %s: parameter count overflows 64 bits\n", argv[1]);
        return 1;
    }
    printf("%s: %s, %d layers (%d dense), d = %d, %d heads, q_lora_rank %d, kv_lora_rank %d\n", argv[1],
           config_model_type_name(c.model_type), c.num_hidden_layers, c.first_k_dense_replace, c.hidden_size,
           c.num_attention_heads, c.q_lora_rank, c.kv_lora_rank);
    printf("  MoE: %d routed experts (top-%d, %d groups keep %d, %s), %d shared; MTP depth %d\n", c.n_routed_experts,
           c.num_experts_per_tok, c.n_group, c.topk_group, config_topk_method_name(c.topk_method),
           c.n_shared_experts, c.num_nextn_predict_layers);
    printf("parameters:\n");
    print_count("total (main model)", pc.total);
    print_count("active per token (main model)", pc.activated);
    print_count("MTP modules (own tensors)", pc.mtp_total);
    print_count("in the checkpoint files", pc.checkpoint_total);
    uint64_t lat2, full2, lat4, full4;
    model_kv_bytes_per_token(&c, 2, &lat2, &full2);
    model_kv_bytes_per_token(&c, 4, &lat4, &full4);
    printf("KV cache per token (all %d layers):\n", c.num_hidden_layers);
    printf("  MLA latent (kv_lora_rank + qk_rope_head_dim): %llu bytes bf16, %llu bytes fp32\n",
           (unsigned long long)lat2, (unsigned long long)lat4);
    printf("  full MHA (H * (d_qk + d_v)):                  %llu bytes bf16, %llu bytes fp32  (%.1fx the latent)\n",
           (unsigned long long)full2, (unsigned long long)full4, lat2 ? (double)full2 / (double)lat2 : 0.0);
    return 0;
}

static int write_all(FILE *f, const float *x, size_t n) { return fwrite(x, sizeof(float), n, f) == n ? 0 : -1; }

int cmd_logits(int argc, char **argv) {
    if (cli_wants_help(argc, argv)) {
        printf("usage: moerl logits --model DIR --ids \"0 17 42 ...\" --out FILE [--mtp] [--mm det|fast]\n\n"
               "Writes float32 little-endian logits [T, vocab] for every position. With --mtp the MTP heads'\n"
               "logits follow, depth by depth: [T-1, vocab] for depth 1 (row i predicts token i+2), then\n"
               "[T-2, vocab] for depth 2, ... For checking moerl against other implementations.\n");
        return 0;
    }
    const char *dir = NULL, *ids_s = NULL, *out = NULL, *v;
    int mtp = 0;
    mm_mode mm = MM_DET;
    for (int i = 1; i < argc; i++) {
        if ((v = opt_value(argc, argv, &i, "--model"))) dir = v;
        else if ((v = opt_value(argc, argv, &i, "--ids"))) ids_s = v;
        else if ((v = opt_value(argc, argv, &i, "--out"))) out = v;
        else if ((v = opt_value(argc, argv, &i, "--mm"))) {
            if (!strcmp(v, "det")) mm = MM_DET;
            else if (!strcmp(v, "fast")) mm = MM_FAST;
            else {
                fprintf(stderr, "moerl logits: --mm: expected det or fast, got \"%s\"\n", v);
                return 2;
            }
        } else if (!strcmp(argv[i], "--mtp")) mtp = 1;
        else {
            fprintf(stderr, "moerl logits: unexpected argument '%s' (see --help)\n", argv[i]);
            return 2;
        }
    }
    if (!dir || !ids_s || !out) {
        fprintf(stderr, "moerl logits: needs --model DIR, --ids \"...\" and --out FILE\n");
        return 2;
    }
    size_t cap = strlen(ids_s) / 2 + 2;
    int32_t *ids = mem_alloc(cap * sizeof *ids);
    int T = 0;
    const char *p = ids_s;
    while (ids && *p) {
        while (*p == ' ' || *p == ',' || *p == '\t' || *p == '\n') p++;
        if (!*p) break;
        char *end;
        errno = 0;
        long x = strtol(p, &end, 10);
        if (end == p || errno || x < 0 || x > 0x7fffffff) {
            fprintf(stderr, "moerl logits: --ids: expected non-negative integers, got \"%.20s\"\n", p);
            mem_free(ids);
            return 2;
        }
        ids[T++] = (int32_t)x;
        p = end;
    }
    if (T == 0) {
        fprintf(stderr, "moerl logits: --ids: no token ids given\n");
        mem_free(ids);
        return 2;
    }
    mr_err e = {0};
    model_params prm;
    model m;
    int status = 1;
    memset(&m, 0, sizeof m);
    if (params_load(&prm, dir, &e)) goto fail;
    model_opts opt = {.mm = mm, .mtp_weight = 0, .balance_alpha = 0};
    if (model_init(&m, &prm, &opt, T, &e)) goto fail;
    model_batch b = {.ids = ids, .T = T};
    if (model_forward(&m, &b, 0, NULL, &e)) goto fail;
    char tmp[4096];
    snprintf(tmp, sizeof tmp, "%s.tmp", out);
    FILE *f = fopen(tmp, "wb");
    if (!f) {
        err_set(&e, MR_EIO, "%s: cannot write: %s", out, strerror(errno));
        goto fail;
    }
    const int V = m.p.cfg.vocab_size;
    int bad = write_all(f, model_logits(&m), (size_t)T * V);
    int D = mtp ? m.p.cfg.num_nextn_predict_layers : 0;
    for (int k = 1; k <= D && T - k >= 1; k++) bad |= write_all(f, model_mtp_logits(&m, k), (size_t)(T - k) * V);
    if (fclose(f) || bad || rename(tmp, out)) {
        remove(tmp);
        err_set(&e, MR_EIO, "%s: write failed: %s", out, strerror(errno));
        goto fail;
    }
    fprintf(stderr, "wrote %s: %d x %d logits%s\n", out, T, V, D ? " + MTP depths" : "");
    status = 0;
    goto done;
fail:
    fprintf(stderr, "moerl logits: %s\n", e.msg);
done:
    model_free(&m);
    mem_free(ids);
    return status;
}
