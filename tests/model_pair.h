/* model_pair.h: the same random model on the CPU backend and on another backend (the guarded CPU backend in
 * test_guarded.c, CUDA in gpu_model.c), driven through a training step with the optimizer and through prefill,
 * decode and MTP drafts, comparing what the other backend gives with the CPU's. tol 0 asks for the CPU's bits;
 * tol > 0 for ||other - cpu|| / ||cpu|| <= tol with every element finite. Included by one test file each. */
#ifndef MOERL_TESTS_MODEL_PAIR_H
#define MOERL_TESTS_MODEL_PAIR_H

#include <criterion/criterion.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/rng.h"
#include "kernels/backend.h"
#include "model/model.h"
#include "sft/optim.h"
#include "tests/testutil.h"

static void mp_random_params(model_params *p, const model_config *c) {
    mr_err e = {0};
    cr_assert_eq(params_init(p, c, &e), MR_OK, "%s", e.msg);
    params_init_random(p, 42, 0.3f);
    for (int i = 0; i < p->n_entries; i++) /* router biases and norm gains that are not 0 and 1 */
        if (p->entries[i].flags & PARAM_NO_DECAY)
            rng_fill_normal(p->data + p->entries[i].offset, p->entries[i].numel,
                            (p->entries[i].flags & PARAM_BUFFER) ? 0.0f : 1.0f, 0.2f, 7, (uint64_t)i);
}

/* The same model (every option of the config in use) on the CPU (mc) and on backend be (mg). */
static void mp_two_models(model *mc, model *mg, const backend *be, mm_mode mm, int T_max) {
    mr_err e = {0};
    model_config c;
    tu_config_all_options(&c);
    model_params pc, pg;
    mp_random_params(&pc, &c);
    mp_random_params(&pg, &c);
    model_opts oc = {.mm = mm, .mm_bwd = mm, .mtp_weight = 0.5f, .balance_alpha = 0.1f}, og = oc;
    og.backend = be;
    cr_assert_eq(model_init(mc, &pc, &oc, T_max, &e), MR_OK, "%s", e.msg);
    cr_assert_eq(model_init(mg, &pg, &og, T_max, &e), MR_OK, "%s", e.msg);
    cr_assert_eq(mg->p.be, be, "the parameters moved to backend %s", be->name);
}

/* Host copy of n floats at p in backend b's memory. */
static float *mp_host(const backend *b, const float *p, size_t n) {
    float *h = malloc((n ? n : 1) * sizeof(float));
    mr_err e = {0};
    cr_assert(h);
    cr_assert_eq(b->sync(&e), MR_OK, "%s", e.msg);
    cr_assert_eq(b->to_host(h, p, n * sizeof(float), &e), MR_OK, "%s", e.msg);
    return h;
}

static void mp_compare(const char *what, const float *got, const float *ref, size_t n, double tol) {
    double num = 0, den = 0;
    for (size_t i = 0; i < n; i++) {
        if (tol == 0) {
            if (memcmp(&got[i], &ref[i], sizeof(float)))
                cr_assert_fail("%s differs at %zu: %.9g vs cpu %.9g", what, i, got[i], ref[i]);
            continue;
        }
        if (!isfinite(got[i])) cr_assert_fail("%s: element %zu is %g, cpu %g", what, i, got[i], ref[i]);
        double d = (double)got[i] - ref[i];
        num += d * d;
        den += (double)ref[i] * ref[i];
    }
    double rel = den > 0 ? sqrt(num / den) : sqrt(num);
    cr_assert(rel <= tol, "%s: relative error %.3g > %.1g", what, rel, tol);
}

static void mp_compare_scalar(const char *what, double got, double ref, double tol) {
    if (tol == 0)
        cr_assert(memcmp(&got, &ref, sizeof got) == 0, "%s: %.17g vs cpu %.17g", what, got, ref);
    else
        cr_assert(isfinite(got) && fabs(got - ref) <= tol * fabs(ref), "%s: %.9g vs cpu %.9g (tolerance %.1g)", what,
                  got, ref, tol);
}

/* Two training forwards and backwards (the second accumulates) over two packed documents, then the optimizer
 * (finite check, clip, AdamW) on both backends; finally a NaN in one gradient is found and named on be. tol_loss
 * bounds the losses, tol the gradients, their norm and the updated weights. replay_cpu: be reuses the
 * CPU's expert choices (routing replay), for precisions whose rounding may flip a near-tie in the router (bf16
 * GEMMs); then what is compared is the arithmetic alone, and the replay path is exercised on be. */
