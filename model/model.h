/* model.h: the DeepSeek-V3 model on the CPU: training-form forward over every position, and the hand-written
 * backward (llm.c style) through MLA, dense SwiGLU, DeepSeekMoE, the MTP modules and the balance loss.
 *
 * The one idea: a batch is T tokens laid end to end (several documents may be packed; doc_start and pos restart
 * at each document), the model owns one activation arena sized for T_max, and forward saves exactly what
 * backward reads. Loss = CE_main + (λ/D)·Σ_k CE_mtp_k + α·Σ_layers L_bal (MODEL-SPEC §9.2, §9.4), each CE a
 * mean over the positions that have a target. */
#ifndef MOERL_MODEL_MODEL_H
#define MOERL_MODEL_MODEL_H

#include <stdint.h>

#include "core/err.h"
#include "kernels/cpu/dense.h"
#include "kernels/cpu/moe.h"
#include "kernels/cpu/rope.h"
#include "model/params.h"

#define MODEL_MAX_MTP 8

typedef struct backend backend;

typedef struct model_opts {
    const backend *backend; /* operation table; NULL = the CPU backend */
    mm_mode mm;          /* MM_DET: batch-invariant GEMMs (default); MM_FAST: OpenBLAS */
    float mtp_weight;    /* λ; 0 skips the MTP modules in training */
    float balance_alpha; /* α of the sequence-wise balance loss (main-model MoE layers); 0 = off */
} model_opts;

typedef struct model_batch {
    const int32_t *ids;       /* (T) token ids */
    const int32_t *pos;       /* (T) positions (restart at 0 per packed document) or NULL = 0..T-1 */
    const int32_t *doc_start; /* (T) first row of each token's document, or NULL = one document */
    const int32_t *targets;   /* (T) next-token target of each row, -1 = no loss here; NULL = inference */
    const int32_t *const *replay; /* per layer (main + MTP), (T, K) experts to reuse, or NULL (routing replay) */
    int T;
    /* Gradient weight of this batch's losses (0 = 1): a trainer that splits a step into micro-batches passes
     * n_tokens(micro-batch) / n_tokens(step) so the step's gradient is that of one token mean. */
    float loss_weight;
    int skip_mtp;       /* inference without the MTP heads (generation) */
} model_batch;

typedef struct model_loss {
    double total;                /* what backward differentiates */
    double main;                 /* mean CE of the main model */
    double mtp[MODEL_MAX_MTP];   /* mean CE per MTP depth */
    double balance;              /* α·Σ_layers L_bal (already weighted) */
    int64_t n_main, n_mtp[MODEL_MAX_MTP];
} model_loss;

typedef struct layer_act layer_act;
typedef struct mtp_act mtp_act;

typedef struct model {
    const backend *be;      /* operation table the model runs on (kernels/backend.h) */
    model_params p;
    model_opts opt;
    int T_max;
    rope_table rope;
    float scale;            /* softmax scale λ of §5.5 */
    moe_cfg moe;            /* shared by every MoE layer */
    moe_work moe_work;
    const float **ep, **eg_up, **ep_down; /* per MoE layer: E expert pointers each (gate, up, down) */
    float **gp, **gg_up, **gp_down;       /* the same into the gradients */
    layer_act *acts;        /* n_layers */
    mtp_act *mtp;           /* num_nextn_predict_layers */
    float *resid;           /* (L + 1, T, d) residual stream at each main layer boundary */
    float *hfin, *rstd_fin; /* (T, d), (T) final-normed hidden state */
    float *logits;          /* (T, V) main logits; after a training forward: their gradient */
    float *scratch;         /* backward work buffers */
    int32_t *tgt_k;         /* (T) MTP targets */
    int *seq_len;           /* (T) document lengths for the balance loss */
    int n_seq;
    int T;                  /* of the latest forward */
    int trained;            /* the latest forward kept gradients of the logits */
    int mtp_trained;        /* MTP depths whose logits hold gradients (0 after model_policy_grad) */
} model;

/* Allocates activations for up to T_max tokens around already-initialized params (moved into m: p is zeroed). */
int model_init(model *m, model_params *p, const model_opts *opt, int T_max, mr_err *e);
void model_free(model *m); /* frees the params too; accepts a zeroed or half-built model */

/* Forward. With b->targets, computes the losses and (train != 0) leaves d(loss)/d(logits) for model_backward. */
int model_forward(model *m, const model_batch *b, int train, model_loss *loss, mr_err *e);
/* Backward of the latest training forward: gradients ACCUMULATE into m->p.grad (allocated on first use). */
int model_backward(model *m, const model_batch *b, mr_err *e);

/* Policy-gradient head (GRPO): after model_forward(m, b, 0, ...) of the same batch with b->targets, turns the
 * main logits into coef[t]·(softmax − onehot(target[t])) — the gradient of Σ_t coef[t]·CE_t = −Σ_t coef[t]·log p_t
 * — for rows with a target (others 0), so model_backward then accumulates that gradient. The MTP heads get none;
 * the balance loss (α > 0) is added by model_backward as in training. Read log-probs from model_logits first. */
int model_policy_grad(model *m, const model_batch *b, const float *coef, mr_err *e);

/* Main logits (T, V) of the latest forward with train == 0; MTP depth k (1-based) logits (T-k, V). */
const float *model_logits(const model *m);
const float *model_mtp_logits(const model *m, int k);
/* Expert loads (E) of main-model layer l from the latest forward; NULL for a dense layer. */
const int64_t *model_layer_load(const model *m, int l);

#endif
