/* test_rope.c: YaRN frequencies, cos/sin and scales against the independent Python reference
 * (tests/ref/yarn_ref.py → tests/fixtures/yarn_ref.inc), the rotation against a naive complex multiply, the
 * layout claim (our interleaved rotation gives HF's scores after HF's permutation + rotate_half), the backward as
 * the transpose, and init errors. */
#include <criterion/criterion.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "core/mem.h"
#include "core/rng.h"
#include "kernels/cpu/rope.h"

#include "fixtures/yarn_ref.inc"

static const rope_yarn V3_YARN = {1, 40.0, 4096, 32.0, 1.0, 1.0, 1.0};

Test(rope, v3_correction_range_and_scales) {
    double lo, hi;
    rope_yarn_correction_range(&V3_YARN, 64, 10000.0, &lo, &hi);
    cr_expect_eq(lo, YARN_V3_LOW);
    cr_expect_eq(hi, YARN_V3_HIGH);
    cr_expect_eq(lo, 10.0); /* MODEL-SPEC §5.4 quotes low = 10, high = 23 */
    cr_expect_eq(hi, 23.0);

    cr_expect(fabs(rope_softmax_scale(192, &V3_YARN) - SCALE_V3) < 1e-15, "V3 scale %.17g",
              rope_softmax_scale(192, &V3_YARN));
    cr_expect(fabs(rope_softmax_scale(192, &V3_YARN) - 0.1352337789) < 1e-10); /* §5.5 */
    rope_yarn v2l = {1, 40.0, 4096, 32.0, 1.0, 0.707, 0.707};
    cr_expect(fabs(rope_softmax_scale(192, &v2l) - SCALE_V2LITE) < 1e-15);
    cr_expect(fabs(rope_softmax_scale(192, NULL) - SCALE_PLAIN_192) < 1e-15);
    rope_yarn no_all = {1, 40.0, 4096, 32.0, 1.0, 0.707, 0.0}; /* HF: no m² without mscale_all_dim */
    cr_expect(fabs(rope_softmax_scale(192, &no_all) - SCALE_PLAIN_192) < 1e-15);
    rope_yarn off = V3_YARN;
    off.enabled = 0;
    cr_expect(fabs(rope_softmax_scale(192, &off) - SCALE_PLAIN_192) < 1e-15);

    cr_expect(rope_yarn_attn_factor(&V3_YARN) == AF_V3);
    cr_expect(fabs(rope_yarn_attn_factor(&v2l) - AF_V2LITE) < 1e-15);
    cr_expect(fabs(rope_yarn_attn_factor(&no_all) - AF_NO_ALL_DIM) < 1e-15, "fallback factor %.17g",
              rope_yarn_attn_factor(&no_all));
    rope_yarn half = {1, 40.0, 4096, 32.0, 1.0, 1.0, 0.5};
    cr_expect(fabs(rope_yarn_attn_factor(&half) - AF_1_HALF) < 1e-15);
    cr_expect(rope_yarn_attn_factor(NULL) == 1.0);
}

Test(rope, v3_inv_freq_golden) {
    rope_table rt;
    mr_err e = {0};
    cr_assert_eq(rope_yarn_init(&rt, 64, 10000.0, &V3_YARN, 16, &e), 0, "%s", e.msg);
    for (int i = 0; i < 32; i++) {
        /* Bit-exact with HF's fp32 operation chain, and within fp32 rounding of the float64 formula. */
        cr_expect(rt.inv_freq[i] == omega_hf32[i], "omega[%d] = %a, HF fp32 chain %a", i, rt.inv_freq[i],
                  omega_hf32[i]);
        double rel = fabs(rt.inv_freq[i] - omega_exact[i]) / omega_exact[i];
        cr_expect(rel < 3e-7, "omega[%d] = %.9g vs exact %.9g (rel %.3g)", i, rt.inv_freq[i], omega_exact[i], rel);
    }
    /* Spot values of the spec's test vector (§5.4). */
    cr_expect(fabs(rt.inv_freq[11] / 0.0390069266 - 1.0) < 3e-7);
    cr_expect(fabs(rt.inv_freq[23] / 3.33380358e-05 - 1.0) < 3e-7);
    cr_expect(rt.attn_factor == 1.0);
    rope_free(&rt);
}

