/* load.c: tokenizer.json (+ tokenizer_config.json) -> struct tokenizer.
 * Every error names the file and the JSON path of the offending value ("model.merges[1033]"), says what was
 * expected and what was found. A byte-level vocabulary is mapped back from GPT-2's printable stand-ins to raw
 * bytes here (the HF ByteLevel decoder's rule: a token with any character outside the map keeps its UTF-8). */
#include <cjson/cJSON.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/mem.h"
#include "tokenizer/tok_internal.h"

/* ---- GPT-2 bytes_to_unicode: the code point standing for each byte, and back ---- */
static int byte_to_cp(int b) {
    if ((b >= 33 && b <= 126) || (b >= 161 && b <= 172) || (b >= 174 && b <= 255)) return b;
    int n = 0;
    for (int x = 0; x < b; x++)
        if (!((x >= 33 && x <= 126) || (x >= 161 && x <= 172) || (x >= 174 && x <= 255))) n++;
    return 256 + n;
}

static int cp_to_byte_table[324];

static void init_cp_table(void) {
    for (int i = 0; i < 324; i++) cp_to_byte_table[i] = -1;
    for (int b = 0; b < 256; b++) cp_to_byte_table[byte_to_cp(b)] = b;
}

/* Decodes one UTF-8 code point; returns its length, 0 when invalid. */
static size_t utf8_next(const unsigned char *s, size_t n, uint32_t *cp) {
    if (n == 0) return 0;
    unsigned c = s[0];
    if (c < 0x80) { *cp = c; return 1; }
    size_t k = (c >= 0xF0 && c < 0xF5) ? 4 : (c >= 0xE0) && c < 0xF0 ? 3 : (c >= 0xC2 && c < 0xE0) ? 2 : 0;
    if (k == 0 || k > n) return 0;
    uint32_t v = c & (0x7F >> k);
    for (size_t i = 1; i < k; i++) {
        if ((s[i] & 0xC0) != 0x80) return 0;
        v = (v << 6) | (s[i] & 0x3F);
    }
    if ((k == 3 && v < 0x800) || (k == 4 && (v < 0x10000 || v > 0x10FFFF)) || (v >= 0xD800 && v <= 0xDFFF))
        return 0;
    *cp = v;
    return k;
}

/* Maps a vocabulary string to its raw bytes (into out, capacity >= n): the ByteLevel inverse when every
 * character is in the map, else the string itself. Returns the length. */
static size_t bytelevel_unmap(const char *s, size_t n, char *out) {
    size_t i = 0, o = 0;
    while (i < n) {
        uint32_t cp;
        size_t k = utf8_next((const unsigned char *)s + i, n - i, &cp);
        if (k == 0 || cp >= 324 || cp_to_byte_table[cp] < 0) {
            memcpy(out, s, n);
            return n;
        }
        out[o++] = (char)cp_to_byte_table[cp];
        i += k;
    }
    return o;
}

/* ---- arena and ids ---- */
static int arena_add(tokenizer *t, const char *s, size_t n, uint32_t *off, mr_err *e) {
    if (t->arena_n + n + 1 > t->arena_cap) {
        size_t cap = t->arena_cap ? t->arena_cap : 1 << 20;
        while (t->arena_n + n + 1 > cap) cap *= 2;
        char *p = mem_realloc(t->arena, cap);
        if (!p) return err_set(e, MR_ENOMEM, "%s: out of memory for the vocabulary", t->name);
        t->arena = p;
        t->arena_cap = cap;
    }
    if (t->arena_n + n >= UINT32_MAX) return err_set(e, MR_ERANGE, "%s: vocabulary over 4 GB", t->name);
    memcpy(t->arena + t->arena_n, s, n);
    t->arena[t->arena_n + n] = '\0';
    *off = (uint32_t)t->arena_n;
    t->arena_n += n + 1;
    return 0;
}

static int ensure_ids(tokenizer *t, int32_t id, mr_err *e) {
    if (id < t->n_ids) return 0;
    int32_t n = t->n_ids ? t->n_ids : 1024;
    while (n <= id) n = n > INT32_MAX / 2 ? INT32_MAX : n * 2;
    uint32_t *off = mem_realloc(t->off, (size_t)n * sizeof *off);
    if (off) t->off = off;
    uint32_t *len = off ? mem_realloc(t->len, (size_t)n * sizeof *len) : NULL;
    if (len) t->len = len;
    unsigned char *sp = len ? mem_realloc(t->special, (size_t)n) : NULL;
    if (!sp) return err_set(e, MR_ENOMEM, "%s: out of memory for %d ids", t->name, (int)n);
    t->special = sp;
    for (int32_t i = t->n_ids; i < n; i++) {
        t->len[i] = UINT32_MAX;
        t->special[i] = 0;
    }
    t->n_ids = n;
    return 0;
}

/* ---- JSON helpers ---- */
static const char *jtype(const cJSON *j) {
    if (!j) return "nothing";
    if (cJSON_IsString(j)) return "a string";
    if (cJSON_IsNumber(j)) return "a number";
    if (cJSON_IsBool(j)) return "a boolean";
    if (cJSON_IsNull(j)) return "null";
    if (cJSON_IsArray(j)) return "an array";
    if (cJSON_IsObject(j)) return "an object";
    return "an invalid value";
}

