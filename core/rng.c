/* rng.c: the sequential generator and the fills over Philox4x32-10 (see rng.h). */
#include "core/rng.h"

#include <math.h>

void rng_init(rng *r, uint64_t seed, uint64_t stream) {
    r->seed = seed;
    r->stream = stream;
    r->pos = 0;
}

uint32_t rng_u32(rng *r) {
    uint32_t w[4];
    rng_block(r->seed, r->stream, r->pos >> 2, w);
    return w[r->pos++ & 3];
}

uint64_t rng_u64(rng *r) {
    uint64_t lo = rng_u32(r);
    return lo | ((uint64_t)rng_u32(r) << 32);
}

float rng_uniform(rng *r) { return rng_u01(rng_u32(r)); }

double rng_uniform_double(rng *r) { return (double)(rng_u64(r) >> 11) * (1.0 / 9007199254740992.0); }

uint32_t rng_below(rng *r, uint32_t n) {
    /* Lemire's nearly-divisionless method: reject the low band that would bias the multiply-shift. */
    uint64_t m = (uint64_t)rng_u32(r) * n;
    uint32_t lo = (uint32_t)m;
    if (lo < n) {
        uint32_t t = (uint32_t)(-n) % n;
        while (lo < t) {
            m = (uint64_t)rng_u32(r) * n;
            lo = (uint32_t)m;
        }
    }
    return (uint32_t)(m >> 32);
}

float rng_normal(rng *r) {
    float u1 = rng_u01_open0(rng_u32(r)), u2 = rng_u01(rng_u32(r));
    return (float)(sqrt(-2.0 * log((double)u1)) * cos(6.283185307179586 * (double)u2));
}

uint64_t rng_stream_id(uint64_t a, uint64_t b, uint64_t c) {
    uint32_t ctr[4] = {(uint32_t)b, (uint32_t)(b >> 32), (uint32_t)c, (uint32_t)(c >> 32)};
    uint32_t key[2] = {(uint32_t)a ^ 0x6d6f6572u /* "moer" */, (uint32_t)(a >> 32) ^ 0x6c000000u};
    uint32_t out[4];
    philox4x32_10(ctr, key, out);
    return (uint64_t)out[0] | ((uint64_t)out[1] << 32);
}

void rng_fill_normal(float *x, size_t n, float mean, float std, uint64_t seed, uint64_t stream) {
#pragma omp parallel for schedule(static) if (n > 65536)
    for (size_t i = 0; i < n; i++) x[i] = mean + std * rng_normal_at(seed, stream, i);
}

void rng_fill_uniform(float *x, size_t n, uint64_t seed, uint64_t stream) {
#pragma omp parallel for schedule(static) if (n > 65536)
    for (size_t i = 0; i < n; i++) {
        uint32_t w[4];
        rng_block(seed, stream, i, w);
        x[i] = rng_u01(w[0]);
    }
}
