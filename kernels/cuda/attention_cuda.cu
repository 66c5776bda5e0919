// attention_cuda.cu: causal (document-masked) softmax attention on the GPU, flash style (see attention_cuda.h).
//
// The one idea: a warp's 32 lanes run over 32 keys when scores are formed (lane j: one fused dot product over the
// head dim, read from shared memory whose key rows are padded by one float so the 32 lanes hit 32 banks) and over
// 32 output columns when they are accumulated (lane owns columns lane, lane+32, ...; the weight of key j comes by
// shuffle). So every score and every output element is computed by one lane in an order fixed by the shapes, the
// kernels need no atomics, and the only T-sized state in global memory is out, lse and D (T·H floats each).
//
//   forward      block = (16 query rows, head); walks key tiles of 32 from the first key any of its rows sees
//                (its smallest doc_start) to its last row; online softmax (Milakov & Gimelshein 2018) per row.
//   backward D   D[i,h] = dout_i · out_i, one warp per row.
//   backward kv  block = (16 key rows, head); walks query tiles of 32 from its first key to T−1: lane = query for
//                p = exp(scale·q·k − lse) and dp = dout·v, then lane = column for dv += p·dout, dk += ds·q with
//                ds = scale·p·(dp − D) (FlashAttention-2, Dao 2023, Algorithm 2).
//   backward q   block = (16 query rows, head); the forward's walk, dq += ds·k.
#include <cuda_runtime.h>
#include <limits.h>
#include <math.h>
#include <stdio.h>

#include "kernels/backend.h"
#include "kernels/cuda/attention_cuda.h"
#include "kernels/cuda/dense_cuda.h"

#define FULL 0xffffffffu
#define MAXU (ATTN_CUDA_MAX_DIM / 32) // output columns per lane

#define QB_WARPS 4                      // forward and dq: warps per block
#define QB_ROWS 4                       // query rows per warp
#define QB_BQ (QB_WARPS * QB_ROWS)      // query rows per block
#define QB_THREADS (QB_WARPS * 32)
#define KB 32                           // keys per tile (one per lane)

#define KV_WARPS 4                      // dk/dv: warps per block
#define KV_KEYS 4                       // key rows per warp
#define KV_BK (KV_WARPS * KV_KEYS)      // key rows per block
#define KV_BQ 32                        // queries per tile (one per lane)
#define KV_THREADS (KV_WARPS * 32)


__device__ static float warp_max(float v) {
#pragma unroll
    for (int o = 16; o > 0; o /= 2) v = fmaxf(v, __shfl_xor_sync(FULL, v, o));
    return v;
}

// Butterfly: every lane ends with the same bits (each step adds the same two values, commutatively).
__device__ static float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o /= 2) v += __shfl_xor_sync(FULL, v, o);
    return v;
}

// The first key row i sees, clamped into [0, i] (attention.h requires 0 <= doc_start[i] <= i; the CPU asserts it,
// here a bad value must not make a kernel read outside k and v).
__device__ static int row_lo(const int32_t *doc, int i) {
    int lo = doc ? doc[i] : 0;
    return lo < 0 ? 0 : lo > i ? i : lo;
}

__device__ static float dot(const float *a, const float *b, int n) {
    float acc = 0.0f;
    for (int c = 0; c < n; c++) acc = fmaf(a[c], b[c], acc);
    return acc;
}

// dst[r][c] (row stride ld) = src row (r0 + r) of head h, for r < nr, c < d; rows at or past T are zeros.
__device__ static void stage_rows(float *dst, int ld, const float *src, int r0, int nr, int T, int H, int h, int d) {
    const size_t rs = (size_t)H * d;
    for (int x = threadIdx.x; x < nr * d; x += blockDim.x) {
        const int r = x / d, c = x - r * d, i = r0 + r;
        dst[r * ld + c] = i < T ? src[(size_t)i * rs + (size_t)h * d + c] : 0.0f;
    }
}

// The smallest doc_start of rows i0..i1 (the block's first key), by thread 0.
__device__ static void first_key(int *out, const int32_t *doc, int i0, int i1) {
    if (threadIdx.x == 0) {
        int m = i1;
        for (int i = i0; i <= i1; i++) m = min(m, row_lo(doc, i));
        *out = m;
    }
}

// ------------------------------------------------------------------------------------------------------------
// Forward
// ------------------------------------------------------------------------------------------------------------

