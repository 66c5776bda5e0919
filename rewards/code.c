/* code.c: the code reward: run the completion's program against the dataset row's tests in the sandbox.
 *
 * A row carries `language` (default python) and either `tests: [{stdin, stdout}, ...]` (stdio tests, as in
 * CodeContests/APPS; `input`/`output` are accepted too) or `test_code` (assertions appended to the program,
 * as in HumanEval/MBPP: the test passes when the whole exits 0), or both. Score = tests passed / tests, or
 * with all_or_nothing 1 only when every test passes.
 *
 * The rule for what is not a pass:
 *   - a wrong answer (wrong stdout, a non-zero exit, an exception, a crash of its own) is a failed test;
 *   - a breached limit (wall clock, CPU, memory, output, process count, a system call the seccomp filter
 *     kills) scores the sample ERROR with the reason ("test 2/5: timeout: killed after 4.50 s ..."), as the
 *     rewards issue asks: a breach is counted in reward/<name>/error_rate and the sample leaves its group's
 *     baseline with advantage 0, rather than passing as an ordinary wrong answer. The first breach ends the
 *     sample's run (the remaining tests would only repeat it);
 *   - the sandbox failing to run anything (no interpreter, no temporary directory, fork failed) is ERROR too:
 *     an infrastructure fault, never a 0.
 * Each test may use all the time left before the call's deadline (rewards[i].timeout_s covers the whole row),
 * minus a small margin so the set's outside limit never has to abandon the worker.
 *
 * Languages are a table: a name, aliases (also the fence tags), the file name, the command, and what the
 * runtime prints when it runs out of memory. Adding one is one line.
 *
 * Worker pool: the set's pool already runs one call per core; code.workers > 0 caps the sandboxes running
 * at once below that. Each worker state owns a uid (when root and the uid is mapped), so RLIMIT_NPROC of one
 * sandbox never counts the processes of another (a fork bomb cannot starve its neighbours). */
#include <math.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <string.h>
#include <strings.h>
#include <time.h>

#include "core/mem.h"
#include "rewards/reward.h"
#include "rewards/sandbox.h"

typedef struct code_lang {
    const char *name;
    const char *aliases[4]; /* also the fence tags that mark its program */
    const char *file;
    const char *argv[6];
    const char *oom[3];
} code_lang;

static const code_lang languages[] = {
    {"python", {"python", "python3", "py", NULL}, "main.py", {"python3", "-I", "-B", "main.py", NULL},
     {"MemoryError", NULL}},
    {"lua", {"lua", "lua5.4", NULL}, "main.lua", {"lua5.4", "main.lua", NULL}, {"not enough memory", NULL}},
};

static const code_lang *lang_find(const char *name) {
    for (size_t i = 0; i < sizeof languages / sizeof languages[0]; i++)
        for (const char *const *a = languages[i].aliases; *a; a++)
            if (!strcasecmp(*a, name)) return &languages[i];
    return NULL;
}

/* Per-worker sandboxes get uids from here up (mod UID_SLOTS) when they are mapped; else nobody. */
#define UID_BASE 1510000000u
#define UID_SLOTS 4096u

typedef struct code_impl {
    int all_or_nothing;
    size_t memory_bytes, max_output;
    int workers; /* 0: no cap beyond the set's pool */
    int per_worker_uid;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    int mu_ok;
    int active; /* sandboxes running (guarded by mu) */
    atomic_uint next_slot;
} code_impl;

typedef struct code_worker {
    uid_t uid;
} code_worker;

/* ---- text helpers -------------------------------------------------------------------------------------- */

static int tag_matches(const char *tag, size_t n, const char *const *tags) {
    for (; tags && *tags; tags++)
        if (strlen(*tags) == n && !strncasecmp(tag, *tags, n)) return 1;
    return 0;
}

