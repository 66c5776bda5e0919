/* test_model.c: the whole model against the independent PyTorch reference (tests/ref/deepseek_ref.py golden
 * fixtures: logits, MTP logits, losses, balance), finite-difference gradients of the whole model with every
 * option on, and loading errors (missing tensor, wrong shape, wrong dtype, truncated shard). */
#include <criterion/criterion.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/mem.h"
#include "core/rng.h"
#include "core/safetensors.h"
#include "model/model.h"
#include "tests/testutil.h"

static char *golden(const char *cas, const char *file) {
    static char buf[4][1024];
    static int i;
    char *b = buf[i++ & 3];
    snprintf(b, 1024, "%s/tests/fixtures/golden/%s%s%s", tu_src(), cas, file ? "/" : "", file ? file : "");
    return b;
}

static int read_ids(const char *cas, int32_t *ids, int cap) {
    char *txt = tu_read(golden(cas, "ids.txt"), NULL);
    cr_assert_not_null(txt);
    int n = 0;
    char *p = txt, *end;
    for (long v; n < cap && (v = strtol(p, &end, 10), end != p); p = end) ids[n++] = (int32_t)v;
    free(txt);
    return n;
}

static double loss_value(const char *cas, const char *key) {
    char *txt = tu_read(golden(cas, "loss.txt"), NULL);
    cr_assert_not_null(txt);
    double v = NAN;
    for (char *line = strtok(txt, "\n"); line; line = strtok(NULL, "\n")) {
        char k[64];
        double x;
        if (sscanf(line, "%63s %lf", k, &x) == 2 && !strcmp(k, key)) v = x;
    }
    free(txt);
    return v;
}

/* ||a - b|| / ||b|| and max|a - b| / max|b| */
static void rel_err(const float *a, const float *b, size_t n, double *rel_norm, double *rel_max) {
    double num = 0, den = 0, mx = 0, mb = 0;
    for (size_t i = 0; i < n; i++) {
        double dlt = (double)a[i] - b[i];
        num += dlt * dlt;
        den += (double)b[i] * b[i];
        if (fabs(dlt) > mx) mx = fabs(dlt);
        if (fabs(b[i]) > mb) mb = fabs(b[i]);
    }
    *rel_norm = sqrt(num / den);
    *rel_max = mx / mb;
}

static void check_case(const char *cas, mm_mode mm) {
    mr_err e = {0};
    model_params p;
    cr_assert_eq(params_load(&p, golden(cas, NULL), &e), MR_OK, "%s: %s", cas, e.msg);
    int32_t ids[64];
    int T = read_ids(cas, ids, 64);
    model m;
    model_opts opt = {.mm = mm, .mtp_weight = 0.3f, .balance_alpha = 0};
    cr_assert_eq(model_init(&m, &p, &opt, T, &e), MR_OK, "%s", e.msg);
    model_batch b = {.ids = ids, .T = T};
    cr_assert_eq(model_forward(&m, &b, 0, NULL, &e), MR_OK, "%s", e.msg);
    const int V = m.p.cfg.vocab_size;
    size_t n;
    float *ref = (float *)tu_read(golden(cas, "logits.f32"), &n);
    cr_assert_eq(n, (size_t)T * V * sizeof(float), "%s: logits.f32 size", cas);
    double rn, rm;
    rel_err(model_logits(&m), ref, (size_t)T * V, &rn, &rm);
    fprintf(stderr, "%s mm=%d: main logits rel %.3g max %.3g\n", cas, (int)mm, rn, rm);
    cr_expect_lt(rn, 1e-4, "%s: main logits relative error %g (max %g)", cas, rn, rm);
    cr_expect_lt(rm, 1e-4, "%s: main logits max error %g of max|ref|", cas, rm);
    free(ref);
    int D = m.p.cfg.num_nextn_predict_layers;
    if (D > 0) {
        float *mref = (float *)tu_read(golden(cas, "mtp_logits.f32"), &n);
        cr_assert_not_null(mref);
        size_t off = 0;
        for (int k = 1; k <= D; k++) {
            rel_err(model_mtp_logits(&m, k), mref + off, (size_t)(T - k) * V, &rn, &rm);
            cr_expect_lt(rn, 1e-4, "%s: MTP depth %d logits relative error %g", cas, k, rn);
            off += (size_t)(T - k) * V;
        }
        cr_expect_eq(off * sizeof(float), n);
        free(mref);
    }
    /* losses: main mean CE over rows 0..T-2, MTP depth k over rows whose target exists */
    int32_t tgt[64];
    for (int t = 0; t < T; t++) tgt[t] = t + 1 < T ? ids[t + 1] : -1;
    b.targets = tgt;
    model_loss ls;
    cr_assert_eq(model_forward(&m, &b, 0, &ls, &e), MR_OK, "%s", e.msg);
    double want = loss_value(cas, "main");
    cr_expect_lt(fabs(ls.main - want), 1e-4 * want, "%s: main loss %.8f want %.8f", cas, ls.main, want);
    for (int k = 1; k <= D; k++) {
        char key[16];
        snprintf(key, sizeof key, "mtp%d", k);
        want = loss_value(cas, key);
        cr_expect_lt(fabs(ls.mtp[k - 1] - want), 1e-4 * want, "%s: %s loss %.8f want %.8f", cas, key, ls.mtp[k - 1], want);
    }
    model_free(&m);
}

