// dense_cuda.cu: the dense ops of the backend table on the GPU (see dense_cuda.h for the contract).
//
// The one idea: every output element belongs to one thread (or one fixed group of 16 lanes) that reduces in an
// order fixed by the reduction length, so results are deterministic and batch-invariant; no float atomics. Where
// kernels/cpu replays a cheap fixed order (MM_DET's 16 lanes + tree, RMSNorm's 16 lanes, the in-order sums over t
// of dg and of the embedding gradient, AdamW's elementwise chain), the same order is replayed here with __f*_rn
// intrinsics, which nvcc never contracts into fused multiply-adds (plain a*b+c would be fused by default, giving
// different bits from the CPU, whose ISO C build does not contract). fmaf is fused on both sides.
#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kernels/cuda/dense_cuda.h"
#include "kernels/cuda/det_cuda.cuh"

// ------------------------------------------------------------------------------------------------------------
// Errors, cuBLAS handle, scratch
// ------------------------------------------------------------------------------------------------------------

static mr_err first_err; // the first failure since the last dense_cuda_take_error (code 0 = none)

static void note_err(const char *file, int line, const char *what, const char *why) {
    if (first_err.code != MR_OK) return;
    err_set(&first_err, MR_EDEVICE, "%s:%d: %s: %s", file, line, what, why);
}

