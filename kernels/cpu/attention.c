/* attention.c: causal (and document-masked) softmax attention, flash style, and MLA's absorbed decode
 * (MODEL-SPEC §5.5, §5.6). See attention.h for layouts.
 *
 * Determinism and batch invariance: a query row i with window [lo, i] walks its keys in blocks
 * [j0, min(i, j0 + ATTN_BLOCK − 1)], j0 = lo, lo + ATTN_BLOCK, ..., keeping a running max m and sum l (online
 * softmax, Milakov & Gimelshein 2018; FlashAttention, Dao et al. 2022). Every dot product is reduced by attn_dot
 * in one fixed order. None of this depends on T, on which other rows share a task, or on the thread count, so
 * the row's bits are a function of (q_i, k and v over [lo, i]) alone: the same row computed as the last row of
 * its prefix, or inside its own unpacked document (blocks start at the document's first token), is bitwise
 * equal.
 * The backward recomputes p = exp(s − lse) twice: once per query row (dq, keys ascending) and once per key row
 * (dk, dv, queries ascending), so every gradient row has one owner thread and no float atomics are needed.
 * Cost: 2 recomputations of the T²/2 scores per head, against the T² floats per head a stored P would take. */
#include "kernels/cpu/attention.h"

#include <assert.h>
#include <math.h>
#include <omp.h>
#include <string.h>

#include "core/mem.h"

/* 4-float vectors (GCC vector extension; one SSE register on baseline x86-64, NEON on arm64). Loads and stores
 * go through memcpy: unaligned, and no alignment peeling that could make a reduction order depend on an address.
 * Without FMA contraction (-std=c11 → -ffp-contract=off) every lane does exactly the scalar operations written
 * here, so results do not depend on the vector width the compiler picks. */
typedef float v4f __attribute__((vector_size(16)));

static inline v4f v4_load(const float *p) {
    v4f v;
    memcpy(&v, p, sizeof v);
    return v;
}

static inline void v4_store(float *p, v4f v) { memcpy(p, &v, sizeof v); }

/* Fixed-order dot product: 16 lanes (four 4-vectors) over the multiples of 16, then 4-vector steps into the first
 * accumulator, a fixed combination tree, and the scalar tail. The result depends only on (a, b, n). */
static inline float attn_dot(const float *restrict a, const float *restrict b, int n) {
    v4f c0 = {0, 0, 0, 0}, c1 = c0, c2 = c0, c3 = c0;
    int i = 0;
    for (; i + 16 <= n; i += 16) {
        c0 += v4_load(a + i) * v4_load(b + i);
        c1 += v4_load(a + i + 4) * v4_load(b + i + 4);
        c2 += v4_load(a + i + 8) * v4_load(b + i + 8);
        c3 += v4_load(a + i + 12) * v4_load(b + i + 12);
    }
    for (; i + 4 <= n; i += 4) c0 += v4_load(a + i) * v4_load(b + i);
    v4f c = (c0 + c2) + (c1 + c3);
    float s = (c[0] + c[2]) + (c[1] + c[3]);
    for (; i < n; i++) s += a[i] * b[i];
    return s;
}

/* y += a · x (elementwise: no ordering question) */
static inline void attn_axpy(float *restrict y, float a, const float *restrict x, int n) {
    int i = 0;
    v4f va = {a, a, a, a};
    for (; i + 8 <= n; i += 8) {
        v4_store(y + i, v4_load(y + i) + va * v4_load(x + i));
        v4_store(y + i + 4, v4_load(y + i + 4) + va * v4_load(x + i + 4));
    }
    for (; i + 4 <= n; i += 4) v4_store(y + i, v4_load(y + i) + va * v4_load(x + i));
    for (; i < n; i++) y[i] += a * x[i];
}

static inline void attn_scal(float *y, float a, int n) {
    int i = 0;
    v4f va = {a, a, a, a};
    for (; i + 4 <= n; i += 4) v4_store(y + i, v4_load(y + i) * va);
    for (; i < n; i++) y[i] *= a;
}

