/* params.c: the parameter table, views, initialization, loading and saving (see params.h). */
#include "model/params.h"

#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>

#include "core/dtype.h"
#include "core/mem.h"
#include "core/rng.h"
#include "core/safetensors.h"
#include "kernels/backend.h"

/* One walk over the tensor inventory, used three ways: count (entries == NULL), record entries, and point the
 * views of a buffer (base) at their offsets. The order of this walk is the order of the table. */
typedef struct layout {
    float *base;          /* buffer the views point into (may be NULL while sizing) */
    param_entry *entries; /* NULL: do not record */
    int n_entries;
    size_t off;
} layout;

static float *add(layout *L, const char *name, int64_t d0, int64_t d1, int flags) {
    size_t numel = (size_t)d0 * (size_t)(d1 > 0 ? d1 : 1);
    if (L->entries) {
        param_entry *pe = &L->entries[L->n_entries];
        snprintf(pe->name, sizeof pe->name, "%s", name);
        pe->ndim = d1 > 0 ? 2 : 1;
        pe->shape[0] = d0;
        pe->shape[1] = d1 > 0 ? d1 : 0;
        pe->offset = L->off;
        pe->numel = numel;
        pe->flags = flags;
    }
    L->n_entries++;
    float *v = L->base ? L->base + L->off : NULL;
    L->off += numel;
    return v;
}

/* Routed experts: entries per expert (HF names), one contiguous block per projection. */
static float *add_experts(layout *L, const char *prefix, const char *proj, int E, int64_t d0, int64_t d1) {
    float *first = NULL;
    char name[160];
    for (int x = 0; x < E; x++) {
        snprintf(name, sizeof name, "%s.mlp.experts.%d.%s.weight", prefix, x, proj);
        float *v = add(L, name, d0, d1, 0);
        if (x == 0) first = v;
    }
    return first;
}

