/* attention.c: causal (and document-masked) softmax attention, flash style, and MLA's absorbed decode
 * (MODEL-SPEC §5.5, §5.6). See attention.h for layouts.
 *
 * Determinism and batch invariance: a query row i with window [lo, i] walks its keys in blocks
 * [j0, min(i, j0 + ATTN_BLOCK − 1)], j0 = lo, lo + ATTN_BLOCK, ..., keeping a running max m and sum l (online
 * softmax, Milakov & Gimelshein 2018; FlashAttention, Dao et al. 2022). Every score is a sequential fused dot
 * product over the head dimension, every accumulation a sequential fused sum over keys ascending. None of this
 * depends on T, on which other rows share a tile, or on the thread count, so the row's bits are a function of
 * (q_i, k and v over [lo, i]) alone: the same row computed as the last row of its prefix, or inside its own
 * unpacked document (blocks start at the document's first token), is bitwise equal.
 *
 * Speed: rows that share lo and their last key block form a group; per key block, the keys are packed transposed
 * (head dim major) so that a register tile of R rows × 16·NJ keys accumulates scores with one broadcast per row and
 * one vector load per 16 keys (an outer-product micro-kernel, the vector lanes run over keys, never across the
 * reduction), then p·v accumulates R rows × 16·NV columns of v. Rows of a tile only share loads: each row's
 * operations are exactly those it would do alone. A row whose window ends inside the tile's key range finishes
 * its own keys by itself, so keys outside a row's window are never touched.
 *
 * One source, three compiled paths: the kernels are written once on 16-lane GCC vectors (v16f) with lanewise
 * fmaf, inlined into wrappers compiled for AVX-512, AVX2+FMA and baseline x86-64 (where fmaf is the libm call).
 * The lane count is part of the source, not of the ISA, and every operation is a correctly rounded IEEE operation,
 * so all three give identical bits; the path is picked once from the CPU (attention_force_isa can override it).
 *
 * Backward: pass 1 owns query rows (dq over keys ascending, as the forward), pass 2 owns key blocks (dk, dv over
 * queries ascending, one partial sum per chunk of ATTN_BLOCK queries added in chunk order); both recompute
 * p = exp(s − lse) and dp = dout·v with the same kernels, so they see the same bits, and no float atomics are
 * needed. Cost: 2 recomputations of the T²/2 scores per head, against the T² floats per head a stored P takes. */
#include "kernels/cpu/attention.h"

#include <assert.h>
#include <limits.h>
#include <math.h>
#include <omp.h>
#include <string.h>

#include "core/mem.h"

/* No helper takes a v16f by value (GCC notes an ABI change for 64-byte vector parameters on every build, even
 * for inlined helpers); returning one is fine but warns the same way, which does not matter: nothing here is a
 * real call. */
#pragma GCC diagnostic ignored "-Wpsabi"

static inline int imin(int a, int b) { return a < b ? a : b; }
static inline int imax(int a, int b) { return a > b ? a : b; }

/* ---- 16-lane vectors ---- */

typedef float v16f __attribute__((vector_size(64)));
typedef int32_t v16i __attribute__((vector_size(64)));
typedef uint32_t v16u __attribute__((vector_size(64)));

#define INL static inline __attribute__((always_inline))
#define BK ATTN_BLOCK /* keys per block = queries per task */
#define DC 64         /* head-dimension chunk packed at a time (stack scratch DC × BK floats) */
#define RMAX 8        /* largest register tile: rows ... */
#define VMAX 4        /* ... × 16-lane vectors */

/* Loads and stores through memcpy: unaligned, and no alignment peeling that could tie an order to an address. */
INL v16f vld(const float *p) {
    v16f v;
    memcpy(&v, p, sizeof v);
    return v;
}
#define vst(p, v)                                                                                                 \
    do {                                                                                                          \
        v16f vst_v_ = (v);                                                                                        \
        memcpy((p), &vst_v_, sizeof vst_v_);                                                                      \
    } while (0)
INL v16f vld_n(const float *p, int n) { /* first n lanes, the rest +0 */
    v16f v = {0};
    memcpy(&v, p, (size_t)n * sizeof(float));
    return v;
}
#define vst_n(p, v, n)                                                                                            \
    do {                                                                                                          \
        v16f vst_v_ = (v);                                                                                        \
        memcpy((p), &vst_v_, (size_t)(n) * sizeof(float));                                                        \
    } while (0)
INL v16i vldi(const int32_t *p) {
    v16i v;
    memcpy(&v, p, sizeof v);
    return v;
}
INL v16f vbc(float x) { return (v16f){x, x, x, x, x, x, x, x, x, x, x, x, x, x, x, x}; }
#define vsel(m, a, b) ((v16f)(((v16i)(a) & (m)) | ((v16i)(b) & ~(m)))) /* m ? a : b */

