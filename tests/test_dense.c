/* test_dense.c: the dense CPU kernels against plain references, finite differences, and the determinism promises of
 * dense.h (MM_DET batch invariance, equal bits for every thread count and every ISA path). */
#include <criterion/criterion.h>
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "kernels/cpu/dense.h"

/* ---------------------------------------------------------------------------------------------------------- */
/* helpers                                                                                                    */
/* ---------------------------------------------------------------------------------------------------------- */

static uint64_t rng_state = 0x9E3779B97F4A7C15ull;
static void rng_seed(uint64_t s) { rng_state = s * 0x9E3779B97F4A7C15ull + 1; }
static uint32_t rng_u32(void) {
    rng_state = rng_state * 6364136223846793005ull + 1442695040888963407ull;
    return (uint32_t)(rng_state >> 33);
}
static float rng_uniform(void) { return (float)rng_u32() / 2147483648.0f * 2.0f - 1.0f; } /* [-1, 1) */

static float *rand_buf(size_t n, float amp) {
    float *p = malloc(sizeof(float) * (n ? n : 1));
    cr_assert(p);
    for (size_t i = 0; i < n; i++) p[i] = amp * rng_uniform();
    return p;
}
static float *copy_buf(const float *src, size_t n) {
    float *p = malloc(sizeof(float) * (n ? n : 1));
    cr_assert(p);
    if (n) memcpy(p, src, sizeof(float) * n);
    return p;
}

/* max |a-b| / (max |b| + floor) */
static double rel_err(const float *a, const float *b, size_t n, double floor_) {
    double md = 0.0, mb = 0.0;
    for (size_t i = 0; i < n; i++) {
        double d = fabs((double)a[i] - (double)b[i]);
        if (d > md || isnan(d)) md = isnan(d) ? INFINITY : d;
        if (fabs((double)b[i]) > mb) mb = fabs((double)b[i]);
    }
    return md / (mb + floor_);
}

static int bits_equal(const float *a, const float *b, size_t n) { return memcmp(a, b, sizeof(float) * n) == 0; }

/* The documented MM_DET order of one element, written independently of the library (dense.h). */
static float det_ref_dot(const float *x, const float *w, int in) {
    float acc[16] = {0};
    for (int i = 0; i < in; i++) acc[i % 16] = fmaf(x[i], w[i], acc[i % 16]);
    for (int l = 0; l < 8; l++) acc[l] += acc[l + 8];
    for (int l = 0; l < 4; l++) acc[l] += acc[l + 4];
    for (int l = 0; l < 2; l++) acc[l] += acc[l + 2];
    return acc[0] + acc[1];
}

static const dense_isa all_isas[] = {DENSE_ISA_GENERIC, DENSE_ISA_AVX2, DENSE_ISA_AVX512};

/* ---------------------------------------------------------------------------------------------------------- */
/* matmul                                                                                                     */
/* ---------------------------------------------------------------------------------------------------------- */

static const int shapes[][3] = {{1, 1, 1},   {1, 3, 17},  {3, 17, 1},   {2, 16, 4},    {5, 31, 9},  {4, 32, 8},
                                {7, 33, 13}, {17, 129, 5}, {1, 129, 33}, {33, 48, 65}, {64, 100, 70}, {9, 0, 5}};

Test(matmul, forward_matches_naive_both_modes) {
    rng_seed(1);
    for (size_t s = 0; s < sizeof shapes / sizeof shapes[0]; s++) {
        int T = shapes[s][0], in = shapes[s][1], out = shapes[s][2];
        float *x = rand_buf((size_t)T * in, 1), *w = rand_buf((size_t)out * in, 1);
        float *y0 = rand_buf((size_t)T * out, 1);
        for (int beta = 0; beta <= 1; beta++)
            for (int mode = 0; mode <= 1; mode++) {
                float *ref = copy_buf(y0, (size_t)T * out), *y = copy_buf(y0, (size_t)T * out);
                matmul_forward_naive(ref, x, w, T, in, out, (float)beta);
                matmul_forward(y, x, w, T, in, out, (float)beta, (mm_mode)mode);
                double e = rel_err(y, ref, (size_t)T * out, 1.0);
                cr_expect(e < 1e-5, "shape %d,%d,%d beta %d mode %d: rel err %g", T, in, out, beta, mode, e);
                free(ref);
                free(y);
            }
        free(x);
        free(w);
        free(y0);
    }
}

