/* cmd_runs.c: `moerl runs list|show|export`, the read side of the run store (core/runstore.h).
 * Every query result is first built as a cJSON value; --json prints that value, the text output is drawn
 * from the same value, so the two can never disagree. Opening the store never creates it. */
#include <errno.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <cjson/cJSON.h>

#include "cli/cli.h"
#include "core/runstore.h"

#define DEFAULT_DB "runs.db"
#define SHOW_EVENTS 10

static void usage(FILE *f) {
    fprintf(f,
            "usage: moerl runs list [--db FILE] [--json]\n"
            "       moerl runs show ID [--db FILE] [--json] [--recipe]\n"
            "       moerl runs export ID [--db FILE] [--format csv|jsonl] [--out FILE]\n"
            "\n"
            "Reads the run store that every moerl run (sft, grpo, eval, check) writes (default %s).\n"
            "  list     one line per run: id, kind, name, status, start (UTC), duration, steps with metrics\n"
            "  show     one run: name, seed, host, status, times, steps, the latest value of every metric,\n"
            "           checkpoints and the last %d events (--recipe: print the stored recipe text instead)\n"
            "  export   a run's metrics: csv long format (step,name,value; the default) or jsonl, one object\n"
            "           per step {\"step\":N,\"loss\":...}; non-finite values are nan/inf/-inf in csv and\n"
            "           \"NaN\"/\"Infinity\"/\"-Infinity\" in jsonl\n"
            "options:\n"
            "  --db FILE      the run store (default %s); it is never created by this command\n"
            "  --json         print JSON instead of a table\n"
            "  --format FMT   export format: csv or jsonl\n"
            "  --out FILE     write the export to FILE (atomically) instead of stdout\n"
            "exit status: 0 ok, 1 failure (no such store or run), 2 misuse\n",
            DEFAULT_DB, SHOW_EVENTS, DEFAULT_DB);
}

/* ---- options ---- */

enum { OPT_DB = 1, OPT_JSON = 2, OPT_FORMAT = 4, OPT_OUT = 8, OPT_RECIPE = 16 };

typedef struct {
    const char *db, *format, *out, *id_text;
    int json, recipe;
    long long id;
} runs_opts;

static int misuse(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static int misuse(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    fprintf(stderr, "moerl runs: ");
    vfprintf(stderr, fmt, ap);
    fprintf(stderr, " (try 'moerl runs --help')\n");
    va_end(ap);
    return 2;
}

/* Parses argv[1..] of a subcommand (argv[0] is its name). Returns 0, or 2 after printing the misuse. */
static int parse_opts(int argc, char **argv, unsigned allowed, int want_id, runs_opts *o) {
    memset(o, 0, sizeof *o);
    o->db = DEFAULT_DB;
    int only_positional = 0;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (!only_positional && a[0] == '-' && a[1] != '\0') {
            if (!strcmp(a, "--")) {
                only_positional = 1;
                continue;
            }
            const char *val = NULL;
            const char *eq = strchr(a, '=');
            size_t klen = eq ? (size_t)(eq - a) : strlen(a);
            struct { const char *name; unsigned bit; const char **dst; } valued[] = {
                {"--db", OPT_DB, &o->db}, {"--format", OPT_FORMAT, &o->format}, {"--out", OPT_OUT, &o->out}};
            int matched = 0;
            for (size_t k = 0; k < sizeof valued / sizeof valued[0]; k++) {
                if (strlen(valued[k].name) != klen || strncmp(a, valued[k].name, klen) != 0) continue;
                if (!(allowed & valued[k].bit)) return misuse("option '%s' does not apply here", valued[k].name);
                if (eq) val = eq + 1;
                else if (i + 1 < argc) val = argv[++i];
                else return misuse("option '%s' needs a value", valued[k].name);
                if (!*val) return misuse("option '%s' needs a non-empty value", valued[k].name);
                *valued[k].dst = val;
                matched = 1;
            }
            if (matched) continue;
            if (!strcmp(a, "--json") && (allowed & OPT_JSON)) o->json = 1;
            else if (!strcmp(a, "--recipe") && (allowed & OPT_RECIPE)) o->recipe = 1;
            else return misuse("unknown option '%s'", a);
            continue;
        }
        if (!want_id || o->id_text) return misuse("unexpected argument '%s'", a);
        o->id_text = a;
    }
    if (want_id) {
        if (!o->id_text) return misuse("%s needs a run id", argv[0]);
        char *end;
        errno = 0;
        long long v = strtoll(o->id_text, &end, 10);
        if (errno || end == o->id_text || *end || v <= 0)
            return misuse("run id must be a positive integer, got '%s'", o->id_text);
        o->id = v;
    }
    if (o->format && strcmp(o->format, "csv") && strcmp(o->format, "jsonl"))
        return misuse("--format must be csv or jsonl, got '%s'", o->format);
    return 0;
}

