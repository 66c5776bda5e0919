/* test_params.c: the parameter table, save/load round trips (F32, BF16, sharded), loading errors naming the
 * tensor (missing, wrong shape, wrong dtype, truncated shard, missing FP8 scale), and the model CLI commands. */
#include <criterion/criterion.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/dtype.h"
#include "core/mem.h"
#include "core/safetensors.h"
#include "model/params.h"
#include "tests/testutil.h"

static void small_config(model_config *c) {
    config_tiny(c);
    c->vocab_size = 40;
    c->hidden_size = 16;
    c->intermediate_size = 24;
    c->moe_intermediate_size = 8;
    c->num_hidden_layers = 2;
    c->num_attention_heads = 2;
    c->num_key_value_heads = 2;
    c->q_lora_rank = 8;
    c->kv_lora_rank = 8;
    c->qk_nope_head_dim = 4;
    c->qk_rope_head_dim = 4;
    c->v_head_dim = 4;
    c->n_routed_experts = 4;
    c->num_experts_per_tok = 2;
    c->n_group = 2;
    c->topk_group = 1;
    c->num_nextn_predict_layers = 1;
}

Test(params, table_matches_the_parameter_count) {
    model_config c;
    config_tiny(&c);
    model_params p;
    mr_err e = {0};
    cr_assert_eq(params_init(&p, &c, &e), MR_OK, "%s", e.msg);
    config_params pc;
    cr_assert_eq(config_param_breakdown(&c, &pc), 0);
    /* the table holds the main model + the MTP modules' own tensors (embedding/head shared) */
    cr_expect_eq((uint64_t)p.n, pc.total + pc.mtp_total, "table %zu vs §12 %llu", p.n,
                 (unsigned long long)(pc.total + pc.mtp_total));
    cr_expect_not_null(params_find(&p, "model.layers.3.mlp.experts.15.down_proj.weight"));
    cr_expect_not_null(params_find(&p, "model.layers.4.eh_proj.weight"));
    cr_expect_not_null(params_find(&p, "model.layers.1.mlp.gate.e_score_correction_bias"));
    cr_expect_null(params_find(&p, "model.layers.0.mlp.gate.weight")); /* layer 0 is dense */
    const param_entry *pe = params_find(&p, "model.layers.2.self_attn.kv_a_proj_with_mqa.weight");
    cr_assert_not_null(pe);
    cr_expect_eq(pe->shape[0], c.kv_lora_rank + c.qk_rope_head_dim);
    cr_expect_eq(pe->shape[1], c.hidden_size);
    params_free(&p);
}

Test(params, random_init_is_seeded_and_thread_independent) {
    model_config c;
    small_config(&c);
    model_params a, b;
    mr_err e = {0};
    params_init(&a, &c, &e);
    params_init(&b, &c, &e);
    params_init_random(&a, 5, 0.006f);
    params_init_random(&b, 5, 0.006f);
    cr_expect(memcmp(a.data, b.data, a.n * sizeof(float)) == 0);
    const param_entry *g = params_find(&a, "model.norm.weight");
    cr_expect_eq(params_tensor(&a, g)[3], 1.0f);
    const param_entry *bias = params_find(&a, "model.layers.1.mlp.gate.e_score_correction_bias");
    cr_expect_eq(params_tensor(&a, bias)[0], 0.0f);
    double s = 0, s2 = 0;
    const param_entry *w = params_find(&a, "model.embed_tokens.weight");
    for (size_t i = 0; i < w->numel; i++) {
        s += params_tensor(&a, w)[i];
        s2 += params_tensor(&a, w)[i] * (double)params_tensor(&a, w)[i];
    }
    cr_expect_lt(fabs(sqrt(s2 / w->numel) - 0.006), 0.0006);
    params_init_random(&b, 6, 0.006f);
    cr_expect(memcmp(a.data, b.data, a.n * sizeof(float)) != 0);
    params_free(&a);
    params_free(&b);
}