#define NOTE_CUDA(call)                                                                                        \
    do {                                                                                                       \
        cudaError_t st_ = (call);                                                                              \
        if (st_ != cudaSuccess) note_err(__FILE__, __LINE__, #call, cudaGetErrorString(st_));                 \
    } while (0)
#define NOTE_CUBLAS(call)                                                                                      \
    do {                                                                                                       \
        cublasStatus_t st_ = (call);                                                                           \
        if (st_ != CUBLAS_STATUS_SUCCESS) note_err(__FILE__, __LINE__, #call, cublasGetStatusString(st_));     \
    } while (0)

extern "C" int dense_cuda_take_error(mr_err *e) {
    int code = first_err.code;
    if (code != MR_OK) {
        err_set(e, code, "%s", first_err.msg);
        memset(&first_err, 0, sizeof first_err);
    }
    return code;
}

extern "C" void dense_cuda_note_error(const char *file, int line, const char *what, const char *why) {
    note_err(file, line, what, why);
}

static int use_bf16 = 0;
static unsigned scratch_gen; // dense_cuda_scratch_generation

extern "C" int dense_cuda_set_bf16(int on) {
    int prev = use_bf16;
    use_bf16 = on != 0;
    if (use_bf16 != prev) scratch_gen++; // captured graphs hold the other GEMM path
    return prev;
}

static cublasHandle_t cublas_h = NULL;
static void *cublas_ws = NULL;
#define CUBLAS_WS_BYTES ((size_t)32 << 20) // the cuBLAS guide's size for Hopper (4 MiB before it)

static cublasHandle_t cublas(void) {
    if (!cublas_h) {
        cublasStatus_t st = cublasCreate(&cublas_h);
        if (st != CUBLAS_STATUS_SUCCESS) {
            note_err(__FILE__, __LINE__, "cublasCreate", cublasGetStatusString(st));
            cublas_h = NULL;
            return NULL;
        }
        // DEFAULT_MATH never lowers the requested precision (no TF32 for Sgemm) but lets GemmEx use tensor cores
        // for bf16; atomics stay off, so a given GEMM shape gives the same bits on every run on the same GPU model.
        NOTE_CUBLAS(cublasSetMathMode(cublas_h, CUBLAS_DEFAULT_MATH));
        // Every moerl kernel runs on the per-thread default stream (nvcc --default-stream per-thread): cuBLAS too,
        // so a decode step can be captured into a CUDA graph (the legacy stream cannot be captured).
        NOTE_CUBLAS(cublasSetStream(cublas_h, cudaStreamPerThread));
        // A workspace of our own, allocated once: no allocation inside a captured decode step.
        if (cudaMalloc(&cublas_ws, CUBLAS_WS_BYTES) == cudaSuccess)
            NOTE_CUBLAS(cublasSetWorkspace(cublas_h, cublas_ws, CUBLAS_WS_BYTES));
        else
            cublas_ws = NULL, cudaGetLastError(); // cuBLAS keeps its own pool
        NOTE_CUBLAS(cublasSetAtomicsMode(cublas_h, CUBLAS_ATOMICS_NOT_ALLOWED));
    }
    return cublas_h;
}

static void *scratch[DENSE_CUDA_SCRATCH_N];
static size_t scratch_size[DENSE_CUDA_SCRATCH_N];

extern "C" unsigned dense_cuda_scratch_generation(void) { return scratch_gen; }

extern "C" void *dense_cuda_scratch(int slot, size_t nbytes) {
    if (nbytes > scratch_size[slot]) {
        scratch_gen++; // captured graphs that use the old buffer are stale
        cudaFree(scratch[slot]); // synchronizes: nothing in flight still reads the old buffer
        scratch[slot] = NULL;
        scratch_size[slot] = 0;
        cudaError_t st = cudaMalloc(&scratch[slot], nbytes);
        if (st != cudaSuccess) {
            note_err(__FILE__, __LINE__, "cudaMalloc(scratch)", cudaGetErrorString(st));
            scratch[slot] = NULL;
            return NULL;
        }
        scratch_size[slot] = nbytes;
    }
    return scratch[slot];
}

extern "C" void dense_cuda_release(void) {
    scratch_gen++;
    for (int i = 0; i < DENSE_CUDA_SCRATCH_N; i++) {
        cudaFree(scratch[i]);
        scratch[i] = NULL;
        scratch_size[i] = 0;
    }
    if (cublas_h) cublasDestroy(cublas_h);
    cublas_h = NULL;
    cudaFree(cublas_ws);
    cublas_ws = NULL;
}

static unsigned grid_for(size_t n, unsigned threads) {
    size_t b = (n + threads - 1) / threads;
    return (unsigned)(b > 65535 * 16 ? 65535 * 16 : b); // grid-stride loops cover the rest
}

// ------------------------------------------------------------------------------------------------------------
// matmul
// ------------------------------------------------------------------------------------------------------------

#define LANES DET_CUDA_LANES
#define TILE 16

// MM_DET forward: y[t][o] = (beta ? y : 0) + tree(lanes), lane l = fused chain over i = l, l+16, ... A 16x16 block
// stages 16 columns of x and w per step in shared memory; column k0+l feeds lane l, exactly dense.c's order.
__global__ static void det_forward_kernel(float *y, const float *x, const float *w, int T, int in, int out, int beta) {
    __shared__ float xs[TILE][LANES + 1], ws[TILE][LANES + 1];
    const int tx = threadIdx.x, ty = threadIdx.y;
    const int t0 = blockIdx.y * TILE, o0 = blockIdx.x * TILE;
    float acc[LANES];
#pragma unroll
    for (int l = 0; l < LANES; l++) acc[l] = 0.0f;
    for (int k0 = 0; k0 < in; k0 += LANES) {
        const int k = k0 + tx;
        xs[ty][tx] = (t0 + ty < T && k < in) ? x[(size_t)(t0 + ty) * in + k] : 0.0f;
        ws[ty][tx] = (o0 + ty < out && k < in) ? w[(size_t)(o0 + ty) * in + k] : 0.0f;
        __syncthreads();
        const int n = in - k0 < LANES ? in - k0 : LANES;
#pragma unroll
        for (int l = 0; l < LANES; l++)
            if (l < n) acc[l] = fmaf(xs[ty][l], ws[tx][l], acc[l]);
        __syncthreads();
    }
    const int t = t0 + ty, o = o0 + tx;
    if (t < T && o < out) {
        float s = det_tree(acc);
        float *yo = y + (size_t)t * out + o;
        *yo = beta ? __fadd_rn(*yo, s) : s;
    }
}

// MM_DET backward (dense.c's op_block): C[m][n] += fused chain over k = 0..K-1 of A(m,k)·B(k,n), started at 0.
// A(m,k) = a[m*sam + k*sak], B(k,n) = b[k*ldb + n], C(m,n) = c[m*ldc + n].
__global__ static void det_outer_kernel(float *c, const float *a, const float *b, size_t sam, size_t sak,
                                        size_t ldb, size_t ldc, int M, int N, int K) {
    __shared__ float as[TILE][TILE + 1], bs[TILE][TILE + 1];
    const int tx = threadIdx.x, ty = threadIdx.y;
    const int m0 = blockIdx.y * TILE, n0 = blockIdx.x * TILE;
    float acc = 0.0f;
    for (int k0 = 0; k0 < K; k0 += TILE) {
        as[ty][tx] = (m0 + ty < M && k0 + tx < K) ? a[(size_t)(m0 + ty) * sam + (size_t)(k0 + tx) * sak] : 0.0f;
        bs[ty][tx] = (k0 + ty < K && n0 + tx < N) ? b[(size_t)(k0 + ty) * ldb + n0 + tx] : 0.0f;
        __syncthreads();
        const int kn = K - k0 < TILE ? K - k0 : TILE;
        for (int k = 0; k < kn; k++) acc = fmaf(as[ty][k], bs[k][tx], acc);
        __syncthreads();
    }
    const int m = m0 + ty, n = n0 + tx;
    if (m < M && n < N) {
        float *cm = c + (size_t)m * ldc + n;
        *cm = __fadd_rn(*cm, acc);
    }
}

__global__ static void to_bf16_kernel(__nv_bfloat16 *dst, const float *src, size_t n) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
        dst[i] = __float2bfloat16_rn(src[i]);
}

// src rounded to bf16 into scratch slot; NULL (error noted) on failure.
static const __nv_bfloat16 *as_bf16(int slot, const float *src, size_t n) {
    __nv_bfloat16 *d = (__nv_bfloat16 *)dense_cuda_scratch(slot, (n ? n : 1) * sizeof(__nv_bfloat16));
    if (!d) return NULL;
    to_bf16_kernel<<<grid_for(n, 256), 256>>>(d, src, n);
    NOTE_LAUNCH("to_bf16");
    return d;
}

// Column-major C(m×n, ldc) = alpha·op(A)·op(B) + beta·C through Sgemm or, in bf16 mode, GemmEx on bf16 copies of
// A and B (fp32 accumulate, fp32 C). na, nb: the element counts of A and B (for the conversion).
static void gemm(cublasOperation_t ta, cublasOperation_t tb, int m, int n, int k, const float *A, int lda, size_t na,
                 const float *B, int ldb, size_t nb, float beta, float *C, int ldc) {
    cublasHandle_t h = cublas();
    if (!h) return;
    const float alpha = 1.0f;
    if (!use_bf16) {
        NOTE_CUBLAS(cublasSgemm(h, ta, tb, m, n, k, &alpha, A, lda, B, ldb, &beta, C, ldc));
        return;
    }
    const __nv_bfloat16 *Ab = as_bf16(DENSE_CUDA_SCRATCH_A, A, na), *Bb = as_bf16(DENSE_CUDA_SCRATCH_B, B, nb);
    if (!Ab || !Bb) return;
    NOTE_CUBLAS(cublasGemmEx(h, ta, tb, m, n, k, &alpha, Ab, CUDA_R_16BF, lda, Bb, CUDA_R_16BF, ldb, &beta, C,
                             CUDA_R_32F, ldc, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
}

// Row-major y(T,out) = x(T,in)·w(out,in)ᵀ is column-major yᶜ(out×T) = wᶜᵀ·xᶜ with wᶜ (in×out), xᶜ (in×T).
extern "C" void cuda_matmul_forward(float *y, const float *x, const float *w, int T, int in, int out, float beta,
                                    mm_mode mode) {
    if (T <= 0 || out <= 0) return;
    const int acc = beta != 0.0f;
    if (mode == MM_DET) {
        dim3 grid((unsigned)((out + TILE - 1) / TILE), (unsigned)((T + TILE - 1) / TILE)), block(TILE, TILE);
        det_forward_kernel<<<grid, block>>>(y, x, w, T, in, out, acc);
        NOTE_LAUNCH("det_forward");
        return;
    }
    if (in <= 0) { // every dot product is empty
        if (!acc) NOTE_CUDA(cudaMemsetAsync(y, 0, sizeof(float) * (size_t)T * out, 0));
        return;
    }
    gemm(CUBLAS_OP_T, CUBLAS_OP_N, out, T, in, w, in, (size_t)out * in, x, in, (size_t)T * in, acc ? 1.0f : 0.0f, y,
         out);
}

// dx(T,in) += dy(T,out)·w(out,in): column-major dxᶜ(in×T) += wᶜ(in×out)·dyᶜ(out×T).
// dw(out,in) += dy(T,out)ᵀ·x(T,in): column-major dwᶜ(in×out) += xᶜ(in×T)·dyᶜ(out×T)ᵀ.
extern "C" void cuda_matmul_backward(float *dx, float *dw, const float *dy, const float *x, const float *w, int T,
                                     int in, int out, mm_mode mode) {
    if (T <= 0 || in <= 0 || out <= 0) return;
    if (mode == MM_DET) {
        dim3 block(TILE, TILE);
        if (dx) {
            dim3 grid((unsigned)((in + TILE - 1) / TILE), (unsigned)((T + TILE - 1) / TILE));
            det_outer_kernel<<<grid, block>>>(dx, dy, w, (size_t)out, 1, (size_t)in, (size_t)in, T, in, out);
            NOTE_LAUNCH("det_outer dx");
        }
        if (dw) {
            dim3 grid((unsigned)((in + TILE - 1) / TILE), (unsigned)((out + TILE - 1) / TILE));
            det_outer_kernel<<<grid, block>>>(dw, dy, x, 1, (size_t)out, (size_t)in, (size_t)in, out, in, T);
            NOTE_LAUNCH("det_outer dw");
        }
        return;
    }
    if (dx)
        gemm(CUBLAS_OP_N, CUBLAS_OP_N, in, T, out, w, in, (size_t)out * in, dy, out, (size_t)T * out, 1.0f, dx, in);
    if (dw)
        gemm(CUBLAS_OP_N, CUBLAS_OP_T, in, out, T, x, in, (size_t)T * in, dy, out, (size_t)T * out, 1.0f, dw, in);
}

// ------------------------------------------------------------------------------------------------------------
// RMSNorm: one block per row; the row's reduction is dense.c's 16 lanes (threads 0..15, lane l takes c ≡ l mod 16
// in order) and its lane tree done with half-warp shuffles, so the bits are the CPU's.
// ------------------------------------------------------------------------------------------------------------

#define ROW_THREADS 128

// Lanes 0..15 of warp 0 hold a[l]; lane 0 returns det_tree(a) (the shuffles perform the tree's additions).
__device__ static float lane_tree16(float v) {
    v = __fadd_rn(v, __shfl_down_sync(0xffffu, v, 8, 16)); // s8[l] = a[l] + a[l+8]
    v = __fadd_rn(v, __shfl_down_sync(0xffffu, v, 4, 16)); // s4[l] = s8[l] + s8[l+4]
    v = __fadd_rn(v, __shfl_down_sync(0xffffu, v, 2, 16)); // s4[0]+s4[2], s4[1]+s4[3]
    return __fadd_rn(v, __shfl_down_sync(0xffffu, v, 1, 16)); // s2a + s2b (lanes >= 1 carry partial sums)
}

__global__ static void rmsnorm_forward_kernel(float *out, float *rstd, const float *x, const float *g, int C,
                                              float eps) {
    __shared__ float r_sh;
    const size_t t = blockIdx.x;
    const float *xt = x + t * C;
    float *ot = out + t * C;
    if (threadIdx.x < LANES) {
        float acc = 0.0f;
        for (int c = threadIdx.x; c < C; c += LANES) acc = __fadd_rn(acc, __fmul_rn(xt[c], xt[c]));
        float s = lane_tree16(acc);
        if (threadIdx.x == 0) {
            float r = __fdiv_rn(1.0f, __fsqrt_rn(__fadd_rn(__fdiv_rn(s, (float)C), eps)));
            r_sh = r;
            if (rstd) rstd[t] = r;
        }
    }
    __syncthreads();
    const float r = r_sh;
    for (int c = threadIdx.x; c < C; c += blockDim.x) ot[c] = __fmul_rn(g[c], __fmul_rn(xt[c], r));
}

// dx += r·dout·g − (r³ Σ(dout·g·x) / C)·x per row (same lane order as the CPU).
__global__ static void rmsnorm_backward_dx_kernel(float *dx, const float *dout, const float *x, const float *g,
                                                  const float *rstd, int C) {
    __shared__ float k_sh;
    const size_t t = blockIdx.x;
    const float *xt = x + t * C, *dt = dout + t * C;
    float *dxt = dx + t * C;
    const float r = rstd[t];
    if (threadIdx.x < LANES) {
        float acc = 0.0f;
        for (int c = threadIdx.x; c < C; c += LANES) acc = __fadd_rn(acc, __fmul_rn(__fmul_rn(dt[c], g[c]), xt[c]));
        float s = lane_tree16(acc);
        if (threadIdx.x == 0) k_sh = __fdiv_rn(__fmul_rn(__fmul_rn(__fmul_rn(r, r), r), s), (float)C);
    }
    __syncthreads();
    const float k = k_sh;
    for (int c = threadIdx.x; c < C; c += blockDim.x)
        dxt[c] = __fadd_rn(dxt[c], __fsub_rn(__fmul_rn(__fmul_rn(r, dt[c]), g[c]), __fmul_rn(k, xt[c])));
}

// dg[c] += Σ_t dout·x·r, t = 0..T-1 in order, one thread per channel (the CPU's order: its bits).
__global__ static void rmsnorm_backward_dg_kernel(float *dg, const float *dout, const float *x, const float *rstd,
                                                  int T, int C) {
    const int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= C) return;
    float acc = 0.0f;
    for (int t = 0; t < T; t++) {
        const size_t i = (size_t)t * C + c;
        acc = __fadd_rn(acc, __fmul_rn(__fmul_rn(dout[i], x[i]), rstd[t]));
    }
    dg[c] = __fadd_rn(dg[c], acc);
}

extern "C" void cuda_rmsnorm_forward(float *out, float *rstd, const float *x, const float *g, int T, int C, float eps) {
    if (T <= 0 || C <= 0) return;
    rmsnorm_forward_kernel<<<(unsigned)T, ROW_THREADS>>>(out, rstd, x, g, C, eps);
    NOTE_LAUNCH("rmsnorm_forward");
}

extern "C" void cuda_rmsnorm_backward(float *dx, float *dg, const float *dout, const float *x, const float *g,
                                      const float *rstd, int T, int C) {
    if (T <= 0 || C <= 0) return;
    if (dx) {
        rmsnorm_backward_dx_kernel<<<(unsigned)T, ROW_THREADS>>>(dx, dout, x, g, rstd, C);
        NOTE_LAUNCH("rmsnorm_backward dx");
    }
    if (dg) {
        rmsnorm_backward_dg_kernel<<<(unsigned)((C + 255) / 256), 256>>>(dg, dout, x, rstd, T, C);
        NOTE_LAUNCH("rmsnorm_backward dg");
    }
}

// ------------------------------------------------------------------------------------------------------------
// SwiGLU (elementwise; CUDA's expf is within 2 ulp of libm's, so not always the CPU's bits)
// ------------------------------------------------------------------------------------------------------------

__global__ static void swiglu_forward_kernel(float *h, const float *gate, const float *up, size_t n) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        const float z = gate[i];
        h[i] = __fmul_rn(__fdiv_rn(z, __fadd_rn(1.0f, expf(-z))), up[i]);
    }
}