static void walk(layout *L, const model_config *c, model_w *w) {
    const int d = c->hidden_size, H = c->num_attention_heads, dqk = c->qk_nope_head_dim + c->qk_rope_head_dim;
    const int nl = c->num_hidden_layers + c->num_nextn_predict_layers;
    char name[160];
#define NAME(...) (snprintf(name, sizeof name, __VA_ARGS__), name)
    w->embed = add(L, "model.embed_tokens.weight", c->vocab_size, d, 0);
    for (int l = 0; l < nl; l++) {
        layer_w *lw = &w->layers[l];
        memset(lw, 0, sizeof *lw);
        char pre[48];
        snprintf(pre, sizeof pre, "model.layers.%d", l);
        if (l >= c->num_hidden_layers) { /* MTP module inputs (§9.4) */
            lw->enorm = add(L, NAME("%s.enorm.weight", pre), d, 0, PARAM_NO_DECAY);
            lw->hnorm = add(L, NAME("%s.hnorm.weight", pre), d, 0, PARAM_NO_DECAY);
            lw->eh_proj = add(L, NAME("%s.eh_proj.weight", pre), d, 2 * (int64_t)d, 0);
        }
        lw->attn_norm = add(L, NAME("%s.input_layernorm.weight", pre), d, 0, PARAM_NO_DECAY);
        mla_w *a = &lw->attn;
        if (c->q_lora_rank > 0) {
            a->q_a = add(L, NAME("%s.self_attn.q_a_proj.weight", pre), c->q_lora_rank, d, 0);
            a->q_a_norm = add(L, NAME("%s.self_attn.q_a_layernorm.weight", pre), c->q_lora_rank, 0, PARAM_NO_DECAY);
            a->q_b = add(L, NAME("%s.self_attn.q_b_proj.weight", pre), (int64_t)H * dqk, c->q_lora_rank, 0);
        } else {
            a->q = add(L, NAME("%s.self_attn.q_proj.weight", pre), (int64_t)H * dqk, d, 0);
        }
        a->kv_a = add(L, NAME("%s.self_attn.kv_a_proj_with_mqa.weight", pre),
                      c->kv_lora_rank + c->qk_rope_head_dim, d, 0);
        a->kv_a_norm = add(L, NAME("%s.self_attn.kv_a_layernorm.weight", pre), c->kv_lora_rank, 0, PARAM_NO_DECAY);
        a->kv_b = add(L, NAME("%s.self_attn.kv_b_proj.weight", pre),
                      (int64_t)H * (c->qk_nope_head_dim + c->v_head_dim), c->kv_lora_rank, 0);
        a->o = add(L, NAME("%s.self_attn.o_proj.weight", pre), d, (int64_t)H * c->v_head_dim, 0);
        lw->ffn_norm = add(L, NAME("%s.post_attention_layernorm.weight", pre), d, 0, PARAM_NO_DECAY);
        lw->is_moe = config_is_moe_layer(c, l);
        if (lw->is_moe) {
            moe_w *m = &lw->moe;
            const int E = c->n_routed_experts, Ie = c->moe_intermediate_size;
            m->router = add(L, NAME("%s.mlp.gate.weight", pre), E, d, 0);
            if (c->topk_method == CONFIG_TOPK_NOAUX_TC)
                m->bias = add(L, NAME("%s.mlp.gate.e_score_correction_bias", pre), E, 0,
                              PARAM_BUFFER | PARAM_NO_DECAY);
            m->gate = add_experts(L, pre, "gate_proj", E, Ie, d);
            m->up = add_experts(L, pre, "up_proj", E, Ie, d);
            m->down = add_experts(L, pre, "down_proj", E, d, Ie);
            if (c->n_shared_experts > 0) {
                int64_t Is = (int64_t)c->n_shared_experts * Ie;
                m->shared.gate = add(L, NAME("%s.mlp.shared_experts.gate_proj.weight", pre), Is, d, 0);
                m->shared.up = add(L, NAME("%s.mlp.shared_experts.up_proj.weight", pre), Is, d, 0);
                m->shared.down = add(L, NAME("%s.mlp.shared_experts.down_proj.weight", pre), d, Is, 0);
            }
        } else {
            lw->mlp.gate = add(L, NAME("%s.mlp.gate_proj.weight", pre), c->intermediate_size, d, 0);
            lw->mlp.up = add(L, NAME("%s.mlp.up_proj.weight", pre), c->intermediate_size, d, 0);
            lw->mlp.down = add(L, NAME("%s.mlp.down_proj.weight", pre), d, c->intermediate_size, 0);
        }
        if (l >= c->num_hidden_layers)
            lw->head_norm = add(L, NAME("%s.shared_head.norm.weight", pre), d, 0, PARAM_NO_DECAY);
    }
    w->final_norm = add(L, "model.norm.weight", d, 0, PARAM_NO_DECAY);
    w->head = add(L, "lm_head.weight", c->vocab_size, d, 0);
#undef NAME
}

/* Buffers of the parameters' backend (host memory when p->be is NULL). */
static void *buf_alloc(const model_params *p, size_t bytes) {
    return p->be ? p->be->alloc(bytes) : mem_alloc_aligned(bytes);
}

static void buf_free(const model_params *p, void *x) {
    if (p->be) p->be->free(x);
    else mem_free_aligned(x);
}

void params_free(model_params *p) {
    if (!p) return;
    buf_free(p, p->data);
    buf_free(p, p->grad);
    mem_free(p->entries);
    mem_free(p->w.layers);
    mem_free(p->g.layers);
    memset(p, 0, sizeof *p);
}

int params_init(model_params *p, const model_config *cfg, mr_err *e) {
    memset(p, 0, sizeof *p);
    int rc = config_validate(cfg, "model config", e);
    if (rc) return rc;
    p->cfg = *cfg;
    p->n_layers = cfg->num_hidden_layers + cfg->num_nextn_predict_layers;
    p->w.layers = mem_calloc((size_t)p->n_layers, sizeof(layer_w));
    p->g.layers = mem_calloc((size_t)p->n_layers, sizeof(layer_w));
    if (!p->w.layers || !p->g.layers) goto nomem;
    layout L = {0};
    walk(&L, cfg, &p->w); /* sizing pass */
    p->n = L.off;
    p->n_entries = L.n_entries;
    p->entries = mem_calloc((size_t)p->n_entries, sizeof(param_entry));
    size_t bytes;
    if (!p->entries || size_mul(p->n, sizeof(float), &bytes)) goto nomem;
    p->data = mem_alloc_aligned(bytes);
    if (!p->data) goto nomem;
    memset(p->data, 0, bytes);
    layout R = {.base = p->data, .entries = p->entries};
    walk(&R, cfg, &p->w);
    return MR_OK;
nomem:
    params_free(p);
    return err_set(e, MR_ENOMEM, "model parameters: out of memory");
}

