/* gpu_model_ops.c: CPU-vs-CUDA parity of the model ops of the backend table: MLA attention (forward, backward),
 * the MoE layer (routing, dispatch, forward, backward) and the balance loss (label gpu).
 *
 * Each case draws fresh random inputs (seed = MOERL_TEST_SEED, or the time: printed in every failure), fills every
 * output with NaN first (a kernel that writes nothing, or only part, fails), starts every accumulated gradient at
 * random values (overwrite-instead-of-add fails) and bounds the NORM-WISE relative error ||gpu − cpu|| / ||cpu||
 * by 1e-5 (fp32): element-wise bounds would be too strict where the two backends reduce in different orders (the
 * online softmax's tiles, cuBLAS vs OpenBLAS, the exp implementations), and small elements of a sum with
 * cancellation carry a larger relative error than the sum. Integer results (routing, dispatch, loads) must be
 * equal. Without a CUDA build or device the executable exits 77 (ctest: Skipped). */
#include <criterion/criterion.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "core/rng.h"
#include "kernels/backend.h"
#include "tests/gpu_common.h"

#ifdef MOERL_HAVE_CUDA
#include "kernels/cpu/attention.h"
#include "kernels/cuda/attention_cuda.h"
#include "kernels/cuda/dense_cuda.h"
#include "kernels/cuda/moe_cuda.h"

TestSuite(gpu_model_ops, .init = gpu_setup);

#define TOL_F32 1e-5

/* ---- attention ---- */

/* doc_start for documents of the given lengths (summing to T). */
static int32_t *docs(int T, const int *len, int n) {
    int32_t *d = malloc(sizeof(int32_t) * (size_t)T);
    int t = 0;
    for (int i = 0; i < n; i++)
        for (int j = 0; j < len[i]; j++, t++) d[t] = t - j;
    cr_assert_eq(t, T, "document lengths sum to %d, expected %d", t, T);
    return d;
}

static void attn_case(int T, int H, int dqk, int dv, const int32_t *doc) {
    const size_t nq = (size_t)T * H * dqk, nv = (size_t)T * H * dv, nl = (size_t)T * H;
    const float scale = 1.0f / sqrtf((float)dqk);
    char what[160], tag[96];
    snprintf(tag, sizeof tag, "T=%d H=%d d_qk=%d d_v=%d docs=%s", T, H, dqk, dv, doc ? "yes" : "no");
    float *q = hrand(nq, 101, 1.0f), *k = hrand(nq, 102, 1.0f), *v = hrand(nv, 103, 1.0f);
    float *dout = hrand(nv, 104, 1.0f);
    float *out = malloc(sizeof(float) * nv), *lse = malloc(sizeof(float) * nl);
    attention_forward(out, lse, q, k, v, doc, T, H, dqk, dv, scale);

    float *dq_ = dput(q, sizeof(float) * nq), *dk_ = dput(k, sizeof(float) * nq), *dv_ = dput(v, sizeof(float) * nv);
    float *ddout = dput(dout, sizeof(float) * nv);
    int32_t *ddoc = doc ? dput(doc, sizeof(int32_t) * T) : NULL;
    float *gout = dpoison(nv), *glse = dpoison(nl);
    gpu->attention_forward(gout, glse, dq_, dk_, dv_, ddoc, T, H, dqk, dv, scale);
    float *ho = dget(gout, nv), *hl = dget(glse, nl);
    snprintf(what, sizeof what, "attention_forward out %s", tag);
    check_close(what, ho, out, nv, TOL_F32);
    snprintf(what, sizeof what, "attention_forward lse %s", tag);
    check_close(what, hl, lse, nl, TOL_F32);

    /* Backward from the CPU's out and lse (so only the backward is compared). */
    float *dout_o = dput(out, sizeof(float) * nv), *dout_l = dput(lse, sizeof(float) * nl);
    float *s_q = hrand(nq, 105, 0.1f), *s_k = hrand(nq, 106, 0.1f), *s_v = hrand(nv, 107, 0.1f);
    /* 1: all three, accumulating onto random starts */
    float *rq = hcopy(s_q, nq), *rk = hcopy(s_k, nq), *rv = hcopy(s_v, nv);
    attention_backward(rq, rk, rv, dout, out, lse, q, k, v, doc, T, H, dqk, dv, scale);
    float *gq = dput(s_q, sizeof(float) * nq), *gk = dput(s_k, sizeof(float) * nq), *gv = dput(s_v, sizeof(float) * nv);
    gpu->attention_backward(gq, gk, gv, ddout, dout_o, dout_l, dq_, dk_, dv_, ddoc, T, H, dqk, dv, scale);
    float *hq = dget(gq, nq), *hk = dget(gk, nq), *hv = dget(gv, nv);
    snprintf(what, sizeof what, "attention_backward dq (+=) %s", tag);
    check_close(what, hq, rq, nq, TOL_F32);
    snprintf(what, sizeof what, "attention_backward dk (+=) %s", tag);
    check_close(what, hk, rk, nq, TOL_F32);
    snprintf(what, sizeof what, "attention_backward dv (+=) %s", tag);
    check_close(what, hv, rv, nv, TOL_F32);
    free(hq), free(hk), free(hv);
    /* 2: from zero, dk alone; 3: from zero, dq and dv (dk NULL): the bare gradients and the NULL paths */
    for (int pass = 2; pass <= 3; pass++) {
        memset(rq, 0, sizeof(float) * nq), memset(rk, 0, sizeof(float) * nq), memset(rv, 0, sizeof(float) * nv);
        float *zq = calloc(nq, sizeof(float)), *zv = calloc(nv, sizeof(float));
        cr_assert_eq(gpu->to_device(gq, zq, sizeof(float) * nq, &(mr_err){0}), MR_OK);
        cr_assert_eq(gpu->to_device(gk, zq, sizeof(float) * nq, &(mr_err){0}), MR_OK);
        cr_assert_eq(gpu->to_device(gv, zv, sizeof(float) * nv, &(mr_err){0}), MR_OK);
        if (pass == 2) {
            attention_backward(NULL, rk, NULL, dout, out, lse, q, k, v, doc, T, H, dqk, dv, scale);
            gpu->attention_backward(NULL, gk, NULL, ddout, dout_o, dout_l, dq_, dk_, dv_, ddoc, T, H, dqk, dv, scale);
        } else {
            attention_backward(rq, NULL, rv, dout, out, lse, q, k, v, doc, T, H, dqk, dv, scale);
            gpu->attention_backward(gq, NULL, gv, ddout, dout_o, dout_l, dq_, dk_, dv_, ddoc, T, H, dqk, dv, scale);
        }
        hq = dget(gq, nq), hk = dget(gk, nq), hv = dget(gv, nv);
        snprintf(what, sizeof what, "attention_backward dq (pass %d) %s", pass, tag);
        check_close(what, hq, rq, nq, TOL_F32);
        snprintf(what, sizeof what, "attention_backward dk (pass %d) %s", pass, tag);
        check_close(what, hk, rk, nq, TOL_F32);
        snprintf(what, sizeof what, "attention_backward dv (pass %d) %s", pass, tag);
        check_close(what, hv, rv, nv, TOL_F32);
        free(hq), free(hk), free(hv), free(zq), free(zv);
    }

    free(q), free(k), free(v), free(dout), free(out), free(lse), free(ho), free(hl);
    free(s_q), free(s_k), free(s_v), free(rq), free(rk), free(rv);
    gpu->free(dq_), gpu->free(dk_), gpu->free(dv_), gpu->free(ddout), gpu->free(ddoc), gpu->free(gout);
    gpu->free(glse), gpu->free(dout_o), gpu->free(dout_l), gpu->free(gq), gpu->free(gk), gpu->free(gv);
}

