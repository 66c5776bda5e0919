/* data_setup.c: see data_setup.h. */
#include "sft/data_setup.h"

#include <cjson/cJSON.h>
#include <errno.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "core/mem.h"
#include "data/gen.h"
#include "data/jsonl.h"
#include "sft/checkpoint.h"
#include "tokenizer/bpe_train.h"

static const char *str_field(const cJSON *row, const char *k) {
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(row, k);
    return cJSON_IsString(v) ? v->valuestring : NULL;
}

static int push_text(tok_ids *ids, tokenizer *tok, const char *text, mr_err *e) {
    return tok_encode(tok, text, strlen(text), 0, ids, e);
}

int sft_encode_row(tokenizer *tok, const char *tmpl, const cJSON *row, const char *src, int line, sft_example *x,
                   mr_err *e) {
    const char *prompt = str_field(row, "prompt"), *completion = str_field(row, "completion");
    const cJSON *msgs = cJSON_GetObjectItemCaseSensitive(row, "messages");
    char *ptext = NULL;
    tok_ids ids = {0};
    int rc;
    if (cJSON_IsArray(msgs)) {
        int n = cJSON_GetArraySize(msgs);
        const cJSON *last = cJSON_GetArrayItem(msgs, n - 1);
        if (n < 2 || !str_field(last, "role") || strcmp(str_field(last, "role"), "assistant") != 0 ||
            !str_field(last, "content"))
            return err_set(e, MR_EFORMAT, "%s:%d: messages: expected turns ending with an assistant message", src, line);
        tok_msg *m = mem_calloc((size_t)n, sizeof *m);
        if (!m) return err_set(e, MR_ENOMEM, "out of memory");
        for (int i = 0; i < n - 1; i++) {
            const cJSON *it = cJSON_GetArrayItem(msgs, i);
            m[i].role = str_field(it, "role");
            m[i].content = str_field(it, "content");
            if (!m[i].role || !m[i].content) {
                mem_free(m);
                return err_set(e, MR_EFORMAT, "%s:%d: messages[%d]: expected {\"role\": ..., \"content\": ...}", src,
                               line, i);
            }
        }
        rc = tok_chat_render(tok, TOK_CHAT_V3, m, (size_t)n - 1, 1, &ptext, e);
        mem_free(m);
        completion = str_field(last, "content");
        if (rc) return err_prefix(e, "%s:%d", src, line);
    } else {
        if (!prompt || !completion)
            return err_set(e, MR_EFORMAT,
                           "%s:%d: expected a JSON object with \"prompt\" and \"completion\" strings or \"messages\"",
                           src, line);
        if (tmpl) rc = tok_template_render(tmpl, NULL, prompt, NULL, &ptext, NULL, e);
        else {
            tok_msg m = {.role = "user", .content = prompt};
            rc = tok_chat_render(tok, TOK_CHAT_V3, &m, 1, 1, &ptext, e);
        }
        if (rc) return err_prefix(e, "%s:%d", src, line);
    }
    /* The chat renderer writes BOS itself; a template does not. */
    int bos = tok_bos_id(tok);
    if (tmpl && bos >= 0 && tok_add_bos(tok) && (rc = tok_ids_push(&ids, bos))) goto fail;
    if ((rc = push_text(&ids, tok, ptext, e))) goto fail;
    x->n_prompt = (int)ids.n;
    if ((rc = push_text(&ids, tok, completion, e))) goto fail;
    if (tok_eos_id(tok) >= 0 && (rc = tok_ids_push(&ids, tok_eos_id(tok)))) goto fail;
    x->ids = ids.v;
    x->n = (int)ids.n;
    mem_free(ptext);
    return MR_OK;
fail:
    mem_free(ptext);
    tok_ids_free(&ids);
    if (rc == MR_ENOMEM && e->code != MR_ENOMEM) err_set(e, MR_ENOMEM, "out of memory encoding %s:%d", src, line);
    return err_prefix(e, "%s:%d", src, line);
}

void sft_data_free(sft_data *d) {
    if (!d) return;
    for (size_t i = 0; d->train && i < d->n_train; i++) mem_free(d->train[i].ids);
    for (size_t i = 0; d->eval && i < d->n_eval; i++) {
        mem_free(d->eval[i].ids);
        if (d->eval_answer) mem_free(d->eval_answer[i]);
    }
    mem_free(d->train);
    mem_free(d->eval);
    mem_free(d->eval_answer);
    tok_free(d->tok);
    memset(d, 0, sizeof *d);
}

