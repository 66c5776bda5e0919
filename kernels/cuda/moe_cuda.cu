// moe_cuda.cu: the DeepSeekMoE layer on the GPU (see moe_cuda.h for where every buffer lives).
//
// The one idea: moe.c's algorithm, step for step, with the per-token loops as one thread per token (router, gate
// backward, balance loss) or one warp per row, the dispatch as a device counting sort that reproduces the CPU's
// order exactly, and the expert GEMMs as one dense_cuda matmul per non-empty expert segment. Element-wise steps
// that moe.c writes as a*b + c use __f*_rn / __d*_rn so nvcc does not fuse them (moe.c's ISO C build does not):
// given the same inputs they give the CPU's bits.
#include <cuda_runtime.h>
#include <limits.h>
#include <math.h>
#include <stdio.h>
#include <string.h>

#include "core/mem.h"
#include "kernels/cuda/dense_cuda.h"
#include "kernels/cuda/det_cuda.cuh"
#include "kernels/cuda/moe_cuda.h"

#define FULL 0xffffffffu
#define MOE_NORM_EPS 1e-20f // moe.c's

#define CUDA_RET(call, e)                                                                                      \
    do {                                                                                                       \
        cudaError_t st_ = (call);                                                                              \
        if (st_ != cudaSuccess)                                                                                \
            return err_set((e), MR_EDEVICE, "%s:%d: %s: %s", __FILE__, __LINE__, #call, cudaGetErrorString(st_)); \
    } while (0)
#define LAUNCH_RET(name, e)                                                                                    \
    do {                                                                                                       \
        cudaError_t st_ = cudaGetLastError();                                                                  \
        if (st_ != cudaSuccess)                                                                                \
            return err_set((e), MR_EDEVICE, "%s:%d: launch of %s: %s", __FILE__, __LINE__, name,               \
                           cudaGetErrorString(st_));                                                           \
    } while (0)

static unsigned grid_for(size_t n, unsigned threads) {
    size_t b = (n + threads - 1) / threads;
    if (b == 0) b = 1;
    return (unsigned)(b > 65535 * 16 ? 65535 * 16 : b); // grid-stride loops cover the rest
}

#define GRID_STRIDE(i, n)                                                                                      \
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < (n); i += (size_t)gridDim.x * blockDim.x)

// ------------------------------------------------------------------------------------------------------------
// Buffers (scratch: dense_cuda_scratch's MOE slots)
// ------------------------------------------------------------------------------------------------------------

// Layout helpers and the T_max check: moe.c's (moe.h).

static void saved_release(moe_saved *s) {
    cudaFree(s->mem_f);
    cudaFree(s->mem_i);
    mem_free_aligned(s->mem_h);
    memset(s, 0, sizeof *s);
}

static void work_release(moe_work *w) {
    cudaFree(w->mem);
    memset(w, 0, sizeof *w);
}

extern "C" int cuda_moe_saved_init(moe_saved *s, const moe_cfg *c, int T_max, mr_err *e) {
    memset(s, 0, sizeof *s);
    int rc = moe_check_tmax(c, T_max, "saved state", e);
    if (rc) return rc;
    s->release = saved_release; // from here on moe_saved_free frees whatever was allocated
    size_t T = (size_t)T_max, TK = T * (size_t)c->K, E = (size_t)c->E;
    size_t nf = 0, ni = 0, nh = 0;
    int bad = moe_plan_add(&nf, T * E, sizeof(float)) || moe_plan_add(&nf, TK, sizeof(float)) ||
              moe_plan_add(&nf, TK * (size_t)c->d, sizeof(float)) ||
              moe_plan_add(&nf, TK * (size_t)c->I_e, sizeof(float)) ||
              moe_plan_add(&nf, TK * (size_t)c->I_e, sizeof(float)) ||
              moe_plan_add(&nf, T * (size_t)c->I_s, sizeof(float)) ||
              moe_plan_add(&nf, T * (size_t)c->I_s, sizeof(float));
    bad = bad || moe_plan_add(&ni, TK, sizeof(int32_t)) || moe_plan_add(&ni, TK, sizeof(int32_t)) ||
          moe_plan_add(&ni, TK, sizeof(int32_t));
    bad = bad || moe_plan_add(&nh, E, sizeof(int64_t)) || moe_plan_add(&nh, E + 1, sizeof(int32_t));
    if (bad) {
        moe_saved_free(s);
        return err_set(e, MR_ERANGE, "moe: saved state size overflows for T_max=%d", T_max);
    }
    cudaError_t sf = cudaMalloc(&s->mem_f, nf ? nf : 1), si = cudaMalloc(&s->mem_i, ni ? ni : 1);
    if (sf != cudaSuccess) s->mem_f = NULL;
    if (si != cudaSuccess) s->mem_i = NULL;
    s->mem_h = mem_alloc_aligned(nh);
    if (!s->mem_f || !s->mem_i) {
        moe_saved_free(s);
        return err_set(e, MR_ENOMEM, "moe: cannot allocate %zu bytes of device saved state for T_max=%d (%s)",
                       nf + ni, T_max, cudaGetErrorString(sf != cudaSuccess ? sf : si));
    }
    if (!s->mem_h) {
        moe_saved_free(s);
        return err_set(e, MR_ENOMEM, "moe: cannot allocate %zu bytes of host saved state (off, load)", nh);
    }
    char *cf = (char *)s->mem_f, *ci = (char *)s->mem_i, *ch = (char *)s->mem_h;
    s->scores = (float *)moe_carve(&cf, T * E, sizeof(float));
    s->weights = (float *)moe_carve(&cf, TK, sizeof(float));
    s->xg = (float *)moe_carve(&cf, TK * (size_t)c->d, sizeof(float));
    s->hg = (float *)moe_carve(&cf, TK * (size_t)c->I_e, sizeof(float));
    s->hu = (float *)moe_carve(&cf, TK * (size_t)c->I_e, sizeof(float));
    s->sg = (float *)moe_carve(&cf, T * (size_t)c->I_s, sizeof(float));
    s->su = (float *)moe_carve(&cf, T * (size_t)c->I_s, sizeof(float));
    s->idx = (int32_t *)moe_carve(&ci, TK, sizeof(int32_t));
    s->order = (int32_t *)moe_carve(&ci, TK, sizeof(int32_t));
    s->pos = (int32_t *)moe_carve(&ci, TK, sizeof(int32_t));
    s->load = (int64_t *)moe_carve(&ch, E, sizeof(int64_t));
    s->off = (int32_t *)moe_carve(&ch, E + 1, sizeof(int32_t));
    memset(s->load, 0, E * sizeof(int64_t));
    memset(s->off, 0, (E + 1) * sizeof(int32_t));
    s->T_max = T_max;
    s->T = 0;
    return MR_OK;
}