/* A short rendering of a JSON value for messages: 17, "abc", an array, ... */
static void jshow(const cJSON *j, char *buf, size_t cap) {
    if (cJSON_IsNumber(j)) snprintf(buf, cap, "%.17g", j->valuedouble);
    else if (cJSON_IsString(j)) snprintf(buf, cap, "\"%.60s\"", j->valuestring);
    else if (cJSON_IsBool(j)) snprintf(buf, cap, "%s", cJSON_IsTrue(j) ? "true" : "false");
    else snprintf(buf, cap, "%s", jtype(j));
}

static int bad(const tokenizer *t, mr_err *e, const char *path, const char *expected, const cJSON *got) {
    char g[96];
    jshow(got, g, sizeof g);
    return err_set(e, MR_EFORMAT, "%s: %s: expected %s, got %s", t->name, path, expected, g);
}

/* optional bool member: absent or null -> dflt */
static int jbool(const tokenizer *t, const cJSON *o, const char *key, const char *path, int dflt, int *out,
                 mr_err *e) {
    const cJSON *j = cJSON_GetObjectItemCaseSensitive(o, key);
    if (!j || cJSON_IsNull(j)) {
        *out = dflt;
        return 0;
    }
    if (!cJSON_IsBool(j)) {
        char p[256];
        snprintf(p, sizeof p, "%s.%s", path, key);
        return bad(t, e, p, "true or false", j);
    }
    *out = cJSON_IsTrue(j);
    return 0;
}

static int jstring(const tokenizer *t, const cJSON *o, const char *key, const char *path, const char **out,
                   mr_err *e) {
    const cJSON *j = cJSON_GetObjectItemCaseSensitive(o, key);
    if (!cJSON_IsString(j)) {
        char p[256];
        snprintf(p, sizeof p, "%s.%s", path, key);
        return bad(t, e, p, "a string", j);
    }
    *out = j->valuestring;
    return 0;
}

static int jid(const tokenizer *t, const cJSON *j, const char *path, int32_t *out, mr_err *e) {
    *out = -1;
    if (!cJSON_IsNumber(j) || j->valuedouble < 0 || j->valuedouble > 16777216.0 ||
        j->valuedouble != (double)(int32_t)j->valuedouble)
        return bad(t, e, path, "a token id (an integer in 0..16777216)", j);
    *out = (int32_t)j->valuedouble;
    return 0;
}

/* ---- model ---- */
static int load_vocab(tokenizer *t, const cJSON *vocab, mr_err *e) {
    if (!cJSON_IsObject(vocab)) return bad(t, e, "model.vocab", "an object of token -> id", vocab);
    size_t cnt = (size_t)cJSON_GetArraySize(vocab);
    t->vocab.cap = 16;
    while (t->vocab.cap < cnt * 2) t->vocab.cap *= 2;
    t->vocab.slot = mem_alloc(t->vocab.cap * sizeof *t->vocab.slot);
    if (!t->vocab.slot) return err_set(e, MR_ENOMEM, "%s: out of memory for the vocabulary", t->name);
    memset(t->vocab.slot, 0xff, t->vocab.cap * sizeof *t->vocab.slot);
    char *tmp = NULL;
    size_t tmp_cap = 0;
    int rc = 0;
    const cJSON *it;
    cJSON_ArrayForEach(it, vocab) {
        char path[512];
        snprintf(path, sizeof path, "model.vocab[\"%.200s\"]", it->string);
        int32_t id = -1;
        if ((rc = jid(t, it, path, &id, e))) break;
        if ((rc = ensure_ids(t, id, e))) break;
        if (t->len[id] != UINT32_MAX) {
            rc = err_set(e, MR_EFORMAT, "%s: %s: id %d is already used by another token", t->name, path, (int)id);
            break;
        }
        size_t n = strlen(it->string);
        if (n + 1 > tmp_cap) {
            char *p = mem_realloc(tmp, n + 64);
            if (!p) {
                rc = err_set(e, MR_ENOMEM, "%s: out of memory", t->name);
                break;
            }
            tmp = p;
            tmp_cap = n + 64;
        }
        size_t m = t->byte_level ? bytelevel_unmap(it->string, n, tmp) : (memcpy(tmp, it->string, n), n);
        if ((rc = arena_add(t, tmp, m, &t->off[id], e))) break;
        t->len[id] = (uint32_t)m;
        if ((rc = tok_strmap_put(t, &t->vocab, id, e))) break;
    }
    mem_free(tmp);
    if (rc) return rc;
    for (int b = 0; b < 256; b++) {
        char c = (char)b, hex[8];
        t->byte_id[b] = tok_strmap_get(t, &t->vocab, &c, 1);
        snprintf(hex, sizeof hex, "<0x%02X>", b);
        t->fallback_id[b] = tok_strmap_get(t, &t->vocab, hex, 6);
    }
    return 0;
}

