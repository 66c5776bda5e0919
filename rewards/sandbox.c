/* sandbox.c: process isolation for the code reward (sandbox.h has the design and the layers).
 *
 * The one idea: the parent owns the clock and the output, the supervisor owns the processes. The parent
 * kills the program's process group at the wall-clock limit; the supervisor, a subreaper, reaps the program,
 * then kills its group and every orphan re-parented to it until it has no child left, and only then reports
 * (exit status, CPU time of all of them) and exits. Between fork and exec only raw system calls run: the
 * caller is multithreaded, so a lock held by another thread at fork time (malloc's, stdio's, an atfork
 * handler's) would never be released in the child. */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include "rewards/sandbox.h"

#include <errno.h>
#include <fcntl.h>
#include <ftw.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <poll.h>
#include <pthread.h>
#include <sched.h>
#include <seccomp.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "core/mem.h"
#include "rewards/sandbox_watch.h"

/* ---- Landlock (the installed kernel headers may predate the ABI the kernel has) ----------------------- */

#ifndef SYS_landlock_create_ruleset
#define SYS_landlock_create_ruleset 444
#define SYS_landlock_add_rule 445
#define SYS_landlock_restrict_self 446
#endif
#define LL_CREATE_RULESET_VERSION (1U << 0)
#define LL_RULE_PATH_BENEATH 1
#define LL_FS_EXECUTE (1ULL << 0)
#define LL_FS_WRITE_FILE (1ULL << 1)
#define LL_FS_READ_FILE (1ULL << 2)
#define LL_FS_REMOVE_DIR (1ULL << 4)
#define LL_FS_REMOVE_FILE (1ULL << 5)
#define LL_FS_MAKE_CHAR (1ULL << 6)
#define LL_FS_MAKE_DIR (1ULL << 7)
#define LL_FS_MAKE_REG (1ULL << 8)
#define LL_FS_MAKE_SOCK (1ULL << 9)
#define LL_FS_MAKE_FIFO (1ULL << 10)
#define LL_FS_MAKE_BLOCK (1ULL << 11)
#define LL_FS_MAKE_SYM (1ULL << 12)
#define LL_FS_REFER (1ULL << 13)    /* ABI 2 */
#define LL_FS_TRUNCATE (1ULL << 14) /* ABI 3 */
#define LL_NET_BIND_TCP (1ULL << 0) /* ABI 4 */
#define LL_NET_CONNECT_TCP (1ULL << 1)
#define LL_SCOPE_ABSTRACT_UNIX (1ULL << 0) /* ABI 6 */
#define LL_SCOPE_SIGNAL (1ULL << 1)

struct ll_ruleset_attr {
    uint64_t handled_access_fs, handled_access_net, scoped;
};
struct ll_path_beneath_attr {
    uint64_t allowed_access;
    int32_t parent_fd;
} __attribute__((packed));

static int landlock_abi(void) {
    long v = syscall(SYS_landlock_create_ruleset, NULL, 0, LL_CREATE_RULESET_VERSION);
    return v > 0 ? (int)v : 0;
}

/* ---- the seccomp program, compiled once before any fork ---------------------------------------------- */

#define SECCOMP_MAX_INSNS 1024

static struct sock_filter g_filter[SECCOMP_MAX_INSNS];
static unsigned short g_filter_len;
static char g_filter_err[256];
static struct sock_filter g_wfilter[SECCOMP_MAX_INSNS]; /* the watch (sandbox_watch.h); empty: none */
static unsigned short g_wfilter_len;
static char g_watch_err[256];
static pthread_once_t g_filter_once = PTHREAD_ONCE_INIT;
static int g_ll_abi;

/* Killed on sight: the syscalls a test program has no business making. Names the architecture lacks are
 * skipped. */
static const char *const denied_syscalls[] = {
    "ptrace", "process_vm_readv", "process_vm_writev", "mount", "umount", "umount2", "pivot_root", "chroot",
    "reboot", "swapon", "swapoff", "kexec_load", "kexec_file_load", "init_module", "finit_module",
    "delete_module", "setuid", "setgid", "setreuid", "setregid", "setresuid", "setresgid", "setgroups",
    "setfsuid", "setfsgid", "unshare", "setns", "bpf", "perf_event_open", "keyctl", "add_key", "request_key",
    "userfaultfd", "open_by_handle_at", "name_to_handle_at", "acct", "settimeofday", "clock_settime",
    "clock_adjtime", "adjtimex", "sethostname", "setdomainname", "iopl", "ioperm", "quotactl", "syslog",
    "vhangup", "kcmp", "io_uring_setup", "io_uring_enter", "io_uring_register", "fsopen", "fsmount", "fspick",
    "open_tree", "move_mount", "mount_setattr", "pidfd_getfd", "lookup_dcookie", "fanotify_init", "uselib",
    "nfsservctl", "_sysctl", "create_module", "get_kernel_syms", "query_module", "vm86", "vm86old",
};

