/* jsonl.c: the JSONL dataset reader (see jsonl.h). One getline per line (any length), the line's own bytes
 * checked (NUL, UTF-8) before cJSON sees them, so every error can point at file:line:col. */
#include "data/jsonl.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/types.h>

#include "core/mem.h"

const char *jsonl_type_name(const cJSON *v) {
    if (!v) return "nothing";
    if (cJSON_IsArray(v)) return "an array";
    if (cJSON_IsObject(v)) return "an object";
    if (cJSON_IsString(v)) return "a string";
    if (cJSON_IsNumber(v)) return "a number";
    if (cJSON_IsTrue(v)) return "true";
    if (cJSON_IsFalse(v)) return "false";
    if (cJSON_IsNull(v)) return "null";
    return "an invalid value";
}

/* Length of the valid UTF-8 sequence at s (n bytes left), or 0 when it is invalid (overlong forms, surrogates
 * and code points above U+10FFFF included). */
static size_t utf8_len(const unsigned char *s, size_t n) {
    unsigned c = s[0];
    if (c < 0x80) return 1;
    size_t k;
    unsigned cp, min;
    if ((c & 0xE0) == 0xC0) k = 2, cp = c & 0x1F, min = 0x80;
    else if ((c & 0xF0) == 0xE0) k = 3, cp = c & 0x0F, min = 0x800;
    else if ((c & 0xF8) == 0xF0) k = 4, cp = c & 0x07, min = 0x10000;
    else return 0;
    if (k > n) return 0;
    for (size_t i = 1; i < k; i++) {
        if ((s[i] & 0xC0) != 0x80) return 0;
        cp = (cp << 6) | (s[i] & 0x3F);
    }
    if (cp < min || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF)) return 0;
    return k;
}

/* A short printable excerpt of text at p for messages: at most 24 bytes, quotes and controls escaped. */
static void excerpt(const char *p, const char *end, char *out, size_t cap) {
    size_t o = 0;
    for (int i = 0; p < end && i < 24 && o + 5 < cap; i++, p++) {
        unsigned char c = (unsigned char)*p;
        if (c == '"' || c == '\\') {
            out[o++] = '\\';
            out[o++] = (char)c;
        } else if (c < 0x20) {
            o += (size_t)snprintf(out + o, cap - o, "\\x%02x", c);
        } else {
            out[o++] = (char)c;
        }
    }
    if (p < end && o + 4 < cap) {
        memcpy(out + o, "...", 3);
        o += 3;
    }
    out[o] = '\0';
}

/* A BOM may start any line, not only the first: files concatenated with cat keep theirs. */
int jsonl_parse_line(const char *text, size_t len, const char *path, long line, cJSON **row, mr_err *e) {
    *row = NULL;
    if (len >= 3 && !memcmp(text, "\xEF\xBB\xBF", 3)) text += 3, len -= 3;
    while (len && (text[len - 1] == '\n' || text[len - 1] == '\r')) len--;
    int blank = 1;
    for (size_t i = 0; i < len;) {
        unsigned char c = (unsigned char)text[i];
        if (c == 0) return err_set(e, MR_EFORMAT, "%s:%ld:%zu: NUL byte in the line", path, line, i + 1);
        size_t k = utf8_len((const unsigned char *)text + i, len - i);
        if (!k) return err_set(e, MR_EFORMAT, "%s:%ld:%zu: invalid UTF-8 (byte 0x%02x)", path, line, i + 1, c);
        if (c != ' ' && c != '\t' && c != '\r') blank = 0;
        i += k;
    }
    if (blank) return 0;
    const char *end = NULL;
    cJSON *v = cJSON_ParseWithLengthOpts(text, len, &end, 0);
    if (!v) {
        /* cJSON leaves end at the failing byte (at the last byte when the line ended too early). */
        size_t col = end && end >= text && end <= text + len ? (size_t)(end - text) : 0;
        if (col >= len) col = len ? len - 1 : 0;
        /* cJSON reports a bad object key one byte late ({'a': 1} -> at the a): step back onto the byte that
         * should have opened the key when it follows '{' or ','. */
        if (col > 0 && text[col - 1] != '"' && text[col - 1] != ' ' && text[col - 1] != '\t') {
            size_t q = col - 1;
            while (q > 0 && (text[q - 1] == ' ' || text[q - 1] == '\t')) q--;
            if (q > 0 && (text[q - 1] == '{' || text[q - 1] == ',')) col--;
        }
        char ex[128];
        excerpt(text + col, text + len, ex, sizeof ex);
        return err_set(e, MR_EFORMAT, "%s:%ld:%zu: malformed JSON near \"%s\"", path, line, col + 1, ex);
    }
    while (end < text + len && (*end == ' ' || *end == '\t' || *end == '\r')) end++;
    if (end < text + len) {
        char ex[128];
        excerpt(end, text + len, ex, sizeof ex);
        cJSON_Delete(v);
        return err_set(e, MR_EFORMAT, "%s:%ld:%zu: unexpected text after the JSON value: \"%s\" (one value a line)",
                       path, line, (size_t)(end - text) + 1, ex);
    }
    *row = v;
    return 1;
}

