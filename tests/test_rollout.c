/* test_rollout.c: the rollout engine: bit equality of the rollout's log-probs with the trainer's forward (MM_DET,
 * MoE + shared experts + grouped routing + MTP model), routing replay, independence of batch composition and thread
 * count, greedy against rollout/greedy.c, EOS and stop strings, the sampler against a brute-force reference, option
 * errors, and `moerl generate`. */
#include <criterion/criterion.h>
#include <math.h>
#include <omp.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/mem.h"
#include "core/rng.h"
#include "kernels/cpu/dense.h"
#include "model/config.h"
#include "model/model.h"
#include "model/params.h"
#include "rollout/greedy.h"
#include "rollout/rollout.h"
#include "testutil.h"
#include "tokenizer/tokenizer.h"

/* A small DeepSeek-V3: dense layer 0, MoE layers 1-2 (8 experts, K = 2, 4 groups of which 2 kept, a shared
 * expert), YaRN, two MTP modules. Random weights large enough for peaked, varied distributions. */
static void small_config(model_config *c, int vocab) {
    tu_config_all_options(c);
    c->vocab_size = vocab;
    c->max_position_embeddings = 128;
    c->rope_scaling.original_max_position_embeddings = 16;
}

static void random_params(model_params *p, const model_config *c) {
    mr_err e = {0};
    cr_assert_eq(params_init(p, c, &e), MR_OK, "%s", e.msg);
    params_init_random(p, 42, 0.3f);
    for (int i = 0; i < p->n_entries; i++) /* random router biases and non-trivial norm gains */
        if (p->entries[i].flags & PARAM_NO_DECAY) {
            float *x = p->data + p->entries[i].offset;
            rng_fill_normal(x, p->entries[i].numel, (p->entries[i].flags & PARAM_BUFFER) ? 0.0f : 1.0f, 0.2f, 7,
                            (uint64_t)i);
        }
}

static void make_model(model *m, int vocab, int T_max, mm_mode mm) {
    model_config c;
    small_config(&c, vocab);
    model_params p;
    random_params(&p, &c);
    model_opts opt = {.mm = mm};
    mr_err e = {0};
    cr_assert_eq(model_init(m, &p, &opt, T_max, &e), MR_OK, "%s", e.msg);
}

enum { NP = 3, G = 3, MAXNEW = 10 };
static const int PLEN[NP] = {3, 7, 5};
static int32_t PROMPT[NP][8];

static void make_prompts(int V, const int32_t **pp) {
    for (int p = 0; p < NP; p++) {
        for (int j = 0; j < PLEN[p]; j++) PROMPT[p][j] = (int32_t)((p * 13 + j * 7 + 3) % V);
        pp[p] = PROMPT[p];
    }
}

static void free_seqs(rollout_seq *s, int n) {
    for (int i = 0; i < n; i++) rollout_seq_free(&s[i]);
}

static void generate(model *m, const tokenizer *tok, const int32_t *const *pp, const int *plen, const int64_t *ids,
                     int n, int g, const rollout_opts *o, rollout_seq *out) {
    mr_err e = {0};
    memset(out, 0, sizeof *out * (size_t)n * (size_t)g);
    cr_assert_eq(rollout_generate(m, tok, pp, plen, ids, n, g, o, out, &e), MR_OK, "%s", e.msg);
}

/* Trainer side: all sequences prompt ⧺ completion packed in one model_forward; returns the max |Δ logp| and
 * checks bits when exact. Also checks the recorded experts against the forward's routing. */
static double check_against_trainer(model *m, const int32_t *const *pp, const rollout_seq *out, int n_seq, int exact) {
    const int V = m->p.cfg.vocab_size;
    int T = 0;
    for (int q = 0; q < n_seq; q++) T += PLEN[q / G] + out[q].n;
    cr_assert(T <= m->T_max);
    int32_t *ids = malloc(sizeof(int32_t) * (size_t)T * 4), *pos = ids + T, *doc = ids + 2 * T, *tgt = ids + 3 * T;
    int t = 0;
    for (int q = 0; q < n_seq; q++) {
        int pl = PLEN[q / G], s0 = t;
        for (int j = 0; j < pl + out[q].n; j++, t++) {
            ids[t] = j < pl ? pp[q / G][j] : out[q].tokens[j - pl];
            pos[t] = j;
            doc[t] = s0;
            tgt[t] = -1;
        }
        for (int i = 0; i < out[q].n; i++) tgt[s0 + pl - 1 + i] = out[q].tokens[i];
    }
    model_batch b = {.ids = ids, .pos = pos, .doc_start = doc, .T = T};
    mr_err e = {0};
    cr_assert_eq(model_forward(m, &b, 0, NULL, &e), MR_OK, "%s", e.msg);
    float *lp = malloc(sizeof(float) * (size_t)T);
    logprob_forward(lp, model_logits(m), tgt, T, V);
    double worst = 0;
    t = 0;
    for (int q = 0; q < n_seq; q++) {
        int pl = PLEN[q / G];
        for (int i = 0; i < out[q].n; i++) {
            float a = out[q].logp[i], r = lp[t + pl - 1 + i];
            double d = fabs((double)a - (double)r);
            if (d > worst) worst = d;
            if (exact) {
                cr_expect(memcmp(&a, &r, sizeof a) == 0, "seq %d token %d: rollout logp %.9g, trainer %.9g", q, i,
                          (double)a, (double)r);
                if (out[q].experts) /* routing replay: the row that produced token i */
                    for (int j = 0, mj = 0; j < m->p.cfg.num_hidden_layers; j++) {
                        const int32_t *x = model_layer_experts(m, j);
                        if (!x) continue;
                        const int K = out[q].K;
                        cr_expect(memcmp(out[q].experts + ((size_t)i * out[q].n_moe_layers + mj) * K,
                                         x + (size_t)(t + pl - 1 + i) * K, sizeof(int32_t) * K) == 0,
                                  "seq %d token %d layer %d: experts differ", q, i, j);
                        mj++;
                    }
            }
        }
        t += pl + out[q].n;
    }
    free(lp);
    free(ids);
    return worst;
}