extern "C" int cuda_moe_work_init(moe_work *w, const moe_cfg *c, int T_max, mr_err *e) {
    memset(w, 0, sizeof *w);
    int rc = moe_check_tmax(c, T_max, "work space", e);
    if (rc) return rc;
    w->release = work_release;
    size_t T = (size_t)T_max, TK = T * (size_t)c->K, Ie = (size_t)c->I_e, Is = (size_t)c->I_s;
    size_t n = 0;
    int bad = moe_plan_add(&n, TK * (size_t)c->d, sizeof(float));
    for (int i = 0; i < 5; i++) bad = bad || moe_plan_add(&n, TK * Ie, sizeof(float));
    bad = bad || moe_plan_add(&n, TK, sizeof(float)) || moe_plan_add(&n, T * (size_t)c->E, sizeof(float));
    for (int i = 0; i < 4; i++) bad = bad || moe_plan_add(&n, T * Is, sizeof(float));
    if (bad) {
        moe_work_free(w);
        return err_set(e, MR_ERANGE, "moe: work space size overflows for T_max=%d", T_max);
    }
    cudaError_t st = cudaMalloc(&w->mem, n ? n : 1);
    if (st != cudaSuccess) {
        w->mem = NULL;
        moe_work_free(w);
        return err_set(e, MR_ENOMEM, "moe: cannot allocate %zu bytes of device work space for T_max=%d (%s)", n,
                       T_max, cudaGetErrorString(st));
    }
    char *cur = (char *)w->mem;
    w->rows_d = (float *)moe_carve(&cur, TK * (size_t)c->d, sizeof(float));
    w->h = (float *)moe_carve(&cur, TK * Ie, sizeof(float));
    w->hs = (float *)moe_carve(&cur, TK * Ie, sizeof(float));
    w->dh = (float *)moe_carve(&cur, TK * Ie, sizeof(float));
    w->dhg = (float *)moe_carve(&cur, TK * Ie, sizeof(float));
    w->dhu = (float *)moe_carve(&cur, TK * Ie, sizeof(float));
    w->dweights = (float *)moe_carve(&cur, TK, sizeof(float));
    w->dz = (float *)moe_carve(&cur, T * (size_t)c->E, sizeof(float));
    w->sh_h = (float *)moe_carve(&cur, T * Is, sizeof(float));
    w->sh_dh = (float *)moe_carve(&cur, T * Is, sizeof(float));
    w->sh_dg = (float *)moe_carve(&cur, T * Is, sizeof(float));
    w->sh_du = (float *)moe_carve(&cur, T * Is, sizeof(float));
    w->T_max = T_max;
    return MR_OK;
}

// ------------------------------------------------------------------------------------------------------------
// Router (one thread per token; moe.c's route_token, topn_insert and weights, line for line)
// ------------------------------------------------------------------------------------------------------------

__device__ static void topn_insert(float *val, int32_t *id, int *n, int cap, float v, int32_t i) {
    int j;
    if (*n < cap) {
        j = (*n)++;
    } else {
        if (!(v > val[cap - 1])) return;
        j = cap - 1;
    }
    while (j > 0 && v > val[j - 1]) {
        val[j] = val[j - 1];
        id[j] = id[j - 1];
        j--;
    }
    val[j] = v;
    id[j] = i;
}

__device__ static bool renormalizes(const moe_cfg &c) {
    return c.norm_topk_prob && (c.method == MOE_TOPK_NOAUX_TC || c.K > 1);
}

__device__ static void route_token(int32_t *idx, float *sel, const float *s, const float *bias, const moe_cfg &c) {
    const int E = c.E, K = c.K, G = c.n_group, gsize = E / G;
    const bool biased = c.method == MOE_TOPK_NOAUX_TC && bias;
    uint64_t kept = ~(uint64_t)0;
    if (c.method != MOE_TOPK_GREEDY && c.topk_group < G) {
        float gval[MOE_MAX_GROUPS];
        int32_t gid[MOE_MAX_GROUPS];
        int ng = 0;
        for (int g = 0; g < G; g++) {
            float m1 = -INFINITY, m2 = -INFINITY;
            for (int i = g * gsize; i < (g + 1) * gsize; i++) {
                float v = __fadd_rn(s[i], biased ? bias[i] : 0.0f);
                if (v > m1) {
                    m2 = m1;
                    m1 = v;
                } else if (v > m2) {
                    m2 = v;
                }
            }
            float score = (c.method == MOE_TOPK_NOAUX_TC && gsize >= 2) ? __fadd_rn(m1, m2) : m1;
            topn_insert(gval, gid, &ng, c.topk_group, score, g);
        }
        kept = 0;
        for (int j = 0; j < ng; j++) kept |= (uint64_t)1 << gid[j];
    }
    int n = 0;
    for (int i = 0; i < E; i++) {
        if (!(kept >> (i / gsize) & 1)) continue; // discarded groups: excluded outright
        topn_insert(sel, idx, &n, K, __fadd_rn(s[i], biased ? bias[i] : 0.0f), i);
    }
}