// Shared: Ks [KB][dqk+1], Vs [KB][dv], Qs [QB_BQ][dqk].
__global__ static void __launch_bounds__(QB_THREADS)
attn_fwd_kernel(float *out, float *lse, const float *q, const float *k, const float *v, const int32_t *doc, int T,
                int H, int dqk, int dv, float scale) {
    extern __shared__ float sm[];
    __shared__ int j_first;
    const int ks = dqk + 1;
    float *Ks = sm, *Vs = Ks + KB * ks, *Qs = Vs + KB * dv;
    const int h = blockIdx.y, i0 = blockIdx.x * QB_BQ, i1 = min(T, i0 + QB_BQ) - 1;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const size_t vs = (size_t)H * dv;
    stage_rows(Qs, dqk, q, i0, QB_BQ, T, H, h, dqk);
    first_key(&j_first, doc, i0, i1);
    int row[QB_ROWS], lo[QB_ROWS];
    float m[QB_ROWS], l[QB_ROWS], o[QB_ROWS][MAXU];
#pragma unroll
    for (int r = 0; r < QB_ROWS; r++) {
        row[r] = i0 + warp * QB_ROWS + r;
        lo[r] = row[r] < T ? row_lo(doc, row[r]) : 0;
        m[r] = -INFINITY;
        l[r] = 0.0f;
#pragma unroll
        for (int u = 0; u < MAXU; u++) o[r][u] = 0.0f;
    }
    __syncthreads();
    for (int j0 = j_first; j0 <= i1; j0 += KB) { // block-uniform trip count
        stage_rows(Ks, ks, k, j0, KB, T, H, h, dqk);
        stage_rows(Vs, dv, v, j0, KB, T, H, h, dv);
        __syncthreads();
#pragma unroll
        for (int r = 0; r < QB_ROWS; r++) {
            if (row[r] >= T) continue; // warp-uniform, as every condition guarding a shuffle below
            const int j = j0 + lane;
            const bool ok = j >= lo[r] && j <= row[r];
            float s = -INFINITY;
            if (ok) s = dot(Qs + (warp * QB_ROWS + r) * dqk, Ks + lane * ks, dqk) * scale;
            const float bm = warp_max(s);
            if (bm == -INFINITY) continue; // no key of this tile is in the row's window
            const float mn = fmaxf(m[r], bm);
            const float alpha = expf(m[r] - mn); // 0 on the row's first tile (m = −inf, o = l = 0)
            const float p = ok ? expf(s - mn) : 0.0f;
            l[r] = l[r] * alpha + warp_sum(p);
            m[r] = mn;
#pragma unroll
            for (int u = 0; u < MAXU; u++) o[r][u] *= alpha;
            for (int jj = 0; jj < KB; jj++) {
                const float pj = __shfl_sync(FULL, p, jj);
                const float *vr = Vs + jj * dv;
#pragma unroll
                for (int u = 0; u < MAXU; u++) {
                    const int e = lane + 32 * u;
                    if (e < dv) o[r][u] = fmaf(pj, vr[e], o[r][u]);
                }
            }
        }
        __syncthreads(); // the tile is consumed before the next one overwrites it
    }
#pragma unroll
    for (int r = 0; r < QB_ROWS; r++) {
        if (row[r] >= T) continue;
        float *orow = out + (size_t)row[r] * vs + (size_t)h * dv;
#pragma unroll
        for (int u = 0; u < MAXU; u++) {
            const int e = lane + 32 * u;
            if (e < dv) orow[e] = o[r][u] / l[r]; // l >= 1: the row's own key is always in its window
        }
        if (lane == 0) lse[(size_t)row[r] * H + h] = m[r] + logf(l[r]);
    }
}

// ------------------------------------------------------------------------------------------------------------
// Backward
// ------------------------------------------------------------------------------------------------------------

// D[w] = dout_w · out_w for the T·H rows w (one warp each).
__global__ static void attn_bwd_d_kernel(float *D, const float *dout, const float *out, long rows, int dv) {
    const long w = (long)blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    const int lane = threadIdx.x & 31;
    if (w >= rows) return; // whole warps return together
    const float *a = dout + (size_t)w * dv, *b = out + (size_t)w * dv;
    float acc = 0.0f;
    for (int e = lane; e < dv; e += 32) acc = fmaf(a[e], b[e], acc);
    acc = warp_sum(acc);
    if (lane == 0) D[w] = acc;
}

