/* sandbox_watch.c: the supervisor's observer of denied operations (sandbox_watch.h has the policy).
 *
 * One notification: read the call's paths from the program's memory, make them absolute (the program's cwd or
 * directory fd) and canonical (symlinks of the directory resolved as the kernel would), check that the
 * notification is still alive (the pid was not reused meanwhile), then judge. Raw system calls and stack
 * buffers only: the supervisor is a raw fork of a multithreaded process. */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include "rewards/sandbox_watch.h"

#include <errno.h>
#include <fcntl.h>
#include <linux/openat2.h>
#include <linux/seccomp.h>
#include <seccomp.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

/* ---- small text, no stdio -------------------------------------------------------------------------------- */

void sb_str(sbuf *b, const char *s) {
    while (*s && b->len + 1 < b->cap) b->p[b->len++] = *s++;
    b->p[b->len] = '\0';
}

void sb_num(sbuf *b, long v) {
    char d[24];
    int n = 0;
    unsigned long u = v < 0 ? 0UL - (unsigned long)v : (unsigned long)v;
    do d[n++] = (char)('0' + u % 10);
    while ((u /= 10) > 0);
    if (v < 0) d[n++] = '-';
    char s[24];
    for (int i = 0; i < n; i++) s[i] = d[n - 1 - i];
    s[n] = '\0';
    sb_str(b, s);
}

static void sb_oct(sbuf *b, unsigned v) {
    char s[8] = "0000";
    for (int i = 3; i >= 0; i--, v >>= 3) s[i] = (char)('0' + (v & 7));
    sb_str(b, s);
}

pid_t proc_ppid(pid_t pid) {
    char path[40], st[512];
    sbuf b = {path, sizeof path, 0};
    sb_str(&b, "/proc/");
    sb_num(&b, pid);
    sb_str(&b, "/stat");
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return -1;
    ssize_t r = read(fd, st, sizeof st - 1);
    close(fd);
    if (r <= 0) return -1;
    st[r] = '\0';
    char *q = strrchr(st, ')'); /* "pid (comm) S ppid ...": comm may hold anything */
    if (!q || q[1] != ' ' || !q[2] || q[3] != ' ') return -1;
    long ppid = 0;
    for (q += 4; *q >= '0' && *q <= '9'; q++) ppid = ppid * 10 + (*q - '0');
    return (pid_t)ppid;
}

/* ---- the watched calls ----------------------------------------------------------------------------------- */

enum { K_OPEN, K_OPENAT2, K_WRITE, K_SIGNAL };

typedef struct {
    const char *name;
    signed char kind, dfd, path, dfd2, path2, flags; /* argument indexes; -1: none (dfd: relative to the cwd) */
    signed char follow; /* a K_WRITE call that acts on a symlink's target (opens follow unless O_NOFOLLOW) */
} wcall;

