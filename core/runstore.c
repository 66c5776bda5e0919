/* runstore.c: the SQLite run store (see runstore.h).
 *
 * The one idea: every write is a single BEGIN IMMEDIATE ... COMMIT on a WAL-mode file. IMMEDIATE takes the
 * write lock up front, so two writers queue on the busy handler instead of deadlocking on a read->write
 * upgrade, and a writer killed at any instant leaves either the whole transaction or nothing (WAL frames
 * without a commit record are ignored on recovery). The schema is an append-only list of migrations; the
 * file's PRAGMA user_version says how many have been applied. */
#include "core/runstore.h"

#include <errno.h>
#include <math.h>
#include <signal.h>
#include <sqlite3.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <time.h>
#include <unistd.h>

#include "core/mem.h"
#include "core/sha256.h"

#ifndef MOERL_VERSION
#define MOERL_VERSION "unknown"
#endif

/* ---- schema: migrations[v] takes a file from version v to v+1. Append only; never edit a shipped step. ---- */

static const char *const migrations[RUNSTORE_SCHEMA_VERSION] = {
    /* 0 -> 1: runs, metrics, checkpoints, events. */
    "PRAGMA application_id = 1834120558;\n" /* RUNSTORE_APPLICATION_ID */
    "CREATE TABLE runs (\n"
    "  id INTEGER PRIMARY KEY,\n"
    "  kind TEXT NOT NULL CHECK (kind IN ('sft', 'grpo', 'eval', 'check')),\n"
    "  name TEXT,\n"
    "  recipe TEXT,\n"
    "  version TEXT NOT NULL,\n"
    "  seed INTEGER NOT NULL,\n"
    "  host TEXT NOT NULL,\n"
    "  started_at REAL NOT NULL,\n" /* unix seconds, UTC */
    "  ended_at REAL,\n"
    "  status TEXT NOT NULL DEFAULT 'running' CHECK (status IN ('running', 'ok', 'failed', 'killed'))\n"
    ");\n"
    "CREATE TABLE metrics (\n"
    "  run_id INTEGER NOT NULL REFERENCES runs(id) ON DELETE CASCADE,\n"
    "  step INTEGER NOT NULL,\n"
    "  name TEXT NOT NULL CONSTRAINT metric_name_not_empty CHECK (length(name) > 0),\n"
    "  value REAL,\n" /* NULL = NaN (SQLite cannot hold a NaN) */
    "  time REAL NOT NULL,\n"
    "  PRIMARY KEY (run_id, name, step)\n"
    ") WITHOUT ROWID;\n"
    "CREATE INDEX metrics_by_step ON metrics(run_id, step, name);\n"
    "CREATE TABLE checkpoints (\n"
    "  run_id INTEGER NOT NULL REFERENCES runs(id) ON DELETE CASCADE,\n"
    "  step INTEGER NOT NULL,\n"
    "  path TEXT NOT NULL,\n"
    "  sha256 TEXT NOT NULL CONSTRAINT sha256_is_64_hex CHECK (length(sha256) = 64 AND NOT sha256 GLOB '*[^0-9a-f]*'),\n"
    "  time REAL NOT NULL\n"
    ");\n"
    "CREATE INDEX checkpoints_by_run ON checkpoints(run_id, step);\n"
    "CREATE TABLE events (\n"
    "  run_id INTEGER NOT NULL REFERENCES runs(id) ON DELETE CASCADE,\n"
    "  time REAL NOT NULL,\n"
    "  level TEXT NOT NULL CHECK (level IN ('info', 'warning', 'error')),\n"
    "  message TEXT NOT NULL\n"
    ");\n"
    "CREATE INDEX events_by_run ON events(run_id);\n",

    /* 1 -> 2: GRPO samples; the writer's pid, so a run whose process died can be marked killed. */
    "ALTER TABLE runs ADD COLUMN pid INTEGER;\n"
    "CREATE TABLE samples (\n"
    "  run_id INTEGER NOT NULL REFERENCES runs(id) ON DELETE CASCADE,\n"
    "  step INTEGER NOT NULL,\n"
    "  prompt TEXT NOT NULL,\n"
    "  completion TEXT NOT NULL,\n"
    "  rewards TEXT CONSTRAINT rewards_is_json_object\n"
    "    CHECK (rewards IS NULL OR (json_valid(rewards) AND json_type(rewards) = 'object')),\n"
    "  advantage REAL,\n" /* NULL = NaN */
    "  extra TEXT CONSTRAINT extra_is_json CHECK (extra IS NULL OR json_valid(extra))\n"
    ");\n"
    "CREATE INDEX samples_by_run ON samples(run_id, step);\n",
};

/* ---- prepared statements, prepared on first use and kept for the connection's life ---- */

enum {
    ST_BEGIN,
    ST_COMMIT,
    ST_ROLLBACK,
    ST_USER_VERSION,
    ST_INSERT_RUN,
    ST_END_RUN,
    ST_RUNNING_HERE,
    ST_MARK_KILLED,
    ST_INSERT_METRIC,
    ST_INSERT_SAMPLE,
    ST_INSERT_CHECKPOINT,
    ST_INSERT_EVENT,
    ST_LIST_RUNS,
    ST_GET_RUN,
    ST_LATEST_METRICS,
    ST_METRICS,
    ST_SAMPLES,
    ST_CHECKPOINTS,
    ST_EVENTS,
    ST_COUNT
};

