/* trainer.c: the GRPO job (see trainer.h). Reuses SFT's optimizer, schedule, checkpoints and epoch order. */
#include "grpo/trainer.h"

#include <cjson/cJSON.h>
#include <math.h>
#include <omp.h>
#include <stdio.h>
#include <string.h>
#include <sys/resource.h>
#include <unistd.h>

#include "core/mem.h"
#include "core/sha256.h"
#include "core/progress.h"
#include "core/rng.h"
#include "core/runstore.h"
#include "kernels/backend.h"
#include "kernels/cpu/dense.h"
#include "kernels/cpu/moe.h"
#include "model/model.h"
#include "model/setup.h"
#include "rewards/reward.h"
#include "rollout/rollout.h"
#include "sft/checkpoint.h"
#include "sft/data_setup.h"
#include "sft/trainer.h"

#define STREAM_PROMPTS 0x47525045ull /* "GRPE": the prompt order, per epoch */
#define STREAM_ROLLOUT 0x47525052ull /* "GRPR": a rollout round's seed */
#define STREAM_EVAL 0x47525056ull    /* "GRPV": eval rollouts */

/* ------------------------------------------------------------------------------------------- config */

int grpo_cfg_from_recipe(grpo_cfg *c, const recipe *r, mr_err *e) {
    memset(c, 0, sizeof *c);
    c->seed = (uint64_t)recipe_int(r, "run.seed");
    c->steps = recipe_int(r, "grpo.steps");
    c->P = (int)recipe_int(r, "grpo.prompts_per_step");
    c->G = (int)recipe_int(r, "grpo.num_generations");
    c->M = (int)recipe_int(r, "grpo.mini_batches_per_step");
    c->mu = (int)recipe_int(r, "grpo.mu");
    c->micro_batch_tokens = (int)recipe_int(r, "grpo.micro_batch_tokens");
    c->max_new_tokens = (int)recipe_int(r, "rollout.max_new_tokens");
    c->temperature = (float)recipe_float(r, "rollout.temperature");
    c->top_p = (float)recipe_float(r, "rollout.top_p");
    c->top_k = (int)recipe_int(r, "rollout.top_k");
    c->min_p = (float)recipe_float(r, "rollout.min_p");
    c->overlong_mode = recipe_enum(r, "grpo.overlong.mode");
    c->adv = (adv_opts){.scale = (adv_scale)recipe_enum(r, "grpo.scale_rewards"), .eps = ADV_EPS,
                        .mask_truncated = c->overlong_mode == 1};
    c->loss = (grpo_loss_cfg){.eps_low = recipe_float(r, "grpo.eps_low"), .eps_high = recipe_float(r, "grpo.eps_high"),
                              .dual_clip = recipe_float(r, "grpo.dual_clip"),
                              .seq_ratio = recipe_enum(r, "grpo.ratio_level") == 1,
                              .agg = (grpo_agg)recipe_enum(r, "grpo.loss_agg"), .beta = recipe_float(r, "grpo.beta"),
                              .kl = (grpo_kl)recipe_enum(r, "grpo.kl_estimator"),
                              .tis = (grpo_tis)recipe_enum(r, "grpo.tis.mode"), .tis_cap = recipe_float(r, "grpo.tis.cap"),
                              .max_completion_tokens = c->max_new_tokens};
    c->entropy_coef = recipe_float(r, "grpo.entropy_coef");
    c->routing_replay = recipe_bool(r, "grpo.routing_replay");
    c->dynamic_sampling = recipe_bool(r, "grpo.dynamic_sampling.enabled");
    c->max_extra_rounds = (int)recipe_int(r, "grpo.dynamic_sampling.max_extra_rounds");
    c->adam = (adamw_cfg){.beta1 = recipe_float(r, "optim.betas[0]"), .beta2 = recipe_float(r, "optim.betas[1]"),
                          .eps = recipe_float(r, "optim.eps"), .weight_decay = recipe_float(r, "optim.weight_decay")};
    c->sched = (sched_cfg){.lr = recipe_is_set(r, "grpo.lr") ? recipe_float(r, "grpo.lr") : recipe_float(r, "optim.lr"),
                           .warmup_steps = recipe_int(r, recipe_is_set(r, "grpo.warmup_steps") ? "grpo.warmup_steps"
                                                                                                 : "optim.warmup_steps"),
                           .total_steps = c->steps,
                           .min_lr_ratio = recipe_float(r, "optim.min_lr_ratio")};
    int rc = sched_kind_parse(recipe_str(r, recipe_is_set(r, "grpo.schedule") ? "grpo.schedule" : "optim.schedule"),
                              &c->sched.kind, e);
    if (rc) return rc;
    c->grad_clip = recipe_float(r, "optim.grad_clip");
    c->bias_gamma = (float)recipe_float(r, "grpo.bias_update_speed");
    c->checkpoint_every = recipe_int(r, "run.checkpoint_every");
    c->keep_checkpoints = (int)recipe_int(r, "run.keep_checkpoints");
    c->eval_every = recipe_int(r, "grpo.eval_every");
    c->max_bad_steps = 5;
    c->eval_rows = (int)(recipe_int(r, "data.eval_n") < 200 ? recipe_int(r, "data.eval_n") : 200);

    /* combinations the schema's ranges cannot see (the recipe's own cross checks ran in recipe_resolve) */
    if (recipe_list_len(r, "rewards") == 0)
        return err_set(e, MR_EINVAL, "%s: rewards: GRPO needs at least one reward plugin, got none", recipe_source(r));
    if (c->temperature == 0)
        return err_set(e, MR_EINVAL,
                       "%s: rollout.temperature: 0 (greedy) makes the grpo.num_generations samples of a prompt "
                       "identical, so every advantage is 0; expected a number > 0",
                       recipe_source(r));
    if (c->loss.seq_ratio && (c->loss.eps_low > 0.01 || c->loss.eps_high > 0.01))
        fprintf(stderr, "grpo: note: ratio_level sequence (GSPO) usually takes eps_low/eps_high near 3e-4/4e-4, "
                        "got %g/%g\n", c->loss.eps_low, c->loss.eps_high);
    if (c->dynamic_sampling && c->max_extra_rounds == 0)
        return err_set(e, MR_EINVAL,
                       "%s: grpo.dynamic_sampling.max_extra_rounds: 0 with grpo.dynamic_sampling.enabled would only "
                       "drop groups and never refill the step; expected an integer >= 1",
                       recipe_source(r));
    if ((rc = sched_validate(&c->sched, e))) return err_prefix(e, "%s", recipe_source(r));
    return MR_OK;
}

void grpo_cfg_describe(const grpo_cfg *c, char *buf, size_t cap) {
    int per_mb = c->P * c->G / c->M;
    snprintf(buf, cap,
             "grpo: %lld steps; per step %d prompts x %d samples = %d samples (%d tokens max each), "
             "%d policy iteration%s x %d mini-batch%s of %d samples = %d optimizer updates per step; "
             "micro-batches of <= %d tokens; loss %s, scale %s, clip [%g, %g]%s, beta %g%s; lr %g\n",
             (long long)c->steps, c->P, c->G, c->P * c->G, c->max_new_tokens, c->mu, c->mu > 1 ? "s" : "", c->M,
             c->M > 1 ? "es" : "", per_mb, c->mu * c->M, c->micro_batch_tokens, grpo_agg_name(c->loss.agg),
             c->adv.scale == ADV_SCALE_GROUP ? "group" : c->adv.scale == ADV_SCALE_BATCH ? "batch" : "none",
             1 - c->loss.eps_low, 1 + c->loss.eps_high, c->loss.seq_ratio ? " per sequence (GSPO)" : "",
             c->loss.beta, c->loss.beta > 0 ? " (reference model loaded)" : " (no reference model)", c->sched.lr);
}

/* ------------------------------------------------------------------------------------------- the job */