static void mp_train_step(const backend *be, mm_mode mm, double tol_loss, double tol, int replay_cpu) {
    enum { T = 13 };
    model mc, mg;
    mp_two_models(&mc, &mg, be, mm, T);
    int32_t ids[T], tgt[T], pos[T], doc[T];
    for (int t = 0; t < T; t++) { /* two packed documents: rows 0..7 and 8..12 */
        ids[t] = (int32_t)((t * 17 + 5) % mc.p.cfg.vocab_size);
        doc[t] = t < 8 ? 0 : 8;
        pos[t] = t - doc[t];
    }
    for (int t = 0; t < T; t++) tgt[t] = (t + 1 < T && doc[t + 1] == doc[t]) ? ids[t + 1] : -1;
    tgt[2] = -1;
    model_batch b = {.ids = ids, .pos = pos, .doc_start = doc, .targets = tgt, .T = T}, bg = b;
    const int32_t **rep = calloc((size_t)mc.p.n_layers, sizeof *rep);
    cr_assert(rep);
    mr_err e = {0};
    for (int step = 0; step < 2; step++) {
        model_loss lc, lg;
        cr_assert_eq(model_forward(&mc, &b, 1, &lc, &e), MR_OK, "%s", e.msg);
        if (replay_cpu) { /* the CPU model's choices (host arrays) for every MoE layer, MTP modules included */
            for (int l = 0; l < mc.p.n_layers; l++) rep[l] = model_layer_experts(&mc, l);
            bg.replay = rep;
        }
        cr_assert_eq(model_forward(&mg, &bg, 1, &lg, &e), MR_OK, "%s", e.msg);
        cr_assert(lc.balance > 0 && lc.mtp[1] > 0, "every loss term is active");
        mp_compare_scalar("main loss", lg.main, lc.main, tol_loss);
        mp_compare_scalar("MTP 1 loss", lg.mtp[0], lc.mtp[0], tol_loss);
        mp_compare_scalar("MTP 2 loss", lg.mtp[1], lc.mtp[1], tol_loss);
        mp_compare_scalar("balance loss", lg.balance, lc.balance, tol_loss);
        mp_compare_scalar("total loss", lg.total, lc.total, tol_loss);
        for (int l = 0; l < mc.p.cfg.num_hidden_layers; l++) {
            const int32_t *xc = model_layer_experts(&mc, l), *xg = model_layer_experts(&mg, l);
            cr_assert_eq(!xc, !xg);
            if (xc)
                cr_assert_eq(memcmp(xc, xg, sizeof(int32_t) * T * (size_t)mc.moe.K), 0,
                             "layer %d routed other experts than the CPU", l);
        }
        cr_assert_eq(model_backward(&mc, &b, &e), MR_OK, "%s", e.msg);
        cr_assert_eq(model_backward(&mg, &bg, &e), MR_OK, "%s", e.msg);
    }
    free(rep);
    float *gg = mp_host(be, mg.p.grad, mg.p.n);
    mp_compare("gradient", gg, mc.p.grad, mc.p.n, tol);
    for (int i = 0; i < mc.p.n_entries; i++) { /* and entry by entry: a small tensor wrong in full counts */
        const param_entry *pe = &mc.p.entries[i];
        if (!(pe->flags & PARAM_BUFFER)) mp_compare(pe->name, gg + pe->offset, mc.p.grad + pe->offset, pe->numel,
                                                    tol == 0 ? 0 : 10 * tol);
    }
    free(gg);
    adamw oc, og;
    cr_assert_eq(adamw_init(&oc, &mc.p, adamw_defaults(), &e), MR_OK);
    cr_assert_eq(adamw_init(&og, &mg.p, adamw_defaults(), &e), MR_OK);
    cr_assert_eq(og.be, be);
    cr_assert_eq(grad_check_finite(&mg.p, &e), MR_OK, "%s", e.msg);
    double nc = grad_clip(&mc.p, 0.5), ng = grad_clip(&mg.p, 0.5);
    cr_assert(nc > 0.5, "the clip is active: norm %g", nc);
    mp_compare_scalar("gradient norm", ng, nc, tol); /* a gradient quantity: the gradients' bound */
    adamw_step(&oc, &mc.p, 1e-3);
    adamw_step(&og, &mg.p, 1e-3);
    float *wg = mp_host(be, mg.p.data, mg.p.n);
    mp_compare("weights after AdamW", wg, mc.p.data, mc.p.n, tol);
    free(wg);
    /* a non-finite gradient is found and named on the backend too */
    const param_entry *pe = params_find(&mg.p, "model.layers.1.self_attn.kv_b_proj.weight");
    cr_assert(pe);
    float nan = NAN;
    cr_assert_eq(be->to_device(mg.p.grad + pe->offset + 5, &nan, sizeof nan, &e), MR_OK);
    cr_assert_eq(grad_check_finite(&mg.p, &e), MR_ERANGE);
    cr_assert(strstr(e.msg, "model.layers.1.self_attn.kv_b_proj.weight[5] is not finite"), "%s", e.msg);
    adamw_free(&oc);
    adamw_free(&og);
    model_free(&mc);
    model_free(&mg);
}

