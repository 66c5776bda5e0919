/* dense.c: dense CPU kernels (see dense.h).
 *
 * The one idea: every output element is computed by exactly one thread, in an order that is a function of the
 * reduction length only. Threads partition OUTPUTS (rows, channels, tiles), never a reduction, so results do not
 * depend on the thread count; and nothing special-cases small T, so a row computed alone equals the same row in a
 * batch (batch invariance, needed for rollout == trainer log-probs).
 *
 * MM_DET forward is a "dot-product" kernel: y[t][o] = x[t]·w[o] with both operands contiguous in `in`, so W needs
 * no packing (decode, T = 1, streams W once). A 4x4 register tile keeps 16 accumulators of 16 lanes; the 16 lane
 * sums are finished together by a shuffle network that performs the fixed lane tree of dense.h on 16 elements at
 * once (AVX2: a 2x2 tile of 8-lane halves). MM_DET backward is an "outer-product" kernel (a fused chain over the
 * reduction index per element, AVX-512 on packed blocks). Portable C versions (fmaf) of both compute the same bits;
 * they are the fallback and the tests' cross-check.
 *
 * O3 + no-trapping-math let gcc vectorize the lane loops and if-convert exp_neg's selects; neither changes a value
 * (no reassociation, and contraction stays off in ISO C mode), so vector and scalar iterations give the same bits. */
#pragma GCC optimize("O3", "no-trapping-math")

#include "kernels/cpu/dense.h"

#include <assert.h>
#include <cblas.h>
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define DENSE_X86 1
#else
#define DENSE_X86 0
#endif

/* Below this many multiply-adds a kernel runs on the calling thread: a parallel region costs microseconds.
 * Only speed depends on it, never bits. */
#define PAR_MIN_WORK 32768

/* ------------------------------------------------------------------------------------------------------------ */
/* References                                                                                                   */
/* ------------------------------------------------------------------------------------------------------------ */

void matmul_forward_naive(float *y, const float *x, const float *w, int T, int in, int out, float beta) {
    for (int t = 0; t < T; t++)
        for (int o = 0; o < out; o++) {
            float s = 0.0f;
            for (int i = 0; i < in; i++) s += x[(size_t)t * in + i] * w[(size_t)o * in + i];
            y[(size_t)t * out + o] = (beta != 0.0f ? y[(size_t)t * out + o] : 0.0f) + s;
        }
}

void matmul_backward_naive(float *dx, float *dw, const float *dy, const float *x, const float *w, int T, int in,
                           int out) {
    if (dx)
        for (int t = 0; t < T; t++)
            for (int i = 0; i < in; i++) {
                float s = 0.0f;
                for (int o = 0; o < out; o++) s += dy[(size_t)t * out + o] * w[(size_t)o * in + i];
                dx[(size_t)t * in + i] += s;
            }
    if (dw)
        for (int o = 0; o < out; o++)
            for (int i = 0; i < in; i++) {
                float s = 0.0f;
                for (int t = 0; t < T; t++) s += dy[(size_t)t * out + o] * x[(size_t)t * in + i];
                dw[(size_t)o * in + i] += s;
            }
}

/* ------------------------------------------------------------------------------------------------------------ */
/* ISA selection                                                                                                */
/* ------------------------------------------------------------------------------------------------------------ */

static dense_isa forced_isa = DENSE_ISA_AUTO;

dense_isa dense_force_isa(dense_isa isa) {
    dense_isa prev = forced_isa;
    forced_isa = isa;
    return prev;
}

static dense_isa isa_supported(void) {
#if DENSE_X86
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f")) return DENSE_ISA_AVX512;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return DENSE_ISA_AVX2;
#endif
    return DENSE_ISA_GENERIC;
}

dense_isa dense_active_isa(void) {
    dense_isa best = isa_supported();
    if (forced_isa == DENSE_ISA_AUTO || forced_isa > best) return best;
    return forced_isa;
}

/* ------------------------------------------------------------------------------------------------------------ */
/* MM_DET forward                                                                                               */
/* ------------------------------------------------------------------------------------------------------------ */

#define DET_LANES 16
#define DET_TR 4 /* x rows per register tile */
#define DET_TO 4 /* w rows per register tile */

/* The fixed lane tree of dense.h. */
static inline float det_tree(const float *a) {
    float s8[8], s4[4];
    for (int l = 0; l < 8; l++) s8[l] = a[l] + a[l + 8];
    for (int l = 0; l < 4; l++) s4[l] = s8[l] + s8[l + 4];
    float s2a = s4[0] + s4[2], s2b = s4[1] + s4[3];
    return s2a + s2b;
}

/* One output element in the reference order. Inlined into a default-target and an avx2+fma-target wrapper: in the
 * latter fmaf becomes a vfmadd and the lane loop vectorizes; the bits are those of fmaf either way. */
static inline __attribute__((always_inline)) void det_block_portable(float *y, const float *x, const float *w, int in,
                                                                     int out, int beta, int t0, int t1, int o0,
                                                                     int o1) {
    for (int t = t0; t < t1; t++) {
        const float *xt = x + (size_t)t * in;
        for (int o = o0; o < o1; o++) {
            const float *wo = w + (size_t)o * in;
            float acc[DET_LANES] = {0};
            int i = 0;
            for (; i + DET_LANES <= in; i += DET_LANES)
                for (int l = 0; l < DET_LANES; l++) acc[l] = fmaf(xt[i + l], wo[i + l], acc[l]);
            for (int l = 0; i + l < in; l++) acc[l] = fmaf(xt[i + l], wo[i + l], acc[l]);
            float s = det_tree(acc);
            float *yo = y + (size_t)t * out + o;
            *yo = beta ? *yo + s : s;
        }
    }
}

static void det_block_generic(float *y, const float *x, const float *w, int in, int out, int beta, int t0, int t1,
                              int o0, int o1) {
    det_block_portable(y, x, w, in, out, beta, t0, t1, o0, o1);
}

#if DENSE_X86
/* AVX2: the 16 lanes are two 8-float halves; a 2x2 tile keeps its 8 half-accumulators in registers, and the lane
 * tree runs on the stored lanes. */
