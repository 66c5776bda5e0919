/* test_moe.c: the DeepSeekMoE layer (kernels/cpu/moe.h).
 * Golden router cases written by hand; dispatch permutation; the layer against an independent PyTorch reference
 * (tests/ref/moe_ref.py) and against a naive per-token double-precision reference written here; finite-difference
 * gradients of everything (routing held fixed and checked not to flip); balance loss by hand and by FD; bias
 * update; thread-count and batch independence; routing replay; error paths and allocation failures. */
#include <criterion/criterion.h>
#include <math.h>
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/mem.h"
#include "kernels/cpu/moe.h"

#define MAXE 16

/* ---- helpers ---------------------------------------------------------------------------------------------- */

static uint64_t rng_state;
static float urand(float lo, float hi) { /* xorshift64*: reproducible test data */
    rng_state ^= rng_state >> 12;
    rng_state ^= rng_state << 25;
    rng_state ^= rng_state >> 27;
    uint64_t r = rng_state * 0x2545F4914F6CDD1Dull;
    return lo + (hi - lo) * (float)((r >> 40) / 16777216.0);
}

static moe_cfg mkcfg(int d, int E, int K, int G, int Gt, int Ie, int Is, moe_score_func sf, moe_topk_method m,
                     bool norm, float rsf) {
    moe_cfg c = {.d = d, .E = E, .K = K, .I_e = Ie, .I_s = Is, .n_group = G, .topk_group = Gt, .score = sf,
                 .method = m, .norm_topk_prob = norm, .routed_scaling_factor = rsf, .mm = MM_DET, .mm_bwd = MM_DET};
    return c;
}

/* All parameters of one layer in one flat array (float for the kernel, double for the reference) so FD can walk
 * every element: [gate_w E·d][bias E][gate_proj E·Ie·d][up_proj E·Ie·d][down_proj E·d·Ie][sh_gate][sh_up][sh_down]. */
enum { SEG_GW, SEG_BIAS, SEG_EG, SEG_EU, SEG_ED, SEG_SG, SEG_SU, SEG_SD, NSEG };
static const char *seg_name[NSEG] = {"gate.weight", "bias", "gate_proj", "up_proj", "down_proj",
                                     "shared.gate_proj", "shared.up_proj", "shared.down_proj"};

typedef struct layer {
    moe_cfg c;
    size_t off[NSEG + 1];
    float *pf;  /* parameters, float */
    double *pd; /* the same values, double (the reference reads these) */
    const float *pg[MAXE], *pu[MAXE], *pdn[MAXE];
    moe_params p;
} layer;

static void layer_layout(size_t *off, const moe_cfg *c) {
    size_t d = c->d, E = c->E, Ie = c->I_e, Is = c->I_s;
    size_t n[NSEG] = {E * d, E, E * Ie * d, E * Ie * d, E * d * Ie, Is * d, Is * d, d * Is};
    off[0] = 0;
    for (int i = 0; i < NSEG; i++) off[i + 1] = off[i] + n[i];
}

/* Points a moe_params (or the float* arrays of a moe_grads) into a flat array. */
static void point_params(moe_params *p, const float **pg, const float **pu, const float **pdn, const float *base,
                         const size_t *off, const moe_cfg *c, bool with_bias) {
    size_t eg = (size_t)c->I_e * c->d;
    for (int e = 0; e < c->E; e++) {
        pg[e] = base + off[SEG_EG] + e * eg;
        pu[e] = base + off[SEG_EU] + e * eg;
        pdn[e] = base + off[SEG_ED] + e * eg;
    }
    p->gate_w = base + off[SEG_GW];
    p->gate_bias = with_bias ? base + off[SEG_BIAS] : NULL;
    p->gate_proj = pg;
    p->up_proj = pu;
    p->down_proj = pdn;
    p->sh_gate = base + off[SEG_SG];
    p->sh_up = base + off[SEG_SU];
    p->sh_down = base + off[SEG_SD];
}

static void layer_init(layer *L, const moe_cfg *c, uint64_t seed, float bias_amp) {
    memset(L, 0, sizeof *L);
    L->c = *c;
    layer_layout(L->off, c);
    size_t n = L->off[NSEG];
    L->pf = calloc(n, sizeof(float));
    L->pd = calloc(n, sizeof(double));
    rng_state = seed;
    for (int s = 0; s < NSEG; s++) {
        float amp = s == SEG_GW ? 1.0f : s == SEG_BIAS ? bias_amp : 0.5f;
        for (size_t i = L->off[s]; i < L->off[s + 1]; i++) L->pf[i] = urand(-amp, amp);
    }
    for (size_t i = 0; i < n; i++) L->pd[i] = L->pf[i];
    point_params(&L->p, L->pg, L->pu, L->pdn, L->pf, L->off, c, bias_amp > 0.0f);
}

static void layer_free(layer *L) {
    free(L->pf);
    free(L->pd);
}

/* ---- naive double-precision reference (per token, GEMV; only here) ----------------------------------------- */

typedef struct ref_out {
    double margin; /* smallest gap between a chosen and a rejected candidate (groups and experts) */
} ref_out;

static double dsilu(double v) { return v / (1.0 + exp(-v)); }

/* Indices 0..n-1 ordered by value descending, ties by lower index (selection sort, O(n²), plain on purpose). */
static void rank_desc(int *ord, const double *v, int n) {
    bool used[64] = {0};
    for (int r = 0; r < n; r++) {
        int best = -1;
        for (int i = 0; i < n; i++)
            if (!used[i] && (best < 0 || v[i] > v[best])) best = i;
        used[best] = true;
        ord[r] = best;
    }
}

/* One token: fills out (d), idx (K, descending selection), g (K), aff (E). Returns the selection margin. */
static double ref_token(double *out, int32_t *idx, double *g, double *aff, const double *x, const double *P,
                        const size_t *off, const moe_cfg *c, bool with_bias, const int32_t *forced) {
    const int d = c->d, E = c->E, K = c->K, G = c->n_group, gs = E / G, Ie = c->I_e, Is = c->I_s;
    double z[64], sel[64], margin = INFINITY;
    for (int i = 0; i < E; i++) {
        z[i] = 0.0;
        for (int j = 0; j < d; j++) z[i] += P[off[SEG_GW] + (size_t)i * d + j] * x[j];
    }
    if (c->score == MOE_SCORE_SIGMOID) {
        for (int i = 0; i < E; i++) aff[i] = 1.0 / (1.0 + exp(-z[i]));
    } else {
        double mx = z[0], sum = 0.0;
        for (int i = 1; i < E; i++) mx = fmax(mx, z[i]);
        for (int i = 0; i < E; i++) sum += exp(z[i] - mx);
        for (int i = 0; i < E; i++) aff[i] = exp(z[i] - mx) / sum;
    }
    for (int i = 0; i < E; i++)
        sel[i] = aff[i] + (c->method == MOE_TOPK_NOAUX_TC && with_bias ? P[off[SEG_BIAS] + i] : 0.0);
    bool kept[64];
    for (int i = 0; i < E; i++) kept[i] = true;
    if (c->method != MOE_TOPK_GREEDY && c->topk_group < G) {
        double gsc[64];
        int go[64];
        for (int gi = 0; gi < G; gi++) {
            int o[64];
            rank_desc(o, sel + gi * gs, gs);
            gsc[gi] = sel[gi * gs + o[0]];
            if (c->method == MOE_TOPK_NOAUX_TC && gs >= 2) gsc[gi] += sel[gi * gs + o[1]];
        }
        rank_desc(go, gsc, G);
        margin = gsc[go[c->topk_group - 1]] - gsc[go[c->topk_group]];
        for (int r = c->topk_group; r < G; r++)
            for (int i = go[r] * gs; i < (go[r] + 1) * gs; i++) kept[i] = false;
    }
    double cand[64];
    int ord[64];
    for (int i = 0; i < E; i++) cand[i] = kept[i] ? sel[i] : -INFINITY;
    rank_desc(ord, cand, E);
    if (K < E && isfinite(cand[ord[K]])) margin = fmin(margin, cand[ord[K - 1]] - cand[ord[K]]);
    for (int k = 0; k < K; k++) idx[k] = forced ? forced[k] : ord[k];
    bool norm = c->norm_topk_prob && (c->method == MOE_TOPK_NOAUX_TC || K > 1);
    double sum = 0.0;
    for (int k = 0; k < K; k++) sum += aff[idx[k]];
    for (int k = 0; k < K; k++) g[k] = (norm ? aff[idx[k]] / sum : aff[idx[k]]) * c->routed_scaling_factor;
    for (int j = 0; j < d; j++) out[j] = 0.0;
    for (int k = 0; k < K; k++) {
        const int e = idx[k];
        const double *Wg = P + off[SEG_EG] + (size_t)e * Ie * d, *Wu = P + off[SEG_EU] + (size_t)e * Ie * d;
        const double *Wd = P + off[SEG_ED] + (size_t)e * d * Ie;
        double h[64];
        for (int i = 0; i < Ie; i++) {
            double a = 0.0, b = 0.0;
            for (int j = 0; j < d; j++) {
                a += Wg[(size_t)i * d + j] * x[j];
                b += Wu[(size_t)i * d + j] * x[j];
            }
            h[i] = dsilu(a) * b;
        }
        for (int j = 0; j < d; j++) {
            double y = 0.0;
            for (int i = 0; i < Ie; i++) y += Wd[(size_t)j * Ie + i] * h[i];
            out[j] += g[k] * y;
        }
    }
    if (Is > 0) {
        double h[64];
        for (int i = 0; i < Is; i++) {
            double a = 0.0, b = 0.0;
            for (int j = 0; j < d; j++) {
                a += P[off[SEG_SG] + (size_t)i * d + j] * x[j];
                b += P[off[SEG_SU] + (size_t)i * d + j] * x[j];
            }
            h[i] = dsilu(a) * b;
        }
        for (int j = 0; j < d; j++)
            for (int i = 0; i < Is; i++) out[j] += P[off[SEG_SD] + (size_t)j * Is + i] * h[i];
    }
    return margin;
}

