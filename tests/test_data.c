/* test_data.c: data/: the task generators (determinism per seed, row i independent of n, difficulty shapes,
 * every arithmetic answer and countdown solution checked by an evaluator written here independently of the
 * generator, toolcall completions against their schemas, the held-out split), the JSONL reader (good inputs:
 * blank lines, CRLF, BOM, no final newline, long lines; a table of bad inputs with their exact file:line[:col]
 * messages; allocation failures), and `moerl data` through the binary. */
#include <criterion/criterion.h>
#include <cjson/cJSON.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/mem.h"
#include "data/gen.h"
#include "data/jsonl.h"
#include "tests/testutil.h"

/* ---- an independent evaluator: + - * / and parentheses over integers ---- */

typedef struct ev {
    const char *p;
    int bad;             /* syntax error, inexact division, overflow */
    int64_t leaves[16];  /* the numbers used, in order */
    int nleaves;
    int64_t min_result;  /* smallest result of any operation */
    int nops;
} ev;

static int64_t ev_sum(ev *s);

static int64_t ev_atom(ev *s) {
    if (*s->p == '(') {
        s->p++;
        int64_t v = ev_sum(s);
        if (*s->p != ')') s->bad = 1;
        else s->p++;
        return v;
    }
    if (*s->p < '0' || *s->p > '9') {
        s->bad = 1;
        return 0;
    }
    int64_t v = 0;
    while (*s->p >= '0' && *s->p <= '9') v = v * 10 + (*s->p++ - '0');
    if (s->nleaves < 16) s->leaves[s->nleaves++] = v;
    else s->bad = 1;
    return v;
}

static int64_t ev_apply(ev *s, char op, int64_t a, int64_t b) {
    int64_t v = 0;
    if (op == '+') v = a + b;
    else if (op == '-') v = a - b;
    else if (op == '*') v = a * b;
    else if (b == 0 || a % b) s->bad = 1;
    else v = a / b;
    if (s->nops++ == 0 || v < s->min_result) s->min_result = v;
    return v;
}

static int64_t ev_prod(ev *s) {
    int64_t v = ev_atom(s);
    while (*s->p == '*' || *s->p == '/') {
        char op = *s->p++;
        v = ev_apply(s, op, v, ev_atom(s));
    }
    return v;
}

static int64_t ev_sum(ev *s) {
    int64_t v = ev_prod(s);
    while (*s->p == '+' || *s->p == '-') {
        char op = *s->p++;
        v = ev_apply(s, op, v, ev_prod(s));
    }
    return v;
}

/* Evaluates the whole of text (up to len bytes); bad on any leftover. */
static int64_t ev_eval(ev *s, const char *text, size_t len) {
    char buf[512];
    cr_assert_lt(len, sizeof buf);
    memcpy(buf, text, len);
    buf[len] = '\0';
    memset(s, 0, sizeof *s);
    s->p = buf;
    int64_t v = ev_sum(s);
    if (*s->p) s->bad = 1;
    s->p = NULL;
    return v;
}

/* ---- helpers ---- */

static const char *str_field(const cJSON *row, const char *key) {
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(row, key);
    cr_assert(cJSON_IsString(v), "row has no string \"%s\"", key);
    return v->valuestring;
}

static cJSON *row_at(gen_task t, int d, uint64_t seed, uint64_t i) {
    gen_opts o = gen_opts_default(t, seed);
    o.difficulty = d;
    cJSON *row;
    mr_err e = {0};
    cr_assert_eq(gen_row(&o, i, &row, &e), 0, "%s", e.msg);
    return row;
}

static char *row_text(gen_task t, int d, uint64_t seed, uint64_t i) {
    cJSON *row = row_at(t, d, seed, i);
    char *s = cJSON_PrintUnformatted(row);
    cJSON_Delete(row);
    return s;
}

/* Checks every "a op b=c." step of a completion's worked part. Returns the number of steps. */
static int check_steps(const char *completion) {
    int steps = 0;
    const char *p = completion;
    for (;;) {
        long long a, b, c;
        char op;
        int used = 0;
        if (sscanf(p, " %lld%c%lld=%lld.%n", &a, &op, &b, &c, &used) != 4 || !used) break;
        long long want = op == '+' ? a + b : op == '-' ? a - b : op == '*' ? a * b : (b ? a / b : 0);
        cr_assert(strchr("+-*/", op), "step %d of \"%s\": operator '%c'", steps + 1, completion, op);
        if (op == '/') cr_assert(b && a % b == 0, "inexact division in \"%s\"", completion);
        cr_assert_eq(c, want, "step %lld%c%lld=%lld is wrong in \"%s\"", a, op, b, c, completion);
        p += used;
        steps++;
    }
    cr_assert(!strncmp(p, " #### ", 6), "completion \"%s\" does not end with \" #### ANSWER\" after its steps",
              completion);
    return steps;
}

/* ---- determinism and independence ---- */

