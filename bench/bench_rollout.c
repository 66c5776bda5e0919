/* bench_rollout.c: the rollout engine's figures on the tiny preset (config_tiny) and the ~100M preset of
 * `moerl bench model --preset 100m`, random weights, and MTP speculative decoding on a trained checkpoint.
 * A benchmark, not a test: prints figures, asserts nothing.
 * Usage: bench_rollout [threads (default 2)] [seconds per figure (default 0.5)]
 *                      [decode (default) | all | train | decode-notorch | spec | spec-ckpt DIR [RECIPE] [N]
 *                       | one tiny|100m det|fast B [N] | engine tiny|100m B [N]]
 *
 *   1. (train) the training forward (train = 0, and train = 1 + backward) with the absorbed attention (MM_DET
 *      default, what makes rollout log-probs exact) against the non-absorbed one (model_opts.attn_naive), T = 512
 *      in 4 packed documents, tiny preset;
 *   2. (decode) for both presets: prefill tokens/s (B prompts of 32 tokens) and decode tokens/s (16 steps) at batch
 *      1, 16, 128, MM_DET, then end to end through rollout_generate (sampling at T = 1 and the log-prob bookkeeping)
 *      right after the MM_DET figure of the same batch, then MM_FAST; next to a same-run PyTorch decode with a KV
 *      cache (bench/torch_decode.py, /usr/bin/python3; skipped with the reason when torch is missing) and the
 *      memory-bandwidth bound of batch-1 decode (fp32 bytes of the weights one token reads over the bandwidth
 *      measured in the same run); the ratios against the targets (batch-1 decode >= 60% of the bound, the decode
 *      step's and the end-to-end one; batch 16 >= 5x PyTorch); KV bytes per token, latent vs full multi-head K, V;
 *   3. (spec) MTP speculative decoding through rollout_generate, greedy and T = 1, batch 1 and 16, tiny preset,
 *      random weights: the MTP module drafts at random, so this measures the machinery's cost only;
 *   4. (spec-ckpt DIR [RECIPE] [N]) the same on a trained checkpoint (`moerl sft`'s step-N directory; RECIPE, by
 *      default recipes/sft-arith.yaml, gives the N = 32 held-out prompts as `moerl eval` takes them, max_new_tokens,
 *      stop strings): plain vs speculative tokens/s end to end and decode only, the speed-up, the acceptance rate,
 *      the decode steps, and whether the greedy outputs are identical;
 *   5. (one, engine) single figures for profiling: a decode step; a decode step and rollout_generate side by side. */
#include <cjson/cJSON.h>
#include <errno.h>
#include <omp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "core/mem.h"
#include "core/recipe.h"
#include "kernels/cpu/attention.h"
#include "model/config.h"
#include "model/model.h"
#include "model/params.h"
#include "model/setup.h"
#include "rollout/rollout.h"
#include "sft/data_setup.h"

/* cli/cmd_bench.c: the ~100M preset of `moerl bench model --preset 100m` (one definition, shared) */
void bench_config_100m(model_config *c);
void bench_blas_env(char *out, size_t cap);

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static void die(const mr_err *e) {
    fprintf(stderr, "bench_rollout: %s\n", e->msg);
    exit(1);
}

static void build(model *m, const model_config *c, mm_mode mm, int naive, int T_max) {
    model_params p;
    mr_err e = {0};
    if (params_init(&p, c, &e)) die(&e);
    params_init_random(&p, 1, 0.02f);
    model_opts o = {.mm = mm, .attn_naive = naive, .mtp_weight = 0.3f};
    if (model_init(m, &p, &o, T_max, &e)) die(&e);
}

static double secs = 0.5;

/* training forward (and backward) seconds per call, best of repetitions */
static void bench_train(const model_config *c, int naive, double *fwd, double *fb) {
    enum { T = 512, DOCS = 4 };
    model m;
    build(&m, c, MM_DET, naive, T);
    int32_t ids[T], pos[T], doc[T], tgt[T];
    for (int t = 0; t < T; t++) {
        ids[t] = (int32_t)((t * 7919 + 13) % c->vocab_size);
        doc[t] = t / (T / DOCS) * (T / DOCS);
        pos[t] = t - doc[t];
    }
    for (int t = 0; t < T; t++) tgt[t] = (t + 1 < T && doc[t + 1] == doc[t]) ? ids[t + 1] : -1;
    model_batch b = {.ids = ids, .pos = pos, .doc_start = doc, .targets = tgt, .T = T};
    mr_err e = {0};
    double best = 1e30, end = now() + secs;
    do {
        double t0 = now();
        if (model_forward(&m, &b, 0, NULL, &e)) die(&e);
        double dt = now() - t0;
        if (dt < best) best = dt;
    } while (now() < end);
    *fwd = best;
    best = 1e30;
    end = now() + secs;
    do {
        double t0 = now();
        if (model_forward(&m, &b, 1, NULL, &e) || model_backward(&m, &b, &e)) die(&e);
        double dt = now() - t0;
        if (dt < best) best = dt;
    } while (now() < end);
    *fb = best;
    model_free(&m);
}

/* attention only, one layer of the tiny preset, T = 512 in 4 documents: non-absorbed flash forward vs the
 * absorbed per-row form (best seconds per call) */