Test(rollout, logp_bit_equal_to_trainer) {
    model m;
    make_model(&m, 53, 256, MM_DET);
    const int32_t *pp[NP];
    make_prompts(53, pp);
    int64_t pid[NP] = {0, 1, 2};
    rollout_opts o = rollout_opts_default();
    o.temperature = 1.0f;
    o.top_p = 0.9f;
    o.max_new_tokens = MAXNEW;
    o.seed = 11;
    o.record_experts = 1;
    rollout_seq out[NP * G];
    generate(&m, NULL, pp, PLEN, pid, NP, G, &o, out);
    int distinct = 0;
    for (int q = 0; q < NP * G; q++) {
        cr_assert_eq(out[q].n, MAXNEW);
        cr_expect_eq(out[q].finish, ROLLOUT_LENGTH);
        cr_expect(out[q].truncated);
        cr_expect_eq(out[q].n_moe_layers, 2);
        cr_expect_eq(out[q].K, 2);
        cr_assert(out[q].experts != NULL);
        for (int i = 0; i < out[q].n; i++) {
            /* truncation only raises a token's probability: sampler log-prob >= full-distribution log-prob */
            cr_expect(out[q].logp_sampler[i] <= 0 && out[q].logp_sampler[i] >= out[q].logp[i] - 1e-5f,
                      "seq %d token %d: sampler %g, full %g", q, i, (double)out[q].logp_sampler[i],
                      (double)out[q].logp[i]);
        }
        if (q % G && memcmp(out[q].tokens, out[q - 1].tokens, sizeof(int32_t) * MAXNEW)) distinct++;
    }
    cr_expect(distinct >= 3, "the G samples of a prompt should differ (%d differ)", distinct);
    double worst = check_against_trainer(&m, pp, out, NP * G, 1);
    cr_expect_eq(worst, 0.0);
    free_seqs(out, NP * G);
    model_free(&m);
}

Test(rollout, independent_of_batch_and_threads) {
    model m;
    make_model(&m, 53, 64, MM_DET);
    const int32_t *pp[NP];
    make_prompts(53, pp);
    int64_t pid[NP] = {100, 101, 102};
    rollout_opts o = rollout_opts_default();
    o.temperature = 0.8f;
    o.top_k = 20;
    o.min_p = 0.02f;
    o.max_new_tokens = MAXNEW;
    o.seed = 5;
    o.eos = 4;
    rollout_seq all[NP * G], one[G], thr[NP * G];
    generate(&m, NULL, pp, PLEN, pid, NP, G, &o, all);
    generate(&m, NULL, pp + 2, PLEN + 2, pid + 2, 1, G, &o, one); /* prompt 2 alone */
    int nthr = omp_get_max_threads();
    omp_set_num_threads(nthr > 1 ? 1 : 2);
    generate(&m, NULL, pp, PLEN, pid, NP, G, &o, thr);
    omp_set_num_threads(nthr);
    for (int g = 0; g < G; g++) {
        const rollout_seq *a = &all[2 * G + g], *b = &one[g];
        cr_assert_eq(a->n, b->n, "sample %d: %d vs %d tokens", g, a->n, b->n);
        cr_expect_eq(a->finish, b->finish);
        cr_expect(!memcmp(a->tokens, b->tokens, sizeof(int32_t) * (size_t)a->n));
        cr_expect(!memcmp(a->logp, b->logp, sizeof(float) * (size_t)a->n));
        cr_expect(!memcmp(a->logp_sampler, b->logp_sampler, sizeof(float) * (size_t)a->n));
    }
    for (int q = 0; q < NP * G; q++) {
        cr_assert_eq(all[q].n, thr[q].n);
        cr_expect(!memcmp(all[q].tokens, thr[q].tokens, sizeof(int32_t) * (size_t)all[q].n));
        cr_expect(!memcmp(all[q].logp, thr[q].logp, sizeof(float) * (size_t)all[q].n));
    }
    /* fewer cache slots than samples (T_max = 7: 7 slots for 9 samples, one prompt prefilled at a time): samples
     * wait for free slots, and nothing changes */
    model small;
    make_model(&small, 53, 7, MM_DET);
    rollout_seq few[NP * G];
    generate(&small, NULL, pp, PLEN, pid, NP, G, &o, few);
    for (int q = 0; q < NP * G; q++) {
        cr_assert_eq(all[q].n, few[q].n);
        cr_expect(!memcmp(all[q].tokens, few[q].tokens, sizeof(int32_t) * (size_t)all[q].n));
        cr_expect(!memcmp(all[q].logp, few[q].logp, sizeof(float) * (size_t)all[q].n));
    }
    free_seqs(few, NP * G);
    model_free(&small);
    /* a different prompt id gives a different stream */
    int64_t other = 7;
    rollout_seq alt[G];
    generate(&m, NULL, pp + 2, PLEN + 2, &other, 1, G, &o, alt);
    int same = 1;
    for (int g = 0; g < G; g++)
        same &= alt[g].n == one[g].n && !memcmp(alt[g].tokens, one[g].tokens, sizeof(int32_t) * (size_t)alt[g].n);
    cr_expect(!same, "prompt id 7 and 102 drew the same samples");
    free_seqs(all, NP * G);
    free_seqs(one, G);
    free_seqs(thr, NP * G);
    free_seqs(alt, G);
    model_free(&m);
}

