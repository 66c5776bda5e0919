/* progress.c: see progress.h. */
#include "core/progress.h"

#include <math.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

double progress_now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec * 1e-9;
}

void progress_hms(char *buf, size_t n, double s) {
    if (!(s >= 0) || s > 1e8) {
        snprintf(buf, n, "--:--");
        return;
    }
    long t = (long)(s + 0.5);
    if (t >= 3600) snprintf(buf, n, "%ld:%02ld:%02ld", t / 3600, (t / 60) % 60, t % 60);
    else snprintf(buf, n, "%02ld:%02ld", t / 60, t % 60);
}

void progress_format(char *buf, size_t n, const char *label, const char *unit, int64_t done, int64_t total,
                     double elapsed, int bar_width, const char *extra) {
    double rate = elapsed > 0 ? (double)done / elapsed : 0;
    char eta[32], el[32], bar[128] = "";
    progress_hms(el, sizeof el, elapsed);
    if (total > 0 && rate > 0) progress_hms(eta, sizeof eta, (double)(total - done) / rate);
    else snprintf(eta, sizeof eta, "--:--");
    if (bar_width > 0 && total > 0) {
        if (bar_width > 100) bar_width = 100;
        int fill = (int)((double)done / (double)total * bar_width);
        if (fill > bar_width) fill = bar_width;
        bar[0] = '[';
        for (int i = 0; i < bar_width; i++) bar[1 + i] = i < fill ? '=' : (i == fill ? '>' : ' ');
        bar[1 + bar_width] = ']';
        bar[2 + bar_width] = ' ';
        bar[3 + bar_width] = '\0';
    }
    if (total > 0)
        snprintf(buf, n, "%s: %s%lld/%lld %s (%.0f%%) %.3g %s/s elapsed %s ETA %s%s%s", label, bar, (long long)done,
                 (long long)total, unit, 100.0 * (double)done / (double)total, rate, unit, el, eta,
                 extra && *extra ? " | " : "", extra ? extra : "");
    else
        snprintf(buf, n, "%s: %lld %s %.3g %s/s elapsed %s%s%s", label, (long long)done, unit, rate, unit, el,
                 extra && *extra ? " | " : "", extra ? extra : "");
}

void progress_init(progress *p, const char *label, const char *unit, int64_t total) {
    memset(p, 0, sizeof *p);
    snprintf(p->label, sizeof p->label, "%s", label);
    p->unit = unit;
    p->total = total;
    p->out = stderr;
    p->tty = isatty(fileno(stderr));
    p->interval = p->tty ? 0.1 : 10.0;
    p->t0 = progress_now();
    p->last_print = -1e9;
}

static void draw(progress *p, const char *extra, int final) {
    char line[512];
    progress_format(line, sizeof line, p->label, p->unit, p->done, p->total, progress_now() - p->t0,
                    p->tty ? 30 : 0, extra);
    if (p->tty) fprintf(p->out, "\r\033[K%s%s", line, final ? "\n" : "");
    else fprintf(p->out, "%s\n", line);
    fflush(p->out);
}

void progress_update(progress *p, int64_t done, const char *extra) {
    p->done = done;
    double now = progress_now();
    if (now - p->last_print < p->interval) return;
    p->last_print = now;
    draw(p, extra, 0);
}

void progress_finish(progress *p, const char *extra) { draw(p, extra, 1); }