typedef struct sample {
    int prompt;              /* index into the prompt side */
    rollout_seq seq;
    char *text;              /* decoded completion */
    reward_outcome out;
    reward_result *pp;       /* (n_plugins) */
    float adv;
    uint8_t scored, in_loss;
    float *lp_ref, *lp_old;  /* (seq.n) reference / trainer-recomputed old log-probs, or NULL */
    int32_t *route;          /* (prompt + seq.n rows, n_moe, K) experts the policy forwards replay, or NULL */
} sample;

typedef struct state {
    int64_t step, epoch, index, skipped, bad_in_row, run_id;
} state;

typedef struct job {
    const recipe *r;
    grpo_cfg c;
    rl_data D;
    model m, ref;
    int has_ref;
    reward_set *rw;
    runstore *rs;
    adamw opt;
    state st;
    size_t *order;           /* prompt order of st.epoch */
    int64_t order_epoch;
    int T_cap;               /* tokens per micro-batch */
    const char **stop;
    int n_stop;
    /* the step */
    sample *S;
    int nS, capS;
    int64_t *load_sum;
    /* metrics */
    const char *names[512];
    double values[512];
    char store[512][80];
    size_t n_metrics;
    /* routing replay */
    int n_moe, K;            /* MoE layers of the main model, experts per token */
    int *moe_layers;         /* (n_moe) their layer indices, ascending */
    const int32_t **replay;  /* (n_layers + MTP depths) model_batch.replay of the current micro-batch */
    int32_t *replay_buf;     /* (n_moe, T_cap, K) */
    int iteration;           /* policy iteration of the current update (the probe) */
} job;

static grpo_probe_fn probe_fn;
static void *probe_ctx;

void grpo_set_probe(grpo_probe_fn fn, void *ctx) {
    probe_fn = fn;
    probe_ctx = ctx;
}

static void put(job *J, const char *name, double v) {
    if (J->n_metrics >= 512) return;
    snprintf(J->store[J->n_metrics], sizeof J->store[0], "%s", name);
    J->names[J->n_metrics] = J->store[J->n_metrics];
    J->values[J->n_metrics++] = v;
}

static void emit_metric(const char *name, double value, void *ctx) { put(ctx, name, value); }

static void sample_clear(sample *s) {
    rollout_seq_free(&s->seq);
    mem_free(s->text);
    mem_free(s->pp);
    mem_free(s->lp_ref);
    mem_free(s->lp_old);
    mem_free(s->route);
    memset(s, 0, sizeof *s);
}

static void clear_samples(job *J) {
    for (int i = 0; i < J->nS; i++) sample_clear(&J->S[i]);
    J->nS = 0;
}

/* The next prompt of the cursor: a new epoch reshuffles. */
static int next_prompt(job *J) {
    if (J->st.index >= (int64_t)J->D.n_train) {
        J->st.epoch++;
        J->st.index = 0;
    }
    if (J->order_epoch != J->st.epoch) {
        sft_epoch_order(J->order, J->D.n_train, J->c.seed ^ STREAM_PROMPTS, J->st.epoch);
        J->order_epoch = J->st.epoch;
    }
    return (int)J->order[J->st.index++];
}

static int grow_samples(job *J, int n, mr_err *e) {
    if (J->nS + n <= J->capS) return MR_OK;
    int cap = J->capS ? J->capS : 64;
    while (cap < J->nS + n) cap *= 2;
    sample *s = mem_realloc(J->S, (size_t)cap * sizeof *s);
    if (!s) return err_set(e, MR_ENOMEM, "grpo: out of memory for %d samples", cap);
    memset(s + J->capS, 0, (size_t)(cap - J->capS) * sizeof *s);
    J->S = s;
    J->capS = cap;
    return MR_OK;
}

/* Generates G samples for each of the n prompts pidx[] into out[] and scores them. */
static int generate_and_score(job *J, const rl_prompt *side, const int *pidx, int n, int G, const rollout_opts *o,
                              sample *out, double *t_roll, double *t_rew, mr_err *e) {
    int rc = MR_OK;
    const int32_t **pr = mem_alloc((size_t)n * sizeof *pr);
    int *pl = mem_alloc((size_t)n * sizeof *pl);
    int64_t *pid = mem_alloc((size_t)n * sizeof *pid);
    rollout_seq *seqs = mem_calloc((size_t)n * G, sizeof *seqs);
    reward_sample *rs = mem_calloc((size_t)n * G, sizeof *rs);
    size_t np = reward_set_count(J->rw);
    reward_result *pp = mem_calloc((size_t)n * G * np, sizeof *pp);
    reward_outcome *oc = mem_calloc((size_t)n * G, sizeof *oc);
    if (!pr || !pl || !pid || !seqs || !rs || !pp || !oc) {
        rc = err_set(e, MR_ENOMEM, "grpo: out of memory");
        goto done;
    }
    for (int i = 0; i < n; i++) {
        pr[i] = side[pidx[i]].ids;
        pl[i] = side[pidx[i]].n;
        pid[i] = pidx[i];
    }
    double t0 = progress_now();
    rc = rollout_generate(&J->m, J->D.tok, pr, pl, pid, n, G, o, seqs, e);
    *t_roll += progress_now() - t0;
    if (rc) goto done;
    for (int i = 0; i < n * G; i++) {
        sample *s = &out[i];
        s->prompt = pidx[i / G];
        s->seq = seqs[i];
        memset(&seqs[i], 0, sizeof seqs[i]);
        size_t len;
        if ((rc = tok_decode(J->D.tok, s->seq.tokens, (size_t)s->seq.n, 1, &s->text, &len, e))) goto done;
        const rl_prompt *p = &side[s->prompt];
        rs[i] = (reward_sample){.prompt = p->text, .completion = s->text, .row = p->row, .tokens = s->seq.n,
                                .truncated = s->seq.truncated};
    }
    t0 = progress_now();
    rc = reward_set_score(J->rw, rs, (size_t)n * G, pp, oc, e);
    *t_rew += progress_now() - t0;
    if (rc) goto done;
    for (int i = 0; i < n * G; i++) {
        sample *s = &out[i];
        s->out = oc[i];
        s->scored = oc[i].status == REWARD_SCORE;
        if (!(s->pp = mem_alloc((np ? np : 1) * sizeof *s->pp))) {
            rc = err_set(e, MR_ENOMEM, "grpo: out of memory");
            goto done;
        }
        memcpy(s->pp, pp + (size_t)i * np, np * sizeof *s->pp);
    }
done:
    for (int i = 0; seqs && i < n * G; i++) rollout_seq_free(&seqs[i]);
    mem_free(pr);
    mem_free(pl);
    mem_free(pid);
    mem_free(seqs);
    mem_free(rs);
    mem_free(pp);
    mem_free(oc);
    return rc;
}

static rollout_opts rollout_options(const job *J, uint64_t seed) {
    rollout_opts o = rollout_opts_default();
    o.temperature = J->c.temperature;
    o.top_p = J->c.top_p;
    o.top_k = J->c.top_k;
    o.min_p = J->c.min_p;
    o.max_new_tokens = J->c.max_new_tokens;
    o.stop = J->stop;
    o.n_stop = J->n_stop;
    o.eos = tok_eos_id(J->D.tok);
    o.seed = seed;
    return o;
}

/* ------------------------------------------------------------------------------------- micro-batches */

typedef struct micro {
    int32_t *ids, *pos, *doc, *tgt; /* (T) */
    float *lp, *coef;               /* (T) */
    int T, cap;
    int first, count;               /* samples J->S[list[first .. first + count)] */
    int *row0;                      /* (count) row of each sample's first completion target */
} micro;

static void micro_free(micro *mb) {
    mem_free(mb->ids);
    mem_free(mb->pos);
    mem_free(mb->doc);
    mem_free(mb->tgt);
    mem_free(mb->lp);
    mem_free(mb->coef);
    mem_free(mb->row0);
    memset(mb, 0, sizeof *mb);
}

