/* model.c: forward and backward of the whole model (see model.h). Layer order and formulas: MODEL-SPEC §2-§9. */
#include "model/model.h"

#include <math.h>
#include <string.h>

#include "core/mem.h"
#include "kernels/backend.h"
#include "kernels/cpu/attention.h"

/* Every kernel call goes through the backend operation table (kernels/backend.h), and so does every touch of
 * the model's memory (weights, activations, caches): on a device backend it is not host memory. Host code reads
 * only host arrays (the batch, the caches' lengths) and the host copies of model_logits / model_layer_experts. */
#define BE (m->be)

/* Slots of m->st_i (device backends), T_max int32 each; the replay arrays follow. */
enum { ST_IDS, ST_POS, ST_DOC, ST_TGT, ST_TGTK, ST_HROW, ST_N };

/* Saved activations of one block (an MLA attention + a dense or MoE FFN), for up to T_max rows. */
struct layer_act {
    float *a, *rstd_a;       /* (T, d), (T) input_layernorm output */
    float *cq, *cqn, *rstd_q; /* (T, r_q) q_a output, normed; (T) — q_lora only */
    float *q;                /* (T, H, d_qk) after RoPE */
    float *lat, *cn, *rstd_kv; /* (T, r_kv) latent before / after kv_a_layernorm, (T) */
    float *kpe;              /* (T, d_rope) shared RoPE key, rotated */
    float *kvb;              /* (T, H·(d_nope + d_v)) */
    float *k, *v;            /* (T, H, d_qk), (T, H, d_v) */
    float *att, *lse;        /* (T, H·d_v), (T, H) */
    float *xm;               /* (T, d) residual after attention */
    float *f, *rstd_f;       /* (T, d), (T) post_attention_layernorm output */
    float *hg, *hu, *h;      /* (T, I) dense FFN */
    moe_saved moe;           /* MoE FFN */
    int is_moe, moe_index;
};

/* One MTP module's extra activations (its block's are in acts[L + k - 1]). */
struct mtp_act {
    float *emb, *en, *rstd_e;  /* (T, d) embedding of t_{i+k}, enorm output, (T) */
    float *hn, *rstd_h;        /* (T, d) hnorm output, (T) */
    float *cat;                /* (T, 2d) [en ; hn] */
    float *x0;                 /* (T, d) eh_proj output = block input */
    float *hk;                 /* (T, d) block output (feeds depth k+1) */
    float *hkn, *rstd_k;       /* (T, d) shared_head.norm output, (T) */
    float *logits;             /* (T, V) logits, then their gradient */
    double loss;
    int64_t n;
};

/* ------------------------------------------------------------------------------------------ setup */

typedef struct arena {
    float *base;
    size_t off, cap;
} arena;

static float *take(arena *A, size_t n) {
    n = (n + 15) & ~(size_t)15; /* 64-byte alignment for every buffer */
    float *p = A->base ? A->base + A->off : NULL;
    A->off += n;
    return p;
}

/* Sizes (base == NULL) or points every activation buffer. */
static void carve(model *m, arena *A) {
    const model_config *c = &m->p.cfg;
    const size_t T = (size_t)m->T_max, d = (size_t)c->hidden_size, H = (size_t)c->num_attention_heads;
    const size_t dqk = (size_t)(c->qk_nope_head_dim + c->qk_rope_head_dim), dv = (size_t)c->v_head_dim;
    const size_t rkv = (size_t)c->kv_lora_rank, dr = (size_t)c->qk_rope_head_dim, rq = (size_t)c->q_lora_rank;
    const size_t V = (size_t)c->vocab_size, I = (size_t)c->intermediate_size;
    for (int l = 0; l < m->p.n_layers; l++) {
        layer_act *a = &m->acts[l];
        a->a = take(A, T * d);
        a->rstd_a = take(A, T);
        if (rq) {
            a->cq = take(A, T * rq);
            a->cqn = take(A, T * rq);
            a->rstd_q = take(A, T);
        }
        a->q = take(A, T * H * dqk);
        a->lat = take(A, T * rkv);
        a->cn = take(A, T * rkv);
        a->rstd_kv = take(A, T);
        a->kpe = take(A, T * dr);
        a->kvb = take(A, T * H * (dqk - dr + dv));
        a->k = take(A, T * H * dqk);
        a->v = take(A, T * H * dv);
        a->att = take(A, T * H * dv);
        a->lse = take(A, T * H);
        a->xm = take(A, T * d);
        a->f = take(A, T * d);
        a->rstd_f = take(A, T);
        if (!m->p.w.layers[l].is_moe) {
            a->hg = take(A, T * I);
            a->hu = take(A, T * I);
            a->h = take(A, T * I);
        }
    }
    for (int k = 0; k < c->num_nextn_predict_layers; k++) {
        mtp_act *t = &m->mtp[k];
        t->emb = take(A, T * d);
        t->en = take(A, T * d);
        t->rstd_e = take(A, T);
        t->hn = take(A, T * d);
        t->rstd_h = take(A, T);
        t->cat = take(A, T * 2 * d);
        t->x0 = take(A, T * d);
        t->hk = take(A, T * d);
        t->hkn = take(A, T * d);
        t->rstd_k = take(A, T);
        t->logits = take(A, T * V);
    }
    m->resid = take(A, ((size_t)c->num_hidden_layers + 1) * T * d);
    m->hfin = take(A, T * d);
    m->rstd_fin = take(A, T);
    m->logits = take(A, T * V);
    /* backward scratch: the largest of the per-block needs, laid out in model_backward */
    size_t qk = T * H * dqk, kvbw = T * H * (dqk - dr + dv);
    size_t need = 4 * T * d + 2 * qk + T * H * dv * 2 + kvbw + 2 * T * rkv + T * (rkv + dr) + T * dr + 2 * T * rq +
                  3 * T * (I > (size_t)c->moe_intermediate_size ? I : (size_t)c->moe_intermediate_size) +
                  T * 2 * d + T * (size_t)(c->n_routed_experts > 0 ? c->n_routed_experts : 1);
    m->scratch = take(A, need);
}

static void point_experts(const float **dst, float *base, int E, size_t stride) {
    for (int x = 0; x < E; x++) dst[x] = base + (size_t)x * stride;
}

static void free_graphs(model *m);

void model_free(model *m) {
    if (!m) return;
    if (m->acts)
        for (int l = 0; l < m->p.n_layers; l++) moe_saved_free(&m->acts[l].moe);
    moe_work_free(&m->moe_work);
    rope_free(&m->rope);
    if (m->be && m->acts) m->be->free(m->acts[0].a);
    if (m->be) {
        m->be->free(m->st_i);
        m->be->free(m->st_f);
        if (m->gtmp) m->be->free(m->gtmp);
        if (m->dec_rows != m->dec_rows_h) m->be->free(m->dec_rows);
    }
    mem_free(m->dec_rows_h);
    if (m->be && m->be->graph_free) free_graphs(m);
    mem_free(m->dec_graphs);
    mem_free(m->mtp_graphs);
    mem_free(m->dev.replay);
    mem_free(m->logits_h);
    mem_free(m->mtp_logits_h);
    mem_free(m->experts_h);
    mem_free(m->acts);
    mem_free(m->mtp);
    mem_free(m->ep);
    mem_free(m->gp);
    mem_free(m->tgt_k);
    mem_free(m->seq_len);
    mem_free(m->kv_ptr);
    mem_free(m->kv_len);
    mem_free(m->dec_pos);
    params_free(&m->p);
    memset(m, 0, sizeof *m);
}

