/* test_config.c: model/config: the V3 / V2-Lite / V2 config.json fixtures parse to the values of MODEL-SPEC
 * §1.1; write -> parse round trips field by field; parameter counts equal the §12 totals (golden values from an
 * independent Python computation whose V3 model bytes match the spec's header-level listing exactly); a table of
 * bad configs each with its exact error text; allocation failures injected into every allocation. */
#include <criterion/criterion.h>
#include <cjson/cJSON.h>
#include <dirent.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "core/mem.h"
#include "model/config.h"
#include "tests/testutil.h"

static char *fixture_path(const char *name) {
    char rel[256];
    snprintf(rel, sizeof rel, "tests/fixtures/config/%s", name);
    return tu_path(tu_src(), rel);
}

static char *fixture_text(const char *name) {
    char *p = fixture_path(name);
    char *t = tu_read(p, NULL);
    cr_assert(t, "cannot read fixture %s", p);
    free(p);
    return t;
}

static void load_fixture(model_config *c, const char *name) {
    char *p = fixture_path(name);
    mr_err e = {0};
    int rc = config_load_file(c, p, &e);
    cr_assert_eq(rc, 0, "%s: %s", name, e.msg);
    free(p);
}

/* s with the first occurrence of from replaced by to (malloc'd); the test fails if from is absent. */
static char *subst(const char *s, const char *from, const char *to) {
    const char *at = strstr(s, from);
    cr_assert(at, "substitution source \"%s\" not found", from);
    size_t a = (size_t)(at - s), nf = strlen(from), nt = strlen(to), ns = strlen(s);
    char *r = malloc(ns - nf + nt + 1);
    memcpy(r, s, a);
    memcpy(r + a, to, nt);
    memcpy(r + a + nt, at + nf, ns - a - nf + 1);
    return r;
}

static char *tiny_text(void) {
    model_config c;
    config_tiny(&c);
    char *t = NULL;
    mr_err e = {0};
    cr_assert_eq(config_write_json(&c, &t, &e), 0, "%s", e.msg);
    char *r = strdup(t);
    mem_free(t);
    return r;
}

/* ---------------------------------------------------------------------------------------------------------- */

Test(config, v3_fixture_fields) {
    model_config c;
    load_fixture(&c, "deepseek-v3-671b.json");
    cr_expect_eq(c.model_type, CONFIG_DEEPSEEK_V3);
    cr_expect_eq(c.vocab_size, 129280);
    cr_expect_eq(c.hidden_size, 7168);
    cr_expect_eq(c.intermediate_size, 18432);
    cr_expect_eq(c.moe_intermediate_size, 2048);
    cr_expect_eq(c.num_hidden_layers, 61);
    cr_expect_eq(c.num_attention_heads, 128);
    cr_expect_eq(c.num_key_value_heads, 128);
    cr_expect_eq(c.n_shared_experts, 1);
    cr_expect_eq(c.n_routed_experts, 256);
    cr_expect_eq(c.num_experts_per_tok, 8);
    cr_expect_eq(c.n_group, 8);
    cr_expect_eq(c.topk_group, 4);
    cr_expect_eq(c.topk_method, CONFIG_TOPK_NOAUX_TC);
    cr_expect_eq(c.scoring_func, CONFIG_SCORING_SIGMOID);
    cr_expect(c.norm_topk_prob);
    cr_expect_eq(c.routed_scaling_factor, 2.5);
    cr_expect_eq(c.first_k_dense_replace, 3);
    cr_expect_eq(c.moe_layer_freq, 1);
    cr_expect_eq(c.q_lora_rank, 1536);
    cr_expect_eq(c.kv_lora_rank, 512);
    cr_expect_eq(c.qk_nope_head_dim, 128);
    cr_expect_eq(c.qk_rope_head_dim, 64);
    cr_expect_eq(c.v_head_dim, 128);
    cr_expect_eq(c.rope_theta, 10000.0);
    cr_expect_eq(c.rope_scaling.type, CONFIG_ROPE_YARN);
    cr_expect_eq(c.rope_scaling.factor, 40.0);
    cr_expect_eq(c.rope_scaling.original_max_position_embeddings, 4096);
    cr_expect_eq(c.rope_scaling.beta_fast, 32.0);
    cr_expect_eq(c.rope_scaling.beta_slow, 1.0);
    cr_expect_eq(c.rope_scaling.mscale, 1.0);
    cr_expect_eq(c.rope_scaling.mscale_all_dim, 1.0);
    cr_expect_eq(c.max_position_embeddings, 163840);
    cr_expect_eq(c.rms_norm_eps, 1e-6);
    cr_expect_eq(c.hidden_act, CONFIG_ACT_SILU);
    cr_expect(!c.tie_word_embeddings);
    cr_expect_eq(c.num_nextn_predict_layers, 1);
    cr_expect_eq(c.bos_token_id, 0);
    cr_expect_eq(c.n_eos_token_id, 1);
    cr_expect_eq(c.eos_token_id[0], 1);
    cr_expect(!c.eos_token_id_is_list);
    cr_expect_eq(c.pad_token_id, -1);
    cr_expect_eq(c.initializer_range, 0.02);
    cr_expect_eq(c.aux_loss_alpha, 0.001);
    cr_expect(c.seq_aux);
    cr_expect_eq(c.ep_size, 1);
    cr_expect(!c.attention_bias);
    cr_expect_eq(c.attention_dropout, 0.0);
    cr_expect_eq(c.torch_dtype, CONFIG_DTYPE_BF16);
    cr_expect(c.quantization_config.present);
    cr_expect_str_eq(c.quantization_config.quant_method, "fp8");
    cr_expect_str_eq(c.quantization_config.fmt, "e4m3");
    cr_expect_str_eq(c.quantization_config.activation_scheme, "dynamic");
    cr_expect_str_eq(c.quantization_config.scale_fmt, "");
    cr_expect_eq(c.quantization_config.weight_block_size[0], 128);
    cr_expect_eq(c.quantization_config.weight_block_size[1], 128);
    cr_expect(c.rope_interleave);
    cr_expect_str_eq(c.transformers_version, "4.46.3");
    cr_expect_eq(config_qk_head_dim(&c), 192);
}