Test(rollout, greedy_matches_recompute_and_eos_ends) {
    model m;
    make_model(&m, 53, 64, MM_DET);
    const int32_t *pp[NP];
    make_prompts(53, pp);
    int64_t pid[NP] = {0, 1, 2};
    rollout_opts o = rollout_opts_default();
    o.temperature = 0;
    o.max_new_tokens = 12;
    rollout_seq out[NP];
    generate(&m, NULL, pp, PLEN, pid, NP, 1, &o, out);
    int32_t *ref[NP];
    int ref_len[NP];
    mr_err e = {0};
    cr_assert_eq(greedy_generate(&m, pp, PLEN, NP, 12, -1, ref, ref_len, &e), MR_OK, "%s", e.msg);
    for (int p = 0; p < NP; p++) {
        cr_assert_eq(out[p].n, ref_len[p]);
        cr_expect(!memcmp(out[p].tokens, ref[p], sizeof(int32_t) * (size_t)ref_len[p]), "prompt %d differs", p);
        for (int i = 0; i < out[p].n; i++) cr_expect(out[p].logp_sampler[i] == 0.0f);
        mem_free(ref[p]);
    }
    /* EOS: make the 5th token of prompt 0 the EOS id: the sequence ends at its first occurrence, EOS included */
    int32_t eos = out[0].tokens[4];
    int first = 0;
    while (out[0].tokens[first] != eos) first++;
    o.eos = eos;
    rollout_seq cut[NP];
    generate(&m, NULL, pp, PLEN, pid, NP, 1, &o, cut);
    cr_expect_eq(cut[0].n, first + 1);
    cr_expect_eq(cut[0].finish, ROLLOUT_EOS);
    cr_expect(!cut[0].truncated);
    cr_expect(!memcmp(cut[0].tokens, out[0].tokens, sizeof(int32_t) * (size_t)(first + 1)));
    free_seqs(out, NP);
    free_seqs(cut, NP);
    model_free(&m);
}

/* A byte-level tokenizer with 256 byte tokens; id = (byte - 'a') mod 256, so the model's ids 0..52 are the bytes
 * 'a'.. (no NUL among them). */
static int gpt2_cp(int b) {
    if ((b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF)) return b;
    int k = 0;
    for (int x = 0; x < 256; x++) {
        if ((x >= '!' && x <= '~') || (x >= 0xA1 && x <= 0xAC) || (x >= 0xAE && x <= 0xFF)) continue;
        if (x == b) return 256 + k;
        k++;
    }
    return -1;
}

static char *byte_tokenizer_json(void) {
    size_t cap = 16384, n = 0;
    char *s = malloc(cap);
    n += (size_t)snprintf(s + n, cap - n, "{\"version\": \"1.0\", \"added_tokens\": [], \"normalizer\": null, "
                          "\"pre_tokenizer\": {\"type\": \"ByteLevel\", \"add_prefix_space\": false, \"use_regex\": false}, "
                          "\"decoder\": {\"type\": \"ByteLevel\"}, \"model\": {\"type\": \"BPE\", \"vocab\": {");
    for (int b = 0; b < 256; b++) {
        int cp = gpt2_cp(b), id = (b - 'a' + 256) % 256;
        char u[4];
        if (cp < 0x80) {
            u[0] = (char)cp;
            u[1] = 0;
        } else {
            u[0] = (char)(0xC0 | (cp >> 6));
            u[1] = (char)(0x80 | (cp & 0x3F));
            u[2] = 0;
        }
        const char *esc = (cp == '"' || cp == '\\') ? "\\" : "";
        n += (size_t)snprintf(s + n, cap - n, "%s\"%s%s\": %d", b ? ", " : "", esc, u, id);
    }
    snprintf(s + n, cap - n, "}, \"merges\": []}}");
    return s;
}

Test(rollout, stop_strings_end_sequences) {
    model m;
    make_model(&m, 53, 64, MM_DET);
    char *json = byte_tokenizer_json();
    tokenizer *tok;
    mr_err e = {0};
    cr_assert_eq(tok_load_mem(&tok, json, strlen(json), "bytes/tokenizer.json", NULL, &e), MR_OK, "%s", e.msg);
    free(json);
    const int32_t *pp[NP];
    make_prompts(53, pp);
    int64_t pid[NP] = {0, 1, 2};
    rollout_opts o = rollout_opts_default();
    o.temperature = 0;
    o.max_new_tokens = 12;
    rollout_seq out[NP];
    generate(&m, tok, pp, PLEN, pid, NP, 1, &o, out);
    /* stop = the bytes of tokens 3..4 of prompt 1's completion; expected end: the first token whose bytes complete
     * an occurrence, found by brute force */
    char text[64], stop[3];
    for (int i = 0; i < out[1].n; i++) text[i] = (char)(out[1].tokens[i] + 'a');
    stop[0] = text[3];
    stop[1] = text[4];
    stop[2] = 0;
    int end = -1;
    for (int k = 1; k < out[1].n && end < 0; k++)
        if (text[k - 1] == stop[0] && text[k] == stop[1]) end = k;
    cr_assert(end >= 1 && end <= 4);
    const char *stops[2] = {"never-there", stop};
    o.stop = stops;
    o.n_stop = 2;
    rollout_seq cut[NP];
    generate(&m, tok, pp, PLEN, pid, NP, 1, &o, cut);
    cr_expect_eq(cut[1].n, end + 1, "stop \"%s\" in \"%.12s\": %d tokens", stop, text, cut[1].n);
    cr_expect_eq(cut[1].finish, ROLLOUT_STOP);
    cr_expect(!memcmp(cut[1].tokens, out[1].tokens, sizeof(int32_t) * (size_t)cut[1].n));
    /* a stop string longer than one token, spanning tokens: the prompt-0 completion's bytes 2..5 */
    char stop4[5];
    for (int i = 0; i < 4; i++) stop4[i] = (char)(out[0].tokens[2 + i] + 'a');
    stop4[4] = 0;
    const char *s4[1] = {stop4};
    o.stop = s4;
    o.n_stop = 1;
    rollout_seq c4[NP];
    generate(&m, tok, pp, PLEN, pid, NP, 1, &o, c4);
    cr_expect(c4[0].n <= 6 && c4[0].finish == ROLLOUT_STOP, "%d tokens, finish %d", c4[0].n, (int)c4[0].finish);
    free_seqs(out, NP);
    free_seqs(cut, NP);
    free_seqs(c4, NP);
    tok_free(tok);
    model_free(&m);
}

