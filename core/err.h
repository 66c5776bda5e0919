/* err.h: status codes and the error context every library call writes into.
 * Library code never exits: it returns an int status (0 ok, negative = kind) and leaves a human message
 * naming the file, line or key, what was expected and what was found (STYLE.md "Errors"). Only main exits. */
#ifndef MOERL_ERR_H
#define MOERL_ERR_H

#include <stddef.h>

#ifdef __cplusplus
extern "C" {
#endif

enum {
    MR_OK = 0,
    MR_EINVAL = -1,    /* bad argument or bad user input (recipe, CLI) */
    MR_EIO = -2,       /* open/read/write/rename failed */
    MR_ENOMEM = -3,    /* allocation failed */
    MR_EFORMAT = -4,   /* malformed file: JSON, YAML, safetensors, tokenizer */
    MR_ERANGE = -5,    /* a value outside its allowed range */
    MR_EDB = -6,       /* SQLite */
    MR_EDEVICE = -7,   /* CUDA, cuBLAS, NCCL, no device */
    MR_ENOTFOUND = -8, /* a named thing (tensor, run, key) does not exist */
    MR_EINTERNAL = -9  /* a bug: should not happen */
};

typedef struct mr_err {
    int code;
    char msg[2048];
} mr_err;

/* Records code and a printf-style message in e (e may be NULL) and returns code. */
int err_set(mr_err *e, int code, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
/* Prepends "prefix: " to the message already in e (adds context as an error travels up); returns e->code. */
int err_prefix(mr_err *e, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
void err_clear(mr_err *e);
/* A short name for a status code ("invalid input", "I/O error", ...). */
const char *err_name(int code);

#ifdef __cplusplus
}
#endif

#endif