Test(gpu_model_ops, attention_causal) {
    attn_case(37, 2, 96, 64, NULL); /* T not a multiple of any tile, d_qk != d_v */
    attn_case(1, 1, 16, 8, NULL);
    attn_case(130, 2, 192, 128, NULL); /* V3 head dims: more than 48 KiB of shared memory */
    attn_case(33, 1, 256, 256, NULL);  /* the largest head dims */
    attn_case(70, 3, 40, 72, NULL);    /* d_v > d_qk, neither a multiple of 32 */
}

Test(gpu_model_ops, attention_documents) {
    const int len1[] = {50, 1, 79, 70}; /* a one-token document; boundaries inside tiles */
    int32_t *d1 = docs(200, len1, 4);
    attn_case(200, 3, 96, 64, d1);
    free(d1);
    rng r;
    rng_init(&r, seed0, 111);
    int len2[40], n = 0, T = 0;
    while (T < 300) { /* random lengths 1..40 */
        int l = 1 + (int)rng_below(&r, 40);
        if (T + l > 300) l = 300 - T;
        len2[n++] = l;
        T += l;
    }
    int32_t *d2 = docs(300, len2, n);
    attn_case(300, 2, 48, 80, d2);
    free(d2);
}

/* Absorbed attention over latent caches of different lengths (the table's mla_absorbed, the rollout's decode). */
static void absorbed_case(int B, int H, int dn, int dr, int dv, int rkv, int maxlen) {
    const int dqk = dn + dr;
    char what[160], tag[96];
    snprintf(tag, sizeof tag, "B=%d H=%d dn=%d dr=%d dv=%d rkv=%d", B, H, dn, dr, dv, rkv);
    float *q = hrand((size_t)B * H * dqk, 201, 1.0f), *w = hrand((size_t)H * (dn + dv) * rkv, 202, 0.1f);
    int32_t *len = malloc(sizeof(int32_t) * (size_t)B);
    const float **hc = malloc(sizeof(float *) * (size_t)B), **hk = malloc(sizeof(float *) * (size_t)B);
    const float **dc = malloc(sizeof(float *) * (size_t)B), **dk = malloc(sizeof(float *) * (size_t)B);
    rng r;
    rng_init(&r, seed0, 203);
    for (int b = 0; b < B; b++) {
        len[b] = b == 0 ? 1 : 1 + (int)rng_below(&r, (uint64_t)maxlen); /* a one-token cache first */
        float *c = hrand((size_t)len[b] * rkv, 300 + (uint64_t)b, 1.0f), *k = hrand((size_t)len[b] * dr, 600 + (uint64_t)b, 1.0f);
        hc[b] = c;
        hk[b] = k;
        dc[b] = dput(c, sizeof(float) * (size_t)len[b] * rkv);
        dk[b] = dput(k, sizeof(float) * (size_t)len[b] * dr);
    }
    const size_t no = (size_t)B * H * dv, nl = (size_t)B * H;
    float *out = malloc(sizeof(float) * no), *lse = malloc(sizeof(float) * nl);
    mr_err e = {0};
    const float scale = 1.0f / sqrtf((float)dqk);
    cr_assert_eq(mla_decode_absorbed_lse(out, lse, q, hc, hk, len, w, B, H, dn, dr, dv, rkv, scale, &e), MR_OK, "%s",
                 e.msg);
    float *gq = dput(q, sizeof(float) * (size_t)B * H * dqk), *gw = dput(w, sizeof(float) * (size_t)H * (dn + dv) * rkv);
    float *go = dpoison(no), *gl = dpoison(nl);
    cr_assert_not_null(gpu->mla_absorbed);
    cr_assert_eq(gpu->mla_absorbed(go, gl, gq, dc, dk, len, gw, B, H, dn, dr, dv, rkv, scale, &e), MR_OK, "%s", e.msg);
    float *ho = dget(go, no), *hl = dget(gl, nl);
    snprintf(what, sizeof what, "mla_absorbed out %s", tag);
    check_close(what, ho, out, no, TOL_F32);
    snprintf(what, sizeof what, "mla_absorbed lse %s", tag);
    check_close(what, hl, lse, nl, TOL_F32);
    for (int b = 0; b < B; b++) {
        free((void *)hc[b]), free((void *)hk[b]);
        gpu->free((void *)dc[b]), gpu->free((void *)dk[b]);
    }
    free(hc), free(hk), free(dc), free(dk), free(len), free(q), free(w), free(out), free(lse), free(ho), free(hl);
    gpu->free(gq), gpu->free(gw), gpu->free(go), gpu->free(gl);
}

