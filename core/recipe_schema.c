/* recipe_schema.c: the fields of a moerl recipe: type, default, range and doc of each (see recipe.h).
 *
 * Names follow docs/GRPO.md §2 and, where it is sensible, TRL / verl (num_generations, beta, mu, top_p,
 * warmup_steps). Units are explicit in the names: prompts_per_step, batch_seqs (sequences),
 * micro_batch_tokens (tokens), so no batch-size word means two things. Cross-field rules that a table cannot
 * say (one-of groups aside) are checked in recipe_resolve, core/recipe.c. The end of the file turns a field into
 * words ("an integer >= 2"), for messages and for the `moerl recipe --schema` reference. */
#include "core/recipe.h"

#include <stdarg.h>
#include <stdio.h>

#include "core/mem.h"

#define END {.key = NULL}
/* Numeric ranges, spelled out once. */
#define GE(lo) .flags = RF_MIN, .min = (lo)
#define GT(lo) .flags = RF_MIN | RF_MIN_EXCL, .min = (lo)
#define IN(lo, hi) .flags = RF_MIN | RF_MAX, .min = (lo), .max = (hi)

static const char *const device_values[] = {"cpu", "cuda", "cpu-guarded", NULL};
static const char *const precision_values[] = {"fp32", "bf16", NULL};
static const char *const backward_gemm_values[] = {"blas", "det", NULL};
static const char *const preset_values[] = {"tiny", NULL};
static const char *const style_values[] = {"hash", "tags", NULL};
static const char *const task_values[] = {"arithmetic", "countdown", "toolcall", NULL};
static const char *const loss_on_values[] = {"completion", "all", NULL};
static const char *const schedule_values[] = {"cosine", "linear", "constant", NULL};
static const char *const scale_values[] = {"group", "batch", "none", NULL};
static const char *const agg_values[] = {"seq_mean_token_mean", "token_mean", "seq_mean_token_sum_norm", NULL};
static const char *const level_values[] = {"token", "sequence", NULL};
static const char *const kl_values[] = {"k1", "k2", "k3", NULL};
static const char *const overlong_values[] = {"none", "mask", "soft_penalty", NULL};
static const char *const tis_values[] = {"off", "token", "sequence", NULL};
static const char *const extract_values[] = {"auto", "boxed", "answer_tag", "hash", "last_number", NULL};
static const char *const format_values[] = {"think_answer", "answer_tag", "regex", NULL};
static const char *const tool_format_values[] = {"auto", "json", "xml", "yaml", NULL};

static const recipe_field run_fields[] = {
    {"name", RT_STRING, .flags = RF_REQUIRED, .doc = "name of the run in the store"},
    {"seed", RT_INT, .def = "0", GE(0), .doc = "seed of every random stream (data order, init, sampling)"},
    {"store", RT_STRING, .def = "\"runs.db\"", .doc = "SQLite run store: runs, metrics, samples, checkpoints"},
    {"out_dir", RT_STRING, .def = "\"runs\"", .doc = "directory for checkpoints and exported models"},
    {"device", RT_ENUM, .def = "cpu", .values = device_values, .doc = "backend that runs the model (cpu-guarded: the CPU ops on memory host code cannot touch, a check of the GPU code path)"},
    {"precision", RT_ENUM, .def = "fp32", .values = precision_values,
     .doc = "GEMM precision: fp32, or bf16 inputs with fp32 accumulation for the fast GEMMs (the backward's, and "
            "the forward's with deterministic false; device cuda only). Weights, gradients and AdamW state stay fp32"},
    {"threads", RT_INT, .def = "0", GE(0), .doc = "CPU threads (0 = all cores)"},
    {"deterministic", RT_BOOL, .def = "true",
     .doc = "batch-invariant kernels with a fixed reduction order (rollout and trainer log-probs agree bit for bit)"},
    {"backward_gemm", RT_ENUM, .def = "blas", .values = backward_gemm_values,
     .doc = "GEMMs of the backward pass: blas (OpenBLAS: the same bits at the same thread count) or det (moerl's "
            "fixed-order kernels: the same bits at any thread count, ~1.6x slower training)"},
    {"log_every", RT_INT, .def = "10", GE(1), .doc = "steps between progress lines (metrics are stored every step)"},
    {"checkpoint_every", RT_INT, .def = "0", GE(0), .doc = "steps between checkpoints (0 = only at the end)"},
    {"keep_checkpoints", RT_INT, .def = "3", GE(0), .doc = "checkpoints kept, newest first (0 = keep all)"},
    END,
};

