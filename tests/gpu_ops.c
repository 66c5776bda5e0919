/* gpu_ops.c: CPU-vs-CUDA parity of the dense ops of the backend table, and of the CUDA optimizer kernels (label
 * gpu). Each test draws fresh random inputs (seed = MOERL_TEST_SEED, or the time: printed in every failure),
 * fills every output with NaN first (so a kernel that writes nothing, or only part, fails), starts every
 * accumulated gradient at random values (so overwrite-instead-of-add fails), and bounds ||gpu - cpu|| / ||cpu||:
 * fp32 1e-5, bf16 inputs 1e-2. Kernels documented as replaying the CPU's order are also expected bit-identical
 * (cr_expect: reported, not fatal). Without a CUDA build or device the executable exits 77 (ctest: Skipped). */
#include <criterion/criterion.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "core/rng.h"
#include "kernels/backend.h"
#include "tests/gpu_common.h"

#ifdef MOERL_HAVE_CUDA
#include "kernels/cuda/dense_cuda.h"
#include "model/params.h"
#include "sft/optim.h"

TestSuite(gpu_ops, .init = gpu_setup);

#define TOL_F32 1e-5
#define TOL_BF16 1e-2

static void expect_bits(const char *what, const float *got, const float *ref, size_t n) {
    size_t exact = check_close(what, got, ref, n, TOL_F32);
    cr_expect_eq(exact, n, "%s: %zu of %zu elements differ from the CPU's bits [seed %llu]", what, n - exact, n,
                 (unsigned long long)seed0);
}

/* ---- matmul ---- */

static void matmul_case(mm_mode mode, int bf16, int T, int in, int out) {
    const double tol = bf16 ? TOL_BF16 : TOL_F32;
    const char *tag = mode == MM_DET ? "det" : bf16 ? "fast-bf16" : "fast-fp32";
    float *x = hrand((size_t)T * in, 1, 1.0f), *w = hrand((size_t)out * in, 2, 0.1f);
    float *y0 = hrand((size_t)T * out, 3, 1.0f), *dy = hrand((size_t)T * out, 4, 1.0f);
    float *dx0 = hrand((size_t)T * in, 5, 1.0f), *dw0 = hrand((size_t)out * in, 6, 1.0f);
    float *dxd = dput(x, sizeof(float) * T * in), *dwd = dput(w, sizeof(float) * out * in);
    float *ddy = dput(dy, sizeof(float) * T * out);
    dense_cuda_set_bf16(bf16);
    char what[96];

    /* beta = 0 over a poisoned y: overwritten */
    float *ref = malloc(sizeof(float) * T * out);
    matmul_forward(ref, x, w, T, in, out, 0.0f, mode);
    float *dy_out = dpoison((size_t)T * out);
    gpu->matmul_forward(dy_out, dxd, dwd, T, in, out, 0.0f, mode);
    float *got = dget(dy_out, (size_t)T * out);
    snprintf(what, sizeof what, "matmul_forward %s beta=0 T=%d in=%d out=%d", tag, T, in, out);
    if (mode == MM_DET) expect_bits(what, got, ref, (size_t)T * out);
    else check_close(what, got, ref, (size_t)T * out, tol);
    if (bf16) { /* the flag took effect: bf16 inputs cannot reproduce fp32 products this closely */
        double num = 0, den = 0;
        for (size_t i = 0; i < (size_t)T * out; i++) {
            num += ((double)got[i] - ref[i]) * ((double)got[i] - ref[i]);
            den += (double)ref[i] * ref[i];
        }
        cr_assert_gt(sqrt(num / den), 1e-5, "bf16 mode gave fp32-exact results: the flag did nothing");
    }
    free(got);
    gpu->free(dy_out);

    /* beta = 1: accumulates onto y0 */
    float *ref1 = hcopy(y0, (size_t)T * out);
    matmul_forward(ref1, x, w, T, in, out, 1.0f, mode);
    float *dy1 = dput(y0, sizeof(float) * T * out);
    gpu->matmul_forward(dy1, dxd, dwd, T, in, out, 1.0f, mode);
    got = dget(dy1, (size_t)T * out);
    snprintf(what, sizeof what, "matmul_forward %s beta=1", tag);
    if (mode == MM_DET) expect_bits(what, got, ref1, (size_t)T * out);
    else check_close(what, got, ref1, (size_t)T * out, tol);
    free(got);
    gpu->free(dy1);

    /* backward: dx and dw accumulate onto random starts; then dx only (dw NULL) */
    float *rdx = hcopy(dx0, (size_t)T * in), *rdw = hcopy(dw0, (size_t)out * in);
    matmul_backward(rdx, rdw, dy, x, w, T, in, out, mode);
    float *ddx = dput(dx0, sizeof(float) * T * in), *ddw = dput(dw0, sizeof(float) * out * in);
    gpu->matmul_backward(ddx, ddw, ddy, dxd, dwd, T, in, out, mode);
    float *gdx = dget(ddx, (size_t)T * in), *gdw = dget(ddw, (size_t)out * in);
    snprintf(what, sizeof what, "matmul_backward %s dx", tag);
    if (mode == MM_DET) expect_bits(what, gdx, rdx, (size_t)T * in);
    else check_close(what, gdx, rdx, (size_t)T * in, tol);
    snprintf(what, sizeof what, "matmul_backward %s dw", tag);
    if (mode == MM_DET) expect_bits(what, gdw, rdw, (size_t)out * in);
    else check_close(what, gdw, rdw, (size_t)out * in, tol);
    free(gdx);
    /* dw NULL: dx gets a second accumulation, dw on the device is left alone */
    matmul_backward(rdx, NULL, dy, x, w, T, in, out, mode);
    gpu->matmul_backward(ddx, NULL, ddy, dxd, dwd, T, in, out, mode);
    gdx = dget(ddx, (size_t)T * in);
    float *gdw2 = dget(ddw, (size_t)out * in);
    snprintf(what, sizeof what, "matmul_backward %s dx (dw NULL)", tag);
    check_close(what, gdx, rdx, (size_t)T * in, tol);
    cr_assert_eq(memcmp(gdw2, gdw, sizeof(float) * out * in), 0, "dw changed although NULL was passed");

    dense_cuda_set_bf16(0);
    free(gdx);
    free(gdw);
    free(gdw2);
    free(rdx);
    free(rdw);
    free(ref);
    free(ref1);
    gpu->free(ddx);
    gpu->free(ddw);
    gpu->free(dxd);
    gpu->free(dwd);
    gpu->free(ddy);
    free(x);
    free(w);
    free(y0);
    free(dy);
    free(dx0);
    free(dw0);
}

