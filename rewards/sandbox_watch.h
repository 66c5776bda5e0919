/* sandbox_watch.h: the sandbox's observer of denied operations (internal to rewards/sandbox.c).
 *
 * The kernel layers of the sandbox (uid, Landlock, rlimits) deny an attack silently: the program gets EACCES or
 * EPERM and may carry on, and the run would pass as an ordinary wrong answer. The watch makes the attempt
 * visible. A second seccomp filter, stacked on the deny filter, sends the file-system calls and the signal calls
 * to the supervisor (SECCOMP_RET_USER_NOTIF); the supervisor reads their arguments (paths from
 * /proc/PID/mem) and answers:
 *
 *   a write outside the temporary directory (open/openat/openat2 with write intent, creat, truncate, unlink,
 *     rename, mkdir, rmdir, link, symlink, mknod, chmod, chown; /dev/null and the like are fine)   EACCES
 *   a read of a file the program's uid may not read (mode bits; e.g. /etc/shadow)                   EACCES
 *   /proc/N/... of a process outside the sandbox (the parent's environ, memory, fds)               EACCES
 *   a signal to a process outside the sandbox (kill, tkill, tgkill, rt_*sigqueueinfo, pidfd_open) EPERM
 *
 * and records each as a violation: the run is then judged SANDBOX_DENIED with the first one as the reason.
 * Everything else continues (SECCOMP_USER_NOTIF_FLAG_CONTINUE). The watch observes; it does not enforce: a
 * thread can rewrite a path between the check and the kernel's use of it (the TOCTOU of user notification),
 * so the kernel layers stay the enforcement, and the watch makes what they deny an error with a reason.
 *
 * Everything here runs in the supervisor, a raw fork of a multithreaded process: raw system calls and fixed
 * buffers only (no malloc, no stdio). */
#ifndef MOERL_SANDBOX_WATCH_H
#define MOERL_SANDBOX_WATCH_H

#include <linux/filter.h>
#include <stddef.h>
#include <sys/types.h>

#define WATCH_TEXT 200

/* Text into a fixed buffer, always NUL-terminated, cut at cap - 1. */
typedef struct {
    char *p;
    size_t cap, len;
} sbuf;
void sb_str(sbuf *b, const char *s);
void sb_num(sbuf *b, long v);

/* The parent pid of pid from /proc/PID/stat, or -1 (gone). */
pid_t proc_ppid(pid_t pid);

/* Exports a libseccomp filter (a scmp_filter_ctx) as BPF into out[0..*len): 0 or -errno. */
int sandbox_bpf_export(void *ctx, struct sock_filter *out, unsigned short cap, unsigned short *len);

/* Compiles the watch filter (once, before any fork) into out[0..*len). 0, or -errno with err filled (the
 * kernel or libseccomp lacks user notification: the sandbox then runs without the watch). */
int watch_filter_build(struct sock_filter *out, unsigned short cap, unsigned short *len, char *err, size_t errcap);

typedef struct watch_state {
    const char *dir; /* the temporary directory, resolved (no symlinks), no trailing slash */
    pid_t super;     /* the supervisor: the sandbox is its descendants */
    uid_t uid;       /* the program's credentials, for the read check */
    gid_t gid;
    int ngroups;
    gid_t groups[32];
    int count;              /* violations so far */
    char first[WATCH_TEXT]; /* the first one, in words */
} watch_state;

/* Receives and answers one notification from the listener. 0, or -1 when the listener is gone (no process
 * of the sandbox has the filter any more). */
int watch_handle(int listener, watch_state *w);

#endif
