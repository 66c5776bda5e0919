/* judge.c: an LLM judge for free-form answers the rule plugins cannot score. It asks an OpenAI-compatible
 * chat-completions endpoint (libcurl, one handle per worker) with a prompt template, reads the verdict
 * (CORRECT / INCORRECT, or a number), and caches it by SHA-256 of (prompt, completion) so a repeated sample is
 * never asked twice. The call times out with CURLOPT_TIMEOUT_MS at the deadline: TIMEOUT, never a hang.
 * judge.model (a local checkpoint run by the rollout engine) is refused until that engine exists. */
#include <ctype.h>
#include <curl/curl.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/mem.h"
#include "core/sha256.h"
#include "rewards/reward.h"

#define CACHE_BUCKETS 4096
#define REPLY_MAX (1u << 20)

static const char default_template[] =
    "You are grading a student's answer to a problem.\n\nProblem:\n{prompt}\n\nReference answer: {answer}\n\n"
    "Student's answer:\n{completion}\n\nIs the student's final answer correct? Reply with one word: CORRECT or "
    "INCORRECT.";

typedef struct centry {
    uint8_t key[32];
    double score;
    struct centry *next;
} centry;

typedef struct {
    char *endpoint, *api_model, *api_key, *template_;
    pthread_mutex_t mu; /* guards the cache, the one mutable part shared by workers */
    int mu_ok;
    centry *buckets[CACHE_BUCKETS];
    long hits, misses;
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

static int cache_get(judge_impl *j, const uint8_t key[32], double *score) {
    size_t b = ((size_t)key[0] | (size_t)key[1] << 8) % CACHE_BUCKETS;
    int hit = 0;
    pthread_mutex_lock(&j->mu);
    for (centry *e = j->buckets[b]; e; e = e->next)
        if (!memcmp(e->key, key, 32)) {
            *score = e->score;
            hit = 1;
            break;
        }
    if (hit) j->hits++;
    else j->misses++;
    pthread_mutex_unlock(&j->mu);
    return hit;
}

static void cache_put(judge_impl *j, const uint8_t key[32], double score) {
    centry *n = mem_alloc(sizeof *n);
    if (!n) return; /* a cache that cannot grow only costs a repeated question */
    memcpy(n->key, key, 32);
    n->score = score;
    size_t b = ((size_t)key[0] | (size_t)key[1] << 8) % CACHE_BUCKETS;
    pthread_mutex_lock(&j->mu);
    n->next = j->buckets[b];
    j->buckets[b] = n;
    pthread_mutex_unlock(&j->mu);
}

/* ---- the prompt -------------------------------------------------------------------------------------- */

typedef struct {
    char *s;
    size_t n, cap;
    int oom;
} dbuf;

static void db_put(dbuf *d, const char *s, size_t n) {
    if (d->oom) return;
    if (d->n + n + 1 > d->cap) {
        size_t cap = (d->cap ? d->cap : 256);
        while (cap < d->n + n + 1) cap *= 2;
        char *ns = mem_realloc(d->s, cap);
        if (!ns) {
            d->oom = 1;
            return;
        }
        d->s = ns;
        d->cap = cap;
    }
    memcpy(d->s + d->n, s, n);
    d->n += n;
    d->s[d->n] = '\0';
}

static char *fill_template(const char *t, const reward_sample *s) {
    dbuf d = {0};
    char buf[64];
    const char *ans = reward_row_text(s->row, "answer", buf, sizeof buf);
    db_put(&d, "", 0);
    for (const char *p = t; *p;) {
        const char *v = NULL;
        size_t skip = 0;
        if (!strncmp(p, "{prompt}", 8)) v = s->prompt ? s->prompt : "", skip = 8;
        else if (!strncmp(p, "{completion}", 12)) v = s->completion ? s->completion : "", skip = 12;
        else if (!strncmp(p, "{answer}", 8)) v = ans ? ans : "(none given)", skip = 8;
        if (v) {
            db_put(&d, v, strlen(v));
            p += skip;
        } else {
            db_put(&d, p, 1);
            p++;
        }
    }
    if (d.oom) {
        mem_free(d.s);
        return NULL;
    }
    return d.s;
}

/* ---- HTTP -------------------------------------------------------------------------------------------- */

static size_t on_body(char *ptr, size_t size, size_t nmemb, void *ud) {
    dbuf *d = ud;
    size_t n = size * nmemb;
    if (d->n + n > REPLY_MAX) return 0; /* too long: abort the transfer */
    db_put(d, ptr, n);
    return d->oom ? 0 : n;
}

static int judge_worker_init(const reward_plugin *p, void **ws, mr_err *e) {
    (void)p;
    *ws = curl_easy_init();
    if (!*ws) return err_set(e, MR_ENOMEM, "judge: curl_easy_init failed");
    return 0;
}

static void judge_worker_free(const reward_plugin *p, void *ws) {
    (void)p;
    if (ws) curl_easy_cleanup(ws);
}

static void judge_score(const reward_plugin *p, void *ws, const reward_sample *s, double deadline, reward_result *out,
                        int *discard) {
    (void)discard;
    judge_impl *j = p->impl;
    CURL *h = ws;
    uint8_t key[32];
    cache_key(s, key);
    double v;
    if (cache_get(j, key, &v)) {
        reward_result_set(out, REWARD_SCORE, v, "cached verdict");
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
    dbuf reply = {0};
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
        cJSON *resp = reply.s ? cJSON_Parse(reply.s) : NULL;
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
            cache_put(j, key, v);
        }
        cJSON_Delete(resp);
    }
    mem_free(reply.s);
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
    mem_free(j->endpoint);
    mem_free(j->api_model);
    mem_free(j->api_key);
    mem_free(j->template_);
    mem_free(j);
    p->impl = NULL;
}

static int judge_init(reward_plugin *p, const recipe *r, const char *item, const char *dir, mr_err *e) {
    (void)dir;
    char path[128];
    snprintf(path, sizeof path, "%s.judge.model", item);
    if (recipe_is_set(r, path))
        return err_set(e, MR_EINVAL, "%s: judge.model needs the rollout engine (not built yet); use judge.endpoint", path);
    judge_impl *j = mem_calloc(1, sizeof *j);
    if (!j) return err_set(e, MR_ENOMEM, "out of memory");
    p->impl = j;
    if (pthread_mutex_init(&j->mu, NULL) != 0) return err_set(e, MR_EINTERNAL, "judge: mutex");
    j->mu_ok = 1;
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