static void filter_build(void) {
    scmp_filter_ctx ctx = seccomp_init(SCMP_ACT_ALLOW);
    int rc = 0;
    const char *what = "seccomp_init";
    if (!ctx) goto fail;
    const uint32_t kill = SCMP_ACT_KILL_PROCESS;
    /* no NNP from libseccomp: the child sets it itself, before Landlock */
    what = "seccomp_attr_set";
    if ((rc = seccomp_attr_set(ctx, SCMP_FLTATR_CTL_NNP, 0)) != 0) goto fail;
    for (size_t i = 0; i < sizeof denied_syscalls / sizeof denied_syscalls[0]; i++) {
        int nr = seccomp_syscall_resolve_name(denied_syscalls[i]);
        if (nr == __NR_SCMP_ERROR || nr < 0) continue;
        what = denied_syscalls[i];
        if ((rc = seccomp_rule_add(ctx, kill, nr, 0)) != 0) goto fail;
    }
    /* The network: sockets of any family but AF_UNIX (the netns and Landlock are the second line). */
    what = "socket";
    if ((rc = seccomp_rule_add(ctx, kill, SCMP_SYS(socket), 1, SCMP_A0(SCMP_CMP_NE, AF_UNIX))) != 0) goto fail;
    if ((rc = seccomp_rule_add(ctx, kill, SCMP_SYS(socketpair), 1, SCMP_A0(SCMP_CMP_NE, AF_UNIX))) != 0) goto fail;
    /* kill(-1, sig): every process the uid may signal. Masked to 32 bits: the kernel reads an int. */
    what = "kill";
    if ((rc = seccomp_rule_add(ctx, kill, SCMP_SYS(kill), 1, SCMP_A0(SCMP_CMP_MASKED_EQ, 0xffffffffULL, 0xffffffffULL))) != 0)
        goto fail;
    /* New namespaces through clone; clone3 passes its flags in memory the filter cannot read, so it reports
     * ENOSYS and libc falls back to clone. */
    const uint64_t ns_flags[] = {CLONE_NEWNS, CLONE_NEWCGROUP, CLONE_NEWUTS, CLONE_NEWIPC, CLONE_NEWUSER,
                                 CLONE_NEWPID, CLONE_NEWNET};
    what = "clone";
    for (size_t i = 0; i < sizeof ns_flags / sizeof ns_flags[0]; i++)
        if ((rc = seccomp_rule_add(ctx, kill, SCMP_SYS(clone), 1, SCMP_A0(SCMP_CMP_MASKED_EQ, ns_flags[i], ns_flags[i]))) != 0)
            goto fail;
    what = "clone3";
    int nr3 = seccomp_syscall_resolve_name("clone3");
    if (nr3 != __NR_SCMP_ERROR && nr3 >= 0 && (rc = seccomp_rule_add(ctx, SCMP_ACT_ERRNO(ENOSYS), nr3, 0)) != 0)
        goto fail;

    what = "seccomp_export_bpf";
    if ((rc = sandbox_bpf_export(ctx, g_filter, SECCOMP_MAX_INSNS, &g_filter_len)) != 0) goto fail;
    seccomp_release(ctx);
    if (watch_filter_build(g_wfilter, SECCOMP_MAX_INSNS, &g_wfilter_len, g_watch_err, sizeof g_watch_err) != 0)
        g_wfilter_len = 0;
    g_ll_abi = landlock_abi();
    return;
fail:
    snprintf(g_filter_err, sizeof g_filter_err, "seccomp filter: %s failed: %s", what, strerror(rc < 0 ? -rc : ENOMEM));
    g_filter_len = 0;
    if (ctx) seccomp_release(ctx);
}

unsigned sandbox_capabilities(void) {
    pthread_once(&g_filter_once, filter_build);
    unsigned c = 0;
    if (g_filter_len) c |= SANDBOX_ISO_SECCOMP;
    if (geteuid() == 0) c |= SANDBOX_ISO_UID | SANDBOX_ISO_NPROC | SANDBOX_ISO_NETNS;
    if (g_ll_abi >= 1) c |= SANDBOX_ISO_LANDLOCK;
    if (g_ll_abi >= 4) c |= SANDBOX_ISO_LL_NET;
    if (g_ll_abi >= 6) c |= SANDBOX_ISO_LL_SCOPE;
    if (g_wfilter_len) c |= SANDBOX_ISO_WATCH;
    return c;
}

const char *sandbox_watch_error(void) {
    pthread_once(&g_filter_once, filter_build);
    return g_wfilter_len ? "" : g_watch_err[0] ? g_watch_err : "the seccomp filter itself failed";
}

/* ---- names and defaults ------------------------------------------------------------------------------ */

const char *sandbox_breach_name(sandbox_breach b) {
    switch (b) {
    case SANDBOX_NONE: return "none";
    case SANDBOX_TIMEOUT: return "timeout";
    case SANDBOX_CPU: return "cpu";
    case SANDBOX_MEMORY: return "memory";
    case SANDBOX_OUTPUT: return "output";
    case SANDBOX_SECCOMP: return "seccomp";
    case SANDBOX_FORK: return "fork";
    case SANDBOX_ORPHANS: return "orphans";
    case SANDBOX_DENIED: return "denied";
    }
    return "?";
}

void sandbox_config_default(sandbox_config *c) {
    memset(c, 0, sizeof *c);
    c->wall_s = 5.0;
    c->cpu_s = 5.0;
    c->memory_bytes = (size_t)512 << 20;
    c->nproc = 32;
    c->fsize_bytes = (size_t)16 << 20;
    c->nofile = 64;
    c->max_output = (size_t)64 << 10;
    c->uid = 65534;
    c->gid = 65534;
    c->netns = 1;
    c->watch = 1;
}

void sandbox_result_free(sandbox_result *res) {
    if (!res) return;
    mem_free(res->out);
    mem_free(res->err);
    res->out = res->err = NULL;
    res->out_len = res->err_len = 0;
}