Test(gpu_model_ops, absorbed_attention_over_latent_caches) {
    absorbed_case(5, 3, 16, 8, 12, 40, 70);      /* small, odd sizes */
    absorbed_case(3, 4, 128, 64, 128, 512, 300); /* V3's head dims and latent rank */
    absorbed_case(1, 1, 8, 0, 8, 16, 1);         /* one token, no RoPE part */
}

/* Many rows with long caches: cuda_mla_absorbed runs them in chunks (score scratch <= 16M floats a launch). */
Test(gpu_model_ops, absorbed_attention_in_chunks) {
#ifdef MOERL_CUDA_EMU /* attention_cuda.cu's chunk is 4096 scores there: 16 rows here, so 3 chunks */
    absorbed_case(40, 4, 16, 8, 16, 16, 64);
#else /* 512 rows of up to 2048 keys per 64 MiB chunk: 2 chunks */
    absorbed_case(600, 16, 16, 8, 16, 16, 2048);
#endif
}

/* The decode step's rows in device memory (kv_append, mla_rows: what a CUDA graph replays): caches of L layers and
 * different capacities, each row's token appended to layer `lay` at its slot, then attention over slots 0..at of
 * that layer: the cache bits and the attention within fp32 rounding of the CPU's table. */
static void rows_case(int B, int L, int lay, int H, int dn, int dr, int dv, int rkv) {
    const int dqk = dn + dr;
    char what[160], tag[96];
    snprintf(tag, sizeof tag, "B=%d L=%d layer %d H=%d rkv=%d", B, L, lay, H, rkv);
    const backend *cpu = backend_cpu();
    rng r;
    rng_init(&r, seed0, 401);
    kv_row *hr = malloc(sizeof(kv_row) * (size_t)B), *gr = malloc(sizeof(kv_row) * (size_t)B);
    float **hcache = malloc(sizeof(float *) * (size_t)B), **gcache = malloc(sizeof(float *) * (size_t)B);
    size_t *nf = malloc(sizeof(size_t) * (size_t)B);
    int max_cap = 0;
    for (int b = 0; b < B; b++) {
        const int cap = 4 + (int)rng_below(&r, 60), at = (int)rng_below(&r, (uint64_t)cap);
        nf[b] = (size_t)L * cap * (rkv + dr);
        hcache[b] = hrand(nf[b], 500 + (uint64_t)b, 1.0f);
        gcache[b] = dput(hcache[b], sizeof(float) * nf[b]);
        hr[b] = (kv_row){.ckv = hcache[b], .kpe = hcache[b] + (size_t)L * cap * rkv, .cap = cap, .at = at};
        gr[b] = (kv_row){.ckv = gcache[b], .kpe = gcache[b] + (size_t)L * cap * rkv, .cap = cap, .at = at};
        if (cap > max_cap) max_cap = cap;
    }
    float *cn = hrand((size_t)B * rkv, 402, 1.0f), *kp = hrand((size_t)B * dr, 403, 1.0f);
    float *q = hrand((size_t)B * H * dqk, 404, 1.0f), *w = hrand((size_t)H * (dn + dv) * rkv, 405, 0.1f);
    const size_t no = (size_t)B * H * dv, nl = (size_t)B * H;
    float *out = malloc(sizeof(float) * no), *lse = malloc(sizeof(float) * nl);
    const float scale = 1.0f / sqrtf((float)dqk);
    mr_err e = {0};
    cpu->kv_append(hr, lay, cn, kp, B, rkv, dr);
    cr_assert_eq(cpu->mla_rows(out, lse, q, hr, lay, w, B, H, dn, dr, dv, rkv, scale, max_cap, &e), MR_OK, "%s", e.msg);
    kv_row *dr_ = dput(gr, sizeof(kv_row) * (size_t)B);
    float *gcn = dput(cn, sizeof(float) * (size_t)B * rkv), *gkp = dput(kp, sizeof(float) * (size_t)B * dr);
    float *gq = dput(q, sizeof(float) * (size_t)B * H * dqk), *gw = dput(w, sizeof(float) * (size_t)H * (dn + dv) * rkv);
    float *go = dpoison(no), *gl = dpoison(nl);
    gpu->kv_append(dr_, lay, gcn, gkp, B, rkv, dr);
    cr_assert_eq(gpu->mla_rows(go, gl, gq, dr_, lay, gw, B, H, dn, dr, dv, rkv, scale, max_cap, &e), MR_OK, "%s",
                 e.msg);
    for (int b = 0; b < B; b++) {
        float *c = dget(gcache[b], nf[b]);
        cr_assert_eq(memcmp(c, hcache[b], sizeof(float) * nf[b]), 0, "kv_append: cache %d differs %s", b, tag);
        free(c);
    }
    float *ho = dget(go, no), *hl = dget(gl, nl);
    snprintf(what, sizeof what, "mla_rows out %s", tag);
    check_close(what, ho, out, no, TOL_F32);
    snprintf(what, sizeof what, "mla_rows lse %s", tag);
    check_close(what, hl, lse, nl, TOL_F32);
    for (int b = 0; b < B; b++) free(hcache[b]), gpu->free(gcache[b]);
    free(hr), free(gr), free(hcache), free(gcache), free(nf), free(cn), free(kp), free(q), free(w), free(out);
    free(lse), free(ho), free(hl);
    gpu->free(dr_), gpu->free(gcn), gpu->free(gkp), gpu->free(gq), gpu->free(gw), gpu->free(go), gpu->free(gl);
}

