/* toolcall.c: a tool call in the completion against the row's expected call, scored as the "Tool Calling
 * Accuracy" rubric: 1.0 exact (the same JSON, whitespace aside), 0.8 semantically equal (same tool, equivalent
 * arguments: key order, number spelling (1 / 1.0 / 1e0), string padding, "5" for 5 from XML or YAML), 0.3 the
 * right tool with wrong arguments, 0.0 a wrong tool or no call. A row with `schema` and no expected call scores
 * a structured output instead: 1.0 when the completion's JSON validates (a subset of JSON Schema: type,
 * required, properties, enum, items), 0.0 otherwise.
 *
 * The one idea: whatever the syntax (JSON, <tool_call> JSON, XML <invoke>/<name>, YAML-ish lines), a call is
 * read into one cJSON shape {name, arguments}, and the comparison happens there. */
#include <ctype.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/mem.h"
#include "rewards/reward.h"

enum { TF_AUTO, TF_JSON, TF_XML, TF_YAML };

typedef struct {
    int format;
    char expected_field[128];
} tool_impl;

/* ---- reading calls ----------------------------------------------------------------------------------- */

/* {name, arguments} out of the common JSON shapes: {name, arguments|parameters|args}, {function: {...}},
 * {tool, ...}; arguments given as a JSON string are parsed. Returns a new object or NULL. */
static cJSON *normalize_call(const cJSON *j) {
    if (!cJSON_IsObject(j)) return NULL;
    const cJSON *fn = cJSON_GetObjectItemCaseSensitive(j, "function");
    if (cJSON_IsObject(fn)) j = fn;
    const cJSON *name = cJSON_GetObjectItemCaseSensitive(j, "name");
    if (!cJSON_IsString(name)) name = cJSON_GetObjectItemCaseSensitive(j, "tool");
    if (!cJSON_IsString(name)) return NULL;
    const cJSON *args = cJSON_GetObjectItemCaseSensitive(j, "arguments");
    if (!args) args = cJSON_GetObjectItemCaseSensitive(j, "parameters");
    if (!args) args = cJSON_GetObjectItemCaseSensitive(j, "args");
    cJSON *out = cJSON_CreateObject();
    if (!out) return NULL;
    cJSON_AddStringToObject(out, "name", name->valuestring);
    cJSON *a = NULL;
    if (cJSON_IsString(args)) a = cJSON_Parse(args->valuestring);
    else if (args) a = cJSON_Duplicate(args, 1);
    if (!a) a = cJSON_CreateObject();
    cJSON_AddItemToObject(out, "arguments", a);
    return out;
}

/* Removes whitespace outside strings (the "exact" comparison ignores layout only). */
static char *minify(const char *s, size_t n) {
    char *o = mem_alloc(n + 1);
    if (!o) return NULL;
    size_t k = 0;
    int in_str = 0;
    for (size_t i = 0; i < n; i++) {
        char ch = s[i];
        if (in_str) {
            o[k++] = ch;
            if (ch == '\\' && i + 1 < n) o[k++] = s[++i];
            else if (ch == '"') in_str = 0;
        } else if (ch == '"') {
            in_str = 1;
            o[k++] = ch;
        } else if (!isspace((unsigned char)ch)) {
            o[k++] = ch;
        }
    }
    o[k] = '\0';
    return o;
}

/* The first JSON object in text that reads as a call; *raw gets its minified text. */
static cJSON *find_json_call(const char *text, char **raw) {
    const char *start = text;
    const char *tag = strstr(text, "<tool_call>");
    if (tag) start = tag + strlen("<tool_call>");
    for (const char *p = strchr(start, '{'); p; p = strchr(p + 1, '{')) {
        const char *end = NULL;
        cJSON *j = cJSON_ParseWithOpts(p, &end, 0);
        if (!j) continue;
        cJSON *call = normalize_call(j);
        if (call) {
            if (raw) *raw = minify(p, (size_t)(end - p));
            cJSON_Delete(j);
            return call;
        }
        cJSON_Delete(j);
    }
    return NULL;
}