/* *d = a·b + c lanewise with one rounding: one vfmadd on the FMA paths, the libm fmaf on the portable one. */
INL void vfmad(v16f *d, const v16f *a, const v16f *b, const v16f *c) {
    v16f r;
    #pragma GCC unroll 16
    for (int l = 0; l < 16; l++) r[l] = __builtin_fmaf((*a)[l], (*b)[l], (*c)[l]);
    *d = r;
}
INL void vfmacc(v16f *acc, const v16f *a, const v16f *b) { vfmad(acc, a, b, acc); } /* acc += a·b, fused */

/* exp(x), ≤ 2 ulp: Cody–Waite reduction x = n·ln2 + r (|r| ≤ ln2/2; the ln2 split of Cephes' expf, whose hi part
 * makes n·C1 exact) and Cephes' degree-6 polynomial, evaluated with fused steps; 2^n is built in the exponent
 * bits as 2^(n−1)·2 so n = 128 stays finite. x < −86 gives 0 (exp < 5e-38: nothing next to a softmax sum ≥ 1),
 * x > 88.72 gives +inf, NaN gives NaN. Only IEEE operations: identical bits on every path. */
INL v16f vexp(const v16f *xp) {
    const v16f x = *xp;
    const v16f magic = vbc(12582912.0f); /* 1.5·2^23: adding it rounds to an integer, exactly */
    const v16f log2e = vbc(1.44269504088896341f), c1 = vbc(-0.693359375f), c2 = vbc(2.12194440e-4f);
    static const float poly[6] = {1.9875691500e-4f, 1.3981999507e-3f, 8.3334519073e-3f,
                                  4.1665795894e-2f, 1.6666665459e-1f, 5.0000001201e-1f};
    v16f t, n, r, p = vbc(poly[0]), y;
    vfmad(&t, &x, &log2e, &magic);
    n = t - magic;
    vfmad(&r, &n, &c1, &x);
    vfmad(&r, &n, &c2, &r);
    for (int i = 1; i < 6; i++) {
        v16f ci = vbc(poly[i]);
        vfmad(&p, &p, &r, &ci);
    }
    v16f r2 = r * r;
    vfmad(&y, &p, &r2, &r);
    y = y + vbc(1.0f);
    v16u e = ((v16u)t - (v16u)magic + 126u) << 23; /* 2^(n-1) for n in [-124, 128] */
    y = (y * (v16f)e) * vbc(2.0f);
    v16i under = x < vbc(-86.0f), over = x > vbc(88.72f);
    y = vsel(under, vbc(0.0f), y);
    return vsel(over, vbc(INFINITY), y);
}

INL float exp1(float x) {
    v16f v = vbc(x);
    return vexp(&v)[0];
}

/* Σ a_c b_c in a fixed order: lane l takes c ≡ l (mod 16) ascending (fused), then the tree
 * (l, l+8), (l, l+4), (l, l+2), (l, l+1). */
INL float vdot(const float *a, const float *b, int n) {
    v16f acc = {0};
    int c = 0;
    for (; c + 16 <= n; c += 16) {
        v16f x = vld(a + c), y = vld(b + c);
        vfmacc(&acc, &x, &y);
    }
    if (c < n) {
        v16f x = vld_n(a + c, n - c), y = vld_n(b + c, n - c);
        vfmacc(&acc, &x, &y);
    }
    float t[16];
    memcpy(t, &acc, sizeof t);
    for (int w = 8; w >= 1; w /= 2)
        for (int l = 0; l < w; l++) t[l] += t[l + w];
    return t[0];
}

/* bt[d][jj] = B[jj][c0 + d] for d < dn, jj < nk (B rows bs apart); columns nk..BK-1 = 0. */
INL void pack_t(float *bt, const float *B, size_t bs, int nk, int c0, int dn) {
    for (int jj = 0; jj < nk; jj++) {
        const float *br = B + (size_t)jj * bs + c0;
        for (int d = 0; d < dn; d++) bt[(size_t)d * BK + jj] = br[d];
    }
    if (nk < BK)
        for (int d = 0; d < dn; d++) memset(bt + (size_t)d * BK + nk, 0, (size_t)(BK - nk) * sizeof(float));
}

/* R is a compile-time constant in every expansion (so tiles live in registers); RM bounds the cases. */
#define DISPATCH_R(R, RM, CALL)                                                                                   \
    switch (R) {                                                                                                  \
    case 1: CALL(1); break;                                                                                       \
    case 2: if ((RM) >= 2) CALL(2); break;                                                                        \
    case 3: if ((RM) >= 3) CALL(3); break;                                                                        \
    case 4: if ((RM) >= 4) CALL(4); break;                                                                        \
    case 5: if ((RM) >= 5) CALL(5); break;                                                                        \
    case 6: if ((RM) >= 6) CALL(6); break;                                                                        \
    case 7: if ((RM) >= 7) CALL(7); break;                                                                        \
    case 8: if ((RM) >= 8) CALL(8); break;                                                                        \
    default: assert(0);                                                                                           \
    }

