/* format.c: rewards for the shape of a completion. think_answer is R1's format reward
 * (<think>..</think><answer>..</answer>): 1.0 when the completion is exactly those two blocks (whitespace
 * around them allowed), 0.5 when both blocks are there in order but with other text around or between them
 * (lenient), 0 otherwise. answer_tag: 1.0 for exactly one non-empty <answer> block. regex: 1.0 when the PCRE2
 * pattern matches the whole completion (dot matches newlines), else 0. The DAPO overlong penalty, a length
 * reward, is reward_overlong_penalty in reward.c.
 *
 * When the prompt ends with "<think>" (the R1-Zero template opens the block for the model), the completion
 * is read as if it began with it. */
#define PCRE2_CODE_UNIT_WIDTH 8
#include <ctype.h>
#include <pcre2.h>
#include <stdio.h>
#include <string.h>

#include "core/mem.h"
#include "rewards/reward.h"

enum { STYLE_THINK_ANSWER, STYLE_ANSWER_TAG, STYLE_REGEX };

typedef struct {
    int style;
    pcre2_code *re; /* shared, read-only; match data is per worker */
} format_impl;

static const char *skip_ws(const char *p) {
    while (isspace((unsigned char)*p)) p++;
    return p;
}

static int count_of(const char *s, const char *w) {
    int n = 0;
    for (const char *p = strstr(s, w); p; p = strstr(p + 1, w)) n++;
    return n;
}

static int ends_with_think(const char *prompt) {
    if (!prompt) return 0;
    size_t n = strlen(prompt);
    while (n > 0 && isspace((unsigned char)prompt[n - 1])) n--;
    return n >= 7 && !strncmp(prompt + n - 7, "<think>", 7);
}

/* 1.0 strict, 0.5 lenient, 0 otherwise; *why says what is missing. */
static double think_answer(const char *prompt, const char *c, const char **why) {
    int opened = ends_with_think(prompt);
    int n_think = count_of(c, "<think>") + opened, n_end = count_of(c, "</think>");
    int n_ans = count_of(c, "<answer>"), n_ans_end = count_of(c, "</answer>");
    const char *t0 = opened ? c : strstr(c, "<think>");
    const char *t1 = strstr(c, "</think>");
    const char *a0 = t1 ? strstr(t1, "<answer>") : NULL;
    const char *a1 = a0 ? strstr(a0, "</answer>") : NULL;
    if (!t0 || !t1 || t1 < t0) {
        *why = "no <think>...</think> block";
        return 0.0;
    }
    if (!a0 || !a1) {
        *why = "no <answer>...</answer> block after </think>";
        return 0.0;
    }
    int strict = n_think == 1 && n_end == 1 && n_ans == 1 && n_ans_end == 1;
    if (strict) {
        const char *p = skip_ws(c);
        if (!opened && p != t0) strict = 0;
        if (skip_ws(t1 + strlen("</think>")) != a0) strict = 0;
        if (*skip_ws(a1 + strlen("</answer>")) != '\0') strict = 0;
    }
    *why = strict ? "" : "extra text around the blocks";
    return strict ? 1.0 : 0.5;
}

static int format_init(reward_plugin *p, const recipe *r, const char *item, const char *dir, mr_err *e) {
    (void)dir;
    format_impl *f = mem_calloc(1, sizeof *f);
    if (!f) return err_set(e, MR_ENOMEM, "out of memory");
    p->impl = f;
    char path[128];
    snprintf(path, sizeof path, "%s.format.style", item);
    f->style = recipe_enum(r, path);
    if (f->style < 0) f->style = STYLE_THINK_ANSWER;
    if (f->style == STYLE_REGEX) {
        snprintf(path, sizeof path, "%s.format.pattern", item);
        const char *pat = recipe_str(r, path);
        if (!pat) return err_set(e, MR_EINVAL, "%s: style regex needs a pattern", path);
        int code;
        PCRE2_SIZE off;
        f->re = pcre2_compile((PCRE2_SPTR)pat, PCRE2_ZERO_TERMINATED,
                              PCRE2_DOTALL | PCRE2_ANCHORED | PCRE2_ENDANCHORED | PCRE2_UTF | PCRE2_MATCH_INVALID_UTF,
                              &code, &off, NULL);
        if (!f->re) {
            PCRE2_UCHAR msg[256];
            pcre2_get_error_message(code, msg, sizeof msg);
            return err_set(e, MR_EINVAL, "%s: bad pattern at offset %zu: %s", path, (size_t)off, (char *)msg);
        }
        pcre2_jit_compile(f->re, PCRE2_JIT_COMPLETE); /* best effort: the interpreter works without it */
    }
    return 0;
}