__attribute__((target("avx2,fma"))) static void det_block_avx2(float *y, const float *x, const float *w, int in,
                                                               int out, int beta, int t0, int t1, int o0, int o1) {
    const int nfull = in / DET_LANES * DET_LANES, rem = in - nfull;
    const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    const __m256i mlo = _mm256_cmpgt_epi32(_mm256_set1_epi32(rem), lane);
    const __m256i mhi = _mm256_cmpgt_epi32(_mm256_set1_epi32(rem - 8), lane);
    for (int t = t0; t < t1; t += 2) {
        const int nt = t1 - t < 2 ? t1 - t : 2;
        const float *x0 = x + (size_t)t * in, *x1 = x + (size_t)(t + nt - 1) * in;
        for (int o = o0; o < o1; o += 2) {
            const int no = o1 - o < 2 ? o1 - o : 2;
            const float *w0 = w + (size_t)o * in, *w1 = w + (size_t)(o + no - 1) * in;
            __m256 c[8];
            for (int k = 0; k < 8; k++) c[k] = _mm256_setzero_ps();
#define DET2_STEP(LOADLO, LOADHI)                                                                                    \
    do {                                                                                                             \
        __m256 a0l = LOADLO(x0), a0h = LOADHI(x0), a1l = LOADLO(x1), a1h = LOADHI(x1);                               \
        __m256 bl = LOADLO(w0), bh = LOADHI(w0);                                                                     \
        c[0] = _mm256_fmadd_ps(a0l, bl, c[0]), c[1] = _mm256_fmadd_ps(a0h, bh, c[1]);                                \
        c[2] = _mm256_fmadd_ps(a1l, bl, c[2]), c[3] = _mm256_fmadd_ps(a1h, bh, c[3]);                                \
        bl = LOADLO(w1), bh = LOADHI(w1);                                                                            \
        c[4] = _mm256_fmadd_ps(a0l, bl, c[4]), c[5] = _mm256_fmadd_ps(a0h, bh, c[5]);                                \
        c[6] = _mm256_fmadd_ps(a1l, bl, c[6]), c[7] = _mm256_fmadd_ps(a1h, bh, c[7]);                                \
    } while (0)
#define LOADLO_FULL(p) _mm256_loadu_ps((p) + i)
#define LOADHI_FULL(p) _mm256_loadu_ps((p) + i + 8)
#define LOADLO_TAIL(p) _mm256_maskload_ps((p) + i, mlo)
#define LOADHI_TAIL(p) _mm256_maskload_ps((p) + i + 8, mhi)
            int i = 0;
            for (; i < nfull; i += DET_LANES) DET2_STEP(LOADLO_FULL, LOADHI_FULL);
            if (rem) DET2_STEP(LOADLO_TAIL, LOADHI_TAIL);
#undef LOADLO_FULL
#undef LOADHI_FULL
#undef LOADLO_TAIL
#undef LOADHI_TAIL
#undef DET2_STEP
            float lanes[4][DET_LANES];
            for (int e = 0; e < 4; e++) {
                _mm256_storeu_ps(lanes[e], c[2 * e]);
                _mm256_storeu_ps(lanes[e] + 8, c[2 * e + 1]);
            }
            for (int b = 0; b < no; b++) /* element (a, b) is lanes[b * 2 + a] */
                for (int a = 0; a < nt; a++) {
                    float sum = det_tree(lanes[b * 2 + a]);
                    float *yo = y + (size_t)(t + a) * out + o + b;
                    *yo = beta ? *yo + sum : sum;
                }
        }
    }
}

/* Sums each of 16 vectors' lanes with the tree of dense.h; v[b*4 + a] is tile element (a, b). Returns the 16 sums
 * with 128-bit chunk a holding row a, lane b holding column b. Each level adds the two halves the tree pairs:
 * 256-bit halves, then 128-bit halves, then pairs, then neighbours, packing 2x more elements per vector each time. */
__attribute__((target("avx512f"))) static inline __m512 det_reduce16(const __m512 *v) {
    __m512 l1[8], l2[4], l3[2];
    for (int k = 0; k < 8; k++) {
        __m512 lo = _mm512_shuffle_f32x4(v[2 * k], v[2 * k + 1], _MM_SHUFFLE(1, 0, 1, 0));
        __m512 hi = _mm512_shuffle_f32x4(v[2 * k], v[2 * k + 1], _MM_SHUFFLE(3, 2, 3, 2));
        l1[k] = _mm512_add_ps(lo, hi); /* [s8(2k) | s8(2k+1)] */
    }
    for (int k = 0; k < 4; k++) {
        __m512 lo = _mm512_shuffle_f32x4(l1[2 * k], l1[2 * k + 1], _MM_SHUFFLE(2, 0, 2, 0));
        __m512 hi = _mm512_shuffle_f32x4(l1[2 * k], l1[2 * k + 1], _MM_SHUFFLE(3, 1, 3, 1));
        l2[k] = _mm512_add_ps(lo, hi); /* chunk j = s4(4k + j) */
    }
    for (int k = 0; k < 2; k++) {
        __m512 lo = _mm512_shuffle_ps(l2[2 * k], l2[2 * k + 1], _MM_SHUFFLE(1, 0, 1, 0));
        __m512 hi = _mm512_shuffle_ps(l2[2 * k], l2[2 * k + 1], _MM_SHUFFLE(3, 2, 3, 2));
        l3[k] = _mm512_add_ps(lo, hi); /* chunk j = [s2(8k+j) x2, s2(8k+4+j) x2] */
    }
    __m512 lo = _mm512_shuffle_ps(l3[0], l3[1], _MM_SHUFFLE(2, 0, 2, 0));
    __m512 hi = _mm512_shuffle_ps(l3[0], l3[1], _MM_SHUFFLE(3, 1, 3, 1));
    return _mm512_add_ps(lo, hi); /* position 4j + m = element j + 4m */
}

/* Fewer than 4 rows left (decode: one row per sequence; a verify step: two): an R x 8 tile, so no FMA is spent on
 * repeated rows and each w row is read once per R rows. Each element is the same fused chain over the same lanes
 * and the same tree as in the 4x4 tile, so the bits do not depend on which tile computed it. */