Test(gpu_model_ops, decode_rows_append_and_attend) {
    rows_case(7, 3, 2, 3, 16, 8, 12, 40);
    rows_case(2, 1, 0, 4, 128, 64, 128, 512);
    rows_case(1, 2, 1, 1, 8, 0, 8, 16);
}

Test(gpu_model_ops, absorbed_attention_refuses_an_empty_cache) {
    int32_t len[2] = {3, 0};
    const float *p[2] = {NULL, NULL};
    mr_err e = {0};
    cr_assert_eq(gpu->mla_absorbed(NULL, NULL, NULL, p, p, len, NULL, 2, 1, 8, 4, 8, 16, 1.0f, &e), MR_EINVAL);
    cr_assert(strstr(e.msg, "sequence 1 has 0 cached tokens"), "message: %s", e.msg);
}

Test(gpu_model_ops, attention_too_wide_is_reported) {
    const int dqk = ATTN_CUDA_MAX_DIM + 1, dv = 8;
    float *q = dpoison((size_t)dqk), *o = dpoison((size_t)dv), *l = dpoison(1);
    gpu->attention_forward(o, l, q, q, o, NULL, 1, 1, dqk, dv, 1.0f);
    mr_err e = {0};
    cr_assert_eq(gpu->sync(&e), MR_EDEVICE);
    cr_assert(strstr(e.msg, "head dims"), "message: %s", e.msg);
    gpu->free(q), gpu->free(o), gpu->free(l);
}

Test(gpu_model_ops, attention_swa_says_not_implemented) {
    mr_err e = {0};
    cr_assert_not_null(gpu->attention_swa_forward);
    cr_assert_eq(gpu->attention_swa_forward(NULL, NULL, NULL, NULL, NULL, NULL, 4, 1, 8, 8, 1.0f, 2, 2, &e),
                 MR_EDEVICE);
    cr_assert(strstr(e.msg, "not implemented on CUDA"), "message: %s", e.msg);
    mr_err e2 = {0};
    cr_assert_eq(gpu->attention_swa_backward(NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, 4, 1, 8, 8,
                                             1.0f, 2, 2, &e2),
                 MR_EDEVICE);
    cr_assert(strstr(e2.msg, "not implemented on CUDA"), "message: %s", e2.msg);
}

/* ---- MoE ---- */

#define MAXE 64

/* Flat parameter layout (also the gradients'): [gate_w E·d][bias E][gate E·Ie·d][up E·Ie·d][down E·d·Ie]
 * [sh_gate Is·d][sh_up Is·d][sh_down d·Is]. */
enum { SEG_GW, SEG_BIAS, SEG_EG, SEG_EU, SEG_ED, SEG_SG, SEG_SU, SEG_SD, NSEG };
static const char *seg_name[NSEG] = {"gate.weight", "bias", "gate_proj", "up_proj", "down_proj",
                                     "shared.gate_proj", "shared.up_proj", "shared.down_proj"};

typedef struct views {
    const float *g[MAXE], *u[MAXE], *dn[MAXE];
    float *gg[MAXE], *gu[MAXE], *gd[MAXE];
    moe_params p;
    moe_grads gr;
} views;

static void layout(size_t *off, const moe_cfg *c) {
    size_t d = c->d, E = c->E, Ie = c->I_e, Is = c->I_s;
    size_t n[NSEG] = {E * d, E, E * Ie * d, E * Ie * d, E * d * Ie, Is * d, Is * d, d * Is};
    off[0] = 0;
    for (int i = 0; i < NSEG; i++) off[i + 1] = off[i] + n[i];
}

