/* gen.c: the task table, per-row streams, the prompt-hash split and atomic JSONL writing (see gen.h); the shared
 * expression tree of gen_internal.h. The tasks themselves live in gen_arith.c, gen_countdown.c, gen_toolcall.c. */
#include "data/gen.h"

#include <errno.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#include "core/mem.h"
#include "data/gen_internal.h"

/* ---- the task table ---- */

typedef struct task_info {
    const char *name;
    int lo, hi, def;
    int (*row)(const gen_opts *o, rng *r, cJSON *row, mr_err *e);
} task_info;

static const task_info tasks[GEN_NTASKS] = {
    [GEN_ARITHMETIC] = {"arithmetic", 1, 5, 2, gen_arith_row},
    [GEN_COUNTDOWN] = {"countdown", 2, 6, 4, gen_countdown_row},
    [GEN_TOOLCALL] = {"toolcall", 1, 3, 2, gen_toolcall_row},
};

const char *gen_task_name(gen_task t) { return (unsigned)t < GEN_NTASKS ? tasks[t].name : "?"; }

const char *gen_task_list(void) { return "arithmetic, countdown, toolcall"; }

int gen_task_parse(const char *name, gen_task *out, mr_err *e) {
    for (int t = 0; t < GEN_NTASKS; t++)
        if (name && !strcmp(name, tasks[t].name)) {
            *out = (gen_task)t;
            return MR_OK;
        }
    return err_set(e, MR_EINVAL, "unknown task '%s' (tasks: %s)", name ? name : "", gen_task_list());
}

void gen_difficulty_range(gen_task t, int *lo, int *hi) {
    *lo = (unsigned)t < GEN_NTASKS ? tasks[t].lo : 0;
    *hi = (unsigned)t < GEN_NTASKS ? tasks[t].hi : -1;
}

int gen_default_difficulty(gen_task t) { return (unsigned)t < GEN_NTASKS ? tasks[t].def : 0; }

gen_opts gen_opts_default(gen_task t, uint64_t seed) {
    gen_opts o = {t, gen_default_difficulty(t), seed, GEN_STYLE_HASH};
    return o;
}

int gen_opts_check(const gen_opts *o, mr_err *e) {
    if ((unsigned)o->task >= GEN_NTASKS) return err_set(e, MR_EINVAL, "unknown task %d", (int)o->task);
    const task_info *t = &tasks[o->task];
    if (o->difficulty < t->lo || o->difficulty > t->hi)
        return err_set(e, MR_ERANGE, "%s: difficulty must be %d to %d%s, got %d", t->name, t->lo, t->hi,
                       o->task == GEN_COUNTDOWN ? " (how many numbers)" : "", o->difficulty);
    if (o->style != GEN_STYLE_HASH && o->style != GEN_STYLE_TAGS)
        return err_set(e, MR_EINVAL, "unknown answer style %d", (int)o->style);
    return MR_OK;
}

/* ---- rows ---- */

/* Stream purpose tag: the first index of rng_stream_id, distinct from other users of the seed. */
#define GEN_STREAM_TAG 0x67656e00u /* "gen\0" */

int gen_row(const gen_opts *o, uint64_t index, cJSON **row, mr_err *e) {
    *row = NULL;
    int st = gen_opts_check(o, e);
    if (st) return st;
    rng r;
    uint64_t what = ((uint64_t)o->task << 32) | ((uint64_t)o->difficulty << 8) | (uint64_t)o->style;
    rng_init(&r, o->seed, rng_stream_id(GEN_STREAM_TAG, what, index));
    cJSON *obj = cJSON_CreateObject();
    if (!obj) return err_set(e, MR_ENOMEM, "out of memory generating a %s row", tasks[o->task].name);
    st = tasks[o->task].row(o, &r, obj, e);
    if (st) {
        cJSON_Delete(obj);
        return err_prefix(e, "%s row %llu", tasks[o->task].name, (unsigned long long)index);
    }
    *row = obj;
    return MR_OK;
}

/* FNV-1a 64 of the prompt, then a Philox hash keyed by the seed: a uniform number in [0, 1) per prompt. */
int gen_is_eval(uint64_t seed, const char *prompt, double frac) {
    if (frac <= 0) return 0;
    if (frac >= 1) return 1;
    uint64_t h = 0xcbf29ce484222325ull;
    for (const unsigned char *p = (const unsigned char *)prompt; *p; p++) h = (h ^ *p) * 0x100000001b3ull;
    uint64_t x = rng_stream_id(seed ^ 0x73706c6974ull /* "split" */, h, 0);
    return (double)(x >> 11) * (1.0 / 9007199254740992.0) < frac;
}

