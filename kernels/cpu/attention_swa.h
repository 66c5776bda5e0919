/* attention_swa.h: optional sliding-window attention with average-pooled K/V compression (the "Cost of Scale"
 * option of issue 3, off by default; meant for small models). Same layouts and conventions as attention.h.
 *
 * Definition (the one moerl uses). Query row t lies in its document [s, t], s = doc_start[t] (0 without
 * doc_start). With window W >= 1 and compression ratio r >= 1, let w0 = max(s, t - W + 1). Row t attends to
 *   (a) the exact keys/values j in [w0, t] (the window), and
 *   (b) the COMPLETE blocks of older tokens: the document is cut into consecutive blocks of r tokens aligned to
 *       its start, block b = [s + b·r, s + (b+1)·r − 1]; row t uses blocks b = 0 .. nb−1 with
 *       nb = floor((w0 − s) / r), i.e. exactly the blocks that END before w0. Each contributes ONE key, the
 *       mean of its r keys, and ONE value, the mean of its r values (per head, average pooling).
 *       A partial block straddling w0 is dropped: its in-window part is seen exactly, its older part
 *       [s + nb·r, w0 − 1] (at most r − 1 tokens) is not seen at all. Dropping (rather than pooling the partial
 *       part) keeps every pooled key a fixed function of r consecutive tokens, shared by all rows that use it.
 *       Causal: every token seen by row t is <= t, and pooled blocks end before w0 <= t.
 * Scores: scale · q·key for window and pooled keys alike; ONE softmax over [pooled blocks ; window keys].
 *   out_t = Σ_b p_b · vbar_b + Σ_{j in window} p_j · v_j, lse saved as in attention_forward.
 * Special cases: W >= t − s + 1 (e.g. W >= T) gives nb = 0 and the window [s, t]: exact causal attention for any
 * r. r = 1 makes every older token its own block with mean = itself, so blocks + window = [s, t]: exact causal
 * attention for any W. r > T: no block is ever complete, pure sliding-window attention.
 *
 * Numerics: each row walks its key list [pooled blocks ascending ; window ascending] in chunks of ATTN_BLOCK from
 * the list's start with the same online softmax and fixed-order dot products as attention.c, so a row's bits
 * depend only on its own prefix (batch invariant, packed == unpacked documents, thread-count independent), and
 * when the list is [s, t] the result is attention_forward's. Pooled means are sums in ascending token order
 * divided by r. Cost per head: O(T·(W + T/r)) scores forward and backward, never T×T; scratch: the pooled keys
 * and values (about T/r + number of documents rows) plus 2 int32 per token (and pooled gradients in backward).
 *
 * doc_start, when given, must describe contiguous documents: doc_start[0] = 0 and for t > 0 either
 * doc_start[t] = t (a new document) or doc_start[t] = doc_start[t − 1] (block alignment needs it). */
#ifndef MOERL_KERNELS_CPU_ATTENTION_SWA_H
#define MOERL_KERNELS_CPU_ATTENTION_SWA_H

#include <stdint.h>

#include "core/err.h"

/* out = softmax over [pooled blocks ; window] as defined above, per head; lse saved for the backward.
 * Returns 0, MR_EINVAL (window < 1, ratio < 1, a bad size or doc_start; message names the value) or MR_ENOMEM
 * (scratch). */
int attention_swa_forward(float *out,               // (T, H, d_v)
                          float *lse,               // (T, H)
                          const float *q,           // (T, H, d_qk)
                          const float *k,           // (T, H, d_qk)
                          const float *v,           // (T, H, d_v)
                          const int32_t *doc_start, // (T) or NULL
                          int T, int H, int d_qk, int d_v, float scale, int window, int ratio, mr_err *e);

/* dq, dk, dv += gradients of the forward above, given dout and the forward's out and lse. A pooled key's (value's)
 * gradient flows equally, 1/r each, to the r keys (values) of its block. dq is reduced per query row (pooled keys,
 * then window keys, ascending); dk, dv per key row: window queries ascending, then the block's pooled gradient
 * (itself reduced over its queries ascending). No float atomics. Any of dq, dk, dv may be NULL (not wanted).
 * Returns 0, MR_EINVAL or MR_ENOMEM as the forward (on error no gradient has been touched). */
int attention_swa_backward(float *dq,                // (T, H, d_qk)
                           float *dk,                // (T, H, d_qk)
                           float *dv,                // (T, H, d_v)
                           const float *dout,        // (T, H, d_v)
                           const float *out,         // (T, H, d_v)   saved by the forward
                           const float *lse,         // (T, H)        saved by the forward
                           const float *q,           // (T, H, d_qk)
                           const float *k,           // (T, H, d_qk)
                           const float *v,           // (T, H, d_v)
                           const int32_t *doc_start, // (T) or NULL
                           int T, int H, int d_qk, int d_v, float scale, int window, int ratio, mr_err *e);

#endif
