/* backend.h: the operation table that the model, the rollout and the trainers call through. kernels/cpu is the
 * reference (always built, always tested); kernels/cuda fills the same table whenever nvcc is found at build
 * time (ggml's backend vtable, in miniature). The table grows with the model: each op added here gets a CPU
 * implementation, a CUDA one, and a parity test (tests/gpu_*.c). */
#ifndef MOERL_BACKEND_H
#define MOERL_BACKEND_H

#include <stddef.h>
#include <stdint.h>

#include "core/err.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef enum { BACKEND_CPU = 0, BACKEND_CUDA = 1 } backend_kind;

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
} backend;

/* The backend named "cpu" or "cuda". MR_EDEVICE when CUDA was not built in or no device is present. */
int backend_get(const char *name, const backend **out, mr_err *e);

/* One line describing the build: backends compiled in and library versions (cuBLAS, NCCL when built). */
void backend_describe(char *buf, size_t n);

const backend *backend_cpu(void);
#ifdef MOERL_HAVE_CUDA
/* kernels/cuda: returns NULL and fills e when no device can be used. */
const backend *backend_cuda(mr_err *e);
void backend_cuda_describe(char *buf, size_t n);
#endif

#ifdef __cplusplus
}
#endif

#endif
