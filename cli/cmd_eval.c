/* cmd_eval.c: `moerl eval RECIPE`: the recipe's held-out prompts through the rollout engine and its reward plugins;
 * reports pass@1 (greedy, and the mean over K samples), pass@k (Chen et al. 2021's unbiased estimator) and maj@k,
 * and logs them to the run store as a run of kind "eval".
 *
 * The one idea: one greedy pass (K = 1, temperature 0) and one sampled pass (K samples per prompt with the recipe's
 * rollout settings) over the same prompts; a sample is correct when every plugin scored it and its total reward
 * reaches --threshold; maj@k votes over the final answers extracted as the recipe's math plugin extracts them. */
#include <errno.h>
#include <math.h>
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "cli/cli.h"
#include "core/mem.h"
#include "core/progress.h"
#include "core/recipe.h"
#include "core/runstore.h"
#include "kernels/backend.h"
#include "model/model.h"
#include "model/params.h"
#include "rewards/reward.h"
#include "rollout/eval.h"
#include "rollout/rollout.h"
#include "sft/data_setup.h"

#define ANS_MAX 256

/* One pass: n prompts × G samples, decoded and scored. */
typedef struct pass {
    int n, G;
    rollout_seq *seq;    /* (n·G) */
    char **text;         /* (n·G) completions */
    reward_outcome *oc;  /* (n·G) */
    int64_t tokens;
    double seconds;
    rollout_stats st;    /* decode steps, MTP drafts and acceptances */
} pass;

static void pass_free(pass *p) {
    for (int i = 0; i < p->n * p->G; i++) {
        if (p->seq) rollout_seq_free(&p->seq[i]);
        if (p->text) mem_free(p->text[i]);
    }
    mem_free(p->seq);
    mem_free(p->text);
    mem_free(p->oc);
    memset(p, 0, sizeof *p);
}

static int run_pass(pass *P, model *m, rl_data *D, reward_set *rw, int n, int G, const rollout_opts *o, mr_err *e) {
    memset(P, 0, sizeof *P);
    P->n = n;
    P->G = G;
    const size_t N = (size_t)n * (size_t)G;
    const int32_t **pr = mem_alloc((size_t)n * sizeof *pr);
    int *pl = mem_alloc((size_t)n * sizeof *pl);
    int64_t *pid = mem_alloc((size_t)n * sizeof *pid);
    reward_sample *rs = mem_calloc(N, sizeof *rs);
    P->seq = mem_calloc(N, sizeof *P->seq);
    P->text = mem_calloc(N, sizeof *P->text);
    P->oc = mem_calloc(N, sizeof *P->oc);
    int rc = MR_OK;
    if (!pr || !pl || !pid || !rs || !P->seq || !P->text || !P->oc) {
        rc = err_set(e, MR_ENOMEM, "out of memory");
        goto done;
    }
    for (int i = 0; i < n; i++) {
        pr[i] = D->eval[i].ids;
        pl[i] = D->eval[i].n;
        pid[i] = i;
    }
    rollout_opts oo = *o;
    oo.stats = &P->st;
    double t0 = progress_now();
    if ((rc = rollout_generate(m, D->tok, pr, pl, pid, n, G, &oo, P->seq, e))) goto done;
    for (size_t i = 0; i < N; i++) {
        size_t len;
        if ((rc = tok_decode(D->tok, P->seq[i].tokens, (size_t)P->seq[i].n, 1, &P->text[i], &len, e))) goto done;
        const rl_prompt *p = &D->eval[i / (size_t)G];
        rs[i] = (reward_sample){.prompt = p->text, .completion = P->text[i], .row = p->row, .tokens = P->seq[i].n,
                                .truncated = P->seq[i].truncated};
        P->tokens += P->seq[i].n;
    }
    rc = reward_set_score(rw, rs, N, NULL, P->oc, e);
    P->seconds = progress_now() - t0;
done:
    mem_free(pr);
    mem_free(pl);
    mem_free(pid);
    mem_free(rs);
    return rc;
}

/* How final answers are read: the first math plugin's settings, else the text after the last "####". */
typedef struct answer_rule {
    math_extract mode;
    const char *field;
    double tol;
} answer_rule;

