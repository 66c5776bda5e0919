/* attention_absorbed.c: MLA's absorbed attention over the latent cache (MODEL-SPEC §5.6): decode, and the MM_DET
 * training forward (model.c runs every training row through it, so the rollout's log-probs equal the trainer's).
 *
 * Numerics. Each (row b, head h) is computed by this sequence, and by nothing else:
 *   q̃ = Σ_c q_nope[c]·W_UK[c][:]          c = 0..d_nope-1, one fused chain per element    (dense_det_acc)
 *   for key blocks [j0, j0 + ATTN_BLOCK) ∩ [0, len), j0 = 0, ATTN_BLOCK, ...:
 *     s_u = (q̃·c_u  +  q_pe·kr_u) · scale  each dot in matmul_forward's MM_DET order, the rope dot added second
 *     bm = max_u s_u; if bm > m: (l, z) *= exp(m − bm) unless m = −∞; m = bm
 *     p_u = exp(s_u − m); l += p_u (u ascending); z += Σ_u p_u·c_u (one fused chain per element, then added)
 *   out = (W_UV · z) / l (MM_DET dots), lse = m + log(l).
 * The dot and chain kernels are the batch-invariant matmul's (kernels/cpu/dense.h), so the bits are the same on
 * every ISA path and do not depend on which other rows or heads share a tile, or on the thread count.
 *
 * Speed. Rows b..b+R-1 that read the same cache (training rows of one document, or a verify step's two rows) form a
 * tile with every head: R·H queries share each block of keys (MLA's latent is one "KV head" for all heads), so the
 * scores are an (R·H × 64) matrix product over the latent and p·c another, on the matmul's register tiles instead
 * of one dot per query and key. A row whose window ends inside a block gets p = 0 for the keys past its end; a
 * fused chain from +0 is unchanged by adding 0·c (x + ±0 = x, and +0 + −0 = +0), so its bits are those it has
 * alone. (The keys past a row's end are then read, so they must be finite: the tile's later rows' latents.) */
#include <math.h>
#include <omp.h>
#include <string.h>

#include "core/mem.h"
#include "kernels/cpu/attention.h"
#include "kernels/cpu/dense.h"

#define TILE_QUERIES 64 /* rows × heads per tile, at most (dense_det_acc's block): only speed depends on it */

static inline int imin(int a, int b) { return a < b ? a : b; }

typedef struct {
    const float *q, *const *c_kv, *const *k_rope, *w_kvb;
    const int32_t *len;
    float *out, *lse;
    int H, d_nope, d_rope, d_v, r_kv;
    float scale;
} abs_args;

/* Per-thread scratch of one tile of R rows × G heads, head-major (query i = g·R + r). */
typedef struct {
    float *qt, *qp, *s, *p, *z, *m, *l;
} abs_scratch;

static size_t scratch_floats(int RH, int r_kv, int d_rope) {
    return (size_t)RH * (2 * (size_t)r_kv + (size_t)d_rope + 2 * ATTN_BLOCK + 2);
}

static abs_scratch scratch_carve(float *base, int RH, int r_kv, int d_rope) {
    abs_scratch S;
    S.qt = base;
    S.z = S.qt + (size_t)RH * r_kv;
    S.qp = S.z + (size_t)RH * r_kv;
    S.s = S.qp + (size_t)RH * d_rope;
    S.p = S.s + (size_t)RH * ATTN_BLOCK;
    S.m = S.p + (size_t)RH * ATTN_BLOCK;
    S.l = S.m + RH;
    return S;
}