/* Every element equals the documented order bit for bit, on every ISA path. */
Test(matmul, det_forward_is_the_documented_order_on_every_isa) {
    rng_seed(2);
    for (size_t s = 0; s < sizeof shapes / sizeof shapes[0]; s++) {
        int T = shapes[s][0], in = shapes[s][1], out = shapes[s][2];
        float *x = rand_buf((size_t)T * in, 1), *w = rand_buf((size_t)out * in, 1);
        float *ref = malloc(sizeof(float) * (size_t)T * out);
        for (int t = 0; t < T; t++)
            for (int o = 0; o < out; o++) ref[t * out + o] = det_ref_dot(x + (size_t)t * in, w + (size_t)o * in, in);
        for (size_t k = 0; k < 3; k++) {
            dense_isa prev = dense_force_isa(all_isas[k]);
            float *y = rand_buf((size_t)T * out, 1);
            matmul_forward(y, x, w, T, in, out, 0.0f, MM_DET);
            cr_expect(bits_equal(y, ref, (size_t)T * out), "shape %d,%d,%d isa %d (active %d) differs", T, in, out,
                      (int)all_isas[k], (int)dense_active_isa());
            dense_force_isa(prev);
            free(y);
        }
        free(x);
        free(w);
        free(ref);
    }
}

/* Batch invariance: each row alone (T = 1), any sub-batch at any offset, and the full batch give the same bits,
 * for 1, 2 and 3 threads. */
Test(matmul, det_forward_batch_invariant) {
    rng_seed(3);
    static const int bshapes[][3] = {{37, 129, 77}, {16, 256, 64}, {9, 17, 130}, {70, 64, 260}, {5, 1000, 33}};
    for (size_t s = 0; s < sizeof bshapes / sizeof bshapes[0]; s++) {
        int T = bshapes[s][0], in = bshapes[s][1], out = bshapes[s][2];
        float *x = rand_buf((size_t)T * in, 2), *w = rand_buf((size_t)out * in, 0.5f);
        float *full = rand_buf((size_t)T * out, 1), *rows = rand_buf((size_t)T * out, 1);
        omp_set_num_threads(2);
        matmul_forward(full, x, w, T, in, out, 0.0f, MM_DET);
        omp_set_num_threads(1);
        for (int t = 0; t < T; t++)
            matmul_forward(rows + (size_t)t * out, x + (size_t)t * in, w, 1, in, out, 0.0f, MM_DET);
        cr_expect(bits_equal(full, rows, (size_t)T * out), "shape %d,%d,%d: rows alone != batch", T, in, out);
        for (int nth = 1; nth <= 3; nth++) {
            omp_set_num_threads(nth);
            float *part = rand_buf((size_t)T * out, 1);
            int cut = T / 3 + 1; /* sub-batches [0, cut) and [cut, T): rows move to other tile positions */
            matmul_forward(part, x, w, cut, in, out, 0.0f, MM_DET);
            matmul_forward(part + (size_t)cut * out, x + (size_t)cut * in, w, T - cut, in, out, 0.0f, MM_DET);
            cr_expect(bits_equal(full, part, (size_t)T * out), "shape %d,%d,%d threads %d: sub-batches differ", T, in,
                      out, nth);
            free(part);
        }
        omp_set_num_threads(2);
        free(x);
        free(w);
        free(full);
        free(rows);
    }
}

/* The fast mode really is BLAS and is not required to be invariant, but it must be close. */
Test(matmul, fast_and_det_agree_closely) {
    rng_seed(4);
    int T = 50, in = 300, out = 90;
    float *x = rand_buf((size_t)T * in, 1), *w = rand_buf((size_t)out * in, 1);
    float *a = rand_buf((size_t)T * out, 1), *b = rand_buf((size_t)T * out, 1);
    matmul_forward(a, x, w, T, in, out, 0.0f, MM_FAST);
    matmul_forward(b, x, w, T, in, out, 0.0f, MM_DET);
    cr_expect(rel_err(a, b, (size_t)T * out, 1e-3) < 1e-5);
    free(x);
    free(w);
    free(a);
    free(b);
}