static const wcall calls[] = {
    {"open", K_OPEN, -1, 0, -1, -1, 1, 1},        {"openat", K_OPEN, 0, 1, -1, -1, 2, 1},
    {"openat2", K_OPENAT2, 0, 1, -1, -1, 2, 1},   {"creat", K_WRITE, -1, 0, -1, -1, -1, 1},
    {"truncate", K_WRITE, -1, 0, -1, -1, -1, 1},  {"unlink", K_WRITE, -1, 0, -1, -1, -1, 0},
    {"unlinkat", K_WRITE, 0, 1, -1, -1, -1, 0},   {"rmdir", K_WRITE, -1, 0, -1, -1, -1, 0},
    {"mkdir", K_WRITE, -1, 0, -1, -1, -1, 0},     {"mkdirat", K_WRITE, 0, 1, -1, -1, -1, 0},
    {"mknod", K_WRITE, -1, 0, -1, -1, -1, 0},     {"mknodat", K_WRITE, 0, 1, -1, -1, -1, 0},
    {"rename", K_WRITE, -1, 0, -1, 1, -1, 0},     {"renameat", K_WRITE, 0, 1, 2, 3, -1, 0},
    {"renameat2", K_WRITE, 0, 1, 2, 3, -1, 0},    {"link", K_WRITE, -1, 1, -1, -1, -1, 0},
    {"linkat", K_WRITE, 2, 3, -1, -1, -1, 0},     {"symlink", K_WRITE, -1, 1, -1, -1, -1, 0},
    {"symlinkat", K_WRITE, 1, 2, -1, -1, -1, 0},  {"chmod", K_WRITE, -1, 0, -1, -1, -1, 1},
    {"fchmodat", K_WRITE, 0, 1, -1, -1, -1, 1},   {"fchmodat2", K_WRITE, 0, 1, -1, -1, -1, 1},
    {"chown", K_WRITE, -1, 0, -1, -1, -1, 1},     {"lchown", K_WRITE, -1, 0, -1, -1, -1, 0},
    {"fchownat", K_WRITE, 0, 1, -1, -1, -1, 1},   {"kill", K_SIGNAL, -1, 0, -1, -1, -1, 0},
    {"tkill", K_SIGNAL, -1, 0, -1, -1, -1, 0},    {"tgkill", K_SIGNAL, -1, 0, -1, -1, -1, 0},
    {"rt_sigqueueinfo", K_SIGNAL, -1, 0, -1, -1, -1, 0}, {"rt_tgsigqueueinfo", K_SIGNAL, -1, 0, -1, -1, -1, 0},
    {"pidfd_open", K_SIGNAL, -1, 0, -1, -1, -1, 0},
};
#define NCALLS (sizeof calls / sizeof calls[0])

static int g_nr[NCALLS]; /* resolved before any fork; -1: the architecture lacks it */

/* The kernel's notification structures may be larger than this build's headers say: sized at build time. */
#define NOTIF_BUF 256
#define RESP_BUF 64

int watch_filter_build(struct sock_filter *out, unsigned short cap, unsigned short *len, char *err, size_t errcap) {
    struct seccomp_notif_sizes sz;
    memset(&sz, 0, sizeof sz);
    if (syscall(SYS_seccomp, SECCOMP_GET_NOTIF_SIZES, 0, &sz) != 0) {
        int rc = errno;
        snprintf(err, errcap, "seccomp user notification: %s", strerror(rc));
        return -rc;
    }
    if (sz.seccomp_notif > NOTIF_BUF || sz.seccomp_notif_resp > RESP_BUF) {
        snprintf(err, errcap, "seccomp user notification: the kernel's structures (%u, %u bytes) are larger than %d, %d",
                 sz.seccomp_notif, sz.seccomp_notif_resp, NOTIF_BUF, RESP_BUF);
        return -EOVERFLOW;
    }
    scmp_filter_ctx ctx = seccomp_init(SCMP_ACT_ALLOW);
    if (!ctx) {
        snprintf(err, errcap, "seccomp_init failed");
        return -ENOMEM;
    }
    int rc = seccomp_attr_set(ctx, SCMP_FLTATR_CTL_NNP, 0);
    /* another architecture's calls: the deny filter below this one kills them */
    if (rc == 0) rc = seccomp_attr_set(ctx, SCMP_FLTATR_ACT_BADARCH, SCMP_ACT_ALLOW);
    for (size_t i = 0; i < NCALLS && rc == 0; i++) {
        int nr = seccomp_syscall_resolve_name(calls[i].name);
        g_nr[i] = nr == __NR_SCMP_ERROR || nr < 0 ? -1 : nr;
        if (g_nr[i] >= 0) rc = seccomp_rule_add(ctx, SCMP_ACT_NOTIFY, nr, 0);
        if (rc != 0) snprintf(err, errcap, "seccomp: a notify rule for %s: %s", calls[i].name, strerror(-rc));
    }
    if (rc == 0) {
        rc = sandbox_bpf_export(ctx, out, cap, len);
        if (rc != 0) snprintf(err, errcap, "seccomp: exporting the watch filter: %s", strerror(-rc));
    }
    seccomp_release(ctx);
    return rc;
}

