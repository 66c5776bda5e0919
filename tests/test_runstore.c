/* test_runstore.c: the run store (core/runstore.h), its sha256 helper and `moerl runs`.
 * SHA-256 against the FIPS 180 known answers; a round trip through every table; NaN/inf kept; schema
 * migration from an empty file and from a version-1 file written by hand (and the migrated schema equal to a
 * fresh one); a newer schema, a foreign SQLite file and random bytes refused; two forked writers racing on a
 * fresh file lose nothing; a writer SIGKILLed mid-loop leaves an intact file whose steps are all-or-nothing;
 * the CLI's list/show/export output, its JSON, and its errors and exit codes. */
#include <criterion/criterion.h>
#include <cjson/cJSON.h>
#include <errno.h>
#include <float.h>
#include <math.h>
#include <signal.h>
#include <stdarg.h>
#include <sqlite3.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "core/mem.h"
#include "core/runstore.h"
#include "core/sha256.h"
#include "tests/testutil.h"

/* ---- helpers: raw SQLite access, independent of the code under test ---- */

static void raw_exec(const char *path, const char *sql) {
    sqlite3 *db = NULL;
    cr_assert_eq(sqlite3_open(path, &db), SQLITE_OK, "open %s", path);
    char *msg = NULL;
    int rc = sqlite3_exec(db, sql, NULL, NULL, &msg);
    cr_assert_eq(rc, SQLITE_OK, "%s: %s", sql, msg ? msg : "");
    sqlite3_close(db);
}

static int64_t raw_int(const char *path, const char *sql) {
    sqlite3 *db = NULL;
    sqlite3_stmt *s = NULL;
    cr_assert_eq(sqlite3_open_v2(path, &db, SQLITE_OPEN_READWRITE, NULL), SQLITE_OK, "open %s", path);
    cr_assert_eq(sqlite3_prepare_v2(db, sql, -1, &s, NULL), SQLITE_OK, "%s: %s", sql, sqlite3_errmsg(db));
    cr_assert_eq(sqlite3_step(s), SQLITE_ROW, "%s: no row", sql);
    int64_t v = sqlite3_column_int64(s, 0);
    sqlite3_finalize(s);
    sqlite3_close(db);
    return v;
}

/* All rows of a query, one line each, columns joined by '|' (malloc'd). */
static char *raw_rows(const char *path, const char *sql) {
    sqlite3 *db = NULL;
    sqlite3_stmt *s = NULL;
    cr_assert_eq(sqlite3_open_v2(path, &db, SQLITE_OPEN_READWRITE, NULL), SQLITE_OK);
    cr_assert_eq(sqlite3_prepare_v2(db, sql, -1, &s, NULL), SQLITE_OK, "%s: %s", sql, sqlite3_errmsg(db));
    size_t cap = 1 << 16, len = 0;
    char *out = calloc(1, cap);
    while (sqlite3_step(s) == SQLITE_ROW) {
        for (int i = 0; i < sqlite3_column_count(s); i++) {
            const char *t = (const char *)sqlite3_column_text(s, i);
            size_t need = len + (t ? strlen(t) : 4) + 3;
            if (need > cap) out = realloc(out, cap = 2 * need);
            len += (size_t)sprintf(out + len, "%s%s", i ? "|" : "", t ? t : "NULL");
        }
        if (len + 2 > cap) out = realloc(out, cap *= 2);
        out[len++] = '\n';
        out[len] = '\0';
    }
    sqlite3_finalize(s);
    sqlite3_close(db);
    return out;
}

static runstore *open_ok(const char *path) {
    runstore *rs = NULL;
    mr_err e = {0};
    int st = runstore_open(&rs, path, &e);
    cr_assert_eq(st, MR_OK, "runstore_open(%s): %s", path, e.msg);
    return rs;
}

static int file_exists(const char *path) {
    struct stat sb;
    return stat(path, &sb) == 0;
}

/* ---- SHA-256 (FIPS 180-2 appendix B / NIST example values) ---- */

static void hex_of(const void *data, size_t n, char hex[65]) {
    uint8_t d[32];
    sha256(data, n, d);
    sha256_hex(d, hex);
}

