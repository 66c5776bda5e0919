/* rope.c: YaRN RoPE on the interleaved-pair layout (see rope.h for the layout and numerics choices).
 *
 * Frequencies (MODEL-SPEC §5.4), replayed in HF's fp32 order (transformers _compute_yarn_parameters):
 *   pos_freq_i = theta^(2i/D)            fp32 (torch: base ** (arange(0, D, 2).float() / D))
 *   extra_i = 1 / pos_freq_i, inter_i = 1 / (s · pos_freq_i)
 *   ramp_i = clamp((i − low) / (high − low), 0, 1), ef_i = 1 − ramp_i     (low/high: §5.4 step 2, in double)
 *   ω_i = inter_i · (1 − ef_i) + extra_i · ef_i                       every operation rounded to fp32
 * A version of HF that derives s from max_position_embeddings / original_max_position_embeddings (some 4.4x/4.5x
 * releases did) agrees with this only when the config makes the two equal (true of every DeepSeek release).
 * The angle is the fp32 product (float)p · ω_i (HF's inv_freq @ position_ids in fp32, the reference's
 * torch.outer in fp32); cos/sin of that float angle are evaluated in double and rounded once. */
#include "kernels/cpu/rope.h"

#include <math.h>
#include <string.h>

#include "core/mem.h"

void rope_free(rope_table *rt) {
    if (!rt) return;
    mem_free(rt->inv_freq);
    mem_free(rt->cos_sin);
    memset(rt, 0, sizeof *rt);
}

/* get_mscale of HF / the reference: 0.1·m·ln(s) + 1, or 1 for s <= 1. */
static double yarn_get_mscale(double s, double m) {
    return s <= 1.0 ? 1.0 : 0.1 * m * log(s) + 1.0;
}

/* §5.4 step 2: the dimension index at which a frequency completes r rotations over L0 positions. */
static double yarn_correction_dim(double r, int D, double theta, int L0) {
    return (double)D * log((double)L0 / (r * 2.0 * M_PI)) / (2.0 * log(theta));
}

void rope_yarn_correction_range(const rope_yarn *yarn, int rope_dim, double theta, double *low, double *high) {
    double lo = floor(yarn_correction_dim(yarn->beta_fast, rope_dim, theta, yarn->original_max_pos));
    double hi = ceil(yarn_correction_dim(yarn->beta_slow, rope_dim, theta, yarn->original_max_pos));
    if (lo < 0.0) lo = 0.0;
    if (hi > rope_dim - 1) hi = rope_dim - 1;
    *low = lo;
    *high = hi;
}

double rope_yarn_attn_factor(const rope_yarn *yarn) {
    if (!yarn || !yarn->enabled) return 1.0;
    /* HF native: the ratio when both are set, else get_mscale(s) with m = 1 (1.3689 for s = 40; §5.4). The HF
     * remote code always uses the ratio with mscale_all_dim defaulting to 0; the two agree whenever both are
     * set, which every DeepSeek config does. */
    if (yarn->mscale != 0.0 && yarn->mscale_all_dim != 0.0)
        return yarn_get_mscale(yarn->factor, yarn->mscale) / yarn_get_mscale(yarn->factor, yarn->mscale_all_dim);
    return yarn_get_mscale(yarn->factor, 1.0);
}

double rope_softmax_scale(int d_qk, const rope_yarn *yarn) {
    double scale = 1.0 / sqrt((double)d_qk);
    if (yarn && yarn->enabled && yarn->mscale_all_dim != 0.0) {
        double m = yarn_get_mscale(yarn->factor, yarn->mscale_all_dim);
        scale *= m * m;
    }
    return scale;
}

/* cos and sin (times the attention factor) of pair i at position p. The table holds exactly these values, so a
 * position past the table gives the same bits as a tabulated one. */
static inline void rope_cs(const rope_table *rt, int32_t p, int i, float *c, float *s) {
    if (p >= 0 && p < rt->max_pos) {
        const float *cs = rt->cos_sin + ((size_t)p * (size_t)(rt->rope_dim / 2) + (size_t)i) * 2;
        *c = cs[0];
        *s = cs[1];
        return;
    }
    float phi = (float)p * rt->inv_freq[i];
    float af = (float)rt->attn_factor;
    *c = (float)cos((double)phi) * af;
    *s = (float)sin((double)phi) * af;
}

