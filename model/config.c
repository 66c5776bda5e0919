/* config.c: read, check and write the HF config.json of a DeepSeek-V3-family model (MODEL-SPEC §1), and the
 * numbers derived from it (§1.2, §5.4-5.5, §12).
 *
 * The one idea: the plain scalar fields are described once, in `fields[]` (key, kind, where in the struct, when
 * required), and the parser, the writer and config_diff all walk that table; only the fields with structure
 * (enums, token-id lists, rope_scaling, quantization_config) are handled by hand. JSON is parsed with cJSON, whose
 * allocations are routed through mem_alloc so allocation-failure injection reaches them. */
#include "model/config.h"

#include <assert.h>
#include <cjson/cJSON.h>
#include <errno.h>
#include <limits.h>
#include <math.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "core/mem.h"
#include "core/strbuf.h"

/* Upper bounds that keep every derived size far from overflow; generous next to V3. */
#define MAX_VOCAB (1 << 24)
#define MAX_DIM (1 << 20)
#define MAX_HEAD_DIM 4096
#define MAX_LAYERS 1024
#define MAX_HEADS 1024
#define MAX_EXPERTS 65536
#define MAX_SHARED 64
#define MAX_MTP 16
#define MAX_POSITIONS (1 << 28)
#define MAX_FILE_BYTES (64L << 20)

/* ---------------------------------------------------------------------------------------------------------- */
/* Names and defaults */

const char *config_model_type_name(config_model_type t) {
    return t == CONFIG_DEEPSEEK_V2 ? "deepseek_v2" : "deepseek_v3";
}

const char *config_topk_method_name(config_topk_method m) {
    switch (m) {
    case CONFIG_TOPK_GREEDY: return "greedy";
    case CONFIG_TOPK_GROUP_LIMITED_GREEDY: return "group_limited_greedy";
    default: return "noaux_tc";
    }
}

const char *config_scoring_func_name(config_scoring_func s) {
    return s == CONFIG_SCORING_SOFTMAX ? "softmax" : "sigmoid";
}

const char *config_dtype_name(config_dtype d) {
    switch (d) {
    case CONFIG_DTYPE_BF16: return "bfloat16";
    case CONFIG_DTYPE_F16: return "float16";
    case CONFIG_DTYPE_F32: return "float32";
    default: return "";
    }
}

void config_defaults(model_config *c, config_model_type t) {
    bool v3 = t != CONFIG_DEEPSEEK_V2;
    memset(c, 0, sizeof *c);
    c->model_type = t;
    c->n_group = 1; /* reference n_expert_groups / n_limited_groups; V2 remote code: None = no grouping */
    c->topk_group = 1;
    c->topk_method = v3 ? CONFIG_TOPK_NOAUX_TC : CONFIG_TOPK_GREEDY;
    c->scoring_func = v3 ? CONFIG_SCORING_SIGMOID : CONFIG_SCORING_SOFTMAX;
    c->norm_topk_prob = v3;
    c->routed_scaling_factor = v3 ? 2.5 : 1.0;
    c->moe_layer_freq = 1;
    c->rope_theta = 10000.0;
    c->rope_scaling.type = CONFIG_ROPE_NONE;
    c->rope_scaling.original_max_position_embeddings = 4096;
    c->rope_scaling.beta_fast = 32.0;
    c->rope_scaling.beta_slow = 1.0;
    c->max_position_embeddings = v3 ? 4096 : 2048;
    c->rms_norm_eps = 1e-6;
    c->hidden_act = CONFIG_ACT_SILU;
    c->bos_token_id = v3 ? 0 : 100000;
    c->eos_token_id[0] = v3 ? 1 : 100001;
    c->n_eos_token_id = 1;
    c->pad_token_id = -1;
    c->initializer_range = 0.02;
    c->aux_loss_alpha = 0.001;
    c->seq_aux = true;
    c->ep_size = 1;
    c->rope_interleave = true;
}

/* ---------------------------------------------------------------------------------------------------------- */
/* The scalar-field table */

enum { FK_INT, FK_DOUBLE, FK_BOOL };
enum {
    FF_REQ = 1,        /* must be present */
    FF_REQ_MOE = 2,    /* must be present when n_routed_experts > 0 */
    FF_NULLABLE = 4,   /* null is a legal value and means 0 ("none") */
    FF_NULL_WRITE = 8, /* 0 is written as null */
    FF_OMIT_ZERO = 16  /* moerl's own options: written only when set (HF configs never carry them) */
};

typedef struct field {
    const char *key;
    int kind;
    int flags;
    size_t off;
} field;

#define FINT(name, flags) {#name, FK_INT, flags, offsetof(model_config, name)}
#define FDBL(name) {#name, FK_DOUBLE, 0, offsetof(model_config, name)}
#define FBOOL(name) {#name, FK_BOOL, 0, offsetof(model_config, name)}

/* n_routed_experts comes first: whether the model has experts decides which later fields are required. */
static const field fields[] = {
    FINT(n_routed_experts, FF_REQ | FF_NULLABLE | FF_NULL_WRITE),
    FINT(vocab_size, FF_REQ),
    FINT(hidden_size, FF_REQ),
    FINT(intermediate_size, FF_REQ),
    FINT(moe_intermediate_size, FF_REQ_MOE),
    FINT(num_hidden_layers, FF_REQ),
    FINT(num_attention_heads, FF_REQ),
    FINT(num_key_value_heads, 0),
    FINT(n_shared_experts, FF_REQ_MOE | FF_NULLABLE),
    FINT(num_experts_per_tok, FF_REQ_MOE | FF_NULL_WRITE),
    FINT(n_group, 0),
    FINT(topk_group, 0),
    FBOOL(norm_topk_prob),
    FDBL(routed_scaling_factor),
    FINT(first_k_dense_replace, FF_REQ_MOE),
    FINT(moe_layer_freq, 0),
    FINT(q_lora_rank, FF_REQ | FF_NULLABLE | FF_NULL_WRITE),
    FINT(kv_lora_rank, FF_REQ),
    FINT(qk_nope_head_dim, FF_REQ),
    FINT(qk_rope_head_dim, FF_REQ),
    FINT(v_head_dim, FF_REQ),
    FDBL(rope_theta),
    FINT(max_position_embeddings, 0),
    FDBL(rms_norm_eps),
    FBOOL(tie_word_embeddings),
    FINT(num_nextn_predict_layers, 0),
    FDBL(initializer_range),
    FDBL(aux_loss_alpha),
    FBOOL(seq_aux),
    FINT(ep_size, 0),
    FBOOL(attention_bias),
    FDBL(attention_dropout),
    FBOOL(rope_interleave),
    FINT(moerl_swa_window, FF_OMIT_ZERO),
    FINT(moerl_swa_ratio, FF_OMIT_ZERO),
};
#define N_FIELDS (sizeof fields / sizeof fields[0])

static int *field_int(model_config *c, const field *f) { return (int *)((char *)c + f->off); }
static double *field_dbl(model_config *c, const field *f) { return (double *)((char *)c + f->off); }
static bool *field_bool(model_config *c, const field *f) { return (bool *)((char *)c + f->off); }
static const int *cfield_int(const model_config *c, const field *f) { return (const int *)((const char *)c + f->off); }
static const double *cfield_dbl(const model_config *c, const field *f) {
    return (const double *)((const char *)c + f->off);
}
static const bool *cfield_bool(const model_config *c, const field *f) {
    return (const bool *)((const char *)c + f->off);
}

/* ---------------------------------------------------------------------------------------------------------- */
/* Errors and JSON helpers */

static int fail(mr_err *e, int code, const char *src, const char *fmt, ...) __attribute__((format(printf, 4, 5)));
static int fail(mr_err *e, int code, const char *src, const char *fmt, ...) {
    char msg[1536];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    return err_set(e, code, "%s: %s", src, msg);
}

/* Shortest text that reads back as the same double; integral values keep a ".0" as Python writes floats. */
static void fmt_double(char *buf, size_t n, double v) {
    if (v == floor(v) && fabs(v) < 1e16) {
        snprintf(buf, n, "%.1f", v);
        return;
    }
    for (int prec = 1; prec <= 17; prec++) {
        snprintf(buf, n, "%.*g", prec, v);
        if (strtod(buf, NULL) == v) return;
    }
}

/* What a JSON value is, for "expected X, got Y". */
static void json_describe(const cJSON *v, char *buf, size_t n) {
    if (cJSON_IsNull(v)) snprintf(buf, n, "null");
    else if (cJSON_IsTrue(v)) snprintf(buf, n, "true");
    else if (cJSON_IsFalse(v)) snprintf(buf, n, "false");
    else if (cJSON_IsNumber(v)) {
        double d = v->valuedouble;
        if (d == floor(d) && fabs(d) < 1e16) snprintf(buf, n, "%.0f", d); /* as written: 1, not 1.0 */
        else fmt_double(buf, n, d);
    } else if (cJSON_IsArray(v)) snprintf(buf, n, "an array");
    else if (cJSON_IsObject(v)) snprintf(buf, n, "an object");
    else if (cJSON_IsString(v)) {
        const char *s = v->valuestring;
        size_t len = strlen(s), k = 0, max = 40;
        if (n < max + 8) max = n > 8 ? n - 8 : 0;
        buf[k++] = '"';
        for (size_t i = 0; i < len && i < max; i++)
            buf[k++] = (unsigned char)s[i] < 0x20 ? '?' : s[i];
        if (len > max) buf[k++] = '.', buf[k++] = '.', buf[k++] = '.';
        buf[k++] = '"';
        buf[k] = '\0';
    } else snprintf(buf, n, "an invalid value");
}