#define RUN_COLUMNS                                                                                             \
    "id, kind, name, recipe, version, seed, host, pid, started_at, ended_at, status, "                          \
    "(SELECT count(DISTINCT step) FROM metrics WHERE run_id = runs.id), "                                       \
    "(SELECT max(step) FROM metrics WHERE run_id = runs.id)"

static const char *const stmt_sql[ST_COUNT] = {
    [ST_BEGIN] = "BEGIN IMMEDIATE",
    [ST_COMMIT] = "COMMIT",
    [ST_ROLLBACK] = "ROLLBACK",
    [ST_USER_VERSION] = "PRAGMA user_version",
    [ST_INSERT_RUN] = "INSERT INTO runs (kind, name, recipe, version, seed, host, pid, started_at, status) "
                      "VALUES (?, ?, ?, ?, ?, ?, ?, ?, 'running')",
    [ST_END_RUN] = "UPDATE runs SET status = ?, ended_at = ? WHERE id = ?",
    [ST_RUNNING_HERE] = "SELECT id, pid FROM runs WHERE status = 'running' AND host = ? AND pid IS NOT NULL "
                        "AND pid <> ?",
    [ST_MARK_KILLED] = "UPDATE runs SET status = 'killed', ended_at = max(started_at, "
                       "coalesce((SELECT max(time) FROM metrics WHERE run_id = runs.id), started_at), "
                       "coalesce((SELECT max(time) FROM events WHERE run_id = runs.id), started_at)) "
                       "WHERE id = ? AND status = 'running'",
    [ST_INSERT_METRIC] = "INSERT INTO metrics (run_id, step, name, value, time) VALUES (?, ?, ?, ?, ?) "
                         "ON CONFLICT (run_id, name, step) DO UPDATE SET value = excluded.value, time = excluded.time",
    [ST_INSERT_SAMPLE] = "INSERT INTO samples (run_id, step, prompt, completion, rewards, advantage, extra) "
                         "VALUES (?, ?, ?, ?, ?, ?, ?)",
    [ST_INSERT_CHECKPOINT] = "INSERT INTO checkpoints (run_id, step, path, sha256, time) VALUES (?, ?, ?, ?, ?)",
    [ST_INSERT_EVENT] = "INSERT INTO events (run_id, time, level, message) VALUES (?, ?, ?, ?)",
    [ST_LIST_RUNS] = "SELECT " RUN_COLUMNS " FROM runs ORDER BY id",
    [ST_GET_RUN] = "SELECT " RUN_COLUMNS " FROM runs WHERE id = ?",
    /* A bare column next to max() takes its value from the row holding the max (SQLite's documented rule). */
    [ST_LATEST_METRICS] = "SELECT max(step), name, value FROM metrics WHERE run_id = ? GROUP BY name ORDER BY name",
    [ST_METRICS] = "SELECT step, name, value FROM metrics WHERE run_id = ? ORDER BY step, name",
    [ST_SAMPLES] = "SELECT step, prompt, completion, rewards, advantage, extra FROM samples WHERE run_id = ? "
                   "ORDER BY rowid",
    [ST_CHECKPOINTS] = "SELECT step, path, sha256, time FROM checkpoints WHERE run_id = ? ORDER BY step, rowid",
    [ST_EVENTS] = "SELECT time, level, message FROM (SELECT rowid AS r, time, level, message FROM events "
                  "WHERE run_id = ?1 ORDER BY rowid DESC LIMIT ?2) ORDER BY r",
};

struct runstore {
    sqlite3 *db;
    char *path;
    int last_rc; /* extended result code of the last failed SQLite call */
    sqlite3_stmt *stmt[ST_COUNT];
};

/* ---- the one SQLite check: SQL(call) records file:line, the call and SQLite's message, then goes to fail ---- */

static int sql_error(runstore *rs, int rc, const char *file, int line, const char *call, mr_err *e) {
    const char *fn = strstr(call, "sqlite3_");
    if (!fn) fn = call;
    int fnlen = (int)strcspn(fn, "(");
    /* sqlite3_errmsg is the most specific text, but only when it belongs to this failure. */
    const char *msg = sqlite3_errstr(rc);
    rs->last_rc = rc;
    if (rs->db && (sqlite3_errcode(rs->db) & 0xff) == (rc & 0xff)) {
        msg = sqlite3_errmsg(rs->db);
        rs->last_rc = sqlite3_extended_errcode(rs->db);
    }
    return err_set(e, MR_EDB, "%s: %s [%.*s, %s:%d]", rs->path, msg, fnlen, fn, file, line);
}

/* SQL_AS(call, what): the call's status is checked; a failure sets st and jumps to the function's fail label. */
#define SQL_AS(call, what)                                                                                      \
    do {                                                                                                        \
        int rc_ = (call);                                                                                       \
        if (rc_ != SQLITE_OK && rc_ != SQLITE_ROW && rc_ != SQLITE_DONE) {                                      \
            st = sql_error(rs, rc_, __FILE__, __LINE__, what, e);                                               \
            goto fail;                                                                                          \
        }                                                                                                       \
    } while (0)
#define SQL(call) SQL_AS(call, #call)
/* Not checked, on purpose: sqlite3_reset/finalize (they repeat the error of a step already checked), close and
 * ROLLBACK (they run on paths that are already reporting an error). */

