/* test_eval.c: `moerl eval`: the pass@k estimator against hand-computed values, the majority vote, and the command
 * end to end on a tiny `moerl sft` checkpoint (output table, consistency of the figures, the eval run in the store,
 * usage errors). */
#include <criterion/criterion.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/runstore.h"
#include "rollout/eval.h"
#include "tests/testutil.h"

Test(eval, pass_at_k_hand_values) {
    /* 1 − C(n−c, k)/C(n, k) */
    cr_assert_float_eq(eval_pass_at_k(5, 2, 1), 0.4, 1e-12);
    cr_assert_float_eq(eval_pass_at_k(5, 2, 2), 1.0 - 3.0 / 10.0, 1e-12);
    cr_assert_float_eq(eval_pass_at_k(10, 3, 4), 1.0 - 35.0 / 210.0, 1e-12);
    cr_assert_float_eq(eval_pass_at_k(20, 1, 5), 0.25, 1e-12); /* c = 1: k/n */
    cr_assert_float_eq(eval_pass_at_k(16, 4, 8), 1.0 - 495.0 / 12870.0, 1e-12);
    cr_assert_eq(eval_pass_at_k(5, 0, 3), 0.0);
    cr_assert_eq(eval_pass_at_k(5, 3, 3), 1.0); /* n − c < k: every draw of 3 holds a correct one */
    cr_assert_eq(eval_pass_at_k(4, 4, 1), 1.0);
    /* pass@1 is the fraction correct, pass@n is "any correct" */
    for (int c = 0; c <= 8; c++) {
        cr_assert_float_eq(eval_pass_at_k(8, c, 1), c / 8.0, 1e-12);
        cr_assert_eq(eval_pass_at_k(8, c, 8), c > 0 ? 1.0 : 0.0);
    }
    cr_assert(isnan(eval_pass_at_k(4, 5, 1)));
    cr_assert(isnan(eval_pass_at_k(4, 1, 5)));
    cr_assert(isnan(eval_pass_at_k(4, -1, 1)));
    cr_assert(isnan(eval_pass_at_k(0, 0, 1)));
}

Test(eval, majority_vote) {
    const char *a[] = {"3", "4", "4", NULL, "3"};
    cr_assert_eq(eval_majority(a, 5), 0, "tie between 3 and 4: the answer seen first wins");
    const char *b[] = {NULL, "a", "b", "b"};
    cr_assert_eq(eval_majority(b, 4), 2);
    const char *c[] = {NULL, NULL};
    cr_assert_eq(eval_majority(c, 2), -1);
    const char *d[] = {"7"};
    cr_assert_eq(eval_majority(d, 1), 0);
}

/* ---- the command ---------------------------------------------------------------------------------------- */

static const char *recipe_text =
    "run:\n"
    "  name: eval-cli\n"
    "  seed: 5\n"
    "  threads: 1\n"
    "  checkpoint_every: 4\n"
    "  keep_checkpoints: 0\n"
    "model:\n"
    "  preset: tiny\n"
    "  overrides: {hidden_size: 32, num_hidden_layers: 2, intermediate_size: 48, moe_intermediate_size: 16,\n"
    "              n_routed_experts: 4, n_group: 2, topk_group: 1, num_attention_heads: 2, q_lora_rank: 16,\n"
    "              kv_lora_rank: 16, qk_nope_head_dim: 8, qk_rope_head_dim: 4, v_head_dim: 8}\n"
    "tokenizer:\n"
    "  train: {vocab_size: 300}\n"
    "data:\n"
    "  generator: {task: arithmetic, n: 40, difficulty: 1}\n"
    "  eval_n: 5\n"
    "  template: \"Q: {prompt}\\nA: \"\n"
    "  max_seq_len: 48\n"
    "optim: {lr: 3.0e-3, warmup_steps: 2}\n"
    "sft: {steps: 4, batch_seqs: 8, eval_every: 0}\n"
    "rollout: {max_new_tokens: 8, temperature: 1.5}\n"
    "rewards:\n"
    "  - lua: parity.lua\n"
    "    weight: 1.0\n";

/* 1 for a completion of even byte length, 0 for odd: a mix of correct and wrong samples whatever the model. */
static const char *lua_text = "function reward(s) if #s.completion % 2 == 0 then return 1 else return 0 end end\n";