int model_init(model *m, model_params *p, const model_opts *opt, int T_max, mr_err *e) {
    memset(m, 0, sizeof *m);
    m->p = *p;
    memset(p, 0, sizeof *p);
    m->opt = *opt;
    m->T_max = T_max;
    m->be = opt->backend ? opt->backend : backend_cpu();
    const model_config *c = &m->p.cfg;
    int rc;
    if (T_max < 1) {
        rc = err_set(e, MR_EINVAL, "model: T_max must be >= 1, got %d", T_max);
        goto fail;
    }
    if (!backend_has_model_ops(m->be)) {
        rc = err_set(e, MR_EDEVICE, "model: backend '%s' does not implement the model operations", m->be->name);
        goto fail;
    }
    if (c->num_nextn_predict_layers > MODEL_MAX_MTP) {
        rc = err_set(e, MR_ERANGE, "model: num_nextn_predict_layers: expected at most %d, got %d", MODEL_MAX_MTP,
                       c->num_nextn_predict_layers);
        goto fail;
    }
    rope_yarn y = {0};
    if (c->rope_scaling.type == CONFIG_ROPE_YARN) {
        y.enabled = 1;
        y.factor = c->rope_scaling.factor;
        y.original_max_pos = c->rope_scaling.original_max_position_embeddings;
        y.beta_fast = c->rope_scaling.beta_fast;
        y.beta_slow = c->rope_scaling.beta_slow;
        y.mscale = c->rope_scaling.mscale;
        y.mscale_all_dim = c->rope_scaling.mscale_all_dim;
    }
    int table = c->max_position_embeddings < 8192 ? c->max_position_embeddings : 8192;
    rc = rope_yarn_init(&m->rope, c->qk_rope_head_dim, c->rope_theta, y.enabled ? &y : NULL, table, e);
    if (rc) goto fail;
    m->scale = (float)config_softmax_scale(c);
    m->acts = mem_calloc((size_t)m->p.n_layers, sizeof *m->acts);
    m->mtp = mem_calloc((size_t)(c->num_nextn_predict_layers + 1), sizeof *m->mtp);
    m->tgt_k = mem_alloc((size_t)T_max * sizeof(int32_t));
    m->seq_len = mem_alloc((size_t)T_max * sizeof(int));
    m->kv_ptr = mem_alloc(2 * (size_t)T_max * sizeof *m->kv_ptr);
    m->kv_len = mem_alloc((size_t)T_max * sizeof *m->kv_len);
    m->dec_pos = mem_alloc((size_t)T_max * sizeof *m->dec_pos);
    m->dec_rows_h = mem_alloc((size_t)T_max * sizeof *m->dec_rows_h);
    m->dev.replay = mem_calloc((size_t)m->p.n_layers, sizeof *m->dev.replay);
    if (!m->acts || !m->mtp || !m->tgt_k || !m->seq_len || !m->kv_ptr || !m->kv_len || !m->dec_pos ||
        !m->dec_rows_h || !m->dev.replay)
        goto nomem;
    m->dec_rows = m->dec_rows_h;
    if ((rc = params_to_backend(&m->p, m->be, e))) goto fail;
    if (!backend_is_host(m->be)) {
        const size_t K = (size_t)(c->n_routed_experts > 0 ? c->num_experts_per_tok : 0);
        m->st_i = BE->alloc(((size_t)ST_N + (size_t)m->p.n_layers * K) * (size_t)T_max * sizeof(int32_t));
        m->st_f = BE->alloc((size_t)T_max * sizeof(float));
        m->dec_rows = BE->alloc((size_t)T_max * sizeof *m->dec_rows);
        if (!m->st_i || !m->st_f || !m->dec_rows) goto nomem;
    }
    if (c->n_routed_experts > 0) {
        m->moe = (moe_cfg){
            .d = c->hidden_size, .E = c->n_routed_experts, .K = c->num_experts_per_tok,
            .I_e = c->moe_intermediate_size, .I_s = c->n_shared_experts * c->moe_intermediate_size,
            .n_group = c->n_group, .topk_group = c->topk_group,
            .score = c->scoring_func == CONFIG_SCORING_SIGMOID ? MOE_SCORE_SIGMOID : MOE_SCORE_SOFTMAX,
            .method = c->topk_method == CONFIG_TOPK_NOAUX_TC ? MOE_TOPK_NOAUX_TC
                      : c->topk_method == CONFIG_TOPK_GREEDY ? MOE_TOPK_GREEDY
                                                             : MOE_TOPK_GROUP_LIMITED_GREEDY,
            .norm_topk_prob = c->norm_topk_prob, .routed_scaling_factor = (float)c->routed_scaling_factor,
            .mm = opt->mm, .mm_bwd = opt->mm_bwd};
        if ((rc = moe_cfg_check(&m->moe, e))) goto fail;
        if ((rc = backend_moe_work_init(m->be, &m->moe_work, &m->moe, T_max, e))) goto fail;
        int n_moe = 0;
        for (int l = 0; l < m->p.n_layers; l++) n_moe += m->p.w.layers[l].is_moe;
        size_t E = (size_t)c->n_routed_experts;
        m->ep = mem_calloc(3 * E * (size_t)(n_moe ? n_moe : 1), sizeof *m->ep);
        m->gp = mem_calloc(3 * E * (size_t)(n_moe ? n_moe : 1), sizeof *m->gp);
        if (!m->ep || !m->gp) goto nomem;
        int mi = 0;
        size_t Ie = (size_t)c->moe_intermediate_size, d = (size_t)c->hidden_size;
        for (int l = 0; l < m->p.n_layers; l++) {
            if (!m->p.w.layers[l].is_moe) continue;
            m->acts[l].is_moe = 1;
            m->acts[l].moe_index = mi;
            const moe_w *w = &m->p.w.layers[l].moe;
            point_experts(m->ep + (3 * (size_t)mi + 0) * E, w->gate, (int)E, Ie * d);
            point_experts(m->ep + (3 * (size_t)mi + 1) * E, w->up, (int)E, Ie * d);
            point_experts(m->ep + (3 * (size_t)mi + 2) * E, w->down, (int)E, Ie * d);
            if ((rc = backend_moe_saved_init(m->be, &m->acts[l].moe, &m->moe, T_max, e))) goto fail;
            mi++;
        }
    }
    arena A = {0};
    carve(m, &A);
    A.cap = A.off;
    A.base = BE->alloc(A.cap * sizeof(float));
    if (!A.base) goto nomem;
    BE->zero(A.base, A.cap * sizeof(float));
    A.off = 0;
    carve(m, &A);
    if ((rc = BE->sync(e))) goto fail;
    return MR_OK;
nomem:
    rc = err_set(e, MR_ENOMEM, "model: out of %s memory for activations (T_max = %d)", m->be->name, T_max);
fail:
    model_free(m);
    return rc;
}

/* ------------------------------------------------------------------------------------------ staging */

/* The n ints at src as the ops should see them: src itself on the CPU, else a copy in slot `slot` of st_i (at
 * `at` within it). NULL stays NULL. */
static int stage_i32(model *m, const int32_t **out, size_t slot, const int32_t *src, size_t n, mr_err *e) {
    *out = src;
    if (!src || backend_is_host(m->be) || n == 0) return MR_OK;
    int32_t *dst = m->st_i + slot * (size_t)m->T_max;
    *out = dst;
    return BE->to_device(dst, src, n * sizeof(int32_t), e);
}

/* Per-row floats (loss scales, policy coefficients) for one op. */
static int stage_f32(model *m, const float **out, const float *src, size_t n, mr_err *e) {
    *out = src;
    if (!src || backend_is_host(m->be) || n == 0) return MR_OK;
    *out = m->st_f;
    return BE->to_device(m->st_f, src, n * sizeof(float), e);
}

/* m->dev = batch b (positions pos, host) as the ops see it. */
static int stage_batch(model *m, const model_batch *b, const int32_t *pos, mr_err *e) {
    const size_t T = (size_t)b->T;
    int rc;
    if ((rc = stage_i32(m, &m->dev.ids, ST_IDS, b->ids, T, e)) || (rc = stage_i32(m, &m->dev.pos, ST_POS, pos, T, e)) ||
        (rc = stage_i32(m, &m->dev.doc_start, ST_DOC, b->doc_start, T, e)) ||
        (rc = stage_i32(m, &m->dev.targets, ST_TGT, b->targets, T, e)))
        return err_prefix(e, "model: copying the batch to the device");
    const size_t K = (size_t)(m->p.cfg.n_routed_experts > 0 ? m->p.cfg.num_experts_per_tok : 0);
    for (int l = 0; l < m->p.n_layers; l++) {
        const int32_t *r = b->replay && m->acts[l].is_moe ? b->replay[l] : NULL;
        if ((rc = stage_i32(m, &m->dev.replay[l], ST_N + (size_t)l * K, r, T * K, e)))
            return err_prefix(e, "model: copying the replayed experts to the device");
    }
    m->logits_h_ok = m->mtp_logits_h_ok = m->experts_h_ok = 0;
    return MR_OK;
}

/* One contiguous copy within the backend's memory. */
static void copy_f(const model *m, float *dst, const float *src, size_t n) { BE->copy2d(dst, n, src, n, n, 1); }