Test(config, v2_lite_fixture_fields) {
    model_config c;
    load_fixture(&c, "deepseek-v2-lite.json");
    cr_expect_eq(c.model_type, CONFIG_DEEPSEEK_V2);
    cr_expect_eq(c.q_lora_rank, 0, "q_lora_rank null must read as 0 (no query compression)");
    cr_expect_eq(c.hidden_size, 2048);
    cr_expect_eq(c.num_hidden_layers, 27);
    cr_expect_eq(c.num_attention_heads, 16);
    cr_expect_eq(c.n_routed_experts, 64);
    cr_expect_eq(c.n_shared_experts, 2);
    cr_expect_eq(c.num_experts_per_tok, 6);
    cr_expect_eq(c.n_group, 1);
    cr_expect_eq(c.topk_group, 1);
    cr_expect_eq(c.topk_method, CONFIG_TOPK_GREEDY);
    cr_expect_eq(c.scoring_func, CONFIG_SCORING_SOFTMAX);
    cr_expect(!c.norm_topk_prob);
    cr_expect_eq(c.routed_scaling_factor, 1.0);
    cr_expect_eq(c.rope_scaling.mscale, 0.707);
    cr_expect_eq(c.rope_scaling.mscale_all_dim, 0.707);
    cr_expect_eq(c.bos_token_id, 100000);
    cr_expect_eq(c.eos_token_id[0], 100001);
    cr_expect_eq(c.num_nextn_predict_layers, 0, "absent: HF default 0");
    cr_expect_eq(c.ep_size, 1, "absent: HF default 1");
    cr_expect(!c.quantization_config.present);
    cr_expect_str_eq(c.transformers_version, "");
}

Test(config, v2_fixture_fields) {
    model_config c;
    load_fixture(&c, "deepseek-v2-236b.json");
    cr_expect_eq(c.model_type, CONFIG_DEEPSEEK_V2);
    cr_expect_eq(c.q_lora_rank, 1536);
    cr_expect_eq(c.n_routed_experts, 160);
    cr_expect_eq(c.n_group, 8);
    cr_expect_eq(c.topk_group, 3);
    cr_expect_eq(c.topk_method, CONFIG_TOPK_GROUP_LIMITED_GREEDY);
    cr_expect_eq(c.scoring_func, CONFIG_SCORING_SOFTMAX);
    cr_expect_eq(c.routed_scaling_factor, 16.0);
    cr_expect_eq(c.first_k_dense_replace, 1);
    cr_expect_eq(c.rope_interleave, true, "absent: default true");
}

Test(config, load_from_directory_and_errors) {
    char *dir = tu_tmpdir();
    char *src = fixture_text("deepseek-v3-671b.json");
    char *file = tu_path(dir, "config.json");
    cr_assert_eq(tu_write(file, src, (size_t)-1), 0);
    model_config c;
    mr_err e = {0};
    cr_expect_eq(config_load_file(&c, dir, &e), 0, "%s", e.msg);
    cr_expect_eq(c.hidden_size, 7168);

    /* Truncated file: the message names the file and the line:col where the text ends. */
    char *cut = strdup(src);
    char *at = strstr(cut, "\"n_group\"");
    at[0] = '\0';
    cr_assert_eq(tu_write(file, cut, (size_t)-1), 0);
    cr_expect_eq(config_load_file(&c, dir, &e), MR_EFORMAT);
    char want[512];
    snprintf(want, sizeof want, "%s:25:23: malformed JSON: unexpected end of input (truncated file?)", file);
    cr_expect_str_eq(e.msg, want);

    /* A NUL byte inside the file. */
    cr_assert_eq(tu_write(file, "{\"a\": 1\0}", 9), 0);
    cr_expect_eq(config_load_file(&c, file, &e), MR_EFORMAT);
    snprintf(want, sizeof want, "%s: malformed JSON: a NUL byte at offset 7", file);
    cr_expect_str_eq(e.msg, want);

    /* Missing file, and a directory without config.json. */
    char *missing = tu_path(dir, "nope.json");
    cr_expect_eq(config_load_file(&c, missing, &e), MR_EIO);
    snprintf(want, sizeof want, "%s: cannot open: No such file or directory", missing);
    cr_expect_str_eq(e.msg, want);
    char *sub = tu_path(dir, "empty");
    mkdir(sub, 0755);
    cr_expect_eq(config_load_file(&c, sub, &e), MR_EIO);
    cr_expect(strstr(e.msg, "empty/config.json: cannot open") != NULL, "%s", e.msg);

    tu_rmtree(dir);
    free(dir);
    free(src);
    free(file);
    free(cut);
    free(missing);
    free(sub);
}

/* ---------------------------------------------------------------------------------------------------------- */
/* Writing and round trips */

static void round_trip(const model_config *c, const char *what) {
    char *t1 = NULL, *t2 = NULL;
    mr_err e = {0};
    cr_assert_eq(config_write_json(c, &t1, &e), 0, "%s: %s", what, e.msg);
    model_config back;
    cr_assert_eq(config_parse_json(&back, t1, what, &e), 0, "%s: %s\n%s", what, e.msg, t1);
    const char *d = config_diff(c, &back);
    cr_expect(d == NULL, "%s: field %s differs after write + parse", what, d ? d : "");
    cr_assert_eq(config_write_json(&back, &t2, &e), 0, "%s: %s", what, e.msg);
    cr_expect_str_eq(t1, t2, "%s: writing is not a fixed point", what);

    /* HF layout: sorted top-level keys, 2-space indent. */
    char prev[64] = "";
    int keys = 0;
    for (const char *p = t1; (p = strstr(p, "\n  \"")) != NULL; p += 4) {
        char key[64];
        if (sscanf(p + 4, "%63[^\"]", key) != 1) continue;
        cr_expect(strcmp(prev, key) < 0, "%s: key %s written after %s", what, key, prev);
        snprintf(prev, sizeof prev, "%s", key);
        keys++;
    }
    cr_expect(keys >= 40, "%s: only %d top-level keys", what, keys);
    mem_free(t1);
    mem_free(t2);
}

Test(config, round_trip_fixtures_and_tiny) {
    const char *names[] = {"deepseek-v3-671b.json", "deepseek-v2-lite.json", "deepseek-v2-236b.json"};
    for (size_t i = 0; i < 3; i++) {
        model_config c;
        load_fixture(&c, names[i]);
        round_trip(&c, names[i]);
    }
    model_config t;
    config_tiny(&t);
    round_trip(&t, "tiny");
    t.eos_token_id[1] = 7; /* a list of ids stays a list */
    t.n_eos_token_id = 2;
    t.eos_token_id_is_list = true;
    t.pad_token_id = 2;
    t.n_routed_experts = 0; /* a dense model: n_routed_experts null */
    t.num_experts_per_tok = 0;
    round_trip(&t, "tiny-dense");
}

