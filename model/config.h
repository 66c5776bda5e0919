/* config.h: the model configuration of a DeepSeek-V3-family checkpoint, read from and written to the Hugging Face
 * config.json (MODEL-SPEC §1.1), plus the numbers derived from it (MoE layer rule §1.2, softmax scale §5.5,
 * parameter counts §12).
 *
 * The one idea: every field of config.json lives in one plain value struct (no owned memory, copy it with =).
 * Fields that decide tensor shapes are REQUIRED in a config.json (a missing hidden_size must not silently become
 * 7168); every other field, when absent, takes the default of the HF class named by model_type (DeepseekV3Config
 * or DeepseekV2Config), or the DeepSeek reference default where the two HF classes leave it unset (n_group /
 * topk_group = 1). Unknown keys are accepted and dropped (HF configs carry many). */
#ifndef MOERL_MODEL_CONFIG_H
#define MOERL_MODEL_CONFIG_H

#include <stdbool.h>
#include <stdint.h>

#include "core/err.h"

#define CONFIG_MAX_EOS 8 /* eos_token_id may be a list in HF; released configs use 1..3 ids */

typedef enum config_model_type {
    CONFIG_DEEPSEEK_V3 = 0, /* "deepseek_v3" */
    CONFIG_DEEPSEEK_V2 = 1  /* "deepseek_v2" (V2, V2-Lite, V2.5) */
} config_model_type;

typedef enum config_topk_method {
    CONFIG_TOPK_NOAUX_TC = 0,          /* "noaux_tc": sigmoid + bias, top-2-sum group scores (§7.1) */
    CONFIG_TOPK_GREEDY = 1,            /* "greedy": plain top-k of softmax (§7.3); "gready" (V2 remote-code
                                          default spelling) is read as this */
    CONFIG_TOPK_GROUP_LIMITED_GREEDY = 2 /* "group_limited_greedy": group score = max (§7.3) */
} config_topk_method;

typedef enum config_scoring_func {
    CONFIG_SCORING_SIGMOID = 0, /* "sigmoid" */
    CONFIG_SCORING_SOFTMAX = 1  /* "softmax" */
} config_scoring_func;

typedef enum config_rope_type {
    CONFIG_ROPE_NONE = 0, /* rope_scaling null / absent (or rope_type "default") */
    CONFIG_ROPE_YARN = 1  /* rope_scaling.type (or rope_type) "yarn" */
} config_rope_type;

typedef enum config_hidden_act {
    CONFIG_ACT_SILU = 0 /* "silu": the only activation of the family (§6) */
} config_hidden_act;

typedef enum config_dtype {
    CONFIG_DTYPE_NONE = 0, /* torch_dtype absent: not written */
    CONFIG_DTYPE_BF16,     /* "bfloat16" */
    CONFIG_DTYPE_F16,      /* "float16" */
    CONFIG_DTYPE_F32       /* "float32" */
} config_dtype;

typedef struct config_rope_scaling {
    config_rope_type type;
    double factor;                        /* s; required when type is yarn; >= 1 */
    int original_max_position_embeddings; /* L0; default 4096 (reference original_seq_len) */
    double beta_fast;                     /* default 32 */
    double beta_slow;                     /* default 1 */
    double mscale;                        /* 0 = absent (HF treats absent and 0 alike) */
    double mscale_all_dim;                /* 0 = absent: then no m^2 in the softmax scale (HF, §5.5) */
} config_rope_scaling;

/* The FP8 release's block quantization (§10.4); present only in that release. */
typedef struct config_quantization {
    bool present;
    char quant_method[16];      /* "fp8" (the only method moerl reads) */
    char fmt[16];               /* "e4m3" (default when absent) */
    char activation_scheme[16]; /* "dynamic" (default when absent) */
    char scale_fmt[16];         /* "" = absent; "ue8m0" in the V3.1 configs */
    int weight_block_size[2];   /* [128, 128] (default when absent) */
} config_quantization;

