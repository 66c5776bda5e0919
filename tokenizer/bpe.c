/* bpe.c: the BPE model: the token-bytes -> id map, the (left id, right id) -> (rank, merged id) map, and the
 * merge loop of one pre-token with a word cache.
 * The merge rule (HF tokenizers' BPE::merge_word): repeatedly merge the adjacent pair of lowest rank, the leftmost
 * one among equals. Short words scan the symbol list (cheaper than a heap below a few dozen symbols); long words
 * use a binary heap of candidate pairs with lazy invalidation (O(n log n)). Both give the same merges. */
#include <string.h>

#include "core/mem.h"
#include "tokenizer/tok_internal.h"

/* FNV-1a, 64-bit, 8 bytes at a time where it can */
uint64_t tok_hash(const void *p, size_t n) {
    const unsigned char *s = p;
    uint64_t h = 1469598103934665603ULL;
    while (n >= 8) {
        uint64_t v;
        memcpy(&v, s, 8);
        h = (h ^ v) * 1099511628211ULL;
        h ^= h >> 29;
        s += 8;
        n -= 8;
    }
    while (n--) h = (h ^ *s++) * 1099511628211ULL;
    h ^= h >> 32;
    return h;
}

int tok_strmap_put(tokenizer *t, tok_strmap *m, int32_t id, mr_err *e) {
    if ((m->n + 1) * 2 > m->cap) { /* grow: rehash every id */
        size_t cap = m->cap ? m->cap * 2 : 1024;
        int32_t *s = mem_alloc(cap * sizeof *s);
        if (!s) return err_set(e, MR_ENOMEM, "%s: out of memory for the vocabulary map", t->name);
        memset(s, 0xff, cap * sizeof *s);
        for (size_t i = 0; i < m->cap; i++) {
            int32_t x = m->slot[i];
            if (x < 0) continue;
            size_t h = (size_t)tok_hash(t->arena + t->off[x], t->len[x]) & (cap - 1);
            while (s[h] >= 0) h = (h + 1) & (cap - 1);
            s[h] = x;
        }
        mem_free(m->slot);
        m->slot = s;
        m->cap = cap;
    }
    const char *str = t->arena + t->off[id];
    size_t n = t->len[id];
    size_t h = (size_t)tok_hash(str, n) & (m->cap - 1);
    for (;;) {
        int32_t x = m->slot[h];
        if (x < 0) break;
        if (t->len[x] == n && !memcmp(t->arena + t->off[x], str, n)) return 0; /* first id wins */
        h = (h + 1) & (m->cap - 1);
    }
    m->slot[h] = id;
    m->n++;
    return 0;
}

int32_t tok_strmap_get(const tokenizer *t, const tok_strmap *m, const char *s, size_t n) {
    if (!m->cap) return -1;
    size_t h = (size_t)tok_hash(s, n) & (m->cap - 1);
    for (;;) {
        int32_t x = m->slot[h];
        if (x < 0) return -1;
        if (t->len[x] == n && !memcmp(t->arena + t->off[x], s, n)) return x;
        h = (h + 1) & (m->cap - 1);
    }
}

void tok_strmap_free(tok_strmap *m) {
    mem_free(m->slot);
    m->slot = NULL;
    m->cap = m->n = 0;
}

static inline size_t merge_slot(uint64_t key, size_t cap) {
    key ^= key >> 33;
    key *= 0xff51afd7ed558ccdULL;
    key ^= key >> 33;
    return (size_t)key & (cap - 1);
}

int tok_merge_add(tokenizer *t, int32_t left, int32_t right, int32_t rank, int32_t id, mr_err *e) {
    (void)e;
    uint64_t key = (((uint64_t)(uint32_t)left << 32) | (uint32_t)right) + 1;
    size_t h = merge_slot(key, t->merge_cap);
    while (t->merges[h].key) h = (h + 1) & (t->merge_cap - 1);
    t->merges[h].key = key;
    t->merges[h].rank = rank;
    t->merges[h].id = id;
    return 0;
}

const tok_merge *tok_merge_get(const tokenizer *t, int32_t left, int32_t right) {
    if (!t->merge_cap) return NULL;
    uint64_t key = (((uint64_t)(uint32_t)left << 32) | (uint32_t)right) + 1;
    size_t h = merge_slot(key, t->merge_cap);
    for (;;) {
        const tok_merge *m = &t->merges[h];
        if (m->key == key) return m;
        if (!m->key) return NULL;
        h = (h + 1) & (t->merge_cap - 1);
    }
}

/* ---- the merge loop ---- */

static int grow(void **p, size_t *cap, size_t need, size_t elem) {
    if (need <= *cap) return 0;
    size_t c = *cap ? *cap : 64;
    while (c < need) c *= 2;
    void *q = mem_realloc(*p, c * elem);
    if (!q) return -1;
    *p = q;
    *cap = c;
    return 0;
}