static answer_rule answer_rule_from(const recipe *r) {
    answer_rule a = {MATH_HASH, "answer", 0};
    size_t n = recipe_list_len(r, "rewards");
    for (size_t i = 0; i < n; i++) {
        char item[64], path[128];
        snprintf(item, sizeof item, "rewards[%zu]", i);
        const char *kind = recipe_oneof(r, item);
        if (!kind || strcmp(kind, "math") != 0) continue;
        snprintf(path, sizeof path, "%s.math.extract", item);
        int mode = recipe_enum(r, path);
        a.mode = mode < 0 ? MATH_AUTO : (math_extract)mode;
        snprintf(path, sizeof path, "%s.math.answer_field", item);
        a.field = recipe_str(r, path);
        snprintf(path, sizeof path, "%s.math.tolerance", item);
        a.tol = recipe_float(r, path);
        break;
    }
    return a;
}

static int correct(const reward_outcome *o, double threshold) {
    return o->status == REWARD_SCORE && o->total >= threshold;
}

static int parse_int(const char *s, long lo, long hi, int *out) {
    char *end;
    errno = 0;
    long x = s ? strtol(s, &end, 10) : 0;
    if (!s || errno || end == s || *end || x < lo || x > hi) return -1;
    *out = (int)x;
    return 0;
}

static void usage(void) {
    printf("usage: moerl eval RECIPE.yaml [--set section.key=value ...] [--model DIR] [-k K] [--limit N]\n"
           "                  [--threshold X]\n\n"
           "Runs the recipe's held-out prompts (data.eval, or the data.eval_n rows split off as GRPO splits them)\n"
           "through the rollout engine: once greedily and K times with the recipe's rollout settings (rollout.*,\n"
           "seed run.seed), scores every completion with the recipe's reward plugins and prints\n"
           "  pass@1 (greedy)   fraction of prompts whose greedy completion is correct\n"
           "  pass@1            mean over the K samples\n"
           "  pass@k            unbiased estimator 1 - C(K-c,k)/C(K,k) (Chen et al. 2021), k = 2, 4, ..., K\n"
           "  maj@K             majority vote over the K samples' final answers (the first math plugin's\n"
           "                    extraction, else the text after the last \"####\"), checked against the row's answer\n"
           "and per plugin the mean reward and the unscorable / error / timeout counts. A completion is correct\n"
           "when every plugin scored it and its total reward is >= X. Metrics eval/* go to run.store as a run of\n"
           "kind eval. With --set rollout.mtp_speculative=true (MTP speculative decoding) it also prints the share\n"
           "of drafts accepted, greedy and sampled (eval/mtp_acceptance_greedy, eval/mtp_acceptance).\n"
           "  --model DIR    checkpoint (default: grpo.init_from, else model.checkpoint)\n"
           "  -k K           samples per prompt (default 8)\n"
           "  --limit N      only the first N held-out prompts (default all)\n"
           "  --threshold X  total reward that counts as correct (default 1)\n");
}

