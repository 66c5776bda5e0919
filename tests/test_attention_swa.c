/* test_attention_swa.c: sliding-window attention with average-pooled K/V compression (attention_swa.h) against a
 * naive double reference that builds each row's explicit key list, the exact-attention special cases (W >= T,
 * r = 1) against attention_forward/backward, the dropped partial block, finite-difference gradients on every
 * element, thread-count independence, batch invariance, document masking, accumulation, and the error paths. */
#include <criterion/criterion.h>
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "core/mem.h"
#include "core/rng.h"
#include "kernels/cpu/attention.h"
#include "kernels/cpu/attention_swa.h"

static float *randn(size_t n, uint64_t seed, uint64_t stream, float std) {
    float *x = malloc(n * sizeof *x);
    cr_assert(x);
    rng_fill_normal(x, n, 0.0f, std, seed, stream);
    return x;
}

static double *to_double(const float *x, size_t n) {
    double *y = malloc(n * sizeof *y);
    cr_assert(y);
    for (size_t i = 0; i < n; i++) y[i] = x[i];
    return y;
}

/* Packed documents of lengths 5, 64, 1, rest: doc[t] = first token of t's document. */
static void make_docs(int32_t *doc, int T) {
    static const int lens[] = {5, 64, 1};
    int t = 0, start = 0;
    for (size_t d = 0; d < sizeof lens / sizeof lens[0] && t < T; d++) {
        for (int n = 0; n < lens[d] && t < T; n++) doc[t++] = start;
        start = t;
    }
    while (t < T) doc[t++] = start;
}

/* Naive reference in double. For each row it lists its keys explicitly: every block [s + b·r, s + (b+1)·r − 1]
 * whose last token is before the window start, as (mean key, mean value), then each window token. */
static void ref_forward(double *out, double *lse, const double *q, const double *k, const double *v,
                        const int32_t *doc, int T, int H, int dqk, int dv, double scale, int W, int r) {
    double *kl = malloc((size_t)T * dqk * sizeof *kl), *vl = malloc((size_t)T * dv * sizeof *vl);
    double *s = malloc((size_t)T * sizeof *s);
    for (int t = 0; t < T; t++)
        for (int h = 0; h < H; h++) {
            int st = doc ? doc[t] : 0, w0 = t - W + 1 < st ? st : t - W + 1, n = 0;
            for (int b = 0; st + (b + 1) * r - 1 < w0; b++, n++) {
                for (int c = 0; c < dqk; c++) kl[(size_t)n * dqk + c] = 0.0;
                for (int c = 0; c < dv; c++) vl[(size_t)n * dv + c] = 0.0;
                for (int j = st + b * r; j < st + (b + 1) * r; j++) {
                    cr_assert(j < w0 && j <= t);
                    for (int c = 0; c < dqk; c++) kl[(size_t)n * dqk + c] += k[((size_t)j * H + h) * dqk + c] / r;
                    for (int c = 0; c < dv; c++) vl[(size_t)n * dv + c] += v[((size_t)j * H + h) * dv + c] / r;
                }
            }
            for (int j = w0; j <= t; j++, n++) {
                memcpy(kl + (size_t)n * dqk, k + ((size_t)j * H + h) * dqk, (size_t)dqk * sizeof *kl);
                memcpy(vl + (size_t)n * dv, v + ((size_t)j * H + h) * dv, (size_t)dv * sizeof *vl);
            }
            const double *qi = q + ((size_t)t * H + h) * dqk;
            double m = -INFINITY, l = 0.0;
            for (int a = 0; a < n; a++) {
                double d = 0.0;
                for (int c = 0; c < dqk; c++) d += qi[c] * kl[(size_t)a * dqk + c];
                s[a] = d * scale;
                if (s[a] > m) m = s[a];
            }
            for (int a = 0; a < n; a++) l += exp(s[a] - m);
            double *o = out + ((size_t)t * H + h) * dv;
            for (int c = 0; c < dv; c++) o[c] = 0.0;
            for (int a = 0; a < n; a++)
                for (int c = 0; c < dv; c++) o[c] += exp(s[a] - m) / l * vl[(size_t)a * dv + c];
            if (lse) lse[(size_t)t * H + h] = m + log(l);
        }
    free(kl), free(vl), free(s);
}

