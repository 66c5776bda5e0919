/* moe.c: the DeepSeekMoE layer on the CPU (see moe.h): router, dispatch, grouped expert GEMMs, balance loss, bias
 * update.
 *
 * Determinism: every loop that writes floats is either per token (one thread owns a token's row and reduces in a
 * fixed order) or per expert segment inside one matmul call (whose reduction order dense.h fixes). Nothing is
 * reduced across threads, so outputs and gradients do not depend on the thread count. */
#include "kernels/cpu/moe.h"

#include <assert.h>
#include <math.h>
#include <string.h>

#include "core/mem.h"

/* HF adds 1e-20 to the normalization denominator (MODEL-SPEC §7.1 step 6, §7.3); harmless for real sums. */
#define MOE_NORM_EPS 1e-20f
/* Below this many floats touched, a row loop runs on one thread (a parallel region costs more than the work). */
#define MOE_PAR_MIN 16384
/* Below this many multiply-adds per expert GEMM, experts run side by side instead of one after another. */
#define MOE_PAR_EXPERT_WORK (1 << 20)
/* At most this many rows (and 8 times as many (token, expert) pairs) take moe_forward_few. */
#define MOE_FEW_ROWS 16

/* ---- Configuration and buffers ---------------------------------------------------------------------------- */

int moe_cfg_check(const moe_cfg *c, mr_err *e) {
    if (c->d <= 0 || c->E <= 0 || c->I_e <= 0)
        return err_set(e, MR_EINVAL, "moe: hidden size, expert count and expert width must be > 0, got d=%d E=%d I_e=%d",
                       c->d, c->E, c->I_e);
    if (c->I_s < 0) return err_set(e, MR_EINVAL, "moe: shared width I_s must be >= 0, got %d", c->I_s);
    if (c->K < 1 || c->K > c->E)
        return err_set(e, MR_EINVAL, "moe: num_experts_per_tok must be in 1..%d, got %d", c->E, c->K);
    if (c->score != MOE_SCORE_SIGMOID && c->score != MOE_SCORE_SOFTMAX)
        return err_set(e, MR_EINVAL, "moe: unknown scoring function %d", (int)c->score);
    if (c->method != MOE_TOPK_NOAUX_TC && c->method != MOE_TOPK_GREEDY && c->method != MOE_TOPK_GROUP_LIMITED_GREEDY)
        return err_set(e, MR_EINVAL, "moe: unknown top-k method %d", (int)c->method);
    if (c->n_group < 1 || c->n_group > MOE_MAX_GROUPS || c->E % c->n_group != 0)
        return err_set(e, MR_EINVAL, "moe: n_group must be in 1..%d and divide n_routed_experts (%d), got %d",
                       MOE_MAX_GROUPS, c->E, c->n_group);
    if (c->method != MOE_TOPK_GREEDY) {
        if (c->topk_group < 1 || c->topk_group > c->n_group)
            return err_set(e, MR_EINVAL, "moe: topk_group must be in 1..n_group (%d), got %d", c->n_group,
                           c->topk_group);
        if ((int64_t)c->topk_group * (c->E / c->n_group) < c->K)
            return err_set(e, MR_EINVAL,
                           "moe: num_experts_per_tok (%d) exceeds the experts of the kept groups (%d groups of %d)",
                           c->K, c->topk_group, c->E / c->n_group);
    }
    if (!isfinite(c->routed_scaling_factor))
        return err_set(e, MR_EINVAL, "moe: routed_scaling_factor must be finite");
    return MR_OK;
}

/* Adds n elements of size elt to a running total, each block rounded up to 64 bytes; -1 on overflow. */
int moe_plan_add(size_t *total, size_t n, size_t elt) {
    size_t b;
    if (size_mul(n, elt, &b) || size_add(b, 63, &b)) return -1;
    b &= ~(size_t)63;
    return size_add(*total, b, total);
}

/* Carves the next block of n elements of size elt out of *cur (the plan_add layout). */
void *moe_carve(char **cur, size_t n, size_t elt) {
    void *p = *cur;
    *cur += (n * elt + 63) & ~(size_t)63;
    return p;
}

int moe_check_tmax(const moe_cfg *c, int T_max, const char *what, mr_err *e) {
    int rc = moe_cfg_check(c, e);
    if (rc) return rc;
    if (T_max < 0 || (int64_t)T_max * c->K > INT32_MAX)
        return err_set(e, MR_ERANGE, "moe: %s: T_max·K must be in 0..%d, got T_max=%d K=%d", what, INT32_MAX, T_max,
                       c->K);
    return MR_OK;
}