int cmd_eval(int argc, char **argv) {
    if (cli_wants_help(argc, argv)) {
        usage();
        return 0;
    }
    const char *path = NULL, *model_dir = NULL;
    int nset = 0, K = 8, limit = 0;
    double threshold = 1.0;
    const char **sets = mem_calloc((size_t)argc + 1, sizeof *sets);
    if (!sets) return 1;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        int bad = 0;
        if (!strcmp(a, "--set") && v) sets[nset++] = argv[++i];
        else if (!strncmp(a, "--set=", 6)) sets[nset++] = a + 6;
        else if (!strcmp(a, "--model") && v) model_dir = argv[++i];
        else if (!strcmp(a, "-k")) bad = parse_int(v, 1, 4096, &K), i++;
        else if (!strcmp(a, "--limit")) bad = parse_int(v, 1, 1 << 30, &limit), i++;
        else if (!strcmp(a, "--threshold")) {
            char *end;
            errno = 0;
            threshold = v ? strtod(v, &end) : NAN;
            bad = !v || errno || end == v || *end || !isfinite(threshold);
            i++;
        } else if (a[0] == '-' || path) {
            fprintf(stderr, "moerl eval: unexpected argument '%s' (see moerl eval --help)\n", a);
            mem_free(sets);
            return 2;
        } else path = a;
        if (bad) {
            fprintf(stderr, "moerl eval: %s: invalid value \"%s\" (see moerl eval --help)\n", a, v ? v : "");
            mem_free(sets);
            return 2;
        }
    }
    if (!path) {
        fprintf(stderr, "moerl eval: missing RECIPE.yaml (see moerl eval --help)\n");
        mem_free(sets);
        return 2;
    }

    mr_err e = {0};
    int status = 1;
    recipe *r = NULL;
    char *yaml = NULL;
    rl_data D;
    model_params prm;
    model m;
    reward_set *rw = NULL;
    runstore *rs = NULL;
    const char **stop = NULL;
    pass greedy, sampled;
    char (*names)[96] = NULL;
    const char **name_p = NULL;
    double *values = NULL;
    char **ans = NULL;
    memset(&D, 0, sizeof D);
    memset(&prm, 0, sizeof prm);
    memset(&m, 0, sizeof m);
    memset(&greedy, 0, sizeof greedy);
    memset(&sampled, 0, sizeof sampled);
    int64_t run_id = -1;

    if (recipe_load(&r, path, &e)) goto fail;
    for (int i = 0; i < nset; i++)
        if (recipe_set(r, sets[i], &e)) goto fail;
    if (recipe_resolve(r, &e) || recipe_dump_yaml(r, &yaml)) goto fail;
    if (!model_dir) model_dir = recipe_is_set(r, "grpo.init_from")    ? recipe_str(r, "grpo.init_from")
                                : recipe_is_set(r, "model.checkpoint") ? recipe_str(r, "model.checkpoint")
                                                                       : NULL;
    if (!model_dir) {
        err_set(&e, MR_EINVAL, "%s: no model to evaluate: pass --model DIR or set grpo.init_from or model.checkpoint",
                path);
        goto fail;
    }
    if (recipe_int(r, "run.threads") > 0) omp_set_num_threads((int)recipe_int(r, "run.threads"));
    char probe[4200];
    const char *tok_pref = NULL;
    snprintf(probe, sizeof probe, "%s/tokenizer.json", model_dir);
    if (!recipe_is_set(r, "tokenizer.path") && access(probe, R_OK) == 0) tok_pref = model_dir;
    if (rl_data_setup(&D, r, tok_pref, 0, &e)) goto fail;
    int n = (int)D.n_eval;
    if (limit > 0 && limit < n) n = limit;
    if (n == 0) {
        err_set(&e, MR_EINVAL, "%s: no held-out prompts to evaluate (data.eval_n is 0 and data.eval is unset)", path);
        goto fail;
    }
    if (params_load(&prm, model_dir, &e)) goto fail;
    if (tok_vocab_size(D.tok) > prm.cfg.vocab_size) {
        err_set(&e, MR_EINVAL, "%s: the tokenizer has %d tokens but the model's vocab_size is %d", model_dir,
                tok_vocab_size(D.tok), prm.cfg.vocab_size);
        goto fail;
    }
    if (reward_set_init(&rw, r, NULL, &e)) goto fail;
    const int n_stop = (int)recipe_list_len(r, "rollout.stop");
    if (!(stop = mem_calloc((size_t)n_stop + 1, sizeof *stop))) goto oom;
    for (int i = 0; i < n_stop; i++) {
        char sp[64];
        snprintf(sp, sizeof sp, "rollout.stop[%d]", i);
        stop[i] = recipe_str(r, sp);
    }
    /* T_max: the longest prompt (prefill) and the decode batch (at most 256 rows at once; 2 rows per sample when
     * MTP speculative decoding verifies a draft) */
    const int rows_per = recipe_bool(r, "rollout.mtp_speculative") ? 2 : 1;
    int T_max = n * K * rows_per < 256 ? n * K * rows_per : 256;
    if (T_max < K * rows_per) T_max = K * rows_per;
    for (int i = 0; i < n; i++)
        if (D.eval[i].n > T_max) T_max = D.eval[i].n;
    model_opts mo = {.mm = recipe_bool(r, "run.deterministic") ? MM_DET : MM_FAST};
    if (backend_from_recipe(r, &mo.backend, &e)) goto fail;
    if (model_init(&m, &prm, &mo, T_max, &e)) goto fail;

    rollout_opts o = rollout_opts_default();
    o.temperature = (float)recipe_float(r, "rollout.temperature");
    o.top_p = (float)recipe_float(r, "rollout.top_p");
    o.top_k = (int)recipe_int(r, "rollout.top_k");
    o.min_p = (float)recipe_float(r, "rollout.min_p");
    o.max_new_tokens = (int)recipe_int(r, "rollout.max_new_tokens");
    o.mtp_speculative = recipe_bool(r, "rollout.mtp_speculative");
    o.stop = n_stop ? stop : NULL;
    o.n_stop = n_stop;
    o.eos = tok_eos_id(D.tok);
    if (o.eos >= m.p.cfg.vocab_size) o.eos = -1;
    o.seed = (uint64_t)recipe_int(r, "run.seed");
    rollout_opts og = o;
    og.temperature = 0;
    og.top_p = 1;
    og.top_k = 0;
    og.min_p = 0;
    fprintf(stderr, "eval: %d held-out prompts x (1 greedy + %d sampled), model %s, tokenizer %s\n", n, K, model_dir,
            D.tok_dir);
    if (run_pass(&greedy, &m, &D, rw, n, 1, &og, &e)) goto fail;
    reward_set_reset_stats(rw);
    if (run_pass(&sampled, &m, &D, rw, n, K, &o, &e)) goto fail;

    /* the figures */
    const size_t np = reward_set_count(rw);
    const size_t max_metrics = 16 + 32 + 5 * np;
    names = mem_calloc(max_metrics, sizeof *names);
    name_p = mem_calloc(max_metrics, sizeof *name_p);
    values = mem_calloc(max_metrics, sizeof *values);
    ans = mem_calloc((size_t)K, sizeof *ans);
    char (*buf)[ANS_MAX] = mem_alloc((size_t)K * sizeof *buf);
    if (!names || !name_p || !values || !ans || !buf) {
        mem_free(buf);
        goto oom;
    }
    size_t nm = 0;
