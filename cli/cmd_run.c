/* cmd_run.c: `moerl run RECIPE.yaml [--set k=v ...] [--resume]`: the whole pipeline a recipe describes: SFT (when
 * sft.steps or sft.epochs is set) into run.out_dir/sft, then GRPO (when the recipe has rewards) from the SFT
 * checkpoint into run.out_dir/grpo, then a before/after table read back from the run store: eval metrics of the
 * SFT checkpoint (GRPO's step-0 eval) and of the final policy, on the same held-out problems. */
#include <math.h>
#include <stdio.h>
#include <string.h>

#include "cli/cli.h"
#include "core/mem.h"
#include "core/recipe.h"
#include "core/runstore.h"
#include "grpo/trainer.h"
#include "sft/checkpoint.h"
#include "sft/sft.h"

typedef struct {
    const char **sets;
    int nset;
} overrides;

/* The recipe at path with the user's --set overrides, then ours (NULL-terminated), resolved. */
static int load_stage(recipe **out, const char *path, const overrides *ov, const char *const *ours, mr_err *e) {
    recipe *r = NULL;
    int rc = recipe_load(&r, path, e);
    for (int i = 0; !rc && i < ov->nset; i++) rc = recipe_set(r, ov->sets[i], e);
    for (int i = 0; !rc && ours && ours[i]; i++) rc = recipe_set(r, ours[i], e);
    if (!rc) rc = recipe_resolve(r, e);
    if (rc) {
        recipe_free(r);
        return rc;
    }
    *out = r;
    return 0;
}

/* ---- the table ---- */

typedef struct {
    const char *kind;
    int64_t id;
} find_run;

static int on_run(void *ud, const runstore_run *run) {
    find_run *f = ud;
    if (!strcmp(run->kind, f->kind) && run->id > f->id) f->id = run->id;
    return 0;
}

#define N_ROWS 3
static const char *const table_names[N_ROWS] = {"eval/exact_match", "eval/reward_mean", "eval/exact_match_n"};

#define RWIN 10 /* steps averaged at each end of the run for the rollouts' reward/mean */

typedef struct {
    int64_t first_step, last_step;
    double first[N_ROWS], last[N_ROWS];
    double reward[4096]; /* reward/mean by step (sampled rollouts), NaN where absent */
    int64_t max_step;
} before_after;

static int on_metric(void *ud, int64_t step, const char *name, double value) {
    before_after *b = ud;
    if (!strcmp(name, "reward/mean") && step >= 0 && step < 4096) {
        b->reward[step] = value;
        if (step > b->max_step) b->max_step = step;
    }
    for (int i = 0; i < N_ROWS; i++) {
        if (strcmp(name, table_names[i])) continue;
        if (step < b->first_step || isnan(b->first[i])) {
            if (step < b->first_step) b->first_step = step;
            b->first[i] = value;
        }
        if (step >= b->last_step) {
            b->last_step = step;
            b->last[i] = value;
        }
    }
    return 0;
}

static int print_table(const char *store, mr_err *e) {
    runstore *rs = NULL;
    int rc = runstore_open_existing(&rs, store, e);
    if (rc) return rc;
    find_run f = {.kind = "grpo", .id = 0};
    if ((rc = runstore_foreach_run(rs, on_run, &f, e))) goto done;
    if (!f.id) goto done;
    before_after b = {.first_step = INT64_MAX, .last_step = -1};
    for (int i = 0; i < N_ROWS; i++) b.first[i] = b.last[i] = NAN;
    for (int i = 0; i < 4096; i++) b.reward[i] = NAN;
    b.max_step = -1;
    if ((rc = runstore_foreach_metric(rs, f.id, on_metric, &b, e))) goto done;
    if (b.last_step < 0) goto done;
    printf("\nbefore/after GRPO (run %lld in %s, the same held-out problems, greedy):\n", (long long)f.id, store);
    printf("  %-22s %16s %16s %10s\n", "metric", "SFT checkpoint", "after GRPO", "change");
    printf("  %-22s %16s %16s %10s\n", "", "(step 0)", "", "");
    for (int i = 0; i < 2; i++) {
        const double k = i == 0 ? 100.0 : 1.0; /* exact match in percent */
        const char *unit = i == 0 ? "%" : " ";
        char cell[3][32];
        double v[3] = {k * b.first[i], k * b.last[i], k * (b.last[i] - b.first[i])};
        for (int j = 0; j < 3; j++) {
            if (isnan(v[j])) snprintf(cell[j], sizeof cell[j], "n/a ");
            else snprintf(cell[j], sizeof cell[j], j == 2 ? "%+.1f%s" : "%.1f%s", v[j], j == 2 ? " " : unit);
        }
        printf("  %-22s %16s %16s %10s\n", table_names[i], cell[0], cell[1], cell[2]);
    }
    /* the sampled rollouts' reward: mean of the first and of the last RWIN steps */
    double r0 = 0, r1 = 0;
    int n0 = 0, n1 = 0;
    for (int64_t st = 0; st <= b.max_step; st++) {
        if (isnan(b.reward[st])) continue;
        if (n0 < RWIN) r0 += b.reward[st], n0++;
    }
    for (int64_t st = b.max_step; st >= 0; st--) {
        if (isnan(b.reward[st])) continue;
        if (n1 < RWIN) r1 += b.reward[st], n1++;
    }
    if (n0 && n1)
        printf("  %-22s %16.3f %16.3f %+9.3f   (sampled rollouts, mean of the first/last %d steps)\n",
               "reward/mean", r0 / n0, r1 / n1, r1 / n1 - r0 / n0, RWIN);
    printf("  (%g problems; step %lld vs step %lld)\n", b.last[2], (long long)b.first_step, (long long)b.last_step);
done:
    runstore_close(rs);
    return rc;
}