int sandbox_bpf_export(void *ctx, struct sock_filter *out, unsigned short cap, unsigned short *len) {
    int fd = memfd_create("moerl-seccomp", MFD_CLOEXEC);
    if (fd < 0) return -errno;
    int rc = seccomp_export_bpf((scmp_filter_ctx)ctx, fd);
    off_t n = rc == 0 ? lseek(fd, 0, SEEK_END) : 0;
    if (rc == 0 && (n <= 0 || n % (off_t)sizeof(struct sock_filter) != 0 || n > (off_t)(cap * sizeof(struct sock_filter))))
        rc = -EFBIG;
    if (rc == 0 && pread(fd, out, (size_t)n, 0) != (ssize_t)n) rc = -EIO;
    if (rc == 0) *len = (unsigned short)(n / (off_t)sizeof(struct sock_filter));
    close(fd);
    return rc;
}

/* ---- reading the program's view ---------------------------------------------------------------------------- */

static void proc_path(sbuf *b, pid_t pid, const char *rest) {
    sb_str(b, "/proc/");
    sb_num(b, pid);
    sb_str(b, rest);
}

static int mem_open(pid_t pid) {
    char path[40];
    sbuf b = {path, sizeof path, 0};
    proc_path(&b, pid, "/mem");
    return open(path, O_RDONLY | O_CLOEXEC);
}

/* A NUL-terminated string at addr in pid's memory; 0, or -1 (unreadable, or longer than cap - 1). */
static int read_string(pid_t pid, uint64_t addr, char *out, size_t cap) {
    int fd = mem_open(pid);
    if (fd < 0) return -1;
    size_t got = 0;
    int ok = -1;
    while (got + 1 < cap) {
        size_t want = 4096 - (size_t)((addr + got) & 4095); /* never across a page: the next may be unmapped */
        if (want > cap - 1 - got) want = cap - 1 - got;
        ssize_t n = pread(fd, out + got, want, (off_t)(addr + got));
        if (n <= 0) break;
        void *z = memchr(out + got, '\0', (size_t)n);
        got += (size_t)n;
        if (z) {
            ok = 0;
            break;
        }
    }
    close(fd);
    if (ok != 0) out[0] = '\0';
    return ok;
}

static int read_bytes(pid_t pid, uint64_t addr, void *out, size_t n) {
    int fd = mem_open(pid);
    if (fd < 0) return -1;
    ssize_t r = pread(fd, out, n, (off_t)addr);
    close(fd);
    return r == (ssize_t)n ? 0 : -1;
}

/* readlink into out, NUL-terminated; 0 or -1. */
static int link_of(const char *path, char *out, size_t cap) {
    ssize_t n = readlink(path, out, cap - 1);
    if (n < 0 || (size_t)n >= cap - 1) return -1;
    out[n] = '\0';
    return 0;
}

/* Collapses "//", "/./" and "/../" of an absolute path in place (lexically). */
static void normalize(char *p) {
    char *w = p;
    const char *r = p;
    while (*r) {
        while (*r == '/') r++;
        const char *seg = r;
        while (*r && *r != '/') r++;
        size_t n = (size_t)(r - seg);
        if (n == 0 || (n == 1 && seg[0] == '.')) continue;
        if (n == 2 && seg[0] == '.' && seg[1] == '.') {
            while (w > p && *--w != '/') {}
            continue;
        }
        *w++ = '/';
        memmove(w, seg, n);
        w += n;
    }
    if (w == p) *w++ = '/';
    *w = '\0';
}

