// test_cuemu.cu: the CPU emulation of CUDA checked against itself (built with moerl_emu_lib, label
// cuemu): what a correct kernel gives, and that each fault the emulation claims to catch is caught (planted bugs:
// an overrun, a host dereference of device memory, warp ops over exited or missing lanes, a deadlock, a missing
// barrier, too much shared memory, a synchronizing call inside a graph capture, a bad cuBLAS leading dimension).
// Written as CUDA: translate.cmake turns it into C++ like kernels/cuda/*.cu.
#undef log // cuemu.h's device-libm macros: Criterion's headers use the name (the kernels here do not need them)
#undef cos
#undef expf
#undef logf
#include <criterion/criterion.h>
#include <cublas_v2.h>
#include <cuda_runtime.h>
#include <math.h>
#include <signal.h>
#include <stdlib.h>

extern "C" long cuemu_graphs_launched(void);

static float *dalloc(size_t n) {
    float *d = NULL;
    cr_assert_eq(cudaMalloc(&d, n * sizeof(float)), cudaSuccess);
    return d;
}

// Block sum: shared-memory tree down to a warp, then shuffles (the usual shape of moerl's reductions).
__global__ static void block_sum_kernel(float *out, const float *x, int n) {
    __shared__ float part[256];
    const int t = threadIdx.x;
    float s = 0.0f;
    for (int i = blockIdx.x * blockDim.x + t; i < n; i += gridDim.x * blockDim.x) s += x[i];
    part[t] = s;
    __syncthreads();
    for (int k = blockDim.x / 2; k >= 32; k /= 2) {
        if (t < k) part[t] += part[t + k];
        __syncthreads();
    }
    if (t < 32) {
        float v = part[t];
        for (int o = 16; o > 0; o /= 2) v += __shfl_xor_sync(0xffffffffu, v, o);
        if (t == 0) out[blockIdx.x] = v;
    }
}

Test(cuemu, a_correct_reduction_gives_the_sum) {
    const int n = 5000, blocks = 3;
    float *h = (float *)malloc(n * sizeof(float)), hout[blocks];
    double ref = 0;
    for (int i = 0; i < n; i++) h[i] = (float)(i % 7) - 3.0f, ref += h[i];
    float *x = dalloc(n), *out = dalloc(blocks);
    cudaMemcpy(x, h, n * sizeof(float), cudaMemcpyHostToDevice);
    block_sum_kernel<<<blocks, 256>>>(out, x, n);
    cr_assert_eq(cudaGetLastError(), cudaSuccess);
    cudaMemcpy(hout, out, sizeof hout, cudaMemcpyDeviceToHost);
    cr_assert_float_eq(hout[0] + hout[1] + hout[2], (float)ref, 1e-3);
    cudaFree(x), cudaFree(out), free(h);
}

__global__ static void copy_kernel(float *y, const float *x, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i <= n) y[i < n ? i : 0] = x[i]; // planted: i == n reads one past the end
}

Test(cuemu, a_read_past_the_end_faults, .signal = SIGSEGV) {
    float *x = dalloc(64), *y = dalloc(64); // 256 bytes: the buffer ends at its guard page
    copy_kernel<<<1, 128>>>(y, x, 64);
}

Test(cuemu, a_host_dereference_of_device_memory_faults, .signal = SIGSEGV) {
    float *x = dalloc(16);
    volatile float *p = x;
    p[3] = 1.0f;
}

Test(cuemu, device_memory_starts_as_nan) {
    float *x = dalloc(4), h[4];
    cudaMemcpy(h, x, sizeof h, cudaMemcpyDeviceToHost);
    for (int i = 0; i < 4; i++) cr_assert(isnan(h[i]), "element %d is %g", i, h[i]);
    cudaFree(x);
}

__global__ static void shfl_after_exit_kernel(float *out) {
    if (threadIdx.x >= 16) return;
    float v = __shfl_xor_sync(0xffffffffu, 1.0f, 1); // planted: lanes 16..31 have exited
    out[threadIdx.x] = v;
}

Test(cuemu, a_warp_op_naming_an_exited_lane_is_reported, .signal = SIGABRT) {
    float *out = dalloc(32);
    shfl_after_exit_kernel<<<1, 32>>>(out);
}

__global__ static void shfl_outside_mask_kernel(float *out) {
    if (threadIdx.x < 16) out[threadIdx.x] = __shfl_down_sync(0xffffu, 2.0f, 8); // lanes 8..15 read 16..23
}

