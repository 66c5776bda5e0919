/* dense.h: the dense CPU kernels every layer is built from: matmul, RMSNorm, SwiGLU, embedding, softmax
 * cross-entropy. Forward and backward side by side; backward ACCUMULATES into gradients (+=).
 * Linear weights are [out, in] row-major (PyTorch/safetensors convention, MODEL-SPEC §0): y = x · Wᵀ.
 *
 * Two matmul modes: MM_FAST uses OpenBLAS; MM_DET uses moerl's own kernel whose every output element is reduced
 * in one fixed order that does not depend on T (the number of rows) or on the thread count: batch-invariant, so a
 * row computed alone in decode equals the same row computed inside a training batch, bit for bit. */
#ifndef MOERL_KERNELS_CPU_DENSE_H
#define MOERL_KERNELS_CPU_DENSE_H

#include <stddef.h>
#include <stdint.h>

typedef enum { MM_FAST = 0, MM_DET = 1 } mm_mode;

/* y = beta * y + x · Wᵀ.  beta is 0 (y is overwritten, its old contents ignored) or 1.
 * MM_DET reduction order of y[t][o] (a function of `in` only): 16 lane accumulators, lane l takes
 * i = l, l+16, l+32, ... with fused multiply-adds (a zero-padded last step), then the lanes are summed as the tree
 * ((a[l]+a[l+8]) for l<8, then +[l+4], +[l+2], +[l+1]); finally y = y + s when beta = 1. Every ISA path (AVX-512,
 * AVX2+FMA, portable C with fmaf) computes exactly this, so the bits do not even depend on the CPU. */
void matmul_forward(float *y,       // (T, out)
                    const float *x, // (T, in)
                    const float *w, // (out, in)
                    int T, int in, int out, float beta, mm_mode mode);
/* dx += dy · W (skipped when dx is NULL); dw += dyᵀ · x (skipped when dw is NULL).
 * MM_DET: dx[t][i] = dx[t][i] + (Σ_o in order o = 0..out-1, fused), dw[o][i] = dw[o][i] + (Σ_t in order t = 0..T-1,
 * fused): deterministic whatever the thread count. */
void matmul_backward(float *dx,       // (T, in) or NULL
                     float *dw,       // (out, in) or NULL
                     const float *dy, // (T, out)
                     const float *x,  // (T, in)
                     const float *w,  // (out, in)
                     int T, int in, int out, mm_mode mode);
/* Independent products y = beta * y + x · Wᵀ, one per job (beta 0 or 1, as matmul_forward), in one parallel
 * region: the same bits as one matmul_forward per job. For decode, where each GEMM is too small to pay for its own
 * region (q_a with kv_a, an MoE layer's experts side by side). */
typedef struct mm_job {
    float *y;
    const float *x, *w;
    int T, in, out;
    float beta;
} mm_job;
void matmul_forward_batch(const mm_job *jobs, int n, mm_mode mode);

/* Plain triple-loop references (tests compare against them). */
void matmul_forward_naive(float *y, const float *x, const float *w, int T, int in, int out, float beta);
void matmul_backward_naive(float *dx, float *dw, const float *dy, const float *x, const float *w, int T, int in,
                           int out);

/* The MM_DET arithmetic on one tile, single-threaded, for kernels that build their own loops around it (the absorbed
 * attention, kernels/cpu/attention_absorbed.c). Same bits as the matmuls, on every ISA path:
 * dense_det_dot: y[r·ldy + c] = (beta ? y[r·ldy + c] : 0) + x_r · w_c for r < rows, c < cols, where x_r = x + r·in,
 *   w_c = w + c·in and the dot is matmul_forward's MM_DET order (16 lanes, then the tree; y + s when beta = 1).
 * dense_det_acc: c[m·ldc + n] += Σ_k a[m·sam + k·sak] · b[k·ldb + n] for m < M, n < N: k = 0..K-1 in one fused chain
 *   from +0 per element, then added (matmul_backward's MM_DET order). */
void dense_det_dot(float *y, int ldy, const float *x, const float *w, int in, int beta, int rows, int cols);
void dense_det_acc(float *c, size_t ldc, const float *a, size_t sam, size_t sak, const float *b, size_t ldb, int M,
                   int N, int K);

/* Which instruction-set path MM_DET uses. DENSE_ISA_AUTO picks the best the CPU supports; the others force a path
 * (for tests and benchmarks; a forced path the CPU lacks falls back to the best supported one below it). All paths
 * give identical bits. Not thread-safe: set it before running kernels. Returns the previous setting. */
