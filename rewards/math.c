/* math.c: the final-answer reward. Find the answer (\boxed{}, <answer>..</answer>, "#### x", the last number),
 * normalize it, and compare it with the row's reference as numbers (fractions, \frac, percent, decimals,
 * thousands separators) within a relative tolerance, or else as normalized text.
 *
 * The one idea: the reference answer goes through the same extraction and normalization as the completion
 * (GSM8K references are "reasoning #### 72"), so the two sides are always compared in the same form. No final
 * answer in the completion is UNSCORABLE, not 0: the judge fallback may still decide it. */
#include <ctype.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/mem.h"
#include "rewards/reward.h"

#define ANSWER_MAX 512

/* ---- extraction -------------------------------------------------------------------------------------- */

/* The brace group starting at s ('{'), nested braces counted; returns the end (the matching '}') or NULL. */
static const char *match_brace(const char *s) {
    int depth = 0;
    for (const char *p = s; *p; p++) {
        if (*p == '\\' && p[1]) {
            p++;
            continue;
        }
        if (*p == '{') depth++;
        else if (*p == '}' && --depth == 0) return p;
    }
    return NULL;
}

static void copy_span(char *out, size_t cap, const char *a, size_t n) {
    if (cap == 0) return;
    if (n >= cap) n = cap - 1;
    memcpy(out, a, n);
    out[n] = '\0';
}

static const char *last_strstr(const char *hay, const char *needle) {
    const char *last = NULL;
    for (const char *p = strstr(hay, needle); p; p = strstr(p + 1, needle)) last = p;
    return last;
}

static int extract_boxed(const char *t, char *out, size_t cap) {
    const char *best = NULL, *p;
    size_t skip = 0;
    static const char *const cmds[] = {"\\boxed", "\\fbox"};
    for (size_t i = 0; i < 2; i++)
        if ((p = last_strstr(t, cmds[i])) && (!best || p > best)) best = p, skip = strlen(cmds[i]);
    if (!best) return 0;
    p = best + skip;
    while (*p == ' ') p++;
    if (*p == '{') {
        const char *end = match_brace(p);
        if (!end) return 0;
        copy_span(out, cap, p + 1, (size_t)(end - p - 1));
        return 1;
    }
    /* "\boxed 5": up to the next space or '$' */
    const char *q = p;
    while (*q && !isspace((unsigned char)*q) && *q != '$') q++;
    if (q == p) return 0;
    copy_span(out, cap, p, (size_t)(q - p));
    return 1;
}

static int extract_answer_tag(const char *t, char *out, size_t cap) {
    const char *open = last_strstr(t, "<answer>");
    if (!open) return 0;
    open += strlen("<answer>");
    const char *close = strstr(open, "</answer>");
    if (!close) return 0;
    char *inner = mem_strndup(open, (size_t)(close - open));
    if (!inner) return 0;
    /* R1-style answers often box the result inside the tag. */
    int ok = extract_boxed(inner, out, cap);
    if (!ok) copy_span(out, cap, inner, strlen(inner));
    mem_free(inner);
    return ok || out[0] != '\0';
}

static int extract_hash(const char *t, char *out, size_t cap) {
    const char *p = last_strstr(t, "####");
    if (!p) return 0;
    p += 4;
    while (*p == ' ' || *p == '\t') p++;
    const char *q = p;
    while (*q && *q != '\n') q++;
    if (q == p) return 0;
    copy_span(out, cap, p, (size_t)(q - p));
    return 1;
}

/* The last number: optional sign, digits with thousands commas, a decimal part, an optional "/denominator". */
static int extract_last_number(const char *t, char *out, size_t cap) {
    const char *best = NULL, *best_end = NULL;
    for (const char *p = t; *p;) {
        if (!isdigit((unsigned char)*p) && !(*p == '.' && isdigit((unsigned char)p[1]))) {
            p++;
            continue;
        }
        const char *a = p;
        if (a > t && a[-1] == '-') a--;
        const char *q = p;
        while (isdigit((unsigned char)*q) ||
               (*q == ',' && isdigit((unsigned char)q[1]) && isdigit((unsigned char)q[2]) && isdigit((unsigned char)q[3])))
            q++;
        if (*q == '.' && isdigit((unsigned char)q[1]))
            for (q++; isdigit((unsigned char)*q);) q++;
        if (*q == '/' && isdigit((unsigned char)q[1]))
            for (q++; isdigit((unsigned char)*q);) q++;
        best = a;
        best_end = q;
        p = q;
    }
    if (!best) return 0;
    copy_span(out, cap, best, (size_t)(best_end - best));
    return 1;
}

int math_extract_answer(const char *text, math_extract mode, char *out, size_t cap) {
    if (cap) out[0] = '\0';
    if (!text) return 0;
    switch (mode) {
    case MATH_BOXED: return extract_boxed(text, out, cap);
    case MATH_ANSWER_TAG: return extract_answer_tag(text, out, cap);
    case MATH_HASH: return extract_hash(text, out, cap);
    case MATH_LAST_NUMBER: return extract_last_number(text, out, cap);
    case MATH_AUTO:
        return extract_boxed(text, out, cap) || extract_answer_tag(text, out, cap) || extract_hash(text, out, cap) ||
               extract_last_number(text, out, cap);
    }
    return 0;
}