Test(sha256, fips_known_answers) {
    char hex[65];
    hex_of("abc", 3, hex);
    cr_expect_str_eq(hex, "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
    hex_of("", 0, hex);
    cr_expect_str_eq(hex, "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
    const char *two = "abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq"; /* 448 bits: padding spills */
    hex_of(two, strlen(two), hex);
    cr_expect_str_eq(hex, "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1");
    char *million = malloc(1000000);
    memset(million, 'a', 1000000);
    hex_of(million, 1000000, hex);
    cr_expect_str_eq(hex, "cdc76e5c9914fb9281a1c7e284d73e67f1809a48a497200e046d39ccc7112cd0");
    /* The same million fed in uneven pieces (1, 2, 3, ... bytes) must give the same digest. */
    sha256_ctx c;
    sha256_init(&c);
    size_t off = 0;
    for (size_t k = 1; off < 1000000; k++) {
        size_t n = k < 1000000 - off ? k : 1000000 - off;
        sha256_update(&c, million + off, n);
        off += n;
    }
    uint8_t d[32];
    sha256_final(&c, d);
    char hex2[65];
    sha256_hex(d, hex2);
    cr_expect_str_eq(hex2, "cdc76e5c9914fb9281a1c7e284d73e67f1809a48a497200e046d39ccc7112cd0");
    free(million);
}

Test(sha256, file_and_missing_file) {
    char *dir = tu_tmpdir();
    char *p = tu_path(dir, "a.bin");
    /* 3 MiB + 5: crosses the 1 MiB read pieces */
    size_t n = 3 * (1 << 20) + 5;
    unsigned char *buf = malloc(n);
    for (size_t i = 0; i < n; i++) buf[i] = (unsigned char)(i * 2654435761u >> 13);
    cr_assert_eq(tu_write(p, buf, n), 0);
    char want[65], got[65];
    hex_of(buf, n, want);
    mr_err e = {0};
    cr_assert_eq(sha256_file(p, got, &e), MR_OK, "%s", e.msg);
    cr_expect_str_eq(got, want);
    char *missing = tu_path(dir, "nope.bin");
    cr_expect_eq(sha256_file(missing, got, &e), MR_EIO);
    cr_expect(strstr(e.msg, "nope.bin") && strstr(e.msg, "No such file"), "%s", e.msg);
    free(buf);
    free(p);
    free(missing);
    tu_rmtree(dir);
    free(dir);
}

/* ---- round trip of every table ---- */

typedef struct {
    int64_t id, seed, pid, steps, last_step;
    char kind[16], name[64], status[16], host[256], version[32], recipe[256];
    int has_name, has_recipe;
    double started_at, ended_at;
} run_copy;

static int copy_run(void *ud, const runstore_run *r) {
    run_copy *c = ud;
    c->id = r->id, c->seed = r->seed, c->pid = r->pid, c->steps = r->steps, c->last_step = r->last_step;
    snprintf(c->kind, sizeof c->kind, "%s", r->kind);
    snprintf(c->status, sizeof c->status, "%s", r->status);
    snprintf(c->host, sizeof c->host, "%s", r->host);
    snprintf(c->version, sizeof c->version, "%s", r->version);
    c->has_name = r->name != NULL;
    c->has_recipe = r->recipe != NULL;
    snprintf(c->name, sizeof c->name, "%s", r->name ? r->name : "");
    snprintf(c->recipe, sizeof c->recipe, "%s", r->recipe ? r->recipe : "");
    c->started_at = r->started_at, c->ended_at = r->ended_at;
    return 0;
}

static run_copy get_run(runstore *rs, int64_t id) {
    run_copy c;
    memset(&c, 0, sizeof c);
    mr_err e = {0};
    int st = runstore_get_run(rs, id, copy_run, &c, &e);
    cr_assert_eq(st, MR_OK, "get_run %lld: %s", (long long)id, e.msg);
    return c;
}

typedef struct {
    int n;
    int64_t step[64];
    char name[64][32];
    double value[64];
} metric_list;

static int collect_metric(void *ud, int64_t step, const char *name, double value) {
    metric_list *m = ud;
    cr_assert_lt(m->n, 64);
    m->step[m->n] = step;
    snprintf(m->name[m->n], sizeof m->name[0], "%s", name);
    m->value[m->n++] = value;
    return 0;
}

typedef struct {
    int n;
    char text[8][256];
    double adv[8];
} sample_list;

static int collect_sample(void *ud, const runstore_sample *s) {
    sample_list *l = ud;
    cr_assert_lt(l->n, 8);
    snprintf(l->text[l->n], sizeof l->text[0], "%lld|%s|%s|%s|%s", (long long)s->step, s->prompt, s->completion,
             s->rewards_json ? s->rewards_json : "NULL", s->extra_json ? s->extra_json : "NULL");
    l->adv[l->n++] = s->advantage;
    return 0;
}

typedef struct {
    int n;
    char text[16][256];
} text_list;

static int collect_checkpoint(void *ud, const runstore_checkpoint *c) {
    text_list *l = ud;
    cr_assert_lt(l->n, 16);
    snprintf(l->text[l->n++], sizeof l->text[0], "%lld|%s|%s", (long long)c->step, c->path, c->sha256);
    return 0;
}

static int collect_event(void *ud, const runstore_event *ev) {
    text_list *l = ud;
    cr_assert_lt(l->n, 16);
    snprintf(l->text[l->n++], sizeof l->text[0], "%s|%s", ev->level, ev->message);
    return 0;
}

static double wall(void) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

Test(runstore, fresh_store_is_wal_versioned_and_tagged) {
    char *dir = tu_tmpdir();
    char *db = tu_path(dir, "runs.db");
    runstore *rs = open_ok(db);
    int v = -1;
    mr_err e = {0};
    cr_assert_eq(runstore_schema_version(rs, &v, &e), MR_OK, "%s", e.msg);
    cr_expect_eq(v, RUNSTORE_SCHEMA_VERSION);
    cr_expect_str_eq(runstore_path(rs), db);
    runstore_close(rs);
    cr_expect_eq(raw_int(db, "PRAGMA user_version"), RUNSTORE_SCHEMA_VERSION);
    cr_expect_eq(raw_int(db, "PRAGMA application_id"), RUNSTORE_APPLICATION_ID);
    char *mode = raw_rows(db, "PRAGMA journal_mode");
    cr_expect_str_eq(mode, "wal\n");
    free(mode);
    char *tables = raw_rows(db, "SELECT name FROM sqlite_schema WHERE type = 'table' ORDER BY name");
    cr_expect_str_eq(tables, "checkpoints\nevents\nmetrics\nruns\nsamples\n");
    free(tables);
    /* The (run_id, name, step) key serves "latest of each metric"; (run_id, step, name) serves the export. */
    char *plan = raw_rows(db, "EXPLAIN QUERY PLAN SELECT step, name, value FROM metrics WHERE run_id = 1 "
                              "ORDER BY step, name");
    cr_expect(strstr(plan, "metrics_by_step") && !strstr(plan, "TEMP B-TREE"), "%s", plan);
    free(plan);
    free(db);
    tu_rmtree(dir);
    free(dir);
}

Test(runstore, round_trip_every_table) {
    char *dir = tu_tmpdir();
    char *db = tu_path(dir, "runs.db");
    char *ck = tu_path(dir, "ckpt.safetensors");
    cr_assert_eq(tu_write(ck, "not really a checkpoint", (size_t)-1), 0);
    runstore *rs = open_ok(db);
    mr_err e = {0};
    int64_t id = 0;
    double t0 = wall();
    cr_assert_eq(runstore_begin_run(rs, "grpo", "tiny-grpo", "name: tiny-grpo\nseed: 1234\n", -77, &id, &e), MR_OK,
                 "%s", e.msg);
    double t1 = wall();
    cr_expect_eq(id, 1);
    run_copy r = get_run(rs, id);
    char host[256];
    gethostname(host, sizeof host);
    cr_expect_str_eq(r.kind, "grpo");
    cr_expect_str_eq(r.name, "tiny-grpo");
    cr_expect_str_eq(r.recipe, "name: tiny-grpo\nseed: 1234\n");
    cr_expect_eq(r.seed, -77);
    cr_expect_str_eq(r.host, host);
    cr_expect_str_eq(r.version, MOERL_VERSION);
    cr_expect_eq(r.pid, (int64_t)getpid());
    cr_expect_str_eq(r.status, "running");
    cr_expect(r.started_at >= t0 - 0.001 && r.started_at <= t1 + 0.001, "%f not in [%f, %f]", r.started_at, t0, t1);
    cr_expect(isnan(r.ended_at));
    cr_expect_eq(r.steps, 0);
    cr_expect_eq(r.last_step, -1);

    /* metrics: a batch per step, then a single one; a later value for (name, step) replaces the earlier */
    const char *names[] = {"loss", "lr", "reward/mean"};
    for (int step = 0; step < 3; step++) {
        double vals[] = {2.0 - 0.5 * step, 1e-4 * (step + 1), 0.25 * step};
        cr_assert_eq(runstore_log_metrics(rs, id, step, 3, names, vals, &e), MR_OK, "%s", e.msg);
    }
    cr_assert_eq(runstore_log_metric(rs, id, 5, "loss", 0.125, &e), MR_OK, "%s", e.msg);
    cr_assert_eq(runstore_log_metric(rs, id, 1, "lr", 7.5, &e), MR_OK, "%s", e.msg); /* replaces 2e-4 */
    metric_list all = {0};
    cr_assert_eq(runstore_foreach_metric(rs, id, collect_metric, &all, &e), MR_OK, "%s", e.msg);
    cr_assert_eq(all.n, 10);
    cr_expect_eq(all.step[0], 0);
    cr_expect_str_eq(all.name[0], "loss");
    cr_expect_eq(all.value[0], 2.0);
    cr_expect_str_eq(all.name[4], "lr");
    cr_expect_eq(all.step[4], 1);
    cr_expect_eq(all.value[4], 7.5);
    cr_expect_eq(all.value[8], 0.5); /* reward/mean at step 2 */
    cr_expect_eq(all.step[9], 5);
    metric_list latest = {0};
    cr_assert_eq(runstore_foreach_latest_metric(rs, id, collect_metric, &latest, &e), MR_OK, "%s", e.msg);
    cr_assert_eq(latest.n, 3);
    cr_expect_str_eq(latest.name[0], "loss");
    cr_expect_eq(latest.step[0], 5);
    cr_expect_eq(latest.value[0], 0.125);
    cr_expect_str_eq(latest.name[1], "lr");
    cr_expect_eq(latest.step[1], 2);
    cr_expect_eq(latest.value[1], 1e-4 * 3);
    cr_expect_str_eq(latest.name[2], "reward/mean");
    cr_expect_eq(latest.value[2], 0.5);
    r = get_run(rs, id);
    cr_expect_eq(r.steps, 4);
    cr_expect_eq(r.last_step, 5);

    /* samples */
    runstore_sample smp[2] = {
        {.step = 3, .prompt = "2+2=", .completion = "4", .rewards_json = "{\"format\":1,\"accuracy\":1}",
         .advantage = 0.75, .extra_json = "{\"tokens\":1}"},
        {.step = 3, .prompt = "2+2=", .completion = "five \"quoted\"\n", .rewards_json = NULL, .advantage = -0.75,
         .extra_json = NULL},
    };
    cr_assert_eq(runstore_log_samples(rs, id, 2, smp, &e), MR_OK, "%s", e.msg);
    runstore_sample one = {.step = 4, .prompt = "p", .completion = "c", .rewards_json = "{}", .advantage = 0};
    cr_assert_eq(runstore_log_sample(rs, id, &one, &e), MR_OK, "%s", e.msg);
    sample_list sl = {0};
    cr_assert_eq(runstore_foreach_sample(rs, id, collect_sample, &sl, &e), MR_OK, "%s", e.msg);
    cr_assert_eq(sl.n, 3);
    cr_expect_str_eq(sl.text[0], "3|2+2=|4|{\"format\":1,\"accuracy\":1}|{\"tokens\":1}");
    cr_expect_str_eq(sl.text[1], "3|2+2=|five \"quoted\"\n|NULL|NULL");
    cr_expect_str_eq(sl.text[2], "4|p|c|{}|NULL");
    cr_expect_eq(sl.adv[0], 0.75);
    cr_expect_eq(sl.adv[1], -0.75);

    /* checkpoints: hashed here, given in upper case (stored lower), refused when not 64 hex digits */
    cr_assert_eq(runstore_log_checkpoint(rs, id, 2, ck, NULL, &e), MR_OK, "%s", e.msg);
    cr_assert_eq(runstore_log_checkpoint(rs, id, 5, "/x/y.safetensors",
                                         "BA7816BF8F01CFEA414140DE5DAE2223B00361A396177A9CB410FF61F20015AD", &e),
                 MR_OK, "%s", e.msg);
    cr_expect_eq(runstore_log_checkpoint(rs, id, 6, "/x/z", "abc", &e), MR_EINVAL);
    cr_expect(strstr(e.msg, "64 hex digits, got 'abc'"), "%s", e.msg);
    text_list cl = {0};
    cr_assert_eq(runstore_foreach_checkpoint(rs, id, collect_checkpoint, &cl, &e), MR_OK, "%s", e.msg);
    cr_assert_eq(cl.n, 2);
    char want[512], hex[65];
    hex_of("not really a checkpoint", strlen("not really a checkpoint"), hex);
    snprintf(want, sizeof want, "2|%s|%s", ck, hex);
    cr_expect_str_eq(cl.text[0], want);
    cr_expect_str_eq(cl.text[1], "5|/x/y.safetensors|ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");

    /* events: all, and the last two in order */
    cr_assert_eq(runstore_log_event(rs, id, EVENT_INFO, "started", &e), MR_OK, "%s", e.msg);
    cr_assert_eq(runstore_log_event(rs, id, EVENT_WARNING, "reward plugin slow", &e), MR_OK, "%s", e.msg);
    cr_assert_eq(runstore_log_event(rs, id, EVENT_ERROR, "nan in loss", &e), MR_OK, "%s", e.msg);
    text_list el = {0};
    cr_assert_eq(runstore_foreach_event(rs, id, 0, collect_event, &el, &e), MR_OK, "%s", e.msg);
    cr_assert_eq(el.n, 3);
    cr_expect_str_eq(el.text[0], "info|started");
    text_list last2 = {0};
    cr_assert_eq(runstore_foreach_event(rs, id, 2, collect_event, &last2, &e), MR_OK, "%s", e.msg);
    cr_assert_eq(last2.n, 2);
    cr_expect_str_eq(last2.text[0], "warning|reward plugin slow");
    cr_expect_str_eq(last2.text[1], "error|nan in loss");

    /* end */
    cr_assert_eq(runstore_end_run(rs, id, RUN_FAILED, &e), MR_OK, "%s", e.msg);
    r = get_run(rs, id);
    cr_expect_str_eq(r.status, "failed");
    cr_expect(r.ended_at >= r.started_at && r.ended_at <= wall() + 0.001);
    cr_expect_eq(runstore_end_run(rs, id, RUN_RUNNING, &e), MR_EINVAL);

    /* a second run, NULL name and recipe */
    int64_t id2 = 0;
    cr_assert_eq(runstore_begin_run(rs, "check", NULL, NULL, 0, &id2, &e), MR_OK, "%s", e.msg);
    cr_expect_eq(id2, 2);
    r = get_run(rs, id2);
    cr_expect(!r.has_name && !r.has_recipe);
    runstore_close(rs);

    /* what was written is what another connection reads */
    char *rows = raw_rows(db, "SELECT run_id, step, name, value FROM metrics WHERE step = 1 ORDER BY name");
    cr_expect_str_eq(rows, "1|1|loss|1.5\n1|1|lr|7.5\n1|1|reward/mean|0.25\n");
    free(rows);
    free(ck);
    free(db);
    tu_rmtree(dir);
    free(dir);
}

Test(runstore, bad_arguments_and_unknown_runs) {
    char *dir = tu_tmpdir();
    char *db = tu_path(dir, "runs.db");
    runstore *rs = open_ok(db);
    mr_err e = {0};
    int64_t id = 0;
    cr_expect_eq(runstore_begin_run(rs, "pretrain", "x", NULL, 1, &id, &e), MR_EINVAL);
    cr_expect(strstr(e.msg, "run kind must be one of sft, grpo, eval, check; got 'pretrain'"), "%s", e.msg);
    cr_expect_eq(runstore_log_metric(rs, 999, 0, "loss", 1.0, &e), MR_ENOTFOUND);
    cr_expect(strstr(e.msg, "no run 999"), "%s", e.msg);
    cr_expect_eq(runstore_log_event(rs, 999, EVENT_INFO, "x", &e), MR_ENOTFOUND);
    cr_expect_eq(runstore_end_run(rs, 999, RUN_OK, &e), MR_ENOTFOUND);
    cr_expect(strstr(e.msg, "no run 999"), "%s", e.msg);
    run_copy c;
    cr_expect_eq(runstore_get_run(rs, 999, copy_run, &c, &e), MR_ENOTFOUND);
    snprintf(c.name, sizeof c.name, "no run 999 in %s", db);
    cr_expect_str_eq(e.msg, c.name);
    runstore_close(rs);
    cr_expect_eq(raw_int(db, "SELECT count(*) FROM metrics"), 0);
    free(db);
    tu_rmtree(dir);
    free(dir);
}

/* A step's batch is one transaction: a failure at its 3rd metric leaves none of the step's metrics. */
Test(runstore, metric_batch_is_all_or_nothing) {
    char *dir = tu_tmpdir();
    char *db = tu_path(dir, "runs.db");
    runstore *rs = open_ok(db);
    mr_err e = {0};
    int64_t id = 0;
    cr_assert_eq(runstore_begin_run(rs, "sft", "b", NULL, 1, &id, &e), MR_OK, "%s", e.msg);
    const char *bad[] = {"a", "b", "", "d"};
    double v[] = {1, 2, 3, 4};
    cr_expect_eq(runstore_log_metrics(rs, id, 7, 4, bad, v, &e), MR_EDB);
    cr_expect(strstr(e.msg, "metric 3 of 4 ('')") && strstr(e.msg, "metric_name_not_empty") &&
                  strstr(e.msg, "core/runstore.c:"),
              "%s", e.msg);
    runstore_sample s[2] = {{.step = 1, .prompt = "p", .completion = "c", .rewards_json = "{\"f\":1}"},
                            {.step = 1, .prompt = "p", .completion = "c", .rewards_json = "[1,2]"}};
    cr_expect_eq(runstore_log_samples(rs, id, 2, s, &e), MR_EDB);
    cr_expect(strstr(e.msg, "sample 2 of 2") && strstr(e.msg, "rewards_is_json_object"), "%s", e.msg);
    s[1].rewards_json = "{\"f\":1}";
    s[1].extra_json = "{not json";
    cr_expect_eq(runstore_log_samples(rs, id, 2, s, &e), MR_EDB);
    cr_expect(strstr(e.msg, "extra_is_json"), "%s", e.msg);
    /* the connection is usable afterwards: the rollback left no transaction open */
    const char *good[] = {"a", "b"};
    cr_assert_eq(runstore_log_metrics(rs, id, 8, 2, good, v, &e), MR_OK, "%s", e.msg);
    runstore_close(rs);
    cr_expect_eq(raw_int(db, "SELECT count(*) FROM metrics WHERE step = 7"), 0);
    cr_expect_eq(raw_int(db, "SELECT count(*) FROM metrics WHERE step = 8"), 2);
    cr_expect_eq(raw_int(db, "SELECT count(*) FROM samples"), 0);
    free(db);
    tu_rmtree(dir);
    free(dir);
}

Test(runstore, non_finite_values_round_trip) {
    char *dir = tu_tmpdir();
    char *db = tu_path(dir, "runs.db");
    runstore *rs = open_ok(db);
    mr_err e = {0};
    int64_t id = 0;
    cr_assert_eq(runstore_begin_run(rs, "eval", "nf", NULL, 1, &id, &e), MR_OK, "%s", e.msg);
    const char *names[] = {"a_nan", "b_inf", "c_ninf", "d_max", "e_denorm", "f_tenth", "g_neg"};
    double vals[] = {NAN, INFINITY, -INFINITY, DBL_MAX, 4.9406564584124654e-324, 0.1, -123456789.125};
    cr_assert_eq(runstore_log_metrics(rs, id, 0, 7, names, vals, &e), MR_OK, "%s", e.msg);
    runstore_sample s = {.step = 0, .prompt = "p", .completion = "c", .advantage = NAN};
    cr_assert_eq(runstore_log_sample(rs, id, &s, &e), MR_OK, "%s", e.msg);
    s.advantage = -INFINITY;
    cr_assert_eq(runstore_log_sample(rs, id, &s, &e), MR_OK, "%s", e.msg);
    runstore_close(rs);

    rs = open_ok(db); /* read back through a fresh connection */
    metric_list m = {0};
    cr_assert_eq(runstore_foreach_metric(rs, id, collect_metric, &m, &e), MR_OK, "%s", e.msg);
    cr_assert_eq(m.n, 7);
    cr_expect(isnan(m.value[0]), "%g", m.value[0]);
    cr_expect(isinf(m.value[1]) && m.value[1] > 0, "%g", m.value[1]);
    cr_expect(isinf(m.value[2]) && m.value[2] < 0, "%g", m.value[2]);
    for (int i = 3; i < 7; i++) cr_expect_eq(m.value[i], vals[i], "%s: %.17g != %.17g", names[i], m.value[i], vals[i]);
    sample_list sl = {0};
    cr_assert_eq(runstore_foreach_sample(rs, id, collect_sample, &sl, &e), MR_OK, "%s", e.msg);
    cr_assert_eq(sl.n, 2);
    cr_expect(isnan(sl.adv[0]));
    cr_expect(isinf(sl.adv[1]) && sl.adv[1] < 0);
    runstore_close(rs);
    free(db);
    tu_rmtree(dir);
    free(dir);
}

/* ---- schema versions ---- */

/* Version 1 of the schema, as moerl wrote it before samples and pid existed: a file from older code. */
static const char *const SCHEMA_V1 =
    "PRAGMA application_id = 1834120558;\n"
    "CREATE TABLE runs (\n"
    "  id INTEGER PRIMARY KEY,\n"
    "  kind TEXT NOT NULL CHECK (kind IN ('sft', 'grpo', 'eval', 'check')),\n"
    "  name TEXT,\n"
    "  recipe TEXT,\n"
    "  version TEXT NOT NULL,\n"
    "  seed INTEGER NOT NULL,\n"
    "  host TEXT NOT NULL,\n"
    "  started_at REAL NOT NULL,\n"
    "  ended_at REAL,\n"
    "  status TEXT NOT NULL DEFAULT 'running' CHECK (status IN ('running', 'ok', 'failed', 'killed'))\n"
    ");\n"
    "CREATE TABLE metrics (\n"
    "  run_id INTEGER NOT NULL REFERENCES runs(id) ON DELETE CASCADE,\n"
    "  step INTEGER NOT NULL,\n"
    "  name TEXT NOT NULL CONSTRAINT metric_name_not_empty CHECK (length(name) > 0),\n"
    "  value REAL,\n"
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
    "CREATE INDEX events_by_run ON events(run_id);\n"
    "PRAGMA user_version = 1;\n";

static const char *const SCHEMA_SQL = "SELECT type, name, tbl_name, sql FROM sqlite_schema ORDER BY name";

Test(runstore, migrates_from_version_1) {
    char *dir = tu_tmpdir();
    char *old = tu_path(dir, "old.db");
    char *fresh = tu_path(dir, "fresh.db");
    raw_exec(old, SCHEMA_V1);
    raw_exec(old, "INSERT INTO runs (kind, name, version, seed, host, started_at, ended_at, status) "
                  "VALUES ('sft', 'legacy', '0.0.9', 42, 'oldhost', 1700000000.5, 1700000060.5, 'ok');"
                  "INSERT INTO metrics VALUES (1, 0, 'loss', 3.5, 1700000001), (1, 1, 'loss', NULL, 1700000002);");
    cr_assert_eq(raw_int(old, "PRAGMA user_version"), 1);

    runstore *rs = open_ok(old);
    mr_err e = {0};
    int v = 0;
    cr_assert_eq(runstore_schema_version(rs, &v, &e), MR_OK, "%s", e.msg);
    cr_expect_eq(v, RUNSTORE_SCHEMA_VERSION);
    run_copy r = get_run(rs, 1);
    cr_expect_str_eq(r.name, "legacy");
    cr_expect_str_eq(r.version, "0.0.9");
    cr_expect_eq(r.pid, 0); /* column added by migration 2: NULL for old runs */
    cr_expect_eq(r.started_at, 1700000000.5);
    cr_expect_eq(r.steps, 2);
    metric_list m = {0};
    cr_assert_eq(runstore_foreach_metric(rs, 1, collect_metric, &m, &e), MR_OK, "%s", e.msg);
    cr_assert_eq(m.n, 2);
    cr_expect_eq(m.value[0], 3.5);
    cr_expect(isnan(m.value[1]));
    runstore_sample s = {.step = 2, .prompt = "p", .completion = "c", .rewards_json = "{\"f\":0.5}"};
    cr_expect_eq(runstore_log_sample(rs, 1, &s, &e), MR_OK, "%s", e.msg); /* the table migration 2 added */
    runstore_close(rs);

    /* Migrating the old file gives exactly the schema a fresh file gets. */
    runstore_close(open_ok(fresh));
    char *a = raw_rows(old, SCHEMA_SQL), *b = raw_rows(fresh, SCHEMA_SQL);
    cr_expect_str_eq(a, b);
    cr_expect(strstr(a, "pid INTEGER"), "%s", a);
    free(a);
    free(b);
    free(old);
    free(fresh);
    tu_rmtree(dir);
    free(dir);
}

/* A migration is one transaction: when step 1 -> 2 fails half-way, none of it (not the ALTER TABLE) stays. */
Test(runstore, failed_migration_changes_nothing) {
    char *dir = tu_tmpdir();
    char *db = tu_path(dir, "old.db");
    raw_exec(db, SCHEMA_V1);
    raw_exec(db, "CREATE TABLE samples (x);"); /* in the way of migration 2, after its ALTER TABLE */
    runstore *rs = NULL;
    mr_err e = {0};
    cr_expect_eq(runstore_open(&rs, db, &e), MR_EDB);
    cr_expect(strstr(e.msg, "migrating schema 1 -> 2: ") && strstr(e.msg, "table samples already exists"), "%s",
              e.msg);
    cr_expect_null(rs);
    cr_expect_eq(raw_int(db, "PRAGMA user_version"), 1);
    cr_expect_eq(raw_int(db, "SELECT count(*) FROM pragma_table_info('runs') WHERE name = 'pid'"), 0);
    free(db);
    tu_rmtree(dir);
    free(dir);
}

Test(runstore, version_0_files) {
    char *dir = tu_tmpdir();
    char *empty = tu_path(dir, "empty.db");   /* 0 bytes */
    char *blank = tu_path(dir, "blank.db");   /* SQLite file, user_version 0, no tables */
    char *foreign = tu_path(dir, "other.db"); /* another program's tables */
    char *appid = tu_path(dir, "appid.db");   /* another program's application_id */
    cr_assert_eq(tu_write(empty, "", 0), 0);
    raw_exec(blank, "PRAGMA page_size = 4096; VACUUM;");
    raw_exec(foreign, "CREATE TABLE runs (x); INSERT INTO runs VALUES (1);");
    raw_exec(appid, "PRAGMA application_id = 42; CREATE TABLE t (x);");
    mr_err e = {0};
    runstore *rs = NULL;

    /* reading refuses them all and changes nothing */
    cr_expect_eq(runstore_open_existing(&rs, empty, &e), MR_EFORMAT);
    cr_expect(strstr(e.msg, "empty file, not a moerl run store"), "%s", e.msg);
    cr_expect_eq(runstore_open_existing(&rs, blank, &e), MR_EFORMAT);
    cr_expect(strstr(e.msg, "not a moerl run store (no schema)"), "%s", e.msg);
    cr_expect_eq(raw_int(blank, "SELECT count(*) FROM sqlite_schema"), 0);
    cr_expect_null(rs);

    /* writing adopts the empty ones */
    rs = open_ok(empty);
    runstore_close(rs);
    cr_expect_eq(raw_int(empty, "PRAGMA user_version"), RUNSTORE_SCHEMA_VERSION);
    rs = open_ok(blank);
    runstore_close(rs);
    cr_expect_eq(raw_int(blank, "PRAGMA user_version"), RUNSTORE_SCHEMA_VERSION);

    /* but not another program's database */
    cr_expect_eq(runstore_open(&rs, foreign, &e), MR_EFORMAT);
    cr_expect(strstr(e.msg, "not a moerl run store (it has tables but no schema version)"), "%s", e.msg);
    cr_expect_eq(raw_int(foreign, "SELECT count(*) FROM sqlite_schema"), 1);
    cr_expect_eq(runstore_open(&rs, appid, &e), MR_EFORMAT);
    cr_expect(strstr(e.msg, "application_id is 0x2a"), "%s", e.msg);
    cr_expect_null(rs);
    free(empty);
    free(blank);
    free(foreign);
    free(appid);
    tu_rmtree(dir);
    free(dir);
}

Test(runstore, newer_schema_is_refused) {
    char *dir = tu_tmpdir();
    char *db = tu_path(dir, "runs.db");
    runstore_close(open_ok(db));
    char sql[64];
    snprintf(sql, sizeof sql, "PRAGMA user_version = %d", RUNSTORE_SCHEMA_VERSION + 1);
    raw_exec(db, sql);
    runstore *rs = NULL;
    mr_err e = {0};
    char want[256];
    snprintf(want, sizeof want, "run store schema version %d is newer than this moerl %s understands (%d)",
             RUNSTORE_SCHEMA_VERSION + 1, MOERL_VERSION, RUNSTORE_SCHEMA_VERSION);
    cr_expect_eq(runstore_open(&rs, db, &e), MR_EDB);
    cr_expect(strstr(e.msg, want) && strstr(e.msg, db), "%s", e.msg);
    cr_expect_eq(runstore_open_existing(&rs, db, &e), MR_EDB);
    cr_expect(strstr(e.msg, want), "%s", e.msg);
    cr_expect_null(rs);
    cr_expect_eq(raw_int(db, "PRAGMA user_version"), RUNSTORE_SCHEMA_VERSION + 1);
    free(db);
    tu_rmtree(dir);
    free(dir);
}

Test(runstore, missing_and_corrupt_files) {
    char *dir = tu_tmpdir();
    char *missing = tu_path(dir, "missing.db");
    char *junk = tu_path(dir, "junk.db");
    runstore *rs = NULL;
    mr_err e = {0};
    cr_expect_eq(runstore_open_existing(&rs, missing, &e), MR_ENOTFOUND);
    char want[512];
    snprintf(want, sizeof want, "%s: no such file", missing);
    cr_expect_str_eq(e.msg, want);
    cr_expect(!file_exists(missing), "reading created %s", missing);

    unsigned char bytes[8192];
    uint32_t x = 12345;
    for (size_t i = 0; i < sizeof bytes; i++) bytes[i] = (unsigned char)((x = x * 1664525u + 1013904223u) >> 24);
    cr_assert_eq(tu_write(junk, bytes, sizeof bytes), 0);
    cr_expect_eq(runstore_open(&rs, junk, &e), MR_EFORMAT);
    snprintf(want, sizeof want, "%s: not a moerl run store (file is not a database)", junk);
    cr_expect_str_eq(e.msg, want);
    cr_expect_eq(runstore_open_existing(&rs, junk, &e), MR_EFORMAT);
    cr_expect_str_eq(e.msg, want);
    size_t n = 0;
    char *after = tu_read(junk, &n);
    cr_expect(n == sizeof bytes && memcmp(after, bytes, n) == 0, "the junk file was modified");
    free(after);
    cr_expect_null(rs);
    free(missing);
    free(junk);
    tu_rmtree(dir);
    free(dir);
}

Test(runstore, allocation_failures) {
    char *dir = tu_tmpdir();
    char *db = tu_path(dir, "runs.db");
    runstore *rs = NULL;
    mr_err e = {0};
    for (long k = 1; k <= 2; k++) {
        long before = mem_injected_failures();
        mem_fail_after(k);
        cr_expect_eq(runstore_open(&rs, db, &e), MR_ENOMEM, "k=%ld", k);
        mem_fail_after(0);
        cr_expect_eq(mem_injected_failures(), before + 1);
        cr_expect(strstr(e.msg, "no memory"), "%s", e.msg);
        cr_expect_null(rs);
    }
    char *ck = tu_path(dir, "c.bin");
    cr_assert_eq(tu_write(ck, "x", 1), 0);
    rs = open_ok(db);
    int64_t id;
    cr_assert_eq(runstore_begin_run(rs, "sft", "a", NULL, 0, &id, &e), MR_OK, "%s", e.msg);
    mem_fail_after(1); /* the hash buffer */
    cr_expect_eq(runstore_log_checkpoint(rs, id, 0, ck, NULL, &e), MR_ENOMEM);
    mem_fail_after(0);
    runstore_close(rs);
    cr_expect_eq(raw_int(db, "SELECT count(*) FROM checkpoints"), 0);
    free(ck);
    free(db);
    tu_rmtree(dir);
    free(dir);
}

/* ---- processes ---- */

enum { PER_WRITER = 2000 };

/* A child: waits for the start signal, then appends PER_WRITER single-metric transactions. */
static void concurrent_writer(const char *db, int go_fd, int k) {
    char c;
    if (read(go_fd, &c, 1) < 0) _exit(3);
    runstore *rs = NULL;
    mr_err e = {0};
    int64_t id;
    char name[32];
    snprintf(name, sizeof name, "writer-%d", k);
    if (runstore_open(&rs, db, &e) || runstore_begin_run(rs, "eval", name, NULL, k, &id, &e)) goto fail;
    for (int i = 0; i < PER_WRITER; i++)
        if (runstore_log_metric(rs, id, i, "x", k * 100000.0 + i, &e)) goto fail;
    if (runstore_end_run(rs, id, RUN_OK, &e)) goto fail;
    runstore_close(rs);
    _exit(0);
fail:
    fprintf(stderr, "writer %d: %s\n", k, e.msg);
    _exit(1);
}

Test(runstore, two_processes_append_at_once_and_lose_nothing) {
    char *dir = tu_tmpdir();
    char *db = tu_path(dir, "runs.db"); /* does not exist yet: both race to create and migrate it too */
    int go[2];
    cr_assert_eq(pipe(go), 0);
    pid_t kids[2];
    for (int k = 0; k < 2; k++) {
        kids[k] = fork();
        cr_assert_neq(kids[k], -1);
        if (kids[k] == 0) {
            close(go[1]);
            concurrent_writer(db, go[0], k + 1);
        }
    }
    close(go[0]);
    close(go[1]); /* EOF on the pipe: both start now */
    for (int k = 0; k < 2; k++) {
        int status;
        cr_assert_eq(waitpid(kids[k], &status, 0), kids[k]);
        cr_expect(WIFEXITED(status) && WEXITSTATUS(status) == 0, "writer %d: status 0x%x", k + 1, status);
    }
    cr_expect_eq(raw_int(db, "SELECT count(*) FROM metrics"), 2 * PER_WRITER);
    cr_expect_eq(raw_int(db, "SELECT count(*) FROM runs WHERE status = 'ok'"), 2);
    cr_expect_eq(raw_int(db, "PRAGMA user_version"), RUNSTORE_SCHEMA_VERSION);
    /* each writer's rows are all there, with its own values */
    char *rows = raw_rows(db, "SELECT r.name, count(*), min(m.step), max(m.step), "
                              "sum(m.value = r.seed * 100000.0 + m.step) "
                              "FROM metrics m JOIN runs r ON r.id = m.run_id GROUP BY r.name ORDER BY r.name");
    cr_expect_str_eq(rows, "writer-1|2000|0|1999|2000\nwriter-2|2000|0|1999|2000\n");
    free(rows);
    free(db);
    tu_rmtree(dir);
    free(dir);
}

enum { BATCH = 16 };

/* A child that logs BATCH metrics per step forever; reports its run id once step 20 is committed. */
static void looping_writer(const char *db, int report_fd) {
    runstore *rs = NULL;
    mr_err e = {0};
    int64_t id;
    char names[BATCH][16];
    const char *np[BATCH];
    double v[BATCH];
    for (int j = 0; j < BATCH; j++) {
        snprintf(names[j], sizeof names[j], "m%02d", j);
        np[j] = names[j];
    }
    if (runstore_open(&rs, db, &e) || runstore_begin_run(rs, "grpo", "doomed", NULL, 9, &id, &e)) goto fail;
    for (int64_t step = 0;; step++) {
        for (int j = 0; j < BATCH; j++) v[j] = (double)(step * 100 + j);
        if (runstore_log_metrics(rs, id, step, BATCH, np, v, &e)) goto fail;
        if (step == 20 && write(report_fd, &id, sizeof id) != sizeof id) _exit(4);
    }
fail:
    fprintf(stderr, "looping writer: %s\n", e.msg);
    _exit(1);
}

Test(runstore, sigkilled_writer_leaves_whole_steps_only) {
    char *dir = tu_tmpdir();
    char *db = tu_path(dir, "runs.db");
    static const int delay_us[] = {0, 1500, 7000};
    for (int round = 0; round < 3; round++) {
        int rep[2];
        cr_assert_eq(pipe(rep), 0);
        pid_t kid = fork();
        cr_assert_neq(kid, -1);
        if (kid == 0) {
            close(rep[0]);
            looping_writer(db, rep[1]);
        }
        close(rep[1]);
        int64_t id = 0;
        cr_assert_eq(read(rep[0], &id, sizeof id), (ssize_t)sizeof id, "the writer died before step 20");
        close(rep[0]);
        if (delay_us[round]) usleep((useconds_t)delay_us[round]);
        kill(kid, SIGKILL);
        int status;
        cr_assert_eq(waitpid(kid, &status, 0), kid);
        cr_assert(WIFSIGNALED(status) && WTERMSIG(status) == SIGKILL, "round %d: status 0x%x", round, status);

        char *ic = raw_rows(db, "PRAGMA integrity_check");
        cr_expect_str_eq(ic, "ok\n");
        free(ic);
        char q[512];
        snprintf(q, sizeof q, "SELECT count(*) FROM (SELECT step FROM metrics WHERE run_id = %lld GROUP BY step "
                              "HAVING count(*) <> %d OR sum(value) <> %d * (step * 100) + %d)",
                 (long long)id, BATCH, BATCH, BATCH * (BATCH - 1) / 2);
        cr_expect_eq(raw_int(db, q), 0, "round %d: a step is partly written", round);
        snprintf(q, sizeof q, "SELECT count(DISTINCT step) = max(step) + 1 AND count(DISTINCT step) > 20 "
                              "FROM metrics WHERE run_id = %lld", (long long)id);
        cr_expect_eq(raw_int(db, q), 1, "round %d: steps are not 0..N without gaps", round);

        /* a new writer opens the file, marks the dead run killed, and appends */
        runstore *rs = open_ok(db);
        mr_err e = {0};
        int64_t next = 0;
        cr_assert_eq(runstore_begin_run(rs, "eval", "after", NULL, 0, &next, &e), MR_OK, "%s", e.msg);
        run_copy dead = get_run(rs, id);
        cr_expect_str_eq(dead.status, "killed");
        cr_expect(dead.ended_at >= dead.started_at);
        const char *nm[] = {"a", "b"};
        double vv[] = {1, 2};
        cr_expect_eq(runstore_log_metrics(rs, next, 0, 2, nm, vv, &e), MR_OK, "%s", e.msg);
        cr_expect_eq(runstore_log_metric(rs, id, 1000000, "late", 1, &e), MR_OK, "%s", e.msg);
        cr_expect_eq(runstore_end_run(rs, next, RUN_OK, &e), MR_OK, "%s", e.msg);
        runstore_close(rs);
        snprintf(q, sizeof q, "SELECT count(*) FROM metrics WHERE run_id = %lld", (long long)next);
        cr_expect_eq(raw_int(db, q), 2);
    }
    cr_expect_eq(raw_int(db, "SELECT count(*) FROM runs WHERE status = 'killed'"), 3);
    free(db);
    tu_rmtree(dir);
    free(dir);
}

/* ---- the CLI ---- */

typedef struct {
    char *dir, *db;
} cli_store;

/* Run 1: an sft run that ended ok (3 steps); run 2: a grpo run still running, with NaN/inf values, a
 * checkpoint and 12 events; run 3: a check run with no metrics. */
static cli_store make_cli_store(void) {
    cli_store cs;
    cs.dir = tu_tmpdir();
    cs.db = tu_path(cs.dir, "runs.db");
    runstore *rs = open_ok(cs.db);
    mr_err e = {0};
    int64_t a, b, c;
    cr_assert_eq(runstore_begin_run(rs, "sft", "sft-tiny", "name: sft-tiny\nseed: 1234\n", 1234, &a, &e), MR_OK);
    const char *names[] = {"loss", "lr"};
    double v0[] = {1.5, 0.001}, v1[] = {0.75, 0.002}, v2[] = {0.25, 0.003};
    cr_assert_eq(runstore_log_metrics(rs, a, 0, 2, names, v0, &e), MR_OK, "%s", e.msg);
    cr_assert_eq(runstore_log_metrics(rs, a, 1, 2, names, v1, &e), MR_OK, "%s", e.msg);
    cr_assert_eq(runstore_log_metrics(rs, a, 2, 2, names, v2, &e), MR_OK, "%s", e.msg);
    cr_assert_eq(runstore_log_checkpoint(rs, a, 2, "/ck/sft-2.safetensors",
                                         "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855", &e),
                 MR_OK, "%s", e.msg);
    cr_assert_eq(runstore_log_event(rs, a, EVENT_INFO, "finished", &e), MR_OK, "%s", e.msg);
    cr_assert_eq(runstore_end_run(rs, a, RUN_OK, &e), MR_OK, "%s", e.msg);

    cr_assert_eq(runstore_begin_run(rs, "grpo", "grpo-tiny", "name: grpo-tiny\n", 7, &b, &e), MR_OK);
    const char *gn[] = {"kl", "loss", "reward,mean"};
    double g0[] = {0.5, 2.0, 0.125}, g1[] = {INFINITY, NAN, -INFINITY};
    cr_assert_eq(runstore_log_metrics(rs, b, 10, 3, gn, g0, &e), MR_OK, "%s", e.msg);
    cr_assert_eq(runstore_log_metrics(rs, b, 11, 3, gn, g1, &e), MR_OK, "%s", e.msg);
    for (int i = 0; i < 12; i++) {
        char msg[32];
        snprintf(msg, sizeof msg, "event %d", i);
        cr_assert_eq(runstore_log_event(rs, b, i == 11 ? EVENT_WARNING : EVENT_INFO, msg, &e), MR_OK);
    }
    cr_assert_eq(runstore_begin_run(rs, "check", "just-check", NULL, 0, &c, &e), MR_OK);
    cr_assert_eq(runstore_end_run(rs, c, RUN_FAILED, &e), MR_OK);
    runstore_close(rs);
    return cs;
}

static void free_cli_store(cli_store *cs) {
    tu_rmtree(cs->dir);
    free(cs->dir);
    free(cs->db);
}

/* Runs `moerl ARGS` and returns its exit status; output (stdout+stderr) in *out. */
static int moerl(char **out, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static int moerl(char **out, const char *fmt, ...) {
    char args[4096], cmd[8192];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(args, sizeof args, fmt, ap);
    va_end(ap);
    snprintf(cmd, sizeof cmd, "'%s' %s", tu_bin(), args);
    return tu_run(cmd, out);
}

Test(runs_cli, list_text_and_json) {
    cli_store cs = make_cli_store();
    char *out = NULL;
    cr_assert_eq(moerl(&out, "runs list --db '%s'", cs.db), 0, "%s", out);
    cr_assert(strncmp(out, "ID ", 3) == 0 && strstr(out, "\n1 ") && strstr(out, "\n2 ") && strstr(out, "\n3 "),
              "%s", out);
    cr_expect(strstr(out, "STATUS") && strstr(out, "DURATION") && strstr(out, "STEPS"), "%s", out);
    char *l1 = strstr(out, "\n1 ") + 1, *l2 = strstr(out, "\n2 ") + 1, *l3 = strstr(out, "\n3 ") + 1;
    l2[-1] = '\0';
    l3[-1] = '\0';
    cr_expect(strstr(l1, " sft ") && strstr(l1, "sft-tiny") && strstr(l1, " ok ") && strstr(l1, "Z ") &&
                  l1[strlen(l1) - 1] == '3',
              "%s", l1);
    cr_expect(strstr(l2, " grpo ") && strstr(l2, "grpo-tiny") && strstr(l2, " running ") &&
                  l2[strlen(l2) - 1] == '2',
              "%s", l2);
    cr_expect(strstr(l3, "just-check") && strstr(l3, " failed ") && strstr(l3, " 0\n"), "%s", l3);
    free(out);

    cr_assert_eq(moerl(&out, "runs list --json --db='%s' 2>/dev/null", cs.db), 0, "%s", out);
    cJSON *j = cJSON_Parse(out);
    cr_assert(cJSON_IsArray(j), "not a JSON array: %s", out);
    cr_assert_eq(cJSON_GetArraySize(j), 3);
    cJSON *r0 = cJSON_GetArrayItem(j, 0), *r1 = cJSON_GetArrayItem(j, 1);
    cr_expect_eq(cJSON_GetObjectItem(r0, "id")->valuedouble, 1);
    cr_expect_str_eq(cJSON_GetObjectItem(r0, "kind")->valuestring, "sft");
    cr_expect_str_eq(cJSON_GetObjectItem(r0, "status")->valuestring, "ok");
    cr_expect_eq(cJSON_GetObjectItem(r0, "steps")->valuedouble, 3);
    cr_expect_eq(cJSON_GetObjectItem(r0, "seed")->valuedouble, 1234);
    cr_expect(cJSON_GetObjectItem(r0, "duration_s")->valuedouble >= 0);
    const char *started = cJSON_GetObjectItem(r0, "started_at")->valuestring;
    cr_expect(strlen(started) == 20 && started[10] == 'T' && started[19] == 'Z', "%s", started);
    cr_expect(cJSON_IsNull(cJSON_GetObjectItem(r1, "ended_at")));
    cr_expect_str_eq(cJSON_GetObjectItem(r1, "status")->valuestring, "running");
    cr_expect_eq(cJSON_GetObjectItem(r1, "last_step")->valuedouble, 11);
    cJSON_Delete(j);
    free(out);
    free_cli_store(&cs);
}

Test(runs_cli, show_text_json_and_recipe) {
    cli_store cs = make_cli_store();
    char *out = NULL;
    cr_assert_eq(moerl(&out, "runs show 1 --db '%s'", cs.db), 0, "%s", out);
    cr_expect(strstr(out, "run 1  sft  sft-tiny\n"), "%s", out);
    cr_expect(strstr(out, "  status    ok\n") && strstr(out, "  seed      1234\n"), "%s", out);
    cr_expect(strstr(out, "  steps     3 (last step 2)\n"), "%s", out);
    cr_expect(strstr(out, "  loss   0.25                     2\n"), "%s", out);
    cr_expect(strstr(out, "  lr     0.003                    2\n"), "%s", out);
    cr_expect(strstr(out, "step 2        /ck/sft-2.safetensors  sha256 e3b0c442"), "%s", out);
    cr_expect(strstr(out, "info    finished\n"), "%s", out);
    free(out);

    cr_assert_eq(moerl(&out, "runs show --json --db '%s' 2", cs.db), 0, "%s", out);
    cJSON *j = cJSON_Parse(out);
    cr_assert(cJSON_IsObject(j), "not JSON: %s", out);
    cr_expect_str_eq(cJSON_GetObjectItem(j, "name")->valuestring, "grpo-tiny");
    cr_expect_str_eq(cJSON_GetObjectItem(j, "recipe")->valuestring, "name: grpo-tiny\n");
    cJSON *m = cJSON_GetObjectItem(j, "metrics");
    cr_assert_eq(cJSON_GetArraySize(m), 3);
    cr_expect_str_eq(cJSON_GetObjectItem(cJSON_GetObjectItem(m, "loss"), "value")->valuestring, "NaN");
    cr_expect_str_eq(cJSON_GetObjectItem(cJSON_GetObjectItem(m, "kl"), "value")->valuestring, "Infinity");
    cr_expect_str_eq(cJSON_GetObjectItem(cJSON_GetObjectItem(m, "reward,mean"), "value")->valuestring, "-Infinity");
    cr_expect_eq(cJSON_GetObjectItem(cJSON_GetObjectItem(m, "loss"), "step")->valuedouble, 11);
    cJSON *ev = cJSON_GetObjectItem(j, "events");
    cr_assert_eq(cJSON_GetArraySize(ev), 10); /* the last 10 of 12 */
    cr_expect_str_eq(cJSON_GetObjectItem(cJSON_GetArrayItem(ev, 0), "message")->valuestring, "event 2");
    cr_expect_str_eq(cJSON_GetObjectItem(cJSON_GetArrayItem(ev, 9), "level")->valuestring, "warning");
    cr_expect_eq(cJSON_GetArraySize(cJSON_GetObjectItem(j, "checkpoints")), 0);
    cJSON_Delete(j);
    free(out);

    cr_assert_eq(moerl(&out, "runs show 1 --recipe --db '%s'", cs.db), 0, "%s", out);
    cr_expect_str_eq(out, "name: sft-tiny\nseed: 1234\n");
    free(out);
    cr_expect_eq(moerl(&out, "runs show 3 --recipe --db '%s'", cs.db), 1, "%s", out);
    free(out);
    free_cli_store(&cs);
}

Test(runs_cli, export_csv_and_jsonl) {
    cli_store cs = make_cli_store();
    char *out = NULL;
    cr_assert_eq(moerl(&out, "runs export 1 --db '%s' --format csv", cs.db), 0, "%s", out);
    cr_expect_str_eq(out, "step,name,value\n0,loss,1.5\n0,lr,0.001\n1,loss,0.75\n1,lr,0.002\n2,loss,0.25\n2,lr,0.003\n");
    free(out);
    cr_assert_eq(moerl(&out, "runs export 2 --db '%s'", cs.db), 0, "%s", out); /* csv by default */
    cr_expect_str_eq(out, "step,name,value\n10,kl,0.5\n10,loss,2\n10,\"reward,mean\",0.125\n"
                          "11,kl,inf\n11,loss,nan\n11,\"reward,mean\",-inf\n");
    free(out);

    cr_assert_eq(moerl(&out, "runs export 1 --db '%s' --format jsonl", cs.db), 0, "%s", out);
    cr_expect_str_eq(out, "{\"step\":0,\"loss\":1.5,\"lr\":0.001}\n{\"step\":1,\"loss\":0.75,\"lr\":0.002}\n"
                          "{\"step\":2,\"loss\":0.25,\"lr\":0.003}\n");
    free(out);
    cr_assert_eq(moerl(&out, "runs export 2 --db '%s' --format=jsonl", cs.db), 0, "%s", out);
    cr_expect_str_eq(out, "{\"step\":10,\"kl\":0.5,\"loss\":2,\"reward,mean\":0.125}\n"
                          "{\"step\":11,\"kl\":\"Infinity\",\"loss\":\"NaN\",\"reward,mean\":\"-Infinity\"}\n");
    /* every line is JSON on its own */
    for (char *line = strtok(out, "\n"); line; line = strtok(NULL, "\n")) {
        cJSON *j = cJSON_Parse(line);
        cr_expect(cJSON_IsObject(j), "%s", line);
        cJSON_Delete(j);
    }
    free(out);
    cr_assert_eq(moerl(&out, "runs export 3 --db '%s' --format jsonl", cs.db), 0, "%s", out);
    cr_expect_str_eq(out, "");
    free(out);

    char *file = tu_path(cs.dir, "m.csv");
    cr_assert_eq(moerl(&out, "runs export 1 --db '%s' --out '%s'", cs.db, file), 0, "%s", out);
    cr_expect_str_eq(out, "");
    free(out);
    char *text = tu_read(file, NULL);
    cr_assert_not_null(text);
    cr_expect(strncmp(text, "step,name,value\n0,loss,1.5\n", 27) == 0, "%s", text);
    free(text);
    char *ls = NULL;
    char cmd[4200];
    snprintf(cmd, sizeof cmd, "ls '%s'", cs.dir);
    tu_run(cmd, &ls);
    cr_expect(!strstr(ls, ".tmp."), "a temporary file was left: %s", ls);
    free(ls);
    char *nodir = tu_path(cs.dir, "no/such/dir/m.csv");
    cr_expect_eq(moerl(&out, "runs export 1 --db '%s' --out '%s'", cs.db, nodir), 1, "%s", out);
    cr_expect(strstr(out, "moerl runs: cannot write ") && strstr(out, "No such file or directory"), "%s", out);
    free(out);
    free(nodir);
    free(file);
    free_cli_store(&cs);
}

Test(runs_cli, errors_and_exit_codes) {
    cli_store cs = make_cli_store();
    char *out = NULL, want[4200];
    cr_expect_eq(moerl(&out, "runs show 7 --db '%s'", cs.db), 1);
    snprintf(want, sizeof want, "moerl runs: no run 7 in %s\n", cs.db);
    cr_expect_str_eq(out, want);
    free(out);
    cr_expect_eq(moerl(&out, "runs export 7 --db '%s' --format csv", cs.db), 1);
    cr_expect_str_eq(out, want);
    free(out);

    /* the default store is ./runs.db: run where there is none, and it must not appear */
    char *empty = tu_path(cs.dir, "elsewhere");
    cr_assert_eq(mkdir(empty, 0755), 0);
    char cmd[8192];
    snprintf(cmd, sizeof cmd, "cd '%s' && '%s' runs list", empty, tu_bin());
    cr_expect_eq(tu_run(cmd, &out), 1);
    cr_expect_str_eq(out, "moerl runs: runs.db: no such file\n");
    free(out);
    char *ghost = tu_path(empty, "runs.db");
    cr_expect(!file_exists(ghost), "'moerl runs list' created %s", ghost);
    free(ghost);
    free(empty);
    char *missing = tu_path(cs.dir, "missing.db");
    cr_expect_eq(moerl(&out, "runs show 1 --db '%s'", missing), 1);
    snprintf(want, sizeof want, "moerl runs: %s: no such file\n", missing);
    cr_expect_str_eq(out, want);
    free(out);
    cr_expect(!file_exists(missing));
    free(missing);

    char *junk = tu_path(cs.dir, "junk.db");
    unsigned char bytes[4096];
    for (size_t i = 0; i < sizeof bytes; i++) bytes[i] = (unsigned char)(i * 7919u >> 3);
    cr_assert_eq(tu_write(junk, bytes, sizeof bytes), 0);
    cr_expect_eq(moerl(&out, "runs list --db '%s'", junk), 1);
    snprintf(want, sizeof want, "moerl runs: %s: not a moerl run store (file is not a database)\n", junk);
    cr_expect_str_eq(out, want);
    free(out);
    free(junk);

    static const char *const misuse[] = {
        "runs frob", "runs show", "runs show 0", "runs show 1 2", "runs list --bogus", "runs list --format csv",
        "runs export 1 --format xml",
    };
    for (size_t i = 0; i < sizeof misuse / sizeof misuse[0]; i++) {
        cr_expect_eq(moerl(&out, "%s --db '%s'", misuse[i], cs.db), 2, "%s: %s", misuse[i], out);
        cr_expect(strncmp(out, "moerl runs: ", 12) == 0 || strncmp(out, "usage: ", 7) == 0, "%s: %s", misuse[i],
                  out);
        free(out);
    }
    cr_expect_eq(moerl(&out, "runs"), 2);
    cr_expect_str_eq(out, "moerl runs: missing subcommand; expected list, show or export (try 'moerl runs --help')\n");
    free(out);
    cr_expect_eq(moerl(&out, "runs show abc"), 2);
    cr_expect_str_eq(out, "moerl runs: run id must be a positive integer, got 'abc' (try 'moerl runs --help')\n");
    free(out);
    static const char *const helps[] = {"runs --help", "runs show -h", "runs export 1 --help"};
    for (size_t i = 0; i < sizeof helps / sizeof helps[0]; i++) {
        cr_expect_eq(moerl(&out, "%s", helps[i]), 0, "%s", helps[i]);
        cr_expect(strncmp(out, "usage: moerl runs list", 22) == 0, "%s: %s", helps[i], out);
        free(out);
    }
    free_cli_store(&cs);
}
