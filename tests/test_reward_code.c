/* test_reward_code.c: the code reward (rewards/code.c) on top of the sandbox.
 * Program extraction from completions and the stdio comparison, table-driven; then the plugin through a
 * recipe and the reward set: stdio tests and test_code (HumanEval style) scored as fractions, all_or_nothing,
 * Lua, wrong answers as 0 (not errors), breaches (an infinite loop, a network socket) as ERROR with their
 * reason and the next sample scored normally, bad rows as ERROR, and recipes/rewards-code.yaml scoring its
 * own dataset (recipes/data/code-tiny.jsonl) with golden completions. */
#include <criterion/criterion.h>
#include <cjson/cJSON.h>
#include <ctype.h>
#include <dirent.h>
#include <sys/stat.h>
#include <unistd.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/recipe.h"
#include "rewards/reward.h"
#include "rewards/sandbox.h"
#include "tests/testutil.h"

/* ---- text helpers ------------------------------------------------------------------------------------ */

static const char *const py_tags[] = {"python", "python3", "py", NULL};

Test(code_text, extract_program) {
    static const struct {
        const char *text, *want;
    } cases[] = {
        {"print(1)\n", "print(1)\n"},                                                       /* no fence: all of it */
        {"Here:\n```python\nprint(1)\n```\nDone.", "print(1)\n"},                           /* the block */
        {"```python\nx = 1\n```\nBetter:\n```python\nx = 2\n```\n", "x = 2\n"},             /* the last one */
        {"```Python3 \nprint(3)\n```", "print(3)\n"},                                       /* tag case, spaces */
        {"```bash\nls\n```\n```\nprint(4)\n```", "print(4)\n"},                             /* untagged over other tags */
        {"```python\nprint(5)\n```\n```bash\nrm -rf /\n```", "print(5)\n"},                /* a tag of ours wins */
        {"<think>...</think>\n```python\nimport sys\nprint(6)", "import sys\nprint(6)"},    /* cut off: to the end */
        {"```lua\nprint(7)\n```", "```lua\nprint(7)\n```"},                                 /* not ours: everything */
        {"", ""},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        const char *s;
        size_t n;
        code_extract_program(cases[i].text, py_tags, &s, &n);
        cr_assert(n == strlen(cases[i].want) && !memcmp(s, cases[i].want, n), "case %zu: got \"%.*s\"", i, (int)n, s);
    }
}

Test(code_text, output_matches) {
    static const struct {
        const char *got, *want;
        int eq;
    } cases[] = {
        {"3\n", "3\n", 1},         {"3", "3\n", 1},           {"3  \r\n", "3\n", 1},      {"3\n\n\n", "3", 1},
        {"1 2 \n3\t\n", "1 2\n3\n", 1}, {"3\n", "4\n", 0},     {"1\n2\n", "1\n", 0},      {"1\n", "1\n2\n", 0},
        {" 3\n", "3\n", 0},        {"1\n\n2\n", "1\n2\n", 0}, {"", "", 1},               {"\n", "", 1},
        {"", "0\n", 0},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++)
        cr_assert_eq(code_output_matches(cases[i].got, strlen(cases[i].got), cases[i].want), cases[i].eq,
                     "case %zu: \"%s\" vs \"%s\"", i, cases[i].got, cases[i].want);
}

/* ---- the plugin -------------------------------------------------------------------------------------- */

#define BASE "run:\n  name: t\nmodel:\n  preset: tiny\ntokenizer:\n  train:\ndata:\n  generator:\n    task: arithmetic\n"

static reward_set *code_set(const char *opts, double timeout) {
    char text[2048];
    snprintf(text, sizeof text, "%srewards:\n  - code:\n      memory_mb: 256\n%s    timeout_s: %g\n", BASE, opts ? opts : "",
             timeout);
    recipe *r = NULL;
    mr_err e = {0};
    cr_assert_eq(recipe_load_string(&r, text, "t.yaml", &e), 0, "%s", e.msg);
    cr_assert_eq(recipe_resolve(r, &e), 0, "%s", e.msg);
    reward_set *s = NULL;
    reward_set_opts o = {.workers = 2};
    cr_assert_eq(reward_set_init(&s, r, &o, &e), 0, "%s", e.msg);
    recipe_free(r);
    cr_assert_str_eq(reward_set_plugin(s, 0)->ops->kind, "code");
    cr_assert_eq(reward_set_plugin(s, 0)->ops, &reward_code_ops);
    return s;
}

