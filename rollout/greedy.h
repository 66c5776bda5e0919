/* greedy.h: plain greedy generation by recomputing the forward over every live sequence (packed as separate
 * documents of one batch). Simple and exact, O(length²) per sequence: used for SFT's eval/exact_match. The
 * rollout engine (latent KV cache, sampling, groups) replaces it for GRPO. */
#ifndef MOERL_ROLLOUT_GREEDY_H
#define MOERL_ROLLOUT_GREEDY_H

#include <stdint.h>

#include "core/err.h"
#include "model/model.h"

/* For each of the n prompts, appends up to max_new tokens (argmax, lower id wins ties) until eos. out[i] is a
 * mem_alloc'd array of out_len[i] generated ids (eos excluded). Sequences are batched so that each forward
 * holds at most m->T_max tokens; a prompt longer than T_max - max_new is an error. */
int greedy_generate(model *m, const int32_t *const *prompts, const int *plen, int n, int max_new, int32_t eos,
                    int32_t **out, int *out_len, mr_err *e);

#endif