/* Brute force: the sampler's distribution as rollout.h defines it, token by token. */
static void brute_probs(double *pr, const float *z, int V, const rollout_opts *o) {
    double x[64], mx = -INFINITY, ee[64];
    for (int v = 0; v < V; v++) {
        x[v] = (double)z[v] / o->temperature;
        if (x[v] > mx) mx = x[v];
    }
    for (int v = 0; v < V; v++) ee[v] = exp(x[v] - mx);
    int rank[64];
    for (int v = 0; v < V; v++) {
        rank[v] = 0;
        for (int w = 0; w < V; w++) rank[v] += ee[w] > ee[v] || (ee[w] == ee[v] && w < v);
    }
    int kept[64];
    double zk = 0;
    for (int v = 0; v < V; v++) {
        kept[v] = o->top_k <= 0 || rank[v] < o->top_k;
        if (kept[v]) zk += ee[v];
    }
    int kp[64];
    for (int v = 0; v < V; v++) {
        double before = 0;
        for (int w = 0; w < V; w++)
            if (kept[w] && rank[w] < rank[v]) before += ee[w];
        kp[v] = kept[v] && (o->top_p >= 1 || before < o->top_p * zk);
    }
    double s = 0;
    for (int v = 0; v < V; v++) {
        if (kp[v] && ee[v] < o->min_p) kp[v] = 0;
        pr[v] = kp[v] ? ee[v] : 0;
        s += pr[v];
    }
    for (int v = 0; v < V; v++) pr[v] /= s;
}

Test(rollout, sampler_against_brute_force) {
    enum { V = 40 };
    float z[V];
    for (int v = 0; v < V; v++) z[v] = (float)(2.0 * sin(v * 1.7 + 0.3) + 0.05 * v);
    z[17] = z[5]; /* a tie: the lower id ranks first */
    struct {
        float t, p, mp;
        int k;
    } cases[] = {{0.7f, 1, 0, 5}, {1.3f, 0.8f, 0, 0}, {1, 1, 0.1f, 0}, {0.9f, 0.7f, 0.05f, 10}, {1, 1, 0, 0},
                 {2, 0.5f, 0, 3}};
    double pr[V], ref[V];
    rollout_cand work[2 * V];
    for (size_t c = 0; c < 2 * sizeof cases / sizeof cases[0]; c++) {
        if (c == sizeof cases / sizeof cases[0]) /* the same cases on a row with a wide range (e down to 1e-30) */
            for (int v = 0; v < V; v++) z[v] *= 8;
        size_t ci = c % (sizeof cases / sizeof cases[0]);
        rollout_opts o = rollout_opts_default();
        o.temperature = cases[ci].t;
        o.top_p = cases[ci].p;
        o.min_p = cases[ci].mp;
        o.top_k = cases[ci].k;
        int kept = rollout_sampler_probs(pr, z, V, &o, work);
        brute_probs(ref, z, V, &o);
        int nref = 0;
        for (int v = 0; v < V; v++) {
            nref += ref[v] > 0;
            cr_expect((pr[v] > 0) == (ref[v] > 0), "case %zu id %d: kept %d vs %d", c, v, pr[v] > 0, ref[v] > 0);
            cr_expect(fabs(pr[v] - ref[v]) <= 1e-12 * (1 + ref[v]), "case %zu id %d: %g vs %g", c, v, pr[v], ref[v]);
        }
        cr_expect_eq(kept, nref, "case %zu", c);
        if (cases[ci].k) cr_expect(kept <= cases[ci].k);
        /* inverse CDF over ids ascending */
        for (int i = 0; i < 200; i++) {
            double u = (i + 0.5) / 200, cum = 0;
            int want = -1;
            for (int v = 0; v < V && want < 0; v++) {
                cum += ref[v];
                if (ref[v] > 0 && u < cum) want = v;
            }
            float lps;
            int32_t got = rollout_sample_row(pr, V, u, &lps);
            cr_expect_eq(got, want, "case %zu u %g", c, u);
            cr_expect(fabsf(lps - (float)log(ref[want])) < 1e-5f);
        }
    }
    /* greedy: the argmax, lower id on a tie, log-prob exactly 0 */
    rollout_opts g = rollout_opts_default();
    g.temperature = 0;
    float zz[V];
    memcpy(zz, z, sizeof zz);
    zz[9] = 100;
    zz[30] = 100;
    cr_expect_eq(rollout_sampler_probs(pr, zz, V, &g, work), 1);
    float lps = 1;
    cr_expect_eq(rollout_sample_row(pr, V, 0.999, &lps), 9);
    cr_expect(lps == 0.0f);
    /* the uniforms: in [0, 1), a function of each key part */
    double u0 = rollout_uniform(1, 2, 3, 4);
    cr_expect(u0 >= 0 && u0 < 1);
    cr_expect(u0 == rollout_uniform(1, 2, 3, 4));
    cr_expect(u0 != rollout_uniform(9, 2, 3, 4) && u0 != rollout_uniform(1, 9, 3, 4) &&
              u0 != rollout_uniform(1, 2, 9, 4) && u0 != rollout_uniform(1, 2, 3, 9));
}