static inline int imin(int a, int b) { return a < b ? a : b; }
static inline int imax(int a, int b) { return a > b ? a : b; }

/* One query row: out_i (normalized) and its lse. */
static void attn_row_forward(float *oi, float *lse_i, const float *qi, const float *k, const float *v, int lo, int i,
                             int H, int d_qk, int d_v, float scale) {
    float sbuf[ATTN_BLOCK];
    size_t ks = (size_t)H * (size_t)d_qk, vs = (size_t)H * (size_t)d_v;
    memset(oi, 0, (size_t)d_v * sizeof(float));
    float m = -INFINITY, l = 0.0f;
    for (int j0 = lo; j0 <= i; j0 += ATTN_BLOCK) {
        int jb = imin(j0 + ATTN_BLOCK - 1, i);
        float bm = -INFINITY;
        for (int j = j0; j <= jb; j++) {
            float s = attn_dot(qi, k + (size_t)j * ks, d_qk) * scale;
            sbuf[j - j0] = s;
            if (s > bm) bm = s;
        }
        if (bm > m) {
            if (m != -INFINITY) {
                float alpha = expf(m - bm);
                l *= alpha;
                attn_scal(oi, alpha, d_v);
            }
            m = bm;
        }
        for (int j = j0; j <= jb; j++) {
            float p = expf(sbuf[j - j0] - m);
            l += p;
            attn_axpy(oi, p, v + (size_t)j * vs, d_v);
        }
    }
    for (int e = 0; e < d_v; e++) oi[e] /= l;
    *lse_i = m + logf(l);
}

void attention_forward(float *out, float *lse, const float *q, const float *k, const float *v,
                       const int32_t *doc_start, int T, int H, int d_qk, int d_v, float scale) {
    int nb = (T + ATTN_BLOCK - 1) / ATTN_BLOCK;
    #pragma omp parallel for collapse(2) schedule(dynamic, 1) if ((long)T * H > ATTN_BLOCK)
    for (int h = 0; h < H; h++)
        for (int b = 0; b < nb; b++) {
            int i1 = imin(T, (b + 1) * ATTN_BLOCK);
            for (int i = b * ATTN_BLOCK; i < i1; i++) {
                size_t r = (size_t)i * (size_t)H + (size_t)h;
                int lo = doc_start ? doc_start[i] : 0;
                assert(lo >= 0 && lo <= i);
                attn_row_forward(out + r * (size_t)d_v, lse + r, q + r * (size_t)d_qk, k + (size_t)h * d_qk,
                                 v + (size_t)h * d_v, lo, i, H, d_qk, d_v, scale);
            }
        }
}

