/* bpe_train.c: the byte-level BPE trainer of bpe_train.h.
 *
 * Two phases, as HF tokenizers' BpeTrainer:
 *   1. Word counting. Each line is cut at the added tokens, then pre-tokenized by DeepSeek-V3's three Split
 *      (Isolated) regexes (MODEL-SPEC §11) through PCRE2, and every piece is counted in a hash map of unique
 *      words. Threads count disjoint runs of lines into their own maps, merged afterwards (exact sums, so the
 *      result does not depend on the thread count).
 *   2. Merging. Every unique word is a sequence of symbol ids (its bytes at first). Pair counts (sum of word
 *      frequencies) and, per pair, the list of words holding it are built once. A max-heap with lazy updates
 *      gives the next pair: a popped entry whose stored count is stale is pushed back with the current one.
 *      Applying a merge touches only the words on the pair's list: their old pairs are subtracted, the merge is
 *      applied, their new pairs added; pairs with the new symbol are pushed. Counts of old pairs only ever fall,
 *      so "stored >= current" holds for some entry of every live pair and the first fresh pop is the true max.
 * Symbols are byte strings; a merge that builds a string already in the vocabulary reuses its symbol (HF does the
 * same), so the pair map is keyed by symbol ids and the tie rule by bytes is a total order. */
#define PCRE2_CODE_UNIT_WIDTH 8
#include "tokenizer/bpe_train.h"

#include <cjson/cJSON.h>
#include <errno.h>
#include <omp.h>
#include <pcre2.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "core/mem.h"

const bpe_added bpe_default_added[] = {
    {"<\uff5cbegin\u2581of\u2581sentence\uff5c>", 1},
    {"<\uff5cend\u2581of\u2581sentence\uff5c>", 1},
    {"<\uff5cUser\uff5c>", 0},
    {"<\uff5cAssistant\uff5c>", 0},
    {"<think>", 0},
    {"</think>", 0},
};
const size_t bpe_n_default_added = sizeof bpe_default_added / sizeof bpe_default_added[0];

/* DeepSeek-V3's pre-tokenizer regexes, character for character as in its tokenizer.json (the CR and LF inside
 * the classes are the raw characters there too). */
static const char *const split_regex[3] = {
    "\\p{N}{1,3}",
    "[\u4e00-\u9fa5\u3040-\u309f\u30a0-\u30ff]+",
    "[!\"#$%&'()*+,\\-./:;<=>?@\\[\\\\\\]^_`{|}~][A-Za-z]+|[^\r\n\\p{L}\\p{P}\\p{S}]?[\\p{L}\\p{M}]+|"
    " ?[\\p{P}\\p{S}]+[\r\n]*|\\s*[\r\n]+|\\s+(?!\\S)|\\s+",
};

/* ---- hashing ---- */
static uint64_t hash_bytes(const char *s, size_t n) {
    uint64_t h = 0x9E3779B97F4A7C15ull ^ (n * 0xC2B2AE3D27D4EB4Full);
    while (n >= 8) {
        uint64_t v;
        memcpy(&v, s, 8);
        h = (h ^ v) * 0xFF51AFD7ED558CCDull;
        h ^= h >> 32;
        s += 8;
        n -= 8;
    }
    uint64_t v = 0;
    memcpy(&v, s, n);
    h = (h ^ v) * 0xC4CEB9FE1A85EC53ull;
    h ^= h >> 29;
    h *= 0x94D049BB133111EBull;
    return h ^ (h >> 32);
}

/* ---- word map: unique byte strings -> count ---- */
typedef struct wword {
    uint64_t hash;
    size_t off; /* into arena */
    uint32_t len;
    int64_t count;
} wword;

typedef struct wmap {
    uint32_t *slot; /* word index + 1; 0 = empty */
    size_t cap;     /* power of two */
    wword *w;
    size_t n, wcap;
    char *arena;
    size_t an, acap;
} wmap;

static void wmap_free(wmap *m) {
    mem_free(m->slot);
    mem_free(m->w);
    mem_free(m->arena);
    memset(m, 0, sizeof *m);
}

static int wmap_grow(wmap *m) {
    size_t cap = m->cap ? m->cap * 2 : 1024;
    uint32_t *slot = mem_calloc(cap, sizeof *slot);
    if (!slot) return -1;
    for (size_t i = 0; i < m->n; i++) {
        size_t j = m->w[i].hash & (cap - 1);
        while (slot[j]) j = (j + 1) & (cap - 1);
        slot[j] = (uint32_t)(i + 1);
    }
    mem_free(m->slot);
    m->slot = slot;
    m->cap = cap;
    return 0;
}

static wword *wmap_find(const wmap *m, const char *s, size_t n, uint64_t h) {
    if (!m->cap) return NULL;
    for (size_t j = h & (m->cap - 1); m->slot[j]; j = (j + 1) & (m->cap - 1)) {
        wword *w = &m->w[m->slot[j] - 1];
        if (w->hash == h && w->len == n && !memcmp(m->arena + w->off, s, n)) return w;
    }
    return NULL;
}

/* Adds count to the word s[0..n) (hash h); -1 when out of memory. */
static int wmap_add(wmap *m, const char *s, size_t n, uint64_t h, int64_t count) {
    wword *f = wmap_find(m, s, n, h);
    if (f) {
        f->count += count;
        return 0;
    }
    if (n > UINT32_MAX || m->n >= UINT32_MAX - 1) return -1;
    if ((m->n + 1) * 2 > m->cap && wmap_grow(m)) return -1;
    if (m->n == m->wcap) {
        size_t cap = m->wcap ? m->wcap * 2 : 1024;
        wword *w = mem_realloc(m->w, cap * sizeof *w);
        if (!w) return -1;
        m->w = w;
        m->wcap = cap;
    }
    if (m->an + n > m->acap) {
        size_t cap = m->acap ? m->acap : 1 << 14;
        while (cap < m->an + n) cap *= 2;
        char *a = mem_realloc(m->arena, cap);
        if (!a) return -1;
        m->arena = a;
        m->acap = cap;
    }
    memcpy(m->arena + m->an, s, n);
    m->w[m->n] = (wword){h, m->an, (uint32_t)n, count};
    m->an += n;
    size_t j = h & (m->cap - 1);
    while (m->slot[j]) j = (j + 1) & (m->cap - 1);
    m->slot[j] = (uint32_t)(m->n + 1);
    m->n++;
    return 0;
}

/* ---- symbols (byte strings) ---- */
typedef struct symtab {
    size_t *off;
    uint32_t *len;
    size_t n, cap;
    char *bytes;
    size_t bn, bcap;
    int32_t *slot; /* symbol id or -1 */
    size_t scap;
} symtab;

static void symtab_free(symtab *s) {
    mem_free(s->off);
    mem_free(s->len);
    mem_free(s->bytes);
    mem_free(s->slot);
    memset(s, 0, sizeof *s);
}

