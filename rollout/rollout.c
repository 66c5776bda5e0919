/* rollout.c: the rollout engine (see rollout.h): prefill, copy-on-start prefix caches, batched latent decode,
 * sampling, finish rules.
 *
 * The one idea: every sample lives in a cache slot (model_kv) from its first token to its last; a prompt's G
 * samples are admitted together when G slots are free (the prompt is prefilled once into the first slot and its
 * rows copied into the other G - 1), every decode step feeds the next token of every live sample through
 * model_decode_step as one batch, and a finished sample's slot goes back to the free list at once. What a sample
 * generates depends only on its own tokens (batch-invariant model arithmetic) and on its own Philox stream, so the
 * schedule (who shares a step with whom) never shows in the results. */
#include "rollout/rollout.h"

#include <limits.h>
#include <math.h>
#include <omp.h>
#include <stdlib.h>
#include <string.h>

#include "core/mem.h"
#include "core/rng.h"
#include "kernels/backend.h"
#include "kernels/cpu/dense.h"

rollout_opts rollout_opts_default(void) {
    return (rollout_opts){.temperature = 1.0f, .top_p = 1.0f, .top_k = 0, .min_p = 0.0f, .max_new_tokens = 256,
                          .eos = -1};
}

void rollout_seq_free(rollout_seq *s) {
    if (!s) return;
    mem_free(s->tokens);
    mem_free(s->logp_sampler);
    mem_free(s->logp);
    mem_free(s->experts);
    memset(s, 0, sizeof *s);
}

/* ------------------------------------------------------------------------------------------ sampler */

/* A row's elementwise loops fork when the row is long enough to pay for it (V = 32k: the exps halve on 2 threads)
 * and the caller is not already parallel (the batch loop runs rows on threads; nested, these run on one). Every
 * element is computed by the same expression on any thread, and the max is exact: the values never depend on
 * the thread count. */
enum { SAMPLER_PAR_V = 8192 };

/* Σ p[0..V) in a fixed order (8 lanes, then a fixed tree; the same on every call and thread count), and the
 * count of p > 0. Eight independent chains instead of one: the sum is no longer bound by the add latency. */
static double sum_kept(const double *p, int V, int *kept) {
    double acc[8] = {0};
    int cnt[8] = {0}, v = 0;
    for (; v + 8 <= V; v += 8)
        for (int l = 0; l < 8; l++) {
            acc[l] += p[v + l];
            cnt[l] += p[v + l] > 0;
        }
    for (int l = 0; v + l < V; l++) {
        acc[l] += p[v + l];
        cnt[l] += p[v + l] > 0;
    }
    if (kept) *kept = cnt[0] + cnt[1] + cnt[2] + cnt[3] + cnt[4] + cnt[5] + cnt[6] + cnt[7];
    return ((acc[0] + acc[4]) + (acc[2] + acc[6])) + ((acc[1] + acc[5]) + (acc[3] + acc[7]));
}

/* Sorts a[0..n) by e descending, ids ascending on ties, given a in ids ascending: a stable LSD radix sort on the
 * complemented bits of e (for e >= 0 the IEEE bits order as the values), 8 bits a pass, passes where every key
 * shares the digit skipped. tmp: n entries. O(n) where qsort took 4.5 ms on 32k near-equal candidates. */
static void cand_sort(rollout_cand *a, rollout_cand *tmp, int n) {
    uint32_t cnt[8][256];
    memset(cnt, 0, sizeof cnt);
    for (int i = 0; i < n; i++) {
        uint64_t k;
        memcpy(&k, &a[i].e, sizeof k);
        k = ~k;
        for (int d = 0; d < 8; d++) cnt[d][(k >> (8 * d)) & 255]++;
    }
    rollout_cand *src = a, *dst = tmp;
    for (int d = 0; d < 8; d++) {
        uint32_t *c = cnt[d], sum = 0;
        int trivial = 0;
        for (int b = 0; b < 256 && !trivial; b++) trivial = c[b] == (uint32_t)n;
        if (trivial) continue;
        for (int b = 0; b < 256; b++) {
            uint32_t x = c[b];
            c[b] = sum;
            sum += x;
        }
        for (int i = 0; i < n; i++) {
            uint64_t k;
            memcpy(&k, &src[i].e, sizeof k);
            dst[c[(~k >> (8 * d)) & 255]++] = src[i];
        }
        rollout_cand *t = src;
        src = dst;
        dst = t;
    }
    if (src != a) memcpy(a, src, sizeof *a * (size_t)n);
}