/* Points params (into P) and grads (into G) of one layer; P and G are host or device alike. */
static void point(views *v, float *P, float *G, const size_t *off, const moe_cfg *c, int with_bias) {
    size_t eg = (size_t)c->I_e * c->d;
    for (int x = 0; x < c->E; x++) {
        v->g[x] = P + off[SEG_EG] + x * eg, v->u[x] = P + off[SEG_EU] + x * eg, v->dn[x] = P + off[SEG_ED] + x * eg;
        v->gg[x] = G + off[SEG_EG] + x * eg, v->gu[x] = G + off[SEG_EU] + x * eg, v->gd[x] = G + off[SEG_ED] + x * eg;
    }
    v->p = (moe_params){.gate_w = P + off[SEG_GW], .gate_bias = with_bias ? P + off[SEG_BIAS] : NULL,
                        .gate_proj = v->g, .up_proj = v->u, .down_proj = v->dn, .sh_gate = P + off[SEG_SG],
                        .sh_up = P + off[SEG_SU], .sh_down = P + off[SEG_SD]};
    v->gr = (moe_grads){.gate_w = G + off[SEG_GW], .gate_proj = v->gg, .up_proj = v->gu, .down_proj = v->gd,
                        .sh_gate = G + off[SEG_SG], .sh_up = G + off[SEG_SU], .sh_down = G + off[SEG_SD]};
}

typedef struct moe_opts {
    int ties;         /* group 1 = a copy of group 0 (weights and bias): every token has tied groups and experts */
    int replay;       /* also run with a replayed routing (the CPU's, slots reversed) */
    int with_daff;    /* pass a balance-loss gradient to the backward */
    int no_down_grad; /* moe_grads.down_proj = NULL */
    int infer;        /* also run for inference (moe_saved.infer: the experts straight from the routing) */
} moe_opts;

