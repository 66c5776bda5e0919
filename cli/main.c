/* main.c: the moerl binary. A table of subcommands; the only place in moerl that exits. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "cli/cli.h"
#include "kernels/backend.h"

typedef struct {
    const char *name;
    int (*run)(int argc, char **argv);
    const char *summary;
} command;

static const command commands[] = {
    {"run", cmd_run, "the recipe's whole pipeline: SFT, then GRPO from its checkpoint, then a before/after table"},
    {"sft", cmd_sft, "supervised fine-tuning from a recipe (--resume continues bit-exactly)"},
    {"grpo", cmd_grpo, "GRPO reinforcement learning from a recipe (--resume continues bit-exactly)"},
    {"check", cmd_check, "resolve a recipe, validate its model config, and record the run in the store"},
    {"recipe", cmd_recipe, "print the resolved recipe (defaults, --set overrides) or report its errors"},
    {"inspect", cmd_inspect, "list the tensors of a safetensors checkpoint or validate a config.json"},
    {"runs", cmd_runs, "list, show and export runs from the run store (runs.db)"},
    {"init-model", cmd_init_model, "write a model initialized from scratch (config.json + safetensors)"},
    {"info", cmd_info, "parameter counts and KV-cache bytes per token of a model or config"},
    {"generate", cmd_generate, "sample completions of a prompt from a checkpoint (latent KV cache), streamed"},
    {"eval", cmd_eval, "pass@1, pass@k and maj@k of a recipe's held-out prompts (rollout + reward plugins)"},
    {"logits", cmd_logits, "float32 logits of a token sequence, for checking against other implementations"},
    {"bench", cmd_bench, "benchmarks (model forward/backward throughput against baselines)"},
    {"score", cmd_score, "score samples.jsonl rows with a recipe's reward plugins, one JSON line per row"},
    {"tokenize", cmd_tokenize, "encode stdin lines to token ids (or --decode ids to text) with a tokenizer.json"},
    {"data", cmd_data, "generate task datasets (arithmetic, countdown, toolcall) or check a JSONL dataset"},
    {"tokenizer", cmd_tokenizer, "train a byte-level BPE tokenizer (DeepSeek-V3 pre-tokenizer) on a corpus"},
};

static void usage(FILE *f) {
    fprintf(f, "moerl %s: post-training (SFT + GRPO) for DeepSeek-V3-style MoE models\n\n", MOERL_VERSION);
    fprintf(f, "usage: moerl COMMAND [ARGS...]\n       moerl COMMAND --help\n\ncommands:\n");
    for (size_t i = 0; i < sizeof commands / sizeof commands[0]; i++)
        fprintf(f, "  %-10s %s\n", commands[i].name, commands[i].summary);
}

/* OpenMP threads wait for each other dozens of times per training step and a hundred times per decoded token.
 * libgomp's default spins for ~300k iterations at each wait, which on a shared or oversubscribed machine (a CI
 * box, a laptop, other ranks) turns every wait into a lost time slice: measured 0.2 steps/s against 1.4 with
 * sleeping waits on a loaded 2-core machine. Sleeping at once (OMP_WAIT_POLICY=passive) costs a futex wake-up
 * per region instead: batch-1 decode ran 30% slower than with spinning. A short spin is the middle: with
 * GOMP_SPINCOUNT=20000 (~10-20 us) `moerl generate` ran 6000 tokens/s against 3970 passive (8000 spinning), and
 * 40 SFT steps beside a busy loop took 31.6 s against 36.7 s passive (unloaded: 18.5 s vs 17.4 s, noise).
 * libgomp reads both only at load time, so when the user has chosen neither we set the spin count and
 * re-execute once. Any value the user sets is kept. */
static void omp_wait_policy_default(char **argv) {
    if (getenv("OMP_WAIT_POLICY") || getenv("GOMP_SPINCOUNT") || getenv("MOERL_NO_REEXEC")) return;
    setenv("GOMP_SPINCOUNT", "20000", 1);
    setenv("MOERL_NO_REEXEC", "1", 1);
    execv("/proc/self/exe", argv); /* returns only on failure: carry on with the default policy */
}

int main(int argc, char **argv) {
    omp_wait_policy_default(argv);
    if (argc < 2) {
        usage(stderr);
        return 2;
    }
    if (!strcmp(argv[1], "-h") || !strcmp(argv[1], "--help") || !strcmp(argv[1], "help")) {
        usage(stdout);
        return 0;
    }
    if (!strcmp(argv[1], "--version") || !strcmp(argv[1], "version")) {
        char info[512];
        backend_describe(info, sizeof info);
        printf("moerl %s\n%s\n", MOERL_VERSION, info);
        return 0;
    }
    for (size_t i = 0; i < sizeof commands / sizeof commands[0]; i++)
        if (!strcmp(argv[1], commands[i].name)) return commands[i].run(argc - 1, argv + 1);
    fprintf(stderr, "moerl: unknown command '%s' (try 'moerl --help')\n", argv[1]);
    return 2;
}