int rollout_sampler_probs(double *probs, const float *logits, int V, const rollout_opts *o, rollout_cand *work) {
    if (o->temperature <= 0) {
        int best = 0;
        for (int v = 1; v < V; v++)
            if (logits[v] > logits[best]) best = v;
        memset(probs, 0, sizeof(double) * (size_t)V);
        probs[best] = 1.0;
        return 1;
    }
    const double T = o->temperature;
    double xmax = -INFINITY;
    if (T == 1.0) { /* x / 1 is x: the same values without V divisions */
        #pragma omp parallel for schedule(static) reduction(max : xmax) if (V >= SAMPLER_PAR_V)
        for (int v = 0; v < V; v++) {
            double x = (double)logits[v];
            probs[v] = x;
            if (x > xmax) xmax = x;
        }
    } else {
        #pragma omp parallel for schedule(static) reduction(max : xmax) if (V >= SAMPLER_PAR_V)
        for (int v = 0; v < V; v++) {
            double x = (double)logits[v] / T;
            probs[v] = x;
            if (x > xmax) xmax = x;
        }
    }
    /* min-p (keep e_v >= min_p) is applied here when nothing truncates, else as the kept set is written back */
    const double mn = o->min_p;
    const int topk = o->top_k > 0 && o->top_k < V, trunc = topk || o->top_p < 1.0f;
    #pragma omp parallel for schedule(static) if (V >= SAMPLER_PAR_V)
    for (int v = 0; v < V; v++) {
        double ev = exp(probs[v] - xmax);
        probs[v] = trunc || mn <= 0 || ev >= mn ? ev : 0;
    }
    if (trunc) {
        /* Only an upper set {e >= cut} is sorted: one that surely holds every id top-k / top-p can keep (at least
         * k ids; or, for top-p alone, more than top_p of the mass, with slack for rounding). Same result as
         * sorting all V ids, at a fraction of the cost for a large vocabulary. */
        static const double cuts[] = {1e-3, 1e-6, 1e-12, 0};
        double zall = sum_kept(probs, V, NULL);
        int n = 0;
        for (size_t ci = 0; ci < sizeof cuts / sizeof cuts[0]; ci++) {
            double s = 0;
            n = 0;
            for (int v = 0; v < V; v++)
                if (probs[v] >= cuts[ci]) {
                    work[n++] = (rollout_cand){probs[v], v};
                    s += probs[v];
                }
            if (topk ? n >= o->top_k : s >= (double)o->top_p * zall * (1 + 1e-9) + 1e-300) break;
        }
        cand_sort(work, work + V, n);
        int keep = topk && o->top_k < n ? o->top_k : n;
        if (o->top_p < 1.0f) {
            double z = 0, cum = 0, lim;
            if (topk)
                for (int i = 0; i < keep; i++) z += work[i].e;
            else
                z = zall;
            lim = (double)o->top_p * z;
            for (int i = 0; i < keep; i++) {
                if (cum >= lim) {
                    keep = i;
                    break;
                }
                cum += work[i].e;
            }
        }
        memset(probs, 0, sizeof(double) * (size_t)V);
        for (int i = 0; i < keep; i++) probs[work[i].id] = mn <= 0 || work[i].e >= mn ? work[i].e : 0;
    }
    int kept;
    const double z = sum_kept(probs, V, &kept);
    #pragma omp parallel for schedule(static) if (V >= SAMPLER_PAR_V)
    for (int v = 0; v < V; v++) probs[v] /= z;
    return kept;
}

int32_t rollout_sample_row(const double *probs, int V, double u, float *logp_sampler) {
    double cum = 0;
    int last = -1;
    for (int v = 0; v < V; v++) {
        if (probs[v] <= 0) continue;
        cum += probs[v];
        last = v;
        if (u < cum) break;
    }
    if (last < 0) last = 0; /* cannot happen: the largest logit always keeps its mass */
    *logp_sampler = (float)log(probs[last]);
    return last;
}

double rollout_uniform(uint64_t seed, int64_t prompt_id, int g, int i) {
    uint32_t w[4];
    rng_block(seed, rng_stream_id(ROLLOUT_RNG_PURPOSE, (uint64_t)prompt_id, (uint64_t)g), (uint64_t)i, w);
    return ((double)(w[0] >> 5) * 67108864.0 + (double)(w[1] >> 6)) * (1.0 / 9007199254740992.0);
}

void rollout_spec_uniforms(uint64_t seed, int64_t prompt_id, int g, int i, double u[2]) {
    uint32_t w[4];
    rng_block(seed, rng_stream_id(ROLLOUT_SPEC_PURPOSE, (uint64_t)prompt_id, (uint64_t)g), (uint64_t)i, w);
    u[0] = ((double)(w[0] >> 5) * 67108864.0 + (double)(w[1] >> 6)) * (1.0 / 9007199254740992.0);
    u[1] = ((double)(w[2] >> 5) * 67108864.0 + (double)(w[3] >> 6)) * (1.0 / 9007199254740992.0);
}

/* ------------------------------------------------------------------------------------------ engine */

typedef struct sample {
    int p, g;      /* prompt, sample index */
    int slot;      /* cache slot while live, -1 otherwise */
    int cap;       /* capacity of the out arrays */
    int32_t next;  /* the token the next decode step feeds */
    int32_t draft; /* speculative: the MTP draft of the token after next (its distribution in engine.qprob) */
    int has_draft;
    char *text;    /* completion bytes (only with stop strings) */
    size_t text_len, text_cap;
} sample;

