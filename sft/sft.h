/* sft.h: `moerl sft RECIPE`: the whole supervised fine-tuning job from a recipe — data (file or generator),
 * tokenizer (path or trained), model (preset, config or checkpoint), the training loop (sft/trainer.h), eval
 * (held-out loss and greedy exact match), the run store and checkpoints. */
#ifndef MOERL_SFT_SFT_H
#define MOERL_SFT_SFT_H

#include "core/err.h"
#include "core/recipe.h"

/* Runs the SFT job of a resolved recipe. resume continues from the newest checkpoint in run.out_dir. */
int sft_run(const recipe *r, int resume, mr_err *e);

/* The final answer of a completion for exact-match eval: the text after the last "####", else inside the last
 * \boxed{...}, else the last integer or decimal number; trimmed. Writes "" when there is none. */
void sft_extract_answer(const char *text, char *out, size_t cap);

#endif