Test(matmul, backward_matches_naive_and_accumulates) {
    rng_seed(5);
    for (size_t s = 0; s < sizeof shapes / sizeof shapes[0]; s++) {
        int T = shapes[s][0], in = shapes[s][1], out = shapes[s][2];
        size_t nx = (size_t)T * in, nw = (size_t)out * in;
        float *x = rand_buf(nx, 1), *w = rand_buf(nw, 1), *dy = rand_buf((size_t)T * out, 1);
        float *dx0 = rand_buf(nx, 1), *dw0 = rand_buf(nw, 1);
        float *rdx = copy_buf(dx0, nx), *rdw = copy_buf(dw0, nw);
        matmul_backward_naive(rdx, rdw, dy, x, w, T, in, out);
        for (int mode = 0; mode <= 1; mode++) {
            float *dx = copy_buf(dx0, nx), *dw = copy_buf(dw0, nw);
            matmul_backward(dx, dw, dy, x, w, T, in, out, (mm_mode)mode);
            cr_expect(rel_err(dx, rdx, nx, 1.0) < 1e-5, "dx shape %d,%d,%d mode %d", T, in, out, mode);
            cr_expect(rel_err(dw, rdw, nw, 1.0) < 1e-5, "dw shape %d,%d,%d mode %d", T, in, out, mode);
            /* NULL skips that gradient */
            float *dw2 = copy_buf(dw0, nw);
            matmul_backward(NULL, dw2, dy, x, w, T, in, out, (mm_mode)mode);
            cr_expect(rel_err(dw2, rdw, nw, 1.0) < 1e-5);
            float *dx2 = copy_buf(dx0, nx);
            matmul_backward(dx2, NULL, dy, x, w, T, in, out, (mm_mode)mode);
            cr_expect(rel_err(dx2, rdx, nx, 1.0) < 1e-5);
            free(dx);
            free(dw);
            free(dw2);
            free(dx2);
        }
        free(x);
        free(w);
        free(dy);
        free(dx0);
        free(dw0);
        free(rdx);
        free(rdw);
    }
}

/* MM_DET backward: dx[t][i] += fused chain over o in order; dw[o][i] += fused chain over t in order. Same bits on
 * every ISA and thread count. */
Test(matmul, det_backward_documented_order_threads_and_isas) {
    rng_seed(6);
    static const int bshapes[][3] = {{37, 129, 77}, {3, 40, 200}, {130, 33, 17}, {1, 5, 3}};
    for (size_t s = 0; s < sizeof bshapes / sizeof bshapes[0]; s++) {
        int T = bshapes[s][0], in = bshapes[s][1], out = bshapes[s][2];
        size_t nx = (size_t)T * in, nw = (size_t)out * in;
        float *x = rand_buf(nx, 1), *w = rand_buf(nw, 1), *dy = rand_buf((size_t)T * out, 1);
        float *dx0 = rand_buf(nx, 1), *dw0 = rand_buf(nw, 1);
        float *rdx = copy_buf(dx0, nx), *rdw = copy_buf(dw0, nw);
        for (int t = 0; t < T; t++)
            for (int i = 0; i < in; i++) {
                float acc = 0.0f;
                for (int o = 0; o < out; o++) acc = fmaf(dy[(size_t)t * out + o], w[(size_t)o * in + i], acc);
                rdx[(size_t)t * in + i] += acc;
            }
        for (int o = 0; o < out; o++)
            for (int i = 0; i < in; i++) {
                float acc = 0.0f;
                for (int t = 0; t < T; t++) acc = fmaf(dy[(size_t)t * out + o], x[(size_t)t * in + i], acc);
                rdw[(size_t)o * in + i] += acc;
            }
        for (size_t k = 0; k < 3; k++)
            for (int nth = 1; nth <= 3; nth += 2) {
                dense_isa prev = dense_force_isa(all_isas[k]);
                omp_set_num_threads(nth);
                float *dx = copy_buf(dx0, nx), *dw = copy_buf(dw0, nw);
                matmul_backward(dx, dw, dy, x, w, T, in, out, MM_DET);
                cr_expect(bits_equal(dx, rdx, nx), "dx shape %d,%d,%d isa %d threads %d", T, in, out,
                          (int)all_isas[k], nth);
                cr_expect(bits_equal(dw, rdw, nw), "dw shape %d,%d,%d isa %d threads %d", T, in, out,
                          (int)all_isas[k], nth);
                free(dx);
                free(dw);
                dense_force_isa(prev);
            }
        omp_set_num_threads(2);
        free(x);
        free(w);
        free(dy);
        free(dx0);
        free(dw0);
        free(rdx);
        free(rdw);
    }
}

