/* backend_guarded.c: the CPU ops on memory locked away from host code between ops (see backend_guarded.h). */
#include "kernels/cpu/backend_guarded.h"

#include <stdint.h>
#include <string.h>
#include <sys/mman.h>

#include "core/mem.h"
#include "core/rng.h"
#include "kernels/backend.h"
#include "kernels/cpu/attention.h"
#include "kernels/cpu/attention_swa.h"

#define RESERVE ((size_t)32 << 30) /* address space only (MAP_NORESERVE) */
#define PAGE ((size_t)4096)

typedef struct block {
    size_t off, len;
    int used;
} block;

/* The range: blocks tile [0, top) in address order; pages past top were never handed out. */
static struct {
    char *base;
    size_t top, in_use, peak;
    block *b;
    int n, cap;
    int open; /* nesting depth of open() */
} G;

static int reserve(void) {
    if (G.base) return 0;
    void *p = mmap(NULL, RESERVE, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (p == MAP_FAILED) return -1;
    G.base = p;
    return 0;
}

/* Host code may touch the range from open() to the matching close(). */
static void open_range(void) {
    if (G.open++ == 0 && G.top) mprotect(G.base, G.top, PROT_READ | PROT_WRITE);
}

static void close_range(void) {
    if (--G.open == 0 && G.top) mprotect(G.base, G.top, PROT_NONE);
}

static int insert_block(int at, block x) {
    if (G.n == G.cap) {
        int cap = G.cap ? 2 * G.cap : 64;
        block *nb = mem_realloc(G.b, (size_t)cap * sizeof *nb);
        if (!nb) return -1;
        G.b = nb;
        G.cap = cap;
    }
    memmove(G.b + at + 1, G.b + at, (size_t)(G.n - at) * sizeof *G.b);
    G.b[at] = x;
    G.n++;
    return 0;
}

static void not_recorded(void);

static void *g_alloc(size_t n) {
    not_recorded();
    if (reserve()) return NULL;
    n = (n + PAGE - 1) / PAGE * PAGE;
    if (n == 0) n = PAGE;
    for (int i = 0; i < G.n; i++) { /* first fit among freed blocks, split */
        block *b = &G.b[i];
        if (b->used || b->len < n) continue;
        if (b->len > n && insert_block(i + 1, (block){b->off + n, b->len - n, 0})) return NULL;
        b = &G.b[i];
        b->len = n;
        b->used = 1;
        G.in_use += n;
        if (G.in_use > G.peak) G.peak = G.in_use;
        return G.base + b->off;
    }
    if (n > RESERVE - G.top || insert_block(G.n, (block){G.top, n, 1})) return NULL;
    G.top += n;
    G.in_use += n;
    if (G.in_use > G.peak) G.peak = G.in_use;
    /* the new pages follow the range's current protection */
    mprotect(G.base + G.top - n, n, G.open ? PROT_READ | PROT_WRITE : PROT_NONE);
    return G.base + G.top - n;
}

static void g_free(void *p) {
    not_recorded();
    if (!p) return;
    size_t off = (size_t)((char *)p - G.base);
    for (int i = 0; i < G.n; i++) {
        if (G.b[i].off != off || !G.b[i].used) continue;
        G.b[i].used = 0;
        G.in_use -= G.b[i].len;
        madvise(G.base + off, G.b[i].len, MADV_DONTNEED); /* the pages go back; the addresses stay reserved */
        if (i + 1 < G.n && !G.b[i + 1].used) { /* coalesce with the next, then the previous */
            G.b[i].len += G.b[i + 1].len;
            memmove(G.b + i + 1, G.b + i + 2, (size_t)(G.n - i - 2) * sizeof *G.b);
            G.n--;
        }
        if (i > 0 && !G.b[i - 1].used) {
            G.b[i - 1].len += G.b[i].len;
            memmove(G.b + i, G.b + i + 1, (size_t)(G.n - i - 1) * sizeof *G.b);
            G.n--;
        }
        return;
    }
}

size_t guarded_bytes_in_use(void) { return G.in_use; }

static void g_mem_stats(size_t *in_use, size_t *peak) {
    *in_use = G.in_use;
    *peak = G.peak;
}

static int g_to_device(void *dst, const void *src, size_t n, mr_err *e) {
    (void)e;
    not_recorded();
    open_range();
    memcpy(dst, src, n);
    close_range();
    return MR_OK;
}

static int g_sync(mr_err *e) {
    (void)e;
    not_recorded();
    return MR_OK;
}

/* ---- graphs (graph_run): the CUDA graph protocol on the CPU ----
 * While a graph is captured the recordable ops (those of a decode step) only record their arguments, by value;
 * a replay calls them again with exactly those arguments, without the body. Any other op called while capturing
 * (a copy to or from the host, a sync, an allocation, an op a decode step has no business calling) fails the
 * capture, as it would on CUDA. A body that passes a per-step value by argument instead of through memory, or
 * that relies on host work between its ops, gives other results on replay than on the CPU: test_guarded sees
 * that. */
typedef enum { R_EMB, R_RMS, R_MM, R_ROPE, R_COPY2D, R_KV_APPEND, R_MLA_ROWS, R_MOE, R_AXPY, R_SWIGLU, R_ZERO } rec_kind;

typedef struct rec {
    rec_kind k;
    void *p[7];
    int i[10];
    float f;
    size_t z[4];
    mm_mode mm;
    moe_params mp; /* by value: the arrays it points to are the model's */
} rec;

static struct {
    int on, failed;
    rec *ops;
    int n, cap;
} REC;

/* While capturing: 1 after recording r (the caller returns without running the op). */
static int record(const rec *r) {
    if (!REC.on) return 0;
    if (REC.n == REC.cap) {
        int cap = REC.cap ? 2 * REC.cap : 256;
        rec *o = mem_realloc(REC.ops, (size_t)cap * sizeof *o);
        if (!o) {
            REC.failed = 1;
            return 1;
        }
        REC.ops = o;
        REC.cap = cap;
    }
    REC.ops[REC.n++] = *r;
    return 1;
}

/* An op that cannot be captured (it runs, and the capture is abandoned). */
static void not_recorded(void) {
    if (REC.on) REC.failed = 1;
}

/* Every op: the CPU's, with the range open around it. */
#define GUARD_VOID(call)                                                                                       \
    do {                                                                                                       \
        not_recorded();                                                                                        \
        open_range();                                                                                          \
        call;                                                                                                  \
        close_range();                                                                                         \
    } while (0)
#define GUARD_RET(type, call)                                                                                  \
    do {                                                                                                       \
        not_recorded();                                                                                        \
        open_range();                                                                                          \
        type r_ = call;                                                                                        \
        close_range();                                                                                         \
        return r_;                                                                                             \
    } while (0)

static const backend *C(void) { return backend_cpu(); }

static int g_fill_normal(float *x, size_t n, float mean, float std, uint64_t seed, uint64_t stream, mr_err *e) {
    GUARD_RET(int, C()->fill_normal(x, n, mean, std, seed, stream, e));
}
static int g_axpy(float *y, const float *x, float a, size_t n, mr_err *e) {
    if (record(&(rec){.k = R_AXPY, .p = {y, (void *)x}, .f = a, .z = {n}})) return MR_OK;
    GUARD_RET(int, C()->axpy(y, x, a, n, e));
}
static void g_zero(void *p, size_t n) {
    if (record(&(rec){.k = R_ZERO, .p = {p}, .z = {n}})) return;
    GUARD_VOID(C()->zero(p, n));
}
static void g_copy2d(float *dst, size_t dp, const float *src, size_t sp, size_t w, size_t rows) {
    if (record(&(rec){.k = R_COPY2D, .p = {dst, (void *)src}, .z = {dp, sp, w, rows}})) return;
    GUARD_VOID(C()->copy2d(dst, dp, src, sp, w, rows));
}
static void g_scale(float *x, float s, size_t n) { GUARD_VOID(C()->scale(x, s, n)); }
static int g_adamw_update(float *data, const float *grad, float *m, float *v, size_t n, double b1, double b2,
                          double eps, double wd, int64_t step, double lr, mr_err *e) {
    GUARD_RET(int, C()->adamw_update(data, grad, m, v, n, b1, b2, eps, wd, step, lr, e));
}
static int g_grad_sumsq(double *s, const float *g, size_t n, mr_err *e) { GUARD_RET(int, C()->grad_sumsq(s, g, n, e)); }
static void g_matmul_forward(float *y, const float *x, const float *w, int T, int in, int out, float beta,
                             mm_mode mode) {
    if (record(&(rec){.k = R_MM, .p = {y, (void *)x, (void *)w}, .i = {T, in, out}, .f = beta, .mm = mode})) return;
    GUARD_VOID(C()->matmul_forward(y, x, w, T, in, out, beta, mode));
}
static void g_matmul_backward(float *dx, float *dw, const float *dy, const float *x, const float *w, int T, int in,
                              int out, mm_mode mode) {
    GUARD_VOID(C()->matmul_backward(dx, dw, dy, x, w, T, in, out, mode));
}
static void g_rmsnorm_forward(float *out, float *rstd, const float *x, const float *g, int T, int Cn, float eps) {
    if (record(&(rec){.k = R_RMS, .p = {out, rstd, (void *)x, (void *)g}, .i = {T, Cn}, .f = eps})) return;
    GUARD_VOID(C()->rmsnorm_forward(out, rstd, x, g, T, Cn, eps));
}
static void g_rmsnorm_backward(float *dx, float *dg, const float *dout, const float *x, const float *g,
                               const float *rstd, int T, int Cn) {
    GUARD_VOID(C()->rmsnorm_backward(dx, dg, dout, x, g, rstd, T, Cn));
}
static void g_swiglu_forward(float *h, const float *gate, const float *up, int T, int I) {
    if (record(&(rec){.k = R_SWIGLU, .p = {h, (void *)gate, (void *)up}, .i = {T, I}})) return;
    GUARD_VOID(C()->swiglu_forward(h, gate, up, T, I));
}
static void g_swiglu_backward(float *dgate, float *dup, const float *dh, const float *gate, const float *up, int T,
                              int I) {
    GUARD_VOID(C()->swiglu_backward(dgate, dup, dh, gate, up, T, I));
}
static void g_embedding_forward(float *out, const int32_t *ids, const float *table, int T, int Cn) {
    if (record(&(rec){.k = R_EMB, .p = {out, (void *)ids, (void *)table}, .i = {T, Cn}})) return;
    GUARD_VOID(C()->embedding_forward(out, ids, table, T, Cn));
}
static void g_embedding_backward(float *dtable, const float *dout, const int32_t *ids, int T, int Cn) {
    GUARD_VOID(C()->embedding_backward(dtable, dout, ids, T, Cn));
}
static double g_xent(float *loss, float *dlogits, const float *logits, const int32_t *target, const float *scale,
                     int T, int V) {
    GUARD_RET(double, C()->xent_forward_backward(loss, dlogits, logits, target, scale, T, V));
}
static void g_rope_forward(float *x, const int32_t *pos, int T, int nh, int rs, int hs, const rope_table *rt) {
    if (record(&(rec){.k = R_ROPE, .p = {x, (void *)pos, (void *)rt}, .i = {T, nh, rs, hs}})) return;
    GUARD_VOID(C()->rope_forward(x, pos, T, nh, rs, hs, rt));
}
static void g_rope_backward(float *dx, const int32_t *pos, int T, int nh, int rs, int hs, const rope_table *rt) {
    GUARD_VOID(C()->rope_backward(dx, pos, T, nh, rs, hs, rt));
}
static void g_attention_forward(float *out, float *lse, const float *q, const float *k, const float *v,
                                const int32_t *ds, int T, int H, int dqk, int dv, float scale) {
    GUARD_VOID(C()->attention_forward(out, lse, q, k, v, ds, T, H, dqk, dv, scale));
}
static void g_attention_backward(float *dq, float *dk, float *dv, const float *dout, const float *out,
                                 const float *lse, const float *q, const float *k, const float *v, const int32_t *ds,
                                 int T, int H, int dqk, int dvd, float scale) {
    GUARD_VOID(C()->attention_backward(dq, dk, dv, dout, out, lse, q, k, v, ds, T, H, dqk, dvd, scale));
}
static int g_swa_forward(float *out, float *lse, const float *q, const float *k, const float *v, const int32_t *ds,
                         int T, int H, int dqk, int dv, float scale, int window, int ratio, mr_err *e) {
    GUARD_RET(int, C()->attention_swa_forward(out, lse, q, k, v, ds, T, H, dqk, dv, scale, window, ratio, e));
}
static int g_swa_backward(float *dq, float *dk, float *dv, const float *dout, const float *out, const float *lse,
                          const float *q, const float *k, const float *v, const int32_t *ds, int T, int H, int dqk,
                          int dvd, float scale, int window, int ratio, mr_err *e) {
    GUARD_RET(int, C()->attention_swa_backward(dq, dk, dv, dout, out, lse, q, k, v, ds, T, H, dqk, dvd, scale, window,
                                               ratio, e));
}
static int g_moe_forward(float *out, moe_saved *s, moe_work *w, const float *x, const int32_t *replay,
                         const moe_params *p, const moe_cfg *c, int T, mr_err *e) {
    if (record(&(rec){.k = R_MOE, .p = {out, s, w, (void *)x, (void *)replay, (void *)c}, .i = {T}, .mp = *p}))
        return MR_OK;
    GUARD_RET(int, C()->moe_forward(out, s, w, x, replay, p, c, T, e));
}
static void g_moe_backward(float *dx, const moe_grads *g, moe_work *w, const float *dout, const float *daff,
                           const moe_saved *s, const float *x, const moe_params *p, const moe_cfg *c) {
    GUARD_VOID(C()->moe_backward(dx, g, w, dout, daff, s, x, p, c));
}
static int g_moe_balance_loss(double *loss, float *daff, const float *scores, const int32_t *idx, const int *seq_len,
                              int n_seq, int T, int E, int K, float alpha, mr_err *e) {
    GUARD_RET(int, C()->moe_balance_loss(loss, daff, scores, idx, seq_len, n_seq, T, E, K, alpha, e));
}
static int g_mla_absorbed(float *out, float *lse, const float *q, const float *const *c_kv,
                          const float *const *k_rope, const int32_t *len, const float *w_kvb, int B, int H, int dn,
                          int dr, int dv, int rkv, float scale, mr_err *e) {
    GUARD_RET(int, C()->mla_absorbed(out, lse, q, c_kv, k_rope, len, w_kvb, B, H, dn, dr, dv, rkv, scale, e));
}

static void g_kv_append(const kv_row *rows, int layer, const float *cn, const float *kpe, int T, int rkv, int dr) {
    if (record(&(rec){.k = R_KV_APPEND, .p = {(void *)rows, (void *)cn, (void *)kpe}, .i = {layer, T, rkv, dr}}))
        return;
    GUARD_VOID(C()->kv_append(rows, layer, cn, kpe, T, rkv, dr));
}
static int g_mla_rows(float *out, float *lse, const float *q, const kv_row *rows, int layer, const float *w_kvb, int B,
                      int H, int dn, int dr, int dv, int rkv, float scale, int max_cap, mr_err *e) {
    if (record(&(rec){.k = R_MLA_ROWS,
                      .p = {out, lse, (void *)q, (void *)rows, (void *)w_kvb},
                      .i = {layer, B, H, dn, dr, dv, rkv, max_cap},
                      .f = scale}))
        return MR_OK;
    GUARD_RET(int, C()->mla_rows(out, lse, q, rows, layer, w_kvb, B, H, dn, dr, dv, rkv, scale, max_cap, e));
}

/* One recorded op again, exactly as recorded. */
static int replay(const rec *r, mr_err *e) {
    const int *i = r->i;
    void *const *p = r->p;
    switch (r->k) {
    case R_EMB: g_embedding_forward(p[0], p[1], p[2], i[0], i[1]); return MR_OK;
    case R_RMS: g_rmsnorm_forward(p[0], p[1], p[2], p[3], i[0], i[1], r->f); return MR_OK;
    case R_MM: g_matmul_forward(p[0], p[1], p[2], i[0], i[1], i[2], r->f, r->mm); return MR_OK;
    case R_ROPE: g_rope_forward(p[0], p[1], i[0], i[1], i[2], i[3], p[2]); return MR_OK;
    case R_COPY2D: g_copy2d(p[0], r->z[0], p[1], r->z[1], r->z[2], r->z[3]); return MR_OK;
    case R_KV_APPEND: g_kv_append(p[0], i[0], p[1], p[2], i[1], i[2], i[3]); return MR_OK;
    case R_MLA_ROWS:
        return g_mla_rows(p[0], p[1], p[2], p[3], i[0], p[4], i[1], i[2], i[3], i[4], i[5], i[6], r->f, i[7], e);
    case R_MOE: return g_moe_forward(p[0], p[1], p[2], p[3], p[4], &r->mp, p[5], i[0], e);
    case R_AXPY: return g_axpy(p[0], p[1], r->f, r->z[0], e);
    case R_SWIGLU: g_swiglu_forward(p[0], p[1], p[2], i[0], i[1]); return MR_OK;
    case R_ZERO: g_zero(p[0], r->z[0]); return MR_OK;
    }
    return err_set(e, MR_EINTERNAL, "guarded graph: unknown op %d", (int)r->k);
}

typedef struct g_graph {
    int state; /* as CUDA's: 0 new, 1 ran once, 2 captured, 3 not capturable */
    rec *ops;
    int n;
} g_graph;

static void g_graph_free(void *h) {
    g_graph *g = h;
    if (!g) return;
    mem_free(g->ops);
    mem_free(g);
}

static int g_graph_run(void **h, int (*body)(void *, mr_err *), void *ctx, int *replayed, mr_err *e) {
    if (replayed) *replayed = 0;
    g_graph *g = *h;
    if (!g) {
        if (!(g = mem_calloc(1, sizeof *g))) return body(ctx, e);
        *h = g;
    }
    if (g->state == 1) { /* capture: the body's ops record themselves */
        REC.on = 1, REC.failed = 0, REC.ops = NULL, REC.n = REC.cap = 0;
        mr_err be = {0};
        int brc = body(ctx, &be);
        REC.on = 0;
        if (brc || REC.failed) {
            mem_free(REC.ops);
            g->state = 3;
        } else {
            g->ops = REC.ops, g->n = REC.n, g->state = 2;
        }
        REC.ops = NULL;
    }
    if (g->state == 2) {
        for (int k = 0; k < g->n; k++) {
            int rc = replay(&g->ops[k], e);
            if (rc) return err_prefix(e, "guarded graph, op %d of %d", k + 1, g->n);
        }
        if (replayed) *replayed = 1;
        return MR_OK;
    }
    int rc = body(ctx, e);
    if (rc == MR_OK && g->state == 0) g->state = 1;
    return rc;
}

static const backend guarded_backend = {
    .kind = BACKEND_GUARDED,
    .name = "cpu-guarded",
    .alloc = g_alloc,
    .free = g_free,
    .to_device = g_to_device,
    .to_host = g_to_device, /* one memcpy with the range open either way */
    .sync = g_sync,
    .fill_normal = g_fill_normal,
    .axpy = g_axpy,
    .zero = g_zero,
    .copy2d = g_copy2d,
    .scale = g_scale,
    .adamw_update = g_adamw_update,
    .grad_sumsq = g_grad_sumsq,
    .matmul_forward = g_matmul_forward,
    .matmul_backward = g_matmul_backward,
    .rmsnorm_forward = g_rmsnorm_forward,
    .rmsnorm_backward = g_rmsnorm_backward,
    .swiglu_forward = g_swiglu_forward,
    .swiglu_backward = g_swiglu_backward,
    .embedding_forward = g_embedding_forward,
    .embedding_backward = g_embedding_backward,
    .xent_forward_backward = g_xent,
    .rope_forward = g_rope_forward,
    .rope_backward = g_rope_backward,
    .attention_forward = g_attention_forward,
    .attention_backward = g_attention_backward,
    .attention_swa_forward = g_swa_forward,
    .attention_swa_backward = g_swa_backward,
    .moe_forward = g_moe_forward,
    .moe_backward = g_moe_backward,
    .moe_balance_loss = g_moe_balance_loss,
    .mla_absorbed = g_mla_absorbed,
    .kv_append = g_kv_append,
    .mla_rows = g_mla_rows,
    .det_absorbed = 1,
    .mem_stats = g_mem_stats,
    .graph_run = g_graph_run,
    .graph_free = g_graph_free,
};

const backend *backend_guarded(void) { return &guarded_backend; }

/* ---- MoE state: the CPU layout moved into the range (off and load stay on the host) ---- */

/* Moves the n_ptr float buffers that all point into the host block `host` (sizes in floats) into one guarded
 * block, keeping their offsets. Returns the block or NULL. */
static void *move_block(float **ptr[], const size_t *len, int n_ptr, void *host) {
    size_t end = 0;
    for (int i = 0; i < n_ptr; i++) {
        size_t e = (size_t)((char *)*ptr[i] - (char *)host) + len[i] * sizeof(float);
        if (e > end) end = e;
    }
    char *g = g_alloc(end);
    if (!g) return NULL;
    for (int i = 0; i < n_ptr; i++) *ptr[i] = (float *)(g + ((char *)*ptr[i] - (char *)host));
    return g;
}

static void guarded_saved_release(moe_saved *s) {
    g_free(s->mem_f);
    g_free(s->mem_h);
    mem_free_aligned(s->mem_i);
    memset(s, 0, sizeof *s);
}

int guarded_moe_saved_init(moe_saved *s, const moe_cfg *c, int T_max, mr_err *e) {
    int rc = moe_saved_init(s, c, T_max, e);
    if (rc) return rc;
    const size_t T = (size_t)T_max, TK = T * (size_t)c->K, E = (size_t)c->E;
    float **fp[] = {&s->scores, &s->weights, &s->xg, &s->hg, &s->hu, &s->sg, &s->su};
    const size_t fl[] = {T * E, TK, TK * (size_t)c->d, TK * (size_t)c->I_e, TK * (size_t)c->I_e, T * (size_t)c->I_s,
                         T * (size_t)c->I_s};
    void *host_f = s->mem_f;
    void *gf = move_block(fp, fl, 7, host_f);
    int32_t *gi = g_alloc(3 * TK * sizeof(int32_t));
    if (!gf || !gi) {
        g_free(gf);
        g_free(gi);
        moe_saved_free(s);
        return err_set(e, MR_ENOMEM, "moe: cannot allocate the guarded saved state for T_max=%d", T_max);
    }
    mem_free_aligned(host_f);
    s->mem_f = gf;
    s->mem_h = gi;
    s->idx = gi;
    s->order = gi + TK;
    s->pos = gi + 2 * TK;
    s->release = guarded_saved_release;
    return MR_OK;
}

static void guarded_work_release(moe_work *w) {
    g_free(w->mem);
    memset(w, 0, sizeof *w);
}

int guarded_moe_work_init(moe_work *w, const moe_cfg *c, int T_max, mr_err *e) {
    int rc = moe_work_init(w, c, T_max, e);
    if (rc) return rc;
    const size_t T = (size_t)T_max, TK = T * (size_t)c->K, Ie = (size_t)c->I_e, Is = (size_t)c->I_s;
    float **fp[] = {&w->rows_d, &w->h,  &w->hs,    &w->dh,    &w->dhg,   &w->dhu,
                    &w->dweights, &w->dz, &w->sh_h, &w->sh_dh, &w->sh_dg, &w->sh_du};
    const size_t fl[] = {TK * (size_t)c->d, TK * Ie, TK * Ie, TK * Ie, TK * Ie, TK * Ie,
                         TK, T * (size_t)c->E, T * Is, T * Is, T * Is, T * Is};
    void *host = w->mem;
    void *g = move_block(fp, fl, 12, host);
    if (!g) {
        moe_work_free(w);
        return err_set(e, MR_ENOMEM, "moe: cannot allocate the guarded work space for T_max=%d", T_max);
    }
    mem_free_aligned(host);
    w->mem = g;
    w->release = guarded_work_release;
    return MR_OK;
}
