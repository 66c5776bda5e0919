/* recipe.c: recipe YAML -> a typed tree checked against the schema of core/recipe_schema.c.
 *
 * Two trees. libyaml's events become a plain YAML tree (ynode: scalars, mappings, sequences, each with its
 * 1-based line:column), which is then converted field by field against the schema into the recipe tree
 * (rnode: typed values, one child per schema field). Every check that needs the place in the file runs during
 * that conversion; recipe_resolve then fills defaults, checks required keys, one-of groups and cross-field
 * rules, pointing at the node (file position, --set text, or the file when the value is a default).
 * recipe_set works on a copy of the tree, so a failed override leaves the recipe as it was. */
#include "core/recipe.h"

#include <assert.h>
#include <ctype.h>
#include <errno.h>
#include <inttypes.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <yaml.h>

#include "core/mem.h"
#include "core/strbuf.h"

#define MAX_DEPTH 32          /* YAML nesting; the schema needs 4 */
#define MAX_RECIPE_BYTES (16u << 20)

static void sb_indent(strbuf *b, int n) {
    static const char spaces[] = "                                                                ";
    while (n > 0) {
        int k = n < 64 ? n : 64;
        strbuf_putn(b, spaces, (size_t)k);
        n -= k;
    }
}

/* ---- the YAML tree --------------------------------------------------------------------------------- */

enum { YN_SCALAR, YN_MAP, YN_SEQ };

typedef struct ynode {
    int kind;
    int line, col; /* 1-based */
    int plain;     /* scalar in plain style: may read as null, a bool or a number */
    char *s;       /* scalar text (NUL-terminated; len may be larger if the text holds a NUL) */
    size_t len;
    struct ynode *kids; /* map: key, value, key, value, ...; seq: the items */
    size_t n, cap;
} ynode;

static void ynode_free(ynode *y) {
    for (size_t i = 0; i < y->n; i++) ynode_free(&y->kids[i]);
    mem_free(y->kids);
    mem_free(y->s);
    memset(y, 0, sizeof *y);
}

static int y_is_null(const ynode *y) {
    return y->kind == YN_SCALAR && y->plain &&
           (y->len == 0 || !strcmp(y->s, "~") || !strcmp(y->s, "null") || !strcmp(y->s, "Null") ||
            !strcmp(y->s, "NULL"));
}

typedef struct {
    yaml_parser_t p;
    const char *src;     /* name in messages */
    int nolines;         /* --set values and schema defaults: positions mean nothing to the user */
    const char *problem; /* libyaml's problem text of a syntax error (a static string) */
    mr_err *e;
} yreader;

static int y_fail(yreader *yr) {
    yaml_parser_t *p = &yr->p;
    if (p->error == YAML_MEMORY_ERROR) return err_set(yr->e, MR_ENOMEM, "out of memory");
    const char *problem = p->problem ? p->problem : "unknown error";
    yr->problem = problem;
    if (p->error == YAML_READER_ERROR)
        return err_set(yr->e, MR_EFORMAT, "%s: YAML read error: %s at byte %zu", yr->src, problem,
                       p->problem_offset);
    if (yr->nolines) return err_set(yr->e, MR_EFORMAT, "%s: YAML syntax error: %s", yr->src, problem);
    char ctx[192] = "";
    if (p->context)
        snprintf(ctx, sizeof ctx, " (%s at %zu:%zu)", p->context, p->context_mark.line + 1,
                 p->context_mark.column + 1);
    return err_set(yr->e, MR_EFORMAT, "%s:%zu:%zu: YAML syntax error: %s%s", yr->src, p->problem_mark.line + 1,
                   p->problem_mark.column + 1, problem, ctx);
}

static int y_next(yreader *yr, yaml_event_t *ev) { return yaml_parser_parse(&yr->p, ev) ? 0 : y_fail(yr); }