Test(gen, same_seed_same_rows_different_seed_different_rows) {
    for (int t = 0; t < GEN_NTASKS; t++) {
        int same_other = 0;
        for (uint64_t i = 0; i < 40; i++) {
            char *a = row_text((gen_task)t, gen_default_difficulty((gen_task)t), 7, i);
            char *b = row_text((gen_task)t, gen_default_difficulty((gen_task)t), 7, i);
            char *c = row_text((gen_task)t, gen_default_difficulty((gen_task)t), 8, i);
            cr_assert_str_eq(a, b, "%s row %llu differs between two runs", gen_task_name((gen_task)t),
                             (unsigned long long)i);
            same_other += !strcmp(a, c);
            cJSON_free(a);
            cJSON_free(b);
            cJSON_free(c);
        }
        /* equal rows across seeds only by chance: the toolcall space is the smallest, still well under 10% */
        cr_assert_lt(same_other, 4, "%s: %d of 40 rows equal under seeds 7 and 8", gen_task_name((gen_task)t),
                     same_other);
    }
    /* neighbouring rows differ too (one stream per row, not one shared stream restarted) */
    char *r0 = row_text(GEN_ARITHMETIC, 3, 1, 0), *r1 = row_text(GEN_ARITHMETIC, 3, 1, 1);
    cr_assert_str_neq(r0, r1);
    cJSON_free(r0);
    cJSON_free(r1);
}

Test(gen, row_i_does_not_depend_on_n) {
    for (int t = 0; t < GEN_NTASKS; t++) {
        gen_opts o = gen_opts_default((gen_task)t, 99);
        gen_rows a = {0}, b = {0};
        mr_err e = {0};
        cr_assert_eq(gen_dataset(&o, 10, 0, &a, NULL, &e), 0, "%s", e.msg);
        cr_assert_eq(gen_dataset(&o, 100, 0, &b, NULL, &e), 0, "%s", e.msg);
        cr_assert_eq(a.n, 10);
        cr_assert_eq(b.n, 100);
        for (size_t i = 0; i < 10; i++) {
            cr_assert(cJSON_Compare(a.v[i], b.v[i], 1), "%s row %zu differs between n=10 and n=100",
                      gen_task_name((gen_task)t), i);
            cJSON *single = row_at((gen_task)t, o.difficulty, 99, i);
            cr_assert(cJSON_Compare(a.v[i], single, 1), "dataset row %zu is not gen_row(%zu)", i, i);
            cJSON_Delete(single);
        }
        gen_rows_free(&a);
        gen_rows_free(&b);
    }
}

/* ---- arithmetic ---- */

Test(gen, arithmetic_answers_are_correct_at_every_difficulty) {
    for (int d = 1; d <= 5; d++) {
        for (uint64_t i = 0; i < 300; i++) {
            cJSON *row = row_at(GEN_ARITHMETIC, d, 2024, i);
            const char *prompt = str_field(row, "prompt"), *completion = str_field(row, "completion");
            const char *answer = str_field(row, "answer");
            cr_assert(!strncmp(prompt, "Compute ", 8) && prompt[strlen(prompt) - 1] == '.', "prompt \"%s\"", prompt);
            ev s;
            int64_t v = ev_eval(&s, prompt + 8, strlen(prompt) - 9);
            cr_assert(!s.bad, "cannot evaluate \"%s\"", prompt);
            char want[32];
            snprintf(want, sizeof want, "%lld", (long long)v);
            cr_assert_str_eq(answer, want, "\"%s\": answer %s, evaluates to %s", prompt, answer, want);
            int steps = check_steps(completion);
            cr_assert_eq(steps, s.nops, "\"%s\": %d steps for %d operations", completion, steps, s.nops);
            const char *tail = strstr(completion, " #### ");
            cr_assert_str_eq(tail + 6, want, "\"%s\" ends with the wrong answer", completion);
            cr_assert_geq(s.min_result, 0, "\"%s\" has a negative intermediate value", prompt);
            cr_assert_eq(cJSON_GetObjectItemCaseSensitive(row, "difficulty")->valueint, d);
            cr_assert_str_eq(str_field(row, "task"), "arithmetic");
            cJSON_Delete(row);
        }
    }
}

Test(gen, arithmetic_difficulty_changes_the_shape) {
    for (int d = 1; d <= 5; d++) {
        int paren_rows = 0, min_ops = 99, max_ops = 0, mul = 0;
        int64_t max_leaf = 0;
        for (uint64_t i = 0; i < 200; i++) {
            cJSON *row = row_at(GEN_ARITHMETIC, d, 5, i);
            const char *prompt = str_field(row, "prompt");
            ev s;
            ev_eval(&s, prompt + 8, strlen(prompt) - 9);
            paren_rows += strchr(prompt, '(') != NULL;
            mul += strchr(prompt, '*') != NULL;
            if (s.nleaves < min_ops) min_ops = s.nleaves;
            if (s.nleaves > max_ops) max_ops = s.nleaves;
            for (int k = 0; k < s.nleaves; k++)
                if (s.leaves[k] > max_leaf) max_leaf = s.leaves[k];
            if (d == 1) cr_assert(!strchr(prompt, '-') && !strchr(prompt, '*'), "level 1 is a+b: \"%s\"", prompt);
            if (d == 2) cr_assert(strchr(prompt, '-') || strchr(prompt, '*'), "level 2 uses * or -: \"%s\"", prompt);
            if (d >= 3) cr_assert(strchr(prompt, '('), "level %d has parentheses: \"%s\"", d, prompt);
            cJSON_Delete(row);
        }
        static const int lo[6] = {0, 2, 3, 4, 5, 6}, hi[6] = {0, 2, 3, 5, 6, 7};
        static const int64_t top[6] = {0, 50, 20, 50, 99, 999};
        cr_assert_eq(min_ops, lo[d], "difficulty %d: fewest operands %d", d, min_ops);
        cr_assert_eq(max_ops, hi[d], "difficulty %d: most operands %d", d, max_ops);
        cr_assert_leq(max_leaf, top[d], "difficulty %d: operand %lld", d, (long long)max_leaf);
        cr_assert_gt(max_leaf, top[d] * 3 / 4, "difficulty %d: operands never near %lld", d, (long long)top[d]);
        if (d <= 2) cr_assert_eq(paren_rows, 0);
        if (d >= 2) cr_assert_gt(mul, 20, "difficulty %d: only %d rows multiply", d, mul);
    }
}