int moe_saved_init(moe_saved *s, const moe_cfg *c, int T_max, mr_err *e) {
    memset(s, 0, sizeof *s);
    int rc = moe_check_tmax(c, T_max, "saved state", e);
    if (rc) return rc;
    size_t T = (size_t)T_max, TK = T * (size_t)c->K, E = (size_t)c->E;
    size_t nf = 0, ni = 0;
    int bad = moe_plan_add(&nf, T * E, sizeof(float)) || moe_plan_add(&nf, TK, sizeof(float)) ||
              moe_plan_add(&nf, TK * (size_t)c->d, sizeof(float)) ||
              moe_plan_add(&nf, TK * (size_t)c->I_e, sizeof(float)) ||
              moe_plan_add(&nf, TK * (size_t)c->I_e, sizeof(float)) ||
              moe_plan_add(&nf, T * (size_t)c->I_s, sizeof(float)) ||
              moe_plan_add(&nf, T * (size_t)c->I_s, sizeof(float));
    bad = bad || moe_plan_add(&ni, E, sizeof(int64_t)) || moe_plan_add(&ni, TK, sizeof(int32_t)) ||
          moe_plan_add(&ni, E + 1, sizeof(int32_t)) || moe_plan_add(&ni, TK, sizeof(int32_t)) ||
          moe_plan_add(&ni, TK, sizeof(int32_t));
    if (bad) return err_set(e, MR_ERANGE, "moe: saved state size overflows for T_max=%d", T_max);
    s->mem_f = mem_alloc_aligned(nf);
    s->mem_i = mem_alloc_aligned(ni);
    if (!s->mem_f || !s->mem_i) {
        moe_saved_free(s);
        return err_set(e, MR_ENOMEM, "moe: cannot allocate %zu bytes of saved state for T_max=%d", nf + ni, T_max);
    }
    char *cf = s->mem_f, *ci = s->mem_i;
    s->scores = moe_carve(&cf, T * E, sizeof(float));
    s->weights = moe_carve(&cf, TK, sizeof(float));
    s->xg = moe_carve(&cf, TK * (size_t)c->d, sizeof(float));
    s->hg = moe_carve(&cf, TK * (size_t)c->I_e, sizeof(float));
    s->hu = moe_carve(&cf, TK * (size_t)c->I_e, sizeof(float));
    s->sg = moe_carve(&cf, T * (size_t)c->I_s, sizeof(float));
    s->su = moe_carve(&cf, T * (size_t)c->I_s, sizeof(float));
    s->load = moe_carve(&ci, E, sizeof(int64_t));
    s->idx = moe_carve(&ci, TK, sizeof(int32_t));
    s->off = moe_carve(&ci, E + 1, sizeof(int32_t));
    s->order = moe_carve(&ci, TK, sizeof(int32_t));
    s->pos = moe_carve(&ci, TK, sizeof(int32_t));
    s->T_max = T_max;
    s->T = 0;
    return MR_OK;
}

void moe_saved_free(moe_saved *s) {
    if (!s) return;
    if (s->release) { /* built by another backend (moe.h) */
        s->release(s);
        return;
    }
    mem_free_aligned(s->mem_f);
    mem_free_aligned(s->mem_i);
    memset(s, 0, sizeof *s);
}

int moe_work_init(moe_work *w, const moe_cfg *c, int T_max, mr_err *e) {
    memset(w, 0, sizeof *w);
    int rc = moe_check_tmax(c, T_max, "work space", e);
    if (rc) return rc;
    size_t T = (size_t)T_max, TK = T * (size_t)c->K, Ie = (size_t)c->I_e, Is = (size_t)c->I_s;
    size_t n = 0;
    int bad = moe_plan_add(&n, TK * (size_t)c->d, sizeof(float));
    for (int i = 0; i < 5; i++) bad = bad || moe_plan_add(&n, TK * Ie, sizeof(float));
    bad = bad || moe_plan_add(&n, TK, sizeof(float)) || moe_plan_add(&n, T * (size_t)c->E, sizeof(float));
    for (int i = 0; i < 4; i++) bad = bad || moe_plan_add(&n, T * Is, sizeof(float));
    if (bad) return err_set(e, MR_ERANGE, "moe: work space size overflows for T_max=%d", T_max);
    w->mem = mem_alloc_aligned(n);
    if (!w->mem) return err_set(e, MR_ENOMEM, "moe: cannot allocate %zu bytes of work space for T_max=%d", n, T_max);
    char *cur = w->mem;
    w->rows_d = moe_carve(&cur, TK * (size_t)c->d, sizeof(float));
    w->h = moe_carve(&cur, TK * Ie, sizeof(float));
    w->hs = moe_carve(&cur, TK * Ie, sizeof(float));
    w->dh = moe_carve(&cur, TK * Ie, sizeof(float));
    w->dhg = moe_carve(&cur, TK * Ie, sizeof(float));
    w->dhu = moe_carve(&cur, TK * Ie, sizeof(float));
    w->dweights = moe_carve(&cur, TK, sizeof(float));
    w->dz = moe_carve(&cur, T * (size_t)c->E, sizeof(float));
    w->sh_h = moe_carve(&cur, T * Is, sizeof(float));
    w->sh_dh = moe_carve(&cur, T * Is, sizeof(float));
    w->sh_dg = moe_carve(&cur, T * Is, sizeof(float));
    w->sh_du = moe_carve(&cur, T * Is, sizeof(float));
    w->T_max = T_max;
    return MR_OK;
}

