/* test_sft_cli.c: `moerl sft` end to end on a very small recipe: checkpoints and the run store; a run killed
 * with SIGKILL and resumed ends with the same weights and the same logged losses as an uninterrupted run (resumed
 * at an epoch boundary); a bad dataset row names its file and line and writes nothing. */
#include <criterion/criterion.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "core/runstore.h"
#include "core/sha256.h"
#include "tests/testutil.h"

/* 40 generated rows, 8 per step: an epoch is 5 steps; checkpoints every 5 steps fall on epoch boundaries. */
static const char *recipe_text =
    "run:\n"
    "  name: sft-cli\n"
    "  seed: 7\n"
    "  threads: 1\n"
    "  checkpoint_every: 5\n"
    "  keep_checkpoints: 0\n"
    "model:\n"
    "  preset: tiny\n"
    "  overrides: {hidden_size: 32, num_hidden_layers: 2, intermediate_size: 48, moe_intermediate_size: 16,\n"
    "              n_routed_experts: 4, n_group: 2, topk_group: 1, num_attention_heads: 2, q_lora_rank: 16,\n"
    "              kv_lora_rank: 16, qk_nope_head_dim: 8, qk_rope_head_dim: 4, v_head_dim: 8}\n"
    "tokenizer:\n"
    "  train: {vocab_size: 300}\n"
    "data:\n"
    "  generator: {task: arithmetic, n: 40, difficulty: 1}\n"
    "  eval_n: 4\n"
    "  template: \"Q: {prompt}\\nA: \"\n"
    "  max_seq_len: 48\n"
    "optim: {lr: 3.0e-3, warmup_steps: 2}\n"
    "sft:\n"
    "  steps: 12\n"
    "  batch_seqs: 8\n"
    "  grad_accum: 2\n"
    "  eval_every: 6\n"
    "rollout: {max_new_tokens: 8}\n";

static char *dir;
static void setup(void) { dir = tu_tmpdir(); }
static void teardown(void) { tu_rmtree(dir); }

