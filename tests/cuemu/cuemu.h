/* cuemu.h: a CPU emulation of the CUDA execution model, for checking kernels/cuda on machines without a GPU.
 *
 * The CUDA backend's sources (the .cu files of kernels/cuda) are compiled as C++ against this header (moerl_emu_lib;
 * tests/cuemu/translate.cmake rewrites `k<<<grid, block, smem>>>(args)` into `cuemu_launch(k, "k", grid, block,
 * smem)(args)` and `extern __shared__ T a[];` into a pointer to the block's dynamic shared memory). Each CUDA thread
 * is a fiber; __syncthreads and the warp intrinsics (__shfl*_sync, __any_sync, __ballot_sync) are real barriers over
 * the threads they name. What the emulator catches, that a read of the code does not:
 *   - index errors: every cudaMalloc ends at a guard page, and device memory is PROT_NONE outside kernels and
 *     copies, so a kernel reading past a buffer, or host code dereferencing a device pointer, faults and is named;
 *   - reads of memory no kernel wrote: cudaMalloc fills with 0xff bytes (NaN, or -1), dynamic shared memory is NaN;
 *   - barrier errors: a warp op whose mask names a lane that exited or waits elsewhere, a shuffle from a lane outside
 *     the mask, a block that deadlocks (threads at different barriers) are reported with kernel, block and thread;
 *   - launch errors: block size, grid size, dynamic shared memory above 48 KiB without cudaFuncSetAttribute;
 *   - graph capture: launches, memsets and cuBLAS calls are recorded with their arguments by value and replayed by
 *     cudaGraphLaunch; a synchronizing call (cudaMemcpy, cudaMalloc, cudaFree, cudaDeviceSynchronize) inside a
 *     capture invalidates it, as on a GPU;
 *   - cuBLAS argument errors (leading dimensions, pointers that are not device memory or too short).
 * And it does not give the CPU's bits where a GPU would not: a*b+c in device code is fused into an FMA as nvcc
 * does (the __*_rn intrinsics never are), expf/logf/log/cos are off glibc's bits by up to an ulp, and the GEMMs sum
 * in a shape-dependent order (cuemu.cpp). It cannot say what a GPU's own results are, nor anything of speed;
 * threads that do not meet at a barrier run in one fixed order here, so a race between them may go unseen. */
#ifndef MOERL_TESTS_CUEMU_H
#define MOERL_TESTS_CUEMU_H

#ifndef __cplusplus
#error "cuemu.h is for the C++ compilation of kernels/cuda"
#endif

#ifndef __CUDACC__
#define __CUDACC__ 1 /* what nvcc defines: moerl's shared headers (core/rng.h, dense_cuda.h) key on it */
#endif
#define MOERL_CUEMU 1

#include <math.h>
#include <stddef.h>
#include <stdlib.h>

#include <cmath>
#include <stdint.h>
#include <string.h>

#include <functional>
#include <tuple>
#include <type_traits>
#include <utility>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __shared__ static thread_local /* blocks run one at a time per OS thread */
#define __restrict__ __restrict
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))

// ---------------------------------------------------------------------------------------------------------------
// Runtime types (the subset moerl uses)
// ---------------------------------------------------------------------------------------------------------------

struct uint3 {
    unsigned x, y, z;
};
struct dim3 {
    unsigned x, y, z;
    dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

typedef enum cudaError {
    cudaSuccess = 0,
    cudaErrorInvalidValue = 1,
    cudaErrorMemoryAllocation = 2,
    cudaErrorInvalidConfiguration = 9,
    cudaErrorInvalidDevicePointer = 17,
    cudaErrorNoDevice = 100,
    cudaErrorLaunchFailure = 719,
    cudaErrorStreamCaptureUnsupported = 900,
    cudaErrorStreamCaptureInvalidated = 901,
    cudaErrorStreamCaptureImplicit = 906,
    cudaErrorIllegalState = 401,
} cudaError_t;

typedef struct cuemu_stream *cudaStream_t;
#define cudaStreamLegacy ((cudaStream_t)0x1)
#define cudaStreamPerThread ((cudaStream_t)0x2)
typedef struct cuemu_graph *cudaGraph_t;
typedef struct cuemu_graph *cudaGraphExec_t;

enum cudaMemcpyKind {
    cudaMemcpyHostToHost = 0,
    cudaMemcpyHostToDevice = 1,
    cudaMemcpyDeviceToHost = 2,
    cudaMemcpyDeviceToDevice = 3,
    cudaMemcpyDefault = 4
};
enum cudaStreamCaptureMode {
    cudaStreamCaptureModeGlobal = 0,
    cudaStreamCaptureModeThreadLocal = 1,
    cudaStreamCaptureModeRelaxed = 2
};
enum cudaDeviceAttr {
    cudaDevAttrClockRate = 13,
    cudaDevAttrMultiProcessorCount = 16,
    cudaDevAttrMemoryClockRate = 36,
    cudaDevAttrGlobalMemoryBusWidth = 37
};
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };

struct cudaDeviceProp {
    char name[256];
    size_t totalGlobalMem;
    int major, minor;
    int multiProcessorCount;
};

const char *cudaGetErrorString(cudaError_t e);
cudaError_t cudaGetLastError(void);
cudaError_t cudaPeekAtLastError(void);
cudaError_t cudaGetDeviceCount(int *n);
cudaError_t cudaGetDevice(int *d);
cudaError_t cudaGetDeviceProperties(cudaDeviceProp *p, int dev);
cudaError_t cudaDeviceGetAttribute(int *v, cudaDeviceAttr a, int dev);
cudaError_t cudaRuntimeGetVersion(int *v);
cudaError_t cudaDeviceSynchronize(void);
cudaError_t cudaStreamSynchronize(cudaStream_t s);
cudaError_t cudaMalloc(void **p, size_t n);
template <typename T> static inline cudaError_t cudaMalloc(T **p, size_t n) { return cudaMalloc((void **)p, n); }
cudaError_t cudaFree(void *p);
cudaError_t cudaMemGetInfo(size_t *free_b, size_t *total_b);
cudaError_t cudaMemcpy(void *dst, const void *src, size_t n, cudaMemcpyKind kind);
cudaError_t cudaMemcpyAsync(void *dst, const void *src, size_t n, cudaMemcpyKind kind, cudaStream_t s = 0);
cudaError_t cudaMemcpy2DAsync(void *dst, size_t dpitch, const void *src, size_t spitch, size_t width, size_t rows,
                              cudaMemcpyKind kind, cudaStream_t s = 0);
cudaError_t cudaMemsetAsync(void *p, int v, size_t n, cudaStream_t s = 0);
cudaError_t cudaMemset(void *p, int v, size_t n);
cudaError_t cudaStreamBeginCapture(cudaStream_t s, cudaStreamCaptureMode mode);
cudaError_t cudaStreamEndCapture(cudaStream_t s, cudaGraph_t *g);
cudaError_t cudaGraphInstantiate(cudaGraphExec_t *exec, cudaGraph_t g, unsigned long long flags);
cudaError_t cudaGraphLaunch(cudaGraphExec_t exec, cudaStream_t s);
cudaError_t cudaGraphDestroy(cudaGraph_t g);
cudaError_t cudaGraphExecDestroy(cudaGraphExec_t g);
cudaError_t cuemu_func_set_smem(const void *fn, int bytes);
template <typename F> static inline cudaError_t cudaFuncSetAttribute(F *fn, cudaFuncAttribute a, int v) {
    if (a != cudaFuncAttributeMaxDynamicSharedMemorySize) return cudaErrorInvalidValue;
    return cuemu_func_set_smem((const void *)fn, v);
}

// ---------------------------------------------------------------------------------------------------------------
// Device side: thread indices, barriers, warp intrinsics, atomics, the __*_rn arithmetic
// ---------------------------------------------------------------------------------------------------------------

struct cuemu_ids {
    uint3 threadIdx, blockIdx;
    dim3 blockDim, gridDim;
};
extern thread_local const cuemu_ids *cuemu_cur; // the running fiber's
#define threadIdx (cuemu_cur->threadIdx)
#define blockIdx (cuemu_cur->blockIdx)
#define blockDim (cuemu_cur->blockDim)
#define gridDim (cuemu_cur->gridDim)
#define warpSize 32

void __syncthreads(void);
void *cuemu_dyn_smem(void);

enum { CUEMU_SHFL_IDX, CUEMU_SHFL_UP, CUEMU_SHFL_DOWN, CUEMU_SHFL_XOR, CUEMU_ANY, CUEMU_ALL, CUEMU_BALLOT, CUEMU_SYNCWARP };
uint64_t cuemu_warp_op(int kind, unsigned mask, uint64_t bits, int arg, int width);

