/* gpu_common.h: what the gpu-labelled tests share: the CUDA backend fetched per test, seeded random host data,
 * device buffers (poisoned with NaN before a kernel writes them), and the norm-wise comparison with the CPU.
 * Included by tests/gpu_*.c; gpu_test_main is their main (exit 77, ctest's Skipped, without a CUDA build or device). */
#ifndef MOERL_TESTS_GPU_COMMON_H
#define MOERL_TESTS_GPU_COMMON_H

#include <criterion/criterion.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "core/rng.h"
#include "kernels/backend.h"

#ifdef MOERL_HAVE_CUDA
#include "kernels/cuda/dense_cuda.h"

static const backend *gpu;
static uint64_t seed0;

/* Criterion runs each test in a fresh worker process that does NOT go through main (Criterion 2.4: a custom main
 * runs only in the parent): the backend and the seed (main puts it in the environment) are fetched there again,
 * as the suites' .init. */
static inline void gpu_setup(void) {
    mr_err e = {0};
    cr_assert_eq(backend_get("cuda", &gpu, &e), MR_OK, "%s", e.msg);
    const char *s = getenv("MOERL_TEST_SEED");
    seed0 = s ? strtoull(s, NULL, 10) : 0;
}

static inline float *hrand(size_t n, uint64_t stream, float std) {
    float *h = malloc((n ? n : 1) * sizeof *h);
    cr_assert_not_null(h);
    rng_fill_normal(h, n, 0.0f, std, seed0, stream);
    return h;
}

static inline float *hcopy(const float *h, size_t n) {
    float *c = malloc((n ? n : 1) * sizeof *c);
    cr_assert_not_null(c);
    memcpy(c, h, n * sizeof *c);
    return c;
}

static inline void *dput(const void *h, size_t bytes) {
    mr_err e = {0};
    void *d = gpu->alloc(bytes ? bytes : 1);
    cr_assert_not_null(d, "device alloc of %zu bytes", bytes);
    if (bytes) cr_assert_eq(gpu->to_device(d, h, bytes, &e), MR_OK, "%s", e.msg);
    return d;
}

static inline void poison(void *d, size_t n) { /* n floats (or int32: all bits set = NaN / -1) */
    mr_err e = {0};
    float *h = malloc((n ? n : 1) * sizeof *h);
    for (size_t i = 0; i < n; i++) h[i] = NAN;
    if (n) cr_assert_eq(gpu->to_device(d, h, n * sizeof *h, &e), MR_OK, "%s", e.msg);
    free(h);
}

static inline float *dpoison(size_t n) {
    float *d = gpu->alloc((n ? n : 1) * sizeof(float));
    cr_assert_not_null(d);
    poison(d, n);
    return d;
}

static inline void sync_ok(void) {
    mr_err e = {0};
    cr_assert_eq(gpu->sync(&e), MR_OK, "%s", e.msg);
}

static inline void *dget_bytes(const void *d, size_t bytes) {
    mr_err e = {0};
    void *h = malloc(bytes ? bytes : 1);
    sync_ok();
    if (bytes) cr_assert_eq(gpu->to_host(h, d, bytes, &e), MR_OK, "%s", e.msg);
    return h;
}

static inline float *dget(const float *d, size_t n) { return dget_bytes(d, n * sizeof(float)); }

/* ||got - ref|| / ||ref|| <= tol, with every element of got finite; returns the number of bit-identical ones. */
static inline size_t check_close(const char *what, const float *got, const float *ref, size_t n, double tol) {
    double num = 0, den = 0;
    size_t exact = 0;
    for (size_t i = 0; i < n; i++) {
        cr_assert(isfinite(got[i]), "%s: element %zu is %g (not written?), cpu %g [seed %llu]", what, i, got[i],
                  ref[i], (unsigned long long)seed0);
        double d = (double)got[i] - ref[i];
        num += d * d;
        den += (double)ref[i] * ref[i];
        exact += memcmp(&got[i], &ref[i], sizeof(float)) == 0;
    }
    double rel = den > 0 ? sqrt(num / den) : sqrt(num);
    cr_assert(rel <= tol, "%s: relative error %.3g > %.1g [seed %llu]", what, rel, tol, (unsigned long long)seed0);
    return exact;
}

#endif /* MOERL_HAVE_CUDA */

/* The tests' main: skips with the reason when there is no CUDA build or no device; else picks the seed (kept in
 * the environment for Criterion's per-test workers) and runs the suites. */
static inline int gpu_test_main(int argc, char **argv, const char *name) {
#ifndef MOERL_HAVE_CUDA
    (void)argc;
    (void)argv;
    (void)name;
    printf("SKIPPED: moerl was built without the CUDA backend (no nvcc)\n");
    return 77;
#else
    mr_err e = {0};
    if (backend_get("cuda", &gpu, &e) != MR_OK) {
        printf("SKIPPED: %s\n", e.msg);
        return 77;
    }
    if (!getenv("MOERL_TEST_SEED")) {
        char buf[32];
        snprintf(buf, sizeof buf, "%llu", (unsigned long long)time(NULL));
        setenv("MOERL_TEST_SEED", buf, 1);
    }
    seed0 = strtoull(getenv("MOERL_TEST_SEED"), NULL, 10);
    printf("%s: seed %llu (set MOERL_TEST_SEED to replay)\n", name, (unsigned long long)seed0);
    struct criterion_test_set *tests = criterion_initialize();
    int result = 0;
    if (criterion_handle_args(argc, argv, true)) result = !criterion_run_all_tests(tests);
    criterion_finalize(tests);
    dense_cuda_release();
    return result;
#endif
}

#endif