/* Finite differences of L = Σ r ⊙ (x Wᵀ), evaluated in double, against both modes' backward. */
Test(matmul, backward_finite_differences) {
    rng_seed(7);
    int T = 3, in = 19, out = 7;
    float *x = rand_buf((size_t)T * in, 1), *w = rand_buf((size_t)out * in, 1), *r = rand_buf((size_t)T * out, 1);
    for (int mode = 0; mode <= 1; mode++) {
        float *dx = calloc((size_t)T * in, sizeof(float)), *dw = calloc((size_t)out * in, sizeof(float));
        matmul_backward(dx, dw, r, x, w, T, in, out, (mm_mode)mode);
        for (int which = 0; which < 2; which++) {
            float *p = which ? w : x, *g = which ? dw : dx;
            int n = which ? out * in : T * in;
            for (int k = 0; k < n; k += 3) {
                double L[2];
                float keep = p[k];
                for (int sgn = 0; sgn < 2; sgn++) {
                    p[k] = keep + (sgn ? -1e-2f : 1e-2f);
                    double acc = 0.0;
                    for (int t = 0; t < T; t++)
                        for (int o = 0; o < out; o++) {
                            double d = 0.0;
                            for (int i = 0; i < in; i++) d += (double)x[t * in + i] * w[o * in + i];
                            acc += r[t * out + o] * d;
                        }
                    L[sgn] = acc;
                }
                double fd = (L[0] - L[1]) / (((double)(keep + 1e-2f)) - (double)(keep - 1e-2f));
                p[k] = keep;
                cr_expect(fabs(fd - g[k]) < 1e-4 * (1 + fabs(fd)), "mode %d %s[%d]: fd %g vs %g", mode,
                          which ? "dw" : "dx", k, fd, (double)g[k]);
            }
        }
        free(dx);
        free(dw);
    }
    free(x);
    free(w);
    free(r);
}

/* ---------------------------------------------------------------------------------------------------------- */
/* RMSNorm                                                                                                    */
/* ---------------------------------------------------------------------------------------------------------- */

/* L = Σ r ⊙ rmsnorm(x; g) in double. */
static double rms_loss_d(const float *x, const float *g, const float *r, int T, int C, double eps) {
    double L = 0.0;
    for (int t = 0; t < T; t++) {
        double ss = 0.0;
        for (int c = 0; c < C; c++) ss += (double)x[t * C + c] * x[t * C + c];
        double rs = 1.0 / sqrt(ss / C + eps);
        for (int c = 0; c < C; c++) L += r[t * C + c] * (g[c] * (x[t * C + c] * rs));
    }
    return L;
}

Test(rmsnorm, forward_matches_double_reference) {
    rng_seed(10);
    static const int sh[][2] = {{1, 1}, {3, 17}, {5, 129}, {2, 7168}, {40, 64}};
    for (size_t s = 0; s < sizeof sh / sizeof sh[0]; s++) {
        int T = sh[s][0], C = sh[s][1];
        float *x = rand_buf((size_t)T * C, 3), *g = rand_buf((size_t)C, 1), *o = rand_buf((size_t)T * C, 1);
        float *rstd = malloc(sizeof(float) * T), *ref = malloc(sizeof(float) * (size_t)T * C);
        rmsnorm_forward(o, rstd, x, g, T, C, 1e-6f);
        for (int t = 0; t < T; t++) {
            double ss = 0.0;
            for (int c = 0; c < C; c++) ss += (double)x[t * C + c] * x[t * C + c];
            double rs = 1.0 / sqrt(ss / C + 1e-6);
            cr_expect(fabs(rstd[t] - rs) < 1e-5 * rs, "T %d C %d row %d rstd %g vs %g", T, C, t, rstd[t], rs);
            for (int c = 0; c < C; c++) ref[t * C + c] = (float)(g[c] * x[t * C + c] * rs);
        }
        cr_expect(rel_err(o, ref, (size_t)T * C, 1e-6) < 1e-5, "T %d C %d", T, C);
        /* rstd may be NULL; the output does not change */
        float *o2 = rand_buf((size_t)T * C, 1);
        rmsnorm_forward(o2, NULL, x, g, T, C, 1e-6f);
        cr_expect(bits_equal(o, o2, (size_t)T * C));
        free(x);
        free(g);
        free(o);
        free(o2);
        free(rstd);
        free(ref);
    }
}

Test(rmsnorm, backward_finite_differences) {
    rng_seed(11);
    int T = 3, C = 21;
    float *x = rand_buf((size_t)T * C, 2), *g = rand_buf(C, 1), *r = rand_buf((size_t)T * C, 1);
    float *out = malloc(sizeof(float) * T * C), *rstd = malloc(sizeof(float) * T);
    float *dx = rand_buf((size_t)T * C, 1), *dg = rand_buf(C, 1);
    float *dx0 = copy_buf(dx, (size_t)T * C), *dg0 = copy_buf(dg, C);
    rmsnorm_forward(out, rstd, x, g, T, C, 1e-6f);
    rmsnorm_backward(dx, dg, r, x, g, rstd, T, C);
    for (int which = 0; which < 2; which++) {
        float *p = which ? g : x, *grad = which ? dg : dx, *g0 = which ? dg0 : dx0;
        int n = which ? C : T * C;
        for (int k = 0; k < n; k++) {
            float keep = p[k], h = 1e-2f;
            p[k] = keep + h;
            double lp = rms_loss_d(x, g, r, T, C, 1e-6);
            p[k] = keep - h;
            double lm = rms_loss_d(x, g, r, T, C, 1e-6);
            p[k] = keep;
            double fd = (lp - lm) / ((double)(keep + h) - (double)(keep - h));
            double an = (double)grad[k] - g0[k];
            cr_expect(fabs(fd - an) < 2e-4 * (1 + fabs(fd)), "%s[%d]: fd %g vs %g", which ? "dg" : "dx", k, fd, an);
        }
    }
    free(x);
    free(g);
    free(r);
    free(out);
    free(rstd);
    free(dx);
    free(dg);
    free(dx0);
    free(dg0);
}