template <typename T> static inline uint64_t cuemu_bits(T v) {
    static_assert(sizeof(T) <= 8 && std::is_trivially_copyable<T>::value, "shuffle of a type over 8 bytes");
    uint64_t b = 0;
    memcpy(&b, &v, sizeof v);
    return b;
}
template <typename T> static inline T cuemu_unbits(uint64_t b) {
    T v;
    memcpy(&v, &b, sizeof v);
    return v;
}
template <typename T> static inline T __shfl_sync(unsigned mask, T v, int src, int width = 32) {
    return cuemu_unbits<T>(cuemu_warp_op(CUEMU_SHFL_IDX, mask, cuemu_bits(v), src, width));
}
template <typename T> static inline T __shfl_up_sync(unsigned mask, T v, unsigned d, int width = 32) {
    return cuemu_unbits<T>(cuemu_warp_op(CUEMU_SHFL_UP, mask, cuemu_bits(v), (int)d, width));
}
template <typename T> static inline T __shfl_down_sync(unsigned mask, T v, unsigned d, int width = 32) {
    return cuemu_unbits<T>(cuemu_warp_op(CUEMU_SHFL_DOWN, mask, cuemu_bits(v), (int)d, width));
}
template <typename T> static inline T __shfl_xor_sync(unsigned mask, T v, int lm, int width = 32) {
    return cuemu_unbits<T>(cuemu_warp_op(CUEMU_SHFL_XOR, mask, cuemu_bits(v), lm, width));
}
static inline int __any_sync(unsigned mask, int p) { return (int)cuemu_warp_op(CUEMU_ANY, mask, p != 0, 0, 32); }
static inline int __all_sync(unsigned mask, int p) { return (int)cuemu_warp_op(CUEMU_ALL, mask, p != 0, 0, 32); }
static inline unsigned __ballot_sync(unsigned mask, int p) {
    return (unsigned)cuemu_warp_op(CUEMU_BALLOT, mask, p != 0, 0, 32);
}
static inline void __syncwarp(unsigned mask = 0xffffffffu) { cuemu_warp_op(CUEMU_SYNCWARP, mask, 0, 0, 32); }