static void moe_case(moe_cfg c, int T, int with_bias, moe_opts o) {
    const int d = c.d, E = c.E, K = c.K;
    cr_assert_leq(E, MAXE);
    size_t off[NSEG + 1];
    layout(off, &c);
    const size_t np = off[NSEG], nx = (size_t)T * d, TK = (size_t)T * K;
    char tag[160], what[220];
    snprintf(tag, sizeof tag, "T=%d E=%d K=%d G=%d/%d score=%d method=%d norm=%d mm=%d/%d ties=%d", T, E, K, c.n_group,
             c.topk_group, (int)c.score, (int)c.method, (int)c.norm_topk_prob, (int)c.mm, (int)c.mm_bwd, o.ties);

    float *P = hrand(np, 201, 0.1f), *x = hrand(nx, 202, 1.0f), *dout = hrand(nx, 203, 1.0f);
    for (size_t i = 0; i < off[SEG_GW + 1]; i++) P[i] *= 5.0f; /* router weights: spread the affinities */
    if (o.ties) {
        const int gs = E / c.n_group;
        memcpy(P + off[SEG_GW] + (size_t)gs * d, P + off[SEG_GW], sizeof(float) * (size_t)gs * d);
        memcpy(P + off[SEG_BIAS] + gs, P + off[SEG_BIAS], sizeof(float) * (size_t)gs);
    }
    float *G0 = hrand(np, 204, 0.1f), *dx0 = hrand(nx, 205, 0.1f), *daff = hrand((size_t)T * E, 206, 0.1f);

    /* CPU */
    views hv;
    float *Gc = hcopy(G0, np), *dxc = hcopy(dx0, nx), *outc = malloc(sizeof(float) * nx);
    point(&hv, P, Gc, off, &c, with_bias);
    if (o.no_down_grad) hv.gr.down_proj = NULL;
    moe_saved sc;
    moe_work wc;
    mr_err e = {0};
    cr_assert_eq(backend_moe_saved_init(backend_cpu(), &sc, &c, T, &e), MR_OK, "%s", e.msg);
    cr_assert_eq(backend_moe_work_init(backend_cpu(), &wc, &c, T, &e), MR_OK, "%s", e.msg);
    cr_assert_eq(moe_forward(outc, &sc, &wc, x, NULL, &hv.p, &c, T, &e), MR_OK, "%s", e.msg);
    moe_backward(dxc, &hv.gr, &wc, dout, o.with_daff ? daff : NULL, &sc, x, &hv.p, &c);

    /* GPU */
    views dvw;
    float *dP = dput(P, sizeof(float) * np), *dG = dput(G0, sizeof(float) * np), *ddx = dput(dx0, sizeof(float) * nx);
    float *dx_ = dput(x, sizeof(float) * nx), *ddout = dput(dout, sizeof(float) * nx);
    float *ddaff = dput(daff, sizeof(float) * T * E), *dout_ = dpoison(nx);
    point(&dvw, dP, dG, off, &c, with_bias);
    if (o.no_down_grad) dvw.gr.down_proj = NULL;
    moe_saved sg;
    moe_work wg;
    cr_assert_eq(backend_moe_saved_init(gpu, &sg, &c, T, &e), MR_OK, "%s", e.msg);
    cr_assert_eq(backend_moe_work_init(gpu, &wg, &c, T, &e), MR_OK, "%s", e.msg);
    poison(sg.scores, (size_t)T * E), poison(sg.weights, TK), poison(sg.idx, TK), poison(sg.order, TK);
    poison(sg.pos, TK);
    cr_assert_eq(gpu->moe_forward(dout_, &sg, &wg, dx_, NULL, &dvw.p, &c, T, &e), MR_OK, "%s", e.msg);
    float *ho = dget(dout_, nx), *hs = dget(sg.scores, (size_t)T * E), *hw = dget(sg.weights, TK);
    int32_t *hi = dget_bytes(sg.idx, sizeof(int32_t) * TK), *hor = dget_bytes(sg.order, sizeof(int32_t) * TK);
    int32_t *hpos = dget_bytes(sg.pos, sizeof(int32_t) * TK);
    for (size_t p = 0; p < TK; p++)
        cr_assert_eq(hi[p], sc.idx[p], "moe routing %s: token %zu slot %zu: gpu expert %d, cpu %d [seed %llu]", tag,
                     p / K, p % K, hi[p], sc.idx[p], (unsigned long long)seed0);
    cr_assert_eq(memcmp(sg.off, sc.off, sizeof(int32_t) * (E + 1)), 0, "moe dispatch off %s", tag);
    cr_assert_eq(memcmp(sg.load, sc.load, sizeof(int64_t) * E), 0, "moe loads %s", tag);
    cr_assert_eq(memcmp(hor, sc.order, sizeof(int32_t) * TK), 0, "moe dispatch order %s", tag);
    cr_assert_eq(memcmp(hpos, sc.pos, sizeof(int32_t) * TK), 0, "moe dispatch pos %s", tag);
    cr_assert_eq(sg.T, T);
    snprintf(what, sizeof what, "moe scores %s", tag);
    check_close(what, hs, sc.scores, (size_t)T * E, TOL_F32);
    snprintf(what, sizeof what, "moe weights %s", tag);
    check_close(what, hw, sc.weights, TK, TOL_F32);
    snprintf(what, sizeof what, "moe_forward out %s", tag);
    check_close(what, ho, outc, nx, TOL_F32);
    if (o.ties) { /* the tie rule held on both sides: never a group-1 expert with its group-0 twin unchosen */
        const int gs = E / c.n_group;
        for (int t = 0; t < T; t++)
            for (int k = 0; k < K; k++) {
                int x1 = hi[(size_t)t * K + k];
                if (x1 / gs != 1) continue;
                int twin = 0;
                for (int j = 0; j < K; j++) twin |= hi[(size_t)t * K + j] == x1 - gs;
                cr_assert(twin, "token %d: expert %d chosen without its lower-index twin %d", t, x1, x1 - gs);
            }
    }

    gpu->moe_backward(ddx, &dvw.gr, &wg, ddout, o.with_daff ? ddaff : NULL, &sg, dx_, &dvw.p, &c);
    float *hdx = dget(ddx, nx), *hG = dget(dG, np);
    snprintf(what, sizeof what, "moe_backward dx %s", tag);
    check_close(what, hdx, dxc, nx, TOL_F32);
    for (int s = 0; s < NSEG; s++) {
        if (off[s + 1] == off[s]) continue;
        snprintf(what, sizeof what, "moe_backward d%s %s", seg_name[s], tag);
        check_close(what, hG + off[s], Gc + off[s], off[s + 1] - off[s], TOL_F32);
    }

    if (o.replay) { /* the CPU's routing with the slots reversed, replayed on both */
        int32_t *rep = malloc(sizeof(int32_t) * TK);
        for (int t = 0; t < T; t++)
            for (int k = 0; k < K; k++) rep[(size_t)t * K + k] = sc.idx[(size_t)t * K + (K - 1 - k)];
        int32_t *drep = dput(rep, sizeof(int32_t) * TK);
        cr_assert_eq(moe_forward(outc, &sc, &wc, x, rep, &hv.p, &c, T, &e), MR_OK, "%s", e.msg);
        poison(dout_, nx);
        cr_assert_eq(gpu->moe_forward(dout_, &sg, &wg, dx_, drep, &dvw.p, &c, T, &e), MR_OK, "%s", e.msg);
        float *ho2 = dget(dout_, nx), *hw2 = dget(sg.weights, TK);
        int32_t *hi2 = dget_bytes(sg.idx, sizeof(int32_t) * TK);
        cr_assert_eq(memcmp(hi2, rep, sizeof(int32_t) * TK), 0, "replayed routing not kept %s", tag);
        snprintf(what, sizeof what, "moe_forward replayed out %s", tag);
        check_close(what, ho2, outc, nx, TOL_F32);
        snprintf(what, sizeof what, "moe replayed weights %s", tag);
        check_close(what, hw2, sc.weights, TK, TOL_F32);
        /* a bad replay: the same refusal and message on both */
        if (K >= 2) {
            rep[(size_t)(T - 1) * K + 1] = rep[(size_t)(T - 1) * K];
            cr_assert_eq(gpu->to_device(drep, rep, sizeof(int32_t) * TK, &e), MR_OK);
            mr_err ec = {0}, eg = {0};
            cr_assert_eq(moe_forward(outc, &sc, &wc, x, rep, &hv.p, &c, T, &ec), MR_EINVAL);
            cr_assert_eq(gpu->moe_forward(dout_, &sg, &wg, dx_, drep, &dvw.p, &c, T, &eg), MR_EINVAL);
            cr_assert_str_eq(eg.msg, ec.msg);
        }
        rep[0] = E; /* out of range */
        cr_assert_eq(gpu->to_device(drep, rep, sizeof(int32_t) * TK, &e), MR_OK);
        mr_err ec = {0}, eg = {0};
        cr_assert_eq(moe_forward(outc, &sc, &wc, x, rep, &hv.p, &c, T, &ec), MR_EINVAL);
        cr_assert_eq(gpu->moe_forward(dout_, &sg, &wg, dx_, drep, &dvw.p, &c, T, &eg), MR_EINVAL);
        cr_assert_str_eq(eg.msg, ec.msg);
        free(rep), free(ho2), free(hw2), free(hi2);
        gpu->free(drep);
    }

    if (o.infer) { /* inference: no dispatch in MM_DET or for few pairs, the same output; backward refuses */
        cr_assert_eq(moe_forward(outc, &sc, &wc, x, NULL, &hv.p, &c, T, &e), MR_OK, "%s", e.msg);
        sg.infer = 1;
        poison(dout_, nx);
        poison(sg.idx, TK);
        cr_assert_eq(gpu->moe_forward(dout_, &sg, &wg, dx_, NULL, &dvw.p, &c, T, &e), MR_OK, "%s", e.msg);
        const int direct = c.mm == MM_DET || TK <= 256;
        cr_assert_eq(sg.no_dispatch, direct, "inference %s: no_dispatch %d", tag, sg.no_dispatch);
        float *ho3 = dget(dout_, nx);
        int32_t *hi3 = dget_bytes(sg.idx, sizeof(int32_t) * TK);
        cr_assert_eq(memcmp(hi3, sc.idx, sizeof(int32_t) * TK), 0, "inference routing %s", tag);
        snprintf(what, sizeof what, "moe_forward inference out %s", tag);
        check_close(what, ho3, outc, nx, TOL_F32);
        if (c.mm == MM_DET) /* the direct path gives the dispatch path's bits (decode == training forward) */
            for (size_t i = 0; i < nx; i++)
                cr_assert(memcmp(&ho3[i], &ho[i], sizeof(float)) == 0, "inference out %zu: %.9g, dispatch %.9g %s",
                          i, ho3[i], ho[i], tag);
        if (direct) {
            mr_err es = {0};
            gpu->moe_backward(ddx, &dvw.gr, &wg, ddout, NULL, &sg, dx_, &dvw.p, &c);
            cr_assert_neq(gpu->sync(&es), MR_OK, "backward after an inference forward is refused");
            cr_assert(strstr(es.msg, "inference"), "%s", es.msg);
        }
        sg.infer = 0;
        cr_assert_eq(gpu->moe_forward(dout_, &sg, &wg, dx_, NULL, &dvw.p, &c, T, &e), MR_OK, "%s", e.msg);
        cr_assert_eq(sg.no_dispatch, 0);
        free(ho3), free(hi3);
    }

    moe_saved_free(&sc), moe_work_free(&wc), moe_saved_free(&sg), moe_work_free(&wg);
    free(P), free(x), free(dout), free(G0), free(dx0), free(daff), free(Gc), free(dxc), free(outc);
    free(ho), free(hs), free(hw), free(hi), free(hor), free(hpos), free(hdx), free(hG);
    gpu->free(dP), gpu->free(dG), gpu->free(ddx), gpu->free(dx_), gpu->free(ddout), gpu->free(ddaff);
    gpu->free(dout_);
}

