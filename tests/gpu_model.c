/* gpu_model.c: the model, the optimizer and whole runs on the CUDA backend against the CPU (label gpu). Without a
 * CUDA build or device the executable exits 77 (ctest: Skipped) and prints why.
 *
 * Tolerances (norm-wise relative error, every element finite): fp32 (MM_DET, the exact kernels, and MM_FAST with
 * cuBLAS fp32) 1e-4 end to end through three layers, flash attention and MoE (each op alone is held to 1e-5 in
 * gpu_model_ops.c); the routing must pick the same experts as on the CPU (a random model at this seed has no
 * near-ties in fp32; a flipped expert would show as a large error anyway).
 *
 * bf16 GEMMs (each GEMM alone within 1e-2 in gpu_ops.c): this random model (weights of std 0.3, three layers) is far
 * from a trained one, and bf16 rounding of every GEMM input flips router near-ties and grows through the backward.
 * Measured on the CPU emulation (tests/cuemu, which rounds the GEMM inputs to bf16 exactly and accumulates in fp32,
 * as cuBLAS's COMPUTE_32F does): with the CPU's routing replayed, losses within 0.3%, the gradient within 7.4%
 * norm-wise; rounding to 8, 10, 13 mantissa bits instead of bf16's 7 gives 2.1%, 0.70%, 0.085%, so that error is
 * the rounding's, not a fault. Without replay one of the layers routes a token elsewhere. The bf16 test therefore
 * replays the CPU's routing and bounds losses by 1e-2 and gradients by 0.15. */
#include <criterion/criterion.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "tests/gpu_common.h"

#ifdef MOERL_HAVE_CUDA
#include "rollout/rollout.h"
#include "tests/model_pair.h"

TestSuite(gpu_model, .init = gpu_setup);

Test(gpu_model, training_step_and_optimizer_match_the_cpu_fp32_exact_gemm) { mp_train_step(gpu, MM_DET, 1e-5, 1e-4, 0); }

Test(gpu_model, training_step_and_optimizer_match_the_cpu_cublas_fp32) {
    dense_cuda_set_bf16(0);
    mp_train_step(gpu, MM_FAST, 1e-5, 1e-4, 0);
}

Test(gpu_model, training_step_and_optimizer_match_the_cpu_cublas_bf16) {
    dense_cuda_set_bf16(1);
    mp_train_step(gpu, MM_FAST, 1e-2, 0.15, 1);
    dense_cuda_set_bf16(0);
}

Test(gpu_model, prefill_decode_and_mtp_draft_match_the_cpu) { mp_prefill_decode(gpu, 1e-5); }

/* Decode steps replayed as CUDA graphs (model.c decode_body through graph_run) give the bits of the same steps
 * launched one by one, as the batch shrinks and the caches grow; the graphs did run. */
static void graphs_case(mm_mode mm) {
    enum { T = 16, CAP = 14, NB = 3 };
    model mg[2];
    mr_err e = {0};
    for (int w = 0; w < 2; w++) {
        model_config c;
        tu_config_all_options(&c);
        model_params p;
        mp_random_params(&p, &c);
        model_opts o = {.backend = gpu, .mm = mm, .mm_bwd = mm, .no_graphs = w == 0};
        cr_assert_eq(model_init(&mg[w], &p, &o, T, &e), MR_OK, "%s", e.msg);
    }
    const int V = mg[0].p.cfg.vocab_size;
    size_t fc, fk;
    model_kv_floats(&mg[0], CAP, &fc, &fk);
    model_kv kv[2][NB];
    float *mem[2][NB];
    for (int w = 0; w < 2; w++)
        for (int j = 0; j < NB; j++) {
            mem[w][j] = gpu->alloc((fc + fk) * sizeof(float));
            cr_assert(mem[w][j]);
            kv[w][j] = (model_kv){.ckv = mem[w][j], .kpe = mem[w][j] + fc, .cap = CAP};
        }
    int32_t ids[6] = {3, 9, 27, 4, 11, 40}, pos[6] = {0, 1, 0, 1, 2, 0}, doc[6] = {0, 0, 2, 2, 2, 5};
    model_batch b = {.ids = ids, .pos = pos, .doc_start = doc, .T = 6, .skip_mtp = 1};
    for (int w = 0; w < 2; w++) {
        model_kv *k[NB] = {&kv[w][0], &kv[w][1], &kv[w][2]};
        cr_assert_eq(model_prefill(&mg[w], &b, k, NB, &e), MR_OK, "%s", e.msg);
    }
    int32_t next[NB] = {5, 6, 7};
    for (int step = 0; step < 9; step++) {
        const int B = step < 6 ? 3 : 2; /* the last sequence finishes: a second graph */
        const float *lg[2];
        for (int w = 0; w < 2; w++) {
            model_kv *k[NB] = {&kv[w][0], &kv[w][1], &kv[w][2]};
            cr_assert_eq(model_decode_step(&mg[w], next, k, B, &e), MR_OK, "step %d: %s", step, e.msg);
            lg[w] = model_logits(&mg[w]);
            cr_assert(lg[w]);
        }
        for (size_t i = 0; i < (size_t)B * V; i++)
            if (memcmp(&lg[0][i], &lg[1][i], sizeof(float)))
                cr_assert_fail("step %d: graph logit %zu is %.9g, direct %.9g", step, i, lg[1][i], lg[0][i]);
        for (int j = 0; j < B; j++) next[j] = (int32_t)((next[j] * 7 + step) % V);
    }
    cr_assert_eq(mg[0].graph_steps, 0);
    /* batch 3: steps 0 (direct), 1 (capture + launch), 2..5 replayed; batch 2: steps 6, 7, 8 likewise */
    cr_assert_geq(mg[1].graph_steps, 6, "only %lld decode steps ran as graphs", (long long)mg[1].graph_steps);
    for (int w = 0; w < 2; w++) {
        for (int j = 0; j < NB; j++) gpu->free(mem[w][j]);
        model_free(&mg[w]);
    }
}

