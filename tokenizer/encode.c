/* encode.c: the encoding pipeline and decode.
 * encode: added tokens are cut out of the RAW text first (leftmost match, longest first, with lstrip / rstrip /
 * single_word), then each stretch between them goes normalizer -> pre-tokenizer -> BPE. decode: the tokens' raw
 * bytes, concatenated (a byte-level vocabulary is stored as bytes, so the ByteLevel decoder is a no-op here). */
#include <omp.h>
#include <string.h>

#include "core/mem.h"
#include "tokenizer/tok_internal.h"

int tok_ids_push(tok_ids *ids, int32_t id) {
    if (ids->n == ids->cap) {
        size_t cap = ids->cap ? ids->cap * 2 : 256;
        int32_t *v = mem_realloc(ids->v, cap * sizeof *v);
        if (!v) return MR_ENOMEM;
        ids->v = v;
        ids->cap = cap;
    }
    ids->v[ids->n++] = id;
    return 0;
}

void tok_ids_free(tok_ids *ids) {
    if (!ids) return;
    mem_free(ids->v);
    ids->v = NULL;
    ids->n = ids->cap = 0;
}

int tok_worker_new(const tokenizer *t, tok_worker **out, mr_err *e) {
    *out = NULL;
    tok_worker *w = mem_calloc(1, sizeof *w);
    if (!w) return err_set(e, MR_ENOMEM, "%s: out of memory for an encoder", t->name);
    w->t = t;
    w->md = pcre2_match_data_create(4, NULL);
    if (!w->md) {
        mem_free(w);
        return err_set(e, MR_ENOMEM, "%s: out of memory for an encoder", t->name);
    }
    *out = w;
    return 0;
}

void tok_worker_free(tok_worker *w) {
    if (!w) return;
    if (w->md) pcre2_match_data_free(w->md);
    mem_free(w->buf);
    mem_free(w->pa.v);
    mem_free(w->pb.v);
    mem_free(w->cache);
    mem_free(w->cbytes);
    mem_free(w->cids);
    mem_free(w->sym);
    mem_free(w->heap);
    mem_free(w);
}

int tok_worker_set_text(tok_worker *w, const char *s, size_t n) {
    if (n + 1 > w->buf_cap) {
        size_t cap = w->buf_cap ? w->buf_cap : 4096;
        while (cap < n + 1) cap *= 2;
        char *b = mem_realloc(w->buf, cap);
        if (!b) return -1;
        w->buf = b;
        w->buf_cap = cap;
    }
    if (n) memcpy(w->buf, s, n);
    w->buf_n = n;
    return 0;
}

/* one stretch of text without added tokens */
static int encode_plain(tok_worker *w, const char *s, size_t n, tok_ids *out, mr_err *e) {
    if (n == 0) return 0;
    if (tok_worker_set_text(w, s, n)) return err_set(e, MR_ENOMEM, "out of memory");
    int rc;
    if ((rc = tok_normalize(w, e)) || (rc = tok_pretokenize(w, e))) return rc;
    for (size_t i = 0; i < w->pa.n; i++)
        if ((rc = tok_bpe_word(w, w->buf + w->pa.v[i].off, w->pa.v[i].len, out, e))) return rc;
    return 0;
}