__global__ static void swiglu_backward_kernel(float *dgate, float *dup, const float *dh, const float *gate,
                                              const float *up, size_t n) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        const float z = gate[i], s = __fdiv_rn(1.0f, __fadd_rn(1.0f, expf(-z)));
        dup[i] = __fadd_rn(dup[i], __fmul_rn(dh[i], __fmul_rn(z, s)));
        const float ds = __fmul_rn(s, __fadd_rn(1.0f, __fmul_rn(z, __fsub_rn(1.0f, s))));
        dgate[i] = __fadd_rn(dgate[i], __fmul_rn(__fmul_rn(dh[i], up[i]), ds));
    }
}

extern "C" void cuda_swiglu_forward(float *h, const float *gate, const float *up, int T, int I) {
    const size_t n = (size_t)(T > 0 ? T : 0) * (size_t)(I > 0 ? I : 0);
    if (!n) return;
    swiglu_forward_kernel<<<grid_for(n, 256), 256>>>(h, gate, up, n);
    NOTE_LAUNCH("swiglu_forward");
}

extern "C" void cuda_swiglu_backward(float *dgate, float *dup, const float *dh, const float *gate, const float *up,
                                     int T, int I) {
    const size_t n = (size_t)(T > 0 ? T : 0) * (size_t)(I > 0 ? I : 0);
    if (!n) return;
    swiglu_backward_kernel<<<grid_for(n, 256), 256>>>(dgate, dup, dh, gate, up, n);
    NOTE_LAUNCH("swiglu_backward");
}