Test(model_golden, v3_full) { check_case("v3_full", MM_DET); }
Test(model_golden, v3_full_fast_gemm) { check_case("v3_full", MM_FAST); }
Test(model_golden, v3_no_qlora) { check_case("v3_no_qlora", MM_DET); }
Test(model_golden, v3_fp8_sharded) { check_case("v3_fp8_sharded", MM_DET); }
Test(model_golden, v2_gate) { check_case("v2_gate", MM_DET); }
Test(model_golden, v2_greedy) { check_case("v2_greedy", MM_DET); }

/* ------------------------------------------------------------------ finite differences, whole model */

/* All routing decisions of the latest forward, to detect a perturbation that flips a top-k choice. */
static void routing_snapshot(const model *m, int32_t *out, size_t *n) {
    size_t k = 0;
    for (int l = 0; l < m->p.n_layers; l++) {
        const int64_t *load = model_layer_load(m, l);
        if (!load) continue;
        for (int x = 0; x < m->moe.E; x++) out[k++] = (int32_t)load[x];
    }
    *n = k;
}

static void fd_check(int swa) {
    mr_err e = {0};
    model_config c;
    tu_config_all_options(&c);
    if (swa) { /* sliding window of 3 + average-pooled blocks of 2 older tokens */
        c.moerl_swa_window = 3;
        c.moerl_swa_ratio = 2;
    }
    model_params p;
    cr_assert_eq(params_init(&p, &c, &e), MR_OK, "%s", e.msg);
    params_init_random(&p, 42, 0.3f);
    for (int i = 0; i < p.n_entries; i++) /* random router biases and non-trivial norm gains */
        if (p.entries[i].flags & PARAM_NO_DECAY) {
            float *x = p.data + p.entries[i].offset;
            rng_fill_normal(x, p.entries[i].numel, (p.entries[i].flags & PARAM_BUFFER) ? 0.0f : 1.0f, 0.2f, 7,
                            (uint64_t)i);
        }
    enum { T = 13 };
    int32_t ids[T], tgt[T], pos[T], doc[T];
    for (int t = 0; t < T; t++) { /* two packed documents: rows 0..7 and 8..12 */
        ids[t] = (int32_t)((t * 17 + 5) % c.vocab_size);
        doc[t] = t < 8 ? 0 : 8;
        pos[t] = t - doc[t];
    }
    for (int t = 0; t < T; t++) tgt[t] = (t + 1 < T && doc[t + 1] == doc[t]) ? ids[t + 1] : -1;
    tgt[2] = -1; /* a masked prompt position */
    model m;
    model_opts opt = {.mm = MM_DET, .mtp_weight = 0.5f, .balance_alpha = 0.1f};
    cr_assert_eq(model_init(&m, &p, &opt, T, &e), MR_OK, "%s", e.msg);
    model_batch b = {.ids = ids, .pos = pos, .doc_start = doc, .targets = tgt, .T = T};
    model_loss ls;
    cr_assert_eq(model_forward(&m, &b, 1, &ls, &e), MR_OK, "%s", e.msg);
    cr_assert(ls.balance > 0 && ls.mtp[0] > 0 && ls.mtp[1] > 0, "every loss term is active");
    cr_assert_eq(model_backward(&m, &b, &e), MR_OK, "%s", e.msg);
    int32_t route0[1024], route1[1024];
    size_t nr0, nr1;
    cr_assert_eq(model_forward(&m, &b, 0, &ls, &e), MR_OK);
    routing_snapshot(&m, route0, &nr0);

    int checked = 0, skipped = 0, bad = 0;
    for (int i = 0; i < m.p.n_entries; i++) {
        const param_entry *pe = &m.p.entries[i];
        if (pe->flags & PARAM_BUFFER) {
            for (size_t j = 0; j < pe->numel; j++) cr_assert_eq(m.p.grad[pe->offset + j], 0.0f, "%s has a gradient", pe->name);
            continue;
        }
        /* the element with the largest |gradient|, and one more fixed element */
        size_t jmax = 0;
        for (size_t j = 0; j < pe->numel; j++)
            if (fabsf(m.p.grad[pe->offset + j]) > fabsf(m.p.grad[pe->offset + jmax])) jmax = j;
        size_t picks[2] = {jmax, (size_t)(i * 7919) % pe->numel};
        for (int q = 0; q < 2; q++) {
            float *w = m.p.data + pe->offset + picks[q];
            double an = m.p.grad[pe->offset + picks[q]];
            const float h = 1e-2f;
            float w0 = *w;
            model_loss lp, lm;
            *w = w0 + h;
            model_forward(&m, &b, 0, &lp, &e);
            routing_snapshot(&m, route1, &nr1);
            int flipped = memcmp(route0, route1, nr0 * sizeof(int32_t)) != 0;
            *w = w0 - h;
            model_forward(&m, &b, 0, &lm, &e);
            routing_snapshot(&m, route1, &nr1);
            flipped |= memcmp(route0, route1, nr0 * sizeof(int32_t)) != 0;
            *w = w0;
            if (flipped) {
                skipped++;
                continue;
            }
            double fd = (lp.total - lm.total) / (2.0 * h);
            double tol = 2e-2 * fabs(an) + 2e-4;
            checked++;
            if (fabs(fd - an) > tol) {
                bad++;
                fprintf(stderr, "FD mismatch %s[%zu]: analytic %.6g numeric %.6g\n", pe->name, picks[q], an, fd);
            }
        }
    }
    fprintf(stderr, "model FD%s: %d elements checked, %d skipped (routing flip), %d mismatches\n", swa ? " (swa)" : "", checked, skipped, bad);
    cr_expect_eq(bad, 0);
    cr_expect_gt(checked, 2 * m.p.n_entries * 8 / 10);
    model_free(&m);
}

