/* schedule.h: the learning-rate schedules of SFT and GRPO: linear warmup, then cosine, linear or constant.
 *
 * The one idea: the lr of an optimizer step is a pure function of the step index, so a resumed run needs only
 * the step count to continue the schedule. The formulas are those of HF transformers' optimization.py
 * (get_cosine_schedule_with_warmup, get_cosine_with_min_lr_schedule_with_warmup,
 * get_linear_schedule_with_warmup, get_constant_schedule_with_warmup), with W = warmup_steps, T = total_steps,
 * s = the step (0-based: the number of optimizer steps already taken, as HF's LambdaLR calls lr_lambda(0)
 * for the first step), m = min_lr_ratio, f0 = warmup_start:
 *
 *   warmup (s < W):   lr * (f0 + (1 - f0) * s / max(1, W))           (HF: f0 = 0, so the first step has lr 0)
 *   after warmup:     p = (s - W) / max(1, T - W), clamped to [0, 1]
 *     cosine:         lr * (m + (1 - m) * 0.5 * (1 + cos(pi * p)))   (HF's cosine_with_min_lr, num_cycles 0.5)
 *     linear:         lr * (m + (1 - m) * (1 - p))                   (HF's linear: (T - s) / max(1, T - W))
 *     constant:       lr
 *
 * With m = 0 cosine and linear are HF's plain schedules. Two deliberate differences: the progress p is clamped
 * at 1, so steps past T stay at m * lr (HF's cosine would rise again past T), and m applies to linear too
 * (the recipe's optim.min_lr_ratio covers both). */
#ifndef MOERL_SFT_SCHEDULE_H
#define MOERL_SFT_SCHEDULE_H

#include <stdint.h>

#include "core/err.h"

typedef enum { SCHED_CONSTANT = 0, SCHED_LINEAR = 1, SCHED_COSINE = 2 } sched_kind;

typedef struct sched_cfg {
    sched_kind kind;
    double lr;             /* peak learning rate (> 0) */
    int64_t warmup_steps;  /* W >= 0 */
    int64_t total_steps;   /* T >= 0: optimizer steps of the whole run, warmup included */
    double min_lr_ratio;   /* m in [0, 1]: the final lr is m * lr (cosine, linear) */
    double warmup_start;   /* f0 in [0, 1): warmup starts at f0 * lr (0 = HF) */
} sched_cfg;

/* "cosine", "linear" or "constant" (the recipe's optim.schedule) into *kind; MR_EINVAL naming the value. */
int sched_kind_parse(const char *name, sched_kind *kind, mr_err *e);
const char *sched_kind_name(sched_kind kind);

/* Checks the ranges above; MR_EINVAL naming the field, its expected range and the value found. */
int sched_validate(const sched_cfg *s, mr_err *e);

/* The learning rate of step s (0-based), per the formulas above. Negative steps are treated as 0. */
double sched_lr(const sched_cfg *s, int64_t step);

#endif
