/* sandbox.h: run an untrusted program in a contained child process (the code reward, rewards/code.c).
 *
 * One call = one fresh temporary directory holding the program file, a supervisor process and the program.
 *
 *     parent (the calling thread)          wall clock, output pipes, kills the program's process group
 *       └─ supervisor (root or caller)     own process group, PR_SET_CHILD_SUBREAPER, a new network namespace
 *            └─ program (+ its children)   own process group, rlimits, unprivileged uid, Landlock, seccomp
 *
 * The one idea: every process the program creates is a descendant of the supervisor, and the supervisor is a
 * subreaper, so an orphan (a double fork, a setsid escape) re-parents to it instead of init. When the program
 * exits or is killed, the supervisor kills its process group and then every process re-parented to it, over
 * and over, until it has no child left: sandbox_run returns only when no process of the sandbox remains.
 *
 * Layers, and what each needs (the result says which were applied, SANDBOX_ISO_*):
 *   rlimits       always: RLIMIT_CPU, RLIMIT_AS, RLIMIT_FSIZE, RLIMIT_NOFILE, RLIMIT_CORE 0, RLIMIT_NPROC.
 *   uid           when root: the program runs as cfg->uid/gid (default nobody, 65534) with no supplementary
 *                 groups. RLIMIT_NPROC counts processes per real uid and root is exempt from it, so only an
 *                 unprivileged uid makes the fork limit real; the same uid also keeps /etc/shadow and files of
 *                 other users out of reach. Not root: the program keeps the caller's uid and RLIMIT_NPROC is
 *                 not set (it would count every process of the caller's uid); a fork bomb is then stopped
 *                 by the wall clock and the group kill only. Give concurrent sandboxes distinct uids: the
 *                 fork limit is shared by all processes of one uid.
 *   netns         unshare(CLONE_NEWNET) in the supervisor where the kernel allows it (root, or user
 *                 namespaces): the program sees only a loopback interface that is down.
 *   landlock      where the kernel has it (ABI >= 1): writes only beneath the temporary directory (and to
 *                 /dev/null); ABI >= 4 also denies TCP bind/connect; ABI >= 6 denies signals to processes
 *                 outside the sandbox and abstract unix sockets.
 *   seccomp       always (a failure to install it fails the run): default allow with a denylist, the
 *                 offending process killed (SIGSYS): socket() of any family but AF_UNIX, ptrace and
 *                 process_vm_*, kill(-1), mount and friends, namespaces (unshare, setns, clone with a
 *                 CLONE_NEW* flag), set*id, reboot, modules, kexec, bpf, perf, keyrings, io_uring,
 *                 userfaultfd. clone3 fails with ENOSYS so that libc falls back to clone, whose flags the
 *                 filter can read.
 *   watch         where the kernel has seccomp user notification (5.5+): a second filter sends file-system
 *                 and signal calls to the supervisor, which denies and records writes outside the temporary
 *                 directory, reads of files the uid may not read, /proc of outside processes and signals to
 *                 outside processes: the run is then SANDBOX_DENIED with the first as its reason, instead
 *                 of a silent EACCES that passes as a wrong answer. It observes; the layers above enforce
 *                 (see rewards/sandbox_watch.h).
 *   environment   cleared: only PATH, HOME and TMPDIR (the temporary directory) and LANG are set.
 *
 * stdin comes from an anonymous memory file (no pipe to fill, no SIGPIPE in the caller); stdout and stderr
 * go through pipes, each captured up to cfg->max_output bytes; beyond that the output is drained and
 * discarded (truncated, breach OUTPUT), and at 8x the cap the program is killed.
 *
 * The caller may be multithreaded: between fork and exec only system calls run (no malloc, no stdio, no
 * atfork handlers: the forks are raw clone calls). The seccomp program is compiled once, before any fork. */
#ifndef MOERL_SANDBOX_H
#define MOERL_SANDBOX_H

#include <stddef.h>
#include <sys/types.h>

#include "core/err.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Why a run was stopped or judged out of bounds. NONE: it ran to completion within every limit. */
typedef enum {
    SANDBOX_NONE = 0,
    SANDBOX_TIMEOUT, /* ran past cfg->wall_s: killed by the parent */
    SANDBOX_CPU,     /* RLIMIT_CPU: SIGXCPU, or SIGKILL at the hard limit */
    SANDBOX_MEMORY,  /* RLIMIT_AS: a memory-error marker of the language on stderr (cfg->memory_markers) */
    SANDBOX_OUTPUT,  /* stdout or stderr beyond cfg->max_output */
    SANDBOX_SECCOMP, /* killed by the seccomp filter (SIGSYS): a forbidden system call */
    SANDBOX_FORK,    /* RLIMIT_NPROC: fork failed (EAGAIN, "Resource temporarily unavailable") and it failed */
    SANDBOX_ORPHANS, /* it ended but left background processes running (killed by the supervisor) */
    SANDBOX_DENIED   /* it tried what the sandbox denies (the watch, SANDBOX_ISO_WATCH): a write outside the
                      * temporary directory, a read of a file its uid may not read, /proc of an outside process,
                      * a signal to an outside process; sandbox_result.denied_what says the first */
} sandbox_breach;

const char *sandbox_breach_name(sandbox_breach b); /* "none", "timeout", "cpu", "memory", ... */

