/* test_sft.c: the SFT loop on synthetic data: the loss falls, resume is bit-exact, prompt tokens carry no loss,
 * packed and padded batches give the same per-document loss, non-finite steps are skipped and then stop. */
#include <criterion/criterion.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/rng.h"
#include "model/model.h"
#include "rollout/greedy.h"
#include "sft/checkpoint.h"
#include "sft/trainer.h"
#include "tests/testutil.h"

static void tiny(model_config *c) {
    config_tiny(c);
    c->vocab_size = 32;
    c->hidden_size = 32;
    c->intermediate_size = 48;
    c->moe_intermediate_size = 16;
    c->num_hidden_layers = 2;
    c->num_attention_heads = 2;
    c->num_key_value_heads = 2;
    c->q_lora_rank = 16;
    c->kv_lora_rank = 16;
    c->qk_nope_head_dim = 8;
    c->qk_rope_head_dim = 4;
    c->v_head_dim = 8;
    c->n_routed_experts = 4;
    c->num_experts_per_tok = 2;
    c->n_group = 2;
    c->topk_group = 1;
    c->num_nextn_predict_layers = 1;
    c->max_position_embeddings = 64;
}

static model *make_model(uint64_t seed, int T_max) {
    model_config c;
    tiny(&c);
    model_params p;
    mr_err e = {0};
    cr_assert_eq(params_init(&p, &c, &e), MR_OK, "%s", e.msg);
    params_init_random(&p, seed, 0.05f);
    model *m = calloc(1, sizeof *m);
    model_opts opt = {.mm = MM_DET, .mtp_weight = 0.3f, .balance_alpha = 0.01f};
    cr_assert_eq(model_init(m, &p, &opt, T_max, &e), MR_OK, "%s", e.msg);
    return m;
}

/* Task: prompt = 4 random digits (ids 3..12) then a separator 2; completion = the digits reversed, then EOS 1. */
static sft_example *reverse_task(size_t n, uint64_t seed) {
    sft_example *ex = calloc(n, sizeof *ex);
    for (size_t i = 0; i < n; i++) {
        rng r;
        rng_init(&r, seed, i);
        ex[i].ids = malloc(10 * sizeof(int32_t));
        for (int j = 0; j < 4; j++) ex[i].ids[j] = 3 + (int32_t)rng_below(&r, 10);
        ex[i].ids[4] = 2;
        for (int j = 0; j < 4; j++) ex[i].ids[5 + j] = ex[i].ids[3 - j];
        ex[i].ids[9] = 1;
        ex[i].n = 10;
        ex[i].n_prompt = 5;
    }
    return ex;
}

static sft_cfg base_cfg(const char *out) {
    sft_cfg c = {.seed = 11, .steps = 40, .batch_seqs = 8, .grad_accum = 2, .max_seq_len = 16, .packing = 1,
                 .pad_id = 0, .mtp_weight = 0.3f, .balance_alpha = 0.01f, .bias_gamma = 0.001f,
                 .adam = {.beta1 = 0.9, .beta2 = 0.95, .eps = 1e-8, .weight_decay = 0.01},
                 .sched = {.kind = SCHED_COSINE, .lr = 3e-3, .warmup_steps = 4, .total_steps = 40, .min_lr_ratio = 0.1},
                 .grad_clip = 1.0, .keep_checkpoints = 2, .max_bad_steps = 3, .out_dir = out};
    return c;
}

Test(sft, loss_falls_on_a_tiny_run) {
    char *dir = tu_tmpdir();
    model *m = make_model(1, 128);
    sft_example *ex = reverse_task(256, 5);
    sft_cfg cfg = base_cfg(dir);
    sft_result res;
    mr_err e = {0};
    cr_assert_eq(sft_train(m, ex, 256, &cfg, NULL, 0, &res, &e), MR_OK, "%s", e.msg);
    fprintf(stderr, "sft tiny: loss %.4f -> %.4f over %lld steps\n", res.first_loss, res.last_loss, (long long)res.steps_done);
    cr_expect_lt(res.last_loss, 0.7 * res.first_loss, "loss %.4f -> %.4f", res.first_loss, res.last_loss);
    cr_expect_eq(res.steps_done, 40);
    char path[4200];
    int64_t step;
    cr_expect_eq(ckpt_latest(dir, path, sizeof path, &step, &e), MR_OK);
    cr_expect_eq(step, 40);
    model_free(m);
    free(m);
    tu_rmtree(dir);
}