void gen_rows_free(gen_rows *r) {
    if (!r) return;
    for (size_t i = 0; i < r->n; i++) cJSON_Delete(r->v[i]);
    mem_free(r->v);
    r->v = NULL;
    r->n = r->cap = 0;
}

static int rows_push(gen_rows *r, cJSON *row) {
    if (r->n == r->cap) {
        size_t cap = r->cap ? r->cap * 2 : 256, bytes;
        if (size_mul(cap, sizeof *r->v, &bytes)) return MR_ENOMEM;
        cJSON **v = mem_realloc(r->v, bytes);
        if (!v) return MR_ENOMEM;
        r->v = v;
        r->cap = cap;
    }
    r->v[r->n++] = row;
    return MR_OK;
}

int gen_dataset(const gen_opts *o, size_t n_train, size_t n_eval, gen_rows *train, gen_rows *eval, mr_err *e) {
    int st = gen_opts_check(o, e);
    if (st) return st;
    if (n_eval && !eval) return err_set(e, MR_EINVAL, "gen_dataset: n_eval > 0 needs an eval list");
    size_t total;
    if (size_add(n_train, n_eval, &total)) return err_set(e, MR_ERANGE, "too many rows");
    double frac = total ? (double)n_eval / (double)total : 0;
    /* Each index lands on the eval side with probability frac, so ~total indices fill both sides; the cap only
     * stops a task whose prompt space is too small for the request (every prompt already on the other side). */
    uint64_t cap = (uint64_t)total * 64 + 4096;
    for (uint64_t i = 0; train->n < n_train || (eval && eval->n < n_eval); i++) {
        if (i == cap)
            return err_set(e, MR_ERANGE,
                           "%s difficulty %d: only %zu train and %zu held-out rows after %llu draws (asked %zu "
                           "and %zu): too few distinct prompts; raise the difficulty or lower --eval-frac",
                           tasks[o->task].name, o->difficulty, train->n, eval ? eval->n : 0, (unsigned long long)i,
                           n_train, n_eval);
        cJSON *row;
        if ((st = gen_row(o, i, &row, e))) return st;
        const cJSON *p = cJSON_GetObjectItemCaseSensitive(row, "prompt");
        int to_eval = n_eval && gen_is_eval(o->seed, p->valuestring, frac);
        gen_rows *side = to_eval ? eval : train;
        size_t want = to_eval ? n_eval : n_train;
        if (side->n >= want) {
            cJSON_Delete(row);
            continue;
        }
        if (rows_push(side, row)) {
            cJSON_Delete(row);
            return err_set(e, MR_ENOMEM, "out of memory holding %zu generated rows", side->n);
        }
    }
    return MR_OK;
}

int gen_write_jsonl(const gen_rows *rows, const char *path, mr_err *e) {
    char tmp[4096];
    if (snprintf(tmp, sizeof tmp, "%s.tmp.%ld", path, (long)getpid()) >= (int)sizeof tmp)
        return err_set(e, MR_ERANGE, "%s: path too long", path);
    FILE *f = fopen(tmp, "wb");
    if (!f) return err_set(e, MR_EIO, "%s: cannot create: %s", tmp, strerror(errno));
    int st = MR_OK, saved = 0;
    for (size_t i = 0; i < rows->n && !st; i++) {
        char *s = cJSON_PrintUnformatted(rows->v[i]);
        if (!s) {
            st = err_set(e, MR_ENOMEM, "out of memory printing row %zu", i + 1);
            break;
        }
        if (fputs(s, f) < 0 || fputc('\n', f) < 0) st = MR_EIO, saved = errno;
        cJSON_free(s);
    }
    if (fflush(f) && !st) st = MR_EIO, saved = errno;
    if (fsync(fileno(f)) && !st) st = MR_EIO, saved = errno;
    if (fclose(f) && !st) st = MR_EIO, saved = errno;
    if (!st && rename(tmp, path) != 0) st = MR_EIO, saved = errno;
    if (st) {
        unlink(tmp);
        if (st == MR_EIO) return err_set(e, MR_EIO, "%s: cannot write: %s", path, strerror(saved));
        return st;
    }
    return MR_OK;
}

int gen_eval_path(const char *path, char *out, size_t cap, mr_err *e) {
    size_t n = strlen(path);
    if (n >= 6 && !strcmp(path + n - 6, ".jsonl")) n -= 6;
    if (snprintf(out, cap, "%.*s.eval.jsonl", (int)n, path) >= (int)cap)
        return err_set(e, MR_ERANGE, "%s: path too long", path);
    return MR_OK;
}

