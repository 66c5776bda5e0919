/* progress.h: progress reporting for long jobs. On a terminal: one bar redrawn in place with rate and ETA.
 * Otherwise (logs, CI, Slurm): a plain line at most every `interval` seconds and at the end. */
#ifndef MOERL_PROGRESS_H
#define MOERL_PROGRESS_H

#include <stdint.h>
#include <stdio.h>

typedef struct progress {
    char label[64];
    const char *unit; /* "steps", "samples", ... */
    int64_t total, done;
    double t0, last_print, interval;
    int tty;
    FILE *out;
} progress;

/* Reports to stderr; tty detected with isatty. interval for plain lines defaults to 10 s. */
void progress_init(progress *p, const char *label, const char *unit, int64_t total);
/* Sets the count done and redraws if due. extra (may be NULL) is appended, e.g. "loss 2.314". */
void progress_update(progress *p, int64_t done, const char *extra);
void progress_finish(progress *p, const char *extra);

/* The text of one report (no newline): used by progress_update and by tests.
 * bar_width 0 gives the plain form. */
void progress_format(char *buf, size_t n, const char *label, const char *unit, int64_t done, int64_t total,
                     double elapsed_s, int bar_width, const char *extra);
/* "1:02:03" or "02:03" for a duration in seconds; "--:--" when unknown. */
void progress_hms(char *buf, size_t n, double seconds);

double progress_now(void); /* monotonic seconds */

#endif
