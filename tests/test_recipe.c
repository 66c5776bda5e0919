/* test_recipe.c: recipes against the schema: defaults, every type, --set, dump round trips, the quickstart,
 * a table of bad recipes with their exact messages (file:line:col), allocation failures, and `moerl recipe`. */
#include <criterion/criterion.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/mem.h"
#include "core/recipe.h"
#include "tests/testutil.h"

/* The smallest recipe that resolves: 9 lines, so text appended to it starts at line 10. */
#define BASE                                                                                                   \
    "run:\n  name: t\nmodel:\n  preset: tiny\ntokenizer:\n  train:\ndata:\n  generator:\n    task: arithmetic\n"

static recipe *load_ok(const char *text) {
    recipe *r = NULL;
    mr_err e = {0};
    int rc = recipe_load_string(&r, text, "t.yaml", &e);
    cr_assert_eq(rc, 0, "load failed: %s", e.msg);
    return r;
}

static recipe *resolve_ok(const char *text) {
    recipe *r = load_ok(text);
    mr_err e = {0};
    int rc = recipe_resolve(r, &e);
    cr_assert_eq(rc, 0, "resolve failed: %s", e.msg);
    return r;
}

static void set_ok(recipe *r, const char *a) {
    mr_err e = {0};
    int rc = recipe_set(r, a, &e);
    cr_assert_eq(rc, 0, "--set %s failed: %s", a, e.msg);
}

static char *dump(const recipe *r) {
    char *s = NULL;
    cr_assert_eq(recipe_dump_yaml(r, &s), 0);
    return s;
}

static char *src_path(const char *rel) {
    char *p = malloc(strlen(tu_src()) + strlen(rel) + 2);
    sprintf(p, "%s/%s", tu_src(), rel);
    return p;
}

Test(recipe, minimal_recipe_resolves_with_defaults) {
    recipe *r = load_ok(BASE);
    cr_expect_not(recipe_is_set(r, "grpo.mu"), "defaults appear only at resolve");
    cr_expect_eq(recipe_list_len(r, "optim.betas"), 0);
    mr_err e = {0};
    cr_assert_eq(recipe_resolve(r, &e), 0, "%s", e.msg);
    cr_expect_eq(recipe_resolve(r, &e), 0, "resolve is idempotent: %s", e.msg);
    cr_expect_str_eq(recipe_source(r), "t.yaml");
    cr_expect_str_eq(recipe_str(r, "run.name"), "t");
    cr_expect_str_eq(recipe_str(r, "run.store"), "runs.db");
    cr_expect_str_eq(recipe_str(r, "run.device"), "cpu");
    cr_expect_eq(recipe_enum(r, "run.device"), 0);
    cr_expect_eq(recipe_int(r, "run.threads"), 0);
    cr_expect_eq(recipe_bool(r, "run.deterministic"), 1);
    cr_expect_str_eq(recipe_oneof(r, "model"), "preset");
    cr_expect_str_eq(recipe_str(r, "model.preset"), "tiny");
    cr_expect_null(recipe_str(r, "model.config"));
    cr_expect_not(recipe_is_set(r, "model.overrides.hidden_size"));
    cr_expect_eq(recipe_int(r, "tokenizer.train.vocab_size"), 2048);
    cr_expect_eq(recipe_list_len(r, "tokenizer.train.corpus"), 0);
    cr_expect_eq(recipe_int(r, "data.generator.n"), 10000);
    cr_expect_eq(recipe_int(r, "data.generator.difficulty"), 0);
    cr_expect_null(recipe_str(r, "data.template"));
    cr_expect_float_eq(recipe_float(r, "optim.lr"), 3e-4, 1e-18);
    cr_expect_eq(recipe_list_len(r, "optim.betas"), 2);
    cr_expect_float_eq(recipe_float(r, "optim.betas[0]"), 0.9, 0);
    cr_expect_float_eq(recipe_float(r, "optim.betas[1]"), 0.95, 0);
    cr_expect_float_eq(recipe_float(r, "optim.eps"), 1e-8, 0);
    cr_expect_not(recipe_is_set(r, "sft.steps"));
    cr_expect_eq(recipe_int(r, "grpo.num_generations"), 8);
    cr_expect_eq(recipe_int(r, "grpo.mu"), 1);
    cr_expect_str_eq(recipe_str(r, "grpo.loss_agg"), "token_mean");
    cr_expect_str_eq(recipe_str(r, "grpo.scale_rewards"), "group");
    cr_expect_float_eq(recipe_float(r, "grpo.eps_low"), 0.2, 0);
    cr_expect_float_eq(recipe_float(r, "grpo.eps_high"), 0.28, 0);
    cr_expect_float_eq(recipe_float(r, "grpo.beta"), 0.0, 0);
    cr_expect_str_eq(recipe_str(r, "grpo.kl_estimator"), "k3");
    cr_expect_eq(recipe_bool(r, "grpo.dynamic_sampling.enabled"), 0);
    cr_expect_eq(recipe_int(r, "grpo.dynamic_sampling.max_extra_rounds"), 3);
    cr_expect_str_eq(recipe_str(r, "grpo.overlong.mode"), "none");
    cr_expect_str_eq(recipe_str(r, "grpo.tis.mode"), "off");
    cr_expect_eq(recipe_list_len(r, "rollout.stop"), 0);
    cr_expect_eq(recipe_list_len(r, "rewards"), 0);
    recipe_free(r);
}

