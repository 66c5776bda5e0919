/* loss.h: the GRPO policy loss of one optimizer step, per token, and its gradient with respect to the
 * log-probabilities (GRPO.md §1, §2), in the form model_policy_grad takes.
 *
 * For token t of sequence i, with lp = log pi_theta, lp_old = log pi_old (the rollout policy, or the trainer's
 * own recomputation when truncated importance sampling is on), A = the sequence's advantage:
 *   ratio       r = exp(lp - lp_old)                        (ratio_level token)
 *               r = exp(mean_t (lp - lp_old)) for every t   (ratio_level sequence, GSPO; as verl, each token's
 *                                                            gradient is r * dlp_t, the exact gradient of the
 *                                                            aggregated loss since weights are equal in a sequence)
 *   policy      pg = max(-r A, -clip(r, 1 - eps_low, 1 + eps_high) A)   (PPO clip; DAPO clip-higher)
 *               pg = min(pg, -c A) when A < 0 and dual_clip c > 1        (dual clip, Ye et al. 2020 / verl)
 *   TIS         w = min(exp(lp_old - lp_behav), C) per token, or min(exp(sum_t (lp_old - lp_behav)), C) per
 *               sequence, a constant factor on pg (lp_behav = the sampler's log-prob); 1 when off
 *   KL to ref   d = lp_ref - lp;  k1: -d   k2: d^2 / 2   k3: exp(d) - d - 1   (Schulman's estimators; GRPO eq. 4)
 *   token loss  l = w pg + beta KL
 * and the step's loss L = sum over the step's tokens of agg_t * l with
 *   token_mean               agg = 1 / (completion tokens in the step)            (DAPO)
 *   seq_mean_token_mean      agg = 1 / (sequences in the step * |o_i|)             (GRPO paper)
 *   seq_mean_token_sum_norm  agg = 1 / (sequences in the step * max_completion_tokens)   (Dr. GRPO)
 * "The step" is one optimizer step: every micro-batch of the mini-batch, counted before the micro-batches run
 * (grpo_norm), so micro-batching never changes the gradient. Masked sequences are not counted.
 *
 * coef[t] = dL / d(-lp_t) = -agg_t (w dpg/dlp + beta dKL/dlp): model_policy_grad's input (it backpropagates
 * sum_t coef[t] * CE_t with CE_t = -lp_t). The entropy bonus -entropy_coef * H_t acts on the logits, not on
 * lp alone: grpo_entropy_grad_row gives its gradient.
 *
 * Owns nothing. */
#ifndef MOERL_GRPO_LOSS_H
#define MOERL_GRPO_LOSS_H

#include <stdint.h>

/* The recipe's enum orders (core/recipe_schema.c). */
typedef enum { AGG_SEQ_MEAN_TOKEN_MEAN = 0, AGG_TOKEN_MEAN = 1, AGG_SEQ_MEAN_TOKEN_SUM_NORM = 2 } grpo_agg;
typedef enum { KL_K1 = 0, KL_K2 = 1, KL_K3 = 2 } grpo_kl;
typedef enum { TIS_OFF = 0, TIS_TOKEN = 1, TIS_SEQUENCE = 2 } grpo_tis;

typedef struct grpo_loss_cfg {
    double eps_low, eps_high;
    double dual_clip;        /* c > 1, or 0 = off */
    int seq_ratio;           /* ratio_level sequence (GSPO) */
    grpo_agg agg;
    double beta;             /* 0 = no KL term (lp_ref unused) */
    grpo_kl kl;
    grpo_tis tis;
    double tis_cap;          /* C >= 1 */
    int max_completion_tokens; /* seq_mean_token_sum_norm's constant */
} grpo_loss_cfg;

/* The optimizer step's denominators: sequences and completion tokens that carry loss, over all micro-batches. */
typedef struct grpo_norm {
    int64_t n_seqs, n_tokens;
} grpo_norm;

/* One sequence's completion tokens. */
typedef struct grpo_seq {
    const float *lp;       /* (n) log-probs under the policy being trained */
    const float *lp_old;   /* (n) under the old policy (the ratio's denominator) */
    const float *lp_ref;   /* (n) under the reference, or NULL (beta = 0) */
    const float *lp_behav; /* (n) the sampler's log-probs (TIS), or NULL (TIS off) */
    int n;
    float adv;
} grpo_seq;

/* The step's running sums (zero it at the start of a step). */
typedef struct grpo_loss_acc {
    double loss;           /* sum of agg_t * l_t: after the step, L */
    double pg, kl;         /* sums over tokens of pg and KL (unweighted) */
    double tis_w;          /* sum over tokens of the TIS weight */
    int64_t tokens, clip_low, clip_high, dual_clipped;
} grpo_loss_acc;

/* Adds sequence s to acc and writes coef (n). Returns the sequence's contribution to L. */
double grpo_seq_loss(const grpo_loss_cfg *c, const grpo_norm *nm, const grpo_seq *s, float *coef,
                     grpo_loss_acc *acc);

/* Entropy of softmax(logits) (nats). */
double grpo_entropy_row(const float *logits, int V);
/* g[j] += scale * dH/dz_j = scale * (-p_j (log p_j + H)): with scale = -entropy_coef * agg_t it is the gradient
 * of the bonus term -entropy_coef * agg_t * H_t. */
void grpo_entropy_grad_row(float *g, const float *logits, int V, double scale);

/* "seq_mean_token_mean" ... as in the recipe. */
const char *grpo_agg_name(grpo_agg a);

#endif
