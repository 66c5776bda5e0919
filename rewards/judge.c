/* judge.c: an LLM judge for free-form answers the rule plugins cannot score. It asks an OpenAI-compatible
 * chat-completions endpoint (libcurl, one handle per worker) with a prompt template, reads the verdict
 * (CORRECT / INCORRECT, or a number), and caches it by SHA-256 of (prompt, completion) so a repeated sample is
 * never asked twice. The call times out with CURLOPT_TIMEOUT_MS at the deadline: TIMEOUT, never a hang.
 * judge.model instead runs a local checkpoint (weights + tokenizer of DIR, loaded once per reward set) with the
 * rollout engine: greedy, at most JUDGE_NEW_TOKENS tokens. A model is not thread-safe and its arena is one, so
 * workers take turns on it under a mutex; the cache is shared by both kinds. */
#include <ctype.h>
#include <curl/curl.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/mem.h"
#include "core/strbuf.h"
#include "core/sha256.h"
#include "model/model.h"
#include "rewards/reward.h"
#include "rollout/rollout.h"
#include "tokenizer/tokenizer.h"

#define CACHE_BUCKETS 4096
#define REPLY_MAX (1u << 20)
#define JUDGE_NEW_TOKENS 16 /* a verdict is a word or a number */
#define JUDGE_T_MAX 2048    /* tokens of judge prompt + verdict the local model's arena holds */

static const char default_template[] =
    "You are grading a student's answer to a problem.\n\nProblem:\n{prompt}\n\nReference answer: {answer}\n\n"
    "Student's answer:\n{completion}\n\nIs the student's final answer correct? Reply with one word: CORRECT or "
    "INCORRECT.";

typedef struct centry {
    uint8_t key[32];
    double score;
    char unreadable[84]; /* the local judge's unreadable verdict (greedy, so it would say it again), or "" */
    struct centry *next;
} centry;

typedef struct {
    char *endpoint, *api_model, *api_key, *template_;
    pthread_mutex_t mu; /* guards the cache, the one mutable part shared by workers */
    int mu_ok;
    centry *buckets[CACHE_BUCKETS];
    long hits, misses;
    /* judge.model */
    char *model_dir;
    model *lm;
    tokenizer *tok;
    pthread_mutex_t lmu; /* one generation at a time: the model's arena and the tokenizer's encoder are shared */
    int lmu_ok;
} judge_impl;

/* ---- verdicts ---------------------------------------------------------------------------------------- */

int judge_parse_verdict(const char *reply, double *score) {
    int found = 0;
    for (const char *p = reply; *p;) {
        if (!isalpha((unsigned char)*p)) {
            p++;
            continue;
        }
        const char *w = p;
        while (isalpha((unsigned char)*p)) p++;
        size_t n = (size_t)(p - w);
        if (n == 7 && !strncasecmp(w, "correct", 7)) *score = 1.0, found = 1;
        else if (n == 9 && !strncasecmp(w, "incorrect", 9)) *score = 0.0, found = 1;
    }
    if (found) return 1;
    /* a bare number ("0.75", "1.", " 3 ") */
    char *end;
    double v = strtod(reply, &end);
    if (end == reply) return 0;
    while (*end == '.' || isspace((unsigned char)*end)) end++;
    if (*end) return 0;
    *score = v;
    return 1;
}

/* ---- the cache --------------------------------------------------------------------------------------- */

static void cache_key(const reward_sample *s, uint8_t key[32]) {
    sha256_ctx c;
    sha256_init(&c);
    const char *p = s->prompt ? s->prompt : "", *q = s->completion ? s->completion : "";
    sha256_update(&c, p, strlen(p) + 1); /* the NUL separates the two */
    sha256_update(&c, q, strlen(q));
    sha256_final(&c, key);
}