/* The raw bytes of one merge side as written in the file. */
static int merge_side(tokenizer *t, const char *s, size_t n, const char *path, int32_t *id, char *tmp, mr_err *e) {
    size_t m = t->byte_level ? bytelevel_unmap(s, n, tmp) : (memcpy(tmp, s, n), n);
    *id = tok_strmap_get(t, &t->vocab, tmp, m);
    if (*id < 0) return err_set(e, MR_EFORMAT, "%s: %s: token \"%.*s\" is not in model.vocab", t->name, path,
                                (int)(n > 80 ? 80 : n), s);
    return 0;
}

static int load_merges(tokenizer *t, const cJSON *merges, mr_err *e) {
    if (!merges || cJSON_IsNull(merges)) return 0;
    if (!cJSON_IsArray(merges)) return bad(t, e, "model.merges", "an array", merges);
    size_t cnt = (size_t)cJSON_GetArraySize(merges);
    t->merge_cap = 16;
    while (t->merge_cap < cnt * 2) t->merge_cap *= 2;
    t->merges = mem_calloc(t->merge_cap, sizeof *t->merges);
    if (!t->merges) return err_set(e, MR_ENOMEM, "%s: out of memory for %zu merges", t->name, cnt);
    char *tmp = NULL, *cat = NULL;
    size_t cap = 0;
    int rc = 0;
    int32_t rank = 0;
    const cJSON *it;
    cJSON_ArrayForEach(it, merges) {
        char path[64];
        snprintf(path, sizeof path, "model.merges[%d]", (int)rank);
        const char *a = NULL, *b = NULL;
        size_t na = 0, nb = 0;
        if (cJSON_IsString(it)) {
            const char *sp = strchr(it->valuestring, ' ');
            /* "a b": split at the first space; a merge side never holds a raw space in a byte-level file */
            if (sp && sp != it->valuestring && sp[1]) {
                a = it->valuestring;
                na = (size_t)(sp - a);
                b = sp + 1;
                nb = strlen(b);
            }
        } else if (cJSON_IsArray(it) && cJSON_GetArraySize(it) == 2 && cJSON_IsString(cJSON_GetArrayItem(it, 0)) &&
                   cJSON_IsString(cJSON_GetArrayItem(it, 1))) {
            a = cJSON_GetArrayItem(it, 0)->valuestring;
            b = cJSON_GetArrayItem(it, 1)->valuestring;
            na = strlen(a);
            nb = strlen(b);
        }
        if (!a || !na || !nb) {
            rc = bad(t, e, path, "\"a b\" or [a, b]", it);
            break;
        }
        if (na + nb + 1 > cap) {
            cap = na + nb + 64;
            char *p1 = mem_realloc(tmp, cap), *p2 = p1 ? mem_realloc(cat, cap) : NULL;
            if (p1) tmp = p1;
            if (p2) cat = p2;
            if (!p1 || !p2) {
                rc = err_set(e, MR_ENOMEM, "%s: out of memory", t->name);
                break;
            }
        }
        int32_t l, r, id;
        if ((rc = merge_side(t, a, na, path, &l, tmp, e))) break;
        size_t ml = t->len[l];
        memcpy(cat, t->arena + t->off[l], ml);
        if ((rc = merge_side(t, b, nb, path, &r, tmp, e))) break;
        memcpy(cat + ml, t->arena + t->off[r], t->len[r]);
        id = tok_strmap_get(t, &t->vocab, cat, ml + t->len[r]);
        if (id < 0) {
            rc = err_set(e, MR_EFORMAT, "%s: %s: the merged token \"%.*s%.*s\" is not in model.vocab", t->name, path,
                         (int)(na > 60 ? 60 : na), a, (int)(nb > 60 ? 60 : nb), b);
            break;
        }
        if (!tok_merge_get(t, l, r) && (rc = tok_merge_add(t, l, r, rank, id, e))) break;
        rank++;
    }
    mem_free(tmp);
    mem_free(cat);
    return rc;
}

static int load_model(tokenizer *t, const cJSON *model, mr_err *e) {
    if (!cJSON_IsObject(model)) return bad(t, e, "model", "an object", model);
    const cJSON *type = cJSON_GetObjectItemCaseSensitive(model, "type");
    if (type && !(cJSON_IsString(type) && !strcmp(type->valuestring, "BPE")))
        return bad(t, e, "model.type", "\"BPE\" (the only model supported)", type);
    static const char *unsupported[] = {"continuing_subword_prefix", "end_of_word_suffix"};
    for (size_t i = 0; i < 2; i++) {
        const cJSON *j = cJSON_GetObjectItemCaseSensitive(model, unsupported[i]);
        if (j && !cJSON_IsNull(j) && !(cJSON_IsString(j) && !j->valuestring[0])) {
            char p[96];
            snprintf(p, sizeof p, "model.%s", unsupported[i]);
            return bad(t, e, p, "null (not supported)", j);
        }
    }
    const cJSON *drop = cJSON_GetObjectItemCaseSensitive(model, "dropout");
    if (drop && !cJSON_IsNull(drop) && !(cJSON_IsNumber(drop) && drop->valuedouble == 0.0))
        return bad(t, e, "model.dropout", "null (BPE dropout is for training only)", drop);
    int rc;
    if ((rc = jbool(t, model, "byte_fallback", "model", 0, &t->byte_fallback, e))) return rc;
    if ((rc = jbool(t, model, "ignore_merges", "model", 0, &t->ignore_merges, e))) return rc;
    if ((rc = load_vocab(t, cJSON_GetObjectItemCaseSensitive(model, "vocab"), e))) return rc;
    if ((rc = load_merges(t, cJSON_GetObjectItemCaseSensitive(model, "merges"), e))) return rc;
    const cJSON *unk = cJSON_GetObjectItemCaseSensitive(model, "unk_token");
    t->unk_id = -1;
    if (unk && !cJSON_IsNull(unk)) {
        if (!cJSON_IsString(unk)) return bad(t, e, "model.unk_token", "a string or null", unk);
        t->unk_id = tok_strmap_get(t, &t->vocab, unk->valuestring, strlen(unk->valuestring));
        if (t->unk_id < 0)
            return err_set(e, MR_EFORMAT, "%s: model.unk_token: \"%.80s\" is not in model.vocab", t->name,
                           unk->valuestring);
    }
    return 0;
}

