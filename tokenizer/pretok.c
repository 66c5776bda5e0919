/* pretok.c: the normalizer and the pre-tokenizer stages over one segment of text (the text between added
 * tokens), with PCRE2 regexes (UTF + UCP for Unicode properties; JIT when available).
 * Each stage re-splits every piece the previous stage produced; a regex sees one piece as its whole subject
 * (HF tokenizers' PreTokenizedString::split). Invalid UTF-8 never matches (PCRE2_MATCH_INVALID_UTF), so stray
 * bytes stay in the gaps and reach BPE byte-wise. */
#include <stdio.h>
#include <string.h>

#include "core/mem.h"
#include "tokenizer/tok_internal.h"

int tok_regex_compile(const char *pattern, size_t len, int literal, pcre2_code **re, int *jit, char *why,
                      size_t why_cap) {
    int ec;
    PCRE2_SIZE eo;
    uint32_t opt = PCRE2_UTF | PCRE2_MATCH_INVALID_UTF | (literal ? PCRE2_LITERAL : PCRE2_UCP);
    *re = pcre2_compile((PCRE2_SPTR)pattern, len, opt, &ec, &eo, NULL);
    if (!*re) {
        PCRE2_UCHAR msg[200];
        pcre2_get_error_message(ec, msg, sizeof msg);
        snprintf(why, why_cap, "%s at offset %zu", (const char *)msg, (size_t)eo);
        return -1;
    }
    *jit = pcre2_jit_compile(*re, PCRE2_JIT_COMPLETE) == 0;
    return 0;
}

int tok_regex_find(pcre2_code *re, int jit, pcre2_match_data *md, const char *s, size_t n, size_t start,
                   size_t *ms, size_t *me) {
    int rc = jit ? pcre2_jit_match(re, (PCRE2_SPTR)s, n, start, 0, md, NULL)
                 : pcre2_match(re, (PCRE2_SPTR)s, n, start, 0, md, NULL);
    if (rc == PCRE2_ERROR_NOMATCH) return 0;
    if (rc < 0) return rc;
    PCRE2_SIZE *ov = pcre2_get_ovector_pointer(md);
    *ms = ov[0];
    *me = ov[1];
    if (*me < *ms) *me = *ms; /* \K tricks: never a negative length */
    return 1;
}

static int pieces_push(tok_pieces *p, size_t off, size_t len) {
    if (len == 0) return 0;
    if (p->n == p->cap) {
        size_t cap = p->cap ? p->cap * 2 : 256;
        tok_piece *v = mem_realloc(p->v, cap * sizeof *v);
        if (!v) return -1;
        p->v = v;
        p->cap = cap;
    }
    p->v[p->n].off = off;
    p->v[p->n].len = len;
    p->n++;
    return 0;
}

static int buf_reserve(tok_worker *w, size_t need) {
    if (need <= w->buf_cap) return 0;
    size_t cap = w->buf_cap ? w->buf_cap : 4096;
    while (cap < need) cap *= 2;
    char *b = mem_realloc(w->buf, cap);
    if (!b) return -1;
    w->buf = b;
    w->buf_cap = cap;
    return 0;
}

/* The behavior of a split, applied as a stream of (start, end, is_match) segments (HF normalizer.rs split). */
typedef struct split_state {
    tok_behavior b;
    tok_pieces *out;
    size_t ps, pe; /* pending segment */
    int have, pm;  /* a segment is pending; is_match of the previous (pending) one */
} split_state;

static int seg(split_state *st, size_t s, size_t e, int m) {
    switch (st->b) {
    case SPLIT_ISOLATED: return pieces_push(st->out, s, e - s);
    case SPLIT_REMOVED: return m ? 0 : pieces_push(st->out, s, e - s);
    case SPLIT_MERGED_PREV: /* a match joins the segment before it, unless that one is a match too */
        if (m && !st->pm && st->have) {
            st->pe = e;
        } else {
            if (st->have && pieces_push(st->out, st->ps, st->pe - st->ps)) return -1;
            st->ps = s;
            st->pe = e;
            st->have = 1;
        }
        st->pm = m;
        return 0;
    case SPLIT_MERGED_NEXT: /* a match joins the segment after it, unless that one is a match too */
        if (st->have && st->pm && !m) {
            st->pe = e;
            if (pieces_push(st->out, st->ps, st->pe - st->ps)) return -1;
            st->have = 0;
            st->pm = 0;
            return 0;
        }
        if (st->have && pieces_push(st->out, st->ps, st->pe - st->ps)) return -1;
        st->ps = s;
        st->pe = e;
        st->have = 1;
        st->pm = m;
        return 0;
    case SPLIT_CONTIGUOUS:
        if (st->have && m == st->pm) {
            st->pe = e;
        } else {
            if (st->have && pieces_push(st->out, st->ps, st->pe - st->ps)) return -1;
            st->ps = s;
            st->pe = e;
            st->have = 1;
        }
        st->pm = m;
        return 0;
    }
    return 0;
}

static int seg_flush(split_state *st) {
    if (st->b != SPLIT_ISOLATED && st->b != SPLIT_REMOVED && st->have)
        return pieces_push(st->out, st->ps, st->pe - st->ps);
    return 0;
}

