/* gen_internal.h: what the per-task generators (gen_arith.c, gen_countdown.c, gen_toolcall.c) share with gen.c:
 * a bounded string builder, a small integer expression tree (printing with the fewest parentheses that keep its
 * shape, and its worked steps in evaluation order), and the per-task row builders. */
#ifndef MOERL_DATA_GEN_INTERNAL_H
#define MOERL_DATA_GEN_INTERNAL_H

#include <cjson/cJSON.h>
#include <stdint.h>

#include "core/err.h"
#include "core/rng.h"
#include "data/gen.h"

/* A fixed-capacity string: appends that do not fit set `full` (the row builders then fail cleanly). */
typedef struct gen_str {
    char s[4096];
    size_t n;
    int full;
} gen_str;
void gen_str_add(gen_str *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

/* An expression tree in a pool: op 0 is a leaf with value v; otherwise v = v[l] op v[r]. */
#define GEN_EXPR_MAX 64
typedef struct gen_node {
    char op; /* 0, '+', '-', '*', '/' */
    int64_t v;
    int l, r;
} gen_node;
typedef struct gen_expr {
    int n;
    gen_node node[GEN_EXPR_MAX];
} gen_expr;

int gen_expr_leaf(gen_expr *x, int64_t v); /* index of the new node, -1 when the pool is full */
/* Index of the node l op r, or -1 when the pool is full, the result overflows, or a division is by zero or
 * not exact (every value in moerl's tasks is an integer). */
int gen_expr_op(gen_expr *x, char op, int l, int r);
void gen_expr_print(const gen_expr *x, int root, gen_str *b);
/* "25*3=75. 17+75=92." in post-order (children before parents, left before right). */
void gen_expr_steps(const gen_expr *x, int root, gen_str *b);
/* Largest absolute value and smallest value of any node under root. */
void gen_expr_range(const gen_expr *x, int root, int64_t *maxabs, int64_t *minv);
/* 1 when any parenthesis is printed under root. */
int gen_expr_has_parens(const gen_expr *x, int root);

/* A uniform integer in [lo, hi]. */
int64_t gen_between(rng *r, int64_t lo, int64_t hi);

/* The completion "STEPS #### ANSWER" or "<think>STEPS</think> <answer>ANSWER</answer>". */
void gen_completion(gen_str *b, gen_style style, const char *steps, const char *answer);

/* Each fills an empty row object; draws only from r. MR_ENOMEM (cJSON) or MR_EINTERNAL (no instance found
 * within the retry budget; should not happen) on failure. */
int gen_arith_row(const gen_opts *o, rng *r, cJSON *row, mr_err *e);
int gen_countdown_row(const gen_opts *o, rng *r, cJSON *row, mr_err *e);
int gen_toolcall_row(const gen_opts *o, rng *r, cJSON *row, mr_err *e);

#endif
