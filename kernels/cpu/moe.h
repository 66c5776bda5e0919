/* moe.h: the DeepSeekMoE layer on the CPU (MODEL-SPEC §6, §7, §9.1, §9.2): router (V3 sigmoid + bias-corrected
 * group-limited top-k, V2 softmax greedy / group-limited greedy), token dispatch to experts, grouped expert GEMMs,
 * shared experts, the complementary sequence-wise balance loss and the aux-loss-free bias update.
 *
 * The one idea: the T·K (token, slot) pairs are sorted by expert with a counting sort (experts ascending, tokens
 * ascending within an expert), the rows are gathered into one contiguous buffer, and every expert runs ONE GEMM
 * over its segment; the outputs come back by a per-token gather in slot order. Every float reduction therefore
 * happens in an order fixed by the routing alone, never by the thread count; with MM_DET matmuls a token's output
 * does not even depend on which other tokens share the batch.
 *
 * Borrows: matmul_*, swiglu_* from kernels/cpu/dense.h. Owns: nothing but the buffers of moe_saved / moe_work.
 * Weights are [out, in] as in HF (§0): gate.weight (E, d), experts.{e}.gate_proj / up_proj (I_e, d),
 * down_proj (d, I_e); the N_s shared experts are one fused MLP of width I_s = N_s·I_e.
 * Backward ACCUMULATES into every gradient (+=). */
#ifndef MOERL_KERNELS_CPU_MOE_H
#define MOERL_KERNELS_CPU_MOE_H

#include <stdbool.h>
#include <stdint.h>

#include "core/err.h"
#include "kernels/cpu/dense.h"