typedef struct engine {
    model *m;
    const tokenizer *tok;
    const rollout_opts *o;
    const int64_t *pid;
    rollout_seq *out;
    sample *s;
    int G, V, n_moe, K, max_stop;
    int *moe_layers;       /* (n_moe) main-model MoE layer indices */
    model_kv *slots;       /* (n_slots) */
    float *cache;          /* every slot's ckv and kpe */
    int *free_slots, n_free;
    /* per row of a forward: which sample, and what it drew */
    int *row_seq;          /* (2·T_max) */
    int *row_at;           /* (2·T_max) logits row */
    int32_t *row_tok;      /* (2·T_max) */
    float *row_lps, *row_lp;
    double *probs;         /* (threads, 2V) */
    rollout_cand *cand;    /* (threads, 2V) */
    int nthr;
    const float *lg, *mlg; /* host logits of the latest forward / MTP draft (host_outputs) */
    /* MTP speculative decoding */
    int spec;
    model_kv *mslots;      /* (n_slots) MTP latent caches, one per cache slot */
    float *mcache;
    double *qprob;         /* (n_slots, V) draft distribution of the slot's pending draft */
    int32_t *d_ids, *d_hrow, *d_off; /* (T_max) rows of an MTP draft forward */
    int *d_seq;            /* (T_max) the sample a draft row drafts for, -1 = a cache-only row */
    model_kv **d_kv;       /* (T_max) */
    int *va, *vb, *cnt, *acc; /* (T_max) per sample of a verify chunk: its rows, tokens taken, draft accepted */
    rollout_stats st;
} engine;

/* Grows sample q's arrays to hold one more token. */
static int seq_reserve(engine *E, int q) {
    rollout_seq *r = &E->out[q];
    sample *s = &E->s[q];
    if (r->n < s->cap) return MR_OK;
    int cap = s->cap ? 2 * s->cap : 16;
    if (cap > E->o->max_new_tokens) cap = E->o->max_new_tokens;
    int32_t *t = mem_realloc(r->tokens, sizeof(int32_t) * (size_t)cap);
    if (!t) return MR_ENOMEM;
    r->tokens = t;
    float *a = mem_realloc(r->logp_sampler, sizeof(float) * (size_t)cap);
    if (!a) return MR_ENOMEM;
    r->logp_sampler = a;
    float *b = mem_realloc(r->logp, sizeof(float) * (size_t)cap);
    if (!b) return MR_ENOMEM;
    r->logp = b;
    if (E->o->record_experts && E->n_moe) {
        int32_t *x = mem_realloc(r->experts, sizeof(int32_t) * (size_t)cap * (size_t)E->n_moe * (size_t)E->K);
        if (!x) return MR_ENOMEM;
        r->experts = x;
    }
    s->cap = cap;
    return MR_OK;
}

/* The per-row loops below run rows on threads when there are several; a single row (batch-1 decode) is run by the
 * calling thread outside any parallel region, so that the sampler's own loops over a large vocabulary can fork
 * (nested in even an inactive region they would get a fresh team each time: slower than no fork at all). */

/* The latest forward's logits (and experts, when recorded) as host memory, fetched before rows are sampled on
 * threads: on a device backend the first call copies them. */
static int host_outputs(engine *E, mr_err *e) {
    if (!(E->lg = model_logits(E->m)) || (E->n_moe && !model_layer_experts(E->m, E->moe_layers[0])))
        return err_set(e, MR_EDEVICE, "rollout: cannot copy the model outputs from backend '%s'", E->m->be->name);
    return MR_OK;
}

/* Row i of the latest forward: the logits row row_at[i] of sample row_seq[i]. */
static void sample_row_i(engine *E, int i) {
    const int V = E->V, th = omp_get_thread_num();
    double *pr = E->probs + (size_t)th * 2 * V;
    rollout_cand *cd = E->cand + (size_t)th * 2 * V;
    const sample *s = &E->s[E->row_seq[i]];
    const float *row = E->lg + (size_t)E->row_at[i] * V;
    rollout_sampler_probs(pr, row, V, E->o, cd);
    double u = rollout_uniform(E->o->seed, E->pid[s->p], s->g, E->out[E->row_seq[i]].n);
    int32_t t = rollout_sample_row(pr, V, u, &E->row_lps[i]);
    E->row_tok[i] = t;
    logprob_forward(&E->row_lp[i], row, &t, 1, V);
}

/* Samples the rows 0..n-1 of the latest forward. */
static int sample_rows(engine *E, int n, mr_err *e) {
    int rc = host_outputs(E, e);
    if (rc) return rc;
    if (n == 1) {
        sample_row_i(E, 0);
        return MR_OK;
    }
    #pragma omp parallel for schedule(dynamic, 1) num_threads(E->nthr)
    for (int i = 0; i < n; i++) sample_row_i(E, i);
    return MR_OK;
}

static int stop_hit(engine *E, int q, int32_t t) {
    sample *s = &E->s[q];
    size_t n = 0;
    const char *bytes = tok_token_bytes(E->tok, t, &n);
    if (!bytes) n = 0;
    if (s->text_len + n + 1 > s->text_cap) {
        size_t cap = 2 * (s->text_len + n + 1) + 64;
        char *x = mem_realloc(s->text, cap);
        if (!x) return -1;
        s->text = x;
        s->text_cap = cap;
    }
    size_t old = s->text_len;
    if (n) memcpy(s->text + old, bytes, n);
    s->text_len += n;
    for (int k = 0; k < E->o->n_stop; k++) {
        size_t L = strlen(E->o->stop[k]);
        if (L > s->text_len) continue;
        /* only occurrences that end inside the new token's bytes are new */
        size_t from = old + 1 > L ? old + 1 - L : 0;
        if (memmem(s->text + from, s->text_len - from, E->o->stop[k], L)) return 1;
    }
    return 0;
}

/* Appends row i's draw to its sample; returns 1 when the sample finished (its slot is released), 0 if it goes on,
 * or a negative status. */