static int cache_get(judge_impl *j, const uint8_t key[32], double *score, char unreadable[84]) {
    size_t b = ((size_t)key[0] | (size_t)key[1] << 8) % CACHE_BUCKETS;
    int hit = 0;
    pthread_mutex_lock(&j->mu);
    for (centry *e = j->buckets[b]; e; e = e->next)
        if (!memcmp(e->key, key, 32)) {
            *score = e->score;
            memcpy(unreadable, e->unreadable, sizeof e->unreadable);
            hit = 1;
            break;
        }
    if (hit) j->hits++;
    else j->misses++;
    pthread_mutex_unlock(&j->mu);
    return hit;
}

static void cache_put(judge_impl *j, const uint8_t key[32], double score, const char *unreadable) {
    centry *n = mem_alloc(sizeof *n);
    if (!n) return; /* a cache that cannot grow only costs a repeated question */
    memcpy(n->key, key, 32);
    n->score = score;
    snprintf(n->unreadable, sizeof n->unreadable, "%s", unreadable ? unreadable : "");
    size_t b = ((size_t)key[0] | (size_t)key[1] << 8) % CACHE_BUCKETS;
    pthread_mutex_lock(&j->mu);
    n->next = j->buckets[b];
    j->buckets[b] = n;
    pthread_mutex_unlock(&j->mu);
}

/* ---- the prompt -------------------------------------------------------------------------------------- */

static char *fill_template(const char *t, const reward_sample *s) {
    strbuf d = {0};
    char buf[64];
    const char *ans = reward_row_text(s->row, "answer", buf, sizeof buf);
    strbuf_putn(&d, "", 0);
    for (const char *p = t; *p;) {
        const char *v = NULL;
        size_t skip = 0;
        if (!strncmp(p, "{prompt}", 8)) v = s->prompt ? s->prompt : "", skip = 8;
        else if (!strncmp(p, "{completion}", 12)) v = s->completion ? s->completion : "", skip = 12;
        else if (!strncmp(p, "{answer}", 8)) v = ans ? ans : "(none given)", skip = 8;
        if (v) {
            strbuf_putn(&d, v, strlen(v));
            p += skip;
        } else {
            strbuf_putn(&d, p, 1);
            p++;
        }
    }
    if (d.oom) {
        mem_free(d.p);
        return NULL;
    }
    return d.p;
}

/* ---- HTTP -------------------------------------------------------------------------------------------- */

static size_t on_body(char *ptr, size_t size, size_t nmemb, void *ud) {
    strbuf *d = ud;
    size_t n = size * nmemb;
    if (d->n + n > REPLY_MAX) return 0; /* too long: abort the transfer */
    strbuf_putn(d, ptr, n);
    return d->oom ? 0 : n;
}

static int judge_worker_init(const reward_plugin *p, void **ws, mr_err *e) {
    const judge_impl *j = p->impl;
    if (j && j->lm) { /* the local judge keeps no per-worker state */
        *ws = NULL;
        return 0;
    }
    *ws = curl_easy_init();
    if (!*ws) return err_set(e, MR_ENOMEM, "judge: curl_easy_init failed");
    return 0;
}

static void judge_worker_free(const reward_plugin *p, void *ws) {
    (void)p;
    if (ws) curl_easy_cleanup(ws);
}

/* ---- the local checkpoint ----------------------------------------------------------------------------- */

