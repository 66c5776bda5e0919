/* sft.c: the SFT job (see sft.h). */
#include "sft/sft.h"

#include <cjson/cJSON.h>
#include <ctype.h>
#include <math.h>
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/mem.h"
#include "core/progress.h"
#include "core/runstore.h"
#include "kernels/backend.h"
#include "model/model.h"
#include "model/setup.h"
#include "rollout/greedy.h"
#include "sft/checkpoint.h"
#include "sft/data_setup.h"
#include "sft/trainer.h"
#include "tokenizer/tokenizer.h"

/* ------------------------------------------------------------------------------------ answers */

static void trim_copy(const char *s, size_t n, char *out, size_t cap) {
    while (n && isspace((unsigned char)*s)) s++, n--;
    while (n && (isspace((unsigned char)s[n - 1]) || s[n - 1] == '.')) n--;
    if (n >= cap) n = cap - 1;
    memcpy(out, s, n);
    out[n] = '\0';
}

void sft_extract_answer(const char *text, char *out, size_t cap) {
    out[0] = '\0';
    const char *h = NULL;
    for (const char *p = strstr(text, "####"); p; p = strstr(p + 4, "####")) h = p;
    if (h) {
        h += 4;
        size_t n = strcspn(h, "\n");
        trim_copy(h, n, out, cap);
        return;
    }
    const char *b = NULL;
    for (const char *p = strstr(text, "\\boxed{"); p; p = strstr(p + 7, "\\boxed{")) b = p;
    if (b) {
        b += 7;
        int depth = 1;
        const char *q = b;
        while (*q && depth) {
            if (*q == '{') depth++;
            else if (*q == '}') depth--;
            if (depth) q++;
        }
        trim_copy(b, (size_t)(q - b), out, cap);
        return;
    }
    const char *last = NULL, *end = NULL;
    for (const char *p = text; *p; p++) {
        if (isdigit((unsigned char)*p) && (p == text || !isdigit((unsigned char)p[-1]))) {
            const char *s = p > text && p[-1] == '-' ? p - 1 : p;
            const char *q = p;
            while (isdigit((unsigned char)*q) || (*q == '.' && isdigit((unsigned char)q[1]))) q++;
            last = s;
            end = q;
            p = q - 1;
        }
    }
    if (last) trim_copy(last, (size_t)(end - last), out, cap);
}

static int answers_equal(const char *a, const char *b) {
    if (!*a || !*b) return 0;
    if (!strcmp(a, b)) return 1;
    char *ea, *eb;
    double x = strtod(a, &ea), y = strtod(b, &eb);
    return *ea == '\0' && *eb == '\0' && x == y;
}

/* ------------------------------------------------------------------------------------ the job */

typedef struct job {
    const recipe *r;
    sft_data data;
    model m;
    runstore *rs;
    int64_t run_id;
    int eval_rows;      /* rows used for exact match */
    int max_new;
} job;

/* eval/loss over the held-out examples (token mean) and eval/exact_match by greedy generation. */
static int eval_hook(void *ud, model *m, int64_t step, mr_err *e) {
    job *J = ud;
    const sft_data *D = &J->data;
    if (D->n_eval == 0) return MR_OK;
    double t0 = progress_now();
    /* loss: examples packed into batches of at most T_max tokens */
    double sum = 0;
    int64_t count = 0;
    sft_micro mb = {0};
    size_t *order = mem_alloc(D->n_eval * sizeof *order);
    if (!order) return err_set(e, MR_ENOMEM, "eval: out of memory");
    for (size_t i = 0; i < D->n_eval; i++) order[i] = i;
    int rc = MR_OK;
    size_t i = 0;
    while (i < D->n_eval) {
        size_t k = 0;
        int T = 0;
        while (i + k < D->n_eval && T + D->eval[i + k].n <= m->T_max) T += D->eval[i + k++].n;
        if (k == 0) { i++; continue; } /* longer than a batch: skipped */
        if ((rc = sft_pack(&mb, D->eval, order, i, k, m->T_max, 1, 0, 0, e))) goto done;
        model_batch b = {.ids = mb.ids, .pos = mb.pos, .doc_start = mb.doc, .targets = mb.tgt, .T = mb.T, .skip_mtp = 1};
        model_loss ls;
        if ((rc = model_forward(m, &b, 0, &ls, e))) goto done;
        sum += ls.main * (double)ls.n_main;
        count += ls.n_main;
        i += k;
    }
    /* exact match on the rows with an answer */
    int n = 0, hits = 0;
    const int32_t **pr = mem_alloc(sizeof *pr * (size_t)(J->eval_rows ? J->eval_rows : 1));
    int *pl = mem_alloc(sizeof *pl * (size_t)(J->eval_rows ? J->eval_rows : 1));
    int32_t **out = mem_calloc((size_t)(J->eval_rows ? J->eval_rows : 1), sizeof *out);
    int *ol = mem_alloc(sizeof *ol * (size_t)(J->eval_rows ? J->eval_rows : 1));
    int *which = mem_alloc(sizeof *which * (size_t)(J->eval_rows ? J->eval_rows : 1));
    if (!pr || !pl || !out || !ol || !which) {
        rc = err_set(e, MR_ENOMEM, "eval: out of memory");
        goto em_done;
    }
    for (size_t x = 0; x < D->n_eval && n < J->eval_rows; x++) {
        if (!D->eval_answer[x] || !D->eval_answer[x][0]) continue;
        pr[n] = D->eval[x].ids;
        pl[n] = D->eval[x].n_prompt;
        which[n++] = (int)x;
    }
    if (n > 0) {
        if ((rc = greedy_generate(m, pr, pl, n, J->max_new, tok_eos_id(D->tok), out, ol, e))) goto em_done;
        for (int q = 0; q < n; q++) {
            char *text = NULL;
            size_t len;
            if ((rc = tok_decode(D->tok, out[q], (size_t)ol[q], 1, &text, &len, e))) goto em_done;
            char got[128];
            sft_extract_answer(text, got, sizeof got);
            hits += answers_equal(got, D->eval_answer[which[q]]);
            mem_free(text);
        }
    }
    double loss = count ? sum / (double)count : NAN, em = n ? (double)hits / n : NAN;
    const char *names[] = {"eval/loss", "eval/exact_match", "eval/exact_match_n", "time/eval"};
    double values[] = {loss, em, (double)n, progress_now() - t0};
    fprintf(stderr, "eval at step %lld: loss %.4f, exact match %.1f%% (%d/%d) [%.1fs]\n", (long long)step, loss,
            100.0 * em, hits, n, values[3]);
    if (J->rs) rc = runstore_log_metrics(J->rs, J->run_id, step, 4, names, values, e);
em_done:
    for (int q = 0; out && q < n; q++) mem_free(out[q]);
    mem_free(pr);
    mem_free(pl);
    mem_free(out);
    mem_free(ol);
    mem_free(which);
done:
    sft_micro_free(&mb);
    mem_free(order);
    return rc;
}