static int take_row(engine *E, int i) {
    const int q = E->row_seq[i];
    rollout_seq *r = &E->out[q];
    sample *s = &E->s[q];
    if (seq_reserve(E, q)) return MR_ENOMEM;
    int32_t t = E->row_tok[i];
    r->tokens[r->n] = t;
    r->logp_sampler[r->n] = E->row_lps[i];
    r->logp[r->n] = E->row_lp[i];
    if (r->experts) {
        int32_t *dst = r->experts + (size_t)r->n * E->n_moe * E->K;
        for (int j = 0; j < E->n_moe; j++)
            memcpy(dst + (size_t)j * E->K, model_layer_experts(E->m, E->moe_layers[j]) + (size_t)E->row_at[i] * E->K,
                   sizeof(int32_t) * (size_t)E->K);
    }
    r->n++;
    if (E->o->on_token) E->o->on_token(E->o->on_token_ctx, q, t);
    int fin = -1;
    if (E->o->eos >= 0 && t == E->o->eos) fin = ROLLOUT_EOS;
    else if (E->o->n_stop > 0) {
        int h = stop_hit(E, q, t);
        if (h < 0) return MR_ENOMEM;
        if (h) fin = ROLLOUT_STOP;
    }
    if (fin < 0 && r->n >= E->o->max_new_tokens) fin = ROLLOUT_LENGTH;
    if (fin < 0) {
        s->next = t;
        return 0;
    }
    r->finish = (rollout_finish)fin;
    r->truncated = fin == ROLLOUT_LENGTH;
    mem_free(s->text);
    s->text = NULL;
    if (s->slot >= 0) E->free_slots[E->n_free++] = s->slot;
    s->slot = -1;
    return 1;
}

/* ------------------------------------------------------------------------------------------ speculative */

/* Draws the draft of MTP row i (d_seq[i] >= 0) of the latest model_mtp_draft. */
static void draw_draft(engine *E, int i) {
    const int V = E->V, q = E->d_seq[i];
    sample *s = &E->s[q];
    double *qp = E->qprob + (size_t)s->slot * V;
    rollout_sampler_probs(qp, E->mlg + (size_t)i * V, V, E->o,
                          E->cand + (size_t)omp_get_thread_num() * 2 * V);
    double u[2];
    float unused;
    rollout_spec_uniforms(E->o->seed, E->pid[s->p], s->g, E->out[q].n, u);
    s->draft = rollout_sample_row(qp, V, u[0], &unused);
    s->has_draft = 1;
}

/* Runs the n MTP rows set up in d_* and draws a draft for every row with d_seq >= 0. With n = out[q].n tokens
 * taken, next (index n - 1) is fed by the next step and the draft stands for token index n: its uniform is u[0] of
 * spec block n, whose u[1] is the acceptance test in verify_rows. */
static int run_drafts(engine *E, int n, mr_err *e) {
    if (n == 0) return MR_OK;
    int rc = model_mtp_draft(E->m, E->d_ids, E->d_hrow, E->d_kv, E->d_off, n, e);
    if (rc) return rc;
    if (!(E->mlg = model_mtp_logits(E->m, 1)))
        return err_set(e, MR_EDEVICE, "rollout: cannot copy the MTP logits from backend '%s'", E->m->be->name);
    int n_draw = 0;
    for (int i = 0; i < n; i++) n_draw += E->d_seq[i] >= 0;
    if (n_draw == 1) {
        for (int i = 0; i < n; i++)
            if (E->d_seq[i] >= 0) draw_draft(E, i);
    } else {
        #pragma omp parallel for schedule(dynamic, 1) num_threads(E->nthr)
        for (int i = 0; i < n; i++)
            if (E->d_seq[i] >= 0) draw_draft(E, i);
    }
    return MR_OK;
}

/* Verify chunk live[c0..c1) after model_decode_rows: sample k's rows are va[k] (its next token; its logits give
 * token index n = out[q].n) and vb[k] (its draft, or -1). Accepts the draft with min(1, p/q) or resamples from
 * norm(max(0, p − q)); after an accepted draft, row vb[k] gives a bonus token (index n + 1) from p as usual.
 * Results go to row_* entries 2k (and 2k + 1), cnt[k] tokens, acc[k]. */
