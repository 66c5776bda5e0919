/* testutil.h: helpers for the Criterion tests: scratch directories, files, and running the moerl binary. */
#ifndef MOERL_TESTUTIL_H
#define MOERL_TESTUTIL_H

#include <stddef.h>

/* A fresh empty directory under $TMPDIR (or /tmp), removed by tu_rmtree. Returns a static-lifetime copy. */
char *tu_tmpdir(void);
void tu_rmtree(const char *dir);
/* path = dir/name in a malloc'd string. */
char *tu_path(const char *dir, const char *name);
/* Writes n bytes (n = strlen when n == (size_t)-1). Returns 0 on success. */
int tu_write(const char *path, const void *data, size_t n);
/* Reads a whole file (NUL-terminated, length in *n if n). NULL on failure. */
char *tu_read(const char *path, size_t *n);
/* Runs a shell command line, captures stdout+stderr (malloc'd, NUL-terminated) in *out; returns the exit
 * status (or 128+signal). The moerl binary's path is in $MOERL_BIN, the source tree in $MOERL_SRC. */
int tu_run(const char *cmdline, char **out);
const char *tu_bin(void);
const char *tu_src(void);

/* Processes (from /proc) whose real uid is in [uid0, uid0 + n): what a sandbox left behind. */
int tu_procs_of_uids(unsigned uid0, unsigned n);

struct model_config;
/* A tiny DeepSeek-V3 with every option on: dense layer 0, MoE layers 1-2 (8 experts, K = 2, 4 groups of which 2
 * kept, a shared expert), q_lora, YaRN (factor 4 over 4 original positions), two MTP modules; vocab 53, 64
 * positions. Tests change what they need after the call. */
void tu_config_all_options(struct model_config *c);

#endif