/* Balance loss (§9.2) straight from the formulas, double. */
static double ref_balance(const double *aff, const int32_t *idx, const int *seq_len, int n_seq, int E, int K,
                          double alpha) {
    double total = 0.0;
    int t0 = 0, nonempty = 0;
    for (int q = 0; q < n_seq; q++) {
        int Ts = seq_len[q];
        if (!Ts) continue;
        nonempty++;
        double f[64] = {0}, P[64] = {0};
        for (int t = t0; t < t0 + Ts; t++) {
            for (int k = 0; k < K; k++) f[idx[t * K + k]] += (double)E / (K * Ts);
            double S = 0.0;
            for (int i = 0; i < E; i++) S += aff[t * E + i];
            for (int i = 0; i < E; i++) P[i] += aff[t * E + i] / S / Ts;
        }
        double l = 0.0;
        for (int i = 0; i < E; i++) l += f[i] * P[i];
        total += alpha * l;
        t0 += Ts;
    }
    return nonempty ? total / nonempty : 0.0;
}

/* Whole-layer reference: returns w_out·Σ R·out + w_bal·balance; idx (T, K); min margin in *margin. */
static double ref_loss(int32_t *idx, double *margin, const double *x, const double *P, const layer *L, int T,
                       const double *R, double w_bal, const int *seq_len, int n_seq, float alpha) {
    const moe_cfg *c = &L->c;
    double *aff = calloc((size_t)T * c->E, sizeof(double));
    double out[64], g[16], loss = 0.0, mg = INFINITY;
    for (int t = 0; t < T; t++) {
        double m = ref_token(out, idx + t * c->K, g, aff + (size_t)t * c->E, x + (size_t)t * c->d, P, L->off, c,
                             L->p.gate_bias != NULL, NULL);
        mg = fmin(mg, m);
        if (R)
            for (int j = 0; j < c->d; j++) loss += R[(size_t)t * c->d + j] * out[j];
    }
    if (w_bal != 0.0) loss += w_bal * ref_balance(aff, idx, seq_len, n_seq, c->E, c->K, alpha);
    free(aff);
    if (margin) *margin = mg;
    return loss;
}

/* ---- kernel harness --------------------------------------------------------------------------------------- */

typedef struct run {
    moe_saved s;
    moe_work w;
    float *out, *dx, *grad; /* grad: flat like layer.pf */
    float *gg[MAXE], *gu[MAXE], *gd[MAXE];
    moe_grads g;
} run;

static void run_init(run *r, const layer *L, int T) {
    mr_err e = {0};
    cr_assert_eq(moe_saved_init(&r->s, &L->c, T, &e), 0, "%s", e.msg);
    cr_assert_eq(moe_work_init(&r->w, &L->c, T, &e), 0, "%s", e.msg);
    r->out = calloc((size_t)T * L->c.d, sizeof(float));
    r->dx = calloc((size_t)T * L->c.d, sizeof(float));
    r->grad = calloc(L->off[NSEG], sizeof(float));
    size_t eg = (size_t)L->c.I_e * L->c.d;
    for (int e2 = 0; e2 < L->c.E; e2++) {
        r->gg[e2] = r->grad + L->off[SEG_EG] + e2 * eg;
        r->gu[e2] = r->grad + L->off[SEG_EU] + e2 * eg;
        r->gd[e2] = r->grad + L->off[SEG_ED] + e2 * eg;
    }
    r->g = (moe_grads){.gate_w = r->grad + L->off[SEG_GW], .gate_proj = r->gg, .up_proj = r->gu,
                       .down_proj = r->gd, .sh_gate = r->grad + L->off[SEG_SG], .sh_up = r->grad + L->off[SEG_SU],
                       .sh_down = r->grad + L->off[SEG_SD]};
}

static void run_free(run *r) {
    moe_saved_free(&r->s);
    moe_work_free(&r->w);
    free(r->out);
    free(r->dx);
    free(r->grad);
}

static void fill(float *v, size_t n, float lo, float hi) {
    for (size_t i = 0; i < n; i++) v[i] = urand(lo, hi);
}

/* ---- 1. router golden cases (by hand) ---------------------------------------------------------------------- */

typedef struct gate_case {
    const char *name;
    moe_topk_method method;
    int K, topk_group;
    bool norm;
    float rsf;
    float s[8], bias[8];
    bool has_bias;
    int32_t idx[3];
    float w[3];
} gate_case;

/* E = 8 experts in n_group = 4 groups {0,1} {2,3} {4,5} {6,7}. Values are dyadic so ties are exact. */
static const gate_case gate_cases[] = {
    /* s' = s − 2 < 0 everywhere. Group top-2 sums: g0 −3.25, g1 −3.125, g2 −3.5625, g3 −3.1875 → keep g1, g3;
     * candidates 2,3,6,7 (s' −1.875 −1.25 −1.8125 −1.375) → 3, 7. Weights from s: .75/1.375, .625/1.375, ×2.5.
     * (HF's 0.0 fill would pick the discarded experts here: 0 > every biased score.) */
    {"all biased scores negative", MOE_TOPK_NOAUX_TC, 2, 2, true, 2.5f,
     {0.5f, 0.25f, 0.125f, 0.75f, 0.375f, 0.0625f, 0.1875f, 0.625f},
     {-2, -2, -2, -2, -2, -2, -2, -2}, true, {3, 7}, {0.75f / 1.375f * 2.5f, 0.625f / 1.375f * 2.5f}},
    /* bias +0.5 on expert 4: s' groups .75 .875 .9375 .8125 → keep g2, g1; s' 4 = .875 > 3 = .75 → 4, 3; weights
     * from the unbiased s: .375/1.125, .75/1.125. */
    {"bias selects, weights unbiased", MOE_TOPK_NOAUX_TC, 2, 2, true, 1.0f,
     {0.5f, 0.25f, 0.125f, 0.75f, 0.375f, 0.0625f, 0.1875f, 0.625f},
     {0, 0, 0, 0, 0.5f, 0, 0, 0}, true, {4, 3}, {1.0f / 3.0f, 2.0f / 3.0f}},
    /* g1 and g2 tie at .875 with topk_group 1 → g1 (lower) kept → 3 (.5), 2 (.375). */
    {"group tie: lower group wins", MOE_TOPK_NOAUX_TC, 2, 1, false, 1.0f,
     {0.25f, 0.25f, 0.375f, 0.5f, 0.5f, 0.375f, 0.25f, 0.25f}, {0}, false, {3, 2}, {0.5f, 0.375f}},
    /* every score equal: groups 0, 1 kept, experts 0..3 tie → 0, 1. */
    {"all tied: lower indices win", MOE_TOPK_NOAUX_TC, 2, 2, true, 1.0f,
     {0.5f, 0.5f, 0.5f, 0.5f, 0.5f, 0.5f, 0.5f, 0.5f}, {0}, false, {0, 1}, {0.5f, 0.5f}},
    /* expert ties across two kept groups: g1 = g2 = 1.0 kept, 2,3,4,5 tie at .5 → 2, 3. */
    {"expert tie across groups", MOE_TOPK_NOAUX_TC, 2, 2, false, 1.0f,
     {0.25f, 0.25f, 0.5f, 0.5f, 0.5f, 0.5f, 0.25f, 0.25f}, {0}, false, {2, 3}, {0.5f, 0.5f}},
    /* highest single score (expert 0, .9375) in a discarded group: g0 1.0 < g1 = g2 = 1.0625 → experts 3, 5 (.5625
     * tie, 3 first); normalized .5/.5 × 2.5. */
    {"discarded group holds the top expert", MOE_TOPK_NOAUX_TC, 2, 2, true, 2.5f,
     {0.9375f, 0.0625f, 0.5f, 0.5625f, 0.5f, 0.5625f, 0.125f, 0.125f}, {0}, false, {3, 5}, {1.25f, 1.25f}},
    /* the same scores under group_limited_greedy (group score = max): g0 .9375 kept, then g1/g2 tie at .5625 → g1;
     * candidates 0..3 → 0, 3; not renormalized (norm off), × 2. */
    {"V2 group_limited_greedy uses the max", MOE_TOPK_GROUP_LIMITED_GREEDY, 2, 2, false, 2.0f,
     {0.9375f, 0.0625f, 0.5f, 0.5625f, 0.5f, 0.5625f, 0.125f, 0.125f}, {0}, false, {0, 3}, {1.875f, 1.125f}},
    /* norm_topk_prob off, scaling 2.5: groups .75 .875 .4375 .8125 → g1, g3 → 3, 7 → .75·2.5, .625·2.5. */
    {"norm off, scaling factor", MOE_TOPK_NOAUX_TC, 2, 2, false, 2.5f,
     {0.5f, 0.25f, 0.125f, 0.75f, 0.375f, 0.0625f, 0.1875f, 0.625f}, {0}, false, {3, 7}, {1.875f, 1.5625f}},
    /* V2 greedy ignores groups (and any bias): top-3 of s → 3, 7, 0; norm on: /1.875. */
    {"V2 greedy", MOE_TOPK_GREEDY, 3, 1, true, 1.0f,
     {0.5f, 0.25f, 0.125f, 0.75f, 0.375f, 0.0625f, 0.1875f, 0.625f},
     {0, 0, 0, 0, 0.5f, 0, 0, 0}, true, {3, 7, 0}, {0.4f, 0.625f / 1.875f, 0.5f / 1.875f}},
    /* V2 rule: renormalize only when K > 1, so K = 1 keeps the raw score. */
    {"V2 greedy K=1 not renormalized", MOE_TOPK_GREEDY, 1, 1, true, 1.0f,
     {0.5f, 0.25f, 0.125f, 0.75f, 0.375f, 0.0625f, 0.1875f, 0.625f}, {0}, false, {3}, {0.75f}},
    /* V3 rule: norm_topk_prob renormalizes even for K = 1 → weight 1 × 2.5. */
    {"V3 K=1 renormalized", MOE_TOPK_NOAUX_TC, 1, 2, true, 2.5f,
     {0.5f, 0.25f, 0.125f, 0.75f, 0.375f, 0.0625f, 0.1875f, 0.625f}, {0}, false, {3}, {2.5f}},
};

