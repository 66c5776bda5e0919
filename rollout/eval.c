/* eval.c: pass@k and majority vote (see eval.h). */
#include "rollout/eval.h"

#include <math.h>
#include <string.h>

double eval_pass_at_k(int n, int c, int k) {
    if (n < 1 || c < 0 || c > n || k < 1 || k > n) return NAN;
    if (n - c < k) return 1.0; /* every k-subset holds a correct sample */
    double miss = 1.0;         /* C(n−c, k) / C(n, k) = Π_{i=n−c+1..n} (1 − k/i) */
    for (int i = n - c + 1; i <= n; i++) miss *= 1.0 - (double)k / (double)i;
    return 1.0 - miss;
}

int eval_majority(const char *const *answers, int n) {
    int best = -1, best_count = 0;
    for (int i = 0; i < n; i++) {
        if (!answers[i]) continue;
        int seen_before = 0, count = 0;
        for (int j = 0; j < n; j++) {
            if (!answers[j] || strcmp(answers[i], answers[j]) != 0) continue;
            if (j < i) {
                seen_before = 1;
                break;
            }
            count++;
        }
        if (seen_before) continue; /* counted at its first occurrence */
        if (count > best_count) {
            best = i;
            best_count = count;
        }
    }
    return best;
}