static int fail_store(const mr_err *e) {
    fprintf(stderr, "moerl runs: %s\n", e->msg);
    return 1;
}

/* ---- formatting ---- */

static void fmt_time(double t, char *buf, size_t cap) {
    if (isnan(t)) {
        snprintf(buf, cap, "-");
        return;
    }
    time_t s = (time_t)t;
    struct tm tm;
    gmtime_r(&s, &tm);
    strftime(buf, cap, "%Y-%m-%dT%H:%M:%SZ", &tm);
}

static void fmt_duration(double d, char *buf, size_t cap) {
    if (isnan(d) || d < 0) snprintf(buf, cap, "-");
    else if (d < 60) snprintf(buf, cap, "%.1fs", d);
    else if (d < 3600) snprintf(buf, cap, "%dm%02ds", (int)(d / 60), (int)fmod(d, 60));
    else if (d < 86400) snprintf(buf, cap, "%dh%02dm", (int)(d / 3600), (int)fmod(d, 3600) / 60);
    else snprintf(buf, cap, "%dd%02dh", (int)(d / 86400), (int)fmod(d, 86400) / 3600);
}

/* Shortest text that reads back as the same double (csv); nan/inf/-inf for the non-finite. */
static void fmt_double(double v, char *buf, size_t cap) {
    if (isnan(v)) snprintf(buf, cap, "nan");
    else if (isinf(v)) snprintf(buf, cap, v > 0 ? "inf" : "-inf");
    else {
        for (int prec = 15; prec <= 17; prec++) {
            snprintf(buf, cap, "%.*g", prec, v);
            if (strtod(buf, NULL) == v) break;
        }
    }
}

/* JSON has no NaN or infinity: they become the strings "NaN", "Infinity", "-Infinity" (as proto3 JSON). */
static cJSON *json_number(double v) {
    if (isnan(v)) return cJSON_CreateString("NaN");
    if (isinf(v)) return cJSON_CreateString(v > 0 ? "Infinity" : "-Infinity");
    return cJSON_CreateNumber(v);
}

/* Integers beyond 2^53 do not survive a JSON number (a double): they go out as strings. */
static cJSON *json_int(int64_t v) {
    if (v > (INT64_C(1) << 53) || v < -(INT64_C(1) << 53)) {
        char buf[32];
        snprintf(buf, sizeof buf, "%lld", (long long)v);
        return cJSON_CreateString(buf);
    }
    return cJSON_CreateNumber((double)v);
}

static cJSON *json_time(double t) {
    if (isnan(t)) return cJSON_CreateNull();
    char buf[32];
    fmt_time(t, buf, sizeof buf);
    return cJSON_CreateString(buf);
}

static cJSON *json_str(const char *s) { return s ? cJSON_CreateString(s) : cJSON_CreateNull(); }

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