// ------------------------------------------------------------------------------------------------------------
// Embedding. Backward without atomics: thread (c, bucket b) walks t = 0..T-1 and adds the rows whose id ≡ b mod
// EMB_BUCKETS, so each dtable element is owned by one thread and summed in order t = 0..T-1: the CPU's bits.
// ------------------------------------------------------------------------------------------------------------

#define EMB_BUCKETS 16

__global__ static void embedding_forward_kernel(float *out, const int32_t *ids, const float *table, int T, int C) {
    const size_t n = (size_t)T * C;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        const size_t t = i / (size_t)C, c = i % (size_t)C;
        out[i] = table[(size_t)ids[t] * C + c];
    }
}

__global__ static void embedding_backward_kernel(float *dtable, const float *dout, const int32_t *ids, int T, int C) {
    const int c = blockIdx.x * blockDim.x + threadIdx.x, b = blockIdx.y;
    if (c >= C) return;
    for (int t = 0; t < T; t++) {
        const int32_t id = ids[t];
        if (id % EMB_BUCKETS != b) continue;
        float *d = dtable + (size_t)id * C + c;
        *d = __fadd_rn(*d, dout[(size_t)t * C + c]);
    }
}

extern "C" void cuda_embedding_forward(float *out, const int32_t *ids, const float *table, int T, int C) {
    if (T <= 0 || C <= 0) return;
    embedding_forward_kernel<<<grid_for((size_t)T * C, 256), 256>>>(out, ids, table, T, C);
    NOTE_LAUNCH("embedding_forward");
}

