/* strbuf.c: the growable byte buffer of strbuf.h. */
#include "core/strbuf.h"

#include <stdarg.h>
#include <stdio.h>
#include <string.h>

#include "core/mem.h"

void strbuf_putn(strbuf *b, const char *s, size_t n) {
    size_t need;
    if (b->oom) return;
    if (size_add(b->n, n, &need) || size_add(need, 1, &need)) {
        b->oom = 1;
        return;
    }
    if (need > b->cap) {
        size_t cap = b->cap ? b->cap : 256;
        while (cap < need) cap *= 2;
        char *p = mem_realloc(b->p, cap);
        if (!p) {
            b->oom = 1;
            return;
        }
        b->p = p;
        b->cap = cap;
    }
    memcpy(b->p + b->n, s, n);
    b->n += n;
    b->p[b->n] = '\0';
}

void strbuf_puts(strbuf *b, const char *s) {
    if (s) strbuf_putn(b, s, strlen(s));
}

void strbuf_printf(strbuf *b, const char *fmt, ...) {
    char tmp[512];
    va_list ap;
    va_start(ap, fmt);
    int k = vsnprintf(tmp, sizeof tmp, fmt, ap);
    va_end(ap);
    if (k < 0) {
        b->oom = 1;
        return;
    }
    if ((size_t)k < sizeof tmp) {
        strbuf_putn(b, tmp, (size_t)k);
        return;
    }
    char *big = mem_alloc((size_t)k + 1); /* a long piece: format it again, whole */
    if (!big) {
        b->oom = 1;
        return;
    }
    va_start(ap, fmt);
    vsnprintf(big, (size_t)k + 1, fmt, ap);
    va_end(ap);
    strbuf_putn(b, big, (size_t)k);
    mem_free(big);
}

void strbuf_json_str(strbuf *b, const char *s) {
    strbuf_putn(b, "\"", 1);
    for (const unsigned char *c = (const unsigned char *)s; *c; c++) {
        if (*c == '"' || *c == '\\') {
            char esc[2] = {'\\', (char)*c};
            strbuf_putn(b, esc, 2);
        } else if (*c < 0x20) {
            strbuf_printf(b, "\\u%04x", *c);
        } else {
            strbuf_putn(b, (const char *)c, 1);
        }
    }
    strbuf_putn(b, "\"", 1);
}
