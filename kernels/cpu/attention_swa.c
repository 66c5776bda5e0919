/* attention_swa.c: sliding-window attention with average-pooled K/V compression (definition in attention_swa.h).
 *
 * The one idea: pool first, then run attention.c's row kernel over a short key list. The pooled keys and values
 * of every complete block are computed once per call into scratch (one owner per (block, head), tokens ascending),
 * so a row's key list [pooled blocks 0..nb−1 ; window w0..t] costs O(nb + W) scores and nothing T×T is formed.
 * Both kinds of keys live in (rows, H, d) layouts with the same row stride, so the row kernel just switches base
 * pointer at list index nb.
 *
 * Backward (ds = p·(dp − D), D_i = dout_i·out_i, as in attention.c), each gradient row with one owner:
 *   pass 1  dq_i   += scale · Σ_list ds_in key_n                         (per query row, list order)
 *   pass 2  dkp_B, dvp_B = Σ_i over the queries that use block B         (per block and head, queries ascending;
 *           one task walks the queries once for SWA_POOL_GROUP blocks, so q and dout stream T/(16 r) times, not T/r);
 *           block B = [p, p + r − 1] is used by the queries i of its document with i >= p + r + W − 1
 *   pass 3  dk_j, dv_j += Σ_i over the window queries i in [j, j + W − 1] (per key row, queries ascending),
 *           then += dkp_B / r, dvp_B / r of the block holding j (∂ mean / ∂ member = 1/r).
 * Per head: pass 1 and 3 are O(T·W + T·T/r), pass 2 is O(T/r blocks × T queries). */
#include "kernels/cpu/attention_swa.h"

#include <math.h>
#include <stdint.h>
#include <string.h>

#include "core/mem.h"
#include "kernels/cpu/attention.h"
#include "kernels/cpu/vec4.h"

/* Blocks whose pooled gradients one backward task accumulates in a single walk over the queries (each block
 * still sums its queries ascending: the grouping changes speed, not bits). */
#define SWA_POOL_GROUP 16

static inline int imin(int a, int b) { return a < b ? a : b; }
static inline int imax(int a, int b) { return a > b ? a : b; }

/* Scratch of one call. Blocks are numbered in token order; the blocks of one document are consecutive. */
typedef struct {
    int32_t *blk_of;  /* (T) block holding token j */
    int32_t *bstart;  /* (nblk) first token of block B */
    int32_t *docend;  /* (T) last token of j's document */
    uint8_t *full;    /* (nblk) block B has r tokens inside its document (only those are ever used) */
    int nblk;
    float *kp, *vp;   /* (nblk, H, d_qk), (nblk, H, d_v) pooled means */
    float *dkp, *dvp; /* (nblk, H, d_qk), (nblk, H, d_v) pooled gradients (backward) */
    float *D;         /* (T, H) dout_i · out_i (backward) */
    void *ints, *floats;
} swa_work;

static void swa_work_free(swa_work *w) {
    mem_free(w->ints);
    mem_free(w->floats);
}

static int doc_of(const int32_t *doc_start, int t) { return doc_start ? doc_start[t] : 0; }

static int swa_check(const char *fn, const int32_t *doc_start, int T, int H, int d_qk, int d_v, int window,
                     int ratio, mr_err *e) {
    if (T < 0 || H <= 0 || d_qk <= 0 || d_v <= 0)
        return err_set(e, MR_EINVAL, "%s: sizes must be positive, got T=%d H=%d d_qk=%d d_v=%d", fn, T, H, d_qk, d_v);
    if (window < 1) return err_set(e, MR_EINVAL, "%s: window must be >= 1, got %d", fn, window);
    if (ratio < 1) return err_set(e, MR_EINVAL, "%s: compression ratio must be >= 1, got %d", fn, ratio);
    if (doc_start)
        for (int t = 0; t < T; t++) {
            int s = doc_start[t];
            if (s != t && (t == 0 || s != doc_start[t - 1]))
                return err_set(e, MR_EINVAL,
                               "%s: doc_start[%d] = %d: documents must be contiguous (expected %d or doc_start[%d] "
                               "= %d)",
                               fn, t, s, t, t > 0 ? t - 1 : 0, t > 0 ? (int)doc_start[t - 1] : 0);
        }
    return MR_OK;
}

