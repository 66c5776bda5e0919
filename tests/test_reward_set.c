/* test_reward_set.c: the weighted set. Totals as Σ w·score; a sample with an unscorable/error plugin is not
 * scored (never 0) and carries the first plugin's reason; per-plugin step counters and their metric names;
 * the wall-clock limit enforced from outside a call that ignores it (a Lua pattern match, which no VM hook
 * can interrupt); many samples over several workers in order; and `moerl score` end to end. */
#include <criterion/criterion.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "core/mem.h"
#include "core/recipe.h"
#include "rewards/reward.h"
#include "tests/testutil.h"

#define BASE "run:\n  name: t\nmodel:\n  preset: tiny\ntokenizer:\n  train:\ndata:\n  generator:\n    task: arithmetic\n"

static reward_set *set_in(const char *dir, const char *rewards_yaml, int workers) {
    char text[4096], src[1024];
    snprintf(text, sizeof text, "%srewards:\n%s", BASE, rewards_yaml);
    snprintf(src, sizeof src, "%s/t.yaml", dir ? dir : ".");
    recipe *r = NULL;
    mr_err e = {0};
    cr_assert_eq(recipe_load_string(&r, text, src, &e), 0, "%s", e.msg);
    cr_assert_eq(recipe_resolve(r, &e), 0, "%s", e.msg);
    reward_set *s = NULL;
    reward_set_opts o = {.workers = workers};
    cr_assert_eq(reward_set_init(&s, r, &o, &e), 0, "%s", e.msg);
    recipe_free(r);
    return s;
}

Test(set, weighted_total_and_non_scores) {
    reward_set *s = set_in(NULL, "  - math:\n    weight: 2.0\n  - format:\n    weight: 0.5\n    name: fmt\n", 2);
    cr_assert_eq(reward_set_count(s), 2);
    cr_assert_str_eq(reward_set_plugin(s, 1)->name, "fmt");
    cJSON *row = cJSON_Parse("{\"answer\": \"7\"}");
    cJSON *bad = cJSON_Parse("{\"other\": 1}");
    reward_sample smp[4] = {
        {.prompt = "", .completion = "<think>x</think><answer>7</answer>", .row = row}, /* 2*1 + 0.5*1 */
        {.prompt = "", .completion = "junk <think>x</think><answer>8</answer>", .row = row}, /* 2*0 + 0.5*0.5 */
        {.prompt = "", .completion = "no answer at all", .row = row},  /* math unscorable */
        {.prompt = "", .completion = "<answer>7</answer>", .row = bad}, /* math error */
    };
    reward_result res[8];
    reward_outcome o[4];
    mr_err e = {0};
    cr_assert_eq(reward_set_score(s, smp, 4, res, o, &e), 0, "%s", e.msg);
    cr_assert_eq(o[0].status, REWARD_SCORE);
    cr_assert_float_eq(o[0].total, 2.5, 1e-12);
    cr_assert_float_eq(o[1].total, 0.25, 1e-12);
    cr_assert_eq(o[2].status, REWARD_UNSCORABLE);
    cr_assert_float_eq(o[2].total, 0.0, 0);
    cr_assert_str_eq(o[2].reason, "math: no final answer");
    cr_assert_eq(o[3].status, REWARD_ERROR);
    cr_assert_str_eq(o[3].reason, "math: the row has no 'answer' field");
    /* per-plugin results stay visible: format scored all four */
    cr_assert_float_eq(res[2 * 2 + 1].score, 0.0, 0);
    cr_assert_float_eq(res[3 * 2 + 1].score, 0.0, 0);

    reward_stats st;
    reward_set_stats(s, 0, &st);
    cr_assert_eq(st.n, 4);
    cr_assert_eq(st.scored, 2);
    cr_assert_float_eq(st.mean, 0.5, 1e-12);
    cr_assert_float_eq(st.std, 0.5, 1e-12);
    cr_assert_float_eq(st.unscorable_rate, 0.25, 1e-12);
    cr_assert_float_eq(st.error_rate, 0.25, 1e-12);
    cr_assert_float_eq(st.timeout_rate, 0.0, 0);
    reward_set_stats(s, 1, &st);
    cr_assert_eq(st.scored, 4);
    cr_assert_float_eq(st.mean, (1.0 + 0.5 + 0 + 0) / 4, 1e-12);
    reward_set_reset_stats(s);
    reward_set_stats(s, 0, &st);
    cr_assert_eq(st.n, 0);
    cJSON_Delete(row);
    cJSON_Delete(bad);
    reward_set_free(s);
}

