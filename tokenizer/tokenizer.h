/* tokenizer.h: HF tokenizer.json byte-level BPE (DeepSeek-V3's and the ones `moerl tokenizer train` writes):
 * load, encode, decode, chat rendering (MODEL-SPEC §11).
 *
 * The idea: text -> added tokens cut out of the RAW text (longest match first) -> normalizer -> pre-tokenizer
 * stages (PCRE2 regex splits) -> BPE on each piece's BYTES (a byte-level vocabulary is stored as raw bytes, not as
 * GPT-2's printable stand-ins) -> ids. A tokenizer is immutable after loading and may be shared by threads; the
 * mutable part (PCRE2 match data, scratch, the word cache) lives in a tok_worker, one per thread. */
#ifndef MOERL_TOKENIZER_H
#define MOERL_TOKENIZER_H

#include <stddef.h>
#include <stdint.h>

#include "core/err.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct tokenizer tokenizer;
typedef struct tok_worker tok_worker;

/* A growable id buffer. Zero-initialize; tok_ids_free releases it. Encoders APPEND to it. */
typedef struct tok_ids {
    int32_t *v;
    size_t n, cap;
} tok_ids;
int tok_ids_push(tok_ids *ids, int32_t id); /* MR_ENOMEM on failure */
void tok_ids_free(tok_ids *ids);

/* Loads DIR/tokenizer.json and, when present, DIR/tokenizer_config.json (BOS/EOS/PAD names, add_bos_token,
 * add_eos_token). Errors name the file and the JSON path:
 *   "DIR/tokenizer.json: model.merges[1033]: expected "a b" or [a, b], got 17". */
int tok_load(tokenizer **out, const char *dir, mr_err *e);
/* The same from two explicit files; config_path may be NULL. */
int tok_load_files(tokenizer **out, const char *json_path, const char *config_path, mr_err *e);
/* The same from memory; name is used in error messages in place of the file name. config_json may be NULL. */
int tok_load_mem(tokenizer **out, const char *json, size_t len, const char *name, const char *config_json,
                 mr_err *e);
void tok_free(tokenizer *t); /* accepts NULL */

/* Vocabulary facts. Ids are 0 .. tok_vocab_size()-1 (the highest defined id + 1; there may be holes). */
int32_t tok_vocab_size(const tokenizer *t);
int32_t tok_bos_id(const tokenizer *t); /* -1 when the tokenizer has none */
int32_t tok_eos_id(const tokenizer *t);
int32_t tok_pad_id(const tokenizer *t); /* falls back to EOS, then -1 */
int tok_add_bos(const tokenizer *t);    /* tokenizer_config.json add_bos_token (default 1 when a BOS exists) */
int tok_add_eos(const tokenizer *t);    /* add_eos_token (default 0) */
/* The id of a token given by its text (an added/special token's content, or a vocabulary entry written as raw
 * bytes), or -1. */
int32_t tok_token_id(const tokenizer *t, const char *text);
/* 1 when id is an added token marked special (BOS, EOS, <｜User｜>, ...). */
int tok_is_special(const tokenizer *t, int32_t id);
/* The bytes of one token (decoded, raw bytes: no GPT-2 stand-ins); NULL for an undefined id. */
const char *tok_token_bytes(const tokenizer *t, int32_t id, size_t *len);

/* Encoding flags. */
enum {
    TOK_BOS = 1,        /* prepend BOS (when the tokenizer has one) */
    TOK_EOS = 2,        /* append EOS */
    TOK_SPECIAL = 4,    /* add BOS/EOS as tokenizer_config.json says (add_bos_token / add_eos_token) */
    TOK_NO_ADDED = 8    /* do not match added tokens in the text: "<｜User｜>" in user content is plain text */
};

/* Per-thread encoder state. A worker belongs to one tokenizer and must not outlive it. */
int tok_worker_new(const tokenizer *t, tok_worker **out, mr_err *e);
void tok_worker_free(tok_worker *w); /* accepts NULL */

/* Encodes len bytes of text (any bytes: invalid UTF-8 is encoded byte-wise and round-trips) and APPENDS the
 * ids to out. tok_encode uses a worker built into t (so it is not for concurrent use of one t); tok_encode_w
 * uses the caller's worker (one per thread). */
int tok_encode(tokenizer *t, const char *text, size_t len, unsigned flags, tok_ids *out, mr_err *e);
int tok_encode_w(tok_worker *w, const char *text, size_t len, unsigned flags, tok_ids *out, mr_err *e);

/* Encodes n texts across threads (OpenMP; threads <= 0: all cores), one worker per thread; outs[i] receives
 * text i's ids (appended). On failure the error of the lowest failing index is returned. */
int tok_encode_batch(const tokenizer *t, const char *const *texts, const size_t *lens, size_t n, unsigned flags,
                     tok_ids *outs, int threads, mr_err *e);

/* Decodes ids to bytes: *text is mem_alloc'd, NUL-terminated, length in *len (may be NULL). With skip_special,
 * special added tokens are left out. An undefined id is an error naming its position. */
int tok_decode(const tokenizer *t, const int32_t *ids, size_t n, int skip_special, char **text, size_t *len,
               mr_err *e);

/* ---- Chat rendering (tokenizer/chat.c). ---- */

typedef enum { TOK_CHAT_V3 = 0, TOK_CHAT_R1 = 1 } tok_chat_format;

typedef struct tok_tool_call {
    const char *type;      /* "function" when NULL */
    const char *name;
    const char *arguments; /* JSON text, pasted as is */
} tok_tool_call;

typedef struct tok_msg {
    const char *role;    /* "system", "user", "assistant", "tool" */
    const char *content; /* may be NULL for an assistant message that only carries tool calls */
    const tok_tool_call *tool_calls;
    size_t n_tool_calls;
} tok_msg;

/* "v3" / "r1" -> format; MR_EINVAL with the accepted names otherwise. */
int tok_chat_format_parse(const char *name, tok_chat_format *out, mr_err *e);

/* Renders messages as text in the DeepSeek V3 (or R1) chat format of MODEL-SPEC §11, BOS text first; with
 * add_generation_prompt the text ends in "<｜Assistant｜>" (R1: "<｜Assistant｜><think>\n"). R1 cuts earlier
 * assistant contents to the text after their last "</think>". Encode the result with added tokens on.
 * *text is mem_alloc'd. */
int tok_chat_render(const tokenizer *t, tok_chat_format fmt, const tok_msg *msgs, size_t n,
                    int add_generation_prompt, char **text, mr_err *e);

/* A recipe template with the placeholders {system}, {prompt} and {completion} ("{{" and "}}" are literal
 * braces; any other {name} is an error). A NULL value renders as "". *text is mem_alloc'd; *completion_at
 * (may be NULL) receives the byte offset at which the completion starts (the length of the prompt part, for
 * loss masks), or the text length when the template has no {completion}. */
int tok_template_render(const char *tmpl, const char *system, const char *prompt, const char *completion,
                        char **text, size_t *completion_at, mr_err *e);

#ifdef __cplusplus
}
#endif

#endif
