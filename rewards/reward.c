/* reward.c: the recipe's weighted set of reward plugins, the worker pool that runs them, and the step counters.
 *
 * The one idea: a plugin call is a job with a deadline, and the set, not the plugin, has the last word on
 * time. Jobs live in a reference-counted batch and the plugins in a reference-counted core, so a worker that
 * overruns its deadline can be abandoned (scored TIMEOUT, replaced by a fresh worker) while it keeps running:
 * whatever it still reads stays alive until it returns, drops its result, frees its state and exits. */
#include "rewards/reward.h"

#include <errno.h>
#include <math.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "core/mem.h"


/* ---- small helpers ----------------------------------------------------------------------------------- */

const char *reward_status_name(reward_status s) {
    switch (s) {
    case REWARD_SCORE: return "score";
    case REWARD_UNSCORABLE: return "unscorable";
    case REWARD_ERROR: return "error";
    case REWARD_TIMEOUT: return "timeout";
    case REWARD_SKIPPED: return "skipped";
    }
    return "?";
}

reward_status reward_result_set(reward_result *r, reward_status st, double score, const char *fmt, ...) {
    r->status = st;
    r->score = st == REWARD_SCORE ? score : 0.0;
    r->reason[0] = '\0';
    if (fmt) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(r->reason, sizeof r->reason, fmt, ap);
        va_end(ap);
    }
    return st;
}

double reward_now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

double reward_overlong_penalty(int64_t len, int64_t max_len, int64_t buffer) {
    int64_t expected = max_len - buffer; /* L_max - L_cache */
    if (len <= expected) return 0.0;
    if (len <= max_len) return (double)(expected - len) / (double)buffer;
    return -1.0;
}

const char *reward_row_text(const cJSON *row, const char *field, char *buf, size_t cap) {
    if (!row || !field) return NULL;
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(row, field);
    if (!v || cJSON_IsNull(v)) return NULL;
    if (cJSON_IsString(v)) return v->valuestring;
    if (cJSON_IsNumber(v)) {
        double d = v->valuedouble;
        if (d == floor(d) && fabs(d) < 1e15)
            snprintf(buf, cap, "%.0f", d);
        else
            snprintf(buf, cap, "%.17g", d);
        return buf;
    }
    if (cJSON_IsBool(v)) {
        snprintf(buf, cap, "%s", cJSON_IsTrue(v) ? "true" : "false");
        return buf;
    }
    if (!cJSON_PrintPreallocated((cJSON *)v, buf, (int)(cap > 5 ? cap - 5 : 0), 0)) return NULL;
    return buf;
}

/* ---- the built-in overlong plugin (DAPO soft penalty, from grpo.overlong) --------------------------- */

typedef struct {
    int64_t max_len, buffer;
} overlong_impl;

static void overlong_score(const reward_plugin *p, void *ws, const reward_sample *s, double deadline,
                           reward_result *out, int *discard) {
    (void)ws, (void)deadline, (void)discard;
    const overlong_impl *o = p->impl;
    if (s->tokens <= 0 && !s->truncated) {
        reward_result_set(out, REWARD_SCORE, 0.0, "length unknown");
        return;
    }
    int64_t len = s->tokens > 0 ? s->tokens : o->max_len;
    reward_result_set(out, REWARD_SCORE, reward_overlong_penalty(len, o->max_len, o->buffer), NULL);
}

static void overlong_free(reward_plugin *p) { mem_free(p->impl); }

static const reward_plugin_ops overlong_ops = {
    .kind = "overlong", .init = NULL, .score = overlong_score, .free = overlong_free};

/* ---- the pool ---------------------------------------------------------------------------------------- */

enum { JOB_QUEUED, JOB_RUNNING, JOB_DONE, JOB_ABANDONED };

typedef struct worker worker;

typedef struct job {
    size_t plugin, sample;
    int state;
    double start;     /* when it began running */
    worker *w;        /* who runs it */
    reward_result res;
} job;

/* One reward_set_score call's work: a deep copy of the samples and the jobs. Referenced by the caller and by
 * every worker running one of its jobs. */
typedef struct batch {
    int refs;
    reward_sample *samples;
    size_t n_samples, cap_samples;
    job *jobs;       /* rule jobs, then the judge's (never reused while an abandoned worker holds the batch) */
    size_t cap_jobs, n_jobs, next, remaining;
} batch;