Test(gen, tags_style_wraps_the_same_steps) {
    gen_opts h = gen_opts_default(GEN_ARITHMETIC, 3), t = h;
    t.style = GEN_STYLE_TAGS;
    cJSON *a, *b;
    mr_err e = {0};
    cr_assert_eq(gen_row(&h, 4, &a, &e), 0, "%s", e.msg);
    cr_assert_eq(gen_row(&t, 4, &b, &e), 0, "%s", e.msg);
    const char *ca = str_field(a, "completion"), *cb = str_field(b, "completion");
    const char *ans = str_field(b, "answer");
    char want[512];
    /* the tags style draws from its own stream: compare its shape, not its numbers */
    cr_assert(!strncmp(cb, "<think>", 7), "%s", cb);
    snprintf(want, sizeof want, "</think> <answer>%s</answer>", ans);
    cr_assert(strstr(cb, want), "\"%s\" lacks \"%s\"", cb, want);
    cr_assert(strstr(ca, " #### ") && !strstr(ca, "<answer>"), "%s", ca);
    cJSON_Delete(a);
    cJSON_Delete(b);
}

/* ---- countdown ---- */

Test(gen, countdown_solutions_are_valid_and_reach_the_target) {
    for (int d = 2; d <= 6; d++) {
        int uses_all = 0;
        for (uint64_t i = 0; i < (d == 6 ? 60u : 200u); i++) {
            cJSON *row = row_at(GEN_COUNTDOWN, d, 11, i);
            const cJSON *nums = cJSON_GetObjectItemCaseSensitive(row, "numbers");
            const cJSON *target = cJSON_GetObjectItemCaseSensitive(row, "target");
            cr_assert(cJSON_IsArray(nums) && cJSON_IsNumber(target));
            cr_assert_eq(cJSON_GetArraySize(nums), d, "difficulty %d row has %d numbers", d, cJSON_GetArraySize(nums));
            int64_t avail[8];
            int used[8] = {0};
            int k = 0;
            const cJSON *n;
            cJSON_ArrayForEach(n, nums) {
                avail[k++] = (int64_t)n->valuedouble;
                cr_assert_neq((int64_t)n->valuedouble, (int64_t)target->valuedouble, "target among the numbers");
            }
            const char *sol = str_field(row, "solution"), *completion = str_field(row, "completion");
            ev s;
            int64_t v = ev_eval(&s, sol, strlen(sol));
            cr_assert(!s.bad, "solution \"%s\" does not parse or divides inexactly", sol);
            cr_assert_eq(v, (int64_t)target->valuedouble, "\"%s\" = %lld, target %d", sol, (long long)v,
                         target->valueint);
            cr_assert_gt(s.min_result, 0, "\"%s\" has a non-positive intermediate value", sol);
            for (int q = 0; q < s.nleaves; q++) {
                int found = 0;
                for (int j = 0; j < k && !found; j++)
                    if (!used[j] && avail[j] == s.leaves[q]) used[j] = found = 1;
                cr_assert(found, "\"%s\" uses %lld more often than given", sol, (long long)s.leaves[q]);
            }
            uses_all += s.nleaves == d;
            int steps = check_steps(completion);
            cr_assert_eq(steps, s.nops);
            cr_assert_str_eq(strstr(completion, " #### ") + 6, sol);
            char want[64];
            snprintf(want, sizeof want, "Make %d from ", target->valueint);
            cr_assert(!strncmp(str_field(row, "prompt"), want, strlen(want)), "%s", str_field(row, "prompt"));
            cJSON_Delete(row);
        }
        cr_assert_gt(uses_all, 0, "difficulty %d: no solution uses all the numbers", d);
    }
}

/* ---- toolcall ---- */

static void check_type(const cJSON *v, const char *type, const char *what) {
    if (!strcmp(type, "string")) cr_assert(cJSON_IsString(v), "%s: expected a string", what);
    else if (!strcmp(type, "integer"))
        cr_assert(cJSON_IsNumber(v) && v->valuedouble == (double)(long long)v->valuedouble, "%s: integer", what);
    else if (!strcmp(type, "number")) cr_assert(cJSON_IsNumber(v), "%s: number", what);
    else if (!strcmp(type, "boolean")) cr_assert(cJSON_IsBool(v), "%s: boolean", what);
    else if (!strcmp(type, "array")) cr_assert(cJSON_IsArray(v) && cJSON_GetArraySize(v) > 0, "%s: array", what);
    else cr_assert_fail("%s: unknown schema type %s", what, type);
}