Test(model_grad, finite_differences_every_tensor) { fd_check(0); }
Test(model_grad, finite_differences_sliding_window_compressed) { fd_check(1); }

Test(model_swa, window_covering_the_batch_equals_full_attention) {
    mr_err e = {0};
    model_config c;
    tu_config_all_options(&c);
    model_params p1, p2;
    params_init(&p1, &c, &e);
    params_init_random(&p1, 3, 0.2f);
    c.moerl_swa_window = 64;
    c.moerl_swa_ratio = 4;
    params_init(&p2, &c, &e);
    memcpy(p2.data, p1.data, p1.n * sizeof(float));
    model m1, m2;
    model_opts opt = {.mm = MM_DET};
    cr_assert_eq(model_init(&m1, &p1, &opt, 16, &e), MR_OK, "%s", e.msg);
    cr_assert_eq(model_init(&m2, &p2, &opt, 16, &e), MR_OK, "%s", e.msg);
    int32_t ids[16];
    for (int t = 0; t < 16; t++) ids[t] = (t * 7) % c.vocab_size;
    model_batch b = {.ids = ids, .T = 16};
    cr_assert_eq(model_forward(&m1, &b, 0, NULL, &e), MR_OK);
    cr_assert_eq(model_forward(&m2, &b, 0, NULL, &e), MR_OK, "%s", e.msg);
    double rn, rm;
    rel_err(model_logits(&m2), model_logits(&m1), (size_t)16 * c.vocab_size, &rn, &rm);
    cr_expect_lt(rn, 1e-5, "window >= T must be exact attention: %g", rn);
    /* a short window changes the logits */
    model_free(&m2);
    c.moerl_swa_window = 2;
    c.moerl_swa_ratio = 3;
    params_init(&p2, &c, &e);
    memcpy(p2.data, m1.p.data, m1.p.n * sizeof(float));
    cr_assert_eq(model_init(&m2, &p2, &opt, 16, &e), MR_OK, "%s", e.msg);
    cr_assert_eq(model_forward(&m2, &b, 0, NULL, &e), MR_OK, "%s", e.msg);
    rel_err(model_logits(&m2), model_logits(&m1), (size_t)16 * c.vocab_size, &rn, &rm);
    cr_expect_gt(rn, 1e-4, "a 2-token window must differ from full attention");
    model_free(&m1);
    model_free(&m2);
}

/* model_policy_grad: the gradient of Σ_t coef[t]·CE_t with arbitrary signed per-token coefficients (GRPO), MTP
 * heads untouched; checked by central differences of that same sum computed from fresh logits. */