void sandbox_describe(const sandbox_result *r, const sandbox_config *cfg, char *buf, size_t cap) {
    switch (r->breach) {
    case SANDBOX_NONE: snprintf(buf, cap, "%s", ""); break;
    case SANDBOX_TIMEOUT: snprintf(buf, cap, "timeout: killed after %.2f s (wall limit %.2f s)", r->wall_s, cfg->wall_s); break;
    case SANDBOX_CPU: snprintf(buf, cap, "cpu limit: %.2f s of CPU (limit %.0f s)", r->cpu_s, cfg->cpu_s); break;
    case SANDBOX_MEMORY:
        snprintf(buf, cap, "memory limit: out of memory under the %zu MiB address-space limit", cfg->memory_bytes >> 20);
        break;
    case SANDBOX_OUTPUT:
        snprintf(buf, cap, "output limit: more than %zu KiB on %s%s", cfg->max_output >> 10,
                 r->out_truncated ? "stdout" : "stderr", r->signal == SIGKILL ? " (killed)" : "");
        break;
    case SANDBOX_SECCOMP: snprintf(buf, cap, "killed by seccomp (SIGSYS): a forbidden system call"); break;
    case SANDBOX_FORK: snprintf(buf, cap, "process limit: fork failed at %d processes", cfg->nproc); break;
    case SANDBOX_ORPHANS:
        snprintf(buf, cap, "left %d background process%s running after it exited (killed)", r->orphans,
                 r->orphans == 1 ? "" : "es");
        break;
    case SANDBOX_DENIED:
        if (r->denied > 1) snprintf(buf, cap, "denied: %s (and %d more)", r->denied_what, r->denied - 1);
        else snprintf(buf, cap, "denied: %s", r->denied_what);
        break;
    }
}

/* ---- what the children know: everything computed before the fork ------------------------------------- */

enum { MSG_PID = 1, MSG_FAIL, MSG_DONE, MSG_DENIED };
enum { STEP_FDS = 1, STEP_PGID, STEP_CHDIR, STEP_RLIMIT, STEP_UID, STEP_NNP, STEP_LANDLOCK, STEP_SECCOMP, STEP_EXEC,
       STEP_FORK, STEP_WATCH };

static const char *step_name(int s) {
    static const char *const names[] = {"?", "file descriptors", "setpgid", "chdir", "setrlimit", "setuid",
                                        "no_new_privs", "landlock", "seccomp", "execve", "fork", "watch"};
    return s >= 0 && s <= STEP_WATCH ? names[s] : "?";
}

/* One message on the status pipe: a single write under PIPE_BUF, so never interleaved. */
typedef struct {
    int32_t type;
    int32_t a, b;      /* PID: pid, isolation bits; FAIL: step, errno; DONE: wait status, processes left behind;
                        * DENIED: how many, the first in text */
    int32_t pad;
    int64_t cpu_us, maxrss_kb;
    char text[WATCH_TEXT];
} sbx_msg;

typedef struct {
    pid_t parent;
    int fd_st, fd_out, fd_err, fd_in;
    const char *dir, *dir_real, *exe; /* dir_real: dir with its symlinks resolved (the watch's) */
    char *const *argv;
    char *const *envp;
    struct rlimit lim_cpu, lim_as, lim_nproc, lim_fsize, lim_nofile;
    int as_root, netns, ll_abi, watch;
    uid_t uid;
    gid_t gid;
} sbx_ctx;

/* Fixed fds in the supervisor and the program. FD_SOCK: the program's end of the socket that hands the watch's
 * listener to the supervisor. */
enum { FD_ST = 3, FD_OUT = 4, FD_ERR = 5, FD_IN = 6, FD_SOCK = 7 };

/* The program: the watch's listener (or -1: none) to the supervisor, over FD_SOCK. */
static void send_listener(int lfd) {
    char byte = lfd >= 0 ? 'L' : 'N';
    struct iovec iov = {.iov_base = &byte, .iov_len = 1};
    union {
        struct cmsghdr h;
        char buf[CMSG_SPACE(sizeof(int))];
    } cm;
    memset(&cm, 0, sizeof cm);
    struct msghdr mh = {.msg_iov = &iov, .msg_iovlen = 1};
    if (lfd >= 0) {
        mh.msg_control = cm.buf;
        mh.msg_controllen = sizeof cm.buf;
        struct cmsghdr *c = CMSG_FIRSTHDR(&mh);
        c->cmsg_level = SOL_SOCKET;
        c->cmsg_type = SCM_RIGHTS;
        c->cmsg_len = CMSG_LEN(sizeof(int));
        memcpy(CMSG_DATA(c), &lfd, sizeof(int));
    }
    while (sendmsg(FD_SOCK, &mh, MSG_NOSIGNAL) < 0 && errno == EINTR) {}
}

/* The supervisor: the listener the program sent, -1 when it has none, -2 when it died before sending. */
static int recv_listener(int sock) {
    char byte = 0;
    struct iovec iov = {.iov_base = &byte, .iov_len = 1};
    union {
        struct cmsghdr h;
        char buf[CMSG_SPACE(sizeof(int))];
    } cm;
    memset(&cm, 0, sizeof cm);
    struct msghdr mh = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = cm.buf, .msg_controllen = sizeof cm.buf};
    ssize_t n;
    while ((n = recvmsg(sock, &mh, MSG_CMSG_CLOEXEC)) < 0 && errno == EINTR) {}
    if (n <= 0) return -2;
    struct cmsghdr *c = CMSG_FIRSTHDR(&mh);
    if (byte != 'L' || !c || c->cmsg_type != SCM_RIGHTS || c->cmsg_len != CMSG_LEN(sizeof(int))) return -1;
    int fd;
    memcpy(&fd, CMSG_DATA(c), sizeof fd);
    return fd;
}

static void put_msg_text(int fd, int type, int a, int b, int64_t cpu, int64_t rss, const char *text) {
    sbx_msg m = {.type = type, .a = a, .b = b, .cpu_us = cpu, .maxrss_kb = rss};
    if (text) {
        sbuf t = {m.text, sizeof m.text, 0};
        sb_str(&t, text);
    }
    ssize_t w;
    do w = write(fd, &m, sizeof m);
    while (w < 0 && errno == EINTR);
}

static void put_msg(int fd, int type, int a, int b, int64_t cpu, int64_t rss) { put_msg_text(fd, type, a, b, cpu, rss, NULL); }

static pid_t raw_fork(void) { return (pid_t)syscall(SYS_clone, (unsigned long)SIGCHLD, 0UL, 0UL, 0UL, 0UL); }

/* ---- the program: set every limit, then exec ----------------------------------------------------------- */

