/* attention.h: the attention core of MLA (MODEL-SPEC §5.5, §5.6): causal softmax attention over per-head q, k, v
 * in the training ("naive", non-absorbed) form with its backward, and the absorbed latent-cache decode form.
 *
 * The one idea: every query row is reduced in one fixed order that depends only on the row's own causal window
 * [lo, t] (keys walked in blocks of ATTN_BLOCK starting at lo, online softmax, fixed-order dot products). So a
 * row's output is bit-identical whether it is computed inside a batch of T tokens, as the last row of its own
 * prefix, inside a packed batch or in its document alone, with any number of threads; nothing T×T is stored.
 *
 * Layouts (all row-major, contiguous):
 *   q, k (T, H, d_qk)   per head [nope ; rope] as in §5.3 (k's rope part is the shared k_pe copied per head)
 *   v, out (T, H, d_v)
 *   lse (T, H)          log-sum-exp of the scaled scores of each row, saved for the backward
 *   doc_start (T)       optional: token t attends to keys j with doc_start[t] <= j <= t (packed documents);
 *                       NULL = plain causal (doc_start[t] = 0). Needs 0 <= doc_start[t] <= t.
 *
 * Numerics (the same on every CPU and instruction-set path): scores, dout·v and every accumulation use fused
 * multiply-adds in a fixed sequential order (a score is Σ_c q_c k_c over c ascending; out, dq over keys ascending;
 * dk, dv over queries ascending in chunks of ATTN_BLOCK), and exp is moerl's own polynomial (attention.c), so the
 * AVX-512, AVX2+FMA and portable paths give identical bits. */
#ifndef MOERL_KERNELS_CPU_ATTENTION_H
#define MOERL_KERNELS_CPU_ATTENTION_H

#include <stdint.h>

#include "core/err.h"

#define ATTN_BLOCK 64 /* keys per online-softmax block; part of the numerics (changing it changes low bits) */

/* out = softmax(scale · q kᵀ + causal/doc mask) v, per head; lse saved. */
void attention_forward(float *out,               // (T, H, d_v)
                       float *lse,               // (T, H)
                       const float *q,           // (T, H, d_qk)
                       const float *k,           // (T, H, d_qk)
                       const float *v,           // (T, H, d_v)
                       const int32_t *doc_start, // (T) or NULL
                       int T, int H, int d_qk, int d_v, float scale);

/* dq, dk, dv += gradients of the forward above, given dout and the forward's out and lse. Recomputes the
 * probabilities block by block; dq is reduced per query row (over keys ascending), dk and dv per key row (over
 * queries ascending): deterministic, no float atomics. Any of dq, dk, dv may be NULL (not wanted). */
void attention_backward(float *dq,                // (T, H, d_qk)
                        float *dk,                // (T, H, d_qk)
                        float *dv,                // (T, H, d_v)
                        const float *dout,        // (T, H, d_v)
                        const float *out,         // (T, H, d_v)   saved by the forward
                        const float *lse,         // (T, H)        saved by the forward
                        const float *q,           // (T, H, d_qk)
                        const float *k,           // (T, H, d_qk)
                        const float *v,           // (T, H, d_v)
                        const int32_t *doc_start, // (T) or NULL
                        int T, int H, int d_qk, int d_v, float scale);

/* Which instruction-set path attention_forward/backward take. ATTN_ISA_AUTO picks the best the CPU supports; the
 * others force a path (tests and benchmarks; a forced path the CPU lacks falls back to the best one below it).
 * Every path gives identical bits, so this only changes speed. Not thread-safe: set it before running kernels.
 * Returns the previous setting. */
typedef enum { ATTN_ISA_AUTO = 0, ATTN_ISA_GENERIC = 1, ATTN_ISA_AVX2 = 2, ATTN_ISA_AVX512 = 3 } attn_isa;
attn_isa attention_force_isa(attn_isa isa);
/* The path attention_forward/backward would take now (never ATTN_ISA_AUTO). */
attn_isa attention_active_isa(void);

/* Absorbed decode (§5.6) for one new token per sequence b = 0..B-1, over its latent cache of len[b] >= 1 entries
 * (the new token's own entry included, at index len[b]-1):
 *   q̃[h] = W_UK[h]ᵀ q_nope[h];  score[u] = scale·(q̃[h]·c_kv[u] + q_pe[h]·k_rope[u]);  P = softmax(score);
 *   z[h] = Σ_u P[u] c_kv[u];  out[h] = W_UV[h] z[h].
 * q is the query after q_b_proj and RoPE (q_pe rotated at the new token's position). c_kv[b] points to the
 * normalized latents (len[b], r_kv), k_rope[b] to the rotated shared RoPE keys (len[b], d_rope): each sequence's
 * cache may live anywhere. w_kvb is kv_b_proj.weight [H·(d_nope + d_v), r_kv] (§5.1 head-major rows: W_UK[h]
 * then W_UV[h]). Each (b, h) is computed by one thread in a fixed order: independent of B and of the thread
 * count. Returns 0, MR_EINVAL (a len[b] < 1 or a bad size), MR_ENOMEM (scratch). */
int mla_decode_absorbed(float *out,                 // (B, H, d_v)
                        const float *q,             // (B, H, d_nope + d_rope)
                        const float *const *c_kv,   // B pointers, each (len[b], r_kv)
                        const float *const *k_rope, // B pointers, each (len[b], d_rope)
                        const int32_t *len,         // (B)
                        const float *w_kvb,         // (H·(d_nope + d_v), r_kv)
                        int B, int H, int d_nope, int d_rope, int d_v, int r_kv, float scale, mr_err *e);

/* The same, also writing lse[b·H + h] = log Σ_u exp(score[u]) (the scaled scores, as attention_forward's lse) when
 * lse is non-NULL; out's bits are those of mla_decode_absorbed. The model's MM_DET training forward computes its
 * attention outputs with this (one "sequence" per row t: its document's latents up to t), so training and decode
 * run the same arithmetic, and attention_backward (non-absorbed) differentiates the same function from out + lse. */
int mla_decode_absorbed_lse(float *out,                 // (B, H, d_v)
                            float *lse,                 // (B, H) or NULL
                            const float *q,             // (B, H, d_nope + d_rope)
                            const float *const *c_kv,   // B pointers, each (len[b], r_kv)
                            const float *const *k_rope, // B pointers, each (len[b], d_rope)
                            const int32_t *len,         // (B)
                            const float *w_kvb,         // (H·(d_nope + d_v), r_kv)
                            int B, int H, int d_nope, int d_rope, int d_v, int r_kv, float scale, mr_err *e);

#endif
