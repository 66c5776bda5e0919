/* mem.c: allocator wrappers with failure injection (see mem.h). */
#include "core/mem.h"

#include <stdlib.h>
#include <sys/mman.h>
#include <string.h>

static _Thread_local long fail_countdown = 0; /* per thread, so parallel tests do not interfere */
static _Thread_local long injected = 0;

void mem_fail_after(long n) { fail_countdown = n > 0 ? n : 0; }
long mem_injected_failures(void) { return injected; }

static int should_fail(void) {
    if (fail_countdown <= 0) return 0;
    if (--fail_countdown == 0) {
        injected++;
        return 1;
    }
    return 0;
}

void *mem_alloc(size_t n) {
    if (should_fail()) return NULL;
    return malloc(n ? n : 1);
}

void *mem_calloc(size_t count, size_t size) {
    if (should_fail()) return NULL;
    return calloc(count ? count : 1, size ? size : 1);
}

void *mem_realloc(void *p, size_t n) {
    if (should_fail()) return NULL;
    return realloc(p, n ? n : 1);
}

void mem_free(void *p) { free(p); }

char *mem_strndup(const char *s, size_t n) {
    size_t len = strnlen(s, n);
    char *d = mem_alloc(len + 1);
    if (!d) return NULL;
    memcpy(d, s, len);
    d[len] = '\0';
    return d;
}

char *mem_strdup(const char *s) { return mem_strndup(s, strlen(s)); }

/* From this size on, a buffer is aligned to and rounded up to 2 MiB and asks for transparent huge pages: weights,
 * gradients, optimizer state, activations and KV caches are streamed whole, and with 4 KiB pages every 64 cache
 * lines cost a TLB miss (a two-level page walk under a hypervisor) and every first touch a page fault. */
#define HUGE_MIN ((size_t)4 << 20)
#define HUGE_PAGE ((size_t)2 << 20)

void *mem_alloc_aligned(size_t n) {
    if (should_fail()) return NULL;
    void *p = NULL;
    const size_t align = n >= HUGE_MIN ? HUGE_PAGE : 64;
    size_t rounded = (n + align - 1) & ~(align - 1);
    if (rounded < n) return NULL;
    if (posix_memalign(&p, align, rounded ? rounded : 64) != 0) return NULL;
#ifdef MADV_HUGEPAGE
    if (align == HUGE_PAGE) (void)madvise(p, rounded, MADV_HUGEPAGE); /* a hint: without THP nothing changes */
#endif
    return p;
}

void mem_free_aligned(void *p) { free(p); }
