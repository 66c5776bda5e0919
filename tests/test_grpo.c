/* test_grpo.c: GRPO advantages and losses against an independent reference (tests/ref/grpo_ref.py: torch
 * autograd in float64), a finite-difference check of every loss variant's coefficients, the entropy gradient,
 * recipe rejection, and (with the rollout engine) a tiny run whose reward rises and kill-and-resume equivalence. */
#include <criterion/criterion.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "grpo/advantage.h"
#include "grpo/loss.h"
#include "grpo/trainer.h"
#include "model/model.h"
#include "tests/fixtures/grpo_ref.inc"
#include "core/recipe.h"
#include "tests/testutil.h"

#define NSEQ 3

static grpo_loss_cfg cfg_of(const ref_case *rc) {
    grpo_loss_cfg c = {.eps_low = rc->eps_low, .eps_high = rc->eps_high, .dual_clip = rc->dual,
                       .seq_ratio = rc->seq_ratio, .beta = rc->beta, .tis_cap = rc->cap,
                       .max_completion_tokens = REF_LMAX};
    c.agg = !strcmp(rc->agg, "token_mean") ? AGG_TOKEN_MEAN
            : !strcmp(rc->agg, "seq_mean_token_mean") ? AGG_SEQ_MEAN_TOKEN_MEAN
                                                      : AGG_SEQ_MEAN_TOKEN_SUM_NORM;
    c.kl = !strcmp(rc->kl, "k1") ? KL_K1 : !strcmp(rc->kl, "k2") ? KL_K2 : KL_K3;
    c.tis = !strcmp(rc->tis, "token") ? TIS_TOKEN : !strcmp(rc->tis, "sequence") ? TIS_SEQUENCE : TIS_OFF;
    return c;
}

/* The whole reference step, optionally split across two "micro-batches" (the split must not matter). */
static double step_loss(const grpo_loss_cfg *c, const float *lp, float *coef, grpo_loss_acc *acc) {
    grpo_norm nm = {.n_seqs = NSEQ, .n_tokens = 0};
    for (int i = 0; i < NSEQ; i++) nm.n_tokens += ref_len[i];
    memset(acc, 0, sizeof *acc);
    double L = 0;
    int off = 0;
    for (int i = 0; i < NSEQ; i++) {
        grpo_seq s = {.lp = lp + off, .lp_old = ref_lp_old + off, .lp_ref = c->beta > 0 ? ref_lp_ref + off : NULL,
                      .lp_behav = c->tis != TIS_OFF ? ref_lp_behav + off : NULL, .n = ref_len[i], .adv = ref_adv[i]};
        L += grpo_seq_loss(c, &nm, &s, coef + off, acc);
        off += ref_len[i];
    }
    return L;
}

Test(grpo_loss, every_variant_matches_the_torch_reference) {
    size_t nc = sizeof ref_cases / sizeof ref_cases[0];
    for (size_t k = 0; k < nc; k++) {
        grpo_loss_cfg c = cfg_of(&ref_cases[k]);
        float coef[9];
        grpo_loss_acc acc;
        double L = step_loss(&c, ref_lp, coef, &acc);
        cr_assert(fabs(L - ref_cases[k].loss) <= 1e-6 * fmax(1, fabs(ref_cases[k].loss)), "%s: loss %.10g, torch %.10g",
                  ref_cases[k].name, L, ref_cases[k].loss);
        cr_assert(fabs(acc.loss - L) < 1e-15, "%s: accumulated loss", ref_cases[k].name);
        for (int t = 0; t < 9; t++)
            cr_assert(fabs(coef[t] - ref_cases[k].coef[t]) <= 1e-6, "%s: coef[%d] = %.9g, torch %.9g",
                      ref_cases[k].name, t, coef[t], ref_cases[k].coef[t]);
    }
}

Test(grpo_loss, clip_counts_and_dual_clip) {
    grpo_loss_cfg c = cfg_of(&ref_cases[0]); /* token_mean, 0.2 / 0.28 */
    float coef[9];
    grpo_loss_acc acc;
    step_loss(&c, ref_lp, coef, &acc);
    /* ratios: seq0 (A>0) 0.819, 1.284 (> 1.28: high), 0.549; seq1 (A<0) 1.051, 0.670 (< 0.8: low);
     * seq2 (A>0) 1.051, 0.670, 1.051, 1.350 (high) */
    cr_assert_eq(acc.clip_high, 2);
    cr_assert_eq(acc.clip_low, 1);
    cr_assert_eq(acc.tokens, 9);
    cr_assert_eq(acc.dual_clipped, 0);
    c.dual_clip = 1.02; /* seq1 token 0: -A r = 1.366 > 1.02 * 1.3 */
    step_loss(&c, ref_lp, coef, &acc);
    cr_assert_eq(acc.dual_clipped, 1);
    cr_assert_eq(coef[3], 0.0f);
}