static int stmt_get(runstore *rs, int which, sqlite3_stmt **out, mr_err *e) {
    int st = MR_OK;
    if (!rs->stmt[which])
        SQL(sqlite3_prepare_v3(rs->db, stmt_sql[which], -1, SQLITE_PREPARE_PERSISTENT, &rs->stmt[which], NULL));
    *out = rs->stmt[which];
    return MR_OK;
fail:
    *out = NULL;
    return st;
}

/* Leaves a cached statement ready for its next use (and frees its read lock). */
static void stmt_release(sqlite3_stmt *s) {
    if (!s) return;
    sqlite3_reset(s);
    sqlite3_clear_bindings(s);
}

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static void sleep_ms(long ms) {
    struct timespec ts = {ms / 1000, (ms % 1000) * 1000000L};
    while (nanosleep(&ts, &ts) != 0 && errno == EINTR) {
    }
}

/* NaN cannot be stored: it goes in as NULL and comes back out as NaN. */
static int bind_real(sqlite3_stmt *s, int i, double v) {
    return isnan(v) ? sqlite3_bind_null(s, i) : sqlite3_bind_double(s, i, v);
}
static double column_real(sqlite3_stmt *s, int i) {
    return sqlite3_column_type(s, i) == SQLITE_NULL ? NAN : sqlite3_column_double(s, i);
}
static const char *column_text(sqlite3_stmt *s, int i) { return (const char *)sqlite3_column_text(s, i); }

/* ---- transactions ---- */

/* BEGIN IMMEDIATE. The busy handler already waits RUNSTORE_BUSY_MS for the write lock; SQLite still returns
 * SQLITE_BUSY without calling it in a few cases (another connection recovering the WAL, a lock it would
 * deadlock on), so BUSY is retried with a growing pause until the same deadline. */
static int tx_begin(runstore *rs, mr_err *e) {
    int st = MR_OK;
    sqlite3_stmt *s = NULL;
    if ((st = stmt_get(rs, ST_BEGIN, &s, e))) return st;
    double deadline = now_s() + RUNSTORE_BUSY_MS / 1000.0;
    long pause = 1;
    for (;;) {
        int rc = sqlite3_step(s);
        if ((rc & 0xff) == SQLITE_BUSY && now_s() < deadline) {
            sqlite3_reset(s);
            sleep_ms(pause);
            if (pause < 64) pause *= 2;
            continue;
        }
        SQL_AS(rc, "sqlite3_step");
        break;
    }
    sqlite3_reset(s);
    return MR_OK;
fail:
    sqlite3_reset(s);
    return err_prefix(e, "cannot start a write transaction");
}

static int tx_commit(runstore *rs, mr_err *e) {
    int st = MR_OK;
    sqlite3_stmt *s = NULL;
    if ((st = stmt_get(rs, ST_COMMIT, &s, e))) return st;
    SQL(sqlite3_step(s));
    sqlite3_reset(s);
    return MR_OK;
fail:
    sqlite3_reset(s);
    return st;
}

/* Undoes the open transaction, if any; errors are ignored because the caller is already reporting one. */
static void tx_rollback(runstore *rs) {
    if (sqlite3_get_autocommit(rs->db)) return; /* SQLite rolled back already (e.g. on SQLITE_FULL) */
    sqlite3_stmt *s = NULL;
    if (stmt_get(rs, ST_ROLLBACK, &s, NULL) == MR_OK) {
        sqlite3_step(s);
        sqlite3_reset(s);
    }
}

/* ---- open, migrate, close ---- */

static int read_user_version(runstore *rs, int *version, mr_err *e) {
    int st = MR_OK;
    sqlite3_stmt *s = NULL;
    if ((st = stmt_get(rs, ST_USER_VERSION, &s, e))) return st;
    SQL(sqlite3_step(s));
    *version = sqlite3_column_int(s, 0);
    sqlite3_reset(s);
    return MR_OK;
fail:
    stmt_release(s);
    return st;
}

/* The file's schema version, application id and number of schema objects, from one snapshot. */
static int identify(runstore *rs, int *version, int64_t *appid, int64_t *nobjects, mr_err *e) {
    int st = MR_OK;
    sqlite3_stmt *s = NULL;
    SQL(sqlite3_prepare_v2(rs->db,
                           "SELECT (SELECT user_version FROM pragma_user_version), "
                           "(SELECT application_id FROM pragma_application_id), (SELECT count(*) FROM sqlite_schema)",
                           -1, &s, NULL));
    SQL(sqlite3_step(s));
    *version = sqlite3_column_int(s, 0);
    *appid = sqlite3_column_int64(s, 1);
    *nobjects = sqlite3_column_int64(s, 2);
    sqlite3_finalize(s);
    return MR_OK;
fail:
    sqlite3_finalize(s);
    return st;
}

/* Runs a PRAGMA that answers one text row (journal_mode), retrying BUSY until the busy deadline: switching a
 * fresh file to WAL needs an exclusive lock that a concurrent opener may hold for a moment. */