static char *dir;
static void setup(void) { dir = tu_tmpdir(); }
static void teardown(void) { tu_rmtree(dir); }

static int sh(char **out, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static int sh(char **out, const char *fmt, ...) {
    char cmd[8192];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(cmd, sizeof cmd, fmt, ap);
    va_end(ap);
    return tu_run(cmd, out);
}

/* The value printed on the table line "NAME   VALUE". */
static double table_value(const char *out, const char *name) {
    char key[64];
    snprintf(key, sizeof key, "\n%s ", name);
    const char *p = strstr(out, key);
    cr_assert(p, "no line '%s' in:\n%s", name, out);
    return strtod(p + strlen(key), NULL);
}

typedef struct {
    const char *kind;
    int n_metrics;
    double pass4, pass1;
} run_info;

static int on_run(void *ud, const runstore_run *r) {
    run_info *ri = ud;
    ri->kind = strdup(r->kind);
    return 0;
}

static int on_metric(void *ud, int64_t step, const char *name, double value) {
    run_info *ri = ud;
    cr_assert_eq(step, 0);
    ri->n_metrics++;
    if (!strcmp(name, "eval/pass@4")) ri->pass4 = value;
    if (!strcmp(name, "eval/pass@1")) ri->pass1 = value;
    return 0;
}

Test(eval_cli, tiny_checkpoint_end_to_end, .init = setup, .fini = teardown) {
    char *r = tu_path(dir, "r.yaml"), *l = tu_path(dir, "parity.lua"), *out = NULL;
    cr_assert_eq(tu_write(r, recipe_text, (size_t)-1), 0);
    cr_assert_eq(tu_write(l, lua_text, (size_t)-1), 0);
    cr_assert_eq(sh(&out, "cd %s && %s sft r.yaml", dir, tu_bin()), 0, "moerl sft failed:\n%s", out);
    free(out);
    int st = sh(&out, "cd %s && %s eval r.yaml --model runs/step-00000004 -k 4", dir, tu_bin());
    cr_assert_eq(st, 0, "moerl eval failed:\n%s", out);
    cr_assert(strstr(out, "eval: 5 prompts, k = 4"), "%s", out);
    double g1 = table_value(out, "pass@1_greedy"), p1 = table_value(out, "pass@1"), p2 = table_value(out, "pass@2"),
           p4 = table_value(out, "pass@4"), maj = table_value(out, "maj@4"), rg = table_value(out, "reward_mean_greedy"),
           rm = table_value(out, "reward_mean");
    /* every sample is scored 0 or 1: pass@1 is the mean reward, greedy and sampled */
    cr_assert_float_eq(p1, rm, 1e-4, "pass@1 %g, mean reward %g\n%s", p1, rm, out);
    cr_assert_float_eq(g1, rg, 1e-4, "%s", out);
    cr_assert(p1 > 0 && p1 < 1, "the parity reward should give a mix, pass@1 = %g\n%s", p1, out);
    cr_assert(p4 >= p2 && p2 >= p1, "pass@k must grow with k: %g %g %g\n%s", p1, p2, p4, out);
    cr_assert(maj >= 0 && maj <= 1);
    cr_assert(fabs(p4 * 5 - round(p4 * 5)) < 1e-3, "pass@4 of 4 samples is a fraction of the 5 prompts: %g", p4);
    /* the plugin table: 20 sampled completions, all scored */
    cr_assert(strstr(out, "plugin "), "%s", out);
    const char *lua = strstr(out, "\nlua ");
    cr_assert(lua, "%s", out);
    double mean;
    long long scored, unsc, errs, tmo;
    cr_assert_eq(sscanf(lua + 5, "%lf %lld %lld %lld %lld", &mean, &scored, &unsc, &errs, &tmo), 5, "%s", lua);
    cr_assert_eq(scored, 20);
    cr_assert_eq(unsc + errs + tmo, 0);
    cr_assert_float_eq(mean, rm, 1e-4);
    cr_assert(strstr(out, "run 2 (eval)"), "%s", out);

    /* the run store: run 2 is an eval run with the same figures */
    char db[4096];
    snprintf(db, sizeof db, "%s/runs.db", dir);
    runstore *rs = NULL;
    mr_err e = {0};
    cr_assert_eq(runstore_open_existing(&rs, db, &e), 0, "%s", e.msg);
    run_info ri = {0};
    cr_assert_eq(runstore_get_run(rs, 2, on_run, &ri, &e), 0, "%s", e.msg);
    cr_assert_str_eq(ri.kind, "eval");
    cr_assert_eq(runstore_foreach_metric(rs, 2, on_metric, &ri, &e), 0, "%s", e.msg);
    runstore_close(rs);
    cr_assert_float_eq(ri.pass4, p4, 1e-4);
    cr_assert_float_eq(ri.pass1, p1, 1e-4);
    cr_assert_geq(ri.n_metrics, 12);
    free((void *)ri.kind);
    free(out);

    /* same seed, same figures */
    char *out2 = NULL;
    cr_assert_eq(sh(&out2, "cd %s && %s eval r.yaml --model runs/step-00000004 -k 4", dir, tu_bin()), 0, "%s", out2);
    cr_assert_float_eq(table_value(out2, "pass@4"), p4, 1e-9);
    cr_assert_float_eq(table_value(out2, "maj@4"), maj, 1e-9);
    free(out2);

    /* MTP speculative decoding: the same greedy completions (so the same greedy figures), drafts counted */
    cr_assert_eq(sh(&out2, "cd %s && %s eval r.yaml --model runs/step-00000004 -k 4 --set rollout.mtp_speculative=true",
                    dir, tu_bin()), 0, "%s", out2);
    cr_assert_float_eq(table_value(out2, "pass@1_greedy"), g1, 1e-9, "%s", out2);
    cr_assert_float_eq(table_value(out2, "reward_mean_greedy"), rg, 1e-9, "%s", out2);
    const char *sp = strstr(out2, "MTP speculative decoding: drafts accepted greedy ");
    cr_assert(sp, "%s", out2);
    long long ga, gd, sa, sd;
    double gp, spct;
    cr_assert_eq(sscanf(sp, "MTP speculative decoding: drafts accepted greedy %lld of %lld (%lf%%), sampled %lld of "
                            "%lld (%lf%%)", &ga, &gd, &gp, &sa, &sd, &spct), 6, "%s", sp);
    cr_expect(gd > 0 && ga >= 0 && ga <= gd && sd > 0 && sa >= 0 && sa <= sd, "%s", sp);
    cr_expect_float_eq(gp, 100.0 * (double)ga / (double)gd, 0.051, "%s", sp);
    cr_expect_float_eq(table_value(out2, "mtp_acceptance_greedy"), (double)ga / (double)gd, 1e-4, "%s", out2);
    free(out2);
    free(r);
    free(l);
}

Test(eval_cli, usage_and_missing_model, .init = setup, .fini = teardown) {
    char *r = tu_path(dir, "r.yaml"), *l = tu_path(dir, "parity.lua"), *out = NULL;
    cr_assert_eq(tu_write(r, recipe_text, (size_t)-1), 0);
    cr_assert_eq(tu_write(l, lua_text, (size_t)-1), 0);
    cr_assert_eq(sh(&out, "cd %s && %s eval r.yaml", dir, tu_bin()), 1, "%s", out);
    cr_assert(strstr(out, "moerl eval: r.yaml: no model to evaluate: pass --model DIR or set grpo.init_from or "
                          "model.checkpoint\n"),
              "%s", out);
    free(out);
    cr_assert_eq(sh(&out, "cd %s && %s eval r.yaml -k 0", dir, tu_bin()), 2, "%s", out);
    cr_assert(strstr(out, "moerl eval: -k: invalid value \"0\""), "%s", out);
    free(out);
    cr_assert_eq(sh(&out, "%s eval", tu_bin()), 2, "%s", out);
    cr_assert(strstr(out, "moerl eval: missing RECIPE.yaml"), "%s", out);
    free(out);
    cr_assert_eq(sh(&out, "cd %s && %s eval r.yaml --model nowhere", dir, tu_bin()), 1, "%s", out);
    cr_assert(strstr(out, "moerl eval: ") && strstr(out, "nowhere"), "%s", out);
    free(out);
    free(r);
    free(l);
}