/* Initial symbols of a word: one per byte (byte-level), else one per UTF-8 character with byte fallback or
 * unk for characters outside the vocabulary. Returns the count, or -1 (unencodable, message in e). */
static long init_symbols(tok_worker *w, const char *s, size_t n, mr_err *e) {
    const tokenizer *t = w->t;
    if (grow((void **)&w->sym, &w->sym_cap, n + 1, sizeof *w->sym)) {
        err_set(e, MR_ENOMEM, "out of memory in BPE");
        return -1;
    }
    long k = 0;
    if (t->byte_level) {
        for (size_t i = 0; i < n; i++) w->sym[k++].id = t->byte_id[(unsigned char)s[i]];
    } else {
        size_t i = 0;
        while (i < n) {
            unsigned c = (unsigned char)s[i];
            size_t cl = c < 0x80 ? 1 : c >= 0xF0 ? 4 : c >= 0xE0 ? 3 : c >= 0xC0 ? 2 : 1;
            if (i + cl > n) cl = 1;
            int32_t id = tok_strmap_get(t, &t->vocab, s + i, cl);
            if (id >= 0) {
                w->sym[k++].id = id;
            } else if (t->byte_fallback) {
                for (size_t j = 0; j < cl; j++) {
                    int32_t f = t->fallback_id[(unsigned char)s[i + j]];
                    if (f < 0) f = t->unk_id;
                    if (f < 0) {
                        err_set(e, MR_EINVAL, "%s: byte 0x%02X has no <0x%02X> token and there is no unk_token",
                                t->name, (unsigned char)s[i + j], (unsigned char)s[i + j]);
                        return -1;
                    }
                    w->sym[k++].id = f;
                }
            } else if (t->unk_id >= 0) {
                if (!(k > 0 && w->sym[k - 1].id == t->unk_id)) w->sym[k++].id = t->unk_id; /* fuse unknowns */
            } else {
                err_set(e, MR_EINVAL, "%s: the text holds \"%.*s\", which is not in the vocabulary and there is no "
                        "unk_token or byte fallback", t->name, (int)cl, s + i);
                return -1;
            }
            i += cl;
        }
    }
    for (long i = 0; i < k; i++) {
        w->sym[i].prev = (int32_t)i - 1;
        w->sym[i].next = i + 1 < k ? (int32_t)i + 1 : -1;
        w->sym[i].alive = 1;
    }
    return k;
}

static void merge_scan(tok_worker *w, long k) {
    const tokenizer *t = w->t;
    tok_bpe_sym *sym = w->sym;
    for (;;) {
        int32_t best_rank = INT32_MAX, best = -1, best_id = -1;
        for (int32_t i = 0; i >= 0 && sym[i].next >= 0; i = sym[i].next) {
            const tok_merge *m = tok_merge_get(t, sym[i].id, sym[sym[i].next].id);
            if (m && m->rank < best_rank) {
                best_rank = m->rank;
                best = i;
                best_id = m->id;
            }
        }
        if (best < 0) break;
        int32_t r = sym[best].next;
        sym[best].id = best_id;
        sym[best].next = sym[r].next;
        if (sym[r].next >= 0) sym[sym[r].next].prev = best;
        sym[r].alive = 0;
    }
    (void)k;
}

static inline int heap_less(const tok_heap_ent *a, const tok_heap_ent *b) {
    return a->rank < b->rank || (a->rank == b->rank && a->pos < b->pos);
}

static int heap_push(tok_worker *w, size_t *n, tok_heap_ent x) {
    if (grow((void **)&w->heap, &w->heap_cap, *n + 1, sizeof *w->heap)) return -1;
    size_t i = (*n)++;
    while (i > 0) {
        size_t p = (i - 1) / 2;
        if (!heap_less(&x, &w->heap[p])) break;
        w->heap[i] = w->heap[p];
        i = p;
    }
    w->heap[i] = x;
    return 0;
}

static tok_heap_ent heap_pop(tok_worker *w, size_t *n) {
    tok_heap_ent top = w->heap[0], x = w->heap[--(*n)];
    size_t i = 0;
    for (;;) {
        size_t c = 2 * i + 1;
        if (c >= *n) break;
        if (c + 1 < *n && heap_less(&w->heap[c + 1], &w->heap[c])) c++;
        if (!heap_less(&w->heap[c], &x)) break;
        w->heap[i] = w->heap[c];
        i = c;
    }
    if (*n) w->heap[i] = x;
    return top;
}

static int push_pair(tok_worker *w, size_t *hn, int32_t i) {
    tok_bpe_sym *sym = w->sym;
    if (i < 0 || sym[i].next < 0) return 0;
    const tok_merge *m = tok_merge_get(w->t, sym[i].id, sym[sym[i].next].id);
    if (!m) return 0;
    tok_heap_ent x = {m->rank, i, sym[i].id, sym[sym[i].next].id};
    return heap_push(w, hn, x);
}