__attribute__((target("avx512f"), always_inline)) static inline void det_rows_avx512(float *y, const float *x,
                                                                                  const float *w, int in, int out,
                                                                                  int beta, int t, const int R,
                                                                                  int o0, int o1) {
    const int nfull = in / DET_LANES * DET_LANES;
    const __mmask16 tail = (__mmask16)((1u << (in - nfull)) - 1u);
    const float *xr[3];
    for (int r = 0; r < R; r++) xr[r] = x + (size_t)(t + r) * in;
    for (int o = o0; o < o1; o += 8) {
        const int no = o1 - o < 8 ? o1 - o : 8;
        const float *wb[8];
        for (int b = 0; b < 8; b++) wb[b] = w + (size_t)(o + (b < no ? b : no - 1)) * in;
        __m512 c[3][8];
        for (int r = 0; r < R; r++)
            for (int b = 0; b < 8; b++) c[r][b] = _mm512_setzero_ps();
        int i = 0;
        const int pf = o + 8 < o1; /* fetch the next 8 w rows while these stream (prefetches never fault) */
        for (; i < nfull; i += DET_LANES) {
            __m512 a[3];
            for (int r = 0; r < R; r++) a[r] = _mm512_loadu_ps(xr[r] + i);
            for (int b = 0; b < 8; b++) {
                if (pf) _mm_prefetch((const char *)(wb[b] + 8 * (size_t)in + i), _MM_HINT_T0);
                __m512 v = _mm512_loadu_ps(wb[b] + i);
                if (R > 1) __asm__("" : "+v"(v)); /* one load for the R FMAs, not one folded into each */
                for (int r = 0; r < R; r++) c[r][b] = _mm512_fmadd_ps(a[r], v, c[r][b]);
            }
        }
        if (tail) { /* zero lanes add fma(0, 0, acc) = acc exactly, as in the 4x4 tile */
            __m512 a[3];
            for (int r = 0; r < R; r++) a[r] = _mm512_maskz_loadu_ps(tail, xr[r] + i);
            for (int b = 0; b < 8; b++) {
                __m512 v = _mm512_maskz_loadu_ps(tail, wb[b] + i);
                for (int r = 0; r < R; r++) c[r][b] = _mm512_fmadd_ps(a[r], v, c[r][b]);
            }
        }
        /* the trees of 16 accumulators at a time in vector form (det_reduce16: input k = r·8 + b comes out in lane
         * 4·(k mod 4) + k / 4), unused inputs zero */
        __m512 v[32];
        for (int k = 0; k < 32; k++) v[k] = k < R * 8 ? c[k / 8][k % 8] : _mm512_setzero_ps();
        for (int k0 = 0; k0 < R * 8; k0 += 16) {
            float s[16];
            _mm512_storeu_ps(s, det_reduce16(v + k0));
            for (int k = k0; k < k0 + 16 && k < R * 8; k++) {
                const int r = k / 8, b = k % 8, kk = k - k0;
                if (b >= no) continue;
                const float sum = s[4 * (kk % 4) + kk / 4];
                float *yo = y + (size_t)(t + r) * out + o + b;
                *yo = beta ? *yo + sum : sum;
            }
        }
    }
}

/* One 4x4 register tile: rows t..t+3 of x against w rows o..o+no-1 (no <= 4; missing ones repeat the last valid one
 * and are not stored: every element is computed the same way wherever it sits). pf: pfs cache lines to prefetch
 * per step, or NULL. */
__attribute__((target("avx512f"), always_inline)) static inline void det_tile44_avx512(float *y, const float *x,
                                                                                     const float *w, int in, int out,
                                                                                     int beta, int t, int o, int no,
                                                                                     const char *pf, int pfs) {
    const int nfull = in / DET_LANES * DET_LANES;
    const __mmask16 tail = (__mmask16)((1u << (in - nfull)) - 1u);
    const float *x0 = x + (size_t)t * in, *x1 = x0 + in, *x2 = x1 + in, *x3 = x2 + in;
    const float *w0 = w + (size_t)o * in;
    const float *w1 = w + (size_t)(o + (no > 1 ? 1 : 0)) * in;
    const float *w2 = w + (size_t)(o + (no > 2 ? 2 : no - 1)) * in;
    const float *w3 = w + (size_t)(o + (no > 3 ? 3 : no - 1)) * in;
    __m512 c[16];
    for (int k = 0; k < 16; k++) c[k] = _mm512_setzero_ps();
#define DET_STEP(LOAD)                                                                                               \
    do {                                                                                                             \
        __m512 a0 = LOAD(x0), a1 = LOAD(x1), a2 = LOAD(x2), a3 = LOAD(x3), b;                                         \
        b = LOAD(w0);                                                                                                \
        c[0] = _mm512_fmadd_ps(a0, b, c[0]), c[1] = _mm512_fmadd_ps(a1, b, c[1]);                                    \
        c[2] = _mm512_fmadd_ps(a2, b, c[2]), c[3] = _mm512_fmadd_ps(a3, b, c[3]);                                    \
        b = LOAD(w1);                                                                                                \
        c[4] = _mm512_fmadd_ps(a0, b, c[4]), c[5] = _mm512_fmadd_ps(a1, b, c[5]);                                    \
        c[6] = _mm512_fmadd_ps(a2, b, c[6]), c[7] = _mm512_fmadd_ps(a3, b, c[7]);                                    \
        b = LOAD(w2);                                                                                                \
        c[8] = _mm512_fmadd_ps(a0, b, c[8]), c[9] = _mm512_fmadd_ps(a1, b, c[9]);                                    \
        c[10] = _mm512_fmadd_ps(a2, b, c[10]), c[11] = _mm512_fmadd_ps(a3, b, c[11]);                                \
        b = LOAD(w3);                                                                                                \
        c[12] = _mm512_fmadd_ps(a0, b, c[12]), c[13] = _mm512_fmadd_ps(a1, b, c[13]);                                \
        c[14] = _mm512_fmadd_ps(a2, b, c[14]), c[15] = _mm512_fmadd_ps(a3, b, c[15]);                                \
    } while (0)
#define LOAD_FULL(p) _mm512_loadu_ps((p) + i)
/* Zero lanes add fma(0, 0, acc) = acc exactly (acc is never -0), so the masked step equals the short lane loop. */
#define LOAD_TAIL(p) _mm512_maskz_loadu_ps(tail, (p) + i)
    int i = 0;
    for (; i < nfull; i += DET_LANES) {
        if (pf) {
            for (int k = 0; k < pfs; k++) _mm_prefetch(pf + k * 64, _MM_HINT_T0);
            pf += pfs * 64;
        }
        DET_STEP(LOAD_FULL);
    }
    if (tail) DET_STEP(LOAD_TAIL);
#undef LOAD_FULL
#undef LOAD_TAIL
#undef DET_STEP
    __m512 r = det_reduce16(c);
    if (no == DET_TO) {
        float *yr = y + (size_t)t * out + o;
        __m128 r0 = _mm512_extractf32x4_ps(r, 0), r1 = _mm512_extractf32x4_ps(r, 1);
        __m128 r2 = _mm512_extractf32x4_ps(r, 2), r3 = _mm512_extractf32x4_ps(r, 3);
        if (beta) {
            r0 = _mm_add_ps(_mm_loadu_ps(yr), r0);
            r1 = _mm_add_ps(_mm_loadu_ps(yr + out), r1);
            r2 = _mm_add_ps(_mm_loadu_ps(yr + 2 * (size_t)out), r2);
            r3 = _mm_add_ps(_mm_loadu_ps(yr + 3 * (size_t)out), r3);
        }
        _mm_storeu_ps(yr, r0);
        _mm_storeu_ps(yr + out, r1);
        _mm_storeu_ps(yr + 2 * (size_t)out, r2);
        _mm_storeu_ps(yr + 3 * (size_t)out, r3);
    } else {
        float s[16];
        _mm512_storeu_ps(s, r);
        for (int a = 0; a < DET_TR; a++)
            for (int b = 0; b < no; b++) {
                float *yo = y + (size_t)(t + a) * out + o + b;
                *yo = beta ? *yo + s[a * 4 + b] : s[a * 4 + b];
            }
    }
}

