/* cmd_sft.c: `moerl sft RECIPE.yaml [--set k=v ...] [--resume]`. */
#include <stdio.h>
#include <string.h>

#include "cli/cli.h"
#include "core/mem.h"
#include "core/recipe.h"
#include "sft/sft.h"

int cmd_sft(int argc, char **argv) {
    if (cli_wants_help(argc, argv)) {
        printf("usage: moerl sft RECIPE.yaml [--set section.key=value ...] [--resume]\n\n"
               "Supervised fine-tuning from a recipe: data (data.train JSONL or data.generator), tokenizer\n"
               "(tokenizer.path or tokenizer.train), model (model.preset, .config or .checkpoint), AdamW with the\n"
               "optim.* schedule, sft.* batch sizes. Metrics go to run.store every step, checkpoints to\n"
               "run.out_dir/step-N. --resume continues bit-exactly from the newest checkpoint there.\n");
        return 0;
    }
    const char *path = NULL;
    int resume = 0, nset = 0;
    const char **sets = mem_calloc((size_t)argc, sizeof *sets);
    if (!sets) return 1;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--set") && i + 1 < argc) sets[nset++] = argv[++i];
        else if (!strncmp(argv[i], "--set=", 6)) sets[nset++] = argv[i] + 6;
        else if (!strcmp(argv[i], "--resume")) resume = 1;
        else if (argv[i][0] == '-' || path) {
            fprintf(stderr, "moerl sft: unexpected argument '%s' (see moerl sft --help)\n", argv[i]);
            mem_free(sets);
            return 2;
        } else path = argv[i];
    }
    if (!path) {
        fprintf(stderr, "moerl sft: missing RECIPE.yaml (see moerl sft --help)\n");
        mem_free(sets);
        return 2;
    }
    mr_err e = {0};
    recipe *r = NULL;
    char *yaml = NULL;
    int status = 1;
    if (recipe_load(&r, path, &e)) goto fail;
    for (int i = 0; i < nset; i++)
        if (recipe_set(r, sets[i], &e)) goto fail;
    if (recipe_resolve(r, &e) || recipe_dump_yaml(r, &yaml)) goto fail;
    printf("# resolved recipe (%s)\n%s\n", path, yaml);
    fflush(stdout);
    if (sft_run(r, resume, &e)) goto fail;
    status = 0;
    goto done;
fail:
    fprintf(stderr, "moerl sft: %s\n", e.msg);
done:
    mem_free(yaml);
    mem_free(sets);
    recipe_free(r);
    return status;
}