/* /proc/self and /proc/thread-self are the caller's, not ours: rewritten in place to /proc/PID. */
static void proc_self_is(char *p, size_t cap, pid_t pid) {
    static const char *const selves[] = {"/proc/thread-self", "/proc/self"};
    for (int i = 0; i < 2; i++) {
        size_t k = strlen(selves[i]);
        if (!strncmp(p, selves[i], k) && (p[k] == '/' || p[k] == '\0')) {
            char rest[4096];
            memcpy(rest, p + k, strlen(p + k) + 1);
            sbuf t = {p, cap, 0};
            proc_path(&t, pid, rest);
            return;
        }
    }
}

/* The directory part of p resolved through the kernel (O_PATH, then the fd's link), the last component
 * appended; the lexical path when the directory does not exist. */
static void resolve_dir(const char *p, char *out, size_t cap) {
    const char *slash = strrchr(p, '/');
    char dir[4096], real[4096];
    size_t n = (size_t)(slash - p);
    memcpy(dir, p, n);
    dir[n] = '\0';
    int fd = open(n ? dir : "/", O_PATH | O_CLOEXEC);
    sbuf o = {out, cap, 0};
    if (fd >= 0) {
        char lp[64];
        sbuf l = {lp, sizeof lp, 0};
        sb_str(&l, "/proc/self/fd/");
        sb_num(&l, fd);
        int rc = link_of(lp, real, sizeof real);
        close(fd);
        if (rc == 0 && real[0] == '/') {
            sb_str(&o, strcmp(real, "/") ? real : "");
            sb_str(&o, slash);
            return;
        }
    }
    sb_str(&o, p);
}

/* The canonical absolute path the call names: relative to the cwd or the directory fd, /proc/self made the
 * caller's pid, the directories' symlinks resolved, and the last component's while it is a symlink when
 * follow. A magic link of /proc to a pipe or a socket gives its "pipe:[N]" text (no place in the file
 * system). 0, or -1 when it cannot be told. */
static int canonical(pid_t pid, int dfd, const char *rel, int follow, char *out, size_t cap) {
    char abs[4096], base[4096];
    sbuf t = {abs, sizeof abs, 0};
    if (rel[0] != '/') {
        char lp[64];
        sbuf l = {lp, sizeof lp, 0};
        if (dfd == AT_FDCWD) proc_path(&l, pid, "/cwd");
        else {
            proc_path(&l, pid, "/fd/");
            sb_num(&l, dfd);
        }
        if (link_of(lp, base, sizeof base) != 0 || base[0] != '/') return -1;
        sb_str(&t, base);
        sb_str(&t, "/");
    }
    sb_str(&t, rel);
    if (t.len + 1 >= t.cap) return -1;
    for (int hop = 0;; hop++) {
        normalize(abs);
        proc_self_is(abs, sizeof abs, pid);
        resolve_dir(abs, out, cap);
        struct stat st;
        if (!follow || hop == 40 || lstat(out, &st) != 0 || !S_ISLNK(st.st_mode)) return 0;
        char target[4096];
        if (link_of(out, target, sizeof target) != 0) return 0;
        if (target[0] != '/' && !strncmp(out, "/proc/", 6)) { /* a magic link: pipe:[N], socket:[N], ... */
            sbuf o = {out, cap, 0};
            sb_str(&o, target);
            return 0;
        }
        t = (sbuf){abs, sizeof abs, 0};
        if (target[0] != '/') {
            char *slash = strrchr(out, '/');
            slash[1] = '\0';
            sb_str(&t, out);
        }
        sb_str(&t, target);
        if (t.len + 1 >= t.cap) return -1;
    }
}

/* ---- the policy ------------------------------------------------------------------------------------------ */

/* 1 when pid is a descendant of the supervisor (the supervisor itself is not inside), or does not exist (the
 * kernel answers ESRCH then). */
static int inside(const watch_state *w, pid_t pid) {
    if (pid == w->super) return 0;
    for (int hops = 0; hops < 256; hops++) {
        pid_t pp = proc_ppid(pid);
        if (pp < 0) return hops == 0;
        if (pp == w->super) return 1;
        if (pp <= 1) return 0;
        pid = pp;
    }
    return 0;
}