typedef struct model_config {
    config_model_type model_type;  /* required */
    int vocab_size;                /* required; V */
    int hidden_size;               /* required; d */
    int intermediate_size;         /* required; dense MLP width I */
    int moe_intermediate_size;     /* required when MoE; per-expert width I_e */
    int num_hidden_layers;         /* required; L (MTP layers excluded) */
    int num_attention_heads;       /* required; H */
    int num_key_value_heads;       /* unused by MLA; default = num_attention_heads */
    int n_shared_experts;          /* required when MoE (null = 0); N_s */
    int n_routed_experts;          /* required; E; 0 = null = a dense model (no MoE layer at all) */
    int num_experts_per_tok;       /* required when MoE; K */
    int n_group;                   /* G; default 1 */
    int topk_group;                /* G_top; default 1 */
    config_topk_method topk_method;   /* default from scoring_func, else from model_type */
    config_scoring_func scoring_func; /* default from topk_method, else v3 sigmoid / v2 softmax */
    bool norm_topk_prob;           /* default v3 true, v2 false */
    double routed_scaling_factor;  /* default v3 2.5, v2 1.0 */
    int first_k_dense_replace;     /* required when MoE */
    int moe_layer_freq;            /* default 1 */
    int q_lora_rank;               /* required (null allowed); 0 = null = no query compression */
    int kv_lora_rank;              /* required; r_kv */
    int qk_nope_head_dim;          /* required; d_nope */
    int qk_rope_head_dim;          /* required; d_rope, even */
    int v_head_dim;                /* required; d_v */
    double rope_theta;             /* default 10000 */
    config_rope_scaling rope_scaling;
    int max_position_embeddings;   /* default v3 4096, v2 2048 (HF classes) */
    double rms_norm_eps;           /* default 1e-6 */
    config_hidden_act hidden_act;  /* default silu */
    bool tie_word_embeddings;      /* default false */
    int num_nextn_predict_layers;  /* D, MTP modules; default 0 */
    int bos_token_id;              /* -1 = null; default v3 0, v2 100000 */
    int eos_token_id[CONFIG_MAX_EOS]; /* default v3 {1}, v2 {100001} */
    int n_eos_token_id;            /* 0 = null */
    bool eos_token_id_is_list;     /* written back as a list (true) or a single integer (false) */
    int pad_token_id;              /* -1 = null (the default) */
    double initializer_range;      /* default 0.02 */
    double aux_loss_alpha;         /* default 0.001 */
    bool seq_aux;                  /* default true */
    int ep_size;                   /* default 1 */
    bool attention_bias;           /* default false; true is rejected (moerl has no attention bias) */
    double attention_dropout;      /* default 0.0 */
    config_dtype torch_dtype;      /* "torch_dtype" (or newer HF "dtype") */
    config_quantization quantization_config;
    bool rope_interleave;          /* default true (§5.4) */
    char transformers_version[32]; /* "" = absent; kept as read, written back only when set */
    /* moerl's option (off = 0): sliding-window attention over the last moerl_swa_window tokens plus the
     * average-pooled keys/values of every older block of moerl_swa_ratio tokens (kernels/cpu/attention_swa.h).
     * Written to config.json only when set; a checkpoint trained with it must be run with it. */
    int moerl_swa_window;
    int moerl_swa_ratio;
} model_config;

/* Fills every field with the HF-class default for model_type t; shape fields (the required ones) become 0. */
void config_defaults(model_config *c, config_model_type t);

/* Parses config.json text (NUL-terminated) and validates the result. source_name (a path, or NULL for
 * "config.json") starts every error message: "ckpt/config.json: num_experts_per_tok: expected
 * 1..n_routed_experts (64), got 70"; malformed JSON names line and column: "ckpt/config.json:3:17: malformed
 * JSON: unexpected character '}' (expected a \"key\")". Returns 0, MR_EFORMAT (bad JSON, wrong type, missing
 * field, duplicate key), MR_EINVAL (unknown enum string, unsupported choice such as attention_bias true,
 * scoring_func that contradicts topk_method), MR_ERANGE (value or field combination out of range) or MR_ENOMEM.
 * On error *c is unspecified. The syntax is checked strictly (RFC 8259, as Python's json) before cJSON builds
 * the tree; cJSON's allocations go through mem_alloc (this installs cJSON hooks to mem_alloc/mem_free, which
 * are compatible with cJSON's malloc/free defaults). */