/* Same bits for 1, 2 and 3 threads, and a row alone equals the row in the batch. */
Test(rmsnorm, thread_and_batch_invariant) {
    rng_seed(12);
    int T = 203, C = 517;
    size_t n = (size_t)T * C;
    float *x = rand_buf(n, 2), *g = rand_buf(C, 1), *dout = rand_buf(n, 1);
    float *o[3], *dx[3], *dg[3], rstd[203];
    for (int nth = 1; nth <= 3; nth++) {
        omp_set_num_threads(nth);
        o[nth - 1] = malloc(sizeof(float) * n);
        dx[nth - 1] = calloc(n, sizeof(float));
        dg[nth - 1] = calloc(C, sizeof(float));
        rmsnorm_forward(o[nth - 1], rstd, x, g, T, C, 1e-6f);
        rmsnorm_backward(dx[nth - 1], dg[nth - 1], dout, x, g, rstd, T, C);
    }
    omp_set_num_threads(2);
    for (int k = 1; k < 3; k++) {
        cr_expect(bits_equal(o[0], o[k], n));
        cr_expect(bits_equal(dx[0], dx[k], n));
        cr_expect(bits_equal(dg[0], dg[k], (size_t)C));
    }
    float *row = malloc(sizeof(float) * C);
    for (int t = 0; t < T; t += 17) {
        rmsnorm_forward(row, NULL, x + (size_t)t * C, g, 1, C, 1e-6f);
        cr_expect(bits_equal(row, o[0] + (size_t)t * C, (size_t)C), "row %d", t);
    }
    for (int k = 0; k < 3; k++) {
        free(o[k]);
        free(dx[k]);
        free(dg[k]);
    }
    free(row);
    free(x);
    free(g);
    free(dout);
}

/* ---------------------------------------------------------------------------------------------------------- */
/* SwiGLU                                                                                                     */
/* ---------------------------------------------------------------------------------------------------------- */

Test(swiglu, forward_reference_and_finite_differences) {
    rng_seed(20);
    int T = 3, I = 37;
    size_t n = (size_t)T * I;
    float *gate = rand_buf(n, 6), *up = rand_buf(n, 2), *h = malloc(sizeof(float) * n), *r = rand_buf(n, 1);
    gate[0] = -100.0f; /* saturated sigmoid stays finite */
    gate[1] = 100.0f;
    swiglu_forward(h, gate, up, T, I);
    for (size_t i = 0; i < n; i++) {
        double z = gate[i], ref = z / (1.0 + exp(-z)) * up[i];
        cr_expect(fabs(h[i] - ref) <= 1e-6 * (1 + fabs(ref)), "h[%zu] = %g vs %g", i, h[i], ref);
    }
    float *dg = rand_buf(n, 1), *du = rand_buf(n, 1), *dg0 = copy_buf(dg, n), *du0 = copy_buf(du, n);
    swiglu_backward(dg, du, r, gate, up, T, I);
    for (size_t i = 0; i < n; i++) {
        /* elementwise, so the finite difference of L = Σ r h is per element */
        double z = gate[i], u = up[i], hz = 1e-3;
        double fdg = r[i] * ((z + hz) / (1 + exp(-(z + hz))) - (z - hz) / (1 + exp(-(z - hz)))) * u / (2 * hz);
        double fdu = r[i] * z / (1 + exp(-z));
        cr_expect(fabs((dg[i] - dg0[i]) - fdg) < 1e-4 * (1 + fabs(fdg)), "dgate[%zu] %g vs %g", i, dg[i] - dg0[i],
                  fdg);
        cr_expect(fabs((du[i] - du0[i]) - fdu) < 1e-5 * (1 + fabs(fdu)), "dup[%zu]", i);
        cr_expect(isfinite(dg[i]) && isfinite(du[i]));
    }
    free(gate);
    free(up);
    free(h);
    free(r);
    free(dg);
    free(du);
    free(dg0);
    free(du0);
}