/* Size fields of MODEL-SPEC §1 (HF config.json names) that a recipe may change on a preset or config. */
static const recipe_field override_fields[] = {
    {"vocab_size", RT_INT, GE(1), .doc = "vocabulary size (normally the tokenizer's)"},
    {"hidden_size", RT_INT, GE(1), .doc = "model width d"},
    {"num_hidden_layers", RT_INT, GE(1), .doc = "transformer blocks"},
    {"intermediate_size", RT_INT, GE(1), .doc = "dense SwiGLU width"},
    {"moe_intermediate_size", RT_INT, GE(1), .doc = "width of one routed or shared expert"},
    {"first_k_dense_replace", RT_INT, GE(0), .doc = "leading blocks with a dense FFN instead of MoE"},
    {"n_routed_experts", RT_INT, GE(1), .doc = "routed experts per MoE layer"},
    {"num_experts_per_tok", RT_INT, GE(1), .doc = "experts chosen per token (top-k)"},
    {"n_shared_experts", RT_INT, GE(0), .doc = "always-on shared experts"},
    {"n_group", RT_INT, GE(1), .doc = "expert groups for group-limited routing"},
    {"topk_group", RT_INT, GE(1), .doc = "groups kept per token"},
    {"num_attention_heads", RT_INT, GE(1), .doc = "attention heads"},
    {"q_lora_rank", RT_INT, GE(0), .doc = "query low-rank dimension (0 = no query compression)"},
    {"kv_lora_rank", RT_INT, GE(1), .doc = "MLA latent dimension (the KV cache per token and layer)"},
    {"qk_nope_head_dim", RT_INT, GE(1), .doc = "per-head query/key dimension without RoPE"},
    {"qk_rope_head_dim", RT_INT, GE(1), .doc = "per-head decoupled RoPE dimension"},
    {"v_head_dim", RT_INT, GE(1), .doc = "per-head value dimension"},
    {"num_nextn_predict_layers", RT_INT, GE(0), .doc = "MTP depth (0 = no MTP module)"},
    {"max_position_embeddings", RT_INT, GE(1), .doc = "longest position the RoPE tables cover"},
    END,
};

static const recipe_field model_fields[] = {
    {"config", RT_STRING, .flags = RF_ONEOF, .doc = "HF config.json of a model trained from scratch"},
    {"preset", RT_ENUM, .flags = RF_ONEOF, .values = preset_values,
     .doc = "built-in config (tiny: the quickstart MoE, 4 layers, d = 256, 16 experts top-2 + 1 shared, MTP 1)"},
    {"checkpoint", RT_STRING, .flags = RF_ONEOF, .doc = "HF-format checkpoint directory to start from"},
    {"overrides", RT_OBJECT, .fields = override_fields,
     .doc = "size fields replacing the preset's or config's (not allowed with a checkpoint)"},
    {"init_std", RT_FLOAT, .def = "0.006", GT(0),
     .doc = "std of the normal init of a model trained from scratch (DeepSeek-V3: 0.006; norm gains are 1)"},
    END,
};

static const recipe_field tok_train_fields[] = {
    {"vocab_size", RT_INT, .def = "2048", IN(257, 1 << 22), .doc = "vocabulary size, 256 bytes and specials included"},
    {"corpus", RT_LIST, .item = RT_STRING, .def = "[]",
     .doc = "text files to train on ([] = the recipe's training data)"},
    {"split_digits", RT_BOOL, .def = "false",
     .doc = "every digit its own pre-token instead of runs of up to 3 (small models learning arithmetic)"},
    END,
};