Test(config, written_text_hf_conventions) {
    model_config c;
    char *t = NULL;
    mr_err e = {0};
    load_fixture(&c, "deepseek-v2-lite.json");
    cr_assert_eq(config_write_json(&c, &t, &e), 0, "%s", e.msg);
    cr_expect(strstr(t, "\n  \"q_lora_rank\": null,\n"), "%s", t);
    cr_expect(strstr(t, "\n  \"architectures\": [\n    \"DeepseekV2ForCausalLM\"\n  ],\n"), "%s", t);
    cr_expect(strstr(t, "\n  \"model_type\": \"deepseek_v2\",\n"), "%s", t);
    cr_expect(strstr(t, "\n    \"mscale_all_dim\": 0.707,\n"), "%s", t);
    cr_expect(strstr(t, "\n    \"type\": \"yarn\"\n  },\n"), "%s", t);
    cr_expect(strstr(t, "\n  \"routed_scaling_factor\": 1.0,\n"), "%s", t);
    cr_expect(strstr(t, "\n  \"rms_norm_eps\": 1e-06,\n"), "%s", t);
    cr_expect(strstr(t, "auto_map") == NULL, "no auto_map: moerl ships no remote code");
    cr_expect(strstr(t, "quantization_config") == NULL);
    mem_free(t);

    config_tiny(&c);
    cr_assert_eq(config_write_json(&c, &t, &e), 0, "%s", e.msg);
    cr_expect(strstr(t, "\n  \"rope_scaling\": null,\n"), "%s", t);
    cr_expect(strstr(t, "\n  \"architectures\": [\n    \"DeepseekV3ForCausalLM\"\n  ],\n"), "%s", t);
    cr_expect(strstr(t, "\n  \"torch_dtype\": \"float32\",\n"), "%s", t);
    cr_expect(strstr(t, "\n  \"eos_token_id\": 1,\n"), "%s", t);
    cr_expect(strstr(t, "transformers_version") == NULL, "not written when unknown");
    cr_expect(t[0] == '{' && strcmp(t + strlen(t) - 2, "}\n") == 0);
    mem_free(t);

    load_fixture(&c, "deepseek-v3-671b.json");
    cr_assert_eq(config_write_json(&c, &t, &e), 0, "%s", e.msg);
    cr_expect(strstr(t, "\n  \"quantization_config\": {\n    \"activation_scheme\": \"dynamic\",\n    \"fmt\": "
                        "\"e4m3\",\n    \"quant_method\": \"fp8\",\n    \"weight_block_size\": [\n      128,\n      "
                        "128\n    ]\n  },\n"),
              "%s", t);
    cr_expect(strstr(t, "\n  \"transformers_version\": \"4.46.3\",\n"), "%s", t);
    mem_free(t);

    /* An invalid struct is refused, not written. */
    c.hidden_size = 0;
    cr_expect_eq(config_write_json(&c, &t, &e), MR_ERANGE);
    cr_expect_str_eq(e.msg, "config: hidden_size: expected 1..1048576, got 0");
    cr_expect(t == NULL);
}

static int count_entries(const char *dir) {
    DIR *d = opendir(dir);
    int n = 0;
    for (struct dirent *de; d && (de = readdir(d));)
        if (strcmp(de->d_name, ".") && strcmp(de->d_name, "..")) n++;
    if (d) closedir(d);
    return n;
}

Test(config, save_file_atomic) {
    char *dir = tu_tmpdir();
    model_config c, back;
    mr_err e = {0};
    config_tiny(&c);
    cr_assert_eq(config_save_file(&c, dir, &e), 0, "%s", e.msg); /* a directory: dir/config.json */
    cr_expect_eq(count_entries(dir), 1, "temporary file left behind");
    cr_assert_eq(config_load_file(&back, dir, &e), 0, "%s", e.msg);
    cr_expect(config_diff(&c, &back) == NULL);
    char *file = tu_path(dir, "config.json");
    struct stat st;
    cr_assert_eq(stat(file, &st), 0);
    cr_expect_eq(st.st_mode & 0777, 0644);

    c.hidden_size = 512; /* overwrite in place */
    cr_assert_eq(config_save_file(&c, file, &e), 0, "%s", e.msg);
    cr_assert_eq(config_load_file(&back, file, &e), 0, "%s", e.msg);
    cr_expect_eq(back.hidden_size, 512);
    cr_expect_eq(count_entries(dir), 1);

    char *bad = tu_path(dir, "no/such/dir/config.json");
    cr_expect_eq(config_save_file(&c, bad, &e), MR_EIO);
    cr_expect(strstr(e.msg, "cannot create a temporary file next to it") != NULL, "%s", e.msg);
    cr_expect_eq(count_entries(dir), 1);
    tu_rmtree(dir);
    free(dir);
    free(file);
    free(bad);
}

