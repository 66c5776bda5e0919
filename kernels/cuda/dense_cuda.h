/* dense_cuda.h: the dense operations of the backend table on a CUDA device (kernels/cuda/dense_cuda.cu), plus the
 * optimizer kernels (AdamW update, gradient sum of squares) that the table does not carry yet.
 *
 * Every pointer is DEVICE memory (from backend->alloc) unless it says host. Shapes, argument order and semantics
 * are those of kernels/cpu/dense.h and rope.h: backward ACCUMULATES (+=), forward overwrites.
 *
 * The one idea: each output element is computed by one thread (or one fixed group of lanes) in an order that is a
 * function of the reduction length only, never of T, the grid or timing, and no kernel uses floating-point
 * atomics. Results are therefore deterministic run to run and batch-invariant. Where the CPU order is cheap to
 * replay (MM_DET matmul, RMSNorm, the AdamW update, embedding backward) the kernels replay it exactly, with
 * rounding intrinsics where nvcc would otherwise contract a*b+c into an fma, so they give the CPU's bits.
 *
 * Errors: the table's ops return void. The first failure (a launch error, a cuBLAS status, an unsupported shape)
 * is kept and reported by dense_cuda_take_error (the CUDA backend's sync calls it). Not thread-safe: one host
 * thread drives the backend (cuBLAS handle and scratch are process-wide). */
#ifndef MOERL_KERNELS_CUDA_DENSE_CUDA_H
#define MOERL_KERNELS_CUDA_DENSE_CUDA_H

#include <stddef.h>
#include <stdint.h>

#include "core/err.h"
#include "kernels/cpu/dense.h"
#include "kernels/cpu/rope.h"

#ifdef __cplusplus
extern "C" {
#endif

/* MM_FAST GEMM precision. 0 (default): fp32 cublasSgemm (no TF32). 1: x, w and dy are rounded to bf16 (round to
 * nearest even) into scratch and multiplied by cublasGemmEx with bf16 inputs and fp32 accumulation and output
 * (CUBLAS_COMPUTE_32F); y/dx/dw stay fp32 and beta still accumulates in fp32. MM_DET ignores it (always the exact
 * fp32 kernel). Returns the previous setting. */
int dense_cuda_set_bf16(int on);

/* The first error since the last call (MR_OK if none), copied into e and cleared. */
int dense_cuda_take_error(mr_err *e);
/* Records a failure (file:line: what: why) for dense_cuda_take_error unless one is already kept: the other
 * kernels/cuda files report the failures of their void ops through it too. */
void dense_cuda_note_error(const char *file, int line, const char *what, const char *why);
/* Frees the cuBLAS handle and every scratch slot (they are created again on demand). */
void dense_cuda_release(void);

/* Device scratch for the CUDA ops, one growing buffer per slot (each op file owns its slots); NULL when cudaMalloc
 * fails (the error is noted for the next sync). A buffer that grows is freed first, which synchronizes. */
enum {
    DENSE_CUDA_SCRATCH_A, DENSE_CUDA_SCRATCH_B, DENSE_CUDA_SCRATCH_C, DENSE_CUDA_SCRATCH_SUM, /* dense_cuda.cu */
    DENSE_CUDA_SCRATCH_MOE_DISPATCH, DENSE_CUDA_SCRATCH_MOE_FLAG, DENSE_CUDA_SCRATCH_MOE_BAL_INT,
    DENSE_CUDA_SCRATCH_MOE_BAL_ROW, /* moe_cuda.cu */
    DENSE_CUDA_SCRATCH_MLA_ARGS, DENSE_CUDA_SCRATCH_MLA_SCORES, /* attention_cuda.cu (absorbed decode) */
    DENSE_CUDA_SCRATCH_N
};
void *dense_cuda_scratch(int slot, size_t nbytes);
/* Grows by one whenever a scratch buffer moves (or all are released): a CUDA graph captured at another generation
 * points at freed memory and must be captured again. */
unsigned dense_cuda_scratch_generation(void);

void cuda_matmul_forward(float *y, const float *x, const float *w, int T, int in, int out, float beta,
                         mm_mode mode);
void cuda_matmul_backward(float *dx, float *dw, const float *dy, const float *x, const float *w, int T, int in,
                          int out, mm_mode mode);
void cuda_rmsnorm_forward(float *out, float *rstd, const float *x, const float *g, int T, int C, float eps);
void cuda_rmsnorm_backward(float *dx, float *dg, const float *dout, const float *x, const float *g,
                           const float *rstd, int T, int C);
void cuda_swiglu_forward(float *h, const float *gate, const float *up, int T, int I);
void cuda_swiglu_backward(float *dgate, float *dup, const float *dh, const float *gate, const float *up, int T,
                          int I);
void cuda_embedding_forward(float *out, const int32_t *ids, const float *table, int T, int C);
void cuda_embedding_backward(float *dtable, const float *dout, const int32_t *ids, int T, int C);
/* Returns the sum of the losses (double, rows in order t = 0..T-1, summed on the host): this synchronizes. */
double cuda_xent_forward_backward(float *loss, float *dlogits, const float *logits, const int32_t *target,
                                  const float *scale, int T, int V);
/* rt is the HOST table (rope_yarn_init); only rope_dim, inv_freq and attn_factor are read, and cos/sin are
 * computed on the device exactly as rope.c's on-the-fly branch does (fp32 angle, cos/sin in double, rounded).
 * rope_dim must be <= 2 * DENSE_CUDA_ROPE_MAX_PAIRS. */
#define DENSE_CUDA_ROPE_MAX_PAIRS 256
void cuda_rope_forward(float *x, const int32_t *pos, int T, int n_heads, int row_stride, int head_stride,
                       const rope_table *rt);
void cuda_rope_backward(float *dx, const int32_t *pos, int T, int n_heads, int row_stride, int head_stride,
                        const rope_table *rt);

/* One AdamW update (sft/optim.h's formula, torch's single-tensor path) of n contiguous trainable floats, for
 * optimizer step `step` (>= 1, already incremented) and learning rate lr; weight_decay is the entry's (0 for
 * PARAM_NO_DECAY). The scalars are formed in double on the host exactly as adamw_step forms them, and the
 * elementwise chain is replayed without contraction: the same bits as adamw_step. */
int cuda_adamw_update(float *data, const float *grad, float *m, float *v, size_t n, double beta1, double beta2,
                      double eps, double weight_decay, int64_t step, double lr, mr_err *e);
/* *sumsq (host) = Σ g[i]² in double over n contiguous floats: blocks of DENSE_CUDA_SUMSQ_CHUNK floats are reduced
 * on the device in a fixed tree, and the block sums added on the host in order. Deterministic (not the CPU's
 * bits: grad_sumsq's chunk order differs). Add entries in table order for the global norm. */
#define DENSE_CUDA_SUMSQ_CHUNK 32768
int cuda_grad_sumsq(double *sumsq, const float *g, size_t n, mr_err *e);

#ifdef __cplusplus
}
#endif

#ifdef __CUDACC__
/* Notes a failure for the next sync (the table's void ops cannot return one). */
#define NOTE(what, why) dense_cuda_note_error(__FILE__, __LINE__, what, why)
#define NOTE_LAUNCH(name)                                                                                      \
    do {                                                                                                       \
        cudaError_t st_ = cudaGetLastError();                                                                  \
        if (st_ != cudaSuccess) NOTE("launch of " name, cudaGetErrorString(st_));                              \
    } while (0)
#endif

#endif