/* Prefill of two prompts, then three decode steps with MTP drafts on latent caches in each backend's memory:
 * logits within tol of the CPU's (0: its bits) and the same experts routed in every layer. */
static void mp_prefill_decode(const backend *be, double tol) {
    enum { T = 16 };
    model mc, mg;
    mp_two_models(&mc, &mg, be, MM_DET, T);
    model *ms[2] = {&mc, &mg};
    const backend *bs[2] = {backend_cpu(), be};
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
            cr_assert(mem[w][2 * j] && mem[w][2 * j + 1]);
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
    mp_compare("prefill logits", lg[1], lg[0], 7 * (size_t)V, tol);
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
        mp_compare("MTP draft logits", lg[1], lg[0], 2 * (size_t)V, tol);
        for (int w = 0; w < 2; w++) {
            model_kv *k[2] = {&kv[w][0], &kv[w][1]};
            cr_assert_eq(model_decode_step(ms[w], next, k, 2, &e), MR_OK, "%s", e.msg);
            lg[w] = model_logits(ms[w]);
            cr_assert(lg[w]);
        }
        mp_compare("decode logits", lg[1], lg[0], 2 * (size_t)V, tol);
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
    if (be->graph_run) /* decode and draft: step 0 runs directly, step 1 is captured and launched, step 2 replayed */
        cr_assert_eq(mg.graph_steps, 4, "%lld decode steps and drafts ran as graphs, expected 4",
                     (long long)mg.graph_steps);
    for (int w = 0; w < 2; w++)
        for (int i = 0; i < 4; i++) bs[w]->free(mem[w][i]);
    model_free(&mc);
    model_free(&mg);
}

/* ------------------------------------------------------------------------------------------ runs (the CLI) */

#define MP_RECIPE \
    "run: {name: pair, seed: 7, store: %s/runs.db, out_dir: %s/out, threads: 2, checkpoint_every: 2}\n" \
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

static const char *MP_DIGITS_LUA = "function reward(sample)\n  local c = sample.completion\n"
                                   "  if #c == 0 then return 0.0 end\n  local _, n = c:gsub('%d', '')\n"
                                   "  return n / #c\nend\n";

/* A fresh directory holding r.yaml (MP_RECIPE) and digits.lua. */
static char *mp_setup_dir(void) {
    char *dir = tu_tmpdir();
    char text[4096], *p = tu_path(dir, "r.yaml"), *l = tu_path(dir, "digits.lua");
    snprintf(text, sizeof text, MP_RECIPE, dir, dir);
    cr_assert_eq(tu_write(p, text, (size_t)-1), 0);
    cr_assert_eq(tu_write(l, MP_DIGITS_LUA, (size_t)-1), 0);
    free(p);
    free(l);
    return dir;
}

/* `moerl CMD r.yaml EXTRA` in dir; asserts exit 0. */
static void mp_run(const char *dir, const char *cmd, const char *extra) {
    char line[8192], *out = NULL;
    snprintf(line, sizeof line, "cd %s && %s %s r.yaml %s", dir, tu_bin(), cmd, extra);
    cr_assert_eq(tu_run(line, &out), 0, "%s\n%s", line, out);
    free(out);
}

/* Metric rows of run 1 (step, name, value) without timings, throughput and memory. */
static char *mp_metrics(const char *dir) {
    char cmd[4096], *out = NULL;
    snprintf(cmd, sizeof cmd, "%s runs export 1 --db %s/runs.db | grep -v 'time/\\|tput/\\|mem/'", tu_bin(), dir);
    cr_assert_eq(tu_run(cmd, &out), 0, "%s", out);
    return out;
}

#endif