/* What outlives the set while an abandoned worker still runs: the plugins and the pool's lock. */
typedef struct core {
    pthread_mutex_t mu;
    pthread_cond_t work, done;
    int refs;
    int stop;
    batch *cur;
    reward_plugin *plugins;
    size_t n_plugins;
} core;

struct worker {
    core *c;
    pthread_t tid;
    int abandoned;
    job *running;
    batch *running_batch;
    void **wstate; /* (n_plugins) */
    int *wstate_ok;
};

static void batch_clear_samples(batch *b) {
    for (size_t i = 0; i < b->n_samples; i++) {
        mem_free((char *)b->samples[i].prompt);
        mem_free((char *)b->samples[i].completion);
        cJSON_Delete((cJSON *)b->samples[i].row);
    }
    b->n_samples = 0;
}

static void batch_unref(batch *b) { /* with the core lock held, or by its only owner */
    if (!b || --b->refs > 0) return;
    batch_clear_samples(b);
    mem_free(b->samples);
    mem_free(b->jobs);
    mem_free(b);
}

static void plugins_free(reward_plugin *ps, size_t n) {
    for (size_t i = 0; i < n; i++)
        if (ps[i].ops && ps[i].ops->free) ps[i].ops->free(&ps[i]);
    mem_free(ps);
}

/* Drops one reference (the lock is taken here); the last one frees the core and the plugins. */
static void core_unref(core *c) {
    pthread_mutex_lock(&c->mu);
    int last = --c->refs == 0;
    pthread_mutex_unlock(&c->mu);
    if (!last) return;
    plugins_free(c->plugins, c->n_plugins);
    pthread_cond_destroy(&c->work);
    pthread_cond_destroy(&c->done);
    pthread_mutex_destroy(&c->mu);
    mem_free(c);
}

static void worker_release_states(worker *w) {
    core *c = w->c;
    for (size_t i = 0; i < c->n_plugins; i++)
        if (w->wstate_ok[i] && c->plugins[i].ops->worker_free) c->plugins[i].ops->worker_free(&c->plugins[i], w->wstate[i]);
    mem_free(w->wstate);
    mem_free(w->wstate_ok);
}

static void run_job(worker *w, job *jb, const reward_sample *s, double deadline) {
    core *c = w->c;
    const reward_plugin *p = &c->plugins[jb->plugin];
    reward_result *r = &jb->res;
    memset(r, 0, sizeof *r);
    if (p->ops->worker_init && !w->wstate_ok[jb->plugin]) {
        mr_err e = {0};
        if (p->ops->worker_init(p, &w->wstate[jb->plugin], &e) != 0) {
            reward_result_set(r, REWARD_ERROR, 0, "%s", e.msg[0] ? e.msg : "worker state could not be created");
            r->seconds = reward_now() - jb->start;
            return;
        }
        w->wstate_ok[jb->plugin] = 1;
    }
    int discard = 0;
    p->ops->score(p, w->wstate[jb->plugin], s, deadline, r, &discard);
    r->seconds = reward_now() - jb->start;
    if (r->status == REWARD_SCORE && !isfinite(r->score))
        reward_result_set(r, REWARD_ERROR, 0, "non-finite score %g", r->score);
    if (discard && w->wstate_ok[jb->plugin]) {
        if (p->ops->worker_free) p->ops->worker_free(p, w->wstate[jb->plugin]);
        w->wstate[jb->plugin] = NULL;
        w->wstate_ok[jb->plugin] = 0;
    }
}