void moe_work_free(moe_work *w) {
    if (!w) return;
    if (w->release) { /* built by another backend (moe.h) */
        w->release(w);
        return;
    }
    mem_free_aligned(w->mem);
    memset(w, 0, sizeof *w);
}

/* ---- Router ----------------------------------------------------------------------------------------------- */

/* Inserts candidate (v, i) into the descending list (val, id) of current length *n and capacity cap. Candidates
 * arrive in ascending index order and only a strictly larger value moves ahead, so at equal values the lower
 * index stays first (and a full list keeps its lower-index entry): the tie rule of §7.1. */
static void topn_insert(float *val, int32_t *id, int *n, int cap, float v, int32_t i) {
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

/* Whether the weights are renormalized among the chosen experts: HF V3 when norm_topk_prob; HF V2 remote code only
 * when also K > 1. */
static bool renormalizes(const moe_cfg *c) {
    return c->norm_topk_prob && (c->method == MOE_TOPK_NOAUX_TC || c->K > 1);
}

/* Selection for one token: idx (K) in descending selection score; sel (K) receives the selection scores. */
static void route_token(int32_t *idx, float *sel, const float *s, const float *bias, const moe_cfg *c) {
    const int E = c->E, K = c->K, G = c->n_group, gsize = E / G;
    const bool biased = c->method == MOE_TOPK_NOAUX_TC && bias;
    uint64_t kept = ~(uint64_t)0; /* bit g: group g kept */
    if (c->method != MOE_TOPK_GREEDY && c->topk_group < G) {
        float gval[MOE_MAX_GROUPS];
        int32_t gid[MOE_MAX_GROUPS];
        int ng = 0;
        for (int g = 0; g < G; g++) {
            float m1 = -INFINITY, m2 = -INFINITY;
            for (int i = g * gsize; i < (g + 1) * gsize; i++) {
                float v = s[i] + (biased ? bias[i] : 0.0f);
                if (v > m1) {
                    m2 = m1;
                    m1 = v;
                } else if (v > m2) {
                    m2 = v;
                }
            }
            /* noaux_tc: sum of the group's top-2 (§7.1 step 4); group_limited_greedy: the max (§7.3). */
            float score = (c->method == MOE_TOPK_NOAUX_TC && gsize >= 2) ? m1 + m2 : m1;
            topn_insert(gval, gid, &ng, c->topk_group, score, g);
        }
        kept = 0;
        for (int j = 0; j < ng; j++) kept |= (uint64_t)1 << gid[j];
    }
    /* Experts of discarded groups are never candidates: excluded, not scored -inf or 0 (§13 "discarded groups"). */
    int n = 0;
    for (int i = 0; i < E; i++) {
        if (!(kept >> (i / gsize) & 1)) continue;
        topn_insert(sel, idx, &n, K, s[i] + (biased ? bias[i] : 0.0f), i);
    }
    assert(n == K); /* moe_cfg_check: K <= experts of the kept groups */
}

static int check_replay(const int32_t *r, int T, int K, int E, mr_err *e) {
    for (int t = 0; t < T; t++)
        for (int k = 0; k < K; k++) {
            int32_t v = r[(size_t)t * K + k];
            if (v < 0 || v >= E)
                return err_set(e, MR_EINVAL, "moe: replayed routing: token %d slot %d: expert %d is not in 0..%d", t,
                               k, (int)v, E - 1);
            for (int j = 0; j < k; j++)
                if (r[(size_t)t * K + j] == v)
                    return err_set(e, MR_EINVAL, "moe: replayed routing: token %d slot %d: expert %d already in slot %d",
                                   t, k, (int)v, j);
        }
    return MR_OK;
}

int moe_gate_route(int32_t *idx, float *weights, const float *scores, const float *bias, const int32_t *replay_idx,
                   const moe_cfg *c, int T, mr_err *e) {
    int rc = moe_cfg_check(c, e);
    if (rc) return rc;
    const int E = c->E, K = c->K;
    if (replay_idx) {
        rc = check_replay(replay_idx, T, K, E, e);
        if (rc) return rc;
        if (replay_idx != idx) memcpy(idx, replay_idx, sizeof(int32_t) * (size_t)T * K);
    }
    const bool norm = renormalizes(c);
    const float rsf = c->routed_scaling_factor;
#pragma omp parallel for schedule(static) if ((int64_t)T * E >= MOE_PAR_MIN)
    for (int t = 0; t < T; t++) {
        const float *s = scores + (size_t)t * E;
        int32_t *it = idx + (size_t)t * K;
        float *wt = weights + (size_t)t * K;
        if (!replay_idx) route_token(it, wt, s, bias, c); /* wt holds the selection scores for a moment */
        float sum = 0.0f;
        for (int k = 0; k < K; k++) sum += s[it[k]];
        for (int k = 0; k < K; k++) {
            float g = s[it[k]];
            if (norm) g = g / (sum + MOE_NORM_EPS);
            wt[k] = g * rsf;
        }
    }
    return MR_OK;
}

int moe_gate_forward(int32_t *idx, float *weights, float *scores, const float *x, const int32_t *replay_idx,
                     const float *gate_w, const float *bias, const moe_cfg *c, int T, mr_err *e) {
    int rc = moe_cfg_check(c, e);
    if (rc) return rc;
    const int E = c->E;
    if (replay_idx) { /* before writing anything, so a refused replay leaves the outputs as they were */
        rc = check_replay(replay_idx, T, c->K, E, e);
        if (rc) return rc;
    }
    matmul_forward(scores, x, gate_w, T, c->d, E, 0.0f, c->mm);
#pragma omp parallel for schedule(static) if ((int64_t)T * E >= MOE_PAR_MIN)
    for (int t = 0; t < T; t++) {
        float *z = scores + (size_t)t * E;
        if (c->score == MOE_SCORE_SIGMOID) {
            for (int i = 0; i < E; i++) z[i] = 1.0f / (1.0f + expf(-z[i]));
        } else {
            float mx = z[0], sum = 0.0f;
            for (int i = 1; i < E; i++) mx = z[i] > mx ? z[i] : mx;
            for (int i = 0; i < E; i++) {
                z[i] = expf(z[i] - mx);
                sum += z[i];
            }
            for (int i = 0; i < E; i++) z[i] /= sum;
        }
    }
    return moe_gate_route(idx, weights, scores, bias, replay_idx, c, T, e);
}

void moe_gate_backward(float *dx, float *dgate_w, float *dz, const float *dweights, const float *daff,
                       const float *scores, const int32_t *idx, const float *x, const float *gate_w, const moe_cfg *c,
                       int T) {
    const int E = c->E, K = c->K;
    const bool norm = renormalizes(c);
    const float rsf = c->routed_scaling_factor;
#pragma omp parallel for schedule(static) if ((int64_t)T * E >= MOE_PAR_MIN)
    for (int t = 0; t < T; t++) {
        const float *s = scores + (size_t)t * E;
        const int32_t *it = idx + (size_t)t * K;
        const float *dg = dweights + (size_t)t * K;
        float *ds = dz + (size_t)t * E; /* d(affinities) first, then turned into d(logits) in place */
        if (daff)
            memcpy(ds, daff + (size_t)t * E, sizeof(float) * E);
        else
            memset(ds, 0, sizeof(float) * E);
        if (norm) {
            /* g_k = rsf·s_k/D, D = Σ_m s_m + eps:  ∂L/∂s_k = rsf·(dg_k − Σ_m dg_m·s_m / D) / D. */
            float D = 0.0f, a = 0.0f;
            for (int k = 0; k < K; k++) D += s[it[k]];
            D += MOE_NORM_EPS;
            for (int k = 0; k < K; k++) a += dg[k] * s[it[k]];
            a /= D;
            for (int k = 0; k < K; k++) ds[it[k]] += rsf * (dg[k] - a) / D;
        } else {
            for (int k = 0; k < K; k++) ds[it[k]] += rsf * dg[k];
        }
        if (c->score == MOE_SCORE_SIGMOID) {
            for (int i = 0; i < E; i++) ds[i] *= s[i] * (1.0f - s[i]);
        } else {
            float dot = 0.0f;
            for (int i = 0; i < E; i++) dot += ds[i] * s[i];
            for (int i = 0; i < E; i++) ds[i] = s[i] * (ds[i] - dot);
        }
    }
    matmul_backward(dx, dgate_w, dz, x, gate_w, T, c->d, E, c->mm_bwd);
}

/* ---- Dispatch --------------------------------------------------------------------------------------------- */

void moe_dispatch_build(int32_t *off, int32_t *order, int32_t *pos, int64_t *load, const int32_t *idx, int T, int K,
                        int E) {
    const int32_t n = (int32_t)((int64_t)T * K);
    memset(off, 0, sizeof(int32_t) * ((size_t)E + 1));
    for (int32_t p = 0; p < n; p++) off[idx[p] + 1]++;
    for (int i = 0; i < E; i++) off[i + 1] += off[i]; /* off[e] = first row of e */
    /* Walking pairs in ascending p = t·K + k keeps tokens ascending within each expert; off[e] advances as a
     * cursor to the end of e, i.e. to the old off[e+1], and is shifted back below. */
    for (int32_t p = 0; p < n; p++) {
        int32_t r = off[idx[p]]++;
        order[r] = p;
        pos[p] = r;
    }
    for (int i = E; i > 0; i--) off[i] = off[i - 1];
    off[0] = 0;
    if (load)
        for (int i = 0; i < E; i++) load[i] = off[i + 1] - off[i];
}

void moe_gather(float *xg, const float *x, const int32_t *order, int T, int K, int d) {
    const int64_t n = (int64_t)T * K;
#pragma omp parallel for schedule(static) if (n * d >= MOE_PAR_MIN)
    for (int64_t r = 0; r < n; r++)
        memcpy(xg + (size_t)r * d, x + (size_t)(order[r] / K) * d, sizeof(float) * d);
}

void moe_combine(float *out, const float *rows, const int32_t *pos, int T, int K, int d) {
#pragma omp parallel for schedule(static) if ((int64_t)T * K * d >= MOE_PAR_MIN)
    for (int t = 0; t < T; t++) {
        float *o = out + (size_t)t * d;
        memcpy(o, rows + (size_t)pos[(size_t)t * K] * d, sizeof(float) * d);
        for (int k = 1; k < K; k++) {
            const float *r = rows + (size_t)pos[(size_t)t * K + k] * d;
            for (int j = 0; j < d; j++) o[j] += r[j];
        }
    }
}

/* ---- Layer ------------------------------------------------------------------------------------------------ */

/* Whether the experts' GEMMs run side by side, one expert per thread (the matmul inside then runs on that thread
 * alone: nested regions are off), rather than one after another with the threads inside each matmul. Side by side
 * pays when each GEMM is too small to thread well (many small experts). Either way each output row and each dW_e is
 * produced by one matmul call over the same rows, and MM_DET promises the same bits whatever the thread count, so
 * the results do not change. Only MM_DET: concurrent OpenBLAS calls would oversubscribe its own threads. */
static bool experts_side_by_side(const moe_cfg *c, mm_mode mm, int64_t TK) {
    if (mm != MM_DET || c->E < 2) return false;
    const double per_expert = (double)TK * c->d * c->I_e / c->E;
    return per_expert < MOE_PAR_EXPERT_WORK;
}

/* The per-expert GEMMs of a layer: one expert's segment of rows, its contiguous block of the sorted buffers. */
typedef struct {
    const moe_saved *s;
    moe_work *w;
    const moe_params *p;
    const moe_grads *g;
    const moe_cfg *c;
    float *dxg; /* backward: input gradient of the sorted rows, or NULL */
} expert_ctx;

static void fwd_gate_up(const expert_ctx *k, int ex) {
    const int r0 = k->s->off[ex], n = k->s->off[ex + 1] - r0, d = k->c->d, Ie = k->c->I_e;
    const float *xe = k->s->xg + (size_t)r0 * d;
    matmul_forward(k->s->hg + (size_t)r0 * Ie, xe, k->p->gate_proj[ex], n, d, Ie, 0.0f, k->c->mm);
    matmul_forward(k->s->hu + (size_t)r0 * Ie, xe, k->p->up_proj[ex], n, d, Ie, 0.0f, k->c->mm);
}

static void fwd_down(const expert_ctx *k, int ex) {
    const int r0 = k->s->off[ex], n = k->s->off[ex + 1] - r0, d = k->c->d, Ie = k->c->I_e;
    matmul_forward(k->w->rows_d + (size_t)r0 * d, k->w->hs + (size_t)r0 * Ie, k->p->down_proj[ex], n, Ie, d, 0.0f,
                   k->c->mm);
}

static void bwd_down(const expert_ctx *k, int ex) {
    const int r0 = k->s->off[ex], n = k->s->off[ex + 1] - r0, d = k->c->d, Ie = k->c->I_e;
    matmul_backward(k->w->dh + (size_t)r0 * Ie, k->g->down_proj ? k->g->down_proj[ex] : NULL,
                    k->w->rows_d + (size_t)r0 * d, k->w->hs + (size_t)r0 * Ie, k->p->down_proj[ex], n, Ie, d,
                    k->c->mm_bwd);
}

static void bwd_gate_up(const expert_ctx *k, int ex) {
    const int r0 = k->s->off[ex], n = k->s->off[ex + 1] - r0, d = k->c->d, Ie = k->c->I_e;
    float *dxe = k->dxg ? k->dxg + (size_t)r0 * d : NULL;
    const float *xe = k->s->xg + (size_t)r0 * d;
    matmul_backward(dxe, k->g->gate_proj ? k->g->gate_proj[ex] : NULL, k->w->dhg + (size_t)r0 * Ie, xe,
                    k->p->gate_proj[ex], n, d, Ie, k->c->mm_bwd);
    matmul_backward(dxe, k->g->up_proj ? k->g->up_proj[ex] : NULL, k->w->dhu + (size_t)r0 * Ie, xe,
                    k->p->up_proj[ex], n, d, Ie, k->c->mm_bwd);
}

/* fn on every expert with rows: side by side on the threads when par, else one after another on this thread (each
 * matmul then threads itself). Not one region with if (par): libgomp starts fresh threads for every region nested
 * in an inactive one, so each expert's matmul would create (and join) a thread. */
static void for_experts(bool par, const expert_ctx *k, void (*fn)(const expert_ctx *, int)) {
    const int E = k->c->E;
    if (par) {
#pragma omp parallel for schedule(dynamic, 1)
        for (int ex = 0; ex < E; ex++)
            if (k->s->off[ex + 1] > k->s->off[ex]) fn(k, ex);
    } else {
        for (int ex = 0; ex < E; ex++)
            if (k->s->off[ex + 1] > k->s->off[ex]) fn(k, ex);
    }
}

/* moe_forward's experts for a few rows (decode): every expert's gate and up plus the shared ones in one parallel
 * region, every down in another (matmul_forward_batch), where one region per GEMM would cost more than the GEMMs.
 * The same arithmetic as the general path: the shared down goes into out first and the routed sum is added to it
 * (x + y = y + x), so out = (Σ_k rows, slot order) + shared, as moe_combine and then a beta = 1 shared down. */
static void moe_forward_few(float *out, moe_saved *s, moe_work *w, const float *x, const moe_params *p,
                            const moe_cfg *c, int T) {
    const int d = c->d, K = c->K, Ie = c->I_e, Is = c->I_s;
    const int64_t TK = (int64_t)T * K;
    mm_job jb[2 * MOE_FEW_ROWS * 8 + 2];
    int nj = 0;
    for (int ex = 0; ex < c->E; ex++) {
        const int r0 = s->off[ex], n = s->off[ex + 1] - r0;
        if (n == 0) continue;
        jb[nj++] = (mm_job){s->hg + (size_t)r0 * Ie, s->xg + (size_t)r0 * d, p->gate_proj[ex], n, d, Ie, 0.0f};
        jb[nj++] = (mm_job){s->hu + (size_t)r0 * Ie, s->xg + (size_t)r0 * d, p->up_proj[ex], n, d, Ie, 0.0f};
    }
    if (Is > 0) {
        jb[nj++] = (mm_job){s->sg, x, p->sh_gate, T, d, Is, 0.0f};
        jb[nj++] = (mm_job){s->su, x, p->sh_up, T, d, Is, 0.0f};
    }
    matmul_forward_batch(jb, nj, c->mm);
    swiglu_forward(w->h, s->hg, s->hu, (int)TK, Ie);
    if (Is > 0) swiglu_forward(w->sh_h, s->sg, s->su, T, Is);
    for (int64_t r = 0; r < TK; r++) {
        const float g = s->weights[s->order[r]];
        for (int j = 0; j < Ie; j++) w->hs[(size_t)r * Ie + j] = g * w->h[(size_t)r * Ie + j];
    }
    nj = 0;
    for (int ex = 0; ex < c->E; ex++) {
        const int r0 = s->off[ex], n = s->off[ex + 1] - r0;
        if (n == 0) continue;
        jb[nj++] = (mm_job){w->rows_d + (size_t)r0 * d, w->hs + (size_t)r0 * Ie, p->down_proj[ex], n, Ie, d, 0.0f};
    }
    if (Is > 0) jb[nj++] = (mm_job){out, w->sh_h, p->sh_down, T, Is, d, 0.0f};
    matmul_forward_batch(jb, nj, c->mm);
    if (Is == 0) {
        moe_combine(out, w->rows_d, s->pos, T, K, d);
        return;
    }
    for (int t = 0; t < T; t++) {
        float *o = out + (size_t)t * d;
        const int32_t *pt = s->pos + (size_t)t * K;
        for (int j = 0; j < d; j++) {
            float acc = w->rows_d[(size_t)pt[0] * d + j];
            for (int k = 1; k < K; k++) acc += w->rows_d[(size_t)pt[k] * d + j];
            o[j] = acc + o[j];
        }
    }
}

int moe_forward(float *out, moe_saved *s, moe_work *w, const float *x, const int32_t *replay_idx,
                const moe_params *p, const moe_cfg *c, int T, mr_err *e) {
    if (T < 0 || T > s->T_max || T > w->T_max)
        return err_set(e, MR_ERANGE, "moe: forward of %d tokens exceeds the %d tokens the buffers were sized for", T,
                       s->T_max < w->T_max ? s->T_max : w->T_max);
    int rc = moe_gate_forward(s->idx, s->weights, s->scores, x, replay_idx, p->gate_w, p->gate_bias, c, T, e);
    if (rc) return rc;
    s->T = T;
    const int d = c->d, K = c->K, Ie = c->I_e, Is = c->I_s;
    const int64_t TK = (int64_t)T * K;
    moe_dispatch_build(s->off, s->order, s->pos, s->load, s->idx, T, K, c->E);
    moe_gather(s->xg, x, s->order, T, K, d);
    if (c->mm == MM_DET && T <= MOE_FEW_ROWS && TK <= MOE_FEW_ROWS * 8) {
        moe_forward_few(out, s, w, x, p, c, T);
        return MR_OK;
    }
    /* One GEMM per expert over its contiguous segment of rows (never a GEMV per token). */
    const bool par = experts_side_by_side(c, c->mm, TK);
    const expert_ctx ek = {.s = s, .w = w, .p = p, .c = c};
    for_experts(par, &ek, fwd_gate_up);
    swiglu_forward(w->h, s->hg, s->hu, (int)TK, Ie);
    /* The routing weight scales the down_proj input: g·(W_down·h) = W_down·(g·h), and the backward then gets
     * ∂L/∂g = ⟨∂L/∂(g·h), h⟩ without keeping the expert outputs. */
#pragma omp parallel for schedule(static) if (TK * Ie >= MOE_PAR_MIN)
    for (int64_t r = 0; r < TK; r++) {
        const float g = s->weights[s->order[r]];
        for (int j = 0; j < Ie; j++) w->hs[(size_t)r * Ie + j] = g * w->h[(size_t)r * Ie + j];
    }
    for_experts(par, &ek, fwd_down);
    moe_combine(out, w->rows_d, s->pos, T, K, d);
    if (Is > 0) { /* shared experts: a dense SwiGLU MLP on every token, added to the routed sum (§7.2) */
        matmul_forward(s->sg, x, p->sh_gate, T, d, Is, 0.0f, c->mm);
        matmul_forward(s->su, x, p->sh_up, T, d, Is, 0.0f, c->mm);
        swiglu_forward(w->sh_h, s->sg, s->su, T, Is);
        matmul_forward(out, w->sh_h, p->sh_down, T, Is, d, 1.0f, c->mm);
    }
    return MR_OK;
}

void moe_backward(float *dx, const moe_grads *g, moe_work *w, const float *dout, const float *daff,
                  const moe_saved *s, const float *x, const moe_params *p, const moe_cfg *c) {
    const int T = s->T, d = c->d, K = c->K, Ie = c->I_e, Is = c->I_s;
    const int64_t TK = (int64_t)T * K;
    const bool par = experts_side_by_side(c, c->mm_bwd, TK);
    assert(T <= w->T_max);
    if (Is > 0) {
        swiglu_forward(w->sh_h, s->sg, s->su, T, Is);
        memset(w->sh_dh, 0, sizeof(float) * (size_t)T * Is);
        matmul_backward(w->sh_dh, g->sh_down, dout, w->sh_h, p->sh_down, T, Is, d, c->mm_bwd);
        memset(w->sh_dg, 0, sizeof(float) * (size_t)T * Is);
        memset(w->sh_du, 0, sizeof(float) * (size_t)T * Is);
        swiglu_backward(w->sh_dg, w->sh_du, w->sh_dh, s->sg, s->su, T, Is);
        matmul_backward(dx, g->sh_gate, w->sh_dg, x, p->sh_gate, T, d, Is, c->mm_bwd);
        matmul_backward(dx, g->sh_up, w->sh_du, x, p->sh_up, T, d, Is, c->mm_bwd);
    }

    /* Routed experts. rows_d first holds the output gradient of each sorted row, then its input gradient. */
    moe_gather(w->rows_d, dout, s->order, T, K, d);
    swiglu_forward(w->h, s->hg, s->hu, (int)TK, Ie);
#pragma omp parallel for schedule(static) if (TK * Ie >= MOE_PAR_MIN)
    for (int64_t r = 0; r < TK; r++) {
        const float gr = s->weights[s->order[r]];
        for (int j = 0; j < Ie; j++) w->hs[(size_t)r * Ie + j] = gr * w->h[(size_t)r * Ie + j];
    }
    memset(w->dh, 0, sizeof(float) * (size_t)TK * Ie);
    expert_ctx ek = {.s = s, .w = w, .p = p, .g = g, .c = c};
    for_experts(par, &ek, bwd_down);
    /* dh holds ∂L/∂(g·h): the weight gets ⟨·, h⟩, the activation gets g·(·). */
#pragma omp parallel for schedule(static) if (TK * Ie >= MOE_PAR_MIN)
    for (int64_t r = 0; r < TK; r++) {
        const int32_t pr = s->order[r];
        float *dhr = w->dh + (size_t)r * Ie;
        const float *hr = w->h + (size_t)r * Ie;
        float dot = 0.0f;
        for (int j = 0; j < Ie; j++) dot += dhr[j] * hr[j];
        w->dweights[pr] = dot;
        const float gr = s->weights[pr];
        for (int j = 0; j < Ie; j++) dhr[j] *= gr;
    }
    memset(w->dhg, 0, sizeof(float) * (size_t)TK * Ie);
    memset(w->dhu, 0, sizeof(float) * (size_t)TK * Ie);
    swiglu_backward(w->dhg, w->dhu, w->dh, s->hg, s->hu, (int)TK, Ie);
    if (dx) memset(w->rows_d, 0, sizeof(float) * (size_t)TK * d);
    float *dxg = dx ? w->rows_d : NULL;
    ek.dxg = dxg;
    for_experts(par, &ek, bwd_gate_up);
    if (dx) {
#pragma omp parallel for schedule(static) if (TK * d >= MOE_PAR_MIN)
        for (int t = 0; t < T; t++) {
            float *o = dx + (size_t)t * d;
            for (int k = 0; k < K; k++) { /* slot order: fixed */
                const float *r = w->rows_d + (size_t)s->pos[(size_t)t * K + k] * d;
                for (int j = 0; j < d; j++) o[j] += r[j];
            }
        }
    }
    moe_gate_backward(dx, g->gate_w, w->dz, w->dweights, daff, s->scores, s->idx, x, p->gate_w, c, T);
}

/* ---- Balancing -------------------------------------------------------------------------------------------- */

int moe_balance_loss(double *loss, float *daff, const float *scores, const int32_t *idx, const int *seq_len,
                     int n_seq, int T, int E, int K, float alpha, mr_err *e) {
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
    double *f = mem_calloc((size_t)E, sizeof(double));
    if (!f) return err_set(e, MR_ENOMEM, "moe: balance loss: cannot allocate %d counters", E);
    double L = 0.0;
    int t0 = 0;
    for (int q = 0; q < n_seq; q++) {
        const int Ts = seq_len[q];
        if (Ts == 0) continue;
        memset(f, 0, sizeof(double) * (size_t)E);
        for (int t = t0; t < t0 + Ts; t++)
            for (int k = 0; k < K; k++) f[idx[(size_t)t * K + k]] += 1.0;
        const double fscale = (double)E / ((double)K * Ts);
        for (int i = 0; i < E; i++) f[i] *= fscale;
        /* Σ_i f_i·P_i = (1/T_s)·Σ_t Σ_i f_i·s_{i,t}/S_t. */
        double Lq = 0.0;
        const double gscale = (double)alpha / ((double)Ts * nonempty);
        for (int t = t0; t < t0 + Ts; t++) {
            const float *st = scores + (size_t)t * E;
            double S = 0.0, fs = 0.0;
            for (int i = 0; i < E; i++) {
                S += st[i];
                fs += f[i] * st[i];
            }
            Lq += fs / S;
            if (daff) { /* ∂(Σ_i f_i s_i / S)/∂s_j = f_j/S − Σ_i f_i s_i / S² */
                float *dt = daff + (size_t)t * E;
                const double c0 = fs / (S * S);
                for (int i = 0; i < E; i++) dt[i] += (float)(gscale * (f[i] / S - c0));
            }
        }
        L += (double)alpha * Lq / Ts;
        t0 += Ts;
    }
    mem_free(f);
    *loss = nonempty ? L / nonempty : 0.0;
    return MR_OK;
}

void moe_bias_update(float *bias, const int64_t *load, int E, float gamma) {
    int64_t total = 0;
    for (int i = 0; i < E; i++) total += load[i];
    /* sign(c̄ − c_i) with c̄ = total/E, compared as total vs E·c_i so "exactly balanced" is exact. */
    for (int i = 0; i < E; i++) {
        const int64_t ec = (int64_t)E * load[i];
        if (total > ec)
            bias[i] += gamma;
        else if (total < ec)
            bias[i] -= gamma;
    }
}

double moe_load_stats(const int64_t *load, int E, int64_t *max, double *mean) {
    int64_t mx = 0, total = 0;
    for (int i = 0; i < E; i++) {
        total += load[i];
        if (i == 0 || load[i] > mx) mx = load[i];
    }
    const double mn = E > 0 ? (double)total / E : 0.0;
    if (max) *max = mx;
    if (mean) *mean = mn;
    return mn > 0.0 ? ((double)mx - mn) / mn : 0.0;
}