Test(moe_gate, golden_table) {
    for (size_t n = 0; n < sizeof gate_cases / sizeof gate_cases[0]; n++) {
        const gate_case *gc = &gate_cases[n];
        moe_cfg c = mkcfg(4, 8, gc->K, 4, gc->topk_group, 4, 0,
                          gc->method == MOE_TOPK_NOAUX_TC ? MOE_SCORE_SIGMOID : MOE_SCORE_SOFTMAX, gc->method,
                          gc->norm, gc->rsf);
        /* two tokens: the case, then the case again, to catch per-token state leaking between rows */
        float s[16], w[6];
        int32_t idx[6];
        memcpy(s, gc->s, sizeof gc->s);
        memcpy(s + 8, gc->s, sizeof gc->s);
        mr_err e = {0};
        cr_assert_eq(moe_gate_route(idx, w, s, gc->has_bias ? gc->bias : NULL, NULL, &c, 2, &e), 0, "%s: %s",
                     gc->name, e.msg);
        for (int t = 0; t < 2; t++)
            for (int k = 0; k < gc->K; k++) {
                cr_expect_eq(idx[t * gc->K + k], gc->idx[k], "%s: slot %d: expert %d, want %d", gc->name, k,
                             idx[t * gc->K + k], gc->idx[k]);
                cr_expect_float_eq(w[t * gc->K + k], gc->w[k], 1e-6, "%s: slot %d: weight %.9g, want %.9g",
                                   gc->name, k, w[t * gc->K + k], gc->w[k]);
            }
    }
}

Test(moe_gate, discarded_groups_never_chosen_random) {
    /* Property over random scores with strongly negative biases: every chosen expert lies in a kept group, i.e.
     * among the topk_group best groups by top-2 sum, and no expert appears twice. */
    moe_cfg c = mkcfg(4, 16, 4, 4, 2, 4, 0, MOE_SCORE_SIGMOID, MOE_TOPK_NOAUX_TC, true, 1.0f);
    rng_state = 99;
    for (int it = 0; it < 200; it++) {
        float s[16], b[16], w[4];
        int32_t idx[4];
        for (int i = 0; i < 16; i++) {
            s[i] = urand(0.0f, 1.0f);
            b[i] = urand(-5.0f, -3.0f);
        }
        cr_assert_eq(moe_gate_route(idx, w, s, b, NULL, &c, 1, NULL), 0);
        float gsc[4];
        for (int g = 0; g < 4; g++) {
            float v[4];
            for (int j = 0; j < 4; j++) v[j] = s[g * 4 + j] + b[g * 4 + j];
            float m1 = -INFINITY, m2 = -INFINITY;
            for (int j = 0; j < 4; j++)
                if (v[j] > m1) {
                    m2 = m1;
                    m1 = v[j];
                } else if (v[j] > m2)
                    m2 = v[j];
            gsc[g] = m1 + m2;
        }
        for (int k = 0; k < 4; k++) {
            int g = idx[k] / 4, better = 0;
            for (int h = 0; h < 4; h++) better += gsc[h] > gsc[g] || (gsc[h] == gsc[g] && h < g);
            cr_assert_lt(better, 2, "iteration %d: expert %d from a discarded group", it, idx[k]);
            for (int j = 0; j < k; j++) cr_assert_neq(idx[j], idx[k]);
        }
    }
}

Test(moe_gate, sigmoid_and_softmax_affinities) {
    /* x = (1, 0): logits = first column of the gate weight. */
    const float x[2] = {1.0f, 0.0f};
    const float wsig[8] = {0.0f, 7.0f, logf(3.0f), -1.0f, -logf(3.0f), 2.0f, 2.0f, 0.0f};
    float s[4], w[2];
    int32_t idx[2];
    moe_cfg c = mkcfg(2, 4, 2, 1, 1, 4, 0, MOE_SCORE_SIGMOID, MOE_TOPK_NOAUX_TC, true, 1.0f);
    cr_assert_eq(moe_gate_forward(idx, w, s, x, NULL, wsig, NULL, &c, 1, NULL), 0);
    const float want_sig[4] = {0.5f, 0.75f, 0.25f, 0.880797078f};
    for (int i = 0; i < 4; i++) cr_expect_float_eq(s[i], want_sig[i], 1e-6, "sigmoid %d: %.9g", i, s[i]);
    cr_expect(idx[0] == 3 && idx[1] == 1);
    cr_expect_float_eq(w[0], 0.880797078f / (0.880797078f + 0.75f), 1e-6);
    /* softmax of (0, ln 2, ln 3, ln 4) = (1, 2, 3, 4)/10 */
    const float wsm[8] = {0.0f, 1.0f, logf(2.0f), 0.0f, logf(3.0f), 0.0f, logf(4.0f), 0.0f};
    c = mkcfg(2, 4, 2, 1, 1, 4, 0, MOE_SCORE_SOFTMAX, MOE_TOPK_GREEDY, false, 1.0f);
    cr_assert_eq(moe_gate_forward(idx, w, s, x, NULL, wsm, NULL, &c, 1, NULL), 0);
    for (int i = 0; i < 4; i++) cr_expect_float_eq(s[i], 0.1f * (i + 1), 1e-6, "softmax %d: %.9g", i, s[i]);
    cr_expect(idx[0] == 3 && idx[1] == 2);
    cr_expect_float_eq(w[0], 0.4f, 1e-6);
    cr_expect_float_eq(w[1], 0.3f, 1e-6);
}