int config_parse_json(model_config *c, const char *json_text, const char *source_name, mr_err *e);
/* path is a config.json file or a directory holding one. MR_EIO when it cannot be read. */
int config_load_file(model_config *c, const char *path, mr_err *e);
/* Range and cross-field checks (n_routed_experts % n_group == 0, topk_group <= n_group, K reachable within the
 * kept groups, scoring_func/topk_method agreement, ...). Each message names the field. */
int config_validate(const model_config *c, const char *source_name, mr_err *e);

/* Writes a config.json that transformers' DeepseekV3Config / DeepseekV2Config reads: HF layout (2-space indent,
 * sorted keys), architectures ["DeepseekV3ForCausalLM"] (or V2), q_lora_rank null when 0, rope_scaling null
 * when absent. No auto_map (moerl checkpoints ship no remote code; transformers uses its native classes).
 * Validates first. *out_text is allocated with mem_alloc; free with mem_free. */
int config_write_json(const model_config *c, char **out_text, mr_err *e);
/* Atomic (temp file in the same directory + fsync + rename). path is a file or an existing directory
 * (then path/config.json). */
int config_save_file(const model_config *c, const char *path, mr_err *e);

/* NULL when a and b agree on every field, else the (static) name of the first field that differs. */
const char *config_diff(const model_config *a, const model_config *b);

/* §1.2: layer (0-based; layers >= num_hidden_layers are the MTP modules) uses the MoE FFN iff
 * n_routed_experts > 0, layer >= first_k_dense_replace and layer % moe_layer_freq == 0. */
bool config_is_moe_layer(const model_config *c, int layer);
/* d_qk = qk_nope_head_dim + qk_rope_head_dim (192 for V3). */
int config_qk_head_dim(const model_config *c);
/* §5.5: lambda = d_qk^-1/2 * m^2, m = 0.1 * mscale_all_dim * ln(factor) + 1 under YaRN with factor > 1 and
 * mscale_all_dim set, else m = 1. V3: 0.1352337789. */
double config_softmax_scale(const model_config *c);
/* §5.4: the factor HF multiplies cos/sin by: get_mscale(s, mscale) / get_mscale(s, mscale_all_dim) when both are
 * set, else get_mscale(s) (1.3689 for s = 40). 1 without YaRN. Exactly 1 for V3 and V2-Lite. */
double config_rope_attention_factor(const model_config *c);

/* §12 parameter counts (DERIVED formulas). The router bias (E per MoE layer) exists only for noaux_tc. */
typedef struct config_params {
    uint64_t total;            /* main model: embedding, L layers, final norm, head. V3: 671,026,419,200 */
    uint64_t activated;        /* per token, counting embedding + head. V3: 37,552,297,472 */
    uint64_t mtp_total;        /* the D MTP modules' own tensors (embedding/head copies excluded) */
    uint64_t mtp_activated;    /* per token through the MTP modules, counting the shared embedding + head */
    uint64_t checkpoint_total; /* what the HF files hold: total + mtp_total + D copies of embedding + head */
} config_params;
/* 0, or MR_ERANGE if a count overflows 64 bits (an unvalidated config). */
int config_param_breakdown(const model_config *c, config_params *p);
/* total and activated of the main model (the published "671B total / 37B activated"); either may be NULL. */
int config_param_count(const model_config *c, uint64_t *total, uint64_t *activated);

/* The quickstart model: a tiny DeepSeek-V3-style MoE with every feature of the big one (MLA with query
 * compression, dense prefix, grouped sigmoid noaux_tc routing, shared expert, MTP). See config.c for numbers. */
void config_tiny(model_config *c);

/* Names of the enums as written in config.json. */
const char *config_model_type_name(config_model_type t);
const char *config_topk_method_name(config_topk_method m);
const char *config_scoring_func_name(config_scoring_func s);
const char *config_dtype_name(config_dtype d); /* "" for CONFIG_DTYPE_NONE */

#endif