/* ---- normalization ----------------------------------------------------------------------------------- */

typedef struct {
    char *s;
    size_t n, cap;
} sbuf;

static void sb_putn(sbuf *b, const char *s, size_t n) {
    for (size_t i = 0; i < n && b->n + 1 < b->cap; i++) b->s[b->n++] = s[i];
    b->s[b->n] = '\0';
}

static int starts(const char *p, const char *w) { return strncmp(p, w, strlen(w)) == 0; }

void math_normalize(const char *in, char *out, size_t cap) {
    if (cap == 0) return;
    char tmp[ANSWER_MAX * 2];
    sbuf b = {tmp, 0, sizeof tmp};
    tmp[0] = '\0';
    /* Pass 1: LaTeX spacing and wrappers out, \dfrac -> \frac, \text{x} -> x, whitespace dropped. */
    static const char *const drop[] = {"\\left", "\\right", "\\!", "\\,", "\\;", "\\:", "\\ ", "\\displaystyle",
                                       "\\$", "$", "\\(", "\\)", "\\[", "\\]", "^\\circ", "^{\\circ}", "\\circ"};
    static const char *const unwrap[] = {"\\text{", "\\textbf{", "\\mathrm{", "\\mathbf{", "\\textrm{", "\\mbox{"};
    for (const char *p = in; *p;) {
        size_t k;
        int hit = 0;
        for (k = 0; k < sizeof drop / sizeof drop[0]; k++)
            if (starts(p, drop[k])) {
                p += strlen(drop[k]);
                hit = 1;
                break;
            }
        if (hit) continue;
        for (k = 0; k < sizeof unwrap / sizeof unwrap[0]; k++)
            if (starts(p, unwrap[k])) {
                const char *end = match_brace(p + strlen(unwrap[k]) - 1);
                if (!end) break;
                char inner[ANSWER_MAX];
                copy_span(inner, sizeof inner, p + strlen(unwrap[k]), (size_t)(end - p - strlen(unwrap[k])));
                char norm[ANSWER_MAX];
                math_normalize(inner, norm, sizeof norm);
                sb_putn(&b, norm, strlen(norm));
                p = end + 1;
                hit = 1;
                break;
            }
        if (hit) continue;
        if (starts(p, "\\dfrac") || starts(p, "\\tfrac")) {
            sb_putn(&b, "\\frac", 5);
            p += 6;
            continue;
        }
        if (starts(p, "\\%")) {
            sb_putn(&b, "%", 1);
            p += 2;
            continue;
        }
        if (isspace((unsigned char)*p) || *p == '~') {
            p++;
            continue;
        }
        sb_putn(&b, p, 1);
        p++;
    }
    /* Pass 2: a leading "x=" goes; thousands commas (1,234,567) go; a trailing period goes. */
    char *s = tmp;
    if (isalpha((unsigned char)s[0]) && s[1] == '=') s += 2;
    size_t n = 0;
    for (size_t i = 0; s[i] && n + 1 < cap; i++) {
        if (s[i] == ',' && i > 0 && isdigit((unsigned char)s[i - 1]) && isdigit((unsigned char)s[i + 1]) &&
            isdigit((unsigned char)s[i + 2]) && isdigit((unsigned char)s[i + 3]) && !isdigit((unsigned char)s[i + 4]))
            continue;
        out[n++] = s[i];
    }
    while (n > 0 && out[n - 1] == '.') n--;
    out[n] = '\0';
    /* Canonical sign: "+5" -> "5", "--5" -> "5". */
    if (out[0] == '+') memmove(out, out + 1, n--);
    if (out[0] == '-' && out[1] == '-') memmove(out, out + 2, n - 1);
}

/* ---- numbers ----------------------------------------------------------------------------------------- */

/* A plain decimal at *p (sign, digits, point, exponent); advances *p. */
static int parse_decimal(const char **p, double *v) {
    const char *s = *p;
    if (!(isdigit((unsigned char)*s) || ((*s == '-' || *s == '+' || *s == '.') && (isdigit((unsigned char)s[1]) || s[1] == '.'))))
        return 0;
    char *end;
    *v = strtod(s, &end);
    if (end == s) return 0;
    /* strtod reads hex and inf/nan; answers never are */
    for (const char *q = s; q < end; q++)
        if (*q == 'x' || *q == 'X' || *q == 'n' || *q == 'N' || *q == 'i' || *q == 'I') return 0;
    *p = end;
    return 1;
}