Test(gen, toolcall_completions_match_their_schema) {
    for (int d = 1; d <= 3; d++) {
        int json_tools = 0, pipes = 0, bash = 0;
        for (uint64_t i = 0; i < 300; i++) {
            cJSON *row = row_at(GEN_TOOLCALL, d, 77, i);
            const char *tool = str_field(row, "tool"), *prompt = str_field(row, "prompt");
            cJSON *call = cJSON_Parse(str_field(row, "completion"));
            cr_assert(call, "completion does not parse: %s", str_field(row, "completion"));
            cr_assert_str_eq(str_field(call, "name"), tool);
            const cJSON *args = cJSON_GetObjectItemCaseSensitive(call, "arguments");
            const cJSON *schema = cJSON_GetObjectItemCaseSensitive(row, "schema");
            cr_assert(cJSON_IsObject(args) && cJSON_IsObject(schema));
            const cJSON *props = cJSON_GetObjectItemCaseSensitive(schema, "properties");
            const cJSON *req = cJSON_GetObjectItemCaseSensitive(schema, "required"), *it;
            cr_assert(cJSON_GetArraySize(req) > 0);
            cJSON_ArrayForEach(it, req) {
                cr_assert(cJSON_GetObjectItemCaseSensitive(args, it->valuestring), "%s call lacks required \"%s\"",
                          tool, it->valuestring);
            }
            cJSON_ArrayForEach(it, args) {
                const cJSON *p = cJSON_GetObjectItemCaseSensitive(props, it->string);
                cr_assert(p, "%s call has \"%s\", not in its schema", tool, it->string);
                const cJSON *type = cJSON_GetObjectItemCaseSensitive(p, "type");
                check_type(it, type->valuestring, it->string);
                const cJSON *en = cJSON_GetObjectItemCaseSensitive(p, "enum"), *x;
                if (en) {
                    int ok = 0;
                    cJSON_ArrayForEach(x, en) ok |= !strcmp(x->valuestring, it->valuestring);
                    cr_assert(ok, "%s: \"%s\" not in the enum", it->string, it->valuestring);
                }
                /* every string value the call needs is stated in the request */
                if (cJSON_IsString(it) && strcmp(tool, "bash") && strcmp(it->string, "name") &&
                    strcmp(it->string, "email"))
                    cr_assert(strstr(prompt, it->valuestring), "\"%s\" not in the request \"%s\"", it->valuestring,
                              prompt);
            }
            if (!strcmp(tool, "bash")) {
                bash++;
                const char *cmd = str_field(args, "command");
                cr_assert_gt(strlen(cmd), 3);
                pipes += strchr(cmd, '|') != NULL;
            }
            if (strstr(prompt, "JSON schema")) {
                json_tools++;
                char *sch = cJSON_PrintUnformatted(schema);
                cr_assert(strstr(prompt, sch), "the prompt does not give the schema");
                cJSON_free(sch);
            }
            cJSON_Delete(call);
            cJSON_Delete(row);
        }
        cr_assert_gt(bash, 50, "difficulty %d: %d bash rows", d, bash);
        if (d == 1) cr_assert_eq(json_tools + pipes, 0, "difficulty 1 has JSON tools or pipelines");
        if (d >= 2) cr_assert_gt(json_tools, 20, "difficulty %d: %d JSON rows", d, json_tools);
        if (d == 3) cr_assert_gt(pipes, 10, "difficulty 3: %d pipelines", pipes);
        if (d < 3) cr_assert_eq(pipes, 0);
    }
}

/* ---- options and the split ---- */

Test(gen, task_names_and_difficulty_ranges) {
    gen_task t;
    mr_err e = {0};
    cr_assert_eq(gen_task_parse("countdown", &t, &e), 0);
    cr_assert_eq(t, GEN_COUNTDOWN);
    cr_assert_eq(gen_task_parse("algebra", &t, &e), MR_EINVAL);
    cr_assert_str_eq(e.msg, "unknown task 'algebra' (tasks: arithmetic, countdown, toolcall)");
    gen_opts o = gen_opts_default(GEN_COUNTDOWN, 1);
    o.difficulty = 1;
    cr_assert_eq(gen_opts_check(&o, &e), MR_ERANGE);
    cr_assert_str_eq(e.msg, "countdown: difficulty must be 2 to 6 (how many numbers), got 1");
    o = gen_opts_default(GEN_ARITHMETIC, 1);
    o.difficulty = 6;
    cJSON *row = (cJSON *)1;
    cr_assert_eq(gen_row(&o, 0, &row, &e), MR_ERANGE);
    cr_assert_null(row);
    cr_assert_str_eq(e.msg, "arithmetic: difficulty must be 1 to 5, got 6");
    char p[64];
    cr_assert_eq(gen_eval_path("x/train.jsonl", p, sizeof p, &e), 0);
    cr_assert_str_eq(p, "x/train.eval.jsonl");
    cr_assert_eq(gen_eval_path("rows", p, sizeof p, &e), 0);
    cr_assert_str_eq(p, "rows.eval.jsonl");
    cr_assert_eq(gen_eval_path("a-very-long-name.jsonl", p, 8, &e), MR_ERANGE);
}