// Shared: Qs [KV_BQ][dqk+1], Os [KV_BQ][dv+1] (dout), Ks [KV_BK][dqk], Vs [KV_BK][dv].
__global__ static void __launch_bounds__(KV_THREADS)
attn_bwd_kv_kernel(float *dk, float *dv, const float *dout, const float *lse, const float *D, const float *q,
                   const float *k, const float *v, const int32_t *doc, int T, int H, int dqk, int dvd, float scale) {
    extern __shared__ float sm[];
    __shared__ float Ls[KV_BQ], Ds[KV_BQ];
    __shared__ int los[KV_BQ];
    const int qsd = dqk + 1, osd = dvd + 1;
    float *Qs = sm, *Os = Qs + KV_BQ * qsd, *Ks = Os + KV_BQ * osd, *Vs = Ks + KV_BK * dqk;
    const int h = blockIdx.y, j0 = blockIdx.x * KV_BK;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const bool want_dk = dk != NULL;
    stage_rows(Ks, dqk, k, j0, KV_BK, T, H, h, dqk);
    stage_rows(Vs, dvd, v, j0, KV_BK, T, H, h, dvd);
    float gk[KV_KEYS][MAXU], gv[KV_KEYS][MAXU];
#pragma unroll
    for (int kk = 0; kk < KV_KEYS; kk++)
#pragma unroll
        for (int u = 0; u < MAXU; u++) gk[kk][u] = gv[kk][u] = 0.0f;
    for (int i0 = j0; i0 < T; i0 += KV_BQ) { // queries before j0 see none of these keys
        __syncthreads(); // the previous query tile is consumed (first pass: nothing to wait for but harmless)
        stage_rows(Qs, qsd, q, i0, KV_BQ, T, H, h, dqk);
        stage_rows(Os, osd, dout, i0, KV_BQ, T, H, h, dvd);
        if (threadIdx.x < KV_BQ) {
            const int i = i0 + threadIdx.x;
            los[threadIdx.x] = i < T ? row_lo(doc, i) : INT_MAX;
            Ls[threadIdx.x] = i < T ? lse[(size_t)i * H + h] : 0.0f;
            Ds[threadIdx.x] = i < T && want_dk ? D[(size_t)i * H + h] : 0.0f;
        }
        __syncthreads(); // also publishes Ks, Vs on the first pass
#pragma unroll
        for (int kk = 0; kk < KV_KEYS; kk++) {
            const int jl = warp * KV_KEYS + kk, j = j0 + jl;
            if (j >= T) continue; // warp-uniform
            const int i = i0 + lane;
            const bool ok = i < T && i >= j && los[lane] <= j;
            if (!__any_sync(FULL, ok)) continue;
            float p = 0.0f, ds = 0.0f;
            if (ok) {
                p = expf(dot(Qs + lane * qsd, Ks + jl * dqk, dqk) * scale - Ls[lane]);
                if (want_dk) ds = scale * (p * (dot(Os + lane * osd, Vs + jl * dvd, dvd) - Ds[lane]));
            }
            for (int ii = 0; ii < KV_BQ; ii++) {
                const float pi = __shfl_sync(FULL, p, ii), dsi = __shfl_sync(FULL, ds, ii);
                const float *orow = Os + ii * osd, *qrow = Qs + ii * qsd;
#pragma unroll
                for (int u = 0; u < MAXU; u++) {
                    const int e = lane + 32 * u;
                    if (e < dvd) gv[kk][u] = fmaf(pi, orow[e], gv[kk][u]);
                    if (want_dk && e < dqk) gk[kk][u] = fmaf(dsi, qrow[e], gk[kk][u]);
                }
            }
        }
    }
#pragma unroll
    for (int kk = 0; kk < KV_KEYS; kk++) {
        const int j = j0 + warp * KV_KEYS + kk;
        if (j >= T) continue;
#pragma unroll
        for (int u = 0; u < MAXU; u++) {
            const int e = lane + 32 * u;
            if (dv && e < dvd) dv[(size_t)j * H * dvd + (size_t)h * dvd + e] += gv[kk][u];
            if (dk && e < dqk) dk[(size_t)j * H * dqk + (size_t)h * dqk + e] += gk[kk][u];
        }
    }
}