int rope_yarn_init(rope_table *rt, int rope_dim, double theta, const rope_yarn *yarn, int max_pos, mr_err *e) {
    memset(rt, 0, sizeof *rt);
    if (rope_dim <= 0 || rope_dim % 2 != 0)
        return err_set(e, MR_EINVAL, "rope: qk_rope_head_dim must be a positive even number, got %d", rope_dim);
    if (!(theta > 1.0)) return err_set(e, MR_EINVAL, "rope: rope_theta must be > 1, got %g", theta);
    if (max_pos < 0) return err_set(e, MR_EINVAL, "rope: max_pos must be >= 0, got %d", max_pos);
    if (yarn && yarn->enabled) {
        if (!(yarn->factor >= 1.0))
            return err_set(e, MR_EINVAL, "rope: rope_scaling.factor must be >= 1, got %g", yarn->factor);
        if (yarn->original_max_pos < 1)
            return err_set(e, MR_EINVAL, "rope: rope_scaling.original_max_position_embeddings must be >= 1, got %d",
                           yarn->original_max_pos);
        if (!(yarn->beta_fast > 0.0) || !(yarn->beta_slow > 0.0))
            return err_set(e, MR_EINVAL, "rope: rope_scaling.beta_fast and beta_slow must be > 0, got %g and %g",
                           yarn->beta_fast, yarn->beta_slow);
    }
    int half = rope_dim / 2;
    size_t ncs;
    if (size_mul((size_t)max_pos, (size_t)rope_dim, &ncs) || size_mul(ncs, sizeof(float), &ncs))
        return err_set(e, MR_ENOMEM, "rope: cos/sin table of %d positions x %d dims overflows", max_pos, rope_dim);
    rt->rope_dim = rope_dim;
    rt->max_pos = 0; /* the table is filled below; rope_cs must compute on the fly until then */
    rt->inv_freq = mem_alloc((size_t)half * sizeof(float));
    rt->cos_sin = ncs ? mem_alloc(ncs) : NULL;
    if (!rt->inv_freq || (ncs && !rt->cos_sin)) {
        rope_free(rt);
        return err_set(e, MR_ENOMEM, "rope: out of memory for a cos/sin table of %d positions x %d dims", max_pos,
                       rope_dim);
    }
    int yarn_on = yarn && yarn->enabled;
    double low = 0.0, high = 0.0;
    if (yarn_on) {
        rope_yarn_correction_range(yarn, rope_dim, theta, &low, &high);
        if (low == high) high += 0.001; /* HF/reference: prevent a zero-width ramp */
    }
    float theta_f = (float)theta, factor_f = yarn_on ? (float)yarn->factor : 1.0f;
    float low_f = (float)low, width_f = (float)(high - low);
    for (int i = 0; i < half; i++) {
        float ex = (float)(2 * i) / (float)rope_dim;
        float pos_freq = (float)pow((double)theta_f, (double)ex);
        float extra = 1.0f / pos_freq;
        if (!yarn_on) {
            rt->inv_freq[i] = extra;
            continue;
        }
        float inter = 1.0f / (factor_f * pos_freq);
        float ramp = ((float)i - low_f) / width_f;
        ramp = ramp < 0.0f ? 0.0f : ramp > 1.0f ? 1.0f : ramp;
        float ef = 1.0f - ramp;
        float a = inter * (1.0f - ef), b = extra * ef;
        rt->inv_freq[i] = a + b;
    }
    rt->attn_factor = rope_yarn_attn_factor(yarn);
    /* Fill the table through rope_cs itself (max_pos still 0 → the on-the-fly branch), so both agree bitwise. */
    #pragma omp parallel for schedule(static) if (max_pos > 256)
    for (int p = 0; p < max_pos; p++)
        for (int i = 0; i < half; i++) {
            float *cs = rt->cos_sin + ((size_t)p * (size_t)half + (size_t)i) * 2;
            rope_cs(rt, p, i, &cs[0], &cs[1]);
        }
    rt->max_pos = max_pos;
    return MR_OK;
}

/* dir = +1: y = R x (forward); dir = -1: y = Rᵀ x (backward). Pair (2i, 2i+1) is the complex number
 * x[2i] + j·x[2i+1] multiplied by (c ± j·s). */
static void rope_apply(float *x, const int32_t *pos, int T, int n_heads, int row_stride, int head_stride,
                       const rope_table *rt, int dir) {
    int half = rt->rope_dim / 2;
    #pragma omp parallel for schedule(static) if ((long)T * n_heads * rt->rope_dim > 32768)
    for (int t = 0; t < T; t++) {
        float *xt = x + (size_t)t * (size_t)row_stride;
        for (int i = 0; i < half; i++) {
            float c, s;
            rope_cs(rt, pos[t], i, &c, &s);
            if (dir < 0) s = -s;
            for (int h = 0; h < n_heads; h++) {
                float *pr = xt + (size_t)h * (size_t)head_stride + 2 * (size_t)i;
                float x0 = pr[0], x1 = pr[1];
                pr[0] = x0 * c - x1 * s;
                pr[1] = x0 * s + x1 * c;
            }
        }
    }
}

void rope_forward(float *x, const int32_t *pos, int T, int n_heads, int row_stride, int head_stride,
                  const rope_table *rt) {
    rope_apply(x, pos, T, n_heads, row_stride, head_stride, rt, +1);
}

void rope_backward(float *dx, const int32_t *pos, int T, int n_heads, int row_stride, int head_stride,
                   const rope_table *rt) {
    rope_apply(dx, pos, T, n_heads, row_stride, head_stride, rt, -1);
}