/* Rows b0..b0+R-1 (the same cache, lengths ascending) × heads h0..h0+G-1. */
static void tile(const abs_args *a, const abs_scratch *S, int b0, int R, int h0, int G) {
    const int H = a->H, dn = a->d_nope, dr = a->d_rope, dv = a->d_v, rkv = a->r_kv, dqk = dn + dr, RG = R * G;
    const size_t hs = (size_t)(dn + dv) * (size_t)rkv; /* one head's block of kv_b */
    const float *cb = a->c_kv[b0], *kb = a->k_rope[b0];
    memset(S->qt, 0, sizeof(float) * (size_t)RG * rkv);
    memset(S->z, 0, sizeof(float) * (size_t)RG * rkv);
    for (int g = 0; g < G; g++) {
        const int h = h0 + g;
        /* q̃ of head h for the R rows: their q_nope (rows H·d_qk apart) through W_UK[h] */
        dense_det_acc(S->qt + (size_t)g * R * rkv, (size_t)rkv, a->q + ((size_t)b0 * H + h) * dqk, (size_t)H * dqk, 1,
                      a->w_kvb + (size_t)h * hs, (size_t)rkv, R, rkv, dn);
        for (int r = 0; r < R; r++)
            memcpy(S->qp + ((size_t)g * R + r) * dr, a->q + ((size_t)(b0 + r) * H + h) * dqk + dn, sizeof(float) * dr);
    }
    for (int i = 0; i < RG; i++) S->m[i] = -INFINITY, S->l[i] = 0.0f;

    const int Smax = a->len[b0 + R - 1];
    for (int j0 = 0; j0 < Smax; j0 += ATTN_BLOCK) {
        const int nk = imin(j0 + ATTN_BLOCK, Smax) - j0;
        int r_lo = 0; /* rows whose window reaches this block: a suffix of the tile */
        while (a->len[b0 + r_lo] <= j0) r_lo++;
        const int nr = R - r_lo;
        const float *cj = cb + (size_t)j0 * rkv, *kj = kb + (size_t)j0 * dr;
        /* scores of every reaching query against the block's nk keys */
        for (int g = 0; g < G; g++) {
            if (r_lo == 0 && g > 0) break; /* all rows reach it: one call covers every head */
            const int i0 = g * R + r_lo, rows = r_lo == 0 ? RG : nr;
            dense_det_dot(S->s + (size_t)i0 * ATTN_BLOCK, ATTN_BLOCK, S->qt + (size_t)i0 * rkv, cj, rkv, 0, rows, nk);
            if (dr > 0)
                dense_det_dot(S->s + (size_t)i0 * ATTN_BLOCK, ATTN_BLOCK, S->qp + (size_t)i0 * dr, kj, dr, 1, rows, nk);
        }
        /* online softmax per query, over its own keys of the block */
        for (int g = 0; g < G; g++)
            for (int r = r_lo; r < R; r++) {
                const int i = g * R + r, n = imin(a->len[b0 + r] - j0, nk);
                float *s = S->s + (size_t)i * ATTN_BLOCK, *p = S->p + (size_t)i * ATTN_BLOCK;
                float bm = -INFINITY;
                for (int u = 0; u < n; u++) {
                    s[u] *= a->scale;
                    if (s[u] > bm) bm = s[u];
                }
                if (bm > S->m[i]) {
                    if (S->m[i] != -INFINITY) {
                        const float alpha = expf(S->m[i] - bm);
                        float *zi = S->z + (size_t)i * rkv;
                        S->l[i] *= alpha;
                        for (int c = 0; c < rkv; c++) zi[c] *= alpha;
                    }
                    S->m[i] = bm;
                }
                float l = S->l[i];
                for (int u = 0; u < n; u++) {
                    p[u] = expf(s[u] - S->m[i]);
                    l += p[u];
                }
                S->l[i] = l;
                for (int u = n; u < nk; u++) p[u] = 0.0f;
            }
        /* z += p · c over the block */
        for (int g = 0; g < G; g++) {
            if (r_lo == 0 && g > 0) break;
            const int i0 = g * R + r_lo, rows = r_lo == 0 ? RG : nr;
            dense_det_acc(S->z + (size_t)i0 * rkv, (size_t)rkv, S->p + (size_t)i0 * ATTN_BLOCK, ATTN_BLOCK, 1, cj,
                          (size_t)rkv, rows, rkv, nk);
        }
    }
    /* out = W_UV[h] z / l, written straight into (B, H, d_v) */
    for (int g = 0; g < G; g++) {
        const int h = h0 + g;
        float *o = a->out + ((size_t)b0 * H + h) * dv;
        dense_det_dot(o, H * dv, S->z + (size_t)g * R * rkv, a->w_kvb + (size_t)h * hs + (size_t)dn * rkv, rkv, 0, R,
                      dv);
        for (int r = 0; r < R; r++) {
            const int i = g * R + r;
            float *orow = o + (size_t)r * H * dv;
            for (int c = 0; c < dv; c++) orow[c] /= S->l[i];
            if (a->lse) a->lse[(size_t)(b0 + r) * H + h] = S->m[i] + logf(S->l[i]);
        }
    }
}