// scores holds the logits on entry and the affinities on return; replay (validated) replaces the selection.
__global__ static void route_kernel(int32_t *idx, float *weights, float *scores, const float *bias,
                                    const int32_t *replay, const moe_cfg c, int T) {
    const int t = blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= T) return;
    const int E = c.E, K = c.K;
    float *z = scores + (size_t)t * E;
    if (c.score == MOE_SCORE_SIGMOID) {
        for (int i = 0; i < E; i++) z[i] = __fdiv_rn(1.0f, __fadd_rn(1.0f, expf(-z[i])));
    } else {
        float mx = z[0], sum = 0.0f;
        for (int i = 1; i < E; i++) mx = z[i] > mx ? z[i] : mx;
        for (int i = 0; i < E; i++) {
            z[i] = expf(__fsub_rn(z[i], mx));
            sum = __fadd_rn(sum, z[i]);
        }
        for (int i = 0; i < E; i++) z[i] = __fdiv_rn(z[i], sum);
    }
    int32_t *it = idx + (size_t)t * K;
    float *wt = weights + (size_t)t * K;
    if (replay)
        for (int k = 0; k < K; k++) it[k] = replay[(size_t)t * K + k];
    else
        route_token(it, wt, z, bias, c); // wt holds the selection scores for a moment
    const bool norm = renormalizes(c);
    float sum = 0.0f;
    for (int k = 0; k < K; k++) sum = __fadd_rn(sum, z[it[k]]);
    for (int k = 0; k < K; k++) {
        float g = z[it[k]];
        if (norm) g = __fdiv_rn(g, __fadd_rn(sum, MOE_NORM_EPS));
        wt[k] = __fmul_rn(g, c.routed_scaling_factor);
    }
}

// The smallest pair p = t·K + k whose replayed expert is out of range or repeats an earlier slot of its token.
__global__ static void replay_check_kernel(int *first_bad, const int32_t *r, long TK, int K, int E) {
    GRID_STRIDE(p, (size_t)TK) {
        const size_t t0 = p / K * K;
        const int32_t v = r[p];
        bool bad = v < 0 || v >= E;
        for (size_t j = t0; j < p && !bad; j++) bad = r[j] == v;
        if (bad) atomicMin(first_bad, (int)p);
    }
}

// moe.c's check_replay, its messages included; syncs.
static int check_replay(const int32_t *r, int T, int K, int E, mr_err *e) {
    const long TK = (long)T * K;
    int *flag = (int *)dense_cuda_scratch(DENSE_CUDA_SCRATCH_MOE_FLAG, sizeof(int));
    if (!flag) return dense_cuda_take_error(e);
    const int none = INT_MAX;
    CUDA_RET(cudaMemcpy(flag, &none, sizeof none, cudaMemcpyHostToDevice), e);
    replay_check_kernel<<<grid_for((size_t)TK, 256), 256>>>(flag, r, TK, K, E);
    LAUNCH_RET("moe replay check", e);
    int first = none;
    CUDA_RET(cudaMemcpy(&first, flag, sizeof first, cudaMemcpyDeviceToHost), e);
    if (first == none) return MR_OK;
    const int t = first / K, k = first % K;
    int32_t row[64], *rw = K <= 64 ? row : (int32_t *)mem_alloc(sizeof(int32_t) * (size_t)K);
    if (!rw) return err_set(e, MR_ENOMEM, "moe: replayed routing: token %d slot %d is invalid", t, k);
    cudaError_t st = cudaMemcpy(rw, r + (size_t)t * K, sizeof(int32_t) * (size_t)K, cudaMemcpyDeviceToHost);
    int rc;
    if (st != cudaSuccess) {
        rc = err_set(e, MR_EDEVICE, "%s:%d: moe replay check: %s", __FILE__, __LINE__, cudaGetErrorString(st));
    } else if (rw[k] < 0 || rw[k] >= E) {
        rc = err_set(e, MR_EINVAL, "moe: replayed routing: token %d slot %d: expert %d is not in 0..%d", t, k,
                     (int)rw[k], E - 1);
    } else {
        int j = 0;
        while (j < k && rw[j] != rw[k]) j++;
        rc = err_set(e, MR_EINVAL, "moe: replayed routing: token %d slot %d: expert %d already in slot %d", t, k,
                     (int)rw[k], j);
    }
    if (rw != row) mem_free(rw);
    return rc;
}

// ------------------------------------------------------------------------------------------------------------
// Dispatch: counting sort of the pairs by expert, tokens ascending within an expert (moe_dispatch_build's order)
// ------------------------------------------------------------------------------------------------------------

__global__ static void count_kernel(int32_t *cnt, const int32_t *idx, long TK) {
    GRID_STRIDE(p, (size_t)TK) atomicAdd(&cnt[idx[p]], 1); // integers: the counts do not depend on the order
}

__global__ static void scan_kernel(int32_t *off, const int32_t *cnt, int E) {
    if (blockIdx.x == 0 && threadIdx.x == 0) {
        off[0] = 0;
        for (int i = 0; i < E; i++) off[i + 1] = off[i] + cnt[i];
    }
}

#define PLACE_THREADS 256

// Block e walks the pairs in ascending order, PLACE_THREADS at a time, and gives its pairs the rows off[e],
// off[e] + 1, ... in that order (rank within a chunk = pairs of e in earlier warps + earlier lanes).
__global__ static void __launch_bounds__(PLACE_THREADS)
place_kernel(int32_t *order, int32_t *pos, const int32_t *off, const int32_t *idx, int TK) {
    __shared__ int wc[PLACE_THREADS / 32];
    const int ex = blockIdx.x, lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int base = off[ex];
    int running = 0;
    for (int p0 = 0; p0 < TK; p0 += PLACE_THREADS) { // block-uniform trip count
        const int p = p0 + (int)threadIdx.x;
        const bool mine = p < TK && idx[p] == ex;
        const unsigned b = __ballot_sync(FULL, mine);
        if (lane == 0) wc[warp] = __popc(b);
        __syncthreads();
        int before = 0, total = 0;
        for (int w = 0; w < PLACE_THREADS / 32; w++) {
            before += w < warp ? wc[w] : 0;
            total += wc[w];
        }
        if (mine) {
            const int r = base + running + before + __popc(b & ((1u << lane) - 1u));
            order[r] = p;
            pos[p] = r;
        }
        running += total;
        __syncthreads(); // every thread has read wc before the next chunk writes it
    }
}