/* Scores (completion, row JSON) pairs; results in res. */
static void score(reward_set *s, size_t n, const char *const *completions, const char *const *rows, reward_result *res) {
    reward_sample *smp = calloc(n, sizeof *smp);
    reward_outcome *o = calloc(n, sizeof *o);
    for (size_t i = 0; i < n; i++) {
        cJSON *row = cJSON_Parse(rows[i]);
        cr_assert_not_null(row, "row %zu does not parse", i);
        smp[i] = (reward_sample){.prompt = "", .completion = completions[i], .row = row};
    }
    mr_err e = {0};
    cr_assert_eq(reward_set_score(s, smp, n, res, o, &e), 0, "%s", e.msg);
    for (size_t i = 0; i < n; i++) cJSON_Delete((cJSON *)smp[i].row);
    free(smp);
    free(o);
}

static const char *const ADD_ROW =
    "{\"language\": \"python\", \"tests\": [{\"stdin\": \"1 2\\n\", \"stdout\": \"3\\n\"}, "
    "{\"stdin\": \"10 -3\\n\", \"stdout\": \"7\\n\"}, {\"stdin\": \"0 0\\n\", \"stdout\": \"0\\n\"}]}";

Test(code_reward, stdio_tests_scored_as_fractions) {
    reward_set *s = code_set(NULL, 10);
    const char *comp[] = {
        "Sure:\n```python\na, b = map(int, input().split())\nprint(a + b)\n```",
        "```python\na, b = map(int, input().split())\nprint(a + b if a != 1 else 0)\n```", /* wrong on 1 2 */
        "```python\na, b = map(int, input().split())\nprint(a * b)\n```",            /* right only on 0 0 */
        "```python\nprint(3)\n```",                                                  /* right only on 1 2 */
        "```python\nraise SystemExit(1)\n```",                                       /* no output, exit 1 */
        "```python\nthis is not python\n```",                                        /* a syntax error */
    };
    const char *rows[] = {ADD_ROW, ADD_ROW, ADD_ROW, ADD_ROW, ADD_ROW, ADD_ROW};
    reward_result res[6];
    score(s, 6, comp, rows, res);
    const double want[] = {1.0, 2.0 / 3, 1.0 / 3, 1.0 / 3, 0.0, 0.0};
    for (int i = 0; i < 6; i++) {
        cr_assert_eq(res[i].status, REWARD_SCORE, "sample %d: %s %s", i, reward_status_name(res[i].status), res[i].reason);
        cr_assert_float_eq(res[i].score, want[i], 1e-12, "sample %d: %g", i, res[i].score);
    }
    cr_assert_str_eq(res[0].reason, "passed 3/3");
    cr_assert_str_eq(res[1].reason, "passed 2/3");
    reward_set_free(s);

    s = code_set("      all_or_nothing: true\n", 10);
    score(s, 2, comp, rows, res);
    cr_assert(res[0].status == REWARD_SCORE && res[0].score == 1.0);
    cr_assert(res[1].status == REWARD_SCORE && res[1].score == 0.0, "%g", res[1].score);
    reward_set_free(s);
}

Test(code_reward, test_code_and_lua) {
    reward_set *s = code_set(NULL, 10);
    const char *tc = "{\"language\": \"python\", \"test_code\": \"assert add(2, 3) == 5\\nassert add(-1, 1) == 0\"}";
    const char *lua = "{\"language\": \"lua\", \"tests\": [{\"stdin\": \"4\\n\", \"stdout\": \"16\\n\"}, "
                      "{\"input\": \"-3\\n\", \"output\": \"9\\n\"}]}";
    const char *comp[] = {
        "```python\ndef add(a, b):\n    return a + b\n```",
        "```python\ndef add(a, b):\n    return a - b\n```",
        "```lua\nlocal x = tonumber(io.read('l'))\nprint(x * x)\n```",
        "```lua\nprint(16)\n```",
    };
    const char *rows[] = {tc, tc, lua, lua};
    reward_result res[4];
    score(s, 4, comp, rows, res);
    const double want[] = {1.0, 0.0, 1.0, 0.5};
    for (int i = 0; i < 4; i++) {
        cr_assert_eq(res[i].status, REWARD_SCORE, "sample %d: %s", i, res[i].reason);
        cr_assert_float_eq(res[i].score, want[i], 1e-12, "sample %d: %g", i, res[i].score);
    }
    reward_set_free(s);
}