Test(recipe, every_type_parses) {
    recipe *r = resolve_ok("run:\n  name: 123\n  seed: 42\n  deterministic: FALSE\n  device: cuda\n"
                           "model: {checkpoint: \"ckpt/dir\"}\n"
                           "data:\n  train: rows.jsonl\n  template: 'Q: {prompt}\\n'\n  packing: True\n"
                           "optim:\n  lr: 1\n  eps: 1e-6\n  weight_decay: +0.5\n  betas:\n    - 0.5\n    - 0.75\n"
                           "sft:\n  epochs: 1.5\n"
                           "rollout:\n  stop: [\"</answer>\", 'it''s', \"a\\tb\", 12, true]\n  top_k: -0\n"
                           "grpo:\n  dynamic_sampling: true\n  overlong: soft_penalty\n  tis: off\n"
                           "rewards:\n"
                           "  - lua: score.lua\n"
                           "    weight: -0.5\n"
                           "  - {math: , name: m2}\n"
                           "  - judge: {model: judge/ckpt}\n");
    cr_expect_str_eq(recipe_str(r, "run.name"), "123", "a plain number is a string where a string is expected");
    cr_expect_eq(recipe_int(r, "run.seed"), 42);
    cr_expect_eq(recipe_bool(r, "run.deterministic"), 0);
    cr_expect_eq(recipe_enum(r, "run.device"), 1);
    cr_expect_str_eq(recipe_oneof(r, "model"), "checkpoint");
    cr_expect_str_eq(recipe_str(r, "model.checkpoint"), "ckpt/dir");
    cr_expect_null(recipe_oneof(r, "tokenizer"), "a checkpoint brings its tokenizer");
    cr_expect_str_eq(recipe_oneof(r, "data"), "train");
    cr_expect_str_eq(recipe_str(r, "data.template"), "Q: {prompt}\\n", "single quotes keep the backslash");
    cr_expect_eq(recipe_bool(r, "data.packing"), 1);
    cr_expect_float_eq(recipe_float(r, "optim.lr"), 1.0, 0, "an integer is a number");
    cr_expect_float_eq(recipe_float(r, "optim.eps"), 1e-6, 0);
    cr_expect_float_eq(recipe_float(r, "optim.weight_decay"), 0.5, 0);
    cr_expect_float_eq(recipe_float(r, "optim.betas[1]"), 0.75, 0);
    cr_expect_float_eq(recipe_float(r, "sft.epochs"), 1.5, 0);
    cr_expect_not(recipe_is_set(r, "sft.steps"));
    cr_assert_eq(recipe_list_len(r, "rollout.stop"), 5);
    cr_expect_str_eq(recipe_str(r, "rollout.stop[0]"), "</answer>");
    cr_expect_str_eq(recipe_str(r, "rollout.stop[1]"), "it's");
    cr_expect_str_eq(recipe_str(r, "rollout.stop[2]"), "a\tb");
    cr_expect_str_eq(recipe_str(r, "rollout.stop[3]"), "12");
    cr_expect_str_eq(recipe_str(r, "rollout.stop[4]"), "true");
    cr_expect_eq(recipe_int(r, "rollout.top_k"), 0);
    cr_expect_eq(recipe_bool(r, "grpo.dynamic_sampling.enabled"), 1, "shorthand sets enabled");
    cr_expect_str_eq(recipe_str(r, "grpo.overlong.mode"), "soft_penalty");
    cr_expect_eq(recipe_int(r, "grpo.overlong.buffer"), 64);
    cr_expect_str_eq(recipe_str(r, "grpo.tis.mode"), "off");
    cr_assert_eq(recipe_list_len(r, "rewards"), 3);
    cr_expect_str_eq(recipe_oneof(r, "rewards[0]"), "lua");
    cr_expect_str_eq(recipe_str(r, "rewards[0].lua.script"), "score.lua");
    cr_expect_eq(recipe_int(r, "rewards[0].lua.instructions"), 10000000);
    cr_expect_float_eq(recipe_float(r, "rewards[0].weight"), -0.5, 0);
    cr_expect_float_eq(recipe_float(r, "rewards[0].timeout_s"), 10.0, 0);
    cr_expect_str_eq(recipe_oneof(r, "rewards[1]"), "math", "`math:` (null) is a math plugin with defaults");
    cr_expect_str_eq(recipe_str(r, "rewards[1].math.extract"), "auto");
    cr_expect_str_eq(recipe_str(r, "rewards[1].name"), "m2");
    cr_expect_float_eq(recipe_float(r, "rewards[1].weight"), 1.0, 0);
    cr_expect_str_eq(recipe_oneof(r, "rewards[2]"), "judge");
    cr_expect_str_eq(recipe_oneof(r, "rewards[2].judge"), "model");
    cr_expect_null(recipe_oneof(r, "rewards[3]"), "past the end");
    cr_expect_eq(recipe_bool(r, "rewards[2].judge.fallback_only"), 1);
    recipe_free(r);
}