void code_extract_program(const char *text, const char *const *tags, const char **start, size_t *len) {
    const char *best = NULL, *plain = NULL;
    size_t best_len = 0, plain_len = 0;
    const char *p = text;
    for (;;) {
        const char *f = strstr(p, "```");
        if (!f) break;
        const char *tag = f + 3, *eol = strchr(tag, '\n');
        if (!eol) break; /* a fence with nothing after it */
        size_t tlen = (size_t)(eol - tag);
        while (tlen > 0 && (tag[tlen - 1] == ' ' || tag[tlen - 1] == '\r' || tag[tlen - 1] == '\t')) tlen--;
        while (tlen > 0 && (*tag == ' ' || *tag == '\t')) tag++, tlen--;
        const char *body = eol + 1, *close = strstr(body, "```");
        size_t blen = close ? (size_t)(close - body) : strlen(body);
        if (tlen == 0) {
            plain = body;
            plain_len = blen;
        } else if (tag_matches(tag, tlen, tags)) {
            best = body;
            best_len = blen;
        }
        if (!close) break;
        p = close + 3;
    }
    if (best) *start = best, *len = best_len;
    else if (plain) *start = plain, *len = plain_len;
    else *start = text, *len = strlen(text);
}

/* Length of s[0..n) without trailing empty lines, and the next line's span. */
static int next_line(const char **p, const char *end, const char **ls, size_t *ll) {
    if (*p >= end) return 0;
    const char *s = *p, *nl = memchr(s, '\n', (size_t)(end - s));
    const char *e = nl ? nl : end;
    *p = nl ? nl + 1 : end;
    while (e > s && (e[-1] == ' ' || e[-1] == '\t' || e[-1] == '\r')) e--;
    *ls = s;
    *ll = (size_t)(e - s);
    return 1;
}

static const char *trim_end(const char *s, const char *end) {
    while (end > s && (end[-1] == ' ' || end[-1] == '\t' || end[-1] == '\r' || end[-1] == '\n')) end--;
    return end;
}

int code_output_matches(const char *got, size_t got_len, const char *want) {
    const char *ge = trim_end(got, got + got_len), *we = trim_end(want, want + strlen(want));
    const char *g = got, *w = want;
    for (;;) {
        const char *gl, *wl;
        size_t gn, wn;
        int hg = next_line(&g, ge, &gl, &gn), hw = next_line(&w, we, &wl, &wn);
        if (!hg || !hw) return hg == hw;
        if (gn != wn || memcmp(gl, wl, gn) != 0) return 0;
    }
}

/* ---- the plugin ---------------------------------------------------------------------------------------- */

static int code_init(reward_plugin *p, const recipe *r, const char *item, const char *dir, mr_err *e) {
    (void)dir;
    code_impl *c = mem_calloc(1, sizeof *c);
    if (!c) return err_set(e, MR_ENOMEM, "code reward: out of memory");
    p->impl = c;
    char path[160];
    snprintf(path, sizeof path, "%s.code.all_or_nothing", item);
    c->all_or_nothing = recipe_bool(r, path);
    snprintf(path, sizeof path, "%s.code.memory_mb", item);
    c->memory_bytes = (size_t)recipe_int(r, path) << 20;
    snprintf(path, sizeof path, "%s.code.max_output_kb", item);
    c->max_output = (size_t)recipe_int(r, path) << 10;
    snprintf(path, sizeof path, "%s.code.workers", item);
    c->workers = (int)recipe_int(r, path);
    if (pthread_mutex_init(&c->mu, NULL) != 0) return err_set(e, MR_EINTERNAL, "code reward: mutex");
    if (pthread_cond_init(&c->cv, NULL) != 0) {
        pthread_mutex_destroy(&c->mu);
        return err_set(e, MR_EINTERNAL, "code reward: condition variable");
    }
    c->mu_ok = 1;
    c->per_worker_uid = sandbox_uid_usable(UID_BASE) && sandbox_uid_usable(UID_BASE + UID_SLOTS - 1);
    /* The seccomp filter compiles here, so a libseccomp failure shows at startup, not on every sample. */
    if (!(sandbox_capabilities() & SANDBOX_ISO_SECCOMP))
        return err_set(e, MR_EINTERNAL, "code reward: the seccomp filter could not be built (libseccomp)");
    return 0;
}