int mla_decode_absorbed(float *out, const float *q, const float *const *c_kv, const float *const *k_rope,
                        const int32_t *len, const float *w_kvb, int B, int H, int d_nope, int d_rope, int d_v,
                        int r_kv, float scale, mr_err *e) {
    return mla_decode_absorbed_lse(out, NULL, q, c_kv, k_rope, len, w_kvb, B, H, d_nope, d_rope, d_v, r_kv, scale,
                                   e);
}

int mla_decode_absorbed_lse(float *out, float *lse, const float *q, const float *const *c_kv,
                            const float *const *k_rope, const int32_t *len, const float *w_kvb, int B, int H,
                            int d_nope, int d_rope, int d_v, int r_kv, float scale, mr_err *e) {
    if (B < 0 || H <= 0 || d_nope <= 0 || d_rope < 0 || d_v <= 0 || r_kv <= 0)
        return err_set(e, MR_EINVAL,
                       "mla_decode_absorbed: sizes must be positive, got B=%d H=%d d_nope=%d d_rope=%d d_v=%d r_kv=%d",
                       B, H, d_nope, d_rope, d_v, r_kv);
    for (int b = 0; b < B; b++)
        if (len[b] < 1)
            return err_set(e, MR_EINVAL, "mla_decode_absorbed: sequence %d: cache length must be >= 1, got %d", b,
                           (int)len[b]);
    if (B == 0) return MR_OK;
    /* tiles: runs of rows on the same cache with lengths ascending, at most Rmax rows */
    const int Rmax = H >= TILE_QUERIES ? 1 : TILE_QUERIES / H;
    int *start = mem_alloc(sizeof(int) * ((size_t)B + 1));
    if (!start) return err_set(e, MR_ENOMEM, "mla_decode_absorbed: out of memory for %d tiles", B);
    int nt = 0;
    for (int b = 0; b < B; b++) {
        const int b0 = nt ? start[nt - 1] : -1;
        if (nt && b - b0 < Rmax && c_kv[b] == c_kv[b0] && k_rope[b] == k_rope[b0] && len[b] >= len[b - 1]) continue;
        start[nt++] = b;
    }
    start[nt] = B;
    /* fewer tiles than threads (decode of one sequence): the heads are split too */
    const int maxthr = omp_get_max_threads();
    const int ng = nt >= maxthr ? 1 : imin(H, (maxthr + nt - 1) / nt), G = (H + ng - 1) / ng;
    const int ntask = nt * ng, nthr = ntask > 1 ? maxthr : 1, RH = Rmax * G;
    size_t per = scratch_floats(RH, r_kv, d_rope), n;
    if (size_mul(per, (size_t)nthr, &n) || size_mul(n, sizeof(float), &n)) {
        mem_free(start);
        return err_set(e, MR_ENOMEM, "mla_decode_absorbed: scratch size overflows (r_kv=%d)", r_kv);
    }
    float *scratch = mem_alloc(n);
    if (!scratch) {
        mem_free(start);
        return err_set(e, MR_ENOMEM, "mla_decode_absorbed: out of memory for %zu bytes of scratch", n);
    }
    const abs_args a = {.q = q, .c_kv = c_kv, .k_rope = k_rope, .w_kvb = w_kvb, .len = len, .out = out, .lse = lse,
                        .H = H, .d_nope = d_nope, .d_rope = d_rope, .d_v = d_v, .r_kv = r_kv, .scale = scale};
    /* the last tiles have the longest windows: they go first */
#pragma omp parallel for schedule(dynamic, 1) num_threads(nthr) if (ntask > 1)
    for (int k = ntask - 1; k >= 0; k--) {
        const int t = k / ng, h0 = (k % ng) * G, b0 = start[t], R = start[t + 1] - b0;
        if (h0 >= H) continue;
        const int g = imin(G, H - h0);
        const abs_scratch S = scratch_carve(scratch + (size_t)omp_get_thread_num() * per, R * g, r_kv, d_rope);
        tile(&a, &S, b0, R, h0, g);
    }
    mem_free(scratch);
    mem_free(start);
    return MR_OK;
}