static const recipe_field tokenizer_fields[] = {
    {"path", RT_STRING, .flags = RF_ONEOF, .doc = "directory with tokenizer.json (default: the model checkpoint's)"},
    {"train", RT_OBJECT, .flags = RF_ONEOF, .fields = tok_train_fields,
     .doc = "train a byte-level BPE tokenizer before the job"},
    END,
};

static const recipe_field generator_fields[] = {
    {"task", RT_ENUM, .flags = RF_REQUIRED, .values = task_values, .doc = "generated task (as `moerl data gen TASK`)"},
    {"n", RT_INT, .def = "10000", GE(1), .doc = "training rows to generate"},
    {"difficulty", RT_INT, .def = "0", IN(0, 6),
     .doc = "difficulty level (0 = the task's default; arithmetic 1-5, countdown 2-6, toolcall 1-3)"},
    {"style", RT_ENUM, .def = "hash", .values = style_values,
     .doc = "final-answer format of generated completions: hash (\"... #### 42\") or tags (<think>..</think> <answer>42</answer>)"},
    END,
};

static const recipe_field data_fields[] = {
    {"train", RT_STRING, .flags = RF_ONEOF, .doc = "JSONL rows {prompt, completion} or {messages}"},
    {"generator", RT_OBJECT, .flags = RF_ONEOF, .fields = generator_fields,
     .doc = "generate the rows from run.seed instead of reading a file"},
    {"eval", RT_STRING, .doc = "held-out JSONL (unset: the last eval_n rows, or eval_n freshly generated rows)"},
    {"eval_n", RT_INT, .def = "256", GE(0), .doc = "held-out rows for eval/loss and eval/exact_match (0 = no eval)"},
    {"template", RT_STRING,
     .doc = "prompt template with a {prompt} placeholder (unset: the tokenizer's chat format)"},
    {"packing", RT_BOOL, .def = "true",
     .doc = "pack several rows per sequence, positions and attention reset at boundaries (false: pad)"},
    {"loss_on", RT_ENUM, .def = "completion", .values = loss_on_values, .doc = "tokens that carry the SFT loss"},
    {"max_seq_len", RT_INT, .def = "512", IN(8, 1 << 20), .doc = "tokens per training sequence"},
    END,
};

static const recipe_field optim_fields[] = {
    {"lr", RT_FLOAT, .def = "0.0003", GT(0), .doc = "peak learning rate (AdamW)"},
    {"betas", RT_LIST, .item = RT_FLOAT, .def = "[0.9, 0.95]", .flags = RF_MIN | RF_MAX | RF_MAX_EXCL, .min = 0,
     .max = 1, .min_items = 2, .max_items = 2, .doc = "AdamW beta1, beta2"},
    {"eps", RT_FLOAT, .def = "1e-08", GT(0), .doc = "AdamW epsilon"},
    {"weight_decay", RT_FLOAT, .def = "0.1", GE(0), .doc = "decoupled weight decay (never on norms and biases)"},
    {"grad_clip", RT_FLOAT, .def = "1.0", GE(0), .doc = "global gradient-norm clip (0 = off)"},
    {"schedule", RT_ENUM, .def = "cosine", .values = schedule_values, .doc = "learning-rate decay after warmup"},
    {"warmup_steps", RT_INT, .def = "10", GE(0), .doc = "linear warmup from 0 to lr, in optimizer steps"},
    {"min_lr_ratio", RT_FLOAT, .def = "0.1", IN(0, 1), .doc = "final lr as a fraction of lr (cosine, linear)"},
    END,
};