static void bench_attn_only(const model_config *c, double *naive, double *absorbed) {
    enum { T = 512, DOCS = 4 };
    const int H = c->num_attention_heads, dn = c->qk_nope_head_dim, dr = c->qk_rope_head_dim, dv = c->v_head_dim;
    const int rkv = c->kv_lora_rank, dqk = dn + dr;
    float *q = malloc(sizeof(float) * T * H * dqk), *k = malloc(sizeof(float) * T * H * dqk);
    float *v = malloc(sizeof(float) * T * H * dv), *out = malloc(sizeof(float) * T * H * dv);
    float *lse = malloc(sizeof(float) * T * H), *cn = malloc(sizeof(float) * T * rkv);
    float *kpe = malloc(sizeof(float) * T * dr), *w = malloc(sizeof(float) * H * (dn + dv) * rkv);
    const float **pc = malloc(sizeof *pc * T), **pk = malloc(sizeof *pk * T);
    int32_t doc[T], len[T];
    uint32_t st = 1;
#define RND(p, n) for (size_t i_ = 0; i_ < (size_t)(n); i_++) { st = st * 1664525u + 1013904223u; (p)[i_] = (float)(st >> 8) / 16777216.0f - 0.5f; }
    RND(q, T * H * dqk) RND(k, T * H * dqk) RND(v, T * H * dv) RND(cn, T * rkv) RND(kpe, T * dr) RND(w, H * (dn + dv) * rkv)
#undef RND
    for (int t = 0; t < T; t++) {
        doc[t] = t / (T / DOCS) * (T / DOCS);
        pc[t] = cn + (size_t)doc[t] * rkv;
        pk[t] = kpe + (size_t)doc[t] * dr;
        len[t] = t - doc[t] + 1;
    }
    mr_err e = {0};
    double best = 1e30, end = now() + secs;
    do {
        double t0 = now();
        attention_forward(out, lse, q, k, v, doc, T, H, dqk, dv, 0.1f);
        double dt = now() - t0;
        if (dt < best) best = dt;
    } while (now() < end);
    *naive = best;
    best = 1e30;
    end = now() + secs;
    do {
        double t0 = now();
        if (mla_decode_absorbed_lse(out, lse, q, pc, pk, len, w, T, H, dn, dr, dv, rkv, 0.1f, &e)) die(&e);
        double dt = now() - t0;
        if (dt < best) best = dt;
    } while (now() < end);
    *absorbed = best;
    free(q), free(k), free(v), free(out), free(lse), free(cn), free(kpe), free(w), free(pc), free(pk);
}

/* Prefill and decode through the model's inference entry points (what rollout_generate runs, minus sampling):
 * B prompts of P tokens (distinct ids), prefilled in packed chunks of at most PREFILL_CHUNK prompts
 * (model_prefill, each prompt into its own latent cache); then N decode steps of the B sequences
 * (model_decode_step; every step feeds other ids, as decoding does: the MoE layers route them to other experts). prefill tok/s = B·P / best seconds of the whole prefill (repeated while under
 * secs); decode tok/s = B·N / seconds of N steps, best of 2 rounds after one warm-up step (a shared 2-core machine
 * makes single rounds noisy). */
enum { PREFILL_CHUNK = 16 };
static void bench_decode(const model_config *c, mm_mode mm, int B, int P, int N, double *prefill_tps,
                         double *decode_tps) {
    model m;
    const int Tp = PREFILL_CHUNK * P;
    build(&m, c, mm, 0, B > Tp ? B : Tp);
    size_t fc, fk;
    model_kv_floats(&m, P + 2 * N + 1, &fc, &fk);
    model_kv *kv = calloc((size_t)B, sizeof *kv);
    model_kv **kvp = malloc(sizeof *kvp * (size_t)B);
    float *mem = mem_alloc_aligned(sizeof(float) * (fc + fk) * (size_t)B); /* as the rollout engine's caches */
    int32_t *ids = malloc(sizeof(int32_t) * (size_t)Tp * 3), *pos = ids + Tp, *doc = ids + 2 * Tp;
    int32_t *step = malloc(sizeof(int32_t) * (size_t)B * (size_t)(2 * N + 1));
    if (!kv || !kvp || !mem || !ids || !step) {
        fprintf(stderr, "bench_rollout: out of memory\n");
        exit(1);
    }
    for (int b = 0; b < B; b++) {
        kv[b] = (model_kv){.ckv = mem + (fc + fk) * (size_t)b, .kpe = mem + (fc + fk) * (size_t)b + fc,
                           .cap = P + 2 * N + 1};
        kvp[b] = &kv[b];
        for (int s = 0; s < 2 * N + 1; s++) /* a different token every step, as decoding feeds */
            step[(size_t)s * B + b] =
                (int32_t)(((uint32_t)b * 2654435761u + (uint32_t)s * 40503u + 3u) % (uint32_t)c->vocab_size);
    }
    mr_err e = {0};
    double best = 1e30, end = now() + secs;
    do {
        double t0 = now();
        for (int c0 = 0; c0 < B; c0 += PREFILL_CHUNK) {
            int n = B - c0 < PREFILL_CHUNK ? B - c0 : PREFILL_CHUNK;
            for (int k = 0; k < n; k++)
                for (int j = 0; j < P; j++) {
                    ids[k * P + j] = (int32_t)(((c0 + k) * 131 + j * 31 + 7) % c->vocab_size);
                    pos[k * P + j] = j;
                    doc[k * P + j] = k * P;
                }
            model_batch pb = {.ids = ids, .pos = pos, .doc_start = doc, .T = n * P, .skip_mtp = 1};
            if (model_prefill(&m, &pb, kvp + c0, n, &e)) die(&e);
        }
        double dt = now() - t0;
        if (dt < best) best = dt;
    } while (now() < end);
    *prefill_tps = (double)B * P / best;
    if (model_decode_step(&m, step, kvp, B, &e)) die(&e); /* warm-up step, not timed */
    double dbest = 1e30;
    for (int r = 0; r < 2; r++) { /* best of 2 rounds of N steps (contexts P+1 .. P+2N) */
        double t0 = now();
        for (int s = 0; s < N; s++)
            if (model_decode_step(&m, step + (size_t)(1 + r * N + s) * B, kvp, B, &e)) die(&e);
        if (now() - t0 < dbest) dbest = now() - t0;
    }
    *decode_tps = (double)B * N / dbest;
    free(step);
    free(ids);
    mem_free_aligned(mem);
    free(kvp);
    free(kv);
    model_free(&m);
}

