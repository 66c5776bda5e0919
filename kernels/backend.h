/* backend.h: the operation table that the model, the rollout and the trainers call through. kernels/cpu is the
 * reference (always built, always tested); kernels/cuda fills the same table whenever nvcc is found at build
 * time (ggml's backend vtable, in miniature). The table grows with the model: each op added here gets a CPU
 * implementation, a CUDA one, and a parity test (tests/gpu_*.c). */
#ifndef MOERL_BACKEND_H
#define MOERL_BACKEND_H

#include <stddef.h>
#include <stdint.h>

#include "core/err.h"
#include "kernels/cpu/dense.h"
#include "kernels/cpu/moe.h"
#include "kernels/cpu/rope.h"

#ifdef __cplusplus
extern "C" {
#endif

/* BACKEND_GUARDED: the CPU's ops on memory that host code cannot touch outside an op (kernels/cpu/backend_guarded.c):
 * the device code path checked without a device. */
typedef enum { BACKEND_CPU = 0, BACKEND_CUDA = 1, BACKEND_GUARDED = 2 } backend_kind;

/* One row of a decode step on a latent KV cache (model.h model_kv), in the backend's memory: the cache's latent and
 * RoPE-key arrays (layer-major: layer l starts at l·cap rows), its capacity, and the slot this row's token takes. */
typedef struct kv_row {
    float *ckv, *kpe;
    int32_t cap, at;
} kv_row;

/* What a benchmark divides by: the device's name and its datasheet peaks (0 where unknown). */
typedef struct backend_device_info {
    char name[128];
    double peak_bf16_flops; /* dense bf16 tensor-core FLOP/s (datasheet figure for the named part; 0 = unknown) */
    double peak_fp32_flops; /* non-tensor fp32: SMs x 128 FMA lanes x 2 x the boost clock */
    double mem_bw;          /* bytes/s: memory clock x 2 (DDR) x bus width / 8 */
    size_t mem_total;       /* bytes */
} backend_device_info;

typedef struct backend {
    backend_kind kind;
    const char *name;
    /* Device memory: alloc returns NULL on failure; free accepts NULL. */
    void *(*alloc)(size_t nbytes);
    void (*free)(void *p);
    int (*to_device)(void *dst, const void *host_src, size_t nbytes, mr_err *e);
    int (*to_host)(void *host_dst, const void *src, size_t nbytes, mr_err *e);
    int (*sync)(mr_err *e);
    /* x[i] = mean + std * N(seed, stream, i): the same numbers on every backend (core/rng.h). */
    int (*fill_normal)(float *x, size_t n, float mean, float std, uint64_t seed, uint64_t stream, mr_err *e);
    /* y = a * x + y over n floats. */
    int (*axpy)(float *y, const float *x, float a, size_t n, mr_err *e);
    /* Memory ops the model runs between kernels (void: failures are reported by the next sync, as the model ops'):
     * nbytes of p set to zero; rows x width floats copied from src (row pitch spitch floats) to dst (pitch dpitch);
     * x *= s over n floats. */
    void (*zero)(void *p, size_t nbytes);
    void (*copy2d)(float *dst, size_t dpitch, const float *src, size_t spitch, size_t width, size_t rows);
    void (*scale)(float *x, float s, size_t n);
    /* The optimizer over n contiguous floats of one parameter entry (sft/optim.h: the formula, the scalars formed in
     * double on the host, the same bits on every backend) and the gradient's sum of squares in double (chunks of
     * OPTIM_SUMSQ_CHUNK floats summed in order on the CPU: the bits of grad_sumsq's per-entry sum). */
    int (*adamw_update)(float *data, const float *grad, float *m, float *v, size_t n, double beta1, double beta2,
                        double eps, double weight_decay, int64_t step, double lr, mr_err *e);
    int (*grad_sumsq)(double *sumsq, const float *g, size_t n, mr_err *e);

    /* The model's operations (signatures and shapes: kernels/cpu/dense.h, rope.h, attention.h, moe.h). A backend
     * that has not implemented them leaves them NULL and backend_has_model_ops says so. */
    void (*matmul_forward)(float *y, const float *x, const float *w, int T, int in, int out, float beta, mm_mode mode);
    void (*matmul_backward)(float *dx, float *dw, const float *dy, const float *x, const float *w, int T, int in,
                            int out, mm_mode mode);
    void (*rmsnorm_forward)(float *out, float *rstd, const float *x, const float *g, int T, int C, float eps);
    void (*rmsnorm_backward)(float *dx, float *dg, const float *dout, const float *x, const float *g,
                             const float *rstd, int T, int C);
    void (*swiglu_forward)(float *h, const float *gate, const float *up, int T, int I);
    void (*swiglu_backward)(float *dgate, float *dup, const float *dh, const float *gate, const float *up, int T,
                            int I);
    void (*embedding_forward)(float *out, const int32_t *ids, const float *table, int T, int C);
    void (*embedding_backward)(float *dtable, const float *dout, const int32_t *ids, int T, int C);
    double (*xent_forward_backward)(float *loss, float *dlogits, const float *logits, const int32_t *target,
                                    const float *scale, int T, int V);
    void (*rope_forward)(float *x, const int32_t *pos, int T, int n_heads, int row_stride, int head_stride,
                         const rope_table *rt);
    void (*rope_backward)(float *dx, const int32_t *pos, int T, int n_heads, int row_stride, int head_stride,
                          const rope_table *rt);
    void (*attention_forward)(float *out, float *lse, const float *q, const float *k, const float *v,
                              const int32_t *doc_start, int T, int H, int d_qk, int d_v, float scale);
    void (*attention_backward)(float *dq, float *dk, float *dv, const float *dout, const float *out,
                               const float *lse, const float *q, const float *k, const float *v,
                               const int32_t *doc_start, int T, int H, int d_qk, int d_v, float scale);
    int (*attention_swa_forward)(float *out, float *lse, const float *q, const float *k, const float *v,
                                 const int32_t *doc_start, int T, int H, int d_qk, int d_v, float scale, int window,
                                 int ratio, mr_err *e);
    int (*attention_swa_backward)(float *dq, float *dk, float *dv, const float *dout, const float *out,
                                  const float *lse, const float *q, const float *k, const float *v,
                                  const int32_t *doc_start, int T, int H, int d_qk, int d_v, float scale, int window,
                                  int ratio, mr_err *e);
    int (*moe_forward)(float *out, moe_saved *s, moe_work *w, const float *x, const int32_t *replay_idx,
                       const moe_params *p, const moe_cfg *c, int T, mr_err *e);
    void (*moe_backward)(float *dx, const moe_grads *g, moe_work *w, const float *dout, const float *daff,
                         const moe_saved *s, const float *x, const moe_params *p, const moe_cfg *c);
    int (*moe_balance_loss)(double *loss, float *daff, const float *scores, const int32_t *idx, const int *seq_len,
                            int n_seq, int T, int E, int K, float alpha, mr_err *e);
    /* Absorbed MLA attention over latent caches (kernels/cpu/attention.h, mla_decode_absorbed_lse): c_kv, k_rope
     * and len are HOST arrays (B entries) whose pointers point into the backend's memory. NULL where not yet
     * implemented: the model then has no latent-cache decode on this backend and says so. */
    int (*mla_absorbed)(float *out, float *lse, const float *q, const float *const *c_kv, const float *const *k_rope,
                        const int32_t *len, const float *w_kvb, int B, int H, int d_nope, int d_rope, int d_v,
                        int r_kv, float scale, mr_err *e);
    /* The decode step's attention with its per-row arguments in the backend's memory (rows: T kv_row), so that a
     * step's launches do not depend on the step (CUDA graphs): kv_append writes row t's normed latent cn[t] (r_kv)
     * and rotated key kpe[t] (d_rope) into cache layer `layer` at slot at; mla_rows is mla_absorbed of row t over
     * slots 0..at of that layer. max_cap >= every row's cap (sizes device scratch; the same for every step of a
     * rollout). */
    void (*kv_append)(const kv_row *rows, int layer, const float *cn, const float *kpe, int T, int r_kv, int d_rope);
    int (*mla_rows)(float *out, float *lse, const float *q, const kv_row *rows, int layer, const float *w_kvb, int B,
                    int H, int d_nope, int d_rope, int d_v, int r_kv, float scale, int max_cap, mr_err *e);
    /* 1: in MM_DET the training forward computes attention with mla_absorbed, so a decode step's logits equal the
     * trainer's bit for bit (model.h); 0: flash attention in training. */
    int det_absorbed;
    /* GEMM precision of the fast matmuls (MM_FAST: the backward's by default, the forward's with
     * run.deterministic false): 1 rounds their inputs to bf16 and accumulates in fp32 (tensor cores), 0 keeps fp32.
     * Returns the previous setting. NULL where only fp32 exists (the CPU backends). */
    int (*set_gemm_bf16)(int on);
    /* Device memory now in use and the most in use since the process began (bytes); NULL for the CPU (host memory:
     * the run's peak RSS covers it). */
    void (*mem_stats)(size_t *in_use, size_t *peak);
    /* Replayable launch sequences (CUDA graphs; NULL elsewhere). *g is the caller's handle (NULL the first time);
     * body(ctx) issues ops. The first call runs body; the second captures it into a graph and launches that; later
     * calls launch the graph without calling body, so body must issue the same launches every time (sizes and
     * pointers fixed, per-step values read from device memory) and change no host state that matters. A body that
     * cannot be captured (it synchronizes) runs directly from then on. *replayed (may be NULL): 1 when the graph
     * ran. graph_free releases a handle (NULL is fine). */
    int (*graph_run)(void **g, int (*body)(void *ctx, mr_err *e), void *ctx, int *replayed, mr_err *e);
    void (*graph_free)(void *g);
    /* The device and its peaks (benchmarks); NULL for the CPU backends. */
    int (*device_info)(backend_device_info *out, mr_err *e);
} backend;

/* 1 when b's memory is host memory that any code may read (the CPU backend). */
static inline int backend_is_host(const backend *b) { return b->kind == BACKEND_CPU; }

/* run.precision: "fp32" (always) or "bf16" (a backend with set_gemm_bf16). MR_EINVAL naming the backend
 * otherwise; key names the recipe key for the message. */
int backend_set_precision(const backend *b, const char *precision, const char *key, mr_err *e);

/* The backend a recipe asks for (run.device) with run.precision applied; errors name the recipe file and key. */
struct recipe;
int backend_from_recipe(const struct recipe *r, const backend **out, mr_err *e);

/* 1 when every model operation above is implemented. */
int backend_has_model_ops(const backend *b);

/* moe_saved_init / moe_work_init with the buffers where backend b's moe ops expect them: host memory for the CPU,
 * device memory for CUDA (kernels/cuda/moe_cuda.h says which fields stay on the host). Free with moe_saved_free /
 * moe_work_free whatever the backend. */
int backend_moe_saved_init(const backend *b, moe_saved *s, const moe_cfg *c, int T_max, mr_err *e);
int backend_moe_work_init(const backend *b, moe_work *w, const moe_cfg *c, int T_max, mr_err *e);

/* The backend named "cpu", "cuda" or "cpu-guarded". MR_EDEVICE when CUDA was not built in or no device is
 * present. */
int backend_get(const char *name, const backend **out, mr_err *e);

/* One line describing the build: backends compiled in and library versions (cuBLAS, NCCL when built). */
void backend_describe(char *buf, size_t n);

const backend *backend_cpu(void);
/* The guarded backend (backend_get name "cpu-guarded"). */
const backend *backend_guarded(void);
#ifdef MOERL_HAVE_CUDA
/* kernels/cuda: returns NULL and fills e when no device can be used. */
const backend *backend_cuda(mr_err *e);
void backend_cuda_describe(char *buf, size_t n);
#endif

#ifdef __cplusplus
}
#endif

#endif