static const recipe_field sft_fields[] = {
    {"steps", RT_INT, .flags = RF_ONEOF | RF_MIN, .min = 1, .doc = "optimizer steps (set steps or epochs)"},
    {"epochs", RT_FLOAT, .flags = RF_ONEOF | RF_MIN | RF_MIN_EXCL, .min = 0, .doc = "passes over the training data"},
    {"batch_seqs", RT_INT, .def = "16", GE(1), .doc = "sequences per optimizer step, all micro-batches and ranks"},
    {"micro_batch_tokens", RT_INT, .def = "4096", GE(1),
     .doc = "most tokens in one micro-batch (memory bound; >= data.max_seq_len)"},
    {"grad_accum", RT_INT, .def = "1", GE(1), .doc = "micro-batches per optimizer step (divides batch_seqs)"},
    {"mtp_weight", RT_FLOAT, .def = "0.3", GE(0), .doc = "MTP loss weight lambda"},
    {"balance_alpha", RT_FLOAT, .def = "0.0001", GE(0), .doc = "sequence-wise balance loss weight alpha"},
    {"bias_update_speed", RT_FLOAT, .def = "0.001", GE(0),
     .doc = "aux-loss-free router bias update gamma, once per optimizer step"},
    {"eval_every", RT_INT, .def = "100", GE(0), .doc = "steps between evals (0 = only at the end)"},
    END,
};

static const recipe_field rollout_fields[] = {
    {"temperature", RT_FLOAT, .def = "1.0", GE(0), .doc = "sampling temperature (0 = greedy)"},
    {"top_p", RT_FLOAT, .def = "1.0", .flags = RF_MIN | RF_MIN_EXCL | RF_MAX, .min = 0, .max = 1,
     .doc = "nucleus sampling mass (1 = off)"},
    {"top_k", RT_INT, .def = "0", GE(0), .doc = "keep the k most likely tokens (0 = off)"},
    {"min_p", RT_FLOAT, .def = "0.0", .flags = RF_MIN | RF_MAX | RF_MAX_EXCL, .min = 0, .max = 1,
     .doc = "drop tokens below min_p times the top probability (0 = off)"},
    {"max_new_tokens", RT_INT, .def = "256", GE(1),
     .doc = "completion length cap (GRPO.md's max_completion_tokens; TRL's max_completion_length)"},
    {"stop", RT_LIST, .item = RT_STRING, .def = "[]", .doc = "strings that end a completion (EOS always does)"},
    {"mtp_speculative", RT_BOOL, .def = "false", .doc = "draft one token with the MTP module, verify with the model"},
    END,
};

static const recipe_field dynsamp_fields[] = {
    {"enabled", RT_BOOL, .def = "false", .flags = RF_SHORTHAND,
     .doc = "drop groups whose rewards are all equal and draw more prompts (DAPO)"},
    {"max_extra_rounds", RT_INT, .def = "3", GE(0), .doc = "extra rounds of prompts drawn to fill a step"},
    END,
};

static const recipe_field overlong_fields[] = {
    {"mode", RT_ENUM, .def = "none", .flags = RF_SHORTHAND, .values = overlong_values,
     .doc = "truncated completions: keep (none), mask from the loss, or DAPO's soft length penalty"},
    {"buffer", RT_INT, .def = "64", GE(1),
     .doc = "soft_penalty: tokens before rollout.max_new_tokens where the penalty ramps from 0 to -1"},
    END,
};

static const recipe_field tis_fields[] = {
    {"mode", RT_ENUM, .def = "off", .flags = RF_SHORTHAND, .values = tis_values,
     .doc = "truncated importance sampling for rollout/trainer log-prob mismatch"},
    {"cap", RT_FLOAT, .def = "2.0", GE(1), .doc = "cap C of the importance weight"},
    END,
};

