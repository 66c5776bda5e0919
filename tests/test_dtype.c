/* test_dtype.c: dtype names and sizes; every bf16/f16/e4m3 bit pattern against an independent decode formula
 * (ldexp of sign, exponent, mantissa as MODEL-SPEC §10.4 and IEEE 754 state them) and back; f32 -> narrow
 * conversions against a brute-force "nearest representable value, ties to even code" search; RNE ties,
 * saturation, NaN, and the array converters (unaligned buffers, integer rounding and clamping). */
#include <criterion/criterion.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "core/dtype.h"

static uint32_t bits(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    return u;
}
static float fbits(uint32_t u) {
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static uint64_t rng_state = 0x9E3779B97F4A7C15ull;
static uint32_t rnd(void) { /* xorshift64*: test inputs only */
    rng_state ^= rng_state >> 12;
    rng_state ^= rng_state << 25;
    rng_state ^= rng_state >> 27;
    return (uint32_t)((rng_state * 0x2545F4914F6CDD1Dull) >> 32);
}

Test(dtype, names_and_sizes) {
    static const struct { const char *name; mr_dtype t; size_t size; } want[] = {
        {"F32", DT_F32, 4}, {"BF16", DT_BF16, 2}, {"F16", DT_F16, 2},
        {"F8_E4M3", DT_F8_E4M3, 1}, {"I32", DT_I32, 4}, {"I64", DT_I64, 8},
    };
    for (size_t i = 0; i < sizeof want / sizeof want[0]; i++) {
        mr_dtype t;
        cr_assert_eq(dtype_from_name(want[i].name, &t), 0, "%s", want[i].name);
        cr_expect_eq(t, want[i].t);
        cr_expect_str_eq(dtype_name(want[i].t), want[i].name);
        cr_expect_eq(dtype_size(want[i].t), want[i].size, "%s", want[i].name);
    }
    mr_dtype t = DT_F32;
    cr_expect_eq(dtype_from_name("f32", &t), -1);
    cr_expect_eq(dtype_from_name("F8_E5M2", &t), -1);
    cr_expect_eq(dtype_from_name("", &t), -1);
    cr_expect_eq(dtype_size(DT_COUNT), 0);
    cr_expect_str_eq(dtype_name((mr_dtype)99), "?");
}

/* Independent decoders: value = (-1)^s * 2^(e - bias) * (1 + m / 2^mbits), subnormals 2^(1 - bias) * m / 2^mbits. */
static double ref_bf16(uint16_t p) {
    int s = p >> 15, e = (p >> 7) & 0xFF, m = p & 0x7F;
    double v = e == 0 ? ldexp(m, -126 - 7) : e == 255 ? (m ? NAN : INFINITY) : ldexp(128 + m, e - 127 - 7);
    return s ? -v : v;
}
static double ref_f16(uint16_t p) {
    int s = p >> 15, e = (p >> 10) & 0x1F, m = p & 0x3FF;
    double v = e == 0 ? ldexp(m, -24) : e == 31 ? (m ? NAN : INFINITY) : ldexp(1024 + m, e - 25);
    return s ? -v : v;
}
static double ref_e4m3(uint8_t q) { /* MODEL-SPEC §10.4 verbatim */
    int s = q >> 7, e = (q >> 3) & 0xF, m = q & 7;
    double v;
    if (e == 0) v = ldexp(1.0, -6) * m / 8.0;
    else if (e == 15 && m == 7) v = NAN;
    else v = ldexp(1.0, e - 7) * (1.0 + m / 8.0);
    return s ? -v : v;
}

/* Same value, and the same sign for zeros. */
static int same(float got, double want) {
    if (isnan(want)) return isnan(got);
    return (double)got == want && !signbit(got) == !signbit(want);
}

Test(dtype, bf16_all_patterns) {
    for (uint32_t p = 0; p < 65536; p++) {
        float f = bf16_to_f32((uint16_t)p);
        cr_assert(same(f, ref_bf16((uint16_t)p)), "bf16 0x%04x decodes to %g, want %g", p, f, ref_bf16((uint16_t)p));
        uint16_t back = f32_to_bf16(f);
        if (isnan(f)) cr_assert(isnan(bf16_to_f32(back)), "bf16 NaN 0x%04x came back as 0x%04x", p, back);
        else cr_assert_eq(back, p, "bf16 0x%04x -> %g -> 0x%04x", p, f, back);
    }
}

Test(dtype, f16_all_patterns) {
    for (uint32_t p = 0; p < 65536; p++) {
        float f = f16_to_f32((uint16_t)p);
        cr_assert(same(f, ref_f16((uint16_t)p)), "f16 0x%04x decodes to %g, want %g", p, f, ref_f16((uint16_t)p));
        uint16_t back = f32_to_f16(f);
        if (isnan(f)) cr_assert(isnan(f16_to_f32(back)), "f16 NaN 0x%04x came back as 0x%04x", p, back);
        else cr_assert_eq(back, p, "f16 0x%04x -> %g -> 0x%04x", p, f, back);
    }
}

Test(dtype, e4m3_all_values) {
    int nans = 0;
    for (int q = 0; q < 256; q++) {
        float f = e4m3_to_f32((uint8_t)q);
        cr_assert(same(f, ref_e4m3((uint8_t)q)), "e4m3 0x%02x decodes to %g, want %g", q, f, ref_e4m3((uint8_t)q));
        if (isnan(f)) {
            nans++;
            cr_expect_eq(f32_to_e4m3(f) & 0x7F, 0x7F, "NaN must encode as NaN");
            continue;
        }
        cr_assert(!isinf(f), "e4m3fn has no infinities (0x%02x)", q);
        cr_assert_eq(f32_to_e4m3(f), q, "e4m3 0x%02x -> %g -> 0x%02x", q, f, f32_to_e4m3(f));
    }
    cr_expect_eq(nans, 2); /* only 0x7F and 0xFF */
    cr_expect(isnan(e4m3_to_f32(0x7F)) && isnan(e4m3_to_f32(0xFF)));
    cr_expect_eq(e4m3_to_f32(0x7E), 448.0f);
    cr_expect_eq(e4m3_to_f32(0xFE), -448.0f);
    cr_expect_eq(e4m3_to_f32(0x01), ldexpf(1.0f, -9));
    cr_expect_eq(e4m3_to_f32(0x07), 7 * ldexpf(1.0f, -9));
    cr_expect_eq(e4m3_to_f32(0x08), ldexpf(1.0f, -6));
    cr_expect_eq(e4m3_to_f32(0x38), 1.0f);
    cr_expect_eq(e4m3_to_f32(0x78), 256.0f); /* Ex = 15 with Mn < 7 is an ordinary number */
    float nz = e4m3_to_f32(0x80);
    cr_expect(nz == 0.0f && signbit(nz), "0x80 is -0");
    cr_expect_eq(f32_to_e4m3(-0.0f), 0x80);
}

Test(dtype, round_to_nearest_even_ties) {
    /* bf16: 1 + 2^-8 is halfway between 1 and 1 + 2^-7; 1 + 3*2^-8 between 1 + 2^-7 and 1 + 2^-6. */
    cr_expect_eq(f32_to_bf16(1.0f + ldexpf(1, -8)), 0x3F80);
    cr_expect_eq(f32_to_bf16(1.0f + 3 * ldexpf(1, -8)), 0x3F82);
    cr_expect_eq(f32_to_bf16(fbits(0x3F808001)), 0x3F81); /* just above the tie rounds up */
    cr_expect_eq(f32_to_bf16(fbits(0x3F807FFF)), 0x3F80);
    cr_expect_eq(f32_to_bf16(fbits(0x7F7FFFFF)), 0x7F80); /* FLT_MAX rounds to inf */
    cr_expect_eq(f32_to_bf16(-INFINITY), 0xFF80);
    cr_expect(isnan(bf16_to_f32(f32_to_bf16(fbits(0x7F800001))))); /* NaN whose payload is all in low bits */
    cr_expect(isnan(bf16_to_f32(f32_to_bf16(fbits(0xFF800001)))));
    /* f16 */
    cr_expect_eq(f32_to_f16(1.0f + ldexpf(1, -11)), 0x3C00);
    cr_expect_eq(f32_to_f16(1.0f + 3 * ldexpf(1, -11)), 0x3C02);
    cr_expect_eq(f32_to_f16(65504.0f), 0x7BFF);
    cr_expect_eq(f32_to_f16(65519.99f), 0x7BFF);
    cr_expect_eq(f32_to_f16(65520.0f), 0x7C00); /* tie between 65504 and 2^16 goes to even: inf */
    cr_expect_eq(f32_to_f16(ldexpf(1, -25)), 0x0000); /* half the smallest subnormal: tie to 0 */
    cr_expect_eq(f32_to_f16(3 * ldexpf(1, -25)), 0x0002);
    cr_expect_eq(f32_to_f16(-ldexpf(1, -24)), 0x8001);
    cr_expect_eq(f32_to_f16(fbits(0x00000001)), 0x0000); /* f32 subnormal underflows to +0 */
    cr_expect_eq(f32_to_f16(-fbits(0x00000001)), 0x8000);
    cr_expect_eq(f32_to_f16(ldexpf(1, -14) - ldexpf(1, -26)), 0x0400); /* rounds up into the smallest normal */
    cr_expect(isnan(f16_to_f32(f32_to_f16(NAN))));
    /* e4m3 */
    cr_expect_eq(f32_to_e4m3(1.0f + 1.0f / 16), 0x38);
    cr_expect_eq(f32_to_e4m3(1.0f + 3.0f / 16), 0x3A);
    cr_expect_eq(f32_to_e4m3(ldexpf(1, -10)), 0x00); /* half of 2^-9: tie to 0 */
    cr_expect_eq(f32_to_e4m3(3 * ldexpf(1, -10)), 0x02);
    cr_expect_eq(f32_to_e4m3(-5 * ldexpf(1, -10)), 0x82);
    cr_expect_eq(f32_to_e4m3(ldexpf(1, -9)), 0x01);
    cr_expect_eq(f32_to_e4m3(15 * ldexpf(1, -10)), 0x08); /* 7.5 * 2^-9 -> 8 * 2^-9 = 2^-6, a normal */
    cr_expect_eq(f32_to_e4m3(400.0f), 0x7C); /* tie between 384 (0x7C) and 416 (0x7D) */
    cr_expect_eq(f32_to_e4m3(432.0f), 0x7E); /* tie between 416 (0x7D) and 448 (0x7E) */
}

Test(dtype, e4m3_saturation_and_nan) {
    cr_expect_eq(f32_to_e4m3(448.0f), 0x7E);
    cr_expect_eq(f32_to_e4m3(449.0f), 0x7E);
    cr_expect_eq(f32_to_e4m3(464.0f), 0x7E);
    cr_expect_eq(f32_to_e4m3(1e30f), 0x7E);
    cr_expect_eq(f32_to_e4m3(INFINITY), 0x7E);
    cr_expect_eq(f32_to_e4m3(-INFINITY), 0xFE);
    cr_expect_eq(f32_to_e4m3(-1000.0f), 0xFE);
    cr_expect_eq(f32_to_e4m3(NAN), 0x7F);
    cr_expect_eq(f32_to_e4m3(-NAN), 0xFF);
    cr_expect_eq(f32_to_e4m3(440.0f), 0x7E); /* 440 is nearer 448 than 416 */
    cr_expect_eq(f32_to_e4m3(431.0f), 0x7D); /* 416 */
}

/* Brute force: nearest value among codes [0, ncodes) of a monotonic positive decoder, ties to the even code. */
static uint32_t nearest_code(double a, uint32_t ncodes, double (*dec)(uint32_t)) {
    uint32_t lo = 0, hi = ncodes - 1;
    if (a >= dec(hi)) return hi;
    while (hi - lo > 1) { /* invariant: dec(lo) <= a < dec(hi) */
        uint32_t mid = lo + (hi - lo) / 2;
        if (dec(mid) <= a) lo = mid;
        else hi = mid;
    }
    double dl = a - dec(lo), dh = dec(hi) - a;
    if (dl < dh) return lo;
    if (dh < dl) return hi;
    return (lo & 1) ? hi : lo;
}
static double dec_e4m3(uint32_t c) { return ref_e4m3((uint8_t)c); }
static double dec_f16(uint32_t c) { return ref_f16((uint16_t)c); }

static float random_float(void) {
    /* Random sign and mantissa, exponent spread over the interesting range [2^-30, 2^20]. */
    uint32_t u = rnd();
    uint32_t e = 97 + rnd() % 51;
    return fbits((u & 0x807FFFFFu) | (e << 23));
}

Test(dtype, f32_to_narrow_matches_brute_force) {
    for (int i = 0; i < 200000; i++) {
        float f = random_float();
        /* Short mantissas make exact ties common: 5 bits for e4m3, 11 for f16, 8 for bf16. */
        if (i % 4 == 1) f = fbits(bits(f) & 0xFFFC0000u);
        if (i % 4 == 2) f = fbits(bits(f) & 0xFFFFF000u);
        if (i % 4 == 3) f = fbits(bits(f) & 0xFFFF8000u);
        double a = fabs((double)f);
        uint32_t s = bits(f) >> 31;

        uint8_t e8 = f32_to_e4m3(f);
        uint32_t want8 = a >= 448 ? 0x7E : nearest_code(a, 0x7F, dec_e4m3); /* codes 0..0x7E are finite */
        cr_assert_eq(e8, (s << 7) | want8, "e4m3(%a) = 0x%02x, want 0x%02x", (double)f, e8, (s << 7) | want8);

        uint16_t h = f32_to_f16(f);
        uint32_t want16 = a >= 65520.0 ? 0x7C00 : nearest_code(a, 0x7C00, dec_f16);
        cr_assert_eq(h, (s << 15) | want16, "f16(%a) = 0x%04x, want 0x%04x", (double)f, h, (s << 15) | want16);

        /* bf16: the two candidates are the truncation and the next code up. */
        uint32_t lo = (bits(f) & 0x7FFFFFFFu) >> 16;
        double dl = a - fabs(ref_bf16((uint16_t)lo)), dh = fabs(ref_bf16((uint16_t)(lo + 1))) - a;
        uint32_t wantb = dl < dh ? lo : dh < dl ? lo + 1 : ((lo & 1) ? lo + 1 : lo);
        uint16_t b = f32_to_bf16(f);
        cr_assert_eq(b, (s << 15) | wantb, "bf16(%a) = 0x%04x, want 0x%04x", (double)f, b, (s << 15) | wantb);
    }
}

Test(dtype, array_converters_unaligned) {
    const float src[6] = {1.5f, -2.25f, 0.0f, 448.0f, 1e-3f, -7.0f};
    unsigned char buf[1 + 6 * 8 + 1];
    float back[6];
    for (int t = 0; t < DT_COUNT; t++) {
        memset(buf, 0xAB, sizeof buf);
        cr_assert_eq(dtype_from_f32(buf + 1, (mr_dtype)t, src, 6, NULL), 0);
        cr_assert_eq(dtype_to_f32(back, buf + 1, (mr_dtype)t, 6, NULL), 0);
        cr_expect_eq(buf[1 + 6 * dtype_size((mr_dtype)t)], 0xAB, "%s wrote past its end", dtype_name((mr_dtype)t));
        for (int i = 0; i < 6; i++) {
            float want;
            switch (t) {
            case DT_F32: want = src[i]; break;
            case DT_BF16: want = bf16_to_f32(f32_to_bf16(src[i])); break;
            case DT_F16: want = f16_to_f32(f32_to_f16(src[i])); break;
            case DT_F8_E4M3: want = e4m3_to_f32(f32_to_e4m3(src[i])); break;
            default: want = (float)nearbyint(src[i]); break; /* default rounding mode is to nearest even */
            }
            cr_expect_eq(back[i], want, "%s element %d: got %g want %g", dtype_name((mr_dtype)t), i, back[i], want);
        }
    }
    /* Exact little-endian layouts. */
    uint16_t bf;
    dtype_from_f32(&bf, DT_BF16, (const float[]){1.0f}, 1, NULL);
    cr_expect_eq(bf, 0x3F80);
    unsigned char e8;
    dtype_from_f32(&e8, DT_F8_E4M3, (const float[]){-448.0f}, 1, NULL);
    cr_expect_eq(e8, 0xFE);
}

Test(dtype, integer_conversions_round_and_clamp) {
    const float src[] = {2.5f, 3.5f, -2.5f, -0.5f, 1e10f, -1e10f, NAN, 1e19f, -1e19f, 16777216.0f};
    int32_t i32[10];
    int64_t i64[10];
    dtype_from_f32(i32, DT_I32, src, 10, NULL);
    dtype_from_f32(i64, DT_I64, src, 10, NULL);
    const int32_t w32[] = {2, 4, -2, 0, INT32_MAX, INT32_MIN, 0, INT32_MAX, INT32_MIN, 16777216};
    const int64_t w64[] = {2, 4, -2, 0, 10000000000LL, -10000000000LL, 0, INT64_MAX, INT64_MIN, 16777216};
    for (int i = 0; i < 10; i++) {
        cr_expect_eq(i32[i], w32[i], "I32[%d] = %d want %d", i, i32[i], w32[i]);
        cr_expect_eq(i64[i], w64[i], "I64[%d] = %lld want %lld", i, (long long)i64[i], (long long)w64[i]);
    }
    int64_t big[2] = {INT64_MAX, -3};
    float f[2];
    dtype_to_f32(f, big, DT_I64, 2, NULL);
    cr_expect_eq(f[0], 9223372036854775808.0f);
    cr_expect_eq(f[1], -3.0f);
}

Test(dtype, unknown_dtype_is_an_error) {
    mr_err e = {0};
    float f[1] = {0};
    cr_expect_eq(dtype_to_f32(f, f, DT_COUNT, 1, &e), MR_EINVAL);
    cr_expect(strstr(e.msg, "unknown dtype") != NULL, "%s", e.msg);
    cr_expect_eq(dtype_from_f32(f, (mr_dtype)-1, f, 1, &e), MR_EINVAL);
}