Test(moe_gate, config_errors) {
    mr_err e = {0};
    moe_cfg c = mkcfg(4, 8, 3, 4, 1, 4, 0, MOE_SCORE_SIGMOID, MOE_TOPK_NOAUX_TC, true, 1.0f);
    cr_expect_eq(moe_cfg_check(&c, &e), MR_EINVAL);
    cr_expect_str_eq(e.msg, "moe: num_experts_per_tok (3) exceeds the experts of the kept groups (1 groups of 2)");
    c = mkcfg(4, 8, 2, 3, 1, 4, 0, MOE_SCORE_SIGMOID, MOE_TOPK_NOAUX_TC, true, 1.0f);
    cr_expect_eq(moe_cfg_check(&c, &e), MR_EINVAL);
    cr_expect_str_eq(e.msg, "moe: n_group must be in 1..64 and divide n_routed_experts (8), got 3");
    c = mkcfg(4, 8, 9, 1, 1, 4, 0, MOE_SCORE_SIGMOID, MOE_TOPK_GREEDY, true, 1.0f);
    cr_expect_eq(moe_cfg_check(&c, &e), MR_EINVAL);
    cr_expect_str_eq(e.msg, "moe: num_experts_per_tok must be in 1..8, got 9");
    /* greedy ignores the group rule: K = 3 over 8 experts is fine with topk_group 1 */
    c = mkcfg(4, 8, 3, 4, 1, 4, 0, MOE_SCORE_SOFTMAX, MOE_TOPK_GREEDY, true, 1.0f);
    cr_expect_eq(moe_cfg_check(&c, &e), 0);
}

/* ---- 2. dispatch ------------------------------------------------------------------------------------------ */

Test(moe_dispatch, hand_example) {
    /* pairs p = t·K + k: 0:(t0,e2) 1:(t0,e0) 2:(t1,e0) 3:(t1,e1) 4:(t2,e2) 5:(t2,e1); expert 3 gets none. */
    const int32_t idx[6] = {2, 0, 0, 1, 2, 1};
    int32_t off[5], order[6], pos[6];
    int64_t load[4];
    moe_dispatch_build(off, order, pos, load, idx, 3, 2, 4);
    const int32_t want_off[5] = {0, 2, 4, 6, 6}, want_order[6] = {1, 2, 3, 5, 0, 4}, want_pos[6] = {4, 0, 1, 2, 5, 3};
    const int64_t want_load[4] = {2, 2, 2, 0};
    cr_expect(memcmp(off, want_off, sizeof off) == 0);
    cr_expect(memcmp(order, want_order, sizeof order) == 0);
    cr_expect(memcmp(pos, want_pos, sizeof pos) == 0);
    cr_expect(memcmp(load, want_load, sizeof load) == 0);
}

Test(moe_dispatch, permutation_round_trip) {
    enum { T = 37, K = 3, E = 7, D = 5 };
    int32_t idx[T * K], off[E + 1], order[T * K], pos[T * K];
    int64_t load[E];
    rng_state = 7;
    for (int t = 0; t < T; t++) /* distinct experts per token, expert 6 never used */
        for (int k = 0; k < K; k++) {
            int32_t v;
            bool dup;
            do {
                v = (int32_t)urand(0.0f, 5.999f);
                dup = false;
                for (int j = 0; j < k; j++) dup |= idx[t * K + j] == v;
            } while (dup);
            idx[t * K + k] = v;
        }
    moe_dispatch_build(off, order, pos, load, idx, T, K, E);
    cr_assert_eq(off[0], 0);
    cr_assert_eq(off[E], T * K);
    cr_expect_eq(load[6], 0);
    bool seen[T * K] = {0};
    for (int e = 0; e < E; e++) {
        int64_t cnt = 0;
        for (int p = 0; p < T * K; p++) cnt += idx[p] == e;
        cr_expect_eq(load[e], cnt, "expert %d load", e);
        cr_expect_eq(off[e + 1] - off[e], cnt);
        for (int r = off[e]; r < off[e + 1]; r++) {
            cr_assert_eq(idx[order[r]], e, "row %d holds expert %d in the segment of %d", r, idx[order[r]], e);
            if (r > off[e]) cr_assert_lt(order[r - 1] / K, order[r] / K, "tokens not ascending in expert %d", e);
            cr_assert(!seen[order[r]]);
            seen[order[r]] = true;
            cr_assert_eq(pos[order[r]], r);
        }
    }
    float x[T * D], xg[T * K * D], back[T * K * D], comb[T * D];
    fill(x, T * D, -1, 1);
    moe_gather(xg, x, order, T, K, D);
    for (int p = 0; p < T * K; p++) memcpy(back + p * D, xg + (size_t)pos[p] * D, sizeof(float) * D);
    for (int p = 0; p < T * K; p++) cr_assert(memcmp(back + p * D, x + (p / K) * D, sizeof(float) * D) == 0);
    moe_combine(comb, xg, pos, T, K, D);
    for (int t = 0; t < T; t++)
        for (int j = 0; j < D; j++) {
            float want = x[t * D + j];
            for (int k = 1; k < K; k++) want += x[t * D + j];
            cr_assert_eq(comb[t * D + j], want);
        }
}

/* ---- 3. layer forward: PyTorch golden and the naive reference ---------------------------------------------- */

/* Generated by tests/ref/moe_ref.py (HF-style PyTorch MoE); inputs are val() below, not stored. */
/* v3: T=5 d=8 E=8 K=2 G=4 topk_group=2 I_e=4 I_s=4 sigmoid noaux_tc norm rsf 2.5; min selection margin 0.04 */
static const float golden_v3_out[] = {
    6.52006245f, -5.24045229f, 3.35528016f, -1.08238721f, -1.3155812f, 3.56152773f,
    -5.39592028f, 6.60678577f, 1.8260535f, -3.03397608f, 3.8913064f, -4.29897594f,
    4.20987606f, -3.63430214f, 2.63876557f, -1.33830571f, -1.2370038f, 0.534670711f,
    0.22944653f, -0.967049718f, 1.5929054f, -2.03469229f, 2.24135971f, -2.18902588f,
    -2.10162354f, 2.82472801f, -3.22142076f, 3.24586105f, -2.89522409f, 2.21002913f,
    -1.26945341f, 0.182185858f, -0.682799935f, 2.11189985f, -3.29695821f, 4.10103607f,
    -4.43121767f, 4.24934673f, -3.5764432f, 2.49026179f,
};
static const int32_t golden_v3_idx[] = {0, 1, 1, 2, 2, 3, 2, 3, 3, 4}; /* sorted per token */
/* v2_glg: K=3 G=2 topk_group=1 I_s=8 softmax group_limited_greedy, no norm, rsf 16; margin 0.01427 */
static const float golden_v2_glg_out[] = {
    30.3006325f, -17.9739037f, 11.0240269f, -1.63545048f, -13.5891628f, 17.3193455f,
    -28.7947674f, 31.7486973f, 9.06712246f, -7.12018538f, 11.5639f, -9.30509949f,
    7.08137178f, -7.68333769f, 0.634826303f, -0.358699083f, -9.65316486f, 10.3451643f,
    -4.24671888f, 5.80013466f, 0.351913214f, -3.69332218f, 3.8693161f, -10.6161423f,
    -19.02285f, 23.2445946f, -23.6211586f, 29.638092f, -20.4064789f, 18.7869892f,
    -11.355176f, -1.71071219f, 7.74719143f, -12.0284309f, 9.33204079f, -2.70592546f,
    5.77763748f, 4.49455118f, -4.59532642f, 6.46041584f,
};
static const int32_t golden_v2_glg_idx[] = {0, 1, 2, 0, 1, 2, 1, 2, 3, 1, 2, 3, 4, 5, 6};
/* v2_greedy: K=2 G=1 I_s=0 softmax greedy, norm (K > 1), rsf 1; margin 0.02095 */
static const float golden_v2_greedy_out[] = {
    1.75165784f, -1.22837472f, 0.56314671f, 0.167156041f, -0.878142953f, 1.48765612f,
    -1.92526233f, 2.14039445f, -0.187715769f, -0.0233569443f, 0.231730551f, -0.413326651f,
    0.547160387f, -0.617767096f, 0.616987467f, -0.544911563f, -0.731906474f, 0.637431383f,
    -0.469297528f, 0.246933937f, 0.00396424532f, -0.254404277f, 0.475446612f, -0.641548514f,
    -1.44496346f, 1.84915066f, -2.03965878f, 1.99447334f, -1.71881592f, 1.2445401f,
    -0.626451075f, -0.0640275776f, 0.946946502f, -0.872239232f, 0.696740031f, -0.440728784f,
    0.133788958f, 0.188610852f, -0.489215642f, 0.733289003f,
};
static const int32_t golden_v2_greedy_idx[] = {0, 1, 1, 2, 2, 3, 3, 4, 4, 5};

/* Element i of a tensor: amp·sin(0.7·i + phase), in double, rounded to float (as moe_ref.py). */
static void val(float *v, size_t n, double phase, double amp) {
    for (size_t i = 0; i < n; i++) v[i] = (float)(amp * sin(0.7 * (double)i + phase));
}