/* Scores micro-kernel: S[r][16·jv0 ..+16·NJ) += Σ_{d<dn} a_r[d] · bt[d][..], d ascending, fused (S rows BK apart,
 * a rows `as` apart, bt rows bts apart). Continuing a sum across head-dimension chunks keeps the same sequence. */
INL void k_scores(float *S, const float *a, size_t as, const float *bt, size_t bts, int dn, int jv0, const int R,
                  const int NJ) {
    v16f acc[RMAX][VMAX];
    #pragma GCC unroll 8
    for (int r = 0; r < R; r++)
        #pragma GCC unroll 4
        for (int v = 0; v < NJ; v++) acc[r][v] = vld(S + (size_t)r * BK + 16 * (jv0 + v));
    for (int d = 0; d < dn; d++) {
        v16f b[VMAX];
        #pragma GCC unroll 4
        for (int v = 0; v < NJ; v++) b[v] = vld(bt + (size_t)d * bts + 16 * (jv0 + v));
        #pragma GCC unroll 8
        for (int r = 0; r < R; r++) {
            v16f x = vbc(a[(size_t)r * as + d]);
            #pragma GCC unroll 4
            for (int v = 0; v < NJ; v++) vfmacc(&acc[r][v], &x, &b[v]);
        }
    }
    #pragma GCC unroll 8
    for (int r = 0; r < R; r++)
        #pragma GCC unroll 4
        for (int v = 0; v < NJ; v++) vst(S + (size_t)r * BK + 16 * (jv0 + v), acc[r][v]);
}

/* S[r][j] += a_r[0..dn) · bt[..][j] for rows r < nr and keys j < nk, rounded up to whole tiles: bt has readable
 * columns up to BK; the extra columns' scores are never used. */
INL void scores(float *S, const float *a, size_t as, const float *bt, size_t bts, int dn, int nr, int nk,
                const int RS, const int NJ) {
    int nvk = (nk + 15) / 16;
    for (int r0 = 0; r0 < nr; r0 += RS) {
        int R = imin(RS, nr - r0);
        for (int v0 = 0; v0 < nvk; v0 += NJ) {
#define CALL(RR) k_scores(S + (size_t)r0 * BK, a + (size_t)r0 * as, as, bt, bts, dn, v0, RR, NJ)
            DISPATCH_R(R, RS, CALL)
#undef CALL
        }
    }
}

/* S[r][j] += Σ_{c<d} a_r[c] x_{col0+j}[c], c ascending, for r < nr, j < nk: reading the call's transposed copy of x
 * (xt: this head's (d, tp) block) when there is one, else packing x (rows xs apart) chunk by chunk into pk here.
 * Both give the same bits; the copy saves repacking the same keys for every query block. */
INL void scores_src(float *S, const float *a, size_t as, const float *xt, size_t tp, const float *x, size_t xs,
                    int col0, int nk, int d, int nr, float *pk, const int RS, const int NJ) {
    if (xt) {
        scores(S, a, as, xt + col0, tp, d, nr, nk, RS, NJ);
        return;
    }
    for (int c0 = 0; c0 < d; c0 += DC) {
        int dn = imin(DC, d - c0);
        pack_t(pk, x + (size_t)col0 * xs, xs, nk, c0, dn);
        scores(S, a + c0, as, pk, BK, dn, nr, nk, RS, NJ);
    }
}

/* P·V micro-kernel on columns [c0, c0 + 16·NV) (the last vector has nl lanes when !FULL): for r < R,
 * C[r][..] (+)= Σ_{j in [ja, jb)} P[r][j] · B[j][..], j ascending, fused. ADD = 0 accumulates into C itself;
 * ADD = 1 accumulates from +0 and adds the sum to C (then zero weights leave C's bits exactly as they were). */
INL void k_pv(float *C, size_t cs, const float *P, const float *B, size_t bs, int ja, int jb, int c0, int nl,
              const int R, const int NV, const int ADD, const int FULL) {
    v16f acc[RMAX][VMAX];
    #pragma GCC unroll 8
    for (int r = 0; r < R; r++)
        #pragma GCC unroll 4
        for (int v = 0; v < NV; v++) {
            const float *cp = C + (size_t)r * cs + c0 + 16 * v;
            acc[r][v] = ADD ? (v16f){0} : FULL ? vld(cp) : vld_n(cp, nl);
        }
    for (int j = ja; j < jb; j++) {
        v16f b[VMAX];
        const float *bp = B + (size_t)j * bs + c0;
        #pragma GCC unroll 4
        for (int v = 0; v < NV; v++) b[v] = FULL ? vld(bp + 16 * v) : vld_n(bp, nl);
        #pragma GCC unroll 8
        for (int r = 0; r < R; r++) {
            v16f x = vbc(P[(size_t)r * BK + j]);
            #pragma GCC unroll 4
            for (int v = 0; v < NV; v++) vfmacc(&acc[r][v], &x, &b[v]);
        }
    }
    #pragma GCC unroll 8
    for (int r = 0; r < R; r++)
        #pragma GCC unroll 4
        for (int v = 0; v < NV; v++) {
            float *cp = C + (size_t)r * cs + c0 + 16 * v;
            if (FULL) vst(cp, ADD ? vld(cp) + acc[r][v] : acc[r][v]);
            else vst_n(cp, ADD ? vld_n(cp, nl) + acc[r][v] : acc[r][v], nl);
        }
}