/* {a} or a single character after \frac. */
static int parse_frac_arg(const char **p, double *v) {
    const char *s = *p;
    if (*s == '{') {
        const char *end = match_brace(s);
        if (!end) return 0;
        char inner[64];
        copy_span(inner, sizeof inner, s + 1, (size_t)(end - s - 1));
        const char *q = inner;
        if (!parse_decimal(&q, v) || *q) return 0;
        *p = end + 1;
        return 1;
    }
    if (isdigit((unsigned char)*s)) {
        *v = *s - '0';
        *p = s + 1;
        return 1;
    }
    return 0;
}

/* A normalized answer as a number: decimal, a/b, \frac{a}{b}, -\frac.., with % and trailing units (letters)
 * allowed. *percent = 1 when written with %. */
static int answer_number(const char *s, double *v, int *percent) {
    *percent = 0;
    const char *p = s;
    double sign = 1;
    if (*p == '-' && starts(p + 1, "\\frac")) {
        sign = -1;
        p++;
    }
    if (starts(p, "\\frac")) {
        double a, b;
        p += 5;
        if (!parse_frac_arg(&p, &a) || !parse_frac_arg(&p, &b) || b == 0) return 0;
        *v = sign * a / b;
    } else {
        if (!parse_decimal(&p, v)) return 0;
        if (*p == '/') {
            const char *q = p + 1;
            double d;
            if (!parse_decimal(&q, &d) || d == 0) return 0;
            *v /= d;
            p = q;
        }
    }
    if (*p == '%') {
        *percent = 1;
        p++;
    }
    /* trailing units: letters only ("cm", "dollars", "apples", "m^2" not) */
    for (; *p; p++)
        if (!isalpha((unsigned char)*p) && *p != '.') return 0;
    return isfinite(*v);
}

static int close_enough(double a, double b, double tol) {
    double t = tol > 1e-12 ? tol : 1e-12;
    return fabs(a - b) <= t * fmax(fabs(a), fabs(b)) || a == b;
}

int math_answers_equal(const char *got, const char *want, double rel_tol) {
    char g[ANSWER_MAX], w[ANSWER_MAX];
    math_normalize(got, g, sizeof g);
    math_normalize(want, w, sizeof w);
    double a, b;
    int pa, pb;
    if (answer_number(g, &a, &pa) && answer_number(w, &b, &pb)) {
        if (close_enough(a, b, rel_tol)) return 1;
        /* "50%" against "0.5" (either side may carry the percent sign) */
        if (pa && !pb && close_enough(a / 100.0, b, rel_tol)) return 1;
        if (pb && !pa && close_enough(a, b / 100.0, rel_tol)) return 1;
        return 0;
    }
    return strcmp(g, w) == 0;
}

/* ---- the plugin -------------------------------------------------------------------------------------- */

typedef struct {
    math_extract mode;
    char answer_field[128];
    double tol;
} math_impl;

static int math_init(reward_plugin *p, const recipe *r, const char *item, const char *dir, mr_err *e) {
    (void)dir;
    math_impl *m = mem_calloc(1, sizeof *m);
    if (!m) return err_set(e, MR_ENOMEM, "out of memory");
    p->impl = m;
    char path[128];
    snprintf(path, sizeof path, "%s.math.extract", item);
    m->mode = (math_extract)recipe_enum(r, path); /* the schema's order is math_extract's */
    if ((int)m->mode < 0) m->mode = MATH_AUTO;
    snprintf(path, sizeof path, "%s.math.answer_field", item);
    snprintf(m->answer_field, sizeof m->answer_field, "%s", recipe_str(r, path));
    snprintf(path, sizeof path, "%s.math.tolerance", item);
    m->tol = recipe_float(r, path);
    return 0;
}

static void math_score(const reward_plugin *p, void *ws, const reward_sample *s, double deadline, reward_result *out,
                       int *discard) {
    (void)ws, (void)deadline, (void)discard;
    const math_impl *m = p->impl;
    char buf[64];
    const char *ref = reward_row_text(s->row, m->answer_field, buf, sizeof buf);
    if (!ref) {
        reward_result_set(out, REWARD_ERROR, 0, "the row has no '%s' field", m->answer_field);
        return;
    }
    char want[ANSWER_MAX], got[ANSWER_MAX];
    /* The reference may itself be a worked solution ("... #### 72") or a boxed answer. */
    if (!math_extract_answer(ref, MATH_BOXED, want, sizeof want) && !math_extract_answer(ref, MATH_HASH, want, sizeof want))
        copy_span(want, sizeof want, ref, strlen(ref));
    if (!math_extract_answer(s->completion, m->mode, got, sizeof got)) {
        reward_result_set(out, REWARD_UNSCORABLE, 0, "no final answer");
        return;
    }
    int eq = math_answers_equal(got, want, m->tol);
    reward_result_set(out, REWARD_SCORE, eq ? 1.0 : 0.0, "answer '%.100s' %s '%.100s'", got, eq ? "==" : "!=", want);
}

static void math_free(reward_plugin *p) { mem_free(p->impl); }

const reward_plugin_ops reward_math_ops = {
    .kind = "math", .init = math_init, .score = math_score, .free = math_free};