/* coef[t] = -dL/dlp_t, checked by central differences of the loss as a function of the log-probs. */
Test(grpo_loss, coefficients_are_minus_the_derivative_of_the_loss) {
    size_t nc = sizeof ref_cases / sizeof ref_cases[0];
    for (size_t k = 0; k < nc; k++) {
        grpo_loss_cfg c = cfg_of(&ref_cases[k]);
        float coef[9], tmp[9], lp[9];
        grpo_loss_acc acc;
        step_loss(&c, ref_lp, coef, &acc);
        for (int t = 0; t < 9; t++) {
            memcpy(lp, ref_lp, sizeof lp);
            const float h = 1e-3f;
            lp[t] = ref_lp[t] + h;
            double up = step_loss(&c, lp, tmp, &acc);
            float hi = lp[t];
            lp[t] = ref_lp[t] - h;
            double dn = step_loss(&c, lp, tmp, &acc);
            double fd = (up - dn) / ((double)hi - (double)lp[t]);
            cr_assert(fabs(-fd - coef[t]) <= 2e-5 + 1e-3 * fabs(coef[t]), "%s: token %d: coef %.8g, -dL/dlp %.8g",
                      ref_cases[k].name, t, coef[t], -fd);
        }
    }
}

Test(grpo_loss, entropy_and_its_gradient) {
    float z[5] = {0.3f, -1.2f, 2.0f, 0.0f, 0.7f};
    double mx = 2.0, s = 0;
    for (int j = 0; j < 5; j++) s += exp(z[j] - mx);
    double H = 0;
    for (int j = 0; j < 5; j++) {
        double p = exp(z[j] - mx) / s;
        H -= p * log(p);
    }
    cr_assert(fabs(grpo_entropy_row(z, 5) - H) < 1e-12);
    float g[5] = {0};
    grpo_entropy_grad_row(g, z, 5, 1.0);
    for (int j = 0; j < 5; j++) {
        float zz[5];
        memcpy(zz, z, sizeof zz);
        zz[j] = z[j] + 1e-3f;
        double up = grpo_entropy_row(zz, 5);
        float hi = zz[j];
        zz[j] = z[j] - 1e-3f;
        double fd = (up - grpo_entropy_row(zz, 5)) / ((double)hi - (double)zz[j]);
        cr_assert(fabs(fd - g[j]) < 1e-5, "dH/dz[%d] = %g, fd %g", j, g[j], fd);
    }
}

/* ------------------------------------------------------------------------------------- advantages */

Test(grpo_advantage, group_batch_and_none_match_the_reference) {
    const double *want[3] = {ref_adv_group, ref_adv_batch, ref_adv_none};
    for (int s = 0; s < 3; s++) {
        adv_opts o = {.scale = (adv_scale)s, .eps = ADV_EPS};
        float adv[12];
        uint8_t in_loss[12];
        adv_stats st;
        grpo_advantages(ref_adv_rewards, ref_adv_scored, NULL, 3, 4, &o, adv, in_loss, &st);
        for (int i = 0; i < 12; i++) {
            cr_assert(fabs(adv[i] - want[s][i]) <= 1e-6 * fmax(1, fabs(want[s][i])), "scale %d sample %d: %.9g vs %.9g",
                      s, i, adv[i], want[s][i]);
            cr_assert_eq(in_loss[i], 1);
        }
        /* unscored samples (3 and 10) get exactly 0 and are counted */
        cr_assert_eq(adv[3], 0.0f);
        cr_assert_eq(adv[10], 0.0f);
        cr_assert_eq(st.n_scored, 10);
        cr_assert_eq(st.n_unscored, 2);
        cr_assert_eq(st.zero_std_groups, 0);
    }
}

