/* dtype.h: the element types of checkpoint tensors (safetensors names) and their conversions to and from f32.
 *
 * The one idea: f32 is the exchange format. Every stored type converts to f32 exactly (bf16, f16 and e4m3 are
 * subsets of f32), and f32 converts back by round-to-nearest-even (MODEL-SPEC §10.4, §10.5), so
 * x == from_f32(to_f32(x)) for every non-NaN pattern x. The scalar converters are inline (and host+device under
 * nvcc) so kernels share the exact same text; the array converters live in dtype.c.
 *
 * Formats: BF16 = upper half of an f32. F16 = IEEE 754 binary16 (subnormals, inf, NaN). F8_E4M3 = the "fn"
 * variant: bias 7, no infinities, S.1111.111 is NaN, max finite 448, subnormal step 2^-9; f32 -> e4m3 saturates
 * (|x| >= 448 and ±inf give ±448, NaN gives NaN), as CUDA's __NV_SATFINITE does. */
#ifndef MOERL_DTYPE_H
#define MOERL_DTYPE_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "core/err.h"

#ifdef __CUDACC__
#define DTYPE_FN static inline __host__ __device__
#else
#define DTYPE_FN static inline
#endif

typedef enum mr_dtype {
    DT_F32 = 0,
    DT_BF16,
    DT_F16,
    DT_F8_E4M3,
    DT_I32,
    DT_I64,
    DT_COUNT
} mr_dtype;

/* Bytes per element (0 for an out-of-range value). */
size_t dtype_size(mr_dtype t);
/* The safetensors name ("F32", "BF16", "F16", "F8_E4M3", "I32", "I64"); "?" for an out-of-range value. */
const char *dtype_name(mr_dtype t);
/* Parses a safetensors name (exact, case-sensitive). Returns 0 and stores the type, or -1 when unknown. */
int dtype_from_name(const char *name, mr_dtype *out);
/* "F32, BF16, F16, F8_E4M3, I32, I64": for error messages that list what was expected. */
const char *dtype_all_names(void);

