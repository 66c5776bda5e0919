/* gpu_backend.c: CPU-vs-CUDA parity of the backend table (label gpu). Without a CUDA build or device the whole
 * executable exits 77, which ctest reports as "Skipped", and prints why. */
#include <criterion/criterion.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

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
/* The memory ops the model runs between kernels: zero, a pitched 2-D copy and scale give the CPU table's bits on
 * a poisoned destination; then the optimizer entries of the table (AdamW update, sum of squares in double). */
Test(gpu, memory_ops_match_cpu) {
    enum { R = 37, P = 129, W = 61, DP = 70 };
    const backend *c = backend_cpu();
    float *src = hrand(R * P, 5, 1.0f), *ref = malloc(R * DP * sizeof *ref);
    for (int i = 0; i < R * DP; i++) ref[i] = NAN;
    c->zero(ref + 3 * DP, 2 * DP * sizeof(float));
    c->copy2d(ref + 5 * DP + 4, DP, src + 9, P, W, R - 5); /* rows 5.., columns 4..64 from columns 9..69 */
    c->scale(ref + 5 * DP, 0.375f, (R - 5) * (size_t)DP);
    float *ds = dput(src, R * P * sizeof(float)), *dd = dpoison(R * DP);
    gpu->zero(dd + 3 * DP, 2 * DP * sizeof(float));
    gpu->copy2d(dd + 5 * DP + 4, DP, ds + 9, P, W, R - 5);
    gpu->scale(dd + 5 * DP, 0.375f, (R - 5) * (size_t)DP);
    float *got = dget(dd, R * DP);
    for (int i = 0; i < R * DP; i++)
        cr_assert(memcmp(&got[i], &ref[i], sizeof(float)) == 0 || (isnan(got[i]) && isnan(ref[i])),
                  "element %d (row %d, column %d): %g vs cpu %g", i, i / DP, i % DP, got[i], ref[i]);
    free(got);
    gpu->free(ds);
    gpu->free(dd);
    free(src);
    free(ref);
}

Test(gpu, optimizer_entries_match_cpu) {
    const size_t n = 70001;
    mr_err e = {0};
    const backend *c = backend_cpu();
    float *w = hrand(n, 1, 0.5f), *g = hrand(n, 2, 1e-2f), *m = hrand(n, 3, 1e-3f), *v = hrand(n, 4, 1e-4f);
    for (size_t i = 0; i < n; i++) v[i] = v[i] * v[i];
    float *dw = dput(w, n * 4), *dg = dput(g, n * 4), *dm = dput(m, n * 4), *dv = dput(v, n * 4);
    for (int64_t step = 1; step <= 3; step++) {
        cr_assert_eq(c->adamw_update(w, g, m, v, n, 0.9, 0.95, 1e-8, 0.1, step, 3e-4, &e), MR_OK, "%s", e.msg);
        cr_assert_eq(gpu->adamw_update(dw, dg, dm, dv, n, 0.9, 0.95, 1e-8, 0.1, step, 3e-4, &e), MR_OK, "%s", e.msg);
    }
    float *hw = dget(dw, n), *hm = dget(dm, n), *hv = dget(dv, n);
    cr_assert_eq(memcmp(hw, w, n * 4), 0, "weights differ from the CPU's bits");
    cr_assert_eq(memcmp(hm, m, n * 4), 0, "first moments differ from the CPU's bits");
    cr_assert_eq(memcmp(hv, v, n * 4), 0, "second moments differ from the CPU's bits");
    double sc, sg;
    cr_assert_eq(c->grad_sumsq(&sc, g, n, &e), MR_OK);
    cr_assert_eq(gpu->grad_sumsq(&sg, dg, n, &e), MR_OK, "%s", e.msg);
    cr_assert(fabs(sg - sc) <= 1e-12 * sc, "sum of squares %.17g vs cpu %.17g", sg, sc);
    free(hw), free(hm), free(hv);
    gpu->free(dw), gpu->free(dg), gpu->free(dm), gpu->free(dv);
    free(w), free(g), free(m), free(v);
}
Test(gpu, device_info_and_memory_stats) {
    mr_err e = {0};
    backend_device_info di;
    cr_assert_not_null(gpu->device_info);
    cr_assert_eq(gpu->device_info(&di, &e), MR_OK, "%s", e.msg);
    cr_assert(di.name[0] && strstr(di.name, "SMs"), "name: %s", di.name);
    cr_assert(di.peak_fp32_flops > 1e12 && di.mem_bw > 1e11 && di.mem_total > ((size_t)1 << 30),
              "%s: fp32 %g FLOP/s, %g B/s, %zu bytes", di.name, di.peak_fp32_flops, di.mem_bw, di.mem_total);
    if (strstr(di.name, "H100") || strstr(di.name, "H200"))
        cr_assert(di.peak_bf16_flops > 7e14, "%s: bf16 peak %g", di.name, di.peak_bf16_flops);
    size_t used0, peak0, used1, peak1;
    gpu->mem_stats(&used0, &peak0);
    void *p = gpu->alloc((size_t)256 << 20);
    cr_assert_not_null(p);
    gpu->mem_stats(&used1, &peak1);
    cr_assert(used1 >= used0 + ((size_t)256 << 20) && peak1 >= used1, "in use %zu -> %zu, peak %zu", used0, used1,
              peak1);
    gpu->free(p);
}
#endif

int main(int argc, char **argv) { return gpu_test_main(argc, argv, "gpu_backend"); }
