/* setup.h: turning a recipe's model section into a validated model config (preset, config.json or checkpoint,
 * plus size overrides). Shared by every job (check, sft, grpo, generate). */
#ifndef MOERL_MODEL_SETUP_H
#define MOERL_MODEL_SETUP_H

#include "core/err.h"
#include "core/recipe.h"
#include "model/config.h"

/* Fills c from r's model section and validates it. Errors name the recipe key or the config file. */
int model_config_from_recipe(model_config *c, const recipe *r, mr_err *e);

/* KV-cache bytes per token over all main layers at bytes_per_elem: MLA's latent form (kv_lora_rank +
 * qk_rope_head_dim per layer, MODEL-SPEC §5.7) and, for comparison, full multi-head K and V. */
void model_kv_bytes_per_token(const model_config *c, int bytes_per_elem, uint64_t *latent, uint64_t *full_mha);

#endif
