/* bench_code_reward.c: samples/s of the code reward (rewards/code.c) on all cores.
 *
 *     bench_code_reward [samples] [workers] [tests_per_row]
 *
 * Python completions of the kind a policy writes for a stdio task ("print(sum(...))"), each row with
 * tests_per_row stdio tests, scored through a reward set built from a recipe, with workers threads (0 = one
 * per core). Also times one bare sandbox_run of `true` and of python3 (the floor: process creation, namespace,
 * Landlock, seccomp, interpreter start-up) and prints the isolation layers this machine applies. */
#include <cjson/cJSON.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "core/recipe.h"
#include "rewards/reward.h"
#include "rewards/sandbox.h"

static double bare(const char *const *argv, const char *file, const char *prog, int n, int watch) {
    sandbox_config c;
    sandbox_config_default(&c);
    c.watch = watch;
    c.argv = argv;
    c.file_name = file;
    double t = reward_now();
    for (int i = 0; i < n; i++) {
        sandbox_result r;
        mr_err e = {0};
        if (sandbox_run(&c, prog, strlen(prog), NULL, 0, &r, &e) != 0) {
            fprintf(stderr, "bench_code_reward: %s\n", e.msg);
            exit(1);
        }
        sandbox_result_free(&r);
    }
    return (reward_now() - t) / n;
}

int main(int argc, char **argv) {
    int n = argc > 1 ? atoi(argv[1]) : 64;
    int workers = argc > 2 ? atoi(argv[2]) : 0;
    int tests = argc > 3 ? atoi(argv[3]) : 1;
    if (n < 1 || workers < 0 || tests < 1 || tests > 64) {
        fprintf(stderr, "usage: bench_code_reward [samples >= 1] [workers >= 0] [tests_per_row 1..64]\n");
        return 2;
    }
    /* A strong reference: rewards/reward.c names the plugin weakly, so a static link would leave it out. */
    if (strcmp(reward_code_ops.kind, "code") != 0) return 1;
    long cores = sysconf(_SC_NPROCESSORS_ONLN);
    unsigned caps = sandbox_capabilities();
    printf("isolation: seccomp %s, uid %s, netns %s, landlock %s (net %s, scope %s), watch %s; %ld cores\n",
           caps & SANDBOX_ISO_SECCOMP ? "yes" : "no", caps & SANDBOX_ISO_UID ? "yes" : "no (not root)",
           caps & SANDBOX_ISO_NETNS ? "tried" : "no", caps & SANDBOX_ISO_LANDLOCK ? "yes" : "no",
           caps & SANDBOX_ISO_LL_NET ? "yes" : "no", caps & SANDBOX_ISO_LL_SCOPE ? "yes" : "no",
           caps & SANDBOX_ISO_WATCH ? "yes" : sandbox_watch_error(), cores);
    static const char *const t_argv[] = {"true", NULL};
    static const char *const py_argv[] = {"python3", "-I", "-B", "main.py", NULL};
    double py_w = bare(py_argv, "main.py", "print(1)\n", 10, 1), py_nw = bare(py_argv, "main.py", "print(1)\n", 10, 0);
    printf("one sandbox_run, serial: true %.1f ms, python3 print %.1f ms (%.1f ms without the watch: its cost %+.1f ms)\n",
           1e3 * bare(t_argv, "x", "", 10, 1), 1e3 * py_w, 1e3 * py_nw, 1e3 * (py_w - py_nw));

    char text[1024];
    snprintf(text, sizeof text,
             "run:\n  name: bench\nmodel:\n  preset: tiny\ntokenizer:\n  train:\ndata:\n  generator:\n    task: arithmetic\n"
             "rewards:\n  - code: {}\n    timeout_s: 30\n");
    recipe *r = NULL;
    reward_set *s = NULL;
    mr_err e = {0};
    if (recipe_load_string(&r, text, "bench.yaml", &e) || recipe_resolve(r, &e)) {
        fprintf(stderr, "bench_code_reward: %s\n", e.msg);
        return 1;
    }
    reward_set_opts o = {.workers = workers};
    if (reward_set_init(&s, r, &o, &e) != 0) {
        fprintf(stderr, "bench_code_reward: %s\n", e.msg);
        return 1;
    }
    recipe_free(r);

    reward_sample *smp = calloc((size_t)n, sizeof *smp);
    reward_result *res = calloc((size_t)n, sizeof *res);
    reward_outcome *out = calloc((size_t)n, sizeof *out);
    char **comp = calloc((size_t)n, sizeof *comp);
    for (int i = 0; i < n; i++) {
        int k = 100 + i;
        comp[i] = malloc(256);
        snprintf(comp[i], 256, "Here is the program:\n```python\nn = int(input())\nprint(sum(i * i for i in range(n)))\n```\n");
        cJSON *row = cJSON_CreateObject(), *ts = cJSON_AddArrayToObject(row, "tests");
        cJSON_AddStringToObject(row, "language", "python");
        for (int t = 0; t < tests; t++) {
            char in[32], want[48];
            long m = k + t;
            snprintf(in, sizeof in, "%ld\n", m);
            snprintf(want, sizeof want, "%ld\n", (m - 1) * m * (2 * m - 1) / 6);
            cJSON *tc = cJSON_CreateObject();
            cJSON_AddStringToObject(tc, "stdin", in);
            cJSON_AddStringToObject(tc, "stdout", want);
            cJSON_AddItemToArray(ts, tc);
        }
        smp[i] = (reward_sample){.prompt = "", .completion = comp[i], .row = row};
    }
    double t0 = reward_now();
    if (reward_set_score(s, smp, (size_t)n, res, out, &e) != 0) {
        fprintf(stderr, "bench_code_reward: %s\n", e.msg);
        return 1;
    }
    double dt = reward_now() - t0;
    int ok = 0;
    for (int i = 0; i < n; i++) ok += out[i].status == REWARD_SCORE && out[i].total == 1.0;
    printf("code reward: %d samples x %d test(s), %d workers: %.2f s, %.1f samples/s, %.1f programs/s (%d/%d scored 1.0)\n",
           n, tests, workers ? workers : (int)cores, dt, n / dt, (double)n * tests / dt, ok, n);
    for (int i = 0; i < n; i++) {
        cJSON_Delete((cJSON *)smp[i].row);
        free(comp[i]);
    }
    free(comp);
    free(smp);
    free(res);
    free(out);
    reward_set_free(s);
    return ok == n ? 0 : 1;
}