__attribute__((noreturn)) static void fail_child(int step) {
    put_msg(FD_ST, MSG_FAIL, step, errno, 0, 0);
    _exit(127);
}

__attribute__((noreturn)) static void program_main(const sbx_ctx *x, pid_t super) {
    if (setpgid(0, 0) != 0) fail_child(STEP_PGID);
    if (prctl(PR_SET_PDEATHSIG, SIGKILL) != 0 || getppid() != super) _exit(127);
    if (dup2(FD_IN, 0) < 0 || dup2(FD_OUT, 1) < 0 || dup2(FD_ERR, 2) < 0) fail_child(STEP_FDS);
    if (fcntl(FD_ST, F_SETFD, FD_CLOEXEC) != 0) fail_child(STEP_FDS);
    if (syscall(SYS_close_range, (unsigned)FD_ST + 1, (unsigned)FD_SOCK - 1, 0U) != 0)
        for (int fd = FD_ST + 1; fd < FD_SOCK; fd++) close(fd);
    if (syscall(SYS_close_range, (unsigned)FD_SOCK + 1, ~0U, 0U) != 0)
        for (int fd = FD_SOCK + 1; fd < 1024; fd++) close(fd);
    sigset_t all;
    sigemptyset(&all);
    sigprocmask(SIG_SETMASK, &all, NULL);
    for (int s = 1; s < 65; s++) /* ignored signals stay ignored across exec: reset them */
        if (s != SIGKILL && s != SIGSTOP) signal(s, SIG_DFL);
    if (chdir(x->dir) != 0) fail_child(STEP_CHDIR);
    struct rlimit core = {0, 0};
    if (setrlimit(RLIMIT_CPU, &x->lim_cpu) || setrlimit(RLIMIT_AS, &x->lim_as) ||
        setrlimit(RLIMIT_FSIZE, &x->lim_fsize) || setrlimit(RLIMIT_NOFILE, &x->lim_nofile) ||
        setrlimit(RLIMIT_CORE, &core))
        fail_child(STEP_RLIMIT);
    if (x->as_root) {
        /* Raw system calls: glibc's set*id wrappers signal every thread they believe exists. */
        if (setrlimit(RLIMIT_NPROC, &x->lim_nproc)) fail_child(STEP_RLIMIT);
        if (syscall(SYS_setgroups, 0, NULL) || syscall(SYS_setresgid, x->gid, x->gid, x->gid) ||
            syscall(SYS_setresuid, x->uid, x->uid, x->uid))
            fail_child(STEP_UID);
    }
    if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0) fail_child(STEP_NNP);
    if (x->ll_abi >= 1) {
        uint64_t fs = LL_FS_WRITE_FILE | LL_FS_REMOVE_DIR | LL_FS_REMOVE_FILE | LL_FS_MAKE_CHAR | LL_FS_MAKE_DIR |
                      LL_FS_MAKE_REG | LL_FS_MAKE_SOCK | LL_FS_MAKE_FIFO | LL_FS_MAKE_BLOCK | LL_FS_MAKE_SYM;
        if (x->ll_abi >= 2) fs |= LL_FS_REFER;
        if (x->ll_abi >= 3) fs |= LL_FS_TRUNCATE;
        struct ll_ruleset_attr attr = {.handled_access_fs = fs};
        size_t size = sizeof(uint64_t);
        if (x->ll_abi >= 4) {
            attr.handled_access_net = LL_NET_BIND_TCP | LL_NET_CONNECT_TCP; /* no rule: none allowed */
            size = 2 * sizeof(uint64_t);
        }
        if (x->ll_abi >= 6) {
            attr.scoped = LL_SCOPE_ABSTRACT_UNIX | LL_SCOPE_SIGNAL;
            size = 3 * sizeof(uint64_t);
        }
        int rs = (int)syscall(SYS_landlock_create_ruleset, &attr, size, 0U);
        if (rs < 0) fail_child(STEP_LANDLOCK);
        struct ll_path_beneath_attr pb = {.allowed_access = fs, .parent_fd = open(".", O_PATH | O_CLOEXEC)};
        if (pb.parent_fd < 0 || syscall(SYS_landlock_add_rule, rs, LL_RULE_PATH_BENEATH, &pb, 0U) != 0)
            fail_child(STEP_LANDLOCK);
        close(pb.parent_fd);
        pb.allowed_access = LL_FS_WRITE_FILE | (x->ll_abi >= 3 ? LL_FS_TRUNCATE : 0);
        pb.parent_fd = open("/dev/null", O_PATH | O_CLOEXEC);
        if (pb.parent_fd >= 0) { /* no /dev/null: nothing to allow */
            if (syscall(SYS_landlock_add_rule, rs, LL_RULE_PATH_BENEATH, &pb, 0U) != 0) fail_child(STEP_LANDLOCK);
            close(pb.parent_fd);
        }
        if (syscall(SYS_landlock_restrict_self, rs, 0U) != 0) fail_child(STEP_LANDLOCK);
        close(rs);
    }
    struct sock_fprog prog = {.len = g_filter_len, .filter = g_filter};
    if (prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, &prog, 0, 0) != 0) fail_child(STEP_SECCOMP);
    /* The watch, stacked on top: its notifications lose to the deny filter's kills and errnos. A kernel (or a
     * container runtime already holding the one listener a filter chain may have) that refuses it leaves the
     * run unwatched, and the result says so (no SANDBOX_ISO_WATCH). */
    int lfd = -1;
    if (x->watch && g_wfilter_len) {
        struct sock_fprog wp = {.len = g_wfilter_len, .filter = g_wfilter};
        lfd = (int)syscall(SYS_seccomp, SECCOMP_SET_MODE_FILTER, SECCOMP_FILTER_FLAG_NEW_LISTENER, &wp);
    }
    send_listener(lfd);
    if (lfd >= 0) close(lfd);
    close(FD_SOCK);
    execve(x->exe, x->argv, x->envp);
    fail_child(STEP_EXEC);
}