static int pragma_text(runstore *rs, const char *sql, char *out, size_t cap, mr_err *e) {
    int st = MR_OK;
    sqlite3_stmt *s = NULL;
    double deadline = now_s() + RUNSTORE_BUSY_MS / 1000.0;
    long pause = 1;
    for (;;) {
        SQL(sqlite3_prepare_v2(rs->db, sql, -1, &s, NULL));
        int rc = sqlite3_step(s);
        if ((rc & 0xff) == SQLITE_BUSY && now_s() < deadline) {
            sqlite3_finalize(s);
            s = NULL;
            sleep_ms(pause);
            if (pause < 64) pause *= 2;
            continue;
        }
        SQL_AS(rc, "sqlite3_step");
        const char *t = rc == SQLITE_ROW ? column_text(s, 0) : NULL;
        snprintf(out, cap, "%s", t ? t : "");
        break;
    }
    sqlite3_finalize(s);
    return MR_OK;
fail:
    sqlite3_finalize(s);
    return st;
}

/* Applies migrations[from..] one transaction each. The version is read again under the write lock, so two
 * processes opening a fresh file at once apply each step exactly once. */
static int migrate(runstore *rs, int from, mr_err *e) {
    int st = MR_OK;
    for (int v = from; v < RUNSTORE_SCHEMA_VERSION; v++) {
        if ((st = tx_begin(rs, e))) return err_prefix(e, "migrating schema %d -> %d", v, v + 1);
        int cur;
        if ((st = read_user_version(rs, &cur, e))) goto fail;
        if (cur > RUNSTORE_SCHEMA_VERSION) {
            st = err_set(e, MR_EDB, "%s: run store schema version %d is newer than this moerl %s understands (%d)",
                         rs->path, cur, MOERL_VERSION, RUNSTORE_SCHEMA_VERSION);
            tx_rollback(rs);
            return st;
        }
        if (cur > v) { /* another process got here first */
            tx_rollback(rs);
            v = cur - 1;
            continue;
        }
        SQL(sqlite3_exec(rs->db, migrations[v], NULL, NULL, NULL));
        char sql[64];
        snprintf(sql, sizeof sql, "PRAGMA user_version = %d", v + 1);
        SQL(sqlite3_exec(rs->db, sql, NULL, NULL, NULL));
        if ((st = tx_commit(rs, e))) goto fail;
        continue;
    fail:
        tx_rollback(rs);
        return err_prefix(e, "migrating schema %d -> %d", v, v + 1);
    }
    return MR_OK;
}

static int open_store(runstore **out, const char *path, int create, mr_err *e) {
    int st = MR_OK;
    *out = NULL;
    if (!path || !*path) return err_set(e, MR_EINVAL, "run store: empty path");
    if (!create) { /* reading must never create the file */
        struct stat sb;
        if (stat(path, &sb) != 0)
            return err_set(e, errno == ENOENT ? MR_ENOTFOUND : MR_EIO, "%s: %s", path,
                           errno == ENOENT ? "no such file" : strerror(errno));
        if (!S_ISREG(sb.st_mode)) return err_set(e, MR_EIO, "%s: not a regular file", path);
        if (sb.st_size == 0) return err_set(e, MR_EFORMAT, "%s: empty file, not a moerl run store", path);
    }
    runstore *rs = mem_calloc(1, sizeof *rs);
    if (!rs) return err_set(e, MR_ENOMEM, "%s: no memory for the run store", path);
    if (!(rs->path = mem_strdup(path))) {
        mem_free(rs);
        return err_set(e, MR_ENOMEM, "%s: no memory for the run store", path);
    }
    int flags = SQLITE_OPEN_READWRITE | (create ? SQLITE_OPEN_CREATE : 0) | SQLITE_OPEN_NOMUTEX;
    SQL(sqlite3_open_v2(path, &rs->db, flags, NULL));
    SQL(sqlite3_extended_result_codes(rs->db, 1));
    SQL(sqlite3_busy_timeout(rs->db, RUNSTORE_BUSY_MS));

    /* Identify the file before changing anything in it. One statement, so one snapshot: read piecemeal, a
     * concurrent opener's migration could land in between and make a fresh file look like a foreign one. */
    int version = 0;
    int64_t appid = 0, ntables = 0;
    if ((st = identify(rs, &version, &appid, &ntables, e))) {
        if ((rs->last_rc & 0xff) == SQLITE_NOTADB || (rs->last_rc & 0xff) == SQLITE_CORRUPT)
            st = err_set(e, MR_EFORMAT, "%s: not a moerl run store (%s)", path, sqlite3_errstr(rs->last_rc));
        goto fail;
    }
    if (appid != 0 && appid != RUNSTORE_APPLICATION_ID) {
        st = err_set(e, MR_EFORMAT, "%s: not a moerl run store (SQLite application_id is 0x%llx, expected 0x%x)",
                     path, (unsigned long long)appid, RUNSTORE_APPLICATION_ID);
        goto fail;
    }
    if (version > RUNSTORE_SCHEMA_VERSION) {
        st = err_set(e, MR_EDB,
                     "%s: run store schema version %d is newer than this moerl %s understands (%d); "
                     "use a newer moerl",
                     path, version, MOERL_VERSION, RUNSTORE_SCHEMA_VERSION);
        goto fail;
    }
    if (version == 0 && (ntables > 0 || !create)) {
        st = err_set(e, MR_EFORMAT, "%s: not a moerl run store (%s)", path,
                     ntables > 0 ? "it has tables but no schema version" : "no schema");
        goto fail;
    }

    SQL(sqlite3_exec(rs->db, "PRAGMA foreign_keys = ON", NULL, NULL, NULL));
    char mode[32];
    if ((st = pragma_text(rs, "PRAGMA journal_mode = WAL", mode, sizeof mode, e))) goto fail;
    if (strcmp(mode, "wal") != 0) {
        st = err_set(e, MR_EDB, "%s: cannot switch the run store to WAL mode (journal mode stays '%s')", path, mode);
        goto fail;
    }
    SQL(sqlite3_exec(rs->db, "PRAGMA synchronous = NORMAL", NULL, NULL, NULL));
    if ((st = migrate(rs, version, e))) goto fail;
    *out = rs;
    return MR_OK;
fail:
    runstore_close(rs);
    return st;
}