Test(code_reward, breaches_are_errors_with_their_reason) {
    reward_set *s = code_set(NULL, 2.0);
    const char *comp[] = {
        "```python\nwhile True:\n    pass\n```",
        "```python\nimport socket\nsocket.create_connection(('127.0.0.1', 80))\n```",
        "```python\nx = [0] * (1 << 30)\n```",
        "```python\na, b = map(int, input().split())\nprint(a + b)\n```",
    };
    const char *rows[] = {ADD_ROW, ADD_ROW, ADD_ROW, ADD_ROW};
    reward_result res[4];
    double t0 = reward_now();
    score(s, 4, comp, rows, res);
    double dt = reward_now() - t0;
    cr_assert_eq(res[0].status, REWARD_ERROR, "%s: %s", reward_status_name(res[0].status), res[0].reason);
    cr_assert(!strncmp(res[0].reason, "test 1/3: timeout: killed after ", 32), "%s", res[0].reason);
    cr_assert(res[0].seconds <= 2.2, "%.3f s", res[0].seconds);
    cr_assert_eq(res[1].status, REWARD_ERROR);
    cr_assert_str_eq(res[1].reason, "test 1/3: killed by seccomp (SIGSYS): a forbidden system call");
    cr_assert_eq(res[2].status, REWARD_ERROR);
    cr_assert_str_eq(res[2].reason, "test 1/3: memory limit: out of memory under the 256 MiB address-space limit");
    cr_assert_eq(res[3].status, REWARD_SCORE, "%s", res[3].reason); /* the next sample is scored normally */
    cr_assert_eq(res[3].score, 1.0);
    cr_assert(dt < 2.2 + 1.0, "the batch took %.2f s", dt);
    reward_stats st;
    reward_set_stats(s, 0, &st);
    cr_assert_eq(st.errors, 3);
    cr_assert_eq(st.scored, 1);
    cr_assert_eq(st.timeouts, 0); /* contained by the plugin, not abandoned by the set */
    reward_set_free(s);
}

Test(code_reward, bad_rows_are_errors) {
    reward_set *s = code_set(NULL, 5);
    const char *comp[] = {"print(1)", "print(1)", "print(1)", "print(1)", "print(1)"};
    const char *rows[] = {
        "{\"language\": \"cobol\", \"tests\": [{\"stdin\": \"\", \"stdout\": \"1\"}]}",
        "{\"language\": \"python\"}",
        "{\"tests\": \"nope\"}",
        "{\"tests\": [{\"stdin\": \"\"}]}",
        "{\"tests\": [{\"stdin\": \"\", \"stdout\": \"1\"}]}", /* no language: python */
    };
    reward_result res[5];
    score(s, 5, comp, rows, res);
    cr_assert_eq(res[0].status, REWARD_ERROR);
    cr_assert_str_eq(res[0].reason, "row field language: unknown language \"cobol\" (known: python, lua)");
    cr_assert_str_eq(res[1].reason, "the row has no tests: neither tests nor test_code");
    cr_assert_str_eq(res[2].reason, "row field tests: expected a list of {stdin, stdout}");
    cr_assert_str_eq(res[3].reason, "row field tests[0]: expected {stdin, stdout} strings");
    cr_assert_eq(res[4].status, REWARD_SCORE);
    cr_assert_eq(res[4].score, 1.0);
    reward_set_free(s);
}

/* The shipped recipe scores its shipped dataset: golden completions pass, a broken one does not. */
Test(code_reward, shipped_recipe_and_dataset) {
    char path[4096], data[4096];
    snprintf(path, sizeof path, "%s/recipes/rewards-code.yaml", tu_src());
    snprintf(data, sizeof data, "%s/recipes/data/code-tiny.jsonl", tu_src());
    recipe *r = NULL;
    mr_err e = {0};
    cr_assert_eq(recipe_load(&r, path, &e), 0, "%s", e.msg);
    cr_assert_eq(recipe_resolve(r, &e), 0, "%s", e.msg);
    reward_set *s = NULL;
    cr_assert_eq(reward_set_init(&s, r, NULL, &e), 0, "%s", e.msg);
    recipe_free(r);
    size_t len = 0;
    char *text = tu_read(data, &len);
    cr_assert_not_null(text, "%s", data);
    reward_sample smp[16];
    size_t n = 0;
    for (char *line = strtok(text, "\n"); line && n < 16; line = strtok(NULL, "\n")) {
        cJSON *row = cJSON_Parse(line);
        cr_assert_not_null(row, "%s", line);
        const cJSON *c = cJSON_GetObjectItemCaseSensitive(row, "completion");
        cr_assert(cJSON_IsString(c));
        smp[n++] = (reward_sample){.prompt = "", .completion = c->valuestring, .row = row};
    }
    cr_assert_geq(n, 6);
    reward_result res[16];
    reward_outcome out[16];
    cr_assert_eq(reward_set_score(s, smp, n, res, out, &e), 0, "%s", e.msg);
    for (size_t i = 0; i < n; i++) {
        cr_assert_eq(out[i].status, REWARD_SCORE, "row %zu: %s", i, out[i].reason);
        cr_assert_eq(out[i].total, 1.0, "row %zu: %g (%s)", i, out[i].total, res[i].reason);
    }
    smp[0].completion = "```python\nprint(3)\n```"; /* right on the first of three tests only */
    cr_assert_eq(reward_set_score(s, smp, 1, res, out, &e), 0, "%s", e.msg);
    cr_assert_float_eq(out[0].total, 1.0 / 3, 1e-12);
    for (size_t i = 0; i < n; i++) cJSON_Delete((cJSON *)smp[i].row);
    free(text);
    reward_set_free(s);
}