/* All ncol columns of k_pv for R rows: NV-vector steps, then 2-, 1-vector steps, then the partial vector. */
INL void pv_tile(float *C, size_t cs, const float *P, const float *B, size_t bs, int ja, int jb, int ncol,
                 const int R, const int NV, const int ADD) {
    int c0 = 0;
    for (; c0 + 16 * NV <= ncol; c0 += 16 * NV) k_pv(C, cs, P, B, bs, ja, jb, c0, 16, R, NV, ADD, 1);
    if (NV > 2)
        for (; c0 + 32 <= ncol; c0 += 32) k_pv(C, cs, P, B, bs, ja, jb, c0, 16, R, 2, ADD, 1);
    for (; c0 + 16 <= ncol; c0 += 16) k_pv(C, cs, P, B, bs, ja, jb, c0, 16, R, 1, ADD, 1);
    if (c0 < ncol) k_pv(C, cs, P, B, bs, ja, jb, c0, ncol - c0, R, 1, ADD, 0);
}

/* C rows r < nr (cs apart) += Σ_{j < n[r]} P[r][j] B[j] into C directly, n nondecreasing in r: a tile runs to its
 * first row's n, then each longer row finishes its own keys alone. */
INL void pv_rows(float *C, size_t cs, const float *P, const int *n, int nr, const float *B, size_t bs, int ncol,
                 const int RP, const int NV) {
    for (int r0 = 0; r0 < nr; r0 += RP) {
        int R = imin(RP, nr - r0), nmin = n[r0];
#define CALL(RR) pv_tile(C + (size_t)r0 * cs, cs, P + (size_t)r0 * BK, B, bs, 0, nmin, ncol, RR, NV, 0)
        DISPATCH_R(R, RP, CALL)
#undef CALL
        for (int r = r0 + 1; r < r0 + R; r++) {
            assert(n[r] >= nmin);
            if (n[r] > nmin) pv_tile(C + (size_t)r * cs, cs, P + (size_t)r * BK, B, bs, nmin, n[r], ncol, 1, NV, 0);
        }
    }
}

/* C rows r < nr += (Σ_{j < nj} P[r][j] B[j] summed from +0): every row over the same range. */
INL void pv_add(float *C, size_t cs, const float *P, int nr, int nj, const float *B, size_t bs, int ncol,
                const int RP, const int NV) {
    for (int r0 = 0; r0 < nr; r0 += RP) {
        int R = imin(RP, nr - r0);
#define CALL(RR) pv_tile(C + (size_t)r0 * cs, cs, P + (size_t)r0 * BK, B, bs, 0, nj, ncol, RR, NV, 1)
        DISPATCH_R(R, RP, CALL)
#undef CALL
    }
}

/* ---- training form: tasks ---- */

typedef struct {
    float *out, *lse, *dq, *dk, *dv;       /* outputs (those not wanted are NULL) */
    const float *dout, *o, *L, *q, *k, *v; /* inputs (o, L: the forward's out and lse) */
    const int32_t *doc;                    /* (T) or NULL */
    const float *xt1, *xt2; /* transposed copies (H, d, tp) of the tensors the scores read (see run_*), or NULL */
    const float *D;         /* (T, H) dout·out, or NULL (computed where needed) */
    size_t tp;
    int T, H, dqk, dvd;
    float scale;
} attn_args;

static int row_lo(const attn_args *a, int i) {
    int lo = a->doc ? a->doc[i] : 0;
    assert(lo >= 0 && lo <= i);
    return lo;
}

/* End of the group starting at row g0 (< q1): the following rows with the same lo and the same last key block. */
static int group_end(const attn_args *a, int g0, int q1) {
    int lo = row_lo(a, g0), fb = (g0 - lo) / BK, g1 = g0 + 1;
    while (g1 < q1 && row_lo(a, g1) == lo && (g1 - lo) / BK == fb) g1++;
    return g1;
}

/* This head's block of a transposed copy, or NULL. */
static const float *xt_head(const float *xt, const attn_args *a, int h, int d) {
    return xt ? xt + (size_t)h * (size_t)d * a->tp : NULL;
}

