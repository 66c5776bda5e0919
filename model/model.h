/* model.h: the DeepSeek-V3 model on any backend of kernels/backend.h: training-form forward over every position, and the hand-written
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
typedef struct kv_row kv_row;

typedef struct model_opts {
    const backend *backend; /* operation table; NULL = the CPU backend */
    mm_mode mm;          /* forward GEMMs. MM_DET: batch-invariant (default); MM_FAST: OpenBLAS */
    mm_mode mm_bwd;      /* backward GEMMs (dX, dW). MM_FAST (the zero default): OpenBLAS, whose bits depend on
                            the shapes and the thread count only, so a run still repeats bit for bit at the same
                            thread count; MM_DET: moerl's fixed-order kernels, the same bits at any thread count,
                            ~1.6x slower training. Log-probs (forward) do not depend on it. */
    float mtp_weight;    /* λ; 0 skips the MTP modules in training */
    float balance_alpha; /* α of the sequence-wise balance loss (main-model MoE layers); 0 = off */
    int attn_naive;      /* 1: keep the non-absorbed training attention even in MM_DET (benchmarks only: the
                            rollout's log-probs then no longer equal the trainer's bit for bit) */
    int no_graphs;       /* 1: decode steps launch their ops one by one even where the backend could replay them
                            as a CUDA graph (tests and benchmarks compare the two) */
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

/* Latent KV cache of one sequence (MODEL-SPEC §5.6, §5.7): per main-model layer and cached token, the normalized
 * latent c_kv (r_kv) and the rotated shared RoPE key k_pe (d_rope), nothing per head. The caller owns the memory
 * (model_kv_floats sizes it); token u of layer l is ckv[(l·cap + u)·r_kv], kpe[(l·cap + u)·d_rope]. */
typedef struct model_kv {
    float *ckv; /* (L, cap, r_kv) */
    float *kpe; /* (L, cap, d_rope) */
    int cap;    /* tokens it can hold */
    int len;    /* tokens cached (= the position of the next token) */
} model_kv;

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
    int mtp_ran;            /* MTP depths the latest forward ran (their layers' loads are valid) */
    const float **kv_ptr;   /* (2·T_max) per-row latent / RoPE-key pointers of the absorbed attention */
    int32_t *kv_len;        /* (T_max) per-row key counts of the absorbed attention */
    int32_t *dec_pos;       /* (T_max) positions of a decode step */
    kv_row *dec_rows;       /* (T_max) the latest decode step's rows as the attention ops read them (backend memory) */
    kv_row *dec_rows_h;     /* (T_max) the same in host memory (dec_rows itself on the CPU) */
    int dec_cap;            /* the largest cache capacity among them */
    void **dec_graphs;      /* (T_max + 1) per batch size: the backend's graph of a main decode step (graph_run) */
    void **mtp_graphs;      /* the same for MTP drafts */
    int graph_cap, mtp_graph_cap; /* the dec_cap each set was captured for */
    int64_t graph_steps;    /* decode steps that ran as a replayed graph */
    /* Device backends: the batch's integer arrays and per-row scales copied into the backend's memory before the
     * ops read them (on the CPU the host arrays are used as they are), and host copies of what callers read. */
    int32_t *st_i;          /* device: ids, pos, doc_start, targets, MTP targets (T_max each), replay (layers, T_max, K) */
    float *st_f;            /* device: (T_max) per-row loss scales */
    struct {
        const int32_t *ids, *pos, *doc_start, *targets;
        const int32_t **replay; /* (n_layers) */
    } dev;                  /* the latest batch as the ops see it (host pointers on the CPU) */
    float *logits_h;        /* host copy of logits (T_max, V) and of MTP depth 1's, allocated on first use */
    float *mtp_logits_h;
    int32_t *experts_h;     /* host copy of each main MoE layer's experts (layers, T_max, K) */
    int logits_h_ok, mtp_logits_h_ok, experts_h_ok; /* the copies hold the latest forward's values */
    int mtp_T;              /* rows of MTP depth 1's logits (latest forward or draft) */
    float *gtmp;            /* device: (T_max, V) staging of model_add_logits_grad, allocated on first use */
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

/* ---- Inference on the latent KV cache (the rollout engine, rollout/rollout.c) ----
 *
 * Attention form: with MM_DET on a backend with det_absorbed (the CPU, CUDA; no sliding window) model_forward computes every attention
 * output in the absorbed form of §5.6 (mla_decode_absorbed_lse, one row at a time over its document's latents), the
 * same arithmetic as model_decode_step; every other operation is batch-invariant. So a decode step's logits row
 * equals, bit for bit, the row of the same token in a model_forward over the whole sequence (alone or packed). In
 * MM_FAST the forward keeps the non-absorbed flash attention and OpenBLAS GEMMs: close, not bitwise equal. */