static int micro_pack(job *J, micro *mb, const int *list, int first, int count, mr_err *e) {
    int T = 0;
    for (int k = 0; k < count; k++) {
        const sample *s = &J->S[list[first + k]];
        T += J->D.train[s->prompt].n + s->seq.n;
    }
    if (T > mb->cap) {
        micro_free(mb);
        mb->ids = mem_alloc((size_t)T * sizeof(int32_t));
        mb->pos = mem_alloc((size_t)T * sizeof(int32_t));
        mb->doc = mem_alloc((size_t)T * sizeof(int32_t));
        mb->tgt = mem_alloc((size_t)T * sizeof(int32_t));
        mb->lp = mem_alloc((size_t)T * sizeof(float));
        mb->coef = mem_alloc((size_t)T * sizeof(float));
        if (!mb->ids || !mb->pos || !mb->doc || !mb->tgt || !mb->lp || !mb->coef)
            return err_set(e, MR_ENOMEM, "grpo: out of memory packing %d tokens", T);
        mb->cap = T;
    }
    mem_free(mb->row0);
    if (!(mb->row0 = mem_alloc((size_t)(count ? count : 1) * sizeof(int)))) return err_set(e, MR_ENOMEM, "grpo: out of memory");
    int t = 0;
    for (int k = 0; k < count; k++) {
        const sample *s = &J->S[list[first + k]];
        const rl_prompt *p = &J->D.train[s->prompt];
        int n = p->n + s->seq.n, start = t;
        mb->row0[k] = start + p->n - 1;
        for (int j = 0; j < n; j++, t++) {
            mb->ids[t] = j < p->n ? p->ids[j] : s->seq.tokens[j - p->n];
            mb->pos[t] = j;
            mb->doc[t] = start;
            /* row j predicts token j + 1: a completion token */
            mb->tgt[t] = j + 1 >= p->n && j + 1 < n ? s->seq.tokens[j + 1 - p->n] : -1;
            mb->coef[t] = 0;
        }
    }
    mb->T = T;
    mb->first = first;
    mb->count = count;
    return MR_OK;
}

/* Splits list[0 .. n) into consecutive micro-batches of at most T_cap tokens: the end (exclusive) of the one that
 * starts at `from`. */
static int micro_end(const job *J, const int *list, int from, int n) {
    int T = 0, k = from;
    while (k < n) {
        const sample *s = &J->S[list[k]];
        int len = J->D.train[s->prompt].n + s->seq.n;
        if (k > from && T + len > J->T_cap) break;
        T += len;
        k++;
    }
    return k;
}

/* Forward (inference form) of a packed micro-batch; log-probs of every target row into mb->lp. */
static int forward_logp(model *m, micro *mb, const int32_t *const *replay, model_batch *b, double *balance,
                        mr_err *e) {
    *b = (model_batch){.ids = mb->ids, .pos = mb->pos, .doc_start = mb->doc, .targets = mb->tgt, .replay = replay,
                       .T = mb->T, .skip_mtp = 1};
    model_loss ls;
    int rc = model_forward(m, b, 0, &ls, e);
    if (rc) return rc;
    if (balance) *balance = ls.balance; /* α·Σ_layers L_bal of this micro-batch (0 when grpo.balance_alpha is 0) */
    const float *logits = model_logits(m);
    if (!logits) return err_set(e, MR_EDEVICE, "grpo: cannot copy the logits from backend '%s'", m->be->name);
    logprob_forward(mb->lp, logits, mb->tgt, mb->T, m->p.cfg.vocab_size);
    return MR_OK;
}

/* Routing replay: the experts of sample s's rows in the latest forward of m (s's first row at row `start`) into
 * s->route, then its completion rows from the rollout (the rows whose logits sampled each token). */
static int capture_route(job *J, model *m, sample *s, int start, mr_err *e) {
    const int plen = J->D.train[s->prompt].n, rows = plen + s->seq.n, nk = J->n_moe * J->K;
    if (!s->seq.experts || s->seq.n_moe_layers != J->n_moe || s->seq.K != J->K)
        return err_set(e, MR_EINTERNAL, "grpo: routing replay: the rollout recorded no experts (%d MoE layers x %d, "
                                        "expected %d x %d)", s->seq.n_moe_layers, s->seq.K, J->n_moe, J->K);
    if (!s->route && !(s->route = mem_alloc((size_t)rows * nk * sizeof(int32_t))))
        return err_set(e, MR_ENOMEM, "grpo: out of memory for the routing replay table");
    for (int j = 0; j < J->n_moe; j++) {
        const int32_t *ex = model_layer_experts(m, J->moe_layers[j]);
        if (!ex) return err_set(e, MR_EDEVICE, "grpo: cannot copy the routed experts from backend '%s'", m->be->name);
        for (int r = 0; r < rows; r++)
            memcpy(s->route + ((size_t)r * J->n_moe + j) * J->K, ex + (size_t)(start + r) * J->K, J->K * sizeof(int32_t));
    }
    memcpy(s->route + (size_t)(plen - 1) * nk, s->seq.experts, (size_t)s->seq.n * nk * sizeof(int32_t));
    return MR_OK;
}

/* The micro-batch's model_batch.replay from its samples' tables. */
static const int32_t *const *replay_of(job *J, const micro *mb, const int *list) {
    const int nk = J->n_moe * J->K;
    for (int j = 0; j < J->n_moe; j++) J->replay[J->moe_layers[j]] = J->replay_buf + (size_t)j * J->T_cap * J->K;
    for (int k = 0; k < mb->count; k++) {
        const sample *s = &J->S[list[mb->first + k]];
        int plen = J->D.train[s->prompt].n, start = mb->row0[k] - (plen - 1);
        for (int r = 0; r < plen + s->seq.n; r++)
            for (int j = 0; j < J->n_moe; j++)
                memcpy(J->replay_buf + ((size_t)j * J->T_cap + start + r) * J->K, s->route + (size_t)r * nk + (size_t)j * J->K,
                       J->K * sizeof(int32_t));
    }
    return J->replay;
}

/* Log-probs of every sample of list under model m into the sample's lp_ref (ref = 1) or lp_old (ref = 0, when
 * want_lp), and with route the samples' routing replay tables (m = the policy at the step's start). */
static int logprob_pass(job *J, model *m, const int *list, int n, int ref, int want_lp, int route, micro *mb,
                        mr_err *e) {
    for (int a = 0; a < n;) {
        int b_end = micro_end(J, list, a, n), rc;
        if ((rc = micro_pack(J, mb, list, a, b_end - a, e))) return rc;
        model_batch b;
        if ((rc = forward_logp(m, mb, NULL, &b, NULL, e))) return rc;
        for (int k = 0; k < mb->count; k++) {
            sample *s = &J->S[list[a + k]];
            if (route && (rc = capture_route(J, m, s, mb->row0[k] - (J->D.train[s->prompt].n - 1), e))) return rc;
            if (!ref && !want_lp) continue;
            float **dst = ref ? &s->lp_ref : &s->lp_old;
            if (!*dst && !(*dst = mem_alloc((size_t)(s->seq.n ? s->seq.n : 1) * sizeof(float))))
                return err_set(e, MR_ENOMEM, "grpo: out of memory");
            memcpy(*dst, mb->lp + mb->row0[k], (size_t)s->seq.n * sizeof(float));
        }
        a = b_end;
    }
    return MR_OK;
}

/* -------------------------------------------------------------------------------------------- state */

static char *state_json(const state *s) {
    char buf[512];
    snprintf(buf, sizeof buf,
             "{\n  \"format\": \"moerl-grpo-state-1\",\n  \"step\": %lld,\n  \"epoch\": %lld,\n  \"index\": %lld,\n"
             "  \"skipped\": %lld,\n  \"bad_in_row\": %lld,\n  \"run_id\": %lld,\n  \"dynamic_sampling_buffer\": []\n}\n",
             (long long)s->step, (long long)s->epoch, (long long)s->index, (long long)s->skipped,
             (long long)s->bad_in_row, (long long)s->run_id);
    return mem_strdup(buf);
}

