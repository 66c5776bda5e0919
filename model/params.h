/* params.h: the parameters of a DeepSeek-V3-family model in one fp32 buffer, with HF tensor names.
 *
 * The one idea (llm.c's malloc_and_point_parameters): size everything from the config, allocate one buffer for
 * the parameters and one for the gradients, and point per-layer views into them. A table of entries maps each
 * HF tensor name (MODEL-SPEC §10.3) to its offset and shape, so loading, saving, initializing, the optimizer and
 * the gradient norm all walk one list. Routed experts of a layer are contiguous ([E][I_e][d] for gate/up,
 * [E][d][I_e] for down), so the MoE kernels see one array per projection. The router's
 * e_score_correction_bias is a buffer: stored and saved with the parameters, never given a gradient (§9.1).
 * The MTP modules' copies of the embedding and head (model.layers.{L+k-1}.embed_tokens / shared_head.head) are
 * not separate parameters: moerl shares the main ones and writes copies on save. */
#ifndef MOERL_MODEL_PARAMS_H
#define MOERL_MODEL_PARAMS_H

#include <stddef.h>
#include <stdint.h>

#include "core/err.h"
#include "model/config.h"

enum {
    PARAM_NO_DECAY = 1, /* norm gains (and buffers): AdamW applies no weight decay */
    PARAM_BUFFER = 2    /* not trained by gradient (the router bias) */
};

typedef struct param_entry {
    char name[112];   /* HF name, e.g. "model.layers.3.mlp.experts.7.down_proj.weight" */
    int ndim;         /* 1 or 2 */
    int64_t shape[2]; /* [out, in] for linear weights */
    size_t offset;    /* into model_params.data / grad (floats) */
    size_t numel;
    int flags;
} param_entry;

typedef struct mla_w {
    float *q_a, *q_a_norm, *q_b; /* (r_q, d), (r_q), (H*d_qk, r_q) when q_lora_rank > 0 */
    float *q;                    /* (H*d_qk, d) when q_lora_rank == 0 */
    float *kv_a;                 /* (r_kv + d_rope, d) */
    float *kv_a_norm;            /* (r_kv) */
    float *kv_b;                 /* (H*(d_nope + d_v), r_kv) */
    float *o;                    /* (d, H*d_v) */
} mla_w;

typedef struct mlp_w {
    float *gate, *up; /* (I, d) */
    float *down;      /* (d, I) */
} mlp_w;

typedef struct moe_w {
    float *router;                 /* (E, d) */
    float *bias;                   /* (E) e_score_correction_bias (noaux_tc only, else NULL); a buffer */
    float *gate, *up;              /* (E, I_e, d) */
    float *down;                   /* (E, d, I_e) */
    mlp_w shared;                  /* width N_s * I_e; NULL pointers when n_shared_experts == 0 */
} moe_w;

typedef struct layer_w {
    float *attn_norm, *ffn_norm; /* (d) input_layernorm, post_attention_layernorm */
    mla_w attn;
    int is_moe;
    mlp_w mlp; /* dense layers */
    moe_w moe; /* MoE layers */
    /* MTP modules only (layer index >= num_hidden_layers): */
    float *enorm, *hnorm; /* (d) */
    float *eh_proj;       /* (d, 2d): columns [0, d) take enorm(emb), [d, 2d) take hnorm(h) (§9.4) */
    float *head_norm;     /* (d) shared_head.norm */
} layer_w;

typedef struct model_w {
    float *embed;      /* (V, d) */
    float *final_norm; /* (d) */
    float *head;       /* (V, d) lm_head */
    layer_w *layers;   /* num_hidden_layers + num_nextn_predict_layers */
} model_w;

typedef struct backend backend;

typedef struct model_params {
    model_config cfg;
    const backend *be;  /* where data and grad live (params_to_backend); NULL = host memory */
    size_t n;           /* floats in data (and grad) */
    float *data;        /* all parameters and buffers */
    float *grad;        /* same layout; NULL until params_alloc_grad */
    param_entry *entries;
    int n_entries;
    int n_layers;       /* main + MTP */
    model_w w;          /* views into data */
    model_w g;          /* views into grad (NULL pointers until params_alloc_grad) */
} model_params;

/* Sizes the table from a validated config and allocates the parameter buffer (zeroed) in host memory. */
int params_init(model_params *p, const model_config *cfg, mr_err *e);
void params_free(model_params *p); /* accepts a zeroed or half-built struct */
/* The gradient buffer (zeroed) where the parameters live. */
int params_alloc_grad(model_params *p, mr_err *e);
void params_zero_grad(model_params *p);
/* Moves data (and grad, if allocated) into backend be's memory and points the views there; nothing to do for the
 * CPU backend (host memory). Loading, random init and params_tensor's host access happen before, on the host;
 * params_save and params_copy_to_host copy back. MR_ENOMEM / MR_EDEVICE leave p where it was. */
int params_to_backend(model_params *p, const backend *be, mr_err *e);
/* n floats of data from float offset off into host memory dst, wherever data lives; and back (upload). */
int params_copy_to_host(const model_params *p, float *dst, size_t off, size_t n, mr_err *e);
int params_copy_from_host(model_params *p, const float *src, size_t off, size_t n, mr_err *e);

/* From scratch (MODEL-SPEC §9.5): every weight ~ N(0, std) (std 0.006 in the paper), norm gains 1, router
 * bias 0. Entry i draws from the Philox stream (seed, i), so the values do not depend on thread count. */
void params_init_random(model_params *p, uint64_t seed, float std);

const param_entry *params_find(const model_params *p, const char *name);
float *params_tensor(const model_params *p, const param_entry *pe);

/* Loads a HF checkpoint directory (config.json + safetensors, single or sharded). The config is read from
 * dir and validated; every tensor of the table must be present with its exact shape, in F32, BF16, F16 or
 * F8_E4M3 (with a "<name>_scale_inv" F32 tensor of shape [ceil(out/128), ceil(in/128)], §10.4). MTP copies of
 * embed/head are checked for shape if present, not loaded. Errors name the tensor. */
int params_load(model_params *p, const char *dir, mr_err *e);
/* Writes dir/config.json and the safetensors (from wherever data lives) (dtype F32 or BF16; sharded above max_shard_bytes, 0 = never),
 * including the MTP modules' embed_tokens/shared_head.head copies, atomically file by file. dir is created. */
int params_save(const model_params *p, const char *dir, int bf16, size_t max_shard_bytes, mr_err *e);

#endif
