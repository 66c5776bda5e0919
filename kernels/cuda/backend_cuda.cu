// backend_cuda.cu: the CUDA backend's table (same ops as kernels/cpu/backend_cpu.c). Built whenever nvcc is
// found; at run time it asks for a device and reports plainly when there is none.
#include <cublasLt.h>
#include <cublas_v2.h>
#include <cuda_runtime.h>
#include <nccl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/rng.h"
#include "kernels/backend.h"
#include "kernels/cuda/attention_cuda.h"
#include "kernels/cuda/dense_cuda.h"
#include "kernels/cuda/moe_cuda.h"

// One checking macro per library: records file:line and the library's own error string (STYLE.md "Errors").
#define CUDA_CHECK(call, e)                                                                                    \
    do {                                                                                                       \
        cudaError_t st_ = (call);                                                                              \
        if (st_ != cudaSuccess)                                                                                \
            return err_set((e), MR_EDEVICE, "%s:%d: %s: %s", __FILE__, __LINE__, #call, cudaGetErrorString(st_)); \
    } while (0)

// Device memory in use is read from the driver (total - free: our buffers, cuBLAS workspaces, the scratch of
// dense_cuda.cu and the context); the peak is the most seen after any allocation or query.
static size_t mem_peak;

static size_t mem_used(void) {
    size_t fr = 0, tot = 0;
    if (cudaMemGetInfo(&fr, &tot) != cudaSuccess) return 0;
    size_t u = tot - fr;
    if (u > mem_peak) mem_peak = u;
    return u;
}

static void cuda_mem_stats(size_t *in_use, size_t *peak) {
    *in_use = mem_used();
    *peak = mem_peak;
}

// Dense bf16 tensor-core peaks of the datasheets (FLOP/s, without sparsity), matched on the device name.
static double bf16_peak(const char *name) {
    static const struct {
        const char *key, *also;
        double tflops;
    } parts[] = {
        {"H100", "PCIe", 756.5}, {"H100", "NVL", 835.0}, {"H100", NULL, 989.4}, {"H200", NULL, 989.4},
        {"H800", NULL, 989.4},   {"GH200", NULL, 989.4}, {"A100", NULL, 312.0}, {"A800", NULL, 312.0},
        {"L40S", NULL, 362.1},   {"L4", NULL, 121.0},    {"B200", NULL, 2250.0}, {"A10", NULL, 125.0},
    };
    for (size_t i = 0; i < sizeof parts / sizeof parts[0]; i++)
        if (strstr(name, parts[i].key) && (!parts[i].also || strstr(name, parts[i].also)))
            return parts[i].tflops * 1e12;
    return 0.0;
}

static int cuda_device_info(backend_device_info *out, mr_err *e) {
    int dev = 0, sms = 0, clk = 0, mclk = 0, bus = 0;
    cudaDeviceProp prop;
    CUDA_CHECK(cudaGetDevice(&dev), e);
    CUDA_CHECK(cudaGetDeviceProperties(&prop, dev), e);
    CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev), e);
    CUDA_CHECK(cudaDeviceGetAttribute(&clk, cudaDevAttrClockRate, dev), e);
    CUDA_CHECK(cudaDeviceGetAttribute(&mclk, cudaDevAttrMemoryClockRate, dev), e);
    CUDA_CHECK(cudaDeviceGetAttribute(&bus, cudaDevAttrGlobalMemoryBusWidth, dev), e);
    memset(out, 0, sizeof *out);
    snprintf(out->name, sizeof out->name, "%.90s (sm_%d%d, %d SMs)", prop.name, prop.major, prop.minor, sms);
    out->peak_bf16_flops = bf16_peak(prop.name);
    out->peak_fp32_flops = (double)sms * 128 * 2 * clk * 1e3;
    out->mem_bw = (double)mclk * 1e3 * 2 * bus / 8;
    out->mem_total = prop.totalGlobalMem;
    return MR_OK;
}

// ---- CUDA graphs (the table's graph_run) ----
typedef struct cuda_graph {
    int state; // 0 new, 1 ran once (scratch grown), 2 captured, 3 not capturable: run directly
    unsigned gen;
    cudaGraphExec_t exec;
} cuda_graph;