Test(recipe, set_overrides_nested_keys_items_and_lists) {
    char *qs = src_path("recipes/quickstart.yaml");
    recipe *r = NULL;
    mr_err e = {0};
    cr_assert_eq(recipe_load(&r, qs, &e), 0, "%s", e.msg);
    set_ok(r, "grpo.num_generations=16");
    set_ok(r, "grpo.dynamic_sampling.max_extra_rounds=0");
    set_ok(r, "grpo.tis.mode=sequence");
    set_ok(r, "optim.betas[1]=0.99");
    set_ok(r, "rollout.stop[0]=STOP");          /* replace an item */
    set_ok(r, "rollout.stop[1]=Q: next");        /* append; not YAML, so the text is taken verbatim */
    set_ok(r, "rewards[0].weight=2");
    set_ok(r, "rewards[1]=");                    /* remove the format plugin */
    set_ok(r, "rewards[1].lua=score.lua");       /* append a new plugin by its kind key */
    set_ok(r, "rewards[2]={code: {workers: 2}, weight: 0.5, name: c}");
    set_ok(r, "data.template=");                 /* unset: the tokenizer's chat format */
    set_ok(r, "tokenizer.train.corpus=[a.txt, \"b c.txt\"]");
    set_ok(r, "sft.steps=");                     /* switch from steps ... */
    set_ok(r, "sft.epochs=3");                   /* ... to epochs */
    set_ok(r, "run.seed=7");
    set_ok(r, "run.seed=");                      /* back to the default */
    cr_assert_eq(recipe_resolve(r, &e), 0, "%s", e.msg);
    cr_expect_eq(recipe_int(r, "grpo.num_generations"), 16);
    cr_expect_eq(recipe_int(r, "grpo.dynamic_sampling.max_extra_rounds"), 0);
    cr_expect_eq(recipe_bool(r, "grpo.dynamic_sampling.enabled"), 1, "siblings keep their values");
    cr_expect_str_eq(recipe_str(r, "grpo.tis.mode"), "sequence");
    cr_expect_float_eq(recipe_float(r, "optim.betas[0]"), 0.9, 0);
    cr_expect_float_eq(recipe_float(r, "optim.betas[1]"), 0.99, 0);
    cr_assert_eq(recipe_list_len(r, "rollout.stop"), 2);
    cr_expect_str_eq(recipe_str(r, "rollout.stop[0]"), "STOP");
    cr_expect_str_eq(recipe_str(r, "rollout.stop[1]"), "Q: next");
    cr_assert_eq(recipe_list_len(r, "rewards"), 3);
    cr_expect_str_eq(recipe_oneof(r, "rewards[0]"), "math");
    cr_expect_float_eq(recipe_float(r, "rewards[0].weight"), 2.0, 0);
    cr_expect_str_eq(recipe_oneof(r, "rewards[1]"), "lua");
    cr_expect_str_eq(recipe_str(r, "rewards[1].lua.script"), "score.lua");
    cr_expect_float_eq(recipe_float(r, "rewards[1].weight"), 1.0, 0, "a new item gets the defaults");
    cr_expect_str_eq(recipe_oneof(r, "rewards[2]"), "code");
    cr_expect_eq(recipe_int(r, "rewards[2].code.workers"), 2);
    cr_expect_str_eq(recipe_str(r, "rewards[2].name"), "c");
    cr_expect_null(recipe_str(r, "data.template"));
    cr_assert_eq(recipe_list_len(r, "tokenizer.train.corpus"), 2);
    cr_expect_str_eq(recipe_str(r, "tokenizer.train.corpus[1]"), "b c.txt");
    cr_expect_not(recipe_is_set(r, "sft.steps"));
    cr_expect_float_eq(recipe_float(r, "sft.epochs"), 3.0, 0);
    cr_expect_eq(recipe_int(r, "run.seed"), 0);

    /* a failed override leaves the recipe as it was */
    char *before = dump(r);
    cr_expect_neq(recipe_set(r, "grpo.mu=zero", &e), 0);
    cr_expect_neq(recipe_set(r, "rewards[1].lua.memory_mb=-1", &e), 0);
    cr_expect_neq(recipe_set(r, "rewards[3].bogus=1", &e), 0);
    char *after = dump(r);
    cr_expect_str_eq(after, before);
    mem_free(before);
    mem_free(after);
    recipe_free(r);
    free(qs);
}

/* Also the check that every schema default parses and passes its own range (a bad one is MR_EINTERNAL at
 * resolve): between them these two recipes reach every mapping of the schema, every reward kind included. */
Test(recipe, dump_load_dump_is_identical) {
    const char *files[] = {"recipes/quickstart.yaml", "tests/fixtures/recipes/full.yaml"};
    for (size_t i = 0; i < 2; i++) {
        char *p = src_path(files[i]);
        recipe *r = NULL;
        mr_err e = {0};
        cr_assert_eq(recipe_load(&r, p, &e), 0, "%s", e.msg);
        cr_assert_eq(recipe_resolve(r, &e), 0, "%s", e.msg);
        char *d1 = dump(r);
        recipe *r2 = NULL;
        cr_assert_eq(recipe_load_string(&r2, d1, "dump.yaml", &e), 0, "%s: %s", files[i], e.msg);
        cr_assert_eq(recipe_resolve(r2, &e), 0, "%s", e.msg);
        char *d2 = dump(r2);
        cr_expect_str_eq(d2, d1, "%s", files[i]);
        recipe_free(r);
        recipe_free(r2);
        mem_free(d1);
        mem_free(d2);
        free(p);
    }
}