/* Prints a cJSON value on one line, or reports failure to build it. */
static int print_json(const cJSON *v) {
    char *s = cJSON_PrintUnformatted(v);
    if (!s) {
        fprintf(stderr, "moerl runs: out of memory printing JSON\n");
        return 1;
    }
    puts(s);
    cJSON_free(s);
    return 0;
}

/* ---- queries into cJSON ---- */

typedef struct {
    cJSON *out;   /* array (list) or the object to fill (show) */
    int with_recipe;
} run_ctx;

static int add_item(cJSON *obj, const char *key, cJSON *item) {
    if (!item) return -1;
    cJSON_AddItemToObject(obj, key, item);
    return 0;
}

static int run_to_json(void *ud, const runstore_run *r) {
    run_ctx *c = ud;
    cJSON *o = cJSON_IsArray(c->out) ? cJSON_CreateObject() : c->out;
    if (!o) return MR_ENOMEM;
    if (o != c->out) cJSON_AddItemToArray(c->out, o);
    double end = isnan(r->ended_at) ? now_s() : r->ended_at;
    int bad = add_item(o, "id", json_int(r->id)) | add_item(o, "kind", json_str(r->kind)) |
              add_item(o, "name", json_str(r->name)) | add_item(o, "status", json_str(r->status)) |
              add_item(o, "started_at", json_time(r->started_at)) | add_item(o, "ended_at", json_time(r->ended_at)) |
              add_item(o, "duration_s", json_number(end - r->started_at)) |
              add_item(o, "steps", json_int(r->steps)) |
              add_item(o, "last_step", r->last_step >= 0 ? json_int(r->last_step) : cJSON_CreateNull()) |
              add_item(o, "seed", json_int(r->seed)) | add_item(o, "host", json_str(r->host)) |
              add_item(o, "pid", json_int(r->pid)) | add_item(o, "version", json_str(r->version));
    if (c->with_recipe) bad |= add_item(o, "recipe", json_str(r->recipe));
    return bad ? MR_ENOMEM : 0;
}

static int metric_to_json(void *ud, int64_t step, const char *name, double value) {
    cJSON *m = cJSON_CreateObject();
    if (!m) return MR_ENOMEM;
    cJSON_AddItemToObject(ud, name, m);
    return add_item(m, "step", json_int(step)) | add_item(m, "value", json_number(value)) ? MR_ENOMEM : 0;
}

static int checkpoint_to_json(void *ud, const runstore_checkpoint *c) {
    cJSON *o = cJSON_CreateObject();
    if (!o) return MR_ENOMEM;
    cJSON_AddItemToArray(ud, o);
    return add_item(o, "step", json_int(c->step)) | add_item(o, "path", json_str(c->path)) |
                   add_item(o, "sha256", json_str(c->sha256)) | add_item(o, "time", json_time(c->time))
               ? MR_ENOMEM
               : 0;
}

static int event_to_json(void *ud, const runstore_event *ev) {
    cJSON *o = cJSON_CreateObject();
    if (!o) return MR_ENOMEM;
    cJSON_AddItemToArray(ud, o);
    return add_item(o, "time", json_time(ev->time)) | add_item(o, "level", json_str(ev->level)) |
                   add_item(o, "message", json_str(ev->message))
               ? MR_ENOMEM
               : 0;
}

/* Text accessors over the JSON built above. */
static const char *jstr(const cJSON *o, const char *key) {
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, key);
    return cJSON_IsString(v) ? v->valuestring : "-";
}
static double jnum(const cJSON *o, const char *key) {
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, key);
    if (cJSON_IsNumber(v)) return v->valuedouble;
    if (cJSON_IsString(v)) return strtod(v->valuestring, NULL); /* "NaN", "Infinity", big integers */
    return NAN;
}
static void jint_text(const cJSON *o, const char *key, char *buf, size_t cap) {
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, key);
    if (cJSON_IsString(v)) snprintf(buf, cap, "%s", v->valuestring);
    else if (cJSON_IsNumber(v)) snprintf(buf, cap, "%.0f", v->valuedouble);
    else snprintf(buf, cap, "-");
}