/* Block table and scratch: pooled rows for every block; gradients and D too when backward. */
static int swa_work_init(swa_work *w, const char *fn, const int32_t *doc_start, int T, int H, int d_qk, int d_v,
                         int ratio, int backward, mr_err *e) {
    memset(w, 0, sizeof *w);
    size_t ni, nf, rows, per = (size_t)d_qk + (size_t)d_v, tmp;
    /* ints: blk_of, bstart, docend (T each) then full (T bytes) */
    if (size_mul((size_t)T, 3 * sizeof(int32_t) + 1, &ni))
        return err_set(e, MR_ENOMEM, "%s: scratch size overflows (T=%d)", fn, T);
    w->ints = mem_alloc(ni ? ni : 1);
    if (!w->ints) return err_set(e, MR_ENOMEM, "%s: out of memory for %zu bytes of block tables", fn, ni);
    w->blk_of = w->ints;
    w->bstart = w->blk_of + T;
    w->docend = w->bstart + T;
    w->full = (uint8_t *)(w->docend + T);
    int nb = 0;
    for (int j = 0; j < T; j++) {
        int s = doc_of(doc_start, j);
        if ((j - s) % ratio == 0) w->bstart[nb++] = j;
        w->blk_of[j] = nb - 1;
    }
    w->nblk = nb;
    for (int j = T - 1; j >= 0; j--)
        w->docend[j] = (j + 1 < T && doc_of(doc_start, j + 1) == doc_of(doc_start, j)) ? w->docend[j + 1] : j;
    for (int b = 0; b < nb; b++)
        w->full[b] = (int64_t)w->bstart[b] + ratio - 1 <= (int64_t)w->docend[w->bstart[b]];

    if (size_mul((size_t)nb, (size_t)H, &rows) || size_mul(rows, per * (backward ? 2 : 1), &nf) ||
        (backward && size_mul((size_t)T, (size_t)H, &tmp)) || (backward && size_add(nf, tmp, &nf)) ||
        size_mul(nf, sizeof(float), &nf)) {
        swa_work_free(w);
        return err_set(e, MR_ENOMEM, "%s: scratch size overflows (T=%d H=%d d_qk=%d d_v=%d)", fn, T, H, d_qk, d_v);
    }
    w->floats = mem_alloc(nf ? nf : 1);
    if (!w->floats) {
        swa_work_free(w);
        return err_set(e, MR_ENOMEM, "%s: out of memory for %zu bytes of pooled keys and values", fn, nf);
    }
    w->kp = w->floats;
    w->vp = w->kp + rows * (size_t)d_qk;
    if (backward) {
        w->dkp = w->vp + rows * (size_t)d_v;
        w->dvp = w->dkp + rows * (size_t)d_qk;
        w->D = w->dvp + rows * (size_t)d_v;
        memset(w->dkp, 0, rows * per * sizeof(float));
    }
    return MR_OK;
}

/* Pooled means of every full block, per head: tokens ascending, then / r. Rows of partial blocks are never read
 * (no query uses them) and are left zero. */
static void swa_pool(swa_work *w, const float *k, const float *v, int H, int d_qk, int d_v, int ratio) {
    int nb = w->nblk;
    float rf = (float)ratio;
    #pragma omp parallel for collapse(2) schedule(static) if ((long)nb * H > 64)
    for (int b = 0; b < nb; b++)
        for (int h = 0; h < H; h++) {
            size_t r = (size_t)b * (size_t)H + (size_t)h;
            float *kb = w->kp + r * (size_t)d_qk, *vb = w->vp + r * (size_t)d_v;
            memset(kb, 0, (size_t)d_qk * sizeof(float));
            memset(vb, 0, (size_t)d_v * sizeof(float));
            if (!w->full[b]) continue;
            for (int j = w->bstart[b]; j < w->bstart[b] + ratio; j++) {
                size_t jr = (size_t)j * (size_t)H + (size_t)h;
                vec4_axpy(kb, 1.0f, k + jr * (size_t)d_qk, d_qk);
                vec4_axpy(vb, 1.0f, v + jr * (size_t)d_v, d_v);
            }
            for (int c = 0; c < d_qk; c++) kb[c] /= rf;
            for (int c = 0; c < d_v; c++) vb[c] /= rf;
        }
}

