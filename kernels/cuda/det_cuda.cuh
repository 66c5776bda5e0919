/* det_cuda.cuh: the MM_DET dot product on the device (kernels/cpu/dense.h's fixed order), shared by the kernels
 * that must give the bits of cuda_matmul_forward's MM_DET path element for element (dense_cuda.cu, moe_cuda.cu). */
#ifndef MOERL_KERNELS_CUDA_DET_CUDA_CUH
#define MOERL_KERNELS_CUDA_DET_CUDA_CUH

#define DET_CUDA_LANES 16 /* dense.h's DET_LANES */

/* dense.h's fixed lane tree: ((a[l]+a[l+8]) for l<8, then +[l+4], then (s4[0]+s4[2]) + (s4[1]+s4[3])). */
__device__ static inline float det_tree(const float *a) {
    float s8[8], s4[4];
#pragma unroll
    for (int l = 0; l < 8; l++) s8[l] = __fadd_rn(a[l], a[l + 8]);
#pragma unroll
    for (int l = 0; l < 4; l++) s4[l] = __fadd_rn(s8[l], s8[l + 4]);
    return __fadd_rn(__fadd_rn(s4[0], s4[2]), __fadd_rn(s4[1], s4[3]));
}

/* Σ_i x[i]·w[i] in MM_DET order: lane l is the fused chain over i = l, l + 16, ...; then det_tree. One thread. */
__device__ static inline float det_dot(const float *x, const float *w, int n) {
    float acc[DET_CUDA_LANES];
#pragma unroll
    for (int l = 0; l < DET_CUDA_LANES; l++) acc[l] = 0.0f;
    for (int k0 = 0; k0 < n; k0 += DET_CUDA_LANES) {
        const int m = n - k0 < DET_CUDA_LANES ? n - k0 : DET_CUDA_LANES;
#pragma unroll
        for (int l = 0; l < DET_CUDA_LANES; l++)
            if (l < m) acc[l] = fmaf(x[k0 + l], w[k0 + l], acc[l]);
    }
    return det_tree(acc);
}

#endif