Test(recipe, dump_writes_every_field_and_hard_strings) {
    char *p = src_path("tests/fixtures/recipes/full.yaml");
    recipe *r = NULL;
    mr_err e = {0};
    cr_assert_eq(recipe_load(&r, p, &e), 0, "%s", e.msg);
    cr_assert_eq(recipe_resolve(r, &e), 0, "%s", e.msg);
    /* values after loading */
    cr_expect_str_eq(recipe_str(r, "run.out_dir"), "it's here");
    cr_expect_eq(recipe_int(r, "run.seed"), 18446744073LL);
    cr_expect_str_eq(recipe_str(r, "data.template"),
                     "<|User|>{prompt}\n<|Assistant|>\t\"ok\" \\ \xc3\xa9 \xe6\x95\xb0\xe5\xad\xa6 \xf0\x9f\x99\x82 "
                     "\xc3\xbf \xef\xbb\xbf \x7f end");
    cr_expect_str_eq(recipe_str(r, "rollout.stop[4]"), "~", "a quoted ~ is a string");
    cr_expect_str_eq(recipe_str(r, "rollout.stop[5]"), "");
    cr_expect_float_eq(recipe_float(r, "grpo.dual_clip"), 3.0, 0);
    cr_expect_eq(recipe_int(r, "model.overrides.q_lora_rank"), 0);
    char *d = dump(r);
    const char *expect[] = {
        "run:\n  name: \"full: every field\"\n  seed: 18446744073\n",
        "  out_dir: \"it's here\"\n  device: cuda\n",
        "model:\n  config: \"configs/ds-tiny.json\"\n  preset: null\n  checkpoint: null\n  overrides:\n"
        "    vocab_size: null\n    hidden_size: 128\n",
        "tokenizer:\n  path: \"tok/\"\ndata:\n", /* the absent one-of mapping (train) is left out */
        "  template: \"<|User|>{prompt}\\n<|Assistant|>\\t\\\"ok\\\" \\\\ \xc3\xa9 \xe6\x95\xb0\xe5\xad\xa6 "
        "\xf0\x9f\x99\x82 \xc3\xbf \\ufeff \\x7f end\"\n",
        "  lr: 0.0001\n  betas: [0.8, 0.999]\n  eps: 1e-12\n  weight_decay: 0.0\n",
        "  min_lr_ratio: 1.0\nsft:\n  steps: null\n  epochs: 2.5\n",
        "  stop: [\"</answer>\", \"\\n\\nUser:\", \"null\", \"true\", \"~\", \"\", \"  lead\"]\n",
        "  dynamic_sampling:\n    enabled: true\n    max_extra_rounds: 3\n",
        "  tis:\n    mode: token\n    cap: 5.0\n",
        "rewards:\n  - math:\n      extract: auto\n      answer_field: \"answer\"\n      tolerance: 0.0\n"
        "    weight: 1.0\n    name: null\n    timeout_s: 10.0\n  - code:\n",
        "  - lua:\n      script: \"rewards/len.lua\"\n      instructions: 10000000\n      memory_mb: 64\n"
        "    weight: 1.0\n    name: \"brevity\"\n",
    };
    for (size_t i = 0; i < sizeof expect / sizeof expect[0]; i++)
        cr_expect(strstr(d, expect[i]) != NULL, "dump lacks:\n%s\n--- dump:\n%s", expect[i], d);
    mem_free(d);

    /* tis.mode off is quoted for YAML 1.1 readers, and reads back */
    set_ok(r, "grpo.tis=off");
    d = dump(r);
    cr_expect(strstr(d, "  tis:\n    mode: \"off\"\n") != NULL, "%s", d);
    recipe *r2 = load_ok(d);
    cr_expect_str_eq(recipe_str(r2, "grpo.tis.mode"), "off");
    recipe_free(r2);
    mem_free(d);
    recipe_free(r);
    free(p);
}

Test(recipe, quickstart_loads) {
    char *p = src_path("recipes/quickstart.yaml");
    recipe *r = NULL;
    mr_err e = {0};
    cr_assert_eq(recipe_load(&r, p, &e), 0, "%s", e.msg);
    cr_assert_eq(recipe_resolve(r, &e), 0, "%s", e.msg);
    cr_expect_str_eq(recipe_str(r, "run.store"), "runs.db");
    cr_expect_str_eq(recipe_str(r, "model.preset"), "tiny");
    cr_expect_str_eq(recipe_oneof(r, "data"), "generator");
    cr_expect_str_eq(recipe_str(r, "data.generator.task"), "arithmetic");
    cr_expect(recipe_is_set(r, "sft.steps"));
    cr_assert_eq(recipe_list_len(r, "rewards"), 2);
    cr_expect_str_eq(recipe_oneof(r, "rewards[0]"), "math");
    cr_expect_str_eq(recipe_oneof(r, "rewards[1]"), "format");
    cr_expect_str_eq(recipe_str(r, "grpo.overlong.mode"), "mask");
    recipe_free(r);
    free(p);
}

/* ---- bad recipes: the first error, exactly ---- */

typedef struct {
    const char *what, *text, *set, *msg;
    int code;
} bad_case;