/* The sampler on a 32k vocabulary (its elementwise loops fork on two threads, candidates are radix-sorted) against
 * the definition with qsort over every id: the same kept set and values within rounding, and bit-identical results
 * on one and on two threads. */
static int ref_cmp(const void *pa, const void *pb) {
    const rollout_cand *a = pa, *b = pb;
    if (a->e != b->e) return a->e > b->e ? -1 : 1;
    return (a->id > b->id) - (a->id < b->id);
}

static void sorted_ref(double *pr, const float *z, int V, const rollout_opts *o, rollout_cand *c) {
    double mx = -INFINITY, zk = 0, s = 0;
    for (int v = 0; v < V; v++) mx = fmax(mx, (double)z[v] / o->temperature);
    for (int v = 0; v < V; v++) c[v] = (rollout_cand){exp((double)z[v] / o->temperature - mx), v};
    qsort(c, (size_t)V, sizeof *c, ref_cmp);
    int keep = o->top_k > 0 && o->top_k < V ? o->top_k : V;
    for (int i = 0; i < keep; i++) zk += c[i].e;
    double before = 0;
    memset(pr, 0, sizeof(double) * (size_t)V);
    for (int i = 0; i < keep; i++) {
        if (o->top_p < 1 && before >= o->top_p * zk) break;
        before += c[i].e;
        if (c[i].e >= o->min_p) pr[c[i].id] = c[i].e;
    }
    for (int v = 0; v < V; v++) s += pr[v];
    for (int v = 0; v < V; v++) pr[v] /= s;
}

Test(rollout, sampler_large_vocab) {
    enum { V = 32768 };
    float *z = malloc(sizeof(float) * V);
    double *pr = malloc(sizeof(double) * V), *p1 = malloc(sizeof(double) * V), *ref = malloc(sizeof(double) * V);
    rollout_cand *work = malloc(sizeof(rollout_cand) * 2 * V);
    cr_assert(z && pr && p1 && ref && work);
    struct {
        float t, p, mp, scale;
        int k;
    } cases[] = {{1, 1, 0, 4, 0},     {1, 0.9f, 0, 4, 0},   {0.8f, 0.95f, 0, 30, 0}, {1, 1, 0, 4, 50},
                 {1, 0.5f, 0, 60, 40}, {1.2f, 1, 0.01f, 8, 0}, {1, 1, 0, 300, 5000}, {0.7f, 0.9f, 0.02f, 12, 100}};
    const int thr = omp_get_max_threads();
    for (size_t c = 0; c < sizeof cases / sizeof cases[0]; c++) {
        uint32_t st = 12345u + (uint32_t)c;
        for (int v = 0; v < V; v++) {
            st = st * 1664525u + 1013904223u;
            z[v] = cases[c].scale * ((float)(st >> 8) / 16777216.0f - 0.5f);
        }
        for (int v = 0; v < V; v += 97) z[v] = z[V / 2]; /* ties across the vocabulary */
        rollout_opts o = rollout_opts_default();
        o.temperature = cases[c].t;
        o.top_p = cases[c].p;
        o.min_p = cases[c].mp;
        o.top_k = cases[c].k;
        omp_set_num_threads(2);
        int kept = rollout_sampler_probs(pr, z, V, &o, work);
        omp_set_num_threads(1);
        int kept1 = rollout_sampler_probs(p1, z, V, &o, work);
        omp_set_num_threads(thr);
        cr_expect_eq(kept, kept1, "case %zu", c);
        cr_expect(memcmp(pr, p1, sizeof(double) * V) == 0, "case %zu: 1 and 2 threads differ", c);
        sorted_ref(ref, z, V, &o, work);
        int nref = 0, bad = 0;
        for (int v = 0; v < V; v++) {
            nref += ref[v] > 0;
            bad += (pr[v] > 0) != (ref[v] > 0) || fabs(pr[v] - ref[v]) > 1e-12 * (1 + ref[v]);
        }
        cr_expect_eq(bad, 0, "case %zu: %d ids differ from the sorted reference", c, bad);
        cr_expect_eq(kept, nref, "case %zu", c);
        if (cases[c].k) cr_expect(kept <= cases[c].k, "case %zu", c);
        if (cases[c].p < 1 || cases[c].k) cr_expect(kept < V, "case %zu: truncation kept every id", c);
    }
    free(z), free(pr), free(p1), free(ref), free(work);
}

Test(rollout, fast_mode_mismatch_is_small) {
    model m;
    make_model(&m, 53, 256, MM_FAST);
    const int32_t *pp[NP];
    make_prompts(53, pp);
    int64_t pid[NP] = {0, 1, 2};
    rollout_opts o = rollout_opts_default();
    o.max_new_tokens = MAXNEW;
    o.seed = 3;
    rollout_seq out[NP * G];
    generate(&m, NULL, pp, PLEN, pid, NP, G, &o, out);
    double worst = check_against_trainer(&m, pp, out, NP * G, 0);
    printf("MM_FAST: max |rollout logp - trainer logp| = %.3g over %d tokens\n", worst, NP * G * MAXNEW);
    cr_expect(worst < 1e-4, "%g", worst);
    free_seqs(out, NP * G);
    model_free(&m);
}