// Fills s->order, s->pos (device) and s->off, s->load (host); syncs.
static int dispatch(moe_saved *s, int T, int K, int E, mr_err *e) {
    const long TK = (long)T * K;
    int32_t *cnt =
        (int32_t *)dense_cuda_scratch(DENSE_CUDA_SCRATCH_MOE_DISPATCH, sizeof(int32_t) * (2 * (size_t)E + 1));
    if (!cnt) return dense_cuda_take_error(e);
    int32_t *off = cnt + E;
    CUDA_RET(cudaMemsetAsync(cnt, 0, sizeof(int32_t) * (size_t)E), e);
    count_kernel<<<grid_for((size_t)TK, 256), 256>>>(cnt, s->idx, TK);
    LAUNCH_RET("moe count", e);
    scan_kernel<<<1, 1>>>(off, cnt, E);
    LAUNCH_RET("moe scan", e);
    place_kernel<<<(unsigned)E, PLACE_THREADS>>>(s->order, s->pos, off, s->idx, (int)TK);
    LAUNCH_RET("moe place", e);
    CUDA_RET(cudaMemcpy(s->off, off, sizeof(int32_t) * ((size_t)E + 1), cudaMemcpyDeviceToHost), e);
    for (int i = 0; i < E; i++) s->load[i] = s->off[i + 1] - s->off[i];
    return MR_OK;
}

// ------------------------------------------------------------------------------------------------------------
// Row kernels
// ------------------------------------------------------------------------------------------------------------

// dst[r] = src[order[r] / K] (moe_gather).
__global__ static void gather_kernel(float *dst, const float *src, const int32_t *order, long TK, int K, int d) {
    GRID_STRIDE(i, (size_t)TK * d) {
        const size_t r = i / d, j = i % d;
        dst[i] = src[(size_t)(order[r] / K) * d + j];
    }
}

// hs[r] = weights[order[r]] · h[r].
__global__ static void scale_rows_kernel(float *hs, const float *h, const float *weights, const int32_t *order,
                                         long TK, int I) {
    GRID_STRIDE(i, (size_t)TK * I) hs[i] = __fmul_rn(weights[order[i / I]], h[i]);
}

// out[t] = Σ_k rows[pos[t·K + k]], k = 0..K-1 in order (moe_combine); accumulate: out[t] += the same, added one
// slot at a time onto out[t] (moe_backward's dx loop).
__global__ static void combine_kernel(float *out, const float *rows, const int32_t *pos, int T, int K, int d,
                                      int accumulate) {
    GRID_STRIDE(i, (size_t)T * d) {
        const size_t t = i / d, j = i % d;
        const int32_t *pt = pos + t * K;
        float acc = accumulate ? out[i] : rows[(size_t)pt[0] * d + j];
        for (int k = accumulate ? 0 : 1; k < K; k++) acc = __fadd_rn(acc, rows[(size_t)pt[k] * d + j]);
        out[i] = acc;
    }
}

// ---- Inference (moe_saved.infer): the experts straight from the routing, no dispatch, no host round trip ----
// Expert e's gate/up/down weights are base + e·stride (the model's layout); rows of one dot product are summed
// by each lane over inputs lane, lane + 32, ... (fma), then the 32 lane sums by a fixed butterfly: deterministic,
// and a row's result does not depend on the other rows of the step.
#define DIRECT_WARPS 4
#define MOE_DIRECT_MAX_PAIRS 256 // MM_FAST inference with more pairs than this dispatches (grouped GEMMs win)

__device__ static float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

// hs[p][j] = g[p] · silu(x_t · Wg[e][j]) · (x_t · Wu[e][j]) for pair p = t·K + k, e = idx[p]; one warp per row j.
__global__ static void __launch_bounds__(DIRECT_WARPS * 32)
    direct_up_kernel(float *hs, const float *x, const float *wg, const float *wu, size_t stride,
                     const int32_t *idx, const float *weights, int K, int d, int Ie) {
    const int p = blockIdx.x, lane = threadIdx.x % 32;
    const float *xt = x + (size_t)(p / K) * d;
    const size_t e = (size_t)idx[p];
    for (int j = blockIdx.y * DIRECT_WARPS + threadIdx.x / 32; j < Ie; j += gridDim.y * DIRECT_WARPS) {
        const float *G = wg + e * stride + (size_t)j * d, *U = wu + e * stride + (size_t)j * d;
        float sg = 0.0f, su = 0.0f;
        for (int i = lane; i < d; i += 32) {
            sg = fmaf(xt[i], G[i], sg);
            su = fmaf(xt[i], U[i], su);
        }
        sg = warp_sum(sg);
        su = warp_sum(su);
        if (lane == 0) {
            const float a = __fdiv_rn(sg, __fadd_rn(1.0f, expf(-sg)));
            hs[(size_t)p * Ie + j] = __fmul_rn(weights[p], __fmul_rn(a, su));
        }
    }
}