static void verify_one(engine *E, const int *live, int c0, int k) {
    const float *logits = E->lg;
    const int V = E->V;
    const int th = omp_get_thread_num(), q = live[c0 + k], i0 = 2 * k;
    double *pr = E->probs + (size_t)th * 2 * V, *res = pr + V;
    rollout_cand *cd = E->cand + (size_t)th * 2 * V;
    const sample *s = &E->s[q];
    const int n = E->out[q].n, ra = E->va[k], rb = E->vb[k];
    const float *za = logits + (size_t)ra * V;
    E->row_seq[i0] = E->row_seq[i0 + 1] = q;
    E->row_at[i0] = ra;
    E->row_at[i0 + 1] = rb;
    rollout_sampler_probs(pr, za, V, E->o, cd);
    const double u_tok = rollout_uniform(E->o->seed, E->pid[s->p], s->g, n);
    int32_t t;
    float lps;
    int acc = 0;
    if (rb >= 0) {
        const double *qp = E->qprob + (size_t)s->slot * V;
        double u[2];
        rollout_spec_uniforms(E->o->seed, E->pid[s->p], s->g, n, u);
        const int32_t d = s->draft;
        if (u[1] * qp[d] < pr[d]) { /* u < p/q */
            acc = 1;
            t = d;
            lps = (float)log(pr[d]);
        } else {
            double z = 0;
            for (int v = 0; v < V; v++) {
                res[v] = pr[v] > qp[v] ? pr[v] - qp[v] : 0;
                z += res[v];
            }
            float unused;
            if (z > 0) {
                for (int v = 0; v < V; v++) res[v] /= z;
                t = rollout_sample_row(res, V, u_tok, &unused);
            } else { /* p <= q everywhere: only rounding can get here; p itself is the residual's limit */
                t = rollout_sample_row(pr, V, u_tok, &unused);
            }
            lps = (float)log(pr[t]); /* the token's law is p: the sampler's log-prob is p's */
        }
    } else {
        t = rollout_sample_row(pr, V, u_tok, &lps);
    }
    E->row_tok[i0] = t;
    E->row_lps[i0] = lps;
    logprob_forward(&E->row_lp[i0], za, &t, 1, V);
    if (acc) {
        const float *zb = logits + (size_t)rb * V;
        rollout_sampler_probs(pr, zb, V, E->o, cd);
        int32_t t2 = rollout_sample_row(pr, V, rollout_uniform(E->o->seed, E->pid[s->p], s->g, n + 1),
                                        &E->row_lps[i0 + 1]);
        E->row_tok[i0 + 1] = t2;
        logprob_forward(&E->row_lp[i0 + 1], zb, &t2, 1, V);
    }
    E->cnt[k] = 1 + acc;
    E->acc[k] = acc;
}

static int verify_rows(engine *E, const int *live, int c0, int c1, mr_err *e) {
    int rc = host_outputs(E, e);
    if (rc) return rc;
    if (c1 - c0 == 1) {
        verify_one(E, live, c0, 0);
        return MR_OK;
    }
    #pragma omp parallel for schedule(dynamic, 1) num_threads(E->nthr)
    for (int k = 0; k < c1 - c0; k++) verify_one(E, live, c0, k);
    return MR_OK;
}

/* One speculative decode step over the live samples, in chunks of at most T_max rows (results do not depend on the
 * chunking: the model arithmetic is batch-invariant). Compacts live[] to the samples still running. */
static int spec_step(engine *E, int *live, int *n_live, int32_t *ids, int32_t *off, model_kv **kvp, mr_err *e) {
    const int Tm = E->m->T_max, nl = *n_live;
    int kept = 0, rc;
    for (int c0 = 0; c0 < nl;) {
        int nr = 0, c1 = c0;
        while (c1 < nl && nr + 1 + E->s[live[c1]].has_draft <= Tm) nr += 1 + E->s[live[c1++]].has_draft;
        nr = 0;
        for (int i = c0; i < c1; i++) {
            sample *s = &E->s[live[i]];
            model_kv *kv = &E->slots[s->slot];
            E->va[i - c0] = nr;
            ids[nr] = s->next;
            off[nr] = 0;
            kvp[nr++] = kv;
            E->vb[i - c0] = -1;
            if (s->has_draft) {
                E->vb[i - c0] = nr;
                ids[nr] = s->draft;
                off[nr] = 1;
                kvp[nr++] = kv;
            }
        }
        if ((rc = model_decode_rows(E->m, ids, kvp, off, nr, e))) return rc;
        E->st.decode_steps++;
        E->st.decode_rows += nr;
        if ((rc = verify_rows(E, live, c0, c1, e))) return rc;
        int nd = 0;
        for (int i = c0; i < c1; i++) {
            const int q = live[i], k = i - c0;
            sample *s = &E->s[q];
            const int had = s->has_draft;
            model_kv *kv = &E->slots[s->slot];
            s->has_draft = 0;
            E->st.drafted += had;
            E->st.accepted += E->acc[k];
            int r = take_row(E, 2 * k), taken = 1;
            if (r == 0 && E->cnt[k] == 2) {
                r = take_row(E, 2 * k + 1);
                taken = 2;
            }
            if (r < 0) return err_set(e, r, "rollout: out of memory for the outputs");
            if (r == 1) continue;
            live[kept++] = q;            /* kept <= i: live[i] was read above */
            if (had && !E->acc[k]) kv->len--; /* the rejected draft's cache entry is overwritten next step */
            const rollout_seq *o = &E->out[q];
            if (o->n + 2 > E->o->max_new_tokens) continue; /* one token left: no draft */
            /* MTP rows: one per token taken (position by position), the last one drafts */
            for (int j = 0; j < taken; j++) {
                E->d_ids[nd] = o->tokens[o->n - taken + j];
                E->d_hrow[nd] = j == 0 ? E->va[k] : E->vb[k];
                E->d_off[nd] = j;
                E->d_kv[nd] = &E->mslots[s->slot];
                E->d_seq[nd++] = j == taken - 1 ? q : -1;
            }
        }
        if ((rc = run_drafts(E, nd, e))) return rc;
        c0 = c1;
    }
    *n_live = kept;
    return MR_OK;
}