// Shared: Ks [KB][dqk+1], Vs [KB][dv+1], Qs [QB_BQ][dqk], Os [QB_BQ][dv] (dout).
__global__ static void __launch_bounds__(QB_THREADS)
attn_bwd_q_kernel(float *dq, const float *dout, const float *lse, const float *D, const float *q, const float *k,
                  const float *v, const int32_t *doc, int T, int H, int dqk, int dvd, float scale) {
    extern __shared__ float sm[];
    __shared__ int j_first;
    const int ks = dqk + 1, vsd = dvd + 1;
    float *Ks = sm, *Vs = Ks + KB * ks, *Qs = Vs + KB * vsd, *Os = Qs + QB_BQ * dqk;
    const int h = blockIdx.y, i0 = blockIdx.x * QB_BQ, i1 = min(T, i0 + QB_BQ) - 1;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    stage_rows(Qs, dqk, q, i0, QB_BQ, T, H, h, dqk);
    stage_rows(Os, dvd, dout, i0, QB_BQ, T, H, h, dvd);
    first_key(&j_first, doc, i0, i1);
    int row[QB_ROWS], lo[QB_ROWS];
    float L[QB_ROWS], Dr[QB_ROWS], acc[QB_ROWS][MAXU];
#pragma unroll
    for (int r = 0; r < QB_ROWS; r++) {
        row[r] = i0 + warp * QB_ROWS + r;
        const bool in = row[r] < T;
        lo[r] = in ? row_lo(doc, row[r]) : 0;
        L[r] = in ? lse[(size_t)row[r] * H + h] : 0.0f;
        Dr[r] = in ? D[(size_t)row[r] * H + h] : 0.0f;
#pragma unroll
        for (int u = 0; u < MAXU; u++) acc[r][u] = 0.0f;
    }
    __syncthreads();
    for (int j0 = j_first; j0 <= i1; j0 += KB) {
        stage_rows(Ks, ks, k, j0, KB, T, H, h, dqk);
        stage_rows(Vs, vsd, v, j0, KB, T, H, h, dvd);
        __syncthreads();
#pragma unroll
        for (int r = 0; r < QB_ROWS; r++) {
            if (row[r] >= T) continue;
            const int j = j0 + lane;
            const bool ok = j >= lo[r] && j <= row[r];
            if (!__any_sync(FULL, ok)) continue;
            float ds = 0.0f;
            if (ok) {
                const int rl = warp * QB_ROWS + r;
                const float p = expf(dot(Qs + rl * dqk, Ks + lane * ks, dqk) * scale - L[r]);
                ds = scale * (p * (dot(Os + rl * dvd, Vs + lane * vsd, dvd) - Dr[r]));
            }
            for (int jj = 0; jj < KB; jj++) {
                const float dsj = __shfl_sync(FULL, ds, jj);
                const float *kr = Ks + jj * ks;
#pragma unroll
                for (int u = 0; u < MAXU; u++) {
                    const int c = lane + 32 * u;
                    if (c < dqk) acc[r][u] = fmaf(dsj, kr[c], acc[r][u]);
                }
            }
        }
        __syncthreads();
    }
#pragma unroll
    for (int r = 0; r < QB_ROWS; r++) {
        if (row[r] >= T) continue;
        float *dr = dq + (size_t)row[r] * H * dqk + (size_t)h * dqk;
#pragma unroll
        for (int u = 0; u < MAXU; u++) {
            const int c = lane + 32 * u;
            if (c < dqk) dr[c] += acc[r][u];
        }
    }
}

// ------------------------------------------------------------------------------------------------------------
// Host side
// ------------------------------------------------------------------------------------------------------------

static float *d_buf = NULL; // D of the backward (T·H floats)
static size_t d_cap = 0;

extern "C" void attention_cuda_release(void) {
    cudaFree(d_buf);
    d_buf = NULL;
    d_cap = 0;
}

static float *scratch_d(size_t n) {
    if (n > d_cap) {
        cudaFree(d_buf); // synchronizes: no kernel still reads the old buffer
        d_buf = NULL;
        d_cap = 0;
        cudaError_t st = cudaMalloc(&d_buf, n * sizeof(float));
        if (st != cudaSuccess) {
            NOTE("cudaMalloc(attention D)", cudaGetErrorString(st));
            d_buf = NULL;
            return NULL;
        }
        d_cap = n;
    }
    return d_buf;
}