Test(gen, held_out_split_is_disjoint_by_prompt) {
    /* difficulty 1 has only 2,500 distinct prompts, so a 1,500-row train set repeats prompts: the split must
     * still keep every repeated prompt on one side */
    gen_opts o = gen_opts_default(GEN_ARITHMETIC, 31);
    o.difficulty = 1;
    gen_rows tr = {0}, ev_rows = {0};
    mr_err e = {0};
    cr_assert_eq(gen_dataset(&o, 1500, 300, &tr, &ev_rows, &e), 0, "%s", e.msg);
    cr_assert_eq(tr.n, 1500);
    cr_assert_eq(ev_rows.n, 300);
    double frac = 300.0 / 1800.0;
    for (size_t i = 0; i < ev_rows.n; i++) {
        const char *pe = str_field(ev_rows.v[i], "prompt");
        cr_assert(gen_is_eval(31, pe, frac));
        for (size_t j = 0; j < tr.n; j++)
            cr_assert_str_neq(pe, str_field(tr.v[j], "prompt"), "eval row %zu is train row %zu", i, j);
    }
    /* the same split, asked twice, gives the same rows; a new seed moves prompts across */
    gen_rows tr2 = {0}, ev2 = {0};
    cr_assert_eq(gen_dataset(&o, 1500, 300, &tr2, &ev2, &e), 0, "%s", e.msg);
    for (size_t i = 0; i < 300; i++) cr_assert(cJSON_Compare(ev_rows.v[i], ev2.v[i], 1));
    int moved = 0;
    for (size_t i = 0; i < 300; i++) moved += !gen_is_eval(32, str_field(ev_rows.v[i], "prompt"), frac);
    cr_assert_gt(moved, 150, "the split does not depend on the seed");
    cr_assert_eq(gen_is_eval(1, "x", 0), 0);
    cr_assert_eq(gen_is_eval(1, "x", 1), 1);
    gen_rows_free(&tr);
    gen_rows_free(&ev_rows);
    gen_rows_free(&tr2);
    gen_rows_free(&ev2);
}

Test(gen, allocation_failures_are_reported) {
    gen_opts o = gen_opts_default(GEN_ARITHMETIC, 1);
    long hit = 0;
    for (long k = 1; k < 20; k++) {
        gen_rows tr = {0}, ev_rows = {0};
        mr_err e = {0};
        mem_fail_after(k);
        int st = gen_dataset(&o, 600, 100, &tr, &ev_rows, &e);
        mem_fail_after(0);
        if (st) {
            hit++;
            cr_assert_eq(st, MR_ENOMEM, "%s", e.msg);
            cr_assert(strstr(e.msg, "out of memory"), "%s", e.msg);
        }
        gen_rows_free(&tr);
        gen_rows_free(&ev_rows);
    }
    cr_assert_gt(hit, 0);
}

/* ---- the JSONL reader ---- */

static char *dir;
static void setup_dir(void) { dir = tu_tmpdir(); }
static void teardown_dir(void) {
    tu_rmtree(dir);
    free(dir);
}

static char *write_file(const char *name, const char *text, size_t n) {
    char *p = tu_path(dir, name);
    cr_assert_eq(tu_write(p, text, n), 0);
    return p;
}

Test(jsonl, roundtrip_of_generated_rows, .init = setup_dir, .fini = teardown_dir) {
    for (int t = 0; t < GEN_NTASKS; t++) {
        gen_opts o = gen_opts_default((gen_task)t, 5);
        gen_rows rows = {0};
        mr_err e = {0};
        cr_assert_eq(gen_dataset(&o, 50, 0, &rows, NULL, &e), 0, "%s", e.msg);
        char *p = tu_path(dir, "g.jsonl");
        cr_assert_eq(gen_write_jsonl(&rows, p, &e), 0, "%s", e.msg);
        jsonl_rows d;
        cr_assert_eq(jsonl_read_all(p, JSONL_COMPLETION, &d, &e), 0, "%s", e.msg);
        cr_assert_eq(d.n, 50);
        for (size_t i = 0; i < 50; i++) {
            cr_assert(cJSON_Compare(d.rows[i], rows.v[i], 1), "row %zu changed on the way through the file", i);
            cr_assert_eq(d.lines[i], (long)i + 1);
        }
        jsonl_rows_free(&d);
        gen_rows_free(&rows);
        free(p);
    }
}