static int32_t symtab_get(const symtab *s, const char *b, size_t n) {
    if (!s->scap) return -1;
    for (size_t j = hash_bytes(b, n) & (s->scap - 1); s->slot[j] >= 0; j = (j + 1) & (s->scap - 1)) {
        int32_t id = s->slot[j];
        if (s->len[id] == n && !memcmp(s->bytes + s->off[id], b, n)) return id;
    }
    return -1;
}

static void symtab_place(symtab *s, int32_t id) {
    size_t j = hash_bytes(s->bytes + s->off[id], s->len[id]) & (s->scap - 1);
    while (s->slot[j] >= 0) j = (j + 1) & (s->scap - 1);
    s->slot[j] = id;
}

/* Appends the string a+b (two byte ranges that may point into s->bytes) as a new symbol; -1 when out of memory. */
static int32_t symtab_add2(symtab *s, const char *a, size_t an, const char *b, size_t bn) {
    size_t n = an + bn;
    if (s->n == s->cap) {
        size_t cap = s->cap ? s->cap * 2 : 1024;
        size_t *off = mem_realloc(s->off, cap * sizeof *off);
        if (!off) return -1;
        s->off = off;
        uint32_t *len = mem_realloc(s->len, cap * sizeof *len);
        if (!len) return -1;
        s->len = len;
        s->cap = cap;
    }
    if ((s->n + 1) * 2 > s->scap) {
        size_t scap = s->scap ? s->scap * 2 : 2048;
        int32_t *slot = mem_alloc(scap * sizeof *slot);
        if (!slot) return -1;
        memset(slot, 0xff, scap * sizeof *slot);
        mem_free(s->slot);
        s->slot = slot;
        s->scap = scap;
        for (size_t i = 0; i < s->n; i++) symtab_place(s, (int32_t)i);
    }
    if (s->bn + n > s->bcap) { /* a and b may point into s->bytes: keep them valid across the realloc */
        size_t cap = s->bcap ? s->bcap : 1 << 14;
        while (cap < s->bn + n) cap *= 2;
        uintptr_t lo = (uintptr_t)s->bytes, hi = lo + s->bn;
        int a_in = s->bytes && (uintptr_t)a >= lo && (uintptr_t)a < hi;
        int b_in = s->bytes && (uintptr_t)b >= lo && (uintptr_t)b < hi;
        size_t ao = a_in ? (size_t)((uintptr_t)a - lo) : 0, bo = b_in ? (size_t)((uintptr_t)b - lo) : 0;
        char *p = mem_realloc(s->bytes, cap);
        if (!p) return -1;
        s->bytes = p;
        s->bcap = cap;
        if (a_in) a = p + ao;
        if (b_in) b = p + bo;
    }
    memcpy(s->bytes + s->bn, a, an);
    memcpy(s->bytes + s->bn + an, b, bn);
    int32_t id = (int32_t)s->n;
    s->off[id] = s->bn;
    s->len[id] = (uint32_t)n;
    s->bn += n;
    s->n++;
    symtab_place(s, id);
    return id;
}

/* ---- the trainer ---- */
struct bpe_trainer {
    int32_t vocab_size, model_max_length;
    int64_t min_frequency;
    int threads;
    int split_digits;
    bpe_added *added; /* own copies of the texts */
    size_t *added_len;
    size_t n_added;
    pcre2_code *re[3];
    int jit[3];
    wmap words;
    uint64_t bytes, nwords;
    int fitted;
    symtab sym;
    int32_t (*merge)[2]; /* left, right symbol ids */
    size_t n_merges, merge_cap;
};

void bpe_train_free(bpe_trainer *t) {
    if (!t) return;
    for (size_t i = 0; i < t->n_added; i++) mem_free((char *)t->added[i].text);
    mem_free(t->added);
    mem_free(t->added_len);
    for (int k = 0; k < 3; k++) pcre2_code_free(t->re[k]);
    wmap_free(&t->words);
    symtab_free(&t->sym);
    mem_free(t->merge);
    mem_free(t);
}

/* Pre-tokenizer regex k of this trainer: DeepSeek-V3's, digits one by one with split_digits. */
static const char *regex_at(const bpe_trainer *t, int k) { return k == 0 && t->split_digits ? "\\p{N}" : split_regex[k]; }

int bpe_train_new(bpe_trainer **out, const bpe_train_opts *o, mr_err *e) {
    *out = NULL;
    const bpe_added *added = o->added ? o->added : bpe_default_added;
    size_t n_added = o->added ? o->n_added : bpe_n_default_added;
    if (n_added < 2)
        return err_set(e, MR_EINVAL, "need at least 2 added tokens (BOS and EOS), got %zu", n_added);
    for (size_t i = 0; i < n_added; i++) {
        if (!added[i].text || !added[i].text[0])
            return err_set(e, MR_EINVAL, "added token %zu is empty", i);
        for (size_t j = 0; j < i; j++)
            if (!strcmp(added[i].text, added[j].text))
                return err_set(e, MR_EINVAL, "added token \"%s\" is given twice", added[i].text);
    }
    if (o->vocab_size < 0 || (size_t)o->vocab_size < 256 + n_added)
        return err_set(e, MR_ERANGE,
                       "vocab size %d is too small: the 256 bytes and %zu added tokens need %zu",
                       (int)o->vocab_size, n_added, 256 + n_added);
    if (o->vocab_size > 16777216)
        return err_set(e, MR_ERANGE, "vocab size %d is over the limit of 16777216", (int)o->vocab_size);
    bpe_trainer *t = mem_calloc(1, sizeof *t);
    if (!t) return err_set(e, MR_ENOMEM, "out of memory");
    t->vocab_size = o->vocab_size;
    t->min_frequency = o->min_frequency < 1 ? 1 : o->min_frequency;
    t->model_max_length = o->model_max_length > 0 ? o->model_max_length : 16384;
    t->threads = o->threads > 0 ? o->threads : omp_get_max_threads();
    t->split_digits = o->split_digits;
    t->added = mem_calloc(n_added, sizeof *t->added);
    t->added_len = mem_calloc(n_added, sizeof *t->added_len);
    if (!t->added || !t->added_len) goto nomem;
    for (size_t i = 0; i < n_added; i++) {
        char *s = mem_strdup(added[i].text);
        if (!s) goto nomem;
        t->added[i].text = s;
        t->added[i].special = added[i].special;
        t->added_len[i] = strlen(s);
        t->n_added++;
    }
    for (int k = 0; k < 3; k++) {
        int ec;
        PCRE2_SIZE eo;
        t->re[k] = pcre2_compile((PCRE2_SPTR)regex_at(t, k), PCRE2_ZERO_TERMINATED,
                                 PCRE2_UTF | PCRE2_UCP | PCRE2_MATCH_INVALID_UTF, &ec, &eo, NULL);
        if (!t->re[k]) {
            PCRE2_UCHAR msg[200];
            pcre2_get_error_message(ec, msg, sizeof msg);
            bpe_train_free(t);
            return err_set(e, MR_EINTERNAL, "pre-tokenizer regex %d: %s at offset %zu", k + 1,
                           (const char *)msg, (size_t)eo);
        }
        t->jit[k] = pcre2_jit_compile(t->re[k], PCRE2_JIT_COMPLETE) == 0;
    }
    *out = t;
    return 0;
nomem:
    bpe_train_free(t);
    return err_set(e, MR_ENOMEM, "out of memory");
}