int jsonl_open(jsonl_reader *r, const char *path, mr_err *e) {
    memset(r, 0, sizeof *r);
    r->path = mem_strdup(path);
    if (!r->path) return err_set(e, MR_ENOMEM, "out of memory");
    r->f = fopen(path, "rb");
    if (!r->f) {
        int saved = errno;
        jsonl_close(r);
        return err_set(e, MR_EIO, "%s: cannot open: %s", path, strerror(saved));
    }
    return MR_OK;
}

int jsonl_next(jsonl_reader *r, cJSON **row, long *line, mr_err *e) {
    *row = NULL;
    for (;;) {
        errno = 0;
        ssize_t n = getline(&r->buf, &r->cap, r->f);
        if (n < 0) {
            if (ferror(r->f)) return err_set(e, MR_EIO, "%s:%ld: read error: %s", r->path, r->line + 1,
                                             strerror(errno ? errno : EIO));
            if (errno == ENOMEM) return err_set(e, MR_ENOMEM, "%s:%ld: line too long for memory", r->path, r->line + 1);
            return 0;
        }
        r->line++;
        int st = jsonl_parse_line(r->buf, (size_t)n, r->path, r->line, row, e);
        if (st == 0) continue;
        if (line) *line = r->line;
        return st;
    }
}

void jsonl_close(jsonl_reader *r) {
    if (!r) return;
    if (r->f) fclose(r->f);
    free(r->buf); /* getline's buffer comes from malloc */
    mem_free(r->path);
    memset(r, 0, sizeof *r);
}

static const char *const roles[] = {"system", "user", "assistant", "tool", NULL};

static int check_messages(const cJSON *m, int need, const char *path, long line, mr_err *e) {
    if (!cJSON_IsArray(m))
        return err_set(e, MR_EFORMAT, "%s:%ld: \"messages\" must be an array of {role, content}, got %s", path, line,
                       jsonl_type_name(m));
    int i = 0, assistant = 0;
    const cJSON *msg;
    cJSON_ArrayForEach(msg, m) {
        if (!cJSON_IsObject(msg))
            return err_set(e, MR_EFORMAT, "%s:%ld: \"messages\"[%d] must be an object {role, content}, got %s", path,
                           line, i, jsonl_type_name(msg));
        const cJSON *role = cJSON_GetObjectItemCaseSensitive(msg, "role");
        const cJSON *content = cJSON_GetObjectItemCaseSensitive(msg, "content");
        if (!cJSON_IsString(role))
            return err_set(e, MR_EFORMAT, "%s:%ld: \"messages\"[%d].role must be a string, got %s", path, line, i,
                           jsonl_type_name(role));
        int known = 0;
        for (int k = 0; roles[k]; k++) known |= !strcmp(role->valuestring, roles[k]);
        if (!known)
            return err_set(e, MR_EFORMAT,
                           "%s:%ld: \"messages\"[%d].role must be one of system, user, assistant, tool, got \"%.40s\"",
                           path, line, i, role->valuestring);
        if (!cJSON_IsString(content))
            return err_set(e, MR_EFORMAT, "%s:%ld: \"messages\"[%d].content must be a string, got %s", path, line, i,
                           jsonl_type_name(content));
        assistant |= !strcmp(role->valuestring, "assistant");
        i++;
    }
    if (i == 0) return err_set(e, MR_EFORMAT, "%s:%ld: \"messages\" is empty", path, line);
    if (need == JSONL_COMPLETION && !assistant)
        return err_set(e, MR_EFORMAT, "%s:%ld: \"messages\" has no assistant message to learn from", path, line);
    return MR_OK;
}

