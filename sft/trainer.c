/* trainer.c: the SFT loop (see trainer.h). */
#include "sft/trainer.h"

#include <cjson/cJSON.h>
#include <math.h>
#include <stdio.h>
#include <string.h>

#include "core/mem.h"
#include "core/sha256.h"
#include "core/progress.h"
#include "core/rng.h"
#include "kernels/backend.h"
#include "kernels/cpu/moe.h"
#include "sft/checkpoint.h"

#define STREAM_SHUFFLE 0x5348554646ull /* "SHUFF" */

void sft_epoch_order(size_t *order, size_t n, uint64_t seed, int64_t epoch) {
    for (size_t i = 0; i < n; i++) order[i] = i;
    rng r;
    rng_init(&r, seed, rng_stream_id(STREAM_SHUFFLE, (uint64_t)epoch, 0));
    for (size_t i = n; i > 1; i--) { /* Fisher-Yates */
        size_t j = rng_below(&r, (uint32_t)i);
        size_t t = order[i - 1];
        order[i - 1] = order[j];
        order[j] = t;
    }
}

void sft_micro_free(sft_micro *mb) {
    if (!mb) return;
    mem_free(mb->ids);
    mem_free(mb->pos);
    mem_free(mb->doc);
    mem_free(mb->tgt);
    memset(mb, 0, sizeof *mb);
}

static int micro_reserve(sft_micro *mb, int T, mr_err *e) {
    if (T <= mb->cap) return MR_OK;
    int32_t **arr[4] = {&mb->ids, &mb->pos, &mb->doc, &mb->tgt};
    for (int i = 0; i < 4; i++) {
        int32_t *g = mem_realloc(*arr[i], (size_t)T * sizeof(int32_t));
        if (!g) return err_set(e, MR_ENOMEM, "sft: out of memory packing %d tokens", T);
        *arr[i] = g;
    }
    mb->cap = T;
    return MR_OK;
}

int sft_pack(sft_micro *mb, const sft_example *ex, const size_t *order, size_t from, size_t count, int max_seq_len,
             int packing, int loss_all, int32_t pad_id, mr_err *e) {
    int T = 0;
    for (size_t i = 0; i < count; i++) {
        int n = ex[order[from + i]].n;
        T += packing ? (n < max_seq_len ? n : max_seq_len) : max_seq_len;
    }
    int rc = micro_reserve(mb, T, e);
    if (rc) return rc;
    int t = 0;
    mb->n_loss = 0;
    for (size_t i = 0; i < count; i++) {
        const sft_example *x = &ex[order[from + i]];
        int n = x->n < max_seq_len ? x->n : max_seq_len;
        int start = t;
        for (int j = 0; j < n; j++, t++) {
            mb->ids[t] = x->ids[j];
            mb->pos[t] = j;
            mb->doc[t] = start;
            /* row j predicts ids[j+1]: a completion token (or any token with loss_all) */
            int has = j + 1 < n && (loss_all || j + 1 >= x->n_prompt);
            mb->tgt[t] = has ? x->ids[j + 1] : -1;
            mb->n_loss += has;
        }
        if (!packing)
            for (int j = n; j < max_seq_len; j++, t++) { /* padding: one-token documents, no loss */
                mb->ids[t] = pad_id;
                mb->pos[t] = 0;
                mb->doc[t] = t;
                mb->tgt[t] = -1;
            }
    }
    mb->T = T;
    return MR_OK;
}

/* ---------------------------------------------------------------------------------------------- state */

typedef struct train_state {
    int64_t step, epoch, index, tokens, bad_in_row, skipped, run_id;
} train_state;

static char *state_json(const train_state *s) {
    char buf[512];
    snprintf(buf, sizeof buf,
             "{\n  \"format\": \"moerl-sft-state-1\",\n  \"step\": %lld,\n  \"epoch\": %lld,\n  \"index\": %lld,\n"
             "  \"tokens\": %lld,\n  \"bad_in_row\": %lld,\n  \"skipped\": %lld,\n  \"run_id\": %lld\n}\n",
             (long long)s->step, (long long)s->epoch, (long long)s->index, (long long)s->tokens,
             (long long)s->bad_in_row, (long long)s->skipped, (long long)s->run_id);
    return mem_strdup(buf);
}

