/* bench_rewards.c: samples/s of the math and Lua rewards. A benchmark, not a test: prints figures.
 *   direct   one thread calling the plugin's score() in a loop with its own worker state (the per-core cost)
 *   set/1    reward_set_score with one worker (adds the batch copy and the job hand-off)
 *   set/N    reward_set_score with one worker per core
 * Usage: bench_rewards [samples (default 200000)] */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "core/recipe.h"
#include "rewards/reward.h"

#define BASE "run:\n  name: b\nmodel:\n  preset: tiny\ntokenizer:\n  train:\ndata:\n  generator:\n    task: arithmetic\n"

static const char lua_script[] = "function reward(s)\n"
                                 "  local a = s.completion:match('<answer>(.-)</answer>')\n"
                                 "  if a == nil then return nil, 'no answer' end\n"
                                 "  return a == s.answer and 1.0 or 0.0\n"
                                 "end\n";

static reward_set *make_set(const char *dir, const char *rewards, int workers) {
    char text[2048], src[1024];
    snprintf(text, sizeof text, "%srewards:\n%s", BASE, rewards);
    snprintf(src, sizeof src, "%s/b.yaml", dir);
    recipe *r = NULL;
    reward_set *s = NULL;
    mr_err e = {0};
    reward_set_opts o = {.workers = workers};
    if (recipe_load_string(&r, text, src, &e) || recipe_resolve(r, &e) || reward_set_init(&s, r, &o, &e)) {
        fprintf(stderr, "bench_rewards: %s\n", e.msg);
        exit(1);
    }
    recipe_free(r);
    return s;
}

static double direct(reward_set *s, const reward_sample *smp, size_t n) {
    const reward_plugin *p = reward_set_plugin(s, 0);
    void *ws = NULL;
    mr_err e = {0};
    if (p->ops->worker_init && p->ops->worker_init(p, &ws, &e)) {
        fprintf(stderr, "bench_rewards: %s\n", e.msg);
        exit(1);
    }
    double t0 = reward_now(), sum = 0;
    for (size_t i = 0; i < n; i++) {
        reward_result r = {0};
        int discard = 0;
        p->ops->score(p, ws, &smp[i], reward_now() + p->timeout_s, &r, &discard);
        sum += r.score;
    }
    double dt = reward_now() - t0;
    if (p->ops->worker_free) p->ops->worker_free(p, ws);
    if (sum < 0) printf("?");
    return (double)n / dt;
}

static double via_set(reward_set *s, const reward_sample *smp, size_t n, reward_outcome *out) {
    mr_err e = {0};
    reward_set_score(s, smp, n < 1000 ? n : 1000, NULL, out, &e); /* warm the worker states */
    double t0 = reward_now();
    for (size_t i = 0; i < n; i += 4096) {
        size_t k = n - i < 4096 ? n - i : 4096;
        if (reward_set_score(s, smp + i, k, NULL, out, &e)) {
            fprintf(stderr, "bench_rewards: %s\n", e.msg);
            exit(1);
        }
    }
    return (double)n / (reward_now() - t0);
}

int main(int argc, char **argv) {
    size_t n = argc > 1 ? (size_t)atol(argv[1]) : 200000;
    if (n < 1000) n = 1000;
    int cores = (int)sysconf(_SC_NPROCESSORS_ONLN);
    char dir[] = "/tmp/bench_rewards_XXXXXX";
    if (!mkdtemp(dir)) return 1;
    char path[1100];
    snprintf(path, sizeof path, "%s/r.lua", dir);
    FILE *f = fopen(path, "w");
    if (!f) return 1;
    fputs(lua_script, f);
    fclose(f);

    /* R1-style completions of ~300 characters with a row {answer} each; a third wrong */
    cJSON **rows = calloc(n, sizeof *rows);
    char **comp = calloc(n, sizeof *comp);
    reward_sample *smp = calloc(n, sizeof *smp);
    reward_outcome *out = calloc(4096, sizeof *out);
    if (!rows || !comp || !smp || !out) return 1;
    for (size_t i = 0; i < n; i++) {
        char ans[32], c[512];
        snprintf(ans, sizeof ans, "%zu", i * 7 % 1000);
        snprintf(c, sizeof c,
                 "<think>We need to add the numbers step by step. First %zu plus %zu gives a partial sum; then we "
                 "carry the tens and check the units digit again to be sure. The partial sums agree, so the total "
                 "follows directly from them.</think>\n<answer>%zu</answer>",
                 i, i + 1, i % 3 ? i * 7 % 1000 : i * 7 % 1000 + 1);
        rows[i] = cJSON_CreateObject();
        cJSON_AddStringToObject(rows[i], "answer", ans);
        comp[i] = strdup(c);
        smp[i] = (reward_sample){.prompt = "What is the sum?", .completion = comp[i], .row = rows[i], .tokens = 80};
    }
    printf("reward benchmark: %zu samples of ~%zu characters, %d cores\n", n, strlen(comp[0]), cores);
    printf("%-6s %14s %14s %14s\n", "plugin", "direct 1 core", "set 1 worker", "set all cores");
    struct {
        const char *name, *yaml;
    } plugins[] = {{"math", "  - math:\n      extract: answer_tag\n"}, {"lua", "  - lua: r.lua\n"}};
    for (size_t k = 0; k < 2; k++) {
        reward_set *s1 = make_set(dir, plugins[k].yaml, 1);
        double d = direct(s1, smp, n);
        double v1 = via_set(s1, smp, n, out);
        reward_set_free(s1);
        reward_set *sn = make_set(dir, plugins[k].yaml, cores);
        double vn = via_set(sn, smp, n, out);
        reward_set_free(sn);
        printf("%-6s %12.0f/s %12.0f/s %12.0f/s\n", plugins[k].name, d, v1, vn);
    }
    for (size_t i = 0; i < n; i++) {
        cJSON_Delete(rows[i]);
        free(comp[i]);
    }
    free(rows), free(comp), free(smp), free(out);
    remove(path);
    rmdir(dir);
    return 0;
}