/* ---- pre-tokenizer ---- */
static const char GPT2_RE[] =
    "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+";

static int add_stage(tokenizer *t, tok_stage *st, mr_err *e) {
    tok_stage *p = mem_realloc(t->stages, (t->n_stages + 1) * sizeof *p);
    if (!p) {
        if (st->re) pcre2_code_free(st->re);
        return err_set(e, MR_ENOMEM, "%s: out of memory", t->name);
    }
    t->stages = p;
    t->stages[t->n_stages++] = *st;
    return 0;
}

static int compile_at(tokenizer *t, const char *pat, size_t n, int literal, const char *path, pcre2_code **re,
                      int *jit, mr_err *e) {
    char why[256];
    if (tok_regex_compile(pat, n, literal, re, jit, why, sizeof why))
        return err_set(e, MR_EFORMAT, "%s: %s: cannot compile the regex: %s", t->name, path, why);
    return 0;
}

/* pattern: {"Regex": "..."} or {"String": "..."} */
static int load_pattern(tokenizer *t, const cJSON *pat, const char *path, pcre2_code **re, int *jit, mr_err *e) {
    char p[256];
    snprintf(p, sizeof p, "%s.pattern", path);
    const cJSON *rx = cJSON_GetObjectItemCaseSensitive(pat, "Regex");
    const cJSON *st = cJSON_GetObjectItemCaseSensitive(pat, "String");
    if (cJSON_IsObject(pat) && cJSON_IsString(rx)) {
        snprintf(p, sizeof p, "%s.pattern.Regex", path);
        return compile_at(t, rx->valuestring, strlen(rx->valuestring), 0, p, re, jit, e);
    }
    if (cJSON_IsObject(pat) && cJSON_IsString(st) && st->valuestring[0])
        return compile_at(t, st->valuestring, strlen(st->valuestring), 1, p, re, jit, e);
    return bad(t, e, p, "{\"Regex\": \"...\"} or {\"String\": \"...\"}", pat);
}

static int load_pretok(tokenizer *t, const cJSON *j, const char *path, mr_err *e) {
    if (!cJSON_IsObject(j)) return bad(t, e, path, "an object", j);
    const char *type;
    int rc;
    if ((rc = jstring(t, j, "type", path, &type, e))) return rc;
    tok_stage st = {0};
    if (!strcmp(type, "Sequence")) {
        const cJSON *list = cJSON_GetObjectItemCaseSensitive(j, "pretokenizers");
        char p[256];
        snprintf(p, sizeof p, "%s.pretokenizers", path);
        if (!cJSON_IsArray(list)) return bad(t, e, p, "an array", list);
        int i = 0;
        const cJSON *it;
        cJSON_ArrayForEach(it, list) {
            char q[256];
            snprintf(q, sizeof q, "%s.pretokenizers[%d]", path, i++);
            if ((rc = load_pretok(t, it, q, e))) return rc;
        }
        return 0;
    }
    if (!strcmp(type, "Split")) {
        st.kind = STAGE_SPLIT;
        const char *beh;
        if ((rc = jstring(t, j, "behavior", path, &beh, e))) return rc;
        static const char *names[] = {"Removed", "Isolated", "MergedWithPrevious", "MergedWithNext", "Contiguous"};
        int k = -1;
        for (int i = 0; i < 5; i++)
            if (!strcmp(beh, names[i])) k = i;
        if (k < 0) {
            char p[256];
            snprintf(p, sizeof p, "%s.behavior", path);
            return bad(t, e, p, "Removed, Isolated, MergedWithPrevious, MergedWithNext or Contiguous",
                       cJSON_GetObjectItemCaseSensitive(j, "behavior"));
        }
        st.behavior = (tok_behavior)k;
        if ((rc = jbool(t, j, "invert", path, 0, &st.invert, e))) return rc;
        if ((rc = load_pattern(t, cJSON_GetObjectItemCaseSensitive(j, "pattern"), path, &st.re, &st.jit, e)))
            return rc;
        return add_stage(t, &st, e);
    }
    if (!strcmp(type, "ByteLevel")) {
        st.kind = STAGE_BYTELEVEL;
        int use_regex, trim;
        if ((rc = jbool(t, j, "add_prefix_space", path, 1, &st.add_prefix_space, e))) return rc;
        if ((rc = jbool(t, j, "use_regex", path, 1, &use_regex, e))) return rc;
        if ((rc = jbool(t, j, "trim_offsets", path, 1, &trim, e))) return rc; /* offsets only: no effect on ids */
        st.behavior = SPLIT_ISOLATED;
        if (use_regex && (rc = compile_at(t, GPT2_RE, sizeof GPT2_RE - 1, 0, path, &st.re, &st.jit, e))) return rc;
        t->byte_level = 1;
        return add_stage(t, &st, e);
    }
    if (!strcmp(type, "Digits")) {
        st.kind = STAGE_DIGITS;
        int individual;
        if ((rc = jbool(t, j, "individual_digits", path, 0, &individual, e))) return rc;
        st.behavior = individual ? SPLIT_ISOLATED : SPLIT_CONTIGUOUS;
        if ((rc = compile_at(t, "\\p{N}", 5, 0, path, &st.re, &st.jit, e))) return rc;
        return add_stage(t, &st, e);
    }
    if (!strcmp(type, "WhitespaceSplit")) {
        st.kind = STAGE_SPLIT;
        st.behavior = SPLIT_REMOVED;
        if ((rc = compile_at(t, "\\s+", 3, 0, path, &st.re, &st.jit, e))) return rc;
        return add_stage(t, &st, e);
    }
    char p[256];
    snprintf(p, sizeof p, "%s.type", path);
    return bad(t, e, p, "Sequence, Split, ByteLevel, Digits or WhitespaceSplit",
               cJSON_GetObjectItemCaseSensitive(j, "type"));
}