static void check_golden(const moe_cfg *c, const float *gold, const int32_t *gidx) {
    const int T = 5;
    layer L;
    layer_init(&L, c, 1, 0.0f);
    float x[5 * 8];
    val(x, (size_t)T * c->d, 0.1, 1.0);
    val(L.pf + L.off[SEG_GW], L.off[SEG_GW + 1] - L.off[SEG_GW], 0.2, 0.8);
    val(L.pf + L.off[SEG_BIAS], L.off[SEG_BIAS + 1] - L.off[SEG_BIAS], 0.3, 0.1);
    val(L.pf + L.off[SEG_EG], L.off[SEG_EG + 1] - L.off[SEG_EG], 0.4, 0.5);
    val(L.pf + L.off[SEG_EU], L.off[SEG_EU + 1] - L.off[SEG_EU], 0.5, 0.5);
    val(L.pf + L.off[SEG_ED], L.off[SEG_ED + 1] - L.off[SEG_ED], 0.6, 0.5);
    val(L.pf + L.off[SEG_SG], L.off[SEG_SG + 1] - L.off[SEG_SG], 0.7, 0.5);
    val(L.pf + L.off[SEG_SU], L.off[SEG_SU + 1] - L.off[SEG_SU], 0.8, 0.5);
    val(L.pf + L.off[SEG_SD], L.off[SEG_SD + 1] - L.off[SEG_SD], 0.9, 0.5);
    L.p.gate_bias = L.pf + L.off[SEG_BIAS]; /* ignored by the V2 methods: passing it checks that too */
    run r;
    run_init(&r, &L, T);
    mr_err e = {0};
    cr_assert_eq(moe_forward(r.out, &r.s, &r.w, x, NULL, &L.p, c, T, &e), 0, "%s", e.msg);
    double num = 0.0, den = 0.0;
    for (int i = 0; i < T * c->d; i++) {
        num += ((double)r.out[i] - gold[i]) * ((double)r.out[i] - gold[i]);
        den += (double)gold[i] * gold[i];
    }
    cr_expect_lt(sqrt(num / den), 1e-6, "relative error %.3g against the PyTorch reference", sqrt(num / den));
    for (int t = 0; t < T; t++) {
        int32_t a[4];
        memcpy(a, r.s.idx + t * c->K, sizeof(int32_t) * c->K);
        for (int i = 0; i < c->K; i++) /* sort for the comparison (torch's slot order is its own) */
            for (int j = i + 1; j < c->K; j++)
                if (a[j] < a[i]) {
                    int32_t tmp = a[i];
                    a[i] = a[j];
                    a[j] = tmp;
                }
        for (int k = 0; k < c->K; k++) cr_expect_eq(a[k], gidx[t * c->K + k], "token %d slot %d", t, k);
    }
    run_free(&r);
    layer_free(&L);
}

Test(moe_layer, pytorch_golden_v3) {
    moe_cfg c = mkcfg(8, 8, 2, 4, 2, 4, 4, MOE_SCORE_SIGMOID, MOE_TOPK_NOAUX_TC, true, 2.5f);
    check_golden(&c, golden_v3_out, golden_v3_idx);
}

Test(moe_layer, pytorch_golden_v2_group_limited_greedy) {
    moe_cfg c = mkcfg(8, 8, 3, 2, 1, 4, 8, MOE_SCORE_SOFTMAX, MOE_TOPK_GROUP_LIMITED_GREEDY, false, 16.0f);
    check_golden(&c, golden_v2_glg_out, golden_v2_glg_idx);
}

Test(moe_layer, pytorch_golden_v2_greedy) {
    moe_cfg c = mkcfg(8, 8, 2, 1, 1, 4, 0, MOE_SCORE_SOFTMAX, MOE_TOPK_GREEDY, true, 1.0f);
    check_golden(&c, golden_v2_greedy_out, golden_v2_greedy_idx);
}

/* Kernel forward against the per-token double reference: out, idx (slot order included), weights, affinities,
 * loads. */
static void check_naive(const moe_cfg *c, int T, uint64_t seed) {
    layer L;
    layer_init(&L, c, seed, 0.3f);
    float *x = malloc(sizeof(float) * T * c->d);
    double *xd = malloc(sizeof(double) * T * c->d);
    fill(x, (size_t)T * c->d, -1, 1);
    for (int i = 0; i < T * c->d; i++) xd[i] = x[i];
    run r;
    run_init(&r, &L, T);
    mr_err e = {0};
    cr_assert_eq(moe_forward(r.out, &r.s, &r.w, x, NULL, &L.p, c, T, &e), 0, "%s", e.msg);
    double out[64], g[16], aff[64], num = 0.0, den = 0.0, minmargin = INFINITY;
    int32_t idx[16];
    int64_t load[MAXE] = {0};
    for (int t = 0; t < T; t++) {
        double m = ref_token(out, idx, g, aff, xd + t * c->d, L.pd, L.off, c, true, NULL);
        minmargin = fmin(minmargin, m);
        for (int k = 0; k < c->K; k++) {
            cr_assert_eq(r.s.idx[t * c->K + k], idx[k], "token %d slot %d", t, k);
            cr_expect(fabs(r.s.weights[t * c->K + k] - g[k]) <= 1e-6 * (1 + fabs(g[k])), "weight t%d k%d", t, k);
            load[idx[k]]++;
        }
        for (int i = 0; i < c->E; i++) cr_expect(fabs(r.s.scores[t * c->E + i] - aff[i]) <= 1e-6);
        for (int j = 0; j < c->d; j++) {
            double dlt = r.out[t * c->d + j] - out[j];
            num += dlt * dlt;
            den += out[j] * out[j];
        }
    }
    cr_expect_gt(minmargin, 1e-4, "seed %llu: inputs too close to a routing tie (margin %.3g): pick another seed", (unsigned long long)seed, minmargin);
    cr_expect_lt(sqrt(num / den), 2e-6, "relative error %.3g", sqrt(num / den));
    cr_expect(memcmp(load, r.s.load, sizeof(int64_t) * c->E) == 0, "loads");
    run_free(&r);
    free(x);
    free(xd);
    layer_free(&L);
}

Test(moe_layer, forward_vs_naive_reference) {
    moe_cfg v3 = mkcfg(16, 16, 4, 4, 2, 8, 16, MOE_SCORE_SIGMOID, MOE_TOPK_NOAUX_TC, true, 2.5f);
    check_naive(&v3, 24, 11);
    moe_cfg v3raw = mkcfg(16, 16, 4, 8, 3, 8, 0, MOE_SCORE_SIGMOID, MOE_TOPK_NOAUX_TC, false, 1.0f);
    check_naive(&v3raw, 24, 12);
    moe_cfg glg = mkcfg(16, 16, 3, 4, 2, 8, 8, MOE_SCORE_SOFTMAX, MOE_TOPK_GROUP_LIMITED_GREEDY, true, 16.0f);
    check_naive(&glg, 24, 15);
    moe_cfg greedy = mkcfg(16, 12, 6, 1, 1, 8, 8, MOE_SCORE_SOFTMAX, MOE_TOPK_GREEDY, false, 1.0f);
    check_naive(&greedy, 24, 14);
}

/* ---- 4. gradients by finite differences (double reference, routing fixed and checked) ---------------------- */

typedef struct fd_tol {
    int fails;
    char first[256];
} fd_tol;

/* Compares analytic a[n] with numeric num[n]: |a − num| <= 1e-3·|num| + 1e-4·max|num| + 1e-7. */
static void fd_compare(fd_tol *f, const char *what, const float *a, const double *num, size_t n) {
    double mx = 0.0;
    for (size_t i = 0; i < n; i++) mx = fmax(mx, fabs(num[i]));
    for (size_t i = 0; i < n; i++)
        if (!(fabs(a[i] - num[i]) <= 1e-3 * fabs(num[i]) + 1e-4 * mx + 1e-7)) {
            if (!f->fails++)
                snprintf(f->first, sizeof f->first, "%s[%zu]: analytic %.9g numeric %.9g", what, i, a[i], num[i]);
        }
}

/* L = w_out·Σ R·out + w_bal·balance_loss. Analytic gradients from moe_backward (+ moe_balance_loss) against
 * central differences of the double reference for every element of x and of every parameter tensor. */