static void roundtrip(int bf16, size_t shard) {
    char *dir = tu_tmpdir();
    char *ck = tu_path(dir, "ckpt");
    model_config c;
    small_config(&c);
    model_params p, q;
    mr_err e = {0};
    params_init(&p, &c, &e);
    params_init_random(&p, 9, 0.1f);
    cr_assert_eq(params_save(&p, ck, bf16, shard, &e), MR_OK, "%s", e.msg);
    cr_assert_eq(params_load(&q, ck, &e), MR_OK, "%s", e.msg);
    cr_assert_eq(q.n, p.n);
    for (size_t i = 0; i < p.n; i++) {
        float want = p.data[i];
        if (bf16) want = bf16_to_f32(f32_to_bf16(want));
        cr_assert_eq(q.data[i], want, "element %zu", i);
    }
    /* the MTP module carries copies of embed and head under its own names (§9.4) */
    st_model *m;
    cr_assert_eq(st_model_open(&m, ck, &e), MR_OK, "%s", e.msg);
    const st_tensor *t;
    cr_expect_eq(st_model_get(m, "model.layers.2.embed_tokens.weight", &t, &e), MR_OK);
    cr_expect_eq(st_model_get(m, "model.layers.2.shared_head.head.weight", &t, &e), MR_OK);
    cr_expect_eq(st_model_get(m, "model.layers.1.mlp.gate.e_score_correction_bias", &t, &e), MR_OK);
    cr_expect_eq(t->dtype, DT_F32, "the router bias stays F32");
    cr_expect_eq(st_model_is_sharded(m), shard ? 1 : 0);
    st_model_close(m);
    params_free(&p);
    params_free(&q);
    tu_rmtree(dir);
    free(ck);
    free(dir);
}

Test(params, save_load_f32) { roundtrip(0, 0); }
Test(params, save_load_bf16) { roundtrip(1, 0); }
Test(params, save_load_sharded) { roundtrip(0, 20000); }

/* Writes the small model with one tensor replaced (or dropped), then expects params_load's error text. */
static void bad_load(const char *victim, int mode, const char *expect) {
    char *dir = tu_tmpdir();
    model_config c;
    small_config(&c);
    model_params p;
    mr_err e = {0};
    params_init(&p, &c, &e);
    params_init_random(&p, 1, 0.1f);
    cr_assert_eq(config_save_file(&c, dir, &e), MR_OK, "%s", e.msg);
    st_writer *w;
    st_writer_init(&w, &e);
    int32_t ints[4096] = {0};
    for (int i = 0; i < p.n_entries; i++) {
        const param_entry *pe = &p.entries[i];
        if (strcmp(pe->name, victim) != 0) {
            st_writer_add(w, pe->name, DT_F32, pe->ndim, pe->shape, p.data + pe->offset, &e);
            continue;
        }
        if (mode == 1) { /* wrong shape */
            int64_t sh[2] = {pe->shape[0] + 1, pe->shape[1]};
            float *z = calloc((size_t)(sh[0] * (pe->ndim == 2 ? sh[1] : 1)), sizeof(float));
            st_writer_add(w, pe->name, DT_F32, pe->ndim, sh, z, &e);
            cr_assert_eq(st_writer_write(w, tu_path(dir, "model.safetensors"), &e), MR_OK, "%s", e.msg);
            free(z);
            goto written;
        }
        if (mode == 2) st_writer_add(w, pe->name, DT_I32, pe->ndim, pe->shape, ints, &e); /* wrong dtype */
        if (mode == 3) st_writer_add(w, pe->name, DT_F8_E4M3, pe->ndim, pe->shape, ints, &e); /* no scale */
    }
    cr_assert_eq(st_writer_write(w, tu_path(dir, "model.safetensors"), &e), MR_OK, "%s", e.msg);
written:
    st_writer_free(w);
    if (mode == 4) { /* truncate the file */
        char *f = tu_path(dir, "model.safetensors");
        size_t n;
        char *bytes = tu_read(f, &n);
        tu_write(f, bytes, n - 100);
        free(bytes);
        free(f);
    }
    model_params q;
    mr_err e2 = {0};
    cr_assert_neq(params_load(&q, dir, &e2), MR_OK);
    cr_expect(strstr(e2.msg, expect) != NULL, "error \"%s\" lacks \"%s\"", e2.msg, expect);
    params_free(&p);
    tu_rmtree(dir);
    free(dir);
}

Test(params, load_missing_tensor) {
    bad_load("model.layers.1.mlp.experts.3.up_proj.weight", 0,
             "tensor \"model.layers.1.mlp.experts.3.up_proj.weight\" is missing");
}
Test(params, load_wrong_shape) {
    bad_load("model.layers.0.self_attn.kv_b_proj.weight", 1,
             "tensor \"model.layers.0.self_attn.kv_b_proj.weight\": expected shape [16, 8], got [17, 8]");
}
Test(params, load_wrong_dtype) {
    bad_load("model.norm.weight", 2, "tensor \"model.norm.weight\": expected dtype F32, BF16, F16 or F8_E4M3, got I32");
}
Test(params, load_fp8_without_scale) {
    bad_load("lm_head.weight", 3, "\"lm_head.weight\" is F8_E4M3 but its scale \"lm_head.weight_scale_inv\" is missing");
}
Test(params, load_truncated_file) { bad_load("none", 4, "model.safetensors"); }