typedef struct {
    int W, r, T;
    int docs; /* use make_docs */
} swa_case;

static void run_fwd(float *out, float *lse, const float *q, const float *k, const float *v, const int32_t *doc,
                    int T, int H, int dqk, int dv, float scale, int W, int r) {
    mr_err e = {0};
    cr_assert_eq(attention_swa_forward(out, lse, q, k, v, doc, T, H, dqk, dv, scale, W, r, &e), 0, "%s", e.msg);
}

static void run_bwd(float *gq, float *gk, float *gv, const float *w, const float *out, const float *lse,
                    const float *q, const float *k, const float *v, const int32_t *doc, int T, int H, int dqk, int dv,
                    float scale, int W, int r) {
    mr_err e = {0};
    cr_assert_eq(attention_swa_backward(gq, gk, gv, w, out, lse, q, k, v, doc, T, H, dqk, dv, scale, W, r, &e), 0,
                 "%s", e.msg);
}

/* W = 1, r = 1 and r > T are the edge cases; T = 150 with W = 70, r = 2 makes lists longer than one chunk of
 * ATTN_BLOCK (pooled and exact keys in the same chunk); doc cases align blocks to each document's start. */
static const swa_case CASES[] = {
    {1, 1, 40, 0}, {1, 1, 40, 1}, {3, 4, 40, 0}, {5, 2, 40, 1},   {1, 3, 40, 0},  {4, 50, 40, 0},
    {2, 7, 40, 1}, {8, 3, 40, 0}, {70, 2, 150, 0}, {3, 1, 150, 1}, {9, 5, 150, 1}, {40, 6, 40, 0},
};

Test(attention_swa, forward_matches_explicit_key_list_reference) {
    enum { H = 2, DQK = 20, DV = 7 };
    for (size_t c = 0; c < sizeof CASES / sizeof CASES[0]; c++) {
        int T = CASES[c].T, W = CASES[c].W, r = CASES[c].r;
        int32_t doc[150];
        make_docs(doc, T);
        const int32_t *d = CASES[c].docs ? doc : NULL;
        size_t nq = (size_t)T * H * DQK, nv = (size_t)T * H * DV;
        float *q = randn(nq, 11, c, 1.0f), *k = randn(nq, 12, c, 1.0f), *v = randn(nv, 13, c, 1.0f);
        float *out = malloc(nv * 4), *lse = malloc((size_t)T * H * 4);
        double *Q = to_double(q, nq), *K = to_double(k, nq), *V = to_double(v, nv);
        double *ro = malloc(nv * 8), *rl = malloc((size_t)T * H * 8);
        run_fwd(out, lse, q, k, v, d, T, H, DQK, DV, 0.4f, W, r);
        ref_forward(ro, rl, Q, K, V, d, T, H, DQK, DV, 0.4f, W, r);
        double eo = 0.0, el = 0.0;
        for (size_t i = 0; i < nv; i++) eo = fmax(eo, fabs(out[i] - ro[i]));
        for (size_t i = 0; i < (size_t)T * H; i++) el = fmax(el, fabs(lse[i] - rl[i]));
        cr_expect(eo < 3e-6, "W=%d r=%d T=%d docs=%d: max |out - ref| = %.3g", W, r, T, CASES[c].docs, eo);
        cr_expect(el < 3e-6, "W=%d r=%d T=%d docs=%d: max |lse - ref| = %.3g", W, r, T, CASES[c].docs, el);
        free(q), free(k), free(v), free(out), free(lse), free(Q), free(K), free(V), free(ro), free(rl);
    }
}