static void cuda_graph_free(void *h) {
    cuda_graph *g = (cuda_graph *)h;
    if (!g) return;
    if (g->state == 2) cudaGraphExecDestroy(g->exec);
    free(g);
}

static int cuda_graph_run(void **h, int (*body)(void *, mr_err *), void *ctx, int *replayed, mr_err *e) {
    if (replayed) *replayed = 0;
    cuda_graph *g = (cuda_graph *)*h;
    if (!g) {
        if (!(g = (cuda_graph *)calloc(1, sizeof *g))) return body(ctx, e);
        *h = g;
    }
    if (g->state == 2 && g->gen != dense_cuda_scratch_generation()) { // a scratch buffer moved: capture again
        cudaGraphExecDestroy(g->exec);
        g->state = 1;
    }
    if (g->state == 2) {
        CUDA_CHECK(cudaGraphLaunch(g->exec, cudaStreamPerThread), e);
        if (replayed) *replayed = 1;
        return MR_OK;
    }
    if (g->state != 1) { // the first run grows every scratch buffer the body needs; a capture must not
        int rc = body(ctx, e);
        if (rc == MR_OK && g->state == 0) g->state = 1;
        return rc;
    }
    int rc = dense_cuda_take_error(e); // an earlier op's failure is reported, not blamed on the capture
    if (rc) return rc;
    const unsigned gen = dense_cuda_scratch_generation();
    CUDA_CHECK(cudaStreamBeginCapture(cudaStreamPerThread, cudaStreamCaptureModeThreadLocal), e);
    mr_err be;
    memset(&be, 0, sizeof be);
    int brc = body(ctx, &be);
    cudaGraph_t graph = NULL;
    cudaError_t st = cudaStreamEndCapture(cudaStreamPerThread, &graph);
    mr_err noted;
    memset(&noted, 0, sizeof noted);
    if (brc == MR_OK) brc = dense_cuda_take_error(&noted); // a void op that failed while being captured
    if (brc == MR_OK && st == cudaSuccess && graph && dense_cuda_scratch_generation() == gen &&
        cudaGraphInstantiate(&g->exec, graph, 0) == cudaSuccess) {
        cudaGraphDestroy(graph);
        g->gen = gen;
        g->state = 2;
        CUDA_CHECK(cudaGraphLaunch(g->exec, cudaStreamPerThread), e);
        if (replayed) *replayed = 1;
        return MR_OK;
    }
    // Not capturable (or the body failed): forget what the capture noted and run the body directly, now and later.
    if (graph) cudaGraphDestroy(graph);
    cudaGetLastError();
    mr_err drop;
    memset(&drop, 0, sizeof drop);
    dense_cuda_take_error(&drop);
    g->state = 3;
    return body(ctx, e);
}

static void *cuda_alloc(size_t n) {
    void *p = NULL;
    if (cudaMalloc(&p, n ? n : 1) != cudaSuccess) return NULL;
    mem_used();
    return p;
}

static void cuda_free(void *p) {
    if (p) cudaFree(p);
}

static int cuda_to_device(void *dst, const void *src, size_t n, mr_err *e) {
    CUDA_CHECK(cudaMemcpy(dst, src, n, cudaMemcpyHostToDevice), e);
    return MR_OK;
}

static int cuda_to_host(void *dst, const void *src, size_t n, mr_err *e) {
    CUDA_CHECK(cudaMemcpy(dst, src, n, cudaMemcpyDeviceToHost), e);
    return MR_OK;
}

// Also reports the first failure of the table's void ops since the last sync (dense_cuda.h).
static int cuda_sync(mr_err *e) {
    CUDA_CHECK(cudaDeviceSynchronize(), e);
    return dense_cuda_take_error(e);
}

// mean + std·z rounded twice, as core/rng.c's ISO C (which never contracts); plain `mean + std * z` would be fused
// into one FMA by nvcc (--fmad=true), giving other bits for ~1.7% of the draws (found on tests/cuemu, which fuses
// as nvcc does).
__global__ static void fill_normal_kernel(float *x, size_t n, float mean, float std, uint64_t seed, uint64_t stream) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
        x[i] = __fadd_rn(mean, __fmul_rn(std, rng_normal_at(seed, stream, i)));
}