/* Rows of a JSONL file, moved into a gen_rows list (so both sources look alike), with their line numbers. */
static int read_rows(const char *path, gen_rows *out, int **lines, mr_err *e) {
    jsonl_rows jr = {0};
    int rc = jsonl_read_all(path, JSONL_COMPLETION, &jr, e);
    if (rc) {
        jsonl_rows_free(&jr);
        return rc;
    }
    out->v = mem_alloc((jr.n ? jr.n : 1) * sizeof *out->v);
    *lines = mem_alloc((jr.n ? jr.n : 1) * sizeof **lines);
    if (!out->v || !*lines) {
        jsonl_rows_free(&jr);
        return err_set(e, MR_ENOMEM, "%s: out of memory", path);
    }
    for (size_t i = 0; i < jr.n; i++) {
        out->v[i] = jr.rows[i];
        (*lines)[i] = (int)jr.lines[i];
        jr.rows[i] = NULL;
    }
    out->n = out->cap = jr.n;
    jr.n = 0;
    jsonl_rows_free(&jr);
    return MR_OK;
}

static int encode_all(tokenizer *tok, const char *tmpl, const gen_rows *rows, const int *lines, const char *src,
                      sft_example **out, char ***answers, mr_err *e) {
    *out = mem_calloc(rows->n ? rows->n : 1, sizeof **out);
    if (answers) *answers = mem_calloc(rows->n ? rows->n : 1, sizeof **answers);
    if (!*out || (answers && !*answers)) return err_set(e, MR_ENOMEM, "out of memory");
    for (size_t i = 0; i < rows->n; i++) {
        int rc = sft_encode_row(tok, tmpl, rows->v[i], src, lines ? lines[i] : (int)i + 1, &(*out)[i], e);
        if (rc) return rc;
        if (answers) {
            const cJSON *a = cJSON_GetObjectItemCaseSensitive(rows->v[i], "answer");
            char buf[64];
            const char *s = cJSON_IsString(a) ? a->valuestring : NULL;
            if (cJSON_IsNumber(a)) {
                snprintf(buf, sizeof buf, "%.17g", a->valuedouble);
                s = buf;
            }
            if (s && !((*answers)[i] = mem_strdup(s))) return err_set(e, MR_ENOMEM, "out of memory");
        }
    }
    return MR_OK;
}

/* Trains the recipe's BPE tokenizer on the rendered training rows (template with prompt and completion) plus
 * tokenizer.train.corpus files, and writes it to dir. */
static int train_tokenizer(const recipe *r, const gen_rows *rows, const char *dir, mr_err *e) {
    bpe_train_opts o = {.vocab_size = (int32_t)recipe_int(r, "tokenizer.train.vocab_size"), .min_frequency = 2,
                        .split_digits = recipe_bool(r, "tokenizer.train.split_digits")};
    bpe_trainer *t = NULL;
    int rc = bpe_train_new(&t, &o, e);
    if (rc) return err_prefix(e, "%s: tokenizer.train", recipe_source(r));
    const char *tmpl = recipe_str(r, "data.template");
    for (size_t i = 0; i < rows->n && !rc; i++) {
        const char *p = str_field(rows->v[i], "prompt"), *c = str_field(rows->v[i], "completion");
        if (!p || !c) continue;
        char *text = NULL;
        if (tmpl) {
            char *pt = NULL;
            if ((rc = tok_template_render(tmpl, NULL, p, NULL, &pt, NULL, e))) break;
            size_t a = strlen(pt), b = strlen(c);
            text = mem_alloc(a + b + 1);
            if (!text) {
                mem_free(pt);
                rc = err_set(e, MR_ENOMEM, "out of memory");
                break;
            }
            memcpy(text, pt, a);
            memcpy(text + a, c, b + 1);
            mem_free(pt);
            rc = bpe_train_feed(t, text, a + b, e);
            mem_free(text);
        } else {
            rc = bpe_train_feed(t, p, strlen(p), e);
            if (!rc) rc = bpe_train_feed(t, c, strlen(c), e);
        }
    }
    size_t n_extra = recipe_list_len(r, "tokenizer.train.corpus");
    for (size_t i = 0; i < n_extra && !rc; i++) {
        char path[64];
        snprintf(path, sizeof path, "tokenizer.train.corpus[%zu]", i);
        rc = bpe_train_feed_file(t, recipe_str(r, path), BPE_TEXT, e);
    }
    if (!rc) rc = bpe_train_fit(t, e);
    if (!rc) rc = bpe_train_write(t, dir, e);
    bpe_train_free(t);
    return rc;
}

/* The recipe's rows: generated (train and a held-out split) or read from data.train (and data.eval, or the last
 * eval_n rows held out). *src names the training rows in messages (srcbuf holds it for generated rows). */