int sft_run(const recipe *r, int resume, mr_err *e) {
    job J;
    memset(&J, 0, sizeof J);
    J.r = r;
    int rc;
    const char *out_dir = recipe_str(r, "run.out_dir");
    uint64_t seed = (uint64_t)recipe_int(r, "run.seed");
    if (recipe_int(r, "run.threads") > 0) omp_set_num_threads((int)recipe_int(r, "run.threads"));
    if (!recipe_is_set(r, "sft.steps") && !recipe_is_set(r, "sft.epochs"))
        return err_set(e, MR_EINVAL, "%s: sft: set sft.steps or sft.epochs", recipe_source(r));
    if ((rc = dir_make(out_dir, e))) return rc;
    char *yaml = NULL;
    if (recipe_dump_yaml(r, &yaml)) return err_set(e, MR_ENOMEM, "out of memory");
    int64_t ckpt_step = -1;
    char ckpt[4200] = "";
    if (resume && (rc = ckpt_latest(out_dir, ckpt, sizeof ckpt, &ckpt_step, e))) goto fail;

    /* data and tokenizer (a resumed run reuses the tokenizer it trained) */
    if ((rc = sft_data_setup(&J.data, r, resume, e))) goto fail;
    const sft_data *D = &J.data;
    fprintf(stderr, "sft: %zu training examples, %zu held-out; tokenizer %s (vocab %d)\n", D->n_train, D->n_eval,
            D->tok_dir, tok_vocab_size(D->tok));

    /* model */
    model_config c;
    if ((rc = model_config_from_recipe(&c, r, e))) goto fail;
    if (!recipe_is_set(r, "model.checkpoint") && !recipe_is_set(r, "model.overrides.vocab_size"))
        c.vocab_size = tok_vocab_size(D->tok);
    if (tok_vocab_size(D->tok) > c.vocab_size) {
        rc = err_set(e, MR_EINVAL, "%s: the tokenizer has %d tokens but the model's vocab_size is %d", recipe_source(r),
                     tok_vocab_size(D->tok), c.vocab_size);
        goto fail;
    }
    model_params p;
    if (recipe_is_set(r, "model.checkpoint")) rc = params_load(&p, recipe_str(r, "model.checkpoint"), e);
    else if (!(rc = params_init(&p, &c, e))) params_init_random(&p, seed, (float)recipe_float(r, "model.init_std"));
    if (rc) goto fail;
    const int batch = (int)recipe_int(r, "sft.batch_seqs"), accum = (int)recipe_int(r, "sft.grad_accum");
    const int max_seq = (int)recipe_int(r, "data.max_seq_len");
    int T_max = (batch / accum) * max_seq;
    if (T_max < (int)recipe_int(r, "rollout.max_new_tokens") + max_seq) T_max = (int)recipe_int(r, "rollout.max_new_tokens") + max_seq;
    model_opts mo = {.mm = recipe_bool(r, "run.deterministic") ? MM_DET : MM_FAST,
                     .mm_bwd = strcmp(recipe_str(r, "run.backward_gemm"), "det") ? MM_FAST : MM_DET,
                     .mtp_weight = (float)recipe_float(r, "sft.mtp_weight"),
                     .balance_alpha = (float)recipe_float(r, "sft.balance_alpha")};
    if ((rc = backend_from_recipe(r, &mo.backend, e))) {
        params_free(&p);
        goto fail;
    }
    if ((rc = model_init(&J.m, &p, &mo, T_max, e))) goto fail;

    /* run store: a new run, or the interrupted one again */
    if ((rc = runstore_open(&J.rs, recipe_str(r, "run.store"), e))) goto fail;
    if (resume) {
        char *sj = NULL;
        if ((rc = ckpt_read_state(ckpt, &sj, e))) goto fail;
        cJSON *js = cJSON_Parse(sj);
        mem_free(sj);
        cJSON *id = js ? cJSON_GetObjectItemCaseSensitive(js, "run_id") : NULL;
        J.run_id = cJSON_IsNumber(id) ? (int64_t)id->valuedouble : 0;
        cJSON_Delete(js);
        if (J.run_id <= 0) {
            rc = err_set(e, MR_EFORMAT, "%s/trainer_state.json: run_id: expected a positive integer", ckpt);
            goto fail;
        }
        if ((rc = runstore_resume_run(J.rs, J.run_id, e))) goto fail;
    } else {
        if ((rc = runstore_begin_run(J.rs, "sft", recipe_str(r, "run.name"), yaml, (int64_t)seed, &J.run_id, e))) goto fail;
    }
    fprintf(stderr, "sft: run %lld in %s\n", (long long)J.run_id, recipe_str(r, "run.store"));

    int64_t steps = recipe_is_set(r, "sft.steps")
                        ? recipe_int(r, "sft.steps")
                        : (int64_t)ceil(recipe_float(r, "sft.epochs") * (double)D->n_train / batch);
    sft_cfg sc = {
        .seed = seed, .steps = steps, .batch_seqs = batch, .grad_accum = accum, .max_seq_len = max_seq,
        .packing = recipe_bool(r, "data.packing"), .loss_all = !strcmp(recipe_str(r, "data.loss_on"), "all"),
        .pad_id = tok_pad_id(D->tok) >= 0 ? tok_pad_id(D->tok) : 0,
        .mtp_weight = mo.mtp_weight, .balance_alpha = mo.balance_alpha,
        .bias_gamma = (float)recipe_float(r, "sft.bias_update_speed"),
        .adam = {.beta1 = recipe_float(r, "optim.betas[0]"), .beta2 = recipe_float(r, "optim.betas[1]"),
                 .eps = recipe_float(r, "optim.eps"), .weight_decay = recipe_float(r, "optim.weight_decay")},
        .sched = {.lr = recipe_float(r, "optim.lr"), .warmup_steps = recipe_int(r, "optim.warmup_steps"),
                  .total_steps = steps, .min_lr_ratio = recipe_float(r, "optim.min_lr_ratio")},
        .grad_clip = recipe_float(r, "optim.grad_clip"),
        .checkpoint_every = recipe_int(r, "run.checkpoint_every"),
        .keep_checkpoints = (int)recipe_int(r, "run.keep_checkpoints"),
        .eval_every = recipe_int(r, "sft.eval_every"), .max_bad_steps = 5, .out_dir = out_dir,
        .tokenizer_dir = D->tok_dir};
    if ((rc = sched_kind_parse(recipe_str(r, "optim.schedule"), &sc.sched.kind, e))) goto fail;
    J.eval_rows = (int)(D->n_eval < 200 ? D->n_eval : 200);
    J.max_new = (int)recipe_int(r, "rollout.max_new_tokens");
    sft_hooks hk = {.rs = J.rs, .run_id = J.run_id, .progress = 1, .eval = eval_hook, .ud = &J,
                    .run_id_io = &J.run_id};
    fprintf(stderr, "sft: %lld steps x %d sequences (%d micro-batches of <= %d tokens), lr %g %s, threads %d\n",
            (long long)steps, batch, accum, T_max, sc.sched.lr, recipe_str(r, "optim.schedule"), omp_get_max_threads());
    sft_result res;
    if ((rc = sft_train(&J.m, D->train, D->n_train, &sc, &hk, resume, &res, e))) goto fail;
    runstore_end_run(J.rs, J.run_id, RUN_OK, e);
    fprintf(stderr, "sft: done, %lld steps, final loss %.4f, checkpoint in %s/step-%08lld\n",
            (long long)res.steps_done, res.last_loss, out_dir, (long long)res.steps_done);
    rc = MR_OK;
    goto done;
fail:
    if (J.rs && J.run_id) {
        mr_err e2 = {0};
        runstore_log_event(J.rs, J.run_id, EVENT_ERROR, e->msg, &e2);
        runstore_end_run(J.rs, J.run_id, RUN_FAILED, &e2);
    }
done:
    model_free(&J.m);
    sft_data_free(&J.data);
    runstore_close(J.rs);
    mem_free(yaml);
    return rc;
}