/* A scalar from XML or YAML text: a JSON literal when it reads as one (5, true, "x", [1,2]), else the string. */
static cJSON *scalar_value(const char *s, size_t n) {
    while (n > 0 && isspace((unsigned char)*s)) s++, n--;
    while (n > 0 && isspace((unsigned char)s[n - 1])) n--;
    char *t = mem_strndup(s, n);
    if (!t) return NULL;
    cJSON *v = NULL;
    if (n > 0 && (isdigit((unsigned char)t[0]) || t[0] == '-' || t[0] == '[' || t[0] == '{' || t[0] == '"' ||
                  !strcmp(t, "true") || !strcmp(t, "false") || !strcmp(t, "null")))
        v = cJSON_Parse(t);
    if (!v && n >= 2 && (t[0] == '\'' || t[0] == '"') && t[n - 1] == t[0]) {
        t[n - 1] = '\0';
        v = cJSON_CreateString(t + 1);
    }
    if (!v) v = cJSON_CreateString(t);
    mem_free(t);
    return v;
}

static const char *tag_span(const char *s, const char *open, const char *close, const char **end) {
    const char *a = strstr(s, open);
    if (!a) return NULL;
    a += strlen(open);
    const char *b = strstr(a, close);
    if (!b) return NULL;
    *end = b;
    return a;
}

/* <invoke name="x"><parameter name="k">v</parameter>...</invoke>, or <tool_call><name>x</name>
 * <arguments><k>v</k>...</arguments></tool_call>. */
static cJSON *find_xml_call(const char *text) {
    cJSON *call = NULL, *args = NULL;
    const char *inv = strstr(text, "<invoke name=\"");
    if (inv) {
        const char *n0 = inv + strlen("<invoke name=\""), *n1 = strchr(n0, '"');
        if (!n1) return NULL;
        call = cJSON_CreateObject();
        char *name = mem_strndup(n0, (size_t)(n1 - n0));
        if (!call || !name) goto oom;
        cJSON_AddStringToObject(call, "name", name);
        mem_free(name);
        args = cJSON_AddObjectToObject(call, "arguments");
        const char *stop = strstr(n1, "</invoke>");
        for (const char *p = strstr(n1, "<parameter name=\""); p && (!stop || p < stop);
             p = strstr(p + 1, "<parameter name=\"")) {
            const char *k0 = p + strlen("<parameter name=\""), *k1 = strchr(k0, '"');
            const char *v0 = k1 ? strchr(k1, '>') : NULL, *v1 = v0 ? strstr(v0, "</parameter>") : NULL;
            if (!v1) break;
            char *key = mem_strndup(k0, (size_t)(k1 - k0));
            cJSON *v = scalar_value(v0 + 1, (size_t)(v1 - v0 - 1));
            if (!key || !v) {
                mem_free(key);
                cJSON_Delete(v);
                goto oom;
            }
            cJSON_AddItemToObject(args, key, v);
            mem_free(key);
        }
        return call;
    }
    const char *end, *nm = tag_span(text, "<name>", "</name>", &end);
    if (!nm) return NULL;
    call = cJSON_CreateObject();
    char *name = mem_strndup(nm, (size_t)(end - nm));
    if (!call || !name) {
        mem_free(name);
        goto oom;
    }
    cJSON_AddStringToObject(call, "name", name);
    mem_free(name);
    args = cJSON_AddObjectToObject(call, "arguments");
    const char *aend, *a = tag_span(end, "<arguments>", "</arguments>", &aend);
    if (!a) a = tag_span(end, "<parameters>", "</parameters>", &aend);
    while (a && a < aend) {
        const char *o = strchr(a, '<');
        if (!o || o >= aend) break;
        const char *o1 = strchr(o, '>');
        if (!o1 || o1 >= aend || o[1] == '/') break;
        char key[128];
        snprintf(key, sizeof key, "%.*s", (int)(o1 - o - 1), o + 1);
        char close[140];
        snprintf(close, sizeof close, "</%s>", key);
        const char *c = strstr(o1, close);
        if (!c || c > aend) break;
        cJSON *v = scalar_value(o1 + 1, (size_t)(c - o1 - 1));
        if (!v) goto oom;
        cJSON_AddItemToObject(args, key, v);
        a = c + strlen(close);
    }
    return call;
oom:
    cJSON_Delete(call);
    return NULL;
}

