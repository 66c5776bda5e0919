/* backend.c: picking a backend by name. */
#include "kernels/backend.h"

#include <stdio.h>
#include <string.h>

#include "core/recipe.h"
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

int backend_set_precision(const backend *b, const char *precision, const char *key, mr_err *e) {
    int bf16 = !strcmp(precision, "bf16");
    if (!bf16 && strcmp(precision, "fp32"))
        return err_set(e, MR_EINVAL, "%s: expected fp32 or bf16, got \"%s\"", key, precision);
    if (!b->set_gemm_bf16) {
        if (bf16)
            return err_set(e, MR_EINVAL,
                           "%s: bf16 GEMMs need a GPU backend (device %s computes in fp32); use fp32 or device cuda",
                           key, b->name);
        return MR_OK;
    }
    b->set_gemm_bf16(bf16);
    return MR_OK;
}

int backend_from_recipe(const recipe *r, const backend **out, mr_err *e) {
    int rc = backend_get(recipe_str(r, "run.device"), out, e);
    if (rc) return err_prefix(e, "%s: run.device", recipe_source(r)), rc;
    if ((rc = backend_set_precision(*out, recipe_str(r, "run.precision"), "run.precision", e)))
        return err_prefix(e, "%s", recipe_source(r)), rc;
    return MR_OK;
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