static int is_word_byte(unsigned char c) {
    return (c >= '0' && c <= '9') || (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || c == '_' || c >= 0x80;
}

static int is_space(unsigned char c) {
    return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\v' || c == '\f';
}

/* The added token matching at text[i] (longest first), or NULL. */
static const tok_added *added_at(const tokenizer *t, const char *s, size_t n, size_t i) {
    unsigned char c = (unsigned char)s[i];
    for (size_t k = t->added_start[c]; k < t->added_start[c + 1]; k++) {
        const tok_added *a = &t->added[k];
        if (a->len > n - i || memcmp(s + i, a->text, a->len)) continue;
        if (a->single_word && ((i > 0 && is_word_byte((unsigned char)s[i - 1])) ||
                               (i + a->len < n && is_word_byte((unsigned char)s[i + a->len]))))
            continue;
        return a;
    }
    return NULL;
}

int tok_encode_w(tok_worker *w, const char *text, size_t len, unsigned flags, tok_ids *out, mr_err *e) {
    const tokenizer *t = w->t;
    int bos = (flags & TOK_BOS) || ((flags & TOK_SPECIAL) && t->add_bos);
    int eos = (flags & TOK_EOS) || ((flags & TOK_SPECIAL) && t->add_eos);
    if (bos && t->bos >= 0 && tok_ids_push(out, t->bos)) return err_set(e, MR_ENOMEM, "out of memory");
    int rc;
    size_t seg = 0, i = 0;
    if (!(flags & TOK_NO_ADDED) && t->n_added) {
        while (i < len) {
            unsigned char c = (unsigned char)text[i];
            if (t->added_start[c] == t->added_start[c + 1]) {
                i++;
                continue;
            }
            const tok_added *a = added_at(t, text, len, i);
            if (!a) {
                i++;
                continue;
            }
            size_t s = i, end = i + a->len;
            if (a->lstrip)
                while (s > seg && is_space((unsigned char)text[s - 1])) s--;
            if (a->rstrip)
                while (end < len && is_space((unsigned char)text[end])) end++;
            if ((rc = encode_plain(w, text + seg, s - seg, out, e))) return rc;
            if (tok_ids_push(out, a->id)) return err_set(e, MR_ENOMEM, "out of memory");
            seg = i = end;
        }
    }
    if ((rc = encode_plain(w, text + seg, len - seg, out, e))) return rc;
    if (eos && t->eos >= 0 && tok_ids_push(out, t->eos)) return err_set(e, MR_ENOMEM, "out of memory");
    return 0;
}

int tok_encode(tokenizer *t, const char *text, size_t len, unsigned flags, tok_ids *out, mr_err *e) {
    return tok_encode_w(t->own, text, len, flags, out, e);
}

int tok_encode_batch(const tokenizer *t, const char *const *texts, const size_t *lens, size_t n, unsigned flags,
                     tok_ids *outs, int threads, mr_err *e) {
    if (threads <= 0) threads = omp_get_max_threads();
    size_t bad = n;
    int bad_rc = 0;
    mr_err bad_e = {0};
#pragma omp parallel num_threads(threads)
    {
        tok_worker *w = NULL;
        mr_err le = {0};
        int rc = tok_worker_new(t, &w, &le);
        size_t my_bad = n;
        int my_rc = rc;
#pragma omp for schedule(dynamic, 16)
        for (size_t i = 0; i < n; i++) {
            if (rc || my_bad < n) continue;
            int r = tok_encode_w(w, texts[i], lens[i], flags, &outs[i], &le);
            if (r) {
                my_bad = i;
                my_rc = r;
            }
        }
        if (rc) my_bad = 0;
#pragma omp critical(tok_batch_err)
        if (my_bad < bad) {
            bad = my_bad;
            bad_rc = my_rc;
            bad_e = le;
        }
        tok_worker_free(w);
    }
    if (bad < n) {
        if (e) {
            *e = bad_e;
            err_prefix(e, "text %zu", bad);
        }
        return bad_rc;
    }
    return 0;
}

static int hexval(char c) {
    return c >= '0' && c <= '9' ? c - '0' : c >= 'A' && c <= 'F' ? c - 'A' + 10 : c >= 'a' && c <= 'f' ? c - 'a' + 10
                                                                                                         : -1;
}

int tok_decode(const tokenizer *t, const int32_t *ids, size_t n, int skip_special, char **text, size_t *len,
               mr_err *e) {
    *text = NULL;
    size_t total = 1;
    for (size_t i = 0; i < n; i++) {
        if (ids[i] < 0 || ids[i] >= t->n_ids || t->len[ids[i]] == UINT32_MAX)
            return err_set(e, MR_EINVAL, "%s: ids[%zu] = %d is not a token id (vocabulary: 0..%d)", t->name, i,
                           (int)ids[i], (int)t->n_ids - 1);
        total += t->len[ids[i]];
    }
    size_t rep_from = t->dec_replace ? strlen(t->dec_from) : 0, rep_to = t->dec_replace ? strlen(t->dec_to) : 0;
    if (rep_to > rep_from) total = total * (rep_to / (rep_from ? rep_from : 1) + 1);
    char *out = mem_alloc(total);
    if (!out) return err_set(e, MR_ENOMEM, "out of memory decoding %zu ids", n);
    size_t o = 0;
    for (size_t i = 0; i < n; i++) {
        int32_t id = ids[i];
        if (skip_special && t->special[id]) continue;
        const char *s = t->arena + t->off[id];
        size_t l = t->len[id];
        if (t->dec_byte_fallback && l == 6 && !memcmp(s, "<0x", 3) && s[5] == '>' && hexval(s[3]) >= 0 &&
            hexval(s[4]) >= 0) {
            out[o++] = (char)(hexval(s[3]) * 16 + hexval(s[4]));
            continue;
        }
        if (t->dec_replace) {
            for (size_t k = 0; k < l;) {
                if (k + rep_from <= l && !memcmp(s + k, t->dec_from, rep_from)) {
                    memcpy(out + o, t->dec_to, rep_to);
                    o += rep_to;
                    k += rep_from;
                } else {
                    out[o++] = s[k++];
                }
            }
            continue;
        }
        memcpy(out + o, s, l);
        o += l;
    }
    out[o] = '\0';
    *text = out;
    if (len) *len = o;
    return 0;
}

int32_t tok_vocab_size(const tokenizer *t) { return t->n_ids; }
int32_t tok_bos_id(const tokenizer *t) { return t->bos; }
int32_t tok_eos_id(const tokenizer *t) { return t->eos; }
int32_t tok_pad_id(const tokenizer *t) { return t->pad; }
int tok_add_bos(const tokenizer *t) { return t->add_bos > 0; }
int tok_add_eos(const tokenizer *t) { return t->add_eos > 0; }

int32_t tok_token_id(const tokenizer *t, const char *text) {
    size_t n = strlen(text);
    if (n == 0) return -1;
    unsigned char c = (unsigned char)text[0];
    for (size_t k = t->added_start[c]; k < t->added_start[c + 1]; k++)
        if (t->added[k].len == n && !memcmp(t->added[k].text, text, n)) return t->added[k].id;
    return tok_strmap_get(t, &t->vocab, text, n);
}

int tok_is_special(const tokenizer *t, int32_t id) { return id >= 0 && id < t->n_ids && t->special[id]; }

const char *tok_token_bytes(const tokenizer *t, int32_t id, size_t *len) {
    if (id < 0 || id >= t->n_ids || t->len[id] == UINT32_MAX) return NULL;
    if (len) *len = t->len[id];
    return t->arena + t->off[id];
}