static void check_grads(const moe_cfg *c, int T, uint64_t seed, double w_out, double w_bal, const int *seq_len,
                        int n_seq, float alpha) {
    layer L;
    layer_init(&L, c, seed, 0.2f);
    const size_t nx = (size_t)T * c->d, np = L.off[NSEG];
    float *x = malloc(sizeof(float) * nx), *R = calloc(nx, sizeof(float));
    double *xd = malloc(sizeof(double) * nx), *Rd = calloc(nx, sizeof(double));
    fill(x, nx, -1, 1);
    for (size_t i = 0; i < nx; i++) {
        xd[i] = x[i];
        R[i] = (float)w_out * urand(-1, 1);
        Rd[i] = R[i];
    }
    run r;
    run_init(&r, &L, T);
    mr_err e = {0};
    cr_assert_eq(moe_forward(r.out, &r.s, &r.w, x, NULL, &L.p, c, T, &e), 0, "%s", e.msg);
    float *daff = calloc((size_t)T * c->E, sizeof(float));
    if (w_bal != 0.0) {
        double bl;
        cr_assert_eq(moe_balance_loss(&bl, daff, r.s.scores, r.s.idx, seq_len, n_seq, T, c->E, c->K,
                                      (float)w_bal * alpha, &e), 0, "%s", e.msg);
    }
    moe_backward(r.dx, &r.g, &r.w, R, w_bal != 0.0 ? daff : NULL, &r.s, x, &L.p, c);

    int32_t *idx0 = malloc(sizeof(int32_t) * T * c->K), *idx1 = malloc(sizeof(int32_t) * T * c->K);
    double margin;
    ref_loss(idx0, &margin, xd, L.pd, &L, T, w_out != 0.0 ? Rd : NULL, w_bal, seq_len, n_seq, alpha);
    cr_assert(memcmp(idx0, r.s.idx, sizeof(int32_t) * T * c->K) == 0, "kernel and reference route differently");
    cr_assert_gt(margin, 1e-3, "seed %llu: routing margin %.3g too small for FD: pick another seed", (unsigned long long)seed, margin);

    const double h = 1e-5;
    double *num = calloc(np > nx ? np : nx, sizeof(double));
    fd_tol f = {0};
    int flips = 0;
    /* x */
    for (size_t i = 0; i < nx; i++) {
        double v = xd[i], lp, lm;
        xd[i] = v + h;
        lp = ref_loss(idx1, NULL, xd, L.pd, &L, T, w_out != 0.0 ? Rd : NULL, w_bal, seq_len, n_seq, alpha);
        flips += memcmp(idx0, idx1, sizeof(int32_t) * T * c->K) != 0;
        xd[i] = v - h;
        lm = ref_loss(idx1, NULL, xd, L.pd, &L, T, w_out != 0.0 ? Rd : NULL, w_bal, seq_len, n_seq, alpha);
        flips += memcmp(idx0, idx1, sizeof(int32_t) * T * c->K) != 0;
        xd[i] = v;
        num[i] = (lp - lm) / (2 * h);
    }
    fd_compare(&f, "dx", r.dx, num, nx);
    /* every parameter (the bias included: its numeric gradient is 0 and moe_backward gives none) */
    for (size_t i = 0; i < np; i++) {
        double v = L.pd[i], lp, lm;
        L.pd[i] = v + h;
        lp = ref_loss(idx1, NULL, xd, L.pd, &L, T, w_out != 0.0 ? Rd : NULL, w_bal, seq_len, n_seq, alpha);
        flips += memcmp(idx0, idx1, sizeof(int32_t) * T * c->K) != 0;
        L.pd[i] = v - h;
        lm = ref_loss(idx1, NULL, xd, L.pd, &L, T, w_out != 0.0 ? Rd : NULL, w_bal, seq_len, n_seq, alpha);
        flips += memcmp(idx0, idx1, sizeof(int32_t) * T * c->K) != 0;
        L.pd[i] = v;
        num[i] = (lp - lm) / (2 * h);
    }
    cr_assert_eq(flips, 0, "%d FD evaluations changed the routing", flips);
    for (int s = 0; s < NSEG; s++) {
        size_t n = L.off[s + 1] - L.off[s];
        double mx = 0.0;
        for (size_t i = 0; i < n; i++) mx = fmax(mx, fabs(num[L.off[s] + i]));
        if (s == SEG_BIAS) {
            cr_expect_lt(mx, 1e-8, "bias: numeric gradient %.3g should vanish (selection only)", mx);
            for (size_t i = 0; i < n; i++) cr_expect_eq(r.grad[L.off[s] + i], 0.0f);
            continue;
        }
        if (w_out == 0.0 && s != SEG_GW) { /* balance loss only: no gradient reaches the experts */
            cr_expect_lt(mx, 1e-8, "%s: numeric gradient %.3g should vanish", seg_name[s], mx);
        }
        fd_compare(&f, seg_name[s], r.grad + L.off[s], num + L.off[s], n);
    }
    cr_expect_eq(f.fails, 0, "%d gradient mismatches; first: %s", f.fails, f.first);
    free(num);
    free(idx0);
    free(idx1);
    free(daff);
    free(x);
    free(R);
    free(xd);
    free(Rd);
    run_free(&r);
    layer_free(&L);
}

Test(moe_grad, v3_noaux_tc_output) {
    moe_cfg c = mkcfg(8, 8, 2, 4, 2, 4, 4, MOE_SCORE_SIGMOID, MOE_TOPK_NOAUX_TC, true, 2.5f);
    check_grads(&c, 6, 21, 1.0, 0.0, NULL, 0, 0.0f);
}

Test(moe_grad, v3_unnormalized_output) {
    moe_cfg c = mkcfg(8, 8, 3, 2, 1, 4, 0, MOE_SCORE_SIGMOID, MOE_TOPK_NOAUX_TC, false, 1.5f);
    check_grads(&c, 6, 22, 1.0, 0.0, NULL, 0, 0.0f);
}

Test(moe_grad, v2_group_limited_greedy_output) {
    moe_cfg c = mkcfg(8, 8, 3, 2, 1, 4, 0, MOE_SCORE_SOFTMAX, MOE_TOPK_GROUP_LIMITED_GREEDY, true, 1.5f);
    check_grads(&c, 6, 23, 1.0, 0.0, NULL, 0, 0.0f);
}

Test(moe_grad, v2_greedy_output) {
    moe_cfg c = mkcfg(8, 8, 2, 1, 1, 4, 6, MOE_SCORE_SOFTMAX, MOE_TOPK_GREEDY, false, 16.0f);
    check_grads(&c, 6, 24, 1.0, 0.0, NULL, 0, 0.0f);
}

Test(moe_grad, balance_loss_through_the_router) {
    const int seq[2] = {4, 2};
    moe_cfg c = mkcfg(8, 8, 2, 4, 2, 4, 4, MOE_SCORE_SIGMOID, MOE_TOPK_NOAUX_TC, true, 2.5f);
    check_grads(&c, 6, 28, 0.0, 1.0, seq, 2, 0.5f);
    moe_cfg v2 = mkcfg(8, 8, 3, 2, 1, 4, 0, MOE_SCORE_SOFTMAX, MOE_TOPK_GROUP_LIMITED_GREEDY, true, 1.5f);
    check_grads(&v2, 6, 32, 0.0, 1.0, seq, 2, 0.5f);
}

Test(moe_grad, output_and_balance_together) {
    const int seq[3] = {3, 0, 3};
    moe_cfg c = mkcfg(8, 8, 2, 4, 2, 4, 4, MOE_SCORE_SIGMOID, MOE_TOPK_NOAUX_TC, true, 2.5f);
    check_grads(&c, 6, 27, 1.0, 1.0, seq, 3, 0.5f);
}

/* ---- 5. balance loss and bias update ---------------------------------------------------------------------- */