/* ---- the supervisor: start the program, then leave no process behind ----------------------------------- */

struct dirent64_raw {
    uint64_t d_ino;
    int64_t d_off;
    unsigned short d_reclen;
    unsigned char d_type;
    char d_name[];
};

/* SIGKILLs every process whose parent is `me` (orphans re-parented to the subreaper), reading /proc with
 * raw getdents64 (opendir would malloc). */
static void kill_children_of(pid_t me) {
    int dfd = open("/proc", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (dfd < 0) return;
    char buf[8192];
    for (;;) {
        long n = syscall(SYS_getdents64, dfd, buf, sizeof buf);
        if (n <= 0) break;
        for (long off = 0; off < n;) {
            struct dirent64_raw *d = (struct dirent64_raw *)(buf + off);
            off += d->d_reclen;
            long pid = 0;
            const char *p = d->d_name;
            if (*p < '1' || *p > '9') continue;
            for (; *p >= '0' && *p <= '9'; p++) pid = pid * 10 + (*p - '0');
            if (*p) continue;
            pid_t ppid = proc_ppid((pid_t)pid);
            if (ppid == me) kill((pid_t)pid, SIGKILL);
        }
    }
    close(dfd);
}

__attribute__((noreturn)) static void supervisor_main(const sbx_ctx *x) {
    /* Only our four descriptors survive: another thread's pipes must not be held open by us. Park them high
     * first so the dup2s below cannot clobber one another. */
    int keep[4] = {x->fd_st, x->fd_out, x->fd_err, x->fd_in};
    for (int i = 0; i < 4; i++)
        if ((keep[i] = fcntl(keep[i], F_DUPFD, 64)) < 0) _exit(126);
    for (int i = 0; i < 4; i++)
        if (dup2(keep[i], FD_ST + i) < 0) _exit(126);
    if (syscall(SYS_close_range, (unsigned)FD_IN + 1, ~0U, 0U) != 0)
        for (int fd = FD_IN + 1; fd < 4096; fd++) close(fd);
    setpgid(0, 0);
    signal(SIGCHLD, SIG_DFL); /* an ignored SIGCHLD would reap the program before we see its status */
    if (prctl(PR_SET_PDEATHSIG, SIGKILL) != 0 || getppid() != x->parent) _exit(126);
    prctl(PR_SET_CHILD_SUBREAPER, 1);
    int iso = 0;
    if (x->netns && unshare(CLONE_NEWNET) == 0) iso |= SANDBOX_ISO_NETNS;
    int sv[2];
    if (socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, sv) != 0) {
        put_msg(FD_ST, MSG_FAIL, STEP_WATCH, errno, 0, 0);
        _exit(126);
    }
    int sock = fcntl(sv[0], F_DUPFD_CLOEXEC, 64);
    close(sv[0]);
    if (sock < 0 || (sv[1] != FD_SOCK && (dup2(sv[1], FD_SOCK) < 0 || close(sv[1]) != 0))) {
        put_msg(FD_ST, MSG_FAIL, STEP_WATCH, errno, 0, 0);
        _exit(126);
    }
    pid_t me = getpid();
    pid_t c = raw_fork();
    if (c == 0) program_main(x, me);
    if (c < 0) {
        put_msg(FD_ST, MSG_FAIL, STEP_FORK, errno, 0, 0);
        _exit(126);
    }
    setpgid(c, c); /* also done by the child: whichever runs first, the group exists before MSG_PID */
    close(FD_OUT);
    close(FD_ERR);
    close(FD_IN);
    close(FD_SOCK);
    int lfd = recv_listener(sock); /* -2: the program failed before (its MSG_FAIL is on the way) */
    close(sock);
    if (lfd >= 0) iso |= SANDBOX_ISO_WATCH;
    put_msg(FD_ST, MSG_PID, (int)c, iso, 0, 0);

    watch_state w;
    memset(&w, 0, sizeof w);
    w.dir = x->dir_real;
    w.super = me;
    w.uid = x->as_root ? x->uid : getuid();
    w.gid = x->as_root ? x->gid : getgid();
    if (!x->as_root) {
        int ng = getgroups(32, w.groups);
        w.ngroups = ng > 0 ? ng : 0;
    }
    int pfd = (int)syscall(SYS_pidfd_open, c, 0U); /* wakes the poll when the program ends (Linux 5.3+) */

    /* Wait for the program itself, answering the watch and reaping orphans that die meanwhile. WNOWAIT keeps
     * the program a zombie, so its pid, the group id, cannot be reused before the group kill below. */
    int status = 0;
    for (;;) {
        siginfo_t si;
        memset(&si, 0, sizeof si);
        int polling = lfd >= 0 || pfd >= 0;
        if (waitid(P_ALL, 0, &si, WEXITED | WNOWAIT | (polling ? WNOHANG : 0)) != 0) {
            if (errno == EINTR) continue;
            break;
        }
        if (si.si_pid == c) break;
        if (si.si_pid != 0) {
            waitpid(si.si_pid, NULL, 0);
            continue;
        }
        struct pollfd pf[2];
        int np = 0;
        if (lfd >= 0) pf[np++] = (struct pollfd){.fd = lfd, .events = POLLIN};
        if (pfd >= 0) pf[np++] = (struct pollfd){.fd = pfd, .events = POLLIN};
        /* orphans' exits wake nothing: look again every 10 ms */
        if (poll(pf, (nfds_t)np, 10) > 0 && lfd >= 0 && pf[0].revents) {
            if (!(pf[0].revents & POLLIN) || watch_handle(lfd, &w) != 0) { /* no process has the filter */
                close(lfd);
                lfd = -1;
            }
        }
    }
    if (lfd >= 0) close(lfd); /* calls still waiting fail with ENOSYS; their processes die below */
    if (pfd >= 0) close(pfd);
    kill(-c, SIGKILL);
    while (waitpid(c, &status, 0) < 0 && errno == EINTR) {}
    /* Everything else: the group is dead; escapees re-parent to us as their parents die. A process reaped
     * here with SIGKILL was still running when the program ended: a left-behind background child (one that had
     * exited on its own is a zombie with its own status, and is not counted). */
    int left = 0, ws = 0;
    for (;;) {
        pid_t r;
        while ((r = waitpid(-1, &ws, WNOHANG)) > 0) left += WIFSIGNALED(ws) && WTERMSIG(ws) == SIGKILL;
        if (r < 0 && errno == ECHILD) break;
        kill_children_of(me);
        while ((r = waitpid(-1, &ws, WNOHANG)) > 0) left += WIFSIGNALED(ws) && WTERMSIG(ws) == SIGKILL;
        if (r < 0 && errno == ECHILD) break;
        struct timespec ts = {0, 1000000};
        nanosleep(&ts, NULL);
    }
    struct rusage ru;
    memset(&ru, 0, sizeof ru);
    getrusage(RUSAGE_CHILDREN, &ru);
    int64_t cpu_us = (int64_t)ru.ru_utime.tv_sec * 1000000 + ru.ru_utime.tv_usec + (int64_t)ru.ru_stime.tv_sec * 1000000 +
                     ru.ru_stime.tv_usec;
    if (w.count > 0) put_msg_text(FD_ST, MSG_DENIED, w.count, 0, 0, 0, w.first);
    put_msg(FD_ST, MSG_DONE, status, left, cpu_us, ru.ru_maxrss);
    _exit(0);
}