// Sizes the kernels support; the failure is noted (nothing is written) otherwise.
static int shapes_ok(const char *what, int H, int d_qk, int d_v) {
    if (d_qk < 1 || d_v < 1 || d_qk > ATTN_CUDA_MAX_DIM || d_v > ATTN_CUDA_MAX_DIM || H > 65535) {
        char why[160];
        snprintf(why, sizeof why, "head dims d_qk=%d d_v=%d must be in 1..%d and H=%d at most 65535", d_qk, d_v,
                 ATTN_CUDA_MAX_DIM, H);
        NOTE(what, why);
        return 0;
    }
    return 1;
}

// Lets kernel fn use `bytes` of dynamic shared memory (above 48 KiB it must opt in).
template <typename F> static int smem_ok(F *fn, size_t bytes, const char *what) {
    if (bytes <= 48 * 1024) return 1;
    cudaError_t st = cudaFuncSetAttribute(fn, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)bytes);
    if (st != cudaSuccess) {
        NOTE(what, cudaGetErrorString(st));
        return 0;
    }
    return 1;
}

extern "C" void cuda_attention_forward(float *out, float *lse, const float *q, const float *k, const float *v,
                                       const int32_t *doc_start, int T, int H, int d_qk, int d_v, float scale) {
    if (T <= 0 || H <= 0) return;
    if (!shapes_ok("attention_forward", H, d_qk, d_v)) return;
    const size_t bytes = sizeof(float) * ((size_t)KB * (d_qk + 1) + (size_t)KB * d_v + (size_t)QB_BQ * d_qk);
    if (!smem_ok(attn_fwd_kernel, bytes, "attention_forward: shared memory")) return;
    dim3 grid((unsigned)((T + QB_BQ - 1) / QB_BQ), (unsigned)H);
    attn_fwd_kernel<<<grid, QB_THREADS, bytes>>>(out, lse, q, k, v, doc_start, T, H, d_qk, d_v, scale);
    NOTE_LAUNCH("attention_forward");
}

extern "C" void cuda_attention_backward(float *dq, float *dk, float *dv, const float *dout, const float *out,
                                        const float *lse, const float *q, const float *k, const float *v,
                                        const int32_t *doc_start, int T, int H, int d_qk, int d_v, float scale) {
    if (T <= 0 || H <= 0 || (!dq && !dk && !dv)) return;
    if (!shapes_ok("attention_backward", H, d_qk, d_v)) return;
    float *D = NULL;
    if (dq || dk) { // ds needs D; dv alone does not
        const long rows = (long)T * H;
        D = scratch_d((size_t)rows);
        if (!D) return;
        attn_bwd_d_kernel<<<(unsigned)((rows + 7) / 8), 256>>>(D, dout, out, rows, d_v);
        NOTE_LAUNCH("attention_backward D");
    }
    if (dk || dv) {
        const size_t bytes = sizeof(float) * ((size_t)KV_BQ * (d_qk + 1) + (size_t)KV_BQ * (d_v + 1) +
                                              (size_t)KV_BK * d_qk + (size_t)KV_BK * d_v);
        if (!smem_ok(attn_bwd_kv_kernel, bytes, "attention_backward dk/dv: shared memory")) return;
        dim3 grid((unsigned)((T + KV_BK - 1) / KV_BK), (unsigned)H);
        attn_bwd_kv_kernel<<<grid, KV_THREADS, bytes>>>(dk, dv, dout, lse, D, q, k, v, doc_start, T, H, d_qk, d_v,
                                                        scale);
        NOTE_LAUNCH("attention_backward dk/dv");
    }
    if (dq) {
        const size_t bytes = sizeof(float) * ((size_t)KB * (d_qk + 1) + (size_t)KB * (d_v + 1) +
                                              (size_t)QB_BQ * d_qk + (size_t)QB_BQ * d_v);
        if (!smem_ok(attn_bwd_q_kernel, bytes, "attention_backward dq: shared memory")) return;
        dim3 grid((unsigned)((T + QB_BQ - 1) / QB_BQ), (unsigned)H);
        attn_bwd_q_kernel<<<grid, QB_THREADS, bytes>>>(dq, dout, lse, D, q, k, v, doc_start, T, H, d_qk, d_v, scale);
        NOTE_LAUNCH("attention_backward dq");
    }
}