Test(config, diff_names_each_field) {
    model_config a, b;
    load_fixture(&a, "deepseek-v3-671b.json");
    b = a;
    cr_expect(config_diff(&a, &b) == NULL);
#define DIFF(stmt, name)                                                                                          \
    do {                                                                                                          \
        b = a;                                                                                                    \
        stmt;                                                                                                     \
        const char *d = config_diff(&a, &b);                                                                      \
        cr_expect(d && strcmp(d, name) == 0, "%s: got %s", #stmt, d ? d : "(equal)");                             \
    } while (0)
    DIFF(b.model_type = CONFIG_DEEPSEEK_V2, "model_type");
    DIFF(b.vocab_size++, "vocab_size");
    DIFF(b.num_key_value_heads--, "num_key_value_heads");
    DIFF(b.q_lora_rank = 0, "q_lora_rank");
    DIFF(b.routed_scaling_factor = 2.0, "routed_scaling_factor");
    DIFF(b.norm_topk_prob = false, "norm_topk_prob");
    DIFF(b.rope_interleave = false, "rope_interleave");
    DIFF(b.topk_method = CONFIG_TOPK_GREEDY, "topk_method");
    DIFF(b.scoring_func = CONFIG_SCORING_SOFTMAX, "scoring_func");
    DIFF(b.torch_dtype = CONFIG_DTYPE_F16, "torch_dtype");
    DIFF(b.transformers_version[0] = '5', "transformers_version");
    DIFF(b.bos_token_id = -1, "bos_token_id");
    DIFF(b.pad_token_id = 3, "pad_token_id");
    DIFF(b.eos_token_id_is_list = true, "eos_token_id");
    DIFF(b.eos_token_id[0] = 2, "eos_token_id");
    DIFF(b.rope_scaling.type = CONFIG_ROPE_NONE, "rope_scaling");
    DIFF(b.rope_scaling.mscale_all_dim = 0.5, "rope_scaling.mscale_all_dim");
    DIFF(b.rope_scaling.original_max_position_embeddings = 8192, "rope_scaling.original_max_position_embeddings");
    DIFF(b.quantization_config.present = false, "quantization_config");
    DIFF(b.quantization_config.weight_block_size[1] = 64, "quantization_config.weight_block_size");
    DIFF(b.quantization_config.scale_fmt[0] = 'u', "quantization_config.scale_fmt");
#undef DIFF
    /* Fields that do not apply are not compared: rope numbers without YaRN, eos slots past the count. */
    a.rope_scaling.type = CONFIG_ROPE_NONE;
    b = a;
    b.rope_scaling.factor = 3;
    b.eos_token_id[5] = 99;
    cr_expect(config_diff(&a, &b) == NULL);
}

/* ---------------------------------------------------------------------------------------------------------- */
/* Defaults */

static const char *MINIMAL_V3 =
    "{\"model_type\": \"deepseek_v3\", \"vocab_size\": 129280, \"hidden_size\": 64, \"intermediate_size\": 128,"
    " \"num_hidden_layers\": 2, \"num_attention_heads\": 2, \"n_routed_experts\": null, \"q_lora_rank\": null,"
    " \"kv_lora_rank\": 16, \"qk_nope_head_dim\": 8, \"qk_rope_head_dim\": 8, \"v_head_dim\": 8}";

Test(config, defaults_follow_hf_classes) {
    model_config c;
    mr_err e = {0};
    cr_assert_eq(config_parse_json(&c, MINIMAL_V3, "min", &e), 0, "%s", e.msg);
    cr_expect_eq(c.n_routed_experts, 0);
    cr_expect_eq(c.num_key_value_heads, 2, "defaults to num_attention_heads");
    cr_expect_eq(c.n_group, 1);
    cr_expect_eq(c.topk_group, 1);
    cr_expect_eq(c.topk_method, CONFIG_TOPK_NOAUX_TC);
    cr_expect_eq(c.scoring_func, CONFIG_SCORING_SIGMOID);
    cr_expect(c.norm_topk_prob);
    cr_expect_eq(c.routed_scaling_factor, 2.5);
    cr_expect_eq(c.max_position_embeddings, 4096);
    cr_expect_eq(c.rope_theta, 10000.0);
    cr_expect_eq(c.rope_scaling.type, CONFIG_ROPE_NONE);
    cr_expect_eq(c.bos_token_id, 0);
    cr_expect_eq(c.eos_token_id[0], 1);
    cr_expect_eq(c.rms_norm_eps, 1e-6);
    cr_expect(c.rope_interleave);
    cr_expect_eq(c.torch_dtype, CONFIG_DTYPE_NONE);
    for (int l = 0; l < 3; l++) cr_expect(!config_is_moe_layer(&c, l), "dense model, layer %d", l);

    char *v2 = subst(MINIMAL_V3, "deepseek_v3", "deepseek_v2");
    cr_assert_eq(config_parse_json(&c, v2, "min", &e), 0, "%s", e.msg);
    cr_expect_eq(c.topk_method, CONFIG_TOPK_GREEDY);
    cr_expect_eq(c.scoring_func, CONFIG_SCORING_SOFTMAX);
    cr_expect(!c.norm_topk_prob);
    cr_expect_eq(c.routed_scaling_factor, 1.0);
    cr_expect_eq(c.max_position_embeddings, 2048);
    cr_expect_eq(c.bos_token_id, 100000);
    cr_expect_eq(c.eos_token_id[0], 100001);

    /* Routing fields: each follows the other when absent. */
    char *a =
        subst(v2, "\"q_lora_rank\": null", "\"q_lora_rank\": null, \"scoring_func\": \"softmax\", \"n_group\": 4");
    cr_assert_eq(config_parse_json(&c, a, "min", &e), 0, "%s", e.msg);
    cr_expect_eq(c.topk_method, CONFIG_TOPK_GROUP_LIMITED_GREEDY);
    char *b = subst(v2, "\"q_lora_rank\": null", "\"q_lora_rank\": null, \"topk_method\": \"noaux_tc\"");
    cr_assert_eq(config_parse_json(&c, b, "min", &e), 0, "%s", e.msg);
    cr_expect_eq(c.scoring_func, CONFIG_SCORING_SIGMOID);
    char *g = subst(v2, "\"q_lora_rank\": null", "\"q_lora_rank\": null, \"topk_method\": \"gready\"");
    cr_assert_eq(config_parse_json(&c, g, "min", &e), 0, "%s", e.msg);
    cr_expect_eq(c.topk_method, CONFIG_TOPK_GREEDY, "the V2 remote code's default spelling");
    free(v2);
    free(a);
    free(b);
    free(g);
}

Test(config, variants_of_optional_fields) {
    model_config c;
    mr_err e = {0};
    /* eos as a list; dtype as newer transformers spell it; transformers v5 rope_parameters with rope_theta. */
    char *t = subst(MINIMAL_V3, "\"vocab_size\": 129280",
                    "\"vocab_size\": 129280, \"eos_token_id\": [1, 2, 999], \"dtype\": \"float16\", \"pad_token_id\": "
                    "null, \"rope_parameters\": {\"rope_type\": \"yarn\", \"factor\": 4, \"rope_theta\": 50000.0}");
    cr_assert_eq(config_parse_json(&c, t, "v", &e), 0, "%s", e.msg);
    cr_expect_eq(c.n_eos_token_id, 3);
    cr_expect(c.eos_token_id_is_list);
    cr_expect_eq(c.eos_token_id[2], 999);
    cr_expect_eq(c.torch_dtype, CONFIG_DTYPE_F16);
    cr_expect_eq(c.pad_token_id, -1);
    cr_expect_eq(c.rope_scaling.type, CONFIG_ROPE_YARN);
    cr_expect_eq(c.rope_scaling.factor, 4.0);
    cr_expect_eq(c.rope_scaling.beta_fast, 32.0);
    cr_expect_eq(c.rope_scaling.original_max_position_embeddings, 4096);
    cr_expect_eq(c.rope_scaling.mscale_all_dim, 0.0, "absent");
    cr_expect_eq(c.rope_theta, 50000.0);
    round_trip(&c, "variants");
    /* Without mscale_all_dim there is no m^2 in the softmax scale (HF); the cos/sin factor falls back to
     * get_mscale(s) = 0.1 ln 4 + 1. */
    cr_expect(fabs(config_softmax_scale(&c) - 1.0 / sqrt(16.0)) < 1e-15);
    cr_expect(fabs(config_rope_attention_factor(&c) - (0.1 * log(4.0) + 1.0)) < 1e-15);
    free(t);

    t = subst(MINIMAL_V3, "\"vocab_size\": 129280",
              "\"vocab_size\": 129280, \"rope_scaling\": {\"type\": \"default\"}");
    cr_assert_eq(config_parse_json(&c, t, "v", &e), 0, "%s", e.msg);
    cr_expect_eq(c.rope_scaling.type, CONFIG_ROPE_NONE);
    free(t);
    t = subst(MINIMAL_V3, "\"vocab_size\": 129280", "\"vocab_size\": 129280, \"eos_token_id\": null");
    cr_assert_eq(config_parse_json(&c, t, "v", &e), 0, "%s", e.msg);
    cr_expect_eq(c.n_eos_token_id, 0);
    round_trip(&c, "eos-null");
    free(t);
}

/* ---------------------------------------------------------------------------------------------------------- */
/* Derived quantities */

Test(config, moe_layer_rule) {
    model_config c;
    load_fixture(&c, "deepseek-v3-671b.json");
    int moe = 0;
    for (int l = 0; l < c.num_hidden_layers; l++) moe += config_is_moe_layer(&c, l);
    cr_expect_eq(moe, 58);
    cr_expect(!config_is_moe_layer(&c, 0));
    cr_expect(!config_is_moe_layer(&c, 2));
    cr_expect(config_is_moe_layer(&c, 3));
    cr_expect(config_is_moe_layer(&c, 60));
    cr_expect(config_is_moe_layer(&c, 61), "the MTP layer is an MoE layer");
    c.moe_layer_freq = 2;
    cr_expect(!config_is_moe_layer(&c, 3));
    cr_expect(config_is_moe_layer(&c, 4));
    c.n_routed_experts = 0;
    cr_expect(!config_is_moe_layer(&c, 4));
}

Test(config, softmax_scale_yarn) {
    model_config c;
    load_fixture(&c, "deepseek-v3-671b.json");
    /* MODEL-SPEC §5.5: V3 lambda = 192^-1/2 * (0.1 ln 40 + 1)^2 = 0.1352337789. */
    cr_expect(fabs(config_softmax_scale(&c) - 0.1352337789) < 5e-11, "%.12f", config_softmax_scale(&c));
    cr_expect_eq(config_rope_attention_factor(&c), 1.0);
    load_fixture(&c, "deepseek-v2-lite.json");
    cr_expect(fabs(config_softmax_scale(&c) - 0.1147213868) < 5e-11, "%.12f", config_softmax_scale(&c));
    cr_expect_eq(config_rope_attention_factor(&c), 1.0);
    config_tiny(&c);
    cr_expect(fabs(config_softmax_scale(&c) - 1.0 / sqrt(48.0)) < 1e-15, "no YaRN: plain d_qk^-1/2");
    cr_expect_eq(config_rope_attention_factor(&c), 1.0);
}

Test(config, param_counts_match_published_totals) {
    model_config c;
    config_params p;
    uint64_t total = 0, act = 0;

    load_fixture(&c, "deepseek-v3-671b.json");
    cr_assert_eq(config_param_breakdown(&c, &p), 0);
    cr_expect_eq(p.total, 671026419200ull, "%llu", (unsigned long long)p.total);
    cr_expect_eq(p.activated, 37552297472ull, "%llu", (unsigned long long)p.activated);
    cr_expect_eq(llround(p.total / 1e9), 671, "published: 671B total");
    cr_expect_eq((long)(p.activated / 1000000000ull), 37, "published: 37B activated");
    cr_expect_eq(p.activated - 129280ull * 7168ull, 36625618432ull, "without the input embedding");
    /* MTP: 5 norms of d (enorm, hnorm, shared_head.norm, 2 block norms) + eh_proj + one MoE block. MODEL-SPEC §12
     * prints 11,610,075,392, one d (7168) more; the inventory of §10.3, whose byte total matches the Hub listing
     * exactly (688,574,839,360 B), has five d-sized norms, so this is the count. */
    cr_expect_eq(p.mtp_total, 11610068224ull, "%llu", (unsigned long long)p.mtp_total);
    cr_expect_eq(p.mtp_activated, 2541458688ull, "%llu", (unsigned long long)p.mtp_activated);
    cr_expect_eq(llround(p.checkpoint_total / 1e7), 68449, "spec: 684.49B in the Hub files");
    cr_expect_eq(p.checkpoint_total, 684489845504ull);
    cr_assert_eq(config_param_count(&c, &total, &act), 0);
    cr_expect_eq(total, p.total);
    cr_expect_eq(act, p.activated);

    load_fixture(&c, "deepseek-v2-lite.json");
    cr_assert_eq(config_param_breakdown(&c, &p), 0);
    cr_expect_eq(p.total, 15706484224ull, "%llu", (unsigned long long)p.total); /* 15.71B */
    cr_expect_eq(llround(p.total / 1e7), 1571);
    cr_expect_eq(p.activated - 102400ull * 2048ull, 2451435008ull); /* 2.45B active non-embedding */
    cr_expect_eq(p.mtp_total, 0ull);
    cr_expect_eq(p.checkpoint_total, p.total);

    load_fixture(&c, "deepseek-v2-236b.json");
    cr_assert_eq(config_param_breakdown(&c, &p), 0);
    cr_expect_eq(p.total, 235741434880ull, "%llu", (unsigned long long)p.total); /* 235.74B */
    cr_expect_eq(p.activated, 21375800320ull, "%llu", (unsigned long long)p.activated); /* 21.4B */

    config_tiny(&c);
    cr_assert_eq(config_param_breakdown(&c, &p), 0);
    cr_expect_eq(p.total, 6863664ull, "%llu", (unsigned long long)p.total);
    cr_expect_eq(p.activated, 2734896ull, "%llu", (unsigned long long)p.activated);
    cr_expect_eq(p.mtp_total, 1906064ull, "%llu", (unsigned long long)p.mtp_total);
    cr_expect_eq(p.mtp_activated, 1578384ull, "%llu", (unsigned long long)p.mtp_activated);
    cr_expect_eq(p.checkpoint_total, 9818304ull);
    c.tie_word_embeddings = true;
    cr_assert_eq(config_param_breakdown(&c, &p), 0);
    cr_expect_eq(p.total, 6863664ull - 2048ull * 256ull, "a tied head is counted once");

    /* Overflow is reported, not wrapped. */
    c.hidden_size = INT32_MAX;
    c.vocab_size = INT32_MAX;
    c.num_attention_heads = INT32_MAX;
    c.qk_nope_head_dim = INT32_MAX;
    cr_expect_eq(config_param_count(&c, &total, NULL), MR_ERANGE);
    c.hidden_size = -1;
    cr_expect_eq(config_param_count(&c, &total, NULL), MR_ERANGE);
}

Test(config, tiny_is_valid_v3_style) {
    model_config c;
    mr_err e = {0};
    config_tiny(&c);
    cr_expect_eq(config_validate(&c, "tiny", &e), 0, "%s", e.msg);
    cr_expect_eq(c.model_type, CONFIG_DEEPSEEK_V3);
    cr_expect_eq(c.num_hidden_layers, 4);
    cr_expect_eq(c.first_k_dense_replace, 1);
    cr_expect(!config_is_moe_layer(&c, 0));
    cr_expect(config_is_moe_layer(&c, 1));
    cr_expect(config_is_moe_layer(&c, 4), "its MTP layer");
    cr_expect_eq(c.q_lora_rank, 64);
    cr_expect_eq(config_qk_head_dim(&c), 48);
    cr_expect_eq(c.n_routed_experts / c.n_group, 4);
    cr_expect_eq(c.num_nextn_predict_layers, 1);
    cr_expect_eq(c.rope_scaling.type, CONFIG_ROPE_NONE);
    cr_expect_eq(c.max_position_embeddings, 1024);
}

/* ---------------------------------------------------------------------------------------------------------- */
/* Bad configs: exact error texts */

typedef struct bad_case {
    const char *base; /* "tiny" (config_tiny as written) or a fixture name */
    const char *from, *to;
    int code;
    const char *msg; /* full message; the source is "ckpt/config.json" */
} bad_case;

static const bad_case bad[] = {
    {"tiny", "\"hidden_size\": 256", "\"hidden_size\": \"big\"", MR_EFORMAT,
     "ckpt/config.json: hidden_size: expected an integer, got \"big\""},
    {"tiny", "\"hidden_size\": 256", "\"hidden_size\": 25.5", MR_EFORMAT,
     "ckpt/config.json: hidden_size: expected an integer, got 25.5"},
    {"tiny", "\"hidden_size\": 256", "\"hidden_size\": 0", MR_ERANGE,
     "ckpt/config.json: hidden_size: expected 1..1048576, got 0"},
    {"tiny", "\"hidden_size\": 256,\n", "", MR_EFORMAT, "ckpt/config.json: hidden_size: required field is missing"},
    {"tiny", "\"q_lora_rank\": 64,\n", "", MR_EFORMAT, "ckpt/config.json: q_lora_rank: required field is missing"},
    {"tiny", "\"model_type\": \"deepseek_v3\",\n", "", MR_EFORMAT,
     "ckpt/config.json: model_type: required field is missing"},
    {"tiny", "\"moe_intermediate_size\": 128,\n", "", MR_EFORMAT,
     "ckpt/config.json: moe_intermediate_size: required field is missing (the model has n_routed_experts = 16)"},
    {"tiny", "\"num_experts_per_tok\": 2", "\"num_experts_per_tok\": null", MR_EFORMAT,
     "ckpt/config.json: num_experts_per_tok: expected an integer, got null"},
    {"tiny", "\"num_experts_per_tok\": 2", "\"num_experts_per_tok\": 70", MR_ERANGE,
     "ckpt/config.json: num_experts_per_tok: expected 1..n_routed_experts (16), got 70"},
    {"tiny", "\"num_experts_per_tok\": 2", "\"num_experts_per_tok\": 9", MR_ERANGE,
     "ckpt/config.json: num_experts_per_tok: expected at most topk_group * n_routed_experts / n_group (2 * 4 = 8) "
     "for topk_method \"noaux_tc\", got 9"},
    {"tiny", "\"n_group\": 4", "\"n_group\": 3", MR_ERANGE,
     "ckpt/config.json: n_routed_experts: expected a multiple of n_group (3), got 16"},
    {"tiny", "\"n_group\": 4", "\"n_group\": 32", MR_ERANGE,
     "ckpt/config.json: n_group: expected 1..n_routed_experts (16), got 32"},
    {"tiny", "\"n_group\": 4", "\"n_group\": 16", MR_ERANGE,
     "ckpt/config.json: n_group: topk_method \"noaux_tc\" needs >= 2 experts per group, got n_routed_experts / "
     "n_group = 16 / 16 = 1"},
    {"tiny", "\"topk_group\": 2", "\"topk_group\": 5", MR_ERANGE,
     "ckpt/config.json: topk_group: expected 1..n_group (4), got 5"},
    {"tiny", "\"scoring_func\": \"sigmoid\"", "\"scoring_func\": \"softmax\"", MR_EINVAL,
     "ckpt/config.json: scoring_func: topk_method \"noaux_tc\" needs \"sigmoid\", got \"softmax\""},
    {"tiny", "\"topk_method\": \"noaux_tc\"", "\"topk_method\": \"greedy\"", MR_EINVAL,
     "ckpt/config.json: scoring_func: topk_method \"greedy\" needs \"softmax\", got \"sigmoid\""},
    {"tiny", "\"topk_method\": \"noaux_tc\"", "\"topk_method\": \"aux_free\"", MR_EINVAL,
     "ckpt/config.json: topk_method: expected \"noaux_tc\", \"greedy\" or \"group_limited_greedy\", got "
     "\"aux_free\""},
    {"tiny", "\"scoring_func\": \"sigmoid\"", "\"scoring_func\": \"relu\"", MR_EINVAL,
     "ckpt/config.json: scoring_func: expected \"sigmoid\" or \"softmax\", got \"relu\""},
    {"tiny", "\"model_type\": \"deepseek_v3\"", "\"model_type\": \"llama\"", MR_EINVAL,
     "ckpt/config.json: model_type: expected \"deepseek_v3\" or \"deepseek_v2\", got \"llama\""},
    {"tiny", "\"hidden_act\": \"silu\"", "\"hidden_act\": \"gelu\"", MR_EINVAL,
     "ckpt/config.json: hidden_act: expected \"silu\", got \"gelu\""},
    {"tiny", "\"torch_dtype\": \"float32\"", "\"torch_dtype\": \"int8\"", MR_EINVAL,
     "ckpt/config.json: torch_dtype: expected \"bfloat16\", \"float16\" or \"float32\", got \"int8\""},
    {"tiny", "\"kv_lora_rank\": 64", "\"kv_lora_rank\": 0", MR_ERANGE,
     "ckpt/config.json: kv_lora_rank: expected 1..1048576, got 0"},
    {"tiny", "\"qk_rope_head_dim\": 16", "\"qk_rope_head_dim\": 15", MR_ERANGE,
     "ckpt/config.json: qk_rope_head_dim: expected an even number (RoPE rotates pairs), got 15"},
    {"tiny", "\"first_k_dense_replace\": 1", "\"first_k_dense_replace\": 5", MR_ERANGE,
     "ckpt/config.json: first_k_dense_replace: expected 0..num_hidden_layers (4), got 5"},
    {"tiny", "\"num_key_value_heads\": 4", "\"num_key_value_heads\": 8", MR_ERANGE,
     "ckpt/config.json: num_key_value_heads: expected 1..num_attention_heads (4), got 8"},
    {"tiny", "\"norm_topk_prob\": true", "\"norm_topk_prob\": 1", MR_EFORMAT,
     "ckpt/config.json: norm_topk_prob: expected true or false, got 1"},
    {"tiny", "\"rms_norm_eps\": 1e-06", "\"rms_norm_eps\": 0", MR_ERANGE,
     "ckpt/config.json: rms_norm_eps: expected a number in (0, 1), got 0"},
    {"tiny", "\"routed_scaling_factor\": 1.0", "\"routed_scaling_factor\": -2", MR_ERANGE,
     "ckpt/config.json: routed_scaling_factor: expected a number > 0, got -2"},
    {"tiny", "\"attention_bias\": false", "\"attention_bias\": true", MR_EINVAL,
     "ckpt/config.json: attention_bias: expected false (the architecture has no attention bias), got true"},
    {"tiny", "\"eos_token_id\": 1", "\"eos_token_id\": 5000", MR_ERANGE,
     "ckpt/config.json: eos_token_id: expected 0..vocab_size-1 (2047), got 5000"},
    {"tiny", "\"eos_token_id\": 1", "\"eos_token_id\": [1, \"x\"]", MR_EFORMAT,
     "ckpt/config.json: eos_token_id[1]: expected a non-negative integer or null, got \"x\""},
    {"tiny", "\"bos_token_id\": 0", "\"bos_token_id\": -1", MR_EFORMAT,
     "ckpt/config.json: bos_token_id: expected a non-negative integer or null, got -1"},
    {"tiny", "\"num_nextn_predict_layers\": 1", "\"num_nextn_predict_layers\": 17", MR_ERANGE,
     "ckpt/config.json: num_nextn_predict_layers: expected 0..16, got 17"},
    {"tiny", "\"rope_scaling\": null", "\"rope_scaling\": \"yarn\"", MR_EFORMAT,
     "ckpt/config.json: rope_scaling: expected an object or null, got \"yarn\""},
    {"tiny", "\"hidden_size\": 256", "\"hidden_size\": 256, \"hidden_size\": 512", MR_EFORMAT,
     "ckpt/config.json: hidden_size: key appears twice"},
    {"deepseek-v3-671b.json", "\"factor\": 40", "\"factor\": 0.5", MR_ERANGE,
     "ckpt/config.json: rope_scaling.factor: expected a number >= 1, got 0.5"},
    {"deepseek-v3-671b.json", "\"factor\": 40,", "", MR_EFORMAT,
     "ckpt/config.json: rope_scaling.factor: required field is missing"},
    {"deepseek-v3-671b.json", "\"type\": \"yarn\"", "\"type\": \"linear\"", MR_EINVAL,
     "ckpt/config.json: rope_scaling.type: expected \"yarn\" (moerl implements YaRN only), got \"linear\""},
    {"deepseek-v3-671b.json", "\"type\": \"yarn\"", "\"type\": \"yarn\", \"rope_type\": \"linear\"", MR_EINVAL,
     "ckpt/config.json: rope_scaling: type \"yarn\" and rope_type \"linear\" disagree"},
    {"deepseek-v3-671b.json", "\"beta_fast\": 32", "\"beta_fast\": 0.5", MR_ERANGE,
     "ckpt/config.json: rope_scaling.beta_fast: expected a number > rope_scaling.beta_slow (1), got 0.5"},
    {"deepseek-v3-671b.json", "\"mscale\": 1.0", "\"mscale\": \"one\"", MR_EFORMAT,
     "ckpt/config.json: rope_scaling.mscale: expected a number, got \"one\""},
    {"deepseek-v3-671b.json", "\"quant_method\": \"fp8\"", "\"quant_method\": \"gptq\"", MR_EINVAL,
     "ckpt/config.json: quantization_config.quant_method: expected \"fp8\", got \"gptq\""},
    {"deepseek-v3-671b.json", "\"weight_block_size\": [\n      128,\n      128\n    ]", "\"weight_block_size\": [128]",
     MR_EFORMAT, "ckpt/config.json: quantization_config.weight_block_size: expected an array of 2 integers, got an "
                 "array"},
    {"deepseek-v3-671b.json", "\"weight_block_size\": [\n      128,\n      128\n    ]",
     "\"weight_block_size\": [128, 0]", MR_ERANGE,
     "ckpt/config.json: quantization_config.weight_block_size[1]: expected 1..1048576, got 0"},
    {"deepseek-v3-671b.json", "\"transformers_version\": \"4.46.3\"",
     "\"transformers_version\": \"4.46.3-a-very-long-development-build\"", MR_ERANGE,
     "ckpt/config.json: transformers_version: expected a string of at most 31 characters, got "
     "\"4.46.3-a-very-long-development-build\""},
    /* Malformed JSON: line:col of the offending character (line 11 of the written tiny config is the
     * "first_k_dense_replace" line). */
    {"tiny", "\"first_k_dense_replace\": 1,", "\"first_k_dense_replace\": 1x,", MR_EFORMAT,
     "ckpt/config.json:11:29: malformed JSON: unexpected character 'x' (expected ',' or '}')"},
    {"tiny", "\"first_k_dense_replace\": 1,", "\"first_k_dense_replace\": 1,,", MR_EFORMAT,
     "ckpt/config.json:11:30: malformed JSON: unexpected character ',' (expected a \"key\")"},
};

static char *bad_base(const char *name) { return strcmp(name, "tiny") == 0 ? tiny_text() : fixture_text(name); }

Test(config, bad_config_table) {
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        char *base = bad_base(bad[i].base);
        char *text = subst(base, bad[i].from, bad[i].to);
        model_config c;
        mr_err e = {0};
        int rc = config_parse_json(&c, text, "ckpt/config.json", &e);
        cr_expect_eq(rc, bad[i].code, "case %zu (%s): rc %d, want %d: %s", i, bad[i].to, rc, bad[i].code, e.msg);
        cr_expect_str_eq(e.msg, bad[i].msg, "case %zu: %s", i, e.msg);
        free(base);
        free(text);
    }
}