/* ---- normalizer ---- */
static int add_norm(tokenizer *t, tok_norm *n, mr_err *e) {
    tok_norm *p = mem_realloc(t->norms, (t->n_norms + 1) * sizeof *p);
    if (!p) {
        if (n->re) pcre2_code_free(n->re);
        mem_free(n->a);
        mem_free(n->b);
        return err_set(e, MR_ENOMEM, "%s: out of memory", t->name);
    }
    t->norms = p;
    t->norms[t->n_norms++] = *n;
    return 0;
}

static int load_norm(tokenizer *t, const cJSON *j, const char *path, mr_err *e) {
    if (!j || cJSON_IsNull(j)) return 0;
    if (!cJSON_IsObject(j)) return bad(t, e, path, "an object or null", j);
    const char *type;
    int rc;
    if ((rc = jstring(t, j, "type", path, &type, e))) return rc;
    tok_norm n = {0};
    if (!strcmp(type, "Sequence")) {
        const cJSON *list = cJSON_GetObjectItemCaseSensitive(j, "normalizers");
        char p[256];
        snprintf(p, sizeof p, "%s.normalizers", path);
        if (!cJSON_IsArray(list)) return bad(t, e, p, "an array", list);
        int i = 0;
        const cJSON *it;
        cJSON_ArrayForEach(it, list) {
            char q[256];
            snprintf(q, sizeof q, "%s.normalizers[%d]", path, i++);
            if ((rc = load_norm(t, it, q, e))) return rc;
        }
        return 0;
    }
    if (!strcmp(type, "Prepend")) {
        const char *s;
        if ((rc = jstring(t, j, "prepend", path, &s, e))) return rc;
        n.kind = NORM_PREPEND;
        n.a = mem_strdup(s);
        n.alen = strlen(s);
        if (!n.a) return err_set(e, MR_ENOMEM, "%s: out of memory", t->name);
        return add_norm(t, &n, e);
    }
    if (!strcmp(type, "Replace")) {
        const char *s;
        if ((rc = jstring(t, j, "content", path, &s, e))) return rc;
        n.kind = NORM_REPLACE;
        const cJSON *pat = cJSON_GetObjectItemCaseSensitive(j, "pattern");
        const cJSON *str = cJSON_GetObjectItemCaseSensitive(pat, "String");
        if (cJSON_IsString(str) && str->valuestring[0]) {
            n.a = mem_strdup(str->valuestring);
            n.alen = strlen(str->valuestring);
        } else if ((rc = load_pattern(t, pat, path, &n.re, &n.jit, e))) {
            return rc;
        }
        n.b = mem_strdup(s);
        n.blen = strlen(s);
        if (!n.b || (!n.re && !n.a)) {
            if (n.re) pcre2_code_free(n.re);
            mem_free(n.a);
            mem_free(n.b);
            return err_set(e, MR_ENOMEM, "%s: out of memory", t->name);
        }
        return add_norm(t, &n, e);
    }
    char p[256];
    snprintf(p, sizeof p, "%s.type", path);
    return err_set(e, MR_EFORMAT,
                   "%s: %s: normalizer \"%.60s\" is not supported (supported: Sequence, Prepend, Replace; Unicode "
                   "normalization forms such as NFC are not implemented)",
                   t->name, p, type);
}

/* ---- added tokens ---- */
static int cmp_added(const void *pa, const void *pb) {
    const tok_added *a = pa, *b = pb;
    unsigned ca = (unsigned char)a->text[0], cb = (unsigned char)b->text[0];
    if (ca != cb) return ca < cb ? -1 : 1;
    if (a->len != b->len) return a->len > b->len ? -1 : 1;
    return memcmp(a->text, b->text, a->len);
}