extern "C" void cuda_embedding_backward(float *dtable, const float *dout, const int32_t *ids, int T, int C) {
    if (T <= 0 || C <= 0) return;
    dim3 grid((unsigned)((C + 255) / 256), EMB_BUCKETS);
    embedding_backward_kernel<<<grid, 256>>>(dtable, dout, ids, T, C);
    NOTE_LAUNCH("embedding_backward");
}

// ------------------------------------------------------------------------------------------------------------
// Softmax cross-entropy: one block per row, the vocabulary streamed in strided chunks (never staged), max and
// Σ exp in double reduced by a fixed tree (deterministic, batch-invariant; not the CPU's 16-lane order).
// ------------------------------------------------------------------------------------------------------------

#define XENT_THREADS 256

// dense.c's exp_neg (Cephes expf for x <= 0) with every step rounded as the CPU rounds it.
__device__ static float exp_neg(float x) {
    const float magic = 12582912.0f;
    float xc = x < -87.0f ? -87.0f : x > 0.0f ? 0.0f : x;
    float z = __fadd_rn(__fmul_rn(xc, 1.44269504088896341f), magic);
    float n = __fsub_rn(z, magic);
    uint32_t zb = __float_as_uint(z);
    float r = __fsub_rn(xc, __fmul_rn(n, 0.693359375f));
    r = __fsub_rn(r, __fmul_rn(n, -2.12194440e-4f));
    float p = 1.9875691500e-4f;
    p = __fadd_rn(__fmul_rn(p, r), 1.3981999507e-3f);
    p = __fadd_rn(__fmul_rn(p, r), 8.3334519073e-3f);
    p = __fadd_rn(__fmul_rn(p, r), 4.1665795894e-2f);
    p = __fadd_rn(__fmul_rn(p, r), 1.6666665459e-1f);
    p = __fadd_rn(__fmul_rn(p, r), 5.0000001201e-1f);
    p = __fadd_rn(__fadd_rn(__fmul_rn(p, __fmul_rn(r, r)), r), 1.0f);
    uint32_t sb = (zb - 0x4B400000u + 127u) << 23;
    float e = __fmul_rn(p, __uint_as_float(sb));
    e = x < -87.0f ? 0.0f : e;
    return x != x ? x : e;
}

