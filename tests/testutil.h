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

#endif
