/* test_reward_judge.c: the judge fallback against a real HTTP server that the test runs on loopback (a small
 * chat-completions server on a thread): asked only for samples the rule plugins found unscorable, its verdict
 * standing in with their weight, the request it sends, the cache, HTTP errors, unreadable replies, an
 * unreachable endpoint and a clean timeout. */
#include <arpa/inet.h>
#include <criterion/criterion.h>
#include <netinet/in.h>
#include <poll.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "core/recipe.h"
#include "rewards/reward.h"
#include "tests/testutil.h"

#define BASE "run:\n  name: t\nmodel:\n  preset: tiny\ntokenizer:\n  train:\ndata:\n  generator:\n    task: arithmetic\n"

typedef struct {
    int fd, port, stop, requests;
    char last_body[8192];
    pthread_t tid;
    pthread_mutex_t mu;
} server;

static void reply(int c, int status, const char *body) {
    char hdr[256];
    int n = snprintf(hdr, sizeof hdr, "HTTP/1.1 %d X\r\nContent-Type: application/json\r\nContent-Length: %zu\r\n"
                                      "Connection: close\r\n\r\n", status, strlen(body));
    /* MSG_NOSIGNAL: a client that gave up (the SLOW case times out and closes) must not SIGPIPE the test */
    if (send(c, hdr, (size_t)n, MSG_NOSIGNAL) < 0 || send(c, body, strlen(body), MSG_NOSIGNAL) < 0) return;
}

static void *serve(void *arg) {
    server *s = arg;
    while (!s->stop) {
        struct pollfd p = {.fd = s->fd, .events = POLLIN};
        if (poll(&p, 1, 50) <= 0) continue;
        int c = accept(s->fd, NULL, NULL);
        if (c < 0) continue;
        char buf[16384];
        size_t n = 0;
        long want = -1;
        char *body = NULL;
        while (n < sizeof buf - 1) {
            ssize_t k = read(c, buf + n, sizeof buf - 1 - n);
            if (k <= 0) break;
            n += (size_t)k;
            buf[n] = '\0';
            char *end = strstr(buf, "\r\n\r\n");
            if (end && want < 0) {
                char *cl = strcasestr(buf, "Content-Length:");
                want = cl ? strtol(cl + 15, NULL, 10) : 0;
                body = end + 4;
            }
            if (body && (long)(n - (size_t)(body - buf)) >= want) break;
        }
        pthread_mutex_lock(&s->mu);
        s->requests++;
        snprintf(s->last_body, sizeof s->last_body, "%s", body ? body : "");
        pthread_mutex_unlock(&s->mu);
        const char *content = "INCORRECT";
        if (body && strstr(body, "SLOW")) usleep(800 * 1000);
        if (body && strstr(body, "SERVERERR")) {
            reply(c, 500, "{\"error\": \"boom\"}");
        } else if (body && strstr(body, "BADJSON")) {
            reply(c, 200, "<html>not json</html>");
        } else {
            if (body && strstr(body, "FORTYTWO")) content = "The student's answer is CORRECT.";
            if (body && strstr(body, "MUMBLE")) content = "Hard to say.";
            if (body && strstr(body, "NUMERIC")) content = "0.75";
            char js[512];
            snprintf(js, sizeof js, "{\"choices\": [{\"message\": {\"role\": \"assistant\", \"content\": \"%s\"}}]}", content);
            reply(c, 200, js);
        }
        close(c);
    }
    return NULL;
}

