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
 * Speed. The absorptions run per head over all rows of a chunk at once (q̃ for every row through W_UK[h], then
 * W_UV[h] over every row's z), so each head's block of kv_b is read once per chunk rather than once per row: in a
 * batched decode step every row reads its own cache, and per-row absorptions read all of kv_b from L2 per row.
 * In between, rows b..b+R-1 that read the same cache (training rows of one document, or a verify step's two rows)
 * form a tile with every head: R·H queries share each block of keys (MLA's latent is one "KV head" for all heads),
 * so the scores are an (R·H × 64) matrix product over the latent and p·c another, on the matmul's register tiles
 * instead of one dot per query and key. A row whose window ends inside a block gets p = 0 for the keys past its end; a
 * fused chain from +0 is unchanged by adding 0·c (x + ±0 = x, and +0 + −0 = +0), so its bits are those it has
 * alone. (The keys past a row's end are then read, so they must be finite: the tile's later rows' latents.) */
#include <math.h>
#include <omp.h>
#include <string.h>

#include "core/mem.h"
#include "kernels/cpu/attention.h"
#include "kernels/cpu/dense.h"

#define TILE_QUERIES 64 /* rows × heads per tile, at most (dense_det_acc's block): only speed depends on it */

/* q̃ and z of a chunk of rows take at most this many floats (a chunk holds one tile at least) */
#define CHUNK_FLOATS ((size_t)1 << 20)

static inline int imin(int a, int b) { return a < b ? a : b; }
static inline int imax(int a, int b) { return a > b ? a : b; }

typedef struct {
    const float *q, *const *c_kv, *const *k_rope, *w_kvb;
    const int32_t *len;
    float *out, *lse;
    int H, d_nope, d_rope, d_v, r_kv;
    float scale;
    /* the chunk of rows c0..c0+n-1: q̃ and z head-major, (H, n, r_kv); m and l row-major, (n, H) */
    float *qt, *z, *m, *l;
    int c0, n;
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
static void tile(const abs_args *a, const abs_scratch *S0, int b0, int R, int h0, int G) {
    const int H = a->H, dn = a->d_nope, dr = a->d_rope, rkv = a->r_kv, dqk = dn + dr, RG = R * G, nc = a->n;
    const float *cb = a->c_kv[b0], *kb = a->k_rope[b0];
    /* a chunk of this one tile has q̃ and z in the tile's own layout (query g·R + r): used in place */
    abs_scratch Sv = *S0, *S = &Sv;
    const int own = nc == R;
    if (own) S->qt = a->qt + (size_t)h0 * R * rkv, S->z = a->z + (size_t)h0 * R * rkv;
    memset(S->z, 0, sizeof(float) * (size_t)RG * rkv);
    for (int g = 0; g < G; g++) {
        const int h = h0 + g;
        /* the R rows' q̃ of head h (absorbed already) and their RoPE queries */
        if (!own)
            memcpy(S->qt + (size_t)g * R * rkv, a->qt + ((size_t)h * nc + (size_t)(b0 - a->c0)) * rkv,
                   sizeof(float) * (size_t)R * rkv);
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
    /* z, m, l back to the chunk's buffers: W_UV runs per head over the whole chunk (absorb_out) */
    for (int g = 0; g < G; g++) {
        const int h = h0 + g;
        if (!own)
            memcpy(a->z + ((size_t)h * nc + (size_t)(b0 - a->c0)) * rkv, S->z + (size_t)g * R * rkv,
                   sizeof(float) * (size_t)R * rkv);
        for (int r = 0; r < R; r++) {
            const size_t i = (size_t)(b0 - a->c0 + r) * H + (size_t)h;
            a->m[i] = S->m[g * R + r];
            a->l[i] = S->l[g * R + r];
        }
    }
}

/* Row blocks of a chunk, per head: the unit of work of the two absorptions. */
#define ABSORB_ROWS 64

/* q̃ of head h, chunk rows r0..r0+nr-1: their q_nope (rows H·d_qk apart) through W_UK[h]. */
static void absorb_in(const abs_args *a, int h, int r0, int nr) {
    const int H = a->H, dn = a->d_nope, dqk = dn + a->d_rope, rkv = a->r_kv;
    const size_t hs = (size_t)(dn + a->d_v) * (size_t)rkv; /* one head's block of kv_b */
    float *qt = a->qt + ((size_t)h * a->n + (size_t)r0) * rkv;
    memset(qt, 0, sizeof(float) * (size_t)nr * rkv);
    dense_det_acc(qt, (size_t)rkv, a->q + ((size_t)(a->c0 + r0) * H + h) * dqk, (size_t)H * dqk, 1,
                  a->w_kvb + (size_t)h * hs, (size_t)rkv, nr, rkv, dn);
}

/* out = W_UV[h] z / l for head h, chunk rows r0..r0+nr-1, written straight into (B, H, d_v); lse = m + log l. */
static void absorb_out(const abs_args *a, int h, int r0, int nr) {
    const int H = a->H, dn = a->d_nope, dv = a->d_v, rkv = a->r_kv;
    const size_t hs = (size_t)(dn + dv) * (size_t)rkv;
    const int b0 = a->c0 + r0;
    float *o = a->out + ((size_t)b0 * H + h) * dv;
    dense_det_dot(o, H * dv, a->z + ((size_t)h * a->n + (size_t)r0) * rkv, a->w_kvb + (size_t)h * hs + (size_t)dn * rkv,
                  rkv, 0, nr, dv);
    for (int r = 0; r < nr; r++) {
        const size_t i = (size_t)(r0 + r) * H + (size_t)h;
        float *orow = o + (size_t)r * H * dv;
        for (int c = 0; c < dv; c++) orow[c] /= a->l[i];
        if (a->lse) a->lse[(size_t)(b0 + r) * H + h] = a->m[i] + logf(a->l[i]);
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
    const int nthr = nt * ng > 1 || H > 1 ? maxthr : 1;
    int Rtop = 1; /* the largest tile: the per-thread scratch holds one */
    for (int t = 0; t < nt; t++) Rtop = imax(Rtop, start[t + 1] - start[t]);
    /* chunks of whole tiles whose q̃ and z take at most CHUNK_FLOATS (one tile at least) */
    const int cap = imin(B, imax(Rtop, (int)(CHUNK_FLOATS / (2 * (size_t)H * (size_t)r_kv))));
    size_t per = scratch_floats(Rtop * G, r_kv, d_rope), hq = (size_t)cap * (size_t)H, n;
    if (size_mul(per, (size_t)nthr, &n) || size_add(n, 2 * hq * (size_t)r_kv + 2 * hq, &n) ||
        size_mul(n, sizeof(float), &n)) {
        mem_free(start);
        return err_set(e, MR_ENOMEM, "mla_decode_absorbed: scratch size overflows (r_kv=%d)", r_kv);
    }
    float *scratch = mem_alloc(n);
    if (!scratch) {
        mem_free(start);
        return err_set(e, MR_ENOMEM, "mla_decode_absorbed: out of memory for %zu bytes of scratch", n);
    }
    float *chunk = scratch + per * (size_t)nthr;
    const abs_args a0 = {.q = q, .c_kv = c_kv, .k_rope = k_rope, .w_kvb = w_kvb, .len = len, .out = out, .lse = lse,
                         .H = H, .d_nope = d_nope, .d_rope = d_rope, .d_v = d_v, .r_kv = r_kv, .scale = scale,
                         .qt = chunk, .z = chunk + hq * r_kv, .m = chunk + 2 * hq * r_kv,
                         .l = chunk + 2 * hq * r_kv + hq};
#pragma omp parallel num_threads(nthr) if (nthr > 1)
    for (int t0 = 0, t1; t0 < nt; t0 = t1) {
        for (t1 = t0 + 1; t1 < nt && start[t1 + 1] - start[t0] <= cap;) t1++;
        abs_args a = a0;
        a.c0 = start[t0], a.n = start[t1] - start[t0];
        /* one tile (decode of one sequence): its tasks absorb their own heads, with no barrier in between */
        const int one = t1 - t0 == 1, nrb = (a.n + ABSORB_ROWS - 1) / ABSORB_ROWS, ntask = (t1 - t0) * ng;
        if (!one) {
#pragma omp for schedule(dynamic, 1)
            for (int k = 0; k < H * nrb; k++) {
                const int r0 = k % nrb * ABSORB_ROWS;
                absorb_in(&a, k / nrb, r0, imin(ABSORB_ROWS, a.n - r0));
            }
        }
        /* the last tiles have the longest windows: they go first */
#pragma omp for schedule(dynamic, 1) nowait
        for (int k = ntask - 1; k >= 0; k--) {
            const int t = t0 + k / ng, h0 = (k % ng) * G, b0 = start[t], R = start[t + 1] - b0;
            if (h0 >= H) continue;
            const int g = imin(G, H - h0);
            const abs_scratch S = scratch_carve(scratch + (size_t)omp_get_thread_num() * per, R * g, r_kv, d_rope);
            if (one)
                for (int h = h0; h < h0 + g; h++) absorb_in(&a, h, 0, R);
            tile(&a, &S, b0, R, h0, g);
            if (one)
                for (int h = h0; h < h0 + g; h++) absorb_out(&a, h, 0, R);
        }
        if (!one) {
#pragma omp barrier
#pragma omp for schedule(dynamic, 1) nowait
            for (int k = 0; k < H * nrb; k++) {
                const int r0 = k % nrb * ABSORB_ROWS;
                absorb_out(&a, k / nrb, r0, imin(ABSORB_ROWS, a.n - r0));
            }
        }
        /* the next chunk reuses the buffers (the region's end waits after the last) */
        if (t1 < nt) {
#pragma omp barrier
        }
    }
    mem_free(scratch);
    mem_free(start);
    return MR_OK;
}