/* D_i = dout_i · out_i for row i of head h. */
INL float row_D(const attn_args *a, size_t i, int h) {
    if (a->D) return a->D[i * (size_t)a->H + (size_t)h];
    size_t r = (i * (size_t)a->H + (size_t)h) * (size_t)a->dvd;
    return vdot(a->dout + r, a->o + r, a->dvd);
}

/* One forward softmax block of a row: srow holds its raw scores q·k over the block (n valid); on return it holds
 * p = exp(s − m) with m, l and the output row o rescaled as in the online softmax. */
INL void fwd_softmax_row(float *srow, int n, float scale, float *m, float *l, float *orow, int dv) {
    const v16i iota = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
    int nv = (n + 15) / 16;
    v16f vm = vbc(-INFINITY);
    for (int c = 0; c < nv; c++) {
        v16f s = vld(srow + 16 * c) * vbc(scale);
        vst(srow + 16 * c, s);
        s = vsel(iota + 16 * c < n, s, vbc(-INFINITY));
        vm = vsel(s > vm, s, vm);
    }
    float bm = -INFINITY;
    for (int l16 = 0; l16 < 16; l16++)
        if (vm[l16] > bm) bm = vm[l16];
    if (bm > *m) {
        if (*m != -INFINITY) {
            float alpha = exp1(*m - bm);
            *l *= alpha;
            for (int e = 0; e < dv; e++) orow[e] *= alpha;
        }
        *m = bm;
    }
    v16f mm = vbc(*m);
    for (int c = 0; c < nv; c++) {
        v16f z = vld(srow + 16 * c) - mm;
        vst(srow + 16 * c, vexp(&z));
    }
    float lv = *l;
    for (int j = 0; j < n; j++) lv += srow[j];
    *l = lv;
}

/* Forward for head h, query rows [b·BK, (b+1)·BK). xt1: k transposed. RS×NJ: score tile, RP×NV: p·v tile. */
INL void fwd_task(const attn_args *a, int h, int b, const int RS, const int NJ, const int RP, const int NV) {
    float S[BK * BK], pk[DC * BK], m[BK], l[BK];
    int n[BK];
    const int H = a->H, dqk = a->dqk, dv = a->dvd;
    const size_t qs = (size_t)H * dqk, vs = (size_t)H * dv;
    const float *qh = a->q + (size_t)h * dqk, *kh = a->k + (size_t)h * dqk, *vh = a->v + (size_t)h * dv;
    const float *kt = xt_head(a->xt1, a, h, dqk);
    float *oh = a->out + (size_t)h * dv;
    int q1 = imin(a->T, (b + 1) * BK);
    for (int g0 = b * BK, g1; g0 < q1; g0 = g1) {
        g1 = group_end(a, g0, q1);
        int lo = row_lo(a, g0), nr = g1 - g0, fb = (g0 - lo) / BK;
        for (int r = 0; r < nr; r++) {
            m[r] = -INFINITY;
            l[r] = 0.0f;
            memset(oh + (size_t)(g0 + r) * vs, 0, (size_t)dv * sizeof(float));
        }
        for (int kb = 0; kb <= fb; kb++) {
            int j0 = lo + kb * BK, nk = kb < fb ? BK : g1 - j0;
            memset(S, 0, (size_t)nr * BK * sizeof(float));
            scores_src(S, qh + (size_t)g0 * qs, qs, kt, a->tp, kh, qs, j0, nk, dqk, nr, pk, RS, NJ);
            for (int r = 0; r < nr; r++) {
                n[r] = kb < fb ? BK : g0 + r - j0 + 1;
                fwd_softmax_row(S + (size_t)r * BK, n[r], a->scale, &m[r], &l[r], oh + (size_t)(g0 + r) * vs, dv);
            }
            pv_rows(oh + (size_t)g0 * vs, vs, S, n, nr, vh + (size_t)j0 * vs, vs, dv, RP, NV);
        }
        for (int r = 0; r < nr; r++) {
            float *orow = oh + (size_t)(g0 + r) * vs;
            for (int e = 0; e < dv; e++) orow[e] /= l[r];
            a->lse[(size_t)(g0 + r) * H + h] = m[r] + logf(l[r]);
        }
    }
}

/* Backward pass 1 for head h, query rows [b·BK, (b+1)·BK): dq_i += Σ_j ds_ij k_j, keys ascending, with
 * ds_ij = scale · p_ij (dout_i·v_j − D_i), p_ij = exp(s_ij − lse_i), D_i = dout_i·out_i. xt1, xt2: k, v transposed. */
