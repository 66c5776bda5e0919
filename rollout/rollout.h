/* rollout.h: the rollout engine. Generates G completions for each of a batch of prompts on MLA's latent KV cache
 * (per token and layer: the normalized latent c_kv and the rotated RoPE key only), decoding in the absorbed form.
 *
 *     rollout_opts o = rollout_opts_default();  o.temperature = 1; o.max_new_tokens = 96; o.seed = 7; ...
 *     rollout_seq *out = mem_calloc(n_prompts * G, sizeof *out);
 *     rollout_generate(m, tok, prompts, plen, prompt_ids, n_prompts, G, &o, out, &e);
 *     ... out[p * G + g] is sample g of prompt p ...
 *     for (i ...) rollout_seq_free(&out[i]);
 *
 * Each prompt is prefilled once and its cache shared by its G samples; decode runs batched over every live
 * sequence; sequences leave the batch on EOS, a stop string or max_new_tokens, and their cache memory is reused.
 *
 * Randomness: sample g of the prompt with id prompt_ids[p] draws its uniforms from Philox keyed by
 * (o->seed, prompt_ids[p], g, token index) only: the result never depends on which other prompts share the batch,
 * on G's neighbours, or on the thread count.
 *
 * Exactness (MM_DET, the CPU default): logp[] equals, bit for bit, what logprob_forward gives on the logits of a
 * model_forward (train = 0) over prompt ⧺ completion with the same model: the trainer's old log-probs can be taken
 * from the rollout.
 *
 * Owns: the sequences' arrays (freed by rollout_seq_free). Borrows: the model (its activation arena is used;
 * T_max bounds the batched decode), the tokenizer (stop strings; may be NULL when there are none). */
#ifndef MOERL_ROLLOUT_ROLLOUT_H
#define MOERL_ROLLOUT_ROLLOUT_H

#include <stdint.h>

#include "core/err.h"
#include "model/model.h"
#include "tokenizer/tokenizer.h"

typedef struct rollout_opts {
    float temperature;    /* 0 = greedy (argmax, lower id wins ties) */
    float top_p;          /* 1 = off */
    int top_k;            /* 0 = off */
    float min_p;          /* 0 = off */
    int max_new_tokens;
    const char *const *stop; /* n_stop strings ending a completion (kept in the completion), or NULL */
    int n_stop;
    int32_t eos;          /* ends a completion (included as its last token); -1 = none */
    uint64_t seed;
    int record_experts;   /* fill rollout_seq.experts (routing replay) */
    /* Draft one token with MTP module 1 and verify it with the main model in the next decode step (both positions
     * in one step); accept with min(1, p/q), else resample from norm(max(0, p − q)) (Leviathan et al. 2023,
     * Chen et al. 2023): the same distribution as plain decoding, the same tokens when greedy, and logp[] still
     * the main model's. Needs num_nextn_predict_layers >= 1. */
    int mtp_speculative;
    struct rollout_stats *stats; /* optional: counters of this call (filled in, not accumulated) */
    /* Optional: called after each generated token, from the calling thread, in a fixed order (streaming output).
     * seq = p·G + g. */
    void (*on_token)(void *ctx, int seq, int32_t token);
    void *on_token_ctx;
} rollout_opts;

rollout_opts rollout_opts_default(void);

typedef struct rollout_stats {
    int64_t decode_steps;  /* model forwards of the decode loop (prefills not counted) */
    int64_t decode_rows;   /* rows they carried */
    int64_t tokens;        /* tokens generated */
    int64_t drafted;       /* MTP drafts verified */
    int64_t accepted;      /* of which accepted */
} rollout_stats;

typedef enum { ROLLOUT_EOS = 0, ROLLOUT_STOP = 1, ROLLOUT_LENGTH = 2 } rollout_finish;

typedef struct rollout_seq {
    int32_t *tokens;      /* (n) generated ids, EOS included when it ended the sequence */
    float *logp_sampler;  /* (n) log-prob the sampler used (after temperature and truncation) */
    float *logp;          /* (n) log-prob at temperature 1 under the full distribution */
    /* (n, n_moe_layers, K) experts chosen per MoE layer of the main model (layers ascending), or NULL. Entry i is
     * the routing of the row whose logits gave token i: the row at position plen - 1 + i of prompt ⧺ completion
     * (the prompt's last token for i = 0, completion token i - 1 after that), slots in moe_forward's order: what a
     * trainer passes as model_batch.replay for those rows. */
    int32_t *experts;
    int n;
    int n_moe_layers, K;
    rollout_finish finish;
    int truncated;        /* finish == ROLLOUT_LENGTH */
} rollout_seq;

/* Generates G samples for each prompt: out[p * G + g] (caller-provided, zeroed, n_prompts·G entries). prompt_ids
 * are stable identifiers of the prompts (e.g. their dataset index) used only to key the randomness. On error
 * every out[] is left freeable. */
int rollout_generate(model *m, const tokenizer *tok, const int32_t *const *prompts, const int *plen,
                     const int64_t *prompt_ids, int n_prompts, int G, const rollout_opts *o, rollout_seq *out,
                     mr_err *e);

void rollout_seq_free(rollout_seq *s); /* accepts a zeroed or freed sequence */

/* ---- The sampler, one logits row at a time (exposed for tests and other engines) ----
 * The distribution it draws from, over the V ids of one logits row z:
 *   greedy (temperature 0): all mass on argmax z (lower id wins ties);
 *   else x = z / temperature (double), e_v = exp(x_v − max x);
 *   top-k: keep the k largest e (ties: lower id first); top-p: walking the kept ids by (e descending, id
 *   ascending), keep an id while the mass before it is < top_p of the kept total (the first id always stays);
 *   min-p: keep e_v >= min_p (that is p_v >= min_p · p_max); then p_v = e_v / Σ kept e (summed in a fixed order).
 * A draw with u ∈ [0, 1) takes the first id v (ascending) whose cumulative p exceeds u. */
typedef struct rollout_cand {
    double e;
    int32_t id;
} rollout_cand;

/* probs (V) receives the sampler's distribution of the logits row; work: 2V entries of scratch. Returns the number
 * of ids with p > 0. */
int rollout_sampler_probs(double *probs, const float *logits, int V, const rollout_opts *o, rollout_cand *work);
/* The id drawn by u from probs, and its log-probability under them (0 for greedy). */
int32_t rollout_sample_row(const double *probs, int V, double u, float *logp_sampler);
/* The uniform that token index i of sample g of the prompt with id prompt_id draws: Philox block i of the stream
 * rng_stream_id(ROLLOUT_RNG_PURPOSE, prompt_id, g) under seed, 53 bits. */
#define ROLLOUT_RNG_PURPOSE 0x524f4c4cu /* "ROLL" */
double rollout_uniform(uint64_t seed, int64_t prompt_id, int g, int i);
/* Speculative decoding's two uniforms for the draft at token index i (u[0] draws the draft, u[1] the acceptance
 * test): Philox block i of rng_stream_id(ROLLOUT_SPEC_PURPOSE, prompt_id, g), 53 bits each. */
#define ROLLOUT_SPEC_PURPOSE 0x53504543u /* "SPEC" */
void rollout_spec_uniforms(uint64_t seed, int64_t prompt_id, int g, int i, double u[2]);

#endif
