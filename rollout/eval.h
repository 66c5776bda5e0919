/* eval.h: the estimators `moerl eval` reports over K samples per prompt (cli/cmd_eval.c).
 *
 *   pass@k: the unbiased estimator of Chen et al. 2021 (Codex paper, eq. 1): from n samples of which c are
 *           correct, the probability that k of them drawn without replacement hold at least one correct one,
 *           1 − C(n−c, k) / C(n, k), computed as the product 1 − Π_{i=n−c+1..n} (1 − k/i) (no large binomials).
 *   maj@k:  majority vote over the final answers the k samples give (the sample is then judged by its answer).
 *
 * Owns nothing. */
#ifndef MOERL_ROLLOUT_EVAL_H
#define MOERL_ROLLOUT_EVAL_H

/* pass@k from n samples, c correct (0 <= c <= n, 1 <= k <= n); NAN for arguments outside those ranges. */
double eval_pass_at_k(int n, int c, int k);

/* Majority vote: answers (n) are normalized final answers, NULL where a sample gave none. Returns the index of the
 * first sample carrying the most frequent answer (ties: the answer that appears first wins), or -1 when no sample
 * has one. */
int eval_majority(const char *const *answers, int n);

#endif