static int state_parse(train_state *s, const char *json, const char *where, mr_err *e) {
    cJSON *j = cJSON_Parse(json);
    if (!j) return err_set(e, MR_EFORMAT, "%s/trainer_state.json: malformed JSON", where);
    static const char *keys[] = {"step", "epoch", "index", "tokens", "bad_in_row", "skipped", "run_id"};
    int64_t *dst[] = {&s->step, &s->epoch, &s->index, &s->tokens, &s->bad_in_row, &s->skipped, &s->run_id};
    int rc = MR_OK;
    for (int i = 0; i < 7; i++) {
        cJSON *v = cJSON_GetObjectItemCaseSensitive(j, keys[i]);
        if (!cJSON_IsNumber(v) || v->valuedouble < 0) {
            rc = err_set(e, MR_EFORMAT, "%s/trainer_state.json: %s: expected a non-negative integer", where, keys[i]);
            break;
        }
        *dst[i] = (int64_t)v->valuedouble;
    }
    cJSON_Delete(j);
    return rc;
}

/* --------------------------------------------------------------------------------------------- metrics */

typedef struct metrics {
    const char *names[256];
    double values[256];
    char store[256][64];
    size_t n;
} metrics;

static void put(metrics *M, const char *name, double v) {
    if (M->n >= 256) return;
    snprintf(M->store[M->n], sizeof M->store[0], "%s", name);
    M->names[M->n] = M->store[M->n];
    M->values[M->n++] = v;
}

/* ------------------------------------------------------------------------------------------------ loop */