static void code_free(reward_plugin *p) {
    code_impl *c = p->impl;
    if (!c) return;
    if (c->mu_ok) {
        pthread_cond_destroy(&c->cv);
        pthread_mutex_destroy(&c->mu);
    }
    mem_free(c);
    p->impl = NULL;
}

static int code_worker_init(const reward_plugin *p, void **ws, mr_err *e) {
    code_impl *c = p->impl;
    code_worker *w = mem_calloc(1, sizeof *w);
    if (!w) return err_set(e, MR_ENOMEM, "code reward: out of memory");
    unsigned slot = atomic_fetch_add(&c->next_slot, 1u) % UID_SLOTS;
    w->uid = c->per_worker_uid ? (uid_t)(UID_BASE + slot) : 65534;
    *ws = w;
    return 0;
}

static void code_worker_free(const reward_plugin *p, void *ws) {
    (void)p;
    mem_free(ws);
}

/* Waits for a free sandbox slot until the deadline; 0 when one was taken. */
static int slot_take(code_impl *c, double deadline) {
    if (c->workers <= 0) return 0;
    pthread_mutex_lock(&c->mu);
    while (c->active >= c->workers) {
        double dt = deadline - reward_now();
        if (dt <= 0) {
            pthread_mutex_unlock(&c->mu);
            return -1;
        }
        struct timespec ts;
        clock_gettime(CLOCK_REALTIME, &ts);
        if (dt > 0.05) dt = 0.05;
        long long ns = ts.tv_nsec + (long long)(dt * 1e9);
        ts.tv_sec += (time_t)(ns / 1000000000LL);
        ts.tv_nsec = (long)(ns % 1000000000LL);
        pthread_cond_timedwait(&c->cv, &c->mu, &ts);
    }
    c->active++;
    pthread_mutex_unlock(&c->mu);
    return 0;
}

static void slot_give(code_impl *c) {
    if (c->workers <= 0) return;
    pthread_mutex_lock(&c->mu);
    c->active--;
    pthread_cond_signal(&c->cv);
    pthread_mutex_unlock(&c->mu);
}

static const char *field_str(const cJSON *o, const char *a, const char *b) {
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, a);
    if (!v && b) v = cJSON_GetObjectItemCaseSensitive(o, b);
    return cJSON_IsString(v) ? v->valuestring : NULL;
}