static int type_error(mr_err *e, const char *src, const char *key, const char *expected, const cJSON *v) {
    char got[64];
    json_describe(v, got, sizeof got);
    return fail(e, MR_EFORMAT, src, "%s: expected %s, got %s", key, expected, got);
}

static int json_int(const cJSON *v, const char *key, const char *src, int *out, mr_err *e) {
    if (!cJSON_IsNumber(v) || !isfinite(v->valuedouble) || v->valuedouble != floor(v->valuedouble))
        return type_error(e, src, key, "an integer", v);
    if (v->valuedouble < INT_MIN || v->valuedouble > INT_MAX)
        return type_error(e, src, key, "an integer in -2147483648..2147483647", v);
    *out = (int)v->valuedouble;
    return 0;
}

static int json_double(const cJSON *v, const char *key, const char *src, double *out, mr_err *e) {
    if (!cJSON_IsNumber(v) || !isfinite(v->valuedouble)) return type_error(e, src, key, "a number", v);
    *out = v->valuedouble;
    return 0;
}

static int json_bool(const cJSON *v, const char *key, const char *src, bool *out, mr_err *e) {
    if (!cJSON_IsBool(v)) return type_error(e, src, key, "true or false", v);
    *out = cJSON_IsTrue(v);
    return 0;
}

/* A string that fits buf (size n), NUL included. */
static int json_str(const cJSON *v, const char *key, const char *src, char *buf, size_t n, mr_err *e) {
    if (!cJSON_IsString(v)) return type_error(e, src, key, "a string", v);
    size_t len = strlen(v->valuestring);
    if (len >= n) {
        char got[64];
        json_describe(v, got, sizeof got);
        return fail(e, MR_ERANGE, src, "%s: expected a string of at most %zu characters, got %s", key, n - 1, got);
    }
    memcpy(buf, v->valuestring, len + 1);
    return 0;
}

/* A token id: a non-negative integer (null is handled by the caller). */
static int json_token_id(const cJSON *v, const char *key, const char *src, int *out, mr_err *e) {
    if (!cJSON_IsNumber(v) || !isfinite(v->valuedouble) || v->valuedouble != floor(v->valuedouble) ||
        v->valuedouble < 0 || v->valuedouble > INT_MAX)
        return type_error(e, src, key, "a non-negative integer or null", v);
    *out = (int)v->valuedouble;
    return 0;
}

static const cJSON *get(const cJSON *obj, const char *key) { return cJSON_GetObjectItemCaseSensitive(obj, key); }
static bool absent(const cJSON *v) { return v == NULL || cJSON_IsNull(v); }

/* Python's json keeps the last of two equal keys and cJSON the first: refuse to guess. */
static int check_duplicates(const cJSON *obj, const char *prefix, const char *src, mr_err *e) {
    for (const cJSON *a = obj->child; a; a = a->next)
        for (const cJSON *b = a->next; b; b = b->next)
            if (a->string && b->string && strcmp(a->string, b->string) == 0)
                return fail(e, MR_EFORMAT, src, "%s%s: key appears twice", prefix, a->string);
    return 0;
}

/* cJSON allocates through these, so mem_fail_after reaches it; json_oom tells a failed allocation from a syntax
 * error (cJSON reports both as a NULL parse). The hooks are compatible with the defaults (mem_* wrap malloc/free),
 * so memory allocated before or after installing them may be freed by either. */
static _Thread_local int json_oom;
static void *json_malloc(size_t n) {
    void *p = mem_alloc(n);
    if (!p) json_oom = 1;
    return p;
}
static void json_free(void *p) { mem_free(p); }
static void json_hooks_install(void) {
    cJSON_Hooks h = {json_malloc, json_free};
    cJSON_InitHooks(&h);
}

/* A strict RFC 8259 syntax check run before cJSON: cJSON accepts a little more (raw control characters in strings)
 * and says only where it stopped, one character late for a bad object key (a trailing comma, the commonest
 * hand-editing slip). This finds the first offending byte and what was expected there, for "file:line:col: ...". */
#define CJSON_STR2(x) #x
#define CJSON_STR(x) CJSON_STR2(x)
#define CJSON_NESTING_STR CJSON_STR(CJSON_NESTING_LIMIT)

typedef struct jscan {
    const char *s;
    size_t n, i;
    const char *expected; /* set at the failure point */
} jscan;

static void js_ws(jscan *j) {
    while (j->i < j->n && (j->s[j->i] == ' ' || j->s[j->i] == '\t' || j->s[j->i] == '\n' || j->s[j->i] == '\r'))
        j->i++;
}
static bool js_fail(jscan *j, const char *expected) {
    j->expected = expected;
    return false;
}
static bool js_digits(jscan *j) {
    size_t start = j->i;
    while (j->i < j->n && j->s[j->i] >= '0' && j->s[j->i] <= '9') j->i++;
    return j->i > start;
}
static bool js_number(jscan *j) {
    if (j->s[j->i] == '-') j->i++;
    if (j->i < j->n && j->s[j->i] == '0') j->i++;
    else if (!js_digits(j)) return js_fail(j, "a digit");
    if (j->i < j->n && j->s[j->i] == '.') {
        j->i++;
        if (!js_digits(j)) return js_fail(j, "a digit");
    }
    if (j->i < j->n && (j->s[j->i] == 'e' || j->s[j->i] == 'E')) {
        j->i++;
        if (j->i < j->n && (j->s[j->i] == '+' || j->s[j->i] == '-')) j->i++;
        if (!js_digits(j)) return js_fail(j, "a digit");
    }
    return true;
}
static bool js_string(jscan *j, const char *what) {
    if (j->i >= j->n || j->s[j->i] != '"') return js_fail(j, what);
    for (j->i++; j->i < j->n; j->i++) {
        unsigned char ch = (unsigned char)j->s[j->i];
        if (ch == '"') {
            j->i++;
            return true;
        }
        if (ch < 0x20) return js_fail(j, "a closing '\"' (control characters must be escaped)");
        if (ch == '\\') {
            if (++j->i >= j->n) break;
            char esc = j->s[j->i];
            if (esc == 'u') {
                for (int k = 0; k < 4; k++) {
                    if (++j->i >= j->n) return js_fail(j, "4 hex digits after \\u");
                    char h = j->s[j->i];
                    if (!((h >= '0' && h <= '9') || (h >= 'a' && h <= 'f') || (h >= 'A' && h <= 'F')))
                        return js_fail(j, "4 hex digits after \\u");
                }
            } else if (!strchr("\"\\/bfnrt", esc) || esc == '\0') return js_fail(j, "a valid escape");
        }
    }
    return js_fail(j, "a closing '\"'");
}
static bool js_value(jscan *j, int depth) {
    js_ws(j);
    if (j->i >= j->n) return js_fail(j, "a value");
    char ch = j->s[j->i];
    if (ch == '{' || ch == '[') {
        char close = ch == '{' ? '}' : ']';
        if (depth >= CJSON_NESTING_LIMIT) return js_fail(j, "at most " CJSON_NESTING_STR " levels of nesting");
        j->i++;
        js_ws(j);
        if (j->i < j->n && j->s[j->i] == close) {
            j->i++;
            return true;
        }
        for (;;) {
            if (close == '}') {
                js_ws(j);
                if (!js_string(j, "a \"key\"")) return false;
                js_ws(j);
                if (j->i >= j->n || j->s[j->i] != ':') return js_fail(j, "':'");
                j->i++;
            }
            if (!js_value(j, depth + 1)) return false;
            js_ws(j);
            if (j->i < j->n && j->s[j->i] == ',') {
                j->i++;
                continue;
            }
            if (j->i < j->n && j->s[j->i] == close) {
                j->i++;
                return true;
            }
            return js_fail(j, close == '}' ? "',' or '}'" : "',' or ']'");
        }
    }
    if (ch == '"') return js_string(j, "a value");
    if (ch == '-' || (ch >= '0' && ch <= '9')) return js_number(j);
    static const char *lits[] = {"true", "false", "null"};
    for (int k = 0; k < 3; k++) {
        size_t n = strlen(lits[k]);
        if (j->n - j->i >= n && memcmp(j->s + j->i, lits[k], n) == 0) {
            j->i += n;
            return true;
        }
    }
    return js_fail(j, "a value");
}

