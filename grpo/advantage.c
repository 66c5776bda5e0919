/* advantage.c: group-relative advantages (see advantage.h). Sums in double, in sample order. */
#include "grpo/advantage.h"

#include <math.h>
#include <stddef.h>

/* Mean and sample std (n - 1) of the scored rewards among reward[0 .. n); std 0 when fewer than 2. */
static void scored_moments(const double *reward, const uint8_t *scored, int n, double *mean, double *std, int *cnt) {
    double s = 0;
    int k = 0;
    for (int i = 0; i < n; i++)
        if (scored[i]) s += reward[i], k++;
    double mu = k ? s / k : 0, ss = 0;
    for (int i = 0; i < n; i++)
        if (scored[i]) ss += (reward[i] - mu) * (reward[i] - mu);
    *mean = mu;
    *std = k > 1 ? sqrt(ss / (k - 1)) : 0;
    *cnt = k;
}

int grpo_group_has_signal(const double *reward, const uint8_t *scored, int G) {
    int first = -1;
    for (int g = 0; g < G; g++) {
        if (!scored[g]) continue;
        if (first < 0) first = g;
        else if (reward[g] != reward[first]) return 1;
    }
    return 0;
}

void grpo_advantages(const double *reward, const uint8_t *scored, const uint8_t *truncated, int n_groups, int G,
                     const adv_opts *o, float *adv, uint8_t *in_loss, adv_stats *st) {
    const int n = n_groups * G;
    double bmean, bstd;
    int bcnt;
    scored_moments(reward, scored, n, &bmean, &bstd, &bcnt);
    adv_stats S = {0};
    for (int q = 0; q < n_groups; q++) {
        const double *r = reward + (size_t)q * G;
        const uint8_t *sc = scored + (size_t)q * G;
        double gmean, gstd;
        int gcnt;
        scored_moments(r, sc, G, &gmean, &gstd, &gcnt);
        double div = o->scale == ADV_SCALE_GROUP ? gstd + o->eps : o->scale == ADV_SCALE_BATCH ? bstd + o->eps : 1.0;
        S.zero_std_groups += !grpo_group_has_signal(r, sc, G);
        for (int g = 0; g < G; g++) {
            size_t i = (size_t)q * G + g;
            adv[i] = sc[g] ? (float)((r[g] - gmean) / div) : 0.0f;
            in_loss[i] = !(o->mask_truncated && truncated && truncated[i]);
        }
    }
    if (!st) return;
    double s = 0, ss = 0;
    for (int i = 0; i < n; i++) {
        S.n_scored += scored[i] != 0;
        S.n_masked += !in_loss[i];
        if (!in_loss[i]) continue;
        double a = adv[i];
        if (S.n_in_loss == 0) S.min = S.max = a;
        S.min = fmin(S.min, a);
        S.max = fmax(S.max, a);
        s += a;
        S.n_in_loss++;
    }
    S.n_unscored = n - S.n_scored;
    S.mean = S.n_in_loss ? s / S.n_in_loss : 0;
    for (int i = 0; i < n; i++)
        if (in_loss[i]) ss += (adv[i] - S.mean) * (adv[i] - S.mean);
    S.std = S.n_in_loss ? sqrt(ss / S.n_in_loss) : 0;
    S.reward_mean = bmean;
    S.reward_std = bcnt > 1 ? bstd * sqrt((double)(bcnt - 1) / bcnt) : 0;
    *st = S;
}
