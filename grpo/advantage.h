/* advantage.h: GRPO's critic-free advantages (GRPO.md §1, §2): the group mean is the baseline, the divisor is the
 * group's std, the whole step's std, or nothing (Dr. GRPO); and DAPO's dynamic-sampling test of a group.
 *
 * The one idea: only samples whose reward set returned a score take part. A sample with an unscorable, error or
 * timeout reward leaves its group's baseline and std and gets advantage 0 (it is counted, never read as a reward
 * of 0); a truncated sample under overlong masking keeps its reward in the baseline but is masked from the loss.
 * Std is the sample std (Bessel's n - 1, as torch.std in TRL and verl); a group with fewer than 2 scored samples
 * has std 0. A = (R - mean) / (std + eps), so a group of equal rewards gets A = 0 exactly.
 *
 * Owns nothing: every array is the caller's. */
#ifndef MOERL_GRPO_ADVANTAGE_H
#define MOERL_GRPO_ADVANTAGE_H

#include <stdint.h>

typedef enum { ADV_SCALE_GROUP = 0, ADV_SCALE_BATCH = 1, ADV_SCALE_NONE = 2 } adv_scale; /* grpo.scale_rewards order */

#define ADV_EPS 1e-6 /* verl's epsilon in (std + eps) */

typedef struct adv_opts {
    adv_scale scale;
    double eps;          /* added to the std divisor (ADV_EPS) */
    int mask_truncated;  /* grpo.overlong.mode = mask: truncated samples get no loss (in_loss = 0) */
} adv_opts;

typedef struct adv_stats {
    double mean, std, min, max;   /* of the advantages of the samples in the loss (adv/...) */
    double reward_mean, reward_std; /* of the scored rewards (reward/mean, reward/std; population std) */
    int n_scored, n_unscored, n_masked, n_in_loss;
    int zero_std_groups;          /* groups without signal (grpo_group_has_signal == 0) */
} adv_stats;

/* Advantages of n_groups groups of G samples laid out group after group (sample g of group q at q * G + g).
 * reward (n) is read where scored[i] != 0; truncated (n) may be NULL. Writes adv (n) and in_loss (n: 1 when the
 * sample's tokens carry loss, 0 when masked) and, when st is non-NULL, the step's statistics. */
void grpo_advantages(const double *reward, const uint8_t *scored, const uint8_t *truncated, int n_groups, int G,
                     const adv_opts *o, float *adv, uint8_t *in_loss, adv_stats *st);

/* 1 when at least two scored samples of the group (G of them) have different rewards: the group carries a
 * learning signal. DAPO's dynamic sampling keeps only such groups. */
int grpo_group_has_signal(const double *reward, const uint8_t *scored, int G);

#endif