/* Floats that one sequence's cache of cap tokens takes in ckv and kpe (each is one allocation). */
void model_kv_floats(const model *m, int cap, size_t *ckv, size_t *kpe);

/* Prefill: model_forward(train = 0, no MTP) over b (one or more documents packed with doc_start; positions must
 * start at 0 in each document), then document j's c_kv / k_pe of every main layer are copied into kv[j] at
 * 0..n_j-1 and kv[j]->len = n_j. The logits (T, V) stay in model_logits (each document's last row predicts its
 * next token). MR_ERANGE when a document does not fit its cache. */
int model_prefill(model *m, const model_batch *b, model_kv *const *kv, int n_kv, mr_err *e);

/* One decode step for B sequences (B <= T_max): token ids[b] at position kv[b]->len goes through the main model,
 * its c_kv / k_pe are appended to kv[b] (len grows by 1) and the logits (B, V) are left in model_logits; the experts
 * routed in each MoE layer in model_layer_experts. The MTP modules are not run. MR_ERANGE when a cache is full or
 * a position passes max_position_embeddings; MR_EINVAL with a sliding-window config (not supported here). */
int model_decode_step(model *m, const int32_t *ids, model_kv *const *kv, int B, mr_err *e);

/* The general decode step (MTP speculative decoding verifies a drafted token in the same step as the last accepted
 * one): row b feeds ids[b] at position kv[b]->len + off[b]; the rows of one cache carry off 0, 1, ..., n-1 (any row
 * order) and see each other causally; every cache's len grows by its row count. off == NULL is model_decode_step.
 * A caller that rejects a verified row sets len back (the entry is overwritten by the next step). */
int model_decode_rows(model *m, const int32_t *ids, model_kv *const *kv, const int32_t *off, int B, mr_err *e);

/* MTP module 1 (§9.4) on its own latent cache (one layer: model_kv_floats_mtp): row b combines the final-normed
 * main hidden state row hrow[b] of the latest prefill or decode step (the row whose logits chose ids[b]) with the
 * embedding of ids[b], at position mtp[b]->len + off[b] (rows of one cache as in model_decode_rows); its logits
 * (B, V), a draft of the token after ids[b], are left in model_mtp_logits(m, 1). The main logits, experts and
 * caches are untouched. MR_EINVAL for a model without MTP modules. */
int model_mtp_draft(model *m, const int32_t *ids, const int32_t *hrow, model_kv *const *mtp, const int32_t *off,
                    int B, mr_err *e);
void model_kv_floats_mtp(const model *m, int cap, size_t *ckv, size_t *kpe);

/* model_prefill that also runs MTP module 1 over the prompts and caches its latents: mtp[j] gets rows
 * 0..n_j-2 of document j (the rows whose next token is in the prompt); row n_j-1 needs the sampled token and comes
 * from model_mtp_draft on prefill row (document end - 1). */
int model_prefill_mtp(model *m, const model_batch *b, model_kv *const *kv, model_kv *const *mtp, int n_kv,
                      mr_err *e);

/* Experts (T, K) chosen for each row in main-model MoE layer l by the latest forward or decode step; NULL for a
 * dense layer. Host memory on every backend (a device backend's are copied on the first call after a forward);
 * NULL also when that copy fails. */
const int32_t *model_layer_experts(model *m, int l);

/* Main logits (T, V) of the latest forward with train == 0; MTP depth k (1-based) logits (T-k, V). Host memory,
 * as model_layer_experts (NULL when a device copy fails). */
const float *model_logits(model *m);
const float *model_mtp_logits(model *m, int k);
/* Layer l's router bias (e_score_correction_bias, E floats) copied into host memory dst; MR_EINVAL for a layer
 * without one. */
int model_router_bias(const model *m, int l, float *dst, mr_err *e);
/* moe_bias_update (kernels/cpu/moe.h) of layer l's router bias from the loads (E), wherever the bias lives. */
int model_bias_update(model *m, int l, const int64_t *load, float gamma, mr_err *e);
/* After model_policy_grad: d(loss)/d(logits) += g, host memory (T, V) of the latest forward (GRPO's entropy term). */
int model_add_logits_grad(model *m, const float *g, mr_err *e);

/* Expert loads (E) of layer l (main layers, then MTP layers) from the latest forward; NULL for a dense layer
 * and for an MTP layer the latest forward did not run (skip_mtp, MTP weight 0, decode); NULL too after a decode
 * step on CUDA, which runs the experts without counting them (moe_saved.infer). */
const int64_t *model_layer_load(const model *m, int l);

#endif