/* Rows t0..t1 x w rows o0..o1 in 4x4 tiles, the last t1 - t0 mod 4 rows in an R x 8 tile. Up to 16 rows (decode):
 * the w rows outermost, so each group of 4 is read from memory once (then from L1 for every tile of x rows, which
 * stay in L1) and the next group is prefetched across them: the stream of w overlaps the FMAs. More rows: a tile of
 * x rows stays in L1 while the block of w (sized for L2, det_forward) streams past it, which measured faster there.
 * The order changes which tile runs when, never how an element is computed. */
__attribute__((target("avx512f"))) static void det_block_avx512(float *y, const float *x, const float *w, int in,
                                                                int out, int beta, int t0, int t1, int o0, int o1) {
    const int tf = t0 + (t1 - t0) / DET_TR * DET_TR, rest = t1 - tf, ntile = (tf - t0) / DET_TR;
    if (ntile > 0 && ntile <= 4)
        for (int o = o0; o < o1; o += DET_TO) {
            const int no = o1 - o < DET_TO ? o1 - o : DET_TO, steps = in / DET_LANES;
            /* the next 4 w rows (contiguous, in / 4 cache lines) in equal shares per step of these tiles */
            const int pfs = steps > 0 && o + 2 * DET_TO <= o1 ? (in / 4 + ntile * steps - 1) / (ntile * steps) : 0;
            const char *pf = (const char *)(w + (size_t)(o + DET_TO) * in);
            for (int t = t0; t < tf; t += DET_TR, pf += (size_t)pfs * steps * 64)
                det_tile44_avx512(y, x, w, in, out, beta, t, o, no, pfs ? pf : NULL, pfs);
        }
    else
        for (int t = t0; t < tf; t += DET_TR)
            for (int o = o0; o < o1; o += DET_TO)
                det_tile44_avx512(y, x, w, in, out, beta, t, o, o1 - o < DET_TO ? o1 - o : DET_TO, NULL, 0);
    if (rest == 1) det_rows_avx512(y, x, w, in, out, beta, tf, 1, o0, o1);
    else if (rest == 2) det_rows_avx512(y, x, w, in, out, beta, tf, 2, o0, o1);
    else if (rest == 3) det_rows_avx512(y, x, w, in, out, beta, tf, 3, o0, o1);
}
#endif

typedef void (*det_block_fn)(float *y, const float *x, const float *w, int in, int out, int beta, int t0, int t1,
                             int o0, int o1);

static det_block_fn det_block_for(dense_isa isa) {
#if DENSE_X86
    if (isa == DENSE_ISA_AVX512) return det_block_avx512;
    if (isa == DENSE_ISA_AVX2) return det_block_avx2;
#else
    (void)isa;
#endif
    return det_block_generic;
}

/* Jobs are (block of w rows that stays in L2) x (chunk of x rows); the x tile of 4 rows stays in L1 while the
 * block's w rows stream past it. */
static void det_forward(float *y, const float *x, const float *w, int T, int in, int out, int beta) {
    det_block_fn fn = det_block_for(dense_active_isa());
    int ob = (128 * 1024) / (in > 0 ? in : 1) / DET_TO * DET_TO; /* 512 KB of w */
    if (ob < DET_TO) ob = DET_TO;
    if (ob > 256) ob = 256;
    const int tb = 64;
    const double work = (double)T * in * out;
    /* Few rows (decode): split the w rows into a multiple of the thread count of equal blocks, so no thread
     * streams more of them than another. The split changes which thread computes an element, never how. */
    const int nth = omp_get_max_threads(), ntb = (T + tb - 1) / tb;
    if (ntb < nth && work >= PAR_MIN_WORK) {
        const int want = ((out + ob - 1) / ob + nth - 1) / nth * nth;
        const int even = ((out + want - 1) / want + 7) / 8 * 8;
        if (even < ob) ob = even;
    }
    const int nob = (out + ob - 1) / ob;
    const long njobs = (long)nob * ntb;
#pragma omp parallel for schedule(static) if (work >= PAR_MIN_WORK && njobs > 1)
    for (long j = 0; j < njobs; j++) {
        int o0 = (int)(j / ntb) * ob, t0 = (int)(j % ntb) * tb;
        int o1 = o0 + ob < out ? o0 + ob : out, t1 = t0 + tb < T ? t0 + tb : T;
        fn(y, x, w, in, out, beta, t0, t1, o0, o1);
    }
}

/* ------------------------------------------------------------------------------------------------------------ */
/* MM_DET backward: C[m][n] += Σ_k A(m,k) B(k,n), k = 0..K-1 in order, one fused chain from 0 per element.     */
/* A(m,k) = a[m*sam + k*sak], B(k,n) = b[k*ldb + n], C(m,n) = c[m*ldc + n].                                     */
/* ------------------------------------------------------------------------------------------------------------ */

#define OP_MR 8  /* rows of C per register tile */
#define OP_NR 32 /* columns of C per register tile (two 16-lane vectors) */

typedef struct {
    float *c;
    const float *a, *b;
    size_t sam, sak, ldb, ldc;
    int M, N, K;
} op_args;

static inline __attribute__((always_inline)) void op_block_portable(const op_args *p, int m0, int m1, int n0,
                                                                    int n1) {
    float acc[OP_NR];
    for (int m = m0; m < m1; m++)
        for (int n = n0; n < n1; n += OP_NR) {
            int nn = n1 - n < OP_NR ? n1 - n : OP_NR;
            for (int j = 0; j < OP_NR; j++) acc[j] = 0.0f;
            for (int k = 0; k < p->K; k++) {
                float av = p->a[m * p->sam + k * p->sak];
                const float *bk = p->b + k * p->ldb + n;
                for (int j = 0; j < nn; j++) acc[j] = fmaf(av, bk[j], acc[j]);
            }
            float *cm = p->c + m * p->ldc + n;
            for (int j = 0; j < nn; j++) cm[j] += acc[j];
        }
}

static void op_block_generic(const op_args *p, int m0, int m1, int n0, int n1) {
    op_block_portable(p, m0, m1, n0, n1);
}

#if DENSE_X86
__attribute__((target("avx2,fma"))) static void op_block_avx2(const op_args *p, int m0, int m1, int n0, int n1) {
    op_block_portable(p, m0, m1, n0, n1);
}

/* Packed blocks: A as [m-tile][k][8], B as [n-sub][k][32], both zero-padded, so the register tile reads contiguous
 * memory whatever the strides (B rows are 4 KB apart for a 1024-wide weight: unpacked, every k is a new page). The
 * per-element chains run through the k-blocks with their partial sums parked in `acc` (stored and reloaded exactly)
 * and are added to C at the end: the same bits as op_block_portable. */