Test(grpo_advantage, equal_rewards_give_zero_and_no_signal) {
    double r[8] = {0.5, 0.5, 0.5, 0.5, 1, 1, 0, 1};
    uint8_t sc[8] = {1, 1, 1, 1, 1, 0, 0, 1}; /* group 2: scored rewards 1 and 1 only */
    adv_opts o = {.scale = ADV_SCALE_GROUP, .eps = ADV_EPS};
    float adv[8];
    uint8_t in_loss[8];
    adv_stats st;
    grpo_advantages(r, sc, NULL, 2, 4, &o, adv, in_loss, &st);
    for (int i = 0; i < 8; i++) cr_assert_eq(adv[i], 0.0f, "sample %d", i);
    cr_assert_eq(st.zero_std_groups, 2);
    cr_assert_eq(grpo_group_has_signal(r, sc, 4), 0);
    cr_assert_eq(grpo_group_has_signal(r + 4, sc + 4, 4), 0);
    sc[6] = 1; /* now 1, 0, 1 scored */
    cr_assert_eq(grpo_group_has_signal(r + 4, sc + 4, 4), 1);
    uint8_t one[4] = {0, 0, 1, 0};
    cr_assert_eq(grpo_group_has_signal(r, one, 4), 0);
}

Test(grpo_advantage, truncated_samples_are_masked_but_stay_in_the_baseline) {
    double r[4] = {1, 0, 0, 0};
    uint8_t sc[4] = {1, 1, 1, 1}, tr[4] = {0, 1, 0, 0};
    adv_opts o = {.scale = ADV_SCALE_NONE, .eps = ADV_EPS, .mask_truncated = 1};
    float adv[4];
    uint8_t in_loss[4];
    adv_stats st;
    grpo_advantages(r, sc, tr, 1, 4, &o, adv, in_loss, &st);
    cr_assert_float_eq(adv[0], 0.75f, 1e-7); /* baseline 0.25 includes the truncated sample */
    cr_assert_float_eq(adv[1], -0.25f, 1e-7);
    cr_assert_eq(in_loss[1], 0);
    cr_assert_eq(in_loss[0] + in_loss[2] + in_loss[3], 3);
    cr_assert_eq(st.n_masked, 1);
    cr_assert_eq(st.n_in_loss, 3);
    cr_assert_float_eq(st.mean, (0.75 - 0.25 - 0.25) / 3, 1e-7);
    cr_assert_float_eq(st.max, 0.75, 1e-7);
    cr_assert_float_eq(st.min, -0.25, 1e-7);
    cr_assert_float_eq(st.reward_mean, 0.25, 1e-12);
    cr_assert_float_eq(st.reward_std, sqrt(0.1875), 1e-12);
    o.mask_truncated = 0;
    grpo_advantages(r, sc, tr, 1, 4, &o, adv, in_loss, &st);
    cr_assert_eq(in_loss[1], 1);
}

/* ------------------------------------------------------------------------------------- runs (the CLI) */

#define TINY_RECIPE \
    "run: {name: grpo-tiny, seed: 7, store: %s/runs.db, out_dir: %s/out, threads: 2, checkpoint_every: 1}\n" \
    "model:\n  preset: tiny\n  overrides: {hidden_size: 32, num_hidden_layers: 2, intermediate_size: 64,\n" \
    "    moe_intermediate_size: 16, n_routed_experts: 4, num_experts_per_tok: 2, n_group: 1, topk_group: 1,\n" \
    "    num_attention_heads: 4, q_lora_rank: 16, kv_lora_rank: 16, qk_nope_head_dim: 8, qk_rope_head_dim: 4,\n" \
    "    v_head_dim: 8, num_nextn_predict_layers: 0}\n" \
    "tokenizer: {train: {vocab_size: 300}}\n" \
    "data: {generator: {task: arithmetic, n: 64, difficulty: 1}, eval_n: 4, template: \"Q: {prompt}\\nA: \"}\n" \
    "optim: {schedule: constant, warmup_steps: 0, lr: 0.01}\n" \
    "rollout: {max_new_tokens: 12}\n" \
    "grpo: {steps: %d, num_generations: 8, prompts_per_step: 4, mini_batches_per_step: 2, micro_batch_tokens: 128,\n" \
    "       eval_every: 0}\n" \
    "rewards:\n  - lua: digits.lua\n"