Test(moe_balance, hand_computed) {
    /* E = 4, K = 2; sequence 0 = tokens 0, 1; sequence 1 = token 2.
     * seq 0: counts {1,2,1,0} → f = 4/(2·2)·c = {1,2,1,0}; ŝ_0 = {.5,.25,.125,.125}, ŝ_1 = {.5,.5,.5,.5}/2;
     *        P = {.375,.25,.1875,.1875}; Σ f·P = .375 + .5 + .1875 = 1.0625.
     * seq 1: f = 4/(2·1)·{0,0,1,1} = {0,0,2,2}; P = {.125,.125,.5,.25}; Σ f·P = 1.5.
     * loss = α·(1.0625 + 1.5)/2 = 1.28125·α. */
    const float s[12] = {0.5f, 0.25f, 0.125f, 0.125f, 0.5f, 0.5f, 0.5f, 0.5f, 0.125f, 0.125f, 0.5f, 0.25f};
    const int32_t idx[6] = {0, 1, 1, 2, 2, 3};
    const int seq[2] = {2, 1};
    const float alpha = 0.01f;
    float daff[12] = {0};
    double loss;
    mr_err e = {0};
    cr_assert_eq(moe_balance_loss(&loss, daff, s, idx, seq, 2, 3, 4, 2, alpha, &e), 0, "%s", e.msg);
    cr_expect(fabs(loss - 1.28125 * alpha) < 1e-9, "loss %.12g", loss);
    /* token 2: α/(2·1)·(f_j/S − Σ f s/S²) = .005·(f_j − 1.5) → {−.0075, −.0075, .0025, .0025}
     * token 1: S = 2, Σ f s = 2: α/(2·2)·(f_j/2 − .5) → {0, .00125, 0, −.00125} */
    const float want[8] = {0.0f, 0.00125f, 0.0f, -0.00125f, -0.0075f, -0.0075f, 0.0025f, 0.0025f};
    for (int i = 0; i < 8; i++) cr_expect(fabsf(daff[4 + i] - want[i]) < 1e-8f, "daff[%d] = %.9g", 4 + i, daff[4 + i]);
    /* a zero-length sequence in the list changes nothing; value-only call leaves daff alone */
    const int seq0[3] = {2, 0, 1};
    double loss2;
    cr_assert_eq(moe_balance_loss(&loss2, NULL, s, idx, seq0, 3, 3, 4, 2, alpha, &e), 0);
    cr_expect_eq(loss2, loss);
    /* lengths must cover T exactly */
    const int bad[2] = {2, 2};
    cr_expect_eq(moe_balance_loss(&loss2, NULL, s, idx, bad, 2, 3, 4, 2, alpha, &e), MR_EINVAL);
    cr_expect_str_eq(e.msg, "moe: balance loss: sequence lengths sum to 4, expected T = 3");
    const int neg[2] = {4, -1};
    cr_expect_eq(moe_balance_loss(&loss2, NULL, s, idx, neg, 2, 3, 4, 2, alpha, &e), MR_EINVAL);
    cr_expect_str_eq(e.msg, "moe: balance loss: sequence 1 has negative length -1");
}

Test(moe_balance, fd_gradient_wrt_affinities) {
    enum { T = 7, E = 6, K = 2 };
    const int seq[3] = {3, 1, 3};
    float s[T * E], daff[T * E] = {0};
    int32_t idx[T * K];
    rng_state = 5;
    fill(s, T * E, 0.05f, 1.0f);
    for (int t = 0; t < T; t++) {
        idx[t * K] = t % E;
        idx[t * K + 1] = (t + 2) % E;
    }
    double loss;
    cr_assert_eq(moe_balance_loss(&loss, daff, s, idx, seq, 3, T, E, K, 0.3f, NULL), 0);
    double sd[T * E];
    for (int i = 0; i < T * E; i++) sd[i] = s[i];
    cr_expect(fabs(loss - ref_balance(sd, idx, seq, 3, E, K, 0.3)) < 1e-7 * fabs(loss));
    fd_tol f = {0};
    double num[T * E];
    for (int i = 0; i < T * E; i++) {
        double v = sd[i], h = 1e-6;
        sd[i] = v + h;
        double lp = ref_balance(sd, idx, seq, 3, E, K, 0.3);
        sd[i] = v - h;
        double lm = ref_balance(sd, idx, seq, 3, E, K, 0.3);
        sd[i] = v;
        num[i] = (lp - lm) / (2 * h);
    }
    fd_compare(&f, "daff", daff, num, T * E);
    cr_expect_eq(f.fails, 0, "%s", f.first);
}

Test(moe_balance, bias_update_sign_rule) {
    float b[4] = {0.5f, 0.0f, -0.25f, 1.0f};
    const int64_t load[4] = {5, 3, 4, 4}; /* mean 4: overloaded 0 down, underloaded 1 up, 2 and 3 unchanged */
    moe_bias_update(b, load, 4, 0.125f);
    const float want[4] = {0.375f, 0.125f, -0.25f, 1.0f};
    cr_expect(memcmp(b, want, sizeof b) == 0, "bias %g %g %g %g", b[0], b[1], b[2], b[3]);
    float b2[2] = {0, 0};
    const int64_t l2[2] = {1, 2}; /* mean 1.5 is not an integer */
    moe_bias_update(b2, l2, 2, 0.001f);
    cr_expect(b2[0] == 0.001f && b2[1] == -0.001f);
    float b3[3] = {1, 2, 3};
    const int64_t l3[3] = {0, 0, 0}; /* no tokens: balanced, nothing moves */
    moe_bias_update(b3, l3, 3, 0.5f);
    cr_expect(b3[0] == 1 && b3[1] == 2 && b3[2] == 3);
    int64_t mx;
    double mean;
    cr_expect_float_eq(moe_load_stats(load, 4, &mx, &mean), 0.25, 1e-12);
    cr_expect_eq(mx, 5);
    cr_expect_float_eq(mean, 4.0, 1e-12);
    cr_expect_eq(moe_load_stats(l3, 3, &mx, &mean), 0.0);
}

/* ---- 6. determinism, batch invariance, routing replay ----------------------------------------------------- */

/* Forward + balance loss + backward at 1 and at 4 threads: every output and gradient bit-identical. */
static void check_threads(const moe_cfg *c, int T, uint64_t seed) {
    layer L;
    layer_init(&L, c, seed, 0.2f);
    const size_t nx = (size_t)T * c->d, na = (size_t)T * c->E;
    float *x = malloc(sizeof(float) * nx), *dout = malloc(sizeof(float) * nx), *daff = malloc(sizeof(float) * na);
    fill(x, nx, -1, 1);
    fill(dout, nx, -1, 1);
    const int seq[4] = {T / 8, T / 2, 4, T - T / 8 - T / 2 - 4};
    run r[2];
    int nthreads[2] = {1, 4};
    int saved = omp_get_max_threads();
    for (int i = 0; i < 2; i++) {
        omp_set_num_threads(nthreads[i]);
        run_init(&r[i], &L, T);
        cr_assert_eq(moe_forward(r[i].out, &r[i].s, &r[i].w, x, NULL, &L.p, c, T, NULL), 0);
        double loss;
        memset(daff, 0, sizeof(float) * na);
        cr_assert_eq(moe_balance_loss(&loss, daff, r[i].s.scores, r[i].s.idx, seq, 4, T, c->E, c->K, 0.01f, NULL),
                     0);
        moe_backward(r[i].dx, &r[i].g, &r[i].w, dout, daff, &r[i].s, x, &L.p, c);
    }
    omp_set_num_threads(saved);
    cr_expect(memcmp(r[0].out, r[1].out, sizeof(float) * nx) == 0, "outputs differ");
    cr_expect(memcmp(r[0].s.idx, r[1].s.idx, sizeof(int32_t) * T * c->K) == 0, "routing differs");
    cr_expect(memcmp(r[0].s.weights, r[1].s.weights, sizeof(float) * T * c->K) == 0, "weights differ");
    cr_expect(memcmp(r[0].s.load, r[1].s.load, sizeof(int64_t) * c->E) == 0, "loads differ");
    cr_expect(memcmp(r[0].dx, r[1].dx, sizeof(float) * nx) == 0, "dx differs");
    cr_expect(memcmp(r[0].grad, r[1].grad, sizeof(float) * L.off[NSEG]) == 0, "weight gradients differ");
    run_free(&r[0]);
    run_free(&r[1]);
    free(x);
    free(dout);
    free(daff);
    layer_free(&L);
}

Test(moe_layer, thread_count_independent) {
    /* T·E large enough for the per-token loops to go parallel; small experts (run side by side, one per thread)
     * with a shared MLP big enough for matmul's own threads; then experts big enough to run one after another with
     * the threads inside each GEMM. */
    moe_cfg small = mkcfg(32, 16, 4, 4, 2, 16, 64, MOE_SCORE_SIGMOID, MOE_TOPK_NOAUX_TC, true, 2.5f);
    check_threads(&small, 1024, 31);
    moe_cfg big = mkcfg(32, 16, 4, 4, 2, 128, 0, MOE_SCORE_SOFTMAX, MOE_TOPK_GROUP_LIMITED_GREEDY, true, 2.5f);
    check_threads(&big, 1024, 32);
}

Test(moe_layer, token_alone_equals_token_in_batch) {
    /* MM_DET: a row's output does not depend on the other rows (the rollout's decode equals the trainer's
     * forward bit for bit). */
    enum { T = 20 };
    moe_cfg c = mkcfg(16, 16, 4, 4, 2, 8, 16, MOE_SCORE_SIGMOID, MOE_TOPK_NOAUX_TC, true, 2.5f);
    layer L;
    layer_init(&L, &c, 41, 0.2f);
    float x[T * 16];
    fill(x, T * 16, -1, 1);
    run all, one;
    run_init(&all, &L, T);
    run_init(&one, &L, 1);
    cr_assert_eq(moe_forward(all.out, &all.s, &all.w, x, NULL, &L.p, &c, T, NULL), 0);
    for (int t = 0; t < T; t++) {
        cr_assert_eq(moe_forward(one.out, &one.s, &one.w, x + t * 16, NULL, &L.p, &c, 1, NULL), 0);
        cr_expect(memcmp(one.out, all.out + t * 16, sizeof(float) * 16) == 0, "token %d differs alone", t);
    }
    run_free(&all);
    run_free(&one);
    layer_free(&L);
}

