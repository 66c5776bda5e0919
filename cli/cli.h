/* cli.h: the moerl subcommands. Each takes the arguments after its name (argv[0] is the command name),
 * handles its own --help, prints errors as one line "moerl CMD: reason" on stderr, and returns the process
 * exit status: 0 ok, 1 failure, 2 misuse. */
#ifndef MOERL_CLI_H
#define MOERL_CLI_H

int cmd_runs(int argc, char **argv);    /* cli/cmd_runs.c: list / show / export the run store */
int cmd_recipe(int argc, char **argv);  /* cli/cmd_recipe.c: check and print a resolved recipe */
int cmd_inspect(int argc, char **argv); /* cli/cmd_inspect.c: list a safetensors checkpoint, check a config.json */
int cmd_run(int argc, char **argv);     /* cli/cmd_run.c: SFT then GRPO then the before/after table */
int cmd_sft(int argc, char **argv);     /* cli/cmd_sft.c: supervised fine-tuning from a recipe */
int cmd_grpo(int argc, char **argv);    /* cli/cmd_grpo.c: GRPO from a recipe (grpo/trainer.h) */
int cmd_check(int argc, char **argv);   /* cli/cmd_check.c: resolve a recipe, validate its model, log the run */
int cmd_init_model(int argc, char **argv); /* cli/cmd_model.c: a model initialized from scratch */
int cmd_info(int argc, char **argv);       /* cli/cmd_model.c: parameter counts, KV-cache bytes */
int cmd_generate(int argc, char **argv);   /* cli/cmd_generate.c: sample completions with the rollout engine */
int cmd_eval(int argc, char **argv);       /* cli/cmd_eval.c: pass@1, pass@k, maj@k of a recipe's held-out prompts */
int cmd_logits(int argc, char **argv);     /* cli/cmd_model.c: logits of a token sequence (checking) */
int cmd_bench(int argc, char **argv);      /* cli/cmd_bench.c: benchmarks that print figures */
int cmd_score(int argc, char **argv);      /* cli/cmd_score.c: reward plugins on samples.jsonl rows */
int cmd_tokenize(int argc, char **argv);   /* cli/cmd_tokenize.c: text -> ids, one line per line (or --decode) */
int cmd_data(int argc, char **argv);       /* cli/cmd_data.c: generate task datasets, check JSONL datasets */
int cmd_tokenizer(int argc, char **argv);  /* cli/cmd_tokenizer.c: train a byte-level BPE tokenizer */

/* Shared helper: returns 1 when argv holds -h or --help. */
int cli_wants_help(int argc, char **argv);

#endif