// Sliding-window attention (attention_swa.h) is not ported: the table's entries say so instead of being NULL, so a
// model configured without a window runs on this backend and one configured with a window fails with this message.
extern "C" int cuda_attention_swa_forward(float *, float *, const float *, const float *, const float *,
                                          const int32_t *, int, int, int, int, float, int, int, mr_err *e) {
    return err_set(e, MR_EDEVICE, "attention_swa_forward: sliding-window attention is not implemented on CUDA "
                                  "(moerl_swa_window > 0 needs device cpu)");
}

extern "C" int cuda_attention_swa_backward(float *, float *, float *, const float *, const float *, const float *,
                                           const float *, const float *, const float *, const int32_t *, int, int,
                                           int, int, float, int, int, mr_err *e) {
    return err_set(e, MR_EDEVICE, "attention_swa_backward: sliding-window attention is not implemented on CUDA "
                                  "(moerl_swa_window > 0 needs device cpu)");
}

// ---------------------------------------------------------------------------------------------- absorbed decode

#define MLA_THREADS 128
#ifdef MOERL_CUEMU // the CPU emulation (tests/cuemu): small, so that its tests reach several chunks at small sizes
#define MLA_SCORES_MAX ((size_t)4096)
#else
#define MLA_SCORES_MAX ((size_t)16 << 20) // floats of score scratch per launch of cuda_mla_absorbed (64 MiB)
#endif
#define MLA_WARPS (MLA_THREADS / 32)

// Block-wide reduction of one value per warp (lane-uniform after warp_max / warp_sum) in warp order.
__device__ static float block_reduce(float v, float *red, int is_max) {
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    __syncthreads(); // red may still be read by a previous reduction
    if (lane == 0) red[warp] = v;
    __syncthreads();
    float r = red[0];
    for (int w = 1; w < MLA_WARPS; w++) r = is_max ? fmaxf(r, red[w]) : r + red[w];
    return r;
}

// grid (H, B), MLA_THREADS threads, shared 2·r_kv + 32 floats.
__global__ static void mla_absorbed_kernel(float *out, float *lse, const float *q, const float *const *ckv,
                                           const float *const *krope, const int32_t *len, const float *w, int H,
                                           int dn, int dr, int dv, int rkv, float scale, float *S, int maxlen) {
    extern __shared__ float sh[];
    float *qt = sh, *z = sh + rkv, *red = z + rkv;
    const int h = blockIdx.x, b = blockIdx.y, tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
    const float *qb = q + ((size_t)b * H + h) * (size_t)(dn + dr);
    const float *wk = w + (size_t)h * (size_t)(dn + dv) * rkv; // W_UK[h]: dn rows of r_kv
    const float *wv = wk + (size_t)dn * rkv;                   // W_UV[h]: dv rows of r_kv
    for (int r = tid; r < rkv; r += MLA_THREADS) { // q̃[r] = Σ_i W_UK[h][i][r] q_nope[i], i in order
        float s = 0.0f;
        for (int i = 0; i < dn; i++) s = fmaf(wk[(size_t)i * rkv + r], qb[i], s);
        qt[r] = s;
    }
    __syncthreads();
    const int n = len[b];
    const float *c = ckv[b], *kr = krope[b];
    float *sc = S + ((size_t)b * H + h) * (size_t)maxlen;
    float mx = -INFINITY;
    for (int u = warp; u < n; u += MLA_WARPS) { // one warp per key: lanes stride the latent, then the RoPE key
        const float *cu = c + (size_t)u * rkv, *ku = kr + (size_t)u * dr;
        float s = 0.0f;
        for (int r = lane; r < rkv; r += 32) s = fmaf(qt[r], cu[r], s);
        for (int r = lane; r < dr; r += 32) s = fmaf(qb[dn + r], ku[r], s);
        s = scale * warp_sum(s);
        if (lane == 0) sc[u] = s;
        mx = fmaxf(mx, s);
    }
    mx = block_reduce(mx, red, 1);
    __syncthreads(); // the scores are visible to every thread
    float part = 0.0f;
    for (int u = tid; u < n; u += MLA_THREADS) part += expf(sc[u] - mx);
    const float sum = block_reduce(warp_sum(part), red, 0);
    const float inv = 1.0f / sum;
    for (int u = tid; u < n; u += MLA_THREADS) sc[u] = expf(sc[u] - mx) * inv;
    __syncthreads();
    for (int r = tid; r < rkv; r += MLA_THREADS) { // z[r] = Σ_u p_u c_kv[u][r], u in order
        float s = 0.0f;
        for (int u = 0; u < n; u++) s = fmaf(sc[u], c[(size_t)u * rkv + r], s);
        z[r] = s;
    }
    __syncthreads();
    float *ob = out + ((size_t)b * H + h) * (size_t)dv;
    for (int j = tid; j < dv; j += MLA_THREADS) { // out[j] = Σ_r W_UV[h][j][r] z[r]
        const float *wr = wv + (size_t)j * rkv;
        float s = 0.0f;
        for (int r = 0; r < rkv; r++) s = fmaf(wr[r], z[r], s);
        ob[j] = s;
    }
    if (lse && tid == 0) lse[(size_t)b * H + h] = mx + logf(sum);
}