static int check_opts(const model *m, const tokenizer *tok, const int *plen, int n_prompts, int G,
                      const rollout_opts *o, mr_err *e) {
    const model_config *c = &m->p.cfg;
    if (n_prompts < 0 || G < 1)
        return err_set(e, MR_EINVAL, "rollout: expected n_prompts >= 0 and G >= 1, got %d and %d", n_prompts, G);
    if (n_prompts > INT_MAX / G) return err_set(e, MR_ERANGE, "rollout: %d prompts x %d samples overflow", n_prompts, G);
    if (!(o->temperature >= 0) || !isfinite(o->temperature))
        return err_set(e, MR_EINVAL, "rollout: temperature must be a finite number >= 0, got %g", (double)o->temperature);
    if (!(o->top_p > 0 && o->top_p <= 1))
        return err_set(e, MR_EINVAL, "rollout: top_p must be in (0, 1], got %g", (double)o->top_p);
    if (o->top_k < 0) return err_set(e, MR_EINVAL, "rollout: top_k must be >= 0, got %d", o->top_k);
    if (!(o->min_p >= 0 && o->min_p <= 1))
        return err_set(e, MR_EINVAL, "rollout: min_p must be in [0, 1], got %g", (double)o->min_p);
    if (o->max_new_tokens < 0)
        return err_set(e, MR_EINVAL, "rollout: max_new_tokens must be >= 0, got %d", o->max_new_tokens);
    if (o->n_stop < 0 || (o->n_stop > 0 && !o->stop))
        return err_set(e, MR_EINVAL, "rollout: n_stop = %d needs that many stop strings", o->n_stop);
    if (o->n_stop > 0 && !tok) return err_set(e, MR_EINVAL, "rollout: stop strings need a tokenizer");
    for (int k = 0; k < o->n_stop; k++)
        if (!o->stop[k] || !o->stop[k][0]) return err_set(e, MR_EINVAL, "rollout: stop string %d is empty", k);
    if (o->eos >= c->vocab_size)
        return err_set(e, MR_EINVAL, "rollout: eos id %d is outside the vocabulary [0, %d)", o->eos, c->vocab_size);
    if (o->mtp_speculative && c->num_nextn_predict_layers < 1)
        return err_set(e, MR_EINVAL, "rollout: mtp_speculative needs a model with an MTP module "
                                     "(num_nextn_predict_layers >= 1), got 0");
    if (c->moerl_swa_window > 0)
        return err_set(e, MR_EINVAL, "rollout: the latent KV cache does not support sliding-window attention");
    if (G > m->T_max)
        return err_set(e, MR_ERANGE, "rollout: G = %d samples of a prompt must fit one decode batch (T_max = %d)", G,
                       m->T_max);
    for (int p = 0; p < n_prompts; p++) {
        if (plen[p] < 1) return err_set(e, MR_EINVAL, "rollout: prompt %d is empty", p);
        if (plen[p] > m->T_max)
            return err_set(e, MR_ERANGE, "rollout: prompt %d has %d tokens; the prefill holds T_max = %d", p, plen[p],
                           m->T_max);
        if ((long)plen[p] + o->max_new_tokens > c->max_position_embeddings)
            return err_set(e, MR_ERANGE, "rollout: prompt %d: %d tokens + max_new_tokens %d pass max_position_embeddings %d",
                           p, plen[p], o->max_new_tokens, c->max_position_embeddings);
    }
    return MR_OK;
}

static void engine_free(engine *E) {
    mem_free(E->moe_layers);
    mem_free(E->slots);
    if (E->cache) E->m->be->free(E->cache);
    mem_free(E->free_slots);
    mem_free(E->row_seq);
    mem_free(E->row_at);
    mem_free(E->row_tok);
    mem_free(E->row_lps);
    mem_free(E->row_lp);
    mem_free(E->probs);
    mem_free(E->cand);
    mem_free(E->mslots);
    if (E->mcache) E->m->be->free(E->mcache);
    mem_free(E->qprob);
    mem_free(E->d_ids);
    mem_free(E->d_hrow);
    mem_free(E->d_off);
    mem_free(E->d_seq);
    mem_free(E->d_kv);
    mem_free(E->va);
    mem_free(E->vb);
    mem_free(E->cnt);
    mem_free(E->acc);
}

