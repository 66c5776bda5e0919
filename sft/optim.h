/* optim.h: the optimizer of SFT and GRPO: AdamW with fp32 master weights and state, gradient-norm clipping,
 * a finite check, and the optimizer state on disk for exact resume.
 *
 * The one idea: the parameters live in one fp32 buffer described by a table of entries (model/params.h), so the
 * optimizer state is two more buffers of the same layout (m, v) and every pass walks the one table. Entries
 * flagged PARAM_BUFFER (the router bias) are skipped everywhere: no update, no state on disk, no part in the
 * gradient norm. Entries flagged PARAM_NO_DECAY (norm gains) get no weight decay.
 *
 * The update is torch.optim.AdamW's (PyTorch 1.13 single-tensor path, Loshchilov & Hutter's decoupled decay),
 * in fp32 with the scalars formed in double as Python does, for step t = 1, 2, ...:
 *     p  = p * (1 - lr * wd)
 *     m  = b1 * m + (1 - b1) * g
 *     v  = b2 * v + (1 - b2) * g * g
 *     p  = p - (lr / (1 - b1^t)) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)
 * Every operation is elementwise and the gradient norm sums fixed chunks in a fixed order, so results do not
 * depend on the number of OpenMP threads.
 *
 * On a device backend (model_params.be) the state lives there too and every pass runs through the backend's
 * adamw_update / grad_sumsq / scale ops, entry by entry: the same bits as on the host.
 *
 * Owns: m and v. Borrows: the model_params passed to each call (its layout must not change). */
#ifndef MOERL_SFT_OPTIM_H
#define MOERL_SFT_OPTIM_H

#include <stddef.h>
#include <stdint.h>

#include "core/err.h"
#include "model/params.h"

typedef struct adamw_cfg {
    double beta1, beta2;  /* in [0, 1) */
    double eps;           /* > 0 */
    double weight_decay;  /* >= 0; applied to every trainable entry without PARAM_NO_DECAY */
} adamw_cfg;

/* torch.optim.AdamW's defaults: betas (0.9, 0.999), eps 1e-8, weight_decay 0.01. */
adamw_cfg adamw_defaults(void);

typedef struct adamw {
    adamw_cfg cfg;
    const struct backend *be; /* where m and v live: the parameters' (model_params.be; NULL = host) */
    int64_t step;  /* optimizer steps taken (t of the last update) */
    size_t n;      /* floats in m and v: the params' n */
    float *m;      /* (n) exp_avg, same layout as model_params.data; zero on buffer entries */
    float *v;      /* (n) exp_avg_sq */
} adamw;

/* Checks cfg (MR_EINVAL naming the field) and allocates zeroed m, v for p's layout (MR_ENOMEM). */
int adamw_init(adamw *o, const model_params *p, adamw_cfg cfg, mr_err *e);
void adamw_free(adamw *o); /* accepts a zeroed or half-built struct */
/* One update of every trainable entry of p from p->grad (which must be allocated), with learning rate lr;
 * increments o->step first. The gradient is read, not changed. */
void adamw_step(adamw *o, model_params *p, double lr);

/* Writes dir/optimizer.safetensors atomically (dir is created if missing): F32 tensors "<param>.exp_avg" and
 * "<param>.exp_avg_sq" with the entry's shape for every trainable entry, and metadata "format"
 * ("moerl.adamw.v1"), "step", "beta1", "beta2", "eps", "weight_decay" (doubles printed exactly, %.17g). */
int adamw_save(const adamw *o, const model_params *p, const char *dir, mr_err *e);
/* Reads dir/optimizer.safetensors back into o (bit-exact). The file must hold exactly the tensors adamw_save
 * writes for p, as F32 with the entry's shape, and betas/eps equal to o->cfg: otherwise an error naming the
 * tensor or key, expected and found (MR_ENOTFOUND for a missing tensor, MR_EFORMAT otherwise), and o is left
 * unchanged. weight_decay is informative (a recipe may change it on resume). */
int adamw_load(adamw *o, const model_params *p, const char *dir, mr_err *e);

/* ---- gradient utilities (trainable entries only) ---- */

/* Sum of squared gradients in double: each entry is summed in fixed chunks, entries added in table order, so
 * the value is the same for any thread count (ranks can all-reduce it before the square root). */
double grad_sumsq(const model_params *p);
/* Global L2 norm: sqrt(grad_sumsq). Not finite iff some gradient element is NaN or Inf. */
double grad_norm(const model_params *p);
/* g *= s (gradient accumulation: s = 1 / micro-batches, when the loss was not already divided). */
void grad_scale(model_params *p, float s);
/* torch.nn.utils.clip_grad_norm_'s factor: max_norm / (norm + 1e-6) when norm > max_norm, else 1 (also for
 * max_norm <= 0, meaning "no clipping", and for a norm that is not finite). */
float grad_clip_coef(double norm, double max_norm);
/* Computes the norm, scales the gradient by grad_clip_coef, and returns the norm before clipping (as
 * clip_grad_norm_ does). A non-finite norm leaves the gradient untouched: the trainer skips that step. */
double grad_clip(model_params *p, double max_norm);
/* MR_ERANGE when a gradient element is NaN or Inf, naming the first such tensor (table order), element and
 * value: "gradient of model.norm.weight[3] is not finite (nan)"; else 0. */
int grad_check_finite(const model_params *p, mr_err *e);

#endif