static const bad_case bad_cases[] = {
    {"wrong type", "run:\n  name: t\ngrpo:\n  num_generations: eight\n", NULL,
     "bad.yaml:4:20: grpo.num_generations: expected an integer >= 2, got \"eight\"", MR_EINVAL},
    {"out of range", "grpo:\n  num_generations: 1\n", NULL,
     "bad.yaml:2:20: grpo.num_generations: expected an integer >= 2, got \"1\"", MR_ERANGE},
    {"float range, exclusive bounds", "optim:\n  betas: [0.9, 1.0]\n", NULL,
     "bad.yaml:2:16: optim.betas[1]: expected a number >= 0 and < 1, got \"1.0\"", MR_ERANGE},
    {"inclusive range", "data:\n  generator: {task: countdown, difficulty: 9}\n", NULL,
     "bad.yaml:2:44: data.generator.difficulty: expected an integer between 0 and 6, got \"9\"", MR_ERANGE},
    {"list item weight", "rewards:\n  - math: {}\n    weight: 1\n  - format:\n    weight: high\n", NULL,
     "bad.yaml:5:13: rewards[1].weight: expected a number, got \"high\"", MR_EINVAL},
    {"quoted number", "run:\n  seed: \"5\"\n", NULL,
     "bad.yaml:2:9: run.seed: expected an integer >= 0, got \"5\" (quoted, so a string)", MR_EINVAL},
    {"float for an integer", "sft:\n  steps: 10.0\n", NULL, "bad.yaml:2:10: sft.steps: expected an integer >= 1, got \"10.0\"",
     MR_EINVAL},
    {"bool", "run:\n  deterministic: yes\n", NULL,
     "bad.yaml:2:18: run.deterministic: expected true or false, got \"yes\"", MR_EINVAL},
    {"bad enum", "grpo:\n  scale_rewards: std\n", NULL,
     "bad.yaml:2:18: grpo.scale_rewards: expected one of group, batch, none, got \"std\"", MR_EINVAL},
    {"bad enum through a shorthand", "grpo:\n  overlong: cut\n", NULL,
     "bad.yaml:2:13: grpo.overlong.mode: expected one of none, mask, soft_penalty, got \"cut\"", MR_EINVAL},
    {"mapping expected", "grpo: 5\n", NULL, "bad.yaml:1:7: grpo: expected a mapping, got \"5\"", MR_EINVAL},
    {"mapping with a shorthand", "grpo:\n  tis: [token]\n", NULL,
     "bad.yaml:2:8: grpo.tis: expected a mapping (or a value for its mode), got a list", MR_EINVAL},
    {"list of mappings expected", "rewards: {math: {}}\n", NULL,
     "bad.yaml:1:10: rewards: expected a list of mappings, got a mapping", MR_EINVAL},
    {"list item not a mapping", "rewards:\n  - math\n", NULL,
     "bad.yaml:2:5: rewards[0]: expected a mapping, got \"math\"", MR_EINVAL},
    {"list item of the wrong type", "rollout:\n  stop: [a, [b]]\n", NULL,
     "bad.yaml:2:13: rollout.stop[1]: expected a string, got a list", MR_EINVAL},
    {"list length", "optim:\n  betas: [0.9]\n", NULL,
     "bad.yaml:2:10: optim.betas: expected a list of 2 numbers >= 0 and < 1, got 1 item", MR_EINVAL},
    {"unknown key, did you mean", "grpo:\n  num_generation: 8\n", NULL,
     "bad.yaml:2:3: grpo.num_generation: unknown key (did you mean 'num_generations'?)", MR_EINVAL},
    {"unknown key, transposition", "rollout:\n  tmeperature: 0.5\n", NULL,
     "bad.yaml:2:3: rollout.tmeperature: unknown key (did you mean 'temperature'?)", MR_EINVAL},
    {"unknown key in a list item", "rewards:\n  - maths: {}\n", NULL,
     "bad.yaml:2:5: rewards[0].maths: unknown key (did you mean 'math'?)", MR_EINVAL},
    {"key of another section", "grpo:\n  temperature: 0.5\n", NULL,
     "bad.yaml:2:3: grpo.temperature: unknown key (did you mean 'rollout.temperature'?)", MR_EINVAL},
    {"a TRL name", "grpo:\n  loss_type: dapo\n", NULL,
     "bad.yaml:2:3: grpo.loss_type: unknown key (did you mean 'grpo.loss_agg'?)", MR_EINVAL},
    {"unknown key, nothing close", "grpo:\n  zzz: 1\n", NULL,
     "bad.yaml:2:3: grpo.zzz: unknown key (see moerl recipe --schema)", MR_EINVAL},
    {"unknown key in a small section", "tokenizer:\n  zzz: 1\n", NULL,
     "bad.yaml:2:3: tokenizer.zzz: unknown key (keys: path, train)", MR_EINVAL},
    {"unknown section, did you mean", "run:\n  name: t\ngrpp:\n  mu: 1\n", NULL,
     "bad.yaml:3:1: grpp: unknown section (did you mean 'grpo'?)", MR_EINVAL},
    {"unknown section", "trainer: {}\n", NULL,
     "bad.yaml:1:1: trainer: unknown section (sections: run, model, tokenizer, data, optim, sft, rollout, grpo, "
     "rewards)",
     MR_EINVAL},
    {"duplicate key", "grpo:\n  mu: 1\n  beta: 0.0\n  mu: 2\n", NULL,
     "bad.yaml:4:3: grpo.mu: duplicate key (first at line 2)", MR_EINVAL},
    {"duplicate null key", "run:\n  name:\n  name: x\n", NULL, "bad.yaml:3:3: run.name: duplicate key (first at line 2)",
     MR_EINVAL},
    {"duplicate section", "grpo: {mu: 1}\nrun: {name: t}\ngrpo: {beta: 0.1}\n", NULL,
     "bad.yaml:3:1: grpo: duplicate key (first at line 1)", MR_EINVAL},
    {"YAML syntax error", "run:\n  name: t\n  seed: [1, 2\n", NULL,
     "bad.yaml:4:1: YAML syntax error: did not find expected ',' or ']' (while parsing a flow sequence at 3:9)",
     MR_EFORMAT},
    {"YAML syntax error, bad indentation", "run:\n  name: t\n seed: 1\n", NULL,
     "bad.yaml:3:2: YAML syntax error: did not find expected key (while parsing a block mapping at 1:1)",
     MR_EFORMAT},
    {"anchor", "run: &r {name: t}\n", NULL,
     "bad.yaml:1:6: YAML anchors (&r) are not supported in recipes: write the value out", MR_EFORMAT},
    {"alias", "run: {name: t}\nsft: {steps: 3}\ngrpo: {steps: *x}\n", NULL,
     "bad.yaml:3:15: YAML aliases (*x) are not supported in recipes: write the value out", MR_EFORMAT},
    {"tag", "run:\n  seed: !!int 5\n", NULL,
     "bad.yaml:2:9: YAML tags (tag:yaml.org,2002:int) are not supported in recipes", MR_EFORMAT},
    {"two documents", "run: {name: t}\n---\nrun: {name: u}\n", NULL,
     "bad.yaml:2:1: expected one YAML document, found a second one", MR_EFORMAT},
    {"empty file", "", NULL, "bad.yaml:1:1: expected a mapping of sections (run, model, data, ...), got an empty document",
     MR_EINVAL},
    {"comments only", "# nothing here\n", NULL,
     "bad.yaml:1:1: expected a mapping of sections (run, model, data, ...), got an empty document", MR_EINVAL},
    {"top level list", "- run\n", NULL,
     "bad.yaml:1:1: expected a mapping of sections (run, model, data, ...), got a list", MR_EINVAL},
    {"top level scalar", "hello\n", NULL,
     "bad.yaml:1:1: expected a mapping of sections (run, model, data, ...), got \"hello\"", MR_EINVAL},
    {"missing required key", "run:\n  seed: 1\nmodel: {preset: tiny}\n", NULL,
     "bad.yaml:1:1: run.name: required key is missing (expected a string)", MR_EINVAL},
    {"missing required section", "model: {preset: tiny}\n", NULL,
     "bad.yaml: run.name: required key is missing (expected a string)", MR_EINVAL},
    {"required key given null", "run:\n  name:\n", NULL, "bad.yaml:2:3: run.name: expected a string, got null",
     MR_EINVAL},
    {"required key in a one-of mapping", BASE "rewards:\n  - lua:\n", NULL,
     "bad.yaml:11:5: rewards[0].lua.script: required key is missing (expected a string)", MR_EINVAL},
    {"list item with two kind keys", BASE "rewards:\n  - math: {}\n    weight: 1\n    lua: x.lua\n", NULL,
     "bad.yaml:13:5: rewards[0]: expected exactly one of math, code, format, lua, judge, toolcall, got math and lua",
     MR_EINVAL},
    {"list item without a kind key", BASE "rewards:\n  - weight: 1\n", NULL,
     "bad.yaml:11:5: rewards[0]: expected exactly one of math, code, format, lua, judge, toolcall, got none",
     MR_EINVAL},
    {"model from nowhere", "run: {name: t}\ntokenizer: {path: tok}\ndata: {train: x.jsonl}\n", NULL,
     "bad.yaml: model: expected exactly one of config, preset, checkpoint, got none", MR_EINVAL},
    {"two model sources", "run: {name: t}\nmodel:\n  preset: tiny\n  config: c.json\n", NULL,
     "bad.yaml:4:3: model: expected exactly one of config, preset, checkpoint, got config and preset", MR_EINVAL},
    {"steps and epochs", BASE "sft:\n  steps: 10\n  epochs: 2\n", NULL,
     "bad.yaml:12:3: sft: expected at most one of steps, epochs, got steps and epochs", MR_EINVAL},
    {"no tokenizer", "run: {name: t}\nmodel: {preset: tiny}\ndata: {train: x.jsonl}\n", NULL,
     "bad.yaml: tokenizer: expected path or train (a model built from a preset has no tokenizer), got neither",
     MR_EINVAL},
    {"overrides on a checkpoint",
     "run: {name: t}\nmodel:\n  checkpoint: ck\n  overrides:\n    hidden_size: 64\ndata: {train: x.jsonl}\n", NULL,
     "bad.yaml:5:5: model.overrides.hidden_size: not allowed with model.checkpoint (a checkpoint's sizes are fixed)",
     MR_EINVAL},
    {"mini-batches do not divide the step", BASE "grpo:\n  prompts_per_step: 5\n  mini_batches_per_step: 3\n", NULL,
     "bad.yaml:12:3: grpo.mini_batches_per_step: expected a divisor of prompts_per_step * num_generations (40), got 3",
     MR_EINVAL},
    {"grad_accum does not divide batch_seqs", BASE "sft:\n  batch_seqs: 10\n  grad_accum: 4\n", NULL,
     "bad.yaml:12:3: sft.grad_accum: expected a divisor of sft.batch_seqs (10), got 4", MR_EINVAL},
    {"micro-batch smaller than a sequence",
     "run: {name: t}\nmodel: {preset: tiny}\ntokenizer: {train: }\ndata:\n  train: x.jsonl\n  max_seq_len: 8192\n",
     NULL, "bad.yaml:6:3: sft.micro_batch_tokens: expected an integer >= data.max_seq_len (8192), got 4096", MR_EINVAL},
    {"dual clip", BASE "grpo:\n  dual_clip: 0.5\n", NULL,
     "bad.yaml:11:3: grpo.dual_clip: expected 0 (off) or a number > 1, got 0.5", MR_ERANGE},
    {"soft penalty buffer", BASE "rollout:\n  max_new_tokens: 64\ngrpo:\n  overlong: {mode: soft_penalty, buffer: 64}\n",
     NULL,
     "bad.yaml:13:34: grpo.overlong.buffer: expected an integer < rollout.max_new_tokens (64) with mode soft_penalty, "
     "got 64",
     MR_EINVAL},
    {"regex format without a pattern", BASE "rewards:\n  - format: {style: regex}\n", NULL,
     "bad.yaml:11:5: rewards[0].format.pattern: required key is missing with style regex (expected a string)",
     MR_EINVAL},
    {"two plugins with one name", BASE "rewards:\n  - math:\n  - lua: a.lua\n    name: math\n", NULL,
     "bad.yaml:13:5: rewards[1]: plugin name 'math' is already used by rewards[0] (metrics are reward/<name>); set a "
     "distinct name",
     MR_EINVAL},
    /* --set */
    {"--set wrong type", BASE, "grpo.num_generations=eight",
     "--set grpo.num_generations=eight: grpo.num_generations: expected an integer >= 2, got \"eight\"", MR_EINVAL},
    {"--set without =", BASE, "grpo.mu",
     "--set grpo.mu: expected section.key=value (as grpo.mu=2 or rewards[0].weight=0.5)", MR_EINVAL},
    {"--set bad key", BASE, "grpo..mu=1",
     "--set grpo..mu=1: expected section.key=value (as grpo.mu=2 or rewards[0].weight=0.5)", MR_EINVAL},
    {"--set bad index", BASE, "rewards[x].weight=1",
     "--set rewards[x].weight=1: expected section.key=value (as grpo.mu=2 or rewards[0].weight=0.5)", MR_EINVAL},
    {"--set unknown key", BASE, "grpo.num_generation=8",
     "--set grpo.num_generation=8: grpo.num_generation: unknown key (did you mean 'num_generations'?)", MR_EINVAL},
    {"--set unknown section", BASE, "learning_rate=1e-4",
     "--set learning_rate=1e-4: learning_rate: unknown section (did you mean 'optim.lr'?)", MR_EINVAL},
    {"--set key under a scalar", BASE, "grpo.mu.x=1", "--set grpo.mu.x=1: grpo.mu: not a mapping, so it has no key 'x'",
     MR_EINVAL},
    {"--set index on a scalar", BASE, "grpo.mu[0]=1", "--set grpo.mu[0]=1: grpo.mu: not a list, so it has no item [0]",
     MR_EINVAL},
    {"--set index past the end", BASE, "rewards[1].math=",
     "--set rewards[1].math=: rewards: no item [1]: the list has 0 (index 0 appends one)", MR_EINVAL},
    {"--set bad flow list", BASE, "rollout.stop=[a, b",
     "--set rollout.stop=[a, b: rollout.stop: expected a list of strings, got \"[a, b\" (not valid YAML: did not find "
     "expected ',' or ']')",
     MR_EINVAL},
    {"--set bad enum", BASE, "grpo.loss_agg=mean",
     "--set grpo.loss_agg=mean: grpo.loss_agg: expected one of seq_mean_token_mean, token_mean, "
     "seq_mean_token_sum_norm, got \"mean\"",
     MR_EINVAL},
    {"--set second kind key", BASE "rewards:\n  - math:\n", "rewards[0].lua=x.lua",
     "--set rewards[0].lua=x.lua: rewards[0]: expected exactly one of math, code, format, lua, judge, toolcall, got "
     "math and lua",
     MR_EINVAL},
    {"bf16 on the CPU",
     "run:\n  name: t\n  precision: bf16\nmodel:\n  preset: tiny\ntokenizer:\n  train:\ndata:\n  generator:\n"
     "    task: arithmetic\n",
     NULL, "bad.yaml:3:3: run.precision: bf16 needs run.device cuda (device cpu computes in fp32), got bf16", MR_EINVAL},
    {"--set cross-field", BASE, "grpo.mini_batches_per_step=3",
     "--set grpo.mini_batches_per_step=3: grpo.mini_batches_per_step: expected a divisor of prompts_per_step * "
     "num_generations (128), got 3",
     MR_EINVAL},
};