// out[t][i] = Σ_k Wd[e_k][i] · hs[t·K + k], slots in order; one warp per (t, i).
__global__ static void direct_down_kernel(float *out, const float *hs, const float *wd, size_t stride,
                                          const int32_t *idx, int T, int K, int d, int Ie) {
    const int lane = threadIdx.x % 32;
    const size_t n_warps = (size_t)gridDim.x * blockDim.x / 32;
    for (size_t w = ((size_t)blockIdx.x * blockDim.x + threadIdx.x) / 32; w < (size_t)T * d; w += n_warps) {
        const size_t t = w / d, i = w % d; // the loop bounds are the same for the 32 lanes of a warp
        float acc = 0.0f;
        for (int k = 0; k < K; k++) {
            const size_t p = t * K + k;
            const float *D = wd + (size_t)idx[p] * stride + i * Ie, *h = hs + p * Ie;
            float s = 0.0f;
            for (int j = lane; j < Ie; j += 32) s = fmaf(D[j], h[j], s);
            s = warp_sum(s);
            acc = k ? __fadd_rn(acc, s) : s;
        }
        if (lane == 0) out[w] = acc;
    }
}

// MM_DET: the same outputs as the dispatch path's, bit for bit (each product in det_dot's order, SwiGLU and the
// weight as swiglu_forward_kernel and scale_rows_kernel form them, slots combined in order), so a decode step's
// MoE equals the training forward's for the same row. One thread per (pair, row j) / per (token, output i).
__global__ static void direct_up_det_kernel(float *hs, const float *x, const float *wg, const float *wu,
                                            size_t stride, const int32_t *idx, const float *weights, long TK, int K,
                                            int d, int Ie) {
    GRID_STRIDE(n, (size_t)TK * Ie) {
        const size_t p = n / Ie, j = n % Ie, e = (size_t)idx[p];
        const float *xt = x + (p / K) * d;
        const float z = det_dot(xt, wg + e * stride + j * d, d), u = det_dot(xt, wu + e * stride + j * d, d);
        const float h = __fmul_rn(__fdiv_rn(z, __fadd_rn(1.0f, expf(-z))), u);
        hs[n] = __fmul_rn(weights[p], h);
    }
}

__global__ static void direct_down_det_kernel(float *out, const float *hs, const float *wd, size_t stride,
                                              const int32_t *idx, int T, int K, int d, int Ie) {
    GRID_STRIDE(n, (size_t)T * d) {
        const size_t t = n / d, i = n % d;
        float acc = 0.0f;
        for (int k = 0; k < K; k++) {
            const size_t p = t * K + k;
            const float s = det_dot(hs + p * Ie, wd + (size_t)idx[p] * stride + i * Ie, Ie);
            acc = k ? __fadd_rn(acc, s) : s;
        }
        out[n] = acc;
    }
}

// base with E experts at base + e·stride, or NULL.
static const float *strided(const float *const *ptr, int E, size_t stride) {
    for (int e = 1; e < E; e++)
        if (ptr[e] != ptr[0] + (size_t)e * stride) return NULL;
    return ptr[0];
}

// One warp per sorted row r: dweights[order[r]] = ⟨dh[r], h[r]⟩, then dh[r] *= weights[order[r]].
__global__ static void dweights_kernel(float *dweights, float *dh, const float *h, const float *weights,
                                       const int32_t *order, long TK, int I) {
    const long r = (long)blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    const int lane = threadIdx.x & 31;
    if (r >= TK) return; // whole warps
    float *dr = dh + (size_t)r * I;
    const float *hr = h + (size_t)r * I;
    float dot = 0.0f;
    for (int j = lane; j < I; j += 32) dot = fmaf(dr[j], hr[j], dot);
#pragma unroll
    for (int o = 16; o > 0; o /= 2) dot += __shfl_xor_sync(FULL, dot, o);
    const int32_t pr = order[r];
    if (lane == 0) dweights[pr] = dot;
    const float g = weights[pr];
    for (int j = lane; j < I; j += 32) dr[j] = __fmul_rn(dr[j], g);
}

// moe_gate_backward's per-token part: dz[t] = d(logits) from dweights, daff and the affinities.
__global__ static void gate_backward_kernel(float *dz, const float *dweights, const float *daff, const float *scores,
                                            const int32_t *idx, const moe_cfg c, int T) {
    const int t = blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= T) return;
    const int E = c.E, K = c.K;
    const float rsf = c.routed_scaling_factor;
    const float *s = scores + (size_t)t * E;
    const int32_t *it = idx + (size_t)t * K;
    const float *dg = dweights + (size_t)t * K;
    float *ds = dz + (size_t)t * E;
    for (int i = 0; i < E; i++) ds[i] = daff ? daff[(size_t)t * E + i] : 0.0f;
    if (renormalizes(c)) {
        // g_k = rsf·s_k/D, D = Σ_m s_m + eps:  ∂L/∂s_k = rsf·(dg_k − Σ_m dg_m·s_m / D) / D.
        float D = 0.0f, a = 0.0f;
        for (int k = 0; k < K; k++) D = __fadd_rn(D, s[it[k]]);
        D = __fadd_rn(D, MOE_NORM_EPS);
        for (int k = 0; k < K; k++) a = __fadd_rn(a, __fmul_rn(dg[k], s[it[k]]));
        a = __fdiv_rn(a, D);
        for (int k = 0; k < K; k++)
            ds[it[k]] = __fadd_rn(ds[it[k]], __fdiv_rn(__fmul_rn(rsf, __fsub_rn(dg[k], a)), D));
    } else {
        for (int k = 0; k < K; k++) ds[it[k]] = __fadd_rn(ds[it[k]], __fmul_rn(rsf, dg[k]));
    }
    if (c.score == MOE_SCORE_SIGMOID) {
        for (int i = 0; i < E; i++) ds[i] = __fmul_rn(ds[i], __fmul_rn(s[i], __fsub_rn(1.0f, s[i])));
    } else {
        float dot = 0.0f;
        for (int i = 0; i < E; i++) dot = __fadd_rn(dot, __fmul_rn(ds[i], s[i]));
        for (int i = 0; i < E; i++) ds[i] = __fmul_rn(s[i], __fsub_rn(ds[i], dot));
    }
}

// ------------------------------------------------------------------------------------------------------------
// Layer
// ------------------------------------------------------------------------------------------------------------

