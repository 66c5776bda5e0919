/* dtype.c: dtype names and sizes, and the array converters to and from f32 (scalar rules in dtype.h).
 * Sources and destinations are raw bytes from mmapped files, so elements are moved with memcpy: a tensor in a
 * safetensors file written by another tool need not be aligned to its element size. */
#include "core/dtype.h"

#include <math.h>

#if !defined(__BYTE_ORDER__) || __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "moerl reads little-endian tensor data in place; a big-endian host needs byte swaps here"
#endif

static const struct {
    const char *name;
    size_t size;
} dtype_info[DT_COUNT] = {
    [DT_F32] = {"F32", 4}, [DT_BF16] = {"BF16", 2}, [DT_F16] = {"F16", 2},
    [DT_F8_E4M3] = {"F8_E4M3", 1}, [DT_I32] = {"I32", 4}, [DT_I64] = {"I64", 8},
};

size_t dtype_size(mr_dtype t) { return (unsigned)t < DT_COUNT ? dtype_info[t].size : 0; }

const char *dtype_name(mr_dtype t) { return (unsigned)t < DT_COUNT ? dtype_info[t].name : "?"; }

int dtype_from_name(const char *name, mr_dtype *out) {
    for (int i = 0; i < DT_COUNT; i++) {
        if (!strcmp(name, dtype_info[i].name)) {
            *out = (mr_dtype)i;
            return 0;
        }
    }
    return -1;
}

const char *dtype_all_names(void) { return "F32, BF16, F16, F8_E4M3, I32, I64"; }

int dtype_to_f32(float *dst, const void *src, mr_dtype t, size_t n, mr_err *e) {
    const unsigned char *p = src;
    switch (t) {
    case DT_F32:
        memcpy(dst, src, n * sizeof(float));
        return 0;
    case DT_BF16:
        for (size_t i = 0; i < n; i++) {
            uint16_t h;
            memcpy(&h, p + 2 * i, 2);
            dst[i] = bf16_to_f32(h);
        }
        return 0;
    case DT_F16:
        for (size_t i = 0; i < n; i++) {
            uint16_t h;
            memcpy(&h, p + 2 * i, 2);
            dst[i] = f16_to_f32(h);
        }
        return 0;
    case DT_F8_E4M3: {
        float lut[256]; /* 256 decodes are cheaper than one per element for any real tensor */
        for (int q = 0; q < 256; q++) lut[q] = e4m3_to_f32((uint8_t)q);
        for (size_t i = 0; i < n; i++) dst[i] = lut[p[i]];
        return 0;
    }
    case DT_I32:
        for (size_t i = 0; i < n; i++) {
            int32_t v;
            memcpy(&v, p + 4 * i, 4);
            dst[i] = (float)v;
        }
        return 0;
    case DT_I64:
        for (size_t i = 0; i < n; i++) {
            int64_t v;
            memcpy(&v, p + 8 * i, 8);
            dst[i] = (float)v;
        }
        return 0;
    default:
        return err_set(e, MR_EINVAL, "dtype_to_f32: unknown dtype %d", (int)t);
    }
}

/* Nearest integer, ties to even, clamped to [lo, hi]; NaN -> 0. lo/hi are exact powers of two in double. */
static double round_clamp(float f, double lo, double hi) {
    if (isnan(f)) return 0;
    double d = (double)f;
    if (d <= lo) return lo;
    if (d >= hi) return hi;
    double r = floor(d), frac = d - r;
    if (frac > 0.5 || (frac == 0.5 && fmod(r, 2.0) != 0)) r += 1;
    return r;
}

int dtype_from_f32(void *dst, mr_dtype t, const float *src, size_t n, mr_err *e) {
    unsigned char *p = dst;
    switch (t) {
    case DT_F32:
        memcpy(dst, src, n * sizeof(float));
        return 0;
    case DT_BF16:
        for (size_t i = 0; i < n; i++) {
            uint16_t h = f32_to_bf16(src[i]);
            memcpy(p + 2 * i, &h, 2);
        }
        return 0;
    case DT_F16:
        for (size_t i = 0; i < n; i++) {
            uint16_t h = f32_to_f16(src[i]);
            memcpy(p + 2 * i, &h, 2);
        }
        return 0;
    case DT_F8_E4M3:
        for (size_t i = 0; i < n; i++) p[i] = f32_to_e4m3(src[i]);
        return 0;
    case DT_I32:
        for (size_t i = 0; i < n; i++) {
            int32_t v = (int32_t)round_clamp(src[i], -2147483648.0, 2147483647.0);
            memcpy(p + 4 * i, &v, 4);
        }
        return 0;
    case DT_I64:
        for (size_t i = 0; i < n; i++) {
            /* 2^63 itself is not an int64; the largest float below it is 2^63 - 2^39, so clamp there. */
            double r = round_clamp(src[i], -9223372036854775808.0, 9223372036854775808.0);
            int64_t v = r >= 9223372036854775808.0 ? INT64_MAX : (int64_t)r;
            memcpy(p + 8 * i, &v, 8);
        }
        return 0;
    default:
        return err_set(e, MR_EINVAL, "dtype_from_f32: unknown dtype %d", (int)t);
    }
}
