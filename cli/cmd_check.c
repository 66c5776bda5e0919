/* cmd_check.c: `moerl check RECIPE [--set k=v ...]`: resolve a recipe, print it, validate its model, record the
 * run in the store. The quickstart command until the trainers land; afterwards the dry run of a job. */
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#include "cli/cli.h"
#include "core/mem.h"
#include "core/recipe.h"
#include "core/runstore.h"
#include "model/config.h"
#include "model/setup.h"

static void usage(FILE *f) {
    fprintf(f, "usage: moerl check RECIPE.yaml [--set section.key=value ...] [--quiet]\n\n"
               "Resolves the recipe (defaults, --set overrides), prints it, validates the model it names\n"
               "(parameter counts by MODEL-SPEC §12, KV-cache bytes per token), and records a run of kind\n"
               "'check' in the run store (run.store, default runs.db).\n");
}

int cmd_check(int argc, char **argv) {
    if (cli_wants_help(argc, argv)) {
        usage(stdout);
        return 0;
    }
    const char *path = NULL;
    int quiet = 0, nset = 0;
    const char **sets = mem_calloc((size_t)argc, sizeof *sets);
    if (!sets) return 1;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--set")) {
            if (i + 1 >= argc) {
                fprintf(stderr, "moerl check: --set needs section.key=value\n");
                mem_free(sets);
                return 2;
            }
            sets[nset++] = argv[++i];
        } else if (!strncmp(argv[i], "--set=", 6)) {
            sets[nset++] = argv[i] + 6;
        } else if (!strcmp(argv[i], "--quiet")) {
            quiet = 1;
        } else if (argv[i][0] == '-' || path) {
            fprintf(stderr, "moerl check: unexpected argument '%s' (see moerl check --help)\n", argv[i]);
            mem_free(sets);
            return 2;
        } else {
            path = argv[i];
        }
    }
    if (!path) {
        fprintf(stderr, "moerl check: missing RECIPE.yaml (see moerl check --help)\n");
        mem_free(sets);
        return 2;
    }
    mr_err e = {0};
    recipe *r = NULL;
    runstore *rs = NULL;
    char *yaml = NULL;
    int status = 1;
    int64_t run_id = 0;
    if (recipe_load(&r, path, &e)) goto fail;
    for (int i = 0; i < nset; i++)
        if (recipe_set(r, sets[i], &e)) goto fail;
    if (recipe_resolve(r, &e) || recipe_dump_yaml(r, &yaml)) goto fail;
    if (!quiet) printf("# resolved recipe (%s)\n%s\n", path, yaml);

    model_config c;
    if (model_config_from_recipe(&c, r, &e)) goto fail;
    config_params pc;
    if (config_param_breakdown(&c, &pc)) {
        err_set(&e, MR_ERANGE, "model: parameter count overflows 64 bits");
        goto fail;
    }
    uint64_t kv_latent, kv_full;
    model_kv_bytes_per_token(&c, 2, &kv_latent, &kv_full);
    printf("model: %s, %d layers (%d dense), d = %d, %d routed experts top-%d + %d shared, MTP depth %d\n",
           config_model_type_name(c.model_type), c.num_hidden_layers, c.first_k_dense_replace, c.hidden_size,
           c.n_routed_experts, c.num_experts_per_tok, c.n_shared_experts, c.num_nextn_predict_layers);
    printf("parameters: %llu total, %llu active per token (main model); %llu in MTP modules\n",
           (unsigned long long)pc.total, (unsigned long long)pc.activated, (unsigned long long)pc.mtp_total);
    printf("KV cache per token (bf16): %llu bytes latent (MLA) vs %llu bytes full MHA (%.1fx smaller)\n",
           (unsigned long long)kv_latent, (unsigned long long)kv_full, kv_latent ? (double)kv_full / kv_latent : 0);

    const char *store = recipe_str(r, "run.store");
    if (runstore_open(&rs, store, &e)) goto fail;
    if (runstore_begin_run(rs, "check", recipe_str(r, "run.name"), yaml, recipe_int(r, "run.seed"), &run_id, &e))
        goto fail;
    const char *names[] = {"model/params_total", "model/params_active", "model/params_mtp", "model/kv_bytes_per_token"};
    double values[] = {(double)pc.total, (double)pc.activated, (double)pc.mtp_total, (double)kv_latent};
    if (runstore_log_metrics(rs, run_id, 0, 4, names, values, &e)) goto fail;
    if (runstore_end_run(rs, run_id, RUN_OK, &e)) goto fail;
    printf("run %lld recorded in %s (moerl runs show %lld --db %s)\n", (long long)run_id, store, (long long)run_id,
           store);
    status = 0;
    goto done;
fail:
    fprintf(stderr, "moerl check: %s\n", e.msg);
    if (rs && run_id) {
        mr_err e2 = {0};
        runstore_log_event(rs, run_id, EVENT_ERROR, e.msg, &e2);
        runstore_end_run(rs, run_id, RUN_FAILED, &e2);
    }
done:
    mem_free(yaml);
    mem_free(sets);
    runstore_close(rs);
    recipe_free(r);
    return status;
}