static int built_here(const moe_saved *s, const moe_work *w) {
    return s->release == saved_release && w->release == work_release;
}

extern "C" int cuda_moe_forward(float *out, moe_saved *s, moe_work *w, const float *x, const int32_t *replay_idx,
                                const moe_params *p, const moe_cfg *c, int T, mr_err *e) {
    if (!built_here(s, w))
        return err_set(e, MR_EINVAL, "moe_forward (cuda): moe_saved and moe_work must come from "
                                     "backend_moe_saved_init / backend_moe_work_init with the cuda backend");
    if (T < 0 || T > s->T_max || T > w->T_max)
        return err_set(e, MR_ERANGE, "moe: forward of %d tokens exceeds the %d tokens the buffers were sized for", T,
                       s->T_max < w->T_max ? s->T_max : w->T_max);
    int rc = moe_cfg_check(c, e);
    if (rc) return rc;
    const int E = c->E, K = c->K, d = c->d, Ie = c->I_e, Is = c->I_s;
    const long TK = (long)T * K;
    if (T == 0) {
        s->T = 0;
        memset(s->off, 0, sizeof(int32_t) * ((size_t)E + 1));
        memset(s->load, 0, sizeof(int64_t) * (size_t)E);
        return MR_OK;
    }
    if (replay_idx && (rc = check_replay(replay_idx, T, K, E, e))) return rc; // before anything is written

    // Router: logits = x·Wgᵀ, then affinities, selection and weights per token.
    cuda_matmul_forward(s->scores, x, p->gate_w, T, d, E, 0.0f, c->mm);
    route_kernel<<<(unsigned)((T + 127) / 128), 128>>>(s->idx, s->weights, s->scores, p->gate_bias, replay_idx, *c,
                                                       T);
    LAUNCH_RET("moe route", e);
    s->no_dispatch = 0;
    const size_t st = (size_t)Ie * d;
    const float *bg = strided(p->gate_proj, E, st), *bu = strided(p->up_proj, E, st);
    const float *bd = strided(p->down_proj, E, st);
    // Inference: in MM_DET always (a row's bits must not depend on the batch), else for few pairs (a decode step)
    if (s->infer && bg && bu && bd && (c->mm == MM_DET || TK <= MOE_DIRECT_MAX_PAIRS)) {
        s->T = T;
        s->no_dispatch = 1;
        if (c->mm == MM_DET) {
            direct_up_det_kernel<<<grid_for((size_t)TK * Ie, 128), 128>>>(w->hs, x, bg, bu, st, s->idx, s->weights,
                                                                           TK, K, d, Ie);
            LAUNCH_RET("moe direct up (det)", e);
            direct_down_det_kernel<<<grid_for((size_t)T * d, 128), 128>>>(out, w->hs, bd, st, s->idx, T, K, d, Ie);
            LAUNCH_RET("moe direct down (det)", e);
        } else {
            const int yb = (Ie + DIRECT_WARPS - 1) / DIRECT_WARPS;
            direct_up_kernel<<<dim3((unsigned)TK, (unsigned)(yb < 65535 ? yb : 65535)), DIRECT_WARPS * 32>>>(
                w->hs, x, bg, bu, st, s->idx, s->weights, K, d, Ie);
            LAUNCH_RET("moe direct up", e);
            direct_down_kernel<<<grid_for((size_t)T * d * 32, 256), 256>>>(out, w->hs, bd, st, s->idx, T, K, d, Ie);
            LAUNCH_RET("moe direct down", e);
        }
        goto shared;
    }
    if ((rc = dispatch(s, T, K, E, e))) return rc;
    s->T = T;

    gather_kernel<<<grid_for((size_t)TK * d, 256), 256>>>(s->xg, x, s->order, TK, K, d);
    LAUNCH_RET("moe gather", e);
    for (int ex = 0; ex < E; ex++) { // one GEMM per expert over its contiguous segment
        const int r0 = s->off[ex], n = s->off[ex + 1] - r0;
        if (n == 0) continue;
        cuda_matmul_forward(s->hg + (size_t)r0 * Ie, s->xg + (size_t)r0 * d, p->gate_proj[ex], n, d, Ie, 0.0f, c->mm);
        cuda_matmul_forward(s->hu + (size_t)r0 * Ie, s->xg + (size_t)r0 * d, p->up_proj[ex], n, d, Ie, 0.0f, c->mm);
    }
    cuda_swiglu_forward(w->h, s->hg, s->hu, (int)TK, Ie);
    // The routing weight scales the down_proj input (moe.c: g·(W_down·h) = W_down·(g·h)).
    scale_rows_kernel<<<grid_for((size_t)TK * Ie, 256), 256>>>(w->hs, w->h, s->weights, s->order, TK, Ie);
    LAUNCH_RET("moe scale rows", e);
    for (int ex = 0; ex < E; ex++) {
        const int r0 = s->off[ex], n = s->off[ex + 1] - r0;
        if (n == 0) continue;
        cuda_matmul_forward(w->rows_d + (size_t)r0 * d, w->hs + (size_t)r0 * Ie, p->down_proj[ex], n, Ie, d, 0.0f,
                            c->mm);
    }
    combine_kernel<<<grid_for((size_t)T * d, 256), 256>>>(out, w->rows_d, s->pos, T, K, d, 0);
    LAUNCH_RET("moe combine", e);
shared:
    if (Is > 0) { // shared experts: a dense SwiGLU MLP on every token, added to the routed sum
        cuda_matmul_forward(s->sg, x, p->sh_gate, T, d, Is, 0.0f, c->mm);
        cuda_matmul_forward(s->su, x, p->sh_up, T, d, Is, 0.0f, c->mm);
        cuda_swiglu_forward(w->sh_h, s->sg, s->su, T, Is);
        cuda_matmul_forward(out, w->sh_h, p->sh_down, T, Is, d, 1.0f, c->mm);
    }
    return dense_cuda_take_error(e); // a failed matmul / swiglu launch above
}

