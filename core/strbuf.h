/* strbuf.h: a growable, always NUL-terminated byte buffer whose allocation failure is sticky — append freely,
 * check oom once at the end (and free p either way). Zero-initialize to start: strbuf b = {0}. */
#ifndef MOERL_CORE_STRBUF_H
#define MOERL_CORE_STRBUF_H

#include <stddef.h>

typedef struct strbuf {
    char *p; /* NULL until the first append */
    size_t n, cap;
    int oom; /* an allocation (or a size) failed: later appends do nothing */
} strbuf;

void strbuf_putn(strbuf *b, const char *s, size_t n);
void strbuf_puts(strbuf *b, const char *s); /* NULL appends nothing */
void strbuf_printf(strbuf *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
/* A JSON string literal: quotes and backslashes escaped, control bytes as \u00XX, other bytes (UTF-8) verbatim. */
void strbuf_json_str(strbuf *b, const char *s);

#endif