int cmd_run(int argc, char **argv) {
    if (cli_wants_help(argc, argv)) {
        printf("usage: moerl run RECIPE.yaml [--set section.key=value ...] [--resume]\n\n"
               "Runs the pipeline a recipe describes: SFT (when sft.steps or sft.epochs is set) into\n"
               "run.out_dir/sft, then GRPO (when the recipe has rewards) starting from the SFT checkpoint, into\n"
               "run.out_dir/grpo; then prints eval/exact_match and eval/reward_mean of the SFT checkpoint and of the\n"
               "final policy on the same held-out problems, read from the run store. --resume continues each\n"
               "stage from its newest checkpoint (a finished stage is not run again).\n");
        return 0;
    }
    const char *path = NULL;
    int resume = 0;
    overrides ov = {mem_calloc((size_t)argc, sizeof(char *)), 0};
    if (!ov.sets) return 1;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--set") && i + 1 < argc) ov.sets[ov.nset++] = argv[++i];
        else if (!strncmp(argv[i], "--set=", 6)) ov.sets[ov.nset++] = argv[i] + 6;
        else if (!strcmp(argv[i], "--resume")) resume = 1;
        else if (argv[i][0] == '-' || path) {
            fprintf(stderr, "moerl run: unexpected argument '%s' (see moerl run --help)\n", argv[i]);
            mem_free(ov.sets);
            return 2;
        } else path = argv[i];
    }
    if (!path) {
        fprintf(stderr, "moerl run: missing RECIPE.yaml (see moerl run --help)\n");
        mem_free(ov.sets);
        return 2;
    }
    mr_err e = {0};
    recipe *base = NULL, *sft = NULL, *grpo = NULL;
    char *yaml = NULL;
    int status = 1;
    if (load_stage(&base, path, &ov, NULL, &e) || recipe_dump_yaml(base, &yaml)) goto fail;
    printf("# resolved recipe (%s)\n%s\n", path, yaml);
    fflush(stdout);
    const char *out_dir = recipe_str(base, "run.out_dir");
    int has_sft = recipe_is_set(base, "sft.steps") || recipe_is_set(base, "sft.epochs");
    int has_grpo = recipe_list_len(base, "rewards") > 0;
    if (!has_sft && !has_grpo) {
        fprintf(stderr, "moerl run: %s: nothing to run: set sft.steps (or sft.epochs) and/or rewards\n", path);
        goto done;
    }
    char sft_dir[4096], grpo_dir[4096], set_out[4200], set_init[4300], ckpt[4200] = "";
    snprintf(sft_dir, sizeof sft_dir, "%s/sft", out_dir);
    snprintf(grpo_dir, sizeof grpo_dir, "%s/grpo", out_dir);
    if (has_sft) {
        snprintf(set_out, sizeof set_out, "run.out_dir=%s", sft_dir);
        const char *ours[] = {set_out, NULL};
        if (load_stage(&sft, path, &ov, ours, &e)) goto fail;
        int64_t want = recipe_is_set(sft, "sft.steps") ? recipe_int(sft, "sft.steps") : -1, have = -1;
        mr_err e2 = {0};
        int found = resume && ckpt_latest(sft_dir, ckpt, sizeof ckpt, &have, &e2) == 0;
        if (found && want > 0 && have >= want) {
            fprintf(stderr, "run: SFT already finished (%s)\n", ckpt);
        } else {
            fprintf(stderr, "run: stage 1/%d: SFT into %s\n", has_grpo ? 2 : 1, sft_dir);
            if (sft_run(sft, found, &e)) goto fail;
        }
        if (ckpt_latest(sft_dir, ckpt, sizeof ckpt, &have, &e)) goto fail;
    }
    if (has_grpo) {
        snprintf(set_out, sizeof set_out, "run.out_dir=%s", grpo_dir);
        snprintf(set_init, sizeof set_init, "grpo.init_from=%s", ckpt);
        const char *ours[] = {set_out, ckpt[0] ? set_init : NULL, NULL};
        if (load_stage(&grpo, path, &ov, ours, &e)) goto fail;
        char gck[4200];
        int64_t have = -1;
        mr_err e2 = {0};
        int found = resume && ckpt_latest(grpo_dir, gck, sizeof gck, &have, &e2) == 0;
        fprintf(stderr, "run: stage %d/%d: GRPO from %s into %s\n", has_sft ? 2 : 1, has_sft ? 2 : 1,
                ckpt[0] ? ckpt : "the model section", grpo_dir);
        if (grpo_run(grpo, found, 0, &e)) goto fail;
        if (print_table(recipe_str(grpo, "run.store"), &e)) goto fail;
    }
    status = 0;
    goto done;
fail:
    fprintf(stderr, "moerl run: %s\n", e.msg);
done:
    mem_free(yaml);
    mem_free(ov.sets);
    recipe_free(base);
    recipe_free(sft);
    recipe_free(grpo);
    return status;
}