static int beneath(const char *path, const char *dir) {
    size_t k = strlen(dir);
    return !strncmp(path, dir, k) && (path[k] == '/' || path[k] == '\0');
}

/* "/proc/N/...": N, with *rest at what follows N; 0 when the path is not a process's directory. */
static pid_t proc_pid_of(const char *path, const char **rest) {
    if (strncmp(path, "/proc/", 6) != 0 || path[6] < '1' || path[6] > '9') return 0;
    long n = 0;
    const char *p = path + 6;
    for (; *p >= '0' && *p <= '9' && n < 1 << 28; p++) n = n * 10 + (*p - '0');
    if (*p != '/' && *p != '\0') return 0;
    *rest = *p ? p + 1 : p;
    return (pid_t)n;
}

static int write_ok(const watch_state *w, const char *path) {
    static const char *const devices[] = {"/dev/null", "/dev/zero", "/dev/full", "/dev/tty", "/dev/random", "/dev/urandom"};
    if (path[0] != '/' || beneath(path, w->dir)) return 1;
    for (size_t i = 0; i < sizeof devices / sizeof devices[0]; i++)
        if (!strcmp(path, devices[i])) return 1;
    const char *rest;
    pid_t n = proc_pid_of(path, &rest);
    return n > 0 && inside(w, n);
}

static int in_group(const watch_state *w, gid_t g) {
    if (g == w->gid) return 1;
    for (int i = 0; i < w->ngroups; i++)
        if (w->groups[i] == g) return 1;
    return 0;
}

static int may_read(const watch_state *w, const struct stat *st) {
    if (w->uid == 0) return 1;
    if (st->st_uid == w->uid) return (st->st_mode & S_IRUSR) != 0;
    if (in_group(w, st->st_gid)) return (st->st_mode & S_IRGRP) != 0;
    return (st->st_mode & S_IROTH) != 0;
}

static void record(watch_state *w, const char *what) {
    if (w->count++ > 0) return;
    sbuf b = {w->first, sizeof w->first, 0};
    sb_str(&b, what);
}

/* "<what><call> <path>": the start of a violation's text. */
static void what_path(sbuf *b, const char *what, const char *call, const char *path) {
    sb_str(b, what);
    sb_str(b, call);
    sb_str(b, " ");
    sb_str(b, path);
}

/* A path the call reads: 0 when fine, else EACCES with the violation recorded. */
static int judge_read(watch_state *w, const char *call, const char *path) {
    char why[WATCH_TEXT];
    sbuf b = {why, sizeof why, 0};
    const char *rest;
    pid_t n = proc_pid_of(path, &rest);
    if (n > 0) {
        if (inside(w, n) || !strcmp(rest, "stat") || !strcmp(rest, "status") || !strcmp(rest, "comm")) return 0;
        what_path(&b, "access to a process outside the sandbox: ", call, path);
        record(w, why);
        return EACCES;
    }
    struct stat st;
    if (path[0] != '/' || strncmp(path, "/proc/", 6) == 0 || stat(path, &st) != 0 || may_read(w, &st)) return 0;
    what_path(&b, "read of a file the sandbox may not read: ", call, path);
    sb_str(&b, " (mode ");
    sb_oct(&b, (unsigned)st.st_mode & 07777);
    sb_str(&b, ", owner ");
    sb_num(&b, (long)st.st_uid);
    sb_str(&b, ":");
    sb_num(&b, (long)st.st_gid);
    sb_str(&b, ")");
    record(w, why);
    return EACCES;
}

static int judge_write(watch_state *w, const char *call, const char *path) {
    if (write_ok(w, path)) return 0;
    char why[WATCH_TEXT];
    sbuf b = {why, sizeof why, 0};
    what_path(&b, "write outside the temporary directory: ", call, path);
    record(w, why);
    return EACCES;
}