static void *worker_main(void *arg) {
    worker *w = arg;
    core *c = w->c;
    pthread_mutex_lock(&c->mu);
    for (;;) {
        if (c->stop || w->abandoned) break;
        batch *b = c->cur;
        if (!b || b->next >= b->n_jobs) {
            pthread_cond_wait(&c->work, &c->mu);
            continue;
        }
        job *jb = &b->jobs[b->next++];
        jb->state = JOB_RUNNING;
        jb->w = w;
        jb->start = reward_now();
        w->running = jb;
        w->running_batch = b;
        b->refs++;
        double deadline = jb->start + c->plugins[jb->plugin].timeout_s;
        const reward_sample *s = &b->samples[jb->sample];
        pthread_mutex_unlock(&c->mu);

        run_job(w, jb, s, deadline);

        pthread_mutex_lock(&c->mu);
        w->running = NULL;
        w->running_batch = NULL;
        if (!w->abandoned) {
            jb->state = JOB_DONE;
            if (--b->remaining == 0) pthread_cond_broadcast(&c->done);
        }
        batch_unref(b);
    }
    int abandoned = w->abandoned;
    pthread_mutex_unlock(&c->mu);
    if (abandoned) { /* nobody joins an abandoned worker: it cleans up after itself */
        worker_release_states(w);
        mem_free(w);
        core_unref(c);
    }
    return NULL;
}

/* ---- the set ----------------------------------------------------------------------------------------- */

typedef struct pstats {
    int64_t n, scored, unscorable, errors, timeouts;
    double sum, sumsq;
} pstats;

struct reward_set {
    core *c;
    worker **workers; /* the live ones, joined at free */
    size_t n_workers, cap_workers;
    pstats *stats;
    int has_fallback;
    /* Kept between reward_set_score calls so a step does not page-fault megabytes of fresh buffers in: the last
     * batch when no abandoned worker still holds it, and the per-plugin results when the caller passes none. */
    batch *spare;
    reward_result *scratch;
    size_t cap_scratch;
};

static int spawn_worker(reward_set *s, mr_err *e) {
    core *c = s->c;
    if (s->n_workers == s->cap_workers) {
        size_t cap = s->cap_workers ? 2 * s->cap_workers : 8;
        worker **nw = mem_realloc(s->workers, cap * sizeof *nw);
        if (!nw) return err_set(e, MR_ENOMEM, "reward pool: out of memory");
        s->workers = nw;
        s->cap_workers = cap;
    }
    worker *w = mem_calloc(1, sizeof *w);
    if (!w) return err_set(e, MR_ENOMEM, "reward pool: out of memory");
    w->c = c;
    w->wstate = mem_calloc(c->n_plugins ? c->n_plugins : 1, sizeof *w->wstate);
    w->wstate_ok = mem_calloc(c->n_plugins ? c->n_plugins : 1, sizeof *w->wstate_ok);
    if (!w->wstate || !w->wstate_ok) {
        mem_free(w->wstate);
        mem_free(w->wstate_ok);
        mem_free(w);
        return err_set(e, MR_ENOMEM, "reward pool: out of memory");
    }
    pthread_mutex_lock(&c->mu);
    c->refs++;
    pthread_mutex_unlock(&c->mu);
    int rc = pthread_create(&w->tid, NULL, worker_main, w);
    if (rc != 0) {
        pthread_mutex_lock(&c->mu);
        c->refs--;
        pthread_mutex_unlock(&c->mu);
        mem_free(w->wstate);
        mem_free(w->wstate_ok);
        mem_free(w);
        return err_set(e, MR_EINTERNAL, "reward pool: pthread_create failed: %s", strerror(rc));
    }
    s->workers[s->n_workers++] = w;
    return 0;
}

static const reward_plugin_ops *kind_ops(const char *kind) {
    if (!strcmp(kind, "math")) return &reward_math_ops;
    if (!strcmp(kind, "format")) return &reward_format_ops;
    if (!strcmp(kind, "lua")) return &reward_lua_ops;
    if (!strcmp(kind, "toolcall")) return &reward_toolcall_ops;
    if (!strcmp(kind, "judge")) return &reward_judge_ops;
    if (!strcmp(kind, "code")) return &reward_code_ops;
    return NULL;
}