Test(gpu_ops, matmul_fast_fp32) {
    matmul_case(MM_FAST, 0, 37, 70, 53);
    matmul_case(MM_FAST, 0, 1, 256, 129);
}

Test(gpu_ops, matmul_fast_bf16) { matmul_case(MM_FAST, 1, 64, 96, 80); }

Test(gpu_ops, matmul_det) {
    matmul_case(MM_DET, 0, 37, 70, 53);
    matmul_case(MM_DET, 0, 5, 16, 3);
}

/* MM_DET on the device is batch-invariant: row t computed alone gives the bits of row t inside the batch. */
Test(gpu_ops, matmul_det_batch_invariant) {
    const int T = 33, in = 100, out = 47, t = 17;
    float *x = hrand((size_t)T * in, 11, 1.0f), *w = hrand((size_t)out * in, 12, 0.1f);
    float *dxd = dput(x, sizeof(float) * T * in), *dwd = dput(w, sizeof(float) * out * in);
    float *yb = dpoison((size_t)T * out), *y1 = dpoison((size_t)out);
    gpu->matmul_forward(yb, dxd, dwd, T, in, out, 0.0f, MM_DET);
    gpu->matmul_forward(y1, dxd + (size_t)t * in, dwd, 1, in, out, 0.0f, MM_DET);
    float *hb = dget(yb, (size_t)T * out), *h1 = dget(y1, (size_t)out);
    cr_assert_eq(memcmp(hb + (size_t)t * out, h1, sizeof(float) * out), 0, "row %d alone differs from the batch", t);
    free(hb);
    free(h1);
    gpu->free(yb);
    gpu->free(y1);
    gpu->free(dxd);
    gpu->free(dwd);
    free(x);
    free(w);
}

/* ---- RMSNorm ---- */