Test(rope, plain_and_degenerate_ramp_golden) {
    rope_table rt;
    mr_err e = {0};
    cr_assert_eq(rope_yarn_init(&rt, 64, 10000.0, NULL, 0, &e), 0, "%s", e.msg);
    for (int i = 0; i < 32; i++) cr_expect(rt.inv_freq[i] == omega_plain[i], "plain omega[%d] = %a", i, rt.inv_freq[i]);
    rope_free(&rt);

    rope_yarn small = {1, 4.0, 64, 32.0, 16.0, 1.0, 1.0};
    double lo, hi;
    rope_yarn_correction_range(&small, 8, 10000.0, &lo, &hi);
    cr_expect(lo == SMALL_LOW && hi == SMALL_HIGH, "range %g %g", lo, hi);
    cr_assert_eq(rope_yarn_init(&rt, 8, 10000.0, &small, 4, &e), 0, "%s", e.msg);
    for (int i = 0; i < 4; i++)
        cr_expect(rt.inv_freq[i] == omega_small_hf32[i], "small omega[%d] = %a want %a", i, rt.inv_freq[i],
                  omega_small_hf32[i]);
    rope_free(&rt);
}

/* Rotating the unit vector (1, 0) of every pair reads out (c, s) exactly: c = 1·c − 0·s, s = 1·s + 0·c. */
Test(rope, cos_sin_golden_in_and_past_the_table) {
    rope_table rt;
    mr_err e = {0};
    cr_assert_eq(rope_yarn_init(&rt, 64, 10000.0, &V3_YARN, 4096, &e), 0, "%s", e.msg);
    float x[5 * 64];
    for (int t = 0; t < 5; t++)
        for (int i = 0; i < 32; i++) {
            x[t * 64 + 2 * i] = 1.0f;
            x[t * 64 + 2 * i + 1] = 0.0f;
        }
    rope_forward(x, cs_pos, 5, 1, 64, 64, &rt); /* position 100000 is past the table: computed on the fly */
    for (int t = 0; t < 5; t++)
        for (int i = 0; i < 32; i++) {
            cr_expect(x[t * 64 + 2 * i] == cs_ref[t][i][0], "cos p=%d i=%d: %a want %a", cs_pos[t], i,
                      x[t * 64 + 2 * i], cs_ref[t][i][0]);
            cr_expect(x[t * 64 + 2 * i + 1] == cs_ref[t][i][1], "sin p=%d i=%d: %a want %a", cs_pos[t], i,
                      x[t * 64 + 2 * i + 1], cs_ref[t][i][1]);
        }
    rope_free(&rt);
}

Test(rope, table_equals_on_the_fly) {
    rope_table tab, fly;
    mr_err e = {0};
    cr_assert_eq(rope_yarn_init(&tab, 64, 10000.0, &V3_YARN, 300, &e), 0, "%s", e.msg);
    cr_assert_eq(rope_yarn_init(&fly, 64, 10000.0, &V3_YARN, 0, &e), 0, "%s", e.msg);
    enum { T = 40 };
    float a[T * 64], b[T * 64];
    int32_t pos[T];
    for (int t = 0; t < T; t++) pos[t] = (t * 37) % 300;
    rng_fill_normal(a, T * 64, 0.0f, 1.0f, 11, 0);
    memcpy(b, a, sizeof a);
    rope_forward(a, pos, T, 1, 64, 64, &tab);
    rope_forward(b, pos, T, 1, 64, 64, &fly);
    cr_expect(memcmp(a, b, sizeof a) == 0, "table and on-the-fly rotations differ");
    rope_free(&tab);
    rope_free(&fly);
}

/* Naive reference: each pair as the complex number x[2i] + j·x[2i+1] times af·e^{jφ}, in double, with φ the
 * fp32 angle (float)p·ω_i. Heads live inside a wider row (q layout: d_nope, then the rope dims), and everything
 * outside the rope dims must be left untouched. */