static int json_syntax_error(const char *text, size_t len, const char *errp, const char *src, mr_err *e) {
    size_t last = len;
    while (last > 0 && (text[last - 1] == ' ' || text[last - 1] == '\t' || text[last - 1] == '\n' ||
                        text[last - 1] == '\r'))
        last--;
    if (last == 0) return fail(e, MR_EFORMAT, src, "malformed JSON: empty input");
    jscan j = {text, len, 0, NULL};
    if (js_value(&j, 0)) {
        js_ws(&j);
        if (j.i < len) j.expected = "the end of the input after the top-level value";
    }
    size_t pos;
    char what[160];
    if (j.expected && j.i >= len) {
        pos = last; /* report where the text stops, not after its trailing blank lines */
        snprintf(what, sizeof what, "unexpected end of input (truncated file?)");
    } else {
        /* The scanner found nothing (a cJSON-only limit): fall back to where cJSON stopped. */
        pos = j.expected ? j.i : (errp && errp >= text && errp < text + len) ? (size_t)(errp - text) : 0;
        unsigned char ch = (unsigned char)text[pos];
        char got[24];
        if (ch >= 0x20 && ch < 0x7f) snprintf(got, sizeof got, "character '%c'", ch);
        else snprintf(got, sizeof got, "byte 0x%02x", ch);
        if (j.expected) snprintf(what, sizeof what, "unexpected %s (expected %s)", got, j.expected);
        else snprintf(what, sizeof what, "unexpected %s", got);
    }
    size_t line = 1, col = 1;
    for (size_t i = 0; i < pos; i++) {
        if (text[i] == '\n') line++, col = 1;
        else col++;
    }
    return err_set(e, MR_EFORMAT, "%s:%zu:%zu: malformed JSON: %s", src, line, col, what);
}

/* ---------------------------------------------------------------------------------------------------------- */
/* Parsing */

static int parse_model_type(const cJSON *root, const char *src, config_model_type *t, mr_err *e) {
    const cJSON *v = get(root, "model_type");
    if (!v) return fail(e, MR_EFORMAT, src, "model_type: required field is missing");
    if (!cJSON_IsString(v)) return type_error(e, src, "model_type", "a string", v);
    if (strcmp(v->valuestring, "deepseek_v3") == 0) *t = CONFIG_DEEPSEEK_V3;
    else if (strcmp(v->valuestring, "deepseek_v2") == 0) *t = CONFIG_DEEPSEEK_V2;
    else {
        char got[64];
        json_describe(v, got, sizeof got);
        return fail(e, MR_EINVAL, src, "model_type: expected \"deepseek_v3\" or \"deepseek_v2\", got %s", got);
    }
    return 0;
}

static int parse_fields(model_config *c, const cJSON *root, const char *src, mr_err *e) {
    bool moe = false;
    for (size_t i = 0; i < N_FIELDS; i++) {
        const field *f = &fields[i];
        const cJSON *v = get(root, f->key);
        bool required = (f->flags & FF_REQ) || ((f->flags & FF_REQ_MOE) && moe);
        int rc = 0;
        if (!v) {
            if (required && moe && (f->flags & FF_REQ_MOE))
                return fail(e, MR_EFORMAT, src, "%s: required field is missing (the model has n_routed_experts = %d)",
                            f->key, c->n_routed_experts);
            if (required) return fail(e, MR_EFORMAT, src, "%s: required field is missing", f->key);
            continue;
        }
        if (cJSON_IsNull(v)) {
            if (f->flags & FF_NULLABLE) *field_int(c, f) = 0;
            else if (required) return type_error(e, src, f->key, f->kind == FK_INT ? "an integer" : "a value", v);
            continue; /* an optional field given as null keeps its default, as absent */
        }
        switch (f->kind) {
        case FK_INT: rc = json_int(v, f->key, src, field_int(c, f), e); break;
        case FK_DOUBLE: rc = json_double(v, f->key, src, field_dbl(c, f), e); break;
        default: rc = json_bool(v, f->key, src, field_bool(c, f), e); break;
        }
        if (rc) return rc;
        if (f->off == offsetof(model_config, n_routed_experts)) moe = c->n_routed_experts > 0;
    }
    if (!get(root, "num_key_value_heads") || cJSON_IsNull(get(root, "num_key_value_heads")))
        c->num_key_value_heads = c->num_attention_heads;
    return 0;
}

/* topk_method and scoring_func: each, when absent, follows the other (noaux_tc <-> sigmoid); when both are absent
 * they follow model_type. */
static int parse_routing(model_config *c, const cJSON *root, const char *src, mr_err *e) {
    const cJSON *m = get(root, "topk_method"), *s = get(root, "scoring_func");
    char got[64];
    if (!absent(s)) {
        if (!cJSON_IsString(s)) return type_error(e, src, "scoring_func", "a string", s);
        if (strcmp(s->valuestring, "sigmoid") == 0) c->scoring_func = CONFIG_SCORING_SIGMOID;
        else if (strcmp(s->valuestring, "softmax") == 0) c->scoring_func = CONFIG_SCORING_SOFTMAX;
        else {
            json_describe(s, got, sizeof got);
            return fail(e, MR_EINVAL, src, "scoring_func: expected \"sigmoid\" or \"softmax\", got %s", got);
        }
    }
    if (!absent(m)) {
        if (!cJSON_IsString(m)) return type_error(e, src, "topk_method", "a string", m);
        const char *t = m->valuestring;
        if (strcmp(t, "noaux_tc") == 0) c->topk_method = CONFIG_TOPK_NOAUX_TC;
        else if (strcmp(t, "greedy") == 0 || strcmp(t, "gready") == 0) c->topk_method = CONFIG_TOPK_GREEDY;
        else if (strcmp(t, "group_limited_greedy") == 0) c->topk_method = CONFIG_TOPK_GROUP_LIMITED_GREEDY;
        else {
            json_describe(m, got, sizeof got);
            return fail(e, MR_EINVAL, src,
                        "topk_method: expected \"noaux_tc\", \"greedy\" or \"group_limited_greedy\", got %s", got);
        }
    }
    if (absent(m) && !absent(s))
        c->topk_method = c->scoring_func == CONFIG_SCORING_SIGMOID ? CONFIG_TOPK_NOAUX_TC
                         : c->n_group > 1                          ? CONFIG_TOPK_GROUP_LIMITED_GREEDY
                                                                   : CONFIG_TOPK_GREEDY;
    if (absent(s) && !absent(m))
        c->scoring_func = c->topk_method == CONFIG_TOPK_NOAUX_TC ? CONFIG_SCORING_SIGMOID : CONFIG_SCORING_SOFTMAX;
    return 0;
}

static int parse_strings(model_config *c, const cJSON *root, const char *src, mr_err *e) {
    char got[64];
    const cJSON *v = get(root, "hidden_act");
    if (!absent(v)) {
        if (!cJSON_IsString(v)) return type_error(e, src, "hidden_act", "a string", v);
        if (strcmp(v->valuestring, "silu") != 0) {
            json_describe(v, got, sizeof got);
            return fail(e, MR_EINVAL, src, "hidden_act: expected \"silu\", got %s", got);
        }
        c->hidden_act = CONFIG_ACT_SILU;
    }
    /* transformers >= 4.56 writes "dtype"; older versions "torch_dtype". */
    const char *dkey = "torch_dtype";
    v = get(root, dkey);
    if (absent(v)) v = get(root, dkey = "dtype");
    if (!absent(v)) {
        if (!cJSON_IsString(v)) return type_error(e, src, dkey, "a string", v);
        const char *s = v->valuestring;
        if (strcmp(s, "bfloat16") == 0) c->torch_dtype = CONFIG_DTYPE_BF16;
        else if (strcmp(s, "float16") == 0) c->torch_dtype = CONFIG_DTYPE_F16;
        else if (strcmp(s, "float32") == 0) c->torch_dtype = CONFIG_DTYPE_F32;
        else {
            json_describe(v, got, sizeof got);
            return fail(e, MR_EINVAL, src, "%s: expected \"bfloat16\", \"float16\" or \"float32\", got %s", dkey, got);
        }
    }
    v = get(root, "transformers_version");
    if (!absent(v)) {
        int rc = json_str(v, "transformers_version", src, c->transformers_version, sizeof c->transformers_version, e);
        if (rc) return rc;
    }
    return 0;
}

static int parse_tokens(model_config *c, const cJSON *root, const char *src, mr_err *e) {
    int rc;
    const cJSON *v = get(root, "bos_token_id");
    if (v && cJSON_IsNull(v)) c->bos_token_id = -1;
    else if (v && (rc = json_token_id(v, "bos_token_id", src, &c->bos_token_id, e))) return rc;
    v = get(root, "pad_token_id");
    if (v && cJSON_IsNull(v)) c->pad_token_id = -1;
    else if (v && (rc = json_token_id(v, "pad_token_id", src, &c->pad_token_id, e))) return rc;
    v = get(root, "eos_token_id");
    if (!v) return 0;
    if (cJSON_IsNull(v)) {
        c->n_eos_token_id = 0;
        c->eos_token_id_is_list = false;
    } else if (cJSON_IsArray(v)) {
        int n = cJSON_GetArraySize(v);
        if (n > CONFIG_MAX_EOS)
            return fail(e, MR_ERANGE, src, "eos_token_id: expected at most %d ids, got %d", CONFIG_MAX_EOS, n);
        int k = 0;
        for (const cJSON *it = v->child; it; it = it->next, k++) {
            char key[32];
            snprintf(key, sizeof key, "eos_token_id[%d]", k);
            if ((rc = json_token_id(it, key, src, &c->eos_token_id[k], e))) return rc;
        }
        c->n_eos_token_id = n;
        c->eos_token_id_is_list = true;
    } else {
        if ((rc = json_token_id(v, "eos_token_id", src, &c->eos_token_id[0], e))) return rc;
        c->n_eos_token_id = 1;
        c->eos_token_id_is_list = false;
    }
    return 0;
}