int params_alloc_grad(model_params *p, mr_err *e) {
    if (p->grad) return MR_OK;
    p->grad = buf_alloc(p, p->n * sizeof(float));
    if (!p->grad)
        return err_set(e, MR_ENOMEM, "model gradients: out of memory (%zu floats%s%s)", p->n,
                       p->be ? " on backend " : "", p->be ? p->be->name : "");
    params_zero_grad(p);
    layout G = {.base = p->grad};
    walk(&G, &p->cfg, &p->g);
    return MR_OK;
}

void params_zero_grad(model_params *p) {
    if (!p->grad) return;
    if (p->be) p->be->zero(p->grad, p->n * sizeof(float));
    else memset(p->grad, 0, p->n * sizeof(float));
}

/* One host buffer moved to be (freed on success). */
static float *move_to(const backend *be, float *host, size_t n, mr_err *e) {
    float *d = be->alloc(n * sizeof(float));
    if (!d) {
        err_set(e, MR_ENOMEM, "model parameters: out of %s memory (%zu floats)", be->name, n);
        return NULL;
    }
    if (be->to_device(d, host, n * sizeof(float), e)) {
        be->free(d);
        return NULL;
    }
    mem_free_aligned(host);
    return d;
}

int params_to_backend(model_params *p, const backend *be, mr_err *e) {
    if (p->be == be || (!p->be && backend_is_host(be))) return MR_OK;
    if (p->be) return err_set(e, MR_EINVAL, "model parameters: already on backend '%s'", p->be->name);
    float *grad = p->grad;
    float *data = move_to(be, p->data, p->n, e);
    if (!data) return e->code;
    if (grad && !(grad = move_to(be, grad, p->n, e))) {
        /* put the parameters back where they were */
        float *h = mem_alloc_aligned(p->n * sizeof(float));
        if (h && be->to_host(h, data, p->n * sizeof(float), e) == MR_OK) {
            be->free(data);
            p->data = h;
            return e->code;
        }
        mem_free_aligned(h);
        be->free(data);
        p->data = NULL;
        return e->code;
    }
    p->be = be;
    p->data = data;
    layout R = {.base = p->data};
    walk(&R, &p->cfg, &p->w);
    if (grad) {
        p->grad = grad;
        layout G = {.base = p->grad};
        walk(&G, &p->cfg, &p->g);
    }
    return MR_OK;
}

int params_copy_to_host(const model_params *p, float *dst, size_t off, size_t n, mr_err *e) {
    if (off > p->n || n > p->n - off) return err_set(e, MR_ERANGE, "model parameters: copy past the end");
    if (!p->be) {
        memcpy(dst, p->data + off, n * sizeof(float));
        return MR_OK;
    }
    return p->be->to_host(dst, p->data + off, n * sizeof(float), e);
}

int params_copy_from_host(model_params *p, const float *src, size_t off, size_t n, mr_err *e) {
    if (off > p->n || n > p->n - off) return err_set(e, MR_ERANGE, "model parameters: copy past the end");
    if (!p->be) {
        memcpy(p->data + off, src, n * sizeof(float));
        return MR_OK;
    }
    return p->be->to_device(p->data + off, src, n * sizeof(float), e);
}

static int is_norm_or_buffer(const param_entry *pe) { return pe->flags & PARAM_NO_DECAY && pe->ndim == 1; }

void params_init_random(model_params *p, uint64_t seed, float std) {
    for (int i = 0; i < p->n_entries; i++) {
        const param_entry *pe = &p->entries[i];
        float *x = p->data + pe->offset;
        if (pe->flags & PARAM_BUFFER) memset(x, 0, pe->numel * sizeof(float));
        else if (is_norm_or_buffer(pe))
            for (size_t j = 0; j < pe->numel; j++) x[j] = 1.0f;
        else rng_fill_normal(x, pe->numel, 0.0f, std, seed, (uint64_t)i);
    }
}

