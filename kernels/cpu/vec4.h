/* vec4.h: fixed-order 4-float vector helpers of the sliding-window attention (kernels/cpu/attention_swa.c): its
 * pooled keys and values are built with them, in an order that depends only on the inputs. */
#ifndef MOERL_KERNELS_CPU_VEC4_H
#define MOERL_KERNELS_CPU_VEC4_H

#include <string.h>

typedef float v4f __attribute__((vector_size(16)));

static inline v4f v4_load(const float *p) {
    v4f v;
    memcpy(&v, p, sizeof v);
    return v;
}

static inline void v4_store(float *p, v4f v) { memcpy(p, &v, sizeof v); }

/* Fixed-order dot product: 16 lanes (four 4-vectors) over the multiples of 16, then 4-vector steps into the first
 * accumulator, a fixed combination tree, and the scalar tail. The result depends only on (a, b, n). */
static inline float vec4_dot(const float *restrict a, const float *restrict b, int n) {
    v4f c0 = {0, 0, 0, 0}, c1 = c0, c2 = c0, c3 = c0;
    int i = 0;
    for (; i + 16 <= n; i += 16) {
        c0 += v4_load(a + i) * v4_load(b + i);
        c1 += v4_load(a + i + 4) * v4_load(b + i + 4);
        c2 += v4_load(a + i + 8) * v4_load(b + i + 8);
        c3 += v4_load(a + i + 12) * v4_load(b + i + 12);
    }
    for (; i + 4 <= n; i += 4) c0 += v4_load(a + i) * v4_load(b + i);
    v4f c = (c0 + c2) + (c1 + c3);
    float s = (c[0] + c[2]) + (c[1] + c[3]);
    for (; i < n; i++) s += a[i] * b[i];
    return s;
}

/* y += a · x (elementwise: no ordering question) */
static inline void vec4_axpy(float *restrict y, float a, const float *restrict x, int n) {
    int i = 0;
    v4f va = {a, a, a, a};
    for (; i + 8 <= n; i += 8) {
        v4_store(y + i, v4_load(y + i) + va * v4_load(x + i));
        v4_store(y + i + 4, v4_load(y + i + 4) + va * v4_load(x + i + 4));
    }
    for (; i + 4 <= n; i += 4) v4_store(y + i, v4_load(y + i) + va * v4_load(x + i));
    for (; i < n; i++) y[i] += a * x[i];
}

/* y *= a */
static inline void vec4_scal(float *y, float a, int n) {
    int i = 0;
    v4f va = {a, a, a, a};
    for (; i + 4 <= n; i += 4) v4_store(y + i, v4_load(y + i) * va);
    for (; i < n; i++) y[i] *= a;
}

#endif
