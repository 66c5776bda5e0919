/* backend.c: picking a backend by name. */
#include "kernels/backend.h"

#include <stdio.h>
#include <string.h>

#include "kernels/cpu/backend_guarded.h"

#ifdef MOERL_HAVE_CUDA
#include "kernels/cuda/moe_cuda.h"
#endif

int backend_get(const char *name, const backend **out, mr_err *e) {
    *out = NULL;
    if (!strcmp(name, "cpu")) {
        *out = backend_cpu();
        return MR_OK;
    }
    if (!strcmp(name, "cpu-guarded")) {
        *out = backend_guarded();
        return MR_OK;
    }
    if (!strcmp(name, "cuda")) {
#ifdef MOERL_HAVE_CUDA
        *out = backend_cuda(e);
        return *out ? MR_OK : e->code;
#else
        return err_set(e, MR_EDEVICE, "device 'cuda': this moerl was built without the CUDA backend (no nvcc at "
                                      "build time)");
#endif
    }
    return err_set(e, MR_EINVAL, "device: expected cpu, cuda or cpu-guarded, got \"%s\"", name);
}

void backend_describe(char *buf, size_t n) {
#ifdef MOERL_HAVE_CUDA
    char cuda[256];
    backend_cuda_describe(cuda, sizeof cuda);
    snprintf(buf, n, "backends: cpu (OpenMP + OpenBLAS), cuda (%s)", cuda);
#else
    snprintf(buf, n, "backends: cpu (OpenMP + OpenBLAS); cuda not built (no nvcc at build time)");
#endif
}

int backend_has_model_ops(const backend *b) {
    return b->matmul_forward && b->matmul_backward && b->rmsnorm_forward && b->rmsnorm_backward &&
           b->swiglu_forward && b->swiglu_backward && b->embedding_forward && b->embedding_backward &&
           b->xent_forward_backward && b->rope_forward && b->rope_backward && b->attention_forward &&
           b->attention_backward && b->attention_swa_forward &&
           b->attention_swa_backward && b->moe_forward && b->moe_backward && b->moe_balance_loss && b->zero &&
           b->copy2d && b->scale && b->adamw_update && b->grad_sumsq;
}

int backend_moe_saved_init(const backend *b, moe_saved *s, const moe_cfg *c, int T_max, mr_err *e) {
#ifdef MOERL_HAVE_CUDA
    if (b->kind == BACKEND_CUDA) return cuda_moe_saved_init(s, c, T_max, e);
#endif
    if (b->kind == BACKEND_GUARDED) return guarded_moe_saved_init(s, c, T_max, e);
    return moe_saved_init(s, c, T_max, e);
}

int backend_moe_work_init(const backend *b, moe_work *w, const moe_cfg *c, int T_max, mr_err *e) {
#ifdef MOERL_HAVE_CUDA
    if (b->kind == BACKEND_CUDA) return cuda_moe_work_init(w, c, T_max, e);
#endif
    if (b->kind == BACKEND_GUARDED) return guarded_moe_work_init(w, c, T_max, e);
    return moe_work_init(w, c, T_max, e);
}