static const recipe_field grpo_fields[] = {
    {"steps", RT_INT, .def = "100", GE(1), .doc = "GRPO steps (one rollout each)"},
    {"num_generations", RT_INT, .def = "8", GE(2), .doc = "completions per prompt G (8-16 is usual)"},
    {"prompts_per_step", RT_INT, .def = "16", GE(1), .doc = "prompts P per step, all ranks (P*G samples)"},
    {"mini_batches_per_step", RT_INT, .def = "1", GE(1),
     .doc = "optimizer updates per policy iteration; each takes P*G/mini_batches_per_step samples"},
    {"micro_batch_tokens", RT_INT, .def = "4096", GE(1), .doc = "most tokens in one forward/backward micro-batch"},
    {"mu", RT_INT, .def = "1", GE(1), .doc = "policy iterations over each rollout (TRL's num_iterations)"},
    {"lr", RT_FLOAT, GT(0), .doc = "learning rate of the GRPO job (unset: optim.lr)"},
    {"schedule", RT_ENUM, .values = schedule_values, .doc = "lr schedule of the GRPO job (unset: optim.schedule)"},
    {"warmup_steps", RT_INT, GE(0), .doc = "lr warmup of the GRPO job in optimizer steps (unset: optim.warmup_steps)"},
    {"init_from", RT_STRING, .doc = "checkpoint the policy and reference start from (unset: the model section)"},
    {"scale_rewards", RT_ENUM, .def = "group", .values = scale_values,
     .doc = "advantage divisor: group std (GRPO), batch std, or none (Dr. GRPO)"},
    {"loss_agg", RT_ENUM, .def = "token_mean", .values = agg_values,
     .doc = "loss aggregation over the whole step (GRPO.md §2)"},
    {"eps_low", RT_FLOAT, .def = "0.2", .flags = RF_MIN | RF_MIN_EXCL | RF_MAX | RF_MAX_EXCL, .min = 0, .max = 1,
     .doc = "lower clip: ratio >= 1 - eps_low (GSPO with ratio_level sequence: ~3e-4)"},
    {"eps_high", RT_FLOAT, .def = "0.28", GT(0),
     .doc = "upper clip: ratio <= 1 + eps_high (0.28 = DAPO clip-higher; 0.2 = symmetric GRPO)"},
    {"dual_clip", RT_FLOAT, .def = "0.0", GE(0), .doc = "dual clip c > 1: for A < 0 the loss is capped at -c*A (0 = off)"},
    {"ratio_level", RT_ENUM, .def = "token", .values = level_values,
     .doc = "importance ratio per token, or per sequence (GSPO)"},
    {"beta", RT_FLOAT, .def = "0.0", GE(0), .doc = "KL weight to the frozen reference (0 = no reference model)"},
    {"kl_estimator", RT_ENUM, .def = "k3", .values = kl_values, .doc = "KL estimator (k3 as in DeepSeekMath)"},
    {"entropy_coef", RT_FLOAT, .def = "0.0", GE(0), .doc = "entropy bonus weight (entropy is always logged)"},
    {"routing_replay", RT_BOOL, .def = "false",
     .doc = "reuse the rollout's experts in the policy forward (R3; steadies GRPO on MoE)"},
    {"dynamic_sampling", RT_OBJECT, .fields = dynsamp_fields, .doc = "DAPO dynamic sampling"},
    {"overlong", RT_OBJECT, .fields = overlong_fields, .doc = "handling of completions cut at max_new_tokens"},
    {"tis", RT_OBJECT, .fields = tis_fields, .doc = "mismatch correction (truncated importance sampling)"},
    {"eval_every", RT_INT, .def = "10", GE(0), .doc = "steps between evals (0 = only at the end)"},
    {"bias_update_speed", RT_FLOAT, .def = "0.001", GE(0),
     .doc = "aux-loss-free router bias update gamma, once per optimizer step"},
    {"balance_alpha", RT_FLOAT, .def = "0.0", GE(0),
     .doc = "sequence-wise balance loss weight alpha in the policy loss, per micro-batch (logged as moe/balance_loss)"},
    END,
};