/* ---- phase 1: word counting ---- */
typedef struct counter {
    pcre2_match_data *md;
    wmap words;
    uint64_t nwords;
    int rc;      /* 0, MR_ENOMEM or MR_EINTERNAL */
    int pcre_rc; /* the PCRE2 error behind MR_EINTERNAL */
} counter;

/* Stage k of the Sequence on the piece s[0..n): Isolated, so matches and the gaps between them both go on to the
 * next stage; after the last stage the piece is a word. Returns 0 or sets c->rc. */
static int split_stage(const bpe_trainer *t, counter *c, const char *s, size_t n, int k) {
    if (n == 0) return 0;
    if (k == 3) {
        c->nwords++;
        if (wmap_add(&c->words, s, n, hash_bytes(s, n), 1)) return c->rc = MR_ENOMEM;
        return 0;
    }
    size_t prev = 0, start = 0;
    while (start < n) {
        int rc = t->jit[k] ? pcre2_jit_match(t->re[k], (PCRE2_SPTR)s, n, start, 0, c->md, NULL)
                           : pcre2_match(t->re[k], (PCRE2_SPTR)s, n, start, 0, c->md, NULL);
        if (rc == PCRE2_ERROR_NOMATCH) break;
        if (rc < 0) {
            c->pcre_rc = rc;
            return c->rc = MR_EINTERNAL;
        }
        PCRE2_SIZE *ov = pcre2_get_ovector_pointer(c->md);
        size_t ms = ov[0], me = ov[1] > ov[0] ? ov[1] : ov[0];
        if (me > ms) {
            if (split_stage(t, c, s + prev, ms - prev, k + 1)) return c->rc;
            if (split_stage(t, c, s + ms, me - ms, k + 1)) return c->rc;
            prev = start = me;
        } else { /* an empty match makes no piece: go on from the next character */
            start = me + 1;
            while (start < n && ((unsigned char)s[start] & 0xC0) == 0x80) start++;
        }
    }
    return split_stage(t, c, s + prev, n - prev, k + 1);
}

/* One line: cut at the added tokens (earliest occurrence first, the longest at one position), pre-tokenize the
 * text between them. */
static int count_line(const bpe_trainer *t, counter *c, const char *s, size_t n) {
    while (n) {
        const char *best = NULL;
        size_t blen = 0;
        for (size_t i = 0; i < t->n_added; i++) {
            const char *p = memmem(s, n, t->added[i].text, t->added_len[i]);
            if (p && (!best || p < best || (p == best && t->added_len[i] > blen))) {
                best = p;
                blen = t->added_len[i];
            }
        }
        if (!best) return split_stage(t, c, s, n, 0);
        if (split_stage(t, c, s, (size_t)(best - s), 0)) return c->rc;
        n -= (size_t)(best - s) + blen;
        s = best + blen;
    }
    return 0;
}

static int is_sep(char ch, int nul_sep) { return ch == '\n' || (nul_sep && ch == '\0'); }

/* Counts buf[0..len) line by line (a line keeps its '\n'; with nul_sep a NUL also ends a text and is dropped),
 * across threads, into t->words. */
static int feed_buf(bpe_trainer *t, const char *buf, size_t len, int nul_sep, mr_err *e) {
    int nth = t->threads;
    if (len < ((size_t)1 << 16)) nth = 1;
    if ((size_t)nth > len) nth = 1;
    size_t *cut = mem_calloc((size_t)nth + 1, sizeof *cut);
    counter *c = mem_calloc((size_t)nth, sizeof *c);
    if (!cut || !c) {
        mem_free(cut);
        mem_free(c);
        return err_set(e, MR_ENOMEM, "out of memory");
    }
    cut[nth] = len;
    for (int k = 1; k < nth; k++) { /* chunk k starts after the first separator at or after k*len/nth */
        size_t p = (size_t)((double)len * k / nth);
        if (p < cut[k - 1]) p = cut[k - 1];
        while (p < len && !is_sep(buf[p], nul_sep)) p++;
        cut[k] = p < len ? p + 1 : len;
    }
    int rc = 0, pcre_rc = 0;
    for (int k = 0; k < nth; k++) {
        c[k].md = pcre2_match_data_create(4, NULL);
        if (!c[k].md) rc = MR_ENOMEM;
    }
    if (!rc) {
#pragma omp parallel for num_threads(nth) schedule(static, 1)
        for (int k = 0; k < nth; k++) {
            size_t i = cut[k], end = cut[k + 1];
            while (i < end && !c[k].rc) {
                size_t j = i;
                while (j < end && !is_sep(buf[j], nul_sep)) j++;
                size_t stop = j < end && buf[j] == '\n' ? j + 1 : j; /* keep '\n', drop a NUL */
                count_line(t, &c[k], buf + i, stop - i);
                i = j < end ? j + 1 : end;
            }
        }
        for (int k = 0; k < nth && !rc; k++) {
            rc = c[k].rc;
            pcre_rc = c[k].pcre_rc;
        }
    }
    /* merge in thread order (the sums do not depend on it) */
    for (int k = 0; k < nth && !rc; k++) {
        for (size_t i = 0; i < c[k].words.n && !rc; i++) {
            const wword *w = &c[k].words.w[i];
            if (wmap_add(&t->words, c[k].words.arena + w->off, w->len, w->hash, w->count)) rc = MR_ENOMEM;
        }
        t->nwords += c[k].nwords;
    }
    for (int k = 0; k < nth; k++) {
        pcre2_match_data_free(c[k].md);
        wmap_free(&c[k].words);
    }
    mem_free(c);
    mem_free(cut);
    if (rc == MR_ENOMEM) return err_set(e, MR_ENOMEM, "out of memory while counting words");
    if (rc) {
        PCRE2_UCHAR msg[200];
        pcre2_get_error_message(pcre_rc, msg, sizeof msg);
        return err_set(e, MR_EINTERNAL, "pre-tokenizer regex matching failed: %s", (const char *)msg);
    }
    t->bytes += len;
    return 0;
}

int bpe_train_feed(bpe_trainer *t, const char *text, size_t len, mr_err *e) {
    if (t->fitted) return err_set(e, MR_EINVAL, "cannot feed text after training");
    return feed_buf(t, text, len, 0, e);
}