/* The same decode through the engine (rollout_generate, MM_DET: sampling at T = 1 with the full log-prob
 * bookkeeping): one prompt of P tokens, G = B samples; decode tok/s = B·N / (t(1 + N new) − t(1 new)), so the
 * shared prefill and the first token cancel out. A difference of two times doubles the noise of a shared machine:
 * each time is the best of at least 4 calls (alternating, after a warm-up call, more while under 2·secs). */
static double bench_engine(const model_config *c, int B, int P, int N) {
    model m;
    build(&m, c, MM_DET, 0, B > P ? B : P);
    int32_t *prompt = malloc(sizeof(int32_t) * (size_t)P);
    rollout_seq *out = mem_calloc((size_t)B, sizeof *out);
    if (!prompt || !out) {
        fprintf(stderr, "bench_rollout: out of memory\n");
        exit(1);
    }
    for (int j = 0; j < P; j++) prompt[j] = (int32_t)((j * 37 + 11) % c->vocab_size);
    const int32_t *pp = prompt;
    int64_t pid = 0;
    double t[2] = {1e30, 1e30}, end = now() + 2 * secs;
    for (int k = 0; k < 9 || (now() < end && k < 41); k++) { /* a warm-up call, then alternating lengths */
        rollout_opts o = rollout_opts_default();
        o.max_new_tokens = k % 2 ? 1 : 1 + N;
        mr_err e = {0};
        double t0 = now();
        if (rollout_generate(&m, NULL, &pp, &P, &pid, 1, B, &o, out, &e)) die(&e);
        double dt = now() - t0;
        if (k && dt < t[k % 2 ? 0 : 1]) t[k % 2 ? 0 : 1] = dt;
        for (int q = 0; q < B; q++) rollout_seq_free(&out[q]);
    }
    mem_free(out);
    free(prompt);
    model_free(&m);
    return (double)B * N / (t[1] - t[0]);
}

/* ---- the memory-bandwidth bound of batch-1 decode ----
 * Bandwidth, same run, same thread count: best of 5 passes of (a) a read-only sum over 256 MiB (what decode does to
 * its weights) and (b) a STREAM triad a = b + s·c over 3 × 128 MiB (bytes counted as STREAM does: 3 per element,
 * no write-allocate). The bound uses the larger of the two (the stricter bound). */
static void measure_bandwidth(double *read_gbs, double *triad_gbs) {
    const size_t n = (size_t)32 << 20; /* floats: 128 MiB per array */
    float *a = malloc(sizeof(float) * n * 3);
    if (!a) {
        fprintf(stderr, "bench_rollout: out of memory (bandwidth arrays)\n");
        exit(1);
    }
    float *b = a + n, *c = b + n;
#pragma omp parallel for schedule(static)
    for (size_t i = 0; i < n; i++) a[i] = 1.0f, b[i] = 2.0f, c[i] = (float)(i & 7);
    double best_r = 1e30, best_t = 1e30, sink = 0;
    for (int rep = 0; rep < 5; rep++) {
        double t0 = now(), s = 0;
        /* 64 float partial sums per block of 64: independent vector adds, so the loop is bound by loads, not by
         * the latency of one accumulator */
#pragma omp parallel for schedule(static) reduction(+ : s)
        for (size_t i0 = 0; i0 < 2 * n; i0 += 1 << 20) { /* b and c: 256 MiB */
            float acc[64] = {0};
            for (size_t i = i0; i < i0 + (1 << 20); i += 64)
                for (int k = 0; k < 64; k++) acc[k] += b[i + k];
            for (int k = 0; k < 64; k++) s += acc[k];
        }
        double dt = now() - t0;
        sink += s;
        if (dt < best_r) best_r = dt;
        t0 = now();
        const float k = 0.5f + (float)rep;
#pragma omp parallel for simd schedule(static)
        for (size_t i = 0; i < n; i++) a[i] = b[i] + k * c[i];
        dt = now() - t0;
        if (dt < best_t) best_t = dt;
    }
    if (sink == 42.0) printf("%g\n", (double)a[n / 2]); /* keep the loops */
    *read_gbs = (double)(2 * n * sizeof(float)) / best_r * 1e-9;
    *triad_gbs = (double)(3 * n * sizeof(float)) / best_t * 1e-9;
    free(a);
}

/* ---- the same-run PyTorch decode (bench/torch_decode.py) ---- */
typedef struct torch_dec {
    int ok;
    double prefill[3], decode[3]; /* batch 1, 16, 128 */
    char version[32], cache[128];
    char why[1024];
} torch_dec;

static int file_exists(const char *p) {
    FILE *f = fopen(p, "r");
    if (f) fclose(f);
    return f != NULL;
}

/* rel (a path inside the source tree) under $MOERL_SRC, else ., else the source tree this file was compiled from */
static int find_src(const char *rel, char *out, size_t cap) {
    const char *src = getenv("MOERL_SRC");
    if (src && *src) {
        snprintf(out, cap, "%s/%s", src, rel);
        if (file_exists(out)) return 1;
    }
    snprintf(out, cap, "%s", rel);
    if (file_exists(out)) return 1;
    const char *me = __FILE__, *cut = strstr(me, "bench/bench_rollout.c");
    if (cut) {
        snprintf(out, cap, "%.*s%s", (int)(cut - me), me, rel);
        if (file_exists(out)) return 1;
    }
    return 0;
}

static int find_script(char *out, size_t cap) { return find_src("bench/torch_decode.py", out, cap); }

/* env: "" (Debian's torch as installed: libblas.so.3 = OpenBLAS's pthread build, the default alternative) or
 * bench_blas_env's LD_LIBRARY_PATH prefix (the OpenMP build moerl links). */