Test(gpu_model, decode_graphs_give_the_direct_bits_det) { graphs_case(MM_DET); }

/* MM_DET on CUDA: the rollout's log-probs (decode on the latent caches, CUDA graphs, the MoE's direct path) equal
 * the trainer's (one packed model_forward: absorbed attention per row, the MoE's dispatch) bit for bit. */
Test(gpu_model, rollout_logp_bit_equal_to_trainer_det) {
    enum { NP = 3, G = 4, NEW = 9 };
    static const int PLEN[NP] = {3, 7, 5};
    model m;
    mr_err e = {0};
    model_config c;
    tu_config_all_options(&c);
    model_params p;
    mp_random_params(&p, &c);
    model_opts mo = {.backend = gpu, .mm = MM_DET, .mm_bwd = MM_DET};
    cr_assert_eq(model_init(&m, &p, &mo, 64, &e), MR_OK, "%s", e.msg);
    const int V = m.p.cfg.vocab_size;
    int32_t prompt[NP][8];
    const int32_t *pp[NP];
    for (int q = 0; q < NP; q++) {
        for (int j = 0; j < PLEN[q]; j++) prompt[q][j] = (int32_t)((q * 13 + j * 7 + 3) % V);
        pp[q] = prompt[q];
    }
    int64_t pid[NP] = {0, 1, 2};
    rollout_opts o = rollout_opts_default();
    o.temperature = 1.0f;
    o.max_new_tokens = NEW;
    o.seed = 11;
    o.record_experts = 1;
    rollout_seq out[NP * G];
    memset(out, 0, sizeof out);
    cr_assert_eq(rollout_generate(&m, NULL, pp, PLEN, pid, NP, G, &o, out, &e), MR_OK, "%s", e.msg);
    cr_assert_gt(m.graph_steps, 0, "the decode steps ran as CUDA graphs");
    for (int g = 0; g < NP; g++) { /* the trainer's side: the G samples of prompt g packed in one forward */
        int32_t ids[64], pos[64], doc[64], tgt[64];
        int T = 0, start[G];
        const int pl = PLEN[g];
        for (int k = 0; k < G; k++) {
            const rollout_seq *s = &out[g * G + k];
            start[k] = T;
            cr_assert_leq(T + pl + s->n, 64);
            for (int j = 0; j < pl + s->n; j++, T++) {
                ids[T] = j < pl ? pp[g][j] : s->tokens[j - pl];
                pos[T] = j, doc[T] = start[k], tgt[T] = -1;
            }
            for (int i = 0; i < s->n; i++) tgt[start[k] + pl - 1 + i] = s->tokens[i];
        }
        model_batch b = {.ids = ids, .pos = pos, .doc_start = doc, .T = T};
        cr_assert_eq(model_forward(&m, &b, 0, NULL, &e), MR_OK, "%s", e.msg);
        float lp[64];
        logprob_forward(lp, model_logits(&m), tgt, T, V);
        for (int k = 0; k < G; k++) {
            const rollout_seq *s = &out[g * G + k];
            for (int i = 0; i < s->n; i++) {
                const float a = s->logp[i], r = lp[start[k] + pl - 1 + i];
                cr_assert(memcmp(&a, &r, sizeof a) == 0, "prompt %d sample %d token %d: rollout %.9g, trainer %.9g",
                          g, k, i, (double)a, (double)r);
            }
        }
    }
    for (int q = 0; q < NP * G; q++) rollout_seq_free(&out[q]);
    model_free(&m);
}
Test(gpu_model, decode_graphs_give_the_direct_bits_cublas) { graphs_case(MM_FAST); }