/* An easy reward for a random model: the fraction of digit characters in the completion. */
static const char *DIGITS_LUA = "function reward(sample)\n  local c = sample.completion\n"
                                "  if #c == 0 then return 0.0 end\n  local _, n = c:gsub('%d', '')\n"
                                "  return n / #c\nend\n";

static char *setup_run(int steps) {
    char *dir = tu_tmpdir();
    char text[4096], *p = tu_path(dir, "tiny.yaml"), *l = tu_path(dir, "digits.lua");
    snprintf(text, sizeof text, TINY_RECIPE, dir, dir, steps);
    cr_assert_eq(tu_write(p, text, (size_t)-1), 0);
    cr_assert_eq(tu_write(l, DIGITS_LUA, (size_t)-1), 0);
    free(p);
    free(l);
    return dir;
}

static void drop_dir(char *dir) {
    tu_rmtree(dir);
    free(dir);
}

static int grpo(const char *dir, const char *args, char **out) {
    char cmd[8192];
    snprintf(cmd, sizeof cmd, "cd %s && %s grpo tiny.yaml %s", dir, tu_bin(), args);
    return tu_run(cmd, out);
}

/* metric rows "step,name,value" of run 1 without timings, throughput and memory */
static char *metrics(const char *dir) {
    char cmd[4096], *out = NULL;
    snprintf(cmd, sizeof cmd, "%s runs export 1 --db %s/runs.db | grep -v 'time/\\|tput/\\|mem/'", tu_bin(), dir);
    cr_assert_eq(tu_run(cmd, &out), 0, "%s", out);
    return out;
}

static double metric_at(const char *csv, int step, const char *name) {
    char key[128];
    snprintf(key, sizeof key, "\n%d,%s,", step, name);
    const char *p = strstr(csv, key);
    cr_assert(p, "no %s at step %d", name, step);
    return strtod(p + strlen(key), NULL);
}

Test(grpo_run, reward_rises_and_logprobs_match_the_rollout, .timeout = 120) {
    char *dir = setup_run(16), *out = NULL;
    int rc = grpo(dir, "", &out);
    cr_assert_eq(rc, 0, "%s", out);
    cr_assert(strstr(out, "per step 4 prompts x 8 samples = 32 samples"), "derived quantities not printed:\n%s", out);
    free(out);
    char *csv = metrics(dir);
    double first = 0, last = 0;
    for (int s = 1; s <= 4; s++) first += metric_at(csv, s, "reward/mean") / 4;
    for (int s = 13; s <= 16; s++) last += metric_at(csv, s, "reward/mean") / 4;
    cr_assert(last > first + 0.1, "reward did not rise: first 4 steps %.3f, last 4 %.3f", first, last);
    for (int s = 1; s <= 16; s++) {
        cr_assert_eq(metric_at(csv, s, "mismatch/logp_absdiff_max"), 0.0, "step %d: rollout/trainer log-probs differ", s);
        cr_assert_eq(metric_at(csv, s, "reward/lua/error_rate"), 0.0);
    }
    free(csv);
    drop_dir(dir);
}

Test(grpo_run, kill_and_resume_is_bit_exact, .timeout = 120) {
    char *a = setup_run(4), *b = setup_run(4), *out = NULL;
    cr_assert_eq(grpo(a, "", &out), 0, "%s", out);
    free(out);
    cr_assert_eq(grpo(b, "--stop-after 2", &out), 0, "%s", out);
    free(out);
    cr_assert_eq(grpo(b, "--resume", &out), 0, "%s", out);
    cr_assert(strstr(out, "resuming from"), "%s", out);
    free(out);
    static const char *files[] = {"model.safetensors", "optimizer.safetensors", "trainer_state.json"};
    for (int i = 0; i < 3; i++) {
        char pa[4096], pb[4096];
        snprintf(pa, sizeof pa, "%s/out/step-00000004/%s", a, files[i]);
        snprintf(pb, sizeof pb, "%s/out/step-00000004/%s", b, files[i]);
        size_t na, nb;
        char *x = tu_read(pa, &na), *y = tu_read(pb, &nb);
        cr_assert(x && y, "missing %s", files[i]);
        cr_assert(na == nb && memcmp(x, y, na) == 0, "%s differs after kill and resume", files[i]);
        free(x);
        free(y);
    }
    char *ma = metrics(a), *mb = metrics(b);
    cr_assert_str_eq(ma, mb, "metrics differ after kill and resume");
    cr_assert(strstr(ma, "\n4,policy/loss,"), "no step 4 metrics:\n%s", ma);
    free(ma);
    free(mb);
    drop_dir(a);
    drop_dir(b);
}