/* Greedy verdict of the local model for the rendered judge prompt (under j->lmu). */
static void local_verdict(judge_impl *j, const char *prompt, double deadline, const uint8_t key[32],
                          reward_result *out) {
    tok_ids ids = {0};
    rollout_seq seq = {0};
    char *text = NULL;
    mr_err e = {0};
    double v;
    if (reward_now() >= deadline) { /* waited for the model past the limit */
        reward_result_set(out, REWARD_TIMEOUT, 0, "timeout waiting for the judge model");
        return;
    }
    if (tok_encode(j->tok, prompt, strlen(prompt), TOK_SPECIAL, &ids, &e)) {
        reward_result_set(out, REWARD_ERROR, 0, "judge model %s: %s", j->model_dir, e.msg);
        goto done;
    }
    if ((int)ids.n + JUDGE_NEW_TOKENS > j->lm->T_max) {
        reward_result_set(out, REWARD_ERROR, 0, "judge model %s: the judge prompt has %zu tokens, more than the %d "
                          "it can take with a %d-token verdict", j->model_dir, ids.n, j->lm->T_max - JUDGE_NEW_TOKENS,
                          JUDGE_NEW_TOKENS);
        goto done;
    }
    rollout_opts o = rollout_opts_default();
    o.temperature = 0; /* greedy: the verdict is a function of the prompt, so caching it is sound */
    o.max_new_tokens = JUDGE_NEW_TOKENS;
    o.eos = tok_eos_id(j->tok);
    const int32_t *pr = ids.v;
    int pl = (int)ids.n;
    int64_t pid = 0;
    if (rollout_generate(j->lm, j->tok, &pr, &pl, &pid, 1, 1, &o, &seq, &e) ||
        tok_decode(j->tok, seq.tokens, (size_t)seq.n, 1, &text, NULL, &e)) {
        reward_result_set(out, REWARD_ERROR, 0, "judge model %s: %s", j->model_dir, e.msg);
        goto done;
    }
    if (!judge_parse_verdict(text, &v)) {
        reward_result_set(out, REWARD_UNSCORABLE, 0, "unreadable verdict '%.80s'", text);
        cache_put(j, key, 0, text[0] ? text : " ");
    } else {
        reward_result_set(out, REWARD_SCORE, v, "verdict '%.40s'", text);
        cache_put(j, key, v, NULL);
    }
done:
    mem_free(text);
    rollout_seq_free(&seq);
    tok_ids_free(&ids);
}