static void run_torch_decode(torch_dec *r, const model_config *c, int threads, int P, int N, const char *env) {
    memset(r, 0, sizeof *r);
    char script[2048], dir[] = "/tmp/bench_rollout.XXXXXX", cfg[2100], cmd[8192];
    if (!find_script(script, sizeof script)) {
        snprintf(r->why, sizeof r->why, "bench/torch_decode.py not found (run from the source root or set MOERL_SRC)");
        return;
    }
    if (access("/usr/bin/python3", X_OK) != 0) {
        snprintf(r->why, sizeof r->why, "/usr/bin/python3 not found");
        return;
    }
    if (!mkdtemp(dir)) {
        snprintf(r->why, sizeof r->why, "mkdtemp: %s", strerror(errno));
        return;
    }
    snprintf(cfg, sizeof cfg, "%s/config.json", dir);
    mr_err e = {0};
    if (config_save_file(c, cfg, &e)) {
        snprintf(r->why, sizeof r->why, "%.1000s", e.msg);
        rmdir(dir);
        return;
    }
    snprintf(cmd, sizeof cmd, "%s/usr/bin/python3 '%s' --config '%s' --threads %d --batches 1,16,128 --prompt %d --new %d "
             "--chunk %d 2>&1", env, script, cfg, threads, P, N, PREFILL_CHUNK);
    fflush(stdout);
    FILE *f = popen(cmd, "r");
    char line[8192], json[8192] = "", last[1024] = "";
    while (f && fgets(line, sizeof line, f)) {
        size_t n = strlen(line);
        while (n && (line[n - 1] == '\n' || line[n - 1] == '\r')) line[--n] = '\0';
        if (line[0] == '{') snprintf(json, sizeof json, "%s", line);
        else if (n) snprintf(last, sizeof last, "%.1000s", line);
    }
    int st = f ? pclose(f) : -1;
    unlink(cfg);
    rmdir(dir);
    cJSON *j = json[0] ? cJSON_Parse(json) : NULL;
    const cJSON *sk = cJSON_GetObjectItemCaseSensitive(j, "skipped"), *res = cJSON_GetObjectItemCaseSensitive(j, "results");
    if (!j) {
        snprintf(r->why, sizeof r->why, "torch_decode.py printed no result (exit status %d)%s%.800s",
                 st != -1 && WIFEXITED(st) ? WEXITSTATUS(st) : -1, last[0] ? ": " : "", last);
    } else if (cJSON_IsString(sk)) {
        snprintf(r->why, sizeof r->why, "%.1000s", sk->valuestring);
    } else if (cJSON_GetArraySize(res) != 3) {
        snprintf(r->why, sizeof r->why, "torch_decode.py: unexpected result %.900s", json);
    } else {
        r->ok = 1;
        for (int i = 0; i < 3; i++) {
            const cJSON *it = cJSON_GetArrayItem(res, i);
            const cJSON *p = cJSON_GetObjectItemCaseSensitive(it, "prefill_tps");
            const cJSON *d = cJSON_GetObjectItemCaseSensitive(it, "decode_tps");
            r->prefill[i] = cJSON_IsNumber(p) ? p->valuedouble : 0;
            r->decode[i] = cJSON_IsNumber(d) ? d->valuedouble : 0;
        }
        const cJSON *v = cJSON_GetObjectItemCaseSensitive(j, "torch"), *ca = cJSON_GetObjectItemCaseSensitive(j, "cache");
        snprintf(r->version, sizeof r->version, "%s", cJSON_IsString(v) ? v->valuestring : "?");
        snprintf(r->cache, sizeof r->cache, "%s", cJSON_IsString(ca) ? ca->valuestring : "?");
    }
    cJSON_Delete(j);
}

/* One config: moerl prefill/decode (MM_DET, MM_FAST) at batch 1/16/128 next to PyTorch, the bandwidth bound, the
 * ratios and the KV bytes per token. */
