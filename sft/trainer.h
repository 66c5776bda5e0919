/* trainer.h: the SFT optimization loop over tokenized examples: packing, micro-batches, AdamW, schedule,
 * clipping, the MoE bias update, NaN skipping, metrics, checkpoints and exact resume.
 *
 * The one idea: everything a step does is a function of (seed, step, data cursor, weights, optimizer state),
 * and all of those are in the checkpoint, so a resumed run continues bit-exactly on the CPU. The epoch order is a
 * Philox permutation of (seed, epoch); a step takes the next batch_seqs examples of that order, in grad_accum
 * micro-batches, and its loss is one token mean over the whole step. */
#ifndef MOERL_SFT_TRAINER_H
#define MOERL_SFT_TRAINER_H

#include <stddef.h>
#include <stdint.h>

#include "core/err.h"
#include "core/runstore.h"
#include "model/model.h"
#include "sft/optim.h"
#include "sft/schedule.h"

typedef struct sft_example {
    int32_t *ids;  /* (n) prompt then completion (the completion ends with EOS) */
    int n;
    int n_prompt;  /* ids[0 .. n_prompt) are the prompt: no loss there unless loss_all */
} sft_example;

typedef struct sft_micro {
    int32_t *ids, *pos, *doc, *tgt; /* (T) */
    int T, cap;
    int64_t n_loss;                 /* rows with a target */
} sft_micro;

/* Lays examples ex[order[i]] for i in [from, from + count) end to end (packing) or each padded to max_seq_len
 * (pad tokens are separate one-token documents without loss). Examples longer than max_seq_len are cut. */
int sft_pack(sft_micro *mb, const sft_example *ex, const size_t *order, size_t from, size_t count, int max_seq_len,
             int packing, int loss_all, int32_t pad_id, mr_err *e);
void sft_micro_free(sft_micro *mb);

typedef struct sft_cfg {
    uint64_t seed;
    int64_t steps;          /* optimizer steps of the run */
    int batch_seqs;         /* examples per optimizer step */
    int grad_accum;         /* micro-batches per step (divides batch_seqs) */
    int max_seq_len;
    int packing, loss_all;
    int32_t pad_id;
    float mtp_weight, balance_alpha, bias_gamma;
    adamw_cfg adam;
    sched_cfg sched;
    double grad_clip;       /* 0 = off */
    int64_t checkpoint_every; /* 0 = only at the end */
    int keep_checkpoints;
    int64_t eval_every;     /* 0 = only at the end */
    int max_bad_steps;      /* non-finite steps in a row that stop the run */
    const char *out_dir;    /* checkpoints go to out_dir/step-N */
    const char *tokenizer_dir; /* copied into each checkpoint (may be NULL) */
    int64_t stop_after;     /* testing: return after this many steps of this invocation (0 = run to the end) */
} sft_cfg;

typedef struct sft_hooks {
    runstore *rs;           /* metrics go here when non-NULL */
    int64_t run_id;
    int progress;           /* show a progress line on stderr */
    /* Called every eval_every steps and at the end; logs its own metrics. May be NULL. */
    int (*eval)(void *ud, model *m, int64_t step, mr_err *e);
    void *ud;
    /* Written with each checkpoint's trainer state, read back on resume (e.g. the run id). */
    int64_t *run_id_io;
} sft_hooks;

typedef struct sft_result {
    int64_t steps_done, skipped;
    double last_loss;       /* token-mean loss of the last step */
    double first_loss;
    int64_t tokens;         /* loss tokens seen */
} sft_result;

/* Trains m on ex. With resume, continues from the newest checkpoint under cfg->out_dir (which must exist). */
int sft_train(model *m, const sft_example *ex, size_t n_ex, const sft_cfg *cfg, const sft_hooks *hooks, int resume,
              sft_result *res, mr_err *e);

/* The order of epoch `epoch`: a Philox Fisher-Yates permutation of n, a pure function of (seed, epoch). */
void sft_epoch_order(size_t *order, size_t n, uint64_t seed, int64_t epoch);

#endif