Test(jsonl, tolerant_of_blank_lines_crlf_bom_long_lines, .init = setup_dir, .fini = teardown_dir) {
    size_t big = 1 << 20;
    char *longp = malloc(big + 1);
    memset(longp, 'x', big);
    longp[big] = '\0';
    size_t cap = big + 1024;
    char *text = malloc(cap);
    int n = snprintf(text, cap,
                     "\xEF\xBB\xBF{\"prompt\": \"a\", \"completion\": \"b\", \"answer\": \"7\"}\r\n"
                     "\r\n"
                     "   \t\n"
                     "{\"messages\": [{\"role\": \"user\", \"content\": \"hi\"}, {\"role\": \"assistant\", "
                     "\"content\": \"h\\u00e9llo \xe4\xb8\xad\"}], \"id\": 3}\n"
                     "\n"
                     "\xEF\xBB\xBF{\"prompt\": \"%s\", \"completion\": \"z\"}",
                     longp);
    char *p = write_file("ok.jsonl", text, (size_t)n);
    jsonl_rows d;
    mr_err e = {0};
    cr_assert_eq(jsonl_read_all(p, JSONL_COMPLETION, &d, &e), 0, "%s", e.msg);
    cr_assert_eq(d.n, 3);
    cr_assert_eq(d.lines[0], 1);
    cr_assert_eq(d.lines[1], 4);
    cr_assert_eq(d.lines[2], 6);
    cr_assert_str_eq(str_field(d.rows[0], "answer"), "7", "extra fields are kept");
    cr_assert_eq(cJSON_GetObjectItemCaseSensitive(d.rows[1], "id")->valueint, 3);
    const cJSON *m = cJSON_GetArrayItem(cJSON_GetObjectItemCaseSensitive(d.rows[1], "messages"), 1);
    cr_assert_str_eq(str_field(m, "content"), "h\xc3\xa9llo \xe4\xb8\xad");
    cr_assert_eq(strlen(str_field(d.rows[2], "prompt")), big);
    jsonl_rows_free(&d);

    /* the iterator: same rows, then 0 at the end, repeatedly */
    jsonl_reader r;
    cr_assert_eq(jsonl_open(&r, p, &e), 0, "%s", e.msg);
    cJSON *row;
    long line;
    int k = 0;
    while (jsonl_next(&r, &row, &line, &e) == 1) {
        k++;
        cJSON_Delete(row);
    }
    cr_assert_eq(k, 3);
    cr_assert_eq(line, 6);
    cr_assert_eq(jsonl_next(&r, &row, &line, &e), 0);
    jsonl_close(&r);
    jsonl_close(&r); /* idempotent */

    /* empty and blank-only files are empty datasets */
    free(p);
    p = write_file("empty.jsonl", "\n \n\r\n", (size_t)-1);
    cr_assert_eq(jsonl_read_all(p, JSONL_COMPLETION, &d, &e), 0, "%s", e.msg);
    cr_assert_eq(d.n, 0);
    jsonl_rows_free(&d);
    free(p);
    free(text);
    free(longp);
}

typedef struct bad_case {
    const char *name;
    const char *text;
    size_t len; /* 0 = strlen */
    int need;
    int code;
    const char *msg; /* after "DIR/bad.jsonl:" */
} bad_case;

static const bad_case bad_cases[] = {
    {"array row", "{\"prompt\": \"p\", \"completion\": \"c\"}\n[1, 2]\n", 0, JSONL_COMPLETION, MR_EFORMAT,
     "2: expected a JSON object with \"prompt\" and \"completion\" or \"messages\", got an array"},
    {"string row (prompt-only)", "\"hello\"\n", 0, JSONL_PROMPT, MR_EFORMAT,
     "1: expected a JSON object with \"prompt\" or \"messages\", got a string"},
    {"number row (any)", "\n\n42\n", 0, JSONL_ANY, MR_EFORMAT, "3: expected a JSON object, got a number"},
    {"missing value", "{\"prompt\": \"a\", \"completion\": }\n", 0, JSONL_COMPLETION, MR_EFORMAT,
     "1:31: malformed JSON near \"}\""},
    {"truncated line", "{\"prompt\": \"a\"\n", 0, JSONL_COMPLETION, MR_EFORMAT, "1:14: malformed JSON near \"\\\"\""},
    {"single quotes", "{'prompt': 'a'}", 0, JSONL_COMPLETION, MR_EFORMAT,
     "1:2: malformed JSON near \"'prompt': 'a'}\""},
    {"bad second key", "{\"prompt\": \"a\", completion: 1}", 0, JSONL_COMPLETION, MR_EFORMAT,
     "1:17: malformed JSON near \"completion: 1}\""},
    {"two values on a line", "{\"prompt\": \"a\", \"completion\": \"b\"} {\"x\": 1}\r\n", 0, JSONL_COMPLETION,
     MR_EFORMAT, "1:36: unexpected text after the JSON value: \"{\\\"x\\\": 1}\" (one value a line)"},
    {"prompt not a string", "{\"prompt\": 3, \"completion\": \"b\"}", 0, JSONL_COMPLETION, MR_EFORMAT,
     "1: \"prompt\" must be a string, got a number"},
    {"completion not a string", "{\"prompt\": \"a\", \"completion\": null}", 0, JSONL_PROMPT, MR_EFORMAT,
     "1: \"completion\" must be a string, got null"},
    {"no completion", "{\"prompt\": \"a\", \"answer\": \"4\"}", 0, JSONL_COMPLETION, MR_EFORMAT,
     "1: \"prompt\" without \"completion\" (an SFT row needs both)"},
    {"completion alone", "{\"completion\": \"a\"}", 0, JSONL_PROMPT, MR_EFORMAT,
     "1: \"completion\" without \"prompt\""},
    {"other keys", "{\"question\": \"q\", \"answer\": \"a\"}", 0, JSONL_COMPLETION, MR_EFORMAT,
     "1: expected a JSON object with \"prompt\" and \"completion\" or \"messages\", got an object with keys "
     "\"question\", \"answer\""},
    {"empty object", "{}", 0, JSONL_COMPLETION, MR_EFORMAT,
     "1: expected a JSON object with \"prompt\" and \"completion\" or \"messages\", got an object with no keys"},
    {"messages not an array", "{\"messages\": {\"role\": \"user\"}}", 0, JSONL_COMPLETION, MR_EFORMAT,
     "1: \"messages\" must be an array of {role, content}, got an object"},
    {"message not an object", "{\"messages\": [\"hi\"]}", 0, JSONL_COMPLETION, MR_EFORMAT,
     "1: \"messages\"[0] must be an object {role, content}, got a string"},
    {"unknown role",
     "{\"messages\": [{\"role\": \"user\", \"content\": \"a\"}, {\"role\": \"bot\", \"content\": \"b\"}]}", 0,
     JSONL_COMPLETION, MR_EFORMAT,
     "1: \"messages\"[1].role must be one of system, user, assistant, tool, got \"bot\""},
    {"role not a string", "{\"messages\": [{\"role\": 1, \"content\": \"a\"}]}", 0, JSONL_COMPLETION, MR_EFORMAT,
     "1: \"messages\"[0].role must be a string, got a number"},
    {"content missing", "{\"messages\": [{\"role\": \"user\"}]}", 0, JSONL_COMPLETION, MR_EFORMAT,
     "1: \"messages\"[0].content must be a string, got nothing"},
    {"empty messages", "{\"messages\": []}", 0, JSONL_PROMPT, MR_EFORMAT, "1: \"messages\" is empty"},
    {"no assistant turn", "{\"messages\": [{\"role\": \"user\", \"content\": \"a\"}]}", 0, JSONL_COMPLETION,
     MR_EFORMAT, "1: \"messages\" has no assistant message to learn from"},
    {"both forms", "{\"prompt\": \"a\", \"messages\": [{\"role\": \"user\", \"content\": \"a\"}]}", 0,
     JSONL_PROMPT, MR_EFORMAT, "1: both \"messages\" and \"prompt\": a row has one or the other"},
    {"invalid UTF-8", "\n{\"prompt\": \"a\xff\", \"completion\": \"b\"}\n", 0, JSONL_COMPLETION, MR_EFORMAT,
     "2:14: invalid UTF-8 (byte 0xff)"},
    {"overlong UTF-8", "{\"prompt\": \"\xc0\xaf\"}\n", 0, JSONL_PROMPT, MR_EFORMAT,
     "1:13: invalid UTF-8 (byte 0xc0)"},
    {"NUL byte", "{\"prompt\": \"a\0\", \"completion\": \"b\"}\n", 36, JSONL_COMPLETION, MR_EFORMAT,
     "1:14: NUL byte in the line"},
    {"BOM then bad JSON", "{\"prompt\": \"a\", \"completion\": \"b\"}\n\xEF\xBB\xBF{,}\n", 0, JSONL_ANY,
     MR_EFORMAT, "2:2: malformed JSON near \",}\""}, /* columns count from after the BOM */
};