int rollout_generate(model *m, const tokenizer *tok, const int32_t *const *prompts, const int *plen,
                     const int64_t *prompt_ids, int n_prompts, int G, const rollout_opts *o, rollout_seq *out,
                     mr_err *e) {
    int rc = check_opts(m, tok, plen, n_prompts, G, o, e);
    if (rc) return rc;
    const model_config *c = &m->p.cfg;
    const int L = c->num_hidden_layers, Tm = m->T_max, n_seq = n_prompts * G;
    engine E;
    memset(&E, 0, sizeof E);
    E.m = m;
    E.tok = tok;
    E.o = o;
    E.pid = prompt_ids;
    E.out = out;
    E.G = G;
    E.V = c->vocab_size;
    for (int l = 0; l < L; l++) E.n_moe += m->p.w.layers[l].is_moe;
    E.K = E.n_moe ? c->num_experts_per_tok : 0;
    for (int q = 0; q < n_seq; q++) {
        memset(&out[q], 0, sizeof out[q]);
        out[q].n_moe_layers = E.n_moe;
        out[q].K = E.K;
    }
    if (n_seq == 0) return MR_OK;
    if (o->max_new_tokens == 0) {
        for (int q = 0; q < n_seq; q++) {
            out[q].finish = ROLLOUT_LENGTH;
            out[q].truncated = 1;
        }
        return MR_OK;
    }
    int max_plen = 0;
    for (int p = 0; p < n_prompts; p++)
        if (plen[p] > max_plen) max_plen = plen[p];
    const int cap = max_plen + o->max_new_tokens - 1; /* the last token is never fed back */
    const int n_slots = n_seq < Tm ? n_seq : Tm;
    size_t fc, fk, per;
    model_kv_floats(m, cap, &fc, &fk);
    per = (fc + 15) / 16 * 16 + (fk + 15) / 16 * 16;
    E.nthr = omp_get_max_threads();
    E.s = mem_calloc((size_t)n_seq, sizeof *E.s);
    E.moe_layers = mem_alloc(sizeof(int) * (size_t)(E.n_moe + 1));
    E.slots = mem_calloc((size_t)n_slots, sizeof *E.slots);
    E.cache = m->be->alloc(sizeof(float) * per * (size_t)n_slots); /* the caches live where the model runs */
    E.free_slots = mem_alloc(sizeof(int) * (size_t)n_slots);
    /* two entries per sample in a speculative verify chunk (up to T_max samples) */
    E.row_seq = mem_alloc(sizeof(int) * 2 * (size_t)Tm);
    E.row_at = mem_alloc(sizeof(int) * 2 * (size_t)Tm);
    E.row_tok = mem_alloc(sizeof(int32_t) * 2 * (size_t)Tm);
    E.row_lps = mem_alloc(sizeof(float) * 2 * (size_t)Tm);
    E.row_lp = mem_alloc(sizeof(float) * 2 * (size_t)Tm);
    E.probs = mem_alloc(sizeof(double) * 2 * (size_t)E.V * (size_t)E.nthr);
    E.cand = mem_alloc(sizeof(rollout_cand) * 2 * (size_t)E.V * (size_t)E.nthr);
    /* prefill batch and decode batch buffers */
    int32_t *ids = mem_alloc(sizeof(int32_t) * 3 * (size_t)Tm);
    model_kv **kvp = mem_alloc(sizeof(model_kv *) * 2 * (size_t)Tm), **mkvp = kvp + Tm;
    int *live = mem_alloc(sizeof(int) * (size_t)n_slots);
    size_t mfc = 0, mfk = 0, mper = 0;
    E.spec = o->mtp_speculative;
    if (E.spec) {
        model_kv_floats_mtp(m, cap, &mfc, &mfk);
        mper = (mfc + 15) / 16 * 16 + (mfk + 15) / 16 * 16;
        E.mslots = mem_calloc((size_t)n_slots, sizeof *E.mslots);
        E.mcache = m->be->alloc(sizeof(float) * mper * (size_t)n_slots);
        E.qprob = mem_alloc(sizeof(double) * (size_t)E.V * (size_t)n_slots);
        E.d_ids = mem_alloc(sizeof(int32_t) * (size_t)Tm);
        E.d_hrow = mem_alloc(sizeof(int32_t) * (size_t)Tm);
        E.d_off = mem_alloc(sizeof(int32_t) * (size_t)Tm);
        E.d_seq = mem_alloc(sizeof(int) * (size_t)Tm);
        E.d_kv = mem_alloc(sizeof(model_kv *) * (size_t)Tm);
        E.va = mem_alloc(sizeof(int) * (size_t)Tm);
        E.vb = mem_alloc(sizeof(int) * (size_t)Tm);
        E.cnt = mem_alloc(sizeof(int) * (size_t)Tm);
        E.acc = mem_alloc(sizeof(int) * (size_t)Tm);
        if (!E.mslots || !E.mcache || !E.qprob || !E.d_ids || !E.d_hrow || !E.d_off || !E.d_seq || !E.d_kv || !E.va ||
            !E.vb || !E.cnt || !E.acc) {
            rc = err_set(e, MR_ENOMEM, "rollout: out of memory (speculative decoding, %d slots)", n_slots);
            goto fail;
        }
        for (int i = 0; i < n_slots; i++) {
            float *base = E.mcache + mper * (size_t)i;
            E.mslots[i] = (model_kv){.ckv = base, .kpe = base + (mfc + 15) / 16 * 16, .cap = cap, .len = 0};
        }
    }
    if (!E.s || !E.moe_layers || !E.slots || !E.cache || !E.free_slots || !E.row_seq || !E.row_at || !E.row_tok ||
        !E.row_lps || !E.row_lp || !E.probs || !E.cand || !ids || !kvp || !live) {
        rc = err_set(e, MR_ENOMEM, "rollout: out of memory (%d sequences, %d cache slots of %d tokens)", n_seq,
                     n_slots, cap);
        goto fail;
    }
    int32_t *pos = ids + Tm, *doc = ids + 2 * Tm;
    for (int l = 0, j = 0; l < L; l++)
        if (m->p.w.layers[l].is_moe) E.moe_layers[j++] = l;
    for (int i = 0; i < n_slots; i++) {
        float *base = E.cache + per * (size_t)i;
        E.slots[i] = (model_kv){.ckv = base, .kpe = base + (fc + 15) / 16 * 16, .cap = cap, .len = 0};
        E.free_slots[i] = n_slots - 1 - i; /* pop order: slot 0 first */
    }
    E.n_free = n_slots;
    for (int q = 0; q < n_seq; q++) {
        E.s[q].p = q / G;
        E.s[q].g = q % G;
        E.s[q].slot = -1;
    }
    int next_p = 0, n_live = 0;
    for (;;) {
        /* admit whole prompts while G slots are free: one packed prefill, then copy-on-start */
        while (next_p < n_prompts && E.n_free >= G) {
            int T = 0, np = 0, first = next_p;
            while (next_p < n_prompts && E.n_free - np * G >= G && T + plen[next_p] <= Tm) {
                const int p = next_p++;
                for (int j = 0; j < plen[p]; j++) {
                    ids[T + j] = prompts[p][j];
                    pos[T + j] = j;
                    doc[T + j] = T;
                }
                const int q0 = p * G;
                for (int g = 0; g < G; g++) E.s[q0 + g].slot = E.free_slots[--E.n_free];
                if (E.spec) mkvp[np] = &E.mslots[E.s[q0].slot];
                kvp[np++] = &E.slots[E.s[q0].slot];
                T += plen[p];
            }
            model_batch b = {.ids = ids, .pos = pos, .doc_start = doc, .T = T, .skip_mtp = 1};
            if ((rc = E.spec ? model_prefill_mtp(m, &b, kvp, mkvp, np, e) : model_prefill(m, &b, kvp, np, e)))
                goto fail;
            const size_t fl = (size_t)c->kv_lora_rank, kl = (size_t)c->qk_rope_head_dim;
            int n = 0, end = 0;
            for (int p = first; p < first + np; p++) {
                const model_kv *src = &E.slots[E.s[p * G].slot];
                end += plen[p];
                for (int g = 0; g < G; g++) {
                    const int q = p * G + g;
                    if (g > 0) {
                        model_kv *dst = &E.slots[E.s[q].slot];
                        /* layer l's prompt rows sit at l·cap in each (through the backend: device memory) */
                        m->be->copy2d(dst->ckv, (size_t)cap * fl, src->ckv, (size_t)cap * fl,
                                      (size_t)plen[p] * fl, (size_t)L);
                        m->be->copy2d(dst->kpe, (size_t)cap * kl, src->kpe, (size_t)cap * kl,
                                      (size_t)plen[p] * kl, (size_t)L);
                        dst->len = src->len;
                        if (E.spec) { /* the MTP cache's prompt rows too */
                            const model_kv *ms = &E.mslots[E.s[p * G].slot];
                            model_kv *md = &E.mslots[E.s[q].slot];
                            const size_t nc = (size_t)ms->len * fl, nk = (size_t)ms->len * kl;
                            m->be->copy2d(md->ckv, nc, ms->ckv, nc, nc, 1);
                            m->be->copy2d(md->kpe, nk, ms->kpe, nk, nk, 1);
                            md->len = ms->len;
                        }
                    }
                    E.row_seq[n] = q;
                    E.row_at[n] = end - 1;
                    n++;
                }
            }
            if ((rc = sample_rows(&E, n, e))) goto fail;
            int nd = 0;
            for (int i = 0; i < n; i++) {
                int r = take_row(&E, i);
                if (r < 0) {
                    rc = err_set(e, r, "rollout: out of memory for the outputs");
                    goto fail;
                }
                if (r != 0) continue;
                const int q = E.row_seq[i];
                live[n_live++] = q;
                E.s[q].has_draft = 0;
                if (E.spec && out[q].n + 2 <= o->max_new_tokens) { /* MTP row plen - 1 drafts token index 1 */
                    E.d_ids[nd] = E.s[q].next;
                    E.d_hrow[nd] = E.row_at[i];
                    E.d_off[nd] = 0;
                    E.d_kv[nd] = &E.mslots[E.s[q].slot];
                    E.d_seq[nd++] = q;
                }
            }
            if (E.spec && (rc = run_drafts(&E, nd, e))) goto fail;
        }
        if (n_live == 0) {
            if (next_p >= n_prompts) break;
            continue;
        }
        if (E.spec) {
            if ((rc = spec_step(&E, live, &n_live, ids, pos, kvp, e))) goto fail;
            continue;
        }
        /* one decode step over every live sample */
        for (int i = 0; i < n_live; i++) {
            const int q = live[i];
            ids[i] = E.s[q].next;
            kvp[i] = &E.slots[E.s[q].slot];
            E.row_seq[i] = q;
            E.row_at[i] = i;
        }
        if ((rc = model_decode_step(m, ids, kvp, n_live, e))) goto fail;
        E.st.decode_steps++;
        E.st.decode_rows += n_live;
        if ((rc = sample_rows(&E, n_live, e))) goto fail;
        int kept = 0;
        for (int i = 0; i < n_live; i++) {
            int r = take_row(&E, i);
            if (r < 0) {
                rc = err_set(e, r, "rollout: out of memory for the outputs");
                goto fail;
            }
            if (r == 0) live[kept++] = E.row_seq[i];
        }
        n_live = kept;
    }
    for (int q = 0; q < n_seq; q++) E.st.tokens += out[q].n;
    if (o->stats) *o->stats = E.st;
    rc = MR_OK;
    goto done;
fail:
    for (int q = 0; q < n_seq; q++) {
        rollout_seq_free(&out[q]);
        out[q].n_moe_layers = E.n_moe;
        out[q].K = E.K;
    }
done:
    if (E.s)
        for (int q = 0; q < n_seq; q++) mem_free(E.s[q].text);
    mem_free(E.s);
    engine_free(&E);
    mem_free(ids);
    mem_free(kvp);
    mem_free(live);
    return rc;
}
