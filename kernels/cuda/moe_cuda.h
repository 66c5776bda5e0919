/* moe_cuda.h: the MoE ops of the backend table on a CUDA device (kernels/cuda/moe_cuda.cu), and the device
 * versions of moe_saved_init / moe_work_init that they need. Semantics, shapes and the routing rule are those of
 * kernels/cpu/moe.h (router, counting-sort dispatch, one GEMM per expert segment, slot-order combine, backward
 * ACCUMULATING into every gradient, the bias getting none).
 *
 * Where things live:
 *   device  x, out, dx, dout, daff, replay_idx, scores/idx of moe_balance_loss, and every weight and gradient the
 *           pointers of moe_params / moe_grads point to;
 *   host    the structs moe_params, moe_grads, moe_cfg themselves and their arrays of E expert pointers (each
 *           entry a device pointer, or NULL in moe_grads), seq_len and *loss of moe_balance_loss;
 *   moe_saved (cuda_moe_saved_init): off (E + 1) and load (E) are HOST memory (the host launches one GEMM per
 *           expert segment from off; trainers read load), everything else device;
 *   moe_work (cuda_moe_work_init): all device.
 * Free both with moe_saved_free / moe_work_free (their release hook). The ops refuse (MR_EINVAL, or a noted error
 * for the void backward) a moe_saved / moe_work that was not built here.
 *
 * The one idea: the CPU algorithm step by step. Routing runs one thread per token through the same code as
 * moe.c's router (same tie rule: lower group, lower expert wins; discarded groups excluded outright); the dispatch
 * is a device counting sort (integer atomics for the counts, then one block per expert ranks its pairs in
 * ascending pair order with warp ballots), so order/pos/off are exactly the CPU's; every expert runs one cuBLAS
 * (or MM_DET) GEMM over its contiguous segment through kernels/cuda/dense_cuda.h; outputs are combined per token
 * in slot order. No float atomics anywhere: deterministic run to run. moe_forward synchronizes once (off comes
 * back to the host). Not the CPU's bits in general (expf, GEMM orders), the balance loss excepted (it replays the
 * CPU's double-precision sums). One host thread drives this, as dense_cuda.h. */
#ifndef MOERL_KERNELS_CUDA_MOE_CUDA_H
#define MOERL_KERNELS_CUDA_MOE_CUDA_H

#include <stdint.h>

#include "core/err.h"
#include "kernels/cpu/moe.h"

#ifdef __cplusplus
extern "C" {
#endif

/* As moe_saved_init / moe_work_init (same checks and messages), with the buffers placed as above. */
int cuda_moe_saved_init(moe_saved *s, const moe_cfg *c, int T_max, mr_err *e);
int cuda_moe_work_init(moe_work *w, const moe_cfg *c, int T_max, mr_err *e);

int cuda_moe_forward(float *out, moe_saved *s, moe_work *w, const float *x, const int32_t *replay_idx,
                     const moe_params *p, const moe_cfg *c, int T, mr_err *e);
void cuda_moe_backward(float *dx, const moe_grads *g, moe_work *w, const float *dout, const float *daff,
                       const moe_saved *s, const float *x, const moe_params *p, const moe_cfg *c);
int cuda_moe_balance_loss(double *loss, float *daff, const float *scores, const int32_t *idx, const int *seq_len,
                          int n_seq, int T, int E, int K, float alpha, mr_err *e);

#ifdef __cplusplus
}
#endif

#endif