INL void bwd_q_task(const attn_args *a, int h, int b, const int RS, const int NJ, const int RP, const int NV) {
    float S[BK * BK], dP[BK * BK], pk[DC * BK], L[BK], D[BK];
    int n[BK];
    const int H = a->H, dqk = a->dqk, dv = a->dvd;
    const size_t qs = (size_t)H * dqk, vs = (size_t)H * dv;
    const float *qh = a->q + (size_t)h * dqk, *kh = a->k + (size_t)h * dqk, *vh = a->v + (size_t)h * dv;
    const float *doh = a->dout + (size_t)h * dv;
    const float *kt = xt_head(a->xt1, a, h, dqk), *vt = xt_head(a->xt2, a, h, dv);
    float *dqh = a->dq + (size_t)h * dqk;
    const float scale = a->scale;
    int q1 = imin(a->T, (b + 1) * BK);
    for (int g0 = b * BK, g1; g0 < q1; g0 = g1) {
        g1 = group_end(a, g0, q1);
        int lo = row_lo(a, g0), nr = g1 - g0, fb = (g0 - lo) / BK;
        for (int r = 0; r < nr; r++) {
            L[r] = a->L[(size_t)(g0 + r) * H + h];
            D[r] = row_D(a, (size_t)(g0 + r), h);
        }
        for (int kb = 0; kb <= fb; kb++) {
            int j0 = lo + kb * BK, nk = kb < fb ? BK : g1 - j0;
            memset(S, 0, (size_t)nr * BK * sizeof(float));
            memset(dP, 0, (size_t)nr * BK * sizeof(float));
            scores_src(S, qh + (size_t)g0 * qs, qs, kt, a->tp, kh, qs, j0, nk, dqk, nr, pk, RS, NJ);
            scores_src(dP, doh + (size_t)g0 * vs, vs, vt, a->tp, vh, vs, j0, nk, dv, nr, pk, RS, NJ);
            for (int r = 0; r < nr; r++) {
                n[r] = kb < fb ? BK : g0 + r - j0 + 1;
                float *sr = S + (size_t)r * BK, *dr = dP + (size_t)r * BK;
                v16f Lr = vbc(L[r]), Dr = vbc(D[r]);
                for (int c = 0; c < (n[r] + 15) / 16; c++) {
                    v16f z = vld(sr + 16 * c) * vbc(scale) - Lr, p = vexp(&z);
                    vst(sr + 16 * c, vbc(scale) * (p * (vld(dr + 16 * c) - Dr)));
                }
            }
            pv_rows(dqh + (size_t)g0 * qs, qs, S, n, nr, kh + (size_t)j0 * qs, qs, dqk, RP, NV);
        }
    }
}

/* Backward pass 2 for head h, keys [c·BK, (c+1)·BK): per chunk of BK queries (ascending), dv_j += Σ_i p_ij dout_i
 * and dk_j += Σ_i ds_ij q_i, each chunk's sum formed from +0 over i ascending (pairs outside the mask weigh
 * exactly +0) and then added to the row. xt1, xt2: q, dout transposed. */
INL void bwd_kv_task(const attn_args *a, int h, int c, const int RS, const int NJ, const int RP, const int NV) {
    float St[BK * BK], dPt[BK * BK], pk[DC * BK], Lc[BK], Dc[BK];
    int32_t loc[BK], ic[BK];
    const int T = a->T, H = a->H, dqk = a->dqk, dv = a->dvd, nb = (T + BK - 1) / BK;
    const size_t qs = (size_t)H * dqk, vs = (size_t)H * dv;
    const float *qh = a->q + (size_t)h * dqk, *kh = a->k + (size_t)h * dqk, *vh = a->v + (size_t)h * dv;
    const float *doh = a->dout + (size_t)h * dv;
    const float *qt = xt_head(a->xt1, a, h, dqk), *dot = xt_head(a->xt2, a, h, dv);
    const float scale = a->scale;
    int j0 = c * BK, nkr = imin(T, j0 + BK) - j0;
    for (int qc = c; qc < nb; qc++) {
        int i0 = qc * BK, nq = imin(T, i0 + BK) - i0, any = 0;
        for (int ii = 0; ii < BK; ii++) {
            if (ii < nq) {
                loc[ii] = row_lo(a, i0 + ii);
                ic[ii] = i0 + ii;
                any |= loc[ii] < j0 + nkr;
            } else {
                loc[ii] = INT_MAX, ic[ii] = -1;
            }
        }
        if (!any) continue; /* every query of the chunk starts its document after this key block */
        for (int ii = 0; ii < BK; ii++) {
            Lc[ii] = ii < nq ? a->L[(size_t)(i0 + ii) * H + h] : 0.0f;
            Dc[ii] = ii < nq && a->dk ? row_D(a, (size_t)(i0 + ii), h) : 0.0f;
        }
        memset(St, 0, (size_t)nkr * BK * sizeof(float));
        scores_src(St, kh + (size_t)j0 * qs, qs, qt, a->tp, qh, qs, i0, nq, dqk, nkr, pk, RS, NJ);
        if (a->dk) {
            memset(dPt, 0, (size_t)nkr * BK * sizeof(float));
            scores_src(dPt, vh + (size_t)j0 * vs, vs, dot, a->tp, doh, vs, i0, nq, dv, nkr, pk, RS, NJ);
        }
        for (int jj = 0; jj < nkr; jj++) {
            float *sr = St + (size_t)jj * BK, *dr = dPt + (size_t)jj * BK;
            v16i j = (v16i){0} + (j0 + jj);
            for (int v = 0; v < BK / 16; v++) {
                v16i ok = (vldi(loc + 16 * v) <= j) & (vldi(ic + 16 * v) >= j);
                v16f z = vld(sr + 16 * v) * vbc(scale) - vld(Lc + 16 * v), p = vexp(&z);
                if (a->dk)
                    vst(dr + 16 * v, vsel(ok, vbc(scale) * (p * (vld(dr + 16 * v) - vld(Dc + 16 * v))), vbc(0.0f)));
                vst(sr + 16 * v, vsel(ok, p, vbc(0.0f)));
            }
        }
        if (a->dv)
            pv_add(a->dv + (size_t)h * dv + (size_t)j0 * vs, vs, St, nkr, nq, doh + (size_t)i0 * vs, vs, dv, RP, NV);
        if (a->dk)
            pv_add(a->dk + (size_t)h * dqk + (size_t)j0 * qs, qs, dPt, nkr, nq, qh + (size_t)i0 * qs, qs, dqk, RP, NV);
    }
}