Test(jsonl, bad_inputs_name_file_and_line, .init = setup_dir, .fini = teardown_dir) {
    for (size_t i = 0; i < sizeof bad_cases / sizeof bad_cases[0]; i++) {
        const bad_case *c = &bad_cases[i];
        char *p = write_file("bad.jsonl", c->text, c->len ? c->len : strlen(c->text));
        jsonl_rows d;
        mr_err e = {0};
        int st = jsonl_read_all(p, c->need, &d, &e);
        char want[1024];
        snprintf(want, sizeof want, "%s:%s", p, c->msg);
        cr_expect_eq(st, c->code, "%s: status %d (%s)", c->name, st, e.msg);
        cr_expect_str_eq(e.msg, want, "%s: got\n%s\nwant\n%s", c->name, e.msg, want);
        cr_assert_eq(d.n, 0, "%s: rows left after an error", c->name);
        free(p);
    }
    mr_err e = {0};
    jsonl_rows d;
    char *missing = tu_path(dir, "nope.jsonl");
    cr_assert_eq(jsonl_read_all(missing, JSONL_ANY, &d, &e), MR_EIO);
    char want[1024];
    snprintf(want, sizeof want, "%s: cannot open: No such file or directory", missing);
    cr_assert_str_eq(e.msg, want);
    free(missing);
}

Test(jsonl, allocation_failures_are_reported, .init = setup_dir, .fini = teardown_dir) {
    /* enough rows that the row list grows more than once */
    gen_opts o = gen_opts_default(GEN_ARITHMETIC, 2);
    gen_rows rows = {0};
    mr_err e = {0};
    cr_assert_eq(gen_dataset(&o, 600, 0, &rows, NULL, &e), 0, "%s", e.msg);
    char *p = tu_path(dir, "g.jsonl");
    cr_assert_eq(gen_write_jsonl(&rows, p, &e), 0, "%s", e.msg);
    gen_rows_free(&rows);
    long fails = 0;
    for (long k = 1; k < 12; k++) {
        jsonl_rows d;
        mem_fail_after(k);
        int st = jsonl_read_all(p, JSONL_COMPLETION, &d, &e);
        mem_fail_after(0);
        if (st) {
            fails++;
            cr_assert_eq(st, MR_ENOMEM, "%s", e.msg);
            cr_assert_eq(d.n, 0);
        } else {
            cr_assert_eq(d.n, 600);
        }
        jsonl_rows_free(&d);
    }
    cr_assert_gt(fails, 2);
    free(p);
}

/* ---- the CLI ---- */