int runstore_open(runstore **out, const char *path, mr_err *e) { return open_store(out, path, 1, e); }
int runstore_open_existing(runstore **out, const char *path, mr_err *e) { return open_store(out, path, 0, e); }

void runstore_close(runstore *rs) {
    if (!rs) return;
    for (int i = 0; i < ST_COUNT; i++) sqlite3_finalize(rs->stmt[i]);
    sqlite3_close(rs->db); /* NULL is a no-op; the last connection checkpoints and removes the WAL */
    mem_free(rs->path);
    mem_free(rs);
}

const char *runstore_path(const runstore *rs) { return rs ? rs->path : ""; }

int runstore_schema_version(runstore *rs, int *version, mr_err *e) { return read_user_version(rs, version, e); }

const char *run_status_name(run_status s) {
    switch (s) {
    case RUN_RUNNING: return "running";
    case RUN_OK: return "ok";
    case RUN_FAILED: return "failed";
    case RUN_KILLED: return "killed";
    }
    return "?";
}

const char *event_level_name(event_level l) {
    switch (l) {
    case EVENT_INFO: return "info";
    case EVENT_WARNING: return "warning";
    case EVENT_ERROR: return "error";
    }
    return "?";
}

/* ---- runs ---- */

/* Marks as killed the runs this host started whose process is gone (SIGKILL, OOM killer, power loss):
 * they can never end themselves. Their end time is their last recorded activity. Called inside a write
 * transaction. A pid reused by an unrelated process leaves a dead run "running"; that is harmless. */
static int reap_dead_runs(runstore *rs, const char *host, mr_err *e) {
    int st = MR_OK;
    sqlite3_stmt *s = NULL;
    int64_t dead[64];
    int ndead = 0;
    if ((st = stmt_get(rs, ST_RUNNING_HERE, &s, e))) return st;
    SQL(sqlite3_bind_text(s, 1, host, -1, SQLITE_STATIC));
    SQL(sqlite3_bind_int64(s, 2, (int64_t)getpid()));
    int rc;
    while (ndead < 64) {
        SQL(rc = sqlite3_step(s));
        if (rc != SQLITE_ROW) break;
        int64_t pid = sqlite3_column_int64(s, 1);
        if (pid > 0 && kill((pid_t)pid, 0) != 0 && errno == ESRCH) dead[ndead++] = sqlite3_column_int64(s, 0);
    }
    stmt_release(s);
    s = NULL;
    if ((st = stmt_get(rs, ST_MARK_KILLED, &s, e))) return st;
    for (int i = 0; i < ndead; i++) {
        SQL(sqlite3_bind_int64(s, 1, dead[i]));
        SQL(sqlite3_step(s));
        sqlite3_reset(s);
    }
    stmt_release(s);
    return MR_OK;
fail:
    stmt_release(s);
    return st;
}

int runstore_begin_run(runstore *rs, const char *kind, const char *name, const char *recipe_text, int64_t seed,
                       int64_t *run_id, mr_err *e) {
    static const char *const kinds[] = {"sft", "grpo", "eval", "check"};
    int known = 0;
    for (size_t i = 0; kind && i < sizeof kinds / sizeof kinds[0]; i++) known |= !strcmp(kind, kinds[i]);
    if (!known)
        return err_set(e, MR_EINVAL, "%s: run kind must be one of sft, grpo, eval, check; got '%s'", rs->path,
                       kind ? kind : "(null)");
    char host[256];
    if (gethostname(host, sizeof host) != 0) snprintf(host, sizeof host, "unknown");
    host[sizeof host - 1] = '\0';

    int st = tx_begin(rs, e);
    if (st) return st;
    sqlite3_stmt *s = NULL;
    if ((st = reap_dead_runs(rs, host, e))) goto fail;
    if ((st = stmt_get(rs, ST_INSERT_RUN, &s, e))) goto fail;
    SQL(sqlite3_bind_text(s, 1, kind, -1, SQLITE_STATIC));
    SQL(sqlite3_bind_text(s, 2, name, -1, SQLITE_STATIC));
    SQL(sqlite3_bind_text(s, 3, recipe_text, -1, SQLITE_STATIC));
    SQL(sqlite3_bind_text(s, 4, MOERL_VERSION, -1, SQLITE_STATIC));
    SQL(sqlite3_bind_int64(s, 5, seed));
    SQL(sqlite3_bind_text(s, 6, host, -1, SQLITE_STATIC));
    SQL(sqlite3_bind_int64(s, 7, (int64_t)getpid()));
    SQL(sqlite3_bind_double(s, 8, now_s()));
    SQL(sqlite3_step(s));
    stmt_release(s);
    s = NULL;
    int64_t id = sqlite3_last_insert_rowid(rs->db);
    if ((st = tx_commit(rs, e))) goto fail;
    *run_id = id;
    return MR_OK;
fail:
    stmt_release(s);
    tx_rollback(rs);
    return err_prefix(e, "starting a %s run", kind);
}