static int cuda_fill_normal(float *x, size_t n, float mean, float std, uint64_t seed, uint64_t stream, mr_err *e) {
    if (n == 0) return MR_OK;
    size_t blocks = (n + 255) / 256;
    if (blocks > 65535) blocks = 65535;
    fill_normal_kernel<<<(unsigned)blocks, 256>>>(x, n, mean, std, seed, stream);
    CUDA_CHECK(cudaGetLastError(), e);
    return MR_OK;
}

__global__ static void axpy_kernel(float *y, const float *x, float a, size_t n) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
        y[i] += a * x[i];
}

static int cuda_axpy(float *y, const float *x, float a, size_t n, mr_err *e) {
    if (n == 0) return MR_OK;
    size_t blocks = (n + 255) / 256;
    if (blocks > 65535) blocks = 65535;
    axpy_kernel<<<(unsigned)blocks, 256>>>(y, x, a, n);
    CUDA_CHECK(cudaGetLastError(), e);
    return MR_OK;
}

// The memory ops between kernels: void in the table, so a failure is noted for the next sync (dense_cuda.h).
static void cuda_zero(void *p, size_t n) {
    cudaError_t st = cudaMemsetAsync(p, 0, n, 0);
    if (st != cudaSuccess) dense_cuda_note_error(__FILE__, __LINE__, "cudaMemsetAsync", cudaGetErrorString(st));
}

static void cuda_copy2d(float *dst, size_t dpitch, const float *src, size_t spitch, size_t width, size_t rows) {
    if (!width || !rows) return;
    cudaError_t st = cudaMemcpy2DAsync(dst, dpitch * sizeof(float), src, spitch * sizeof(float),
                                       width * sizeof(float), rows, cudaMemcpyDeviceToDevice, 0);
    if (st != cudaSuccess) dense_cuda_note_error(__FILE__, __LINE__, "cudaMemcpy2DAsync", cudaGetErrorString(st));
}

__global__ static void scale_kernel(float *x, float s, size_t n) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
        x[i] = __fmul_rn(x[i], s);
}

static void cuda_scale(float *x, float s, size_t n) {
    if (n == 0) return;
    size_t blocks = (n + 255) / 256;
    if (blocks > 65535) blocks = 65535;
    scale_kernel<<<(unsigned)blocks, 256>>>(x, s, n);
    cudaError_t st = cudaGetLastError();
    if (st != cudaSuccess) dense_cuda_note_error(__FILE__, __LINE__, "launch of scale_kernel", cudaGetErrorString(st));
}

// The optimizer's ops: e may be NULL (the optimizer calls them entry by entry and checks at the next sync).
static int cuda_adamw_op(float *data, const float *grad, float *m, float *v, size_t n, double beta1, double beta2,
                         double eps, double weight_decay, int64_t step, double lr, mr_err *e) {
    mr_err le = {};
    int rc = cuda_adamw_update(data, grad, m, v, n, beta1, beta2, eps, weight_decay, step, lr, &le);
    if (rc) {
        dense_cuda_note_error(__FILE__, __LINE__, "adamw_update", le.msg);
        if (e) *e = le;
    }
    return rc;
}

static int cuda_sumsq_op(double *sumsq, const float *g, size_t n, mr_err *e) {
    mr_err le = {};
    int rc = cuda_grad_sumsq(sumsq, g, n, &le);
    if (rc) {
        dense_cuda_note_error(__FILE__, __LINE__, "grad_sumsq", le.msg);
        if (e) *e = le;
    }
    return rc;
}

