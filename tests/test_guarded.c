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

static void random_params(model_params *p, const model_config *c) {
    mr_err e = {0};
    cr_assert_eq(params_init(p, c, &e), MR_OK, "%s", e.msg);
    params_init_random(p, 42, 0.3f);
    for (int i = 0; i < p->n_entries; i++) /* router biases and norm gains that are not 0 and 1 */
        if (p->entries[i].flags & PARAM_NO_DECAY)
            rng_fill_normal(p->data + p->entries[i].offset, p->entries[i].numel,
                            (p->entries[i].flags & PARAM_BUFFER) ? 0.0f : 1.0f, 0.2f, 7, (uint64_t)i);
}

/* The same model on the CPU and on the guarded backend. */
static void two_models(model *mc, model *mg, mm_mode mm, int T_max) {
    mr_err e = {0};
    model_config c;
    tu_config_all_options(&c);
    model_params pc, pg;
    random_params(&pc, &c);
    random_params(&pg, &c);
    model_opts oc = {.mm = mm, .mtp_weight = 0.5f, .balance_alpha = 0.1f}, og = oc;
    og.backend = G();
    cr_assert_eq(model_init(mc, &pc, &oc, T_max, &e), MR_OK, "%s", e.msg);
    cr_assert_eq(model_init(mg, &pg, &og, T_max, &e), MR_OK, "%s", e.msg);
    cr_assert_eq(mg->p.be, G(), "the parameters moved to the guarded backend");
}

/* Host copy of n floats at p in backend b's memory. */
static float *host(const backend *b, const float *p, size_t n) {
    float *h = malloc(n * sizeof(float));
    mr_err e = {0};
    cr_assert_eq(b->to_host(h, p, n * sizeof(float), &e), MR_OK);
    return h;
}

static void expect_same_floats(const float *a, const float *b, size_t n, const char *what) {
    for (size_t i = 0; i < n; i++)
        if (memcmp(&a[i], &b[i], sizeof(float))) cr_assert_fail("%s differs at %zu: %.9g vs %.9g", what, i, a[i], b[i]);
}

static void train_step_equal(mm_mode mm) {
    size_t before = guarded_bytes_in_use();
    enum { T = 13 };
    model mc, mg;
    two_models(&mc, &mg, mm, T);
    int32_t ids[T], tgt[T], pos[T], doc[T];
    for (int t = 0; t < T; t++) { /* two packed documents: rows 0..7 and 8..12 */
        ids[t] = (int32_t)((t * 17 + 5) % mc.p.cfg.vocab_size);
        doc[t] = t < 8 ? 0 : 8;
        pos[t] = t - doc[t];
    }
    for (int t = 0; t < T; t++) tgt[t] = (t + 1 < T && doc[t + 1] == doc[t]) ? ids[t + 1] : -1;
    tgt[2] = -1;
    model_batch b = {.ids = ids, .pos = pos, .doc_start = doc, .targets = tgt, .T = T};
    mr_err e = {0};
    for (int step = 0; step < 2; step++) { /* the second step accumulates into the first one's gradients */
        model_loss lc, lg;
        cr_assert_eq(model_forward(&mc, &b, 1, &lc, &e), MR_OK, "%s", e.msg);
        cr_assert_eq(model_forward(&mg, &b, 1, &lg, &e), MR_OK, "%s", e.msg);
        cr_assert(lc.balance > 0 && lc.mtp[1] > 0, "every loss term is active");
        cr_assert(lc.total == lg.total && lc.main == lg.main && lc.mtp[0] == lg.mtp[0] && lc.mtp[1] == lg.mtp[1] &&
                      lc.balance == lg.balance,
                  "losses differ: %.17g vs %.17g", lc.total, lg.total);
        cr_assert_eq(model_backward(&mc, &b, &e), MR_OK, "%s", e.msg);
        cr_assert_eq(model_backward(&mg, &b, &e), MR_OK, "%s", e.msg);
    }
    float *gg = host(G(), mg.p.grad, mg.p.n);
    expect_same_floats(mc.p.grad, gg, mc.p.n, "gradient");
    free(gg);
    /* the optimizer on the guarded backend: the CPU's update, clip and checks */
    adamw oc, og;
    cr_assert_eq(adamw_init(&oc, &mc.p, adamw_defaults(), &e), MR_OK);
    cr_assert_eq(adamw_init(&og, &mg.p, adamw_defaults(), &e), MR_OK);
    cr_assert_eq(og.be, G());
    cr_assert_eq(grad_check_finite(&mg.p, &e), MR_OK, "%s", e.msg);
    double nc = grad_clip(&mc.p, 0.5), ng = grad_clip(&mg.p, 0.5);
    cr_assert(nc == ng && nc > 0.5, "grad norm %.17g vs %.17g", nc, ng);
    adamw_step(&oc, &mc.p, 1e-3);
    adamw_step(&og, &mg.p, 1e-3);
    float *wg = host(G(), mg.p.data, mg.p.n);
    expect_same_floats(mc.p.data, wg, mc.p.n, "weights after AdamW");
    free(wg);
    /* a non-finite gradient is found and named on the device too */
    const param_entry *pe = params_find(&mg.p, "model.layers.1.self_attn.kv_b_proj.weight");
    cr_assert(pe);
    float nan = NAN;
    cr_assert_eq(G()->to_device(mg.p.grad + pe->offset + 5, &nan, sizeof nan, &e), MR_OK);
    cr_assert_eq(grad_check_finite(&mg.p, &e), MR_ERANGE);
    cr_assert(strstr(e.msg, "model.layers.1.self_attn.kv_b_proj.weight[5] is not finite"), "%s", e.msg);
    adamw_free(&oc);
    adamw_free(&og);
    model_free(&mc);
    model_free(&mg);
    cr_assert_eq(guarded_bytes_in_use(), before, "the model and optimizer gave their memory back");
}