void attention_backward(float *dq, float *dk, float *dv, const float *dout, const float *out, const float *lse,
                        const float *q, const float *k, const float *v, const int32_t *doc_start, int T, int H,
                        int d_qk, int d_v, float scale) {
    int nb = (T + ATTN_BLOCK - 1) / ATTN_BLOCK;
    size_t qs = (size_t)H * (size_t)d_qk, vs = (size_t)H * (size_t)d_v;
    /* Pass 1: dq_i += scale · Σ_j ds_ij k_j, ds_ij = p_ij (dout_i·v_j − D_i), D_i = dout_i·out_i. */
    if (dq) {
        #pragma omp parallel for collapse(2) schedule(dynamic, 1) if ((long)T * H > ATTN_BLOCK)
        for (int h = 0; h < H; h++)
            for (int b = 0; b < nb; b++) {
                int i1 = imin(T, (b + 1) * ATTN_BLOCK);
                for (int i = b * ATTN_BLOCK; i < i1; i++) {
                    size_t r = (size_t)i * (size_t)H + (size_t)h;
                    const float *qi = q + r * (size_t)d_qk, *doi = dout + r * (size_t)d_v;
                    float *dqi = dq + r * (size_t)d_qk;
                    float Di = attn_dot(doi, out + r * (size_t)d_v, d_v), L = lse[r];
                    int lo = doc_start ? doc_start[i] : 0;
                    for (int j = lo; j <= i; j++) {
                        const float *kj = k + (size_t)j * qs + (size_t)h * d_qk;
                        float p = expf(attn_dot(qi, kj, d_qk) * scale - L);
                        float dp = attn_dot(doi, v + (size_t)j * vs + (size_t)h * d_v, d_v);
                        attn_axpy(dqi, scale * (p * (dp - Di)), kj, d_qk);
                    }
                }
            }
    }
    /* Pass 2: per key block, dv_j += Σ_i p_ij dout_i and dk_j += scale · Σ_i ds_ij q_i, i ascending. */
    if (dk || dv) {
        #pragma omp parallel for collapse(2) schedule(dynamic, 1) if ((long)T * H > ATTN_BLOCK)
        for (int h = 0; h < H; h++)
            for (int b = 0; b < nb; b++) {
                int j0 = b * ATTN_BLOCK, j1 = imin(T, j0 + ATTN_BLOCK) - 1;
                for (int i = j0; i < T; i++) {
                    int lo = doc_start ? doc_start[i] : 0;
                    int ja = imax(j0, lo), jb = imin(j1, i);
                    if (ja > jb) continue;
                    size_t r = (size_t)i * (size_t)H + (size_t)h;
                    const float *qi = q + r * (size_t)d_qk, *doi = dout + r * (size_t)d_v;
                    float Di = attn_dot(doi, out + r * (size_t)d_v, d_v), L = lse[r];
                    for (int j = ja; j <= jb; j++) {
                        size_t kr = (size_t)j * (size_t)H + (size_t)h;
                        const float *kj = k + kr * (size_t)d_qk, *vj = v + kr * (size_t)d_v;
                        float p = expf(attn_dot(qi, kj, d_qk) * scale - L);
                        if (dv) attn_axpy(dv + kr * (size_t)d_v, p, doi, d_v);
                        if (dk) {
                            float dp = attn_dot(doi, vj, d_v);
                            attn_axpy(dk + kr * (size_t)d_qk, scale * (p * (dp - Di)), qi, d_qk);
                        }
                    }
                }
            }
    }
}

/* Heads handled together by one decode task (they share each cache block while it is hot in cache). Only speed
 * depends on it: each (b, h) runs the same operations in the same order whatever the grouping. */
#define DECODE_HEAD_GROUP 8

