/* reward.h: reward plugins and the recipe's weighted set of them (GRPO.md §3).
 *
 * A plugin scores one sample at a time: a score, or UNSCORABLE / ERROR / TIMEOUT with a reason. Those three
 * are never turned into 0: a sample any of whose plugins did not score gets status != REWARD_SCORE for the
 * whole set, and GRPO leaves it out of its group's baseline with advantage 0. Everything is counted per
 * plugin per step (reward/<name>/{mean,std,unscorable_rate,error_rate,timeout_rate}, GRPO.md §4).
 *
 *     reward_set *rs; mr_err e;
 *     reward_set_init(&rs, recipe, NULL, &e);                 the recipe's `rewards:` list, one plugin each
 *     reward_set_score(rs, samples, n, per_plugin, out, &e);  scores a batch on the worker pool
 *     reward_set_metrics(rs, emit, ctx);                      the step's counters, then reward_set_reset_stats
 *     reward_set_free(rs);
 *
 * Threads. The set owns a pool of worker threads (one per core unless told). A plugin's score() is called on a
 * worker with that worker's own state (from worker_init: a Lua state, a CURL handle, ...), so plugins need no
 * locking of their own; plugin-wide data set up in init is read-only while scoring.
 *
 * Time limits. Every call gets an absolute deadline (now + rewards[i].timeout_s) and should honour it itself
 * (the Lua hook, CURLOPT_TIMEOUT_MS, killing a child process group). The set also enforces it from outside:
 * a call still running at deadline + 10% is scored TIMEOUT, the worker running it is abandoned (its result is
 * dropped when it returns; it frees its own state) and a fresh worker takes its place, so one runaway call
 * cannot stall a step. A plugin's score() must therefore not touch anything but its sample, its result, its
 * worker state and the plugin's read-only data.
 *
 * Owns: plugins, worker states and the pool. Borrows: the recipe (during init only), the samples. */
#ifndef MOERL_REWARD_H
#define MOERL_REWARD_H

#include <stddef.h>
#include <stdint.h>

#include <cjson/cJSON.h>

#include "core/err.h"
#include "core/recipe.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef enum {
    REWARD_SCORE = 0,      /* score holds the reward */
    REWARD_UNSCORABLE = 1, /* the plugin cannot judge this sample (no final answer, no expected call) */
    REWARD_ERROR = 2,      /* the plugin or its script failed (a limit breached, a bad row, a crash) */
    REWARD_TIMEOUT = 3,    /* the call ran past its wall-clock limit */
    REWARD_SKIPPED = 4     /* not asked: a fallback judge, for a sample the rule plugins scored */
} reward_status;

/* "score", "unscorable", "error", "timeout", "skipped". */
const char *reward_status_name(reward_status s);

/* One completion to score. Every pointer is borrowed for the duration of the call. */
typedef struct reward_sample {
    const char *prompt;     /* the prompt text as shown to the model (may be "") */
    const char *completion; /* the generated text */
    const cJSON *row;       /* the dataset row, every field (a JSON object), or NULL */
    int64_t tokens;         /* completion length in tokens (0 when unknown) */
    int truncated;          /* 1 when cut at max_new_tokens */
} reward_sample;

#define REWARD_REASON_MAX 256

typedef struct reward_result {
    reward_status status;
    double score;                   /* meaningful when status == REWARD_SCORE; 0 otherwise */
    double seconds;                 /* wall time of the call */
    char reason[REWARD_REASON_MAX]; /* why not a score (also an optional note with a score); "" when none */
} reward_result;

/* Fills a result (status, score, printf-style reason) and returns status. */
reward_status reward_result_set(reward_result *r, reward_status st, double score, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));

/* ---- plugins ----------------------------------------------------------------------------------------- */

typedef struct reward_plugin reward_plugin;

/* A plugin kind: a vtable. `kind` is the recipe key ("math", "lua", "code", ...). */
typedef struct reward_plugin_ops {
    const char *kind;
    /* Reads its options from the recipe item at `item` ("rewards[2]"; the options are under
     * "rewards[2].<kind>.") and sets p->impl. Paths in the recipe are relative to dir (the recipe's folder).
     * On failure it may leave a half-built impl: free() is called on it. */
    int (*init)(reward_plugin *p, const recipe *r, const char *item, const char *dir, mr_err *e);
    /* Optional: a per-worker state, created lazily on the worker thread before its first score(). */
    int (*worker_init)(const reward_plugin *p, void **wstate, mr_err *e);
    void (*worker_free)(const reward_plugin *p, void *wstate); /* accepts NULL wstate */
    /* Scores one sample before `deadline` (seconds on the monotonic clock, see reward_now). The result arrives
     * zeroed with status SCORE. Must not block past the deadline where it can help it. When it sets
     * *discard_state = 1 the worker state is freed and recreated before the next call (after a breached
     * limit, say). */
    void (*score)(const reward_plugin *p, void *wstate, const reward_sample *s, double deadline,
                  reward_result *out, int *discard_state);
    void (*free)(reward_plugin *p); /* frees p->impl; accepts a half-built one */
} reward_plugin_ops;

struct reward_plugin {
    const reward_plugin_ops *ops;
    char name[64];    /* metric name: rewards[i].name, or the kind */
    double weight;    /* rewards[i].weight */
    double timeout_s; /* rewards[i].timeout_s */
    int fallback;     /* judge with fallback_only: asked only for samples another plugin found unscorable */
    void *impl;       /* the kind's own data, read-only while scoring */
};