static void server_start(server *s) {
    memset(s, 0, sizeof *s);
    pthread_mutex_init(&s->mu, NULL);
    s->fd = socket(AF_INET, SOCK_STREAM, 0);
    cr_assert_geq(s->fd, 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    cr_assert_eq(bind(s->fd, (struct sockaddr *)&a, sizeof a), 0);
    cr_assert_eq(listen(s->fd, 16), 0);
    socklen_t len = sizeof a;
    getsockname(s->fd, (struct sockaddr *)&a, &len);
    s->port = ntohs(a.sin_port);
    cr_assert_eq(pthread_create(&s->tid, NULL, serve, s), 0);
}

static void server_stop(server *s) {
    s->stop = 1;
    pthread_join(s->tid, NULL);
    close(s->fd);
    pthread_mutex_destroy(&s->mu);
}

static int requests(server *s) {
    pthread_mutex_lock(&s->mu);
    int n = s->requests;
    pthread_mutex_unlock(&s->mu);
    return n;
}

static reward_set *judge_set(int port, const char *extra) {
    char text[4096];
    snprintf(text, sizeof text,
             "%srewards:\n  - math:\n    weight: 2.0\n  - judge:\n      endpoint: http://127.0.0.1:%d/v1/chat/completions\n"
             "      api_model: judge-1\n      api_key_env: MOERL_TEST_KEY\n    timeout_s: 0.3\n%s",
             BASE, port, extra ? extra : "");
    recipe *r = NULL;
    mr_err e = {0};
    cr_assert_eq(recipe_load_string(&r, text, "t.yaml", &e), 0, "%s", e.msg);
    cr_assert_eq(recipe_resolve(r, &e), 0, "%s", e.msg);
    reward_set *s = NULL;
    reward_set_opts o = {.workers = 1};
    cr_assert_eq(reward_set_init(&s, r, &o, &e), 0, "%s", e.msg);
    recipe_free(r);
    return s;
}

static reward_outcome score1(reward_set *s, const char *completion, reward_result res[2]) {
    cJSON *row = cJSON_Parse("{\"answer\": \"42\"}");
    reward_sample smp = {.prompt = "What is six times seven?", .completion = completion, .row = row};
    reward_outcome o;
    mr_err e = {0};
    cr_assert_eq(reward_set_score(s, &smp, 1, res, &o, &e), 0, "%s", e.msg);
    cJSON_Delete(row);
    return o;
}

Test(judge, verdicts) {
    double v = -1;
    cr_assert(judge_parse_verdict("CORRECT", &v) && v == 1.0);
    cr_assert(judge_parse_verdict("incorrect.", &v) && v == 0.0);
    cr_assert(judge_parse_verdict("Not sure it is correct... final: INCORRECT", &v) && v == 0.0);
    cr_assert(judge_parse_verdict(" 0.25 ", &v) && v == 0.25);
    cr_assert(!judge_parse_verdict("maybe", &v));
    cr_assert(!judge_parse_verdict("0.5 points", &v));
    cr_assert(!judge_parse_verdict("correctness", &v));
}

Test(judge, fallback_over_http) {
    server srv;
    server_start(&srv);
    setenv("MOERL_TEST_KEY", "sk-test", 1);
    reward_set *s = judge_set(srv.port, NULL);
    reward_result res[2];

    /* math decides: the judge is not asked */
    reward_outcome o = score1(s, "#### 42", res);
    cr_assert_eq(o.status, REWARD_SCORE);
    cr_assert_float_eq(o.total, 2.0, 0);
    cr_assert_eq(res[1].status, REWARD_SKIPPED);
    cr_assert_eq(requests(&srv), 0);

    /* free-form: math is unscorable, the judge says CORRECT and stands in with math's weight */
    o = score1(s, "It is FORTYTWO, forty-two.", res);
    cr_assert_eq(res[0].status, REWARD_UNSCORABLE);
    cr_assert_eq(res[1].status, REWARD_SCORE, "%s", res[1].reason);
    cr_assert_eq(o.status, REWARD_SCORE, "%s", o.reason);
    cr_assert_float_eq(o.total, 2.0, 0);
    cr_assert_eq(requests(&srv), 1);
    cJSON *req = cJSON_Parse(srv.last_body);
    cr_assert_not_null(req, "%s", srv.last_body);
    cr_assert_str_eq(cJSON_GetObjectItem(req, "model")->valuestring, "judge-1");
    const char *content = cJSON_GetObjectItem(cJSON_GetArrayItem(cJSON_GetObjectItem(req, "messages"), 0), "content")->valuestring;
    cr_assert(strstr(content, "Problem:\nWhat is six times seven?") && strstr(content, "Reference answer: 42") &&
              strstr(content, "Student's answer:\nIt is FORTYTWO"), "%s", content);
    cJSON_Delete(req);

    /* the same (prompt, completion) again: from the cache, no request */
    o = score1(s, "It is FORTYTWO, forty-two.", res);
    cr_assert_str_eq(res[1].reason, "cached verdict");
    cr_assert_float_eq(o.total, 2.0, 0);
    cr_assert_eq(requests(&srv), 1);

    /* INCORRECT -> 0; a number is a score */
    o = score1(s, "it is forty-one", res);
    cr_assert_eq(o.status, REWARD_SCORE);
    cr_assert_float_eq(o.total, 0.0, 0);
    o = score1(s, "NUMERIC something", res);
    cr_assert_float_eq(o.total, 2.0 * 0.75, 1e-12);

    /* an unreadable verdict is unscorable; HTTP 500 and a non-JSON body are errors */
    o = score1(s, "MUMBLE", res);
    cr_assert_eq(o.status, REWARD_UNSCORABLE);
    cr_assert_str_eq(o.reason, "judge: unreadable verdict 'Hard to say.'");
    o = score1(s, "SERVERERR", res);
    cr_assert_eq(o.status, REWARD_ERROR);
    char want[256];
    snprintf(want, sizeof want, "judge: judge endpoint http://127.0.0.1:%d/v1/chat/completions: HTTP 500", srv.port);
    cr_assert_str_eq(o.reason, want);
    o = score1(s, "BADJSON", res);
    cr_assert_eq(o.status, REWARD_ERROR);
    cr_assert(strstr(o.reason, "no choices[0].message.content"), "%s", o.reason);

    /* a judge slower than its limit: TIMEOUT within the limit (+10%) */
    double t0 = reward_now();
    o = score1(s, "SLOW", res);
    double dt = reward_now() - t0;
    cr_assert_eq(res[1].status, REWARD_TIMEOUT, "%s", res[1].reason);
    cr_assert_str_eq(res[1].reason, "timeout 0.3 s");
    cr_assert_eq(o.status, REWARD_TIMEOUT);
    cr_assert_lt(dt, 0.33 + 0.05, "took %.3f s", dt);

    reward_stats st;
    reward_set_stats(s, 1, &st);
    cr_assert_eq(st.n, 8); /* asked (or cached) for every sample but the first */
    cr_assert_float_eq(st.timeout_rate, 1.0 / 8, 1e-12);
    cr_assert_float_eq(st.error_rate, 2.0 / 8, 1e-12);
    cr_assert_float_eq(st.unscorable_rate, 1.0 / 8, 1e-12);
    reward_set_free(s);
    server_stop(&srv);
}

Test(judge, unreachable_endpoint) {
    /* a port nobody listens on: a bound, closed socket's port */
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    bind(fd, (struct sockaddr *)&a, sizeof a);
    socklen_t len = sizeof a;
    getsockname(fd, (struct sockaddr *)&a, &len);
    int port = ntohs(a.sin_port);
    close(fd);
    reward_set *s = judge_set(port, NULL);
    reward_result res[2];
    reward_outcome o = score1(s, "free-form words", res);
    cr_assert_eq(o.status, REWARD_ERROR);
    cr_assert(strstr(o.reason, "Could not connect") || strstr(o.reason, "Couldn't connect"), "%s", o.reason);
    reward_set_free(s);
}

/* ---- judge.model: a local checkpoint run by the rollout engine ---------------------------------------------- */

#define TINY_CONFIG                                                                                                   \
    "{\"architectures\": [\"DeepseekV3ForCausalLM\"], \"model_type\": \"deepseek_v3\", \"vocab_size\": 300,\n"         \
    " \"hidden_size\": 32, \"intermediate_size\": 64, \"moe_intermediate_size\": 16, \"num_hidden_layers\": 2,\n"   \
    " \"first_k_dense_replace\": 1, \"n_routed_experts\": 4, \"num_experts_per_tok\": 2, \"n_shared_experts\": 1,\n" \
    " \"n_group\": 1, \"topk_group\": 1, \"num_attention_heads\": 4, \"num_key_value_heads\": 4, \"q_lora_rank\": 16,\n" \
    " \"kv_lora_rank\": 16, \"qk_nope_head_dim\": 8, \"qk_rope_head_dim\": 4, \"v_head_dim\": 8,\n"                    \
    " \"num_nextn_predict_layers\": 0, \"max_position_embeddings\": 512, \"bos_token_id\": 0, \"eos_token_id\": 1}\n"

/* A tiny checkpoint (random weights) with a BPE tokenizer trained on a few lines, in dir/ck. */
static void make_checkpoint(const char *dir) {
    char cmd[8192], *out = NULL, *cfg = tu_path(dir, "cfg.json"), *corpus = tu_path(dir, "corpus.txt");
    cr_assert_eq(tu_write(cfg, TINY_CONFIG, (size_t)-1), 0);
    cr_assert_eq(tu_write(corpus, "the answer is CORRECT\nthe answer is INCORRECT\nwhat is six times seven\n"
                                  "Problem: Reference answer: Student's answer: Is the final answer correct?\n",
                          (size_t)-1),
                 0);
    snprintf(cmd, sizeof cmd, "'%s' init-model --config '%s' --out '%s/ck' --seed 3 && '%s' tokenizer train --corpus "
             "'%s' --vocab 290 --out '%s/ck'", tu_bin(), cfg, dir, tu_bin(), corpus, dir);
    cr_assert_eq(tu_run(cmd, &out), 0, "%s", out);
    free(out);
    free(cfg);
    free(corpus);
}

static reward_set *local_judge_set(const char *model_dir, int workers, mr_err *e) {
    char text[4096];
    snprintf(text, sizeof text, "%srewards:\n  - math:\n    weight: 2.0\n  - judge:\n      model: %s\n"
             "      prompt_template: \"Q: {prompt} A: {completion} Is the answer correct?\"\n", BASE, model_dir);
    recipe *r = NULL;
    cr_assert_eq(recipe_load_string(&r, text, "t.yaml", e), 0, "%s", e->msg);
    cr_assert_eq(recipe_resolve(r, e), 0, "%s", e->msg);
    reward_set *s = NULL;
    reward_set_opts o = {.workers = workers};
    int rc = reward_set_init(&s, r, &o, e);
    recipe_free(r);
    return rc ? NULL : s;
}

Test(judge, local_checkpoint, .timeout = 60) {
    char *dir = tu_tmpdir(), ck[4200];
    make_checkpoint(dir);
    snprintf(ck, sizeof ck, "%s/ck", dir);
    mr_err e = {0};
    reward_set *s = local_judge_set(ck, 2, &e);
    cr_assert_not_null(s, "%s", e.msg);
    reward_result res[2];

    /* math decides: the judge is not asked */
    reward_outcome o = score1(s, "#### 42", res);
    cr_assert_eq(res[1].status, REWARD_SKIPPED);
    cr_assert_float_eq(o.total, 2.0, 0);

    /* free-form: the local model's greedy reply is a verdict or, from random weights, most likely not */
    o = score1(s, "It is FORTYTWO, forty-two.", res);
    cr_assert_eq(res[0].status, REWARD_UNSCORABLE);
    cr_assert(res[1].status == REWARD_SCORE || res[1].status == REWARD_UNSCORABLE, "%s: %s",
              reward_status_name(res[1].status), res[1].reason);
    const char *want = res[1].status == REWARD_SCORE ? "verdict '" : "unreadable verdict '";
    cr_assert(!strncmp(res[1].reason, want, strlen(want)), "%s", res[1].reason);
    reward_result first = res[1];

    /* the same (prompt, completion) again: the cache answers, with the same outcome */
    o = score1(s, "It is FORTYTWO, forty-two.", res);
    cr_assert_eq(res[1].status, first.status);
    if (first.status == REWARD_SCORE) {
        cr_assert_str_eq(res[1].reason, "cached verdict");
        cr_assert_float_eq(res[1].score, first.score, 0);
    } else {
        char cached[300];
        snprintf(cached, sizeof cached, "%s (cached)", first.reason);
        cr_assert_str_eq(res[1].reason, cached);
    }

    /* several samples at once on two workers take turns on the one model; greedy: the same answers as alone */
    cJSON *row = cJSON_Parse("{\"answer\": \"42\"}");
    const char *texts[4] = {"forty one", "It is FORTYTWO, forty-two.", "seven sixes", "no idea"};
    reward_sample smp[4];
    for (int i = 0; i < 4; i++) smp[i] = (reward_sample){.prompt = "What is six times seven?", .completion = texts[i], .row = row};
    reward_result many[8];
    reward_outcome oc[4];
    cr_assert_eq(reward_set_score(s, smp, 4, many, oc, &e), 0, "%s", e.msg);
    cr_assert_eq(many[3].status, first.status);
    for (int i = 0; i < 4; i++)
        cr_assert(many[2 * i + 1].status == REWARD_SCORE || many[2 * i + 1].status == REWARD_UNSCORABLE, "%d: %s", i,
                  many[2 * i + 1].reason);
    reward_set_free(s);
    s = local_judge_set(ck, 1, &e); /* a fresh set (empty cache), one worker: the same verdict text */
    cr_assert_not_null(s, "%s", e.msg);
    cr_assert_eq(reward_set_score(s, smp, 4, many + 0, oc, &e), 0, "%s", e.msg);
    cr_assert_str_eq(many[3].reason, first.reason);
    cJSON_Delete(row);
    reward_set_free(s);

    /* a directory without a checkpoint is refused at init, naming the key */
    s = local_judge_set("/nonexistent-ckpt", 1, &e);
    cr_assert_null(s);
    cr_assert(strstr(e.msg, "rewards[1].judge.model") && strstr(e.msg, "/nonexistent-ckpt"), "%s", e.msg);
    tu_rmtree(dir);
    free(dir);
}
