/* backend_guarded.h: the guarded backend (backend_get name "cpu-guarded"): the CPU backend's ops on memory that
 * host code cannot touch between ops.
 *
 * The one idea: everything its alloc returns comes from one reserved address range that is mapped PROT_NONE except
 * while one of its ops (or a to_device / to_host copy) runs. Code that reads or writes model memory directly, as if
 * it were host memory, instead of going through the table (what a CUDA device pointer would make a silent bug or a
 * crash on a GPU) gets SIGSEGV at the first touch, on any machine. Its results are the CPU backend's bits, so a
 * model, a trainer or the rollout run on it must match the CPU run exactly: that checks the device code path of
 * everything above kernels/ without a GPU. A debugging backend: slow (two mprotect calls per op), single host
 * thread, memory comes back to the range's free list, never to the system before exit. */
#ifndef MOERL_KERNELS_CPU_BACKEND_GUARDED_H
#define MOERL_KERNELS_CPU_BACKEND_GUARDED_H

#include "core/err.h"
#include "kernels/cpu/moe.h"

/* moe_saved_init / moe_work_init with the buffers placed as on CUDA (kernels/cuda/moe_cuda.h): off and load in
 * host memory, everything else guarded. Free with moe_saved_free / moe_work_free. */
int guarded_moe_saved_init(moe_saved *s, const moe_cfg *c, int T_max, mr_err *e);
int guarded_moe_work_init(moe_work *w, const moe_cfg *c, int T_max, mr_err *e);

/* Bytes currently allocated from the guarded range (tests check that frees come back). */
size_t guarded_bytes_in_use(void);

#endif