const param_entry *params_find(const model_params *p, const char *name) {
    for (int i = 0; i < p->n_entries; i++)
        if (!strcmp(p->entries[i].name, name)) return &p->entries[i];
    return NULL;
}

float *params_tensor(const model_params *p, const param_entry *pe) { return p->data + pe->offset; }

/* ---------------------------------------------------------------- loading */

static void shape_str(char *buf, size_t n, int ndim, const int64_t *shape) {
    size_t k = (size_t)snprintf(buf, n, "[");
    for (int i = 0; i < ndim && k < n; i++) k += (size_t)snprintf(buf + k, n - k, "%s%lld", i ? ", " : "", (long long)shape[i]);
    if (k < n) snprintf(buf + k, n - k, "]");
}

/* FP8 E4M3 weight times its 128x128 block scales (§10.4), partial edge blocks included. */
static int load_fp8(st_model *m, const param_entry *pe, const st_tensor *t, float *dst, mr_err *e) {
    char sname[160];
    snprintf(sname, sizeof sname, "%s_scale_inv", pe->name);
    const st_tensor *s;
    int rc = st_model_get(m, sname, &s, e);
    if (rc)
        return err_set(e, MR_EFORMAT, "%s: tensor \"%s\" is F8_E4M3 but its scale \"%s\" is missing",
                       st_model_path(m), pe->name, sname);
    int64_t rows = pe->shape[0], cols = pe->ndim == 2 ? pe->shape[1] : 1;
    int64_t br = (rows + 127) / 128, bc = (cols + 127) / 128;
    if (s->dtype != DT_F32 || s->ndim != 2 || s->shape[0] != br || s->shape[1] != bc) {
        char got[64];
        shape_str(got, sizeof got, s->ndim, s->shape);
        return err_set(e, MR_EFORMAT, "%s: tensor \"%s\": expected F32 [%lld, %lld] block scales, got %s %s",
                       st_model_path(m), sname, (long long)br, (long long)bc, dtype_name(s->dtype), got);
    }
    rc = dtype_to_f32(dst, t->data, DT_F8_E4M3, pe->numel, e);
    if (rc) return rc;
    float *scale = mem_alloc((size_t)(br * bc) * sizeof(float));
    if (!scale) return err_set(e, MR_ENOMEM, "out of memory reading %s", sname);
    rc = dtype_to_f32(scale, s->data, DT_F32, (size_t)(br * bc), e);
    if (!rc)
        for (int64_t r = 0; r < rows; r++)
            for (int64_t c = 0; c < cols; c++) dst[r * cols + c] *= scale[(r / 128) * bc + c / 128];
    mem_free(scale);
    return rc;
}

int params_load(model_params *p, const char *dir, mr_err *e) {
    model_config cfg;
    int rc = config_load_file(&cfg, dir, e);
    if (rc) return rc;
    rc = params_init(p, &cfg, e);
    if (rc) return err_prefix(e, "%s", dir);
    st_model *m = NULL;
    rc = st_model_open(&m, dir, e);
    if (rc) goto fail;
    for (int i = 0; i < p->n_entries; i++) {
        const param_entry *pe = &p->entries[i];
        const st_tensor *t;
        rc = st_model_get(m, pe->name, &t, e);
        if (rc == MR_ENOTFOUND) {
            rc = err_set(e, MR_EFORMAT, "%s: tensor \"%s\" is missing (the config needs it)", st_model_path(m),
                         pe->name);
            goto fail;
        }
        if (rc) goto fail;
        int shape_ok = t->ndim == pe->ndim && t->shape[0] == pe->shape[0] && (pe->ndim == 1 || t->shape[1] == pe->shape[1]);
        if (!shape_ok) {
            char want[64], got[64];
            shape_str(want, sizeof want, pe->ndim, pe->shape);
            shape_str(got, sizeof got, t->ndim, t->shape);
            rc = err_set(e, MR_EFORMAT, "%s: tensor \"%s\": expected shape %s, got %s", st_model_path(m), pe->name,
                         want, got);
            goto fail;
        }
        float *dst = p->data + pe->offset;
        switch (t->dtype) {
        case DT_F32:
        case DT_BF16:
        case DT_F16: rc = dtype_to_f32(dst, t->data, t->dtype, pe->numel, e); break;
        case DT_F8_E4M3: rc = load_fp8(m, pe, t, dst, e); break;
        default:
            rc = err_set(e, MR_EFORMAT, "%s: tensor \"%s\": expected dtype F32, BF16, F16 or F8_E4M3, got %s",
                         st_model_path(m), pe->name, dtype_name(t->dtype));
        }
        if (rc) goto fail;
        for (size_t j = 0; j < pe->numel; j++)
            if (!isfinite(dst[j])) {
                rc = err_set(e, MR_EFORMAT, "%s: tensor \"%s\": element %zu is not finite", st_model_path(m),
                             pe->name, j);
                goto fail;
            }
    }
    st_model_close(m);
    return MR_OK;
fail:
    st_model_close(m);
    params_free(p);
    return rc;
}