Test(gpu_ops, rmsnorm) {
    const int T = 19, C = 300; /* C not a multiple of 16 or of the block */
    const size_t n = (size_t)T * C;
    float *x = hrand(n, 21, 2.0f), *g = hrand((size_t)C, 22, 1.0f), *dout = hrand(n, 23, 1.0f);
    float *dx0 = hrand(n, 24, 1.0f), *dg0 = hrand((size_t)C, 25, 1.0f);
    float *out = malloc(sizeof(float) * n), *rstd = malloc(sizeof(float) * T);
    rmsnorm_forward(out, rstd, x, g, T, C, 1e-6f);
    float *dxd = dput(x, sizeof(float) * n), *dgd = dput(g, sizeof(float) * C), *ddout = dput(dout, sizeof(float) * n);
    float *dout_d = dpoison(n), *drstd = dpoison((size_t)T);
    gpu->rmsnorm_forward(dout_d, drstd, dxd, dgd, T, C, 1e-6f);
    float *go = dget(dout_d, n), *gr = dget(drstd, (size_t)T);
    expect_bits("rmsnorm_forward out", go, out, n);
    expect_bits("rmsnorm_forward rstd", gr, rstd, (size_t)T);
    /* rstd NULL is allowed */
    float *dout2 = dpoison(n);
    gpu->rmsnorm_forward(dout2, NULL, dxd, dgd, T, C, 1e-6f);
    float *go2 = dget(dout2, n);
    check_close("rmsnorm_forward (rstd NULL)", go2, out, n, TOL_F32);

    float *rdx = hcopy(dx0, n), *rdg = hcopy(dg0, (size_t)C);
    rmsnorm_backward(rdx, rdg, dout, x, g, rstd, T, C);
    float *ddx = dput(dx0, sizeof(float) * n), *ddg = dput(dg0, sizeof(float) * C);
    gpu->rmsnorm_backward(ddx, ddg, ddout, dxd, dgd, drstd, T, C);
    float *gdx = dget(ddx, n), *gdg = dget(ddg, (size_t)C);
    expect_bits("rmsnorm_backward dx", gdx, rdx, n);
    expect_bits("rmsnorm_backward dg", gdg, rdg, (size_t)C);

    free(x), free(g), free(dout), free(dx0), free(dg0), free(out), free(rstd), free(go), free(gr), free(go2);
    free(rdx), free(rdg), free(gdx), free(gdg);
    gpu->free(dxd), gpu->free(dgd), gpu->free(ddout), gpu->free(dout_d), gpu->free(drstd), gpu->free(dout2);
    gpu->free(ddx), gpu->free(ddg);
}

/* ---- SwiGLU ---- */

Test(gpu_ops, swiglu) {
    const int T = 13, I = 257;
    const size_t n = (size_t)T * I;
    float *gate = hrand(n, 31, 3.0f), *up = hrand(n, 32, 1.0f), *dh = hrand(n, 33, 1.0f);
    float *dg0 = hrand(n, 34, 1.0f), *du0 = hrand(n, 35, 1.0f);
    float *h = malloc(sizeof(float) * n);
    swiglu_forward(h, gate, up, T, I);
    float *dgate = dput(gate, sizeof(float) * n), *dup_ = dput(up, sizeof(float) * n), *ddh = dput(dh, sizeof(float) * n);
    float *dhout = dpoison(n);
    gpu->swiglu_forward(dhout, dgate, dup_, T, I);
    float *gh = dget(dhout, n);
    check_close("swiglu_forward", gh, h, n, TOL_F32);

    float *rdg = hcopy(dg0, n), *rdu = hcopy(du0, n);
    swiglu_backward(rdg, rdu, dh, gate, up, T, I);
    float *ddg = dput(dg0, sizeof(float) * n), *ddu = dput(du0, sizeof(float) * n);
    gpu->swiglu_backward(ddg, ddu, ddh, dgate, dup_, T, I);
    float *gdg = dget(ddg, n), *gdu = dget(ddu, n);
    check_close("swiglu_backward dgate", gdg, rdg, n, TOL_F32);
    check_close("swiglu_backward dup", gdu, rdu, n, TOL_F32);

    free(gate), free(up), free(dh), free(dg0), free(du0), free(h), free(gh), free(rdg), free(rdu), free(gdg), free(gdu);
    gpu->free(dgate), gpu->free(dup_), gpu->free(ddh), gpu->free(dhout), gpu->free(ddg), gpu->free(ddu);
}

/* ---- Embedding ---- */