static int parse_rope_scaling(model_config *c, const cJSON *root, const char *src, mr_err *e) {
    /* transformers v5 writes the same dictionary as "rope_parameters", with rope_theta inside it. */
    const char *name = "rope_scaling";
    const cJSON *rs = get(root, name);
    if (!rs) rs = get(root, name = "rope_parameters");
    if (absent(rs)) return 0;
    if (!cJSON_IsObject(rs)) return type_error(e, src, name, "an object or null", rs);
    char key[96], got[64];
    int rc = check_duplicates(rs, strcmp(name, "rope_scaling") == 0 ? "rope_scaling." : "rope_parameters.", src, e);
    if (rc) return rc;
    config_rope_scaling *r = &c->rope_scaling;

    const cJSON *theta = get(rs, "rope_theta");
    if (!absent(theta) && absent(get(root, "rope_theta"))) {
        snprintf(key, sizeof key, "%s.rope_theta", name);
        if ((rc = json_double(theta, key, src, &c->rope_theta, e))) return rc;
    }
    const cJSON *t1 = get(rs, "type"), *t2 = get(rs, "rope_type");
    for (int i = 0; i < 2; i++) {
        const cJSON *t = i ? t2 : t1;
        snprintf(key, sizeof key, "%s.%s", name, i ? "rope_type" : "type");
        if (t && !cJSON_IsString(t)) return type_error(e, src, key, "a string", t);
    }
    if (!t1 && !t2) return fail(e, MR_EFORMAT, src, "%s.type: required field is missing", name);
    if (t1 && t2 && strcmp(t1->valuestring, t2->valuestring) != 0)
        return fail(e, MR_EINVAL, src, "%s: type \"%s\" and rope_type \"%s\" disagree", name, t1->valuestring,
                    t2->valuestring);
    const cJSON *t = t1 ? t1 : t2;
    if (strcmp(t->valuestring, "default") == 0) return 0; /* plain RoPE: no scaling */
    if (strcmp(t->valuestring, "yarn") != 0) {
        json_describe(t, got, sizeof got);
        return fail(e, MR_EINVAL, src, "%s.%s: expected \"yarn\" (moerl implements YaRN only), got %s", name,
                    t1 ? "type" : "rope_type", got);
    }
    r->type = CONFIG_ROPE_YARN;

    struct {
        const char *k;
        double *d;
        int *i;
        bool required;
    } items[] = {
        {"factor", &r->factor, NULL, true},
        {"original_max_position_embeddings", NULL, &r->original_max_position_embeddings, false},
        {"beta_fast", &r->beta_fast, NULL, false},
        {"beta_slow", &r->beta_slow, NULL, false},
        {"mscale", &r->mscale, NULL, false},
        {"mscale_all_dim", &r->mscale_all_dim, NULL, false},
    };
    for (size_t i = 0; i < sizeof items / sizeof items[0]; i++) {
        const cJSON *v = get(rs, items[i].k);
        snprintf(key, sizeof key, "%s.%s", name, items[i].k);
        if (absent(v)) {
            if (items[i].required) return fail(e, MR_EFORMAT, src, "%s: required field is missing", key);
            continue;
        }
        rc = items[i].d ? json_double(v, key, src, items[i].d, e) : json_int(v, key, src, items[i].i, e);
        if (rc) return rc;
    }
    return 0;
}

static int parse_quantization(model_config *c, const cJSON *root, const char *src, mr_err *e) {
    const cJSON *q = get(root, "quantization_config");
    if (absent(q)) return 0;
    if (!cJSON_IsObject(q)) return type_error(e, src, "quantization_config", "an object or null", q);
    int rc = check_duplicates(q, "quantization_config.", src, e);
    if (rc) return rc;
    config_quantization *z = &c->quantization_config;
    z->present = true;
    snprintf(z->fmt, sizeof z->fmt, "e4m3");
    snprintf(z->activation_scheme, sizeof z->activation_scheme, "dynamic");
    z->weight_block_size[0] = z->weight_block_size[1] = 128;

    const cJSON *v = get(q, "quant_method");
    if (absent(v)) return fail(e, MR_EFORMAT, src, "quantization_config.quant_method: required field is missing");
    if ((rc = json_str(v, "quantization_config.quant_method", src, z->quant_method, sizeof z->quant_method, e)))
        return rc;
    struct {
        const char *k;
        char *buf;
        size_t n;
    } strs[] = {{"fmt", z->fmt, sizeof z->fmt},
                {"activation_scheme", z->activation_scheme, sizeof z->activation_scheme},
                {"scale_fmt", z->scale_fmt, sizeof z->scale_fmt}};
    for (size_t i = 0; i < sizeof strs / sizeof strs[0]; i++) {
        char key[64];
        snprintf(key, sizeof key, "quantization_config.%s", strs[i].k);
        v = get(q, strs[i].k);
        if (!absent(v) && (rc = json_str(v, key, src, strs[i].buf, strs[i].n, e))) return rc;
    }
    v = get(q, "weight_block_size");
    if (!absent(v)) {
        if (!cJSON_IsArray(v) || cJSON_GetArraySize(v) != 2)
            return type_error(e, src, "quantization_config.weight_block_size", "an array of 2 integers", v);
        int k = 0;
        for (const cJSON *it = v->child; it; it = it->next, k++) {
            char key[64];
            snprintf(key, sizeof key, "quantization_config.weight_block_size[%d]", k);
            if ((rc = json_int(it, key, src, &z->weight_block_size[k], e))) return rc;
        }
    }
    return 0;
}

int config_parse_json(model_config *c, const char *json_text, const char *source_name, mr_err *e) {
    const char *src = source_name ? source_name : "config.json";
    size_t len = strlen(json_text);
    const char *end = NULL;
    json_hooks_install();
    json_oom = 0;
    /* Strict syntax first (cJSON lets, e.g., raw newlines inside strings through; Python's json does not). */
    jscan j = {json_text, len, 0, NULL};
    if (js_value(&j, 0)) js_ws(&j);
    if (j.expected || j.i < len) return json_syntax_error(json_text, len, NULL, src, e);
    /* The length counts the terminating NUL: with require_null_terminated, cJSON looks for it inside the buffer. */
    cJSON *root = cJSON_ParseWithLengthOpts(json_text, len + 1, &end, 1);
    if (!root) {
        if (json_oom) return fail(e, MR_ENOMEM, src, "out of memory while parsing JSON");
        return json_syntax_error(json_text, len, end, src, e);
    }
    int rc;
    if (!cJSON_IsObject(root)) {
        rc = type_error(e, src, "top level", "a JSON object", root);
        goto done;
    }
    config_model_type t = CONFIG_DEEPSEEK_V3;
    if ((rc = check_duplicates(root, "", src, e)) || (rc = parse_model_type(root, src, &t, e))) goto done;
    config_defaults(c, t);
    if ((rc = parse_fields(c, root, src, e)) || (rc = parse_routing(c, root, src, e)) ||
        (rc = parse_strings(c, root, src, e)) || (rc = parse_tokens(c, root, src, e)) ||
        (rc = parse_rope_scaling(c, root, src, e)) || (rc = parse_quantization(c, root, src, e)))
        goto done;
    rc = config_validate(c, src, e);
done:
    cJSON_Delete(root);
    return rc;
}

/* ---------------------------------------------------------------------------------------------------------- */
/* Validation */