// logits and dlogits may alias: every thread reads its elements before the barrier that precedes the writes, and
// the target logit is read by all threads up front.
__global__ static void xent_kernel(float *loss, double *rowloss, float *dlogits, const float *logits,
                                   const int32_t *target, const float *scale, int V) {
    __shared__ float red_f[XENT_THREADS / 32];
    __shared__ double red_d[XENT_THREADS / 32];
    __shared__ float lse_sh;
    const size_t t = blockIdx.x;
    const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32, nw = blockDim.x / 32;
    const float *lt = logits + t * V;
    float *dt = dlogits ? dlogits + t * V : NULL;
    const int tg = target[t];
    if (tg < 0 || tg >= V) { // ignored row (tg >= V is a caller bug the CPU asserts on: a NaN loss shows it)
        if (tid == 0) {
            rowloss[t] = tg < 0 ? 0.0 : (double)NAN;
            if (loss) loss[t] = tg < 0 ? 0.0f : NAN;
        }
        if (dt)
            for (int v = tid; v < V; v += blockDim.x) dt[v] = tg < 0 ? 0.0f : NAN;
        return;
    }
    const float ltg = lt[tg];
    float mx = lt[0];
    for (int v = tid; v < V; v += blockDim.x) mx = lt[v] > mx ? lt[v] : mx;
    for (int o = 16; o > 0; o /= 2) {
        float other = __shfl_xor_sync(0xffffffffu, mx, o);
        mx = other > mx ? other : mx;
    }
    if (lane == 0) red_f[warp] = mx;
    __syncthreads();
    mx = red_f[0];
    for (int i = 1; i < nw; i++) mx = red_f[i] > mx ? red_f[i] : mx;
    double s = 0.0;
    if (!isinf(mx))
        for (int v = tid; v < V; v += blockDim.x) s += (double)exp_neg(__fsub_rn(lt[v], mx));
    for (int o = 16; o > 0; o /= 2) s += __shfl_down_sync(0xffffffffu, s, o);
    if (lane == 0) red_d[warp] = s;
    __syncthreads(); // also: every read of lt is done before any write of dt below
    if (tid == 0) {
        double tot = 0.0;
        for (int i = 0; i < nw; i++) tot += red_d[i];
        float lse = isinf(mx) ? mx : (float)((double)mx + log(tot));
        lse_sh = lse;
        float l = __fsub_rn(lse, ltg);
        rowloss[t] = (double)l;
        if (loss) loss[t] = l;
    }
    __syncthreads();
    if (!dt) return;
    const float lse = lse_sh, sc = scale ? scale[t] : 1.0f;
    for (int v = tid; v < V; v += blockDim.x) dt[v] = __fmul_rn(sc, exp_neg(__fsub_rn(lt[v], lse)));
    __syncthreads();
    if (tid == 0) dt[tg] = __fmul_rn(sc, __fsub_rn(exp_neg(__fsub_rn(ltg, lse)), 1.0f));
}