/* ---- shared helpers for the tasks ---- */

void gen_str_add(gen_str *b, const char *fmt, ...) {
    if (b->full) return;
    va_list ap;
    va_start(ap, fmt);
    int k = vsnprintf(b->s + b->n, sizeof b->s - b->n, fmt, ap);
    va_end(ap);
    if (k < 0 || (size_t)k >= sizeof b->s - b->n) {
        b->full = 1;
        b->s[b->n] = '\0';
        return;
    }
    b->n += (size_t)k;
}

int64_t gen_between(rng *r, int64_t lo, int64_t hi) { return lo + (int64_t)rng_below(r, (uint32_t)(hi - lo + 1)); }

void gen_completion(gen_str *b, gen_style style, const char *steps, const char *answer) {
    if (style == GEN_STYLE_TAGS) gen_str_add(b, "<think>%s</think> <answer>%s</answer>", steps, answer);
    else gen_str_add(b, "%s #### %s", steps, answer);
}

int gen_expr_leaf(gen_expr *x, int64_t v) {
    if (x->n >= GEN_EXPR_MAX) return -1;
    x->node[x->n] = (gen_node){0, v, -1, -1};
    return x->n++;
}

int gen_expr_op(gen_expr *x, char op, int l, int r) {
    if (x->n >= GEN_EXPR_MAX) return -1;
    int64_t a = x->node[l].v, b = x->node[r].v, v;
    switch (op) {
    case '+':
        if (__builtin_add_overflow(a, b, &v)) return -1;
        break;
    case '-':
        if (__builtin_sub_overflow(a, b, &v)) return -1;
        break;
    case '*':
        if (__builtin_mul_overflow(a, b, &v)) return -1;
        break;
    case '/':
        if (b == 0 || a % b != 0 || (a == INT64_MIN && b == -1)) return -1;
        v = a / b;
        break;
    default: return -1;
    }
    x->node[x->n] = (gen_node){op, v, l, r};
    return x->n++;
}

static int prec(char op) { return op == '+' || op == '-' ? 1 : op ? 2 : 3; }

/* A child needs parentheses when it binds looser than its parent, or as a right child binding equally (a-(b+c),
 * a*(b*c)): then re-reading the printed text gives back exactly this tree, and the steps follow the text. */
static int needs_parens(const gen_expr *x, int parent, int child, int right) {
    int pc = prec(x->node[child].op), pp = prec(x->node[parent].op);
    return pc < pp || (right && pc == pp);
}

static void print_child(const gen_expr *x, int parent, int child, int right, gen_str *b) {
    int par = needs_parens(x, parent, child, right);
    if (par) gen_str_add(b, "(");
    gen_expr_print(x, child, b);
    if (par) gen_str_add(b, ")");
}

void gen_expr_print(const gen_expr *x, int root, gen_str *b) {
    const gen_node *n = &x->node[root];
    if (!n->op) {
        gen_str_add(b, "%lld", (long long)n->v);
        return;
    }
    print_child(x, root, n->l, 0, b);
    gen_str_add(b, "%c", n->op);
    print_child(x, root, n->r, 1, b);
}

void gen_expr_steps(const gen_expr *x, int root, gen_str *b) {
    const gen_node *n = &x->node[root];
    if (!n->op) return;
    gen_expr_steps(x, n->l, b);
    gen_expr_steps(x, n->r, b);
    gen_str_add(b, "%s%lld%c%lld=%lld.", b->n ? " " : "", (long long)x->node[n->l].v, n->op,
                (long long)x->node[n->r].v, (long long)n->v);
}

void gen_expr_range(const gen_expr *x, int root, int64_t *maxabs, int64_t *minv) {
    const gen_node *n = &x->node[root];
    int64_t a = n->v < 0 ? -n->v : n->v;
    if (a > *maxabs) *maxabs = a;
    if (n->v < *minv) *minv = n->v;
    if (n->op) {
        gen_expr_range(x, n->l, maxabs, minv);
        gen_expr_range(x, n->r, maxabs, minv);
    }
}

int gen_expr_has_parens(const gen_expr *x, int root) {
    const gen_node *n = &x->node[root];
    if (!n->op) return 0;
    return needs_parens(x, root, n->l, 0) || needs_parens(x, root, n->r, 1) || gen_expr_has_parens(x, n->l) ||
           gen_expr_has_parens(x, n->r);
}