static int load_added(tokenizer *t, const cJSON *list, mr_err *e) {
    if (!list || cJSON_IsNull(list)) return 0;
    if (!cJSON_IsArray(list)) return bad(t, e, "added_tokens", "an array", list);
    size_t cnt = (size_t)cJSON_GetArraySize(list);
    t->added = mem_calloc(cnt ? cnt : 1, sizeof *t->added);
    if (!t->added) return err_set(e, MR_ENOMEM, "%s: out of memory", t->name);
    int i = 0, rc;
    const cJSON *it;
    cJSON_ArrayForEach(it, list) {
        char path[64];
        snprintf(path, sizeof path, "added_tokens[%d]", i++);
        if (!cJSON_IsObject(it)) return bad(t, e, path, "an object", it);
        tok_added a = {0};
        char p[96];
        snprintf(p, sizeof p, "%s.id", path);
        if ((rc = jid(t, cJSON_GetObjectItemCaseSensitive(it, "id"), p, &a.id, e))) return rc;
        const char *content;
        if ((rc = jstring(t, it, "content", path, &content, e))) return rc;
        if (!content[0]) {
            snprintf(p, sizeof p, "%s.content", path);
            return bad(t, e, p, "a non-empty string", cJSON_GetObjectItemCaseSensitive(it, "content"));
        }
        int v[5];
        static const char *keys[] = {"lstrip", "rstrip", "single_word", "normalized", "special"};
        for (int k = 0; k < 5; k++)
            if ((rc = jbool(t, it, keys[k], path, k == 3, &v[k], e))) return rc;
        a.lstrip = (unsigned char)v[0];
        a.rstrip = (unsigned char)v[1];
        a.single_word = (unsigned char)v[2];
        a.normalized = (unsigned char)v[3];
        a.special = (unsigned char)v[4];
        if ((rc = ensure_ids(t, a.id, e))) return rc;
        a.len = strlen(content);
        if (t->len[a.id] == UINT32_MAX) {
            /* not in the model vocabulary: the id's bytes are the content */
            if ((rc = arena_add(t, content, a.len, &t->off[a.id], e))) return rc;
            t->len[a.id] = (uint32_t)a.len;
        }
        t->special[a.id] = a.special;
        a.text = mem_strdup(content);
        if (!a.text) return err_set(e, MR_ENOMEM, "%s: out of memory", t->name);
        t->added[t->n_added++] = a;
    }
    qsort(t->added, t->n_added, sizeof *t->added, cmp_added);
    size_t k = 0;
    for (int b = 0; b <= 256; b++) {
        while (k < t->n_added && (unsigned char)t->added[k].text[0] < b) k++;
        t->added_start[b] = k;
    }
    return 0;
}

/* ---- decoder ---- */
static int load_decoder(tokenizer *t, const cJSON *j, const char *path, mr_err *e) {
    if (!j || cJSON_IsNull(j)) return 0;
    if (!cJSON_IsObject(j)) return bad(t, e, path, "an object or null", j);
    const char *type;
    int rc;
    if ((rc = jstring(t, j, "type", path, &type, e))) return rc;
    if (!strcmp(type, "Sequence")) {
        const cJSON *list = cJSON_GetObjectItemCaseSensitive(j, "decoders");
        char p[256];
        snprintf(p, sizeof p, "%s.decoders", path);
        if (!cJSON_IsArray(list)) return bad(t, e, p, "an array", list);
        int i = 0;
        const cJSON *it;
        cJSON_ArrayForEach(it, list) {
            char q[256];
            snprintf(q, sizeof q, "%s.decoders[%d]", path, i++);
            if ((rc = load_decoder(t, it, q, e))) return rc;
        }
        return 0;
    }
    if (!strcmp(type, "ByteLevel")) {
        if (!t->byte_level)
            return err_set(e, MR_EFORMAT, "%s: %s: a ByteLevel decoder needs a ByteLevel pre_tokenizer", t->name,
                           path);
        return 0;
    }
    if (!strcmp(type, "ByteFallback")) {
        t->dec_byte_fallback = 1;
        return 0;
    }
    if (!strcmp(type, "Fuse")) return 0;
    if (!strcmp(type, "Replace")) {
        const cJSON *pat = cJSON_GetObjectItemCaseSensitive(j, "pattern");
        const cJSON *str = cJSON_GetObjectItemCaseSensitive(pat, "String");
        const char *content;
        char p[256];
        snprintf(p, sizeof p, "%s.pattern", path);
        if (!cJSON_IsString(str) || !str->valuestring[0]) return bad(t, e, p, "{\"String\": \"...\"}", pat);
        if ((rc = jstring(t, j, "content", path, &content, e))) return rc;
        mem_free(t->dec_from);
        mem_free(t->dec_to);
        t->dec_from = mem_strdup(str->valuestring);
        t->dec_to = mem_strdup(content);
        if (!t->dec_from || !t->dec_to) return err_set(e, MR_ENOMEM, "%s: out of memory", t->name);
        t->dec_replace = 1;
        return 0;
    }
    char p[256];
    snprintf(p, sizeof p, "%s.type", path);
    return bad(t, e, p, "ByteLevel, Sequence, Replace, ByteFallback or Fuse",
               cJSON_GetObjectItemCaseSensitive(j, "type"));
}