extern "C" double cuda_xent_forward_backward(float *loss, float *dlogits, const float *logits,
                                             const int32_t *target, const float *scale, int T, int V) {
    if (T <= 0 || V <= 0) return 0.0;
    double *rowloss = (double *)dense_cuda_scratch(DENSE_CUDA_SCRATCH_SUM, (size_t)T * sizeof(double));
    if (!rowloss) return NAN;
    xent_kernel<<<(unsigned)T, XENT_THREADS>>>(loss, rowloss, dlogits, logits, target, scale, V);
    NOTE_LAUNCH("xent");
    double *h = (double *)malloc((size_t)T * sizeof(double));
    if (!h) {
        note_err(__FILE__, __LINE__, "xent", "out of host memory for the row losses");
        return NAN;
    }
    double total = NAN;
    cudaError_t st = cudaMemcpy(h, rowloss, (size_t)T * sizeof(double), cudaMemcpyDeviceToHost);
    if (st == cudaSuccess) {
        total = 0.0;
        for (int t = 0; t < T; t++) total += h[t]; // ignored rows hold 0, as in the CPU's sum
    } else {
        note_err(__FILE__, __LINE__, "cudaMemcpy(row losses)", cudaGetErrorString(st));
    }
    free(h);
    return total;
}

// ------------------------------------------------------------------------------------------------------------
// RoPE: thread per (token, pair); cos/sin as rope.c's on-the-fly branch (= its table, bit for bit): the fp32
// angle (float)p·ω_i, cos/sin in double rounded to float, times (float)attn_factor.
// ------------------------------------------------------------------------------------------------------------

typedef struct rope_args {
    float inv_freq[DENSE_CUDA_ROPE_MAX_PAIRS];
    float af;
    int half;
} rope_args;

__global__ static void rope_kernel(float *x, const int32_t *pos, int T, int n_heads, int row_stride, int head_stride,
                                   const rope_args a, int dir) {
    const size_t n = (size_t)T * a.half;
    for (size_t k = blockIdx.x * (size_t)blockDim.x + threadIdx.x; k < n; k += (size_t)gridDim.x * blockDim.x) {
        const int t = (int)(k / a.half), i = (int)(k % a.half);
        const float phi = __fmul_rn((float)pos[t], a.inv_freq[i]);
        double sd, cd;
        sincos((double)phi, &sd, &cd);
        const float c = __fmul_rn((float)cd, a.af);
        float s = __fmul_rn((float)sd, a.af);
        if (dir < 0) s = -s;
        float *xt = x + (size_t)t * row_stride + 2 * (size_t)i;
        for (int h = 0; h < n_heads; h++) {
            float *pr = xt + (size_t)h * head_stride;
            const float x0 = pr[0], x1 = pr[1];
            pr[0] = __fsub_rn(__fmul_rn(x0, c), __fmul_rn(x1, s));
            pr[1] = __fadd_rn(__fmul_rn(x0, s), __fmul_rn(x1, c));
        }
    }
}

static void rope_apply(float *x, const int32_t *pos, int T, int n_heads, int row_stride, int head_stride,
                       const rope_table *rt, int dir) {
    const int half = rt->rope_dim / 2;
    if (T <= 0 || half <= 0 || n_heads <= 0) return;
    if (half > DENSE_CUDA_ROPE_MAX_PAIRS) {
        char why[128];
        snprintf(why, sizeof why, "rope_dim %d exceeds the CUDA kernel's limit of %d", rt->rope_dim,
                 2 * DENSE_CUDA_ROPE_MAX_PAIRS);
        note_err(__FILE__, __LINE__, "rope", why);
        return;
    }
    rope_args a;
    memset(&a, 0, sizeof a);
    memcpy(a.inv_freq, rt->inv_freq, sizeof(float) * (size_t)half);
    a.af = (float)rt->attn_factor;
    a.half = half;
    rope_kernel<<<grid_for((size_t)T * half, 256), 256>>>(x, pos, T, n_heads, row_stride, head_stride, a, dir);
    NOTE_LAUNCH("rope");
}

extern "C" void cuda_rope_forward(float *x, const int32_t *pos, int T, int n_heads, int row_stride, int head_stride,
                                  const rope_table *rt) {
    rope_apply(x, pos, T, n_heads, row_stride, head_stride, rt, +1);
}

extern "C" void cuda_rope_backward(float *dx, const int32_t *pos, int T, int n_heads, int row_stride, int head_stride,
                                   const rope_table *rt) {
    rope_apply(dx, pos, T, n_heads, row_stride, head_stride, rt, -1);
}

// ------------------------------------------------------------------------------------------------------------
// Optimizer: AdamW update and the gradient's sum of squares
// ------------------------------------------------------------------------------------------------------------

typedef struct adamw_args {
    float decay, b1, omb1, b2, omb2, step_size, bc2_sqrt, eps;
} adamw_args;