typedef struct {
    pcre2_match_data *md;
    pcre2_match_context *mc;
} format_worker;

static int format_worker_init(const reward_plugin *p, void **ws, mr_err *e) {
    const format_impl *f = p->impl;
    *ws = NULL;
    if (!f->re) return 0;
    format_worker *w = mem_calloc(1, sizeof *w);
    if (!w) return err_set(e, MR_ENOMEM, "out of memory");
    w->md = pcre2_match_data_create_from_pattern(f->re, NULL);
    w->mc = pcre2_match_context_create(NULL);
    if (!w->md || !w->mc) {
        pcre2_match_data_free(w->md);
        pcre2_match_context_free(w->mc);
        mem_free(w);
        return err_set(e, MR_ENOMEM, "out of memory");
    }
    pcre2_set_match_limit(w->mc, 10000000); /* catastrophic backtracking is an error, not a hang */
    *ws = w;
    return 0;
}

static void format_worker_free(const reward_plugin *p, void *ws) {
    (void)p;
    format_worker *w = ws;
    if (!w) return;
    pcre2_match_data_free(w->md);
    pcre2_match_context_free(w->mc);
    mem_free(w);
}

static void format_score(const reward_plugin *p, void *ws, const reward_sample *s, double deadline,
                         reward_result *out, int *discard) {
    (void)deadline, (void)discard;
    const format_impl *f = p->impl;
    const char *c = s->completion ? s->completion : "";
    if (f->style == STYLE_THINK_ANSWER) {
        const char *why = "";
        double v = think_answer(s->prompt, c, &why);
        reward_result_set(out, REWARD_SCORE, v, "%s", why);
    } else if (f->style == STYLE_ANSWER_TAG) {
        const char *a0 = strstr(c, "<answer>");
        const char *a1 = a0 ? strstr(a0, "</answer>") : NULL;
        int one = a0 && a1 && count_of(c, "<answer>") == 1 && count_of(c, "</answer>") == 1;
        int empty = one && skip_ws(a0 + strlen("<answer>")) == a1;
        reward_result_set(out, REWARD_SCORE, one && !empty ? 1.0 : 0.0, "%s",
                          !a0 || !a1 ? "no <answer>...</answer> block" : !one ? "more than one answer block"
                                                                         : empty ? "empty answer" : "");
    } else {
        format_worker *w = ws;
        int rc = pcre2_match(f->re, (PCRE2_SPTR)c, strlen(c), 0, 0, w->md, w->mc);
        if (rc >= 0) {
            reward_result_set(out, REWARD_SCORE, 1.0, NULL);
        } else if (rc == PCRE2_ERROR_NOMATCH || rc == PCRE2_ERROR_PARTIAL) {
            reward_result_set(out, REWARD_SCORE, 0.0, "pattern does not match");
        } else {
            PCRE2_UCHAR msg[128];
            pcre2_get_error_message(rc, msg, sizeof msg);
            reward_result_set(out, REWARD_ERROR, 0, "regex: %s", (char *)msg);
        }
    }
}

static void format_free(reward_plugin *p) {
    format_impl *f = p->impl;
    if (!f) return;
    pcre2_code_free(f->re);
    mem_free(f);
}

const reward_plugin_ops reward_format_ops = {.kind = "format",
                                             .init = format_init,
                                             .worker_init = format_worker_init,
                                             .worker_free = format_worker_free,
                                             .score = format_score,
                                             .free = format_free};