static int build_plugins(reward_set *s, const recipe *r, mr_err *e) {
    core *c = s->c;
    size_t n = recipe_list_len(r, "rewards");
    int soft = !strcmp(recipe_str(r, "grpo.overlong.mode"), "soft_penalty");
    c->plugins = mem_calloc(n + 1, sizeof *c->plugins);
    if (!c->plugins) return err_set(e, MR_ENOMEM, "rewards: out of memory");
    /* Paths in the recipe are relative to its folder. */
    char dir[1024] = ".";
    const char *src = recipe_source(r);
    const char *slash = src ? strrchr(src, '/') : NULL;
    if (slash) snprintf(dir, sizeof dir, "%.*s", (int)(slash - src), src);
    if (slash == src) snprintf(dir, sizeof dir, "/");
    for (size_t i = 0; i < n; i++) {
        char item[64], path[128];
        snprintf(item, sizeof item, "rewards[%zu]", i);
        const char *kind = recipe_oneof(r, item);
        reward_plugin *p = &c->plugins[i];
        const reward_plugin_ops *ops = kind ? kind_ops(kind) : NULL;
        if (!ops)
            return err_set(e, MR_EINVAL, "%s: %s: the %s reward plugin is not built into this moerl",
                           recipe_source(r), item, kind ? kind : "(none)");
        snprintf(path, sizeof path, "%s.name", item);
        const char *name = recipe_str(r, path);
        snprintf(p->name, sizeof p->name, "%s", name && name[0] ? name : kind);
        snprintf(path, sizeof path, "%s.weight", item);
        p->weight = recipe_float(r, path);
        snprintf(path, sizeof path, "%s.timeout_s", item);
        p->timeout_s = recipe_float(r, path);
        if (!strcmp(kind, "judge")) {
            snprintf(path, sizeof path, "%s.judge.fallback_only", item);
            p->fallback = recipe_bool(r, path);
        }
        c->n_plugins = i + 1;
        int rc = ops->init(p, r, item, dir, e);
        p->ops = ops; /* set after init so free() sees the half-built impl either way */
        if (rc != 0) return err_prefix(e, "%s: %s (%s)", recipe_source(r), item, kind);
        if (p->fallback) {
            if (s->has_fallback)
                return err_set(e, MR_EINVAL, "%s: %s: only one judge may be fallback_only", recipe_source(r), item);
            s->has_fallback = 1;
        }
    }
    if (soft) {
        reward_plugin *p = &c->plugins[n];
        overlong_impl *o = mem_calloc(1, sizeof *o);
        if (!o) return err_set(e, MR_ENOMEM, "rewards: out of memory");
        o->max_len = recipe_int(r, "rollout.max_new_tokens");
        o->buffer = recipe_int(r, "grpo.overlong.buffer");
        if (o->buffer > o->max_len) o->buffer = o->max_len;
        p->ops = &overlong_ops;
        p->impl = o;
        snprintf(p->name, sizeof p->name, "overlong");
        p->weight = 1.0;
        p->timeout_s = 1.0;
        c->n_plugins = n + 1;
    }
    return 0;
}

int reward_set_init(reward_set **out, const recipe *r, const reward_set_opts *opts, mr_err *e) {
    *out = NULL;
    reward_set *s = mem_calloc(1, sizeof *s);
    core *c = mem_calloc(1, sizeof *c);
    if (!s || !c) {
        mem_free(s);
        mem_free(c);
        return err_set(e, MR_ENOMEM, "rewards: out of memory");
    }
    pthread_mutex_init(&c->mu, NULL);
    pthread_cond_init(&c->work, NULL);
    pthread_cond_init(&c->done, NULL);
    c->refs = 1;
    s->c = c;
    int rc = build_plugins(s, r, e);
    if (rc != 0) goto fail;
    s->stats = mem_calloc(c->n_plugins ? c->n_plugins : 1, sizeof *s->stats);
    if (!s->stats) {
        rc = err_set(e, MR_ENOMEM, "rewards: out of memory");
        goto fail;
    }
    long nw = opts && opts->workers > 0 ? opts->workers : sysconf(_SC_NPROCESSORS_ONLN);
    if (nw < 1) nw = 1;
    if (nw > 256) nw = 256;
    for (long i = 0; i < nw; i++)
        if ((rc = spawn_worker(s, e)) != 0) goto fail;
    *out = s;
    return 0;
fail:
    reward_set_free(s);
    return rc;
}

void reward_set_free(reward_set *s) {
    if (!s) return;
    core *c = s->c;
    pthread_mutex_lock(&c->mu);
    c->stop = 1;
    pthread_cond_broadcast(&c->work);
    pthread_mutex_unlock(&c->mu);
    for (size_t i = 0; i < s->n_workers; i++) {
        worker *w = s->workers[i];
        pthread_join(w->tid, NULL);
        worker_release_states(w);
        mem_free(w);
        core_unref(c);
    }
    mem_free(s->workers);
    mem_free(s->stats);
    batch_unref(s->spare); /* the workers are joined: nobody else holds it */
    mem_free(s->scratch);
    core_unref(c); /* the set's own reference: abandoned workers may hold the rest */
    mem_free(s);
}