/* The command in the recipe's header, through the moerl binary (the code plugin must be linked into it), on
 * the shipped rows plus a hostile one and a wrong one. */
Test(code_reward, moerl_score_cli) {
    char *dir = tu_tmpdir();
    char *in = tu_path(dir, "rows.jsonl"), data[4096];
    snprintf(data, sizeof data, "%s/recipes/data/code-tiny.jsonl", tu_src());
    size_t len = 0;
    char *text = tu_read(data, &len);
    cr_assert_not_null(text, "%s", data);
    size_t rows = 0;
    for (size_t i = 0; i < len; i++) rows += text[i] == '\n';
    const char *extra =
        "{\"prompt\": \"p\", \"language\": \"python\", \"tests\": [{\"stdin\": \"1 2\\n\", \"stdout\": \"3\\n\"}], "
        "\"completion\": \"```python\\nimport os\\ntry: os.kill(os.getppid(), 15)\\nexcept OSError: pass\\nprint(3)\\n```\"}\n"
        "{\"prompt\": \"p\", \"language\": \"python\", \"tests\": [{\"stdin\": \"1 2\\n\", \"stdout\": \"3\\n\"}], "
        "\"completion\": \"```python\\nprint(4)\\n```\"}\n";
    char *all = malloc(len + strlen(extra) + 1);
    memcpy(all, text, len);
    strcpy(all + len, extra);
    cr_assert_eq(tu_write(in, all, (size_t)-1), 0);
    char cmd[8192], *out = NULL;
    snprintf(cmd, sizeof cmd, "cd %s && %s score --recipe recipes/rewards-code.yaml --in %s", tu_src(), tu_bin(), in);
    cr_assert_eq(tu_run(cmd, &out), 0, "%s", out);
    size_t line = 0;
    for (char *l = strtok(out, "\n"); l; l = strtok(NULL, "\n"), line++) {
        cJSON *j = cJSON_Parse(l);
        cr_assert_not_null(j, "%s", l);
        const char *st = cJSON_GetObjectItem(j, "status")->valuestring;
        const cJSON *reason = cJSON_GetObjectItem(j, "reason");
        if (line < rows) {
            cr_expect_str_eq(st, "score", "row %zu: %s", line + 1, l);
            cr_expect_eq(cJSON_GetObjectItem(j, "score")->valuedouble, 1.0, "row %zu", line + 1);
        } else if (line == rows) { /* the hostile row: the parent is signalled (denied), then the right answer */
            if (sandbox_capabilities() & SANDBOX_ISO_WATCH) {
                cr_expect_str_eq(st, "error", "%s", l);
                cr_expect(cJSON_IsString(reason) && strstr(reason->valuestring, "denied: signal to a process outside the "
                                                                                 "sandbox: kill("),
                          "%s", l);
            }
        } else {
            cr_expect_str_eq(st, "score", "%s", l);
            cr_expect_eq(cJSON_GetObjectItem(j, "score")->valuedouble, 0.0, "%s", l);
        }
        cJSON_Delete(j);
    }
    cr_assert_eq(line, rows + 2, "%zu lines for %zu rows", line, rows + 2);
    free(out);
    free(all);
    free(text);
    free(in);
    tu_rmtree(dir);
    free(dir);
}

