/* cmd_generate.c: `moerl generate`: sample completions of one prompt from a checkpoint directory with the rollout
 * engine (latent KV cache, batched decode), streaming the text to stdout. */
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli/cli.h"
#include "core/mem.h"
#include "core/progress.h"
#include "kernels/backend.h"
#include "model/model.h"
#include "model/params.h"
#include "rollout/rollout.h"
#include "tokenizer/tokenizer.h"

#define MAX_STOP 16

/* --name VALUE or --name=VALUE at argv[*i]; returns the value and advances *i, or NULL. */
static const char *opt_value(int argc, char **argv, int *i, const char *name) {
    size_t n = strlen(name);
    if (strncmp(argv[*i], name, n) != 0) return NULL;
    if (argv[*i][n] == '=') return argv[*i] + n + 1;
    if (argv[*i][n] != '\0') return NULL;
    if (*i + 1 >= argc) return "";
    return argv[++*i];
}

static int parse_int(const char *s, long lo, long hi, int *out) {
    char *end;
    errno = 0;
    long x = strtol(s, &end, 10);
    if (errno || end == s || *end || x < lo || x > hi) return -1;
    *out = (int)x;
    return 0;
}

static int parse_float(const char *s, double lo, double hi, float *out) {
    char *end;
    errno = 0;
    double x = strtod(s, &end);
    if (errno || end == s || *end || !(x >= lo && x <= hi)) return -1;
    *out = (float)x;
    return 0;
}

typedef struct stream_ctx {
    const tokenizer *tok;
    int32_t eos;
} stream_ctx;

/* n == 1: each token's bytes as soon as it is drawn (EOS not printed). */
static void on_token(void *ctx, int seq, int32_t t) {
    const stream_ctx *s = ctx;
    (void)seq;
    if (t == s->eos) return;
    size_t n = 0;
    const char *b = tok_token_bytes(s->tok, t, &n);
    if (b && n) fwrite(b, 1, n, stdout);
    fflush(stdout);
}

static const char *finish_name(rollout_finish f) {
    return f == ROLLOUT_EOS ? "eos" : f == ROLLOUT_STOP ? "stop" : "length";
}