extern "C" int cuda_mla_absorbed(float *out, float *lse, const float *q, const float *const *c_kv,
                                 const float *const *k_rope, const int32_t *len, const float *w_kvb, int B, int H,
                                 int d_nope, int d_rope, int d_v, int r_kv, float scale, mr_err *e) {
    if (B == 0) return MR_OK;
    if (B < 0 || H < 1 || H > 65535 || B > 65535 || d_nope < 1 || d_rope < 0 || d_v < 1 || r_kv < 1 || r_kv > 8192)
        return err_set(e, MR_EINVAL, "mla_absorbed (cuda): bad sizes B=%d H=%d d_nope=%d d_rope=%d d_v=%d r_kv=%d", B,
                       H, d_nope, d_rope, d_v, r_kv);
    int maxlen = 0;
    for (int b = 0; b < B; b++) {
        if (len[b] < 1) return err_set(e, MR_EINVAL, "mla_absorbed (cuda): sequence %d has %d cached tokens", b, len[b]);
        if (len[b] > maxlen) maxlen = len[b];
    }
    // Rows in chunks whose score scratch stays within MLA_SCORES_MAX floats (a training forward has T rows of up to
    // T keys each); every row is computed alone, so the chunking changes no bit.
    const size_t per_row = (size_t)H * maxlen;
    int CB = (int)(MLA_SCORES_MAX / per_row);
    if (CB < 1) CB = 1;
    if (CB > B) CB = B;
    const size_t pbytes = 2 * (size_t)CB * sizeof(float *), abytes = pbytes + (size_t)CB * sizeof(int32_t);
    char *args = (char *)dense_cuda_scratch(DENSE_CUDA_SCRATCH_MLA_ARGS, abytes);
    float *S = (float *)dense_cuda_scratch(DENSE_CUDA_SCRATCH_MLA_SCORES, (size_t)CB * per_row * sizeof(float));
    if (!args || !S) return err_set(e, MR_EDEVICE, "mla_absorbed (cuda): out of device memory for its scratch");
    const size_t smem = (2 * (size_t)r_kv + 32) * sizeof(float);
    for (int b0 = 0; b0 < B; b0 += CB) {
        const int nb = B - b0 < CB ? B - b0 : CB;
        // synchronous copies: the previous chunk's kernel has read its arguments before they are overwritten
        cudaError_t st = cudaMemcpy(args, c_kv + b0, (size_t)nb * sizeof(float *), cudaMemcpyHostToDevice);
        if (st == cudaSuccess)
            st = cudaMemcpy(args + (size_t)CB * sizeof(float *), k_rope + b0, (size_t)nb * sizeof(float *),
                            cudaMemcpyHostToDevice);
        if (st == cudaSuccess)
            st = cudaMemcpy(args + pbytes, len + b0, (size_t)nb * sizeof(int32_t), cudaMemcpyHostToDevice);
        if (st != cudaSuccess)
            return err_set(e, MR_EDEVICE, "mla_absorbed (cuda): copying its arguments: %s", cudaGetErrorString(st));
        mla_absorbed_kernel<<<dim3((unsigned)H, (unsigned)nb), MLA_THREADS, smem>>>(
            out + (size_t)b0 * H * d_v, lse ? lse + (size_t)b0 * H : NULL, q + (size_t)b0 * H * (d_nope + d_rope),
            (const float *const *)args, (const float *const *)(args + (size_t)CB * sizeof(float *)),
            (const int32_t *)(args + pbytes), w_kvb, H, d_nope, d_rope, d_v, r_kv, scale, S, maxlen);
        st = cudaGetLastError();
        if (st != cudaSuccess) return err_set(e, MR_EDEVICE, "mla_absorbed (cuda): launch: %s", cudaGetErrorString(st));
    }
    return MR_OK;
}