static moe_params layer_moe_params(const model *m, int l) {
    const moe_w *w = &m->p.w.layers[l].moe;
    size_t E = (size_t)m->moe.E, mi = (size_t)m->acts[l].moe_index;
    return (moe_params){.gate_w = w->router, .gate_bias = w->bias,
                        .gate_proj = m->ep + (3 * mi + 0) * E, .up_proj = m->ep + (3 * mi + 1) * E,
                        .down_proj = m->ep + (3 * mi + 2) * E,
                        .sh_gate = w->shared.gate, .sh_up = w->shared.up, .sh_down = w->shared.down};
}

/* ------------------------------------------------------------------------------------------ forward */

/* 1 when model_forward computes attention in the absorbed form (see model.h): MM_DET on a backend with det_absorbed
 * (the CPU, CUDA), no sliding window. */
static int absorbed_attention(const model *m) {
    return m->opt.mm == MM_DET && !m->opt.attn_naive && m->be->det_absorbed && m->be->mla_absorbed &&
           m->p.cfg.moerl_swa_window <= 0;
}

/* One block: y = x + MLA(norm(x)); y += FFN(norm(y)). x and y (T, d) may not alias. cache (decode, main layers
 * only): row t is the next token of the sequence cached in cache[t]; its latent and RoPE key are appended there and
 * it attends over that cache. cache == NULL: the rows attend over their own documents in the batch. b is the host
 * batch, m->dev the same as the ops see it (pos: m->dev.pos). */
/* Two products: on the CPU through matmul_forward_batch (one parallel region when the rows are few, as in decode;
 * the same bits as two calls), elsewhere one call each. */
static void matmul_pair(const model *m, mm_job p, mm_job q) {
    if (m->be->kind == BACKEND_CPU) {
        const mm_job j[2] = {p, q};
        matmul_forward_batch(j, 2, m->opt.mm);
        return;
    }
    BE->matmul_forward(p.y, p.x, p.w, p.T, p.in, p.out, p.beta, m->opt.mm);
    BE->matmul_forward(q.y, q.x, q.w, q.T, q.in, q.out, q.beta, m->opt.mm);
}

static int block_forward(model *m, int l, float *y, const float *x, const model_batch *b, int T,
                         model_kv *const *cache, mr_err *e) {
    const int32_t *pos = m->dev.pos;
    const model_config *c = &m->p.cfg;
    const layer_w *w = &m->p.w.layers[l];
    layer_act *a = &m->acts[l];
    const int d = c->hidden_size, H = c->num_attention_heads, dn = c->qk_nope_head_dim, dr = c->qk_rope_head_dim;
    const int dqk = dn + dr, dv = c->v_head_dim, rkv = c->kv_lora_rank, rq = c->q_lora_rank;
    const mm_mode mm = m->opt.mm;
    const float eps = (float)c->rms_norm_eps;
    float *kv = m->scratch; /* (T, r_kv + d_rope) */

    BE->rmsnorm_forward(a->a, a->rstd_a, x, w->attn_norm, T, d, eps);
    /* q_a (or q) and kv_a (§5.3: latent and shared RoPE key) read the same normed rows: one region in decode */
    matmul_pair(m, (mm_job){rq ? a->cq : a->q, a->a, rq ? w->attn.q_a : w->attn.q, T, d, rq ? rq : H * dqk, 0.0f},
                (mm_job){kv, a->a, w->attn.kv_a, T, d, rkv + dr, 0.0f});
    if (rq) { /* §5.2 */
        BE->rmsnorm_forward(a->cqn, a->rstd_q, a->cq, w->attn.q_a_norm, T, rq, eps);
        BE->matmul_forward(a->q, a->cqn, w->attn.q_b, T, rq, H * dqk, 0, mm);
    }
    BE->rope_forward(a->q + dn, pos, T, H, H * dqk, dqk, &m->rope);
    /* only the latent is normalized */
    BE->copy2d(a->lat, rkv, kv, rkv + dr, rkv, T);
    BE->copy2d(a->kpe, dr, kv + rkv, rkv + dr, dr, T);
    BE->rmsnorm_forward(a->cn, a->rstd_kv, a->lat, w->attn.kv_a_norm, T, rkv, eps);
    BE->rope_forward(a->kpe, pos, T, 1, dr, dr, &m->rope);
    if (!cache) { /* per-head K and V: the backward's inputs (a decode step has no backward) */
        BE->matmul_forward(a->kvb, a->cn, w->attn.kv_b, T, rkv, H * (dn + dv), 0, mm);
        for (int h = 0; h < H; h++) { /* k[t,h] = [kvb[t,h,:dn] ; kpe[t]], v[t,h] = kvb[t,h,dn:] */
            const float *src = a->kvb + (size_t)h * (dn + dv);
            BE->copy2d(a->k + (size_t)h * dqk, (size_t)H * dqk, src, (size_t)H * (dn + dv), dn, T);
            BE->copy2d(a->k + (size_t)h * dqk + dn, (size_t)H * dqk, a->kpe, dr, dr, T);
            BE->copy2d(a->v + (size_t)h * dv, (size_t)H * dv, src + dn, (size_t)H * (dn + dv), dv, T);
        }
    }
    if (cache || absorbed_attention(m)) {
        /* §5.6 absorbed form, one "sequence" per row: a decode row reads its cache (after appending its own entry),
         * a training row its document's rows doc_start[t]..t of this batch. Identical arithmetic either way. */
        int rc;
        if (cache) { /* the step's rows (m->dec_rows, staged by decode_positions): append, then attend */
            if (!BE->kv_append || !BE->mla_rows)
                return err_set(e, MR_EDEVICE,
                               "model: attention over the latent KV cache is not implemented on backend '%s'",
                               m->be->name);
            /* an MTP module's cache holds its one layer only */
            const int lc = l < c->num_hidden_layers ? l : l - c->num_hidden_layers;
            BE->kv_append(m->dec_rows, lc, a->cn, a->kpe, T, rkv, dr);
            rc = BE->mla_rows(a->att, a->lse, a->q, m->dec_rows, lc, w->attn.kv_b, T, H, dn, dr, dv, rkv, m->scale,
                              m->dec_cap, e);
        } else {
            const float **pc = m->kv_ptr, **pk = m->kv_ptr + T;
            for (int t = 0; t < T; t++) {
                int s0 = b->doc_start ? b->doc_start[t] : 0;
                pc[t] = a->cn + (size_t)s0 * rkv;
                pk[t] = a->kpe + (size_t)s0 * dr;
                m->kv_len[t] = t - s0 + 1;
            }
            rc = BE->mla_absorbed(a->att, a->lse, a->q, pc, pk, m->kv_len, w->attn.kv_b, T, H, dn, dr, dv, rkv,
                                  m->scale, e);
        }
        if (rc) return err_prefix(e, "layer %d attention", l);
    } else if (c->moerl_swa_window > 0) {
        int rc = BE->attention_swa_forward(a->att, a->lse, a->q, a->k, a->v, m->dev.doc_start, T, H, dqk, dv, m->scale,
                                           c->moerl_swa_window, c->moerl_swa_ratio, e);
        if (rc) return err_prefix(e, "layer %d attention", l);
    } else {
        BE->attention_forward(a->att, a->lse, a->q, a->k, a->v, m->dev.doc_start, T, H, dqk, dv, m->scale);
    }
    copy_f(m, a->xm, x, (size_t)T * d);
    BE->matmul_forward(a->xm, a->att, w->attn.o, T, H * dv, d, 1.0f, mm);

    BE->rmsnorm_forward(a->f, a->rstd_f, a->xm, w->ffn_norm, T, d, eps);
    copy_f(m, y, a->xm, (size_t)T * d);
    if (w->is_moe) {
        moe_params mp = layer_moe_params(m, l);
        float *tmp = m->scratch;
        const int32_t *replay = b->replay ? m->dev.replay[l] : NULL;
        a->moe.infer = cache != NULL; /* a decode step: no backward, its loads unread (a device skips the dispatch) */
        int rc = BE->moe_forward(tmp, &a->moe, &m->moe_work, a->f, replay, &mp, &m->moe, T, e);
        if (rc) return err_prefix(e, "layer %d", l);
        if ((rc = BE->axpy(y, tmp, 1.0f, (size_t)T * d, e))) return err_prefix(e, "layer %d", l);
    } else {
        const int I = c->intermediate_size;
        matmul_pair(m, (mm_job){a->hg, a->f, w->mlp.gate, T, d, I, 0.0f},
                    (mm_job){a->hu, a->f, w->mlp.up, T, d, I, 0.0f});
        BE->swiglu_forward(a->h, a->hg, a->hu, T, I);
        BE->matmul_forward(y, a->h, w->mlp.down, T, I, d, 1.0f, mm);
    }
    return MR_OK;
}