/* The compression must actually happen: with W < T and r > 1 the result is far from exact attention. */
Test(attention_swa, compressed_differs_from_exact) {
    enum { T = 40, H = 2, DQK = 8, DV = 8 };
    size_t nq = (size_t)T * H * DQK, nv = (size_t)T * H * DV;
    float *q = randn(nq, 14, 1, 1.0f), *k = randn(nq, 14, 2, 1.0f), *v = randn(nv, 14, 3, 1.0f);
    float *o1 = malloc(nv * 4), *l1 = malloc(T * H * 4), *o2 = malloc(nv * 4), *l2 = malloc(T * H * 4);
    attention_forward(o1, l1, q, k, v, NULL, T, H, DQK, DV, 0.5f);
    run_fwd(o2, l2, q, k, v, NULL, T, H, DQK, DV, 0.5f, 4, 4);
    double e = 0.0;
    for (size_t i = 0; i < nv; i++) e = fmax(e, fabs(o1[i] - o2[i]));
    cr_expect(e > 0.05, "W=4 r=4 is indistinguishable from exact attention (max diff %.3g)", e);
    /* rows whose document fits their window (t < W) are exact attention's rows */
    e = 0.0;
    for (size_t i = 0; i < (size_t)4 * H * DV; i++) e = fmax(e, fabs(o1[i] - o2[i]));
    cr_expect(e < 1e-6, "rows 0..3 should be exact attention, diff %.3g", e);
    free(q), free(k), free(v), free(o1), free(l1), free(o2), free(l2);
}

/* W >= T (any r) and r = 1 (any W) are exact causal attention: the key list is [s, t] in order (for r = 1 each
 * older token is its own block and the mean of one key is the key itself). Forward and backward are compared to
 * attention.h's kernels; the two SWA forms, whose lists are identical, must agree bit for bit. */
Test(attention_swa, exact_attention_special_cases) {
    enum { T = 150, H = 2, DQK = 24, DV = 12 };
    int32_t doc[T];
    make_docs(doc, T);
    size_t nq = (size_t)T * H * DQK, nv = (size_t)T * H * DV;
    float *q = randn(nq, 15, 1, 1.0f), *k = randn(nq, 15, 2, 1.0f), *v = randn(nv, 15, 3, 1.0f);
    float *w = randn(nv, 15, 4, 1.0f);
    float *ro = malloc(nv * 4), *rl = malloc(T * H * 4), *rq = calloc(nq, 4), *rk = calloc(nq, 4);
    float *rv = calloc(nv, 4), *so = malloc(nv * 4), *sl = malloc(T * H * 4), *sq = malloc(nq * 4);
    float *sk = malloc(nq * 4), *sv = malloc(nv * 4);
    float *bo = malloc(nv * 4), *bl = malloc(T * H * 4);
    static const int Wr[][2] = {{T, 1}, {T, 3}, {1000000, 200}, {1, 1}, {5, 1}, {64, 1}};
    for (int withdoc = 0; withdoc < 2; withdoc++) {
        const int32_t *d = withdoc ? doc : NULL;
        memset(rq, 0, nq * 4), memset(rk, 0, nq * 4), memset(rv, 0, nv * 4);
        attention_forward(ro, rl, q, k, v, d, T, H, DQK, DV, 0.3f);
        attention_backward(rq, rk, rv, w, ro, rl, q, k, v, d, T, H, DQK, DV, 0.3f);
        run_fwd(bo, bl, q, k, v, d, T, H, DQK, DV, 0.3f, T, 2);
        for (size_t c = 0; c < sizeof Wr / sizeof Wr[0]; c++) {
            int W = Wr[c][0], r = Wr[c][1];
            memset(sq, 0, nq * 4), memset(sk, 0, nq * 4), memset(sv, 0, nv * 4);
            run_fwd(so, sl, q, k, v, d, T, H, DQK, DV, 0.3f, W, r);
            run_bwd(sq, sk, sv, w, so, sl, q, k, v, d, T, H, DQK, DV, 0.3f, W, r);
            cr_expect(memcmp(so, bo, nv * 4) == 0 && memcmp(sl, bl, (size_t)T * H * 4) == 0,
                      "doc=%d W=%d r=%d: forward differs bitwise from W=T", withdoc, W, r);
            double e[5] = {0};
            for (size_t i = 0; i < nv; i++) e[0] = fmax(e[0], fabs(so[i] - ro[i]));
            for (size_t i = 0; i < (size_t)T * H; i++) e[1] = fmax(e[1], fabs(sl[i] - rl[i]));
            for (size_t i = 0; i < nq; i++) e[2] = fmax(e[2], fabs(sq[i] - rq[i]));
            for (size_t i = 0; i < nq; i++) e[3] = fmax(e[3], fabs(sk[i] - rk[i]));
            for (size_t i = 0; i < nv; i++) e[4] = fmax(e[4], fabs(sv[i] - rv[i]));
            for (int a = 0; a < 5; a++)
                cr_expect(e[a] < 2e-6, "doc=%d W=%d r=%d: array %d (out lse dq dk dv) differs from exact by %.3g",
                          withdoc, W, r, a, e[a]);
        }
    }
    free(q), free(k), free(v), free(w), free(ro), free(rl), free(rq), free(rk), free(rv);
    free(so), free(sl), free(sq), free(sk), free(sv), free(bo), free(bl);
}