#define PUT(v, ...)                                                                                                    \
    do {                                                                                                               \
        snprintf(names[nm], sizeof names[nm], __VA_ARGS__);                                                           \
        name_p[nm] = names[nm];                                                                                        \
        values[nm++] = (v);                                                                                            \
    } while (0)
    int g_ok = 0, g_scored = 0;
    double g_sum = 0, s_sum = 0;
    int s_scored = 0, maj_ok = 0;
    for (int p = 0; p < n; p++) {
        g_ok += correct(&greedy.oc[p], threshold);
        if (greedy.oc[p].status == REWARD_SCORE) g_sum += greedy.oc[p].total, g_scored++;
    }
    PUT((double)g_ok / n, "eval/pass@1_greedy");
    int n_k = 0, ks[32];
    for (int k = 1; k < K && n_k < 31; k *= 2) ks[n_k++] = k;
    ks[n_k++] = K;
    double pk[32] = {0};
    const answer_rule ar = answer_rule_from(r);
    for (int p = 0; p < n; p++) {
        const reward_outcome *oc = sampled.oc + (size_t)p * K;
        int c = 0;
        for (int g = 0; g < K; g++) {
            c += correct(&oc[g], threshold);
            if (oc[g].status == REWARD_SCORE) s_sum += oc[g].total, s_scored++;
            ans[g] = NULL;
            char raw[ANS_MAX];
            if (math_extract_answer(sampled.text[(size_t)p * K + g], ar.mode, raw, sizeof raw)) {
                math_normalize(raw, buf[g], ANS_MAX);
                ans[g] = buf[g];
            }
        }
        for (int j = 0; j < n_k; j++) pk[j] += eval_pass_at_k(K, c, ks[j]);
        int w = eval_majority((const char *const *)ans, K);
        if (w >= 0) {
            char want_buf[ANS_MAX];
            const char *want = reward_row_text(D.eval[p].row, ar.field, want_buf, sizeof want_buf);
            maj_ok += want ? math_answers_equal(ans[w], want, ar.tol) : correct(&oc[w], threshold);
        }
    }
    mem_free(buf);
    for (int j = 0; j < n_k; j++) PUT(pk[j] / n, "eval/pass@%d", ks[j]);
    PUT((double)maj_ok / n, "eval/maj@%d", K);
    PUT(g_scored ? g_sum / g_scored : NAN, "eval/reward_mean_greedy");
    PUT(s_scored ? s_sum / s_scored : NAN, "eval/reward_mean");
    for (size_t i = 0; i < np; i++) {
        reward_stats st;
        reward_set_stats(rw, i, &st);
        const char *pn = reward_set_plugin(rw, i)->name;
        PUT(st.scored ? st.mean : NAN, "eval/reward/%s/mean", pn);
        PUT((double)st.unscorable, "eval/reward/%s/unscorable", pn);
        PUT((double)st.errors, "eval/reward/%s/errors", pn);
        PUT((double)st.timeouts, "eval/reward/%s/timeouts", pn);
    }
    PUT((double)n, "eval/n_prompts");
    PUT((double)K, "eval/k");
    PUT(sampled.seconds > 0 ? (double)sampled.tokens / sampled.seconds : 0, "eval/tok_s");
    if (o.mtp_speculative) {
        PUT(greedy.st.drafted ? (double)greedy.st.accepted / (double)greedy.st.drafted : NAN,
            "eval/mtp_acceptance_greedy");
        PUT(sampled.st.drafted ? (double)sampled.st.accepted / (double)sampled.st.drafted : NAN, "eval/mtp_acceptance");
    }