static void check_against_complex(const rope_yarn *y, int max_pos) {
    enum { T = 9, H = 3, NOPE = 5, D = 16, HS = NOPE + D, RS = H * HS };
    rope_table rt;
    mr_err e = {0};
    cr_assert_eq(rope_yarn_init(&rt, D, 10000.0, y, max_pos, &e), 0, "%s", e.msg);
    float x[T * RS], x0[T * RS];
    int32_t pos[T] = {0, 1, 2, 3, 0, 1, 50, 5000, 123456}; /* a document restart, then far positions */
    rng_fill_normal(x, T * RS, 0.0f, 1.0f, 5, 1);
    memcpy(x0, x, sizeof x);
    rope_forward(x + NOPE, pos, T, H, RS, HS, &rt);
    double af = rope_yarn_attn_factor(y);
    double maxerr = 0.0;
    for (int t = 0; t < T; t++)
        for (int h = 0; h < H; h++) {
            const float *a = x0 + t * RS + h * HS, *r = x + t * RS + h * HS;
            for (int d = 0; d < NOPE; d++) cr_expect(a[d] == r[d], "nope dim %d of head %d touched", d, h);
            for (int i = 0; i < D / 2; i++) {
                double phi = (double)((float)pos[t] * rt.inv_freq[i]);
                double complex_re = af * (a[NOPE + 2 * i] * cos(phi) - a[NOPE + 2 * i + 1] * sin(phi));
                double complex_im = af * (a[NOPE + 2 * i] * sin(phi) + a[NOPE + 2 * i + 1] * cos(phi));
                maxerr = fmax(maxerr, fabs(r[NOPE + 2 * i] - complex_re));
                maxerr = fmax(maxerr, fabs(r[NOPE + 2 * i + 1] - complex_im));
            }
        }
    cr_expect(maxerr < 2e-6, "max |rope - complex rotation| = %.3g", maxerr);
    rope_free(&rt);
}

Test(rope, forward_matches_complex_rotation) {
    rope_yarn y = {1, 40.0, 4096, 32.0, 1.0, 1.0, 1.0};
    check_against_complex(&y, 64);
    check_against_complex(&y, 0);
    check_against_complex(NULL, 64);
    rope_yarn scaled = {1, 40.0, 4096, 32.0, 1.0, 1.0, 0.5}; /* attention factor 1.1557 on cos/sin */
    check_against_complex(&scaled, 64);
}

/* HF (rope_interleave = true) permutes each rope vector to half-split order, then applies rotate_half with
 * cos/sin = concat(φ, φ). The q_pe·k_pe dot products must equal ours (MODEL-SPEC §5.4). */
Test(rope, interleaved_scores_equal_hf_permuted_rotate_half) {
    enum { D = 64, T = 6 };
    rope_table rt;
    mr_err e = {0};
    cr_assert_eq(rope_yarn_init(&rt, D, 10000.0, &V3_YARN, 128, &e), 0, "%s", e.msg);
    float q[T * D], k[T * D], qr[T * D], kr[T * D];
    int32_t pos[T] = {0, 3, 17, 100, 127, 90000};
    rng_fill_normal(q, T * D, 0.0f, 1.0f, 7, 2);
    rng_fill_normal(k, T * D, 0.0f, 1.0f, 7, 3);
    memcpy(qr, q, sizeof q);
    memcpy(kr, k, sizeof k);
    rope_forward(qr, pos, T, 1, D, D, &rt);
    rope_forward(kr, pos, T, 1, D, D, &rt);
    double hq[T][D], hk[T][D];
    for (int t = 0; t < T; t++) {
        double pq[D], pk[D];
        for (int j = 0; j < D / 2; j++) { /* HF's permutation: new j ← old 2j, new j + D/2 ← old 2j + 1 */
            pq[j] = q[t * D + 2 * j];
            pq[j + D / 2] = q[t * D + 2 * j + 1];
            pk[j] = k[t * D + 2 * j];
            pk[j + D / 2] = k[t * D + 2 * j + 1];
        }
        for (int j = 0; j < D; j++) { /* y = x cos + rotate_half(x) sin, rotate_half(x) = (−x2, x1) */
            double phi = (double)((float)pos[t] * rt.inv_freq[j % (D / 2)]);
            double rq = j < D / 2 ? -pq[j + D / 2] : pq[j - D / 2];
            double rk = j < D / 2 ? -pk[j + D / 2] : pk[j - D / 2];
            hq[t][j] = pq[j] * cos(phi) + rq * sin(phi);
            hk[t][j] = pk[j] * cos(phi) + rk * sin(phi);
        }
        /* The rotated vectors themselves agree under the permutation. */
        for (int j = 0; j < D / 2; j++) {
            cr_expect(fabs(hq[t][j] - qr[t * D + 2 * j]) < 1e-5);
            cr_expect(fabs(hq[t][j + D / 2] - qr[t * D + 2 * j + 1]) < 1e-5);
        }
    }
    for (int a = 0; a < T; a++)
        for (int b = 0; b < T; b++) {
            double ours = 0.0, hf = 0.0;
            for (int d = 0; d < D; d++) {
                ours += (double)qr[a * D + d] * kr[b * D + d];
                hf += hq[a][d] * hk[b][d];
            }
            cr_expect(fabs(ours - hf) < 1e-4, "score(%d,%d): ours %.9g hf %.9g", a, b, ours, hf);
        }
    rope_free(&rt);
}