#define RANGE(name, lo, hi)                                                                                       \
    do {                                                                                                          \
        if (c->name < (lo) || c->name > (hi))                                                                     \
            return fail(e, MR_ERANGE, src, #name ": expected %d..%d, got %d", (int)(lo), (int)(hi), c->name);    \
    } while (0)

static bool positive(double v) { return isfinite(v) && v > 0; }

static int check_token(const model_config *c, const char *key, int id, bool nullable, const char *src, mr_err *e) {
    if (nullable && id == -1) return 0;
    if (id < 0 || id >= c->vocab_size)
        return fail(e, MR_ERANGE, src, "%s: expected 0..vocab_size-1 (%d)%s, got %d", key, c->vocab_size - 1,
                    nullable ? " or null" : "", id);
    return 0;
}

static int validate_moe(const model_config *c, const char *src, mr_err *e) {
    int E = c->n_routed_experts, G = c->n_group;
    const char *method = config_topk_method_name(c->topk_method);
    RANGE(moe_intermediate_size, 1, MAX_DIM);
    if (c->num_experts_per_tok < 1 || c->num_experts_per_tok > E)
        return fail(e, MR_ERANGE, src, "num_experts_per_tok: expected 1..n_routed_experts (%d), got %d", E,
                    c->num_experts_per_tok);
    RANGE(n_shared_experts, 0, MAX_SHARED);
    if (G < 1 || G > E) return fail(e, MR_ERANGE, src, "n_group: expected 1..n_routed_experts (%d), got %d", E, G);
    if (E % G != 0)
        return fail(e, MR_ERANGE, src, "n_routed_experts: expected a multiple of n_group (%d), got %d", G, E);
    if (c->topk_group < 1 || c->topk_group > G)
        return fail(e, MR_ERANGE, src, "topk_group: expected 1..n_group (%d), got %d", G, c->topk_group);
    if (c->topk_method == CONFIG_TOPK_NOAUX_TC && c->scoring_func != CONFIG_SCORING_SIGMOID)
        return fail(e, MR_EINVAL, src, "scoring_func: topk_method \"noaux_tc\" needs \"sigmoid\", got \"%s\"",
                    config_scoring_func_name(c->scoring_func));
    if (c->topk_method != CONFIG_TOPK_NOAUX_TC && c->scoring_func != CONFIG_SCORING_SOFTMAX)
        return fail(e, MR_EINVAL, src, "scoring_func: topk_method \"%s\" needs \"softmax\", got \"%s\"", method,
                    config_scoring_func_name(c->scoring_func));
    int per_group = E / G;
    /* noaux_tc scores a group by the sum of its two best experts (§7.1 step 4). */
    if (c->topk_method == CONFIG_TOPK_NOAUX_TC && per_group < 2)
        return fail(e, MR_ERANGE, src,
                    "n_group: topk_method \"noaux_tc\" needs >= 2 experts per group, got n_routed_experts / n_group "
                    "= %d / %d = %d",
                    E, G, per_group);
    if (c->topk_method != CONFIG_TOPK_GREEDY && c->num_experts_per_tok > c->topk_group * per_group)
        return fail(e, MR_ERANGE, src,
                    "num_experts_per_tok: expected at most topk_group * n_routed_experts / n_group (%d * %d = %d) "
                    "for topk_method \"%s\", got %d",
                    c->topk_group, per_group, c->topk_group * per_group, method, c->num_experts_per_tok);
    if (!positive(c->routed_scaling_factor))
        return fail(e, MR_ERANGE, src, "routed_scaling_factor: expected a number > 0, got %g",
                    c->routed_scaling_factor);
    return 0;
}

static int validate_rope(const model_config *c, const char *src, mr_err *e) {
    const config_rope_scaling *r = &c->rope_scaling;
    if (!positive(c->rope_theta))
        return fail(e, MR_ERANGE, src, "rope_theta: expected a number > 0, got %g", c->rope_theta);
    if (r->type == CONFIG_ROPE_NONE) return 0;
    if (r->type != CONFIG_ROPE_YARN)
        return fail(e, MR_EINVAL, src, "rope_scaling.type: unknown value %d", (int)r->type);
    if (!(isfinite(r->factor) && r->factor >= 1))
        return fail(e, MR_ERANGE, src, "rope_scaling.factor: expected a number >= 1, got %g", r->factor);
    if (r->original_max_position_embeddings < 1 || r->original_max_position_embeddings > MAX_POSITIONS)
        return fail(e, MR_ERANGE, src, "rope_scaling.original_max_position_embeddings: expected 1..%d, got %d",
                    MAX_POSITIONS, r->original_max_position_embeddings);
    if (!positive(r->beta_slow))
        return fail(e, MR_ERANGE, src, "rope_scaling.beta_slow: expected a number > 0, got %g", r->beta_slow);
    /* The ramp of §5.4 runs from cd(beta_fast) up to cd(beta_slow); it is empty unless beta_fast > beta_slow. */
    if (!(isfinite(r->beta_fast) && r->beta_fast > r->beta_slow))
        return fail(e, MR_ERANGE, src,
                    "rope_scaling.beta_fast: expected a number > rope_scaling.beta_slow (%g), got %g",
                    r->beta_slow, r->beta_fast);
    if (!(isfinite(r->mscale) && r->mscale >= 0))
        return fail(e, MR_ERANGE, src, "rope_scaling.mscale: expected a number >= 0, got %g", r->mscale);
    if (!(isfinite(r->mscale_all_dim) && r->mscale_all_dim >= 0))
        return fail(e, MR_ERANGE, src, "rope_scaling.mscale_all_dim: expected a number >= 0, got %g",
                    r->mscale_all_dim);
    return 0;
}

static int validate_quant(const model_config *c, const char *src, mr_err *e) {
    const config_quantization *q = &c->quantization_config;
    if (!q->present) return 0;
    struct {
        const char *key, *val, *want, *alt;
    } s[] = {{"quant_method", q->quant_method, "fp8", NULL},
             {"fmt", q->fmt, "e4m3", NULL},
             {"activation_scheme", q->activation_scheme, "dynamic", NULL},
             {"scale_fmt", q->scale_fmt, "ue8m0", ""}};
    for (size_t i = 0; i < sizeof s / sizeof s[0]; i++) {
        size_t cap = sizeof q->fmt; /* all four strings have the same size */
        if (!memchr(s[i].val, '\0', cap))
            return fail(e, MR_EINVAL, src, "quantization_config.%s: not a terminated string", s[i].key);
        if (strcmp(s[i].val, s[i].want) != 0 && !(s[i].alt && strcmp(s[i].val, s[i].alt) == 0))
            return fail(e, MR_EINVAL, src, "quantization_config.%s: expected \"%s\"%s, got \"%s\"", s[i].key,
                        s[i].want, s[i].alt ? " or absent" : "", s[i].val);
    }
    for (int i = 0; i < 2; i++)
        if (q->weight_block_size[i] < 1 || q->weight_block_size[i] > MAX_DIM)
            return fail(e, MR_ERANGE, src, "quantization_config.weight_block_size[%d]: expected 1..%d, got %d", i,
                        MAX_DIM, q->weight_block_size[i]);
    return 0;
}

int config_validate(const model_config *c, const char *source_name, mr_err *e) {
    const char *src = source_name ? source_name : "config.json";
    int rc;
    /* Enums first: a struct filled by hand may hold anything. */
    if ((unsigned)c->model_type > CONFIG_DEEPSEEK_V2)
        return fail(e, MR_EINVAL, src, "model_type: unknown value %d", (int)c->model_type);
    if ((unsigned)c->topk_method > CONFIG_TOPK_GROUP_LIMITED_GREEDY)
        return fail(e, MR_EINVAL, src, "topk_method: unknown value %d", (int)c->topk_method);
    if ((unsigned)c->scoring_func > CONFIG_SCORING_SOFTMAX)
        return fail(e, MR_EINVAL, src, "scoring_func: unknown value %d", (int)c->scoring_func);
    if (c->hidden_act != CONFIG_ACT_SILU)
        return fail(e, MR_EINVAL, src, "hidden_act: unknown value %d", (int)c->hidden_act);
    if ((unsigned)c->torch_dtype > CONFIG_DTYPE_F32)
        return fail(e, MR_EINVAL, src, "torch_dtype: unknown value %d", (int)c->torch_dtype);

    RANGE(vocab_size, 1, MAX_VOCAB);
    RANGE(hidden_size, 1, MAX_DIM);
    RANGE(intermediate_size, 1, MAX_DIM);
    RANGE(num_hidden_layers, 1, MAX_LAYERS);
    RANGE(num_attention_heads, 1, MAX_HEADS);
    if (c->num_key_value_heads < 1 || c->num_key_value_heads > c->num_attention_heads)
        return fail(e, MR_ERANGE, src, "num_key_value_heads: expected 1..num_attention_heads (%d), got %d",
                    c->num_attention_heads, c->num_key_value_heads);
    RANGE(q_lora_rank, 0, MAX_DIM);
    RANGE(kv_lora_rank, 1, MAX_DIM);
    RANGE(qk_nope_head_dim, 1, MAX_HEAD_DIM);
    RANGE(qk_rope_head_dim, 2, MAX_HEAD_DIM);
    if (c->qk_rope_head_dim % 2 != 0)
        return fail(e, MR_ERANGE, src, "qk_rope_head_dim: expected an even number (RoPE rotates pairs), got %d",
                    c->qk_rope_head_dim);
    RANGE(v_head_dim, 1, MAX_HEAD_DIM);

    RANGE(n_routed_experts, 0, MAX_EXPERTS);
    if (c->first_k_dense_replace < 0 || c->first_k_dense_replace > c->num_hidden_layers)
        return fail(e, MR_ERANGE, src, "first_k_dense_replace: expected 0..num_hidden_layers (%d), got %d",
                    c->num_hidden_layers, c->first_k_dense_replace);
    RANGE(moe_layer_freq, 1, MAX_LAYERS);
    if (c->n_routed_experts > 0) {
        if ((rc = validate_moe(c, src, e))) return rc;
    } else {
        /* A dense model ignores the MoE fields; they only have to be sane. */
        RANGE(moe_intermediate_size, 0, MAX_DIM);
        RANGE(num_experts_per_tok, 0, MAX_EXPERTS);
        RANGE(n_shared_experts, 0, MAX_SHARED);
    }

    if ((rc = validate_rope(c, src, e))) return rc;
    RANGE(max_position_embeddings, 1, MAX_POSITIONS);
    if (!(isfinite(c->rms_norm_eps) && c->rms_norm_eps > 0 && c->rms_norm_eps < 1))
        return fail(e, MR_ERANGE, src, "rms_norm_eps: expected a number in (0, 1), got %g", c->rms_norm_eps);
    RANGE(num_nextn_predict_layers, 0, MAX_MTP);
    RANGE(moerl_swa_window, 0, MAX_POSITIONS);
    RANGE(moerl_swa_ratio, 0, MAX_POSITIONS);
    if ((c->moerl_swa_window > 0) != (c->moerl_swa_ratio > 0))
        return fail(e, MR_ERANGE, src, "moerl_swa_window / moerl_swa_ratio: set both (the option is on) or neither, got %d and %d",
                    c->moerl_swa_window, c->moerl_swa_ratio);

    if ((rc = check_token(c, "bos_token_id", c->bos_token_id, true, src, e))) return rc;
    if ((rc = check_token(c, "pad_token_id", c->pad_token_id, true, src, e))) return rc;
    RANGE(n_eos_token_id, 0, CONFIG_MAX_EOS);
    for (int i = 0; i < c->n_eos_token_id; i++) {
        char key[32];
        if (c->eos_token_id_is_list || c->n_eos_token_id > 1) snprintf(key, sizeof key, "eos_token_id[%d]", i);
        else snprintf(key, sizeof key, "eos_token_id");
        if ((rc = check_token(c, key, c->eos_token_id[i], false, src, e))) return rc;
    }

    if (!positive(c->initializer_range))
        return fail(e, MR_ERANGE, src, "initializer_range: expected a number > 0, got %g", c->initializer_range);
    if (!(isfinite(c->aux_loss_alpha) && c->aux_loss_alpha >= 0))
        return fail(e, MR_ERANGE, src, "aux_loss_alpha: expected a number >= 0, got %g", c->aux_loss_alpha);
    RANGE(ep_size, 1, MAX_EXPERTS);
    if (c->attention_bias)
        return fail(e, MR_EINVAL, src,
                    "attention_bias: expected false (the architecture has no attention bias), got true");
    if (!(isfinite(c->attention_dropout) && c->attention_dropout >= 0 && c->attention_dropout < 1))
        return fail(e, MR_ERANGE, src, "attention_dropout: expected a number in [0, 1), got %g", c->attention_dropout);
    if (!memchr(c->transformers_version, '\0', sizeof c->transformers_version))
        return fail(e, MR_EINVAL, src, "transformers_version: not a terminated string");
    return validate_quant(c, src, e);
}

/* ---------------------------------------------------------------------------------------------------------- */
/* Writing */

static void sb_double(strbuf *b, double v) {
    char tmp[40];
    fmt_double(tmp, sizeof tmp, v);
    strbuf_putn(b, tmp, strlen(tmp));
}

/* One top-level member: its key and where its rendered value sits in the value buffer. */
typedef struct entry {
    const char *key;
    size_t off, len;
} entry;

#define MAX_ENTRIES 64

typedef struct writer {
    strbuf vals;
    entry ent[MAX_ENTRIES];
    int n;
    size_t start;
} writer;

static void w_begin(writer *w, const char *key) {
    assert(w->n < MAX_ENTRIES); /* the writer emits a fixed set of about 45 keys */
    w->start = w->vals.n;
    w->ent[w->n].key = key;
}
static void w_end(writer *w) {
    w->ent[w->n].off = w->start;
    w->ent[w->n].len = w->vals.n - w->start;
    w->n++;
}
static void w_raw(writer *w, const char *key, const char *text) {
    w_begin(w, key);
    strbuf_putn(&w->vals, text, strlen(text));
    w_end(w);
}
static void w_int(writer *w, const char *key, int v) {
    w_begin(w, key);
    strbuf_printf(&w->vals, "%d", v);
    w_end(w);
}
static void w_double(writer *w, const char *key, double v) {
    w_begin(w, key);
    sb_double(&w->vals, v);
    w_end(w);
}
static void w_string(writer *w, const char *key, const char *s) {
    w_begin(w, key);
    strbuf_json_str(&w->vals, s);
    w_end(w);
}

static int entry_cmp(const void *a, const void *b) {
    return strcmp(((const entry *)a)->key, ((const entry *)b)->key);
}

static void write_rope_scaling(writer *w, const config_rope_scaling *r) {
    w_begin(w, "rope_scaling");
    strbuf *b = &w->vals;
    if (r->type != CONFIG_ROPE_YARN) {
        strbuf_printf(b, "null");
        w_end(w);
        return;
    }
    /* Both spellings of the type: "type" for the DeepSeek remote code, "rope_type" for newer transformers. */
    strbuf_printf(b, "{\n    \"beta_fast\": ");
    sb_double(b, r->beta_fast);
    strbuf_printf(b, ",\n    \"beta_slow\": ");
    sb_double(b, r->beta_slow);
    strbuf_printf(b, ",\n    \"factor\": ");
    sb_double(b, r->factor);
    if (r->mscale != 0) {
        strbuf_printf(b, ",\n    \"mscale\": ");
        sb_double(b, r->mscale);
    }
    if (r->mscale_all_dim != 0) {
        strbuf_printf(b, ",\n    \"mscale_all_dim\": ");
        sb_double(b, r->mscale_all_dim);
    }
    strbuf_printf(b, ",\n    \"original_max_position_embeddings\": %d", r->original_max_position_embeddings);
    strbuf_printf(b, ",\n    \"rope_type\": \"yarn\",\n    \"type\": \"yarn\"\n  }");
    w_end(w);
}

static void write_quantization(writer *w, const config_quantization *q) {
    if (!q->present) return;
    w_begin(w, "quantization_config");
    strbuf *b = &w->vals;
    strbuf_printf(b, "{\n    \"activation_scheme\": ");
    strbuf_json_str(b, q->activation_scheme);
    strbuf_printf(b, ",\n    \"fmt\": ");
    strbuf_json_str(b, q->fmt);
    strbuf_printf(b, ",\n    \"quant_method\": ");
    strbuf_json_str(b, q->quant_method);
    if (q->scale_fmt[0]) {
        strbuf_printf(b, ",\n    \"scale_fmt\": ");
        strbuf_json_str(b, q->scale_fmt);
    }
    strbuf_printf(b, ",\n    \"weight_block_size\": [\n      %d,\n      %d\n    ]\n  }", q->weight_block_size[0],
            q->weight_block_size[1]);
    w_end(w);
}

int config_write_json(const model_config *c, char **out_text, mr_err *e) {
    *out_text = NULL;
    int rc = config_validate(c, "config", e);
    if (rc) return rc;
    writer w;
    memset(&w, 0, sizeof w);
    strbuf out = {0};
    bool v3 = c->model_type == CONFIG_DEEPSEEK_V3;

    w_raw(&w, "architectures", v3 ? "[\n    \"DeepseekV3ForCausalLM\"\n  ]" : "[\n    \"DeepseekV2ForCausalLM\"\n  ]");
    w_string(&w, "model_type", config_model_type_name(c->model_type));
    for (size_t i = 0; i < N_FIELDS; i++) {
        const field *f = &fields[i];
        if (f->kind == FK_INT) {
            int v = *cfield_int(c, f);
            if (v == 0 && (f->flags & FF_OMIT_ZERO)) continue;
            if (v == 0 && (f->flags & FF_NULL_WRITE)) w_raw(&w, f->key, "null");
            else w_int(&w, f->key, v);
        } else if (f->kind == FK_DOUBLE) w_double(&w, f->key, *cfield_dbl(c, f));
        else w_raw(&w, f->key, *cfield_bool(c, f) ? "true" : "false");
    }
    w_string(&w, "topk_method", config_topk_method_name(c->topk_method));
    w_string(&w, "scoring_func", config_scoring_func_name(c->scoring_func));
    w_string(&w, "hidden_act", "silu");
    if (c->torch_dtype != CONFIG_DTYPE_NONE) w_string(&w, "torch_dtype", config_dtype_name(c->torch_dtype));
    if (c->transformers_version[0]) w_string(&w, "transformers_version", c->transformers_version);
    if (c->bos_token_id < 0) w_raw(&w, "bos_token_id", "null");
    else w_int(&w, "bos_token_id", c->bos_token_id);
    if (c->pad_token_id < 0) w_raw(&w, "pad_token_id", "null");
    else w_int(&w, "pad_token_id", c->pad_token_id);
    w_begin(&w, "eos_token_id");
    if (c->n_eos_token_id == 0) strbuf_printf(&w.vals, "null");
    else if (c->n_eos_token_id == 1 && !c->eos_token_id_is_list) strbuf_printf(&w.vals, "%d", c->eos_token_id[0]);
    else {
        strbuf_printf(&w.vals, "[");
        for (int i = 0; i < c->n_eos_token_id; i++)
            strbuf_printf(&w.vals, "%s\n    %d", i ? "," : "", c->eos_token_id[i]);
        strbuf_printf(&w.vals, "\n  ]");
    }
    w_end(&w);
    write_rope_scaling(&w, &c->rope_scaling);
    write_quantization(&w, &c->quantization_config);

    /* HF writes config.json with sorted keys and a 2-space indent; so do we. */
    qsort(w.ent, (size_t)w.n, sizeof w.ent[0], entry_cmp);
    strbuf_putn(&out, "{\n", 2);
    for (int i = 0; i < w.n && !w.vals.oom; i++) {
        strbuf_printf(&out, "  \"%s\": ", w.ent[i].key);
        strbuf_putn(&out, w.vals.p + w.ent[i].off, w.ent[i].len);
        strbuf_putn(&out, i + 1 < w.n ? ",\n" : "\n", i + 1 < w.n ? 2 : 1);
    }
    strbuf_putn(&out, "}\n", 2);
    mem_free(w.vals.p);
    if (out.oom || w.vals.oom) {
        mem_free(out.p);
        return err_set(e, MR_ENOMEM, "config: out of memory while writing config.json");
    }
    *out_text = out.p;
    return 0;
}

/* ---------------------------------------------------------------------------------------------------------- */
/* Files */

/* path itself, or path/config.json when path is a directory; allocated. */
static char *resolve_path(const char *path) {
    struct stat st;
    if (stat(path, &st) == 0 && S_ISDIR(st.st_mode)) {
        size_t n = strlen(path);
        char *p = mem_alloc(n + sizeof "/config.json");
        if (p) snprintf(p, n + sizeof "/config.json", "%s%sconfig.json", path, n && path[n - 1] == '/' ? "" : "/");
        return p;
    }
    return mem_strdup(path);
}

int config_load_file(model_config *c, const char *path, mr_err *e) {
    char *file = resolve_path(path), *text = NULL;
    FILE *f = NULL;
    int rc;
    if (!file) return err_set(e, MR_ENOMEM, "%s: out of memory", path);
    f = fopen(file, "rb");
    if (!f) {
        rc = fail(e, MR_EIO, file, "cannot open: %s", strerror(errno));
        goto done;
    }
    struct stat st;
    if (fstat(fileno(f), &st) != 0) {
        rc = fail(e, MR_EIO, file, "cannot stat: %s", strerror(errno));
        goto done;
    }
    if (st.st_size > MAX_FILE_BYTES) {
        rc = fail(e, MR_EFORMAT, file, "%lld bytes is too large for a config.json (limit %ld)", (long long)st.st_size,
                  MAX_FILE_BYTES);
        goto done;
    }
    size_t size = (size_t)st.st_size;
    text = mem_alloc(size + 1);
    if (!text) {
        rc = fail(e, MR_ENOMEM, file, "out of memory reading %zu bytes", size);
        goto done;
    }
    size_t got = fread(text, 1, size, f);
    if (got != size || ferror(f)) {
        rc = fail(e, MR_EIO, file, "read %zu of %zu bytes", got, size);
        goto done;
    }
    text[size] = '\0';
    if (strlen(text) != size) {
        rc = fail(e, MR_EFORMAT, file, "malformed JSON: a NUL byte at offset %zu", strlen(text));
        goto done;
    }
    rc = config_parse_json(c, text, file, e);
done:
    if (f) fclose(f);
    mem_free(text);
    mem_free(file);
    return rc;
}

int config_save_file(const model_config *c, const char *path, mr_err *e) {
    char *text = NULL, *file = NULL, *tmp = NULL;
    int fd = -1, rc = config_write_json(c, &text, e);
    if (rc) return rc;
    file = resolve_path(path);
    if (file) {
        size_t n = strlen(file) + sizeof ".tmpXXXXXX";
        tmp = mem_alloc(n);
        if (tmp) snprintf(tmp, n, "%s.tmpXXXXXX", file);
    }
    if (!file || !tmp) {
        rc = err_set(e, MR_ENOMEM, "%s: out of memory", path);
        goto done;
    }
    fd = mkstemp(tmp);
    if (fd < 0) {
        rc = fail(e, MR_EIO, file, "cannot create a temporary file next to it: %s", strerror(errno));
        goto done;
    }
    size_t len = strlen(text), off = 0;
    while (off < len) {
        ssize_t k = write(fd, text + off, len - off);
        if (k < 0 && errno == EINTR) continue;
        if (k <= 0) {
            rc = fail(e, MR_EIO, tmp, "write failed: %s", k < 0 ? strerror(errno) : "no progress");
            goto done;
        }
        off += (size_t)k;
    }
    if (fchmod(fd, 0644) != 0 || fsync(fd) != 0) {
        rc = fail(e, MR_EIO, tmp, "fsync/fchmod failed: %s", strerror(errno));
        goto done;
    }
    if (close(fd) != 0) {
        fd = -1;
        rc = fail(e, MR_EIO, tmp, "close failed: %s", strerror(errno));
        goto done;
    }
    fd = -1;
    if (rename(tmp, file) != 0) {
        rc = fail(e, MR_EIO, file, "cannot rename %s over it: %s", tmp, strerror(errno));
        goto done;
    }
    mem_free(tmp);
    tmp = NULL; /* renamed: nothing to remove */
done:
    if (fd >= 0) close(fd);
    if (tmp && rc) unlink(tmp);
    mem_free(tmp);
    mem_free(file);
    mem_free(text);
    return rc;
}

/* ---------------------------------------------------------------------------------------------------------- */
/* Comparison */

const char *config_diff(const model_config *a, const model_config *b) {
    if (a->model_type != b->model_type) return "model_type";
    for (size_t i = 0; i < N_FIELDS; i++) {
        const field *f = &fields[i];
        bool same = f->kind == FK_INT      ? *cfield_int(a, f) == *cfield_int(b, f)
                    : f->kind == FK_DOUBLE ? *cfield_dbl(a, f) == *cfield_dbl(b, f)
                                           : *cfield_bool(a, f) == *cfield_bool(b, f);
        if (!same) return f->key;
    }
    if (a->topk_method != b->topk_method) return "topk_method";
    if (a->scoring_func != b->scoring_func) return "scoring_func";
    if (a->hidden_act != b->hidden_act) return "hidden_act";
    if (a->torch_dtype != b->torch_dtype) return "torch_dtype";
    if (strncmp(a->transformers_version, b->transformers_version, sizeof a->transformers_version) != 0)
        return "transformers_version";
    if (a->bos_token_id != b->bos_token_id) return "bos_token_id";
    if (a->pad_token_id != b->pad_token_id) return "pad_token_id";
    if (a->n_eos_token_id != b->n_eos_token_id ||
        (a->eos_token_id_is_list || a->n_eos_token_id > 1) != (b->eos_token_id_is_list || b->n_eos_token_id > 1))
        return "eos_token_id";
    for (int i = 0; i < a->n_eos_token_id && i < CONFIG_MAX_EOS; i++)
        if (a->eos_token_id[i] != b->eos_token_id[i]) return "eos_token_id";
    const config_rope_scaling *ra = &a->rope_scaling, *rb = &b->rope_scaling;
    if (ra->type != rb->type) return "rope_scaling";
    if (ra->type == CONFIG_ROPE_YARN) {
        if (ra->factor != rb->factor) return "rope_scaling.factor";
        if (ra->original_max_position_embeddings != rb->original_max_position_embeddings)
            return "rope_scaling.original_max_position_embeddings";
        if (ra->beta_fast != rb->beta_fast) return "rope_scaling.beta_fast";
        if (ra->beta_slow != rb->beta_slow) return "rope_scaling.beta_slow";
        if (ra->mscale != rb->mscale) return "rope_scaling.mscale";
        if (ra->mscale_all_dim != rb->mscale_all_dim) return "rope_scaling.mscale_all_dim";
    }
    const config_quantization *qa = &a->quantization_config, *qb = &b->quantization_config;
    if (qa->present != qb->present) return "quantization_config";
    if (qa->present) {
        if (strncmp(qa->quant_method, qb->quant_method, sizeof qa->quant_method) != 0)
            return "quantization_config.quant_method";
        if (strncmp(qa->fmt, qb->fmt, sizeof qa->fmt) != 0) return "quantization_config.fmt";
        if (strncmp(qa->activation_scheme, qb->activation_scheme, sizeof qa->activation_scheme) != 0)
            return "quantization_config.activation_scheme";
        if (strncmp(qa->scale_fmt, qb->scale_fmt, sizeof qa->scale_fmt) != 0) return "quantization_config.scale_fmt";
        if (qa->weight_block_size[0] != qb->weight_block_size[0] ||
            qa->weight_block_size[1] != qb->weight_block_size[1])
            return "quantization_config.weight_block_size";
    }
    return NULL;
}

/* ---------------------------------------------------------------------------------------------------------- */
/* Derived quantities */

bool config_is_moe_layer(const model_config *c, int layer) {
    return c->n_routed_experts > 0 && layer >= c->first_k_dense_replace && c->moe_layer_freq > 0 &&
           layer % c->moe_layer_freq == 0;
}

int config_qk_head_dim(const model_config *c) { return c->qk_nope_head_dim + c->qk_rope_head_dim; }

/* YaRN's get_mscale (§5.4): 0.1 * m * ln(s) + 1, or 1 when s <= 1. */
static double yarn_get_mscale(double s, double m) { return s <= 1 ? 1.0 : 0.1 * m * log(s) + 1.0; }

double config_softmax_scale(const model_config *c) {
    double scale = 1.0 / sqrt((double)config_qk_head_dim(c));
    const config_rope_scaling *r = &c->rope_scaling;
    if (r->type == CONFIG_ROPE_YARN && r->mscale_all_dim != 0) {
        double m = yarn_get_mscale(r->factor, r->mscale_all_dim);
        scale *= m * m;
    }
    return scale;
}

double config_rope_attention_factor(const model_config *c) {
    const config_rope_scaling *r = &c->rope_scaling;
    if (r->type != CONFIG_ROPE_YARN) return 1.0;
    if (r->mscale != 0 && r->mscale_all_dim != 0)
        return yarn_get_mscale(r->factor, r->mscale) / yarn_get_mscale(r->factor, r->mscale_all_dim);
    return yarn_get_mscale(r->factor, 1.0);
}

/* Overflow-tracking 64-bit arithmetic for the counts. */
static uint64_t cmul(uint64_t a, uint64_t b, bool *ovf) {
    uint64_t r;
    if (__builtin_mul_overflow(a, b, &r)) *ovf = true;
    return r;
}
static uint64_t cadd(uint64_t a, uint64_t b, bool *ovf) {
    uint64_t r;
    if (__builtin_add_overflow(a, b, &r)) *ovf = true;
    return r;
}

/* Parameters of one FFN at `layer`: all of it (total) or what one token uses (activated). MoE: router weight,
 * router bias (noaux_tc only), routed experts, fused shared experts (§12). */
static uint64_t ffn_params(const model_config *c, int layer, bool activated, bool *ovf) {
    uint64_t d = (uint64_t)c->hidden_size;
    if (!config_is_moe_layer(c, layer)) return cmul(cmul(3, d, ovf), (uint64_t)c->intermediate_size, ovf);
    uint64_t E = (uint64_t)c->n_routed_experts, Ns = (uint64_t)c->n_shared_experts;
    uint64_t used = activated ? (uint64_t)c->num_experts_per_tok : E;
    uint64_t expert = cmul(cmul(3, d, ovf), (uint64_t)c->moe_intermediate_size, ovf);
    uint64_t p = cmul(E, d, ovf);
    if (c->topk_method == CONFIG_TOPK_NOAUX_TC) p = cadd(p, E, ovf);
    return cadd(p, cmul(cadd(used, Ns, ovf), expert, ovf), ovf);
}

int config_param_breakdown(const model_config *c, config_params *p) {
    bool ovf = false;
    memset(p, 0, sizeof *p);
    if (c->hidden_size < 0 || c->vocab_size < 0 || c->num_hidden_layers < 0 || c->num_attention_heads < 0 ||
        c->q_lora_rank < 0 || c->kv_lora_rank < 0 || c->qk_nope_head_dim < 0 || c->qk_rope_head_dim < 0 ||
        c->v_head_dim < 0 || c->intermediate_size < 0 || c->moe_intermediate_size < 0 || c->n_routed_experts < 0 ||
        c->n_shared_experts < 0 || c->num_experts_per_tok < 0 || c->num_nextn_predict_layers < 0)
        return MR_ERANGE;
    uint64_t d = (uint64_t)c->hidden_size, V = (uint64_t)c->vocab_size, H = (uint64_t)c->num_attention_heads;
    uint64_t rq = (uint64_t)c->q_lora_rank, rkv = (uint64_t)c->kv_lora_rank, dn = (uint64_t)c->qk_nope_head_dim;
    uint64_t dr = (uint64_t)c->qk_rope_head_dim, dv = (uint64_t)c->v_head_dim, dqk = dn + dr;

    /* Attention A (§12): q path (compressed: W_qa, its norm, W_qb; else W_q), W_kva, kv norm, W_kvb, W_o. */
    uint64_t A = rq ? cadd(cadd(cmul(d, rq, &ovf), rq, &ovf), cmul(cmul(rq, H, &ovf), dqk, &ovf), &ovf)
                    : cmul(cmul(d, H, &ovf), dqk, &ovf);
    A = cadd(A, cmul(d, rkv + dr, &ovf), &ovf);
    A = cadd(A, rkv, &ovf);
    A = cadd(A, cmul(cmul(rkv, H, &ovf), dn + dv, &ovf), &ovf);
    A = cadd(A, cmul(cmul(H, dv, &ovf), d, &ovf), &ovf);
    uint64_t block = cadd(A, 2 * d, &ovf); /* attention + input_layernorm + post_attention_layernorm */

    uint64_t emb = cmul(V, d, &ovf);
    uint64_t outer = cadd(cadd(emb, c->tie_word_embeddings ? 0 : emb, &ovf), d, &ovf); /* + final norm */
    p->total = p->activated = outer;
    for (int l = 0; l < c->num_hidden_layers; l++) {
        p->total = cadd(p->total, cadd(block, ffn_params(c, l, false, &ovf), &ovf), &ovf);
        p->activated = cadd(p->activated, cadd(block, ffn_params(c, l, true, &ovf), &ovf), &ovf);
    }
    /* MTP module k (§9.4) sits at layer index L + k - 1: enorm, hnorm, shared_head.norm (3d), eh_proj [d, 2d], and
     * one block. Per token it also runs the embedding and the head; the files hold a copy of both per module. */
    uint64_t mtp_own = cadd(3 * d, cmul(2 * d, d, &ovf), &ovf);
    for (int k = 0; k < c->num_nextn_predict_layers; k++) {
        int l = c->num_hidden_layers + k;
        p->mtp_total = cadd(p->mtp_total, cadd(cadd(mtp_own, block, &ovf), ffn_params(c, l, false, &ovf), &ovf), &ovf);
        uint64_t act = cadd(cadd(mtp_own, block, &ovf), ffn_params(c, l, true, &ovf), &ovf);
        p->mtp_activated = cadd(p->mtp_activated, cadd(act, 2 * emb, &ovf), &ovf);
    }
    uint64_t copies = cmul((uint64_t)c->num_nextn_predict_layers, 2 * emb, &ovf);
    p->checkpoint_total = cadd(cadd(p->total, p->mtp_total, &ovf), copies, &ovf);
    if (ovf) {
        memset(p, 0, sizeof *p);
        return MR_ERANGE;
    }
    return 0;
}

int config_param_count(const model_config *c, uint64_t *total, uint64_t *activated) {
    config_params p;
    int rc = config_param_breakdown(c, &p);
    if (total) *total = p.total;
    if (activated) *activated = p.activated;
    return rc;
}

/* ---------------------------------------------------------------------------------------------------------- */
/* The quickstart model */

/* Every V3 feature at toy size, so each code path (MLA with q compression, dense prefix, grouped noaux_tc
 * routing, shared expert, MTP) runs in the quickstart and the tests in well under a second on a CPU:
 *  - 4 layers, the first dense (first_k_dense_replace 1), hidden 256, 4 heads;
 *  - MLA: q_lora_rank 64, kv_lora_rank 64 (a quarter of hidden, as V3's 512/7168 is small), qk_nope 32,
 *    qk_rope 16 (even; 8 RoPE pairs), v_head 32; no YaRN (max positions 1024 is the trained length);
 *  - MoE: 16 routed experts in 4 groups of 4, top-2 groups, top-2 experts (2 <= 2 * 4), 1 shared expert,
 *    expert width 128, dense width 512 (= 4 * 128, the V3 ratio 18432 / 2048 rounded down);
 *  - routed_scaling_factor 1.0: with only 2 of 16 experts the sigmoid-normalized weights already sum to 1, so the
 *    routed output has the scale of one expert; V3's 2.5 compensates for its much wider top-8 of 256;
 *  - aux_loss_alpha 0.0001: the V3 paper's sequence-wise balance weight (MODEL-SPEC §9.2);
 *  - MTP depth 1 (num_nextn_predict_layers), vocab 2048 (the quickstart tokenizer), float32 storage. */
void config_tiny(model_config *c) {
    config_defaults(c, CONFIG_DEEPSEEK_V3);
    c->vocab_size = 2048;
    c->hidden_size = 256;
    c->intermediate_size = 512;
    c->moe_intermediate_size = 128;
    c->num_hidden_layers = 4;
    c->num_attention_heads = 4;
    c->num_key_value_heads = 4;
    c->n_shared_experts = 1;
    c->n_routed_experts = 16;
    c->num_experts_per_tok = 2;
    c->n_group = 4;
    c->topk_group = 2;
    c->topk_method = CONFIG_TOPK_NOAUX_TC;
    c->scoring_func = CONFIG_SCORING_SIGMOID;
    c->norm_topk_prob = true;
    c->routed_scaling_factor = 1.0;
    c->first_k_dense_replace = 1;
    c->moe_layer_freq = 1;
    c->q_lora_rank = 64;
    c->kv_lora_rank = 64;
    c->qk_nope_head_dim = 32;
    c->qk_rope_head_dim = 16;
    c->v_head_dim = 32;
    c->rope_theta = 10000.0;
    c->rope_scaling.type = CONFIG_ROPE_NONE;
    c->max_position_embeddings = 1024;
    c->num_nextn_predict_layers = 1;
    c->bos_token_id = 0;
    c->eos_token_id[0] = 1;
    c->n_eos_token_id = 1;
    c->aux_loss_alpha = 0.0001;
    c->torch_dtype = CONFIG_DTYPE_F32;
}