Test(config, malformed_json_positions) {
    static const struct {
        const char *text, *msg;
    } m[] = {
        {"{\n  \"model_type\": \"deepseek_v3\",\n  \"hidden_size\": 25x6\n}",
         "c.json:3:20: malformed JSON: unexpected character 'x' (expected ',' or '}')"},
        {"{\n  \"model_type\": \"deepseek_v3\",\n  \"hidden_size\": 25",
         "c.json:3:20: malformed JSON: unexpected end of input (truncated file?)"},
        {"{\n  \"model_type\": \"deeps", "c.json:2:23: malformed JSON: unexpected end of input (truncated file?)"},
        {"{\"a\": 1} x",
         "c.json:1:10: malformed JSON: unexpected character 'x' (expected the end of the input after the top-level "
         "value)"},
        {"{\"a\": 1]", "c.json:1:8: malformed JSON: unexpected character ']' (expected ',' or '}')"},
        {"{\"a\":\n\t\x01}", "c.json:2:2: malformed JSON: unexpected byte 0x01 (expected a value)"},
        {"{\"a\": 1,\n}", "c.json:2:1: malformed JSON: unexpected character '}' (expected a \"key\")"},
        {"{\"a\" 1}", "c.json:1:6: malformed JSON: unexpected character '1' (expected ':')"},
        {"{\"a\": \"\\q\"}", "c.json:1:9: malformed JSON: unexpected character 'q' (expected a valid escape)"},
        {"{\"a\": \"x\ny\"}",
         "c.json:1:9: malformed JSON: unexpected byte 0x0a (expected a closing '\"' (control characters must be "
         "escaped))"},
        {"{\"a\": -}", "c.json:1:8: malformed JSON: unexpected character '}' (expected a digit)"},
        {"{\"a\": tru}", "c.json:1:7: malformed JSON: unexpected character 't' (expected a value)"},
        {"", "c.json: malformed JSON: empty input"},
        {"  \n ", "c.json: malformed JSON: empty input"},
        {"[1, 2]", "c.json: top level: expected a JSON object, got an array"},
        {"\"x\"", "c.json: top level: expected a JSON object, got \"x\""},
    };
    for (size_t i = 0; i < sizeof m / sizeof m[0]; i++) {
        model_config c;
        mr_err e = {0};
        int rc = config_parse_json(&c, m[i].text, "c.json", &e);
        cr_expect_eq(rc, MR_EFORMAT, "case %zu: %s", i, e.msg);
        cr_expect_str_eq(e.msg, m[i].msg, "case %zu: %s", i, e.msg);
    }
    /* Past the syntax check, cJSON's own refusals (here an unpaired UTF-16 surrogate) keep its position. */
    model_config c0;
    mr_err e0 = {0};
    cr_expect_eq(config_parse_json(&c0, "{\"a\": \"\\ud800\"}", "c.json", &e0), MR_EFORMAT);
    cr_expect_str_eq(e0.msg, "c.json:1:8: malformed JSON: unexpected character '\\'");
    /* The object and 999 arrays are the 1000 levels cJSON allows; the 1000th "[" (column 1006) is one too many. */
    char deep[1100] = "{\"a\": ";
    memset(deep + 6, '[', 1001);
    deep[1007] = '\0';
    cr_expect_eq(config_parse_json(&c0, deep, "c.json", &e0), MR_EFORMAT);
    cr_expect_str_eq(e0.msg, "c.json:1:1006: malformed JSON: unexpected character '[' (expected at most 1000 levels "
                             "of nesting)");
    /* NULL source name: "config.json". */
    model_config c;
    mr_err e = {0};
    cr_expect_eq(config_parse_json(&c, "{}", NULL, &e), MR_EFORMAT);
    cr_expect_str_eq(e.msg, "config.json: model_type: required field is missing");
}

