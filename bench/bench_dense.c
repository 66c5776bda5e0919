/* bench_dense.c: GFLOP/s of MM_DET vs OpenBLAS (MM_FAST) for matmul forward and backward, and the time of the
 * softmax kernels. A benchmark, not a test: prints figures, asserts nothing.
 * Usage: bench_dense [threads (default 2)] [isa: auto|generic|avx2|avx512] */
#include <cblas.h>
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "kernels/cpu/dense.h"

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static float *rnd(size_t n) {
    float *p = malloc(sizeof(float) * n);
    if (!p) abort();
    uint32_t s = 12345;
    for (size_t i = 0; i < n; i++) {
        s = s * 1664525u + 1013904223u;
        p[i] = (float)(s >> 8) / 16777216.0f - 0.5f;
    }
    return p;
}

/* Best of a few repetitions lasting at least ~0.3 s in total. */
#define TIME_BEST(best, stmt)                                                                                       \
    do {                                                                                                           \
        stmt;                                                                                                      \
        best = 1e30;                                                                                               \
        double t_end = now() + 0.3;                                                                                \
        int reps = 0;                                                                                              \
        while (reps < 3 || (now() < t_end && reps < 200)) {                                                        \
            double t0 = now();                                                                                     \
            stmt;                                                                                                  \
            double dt = now() - t0;                                                                                \
            if (dt < best) best = dt;                                                                              \
            reps++;                                                                                                \
        }                                                                                                          \
    } while (0)

int main(int argc, char **argv) {
    int nth = argc > 1 ? atoi(argv[1]) : 2;
    if (argc > 2) {
        dense_isa isa = !strcmp(argv[2], "generic") ? DENSE_ISA_GENERIC
                        : !strcmp(argv[2], "avx2")  ? DENSE_ISA_AVX2
                        : !strcmp(argv[2], "avx512") ? DENSE_ISA_AVX512
                                                     : DENSE_ISA_AUTO;
        dense_force_isa(isa);
    }
    omp_set_num_threads(nth);
    openblas_set_num_threads(nth);
    printf("threads %d, MM_DET isa %d (1 generic, 2 avx2, 3 avx512)\n", nth, (int)dense_active_isa());
    static const int shapes[][3] = {{512, 256, 1024}, {2048, 1024, 4096}, {1, 1024, 4096}, {64, 1024, 4096},
                                    {2048, 256, 129280 / 8}};
    printf("%-20s %10s %10s %7s | %10s %10s %7s\n", "T,in,out", "fwd DET", "fwd BLAS", "ratio", "bwd DET", "bwd BLAS",
           "ratio");
    for (size_t s = 0; s < sizeof shapes / sizeof shapes[0]; s++) {
        int T = shapes[s][0], in = shapes[s][1], out = shapes[s][2];
        float *x = rnd((size_t)T * in), *w = rnd((size_t)out * in), *y = rnd((size_t)T * out);
        float *dx = rnd((size_t)T * in), *dw = rnd((size_t)out * in);
        double f = 2.0 * T * in * out, tdet, tfast, bdet, bfast;
        TIME_BEST(tdet, matmul_forward(y, x, w, T, in, out, 0.0f, MM_DET));
        TIME_BEST(tfast, matmul_forward(y, x, w, T, in, out, 0.0f, MM_FAST));
        TIME_BEST(bdet, matmul_backward(dx, dw, y, x, w, T, in, out, MM_DET));
        TIME_BEST(bfast, matmul_backward(dx, dw, y, x, w, T, in, out, MM_FAST));
        char name[64];
        snprintf(name, sizeof name, "%d,%d,%d", T, in, out);
        printf("%-20s %10.1f %10.1f %7.2f | %10.1f %10.1f %7.2f   GFLOP/s, ratio = BLAS/DET time\n", name,
               f / tdet * 1e-9, f / tfast * 1e-9, tdet / tfast, 2 * f / bdet * 1e-9, 2 * f / bfast * 1e-9,
               bdet / bfast);
        free(x);
        free(w);
        free(y);
        free(dx);
        free(dw);
    }
    {
        int T = 64, V = 129280;
        float *lg = rnd((size_t)T * V), *d = malloc(sizeof(float) * T * V), loss[64], lp[64];
        int32_t ids[64];
        for (int t = 0; t < T; t++) ids[t] = t * 97;
        double tx, tl;
        TIME_BEST(tx, xent_forward_backward(loss, d, lg, ids, NULL, T, V));
        TIME_BEST(tl, logprob_forward(lp, lg, ids, T, V));
        printf("xent fwd+bwd T=%d V=%d: %.2f ms (%.2f ns/logit); logprob: %.2f ms\n", T, V, tx * 1e3,
               tx * 1e9 / ((double)T * V), tl * 1e3);
        free(lg);
        free(d);
    }
    return 0;
}