#ifdef __cplusplus
extern "C" { /* kernels/cuda/moe_cuda.cu calls moe_cfg_check and the free functions */
#endif

#define MOE_MAX_GROUPS 64 /* n_group limit (V3: 8); lets the router keep its group state on the stack */

typedef enum moe_score_func {
    MOE_SCORE_SIGMOID = 0, /* s = sigmoid(z), V3 */
    MOE_SCORE_SOFTMAX = 1  /* s = softmax(z) over the E experts, V2 */
} moe_score_func;

typedef enum moe_topk_method {
    MOE_TOPK_NOAUX_TC = 0,            /* V3 §7.1: select on s + bias; group score = sum of the group's top-2 */
    MOE_TOPK_GREEDY = 1,              /* V2 §7.3: plain top-K of s (groups ignored, no bias) */
    MOE_TOPK_GROUP_LIMITED_GREEDY = 2 /* V2 §7.3: group score = max of s in the group, no bias */
} moe_topk_method;

/* The sizes and the routing rule of one MoE layer (the model maps its model_config onto this). */
typedef struct moe_cfg {
    int d;          /* hidden_size */
    int E;          /* n_routed_experts */
    int K;          /* num_experts_per_tok */
    int I_e;        /* moe_intermediate_size */
    int I_s;        /* shared width N_s·I_e; 0 = no shared experts */
    int n_group;    /* G; experts e with e / (E/G) == g form group g */
    int topk_group; /* G_top groups kept (ignored by MOE_TOPK_GREEDY) */
    moe_score_func score;
    moe_topk_method method;
    bool norm_topk_prob;         /* noaux_tc: g = s/(Σ_S s + 1e-20); V2 methods: the same, only when K > 1 */
    float routed_scaling_factor; /* multiplies the routed weights after normalization */
    mm_mode mm;                  /* matmul mode of the forward's GEMMs (router, experts, shared experts) */
    mm_mode mm_bwd;              /* matmul mode of the backward's GEMMs (MM_FAST = OpenBLAS: the zero default) */
} moe_cfg;

/* Weights of one layer (non-owning). gate_bias = e_score_correction_bias: used only by MOE_TOPK_NOAUX_TC and only
 * to choose experts; NULL = zeros. The shared pointers are unused when I_s == 0. */
typedef struct moe_params {
    const float *gate_w;           /* (E, d) */
    const float *gate_bias;        /* (E) or NULL */
    const float *const *gate_proj; /* E pointers, each (I_e, d) */
    const float *const *up_proj;   /* E pointers, each (I_e, d) */
    const float *const *down_proj; /* E pointers, each (d, I_e) */
    const float *sh_gate;          /* (I_s, d) */
    const float *sh_up;            /* (I_s, d) */
    const float *sh_down;          /* (d, I_s) */
} moe_params;

/* Gradients of one layer, same layout; every pointer (and every entry of the arrays) may be NULL = not wanted.
 * The bias has no gradient (it is updated by moe_bias_update). */
typedef struct moe_grads {
    float *gate_w;           /* (E, d) */
    float *const *gate_proj; /* E pointers, each (I_e, d) */
    float *const *up_proj;   /* E pointers, each (I_e, d) */
    float *const *down_proj; /* E pointers, each (d, I_e) */
    float *sh_gate;          /* (I_s, d) */
    float *sh_up;            /* (I_s, d) */
    float *sh_down;          /* (d, I_s) */
} moe_grads;

/* What moe_forward saves for moe_backward, one per layer, sized for up to T_max tokens (one allocation).
 * Pairs: p = t·K + k is slot k of token t. "Sorted rows" r = 0..T·K-1 are the pairs in dispatch order.
 * Everything here is valid for the T of the latest moe_forward. */
typedef struct moe_saved {
    int T_max, T;
    float *scores;     /* (T, E) affinities s (sigmoid or softmax of the router logits); unbiased */
    int32_t *idx;      /* (T, K) chosen experts, slot order = descending selection score (or the replayed order) */
    float *weights;    /* (T, K) combination weights g (normalized, scaled) */
    int32_t *off;      /* (E + 1) expert e owns sorted rows off[e] .. off[e+1]-1 */
    int32_t *order;    /* (T·K) sorted row r -> pair p */
    int32_t *pos;      /* (T·K) pair p -> sorted row r (the inverse permutation) */
    int64_t *load;     /* (E) tokens routed to each expert by the latest forward (= off[e+1] - off[e]) */
    float *xg;         /* (T·K, d) input rows gathered in sorted order */
    float *hg;         /* (T·K, I_e) expert gate_proj outputs (pre-activation), sorted order */
    float *hu;         /* (T·K, I_e) expert up_proj outputs, sorted order */
    float *sg;         /* (T, I_s) shared gate_proj outputs */
    float *su;         /* (T, I_s) shared up_proj outputs */
    void *mem_f, *mem_i; /* the two allocations everything points into */
    /* Set by the caller before a forward that will not be differentiated and whose loads are not read (a decode
     * step): a device backend may then run the experts straight from the routing, without the dispatch that brings
     * expert offsets back to the host (kernels/cuda/moe_cuda.h); the CPU ignores it. no_dispatch is set by such a
     * backend when it did so: off, order, pos, load and the sorted rows are then stale and backward refuses. */
    int infer, no_dispatch;
    /* Set by another backend's init (kernels/cuda/moe_cuda.h: device buffers; there off and load stay in host
     * memory, mem_h): moe_saved_free calls it instead of freeing mem_f and mem_i itself. NULL on the CPU. */
    void *mem_h;
    void (*release)(struct moe_saved *s);
} moe_saved;

/* Scratch of forward and backward, not needed between them: one per model (share it across layers), sized for
 * T_max tokens of the largest layer config it serves. */
typedef struct moe_work {
    int T_max;
    float *rows_d;    /* (T·K, d) expert outputs (fwd) / dy rows, then dx rows (bwd) */
    float *h;         /* (T·K, I_e) swiglu output */
    float *hs;        /* (T·K, I_e) g·h, the down_proj input */
    float *dh;        /* (T·K, I_e) */
    float *dhg;       /* (T·K, I_e) */
    float *dhu;       /* (T·K, I_e) */
    float *dweights;  /* (T, K) */
    float *dz;        /* (T, E) router logit gradient */
    float *sh_h;      /* (T, I_s) */
    float *sh_dh;     /* (T, I_s) */
    float *sh_dg;     /* (T, I_s) */
    float *sh_du;     /* (T, I_s) */
    void *mem;
    void (*release)(struct moe_work *w); /* as moe_saved.release (NULL on the CPU) */
} moe_work;

/* Checks sizes and the routing rule: d, E, I_e > 0; 1 <= K <= E; 1 <= n_group <= MOE_MAX_GROUPS dividing E;
 * 1 <= topk_group <= n_group; K <= topk_group·E/n_group for the grouped methods; I_s >= 0; finite scaling. */
int moe_cfg_check(const moe_cfg *c, mr_err *e);
/* Buffer layout of moe_saved / moe_work, shared with kernels/cuda/moe_cuda.cu: moe_plan_add adds n elements of size
 * elt to a running total, each block rounded up to 64 bytes (-1 on overflow); moe_carve takes the next such block
 * from *cur; moe_check_tmax is moe_cfg_check plus 0 <= T_max·K <= INT32_MAX (what names the caller). */
int moe_plan_add(size_t *total, size_t n, size_t elt);
void *moe_carve(char **cur, size_t n, size_t elt);
int moe_check_tmax(const moe_cfg *c, int T_max, const char *what, mr_err *e);

int moe_saved_init(moe_saved *s, const moe_cfg *c, int T_max, mr_err *e);
void moe_saved_free(moe_saved *s); /* accepts NULL and a half-built struct */
int moe_work_init(moe_work *w, const moe_cfg *c, int T_max, mr_err *e);
void moe_work_free(moe_work *w);

/* ---- Router ---------------------------------------------------------------------------------------------- */

/* Selection and weights from given affinities (the part of the gate after the logits).
 * MOE_TOPK_NOAUX_TC: s' = s + bias; group score = sum of the two largest s' of the group; the topk_group best
 * groups are kept; experts of the other groups are excluded outright (never chosen, whatever their scores); the
 * K best s' among kept experts are chosen. GROUP_LIMITED_GREEDY: the same on s with group score = max. GREEDY:
 * top-K of s. Ties (groups and experts): lower index wins. Weights from the unbiased s (§7.1 step 6, §7.3).
 * With replay_idx != NULL the selection is skipped: idx = replay_idx (validated: each entry in [0, E), no expert
 * twice in a token; MR_EINVAL naming the token and slot otherwise) and only the weights are computed. */
int moe_gate_route(int32_t *idx,             /* (T, K) out */
                   float *weights,           /* (T, K) out */
                   const float *scores,      /* (T, E) affinities */
                   const float *bias,        /* (E) or NULL */
                   const int32_t *replay_idx, /* (T, K) or NULL */
                   const moe_cfg *c, int T, mr_err *e);

/* Router forward: logits = x·Wgᵀ, scores = sigmoid/softmax(logits), then moe_gate_route. */
int moe_gate_forward(int32_t *idx,              /* (T, K) out */
                     float *weights,            /* (T, K) out */
                     float *scores,             /* (T, E) out: affinities, saved for backward */
                     const float *x,            /* (T, d) */
                     const int32_t *replay_idx, /* (T, K) or NULL */
                     const float *gate_w,       /* (E, d) */
                     const float *bias,         /* (E) or NULL */
                     const moe_cfg *c, int T, mr_err *e);

/* Router backward. The selection is a constant (no straight-through); gradient flows from the weights into the
 * selected affinities (through normalization and scaling), plus daff (the balance-loss gradient w.r.t. all the
 * affinities, or NULL), then through sigmoid/softmax into the logits, then dx += dz·Wg, dgate_w += dzᵀ·x. */
void moe_gate_backward(float *dx,             /* (T, d) +=, or NULL */
                       float *dgate_w,        /* (E, d) +=, or NULL */
                       float *dz,             /* (T, E) scratch: receives the logit gradient */
                       const float *dweights, /* (T, K) */
                       const float *daff,     /* (T, E) or NULL */
                       const float *scores,   /* (T, E) saved */
                       const int32_t *idx,    /* (T, K) saved */
                       const float *x,        /* (T, d) */
                       const float *gate_w,   /* (E, d) */
                       const moe_cfg *c, int T);

/* ---- Dispatch -------------------------------------------------------------------------------------------- */

/* Counting sort of the T·K pairs by expert (experts ascending, tokens ascending within an expert). idx must hold
 * valid, per-token distinct experts (moe_gate_route guarantees it). load may be NULL. */
void moe_dispatch_build(int32_t *off,       /* (E + 1) */
                        int32_t *order,     /* (T·K) sorted row -> pair */
                        int32_t *pos,       /* (T·K) pair -> sorted row */
                        int64_t *load,      /* (E) or NULL */
                        const int32_t *idx, /* (T, K) */
                        int T, int K, int E);
/* xg[r] = x[order[r] / K]. */
void moe_gather(float *xg,            /* (T·K, d) */
                const float *x,       /* (T, d) */
                const int32_t *order, /* (T·K) */
                int T, int K, int d);
/* out[t] = Σ_k rows[pos[t·K + k]], summed in slot order k = 0..K-1 (so deterministic). */
void moe_combine(float *out,          /* (T, d) */
                 const float *rows,   /* (T·K, d) */
                 const int32_t *pos,  /* (T·K) */
                 int T, int K, int d);

/* ---- Layer ----------------------------------------------------------------------------------------------- */

/* out = Σ_k g_k · Expert_{idx_k}(x) + Shared(x) (§7.2), every expert one GEMM over its tokens.
 * replay_idx: routing replay (the rollout's experts), or NULL to route. Fills s (scores, idx, weights, dispatch,
 * load, activations). Errors: T > T_max (MR_ERANGE), bad replay indices (MR_EINVAL). */
int moe_forward(float *out,                /* (T, d) */
                moe_saved *s,
                moe_work *w,
                const float *x,            /* (T, d) */
                const int32_t *replay_idx, /* (T, K) or NULL */
                const moe_params *p,
                const moe_cfg *c, int T, mr_err *e);

/* Backward of moe_forward (the same T, s untouched since). daff: extra gradient w.r.t. the affinities (T, E) from
 * moe_balance_loss, or NULL. dx may be NULL (then the router and the experts still give weight gradients). */
void moe_backward(float *dx,            /* (T, d) += */
                  const moe_grads *g,
                  moe_work *w,
                  const float *dout,    /* (T, d) */
                  const float *daff,    /* (T, E) or NULL */
                  const moe_saved *s,
                  const float *x,       /* (T, d) */
                  const moe_params *p,
                  const moe_cfg *c);

/* ---- Balancing (§9) -------------------------------------------------------------------------------------- */

/* Complementary sequence-wise balance loss (§9.2, paper eqs. 17-20), averaged over the sequences:
 *   per sequence of T_s tokens: f_i = E/(K·T_s)·Σ_t 1[i ∈ idx_t],  ŝ_{i,t} = s_{i,t} / Σ_j s_{j,t},
 *   P_i = (1/T_s)·Σ_t ŝ_{i,t},  L_s = α·Σ_i f_i·P_i;   *loss = mean of L_s over the non-empty sequences
 * (the HF seq_aux convention; scale alpha for another). The indicator is the actual selection (idx), a constant.
 * When daff is non-NULL, daff += ∂loss/∂s (T, E). seq_len: the lengths of the n_seq sequences packed one after
 * another in the T rows (zero-length entries are skipped); their sum must be T (MR_EINVAL otherwise). */
int moe_balance_loss(double *loss,
                     float *daff,          /* (T, E) +=, or NULL */
                     const float *scores,  /* (T, E) */
                     const int32_t *idx,   /* (T, K) */
                     const int *seq_len,   /* (n_seq) */
                     int n_seq, int T, int E, int K, float alpha, mr_err *e);

/* Aux-loss-free balancing (§9.1), once per optimizer step with the loads summed over the whole step:
 * b_i += γ·sign(c̄ - c_i), c̄ = Σ c / E (compared exactly, in integers). */
void moe_bias_update(float *bias, const int64_t *load, int E, float gamma);
/* Load statistics of one layer: *max = max_i c_i, *mean = Σ c / E; returns the max violation (max - mean)/mean
 * (0 when no token was routed). max and mean may be NULL. */
double moe_load_stats(const int64_t *load, int E, int64_t *max, double *mean);

#ifdef __cplusplus
}
#endif

#endif