size_t reward_set_count(const reward_set *s) { return s->c->n_plugins; }
const reward_plugin *reward_set_plugin(const reward_set *s, size_t i) {
    return i < s->c->n_plugins ? &s->c->plugins[i] : NULL;
}

/* Deep copy of the samples that abandoned workers may still read after the caller has freed its own. The
 * set's spare batch is reused when it is large enough. */
static int batch_new(reward_set *s, batch **out, const reward_sample *samples, size_t n, size_t n_jobs) {
    batch *b = s->spare;
    s->spare = NULL;
    if (b && (b->cap_samples < n || b->cap_jobs < n_jobs)) {
        batch_unref(b);
        b = NULL;
    }
    if (!b) {
        b = mem_calloc(1, sizeof *b);
        if (!b) return MR_ENOMEM;
        b->refs = 1;
        b->samples = mem_calloc(n ? n : 1, sizeof *b->samples);
        b->jobs = mem_calloc(n_jobs ? n_jobs : 1, sizeof *b->jobs);
        b->cap_jobs = n_jobs;
        b->cap_samples = n;
        if (!b->samples || !b->jobs) goto fail;
    }
    b->n_jobs = b->next = b->remaining = 0;
    memset(b->samples, 0, n * sizeof *b->samples);
    b->n_samples = n;
    for (size_t i = 0; i < n; i++) {
        reward_sample *d = &b->samples[i];
        d->tokens = samples[i].tokens;
        d->truncated = samples[i].truncated;
        d->prompt = mem_strdup(samples[i].prompt ? samples[i].prompt : "");
        d->completion = mem_strdup(samples[i].completion ? samples[i].completion : "");
        if (samples[i].row) d->row = cJSON_Duplicate(samples[i].row, 1);
        if (!d->prompt || !d->completion || (samples[i].row && !d->row)) goto fail;
    }
    *out = b;
    return 0;
fail:
    batch_unref(b);
    return MR_ENOMEM;
}

/* Runs the batch's jobs on the pool and waits, abandoning workers past deadline + 10%. */
static int run_batch(reward_set *s, batch *b, size_t first, size_t end, mr_err *e) {
    core *c = s->c;
    int rc = 0;
    pthread_mutex_lock(&c->mu);
    b->remaining = end - first;
    b->next = first;
    b->n_jobs = end;
    c->cur = b;
    pthread_cond_broadcast(&c->work);
    while (b->remaining > 0) {
        double now = reward_now(), wake = now + 0.05;
        for (size_t i = 0; i < s->n_workers; i++) {
            worker *w = s->workers[i];
            job *jb = w->running;
            if (!jb || w->running_batch != b) continue;
            double lim = c->plugins[jb->plugin].timeout_s;
            double hard = jb->start + lim * 1.1;
            if (now < hard) {
                if (hard < wake) wake = hard;
                continue;
            }
            /* Past its limit: the job is TIMEOUT, the worker is left to finish alone, a fresh one replaces it. */
            jb->state = JOB_ABANDONED;
            w->abandoned = 1;
            b->remaining--;
            s->workers[i] = s->workers[--s->n_workers];
            i--;
            pthread_detach(w->tid);
            pthread_mutex_unlock(&c->mu);
            int src = spawn_worker(s, e);
            pthread_mutex_lock(&c->mu);
            if (src != 0 && s->n_workers == 0) {
                rc = src;
                goto out;
            }
        }
        if (b->remaining == 0) break;
        struct timespec ts;
        clock_gettime(CLOCK_REALTIME, &ts);
        double dt = wake - reward_now();
        if (dt < 0.001) dt = 0.001;
        long long ns = ts.tv_nsec + (long long)(dt * 1e9);
        ts.tv_sec += (time_t)(ns / 1000000000LL);
        ts.tv_nsec = (long)(ns % 1000000000LL);
        pthread_cond_timedwait(&c->done, &c->mu, &ts);
    }
out:
    c->cur = NULL;
    pthread_mutex_unlock(&c->mu);
    return rc;
}