int runstore_end_run(runstore *rs, int64_t run_id, run_status status, mr_err *e) {
    if (status != RUN_OK && status != RUN_FAILED && status != RUN_KILLED)
        return err_set(e, MR_EINVAL, "%s: run %lld: end status must be ok, failed or killed, got %s", rs->path,
                       (long long)run_id, run_status_name(status));
    int st = tx_begin(rs, e);
    if (st) return st;
    sqlite3_stmt *s = NULL;
    if ((st = stmt_get(rs, ST_END_RUN, &s, e))) goto fail;
    SQL(sqlite3_bind_text(s, 1, run_status_name(status), -1, SQLITE_STATIC));
    SQL(sqlite3_bind_double(s, 2, now_s()));
    SQL(sqlite3_bind_int64(s, 3, run_id));
    SQL(sqlite3_step(s));
    stmt_release(s);
    s = NULL;
    if (sqlite3_changes(rs->db) != 1) {
        tx_rollback(rs);
        return err_set(e, MR_ENOTFOUND, "%s: no run %lld", rs->path, (long long)run_id);
    }
    if ((st = tx_commit(rs, e))) goto fail;
    return MR_OK;
fail:
    stmt_release(s);
    tx_rollback(rs);
    return err_prefix(e, "ending run %lld", (long long)run_id);
}

int runstore_resume_run(runstore *rs, int64_t run_id, mr_err *e) {
    int st = tx_begin(rs, e);
    if (st) return st;
    sqlite3_stmt *s = NULL;
    SQL(sqlite3_prepare_v2(rs->db, "UPDATE runs SET status = 'running', ended_at = NULL, pid = ? WHERE id = ?", -1,
                           &s, NULL));
    SQL(sqlite3_bind_int64(s, 1, (int64_t)getpid()));
    SQL(sqlite3_bind_int64(s, 2, run_id));
    SQL(sqlite3_step(s));
    sqlite3_finalize(s);
    s = NULL;
    if (sqlite3_changes(rs->db) != 1) {
        tx_rollback(rs);
        return err_set(e, MR_ENOTFOUND, "%s: no run %lld to resume", rs->path, (long long)run_id);
    }
    if ((st = tx_commit(rs, e))) goto fail;
    return MR_OK;
fail:
    sqlite3_finalize(s);
    tx_rollback(rs);
    return err_prefix(e, "resuming run %lld", (long long)run_id);
}

/* An insert that failed on the runs(id) foreign key means the caller's run id is wrong: say so plainly. */
static int fix_missing_run(runstore *rs, int64_t run_id, int st, mr_err *e) {
    if (rs->last_rc == SQLITE_CONSTRAINT_FOREIGNKEY)
        return err_set(e, MR_ENOTFOUND, "%s: no run %lld", rs->path, (long long)run_id);
    return st;
}

/* ---- metrics, samples, checkpoints, events ---- */

int runstore_log_metrics(runstore *rs, int64_t run_id, int64_t step, size_t n, const char *const names[],
                         const double values[], mr_err *e) {
    if (n == 0) return MR_OK;
    rs->last_rc = SQLITE_OK;
    int st = tx_begin(rs, e);
    if (st) return st;
    sqlite3_stmt *s = NULL;
    size_t i = 0;
    double t = now_s();
    if ((st = stmt_get(rs, ST_INSERT_METRIC, &s, e))) goto fail;
    for (; i < n; i++) {
        SQL(sqlite3_bind_int64(s, 1, run_id));
        SQL(sqlite3_bind_int64(s, 2, step));
        SQL(sqlite3_bind_text(s, 3, names[i], -1, SQLITE_STATIC));
        SQL(bind_real(s, 4, values[i]));
        SQL(sqlite3_bind_double(s, 5, t));
        SQL(sqlite3_step(s));
        sqlite3_reset(s);
    }
    stmt_release(s);
    s = NULL;
    if ((st = tx_commit(rs, e))) goto fail;
    return MR_OK;
fail:
    stmt_release(s);
    tx_rollback(rs);
    st = fix_missing_run(rs, run_id, st, e);
    if (i < n)
        return err_prefix(e, "run %lld step %lld: metric %zu of %zu ('%s') not logged, nor the step's others",
                          (long long)run_id, (long long)step, i + 1, n, names[i] ? names[i] : "(null)");
    return err_prefix(e, "run %lld step %lld: %zu metrics not logged", (long long)run_id, (long long)step, n);
}

int runstore_log_metric(runstore *rs, int64_t run_id, int64_t step, const char *name, double value, mr_err *e) {
    const char *names[1] = {name};
    return runstore_log_metrics(rs, run_id, step, 1, names, &value, e);
}

