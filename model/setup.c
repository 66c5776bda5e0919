/* setup.c: see setup.h. */
#include "model/setup.h"

#include <stddef.h>
#include <stdio.h>
#include <string.h>

static const struct {
    const char *key;
    size_t off;
} overrides[] = {
#define O(f) {#f, offsetof(model_config, f)}
    O(vocab_size), O(hidden_size), O(num_hidden_layers), O(intermediate_size), O(moe_intermediate_size),
    O(first_k_dense_replace), O(n_routed_experts), O(num_experts_per_tok), O(n_shared_experts), O(n_group),
    O(topk_group), O(num_attention_heads), O(q_lora_rank), O(kv_lora_rank), O(qk_nope_head_dim),
    O(qk_rope_head_dim), O(v_head_dim), O(num_nextn_predict_layers), O(max_position_embeddings),
#undef O
};

int model_config_from_recipe(model_config *c, const recipe *r, mr_err *e) {
    const char *src = recipe_source(r);
    const char *which = recipe_oneof(r, "model");
    int rc;
    if (!which) return err_set(e, MR_EINVAL, "%s: model: expected one of preset, config or checkpoint", src);
    if (!strcmp(which, "preset")) {
        config_tiny(c);
    } else {
        const char *path = recipe_str(r, !strcmp(which, "config") ? "model.config" : "model.checkpoint");
        rc = config_load_file(c, path, e);
        if (rc) return err_prefix(e, "%s: model.%s", src, which);
    }
    int any = 0;
    for (size_t i = 0; i < sizeof overrides / sizeof overrides[0]; i++) {
        char path[96];
        snprintf(path, sizeof path, "model.overrides.%s", overrides[i].key);
        if (!recipe_is_set(r, path)) continue;
        int64_t v = recipe_int(r, path);
        if (v > 1 << 30) return err_set(e, MR_ERANGE, "%s: %s: expected at most 2^30, got %lld", src, path, (long long)v);
        *(int *)((char *)c + overrides[i].off) = (int)v;
        any = 1;
    }
    /* MLA has one K/V head per query head (MODEL-SPEC §1): follow an overridden head count */
    if (recipe_is_set(r, "model.overrides.num_attention_heads")) c->num_key_value_heads = c->num_attention_heads;
    if (any && !strcmp(which, "checkpoint"))
        return err_set(e, MR_EINVAL, "%s: model.overrides: sizes of a checkpoint cannot be changed", src);
    rc = config_validate(c, "model", e);
    if (rc) return err_prefix(e, "%s", src);
    return MR_OK;
}

void model_kv_bytes_per_token(const model_config *c, int bytes, uint64_t *latent, uint64_t *full_mha) {
    uint64_t L = (uint64_t)c->num_hidden_layers;
    *latent = L * (uint64_t)(c->kv_lora_rank + c->qk_rope_head_dim) * (uint64_t)bytes;
    *full_mha = L * (uint64_t)c->num_attention_heads *
                (uint64_t)(c->qk_nope_head_dim + c->qk_rope_head_dim + c->v_head_dim) * (uint64_t)bytes;
}