/* The definition's partial block: W = 4, r = 3, no documents. Row 13 has window [10, 13] and blocks [0-2] [3-5]
 * [6-8]; token 9 (block [9-11] straddles the window) is dropped for rows 13 and 14 and back, pooled, for row 15.
 * Token 16 is after rows 13..15: causality. */
Test(attention_swa, dropped_partial_block_and_causality) {
    enum { T = 20, H = 1, DQK = 8, DV = 6 };
    size_t nq = (size_t)T * H * DQK, nv = (size_t)T * H * DV;
    float *q = randn(nq, 16, 1, 1.0f), *k = randn(nq, 16, 2, 1.0f), *v = randn(nv, 16, 3, 1.0f);
    float *o1 = malloc(nv * 4), *l1 = malloc(T * 4), *o2 = malloc(nv * 4), *l2 = malloc(T * 4);
    run_fwd(o1, l1, q, k, v, NULL, T, H, DQK, DV, 0.5f, 4, 3);
    for (int c = 0; c < DQK; c++) k[9 * DQK + c] += 1.0f;
    for (int c = 0; c < DV; c++) v[9 * DV + c] -= 2.0f;
    for (int c = 0; c < DQK; c++) k[16 * DQK + c] += 1.0f;
    run_fwd(o2, l2, q, k, v, NULL, T, H, DQK, DV, 0.5f, 4, 3);
    cr_expect(memcmp(o1, o2, 9 * DV * 4) == 0, "rows 0..8 must not see token 9");
    for (int t = 9; t <= 12; t++)
        cr_expect(memcmp(o1 + t * DV, o2 + t * DV, DV * 4) != 0, "row %d: token 9 in window", t);
    for (int t = 13; t <= 14; t++)
        cr_expect(memcmp(o1 + t * DV, o2 + t * DV, DV * 4) == 0 && l1[t] == l2[t], "row %d: token 9 must be dropped",
                  t);
    cr_expect(memcmp(o1 + 15 * DV, o2 + 15 * DV, DV * 4) != 0, "row 15: block [9-11] pooled");
    free(q), free(k), free(v), free(o1), free(l1), free(o2), free(l2);
}

/* loss = Σ w · out, in double */
static double ref_loss(const double *w, const double *q, const double *k, const double *v, const int32_t *doc, int T,
                       int H, int dqk, int dv, double scale, int W, int r) {
    size_t no = (size_t)T * H * dv;
    double *out = malloc(no * sizeof *out), L = 0.0;
    ref_forward(out, NULL, q, k, v, doc, T, H, dqk, dv, scale, W, r);
    for (size_t i = 0; i < no; i++) L += w[i] * out[i];
    free(out);
    return L;
}

/* Kernel gradients against central differences of the double reference on EVERY element of q, k, v. The error
 * bound is relative to the largest gradient of the array, per element: a wrong 1/r or a missing pooled term
 * is an O(1) relative error. */
