/* test_attention.c: the flash-style causal attention against a naive double-precision softmax(QKᵀ·scale + mask)V,
 * document masking, gradients (finite differences and a double reference backward), batch invariance
 * (row t of a T-batch == row t of the (t+1)-prefix, bitwise), packed == unpacked documents, thread-count
 * independence, and the absorbed MLA decode against the naive MLA form. */
#include <criterion/criterion.h>
#include <criterion/logging.h>
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "core/mem.h"
#include "core/rng.h"
#include "kernels/cpu/attention.h"
#include "kernels/cpu/dense.h"

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

/* Naive reference in double: out (T, H, dv), lse (T, H) (lse may be NULL). */
static void ref_forward(double *out, double *lse, const double *q, const double *k, const double *v,
                        const int32_t *doc, int T, int H, int dqk, int dv, double scale) {
    double *s = malloc((size_t)T * sizeof *s);
    for (int i = 0; i < T; i++)
        for (int h = 0; h < H; h++) {
            int lo = doc ? doc[i] : 0;
            double m = -INFINITY;
            for (int j = lo; j <= i; j++) {
                double d = 0.0;
                for (int c = 0; c < dqk; c++) d += q[((size_t)i * H + h) * dqk + c] * k[((size_t)j * H + h) * dqk + c];
                s[j] = d * scale;
                if (s[j] > m) m = s[j];
            }
            double l = 0.0;
            for (int j = lo; j <= i; j++) l += exp(s[j] - m);
            double *o = out + ((size_t)i * H + h) * dv;
            for (int e = 0; e < dv; e++) o[e] = 0.0;
            for (int j = lo; j <= i; j++) {
                double p = exp(s[j] - m) / l;
                for (int e = 0; e < dv; e++) o[e] += p * v[((size_t)j * H + h) * dv + e];
            }
            if (lse) lse[(size_t)i * H + h] = m + log(l);
        }
    free(s);
}

/* loss = Σ w · out, in double. */
static double ref_loss(const double *w, const double *q, const double *k, const double *v, const int32_t *doc, int T,
                       int H, int dqk, int dv, double scale) {
    size_t no = (size_t)T * H * dv;
    double *out = malloc(no * sizeof *out), L = 0.0;
    ref_forward(out, NULL, q, k, v, doc, T, H, dqk, dv, scale);
    for (size_t i = 0; i < no; i++) L += w[i] * out[i];
    free(out);
    return L;
}