static int state_parse(state *s, const char *json, const char *where, mr_err *e) {
    cJSON *j = cJSON_Parse(json);
    if (!j) return err_set(e, MR_EFORMAT, "%s/trainer_state.json: malformed JSON", where);
    int rc = MR_OK;
    const cJSON *f = cJSON_GetObjectItemCaseSensitive(j, "format");
    if (!cJSON_IsString(f) || strcmp(f->valuestring, "moerl-grpo-state-1") != 0)
        rc = err_set(e, MR_EFORMAT, "%s/trainer_state.json: format: expected \"moerl-grpo-state-1\" (a GRPO checkpoint)",
                     where);
    static const char *keys[] = {"step", "epoch", "index", "skipped", "bad_in_row", "run_id"};
    int64_t *dst[] = {&s->step, &s->epoch, &s->index, &s->skipped, &s->bad_in_row, &s->run_id};
    for (int i = 0; i < 6 && !rc; i++) {
        cJSON *v = cJSON_GetObjectItemCaseSensitive(j, keys[i]);
        if (!cJSON_IsNumber(v) || v->valuedouble < 0)
            rc = err_set(e, MR_EFORMAT, "%s/trainer_state.json: %s: expected a non-negative integer", where, keys[i]);
        else *dst[i] = (int64_t)v->valuedouble;
    }
    cJSON_Delete(j);
    return rc;
}

/* --------------------------------------------------------------------------------------------- eval */

/* Greedy completions of the first eval_rows held-out prompts, scored by the reward set: eval/reward_mean and
 * eval/exact_match (the completion's final answer against the row's "answer"). */
static int run_eval(job *J, int64_t step, mr_err *e) {
    int n = (int)(J->D.n_eval < (size_t)J->c.eval_rows ? J->D.n_eval : (size_t)J->c.eval_rows);
    if (n <= 0) return MR_OK;
    double t0 = progress_now(), tr = 0, tw = 0;
    int *idx = mem_alloc((size_t)n * sizeof *idx);
    sample *out = mem_calloc((size_t)n, sizeof *out);
    int rc = MR_OK;
    if (!idx || !out) {
        rc = err_set(e, MR_ENOMEM, "grpo: out of memory");
        goto done;
    }
    for (int i = 0; i < n; i++) idx[i] = i;
    rollout_opts o = rollout_options(J, rng_stream_id(J->c.seed, STREAM_EVAL, 0));
    o.temperature = 0;
    o.top_p = 1;
    o.top_k = 0;
    o.min_p = 0;
    reward_set_reset_stats(J->rw);
    if ((rc = generate_and_score(J, J->D.eval, idx, n, 1, &o, out, &tr, &tw, e))) goto done;
    reward_set_reset_stats(J->rw);
    double sum = 0;
    int scored = 0, hits = 0, with_answer = 0;
    for (int i = 0; i < n; i++) {
        if (out[i].scored) sum += out[i].out.total, scored++;
        char want[256], got[256];
        const char *a = reward_row_text(J->D.eval[i].row, "answer", want, sizeof want);
        if (!a) continue;
        with_answer++;
        char norm[256];
        math_normalize(a, norm, sizeof norm);
        if (math_extract_answer(out[i].text, MATH_AUTO, got, sizeof got) && math_answers_equal(got, a, 0)) hits++;
    }
    const char *names[] = {"eval/reward_mean", "eval/exact_match", "eval/exact_match_n", "time/eval"};
    double values[] = {scored ? sum / scored : NAN, with_answer ? (double)hits / with_answer : NAN, (double)with_answer,
                       progress_now() - t0};
    fprintf(stderr, "grpo: eval at step %lld: reward %.4f, exact match %.1f%% (%d/%d) [%.1fs]\n", (long long)step,
            values[0], 100.0 * values[1], hits, with_answer, values[3]);
    if (J->rs) rc = runstore_log_metrics(J->rs, J->st.run_id, step, 4, names, values, e);
done:
    for (int i = 0; out && i < n; i++) sample_clear(&out[i]);
    mem_free(out);
    mem_free(idx);
    return rc;
}

/* --------------------------------------------------------------------------------------------- a step */

static int log_samples(job *J, int64_t step, mr_err *e) {
    if (!J->rs || J->nS == 0) return MR_OK;
    runstore_sample *rows = mem_calloc((size_t)J->nS, sizeof *rows);
    char **js = mem_calloc((size_t)J->nS * 2, sizeof *js);
    int rc = MR_OK;
    if (!rows || !js) {
        rc = err_set(e, MR_ENOMEM, "grpo: out of memory");
        goto done;
    }
    size_t np = reward_set_count(J->rw);
    for (int i = 0; i < J->nS; i++) {
        const sample *s = &J->S[i];
        cJSON *rw = cJSON_CreateObject(), *ex = cJSON_CreateObject();
        for (size_t k = 0; rw && k < np; k++) {
            const reward_plugin *p = reward_set_plugin(J->rw, k);
            if (s->pp[k].status == REWARD_SCORE) cJSON_AddNumberToObject(rw, p->name, s->pp[k].score);
            else cJSON_AddNullToObject(rw, p->name);
        }
        if (ex) {
            static const char *const fin[] = {"eos", "stop", "length"};
            cJSON_AddNumberToObject(ex, "group", i / J->c.G);
            cJSON_AddNumberToObject(ex, "tokens", s->seq.n);
            cJSON_AddStringToObject(ex, "finish", fin[s->seq.finish < 3 ? s->seq.finish : 2]);
            cJSON_AddStringToObject(ex, "status", reward_status_name(s->out.status));
            if (s->out.status != REWARD_SCORE) cJSON_AddStringToObject(ex, "reason", s->out.reason);
            if (s->scored) cJSON_AddNumberToObject(ex, "reward", s->out.total);
            cJSON_AddBoolToObject(ex, "in_loss", s->in_loss);
        }
        js[2 * i] = rw ? cJSON_PrintUnformatted(rw) : NULL;
        js[2 * i + 1] = ex ? cJSON_PrintUnformatted(ex) : NULL;
        cJSON_Delete(rw);
        cJSON_Delete(ex);
        if (!js[2 * i] || !js[2 * i + 1]) {
            rc = err_set(e, MR_ENOMEM, "grpo: out of memory");
            goto done;
        }
        rows[i] = (runstore_sample){.step = step, .prompt = J->D.train[s->prompt].text, .completion = s->text,
                                    .rewards_json = js[2 * i], .advantage = s->adv, .extra_json = js[2 * i + 1]};
    }
    rc = runstore_log_samples(J->rs, J->st.run_id, (size_t)J->nS, rows, e);
done:
    for (int i = 0; js && i < 2 * J->nS; i++) cJSON_free(js[i]);
    mem_free(js);
    mem_free(rows);
    return rc;
}

/* One optimizer update over the samples list[0 .. n): micro-batches, coefficients, backward, clip, AdamW, bias. */
typedef struct update_stats {
    grpo_loss_acc acc;
    double entropy_sum, mis_sum, mis_max, grad_norm_sum, train_tokens, balance_sum;
    int64_t ent_rows, mis_n, balance_n;
    int updates, skipped;
} update_stats;