enum { OP_MB = 64, OP_NB = 128, OP_KB = 128 };

/* MV valid rows of the 8-row tile (a constant after inlining: 8, 4, 2 or 1). */
__attribute__((target("avx512f"), always_inline)) static inline void op_tile_avx512(float *acc, const float *ap,
                                                                                   const float *bp, int kn, int MV) {
    __m512 c[2 * OP_MR];
    for (int r = 0; r < MV; r++) {
        c[2 * r] = _mm512_loadu_ps(acc + r * OP_NB);
        c[2 * r + 1] = _mm512_loadu_ps(acc + r * OP_NB + 16);
    }
    for (int k = 0; k < kn; k++, ap += OP_MR, bp += OP_NR) {
        __m512 b0 = _mm512_loadu_ps(bp), b1 = _mm512_loadu_ps(bp + 16);
        for (int r = 0; r < MV; r++) {
            __m512 av = _mm512_set1_ps(ap[r]);
            c[2 * r] = _mm512_fmadd_ps(av, b0, c[2 * r]);
            c[2 * r + 1] = _mm512_fmadd_ps(av, b1, c[2 * r + 1]);
        }
    }
    for (int r = 0; r < MV; r++) {
        _mm512_storeu_ps(acc + r * OP_NB, c[2 * r]);
        _mm512_storeu_ps(acc + r * OP_NB + 16, c[2 * r + 1]);
    }
}

__attribute__((target("avx512f"))) static void op_block_avx512(const op_args *p, int m0, int m1, int n0, int n1) {
    float acc[OP_MB * OP_NB], apack[OP_MB * OP_KB], bpack[OP_NB * OP_KB];
    const int nm = m1 - m0, nn = n1 - n0;
    assert(nm <= OP_MB && nn <= OP_NB);
    /* the rows the register tiles touch (whole tiles of 8): a 32 KB memset per call costs more than a small block */
    memset(acc, 0, sizeof(float) * (size_t)((nm + OP_MR - 1) / OP_MR * OP_MR) * OP_NB);
    for (int k0 = 0; k0 < p->K; k0 += OP_KB) {
        const int kn = p->K - k0 < OP_KB ? p->K - k0 : OP_KB;
        /* A(m, k) -> apack[mt/8][k][r], reading along whichever index is contiguous in memory */
        for (int mt = 0; mt < nm; mt += OP_MR) {
            float *dst = apack + (size_t)mt * OP_KB;
            if (p->sak == 1) {
                for (int r = 0; r < OP_MR; r++) {
                    const float *src = p->a + (size_t)(m0 + mt + r) * p->sam + (size_t)k0;
                    if (mt + r < nm)
                        for (int k = 0; k < kn; k++) dst[(size_t)k * OP_MR + r] = src[k];
                    else
                        for (int k = 0; k < kn; k++) dst[(size_t)k * OP_MR + r] = 0.0f;
                }
            } else {
                for (int k = 0; k < kn; k++) {
                    const float *src = p->a + (size_t)(k0 + k) * p->sak;
                    for (int r = 0; r < OP_MR; r++)
                        dst[(size_t)k * OP_MR + r] = mt + r < nm ? src[(size_t)(m0 + mt + r) * p->sam] : 0.0f;
                }
            }
        }
        for (int ns = 0; ns < nn; ns += OP_NR) { /* B(k, n) -> bpack[ns/32][k][j], zero-padded past nn */
            const int w = nn - ns < OP_NR ? nn - ns : OP_NR;
            const __mmask16 lo = (__mmask16)(w >= 16 ? 0xffffu : (1u << w) - 1u);
            const __mmask16 hi = (__mmask16)(w >= 32 ? 0xffffu : w > 16 ? (1u << (w - 16)) - 1u : 0u);
            for (int k = 0; k < kn; k++) { /* two vector moves: a 128-byte memcpy (rep movs) cost more than the tile */
                float *dst = bpack + (size_t)ns * OP_KB + (size_t)k * OP_NR;
                const float *src = p->b + (size_t)(k0 + k) * p->ldb + n0 + ns;
                _mm512_storeu_ps(dst, _mm512_maskz_loadu_ps(lo, src));
                _mm512_storeu_ps(dst + 16, _mm512_maskz_loadu_ps(hi, src + 16));
            }
        }
        for (int ns = 0; ns < nn; ns += OP_NR)
            for (int mt = 0; mt < nm; mt += OP_MR) {
                float *ac = acc + (size_t)mt * OP_NB + ns;
                const float *ap = apack + (size_t)mt * OP_KB, *bp = bpack + (size_t)ns * OP_KB;
                const int left = nm - mt;
                /* rows past nm are zero-packed and never leave acc */
                if (left > 4) op_tile_avx512(ac, ap, bp, kn, 8);
                else if (left > 2) op_tile_avx512(ac, ap, bp, kn, 4);
                else if (left == 2) op_tile_avx512(ac, ap, bp, kn, 2);
                else op_tile_avx512(ac, ap, bp, kn, 1);
            }
    }
    for (int r = 0; r < nm; r++) {
        float *cr = p->c + (size_t)(m0 + r) * p->ldc + n0;
        const float *ar = acc + (size_t)r * OP_NB;
        for (int j = 0; j < nn; j++) cr[j] += ar[j];
    }
}
#endif

#if DENSE_X86
/* A few rows of C: packing B (a page per row of a wide weight) costs more than the few FMAs per element it serves,
 * so the rows stream B unpacked. The same bits as op_block_avx512: one fused chain per element, then added. */
__attribute__((target("avx512f,fma"))) static void op_block_avx512_few(const op_args *p, int m0, int m1, int n0,
                                                                       int n1) {
    op_block_portable(p, m0, m1, n0, n1);
}
#endif

typedef void (*op_block_fn)(const op_args *p, int m0, int m1, int n0, int n1);

static op_block_fn op_block_for(dense_isa isa) {
#if DENSE_X86
    if (isa == DENSE_ISA_AVX512) return op_block_avx512;
    if (isa == DENSE_ISA_AVX2) return op_block_avx2;
#else
    (void)isa;
#endif
    return op_block_generic;
}

/* Jobs are (panel of 128 columns) x (block of 64 rows); each C element belongs to one job. */
static void op_run(const op_args *p) {
    if (p->M == 0 || p->N == 0) return;
    op_block_fn fn = op_block_for(dense_active_isa());
    const int nb = 128, mb = 64; /* = OP_NB, OP_MB */
    const int nnb = (p->N + nb - 1) / nb, nmb = (p->M + mb - 1) / mb;
    const long njobs = (long)nnb * nmb;
    const double work = (double)p->M * p->N * p->K;
#pragma omp parallel for schedule(static) if (work >= PAR_MIN_WORK && njobs > 1)
    for (long j = 0; j < njobs; j++) {
        int n0 = (int)(j / nmb) * nb, m0 = (int)(j % nmb) * mb;
        int n1 = n0 + nb < p->N ? n0 + nb : p->N, m1 = m0 + mb < p->M ? m0 + mb : p->M;
        fn(p, m0, m1, n0, n1);
    }
}

