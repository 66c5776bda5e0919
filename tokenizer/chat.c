/* chat.c: the DeepSeek V3 / R1 chat formats rendered natively (MODEL-SPEC §11; the shipped Jinja template is
 * not executed), and plain recipe templates with {system} / {prompt} / {completion}.
 * One deliberate difference from the shipped V3 Jinja template: that template closes a run of tool calls
 * (<｜tool▁calls▁end｜><｜end▁of▁sentence｜>) only after a second call; here every run of calls is closed, as the
 * spec's prose describes. */
#include <string.h>

#include "core/mem.h"
#include "core/strbuf.h"
#include "tokenizer/tokenizer.h"

int tok_chat_format_parse(const char *name, tok_chat_format *out, mr_err *e) {
    if (!strcmp(name, "v3") || !strcmp(name, "deepseek-v3")) *out = TOK_CHAT_V3;
    else if (!strcmp(name, "r1") || !strcmp(name, "deepseek-r1")) *out = TOK_CHAT_R1;
    else return err_set(e, MR_EINVAL, "chat format \"%s\": expected v3 or r1", name);
    return 0;
}

/* R1: an earlier assistant turn keeps only the text after its last </think>. */
static const char *after_think(const char *s) {
    const char *last = NULL;
    for (const char *p = s; (p = strstr(p, "</think>")); p += 8) last = p + 8;
    return last ? last : s;
}

int tok_chat_render(const tokenizer *t, tok_chat_format fmt, const tok_msg *msgs, size_t n,
                    int add_generation_prompt, char **text, mr_err *e) {
    *text = NULL;
    strbuf b = {0};
    const char *bos = "<｜begin▁of▁sentence｜>", *eos = "<｜end▁of▁sentence｜>";
    size_t bl = strlen(bos), el = strlen(eos);
    if (t && tok_bos_id(t) >= 0) bos = tok_token_bytes(t, tok_bos_id(t), &bl);
    if (t && tok_eos_id(t) >= 0) eos = tok_token_bytes(t, tok_eos_id(t), &el);
    strbuf_putn(&b, bos, bl);
    int first_sp = 1;
    for (size_t i = 0; i < n; i++) {
        if (!msgs[i].role) {
            mem_free(b.p);
            return err_set(e, MR_EINVAL, "chat message %zu: no role", i);
        }
        if (strcmp(msgs[i].role, "system")) continue;
        if (!first_sp) strbuf_puts(&b, "\n\n");
        strbuf_puts(&b, msgs[i].content);
        first_sp = 0;
    }
    int is_tool = 0, output_first = 1;
    for (size_t i = 0; i < n; i++) {
        const tok_msg *m = &msgs[i];
        if (!strcmp(m->role, "system")) continue;
        if (!strcmp(m->role, "user")) {
            is_tool = 0;
            strbuf_puts(&b, "<｜User｜>");
            strbuf_puts(&b, m->content);
        } else if (!strcmp(m->role, "assistant")) {
            if (m->n_tool_calls) {
                if (is_tool) strbuf_puts(&b, "<｜tool▁outputs▁end｜>");
                is_tool = 0;
                strbuf_puts(&b, "<｜Assistant｜>");
                if (m->content) strbuf_puts(&b, fmt == TOK_CHAT_R1 ? after_think(m->content) : m->content);
                strbuf_puts(&b, "<｜tool▁calls▁begin｜>");
                for (size_t k = 0; k < m->n_tool_calls; k++) {
                    const tok_tool_call *c = &m->tool_calls[k];
                    if (k) strbuf_puts(&b, "\n");
                    strbuf_puts(&b, "<｜tool▁call▁begin｜>");
                    strbuf_puts(&b, c->type ? c->type : "function");
                    strbuf_puts(&b, "<｜tool▁sep｜>");
                    strbuf_puts(&b, c->name);
                    strbuf_puts(&b, "\n```json\n");
                    strbuf_puts(&b, c->arguments);
                    strbuf_puts(&b, "\n```<｜tool▁call▁end｜>");
                }
                strbuf_puts(&b, "<｜tool▁calls▁end｜>");
                strbuf_putn(&b, eos, el);
            } else {
                const char *c = m->content ? m->content : "";
                if (fmt == TOK_CHAT_R1) c = after_think(c);
                strbuf_puts(&b, is_tool ? "<｜tool▁outputs▁end｜>" : "<｜Assistant｜>");
                is_tool = 0;
                strbuf_puts(&b, c);
                strbuf_putn(&b, eos, el);
            }
        } else if (!strcmp(m->role, "tool")) {
            is_tool = 1;
            strbuf_puts(&b, output_first ? "<｜tool▁outputs▁begin｜><｜tool▁output▁begin｜>" : "\n<｜tool▁output▁begin｜>");
            output_first = 0;
            strbuf_puts(&b, m->content);
            strbuf_puts(&b, "<｜tool▁output▁end｜>");
        } else {
            mem_free(b.p);
            return err_set(e, MR_EINVAL, "chat message %zu: role \"%.40s\": expected system, user, assistant or tool",
                           i, m->role);
        }
    }
    if (is_tool) strbuf_puts(&b, "<｜tool▁outputs▁end｜>");
    if (add_generation_prompt && !is_tool) strbuf_puts(&b, fmt == TOK_CHAT_R1 ? "<｜Assistant｜><think>\n" : "<｜Assistant｜>");
    if (b.oom) {
        mem_free(b.p);
        return err_set(e, MR_ENOMEM, "out of memory rendering a chat");
    }
    *text = b.p;
    return 0;
}

int tok_template_render(const char *tmpl, const char *system, const char *prompt, const char *completion,
                        char **text, size_t *completion_at, mr_err *e) {
    *text = NULL;
    strbuf b = {0};
    size_t at = (size_t)-1;
    strbuf_putn(&b, "", 0);
    for (const char *p = tmpl; *p;) {
        if ((p[0] == '{' && p[1] == '{') || (p[0] == '}' && p[1] == '}')) {
            strbuf_putn(&b, p, 1);
            p += 2;
            continue;
        }
        if (*p != '{') {
            const char *q = p;
            while (*q && *q != '{' && !(q[0] == '}' && q[1] == '}')) q++;
            strbuf_putn(&b, p, (size_t)(q - p));
            p = q;
            continue;
        }
        const char *close = strchr(p, '}');
        size_t nl = close ? (size_t)(close - p - 1) : 0;
        if (close && nl == 6 && !strncmp(p + 1, "system", 6)) strbuf_puts(&b, system);
        else if (close && nl == 6 && !strncmp(p + 1, "prompt", 6)) strbuf_puts(&b, prompt);
        else if (close && nl == 10 && !strncmp(p + 1, "completion", 10)) {
            if (at == (size_t)-1) at = b.n;
            strbuf_puts(&b, completion);
        } else {
            mem_free(b.p);
            return err_set(e, MR_EINVAL,
                           "template \"%.60s\": unknown placeholder \"%.*s\" at byte %zu (expected {system}, {prompt} "
                           "or {completion}; write {{ for a literal brace)",
                           tmpl, close ? (int)(nl + 2) : (int)strlen(p), p, (size_t)(p - tmpl));
        }
        p = close + 1;
    }
    if (b.oom) {
        mem_free(b.p);
        return err_set(e, MR_ENOMEM, "out of memory rendering a template");
    }
    *text = b.p;
    if (completion_at) *completion_at = at == (size_t)-1 ? b.n : at;
    return 0;
}