/* ---- tokenizer_config.json ---- */
static int config_token(tokenizer *t, const cJSON *cfg, const char *key, const char *cname, int32_t *id,
                        mr_err *e) {
    const cJSON *j = cJSON_GetObjectItemCaseSensitive(cfg, key);
    if (!j || cJSON_IsNull(j)) return 0;
    const cJSON *c = cJSON_IsObject(j) ? cJSON_GetObjectItemCaseSensitive(j, "content") : j;
    if (!cJSON_IsString(c)) {
        char p[96];
        snprintf(p, sizeof p, "%s%s", key, cJSON_IsObject(j) ? ".content" : "");
        char g[96];
        jshow(c, g, sizeof g);
        return err_set(e, MR_EFORMAT, "%s: %s: expected a token string, got %s", cname, p, g);
    }
    *id = tok_token_id(t, c->valuestring);
    if (*id < 0)
        return err_set(e, MR_EFORMAT, "%s: %s: \"%.80s\" is not a token of %s", cname, key, c->valuestring,
                       t->name);
    return 0;
}

static int load_config(tokenizer *t, const char *text, const char *cname, mr_err *e) {
    cJSON *cfg = cJSON_Parse(text);
    if (!cfg) return err_set(e, MR_EFORMAT, "%s: not valid JSON (near byte %ld)", cname,
                             (long)(cJSON_GetErrorPtr() ? cJSON_GetErrorPtr() - text : 0));
    int rc = 0;
    if (!cJSON_IsObject(cfg)) {
        rc = err_set(e, MR_EFORMAT, "%s: expected a JSON object at the top level", cname);
        goto done;
    }
    if ((rc = config_token(t, cfg, "bos_token", cname, &t->bos, e))) goto done;
    if ((rc = config_token(t, cfg, "eos_token", cname, &t->eos, e))) goto done;
    if ((rc = config_token(t, cfg, "pad_token", cname, &t->pad, e))) goto done;
    static const char *keys[] = {"add_bos_token", "add_eos_token"};
    for (int k = 0; k < 2; k++) {
        const cJSON *j = cJSON_GetObjectItemCaseSensitive(cfg, keys[k]);
        if (!j || cJSON_IsNull(j)) continue;
        if (!cJSON_IsBool(j)) {
            char g[96];
            jshow(j, g, sizeof g);
            rc = err_set(e, MR_EFORMAT, "%s: %s: expected true or false, got %s", cname, keys[k], g);
            goto done;
        }
        *(k ? &t->add_eos : &t->add_bos) = cJSON_IsTrue(j);
    }
done:
    cJSON_Delete(cfg);
    return rc;
}

/* ---- entry points ---- */
int tok_load_mem(tokenizer **out, const char *json, size_t len, const char *name, const char *config_json,
                 mr_err *e) {
    *out = NULL;
    static pthread_once_t table_once = PTHREAD_ONCE_INIT;
    pthread_once(&table_once, init_cp_table);
    tokenizer *t = mem_calloc(1, sizeof *t);
    if (!t) return err_set(e, MR_ENOMEM, "%s: out of memory", name);
    t->bos = t->eos = t->pad = t->unk_id = -1;
    t->add_bos = -1;
    t->name = mem_strdup(name);
    cJSON *root = cJSON_ParseWithLength(json, len);
    int rc;
    if (!t->name) {
        rc = err_set(e, MR_ENOMEM, "%s: out of memory", name);
        goto fail;
    }
    if (!root) {
        const char *at = cJSON_GetErrorPtr();
        long line = 1;
        for (const char *p = json; at && p < at && p < json + len; p++) line += *p == '\n';
        rc = err_set(e, MR_EFORMAT, "%s: not valid JSON (line %ld)", name, line);
        goto fail;
    }
    if (!cJSON_IsObject(root)) {
        rc = bad(t, e, "(top level)", "an object", root);
        goto fail;
    }
    /* the pre-tokenizer first: it decides whether the vocabulary is byte-level */
    const cJSON *pt = cJSON_GetObjectItemCaseSensitive(root, "pre_tokenizer");
    if (pt && !cJSON_IsNull(pt) && (rc = load_pretok(t, pt, "pre_tokenizer", e))) goto fail;
    if (!t->byte_level) { /* a ByteLevel decoder alone also means a byte-level vocabulary */
        const cJSON *d = cJSON_GetObjectItemCaseSensitive(root, "decoder");
        const cJSON *dt = cJSON_GetObjectItemCaseSensitive(d, "type");
        if (cJSON_IsString(dt) && !strcmp(dt->valuestring, "ByteLevel")) t->byte_level = 1;
    }
    if ((rc = load_norm(t, cJSON_GetObjectItemCaseSensitive(root, "normalizer"), "normalizer", e))) goto fail;
    if ((rc = load_model(t, cJSON_GetObjectItemCaseSensitive(root, "model"), e))) goto fail;
    if ((rc = load_added(t, cJSON_GetObjectItemCaseSensitive(root, "added_tokens"), e))) goto fail;
    if ((rc = load_decoder(t, cJSON_GetObjectItemCaseSensitive(root, "decoder"), "decoder", e))) goto fail;
    if (t->byte_level)
        for (int b = 0; b < 256; b++)
            if (t->byte_id[b] < 0) {
                rc = err_set(e, MR_EFORMAT, "%s: model.vocab: a byte-level vocabulary lacks the token of byte 0x%02X",
                             name, b);
                goto fail;
            }
    /* find the n_ids actually used */
    int32_t hi = -1;
    for (int32_t i = 0; i < t->n_ids; i++)
        if (t->len[i] != UINT32_MAX) hi = i;
    t->n_ids = hi + 1;
    if (t->n_ids == 0) {
        rc = err_set(e, MR_EFORMAT, "%s: model.vocab: the vocabulary is empty", name);
        goto fail;
    }
    if (config_json) {
        char cname[1024];
        snprintf(cname, sizeof cname, "%s", name);
        char *slash = strrchr(cname, '/');
        snprintf(slash ? slash + 1 : cname, sizeof cname - (size_t)(slash ? slash + 1 - cname : 0),
                 "tokenizer_config.json");
        if ((rc = load_config(t, config_json, cname, e))) goto fail;
    }
    if (t->bos < 0) t->bos = tok_token_id(t, "<｜begin▁of▁sentence｜>");
    if (t->eos < 0) t->eos = tok_token_id(t, "<｜end▁of▁sentence｜>");
    if (t->add_bos < 0) t->add_bos = t->bos >= 0 && config_json != NULL;
    if (t->bos < 0) t->add_bos = 0;
    if (t->eos < 0) t->add_eos = 0;
    if (t->pad < 0) t->pad = t->eos;
    if ((rc = tok_worker_new(t, &t->own, e))) goto fail;
    cJSON_Delete(root);
    *out = t;
    return 0;
fail:
    cJSON_Delete(root);
    tok_free(t);
    return rc;
}

