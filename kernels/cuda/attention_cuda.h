/* attention_cuda.h: the attention ops of the backend table on a CUDA device (kernels/cuda/attention_cuda.cu).
 *
 * Every pointer is DEVICE memory. Layouts, masking (causal, doc_start) and semantics are those of
 * kernels/cpu/attention.h: q, k (T, H, d_qk), v, out (T, H, d_v), lse (T, H) = log Σ exp(scale·q·k) per row,
 * doc_start (T) or NULL. Forward overwrites out and lse; backward ACCUMULATES into dq, dk, dv, any of which may be
 * NULL (not wanted).
 *
 * The one idea: FlashAttention-2 (Dao 2023) in fp32. The forward streams key/value tiles through shared memory
 * with an online softmax per query row; the backward recomputes p = exp(scale·q·k − lse) tile by tile, once in a
 * kernel that owns key rows (dk, dv summed over queries) and once in a kernel that owns query rows (dq summed over
 * keys), after a kernel forming D = rowsum(dout ∘ out). Every output element is owned by one lane and summed in an
 * order fixed by the shapes: deterministic, no atomics; nothing T×T ever reaches global memory. Not the CPU's
 * bits (its exp polynomial and 16-lane dot products are not replayed): parity is to fp32 rounding.
 *
 * Limits: d_qk, d_v <= ATTN_CUDA_MAX_DIM (a larger head dim is reported through dense_cuda_take_error and nothing
 * is written). Sliding-window attention (attention_swa.h) is not implemented on CUDA: its entries return
 * MR_EDEVICE saying so. */
#ifndef MOERL_KERNELS_CUDA_ATTENTION_CUDA_H
#define MOERL_KERNELS_CUDA_ATTENTION_CUDA_H

#include <stdint.h>

#include "core/err.h"

#ifdef __cplusplus
extern "C" {
#endif

#define ATTN_CUDA_MAX_DIM 256

void cuda_attention_forward(float *out, float *lse, const float *q, const float *k, const float *v,
                            const int32_t *doc_start, int T, int H, int d_qk, int d_v, float scale);
void cuda_attention_backward(float *dq, float *dk, float *dv, const float *dout, const float *out, const float *lse,
                             const float *q, const float *k, const float *v, const int32_t *doc_start, int T, int H,
                             int d_qk, int d_v, float scale);
int cuda_attention_swa_forward(float *out, float *lse, const float *q, const float *k, const float *v,
                               const int32_t *doc_start, int T, int H, int d_qk, int d_v, float scale, int window,
                               int ratio, mr_err *e);
int cuda_attention_swa_backward(float *dq, float *dk, float *dv, const float *dout, const float *out,
                                const float *lse, const float *q, const float *k, const float *v,
                                const int32_t *doc_start, int T, int H, int d_qk, int d_v, float scale, int window,
                                int ratio, mr_err *e);
/* Absorbed MLA attention over latent caches (kernels/cpu/attention.h, mla_decode_absorbed_lse; the table's
 * mla_absorbed): c_kv, k_rope and len are HOST arrays of B entries whose pointers are device memory; out, lse
 * (or NULL), q and w_kvb are device memory. One block per (head, sequence): q̃ = W_UK[h]ᵀ q_nope in shared memory,
 * one warp per key for the scores (kept in device scratch, B·H·max(len) floats), softmax, then z = Σ_u p_u c_kv[u]
 * one lane per latent column and out = W_UV[h] z one lane per output. Fixed orders, no atomics: deterministic and
 * batch-invariant; not the CPU's bits (parity to fp32 rounding). Synchronous in its argument copies (the host
 * arrays may be reused on return). MR_EINVAL for a len < 1 or bad sizes, MR_EDEVICE for a CUDA failure. */
int cuda_mla_absorbed(float *out, float *lse, const float *q, const float *const *c_kv, const float *const *k_rope,
                      const int32_t *len, const float *w_kvb, int B, int H, int d_nope, int d_rope, int d_v, int r_kv,
                      float scale, mr_err *e);
/* The table's kv_append and mla_rows (kernels/backend.h): rows is DEVICE memory (T / B kv_row), so the launches
 * do not depend on the step and can be captured into a CUDA graph. mla_rows forms the argument arrays of
 * cuda_mla_absorbed on the device and runs its kernel with a score scratch of B·H·max_cap floats (a row whose
 * slot is outside its cache is caught on the host before: model.c decode_positions). */
typedef struct kv_row kv_row;
void cuda_kv_append(const kv_row *rows, int layer, const float *cn, const float *kpe, int T, int r_kv, int d_rope);
int cuda_mla_rows(float *out, float *lse, const float *q, const kv_row *rows, int layer, const float *w_kvb, int B,
                  int H, int d_nope, int d_rope, int d_v, int r_kv, float scale, int max_cap, mr_err *e);
/* Frees the kernels' scratch (D of the backward); it is allocated again on demand. */
void attention_cuda_release(void);

#ifdef __cplusplus
}
#endif

#endif