/* name: x (or tool: / function:), then arguments: with indented "key: value" lines. */
static cJSON *find_yaml_call(const char *text) {
    cJSON *call = NULL, *args = NULL;
    int in_args = 0;
    for (const char *line = text; line && *line;) {
        const char *nl = strchr(line, '\n');
        size_t len = nl ? (size_t)(nl - line) : strlen(line);
        const char *p = line;
        int indent = 0;
        while (p < line + len && (*p == ' ' || *p == '\t' || *p == '-')) p++, indent++;
        const char *colon = memchr(p, ':', (size_t)(line + len - p));
        if (colon && colon > p) {
            size_t kl = (size_t)(colon - p);
            const char *v = colon + 1;
            size_t vl = (size_t)(line + len - v);
            if (!call && indent == 0 && ((kl == 4 && !strncmp(p, "name", 4)) || (kl == 4 && !strncmp(p, "tool", 4)) ||
                                         (kl == 8 && !strncmp(p, "function", 8)))) {
                cJSON *nv = scalar_value(v, vl);
                if (cJSON_IsString(nv) && nv->valuestring[0]) {
                    call = cJSON_CreateObject();
                    if (!call) {
                        cJSON_Delete(nv);
                        return NULL;
                    }
                    cJSON_AddItemToObject(call, "name", nv);
                    args = cJSON_AddObjectToObject(call, "arguments");
                } else {
                    cJSON_Delete(nv);
                }
            } else if (call && indent == 0 && ((kl == 9 && !strncmp(p, "arguments", 9)) ||
                                                (kl == 10 && !strncmp(p, "parameters", 10)))) {
                in_args = 1;
            } else if (call && in_args && indent > 0 && args) {
                char key[128];
                snprintf(key, sizeof key, "%.*s", (int)kl, p);
                cJSON *val = scalar_value(v, vl);
                if (val) cJSON_AddItemToObject(args, key, val);
            } else if (indent == 0) {
                in_args = 0;
            }
        }
        line = nl ? nl + 1 : NULL;
    }
    return call;
}

/* ---- comparing --------------------------------------------------------------------------------------- */

/* Equal as values: objects whatever the key order, numbers by value (a numeric string equals its number),
 * strings trimmed. */
static int json_equiv(const cJSON *a, const cJSON *b) {
    if (cJSON_IsNumber(a) && cJSON_IsString(b)) {
        const cJSON *t = a;
        a = b;
        b = t;
    }
    if (cJSON_IsString(a) && cJSON_IsNumber(b)) {
        char *end;
        double d = strtod(a->valuestring, &end);
        while (isspace((unsigned char)*end)) end++;
        return end != a->valuestring && *end == '\0' && d == b->valuedouble;
    }
    if ((a->type & 0xFF) != (b->type & 0xFF)) return 0;
    if (cJSON_IsNumber(a)) return a->valuedouble == b->valuedouble;
    if (cJSON_IsString(a)) {
        const char *x = a->valuestring, *y = b->valuestring;
        while (isspace((unsigned char)*x)) x++;
        while (isspace((unsigned char)*y)) y++;
        size_t nx = strlen(x), ny = strlen(y);
        while (nx && isspace((unsigned char)x[nx - 1])) nx--;
        while (ny && isspace((unsigned char)y[ny - 1])) ny--;
        return nx == ny && !memcmp(x, y, nx);
    }
    if (cJSON_IsArray(a)) {
        if (cJSON_GetArraySize(a) != cJSON_GetArraySize(b)) return 0;
        for (const cJSON *x = a->child, *y = b->child; x && y; x = x->next, y = y->next)
            if (!json_equiv(x, y)) return 0;
        return 1;
    }
    if (cJSON_IsObject(a)) {
        if (cJSON_GetArraySize(a) != cJSON_GetArraySize(b)) return 0;
        for (const cJSON *x = a->child; x; x = x->next) {
            const cJSON *y = cJSON_GetObjectItemCaseSensitive(b, x->string);
            if (!y || !json_equiv(x, y)) return 0;
        }
        return 1;
    }
    return 1; /* true, false, null of the same type */
}