/* ---- list ---- */

static int runs_list(int argc, char **argv) {
    if (cli_wants_help(argc, argv)) {
        usage(stdout);
        return 0;
    }
    runs_opts o;
    if (parse_opts(argc, argv, OPT_DB | OPT_JSON, 0, &o)) return 2;
    mr_err e = {0};
    runstore *rs = NULL;
    if (runstore_open_existing(&rs, o.db, &e)) return fail_store(&e);
    run_ctx c = {cJSON_CreateArray(), 0};
    int st = c.out ? runstore_foreach_run(rs, run_to_json, &c, &e) : MR_ENOMEM;
    runstore_close(rs);
    if (st) {
        cJSON_Delete(c.out);
        if (st == MR_ENOMEM) err_set(&e, MR_ENOMEM, "out of memory building the run list");
        return fail_store(&e);
    }
    int rc = 0;
    if (o.json) {
        rc = print_json(c.out);
    } else {
        int wname = 4;
        const cJSON *r;
        cJSON_ArrayForEach(r, c.out) {
            int n = (int)strlen(jstr(r, "name"));
            if (n > wname) wname = n;
        }
        if (wname > 40) wname = 40;
        printf("%-5s %-6s %-*s %-8s %-20s %-9s %s\n", "ID", "KIND", wname, "NAME", "STATUS", "STARTED", "DURATION",
               "STEPS");
        cJSON_ArrayForEach(r, c.out) {
            char id[32], steps[32], started[32], dur[32];
            jint_text(r, "id", id, sizeof id);
            jint_text(r, "steps", steps, sizeof steps);
            snprintf(started, sizeof started, "%s", jstr(r, "started_at"));
            fmt_duration(jnum(r, "duration_s"), dur, sizeof dur);
            printf("%-5s %-6s %-*.*s %-8s %-20s %-9s %s\n", id, jstr(r, "kind"), wname, wname, jstr(r, "name"),
                   jstr(r, "status"), started, dur, steps);
        }
    }
    cJSON_Delete(c.out);
    return rc;
}

/* ---- show ---- */

