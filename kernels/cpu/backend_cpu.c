/* backend_cpu.c: the reference backend's table. Memory is host memory; ops run on OpenMP threads. */
#include <string.h>

#include "core/mem.h"
#include "core/rng.h"
#include "kernels/backend.h"
#include "kernels/cpu/attention.h"
#include "kernels/cpu/attention_swa.h"

static void *cpu_alloc(size_t n) { return mem_alloc_aligned(n); }
static void cpu_free(void *p) { mem_free_aligned(p); }

static int cpu_copy(void *dst, const void *src, size_t n, mr_err *e) {
    (void)e;
    memcpy(dst, src, n);
    return MR_OK;
}

static int cpu_sync(mr_err *e) {
    (void)e;
    return MR_OK;
}

static int cpu_fill_normal(float *x, size_t n, float mean, float std, uint64_t seed, uint64_t stream, mr_err *e) {
    (void)e;
    rng_fill_normal(x, n, mean, std, seed, stream);
    return MR_OK;
}

static int cpu_axpy(float *y, const float *x, float a, size_t n, mr_err *e) {
    (void)e;
#pragma omp parallel for schedule(static) if (n > 65536)
    for (size_t i = 0; i < n; i++) y[i] += a * x[i];
    return MR_OK;
}

static void cpu_zero(void *p, size_t n) { memset(p, 0, n); }

static void cpu_copy2d(float *dst, size_t dpitch, const float *src, size_t spitch, size_t width, size_t rows) {
    for (size_t r = 0; r < rows; r++) memcpy(dst + r * dpitch, src + r * spitch, width * sizeof(float));
}

static void cpu_scale(float *x, float s, size_t n) {
#pragma omp parallel for schedule(static) if (n > 65536)
    for (size_t i = 0; i < n; i++) x[i] *= s;
}

static int cpu_adamw_update(float *data, const float *grad, float *m, float *v, size_t n, double beta1, double beta2,
                            double eps, double weight_decay, int64_t step, double lr, mr_err *e) {
    (void)e;
    adamw_update_f32(data, grad, m, v, n, beta1, beta2, eps, weight_decay, step, lr);
    return MR_OK;
}

static int cpu_grad_sumsq(double *sumsq, const float *g, size_t n, mr_err *e) {
    (void)e;
    *sumsq = sumsq_chunked(g, n);
    return MR_OK;
}

static void cpu_kv_append(const kv_row *rows, int layer, const float *cn, const float *kpe, int T, int r_kv,
                          int d_rope) {
    for (int t = 0; t < T; t++) {
        const kv_row *r = &rows[t];
        const size_t at = (size_t)layer * (size_t)r->cap + (size_t)r->at;
        memcpy(r->ckv + at * (size_t)r_kv, cn + (size_t)t * r_kv, sizeof(float) * (size_t)r_kv);
        memcpy(r->kpe + at * (size_t)d_rope, kpe + (size_t)t * d_rope, sizeof(float) * (size_t)d_rope);
    }
}

/* The row arrays of mla_decode_absorbed_lse built from the descriptors: the same call as with host arrays. */
static int cpu_mla_rows(float *out, float *lse, const float *q, const kv_row *rows, int layer, const float *w_kvb,
                        int B, int H, int d_nope, int d_rope, int d_v, int r_kv, float scale, int max_cap, mr_err *e) {
    (void)max_cap;
    const float **pc = mem_alloc(2 * sizeof(float *) * (size_t)(B > 0 ? B : 1)), **pk = pc + (B > 0 ? B : 1);
    int32_t *len = mem_alloc(sizeof(int32_t) * (size_t)(B > 0 ? B : 1));
    if (!pc || !len) {
        mem_free(pc);
        mem_free(len);
        return err_set(e, MR_ENOMEM, "mla_rows: out of memory");
    }
    for (int b = 0; b < B; b++) {
        pc[b] = rows[b].ckv + (size_t)layer * (size_t)rows[b].cap * (size_t)r_kv;
        pk[b] = rows[b].kpe + (size_t)layer * (size_t)rows[b].cap * (size_t)d_rope;
        len[b] = rows[b].at + 1;
    }
    int rc = mla_decode_absorbed_lse(out, lse, q, pc, pk, len, w_kvb, B, H, d_nope, d_rope, d_v, r_kv, scale, e);
    mem_free(pc);
    mem_free(len);
    return rc;
}

static const backend cpu_backend = {
    .kind = BACKEND_CPU,
    .name = "cpu",
    .alloc = cpu_alloc,
    .free = cpu_free,
    .to_device = cpu_copy,
    .to_host = cpu_copy,
    .sync = cpu_sync,
    .fill_normal = cpu_fill_normal,
    .axpy = cpu_axpy,
    .matmul_forward = matmul_forward,
    .matmul_backward = matmul_backward,
    .rmsnorm_forward = rmsnorm_forward,
    .rmsnorm_backward = rmsnorm_backward,
    .swiglu_forward = swiglu_forward,
    .swiglu_backward = swiglu_backward,
    .embedding_forward = embedding_forward,
    .embedding_backward = embedding_backward,
    .xent_forward_backward = xent_forward_backward,
    .rope_forward = rope_forward,
    .rope_backward = rope_backward,
    .attention_forward = attention_forward,
    .attention_backward = attention_backward,
    .attention_swa_forward = attention_swa_forward,
    .attention_swa_backward = attention_swa_backward,
    .moe_forward = moe_forward,
    .moe_backward = moe_backward,
    .moe_balance_loss = moe_balance_loss,
    .mla_absorbed = mla_decode_absorbed_lse,
    .det_absorbed = 1,
    .zero = cpu_zero,
    .copy2d = cpu_copy2d,
    .scale = cpu_scale,
    .adamw_update = cpu_adamw_update,
    .grad_sumsq = cpu_grad_sumsq,
    .kv_append = cpu_kv_append,
    .mla_rows = cpu_mla_rows,
};

const backend *backend_cpu(void) { return &cpu_backend; }