Test(recipe, bad_recipes_give_exact_errors) {
    for (size_t i = 0; i < sizeof bad_cases / sizeof bad_cases[0]; i++) {
        const bad_case *c = &bad_cases[i];
        recipe *r = NULL;
        mr_err e = {0};
        int rc = recipe_load_string(&r, c->text, "bad.yaml", &e);
        if (!rc && c->set) rc = recipe_set(r, c->set, &e);
        if (!rc) rc = recipe_resolve(r, &e);
        cr_expect_eq(rc, c->code, "%s: code %d, want %d (%s)", c->what, rc, c->code, e.msg);
        cr_expect_str_eq(e.msg, c->msg, "%s:\n got: %s\nwant: %s", c->what, e.msg, c->msg);
        recipe_free(r);
    }
}

Test(recipe, file_errors_name_the_file) {
    recipe *r = (recipe *)1;
    mr_err e = {0};
    cr_expect_eq(recipe_load(&r, "/nonexistent/x.yaml", &e), MR_EIO);
    cr_expect_null(r);
    cr_expect_str_eq(e.msg, "/nonexistent/x.yaml: cannot open: No such file or directory");
    char *dir = tu_tmpdir();
    cr_expect_eq(recipe_load(&r, dir, &e), MR_EIO);
    cr_expect(strstr(e.msg, ": cannot read: Is a directory") != NULL, "%s", e.msg);
    char *p = tu_path(dir, "bin.yaml");
    cr_assert_eq(tu_write(p, "run:\n  name: \x01\n", (size_t)-1), 0);
    cr_expect_eq(recipe_load(&r, p, &e), MR_EFORMAT);
    cr_expect(strstr(e.msg, "bin.yaml: YAML read error: control characters are not allowed at byte 13") != NULL, "%s",
              e.msg);
    free(p);
    tu_rmtree(dir);
    free(dir);
}