/* A w row read for T x rows costs about (T + BATCH_ROW_BYTES) row-dots: at a few rows the bytes of w dominate
 * (bandwidth-bound), at many the FMAs. */
#define BATCH_ROW_BYTES 12

/* Chunks of about equal cost (whole 8-row multiples of w rows, all x rows of the job), taken dynamically by the
 * threads: few rows are bandwidth-bound, and a parallel region per small GEMM costs more than the GEMM (decode).
 * Many rows: one matmul_forward after another, each threaded itself. */
void matmul_forward_batch(const mm_job *jobs, int n, mm_mode mode) {
    int small = mode == MM_DET;
    double work = 0.0, cost = 0.0;
    for (int j = 0; j < n; j++) {
        assert(jobs[j].T >= 0 && jobs[j].in >= 0 && jobs[j].out >= 0);
        if (jobs[j].T > 16) small = 0;
        work += (double)jobs[j].T * jobs[j].in * jobs[j].out;
        if (jobs[j].T > 0) cost += (double)(jobs[j].T + BATCH_ROW_BYTES) * jobs[j].in * jobs[j].out;
    }
    const int nth = omp_get_max_threads();
    enum { MAXCH = 512 };
    if (!small || work < PAR_MIN_WORK || nth == 1 || n > MAXCH) {
        for (int j = 0; j < n; j++)
            matmul_forward(jobs[j].y, jobs[j].x, jobs[j].w, jobs[j].T, jobs[j].in, jobs[j].out, jobs[j].beta, mode);
        return;
    }
    struct {
        short job;
        int o0, o1;
    } ch[MAXCH];
    int nch = 0;
    const double per = cost / (4.0 * nth); /* ~4 chunks per thread */
    for (int j = 0; j < n; j++) {
        const mm_job *q = &jobs[j];
        if (q->T == 0 || q->out == 0) continue;
        const double row = (double)(q->T + BATCH_ROW_BYTES) * (q->in > 0 ? q->in : 1);
        int ob = (int)(per / row) / 8 * 8;
        if (ob < 8) ob = 8;
        const int room = MAXCH - nch - (n - 1 - j); /* >= 1: one chunk kept for each job still to come */
        if ((q->out + ob - 1) / ob > room) ob = (q->out + room - 1) / room;
        for (int o0 = 0; o0 < q->out; o0 += ob)
            ch[nch].job = (short)j, ch[nch].o0 = o0, ch[nch].o1 = o0 + ob < q->out ? o0 + ob : q->out, nch++;
    }
    det_block_fn fn = det_block_for(dense_active_isa());
#pragma omp parallel for schedule(dynamic, 1)
    for (int k = 0; k < nch; k++) {
        const mm_job *q = &jobs[ch[k].job];
        fn(q->y, q->x, q->w, q->in, q->out, q->beta != 0.0f, 0, q->T, ch[k].o0, ch[k].o1);
    }
}

void dense_det_dot(float *y, int ldy, const float *x, const float *w, int in, int beta, int rows, int cols) {
    if (rows <= 0 || cols <= 0) return;
    det_block_for(dense_active_isa())(y, x, w, in, ldy, beta, 0, rows, 0, cols);
}

void dense_det_acc(float *c, size_t ldc, const float *a, size_t sam, size_t sak, const float *b, size_t ldb, int M,
                   int N, int K) {
    if (M <= 0 || N <= 0 || K <= 0) return;
    op_block_fn fn = op_block_for(dense_active_isa());
#if DENSE_X86
    if (M <= 4 && fn == op_block_avx512) fn = op_block_avx512_few;
#endif
    const op_args p = {c, a, b, sam, sak, ldb, ldc, M, N, K};
    for (int m0 = 0; m0 < M; m0 += 64) /* = OP_MB, OP_NB: the largest block op_block takes */
        for (int n0 = 0; n0 < N; n0 += 128) fn(&p, m0, m0 + 64 < M ? m0 + 64 : M, n0, n0 + 128 < N ? n0 + 128 : N);
}

/* ------------------------------------------------------------------------------------------------------------ */
/* matmul dispatch                                                                                              */
/* ------------------------------------------------------------------------------------------------------------ */

void matmul_forward(float *y, const float *x, const float *w, int T, int in, int out, float beta, mm_mode mode) {
    assert(T >= 0 && in >= 0 && out >= 0 && (beta == 0.0f || beta == 1.0f));
    if (T == 0 || out == 0) return;
    if (mode == MM_DET) {
        det_forward(y, x, w, T, in, out, beta != 0.0f);
        return;
    }
    if (in == 0) { /* BLAS rejects lda = 0 */
        if (beta == 0.0f) memset(y, 0, sizeof(float) * (size_t)T * out);
        return;
    }
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, T, out, in, 1.0f, x, in, w, in, beta, y, out);
}

void matmul_backward(float *dx, float *dw, const float *dy, const float *x, const float *w, int T, int in, int out,
                     mm_mode mode) {
    assert(T >= 0 && in >= 0 && out >= 0);
    if (T == 0 || in == 0 || out == 0) return; /* every sum is empty: nothing to add */
    if (mode == MM_DET) {
        if (dx) {
            op_args p = {dx, dy, w, (size_t)out, 1, (size_t)in, (size_t)in, T, in, out};
            op_run(&p);
        }
        if (dw) {
            op_args p = {dw, dy, x, 1, (size_t)out, (size_t)in, (size_t)in, out, in, T};
            op_run(&p);
        }
        return;
    }
    if (dx) cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, T, in, out, 1.0f, dy, out, w, in, 1.0f, dx, in);
    if (dw) cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, out, in, T, 1.0f, dy, out, x, in, 1.0f, dw, in);
}

/* ------------------------------------------------------------------------------------------------------------ */
/* Row reductions                                                                                               */
/* ------------------------------------------------------------------------------------------------------------ */

/* Σ a[c]*b[c] over 16 float lanes (lane l takes c ≡ l mod 16) then the fixed tree: depends on n only. */
static float dot_lanes(const float *a, const float *b, int n) {
    float acc[DET_LANES] = {0};
    int c = 0;
    for (; c + DET_LANES <= n; c += DET_LANES)
        for (int l = 0; l < DET_LANES; l++) acc[l] += a[c + l] * b[c + l];
    for (int l = 0; c + l < n; l++) acc[l] += a[c + l] * b[c + l];
    return det_tree(acc);
}

