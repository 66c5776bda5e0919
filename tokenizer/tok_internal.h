/* tok_internal.h: the tokenizer's private structures, shared by load.c (JSON -> struct), pretok.c (normalizer and
 * pre-tokenizer stages), bpe.c (merges, word cache), encode.c (the pipeline, decode) and chat.c.
 * Tokens are stored as RAW BYTES in one arena: a byte-level vocabulary's GPT-2 stand-in characters ("Ġ" for a
 * space) are mapped back to bytes at load time, so BPE runs on the text's bytes and decode is a concatenation. */
#ifndef MOERL_TOK_INTERNAL_H
#define MOERL_TOK_INTERNAL_H

#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>
#include <stddef.h>
#include <stdint.h>

#include "tokenizer/tokenizer.h"

/* ---- byte-string -> id map (open addressing over the arena) ---- */
typedef struct tok_strmap {
    int32_t *slot; /* id or -1 */
    size_t cap;    /* power of two */
    size_t n;
} tok_strmap;

/* ---- (left id, right id) -> (rank, merged id) ---- */
typedef struct tok_merge {
    uint64_t key; /* (left << 32 | right) + 1; 0 = empty slot */
    int32_t rank, id;
} tok_merge;

typedef struct tok_added {
    int32_t id;
    char *text;
    size_t len;
    unsigned char lstrip, rstrip, single_word, normalized, special;
} tok_added;

typedef enum { SPLIT_REMOVED, SPLIT_ISOLATED, SPLIT_MERGED_PREV, SPLIT_MERGED_NEXT, SPLIT_CONTIGUOUS } tok_behavior;

typedef enum { STAGE_SPLIT, STAGE_BYTELEVEL, STAGE_DIGITS, STAGE_WHITESPACE_SPLIT } tok_stage_kind;

typedef struct tok_stage {
    tok_stage_kind kind;
    pcre2_code *re; /* SPLIT, BYTELEVEL with use_regex, DIGITS */
    int jit;
    tok_behavior behavior;
    int invert;
    int add_prefix_space;
} tok_stage;

typedef enum { NORM_PREPEND, NORM_REPLACE } tok_norm_kind;

typedef struct tok_norm {
    tok_norm_kind kind;
    char *a, *b; /* PREPEND: a; REPLACE: literal pattern a (when re is NULL) -> b */
    size_t alen, blen;
    pcre2_code *re;
    int jit;
} tok_norm;

struct tokenizer {
    char *name; /* file name used in messages */
    int32_t n_ids;
    uint32_t *off, *len; /* per id into arena; len == UINT32_MAX: undefined id */
    char *arena;
    size_t arena_n, arena_cap;
    tok_strmap vocab; /* model vocabulary bytes -> id */
    tok_merge *merges;
    size_t merge_cap;
    int32_t byte_id[256]; /* byte-level: the id of each single byte; -1 when absent */
    int32_t fallback_id[256]; /* byte_fallback: the id of <0xXX>; -1 when absent */
    int byte_level, byte_fallback, ignore_merges;
    int32_t unk_id;
    tok_added *added;
    size_t n_added;
    size_t added_start[257]; /* added[] sorted by (first byte, length desc); bucket b = [start[b], start[b+1]) */
    unsigned char *special;  /* per id */
    tok_norm *norms;
    size_t n_norms;
    tok_stage *stages;
    size_t n_stages;
    int dec_replace; /* decoder Replace: dec_from -> dec_to (sentencepiece "▁" -> " ") */
    char *dec_from, *dec_to;
    int dec_byte_fallback;
    int32_t bos, eos, pad;
    int add_bos, add_eos;
    tok_worker *own; /* for tok_encode */
};

/* ---- a piece of text under pre-tokenization: [off, off+len) of the worker's text buffer ---- */
typedef struct tok_piece {
    size_t off, len;
} tok_piece;

typedef struct tok_pieces {
    tok_piece *v;
    size_t n, cap;
} tok_pieces;

/* word cache entry: bytes in the worker's cache arena -> ids in the cache id arena */
typedef struct tok_cache_ent {
    uint64_t hash;
    uint32_t boff, blen, ioff, ilen; /* blen == 0: empty slot */
} tok_cache_ent;

typedef struct tok_bpe_sym {
    int32_t id;
    int32_t prev, next; /* -1 at the ends */
    int32_t alive;
} tok_bpe_sym;

typedef struct tok_heap_ent {
    int32_t rank, pos, left, right;
} tok_heap_ent;

struct tok_worker {
    const tokenizer *t;
    pcre2_match_data *md;
    char *buf; /* normalized text of the current segment, plus prefix-space copies */
    size_t buf_n, buf_cap;
    tok_pieces pa, pb;
    tok_cache_ent *cache;
    size_t cache_cap, cache_n;
    char *cbytes;
    size_t cbytes_n, cbytes_cap;
    int32_t *cids;
    size_t cids_n, cids_cap;
    tok_bpe_sym *sym;
    size_t sym_cap;
    tok_heap_ent *heap;
    size_t heap_cap;
};

/* strmap over the tokenizer's arena */
uint64_t tok_hash(const void *p, size_t n);
int tok_strmap_put(tokenizer *t, tok_strmap *m, int32_t id, mr_err *e);
int32_t tok_strmap_get(const tokenizer *t, const tok_strmap *m, const char *s, size_t n);
void tok_strmap_free(tok_strmap *m);

/* merges (bpe.c) */
int tok_merge_add(tokenizer *t, int32_t left, int32_t right, int32_t rank, int32_t id, mr_err *e);
const tok_merge *tok_merge_get(const tokenizer *t, int32_t left, int32_t right);
/* BPE of one pre-token's bytes, ids appended to out (through the worker's word cache) */
int tok_bpe_word(tok_worker *w, const char *s, size_t n, tok_ids *out, mr_err *e);

/* regex (pretok.c): compile with UTF + UCP + MATCH_INVALID_UTF, JIT when available */
int tok_regex_compile(const char *pattern, size_t len, int literal, pcre2_code **re, int *jit, char *why,
                      size_t why_cap);
/* one match of re in s[0..n) from start; returns 1 with [*ms, *me), 0 when none, <0 on a matcher error */
int tok_regex_find(pcre2_code *re, int jit, pcre2_match_data *md, const char *s, size_t n, size_t start,
                   size_t *ms, size_t *me);
/* normalizer over w->buf (in place, may grow), then the pre-tokenizer stages -> w->pa */
int tok_normalize(tok_worker *w, mr_err *e);
/* copies a segment into w->buf; -1 when out of memory */
int tok_worker_set_text(tok_worker *w, const char *s, size_t n);
int tok_pretokenize(tok_worker *w, mr_err *e);

#endif