Test(recipe, schema_doc_lists_every_field) {
    char *doc = NULL;
    cr_assert_eq(recipe_schema_doc(&doc), 0);
    const char *expect[] = {
        "\nrun.name: a string; required\n    name of the run in the store\n",
        "\ngrpo.num_generations: an integer >= 2; default 8\n    completions per prompt G (8-16 is usual)\n",
        "\ngrpo.loss_agg: one of seq_mean_token_mean, token_mean, seq_mean_token_sum_norm; default token_mean\n",
        "\nmodel.preset: one of tiny (exactly one of config, preset, checkpoint); optional\n",
        "\nsft.steps: an integer >= 1 (at most one of steps, epochs); optional\n",
        "\noptim.betas: a list of 2 numbers >= 0 and < 1; default [0.9, 0.95]\n",
        "\nrewards[].lua.script: a string; required\n",
        "\nrewards[].weight: a number; default 1.0\n",
        "\ngrpo.overlong.mode: one of none, mask, soft_penalty; default none\n",
    };
    for (size_t i = 0; i < sizeof expect / sizeof expect[0]; i++)
        cr_expect(strstr(doc, expect[i]) != NULL, "schema doc lacks: %s", expect[i]);
    mem_free(doc);
}

/* ---- allocation failures ---- */