typedef struct rows_in {
    gen_rows train, eval;
    int *tlines, *elines;
    int eval_shared; /* eval.v points into train's list (the held-out tail of data.train) */
    const char *src;
    char srcbuf[64];
} rows_in;

static void rows_free(rows_in *x) {
    if (x->eval_shared) { /* the held-out rows are owned by train's list */
        x->train.n += x->eval.n;
        mem_free(x->eval.v);
        x->eval.v = NULL;
        x->eval.n = 0;
    }
    gen_rows_free(&x->train);
    gen_rows_free(&x->eval);
    mem_free(x->tlines);
    mem_free(x->elines);
    memset(x, 0, sizeof *x);
}

static int rows_load(rows_in *x, const recipe *r, mr_err *e) {
    memset(x, 0, sizeof *x);
    int rc;
    uint64_t seed = (uint64_t)recipe_int(r, "run.seed");
    size_t eval_n = (size_t)recipe_int(r, "data.eval_n");
    x->src = recipe_source(r);
    if (recipe_is_set(r, "data.generator")) {
        gen_task t;
        if ((rc = gen_task_parse(recipe_str(r, "data.generator.task"), &t, e))) return rc;
        gen_opts o = gen_opts_default(t, seed);
        if (recipe_int(r, "data.generator.difficulty") > 0) o.difficulty = (int)recipe_int(r, "data.generator.difficulty");
        o.style = !strcmp(recipe_str(r, "data.generator.style"), "tags") ? GEN_STYLE_TAGS : GEN_STYLE_HASH;
        if ((rc = gen_opts_check(&o, e))) return rc;
        snprintf(x->srcbuf, sizeof x->srcbuf, "generated %s row", gen_task_name(t));
        x->src = x->srcbuf;
        if ((rc = gen_dataset(&o, (size_t)recipe_int(r, "data.generator.n"), eval_n, &x->train, &x->eval, e)))
            return rc;
    } else {
        x->src = recipe_str(r, "data.train");
        if ((rc = read_rows(x->src, &x->train, &x->tlines, e))) return rc;
        if (recipe_is_set(r, "data.eval")) {
            if ((rc = read_rows(recipe_str(r, "data.eval"), &x->eval, &x->elines, e))) return rc;
        } else if (eval_n > 0 && x->train.n > eval_n) { /* the last eval_n rows are held out */
            x->eval.v = mem_alloc(eval_n * sizeof *x->eval.v);
            x->elines = mem_alloc(eval_n * sizeof *x->elines);
            if (!x->eval.v || !x->elines) return err_set(e, MR_ENOMEM, "out of memory");
            for (size_t i = 0; i < eval_n; i++) {
                x->eval.v[i] = x->train.v[x->train.n - eval_n + i];
                x->elines[i] = x->tlines[x->train.n - eval_n + i];
            }
            x->eval.n = x->eval.cap = eval_n;
            x->train.n -= eval_n;
            x->eval_shared = 1;
        }
    }
    if (x->train.n == 0) return err_set(e, MR_EINVAL, "%s: no training rows", x->src);
    return MR_OK;
}

/* The tokenizer: prefer_dir when non-NULL, else tokenizer.path, tokenizer.train (trained on the training rows into
 * OUT/tokenizer, reused on resume), or the model checkpoint's. */
static int tokenizer_setup(const recipe *r, const gen_rows *train, int resume, const char *prefer_dir, char *tok_dir,
                           size_t cap, tokenizer **tok, mr_err *e) {
    int rc;
    if (prefer_dir) {
        snprintf(tok_dir, cap, "%s", prefer_dir);
    } else if (recipe_is_set(r, "tokenizer.path")) {
        snprintf(tok_dir, cap, "%s", recipe_str(r, "tokenizer.path"));
    } else if (recipe_is_set(r, "tokenizer.train")) {
        snprintf(tok_dir, cap, "%s/tokenizer", recipe_str(r, "run.out_dir"));
        char probe[4200];
        snprintf(probe, sizeof probe, "%s/tokenizer.json", tok_dir);
        if (!(resume && access(probe, R_OK) == 0)) {
            if ((rc = dir_make(tok_dir, e))) return rc;
            fprintf(stderr, "training a BPE tokenizer (vocab %lld) into %s\n",
                    (long long)recipe_int(r, "tokenizer.train.vocab_size"), tok_dir);
            if ((rc = train_tokenizer(r, train, tok_dir, e))) return rc;
        }
    } else {
        snprintf(tok_dir, cap, "%s", recipe_str(r, "model.checkpoint"));
    }
    return tok_load(tok, tok_dir, e);
}