static int merge_heap(tok_worker *w, long k, mr_err *e) {
    size_t hn = 0;
    for (int32_t i = 0; i + 1 < k; i++)
        if (push_pair(w, &hn, i)) return err_set(e, MR_ENOMEM, "out of memory in BPE");
    tok_bpe_sym *sym = w->sym;
    while (hn) {
        tok_heap_ent x = heap_pop(w, &hn);
        int32_t i = x.pos;
        /* stale entry: the left symbol was merged away or changed, or its right neighbour changed */
        if (!sym[i].alive || sym[i].id != x.left || sym[i].next < 0 || sym[sym[i].next].id != x.right) continue;
        const tok_merge *m = tok_merge_get(w->t, x.left, x.right);
        int32_t r = sym[i].next;
        sym[i].id = m->id;
        sym[i].next = sym[r].next;
        if (sym[r].next >= 0) sym[sym[r].next].prev = i;
        sym[r].alive = 0;
        if (push_pair(w, &hn, sym[i].prev) || push_pair(w, &hn, i))
            return err_set(e, MR_ENOMEM, "out of memory in BPE");
    }
    return 0;
}

/* ---- word cache (per worker; cleared when full) ---- */
enum { CACHE_MAX_WORD = 64, CACHE_SLOTS = 1 << 16 };

static tok_cache_ent *cache_find(tok_worker *w, const char *s, size_t n, uint64_t h) {
    size_t i = (size_t)h & (w->cache_cap - 1);
    for (;;) {
        tok_cache_ent *c = &w->cache[i];
        if (!c->blen) return c;
        if (c->hash == h && c->blen == n && !memcmp(w->cbytes + c->boff, s, n)) return c;
        i = (i + 1) & (w->cache_cap - 1);
    }
}

static void cache_store(tok_worker *w, const char *s, size_t n, uint64_t h, const int32_t *ids, size_t k) {
    if (!w->cache) {
        w->cache = mem_calloc(CACHE_SLOTS, sizeof *w->cache);
        if (!w->cache) return; /* the cache is an optimization: no cache, no error */
        w->cache_cap = CACHE_SLOTS;
    }
    if (w->cache_n * 2 >= w->cache_cap) {
        memset(w->cache, 0, w->cache_cap * sizeof *w->cache);
        w->cache_n = w->cbytes_n = w->cids_n = 0;
    }
    if (grow((void **)&w->cbytes, &w->cbytes_cap, w->cbytes_n + n, 1) ||
        grow((void **)&w->cids, &w->cids_cap, w->cids_n + k, sizeof *w->cids))
        return;
    tok_cache_ent *c = cache_find(w, s, n, h);
    if (c->blen) return;
    memcpy(w->cbytes + w->cbytes_n, s, n);
    memcpy(w->cids + w->cids_n, ids, k * sizeof *ids);
    c->hash = h;
    c->boff = (uint32_t)w->cbytes_n;
    c->blen = (uint32_t)n;
    c->ioff = (uint32_t)w->cids_n;
    c->ilen = (uint32_t)k;
    w->cbytes_n += n;
    w->cids_n += k;
    w->cache_n++;
}

int tok_bpe_word(tok_worker *w, const char *s, size_t n, tok_ids *out, mr_err *e) {
    const tokenizer *t = w->t;
    if (n == 0) return 0;
    uint64_t h = 0;
    int cacheable = n <= CACHE_MAX_WORD;
    if (cacheable && w->cache) {
        h = tok_hash(s, n);
        tok_cache_ent *c = cache_find(w, s, n, h);
        if (c->blen) {
            for (uint32_t i = 0; i < c->ilen; i++)
                if (tok_ids_push(out, w->cids[c->ioff + i])) return err_set(e, MR_ENOMEM, "out of memory");
            return 0;
        }
    } else if (cacheable) {
        h = tok_hash(s, n);
    }
    size_t start = out->n;
    if (t->ignore_merges) {
        int32_t id = tok_strmap_get(t, &t->vocab, s, n);
        if (id >= 0) return tok_ids_push(out, id) ? err_set(e, MR_ENOMEM, "out of memory") : 0;
    }
    long k = init_symbols(w, s, n, e);
    if (k < 0) return e ? e->code : MR_EINVAL;
    if (k > 48) {
        int rc = merge_heap(w, k, e);
        if (rc) return rc;
    } else {
        merge_scan(w, k);
    }
    for (int32_t i = 0; i >= 0 && k > 0; i = w->sym[i].next)
        if (tok_ids_push(out, w->sym[i].id)) return err_set(e, MR_ENOMEM, "out of memory");
    if (cacheable) cache_store(w, s, n, h, out->v + start, out->n - start);
    return 0;
}
