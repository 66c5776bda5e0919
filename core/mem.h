/* mem.h: the one allocator of libmoerl, with overflow-checked sizes and a failure-injection hook for tests
 * (Lua's allocfailnext, SQLite's fault tests): every error path that handles a failed allocation can be run. */
#ifndef MOERL_MEM_H
#define MOERL_MEM_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

void *mem_alloc(size_t n);               /* NULL on failure (or on an injected failure) */
void *mem_calloc(size_t count, size_t size);
void *mem_realloc(void *p, size_t n);
void mem_free(void *p);                  /* accepts NULL */
char *mem_strdup(const char *s);
char *mem_strndup(const char *s, size_t n);
/* 64-byte aligned allocation for tensors; free with mem_free_aligned. */
void *mem_alloc_aligned(size_t n);
void mem_free_aligned(void *p);

/* Test hook: the n-th allocation from now (1 = the next one) fails; n <= 0 disables injection. */
void mem_fail_after(long n);
/* Number of injected failures so far (tests assert an injection actually happened). */
long mem_injected_failures(void);

/* Overflow-checked size arithmetic: return 0 and store the result, or -1 on overflow. */
static inline int size_mul(size_t a, size_t b, size_t *out) {
    if (a != 0 && b > SIZE_MAX / a) return -1;
    *out = a * b;
    return 0;
}
static inline int size_add(size_t a, size_t b, size_t *out) {
    if (b > SIZE_MAX - a) return -1;
    *out = a + b;
    return 0;
}

#ifdef __cplusplus
}
#endif

#endif