static void bench_config(const char *name, const model_config *c, int threads, double bw_gbs, int torch) {
    enum { P = 32, N = 16 };
    static const int Bs[] = {1, 16, 128};
    config_params pc;
    if (config_param_breakdown(c, &pc)) {
        fprintf(stderr, "bench_rollout: %s: parameter count overflows\n", name);
        exit(1);
    }
    const uint64_t d = (uint64_t)c->hidden_size, V = (uint64_t)c->vocab_size;
    /* per decoded token: the activated set minus the embedding table (one row of it is read) */
    const uint64_t active = pc.activated - V * d + d;
    const double wbytes = 4.0 * (double)active;
    printf("\n== %s: d=%d, %d layers (%d dense), H=%d, E=%d top-%d + %d shared (width %d), r_kv=%d, d_rope=%d, V=%d\n",
           name, c->hidden_size, c->num_hidden_layers, c->first_k_dense_replace, c->num_attention_heads,
           c->n_routed_experts, c->num_experts_per_tok, c->n_shared_experts, c->moe_intermediate_size,
           c->kv_lora_rank, c->qk_rope_head_dim, c->vocab_size);
    printf("   parameters (config_param_breakdown): total %.2fM (main model), activated per token %.2fM; read per\n"
           "   decoded token (activated - embedding table + its one row): %.2fM = %.1f MB in fp32\n",
           (double)pc.total * 1e-6, (double)pc.activated * 1e-6, (double)active * 1e-6, wbytes * 1e-6);
    /* MM_DET and the engine first, side by side per batch size; MM_FAST last (OpenBLAS starts its own threads) */
    double dec[2][3], pre[2][3], eng[3], bw_near = 0;
    for (int i = 0; i < 3; i++) {
        if (i == 0) { /* the bandwidth of a shared machine drifts (36 to 67 GB/s seen between runs): measure it next
                       * to the batch-1 figures too, and take the largest of the three for the bound */
            double rd, tr;
            measure_bandwidth(&rd, &tr);
            bw_near = rd > tr ? rd : tr;
        }
        bench_decode(c, MM_DET, Bs[i], P, N, &pre[0][i], &dec[0][i]);
        printf("   moerl MM_DET  batch %3d: prefill %9.0f tok/s   decode %9.1f tok/s\n", Bs[i], pre[0][i], dec[0][i]);
        fflush(stdout);
        eng[i] = bench_engine(c, Bs[i], P, N);
        printf("   moerl rollout_generate (MM_DET, T=1 sampling + log-probs, 1 prompt x %3d samples): decode %9.1f "
               "tok/s = %.0f%% of the decode step\n", Bs[i], eng[i], 100 * eng[i] / dec[0][i]);
        fflush(stdout);
        if (i == 0) {
            double rd, tr;
            measure_bandwidth(&rd, &tr);
            printf("   bandwidth next to the batch-1 figures: %.1f GB/s before, %.1f GB/s after (run start: %.1f GB/s)\n",
                   bw_near, rd > tr ? rd : tr, bw_gbs);
            if (rd > bw_near) bw_near = rd;
            if (tr > bw_near) bw_near = tr;
        }
    }
    for (int i = 0; i < 3; i++) {
        bench_decode(c, MM_FAST, Bs[i], P, N, &pre[1][i], &dec[1][i]);
        printf("   moerl MM_FAST batch %3d: prefill %9.0f tok/s   decode %9.1f tok/s\n", Bs[i], pre[1][i], dec[1][i]);
        fflush(stdout);
    }
    /* PyTorch twice: as Debian installs it (OpenBLAS pthread build) and on the OpenMP build moerl links (its
     * threads then stop competing with torch's own OpenMP threads: several times faster at small batches). The
     * ratios below are against the faster of the two, batch by batch. */
    torch_dec tv[2], td;
    char envs[2][1100];
    envs[0][0] = '\0';
    bench_blas_env(envs[1], sizeof envs[1]);
    static const char *const tname[2] = {"PyTorch pthrd", "PyTorch omp  "};
    memset(&td, 0, sizeof td);
    for (int v = 0; v < 2; v++) {
        memset(&tv[v], 0, sizeof tv[v]);
        if (!torch) {
            snprintf(tv[v].why, sizeof tv[v].why, "not run (mode without torch)");
            continue;
        }
        if (v == 1 && !envs[1][0]) {
            snprintf(tv[v].why, sizeof tv[v].why, "moerl does not run on OpenBLAS's OpenMP build here");
            continue;
        }
        run_torch_decode(&tv[v], c, threads, P, N, envs[v]);
        for (int i = 0; i < 3 && tv[v].ok; i++)
            printf("   %s batch %3d: prefill %9.0f tok/s   decode %9.1f tok/s\n", tname[v], Bs[i], tv[v].prefill[i],
                   tv[v].decode[i]);
        if (!tv[v].ok) printf("   %s: skipped: %s\n", tname[v], tv[v].why);
        if (!tv[v].ok) continue;
        if (!td.ok) td = tv[v];
        for (int i = 0; i < 3; i++) {
            if (tv[v].decode[i] > td.decode[i]) td.decode[i] = tv[v].decode[i];
            if (tv[v].prefill[i] > td.prefill[i]) td.prefill[i] = tv[v].prefill[i];
        }
    }
    if (td.ok)
        printf("   (PyTorch %s, %d threads, KV cache: %s; pthrd = libblas.so.3 as Debian installs it, OpenBLAS's "
               "pthread build; omp = OpenBLAS's OpenMP build, as moerl; ratios below use the faster, batch by batch)\n",
               td.version, threads, td.cache);
    else printf("   PyTorch: skipped: %s\n", tv[0].why);
    const double bw = bw_near > bw_gbs ? bw_near : bw_gbs, bound = bw * 1e9 / wbytes;
    printf("   bandwidth bound, batch 1: %.1f GB/s / %.1f MB per token = %.1f tok/s (decode step: %.1f GB/s of weights)\n",
           bw, wbytes * 1e-6, bound, dec[0][0] * wbytes * 1e-9);
    printf("   batch-1 decode / bound: MM_DET decode step %.1f%%, end to end through rollout_generate %.1f%%, MM_FAST "
           "%.1f%%   (target >= 60%%)\n", 100 * dec[0][0] / bound, 100 * eng[0] / bound, 100 * dec[1][0] / bound);
    if (td.ok)
        printf("   batch-16 decode moerl / PyTorch: MM_DET x%.2f, MM_FAST x%.2f   (target >= x5); batch 1 x%.2f, "
               "batch 128 x%.2f (MM_DET); rollout_generate batch 16 x%.2f\n", dec[0][1] / td.decode[1],
               dec[1][1] / td.decode[1], dec[0][0] / td.decode[0], dec[0][2] / td.decode[2], eng[1] / td.decode[1]);
    uint64_t lat2, full2, lat4, full4;
    model_kv_bytes_per_token(c, 2, &lat2, &full2);
    model_kv_bytes_per_token(c, 4, &lat4, &full4);
    printf("   KV bytes per token (%d layers): latent (r_kv + d_rope) %llu bf16 / %llu fp32; full MHA K,V (H·(d_qk + "
           "d_v)) %llu bf16 / %llu fp32: %.1fx smaller\n", c->num_hidden_layers, (unsigned long long)lat2,
           (unsigned long long)lat4, (unsigned long long)full2, (unsigned long long)full4, (double)full2 / (double)lat2);
    fflush(stdout);
}