/* The plugin kinds: math.c, format.c, lua.c, toolcall.c, judge.c, code.c. */
extern const reward_plugin_ops reward_math_ops;
extern const reward_plugin_ops reward_format_ops;
extern const reward_plugin_ops reward_lua_ops;
extern const reward_plugin_ops reward_toolcall_ops;
extern const reward_plugin_ops reward_judge_ops;
extern const reward_plugin_ops reward_code_ops;

/* Monotonic clock in seconds. */
double reward_now(void);

/* ---- the set ----------------------------------------------------------------------------------------- */

typedef struct reward_set reward_set;

typedef struct reward_set_opts {
    int workers;  /* worker threads (0 = one per core) */
} reward_set_opts;

/* Builds one plugin per item of the recipe's `rewards:` list (the recipe must be resolved). When
 * grpo.overlong.mode is soft_penalty, a built-in plugin "overlong" (weight 1) adds DAPO's soft overlong
 * penalty from rollout.max_new_tokens and grpo.overlong.buffer. opts may be NULL. */
int reward_set_init(reward_set **out, const recipe *r, const reward_set_opts *opts, mr_err *e);
void reward_set_free(reward_set *s); /* accepts NULL */

size_t reward_set_count(const reward_set *s);                  /* plugins, the overlong one included */
const reward_plugin *reward_set_plugin(const reward_set *s, size_t i);

/* The set's verdict on one sample. */
typedef struct reward_outcome {
    reward_status status;           /* SCORE when every plugin scored (the judge standing in where asked) */
    double total;                   /* sum of weight * score; 0 unless status == SCORE */
    double seconds;                 /* wall time spent on this sample, summed over plugins */
    char reason[REWARD_REASON_MAX]; /* "<plugin>: <reason>" of the first plugin that did not score */
} reward_outcome;

/* Scores n samples with every plugin. per_plugin is (n, reward_set_count) row-major (may be NULL), out is
 * (n). Plugins run in recipe order, samples in parallel on the pool; a fallback judge runs last, only for
 * samples with an unscorable rule plugin, and its verdict stands in for those plugins (with their weights).
 * Updates the step counters. Returns 0, or an error only for a failure of the machinery itself (no memory,
 * no thread): a plugin's failures are results, not errors. */
int reward_set_score(reward_set *s, const reward_sample *samples, size_t n, reward_result *per_plugin,
                     reward_outcome *out, mr_err *e);

/* Step counters of plugin i since the last reset. mean and std are over the scored samples; the rates over
 * every call (n). */
typedef struct reward_stats {
    int64_t n, scored, unscorable, errors, timeouts;
    double mean, std, unscorable_rate, error_rate, timeout_rate;
} reward_stats;

void reward_set_stats(const reward_set *s, size_t i, reward_stats *out);
void reward_set_reset_stats(reward_set *s);
/* Calls emit for each metric of the step: reward/<name>/{mean,std,unscorable_rate,error_rate,timeout_rate}
 * per plugin. */
void reward_set_metrics(const reward_set *s, void (*emit)(const char *name, double value, void *ctx), void *ctx);

/* ---- helpers shared by the plugins ------------------------------------------------------------------- */

/* DAPO's soft overlong penalty (DAPO eq. 13): 0 when len <= max_len - buffer, ((max_len - buffer) - len) /
 * buffer inside the buffer, -1 beyond max_len. */
double reward_overlong_penalty(int64_t len, int64_t max_len, int64_t buffer);

/* The row's field as text (a string, or a number/bool printed as JSON); NULL when absent or null. Returns a
 * pointer into buf (cap bytes) or into the row. */
const char *reward_row_text(const cJSON *row, const char *field, char *buf, size_t cap);

/* Math answers (math.c), exposed for tests and for other plugins. Extraction modes are the recipe's
 * math.extract values. */
typedef enum { MATH_AUTO = 0, MATH_BOXED, MATH_ANSWER_TAG, MATH_HASH, MATH_LAST_NUMBER } math_extract;
/* Writes the final answer found in text into out (cap bytes); returns 1 when found, 0 when not. */
int math_extract_answer(const char *text, math_extract mode, char *out, size_t cap);
/* Normalizes an answer in place-free fashion into out: strips LaTeX spacing, $, \text{}, units, trailing
 * period, thousands separators; canonical sign. */
void math_normalize(const char *in, char *out, size_t cap);
/* 1 when the answers are equal: as numbers (fractions, \frac, percent, decimals) within the relative
 * tolerance, or else as normalized text. */
int math_answers_equal(const char *got, const char *want, double rel_tol);

/* Tool calls (toolcall.c). format: 0 auto, 1 json, 2 xml, 3 yaml (the recipe's toolcall.format order). Returns
 * a new {name, arguments} object, or NULL when the text holds no call; *raw_json (may be NULL) gets the
 * call's JSON text without layout whitespace when it was written as JSON (mem_free it). */
cJSON *toolcall_parse(const char *text, int format, char **raw_json);
/* 1 when v validates against the schema subset (type, required, properties, enum, items); else 0 and why
 * ("$.args.n: expected integer"). at names v ("$"). */
int toolcall_validate_schema(const cJSON *v, const cJSON *schema, const char *at, char *why, size_t cap);

/* The judge's reply (judge.c): "CORRECT" -> 1, "INCORRECT" -> 0 (the last verdict word wins), or a number;
 * returns 1 and sets *score, or 0 when unreadable. */
int judge_parse_verdict(const char *reply, double *score);

#ifdef __cplusplus
}
#endif

#endif