/* ---- JSON Schema (subset) ---------------------------------------------------------------------------- */

static int type_ok(const cJSON *v, const char *t) {
    if (!strcmp(t, "object")) return cJSON_IsObject(v);
    if (!strcmp(t, "array")) return cJSON_IsArray(v);
    if (!strcmp(t, "string")) return cJSON_IsString(v);
    if (!strcmp(t, "number")) return cJSON_IsNumber(v);
    if (!strcmp(t, "integer")) return cJSON_IsNumber(v) && v->valuedouble == floor(v->valuedouble);
    if (!strcmp(t, "boolean")) return cJSON_IsBool(v);
    if (!strcmp(t, "null")) return cJSON_IsNull(v);
    return 0;
}

int toolcall_validate_schema(const cJSON *v, const cJSON *schema, const char *at, char *why, size_t cap) {
    if (!cJSON_IsObject(schema)) return 1;
    const cJSON *t = cJSON_GetObjectItemCaseSensitive(schema, "type");
    if (cJSON_IsString(t) && !type_ok(v, t->valuestring)) {
        snprintf(why, cap, "%s: expected %s", at, t->valuestring);
        return 0;
    }
    if (cJSON_IsArray(t)) {
        int any = 0;
        for (const cJSON *x = t->child; x; x = x->next) any |= cJSON_IsString(x) && type_ok(v, x->valuestring);
        if (!any) {
            snprintf(why, cap, "%s: wrong type", at);
            return 0;
        }
    }
    const cJSON *en = cJSON_GetObjectItemCaseSensitive(schema, "enum");
    if (cJSON_IsArray(en)) {
        int any = 0;
        for (const cJSON *x = en->child; x && !any; x = x->next) any = cJSON_Compare(v, x, 1);
        if (!any) {
            snprintf(why, cap, "%s: not one of the enum values", at);
            return 0;
        }
    }
    char sub[256];
    if (cJSON_IsObject(v)) {
        const cJSON *req = cJSON_GetObjectItemCaseSensitive(schema, "required");
        for (const cJSON *x = cJSON_IsArray(req) ? req->child : NULL; x; x = x->next)
            if (cJSON_IsString(x) && !cJSON_GetObjectItemCaseSensitive(v, x->valuestring)) {
                snprintf(why, cap, "%s: missing required '%s'", at, x->valuestring);
                return 0;
            }
        const cJSON *props = cJSON_GetObjectItemCaseSensitive(schema, "properties");
        for (const cJSON *pr = cJSON_IsObject(props) ? props->child : NULL; pr; pr = pr->next) {
            const cJSON *item = cJSON_GetObjectItemCaseSensitive(v, pr->string);
            if (!item) continue;
            snprintf(sub, sizeof sub, "%s.%s", at, pr->string);
            if (!toolcall_validate_schema(item, pr, sub, why, cap)) return 0;
        }
    }
    if (cJSON_IsArray(v)) {
        const cJSON *items = cJSON_GetObjectItemCaseSensitive(schema, "items");
        int i = 0;
        for (const cJSON *x = v->child; x && items; x = x->next, i++) {
            snprintf(sub, sizeof sub, "%s[%d]", at, i);
            if (!toolcall_validate_schema(x, items, sub, why, cap)) return 0;
        }
    }
    return 1;
}

/* ---- the plugin -------------------------------------------------------------------------------------- */

static int tool_init(reward_plugin *p, const recipe *r, const char *item, const char *dir, mr_err *e) {
    (void)dir;
    tool_impl *t = mem_calloc(1, sizeof *t);
    if (!t) return err_set(e, MR_ENOMEM, "out of memory");
    p->impl = t;
    char path[128];
    snprintf(path, sizeof path, "%s.toolcall.format", item);
    t->format = recipe_enum(r, path);
    if (t->format < 0) t->format = TF_AUTO;
    snprintf(path, sizeof path, "%s.toolcall.expected_field", item);
    snprintf(t->expected_field, sizeof t->expected_field, "%s", recipe_str(r, path));
    return 0;
}

