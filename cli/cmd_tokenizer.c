/* cmd_tokenizer.c: `moerl tokenizer train --corpus FILE... --vocab N --out DIR`: trains a byte-level BPE with
 * DeepSeek-V3's pre-tokenizer (tokenizer/bpe_train.h) and writes DIR/tokenizer.json + tokenizer_config.json. */
#include <errno.h>
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli/cli.h"
#include "core/mem.h"
#include "tokenizer/bpe_train.h"

static void tokenizer_usage(FILE *f) {
    fprintf(f,
            "usage: moerl tokenizer train --corpus FILE... --vocab N --out DIR [--min-frequency F]\n"
            "                             [--special TOKEN...] [--format text|jsonl] [--threads N]\n"
            "                             [--model-max-length N]\n"
            "  Trains a byte-level BPE tokenizer with DeepSeek-V3's pre-tokenizer and writes DIR/tokenizer.json and\n"
            "  DIR/tokenizer_config.json (Hugging Face format; moerl, HF tokenizers and transformers.js load it).\n"
            "  --corpus FILE...     training text; each line is pre-tokenized on its own\n"
            "  --format F           text, or jsonl: the \"text\", \"prompt\", \"completion\" and messages[].content\n"
            "                       strings of each row (default: jsonl for *.jsonl files, else text)\n"
            "  --vocab N            vocabulary size, added tokens and the 256 bytes included\n"
            "  --min-frequency F    never merge a pair seen fewer than F times (default 2)\n"
            "  --split-digits       every digit its own pre-token (numbers stay digit by digit; for arithmetic)\n"
            "  --special TOKEN...   extra special tokens, after the default ones: ids 0.. are\n"
            "                       <\uff5cbegin\u2581of\u2581sentence\uff5c> (BOS), <\uff5cend\u2581of\u2581sentence\uff5c> "
            "(EOS, pad),\n"
            "                       <\uff5cUser\uff5c>, <\uff5cAssistant\uff5c>, <think>, </think> (the last four not special:\n"
            "                       kept by decode with skip-special, like DeepSeek's)\n"
            "  --threads N          word-counting threads (default: all cores)\n"
            "  --model-max-length N tokenizer_config.json model_max_length (default 16384)\n");
}

static int misuse(const char *msg, const char *arg) {
    fprintf(stderr, "moerl tokenizer train: %s%s%s\n", msg, arg ? " " : "", arg ? arg : "");
    return 2;
}

static int parse_long(const char *s, long lo, long hi, long *out) {
    if (!s || !*s) return -1;
    errno = 0;
    char *end;
    long v = strtol(s, &end, 10);
    if (*end || errno || v < lo || v > hi) return -1;
    *out = v;
    return 0;
}

static int ends_with(const char *s, const char *suf) {
    size_t n = strlen(s), m = strlen(suf);
    return n >= m && !strcmp(s + n - m, suf);
}