Test(cuemu, a_shuffle_from_outside_the_mask_is_reported, .signal = SIGABRT) {
    float *out = dalloc(32);
    shfl_outside_mask_kernel<<<1, 32>>>(out);
}

__global__ static void half_warp_shfl_kernel(float *out) {
    if (threadIdx.x < 16) out[threadIdx.x] = __shfl_down_sync(0xffffu, (float)threadIdx.x, 8, 16);
}

Test(cuemu, a_half_warp_shuffle_with_width_16_is_fine) {
    float *out = dalloc(32), h[16];
    half_warp_shfl_kernel<<<1, 32>>>(out);
    cudaMemcpy(h, out, sizeof h, cudaMemcpyDeviceToHost);
    for (int l = 0; l < 16; l++) cr_assert_eq(h[l], (float)(l < 8 ? l + 8 : l), "lane %d got %g", l, h[l]);
    cudaFree(out);
}

__global__ static void deadlock_kernel(float *out) {
    if (threadIdx.x < 16) // planted: half the warp waits at the block barrier, the other half for it in a shuffle
        __syncthreads();
    else
        out[0] = __shfl_sync(0xffffffffu, 1.0f, 0);
}

Test(cuemu, a_deadlock_is_reported, .signal = SIGABRT) {
    float *out = dalloc(1);
    deadlock_kernel<<<1, 32>>>(out);
}

__global__ static void missing_barrier_kernel(float *out) {
    extern __shared__ float buf[];
    buf[threadIdx.x] = (float)threadIdx.x;
    // planted: no __syncthreads() here
    out[blockIdx.x * blockDim.x + threadIdx.x] = buf[(threadIdx.x + 1) % blockDim.x];
}

__global__ static void missing_broadcast_barrier_kernel(float *out) {
    __shared__ float s;
    if (threadIdx.x == 0) s = 2.0f * (float)blockIdx.x + 1.0f;
    // planted: no __syncthreads() here
    out[blockIdx.x * blockDim.x + threadIdx.x] = s;
}

// Threads run to their next barrier one after another, first to last in one block and last to first in the next:
// both shapes of a missing barrier show in a two-block launch.
static int wrong_count(void (*launch)(float *), float (*want)(int b, int t)) {
    float *out = dalloc(128), h[128];
    launch(out);
    cudaMemcpy(h, out, sizeof h, cudaMemcpyDeviceToHost);
    cudaFree(out);
    int wrong = 0;
    for (int i = 0; i < 128; i++) wrong += !(h[i] == want(i / 64, i % 64));
    return wrong;
}
static void launch_neighbour(float *out) { missing_barrier_kernel<<<2, 64, 64 * sizeof(float)>>>(out); }
static float want_neighbour(int b, int t) { return (void)b, (float)((t + 1) % 64); }
static void launch_broadcast(float *out) { missing_broadcast_barrier_kernel<<<2, 64>>>(out); }
static float want_broadcast(int b, int t) { return (void)t, 2.0f * (float)b + 1.0f; }

Test(cuemu, a_missing_barrier_reads_what_was_not_yet_written) {
    cr_assert_gt(wrong_count(launch_neighbour, want_neighbour), 0, "reading a neighbour's slot");
    cr_assert_gt(wrong_count(launch_broadcast, want_broadcast), 0, "thread 0's broadcast");
}

Test(cuemu, shared_memory_over_48k_needs_the_attribute) {
    float *out = dalloc(64);
    missing_barrier_kernel<<<1, 64, 64 * 1024>>>(out);
    cr_assert_eq(cudaGetLastError(), cudaErrorInvalidValue);
    cr_assert_eq(cudaFuncSetAttribute(missing_barrier_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, 64 * 1024),
                 cudaSuccess);
    missing_barrier_kernel<<<1, 64, 64 * 1024>>>(out);
    cr_assert_eq(cudaGetLastError(), cudaSuccess);
    missing_barrier_kernel<<<1, 2048>>>(out);
    cr_assert_eq(cudaGetLastError(), cudaErrorInvalidConfiguration);
    cudaFree(out);
}

__global__ static void add_kernel(float *x, float a) { x[threadIdx.x] += a; }