/* Reference backward in double (dense softmax gradient): gq, gk, gv = ∂(Σ w·out)/∂(q, k, v). */
static void ref_backward(double *gq, double *gk, double *gv, const double *w, const double *q, const double *k,
                         const double *v, const int32_t *doc, int T, int H, int dqk, int dv, double scale) {
    memset(gq, 0, (size_t)T * H * dqk * sizeof *gq);
    memset(gk, 0, (size_t)T * H * dqk * sizeof *gk);
    memset(gv, 0, (size_t)T * H * dv * sizeof *gv);
    double *p = malloc((size_t)T * sizeof *p), *dp = malloc((size_t)T * sizeof *dp);
    for (int i = 0; i < T; i++)
        for (int h = 0; h < H; h++) {
            int lo = doc ? doc[i] : 0;
            const double *qi = q + ((size_t)i * H + h) * dqk, *wi = w + ((size_t)i * H + h) * dv;
            double m = -INFINITY, l = 0.0, pdp = 0.0;
            for (int j = lo; j <= i; j++) {
                double d = 0.0;
                for (int c = 0; c < dqk; c++) d += qi[c] * k[((size_t)j * H + h) * dqk + c];
                p[j] = d * scale;
                if (p[j] > m) m = p[j];
            }
            for (int j = lo; j <= i; j++) l += (p[j] = exp(p[j] - m));
            for (int j = lo; j <= i; j++) {
                p[j] /= l;
                double d = 0.0;
                for (int e = 0; e < dv; e++) d += wi[e] * v[((size_t)j * H + h) * dv + e];
                dp[j] = d;
                pdp += p[j] * d;
            }
            for (int j = lo; j <= i; j++) {
                double ds = p[j] * (dp[j] - pdp) * scale;
                for (int c = 0; c < dqk; c++) {
                    gq[((size_t)i * H + h) * dqk + c] += ds * k[((size_t)j * H + h) * dqk + c];
                    gk[((size_t)j * H + h) * dqk + c] += ds * qi[c];
                }
                for (int e = 0; e < dv; e++) gv[((size_t)j * H + h) * dv + e] += p[j] * wi[e];
            }
        }
    free(p);
    free(dp);
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

/* tol: fp32 scores carry ~1e-7 × Σ|q_c k_c| of rounding, so larger heads and scales get a larger bound. */
static void check_forward(const int32_t *doc, int T, int H, int dqk, int dv, float scale, double tol) {
    size_t nq = (size_t)T * H * dqk, nv = (size_t)T * H * dv;
    float *q = randn(nq, 1, 1, 1.0f), *k = randn(nq, 1, 2, 1.0f), *v = randn(nv, 1, 3, 1.0f);
    float *out = malloc(nv * sizeof *out), *lse = malloc((size_t)T * H * sizeof *lse);
    double *dq = to_double(q, nq), *dk = to_double(k, nq), *dvv = to_double(v, nv);
    double *ro = malloc(nv * sizeof *ro), *rl = malloc((size_t)T * H * sizeof *rl);
    attention_forward(out, lse, q, k, v, doc, T, H, dqk, dv, scale);
    ref_forward(ro, rl, dq, dk, dvv, doc, T, H, dqk, dv, scale);
    double eo = 0.0, el = 0.0;
    for (size_t i = 0; i < nv; i++) eo = fmax(eo, fabs(out[i] - ro[i]));
    for (size_t i = 0; i < (size_t)T * H; i++) el = fmax(el, fabs(lse[i] - rl[i]));
    cr_expect(eo < tol, "T=%d doc=%d: max |out - ref| = %.3g", T, doc != NULL, eo);
    cr_expect(el < tol, "T=%d doc=%d: max |lse - ref| = %.3g", T, doc != NULL, el);
    free(q), free(k), free(v), free(out), free(lse), free(dq), free(dk), free(dvv), free(ro), free(rl);
}

Test(attention, forward_matches_double_reference) {
    /* T = 150 crosses two key blocks of 64; d_qk = 20 exercises the dot product's tail. Large scale → peaked
     * softmax, where a wrong running-max rescale would show. */
    check_forward(NULL, 150, 3, 20, 12, 0.3f, 2e-6);
    check_forward(NULL, 1, 2, 8, 4, 0.5f, 1e-6);
    check_forward(NULL, 70, 2, 192, 16, 0.1352337789f, 4e-6); /* V3 head size and softmax scale */
    check_forward(NULL, 70, 1, 192, 16, 1.0f, 4e-5);          /* very peaked: scores of std ~14 */
    int32_t doc[150];
    make_docs(doc, 150);
    check_forward(doc, 150, 3, 20, 12, 0.3f, 2e-6);
}

/* Keys outside a row's document must not matter: perturbing another document's k/v leaves the row unchanged,
 * bit for bit; and each document of a packed batch equals that document computed alone, bit for bit. */
Test(attention, document_mask_and_packed_equals_unpacked) {
    enum { T = 140, H = 2, DQK = 12, DV = 8 };
    int32_t doc[T];
    make_docs(doc, T);
    size_t nq = (size_t)T * H * DQK, nv = (size_t)T * H * DV;
    float *q = randn(nq, 2, 1, 1.0f), *k = randn(nq, 2, 2, 1.0f), *v = randn(nv, 2, 3, 1.0f);
    float *out = malloc(nv * 4), *lse = malloc((size_t)T * H * 4), *out2 = malloc(nv * 4), *lse2 = malloc(T * H * 4);
    attention_forward(out, lse, q, k, v, doc, T, H, DQK, DV, 0.4f);
    /* Document boundaries: 0, 5, 69, 70. Each document alone (positions restart; plain causal). */
    int starts[] = {0, 5, 69, 70, T};
    for (int d = 0; d < 4; d++) {
        int s0 = starts[d], n = starts[d + 1] - starts[d];
        attention_forward(out2, lse2, q + (size_t)s0 * H * DQK, k + (size_t)s0 * H * DQK, v + (size_t)s0 * H * DV,
                          NULL, n, H, DQK, DV, 0.4f);
        cr_expect(memcmp(out2, out + (size_t)s0 * H * DV, (size_t)n * H * DV * 4) == 0, "document %d out differs", d);
        cr_expect(memcmp(lse2, lse + (size_t)s0 * H, (size_t)n * H * 4) == 0, "document %d lse differs", d);
    }
    /* Change document 1's keys and values: documents 0, 2, 3 keep their bits, document 1 changes. */
    for (int t = 5; t < 69; t++)
        for (int c = 0; c < H * DQK; c++) k[(size_t)t * H * DQK + c] += 0.5f;
    for (int t = 5; t < 69; t++)
        for (int c = 0; c < H * DV; c++) v[(size_t)t * H * DV + c] -= 0.25f;
    attention_forward(out2, lse2, q, k, v, doc, T, H, DQK, DV, 0.4f);
    cr_expect(memcmp(out2, out, (size_t)5 * H * DV * 4) == 0);
    cr_expect(memcmp(out2 + (size_t)69 * H * DV, out + (size_t)69 * H * DV, (size_t)(T - 69) * H * DV * 4) == 0);
    cr_expect(memcmp(out2 + (size_t)5 * H * DV, out + (size_t)5 * H * DV, (size_t)64 * H * DV * 4) != 0);
    free(q), free(k), free(v), free(out), free(lse), free(out2), free(lse2);
}

/* Row t of a T-batch == the last row of the same tokens' (t+1)-prefix, bitwise, for rows on both sides of key and
 * query block boundaries, with and without documents. */
Test(attention, batch_invariance_prefix_rows_bitwise) {
    enum { T = 150, H = 2, DQK = 24, DV = 16 };
    size_t nq = (size_t)T * H * DQK, nv = (size_t)T * H * DV;
    float *q = randn(nq, 3, 1, 1.0f), *k = randn(nq, 3, 2, 1.0f), *v = randn(nv, 3, 3, 1.0f);
    float *out = malloc(nv * 4), *lse = malloc(T * H * 4), *o2 = malloc(nv * 4), *l2 = malloc(T * H * 4);
    int32_t doc[T];
    make_docs(doc, T);
    static const int rows[] = {0, 1, 4, 5, 63, 64, 65, 68, 69, 70, 127, 128, 133, 134, 149};
    for (int withdoc = 0; withdoc < 2; withdoc++) {
        const int32_t *d = withdoc ? doc : NULL;
        attention_forward(out, lse, q, k, v, d, T, H, DQK, DV, 0.35f);
        for (size_t r = 0; r < sizeof rows / sizeof rows[0]; r++) {
            int t = rows[r];
            attention_forward(o2, l2, q, k, v, d, t + 1, H, DQK, DV, 0.35f);
            cr_expect(memcmp(o2 + (size_t)t * H * DV, out + (size_t)t * H * DV, (size_t)H * DV * 4) == 0,
                      "doc=%d row %d: prefix row differs from batch row", withdoc, t);
            cr_expect(memcmp(l2 + (size_t)t * H, lse + (size_t)t * H, (size_t)H * 4) == 0, "doc=%d lse row %d",
                      withdoc, t);
        }
    }
    free(q), free(k), free(v), free(out), free(lse), free(o2), free(l2);
}

static double max_rel(const float *a, const double *ref, size_t n) {
    double e = 0.0, m = 0.0;
    for (size_t i = 0; i < n; i++) {
        e = fmax(e, fabs(a[i] - ref[i]));
        m = fmax(m, fabs(ref[i]));
    }
    return e / m;
}

/* The double reference backward is itself checked by central differences on sampled elements, then the kernel is
 * compared to it on every element (and directly to finite differences on the samples). */
static void check_gradients(const int32_t *doc, int T, int H, int dqk, int dv, float scale) {
    size_t nq = (size_t)T * H * dqk, nv = (size_t)T * H * dv;
    float *q = randn(nq, 4, 1, 1.0f), *k = randn(nq, 4, 2, 1.0f), *v = randn(nv, 4, 3, 1.0f);
    float *w = randn(nv, 4, 4, 1.0f);
    float *out = malloc(nv * 4), *lse = malloc((size_t)T * H * 4);
    float *gq = calloc(nq, 4), *gk = calloc(nq, 4), *gv = calloc(nv, 4);
    attention_forward(out, lse, q, k, v, doc, T, H, dqk, dv, scale);
    attention_backward(gq, gk, gv, w, out, lse, q, k, v, doc, T, H, dqk, dv, scale);

    double *Q = to_double(q, nq), *K = to_double(k, nq), *V = to_double(v, nv), *W = to_double(w, nv);
    double *rq = malloc(nq * 8), *rk = malloc(nq * 8), *rv = malloc(nv * 8);
    ref_backward(rq, rk, rv, W, Q, K, V, doc, T, H, dqk, dv, scale);
    cr_expect(max_rel(gq, rq, nq) < 1e-5, "dq rel err %.3g", max_rel(gq, rq, nq));
    cr_expect(max_rel(gk, rk, nq) < 1e-5, "dk rel err %.3g", max_rel(gk, rk, nq));
    cr_expect(max_rel(gv, rv, nv) < 1e-5, "dv rel err %.3g", max_rel(gv, rv, nv));

    const double eps = 1e-5;
    rng r;
    rng_init(&r, 99, (uint64_t)T);
    struct { double *x; const double *ref; const float *g; size_t n; const char *name; } t[3] = {
        {Q, rq, gq, nq, "dq"}, {K, rk, gk, nq, "dk"}, {V, rv, gv, nv, "dv"}};
    for (int a = 0; a < 3; a++)
        for (int s = 0; s < 40; s++) {
            size_t i = rng_below(&r, (uint32_t)t[a].n);
            double x0 = t[a].x[i];
            t[a].x[i] = x0 + eps;
            double lp = ref_loss(W, Q, K, V, doc, T, H, dqk, dv, scale);
            t[a].x[i] = x0 - eps;
            double lm = ref_loss(W, Q, K, V, doc, T, H, dqk, dv, scale);
            t[a].x[i] = x0;
            double fd = (lp - lm) / (2 * eps);
            cr_expect(fabs(fd - t[a].ref[i]) < 1e-7 + 1e-6 * fabs(fd), "%s[%zu]: FD %.9g ref %.9g", t[a].name, i, fd,
                      t[a].ref[i]);
            cr_expect(fabs(fd - t[a].g[i]) < 2e-5 + 1e-4 * fabs(fd), "%s[%zu]: FD %.9g kernel %.9g", t[a].name, i,
                      fd, t[a].g[i]);
        }
    free(q), free(k), free(v), free(w), free(out), free(lse), free(gq), free(gk), free(gv);
    free(Q), free(K), free(V), free(W), free(rq), free(rk), free(rv);
}

Test(attention, gradients_finite_differences) {
    check_gradients(NULL, 70, 2, 10, 6, 0.4f);
    int32_t doc[70];
    make_docs(doc, 70);
    check_gradients(doc, 70, 2, 10, 6, 0.4f);
    check_gradients(NULL, 3, 1, 9, 5, 1.0f);
}

/* Backward accumulates (+=), and a NULL gradient skips only that gradient. */
Test(attention, backward_accumulates_and_null_grads) {
    enum { T = 66, H = 2, DQK = 8, DV = 8 };
    size_t nq = (size_t)T * H * DQK, nv = (size_t)T * H * DV;
    float *q = randn(nq, 5, 1, 1.0f), *k = randn(nq, 5, 2, 1.0f), *v = randn(nv, 5, 3, 1.0f);
    float *w = randn(nv, 5, 4, 1.0f), *out = malloc(nv * 4), *lse = malloc(T * H * 4);
    float *gq = calloc(nq, 4), *gk = calloc(nq, 4), *gv = calloc(nv, 4);
    float *aq = randn(nq, 5, 5, 1.0f), *ak = randn(nq, 5, 6, 1.0f), *av = randn(nv, 5, 7, 1.0f);
    float *bq = malloc(nq * 4), *bk = malloc(nq * 4), *bv = malloc(nv * 4);
    memcpy(bq, aq, nq * 4), memcpy(bk, ak, nq * 4), memcpy(bv, av, nv * 4);
    attention_forward(out, lse, q, k, v, NULL, T, H, DQK, DV, 0.5f);
    attention_backward(gq, gk, gv, w, out, lse, q, k, v, NULL, T, H, DQK, DV, 0.5f);
    attention_backward(aq, ak, av, w, out, lse, q, k, v, NULL, T, H, DQK, DV, 0.5f);
    double e = 0.0;
    for (size_t i = 0; i < nq; i++) e = fmax(e, fabs(aq[i] - (bq[i] + gq[i])) + fabs(ak[i] - (bk[i] + gk[i])));
    for (size_t i = 0; i < nv; i++) e = fmax(e, fabs(av[i] - (bv[i] + gv[i])));
    cr_expect(e < 1e-5, "accumulation error %.3g", e);
    float *nq_ = calloc(nq, 4), *nv_ = calloc(nv, 4);
    attention_backward(nq_, NULL, nv_, w, out, lse, q, k, v, NULL, T, H, DQK, DV, 0.5f);
    cr_expect(memcmp(nq_, gq, nq * 4) == 0 && memcmp(nv_, gv, nv * 4) == 0, "NULL dk changed dq or dv");
    float *nk_ = calloc(nq, 4);
    attention_backward(NULL, nk_, NULL, w, out, lse, q, k, v, NULL, T, H, DQK, DV, 0.5f);
    cr_expect(memcmp(nk_, gk, nq * 4) == 0, "NULL dq/dv changed dk");
    free(q), free(k), free(v), free(w), free(out), free(lse), free(gq), free(gk), free(gv);
    free(aq), free(ak), free(av), free(bq), free(bk), free(bv), free(nq_), free(nv_), free(nk_);
}

/* Forward and backward give the same bits with 1, 2 and 3 threads. */
Test(attention, thread_count_independent) {
    enum { T = 200, H = 3, DQK = 16, DV = 8 };
    size_t nq = (size_t)T * H * DQK, nv = (size_t)T * H * DV;
    float *q = randn(nq, 6, 1, 1.0f), *k = randn(nq, 6, 2, 1.0f), *v = randn(nv, 6, 3, 1.0f);
    float *w = randn(nv, 6, 4, 1.0f);
    int32_t doc[T];
    make_docs(doc, T);
    float *res[3][5];
    int saved = omp_get_max_threads();
    for (int n = 0; n < 3; n++) {
        omp_set_num_threads(n + 1);
        float *out = malloc(nv * 4), *lse = malloc(T * H * 4), *gq = calloc(nq, 4), *gk = calloc(nq, 4),
              *gv = calloc(nv, 4);
        attention_forward(out, lse, q, k, v, doc, T, H, DQK, DV, 0.3f);
        attention_backward(gq, gk, gv, w, out, lse, q, k, v, doc, T, H, DQK, DV, 0.3f);
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

/* ---- absorbed MLA decode (§5.6) vs the naive form ---- */

enum { MH = 3, NOPE = 8, ROPE = 4, MDV = 6, RKV = 16, MB = 3, SMAX = 70 };

typedef struct {
    float *w;           /* kv_b (MH·(NOPE+MDV), RKV) */
    float *c[MB], *kr[MB];
    float *q;           /* (MB, MH, NOPE+ROPE) */
    int32_t len[MB];
} mla_case;

static void mla_case_init(mla_case *m) {
    m->w = randn((size_t)MH * (NOPE + MDV) * RKV, 8, 0, 0.3f);
    static const int32_t lens[MB] = {1, 5, SMAX};
    for (int b = 0; b < MB; b++) {
        m->len[b] = lens[b];
        m->c[b] = randn((size_t)lens[b] * RKV, 8, 10 + b, 1.0f);
        m->kr[b] = randn((size_t)lens[b] * ROPE, 8, 20 + b, 1.0f);
    }
    m->q = randn((size_t)MB * MH * (NOPE + ROPE), 8, 30, 1.0f);
}

static void mla_case_free(mla_case *m) {
    free(m->w), free(m->q);
    for (int b = 0; b < MB; b++) free(m->c[b]), free(m->kr[b]);
}

/* Naive MLA: k[u][h] = [W_UK[h] c[u] ; k_rope[u]], v[u][h] = W_UV[h] c[u], in float (the training-form kernel
 * input) and in double (the reference). */
static void mla_expand(float *k, float *v, double *kd, double *vd, const mla_case *m, int b) {
    int S = m->len[b];
    for (int u = 0; u < S; u++)
        for (int h = 0; h < MH; h++) {
            for (int e = 0; e < NOPE + MDV; e++) {
                const float *wr = m->w + ((size_t)h * (NOPE + MDV) + e) * RKV;
                float sf = 0.0f;
                double sd = 0.0;
                for (int c = 0; c < RKV; c++) {
                    sf += wr[c] * m->c[b][(size_t)u * RKV + c];
                    sd += (double)wr[c] * m->c[b][(size_t)u * RKV + c];
                }
                if (e < NOPE) {
                    k[((size_t)u * MH + h) * (NOPE + ROPE) + e] = sf;
                    kd[((size_t)u * MH + h) * (NOPE + ROPE) + e] = sd;
                } else {
                    v[((size_t)u * MH + h) * MDV + e - NOPE] = sf;
                    vd[((size_t)u * MH + h) * MDV + e - NOPE] = sd;
                }
            }
            for (int r = 0; r < ROPE; r++) {
                k[((size_t)u * MH + h) * (NOPE + ROPE) + NOPE + r] = m->kr[b][(size_t)u * ROPE + r];
                kd[((size_t)u * MH + h) * (NOPE + ROPE) + NOPE + r] = m->kr[b][(size_t)u * ROPE + r];
            }
        }
}

Test(attention, absorbed_decode_equals_naive_mla) {
    mla_case m;
    mla_case_init(&m);
    const float scale = 0.45f;
    const int DQK = NOPE + ROPE;
    float out[MB * MH * MDV];
    mr_err e = {0};
    cr_assert_eq(mla_decode_absorbed(out, m.q, (const float *const *)m.c, (const float *const *)m.kr, m.len, m.w, MB,
                                     MH, NOPE, ROPE, MDV, RKV, scale, &e),
                 0, "%s", e.msg);
    double err_ref = 0.0, err_naive = 0.0, mag = 0.0;
    for (int b = 0; b < MB; b++) {
        int S = m.len[b];
        float *k = malloc((size_t)S * MH * DQK * 4), *v = malloc((size_t)S * MH * MDV * 4);
        float *qf = randn((size_t)S * MH * DQK, 8, 40 + b, 1.0f); /* rows < S-1: other tokens' queries */
        double *kd = malloc((size_t)S * MH * DQK * 8), *vd = malloc((size_t)S * MH * MDV * 8);
        double *qd = malloc((size_t)S * MH * DQK * 8), *od = malloc((size_t)S * MH * MDV * 8);
        float *of = malloc((size_t)S * MH * MDV * 4), *lf = malloc((size_t)S * MH * 4);
        mla_expand(k, v, kd, vd, &m, b);
        memcpy(qf + (size_t)(S - 1) * MH * DQK, m.q + (size_t)b * MH * DQK, (size_t)MH * DQK * 4);
        for (size_t i = 0; i < (size_t)S * MH * DQK; i++) qd[i] = qf[i];
        ref_forward(od, NULL, qd, kd, vd, NULL, S, MH, DQK, MDV, scale);
        attention_forward(of, lf, qf, k, v, NULL, S, MH, DQK, MDV, scale);
        for (int i = 0; i < MH * MDV; i++) {
            double a = out[b * MH * MDV + i], r = od[(size_t)(S - 1) * MH * MDV + i];
            double n = of[(size_t)(S - 1) * MH * MDV + i];
            err_ref = fmax(err_ref, fabs(a - r));
            err_naive = fmax(err_naive, fabs(a - n));
            mag = fmax(mag, fabs(r));
        }
        free(k), free(v), free(qf), free(kd), free(vd), free(qd), free(od), free(of), free(lf);
    }
    cr_log_info("absorbed decode: max |absorbed - naive fp32| = %.3g, max |absorbed - double ref| = %.3g (max |out| "
                "%.3g)",
                err_naive, err_ref, mag);
    cr_expect(mag > 0.1, "degenerate test data");
    cr_expect(err_ref < 2e-6 * (1.0 + mag), "absorbed vs double naive MLA: %.3g", err_ref);
    cr_expect(err_naive < 4e-6 * (1.0 + mag), "absorbed vs fp32 naive MLA: %.3g", err_naive);
    mla_case_free(&m);
}

/* Each sequence's result does not depend on the batch it is decoded in nor on the thread count. */
Test(attention, absorbed_decode_batch_and_thread_invariant) {
    mla_case m;
    mla_case_init(&m);
    float all[MB * MH * MDV], one[MH * MDV], thr[MB * MH * MDV];
    mr_err e = {0};
    cr_assert_eq(mla_decode_absorbed(all, m.q, (const float *const *)m.c, (const float *const *)m.kr, m.len, m.w, MB,
                                     MH, NOPE, ROPE, MDV, RKV, 0.3f, &e),
                 0);
    for (int b = 0; b < MB; b++) {
        const float *cb = m.c[b], *kb = m.kr[b];
        cr_assert_eq(mla_decode_absorbed(one, m.q + (size_t)b * MH * (NOPE + ROPE), &cb, &kb, &m.len[b], m.w, 1, MH,
                                         NOPE, ROPE, MDV, RKV, 0.3f, &e),
                     0);
        cr_expect(memcmp(one, all + b * MH * MDV, sizeof one) == 0, "sequence %d differs alone vs in batch", b);
    }
    int saved = omp_get_max_threads();
    omp_set_num_threads(3);
    cr_assert_eq(mla_decode_absorbed(thr, m.q, (const float *const *)m.c, (const float *const *)m.kr, m.len, m.w, MB,
                                     MH, NOPE, ROPE, MDV, RKV, 0.3f, &e),
                 0);
    omp_set_num_threads(saved);
    cr_expect(memcmp(thr, all, sizeof all) == 0, "thread count changed the decode");
    mla_case_free(&m);
}

Test(attention, absorbed_decode_errors) {
    mla_case m;
    mla_case_init(&m);
    float out[MB * MH * MDV];
    mr_err e = {0};
    int32_t bad[MB] = {4, 0, 3};
    cr_expect_eq(mla_decode_absorbed(out, m.q, (const float *const *)m.c, (const float *const *)m.kr, bad, m.w, MB, MH,
                                     NOPE, ROPE, MDV, RKV, 0.3f, &e),
                 MR_EINVAL);
    cr_expect_str_eq(e.msg, "mla_decode_absorbed: sequence 1: cache length must be >= 1, got 0");
    cr_expect_eq(mla_decode_absorbed(out, m.q, (const float *const *)m.c, (const float *const *)m.kr, m.len, m.w, MB,
                                     MH, NOPE, ROPE, MDV, 0, 0.3f, &e),
                 MR_EINVAL);
    cr_expect_str_eq(e.msg, "mla_decode_absorbed: sizes must be positive, got B=3 H=3 d_nope=8 d_rope=4 d_v=6 r_kv=0");
    long before = mem_injected_failures();
    mem_fail_after(1);
    int rc = mla_decode_absorbed(out, m.q, (const float *const *)m.c, (const float *const *)m.kr, m.len, m.w, MB, MH,
                                 NOPE, ROPE, MDV, RKV, 0.3f, &e);
    mem_fail_after(0);
    cr_expect_eq(rc, MR_ENOMEM);
    cr_expect_eq(mem_injected_failures(), before + 1);
    cr_expect(strncmp(e.msg, "mla_decode_absorbed: out of memory for ", 39) == 0, "%s", e.msg);
    mla_case_free(&m);
}

/* The training form: T rows of one document, row t reading the cache's first t + 1 entries, all in one call (rows
 * tiled together, keys past a row's end zero-weighted) equal each row decoded alone, bit for bit, lse included, on
 * every ISA path of the dense kernels (which the absorbed form is built from), at 1 and 3 threads. Sizes cross the
 * 64-key blocks and the 128-column blocks of the accumulation kernel, with lane tails (r_kv = 136). */
Test(attention, absorbed_tiles_equal_rows_alone_on_every_isa) {
    enum { T = 150, H = 3, DN = 16, DR = 8, DV = 12, R = 136 };
    float *w = randn((size_t)H * (DN + DV) * R, 8, 50, 0.2f), *c = randn((size_t)T * R, 8, 51, 1.0f);
    float *kr = randn((size_t)T * DR, 8, 52, 1.0f), *q = randn((size_t)T * H * (DN + DR), 8, 53, 1.0f);
    const float **pc = malloc(sizeof(float *) * T), **pk = malloc(sizeof(float *) * T);
    int32_t *len = malloc(sizeof(int32_t) * T);
    float *ref = malloc(sizeof(float) * T * H * DV), *got = malloc(sizeof(float) * T * H * DV);
    float *lref = malloc(sizeof(float) * T * H), *lgot = malloc(sizeof(float) * T * H);
    for (int t = 0; t < T; t++) pc[t] = c, pk[t] = kr, len[t] = t + 1;
    mr_err e = {0};
    for (int t = 0; t < T; t++)
        cr_assert_eq(mla_decode_absorbed_lse(ref + (size_t)t * H * DV, lref + (size_t)t * H,
                                             q + (size_t)t * H * (DN + DR), pc, pk, &len[t], w, 1, H, DN, DR, DV, R,
                                             0.2f, &e),
                     0, "%s", e.msg);
    static const dense_isa isas[] = {DENSE_ISA_AUTO, DENSE_ISA_GENERIC, DENSE_ISA_AVX2, DENSE_ISA_AVX512};
    const int saved = omp_get_max_threads();
    for (size_t i = 0; i < sizeof isas / sizeof isas[0]; i++)
        for (int th = 1; th <= 3; th += 2) {
            dense_isa prev = dense_force_isa(isas[i]);
            omp_set_num_threads(th);
            memset(got, 0xff, sizeof(float) * T * H * DV);
            cr_assert_eq(mla_decode_absorbed_lse(got, lgot, q, pc, pk, len, w, T, H, DN, DR, DV, R, 0.2f, &e), 0, "%s",
                         e.msg);
            omp_set_num_threads(saved);
            dense_force_isa(prev);
            cr_expect(memcmp(got, ref, sizeof(float) * T * H * DV) == 0, "isa %d, %d threads: tiled rows differ",
                      (int)isas[i], th);
            cr_expect(memcmp(lgot, lref, sizeof(float) * T * H) == 0, "isa %d, %d threads: lse differs",
                      (int)isas[i], th);
        }
    free(w), free(c), free(kr), free(q), free(pc), free(pk), free(len), free(ref), free(got), free(lref), free(lgot);
}

/* A batched decode step: many sequences of several rows each (a verify step's rows share their cache), so large
 * (H · r_kv) that the rows go in several chunks of whole tiles (the absorptions run per head over a chunk), equal
 * each row decoded alone, bit for bit, lse included, at 1 and 3 threads. A row past the cap joins no chunk twice. */
Test(attention, absorbed_batched_chunks_equal_rows_alone) {
    enum { S = 15, RPS = 4, B = S * RPS, H = 16, DN = 8, DR = 4, DV = 8, R = 1100, ROWS = 100 };
    float *w = randn((size_t)H * (DN + DV) * R, 8, 60, 0.2f), *c = randn((size_t)ROWS * R, 8, 61, 1.0f);
    float *kr = randn((size_t)ROWS * DR, 8, 62, 1.0f), *q = randn((size_t)B * H * (DN + DR), 8, 63, 1.0f);
    const float **pc = malloc(sizeof(float *) * B), **pk = malloc(sizeof(float *) * B);
    int32_t *len = malloc(sizeof(int32_t) * B);
    float *ref = malloc(sizeof(float) * B * H * DV), *got = malloc(sizeof(float) * B * H * DV);
    float *lref = malloc(sizeof(float) * B * H), *lgot = malloc(sizeof(float) * B * H);
    for (int s = 0; s < S; s++) /* sequence s: its own cache (rows s.. of c), lengths ascending, some past 64 keys */
        for (int r = 0; r < RPS; r++) {
            const int b = s * RPS + r;
            pc[b] = c + (size_t)s * R, pk[b] = kr + (size_t)s * DR, len[b] = 1 + (s * 13) % 70 + r;
        }
    mr_err e = {0};
    for (int b = 0; b < B; b++)
        cr_assert_eq(mla_decode_absorbed_lse(ref + (size_t)b * H * DV, lref + (size_t)b * H,
                                             q + (size_t)b * H * (DN + DR), &pc[b], &pk[b], &len[b], w, 1, H, DN, DR,
                                             DV, R, 0.3f, &e),
                     0, "%s", e.msg);
    const int saved = omp_get_max_threads();
    for (int th = 1; th <= 3; th += 2) {
        omp_set_num_threads(th);
        memset(got, 0xff, sizeof(float) * B * H * DV);
        cr_assert_eq(mla_decode_absorbed_lse(got, lgot, q, pc, pk, len, w, B, H, DN, DR, DV, R, 0.3f, &e), 0, "%s",
                     e.msg);
        omp_set_num_threads(saved);
        cr_expect(memcmp(got, ref, sizeof(float) * B * H * DV) == 0, "%d threads: batched rows differ", th);
        cr_expect(memcmp(lgot, lref, sizeof(float) * B * H) == 0, "%d threads: lse differs", th);
    }
    free(w), free(c), free(kr), free(q), free(pc), free(pk), free(len), free(ref), free(got), free(lref), free(lgot);
}