#undef PUT

    printf("eval: %d prompts, k = %d (temperature %g, top_p %g, top_k %d, min_p %g, max_new_tokens %d), threshold %g\n",
           n, K, (double)o.temperature, (double)o.top_p, o.top_k, (double)o.min_p, o.max_new_tokens, threshold);
    printf("%-28s %10s\n", "metric", "value");
    for (size_t i = 0; i < nm; i++)
        if (strncmp(names[i], "eval/reward/", 12) != 0) printf("%-28s %10.4f\n", names[i] + 5, values[i]);
    printf("%-16s %10s %10s %10s %10s %10s\n", "plugin", "mean", "scored", "unscorable", "errors", "timeouts");
    for (size_t i = 0; i < np; i++) {
        reward_stats st;
        reward_set_stats(rw, i, &st);
        printf("%-16s %10.4f %10lld %10lld %10lld %10lld\n", reward_set_plugin(rw, i)->name, st.scored ? st.mean : NAN,
               (long long)st.scored, (long long)st.unscorable, (long long)st.errors, (long long)st.timeouts);
    }
    printf("greedy %lld tokens in %.2fs (%.0f tokens/s, %lld decode steps), sampled %lld tokens in %.2fs (%.0f "
           "tokens/s, %lld decode steps)\n", (long long)greedy.tokens, greedy.seconds,
           greedy.seconds > 0 ? (double)greedy.tokens / greedy.seconds : 0.0, (long long)greedy.st.decode_steps,
           (long long)sampled.tokens, sampled.seconds, sampled.seconds > 0 ? (double)sampled.tokens / sampled.seconds : 0.0,
           (long long)sampled.st.decode_steps);
    if (o.mtp_speculative)
        printf("MTP speculative decoding: drafts accepted greedy %lld of %lld (%.1f%%), sampled %lld of %lld (%.1f%%)\n",
               (long long)greedy.st.accepted, (long long)greedy.st.drafted,
               greedy.st.drafted ? 100.0 * (double)greedy.st.accepted / (double)greedy.st.drafted : 0.0,
               (long long)sampled.st.accepted, (long long)sampled.st.drafted,
               sampled.st.drafted ? 100.0 * (double)sampled.st.accepted / (double)sampled.st.drafted : 0.0);

    if (runstore_open(&rs, recipe_str(r, "run.store"), &e)) goto fail;
    if (runstore_begin_run(rs, "eval", recipe_str(r, "run.name"), yaml, recipe_int(r, "run.seed"), &run_id, &e))
        goto fail;
    if (runstore_log_metrics(rs, run_id, 0, nm, name_p, values, &e)) goto fail;
    if (runstore_end_run(rs, run_id, RUN_OK, &e)) goto fail;
    printf("run %lld (eval) in %s\n", (long long)run_id, runstore_path(rs));
    fflush(stdout);
    status = 0;
    goto done;
oom:
    err_set(&e, MR_ENOMEM, "out of memory");
fail:
    fflush(stdout);
    fprintf(stderr, "moerl eval: %s\n", e.msg);
    if (rs && run_id >= 0) {
        mr_err e2 = {0};
        runstore_end_run(rs, run_id, RUN_FAILED, &e2);
    }
done:
    pass_free(&greedy);
    pass_free(&sampled);
    mem_free(names);
    mem_free(name_p);
    mem_free(values);
    mem_free(ans);
    mem_free(stop);
    runstore_close(rs);
    reward_set_free(rw);
    model_free(&m);
    params_free(&prm);
    rl_data_free(&D);
    mem_free(yaml);
    recipe_free(r);
    mem_free(sets);
    return status;
}
