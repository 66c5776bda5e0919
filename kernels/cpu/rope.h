/* rope.h: rotary position embedding with YaRN frequencies for MLA's decoupled RoPE dims (MODEL-SPEC §5.4), and
 * the softmax scale with the YaRN mscale² factor (§5.5).
 *
 * The one idea: rotation pairs are INTERLEAVED, (x[2i], x[2i+1]) rotates by angle p·ω_i, on the raw layout of the
 * official checkpoints (the DeepSeek reference's complex multiply). HF transformers (rope_interleave = true)
 * first permutes each d_rope-vector to half-split order (HF[j] = ours[2j], HF[D/2+j] = ours[2j+1]) and then
 * applies rotate_half; q and k get the same permutation, so every score q_pe·k_pe equals HF's. Only when
 * comparing rotated q/k vectors (or HF's KV cache) with ours must that permutation be applied.
 *
 * Numerics follow HF's DeepseekV3 fp32 path: ω_i is built with HF's fp32 operation chain (pow, 1/x, ramp blend
 * all rounded to fp32 as torch does), the angle is the fp32 product (float)p · ω_i, and cos/sin of that fp32
 * angle are evaluated in double and rounded once to float, times HF's attention_scaling factor
 * (get_mscale(s, mscale) / get_mscale(s, mscale_all_dim); exactly 1 for V3 and V2-Lite). */
#ifndef MOERL_KERNELS_CPU_ROPE_H
#define MOERL_KERNELS_CPU_ROPE_H

#include <stdint.h>

#include "core/err.h"

/* The YaRN part of config.json's rope_scaling (MODEL-SPEC §1.1). enabled = 0 means plain RoPE (rope_scaling
 * null): base frequencies, no cos/sin factor, no m² in the softmax scale. */
typedef struct rope_yarn {
    int enabled;
    double factor;         /* s >= 1 */
    int original_max_pos;  /* L0 (original_max_position_embeddings) >= 1 */
    double beta_fast;      /* 32 */
    double beta_slow;      /* 1 */
    double mscale;         /* 0 = absent */
    double mscale_all_dim; /* 0 = absent */
} rope_yarn;

typedef struct rope_table {
    int rope_dim;      /* D, even */
    int max_pos;       /* positions [0, max_pos) are tabulated; larger ones are computed on the fly, identically */
    double attn_factor; /* HF attention_scaling: multiplies cos and sin */
    float *inv_freq;   /* (D/2) ω_i, fp32 as HF holds them */
    float *cos_sin;    /* (max_pos, D/2, 2): attn_factor·cos(φ), attn_factor·sin(φ) */
} rope_table;

/* Builds the frequencies and the cos/sin table for positions [0, max_pos) (max_pos may be 0: all on the fly).
 * yarn NULL = plain RoPE. Errors: MR_EINVAL (odd or non-positive rope_dim, theta <= 1, factor < 1,
 * original_max_pos < 1, beta_fast <= 0 or beta_slow <= 0, max_pos < 0), MR_ENOMEM. On error *rt is freed. */
int rope_yarn_init(rope_table *rt, int rope_dim, double theta, const rope_yarn *yarn, int max_pos, mr_err *e);
void rope_free(rope_table *rt); /* accepts a zeroed or half-built table */

/* §5.4 quantities, exposed for tests and for the model: the YaRN correction range (low, high) after floor/ceil
 * and clamping, and the cos/sin factor. */
void rope_yarn_correction_range(const rope_yarn *yarn, int rope_dim, double theta, double *low, double *high);
double rope_yarn_attn_factor(const rope_yarn *yarn);
/* §5.5: λ = d_qk^(-1/2) · m², m = 0.1·mscale_all_dim·ln(s) + 1 when YaRN is enabled, s > 1 and mscale_all_dim
 * is set (non-zero), else m = 1. V3: 0.1352337789. */
double rope_softmax_scale(int d_qk, const rope_yarn *yarn);

/* Rotates in place the D = rt->rope_dim dims of every (token, head): element d of head h of token t is
 * x[t·row_stride + h·head_stride + d]. pos (T) are the absolute positions (packing restarts them at 0 per
 * document; positions outside the table, even negative ones, are computed on the fly).
 * Example: q (T, H, d_qk) → x = q + d_nope, row_stride = H·d_qk, head_stride = d_qk; the shared k_pe in kv_a's
 * output (T, r_kv + D) → x = kv + r_kv, n_heads = 1, row_stride = r_kv + D. */
void rope_forward(float *x, const int32_t *pos, int T, int n_heads, int row_stride, int head_stride,
                  const rope_table *rt);
/* The transpose rotation (angle −φ), in place on the gradient: dx = Rᵀ dy. Same layout arguments. */
void rope_backward(float *dx, const int32_t *pos, int T, int n_heads, int row_stride, int head_stride,
                   const rope_table *rt);

#endif