int mla_decode_absorbed(float *out, const float *q, const float *const *c_kv, const float *const *k_rope,
                        const int32_t *len, const float *w_kvb, int B, int H, int d_nope, int d_rope, int d_v,
                        int r_kv, float scale, mr_err *e) {
    if (B < 0 || H <= 0 || d_nope <= 0 || d_rope < 0 || d_v <= 0 || r_kv <= 0)
        return err_set(e, MR_EINVAL,
                       "mla_decode_absorbed: sizes must be positive, got B=%d H=%d d_nope=%d d_rope=%d d_v=%d r_kv=%d",
                       B, H, d_nope, d_rope, d_v, r_kv);
    for (int b = 0; b < B; b++)
        if (len[b] < 1)
            return err_set(e, MR_EINVAL, "mla_decode_absorbed: sequence %d: cache length must be >= 1, got %d", b,
                           (int)len[b]);
    if (B == 0) return MR_OK;
    int d_qk = d_nope + d_rope, hs = d_nope + d_v;
    int G = imin(DECODE_HEAD_GROUP, H), ng = (H + G - 1) / G;
    int nthr = omp_get_max_threads();
    size_t per = (size_t)G * 2 * (size_t)r_kv, n;
    if (size_mul(per, (size_t)nthr, &n) || size_mul(n, sizeof(float), &n))
        return err_set(e, MR_ENOMEM, "mla_decode_absorbed: scratch size overflows (r_kv=%d)", r_kv);
    float *scratch = mem_alloc(n);
    if (!scratch)
        return err_set(e, MR_ENOMEM, "mla_decode_absorbed: out of memory for %zu bytes of scratch", n);

    #pragma omp parallel for collapse(2) schedule(dynamic, 1) num_threads(nthr) if ((long)B * ng > 1)
    for (int b = 0; b < B; b++)
        for (int g = 0; g < ng; g++) {
            float *qt = scratch + (size_t)omp_get_thread_num() * per; /* (G, r_kv) absorbed queries */
            float *z = qt + (size_t)G * r_kv;                         /* (G, r_kv) latent accumulators */
            float m[DECODE_HEAD_GROUP], l[DECODE_HEAD_GROUP], sbuf[DECODE_HEAD_GROUP][ATTN_BLOCK];
            int h0 = g * G, gn = imin(G, H - h0), S = len[b];
            const float *cb = c_kv[b], *kb = k_rope[b];
            /* q̃[h] = W_UK[h]ᵀ q_nope[h]: rows e < d_nope of head h's block of kv_b, summed over e ascending. */
            for (int hh = 0; hh < gn; hh++) {
                const float *qn = q + ((size_t)b * H + (size_t)(h0 + hh)) * (size_t)d_qk;
                const float *wuk = w_kvb + (size_t)(h0 + hh) * (size_t)hs * (size_t)r_kv;
                float *qth = qt + (size_t)hh * r_kv;
                memset(qth, 0, (size_t)r_kv * sizeof(float));
                for (int c = 0; c < d_nope; c++) attn_axpy(qth, qn[c], wuk + (size_t)c * r_kv, r_kv);
                memset(z + (size_t)hh * r_kv, 0, (size_t)r_kv * sizeof(float));
                m[hh] = -INFINITY;
                l[hh] = 0.0f;
            }
            for (int j0 = 0; j0 < S; j0 += ATTN_BLOCK) {
                int jb = imin(j0 + ATTN_BLOCK, S) - 1;
                for (int hh = 0; hh < gn; hh++) {
                    const float *qp = q + ((size_t)b * H + (size_t)(h0 + hh)) * (size_t)d_qk + d_nope;
                    const float *qth = qt + (size_t)hh * r_kv;
                    float *zh = z + (size_t)hh * r_kv;
                    float bm = -INFINITY;
                    for (int j = j0; j <= jb; j++) {
                        float s = attn_dot(qth, cb + (size_t)j * r_kv, r_kv) +
                                  attn_dot(qp, kb + (size_t)j * d_rope, d_rope);
                        s *= scale;
                        sbuf[hh][j - j0] = s;
                        if (s > bm) bm = s;
                    }
                    if (bm > m[hh]) {
                        if (m[hh] != -INFINITY) {
                            float alpha = expf(m[hh] - bm);
                            l[hh] *= alpha;
                            attn_scal(zh, alpha, r_kv);
                        }
                        m[hh] = bm;
                    }
                    for (int j = j0; j <= jb; j++) {
                        float p = expf(sbuf[hh][j - j0] - m[hh]);
                        l[hh] += p;
                        attn_axpy(zh, p, cb + (size_t)j * r_kv, r_kv);
                    }
                }
            }
            /* out[h] = W_UV[h] z[h] / l: rows d_nope.. of head h's block of kv_b. */
            for (int hh = 0; hh < gn; hh++) {
                const float *wuv = w_kvb + ((size_t)(h0 + hh) * (size_t)hs + (size_t)d_nope) * (size_t)r_kv;
                const float *zh = z + (size_t)hh * r_kv;
                float *oh = out + ((size_t)b * H + (size_t)(h0 + hh)) * (size_t)d_v;
                for (int c = 0; c < d_v; c++) oh[c] = attn_dot(wuv + (size_t)c * r_kv, zh, r_kv) / l[hh];
            }
        }
    mem_free(scratch);
    return MR_OK;
}
