/* cmd_tokenize.c: `moerl tokenize --tokenizer DIR [--decode] < input`: one line of ids per input line (the
 * newline itself is not encoded), or with --decode one line of text per line of ids. For debugging and for
 * checking moerl's tokenizer against other implementations. */
#include <cjson/cJSON.h>
#include <errno.h>
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli/cli.h"
#include "core/mem.h"
#include "tokenizer/tokenizer.h"

static void tokenize_usage(FILE *f) {
    fprintf(f,
            "usage: moerl tokenize --tokenizer DIR [--decode] [--bos] [--special] [--no-added] [--skip-special] "
            "< input\n"
            "  Encodes each input line (without its newline) and prints its ids, space-separated, one line each.\n"
            "  --tokenizer DIR  a folder with tokenizer.json (and tokenizer_config.json)\n"
            "  --decode         read lines of ids and print their text instead\n"
            "  --bos            prepend BOS; --special: add BOS/EOS as tokenizer_config.json says\n"
            "  --no-added       treat added/special token texts as plain text\n"
            "  --skip-special   (--decode) leave special tokens out\n"
            "  --bench FILE.jsonl [--repeat N]  time encoding the rows' \"text\" (or prompt + completion): one\n"
            "                   thread, then all cores (OpenMP); prints MB/s\n");
}

static int decode_line(tokenizer *t, char *line, long lineno, int skip, tok_ids *ids) {
    ids->n = 0;
    char *p = line;
    for (;;) {
        while (*p == ' ' || *p == '\t' || *p == ',') p++;
        if (!*p) break;
        errno = 0;
        char *end;
        long v = strtol(p, &end, 10);
        if (end == p || errno || v < 0 || v > INT32_MAX || (*end && *end != ' ' && *end != '\t' && *end != ',')) {
            fprintf(stderr, "moerl tokenize: stdin:%ld: expected token ids, got \"%.40s\"\n", lineno, p);
            return 1;
        }
        if (tok_ids_push(ids, (int32_t)v)) {
            fprintf(stderr, "moerl tokenize: out of memory\n");
            return 1;
        }
        p = end;
    }
    char *text;
    size_t len;
    mr_err e = {0};
    if (tok_decode(t, ids->v, ids->n, skip, &text, &len, &e)) {
        fprintf(stderr, "moerl tokenize: stdin:%ld: %s\n", lineno, e.msg);
        return 1;
    }
    fwrite(text, 1, len, stdout);
    fputc('\n', stdout);
    mem_free(text);
    return 0;
}

static double now_s(void) { return omp_get_wtime(); }

/* --bench: single-thread MB/s over the file's texts, then batch MB/s across all cores over repeat copies. */
static int tokenize_bench(tokenizer *t, const char *path, int repeat) {
    FILE *f = fopen(path, "rb");
    if (!f) {
        fprintf(stderr, "moerl tokenize: %s: cannot open\n", path);
        return 1;
    }
    char *line = NULL;
    size_t cap = 0, n = 0, ncap = 0, bytes = 0;
    ssize_t r;
    char **texts = NULL;
    long lineno = 0;
    int rc = 0;
    while ((r = getline(&line, &cap, f)) >= 0) {
        lineno++;
        if (r <= 1) continue;
        cJSON *j = cJSON_Parse(line);
        const cJSON *tx = cJSON_GetObjectItemCaseSensitive(j, "text");
        const cJSON *p = cJSON_GetObjectItemCaseSensitive(j, "prompt");
        const cJSON *c = cJSON_GetObjectItemCaseSensitive(j, "completion");
        char *s = NULL;
        if (cJSON_IsString(tx)) s = strdup(tx->valuestring);
        else if (cJSON_IsString(p) && cJSON_IsString(c) &&
                 (s = malloc(strlen(p->valuestring) + strlen(c->valuestring) + 1)))
            strcat(strcpy(s, p->valuestring), c->valuestring);
        cJSON_Delete(j);
        if (!s) {
            fprintf(stderr, "moerl tokenize: %s:%ld: expected a JSON object with \"text\" or \"prompt\" + "
                    "\"completion\"\n", path, lineno);
            rc = 1;
            break;
        }
        if (n == ncap) {
            ncap = ncap ? ncap * 2 : 1024;
            texts = realloc(texts, ncap * sizeof *texts);
        }
        texts[n++] = s;
        bytes += strlen(s);
    }
    free(line);
    fclose(f);
    if (rc || n == 0) {
        if (!rc) fprintf(stderr, "moerl tokenize: %s: no rows\n", path);
        for (size_t i = 0; i < n; i++) free(texts[i]);
        free(texts);
        return 1;
    }
    mr_err e = {0};
    tok_ids ids = {0};
    size_t tokens = 0;
    double t0 = now_s();
    for (size_t i = 0; i < n && !rc; i++) {
        ids.n = 0;
        if (tok_encode(t, texts[i], strlen(texts[i]), 0, &ids, &e)) rc = 1;
        tokens += ids.n;
    }
    double t1 = now_s();
    /* warm cache: a second pass shows the word cache's effect */
    size_t m = n * (size_t)repeat;
    const char **bt = malloc(m * sizeof *bt);
    size_t *bl = malloc(m * sizeof *bl);
    tok_ids *outs = calloc(m, sizeof *outs);
    for (size_t i = 0; i < m; i++) {
        bt[i] = texts[i % n];
        bl[i] = strlen(bt[i]);
    }
    int threads = omp_get_max_threads();
    double t2 = now_s();
    if (!rc && tok_encode_batch(t, bt, bl, m, 0, outs, threads, &e)) rc = 1;
    double t3 = now_s();
    size_t btok = 0;
    for (size_t i = 0; i < m; i++) {
        btok += outs[i].n;
        tok_ids_free(&outs[i]);
    }
    if (rc) fprintf(stderr, "moerl tokenize: %s\n", e.msg);
    else {
        printf("moerl 1 thread: %.2f MB/s (%zu bytes, %zu tokens, %.3f s)\n", bytes / 1e6 / (t1 - t0), bytes, tokens,
               t1 - t0);
        printf("moerl batch, %d threads: %.2f MB/s (%zu rows, %zu bytes, %zu tokens, %.3f s)\n", threads,
               bytes * (double)repeat / 1e6 / (t3 - t2), m, bytes * (size_t)repeat, btok, t3 - t2);
    }
    free(bt);
    free(bl);
    free(outs);
    tok_ids_free(&ids);
    for (size_t i = 0; i < n; i++) free(texts[i]);
    free(texts);
    return rc;
}