Test(sft, resume_is_bit_exact) {
    char *d1 = tu_tmpdir(), *d2 = tu_tmpdir();
    sft_example *ex = reverse_task(64, 7);
    mr_err e = {0};
    /* uninterrupted: 12 steps (crosses an epoch boundary: 64 examples / 8 per step = 8 steps per epoch) */
    model *a = make_model(3, 128);
    sft_cfg ca = base_cfg(d1);
    ca.steps = 12;
    ca.sched.total_steps = 12;
    sft_result ra;
    cr_assert_eq(sft_train(a, ex, 64, &ca, NULL, 0, &ra, &e), MR_OK, "%s", e.msg);
    /* interrupted after 8 steps (checkpoint every 4, the run stops right after step 8's checkpoint) */
    model *b = make_model(3, 128);
    sft_cfg cb = ca;
    cb.out_dir = d2;
    cb.checkpoint_every = 4;
    cb.stop_after = 8;
    sft_result rb;
    cr_assert_eq(sft_train(b, ex, 64, &cb, NULL, 0, &rb, &e), MR_OK, "%s", e.msg);
    cr_assert_eq(rb.steps_done, 8);
    model_free(b);
    /* a fresh process: a differently initialized model, then --resume */
    b = make_model(99, 128);
    cb.stop_after = 0;
    cr_assert_eq(sft_train(b, ex, 64, &cb, NULL, 1, &rb, &e), MR_OK, "%s", e.msg);
    cr_expect_eq(rb.steps_done, 12);
    cr_expect(ra.last_loss == rb.last_loss, "last loss %.9g vs %.9g", ra.last_loss, rb.last_loss);
    cr_expect(memcmp(a->p.data, b->p.data, a->p.n * sizeof(float)) == 0, "final weights differ after resume");
    model_free(a);
    model_free(b);
    tu_rmtree(d1);
    tu_rmtree(d2);
}

Test(sft, prompt_tokens_carry_no_loss) {
    sft_example *ex = reverse_task(3, 1);
    size_t order[3] = {0, 1, 2};
    sft_micro mb = {0};
    mr_err e = {0};
    cr_assert_eq(sft_pack(&mb, ex, order, 0, 3, 16, 1, 0, 0, &e), MR_OK);
    cr_expect_eq(mb.T, 30);
    cr_expect_eq(mb.n_loss, 3 * 5); /* rows 4..8 of each document predict the 5 completion tokens */
    for (int d = 0; d < 3; d++)
        for (int j = 0; j < 10; j++) {
            int t = d * 10 + j;
            cr_expect_eq(mb.doc[t], d * 10);
            cr_expect_eq(mb.pos[t], j);
            if (j < 4 || j == 9) cr_expect_eq(mb.tgt[t], -1, "row %d (prompt or last) has a target", t);
            else cr_expect_eq(mb.tgt[t], ex[d].ids[j + 1]);
        }
    cr_assert_eq(sft_pack(&mb, ex, order, 0, 3, 16, 1, 1, 0, &e), MR_OK); /* loss_on: all */
    cr_expect_eq(mb.n_loss, 3 * 9);
    cr_assert_eq(sft_pack(&mb, ex, order, 0, 2, 16, 0, 0, 0, &e), MR_OK); /* padding */
    cr_expect_eq(mb.T, 32);
    cr_expect_eq(mb.tgt[12], -1);
    cr_expect_eq(mb.doc[12], 12);
    sft_micro_free(&mb);
}