static const char *oom_text =
    BASE "rollout:\n  stop: [a, b, c]\nrewards:\n  - math:\n  - lua: s.lua\n    weight: 0.5\n  - format: {style: regex, "
         "pattern: x}\n";

Test(recipe, allocation_failures_are_reported_and_leak_nothing) {
    long before = mem_injected_failures();
    int ok = 0, n;
    /* load, resolve, set and dump, with the n-th allocation failing, until a pass needs fewer than n */
    for (n = 1; n < 10000 && !ok; n++) {
        recipe *r = NULL;
        char *d = NULL;
        mr_err e = {0};
        long inj = mem_injected_failures();
        mem_fail_after(n);
        int rc = recipe_load_string(&r, oom_text, "oom.yaml", &e);
        if (!rc) rc = recipe_resolve(r, &e);
        if (!rc) rc = recipe_set(r, "rewards[3].code.workers=2", &e);
        if (!rc) rc = recipe_resolve(r, &e);
        if (!rc) rc = recipe_dump_yaml(r, &d);
        mem_fail_after(0);
        if (rc) {
            cr_assert_eq(rc, MR_ENOMEM, "n=%d: %d %s", n, rc, e.msg);
            cr_assert_eq(mem_injected_failures(), inj + 1);
            if (e.code) cr_expect_str_eq(e.msg, "out of memory");
        } else {
            ok = mem_injected_failures() == inj;
            cr_expect(strstr(d, "  - code:\n      all_or_nothing: false\n      memory_mb: 512\n") != NULL);
        }
        mem_free(d);
        recipe_free(r);
    }
    cr_expect(ok, "never completed without an injected failure");
    cr_expect_gt(mem_injected_failures() - before, 50, "the recipe path makes many allocations");
}

Test(recipe, failed_set_under_allocation_failure_leaves_recipe_unchanged) {
    recipe *r = resolve_ok(oom_text);
    char *want = dump(r);
    int done = 0;
    for (int n = 1; n < 5000 && !done; n++) {
        mr_err e = {0};
        long inj = mem_injected_failures();
        mem_fail_after(n);
        int rc = recipe_set(r, "rollout.stop[3]=d", &e);
        mem_fail_after(0);
        if (rc) {
            cr_assert_eq(rc, MR_ENOMEM, "%s", e.msg);
            char *now = dump(r);
            cr_assert_str_eq(now, want, "n=%d", n);
            mem_free(now);
        } else {
            done = mem_injected_failures() == inj;
            cr_assert_eq(recipe_list_len(r, "rollout.stop"), 4);
        }
    }
    cr_expect(done);
    mem_free(want);
    recipe_free(r);
}

/* ---- the CLI ---- */

Test(recipe, cli_prints_resolved_recipe_or_one_error) {
    char cmd[8192], *out = NULL;
    snprintf(cmd, sizeof cmd, "'%s' recipe '%s/recipes/quickstart.yaml' --set grpo.mu=2 --set 'rollout.stop=[x]' 2>&1",
             tu_bin(), tu_src());
    int st = tu_run(cmd, &out);
    cr_expect_eq(st, 0, "%s", out);
    cr_expect(!strncmp(out, "run:\n  name: \"quickstart\"\n", 25), "%s", out);
    cr_expect(strstr(out, "\n  mu: 2\n") != NULL);
    cr_expect(strstr(out, "\n  stop: [\"x\"]\n") != NULL);
    cr_expect(strstr(out, "\n  num_generations: 8\n") != NULL);
    free(out);

    snprintf(cmd, sizeof cmd, "cd '%s' && '%s' recipe tests/fixtures/recipes/bad_weight.yaml", tu_src(), tu_bin());
    st = tu_run(cmd, &out);
    cr_expect_eq(st, 1);
    cr_expect_str_eq(out, "moerl recipe: tests/fixtures/recipes/bad_weight.yaml:9:13: rewards[1].weight: expected a "
                          "number, got \"high\"\n");
    free(out);

    snprintf(cmd, sizeof cmd, "'%s' recipe '%s/recipes/quickstart.yaml' --set grpo.num_generations=eight", tu_bin(),
             tu_src());
    st = tu_run(cmd, &out);
    cr_expect_eq(st, 1);
    cr_expect_str_eq(out, "moerl recipe: --set grpo.num_generations=eight: grpo.num_generations: expected an integer "
                          ">= 2, got \"eight\"\n");
    free(out);

    snprintf(cmd, sizeof cmd, "'%s' recipe", tu_bin());
    cr_expect_eq(tu_run(cmd, &out), 2);
    cr_expect_str_eq(out, "moerl recipe: expected a recipe file (try 'moerl recipe --help')\n");
    free(out);
    snprintf(cmd, sizeof cmd, "'%s' recipe x.yaml --bogus", tu_bin());
    cr_expect_eq(tu_run(cmd, &out), 2);
    free(out);
    snprintf(cmd, sizeof cmd, "'%s' recipe --help", tu_bin());
    cr_expect_eq(tu_run(cmd, &out), 0);
    cr_expect(strstr(out, "usage: moerl recipe FILE.yaml") != NULL);
    free(out);
    snprintf(cmd, sizeof cmd, "'%s' recipe --schema", tu_bin());
    cr_expect_eq(tu_run(cmd, &out), 0);
    cr_expect(strstr(out, "\ngrpo.num_generations: an integer >= 2; default 8\n") != NULL);
    free(out);
}