Test(gpu_ops, embedding) {
    const int T = 300, C = 70, V = 40; /* every id repeats: the backward's per-row order matters */
    const size_t n = (size_t)T * C;
    float *table = hrand((size_t)V * C, 41, 1.0f), *dout = hrand(n, 42, 1.0f), *dt0 = hrand((size_t)V * C, 43, 1.0f);
    int32_t *ids = malloc(sizeof(int32_t) * T);
    rng r;
    rng_init(&r, seed0, 44);
    for (int t = 0; t < T; t++) ids[t] = (int32_t)rng_below(&r, (uint32_t)V);
    ids[0] = V - 1;
    float *out = malloc(sizeof(float) * n);
    embedding_forward(out, ids, table, T, C);
    float *dtab = dput(table, sizeof(float) * V * C), *ddout = dput(dout, sizeof(float) * n);
    int32_t *dids = dput(ids, sizeof(int32_t) * T);
    float *dout_d = dpoison(n);
    gpu->embedding_forward(dout_d, dids, dtab, T, C);
    float *go = dget(dout_d, n);
    cr_assert_eq(memcmp(go, out, sizeof(float) * n), 0, "embedding_forward is a copy: it must be exact");

    float *rdt = hcopy(dt0, (size_t)V * C);
    embedding_backward(rdt, dout, ids, T, C);
    float *ddt = dput(dt0, sizeof(float) * V * C);
    gpu->embedding_backward(ddt, ddout, dids, T, C);
    float *g1 = dget(ddt, (size_t)V * C);
    expect_bits("embedding_backward", g1, rdt, (size_t)V * C);
    /* deterministic: the same call again gives the same bits */
    float *ddt2 = dput(dt0, sizeof(float) * V * C);
    gpu->embedding_backward(ddt2, ddout, dids, T, C);
    float *g2 = dget(ddt2, (size_t)V * C);
    cr_assert_eq(memcmp(g1, g2, sizeof(float) * V * C), 0, "embedding_backward is not deterministic");

    free(table), free(dout), free(dt0), free(ids), free(out), free(go), free(rdt), free(g1), free(g2);
    gpu->free(dtab), gpu->free(ddout), gpu->free(dids), gpu->free(dout_d), gpu->free(ddt), gpu->free(ddt2);
}

/* ---- Cross-entropy ---- */

static void xent_case(int T, int V, int with_scale, int with_loss, int alias) {
    const size_t n = (size_t)T * V;
    float *logits = hrand(n, 51, 4.0f), *scale = hrand((size_t)T, 52, 1.0f);
    int32_t *target = malloc(sizeof(int32_t) * T);
    rng r;
    rng_init(&r, seed0, 53);
    for (int t = 0; t < T; t++) target[t] = (int32_t)rng_below(&r, (uint32_t)V);
    target[T / 2] = -1; /* an ignored row */
    logits[0] = 1e4f;   /* a row with a huge logit: max subtraction keeps it finite */
    float *loss = malloc(sizeof(float) * T), *dl = malloc(sizeof(float) * n);
    double ref = xent_forward_backward(loss, dl, logits, target, with_scale ? scale : NULL, T, V);

    float *dlog = dput(logits, sizeof(float) * n), *dsc = dput(scale, sizeof(float) * T);
    int32_t *dtg = dput(target, sizeof(int32_t) * T);
    float *dloss = dpoison((size_t)T), *ddl = alias ? dlog : dpoison(n);
    double got = gpu->xent_forward_backward(with_loss ? dloss : NULL, ddl, dlog, dtg, with_scale ? dsc : NULL, T, V);
    sync_ok();
    cr_assert(fabs(got - ref) <= 1e-5 * fabs(ref), "xent sum: gpu %.9g cpu %.9g [seed %llu]", got, ref,
              (unsigned long long)seed0);
    float *gdl = dget(ddl, n);
    char what[96];
    snprintf(what, sizeof what, "xent dlogits T=%d V=%d scale=%d alias=%d", T, V, with_scale, alias);
    check_close(what, gdl, dl, n, TOL_F32);
    for (int v = 0; v < V; v++)
        cr_assert_eq(gdl[(size_t)(T / 2) * V + v], 0.0f, "ignored row: dlogits[%d] not zero", v);
    if (with_loss) {
        float *gl = dget(dloss, (size_t)T);
        check_close("xent loss", gl, loss, (size_t)T, TOL_F32);
        cr_assert_eq(gl[T / 2], 0.0f, "ignored row: loss not zero");
        free(gl);
    }
    free(logits), free(scale), free(target), free(loss), free(dl), free(gdl);
    if (!alias) gpu->free(ddl);
    gpu->free(dlog), gpu->free(dsc), gpu->free(dtg), gpu->free(dloss);
}