/* ---- the parent ---------------------------------------------------------------------------------------- */

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static const char default_path[] = "/usr/local/bin:/usr/bin:/bin";

static int find_exe(const char *name, char *out, size_t cap) {
    if (strchr(name, '/')) {
        snprintf(out, cap, "%s", name);
        return access(out, X_OK);
    }
    const char *p = default_path;
    while (*p) {
        const char *end = strchr(p, ':');
        size_t n = end ? (size_t)(end - p) : strlen(p);
        if ((size_t)snprintf(out, cap, "%.*s/%s", (int)n, p, name) < cap && access(out, X_OK) == 0) return 0;
        p += n + (end ? 1 : 0);
    }
    return -1;
}

static int rm_fix(const char *path, const struct stat *sb, int flag, struct FTW *ftw) {
    (void)sb, (void)ftw;
    if (flag == FTW_D || flag == FTW_DNR) chmod(path, 0700);
    return 0;
}
static int rm_one(const char *path, const struct stat *sb, int flag, struct FTW *ftw) {
    (void)sb, (void)flag, (void)ftw;
    remove(path);
    return 0;
}

/* Removes the directory and everything in it, whatever the program did to the permissions. */
static void rmtree(const char *dir) {
    if (geteuid() != 0) nftw(dir, rm_fix, 16, FTW_PHYS | FTW_MOUNT);
    nftw(dir, rm_one, 16, FTW_DEPTH | FTW_PHYS | FTW_MOUNT);
}

typedef struct {
    int fd;
    char *buf;
    size_t len, cap, dropped;
    int truncated;
} stream;

/* Reads what is there; 1 at EOF. */
static int stream_read(stream *s) {
    char tmp[16384];
    for (;;) {
        ssize_t n = read(s->fd, tmp, sizeof tmp);
        if (n == 0) return 1;
        if (n < 0) return errno == EAGAIN || errno == EINTR ? 0 : 1;
        size_t take = (size_t)n;
        if (take > s->cap - s->len) take = s->cap - s->len;
        memcpy(s->buf + s->len, tmp, take);
        s->len += take;
        if (take < (size_t)n) {
            s->truncated = 1;
            s->dropped += (size_t)n - take;
        }
    }
}

static int write_all(int fd, const char *p, size_t n) {
    while (n > 0) {
        ssize_t w = write(fd, p, n);
        if (w < 0) {
            if (errno == EINTR) continue;
            return -1;
        }
        p += w;
        n -= (size_t)w;
    }
    return 0;
}

static int contains(const char *hay, size_t n, const char *needle) {
    size_t k = strlen(needle);
    if (k == 0 || k > n) return 0;
    for (size_t i = 0; i + k <= n; i++)
        if (hay[i] == needle[0] && memcmp(hay + i, needle, k) == 0) return 1;
    return 0;
}

static void classify(sandbox_result *r, const sandbox_config *cfg, int timed_out, int output_killed) {
    int failed = !r->exited || r->exit_code != 0;
    if (timed_out) r->breach = SANDBOX_TIMEOUT;
    else if (output_killed) r->breach = SANDBOX_OUTPUT;
    else if (r->signal == SIGSYS) r->breach = SANDBOX_SECCOMP;
    else if (r->denied > 0) r->breach = SANDBOX_DENIED;
    else if (r->signal == SIGXCPU || (r->signal == SIGKILL && r->cpu_s >= cfg->cpu_s)) r->breach = SANDBOX_CPU;
    else if (r->out_truncated || r->err_truncated) r->breach = SANDBOX_OUTPUT;
    if (r->breach == SANDBOX_NONE && !failed && r->orphans > 0) r->breach = SANDBOX_ORPHANS;
    if (r->breach != SANDBOX_NONE || !failed) return;
    for (const char *const *m = cfg->memory_markers; m && *m; m++)
        if (contains(r->err, r->err_len, *m)) {
            r->breach = SANDBOX_MEMORY;
            return;
        }
    if (contains(r->err, r->err_len, "Resource temporarily unavailable")) r->breach = SANDBOX_FORK;
    if (r->breach == SANDBOX_NONE && r->orphans > 0) r->breach = SANDBOX_ORPHANS;
}