/* The same at sizes where a lone token's experts + shared experts run as one parallel region of chunked GEMMs
 * (moe_forward_few through matmul_forward_batch: > 32768 multiply-adds), at 1, 2 and 3 threads, against the batch
 * path (T = 20: experts side by side); and a batched decode step of 12 rows (moe_forward_few too). */
Test(moe_layer, token_alone_equals_token_in_batch_parallel_few_rows) {
    enum { T = 20, D = 128 };
    moe_cfg c = mkcfg(D, 16, 4, 4, 2, 64, 128, MOE_SCORE_SIGMOID, MOE_TOPK_NOAUX_TC, true, 2.5f);
    layer L;
    layer_init(&L, &c, 43, 0.2f);
    float *x = malloc(sizeof(float) * T * D);
    fill(x, T * D, -1, 1);
    run all, one, mid;
    run_init(&all, &L, T);
    run_init(&one, &L, 1);
    run_init(&mid, &L, 12);
    cr_assert_eq(moe_forward(all.out, &all.s, &all.w, x, NULL, &L.p, &c, T, NULL), 0);
    const int saved = omp_get_max_threads();
    for (int th = 1; th <= 3; th++) {
        omp_set_num_threads(th);
        for (int t = 0; t < T; t++) {
            cr_assert_eq(moe_forward(one.out, &one.s, &one.w, x + (size_t)t * D, NULL, &L.p, &c, 1, NULL), 0);
            cr_expect(memcmp(one.out, all.out + (size_t)t * D, sizeof(float) * D) == 0,
                      "%d threads: token %d differs alone", th, t);
        }
        cr_assert_eq(moe_forward(mid.out, &mid.s, &mid.w, x, NULL, &L.p, &c, 12, NULL), 0);
        cr_expect(memcmp(mid.out, all.out, sizeof(float) * 12 * D) == 0, "%d threads: 12 rows differ", th);
    }
    omp_set_num_threads(saved);
    free(x);
    run_free(&all);
    run_free(&one);
    run_free(&mid);
    layer_free(&L);
}

Test(moe_layer, routing_replay) {
    enum { T = 12 };
    moe_cfg c = mkcfg(8, 8, 2, 4, 2, 4, 4, MOE_SCORE_SIGMOID, MOE_TOPK_NOAUX_TC, true, 2.5f);
    layer L;
    layer_init(&L, &c, 51, 0.2f);
    float x[T * 8], dout[T * 8];
    fill(x, T * 8, -1, 1);
    fill(dout, T * 8, -1, 1);
    run nat, rep;
    run_init(&nat, &L, T);
    run_init(&rep, &L, T);
    mr_err e = {0};
    cr_assert_eq(moe_forward(nat.out, &nat.s, &nat.w, x, NULL, &L.p, &c, T, &e), 0, "%s", e.msg);
    int32_t replay[T * 2];
    memcpy(replay, nat.s.idx, sizeof replay);
    cr_assert_eq(moe_forward(rep.out, &rep.s, &rep.w, x, replay, &L.p, &c, T, &e), 0, "%s", e.msg);
    cr_expect(memcmp(nat.out, rep.out, sizeof(float) * T * 8) == 0, "replaying the natural routing changes out");
    cr_expect(memcmp(nat.s.weights, rep.s.weights, sizeof(float) * T * 2) == 0);
    moe_backward(nat.dx, &nat.g, &nat.w, dout, NULL, &nat.s, x, &L.p, &c);
    moe_backward(rep.dx, &rep.g, &rep.w, dout, NULL, &rep.s, x, &L.p, &c);
    cr_expect(memcmp(nat.dx, rep.dx, sizeof(float) * T * 8) == 0);
    cr_expect(memcmp(nat.grad, rep.grad, sizeof(float) * L.off[NSEG]) == 0);

    /* a different (valid) routing: the rollout chose other experts; weights come from their affinities */
    for (int t = 0; t < T; t++) {
        replay[t * 2] = (t + 5) % 8;
        replay[t * 2 + 1] = (t + 1) % 8;
    }
    cr_assert_eq(moe_forward(rep.out, &rep.s, &rep.w, x, replay, &L.p, &c, T, &e), 0, "%s", e.msg);
    cr_expect(memcmp(rep.s.idx, replay, sizeof replay) == 0);
    for (int t = 0; t < T; t++) {
        double xd[8], out[8], g[2], aff[8];
        int32_t idx[2];
        for (int j = 0; j < 8; j++) xd[j] = x[t * 8 + j];
        ref_token(out, idx, g, aff, xd, L.pd, L.off, &c, true, replay + t * 2);
        for (int k = 0; k < 2; k++) cr_expect(fabs(rep.s.weights[t * 2 + k] - g[k]) < 1e-6);
        for (int j = 0; j < 8; j++) cr_expect(fabs(rep.out[t * 8 + j] - out[j]) < 1e-5 * (1 + fabs(out[j])));
    }
    /* bad replays */
    replay[2] = 8;
    cr_expect_eq(moe_forward(rep.out, &rep.s, &rep.w, x, replay, &L.p, &c, T, &e), MR_EINVAL);
    cr_expect_str_eq(e.msg, "moe: replayed routing: token 1 slot 0: expert 8 is not in 0..7");
    replay[2] = -1;
    cr_expect_eq(moe_forward(rep.out, &rep.s, &rep.w, x, replay, &L.p, &c, T, &e), MR_EINVAL);
    cr_expect_str_eq(e.msg, "moe: replayed routing: token 1 slot 0: expert -1 is not in 0..7");
    replay[2] = replay[3];
    cr_expect_eq(moe_forward(rep.out, &rep.s, &rep.w, x, replay, &L.p, &c, T, &e), MR_EINVAL);
    cr_expect_str_eq(e.msg, "moe: replayed routing: token 1 slot 1: expert 2 already in slot 0");
    run_free(&nat);
    run_free(&rep);
    layer_free(&L);
}

/* ---- 7. failure paths ------------------------------------------------------------------------------------- */

Test(moe_layer, sizes_and_allocation_failures) {
    moe_cfg c = mkcfg(8, 8, 2, 4, 2, 4, 4, MOE_SCORE_SIGMOID, MOE_TOPK_NOAUX_TC, true, 2.5f);
    mr_err e = {0};
    moe_saved s;
    moe_work w;
    for (int n = 1; n <= 2; n++) {
        long before = mem_injected_failures();
        mem_fail_after(n);
        cr_expect_eq(moe_saved_init(&s, &c, 16, &e), MR_ENOMEM, "failure at allocation %d", n);
        mem_fail_after(0);
        cr_expect_eq(mem_injected_failures(), before + 1);
        cr_expect(strstr(e.msg, "moe: cannot allocate") == e.msg, "%s", e.msg);
        moe_saved_free(&s);
    }
    mem_fail_after(1);
    cr_expect_eq(moe_work_init(&w, &c, 16, &e), MR_ENOMEM);
    mem_fail_after(0);
    moe_work_free(&w);
    double loss;
    const float sc[8] = {0.5f, 0.5f, 0.5f, 0.5f, 0.5f, 0.5f, 0.5f, 0.5f};
    const int32_t id[2] = {0, 1};
    const int one = 1;
    mem_fail_after(1);
    cr_expect_eq(moe_balance_loss(&loss, NULL, sc, id, &one, 1, 1, 8, 2, 0.1f, &e), MR_ENOMEM);
    mem_fail_after(0);
    cr_expect_eq(moe_saved_init(&s, &c, -1, &e), MR_ERANGE);
    cr_expect_eq(moe_saved_init(&s, &c, INT32_MAX / 2 + 1, &e), MR_ERANGE);
    cr_expect_str_eq(e.msg, "moe: saved state: T_max·K must be in 0..2147483647, got T_max=1073741824 K=2");
    /* a forward larger than the buffers */
    cr_assert_eq(moe_saved_init(&s, &c, 4, &e), 0);
    cr_assert_eq(moe_work_init(&w, &c, 2, &e), 0);
    float x[5 * 8] = {0}, out[5 * 8];
    layer L;
    layer_init(&L, &c, 3, 0.0f);
    cr_expect_eq(moe_forward(out, &s, &w, x, NULL, &L.p, &c, 3, &e), MR_ERANGE);
    cr_expect_str_eq(e.msg, "moe: forward of 3 tokens exceeds the 2 tokens the buffers were sized for");
    cr_expect_eq(moe_forward(out, &s, &w, x, NULL, &L.p, &c, 0, &e), 0); /* empty batch is fine */
    layer_free(&L);
    moe_saved_free(&s);
    moe_work_free(&w);
}