static int read_file(const char *path, char **out, size_t *n, mr_err *e) {
    *out = NULL;
    FILE *f = fopen(path, "rb");
    if (!f) return err_set(e, MR_EIO, "%s: cannot open: %s", path, strerror(errno));
    struct stat st;
    if (fstat(fileno(f), &st) || S_ISDIR(st.st_mode)) {
        fclose(f);
        return err_set(e, MR_EIO, "%s: cannot read: not a regular file", path);
    }
    size_t cap = st.st_size > 0 ? (size_t)st.st_size + 1 : 65536, len = 0;
    char *buf = mem_alloc(cap);
    if (!buf) {
        fclose(f);
        return err_set(e, MR_ENOMEM, "%s: out of memory reading %zu bytes", path, cap);
    }
    for (;;) { /* read to EOF: the size may change, and pipes have none */
        if (len + 1 >= cap) {
            char *p = cap <= SIZE_MAX / 2 ? mem_realloc(buf, cap * 2) : NULL;
            if (!p) {
                mem_free(buf);
                fclose(f);
                return err_set(e, MR_ENOMEM, "%s: out of memory", path);
            }
            buf = p;
            cap *= 2;
        }
        size_t r = fread(buf + len, 1, cap - 1 - len, f);
        len += r;
        if (r == 0) break;
    }
    int bad = ferror(f);
    fclose(f);
    if (bad) {
        mem_free(buf);
        return err_set(e, MR_EIO, "%s: read error", path);
    }
    buf[len] = '\0';
    *out = buf;
    *n = len;
    return 0;
}

/* texts buffer for JSONL rows: strings separated by NUL */
typedef struct sbuf {
    char *p;
    size_t n, cap;
} sbuf;

static int sbuf_add(sbuf *b, const char *s) {
    size_t n = strlen(s);
    if (b->n + n + 1 > b->cap) {
        size_t cap = b->cap ? b->cap : 1 << 16;
        while (cap < b->n + n + 1) cap *= 2;
        char *p = mem_realloc(b->p, cap);
        if (!p) return -1;
        b->p = p;
        b->cap = cap;
    }
    memcpy(b->p + b->n, s, n + 1);
    b->n += n + 1;
    return 0;
}

static int jsonl_texts(const char *path, char *buf, size_t len, sbuf *out, size_t *n_texts, mr_err *e) {
    static const char *const keys[] = {"text", "prompt", "completion"};
    long line = 0;
    size_t i = 0;
    *n_texts = 0;
    while (i < len) {
        line++;
        size_t j = i;
        while (j < len && buf[j] != '\n') j++;
        size_t k = i;
        while (k < j && (buf[k] == ' ' || buf[k] == '\t' || buf[k] == '\r')) k++;
        if (k < j) {
            cJSON *row = cJSON_ParseWithLength(buf + i, j - i);
            if (!cJSON_IsObject(row)) {
                cJSON_Delete(row);
                return err_set(e, MR_EFORMAT, "%s:%ld: expected a JSON object per line", path, line);
            }
            int rc = 0;
            for (size_t q = 0; q < 3 && !rc; q++) {
                const cJSON *s = cJSON_GetObjectItemCaseSensitive(row, keys[q]);
                if (cJSON_IsString(s)) {
                    rc = sbuf_add(out, s->valuestring);
                    (*n_texts)++;
                }
            }
            const cJSON *msgs = cJSON_GetObjectItemCaseSensitive(row, "messages"), *m;
            if (!cJSON_IsArray(msgs)) msgs = NULL;
            cJSON_ArrayForEach(m, msgs) {
                const cJSON *s = cJSON_GetObjectItemCaseSensitive(m, "content");
                if (cJSON_IsString(s) && !rc) {
                    rc = sbuf_add(out, s->valuestring);
                    (*n_texts)++;
                }
            }
            cJSON_Delete(row);
            if (rc) return err_set(e, MR_ENOMEM, "%s:%ld: out of memory", path, line);
        }
        i = j + 1;
    }
    return 0;
}

int bpe_train_feed_file(bpe_trainer *t, const char *path, bpe_format fmt, mr_err *e) {
    if (t->fitted) return err_set(e, MR_EINVAL, "cannot feed text after training");
    char *buf;
    size_t len = 0;
    int rc = read_file(path, &buf, &len, e);
    if (rc) return rc;
    if (fmt == BPE_JSONL) {
        sbuf texts = {0};
        size_t n_texts = 0;
        rc = jsonl_texts(path, buf, len, &texts, &n_texts, e);
        mem_free(buf);
        if (!rc && n_texts == 0)
            rc = err_set(e, MR_EFORMAT, "%s: no text in any row (expected \"text\", \"prompt\", \"completion\" or "
                                        "\"messages\"[].content strings)", path);
        if (!rc) {
            uint64_t before = t->bytes;
            rc = feed_buf(t, texts.p, texts.n, 1, e);
            if (!rc) t->bytes = before + texts.n - n_texts; /* the NUL separators are not text */
        }
        mem_free(texts.p);
    } else {
        rc = feed_buf(t, buf, len, 0, e);
        mem_free(buf);
    }
    if (rc && rc != MR_EIO && rc != MR_EFORMAT) err_prefix(e, "%s", path);
    return rc;
}

/* ---- phase 2: merges ---- */
typedef struct bpair {
    int32_t a, b;
    int64_t count;
    uint32_t *w; /* words that hold (or held) the pair; may hold stale entries */
    uint32_t wn, wcap;
    uint32_t last_w; /* the word appended last (no duplicates from one word) */
    uint32_t mark;   /* the step in which it was queued for a push */
    int merged;
} bpair;

typedef struct heap_ent {
    int64_t count;
    uint32_t p;
} heap_ent;

typedef struct fit_state {
    const symtab *sym;
    bpair *pair;
    size_t np, pcap;
    uint32_t *pslot; /* pair index + 1 */
    size_t pscap;
    heap_ent *heap;
    size_t hn, hcap;
    int32_t *seq; /* all words' symbols */
    size_t *woff;
    uint32_t *wlen;
    int64_t *wcnt;
    size_t nw;
    uint32_t *touched;
    size_t tn, tcap;
} fit_state;

static uint64_t pair_hash(int32_t a, int32_t b) {
    uint64_t h = ((uint64_t)(uint32_t)a << 32 | (uint32_t)b) * 0x9E3779B97F4A7C15ull;
    return h ^ (h >> 29);
}

static int64_t pair_find(const fit_state *f, int32_t a, int32_t b) {
    for (size_t j = pair_hash(a, b) & (f->pscap - 1); f->pslot[j]; j = (j + 1) & (f->pscap - 1)) {
        const bpair *p = &f->pair[f->pslot[j] - 1];
        if (p->a == a && p->b == b) return (int64_t)f->pslot[j] - 1;
    }
    return -1;
}