/* Mean CE over rows with a target (tgt host, dtgt the same as the ops see it); with grad, logits become
 * scale/n · (softmax − onehot). */
static int head_loss(model *m, double *mean, float *logits, const int32_t *tgt, const int32_t *dtgt, int T, int V,
                     float weight, int grad, int64_t *n_out, mr_err *e) {
    int64_t n = 0;
    for (int t = 0; t < T; t++) n += tgt[t] >= 0;
    *n_out = n;
    *mean = 0.0;
    if (n == 0) {
        if (grad) BE->zero(logits, sizeof(float) * (size_t)T * V);
        return MR_OK;
    }
    float *sc = NULL;
    const float *dsc = NULL;
    if (grad) {
        /* one scale for every row: weight / n */
        sc = mem_alloc(sizeof(float) * (size_t)T);
        if (!sc) return err_set(e, MR_ENOMEM, "model: out of memory");
        for (int t = 0; t < T; t++) sc[t] = weight / (float)n;
        int rc = stage_f32(m, &dsc, sc, (size_t)T, e);
        if (rc) {
            mem_free(sc);
            return rc;
        }
    }
    double sum = BE->xent_forward_backward(NULL, grad ? logits : NULL, logits, dtgt, dsc, T, V);
    mem_free(sc);
    *mean = sum / (double)n;
    return MR_OK;
}

int model_forward(model *m, const model_batch *b, int train, model_loss *loss, mr_err *e) {
    const model_config *c = &m->p.cfg;
    const int T = b->T, d = c->hidden_size, V = c->vocab_size, L = c->num_hidden_layers;
    const float eps = (float)c->rms_norm_eps;
    int rc;
    if (T < 1 || T > m->T_max) return err_set(e, MR_ERANGE, "model: batch of %d tokens, expected 1..%d", T, m->T_max);
    for (int t = 0; t < T; t++)
        if (b->ids[t] < 0 || b->ids[t] >= V)
            return err_set(e, MR_ERANGE, "model: token %d at row %d is outside the vocabulary [0, %d)", b->ids[t], t, V);
    if (train && !b->targets) return err_set(e, MR_EINVAL, "model: a training forward needs targets");
    int32_t *pos_default = NULL;
    const int32_t *pos = b->pos;
    if (!pos) {
        pos_default = mem_alloc(sizeof(int32_t) * (size_t)T);
        if (!pos_default) return err_set(e, MR_ENOMEM, "model: out of memory");
        for (int t = 0; t < T; t++) pos_default[t] = t;
        pos = pos_default;
    }
    m->T = T;
    m->trained = 0;
    m->mtp_trained = 0;
    m->mtp_ran = 0;
    model_loss ls;
    memset(&ls, 0, sizeof ls);
    if ((rc = stage_batch(m, b, pos, e))) goto done;

    BE->embedding_forward(m->resid, m->dev.ids, m->p.w.embed, T, d);
    for (int l = 0; l < L; l++) {
        rc = block_forward(m, l, m->resid + (size_t)(l + 1) * T * d, m->resid + (size_t)l * T * d, b, T, NULL, e);
        if (rc) goto done;
    }
    BE->rmsnorm_forward(m->hfin, m->rstd_fin, m->resid + (size_t)L * T * d, m->p.w.final_norm, T, d, eps);
    BE->matmul_forward(m->logits, m->hfin, m->p.w.head, T, d, V, 0, m->opt.mm);

    if (b->targets) {
        const float lw = b->loss_weight > 0 ? b->loss_weight : 1.0f;
        if ((rc = head_loss(m, &ls.main, m->logits, b->targets, m->dev.targets, T, V, lw, train, &ls.n_main, e)))
            goto done;
        ls.total = ls.main;
        /* §9.2 balance loss over the documents of the batch, main-model MoE layers */
        m->n_seq = 0;
        for (int t = 0; t < T; t++) {
            int start = b->doc_start ? b->doc_start[t] : 0;
            if (start == t) m->seq_len[m->n_seq++] = 0;
            if (m->n_seq == 0) m->seq_len[m->n_seq++] = 0; /* malformed doc_start: treat as one document */
            m->seq_len[m->n_seq - 1]++;
        }
        if (m->opt.balance_alpha > 0)
            for (int l = 0; l < L; l++) {
                if (!m->acts[l].is_moe) continue;
                double lb;
                const moe_saved *s = &m->acts[l].moe;
                rc = BE->moe_balance_loss(&lb, NULL, s->scores, s->idx, m->seq_len, m->n_seq, T, m->moe.E, m->moe.K,
                                      m->opt.balance_alpha, e);
                if (rc) goto done;
                ls.balance += lb;
            }
        ls.total += ls.balance;
    }

    /* MTP modules (§9.4): depth k reads depth k-1's block output (k = 1: the final-normed main hidden state) */
    int D = c->num_nextn_predict_layers;
    if ((train && m->opt.mtp_weight <= 0) || b->skip_mtp) D = 0;
    for (int k = 1; k <= D && T - k >= 1; k++) {
        mtp_act *t = &m->mtp[k - 1];
        const int Tk = T - k, l = L + k - 1;
        const layer_w *w = &m->p.w.layers[l];
        const float *hprev = k == 1 ? m->hfin : m->mtp[k - 2].hk;
        if (k == 1) m->mtp_T = Tk;
        BE->embedding_forward(t->emb, m->dev.ids + k, m->p.w.embed, Tk, d);
        BE->rmsnorm_forward(t->en, t->rstd_e, t->emb, w->enorm, Tk, d, eps);
        BE->rmsnorm_forward(t->hn, t->rstd_h, hprev, w->hnorm, Tk, d, eps);
        /* [en ; hn], embedding first (§9.4) */
        BE->copy2d(t->cat, 2 * (size_t)d, t->en, (size_t)d, (size_t)d, (size_t)Tk);
        BE->copy2d(t->cat + d, 2 * (size_t)d, t->hn, (size_t)d, (size_t)d, (size_t)Tk);
        BE->matmul_forward(t->x0, t->cat, w->eh_proj, Tk, 2 * d, d, 0, m->opt.mm);
        rc = block_forward(m, l, t->hk, t->x0, b, Tk, NULL, e);
        if (rc) goto done;
        BE->rmsnorm_forward(t->hkn, t->rstd_k, t->hk, w->head_norm, Tk, d, eps);
        BE->matmul_forward(t->logits, t->hkn, m->p.w.head, Tk, d, V, 0, m->opt.mm);
        if (b->targets) {
            /* row i predicts t_{i+k+1} = targets[i+k], inside one document only */
            for (int i = 0; i < Tk; i++) {
                int same = !b->doc_start || b->doc_start[i + k] == b->doc_start[i];
                m->tgt_k[i] = same ? b->targets[i + k] : -1;
            }
            float wk = m->opt.mtp_weight / (float)c->num_nextn_predict_layers;
            const float lw = b->loss_weight > 0 ? b->loss_weight : 1.0f;
            const int32_t *dtgt;
            if ((rc = stage_i32(m, &dtgt, ST_TGTK, m->tgt_k, (size_t)Tk, e)) ||
                (rc = head_loss(m, &ls.mtp[k - 1], t->logits, m->tgt_k, dtgt, Tk, V, wk * lw, train, &ls.n_mtp[k - 1],
                                e)))
                goto done;
            ls.total += wk * ls.mtp[k - 1];
        }
    }
    m->trained = train;
    m->mtp_trained = train ? D : 0;
    m->mtp_ran = D < T - 1 ? D : T - 1;
    rc = MR_OK;
done:
    mem_free(pos_default);
    if (loss) *loss = ls;
    return rc;
}

/* ------------------------------------------------------------------------------------------ backward */

typedef struct bwd_buf {
    float *da, *df, *dtmp, *dhfin;             /* (T, d) */
    float *dq, *dk;                            /* (T, H, d_qk) */
    float *dv, *datt;                          /* (T, H, d_v) */
    float *dkvb;                               /* (T, H·(d_nope + d_v)) */
    float *dlat, *dcn;                         /* (T, r_kv) */
    float *dkv;                                /* (T, r_kv + d_rope) */
    float *dkpe;                               /* (T, d_rope) */
    float *dcq, *dcqn;                         /* (T, r_q) */
    float *dh1, *dh2, *dh3;                    /* (T, max(I, I_e)) */
    float *dcat;                               /* (T, 2d) */
    float *daff;                               /* (T, E) */
} bwd_buf;