/* ---- the adversarial table, through the reward ----------------------------------------------------------
 * Each attack is one sample of a batch scored by a set with ONE worker; the sample after it is an honest
 * program that must score 1.0 on the same worker. Breaches are ERROR with their reason, within the row's limit
 * + 10%; attacks the kernel denies (writes outside the temporary directory, /etc/shadow, the parent's
 * environment, signals to the parent) are contained (checked from here) and, where the kernel has seccomp user
 * notification (the sandbox's watch), seen: ERROR "denied: ..." with what was tried. When root, every sandbox
 * runs as a uid of code.c's range: no process of that range may be left. */

#define CODE_UID_BASE 1510000000u /* rewards/code.c UID_BASE */

static int procs_of_code_uids(void) { return tu_procs_of_uids(CODE_UID_BASE, 4096u); }

typedef struct {
    const char *name, *program;
    reward_status status;
    const char *reason; /* prefix of the reason; for SCORE the expected score is 0 */
    const char *alt;    /* another acceptable prefix, or NULL */
} code_attack;

static const char *const ONE_ROW = "{\"language\": \"python\", \"tests\": [{\"stdin\": \"1 2\\n\", \"stdout\": \"3\\n\"}]}";
static const char *const HONEST = "```python\na, b = map(int, input().split())\nprint(a + b)\n```";

static void run_code_attacks(const code_attack *cases, size_t n, double limit) {
    char text[2048];
    snprintf(text, sizeof text, "%srewards:\n  - code:\n      memory_mb: 128\n      max_output_kb: 16\n    timeout_s: %g\n",
             BASE, limit);
    recipe *r = NULL;
    mr_err e = {0};
    cr_assert_eq(recipe_load_string(&r, text, "t.yaml", &e), 0, "%s", e.msg);
    cr_assert_eq(recipe_resolve(r, &e), 0, "%s", e.msg);
    reward_set *s = NULL;
    reward_set_opts o = {.workers = 1};
    cr_assert_eq(reward_set_init(&s, r, &o, &e), 0, "%s", e.msg);
    recipe_free(r);
    for (size_t i = 0; i < n; i++) {
        const char *comp[2] = {cases[i].program, HONEST};
        const char *rows[2] = {ONE_ROW, ONE_ROW};
        reward_result res[2];
        score(s, 2, comp, rows, res);
        /* an alternative reason "timeout" also accepts the set's own TIMEOUT (the outside limit) */
        int st_ok = res[0].status == cases[i].status ||
                    (cases[i].alt && !strncmp(cases[i].alt, "timeout", 7) && res[0].status == REWARD_TIMEOUT);
        cr_expect(st_ok, "%s: %s (%s)", cases[i].name, reward_status_name(res[0].status), res[0].reason);
        int why_ok = !strncmp(res[0].reason, cases[i].reason, strlen(cases[i].reason)) ||
                     (cases[i].alt && (strstr(res[0].reason, cases[i].alt) != NULL));
        cr_expect(why_ok, "%s: reason '%s', expected '%s...'", cases[i].name, res[0].reason, cases[i].reason);
        if (cases[i].status == REWARD_SCORE) cr_expect_eq(res[0].score, 0.0, "%s: %g", cases[i].name, res[0].score);
        cr_expect_leq(res[0].seconds, limit * 1.1, "%s: %.3f s, the limit is %g s", cases[i].name, res[0].seconds, limit);
        cr_expect_eq(res[1].status, REWARD_SCORE, "after %s: %s", cases[i].name, res[1].reason);
        cr_expect_eq(res[1].score, 1.0, "after %s", cases[i].name);
        if (geteuid() == 0) cr_expect_eq(procs_of_code_uids(), 0, "after %s: sandbox processes are left", cases[i].name);
    }
    reward_set_free(s);
}