/* MTP speculative decoding against plain decoding through the rollout engine (MM_DET). */
static void bench_spec(const model_config *c0) {
    model_config c = *c0;
    if (c.num_nextn_predict_layers < 1) c.num_nextn_predict_layers = 1;
    static const int Bs[] = {1, 16};
    enum { PLEN = 32, NEW = 64 };
    static int32_t prompt[PLEN];
    for (int j = 0; j < PLEN; j++) prompt[j] = (int32_t)((j * 37 + 11) % c.vocab_size);
    for (int ti = 0; ti < 2; ti++)
        for (size_t bi = 0; bi < sizeof Bs / sizeof Bs[0]; bi++) {
            const int B = Bs[bi];
            model m;
            build(&m, &c, MM_DET, 0, 2 * B > PLEN ? 2 * B : PLEN);
            const int32_t *pp = prompt;
            int plen = PLEN;
            int64_t pid = 0;
            double tps[2];
            rollout_stats st[2];
            for (int sp = 0; sp < 2; sp++) {
                rollout_opts o = rollout_opts_default();
                o.temperature = ti ? 1.0f : 0.0f;
                o.max_new_tokens = NEW;
                o.mtp_speculative = sp;
                o.stats = &st[sp];
                rollout_seq *out = mem_calloc((size_t)B, sizeof *out);
                mr_err e = {0};
                double t0 = now();
                int reps = 0;
                do {
                    if (rollout_generate(&m, NULL, &pp, &plen, &pid, 1, B, &o, out, &e)) die(&e);
                    for (int q = 0; q < B; q++) rollout_seq_free(&out[q]);
                    reps++;
                } while (now() - t0 < secs);
                tps[sp] = (double)st[sp].tokens * reps / (now() - t0);
                mem_free(out);
            }
            printf("MTP speculative, %s, batch %3d: plain %8.0f tok/s, speculative %8.0f tok/s (x%.2f), "
                   "acceptance %.1f%% (%lld/%lld), decode steps %lld -> %lld\n",
                   ti ? "T=1   " : "greedy", B, tps[0], tps[1], tps[1] / tps[0],
                   st[1].drafted ? 100.0 * (double)st[1].accepted / (double)st[1].drafted : 0.0,
                   (long long)st[1].accepted, (long long)st[1].drafted, (long long)st[0].decode_steps,
                   (long long)st[1].decode_steps);
            model_free(&m);
        }
}


/* ---- MTP speculative decoding on a trained checkpoint ----
 * The recipe's held-out prompts (rl_data_setup, as `moerl eval` takes them) through rollout_generate with the
 * checkpoint's model and tokenizer, MM_DET, the recipe's max_new_tokens, stop strings and EOS; plain against
 * speculative, greedy and at T = 1, batch 1 (one prompt per call) and batch 16 (16 prompts per call). Figures: end to
 * end tokens/s (prefill included) and decode tokens/s (tokens after each sequence's first one, over the time after
 * the last first token: the prefills left out), each the best of 3 passes over the prompts; the acceptance rate;
 * the decode steps; whether greedy tokens are identical. */
typedef struct spec_clock {
    int n_first, n_seq; /* first tokens seen in this call, sequences */
    double t_pre;       /* when the last first token came */
    int *seen;          /* (n_seq) */
} spec_clock;

static void spec_on_token(void *ctx, int seq, int32_t t) {
    spec_clock *k = ctx;
    (void)t;
    if (k->seen[seq]++ == 0 && ++k->n_first == k->n_seq) k->t_pre = now();
}

typedef struct spec_run {
    double e2e, dec;       /* tokens/s: end to end, decode only */
    int64_t tokens, steps, drafted, accepted;
    int32_t **toks;        /* (n) generated tokens per prompt */
    int *ntok;
} spec_run;

static void spec_pass(model *m, const rl_data *D, int n, int B, const rollout_opts *o0, spec_run *R) {
    rollout_seq *out = mem_calloc((size_t)B, sizeof *out);
    const int32_t **pr = malloc(sizeof *pr * (size_t)B);
    int *pl = malloc(sizeof *pl * (size_t)B), *seen = malloc(sizeof *seen * (size_t)B);
    int64_t *pid = malloc(sizeof *pid * (size_t)B);
    if (!out || !pr || !pl || !seen || !pid) {
        fprintf(stderr, "bench_rollout: out of memory\n");
        exit(1);
    }
    R->e2e = R->dec = 0;
    for (int rep = 0; rep < 3; rep++) {
        double tall = 0, tdec = 0;
        int64_t tokens = 0, dtokens = 0, steps = 0, drafted = 0, accepted = 0;
        for (int p0 = 0; p0 < n; p0 += B) {
            const int np = n - p0 < B ? n - p0 : B;
            for (int i = 0; i < np; i++) {
                pr[i] = D->eval[p0 + i].ids;
                pl[i] = D->eval[p0 + i].n;
                pid[i] = p0 + i;
                seen[i] = 0;
            }
            spec_clock clk = {0, np, 0, seen};
            rollout_stats st;
            rollout_opts o = *o0;
            o.stats = &st;
            o.on_token = spec_on_token;
            o.on_token_ctx = &clk;
            mr_err e = {0};
            double t0 = now();
            if (rollout_generate(m, D->tok, pr, pl, pid, np, 1, &o, out, &e)) die(&e);
            double t1 = now();
            tall += t1 - t0;
            tdec += t1 - clk.t_pre;
            tokens += st.tokens;
            dtokens += st.tokens - np;
            steps += st.decode_steps;
            drafted += st.drafted;
            accepted += st.accepted;
            for (int i = 0; i < np; i++) {
                if (rep == 0) {
                    R->ntok[p0 + i] = out[i].n;
                    R->toks[p0 + i] = malloc(sizeof(int32_t) * (size_t)(out[i].n + 1));
                    if (!R->toks[p0 + i]) die(&e);
                    memcpy(R->toks[p0 + i], out[i].tokens, sizeof(int32_t) * (size_t)out[i].n);
                }
                rollout_seq_free(&out[i]);
            }
        }
        if (tokens / tall > R->e2e) R->e2e = (double)tokens / tall;
        if (dtokens / tdec > R->dec) R->dec = (double)dtokens / tdec;
        R->tokens = tokens;
        R->steps = steps;
        R->drafted = drafted;
        R->accepted = accepted;
    }
    mem_free(out);
    free(pr), free(pl), free(seen), free(pid);
}