/* ---------------------------------------------------------------------------------------------------------- */
/* Embedding                                                                                                  */
/* ---------------------------------------------------------------------------------------------------------- */

Test(embedding, forward_and_backward_with_repeated_ids) {
    rng_seed(30);
    int V = 11, C = 133, T = 300;
    int32_t *ids = malloc(sizeof(int32_t) * T);
    for (int t = 0; t < T; t++) ids[t] = (int32_t)(rng_u32() % 4); /* heavy repetition */
    ids[5] = 10;
    float *table = rand_buf((size_t)V * C, 1), *out = malloc(sizeof(float) * T * C), *dout = rand_buf((size_t)T * C, 1);
    embedding_forward(out, ids, table, T, C);
    for (int t = 0; t < T; t++) cr_expect(bits_equal(out + (size_t)t * C, table + (size_t)ids[t] * C, (size_t)C));
    float *d0 = rand_buf((size_t)V * C, 1), *ref = copy_buf(d0, (size_t)V * C);
    for (int t = 0; t < T; t++)
        for (int c = 0; c < C; c++) ref[(size_t)ids[t] * C + c] += dout[(size_t)t * C + c];
    for (int nth = 1; nth <= 3; nth++) {
        omp_set_num_threads(nth);
        float *d = copy_buf(d0, (size_t)V * C);
        embedding_backward(d, dout, ids, T, C);
        cr_expect(bits_equal(d, ref, (size_t)V * C), "threads %d: dtable differs from the in-order sum", nth);
        free(d);
    }
    omp_set_num_threads(2);
    /* rows never referenced are untouched */
    for (int c = 0; c < C; c++) cr_expect(ref[(size_t)7 * C + c] == d0[(size_t)7 * C + c]);
    free(ids);
    free(table);
    free(out);
    free(dout);
    free(d0);
    free(ref);
}

/* ---------------------------------------------------------------------------------------------------------- */
/* Softmax cross-entropy, logsumexp, log-probs                                                                */
/* ---------------------------------------------------------------------------------------------------------- */

static double lse_d(const float *x, int V) {
    double m = x[0], s = 0.0;
    for (int v = 1; v < V; v++) m = x[v] > m ? x[v] : m;
    for (int v = 0; v < V; v++) s += exp((double)x[v] - m);
    return m + log(s);
}

Test(xent, logsumexp_matches_double_reference) {
    rng_seed(40);
    static const int Vs[] = {1, 2, 3, 17, 129, 1000, 129280};
    for (size_t k = 0; k < sizeof Vs / sizeof Vs[0]; k++) {
        int V = Vs[k];
        float *x = rand_buf((size_t)V, 20);
        double ref = lse_d(x, V);
        float got = logsumexp_row(x, V);
        cr_expect(fabs(got - ref) < 2e-6 * (1 + fabs(ref)), "V %d: %g vs %g", V, got, ref);
        free(x);
    }
    float big[3] = {1e4f, -1e4f, 1e4f};
    cr_expect(fabs(logsumexp_row(big, 3) - (1e4 + log(2.0))) < 1e-3);
    float neg[2] = {-INFINITY, -INFINITY};
    cr_expect(logsumexp_row(neg, 2) == -INFINITY);
    float mixed[3] = {-INFINITY, 0.0f, -INFINITY};
    cr_expect(logsumexp_row(mixed, 3) == 0.0f);
    float nan_[3] = {0.0f, NAN, 1.0f};
    cr_expect(isnan(logsumexp_row(nan_, 3)));
}

Test(xent, loss_and_gradient_match_double_reference) {
    rng_seed(41);
    static const int sh[][2] = {{1, 1}, {3, 17}, {4, 129}, {2, 5000}};
    for (size_t s = 0; s < sizeof sh / sizeof sh[0]; s++) {
        int T = sh[s][0], V = sh[s][1];
        float *lg = rand_buf((size_t)T * V, 8), *d = malloc(sizeof(float) * T * V), *loss = malloc(sizeof(float) * T);
        int32_t *tg = malloc(sizeof(int32_t) * T);
        for (int t = 0; t < T; t++) tg[t] = (int32_t)(rng_u32() % (uint32_t)V);
        double tot = xent_forward_backward(loss, d, lg, tg, NULL, T, V);
        double rtot = 0.0;
        for (int t = 0; t < T; t++) {
            double lse = lse_d(lg + (size_t)t * V, V), rl = lse - lg[(size_t)t * V + tg[t]];
            rtot += rl;
            cr_expect(fabs(loss[t] - rl) < 2e-6 * (1 + fabs(rl)), "T %d V %d row %d loss %g vs %g", T, V, t, loss[t],
                      rl);
            for (int v = 0; v < V; v++) {
                double p = exp(lg[(size_t)t * V + v] - lse) - (v == tg[t]);
                cr_expect(fabs(d[(size_t)t * V + v] - p) < 1e-6, "T %d V %d d[%d][%d] %g vs %g", T, V, t, v,
                          d[(size_t)t * V + v], p);
            }
        }
        cr_expect(fabs(tot - rtot) < 1e-5 * (1 + fabs(rtot)));
        free(lg);
        free(d);
        free(loss);
        free(tg);
    }
}

