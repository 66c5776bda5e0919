/* jsonl.h: reading JSONL datasets, one JSON object per line, with errors that name file:line (and :col for
 * malformed JSON).
 *
 * The reader skips blank lines (spaces, tabs, CR), accepts CRLF line ends, a missing final newline, a UTF-8 BOM
 * (on the first line, or on any line of concatenated files) and lines of any length; it rejects invalid UTF-8 and NUL bytes. A dataset row is either
 *   {"prompt": STRING, "completion": STRING, ...}  or  {"messages": [{"role": R, "content": STRING}, ...], ...}
 * (R one of system, user, assistant, tool); every other field of the row is kept as it is (answer, numbers,
 * target, schema, tests, ...) for the rewards. Messages that are:
 *   data/train.jsonl:17: expected a JSON object with "prompt" and "completion" or "messages", got an array
 *   data/train.jsonl:3:14: malformed JSON near "}, \"completion\"..."
 *   data/train.jsonl:9: "messages"[1].role must be one of system, user, assistant, tool, got "bot" */
#ifndef MOERL_DATA_JSONL_H
#define MOERL_DATA_JSONL_H

#include <cjson/cJSON.h>
#include <stdio.h>

#include "core/err.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct jsonl_reader {
    FILE *f;
    char *path; /* as given, for messages */
    char *buf;  /* getline buffer */
    size_t cap;
    long line; /* 1-based number of the line last read */
} jsonl_reader;

/* What a dataset row must hold (jsonl_check_row). */
enum {
    JSONL_ANY = 0,        /* any JSON object */
    JSONL_PROMPT = 1,     /* "prompt" (completion optional: GRPO / eval prompts) or "messages" */
    JSONL_COMPLETION = 2, /* "prompt" and "completion" (SFT), or "messages" */
};

int jsonl_open(jsonl_reader *r, const char *path, mr_err *e);
/* The next non-blank line parsed as JSON (any value: jsonl_check_row says whether it is a usable row). Returns 1
 * with *row (the caller cJSON_Deletes it) and *line (1-based), 0 at the end of the file, or a negative status with
 * "path:line[:col]: ..." in e. */
int jsonl_next(jsonl_reader *r, cJSON **row, long *line, mr_err *e);
void jsonl_close(jsonl_reader *r); /* accepts NULL and a zeroed or half-opened reader */

/* Parses one line's text (a trailing LF/CR and a leading BOM are tolerated; columns count from after the BOM) into a JSON value:
 * 1 and *row, 0 when the line is blank, or a negative status with "path:line[:col]: ..." in e. */
int jsonl_parse_line(const char *text, size_t len, const char *path, long line, cJSON **row, mr_err *e);

/* Checks a row against `need` (JSONL_*): MR_EFORMAT with "path:line: ..." naming the field on failure. */
int jsonl_check_row(const cJSON *row, int need, const char *path, long line, mr_err *e);

/* A whole dataset in memory: rows[i] came from line lines[i]. */
typedef struct jsonl_rows {
    cJSON **rows;
    long *lines;
    size_t n, cap;
} jsonl_rows;
/* Reads every row of path, each checked against need. Empty files give n == 0 (not an error). */
int jsonl_read_all(const char *path, int need, jsonl_rows *out, mr_err *e);
void jsonl_rows_free(jsonl_rows *d); /* accepts NULL and a zeroed struct */

/* "an array", "a string", "a number", "true", "false", "null", "an object": for messages. */
const char *jsonl_type_name(const cJSON *v);

#ifdef __cplusplus
}
#endif

#endif