int cmd_tokenize(int argc, char **argv) {
    if (cli_wants_help(argc, argv)) {
        tokenize_usage(stdout);
        return 0;
    }
    const char *dir = NULL, *bench = NULL;
    int decode = 0, skip = 0, repeat = 8;
    unsigned flags = 0;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--tokenizer") && i + 1 < argc) dir = argv[++i];
        else if (!strcmp(argv[i], "--decode")) decode = 1;
        else if (!strcmp(argv[i], "--bos")) flags |= TOK_BOS;
        else if (!strcmp(argv[i], "--special")) flags |= TOK_SPECIAL;
        else if (!strcmp(argv[i], "--no-added")) flags |= TOK_NO_ADDED;
        else if (!strcmp(argv[i], "--skip-special")) skip = 1;
        else if (!strcmp(argv[i], "--bench") && i + 1 < argc) bench = argv[++i];
        else if (!strcmp(argv[i], "--repeat") && i + 1 < argc && atoi(argv[i + 1]) > 0) repeat = atoi(argv[++i]);
        else {
            fprintf(stderr, "moerl tokenize: unknown or incomplete option '%s' (try --help)\n", argv[i]);
            return 2;
        }
    }
    if (!dir) {
        fprintf(stderr, "moerl tokenize: --tokenizer DIR is required (try --help)\n");
        return 2;
    }
    tokenizer *t;
    mr_err e = {0};
    if (tok_load(&t, dir, &e)) {
        fprintf(stderr, "moerl tokenize: %s\n", e.msg);
        return 1;
    }
    if (bench) {
        int brc = tokenize_bench(t, bench, repeat);
        tok_free(t);
        return brc;
    }
    char *line = NULL;
    size_t cap = 0;
    ssize_t n;
    long lineno = 0;
    int rc = 0;
    tok_ids ids = {0};
    while (!rc && (n = getline(&line, &cap, stdin)) >= 0) {
        lineno++;
        if (n > 0 && line[n - 1] == '\n') line[--n] = '\0';
        if (decode) {
            rc = decode_line(t, line, lineno, skip, &ids);
            continue;
        }
        ids.n = 0;
        if (tok_encode(t, line, (size_t)n, flags, &ids, &e)) {
            fprintf(stderr, "moerl tokenize: stdin:%ld: %s\n", lineno, e.msg);
            rc = 1;
            break;
        }
        for (size_t i = 0; i < ids.n; i++) printf(i ? " %d" : "%d", (int)ids.v[i]);
        putchar('\n');
    }
    free(line);
    tok_ids_free(&ids);
    tok_free(t);
    if (!rc && fflush(stdout)) {
        fprintf(stderr, "moerl tokenize: write error on stdout\n");
        rc = 1;
    }
    return rc;
}