static int judge_signal(watch_state *w, const char *call, long target, long sig) {
    pid_t p = (pid_t)(target < 0 ? -target : target);
    if (target == 0 || target == -1 || p <= 0 || inside(w, p)) return 0; /* kill(-1): the deny filter's */
    char why[WATCH_TEXT];
    sbuf b = {why, sizeof why, 0};
    sb_str(&b, "signal to a process outside the sandbox: ");
    sb_str(&b, call);
    sb_str(&b, "(");
    sb_num(&b, target);
    if (strcmp(call, "pidfd_open") != 0) {
        sb_str(&b, ", ");
        sb_num(&b, sig);
    }
    sb_str(&b, ")");
    if (p == w->super) sb_str(&b, ": the program's parent");
    record(w, why);
    return EPERM;
}

/* 0 to let the call run, or the errno it fails with. */
static int judge(watch_state *w, int lfd, const struct seccomp_notif *n) {
    size_t i = 0;
    while (i < NCALLS && g_nr[i] != n->data.nr) i++;
    if (i == NCALLS) return 0;
    const wcall *c = &calls[i];
    const __u64 *a = n->data.args;
    pid_t pid = (pid_t)n->pid;
    if (c->kind == K_SIGNAL) {
        int si = !strcmp(c->name, "tgkill") || !strcmp(c->name, "rt_tgsigqueueinfo") ? 2 : 1;
        long sig = strcmp(c->name, "pidfd_open") ? (long)(int)a[si] : 0;
        return judge_signal(w, c->name, (long)(int)a[(int)c->path], sig);
    }
    uint64_t flags = c->flags >= 0 ? a[(int)c->flags] : 0;
    if (c->kind == K_OPENAT2) {
        struct open_how how;
        if (read_bytes(pid, a[2], &how, sizeof how.flags) != 0) return 0;
        flags = how.flags;
    }
    char rel[4096], path[4096];
    int verdict = 0;
    for (int k = 0; k < 2 && verdict == 0; k++) {
        int pi = k ? c->path2 : c->path, di = k ? c->dfd2 : c->dfd;
        if (pi < 0) break;
        if (read_string(pid, a[pi], rel, sizeof rel) != 0) return 0; /* EFAULT from the kernel, or too long */
        int dfd = di >= 0 ? (int)a[di] : AT_FDCWD;
        int write = c->kind == K_WRITE || (flags & O_ACCMODE) != O_RDONLY || (flags & (O_CREAT | O_TRUNC));
        int follow = c->follow && !(flags & O_NOFOLLOW) && !((flags & O_CREAT) && (flags & O_EXCL));
        if (c->kind != K_WRITE && (flags & O_PATH)) return 0;
        if (canonical(pid, dfd, rel, follow, path, sizeof path) != 0) return 0;
        /* the pid may have died and been reused while we read its memory: then nothing above was its */
        if (ioctl(lfd, SECCOMP_IOCTL_NOTIF_ID_VALID, &n->id) != 0) return 0;
        verdict = write ? judge_write(w, c->name, path) : judge_read(w, c->name, path);
    }
    return verdict;
}

int watch_handle(int lfd, watch_state *w) {
    union {
        struct seccomp_notif n;
        char raw[NOTIF_BUF];
    } req;
    union {
        struct seccomp_notif_resp r;
        char raw[RESP_BUF];
    } resp;
    memset(&req, 0, sizeof req);
    if (ioctl(lfd, SECCOMP_IOCTL_NOTIF_RECV, &req) != 0)
        return errno == EINTR || errno == ENOENT ? 0 : -1; /* ENOENT: the caller died before we took it */
    int verdict = judge(w, lfd, &req.n);
    memset(&resp, 0, sizeof resp);
    resp.r.id = req.n.id;
    if (verdict) resp.r.error = -verdict;
    else resp.r.flags = SECCOMP_USER_NOTIF_FLAG_CONTINUE;
    ioctl(lfd, SECCOMP_IOCTL_NOTIF_SEND, &resp); /* ENOENT: it died meanwhile */
    return 0;
}