int cmd_generate(int argc, char **argv) {
    if (cli_wants_help(argc, argv)) {
        printf("usage: moerl generate --model DIR --prompt TEXT [-n N] [--temperature T] [--top-p P] [--top-k K]\n"
               "                      [--min-p M] [--max-new-tokens N] [--seed S] [--stop STR]... [--mm det|fast]\n"
               "                      [--mtp-speculative] [--stats] [--device cpu|cuda|cpu-guarded]\n\n"
               "Samples completions of TEXT with the model in DIR (config.json, model.safetensors, tokenizer.json, as\n"
               "written by `moerl sft` or `moerl init-model` + a tokenizer) on the latent KV cache. With -n 1 (the\n"
               "default) the text streams to stdout as it is generated; with -n N > 1 each sample is printed when done,\n"
               "after a line \"--- sample I (eos|stop|length, K tokens) ---\". The prompt is encoded as the tokenizer\n"
               "config says (BOS when add_bos_token); EOS (the model's eos_token_id) ends a sample.\n"
               "  -n N               samples (default 1)\n"
               "  --temperature T    0 = greedy (default 1)\n"
               "  --top-p P          nucleus mass in (0, 1] (default 1 = off)\n"
               "  --top-k K          keep the K most likely tokens (default 0 = off)\n"
               "  --min-p M          drop tokens below M x the top probability (default 0 = off)\n"
               "  --max-new-tokens N default 128\n"
               "  --seed S           sampling seed (default 0)\n"
               "  --stop STR         end a sample when STR appears (repeatable, up to %d)\n"
               "  --mm det|fast      batch-invariant GEMMs (default) or OpenBLAS\n"
               "  --mtp-speculative  draft one token with the model's MTP module and verify it in the next decode step\n"
               "                     (same tokens when greedy, same distribution when sampling); implies --stats\n"
               "  --stats            after the text, one line on stderr: tokens, seconds, tokens/s, decode steps and,\n"
               "                     with --mtp-speculative, the drafts accepted\n"
               "  --device D         the backend that runs the model (default cpu; cuda: weights and caches on the\n"
               "                     GPU, decode steps replayed as CUDA graphs)\n",
               MAX_STOP);
        return 0;
    }
    const char *dir = NULL, *prompt = NULL, *v, *stops[MAX_STOP];
    int n = 1, n_stop = 0, stats = 0;
    unsigned long long seed = 0;
    rollout_opts o = rollout_opts_default();
    o.max_new_tokens = 128;
    mm_mode mm = MM_DET;
    const char *device = "cpu";
    for (int i = 1; i < argc; i++) {
        int bad = 0;
        const char *name = argv[i];
        if ((v = opt_value(argc, argv, &i, "--model"))) dir = v;
        else if ((v = opt_value(argc, argv, &i, "--prompt"))) prompt = v;
        else if ((v = opt_value(argc, argv, &i, "-n"))) bad = parse_int(v, 1, 4096, &n);
        else if ((v = opt_value(argc, argv, &i, "--temperature"))) bad = parse_float(v, 0, 1e6, &o.temperature);
        else if ((v = opt_value(argc, argv, &i, "--top-p"))) bad = parse_float(v, 1e-9, 1, &o.top_p);
        else if ((v = opt_value(argc, argv, &i, "--top-k"))) bad = parse_int(v, 0, 1 << 30, &o.top_k);
        else if ((v = opt_value(argc, argv, &i, "--min-p"))) bad = parse_float(v, 0, 1, &o.min_p);
        else if ((v = opt_value(argc, argv, &i, "--max-new-tokens"))) bad = parse_int(v, 1, 1 << 24, &o.max_new_tokens);
        else if ((v = opt_value(argc, argv, &i, "--seed"))) {
            char *end;
            errno = 0;
            seed = strtoull(v, &end, 10);
            bad = errno || end == v || *end || *v == '-';
        } else if ((v = opt_value(argc, argv, &i, "--stop"))) {
            if (n_stop == MAX_STOP || !*v) bad = 1;
            else stops[n_stop++] = v;
        } else if (!strcmp(argv[i], "--mtp-speculative")) {
            o.mtp_speculative = 1;
            stats = 1;
        } else if (!strcmp(argv[i], "--stats")) {
            stats = 1;
        } else if ((v = opt_value(argc, argv, &i, "--device"))) {
            device = v;
        } else if ((v = opt_value(argc, argv, &i, "--mm"))) {
            if (!strcmp(v, "det")) mm = MM_DET;
            else if (!strcmp(v, "fast")) mm = MM_FAST;
            else bad = 1;
        } else {
            fprintf(stderr, "moerl generate: unexpected argument '%s' (see --help)\n", argv[i]);
            return 2;
        }
        if (bad) {
            fprintf(stderr, "moerl generate: %s: invalid value \"%s\" (see --help)\n", name, v);
            return 2;
        }
    }
    if (!dir || !prompt) {
        fprintf(stderr, "moerl generate: needs --model DIR and --prompt TEXT\n");
        return 2;
    }
    const backend *be;
    mr_err ed = {0};
    if (backend_get(device, &be, &ed)) {
        fprintf(stderr, "moerl generate: %s\n", ed.msg);
        return 2;
    }
    o.seed = seed;
    o.stop = n_stop ? stops : NULL;
    o.n_stop = n_stop;

    mr_err e = {0};
    int status = 1;
    tokenizer *tok = NULL;
    model_params prm;
    model m;
    tok_ids ids = {0};
    rollout_seq *out = NULL;
    memset(&m, 0, sizeof m);
    memset(&prm, 0, sizeof prm);
    if (tok_load(&tok, dir, &e)) goto fail;
    if (params_load(&prm, dir, &e)) goto fail;
    if (tok_encode(tok, prompt, strlen(prompt), TOK_SPECIAL, &ids, &e)) goto fail;
    if (ids.n == 0) {
        err_set(&e, MR_EINVAL, "the prompt encodes to no tokens");
        goto fail;
    }
    o.eos = prm.cfg.n_eos_token_id > 0 ? prm.cfg.eos_token_id[0] : tok_eos_id(tok);
    if (o.eos >= prm.cfg.vocab_size) o.eos = -1;
    /* the prefill holds the prompt; a decode step n rows (2 per sample when verifying a draft) */
    const int rows = o.mtp_speculative ? 2 * n : n;
    int T_max = (int)ids.n > rows ? (int)ids.n : rows;
    model_opts mo = {.mm = mm, .backend = be};
    if (model_init(&m, &prm, &mo, T_max, &e)) goto fail;
    stream_ctx sc = {tok, o.eos};
    if (n == 1) {
        o.on_token = on_token;
        o.on_token_ctx = &sc;
    }
    out = mem_calloc((size_t)n, sizeof *out);
    if (!out) {
        err_set(&e, MR_ENOMEM, "out of memory");
        goto fail;
    }
    const int32_t *pp = ids.v;
    int plen = (int)ids.n;
    int64_t pid = 0;
    rollout_stats st;
    o.stats = &st;
    const double t0 = progress_now();
    if (rollout_generate(&m, tok, &pp, &plen, &pid, 1, n, &o, out, &e)) goto fail;
    const double secs = progress_now() - t0;
    if (n == 1) {
        printf("\n");
    } else {
        for (int i = 0; i < n; i++) {
            rollout_seq *s = &out[i];
            int k = s->n - (s->finish == ROLLOUT_EOS ? 1 : 0);
            char *text = NULL;
            size_t len = 0;
            if (tok_decode(tok, s->tokens, (size_t)k, 0, &text, &len, &e)) goto fail;
            printf("--- sample %d (%s, %d tokens) ---\n", i, finish_name(s->finish), s->n);
            fwrite(text, 1, len, stdout);
            printf("\n");
            mem_free(text);
        }
    }
    fflush(stdout);
    if (stats) {
        fprintf(stderr, "generate: %lld tokens in %.3f s (%.1f tokens/s, prefill included), %lld decode steps",
                (long long)st.tokens, secs, secs > 0 ? (double)st.tokens / secs : 0.0, (long long)st.decode_steps);
        if (o.mtp_speculative)
            fprintf(stderr, "; MTP drafts accepted %lld of %lld (%.1f%%)", (long long)st.accepted,
                    (long long)st.drafted, st.drafted ? 100.0 * (double)st.accepted / (double)st.drafted : 0.0);
        fprintf(stderr, "\n");
    }
    status = 0;
    goto done;
fail:
    fflush(stdout);
    fprintf(stderr, "moerl generate: %s\n", e.msg);
done:
    if (out)
        for (int i = 0; i < n; i++) rollout_seq_free(&out[i]);
    mem_free(out);
    tok_ids_free(&ids);
    model_free(&m);
    params_free(&prm);
    tok_free(tok);
    return status;
}
