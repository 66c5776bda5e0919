/* greedy.c: see greedy.h. */
#include "rollout/greedy.h"

#include <string.h>

#include "core/mem.h"

int greedy_generate(model *m, const int32_t *const *prompts, const int *plen, int n, int max_new, int32_t eos,
                    int32_t **out, int *out_len, mr_err *e) {
    const int V = m->p.cfg.vocab_size, Tm = m->T_max;
    int rc = MR_OK;
    for (int i = 0; i < n; i++) {
        out[i] = NULL;
        out_len[i] = 0;
        if (plen[i] < 1 || plen[i] + max_new > Tm)
            return err_set(e, MR_ERANGE, "generate: prompt %d has %d tokens; with %d new ones it must fit %d", i,
                           plen[i], max_new, Tm);
    }
    int32_t *ids = mem_alloc(sizeof(int32_t) * (size_t)Tm * 3);
    int *live = mem_alloc(sizeof(int) * (size_t)(n ? n : 1));
    int *done = mem_calloc((size_t)(n ? n : 1), sizeof(int));
    for (int i = 0; i < n && ids; i++) {
        out[i] = mem_alloc(sizeof(int32_t) * (size_t)(max_new ? max_new : 1));
        if (!out[i]) rc = MR_ENOMEM;
    }
    if (!ids || !live || !done || rc) {
        rc = err_set(e, MR_ENOMEM, "generate: out of memory");
        goto fail;
    }
    int32_t *pos = ids + Tm, *doc = ids + 2 * Tm;
    for (int step = 0; step < max_new; step++) {
        /* the live sequences, in groups that fit one forward */
        int first = 0;
        while (first < n) {
            int T = 0, k = 0;
            for (int i = first; i < n; i++, first++) {
                if (done[i]) continue;
                int len = plen[i] + out_len[i];
                if (T + len > Tm) break;
                for (int j = 0; j < len; j++) {
                    ids[T + j] = j < plen[i] ? prompts[i][j] : out[i][j - plen[i]];
                    pos[T + j] = j;
                    doc[T + j] = T;
                }
                T += len;
                live[k++] = i;
            }
            if (k == 0) continue;
            model_batch b = {.ids = ids, .pos = pos, .doc_start = doc, .T = T, .skip_mtp = 1};
            if ((rc = model_forward(m, &b, 0, NULL, e))) goto fail;
            const float *lg = model_logits(m);
            if (!lg) {
                rc = err_set(e, MR_EDEVICE, "greedy: cannot copy the logits from the model's backend");
                goto fail;
            }
            int end = 0;
            for (int q = 0; q < k; q++) {
                int i = live[q];
                end += plen[i] + out_len[i];
                const float *row = lg + (size_t)(end - 1) * V;
                int best = 0;
                for (int v = 1; v < V; v++)
                    if (row[v] > row[best]) best = v;
                if (best == eos) done[i] = 1;
                else {
                    out[i][out_len[i]++] = best;
                    if (out_len[i] == max_new) done[i] = 1;
                }
            }
        }
        int any = 0;
        for (int i = 0; i < n; i++) any |= !done[i];
        if (!any) break;
    }
    mem_free(ids);
    mem_free(live);
    mem_free(done);
    return MR_OK;
fail:
    for (int i = 0; i < n; i++) {
        mem_free(out[i]);
        out[i] = NULL;
    }
    mem_free(ids);
    mem_free(live);
    mem_free(done);
    return rc;
}