/* ---- instruction-set paths ---- */

typedef void (*task_fn)(const attn_args *a, int h, int b);

/* D[i] = dout_i · out_i for rows i in [i0, i1) of (T·H) rows. */
INL void d_rows(const attn_args *a, float *D, long i0, long i1) {
    for (long i = i0; i < i1; i++) {
        size_t r = (size_t)i * (size_t)a->dvd;
        D[i] = vdot(a->dout + r, a->o + r, a->dvd);
    }
}

/* Tile shapes per path (rows × 16-lane vectors): AVX-512 has 32 vector registers, AVX2 16 (a v16f takes two). */
#define PATH(NAME, ATTR, RS, NJ, RP, NV)                                                                           \
    ATTR static void fwd_##NAME(const attn_args *a, int h, int b) { fwd_task(a, h, b, RS, NJ, RP, NV); }          \
    ATTR static void bwdq_##NAME(const attn_args *a, int h, int b) { bwd_q_task(a, h, b, RS, NJ, RP, NV); }       \
    ATTR static void bwdkv_##NAME(const attn_args *a, int h, int b) { bwd_kv_task(a, h, b, RS, NJ, RP, NV); }     \
    ATTR static void drows_##NAME(const attn_args *a, float *D, long i0, long i1) { d_rows(a, D, i0, i1); }

PATH(generic, , 2, 1, 2, 1)
#if defined(__x86_64__) || defined(__i386__)
#define ATTN_X86 1
PATH(avx2, __attribute__((target("avx2,fma"))), 6, 1, 6, 1)
PATH(avx512, __attribute__((target("avx512f,avx2,fma"))), 4, 4, 4, 4)
#endif
#undef PATH

typedef struct {
    task_fn fwd, bwdq, bwdkv;
    void (*drows)(const attn_args *a, float *D, long i0, long i1);
} attn_path;

static attn_isa forced_isa = ATTN_ISA_AUTO;

attn_isa attention_force_isa(attn_isa isa) {
    attn_isa prev = forced_isa;
    forced_isa = isa;
    return prev;
}

static attn_isa isa_supported(void) {
#ifdef ATTN_X86
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))
        return ATTN_ISA_AVX512;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return ATTN_ISA_AVX2;
#endif
    return ATTN_ISA_GENERIC;
}

attn_isa attention_active_isa(void) {
    attn_isa best = isa_supported();
    if (forced_isa == ATTN_ISA_AUTO || forced_isa > best) return best;
    return forced_isa;
}

static attn_path path_now(void) {
    attn_isa isa = attention_active_isa();
#ifdef ATTN_X86
    if (isa == ATTN_ISA_AVX512) return (attn_path){fwd_avx512, bwdq_avx512, bwdkv_avx512, drows_avx512};
    if (isa == ATTN_ISA_AVX2) return (attn_path){fwd_avx2, bwdq_avx2, bwdkv_avx2, drows_avx2};
#endif
    (void)isa;
    return (attn_path){fwd_generic, bwdq_generic, bwdkv_generic, drows_generic};
}

/* Tasks (head, block), the longest first: query blocks from the last (forward, dq), key blocks from the first
 * (dk, dv). Each task writes only its own rows, so any schedule gives the same bits. */
