/* gpu_backend.c: CPU-vs-CUDA parity of the backend table (label gpu). Without a CUDA build or device the whole
 * executable exits 77, which ctest reports as "Skipped", and prints why. */
#include <criterion/criterion.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>

#include "kernels/backend.h"
#include "tests/gpu_common.h"

#ifdef MOERL_HAVE_CUDA
TestSuite(gpu, .init = gpu_setup);

static float *to_host_copy(const float *dev, size_t n) {
    float *h = malloc(n * sizeof *h);
    mr_err e = {0};
    cr_assert_eq(gpu->to_host(h, dev, n * sizeof *h, &e), MR_OK, "%s", e.msg);
    return h;
}

Test(gpu, fill_normal_matches_cpu) {
    const size_t n = 1 << 20;
    mr_err e = {0};
    float *ref = malloc(n * sizeof *ref);
    backend_cpu()->fill_normal(ref, n, 0.5f, 0.02f, 1234, 77, &e);
    float *d = gpu->alloc(n * sizeof *d);
    cr_assert_not_null(d);
    /* poison the output first, so a kernel that writes nothing cannot pass */
    float *poison = malloc(n * sizeof *poison);
    for (size_t i = 0; i < n; i++) poison[i] = NAN;
    cr_assert_eq(gpu->to_device(d, poison, n * sizeof *d, &e), MR_OK, "%s", e.msg);
    cr_assert_eq(gpu->fill_normal(d, n, 0.5f, 0.02f, 1234, 77, &e), MR_OK, "%s", e.msg);
    cr_assert_eq(gpu->sync(&e), MR_OK, "%s", e.msg);
    float *h = to_host_copy(d, n);
    double num = 0, den = 0;
    size_t exact = 0;
    for (size_t i = 0; i < n; i++) {
        cr_assert(isfinite(h[i]), "element %zu not written", i);
        num += (h[i] - ref[i]) * (double)(h[i] - ref[i]);
        den += ref[i] * (double)ref[i];
        exact += h[i] == ref[i];
    }
    cr_expect_lt(sqrt(num / den), 1e-6, "relative error %g", sqrt(num / den));
    cr_expect_gt(exact, n * 999 / 1000, "only %zu of %zu bit-identical", exact, n);
    gpu->free(d);
    free(h);
    free(ref);
    free(poison);
}

Test(gpu, axpy_matches_cpu) {
    const size_t n = 100003;
    mr_err e = {0};
    float *x = malloc(n * sizeof *x), *y = malloc(n * sizeof *y);
    backend_cpu()->fill_normal(x, n, 0, 1, 1, 1, &e);
    backend_cpu()->fill_normal(y, n, 0, 1, 1, 2, &e);
    float *dx = gpu->alloc(n * sizeof *dx), *dy = gpu->alloc(n * sizeof *dy);
    gpu->to_device(dx, x, n * sizeof *x, &e);
    gpu->to_device(dy, y, n * sizeof *y, &e);
    cr_assert_eq(gpu->axpy(dy, dx, 0.25f, n, &e), MR_OK, "%s", e.msg);
    backend_cpu()->axpy(y, x, 0.25f, n, &e);
    float *h = to_host_copy(dy, n);
    for (size_t i = 0; i < n; i++) cr_assert_float_eq(h[i], y[i], 1e-6f * (1 + fabsf(y[i])), "i=%zu", i);
    gpu->free(dx);
    gpu->free(dy);
    free(x);
    free(y);
    free(h);
}
#endif

int main(int argc, char **argv) { return gpu_test_main(argc, argv, "gpu_backend"); }