DTYPE_FN uint32_t dtype_f32_bits(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    return u;
}
DTYPE_FN float dtype_bits_f32(uint32_t u) {
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

/* ---- BF16 (MODEL-SPEC §10.5) ---- */
DTYPE_FN float bf16_to_f32(uint16_t h) { return dtype_bits_f32((uint32_t)h << 16); }

DTYPE_FN uint16_t f32_to_bf16(float f) {
    uint32_t u = dtype_f32_bits(f);
    if ((u & 0x7FFFFFFFu) > 0x7F800000u) return (uint16_t)((u >> 16) | 0x0040u); /* NaN: keep it quiet NaN */
    /* Round to nearest even on the low 16 bits; a carry into the exponent is the correct rounding (up to inf). */
    u += 0x7FFFu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

/* ---- F16 (IEEE 754 binary16) ---- */
DTYPE_FN float f16_to_f32(uint16_t h) {
    uint32_t s = (uint32_t)(h & 0x8000u) << 16;
    uint32_t ex = (h >> 10) & 0x1Fu, mn = h & 0x3FFu;
    if (ex == 0x1F) return dtype_bits_f32(s | 0x7F800000u | (mn << 13)); /* inf, NaN (payload kept) */
    if (ex != 0) return dtype_bits_f32(s | ((ex + 112u) << 23) | (mn << 13));
    /* Zero or subnormal: mn * 2^-24, exact in f32. */
    float v = (float)mn * 5.9604644775390625e-8f;
    return dtype_bits_f32(s | dtype_f32_bits(v));
}

/* Rounds q (0 <= q < 2^24, an exact multiple of a power of two) to the nearest integer, ties to even. Exact:
 * no dependence on the floating-point rounding mode. */
DTYPE_FN uint32_t dtype_round_half_even(float q) {
    uint32_t n = (uint32_t)q; /* truncation */
    float frac = q - (float)n;
    if (frac > 0.5f || (frac == 0.5f && (n & 1u))) n++;
    return n;
}

DTYPE_FN uint16_t f32_to_f16(float f) {
    uint32_t u = dtype_f32_bits(f);
    uint16_t s = (uint16_t)((u >> 16) & 0x8000u);
    uint32_t a = u & 0x7FFFFFFFu;
    if (a > 0x7F800000u) return (uint16_t)(s | 0x7E00u | ((a >> 13) & 0x3FFu)); /* NaN stays NaN */
    if (a >= 0x38800000u) {                                                     /* |f| >= 2^-14: normal */
        uint32_t v = a >> 13, rem = a & 0x1FFFu;
        if (rem > 0x1000u || (rem == 0x1000u && (v & 1u))) v++;
        v -= (uint32_t)(127 - 15) << 10;
        if (v >= 0x7C00u) v = 0x7C00u; /* overflow rounds to inf (also covers f = inf) */
        return (uint16_t)(s | v);
    }
    /* Subnormal half: value = n * 2^-24; n == 1024 is the smallest normal, whose code is also 1024. */
    float q = dtype_bits_f32(a) * 16777216.0f;
    return (uint16_t)(s | dtype_round_half_even(q));
}

/* ---- F8 E4M3 "fn" (MODEL-SPEC §10.4) ---- */
DTYPE_FN float e4m3_to_f32(uint8_t q) {
    uint32_t s = (uint32_t)(q & 0x80u) << 24;
    uint32_t ex = (q >> 3) & 0xFu, mn = q & 7u;
    if (ex == 15 && mn == 7) return dtype_bits_f32(s | 0x7FC00000u); /* NaN */
    if (ex != 0) return dtype_bits_f32(s | ((ex + 120u) << 23) | (mn << 20));
    float v = (float)mn * 0.001953125f; /* 2^-6 * mn/8 = mn * 2^-9 */
    return dtype_bits_f32(s | dtype_f32_bits(v));
}

DTYPE_FN uint8_t f32_to_e4m3(float f) {
    uint32_t u = dtype_f32_bits(f);
    uint8_t s = (uint8_t)((u >> 24) & 0x80u);
    uint32_t a = u & 0x7FFFFFFFu;
    if (a > 0x7F800000u) return (uint8_t)(s | 0x7Fu); /* NaN */
    if (a >= 0x43E00000u) return (uint8_t)(s | 0x7Eu); /* |f| >= 448 or inf: saturate */
    if (a >= 0x3C800000u) {                            /* |f| >= 2^-6: normal */
        uint32_t v = a >> 20, rem = a & 0xFFFFFu;
        if (rem > 0x80000u || (rem == 0x80000u && (v & 1u))) v++;
        v -= (uint32_t)(127 - 7) << 3; /* < 448 rounds to at most 448 = 0x7E: never reaches NaN */
        return (uint8_t)(s | v);
    }
    /* Subnormal: value = n * 2^-9; n == 8 is the smallest normal, whose code is also 8. */
    float q = dtype_bits_f32(a) * 512.0f;
    return (uint8_t)(s | dtype_round_half_even(q));
}

/* ---- arrays ---- */
/* dst[i] = f32(src[i]) for n elements of type t. src may be unaligned (it is read bytewise through memcpy);
 * integers convert with rounding to nearest f32. Returns 0, or MR_EINVAL (message in e) for an unknown type. */
int dtype_to_f32(float *dst, const void *src, mr_dtype t, size_t n, mr_err *e);
/* dst[i] = t(src[i]) for n elements: RNE for bf16/f16, saturating RNE for e4m3; for I32/I64 the value is
 * rounded to nearest (ties to even) and clamped to the type's range, NaN gives 0. dst may be unaligned. */
int dtype_from_f32(void *dst, mr_dtype t, const float *src, size_t n, mr_err *e);

#endif
