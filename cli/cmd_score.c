/* cmd_score.c: `moerl score --recipe RECIPE --in samples.jsonl` scores {prompt, completion, ...} rows with the
 * recipe's reward plugins and prints one JSON line per row, for users debugging their reward scripts: the
 * total (null when the sample is not scored), the status and reason, each plugin's verdict, and the time. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli/cli.h"
#include "core/mem.h"
#include "core/recipe.h"
#include "rewards/reward.h"

#define CHUNK 256 /* rows scored together on the pool */

static void usage(FILE *f) {
    fprintf(f,
            "usage: moerl score --recipe RECIPE.yaml --in SAMPLES.jsonl [--set KEY=VALUE ...] [--workers N]\n"
            "\n"
            "Scores each row of SAMPLES.jsonl (a JSON object with completion, and prompt, tokens, truncated and\n"
            "the dataset fields the plugins read) with the recipe's rewards, and prints one JSON line per row:\n"
            "  {\"row\": 1, \"score\": 1.2, \"status\": \"score\", \"reason\": \"\", \"ms\": 0.04,\n"
            "   \"plugins\": {\"math\": {\"status\": \"score\", \"score\": 1, \"reason\": \"...\", \"ms\": 0.01}, ...}}\n"
            "score is null unless every plugin scored (unscorable, error and timeout are never read as 0).\n"
            "\n"
            "options:\n"
            "  --recipe FILE  the recipe whose rewards: list to use (paths in it are relative to its folder)\n"
            "  --in FILE      samples, one JSON object per line ('-' = stdin)\n"
            "  --set K=V      override a recipe field (as in moerl recipe)\n"
            "  --workers N    scoring threads (default: one per core)\n"
            "  -h, --help     this help\n");
}

static void print_row(const reward_set *rs, size_t rowno, const reward_outcome *o, const reward_result *res) {
    cJSON *j = cJSON_CreateObject();
    if (!j) return;
    cJSON_AddNumberToObject(j, "row", (double)rowno);
    if (o->status == REWARD_SCORE) cJSON_AddNumberToObject(j, "score", o->total);
    else cJSON_AddNullToObject(j, "score");
    cJSON_AddStringToObject(j, "status", reward_status_name(o->status));
    cJSON_AddStringToObject(j, "reason", o->reason);
    cJSON_AddNumberToObject(j, "ms", o->seconds * 1e3);
    cJSON *pl = cJSON_AddObjectToObject(j, "plugins");
    for (size_t p = 0; pl && p < reward_set_count(rs); p++) {
        const reward_result *r = &res[p];
        cJSON *x = cJSON_AddObjectToObject(pl, reward_set_plugin(rs, p)->name);
        if (!x) continue;
        cJSON_AddStringToObject(x, "status", reward_status_name(r->status));
        if (r->status == REWARD_SCORE) cJSON_AddNumberToObject(x, "score", r->score);
        else cJSON_AddNullToObject(x, "score");
        cJSON_AddStringToObject(x, "reason", r->reason);
        cJSON_AddNumberToObject(x, "ms", r->seconds * 1e3);
    }
    char *s = cJSON_PrintUnformatted(j);
    if (s) puts(s);
    cJSON_free(s);
    cJSON_Delete(j);
}

static int flush(reward_set *rs, reward_sample *smp, cJSON **rows, size_t n, const size_t *rowids, reward_result *res,
                 reward_outcome *out) {
    mr_err e = {0};
    if (n == 0) return 0;
    if (reward_set_score(rs, smp, n, res, out, &e) != 0) {
        fprintf(stderr, "moerl score: %s\n", e.msg);
        return 1;
    }
    size_t np = reward_set_count(rs);
    for (size_t i = 0; i < n; i++) print_row(rs, rowids[i], &out[i], &res[i * np]);
    fflush(stdout);
    for (size_t i = 0; i < n; i++) {
        cJSON_Delete(rows[i]);
        rows[i] = NULL;
    }
    return 0;
}

