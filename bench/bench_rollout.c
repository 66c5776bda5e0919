/* bench_rollout.c: the rollout engine's figures on the tiny preset (config_tiny, random weights). A benchmark, not
 * a test: prints figures, asserts nothing.
 * Usage: bench_rollout [threads (default 2)] [seconds per figure (default 0.5)] [train|decode (default both)]
 *
 *   1. the training forward (train = 0, and train = 1 + backward) with the absorbed attention (MM_DET default,
 *      what makes rollout log-probs exact) against the non-absorbed one (model_opts.attn_naive), T = 512 in
 *      4 packed documents;
 *   2. prefill tokens/s (one prompt of 128 tokens) and decode tokens/s at batch 1, 16, 128 (contexts of 128 + the
 *      tokens decoded so far), MM_DET and MM_FAST;
 *   3. KV bytes per token: latent (r_kv + d_rope per layer) vs full multi-head K and V, bf16;
 *   4. (mode "spec" or default) MTP speculative decoding through rollout_generate, greedy and T = 1, batch 1 and
 *      16: tokens/s plain vs speculative, acceptance rate. With random weights the MTP module drafts at random:
 *      the acceptance (and speed-up) of a trained model is higher; this measures the machinery's cost. */
#include <omp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "core/mem.h"
#include "kernels/cpu/attention.h"
#include "model/config.h"
#include "model/model.h"
#include "model/params.h"
#include "model/setup.h"
#include "rollout/rollout.h"

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

/* prefill tokens/s of one 128-token prompt, decode tokens/s at batch B (steps after a 128-token prefill) */
static void bench_decode(const model_config *c, mm_mode mm, int B, double *prefill_tps, double *decode_tps) {
    enum { P = 128, STEPS = 32 };
    model m;
    build(&m, c, mm, 0, B > P ? B : P);
    size_t fc, fk;
    model_kv_floats(&m, P + STEPS + 1, &fc, &fk);
    model_kv *kv = calloc((size_t)B, sizeof *kv);
    model_kv **kvp = malloc(sizeof *kvp * (size_t)B);
    float *mem = malloc(sizeof(float) * (fc + fk) * (size_t)B);
    int32_t ids[P], *step = malloc(sizeof(int32_t) * (size_t)B);
    for (int i = 0; i < P; i++) ids[i] = (int32_t)((i * 31 + 7) % c->vocab_size);
    for (int b = 0; b < B; b++) {
        kv[b] = (model_kv){.ckv = mem + (fc + fk) * (size_t)b, .kpe = mem + (fc + fk) * (size_t)b + fc,
                           .cap = P + STEPS + 1};
        kvp[b] = &kv[b];
        step[b] = (int32_t)((b * 17 + 3) % c->vocab_size);
    }
    mr_err e = {0};
    model_batch pb = {.ids = ids, .T = P};
    double best = 1e30, end = now() + secs;
    do {
        double t0 = now();
        if (model_prefill(&m, &pb, kvp, 1, &e)) die(&e);
        double dt = now() - t0;
        if (dt < best) best = dt;
    } while (now() < end);
    *prefill_tps = P / best;
    for (int b = 1; b < B; b++) { /* every sequence starts from the same prompt cache */
        memcpy(kv[b].ckv, kv[0].ckv, sizeof(float) * fc);
        memcpy(kv[b].kpe, kv[0].kpe, sizeof(float) * fk);
        kv[b].len = kv[0].len;
    }
    double t0 = now();
    int steps = 0;
    while (steps < STEPS && (steps < 2 || now() - t0 < secs)) {
        if (model_decode_step(&m, step, kvp, B, &e)) die(&e);
        steps++;
    }
    *decode_tps = (double)B * steps / (now() - t0);
    free(step);
    free(mem);
    free(kvp);
    free(kv);
    model_free(&m);
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

int main(int argc, char **argv) {
    int threads = argc > 1 ? atoi(argv[1]) : 2;
    if (argc > 2) secs = atof(argv[2]);
    omp_set_num_threads(threads > 0 ? threads : 1);
    model_config c;
    config_tiny(&c);
    printf("tiny preset: d=%d, %d layers, H=%d, r_kv=%d, d_rope=%d, V=%d; %d threads\n", c.hidden_size,
           c.num_hidden_layers, c.num_attention_heads, c.kv_lora_rank, c.qk_rope_head_dim, c.vocab_size, threads);

    const char *only = argc > 3 ? argv[3] : "";
    double fa, fba, fn, fbn;
    if (strcmp(only, "decode") && strcmp(only, "spec")) {
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
    if (!strcmp(only, "train")) return 0;

    static const int Bs[] = {1, 16, 128};
    for (int mi = 0; mi < 2 && strcmp(only, "spec"); mi++) {
        mm_mode mm = mi ? MM_FAST : MM_DET;
        for (size_t i = 0; i < sizeof Bs / sizeof Bs[0]; i++) {
            double ptps, dtps;
            bench_decode(&c, mm, Bs[i], &ptps, &dtps);
            printf("%s batch %3d: prefill %9.0f tok/s   decode %9.0f tok/s\n", mi ? "MM_FAST" : "MM_DET ", Bs[i],
                   ptps, dtps);
        }
    }
    if (strcmp(only, "spec")) {
    uint64_t lat, full;
    model_kv_bytes_per_token(&c, 2, &lat, &full);
    printf("KV bytes per token (bf16, %d layers): latent %llu, full MHA %llu (%.1fx smaller)\n", c.num_hidden_layers,
           (unsigned long long)lat, (unsigned long long)full, (double)full / (double)lat);
    }
    bench_spec(&c);
    return 0;
}