static int optimizer_update(job *J, const int *list, int n, double lr, int measure_mismatch, int update_index,
                            micro *mb, update_stats *us, mr_err *e) {
    const grpo_cfg *c = &J->c;
    model *m = &J->m;
    const int V = m->p.cfg.vocab_size;
    grpo_norm nm = {0};
    for (int k = 0; k < n; k++) {
        nm.n_seqs++;
        nm.n_tokens += J->S[list[k]].seq.n;
    }
    params_zero_grad(&m->p);
    size_t E = (size_t)(m->p.cfg.n_routed_experts > 0 ? m->p.cfg.n_routed_experts : 1);
    memset(J->load_sum, 0, (size_t)m->p.n_layers * E * sizeof(int64_t));
    float *eg = NULL;
    int rc = MR_OK;
    for (int a = 0; a < n;) {
        int b_end = micro_end(J, list, a, n);
        if ((rc = micro_pack(J, mb, list, a, b_end - a, e))) goto done;
        model_batch b;
        const int replaying = c->routing_replay && J->n_moe > 0;
        double bal = 0;
        if ((rc = forward_logp(m, mb, replaying ? replay_of(J, mb, list) : NULL, &b, &bal, e))) goto done;
        us->balance_sum += bal;
        us->balance_n++;
        if (probe_fn) {
            grpo_probe_seq ps[64];
            int np = mb->count < 64 ? mb->count : 64;
            for (int k = 0; k < np; k++) {
                const sample *s = &J->S[list[a + k]];
                int plen = J->D.train[s->prompt].n;
                ps[k] = (grpo_probe_seq){.row0 = mb->row0[k] - (plen - 1), .prompt_len = plen, .n = s->seq.n,
                                         .rollout = s->seq.experts, .replay = replaying ? s->route : NULL};
            }
            probe_fn(probe_ctx, m, J->iteration, update_index, ps, np);
        }
        const float *logits = model_logits(m);
        if (c->entropy_coef > 0) {
            mem_free(eg);
            if (!(eg = mem_calloc((size_t)mb->T * V, sizeof *eg))) {
                rc = err_set(e, MR_ENOMEM, "grpo: out of memory for the entropy gradient");
                goto done;
            }
        }
        for (int k = 0; k < mb->count; k++) {
            sample *s = &J->S[list[a + k]];
            const float *lp = mb->lp + mb->row0[k];
            int tis = c->loss.tis != TIS_OFF;
            grpo_seq q = {.lp = lp, .lp_old = tis ? s->lp_old : s->seq.logp, .lp_ref = J->has_ref ? s->lp_ref : NULL,
                          .lp_behav = tis ? s->seq.logp : NULL, .n = s->seq.n, .adv = s->adv};
            grpo_seq_loss(&c->loss, &nm, &q, mb->coef + mb->row0[k], &us->acc);
            for (int t = 0; t < s->seq.n; t++) {
                const float *row = logits + (size_t)(mb->row0[k] + t) * V;
                us->entropy_sum += grpo_entropy_row(row, V);
                us->ent_rows++;
                if (measure_mismatch) {
                    double d = fabs((double)lp[t] - (double)s->seq.logp[t]);
                    us->mis_sum += d;
                    us->mis_max = fmax(us->mis_max, d);
                    us->mis_n++;
                }
            }
            if (eg) { /* bonus -entropy_coef * agg_t * H_t, agg_t as the loss's (coef / per-token weight) */
                double w = c->loss.agg == AGG_TOKEN_MEAN ? 1.0 / (double)nm.n_tokens
                           : c->loss.agg == AGG_SEQ_MEAN_TOKEN_MEAN
                               ? 1.0 / ((double)nm.n_seqs * (s->seq.n ? s->seq.n : 1))
                               : 1.0 / ((double)nm.n_seqs * c->max_new_tokens);
                for (int t = 0; t < s->seq.n; t++) {
                    int row = mb->row0[k] + t;
                    grpo_entropy_grad_row(eg + (size_t)row * V, logits + (size_t)row * V, V, -c->entropy_coef * w);
                    us->acc.loss -= c->entropy_coef * w * grpo_entropy_row(logits + (size_t)row * V, V);
                }
            }
        }
        if (J->c.bias_gamma > 0)
            for (int l = 0; l < m->p.n_layers; l++) {
                const int64_t *ld = model_layer_load(m, l);
                if (ld)
                    for (size_t x = 0; x < E; x++) J->load_sum[(size_t)l * E + x] += ld[x];
            }
        if ((rc = model_policy_grad(m, &b, mb->coef, e))) goto done;
        /* the head API has no entropy term: add its gradient to d(loss)/d(logits) before backward */
        if (eg && (rc = model_add_logits_grad(m, eg, e))) goto done;
        if ((rc = model_backward(m, &b, e))) goto done;
        us->train_tokens += mb->T;
        a = b_end;
    }
    mr_err ge = {0};
    us->updates++;
    if (grad_check_finite(&m->p, &ge) == MR_OK) {
        double gn = c->grad_clip > 0 ? grad_clip(&m->p, c->grad_clip) : grad_norm(&m->p);
        us->grad_norm_sum += gn;
        adamw_step(&J->opt, &m->p, lr);
        /* §9.1 aux-loss-free balancing: once per optimizer update, from the update's summed loads */
        for (int l = 0; l < m->p.n_layers && c->bias_gamma > 0; l++)
            if (m->p.w.layers[l].is_moe && m->p.w.layers[l].moe.bias &&
                (rc = model_bias_update(m, l, J->load_sum + (size_t)l * E, c->bias_gamma, e)))
                goto done;
    } else {
        us->skipped++;
        fprintf(stderr, "grpo: step %lld: update skipped: %s\n", (long long)J->st.step, ge.msg);
        if (J->rs) {
            mr_err e2 = {0};
            char msg[2200];
            snprintf(msg, sizeof msg, "step %lld: update skipped: %s", (long long)J->st.step, ge.msg);
            runstore_log_event(J->rs, J->st.run_id, EVENT_WARNING, msg, &e2);
        }
    }
done:
    mem_free(eg);
    return rc;
}