static void judge_score(const reward_plugin *p, void *ws, const reward_sample *s, double deadline, reward_result *out,
                        int *discard) {
    (void)discard;
    judge_impl *j = p->impl;
    CURL *h = ws;
    uint8_t key[32];
    cache_key(s, key);
    double v;
    char unreadable[84];
    if (cache_get(j, key, &v, unreadable)) {
        if (unreadable[0]) reward_result_set(out, REWARD_UNSCORABLE, 0, "unreadable verdict '%.80s' (cached)", unreadable);
        else reward_result_set(out, REWARD_SCORE, v, "cached verdict");
        return;
    }
    if (j->lm) {
        char *lp = fill_template(j->template_, s);
        if (!lp) {
            reward_result_set(out, REWARD_ERROR, 0, "judge: out of memory");
            return;
        }
        pthread_mutex_lock(&j->lmu);
        local_verdict(j, lp, deadline, key, out);
        pthread_mutex_unlock(&j->lmu);
        mem_free(lp);
        return;
    }
    char *prompt = fill_template(j->template_, s);
    cJSON *req = cJSON_CreateObject();
    char *body = NULL;
    if (prompt && req) {
        cJSON_AddStringToObject(req, "model", j->api_model);
        cJSON *msgs = cJSON_AddArrayToObject(req, "messages");
        cJSON *m = cJSON_CreateObject();
        if (msgs && m) {
            cJSON_AddStringToObject(m, "role", "user");
            cJSON_AddStringToObject(m, "content", prompt);
            cJSON_AddItemToArray(msgs, m);
            m = NULL;
        }
        cJSON_Delete(m);
        cJSON_AddNumberToObject(req, "temperature", 0);
        cJSON_AddNumberToObject(req, "max_tokens", 32);
        body = cJSON_PrintUnformatted(req);
    }
    cJSON_Delete(req);
    mem_free(prompt);
    if (!body) {
        reward_result_set(out, REWARD_ERROR, 0, "judge: out of memory");
        return;
    }
    long ms = (long)((deadline - reward_now()) * 1000.0);
    if (ms < 1) ms = 1;
    struct curl_slist *hdr = curl_slist_append(NULL, "Content-Type: application/json");
    char auth[512];
    if (j->api_key && hdr) {
        snprintf(auth, sizeof auth, "Authorization: Bearer %s", j->api_key);
        struct curl_slist *h2 = curl_slist_append(hdr, auth);
        if (h2) hdr = h2;
    }
    strbuf reply = {0};
    curl_easy_reset(h);
    curl_easy_setopt(h, CURLOPT_URL, j->endpoint);
    curl_easy_setopt(h, CURLOPT_HTTPHEADER, hdr);
    curl_easy_setopt(h, CURLOPT_POSTFIELDS, body);
    curl_easy_setopt(h, CURLOPT_TIMEOUT_MS, ms);
    curl_easy_setopt(h, CURLOPT_NOSIGNAL, 1L); /* threads: no SIGALRM for DNS timeouts */
    curl_easy_setopt(h, CURLOPT_WRITEFUNCTION, on_body);
    curl_easy_setopt(h, CURLOPT_WRITEDATA, &reply);
    CURLcode cc = curl_easy_perform(h);
    long status = 0;
    curl_easy_getinfo(h, CURLINFO_RESPONSE_CODE, &status);
    curl_slist_free_all(hdr);
    cJSON_free(body);
    if (cc == CURLE_OPERATION_TIMEDOUT) {
        reward_result_set(out, REWARD_TIMEOUT, 0, "timeout %.1f s", p->timeout_s);
    } else if (cc != CURLE_OK) {
        reward_result_set(out, REWARD_ERROR, 0, "judge endpoint %s: %s", j->endpoint, curl_easy_strerror(cc));
    } else if (status < 200 || status >= 300) {
        reward_result_set(out, REWARD_ERROR, 0, "judge endpoint %s: HTTP %ld", j->endpoint, status);
    } else {
        cJSON *resp = reply.p ? cJSON_Parse(reply.p) : NULL;
        const cJSON *ch = resp ? cJSON_GetArrayItem(cJSON_GetObjectItemCaseSensitive(resp, "choices"), 0) : NULL;
        const cJSON *msg = ch ? cJSON_GetObjectItemCaseSensitive(ch, "message") : NULL;
        const cJSON *content = msg ? cJSON_GetObjectItemCaseSensitive(msg, "content") : NULL;
        if (!cJSON_IsString(content)) {
            reward_result_set(out, REWARD_ERROR, 0, "judge endpoint %s: no choices[0].message.content in the reply",
                              j->endpoint);
        } else if (!judge_parse_verdict(content->valuestring, &v)) {
            reward_result_set(out, REWARD_UNSCORABLE, 0, "unreadable verdict '%.80s'", content->valuestring);
        } else {
            reward_result_set(out, REWARD_SCORE, v, "verdict '%.40s'", content->valuestring);
            cache_put(j, key, v, NULL);
        }
        cJSON_Delete(resp);
    }
    mem_free(reply.p);
}

/* ---- the plugin -------------------------------------------------------------------------------------- */

static void judge_free(reward_plugin *p) {
    judge_impl *j = p->impl;
    if (!j) return;
    for (size_t b = 0; b < CACHE_BUCKETS; b++)
        for (centry *e = j->buckets[b], *n; e; e = n) {
            n = e->next;
            mem_free(e);
        }
    if (j->mu_ok) pthread_mutex_destroy(&j->mu);
    if (j->lmu_ok) { /* a worker abandoned at its deadline may still be generating: wait for it */
        pthread_mutex_lock(&j->lmu);
        pthread_mutex_unlock(&j->lmu);
        pthread_mutex_destroy(&j->lmu);
    }
    if (j->lm) model_free(j->lm);
    mem_free(j->lm);
    tok_free(j->tok);
    mem_free(j->model_dir);
    mem_free(j->endpoint);
    mem_free(j->api_model);
    mem_free(j->api_key);
    mem_free(j->template_);
    mem_free(j);
    p->impl = NULL;
}

