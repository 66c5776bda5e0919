/* schedule.c: learning-rate schedules (see schedule.h for the formulas and their HF origin). */
#include "sft/schedule.h"

#include <math.h>
#include <string.h>

static const char *const sched_names[] = {"constant", "linear", "cosine"};

int sched_kind_parse(const char *name, sched_kind *kind, mr_err *e) {
    for (int i = 0; i < 3; i++) {
        if (name && strcmp(name, sched_names[i]) == 0) {
            *kind = (sched_kind)i;
            return MR_OK;
        }
    }
    return err_set(e, MR_EINVAL, "optim.schedule: expected one of cosine, linear, constant, got \"%s\"",
                   name ? name : "(null)");
}

const char *sched_kind_name(sched_kind kind) {
    return (unsigned)kind < 3 ? sched_names[kind] : "?";
}

int sched_validate(const sched_cfg *s, mr_err *e) {
    if ((unsigned)s->kind >= 3) return err_set(e, MR_EINVAL, "schedule: unknown kind %d", (int)s->kind);
    if (!(s->lr > 0) || !isfinite(s->lr))
        return err_set(e, MR_EINVAL, "schedule: lr must be a finite number > 0, got %g", s->lr);
    if (s->warmup_steps < 0)
        return err_set(e, MR_EINVAL, "schedule: warmup_steps must be >= 0, got %lld", (long long)s->warmup_steps);
    if (s->total_steps < 0)
        return err_set(e, MR_EINVAL, "schedule: total_steps must be >= 0, got %lld", (long long)s->total_steps);
    if (!(s->min_lr_ratio >= 0 && s->min_lr_ratio <= 1))
        return err_set(e, MR_EINVAL, "schedule: min_lr_ratio must be in [0, 1], got %g", s->min_lr_ratio);
    if (!(s->warmup_start >= 0 && s->warmup_start < 1))
        return err_set(e, MR_EINVAL, "schedule: warmup_start must be >= 0 and < 1, got %g", s->warmup_start);
    return MR_OK;
}

static double max1(int64_t x) {
    return x > 1 ? (double)x : 1.0;
}

double sched_lr(const sched_cfg *s, int64_t step) {
    if (step < 0) step = 0;
    if (step < s->warmup_steps) {
        double f0 = s->warmup_start;
        return s->lr * (f0 + (1.0 - f0) * (double)step / max1(s->warmup_steps));
    }
    double p = (double)(step - s->warmup_steps) / max1(s->total_steps - s->warmup_steps);
    if (p > 1) p = 1;
    double m = s->min_lr_ratio, factor;
    switch (s->kind) {
    case SCHED_COSINE:
        factor = m + (1.0 - m) * 0.5 * (1.0 + cos(M_PI * p));
        break;
    case SCHED_LINEAR:
        factor = m + (1.0 - m) * (1.0 - p);
        break;
    default:
        factor = 1.0;
        break;
    }
    return s->lr * factor;
}
