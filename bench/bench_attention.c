/* bench_attention.c: GFLOP/s of attention_forward and attention_backward (kernels/cpu/attention.c) on training
 * shapes. A benchmark, not a test: prints figures, asserts nothing.
 * Usage: bench_attention [threads (default 2)] [isa: auto|generic|avx2|avx512]
 *
 * FLOP counts (useful work, causal mask, P = Σ_t (t − lo_t + 1) unmasked (query, key) pairs per head):
 *   forward  = 2 · P · H · (d_qk + d_v)        (S = q·kᵀ, out += p·v)
 *   backward = 2 · P · H · (3·d_qk + 2·d_v)    (S recomputed once, dP = dout·vᵀ, dv += p·dout, dq += ds·k,
 *                                               dk += ds·q), as FlashAttention-2 counts it; the kernel's extra
 *                                               recomputation is not counted. */
#include <omp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "kernels/cpu/attention.h"

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static float *rnd(size_t n, uint32_t seed) {
    float *p = malloc(sizeof(float) * n);
    if (!p) abort();
    uint32_t s = seed;
    for (size_t i = 0; i < n; i++) {
        s = s * 1664525u + 1013904223u;
        p[i] = ((float)(s >> 8) / 16777216.0f - 0.5f) * 3.0f;
    }
    return p;
}

/* Best time of repetitions lasting ~0.5 s in total (a single run when one run is already longer). */
#define TIME_BEST(best, stmt)                                                                                        \
    do {                                                                                                            \
        double t_end = now() + 0.5;                                                                                 \
        best = 1e30;                                                                                                \
        int reps = 0;                                                                                               \
        while (reps < 1 || (now() < t_end && reps < 50)) {                                                          \
            double t0 = now();                                                                                      \
            stmt;                                                                                                   \
            double dt = now() - t0;                                                                                 \
            if (dt < best) best = dt;                                                                               \
            reps++;                                                                                                 \
        }                                                                                                           \
    } while (0)

int main(int argc, char **argv) {
    int nth = argc > 1 ? atoi(argv[1]) : 2;
#ifndef BENCH_ATTN_BASELINE
    if (argc > 2) {
        attn_isa isa = !strcmp(argv[2], "generic") ? ATTN_ISA_GENERIC
                       : !strcmp(argv[2], "avx2")   ? ATTN_ISA_AVX2
                       : !strcmp(argv[2], "avx512") ? ATTN_ISA_AVX512
                                                    : ATTN_ISA_AUTO;
        attention_force_isa(isa);
    }
    printf("threads %d, isa %d (1 generic, 2 avx2+fma, 3 avx512)\n", nth, (int)attention_active_isa());
#else
    printf("threads %d (baseline build)\n", nth);
#endif
    omp_set_num_threads(nth);
    /* T, H, d_qk, d_v, packed documents of this length (0 = plain causal) */
    static const int shapes[][5] = {{512, 4, 48, 32, 0},     {512, 16, 192, 128, 0}, {1024, 8, 96, 64, 0},
                                    {2048, 4, 192, 128, 0},  {2048, 16, 192, 128, 0}, {2048, 16, 192, 128, 512},
                                    {1024, 8, 72, 48, 0}};
    printf("%-26s %9s %9s   %9s %9s\n", "T,H,d_qk,d_v[,doc]", "fwd ms", "GFLOP/s", "bwd ms", "GFLOP/s");
    for (size_t s = 0; s < sizeof shapes / sizeof shapes[0]; s++) {
        int T = shapes[s][0], H = shapes[s][1], dqk = shapes[s][2], dv = shapes[s][3], dl = shapes[s][4];
        size_t nq = (size_t)T * H * dqk, nv = (size_t)T * H * dv;
        float *q = rnd(nq, 1), *k = rnd(nq, 2), *v = rnd(nv, 3), *dout = rnd(nv, 4);
        float *out = malloc(nv * 4), *lse = malloc((size_t)T * H * 4);
        float *dq = calloc(nq, 4), *dk = calloc(nq, 4), *dvv = calloc(nv, 4);
        int32_t *doc = NULL;
        double pairs = 0;
        if (dl) {
            doc = malloc((size_t)T * sizeof *doc);
            for (int t = 0; t < T; t++) doc[t] = t / dl * dl;
        }
        for (int t = 0; t < T; t++) pairs += t - (doc ? doc[t] : 0) + 1;
        if (!q || !k || !v || !dout || !out || !lse || !dq || !dk || !dvv) abort();
        double ff = 2.0 * pairs * H * (dqk + dv), fb = 2.0 * pairs * H * (3.0 * dqk + 2.0 * dv), tf, tb;
        float scale = 1.0f / 13.0f;
        TIME_BEST(tf, attention_forward(out, lse, q, k, v, doc, T, H, dqk, dv, scale));
        TIME_BEST(tb, attention_backward(dq, dk, dvv, dout, out, lse, q, k, v, doc, T, H, dqk, dv, scale));
        char name[64];
        snprintf(name, sizeof name, dl ? "%d,%d,%d,%d,%d" : "%d,%d,%d,%d", T, H, dqk, dv, dl);
        printf("%-26s %9.2f %9.2f   %9.2f %9.2f\n", name, tf * 1e3, ff / tf * 1e-9, tb * 1e3, fb / tb * 1e-9);
        fflush(stdout);
        free(q), free(k), free(v), free(dout), free(out), free(lse), free(dq), free(dk), free(dvv), free(doc);
    }
    return 0;
}
