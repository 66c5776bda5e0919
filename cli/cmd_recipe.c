/* cmd_recipe.c: `moerl recipe FILE.yaml [--set k=v ...]` prints the resolved recipe (what a job would run
 * with, defaults included) or the one error that stops it; `moerl recipe --schema` prints every field. */
#include <stdio.h>
#include <string.h>

#include "cli/cli.h"
#include "core/mem.h"
#include "core/recipe.h"

static void usage(FILE *f) {
    fprintf(f,
            "usage: moerl recipe FILE.yaml [--set section.key=value ...]\n"
            "       moerl recipe --schema\n"
            "\n"
            "Checks a recipe against the schema, applies the --set overrides in order, fills in every default\n"
            "and prints the resolved recipe as YAML (the text stored with each run). On an error prints one\n"
            "line, FILE:LINE:COL: dotted.key: what was expected and what was found, and exits 1.\n"
            "\n"
            "options:\n"
            "  --set KEY=VALUE  override a field: grpo.num_generations=16, rollout.stop=[\"</answer>\"],\n"
            "                   rewards[1].weight=0.5, rewards[2].lua=score.lua (index = length appends);\n"
            "                   KEY= (empty) removes the field so its default applies\n"
            "  --schema         print every field: type, range, default and what it does\n"
            "  -h, --help       this help\n");
}

int cmd_recipe(int argc, char **argv) {
    if (cli_wants_help(argc, argv)) {
        usage(stdout);
        return 0;
    }
    const char *file = NULL;
    int schema = 0, nsets = 0;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (!strcmp(a, "--schema")) {
            schema = 1;
        } else if (!strcmp(a, "--set")) {
            if (i + 1 >= argc) {
                fprintf(stderr, "moerl recipe: --set needs KEY=VALUE (try 'moerl recipe --help')\n");
                return 2;
            }
            i++;
            nsets++;
        } else if (!strncmp(a, "--set=", 6)) {
            nsets++;
        } else if (a[0] == '-' && a[1]) {
            fprintf(stderr, "moerl recipe: unknown option '%s' (try 'moerl recipe --help')\n", a);
            return 2;
        } else if (file) {
            fprintf(stderr, "moerl recipe: one recipe at a time, got '%s' and '%s'\n", file, a);
            return 2;
        } else {
            file = a;
        }
    }
    if (schema) {
        if (file || nsets) {
            fprintf(stderr, "moerl recipe: --schema takes no recipe or --set\n");
            return 2;
        }
        char *doc = NULL;
        if (recipe_schema_doc(&doc)) {
            fprintf(stderr, "moerl recipe: out of memory\n");
            return 1;
        }
        fputs(doc, stdout);
        mem_free(doc);
        return 0;
    }
    if (!file) {
        fprintf(stderr, "moerl recipe: expected a recipe file (try 'moerl recipe --help')\n");
        return 2;
    }

    mr_err e = {0};
    recipe *r = NULL;
    char *text = NULL;
    int rc = recipe_load(&r, file, &e);
    for (int i = 1; !rc && i < argc; i++) {
        if (!strcmp(argv[i], "--set")) rc = recipe_set(r, argv[++i], &e);
        else if (!strncmp(argv[i], "--set=", 6)) rc = recipe_set(r, argv[i] + 6, &e);
    }
    if (!rc) rc = recipe_resolve(r, &e);
    if (!rc && recipe_dump_yaml(r, &text)) rc = err_set(&e, MR_ENOMEM, "out of memory");
    if (rc) {
        fprintf(stderr, "moerl recipe: %s\n", e.msg);
        recipe_free(r);
        return 1;
    }
    fputs(text, stdout);
    mem_free(text);
    recipe_free(r);
    return fflush(stdout) ? 1 : 0;
}