Test(cuemu, graphs_record_arguments_and_replay) {
    float *x = dalloc(4), h[4];
    cudaMemsetAsync(x, 0, 4 * sizeof(float), 0);
    float a = 1.0f;
    cr_assert_eq(cudaStreamBeginCapture(cudaStreamPerThread, cudaStreamCaptureModeThreadLocal), cudaSuccess);
    add_kernel<<<1, 4>>>(x, a);
    a = 100.0f; // the launch copied its arguments: the graph keeps 1
    add_kernel<<<1, 4>>>(x, 2.0f);
    cudaGraph_t g;
    cr_assert_eq(cudaStreamEndCapture(cudaStreamPerThread, &g), cudaSuccess);
    cudaMemcpy(h, x, sizeof h, cudaMemcpyDeviceToHost);
    cr_assert_eq(h[0], 0.0f, "a captured launch ran at capture time");
    cudaGraphExec_t ge;
    cr_assert_eq(cudaGraphInstantiate(&ge, g, 0), cudaSuccess);
    const long before = cuemu_graphs_launched();
    cudaGraphLaunch(ge, cudaStreamPerThread);
    cudaGraphLaunch(ge, cudaStreamPerThread);
    cudaMemcpy(h, x, sizeof h, cudaMemcpyDeviceToHost);
    cr_assert_eq(h[3], 6.0f, "two replays of +1 +2 gave %g", h[3]);
    cr_assert_eq(cuemu_graphs_launched() - before, 2);
    cudaGraphExecDestroy(ge), cudaGraphDestroy(g), cudaFree(x);
}

Test(cuemu, a_synchronizing_call_invalidates_a_capture) {
    float *x = dalloc(4), h[4];
    cr_assert_eq(cudaStreamBeginCapture(cudaStreamPerThread, cudaStreamCaptureModeThreadLocal), cudaSuccess);
    add_kernel<<<1, 4>>>(x, 1.0f);
    cr_assert_eq(cudaMemcpy(h, x, sizeof h, cudaMemcpyDeviceToHost), cudaErrorStreamCaptureUnsupported);
    cudaGraph_t g;
    cr_assert_eq(cudaStreamEndCapture(cudaStreamPerThread, &g), cudaErrorStreamCaptureInvalidated);
    cr_assert_null(g);
    cr_assert_eq(cudaStreamBeginCapture(0, cudaStreamCaptureModeThreadLocal), cudaErrorStreamCaptureUnsupported,
                 "the legacy stream cannot be captured");
    cudaGetLastError();
    cudaFree(x);
}

Test(cuemu, cublas_sgemm_and_its_checks) {
    // column-major C(2x2) = A(2x3) B(3x2)
    const float A[6] = {1, 4, 2, 5, 3, 6}, B[6] = {7, 9, 11, 8, 10, 12}, one = 1.0f, zero = 0.0f;
    float *dA = dalloc(6), *dB = dalloc(6), *dC = dalloc(4), C[4];
    cudaMemcpy(dA, A, sizeof A, cudaMemcpyHostToDevice);
    cudaMemcpy(dB, B, sizeof B, cudaMemcpyHostToDevice);
    cublasHandle_t h;
    cr_assert_eq(cublasCreate(&h), CUBLAS_STATUS_SUCCESS);
    cr_assert_eq(cublasSgemm(h, CUBLAS_OP_N, CUBLAS_OP_N, 2, 2, 3, &one, dA, 2, dB, 3, &zero, dC, 2),
                 CUBLAS_STATUS_SUCCESS);
    cudaMemcpy(C, dC, sizeof C, cudaMemcpyDeviceToHost);
    cr_assert(C[0] == 58 && C[1] == 139 && C[2] == 64 && C[3] == 154, "%g %g %g %g", C[0], C[1], C[2], C[3]);
    cr_assert_eq(cublasSgemm(h, CUBLAS_OP_N, CUBLAS_OP_N, 2, 2, 3, &one, dA, 1, dB, 3, &zero, dC, 2),
                 CUBLAS_STATUS_INVALID_VALUE, "lda < m");
    cr_assert_eq(cublasSgemm(h, CUBLAS_OP_N, CUBLAS_OP_N, 2, 2, 3, &one, A, 2, dB, 3, &zero, dC, 2),
                 CUBLAS_STATUS_INVALID_VALUE, "A in host memory");
    cublasDestroy(h);
    cudaFree(dA), cudaFree(dB), cudaFree(dC);
}

Test(cuemu, device_expf_is_not_glibc_bits) { // CUDA's expf is within 2 ulp, not correctly rounded: nor is this one
    int differ = 0;
    for (int i = 0; i < 1000; i++) {
        const float x = -10.0f + 0.02f * (float)i, d = cuemu_dev_expf(x), c = expf(x);
        cr_assert(fabsf(d - c) <= fabsf(nextafterf(c, INFINITY) - c), "expf(%g): %a vs %a", x, d, c);
        differ += d != c;
    }
    cr_assert(differ > 400 && differ < 900, "%d of 1000 differ from glibc", differ);
}