static double weighted_ce(model *m, const model_batch *b, const float *coef, int V) {
    mr_err e = {0};
    model_loss ls;
    cr_assert_eq(model_forward(m, b, 0, &ls, &e), MR_OK, "%s", e.msg);
    float lp[16];
    logprob_forward(lp, model_logits(m), b->targets, b->T, V);
    double s = 0;
    for (int t = 0; t < b->T; t++)
        if (b->targets[t] >= 0) s -= (double)coef[t] * lp[t];
    return s + ls.balance;
}

Test(model_grad, policy_gradient_coefficients) {
    mr_err e = {0};
    model_config c;
    tu_config_all_options(&c);
    model_params p;
    cr_assert_eq(params_init(&p, &c, &e), MR_OK, "%s", e.msg);
    params_init_random(&p, 43, 0.3f);
    enum { T = 11 };
    int32_t ids[T], tgt[T];
    float coef[T];
    for (int t = 0; t < T; t++) {
        ids[t] = (int32_t)((t * 13 + 3) % c.vocab_size);
        coef[t] = (float)((t % 3) - 1) * 0.37f + 0.05f * (float)t; /* signed, uneven */
    }
    for (int t = 0; t < T; t++) tgt[t] = t + 1 < T ? ids[t + 1] : -1;
    tgt[1] = -1;
    model m;
    model_opts opt = {.mm = MM_DET, .mtp_weight = 0.5f, .balance_alpha = 0.1f};
    cr_assert_eq(model_init(&m, &p, &opt, T, &e), MR_OK, "%s", e.msg);
    model_batch b = {.ids = ids, .targets = tgt, .T = T, .skip_mtp = 1};
    model_loss ls;
    cr_assert_neq(model_policy_grad(&m, &b, coef, &e), MR_OK, "needs a forward first");
    cr_assert_eq(model_forward(&m, &b, 0, &ls, &e), MR_OK, "%s", e.msg);
    cr_assert_not_null(model_layer_load(&m, 1), "a main MoE layer has loads");
    cr_assert_null(model_layer_load(&m, 3), "the MTP layer did not run (skip_mtp): no loads to read");
    cr_assert_eq(model_policy_grad(&m, &b, coef, &e), MR_OK, "%s", e.msg);
    cr_assert_eq(model_backward(&m, &b, &e), MR_OK, "%s", e.msg);
    int checked = 0, bad = 0, mtp_nonzero = 0;
    for (int i = 0; i < m.p.n_entries; i++) {
        const param_entry *pe = &m.p.entries[i];
        if (pe->flags & PARAM_BUFFER) continue;
        int is_mtp = strstr(pe->name, "layers.3.") || strstr(pe->name, "layers.4.");
        size_t jmax = 0;
        for (size_t j = 0; j < pe->numel; j++) {
            if (is_mtp && m.p.grad[pe->offset + j] != 0.0f) mtp_nonzero++;
            if (fabsf(m.p.grad[pe->offset + j]) > fabsf(m.p.grad[pe->offset + jmax])) jmax = j;
        }
        if (is_mtp) continue;
        float *w = m.p.data + pe->offset + jmax;
        const float h = 1e-2f, w0 = *w;
        int32_t r0[256], r1[256], r2[256];
        size_t n0, n1, n2;
        weighted_ce(&m, &b, coef, c.vocab_size);
        routing_snapshot(&m, r0, &n0);
        *w = w0 + h;
        double fp = weighted_ce(&m, &b, coef, c.vocab_size);
        routing_snapshot(&m, r1, &n1);
        *w = w0 - h;
        double fm = weighted_ce(&m, &b, coef, c.vocab_size);
        routing_snapshot(&m, r2, &n2);
        *w = w0;
        if (memcmp(r0, r1, n0 * sizeof *r0) || memcmp(r0, r2, n0 * sizeof *r0)) continue; /* a top-k flip */
        double an = m.p.grad[pe->offset + jmax], fd = (fp - fm) / (2.0 * h);
        checked++;
        if (fabs(fd - an) > 3e-2 * fabs(an) + 3e-4) {
            bad++;
            fprintf(stderr, "policy FD mismatch %s[%zu]: analytic %.6g numeric %.6g\n", pe->name, jmax, an, fd);
        }
    }
    cr_expect_eq(mtp_nonzero, 0, "MTP parameters got a gradient");
    cr_expect_gt(checked, 20);
    cr_expect_eq(bad, 0, "%d of %d mismatches", bad, checked);
    model_free(&m);
}