void rmsnorm_forward(float *out, float *rstd, const float *x, const float *g, int T, int C, float eps) {
#pragma omp parallel for schedule(static) if ((double)T * C >= PAR_MIN_WORK && T > 1)
    for (int t = 0; t < T; t++) {
        const float *xt = x + (size_t)t * C;
        float *ot = out + (size_t)t * C;
        float r = 1.0f / sqrtf(dot_lanes(xt, xt, C) / (float)C + eps);
        if (rstd) rstd[t] = r;
        for (int c = 0; c < C; c++) ot[c] = g[c] * (xt[c] * r);
    }
}

/* dx = r g dout - r³ x (Σ dout g x) / C; dg = Σ_t dout x r. Rows are split among threads for dx, channels for dg. */
void rmsnorm_backward(float *dx, float *dg, const float *dout, const float *x, const float *g, const float *rstd,
                      int T, int C) {
    const int par = (double)T * C >= PAR_MIN_WORK;
    if (dx) {
#pragma omp parallel for schedule(static) if (par && T > 1)
        for (int t = 0; t < T; t++) {
            const float *xt = x + (size_t)t * C, *dt = dout + (size_t)t * C;
            float *dxt = dx + (size_t)t * C;
            float acc[DET_LANES] = {0};
            int c = 0;
            for (; c + DET_LANES <= C; c += DET_LANES)
                for (int l = 0; l < DET_LANES; l++) acc[l] += dt[c + l] * g[c + l] * xt[c + l];
            for (int l = 0; c + l < C; l++) acc[l] += dt[c + l] * g[c + l] * xt[c + l];
            float r = rstd[t];
            float k = r * r * r * det_tree(acc) / (float)C;
            for (int i = 0; i < C; i++) dxt[i] += r * dt[i] * g[i] - k * xt[i];
        }
    }
    if (dg) {
        enum { CB = 64 };
        const int nblk = (C + CB - 1) / CB;
#pragma omp parallel for schedule(static) if (par && nblk > 1)
        for (int b = 0; b < nblk; b++) {
            int c0 = b * CB, n = C - c0 < CB ? C - c0 : CB;
            float acc[CB] = {0};
            for (int t = 0; t < T; t++) {
                const float *xt = x + (size_t)t * C + c0, *dt = dout + (size_t)t * C + c0;
                float r = rstd[t];
                for (int j = 0; j < n; j++) acc[j] += dt[j] * xt[j] * r;
            }
            for (int j = 0; j < n; j++) dg[c0 + j] += acc[j];
        }
    }
}

/* ------------------------------------------------------------------------------------------------------------ */
/* SwiGLU                                                                                                       */
/* ------------------------------------------------------------------------------------------------------------ */

void swiglu_forward(float *h, const float *gate, const float *up, int T, int inter) {
    const long n = (long)T * inter;
#pragma omp parallel for schedule(static) if (n >= PAR_MIN_WORK)
    for (long i = 0; i < n; i++) h[i] = gate[i] / (1.0f + expf(-gate[i])) * up[i];
}

/* d silu(z)/dz = s (1 + z (1 - s)), s = sigmoid(z). */
void swiglu_backward(float *dgate, float *dup, const float *dh, const float *gate, const float *up, int T, int inter) {
    const long n = (long)T * inter;
#pragma omp parallel for schedule(static) if (n >= PAR_MIN_WORK)
    for (long i = 0; i < n; i++) {
        float z = gate[i], s = 1.0f / (1.0f + expf(-z));
        dup[i] += dh[i] * (z * s);
        dgate[i] += dh[i] * up[i] * (s * (1.0f + z * (1.0f - s)));
    }
}

/* ------------------------------------------------------------------------------------------------------------ */
/* Embedding                                                                                                    */
/* ------------------------------------------------------------------------------------------------------------ */

void embedding_forward(float *out, const int32_t *ids, const float *table, int T, int C) {
#pragma omp parallel for schedule(static) if ((double)T * C >= PAR_MIN_WORK && T > 1)
    for (int t = 0; t < T; t++) {
        assert(ids[t] >= 0);
        memcpy(out + (size_t)t * C, table + (size_t)ids[t] * C, sizeof(float) * (size_t)C);
    }
}

/* Threads own channel blocks (whole cache lines), so a repeated id is never updated by two threads. */
void embedding_backward(float *dtable, const float *dout, const int32_t *ids, int T, int C) {
    enum { CB = 64 };
    const int nblk = (C + CB - 1) / CB;
#pragma omp parallel for schedule(static) if ((double)T * C >= PAR_MIN_WORK && nblk > 1)
    for (int b = 0; b < nblk; b++) {
        int c0 = b * CB, n = C - c0 < CB ? C - c0 : CB;
        for (int t = 0; t < T; t++) {
            assert(ids[t] >= 0);
            float *dr = dtable + (size_t)ids[t] * C + c0;
            const float *gr = dout + (size_t)t * C + c0;
            for (int j = 0; j < n; j++) dr[j] += gr[j];
        }
    }
}

/* ------------------------------------------------------------------------------------------------------------ */
/* Softmax: logsumexp, cross-entropy, log-probs                                                                 */
/* ------------------------------------------------------------------------------------------------------------ */

/* exp(x) for x <= 0 (what a max-subtracted softmax needs) in plain arithmetic, so the compiler vectorizes it and a
 * vector lane computes the bits a scalar would (unlike libm's vector exp). Cephes expf: x = n ln2 + r with
 * |r| <= ln2/2, degree-6 polynomial, 2^n from the exponent bits; max error about 1 ulp. x < -87 gives 0, x > 0 is
 * taken as 0, NaN stays NaN. */
static inline float exp_neg(float x) {
    const float magic = 12582912.0f; /* 1.5 * 2^23: adding it rounds to an integer, kept in the low bits */
    float xc = x < -87.0f ? -87.0f : x > 0.0f ? 0.0f : x;
    float z = xc * 1.44269504088896341f + magic;
    float n = z - magic;
    uint32_t zb;
    memcpy(&zb, &z, sizeof zb);
    float r = xc - n * 0.693359375f;
    r = r - n * -2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * (r * r) + r + 1.0f;
    uint32_t sb = (zb - 0x4B400000u + 127u) << 23; /* (n + 127) << 23 = 2^n, n in [-126, 0] from z's low bits */
    float scale;
    memcpy(&scale, &sb, sizeof scale);
    float e = p * scale;
    e = x < -87.0f ? 0.0f : e;
    return x != x ? x : e;
}