static void bwd_carve(model *m, bwd_buf *B) {
    const model_config *c = &m->p.cfg;
    const size_t T = (size_t)m->T_max, d = (size_t)c->hidden_size, H = (size_t)c->num_attention_heads;
    const size_t dqk = (size_t)(c->qk_nope_head_dim + c->qk_rope_head_dim), dv = (size_t)c->v_head_dim;
    const size_t rkv = (size_t)c->kv_lora_rank, dr = (size_t)c->qk_rope_head_dim, rq = (size_t)c->q_lora_rank;
    const size_t I = (size_t)(c->intermediate_size > c->moe_intermediate_size ? c->intermediate_size
                                                                               : c->moe_intermediate_size);
    float *p = m->scratch;
#define NEXT(n) (p += (n), p - (n))
    B->da = NEXT(T * d);
    B->df = NEXT(T * d);
    B->dtmp = NEXT(T * d);
    B->dhfin = NEXT(T * d);
    B->dq = NEXT(T * H * dqk);
    B->dk = NEXT(T * H * dqk);
    B->dv = NEXT(T * H * dv);
    B->datt = NEXT(T * H * dv);
    B->dkvb = NEXT(T * H * (dqk - dr + dv));
    B->dlat = NEXT(T * rkv);
    B->dcn = NEXT(T * rkv);
    B->dkv = NEXT(T * (rkv + dr));
    B->dkpe = NEXT(T * dr);
    B->dcq = NEXT(T * rq);
    B->dcqn = NEXT(T * rq);
    B->dh1 = NEXT(T * I);
    B->dh2 = NEXT(T * I);
    B->dh3 = NEXT(T * I);
    B->dcat = NEXT(T * 2 * d);
    B->daff = NEXT(T * (size_t)(c->n_routed_experts > 0 ? c->n_routed_experts : 1));
#undef NEXT
}

#define zero(p, n) BE->zero((p), (size_t)(n) * sizeof(float))

/* dres holds dL/dy on entry and dL/dx on exit. x is the block input of the forward. daff: extra gradient
 * into the router affinities (balance loss) or NULL. */
static int block_backward(model *m, int l, float *dres, const float *x, int T, bwd_buf *B, const float *daff,
                          mr_err *e) {
    const int32_t *pos = m->dev.pos;
    const model_config *c = &m->p.cfg;
    const layer_w *w = &m->p.w.layers[l];
    layer_w *g = &m->p.g.layers[l];
    layer_act *a = &m->acts[l];
    const int d = c->hidden_size, H = c->num_attention_heads, dn = c->qk_nope_head_dim, dr = c->qk_rope_head_dim;
    const int dqk = dn + dr, dv = c->v_head_dim, rkv = c->kv_lora_rank, rq = c->q_lora_rank;
    const mm_mode mm = m->opt.mm_bwd;
    const size_t Td = (size_t)T * d;

    /* FFN: y = xm + FFN(f) */
    zero(B->df, Td);
    if (w->is_moe) {
        moe_params mp = layer_moe_params(m, l);
        size_t E = (size_t)m->moe.E, mi = (size_t)a->moe_index;
        moe_grads mg = {.gate_w = g->moe.router,
                        .gate_proj = m->gp + (3 * mi + 0) * E, .up_proj = m->gp + (3 * mi + 1) * E,
                        .down_proj = m->gp + (3 * mi + 2) * E,
                        .sh_gate = g->moe.shared.gate, .sh_up = g->moe.shared.up, .sh_down = g->moe.shared.down};
        BE->moe_backward(B->df, &mg, &m->moe_work, dres, daff, &a->moe, a->f, &mp, &m->moe);
    } else {
        const int I = c->intermediate_size;
        const size_t TI = (size_t)T * I;
        zero(B->dh1, TI);
        BE->matmul_backward(B->dh1, g->mlp.down, dres, a->h, w->mlp.down, T, I, d, mm);
        zero(B->dh2, TI);
        zero(B->dh3, TI);
        BE->swiglu_backward(B->dh2, B->dh3, B->dh1, a->hg, a->hu, T, I);
        BE->matmul_backward(B->df, g->mlp.gate, B->dh2, a->f, w->mlp.gate, T, d, I, mm);
        BE->matmul_backward(B->df, g->mlp.up, B->dh3, a->f, w->mlp.up, T, d, I, mm);
    }
    BE->rmsnorm_backward(dres, g->ffn_norm, B->df, a->xm, w->ffn_norm, a->rstd_f, T, d); /* dres = dL/dxm */

    /* attention: xm = x + o_proj(att) */
    zero(B->datt, (size_t)T * H * dv);
    BE->matmul_backward(B->datt, g->attn.o, dres, a->att, w->attn.o, T, H * dv, d, mm);
    zero(B->dq, (size_t)T * H * dqk);
    zero(B->dk, (size_t)T * H * dqk);
    zero(B->dv, (size_t)T * H * dv);
    if (c->moerl_swa_window > 0) {
        int rc = BE->attention_swa_backward(B->dq, B->dk, B->dv, B->datt, a->att, a->lse, a->q, a->k, a->v,
                                            m->dev.doc_start, T, H, dqk, dv, m->scale, c->moerl_swa_window,
                                            c->moerl_swa_ratio, e);
        if (rc) return err_prefix(e, "layer %d attention backward", l);
    } else {
        BE->attention_backward(B->dq, B->dk, B->dv, B->datt, a->att, a->lse, a->q, a->k, a->v, m->dev.doc_start, T,
                               H, dqk, dv, m->scale);
    }
    /* k = [k_nope(kvb) ; k_pe shared by every head], v from kvb */
    zero(B->dkpe, (size_t)T * dr);
    float *tmp = B->dkv; /* free until the latent's gradient below */
    for (int h = 0; h < H; h++) { /* dkvb[t,h] = [dk[t,h,:dn] ; dv[t,h]]; dkpe[t] = Σ_h dk[t,h,dn:], h in order */
        float *dst = B->dkvb + (size_t)h * (dn + dv);
        BE->copy2d(dst, (size_t)H * (dn + dv), B->dk + (size_t)h * dqk, (size_t)H * dqk, dn, T);
        BE->copy2d(dst + dn, (size_t)H * (dn + dv), B->dv + (size_t)h * dv, (size_t)H * dv, dv, T);
        BE->copy2d(tmp, dr, B->dk + (size_t)h * dqk + dn, (size_t)H * dqk, dr, T);
        int rc = BE->axpy(B->dkpe, tmp, 1.0f, (size_t)T * dr, e);
        if (rc) return err_prefix(e, "layer %d attention backward", l);
    }
    zero(B->dcn, (size_t)T * rkv);
    BE->matmul_backward(B->dcn, g->attn.kv_b, B->dkvb, a->cn, w->attn.kv_b, T, rkv, H * (dn + dv), mm);
    BE->rope_backward(B->dkpe, pos, T, 1, dr, dr, &m->rope);
    zero(B->dlat, (size_t)T * rkv);
    BE->rmsnorm_backward(B->dlat, g->attn.kv_a_norm, B->dcn, a->lat, w->attn.kv_a_norm, a->rstd_kv, T, rkv);
    BE->copy2d(B->dkv, rkv + dr, B->dlat, rkv, rkv, T);
    BE->copy2d(B->dkv + rkv, rkv + dr, B->dkpe, dr, dr, T);
    zero(B->da, Td);
    BE->matmul_backward(B->da, g->attn.kv_a, B->dkv, a->a, w->attn.kv_a, T, d, rkv + dr, mm);
    BE->rope_backward(B->dq + dn, pos, T, H, H * dqk, dqk, &m->rope);
    if (rq) {
        zero(B->dcqn, (size_t)T * rq);
        BE->matmul_backward(B->dcqn, g->attn.q_b, B->dq, a->cqn, w->attn.q_b, T, rq, H * dqk, mm);
        zero(B->dcq, (size_t)T * rq);
        BE->rmsnorm_backward(B->dcq, g->attn.q_a_norm, B->dcqn, a->cq, w->attn.q_a_norm, a->rstd_q, T, rq);
        BE->matmul_backward(B->da, g->attn.q_a, B->dcq, a->a, w->attn.q_a, T, d, rq, mm);
    } else {
        BE->matmul_backward(B->da, g->attn.q, B->dq, a->a, w->attn.q, T, d, H * dqk, mm);
    }
    BE->rmsnorm_backward(dres, g->attn_norm, B->da, x, w->attn_norm, a->rstd_a, T, d); /* dres = dL/dx */
    return MR_OK;
}

