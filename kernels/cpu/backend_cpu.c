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
};

const backend *backend_cpu(void) { return &cpu_backend; }