static void check_gradients(int T, int W, int r, int docs, float scale) {
    enum { H = 2, DQK = 6, DV = 5 };
    int32_t doc[64];
    make_docs(doc, T);
    const int32_t *d = docs ? doc : NULL;
    size_t nq = (size_t)T * H * DQK, nv = (size_t)T * H * DV;
    uint64_t seed = 100 + (uint64_t)(W * 1000 + r);
    float *q = randn(nq, seed, 1, 1.0f), *k = randn(nq, seed, 2, 1.0f), *v = randn(nv, seed, 3, 1.0f);
    float *w = randn(nv, seed, 4, 1.0f);
    float *out = malloc(nv * 4), *lse = malloc((size_t)T * H * 4);
    float *gq = calloc(nq, 4), *gk = calloc(nq, 4), *gv = calloc(nv, 4);
    run_fwd(out, lse, q, k, v, d, T, H, DQK, DV, scale, W, r);
    run_bwd(gq, gk, gv, w, out, lse, q, k, v, d, T, H, DQK, DV, scale, W, r);
    double *Q = to_double(q, nq), *K = to_double(k, nq), *V = to_double(v, nv), *Wd = to_double(w, nv);
    struct { double *x; const float *g; size_t n; const char *name; } t[3] = {
        {Q, gq, nq, "dq"}, {K, gk, nq, "dk"}, {V, gv, nv, "dv"}};
    const double eps = 1e-5;
    for (int a = 0; a < 3; a++) {
        double *fd = malloc(t[a].n * sizeof *fd), mag = 0.0, err = 0.0;
        size_t worst = 0;
        for (size_t i = 0; i < t[a].n; i++) {
            double x0 = t[a].x[i];
            t[a].x[i] = x0 + eps;
            double lp = ref_loss(Wd, Q, K, V, d, T, H, DQK, DV, scale, W, r);
            t[a].x[i] = x0 - eps;
            double lm = ref_loss(Wd, Q, K, V, d, T, H, DQK, DV, scale, W, r);
            t[a].x[i] = x0;
            fd[i] = (lp - lm) / (2 * eps);
            mag = fmax(mag, fabs(fd[i]));
        }
        for (size_t i = 0; i < t[a].n; i++)
            if (fabs(fd[i] - t[a].g[i]) > err) err = fabs(fd[i] - t[a].g[i]), worst = i;
        cr_expect(mag > 1e-3, "W=%d r=%d: %s is all zero", W, r, t[a].name);
        cr_expect(err < 1e-4 * mag, "T=%d W=%d r=%d docs=%d: %s[%zu]: FD %.9g kernel %.9g (max |g| %.3g)", T, W, r,
                  docs, t[a].name, worst, fd[worst], t[a].g[worst], mag);
        free(fd);
    }
    free(q), free(k), free(v), free(w), free(out), free(lse), free(gq), free(gk), free(gv);
    free(Q), free(K), free(V), free(Wd);
}

Test(attention_swa, gradients_finite_differences) {
    check_gradients(24, 3, 4, 0, 0.5f);
    check_gradients(24, 1, 2, 0, 0.5f);
    check_gradients(24, 2, 3, 1, 0.7f); /* documents 0..4, 5..23 */
    check_gradients(24, 1, 1, 0, 0.5f);
    check_gradients(24, 5, 30, 0, 0.5f); /* r > T: pure sliding window */
}