__global__ static void adamw_kernel(float *data, const float *grad, float *m, float *v, size_t n, const adamw_args a) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        const float g = grad[i];
        float x = __fmul_rn(data[i], a.decay);
        float mi = __fadd_rn(__fmul_rn(m[i], a.b1), __fmul_rn(a.omb1, g));
        float vi = __fadd_rn(__fmul_rn(v[i], a.b2), __fmul_rn(__fmul_rn(a.omb2, g), g));
        float denom = __fadd_rn(__fdiv_rn(__fsqrt_rn(vi), a.bc2_sqrt), a.eps);
        x = __fadd_rn(x, __fdiv_rn(__fmul_rn(-a.step_size, mi), denom));
        m[i] = mi;
        v[i] = vi;
        data[i] = x;
    }
}

extern "C" int cuda_adamw_update(float *data, const float *grad, float *m, float *v, size_t n, double beta1,
                                 double beta2, double eps, double weight_decay, int64_t step, double lr, mr_err *e) {
    if (n == 0) return MR_OK;
    // The scalars exactly as adamw_step forms them (Python doubles cast to float).
    const double t = (double)step;
    const double bc1 = 1.0 - pow(beta1, t), bc2 = 1.0 - pow(beta2, t);
    adamw_args a;
    a.decay = (float)(1.0 - lr * weight_decay);
    a.step_size = (float)(lr / bc1);
    a.bc2_sqrt = (float)sqrt(bc2);
    a.b1 = (float)beta1;
    a.omb1 = (float)(1.0 - beta1);
    a.b2 = (float)beta2;
    a.omb2 = (float)(1.0 - beta2);
    a.eps = (float)eps;
    adamw_kernel<<<grid_for(n, 256), 256>>>(data, grad, m, v, n, a);
    cudaError_t st = cudaGetLastError();
    if (st != cudaSuccess) return err_set(e, MR_EDEVICE, "%s:%d: adamw: %s", __FILE__, __LINE__, cudaGetErrorString(st));
    return MR_OK;
}

#define SUMSQ_THREADS 256

__global__ static void sumsq_kernel(double *part, const float *g, size_t n) {
    __shared__ double red[SUMSQ_THREADS / 32];
    const size_t c0 = (size_t)blockIdx.x * DENSE_CUDA_SUMSQ_CHUNK;
    const size_t c1 = c0 + DENSE_CUDA_SUMSQ_CHUNK < n ? c0 + DENSE_CUDA_SUMSQ_CHUNK : n;
    double s = 0.0;
    for (size_t i = c0 + threadIdx.x; i < c1; i += blockDim.x) s += (double)g[i] * (double)g[i];
    for (int o = 16; o > 0; o /= 2) s += __shfl_down_sync(0xffffffffu, s, o);
    if (threadIdx.x % 32 == 0) red[threadIdx.x / 32] = s;
    __syncthreads();
    if (threadIdx.x == 0) {
        double tot = 0.0;
        for (int i = 0; i < (int)(blockDim.x / 32); i++) tot += red[i];
        part[blockIdx.x] = tot;
    }
}

extern "C" int cuda_grad_sumsq(double *sumsq, const float *g, size_t n, mr_err *e) {
    *sumsq = 0.0;
    if (n == 0) return MR_OK;
    const size_t nb = (n + DENSE_CUDA_SUMSQ_CHUNK - 1) / DENSE_CUDA_SUMSQ_CHUNK;
    if (nb > 0x7fffffffu) return err_set(e, MR_EINVAL, "grad_sumsq: %zu floats are too many for one call", n);
    double *part = (double *)dense_cuda_scratch(DENSE_CUDA_SCRATCH_SUM, nb * sizeof(double));
    if (!part) return dense_cuda_take_error(e);
    sumsq_kernel<<<(unsigned)nb, SUMSQ_THREADS>>>(part, g, n);
    cudaError_t st = cudaGetLastError();
    if (st != cudaSuccess) return err_set(e, MR_EDEVICE, "%s:%d: grad_sumsq: %s", __FILE__, __LINE__, cudaGetErrorString(st));
    double *h = (double *)malloc(nb * sizeof(double));
    if (!h) return err_set(e, MR_ENOMEM, "grad_sumsq: out of host memory for %zu block sums", nb);
    st = cudaMemcpy(h, part, nb * sizeof(double), cudaMemcpyDeviceToHost);
    if (st != cudaSuccess) {
        free(h);
        return err_set(e, MR_EDEVICE, "%s:%d: grad_sumsq: %s", __FILE__, __LINE__, cudaGetErrorString(st));
    }
    double tot = 0.0;
    for (size_t i = 0; i < nb; i++) tot += h[i];
    free(h);
    *sumsq = tot;
    return MR_OK;
}
