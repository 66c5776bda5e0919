/* cmd_grpo.c: `moerl grpo RECIPE.yaml [--set k=v ...] [--resume]`: the RL trainer (grpo/trainer.h). */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli/cli.h"
#include "core/mem.h"
#include "core/recipe.h"
#include "grpo/trainer.h"

int cmd_grpo(int argc, char **argv) {
    if (cli_wants_help(argc, argv)) {
        printf("usage: moerl grpo RECIPE.yaml [--set section.key=value ...] [--resume] [--stop-after N]\n\n"
               "GRPO from a recipe (docs/GRPO.md): each step draws grpo.prompts_per_step prompts, samples\n"
               "grpo.num_generations completions of each (rollout.*), scores them with the rewards: plugins, and\n"
               "runs grpo.mu policy iterations of grpo.mini_batches_per_step AdamW updates on the clipped loss.\n"
               "The policy starts from grpo.init_from (a `moerl sft` checkpoint) or the model section. Metrics go\n"
               "to run.store every step, completions to its samples table, checkpoints to run.out_dir/step-N.\n"
               "The derived batch sizes are printed first; inconsistent recipes are refused before any work.\n"
               "  --resume        continue bit-exactly from the newest checkpoint in run.out_dir\n"
               "  --stop-after N  return after N steps of this invocation (testing kill-and-resume)\n");
        return 0;
    }
    const char *path = NULL;
    int resume = 0, nset = 0;
    long long stop_after = 0;
    const char **sets = mem_calloc((size_t)argc, sizeof *sets);
    if (!sets) return 1;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--set") && i + 1 < argc) sets[nset++] = argv[++i];
        else if (!strncmp(argv[i], "--set=", 6)) sets[nset++] = argv[i] + 6;
        else if (!strcmp(argv[i], "--resume")) resume = 1;
        else if (!strcmp(argv[i], "--stop-after") && i + 1 < argc) {
            char *end;
            stop_after = strtoll(argv[++i], &end, 10);
            if (*end || stop_after < 1) {
                fprintf(stderr, "moerl grpo: --stop-after expects a positive integer, got '%s'\n", argv[i]);
                mem_free(sets);
                return 2;
            }
        } else if (argv[i][0] == '-' || path) {
            fprintf(stderr, "moerl grpo: unexpected argument '%s' (see moerl grpo --help)\n", argv[i]);
            mem_free(sets);
            return 2;
        } else path = argv[i];
    }
    if (!path) {
        fprintf(stderr, "moerl grpo: missing RECIPE.yaml (see moerl grpo --help)\n");
        mem_free(sets);
        return 2;
    }
    mr_err e = {0};
    recipe *r = NULL;
    char *yaml = NULL;
    int status = 1;
    grpo_cfg c;
    char desc[1024];
    if (recipe_load(&r, path, &e)) goto fail;
    for (int i = 0; i < nset; i++)
        if (recipe_set(r, sets[i], &e)) goto fail;
    if (recipe_resolve(r, &e) || recipe_dump_yaml(r, &yaml)) goto fail;
    if (grpo_cfg_from_recipe(&c, r, &e)) goto fail;
    printf("# resolved recipe (%s)\n%s\n", path, yaml);
    grpo_cfg_describe(&c, desc, sizeof desc);
    printf("%s", desc);
    fflush(stdout);
    if (grpo_run(r, resume, stop_after, &e)) goto fail;
    status = 0;
    goto done;
fail:
    fprintf(stderr, "moerl grpo: %s\n", e.msg);
done:
    mem_free(yaml);
    mem_free(sets);
    recipe_free(r);
    return status;
}