/* Finite differences of L = Σ_t scale[t] * loss[t] (double reference) against dlogits. */
Test(xent, finite_differences_with_scale_and_ignored_rows) {
    rng_seed(42);
    int T = 4, V = 9;
    float *lg = rand_buf((size_t)T * V, 3), *d = malloc(sizeof(float) * T * V);
    int32_t tg[4] = {2, -1, 8, 0};
    float sc[4] = {0.5f, 3.0f, 2.0f, -1.0f};
    xent_forward_backward(NULL, d, lg, tg, sc, T, V);
    for (int k = 0; k < T * V; k++) {
        float keep = lg[k], h = 1e-2f;
        double L[2];
        for (int sgn = 0; sgn < 2; sgn++) {
            lg[k] = keep + (sgn ? -h : h);
            L[sgn] = 0.0;
            for (int t = 0; t < T; t++)
                if (tg[t] >= 0) L[sgn] += sc[t] * (lse_d(lg + t * V, V) - lg[t * V + tg[t]]);
        }
        lg[k] = keep;
        double fd = (L[0] - L[1]) / ((double)(keep + h) - (double)(keep - h));
        cr_expect(fabs(fd - d[k]) < 1e-4 * (1 + fabs(fd)), "d[%d] fd %g vs %g", k, fd, d[k]);
    }
    for (int v = 0; v < V; v++) cr_expect(d[V + v] == 0.0f, "ignored row has gradient");
    free(lg);
    free(d);
}

Test(xent, ignored_rows_scale_total_and_in_place) {
    rng_seed(43);
    int T = 5, V = 33;
    float *lg = rand_buf((size_t)T * V, 4), *d = malloc(sizeof(float) * T * V), *loss = malloc(sizeof(float) * T);
    int32_t tg[5] = {-1, 3, 32, -5, 0};
    float sc[5] = {1.0f, 0.25f, 1.0f, 1.0f, 2.0f};
    double tot = xent_forward_backward(loss, d, lg, tg, sc, T, V);
    cr_expect(loss[0] == 0.0f && loss[3] == 0.0f);
    cr_expect(loss[1] > 0.0f && loss[2] > 0.0f && loss[4] > 0.0f);
    cr_expect(tot == (double)loss[1] + (double)loss[2] + (double)loss[4], "total %g", tot);
    float *d1 = malloc(sizeof(float) * T * V);
    xent_forward_backward(NULL, d1, lg, tg, NULL, T, V); /* scale NULL = 1 */
    for (int v = 0; v < V; v++) {
        cr_expect(d[v] == 0.0f && d[3 * V + v] == 0.0f);
        cr_expect(d[V + v] == 0.25f * d1[V + v]);
        cr_expect(d[4 * V + v] == 2.0f * d1[4 * V + v]);
    }
    /* each used row's gradient sums to ~0 (softmax minus one-hot) */
    double rs = 0.0;
    for (int v = 0; v < V; v++) rs += d1[2 * V + v];
    cr_expect(fabs(rs) < 1e-5);
    /* dlogits aliasing logits: same values */
    float *inplace = copy_buf(lg, (size_t)T * V), *loss2 = malloc(sizeof(float) * T);
    double tot2 = xent_forward_backward(loss2, inplace, inplace, tg, sc, T, V);
    cr_expect(bits_equal(inplace, d, (size_t)T * V));
    cr_expect(bits_equal(loss, loss2, (size_t)T) && tot == tot2);
    free(lg);
    free(d);
    free(d1);
    free(loss);
    free(loss2);
    free(inplace);
}

