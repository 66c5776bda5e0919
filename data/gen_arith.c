/* gen_arith.c: multi-step integer arithmetic. Difficulty sets the shape:
 *   1  a+b, operands 1..50
 *   2  three operands, + - * with at least one * or -, operands 1..20, no parentheses (precedence matters)
 *   3  4-5 operands with parentheses, operands 1..50, every value <= 10^4
 *   4  5-6 operands with parentheses, operands 1..99, every value <= 10^5
 *   5  6-7 operands with parentheses, operands 1..999, every value <= 10^6
 * No intermediate value is negative (the tiny quickstart model learns unsigned column arithmetic first), and the
 * completion shows one step per operation in evaluation order, then the answer:
 *   "Compute 17+25*3."  ->  "25*3=75. 17+75=92. #### 92". */
#include <stdio.h>

#include "data/gen_internal.h"

typedef struct level {
    int ops_lo, ops_hi; /* operand count */
    int64_t num_hi;     /* operands in 1..num_hi */
    int64_t max_value;  /* bound on |every intermediate value| */
} level;

static const level levels[6] = {
    {0, 0, 0, 0}, {2, 2, 50, 100}, {3, 3, 20, 10000}, {4, 5, 50, 10000}, {5, 6, 99, 100000}, {6, 7, 999, 1000000},
};

static char rand_op(rng *r) { return "+-*"[rng_below(r, 3)]; }

/* A random binary tree over `count` leaves: a random split point, random operators. */
static int random_tree(gen_expr *x, rng *r, int count, int64_t num_hi) {
    if (count == 1) return gen_expr_leaf(x, gen_between(r, 1, num_hi));
    int left = 1 + (int)rng_below(r, (uint32_t)(count - 1));
    int l = random_tree(x, r, left, num_hi);
    int rr = random_tree(x, r, count - left, num_hi);
    char op = rand_op(r);
    if (l < 0 || rr < 0) return -1;
    return gen_expr_op(x, op, l, rr);
}

/* Level 2: a op1 b op2 c read with precedence, no parentheses. */
static int flat_three(gen_expr *x, rng *r, int64_t num_hi) {
    char op1, op2;
    do {
        op1 = rand_op(r);
        op2 = rand_op(r);
    } while (op1 == '+' && op2 == '+');
    int a = gen_expr_leaf(x, gen_between(r, 1, num_hi));
    int b = gen_expr_leaf(x, gen_between(r, 1, num_hi));
    int c = gen_expr_leaf(x, gen_between(r, 1, num_hi));
    if (op2 == '*' && op1 != '*') {
        int bc = gen_expr_op(x, op2, b, c);
        return bc < 0 ? -1 : gen_expr_op(x, op1, a, bc);
    }
    int ab = gen_expr_op(x, op1, a, b);
    return ab < 0 ? -1 : gen_expr_op(x, op2, ab, c);
}

int gen_arith_row(const gen_opts *o, rng *r, cJSON *row, mr_err *e) {
    const level *lv = &levels[o->difficulty];
    gen_expr x;
    int root = -1;
    for (int tries = 0; tries < 10000 && root < 0; tries++) {
        x.n = 0;
        if (o->difficulty == 1) {
            int a = gen_expr_leaf(&x, gen_between(r, 1, lv->num_hi));
            int b = gen_expr_leaf(&x, gen_between(r, 1, lv->num_hi));
            root = gen_expr_op(&x, '+', a, b);
        } else if (o->difficulty == 2)
            root = flat_three(&x, r, lv->num_hi);
        else
            root = random_tree(&x, r, (int)gen_between(r, lv->ops_lo, lv->ops_hi), lv->num_hi);
        if (root < 0) continue;
        int64_t maxabs = 0, minv = 0;
        gen_expr_range(&x, root, &maxabs, &minv);
        if (minv < 0 || maxabs > lv->max_value || (o->difficulty >= 3 && !gen_expr_has_parens(&x, root)))
            root = -1;
    }
    if (root < 0) return err_set(e, MR_EINTERNAL, "no expression within the bounds of difficulty %d", o->difficulty);

    gen_str expr = {0}, steps = {0}, prompt = {0}, completion = {0};
    char answer[32];
    gen_expr_print(&x, root, &expr);
    gen_expr_steps(&x, root, &steps);
    snprintf(answer, sizeof answer, "%lld", (long long)x.node[root].v);
    gen_str_add(&prompt, "Compute %s.", expr.s);
    gen_completion(&completion, o->style, steps.s, answer);
    if (expr.full || steps.full || prompt.full || completion.full)
        return err_set(e, MR_EINTERNAL, "arithmetic row text too long");
    if (!cJSON_AddStringToObject(row, "prompt", prompt.s) || !cJSON_AddStringToObject(row, "completion", completion.s) ||
        !cJSON_AddStringToObject(row, "answer", answer) || !cJSON_AddStringToObject(row, "task", "arithmetic") ||
        !cJSON_AddNumberToObject(row, "difficulty", o->difficulty))
        return err_set(e, MR_ENOMEM, "out of memory building an arithmetic row");
    return MR_OK;
}