/* ---------------------------------------------------------------- saving */

int params_save(const model_params *p, const char *dir, int bf16, size_t max_shard_bytes, mr_err *e) {
    if (p->be) { /* save a host copy */
        model_params h = *p;
        h.be = NULL;
        h.grad = NULL;
        h.data = mem_alloc_aligned(p->n * sizeof(float));
        if (!h.data) return err_set(e, MR_ENOMEM, "%s: out of memory for a host copy of the parameters", dir);
        int rc = params_copy_to_host(p, h.data, 0, p->n, e);
        if (!rc) rc = params_save(&h, dir, bf16, max_shard_bytes, e);
        mem_free_aligned(h.data);
        return rc;
    }
    if (mkdir(dir, 0755) != 0 && errno != EEXIST)
        return err_set(e, MR_EIO, "%s: cannot create directory: %s", dir, strerror(errno));
    int rc = config_save_file(&p->cfg, dir, e);
    if (rc) return rc;
    st_writer *w = NULL;
    uint16_t *half = NULL;
    rc = st_writer_init(&w, e);
    if (rc) return rc;
    const mr_dtype dt = bf16 ? DT_BF16 : DT_F32;
    if (bf16) {
        half = mem_alloc(p->n * sizeof(uint16_t));
        if (!half) {
            rc = err_set(e, MR_ENOMEM, "%s: out of memory converting to BF16", dir);
            goto done;
        }
        rc = dtype_from_f32(half, DT_BF16, p->data, p->n, e);
        if (rc) goto done;
    }
    for (int i = 0; i < p->n_entries && !rc; i++) {
        const param_entry *pe = &p->entries[i];
        /* The router bias stays F32 in every release (§10.3). */
        int keep32 = (pe->flags & PARAM_BUFFER) != 0;
        const void *src = (bf16 && !keep32) ? (const void *)(half + pe->offset) : (const void *)(p->data + pe->offset);
        rc = st_writer_add(w, pe->name, keep32 ? DT_F32 : dt, pe->ndim, pe->shape, src, e);
    }
    /* MTP modules carry copies of the embedding and the head under their own names (§9.4). */
    const model_config *c = &p->cfg;
    for (int k = 0; k < c->num_nextn_predict_layers && !rc; k++) {
        char name[160];
        int64_t shape[2] = {c->vocab_size, c->hidden_size};
        const param_entry *emb = params_find(p, "model.embed_tokens.weight"), *head = params_find(p, "lm_head.weight");
        snprintf(name, sizeof name, "model.layers.%d.embed_tokens.weight", c->num_hidden_layers + k);
        rc = st_writer_add(w, name, dt, 2, shape, bf16 ? (const void *)(half + emb->offset) : (const void *)(p->data + emb->offset), e);
        if (rc) break;
        snprintf(name, sizeof name, "model.layers.%d.shared_head.head.weight", c->num_hidden_layers + k);
        rc = st_writer_add(w, name, dt, 2, shape, bf16 ? (const void *)(half + head->offset) : (const void *)(p->data + head->offset), e);
    }
    if (!rc) rc = st_writer_set_meta(w, "format", "pt", e);
    if (!rc) rc = st_writer_write_dir(w, dir, max_shard_bytes, e);
done:
    st_writer_free(w);
    mem_free(half);
    return rc;
}