#define ZERO(ptr, n) NOTE_ZERO(cudaMemsetAsync((ptr), 0, sizeof(float) * (size_t)(n)))
#define NOTE_ZERO(call)                                                                                        \
    do {                                                                                                       \
        cudaError_t st_ = (call);                                                                              \
        if (st_ != cudaSuccess) NOTE(#call, cudaGetErrorString(st_));                                          \
    } while (0)

extern "C" void cuda_moe_backward(float *dx, const moe_grads *g, moe_work *w, const float *dout, const float *daff,
                                  const moe_saved *s, const float *x, const moe_params *p, const moe_cfg *c) {
    if (!built_here(s, w)) {
        NOTE("moe_backward (cuda)", "moe_saved and moe_work must come from backend_moe_saved_init / "
                                    "backend_moe_work_init with the cuda backend");
        return;
    }
    if (s->no_dispatch) {
        NOTE("moe_backward (cuda)", "the latest forward ran for inference (moe_saved.infer): nothing was saved");
        return;
    }
    const int T = s->T, E = c->E, d = c->d, K = c->K, Ie = c->I_e, Is = c->I_s;
    const long TK = (long)T * K;
    if (T > w->T_max) {
        NOTE("moe_backward (cuda)", "the saved state holds more tokens than the work space was sized for");
        return;
    }
    if (T == 0) return;
    if (Is > 0) {
        cuda_swiglu_forward(w->sh_h, s->sg, s->su, T, Is);
        ZERO(w->sh_dh, (size_t)T * Is);
        cuda_matmul_backward(w->sh_dh, g->sh_down, dout, w->sh_h, p->sh_down, T, Is, d, c->mm_bwd);
        ZERO(w->sh_dg, (size_t)T * Is);
        ZERO(w->sh_du, (size_t)T * Is);
        cuda_swiglu_backward(w->sh_dg, w->sh_du, w->sh_dh, s->sg, s->su, T, Is);
        cuda_matmul_backward(dx, g->sh_gate, w->sh_dg, x, p->sh_gate, T, d, Is, c->mm_bwd);
        cuda_matmul_backward(dx, g->sh_up, w->sh_du, x, p->sh_up, T, d, Is, c->mm_bwd);
    }

    // Routed experts. rows_d first holds the output gradient of each sorted row, then its input gradient.
    gather_kernel<<<grid_for((size_t)TK * d, 256), 256>>>(w->rows_d, dout, s->order, TK, K, d);
    NOTE_LAUNCH("moe gather dout");
    cuda_swiglu_forward(w->h, s->hg, s->hu, (int)TK, Ie);
    scale_rows_kernel<<<grid_for((size_t)TK * Ie, 256), 256>>>(w->hs, w->h, s->weights, s->order, TK, Ie);
    NOTE_LAUNCH("moe scale rows");
    ZERO(w->dh, (size_t)TK * Ie);
    for (int ex = 0; ex < E; ex++) {
        const int r0 = s->off[ex], n = s->off[ex + 1] - r0;
        if (n == 0) continue;
        cuda_matmul_backward(w->dh + (size_t)r0 * Ie, g->down_proj ? g->down_proj[ex] : NULL,
                             w->rows_d + (size_t)r0 * d, w->hs + (size_t)r0 * Ie, p->down_proj[ex], n, Ie, d,
                             c->mm_bwd);
    }
    // dh holds ∂L/∂(g·h): the weight gets ⟨·, h⟩, the activation gets g·(·).
    dweights_kernel<<<(unsigned)((TK + 7) / 8), 256>>>(w->dweights, w->dh, w->h, s->weights, s->order, TK, Ie);
    NOTE_LAUNCH("moe dweights");
    ZERO(w->dhg, (size_t)TK * Ie);
    ZERO(w->dhu, (size_t)TK * Ie);
    cuda_swiglu_backward(w->dhg, w->dhu, w->dh, s->hg, s->hu, (int)TK, Ie);
    if (dx) ZERO(w->rows_d, (size_t)TK * d);
    float *dxg = dx ? w->rows_d : NULL;
    for (int ex = 0; ex < E; ex++) {
        const int r0 = s->off[ex], n = s->off[ex + 1] - r0;
        if (n == 0) continue;
        float *dxe = dxg ? dxg + (size_t)r0 * d : NULL;
        cuda_matmul_backward(dxe, g->gate_proj ? g->gate_proj[ex] : NULL, w->dhg + (size_t)r0 * Ie,
                             s->xg + (size_t)r0 * d, p->gate_proj[ex], n, d, Ie, c->mm_bwd);
        cuda_matmul_backward(dxe, g->up_proj ? g->up_proj[ex] : NULL, w->dhu + (size_t)r0 * Ie,
                             s->xg + (size_t)r0 * d, p->up_proj[ex], n, d, Ie, c->mm_bwd);
    }
    if (dx) {
        combine_kernel<<<grid_for((size_t)T * d, 256), 256>>>(dx, w->rows_d, s->pos, T, K, d, 1);
        NOTE_LAUNCH("moe scatter dx");
    }
    // Router: the selection is a constant; the gradient reaches the selected affinities through the weights.
    gate_backward_kernel<<<(unsigned)((T + 127) / 128), 128>>>(w->dz, w->dweights, daff, s->scores, s->idx, *c, T);
    NOTE_LAUNCH("moe gate backward");
    cuda_matmul_backward(dx, g->gate_w, w->dz, x, p->gate_w, T, d, E, c->mm_bwd);
}

// ------------------------------------------------------------------------------------------------------------
// Balance loss (§9.2): moe.c's double-precision sums replayed per token, the per-sequence sums on the host
// ------------------------------------------------------------------------------------------------------------

// cnt[q][i] += 1 for every pair of a token of (non-empty) sequence q routed to i.
__global__ static void bal_count_kernel(int32_t *cnt, const int32_t *idx, const int32_t *tok_seq, long TK, int K,
                                        int E) {
    GRID_STRIDE(p, (size_t)TK) atomicAdd(&cnt[(size_t)tok_seq[p / K] * E + idx[p]], 1);
}

// row[t] = Σ_i f_i s_i / Σ_i s_i for token t; daff[t] += gscale·(f/S − fs/S²).
__global__ static void bal_token_kernel(double *row, float *daff, const float *scores, const int32_t *cnt,
                                        const int32_t *tok_seq, const int32_t *seq_T, int T, int E, int K, int nonempty,
                                        float alpha) {
    const int t = blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= T) return;
    const int q = tok_seq[t], Ts = seq_T[q];
    const int32_t *cq = cnt + (size_t)q * E;
    const double fscale = (double)E / ((double)K * Ts);
    const double gscale = (double)alpha / ((double)Ts * nonempty);
    const float *st = scores + (size_t)t * E;
    double S = 0.0, fs = 0.0;
    for (int i = 0; i < E; i++) {
        S = __dadd_rn(S, (double)st[i]);
        fs = __dadd_rn(fs, __dmul_rn(__dmul_rn((double)cq[i], fscale), (double)st[i]));
    }
    row[t] = __ddiv_rn(fs, S);
    if (daff) {
        float *dt = daff + (size_t)t * E;
        const double c0 = __ddiv_rn(fs, __dmul_rn(S, S));
        for (int i = 0; i < E; i++) {
            const double f = __dmul_rn((double)cq[i], fscale);
            dt[i] = __fadd_rn(dt[i], (float)__dmul_rn(gscale, __dsub_rn(__ddiv_rn(f, S), c0)));
        }
    }
}