typedef enum { DENSE_ISA_AUTO = 0, DENSE_ISA_GENERIC = 1, DENSE_ISA_AVX2 = 2, DENSE_ISA_AVX512 = 3 } dense_isa;
dense_isa dense_force_isa(dense_isa isa);
/* The path MM_DET would take now (never DENSE_ISA_AUTO). */
dense_isa dense_active_isa(void);

/* RMSNorm (MODEL-SPEC §4): out = g * (x / sqrt(mean(x²) + eps)). Each row is reduced in a fixed order (16 lanes, then
 * a fixed tree), independent of T and of the thread count; dg is summed over t in order t = 0..T-1. */
void rmsnorm_forward(float *out,     // (T, C)
                     float *rstd,    // (T) saved 1/sqrt(mean(x²)+eps), or NULL
                     const float *x, // (T, C)
                     const float *g, // (C)
                     int T, int C, float eps);
void rmsnorm_backward(float *dx,         // (T, C) or NULL
                      float *dg,         // (C) or NULL
                      const float *dout, // (T, C)
                      const float *x,    // (T, C)
                      const float *g,    // (C)
                      const float *rstd, // (T) from rmsnorm_forward
                      int T, int C);

/* SwiGLU: h = silu(gate) * up, silu(z) = z / (1 + exp(-z)). Elementwise (libm expf, never a vector exp). */
void swiglu_forward(float *h,          // (T, inter)
                    const float *gate, // (T, inter)
                    const float *up,   // (T, inter)
                    int T, int inter);
void swiglu_backward(float *dgate,      // (T, inter)
                     float *dup,        // (T, inter)
                     const float *dh,   // (T, inter)
                     const float *gate, // (T, inter)
                     const float *up,   // (T, inter)
                     int T, int inter);

/* Embedding: out[t] = table[ids[t]], ids in [0, V) (the caller validates them). Backward: dtable[ids[t]] += dout[t],
 * threads split the channels, so repeated ids add in order t = 0..T-1 without races. */
void embedding_forward(float *out,          // (T, C)
                       const int32_t *ids,  // (T)
                       const float *table,  // (V, C)
                       int T, int C);
void embedding_backward(float *dtable,      // (V, C)
                        const float *dout,  // (T, C)
                        const int32_t *ids, // (T)
                        int T, int C);

/* log Σ_v exp(x[v]), max-subtracted (finite for any finite x, e.g. 1e4), reduced in a fixed order that depends on
 * V only: max, then exp(x - max) summed in double over 16 lanes + a fixed tree. x (V), V >= 1. */
float logsumexp_row(const float *x, int V);

/* Softmax cross-entropy over V logits per row, for rows with target >= 0 (target < 0 = ignored row).
 * loss[t] = logsumexp_row(logits[t]) - logits[t][target[t]] (0 for ignored rows). When dlogits is non-NULL it
 * receives scale[t] * (softmax - onehot) (scale NULL = 1; ignored rows get 0); dlogits may alias logits.
 * Returns the sum of loss over non-ignored rows (in double, in order t = 0..T-1). No scratch memory. */
double xent_forward_backward(float *loss,           // (T) or NULL
                             float *dlogits,        // (T, V) or NULL
                             const float *logits,   // (T, V)
                             const int32_t *target, // (T)
                             const float *scale,    // (T) or NULL
                             int T, int V);

/* Log-probability of ids[t] under softmax(logits[t]): lp[t] = logits[t][ids[t]] - logsumexp_row(logits[t]),
 * bit for bit equal to -loss of xent_forward_backward, for any T (rows are independent). ids[t] < 0 gives 0. */
void logprob_forward(float *lp,            // (T)
                     const float *logits,  // (T, V)
                     const int32_t *ids,   // (T)
                     int T, int V);

/* ---- optimizer kernels (sft/optim.h; the backend table's adamw_update and grad_sumsq on the CPU) ---- */

/* One AdamW update of n contiguous floats at optimizer step `step` (>= 1): the scalars are formed in double as
 * torch forms them, the elementwise chain in fp32 (sft/optim.h). Elementwise: the same bits for any n split. */
void adamw_update_f32(float *data, const float *grad, float *m, float *v, size_t n, double beta1, double beta2,
                      double eps, double weight_decay, int64_t step, double lr);
/* Σ g[i]² in double over n floats in a fixed order (four interleaved running sums), and the chunked form: chunks
 * of OPTIM_SUMSQ_CHUNK floats summed in order (threads take whole chunks). */
#define OPTIM_SUMSQ_CHUNK ((size_t)1 << 15)
double sumsq_f64(const float *g, size_t n);
double sumsq_chunked(const float *g, size_t n);

#endif