/* judge.model: DIR's weights and tokenizer, once; DIR relative to the recipe's folder. */
static int local_init(judge_impl *j, const char *key, const char *dir_in, const char *dir, mr_err *e) {
    size_t n = strlen(dir_in) + (dir ? strlen(dir) : 0) + 2;
    if (!(j->model_dir = mem_alloc(n))) return err_set(e, MR_ENOMEM, "out of memory");
    if (dir_in[0] == '/' || !dir || !dir[0]) snprintf(j->model_dir, n, "%s", dir_in);
    else snprintf(j->model_dir, n, "%s/%s", dir, dir_in);
    if (pthread_mutex_init(&j->lmu, NULL) != 0) return err_set(e, MR_EINTERNAL, "judge: mutex");
    j->lmu_ok = 1;
    model_params mp;
    memset(&mp, 0, sizeof mp);
    int rc = params_load(&mp, j->model_dir, e);
    if (rc) return err_prefix(e, "%s", key);
    if ((rc = tok_load(&j->tok, j->model_dir, e))) {
        params_free(&mp);
        return err_prefix(e, "%s", key);
    }
    if (tok_vocab_size(j->tok) > mp.cfg.vocab_size) {
        int vs = mp.cfg.vocab_size;
        params_free(&mp);
        return err_set(e, MR_EINVAL, "%s: %s: the tokenizer has %d tokens but the model's vocab_size is %d", key,
                       j->model_dir, tok_vocab_size(j->tok), vs);
    }
    int T_max = mp.cfg.max_position_embeddings > 0 && mp.cfg.max_position_embeddings < JUDGE_T_MAX
                    ? mp.cfg.max_position_embeddings
                    : JUDGE_T_MAX;
    if (!(j->lm = mem_calloc(1, sizeof *j->lm))) {
        params_free(&mp);
        return err_set(e, MR_ENOMEM, "out of memory");
    }
    model_opts mo = {.mm = MM_DET};
    if ((rc = model_init(j->lm, &mp, &mo, T_max, e))) return err_prefix(e, "%s: %s", key, j->model_dir);
    return MR_OK;
}

static int judge_init(reward_plugin *p, const recipe *r, const char *item, const char *dir, mr_err *e) {
    char path[128];
    judge_impl *j = mem_calloc(1, sizeof *j);
    if (!j) return err_set(e, MR_ENOMEM, "out of memory");
    p->impl = j;
    if (pthread_mutex_init(&j->mu, NULL) != 0) return err_set(e, MR_EINTERNAL, "judge: mutex");
    j->mu_ok = 1;
    snprintf(path, sizeof path, "%s.judge.model", item);
    if (recipe_is_set(r, path)) {
        int rc = local_init(j, path, recipe_str(r, path), dir, e);
        if (rc) return rc;
        snprintf(path, sizeof path, "%s.judge.prompt_template", item);
        const char *t = recipe_str(r, path);
        if (!(j->template_ = mem_strdup(t ? t : default_template))) return err_set(e, MR_ENOMEM, "out of memory");
        return MR_OK;
    }
    snprintf(path, sizeof path, "%s.judge.endpoint", item);
    j->endpoint = mem_strdup(recipe_str(r, path));
    snprintf(path, sizeof path, "%s.judge.api_model", item);
    j->api_model = mem_strdup(recipe_str(r, path));
    snprintf(path, sizeof path, "%s.judge.prompt_template", item);
    const char *t = recipe_str(r, path);
    j->template_ = mem_strdup(t ? t : default_template);
    snprintf(path, sizeof path, "%s.judge.api_key_env", item);
    const char *env = recipe_str(r, path);
    const char *key = env && env[0] ? getenv(env) : NULL;
    if (key && key[0]) j->api_key = mem_strdup(key);
    if (!j->endpoint || !j->api_model || !j->template_ || (key && key[0] && !j->api_key))
        return err_set(e, MR_ENOMEM, "out of memory");
    if (curl_global_init(CURL_GLOBAL_DEFAULT) != CURLE_OK) return err_set(e, MR_EINTERNAL, "judge: curl_global_init failed");
    return 0;
}

const reward_plugin_ops reward_judge_ops = {.kind = "judge",
                                            .init = judge_init,
                                            .worker_init = judge_worker_init,
                                            .worker_free = judge_worker_free,
                                            .score = judge_score,
                                            .free = judge_free};