/* Whole runs through the CLI: SFT on CUDA tracks the CPU's losses (the same batches, fp32 arithmetic in another
 * order); GRPO completes with finite metrics (its samples may differ from the CPU's once a logit rounds
 * differently, so its health is checked: finite loss, rewards in range, and the rollout's log-probs close to the
 * trainer's). */
static double metric(const char *csv, const char *name, int step) {
    char key[256];
    snprintf(key, sizeof key, "\n%d,%s,", step, name);
    const char *p = strstr(csv, key);
    cr_assert(p, "metric %s at step %d missing in:\n%s", name, step, csv);
    return strtod(p + strlen(key), NULL);
}

/* Two SFT steps on the CPU and on CUDA (`extra`): losses and gradient norms within tol_loss and tol_grad of the
 * CPU's, relative; the CUDA run saved its checkpoint. */
static void sft_case(const char *extra, double tol_loss, double tol_grad) {
    char *a = mp_setup_dir(), *b = mp_setup_dir();
    mp_run(a, "sft", "");
    mp_run(b, "sft", extra);
    char *ma = mp_metrics(a), *mb = mp_metrics(b);
    for (int step = 1; step <= 2; step++) {
        double la = metric(ma, "train/loss", step), lb = metric(mb, "train/loss", step);
        double ga = metric(ma, "optim/grad_norm", step), gb = metric(mb, "optim/grad_norm", step);
        cr_assert(isfinite(lb) && fabs(la - lb) <= tol_loss * fabs(la), "step %d loss: cuda %.9g, cpu %.9g [%s]", step,
                  lb, la, extra);
        cr_assert(isfinite(gb) && fabs(ga - gb) <= tol_grad * fabs(ga), "step %d grad norm: cuda %.9g, cpu %.9g [%s]",
                  step, gb, ga, extra);
    }
    free(ma);
    free(mb);
    char path[4096];
    snprintf(path, sizeof path, "%s/out/step-00000002/model.safetensors", b);
    cr_assert_eq(access(path, R_OK), 0, "the CUDA run saved its checkpoint %s", path);
    tu_rmtree(a);
    tu_rmtree(b);
    free(a);
    free(b);
}

Test(gpu_model, sft_on_cuda_tracks_the_cpu, .timeout = 600) { sft_case("--set run.device=cuda", 1e-4, 1e-3); }

/* The fast path in bf16 (flash attention, cuBLAS with bf16 inputs) tracks the CPU's fp32 run. Measured on
 * tests/cuemu (bf16 inputs exactly, fp32 accumulation), seeds 1 and 2: losses within 2e-8 and 5e-5 relative at steps
 * 1 and 2 (the tiny model's logits start near 0), gradient norms within 2.2e-3 and 2.1e-3 (bf16 is in use: fp32
 * gives ~1e-6). Bounds: 1e-3 and 2e-2. */
Test(gpu_model, sft_on_cuda_bf16_fast_path_tracks_the_cpu, .timeout = 600) {
    sft_case("--set run.device=cuda --set run.precision=bf16 --set run.deterministic=false", 1e-3, 2e-2);
}

/* Two GRPO steps on CUDA: finite losses, rewards in [0, 1], and the rollout's log-probs within max_mismatch of
 * the trainer's (0: bit for bit). */
static void grpo_case(const char *extra, double max_mismatch) {
    char *b = mp_setup_dir();
    mp_run(b, "grpo", extra);
    char *mb = mp_metrics(b);
    for (int step = 1; step <= 2; step++) {
        double loss = metric(mb, "policy/loss", step), r = metric(mb, "reward/mean", step);
        cr_assert(isfinite(loss) && r >= 0 && r <= 1, "step %d: loss %g, reward %g", step, loss, r);
        double mm = metric(mb, "mismatch/logp_absdiff_max", step);
        cr_assert(isfinite(mm) && mm <= max_mismatch, "step %d: rollout vs trainer log-prob mismatch %g (bound %g)",
                  step, mm, max_mismatch);
    }
    free(mb);
    tu_rmtree(b);
    free(b);
}

/* Deterministic mode (the recipe's default): the rollout's log-probs are the trainer's, bit for bit. */
Test(gpu_model, grpo_on_cuda_runs, .timeout = 600) { grpo_case("--set run.device=cuda", 0); }

/* Not deterministic (flash attention and cuBLAS in training, the absorbed kernel in the rollout): the log-probs
 * differ by rounding only (4.8e-7 at both steps on tests/cuemu; bound 1e-4). */
Test(gpu_model, grpo_on_cuda_fast_path_mismatch_is_rounding, .timeout = 600) {
    grpo_case("--set run.device=cuda --set run.deterministic=false", 1e-4);
}
#endif

int main(int argc, char **argv) { return gpu_test_main(argc, argv, "gpu_model"); }
