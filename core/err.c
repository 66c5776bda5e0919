/* err.c: the error context (see err.h). */
#include "core/err.h"

#include <stdarg.h>
#include <stdio.h>
#include <string.h>

int err_set(mr_err *e, int code, const char *fmt, ...) {
    if (!e) return code;
    e->code = code;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(e->msg, sizeof e->msg, fmt, ap);
    va_end(ap);
    return code;
}

int err_prefix(mr_err *e, const char *fmt, ...) {
    if (!e) return MR_EINTERNAL;
    char pre[512], old[sizeof e->msg];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(pre, sizeof pre, fmt, ap);
    va_end(ap);
    memcpy(old, e->msg, sizeof old);
    size_t n = strlen(pre);
    if (n > sizeof e->msg - 3) n = sizeof e->msg - 3;
    memcpy(e->msg, pre, n);
    e->msg[n] = ':';
    e->msg[n + 1] = ' ';
    size_t rest = sizeof e->msg - n - 3;
    size_t m = strnlen(old, rest);
    memcpy(e->msg + n + 2, old, m);
    e->msg[n + 2 + m] = '\0';
    return e->code;
}

void err_clear(mr_err *e) {
    if (!e) return;
    e->code = MR_OK;
    e->msg[0] = '\0';
}

const char *err_name(int code) {
    switch (code) {
    case MR_OK: return "ok";
    case MR_EINVAL: return "invalid input";
    case MR_EIO: return "I/O error";
    case MR_ENOMEM: return "out of memory";
    case MR_EFORMAT: return "malformed file";
    case MR_ERANGE: return "value out of range";
    case MR_EDB: return "run store error";
    case MR_EDEVICE: return "device error";
    case MR_ENOTFOUND: return "not found";
    default: return "internal error";
    }
}