Test(guarded_model, training_step_and_optimizer_give_the_cpu_bits) { train_step_equal(MM_DET); }
Test(guarded_model, training_step_and_optimizer_give_the_cpu_bits_fast_gemm) { train_step_equal(MM_FAST); }

/* Prefill of two prompts, then decode steps with MTP drafts, on latent caches in each backend's memory. */
Test(guarded_model, prefill_decode_and_mtp_draft_give_the_cpu_bits) {
    enum { T = 16 };
    model mc, mg;
    two_models(&mc, &mg, MM_DET, T);
    model *ms[2] = {&mc, &mg};
    const backend *bs[2] = {backend_cpu(), G()};
    const int V = mc.p.cfg.vocab_size;
    model_kv kv[2][2], mk[2][2];
    float *mem[2][4];
    size_t fc, fk, mfc, mfk;
    model_kv_floats(&mc, 12, &fc, &fk);
    model_kv_floats_mtp(&mc, 12, &mfc, &mfk);
    for (int w = 0; w < 2; w++)
        for (int j = 0; j < 2; j++) {
            mem[w][2 * j] = bs[w]->alloc((fc + fk) * sizeof(float));
            mem[w][2 * j + 1] = bs[w]->alloc((mfc + mfk) * sizeof(float));
            kv[w][j] = (model_kv){.ckv = mem[w][2 * j], .kpe = mem[w][2 * j] + fc, .cap = 12};
            mk[w][j] = (model_kv){.ckv = mem[w][2 * j + 1], .kpe = mem[w][2 * j + 1] + mfc, .cap = 12};
        }
    int32_t ids[7] = {3, 9, 27, 4, 11, 40, 2}, pos[7] = {0, 1, 2, 3, 0, 1, 2}, doc[7] = {0, 0, 0, 0, 4, 4, 4};
    model_batch b = {.ids = ids, .pos = pos, .doc_start = doc, .T = 7, .skip_mtp = 1};
    mr_err e = {0};
    const float *lg[2];
    for (int w = 0; w < 2; w++) {
        model_kv *k[2] = {&kv[w][0], &kv[w][1]}, *q[2] = {&mk[w][0], &mk[w][1]};
        cr_assert_eq(model_prefill_mtp(ms[w], &b, k, q, 2, &e), MR_OK, "%s", e.msg);
        lg[w] = model_logits(ms[w]);
        cr_assert(lg[w]);
    }
    expect_same_floats(lg[0], lg[1], 7 * (size_t)V, "prefill logits");
    int32_t next[2] = {5, 6};
    for (int step = 0; step < 3; step++) {
        for (int w = 0; w < 2; w++) {
            model_kv *q[2] = {&mk[w][0], &mk[w][1]};
            int32_t hrow[2] = {0, 1};
            if (step == 0) hrow[0] = 3, hrow[1] = 6; /* the prompts' last prefill rows */
            int32_t off[2] = {0, 0};
            cr_assert_eq(model_mtp_draft(ms[w], next, hrow, q, off, 2, &e), MR_OK, "%s", e.msg);
            lg[w] = model_mtp_logits(ms[w], 1);
            cr_assert(lg[w]);
        }
        expect_same_floats(lg[0], lg[1], 2 * (size_t)V, "MTP draft logits");
        for (int w = 0; w < 2; w++) {
            model_kv *k[2] = {&kv[w][0], &kv[w][1]};
            cr_assert_eq(model_decode_step(ms[w], next, k, 2, &e), MR_OK, "%s", e.msg);
            lg[w] = model_logits(ms[w]);
            cr_assert(lg[w]);
        }
        expect_same_floats(lg[0], lg[1], 2 * (size_t)V, "decode logits");
        for (int l = 0; l < mc.p.cfg.num_hidden_layers; l++) {
            const int32_t *xc = model_layer_experts(&mc, l), *xg = model_layer_experts(&mg, l);
            cr_assert_eq(!xc, !xg);
            if (xc) cr_assert_eq(memcmp(xc, xg, 2 * sizeof(int32_t) * (size_t)mc.moe.K), 0, "layer %d experts", l);
        }
        for (int j = 0; j < 2; j++) {
            cr_assert_eq(kv[0][j].len, kv[1][j].len);
            next[j] = (int32_t)((next[j] * 7 + step) % V);
        }
    }
    for (int w = 0; w < 2; w++)
        for (int i = 0; i < 4; i++) bs[w]->free(mem[w][i]);
    model_free(&mc);
    model_free(&mg);
}