/* Copies job results out; an abandoned job reads as TIMEOUT. */
static void collect(const reward_set *s, const batch *b, size_t first, size_t end, reward_result *res /* (n, np) */) {
    size_t np = s->c->n_plugins;
    for (size_t j = first; j < end; j++) {
        const job *jb = &b->jobs[j];
        reward_result *r = &res[jb->sample * np + jb->plugin];
        if (jb->state == JOB_DONE) {
            *r = jb->res;
        } else {
            double lim = s->c->plugins[jb->plugin].timeout_s;
            reward_result_set(r, REWARD_TIMEOUT, 0, "timeout %.1f s", lim);
            r->seconds = lim * 1.1;
        }
    }
}

static void count(pstats *st, const reward_result *r) {
    if (r->status == REWARD_SKIPPED) return;
    st->n++;
    switch (r->status) {
    case REWARD_SCORE:
        st->scored++;
        st->sum += r->score;
        st->sumsq += r->score * r->score;
        break;
    case REWARD_UNSCORABLE: st->unscorable++; break;
    case REWARD_ERROR: st->errors++; break;
    case REWARD_TIMEOUT: st->timeouts++; break;
    case REWARD_SKIPPED: break;
    }
}

int reward_set_score(reward_set *s, const reward_sample *samples, size_t n, reward_result *per_plugin,
                     reward_outcome *out, mr_err *e) {
    core *c = s->c;
    size_t np = c->n_plugins, nrule = 0;
    if (n == 0) return 0;
    size_t cells;
    if (size_mul(n, np ? np : 1, &cells) != 0) return err_set(e, MR_ERANGE, "rewards: batch too large");
    reward_result *res = per_plugin;
    if (!res) {
        if (s->cap_scratch < cells) {
            mem_free(s->scratch);
            s->cap_scratch = 0;
            if (!(s->scratch = mem_alloc(cells * sizeof *s->scratch))) return err_set(e, MR_ENOMEM, "rewards: out of memory");
            s->cap_scratch = cells;
        }
        res = s->scratch;
    }
    memset(res, 0, cells * sizeof *res);
    for (size_t p = 0; p < np; p++)
        if (!c->plugins[p].fallback) nrule++;
    batch *b = NULL;
    int rc = batch_new(s, &b, samples, n, n * (nrule + 1));
    if (rc != 0) {
        rc = err_set(e, rc, "rewards: out of memory for a batch of %zu samples", n);
        goto done;
    }
    /* Jobs sample-major so one slow sample does not hold every plugin of the batch behind it. */
    size_t j = 0;
    for (size_t i = 0; i < n; i++)
        for (size_t p = 0; p < np; p++)
            if (!c->plugins[p].fallback) b->jobs[j++] = (job){.plugin = p, .sample = i};
    size_t nrulejobs = j;
    if ((rc = run_batch(s, b, 0, nrulejobs, e)) != 0) goto done;
    collect(s, b, 0, nrulejobs, res);

    /* The fallback judge: asked only where a rule plugin was unscorable and none failed outright. */
    if (s->has_fallback) {
        size_t pj = 0;
        while (!c->plugins[pj].fallback) pj++;
        size_t nask = 0;
        for (size_t i = 0; i < n; i++) {
            int unscorable = 0, failed = 0;
            for (size_t p = 0; p < np; p++) {
                if (p == pj) continue;
                reward_status st = res[i * np + p].status;
                unscorable |= st == REWARD_UNSCORABLE;
                failed |= st == REWARD_ERROR || st == REWARD_TIMEOUT;
            }
            if (unscorable && !failed) nask++;
            else reward_result_set(&res[i * np + pj], REWARD_SKIPPED, 0, "not asked: the rule plugins decided");
        }
        if (nask > 0) {
            size_t end = nrulejobs;
            for (size_t i = 0; i < n; i++)
                if (res[i * np + pj].status != REWARD_SKIPPED) b->jobs[end++] = (job){.plugin = pj, .sample = i};
            if ((rc = run_batch(s, b, nrulejobs, end, e)) != 0) goto done;
            collect(s, b, nrulejobs, end, res);
        }
    }

    for (size_t i = 0; i < n; i++) {
        reward_outcome *o = &out[i];
        memset(o, 0, sizeof *o);
        const reward_result *judge = NULL;
        for (size_t p = 0; p < np; p++) {
            const reward_result *r = &res[i * np + p];
            count(&s->stats[p], r);
            o->seconds += r->seconds;
            if (c->plugins[p].fallback && r->status != REWARD_SKIPPED) judge = r;
        }
        o->status = REWARD_SCORE;
        /* Failures first (error, timeout), then unscorable, each reported by the first plugin in recipe order. */
        for (int pass = 0; pass < 2 && o->status == REWARD_SCORE; pass++)
            for (size_t p = 0; p < np; p++) {
                const reward_result *r = &res[i * np + p];
                if (c->plugins[p].fallback) continue;
                int hit = pass == 0 ? (r->status == REWARD_ERROR || r->status == REWARD_TIMEOUT)
                                    : r->status == REWARD_UNSCORABLE;
                if (!hit) continue;
                if (pass == 1 && judge) continue; /* the judge was asked: its verdict decides, below */
                o->status = r->status;
                snprintf(o->reason, sizeof o->reason, "%s: %.190s", c->plugins[p].name, r->reason);
                break;
            }
        if (o->status == REWARD_SCORE && judge && judge->status != REWARD_SCORE) {
            o->status = judge->status;
            for (size_t p = 0; p < np; p++)
                if (c->plugins[p].fallback) snprintf(o->reason, sizeof o->reason, "%s: %.190s", c->plugins[p].name, judge->reason);
        }
        if (o->status != REWARD_SCORE) continue;
        double total = 0;
        for (size_t p = 0; p < np; p++) {
            const reward_result *r = &res[i * np + p];
            if (c->plugins[p].fallback) continue;
            double sc = r->status == REWARD_SCORE ? r->score : judge->score; /* unscorable: the judge's verdict */
            total += c->plugins[p].weight * sc;
        }
        o->total = total;
    }
done:
    if (b) {
        pthread_mutex_lock(&c->mu);
        if (b->refs == 1 && rc == 0) { /* no abandoned worker holds it: keep it for the next call */
            batch_clear_samples(b);
            s->spare = b;
        } else {
            batch_unref(b);
        }
        pthread_mutex_unlock(&c->mu);
    }
    return rc;
}

