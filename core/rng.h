/* rng.h: counter-based random numbers (Philox4x32-10, Salmon et al., SC'11 "Parallel random numbers: as easy
 * as 1, 2, 3"). Every draw is a pure function of (seed, stream, counter): no hidden state, so the CPU and the GPU
 * draw the same numbers, a sample's randomness depends only on its own (seed, prompt, sample) stream, and a
 * generator is checkpointed by three integers.
 *
 * Layout: key = (seed lo, seed hi); counter block = (block lo, block hi, stream lo, stream hi). Each Philox call
 * yields 4 words; word i of the stream is word i%4 of block i/4. */
#ifndef MOERL_RNG_H
#define MOERL_RNG_H

#include <stdint.h>
#include <stddef.h>
#include <math.h>

#ifdef __CUDACC__
#define RNG_FN static inline __host__ __device__
#else
#define RNG_FN static inline
#endif

/* One Philox4x32 bijection with 10 rounds. Inline so device code (kernels/cuda) shares the exact same text. */
RNG_FN void philox4x32_10(const uint32_t ctr_in[4], const uint32_t key_in[2], uint32_t out[4]) {
    uint32_t c0 = ctr_in[0], c1 = ctr_in[1], c2 = ctr_in[2], c3 = ctr_in[3];
    uint32_t k0 = key_in[0], k1 = key_in[1];
    for (int r = 0; r < 10; r++) {
        if (r > 0) {
            k0 += 0x9E3779B9u; /* golden ratio */
            k1 += 0xBB67AE85u; /* sqrt(3) - 1 */
        }
        uint64_t p0 = (uint64_t)0xD2511F53u * c0;
        uint64_t p1 = (uint64_t)0xCD9E8D57u * c2;
        uint32_t hi0 = (uint32_t)(p0 >> 32), lo0 = (uint32_t)p0;
        uint32_t hi1 = (uint32_t)(p1 >> 32), lo1 = (uint32_t)p1;
        uint32_t n0 = hi1 ^ c1 ^ k0, n1 = lo1, n2 = hi0 ^ c3 ^ k1, n3 = lo0;
        c0 = n0; c1 = n1; c2 = n2; c3 = n3;
    }
    out[0] = c0; out[1] = c1; out[2] = c2; out[3] = c3;
}

/* The 4 words of block `block` of stream `stream` under `seed`. */
RNG_FN void rng_block(uint64_t seed, uint64_t stream, uint64_t block, uint32_t out[4]) {
    uint32_t ctr[4] = {(uint32_t)block, (uint32_t)(block >> 32), (uint32_t)stream, (uint32_t)(stream >> 32)};
    uint32_t key[2] = {(uint32_t)seed, (uint32_t)(seed >> 32)};
    philox4x32_10(ctr, key, out);
}

/* A float in [0, 1) from the top 24 bits of a word (exact in float, identical on every platform). */
RNG_FN float rng_u01(uint32_t w) { return (float)(w >> 8) * (1.0f / 16777216.0f); }
/* A float in (0, 1]: never 0, safe under log. */
RNG_FN float rng_u01_open0(uint32_t w) { return ((float)(w >> 8) + 1.0f) * (1.0f / 16777216.0f); }

/* A sequential generator over one stream; its whole state is (seed, stream, pos). */
typedef struct rng {
    uint64_t seed, stream;
    uint64_t pos; /* index of the next 32-bit word of the stream */
} rng;

void rng_init(rng *r, uint64_t seed, uint64_t stream);
uint32_t rng_u32(rng *r);
uint64_t rng_u64(rng *r);
float rng_uniform(rng *r);            /* [0, 1) */
double rng_uniform_double(rng *r);    /* [0, 1), 53 bits */
uint32_t rng_below(rng *r, uint32_t n); /* uniform in [0, n), unbiased (Lemire); n > 0 */
float rng_normal(rng *r);             /* standard normal, Box-Muller over two words */

/* A stream id derived from up to three indices (e.g. purpose, prompt index, sample index): a Philox hash, so
 * distinct tuples give unrelated streams. */
uint64_t rng_stream_id(uint64_t a, uint64_t b, uint64_t c);

/* x[i] = mean + std * N_i where N_i depends only on (seed, stream, i): block i, words 0 and 1, Box-Muller
 * cosine branch. The CUDA backend computes the same formula (kernels/cuda/rng.cu). */
void rng_fill_normal(float *x, size_t n, float mean, float std, uint64_t seed, uint64_t stream);
/* x[i] = uniform [0,1) from word 0 of block i. */
void rng_fill_uniform(float *x, size_t n, uint64_t seed, uint64_t stream);

/* The normal draw for block i, shared text with the GPU. */
RNG_FN float rng_normal_at(uint64_t seed, uint64_t stream, uint64_t i) {
    uint32_t w[4];
    rng_block(seed, stream, i, w);
    float u1 = rng_u01_open0(w[0]), u2 = rng_u01(w[1]);
    /* double inside: CPU libm and CUDA agree to well under a float ulp, so both round to the same float in all
     * but rare cases (tests/gpu_backend.c bounds the difference). */
    return (float)(sqrt(-2.0 * log((double)u1)) * cos(6.283185307179586 * (double)u2));
}

#endif