static int grpo_step(job *J, micro *mb, mr_err *e) {
    const grpo_cfg *c = &J->c;
    const int G = c->G;
    double t_step = progress_now(), t_roll = 0, t_rew = 0, t_lp = 0, t_upd = 0;
    int rc = MR_OK;
    int *pidx = NULL, *list = NULL;
    double *rew = NULL;
    uint8_t *sc = NULL, *tr = NULL, *in_loss = NULL;
    float *adv = NULL;
    clear_samples(J);
    J->n_metrics = 0;
    reward_set_reset_stats(J->rw);
    double *grew = mem_alloc((size_t)G * sizeof *grew);
    uint8_t *gsc = mem_alloc((size_t)G);
    if (!(pidx = mem_alloc((size_t)c->P * sizeof *pidx)) || !grew || !gsc) {
        rc = err_set(e, MR_ENOMEM, "grpo: out of memory");
        goto done;
    }

    /* rollout rounds: one, or with dynamic sampling as many as it takes to fill P groups with signal */
    int rounds = 0, drawn = 0, kept_groups = 0, zero_std = 0;
    int64_t gen_tokens = 0, resp_max = 0, truncated = 0, n_gen = 0;
    double prompt_len = 0, rsum = 0, rsq = 0;
    int64_t rn = 0;
    while (kept_groups < c->P && (rounds == 0 || (c->dynamic_sampling && rounds <= c->max_extra_rounds))) {
        int need = c->P - kept_groups;
        for (int i = 0; i < need; i++) pidx[i] = next_prompt(J);
        drawn += need;
        if ((rc = grow_samples(J, need * G, e))) goto done;
        sample *out = J->S + J->nS;
        rollout_opts o = rollout_options(J, rng_stream_id(c->seed ^ STREAM_ROLLOUT, (uint64_t)J->st.step, (uint64_t)rounds));
        o.record_experts = (c->routing_replay || probe_fn) && J->n_moe > 0; /* the probe compares with them */
        rc = generate_and_score(J, J->D.train, pidx, need, G, &o, out, &t_roll, &t_rew, e);
        J->nS += need * G; /* owned by the step from here, cleared together */
        if (rc) goto done;
        rounds++;
        /* keep or drop each group */
        int w = J->nS - need * G;
        for (int q = 0; q < need; q++) {
            sample *g = out + (size_t)q * G;
            for (int k = 0; k < G; k++) grew[k] = g[k].out.total, gsc[k] = g[k].scored;
            int signal = grpo_group_has_signal(grew, gsc, G);
            zero_std += !signal;
            for (int k = 0; k < G; k++) {
                const sample *s = &g[k];
                gen_tokens += s->seq.n;
                resp_max = s->seq.n > resp_max ? s->seq.n : resp_max;
                truncated += s->seq.truncated;
                prompt_len += J->D.train[s->prompt].n;
                n_gen++;
                if (s->scored) rsum += s->out.total, rsq += s->out.total * s->out.total, rn++;
            }
            if (c->dynamic_sampling && !signal) {
                for (int k = 0; k < G; k++) sample_clear(&g[k]);
                continue;
            }
            if (out + (size_t)q * G != J->S + w) { /* compact */
                memmove(J->S + w, g, (size_t)G * sizeof *g);
                memset(g, 0, (size_t)G * sizeof *g);
            }
            w += G;
            kept_groups++;
        }
        J->nS = w;
    }

    /* advantages over the kept groups */
    int n = J->nS;
    rew = mem_alloc((size_t)(n ? n : 1) * sizeof *rew);
    sc = mem_alloc((size_t)(n ? n : 1));
    tr = mem_alloc((size_t)(n ? n : 1));
    in_loss = mem_alloc((size_t)(n ? n : 1));
    adv = mem_alloc((size_t)(n ? n : 1) * sizeof *adv);
    list = mem_alloc((size_t)(n ? n : 1) * sizeof *list);
    if (!rew || !sc || !tr || !in_loss || !adv || !list) {
        rc = err_set(e, MR_ENOMEM, "grpo: out of memory");
        goto done;
    }
    for (int i = 0; i < n; i++) {
        rew[i] = J->S[i].out.total;
        sc[i] = J->S[i].scored;
        tr[i] = (uint8_t)J->S[i].seq.truncated;
    }
    adv_stats as = {0};
    grpo_advantages(rew, sc, tr, n / G, G, &c->adv, adv, in_loss, &as);
    int nl = 0;
    for (int i = 0; i < n; i++) {
        J->S[i].adv = adv[i];
        J->S[i].in_loss = in_loss[i] && J->S[i].seq.n > 0;
        if (J->S[i].in_loss) list[nl++] = i;
    }

    /* reference and (TIS) old log-probs with the weights of the step's start */
    double t0 = progress_now();
    if (J->has_ref && (rc = logprob_pass(J, &J->ref, list, nl, 1, 1, 0, mb, e))) goto done;
    int replaying = c->routing_replay && J->n_moe > 0;
    if ((c->loss.tis != TIS_OFF || replaying) &&
        (rc = logprob_pass(J, &J->m, list, nl, 0, c->loss.tis != TIS_OFF, replaying, mb, e)))
        goto done;
    t_lp = progress_now() - t0;
    double mis_sum = 0, mis_max = 0;
    int64_t mis_n = 0;
    if (c->loss.tis != TIS_OFF)
        for (int k = 0; k < nl; k++) {
            const sample *s = &J->S[list[k]];
            for (int t = 0; t < s->seq.n; t++) {
                double d = fabs((double)s->lp_old[t] - (double)s->seq.logp[t]);
                mis_sum += d;
                mis_max = fmax(mis_max, d);
                mis_n++;
            }
        }

    /* mu iterations x M mini-batches, each one optimizer update */
    t0 = progress_now();
    double lr = sched_lr(&c->sched, J->st.step);
    update_stats us = {0};
    for (int it = 0; it < c->mu; it++)
        for (int mbi = 0; mbi < c->M; mbi++) {
            int from = (int)((int64_t)nl * mbi / c->M), to = (int)((int64_t)nl * (mbi + 1) / c->M);
            int first_update = it == 0 && mbi == 0;
            J->iteration = it;
            if ((rc = optimizer_update(J, list + from, to - from, lr, first_update && c->loss.tis == TIS_OFF, mbi, mb,
                                       &us, e)))
                goto done;
        }
    t_upd = progress_now() - t0;
    if (c->loss.tis == TIS_OFF) mis_sum = us.mis_sum, mis_max = us.mis_max, mis_n = us.mis_n;

    /* metrics (GRPO.md §4) */
    J->st.skipped += us.skipped;
    J->st.bad_in_row = us.skipped == us.updates ? J->st.bad_in_row + 1 : 0;
    int64_t tok = us.acc.tokens;
    put(J, "reward/mean", rn ? rsum / rn : NAN);
    put(J, "reward/std", rn > 0 ? sqrt(fmax(0, rsq / rn - (rsum / rn) * (rsum / rn))) : NAN);
    reward_set_metrics(J->rw, emit_metric, J);
    put(J, "reward/frac_zero_std_groups", drawn ? (double)zero_std / drawn : 0);
    put(J, "adv/mean", as.mean);
    put(J, "adv/std", as.std);
    put(J, "adv/min", as.min);
    put(J, "adv/max", as.max);
    put(J, "policy/loss", us.updates ? us.acc.loss / us.updates : 0);
    put(J, "policy/entropy", us.ent_rows ? us.entropy_sum / (double)us.ent_rows : 0);
    put(J, "moe/balance_loss", us.balance_n ? us.balance_sum / (double)us.balance_n : 0);
    put(J, "policy/kl_ref", tok ? us.acc.kl / (double)tok : 0);
    put(J, "policy/clipfrac_low", tok ? (double)us.acc.clip_low / (double)tok : 0);
    put(J, "policy/clipfrac_high", tok ? (double)us.acc.clip_high / (double)tok : 0);
    if (c->loss.dual_clip > 1) put(J, "policy/dual_clipfrac", tok ? (double)us.acc.dual_clipped / (double)tok : 0);
    if (c->loss.tis != TIS_OFF) put(J, "policy/tis_weight_mean", tok ? us.acc.tis_w / (double)tok : 0);
    put(J, "optim/grad_norm", us.updates > us.skipped ? us.grad_norm_sum / (us.updates - us.skipped) : NAN);
    put(J, "optim/lr", lr);
    put(J, "optim/skipped_steps", (double)J->st.skipped);
    put(J, "len/resp_mean", n_gen ? (double)gen_tokens / (double)n_gen : 0);
    put(J, "len/resp_max", (double)resp_max);
    put(J, "len/truncated_frac", n_gen ? (double)truncated / (double)n_gen : 0);
    put(J, "len/prompt_mean", n_gen ? prompt_len / (double)n_gen : 0);
    put(J, "mismatch/logp_absdiff_mean", mis_n ? mis_sum / (double)mis_n : 0);
    put(J, "mismatch/logp_absdiff_max", mis_max);
    const model *m = &J->m;
    size_t E = (size_t)(m->p.cfg.n_routed_experts > 0 ? m->p.cfg.n_routed_experts : 1);
    double bias_abs = 0;
    float *bias = mem_alloc(E * sizeof(float)); /* a host copy of each router bias */
    for (int l = 0; l < m->p.n_layers; l++) {
        if (!m->p.w.layers[l].is_moe) continue;
        const int64_t *ld = model_layer_load(m, l);
        if (ld) {
            int64_t mx;
            double mean;
            moe_load_stats(ld, (int)E, &mx, &mean);
            char name[64];
            snprintf(name, sizeof name, "moe/load_max_over_mean/layer%d", l);
            put(J, name, mean > 0 ? (double)mx / mean : 0);
        }
        mr_err be = {0};
        if (bias && m->p.w.layers[l].moe.bias && model_router_bias(m, l, bias, &be) == MR_OK)
            for (size_t x = 0; x < E; x++) bias_abs = fmax(bias_abs, fabs(bias[x]));
    }
    mem_free(bias);
    put(J, "moe/bias_absmax", bias_abs);
    double t_all = progress_now() - t_step;
    put(J, "time/rollout", t_roll);
    put(J, "time/reward", t_rew);
    put(J, "time/logprob", t_lp);
    put(J, "time/update", t_upd);
    put(J, "time/step", t_all);
    put(J, "tput/rollout_tok_s", t_roll > 0 ? (double)gen_tokens / t_roll : 0);
    put(J, "tput/train_tok_s", t_upd > 0 ? us.train_tokens / t_upd : 0);
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    put(J, "mem/peak_rss_gb", (double)ru.ru_maxrss / (1024.0 * 1024.0));
    if (J->m.be->mem_stats) { /* device memory (CUDA: the driver's view, workspaces and context included) */
        size_t used, peak;
        J->m.be->mem_stats(&used, &peak);
        put(J, "mem/peak_device_gb", (double)peak / (1024.0 * 1024.0 * 1024.0));
    }
    put(J, "filter/pass_rate", drawn ? (double)kept_groups / drawn : 0);
    put(J, "filter/extra_rounds", rounds - 1);
    put(J, "filter/groups", kept_groups);
    J->st.step++;
    if (J->rs && (rc = runstore_log_metrics(J->rs, J->st.run_id, J->st.step, J->n_metrics, J->names, J->values, e)))
        goto done;
    if ((rc = log_samples(J, J->st.step, e))) goto done;
done:
    mem_free(grew);
    mem_free(gsc);
    mem_free(pidx);
    mem_free(list);
    mem_free(rew);
    mem_free(sc);
    mem_free(tr);
    mem_free(in_loss);
    mem_free(adv);
    return rc;
}