static void collect_metric(const char *name, double v, void *ctx) {
    char *buf = ctx;
    char line[160];
    snprintf(line, sizeof line, "%s=%g\n", name, v);
    strcat(buf, line);
}

Test(set, metric_names) {
    reward_set *s = set_in(NULL, "  - format:\n    name: fmt\n", 1);
    reward_sample smp = {.prompt = "", .completion = "<think>a</think><answer>b</answer>"};
    reward_outcome o;
    mr_err e = {0};
    cr_assert_eq(reward_set_score(s, &smp, 1, NULL, &o, &e), 0);
    char buf[2048] = "";
    reward_set_metrics(s, collect_metric, buf);
    cr_assert_str_eq(buf, "reward/fmt/mean=1\nreward/fmt/std=0\nreward/fmt/unscorable_rate=0\nreward/fmt/error_rate=0\n"
                          "reward/fmt/timeout_rate=0\n");
    reward_set_free(s);
}

Test(set, many_samples_in_order) {
    /* 2000 samples over 4 workers: each result lands on its own sample */
    reward_set *s = set_in(NULL, "  - math:\n", 4);
    enum { N = 2000 };
    reward_sample *smp = calloc(N, sizeof *smp);
    cJSON **rows = calloc(N, sizeof *rows);
    char (*comp)[32] = calloc(N, 32);
    for (int i = 0; i < N; i++) {
        char a[32];
        snprintf(a, sizeof a, "{\"answer\": %d}", i);
        rows[i] = cJSON_Parse(a);
        snprintf(comp[i], 32, "#### %d", i % 3 == 0 ? i : i + 1);
        smp[i] = (reward_sample){.prompt = "", .completion = comp[i], .row = rows[i]};
    }
    reward_outcome *o = calloc(N, sizeof *o);
    mr_err e = {0};
    cr_assert_eq(reward_set_score(s, smp, N, NULL, o, &e), 0);
    for (int i = 0; i < N; i++) cr_assert_float_eq(o[i].total, i % 3 == 0 ? 1.0 : 0.0, 0, "sample %d", i);
    for (int i = 0; i < N; i++) cJSON_Delete(rows[i]);
    free(smp), free(rows), free(comp), free(o);
    reward_set_free(s);
}

Test(set, outside_enforcement) {
    /* string.find with a backtracking pattern runs ~1 s inside C where no hook fires; the set abandons the
     * call at timeout + 10%, scores it TIMEOUT and a fresh worker scores the next sample. */
    char *dir = tu_tmpdir();
    char *sp = tu_path(dir, "slow.lua");
    cr_assert_eq(tu_write(sp, "function reward(s)\n  if s.completion == 'slow' then\n"
                              "    return string.find(string.rep('a', 250), '.-.-.-b') or -1\n  end\n  return 3\nend\n",
                          (size_t)-1), 0);
    reward_set *s = set_in(dir, "  - lua: slow.lua\n    timeout_s: 0.2\n", 1);
    reward_sample smp[2] = {{.prompt = "", .completion = "slow"}, {.prompt = "", .completion = "fast"}};
    reward_result res[2];
    reward_outcome o[2];
    mr_err e = {0};
    double t0 = reward_now();
    cr_assert_eq(reward_set_score(s, smp, 2, res, o, &e), 0);
    double dt = reward_now() - t0;
    cr_assert_eq(res[0].status, REWARD_TIMEOUT, "%s %s", reward_status_name(res[0].status), res[0].reason);
    cr_assert_str_eq(res[0].reason, "timeout 0.2 s");
    cr_assert_eq(o[0].status, REWARD_TIMEOUT);
    cr_assert_eq(res[1].status, REWARD_SCORE);
    cr_assert_float_eq(res[1].score, 3.0, 0);
    cr_assert_lt(dt, 0.2 * 1.1 + 0.1, "the batch took %.3f s", dt);
    reward_stats st;
    reward_set_stats(s, 0, &st);
    cr_assert_float_eq(st.timeout_rate, 0.5, 1e-12);
    reward_set_free(s); /* returns at once; the abandoned worker cleans up after itself */
    cr_assert_lt(reward_now() - t0, 0.5);
    sleep(3); /* let it finish before the leak check at exit */
    free(sp);
    tu_rmtree(dir);
    free(dir);
}