/* ---- counters ---------------------------------------------------------------------------------------- */

void reward_set_stats(const reward_set *s, size_t i, reward_stats *out) {
    memset(out, 0, sizeof *out);
    if (i >= s->c->n_plugins) return;
    const pstats *st = &s->stats[i];
    out->n = st->n;
    out->scored = st->scored;
    out->unscorable = st->unscorable;
    out->errors = st->errors;
    out->timeouts = st->timeouts;
    if (st->scored > 0) {
        out->mean = st->sum / (double)st->scored;
        double var = st->sumsq / (double)st->scored - out->mean * out->mean;
        out->std = var > 0 ? sqrt(var) : 0.0;
    }
    if (st->n > 0) {
        out->unscorable_rate = (double)st->unscorable / (double)st->n;
        out->error_rate = (double)st->errors / (double)st->n;
        out->timeout_rate = (double)st->timeouts / (double)st->n;
    }
}

void reward_set_reset_stats(reward_set *s) { memset(s->stats, 0, s->c->n_plugins * sizeof *s->stats); }

void reward_set_metrics(const reward_set *s, void (*emit)(const char *name, double value, void *ctx), void *ctx) {
    for (size_t i = 0; i < s->c->n_plugins; i++) {
        reward_stats st;
        reward_set_stats(s, i, &st);
        const char *nm = s->c->plugins[i].name;
        char key[128];
        const struct {
            const char *k;
            double v;
        } m[] = {{"mean", st.mean}, {"std", st.std}, {"unscorable_rate", st.unscorable_rate},
                 {"error_rate", st.error_rate}, {"timeout_rate", st.timeout_rate}};
        for (size_t k = 0; k < sizeof m / sizeof m[0]; k++) {
            snprintf(key, sizeof key, "reward/%s/%s", nm, m[k].k);
            emit(key, m[k].v, ctx);
        }
    }
}