static char *slurp(const char *path, size_t *n, mr_err *e) {
    FILE *f = fopen(path, "rb");
    if (!f) {
        err_set(e, MR_EIO, "%s: cannot open", path);
        return NULL;
    }
    size_t cap = 1 << 16, len = 0;
    char *buf = mem_alloc(cap);
    while (buf) {
        size_t r = fread(buf + len, 1, cap - len - 1, f);
        len += r;
        if (r == 0) break;
        if (cap - len - 1 == 0) {
            char *p = mem_realloc(buf, cap * 2);
            if (!p) {
                mem_free(buf);
                buf = NULL;
                break;
            }
            buf = p;
            cap *= 2;
        }
    }
    int ioerr = ferror(f);
    fclose(f);
    if (!buf) {
        err_set(e, MR_ENOMEM, "%s: out of memory reading the file", path);
        return NULL;
    }
    if (ioerr) {
        mem_free(buf);
        err_set(e, MR_EIO, "%s: read error", path);
        return NULL;
    }
    buf[len] = '\0';
    *n = len;
    return buf;
}

int tok_load_files(tokenizer **out, const char *json_path, const char *config_path, mr_err *e) {
    *out = NULL;
    size_t n, m;
    char *json = slurp(json_path, &n, e);
    if (!json) return e ? e->code : MR_EIO;
    char *cfg = NULL;
    if (config_path && !(cfg = slurp(config_path, &m, e))) {
        mem_free(json);
        return e ? e->code : MR_EIO;
    }
    int rc = tok_load_mem(out, json, n, json_path, cfg, e);
    if (rc == 0 && cfg && e) err_clear(e);
    mem_free(json);
    mem_free(cfg);
    return rc;
}

int tok_load(tokenizer **out, const char *dir, mr_err *e) {
    size_t n = strlen(dir) + 32;
    char *jp = mem_alloc(n), *cp = mem_alloc(n);
    if (!jp || !cp) {
        mem_free(jp);
        mem_free(cp);
        return err_set(e, MR_ENOMEM, "%s: out of memory", dir);
    }
    snprintf(jp, n, "%s/tokenizer.json", dir);
    snprintf(cp, n, "%s/tokenizer_config.json", dir);
    FILE *f = fopen(cp, "rb");
    if (f) fclose(f);
    int rc = tok_load_files(out, jp, f ? cp : NULL, e);
    mem_free(jp);
    mem_free(cp);
    return rc;
}

void tok_free(tokenizer *t) {
    if (!t) return;
    tok_worker_free(t->own);
    mem_free(t->name);
    mem_free(t->off);
    mem_free(t->len);
    mem_free(t->arena);
    mem_free(t->special);
    tok_strmap_free(&t->vocab);
    mem_free(t->merges);
    for (size_t i = 0; i < t->n_added; i++) mem_free(t->added[i].text);
    mem_free(t->added);
    for (size_t i = 0; i < t->n_norms; i++) {
        if (t->norms[i].re) pcre2_code_free(t->norms[i].re);
        mem_free(t->norms[i].a);
        mem_free(t->norms[i].b);
    }
    mem_free(t->norms);
    for (size_t i = 0; i < t->n_stages; i++)
        if (t->stages[i].re) pcre2_code_free(t->stages[i].re);
    mem_free(t->stages);
    mem_free(t->dec_from);
    mem_free(t->dec_to);
    mem_free(t);
}