/* Backward accumulates (+=); a NULL gradient skips only that gradient. */
Test(attention_swa, backward_accumulates_and_null_grads) {
    enum { T = 70, H = 2, DQK = 8, DV = 8, W = 6, R = 4 };
    size_t nq = (size_t)T * H * DQK, nv = (size_t)T * H * DV;
    float *q = randn(nq, 17, 1, 1.0f), *k = randn(nq, 17, 2, 1.0f), *v = randn(nv, 17, 3, 1.0f);
    float *w = randn(nv, 17, 4, 1.0f), *out = malloc(nv * 4), *lse = malloc(T * H * 4);
    float *gq = calloc(nq, 4), *gk = calloc(nq, 4), *gv = calloc(nv, 4);
    float *aq = randn(nq, 17, 5, 1.0f), *ak = randn(nq, 17, 6, 1.0f), *av = randn(nv, 17, 7, 1.0f);
    float *bq = malloc(nq * 4), *bk = malloc(nq * 4), *bv = malloc(nv * 4);
    memcpy(bq, aq, nq * 4), memcpy(bk, ak, nq * 4), memcpy(bv, av, nv * 4);
    run_fwd(out, lse, q, k, v, NULL, T, H, DQK, DV, 0.5f, W, R);
    run_bwd(gq, gk, gv, w, out, lse, q, k, v, NULL, T, H, DQK, DV, 0.5f, W, R);
    run_bwd(aq, ak, av, w, out, lse, q, k, v, NULL, T, H, DQK, DV, 0.5f, W, R);
    double e = 0.0;
    for (size_t i = 0; i < nq; i++) e = fmax(e, fabs(aq[i] - (bq[i] + gq[i])) + fabs(ak[i] - (bk[i] + gk[i])));
    for (size_t i = 0; i < nv; i++) e = fmax(e, fabs(av[i] - (bv[i] + gv[i])));
    cr_expect(e < 1e-5, "accumulation error %.3g", e);
    float *nq_ = calloc(nq, 4), *nv_ = calloc(nv, 4), *nk_ = calloc(nq, 4);
    run_bwd(nq_, NULL, nv_, w, out, lse, q, k, v, NULL, T, H, DQK, DV, 0.5f, W, R);
    cr_expect(memcmp(nq_, gq, nq * 4) == 0 && memcmp(nv_, gv, nv * 4) == 0, "NULL dk changed dq or dv");
    run_bwd(NULL, nk_, NULL, w, out, lse, q, k, v, NULL, T, H, DQK, DV, 0.5f, W, R);
    cr_expect(memcmp(nk_, gk, nq * 4) == 0, "NULL dq/dv changed dk");
    run_bwd(NULL, NULL, NULL, w, out, lse, q, k, v, NULL, T, H, DQK, DV, 0.5f, W, R);
    free(q), free(k), free(v), free(w), free(out), free(lse), free(gq), free(gk), free(gv);
    free(aq), free(ak), free(av), free(bq), free(bk), free(bv), free(nq_), free(nv_), free(nk_);
}

/* Forward and backward give the same bits with 1, 2 and 3 threads. */
Test(attention_swa, thread_count_independent) {
    enum { T = 200, H = 3, DQK = 16, DV = 8 };
    size_t nq = (size_t)T * H * DQK, nv = (size_t)T * H * DV;
    float *q = randn(nq, 18, 1, 1.0f), *k = randn(nq, 18, 2, 1.0f), *v = randn(nv, 18, 3, 1.0f);
    float *w = randn(nv, 18, 4, 1.0f);
    int32_t doc[T];
    make_docs(doc, T);
    float *res[3][5];
    int saved = omp_get_max_threads();
    for (int n = 0; n < 3; n++) {
        omp_set_num_threads(n + 1);
        float *out = malloc(nv * 4), *lse = malloc(T * H * 4), *gq = calloc(nq, 4), *gk = calloc(nq, 4),
              *gv = calloc(nv, 4);
        run_fwd(out, lse, q, k, v, doc, T, H, DQK, DV, 0.3f, 20, 4);
        run_bwd(gq, gk, gv, w, out, lse, q, k, v, doc, T, H, DQK, DV, 0.3f, 20, 4);
        res[n][0] = out, res[n][1] = lse, res[n][2] = gq, res[n][3] = gk, res[n][4] = gv;
    }
    omp_set_num_threads(saved);
    size_t sz[5] = {nv, (size_t)T * H, nq, nq, nv};
    for (int n = 1; n < 3; n++)
        for (int a = 0; a < 5; a++)
            cr_expect(memcmp(res[n][a], res[0][a], sz[a] * 4) == 0, "array %d differs with %d threads", a, n + 1);
    for (int n = 0; n < 3; n++)
        for (int a = 0; a < 5; a++) free(res[n][a]);
    free(q), free(k), free(v), free(w);
}

