/* bpe_train.h: a byte-level BPE trainer (`moerl tokenizer train`) that writes a Hugging Face tokenizer.json with
 * DeepSeek-V3's pre-tokenizer (MODEL-SPEC §11), so a small model trained here splits text the way DeepSeek-V3
 * does, and tokenizer/tokenizer.h (or HF tokenizers / transformers.js) loads the result.
 *
 * The idea (HF tokenizers' BpeTrainer): count the unique pre-tokens ("words") of the corpus once, then learn
 * merges on the word table with incrementally updated pair counts and a lazy max-heap, never recounting.
 *
 * Rules a caller can rely on:
 *   - Each line of a text (with its '\n') is pre-tokenized on its own, as HF's train_from_files does; added
 *     tokens (the specials) are cut out of the raw text first, so their bytes never feed merges.
 *   - The next merge is the pair with the highest count over all words (count x word frequency); ties go to the
 *     pair whose LEFT part's bytes are lexicographically smallest (memcmp order, a proper prefix first), then the
 *     pair whose RIGHT part's bytes are. A pair counted fewer than min_frequency times is never merged. Training
 *     stops at vocab_size ids or when no pair is left: the vocabulary may end smaller than asked.
 *   - Ids: the added tokens 0..n-1 in their order (BOS 0, EOS 1 by default), then the 256 bytes ordered by
 *     their GPT-2 stand-in code point (as HF's trainer orders the ByteLevel alphabet: "!" first), then one id per
 *     new merged string in merge order (two merges that build the same string share its id, as in HF).
 *   - The output depends only on the input text and the options: not on the thread count (word counts are
 *     exact sums) or on the feeding order of identical texts. */
#ifndef MOERL_BPE_TRAIN_H
#define MOERL_BPE_TRAIN_H

#include <stddef.h>
#include <stdint.h>

#include "core/err.h"

#ifdef __cplusplus
extern "C" {
#endif

/* An added token: matched on the raw text before pre-tokenization. special = 1: skipped by decode with
 * skip_special (BOS, EOS); 0: kept, like DeepSeek's own <｜User｜>/<｜Assistant｜> and R1's <think>/</think>. */
typedef struct bpe_added {
    const char *text;
    int special;
} bpe_added;

/* The defaults: <｜begin▁of▁sentence｜> (BOS, special), <｜end▁of▁sentence｜> (EOS and pad, special),
 * <｜User｜>, <｜Assistant｜>, <think>, </think> (not special). */
extern const bpe_added bpe_default_added[];
extern const size_t bpe_n_default_added;

typedef struct bpe_train_opts {
    int32_t vocab_size;       /* all ids: added tokens + 256 bytes + merged strings */
    int64_t min_frequency;    /* pairs counted fewer times are never merged; < 1 means 1 (CLI default 2) */
    const bpe_added *added;   /* NULL: bpe_default_added. added[0] is BOS, added[1] EOS (and pad) */
    size_t n_added;           /* must be >= 2 when added is given */
    int32_t model_max_length; /* tokenizer_config.json; <= 0: 16384 */
    int threads;              /* word counting threads; <= 0: all cores */
    int split_digits;         /* every digit its own pre-token (\\p{N}) instead of DeepSeek-V3's runs of up to 3:
                               * numbers stay digit by digit, which small models need to learn arithmetic */
} bpe_train_opts;

typedef enum { BPE_TEXT = 0, BPE_JSONL = 1 } bpe_format;

typedef struct bpe_trainer bpe_trainer;

/* Checks the options (vocab_size >= 256 + n_added, added tokens non-empty and distinct) and starts an empty
 * word table. */
int bpe_train_new(bpe_trainer **out, const bpe_train_opts *o, mr_err *e);
void bpe_train_free(bpe_trainer *t); /* accepts NULL and a half-built trainer */

/* Counts the words of len bytes of text (any bytes; invalid UTF-8 is counted byte-wise). Callable many times,
 * before bpe_train_fit. */
int bpe_train_feed(bpe_trainer *t, const char *text, size_t len, mr_err *e);
/* The same for a file. BPE_JSONL: one JSON object per line; the strings "text", "prompt", "completion" and
 * messages[].content of each row are the texts (a row that is not JSON is an error naming path:line). */
int bpe_train_feed_file(bpe_trainer *t, const char *path, bpe_format fmt, mr_err *e);

/* Learns the merges. Call once, after feeding. */
int bpe_train_fit(bpe_trainer *t, mr_err *e);

/* Facts for reports and tests. */
typedef struct bpe_train_stats {
    uint64_t bytes;       /* text bytes fed (added tokens included) */
    uint64_t words;       /* pre-tokens counted */
    size_t unique_words;  /* distinct pre-tokens */
    size_t merges;        /* merges learned */
    int32_t vocab;        /* ids in the written vocabulary */
} bpe_train_stats;
void bpe_train_get_stats(const bpe_trainer *t, bpe_train_stats *s);

/* Merge i (0-based, in learning order) as the raw bytes of its two parts; 0, or -1 when i is out of range. */
int bpe_train_merge(const bpe_trainer *t, size_t i, const char **left, size_t *left_len, const char **right,
                    size_t *right_len);
/* The count of a word (a pre-token, raw bytes) in the corpus; 0 when absent. */
int64_t bpe_train_word_count(const bpe_trainer *t, const char *word, size_t len);

/* The two files' text (mem_alloc'd, NUL-terminated). */
int bpe_train_json(const bpe_trainer *t, char **tokenizer_json, char **config_json, mr_err *e);
/* Writes DIR/tokenizer.json and DIR/tokenizer_config.json atomically (temp file + rename each), creating DIR
 * (and its parents) when missing. */
int bpe_train_write(const bpe_trainer *t, const char *dir, mr_err *e);

#ifdef __cplusplus
}
#endif

#endif