static moe_cfg cfg(int d, int E, int K, int G, int Gt, int Ie, int Is, moe_score_func sf, moe_topk_method m, bool norm,
                   float rsf, mm_mode mm) {
    return (moe_cfg){.d = d, .E = E, .K = K, .I_e = Ie, .I_s = Is, .n_group = G, .topk_group = Gt, .score = sf,
                     .method = m, .norm_topk_prob = norm, .routed_scaling_factor = rsf, .mm = mm, .mm_bwd = mm};
}

Test(gpu_model_ops, moe_v3_sigmoid_noaux_tc) {
    moe_cfg c = cfg(64, 16, 4, 4, 2, 32, 64, MOE_SCORE_SIGMOID, MOE_TOPK_NOAUX_TC, true, 2.5f, MM_FAST);
    moe_case(c, 101, 1, (moe_opts){.replay = 1, .with_daff = 1, .infer = 1}); /* T·K > 256: the dispatch ranks in
                                                                                 2 chunks; inference dispatches */
    moe_case(c, 16, 1, (moe_opts){.infer = 1}); /* a decode batch: inference runs the experts directly */
    c.mm = c.mm_bwd = MM_DET;
    moe_case(c, 37, 1, (moe_opts){.with_daff = 0, .infer = 1});
}

Test(gpu_model_ops, moe_ties_lower_index_wins) { /* MM_DET: the tied logits are equal bits on both backends */
    moe_cfg c = cfg(48, 16, 4, 4, 2, 24, 0, MOE_SCORE_SIGMOID, MOE_TOPK_NOAUX_TC, true, 1.0f, MM_DET);
    moe_case(c, 41, 1, (moe_opts){.ties = 1, .with_daff = 1, .infer = 1});
    c = cfg(48, 16, 3, 4, 2, 24, 0, MOE_SCORE_SOFTMAX, MOE_TOPK_GROUP_LIMITED_GREEDY, false, 1.0f, MM_DET);
    moe_case(c, 41, 0, (moe_opts){.ties = 1});
}

Test(gpu_model_ops, moe_v2_softmax) {
    moe_cfg c = cfg(64, 16, 2, 1, 1, 32, 0, MOE_SCORE_SOFTMAX, MOE_TOPK_GREEDY, false, 1.0f, MM_FAST);
    moe_case(c, 50, 0, (moe_opts){.replay = 1, .no_down_grad = 1});
    c = cfg(64, 16, 3, 4, 2, 32, 32, MOE_SCORE_SOFTMAX, MOE_TOPK_GROUP_LIMITED_GREEDY, true, 16.0f, MM_FAST);
    moe_case(c, 23, 0, (moe_opts){.with_daff = 1});
}