int sandbox_run(const sandbox_config *cfg, const char *program, size_t program_len, const char *stdin_data,
                size_t stdin_len, sandbox_result *res, mr_err *e) {
    memset(res, 0, sizeof *res);
    int rc = 0;
    int st_pipe[2] = {-1, -1}, out_pipe[2] = {-1, -1}, err_pipe[2] = {-1, -1}, in_fd = -1;
    char dir[4096] = "", dir_real[4096], file[4200], exe[4096], home[4200], tmpdir[4200];
    char *argv[32];
    pid_t spid = -1;
    if (!cfg->argv || !cfg->argv[0] || !cfg->file_name || !cfg->file_name[0] || strchr(cfg->file_name, '/'))
        return err_set(e, MR_EINVAL, "sandbox: a command (argv) and a plain file name are required");
    size_t argc = 0;
    while (cfg->argv[argc]) argc++;
    if (argc >= sizeof argv / sizeof argv[0]) return err_set(e, MR_EINVAL, "sandbox: more than 31 arguments");
    pthread_once(&g_filter_once, filter_build);
    if (!g_filter_len) return err_set(e, MR_EINTERNAL, "sandbox: %s", g_filter_err);
    if (find_exe(cfg->argv[0], exe, sizeof exe) != 0)
        return err_set(e, MR_ENOTFOUND, "sandbox: %s: no such program on %s", cfg->argv[0], default_path);
    size_t cap = cfg->max_output ? cfg->max_output : 1;
    res->out = mem_alloc(cap + 1);
    res->err = mem_alloc(cap + 1);
    if (!res->out || !res->err) {
        sandbox_result_free(res);
        return err_set(e, MR_ENOMEM, "sandbox: out of memory for %zu bytes of output", cap);
    }
    res->out[0] = res->err[0] = '\0';

    const char *root = cfg->tmp_root ? cfg->tmp_root : getenv("TMPDIR");
    if (!root || !root[0]) root = "/tmp";
    snprintf(dir, sizeof dir, "%s/moerl-sbx-XXXXXX", root);
    if (!mkdtemp(dir)) {
        rc = err_set(e, MR_EIO, "sandbox: mkdtemp %s: %s", dir, strerror(errno));
        dir[0] = '\0';
        goto done;
    }
    snprintf(file, sizeof file, "%s/%s", dir, cfg->file_name);
    snprintf(home, sizeof home, "HOME=%s", dir);
    snprintf(tmpdir, sizeof tmpdir, "TMPDIR=%s", dir);
    if (!realpath(dir, dir_real)) snprintf(dir_real, sizeof dir_real, "%s", dir);
    int as_root = geteuid() == 0;
    {
        int fd = open(file, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0644);
        if (fd < 0 || write_all(fd, program, program_len) != 0) {
            rc = err_set(e, MR_EIO, "sandbox: writing %s: %s", file, strerror(errno));
            if (fd >= 0) close(fd);
            goto done;
        }
        close(fd);
        if (as_root && chown(dir, cfg->uid, cfg->gid) != 0) {
            rc = err_set(e, MR_EIO, "sandbox: chown %s to %u: %s", dir, (unsigned)cfg->uid, strerror(errno));
            goto done;
        }
    }
    in_fd = memfd_create("moerl-stdin", MFD_CLOEXEC);
    if (in_fd < 0 || write_all(in_fd, stdin_data ? stdin_data : "", stdin_len) != 0 || lseek(in_fd, 0, SEEK_SET) != 0) {
        rc = err_set(e, MR_EIO, "sandbox: stdin: %s", strerror(errno));
        goto done;
    }
    if (pipe2(st_pipe, O_CLOEXEC) || pipe2(out_pipe, O_CLOEXEC) || pipe2(err_pipe, O_CLOEXEC)) {
        rc = err_set(e, MR_EIO, "sandbox: pipe: %s", strerror(errno));
        goto done;
    }
    for (size_t i = 0; i < argc; i++) argv[i] = (char *)cfg->argv[i];
    argv[argc] = NULL;
    char *envp[] = {"PATH=/usr/local/bin:/usr/bin:/bin", home, tmpdir, "LANG=C.UTF-8", NULL};
    sbx_ctx x = {
        .parent = getpid(), .fd_st = st_pipe[1], .fd_out = out_pipe[1], .fd_err = err_pipe[1], .fd_in = in_fd,
        .dir = dir, .dir_real = dir_real, .exe = exe, .argv = argv, .envp = envp, .as_root = as_root, .netns = cfg->netns, .watch = cfg->watch,
        .ll_abi = g_ll_abi, .uid = cfg->uid, .gid = cfg->gid,
    };
    rlim_t cpu = (rlim_t)(cfg->cpu_s > 0 ? cfg->cpu_s + 0.999 : 1);
    x.lim_cpu = (struct rlimit){cpu, cpu + 1};
    x.lim_as = (struct rlimit){cfg->memory_bytes, cfg->memory_bytes};
    x.lim_nproc = (struct rlimit){(rlim_t)cfg->nproc, (rlim_t)cfg->nproc};
    x.lim_fsize = (struct rlimit){cfg->fsize_bytes, cfg->fsize_bytes};
    x.lim_nofile = (struct rlimit){(rlim_t)cfg->nofile, (rlim_t)cfg->nofile};

    double t0 = now_s();
    spid = raw_fork();
    if (spid == 0) supervisor_main(&x);
    if (spid < 0) {
        rc = err_set(e, MR_EIO, "sandbox: fork: %s", strerror(errno));
        goto done;
    }
    close(st_pipe[1]);
    close(out_pipe[1]);
    close(err_pipe[1]);
    close(in_fd);
    st_pipe[1] = out_pipe[1] = err_pipe[1] = in_fd = -1;
    fcntl(st_pipe[0], F_SETFL, O_NONBLOCK);
    fcntl(out_pipe[0], F_SETFL, O_NONBLOCK);
    fcntl(err_pipe[0], F_SETFL, O_NONBLOCK);

    stream so = {.fd = out_pipe[0], .buf = res->out, .cap = cap}, se = {.fd = err_pipe[0], .buf = res->err, .cap = cap};
    int out_eof = 0, err_eof = 0, st_eof = 0, done = 0, timed_out = 0, output_killed = 0, fail_step = 0, fail_errno = 0;
    pid_t cpid = -1;
    int status = 0;
    char mbuf[sizeof(sbx_msg) * 4];
    size_t mlen = 0;
    sbx_msg dm = {0};
    double deadline = t0 + cfg->wall_s, backstop = deadline + 5.0;
    while (!(st_eof && out_eof && err_eof)) {
        struct pollfd pf[3];
        int np = 0;
        if (!st_eof) pf[np++] = (struct pollfd){.fd = st_pipe[0], .events = POLLIN};
        if (!out_eof) pf[np++] = (struct pollfd){.fd = out_pipe[0], .events = POLLIN};
        if (!err_eof) pf[np++] = (struct pollfd){.fd = err_pipe[0], .events = POLLIN};
        double now = now_s();
        double until = !timed_out && !done ? deadline : backstop;
        int ms = until > now ? (int)((until - now) * 1000.0) + 1 : 0;
        int pr = poll(pf, (nfds_t)np, ms);
        if (pr < 0 && errno != EINTR) break;
        if (!out_eof) out_eof = stream_read(&so);
        if (!err_eof) err_eof = stream_read(&se);
        if (!st_eof) {
            for (;;) {
                ssize_t n = read(st_pipe[0], mbuf + mlen, sizeof mbuf - mlen);
                if (n == 0) st_eof = 1;
                if (n <= 0) break;
                mlen += (size_t)n;
                while (mlen >= sizeof(sbx_msg)) {
                    sbx_msg m;
                    memcpy(&m, mbuf, sizeof m);
                    memmove(mbuf, mbuf + sizeof m, mlen - sizeof m);
                    mlen -= sizeof m;
                    if (m.type == MSG_PID) {
                        cpid = m.a;
                        res->isolation |= (unsigned)m.b;
                    } else if (m.type == MSG_FAIL && !fail_step) {
                        fail_step = m.a;
                        fail_errno = m.b;
                    } else if (m.type == MSG_DENIED) {
                        res->denied = m.a;
                        memcpy(res->denied_what, m.text, sizeof res->denied_what);
                        res->denied_what[sizeof res->denied_what - 1] = '\0';
                    } else if (m.type == MSG_DONE) {
                        done = 1;
                        dm = m;
                        status = m.a;
                    }
                }
            }
        }
        now = now_s();
        int flood = so.dropped > 8 * cap || se.dropped > 8 * cap;
        if (!done && cpid > 0 && ((now >= deadline && !timed_out) || (flood && !output_killed))) {
            if (now >= deadline) timed_out = 1;
            else output_killed = 1;
            kill(-cpid, SIGKILL);
            kill(cpid, SIGKILL);
        }
        if (now >= backstop && !done) { /* the supervisor itself is stuck: should not happen */
            kill(-spid, SIGKILL);
            kill(spid, SIGKILL);
            break;
        }
    }
    while (waitpid(spid, NULL, 0) < 0 && errno == EINTR) {}
    res->wall_s = now_s() - t0;
    res->out_len = so.len;
    res->err_len = se.len;
    res->out[so.len] = '\0';
    res->err[se.len] = '\0';
    res->out_truncated = so.truncated;
    res->err_truncated = se.truncated;
    if (fail_step) {
        rc = err_set(e, fail_step == STEP_EXEC && fail_errno == ENOENT ? MR_ENOTFOUND : MR_EINTERNAL,
                     "sandbox: %s failed for %s: %s", step_name(fail_step), exe, strerror(fail_errno));
        goto done;
    }
    if (!done) {
        rc = err_set(e, MR_EINTERNAL, "sandbox: the supervisor of %s died without a report", exe);
        goto done;
    }
    res->cpu_s = (double)dm.cpu_us * 1e-6;
    res->orphans = dm.b;
    res->max_rss_kb = (long)dm.maxrss_kb;
    res->isolation |= SANDBOX_ISO_SECCOMP;
    if (as_root) res->isolation |= SANDBOX_ISO_UID | SANDBOX_ISO_NPROC;
    if (g_ll_abi >= 1) res->isolation |= SANDBOX_ISO_LANDLOCK;
    if (g_ll_abi >= 4) res->isolation |= SANDBOX_ISO_LL_NET;
    if (g_ll_abi >= 6) res->isolation |= SANDBOX_ISO_LL_SCOPE;
    if (WIFEXITED(status)) {
        res->exited = 1;
        res->exit_code = WEXITSTATUS(status);
    } else if (WIFSIGNALED(status)) {
        res->signal = WTERMSIG(status);
    }
    classify(res, cfg, timed_out, output_killed);
done:
    for (int i = 0; i < 2; i++) {
        if (st_pipe[i] >= 0) close(st_pipe[i]);
        if (out_pipe[i] >= 0) close(out_pipe[i]);
        if (err_pipe[i] >= 0) close(err_pipe[i]);
    }
    if (in_fd >= 0) close(in_fd);
    if (dir[0]) rmtree(dir);
    return rc;
}

int sandbox_uid_usable(uid_t uid) {
    if (geteuid() != 0) return 0;
    FILE *f = fopen("/proc/self/uid_map", "re");
    if (!f) return 1; /* no user namespaces: every uid is ours */
    unsigned long in, out, count;
    int ok = 0;
    while (fscanf(f, "%lu %lu %lu", &in, &out, &count) == 3)
        if ((unsigned long)uid >= in && (unsigned long)uid - in < count) ok = 1;
    fclose(f);
    return ok;
}