/* The index of pair (a, b), added with count 0 when new; -1 when out of memory. */
static int64_t pair_get(fit_state *f, int32_t a, int32_t b) {
    int64_t q = f->pscap ? pair_find(f, a, b) : -1;
    if (q >= 0) return q;
    if (f->np >= UINT32_MAX - 1) return -1;
    if ((f->np + 1) * 2 > f->pscap) {
        size_t cap = f->pscap ? f->pscap * 2 : 4096;
        uint32_t *slot = mem_calloc(cap, sizeof *slot);
        if (!slot) return -1;
        for (size_t i = 0; i < f->np; i++) {
            size_t j = pair_hash(f->pair[i].a, f->pair[i].b) & (cap - 1);
            while (slot[j]) j = (j + 1) & (cap - 1);
            slot[j] = (uint32_t)(i + 1);
        }
        mem_free(f->pslot);
        f->pslot = slot;
        f->pscap = cap;
    }
    if (f->np == f->pcap) {
        size_t cap = f->pcap ? f->pcap * 2 : 4096;
        bpair *p = mem_realloc(f->pair, cap * sizeof *p);
        if (!p) return -1;
        f->pair = p;
        f->pcap = cap;
    }
    f->pair[f->np] = (bpair){a, b, 0, NULL, 0, 0, UINT32_MAX, 0, 0};
    size_t j = pair_hash(a, b) & (f->pscap - 1);
    while (f->pslot[j]) j = (j + 1) & (f->pscap - 1);
    f->pslot[j] = (uint32_t)(f->np + 1);
    return (int64_t)f->np++;
}

static int pair_add_word(bpair *p, uint32_t w) {
    if (p->last_w == w) return 0;
    if (p->wn == p->wcap) {
        uint32_t cap = p->wcap ? p->wcap * 2 : 4;
        if (cap < p->wcap) return -1;
        uint32_t *v = mem_realloc(p->w, (size_t)cap * sizeof *v);
        if (!v) return -1;
        p->w = v;
        p->wcap = cap;
    }
    p->w[p->wn++] = w;
    p->last_w = w;
    return 0;
}

/* Byte order of two symbols: memcmp on the common length, then the shorter first. */
static int sym_cmp(const symtab *s, int32_t x, int32_t y) {
    if (x == y) return 0;
    size_t lx = s->len[x], ly = s->len[y];
    int c = memcmp(s->bytes + s->off[x], s->bytes + s->off[y], lx < ly ? lx : ly);
    if (c) return c;
    return lx < ly ? -1 : lx > ly;
}

/* 1 when heap entry x comes out before y: the higher count, then the smaller (left bytes, right bytes). */
static int heap_before(const fit_state *f, const heap_ent *x, const heap_ent *y) {
    if (x->count != y->count) return x->count > y->count;
    const bpair *p = &f->pair[x->p], *q = &f->pair[y->p];
    int c = sym_cmp(f->sym, p->a, q->a);
    if (!c) c = sym_cmp(f->sym, p->b, q->b);
    return c < 0;
}

static int heap_push(fit_state *f, uint32_t p, int64_t count) {
    if (f->hn == f->hcap) {
        size_t cap = f->hcap ? f->hcap * 2 : 4096;
        heap_ent *h = mem_realloc(f->heap, cap * sizeof *h);
        if (!h) return -1;
        f->heap = h;
        f->hcap = cap;
    }
    size_t i = f->hn++;
    heap_ent x = {count, p};
    while (i > 0) {
        size_t up = (i - 1) / 2;
        if (!heap_before(f, &x, &f->heap[up])) break;
        f->heap[i] = f->heap[up];
        i = up;
    }
    f->heap[i] = x;
    return 0;
}

static heap_ent heap_pop(fit_state *f) {
    heap_ent top = f->heap[0], x = f->heap[--f->hn];
    size_t i = 0, n = f->hn;
    for (;;) {
        size_t l = 2 * i + 1, r = l + 1, m = i;
        const heap_ent *best = &x;
        if (l < n && heap_before(f, &f->heap[l], best)) {
            m = l;
            best = &f->heap[l];
        }
        if (r < n && heap_before(f, &f->heap[r], best)) m = r;
        if (m == i) break;
        f->heap[i] = f->heap[m];
        i = m;
    }
    if (n) f->heap[i] = x;
    return top;
}

static void fit_free(fit_state *f) {
    for (size_t i = 0; i < f->np; i++) mem_free(f->pair[i].w);
    mem_free(f->pair);
    mem_free(f->pslot);
    mem_free(f->heap);
    mem_free(f->seq);
    mem_free(f->woff);
    mem_free(f->wlen);
    mem_free(f->wcnt);
    mem_free(f->touched);
}

static int touch(fit_state *f, uint32_t p, uint32_t step) {
    if (f->pair[p].mark == step) return 0;
    f->pair[p].mark = step;
    if (f->tn == f->tcap) {
        size_t cap = f->tcap ? f->tcap * 2 : 1024;
        uint32_t *v = mem_realloc(f->touched, cap * sizeof *v);
        if (!v) return -1;
        f->touched = v;
        f->tcap = cap;
    }
    f->touched[f->tn++] = p;
    return 0;
}

/* Applies merge (a, b) -> id to every word on pair pi's list, updating the pair counts and lists. */
static int apply_merge(fit_state *f, uint32_t pi, int32_t id, uint32_t step) {
    int32_t a = f->pair[pi].a, b = f->pair[pi].b;
    const uint32_t *wl = f->pair[pi].w; /* never appended to in this step: (a, b) does not hold id */
    uint32_t wn = f->pair[pi].wn;
    f->tn = 0;
    for (uint32_t k = 0; k < wn; k++) {
        uint32_t w = wl[k];
        int32_t *s = f->seq + f->woff[w];
        uint32_t n = f->wlen[w];
        int found = 0;
        for (uint32_t i = 0; i + 1 < n && !found; i++) found = s[i] == a && s[i + 1] == b;
        if (!found) continue; /* a stale entry */
        int64_t c = f->wcnt[w];
        for (uint32_t i = 0; i + 1 < n; i++) f->pair[pair_find(f, s[i], s[i + 1])].count -= c;
        uint32_t o = 0;
        for (uint32_t i = 0; i < n;) {
            if (i + 1 < n && s[i] == a && s[i + 1] == b) {
                s[o++] = id;
                i += 2;
            } else {
                s[o++] = s[i++];
            }
        }
        f->wlen[w] = n = o;
        for (uint32_t i = 0; i + 1 < n; i++) {
            int64_t q = pair_get(f, s[i], s[i + 1]);
            if (q < 0) return -1;
            f->pair[q].count += c;
            if (s[i] == id || s[i + 1] == id) {
                if (pair_add_word(&f->pair[q], w) || touch(f, (uint32_t)q, step)) return -1;
            }
        }
    }
    for (size_t k = 0; k < f->tn; k++) {
        uint32_t q = f->touched[k];
        if (f->pair[q].count > 0 && heap_push(f, q, f->pair[q].count)) return -1;
    }
    return 0;
}