/* Row t of a T-batch == the last row of the (t+1)-prefix, bitwise, around block, window and chunk boundaries. */
Test(attention_swa, batch_invariance_prefix_rows_bitwise) {
    enum { T = 150, H = 2, DQK = 24, DV = 16 };
    size_t nq = (size_t)T * H * DQK, nv = (size_t)T * H * DV;
    float *q = randn(nq, 19, 1, 1.0f), *k = randn(nq, 19, 2, 1.0f), *v = randn(nv, 19, 3, 1.0f);
    float *out = malloc(nv * 4), *lse = malloc(T * H * 4), *o2 = malloc(nv * 4), *l2 = malloc(T * H * 4);
    int32_t doc[T];
    make_docs(doc, T);
    static const int rows[] = {0, 1, 4, 5, 9, 10, 11, 12, 63, 64, 65, 68, 69, 70, 127, 128, 133, 134, 149};
    static const int Wr[][2] = {{10, 3}, {70, 2}, {1, 5}};
    for (size_t c = 0; c < sizeof Wr / sizeof Wr[0]; c++)
        for (int withdoc = 0; withdoc < 2; withdoc++) {
            const int32_t *d = withdoc ? doc : NULL;
            run_fwd(out, lse, q, k, v, d, T, H, DQK, DV, 0.35f, Wr[c][0], Wr[c][1]);
            for (size_t r = 0; r < sizeof rows / sizeof rows[0]; r++) {
                int t = rows[r];
                run_fwd(o2, l2, q, k, v, d, t + 1, H, DQK, DV, 0.35f, Wr[c][0], Wr[c][1]);
                cr_expect(memcmp(o2 + (size_t)t * H * DV, out + (size_t)t * H * DV, (size_t)H * DV * 4) == 0 &&
                              memcmp(l2 + (size_t)t * H, lse + (size_t)t * H, (size_t)H * 4) == 0,
                          "W=%d r=%d doc=%d row %d: prefix row differs from batch row", Wr[c][0], Wr[c][1], withdoc,
                          t);
            }
        }
    free(q), free(k), free(v), free(out), free(lse), free(o2), free(l2);
}

/* Each document of a packed batch equals that document alone (blocks re-aligned to its start), bit for bit, and
 * changing one document's keys and values leaves the others' bits alone. */
Test(attention_swa, document_mask_and_packed_equals_unpacked) {
    enum { T = 140, H = 2, DQK = 12, DV = 8, W = 7, R = 3 };
    int32_t doc[T];
    make_docs(doc, T);
    size_t nq = (size_t)T * H * DQK, nv = (size_t)T * H * DV;
    float *q = randn(nq, 20, 1, 1.0f), *k = randn(nq, 20, 2, 1.0f), *v = randn(nv, 20, 3, 1.0f);
    float *out = malloc(nv * 4), *lse = malloc(T * H * 4), *out2 = malloc(nv * 4), *lse2 = malloc(T * H * 4);
    run_fwd(out, lse, q, k, v, doc, T, H, DQK, DV, 0.4f, W, R);
    int starts[] = {0, 5, 69, 70, T};
    for (int d = 0; d < 4; d++) {
        int s0 = starts[d], n = starts[d + 1] - starts[d];
        run_fwd(out2, lse2, q + (size_t)s0 * H * DQK, k + (size_t)s0 * H * DQK, v + (size_t)s0 * H * DV, NULL, n, H,
                DQK, DV, 0.4f, W, R);
        cr_expect(memcmp(out2, out + (size_t)s0 * H * DV, (size_t)n * H * DV * 4) == 0, "document %d out differs", d);
        cr_expect(memcmp(lse2, lse + (size_t)s0 * H, (size_t)n * H * 4) == 0, "document %d lse differs", d);
    }
    for (int t = 5; t < 69; t++)
        for (int c = 0; c < H * DQK; c++) k[(size_t)t * H * DQK + c] += 0.5f;
    for (int t = 5; t < 69; t++)
        for (int c = 0; c < H * DV; c++) v[(size_t)t * H * DV + c] -= 0.25f;
    run_fwd(out2, lse2, q, k, v, doc, T, H, DQK, DV, 0.4f, W, R);
    cr_expect(memcmp(out2, out, (size_t)5 * H * DV * 4) == 0);
    cr_expect(memcmp(out2 + (size_t)69 * H * DV, out + (size_t)69 * H * DV, (size_t)(T - 69) * H * DV * 4) == 0);
    cr_expect(memcmp(out2 + (size_t)5 * H * DV, out + (size_t)5 * H * DV, (size_t)64 * H * DV * 4) != 0);
    free(q), free(k), free(v), free(out), free(lse), free(out2), free(lse2);
}