/* <R x, y> = <x, Rᵀ y> for a rotation with attention factor ≠ 1, and Rᵀ R x = af² x. */
Test(rope, backward_is_transpose) {
    enum { T = 7, H = 2, D = 8, RS = H * D };
    rope_yarn y = {1, 40.0, 4096, 32.0, 1.0, 1.0, 0.5};
    rope_table rt;
    mr_err e = {0};
    cr_assert_eq(rope_yarn_init(&rt, D, 10000.0, &y, 16, &e), 0, "%s", e.msg);
    float x[T * RS], yv[T * RS], rx[T * RS], rty[T * RS];
    int32_t pos[T] = {0, 1, 2, 15, 16, 400, 3};
    rng_fill_normal(x, T * RS, 0.0f, 1.0f, 9, 1);
    rng_fill_normal(yv, T * RS, 0.0f, 1.0f, 9, 2);
    memcpy(rx, x, sizeof x);
    memcpy(rty, yv, sizeof yv);
    rope_forward(rx, pos, T, H, RS, D, &rt);
    rope_backward(rty, pos, T, H, RS, D, &rt);
    double lhs = 0.0, rhs = 0.0, nrm = 0.0;
    for (int i = 0; i < T * RS; i++) {
        lhs += (double)rx[i] * yv[i];
        rhs += (double)x[i] * rty[i];
        nrm += fabs((double)x[i] * yv[i]);
    }
    cr_expect(fabs(lhs - rhs) < 1e-6 * nrm, "<Rx,y> = %.9g, <x,R^T y> = %.9g", lhs, rhs);
    /* A wrong sign in the backward (R instead of Rᵀ) breaks this one. */
    rope_backward(rx, pos, T, H, RS, D, &rt);
    double af2 = rt.attn_factor * rt.attn_factor;
    for (int i = 0; i < T * RS; i++)
        cr_expect(fabs(rx[i] - af2 * x[i]) < 1e-5 * (1.0 + fabs(x[i])), "R^T R x != af^2 x at %d", i);
    rope_free(&rt);
}

Test(rope, init_errors) {
    rope_table rt;
    mr_err e = {0};
    cr_expect_eq(rope_yarn_init(&rt, 63, 10000.0, NULL, 8, &e), MR_EINVAL);
    cr_expect_str_eq(e.msg, "rope: qk_rope_head_dim must be a positive even number, got 63");
    cr_expect_eq(rope_yarn_init(&rt, 64, 1.0, NULL, 8, &e), MR_EINVAL);
    cr_expect_str_eq(e.msg, "rope: rope_theta must be > 1, got 1");
    rope_yarn bad = V3_YARN;
    bad.factor = 0.5;
    cr_expect_eq(rope_yarn_init(&rt, 64, 10000.0, &bad, 8, &e), MR_EINVAL);
    cr_expect_str_eq(e.msg, "rope: rope_scaling.factor must be >= 1, got 0.5");
    bad = V3_YARN;
    bad.original_max_pos = 0;
    cr_expect_eq(rope_yarn_init(&rt, 64, 10000.0, &bad, 8, &e), MR_EINVAL);
    cr_expect_str_eq(e.msg, "rope: rope_scaling.original_max_position_embeddings must be >= 1, got 0");
    bad = V3_YARN;
    bad.beta_slow = 0.0;
    cr_expect_eq(rope_yarn_init(&rt, 64, 10000.0, &bad, 8, &e), MR_EINVAL);
    cr_expect_str_eq(e.msg, "rope: rope_scaling.beta_fast and beta_slow must be > 0, got 32 and 0");
    cr_expect_eq(rope_yarn_init(&rt, 64, 10000.0, NULL, -1, &e), MR_EINVAL);
    cr_expect_str_eq(e.msg, "rope: max_pos must be >= 0, got -1");
    for (long n = 1; n <= 2; n++) { /* either allocation failing leaves nothing behind (ASan checks leaks) */
        long before = mem_injected_failures();
        mem_fail_after(n);
        cr_expect_eq(rope_yarn_init(&rt, 64, 10000.0, &V3_YARN, 100, &e), MR_ENOMEM);
        mem_fail_after(0);
        cr_expect_eq(mem_injected_failures(), before + 1);
        cr_expect_str_eq(e.msg, "rope: out of memory for a cos/sin table of 100 positions x 64 dims");
        cr_expect(rt.inv_freq == NULL && rt.cos_sin == NULL);
    }
    rope_free(NULL);
}