static int add_merge(bpe_trainer *t, int32_t a, int32_t b) {
    if (t->n_merges == t->merge_cap) {
        size_t cap = t->merge_cap ? t->merge_cap * 2 : 1024;
        int32_t(*m)[2] = mem_realloc(t->merge, cap * sizeof *m);
        if (!m) return -1;
        t->merge = m;
        t->merge_cap = cap;
    }
    t->merge[t->n_merges][0] = a;
    t->merge[t->n_merges][1] = b;
    t->n_merges++;
    return 0;
}

int bpe_train_fit(bpe_trainer *t, mr_err *e) {
    if (t->fitted) return err_set(e, MR_EINVAL, "already trained");
    fit_state f = {0};
    f.sym = &t->sym;
    for (int b = 0; b < 256; b++) {
        char ch = (char)b;
        if (symtab_add2(&t->sym, &ch, 1, "", 0) < 0) goto nomem;
    }
    /* the words as symbol sequences */
    f.nw = t->words.n;
    f.seq = mem_alloc((t->words.an ? t->words.an : 1) * sizeof *f.seq);
    f.woff = mem_alloc((f.nw ? f.nw : 1) * sizeof *f.woff);
    f.wlen = mem_alloc((f.nw ? f.nw : 1) * sizeof *f.wlen);
    f.wcnt = mem_alloc((f.nw ? f.nw : 1) * sizeof *f.wcnt);
    if (!f.seq || !f.woff || !f.wlen || !f.wcnt) goto nomem;
    for (size_t w = 0; w < f.nw; w++) {
        const wword *ww = &t->words.w[w];
        f.woff[w] = ww->off;
        f.wlen[w] = ww->len;
        f.wcnt[w] = ww->count;
        for (uint32_t i = 0; i < ww->len; i++) f.seq[ww->off + i] = (unsigned char)t->words.arena[ww->off + i];
        const int32_t *s = f.seq + ww->off;
        for (uint32_t i = 0; i + 1 < ww->len; i++) {
            int64_t q = pair_get(&f, s[i], s[i + 1]);
            if (q < 0 || pair_add_word(&f.pair[q], (uint32_t)w)) goto nomem;
            f.pair[q].count += ww->count;
        }
    }
    for (size_t q = 0; q < f.np; q++)
        if (heap_push(&f, (uint32_t)q, f.pair[q].count)) goto nomem;

    uint32_t step = 0;
    while (t->n_added + t->sym.n < (size_t)t->vocab_size && f.hn > 0) {
        heap_ent top = heap_pop(&f);
        bpair *p = &f.pair[top.p];
        if (top.count != p->count) { /* stale: back with the current count (or gone) */
            if (p->count > 0 && heap_push(&f, top.p, p->count)) goto nomem;
            continue;
        }
        if (top.count < t->min_frequency) break;
        int32_t a = p->a, b = p->b;
        size_t la = t->sym.len[a], lb = t->sym.len[b];
        char small[64];
        char *cat = la + lb <= sizeof small ? small : mem_alloc(la + lb);
        if (!cat) goto nomem;
        memcpy(cat, t->sym.bytes + t->sym.off[a], la);
        memcpy(cat + la, t->sym.bytes + t->sym.off[b], lb);
        int32_t id = symtab_get(&t->sym, cat, la + lb);
        if (id < 0) id = symtab_add2(&t->sym, cat, la, cat + la, lb);
        if (cat != small) mem_free(cat);
        if (id < 0) goto nomem;
        /* A pair merged before can come back when a later merge rebuilds one of its parts' strings (the
         * symbol is reused): it is applied again but not listed twice. */
        if (!p->merged) {
            if (add_merge(t, a, b)) goto nomem;
            p->merged = 1;
        }
        if (apply_merge(&f, top.p, id, ++step)) goto nomem;
    }
    fit_free(&f);
    t->fitted = 1;
    return 0;
nomem:
    fit_free(&f);
    return err_set(e, MR_ENOMEM, "out of memory while learning merges");
}

/* ---- facts ---- */
void bpe_train_get_stats(const bpe_trainer *t, bpe_train_stats *s) {
    s->bytes = t->bytes;
    s->words = t->nwords;
    s->unique_words = t->words.n;
    s->merges = t->n_merges;
    s->vocab = (int32_t)(t->n_added + (t->fitted ? t->sym.n : 256));
}

int bpe_train_merge(const bpe_trainer *t, size_t i, const char **left, size_t *left_len, const char **right,
                    size_t *right_len) {
    if (i >= t->n_merges) return -1;
    int32_t a = t->merge[i][0], b = t->merge[i][1];
    *left = t->sym.bytes + t->sym.off[a];
    *left_len = t->sym.len[a];
    *right = t->sym.bytes + t->sym.off[b];
    *right_len = t->sym.len[b];
    return 0;
}

int64_t bpe_train_word_count(const bpe_trainer *t, const char *word, size_t len) {
    const wword *w = wmap_find(&t->words, word, len, hash_bytes(word, len));
    return w ? w->count : 0;
}

/* ---- output ---- */

/* GPT-2 bytes_to_unicode: the printable code point standing for each byte. */
static int byte_cp(int b) {
    if ((b >= 33 && b <= 126) || (b >= 161 && b <= 172) || (b >= 174 && b <= 255)) return b;
    int n = 0;
    for (int x = 0; x < b; x++)
        if (!((x >= 33 && x <= 126) || (x >= 161 && x <= 172) || (x >= 174 && x <= 255))) n++;
    return 256 + n;
}

static size_t put_utf8(char *o, int cp) {
    if (cp < 0x80) {
        o[0] = (char)cp;
        return 1;
    }
    o[0] = (char)(0xC0 | (cp >> 6));
    o[1] = (char)(0x80 | (cp & 0x3F));
    return 2;
}

/* The stand-in string of a byte string (at most 2 bytes per byte) into out; NUL-terminated. */
static void standin(const char *s, size_t n, const int cp[256], char *out) {
    size_t o = 0;
    for (size_t i = 0; i < n; i++) o += put_utf8(out + o, cp[(unsigned char)s[i]]);
    out[o] = '\0';
}

/* The bytes a stand-in string stands for, or -1 when some character is not a stand-in. */
static long unstandin(const char *s, const int cp[256], char *out) {
    size_t o = 0;
    const unsigned char *p = (const unsigned char *)s;
    while (*p) {
        int c;
        if (p[0] < 0x80) {
            c = p[0];
            p++;
        } else if ((p[0] & 0xE0) == 0xC0 && (p[1] & 0xC0) == 0x80) {
            c = ((p[0] & 0x1F) << 6) | (p[1] & 0x3F);
            p += 2;
        } else {
            return -1;
        }
        int b = -1;
        for (int x = 0; x < 256 && b < 0; x++)
            if (cp[x] == c) b = x;
        if (b < 0) return -1;
        out[o++] = (char)b;
    }
    return (long)o;
}

