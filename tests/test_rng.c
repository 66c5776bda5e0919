/* test_rng.c: Philox4x32-10 known answers (Random123's kat_vectors), moerl's stream layout against the
 * independent Python reference tests/ref/philox_ref.py, and statistical sanity of the derived draws. */
#include <criterion/criterion.h>
#include <math.h>
#include <string.h>

#include "core/rng.h"

Test(rng, philox_known_answers) {
    /* Random123 kat_vectors, "philox4x32 10" lines: counter[4] key[2] -> out[4]. */
    static const uint32_t kat[3][10] = {
        {0, 0, 0, 0, 0, 0, 0x6627e8d5, 0xe169c58d, 0xbc57ac4c, 0x9b00dbd8},
        {0xffffffff, 0xffffffff, 0xffffffff, 0xffffffff, 0xffffffff, 0xffffffff,
         0x408f276d, 0x41c83b0e, 0xa20bc7c6, 0x6d5451fd},
        {0x243f6a88, 0x85a308d3, 0x13198a2e, 0x03707344, 0xa4093822, 0x299f31d0,
         0xd16cfe09, 0x94fdcceb, 0x5001e420, 0x24126ea1},
    };
    for (int t = 0; t < 3; t++) {
        uint32_t out[4];
        philox4x32_10(kat[t], kat[t] + 4, out);
        for (int j = 0; j < 4; j++)
            cr_expect_eq(out[j], kat[t][6 + j], "kat %d word %d: got 0x%08x want 0x%08x", t, j, out[j],
                         kat[t][6 + j]);
    }
}

Test(rng, stream_layout_matches_python_reference) {
    /* Golden values printed by tests/ref/philox_ref.py (independent implementation). */
    const uint64_t seed = 0x0123456789ABCDEFull, stream = 42;
    static const struct { uint64_t block; uint32_t w[4]; } g[] = {
        {0, {0xbbb8d34b, 0x3d0d511d, 0x3998a0ef, 0x268e0d84}},
        {1, {0x6949a91b, 0xfd665716, 0x9889fa3d, 0x05e7cce2}},
        {0x100000000ull, {0x0b1177ac, 0xdafaf0b9, 0x6f2da409, 0x121b45a0}},
    };
    for (size_t t = 0; t < sizeof g / sizeof g[0]; t++) {
        uint32_t w[4];
        rng_block(seed, stream, g[t].block, w);
        cr_expect(memcmp(w, g[t].w, sizeof w) == 0, "block %llu differs", (unsigned long long)g[t].block);
    }
    static const struct { uint64_t i; float v; } n[] = {
        {0, 0.05694197118282318f}, {1, 1.3303132057189941f}, {7, 0.3053032159805298f},
        {1000003, 2.7810049057006836f}};
    for (size_t t = 0; t < sizeof n / sizeof n[0]; t++) {
        float v = rng_normal_at(seed, stream, n[t].i);
        cr_expect(v == n[t].v, "normal_at %llu: got %.9g want %.9g", (unsigned long long)n[t].i, v, n[t].v);
    }
    float x[8];
    rng_fill_normal(x, 8, 1.0f, 2.0f, seed, stream);
    cr_expect(x[7] == 1.0f + 2.0f * 0.3053032159805298f);
}

Test(rng, sequential_generator_walks_the_blocks) {
    rng r;
    rng_init(&r, 7, 9);
    uint32_t w[4];
    for (uint64_t b = 0; b < 3; b++) {
        rng_block(7, 9, b, w);
        for (int j = 0; j < 4; j++) cr_expect_eq(rng_u32(&r), w[j]);
    }
    /* The state is (seed, stream, pos): a copy resumes the same sequence (checkpointing). */
    rng saved = r;
    uint32_t a = rng_u32(&r), b = rng_u32(&saved);
    cr_expect_eq(a, b);
}

Test(rng, streams_are_distinct_and_pure) {
    cr_expect_neq(rng_stream_id(1, 0, 0), rng_stream_id(1, 0, 1));
    cr_expect_neq(rng_stream_id(1, 2, 3), rng_stream_id(1, 3, 2));
    cr_expect_eq(rng_stream_id(5, 6, 7), rng_stream_id(5, 6, 7));
    rng a, b;
    rng_init(&a, 1, rng_stream_id(1, 0, 0));
    rng_init(&b, 1, rng_stream_id(1, 0, 1));
    int same = 0;
    for (int i = 0; i < 1000; i++) same += rng_u32(&a) == rng_u32(&b);
    cr_expect_lt(same, 3);
}

Test(rng, below_is_unbiased_and_in_range) {
    rng r;
    rng_init(&r, 123, 0);
    enum { N = 7, DRAWS = 700000 };
    long count[N] = {0};
    for (int i = 0; i < DRAWS; i++) {
        uint32_t v = rng_below(&r, N);
        cr_assert_lt(v, N);
        count[v]++;
    }
    double chi2 = 0, expect = DRAWS / (double)N;
    for (int k = 0; k < N; k++) chi2 += (count[k] - expect) * (count[k] - expect) / expect;
    cr_expect_lt(chi2, 22.46, "chi2 = %g (6 dof, p = 0.001 bound 22.46)", chi2); /* fixed seed: deterministic */
    /* n = 1 and n = 2^31 + 1 (the worst case for rejection) stay in range */
    for (int i = 0; i < 1000; i++) {
        cr_assert_eq(rng_below(&r, 1), 0u);
        cr_assert_lt(rng_below(&r, 0x80000001u), 0x80000001u);
    }
}

Test(rng, uniform_and_normal_moments) {
    enum { N = 1 << 20 };
    static float x[N];
    rng_fill_uniform(x, N, 99, 1);
    double s = 0, mn = 1, mx = 0;
    for (int i = 0; i < N; i++) {
        s += x[i];
        if (x[i] < mn) mn = x[i];
        if (x[i] > mx) mx = x[i];
    }
    cr_expect(mn >= 0.0 && mx < 1.0);
    cr_expect_lt(fabs(s / N - 0.5), 0.002);
    rng_fill_normal(x, N, 0.0f, 1.0f, 99, 2);
    double m = 0, v = 0;
    for (int i = 0; i < N; i++) m += x[i];
    m /= N;
    for (int i = 0; i < N; i++) v += (x[i] - m) * (x[i] - m);
    v /= N;
    cr_expect_lt(fabs(m), 0.005, "mean %g", m);
    cr_expect_lt(fabs(v - 1.0), 0.01, "var %g", v);
    /* uniform_double has 53 bits and stays below 1 */
    rng r;
    rng_init(&r, 3, 3);
    for (int i = 0; i < 1000; i++) {
        double d = rng_uniform_double(&r);
        cr_assert(d >= 0.0 && d < 1.0);
    }
}

Test(rng, fill_is_independent_of_thread_count) {
    enum { N = 200000 };
    static float a[N], b[N];
    rng_fill_normal(a, N, 0, 1, 5, 6);
    for (size_t i = 0; i < N; i += 9973) b[i] = rng_normal_at(5, 6, i);
    for (size_t i = 0; i < N; i += 9973) cr_assert(a[i] == b[i]);
}