int model_backward(model *m, const model_batch *b, mr_err *e) {
    const model_config *c = &m->p.cfg;
    const int T = m->T, d = c->hidden_size, V = c->vocab_size, L = c->num_hidden_layers;
    if (!m->trained || b->T != T) return err_set(e, MR_EINVAL, "model: backward needs a training forward of the same batch");
    int rc = params_alloc_grad(&m->p, e);
    if (rc) return rc;
    if (c->n_routed_experts > 0) { /* gradient views of the experts (stable once allocated) */
        size_t E = (size_t)c->n_routed_experts, Ie = (size_t)c->moe_intermediate_size;
        for (int l = 0; l < m->p.n_layers; l++) {
            if (!m->acts[l].is_moe) continue;
            size_t mi = (size_t)m->acts[l].moe_index;
            const moe_w *g = &m->p.g.layers[l].moe;
            for (size_t x = 0; x < E; x++) {
                m->gp[(3 * mi + 0) * E + x] = g->gate + x * Ie * (size_t)d;
                m->gp[(3 * mi + 1) * E + x] = g->up + x * Ie * (size_t)d;
                m->gp[(3 * mi + 2) * E + x] = g->down + x * Ie * (size_t)d;
            }
        }
    }
    int32_t *pos_default = NULL;
    const int32_t *pos = b->pos;
    if (!pos) {
        pos_default = mem_alloc(sizeof(int32_t) * (size_t)T);
        if (!pos_default) return err_set(e, MR_ENOMEM, "model: out of memory");
        for (int t = 0; t < T; t++) pos_default[t] = t;
        pos = pos_default;
    }
    if ((rc = stage_batch(m, b, pos, e))) goto done;
    bwd_buf B;
    bwd_carve(m, &B);
    float *dres = B.dtmp; /* the residual stream's gradient, (T, d) */
    zero(B.dhfin, (size_t)T * d);
    BE->matmul_backward(B.dhfin, m->p.g.head, m->logits, m->hfin, m->p.w.head, T, d, V, m->opt.mm_bwd);

    /* MTP modules, deepest first; module k's block output gradient also receives depth k+1's hnorm gradient */
    int D = m->mtp_trained;
    if (D > T - 1) D = T - 1;
    float *dnext = NULL; /* gradient into module k's output hk from module k+1 */
    for (int k = D; k >= 1; k--) {
        mtp_act *t = &m->mtp[k - 1];
        const int Tk = T - k, l = L + k - 1;
        const layer_w *w = &m->p.w.layers[l];
        layer_w *g = &m->p.g.layers[l];
        /* dres = d/d hk */
        zero(dres, (size_t)T * d);
        zero(B.df, (size_t)T * d);
        BE->matmul_backward(B.df, m->p.g.head, t->logits, t->hkn, m->p.w.head, Tk, d, V, m->opt.mm_bwd);
        BE->rmsnorm_backward(dres, g->head_norm, B.df, t->hk, w->head_norm, t->rstd_k, Tk, d);
        if (dnext && (rc = BE->axpy(dres, dnext, 1.0f, (size_t)Tk * d, e))) goto done;
        rc = block_backward(m, l, dres, t->x0, Tk, &B, NULL, e); /* dres = d/d x0 */
        if (rc) goto done;
        float *dcatb = B.dcat; /* (Tk, 2d) */
        zero(dcatb, (size_t)Tk * 2 * d);
        BE->matmul_backward(dcatb, g->eh_proj, dres, t->cat, w->eh_proj, Tk, 2 * d, d, m->opt.mm_bwd);
        /* split: [den ; dhn] */
        float *den = B.df, *dhn = B.da;
        BE->copy2d(den, (size_t)d, dcatb, 2 * (size_t)d, (size_t)d, (size_t)Tk);
        BE->copy2d(dhn, (size_t)d, dcatb + d, 2 * (size_t)d, (size_t)d, (size_t)Tk);
        zero(dres, (size_t)Tk * d);
        BE->rmsnorm_backward(dres, g->enorm, den, t->emb, w->enorm, t->rstd_e, Tk, d);
        BE->embedding_backward(m->p.g.embed, dres, m->dev.ids + k, Tk, d);
        const float *hprev = k == 1 ? m->hfin : m->mtp[k - 2].hk;
        float *dprev = k == 1 ? B.dhfin : m->mtp[k - 1].emb; /* emb of module k is dead now: reuse as d hk_{k-1} */
        if (k > 1) zero(dprev, (size_t)(T - k + 1) * d);
        BE->rmsnorm_backward(dprev, g->hnorm, dhn, hprev, w->hnorm, t->rstd_h, Tk, d);
        dnext = k > 1 ? dprev : NULL;
    }

    /* main model */
    zero(dres, (size_t)T * d);
    BE->rmsnorm_backward(dres, m->p.g.final_norm, B.dhfin, m->resid + (size_t)L * T * d, m->p.w.final_norm, m->rstd_fin,
                     T, d);
    for (int l = L - 1; l >= 0; l--) {
        const float *daff = NULL;
        if (m->acts[l].is_moe && m->opt.balance_alpha > 0) {
            const moe_saved *s = &m->acts[l].moe;
            double lb;
            zero(B.daff, (size_t)T * m->moe.E);
            rc = BE->moe_balance_loss(&lb, B.daff, s->scores, s->idx, m->seq_len, m->n_seq, T, m->moe.E, m->moe.K,
                                      m->opt.balance_alpha * (b->loss_weight > 0 ? b->loss_weight : 1.0f), e);
            if (rc) goto done;
            daff = B.daff;
        }
        rc = block_backward(m, l, dres, m->resid + (size_t)l * T * d, T, &B, daff, e);
        if (rc) goto done;
    }
    BE->embedding_backward(m->p.g.embed, dres, m->dev.ids, T, d);
    rc = MR_OK;
done:
    mem_free(pos_default);
    return rc;
}

int model_policy_grad(model *m, const model_batch *b, const float *coef, mr_err *e) {
    if (m->trained || b->T != m->T || !b->targets)
        return err_set(e, MR_EINVAL, "model: policy_grad needs an inference forward (train = 0) of the same batch with targets");
    const int32_t *dtgt;
    const float *dcoef;
    int rc;
    if ((rc = stage_i32(m, &dtgt, ST_TGT, b->targets, (size_t)b->T, e)) ||
        (rc = stage_f32(m, &dcoef, coef, (size_t)b->T, e)))
        return rc;
    BE->xent_forward_backward(NULL, m->logits, m->logits, dtgt, dcoef, b->T, m->p.cfg.vocab_size);
    m->logits_h_ok = 0;
    m->trained = 1;
    m->mtp_trained = 0;
    return MR_OK;
}

/* Host copies for callers (device backends): rows x cols of src into *buf (allocated on first use, T_max rows). */
static const void *host_copy(model *m, void **buf, int *ok, const void *src, size_t row_bytes, size_t rows) {
    if (backend_is_host(m->be)) return src;
    if (*ok) return *buf;
    if (!*buf && !(*buf = mem_alloc((size_t)m->T_max * row_bytes))) return NULL;
    mr_err e = {0};
    if (rows && BE->to_host(*buf, src, rows * row_bytes, &e)) return NULL;
    *ok = 1;
    return *buf;
}

const float *model_logits(model *m) {
    return host_copy(m, (void **)&m->logits_h, &m->logits_h_ok, m->logits, sizeof(float) * (size_t)m->p.cfg.vocab_size,
                     (size_t)m->T);
}

const float *model_mtp_logits(model *m, int k) {
    if (backend_is_host(m->be)) return m->mtp[k - 1].logits;
    if (k != 1) return NULL; /* the rollout drafts with depth 1 only */
    return host_copy(m, (void **)&m->mtp_logits_h, &m->mtp_logits_h_ok, m->mtp[0].logits,
                     sizeof(float) * (size_t)m->p.cfg.vocab_size, (size_t)m->mtp_T);
}
const int64_t *model_layer_load(const model *m, int l) {
    if (l >= m->p.cfg.num_hidden_layers + m->mtp_ran) return NULL; /* an MTP layer the latest forward skipped */
    return m->acts[l].is_moe && !m->acts[l].moe.no_dispatch ? m->acts[l].moe.load : NULL;
}
const int32_t *model_layer_experts(model *m, int l) {
    if (!m->acts[l].is_moe) return NULL;
    if (backend_is_host(m->be)) return m->acts[l].moe.idx;
    /* every main MoE layer's at once, on the first call after a forward */
    const size_t K = (size_t)m->moe.K, L = (size_t)m->p.cfg.num_hidden_layers;
    if (!m->experts_h_ok) {
        if (!m->experts_h && !(m->experts_h = mem_alloc(L * (size_t)m->T_max * K * sizeof(int32_t)))) return NULL;
        mr_err e = {0};
        for (size_t j = 0; j < L; j++)
            if (m->acts[j].is_moe &&
                BE->to_host(m->experts_h + j * (size_t)m->T_max * K, m->acts[j].moe.idx, (size_t)m->T * K * sizeof(int32_t), &e))
                return NULL;
        m->experts_h_ok = 1;
    }
    return (size_t)l < L ? m->experts_h + (size_t)l * (size_t)m->T_max * K : NULL;
}