static const recipe_field math_fields[] = {
    {"extract", RT_ENUM, .def = "auto", .values = extract_values,
     .doc = "where the final answer is: \\boxed{}, <answer>, ####, the last number, or auto (in that order)"},
    {"answer_field", RT_STRING, .def = "\"answer\"", .doc = "dataset field holding the reference answer"},
    {"tolerance", RT_FLOAT, .def = "0.0", GE(0), .doc = "relative tolerance for numeric answers (0 = exact)"},
    END,
};

static const recipe_field code_fields[] = {
    {"all_or_nothing", RT_BOOL, .def = "false", .doc = "score 1 only when every test passes (false: fraction passed)"},
    {"memory_mb", RT_INT, .def = "512", GE(1), .doc = "address-space limit of the program"},
    {"max_output_kb", RT_INT, .def = "64", GE(1), .doc = "captured output per test"},
    {"workers", RT_INT, .def = "0", GE(0), .doc = "sandboxed processes at once (0 = all cores)"},
    END,
};

static const recipe_field format_fields[] = {
    {"style", RT_ENUM, .def = "think_answer", .values = format_values,
     .doc = "think_answer: <think>..</think><answer>..</answer> (R1); answer_tag; regex: match pattern"},
    {"pattern", RT_STRING, .doc = "PCRE2 pattern the whole completion must match (style regex)"},
    END,
};

static const recipe_field lua_fields[] = {
    {"script", RT_STRING, .flags = RF_REQUIRED | RF_SHORTHAND, .doc = "Lua file defining reward(sample)"},
    {"instructions", RT_INT, .def = "10000000", GE(1000), .doc = "VM instruction budget per call"},
    {"memory_mb", RT_INT, .def = "64", GE(1), .doc = "memory cap of the Lua state"},
    END,
};

static const recipe_field judge_fields[] = {
    {"endpoint", RT_STRING, .flags = RF_ONEOF, .doc = "OpenAI-compatible chat-completions URL"},
    {"model", RT_STRING, .flags = RF_ONEOF, .doc = "local checkpoint directory run by the rollout engine"},
    {"api_model", RT_STRING, .def = "\"\"", .doc = "model name sent to the endpoint"},
    {"api_key_env", RT_STRING, .def = "\"OPENAI_API_KEY\"", .doc = "environment variable holding the API key"},
    {"prompt_template", RT_STRING, .doc = "judge prompt with {prompt}, {completion}, {answer} (unset: built in)"},
    {"fallback_only", RT_BOOL, .def = "true", .doc = "ask only when the rule plugins return unscorable"},
    END,
};

static const recipe_field toolcall_fields[] = {
    {"format", RT_ENUM, .def = "auto", .values = tool_format_values, .doc = "how the call is written"},
    {"expected_field", RT_STRING, .def = "\"expected\"", .doc = "dataset field holding the expected call"},
    END,
};

static const recipe_field reward_fields[] = {
    {"math", RT_OBJECT, .flags = RF_ONEOF, .fields = math_fields, .doc = "final-answer check against the row's answer"},
    {"code", RT_OBJECT, .flags = RF_ONEOF, .fields = code_fields, .doc = "run the program against the row's tests"},
    {"format", RT_OBJECT, .flags = RF_ONEOF, .fields = format_fields, .doc = "structure of the completion"},
    {"lua", RT_OBJECT, .flags = RF_ONEOF, .fields = lua_fields, .doc = "sandboxed Lua script (`lua: path.lua`)"},
    {"judge", RT_OBJECT, .flags = RF_ONEOF | RF_ONEOF_REQ, .fields = judge_fields, .doc = "LLM judge"},
    {"toolcall", RT_OBJECT, .flags = RF_ONEOF, .fields = toolcall_fields,
     .doc = "tool call vs the expected call (1 exact, 0.8 equivalent, 0.3 right tool, 0 none)"},
    {"weight", RT_FLOAT, .def = "1.0", .doc = "weight in the summed reward"},
    {"name", RT_STRING, .doc = "metric name reward/<name> (unset: the kind); unique"},
    {"timeout_s", RT_FLOAT, .def = "10.0", GT(0), .doc = "wall-clock limit of one call, enforced from outside"},
    END,
};