static int y_err(yreader *yr, const yaml_mark_t *m, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
static int y_err(yreader *yr, const yaml_mark_t *m, const char *fmt, ...) {
    char msg[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    if (yr->nolines) return err_set(yr->e, MR_EFORMAT, "%s: %s", yr->src, msg);
    return err_set(yr->e, MR_EFORMAT, "%s:%zu:%zu: %s", yr->src, m->line + 1, m->column + 1, msg);
}

static ynode *y_push(ynode *parent) {
    if (parent->n == parent->cap) {
        size_t cap = parent->cap ? parent->cap * 2 : 8, bytes;
        if (size_mul(cap, sizeof(ynode), &bytes)) return NULL;
        ynode *k = mem_realloc(parent->kids, bytes);
        if (!k) return NULL;
        parent->kids = k;
        parent->cap = cap;
    }
    ynode *slot = &parent->kids[parent->n++];
    memset(slot, 0, sizeof *slot);
    return slot;
}

/* Builds the node that starts with event ev (consumed here), reading its children from the parser. */
static int y_node(yreader *yr, yaml_event_t *ev, ynode *out, int depth) {
    int rc = 0;
    const yaml_char_t *anchor = NULL, *tag = NULL;
    memset(out, 0, sizeof *out);
    out->line = (int)ev->start_mark.line + 1;
    out->col = (int)ev->start_mark.column + 1;
    switch (ev->type) {
    case YAML_ALIAS_EVENT:
        rc = y_err(yr, &ev->start_mark, "YAML aliases (*%s) are not supported in recipes: write the value out",
                   (const char *)ev->data.alias.anchor);
        break;
    case YAML_SCALAR_EVENT:
        anchor = ev->data.scalar.anchor;
        tag = ev->data.scalar.tag;
        out->kind = YN_SCALAR;
        out->plain = ev->data.scalar.style == YAML_PLAIN_SCALAR_STYLE;
        out->len = ev->data.scalar.length;
        if (!anchor && !tag) {
            out->s = mem_alloc(out->len + 1);
            if (!out->s) {
                rc = err_set(yr->e, MR_ENOMEM, "out of memory");
                break;
            }
            memcpy(out->s, ev->data.scalar.value, out->len);
            out->s[out->len] = '\0';
        }
        break;
    case YAML_SEQUENCE_START_EVENT:
    case YAML_MAPPING_START_EVENT: {
        int seq = ev->type == YAML_SEQUENCE_START_EVENT;
        anchor = seq ? ev->data.sequence_start.anchor : ev->data.mapping_start.anchor;
        tag = seq ? ev->data.sequence_start.tag : ev->data.mapping_start.tag;
        out->kind = seq ? YN_SEQ : YN_MAP;
        if (anchor || tag) break;
        if (depth >= MAX_DEPTH) {
            rc = y_err(yr, &ev->start_mark, "nesting deeper than %d levels", MAX_DEPTH);
            break;
        }
        yaml_event_type_t end = seq ? YAML_SEQUENCE_END_EVENT : YAML_MAPPING_END_EVENT;
        for (;;) {
            yaml_event_t c;
            if ((rc = y_next(yr, &c))) break;
            if (c.type == end) {
                yaml_event_delete(&c);
                break;
            }
            ynode *slot = y_push(out);
            if (!slot) {
                yaml_event_delete(&c);
                rc = err_set(yr->e, MR_ENOMEM, "out of memory");
                break;
            }
            if ((rc = y_node(yr, &c, slot, depth + 1))) break;
        }
        break;
    }
    default:
        rc = y_err(yr, &ev->start_mark, "unexpected YAML event %d", (int)ev->type);
        break;
    }
    if (!rc && anchor)
        rc = y_err(yr, &ev->start_mark, "YAML anchors (&%s) are not supported in recipes: write the value out",
                   (const char *)anchor);
    else if (!rc && tag)
        rc = y_err(yr, &ev->start_mark, "YAML tags (%s) are not supported in recipes", (const char *)tag);
    yaml_event_delete(ev);
    return rc;
}

/* Parses one YAML document. An empty stream gives an empty plain scalar (null) at 1:1. */
static int y_parse(mr_err *e, const char *src, int nolines, const char *text, size_t len, ynode *out,
                   const char **problem) {
    yreader yr = {.src = src, .nolines = nolines, .e = e};
    yaml_event_t ev;
    int rc;
    memset(out, 0, sizeof *out);
    if (problem) *problem = NULL;
    if (!yaml_parser_initialize(&yr.p)) return err_set(e, MR_ENOMEM, "out of memory");
    yaml_parser_set_input_string(&yr.p, (const unsigned char *)text, len);
    if ((rc = y_next(&yr, &ev))) goto done; /* stream start */
    yaml_event_delete(&ev);
    if ((rc = y_next(&yr, &ev))) goto done;
    if (ev.type == YAML_STREAM_END_EVENT) {
        yaml_event_delete(&ev);
        out->kind = YN_SCALAR;
        out->plain = 1;
        out->line = out->col = 1;
        out->s = mem_strdup("");
        if (!out->s) rc = err_set(e, MR_ENOMEM, "out of memory");
        goto done;
    }
    yaml_event_delete(&ev); /* document start */
    if ((rc = y_next(&yr, &ev))) goto done;
    if ((rc = y_node(&yr, &ev, out, 0))) goto done;
    if ((rc = y_next(&yr, &ev))) goto done; /* document end */
    yaml_event_delete(&ev);
    if ((rc = y_next(&yr, &ev))) goto done;
    if (ev.type != YAML_STREAM_END_EVENT)
        rc = y_err(&yr, &ev.start_mark, "expected one YAML document, found a second one");
    yaml_event_delete(&ev);
done:
    if (problem) *problem = yr.problem;
    yaml_parser_delete(&yr.p);
    if (rc) ynode_free(out);
    return rc;
}

/* ---- the recipe tree ------------------------------------------------------------------------------- */

typedef struct rnode {
    unsigned char kind;  /* recipe_type of the value (list items: the item type; objlist items: RT_OBJECT) */
    unsigned char set;   /* holds a value (objects: present) */
    unsigned char given; /* written by the user (in the file or by --set), null included */
    int src;             /* index in recipe.sources; -1: a default */
    int line, col;       /* 1-based position in the source; 0: none */
    union {
        int64_t i; /* RT_INT, RT_BOOL, RT_ENUM (index in values) */
        double d;
        char *s;
    } v;
    struct rnode *kids; /* objects: one per schema field; lists: the items */
    size_t n;
} rnode;

struct recipe {
    rnode root;
    char **sources; /* [0]: the file; then one "--set ..." per override */
    size_t nsources;
};

static const recipe_field root_field = {.key = "", .type = RT_OBJECT, .fields = recipe_schema};

static void rnode_clear(rnode *n) {
    if (n->kind == RT_STRING) mem_free(n->v.s);
    for (size_t i = 0; i < n->n; i++) rnode_clear(&n->kids[i]);
    mem_free(n->kids);
    memset(n, 0, sizeof *n);
}

static int rnode_clone(rnode *dst, const rnode *src) {
    *dst = *src;
    dst->kids = NULL;
    dst->n = 0;
    if (src->kind == RT_STRING && src->v.s) {
        dst->v.s = mem_strdup(src->v.s);
        if (!dst->v.s) {
            dst->kind = RT_INT;
            return MR_ENOMEM;
        }
    }
    if (src->kids) {
        dst->kids = mem_calloc(src->n, sizeof(rnode));
        if (!dst->kids) return MR_ENOMEM;
        dst->n = src->n;
        for (size_t i = 0; i < src->n; i++)
            if (rnode_clone(&dst->kids[i], &src->kids[i])) return MR_ENOMEM;
    }
    return 0;
}

static size_t nfields(const recipe_field *fs) {
    size_t n = 0;
    while (fs[n].key) n++;
    return n;
}

static int field_index(const recipe_field *fs, const char *key, size_t len) {
    for (int i = 0; fs[i].key; i++)
        if (strlen(fs[i].key) == len && !memcmp(fs[i].key, key, len)) return i;
    return -1;
}

/* The type of the value at a place: a field, or an item of a list field. */
static recipe_type place_type(const recipe_field *f, int item) {
    if (!item) return f->type;
    return f->type == RT_LIST ? f->item : RT_OBJECT;
}

static int make_present(rnode *n, const recipe_field *fields) {
    n->kids = mem_calloc(nfields(fields), sizeof(rnode));
    if (!n->kids) return MR_ENOMEM;
    n->n = nfields(fields);
    n->kind = RT_OBJECT;
    n->set = 1;
    return 0;
}

/* ---- messages -------------------------------------------------------------------------------------- */

/* Conversion and resolution context: where new values come from, and the dotted path being worked on. */
typedef struct {
    const recipe *r;
    int src;     /* source index of values made now; -1: schema defaults */
    int nolines; /* positions are not shown (--set, defaults) */
    mr_err *e;
    char path[512];
    size_t plen;
} cctx;

static size_t path_key(cctx *c, const char *key, size_t len) {
    size_t old = c->plen;
    int k = snprintf(c->path + old, sizeof c->path - old, "%s%.*s", old ? "." : "", (int)len, key);
    c->plen = k < 0 ? old : (old + (size_t)k >= sizeof c->path ? sizeof c->path - 1 : old + (size_t)k);
    for (size_t i = old; i < c->plen; i++) /* a key from the file may hold anything; messages are one line */
        if ((unsigned char)c->path[i] < 0x20 || c->path[i] == 0x7f) c->path[i] = '?';
    return old;
}

static size_t path_index(cctx *c, size_t i) {
    size_t old = c->plen;
    int k = snprintf(c->path + old, sizeof c->path - old, "[%zu]", i);
    c->plen = k < 0 ? old : (old + (size_t)k >= sizeof c->path ? sizeof c->path - 1 : old + (size_t)k);
    return old;
}

static void path_pop(cctx *c, size_t old) {
    c->plen = old;
    c->path[old] = '\0';
}

static const char *src_name(const recipe *r, int src) {
    if (src < 0) return "<schema default>";
    return r->sources[src];
}

static int verr(mr_err *e, int code, const char *src, int line, int col, const char *path, const char *fmt,
                va_list ap) __attribute__((format(printf, 7, 0)));
static int verr(mr_err *e, int code, const char *src, int line, int col, const char *path, const char *fmt,
                va_list ap) {
    char msg[1024];
    vsnprintf(msg, sizeof msg, fmt, ap);
    const char *sep = path && *path ? ": " : "";
    if (!path) path = "";
    if (line > 0) return err_set(e, code, "%s:%d:%d: %s%s%s", src, line, col, path, sep, msg);
    return err_set(e, code, "%s: %s%s%s", src, path, sep, msg);
}

/* An error at a place in the text being converted (line 0: no position). */
static int cerr(cctx *c, int code, int line, int col, const char *fmt, ...) __attribute__((format(printf, 5, 6)));
static int cerr(cctx *c, int code, int line, int col, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    int rc = verr(c->e, code, src_name(c->r, c->src), c->nolines ? 0 : line, col, c->path, fmt, ap);
    va_end(ap);
    return rc;
}

/* An error about a node of the recipe under the dotted path `path`: at its place, or (a default) the file. */
static int nerr(const recipe *r, mr_err *e, int code, const rnode *at, const char *path, const char *fmt, ...)
    __attribute__((format(printf, 6, 7)));
static int nerr(const recipe *r, mr_err *e, int code, const rnode *at, const char *path, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    int given = at && at->src >= 0;
    int rc = verr(e, code, r->sources[given ? at->src : 0], given ? at->line : 0, given ? at->col : 0, path, fmt,
                  ap);
    va_end(ap);
    return rc;
}

/* What was found, for "got <this>". */
static const char *got(const ynode *y, char *buf, size_t cap) {
    if (y->kind == YN_MAP) return "a mapping";
    if (y->kind == YN_SEQ) return "a list";
    if (y_is_null(y)) return "null";
    size_t k = 0;
    buf[k++] = '"';
    for (size_t i = 0; i < y->len && k + 8 < cap; i++) {
        unsigned char ch = (unsigned char)y->s[i];
        if (i >= 60) {
            k += (size_t)snprintf(buf + k, cap - k, "...");
            break;
        }
        if (ch == '"' || ch == '\\') k += (size_t)snprintf(buf + k, cap - k, "\\%c", ch);
        else if (ch == '\n') k += (size_t)snprintf(buf + k, cap - k, "\\n");
        else if (ch < 0x20 || ch == 0x7f) k += (size_t)snprintf(buf + k, cap - k, "\\x%02x", ch);
        else buf[k++] = (char)ch;
    }
    buf[k++] = '"';
    buf[k] = '\0';
    return buf;
}

/* ---- did you mean ---------------------------------------------------------------------------------- */

/* Optimal-string-alignment distance (Levenshtein plus adjacent transpositions), ignoring case. */
static int edit_distance(const char *a, const char *b) {
    size_t n = strlen(a), m = strlen(b);
    int d[48][48];
    if (n >= 48 || m >= 48) return 99;
    for (size_t i = 0; i <= n; i++) d[i][0] = (int)i;
    for (size_t j = 0; j <= m; j++) d[0][j] = (int)j;
    for (size_t i = 1; i <= n; i++) {
        for (size_t j = 1; j <= m; j++) {
            int ai = tolower((unsigned char)a[i - 1]), bj = tolower((unsigned char)b[j - 1]);
            int v = d[i - 1][j - 1] + (ai != bj);
            if (d[i - 1][j] + 1 < v) v = d[i - 1][j] + 1;
            if (d[i][j - 1] + 1 < v) v = d[i][j - 1] + 1;
            if (i > 1 && j > 1 && ai == tolower((unsigned char)b[j - 2]) &&
                tolower((unsigned char)a[i - 2]) == bj && d[i - 2][j - 2] + 1 < v)
                v = d[i - 2][j - 2] + 1;
            d[i][j] = v;
        }
    }
    return d[n][m];
}

/* Names TRL and verl users bring along, and where the knob lives here. */
static const struct {
    const char *theirs, *ours;
} aliases[] = {
    {"learning_rate", "optim.lr"},
    {"max_grad_norm", "optim.grad_clip"},
    {"lr_scheduler_type", "optim.schedule"},
    {"max_completion_length", "rollout.max_new_tokens"},
    {"max_completion_tokens", "rollout.max_new_tokens"},
    {"max_response_length", "rollout.max_new_tokens"},
    {"max_tokens", "rollout.max_new_tokens"},
    {"epsilon", "grpo.eps_low"},
    {"epsilon_high", "grpo.eps_high"},
    {"clip_ratio_low", "grpo.eps_low"},
    {"clip_ratio_high", "grpo.eps_high"},
    {"clip_ratio_c", "grpo.dual_clip"},
    {"loss_type", "grpo.loss_agg"},
    {"loss_agg_mode", "grpo.loss_agg"},
    {"num_iterations", "grpo.mu"},
    {"ppo_epochs", "grpo.mu"},
    {"kl_coef", "grpo.beta"},
    {"kl_loss_coef", "grpo.beta"},
    {"kl_loss_type", "grpo.kl_estimator"},
    {"entropy_coeff", "grpo.entropy_coef"},
    {"rollout_n", "grpo.num_generations"},
    {"mask_truncated_completions", "grpo.overlong.mode"},
    {"gradient_accumulation_steps", "sft.grad_accum"},
    {"num_train_epochs", "sft.epochs"},
    {"max_seq_length", "data.max_seq_len"},
    {"max_length", "data.max_seq_len"},
    {"completion_only_loss", "data.loss_on"},
};

/* Finds a field named key anywhere in the schema; writes its dotted path. */
static int find_anywhere(const recipe_field *fs, const char *prefix, const char *key, char *out, size_t cap) {
    for (size_t i = 0; fs[i].key; i++) {
        if (!strcasecmp(fs[i].key, key)) {
            snprintf(out, cap, "%s%s", prefix, fs[i].key);
            return 1;
        }
    }
    for (size_t i = 0; fs[i].key; i++) {
        if (fs[i].type != RT_OBJECT && fs[i].type != RT_OBJLIST) continue;
        char sub[256];
        snprintf(sub, sizeof sub, "%s%s%s.", prefix, fs[i].key, fs[i].type == RT_OBJLIST ? "[0]" : "");
        if (find_anywhere(fs[i].fields, sub, key, out, cap)) return 1;
    }
    return 0;
}

/* " (did you mean 'x'?)" for an unknown key among fs, or a list of what is there. */
static void suggest(const recipe_field *fs, const char *key, char *out, size_t cap) {
    int best = -1, bestd = 99;
    size_t klen = strlen(key);
    for (int i = 0; fs[i].key; i++) {
        int d = edit_distance(key, fs[i].key);
        size_t len = strlen(fs[i].key) > klen ? strlen(fs[i].key) : klen;
        if (d <= 2 && (size_t)(2 * d) <= len && d < bestd) {
            best = i;
            bestd = d;
        }
    }
    if (best >= 0) {
        snprintf(out, cap, " (did you mean '%s'?)", fs[best].key);
        return;
    }
    for (size_t i = 0; i < sizeof aliases / sizeof aliases[0]; i++) {
        if (!strcasecmp(aliases[i].theirs, key)) {
            snprintf(out, cap, " (did you mean '%s'?)", aliases[i].ours);
            return;
        }
    }
    char where[256];
    if (find_anywhere(recipe_schema, "", key, where, sizeof where)) {
        snprintf(out, cap, " (did you mean '%s'?)", where);
        return;
    }
    size_t n = nfields(fs);
    if (fs == recipe_schema || n <= 12) {
        size_t k = (size_t)snprintf(out, cap, " (%s: ", fs == recipe_schema ? "sections" : "keys");
        for (size_t i = 0; i < n && k < cap; i++)
            k += (size_t)snprintf(out + k, cap - k, "%s%s", i ? ", " : "", fs[i].key);
        if (k < cap) snprintf(out + k, cap - k, ")");
    } else {
        snprintf(out, cap, " (see moerl recipe --schema)");
    }
}

/* The caller has pushed the unknown key onto the path. */
static int unknown_key(cctx *c, const recipe_field *fs, const char *key, int line, int col) {
    char hint[768];
    suggest(fs, key, hint, sizeof hint);
    return cerr(c, MR_EINVAL, line, col, "unknown %s%s", fs == recipe_schema ? "section" : "key", hint);
}

/* ---- conversion: YAML tree -> recipe tree ---------------------------------------------------------- */

static int parse_i64(const char *s, int64_t *out) {
    const char *p = s;
    if (*p == '+' || *p == '-') p++;
    if (!*p) return -1;
    for (const char *q = p; *q; q++)
        if (!isdigit((unsigned char)*q)) return -1;
    errno = 0;
    long long v = strtoll(s, NULL, 10);
    if (errno == ERANGE) return -1;
    *out = (int64_t)v;
    return 0;
}

static int parse_f64(const char *s, double *out) {
    if (!*s) return -1;
    for (const char *q = s; *q; q++)
        if (!strchr("0123456789+-.eE", *q)) return -1;
    char *end;
    double v = strtod(s, &end);
    if (*end || end == s || !isfinite(v)) return -1;
    *out = v;
    return 0;
}

static int in_range(const recipe_field *f, double x) {
    if (f->flags & RF_MIN) {
        if ((f->flags & RF_MIN_EXCL) ? !(x > f->min) : !(x >= f->min)) return 0;
    }
    if (f->flags & RF_MAX) {
        if ((f->flags & RF_MAX_EXCL) ? !(x < f->max) : !(x <= f->max)) return 0;
    }
    return 1;
}

static void mark(cctx *c, rnode *out, const ynode *y) {
    out->given = 1;
    out->src = c->src;
    out->line = c->nolines ? 0 : y->line;
    out->col = c->nolines ? 0 : y->col;
}

/* A scalar value (a scalar field, or an item of a list field). */
static int conv_scalar(cctx *c, const recipe_field *f, int item, const ynode *y, rnode *out) {
    recipe_type t = place_type(f, item);
    char want[640], gb[96];
    int bad = 0;
    rnode v = {0};
    recipe_field_describe(f, item, want, sizeof want);
    if (y->kind != YN_SCALAR || y_is_null(y))
        return cerr(c, MR_EINVAL, y->line, y->col, "expected %s, got %s", want, got(y, gb, sizeof gb));
    if (strlen(y->s) != y->len)
        return cerr(c, MR_EINVAL, y->line, y->col, "expected %s, got a string holding a NUL byte", want);
    v.kind = (unsigned char)t;
    switch (t) {
    case RT_INT: bad = !y->plain || parse_i64(y->s, &v.v.i); break;
    case RT_FLOAT: bad = !y->plain || parse_f64(y->s, &v.v.d); break;
    case RT_BOOL:
        if (y->plain && (!strcmp(y->s, "true") || !strcmp(y->s, "True") || !strcmp(y->s, "TRUE"))) v.v.i = 1;
        else if (y->plain && (!strcmp(y->s, "false") || !strcmp(y->s, "False") || !strcmp(y->s, "FALSE"))) v.v.i = 0;
        else bad = 1;
        break;
    case RT_ENUM:
        v.v.i = -1;
        for (int i = 0; f->values[i]; i++)
            if (!strcmp(f->values[i], y->s)) v.v.i = i;
        bad = v.v.i < 0;
        break;
    case RT_STRING:
        v.v.s = mem_strdup(y->s);
        if (!v.v.s) return err_set(c->e, MR_ENOMEM, "out of memory");
        break;
    default: return cerr(c, MR_EINTERNAL, y->line, y->col, "not a scalar type");
    }
    if (bad) {
        const char *why = (!y->plain && t != RT_ENUM) ? " (quoted, so a string)" : "";
        return cerr(c, MR_EINVAL, y->line, y->col, "expected %s, got %s%s", want, got(y, gb, sizeof gb), why);
    }
    if ((t == RT_INT && !in_range(f, (double)v.v.i)) || (t == RT_FLOAT && !in_range(f, v.v.d)))
        return cerr(c, MR_ERANGE, y->line, y->col, "expected %s, got %s", want, got(y, gb, sizeof gb));
    rnode_clear(out);
    *out = v;
    out->set = 1;
    mark(c, out, y);
    return 0;
}

static int conv_value(cctx *c, const recipe_field *f, const ynode *y, rnode *out);

/* A mapping against fields f->fields (f: an object field, or a list-of-objects field for its items). */
static int conv_object(cctx *c, const recipe_field *f, const ynode *y, rnode *out) {
    const recipe_field *fs = f->fields;
    char gb[96];
    rnode_clear(out);
    if (make_present(out, fs)) return err_set(c->e, MR_ENOMEM, "out of memory");
    mark(c, out, y);
    for (size_t k = 0; k + 1 < y->n; k += 2) {
        const ynode *key = &y->kids[k], *val = &y->kids[k + 1];
        if (key->kind != YN_SCALAR || y_is_null(key))
            return cerr(c, MR_EINVAL, key->line, key->col, "expected a key, got %s", got(key, gb, sizeof gb));
        size_t at = path_key(c, key->s, strlen(key->s));
        int idx = field_index(fs, key->s, strlen(key->s));
        int rc;
        if (idx < 0) {
            rc = unknown_key(c, fs, key->s, key->line, key->col);
        } else if (out->kids[idx].given) {
            rnode *first = &out->kids[idx];
            if (first->line)
                rc = cerr(c, MR_EINVAL, key->line, key->col, "duplicate key (first at line %d)", first->line);
            else
                rc = cerr(c, MR_EINVAL, key->line, key->col, "duplicate key");
        } else {
            rc = conv_value(c, &fs[idx], val, &out->kids[idx]);
            /* a field's place is its key: later messages about it point there */
            out->kids[idx].given = 1;
            out->kids[idx].src = c->src;
            out->kids[idx].line = c->nolines ? 0 : key->line;
            out->kids[idx].col = c->nolines ? 0 : key->col;
        }
        path_pop(c, at);
        if (rc) return rc;
    }
    return 0;
}

static int conv_value(cctx *c, const recipe_field *f, const ynode *y, rnode *out) {
    char want[640], gb[96];
    rnode_clear(out);
    if (y_is_null(y)) {
        /* null: not given (a default applies), but a mapping is present with its defaults */
        mark(c, out, y);
        if (f->type != RT_OBJECT) return 0;
        return make_present(out, f->fields) ? err_set(c->e, MR_ENOMEM, "out of memory") : 0;
    }
    recipe_field_describe(f, 0, want, sizeof want);
    switch (f->type) {
    case RT_INT:
    case RT_FLOAT:
    case RT_BOOL:
    case RT_STRING:
    case RT_ENUM: return conv_scalar(c, f, 0, y, out);
    case RT_LIST:
        if (y->kind != YN_SEQ)
            return cerr(c, MR_EINVAL, y->line, y->col, "expected %s, got %s", want, got(y, gb, sizeof gb));
        if (y->n < f->min_items || (f->max_items && y->n > f->max_items))
            return cerr(c, MR_EINVAL, y->line, y->col, "expected %s, got %zu item%s", want, y->n,
                        y->n == 1 ? "" : "s");
        break;
    case RT_OBJECT:
        if (y->kind == YN_MAP) return conv_object(c, f, y, out);
        if (y->kind == YN_SCALAR) {
            for (size_t i = 0; f->fields[i].key; i++) {
                if (!(f->fields[i].flags & RF_SHORTHAND)) continue;
                if (make_present(out, f->fields)) return err_set(c->e, MR_ENOMEM, "out of memory");
                mark(c, out, y);
                size_t at = path_key(c, f->fields[i].key, strlen(f->fields[i].key));
                int rc = conv_value(c, &f->fields[i], y, &out->kids[i]);
                path_pop(c, at);
                return rc;
            }
        }
        return cerr(c, MR_EINVAL, y->line, y->col, "expected %s, got %s", want, got(y, gb, sizeof gb));
    case RT_OBJLIST:
        if (y->kind != YN_SEQ)
            return cerr(c, MR_EINVAL, y->line, y->col, "expected %s, got %s", want, got(y, gb, sizeof gb));
        break;
    }
    /* a list: of scalars, or of mappings */
    out->kind = (unsigned char)f->type;
    out->set = 1;
    mark(c, out, y);
    if (y->n) {
        out->kids = mem_calloc(y->n, sizeof(rnode));
        if (!out->kids) return err_set(c->e, MR_ENOMEM, "out of memory");
        out->n = y->n;
    }
    for (size_t i = 0; i < y->n; i++) {
        const ynode *it = &y->kids[i];
        size_t at = path_index(c, i);
        int rc;
        if (f->type == RT_LIST) rc = conv_scalar(c, f, 1, it, &out->kids[i]);
        else if (it->kind == YN_MAP) rc = conv_object(c, f, it, &out->kids[i]);
        else rc = cerr(c, MR_EINVAL, it->line, it->col, "expected a mapping, got %s", got(it, gb, sizeof gb));
        path_pop(c, at);
        if (rc) return rc;
    }
    return 0;
}

/* ---- load ------------------------------------------------------------------------------------------ */

static int add_source(recipe *r, char *name) {
    size_t bytes;
    if (size_mul(r->nsources + 1, sizeof(char *), &bytes)) return MR_ENOMEM;
    char **s = mem_realloc(r->sources, bytes);
    if (!s) return MR_ENOMEM;
    r->sources = s;
    r->sources[r->nsources++] = name;
    return 0;
}

void recipe_free(recipe *r) {
    if (!r) return;
    rnode_clear(&r->root);
    for (size_t i = 0; i < r->nsources; i++) mem_free(r->sources[i]);
    mem_free(r->sources);
    mem_free(r);
}

static int load_text(recipe **out, const char *text, size_t len, const char *src, mr_err *e) {
    ynode y;
    char gb[96];
    int rc;
    *out = NULL;
    recipe *r = mem_calloc(1, sizeof *r);
    if (!r) return err_set(e, MR_ENOMEM, "out of memory");
    char *name = mem_strdup(src);
    if (!name || add_source(r, name)) {
        mem_free(name);
        recipe_free(r);
        return err_set(e, MR_ENOMEM, "out of memory");
    }
    if ((rc = y_parse(e, src, 0, text, len, &y, NULL))) {
        recipe_free(r);
        return rc;
    }
    if (y.kind != YN_MAP) {
        rc = err_set(e, MR_EINVAL, "%s:%d:%d: expected a mapping of sections (run, model, data, ...), got %s", src,
                     y.line, y.col, y_is_null(&y) ? "an empty document" : got(&y, gb, sizeof gb));
    } else {
        cctx c = {.r = r, .src = 0, .e = e};
        rc = conv_object(&c, &root_field, &y, &r->root);
    }
    ynode_free(&y);
    if (rc) {
        recipe_free(r);
        return rc;
    }
    *out = r;
    return 0;
}

int recipe_load_string(recipe **out, const char *text, const char *source_name, mr_err *e) {
    return load_text(out, text, strlen(text), source_name ? source_name : "<string>", e);
}

int recipe_load(recipe **out, const char *path, mr_err *e) {
    *out = NULL;
    FILE *f = fopen(path, "rb");
    if (!f) return err_set(e, MR_EIO, "%s: cannot open: %s", path, strerror(errno));
    char *buf = NULL;
    size_t n = 0, cap = 0;
    int rc = 0;
    for (;;) {
        if (n + 4096 > cap) {
            size_t ncap = cap ? cap * 2 : 8192;
            char *p = mem_realloc(buf, ncap + 1);
            if (!p) {
                rc = err_set(e, MR_ENOMEM, "out of memory");
                break;
            }
            buf = p;
            cap = ncap;
        }
        size_t got_n = fread(buf + n, 1, cap - n, f);
        n += got_n;
        if (got_n == 0) {
            if (ferror(f)) rc = err_set(e, MR_EIO, "%s: cannot read: %s", path, strerror(errno));
            break;
        }
        if (n > MAX_RECIPE_BYTES) {
            rc = err_set(e, MR_EFORMAT, "%s: larger than %u bytes; not a recipe", path, MAX_RECIPE_BYTES);
            break;
        }
    }
    fclose(f);
    if (!rc) {
        buf[n] = '\0';
        rc = load_text(out, buf, n, path, e);
    }
    mem_free(buf);
    return rc;
}

const char *recipe_source(const recipe *r) { return r->sources[0]; }

/* ---- paths ------------------------------------------------------------------------------------------ */

typedef struct {
    const char *key; /* NULL: an index segment */
    size_t klen;
    size_t idx;
} pseg;

#define MAX_SEGS 16

/* key ('[' digits ']')* ('.' key ('[' digits ']')*)*; keys are [A-Za-z0-9_]+. */
static int path_parse(const char *p, size_t len, pseg *segs, size_t *nsegs) {
    const char *end = p + len;
    size_t n = 0;
    for (;;) {
        const char *k = p;
        while (p < end && (isalnum((unsigned char)*p) || *p == '_')) p++;
        if (p == k || n == MAX_SEGS) return -1;
        segs[n++] = (pseg){.key = k, .klen = (size_t)(p - k)};
        while (p < end && *p == '[') {
            size_t idx = 0;
            const char *d = ++p;
            while (p < end && isdigit((unsigned char)*p) && p - d < 9) idx = idx * 10 + (size_t)(*p++ - '0');
            if (p == d || p >= end || *p != ']' || n == MAX_SEGS) return -1;
            p++;
            segs[n++] = (pseg){.key = NULL, .idx = idx};
        }
        if (p == end) break;
        if (*p != '.') return -1;
        p++;
    }
    *nsegs = n;
    return 0;
}

/* Where a path leads: the field (item: an item of that list field) and the node (NULL where absent). */
typedef struct {
    const recipe_field *f;
    int item;
    const rnode *node;
} place;

static int lookup(const recipe *r, const char *path, place *out) {
    pseg segs[MAX_SEGS];
    size_t ns;
    if (path_parse(path, strlen(path), segs, &ns)) return -1;
    const recipe_field *f = &root_field;
    int item = 0;
    const rnode *node = &r->root;
    for (size_t i = 0; i < ns; i++) {
        if (segs[i].key) {
            if (place_type(f, item) != RT_OBJECT) return -1;
            int k = field_index(f->fields, segs[i].key, segs[i].klen);
            if (k < 0) return -1;
            node = node && node->set && node->kids ? &node->kids[k] : NULL;
            f = &f->fields[k];
            item = 0;
        } else {
            if (item || (f->type != RT_LIST && f->type != RT_OBJLIST)) return -1;
            node = node && node->set && segs[i].idx < node->n ? &node->kids[segs[i].idx] : NULL;
            item = 1;
        }
    }
    out->f = f;
    out->item = item;
    out->node = node;
    return 0;
}

/* Getters: a path outside the schema or of another type is a programmer error. */
static const rnode *get(const recipe *r, const char *path, recipe_type want, const recipe_field **f) {
    place pl;
    int ok = !lookup(r, path, &pl) && place_type(pl.f, pl.item) == want;
    assert(ok && "recipe getter: path not in the schema, or of another type");
    if (!ok) return NULL;
    if (f) *f = pl.f;
    return pl.node && pl.node->set ? pl.node : NULL;
}

int recipe_is_set(const recipe *r, const char *path) {
    place pl;
    int ok = !lookup(r, path, &pl);
    assert(ok && "recipe_is_set: path not in the schema");
    return ok && pl.node && pl.node->set;
}

int64_t recipe_int(const recipe *r, const char *path) {
    const rnode *n = get(r, path, RT_INT, NULL);
    return n ? n->v.i : 0;
}

double recipe_float(const recipe *r, const char *path) {
    const rnode *n = get(r, path, RT_FLOAT, NULL);
    return n ? n->v.d : 0.0;
}

int recipe_bool(const recipe *r, const char *path) {
    const rnode *n = get(r, path, RT_BOOL, NULL);
    return n ? (int)n->v.i : 0;
}

const char *recipe_str(const recipe *r, const char *path) {
    place pl;
    int ok = !lookup(r, path, &pl);
    recipe_type t = ok ? place_type(pl.f, pl.item) : RT_INT;
    ok = ok && (t == RT_STRING || t == RT_ENUM);
    assert(ok && "recipe_str: path not in the schema, or not a string or enum");
    if (!ok || !pl.node || !pl.node->set) return NULL;
    return t == RT_STRING ? pl.node->v.s : pl.f->values[pl.node->v.i];
}

int recipe_enum(const recipe *r, const char *path) {
    const rnode *n = get(r, path, RT_ENUM, NULL);
    return n ? (int)n->v.i : -1;
}

size_t recipe_list_len(const recipe *r, const char *path) {
    place pl;
    int ok = !lookup(r, path, &pl) && !pl.item && (pl.f->type == RT_LIST || pl.f->type == RT_OBJLIST);
    assert(ok && "recipe_list_len: path not in the schema, or not a list");
    return ok && pl.node && pl.node->set ? pl.node->n : 0;
}

const char *recipe_oneof(const recipe *r, const char *path) {
    const recipe_field *f = NULL;
    const rnode *n = get(r, path, RT_OBJECT, &f);
    if (!n) return NULL;
    for (size_t i = 0; f->fields[i].key; i++)
        if ((f->fields[i].flags & RF_ONEOF) && n->kids[i].set) return f->fields[i].key;
    return NULL;
}

/* ---- resolve --------------------------------------------------------------------------------------- */

static int apply_default(cctx *c, const recipe_field *f, rnode *node) {
    ynode y;
    int rc = y_parse(c->e, "<schema default>", 1, f->def, strlen(f->def), &y, NULL);
    if (rc) return rc == MR_ENOMEM ? rc : err_set(c->e, MR_EINTERNAL, "%s: the schema default does not parse", c->path);
    int src = c->src, nolines = c->nolines;
    c->src = -1;
    c->nolines = 1;
    rc = conv_value(c, f, &y, node);
    c->src = src;
    c->nolines = nolines;
    ynode_free(&y);
    node->given = 0;
    node->src = -1;
    node->line = node->col = 0;
    return rc;
}

static int check_oneof(const recipe *r, mr_err *e, const char *path, const recipe_field *f, const rnode *obj) {
    const recipe_field *fs = f->fields;
    char members[256] = "", found[256] = "";
    size_t km = 0, kf = 0, count = 0;
    const rnode *second = NULL;
    for (size_t i = 0; fs[i].key; i++) {
        if (!(fs[i].flags & RF_ONEOF)) continue;
        km += (size_t)snprintf(members + km, km < sizeof members ? sizeof members - km : 0, "%s%s", km ? ", " : "",
                               fs[i].key);
        const rnode *k = &obj->kids[i];
        if (!k->set) continue;
        count++;
        /* point at the member written last: the one that conflicts with what came before */
        if (!second || k->src > second->src ||
            (k->src == second->src && (k->line > second->line || (k->line == second->line && k->col > second->col))))
            second = k;
        kf += (size_t)snprintf(found + kf, kf < sizeof found ? sizeof found - kf : 0, "%s%s", kf ? " and " : "",
                               fs[i].key);
    }
    int exact = (f->flags & RF_ONEOF_REQ) != 0;
    if (!km || count == 1 || (count == 0 && !exact)) return 0;
    return nerr(r, e, MR_EINVAL, count > 1 ? second : obj, path, "expected %s one of %s, got %s",
                exact ? "exactly" : "at most", members, count ? found : "none");
}

/* Fills the defaults under an object node (f: its field, or the list field for an item). */
static int resolve_object(cctx *c, const recipe_field *f, rnode *obj) {
    const recipe_field *fs = f->fields;
    char want[640];
    for (size_t i = 0; fs[i].key; i++) {
        const recipe_field *kf = &fs[i];
        rnode *kid = &obj->kids[i];
        size_t at = path_key(c, kf->key, strlen(kf->key));
        int rc = 0;
        if (kf->type == RT_OBJECT) {
            /* a one-of member stays absent unless given; any other mapping is always there */
            if (!kid->set && !(kf->flags & RF_ONEOF)) {
                rc = make_present(kid, kf->fields) ? err_set(c->e, MR_ENOMEM, "out of memory") : 0;
                kid->src = -1;
            }
            if (!rc && kid->set) rc = resolve_object(c, kf, kid);
        } else {
            if (!kid->set && kf->def) {
                rc = apply_default(c, kf, kid);
            } else if (!kid->set && (kf->flags & RF_REQUIRED)) {
                recipe_field_describe(kf, 0, want, sizeof want);
                if (kid->given) rc = nerr(c->r, c->e, MR_EINVAL, kid, c->path, "expected %s, got null", want);
                else rc = nerr(c->r, c->e, MR_EINVAL, obj, c->path, "required key is missing (expected %s)", want);
            }
            for (size_t j = 0; !rc && kf->type == RT_OBJLIST && kid->set && j < kid->n; j++) {
                size_t at2 = path_index(c, j);
                rc = resolve_object(c, kf, &kid->kids[j]);
                path_pop(c, at2);
            }
        }
        path_pop(c, at);
        if (rc) return rc;
    }
    return check_oneof(c->r, c->e, c->path, f, obj);
}

/* A node by path during resolution (the path is known to be in the schema). */
static const rnode *node_at(const recipe *r, const char *path) {
    place pl;
    if (lookup(r, path, &pl)) return NULL;
    return pl.node;
}

static int64_t int_at(const recipe *r, const char *path) {
    const rnode *n = node_at(r, path);
    return n && n->set ? n->v.i : 0;
}

static int set_at(const recipe *r, const char *path) {
    const rnode *n = node_at(r, path);
    return n && n->set;
}

/* The node the user wrote, of two, for pointing at a conflict. */
static const rnode *pick(const rnode *a, const rnode *b) { return (a && a->src >= 0) || !b || b->src < 0 ? a : b; }

/* Rules between fields that a recipe alone decides (before any data or model is read). */
static int cross_checks(const recipe *r, mr_err *e) {
    /* where the tokenizer comes from */
    if (!set_at(r, "model.checkpoint") && !set_at(r, "tokenizer.path") && !set_at(r, "tokenizer.train") &&
        !set_at(r, "grpo.init_from"))
        return nerr(r, e, MR_EINVAL, node_at(r, "tokenizer"), "tokenizer",
                    "expected path or train (a model built from a %s has no tokenizer), got neither",
                    set_at(r, "model.config") ? "config" : "preset");
    if (set_at(r, "model.checkpoint")) {
        place ov;
        lookup(r, "model.overrides", &ov);
        for (size_t i = 0; ov.node && ov.node->set && i < ov.node->n; i++) {
            if (!ov.node->kids[i].set) continue;
            char path[128];
            snprintf(path, sizeof path, "model.overrides.%s", ov.f->fields[i].key);
            return nerr(r, e, MR_EINVAL, &ov.node->kids[i], path,
                        "not allowed with model.checkpoint (a checkpoint's sizes are fixed)");
        }
    }

    /* bf16 GEMMs exist on the GPU backend only */
    const char *prec = recipe_str(r, "run.precision"), *dev = recipe_str(r, "run.device");
    if (prec && dev && !strcmp(prec, "bf16") && strcmp(dev, "cuda"))
        return nerr(r, e, MR_EINVAL, pick(node_at(r, "run.precision"), node_at(r, "run.device")), "run.precision",
                    "bf16 needs run.device cuda (device %s computes in fp32), got bf16", dev);

    /* SFT batch: whole sequences per micro-batch */
    int64_t bs = int_at(r, "sft.batch_seqs"), ga = int_at(r, "sft.grad_accum");
    if (bs % ga)
        return nerr(r, e, MR_EINVAL, pick(node_at(r, "sft.grad_accum"), node_at(r, "sft.batch_seqs")),
                    "sft.grad_accum", "expected a divisor of sft.batch_seqs (%" PRId64 "), got %" PRId64, bs, ga);
    int64_t mbt = int_at(r, "sft.micro_batch_tokens"), msl = int_at(r, "data.max_seq_len");
    if (mbt < msl)
        return nerr(r, e, MR_EINVAL, pick(node_at(r, "sft.micro_batch_tokens"), node_at(r, "data.max_seq_len")),
                    "sft.micro_batch_tokens", "expected an integer >= data.max_seq_len (%" PRId64 "), got %" PRId64,
                    msl, mbt);

    /* GRPO step: P*G samples split evenly into mini-batches */
    int64_t P = int_at(r, "grpo.prompts_per_step"), G = int_at(r, "grpo.num_generations");
    int64_t M = int_at(r, "grpo.mini_batches_per_step"), PG;
    if (__builtin_mul_overflow(P, G, &PG))
        return nerr(r, e, MR_ERANGE, pick(node_at(r, "grpo.prompts_per_step"), node_at(r, "grpo.num_generations")),
                    "grpo.prompts_per_step", "prompts_per_step * num_generations overflows");
    if (PG % M)
        return nerr(r, e, MR_EINVAL,
                    pick(node_at(r, "grpo.mini_batches_per_step"), node_at(r, "grpo.prompts_per_step")),
                    "grpo.mini_batches_per_step",
                    "expected a divisor of prompts_per_step * num_generations (%" PRId64 "), got %" PRId64, PG, M);
    int64_t gmbt = int_at(r, "grpo.micro_batch_tokens"), mnt = int_at(r, "rollout.max_new_tokens");
    if (gmbt < mnt)
        return nerr(r, e, MR_EINVAL, pick(node_at(r, "grpo.micro_batch_tokens"), node_at(r, "rollout.max_new_tokens")),
                    "grpo.micro_batch_tokens",
                    "expected an integer >= rollout.max_new_tokens (%" PRId64 "), got %" PRId64, mnt, gmbt);
    double dc = recipe_float(r, "grpo.dual_clip");
    if (dc != 0.0 && dc <= 1.0)
        return nerr(r, e, MR_ERANGE, node_at(r, "grpo.dual_clip"), "grpo.dual_clip",
                    "expected 0 (off) or a number > 1, got %.15g", dc);
    const char *ol = recipe_str(r, "grpo.overlong.mode");
    int64_t buf = int_at(r, "grpo.overlong.buffer");
    if (ol && !strcmp(ol, "soft_penalty") && buf >= mnt)
        return nerr(r, e, MR_EINVAL, pick(node_at(r, "grpo.overlong.buffer"), node_at(r, "rollout.max_new_tokens")),
                    "grpo.overlong.buffer",
                    "expected an integer < rollout.max_new_tokens (%" PRId64 ") with mode soft_penalty, got %" PRId64,
                    mnt, buf);

    /* rewards: a regex format needs its pattern; metric names are unique */
    size_t nr = recipe_list_len(r, "rewards");
    for (size_t i = 0; i < nr; i++) {
        char p[96], q[96];
        snprintf(p, sizeof p, "rewards[%zu]", i);
        const char *kind = recipe_oneof(r, p);
        if (kind && !strcmp(kind, "format")) {
            snprintf(q, sizeof q, "rewards[%zu].format.style", i);
            const char *style = recipe_str(r, q);
            snprintf(q, sizeof q, "rewards[%zu].format.pattern", i);
            if (!strcmp(style, "regex") && !set_at(r, q)) {
                snprintf(q, sizeof q, "rewards[%zu].format", i);
                snprintf(p, sizeof p, "rewards[%zu].format.pattern", i);
                return nerr(r, e, MR_EINVAL, node_at(r, q), p,
                            "required key is missing with style regex (expected a string)");
            }
        }
        snprintf(q, sizeof q, "rewards[%zu].name", i);
        const char *name = recipe_str(r, q) ? recipe_str(r, q) : kind;
        for (size_t j = 0; name && j < i; j++) {
            char pj[96], qj[96];
            snprintf(pj, sizeof pj, "rewards[%zu]", j);
            snprintf(qj, sizeof qj, "rewards[%zu].name", j);
            const char *other = recipe_str(r, qj) ? recipe_str(r, qj) : recipe_oneof(r, pj);
            if (other && !strcmp(other, name))
                return nerr(r, e, MR_EINVAL, pick(node_at(r, q), node_at(r, p)), p,
                            "plugin name '%s' is already used by rewards[%zu] (metrics are reward/<name>); "
                            "set a distinct name",
                            name, j);
        }
    }
    return 0;
}

int recipe_resolve(recipe *r, mr_err *e) {
    cctx c = {.r = r, .src = -1, .e = e};
    int rc = resolve_object(&c, &root_field, &r->root);
    return rc ? rc : cross_checks(r, e);
}

/* ---- --set ----------------------------------------------------------------------------------------- */

/* Converts an override's value text for a place and stores it there. */
static int set_value(cctx *c, const recipe_field *f, int item, rnode *cur, const char *value) {
    recipe_type t = place_type(f, item);
    ynode y;
    const char *problem = NULL;
    char want[640], gb[96];
    mr_err quiet;
    int rc = y_parse(&quiet, "--set", 1, value, strlen(value), &y, &problem);
    if (rc == MR_ENOMEM) return err_set(c->e, MR_ENOMEM, "out of memory");
    if (t == RT_STRING && (rc || (y.kind != YN_SCALAR && !y_is_null(&y)))) {
        /* a string field takes text that is not a YAML scalar verbatim ("Q: {prompt}") */
        ynode_free(&y);
        memset(&y, 0, sizeof y);
        y.kind = YN_SCALAR;
        y.len = strlen(value);
        y.s = mem_strdup(value);
        if (!y.s) return err_set(c->e, MR_ENOMEM, "out of memory");
        rc = 0;
    }
    if (rc) {
        ynode tmp = {.kind = YN_SCALAR, .s = (char *)value, .len = strlen(value)};
        recipe_field_describe(f, item, want, sizeof want);
        return cerr(c, MR_EINVAL, 0, 0, "expected %s, got %s (not valid YAML: %s)", want, got(&tmp, gb, sizeof gb),
                    problem ? problem : quiet.msg);
    }
    rnode v = {0};
    if (item && f->type == RT_LIST) rc = conv_scalar(c, f, 1, &y, &v);
    else if (item && y_is_null(&y)) rc = make_present(&v, f->fields) ? err_set(c->e, MR_ENOMEM, "out of memory") : 0;
    else if (item && y.kind == YN_MAP) rc = conv_object(c, f, &y, &v);
    else if (item) rc = cerr(c, MR_EINVAL, 0, 0, "expected a mapping, got %s", got(&y, gb, sizeof gb));
    else rc = conv_value(c, f, &y, &v);
    ynode_free(&y);
    if (rc) {
        rnode_clear(&v);
        return rc;
    }
    rnode_clear(cur);
    *cur = v;
    cur->given = 1;
    cur->src = c->src;
    cur->line = cur->col = 0;
    return 0;
}

static int set_apply(cctx *c, rnode *root, const pseg *segs, size_t ns, const char *value) {
    const recipe_field *f = &root_field;
    int item = 0, rc;
    rnode *cur = root, *parent = NULL;
    size_t cur_index = 0;
    char key[128];
    for (size_t i = 0; i < ns; i++) {
        const pseg *s = &segs[i];
        if (s->key) {
            if (place_type(f, item) != RT_OBJECT)
                return cerr(c, MR_EINVAL, 0, 0, "not a mapping, so it has no key '%.*s'", (int)s->klen, s->key);
            if (!cur->set) {
                if (make_present(cur, f->fields)) return err_set(c->e, MR_ENOMEM, "out of memory");
                cur->given = 1;
                cur->src = c->src;
            }
            snprintf(key, sizeof key, "%.*s", (int)s->klen, s->key);
            path_key(c, s->key, s->klen);
            int k = field_index(f->fields, s->key, s->klen);
            if (k < 0) return unknown_key(c, f->fields, key, 0, 0);
            parent = cur;
            cur = &cur->kids[k];
            f = &f->fields[k];
            item = 0;
        } else {
            if (item || (f->type != RT_LIST && f->type != RT_OBJLIST))
                return cerr(c, MR_EINVAL, 0, 0, "not a list, so it has no item [%zu]", s->idx);
            if (!cur->set && f->def && (rc = apply_default(c, f, cur))) return rc;
            if (!cur->set) {
                rnode_clear(cur);
                cur->kind = (unsigned char)f->type;
                cur->set = 1;
            }
            int last = i + 1 == ns;
            if (s->idx > cur->n || (s->idx == cur->n && last && !*value))
                return cerr(c, MR_EINVAL, 0, 0, "no item [%zu]: the list has %zu (index %zu appends one)", s->idx,
                            cur->n, cur->n);
            if (s->idx == cur->n) {
                size_t bytes;
                if (size_mul(cur->n + 1, sizeof(rnode), &bytes)) return err_set(c->e, MR_ENOMEM, "out of memory");
                rnode *k = mem_realloc(cur->kids, bytes);
                if (!k) return err_set(c->e, MR_ENOMEM, "out of memory");
                cur->kids = k;
                memset(&cur->kids[cur->n], 0, sizeof(rnode));
                cur->n++;
                if (f->type == RT_OBJLIST) {
                    rnode *it = &cur->kids[s->idx];
                    if (make_present(it, f->fields)) return err_set(c->e, MR_ENOMEM, "out of memory");
                    it->given = 1;
                    it->src = c->src;
                }
            }
            path_index(c, s->idx);
            parent = cur;
            cur_index = s->idx;
            cur = &cur->kids[s->idx];
            item = 1;
        }
    }
    if (!*value) { /* key= removes the field, or the list item */
        if (item) {
            rnode_clear(cur);
            memmove(&parent->kids[cur_index], &parent->kids[cur_index + 1],
                    (parent->n - cur_index - 1) * sizeof(rnode));
            parent->n--;
        } else {
            rnode_clear(cur);
        }
        return 0;
    }
    return set_value(c, f, item, cur, value);
}

int recipe_set(recipe *r, const char *assignment, mr_err *e) {
    size_t alen = strlen(assignment), bytes;
    if (size_add(alen, 7, &bytes)) return err_set(e, MR_ENOMEM, "out of memory");
    char *name = mem_alloc(bytes);
    if (!name) return err_set(e, MR_ENOMEM, "out of memory");
    snprintf(name, bytes, "--set %s", assignment);
    for (char *q = name; *q; q++) /* the name goes into one-line messages */
        if ((unsigned char)*q < 0x20 || *q == 0x7f) *q = '?';
    const char *eq = strchr(assignment, '=');
    pseg segs[MAX_SEGS];
    size_t ns = 0;
    if (!eq || path_parse(assignment, (size_t)(eq - assignment), segs, &ns)) {
        int rc = err_set(e, MR_EINVAL, "%s: expected section.key=value (as grpo.mu=2 or rewards[0].weight=0.5)",
                         name);
        mem_free(name);
        return rc;
    }
    if (add_source(r, name)) {
        mem_free(name);
        return err_set(e, MR_ENOMEM, "out of memory");
    }
    rnode work;
    cctx c = {.r = r, .src = (int)r->nsources - 1, .nolines = 1, .e = e};
    int rc = rnode_clone(&work, &r->root);
    if (rc) rc = err_set(e, MR_ENOMEM, "out of memory");
    else rc = set_apply(&c, &work, segs, ns, eq + 1);
    if (rc) {
        rnode_clear(&work);
        mem_free(r->sources[--r->nsources]);
        return rc;
    }
    rnode_clear(&r->root);
    r->root = work;
    return 0;
}

/* ---- dump ------------------------------------------------------------------------------------------ */

/* Shortest text that reads back to the same double, always with a '.' or an exponent. */
static void fmt_double(char *buf, size_t cap, double x) {
    for (int prec = 15; prec <= 17; prec++) {
        snprintf(buf, cap, "%.*g", prec, x);
        if (strtod(buf, NULL) == x) break;
    }
    if (!strpbrk(buf, ".eE")) strncat(buf, ".0", cap - strlen(buf) - 1);
}

/* Decodes one UTF-8 sequence; returns its length (1 with *cp = the byte for an invalid one). */
static size_t utf8_next(const unsigned char *s, uint32_t *cp) {
    if (s[0] < 0x80) {
        *cp = s[0];
        return 1;
    }
    size_t n = s[0] >= 0xF0 ? 4 : s[0] >= 0xE0 ? 3 : s[0] >= 0xC0 ? 2 : 0;
    if (!n) {
        *cp = s[0];
        return 1;
    }
    uint32_t v = s[0] & (0x7F >> n);
    for (size_t i = 1; i < n; i++) {
        if ((s[i] & 0xC0) != 0x80) {
            *cp = s[0];
            return 1;
        }
        v = (v << 6) | (s[i] & 0x3F);
    }
    *cp = v;
    return n;
}

/* A double-quoted YAML string; characters libyaml would refuse in a stream are escaped. */
static void dump_string(strbuf *b, const char *s) {
    strbuf_putn(b, "\"", 1);
    const unsigned char *p = (const unsigned char *)s;
    while (*p) {
        uint32_t cp;
        size_t n = utf8_next(p, &cp);
        if (cp == '"' || cp == '\\') strbuf_printf(b, "\\%c", (char)cp);
        else if (cp == '\n') strbuf_puts(b, "\\n");
        else if (cp == '\t') strbuf_puts(b, "\\t");
        else if (cp == '\r') strbuf_puts(b, "\\r");
        else if (cp < 0x20 || (cp >= 0x7F && cp < 0xA0)) strbuf_printf(b, "\\x%02x", (unsigned)cp);
        else if ((cp >= 0xD800 && cp < 0xE000) || cp == 0xFEFF || cp == 0xFFFE || cp == 0xFFFF)
            strbuf_printf(b, "\\u%04x", (unsigned)cp);
        else strbuf_putn(b, (const char *)p, n);
        p += n;
    }
    strbuf_putn(b, "\"", 1);
}

static void dump_scalar(strbuf *b, const recipe_field *f, recipe_type t, const rnode *n) {
    char num[64];
    if (!n->set) {
        strbuf_puts(b, "null");
        return;
    }
    switch (t) {
    case RT_INT: strbuf_printf(b, "%" PRId64, n->v.i); break;
    case RT_FLOAT:
        fmt_double(num, sizeof num, n->v.d);
        strbuf_puts(b, num);
        break;
    case RT_BOOL: strbuf_puts(b, n->v.i ? "true" : "false"); break;
    case RT_STRING: dump_string(b, n->v.s); break;
    case RT_ENUM: {
        /* words YAML 1.1 tools read as booleans (tis.mode: off) are quoted for them; moerl reads both */
        static const char *const yaml11[] = {"y", "n", "yes", "no", "on", "off", "true", "false", "null", NULL};
        const char *v = f->values[n->v.i];
        int quote = 0;
        for (size_t i = 0; yaml11[i]; i++) quote |= !strcasecmp(v, yaml11[i]);
        if (quote) dump_string(b, v);
        else strbuf_puts(b, v);
        break;
    }
    default: break;
    }
}

static void dump_fields(strbuf *b, const recipe_field *fs, const rnode *obj, int indent) {
    for (size_t i = 0; fs[i].key; i++) {
        const recipe_field *f = &fs[i];
        const rnode *kid = &obj->kids[i];
        if (f->type == RT_OBJECT && !kid->set) continue; /* an absent one-of member */
        sb_indent(b, indent);
        strbuf_puts(b, f->key);
        strbuf_putn(b, ":", 1);
        switch (f->type) {
        case RT_OBJECT:
            strbuf_putn(b, "\n", 1);
            dump_fields(b, f->fields, kid, indent + 2);
            break;
        case RT_OBJLIST:
            if (!kid->set) {
                strbuf_puts(b, " null\n");
            } else if (!kid->n) {
                strbuf_puts(b, " []\n");
            } else {
                strbuf_putn(b, "\n", 1);
                for (size_t j = 0; j < kid->n; j++) {
                    size_t start = b->n;
                    dump_fields(b, f->fields, &kid->kids[j], indent + 4);
                    /* "    key: v" -> "  - key: v": the first line of the item carries the dash */
                    if (!b->oom && b->n > start + (size_t)indent + 3) b->p[start + (size_t)indent + 2] = '-';
                }
            }
            break;
        case RT_LIST:
            if (!kid->set) {
                strbuf_puts(b, " null\n");
                break;
            }
            strbuf_puts(b, " [");
            for (size_t j = 0; j < kid->n; j++) {
                if (j) strbuf_puts(b, ", ");
                dump_scalar(b, f, f->item, &kid->kids[j]);
            }
            strbuf_puts(b, "]\n");
            break;
        default:
            strbuf_putn(b, " ", 1);
            dump_scalar(b, f, f->type, kid);
            strbuf_putn(b, "\n", 1);
            break;
        }
    }
}

int recipe_dump_yaml(const recipe *r, char **out) {
    strbuf b = {0};
    *out = NULL;
    dump_fields(&b, recipe_schema, &r->root, 0);
    if (!b.p && !b.oom) strbuf_puts(&b, "{}\n");
    if (b.oom) {
        mem_free(b.p);
        return MR_ENOMEM;
    }
    *out = b.p;
    return 0;
}