Test(rollout, option_errors) {
    model m;
    make_model(&m, 53, 8, MM_DET);
    const int32_t *pp[NP];
    make_prompts(53, pp);
    int64_t pid[NP] = {0, 1, 2};
    rollout_seq out[NP * 9];
    memset(out, 0, sizeof out);
    mr_err e = {0};
    rollout_opts o = rollout_opts_default();
    o.top_p = 0;
    cr_expect_eq(rollout_generate(&m, NULL, pp, PLEN, pid, NP, 1, &o, out, &e), MR_EINVAL);
    cr_expect_str_eq(e.msg, "rollout: top_p must be in (0, 1], got 0");
    o = rollout_opts_default();
    cr_expect_eq(rollout_generate(&m, NULL, pp, PLEN, pid, NP, 0, &o, out, &e), MR_EINVAL);
    cr_expect_str_eq(e.msg, "rollout: expected n_prompts >= 0 and G >= 1, got 3 and 0");
    cr_expect_eq(rollout_generate(&m, NULL, pp, PLEN, pid, NP, 9, &o, out, &e), MR_ERANGE);
    cr_expect_str_eq(e.msg, "rollout: G = 9 samples of a prompt must fit one decode batch (T_max = 8)");
    int long_len[NP] = {3, 9, 5};
    o.max_new_tokens = 8;
    cr_expect_eq(rollout_generate(&m, NULL, pp, long_len, pid, NP, 1, &o, out, &e), MR_ERANGE);
    cr_expect_str_eq(e.msg, "rollout: prompt 1 has 9 tokens; the prefill holds T_max = 8");
    o.max_new_tokens = 122;
    cr_expect_eq(rollout_generate(&m, NULL, pp, PLEN, pid, NP, 1, &o, out, &e), MR_ERANGE);
    cr_expect_str_eq(e.msg, "rollout: prompt 1: 7 tokens + max_new_tokens 122 pass max_position_embeddings 128");
    o = rollout_opts_default();
    const char *st[1] = {"x"};
    o.stop = st;
    o.n_stop = 1;
    cr_expect_eq(rollout_generate(&m, NULL, pp, PLEN, pid, NP, 1, &o, out, &e), MR_EINVAL);
    cr_expect_str_eq(e.msg, "rollout: stop strings need a tokenizer");
    o = rollout_opts_default();
    o.max_new_tokens = 0; /* nothing to generate: empty, truncated */
    cr_expect_eq(rollout_generate(&m, NULL, pp, PLEN, pid, NP, 2, &o, out, &e), MR_OK);
    cr_expect(out[5].n == 0 && out[5].truncated && out[5].finish == ROLLOUT_LENGTH);
    /* allocation failure: an error, every output freeable */
    o = rollout_opts_default();
    o.max_new_tokens = 4;
    int failed = 0;
    for (long k = 1; k <= 40; k++) {
        mem_fail_after(k);
        int rc = rollout_generate(&m, NULL, pp, PLEN, pid, NP, 2, &o, out, &e);
        mem_fail_after(0);
        if (rc) {
            cr_expect_eq(rc, MR_ENOMEM, "%s", e.msg);
            failed++;
        }
        free_seqs(out, NP * 2);
    }
    cr_expect(failed > 5);
    model_free(&m);
}

/* ---- moerl generate ---- */