Test(sft, packed_and_padded_give_the_same_per_document_loss) {
    model *m = make_model(4, 64);
    sft_example *ex = reverse_task(3, 9);
    size_t order[3] = {0, 1, 2};
    sft_micro pk = {0}, one = {0};
    mr_err e = {0};
    cr_assert_eq(sft_pack(&pk, ex, order, 0, 3, 16, 1, 0, 0, &e), MR_OK);
    for (int d = 0; d < 3; d++) {
        /* document d inside the packed batch: keep only its targets */
        int32_t tgt[64];
        for (int t = 0; t < pk.T; t++) tgt[t] = pk.doc[t] == d * 10 ? pk.tgt[t] : -1;
        model_batch b = {.ids = pk.ids, .pos = pk.pos, .doc_start = pk.doc, .targets = tgt, .T = pk.T};
        model_loss lp, la;
        cr_assert_eq(model_forward(m, &b, 0, &lp, &e), MR_OK, "%s", e.msg);
        /* document d alone, padded to 16 */
        cr_assert_eq(sft_pack(&one, ex, order, (size_t)d, 1, 16, 0, 0, 0, &e), MR_OK);
        model_batch b1 = {.ids = one.ids, .pos = one.pos, .doc_start = one.doc, .targets = one.tgt, .T = one.T};
        cr_assert_eq(model_forward(m, &b1, 0, &la, &e), MR_OK, "%s", e.msg);
        cr_expect(lp.main == la.main, "doc %d: packed %.9g vs alone %.9g", d, lp.main, la.main);
        cr_expect(lp.mtp[0] == la.mtp[0], "doc %d MTP: packed %.9g vs alone %.9g", d, lp.mtp[0], la.mtp[0]);
    }
    sft_micro_free(&pk);
    sft_micro_free(&one);
    model_free(m);
}

Test(sft, non_finite_steps_are_skipped_then_stop) {
    char *dir = tu_tmpdir();
    model *m = make_model(1, 128);
    sft_example *ex = reverse_task(64, 5);
    /* poison one weight: every loss is NaN */
    m->p.w.final_norm[0] = NAN;
    sft_cfg cfg = base_cfg(dir);
    sft_result res;
    mr_err e = {0};
    cr_assert_neq(sft_train(m, ex, 64, &cfg, NULL, 0, &res, &e), MR_OK);
    cr_expect(strstr(e.msg, "3 steps in a row had a non-finite loss or gradient") != NULL, "%s", e.msg);
    cr_expect_eq(res.skipped, 3);
    model_free(m);
    tu_rmtree(dir);
}

Test(sft, greedy_generation_is_batch_invariant) {
    model *m = make_model(8, 64);
    sft_example *ex = reverse_task(3, 2);
    const int32_t *pr[3] = {ex[0].ids, ex[1].ids, ex[2].ids};
    int pl[3] = {5, 4, 5};
    int32_t *out[3], *one[1];
    int ol[3], l1;
    mr_err e = {0};
    cr_assert_eq(greedy_generate(m, pr, pl, 3, 6, 1, out, ol, &e), MR_OK, "%s", e.msg);
    for (int i = 0; i < 3; i++) {
        cr_assert_eq(greedy_generate(m, pr + i, pl + i, 1, 6, 1, one, &l1, &e), MR_OK, "%s", e.msg);
        cr_expect_eq(l1, ol[i]);
        cr_expect(memcmp(one[0], out[i], sizeof(int32_t) * (size_t)l1) == 0, "prompt %d differs alone", i);
        /* the first token is the argmax of the prompt's last row */
        model_batch b = {.ids = pr[i], .T = pl[i], .skip_mtp = 1};
        cr_assert_eq(model_forward(m, &b, 0, NULL, &e), MR_OK);
        const float *row = model_logits(m) + (size_t)(pl[i] - 1) * m->p.cfg.vocab_size;
        int best = 0;
        for (int v = 1; v < m->p.cfg.vocab_size; v++)
            if (row[v] > row[best]) best = v;
        if (best != 1) cr_expect_eq(out[i][0], best);
        free(one[0]);
    }
    cr_expect_neq(greedy_generate(m, pr, pl, 1, 70, 1, out, ol, &e), MR_OK);
    model_free(m);
}