static int tokenizer_train(int argc, char **argv) {
    const char **corpus = mem_calloc((size_t)argc, sizeof *corpus);
    bpe_added *added = mem_calloc((size_t)argc + bpe_n_default_added, sizeof *added);
    if (!corpus || !added) {
        mem_free(corpus);
        mem_free(added);
        fprintf(stderr, "moerl tokenizer train: out of memory\n");
        return 1;
    }
    size_t n_corpus = 0, n_added = bpe_n_default_added;
    memcpy(added, bpe_default_added, bpe_n_default_added * sizeof *added);
    long vocab = -1, minf = 2, threads = 0, maxlen = 16384;
    int split_digits = 0;
    const char *out = NULL, *fmt_name = NULL;
    int rc = 0;
    bpe_trainer *t = NULL;
    for (int i = 1; i < argc && !rc; i++) {
        const char *a = argv[i];
        int has = i + 1 < argc;
        if (!strcmp(a, "--corpus") || !strcmp(a, "--special")) {
            int is_corpus = a[2] == 'c';
            int got = 0;
            while (i + 1 < argc && strncmp(argv[i + 1], "--", 2)) {
                if (is_corpus) corpus[n_corpus++] = argv[++i];
                else added[n_added++] = (bpe_added){argv[++i], 1};
                got++;
            }
            if (!got) rc = misuse(is_corpus ? "--corpus needs at least one FILE" : "--special needs a TOKEN", NULL);
        } else if (!strcmp(a, "--vocab")) {
            if (!has || parse_long(argv[++i], 1, 16777216, &vocab))
                rc = misuse("--vocab needs a positive integer, got", has ? argv[i] : "nothing");
        } else if (!strcmp(a, "--min-frequency")) {
            if (!has || parse_long(argv[++i], 1, 1L << 40, &minf))
                rc = misuse("--min-frequency needs a positive integer, got", has ? argv[i] : "nothing");
        } else if (!strcmp(a, "--threads")) {
            if (!has || parse_long(argv[++i], 1, 4096, &threads))
                rc = misuse("--threads needs a positive integer, got", has ? argv[i] : "nothing");
        } else if (!strcmp(a, "--model-max-length")) {
            if (!has || parse_long(argv[++i], 1, 1L << 30, &maxlen))
                rc = misuse("--model-max-length needs a positive integer, got", has ? argv[i] : "nothing");
        } else if (!strcmp(a, "--split-digits")) {
            split_digits = 1;
        } else if (!strcmp(a, "--out")) {
            if (!has) rc = misuse("--out needs a DIR", NULL);
            else out = argv[++i];
        } else if (!strcmp(a, "--format")) {
            if (!has || (strcmp(argv[i + 1], "text") && strcmp(argv[i + 1], "jsonl")))
                rc = misuse("--format needs text or jsonl, got", has ? argv[i + 1] : "nothing");
            else fmt_name = argv[++i];
        } else {
            rc = misuse("unknown argument", a);
        }
    }
    if (!rc && !n_corpus) rc = misuse("missing --corpus FILE...", NULL);
    if (!rc && vocab < 0) rc = misuse("missing --vocab N", NULL);
    if (!rc && !out) rc = misuse("missing --out DIR", NULL);
    if (rc) goto done;

    double t0 = omp_get_wtime();
    mr_err e = {0};
    bpe_train_opts o = {.vocab_size = (int32_t)vocab,
                        .min_frequency = minf,
                        .added = added,
                        .n_added = n_added,
                        .model_max_length = (int32_t)maxlen,
                        .threads = (int)threads,
                        .split_digits = split_digits};
    if (bpe_train_new(&t, &o, &e)) goto fail;
    for (size_t i = 0; i < n_corpus; i++) {
        bpe_format fmt = fmt_name ? (!strcmp(fmt_name, "jsonl") ? BPE_JSONL : BPE_TEXT)
                                  : (ends_with(corpus[i], ".jsonl") ? BPE_JSONL : BPE_TEXT);
        if (bpe_train_feed_file(t, corpus[i], fmt, &e)) goto fail;
    }
    double t1 = omp_get_wtime();
    if (bpe_train_fit(t, &e)) goto fail;
    double t2 = omp_get_wtime();
    if (bpe_train_write(t, out, &e)) goto fail;
    bpe_train_stats s;
    bpe_train_get_stats(t, &s);
    printf("wrote %s/tokenizer.json: vocab %d (%zu added + 256 bytes + %d merged), %zu merges; %llu words (%zu "
           "unique) in %.2f MB; counting %.2f s, merging %.2f s\n",
           out, (int)s.vocab, n_added, (int)s.vocab - (int)n_added - 256, s.merges, (unsigned long long)s.words,
           s.unique_words, (double)s.bytes / 1e6, t1 - t0, t2 - t1);
    if (s.vocab < (int32_t)vocab)
        printf("note: the corpus ran out of pairs seen >= %ld times at vocab %d (asked %ld)\n", minf, (int)s.vocab,
               vocab);
    goto done;
fail:
    fprintf(stderr, "moerl tokenizer train: %s\n", e.msg);
    rc = 1;
done:
    bpe_train_free(t);
    mem_free(corpus);
    mem_free(added);
    return rc;
}

int cmd_tokenizer(int argc, char **argv) {
    if (argc < 2) {
        tokenizer_usage(stderr);
        return 2;
    }
    if (!strcmp(argv[1], "-h") || !strcmp(argv[1], "--help") || !strcmp(argv[1], "help")) {
        tokenizer_usage(stdout);
        return 0;
    }
    if (!strcmp(argv[1], "train")) {
        if (cli_wants_help(argc - 1, argv + 1)) {
            tokenizer_usage(stdout);
            return 0;
        }
        return tokenizer_train(argc - 1, argv + 1);
    }
    fprintf(stderr, "moerl tokenizer: unknown subcommand '%s' (try 'moerl tokenizer --help')\n", argv[1]);
    return 2;
}
