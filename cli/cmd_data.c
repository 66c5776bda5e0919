/* cmd_data.c: `moerl data gen TASK ...` writes a generated dataset (data/gen.h); `moerl data check FILE` reads a
 * JSONL dataset the way the trainers do and reports the first bad row as file:line (data/jsonl.h). */
#include <errno.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli/cli.h"
#include "data/gen.h"
#include "data/jsonl.h"

static void data_usage(FILE *f) {
    fprintf(f,
            "usage: moerl data gen TASK --n N --seed S --out FILE.jsonl [--difficulty D] [--eval-frac F]\n"
            "                      [--style hash|tags]\n"
            "       moerl data check FILE.jsonl [--prompt-only]\n"
            "  gen     generate N rows of a task (%s), fresh from the seed: row i depends only\n"
            "          on (task, difficulty, seed, i), so the same seed gives the same file\n"
            "    --difficulty D  arithmetic 1-5 (default 2), countdown 2-6 = how many numbers (default 4),\n"
            "                    toolcall 1-3 (default 2)\n"
            "    --eval-frac F   hold out round(N*F) of the N rows in FILE.eval.jsonl; train and eval never\n"
            "                    share a prompt\n"
            "    --style S       final answer of arithmetic/countdown completions: hash (\"... #### 42\", the\n"
            "                    default) or tags (\"<think>...</think> <answer>42</answer>\")\n"
            "  check   read a dataset as the trainers do: rows {prompt, completion} or {messages: [...]}\n"
            "    --prompt-only   rows need only a prompt (GRPO / eval datasets)\n",
            gen_task_list());
}