Test(xent, huge_logits_stay_finite) {
    int T = 2, V = 1000;
    float *lg = calloc((size_t)T * V, sizeof(float)), *d = malloc(sizeof(float) * T * V), loss[2];
    lg[7] = 1e4f;                     /* row 0: target is the dominant logit */
    lg[V + 3] = 1e4f, lg[V + 4] = -1e4f; /* row 1: target far below the max */
    int32_t tg[2] = {7, 4};
    double tot = xent_forward_backward(loss, d, lg, tg, NULL, T, V);
    cr_expect(isfinite(tot) && isfinite(loss[0]) && isfinite(loss[1]));
    cr_expect(fabs(loss[0]) < 1e-6, "loss0 %g", loss[0]);
    cr_expect(fabs(loss[1] - 2e4f) < 1.0f, "loss1 %g", loss[1]);
    for (int k = 0; k < T * V; k++) cr_expect(isfinite(d[k]));
    cr_expect(fabs(d[7] - 0.0f) < 1e-6 && fabs(d[V + 3] - 1.0f) < 1e-6 && d[V + 4] == -1.0f);
    free(lg);
    free(d);
}

/* logprob == -loss bit for bit; rows are independent of T and thread count; V = 129280 without scratch. */
Test(xent, logprob_equals_minus_loss_and_is_batch_invariant) {
    rng_seed(44);
    int T = 6, V = 129280;
    float *lg = rand_buf((size_t)T * V, 10), lp[6], lp1, loss[6];
    int32_t ids[6];
    for (int t = 0; t < T; t++) ids[t] = (int32_t)(rng_u32() % (uint32_t)V);
    ids[2] = -1;
    omp_set_num_threads(2);
    logprob_forward(lp, lg, ids, T, V);
    xent_forward_backward(loss, NULL, lg, ids, NULL, T, V);
    cr_expect(lp[2] == 0.0f);
    for (int t = 0; t < T; t++) {
        cr_expect(lp[t] == -loss[t], "row %d: %g vs %g", t, lp[t], -loss[t]);
        if (ids[t] >= 0) {
            double ref = lg[(size_t)t * V + ids[t]] - lse_d(lg + (size_t)t * V, V);
            cr_expect(fabs(lp[t] - ref) < 2e-6 * (1 + fabs(ref)));
        }
        omp_set_num_threads(1);
        logprob_forward(&lp1, lg + (size_t)t * V, ids + t, 1, V);
        omp_set_num_threads(2);
        cr_expect(bits_equal(&lp1, &lp[t], 1), "row %d alone differs", t);
    }
    free(lg);
}

/* matmul_forward_batch: the same bits as one matmul_forward per job, whether it takes the one-region path (few
 * rows, enough work: the w rows of every job are cut into chunks spread over the threads) or falls back (a job
 * with many rows), with beta 0 and 1, ragged sizes, on 1 to 3 threads. */
Test(matmul, forward_batch_equals_one_call_per_job) {
    enum { NJ = 5 };
    static const int Ts[2][NJ] = {{1, 3, 1, 8, 2}, {1, 3, 20, 8, 2}};
    static const int ins[NJ] = {512, 100, 257, 64, 33}, outs[NJ] = {300, 129, 1000, 7, 515};
    rng_seed(77);
    for (int v = 0; v < 2; v++) {
        mm_job jobs[NJ];
        float *ref[NJ];
        for (int j = 0; j < NJ; j++) {
            const int T = Ts[v][j];
            jobs[j] = (mm_job){rand_buf((size_t)T * outs[j], 1.0f), rand_buf((size_t)T * ins[j], 1.0f),
                               rand_buf((size_t)outs[j] * ins[j], 1.0f), T, ins[j], outs[j], (float)(j & 1)};
            ref[j] = copy_buf(jobs[j].y, (size_t)T * outs[j]);
            matmul_forward(ref[j], jobs[j].x, jobs[j].w, T, ins[j], outs[j], jobs[j].beta, MM_DET);
        }
        const int saved = omp_get_max_threads();
        for (int th = 1; th <= 3; th++) {
            mm_job run[NJ];
            for (int j = 0; j < NJ; j++) {
                run[j] = jobs[j];
                run[j].y = copy_buf(jobs[j].y, (size_t)jobs[j].T * outs[j]);
            }
            omp_set_num_threads(th);
            matmul_forward_batch(run, NJ, MM_DET);
            omp_set_num_threads(saved);
            for (int j = 0; j < NJ; j++) {
                cr_expect(memcmp(run[j].y, ref[j], sizeof(float) * (size_t)jobs[j].T * outs[j]) == 0,
                          "variant %d, %d threads: job %d differs from its own matmul_forward", v, th, j);
                free(run[j].y);
            }
        }
        for (int j = 0; j < NJ; j++) free(jobs[j].y), free((void *)jobs[j].x), free((void *)jobs[j].w), free(ref[j]);
    }
}