int runstore_log_samples(runstore *rs, int64_t run_id, size_t n, const runstore_sample *samples, mr_err *e) {
    if (n == 0) return MR_OK;
    rs->last_rc = SQLITE_OK;
    int st = tx_begin(rs, e);
    if (st) return st;
    sqlite3_stmt *s = NULL;
    size_t i = 0;
    if ((st = stmt_get(rs, ST_INSERT_SAMPLE, &s, e))) goto fail;
    for (; i < n; i++) {
        const runstore_sample *x = &samples[i];
        SQL(sqlite3_bind_int64(s, 1, run_id));
        SQL(sqlite3_bind_int64(s, 2, x->step));
        SQL(sqlite3_bind_text(s, 3, x->prompt ? x->prompt : "", -1, SQLITE_STATIC));
        SQL(sqlite3_bind_text(s, 4, x->completion ? x->completion : "", -1, SQLITE_STATIC));
        SQL(sqlite3_bind_text(s, 5, x->rewards_json, -1, SQLITE_STATIC));
        SQL(bind_real(s, 6, x->advantage));
        SQL(sqlite3_bind_text(s, 7, x->extra_json, -1, SQLITE_STATIC));
        SQL(sqlite3_step(s));
        sqlite3_reset(s);
    }
    stmt_release(s);
    s = NULL;
    if ((st = tx_commit(rs, e))) goto fail;
    return MR_OK;
fail:
    stmt_release(s);
    tx_rollback(rs);
    st = fix_missing_run(rs, run_id, st, e);
    if (i < n)
        return err_prefix(e, "run %lld: sample %zu of %zu (step %lld) not logged, nor the others", (long long)run_id,
                          i + 1, n, (long long)samples[i].step);
    return err_prefix(e, "run %lld: %zu samples not logged", (long long)run_id, n);
}

int runstore_log_sample(runstore *rs, int64_t run_id, const runstore_sample *sample, mr_err *e) {
    return runstore_log_samples(rs, run_id, 1, sample, e);
}

int runstore_log_checkpoint(runstore *rs, int64_t run_id, int64_t step, const char *path, const char *sha256_hex,
                            mr_err *e) {
    char hex[65];
    if (!path || !*path) return err_set(e, MR_EINVAL, "%s: run %lld: checkpoint path is empty", rs->path,
                                        (long long)run_id);
    if (!sha256_hex) {
        int st = sha256_file(path, hex, e);
        if (st) return err_prefix(e, "run %lld step %lld: checkpoint", (long long)run_id, (long long)step);
    } else {
        size_t len = strlen(sha256_hex);
        int ok = len == 64;
        for (size_t i = 0; ok && i < 64; i++) {
            char c = sha256_hex[i];
            if (c >= 'A' && c <= 'F') c = (char)(c - 'A' + 'a');
            ok = (c >= '0' && c <= '9') || (c >= 'a' && c <= 'f');
            hex[i] = c;
        }
        if (!ok)
            return err_set(e, MR_EINVAL, "%s: run %lld step %lld: checkpoint sha256 must be 64 hex digits, got '%.80s'",
                           rs->path, (long long)run_id, (long long)step, sha256_hex);
        hex[64] = '\0';
    }
    rs->last_rc = SQLITE_OK;
    int st = tx_begin(rs, e);
    if (st) return st;
    sqlite3_stmt *s = NULL;
    if ((st = stmt_get(rs, ST_INSERT_CHECKPOINT, &s, e))) goto fail;
    SQL(sqlite3_bind_int64(s, 1, run_id));
    SQL(sqlite3_bind_int64(s, 2, step));
    SQL(sqlite3_bind_text(s, 3, path, -1, SQLITE_STATIC));
    SQL(sqlite3_bind_text(s, 4, hex, -1, SQLITE_STATIC));
    SQL(sqlite3_bind_double(s, 5, now_s()));
    SQL(sqlite3_step(s));
    stmt_release(s);
    s = NULL;
    if ((st = tx_commit(rs, e))) goto fail;
    return MR_OK;
fail:
    stmt_release(s);
    tx_rollback(rs);
    st = fix_missing_run(rs, run_id, st, e);
    return err_prefix(e, "run %lld step %lld: checkpoint %s not logged", (long long)run_id, (long long)step, path);
}

int runstore_log_event(runstore *rs, int64_t run_id, event_level level, const char *message, mr_err *e) {
    if (level != EVENT_INFO && level != EVENT_WARNING && level != EVENT_ERROR)
        return err_set(e, MR_EINVAL, "%s: run %lld: event level %d is not info, warning or error", rs->path,
                       (long long)run_id, (int)level);
    rs->last_rc = SQLITE_OK;
    int st = tx_begin(rs, e);
    if (st) return st;
    sqlite3_stmt *s = NULL;
    if ((st = stmt_get(rs, ST_INSERT_EVENT, &s, e))) goto fail;
    SQL(sqlite3_bind_int64(s, 1, run_id));
    SQL(sqlite3_bind_double(s, 2, now_s()));
    SQL(sqlite3_bind_text(s, 3, event_level_name(level), -1, SQLITE_STATIC));
    SQL(sqlite3_bind_text(s, 4, message ? message : "", -1, SQLITE_STATIC));
    SQL(sqlite3_step(s));
    stmt_release(s);
    s = NULL;
    if ((st = tx_commit(rs, e))) goto fail;
    return MR_OK;
fail:
    stmt_release(s);
    tx_rollback(rs);
    st = fix_missing_run(rs, run_id, st, e);
    return err_prefix(e, "run %lld: event not logged", (long long)run_id);
}

/* ---- queries ---- */

