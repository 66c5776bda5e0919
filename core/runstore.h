/* runstore.h: the run store, one SQLite file (runs.db by default, the recipe's run.store) where every moerl
 * run (sft, grpo, eval, check) records what it was, what it measured and how it ended.
 *
 * Tables: runs, metrics (run, step, name, value), samples (GRPO completions with per-plugin rewards),
 * checkpoints (path + sha256), events (info/warning/error lines). The file is in WAL mode so a trainer can
 * write while `moerl runs` reads; every write is one IMMEDIATE transaction, so a killed writer leaves each
 * step's metrics either all present or all absent.
 *
 * Non-finite numbers: SQLite turns NaN into NULL, so a NULL value/advantage means NaN; +-inf are stored as
 * REAL as they are. Reads give back NaN for NULL.
 *
 * Owns: the sqlite3 connection and its prepared statements. A runstore is used by one thread at a time; a
 * forked child must open its own. Strings handed to the foreach callbacks live only during the call. */
#ifndef MOERL_RUNSTORE_H
#define MOERL_RUNSTORE_H

#include <stddef.h>
#include <stdint.h>

#include "core/err.h"

/* Schema version written to PRAGMA user_version; older files are migrated on open, newer ones refused. */
#define RUNSTORE_SCHEMA_VERSION 2
/* PRAGMA application_id of a moerl run store ("mRun"), so another program's SQLite file is refused. */
#define RUNSTORE_APPLICATION_ID 0x6d52756e
/* How long a writer waits for the write lock before giving up (milliseconds). */
#define RUNSTORE_BUSY_MS 10000

typedef struct runstore runstore;

typedef enum { RUN_RUNNING = 0, RUN_OK, RUN_FAILED, RUN_KILLED } run_status;
typedef enum { EVENT_INFO = 0, EVENT_WARNING, EVENT_ERROR } event_level;

const char *run_status_name(run_status s); /* "running", "ok", "failed", "killed" */
const char *event_level_name(event_level l); /* "info", "warning", "error" */

/* Opens (creating it if missing) the store at path for writing, sets WAL, synchronous=NORMAL, busy timeout,
 * foreign keys, and migrates an older schema. Refuses a newer schema, a non-SQLite file and another
 * program's database (MR_EDB, message names the file). */
int runstore_open(runstore **out, const char *path, mr_err *e);
/* Opens an existing store for the CLI's queries: never creates the file (missing file: MR_ENOTFOUND,
 * "PATH: no such file"), refuses an empty or foreign file; an older schema is still migrated. */
int runstore_open_existing(runstore **out, const char *path, mr_err *e);
void runstore_close(runstore *rs); /* accepts NULL */
const char *runstore_path(const runstore *rs);

/* Schema version of an open store (after migration: RUNSTORE_SCHEMA_VERSION). */
int runstore_schema_version(runstore *rs, int *version, mr_err *e);

/* Starts a run: kind is "sft", "grpo", "eval" or "check"; name (e.g. the recipe's name) and recipe_text
 * (the resolved recipe) may be NULL. Records MOERL_VERSION, the host name, the pid, and the start time.
 * Also marks as "killed" any run on this host still "running" whose process no longer exists. */
int runstore_begin_run(runstore *rs, const char *kind, const char *name, const char *recipe_text, int64_t seed,
                       int64_t *run_id, mr_err *e);
/* Records the end time and final status (RUN_OK, RUN_FAILED or RUN_KILLED). MR_ENOTFOUND for an unknown run. */
int runstore_end_run(runstore *rs, int64_t run_id, run_status status, mr_err *e);
/* A run continued by --resume: status back to running, end time cleared, this process as its writer. */
int runstore_resume_run(runstore *rs, int64_t run_id, mr_err *e);

/* One metric value. A later value for the same (run, name, step) replaces the earlier one. */
int runstore_log_metric(runstore *rs, int64_t run_id, int64_t step, const char *name, double value, mr_err *e);
/* A step's metrics in ONE transaction: all n land or none does. */
int runstore_log_metrics(runstore *rs, int64_t run_id, int64_t step, size_t n, const char *const names[],
                         const double values[], mr_err *e);

typedef struct runstore_sample {
    int64_t step;
    const char *prompt;
    const char *completion;
    const char *rewards_json; /* per-plugin rewards, a JSON object {"format":1,"accuracy":0}; NULL = none */
    double advantage;         /* NaN allowed */
    const char *extra_json;   /* any JSON value (token counts, finish reason...); NULL = none */
} runstore_sample;

/* n samples (e.g. one GRPO group) in one transaction. Invalid JSON is refused (MR_EDB) and nothing lands. */
int runstore_log_samples(runstore *rs, int64_t run_id, size_t n, const runstore_sample *samples, mr_err *e);
int runstore_log_sample(runstore *rs, int64_t run_id, const runstore_sample *sample, mr_err *e);

/* Records a checkpoint; sha256_hex is 64 hex digits, or NULL to hash the file at path now (core/sha256.h). */
int runstore_log_checkpoint(runstore *rs, int64_t run_id, int64_t step, const char *path, const char *sha256_hex,
                            mr_err *e);
int runstore_log_event(runstore *rs, int64_t run_id, event_level level, const char *message, mr_err *e);

/* ---- queries (used by `moerl runs`). Times are unix seconds (UTC); NaN where absent. ---- */

typedef struct runstore_run {
    int64_t id;
    const char *kind, *name, *recipe, *version, *host, *status; /* name/recipe may be NULL */
    int64_t seed;
    int64_t pid;
    double started_at, ended_at; /* ended_at NaN while running */
    int64_t steps;               /* number of distinct steps with metrics */
    int64_t last_step;           /* -1 when no metric was logged */
} runstore_run;

typedef struct runstore_checkpoint {
    int64_t step;
    const char *path, *sha256;
    double time;
} runstore_checkpoint;

typedef struct runstore_event {
    double time;
    const char *level, *message;
} runstore_event;

/* Callbacks return 0 to go on; a nonzero value stops the iteration and is returned (set e yourself). */
typedef int (*runstore_run_fn)(void *ud, const runstore_run *run);
typedef int (*runstore_metric_fn)(void *ud, int64_t step, const char *name, double value);
typedef int (*runstore_sample_fn)(void *ud, const runstore_sample *s);
typedef int (*runstore_checkpoint_fn)(void *ud, const runstore_checkpoint *c);
typedef int (*runstore_event_fn)(void *ud, const runstore_event *ev);

/* All runs, by id. */
int runstore_foreach_run(runstore *rs, runstore_run_fn fn, void *ud, mr_err *e);
/* One run; MR_ENOTFOUND when there is no such id. */
int runstore_get_run(runstore *rs, int64_t run_id, runstore_run_fn fn, void *ud, mr_err *e);
/* The latest value of every metric (the value at its highest step), by name. */
int runstore_foreach_latest_metric(runstore *rs, int64_t run_id, runstore_metric_fn fn, void *ud, mr_err *e);
/* Every metric row, ordered by step then name (the export). */
int runstore_foreach_metric(runstore *rs, int64_t run_id, runstore_metric_fn fn, void *ud, mr_err *e);
int runstore_foreach_sample(runstore *rs, int64_t run_id, runstore_sample_fn fn, void *ud, mr_err *e);
int runstore_foreach_checkpoint(runstore *rs, int64_t run_id, runstore_checkpoint_fn fn, void *ud, mr_err *e);
/* The last `last` events (all when last <= 0), oldest first. */
int runstore_foreach_event(runstore *rs, int64_t run_id, int last, runstore_event_fn fn, void *ud, mr_err *e);

#endif