static void bench_spec_ckpt(const char *dir, const char *recipe_path, int n_want) {
    recipe *r = NULL;
    mr_err e = {0};
    rl_data D;
    model_params prm;
    model m;
    memset(&D, 0, sizeof D);
    memset(&prm, 0, sizeof prm);
    if (recipe_load(&r, recipe_path, &e) || recipe_resolve(r, &e)) die(&e);
    if (rl_data_setup(&D, r, dir, 0, &e)) die(&e);
    if (params_load(&prm, dir, &e)) die(&e);
    const int n = (int)D.n_eval < n_want ? (int)D.n_eval : n_want;
    if (n < 1) {
        fprintf(stderr, "bench_rollout: %s has no held-out prompts (data.eval_n)\n", recipe_path);
        exit(1);
    }
    int T_max = 64; /* 2 rows per sample of a batch of 16; a packed prefill of several prompts */
    for (int i = 0; i < n; i++)
        if (D.eval[i].n > T_max) T_max = D.eval[i].n;
    model_opts mo = {.mm = MM_DET};
    if (model_init(&m, &prm, &mo, T_max, &e)) die(&e);
    const model_config *c = &m.p.cfg;
    const int n_stop = (int)recipe_list_len(r, "rollout.stop");
    const char **stop = calloc((size_t)n_stop + 1, sizeof *stop);
    for (int i = 0; i < n_stop; i++) {
        char sp[64];
        snprintf(sp, sizeof sp, "rollout.stop[%d]", i);
        stop[i] = recipe_str(r, sp);
    }
    rollout_opts o = rollout_opts_default();
    o.max_new_tokens = (int)recipe_int(r, "rollout.max_new_tokens");
    o.stop = n_stop ? stop : NULL;
    o.n_stop = n_stop;
    o.eos = tok_eos_id(D.tok);
    if (o.eos >= c->vocab_size) o.eos = -1;
    o.seed = 11;
    printf("MTP speculative decoding on %s (d=%d, %d layers, V=%d, MTP depth %d), %d held-out prompts of %s,\n"
           "max_new_tokens %d, %d threads, MM_DET; best of 3 passes; decode tok/s leaves out the prefills (tokens after\n"
           "each sequence's first, over the time after the last first token)\n",
           dir, c->hidden_size, c->num_hidden_layers, c->vocab_size, c->num_nextn_predict_layers, n, recipe_path,
           o.max_new_tokens, omp_get_max_threads());
    static const int Bs[] = {1, 16};
    spec_run R[2][2][2]; /* temperature, batch, plain/speculative */
    for (int ti = 0; ti < 2; ti++)
        for (int bi = 0; bi < 2; bi++)
            for (int sp = 0; sp < 2; sp++) {
                spec_run *x = &R[ti][bi][sp];
                x->toks = calloc((size_t)n, sizeof *x->toks);
                x->ntok = calloc((size_t)n, sizeof *x->ntok);
                rollout_opts oo = o;
                oo.temperature = ti ? 1.0f : 0.0f;
                oo.mtp_speculative = sp;
                spec_pass(&m, &D, n, Bs[bi], &oo, x);
            }
    for (int ti = 0; ti < 2; ti++)
        for (int bi = 0; bi < 2; bi++) {
            const spec_run *a = &R[ti][bi][0], *b = &R[ti][bi][1];
            printf("  %s batch %2d: plain %7.0f tok/s (decode %7.0f), speculative %7.0f tok/s (decode %7.0f): x%.2f "
                   "(decode x%.2f); acceptance %.1f%% (%lld/%lld); decode steps %lld -> %lld for %lld -> %lld tokens\n",
                   ti ? "T=1   " : "greedy", Bs[bi], a->e2e, a->dec, b->e2e, b->dec, b->e2e / a->e2e, b->dec / a->dec,
                   b->drafted ? 100.0 * (double)b->accepted / (double)b->drafted : 0.0, (long long)b->accepted,
                   (long long)b->drafted, (long long)a->steps, (long long)b->steps, (long long)a->tokens,
                   (long long)b->tokens);
        }
    /* greedy: speculative == plain, and batch 16 == batch 1 */
    int same = 0, same_b = 0;
    int64_t ntok = 0;
    for (int i = 0; i < n; i++) {
        const spec_run *p1 = &R[0][0][0];
        ntok += p1->ntok[i];
        int ok = 1, okb = 1;
        for (int bi = 0; bi < 2; bi++) {
            const spec_run *x = &R[0][bi][1], *y = &R[0][bi][0];
            ok &= x->ntok[i] == y->ntok[i] && !memcmp(x->toks[i], y->toks[i], sizeof(int32_t) * (size_t)y->ntok[i]);
        }
        okb = R[0][1][0].ntok[i] == p1->ntok[i] &&
              !memcmp(R[0][1][0].toks[i], p1->toks[i], sizeof(int32_t) * (size_t)p1->ntok[i]);
        same += ok;
        same_b += okb;
    }
    printf("  greedy outputs identical, speculative vs plain (batch 1 and 16): %s (%d of %d prompts, %lld tokens); "
           "batch 16 vs batch 1: %d of %d\n", same == n ? "yes" : "NO", same, n, (long long)ntok, same_b, n);
    for (int ti = 0; ti < 2; ti++)
        for (int bi = 0; bi < 2; bi++)
            for (int sp = 0; sp < 2; sp++) {
                for (int i = 0; i < n; i++) free(R[ti][bi][sp].toks[i]);
                free(R[ti][bi][sp].toks);
                free(R[ti][bi][sp].ntok);
            }
    free(stop);
    model_free(&m);
    rl_data_free(&D);
    recipe_free(r);
}