int jsonl_check_row(const cJSON *row, int need, const char *path, long line, mr_err *e) {
    const char *want = need == JSONL_COMPLETION ? "a JSON object with \"prompt\" and \"completion\" or \"messages\""
                       : need == JSONL_PROMPT   ? "a JSON object with \"prompt\" or \"messages\""
                                                : "a JSON object";
    if (!cJSON_IsObject(row))
        return err_set(e, MR_EFORMAT, "%s:%ld: expected %s, got %s", path, line, want, jsonl_type_name(row));
    if (need == JSONL_ANY) return MR_OK;
    const cJSON *m = cJSON_GetObjectItemCaseSensitive(row, "messages");
    const cJSON *p = cJSON_GetObjectItemCaseSensitive(row, "prompt");
    const cJSON *c = cJSON_GetObjectItemCaseSensitive(row, "completion");
    if (m && (p || c))
        return err_set(e, MR_EFORMAT, "%s:%ld: both \"messages\" and \"%s\": a row has one or the other", path, line,
                       p ? "prompt" : "completion");
    if (m) return check_messages(m, need, path, line, e);
    if (!p && !c) {
        char keys[256] = "";
        size_t o = 0;
        int k = 0;
        const cJSON *it;
        cJSON_ArrayForEach(it, row) {
            if (k == 4) {
                o += (size_t)snprintf(keys + o, sizeof keys - o, ", ...");
                break;
            }
            int w = snprintf(keys + o, sizeof keys - o, "%s\"%.40s\"", k ? ", " : "", it->string);
            if (w < 0 || (size_t)w >= sizeof keys - o) break;
            o += (size_t)w;
            k++;
        }
        return err_set(e, MR_EFORMAT, "%s:%ld: expected %s, got an object with %s%s", path, line, want,
                       k ? "keys " : "no keys", keys);
    }
    if (!p) return err_set(e, MR_EFORMAT, "%s:%ld: \"completion\" without \"prompt\"", path, line);
    if (!cJSON_IsString(p))
        return err_set(e, MR_EFORMAT, "%s:%ld: \"prompt\" must be a string, got %s", path, line, jsonl_type_name(p));
    if (!c && need == JSONL_COMPLETION)
        return err_set(e, MR_EFORMAT, "%s:%ld: \"prompt\" without \"completion\" (an SFT row needs both)", path, line);
    if (c && !cJSON_IsString(c))
        return err_set(e, MR_EFORMAT, "%s:%ld: \"completion\" must be a string, got %s", path, line,
                       jsonl_type_name(c));
    return MR_OK;
}

void jsonl_rows_free(jsonl_rows *d) {
    if (!d) return;
    for (size_t i = 0; i < d->n; i++) cJSON_Delete(d->rows[i]);
    mem_free(d->rows);
    mem_free(d->lines);
    memset(d, 0, sizeof *d);
}

static int rows_push(jsonl_rows *d, cJSON *row, long line) {
    if (d->n == d->cap) {
        size_t cap = d->cap ? d->cap * 2 : 256, b1, b2;
        if (size_mul(cap, sizeof *d->rows, &b1) || size_mul(cap, sizeof *d->lines, &b2)) return MR_ENOMEM;
        cJSON **rows = mem_realloc(d->rows, b1);
        if (!rows) return MR_ENOMEM;
        d->rows = rows;
        long *lines = mem_realloc(d->lines, b2);
        if (!lines) return MR_ENOMEM;
        d->lines = lines;
        d->cap = cap;
    }
    d->rows[d->n] = row;
    d->lines[d->n++] = line;
    return MR_OK;
}

int jsonl_read_all(const char *path, int need, jsonl_rows *out, mr_err *e) {
    memset(out, 0, sizeof *out);
    jsonl_reader r;
    int st = jsonl_open(&r, path, e);
    if (st) return st;
    for (;;) {
        cJSON *row;
        long line;
        st = jsonl_next(&r, &row, &line, e);
        if (st <= 0) break;
        st = jsonl_check_row(row, need, path, line, e);
        if (!st && rows_push(out, row, line)) st = err_set(e, MR_ENOMEM, "%s:%ld: out of memory", path, line);
        if (st) {
            cJSON_Delete(row);
            break;
        }
    }
    jsonl_close(&r);
    if (st < 0) jsonl_rows_free(out);
    return st < 0 ? st : MR_OK;
}