cJSON *toolcall_parse(const char *text, int format, char **raw_json) {
    if (raw_json) *raw_json = NULL;
    cJSON *c = NULL;
    if (format == TF_AUTO || format == TF_JSON) c = find_json_call(text, raw_json);
    if (!c && (format == TF_AUTO || format == TF_XML)) c = find_xml_call(text);
    if (!c && (format == TF_AUTO || format == TF_YAML)) c = find_yaml_call(text);
    return c;
}

static void structured_score(const cJSON *schema, const char *text, reward_result *out) {
    const char *p = strchr(text, '{');
    const char *q = strchr(text, '[');
    if (!p || (q && q < p)) p = q;
    cJSON *v = p ? cJSON_ParseWithOpts(p, NULL, 0) : NULL;
    if (!v) {
        reward_result_set(out, REWARD_SCORE, 0.0, "no JSON output");
        return;
    }
    char why[256] = "";
    int ok = toolcall_validate_schema(v, schema, "$", why, sizeof why);
    reward_result_set(out, REWARD_SCORE, ok ? 1.0 : 0.0, "%s", why);
    cJSON_Delete(v);
}

static void tool_score(const reward_plugin *p, void *ws, const reward_sample *s, double deadline, reward_result *out,
                       int *discard) {
    (void)ws, (void)deadline, (void)discard;
    const tool_impl *t = p->impl;
    const cJSON *exp = s->row ? cJSON_GetObjectItemCaseSensitive(s->row, t->expected_field) : NULL;
    const char *text = s->completion ? s->completion : "";
    if (!exp || cJSON_IsNull(exp)) {
        const cJSON *schema = s->row ? cJSON_GetObjectItemCaseSensitive(s->row, "schema") : NULL;
        if (cJSON_IsObject(schema)) {
            structured_score(schema, text, out);
            return;
        }
        reward_result_set(out, REWARD_UNSCORABLE, 0, "the row has no '%s' call and no 'schema'", t->expected_field);
        return;
    }
    cJSON *parsed_exp = cJSON_IsString(exp) ? cJSON_Parse(exp->valuestring) : NULL;
    cJSON *want = normalize_call(parsed_exp ? parsed_exp : exp);
    char *want_raw = NULL;
    if (want) {
        if (cJSON_IsString(exp)) want_raw = minify(exp->valuestring, strlen(exp->valuestring));
        else {
            char *pr = cJSON_PrintUnformatted(exp);
            if (pr) want_raw = minify(pr, strlen(pr));
            cJSON_free(pr);
        }
    }
    cJSON_Delete(parsed_exp);
    if (!want) {
        mem_free(want_raw);
        reward_result_set(out, REWARD_ERROR, 0, "the row's '%s' is not a call {name, arguments}", t->expected_field);
        return;
    }
    char *raw = NULL;
    cJSON *got = toolcall_parse(text, t->format, &raw);
    if (!got) {
        reward_result_set(out, REWARD_SCORE, 0.0, "no tool call");
    } else {
        const char *gn = cJSON_GetObjectItemCaseSensitive(got, "name")->valuestring;
        const char *wn = cJSON_GetObjectItemCaseSensitive(want, "name")->valuestring;
        if (strcmp(gn, wn) != 0) {
            reward_result_set(out, REWARD_SCORE, 0.0, "wrong tool '%.60s' (expected '%.60s')", gn, wn);
        } else if (raw && want_raw && !strcmp(raw, want_raw)) {
            reward_result_set(out, REWARD_SCORE, 1.0, "exact");
        } else if (json_equiv(cJSON_GetObjectItemCaseSensitive(got, "arguments"),
                              cJSON_GetObjectItemCaseSensitive(want, "arguments"))) {
            reward_result_set(out, REWARD_SCORE, 0.8, "equivalent arguments");
        } else {
            reward_result_set(out, REWARD_SCORE, 0.3, "right tool, wrong arguments");
        }
    }
    cJSON_Delete(got);
    cJSON_Delete(want);
    mem_free(raw);
    mem_free(want_raw);
}

static void tool_free(reward_plugin *p) { mem_free(p->impl); }

const reward_plugin_ops reward_toolcall_ops = {
    .kind = "toolcall", .init = tool_init, .score = tool_score, .free = tool_free};