Test(config, validate_struct_built_by_hand) {
    model_config c;
    mr_err e = {0};
    config_tiny(&c);
    c.model_type = (config_model_type)7;
    cr_expect_eq(config_validate(&c, "x", &e), MR_EINVAL);
    cr_expect_str_eq(e.msg, "x: model_type: unknown value 7");
    config_tiny(&c);
    c.rope_scaling.type = CONFIG_ROPE_YARN;
    c.rope_scaling.factor = 1.0; /* every other YaRN field holds its default */
    cr_expect_eq(config_validate(&c, "x", &e), 0, "%s", e.msg);
    c.rope_scaling.mscale_all_dim = -1;
    cr_expect_eq(config_validate(&c, "x", &e), MR_ERANGE);
    cr_expect_str_eq(e.msg, "x: rope_scaling.mscale_all_dim: expected a number >= 0, got -1");
    config_tiny(&c);
    c.quantization_config.present = true; /* present but empty: the method is checked */
    cr_expect_eq(config_validate(&c, "x", &e), MR_EINVAL);
    cr_expect_str_eq(e.msg, "x: quantization_config.quant_method: expected \"fp8\", got \"\"");
    config_tiny(&c);
    c.n_eos_token_id = 2;
    c.eos_token_id[1] = 2048;
    cr_expect_eq(config_validate(&c, "x", &e), MR_ERANGE);
    cr_expect_str_eq(e.msg, "x: eos_token_id[1]: expected 0..vocab_size-1 (2047), got 2048");
    config_tiny(&c);
    c.topk_method = CONFIG_TOPK_GROUP_LIMITED_GREEDY;
    c.scoring_func = CONFIG_SCORING_SOFTMAX;
    c.num_experts_per_tok = 9;
    cr_expect_eq(config_validate(&c, "x", &e), MR_ERANGE);
    cr_expect_str_eq(e.msg, "x: num_experts_per_tok: expected at most topk_group * n_routed_experts / n_group (2 * 4 "
                            "= 8) for topk_method \"group_limited_greedy\", got 9");
    c.topk_method = CONFIG_TOPK_GREEDY; /* greedy ignores groups: 9 of 16 is fine */
    cr_expect_eq(config_validate(&c, "x", &e), 0, "%s", e.msg);
}

