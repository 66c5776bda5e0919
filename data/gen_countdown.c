/* gen_countdown.c: reach a target from given numbers with + - * / (the Countdown numbers game, as in TinyZero).
 * Difficulty = how many numbers (2-6). Each number may be used at most once; every intermediate value is a
 * positive integer (exact division only). Only solvable instances are written: numbers and a target are drawn,
 * then a depth-first search over pair combinations (with a fixed node budget, so the outcome is a pure function of
 * the draw) finds a reference solution; if there is none another target, then another number set, is drawn. The
 * completion shows the solution's steps and ends with the expression:
 *   "Make 114 from 50, 7, 2 using + - * / (each number at most once)."  ->  "50+7=57. 57*2=114. #### (50+7)*2".
 * Any valid expression is a right answer; the reference is one of them. */
#include <stdio.h>

#include "data/gen_internal.h"

typedef struct cd_level {
    int64_t num_hi, target_lo, target_hi;
} cd_level;

static const cd_level cd_levels[7] = {
    {0, 0, 0}, {0, 0, 0}, {30, 2, 100}, {50, 10, 100}, {99, 10, 100}, {99, 100, 500}, {99, 100, 999},
};

#define CD_BUDGET 200000 /* search calls per target: a deterministic bound, not a time */

typedef struct cd_search {
    gen_expr x;
    int64_t target;
    long budget;
    int found; /* node index of the solution */
} cd_search;

static int cd_solve(cd_search *s, const int *items, int k) {
    for (int i = 0; i < k; i++)
        if (s->x.node[items[i]].v == s->target) {
            s->found = items[i];
            return 1;
        }
    if (k == 1 || --s->budget < 0) return 0;
    int next[8];
    for (int i = 0; i < k; i++)
        for (int j = i + 1; j < k; j++) {
            int a = items[i], b = items[j];
            if (s->x.node[a].v < s->x.node[b].v) {
                int t = a;
                a = b;
                b = t;
            }
            int64_t va = s->x.node[a].v, vb = s->x.node[b].v;
            int m = 0;
            for (int q = 0; q < k; q++)
                if (q != i && q != j) next[m++] = items[q];
            for (int op = 0; op < 4; op++) {
                char c = "+*-/"[op];
                if ((c == '*' && vb == 1) || (c == '-' && va == vb) || (c == '/' && (vb == 1 || va % vb)))
                    continue; /* x*1, x/1 and x-x = 0 never help reach a positive target */
                int saved = s->x.n;
                int node = gen_expr_op(&s->x, c, a, b);
                if (node < 0) continue;
                next[m] = node;
                if (cd_solve(s, next, m + 1)) return 1;
                s->x.n = saved;
            }
        }
    return 0;
}

int gen_countdown_row(const gen_opts *o, rng *r, cJSON *row, mr_err *e) {
    const cd_level *lv = &cd_levels[o->difficulty];
    int count = o->difficulty;
    int64_t nums[8];
    cd_search s;
    int solved = 0;
    for (int sets = 0; sets < 1000 && !solved; sets++) {
        for (int i = 0; i < count; i++) nums[i] = gen_between(r, 1, lv->num_hi);
        for (int t = 0; t < 64 && !solved; t++) {
            s.target = gen_between(r, lv->target_lo, lv->target_hi);
            int given = 0;
            for (int i = 0; i < count; i++) given |= nums[i] == s.target;
            if (given) continue; /* a target among the numbers needs no arithmetic */
            s.x.n = 0;
            s.budget = CD_BUDGET;
            int items[8];
            for (int i = 0; i < count; i++) items[i] = gen_expr_leaf(&s.x, nums[i]);
            solved = cd_solve(&s, items, count);
        }
    }
    if (!solved) return err_set(e, MR_EINTERNAL, "no solvable countdown instance with %d numbers", count);

    gen_str list = {0}, sol = {0}, steps = {0}, prompt = {0}, completion = {0};
    for (int i = 0; i < count; i++) gen_str_add(&list, "%s%lld", i ? ", " : "", (long long)nums[i]);
    gen_expr_print(&s.x, s.found, &sol);
    gen_expr_steps(&s.x, s.found, &steps);
    gen_str_add(&prompt, "Make %lld from %s using + - * / (each number at most once).", (long long)s.target, list.s);
    gen_completion(&completion, o->style, steps.s, sol.s);
    if (list.full || sol.full || steps.full || prompt.full || completion.full)
        return err_set(e, MR_EINTERNAL, "countdown row text too long");
    int ok = cJSON_AddStringToObject(row, "prompt", prompt.s) && cJSON_AddStringToObject(row, "completion", completion.s);
    cJSON *numbers = ok ? cJSON_AddArrayToObject(row, "numbers") : NULL;
    for (int i = 0; i < count && numbers && ok; i++) {
        cJSON *v = cJSON_CreateNumber((double)nums[i]);
        ok = v && cJSON_AddItemToArray(numbers, v);
    }
    ok = ok && numbers && cJSON_AddNumberToObject(row, "target", (double)s.target) &&
         cJSON_AddStringToObject(row, "solution", sol.s) && cJSON_AddStringToObject(row, "task", "countdown") &&
         cJSON_AddNumberToObject(row, "difficulty", o->difficulty);
    if (!ok) return err_set(e, MR_ENOMEM, "out of memory building a countdown row");
    return MR_OK;
}