static cJSON *split_json(const char *re) {
    cJSON *s = cJSON_CreateObject(), *pat = cJSON_CreateObject();
    if (!s || !pat) {
        cJSON_Delete(s);
        cJSON_Delete(pat);
        return NULL;
    }
    cJSON_AddStringToObject(s, "type", "Split");
    cJSON_AddStringToObject(pat, "Regex", re);
    cJSON_AddItemToObject(s, "pattern", pat);
    cJSON_AddStringToObject(s, "behavior", "Isolated");
    cJSON_AddFalseToObject(s, "invert");
    return s;
}

static cJSON *bytelevel_json(int add_prefix_space, int trim_offsets, int use_regex) {
    cJSON *b = cJSON_CreateObject();
    if (!b) return NULL;
    cJSON_AddStringToObject(b, "type", "ByteLevel");
    cJSON_AddBoolToObject(b, "add_prefix_space", add_prefix_space);
    cJSON_AddBoolToObject(b, "trim_offsets", trim_offsets);
    cJSON_AddBoolToObject(b, "use_regex", use_regex);
    return b;
}

/* {"SpecialToken": {"id": tok, "type_id": ty}} or {"Sequence": {"id": "A", "type_id": ty}} */
static cJSON *tp_piece(const char *kind, const char *id, int type_id) {
    cJSON *o = cJSON_CreateObject(), *in = cJSON_CreateObject();
    if (!o || !in) {
        cJSON_Delete(o);
        cJSON_Delete(in);
        return NULL;
    }
    cJSON_AddStringToObject(in, "id", id);
    cJSON_AddNumberToObject(in, "type_id", type_id);
    cJSON_AddItemToObject(o, kind, in);
    return o;
}

/* The post-processor LlamaTokenizerFast builds from add_bos_token: BOS before each sequence, so HF tokenizers
 * and transformers.js add it by themselves too. */
static cJSON *post_json(const char *bos) {
    cJSON *pp = cJSON_CreateObject(), *single = cJSON_CreateArray(), *pair = cJSON_CreateArray();
    cJSON *st = cJSON_CreateObject(), *b = cJSON_CreateObject(), *ids = cJSON_CreateArray(),
          *toks = cJSON_CreateArray();
    if (!pp || !single || !pair || !st || !b || !ids || !toks) {
        cJSON_Delete(pp);
        cJSON_Delete(single);
        cJSON_Delete(pair);
        cJSON_Delete(st);
        cJSON_Delete(b);
        cJSON_Delete(ids);
        cJSON_Delete(toks);
        return NULL;
    }
    cJSON_AddStringToObject(pp, "type", "TemplateProcessing");
    cJSON_AddItemToArray(single, tp_piece("SpecialToken", bos, 0));
    cJSON_AddItemToArray(single, tp_piece("Sequence", "A", 0));
    cJSON_AddItemToArray(pair, tp_piece("SpecialToken", bos, 0));
    cJSON_AddItemToArray(pair, tp_piece("Sequence", "A", 0));
    cJSON_AddItemToArray(pair, tp_piece("SpecialToken", bos, 1));
    cJSON_AddItemToArray(pair, tp_piece("Sequence", "B", 1));
    cJSON_AddItemToObject(pp, "single", single);
    cJSON_AddItemToObject(pp, "pair", pair);
    cJSON_AddStringToObject(b, "id", bos);
    cJSON_AddItemToArray(ids, cJSON_CreateNumber(0));
    cJSON_AddItemToArray(toks, cJSON_CreateString(bos));
    cJSON_AddItemToObject(b, "ids", ids);
    cJSON_AddItemToObject(b, "tokens", toks);
    cJSON_AddItemToObject(st, bos, b);
    cJSON_AddItemToObject(pp, "special_tokens", st);
    return pp;
}

static char *print_copy(cJSON *root) {
    char *s = root ? cJSON_Print(root) : NULL;
    if (!s) return NULL;
    char *c = mem_strdup(s);
    cJSON_free(s);
    return c;
}