static backend make_cuda_backend() {
    backend b = {};
    b.kind = BACKEND_CUDA;
    b.name = "cuda";
    b.alloc = cuda_alloc;
    b.free = cuda_free;
    b.to_device = cuda_to_device;
    b.to_host = cuda_to_host;
    b.sync = cuda_sync;
    b.fill_normal = cuda_fill_normal;
    b.axpy = cuda_axpy;
    b.zero = cuda_zero;
    b.copy2d = cuda_copy2d;
    b.scale = cuda_scale;
    b.adamw_update = cuda_adamw_op;
    b.grad_sumsq = cuda_sumsq_op;
    // The model's ops: dense (dense_cuda.cu), attention (attention_cuda.cu; sliding-window attention is an entry
    // that returns MR_EDEVICE "not implemented on CUDA"), MoE (moe_cuda.cu; its moe_saved / moe_work must come from
    // backend_moe_saved_init / backend_moe_work_init, which put the buffers on the device).
    b.matmul_forward = cuda_matmul_forward;
    b.matmul_backward = cuda_matmul_backward;
    b.rmsnorm_forward = cuda_rmsnorm_forward;
    b.rmsnorm_backward = cuda_rmsnorm_backward;
    b.swiglu_forward = cuda_swiglu_forward;
    b.swiglu_backward = cuda_swiglu_backward;
    b.embedding_forward = cuda_embedding_forward;
    b.embedding_backward = cuda_embedding_backward;
    b.xent_forward_backward = cuda_xent_forward_backward;
    b.rope_forward = cuda_rope_forward;
    b.rope_backward = cuda_rope_backward;
    b.attention_forward = cuda_attention_forward;
    b.attention_backward = cuda_attention_backward;
    b.attention_swa_forward = cuda_attention_swa_forward;
    b.attention_swa_backward = cuda_attention_swa_backward;
    b.moe_forward = cuda_moe_forward;
    b.moe_backward = cuda_moe_backward;
    b.moe_balance_loss = cuda_moe_balance_loss;
    // Absorbed attention over the latent caches: the rollout's decode, and in MM_DET the training forward too
    // (det_absorbed 1: the same kernel per row; with the MoE's MM_DET direct path giving the dispatch path's bits,
    // the rollout's log-probs equal the trainer's bit for bit on CUDA as on the CPU). MM_FAST trains with flash
    // attention.
    b.mla_absorbed = cuda_mla_absorbed;
    b.det_absorbed = 1;
    b.set_gemm_bf16 = dense_cuda_set_bf16;
    b.mem_stats = cuda_mem_stats;
    b.device_info = cuda_device_info;
    b.kv_append = cuda_kv_append;
    b.mla_rows = cuda_mla_rows;
    b.graph_run = cuda_graph_run;
    b.graph_free = cuda_graph_free;
    return b;
}
static const backend cuda_backend = make_cuda_backend();

extern "C" const backend *backend_cuda(mr_err *e) {
    int count = 0;
    cudaError_t st = cudaGetDeviceCount(&count);
    if (st != cudaSuccess) {
        err_set(e, MR_EDEVICE, "device 'cuda': no usable CUDA device (%s)", cudaGetErrorString(st));
        return NULL;
    }
    if (count == 0) {
        err_set(e, MR_EDEVICE, "device 'cuda': no CUDA device found");
        return NULL;
    }
    return &cuda_backend;
}

extern "C" void backend_cuda_describe(char *buf, size_t n) {
    int rt = 0, count = 0;
    cudaRuntimeGetVersion(&rt);
    cudaError_t st = cudaGetDeviceCount(&count);
    size_t lt = cublasLtGetVersion();
    int cb_major = 0, cb_minor = 0;
    cublasGetProperty(MAJOR_VERSION, &cb_major);
    cublasGetProperty(MINOR_VERSION, &cb_minor);
    int nccl = 0;
    ncclGetVersion(&nccl);
    char dev[400];
    if (st != cudaSuccess || count == 0) {
        snprintf(dev, sizeof dev, "no device: %s", st != cudaSuccess ? cudaGetErrorString(st) : "none found");
    } else {
        cudaDeviceProp prop;
        cudaGetDeviceProperties(&prop, 0);
        snprintf(dev, sizeof dev, "%d device(s), 0: %s sm_%d%d", count, prop.name, prop.major, prop.minor);
    }
    snprintf(buf, n, "CUDA runtime %d.%d, cuBLAS %d.%d, cuBLASLt %zu, NCCL %d.%d.%d; %s", rt / 1000,
             (rt % 1000) / 10, cb_major, cb_minor, lt,
             nccl / 10000, (nccl / 100) % 100, nccl % 100, dev);
}