int main(int argc, char **argv) {
    int threads = argc > 1 ? atoi(argv[1]) : 2;
    if (argc > 2) secs = atof(argv[2]);
    threads = threads > 0 ? threads : 1;
    omp_set_num_threads(threads);
    model_config c, c100;
    config_tiny(&c);
    bench_config_100m(&c100);
    printf("tiny preset: d=%d, %d layers, H=%d, r_kv=%d, d_rope=%d, V=%d; %d threads\n", c.hidden_size,
           c.num_hidden_layers, c.num_attention_heads, c.kv_lora_rank, c.qk_rope_head_dim, c.vocab_size, threads);

    const char *only = argc > 3 ? argv[3] : "decode";
    if (!strcmp(only, "all")) only = "";
    double fa, fba, fn, fbn;
    if (!*only || !strcmp(only, "train")) {
        bench_train(&c, 0, &fa, &fba);
        bench_train(&c, 1, &fn, &fbn);
        printf("training forward, T=512 (4 docs of 128), MM_DET:\n");
        printf("  absorbed attention:     forward %7.2f ms   forward+backward %7.2f ms\n", fa * 1e3, fba * 1e3);
        printf("  non-absorbed attention: forward %7.2f ms   forward+backward %7.2f ms\n", fn * 1e3, fbn * 1e3);
        printf("  cost of the absorbed form: forward %+.1f%%, forward+backward %+.1f%%\n", (fa / fn - 1) * 100,
               (fba / fbn - 1) * 100);
        double an, aa;
        bench_attn_only(&c, &an, &aa);
        printf("  attention alone (one layer): non-absorbed %.3f ms, absorbed %.3f ms (x%.2f)\n", an * 1e3, aa * 1e3,
               aa / an);
    }
    if (!*only || !strcmp(only, "decode") || !strcmp(only, "decode-notorch")) {
        double rd, tr;
        measure_bandwidth(&rd, &tr);
        double bw = rd > tr ? rd : tr;
        printf("\nDecode figures. Method: moerl = model_prefill (B prompts of 32 tokens, packed %d per call, each into its\n"
               "own latent KV cache), then model_decode_step over the B sequences (other ids every step, no sampling):\n"
               "1 warm-up step, best of 2 rounds of 16 steps; random weights (std 0.02), fp32, %d threads; tok/s =\n"
               "tokens / wall seconds (prefill: best of repeats within %.2g s). rollout_generate = the engine end to end\n"
               "(T = 1 sampling over the whole vocabulary, log-probs, outputs), decode tok/s = B x 16 / (t(17 new) - t(1\n"
               "new)). PyTorch = bench/torch_decode.py, same config, sizes, ids and threads, /usr/bin/python3, same\n"
               "warm-up and rounds.\n"
               "Bandwidth (same run, %d threads, best of 5): read-only sum over 256 MiB %.1f GB/s, STREAM triad over\n"
               "3 x 128 MiB %.1f GB/s; the larger, %.1f GB/s, and per preset the same measured again just before and\n"
               "after its batch-1 figures: the bound uses the largest of the three. bound = bandwidth / fp32 bytes of\n"
               "the weights one decoded token reads (the KV cache read, < 0.5%% at these contexts, is left out).\n",
               PREFILL_CHUNK, threads, secs, threads, rd, tr, bw);
        int torch = strcmp(only, "decode-notorch") != 0;
        bench_config("tiny (quickstart) preset", &c, threads, bw, torch);
        bench_config("~100M preset (moerl bench model --preset 100m)", &c100, threads, bw, torch);
    }
    if (!strcmp(only, "one") && argc > 6) { /* one figure, for profiling: one tiny|100m det|fast B [N new] */
        double ptps, dtps;
        bench_decode(strcmp(argv[4], "100m") ? &c : &c100, strcmp(argv[5], "fast") ? MM_DET : MM_FAST, atoi(argv[6]),
                     32, argc > 7 ? atoi(argv[7]) : 16, &ptps, &dtps);
        printf("%s %s batch %s: prefill %.0f tok/s, decode %.1f tok/s\n", argv[4], argv[5], argv[6], ptps, dtps);
    }
    if (!strcmp(only, "engine") && argc > 5) { /* engine tiny|100m B [N new]: decode step and engine, twice each */
        const int N = argc > 6 ? atoi(argv[6]) : 16, B = atoi(argv[5]);
        const model_config *cc = strcmp(argv[4], "100m") ? &c : &c100;
        for (int r = 0; r < 2; r++) {
            double ptps, dtps;
            bench_decode(cc, MM_DET, B, 32, N, &ptps, &dtps);
            double etps = bench_engine(cc, B, 32, N);
            printf("%s batch %d: decode step %.1f tok/s, rollout_generate %.1f tok/s (%.0f%%)\n", argv[4], B, dtps,
                   etps, 100 * etps / dtps);
        }
    }
    if (!*only || !strcmp(only, "spec")) bench_spec(&c);
    if (!strcmp(only, "spec-ckpt")) { /* spec-ckpt DIR [RECIPE (default recipes/sft-arith.yaml)] [N prompts (32)] */
        char rp[4096];
        if (argc < 5) {
            fprintf(stderr, "bench_rollout: spec-ckpt needs a checkpoint directory (moerl sft's step-N)\n");
            return 2;
        }
        if (argc > 5) snprintf(rp, sizeof rp, "%s", argv[5]);
        else if (!find_src("recipes/sft-arith.yaml", rp, sizeof rp)) {
            fprintf(stderr, "bench_rollout: recipes/sft-arith.yaml not found (pass the recipe or set MOERL_SRC)\n");
            return 2;
        }
        bench_spec_ckpt(argv[4], rp, argc > 6 ? atoi(argv[6]) : 32);
    }
    return 0;
}