static void run_tasks(task_fn fn, const attn_args *a, int last_first) {
    int nb = (a->T + BK - 1) / BK, H = a->H;
    long ntask = (long)nb * H;
    #pragma omp parallel for schedule(dynamic, 1) if (ntask > 1 && (long)a->T * H > BK)
    for (long t = 0; t < ntask; t++) {
        int b = (int)(t / H), h = (int)(t % H);
        fn(a, h, last_first ? nb - 1 - b : b);
    }
}

/* xt (H, d, tp) = x (T, H, d) transposed per head, columns T..tp-1 zero: the key-side operand of the scores,
 * packed once per call instead of once per (query block, key block). */
static void pack_all(float *xt, const float *x, int T, int H, int d, size_t tp) {
    #pragma omp parallel for schedule(static) if ((long)T * H * d > 65536)
    for (int h = 0; h < H; h++) {
        float *xh = xt + (size_t)h * (size_t)d * tp;
        for (int t0 = 0; t0 < T; t0 += 16) {
            int t1 = imin(T, t0 + 16);
            for (int c = 0; c < d; c++)
                for (int t = t0; t < t1; t++) xh[(size_t)c * tp + t] = x[((size_t)t * H + h) * d + c];
        }
        for (int c = 0; c < d; c++) memset(xh + (size_t)c * tp + T, 0, (tp - (size_t)T) * sizeof(float));
    }
}

/* Scratch for the transposed copies (and D): H·(d1 + d2)·tp + T·H floats, tp = T + BK rounded up to 16 (the score
 * tiles read up to BK − 1 columns past a block's keys). NULL when the size overflows or memory is short: the tasks
 * then pack per tile, with the same bits. */
static float *scratch_alloc(int T, int H, int d1, int d2, size_t *tp) {
    size_t n, m;
    *tp = ((size_t)T + BK + 15) / 16 * 16;
    if (size_mul((size_t)H, (size_t)d1 + (size_t)d2, &n) || size_mul(n, *tp, &n) ||
        size_add(n, (size_t)T * (size_t)H, &n) || size_mul(n, sizeof(float), &m))
        return NULL;
    return mem_alloc(m);
}

void attention_forward(float *out, float *lse, const float *q, const float *k, const float *v,
                       const int32_t *doc_start, int T, int H, int d_qk, int d_v, float scale) {
    if (T <= 0 || H <= 0) return;
    attn_args a = {.out = out, .lse = lse, .q = q, .k = k, .v = v, .doc = doc_start, .T = T, .H = H, .dqk = d_qk,
                   .dvd = d_v, .scale = scale};
    attn_path path = path_now();
    float *xt = T > BK ? scratch_alloc(T, H, d_qk, 0, &a.tp) : NULL; /* one block: nothing packed twice */
    if (xt) {
        pack_all(xt, k, T, H, d_qk, a.tp);
        a.xt1 = xt;
    }
    run_tasks(path.fwd, &a, 1);
    mem_free(xt);
}

void attention_backward(float *dq, float *dk, float *dv, const float *dout, const float *out, const float *lse,
                        const float *q, const float *k, const float *v, const int32_t *doc_start, int T, int H,
                        int d_qk, int d_v, float scale) {
    if (T <= 0 || H <= 0 || (!dq && !dk && !dv)) return;
    attn_args a = {.dq = dq, .dk = dk, .dv = dv, .dout = dout, .o = out, .L = lse, .q = q, .k = k, .v = v,
                   .doc = doc_start, .T = T, .H = H, .dqk = d_qk, .dvd = d_v, .scale = scale};
    attn_path path = path_now();
    float *xt = scratch_alloc(T, H, d_qk, d_v, &a.tp);
    if (xt) {
        float *D = xt + (size_t)H * ((size_t)d_qk + (size_t)d_v) * a.tp;
        long rows = (long)T * H, chunk = 256;
        #pragma omp parallel for schedule(static) if (rows > chunk)
        for (long i0 = 0; i0 < rows; i0 += chunk) path.drows(&a, D, i0, i0 + chunk < rows ? i0 + chunk : rows);
        a.D = D;
    }
    /* Pass 1: dq (scores read k and v transposed). */
    if (dq) {
        if (xt) {
            pack_all(xt, k, T, H, d_qk, a.tp);
            pack_all(xt + (size_t)H * d_qk * a.tp, v, T, H, d_v, a.tp);
            a.xt1 = xt, a.xt2 = xt + (size_t)H * d_qk * a.tp;
        }
        run_tasks(path.bwdq, &a, 1);
    }
    /* Pass 2: dk, dv (scores read q and dout transposed). */
    if (dk || dv) {
        if (xt) {
            pack_all(xt, q, T, H, d_qk, a.tp);
            pack_all(xt + (size_t)H * d_qk * a.tp, dout, T, H, d_v, a.tp);
            a.xt1 = xt, a.xt2 = xt + (size_t)H * d_qk * a.tp;
        }
        run_tasks(path.bwdkv, &a, 0);
    }
    mem_free(xt);
}