static int moerl(char **out, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static int moerl(char **out, const char *fmt, ...) {
    char args[4096], cmd[8192];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(args, sizeof args, fmt, ap);
    va_end(ap);
    snprintf(cmd, sizeof cmd, "'%s' %s", tu_bin(), args);
    return tu_run(cmd, out);
}

static size_t count_lines(const char *s) {
    size_t n = 0;
    for (; *s; s++) n += *s == '\n';
    return n;
}

Test(data_cli, gen_writes_train_and_eval, .init = setup_dir, .fini = teardown_dir) {
    char *out = NULL;
    char *p = tu_path(dir, "arith.jsonl"), *pe = tu_path(dir, "arith.eval.jsonl");
    int rc = moerl(&out, "data gen arithmetic --n 50 --seed 7 --difficulty 3 --eval-frac 0.2 --out '%s'", p);
    cr_assert_eq(rc, 0, "%s", out);
    cr_assert(strstr(out, "wrote 40 arithmetic rows (difficulty 3, seed 7)"), "%s", out);
    cr_assert(strstr(out, "wrote 10 held-out rows to "), "%s", out);
    free(out);
    size_t n;
    char *train = tu_read(p, &n), *eval = tu_read(pe, NULL);
    cr_assert(train && eval);
    cr_assert_eq(count_lines(train), 40);
    cr_assert_eq(count_lines(eval), 10);
    /* the same bytes as the library writes for the same request */
    gen_opts o = gen_opts_default(GEN_ARITHMETIC, 7);
    o.difficulty = 3;
    gen_rows tr = {0}, ev_rows = {0};
    mr_err e = {0};
    cr_assert_eq(gen_dataset(&o, 40, 10, &tr, &ev_rows, &e), 0, "%s", e.msg);
    char *lib = tu_path(dir, "lib.jsonl");
    cr_assert_eq(gen_write_jsonl(&tr, lib, &e), 0, "%s", e.msg);
    char *libtext = tu_read(lib, NULL);
    cr_assert_str_eq(train, libtext);
    /* the same command again: the same file; no temp file left behind */
    cr_assert_eq(moerl(&out, "data gen arithmetic --n=50 --seed=7 --difficulty=3 --eval-frac=0.2 --out='%s'", p), 0,
                 "%s", out);
    free(out);
    char *again = tu_read(p, NULL);
    cr_assert_str_eq(again, train);
    char cmd[4096];
    snprintf(cmd, sizeof cmd, "ls '%s'", dir);
    cr_assert_eq(tu_run(cmd, &out), 0);
    cr_assert_null(strstr(out, ".tmp."), "temp file left: %s", out);
    free(out);
    /* and `data check` reads it */
    cr_assert_eq(moerl(&out, "data check '%s'", p), 0, "%s", out);
    cr_assert(strstr(out, "40 rows (40 prompt/completion, 0 messages)"), "%s", out);
    free(out);
    gen_rows_free(&tr);
    gen_rows_free(&ev_rows);
    free(train);
    free(eval);
    free(again);
    free(libtext);
    free(lib);
    free(p);
    free(pe);
}

Test(data_cli, misuse_exits_2_with_a_reason, .init = setup_dir, .fini = teardown_dir) {
    char *out = NULL, *p = tu_path(dir, "x.jsonl");
    cr_assert_eq(moerl(&out, "data gen algebra --n 5 --seed 1 --out '%s'", p), 2, "%s", out);
    cr_assert_str_eq(out, "moerl data: gen: unknown task 'algebra' (tasks: arithmetic, countdown, toolcall)\n");
    free(out);
    cr_assert_eq(moerl(&out, "data gen countdown --n 5 --seed 1 --difficulty 9 --out '%s'", p), 2, "%s", out);
    cr_assert_str_eq(out, "moerl data: gen: countdown: difficulty must be 2 to 6 (how many numbers), got 9\n");
    free(out);
    cr_assert_eq(moerl(&out, "data gen toolcall --n 5 --out '%s'", p), 2, "%s", out);
    cr_assert_str_eq(out, "moerl data: gen: --n, --seed and --out are required\n");
    free(out);
    cr_assert_eq(moerl(&out, "data gen toolcall --n five --seed 1 --out '%s'", p), 2, "%s", out);
    cr_assert_str_eq(out, "moerl data: gen: --n must be an integer from 1 to 100000000, got 'five'\n");
    free(out);
    cr_assert_eq(moerl(&out, "data gen toolcall --n 5 --seed 1 --eval-frac 1.5 --out '%s'", p), 2, "%s", out);
    cr_assert_str_eq(out, "moerl data: gen: --eval-frac must be a number in [0, 1), got '1.5'\n");
    free(out);
    cr_assert_eq(moerl(&out, "data frobnicate"), 2, "%s", out);
    cr_assert_str_eq(out, "moerl data: unknown subcommand 'frobnicate' (gen, check)\n");
    free(out);
    cr_assert_eq(moerl(&out, "data gen --help"), 0, "%s", out);
    cr_assert(strstr(out, "usage: moerl data gen TASK"), "%s", out);
    free(out);
    cr_assert_null(tu_read(p, NULL), "a failed command wrote its output");
    /* a bad dataset: exit 1 with file:line */
    char *bad = write_file("bad.jsonl", "{\"prompt\": \"a\", \"completion\": \"b\"}\n[]\n", (size_t)-1);
    cr_assert_eq(moerl(&out, "data check '%s'", bad), 1, "%s", out);
    char want[2048];
    snprintf(want, sizeof want,
             "moerl data: %s:2: expected a JSON object with \"prompt\" and \"completion\" or \"messages\", got an "
             "array\n",
             bad);
    cr_assert_str_eq(out, want);
    free(out);
    free(bad);
    free(p);
}
