/* data_setup.h: an SFT job's data: rows from a JSONL file or a generator, the tokenizer (a path, or trained on
 * the rendered training text into OUT/tokenizer), and the rows rendered (template or chat format) and encoded
 * into examples with their prompt length, plus the held-out split with its answers. */
#ifndef MOERL_SFT_DATA_SETUP_H
#define MOERL_SFT_DATA_SETUP_H

#include <cjson/cJSON.h>
#include <stddef.h>

#include "core/err.h"
#include "core/recipe.h"
#include "sft/trainer.h"
#include "tokenizer/tokenizer.h"

typedef struct sft_data {
    tokenizer *tok;
    char tok_dir[4096];
    sft_example *train, *eval;
    size_t n_train, n_eval;
    char **eval_answer; /* (n_eval) the row's "answer" field, or NULL */
} sft_data;

int sft_data_setup(sft_data *d, const recipe *r, int resume, mr_err *e);
void sft_data_free(sft_data *d);

/* One row {prompt, completion} or {messages: [...]} rendered and encoded: ids = [BOS] prompt completion EOS.
 * tmpl (may be NULL: the DeepSeek-V3 chat format) with {prompt}. src/line name the row in errors. */
int sft_encode_row(tokenizer *tok, const char *tmpl, const cJSON *row, const char *src, int line, sft_example *x,
                   mr_err *e);

/* RL prompts (GRPO): the recipe's rows, split into train and held-out sides as sft_data_setup splits them, each
 * prompt rendered and encoded exactly as sft_encode_row renders it (ids = [BOS] prompt, no completion), its text
 * decoded back (what the reward plugins see as the prompt) and the whole dataset row kept for the rewards. */
typedef struct rl_prompt {
    int32_t *ids;  /* (n) */
    int n;
    char *text;    /* the rendered prompt */
    cJSON *row;    /* the dataset row (answer, tests, ...) */
} rl_prompt;

typedef struct rl_data {
    tokenizer *tok;
    char tok_dir[4096];
    rl_prompt *train, *eval;
    size_t n_train, n_eval;
} rl_data;

/* tok_dir: the tokenizer to use (e.g. the SFT checkpoint's), or NULL for the recipe's (as sft_data_setup). */
int rl_data_setup(rl_data *d, const recipe *r, const char *tok_dir, int resume, mr_err *e);
void rl_data_free(rl_data *d); /* accepts a zeroed or half-built struct */

#endif