/* Row t's key list: nb pooled blocks starting at block b0, then the window [w0, t]. */
typedef struct {
    int b0, nb, w0, n;
} swa_list;

static swa_list swa_row_list(const swa_work *w, const int32_t *doc_start, int t, int window, int ratio) {
    swa_list L;
    int s = doc_of(doc_start, t);
    L.w0 = imax(s, t - window + 1);
    L.nb = (L.w0 - s) / ratio;
    L.b0 = w->blk_of[s];
    L.n = L.nb + (t - L.w0 + 1);
    return L;
}

/* List entry n of row with list L, head base pointers kp_h/k_h (or vp_h/v_h) and row stride st. */
static inline const float *swa_key(const swa_list *L, const float *pooled_h, const float *exact_h, size_t st, int n) {
    return n < L->nb ? pooled_h + (size_t)(L->b0 + n) * st : exact_h + (size_t)(L->w0 + n - L->nb) * st;
}

/* One query row: attention.c's attn_row_forward over the list instead of [lo, i]. */
static void swa_row_forward(float *oi, float *lse_i, const float *qi, const swa_list *L, const float *kp_h,
                            const float *vp_h, const float *k_h, const float *v_h, int H, int d_qk, int d_v,
                            float scale) {
    float sbuf[ATTN_BLOCK];
    size_t ks = (size_t)H * (size_t)d_qk, vs = (size_t)H * (size_t)d_v;
    memset(oi, 0, (size_t)d_v * sizeof(float));
    float m = -INFINITY, l = 0.0f;
    for (int n0 = 0; n0 < L->n; n0 += ATTN_BLOCK) {
        int nb = imin(n0 + ATTN_BLOCK, L->n);
        float bm = -INFINITY;
        for (int n = n0; n < nb; n++) {
            float s = vec4_dot(qi, swa_key(L, kp_h, k_h, ks, n), d_qk) * scale;
            sbuf[n - n0] = s;
            if (s > bm) bm = s;
        }
        if (bm > m) {
            if (m != -INFINITY) {
                float alpha = expf(m - bm);
                l *= alpha;
                vec4_scal(oi, alpha, d_v);
            }
            m = bm;
        }
        for (int n = n0; n < nb; n++) {
            float p = expf(sbuf[n - n0] - m);
            l += p;
            vec4_axpy(oi, p, swa_key(L, vp_h, v_h, vs, n), d_v);
        }
    }
    for (int c = 0; c < d_v; c++) oi[c] /= l;
    *lse_i = m + logf(l);
}

int attention_swa_forward(float *out, float *lse, const float *q, const float *k, const float *v,
                          const int32_t *doc_start, int T, int H, int d_qk, int d_v, float scale, int window,
                          int ratio, mr_err *e) {
    static const char fn[] = "attention_swa_forward";
    int rc = swa_check(fn, doc_start, T, H, d_qk, d_v, window, ratio, e);
    if (rc || T == 0) return rc;
    swa_work w;
    if ((rc = swa_work_init(&w, fn, doc_start, T, H, d_qk, d_v, ratio, 0, e))) return rc;
    swa_pool(&w, k, v, H, d_qk, d_v, ratio);
    int nrb = (T + ATTN_BLOCK - 1) / ATTN_BLOCK;
    #pragma omp parallel for collapse(2) schedule(dynamic, 1) if ((long)T * H > ATTN_BLOCK)
    for (int h = 0; h < H; h++)
        for (int b = 0; b < nrb; b++) {
            int i1 = imin(T, (b + 1) * ATTN_BLOCK);
            for (int i = b * ATTN_BLOCK; i < i1; i++) {
                size_t r = (size_t)i * (size_t)H + (size_t)h;
                swa_list L = swa_row_list(&w, doc_start, i, window, ratio);
                swa_row_forward(out + r * (size_t)d_v, lse + r, q + r * (size_t)d_qk, &L, w.kp + (size_t)h * d_qk,
                                w.vp + (size_t)h * d_v, k + (size_t)h * d_qk, v + (size_t)h * d_v, H, d_qk, d_v,
                                scale);
            }
        }
    swa_work_free(&w);
    return MR_OK;
}

