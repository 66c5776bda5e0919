/* checkpoint.h: training checkpoints for SFT and GRPO, written so a kill loses nothing.
 *
 * The one idea: a checkpoint is one directory OUT/step-NNNNNNNN holding everything a resume needs — the model
 * in HF layout (config.json + safetensors), optimizer.safetensors, trainer_state.json (step, data cursor, RNG,
 * run id, counters) and the tokenizer files — and it appears atomically: it is written as
 * OUT/.step-NNNNNNNN.tmp, every file fsynced, then renamed into place. A directory named step-* is therefore
 * always complete; a killed writer leaves only a .tmp that the next save removes. The last `keep` are kept. */
#ifndef MOERL_SFT_CHECKPOINT_H
#define MOERL_SFT_CHECKPOINT_H

#include <stddef.h>
#include <stdint.h>

#include "core/err.h"
#include "model/params.h"
#include "sft/optim.h"

/* Writes OUT/step-<step> (o and tokenizer_dir may be NULL). keep > 0 removes all but the newest keep
 * checkpoints afterwards. The final path is written to path_out when non-NULL. */
int ckpt_save(const char *out_dir, int64_t step, const model_params *p, const adamw *o, const char *state_json,
              const char *tokenizer_dir, int keep, char *path_out, size_t path_cap, mr_err *e);

/* The newest complete checkpoint under out_dir: its path and step. MR_ENOTFOUND when there is none. */
int ckpt_latest(const char *out_dir, char *path, size_t cap, int64_t *step, mr_err *e);

/* Reads path/trainer_state.json into a NUL-terminated mem_alloc'd string. */
int ckpt_read_state(const char *ckpt_dir, char **json, mr_err *e);

/* Writes text to path atomically (temp file in the same directory, fsync, rename). */
int file_write_atomic(const char *path, const void *data, size_t n, mr_err *e);
/* Copies a file (for tokenizer files), fsynced. */
int file_copy(const char *src, const char *dst, mr_err *e);
/* mkdir -p */
int dir_make(const char *path, mr_err *e);

#endif
