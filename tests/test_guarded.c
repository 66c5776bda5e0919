/* test_guarded.c: the device code path without a device. The guarded backend (kernels/cpu/backend_guarded.h) runs
 * the CPU's ops on memory that faults when host code touches it outside an op, so everything above kernels/ that
 * runs on it (the model's training step and decode, the optimizer, SFT and GRPO end to end) must (1) never touch
 * model memory directly, or the test dies with SIGSEGV, and (2) give the CPU backend's bits exactly, or some op
 * saw different inputs (a batch array not staged, a copy with the wrong pitch, a host copy read too early). */
#include <criterion/criterion.h>
#include <math.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/mem.h"
#include "core/rng.h"
#include "kernels/backend.h"
#include "kernels/cpu/backend_guarded.h"
#include "model/model.h"
#include "sft/optim.h"
#include "tests/model_pair.h"
#include "tests/testutil.h"

static const backend *G(void) { return backend_guarded(); }

Test(guarded, host_code_touching_its_memory_faults, .signal = SIGSEGV) {
    signal(SIGSEGV, SIG_DFL); /* a sanitizer's handler would report and exit instead */
    volatile float *x = G()->alloc(64 * sizeof(float));
    cr_assert(x);
    x[3] = 1.0f; /* host code, no op open: SIGSEGV */
}

Test(guarded, ops_and_copies_work_and_memory_comes_back) {
    const backend *g = G();
    mr_err e = {0};
    size_t before = guarded_bytes_in_use();
    enum { R = 5, W = 7, P = 11 };
    float *a = g->alloc(R * P * sizeof(float)), *b = g->alloc(R * W * sizeof(float));
    cr_assert(a && b);
    cr_assert_gt(guarded_bytes_in_use(), before);
    float h[R * P], out[R * W];
    for (int i = 0; i < R * P; i++) h[i] = (float)i;
    cr_assert_eq(g->to_device(a, h, sizeof h, &e), MR_OK);
    g->zero(b, sizeof out);
    g->copy2d(b, W, a + 2, P, W, R); /* columns 2..8 of each row */
    g->scale(b, 2.0f, R * W);
    cr_assert_eq(g->axpy(b, b, 1.0f, R * W, &e), MR_OK); /* b = 4 a[., 2..8] */
    cr_assert_eq(g->to_host(out, b, sizeof out, &e), MR_OK);
    for (int r = 0; r < R; r++)
        for (int c = 0; c < W; c++) cr_assert_eq(out[r * W + c], 4.0f * (float)(r * P + c + 2));
    g->free(a);
    g->free(b);
    cr_assert_eq(guarded_bytes_in_use(), before);
    /* a freed block is handed out again, zeroed by the kernel (MADV_DONTNEED) */
    float *c = g->alloc(R * P * sizeof(float));
    cr_assert_eq(c, a, "first fit reuses the freed block");
    cr_assert_eq(g->to_host(h, c, sizeof h, &e), MR_OK);
    cr_assert_eq(h[R * P - 1], 0.0f);
    g->free(c);
}

/* ---------------------------------------------------------------------------------------------- the model */

static void train_step_equal(mm_mode mm) {
    size_t before = guarded_bytes_in_use();
    mp_train_step(G(), mm, 0, 0, 0);
    cr_assert_eq(guarded_bytes_in_use(), before, "the model and optimizer gave their memory back");
}

Test(guarded_model, training_step_and_optimizer_give_the_cpu_bits) { train_step_equal(MM_DET); }
Test(guarded_model, training_step_and_optimizer_give_the_cpu_bits_fast_gemm) { train_step_equal(MM_FAST); }

/* Prefill of two prompts, then decode steps with MTP drafts, on latent caches in each backend's memory. */
Test(guarded_model, prefill_decode_and_mtp_draft_give_the_cpu_bits) { mp_prefill_decode(G(), 0); }

/* ------------------------------------------------------------------------------------------ runs (the CLI) */

static void same_file(const char *a, const char *b, const char *rel) {
    char pa[4096], pb[4096];
    snprintf(pa, sizeof pa, "%s/%s", a, rel);
    snprintf(pb, sizeof pb, "%s/%s", b, rel);
    size_t na, nb;
    char *x = tu_read(pa, &na), *y = tu_read(pb, &nb);
    cr_assert(x && y, "missing %s", rel);
    cr_assert(na == nb && memcmp(x, y, na) == 0, "%s differs between cpu and cpu-guarded", rel);
    free(x);
    free(y);
}

static void run_both(const char *cmd, const char *ckpt) {
    char *a = mp_setup_dir(), *b = mp_setup_dir();
    mp_run(a, cmd, "");
    mp_run(b, cmd, "--set run.device=cpu-guarded");
    char line[4096], *out = NULL;
    snprintf(line, sizeof line, "%s runs export 1 --db %s/runs.db", tu_bin(), b);
    cr_assert_eq(tu_run(line, &out), 0, "%s", out);
    cr_assert(strstr(out, ",mem/peak_device_gb,"), "the device run logs its peak device memory:\n%s", out);
    free(out);
    char *ma = mp_metrics(a), *mb = mp_metrics(b);
    cr_assert_str_eq(ma, mb, "%s: metrics differ between cpu and cpu-guarded", cmd);
    free(ma);
    free(mb);
    char rel[256];
    snprintf(rel, sizeof rel, "out/%s/model.safetensors", ckpt);
    same_file(a, b, rel);
    snprintf(rel, sizeof rel, "out/%s/optimizer.safetensors", ckpt);
    same_file(a, b, rel);
    if (!strcmp(cmd, "sft")) { /* `moerl generate --device` on the checkpoint: the same samples */
        char *ga = NULL, *gb = NULL;
        snprintf(line, sizeof line, "%s generate --model %s/out/%s --prompt 'Q: 3+4' -n 3 --seed 9 --max-new-tokens 8",
                 tu_bin(), a, ckpt);
        cr_assert_eq(tu_run(line, &ga), 0, "%s", ga);
        strcat(line, " --device cpu-guarded");
        cr_assert_eq(tu_run(line, &gb), 0, "%s", gb);
        cr_assert(strstr(ga, "--- sample 2"), "%s", ga);
        cr_assert_str_eq(ga, gb, "generate differs between cpu and cpu-guarded");
        free(ga);
        free(gb);
        /* MTP speculative decoding (drafts and verifications replayed as graphs on the guarded backend) */
        snprintf(line, sizeof line,
                 "%s generate --model %s/out/%s --prompt 'Q: 5+2' -n 4 --seed 3 --max-new-tokens 12 --mtp-speculative",
                 tu_bin(), a, ckpt);
        char *sa = NULL, *sb = NULL, cmd2[9000];
        snprintf(cmd2, sizeof cmd2, "%s 2>/dev/null", line);
        cr_assert_eq(tu_run(cmd2, &sa), 0, "%s", sa);
        snprintf(cmd2, sizeof cmd2, "%s --device cpu-guarded 2>/dev/null", line);
        cr_assert_eq(tu_run(cmd2, &sb), 0, "%s", sb);
        cr_assert(strstr(sa, "--- sample 3"), "%s", sa);
        cr_assert_str_eq(sa, sb, "speculative generate differs between cpu and cpu-guarded");
        free(sa);
        free(sb);
    }
    tu_rmtree(a);
    tu_rmtree(b);
    free(a);
    free(b);
}

Test(guarded_run, sft_gives_the_cpu_bits, .timeout = 300) { run_both("sft", "step-00000002"); }
Test(guarded_run, grpo_gives_the_cpu_bits, .timeout = 300) { run_both("grpo", "step-00000002"); }