int bpe_train_json(const bpe_trainer *t, char **tokenizer_json, char **config_json, mr_err *e) {
    *tokenizer_json = *config_json = NULL;
    if (!t->fitted) return err_set(e, MR_EINVAL, "nothing trained yet (call bpe_train_fit)");
    int cp[256];
    for (int b = 0; b < 256; b++) cp[b] = byte_cp(b);
    /* an added token spelled like a vocabulary entry would give two ids one key */
    for (size_t i = 0; i < t->n_added; i++) {
        char *raw = mem_alloc(t->added_len[i] + 1);
        if (!raw) return err_set(e, MR_ENOMEM, "out of memory");
        long n = unstandin(t->added[i].text, cp, raw);
        int32_t hit = n > 0 ? symtab_get(&t->sym, raw, (size_t)n) : -1;
        mem_free(raw);
        if (hit >= 0)
            return err_set(e, MR_EINVAL, "added token \"%s\" is spelled like a vocabulary token",
                           t->added[i].text);
    }
    /* byte ids in stand-in code point order, as HF's trainer sorts the alphabet */
    int32_t byte_id[256];
    int32_t base = (int32_t)t->n_added;
    for (int b = 0; b < 256; b++) {
        int r = 0;
        for (int x = 0; x < 256; x++) r += cp[x] < cp[b];
        byte_id[b] = base + r;
    }
    int32_t *sym_id = mem_alloc(t->sym.n * sizeof *sym_id);
    size_t maxlen = 1;
    for (size_t s = 0; s < t->sym.n; s++)
        if (t->sym.len[s] > maxlen) maxlen = t->sym.len[s];
    char *buf = mem_alloc(maxlen * 4 + 8);
    int32_t *order = mem_alloc(t->sym.n * sizeof *order); /* id - base -> symbol */
    cJSON *root = cJSON_CreateObject(), *cfg = cJSON_CreateObject();
    int rc = MR_ENOMEM;
    if (!sym_id || !buf || !order || !root || !cfg) goto done;
    for (size_t s = 0; s < t->sym.n; s++) {
        sym_id[s] = s < 256 ? byte_id[s] : base + (int32_t)s;
        order[sym_id[s] - base] = (int32_t)s;
    }

    cJSON_AddStringToObject(root, "version", "1.0");
    cJSON_AddNullToObject(root, "truncation");
    cJSON_AddNullToObject(root, "padding");
    cJSON *added = cJSON_AddArrayToObject(root, "added_tokens");
    if (!added) goto done;
    for (size_t i = 0; i < t->n_added; i++) {
        cJSON *a = cJSON_CreateObject();
        if (!a) goto done;
        cJSON_AddItemToArray(added, a);
        cJSON_AddNumberToObject(a, "id", (double)i);
        cJSON_AddStringToObject(a, "content", t->added[i].text);
        cJSON_AddFalseToObject(a, "single_word");
        cJSON_AddFalseToObject(a, "lstrip");
        cJSON_AddFalseToObject(a, "rstrip");
        cJSON_AddBoolToObject(a, "normalized", !t->added[i].special); /* as DeepSeek's */
        cJSON_AddBoolToObject(a, "special", t->added[i].special != 0);
    }
    cJSON_AddNullToObject(root, "normalizer");
    cJSON *pre = cJSON_CreateObject(), *seq = cJSON_CreateArray();
    if (!pre || !seq) {
        cJSON_Delete(pre);
        cJSON_Delete(seq);
        goto done;
    }
    cJSON_AddItemToObject(root, "pre_tokenizer", pre);
    cJSON_AddStringToObject(pre, "type", "Sequence");
    cJSON_AddItemToObject(pre, "pretokenizers", seq);
    for (int k = 0; k < 3; k++) cJSON_AddItemToArray(seq, split_json(regex_at(t, k)));
    cJSON_AddItemToArray(seq, bytelevel_json(0, 1, 0));
    cJSON_AddItemToObject(root, "post_processor", post_json(t->added[0].text));
    cJSON_AddItemToObject(root, "decoder", bytelevel_json(1, 1, 1));
    cJSON *model = cJSON_AddObjectToObject(root, "model");
    if (!model) goto done;
    cJSON_AddStringToObject(model, "type", "BPE");
    cJSON_AddNullToObject(model, "dropout");
    cJSON_AddNullToObject(model, "unk_token");
    cJSON_AddNullToObject(model, "continuing_subword_prefix");
    cJSON_AddNullToObject(model, "end_of_word_suffix");
    cJSON_AddFalseToObject(model, "fuse_unk");
    cJSON_AddFalseToObject(model, "byte_fallback");
    cJSON_AddFalseToObject(model, "ignore_merges");
    cJSON *vocab = cJSON_AddObjectToObject(model, "vocab");
    cJSON *merges = cJSON_AddArrayToObject(model, "merges");
    if (!vocab || !merges) goto done;
    for (size_t i = 0; i < t->n_added; i++)
        if (!cJSON_AddNumberToObject(vocab, t->added[i].text, (double)i)) goto done;
    for (size_t k = 0; k < t->sym.n; k++) {
        int32_t s = order[k];
        standin(t->sym.bytes + t->sym.off[s], t->sym.len[s], cp, buf);
        if (!cJSON_AddNumberToObject(vocab, buf, (double)(base + (int32_t)k))) goto done;
    }
    for (size_t m = 0; m < t->n_merges; m++) {
        int32_t a = t->merge[m][0], b = t->merge[m][1];
        size_t la = t->sym.len[a];
        standin(t->sym.bytes + t->sym.off[a], la, cp, buf);
        size_t o = strlen(buf);
        buf[o++] = ' ';
        standin(t->sym.bytes + t->sym.off[b], t->sym.len[b], cp, buf + o);
        cJSON *s = cJSON_CreateString(buf);
        if (!s) goto done;
        cJSON_AddItemToArray(merges, s);
    }

    cJSON_AddTrueToObject(cfg, "add_bos_token");
    cJSON_AddFalseToObject(cfg, "add_eos_token");
    cJSON_AddStringToObject(cfg, "bos_token", t->added[0].text);
    cJSON_AddStringToObject(cfg, "eos_token", t->added[1].text);
    cJSON_AddStringToObject(cfg, "pad_token", t->added[1].text);
    cJSON_AddNullToObject(cfg, "unk_token");
    cJSON_AddFalseToObject(cfg, "clean_up_tokenization_spaces");
    cJSON_AddTrueToObject(cfg, "legacy");
    cJSON_AddNumberToObject(cfg, "model_max_length", t->model_max_length);
    cJSON_AddStringToObject(cfg, "tokenizer_class", "LlamaTokenizerFast");

    *tokenizer_json = print_copy(root);
    *config_json = print_copy(cfg);
    if (!*tokenizer_json || !*config_json) {
        mem_free(*tokenizer_json);
        mem_free(*config_json);
        *tokenizer_json = *config_json = NULL;
        goto done;
    }
    rc = 0;
done:
    cJSON_Delete(root);
    cJSON_Delete(cfg);
    mem_free(sym_id);
    mem_free(buf);
    mem_free(order);
    return rc ? err_set(e, rc, "out of memory writing the tokenizer JSON") : 0;
}

/* mkdir -p */
static int make_dirs(const char *dir, mr_err *e) {
    char *p = mem_strdup(dir);
    if (!p) return err_set(e, MR_ENOMEM, "out of memory");
    for (char *s = p + 1;; s++) {
        if (*s == '/' || *s == '\0') {
            char c = *s;
            *s = '\0';
            if (mkdir(p, 0777) && errno != EEXIST) {
                int er = errno;
                mem_free(p);
                return err_set(e, MR_EIO, "%s: cannot create directory: %s", dir, strerror(er));
            }
            *s = c;
            if (!c) break;
        }
    }
    mem_free(p);
    struct stat st;
    if (stat(dir, &st) || !S_ISDIR(st.st_mode))
        return err_set(e, MR_EIO, "%s: cannot create directory: a file is in the way", dir);
    return 0;
}

static int write_atomic(const char *dir, const char *name, const char *text, mr_err *e) {
    size_t n = strlen(dir) + strlen(name) + 64;
    char *path = mem_alloc(n), *tmp = mem_alloc(n);
    if (!path || !tmp) {
        mem_free(path);
        mem_free(tmp);
        return err_set(e, MR_ENOMEM, "out of memory");
    }
    snprintf(path, n, "%s/%s", dir, name);
    snprintf(tmp, n, "%s/.%s.tmp.%ld", dir, name, (long)getpid());
    int rc = 0;
    FILE *f = fopen(tmp, "wb");
    if (!f) {
        rc = err_set(e, MR_EIO, "%s: cannot write: %s", path, strerror(errno));
        goto out;
    }
    size_t len = strlen(text);
    int bad = fwrite(text, 1, len, f) != len || fputc('\n', f) == EOF || fflush(f) || fsync(fileno(f));
    int er = errno;
    if (fclose(f)) bad = 1;
    if (bad) {
        unlink(tmp);
        rc = err_set(e, MR_EIO, "%s: write failed: %s", tmp, strerror(er));
        goto out;
    }
    if (rename(tmp, path)) {
        er = errno;
        unlink(tmp);
        rc = err_set(e, MR_EIO, "%s: cannot rename into place: %s", path, strerror(er));
    }
out:
    mem_free(path);
    mem_free(tmp);
    return rc;
}

int bpe_train_write(const bpe_trainer *t, const char *dir, mr_err *e) {
    char *json, *cfg;
    int rc = bpe_train_json(t, &json, &cfg, e);
    if (rc) return rc;
    rc = make_dirs(dir, e);
    if (!rc) rc = write_atomic(dir, "tokenizer.json", json, e);
    if (!rc) rc = write_atomic(dir, "tokenizer_config.json", cfg, e);
    mem_free(json);
    mem_free(cfg);
    return rc;
}