/* RF_ONEOF_REQ on an object (or list of objects) makes its children's one-of group "exactly one" instead of
 * "at most one" (judge above: endpoint or model; rewards below: the plugin kind). */
const recipe_field recipe_schema[] = {
    {"run", RT_OBJECT, .fields = run_fields, .doc = "the run: name, seed, store, device"},
    {"model", RT_OBJECT, .fields = model_fields, .flags = RF_ONEOF_REQ,
     .doc = "where the model comes from: config, preset or checkpoint (exactly one)"},
    {"tokenizer", RT_OBJECT, .fields = tokenizer_fields, .doc = "tokenizer path, or train one"},
    {"data", RT_OBJECT, .fields = data_fields, .flags = RF_ONEOF_REQ,
     .doc = "training data: train file or generator (exactly one)"},
    {"optim", RT_OBJECT, .fields = optim_fields, .doc = "AdamW and the learning-rate schedule"},
    {"sft", RT_OBJECT, .fields = sft_fields, .doc = "supervised fine-tuning (moerl sft)"},
    {"rollout", RT_OBJECT, .fields = rollout_fields, .doc = "sampling (GRPO rollouts, moerl generate, moerl eval)"},
    {"grpo", RT_OBJECT, .fields = grpo_fields, .doc = "the RL trainer (moerl grpo; docs/GRPO.md)"},
    {"rewards", RT_OBJLIST, .fields = reward_fields, .def = "[]", .flags = RF_ONEOF_REQ,
     .doc = "reward plugins, each with exactly one kind key (math, code, format, lua, judge, toolcall) and a weight"},
    END,
};

/* ---- descriptions and the reference ---------------------------------------------------------------- */

static void range_text(char *buf, size_t cap, const recipe_field *f) {
    buf[0] = '\0';
    if ((f->flags & (RF_MIN | RF_MAX)) == (RF_MIN | RF_MAX) && !(f->flags & (RF_MIN_EXCL | RF_MAX_EXCL))) {
        snprintf(buf, cap, " between %.15g and %.15g", f->min, f->max);
        return;
    }
    size_t k = 0;
    if (f->flags & RF_MIN)
        k = (size_t)snprintf(buf, cap, " %s %.15g", (f->flags & RF_MIN_EXCL) ? ">" : ">=", f->min);
    if ((f->flags & RF_MAX) && k < cap)
        snprintf(buf + k, cap - k, "%s %s %.15g", k ? " and" : "", (f->flags & RF_MAX_EXCL) ? "<" : "<=", f->max);
}

static void join_values(char *buf, size_t cap, const char *const *values, const char *sep) {
    size_t k = 0;
    buf[0] = '\0';
    for (size_t i = 0; values[i] && k < cap; i++)
        k += (size_t)snprintf(buf + k, cap - k, "%s%s", i ? sep : "", values[i]);
}

void recipe_field_describe(const recipe_field *f, int item, char *buf, size_t cap) {
    char range[128], vals[512];
    range_text(range, sizeof range, f);
    switch (!item ? f->type : f->type == RT_LIST ? f->item : RT_OBJECT) {
    case RT_INT: snprintf(buf, cap, "an integer%s", range); break;
    case RT_FLOAT: snprintf(buf, cap, "a number%s", range); break;
    case RT_BOOL: snprintf(buf, cap, "true or false"); break;
    case RT_STRING: snprintf(buf, cap, "a string"); break;
    case RT_ENUM:
        join_values(vals, sizeof vals, f->values, ", ");
        snprintf(buf, cap, "one of %s", vals);
        break;
    case RT_LIST: {
        static const char *const nouns[] = {"integers", "numbers", "true/false values", "strings", "values"};
        const char *noun = f->item <= RT_ENUM ? nouns[f->item] : "values";
        char count[64] = "";
        if (f->max_items && f->min_items == f->max_items) snprintf(count, sizeof count, "%zu ", f->min_items);
        else if (f->min_items) snprintf(count, sizeof count, "at least %zu ", f->min_items);
        else if (f->max_items) snprintf(count, sizeof count, "at most %zu ", f->max_items);
        if (f->item == RT_ENUM) {
            join_values(vals, sizeof vals, f->values, ", ");
            snprintf(buf, cap, "a list of %svalues from %s", count, vals);
        } else {
            snprintf(buf, cap, "a list of %s%s%s", count, noun, range);
        }
        break;
    }
    case RT_OBJECT: {
        const char *sh = NULL;
        for (size_t i = 0; f->fields[i].key; i++)
            if (f->fields[i].flags & RF_SHORTHAND) sh = f->fields[i].key;
        if (sh && !item) snprintf(buf, cap, "a mapping (or a value for its %s)", sh);
        else snprintf(buf, cap, "a mapping");
        break;
    }
    case RT_OBJLIST: snprintf(buf, cap, "a list of mappings"); break;
    }
}