float logsumexp_row(const float *x, int V) {
    assert(V >= 1);
    float m[DET_LANES];
    for (int l = 0; l < DET_LANES; l++) m[l] = x[0];
    int v = 0;
    for (; v + DET_LANES <= V; v += DET_LANES)
        for (int l = 0; l < DET_LANES; l++) m[l] = x[v + l] > m[l] ? x[v + l] : m[l];
    for (int l = 0; v + l < V; l++) m[l] = x[v + l] > m[l] ? x[v + l] : m[l];
    float mx = m[0];
    for (int l = 1; l < DET_LANES; l++) mx = m[l] > mx ? m[l] : mx;
    if (isinf(mx)) return mx; /* all -inf, or some +inf */
    double acc[DET_LANES] = {0};
    v = 0;
    for (; v + DET_LANES <= V; v += DET_LANES)
        for (int l = 0; l < DET_LANES; l++) acc[l] += (double)exp_neg(x[v + l] - mx);
    for (int l = 0; v + l < V; l++) acc[l] += (double)exp_neg(x[v + l] - mx);
    double s8[8], s4[4];
    for (int l = 0; l < 8; l++) s8[l] = acc[l] + acc[l + 8];
    for (int l = 0; l < 4; l++) s4[l] = s8[l] + s8[l + 4];
    double s = (s4[0] + s4[2]) + (s4[1] + s4[3]);
    return (float)((double)mx + log(s));
}

/* Rows go to threads in chunks whose losses are kept on the stack and summed in row order afterwards: a fixed-order
 * total without heap scratch. */
double xent_forward_backward(float *loss, float *dlogits, const float *logits, const int32_t *target,
                             const float *scale, int T, int V) {
    enum { CHUNK = 256 };
    double total = 0.0;
    for (int t0 = 0; t0 < T; t0 += CHUNK) {
        const int n = T - t0 < CHUNK ? T - t0 : CHUNK;
        double rowloss[CHUNK];
#pragma omp parallel for schedule(static) if ((double)n * V >= PAR_MIN_WORK && n > 1)
        for (int k = 0; k < n; k++) {
            const int t = t0 + k, tg = target[t];
            const float *lt = logits + (size_t)t * V;
            float *dt = dlogits ? dlogits + (size_t)t * V : NULL;
            if (tg < 0) {
                rowloss[k] = 0.0;
                if (loss) loss[t] = 0.0f;
                if (dt) memset(dt, 0, sizeof(float) * (size_t)V);
                continue;
            }
            assert(tg < V);
            const float lse = logsumexp_row(lt, V), ltg = lt[tg];
            const float l = lse - ltg;
            rowloss[k] = l;
            if (loss) loss[t] = l;
            if (dt) {
                const float sc = scale ? scale[t] : 1.0f;
                for (int v = 0; v < V; v++) dt[v] = sc * exp_neg(lt[v] - lse); /* dt may alias lt */
                dt[tg] = sc * (exp_neg(ltg - lse) - 1.0f);
            }
        }
        for (int k = 0; k < n; k++) total += rowloss[k];
    }
    return total;
}

void logprob_forward(float *lp, const float *logits, const int32_t *ids, int T, int V) {
#pragma omp parallel for schedule(static) if ((double)T * V >= PAR_MIN_WORK && T > 1)
    for (int t = 0; t < T; t++) {
        if (ids[t] < 0) {
            lp[t] = 0.0f;
            continue;
        }
        assert(ids[t] < V);
        const float *lt = logits + (size_t)t * V;
        lp[t] = lt[ids[t]] - logsumexp_row(lt, V);
    }
}

/* ------------------------------------------------------------------------------------------ optimizer */

void adamw_update_f32(float *data, const float *grad, float *m, float *v, size_t n, double beta1, double beta2,
                      double eps, double weight_decay, int64_t step, double lr) {
    /* The scalars as torch forms them: Python doubles, cast to float by each fp32 kernel. */
    const double t = (double)step;
    const double bc1 = 1.0 - pow(beta1, t), bc2 = 1.0 - pow(beta2, t);
    const float step_size = (float)(lr / bc1);
    const float bc2_sqrt = (float)sqrt(bc2);
    const float b1 = (float)beta1, omb1 = (float)(1.0 - beta1);
    const float b2 = (float)beta2, omb2 = (float)(1.0 - beta2);
    const float epsf = (float)eps;
    const float decay = (float)(1.0 - lr * weight_decay);
#pragma omp parallel for schedule(static) if (n > 65536)
    for (size_t i = 0; i < n; i++) {
        float g = grad[i];
        float x = data[i] * decay;                 /* param.mul_(1 - lr * weight_decay) */
        float mi = m[i] * b1;                      /* exp_avg.mul_(beta1).add_(grad, alpha=1 - beta1) */
        mi = mi + omb1 * g;
        float vi = v[i] * b2;                      /* exp_avg_sq.mul_(beta2).addcmul_(grad, grad, 1 - beta2) */
        vi = vi + omb2 * g * g;
        float denom = sqrtf(vi) / bc2_sqrt + epsf; /* (exp_avg_sq.sqrt() / sqrt(bc2)).add_(eps) */
        x = x + -step_size * mi / denom;           /* param.addcdiv_(exp_avg, denom, value=-step_size) */
        m[i] = mi;
        v[i] = vi;
        data[i] = x;
    }
}

double sumsq_f64(const float *g, size_t n) {
    /* four running sums in a fixed interleave: deterministic, and not bound by one add's latency */
    double s0 = 0, s1 = 0, s2 = 0, s3 = 0;
    size_t i = 0;
    for (; i + 4 <= n; i += 4) {
        s0 += (double)g[i] * g[i];
        s1 += (double)g[i + 1] * g[i + 1];
        s2 += (double)g[i + 2] * g[i + 2];
        s3 += (double)g[i + 3] * g[i + 3];
    }
    for (; i < n; i++) s0 += (double)g[i] * g[i];
    return (s0 + s1) + (s2 + s3);
}

double sumsq_chunked(const float *g, size_t n) {
    const size_t nc = (n + OPTIM_SUMSQ_CHUNK - 1) / OPTIM_SUMSQ_CHUNK;
    if (nc <= 1) return sumsq_f64(g, n);
    double *part = malloc(nc * sizeof *part), s = 0.0;
    if (!part) { /* the same order, one thread */
        for (size_t c = 0; c < nc; c++) {
            size_t o = c * OPTIM_SUMSQ_CHUNK;
            s += sumsq_f64(g + o, n - o < OPTIM_SUMSQ_CHUNK ? n - o : OPTIM_SUMSQ_CHUNK);
        }
        return s;
    }
#pragma omp parallel for schedule(dynamic, 1)
    for (size_t c = 0; c < nc; c++) {
        size_t o = c * OPTIM_SUMSQ_CHUNK;
        part[c] = sumsq_f64(g + o, n - o < OPTIM_SUMSQ_CHUNK ? n - o : OPTIM_SUMSQ_CHUNK);
    }
    for (size_t c = 0; c < nc; c++) s += part[c];
    free(part);
    return s;
}