// ------------------------------------------------------------------------------------ decode rows on the device

// Row t's latent and RoPE key into its cache's layer at its slot: one block per row.
__global__ static void kv_append_kernel(const kv_row *rows, int layer, const float *cn, const float *kpe, int rkv,
                                        int dr) {
    const kv_row r = rows[blockIdx.x];
    const size_t at = (size_t)layer * (size_t)r.cap + (size_t)r.at;
    for (int i = threadIdx.x; i < rkv + dr; i += blockDim.x) {
        if (i < rkv) r.ckv[at * rkv + i] = cn[(size_t)blockIdx.x * rkv + i];
        else r.kpe[at * dr + (i - rkv)] = kpe[(size_t)blockIdx.x * dr + (i - rkv)];
    }
}

extern "C" void cuda_kv_append(const kv_row *rows, int layer, const float *cn, const float *kpe, int T, int r_kv,
                               int d_rope) {
    if (T <= 0) return;
    kv_append_kernel<<<(unsigned)T, 128>>>(rows, layer, cn, kpe, r_kv, d_rope);
    NOTE_LAUNCH("kv_append");
}

// The pointer and length arrays of mla_absorbed_kernel from the rows.
__global__ static void rows_args_kernel(const float **pc, const float **pk, int32_t *len, const kv_row *rows,
                                        int layer, int B, int rkv, int dr) {
    const int b = blockIdx.x * blockDim.x + threadIdx.x;
    if (b >= B) return;
    const kv_row r = rows[b];
    const size_t base = (size_t)layer * (size_t)r.cap;
    pc[b] = r.ckv + base * rkv;
    pk[b] = r.kpe + base * dr;
    len[b] = r.at + 1;
}

extern "C" int cuda_mla_rows(float *out, float *lse, const float *q, const kv_row *rows, int layer,
                             const float *w_kvb, int B, int H, int d_nope, int d_rope, int d_v, int r_kv, float scale,
                             int max_cap, mr_err *e) {
    if (B == 0) return MR_OK;
    if (B < 0 || H < 1 || H > 65535 || B > 65535 || d_nope < 1 || d_rope < 0 || d_v < 1 || r_kv < 1 || r_kv > 8192 ||
        max_cap < 1)
        return err_set(e, MR_EINVAL, "mla_rows (cuda): bad sizes B=%d H=%d d_nope=%d d_rope=%d d_v=%d r_kv=%d cap=%d",
                       B, H, d_nope, d_rope, d_v, r_kv, max_cap);
    const size_t pbytes = 2 * (size_t)B * sizeof(float *), abytes = pbytes + (size_t)B * sizeof(int32_t);
    char *args = (char *)dense_cuda_scratch(DENSE_CUDA_SCRATCH_MLA_ARGS, abytes);
    float *S = (float *)dense_cuda_scratch(DENSE_CUDA_SCRATCH_MLA_SCORES, (size_t)B * H * max_cap * sizeof(float));
    if (!args || !S) return err_set(e, MR_EDEVICE, "mla_rows (cuda): out of device memory for its scratch");
    const float **pc = (const float **)args, **pk = pc + B;
    int32_t *len = (int32_t *)(args + pbytes);
    rows_args_kernel<<<(unsigned)((B + 127) / 128), 128>>>(pc, pk, len, rows, layer, B, r_kv, d_rope);
    const size_t smem = (2 * (size_t)r_kv + 32) * sizeof(float);
    mla_absorbed_kernel<<<dim3((unsigned)H, (unsigned)B), MLA_THREADS, smem>>>(out, lse, q, pc, pk, len, w_kvb, H,
                                                                               d_nope, d_rope, d_v, r_kv, scale, S,
                                                                               max_cap);
    cudaError_t st = cudaGetLastError();
    if (st != cudaSuccess) return err_set(e, MR_EDEVICE, "mla_rows (cuda): launch: %s", cudaGetErrorString(st));
    return MR_OK;
}