static char *run(int *status, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static char *run(int *status, const char *fmt, ...) {
    char cmd[4096];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(cmd, sizeof cmd, fmt, ap);
    va_end(ap);
    char *out = NULL;
    *status = tu_run(cmd, &out);
    return out;
}

Test(rollout, generate_cli) {
    char *dir = tu_tmpdir();
    char *cfgp = tu_path(dir, "config.json");
    char *mdir = tu_path(dir, "model");
    model_config c;
    small_config(&c, 256);
    c.eos_token_id[0] = 'q' - 'a'; /* the byte 'q' ends a sample */
    c.n_eos_token_id = 1;
    mr_err e = {0};
    cr_assert_eq(config_save_file(&c, cfgp, &e), MR_OK, "%s", e.msg);
    int st;
    char *o = run(&st, "%s init-model --config %s --out %s --std 0.3 2>&1", tu_bin(), cfgp, mdir);
    cr_assert_eq(st, 0, "%s", o);
    free(o);
    char *json = byte_tokenizer_json();
    char *tp = tu_path(mdir, "tokenizer.json");
    cr_assert_eq(tu_write(tp, json, (size_t)-1), 0);
    free(json);
    /* greedy through the CLI == greedy_generate in process, decoded */
    o = run(&st, "%s generate --model %s --prompt 'hello' --temperature 0 --max-new-tokens 12 2>/dev/null", tu_bin(), mdir);
    cr_assert_eq(st, 0, "%s", o);
    model_params p;
    cr_assert_eq(params_load(&p, mdir, &e), MR_OK, "%s", e.msg);
    model m;
    model_opts mo = {.mm = MM_DET};
    cr_assert_eq(model_init(&m, &p, &mo, 32, &e), MR_OK, "%s", e.msg);
    int32_t prompt[5];
    for (int i = 0; i < 5; i++) prompt[i] = ("hello"[i] - 'a' + 256) % 256;
    const int32_t *pp = prompt;
    int plen = 5, ol;
    int32_t *ids;
    cr_assert_eq(greedy_generate(&m, &pp, &plen, 1, 12, c.eos_token_id[0], &ids, &ol, &e), MR_OK, "%s", e.msg);
    char want[64];
    for (int i = 0; i < ol; i++) want[i] = (char)((ids[i] + 'a') % 256);
    want[ol] = '\n';
    want[ol + 1] = 0;
    cr_expect(strlen(o) == (size_t)ol + 1 && !memcmp(o, want, (size_t)ol + 1), "got \"%s\", want \"%s\"", o, want);
    mem_free(ids);
    model_free(&m);
    free(o);
    /* several samples: headers, one per sample; same seed = same text */
    o = run(&st, "%s generate --model %s --prompt hi -n 3 --top-k 5 --seed 4 --max-new-tokens 6 2>&1", tu_bin(), mdir);
    cr_expect_eq(st, 0, "%s", o);
    cr_expect(strstr(o, "--- sample 0 (") && strstr(o, "--- sample 2 ("), "%s", o);
    char *o2 = run(&st, "%s generate --model %s --prompt hi -n 3 --top-k 5 --seed 4 --max-new-tokens 6 2>&1", tu_bin(), mdir);
    cr_expect_str_eq(o, o2);
    free(o);
    free(o2);
    /* MTP speculative decoding: the same greedy text; the stats line on stderr counts the drafts */
    char *plain = run(&st, "%s generate --model %s --prompt 'hello' --temperature 0 --max-new-tokens 12 2>/dev/null",
                      tu_bin(), mdir);
    cr_assert_eq(st, 0, "%s", plain);
    o = run(&st, "%s generate --model %s --prompt 'hello' --temperature 0 --max-new-tokens 12 --mtp-speculative "
            "2>/dev/null", tu_bin(), mdir);
    cr_assert_eq(st, 0, "%s", o);
    cr_expect_str_eq(o, plain);
    free(o);
    free(plain);
    o = run(&st, "%s generate --model %s --prompt 'hello' --temperature 0 --max-new-tokens 12 --mtp-speculative "
            "2>&1 >/dev/null", tu_bin(), mdir);
    cr_assert_eq(st, 0, "%s", o);
    long long ntok = -1, steps = -1, acc = -1, drafted = -1;
    double secs = -1, tps = -1;
    cr_assert_eq(sscanf(o, "generate: %lld tokens in %lf s (%lf tokens/s, prefill included), %lld decode steps; MTP "
                           "drafts accepted %lld of %lld", &ntok, &secs, &tps, &steps, &acc, &drafted), 6, "%s", o);
    cr_expect(ntok >= 1 && ntok <= 12 && secs >= 0 && tps >= 0, "%s", o);
    cr_expect(drafted >= 1 && acc >= 0 && acc <= drafted, "%s", o);
    cr_expect_eq(ntok - 1, steps + acc, "every decode step gives one token, plus one per accepted draft: %s", o);
    free(o);
    o = run(&st, "%s generate --model %s --prompt 'hello' --temperature 0 --max-new-tokens 12 --stats 2>&1 >/dev/null",
            tu_bin(), mdir);
    cr_assert_eq(st, 0, "%s", o);
    cr_expect(!strncmp(o, "generate: ", 10) && !strstr(o, "MTP") && strchr(o, '\n') == o + strlen(o) - 1, "%s", o);
    free(o);
    /* misuse and failures: one line on stderr */
    o = run(&st, "%s generate --model %s 2>&1", tu_bin(), mdir);
    cr_expect_eq(st, 2);
    cr_expect_str_eq(o, "moerl generate: needs --model DIR and --prompt TEXT\n");
    free(o);
    o = run(&st, "%s generate --model %s --prompt x --top-p 1.5 2>&1", tu_bin(), mdir);
    cr_expect_eq(st, 2);
    cr_expect_str_eq(o, "moerl generate: --top-p: invalid value \"1.5\" (see --help)\n");
    free(o);
    o = run(&st, "%s generate --model %s/nowhere --prompt x 2>&1", tu_bin(), dir);
    cr_expect_eq(st, 1);
    cr_expect(!strncmp(o, "moerl generate: ", 16) && strchr(o, '\n') == o + strlen(o) - 1, "%s", o);
    free(o);
    free(tp);
    free(cfgp);
    free(mdir);
    tu_rmtree(dir);
    free(dir);
}

/* ---- MTP speculative decoding ---- */

static void expect_same_seqs(const rollout_seq *a, const rollout_seq *b, int n) {
    for (int q = 0; q < n; q++) {
        cr_assert_eq(a[q].n, b[q].n, "seq %d: %d tokens plain, %d speculative", q, a[q].n, b[q].n);
        cr_expect_eq(a[q].finish, b[q].finish);
        cr_expect(memcmp(a[q].tokens, b[q].tokens, sizeof(int32_t) * (size_t)a[q].n) == 0, "seq %d: tokens differ", q);
        cr_expect(memcmp(a[q].logp, b[q].logp, sizeof(float) * (size_t)a[q].n) == 0, "seq %d: logp differ", q);
        cr_expect(memcmp(a[q].logp_sampler, b[q].logp_sampler, sizeof(float) * (size_t)a[q].n) == 0, "seq %d", q);
        if (a[q].experts)
            cr_expect(memcmp(a[q].experts, b[q].experts, sizeof(int32_t) * (size_t)a[q].n * a[q].n_moe_layers * a[q].K) == 0,
                      "seq %d: experts differ", q);
    }
}

/* Greedy: the same tokens, log-probs and routing as plain decoding, with a roomy batch and with T_max = 8 (9
 * samples: the verify rows of a step come in chunks). */
Test(rollout, mtp_speculative_greedy_identical) {
    const int tmax[2] = {256, 8};
    for (int v = 0; v < 2; v++) {
        model m;
        make_model(&m, 53, tmax[v], MM_DET);
        const int32_t *pp[NP];
        make_prompts(53, pp);
        int64_t pid[NP] = {0, 1, 2};
        rollout_opts o = rollout_opts_default();
        o.temperature = 0;
        o.max_new_tokens = MAXNEW;
        o.record_experts = 1;
        o.eos = 5;
        rollout_seq a[NP * G], b[NP * G];
        rollout_stats sa, sb;
        o.stats = &sa;
        generate(&m, NULL, pp, PLEN, pid, NP, G, &o, a);
        o.mtp_speculative = 1;
        o.stats = &sb;
        generate(&m, NULL, pp, PLEN, pid, NP, G, &o, b);
        expect_same_seqs(a, b, NP * G);
        cr_expect_eq(sa.tokens, sb.tokens);
        cr_expect_eq(sa.drafted, 0);
        cr_expect_gt(sb.drafted, 0);
        cr_expect_leq(sb.accepted, sb.drafted);
        /* plain: one row per token after the first; speculative: at most as many steps */
        cr_expect_eq(sa.decode_rows, sa.tokens - NP * G);
        if (v == 0) cr_expect_leq(sb.decode_steps, sa.decode_steps); /* (T_max = 8 splits steps in chunks) */
        if (v == 0) check_against_trainer(&m, pp, b, NP * G, 1);
        free_seqs(a, NP * G);
        free_seqs(b, NP * G);
        model_free(&m);
    }
}

/* Sampling: log-probs bit-equal to the trainer's forward, drafts both accepted and rejected. */
Test(rollout, mtp_speculative_logp_bit_equal_to_trainer) {
    model m;
    make_model(&m, 53, 256, MM_DET);
    const int32_t *pp[NP];
    make_prompts(53, pp);
    int64_t pid[NP] = {0, 1, 2};
    rollout_opts o = rollout_opts_default();
    o.temperature = 1.3f;
    o.top_p = 0.95f;
    o.max_new_tokens = MAXNEW;
    o.seed = 11;
    o.record_experts = 1;
    o.mtp_speculative = 1;
    rollout_stats st;
    o.stats = &st;
    rollout_seq out[NP * G];
    generate(&m, NULL, pp, PLEN, pid, NP, G, &o, out);
    for (int q = 0; q < NP * G; q++) cr_assert_eq(out[q].n, MAXNEW);
    cr_expect_gt(st.accepted, 0, "no draft accepted out of %lld", (long long)st.drafted);
    cr_expect_lt(st.accepted, st.drafted, "every draft accepted");
    double worst = check_against_trainer(&m, pp, out, NP * G, 1);
    cr_expect_eq(worst, 0.0);
    free_seqs(out, NP * G);
    model_free(&m);
}

/* The accept/resample rule keeps the sampler's distribution: over 400 samples of one prompt, the first token is
 * drawn as in plain decoding (same uniforms) and the second, the verified draft, fits the exact conditional
 * distribution p(. | prompt, first) (chi-square over bins of expected count >= 5). */
Test(rollout, mtp_speculative_same_distribution) {
    enum { N = 400, V = 53 };
    model m;
    make_model(&m, V, N, MM_DET);
    const int32_t *pp[NP];
    make_prompts(V, pp);
    int64_t pid = 9;
    int plen = PLEN[0];
    rollout_opts o = rollout_opts_default();
    o.temperature = 1.0f;
    o.max_new_tokens = 3;
    o.seed = 3;
    rollout_seq *a = malloc(sizeof *a * N), *b = malloc(sizeof *b * N);
    generate(&m, NULL, pp, &plen, &pid, 1, N, &o, a);
    rollout_stats st;
    o.mtp_speculative = 1;
    o.stats = &st;
    generate(&m, NULL, pp, &plen, &pid, 1, N, &o, b);
    cr_expect_eq(st.drafted, N);
    double expect[V] = {0};
    int count[2][V] = {{0}}, differ = 0;
    int32_t ids[8];
    memcpy(ids, pp[0], sizeof(int32_t) * (size_t)plen);
    for (int i = 0; i < N; i++) {
        cr_assert_eq(a[i].tokens[0], b[i].tokens[0]);
        count[0][a[i].tokens[1]]++;
        count[1][b[i].tokens[1]]++;
        differ += a[i].tokens[1] != b[i].tokens[1];
        ids[plen] = a[i].tokens[0];
        model_batch mb = {.ids = ids, .T = plen + 1, .skip_mtp = 1};
        mr_err e = {0};
        cr_assert_eq(model_forward(&m, &mb, 0, NULL, &e), MR_OK, "%s", e.msg);
        const float *z = model_logits(&m) + (size_t)plen * V;
        double mx = z[0], sum = 0;
        for (int v = 1; v < V; v++) mx = z[v] > mx ? z[v] : mx;
        for (int v = 0; v < V; v++) sum += exp((double)z[v] - mx);
        for (int v = 0; v < V; v++) expect[v] += exp((double)z[v] - mx) / sum;
    }
    cr_expect_gt(differ, 20, "speculative draws should differ from plain ones (%d differ)", differ);
    for (int k = 0; k < 2; k++) {
        double chi2 = 0, rest_e = 0;
        int rest_c = 0, dof = -1;
        for (int v = 0; v < V; v++) {
            if (expect[v] >= 5) {
                chi2 += (count[k][v] - expect[v]) * (count[k][v] - expect[v]) / expect[v];
                dof++;
            } else {
                rest_e += expect[v];
                rest_c += count[k][v];
            }
        }
        if (rest_e > 0) chi2 += (rest_c - rest_e) * (rest_c - rest_e) / rest_e, dof++;
        cr_assert_gt(dof, 5);
        cr_expect_lt(chi2, dof + 5 * sqrt(2.0 * dof), "%s: chi2 %.1f with %d dof", k ? "speculative" : "plain", chi2,
                     dof);
    }
    free_seqs(a, N);
    free_seqs(b, N);
    free(a);
    free(b);
    model_free(&m);
}

Test(rollout, mtp_speculative_needs_mtp_module) {
    model_config c;
    small_config(&c, 53);
    c.num_nextn_predict_layers = 0;
    model_params p;
    random_params(&p, &c);
    model m;
    model_opts opt = {.mm = MM_DET};
    mr_err e = {0};
    cr_assert_eq(model_init(&m, &p, &opt, 16, &e), MR_OK, "%s", e.msg);
    const int32_t *pp[NP];
    make_prompts(53, pp);
    int64_t pid[NP] = {0, 1, 2};
    rollout_opts o = rollout_opts_default();
    o.mtp_speculative = 1;
    rollout_seq out[NP];
    memset(out, 0, sizeof out);
    cr_expect_eq(rollout_generate(&m, NULL, pp, PLEN, pid, NP, 1, &o, out, &e), MR_EINVAL);
    cr_expect_str_eq(e.msg, "rollout: mtp_speculative needs a model with an MTP module (num_nextn_predict_layers >= 1), got 0");
    model_free(&m);
}