Test(gpu_model_ops, moe_empty_experts_and_one_token) {
    moe_cfg c = cfg(32, 32, 2, 8, 3, 16, 16, MOE_SCORE_SIGMOID, MOE_TOPK_NOAUX_TC, true, 2.5f, MM_FAST);
    moe_case(c, 3, 1, (moe_opts){.with_daff = 1, .infer = 1}); /* most experts get no token: their gradients stay
                                                                    as they were */
    moe_case(c, 1, 1, (moe_opts){.replay = 1, .infer = 1});
}

Test(gpu_model_ops, moe_refuses_host_buffers) {
    moe_cfg c = cfg(8, 4, 2, 1, 1, 8, 0, MOE_SCORE_SIGMOID, MOE_TOPK_GREEDY, true, 1.0f, MM_FAST);
    moe_saved s;
    moe_work w;
    mr_err e = {0};
    cr_assert_eq(moe_saved_init(&s, &c, 4, &e), MR_OK);
    cr_assert_eq(moe_work_init(&w, &c, 4, &e), MR_OK);
    moe_params p = {0};
    cr_assert_eq(gpu->moe_forward(NULL, &s, &w, NULL, NULL, &p, &c, 4, &e), MR_EINVAL);
    cr_assert(strstr(e.msg, "backend_moe_saved_init"), "message: %s", e.msg);
    moe_saved_free(&s), moe_work_free(&w);
    /* the device buffers refuse too many tokens, as the CPU's */
    cr_assert_eq(backend_moe_saved_init(gpu, &s, &c, 4, &e), MR_OK, "%s", e.msg);
    cr_assert_eq(backend_moe_work_init(gpu, &w, &c, 2, &e), MR_OK, "%s", e.msg);
    cr_assert_eq(gpu->moe_forward(NULL, &s, &w, NULL, NULL, &p, &c, 3, &e), MR_ERANGE);
    moe_saved_free(&s), moe_work_free(&w);
}

/* ---- balance loss ---- */

Test(gpu_model_ops, moe_balance_loss) {
    const int T = 37, E = 16, K = 4;
    const int seq_len[] = {10, 0, 20, 7};
    float *s = hrand((size_t)T * E, 301, 1.0f);
    for (int i = 0; i < T * E; i++) s[i] = 1.0f / (1.0f + expf(-s[i])); /* affinities in (0, 1) */
    int32_t *idx = malloc(sizeof(int32_t) * T * K);
    rng r;
    rng_init(&r, seed0, 302);
    for (int t = 0; t < T; t++) /* K distinct experts per token */
        for (int k = 0; k < K; k++) {
            int32_t x, dup;
            do {
                x = (int32_t)rng_below(&r, (uint32_t)E);
                dup = 0;
                for (int j = 0; j < k; j++) dup |= idx[t * K + j] == x;
            } while (dup);
            idx[t * K + k] = x;
        }
    float *daff0 = hrand((size_t)T * E, 303, 0.1f), *rd = hcopy(daff0, (size_t)T * E);
    mr_err e = {0};
    double lc = 0, lg = 0;
    cr_assert_eq(moe_balance_loss(&lc, rd, s, idx, seq_len, 4, T, E, K, 0.01f, &e), MR_OK, "%s", e.msg);
    float *ds = dput(s, sizeof(float) * T * E), *dd = dput(daff0, sizeof(float) * T * E);
    int32_t *di = dput(idx, sizeof(int32_t) * T * K);
    cr_assert_eq(gpu->moe_balance_loss(&lg, dd, ds, di, seq_len, 4, T, E, K, 0.01f, &e), MR_OK, "%s", e.msg);
    cr_assert(fabs(lg - lc) <= 1e-12 * fabs(lc), "balance loss gpu %.17g cpu %.17g [seed %llu]", lg, lc,
              (unsigned long long)seed0);
    float *hd = dget(dd, (size_t)T * E);
    check_close("moe_balance_loss daff", hd, rd, (size_t)T * E, TOL_F32);
    /* loss only (daff NULL) */
    double lg2 = 0;
    cr_assert_eq(gpu->moe_balance_loss(&lg2, NULL, ds, di, seq_len, 4, T, E, K, 0.01f, &e), MR_OK, "%s", e.msg);
    cr_assert_eq(lg2, lg);
    /* lengths not summing to T: the CPU's refusal */
    const int bad[] = {10, 20};
    mr_err ec = {0}, eg = {0};
    cr_assert_eq(moe_balance_loss(&lc, NULL, s, idx, bad, 2, T, E, K, 0.01f, &ec), MR_EINVAL);
    cr_assert_eq(gpu->moe_balance_loss(&lg, NULL, ds, di, bad, 2, T, E, K, 0.01f, &eg), MR_EINVAL);
    cr_assert_str_eq(eg.msg, ec.msg);
    free(s), free(idx), free(daff0), free(rd), free(hd);
    gpu->free(ds), gpu->free(dd), gpu->free(di);
}

/* ---- the table ---- */

Test(gpu_model_ops, table_has_model_ops) {
    cr_assert(gpu->attention_forward && gpu->attention_backward && gpu->moe_forward && gpu->moe_backward &&
              gpu->moe_balance_loss);
    cr_assert_eq(backend_has_model_ops(gpu), 1);
}
#endif

int main(int argc, char **argv) { return gpu_test_main(argc, argv, "gpu_model_ops"); }