static void code_score(const reward_plugin *p, void *wstate, const reward_sample *s, double deadline,
                       reward_result *out, int *discard) {
    (void)discard;
    code_impl *c = p->impl;
    const code_worker *w = wstate;
    const cJSON *row = s->row;
    if (!cJSON_IsObject(row)) {
        reward_result_set(out, REWARD_ERROR, 0, "no dataset row to take the tests from");
        return;
    }
    const cJSON *lj = cJSON_GetObjectItemCaseSensitive(row, "language");
    const char *lname = cJSON_IsString(lj) ? lj->valuestring : "python";
    const code_lang *lang = lang_find(lname);
    if (!lang) {
        reward_result_set(out, REWARD_ERROR, 0, "row field language: unknown language \"%.40s\" (known: python, lua)", lname);
        return;
    }
    const cJSON *tests = cJSON_GetObjectItemCaseSensitive(row, "tests");
    const cJSON *tc = cJSON_GetObjectItemCaseSensitive(row, "test_code");
    if (tests && !cJSON_IsArray(tests)) {
        reward_result_set(out, REWARD_ERROR, 0, "row field tests: expected a list of {stdin, stdout}");
        return;
    }
    if (tc && !cJSON_IsString(tc)) {
        reward_result_set(out, REWARD_ERROR, 0, "row field test_code: expected a string");
        return;
    }
    int n_io = tests ? cJSON_GetArraySize(tests) : 0, n = n_io + (tc ? 1 : 0);
    if (n == 0) {
        reward_result_set(out, REWARD_ERROR, 0, "the row has no tests: neither tests nor test_code");
        return;
    }
    for (int i = 0; i < n_io; i++) {
        const cJSON *t = cJSON_GetArrayItem(tests, i);
        if (!cJSON_IsObject(t) || !field_str(t, "stdout", "output")) {
            reward_result_set(out, REWARD_ERROR, 0, "row field tests[%d]: expected {stdin, stdout} strings", i);
            return;
        }
    }
    const char *prog;
    size_t plen;
    code_extract_program(s->completion ? s->completion : "", lang->aliases, &prog, &plen);

    sandbox_config cfg;
    sandbox_config_default(&cfg);
    cfg.argv = lang->argv;
    cfg.file_name = lang->file;
    cfg.memory_bytes = c->memory_bytes;
    cfg.max_output = c->max_output;
    cfg.uid = cfg.gid = w ? w->uid : 65534;
    cfg.memory_markers = lang->oom;

    char *buf = NULL; /* the program with test_code appended */
    if (slot_take(c, deadline) != 0) {
        reward_result_set(out, REWARD_ERROR, 0, "no sandbox slot free before the deadline (code.workers %d)", c->workers);
        return;
    }
    int passed = 0;
    for (int i = 0; i < n; i++) {
        /* A margin so that the set's own limit (deadline + 10%) never fires on us. */
        double left = deadline - reward_now() - 0.05;
        if (left < 0.05) {
            reward_result_set(out, REWARD_ERROR, 0, "test %d/%d: no time left (timeout_s %.1f for the whole row)", i + 1, n,
                              p->timeout_s);
            goto done;
        }
        cfg.wall_s = left;
        cfg.cpu_s = ceil(left);
        const char *code = prog, *in = "", *want = NULL;
        size_t clen = plen;
        if (i < n_io) {
            const cJSON *t = cJSON_GetArrayItem(tests, i);
            in = field_str(t, "stdin", "input");
            if (!in) in = "";
            want = field_str(t, "stdout", "output");
        } else {
            size_t tl = strlen(tc->valuestring);
            buf = mem_alloc(plen + tl + 3);
            if (!buf) {
                reward_result_set(out, REWARD_ERROR, 0, "out of memory");
                goto done;
            }
            memcpy(buf, prog, plen);
            buf[plen] = '\n';
            memcpy(buf + plen + 1, tc->valuestring, tl);
            buf[plen + 1 + tl] = '\n';
            buf[plen + 2 + tl] = '\0';
            code = buf;
            clen = plen + 2 + tl;
        }
        sandbox_result r;
        mr_err e = {0};
        if (sandbox_run(&cfg, code, clen, in, strlen(in), &r, &e) != 0) {
            reward_result_set(out, REWARD_ERROR, 0, "test %d/%d: %s", i + 1, n, e.msg);
            sandbox_result_free(&r);
            goto done;
        }
        if (r.breach != SANDBOX_NONE) {
            char why[256];
            sandbox_describe(&r, &cfg, why, sizeof why);
            reward_result_set(out, REWARD_ERROR, 0, "test %d/%d: %s", i + 1, n, why);
            sandbox_result_free(&r);
            goto done;
        }
        int ok = r.exited && r.exit_code == 0 && (!want || code_output_matches(r.out, r.out_len, want));
        passed += ok;
        sandbox_result_free(&r);
    }
    double score = c->all_or_nothing ? (passed == n ? 1.0 : 0.0) : (double)passed / (double)n;
    reward_result_set(out, REWARD_SCORE, score, "passed %d/%d", passed, n);
done:
    slot_give(c);
    mem_free(buf);
}

const reward_plugin_ops reward_code_ops = {
    .kind = "code",
    .init = code_init,
    .worker_init = code_worker_init,
    .worker_free = code_worker_free,
    .score = code_score,
    .free = code_free,
};