/* Splits the piece [off, off+len) of w->buf with re into out. */
static int split_piece(tok_worker *w, const tok_stage *sg, size_t off, size_t len, tok_pieces *out, mr_err *e) {
    split_state st = {sg->behavior, out, 0, 0, 0, 0};
    const char *s = w->buf + off;
    size_t prev = 0, start = 0;
    while (start <= len) {
        size_t ms, me;
        int rc = tok_regex_find(sg->re, sg->jit, w->md, s, len, start, &ms, &me);
        if (rc < 0) {
            PCRE2_UCHAR msg[200];
            pcre2_get_error_message(rc, msg, sizeof msg);
            return err_set(e, MR_EINTERNAL, "%s: regex matching failed: %s", w->t->name, (const char *)msg);
        }
        if (rc == 0) break;
        if (ms > prev && seg(&st, off + prev, off + ms, sg->invert)) goto nomem;
        if (seg(&st, off + ms, off + me, !sg->invert)) goto nomem;
        prev = me;
        if (me > ms) {
            start = me;
        } else { /* an empty match: go on from the next character */
            start = me + 1;
            while (start < len && ((unsigned char)s[start] & 0xC0) == 0x80) start++;
        }
    }
    if (prev < len && seg(&st, off + prev, off + len, sg->invert)) goto nomem;
    if (seg_flush(&st)) goto nomem;
    return 0;
nomem:
    return err_set(e, MR_ENOMEM, "out of memory in the pre-tokenizer");
}

int tok_pretokenize(tok_worker *w, mr_err *e) {
    const tokenizer *t = w->t;
    w->pa.n = 0;
    if (pieces_push(&w->pa, 0, w->buf_n)) return err_set(e, MR_ENOMEM, "out of memory in the pre-tokenizer");
    for (size_t k = 0; k < t->n_stages; k++) {
        const tok_stage *sg = &t->stages[k];
        w->pb.n = 0;
        for (size_t i = 0; i < w->pa.n; i++) {
            size_t off = w->pa.v[i].off, len = w->pa.v[i].len;
            if (sg->kind == STAGE_BYTELEVEL && sg->add_prefix_space && w->buf[off] != ' ') {
                /* a copy of the piece with a space in front, at the end of the buffer */
                size_t at = w->buf_n;
                if (buf_reserve(w, at + len + 1)) return err_set(e, MR_ENOMEM, "out of memory");
                w->buf[at] = ' ';
                memcpy(w->buf + at + 1, w->buf + off, len);
                w->buf_n += len + 1;
                off = at;
                len++;
            }
            int rc = sg->re ? split_piece(w, sg, off, len, &w->pb, e)
                            : (pieces_push(&w->pb, off, len) ? err_set(e, MR_ENOMEM, "out of memory") : 0);
            if (rc) return rc;
        }
        tok_pieces tmp = w->pa;
        w->pa = w->pb;
        w->pb = tmp;
    }
    return 0;
}

/* Replace every match (or literal occurrence) of n->a/n->re in w->buf with n->b. */
static int norm_replace(tok_worker *w, const tok_norm *n, mr_err *e) {
    size_t cap = w->buf_n + 64, o = 0;
    char *out = mem_alloc(cap);
    if (!out) return err_set(e, MR_ENOMEM, "out of memory in the normalizer");
    size_t i = 0;
    for (;;) {
        size_t ms = w->buf_n, me = w->buf_n;
        if (n->re) {
            int rc = tok_regex_find(n->re, n->jit, w->md, w->buf, w->buf_n, i, &ms, &me);
            if (rc < 0) {
                mem_free(out);
                return err_set(e, MR_EINTERNAL, "%s: normalizer regex failed", w->t->name);
            }
            if (rc == 0) ms = me = w->buf_n;
        } else {
            const char *f = i <= w->buf_n ? memmem(w->buf + i, w->buf_n - i, n->a, n->alen) : NULL;
            if (f) {
                ms = (size_t)(f - w->buf);
                me = ms + n->alen;
            }
        }
        size_t need = o + (ms - i) + n->blen + 1;
        if (need > cap) {
            while (cap < need) cap *= 2;
            char *p = mem_realloc(out, cap);
            if (!p) {
                mem_free(out);
                return err_set(e, MR_ENOMEM, "out of memory in the normalizer");
            }
            out = p;
        }
        memcpy(out + o, w->buf + i, ms - i);
        o += ms - i;
        if (ms >= w->buf_n) break;
        memcpy(out + o, n->b, n->blen);
        o += n->blen;
        i = me > ms ? me : me + 1;
        if (me == ms && ms < w->buf_n) out[o++] = w->buf[ms];
        if (i > w->buf_n) break;
    }
    mem_free(w->buf);
    w->buf = out;
    w->buf_cap = cap;
    w->buf_n = o;
    return 0;
}

int tok_normalize(tok_worker *w, mr_err *e) {
    const tokenizer *t = w->t;
    for (size_t k = 0; k < t->n_norms; k++) {
        const tok_norm *n = &t->norms[k];
        if (n->kind == NORM_PREPEND) {
            if (w->buf_n == 0) continue; /* HF: an empty string stays empty */
            if (buf_reserve(w, w->buf_n + n->alen + 1)) return err_set(e, MR_ENOMEM, "out of memory");
            memmove(w->buf + n->alen, w->buf, w->buf_n);
            memcpy(w->buf, n->a, n->alen);
            w->buf_n += n->alen;
        } else {
            int rc = norm_replace(w, n, e);
            if (rc) return rc;
        }
    }
    return 0;
}