static int bias_of(const model *m, int l, size_t *off, mr_err *e) {
    if (l < 0 || l >= m->p.n_layers || !m->p.w.layers[l].is_moe || !m->p.w.layers[l].moe.bias)
        return err_set(e, MR_EINVAL, "model: layer %d has no router bias", l);
    *off = (size_t)(m->p.w.layers[l].moe.bias - m->p.data);
    return MR_OK;
}

int model_router_bias(const model *m, int l, float *dst, mr_err *e) {
    size_t off = 0;
    int rc = bias_of(m, l, &off, e);
    return rc ? rc : params_copy_to_host(&m->p, dst, off, (size_t)m->moe.E, e);
}

int model_bias_update(model *m, int l, const int64_t *load, float gamma, mr_err *e) {
    size_t off = 0;
    int rc = bias_of(m, l, &off, e);
    if (rc) return rc;
    if (backend_is_host(m->be)) {
        moe_bias_update(m->p.data + off, load, m->moe.E, gamma);
        return MR_OK;
    }
    float *b = mem_alloc(sizeof(float) * (size_t)m->moe.E); /* E floats: through the host */
    if (!b) return err_set(e, MR_ENOMEM, "model: out of memory");
    if (!(rc = params_copy_to_host(&m->p, b, off, (size_t)m->moe.E, e))) {
        moe_bias_update(b, load, m->moe.E, gamma);
        rc = params_copy_from_host(&m->p, b, off, (size_t)m->moe.E, e);
    }
    mem_free(b);
    return rc;
}

int model_add_logits_grad(model *m, const float *g, mr_err *e) {
    if (!m->trained) return err_set(e, MR_EINVAL, "model: add_logits_grad needs model_policy_grad first");
    const size_t n = (size_t)m->T * (size_t)m->p.cfg.vocab_size;
    if (backend_is_host(m->be)) {
        for (size_t x = 0; x < n; x++) m->logits[x] += g[x];
        return MR_OK;
    }
    if (!m->gtmp && !(m->gtmp = BE->alloc((size_t)m->T_max * (size_t)m->p.cfg.vocab_size * sizeof(float))))
        return err_set(e, MR_ENOMEM, "model: out of %s memory for a logits gradient", m->be->name);
    int rc = BE->to_device(m->gtmp, g, n * sizeof(float), e);
    return rc ? rc : BE->axpy(m->logits, m->gtmp, 1.0f, n, e);
}

/* ------------------------------------------------------------------------------------------ latent KV cache */

void model_kv_floats(const model *m, int cap, size_t *ckv, size_t *kpe) {
    const model_config *c = &m->p.cfg;
    size_t n = (size_t)c->num_hidden_layers * (size_t)(cap > 0 ? cap : 0);
    *ckv = n * (size_t)c->kv_lora_rank;
    *kpe = n * (size_t)c->qk_rope_head_dim;
}

void model_kv_floats_mtp(const model *m, int cap, size_t *ckv, size_t *kpe) {
    const model_config *c = &m->p.cfg;
    size_t n = (size_t)(c->num_nextn_predict_layers > 0) * (size_t)(cap > 0 ? cap : 0);
    *ckv = n * (size_t)c->kv_lora_rank;
    *kpe = n * (size_t)c->qk_rope_head_dim;
}

static int prefill(model *m, const model_batch *b, model_kv *const *kv, model_kv *const *mtp, int n_kv, mr_err *e) {
    const model_config *c = &m->p.cfg;
    const int L = c->num_hidden_layers, rkv = c->kv_lora_rank, dr = c->qk_rope_head_dim, T = b->T;
    if (c->moerl_swa_window > 0)
        return err_set(e, MR_EINVAL, "model: the latent KV cache does not support sliding-window attention");
    if (mtp && c->num_nextn_predict_layers < 1)
        return err_set(e, MR_EINVAL, "model: MTP prefill on a model without MTP modules (num_nextn_predict_layers 0)");
    /* documents, in order: check the count and that each fits its cache before running anything */
    int j = 0;
    for (int t = 0; t < T; t++) {
        int s0 = b->doc_start ? b->doc_start[t] : 0;
        if (s0 != t) continue;
        int end = t + 1;
        while (end < T && (b->doc_start ? b->doc_start[end] : 0) == t) end++;
        if (j >= n_kv) return err_set(e, MR_EINVAL, "model: prefill batch has more than %d documents", n_kv);
        if (end - t > kv[j]->cap || (mtp && end - t > mtp[j]->cap))
            return err_set(e, MR_ERANGE, "model: prefill document %d has %d tokens, its cache holds %d", j, end - t,
                           kv[j]->cap < (mtp ? mtp[j]->cap : kv[j]->cap) ? kv[j]->cap : mtp[j]->cap);
        j++;
    }
    if (j != n_kv) return err_set(e, MR_EINVAL, "model: prefill batch has %d documents, expected %d", j, n_kv);
    model_batch pb = *b;
    pb.targets = NULL;
    pb.replay = NULL;
    pb.skip_mtp = !mtp;
    int rc = model_forward(m, &pb, 0, NULL, e);
    if (rc) return rc;
    j = 0;
    for (int t = 0; t < T; t++) {
        int s0 = b->doc_start ? b->doc_start[t] : 0;
        if (s0 != t) continue;
        int end = t + 1;
        while (end < T && (b->doc_start ? b->doc_start[end] : 0) == t) end++;
        model_kv *s = kv[j];
        for (int l = 0; l < L; l++) {
            const layer_act *a = &m->acts[l];
            copy_f(m, s->ckv + (size_t)l * s->cap * rkv, a->cn + (size_t)t * rkv, (size_t)(end - t) * rkv);
            copy_f(m, s->kpe + (size_t)l * s->cap * dr, a->kpe + (size_t)t * dr, (size_t)(end - t) * dr);
        }
        s->len = end - t;
        if (mtp) { /* MTP rows t..end-2: their next token is inside this document */
            const layer_act *a = &m->acts[L];
            model_kv *q = mtp[j];
            copy_f(m, q->ckv, a->cn + (size_t)t * rkv, (size_t)(end - 1 - t) * rkv);
            copy_f(m, q->kpe, a->kpe + (size_t)t * dr, (size_t)(end - 1 - t) * dr);
            q->len = end - 1 - t;
        }
        j++;
    }
    return MR_OK;
}

int model_prefill(model *m, const model_batch *b, model_kv *const *kv, int n_kv, mr_err *e) {
    return prefill(m, b, kv, NULL, n_kv, e);
}

int model_prefill_mtp(model *m, const model_batch *b, model_kv *const *kv, model_kv *const *mtp, int n_kv,
                      mr_err *e) {
    return prefill(m, b, kv, mtp, n_kv, e);
}

/* Positions of a decode step's rows (m->dec_pos) after checking ids, offsets and room in the caches. */
static int decode_positions(model *m, const int32_t *ids, model_kv *const *kv, const int32_t *off, int B, mr_err *e) {
    const model_config *c = &m->p.cfg;
    const int V = c->vocab_size;
    if (B < 1 || B > m->T_max) return err_set(e, MR_ERANGE, "model: decode batch of %d sequences, expected 1..%d", B, m->T_max);
    if (c->moerl_swa_window > 0)
        return err_set(e, MR_EINVAL, "model: the latent KV cache does not support sliding-window attention");
    for (int i = 0; i < B; i++) {
        const int o = off ? off[i] : 0;
        if (ids[i] < 0 || ids[i] >= V)
            return err_set(e, MR_ERANGE, "model: token %d of decode row %d is outside the vocabulary [0, %d)", ids[i], i, V);
        if (o < 0 || o >= m->T_max) return err_set(e, MR_EINVAL, "model: decode row %d: offset %d", i, o);
        if (kv[i]->len + o >= kv[i]->cap)
            return err_set(e, MR_ERANGE, "model: decode row %d: its cache is full (%d tokens)", i, kv[i]->cap);
        if (kv[i]->len + o >= c->max_position_embeddings)
            return err_set(e, MR_ERANGE, "model: decode row %d: position %d passes max_position_embeddings %d", i,
                           kv[i]->len + o, c->max_position_embeddings);
        m->dec_pos[i] = kv[i]->len + o;
    }
    /* the rows' caches and slots, where the attention ops read them */
    m->dec_cap = 0;
    for (int i = 0; i < B; i++) {
        m->dec_rows_h[i] = (kv_row){.ckv = kv[i]->ckv, .kpe = kv[i]->kpe, .cap = kv[i]->cap, .at = m->dec_pos[i]};
        if (kv[i]->cap > m->dec_cap) m->dec_cap = kv[i]->cap;
    }
    if (m->dec_rows != m->dec_rows_h && BE->to_device(m->dec_rows, m->dec_rows_h, sizeof(kv_row) * (size_t)B, e))
        return err_prefix(e, "model: copying the decode rows to the device");
    return MR_OK;
}