/* KL to a reference, TIS, dynamic sampling, two policy iterations, Dr. GRPO's aggregation, the soft overlong
 * penalty, dual clip and the entropy bonus, together. */
Test(grpo_run, every_option_runs, .timeout = 120) {
    char *dir = setup_run(2), *out = NULL;
    int rc = grpo(dir,
                  "--set grpo.beta=0.04 --set grpo.tis.mode=token --set grpo.dynamic_sampling.enabled=true "
                  "--set grpo.mu=2 --set grpo.loss_agg=seq_mean_token_sum_norm --set grpo.scale_rewards=none "
                  "--set grpo.overlong.mode=soft_penalty --set grpo.overlong.buffer=4 --set grpo.dual_clip=3 --set grpo.entropy_coef=0.01",
                  &out);
    cr_assert_eq(rc, 0, "%s", out);
    cr_assert(strstr(out, "4 optimizer updates per step"), "%s", out);
    free(out);
    char *csv = metrics(dir);
    /* the first update of step 1 is at the reference weights, the next three are not */
    cr_assert(metric_at(csv, 1, "policy/kl_ref") > 0 && metric_at(csv, 1, "policy/kl_ref") < 1);
    cr_assert(metric_at(csv, 2, "policy/kl_ref") > 0 && metric_at(csv, 2, "policy/kl_ref") < 1);
    cr_assert_eq(metric_at(csv, 1, "mismatch/logp_absdiff_max"), 0.0);
    cr_assert_eq(metric_at(csv, 1, "policy/tis_weight_mean"), 1.0);
    double pass = metric_at(csv, 1, "filter/pass_rate");
    cr_assert(pass > 0 && pass <= 1);
    free(csv);
    drop_dir(dir);
}

static void expect_refusal(const char *args, const char *msg) {
    char *dir = setup_run(2), *out = NULL;
    int rc = grpo(dir, args, &out);
    cr_assert_eq(rc, 1, "%s: exit %d\n%s", args, rc, out);
    cr_assert(strstr(out, msg), "%s: expected \"%s\" in\n%s", args, msg, out);
    char *db = tu_path(dir, "runs.db");
    FILE *f = fopen(db, "rb");
    cr_assert(!f, "%s: a run was recorded before the recipe was refused", args);
    free(db);
    free(out);
    drop_dir(dir);
}

Test(grpo_run, inconsistent_recipes_are_refused_before_any_work) {
    expect_refusal("--set rollout.temperature=0",
                   "rollout.temperature: 0 (greedy) makes the grpo.num_generations samples of a prompt identical");
    expect_refusal("--set grpo.mini_batches_per_step=3",
                   "grpo.mini_batches_per_step: expected a divisor of prompts_per_step * num_generations (32), got 3");
    expect_refusal("--set grpo.prompts_per_step=100",
                   "grpo.prompts_per_step (100) is larger than the prompt set (64 training rows)");
    expect_refusal("--set grpo.micro_batch_tokens=16", "grpo.micro_batch_tokens (16) must hold the longest prompt");
    expect_refusal("--set rewards=", "rewards: GRPO needs at least one reward plugin, got none");
    expect_refusal("--set grpo.dynamic_sampling.enabled=true --set grpo.dynamic_sampling.max_extra_rounds=0",
                   "grpo.dynamic_sampling.max_extra_rounds: 0 with grpo.dynamic_sampling.enabled");
}

/* ------------------------------------------------------------------- routing replay (in process, probed) */

typedef struct replay_seen {
    int forwards;
    uint64_t hash[8];         /* per update (iteration * 2 + update): FNV-1a of its logits */
    int64_t flips[8];         /* completion (row, layer, slot) experts unlike the rollout's */
    int64_t prompt_diff;      /* prompt-row experts unlike the replayed table */
    int64_t compared[2];      /* completion rows compared, per iteration */
} replay_seen;