/* ---------------------------------------------------------------------------------------------- setup */

/* model.overrides next to grpo.init_from (one recipe for SFT then GRPO) must describe the checkpoint's sizes. */
static int check_overrides(const recipe *r, const model_config *ck, const char *init_dir, mr_err *e) {
    if (!recipe_is_set(r, "model.overrides") || recipe_is_set(r, "model.checkpoint")) return MR_OK;
    model_config c;
    int rc = model_config_from_recipe(&c, r, e);
    if (rc) return rc;
    if (!recipe_is_set(r, "model.overrides.vocab_size")) c.vocab_size = ck->vocab_size;
#define SAME(f)                                                                                                        \
    if (c.f != ck->f)                                                                                                  \
        return err_set(e, MR_EINVAL, "%s: model.overrides.%s: %d, but %s/config.json has %d (the checkpoint's sizes are fixed)", \
                       recipe_source(r), #f, (int)c.f, init_dir, (int)ck->f);
    SAME(vocab_size) SAME(hidden_size) SAME(num_hidden_layers) SAME(intermediate_size) SAME(moe_intermediate_size)
    SAME(first_k_dense_replace) SAME(n_routed_experts) SAME(num_experts_per_tok) SAME(n_shared_experts) SAME(n_group)
    SAME(topk_group) SAME(num_attention_heads) SAME(q_lora_rank) SAME(kv_lora_rank) SAME(qk_nope_head_dim)
    SAME(qk_rope_head_dim) SAME(v_head_dim) SAME(num_nextn_predict_layers)
#undef SAME
    return MR_OK;
}

static int load_policy(job *J, const char *init_dir, model_params *p, mr_err *e) {
    if (init_dir) {
        int rc = params_load(p, init_dir, e);
        if (!rc && (rc = check_overrides(J->r, &p->cfg, init_dir, e))) params_free(p);
        return rc;
    }
    model_config c;
    int rc = model_config_from_recipe(&c, J->r, e);
    if (rc) return rc;
    if (!recipe_is_set(J->r, "model.overrides.vocab_size")) c.vocab_size = tok_vocab_size(J->D.tok);
    if ((rc = params_init(p, &c, e))) return rc;
    params_init_random(p, J->c.seed, (float)recipe_float(J->r, "model.init_std")); /* as moerl sft: the same seed gives the same weights */
    return MR_OK;
}

static void job_free(job *J) {
    clear_samples(J);
    mem_free(J->S);
    model_free(&J->m);
    if (J->has_ref) model_free(&J->ref);
    reward_set_free(J->rw);
    rl_data_free(&J->D);
    runstore_close(J->rs);
    adamw_free(&J->opt);
    mem_free(J->order);
    mem_free(J->load_sum);
    mem_free(J->stop);
    mem_free(J->moe_layers);
    mem_free(J->replay);
    mem_free(J->replay_buf);
}

int grpo_run(const recipe *r, int resume, int64_t stop_after, mr_err *e) {
    job *J = mem_calloc(1, sizeof *J);
    if (!J) return err_set(e, MR_ENOMEM, "grpo: out of memory");
    J->r = r;
    J->order_epoch = -1;
    char *yaml = NULL, *sj = NULL;
    micro mb = {0};
    int rc;
    if ((rc = grpo_cfg_from_recipe(&J->c, r, e))) goto fail;
    const grpo_cfg *c = &J->c;
    const char *out_dir = recipe_str(r, "run.out_dir");
    if (recipe_int(r, "run.threads") > 0) omp_set_num_threads((int)recipe_int(r, "run.threads"));
    char ckpt[4200] = "";
    int64_t ckpt_step = -1;
    if (resume && (rc = ckpt_latest(out_dir, ckpt, sizeof ckpt, &ckpt_step, e))) goto fail;

    /* where the policy starts: grpo.init_from, else the model section */
    const char *init_dir = recipe_is_set(r, "grpo.init_from")    ? recipe_str(r, "grpo.init_from")
                           : recipe_is_set(r, "model.checkpoint") ? recipe_str(r, "model.checkpoint")
                                                                  : NULL;
    char probe[4200];
    const char *tok_pref = NULL;
    if (init_dir && !recipe_is_set(r, "tokenizer.path")) {
        snprintf(probe, sizeof probe, "%s/tokenizer.json", init_dir);
        if (access(probe, R_OK) == 0) tok_pref = init_dir;
    }
    if ((rc = rl_data_setup(&J->D, r, tok_pref, resume, e))) goto fail;
    if ((size_t)c->P > J->D.n_train) {
        rc = err_set(e, MR_EINVAL, "%s: grpo.prompts_per_step (%d) is larger than the prompt set (%zu training rows)",
                     recipe_source(r), c->P, J->D.n_train);
        goto fail;
    }
    int longest = 0;
    for (size_t i = 0; i < J->D.n_train; i++) longest = J->D.train[i].n > longest ? J->D.train[i].n : longest;
    for (size_t i = 0; i < J->D.n_eval; i++) longest = J->D.eval[i].n > longest ? J->D.eval[i].n : longest;
    if (longest + c->max_new_tokens > c->micro_batch_tokens) {
        rc = err_set(e, MR_EINVAL,
                     "%s: grpo.micro_batch_tokens (%d) must hold the longest prompt (%d tokens) plus "
                     "rollout.max_new_tokens (%d): expected >= %d",
                     recipe_source(r), c->micro_batch_tokens, longest, c->max_new_tokens, longest + c->max_new_tokens);
        goto fail;
    }
    J->T_cap = c->micro_batch_tokens;
    int T_max = c->micro_batch_tokens;
    if (T_max < c->P * c->G) T_max = c->P * c->G; /* one decode step of every live sequence */
    fprintf(stderr, "grpo: %zu training prompts, %zu held-out; tokenizer %s (vocab %d)\n", J->D.n_train, J->D.n_eval,
            J->D.tok_dir, tok_vocab_size(J->D.tok));

    /* rewards, stop strings */
    if ((rc = reward_set_init(&J->rw, r, NULL, e))) goto fail;
    J->n_stop = (int)recipe_list_len(r, "rollout.stop");
    if (!(J->stop = mem_calloc((size_t)(J->n_stop ? J->n_stop : 1), sizeof *J->stop))) {
        rc = err_set(e, MR_ENOMEM, "grpo: out of memory");
        goto fail;
    }
    for (int i = 0; i < J->n_stop; i++) {
        char path[64];
        snprintf(path, sizeof path, "rollout.stop[%d]", i);
        J->stop[i] = recipe_str(r, path);
    }

    /* the policy (and the frozen reference: the same initial weights) */
    model_params p;
    memset(&p, 0, sizeof p);
    if ((rc = load_policy(J, init_dir, &p, e))) {
        params_free(&p);
        goto fail;
    }
    if (tok_vocab_size(J->D.tok) > p.cfg.vocab_size) {
        params_free(&p);
        rc = err_set(e, MR_EINVAL, "%s: the tokenizer has %d tokens but the model's vocab_size is %d", recipe_source(r),
                     tok_vocab_size(J->D.tok), p.cfg.vocab_size);
        goto fail;
    }
    model_opts mo = {.mm = recipe_bool(r, "run.deterministic") ? MM_DET : MM_FAST,
                     .mm_bwd = strcmp(recipe_str(r, "run.backward_gemm"), "det") ? MM_FAST : MM_DET,
                     .balance_alpha = (float)recipe_float(r, "grpo.balance_alpha")};
    if ((rc = backend_from_recipe(r, &mo.backend, e))) {
        params_free(&p);
        goto fail;
    }
    if ((rc = model_init(&J->m, &p, &mo, T_max, e))) goto fail;
    if (c->loss.beta > 0) {
        model_params q;
        memset(&q, 0, sizeof q);
        if ((rc = load_policy(J, init_dir, &q, e))) {
            params_free(&q);
            goto fail;
        }
        J->has_ref = 1; /* model_free accepts a half-built model */
        if ((rc = model_init(&J->ref, &q, &mo, c->micro_batch_tokens, e))) goto fail;
    }
    if ((rc = params_alloc_grad(&J->m.p, e))) goto fail;
    if ((rc = adamw_init(&J->opt, &J->m.p, c->adam, e))) goto fail;
    J->order = mem_alloc(J->D.n_train * sizeof *J->order);
    J->load_sum = mem_calloc((size_t)J->m.p.n_layers *
                                 (size_t)(J->m.p.cfg.n_routed_experts > 0 ? J->m.p.cfg.n_routed_experts : 1),
                             sizeof(int64_t));
    if (!J->order || !J->load_sum) {
        rc = err_set(e, MR_ENOMEM, "grpo: out of memory");
        goto fail;
    }
    { /* the tables of routing replay: only MoE layers of the main model route */
        const model_params *mp = &J->m.p;
        J->K = mp->cfg.num_experts_per_tok;
        if (!(J->moe_layers = mem_calloc((size_t)mp->n_layers + 1, sizeof *J->moe_layers)) ||
            !(J->replay = mem_calloc((size_t)mp->n_layers + MODEL_MAX_MTP, sizeof *J->replay))) {
            rc = err_set(e, MR_ENOMEM, "grpo: out of memory");
            goto fail;
        }
        for (int l = 0; l < mp->n_layers; l++)
            if (mp->w.layers[l].is_moe) J->moe_layers[J->n_moe++] = l;
    }
    if (c->routing_replay) {
        if (J->n_moe > 0 &&
            !(J->replay_buf = mem_alloc((size_t)J->n_moe * (size_t)J->T_cap * (size_t)J->K * sizeof(int32_t)))) {
            rc = err_set(e, MR_ENOMEM, "grpo: out of memory for the routing replay buffers");
            goto fail;
        }
        if (J->n_moe == 0) fprintf(stderr, "grpo: note: grpo.routing_replay has no effect: the model has no MoE layer\n");
    }

    /* resume: weights, optimizer and state of the newest checkpoint */
    if (resume) {
        model_params lp;
        if ((rc = params_load(&lp, ckpt, e))) goto fail;
        if (lp.n != J->m.p.n) {
            params_free(&lp);
            rc = err_set(e, MR_EFORMAT, "%s: the checkpoint's model has %zu parameters, the recipe's %zu", ckpt, lp.n,
                         J->m.p.n);
            goto fail;
        }
        rc = params_copy_from_host(&J->m.p, lp.data, 0, lp.n, e);
        params_free(&lp);
        if (rc) goto fail;
        if ((rc = adamw_load(&J->opt, &J->m.p, ckpt, e))) goto fail;
        if ((rc = ckpt_read_state(ckpt, &sj, e))) goto fail;
        if ((rc = state_parse(&J->st, sj, ckpt, e))) goto fail;
        mem_free(sj);
        sj = NULL;
        fprintf(stderr, "grpo: resuming from %s (step %lld)\n", ckpt, (long long)J->st.step);
    }

    /* run store */
    if ((rc = runstore_open(&J->rs, recipe_str(r, "run.store"), e))) goto fail;
    if (resume) {
        if ((rc = runstore_resume_run(J->rs, J->st.run_id, e))) goto fail;
    } else {
        if (recipe_dump_yaml(r, &yaml)) {
            rc = err_set(e, MR_ENOMEM, "grpo: out of memory");
            goto fail;
        }
        if ((rc = runstore_begin_run(J->rs, "grpo", recipe_str(r, "run.name"), yaml, (int64_t)c->seed, &J->st.run_id,
                                     e)))
            goto fail;
        if ((rc = dir_make(out_dir, e))) goto fail;
    }
    fprintf(stderr, "grpo: run %lld in %s, threads %d\n", (long long)J->st.run_id, recipe_str(r, "run.store"),
            omp_get_max_threads());
    if (!resume && (rc = run_eval(J, 0, e))) goto fail;

    progress pb;
    progress_init(&pb, "grpo", "steps", c->steps);
    int64_t done_here = 0;
    while (J->st.step < c->steps) {
        if ((rc = grpo_step(J, &mb, e))) goto fail;
        done_here++;
        char extra[128];
        double rm = 0;
        for (size_t i = 0; i < J->n_metrics; i++)
            if (!strcmp(J->names[i], "reward/mean")) rm = J->values[i];
        snprintf(extra, sizeof extra, "reward %.3f", rm);
        progress_update(&pb, J->st.step, extra);
        if (c->max_bad_steps > 0 && J->st.bad_in_row >= c->max_bad_steps) {
            rc = err_set(e, MR_ERANGE, "grpo: %lld steps in a row had only non-finite gradients; stopping at step %lld",
                         (long long)J->st.bad_in_row, (long long)J->st.step);
            goto fail;
        }
        int last = J->st.step == c->steps;
        if ((c->eval_every > 0 && J->st.step % c->eval_every == 0) || last)
            if ((rc = run_eval(J, J->st.step, e))) goto fail;
        if ((c->checkpoint_every > 0 && J->st.step % c->checkpoint_every == 0) || last) {
            char path[4200];
            if (!(sj = state_json(&J->st))) {
                rc = err_set(e, MR_ENOMEM, "grpo: out of memory");
                goto fail;
            }
            if ((rc = ckpt_save(out_dir, J->st.step, &J->m.p, &J->opt, sj, J->D.tok_dir, c->keep_checkpoints, path,
                                sizeof path, e)))
                goto fail;
            mem_free(sj);
            sj = NULL;
            mr_err e2 = {0};
            char model_file[4300], hex[65];
            snprintf(model_file, sizeof model_file, "%s/model.safetensors", path);
            int have = sha256_file(model_file, hex, &e2) == 0;
            runstore_log_checkpoint(J->rs, J->st.run_id, J->st.step, path, have ? hex : NULL, &e2);
        }
        if (stop_after > 0 && done_here >= stop_after) break;
    }
    progress_finish(&pb, "");
    if (J->st.step == c->steps) runstore_end_run(J->rs, J->st.run_id, RUN_OK, e);
    fprintf(stderr, "grpo: done at step %lld, checkpoint in %s/step-%08lld\n", (long long)J->st.step, out_dir,
            (long long)J->st.step);
    rc = MR_OK;
    goto done;
fail:
    if (J->rs && J->st.run_id) {
        mr_err e2 = {0};
        runstore_log_event(J->rs, J->st.run_id, EVENT_ERROR, e->msg, &e2);
        runstore_end_run(J->rs, J->st.run_id, RUN_FAILED, &e2);
    }
done:
    micro_free(&mb);
    mem_free(sj);
    mem_free(yaml);
    job_free(J);
    mem_free(J);
    return rc;
}