/* A growable text for the reference (the one allocator: mem_*). */
typedef struct {
    char *s;
    size_t n, cap;
    int oom;
} docbuf;

static void doc_printf(docbuf *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void doc_printf(docbuf *b, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    int k = vsnprintf(NULL, 0, fmt, ap);
    va_end(ap);
    size_t need;
    if (b->oom || k < 0 || size_add(b->n, (size_t)k + 1, &need)) {
        b->oom = 1;
        return;
    }
    if (need > b->cap) {
        size_t cap = b->cap ? b->cap : 4096;
        while (cap < need) cap *= 2;
        char *p = mem_realloc(b->s, cap);
        if (!p) {
            b->oom = 1;
            return;
        }
        b->s = p;
        b->cap = cap;
    }
    va_start(ap, fmt);
    vsnprintf(b->s + b->n, b->cap - b->n, fmt, ap);
    va_end(ap);
    b->n += (size_t)k;
}


static void doc_fields(docbuf *b, const recipe_field *parent, const char *prefix) {
    const recipe_field *fs = parent->fields;
    char members[256];
    size_t km = 0;
    members[0] = '\0';
    for (size_t i = 0; fs[i].key; i++)
        if (fs[i].flags & RF_ONEOF)
            km += (size_t)snprintf(members + km, km < sizeof members ? sizeof members - km : 0, "%s%s",
                                   km ? ", " : "", fs[i].key);
    for (size_t i = 0; fs[i].key; i++) {
        const recipe_field *f = &fs[i];
        char path[256], want[640];
        snprintf(path, sizeof path, "%s%s", prefix, f->key);
        recipe_field_describe(f, 0, want, sizeof want);
        doc_printf(b, "%s: %s", path, want);
        if (f->flags & RF_ONEOF)
            doc_printf(b, " (%s one of %s)", (parent->flags & RF_ONEOF_REQ) ? "exactly" : "at most", members);
        if (f->def) doc_printf(b, "; default %s", f->def);
        else if (f->flags & RF_REQUIRED) doc_printf(b, "%s", "; required");
        else if (f->type != RT_OBJECT) doc_printf(b, "%s", "; optional");
        doc_printf(b, "\n    %s\n", f->doc);
        if (f->type == RT_OBJECT || f->type == RT_OBJLIST) {
            char sub[sizeof path + 4];
            snprintf(sub, sizeof sub, "%s%s", path, f->type == RT_OBJLIST ? "[]." : ".");
            doc_fields(b, f, sub);
        }
    }
}

int recipe_schema_doc(char **out) {
    docbuf b = {0};
    *out = NULL;
    doc_printf(&b, "%s", "moerl recipe fields (dotted.path: type and range; default)\n    what it does\n\n");
    static const recipe_field root = {.key = "", .type = RT_OBJECT, .fields = recipe_schema};
    doc_fields(&b, &root, "");
    if (b.oom) {
        mem_free(b.s);
        return MR_ENOMEM;
    }
    *out = b.s;
    return 0;
}