static void replay_probe(void *ctx, model *m, int it, int upd, const grpo_probe_seq *s, int n) {
    replay_seen *R = ctx;
    int f = it * 2 + upd, K = m->p.cfg.num_experts_per_tok, n_moe = 0, moe[16];
    cr_assert(f < 8);
    for (int l = 0; l < m->p.n_layers; l++)
        if (m->p.w.layers[l].is_moe) moe[n_moe++] = l;
    R->forwards++;
    const float *lg = model_logits(m);
    uint64_t h = R->hash[f] ? R->hash[f] : 1469598103934665603ull;
    const unsigned char *bytes = (const unsigned char *)lg;
    for (size_t i = 0; i < (size_t)m->T * m->p.cfg.vocab_size * sizeof(float); i++) h = (h ^ bytes[i]) * 1099511628211ull;
    R->hash[f] = h;
    for (int q = 0; q < n; q++) {
        cr_assert(s[q].rollout, "routing replay: the rollout recorded no experts");
        for (int j = 0; j < n_moe; j++) {
            const int32_t *ex = model_layer_experts(m, moe[j]);
            for (int i = 0; i < s[q].n; i++) {
                int row = s[q].row0 + s[q].prompt_len - 1 + i;
                R->flips[f] += memcmp(ex + (size_t)row * K, s[q].rollout + ((size_t)i * n_moe + j) * K,
                                      (size_t)K * sizeof(int32_t)) != 0;
                R->compared[it] += j == 0;
            }
            for (int r = 0; s[q].replay && r < s[q].prompt_len - 1; r++)
                R->prompt_diff += memcmp(ex + (size_t)(s[q].row0 + r) * K, s[q].replay + ((size_t)r * n_moe + j) * K,
                                         (size_t)K * sizeof(int32_t)) != 0;
        }
    }
}

static void run_probed(const char *dir, const char *replay, replay_seen *R) {
    char *path = tu_path(dir, "tiny.yaml"), set[64];
    recipe *r = NULL;
    mr_err e = {0};
    cr_assert_eq(chdir(dir), 0); /* the recipe names digits.lua relative to the working directory */
    cr_assert_eq(recipe_load(&r, path, &e), 0, "%s", e.msg);
    snprintf(set, sizeof set, "grpo.routing_replay=%s", replay);
    const char *sets[] = {set, "grpo.mu=2", "optim.lr=0.05", "grpo.eval_every=0", "data.eval_n=1"};
    for (int i = 0; i < 5; i++) cr_assert_eq(recipe_set(r, sets[i], &e), 0, "%s: %s", sets[i], e.msg);
    cr_assert_eq(recipe_resolve(r, &e), 0, "%s", e.msg);
    memset(R, 0, sizeof *R);
    grpo_set_probe(replay_probe, R);
    int rc = grpo_run(r, 0, 0, &e);
    grpo_set_probe(NULL, NULL);
    cr_assert_eq(rc, 0, "%s", e.msg);
    recipe_free(r);
    free(path);
}

/* μ = 2, two mini-batches, a large learning rate so the routers move: with replay every policy forward routes
 * completion rows as the rollout did and prompt rows as the step's start did; without it, they drift. The two runs
 * agree exactly on the first update (same weights, same routing) and part where the routing would have changed. */
Test(grpo_run, routing_replay_reuses_the_rollouts_experts, .timeout = 120) {
    char *a = setup_run(1), *b = setup_run(1);
    replay_seen with, without;
    run_probed(a, "true", &with);
    run_probed(b, "false", &without);
    cr_assert_eq(with.forwards, without.forwards);
    cr_assert(with.compared[1] > 0, "no forward of the second policy iteration was seen");
    for (int f = 0; f < 4; f++) cr_assert_eq(with.flips[f], 0, "update %d: %lld completion experts differ from the rollout's", f, (long long)with.flips[f]);
    cr_assert_eq(with.prompt_diff, 0, "prompt rows did not take the replayed experts");
    /* at the step's starting weights the fresh routing is the rollout's: the first update is the same in both */
    cr_assert_eq(without.flips[0], 0, "the trainer's first forward routes unlike the rollout");
    cr_assert_eq(with.hash[0], without.hash[0], "the first update's logits differ with routing replay");
    int64_t later = without.flips[1] + without.flips[2] + without.flips[3];
    cr_assert(later > 0, "the routers never moved: this test cannot tell replay from none");
    int differ = 0;
    for (int f = 1; f < 4; f++) differ += with.hash[f] != without.hash[f];
    cr_assert(differ > 0, "replay changed nothing although the routing moved");
    drop_dir(a);
    drop_dir(b);
}