/* Every cache's len past its last row (rows of one cache may come in any order). */
static void decode_advance(model *m, model_kv *const *kv, int B) {
    for (int i = 0; i < B; i++)
        if (kv[i]->len < m->dec_pos[i] + 1) kv[i]->len = m->dec_pos[i] + 1;
}

int model_decode_step(model *m, const int32_t *ids, model_kv *const *kv, int B, mr_err *e) {
    return model_decode_rows(m, ids, kv, NULL, B, e);
}

/* The device part of a main decode step whose rows are staged (m->dev, m->dec_rows): the same launches for every
 * step of B rows, so a backend with graph_run replays them as one CUDA graph. */
typedef struct decode_ctx {
    model *m;
    model_kv *const *kv;
    int B;
} decode_ctx;

static int decode_body(void *p, mr_err *e) {
    const decode_ctx *x = p;
    model *m = x->m;
    const model_config *c = &m->p.cfg;
    const int d = c->hidden_size, V = c->vocab_size, L = c->num_hidden_layers, B = x->B;
    const model_batch b = {.T = B, .skip_mtp = 1};
    int rc = 0;
    BE->embedding_forward(m->resid, m->dev.ids, m->p.w.embed, B, d);
    for (int l = 0; l < L && !rc; l++)
        rc = block_forward(m, l, m->resid + (size_t)(l + 1) * B * d, m->resid + (size_t)l * B * d, &b, B, x->kv, e);
    if (rc) return rc;
    BE->rmsnorm_forward(m->hfin, m->rstd_fin, m->resid + (size_t)L * B * d, m->p.w.final_norm, B, d,
                        (float)c->rms_norm_eps);
    BE->matmul_forward(m->logits, m->hfin, m->p.w.head, B, d, V, 0, m->opt.mm);
    return MR_OK;
}

/* The graphs of one set given back (the handles stay allocated, empty). */
static void free_set(model *m, void **set) {
    for (int i = 0; set && i <= m->T_max; i++) {
        BE->graph_free(set[i]);
        set[i] = NULL;
    }
}

static void free_graphs(model *m) {
    free_set(m, m->dec_graphs);
    free_set(m, m->mtp_graphs);
}

/* body for B staged rows: replayed as a graph (one per batch size in *set, captured for caches of capacity *cap)
 * where the backend has graph_run. */
static int run_step(model *m, void ***set, int *cap, int (*body)(void *, mr_err *), void *ctx, int B, mr_err *e) {
    if (!BE->graph_run || m->opt.no_graphs) return body(ctx, e);
    if (*cap != m->dec_cap) { /* the attention's scratch is sized by the capacity */
        free_set(m, *set);
        *cap = m->dec_cap;
    }
    if (!*set && !(*set = mem_calloc((size_t)m->T_max + 1, sizeof **set))) return body(ctx, e);
    int replayed = 0;
    int rc = BE->graph_run(&(*set)[B], body, ctx, &replayed, e);
    m->graph_steps += replayed;
    return rc;
}

int model_decode_rows(model *m, const int32_t *ids, model_kv *const *kv, const int32_t *off, int B, mr_err *e) {
    int rc = decode_positions(m, ids, kv, off, B, e);
    if (rc) return rc;
    m->T = B;
    m->trained = 0;
    m->mtp_trained = 0;
    m->mtp_ran = 0;
    model_batch b = {.ids = ids, .pos = m->dec_pos, .T = B, .skip_mtp = 1};
    if ((rc = stage_batch(m, &b, m->dec_pos, e))) return rc;
    decode_ctx x = {m, kv, B};
    if ((rc = run_step(m, &m->dec_graphs, &m->graph_cap, decode_body, &x, B, e))) return rc;
    decode_advance(m, kv, B);
    return MR_OK;
}

/* The device part of an MTP draft (module 1) whose rows are staged: as decode_body, one graph per batch size. */
typedef struct mtp_ctx {
    model *m;
    model_kv *const *mtp;
    const int32_t *hrow; /* as the ops see it */
    int B;
} mtp_ctx;

static int mtp_body(void *p, mr_err *e) {
    const mtp_ctx *x = p;
    model *m = x->m;
    const model_config *c = &m->p.cfg;
    const int d = c->hidden_size, V = c->vocab_size, L = c->num_hidden_layers, B = x->B;
    const float eps = (float)c->rms_norm_eps;
    mtp_act *t = &m->mtp[0];
    const layer_w *w = &m->p.w.layers[L];
    const model_batch b = {.T = B, .skip_mtp = 1};
    BE->embedding_forward(t->emb, m->dev.ids, m->p.w.embed, B, d);
    BE->rmsnorm_forward(t->en, t->rstd_e, t->emb, w->enorm, B, d, eps);
    /* gather the hidden rows: an embedding lookup in hfin (hkn is free until the head) */
    BE->embedding_forward(t->hkn, x->hrow, m->hfin, B, d);
    BE->rmsnorm_forward(t->hn, t->rstd_h, t->hkn, w->hnorm, B, d, eps);
    /* [en ; hn], embedding first (§9.4) */
    BE->copy2d(t->cat, 2 * (size_t)d, t->en, (size_t)d, (size_t)d, (size_t)B);
    BE->copy2d(t->cat + d, 2 * (size_t)d, t->hn, (size_t)d, (size_t)d, (size_t)B);
    BE->matmul_forward(t->x0, t->cat, w->eh_proj, B, 2 * d, d, 0, m->opt.mm);
    int rc = block_forward(m, L, t->hk, t->x0, &b, B, x->mtp, e);
    if (rc) return rc;
    BE->rmsnorm_forward(t->hkn, t->rstd_k, t->hk, w->head_norm, B, d, eps);
    BE->matmul_forward(t->logits, t->hkn, m->p.w.head, B, d, V, 0, m->opt.mm);
    return MR_OK;
}

int model_mtp_draft(model *m, const int32_t *ids, const int32_t *hrow, model_kv *const *mtp, const int32_t *off,
                    int B, mr_err *e) {
    const model_config *c = &m->p.cfg;
    if (c->num_nextn_predict_layers < 1)
        return err_set(e, MR_EINVAL, "model: MTP draft on a model without MTP modules (num_nextn_predict_layers 0)");
    int rc = decode_positions(m, ids, mtp, off, B, e);
    if (rc) return err_prefix(e, "MTP draft");
    for (int i = 0; i < B; i++)
        if (hrow[i] < 0 || hrow[i] >= m->T_max)
            return err_set(e, MR_ERANGE, "model: MTP draft row %d: hidden row %d outside 0..%d", i, hrow[i], m->T_max - 1);
    model_batch b = {.ids = ids, .pos = m->dec_pos, .T = B, .skip_mtp = 1};
    /* the main logits and experts of the latest step stay valid: only the batch is staged */
    const int keep_l = m->logits_h_ok, keep_x = m->experts_h_ok;
    mtp_ctx x = {m, mtp, NULL, B};
    if ((rc = stage_batch(m, &b, m->dec_pos, e)) || (rc = stage_i32(m, &x.hrow, ST_HROW, hrow, (size_t)B, e)))
        return err_prefix(e, "MTP draft");
    m->logits_h_ok = keep_l;
    m->experts_h_ok = keep_x;
    m->mtp_T = B;
    if ((rc = run_step(m, &m->mtp_graphs, &m->mtp_graph_cap, mtp_body, &x, B, e))) return err_prefix(e, "MTP draft");
    decode_advance(m, mtp, B);
    return MR_OK;
}