/* Bad arguments and failed allocations: a status, an exact message, and no gradient touched. */
Test(attention_swa, errors) {
    enum { T = 6, H = 1, D = 4 };
    float q[T * D], k[T * D], v[T * D], out[T * D], lse[T], g[T * D];
    for (int i = 0; i < T * D; i++) q[i] = k[i] = v[i] = (float)i / 10.0f, g[i] = 7.0f;
    mr_err e = {0};
    cr_expect_eq(attention_swa_forward(out, lse, q, k, v, NULL, T, H, D, D, 1.0f, 0, 2, &e), MR_EINVAL);
    cr_expect_str_eq(e.msg, "attention_swa_forward: window must be >= 1, got 0");
    cr_expect_eq(attention_swa_forward(out, lse, q, k, v, NULL, T, H, D, D, 1.0f, 3, -2, &e), MR_EINVAL);
    cr_expect_str_eq(e.msg, "attention_swa_forward: compression ratio must be >= 1, got -2");
    cr_expect_eq(attention_swa_forward(out, lse, q, k, v, NULL, T, 0, D, D, 1.0f, 3, 2, &e), MR_EINVAL);
    cr_expect_str_eq(e.msg, "attention_swa_forward: sizes must be positive, got T=6 H=0 d_qk=4 d_v=4");
    int32_t bad[T] = {0, 0, 0, 1, 1, 5};
    cr_expect_eq(attention_swa_backward(g, g, g, v, out, lse, q, k, v, bad, T, H, D, D, 1.0f, 3, 2, &e), MR_EINVAL);
    cr_expect_str_eq(e.msg, "attention_swa_backward: doc_start[3] = 1: documents must be contiguous (expected 3 or "
                            "doc_start[2] = 0)");
    int32_t bad0[T] = {1, 1, 1, 1, 1, 1};
    cr_expect_eq(attention_swa_forward(out, lse, q, k, v, bad0, T, H, D, D, 1.0f, 3, 2, &e), MR_EINVAL);
    cr_expect_str_eq(e.msg, "attention_swa_forward: doc_start[0] = 1: documents must be contiguous (expected 0 or "
                            "doc_start[0] = 0)");
    cr_expect_eq(attention_swa_forward(out, lse, q, k, v, NULL, 0, H, D, D, 1.0f, 3, 2, &e), 0, "T = 0 is empty");

    cr_assert_eq(attention_swa_forward(out, lse, q, k, v, NULL, T, H, D, D, 1.0f, 2, 2, &e), 0, "%s", e.msg);
    for (int fail = 1; fail <= 2; fail++) {
        long before = mem_injected_failures();
        mem_fail_after(fail);
        int rc = attention_swa_forward(out, lse, q, k, v, NULL, T, H, D, D, 1.0f, 2, 2, &e);
        mem_fail_after(0);
        cr_expect_eq(rc, MR_ENOMEM, "forward, allocation %d failing", fail);
        cr_expect_eq(mem_injected_failures(), before + 1);
        cr_expect(strstr(e.msg, "attention_swa_forward: out of memory for ") == e.msg, "%s", e.msg);
        mem_fail_after(fail);
        rc = attention_swa_backward(g, g, g, v, out, lse, q, k, v, NULL, T, H, D, D, 1.0f, 2, 2, &e);
        mem_fail_after(0);
        cr_expect_eq(rc, MR_ENOMEM, "backward, allocation %d failing", fail);
        cr_expect(strstr(e.msg, "attention_swa_backward: out of memory for ") == e.msg, "%s", e.msg);
    }
    for (int i = 0; i < T * D; i++) cr_expect_eq(g[i], 7.0f, "a failed backward touched a gradient");
}