int attention_swa_backward(float *dq, float *dk, float *dv, const float *dout, const float *out, const float *lse,
                           const float *q, const float *k, const float *v, const int32_t *doc_start, int T, int H,
                           int d_qk, int d_v, float scale, int window, int ratio, mr_err *e) {
    static const char fn[] = "attention_swa_backward";
    int rc = swa_check(fn, doc_start, T, H, d_qk, d_v, window, ratio, e);
    if (rc || T == 0 || (!dq && !dk && !dv)) return rc;
    swa_work w;
    if ((rc = swa_work_init(&w, fn, doc_start, T, H, d_qk, d_v, ratio, 1, e))) return rc;
    swa_pool(&w, k, v, H, d_qk, d_v, ratio);
    size_t ks = (size_t)H * (size_t)d_qk, vs = (size_t)H * (size_t)d_v;
    int nrb = (T + ATTN_BLOCK - 1) / ATTN_BLOCK, nblk = w.nblk;
    const float *kp = w.kp, *vp = w.vp;
    float *D = w.D, *dkp = w.dkp, *dvp = w.dvp;

    #pragma omp parallel for schedule(static) if ((long)T * H > 1024)
    for (int i = 0; i < T; i++)
        for (int h = 0; h < H; h++) {
            size_t r = (size_t)i * (size_t)H + (size_t)h;
            D[r] = vec4_dot(dout + r * (size_t)d_v, out + r * (size_t)d_v, d_v);
        }

    /* Pass 1: dq_i += scale · Σ_n ds_in key_n over the row's list, in list order. */
    if (dq) {
        #pragma omp parallel for collapse(2) schedule(dynamic, 1) if ((long)T * H > ATTN_BLOCK)
        for (int h = 0; h < H; h++)
            for (int b = 0; b < nrb; b++) {
                int i1 = imin(T, (b + 1) * ATTN_BLOCK);
                for (int i = b * ATTN_BLOCK; i < i1; i++) {
                    size_t r = (size_t)i * (size_t)H + (size_t)h;
                    const float *qi = q + r * (size_t)d_qk, *doi = dout + r * (size_t)d_v;
                    const float *kp_h = kp + (size_t)h * d_qk, *vp_h = vp + (size_t)h * d_v;
                    const float *k_h = k + (size_t)h * d_qk, *v_h = v + (size_t)h * d_v;
                    float *dqi = dq + r * (size_t)d_qk, Di = D[r], Lse = lse[r];
                    swa_list L = swa_row_list(&w, doc_start, i, window, ratio);
                    for (int n = 0; n < L.n; n++) {
                        const float *kn = swa_key(&L, kp_h, k_h, ks, n);
                        float p = expf(vec4_dot(qi, kn, d_qk) * scale - Lse);
                        float dp = vec4_dot(doi, swa_key(&L, vp_h, v_h, vs, n), d_v);
                        vec4_axpy(dqi, scale * (p * (dp - Di)), kn, d_qk);
                    }
                }
            }
    }
    if (dk || dv) {
        /* Pass 2: pooled gradients. Block B = [p, p + r − 1] is in row i's list iff i is in its document and
         * p + r − 1 < i − W + 1 (it then also ends before the document start bound, which is <= p). */
        int ng = (nblk + SWA_POOL_GROUP - 1) / SWA_POOL_GROUP;
        #pragma omp parallel for collapse(2) schedule(dynamic, 1) if ((long)ng * H > 1)
        for (int h = 0; h < H; h++)
            for (int g = 0; g < ng; g++) {
                int b0 = g * SWA_POOL_GROUP, b1 = imin(nblk, b0 + SWA_POOL_GROUP);
                int64_t first[SWA_POOL_GROUP], lo = INT64_MAX, hi = -1;
                for (int b = b0; b < b1; b++) {
                    first[b - b0] = w.full[b] ? (int64_t)w.bstart[b] + ratio + window - 1 : INT64_MAX;
                    if (first[b - b0] <= w.docend[w.bstart[b]]) {
                        lo = first[b - b0] < lo ? first[b - b0] : lo;
                        hi = w.docend[w.bstart[b]] > hi ? w.docend[w.bstart[b]] : hi;
                    }
                }
                for (int64_t i = lo; i <= hi; i++) {
                    size_t r = (size_t)i * (size_t)H + (size_t)h;
                    const float *qi = q + r * (size_t)d_qk, *doi = dout + r * (size_t)d_v;
                    for (int b = b0; b < b1; b++) {
                        if (i < first[b - b0] || i > w.docend[w.bstart[b]]) continue;
                        size_t br = (size_t)b * (size_t)H + (size_t)h;
                        const float *kb = kp + br * (size_t)d_qk, *vb = vp + br * (size_t)d_v;
                        float p = expf(vec4_dot(qi, kb, d_qk) * scale - lse[r]);
                        if (dv) vec4_axpy(dvp + br * (size_t)d_v, p, doi, d_v);
                        if (dk) {
                            float dp = vec4_dot(doi, vb, d_v);
                            vec4_axpy(dkp + br * (size_t)d_qk, scale * (p * (dp - D[r])), qi, d_qk);
                        }
                    }
                }
            }

        /* Pass 3: per key row j: window queries i in [j, min(j + W − 1, end of document)] ascending, then 1/r of
         * the pooled gradient of j's block. */
        {
            float inv_r = 1.0f / (float)ratio;
            #pragma omp parallel for collapse(2) schedule(dynamic, 1) if ((long)T * H > ATTN_BLOCK)
            for (int h = 0; h < H; h++)
                for (int b = 0; b < nrb; b++) {
                    int j1 = imin(T, (b + 1) * ATTN_BLOCK);
                    for (int j = b * ATTN_BLOCK; j < j1; j++) {
                        size_t kr = (size_t)j * (size_t)H + (size_t)h;
                        const float *kj = k + kr * (size_t)d_qk, *vj = v + kr * (size_t)d_v;
                        int64_t wl = (int64_t)j + window - 1;
                        int ilast = wl < w.docend[j] ? (int)wl : w.docend[j];
                        for (int i = j; i <= ilast; i++) {
                            size_t r = (size_t)i * (size_t)H + (size_t)h;
                            const float *qi = q + r * (size_t)d_qk, *doi = dout + r * (size_t)d_v;
                            float p = expf(vec4_dot(qi, kj, d_qk) * scale - lse[r]);
                            if (dv) vec4_axpy(dv + kr * (size_t)d_v, p, doi, d_v);
                            if (dk) {
                                float dp = vec4_dot(doi, vj, d_v);
                                vec4_axpy(dk + kr * (size_t)d_qk, scale * (p * (dp - D[r])), qi, d_qk);
                            }
                        }
                        size_t br = (size_t)w.blk_of[j] * (size_t)H + (size_t)h;
                        if (w.full[w.blk_of[j]]) {
                            if (dv) vec4_axpy(dv + kr * (size_t)d_v, inv_r, dvp + br * (size_t)d_v, d_v);
                            if (dk) vec4_axpy(dk + kr * (size_t)d_qk, inv_r, dkp + br * (size_t)d_qk, d_qk);
                        }
                    }
                }
        }
    }
    swa_work_free(&w);
    return MR_OK;
}