Test(gpu_ops, xent) {
    xent_case(9, 1000, 1, 1, 0);
    xent_case(4, 5003, 0, 1, 0);
    xent_case(6, 300, 1, 0, 1); /* dlogits aliases logits */
    xent_case(3, 7, 0, 1, 0);   /* V below one warp */
}

/* ---- RoPE ---- */

Test(gpu_ops, rope) {
    const int T = 12, H = 3, dn = 8, D = 64, dqk = dn + D, row = H * dqk + 5; /* padded rows */
    const size_t n = (size_t)T * row;
    rope_table rt;
    rope_yarn y = {.enabled = 1, .factor = 40, .original_max_pos = 4096, .beta_fast = 32, .beta_slow = 1,
                   .mscale = 1.0, .mscale_all_dim = 1.0};
    mr_err e = {0};
    cr_assert_eq(rope_yarn_init(&rt, D, 10000.0, &y, 8, &e), MR_OK, "%s", e.msg);
    int32_t pos[12] = {0, 1, 2, 7, 8, 9, 100, 4095, 4096, 65535, -3, 3}; /* in the table, past it, negative */
    float *x = hrand(n, 61, 1.0f);
    int32_t *dpos = dput(pos, sizeof pos);
    for (int dir = 0; dir < 2; dir++) {
        float *ref = hcopy(x, n);
        if (dir == 0) rope_forward(ref + dn, pos, T, H, row, dqk, &rt);
        else rope_backward(ref + dn, pos, T, H, row, dqk, &rt);
        float *dx = dput(x, sizeof(float) * n);
        if (dir == 0) gpu->rope_forward(dx + dn, dpos, T, H, row, dqk, &rt);
        else gpu->rope_backward(dx + dn, dpos, T, H, row, dqk, &rt);
        float *got = dget(dx, n);
        check_close(dir == 0 ? "rope_forward" : "rope_backward", got, ref, n, TOL_F32);
        for (size_t i = 0; i < n; i++) /* the nope dims and the row padding are not touched */
            if ((i % row) >= (size_t)H * dqk || (i % row) % dqk < (size_t)dn)
                cr_assert_eq(memcmp(&got[i], &x[i], sizeof(float)), 0, "element %zu outside the rope dims changed", i);
        free(ref), free(got);
        gpu->free(dx);
    }
    /* forward then backward is the identity (up to rounding) on the device */
    float *dx = dput(x, sizeof(float) * n);
    gpu->rope_forward(dx, dpos, T, 1, row, row, &rt);
    gpu->rope_backward(dx, dpos, T, 1, row, row, &rt);
    float *got = dget(dx, n);
    check_close("rope backward(forward(x))", got, x, n, 1e-6);
    free(got), free(x);
    gpu->free(dx), gpu->free(dpos);
    rope_free(&rt);
}

Test(gpu_ops, rope_too_wide_is_reported) {
    rope_table rt;
    mr_err e = {0};
    cr_assert_eq(rope_yarn_init(&rt, 2 * DENSE_CUDA_ROPE_MAX_PAIRS + 2, 10000.0, NULL, 0, &e), MR_OK, "%s", e.msg);
    int32_t pos = 0;
    int32_t *dpos = dput(&pos, sizeof pos);
    float *dx = dpoison((size_t)rt.rope_dim);
    gpu->rope_forward(dx, dpos, 1, 1, rt.rope_dim, rt.rope_dim, &rt);
    cr_assert_eq(gpu->sync(&e), MR_EDEVICE);
    cr_assert(strstr(e.msg, "rope_dim 514 exceeds the CUDA kernel's limit of 512"), "message: %s", e.msg);
    mr_err e2 = {0};
    cr_assert_eq(gpu->sync(&e2), MR_OK, "the error is reported once: %s", e2.msg);
    gpu->free(dx), gpu->free(dpos);
    rope_free(&rt);
}

/* ---- Optimizer kernels ---- */

