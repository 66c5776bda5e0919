/* loss.c: the clipped-ratio policy loss with KL and TIS, per token (see loss.h). Everything in double. */
#include "grpo/loss.h"

#include <math.h>
#include <stddef.h>

const char *grpo_agg_name(grpo_agg a) {
    static const char *const n[] = {"seq_mean_token_mean", "token_mean", "seq_mean_token_sum_norm"};
    return (unsigned)a < 3 ? n[a] : "?";
}

static double agg_weight(const grpo_loss_cfg *c, const grpo_norm *nm, int n) {
    switch (c->agg) {
    case AGG_TOKEN_MEAN: return nm->n_tokens > 0 ? 1.0 / (double)nm->n_tokens : 0;
    case AGG_SEQ_MEAN_TOKEN_MEAN: return nm->n_seqs > 0 && n > 0 ? 1.0 / ((double)nm->n_seqs * n) : 0;
    case AGG_SEQ_MEAN_TOKEN_SUM_NORM:
        return nm->n_seqs > 0 && c->max_completion_tokens > 0
                   ? 1.0 / ((double)nm->n_seqs * c->max_completion_tokens)
                   : 0;
    }
    return 0;
}

double grpo_seq_loss(const grpo_loss_cfg *c, const grpo_norm *nm, const grpo_seq *s, float *coef,
                     grpo_loss_acc *acc) {
    const double A = s->adv, w_agg = agg_weight(c, nm, s->n);
    double seq_lr = 0, seq_tis = 0;
    if (c->seq_ratio || c->tis == TIS_SEQUENCE)
        for (int t = 0; t < s->n; t++) {
            seq_lr += (double)s->lp[t] - (double)s->lp_old[t];
            if (s->lp_behav) seq_tis += (double)s->lp_old[t] - (double)s->lp_behav[t];
        }
    const double s_ratio = s->n > 0 ? exp(seq_lr / s->n) : 1; /* GSPO's s_i */
    const double w_seq = c->tis == TIS_SEQUENCE && s->lp_behav ? fmin(exp(seq_tis), c->tis_cap) : 1;
    double total = 0;
    for (int t = 0; t < s->n; t++) {
        double r = c->seq_ratio ? s_ratio : exp((double)s->lp[t] - (double)s->lp_old[t]);
        /* d r / d lp_t = r in both forms */
        double rc = fmin(fmax(r, 1 - c->eps_low), 1 + c->eps_high);
        double l1 = -A * r, l2 = -A * rc;
        double pg, dpg; /* dpg = d pg / d lp_t */
        if (l1 >= l2) pg = l1, dpg = -A * r;
        else pg = l2, dpg = (r > 1 - c->eps_low && r < 1 + c->eps_high) ? -A * r : 0;
        if (c->dual_clip > 1 && A < 0 && -A * c->dual_clip < pg) {
            pg = -A * c->dual_clip;
            dpg = 0;
            acc->dual_clipped++;
        }
        acc->clip_low += r < 1 - c->eps_low && A < 0;
        acc->clip_high += r > 1 + c->eps_high && A > 0;
        double w = 1;
        if (c->tis == TIS_TOKEN && s->lp_behav) w = fmin(exp((double)s->lp_old[t] - (double)s->lp_behav[t]), c->tis_cap);
        else if (c->tis == TIS_SEQUENCE) w = w_seq;
        double kl = 0, dkl = 0;
        if (c->beta > 0 && s->lp_ref) {
            double d = (double)s->lp_ref[t] - (double)s->lp[t];
            switch (c->kl) {
            case KL_K1: kl = -d, dkl = 1; break;
            case KL_K2: kl = 0.5 * d * d, dkl = -d; break;
            case KL_K3: kl = exp(d) - d - 1, dkl = 1 - exp(d); break;
            }
        }
        double l = w * pg + c->beta * kl;
        total += w_agg * l;
        coef[t] = (float)(-w_agg * (w * dpg + c->beta * dkl));
        acc->pg += pg;
        acc->kl += kl;
        acc->tis_w += w;
    }
    acc->tokens += s->n;
    acc->loss += total;
    return total;
}

double grpo_entropy_row(const float *logits, int V) {
    double mx = logits[0];
    for (int j = 1; j < V; j++) mx = fmax(mx, logits[j]);
    double z = 0, zx = 0;
    for (int j = 0; j < V; j++) {
        double x = logits[j] - mx, ex = exp(x);
        z += ex;
        zx += ex * x;
    }
    return log(z) - zx / z; /* H = log Z - E[x] */
}

void grpo_entropy_grad_row(float *g, const float *logits, int V, double scale) {
    double mx = logits[0];
    for (int j = 1; j < V; j++) mx = fmax(mx, logits[j]);
    double z = 0;
    for (int j = 0; j < V; j++) z += exp(logits[j] - mx);
    double lz = log(z), H = 0;
    for (int j = 0; j < V; j++) {
        double lp = logits[j] - mx - lz;
        H -= exp(lp) * lp;
    }
    for (int j = 0; j < V; j++) {
        double lp = logits[j] - mx - lz;
        g[j] += (float)(scale * (-exp(lp) * (lp + H)));
    }
}
