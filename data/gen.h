/* gen.h: task generators for `moerl data gen` and for recipes with a data.generator section: arithmetic,
 * countdown and tool calls, fresh from a seed.
 *
 * The idea: a task is an infinite sequence of rows and row i is a pure function of (task, difficulty, style, seed,
 * i): it draws from its own Philox stream (core/rng.h), so generating 10 rows or 100 gives the same first 10, and
 * a different seed gives different rows. A held-out split is chosen by a seeded hash of the PROMPT text, so the
 * same prompt always falls on the same side and train and eval can never share a prompt.
 *
 * Row formats (one JSON object per line; key order as written):
 *   arithmetic {"prompt": "Compute 17+25*3.", "completion": "25*3=75. 17+75=92. #### 92", "answer": "92",
 *               "task": "arithmetic", "difficulty": 2}
 *   countdown  {"prompt": "Make 114 from 50, 7, 2 using + - * / (each number at most once).",
 *               "completion": "50+7=57. 57*2=114. #### (50+7)*2", "numbers": [50, 7, 2], "target": 114,
 *               "solution": "(50+7)*2", "task": "countdown", "difficulty": 3}
 *   toolcall   {"prompt": "Show the last 20 lines of app.log.",
 *               "completion": "{\"name\":\"bash\",\"arguments\":{\"command\":\"tail -n 20 app.log\"}}",
 *               "tool": "bash", "schema": {JSON Schema of the arguments}, "task": "toolcall", "difficulty": 1}
 * With GEN_STYLE_TAGS the arithmetic/countdown completions read "<think>STEPS</think> <answer>X</answer>"
 * instead of "STEPS #### X" (for recipes whose rewards read answer tags). */
#ifndef MOERL_DATA_GEN_H
#define MOERL_DATA_GEN_H

#include <cjson/cJSON.h>
#include <stddef.h>
#include <stdint.h>

#include "core/err.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef enum gen_task { GEN_ARITHMETIC, GEN_COUNTDOWN, GEN_TOOLCALL, GEN_NTASKS } gen_task;
typedef enum gen_style { GEN_STYLE_HASH, GEN_STYLE_TAGS } gen_style;

typedef struct gen_opts {
    gen_task task;
    int difficulty; /* arithmetic 1-5, countdown 2-6 (= how many numbers), toolcall 1-3 */
    uint64_t seed;
    gen_style style; /* final-answer format of arithmetic and countdown completions */
} gen_opts;

const char *gen_task_name(gen_task t);
/* MR_EINVAL with "unknown task 'x' (tasks: arithmetic, countdown, toolcall)" for an unknown name. */
int gen_task_parse(const char *name, gen_task *out, mr_err *e);
const char *gen_task_list(void); /* "arithmetic, countdown, toolcall" */
void gen_difficulty_range(gen_task t, int *lo, int *hi);
int gen_default_difficulty(gen_task t);
/* Options with default difficulty (0 in opts means "the task's default") and the HASH style. */
gen_opts gen_opts_default(gen_task t, uint64_t seed);
/* MR_ERANGE naming the task and the allowed range when the difficulty is outside it. */
int gen_opts_check(const gen_opts *o, mr_err *e);

/* Row `index` of the task: a new cJSON object the caller deletes. Depends only on (*o, index). */
int gen_row(const gen_opts *o, uint64_t index, cJSON **row, mr_err *e);

/* 1 when a row with this prompt belongs to the held-out side at fraction frac (0 <= frac <= 1): a seeded hash of
 * the prompt text, so equal prompts always agree. */
int gen_is_eval(uint64_t seed, const char *prompt, double frac);

/* A list of generated rows (owned cJSON objects). Zero-initialize; gen_rows_free releases the rows. */
typedef struct gen_rows {
    cJSON **v;
    size_t n, cap;
} gen_rows;
void gen_rows_free(gen_rows *r); /* accepts NULL and a zeroed struct */

/* n_train rows into train and n_eval held-out rows into eval (eval may be NULL when n_eval == 0). Scans row
 * indices 0, 1, 2, ... and sends each row to the side gen_is_eval(seed, prompt, n_eval / (n_train + n_eval))
 * picks, until both are full; so the two sides never share a prompt and, with n_eval = 0, train row i is
 * gen_row(i). MR_ERANGE when the task has too few distinct prompts to fill a side (e.g. tiny difficulty-1 space). */
int gen_dataset(const gen_opts *o, size_t n_train, size_t n_eval, gen_rows *train, gen_rows *eval, mr_err *e);

/* Writes rows as JSONL (one compact object a line) atomically: PATH.tmp.PID, then rename. */
int gen_write_jsonl(const gen_rows *rows, const char *path, mr_err *e);

/* The held-out file next to a training file: "x/train.jsonl" -> "x/train.eval.jsonl" ("f" -> "f.eval.jsonl").
 * Writes at most cap bytes; MR_ERANGE when it does not fit. */
int gen_eval_path(const char *path, char *out, size_t cap, mr_err *e);

#ifdef __cplusplus
}
#endif

#endif