static int misuse(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static int misuse(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    fputs("moerl data: ", stderr);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
    return 2;
}

/* Option value for "--name V" or "--name=V"; advances *i. NULL when argv[*i] is not this option. */
static const char *opt_value(int argc, char **argv, int *i, const char *name, int *missing) {
    size_t n = strlen(name);
    if (strncmp(argv[*i], name, n)) return NULL;
    if (argv[*i][n] == '=') return argv[*i] + n + 1;
    if (argv[*i][n]) return NULL;
    if (*i + 1 >= argc) {
        *missing = 1;
        return NULL;
    }
    return argv[++*i];
}

static int parse_u64(const char *s, unsigned long long *out) {
    if (!s || !*s || *s == '-') return -1;
    errno = 0;
    char *end;
    *out = strtoull(s, &end, 10);
    return errno || *end ? -1 : 0;
}

static int data_gen(int argc, char **argv) {
    const char *task_name = NULL, *out = NULL, *nstr = NULL, *seedstr = NULL, *dstr = NULL, *fstr = NULL,
               *style = NULL;
    for (int i = 1; i < argc; i++) {
        int missing = 0;
        const char *v;
        if ((v = opt_value(argc, argv, &i, "--n", &missing))) nstr = v;
        else if ((v = opt_value(argc, argv, &i, "--seed", &missing))) seedstr = v;
        else if ((v = opt_value(argc, argv, &i, "--out", &missing))) out = v;
        else if ((v = opt_value(argc, argv, &i, "--difficulty", &missing))) dstr = v;
        else if ((v = opt_value(argc, argv, &i, "--eval-frac", &missing))) fstr = v;
        else if ((v = opt_value(argc, argv, &i, "--style", &missing))) style = v;
        else if (missing) return misuse("gen: %s needs a value", argv[i]);
        else if (argv[i][0] == '-' && argv[i][1]) return misuse("gen: unknown option '%s' (try --help)", argv[i]);
        else if (!task_name) task_name = argv[i];
        else return misuse("gen: unexpected argument '%s'", argv[i]);
        if (missing) return misuse("gen: %s needs a value", argv[i]);
    }
    if (!task_name) return misuse("gen: which task? (tasks: %s)", gen_task_list());
    mr_err e = {0};
    gen_task task;
    if (gen_task_parse(task_name, &task, &e)) return misuse("gen: %s", e.msg);
    if (!nstr || !seedstr || !out) return misuse("gen: --n, --seed and --out are required");
    unsigned long long n, seed;
    if (parse_u64(nstr, &n) || n == 0 || n > 100000000ull)
        return misuse("gen: --n must be an integer from 1 to 100000000, got '%s'", nstr);
    if (parse_u64(seedstr, &seed)) return misuse("gen: --seed must be a non-negative integer, got '%s'", seedstr);
    gen_opts o = gen_opts_default(task, seed);
    if (dstr) {
        unsigned long long d;
        if (parse_u64(dstr, &d) || d > 1000) return misuse("gen: --difficulty must be an integer, got '%s'", dstr);
        o.difficulty = (int)d;
    }
    if (style) {
        if (!strcmp(style, "hash")) o.style = GEN_STYLE_HASH;
        else if (!strcmp(style, "tags")) o.style = GEN_STYLE_TAGS;
        else return misuse("gen: --style must be hash or tags, got '%s'", style);
    }
    if (gen_opts_check(&o, &e)) return misuse("gen: %s", e.msg);
    double frac = 0;
    if (fstr) {
        char *end;
        errno = 0;
        frac = strtod(fstr, &end);
        if (errno || *end || end == fstr || !(frac >= 0 && frac < 1))
            return misuse("gen: --eval-frac must be a number in [0, 1), got '%s'", fstr);
    }
    size_t n_eval = (size_t)llround((double)n * frac);
    if (frac > 0 && n_eval == 0) n_eval = 1;
    if (n_eval >= n) return misuse("gen: --eval-frac %s leaves no training rows out of %llu", fstr, n);
    size_t n_train = (size_t)n - n_eval;
    char eval_path[4096] = "";
    if (n_eval && gen_eval_path(out, eval_path, sizeof eval_path, &e)) return misuse("gen: %s", e.msg);

    gen_rows train = {0}, eval = {0};
    int st = gen_dataset(&o, n_train, n_eval, &train, &eval, &e);
    if (!st) st = gen_write_jsonl(&train, out, &e);
    if (!st && n_eval) st = gen_write_jsonl(&eval, eval_path, &e);
    gen_rows_free(&train);
    gen_rows_free(&eval);
    if (st) {
        fprintf(stderr, "moerl data: gen: %s\n", e.msg);
        return 1;
    }
    printf("wrote %zu %s rows (difficulty %d, seed %llu) to %s\n", n_train, gen_task_name(task), o.difficulty, seed,
           out);
    if (n_eval) printf("wrote %zu held-out rows to %s\n", n_eval, eval_path);
    return 0;
}

static int data_check(int argc, char **argv) {
    const char *path = NULL;
    int need = JSONL_COMPLETION;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--prompt-only")) need = JSONL_PROMPT;
        else if (argv[i][0] == '-' && argv[i][1]) return misuse("check: unknown option '%s' (try --help)", argv[i]);
        else if (!path) path = argv[i];
        else return misuse("check: unexpected argument '%s'", argv[i]);
    }
    if (!path) return misuse("check: which file?");
    jsonl_rows d;
    mr_err e = {0};
    if (jsonl_read_all(path, need, &d, &e)) {
        fprintf(stderr, "moerl data: %s\n", e.msg);
        return 1;
    }
    size_t msgs = 0;
    for (size_t i = 0; i < d.n; i++) msgs += cJSON_GetObjectItemCaseSensitive(d.rows[i], "messages") != NULL;
    printf("%s: %zu rows (%zu prompt/completion, %zu messages)\n", path, d.n, d.n - msgs, msgs);
    jsonl_rows_free(&d);
    return 0;
}

int cmd_data(int argc, char **argv) {
    if (argc < 2 || !strcmp(argv[1], "-h") || !strcmp(argv[1], "--help")) {
        data_usage(argc < 2 ? stderr : stdout);
        return argc < 2 ? 2 : 0;
    }
    if (cli_wants_help(argc, argv)) {
        data_usage(stdout);
        return 0;
    }
    if (!strcmp(argv[1], "gen")) return data_gen(argc - 1, argv + 1);
    if (!strcmp(argv[1], "check")) return data_check(argc - 1, argv + 1);
    return misuse("unknown subcommand '%s' (gen, check)", argv[1]);
}