static int sh(char **out, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static int sh(char **out, const char *fmt, ...) {
    char cmd[8192];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(cmd, sizeof cmd, fmt, ap);
    va_end(ap);
    return tu_run(cmd, out);
}

static int exists(const char *path) {
    struct stat st;
    return stat(path, &st) == 0;
}

typedef struct {
    double loss[64];
    int seen[64];
    int evals;
} metrics;

static int on_metric(void *ud, int64_t step, const char *name, double value) {
    metrics *m = ud;
    if (!strcmp(name, "train/loss") && step >= 0 && step < 64) {
        m->loss[step] = value;
        m->seen[step] = 1;
    }
    if (!strcmp(name, "eval/exact_match")) m->evals++;
    return 0;
}

typedef struct {
    char sha[65];
    char path[4096];
    int64_t step;
} last_ckpt;

static int on_ckpt(void *ud, const runstore_checkpoint *c) {
    last_ckpt *l = ud;
    if (c->step > l->step) {
        l->step = c->step;
        snprintf(l->sha, sizeof l->sha, "%s", c->sha256 ? c->sha256 : "");
        snprintf(l->path, sizeof l->path, "%s", c->path);
    }
    return 0;
}

static metrics read_metrics(const char *db) {
    metrics m;
    memset(&m, 0, sizeof m);
    runstore *rs = NULL;
    mr_err e = {0};
    cr_assert_eq(runstore_open_existing(&rs, db, &e), 0, "%s", e.msg);
    cr_assert_eq(runstore_foreach_metric(rs, 1, on_metric, &m, &e), 0, "%s", e.msg);
    runstore_close(rs);
    return m;
}

Test(sft_cli, train_checkpoint_store, .init = setup, .fini = teardown) {
    char *r = tu_path(dir, "r.yaml"), *out = NULL;
    cr_assert_eq(tu_write(r, recipe_text, (size_t)-1), 0);
    int st = sh(&out, "cd %s && %s sft r.yaml", dir, tu_bin());
    cr_assert_eq(st, 0, "moerl sft failed:\n%s", out);
    cr_assert(strstr(out, "eval at step 12"), "%s", out);
    free(out);
    const char *files[] = {"config.json", "model.safetensors", "tokenizer.json", "trainer_state.json"};
    for (int i = 0; i < 4; i++) {
        char p[4096];
        snprintf(p, sizeof p, "%s/runs/step-00000012/%s", dir, files[i]);
        cr_assert(exists(p), "missing %s", p);
    }
    char db[4096];
    snprintf(db, sizeof db, "%s/runs.db", dir);
    metrics m = read_metrics(db);
    for (int s = 1; s <= 12; s++) cr_assert(m.seen[s], "no train/loss at step %d", s);
    cr_assert_lt(m.loss[12], m.loss[1], "loss did not fall: %g -> %g", m.loss[1], m.loss[12]);
    cr_assert_eq(m.evals, 2, "eval/exact_match logged %d times, expected 2 (steps 6, 12)", m.evals);
    /* the store's checkpoint row carries the SHA-256 of the weights file */
    runstore *rs = NULL;
    mr_err e = {0};
    last_ckpt lc = {.step = -1};
    cr_assert_eq(runstore_open_existing(&rs, db, &e), 0, "%s", e.msg);
    cr_assert_eq(runstore_foreach_checkpoint(rs, 1, on_ckpt, &lc, &e), 0, "%s", e.msg);
    runstore_close(rs);
    cr_assert_eq(lc.step, 12);
    char want[65], wpath[8300];
    snprintf(wpath, sizeof wpath, "%s/%s/model.safetensors", dir, lc.path);
    cr_assert_eq(sha256_file(wpath, want, &e), 0, "%s", e.msg);
    cr_assert_str_eq(lc.sha, want);
    /* the checkpoint loads back as a model */
    cr_assert_eq(sh(&out, "%s info %s/runs/step-00000012", tu_bin(), dir), 0, "%s", out);
    free(out);
    free(r);
}

Test(sft_cli, sigkill_then_resume_is_bit_exact, .init = setup, .fini = teardown) {
    char *out = NULL;
    for (int i = 0; i < 2; i++) {
        char sub[4096];
        snprintf(sub, sizeof sub, "%s/%c", dir, 'a' + i);
        cr_assert_eq(mkdir(sub, 0755), 0);
        char *r = tu_path(sub, "r.yaml");
        cr_assert_eq(tu_write(r, recipe_text, (size_t)-1), 0);
        free(r);
    }
    cr_assert_eq(sh(&out, "cd %s/a && %s sft r.yaml", dir, tu_bin()), 0, "%s", out);
    free(out);
    /* b: killed with SIGKILL once the epoch-boundary checkpoint of step 5 exists, then resumed */
    int st = sh(&out,
                "cd %s/b && { %s sft r.yaml >log 2>&1 & pid=$!; "
                "while [ ! -d runs/step-00000005 ] && kill -0 $pid 2>/dev/null; do sleep 0.02; done; "
                "kill -9 $pid; wait $pid; echo killed=$?; }",
                dir, tu_bin());
    cr_assert_eq(st, 0, "%s", out);
    cr_assert(strstr(out, "killed=137"), "the run ended before it could be killed: %s", out);
    free(out);
    char p[4096];
    snprintf(p, sizeof p, "%s/b/runs/step-00000012", dir);
    cr_assert(!exists(p), "the killed run finished");
    cr_assert_eq(sh(&out, "cd %s/b && %s sft r.yaml --resume", dir, tu_bin()), 0, "resume failed:\n%s", out);
    cr_assert(strstr(out, "resum"), "%s", out);
    free(out);

    char pa[4096], pb[4096];
    snprintf(pa, sizeof pa, "%s/a/runs/step-00000012/model.safetensors", dir);
    snprintf(pb, sizeof pb, "%s/b/runs/step-00000012/model.safetensors", dir);
    size_t na, nb;
    char *wa = tu_read(pa, &na), *wb = tu_read(pb, &nb);
    cr_assert(wa && wb);
    cr_assert(na == nb && memcmp(wa, wb, na) == 0, "final weights differ after kill + resume");
    free(wa);
    free(wb);
    snprintf(pa, sizeof pa, "%s/a/runs/step-00000012/optimizer.safetensors", dir);
    snprintf(pb, sizeof pb, "%s/b/runs/step-00000012/optimizer.safetensors", dir);
    if (exists(pa)) {
        wa = tu_read(pa, &na);
        wb = tu_read(pb, &nb);
        cr_assert(wa && wb && na == nb && memcmp(wa, wb, na) == 0, "optimizer state differs after kill + resume");
        free(wa);
        free(wb);
    }
    snprintf(pa, sizeof pa, "%s/a/runs.db", dir);
    snprintf(pb, sizeof pb, "%s/b/runs.db", dir);
    metrics ma = read_metrics(pa), mb = read_metrics(pb);
    for (int s = 1; s <= 12; s++) {
        cr_assert(ma.seen[s] && mb.seen[s], "train/loss missing at step %d", s);
        cr_assert(ma.loss[s] == mb.loss[s], "step %d: loss %.9g uninterrupted, %.9g killed + resumed", s, ma.loss[s],
                  mb.loss[s]);
    }
}

Test(sft_cli, bad_dataset_row_names_file_and_line, .init = setup, .fini = teardown) {
    const char *rows = "{\"prompt\": \"1+1\", \"completion\": \"2\"}\n"
                       "{\"prompt\": \"2+2\", \"completion\": \"4\"}\n"
                       "{\"prompt\": \"3+3\", \"completion\": 6}\n";
    char *data = tu_path(dir, "train.jsonl"), *r = tu_path(dir, "r.yaml"), *out = NULL;
    cr_assert_eq(tu_write(data, rows, (size_t)-1), 0);
    char *text = malloc(strlen(recipe_text) + 256);
    /* the same recipe reading the file instead of generating rows */
    const char *gen = strstr(recipe_text, "  generator:");
    const char *gen_end = strchr(gen, '\n') + 1;
    snprintf(text, strlen(recipe_text) + 256, "%.*s  train: train.jsonl\n%s", (int)(gen - recipe_text), recipe_text,
             gen_end);
    cr_assert_eq(tu_write(r, text, (size_t)-1), 0);
    int st = sh(&out, "cd %s && %s sft r.yaml", dir, tu_bin());
    cr_assert_eq(st, 1, "expected exit 1, got %d:\n%s", st, out);
    cr_assert(strstr(out, "train.jsonl:3"), "the error does not name train.jsonl:3:\n%s", out);
    cr_assert(strstr(out, "completion"), "the error does not name the field:\n%s", out);
    free(out);
    char p[4096];
    snprintf(p, sizeof p, "%s/runs/step-00000012", dir);
    cr_assert(!exists(p));
    /* a line that is not JSON at all */
    cr_assert_eq(tu_write(data, "{\"prompt\": \"1\", \"completion\": \"1\"}\n{\"prompt\": \n", (size_t)-1), 0);
    st = sh(&out, "cd %s && %s sft r.yaml", dir, tu_bin());
    cr_assert_eq(st, 1, "%s", out);
    cr_assert(strstr(out, "train.jsonl:2"), "%s", out);
    free(out);
    free(text);
    free(data);
    free(r);
}

/* moerl run: SFT then GRPO from its checkpoint, then the before/after table read back from the run store. */
Test(run_cli, sft_then_grpo_then_table, .init = setup, .fini = teardown, .timeout = 150) {
    char *r = tu_path(dir, "r.yaml"), *out = NULL;
    char text[8192];
    snprintf(text, sizeof text,
             "%s"
             "grpo: {steps: 2, num_generations: 4, prompts_per_step: 4, mini_batches_per_step: 1,\n"
             "       micro_batch_tokens: 256, eval_every: 0}\n"
             "rewards:\n  - math: {extract: hash}\n  - format: {style: regex, pattern: \"[^#]*#### -?[0-9]+\\\\s*\"}\n"
             "    weight: 0.2\n",
             recipe_text);
    cr_assert_eq(tu_write(r, text, (size_t)-1), 0);
    int st = sh(&out, "cd %s && %s run r.yaml", dir, tu_bin());
    cr_assert_eq(st, 0, "moerl run failed:\n%s", out);
    cr_assert(strstr(out, "stage 1/2: SFT"), "%s", out);
    cr_assert(strstr(out, "stage 2/2: GRPO from runs/sft/step-00000012"), "%s", out);
    cr_assert(strstr(out, "before/after GRPO"), "no table:\n%s", out);
    cr_assert(strstr(out, "eval/exact_match"), "%s", out);
    char p[4096];
    snprintf(p, sizeof p, "%s/runs/grpo/step-00000002/model.safetensors", dir);
    cr_assert(exists(p), "no GRPO checkpoint at %s\n%s", p, out);
    free(out);
    /* --resume on a finished pipeline runs nothing again and prints the table */
    st = sh(&out, "cd %s && %s run r.yaml --resume", dir, tu_bin());
    cr_assert_eq(st, 0, "%s", out);
    cr_assert(strstr(out, "SFT already finished"), "%s", out);
    cr_assert(strstr(out, "before/after GRPO"), "%s", out);
    free(out);
    free(r);
}