static void two_entries(model_params *p, size_t n0, size_t n1) {
    memset(p, 0, sizeof *p);
    p->n = n0 + n1;
    p->data = hrand(p->n, 71, 0.5f);
    p->grad = hrand(p->n, 72, 0.01f);
    p->entries = calloc(2, sizeof *p->entries);
    p->n_entries = 2;
    snprintf(p->entries[0].name, sizeof p->entries[0].name, "w");
    p->entries[0].ndim = 1, p->entries[0].shape[0] = (int64_t)n0, p->entries[0].numel = n0;
    snprintf(p->entries[1].name, sizeof p->entries[1].name, "norm");
    p->entries[1].ndim = 1, p->entries[1].shape[0] = (int64_t)n1, p->entries[1].offset = n0;
    p->entries[1].numel = n1, p->entries[1].flags = PARAM_NO_DECAY;
}

Test(gpu_ops, adamw_matches_cpu) {
    model_params p;
    two_entries(&p, 5000, 77);
    adamw o;
    mr_err e = {0};
    adamw_cfg cfg = adamw_defaults();
    cfg.weight_decay = 0.1;
    cr_assert_eq(adamw_init(&o, &p, cfg, &e), MR_OK, "%s", e.msg);
    float *dd = dput(p.data, sizeof(float) * p.n), *dg = dput(p.grad, sizeof(float) * p.n);
    float *dm = dput(o.m, sizeof(float) * p.n), *dv = dput(o.v, sizeof(float) * p.n);
    const double lr = 3e-3;
    for (int s = 0; s < 3; s++) {
        adamw_step(&o, &p, lr);
        for (int k = 0; k < p.n_entries; k++) {
            const param_entry *pe = &p.entries[k];
            double wd = (pe->flags & PARAM_NO_DECAY) ? 0.0 : cfg.weight_decay;
            cr_assert_eq(cuda_adamw_update(dd + pe->offset, dg + pe->offset, dm + pe->offset, dv + pe->offset,
                                           pe->numel, cfg.beta1, cfg.beta2, cfg.eps, wd, o.step, lr, &e),
                         MR_OK, "%s", e.msg);
        }
    }
    float *gd = dget(dd, p.n), *gm = dget(dm, p.n), *gv = dget(dv, p.n);
    expect_bits("adamw params", gd, p.data, p.n);
    expect_bits("adamw exp_avg", gm, o.m, p.n);
    expect_bits("adamw exp_avg_sq", gv, o.v, p.n);
    free(gd), free(gm), free(gv);
    gpu->free(dd), gpu->free(dg), gpu->free(dm), gpu->free(dv);
    adamw_free(&o);
    free(p.data), free(p.grad), free(p.entries);
}

Test(gpu_ops, grad_sumsq_matches_cpu) {
    model_params p;
    two_entries(&p, 3 * DENSE_CUDA_SUMSQ_CHUNK + 123, 1000);
    p.grad[17] = 3.0f; /* a large element */
    float *dg = dput(p.grad, sizeof(float) * p.n);
    mr_err e = {0};
    double tot = 0.0;
    for (int k = 0; k < p.n_entries; k++) {
        double s;
        cr_assert_eq(cuda_grad_sumsq(&s, dg + p.entries[k].offset, p.entries[k].numel, &e), MR_OK, "%s", e.msg);
        tot += s;
    }
    double ref = grad_sumsq(&p);
    cr_assert(fabs(tot - ref) <= 1e-12 * ref, "sumsq gpu %.17g cpu %.17g", tot, ref);
    double again = 0.0, s;
    for (int k = 0; k < p.n_entries; k++) {
        cr_assert_eq(cuda_grad_sumsq(&s, dg + p.entries[k].offset, p.entries[k].numel, &e), MR_OK, "%s", e.msg);
        again += s;
    }
    cr_assert_eq(memcmp(&again, &tot, sizeof tot), 0, "grad_sumsq is not deterministic");
    gpu->free(dg);
    free(p.data), free(p.grad), free(p.entries);
}

/* ---- the table ---- */

Test(gpu_ops, table_has_dense_ops) {
    cr_assert(gpu->matmul_forward && gpu->matmul_backward && gpu->rmsnorm_forward && gpu->rmsnorm_backward &&
              gpu->swiglu_forward && gpu->swiglu_backward && gpu->embedding_forward && gpu->embedding_backward &&
              gpu->xent_forward_backward && gpu->rope_forward && gpu->rope_backward);
    /* attention and MoE: tests/gpu_model_ops.c (which also checks backend_has_model_ops) */
}
#endif

int main(int argc, char **argv) { return gpu_test_main(argc, argv, "gpu_ops"); }