int sft_data_setup(sft_data *d, const recipe *r, int resume, mr_err *e) {
    memset(d, 0, sizeof *d);
    rows_in x;
    int rc;
    if ((rc = rows_load(&x, r, e))) goto fail;
    if ((rc = tokenizer_setup(r, &x.train, resume, NULL, d->tok_dir, sizeof d->tok_dir, &d->tok, e))) goto fail;
    const char *tmpl = recipe_str(r, "data.template");
    if ((rc = encode_all(d->tok, tmpl, &x.train, x.tlines, x.src, &d->train, NULL, e))) goto fail;
    d->n_train = x.train.n;
    if ((rc = encode_all(d->tok, tmpl, &x.eval, x.elines, recipe_is_set(r, "data.eval") ? recipe_str(r, "data.eval") : x.src,
                         &d->eval, &d->eval_answer, e)))
        goto fail;
    d->n_eval = x.eval.n;
    rc = MR_OK;
    goto done;
fail:
    d->n_train = x.train.n;
    d->n_eval = x.eval.n;
    sft_data_free(d);
done:
    rows_free(&x);
    return rc;
}

/* ------------------------------------------------------------------------------------- RL prompts */

void rl_data_free(rl_data *d) {
    if (!d) return;
    rl_prompt *sides[2] = {d->train, d->eval};
    size_t ns[2] = {d->n_train, d->n_eval};
    for (int s = 0; s < 2; s++)
        for (size_t i = 0; sides[s] && i < ns[s]; i++) {
            mem_free(sides[s][i].ids);
            mem_free(sides[s][i].text);
            cJSON_Delete(sides[s][i].row);
        }
    mem_free(d->train);
    mem_free(d->eval);
    tok_free(d->tok);
    memset(d, 0, sizeof *d);
}

/* Each row's prompt rendered and encoded as sft_encode_row does it (a row without a completion gets ""), the
 * rendered prompt decoded back to text, and the row itself moved into the prompt. */
static int encode_prompts(tokenizer *tok, const char *tmpl, gen_rows *rows, const int *lines, const char *src,
                          rl_prompt **out, mr_err *e) {
    *out = mem_calloc(rows->n ? rows->n : 1, sizeof **out);
    if (!*out) return err_set(e, MR_ENOMEM, "out of memory");
    for (size_t i = 0; i < rows->n; i++) {
        cJSON *row = rows->v[i];
        if (cJSON_IsString(cJSON_GetObjectItemCaseSensitive(row, "prompt")) &&
            !cJSON_GetObjectItemCaseSensitive(row, "completion") && !cJSON_AddStringToObject(row, "completion", ""))
            return err_set(e, MR_ENOMEM, "out of memory");
        sft_example x = {0};
        int rc = sft_encode_row(tok, tmpl, row, src, lines ? lines[i] : (int)i + 1, &x, e);
        if (rc) return rc;
        rl_prompt *p = &(*out)[i];
        p->ids = x.ids;
        p->n = x.n_prompt;
        size_t len;
        if ((rc = tok_decode(tok, p->ids, (size_t)p->n, 1, &p->text, &len, e))) return rc;
        p->row = row;
        rows->v[i] = NULL;
    }
    return MR_OK;
}

int rl_data_setup(rl_data *d, const recipe *r, const char *tok_dir, int resume, mr_err *e) {
    memset(d, 0, sizeof *d);
    rows_in x;
    int rc;
    if ((rc = rows_load(&x, r, e))) goto fail;
    if ((rc = tokenizer_setup(r, &x.train, resume, tok_dir, d->tok_dir, sizeof d->tok_dir, &d->tok, e))) goto fail;
    const char *tmpl = recipe_str(r, "data.template");
    /* rows move into the prompts: count them as they go so a failure frees each once */
    rc = encode_prompts(d->tok, tmpl, &x.train, x.tlines, x.src, &d->train, e);
    d->n_train = x.train.n;
    if (rc) goto fail;
    if (x.eval_shared) { /* the held-out tail is owned by train's list: take it over */
        x.eval_shared = 0;
        x.train.n = 0;
    }
    rc = encode_prompts(d->tok, tmpl, &x.eval, x.elines,
                        recipe_is_set(r, "data.eval") ? recipe_str(r, "data.eval") : x.src, &d->eval, e);
    d->n_eval = x.eval.n;
    if (rc) goto fail;
    rc = MR_OK;
    goto done;
fail:
    rl_data_free(d);
done:
    rows_free(&x);
    return rc;
}