Test(code_reward, adversarial_breaches) {
    static const code_attack cases[] = {
        /* (the infinite loop: breaches_are_errors_with_their_reason above) */
        {"sleeping past the limit", "```python\nimport time\ntime.sleep(100)\n```", REWARD_ERROR,
         "test 1/1: timeout: killed after ", NULL},
        {"fork bomb", "```python\nimport os\nwhile True:\n    os.fork()\n```", REWARD_ERROR,
         "test 1/1: process limit: fork failed at 32 processes",
         /* 32 spinning interpreters on a loaded machine: the clock may stop them before the first one fails, and
          * reaping them may take the set's outside limit */
         "timeout"},
        /* (the gradual bomb is in test_sandbox; here one that is quick even on a loaded machine) */
        {"memory bomb", "```python\na = [0] * (1 << 28)\n```", REWARD_ERROR,
         "test 1/1: memory limit: ", NULL},
        {"huge output", "```python\nwhile True:\n    print('y' * 1000)\n```", REWARD_ERROR, "test 1/1: output limit", NULL},
        {"network connect", "```python\nimport socket\nsocket.create_connection(('127.0.0.1', 22), timeout=1)\n```",
         REWARD_ERROR, "test 1/1: killed by seccomp (SIGSYS)", NULL},
        {"kill(-1)", "```python\nimport os, signal\nos.kill(-1, signal.SIGKILL)\n```", REWARD_ERROR,
         "test 1/1: killed by seccomp (SIGSYS)", NULL},
        {"orphaned background children",
         "```python\nimport os, time\nif os.fork() == 0:\n    os.setsid()\n    if os.fork() == 0:\n        time.sleep(100)\n"
         "    os._exit(0)\nif os.fork() == 0:\n    time.sleep(100)\nprint(3)\n```",
         REWARD_ERROR, "test 1/1: left ", NULL},
    };
    if (geteuid() != 0) cr_skip_test("the fork limit (RLIMIT_NPROC) needs root: see rewards/sandbox.h");
    run_code_attacks(cases, sizeof cases / sizeof cases[0], 1.5);
}

Test(code_reward, adversarial_denials) {
    char *dir = tu_tmpdir();
    chmod(dir, 0777); /* writable by anyone: only the sandbox stands in the way */
    char *victim = tu_path(dir, "pwned");
    setenv("MOERL_TEST_SECRET", "hunter2-s3cr3t", 1);
    char write_prog[1024], parent_prog[512];
    const int watched = (sandbox_capabilities() & SANDBOX_ISO_WATCH) != 0;
    /* Watched, each attack catches its error and prints the right answer: only the watch can tell the attempt
     * from an honest answer. Unwatched, each prints the right answer only when its attack succeeded. */
    const char *catch_ = watched ? "try: " : "", *pass_ = watched ? "\nexcept OSError: pass" : "";
    snprintf(parent_prog, sizeof parent_prog, "```python\nimport os, signal\n%sos.kill(%d, signal.SIGKILL)%s\nprint(3)\n```",
             catch_, (int)getpid(), pass_);
    snprintf(write_prog, sizeof write_prog, "```python\n%sopen('%s', 'w').write('x')%s\nprint(3)\n```", catch_, victim, pass_);
    const reward_status want_st = watched ? REWARD_ERROR : REWARD_SCORE;
    char write_why[600];
    snprintf(write_why, sizeof write_why, "test 1/1: denied: write outside the temporary directory: openat %s", victim);
    const code_attack cases[] = {
        {"write outside the temporary directory", write_prog, want_st, watched ? write_why : "passed 0/1", NULL},
        {"/etc/shadow", watched ? "```python\ntry: open('/etc/shadow').read()\nexcept OSError: pass\nprint(3)\n```"
                                : "```python\nopen('/etc/shadow').read()\nprint(3)\n```", want_st,
         watched ? "test 1/1: denied: read of a file the sandbox may not read: openat /etc/shadow (mode " : "passed 0/1", NULL},
        {"the parent's environment",
         "```python\nimport os\ntry: d = open('/proc/%d/environ' % os.getppid(), 'rb').read()\nexcept OSError: d = b''\n"
         "print(3 if b'hunter2' in d else 0)\n```",
         want_st, watched ? "test 1/1: denied: access to a process outside the sandbox: openat /proc/" : "passed 0/1", NULL},
        {"own environment", "```python\nimport os\nprint(3 if 'MOERL_TEST_SECRET' in os.environ else 0)\n```", REWARD_SCORE,
         "passed 0/1", NULL},
        {"signalling the parent", parent_prog, want_st,
         watched ? "test 1/1: denied: signal to a process outside the sandbox: kill(" : "passed 0/1", NULL},
    };
    if (geteuid() != 0) cr_skip_test("/etc/shadow and the parent's environment are readable by root only: needs root");
    if (!watched) cr_log_warn("no watch here (%s): denied attacks score as wrong answers", sandbox_watch_error());
    run_code_attacks(cases, sizeof cases / sizeof cases[0], 3.0);
    struct stat st;
    cr_assert_eq(stat(victim, &st), -1, "the program wrote %s", victim);
    unsetenv("MOERL_TEST_SECRET");
    free(victim);
    tu_rmtree(dir);
    free(dir);
}