/* ------------------------------------------------------------------------------------------ runs (the CLI) */

#define RECIPE \
    "run: {name: guarded, seed: 7, store: %s/runs.db, out_dir: %s/out, threads: 2, checkpoint_every: 2}\n" \
    "model:\n  preset: tiny\n  overrides: {hidden_size: 32, num_hidden_layers: 2, intermediate_size: 64,\n" \
    "    moe_intermediate_size: 16, n_routed_experts: 4, num_experts_per_tok: 2, n_group: 1, topk_group: 1,\n" \
    "    num_attention_heads: 4, q_lora_rank: 16, kv_lora_rank: 16, qk_nope_head_dim: 8, qk_rope_head_dim: 4,\n" \
    "    v_head_dim: 8, num_nextn_predict_layers: 1}\n" \
    "tokenizer: {train: {vocab_size: 300}}\n" \
    "data: {generator: {task: arithmetic, n: 64, difficulty: 1}, eval_n: 4, template: \"Q: {prompt}\\nA: \",\n" \
    "       max_seq_len: 48}\n" \
    "optim: {schedule: constant, warmup_steps: 0, lr: 0.01}\n" \
    "rollout: {max_new_tokens: 10}\n" \
    "sft: {steps: 2, batch_seqs: 8, grad_accum: 2, eval_every: 2, mtp_weight: 0.3, balance_alpha: 0.01}\n" \
    "grpo: {steps: 2, num_generations: 4, prompts_per_step: 2, mini_batches_per_step: 2, micro_batch_tokens: 128,\n" \
    "       eval_every: 0, beta: 0.04, entropy_coef: 0.01}\n" \
    "rewards:\n  - lua: digits.lua\n"

static const char *DIGITS_LUA = "function reward(sample)\n  local c = sample.completion\n"
                                "  if #c == 0 then return 0.0 end\n  local _, n = c:gsub('%d', '')\n"
                                "  return n / #c\nend\n";

static char *setup_dir(void) {
    char *dir = tu_tmpdir();
    char text[4096], *p = tu_path(dir, "r.yaml"), *l = tu_path(dir, "digits.lua");
    snprintf(text, sizeof text, RECIPE, dir, dir);
    cr_assert_eq(tu_write(p, text, (size_t)-1), 0);
    cr_assert_eq(tu_write(l, DIGITS_LUA, (size_t)-1), 0);
    free(p);
    free(l);
    return dir;
}

/* metric rows of run 1 without timings, throughput and memory */
static char *metrics(const char *dir) {
    char cmd[4096], *out = NULL;
    snprintf(cmd, sizeof cmd, "%s runs export 1 --db %s/runs.db | grep -v 'time/\\|tput/\\|mem/'", tu_bin(), dir);
    cr_assert_eq(tu_run(cmd, &out), 0, "%s", out);
    return out;
}

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
    char *a = setup_dir(), *b = setup_dir(), *out = NULL, line[8192];
    snprintf(line, sizeof line, "cd %s && %s %s r.yaml", a, tu_bin(), cmd);
    cr_assert_eq(tu_run(line, &out), 0, "%s", out);
    free(out);
    snprintf(line, sizeof line, "cd %s && %s %s r.yaml --set run.device=cpu-guarded", b, tu_bin(), cmd);
    cr_assert_eq(tu_run(line, &out), 0, "%s", out);
    free(out);
    char *ma = metrics(a), *mb = metrics(b);
    cr_assert_str_eq(ma, mb, "%s: metrics differ between cpu and cpu-guarded", cmd);
    free(ma);
    free(mb);
    char rel[256];
    snprintf(rel, sizeof rel, "out/%s/model.safetensors", ckpt);
    same_file(a, b, rel);
    snprintf(rel, sizeof rel, "out/%s/optimizer.safetensors", ckpt);
    same_file(a, b, rel);
    tu_rmtree(a);
    tu_rmtree(b);
    free(a);
    free(b);
}

Test(guarded_run, sft_gives_the_cpu_bits, .timeout = 300) { run_both("sft", "step-00000002"); }
Test(guarded_run, grpo_gives_the_cpu_bits, .timeout = 300) { run_both("grpo", "step-00000002"); }