static int runs_show(int argc, char **argv) {
    if (cli_wants_help(argc, argv)) {
        usage(stdout);
        return 0;
    }
    runs_opts o;
    if (parse_opts(argc, argv, OPT_DB | OPT_JSON | OPT_RECIPE, 1, &o)) return 2;
    mr_err e = {0};
    runstore *rs = NULL;
    if (runstore_open_existing(&rs, o.db, &e)) return fail_store(&e);
    cJSON *run = cJSON_CreateObject();
    cJSON *metrics = cJSON_CreateObject(), *ckpts = cJSON_CreateArray(), *events = cJSON_CreateArray();
    int st = MR_ENOMEM;
    if (run && metrics && ckpts && events) {
        run_ctx c = {run, 1};
        st = runstore_get_run(rs, o.id, run_to_json, &c, &e);
        if (!st) st = runstore_foreach_latest_metric(rs, o.id, metric_to_json, metrics, &e);
        if (!st) st = runstore_foreach_checkpoint(rs, o.id, checkpoint_to_json, ckpts, &e);
        if (!st) st = runstore_foreach_event(rs, o.id, SHOW_EVENTS, event_to_json, events, &e);
    }
    runstore_close(rs);
    if (run) {
        cJSON_AddItemToObject(run, "metrics", metrics ? metrics : cJSON_CreateNull());
        cJSON_AddItemToObject(run, "checkpoints", ckpts ? ckpts : cJSON_CreateNull());
        cJSON_AddItemToObject(run, "events", events ? events : cJSON_CreateNull());
    } else {
        cJSON_Delete(metrics);
        cJSON_Delete(ckpts);
        cJSON_Delete(events);
    }
    if (st) {
        cJSON_Delete(run);
        if (st == MR_ENOMEM) err_set(&e, MR_ENOMEM, "out of memory building run %lld", o.id);
        return fail_store(&e);
    }
    int rc = 0;
    if (o.json) {
        rc = print_json(run);
    } else if (o.recipe) {
        const cJSON *rt = cJSON_GetObjectItemCaseSensitive(run, "recipe");
        if (cJSON_IsString(rt)) fputs(rt->valuestring, stdout);
        else {
            fprintf(stderr, "moerl runs: run %lld in %s has no recipe text\n", o.id, o.db);
            rc = 1;
        }
    } else {
        char buf[64], buf2[64];
        printf("run %lld  %s  %s\n", o.id, jstr(run, "kind"), jstr(run, "name"));
        printf("  status    %s\n", jstr(run, "status"));
        jint_text(run, "seed", buf, sizeof buf);
        printf("  seed      %s\n", buf);
        jint_text(run, "pid", buf, sizeof buf);
        printf("  host      %s (pid %s)\n", jstr(run, "host"), buf);
        printf("  version   moerl %s\n", jstr(run, "version"));
        printf("  started   %s\n", jstr(run, "started_at"));
        fmt_duration(jnum(run, "duration_s"), buf, sizeof buf);
        printf("  ended     %s (duration %s)\n", jstr(run, "ended_at"), buf);
        jint_text(run, "steps", buf, sizeof buf);
        jint_text(run, "last_step", buf2, sizeof buf2);
        printf("  steps     %s (last step %s)\n", buf, buf2);
        int wname = 6;
        const cJSON *m;
        cJSON_ArrayForEach(m, metrics) if ((int)strlen(m->string) > wname) wname = (int)strlen(m->string);
        printf("metrics (latest value, at step)\n");
        if (!cJSON_GetArraySize(metrics)) printf("  (none)\n");
        cJSON_ArrayForEach(m, metrics) {
            fmt_double(jnum(m, "value"), buf, sizeof buf);
            jint_text(m, "step", buf2, sizeof buf2);
            printf("  %-*s %-24s %s\n", wname, m->string, buf, buf2);
        }
        printf("checkpoints\n");
        if (!cJSON_GetArraySize(ckpts)) printf("  (none)\n");
        cJSON_ArrayForEach(m, ckpts) {
            jint_text(m, "step", buf, sizeof buf);
            printf("  step %-8s %s  sha256 %s  %s\n", buf, jstr(m, "path"), jstr(m, "sha256"), jstr(m, "time"));
        }
        printf("events (last %d)\n", SHOW_EVENTS);
        if (!cJSON_GetArraySize(events)) printf("  (none)\n");
        cJSON_ArrayForEach(m, events) printf("  %s  %-7s %s\n", jstr(m, "time"), jstr(m, "level"), jstr(m, "message"));
    }
    cJSON_Delete(run);
    return rc;
}

/* ---- export ---- */

typedef struct {
    FILE *f;
    int jsonl;
    cJSON *line;      /* jsonl: the object of the step being gathered */
    int64_t line_step;
} export_ctx;

static int csv_field(FILE *f, const char *s) {
    if (!strpbrk(s, ",\"\r\n")) return fputs(s, f) < 0 ? -1 : 0;
    fputc('"', f);
    for (; *s; s++) {
        if (*s == '"') fputc('"', f);
        fputc(*s, f);
    }
    return fputc('"', f) == EOF ? -1 : 0;
}

static int flush_line(export_ctx *x) {
    if (!x->line) return 0;
    char *s = cJSON_PrintUnformatted(x->line);
    cJSON_Delete(x->line);
    x->line = NULL;
    if (!s) return MR_ENOMEM;
    int bad = fputs(s, x->f) < 0 || fputc('\n', x->f) == EOF;
    cJSON_free(s);
    return bad ? MR_EIO : 0;
}