Test(params, load_truncated_shard_of_golden_fp8) {
    char *dir = tu_tmpdir();
    char cmd[4096];
    snprintf(cmd, sizeof cmd, "cp %s/tests/fixtures/golden/v3_fp8_sharded/* %s/", tu_src(), dir);
    cr_assert_eq(tu_run(cmd, NULL), 0);
    model_params q;
    mr_err e = {0};
    cr_assert_eq(params_load(&q, dir, &e), MR_OK, "%s", e.msg);
    params_free(&q);
    char *shard = tu_path(dir, "model-00002-of-00003.safetensors");
    size_t n;
    char *bytes = tu_read(shard, &n);
    cr_assert_not_null(bytes);
    tu_write(shard, bytes, n / 2);
    free(bytes);
    cr_assert_neq(params_load(&q, dir, &e), MR_OK);
    cr_expect(strstr(e.msg, "model-00002-of-00003.safetensors") != NULL, "error names the shard: %s", e.msg);
    free(shard);
    tu_rmtree(dir);
    free(dir);
}

Test(params, cli_init_model_info_logits) {
    char *dir = tu_tmpdir();
    char cmd[4096], *out;
    snprintf(cmd, sizeof cmd, "%s init-model --preset tiny --out %s/m --seed 3", tu_bin(), dir);
    cr_assert_eq(tu_run(cmd, &out), 0, "%s", out);
    free(out);
    snprintf(cmd, sizeof cmd, "%s info %s/m", tu_bin(), dir);
    cr_assert_eq(tu_run(cmd, &out), 0, "%s", out);
    cr_expect(strstr(out, "total (main model)") && strstr(out, "MLA latent"), "%s", out);
    free(out);
    snprintf(cmd, sizeof cmd, "%s logits --model %s/m --ids '1 2 3 4 5' --out %s/l.f32 --mtp", tu_bin(), dir, dir);
    cr_assert_eq(tu_run(cmd, &out), 0, "%s", out);
    free(out);
    char *lf = tu_path(dir, "l.f32");
    size_t n;
    free(tu_read(lf, &n));
    model_config c;
    config_tiny(&c);
    cr_expect_eq(n, (size_t)(5 + 4) * c.vocab_size * sizeof(float));
    snprintf(cmd, sizeof cmd, "%s logits --model %s/m --ids '1 2 99999' --out %s/l.f32", tu_bin(), dir, dir);
    cr_expect_eq(tu_run(cmd, &out), 1);
    cr_expect(strstr(out, "outside the vocabulary") != NULL, "%s", out);
    free(out);
    snprintf(cmd, sizeof cmd, "%s init-model --preset huge --out %s/x", tu_bin(), dir);
    cr_expect_eq(tu_run(cmd, &out), 2);
    free(out);
    free(lf);
    tu_rmtree(dir);
    free(dir);
}

Test(params, cli_inspect_validates_config) {
    char cmd[4096], *out;
    snprintf(cmd, sizeof cmd, "%s inspect %s/tests/fixtures/golden/v3_full/config.json", tu_bin(), tu_src());
    cr_assert_eq(tu_run(cmd, &out), 0, "%s", out);
    cr_expect(strstr(out, "valid deepseek_v3 config; 159568 parameters") != NULL, "%s", out);
    free(out);
    char *dir = tu_tmpdir();
    snprintf(cmd, sizeof cmd, "cp %s/tests/fixtures/golden/v3_no_qlora/* %s/ && sed -i 's/\"hidden_size\": [0-9]*/\"hidden_size\": \"big\"/' %s/config.json && %s inspect %s",
             tu_src(), dir, dir, tu_bin(), dir);
    cr_expect_eq(tu_run(cmd, &out), 1, "%s", out);
    cr_expect(strstr(out, "hidden_size: expected an integer") != NULL, "%s", out);
    free(out);
    tu_rmtree(dir);
    free(dir);
}

Test(params, swa_option_round_trips_through_config_json) {
    model_config c, d;
    config_tiny(&c);
    mr_err e = {0};
    char *txt;
    cr_assert_eq(config_write_json(&c, &txt, &e), MR_OK, "%s", e.msg);
    cr_expect_null(strstr(txt, "moerl_swa"), "off: not written");
    mem_free(txt);
    c.moerl_swa_window = 128;
    c.moerl_swa_ratio = 8;
    cr_assert_eq(config_write_json(&c, &txt, &e), MR_OK, "%s", e.msg);
    cr_assert_eq(config_parse_json(&d, txt, "x/config.json", &e), MR_OK, "%s", e.msg);
    cr_expect_null(config_diff(&c, &d));
    mem_free(txt);
    c.moerl_swa_ratio = 0;
    cr_expect_neq(config_validate(&c, "x/config.json", &e), MR_OK);
    cr_expect(strstr(e.msg, "moerl_swa_window / moerl_swa_ratio: set both") != NULL, "%s", e.msg);
}