static void run_from_row(sqlite3_stmt *s, runstore_run *r) {
    r->id = sqlite3_column_int64(s, 0);
    r->kind = column_text(s, 1);
    r->name = column_text(s, 2);
    r->recipe = column_text(s, 3);
    r->version = column_text(s, 4);
    r->seed = sqlite3_column_int64(s, 5);
    r->host = column_text(s, 6);
    r->pid = sqlite3_column_int64(s, 7);
    r->started_at = column_real(s, 8);
    r->ended_at = column_real(s, 9);
    r->status = column_text(s, 10);
    r->steps = sqlite3_column_int64(s, 11);
    r->last_step = sqlite3_column_type(s, 12) == SQLITE_NULL ? -1 : sqlite3_column_int64(s, 12);
}

int runstore_foreach_run(runstore *rs, runstore_run_fn fn, void *ud, mr_err *e) {
    int st = MR_OK, rc;
    sqlite3_stmt *s = NULL;
    if ((st = stmt_get(rs, ST_LIST_RUNS, &s, e))) return st;
    for (;;) {
        SQL(rc = sqlite3_step(s));
        if (rc != SQLITE_ROW) break;
        runstore_run r;
        run_from_row(s, &r);
        if ((st = fn(ud, &r))) break;
    }
fail:
    stmt_release(s);
    return st;
}

int runstore_get_run(runstore *rs, int64_t run_id, runstore_run_fn fn, void *ud, mr_err *e) {
    int st = MR_OK, rc;
    sqlite3_stmt *s = NULL;
    if ((st = stmt_get(rs, ST_GET_RUN, &s, e))) return st;
    SQL(sqlite3_bind_int64(s, 1, run_id));
    SQL(rc = sqlite3_step(s));
    if (rc != SQLITE_ROW) {
        st = err_set(e, MR_ENOTFOUND, "no run %lld in %s", (long long)run_id, rs->path);
        goto fail;
    }
    runstore_run r;
    run_from_row(s, &r);
    st = fn(ud, &r);
fail:
    stmt_release(s);
    return st;
}

static int foreach_metric_stmt(runstore *rs, int which, int64_t run_id, runstore_metric_fn fn, void *ud,
                               mr_err *e) {
    int st = MR_OK, rc;
    sqlite3_stmt *s = NULL;
    if ((st = stmt_get(rs, which, &s, e))) return st;
    SQL(sqlite3_bind_int64(s, 1, run_id));
    for (;;) {
        SQL(rc = sqlite3_step(s));
        if (rc != SQLITE_ROW) break;
        if ((st = fn(ud, sqlite3_column_int64(s, 0), column_text(s, 1), column_real(s, 2)))) break;
    }
fail:
    stmt_release(s);
    return st;
}

int runstore_foreach_latest_metric(runstore *rs, int64_t run_id, runstore_metric_fn fn, void *ud, mr_err *e) {
    return foreach_metric_stmt(rs, ST_LATEST_METRICS, run_id, fn, ud, e);
}

int runstore_foreach_metric(runstore *rs, int64_t run_id, runstore_metric_fn fn, void *ud, mr_err *e) {
    return foreach_metric_stmt(rs, ST_METRICS, run_id, fn, ud, e);
}

int runstore_foreach_sample(runstore *rs, int64_t run_id, runstore_sample_fn fn, void *ud, mr_err *e) {
    int st = MR_OK, rc;
    sqlite3_stmt *s = NULL;
    if ((st = stmt_get(rs, ST_SAMPLES, &s, e))) return st;
    SQL(sqlite3_bind_int64(s, 1, run_id));
    for (;;) {
        SQL(rc = sqlite3_step(s));
        if (rc != SQLITE_ROW) break;
        runstore_sample x = {
            .step = sqlite3_column_int64(s, 0),
            .prompt = column_text(s, 1),
            .completion = column_text(s, 2),
            .rewards_json = column_text(s, 3),
            .advantage = column_real(s, 4),
            .extra_json = column_text(s, 5),
        };
        if ((st = fn(ud, &x))) break;
    }
fail:
    stmt_release(s);
    return st;
}

int runstore_foreach_checkpoint(runstore *rs, int64_t run_id, runstore_checkpoint_fn fn, void *ud, mr_err *e) {
    int st = MR_OK, rc;
    sqlite3_stmt *s = NULL;
    if ((st = stmt_get(rs, ST_CHECKPOINTS, &s, e))) return st;
    SQL(sqlite3_bind_int64(s, 1, run_id));
    for (;;) {
        SQL(rc = sqlite3_step(s));
        if (rc != SQLITE_ROW) break;
        runstore_checkpoint c = {
            .step = sqlite3_column_int64(s, 0),
            .path = column_text(s, 1),
            .sha256 = column_text(s, 2),
            .time = column_real(s, 3),
        };
        if ((st = fn(ud, &c))) break;
    }
fail:
    stmt_release(s);
    return st;
}

int runstore_foreach_event(runstore *rs, int64_t run_id, int last, runstore_event_fn fn, void *ud, mr_err *e) {
    int st = MR_OK, rc;
    sqlite3_stmt *s = NULL;
    if ((st = stmt_get(rs, ST_EVENTS, &s, e))) return st;
    SQL(sqlite3_bind_int64(s, 1, run_id));
    SQL(sqlite3_bind_int64(s, 2, last > 0 ? last : -1)); /* LIMIT -1: no limit */
    for (;;) {
        SQL(rc = sqlite3_step(s));
        if (rc != SQLITE_ROW) break;
        runstore_event ev = {.time = column_real(s, 0), .level = column_text(s, 1), .message = column_text(s, 2)};
        if ((st = fn(ud, &ev))) break;
    }
fail:
    stmt_release(s);
    return st;
}