static int export_row(void *ud, int64_t step, const char *name, double value) {
    export_ctx *x = ud;
    if (!x->jsonl) {
        char num[64];
        fmt_double(value, num, sizeof num);
        if (fprintf(x->f, "%lld,", (long long)step) < 0 || csv_field(x->f, name) || fprintf(x->f, ",%s\n", num) < 0)
            return MR_EIO;
        return 0;
    }
    if (x->line && x->line_step != step) {
        int st = flush_line(x);
        if (st) return st;
    }
    if (!x->line) {
        if (!(x->line = cJSON_CreateObject())) return MR_ENOMEM;
        x->line_step = step;
        if (add_item(x->line, "step", json_int(step))) return MR_ENOMEM;
    }
    if (!strcmp(name, "step")) name = "step_"; /* a metric named "step" must not hide the step */
    return add_item(x->line, name, json_number(value)) ? MR_ENOMEM : 0;
}

static int runs_export(int argc, char **argv) {
    if (cli_wants_help(argc, argv)) {
        usage(stdout);
        return 0;
    }
    runs_opts o;
    if (parse_opts(argc, argv, OPT_DB | OPT_FORMAT | OPT_OUT, 1, &o)) return 2;
    mr_err e = {0};
    runstore *rs = NULL;
    if (runstore_open_existing(&rs, o.db, &e)) return fail_store(&e);
    run_ctx c = {cJSON_CreateObject(), 0};
    int st = c.out ? runstore_get_run(rs, o.id, run_to_json, &c, &e) : MR_ENOMEM;
    cJSON_Delete(c.out);
    if (st) {
        runstore_close(rs);
        if (st == MR_ENOMEM) err_set(&e, MR_ENOMEM, "out of memory");
        return fail_store(&e);
    }
    /* --out goes through a temporary file renamed into place: a reader never sees half an export. */
    char tmp[4096] = "";
    export_ctx x = {stdout, o.format && !strcmp(o.format, "jsonl"), NULL, 0};
    if (o.out) {
        snprintf(tmp, sizeof tmp, "%s.tmp.%ld", o.out, (long)getpid());
        if (!(x.f = fopen(tmp, "w"))) {
            fprintf(stderr, "moerl runs: cannot write %s: %s\n", o.out, strerror(errno));
            runstore_close(rs);
            return 1;
        }
    }
    if (!x.jsonl && fputs("step,name,value\n", x.f) < 0) st = MR_EIO;
    if (!st) st = runstore_foreach_metric(rs, o.id, export_row, &x, &e);
    if (!st) st = flush_line(&x);
    cJSON_Delete(x.line);
    runstore_close(rs);
    if (fflush(x.f) != 0 || ferror(x.f)) st = st ? st : MR_EIO;
    int saved = errno;
    if (o.out) {
        if (fclose(x.f) != 0 && !st) st = MR_EIO, saved = errno;
        if (!st && rename(tmp, o.out) != 0) st = MR_EIO, saved = errno;
        if (st) remove(tmp);
    }
    if (st == MR_EIO) {
        fprintf(stderr, "moerl runs: cannot write %s: %s\n", o.out ? o.out : "standard output", strerror(saved));
        return 1;
    }
    if (st == MR_ENOMEM) {
        fprintf(stderr, "moerl runs: out of memory exporting run %lld\n", o.id);
        return 1;
    }
    if (st) return fail_store(&e);
    return 0;
}

int cmd_runs(int argc, char **argv) {
    if (argc < 2) return misuse("missing subcommand; expected list, show or export");
    const char *sub = argv[1];
    if (!strcmp(sub, "-h") || !strcmp(sub, "--help") || !strcmp(sub, "help")) {
        usage(stdout);
        return 0;
    }
    if (!strcmp(sub, "list")) return runs_list(argc - 1, argv + 1);
    if (!strcmp(sub, "show")) return runs_show(argc - 1, argv + 1);
    if (!strcmp(sub, "export")) return runs_export(argc - 1, argv + 1);
    return misuse("unknown subcommand '%s'; expected list, show or export", sub);
}