// Integer atomics are real atomics (blocks may run on several OS threads); float ones are a CAS loop.
static inline int atomicAdd(int *p, int v) { return __atomic_fetch_add(p, v, __ATOMIC_RELAXED); }
static inline unsigned atomicAdd(unsigned *p, unsigned v) { return __atomic_fetch_add(p, v, __ATOMIC_RELAXED); }
static inline unsigned long long atomicAdd(unsigned long long *p, unsigned long long v) {
    return __atomic_fetch_add(p, v, __ATOMIC_RELAXED);
}
static inline float atomicAdd(float *p, float v) {
    float old, nv;
    __atomic_load(p, &old, __ATOMIC_RELAXED);
    do {
        nv = old + v;
    } while (!__atomic_compare_exchange(p, &old, &nv, 0, __ATOMIC_RELAXED, __ATOMIC_RELAXED));
    return old;
}
static inline int atomicMin(int *p, int v) {
    int old = __atomic_load_n(p, __ATOMIC_RELAXED);
    while (v < old && !__atomic_compare_exchange_n(p, &old, v, 0, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) {
    }
    return old;
}
static inline int atomicMax(int *p, int v) {
    int old = __atomic_load_n(p, __ATOMIC_RELAXED);
    while (v > old && !__atomic_compare_exchange_n(p, &old, v, 0, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) {
    }
    return old;
}

// The __*_rn intrinsics: one IEEE rounding each, and never merged into a fused multiply-add, as nvcc promises. The
// emulation is built like nvcc's default (--fmad=true): with -ffp-contract=fast and FMA instructions where the
// build machine has them, so plain a*b+c in device code is fused here as on a GPU; the empty asm makes each
// intrinsic's operands and result opaque, so the compiler cannot fuse across one.
#if defined(__x86_64__)
#define CUEMU_OPAQUE(v) __asm__("" : "+x"(v))
#else
#define CUEMU_OPAQUE(v) __asm__("" : "+w"(v))
#endif
template <typename T> static inline T cuemu_rn_add(T a, T b) {
    CUEMU_OPAQUE(a);
    CUEMU_OPAQUE(b);
    T r = a + b;
    CUEMU_OPAQUE(r);
    return r;
}
template <typename T> static inline T cuemu_rn_sub(T a, T b) {
    CUEMU_OPAQUE(a);
    CUEMU_OPAQUE(b);
    T r = a - b;
    CUEMU_OPAQUE(r);
    return r;
}
template <typename T> static inline T cuemu_rn_mul(T a, T b) {
    CUEMU_OPAQUE(a);
    CUEMU_OPAQUE(b);
    T r = a * b;
    CUEMU_OPAQUE(r);
    return r;
}
static inline float __fadd_rn(float a, float b) { return cuemu_rn_add(a, b); }
static inline float __fsub_rn(float a, float b) { return cuemu_rn_sub(a, b); }
static inline float __fmul_rn(float a, float b) { return cuemu_rn_mul(a, b); }
static inline float __fdiv_rn(float a, float b) { return a / b; }
static inline float __fsqrt_rn(float a) { return sqrtf(a); }
static inline float __frcp_rn(float a) { return 1.0f / a; }
static inline float __fmaf_rn(float a, float b, float c) { return fmaf(a, b, c); }
static inline double __dadd_rn(double a, double b) { return cuemu_rn_add(a, b); }
static inline double __dsub_rn(double a, double b) { return cuemu_rn_sub(a, b); }
static inline double __dmul_rn(double a, double b) { return cuemu_rn_mul(a, b); }
static inline double __ddiv_rn(double a, double b) { return a / b; }
static inline unsigned __float_as_uint(float f) { return cuemu_unbits<unsigned>(cuemu_bits(f)); }
static inline float __uint_as_float(unsigned u) { return cuemu_unbits<float>(cuemu_bits(u)); }
static inline int __float_as_int(float f) { return cuemu_unbits<int>(cuemu_bits(f)); }
static inline float __int_as_float(int u) { return cuemu_unbits<float>(cuemu_bits(u)); }
static inline int __popc(unsigned x) { return __builtin_popcount(x); }
static inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
static inline int __clz(int x) { return x ? __builtin_clz((unsigned)x) : 32; }
static inline int __ffs(int x) { return __builtin_ffs(x); }

// Device libm: CUDA's expf/logf and double log/cos are not glibc's (expf within 2 ulp of the exact result, logf 1,
// log 1, cos 2). The emulation gives glibc's result moved by -1, 0 or +1 ulp, picked by a hash of the argument, so a
// test that asks a GPU for the CPU's bits through these functions fails here too. CUEMU_LIBM=exact turns it off.
extern int cuemu_libm_jitter;
static inline uint64_t cuemu_hash(uint64_t x) {
    x ^= x >> 33;
    x *= 0xff51afd7ed558ccdull;
    x ^= x >> 33;
    x *= 0xc4ceb9fe1a85ec53ull;
    return x ^ (x >> 33);
}
template <typename T> static inline T cuemu_jitter(T r, uint64_t arg_bits, uint64_t fn) {
    if (!cuemu_libm_jitter || !isfinite(r) || r == 0) return r;
    const int k = (int)(cuemu_hash(arg_bits * 4 + fn) % 3) - 1;
    if (k == 0) return r;
    T n = k > 0 ? nextafter(r, (T)INFINITY) : nextafter(r, -(T)INFINITY);
    return isfinite(n) ? n : r;
}
static inline float cuemu_dev_expf(float x) { return cuemu_jitter(::expf(x), cuemu_bits(x), 0); }
static inline float cuemu_dev_logf(float x) { return cuemu_jitter(::logf(x), cuemu_bits(x), 1); }
static inline double cuemu_dev_log(double x) { return cuemu_jitter(::log(x), cuemu_bits(x), 2); }
static inline double cuemu_dev_cos(double x) { return cuemu_jitter(::cos(x), cuemu_bits(x), 3); }

template <typename A, typename B> static inline typename std::common_type<A, B>::type min(A a, B b) {
    return a < b ? a : b;
}
template <typename A, typename B> static inline typename std::common_type<A, B>::type max(A a, B b) {
    return a > b ? a : b;
}

// bf16: storage type and round-to-nearest-even conversion (NaN kept quiet).
struct __nv_bfloat16 {
    uint16_t x;
};
static inline __nv_bfloat16 __float2bfloat16_rn(float f) {
    uint32_t u = __float_as_uint(f);
    __nv_bfloat16 r;
    if ((u & 0x7fffffffu) > 0x7f800000u) {
        r.x = (uint16_t)((u >> 16) | 0x40u);
        return r;
    }
    u += 0x7fffu + ((u >> 16) & 1u);
    r.x = (uint16_t)(u >> 16);
    return r;
}
static inline float __bfloat162float(__nv_bfloat16 b) { return __uint_as_float((uint32_t)b.x << 16); }

// ---------------------------------------------------------------------------------------------------------------
// Launch: cuemu_launch(k, "k", grid, block, smem, stream)(args...) copies the arguments by value (as a launch does)
// and runs the grid now, or records it into the graph being captured.
// ---------------------------------------------------------------------------------------------------------------

void cuemu_submit(const void *fn, const char *name, dim3 grid, dim3 block, size_t smem, std::function<void()> body);

template <typename... P> struct cuemu_launcher {
    void (*fn)(P...);
    const char *name;
    dim3 grid, block;
    size_t smem;
    template <typename... A> void operator()(A &&...a) const {
        static_assert(sizeof...(A) == sizeof...(P), "kernel launched with the wrong number of arguments");
        std::tuple<typename std::decay<P>::type...> args(static_cast<typename std::decay<P>::type>(a)...);
        void (*f)(P...) = fn;
        cuemu_submit((const void *)fn, name, grid, block, smem, [f, args]() { std::apply(f, args); });
    }
};
template <typename... P>
static inline cuemu_launcher<P...> cuemu_launch(void (*fn)(P...), const char *name, dim3 grid, dim3 block,
                                                size_t smem = 0, cudaStream_t stream = 0) {
    (void)stream; // one stream: everything is ordered, as on the per-thread default stream
    return cuemu_launcher<P...>{fn, name, grid, block, smem};
}

// ---------------------------------------------------------------------------------------------------------------
// cuBLAS / cuBLASLt / NCCL (the calls moerl makes)
// ---------------------------------------------------------------------------------------------------------------

typedef struct cuemu_cublas *cublasHandle_t;
typedef enum {
    CUBLAS_STATUS_SUCCESS = 0,
    CUBLAS_STATUS_NOT_INITIALIZED = 1,
    CUBLAS_STATUS_ALLOC_FAILED = 3,
    CUBLAS_STATUS_INVALID_VALUE = 7,
    CUBLAS_STATUS_EXECUTION_FAILED = 13,
    CUBLAS_STATUS_NOT_SUPPORTED = 15,
} cublasStatus_t;
typedef enum { CUBLAS_OP_N = 0, CUBLAS_OP_T = 1, CUBLAS_OP_C = 2 } cublasOperation_t;
typedef enum { CUBLAS_DEFAULT_MATH = 0, CUBLAS_TF32_TENSOR_OP_MATH = 3, CUBLAS_PEDANTIC_MATH = 2 } cublasMath_t;
typedef enum { CUBLAS_ATOMICS_NOT_ALLOWED = 0, CUBLAS_ATOMICS_ALLOWED = 1 } cublasAtomicsMode_t;
typedef enum { CUDA_R_32F = 0, CUDA_R_16BF = 14 } cudaDataType;
typedef enum { CUBLAS_COMPUTE_32F = 68, CUBLAS_COMPUTE_32F_FAST_16BF = 75 } cublasComputeType_t;
typedef enum { CUBLAS_GEMM_DEFAULT = -1 } cublasGemmAlgo_t;
typedef enum { MAJOR_VERSION = 0, MINOR_VERSION = 1, PATCH_LEVEL = 2 } libraryPropertyType;

cublasStatus_t cublasCreate(cublasHandle_t *h);
cublasStatus_t cublasDestroy(cublasHandle_t h);
cublasStatus_t cublasSetStream(cublasHandle_t h, cudaStream_t s);
cublasStatus_t cublasSetMathMode(cublasHandle_t h, cublasMath_t m);
cublasStatus_t cublasSetAtomicsMode(cublasHandle_t h, cublasAtomicsMode_t m);
cublasStatus_t cublasSetWorkspace(cublasHandle_t h, void *ws, size_t bytes);
cublasStatus_t cublasGetProperty(libraryPropertyType t, int *v);
const char *cublasGetStatusString(cublasStatus_t s);
cublasStatus_t cublasSgemm(cublasHandle_t h, cublasOperation_t ta, cublasOperation_t tb, int m, int n, int k,
                           const float *alpha, const float *A, int lda, const float *B, int ldb, const float *beta,
                           float *C, int ldc);
cublasStatus_t cublasGemmEx(cublasHandle_t h, cublasOperation_t ta, cublasOperation_t tb, int m, int n, int k,
                            const void *alpha, const void *A, cudaDataType at, int lda, const void *B, cudaDataType bt,
                            int ldb, const void *beta, void *C, cudaDataType ct, int ldc, cublasComputeType_t compute,
                            cublasGemmAlgo_t algo);
size_t cublasLtGetVersion(void);
typedef enum { ncclSuccess = 0 } ncclResult_t;
ncclResult_t ncclGetVersion(int *v);

// Device code calls the device libm (every .cu function is compiled as device code here; moerl's .cu files call
// these only in kernels).
#define expf(x) cuemu_dev_expf(x)
#define logf(x) cuemu_dev_logf(x)
#define log(x) cuemu_dev_log(x)
#define cos(x) cuemu_dev_cos(x)

#endif