/* ---------------------------------------------------------------------------------------------------------- */
/* Allocation failures: every allocation of parse, write, load and save fails once, in turn. */

Test(config, allocation_failure_injection) {
    char *text = fixture_text("deepseek-v3-671b.json");
    char *dir = tu_tmpdir();
    char *file = tu_path(dir, "config.json");
    cr_assert_eq(tu_write(file, text, (size_t)-1), 0);
    model_config ref;
    load_fixture(&ref, "deepseek-v3-671b.json");

    for (int op = 0; op < 4; op++) {
        long n;
        for (n = 1; n < 5000; n++) {
            model_config c;
            mr_err e = {0};
            char *out = NULL;
            long before = mem_injected_failures();
            mem_fail_after(n);
            int rc = op == 0   ? config_parse_json(&c, text, "v3", &e)
                     : op == 1 ? config_write_json(&ref, &out, &e)
                     : op == 2 ? config_load_file(&c, file, &e)
                               : config_save_file(&ref, dir, &e);
            mem_fail_after(0);
            mem_free(out);
            if (mem_injected_failures() == before) {
                cr_expect_eq(rc, 0, "op %d: %s", op, e.msg);
                break;
            }
            cr_expect_eq(rc, MR_ENOMEM, "op %d, failing allocation %ld: rc %d (%s)", op, n, rc, e.msg);
            cr_expect(strstr(e.msg, "out of memory") != NULL, "op %d n %ld: %s", op, n, e.msg);
        }
        /* The V3 config has ~60 keys, each a cJSON item plus its key string: many allocations to fail. */
        cr_expect(n > (op == 1 || op == 3 ? 2 : 100), "op %d: only %ld allocations", op, n);
        cr_expect(n < 5000, "op %d never completed", op);
        cr_expect_eq(count_entries(dir), 1, "op %d left a temporary file", op);
    }
    cJSON_InitHooks(NULL); /* back to cJSON's own malloc/free */
    tu_rmtree(dir);
    free(dir);
    free(file);
    free(text);
}
