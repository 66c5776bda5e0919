/* trainer.h: the GRPO job (`moerl grpo`): rollouts, rewards, advantages, the clipped policy loss over mini-batches
 * of packed micro-batches, AdamW, the MoE bias update, metrics (GRPO.md §4), samples, checkpoints, exact resume.
 *
 * The one idea: a step is a pure function of (seed, step, prompt cursor, weights, optimizer state). The prompt
 * order is a Philox permutation per epoch (sft_epoch_order with its own stream), each rollout round is seeded by
 * (seed, step, round), and dynamic sampling draws exactly the missing number of prompts per extra round, so no
 * generated group outlives its step: the checkpoint (weights, optimizer, cursor, counters) is the whole state and
 * --resume continues bit-exactly on the CPU.
 *
 * Units (GRPO.md §5): a step takes prompts_per_step prompts x num_generations samples; each policy iteration (mu)
 * splits them into mini_batches_per_step optimizer updates; each update runs packed micro-batches of at most
 * micro_batch_tokens tokens; loss denominators count the whole update. */
#ifndef MOERL_GRPO_TRAINER_H
#define MOERL_GRPO_TRAINER_H

#include <stddef.h>
#include <stdint.h>

#include "core/err.h"
#include "core/recipe.h"
#include "grpo/advantage.h"
#include "grpo/loss.h"
#include "sft/optim.h"
#include "sft/schedule.h"

typedef struct grpo_cfg {
    uint64_t seed;
    int64_t steps;
    int P, G, M, mu;            /* prompts per step, samples per prompt, mini-batches per step, iterations */
    int micro_batch_tokens;
    int max_new_tokens;
    float temperature, top_p, min_p;
    int top_k;
    adv_opts adv;
    int overlong_mode;          /* 0 none, 1 mask, 2 soft_penalty (a reward plugin: reward_set adds it) */
    grpo_loss_cfg loss;
    double entropy_coef;
    int routing_replay;
    int dynamic_sampling, max_extra_rounds;
    adamw_cfg adam;
    sched_cfg sched;
    double grad_clip;
    float bias_gamma;
    int64_t checkpoint_every, eval_every;
    int keep_checkpoints;
    int max_bad_steps;
    int eval_rows;              /* held-out prompts scored at each eval */
} grpo_cfg;

/* Reads and checks the GRPO fields of a resolved recipe, rejecting inconsistent combinations (MR_EINVAL naming
 * the keys) before any work. */
int grpo_cfg_from_recipe(grpo_cfg *c, const recipe *r, mr_err *e);

/* The derived quantities as text lines ("prompts/step 16, samples/step 128, ..."). */
void grpo_cfg_describe(const grpo_cfg *c, char *buf, size_t cap);

/* The whole job. resume continues from the newest checkpoint under run.out_dir. stop_after > 0 returns after that
 * many steps of this invocation (testing kill-and-resume). */
int grpo_run(const recipe *r, int resume, int64_t stop_after, mr_err *e);

/* ---- Testing: a probe of the policy forwards (routing replay) ----
 * With grpo.routing_replay the trainer records, once per step and before any update, the experts of every
 * in-loss sample's rows: the prompt rows from a forward at the step's starting weights (the rollout's weights, so
 * they are the prefill's routing), the completion rows from the rollout (rollout_seq.experts). Every policy forward
 * of the step then replays that table, whatever the updates do to the routers (R3). */
typedef struct model model;
typedef struct grpo_probe_seq {
    int row0;                /* the sample's first row (its prompt's first token) in the micro-batch */
    int prompt_len, n;       /* prompt and completion tokens */
    const int32_t *rollout;  /* (n, n_moe, K) the rollout's experts (rollout_seq.experts), or NULL */
    const int32_t *replay;   /* (prompt_len + n, n_moe, K) the experts replayed, or NULL without routing replay */
} grpo_probe_seq;
/* Called after each policy forward of an optimizer update (before its backward) with the model, the policy
 * iteration (0 .. mu-1), the update's index within the iteration, and the micro-batch's samples. */
typedef void (*grpo_probe_fn)(void *ctx, model *m, int iteration, int update, const grpo_probe_seq *s, int n);
void grpo_set_probe(grpo_probe_fn fn, void *ctx); /* NULL: none (the default); not thread-safe, tests only */

#endif