Test(set, unknown_and_bad_plugins) {
    char text[2048];
    snprintf(text, sizeof text, "%srewards:\n  - judge:\n      model: ckpt/\n", BASE);
    recipe *r = NULL;
    mr_err e = {0};
    cr_assert_eq(recipe_load_string(&r, text, "t.yaml", &e), 0, "%s", e.msg);
    cr_assert_eq(recipe_resolve(r, &e), 0, "%s", e.msg);
    reward_set *s = NULL;
    cr_assert_neq(reward_set_init(&s, r, NULL, &e), 0);
    cr_assert_str_eq(e.msg, "t.yaml: rewards[0] (judge): rewards[0].judge.model: ./ckpt/: cannot open: No such file or "
                            "directory");
    recipe_free(r);
}

Test(set, moerl_score_cli) {
    char *dir = tu_tmpdir();
    char *rp = tu_path(dir, "r.yaml"), *sp = tu_path(dir, "s.jsonl"), *lp = tu_path(dir, "len.lua");
    char text[2048];
    snprintf(text, sizeof text, "%srewards:\n  - math:\n  - lua: len.lua\n    weight: 0.5\n", BASE);
    cr_assert_eq(tu_write(rp, text, (size_t)-1), 0);
    cr_assert_eq(tu_write(lp, "function reward(s) return #s.completion end\n", (size_t)-1), 0);
    cr_assert_eq(tu_write(sp, "{\"prompt\": \"1+1\", \"completion\": \"#### 2\", \"answer\": 2}\n"
                              "\n"
                              "{\"prompt\": \"1+2\", \"completion\": \"dunno\", \"answer\": 3}\n",
                          (size_t)-1), 0);
    char cmd[4096], *out = NULL;
    snprintf(cmd, sizeof cmd, "%s score --recipe %s --in %s --workers 2", tu_bin(), rp, sp);
    int rc = tu_run(cmd, &out);
    cr_assert_eq(rc, 0, "%s", out);
    cJSON *l1 = cJSON_ParseWithOpts(out, NULL, 0);
    cr_assert_not_null(l1, "%s", out);
    cr_assert_float_eq(cJSON_GetObjectItem(l1, "score")->valuedouble, 1.0 + 0.5 * 6, 1e-12);
    cr_assert_eq(cJSON_GetObjectItem(l1, "row")->valuedouble, 1);
    cr_assert_str_eq(cJSON_GetObjectItem(l1, "status")->valuestring, "score");
    cJSON *pl = cJSON_GetObjectItem(l1, "plugins");
    cr_assert_str_eq(cJSON_GetObjectItem(cJSON_GetObjectItem(pl, "lua"), "status")->valuestring, "score");
    cr_assert_float_eq(cJSON_GetObjectItem(cJSON_GetObjectItem(pl, "lua"), "score")->valuedouble, 6, 0);
    cr_assert(cJSON_IsNumber(cJSON_GetObjectItem(l1, "ms")));
    const char *second = strchr(out, '\n');
    cr_assert_not_null(second);
    cJSON *l2 = cJSON_Parse(second + 1);
    cr_assert_not_null(l2, "%s", second);
    cr_assert(cJSON_IsNull(cJSON_GetObjectItem(l2, "score")));
    cr_assert_eq(cJSON_GetObjectItem(l2, "row")->valuedouble, 3); /* line numbers, the blank line counted */
    cr_assert_str_eq(cJSON_GetObjectItem(l2, "status")->valuestring, "unscorable");
    cr_assert_str_eq(cJSON_GetObjectItem(l2, "reason")->valuestring, "math: no final answer");
    cJSON_Delete(l1);
    cJSON_Delete(l2);
    free(out);

    /* a bad line is named; misuse is exit 2 */
    cr_assert_eq(tu_write(sp, "{\"completion\": \"x\", \"answer\": 1}\n[1, 2]\n", (size_t)-1), 0);
    rc = tu_run(cmd, &out);
    cr_assert_eq(rc, 1);
    char want[1200];
    snprintf(want, sizeof want, "moerl score: %s:2: expected a JSON object per line\n", sp);
    cr_assert(strstr(out, want), "%s", out);
    free(out);
    snprintf(cmd, sizeof cmd, "%s score --in %s", tu_bin(), sp);
    cr_assert_eq(tu_run(cmd, &out), 2);
    cr_assert(strstr(out, "moerl score: expected --recipe RECIPE and --in SAMPLES.jsonl"), "%s", out);
    free(out);
    snprintf(cmd, sizeof cmd, "%s score --help", tu_bin());
    cr_assert_eq(tu_run(cmd, &out), 0);
    cr_assert(strstr(out, "usage: moerl score"), "%s", out);
    free(out);
    free(rp), free(sp), free(lp);
    tu_rmtree(dir);
    free(dir);
}