/* Isolation layers actually applied to a run (sandbox_result.isolation). */
enum {
    SANDBOX_ISO_SECCOMP = 1 << 0,
    SANDBOX_ISO_NETNS = 1 << 1,
    SANDBOX_ISO_UID = 1 << 2,      /* ran as cfg->uid (we were root) */
    SANDBOX_ISO_NPROC = 1 << 3,    /* RLIMIT_NPROC set */
    SANDBOX_ISO_LANDLOCK = 1 << 4, /* filesystem writes confined to the temporary directory */
    SANDBOX_ISO_LL_NET = 1 << 5,   /* Landlock TCP rules (ABI >= 4) */
    SANDBOX_ISO_LL_SCOPE = 1 << 6, /* Landlock signal and abstract-socket scoping (ABI >= 6) */
    SANDBOX_ISO_WATCH = 1 << 7     /* denied operations observed (seccomp user notification, sandbox_watch.h) */
};

typedef struct sandbox_config {
    const char *const *argv;   /* the command, NULL-terminated; argv[0] looked up on PATH; the program file is
                                * passed by name (relative to the temporary directory, the working directory) */
    const char *file_name;     /* the program is written to <tmpdir>/<file_name> ("main.py") */
    double wall_s;             /* wall-clock limit, enforced by the parent */
    double cpu_s;              /* RLIMIT_CPU soft limit (rounded up to whole seconds; hard = soft + 1) */
    size_t memory_bytes;       /* RLIMIT_AS */
    int nproc;                 /* RLIMIT_NPROC (processes of the uid; only when root, see above) */
    size_t fsize_bytes;        /* RLIMIT_FSIZE */
    int nofile;                /* RLIMIT_NOFILE */
    size_t max_output;         /* bytes captured per stream */
    uid_t uid;                 /* when root: the program's uid and gid */
    gid_t gid;
    int netns;                 /* 1: try a new network namespace (the default) */
    int watch;                 /* 1: observe denied operations where the kernel can (the default) */
    const char *tmp_root;      /* where the temporary directory goes (NULL: $TMPDIR or /tmp) */
    const char *const *memory_markers; /* NULL-terminated stderr texts that mean "out of memory", or NULL */
} sandbox_config;

/* Defaults: 5 s wall, 5 s CPU, 512 MiB, 32 processes, 16 MiB files, 64 open files, 64 KiB output, uid and gid
 * 65534, netns on. The caller sets argv and file_name. */
void sandbox_config_default(sandbox_config *c);

typedef struct sandbox_result {
    int exited;          /* 1: exited normally, with exit_code */
    int exit_code;
    int signal;          /* the signal that killed it (0 when it exited) */
    sandbox_breach breach;
    char *out, *err;     /* captured stdout and stderr, NUL-terminated (owned; sandbox_result_free) */
    size_t out_len, err_len;
    int out_truncated, err_truncated;
    int orphans;         /* processes still running when the program ended, killed by the supervisor */
    double wall_s;       /* fork to the last process reaped */
    double cpu_s;        /* user + system time of every process of the sandbox */
    long max_rss_kb;     /* largest resident set of any process of the sandbox */
    unsigned isolation;  /* SANDBOX_ISO_* */
    int denied;          /* operations the watch denied (SANDBOX_DENIED) */
    char denied_what[200]; /* the first, in words: "write outside the temporary directory: openat /etc/x" */
} sandbox_result;

/* Runs the program with the given stdin. Returns 0 when the program ran (whatever it did: see the result),
 * or an error when the sandbox itself could not run it (the interpreter is missing, no temporary directory,
 * fork failed, the seccomp filter could not be built or installed): those are infrastructure errors, not the
 * program's fault. The temporary directory is removed before returning, in every case. res is always
 * initialized (free it with sandbox_result_free, also after an error). */
int sandbox_run(const sandbox_config *cfg, const char *program, size_t program_len, const char *stdin_data,
                size_t stdin_len, sandbox_result *res, mr_err *e);
void sandbox_result_free(sandbox_result *res); /* accepts NULL and a zeroed result */

/* One line for a result's breach: "timeout after 2.0 s (wall limit 2.0 s)", "killed by seccomp (SIGSYS)",
 * "denied: signal to a process outside the sandbox: kill(123, 15)", ...; "" for SANDBOX_NONE. */
void sandbox_describe(const sandbox_result *res, const sandbox_config *cfg, char *buf, size_t cap);

/* The layers this process can apply (SANDBOX_ISO_*), probed once: what sandbox_run will report. */
unsigned sandbox_capabilities(void);

/* Why this process has no watch (SANDBOX_ISO_WATCH missing from sandbox_capabilities), e.g. "seccomp user
 * notification: Invalid argument"; "" when it has one. */
const char *sandbox_watch_error(void);

/* 1 when uid can be switched to from here: root, and uid inside this user namespace's uid_map. */
int sandbox_uid_usable(uid_t uid);

/* ---- the code reward's text helpers (rewards/code.c), exposed for tests ------------------------------ */

/* The program in a completion: the last fenced block (```tag) whose tag is one of tags (NULL-terminated,
 * case-insensitive), else the last untagged block, else the whole text. An unclosed fence runs to the end
 * (a completion cut at max_new_tokens). Sets *start and *len to a span of text. */
void code_extract_program(const char *text, const char *const *tags, const char **start, size_t *len);
/* 1 when the outputs are equal after removing trailing whitespace (spaces, tabs, \r) from every line and
 * trailing empty lines: the comparison of stdio tests. */
int code_output_matches(const char *got, size_t got_len, const char *want);

#ifdef __cplusplus
}
#endif

#endif