int cmd_score(int argc, char **argv) {
    if (cli_wants_help(argc, argv)) {
        usage(stdout);
        return 0;
    }
    const char *rfile = NULL, *infile = NULL;
    int workers = 0;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        int has = i + 1 < argc;
        if (!strcmp(a, "--recipe") && has) rfile = argv[++i];
        else if (!strcmp(a, "--in") && has) infile = argv[++i];
        else if (!strcmp(a, "--set") && has) i++;
        else if (!strcmp(a, "--workers") && has) {
            char *end;
            long w = strtol(argv[++i], &end, 10);
            if (*end || w < 1 || w > 256) {
                fprintf(stderr, "moerl score: --workers expects an integer from 1 to 256, got '%s'\n", argv[i]);
                return 2;
            }
            workers = (int)w;
        } else {
            fprintf(stderr, "moerl score: unknown or incomplete option '%s' (try 'moerl score --help')\n", a);
            return 2;
        }
    }
    if (!rfile || !infile) {
        fprintf(stderr, "moerl score: expected --recipe RECIPE and --in SAMPLES.jsonl (try 'moerl score --help')\n");
        return 2;
    }
    mr_err e = {0};
    recipe *r = NULL;
    reward_set *rs = NULL;
    FILE *in = NULL;
    char *line = NULL;
    size_t cap = 0;
    int rc = 1;
    reward_sample smp[CHUNK];
    cJSON *rows[CHUNK] = {0};
    reward_outcome out[CHUNK];
    reward_result *res = NULL;
    size_t n = 0, rowno = 0, rowids[CHUNK];

    if (recipe_load(&r, rfile, &e) != 0) goto fail_e;
    for (int i = 1; i < argc; i++)
        if (!strcmp(argv[i], "--set") && recipe_set(r, argv[++i], &e) != 0) goto fail_e;
    if (recipe_resolve(r, &e) != 0) goto fail_e;
    if (recipe_list_len(r, "rewards") == 0) {
        fprintf(stderr, "moerl score: %s has no rewards: list\n", rfile);
        goto done;
    }
    reward_set_opts opts = {.workers = workers};
    if (reward_set_init(&rs, r, &opts, &e) != 0) goto fail_e;
    res = mem_calloc(CHUNK * reward_set_count(rs), sizeof *res);
    if (!res) {
        fprintf(stderr, "moerl score: out of memory\n");
        goto done;
    }
    in = strcmp(infile, "-") ? fopen(infile, "r") : stdin;
    if (!in) {
        fprintf(stderr, "moerl score: cannot open %s\n", infile);
        goto done;
    }
    ssize_t len;
    while ((len = getline(&line, &cap, in)) >= 0) {
        rowno++;
        while (len > 0 && (line[len - 1] == '\n' || line[len - 1] == '\r')) line[--len] = '\0';
        if (len == 0) continue;
        cJSON *row = cJSON_Parse(line);
        if (!cJSON_IsObject(row)) {
            cJSON_Delete(row);
            fprintf(stderr, "moerl score: %s:%zu: expected a JSON object per line\n", infile, rowno);
            goto done;
        }
        const cJSON *c = cJSON_GetObjectItemCaseSensitive(row, "completion");
        if (!cJSON_IsString(c)) {
            cJSON_Delete(row);
            fprintf(stderr, "moerl score: %s:%zu: the row has no string field 'completion'\n", infile, rowno);
            goto done;
        }
        const cJSON *pr = cJSON_GetObjectItemCaseSensitive(row, "prompt");
        const cJSON *tk = cJSON_GetObjectItemCaseSensitive(row, "tokens");
        const cJSON *tr = cJSON_GetObjectItemCaseSensitive(row, "truncated");
        rows[n] = row;
        rowids[n] = rowno;
        smp[n] = (reward_sample){.prompt = cJSON_IsString(pr) ? pr->valuestring : "",
                                 .completion = c->valuestring,
                                 .row = row,
                                 .tokens = cJSON_IsNumber(tk) ? (int64_t)tk->valuedouble : 0,
                                 .truncated = cJSON_IsTrue(tr)};
        if (++n == CHUNK) {
            if (flush(rs, smp, rows, n, rowids, res, out)) goto done;
            n = 0;
        }
    }
    if (flush(rs, smp, rows, n, rowids, res, out)) goto done;
    n = 0;
    rc = 0;
    goto done;
fail_e:
    fprintf(stderr, "moerl score: %s\n", e.msg);
done:
    for (size_t i = 0; i < n; i++) cJSON_Delete(rows[i]);
    if (in && in != stdin) fclose(in);
    free(line);
    mem_free(res);
    reward_set_free(rs);
    recipe_free(r);
    return rc;
}