extern "C" int cuda_moe_balance_loss(double *loss, float *daff, const float *scores, const int32_t *idx,
                                     const int *seq_len, int n_seq, int T, int E, int K, float alpha, mr_err *e) {
    int64_t total = 0;
    int nonempty = 0;
    for (int q = 0; q < n_seq; q++) {
        if (seq_len[q] < 0)
            return err_set(e, MR_EINVAL, "moe: balance loss: sequence %d has negative length %d", q, seq_len[q]);
        total += seq_len[q];
        nonempty += seq_len[q] > 0;
    }
    if (total != T)
        return err_set(e, MR_EINVAL, "moe: balance loss: sequence lengths sum to %lld, expected T = %d",
                       (long long)total, T);
    *loss = 0.0;
    if (nonempty == 0) return MR_OK;
    const long TK = (long)T * K;
    // Host: token -> non-empty sequence, the sequences' lengths; device: those, the counts, the per-token sums.
    int32_t *h_int = (int32_t *)mem_alloc(sizeof(int32_t) * ((size_t)T + (size_t)nonempty));
    double *h_row = (double *)mem_alloc(sizeof(double) * (size_t)T);
    if (!h_int || !h_row) {
        mem_free(h_int);
        mem_free(h_row);
        return err_set(e, MR_ENOMEM, "moe: balance loss: out of host memory for %d tokens", T);
    }
    int32_t *h_seq = h_int, *h_len = h_int + T;
    for (int q = 0, nq = 0, t0 = 0; q < n_seq; q++) {
        if (seq_len[q] == 0) continue;
        for (int t = t0; t < t0 + seq_len[q]; t++) h_seq[t] = nq;
        h_len[nq++] = seq_len[q];
        t0 += seq_len[q];
    }
    const size_t n_int = (size_t)T + (size_t)nonempty, n_cnt = (size_t)nonempty * (size_t)E;
    int32_t *d_int = (int32_t *)dense_cuda_scratch(DENSE_CUDA_SCRATCH_MOE_BAL_INT, sizeof(int32_t) * (n_int + n_cnt));
    double *d_row = (double *)dense_cuda_scratch(DENSE_CUDA_SCRATCH_MOE_BAL_ROW, sizeof(double) * (size_t)T);
    int rc = MR_OK;
    if (!d_int || !d_row) {
        rc = dense_cuda_take_error(e);
        goto done;
    }
    {
        int32_t *d_seq = d_int, *d_len = d_int + T, *d_cnt = d_int + n_int;
        cudaError_t st = cudaMemcpy(d_int, h_int, sizeof(int32_t) * n_int, cudaMemcpyHostToDevice);
        if (st == cudaSuccess) st = cudaMemsetAsync(d_cnt, 0, sizeof(int32_t) * n_cnt);
        if (st == cudaSuccess) {
            bal_count_kernel<<<grid_for((size_t)TK, 256), 256>>>(d_cnt, idx, d_seq, TK, K, E);
            st = cudaGetLastError();
        }
        if (st == cudaSuccess) {
            bal_token_kernel<<<(unsigned)((T + 127) / 128), 128>>>(d_row, daff, scores, d_cnt, d_seq, d_len, T, E,
                                                                   K, nonempty, alpha);
            st = cudaGetLastError();
        }
        if (st == cudaSuccess) st = cudaMemcpy(h_row, d_row, sizeof(double) * (size_t)T, cudaMemcpyDeviceToHost);
        if (st != cudaSuccess) {
            rc = err_set(e, MR_EDEVICE, "%s:%d: moe balance loss: %s", __FILE__, __LINE__, cudaGetErrorString(st));
            goto done;
        }
    }
    {
        double L = 0.0; // moe.c's sums, in its order
        for (int q = 0, t0 = 0; q < n_seq; q++) {
            const int Ts = seq_len[q];
            if (Ts == 0) continue;
            double Lq = 0.0;
            for (int t = t0; t < t0 + Ts; t++) Lq += h_row[t];
            L += (double)alpha * Lq / Ts;
            t0 += Ts;
        }
        *loss = L / nonempty;
    }
done:
    mem_free(h_int);
    mem_free(h_row);
    return rc;
}