int sft_train(model *m, const sft_example *ex, size_t n_ex, const sft_cfg *cfg, const sft_hooks *hooks, int resume,
              sft_result *res, mr_err *e) {
    const int per_mb = cfg->batch_seqs / cfg->grad_accum;
    if (n_ex == 0) return err_set(e, MR_EINVAL, "sft: no training examples");
    if (cfg->grad_accum < 1 || cfg->batch_seqs % cfg->grad_accum)
        return err_set(e, MR_EINVAL, "sft: grad_accum (%d) must divide batch_seqs (%d)", cfg->grad_accum,
                       cfg->batch_seqs);
    if ((size_t)cfg->batch_seqs > n_ex)
        return err_set(e, MR_EINVAL, "sft: batch_seqs (%d) is larger than the dataset (%zu examples)",
                       cfg->batch_seqs, n_ex);
    int rc;
    adamw opt;
    memset(&opt, 0, sizeof opt);
    sft_micro *mbs = mem_calloc((size_t)cfg->grad_accum, sizeof *mbs);
    size_t *order = mem_alloc(n_ex * sizeof *order);
    const model_config *c = &m->p.cfg;
    int64_t *load_sum = mem_calloc((size_t)m->p.n_layers * (size_t)(c->n_routed_experts > 0 ? c->n_routed_experts : 1),
                                   sizeof(int64_t));
    float *bias = mem_alloc(sizeof(float) * (size_t)(c->n_routed_experts > 0 ? c->n_routed_experts : 1));
    char *sj = NULL;
    train_state st = {0};
    sft_result r0 = {0};
    if (!mbs || !order || !load_sum || !bias) {
        rc = err_set(e, MR_ENOMEM, "sft: out of memory");
        goto done;
    }
    if ((rc = params_alloc_grad(&m->p, e))) goto done;
    if ((rc = adamw_init(&opt, &m->p, cfg->adam, e))) goto done;

    if (resume) {
        char dir[4200];
        int64_t s;
        if ((rc = ckpt_latest(cfg->out_dir, dir, sizeof dir, &s, e))) goto done;
        model_params lp;
        if ((rc = params_load(&lp, dir, e))) goto done;
        if (lp.n != m->p.n) {
            params_free(&lp);
            rc = err_set(e, MR_EFORMAT, "%s: the checkpoint's model has %zu parameters, the recipe's %zu", dir, lp.n,
                         m->p.n);
            goto done;
        }
        rc = params_copy_from_host(&m->p, lp.data, 0, lp.n, e);
        params_free(&lp);
        if (rc) goto done;
        if ((rc = adamw_load(&opt, &m->p, dir, e))) goto done;
        if ((rc = ckpt_read_state(dir, &sj, e))) goto done;
        if ((rc = state_parse(&st, sj, dir, e))) goto done;
        mem_free(sj);
        sj = NULL;
        if (hooks && hooks->run_id_io) *hooks->run_id_io = st.run_id;
        fprintf(stderr, "sft: resuming from %s (step %lld)\n", dir, (long long)st.step);
    } else if (hooks && hooks->run_id_io) {
        st.run_id = *hooks->run_id_io;
    }
    sft_epoch_order(order, n_ex, cfg->seed, st.epoch);

    progress pb;
    progress_init(&pb, "sft", "steps", cfg->steps);
    int64_t done_here = 0;
    while (st.step < cfg->steps) {
        double t0 = progress_now();
        /* the step's micro-batches, taken from the epoch order (a new epoch reshuffles) */
        int64_t n_step = 0;
        for (int a = 0; a < cfg->grad_accum; a++) {
            if (st.index + per_mb > (int64_t)n_ex) {
                st.epoch++;
                st.index = 0;
                sft_epoch_order(order, n_ex, cfg->seed, st.epoch);
            }
            if ((rc = sft_pack(&mbs[a], ex, order, (size_t)st.index, (size_t)per_mb, cfg->max_seq_len, cfg->packing,
                               cfg->loss_all, cfg->pad_id, e)))
                goto done;
            st.index += per_mb;
            n_step += mbs[a].n_loss;
        }
        params_zero_grad(&m->p);
        size_t E = (size_t)(c->n_routed_experts > 0 ? c->n_routed_experts : 1);
        memset(load_sum, 0, (size_t)m->p.n_layers * E * sizeof(int64_t));
        double loss = 0, mtp = 0, bal = 0;
        int64_t tokens = 0;
        for (int a = 0; a < cfg->grad_accum; a++) {
            sft_micro *mb = &mbs[a];
            model_batch b = {.ids = mb->ids, .pos = mb->pos, .doc_start = mb->doc, .targets = mb->tgt, .T = mb->T,
                             .loss_weight = n_step > 0 ? (float)((double)mb->n_loss / (double)n_step) : 1.0f};
            model_loss ls;
            if ((rc = model_forward(m, &b, 1, &ls, e))) goto done;
            if ((rc = model_backward(m, &b, e))) goto done;
            loss += ls.main * (double)mb->n_loss;
            mtp += ls.mtp[0] * (double)mb->n_loss;
            bal += ls.balance / cfg->grad_accum;
            tokens += mb->T;
            for (int l = 0; l < m->p.n_layers; l++) {
                const int64_t *ld = model_layer_load(m, l);
                if (ld)
                    for (size_t x = 0; x < E; x++) load_sum[(size_t)l * E + x] += ld[x];
            }
        }
        loss = n_step ? loss / (double)n_step : 0;
        mtp = n_step ? mtp / (double)n_step : 0;
        double lr = sched_lr(&cfg->sched, st.step);
        mr_err ge = {0};
        int finite = isfinite(loss) && grad_check_finite(&m->p, &ge) == MR_OK;
        double gnorm = NAN;
        metrics M = {.n = 0};
        if (finite) {
            gnorm = cfg->grad_clip > 0 ? grad_clip(&m->p, cfg->grad_clip) : grad_norm(&m->p);
            adamw_step(&opt, &m->p, lr);
            /* §9.1 aux-loss-free balancing: once per optimizer step, from the step's summed loads */
            for (int l = 0; l < m->p.n_layers; l++)
                if (m->p.w.layers[l].is_moe && m->p.w.layers[l].moe.bias && cfg->bias_gamma > 0 &&
                    (rc = model_bias_update(m, l, load_sum + (size_t)l * E, cfg->bias_gamma, e)))
                    goto done;
            st.bad_in_row = 0;
        } else {
            st.skipped++;
            st.bad_in_row++;
            fprintf(stderr, "sft: step %lld skipped: %s\n", (long long)st.step,
                    isfinite(loss) ? ge.msg : "the loss is not finite");
            if (hooks && hooks->rs) {
                mr_err e2 = {0};
                char msg[2200];
                snprintf(msg, sizeof msg, "step %lld skipped: %s", (long long)st.step,
                         isfinite(loss) ? ge.msg : "the loss is not finite");
                runstore_log_event(hooks->rs, hooks->run_id, EVENT_WARNING, msg, &e2);
            }
        }
        st.tokens += n_step;
        st.step++;
        done_here++;
        double dt = progress_now() - t0;
        if (r0.steps_done == 0 && done_here == 1) r0.first_loss = loss;
        r0.last_loss = loss;
        put(&M, "train/loss", loss);
        if (c->num_nextn_predict_layers > 0 && cfg->mtp_weight > 0) put(&M, "train/mtp_loss", mtp);
        if (cfg->balance_alpha > 0) put(&M, "train/balance_loss", bal);
        put(&M, "optim/lr", lr);
        put(&M, "optim/grad_norm", gnorm);
        put(&M, "optim/skipped_steps", (double)st.skipped);
        put(&M, "tput/train_tok_s", dt > 0 ? (double)tokens / dt : 0);
        put(&M, "train/loss_tokens", (double)n_step);
        if (m->be->mem_stats) {
            size_t used, peak;
            m->be->mem_stats(&used, &peak);
            put(&M, "mem/peak_device_gb", (double)peak / (1024.0 * 1024.0 * 1024.0));
        }
        double bias_abs = 0;
        for (int l = 0; l < m->p.n_layers; l++) {
            if (!m->p.w.layers[l].is_moe) continue;
            int64_t mx;
            double mean;
            moe_load_stats(load_sum + (size_t)l * E, (int)E, &mx, &mean);
            char name[64];
            snprintf(name, sizeof name, "moe/load_max_over_mean/layer%d", l);
            put(&M, name, mean > 0 ? (double)mx / mean : 0);
            if (m->p.w.layers[l].moe.bias) {
                if ((rc = model_router_bias(m, l, bias, e))) goto done;
                float lo = bias[0], hi = bias[0];
                for (size_t x = 0; x < E; x++) {
                    lo = bias[x] < lo ? bias[x] : lo;
                    hi = bias[x] > hi ? bias[x] : hi;
                    bias_abs = fmax(bias_abs, fabs(bias[x]));
                }
                snprintf(name, sizeof name, "moe/bias_range/layer%d", l);
                put(&M, name, (double)(hi - lo));
            }
        }
        put(&M, "moe/bias_absmax", bias_abs);
        if (hooks && hooks->rs && (rc = runstore_log_metrics(hooks->rs, hooks->run_id, st.step, M.n, M.names,
                                                             M.values, e)))
            goto done;
        if (hooks && hooks->progress) {
            char extra[96];
            snprintf(extra, sizeof extra, "loss %.4f lr %.2e", loss, lr);
            progress_update(&pb, st.step, extra);
        }
        if (cfg->max_bad_steps > 0 && st.bad_in_row >= cfg->max_bad_steps) {
            rc = err_set(e, MR_ERANGE, "sft: %lld steps in a row had a non-finite loss or gradient; stopping at step %lld",
                         (long long)st.bad_in_row, (long long)st.step);
            goto done;
        }
        int last = st.step == cfg->steps;
        if (hooks && hooks->eval && ((cfg->eval_every > 0 && st.step % cfg->eval_every == 0) || last))
            if ((rc = hooks->eval(hooks->ud, m, st.step, e))) goto done;
        if ((cfg->checkpoint_every > 0 && st.step % cfg->checkpoint_every == 0) || last) {
            sj = state_json(&st);
            char path[4200];
            if (!sj) {
                rc = err_set(e, MR_ENOMEM, "sft: out of memory");
                goto done;
            }
            if ((rc = ckpt_save(cfg->out_dir, st.step, &m->p, &opt, sj, cfg->tokenizer_dir, cfg->keep_checkpoints,
                                path, sizeof path, e)))
                goto done;
            mem_free(sj);
            sj = NULL;
            if (hooks && hooks->rs) {
                mr_err e2 = {0};
                char model_file[4300], hex[65];
                snprintf(model_file, sizeof model_file, "%s/model.safetensors", path);
                int have = sha256_file(model_file, hex, &e2) == 0;
                runstore_log_checkpoint(hooks->rs, hooks->run_id, st.step, path, have ? hex : NULL, &e2);
            }
        }
        if (cfg->stop_after > 0 && done_here >= cfg->stop_after) break;
    }
    if (hooks && hooks->progress) {
        char extra[64];
        snprintf(extra, sizeof extra, "loss %.4f", r0.last_loss);
        progress_finish(&pb, extra);
    }
    rc = MR_OK;
done:
    r0.steps_done = st.step;
    r0.skipped = st.skipped;
    r0.tokens = st.tokens;
    if (res) *res = r0;
    mem_free(sj);
    for (int a = 0; mbs && a < cfg->grad_accum; a++) sft_micro_free(&mbs[a]);
    mem_free(mbs);
    mem_free(order);
    mem_free(load_sum);
    mem_free(bias);
    adamw_free(&opt);
    return rc;
}
