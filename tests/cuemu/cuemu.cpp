// cuemu.cpp: the runtime of the CUDA emulation (see cuemu.h for what it is and what it catches).
//
// Execution: a launch runs its blocks one after another (or on CUEMU_THREADS OS threads, a block per thread at a
// time); a block's threads are fibers (a stack each, switched by a few instructions on x86-64, ucontext elsewhere)
// scheduled round-robin by the block's scheduler. A fiber runs until
// it exits or waits at a barrier; the last thread to arrive completes the barrier and wakes the others. When no
// fiber can run and some have not exited, the block has deadlocked: reported with each thread's state, then abort.
//
// Memory: each cudaMalloc is its own mapping, the buffer placed so that it ends (rounded up to 16 bytes) at a
// PROT_NONE guard page. The buffers are PROT_NONE too (CUEMU_PROTECT=0 turns that off): inside a kernel, copy or
// cuBLAS call the first touch of a buffer faults, and the SIGSEGV handler opens that buffer (mprotect) until the
// call ends; anywhere else the fault is a host dereference of device memory. A fault in a guard page, outside device
// memory in a kernel, or in host code is reported with the kernel (or "host code") and the buffer it hit or
// overran, then the process dies.
#include "cuemu.h"

#undef expf
#undef logf
#undef log
#undef cos
#undef threadIdx
#undef blockIdx
#undef blockDim
#undef gridDim

#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#include <atomic>
#include <map>
#include <mutex>
#include <thread>
#include <vector>

#define CUEMU_MAX_SMEM_DEFAULT (48 * 1024)
#define CUEMU_MAX_SMEM_OPTIN (227 * 1024) // sm_90
#define CUEMU_STACK (256 * 1024)

[[noreturn]] static void die(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void die(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    fprintf(stderr, "cuemu: ");
    vfprintf(stderr, fmt, ap);
    fprintf(stderr, "\n");
    va_end(ap);
    fflush(stderr);
    abort();
}

// ---------------------------------------------------------------------------------------------------------------
// Device memory
// ---------------------------------------------------------------------------------------------------------------

struct dev_alloc {
    char *map;     // the mapping: data pages + one guard page
    size_t map_len;
    char *user;    // what cudaMalloc returned
    size_t size;   // what was asked
    size_t data_len; // map_len - guard page
    int *open;     // readable now (opened by a fault inside a call); heap-held so the map may move entries
};

static std::mutex mem_mu;
static std::map<uintptr_t, dev_alloc> allocs; // keyed by user pointer
static size_t mem_in_use;
static int protect_on = -1;
static std::atomic<int> open_depth; // > 0 inside a kernel, copy or cuBLAS call: a fault in a buffer opens it
static const size_t page = 4096;
// The buffers opened by faults since open_depth left 0 (closed again when it returns there).
#define MAX_OPENED 65536
static char *opened_map[MAX_OPENED];
static size_t opened_len[MAX_OPENED];
static int *opened_flag[MAX_OPENED];
static std::atomic<int> n_opened;

static int protecting(void) {
    if (protect_on < 0) {
        const char *s = getenv("CUEMU_PROTECT");
        protect_on = !(s && s[0] == '0');
    }
    return protect_on;
}

static void set_prot(const dev_alloc &a, int prot) {
    if (mprotect(a.map, a.data_len, prot) != 0) die("mprotect: %s", strerror(errno));
}

// Device memory may be touched from here to the matching close (nests): a fault opens the buffer it hits.
static void mem_open(void) { open_depth++; }
static void mem_close(void) {
    if (--open_depth != 0) return;
    const int n = n_opened.exchange(0);
    for (int i = 0; i < n; i++) {
        if (mprotect(opened_map[i], opened_len[i], PROT_NONE) != 0) die("mprotect: %s", strerror(errno));
        __atomic_store_n(opened_flag[i], 0, __ATOMIC_RELEASE);
    }
}

// The allocation holding [p, p + n), or NULL.
static const dev_alloc *find_alloc(const void *p, size_t n) {
    std::lock_guard<std::mutex> g(mem_mu);
    uintptr_t u = (uintptr_t)p;
    auto it = allocs.upper_bound(u);
    if (it == allocs.begin()) return NULL;
    --it;
    const dev_alloc &a = it->second;
    if (u < (uintptr_t)a.user || u + n > (uintptr_t)a.user + a.size) return NULL;
    return &a;
}

static int is_device(const void *p) { return find_alloc(p, 1) != NULL; }

// ---------------------------------------------------------------------------------------------------------------
// Errors, capture state
// ---------------------------------------------------------------------------------------------------------------

static thread_local cudaError_t last_error = cudaSuccess;

static cudaError_t fail(cudaError_t e) {
    if (last_error == cudaSuccess) last_error = e;
    return e;
}

struct cuemu_graph {
    std::vector<std::function<void()>> ops;
    std::vector<const char *> names;
};

static thread_local int capturing;           // inside BeginCapture .. EndCapture
static thread_local int capture_invalidated; // a synchronizing call was made inside it
static thread_local cuemu_graph *capture;

// A call that may not appear in a capture: invalidates it and fails, as the CUDA runtime does.
static int refuse_in_capture(void) {
    if (!capturing) return 0;
    capture_invalidated = 1;
    return 1;
}

static void record(const char *name, std::function<void()> op) {
    capture->ops.push_back(std::move(op));
    capture->names.push_back(name);
}

// ---------------------------------------------------------------------------------------------------------------
// Fibers, barriers, warp operations
// ---------------------------------------------------------------------------------------------------------------

enum { F_RUN, F_BAR, F_WARP, F_DONE };

// The context switch. x86-64: the callee-saved registers pushed on the old stack, the stack pointers swapped, the
// registers popped from the new one (no signal-mask syscalls, unlike swapcontext). A new fiber's stack holds six
// zeroed registers and fiber_entry as the return address.
#if defined(__x86_64__)
#define CUEMU_ASM_SWITCH 1
extern "C" void cuemu_switch(void **save_sp, void *to_sp);
__asm__(".text\n"
        ".globl cuemu_switch\n"
        ".type cuemu_switch,@function\n"
        "cuemu_switch:\n"
        "  pushq %rbp\n  pushq %rbx\n  pushq %r12\n  pushq %r13\n  pushq %r14\n  pushq %r15\n"
        "  movq %rsp, (%rdi)\n"
        "  movq %rsi, %rsp\n"
        "  popq %r15\n  popq %r14\n  popq %r13\n  popq %r12\n  popq %rbx\n  popq %rbp\n"
        "  ret\n"
        ".size cuemu_switch,.-cuemu_switch\n");
struct fctx {
    void *sp;
};
#else
struct fctx {
    ucontext_t uc;
};
#endif

struct fiber {
    fctx ctx;
    cuemu_ids ids;
    int state, lane, warp, started;
    // a pending warp op
    int kind, arg, width;
    unsigned mask;
    uint64_t val, res;
};

struct block_run {
    const char *kernel;
    const std::function<void()> *body;
    std::vector<fiber> f;
    int nthreads, live, at_bar;
    std::vector<unsigned> waiting, done; // per warp: lanes waiting in a warp op; lanes that exited
    fctx sched;
    std::vector<float> smem; // dynamic shared memory, NaN at the block's start
};

thread_local const cuemu_ids *cuemu_cur;
int cuemu_libm_jitter = !(getenv("CUEMU_LIBM") && !strcmp(getenv("CUEMU_LIBM"), "exact"));
static thread_local block_run *cur_block;
static thread_local fiber *cur_fiber;

void *cuemu_dyn_smem(void) {
    if (!cur_block) die("extern __shared__ used outside a kernel");
    return cur_block->smem.data();
}

static void switch_to(fctx *save, fctx *to) {
#ifdef CUEMU_ASM_SWITCH
    cuemu_switch(&save->sp, to->sp);
#else
    if (swapcontext(&save->uc, &to->uc) != 0) die("swapcontext failed");
#endif
}

static void yield_to_sched(void) {
    fiber *f = cur_fiber;
    switch_to(&f->ctx, &cur_block->sched);
    cuemu_cur = &f->ids; // back on this fiber
    cur_fiber = f;
}

static void release_bar(block_run *b) {
    for (auto &x : b->f)
        if (x.state == F_BAR) x.state = F_RUN;
    b->at_bar = 0;
}

void __syncthreads(void) {
    block_run *b = cur_block;
    if (!b) die("__syncthreads outside a kernel");
    fiber *f = cur_fiber;
    f->state = F_BAR;
    if (++b->at_bar == b->live) {
        release_bar(b);
        return;
    }
    yield_to_sched();
}

static const char *kind_name(int k) {
    static const char *n[] = {"__shfl_sync", "__shfl_up_sync", "__shfl_down_sync", "__shfl_xor_sync",
                              "__any_sync",  "__all_sync",     "__ballot_sync",    "__syncwarp"};
    return k >= 0 && k < 8 ? n[k] : "?";
}

static void where(const fiber *f, char *buf, size_t n) {
    snprintf(buf, n, "kernel %s, block (%u,%u,%u), thread (%u,%u,%u)", cur_block->kernel, f->ids.blockIdx.x,
             f->ids.blockIdx.y, f->ids.blockIdx.z, f->ids.threadIdx.x, f->ids.threadIdx.y, f->ids.threadIdx.z);
}

// All lanes of the mask have arrived at the same op: compute every lane's result.
static void fire_warp(block_run *b, int w0, unsigned mask) {
    fiber *lanes[32] = {0};
    for (int l = 0; l < 32; l++)
        if (mask >> l & 1u) lanes[l] = &b->f[(size_t)w0 + l];
    uint64_t any = 0, all = 1, ballot = 0;
    for (int l = 0; l < 32; l++)
        if (lanes[l]) {
            any |= lanes[l]->val != 0;
            all &= lanes[l]->val != 0;
            ballot |= (uint64_t)(lanes[l]->val != 0) << l;
        }
    for (int l = 0; l < 32; l++) {
        fiber *x = lanes[l];
        if (!x) continue;
        const int w = x->width, seg = (l / w) * w;
        int src = l;
        switch (x->kind) {
        case CUEMU_SHFL_IDX: src = seg + ((x->arg % w) + w) % w; break;
        case CUEMU_SHFL_UP: src = (l - seg) >= x->arg ? l - x->arg : l; break;
        case CUEMU_SHFL_DOWN: src = (l - seg) + x->arg < w ? l + x->arg : l; break;
        case CUEMU_SHFL_XOR: src = l ^ x->arg; if (src >= seg + w) src = l; break;
        case CUEMU_ANY: x->res = any; break;
        case CUEMU_ALL: x->res = all; break;
        case CUEMU_BALLOT: x->res = ballot; break;
        default: x->res = 0; break;
        }
        if (x->kind <= CUEMU_SHFL_XOR) {
            if (src < 0 || src > 31 || !lanes[src]) {
                char buf[200];
                where(x, buf, sizeof buf);
                die("%s: %s with mask %#x reads lane %d, which is not in the mask (undefined on a GPU)", buf,
                    kind_name(x->kind), mask, src);
            }
            x->res = lanes[src]->val;
        }
        if (x != cur_fiber) x->state = F_RUN;
    }
}

uint64_t cuemu_warp_op(int kind, unsigned mask, uint64_t bits, int arg, int width) {
    block_run *b = cur_block;
    if (!b) die("%s outside a kernel", kind_name(kind));
    fiber *f = cur_fiber;
    char buf[200];
    if (!(mask >> f->lane & 1u)) {
        where(f, buf, sizeof buf);
        die("%s: %s with mask %#x from lane %d, which the mask leaves out", buf, kind_name(kind), mask, f->lane);
    }
    if (width <= 0 || width > 32 || (width & (width - 1))) {
        where(f, buf, sizeof buf);
        die("%s: %s width %d is not a power of two <= 32", buf, kind_name(kind), width);
    }
    f->kind = kind, f->mask = mask, f->val = bits, f->arg = arg, f->width = width, f->state = F_WARP;
    const int w = f->warp, w0 = w * 32;
    const int nl = b->nthreads - w0 < 32 ? b->nthreads - w0 : 32;
    const unsigned present = nl == 32 ? 0xffffffffu : (1u << nl) - 1u;
    if (mask & ~present) {
        where(f, buf, sizeof buf);
        die("%s: %s with mask %#x names lanes past the block's %d threads", buf, kind_name(kind), mask, b->nthreads);
    }
    if (mask & b->done[(size_t)w]) {
        where(f, buf, sizeof buf);
        die("%s: %s with mask %#x names lane %d, which has exited (undefined on a GPU)", buf, kind_name(kind), mask,
            __builtin_ctz(mask & b->done[(size_t)w]));
    }
    const unsigned others = mask & b->waiting[(size_t)w];
    if (others) { // every lane already waiting was checked against the first one on its arrival
        const fiber *x = &b->f[(size_t)w0 + __builtin_ctz(others)];
        if (x->mask != mask || x->kind != kind) {
            where(f, buf, sizeof buf);
            die("%s: %s with mask %#x meets lane %d waiting in %s with mask %#x (divergent warp operations)", buf,
                kind_name(kind), mask, x->lane, kind_name(x->kind), x->mask);
        }
    }
    b->waiting[(size_t)w] |= 1u << f->lane;
    if ((b->waiting[(size_t)w] & mask) == mask) {
        b->waiting[(size_t)w] &= ~mask;
        fire_warp(b, w0, mask);
        f->state = F_RUN;
        return f->res;
    }
    yield_to_sched();
    return f->res;
}

static void fiber_main(void) {
    (*cur_block->body)();
    fiber *f = cur_fiber;
    f->state = F_DONE;
    block_run *b = cur_block;
    b->live--;
    b->done[(size_t)f->warp] |= 1u << f->lane;
    if (unsigned wl = b->waiting[(size_t)f->warp]) { // a lane waits for a warp op that names this one: never fires
        const fiber *x = &b->f[(size_t)f->warp * 32 + __builtin_ctz(wl)];
        if (x->mask >> f->lane & 1u) {
            char buf[200];
            where(x, buf, sizeof buf);
            die("%s: waits in %s with mask %#x for lane %d, which has exited (undefined on a GPU)", buf,
                kind_name(x->kind), x->mask, f->lane);
        }
    }
    if (b->at_bar > 0 && b->at_bar == b->live) release_bar(b); // exited threads count as arrived
#ifdef CUEMU_ASM_SWITCH
    switch_to(&f->ctx, &b->sched); // never resumed
    abort();
#endif
    // ucontext: falls back to the scheduler through uc_link
}

static void start_fiber(fiber *f, char *stack, size_t len, fctx *sched) {
#ifdef CUEMU_ASM_SWITCH
    (void)sched;
    // Tops staggered by cache lines: stacks a power of two apart would all map to the same cache sets.
    uintptr_t top = ((uintptr_t)stack + len - (uintptr_t)(f->lane + 32 * (f->warp % 4)) * 64 * 5 % 4096) & ~(uintptr_t)15;
    void **sp = (void **)top;
    *--sp = NULL;                      // fiber_main's return address slot: it never returns
    *--sp = (void *)&fiber_main;       // cuemu_switch's ret lands here with rsp = 8 mod 16, as after a call
    for (int i = 0; i < 6; i++) *--sp = NULL; // rbp rbx r12-r15
    f->ctx.sp = sp;
#else
    if (getcontext(&f->ctx.uc) != 0) die("getcontext failed");
    f->ctx.uc.uc_stack.ss_sp = stack;
    f->ctx.uc.uc_stack.ss_size = len;
    f->ctx.uc.uc_link = &sched->uc;
    makecontext(&f->ctx.uc, fiber_main, 0);
#endif
}

static void deadlock(block_run *b) {
    fprintf(stderr, "cuemu: deadlock in kernel %s, block (%u,%u,%u): no thread can run\n", b->kernel,
            b->f[0].ids.blockIdx.x, b->f[0].ids.blockIdx.y, b->f[0].ids.blockIdx.z);
    int shown = 0;
    for (auto &x : b->f) {
        if (x.state == F_DONE || shown++ > 40) continue;
        fprintf(stderr, "  thread (%u,%u,%u) lane %d: %s", x.ids.threadIdx.x, x.ids.threadIdx.y, x.ids.threadIdx.z,
                x.lane, x.state == F_BAR ? "at __syncthreads" : "in a warp op");
        if (x.state == F_WARP) fprintf(stderr, " %s mask %#x", kind_name(x.kind), x.mask);
        fprintf(stderr, "\n");
    }
    die("deadlock (threads wait at different barriers, or a warp op names a lane that never comes)");
}

struct worker {
    char *stacks = NULL;
    size_t stacks_len = 0;
    ~worker() {
        if (stacks) munmap(stacks, stacks_len);
    }
};
static thread_local worker wk;

// Threads run first to last (down = 0) or last to first (down = 1) between barriers: "thread 0 writes, the others
// read" without a barrier is caught going down, "each reads its neighbour's slot" going up.
static void run_block(const char *name, const std::function<void()> &body, dim3 grid, dim3 block, size_t smem,
                      unsigned bx, unsigned by, unsigned bz, int down) {
    const int n = (int)(block.x * block.y * block.z);
    size_t need = (size_t)n * CUEMU_STACK;
    if (wk.stacks_len < need) {
        if (wk.stacks) munmap(wk.stacks, wk.stacks_len);
        wk.stacks = (char *)mmap(NULL, need, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE,
                                 -1, 0);
        if (wk.stacks == MAP_FAILED) die("mmap of %zu bytes of fiber stacks failed", need);
        wk.stacks_len = need;
    }
    block_run b;
    b.kernel = name;
    b.body = &body;
    b.nthreads = n;
    b.live = n;
    b.at_bar = 0;
    b.smem.assign((smem + sizeof(float) - 1) / sizeof(float) + 1, NAN); // never written: NaN
    b.f.resize((size_t)n);
    b.waiting.assign((size_t)(n + 31) / 32, 0u);
    b.done.assign((size_t)(n + 31) / 32, 0u);
    for (int i = 0; i < n; i++) {
        fiber &f = b.f[(size_t)i];
        f.ids.threadIdx = {(unsigned)i % block.x, ((unsigned)i / block.x) % block.y, (unsigned)i / (block.x * block.y)};
        f.ids.blockIdx = {bx, by, bz};
        f.ids.blockDim = block;
        f.ids.gridDim = grid;
        f.state = F_RUN;
        f.lane = i % 32;
        f.warp = i / 32;
        f.started = 0;
    }
    block_run *saved_block = cur_block;
    fiber *saved_fiber = cur_fiber;
    const cuemu_ids *saved_ids = cuemu_cur;
    cur_block = &b;
    for (;;) {
        int ran = 0, done = 0;
        for (int j = 0; j < n; j++) {
            const int i = down ? n - 1 - j : j;
            fiber &f = b.f[(size_t)i];
            if (f.state == F_DONE) {
                done++;
                continue;
            }
            if (f.state != F_RUN) continue;
            if (!f.started) {
                start_fiber(&f, wk.stacks + (size_t)i * CUEMU_STACK, CUEMU_STACK, &b.sched);
                f.started = 1;
            }
            cur_fiber = &f;
            cuemu_cur = &f.ids;
            switch_to(&b.sched, &f.ctx);
            ran++;
        }
        if (done == n) break;
        if (!ran) deadlock(&b);
    }
    cur_block = saved_block;
    cur_fiber = saved_fiber;
    cuemu_cur = saved_ids;
}

static std::mutex smem_mu;
static std::map<const void *, int> smem_optin;

cudaError_t cuemu_func_set_smem(const void *fn, int bytes) {
    if (bytes < 0 || bytes > CUEMU_MAX_SMEM_OPTIN) return fail(cudaErrorInvalidValue);
    std::lock_guard<std::mutex> g(smem_mu);
    smem_optin[fn] = bytes;
    return cudaSuccess;
}

static int workers(void) {
    static int n = -1;
    if (n < 0) {
        const char *s = getenv("CUEMU_THREADS");
        n = s ? atoi(s) : 1;
        if (n < 1) n = 1;
    }
    return n;
}

static thread_local const char *running_kernel; // for the fault handler

static std::atomic<unsigned long long> grids_run;

static void run_grid(const char *name, const std::function<void()> &body, dim3 grid, dim3 block, size_t smem) {
    mem_open();
    const unsigned long long nb = (unsigned long long)grid.x * grid.y * grid.z, launch = grids_run++;
    auto one = [&](unsigned long long i) { // thread order alternates between blocks, and between launches
        unsigned bx = (unsigned)(i % grid.x), by = (unsigned)((i / grid.x) % grid.y),
                 bz = (unsigned)(i / ((unsigned long long)grid.x * grid.y));
        run_block(name, body, grid, block, smem, bx, by, bz, (int)((i + launch) & 1));
    };
    // Blocks run last first (CUEMU_ORDER=forward: first first): a GPU tends to start them in order, so a kernel
    // whose result depends on which block writes last shows it here.
    static int forward = -1;
    if (forward < 0) forward = getenv("CUEMU_ORDER") && !strcmp(getenv("CUEMU_ORDER"), "forward");
    int nw = workers();
    if (nw <= 1 || nb < 2) {
        running_kernel = name;
        for (unsigned long long i = 0; i < nb; i++) one(forward ? i : nb - 1 - i);
        running_kernel = NULL;
    } else {
        std::atomic<unsigned long long> next(0);
        std::vector<std::thread> th;
        for (int w = 0; w < nw; w++)
            th.emplace_back([&]() {
                running_kernel = name;
                for (unsigned long long i; (i = next++) < nb;) one(forward ? i : nb - 1 - i);
            });
        for (auto &t : th) t.join();
    }
    mem_close();
}

void cuemu_submit(const void *fn, const char *name, dim3 grid, dim3 block, size_t smem, std::function<void()> body) {
    const unsigned long long threads = (unsigned long long)block.x * block.y * block.z;
    int limit = CUEMU_MAX_SMEM_DEFAULT;
    {
        std::lock_guard<std::mutex> g(smem_mu);
        auto it = smem_optin.find(fn);
        if (it != smem_optin.end() && it->second > limit) limit = it->second;
    }
    if (threads == 0 || threads > 1024 || block.z > 64 || grid.x == 0 || grid.y == 0 || grid.z == 0 ||
        grid.y > 65535 || grid.z > 65535 || grid.x > 2147483647u) {
        fprintf(stderr, "cuemu: launch of %s: invalid configuration grid (%u,%u,%u) block (%u,%u,%u)\n", name, grid.x,
                grid.y, grid.z, block.x, block.y, block.z);
        fail(cudaErrorInvalidConfiguration);
        return;
    }
    if (smem > (size_t)limit) {
        fprintf(stderr, "cuemu: launch of %s: %zu bytes of dynamic shared memory, over the %d allowed%s\n", name, smem,
                limit, limit == CUEMU_MAX_SMEM_DEFAULT ? " (cudaFuncSetAttribute not called)" : "");
        fail(cudaErrorInvalidValue);
        return;
    }
    static int trace = -1;
    if (trace < 0) trace = getenv("CUEMU_TRACE") && getenv("CUEMU_TRACE")[0] == '1';
    if (trace)
        fprintf(stderr, "cuemu: %s %s<<<(%u,%u,%u), (%u,%u,%u), %zu>>>\n", capturing ? "capture" : "launch", name,
                grid.x, grid.y, grid.z, block.x, block.y, block.z, smem);
    if (capturing) {
        record(name, [name, body, grid, block, smem]() { run_grid(name, body, grid, block, smem); });
        return;
    }
    run_grid(name, body, grid, block, smem);
}

// ---------------------------------------------------------------------------------------------------------------
// Fault handler: names the kernel (or host code) and the allocation near the address
// ---------------------------------------------------------------------------------------------------------------

static void on_segv(int sig, siginfo_t *si, void *uc) {
    (void)uc;
    char buf[512];
    uintptr_t a = (uintptr_t)si->si_addr;
    const char *who = running_kernel ? running_kernel : open_depth.load() > 0 ? "(a copy or cuBLAS call)" : NULL;
    const dev_alloc *hit = NULL;
    // No lock: the map only changes in cudaMalloc/cudaFree, which never run while a kernel or copy does.
    auto it = allocs.upper_bound(a + page); // the buffer starts at most a page before its mapping's end
    while (it != allocs.begin()) {
        --it;
        const dev_alloc &d = it->second;
        if (a >= (uintptr_t)d.map && a < (uintptr_t)d.map + d.map_len) {
            hit = &d;
            break;
        }
        if ((uintptr_t)d.map + d.map_len <= a) break;
    }
    if (hit && open_depth.load() > 0 && a < (uintptr_t)hit->map + hit->data_len) { // a call's first touch: open
        int expect = 0;
        if (__atomic_compare_exchange_n(hit->open, &expect, 1, 0, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE)) {
            if (mprotect(hit->map, hit->data_len, PROT_READ | PROT_WRITE) != 0) abort();
            const int i = n_opened++;
            if (i >= MAX_OPENED) abort();
            opened_map[i] = hit->map, opened_len[i] = hit->data_len, opened_flag[i] = hit->open;
        }
        return; // retry the access (another thread may have opened it meanwhile)
    }
    int n;
    if (!protecting() && hit && a < (uintptr_t)hit->map + hit->data_len)
        n = snprintf(buf, sizeof buf, "cuemu: fault at %p in a device buffer with CUEMU_PROTECT=0\n", (void *)a);
    else if (hit && a >= (uintptr_t)hit->user + hit->size)
        n = snprintf(buf, sizeof buf, "cuemu: fault at %p, %zu bytes past the end of a %zu-byte device buffer, in %s%s\n",
                     (void *)a, (size_t)(a - ((uintptr_t)hit->user + hit->size)), hit->size,
                     who ? "kernel " : "host code (device memory is not readable outside kernels and copies)",
                     who ? who : "");
    else if (hit)
        n = snprintf(buf, sizeof buf, "cuemu: fault at %p, inside a %zu-byte device buffer, in %s%s\n", (void *)a,
                     hit->size, who ? "kernel " : "host code (device memory is not readable outside kernels and copies)",
                     who ? who : "");
    else
        n = snprintf(buf, sizeof buf, "cuemu: fault at %p (not device memory) in %s%s\n", (void *)a,
                     who ? "kernel " : "host code", who ? who : "");
    if (n > 0) {
        ssize_t wr = write(2, buf, (size_t)n < sizeof buf ? (size_t)n : sizeof buf - 1);
        (void)wr;
    }
    signal(sig, SIG_DFL);
    raise(sig);
}

static void install_handler(void) {
    static int done;
    if (done) return;
    done = 1;
    static char altstack[64 * 1024];
    stack_t ss = {};
    ss.ss_sp = altstack;
    ss.ss_size = sizeof altstack;
    sigaltstack(&ss, NULL);
    struct sigaction sa = {};
    sa.sa_sigaction = on_segv;
    sa.sa_flags = SA_SIGINFO | SA_ONSTACK;
    sigaction(SIGSEGV, &sa, NULL);
}

// ---------------------------------------------------------------------------------------------------------------
// Runtime API
// ---------------------------------------------------------------------------------------------------------------

const char *cudaGetErrorString(cudaError_t e) {
    switch (e) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorMemoryAllocation: return "out of memory";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    case cudaErrorInvalidDevicePointer: return "invalid device pointer";
    case cudaErrorNoDevice: return "no CUDA-capable device is detected";
    case cudaErrorLaunchFailure: return "unspecified launch failure";
    case cudaErrorStreamCaptureUnsupported: return "operation not permitted when stream is capturing";
    case cudaErrorStreamCaptureInvalidated: return "operation failed due to a previous error during capture";
    case cudaErrorStreamCaptureImplicit: return "operation would make the legacy stream depend on a capturing blocking stream";
    case cudaErrorIllegalState: return "the operation cannot be performed in the present state";
    }
    return "unknown error";
}

cudaError_t cudaGetLastError(void) {
    cudaError_t e = last_error;
    last_error = cudaSuccess;
    return e;
}
cudaError_t cudaPeekAtLastError(void) { return last_error; }

static const size_t total_mem = (size_t)80 << 30;

cudaError_t cudaGetDeviceCount(int *n) {
    install_handler();
    *n = 1;
    return cudaSuccess;
}
cudaError_t cudaGetDevice(int *d) {
    *d = 0;
    return cudaSuccess;
}
cudaError_t cudaGetDeviceProperties(cudaDeviceProp *p, int dev) {
    if (dev != 0) return fail(cudaErrorInvalidValue);
    memset(p, 0, sizeof *p);
    snprintf(p->name, sizeof p->name, "cuemu (CPU emulation)");
    p->totalGlobalMem = total_mem;
    p->major = 9;
    p->minor = 0;
    p->multiProcessorCount = 132;
    return cudaSuccess;
}
cudaError_t cudaDeviceGetAttribute(int *v, cudaDeviceAttr a, int dev) {
    if (dev != 0) return fail(cudaErrorInvalidValue);
    switch (a) {
    // An H100 SXM's attributes, so that derived figures have a GPU's scale (the name says it is an emulation).
    case cudaDevAttrClockRate: *v = 1980000; break; // kHz
    case cudaDevAttrMultiProcessorCount: *v = 132; break;
    case cudaDevAttrMemoryClockRate: *v = 2619000; break;
    case cudaDevAttrGlobalMemoryBusWidth: *v = 5120; break;
    default: return fail(cudaErrorInvalidValue);
    }
    return cudaSuccess;
}
cudaError_t cudaRuntimeGetVersion(int *v) {
    *v = 13000;
    return cudaSuccess;
}
cudaError_t cudaDeviceSynchronize(void) {
    if (refuse_in_capture()) return fail(cudaErrorStreamCaptureUnsupported);
    return cudaSuccess;
}
cudaError_t cudaStreamSynchronize(cudaStream_t s) {
    (void)s;
    return cudaDeviceSynchronize();
}

cudaError_t cudaMalloc(void **p, size_t n) {
    install_handler();
    *p = NULL;
    if (refuse_in_capture()) return fail(cudaErrorStreamCaptureUnsupported);
    if (n == 0) return cudaSuccess;
    // Rounded to 16 bytes only (cudaMalloc promises 256): an overrun past a float buffer of a multiple of 4 floats
    // lands in the guard page at once.
    const size_t rounded = (n + 15) / 16 * 16;
    const size_t data_len = (rounded + page - 1) / page * page;
    char *m = (char *)mmap(NULL, data_len + page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (m == MAP_FAILED) return fail(cudaErrorMemoryAllocation);
    if (mprotect(m + data_len, page, PROT_NONE) != 0) die("mprotect: %s", strerror(errno));
    dev_alloc a;
    a.map = m;
    a.map_len = data_len + page;
    a.data_len = data_len;
    a.user = m + (data_len - rounded);
    a.size = n;
    a.open = new int(0);
    memset(a.user, 0xff, rounded); // "uninitialized": NaN as float, -1 as int
    if (protecting()) set_prot(a, PROT_NONE);
    {
        std::lock_guard<std::mutex> g(mem_mu);
        allocs[(uintptr_t)a.user] = a;
        mem_in_use += n;
    }
    *p = a.user;
    return cudaSuccess;
}

cudaError_t cudaFree(void *p) {
    if (!p) return cudaSuccess;
    if (refuse_in_capture()) return fail(cudaErrorStreamCaptureUnsupported);
    std::lock_guard<std::mutex> g(mem_mu);
    auto it = allocs.find((uintptr_t)p);
    if (it == allocs.end()) {
        fprintf(stderr, "cuemu: cudaFree(%p): not a pointer cudaMalloc returned\n", p);
        return fail(cudaErrorInvalidDevicePointer);
    }
    if (__atomic_load_n(it->second.open, __ATOMIC_ACQUIRE)) die("cudaFree inside a kernel or copy");
    munmap(it->second.map, it->second.map_len);
    delete it->second.open;
    mem_in_use -= it->second.size;
    allocs.erase(it);
    return cudaSuccess;
}

cudaError_t cudaMemGetInfo(size_t *free_b, size_t *total_b) {
    std::lock_guard<std::mutex> g(mem_mu);
    *total_b = total_mem;
    *free_b = total_mem - mem_in_use;
    return cudaSuccess;
}

// Checks that [p, p+n) is device memory (dev) or not (host); names the call when not.
static int check_side(const char *call, const void *p, size_t n, int dev) {
    if (n == 0) return 1;
    const dev_alloc *a = find_alloc(p, n);
    if (dev && !a) {
        fprintf(stderr, "cuemu: %s: [%p, +%zu) is not inside one device allocation\n", call, p, n);
        return 0;
    }
    if (!dev && is_device(p)) {
        fprintf(stderr, "cuemu: %s: %p is device memory where host memory was expected\n", call, p);
        return 0;
    }
    return 1;
}

static cudaError_t copy_checked(const char *call, void *dst, const void *src, size_t n, cudaMemcpyKind kind) {
    int dd = kind == cudaMemcpyHostToDevice || kind == cudaMemcpyDeviceToDevice;
    int sd = kind == cudaMemcpyDeviceToHost || kind == cudaMemcpyDeviceToDevice;
    if (kind == cudaMemcpyDefault) dd = is_device(dst), sd = is_device(src);
    if (!check_side(call, dst, n, dd) || !check_side(call, src, n, sd)) return fail(cudaErrorInvalidValue);
    return cudaSuccess;
}

cudaError_t cudaMemcpy(void *dst, const void *src, size_t n, cudaMemcpyKind kind) {
    if (refuse_in_capture()) return fail(cudaErrorStreamCaptureUnsupported);
    cudaError_t e = copy_checked("cudaMemcpy", dst, src, n, kind);
    if (e) return e;
    mem_open();
    memmove(dst, src, n);
    mem_close();
    return cudaSuccess;
}

// An asynchronous copy or memset: run now, or recorded into the capture. A copy from or to host memory inside a
// capture is refused (pageable host memory in a graph; moerl's decode steps avoid it) and invalidates it.
static cudaError_t enqueue(const char *name, cudaMemcpyKind kind, std::function<void()> op) {
    if (!capturing) {
        op();
        return cudaSuccess;
    }
    if (kind != cudaMemcpyDeviceToDevice) {
        capture_invalidated = 1;
        return fail(cudaErrorStreamCaptureUnsupported);
    }
    record(name, std::move(op));
    return cudaSuccess;
}

cudaError_t cudaMemcpyAsync(void *dst, const void *src, size_t n, cudaMemcpyKind kind, cudaStream_t s) {
    (void)s;
    cudaError_t e = copy_checked("cudaMemcpyAsync", dst, src, n, kind);
    if (e) return e;
    return enqueue("cudaMemcpyAsync", kind, [dst, src, n]() {
        mem_open();
        memmove(dst, src, n);
        mem_close();
    });
}

cudaError_t cudaMemcpy2DAsync(void *dst, size_t dpitch, const void *src, size_t spitch, size_t width, size_t rows,
                              cudaMemcpyKind kind, cudaStream_t s) {
    (void)s;
    if (rows == 0 || width == 0) return cudaSuccess;
    if (width > dpitch || width > spitch) return fail(cudaErrorInvalidValue);
    const size_t dn = dpitch * (rows - 1) + width, sn = spitch * (rows - 1) + width;
    int dd = kind == cudaMemcpyHostToDevice || kind == cudaMemcpyDeviceToDevice;
    int sd = kind == cudaMemcpyDeviceToHost || kind == cudaMemcpyDeviceToDevice;
    if (!check_side("cudaMemcpy2DAsync", dst, dn, dd) || !check_side("cudaMemcpy2DAsync", src, sn, sd))
        return fail(cudaErrorInvalidValue);
    return enqueue("cudaMemcpy2DAsync", kind, [=]() {
        mem_open();
        for (size_t r = 0; r < rows; r++) memmove((char *)dst + r * dpitch, (const char *)src + r * spitch, width);
        mem_close();
    });
}

cudaError_t cudaMemsetAsync(void *p, int v, size_t n, cudaStream_t s) {
    (void)s;
    if (!check_side("cudaMemsetAsync", p, n, 1)) return fail(cudaErrorInvalidValue);
    return enqueue("cudaMemsetAsync", cudaMemcpyDeviceToDevice, [p, v, n]() {
        mem_open();
        memset(p, v, n);
        mem_close();
    });
}

cudaError_t cudaMemset(void *p, int v, size_t n) {
    if (refuse_in_capture()) return fail(cudaErrorStreamCaptureUnsupported);
    return cudaMemsetAsync(p, v, n, 0);
}

cudaError_t cudaStreamBeginCapture(cudaStream_t s, cudaStreamCaptureMode mode) {
    (void)mode;
    if (s == 0 || s == cudaStreamLegacy) return fail(cudaErrorStreamCaptureUnsupported); // the legacy stream
    if (capturing) return fail(cudaErrorIllegalState);
    capturing = 1;
    capture_invalidated = 0;
    capture = new cuemu_graph();
    return cudaSuccess;
}

cudaError_t cudaStreamEndCapture(cudaStream_t s, cudaGraph_t *g) {
    (void)s;
    *g = NULL;
    if (!capturing) return fail(cudaErrorIllegalState);
    capturing = 0;
    if (capture_invalidated) {
        delete capture;
        capture = NULL;
        return fail(cudaErrorStreamCaptureInvalidated);
    }
    *g = capture;
    capture = NULL;
    return cudaSuccess;
}

static std::atomic<long> graphs_launched;

cudaError_t cudaGraphInstantiate(cudaGraphExec_t *exec, cudaGraph_t g, unsigned long long flags) {
    (void)flags;
    if (!g) return fail(cudaErrorInvalidValue);
    *exec = new cuemu_graph(*g);
    return cudaSuccess;
}

cudaError_t cudaGraphLaunch(cudaGraphExec_t exec, cudaStream_t s) {
    (void)s;
    if (!exec) return fail(cudaErrorInvalidValue);
    if (capturing) { // a graph launched into a capture becomes a node of it
        record("cudaGraphLaunch", [exec]() {
            for (auto &op : exec->ops) op();
        });
        return cudaSuccess;
    }
    for (auto &op : exec->ops) op();
    graphs_launched++;
    return cudaSuccess;
}

cudaError_t cudaGraphDestroy(cudaGraph_t g) {
    delete g;
    return cudaSuccess;
}
cudaError_t cudaGraphExecDestroy(cudaGraphExec_t g) {
    delete g;
    return cudaSuccess;
}

// ---------------------------------------------------------------------------------------------------------------
// cuBLAS: column-major GEMMs on the checked device buffers
// ---------------------------------------------------------------------------------------------------------------

struct cuemu_cublas {
    int magic;
};

cublasStatus_t cublasCreate(cublasHandle_t *h) {
    *h = new cuemu_cublas{0x6c627563};
    return CUBLAS_STATUS_SUCCESS;
}
cublasStatus_t cublasDestroy(cublasHandle_t h) {
    if (!h || h->magic != 0x6c627563) return CUBLAS_STATUS_NOT_INITIALIZED;
    h->magic = 0;
    delete h;
    return CUBLAS_STATUS_SUCCESS;
}
static cublasStatus_t handle_ok(cublasHandle_t h) {
    return h && h->magic == 0x6c627563 ? CUBLAS_STATUS_SUCCESS : CUBLAS_STATUS_NOT_INITIALIZED;
}
cublasStatus_t cublasSetStream(cublasHandle_t h, cudaStream_t s) {
    (void)s;
    return handle_ok(h);
}
cublasStatus_t cublasSetMathMode(cublasHandle_t h, cublasMath_t m) {
    (void)m;
    return handle_ok(h);
}
cublasStatus_t cublasSetAtomicsMode(cublasHandle_t h, cublasAtomicsMode_t m) {
    (void)m;
    return handle_ok(h);
}
cublasStatus_t cublasSetWorkspace(cublasHandle_t h, void *ws, size_t bytes) {
    if (handle_ok(h)) return CUBLAS_STATUS_NOT_INITIALIZED;
    if (bytes && !find_alloc(ws, bytes)) return CUBLAS_STATUS_INVALID_VALUE;
    return CUBLAS_STATUS_SUCCESS;
}
cublasStatus_t cublasGetProperty(libraryPropertyType t, int *v) {
    *v = t == MAJOR_VERSION ? 13 : 0;
    return CUBLAS_STATUS_SUCCESS;
}
const char *cublasGetStatusString(cublasStatus_t s) {
    switch (s) {
    case CUBLAS_STATUS_SUCCESS: return "CUBLAS_STATUS_SUCCESS";
    case CUBLAS_STATUS_NOT_INITIALIZED: return "CUBLAS_STATUS_NOT_INITIALIZED";
    case CUBLAS_STATUS_ALLOC_FAILED: return "CUBLAS_STATUS_ALLOC_FAILED";
    case CUBLAS_STATUS_INVALID_VALUE: return "CUBLAS_STATUS_INVALID_VALUE";
    case CUBLAS_STATUS_EXECUTION_FAILED: return "CUBLAS_STATUS_EXECUTION_FAILED";
    case CUBLAS_STATUS_NOT_SUPPORTED: return "CUBLAS_STATUS_NOT_SUPPORTED";
    }
    return "CUBLAS_STATUS_UNKNOWN";
}
size_t cublasLtGetVersion(void) { return 130000; }
ncclResult_t ncclGetVersion(int *v) {
    *v = 22800;
    return ncclSuccess;
}

// The shape checks cuBLAS makes, plus: each operand lies inside one device allocation.
static cublasStatus_t gemm_check(const char *call, cublasOperation_t ta, cublasOperation_t tb, int m, int n, int k,
                                 const void *A, int lda, size_t esa, const void *B, int ldb, size_t esb, const void *C,
                                 int ldc) {
    if (m < 0 || n < 0 || k < 0) return CUBLAS_STATUS_INVALID_VALUE;
    const int ar = ta == CUBLAS_OP_N ? m : k, ac = ta == CUBLAS_OP_N ? k : m;
    const int br = tb == CUBLAS_OP_N ? k : n, bc = tb == CUBLAS_OP_N ? n : k;
    if (lda < (ar > 1 ? ar : 1) || ldb < (br > 1 ? br : 1) || ldc < (m > 1 ? m : 1)) {
        fprintf(stderr, "cuemu: %s: leading dimension too small (m %d n %d k %d, lda %d ldb %d ldc %d)\n", call, m, n,
                k, lda, ldb, ldc);
        return CUBLAS_STATUS_INVALID_VALUE;
    }
    if (m == 0 || n == 0) return CUBLAS_STATUS_SUCCESS;
    if (k > 0) {
        if (!check_side(call, A, ((size_t)lda * (ac - 1) + ar) * esa, 1)) return CUBLAS_STATUS_INVALID_VALUE;
        if (!check_side(call, B, ((size_t)ldb * (bc - 1) + br) * esb, 1)) return CUBLAS_STATUS_INVALID_VALUE;
    }
    if (!check_side(call, C, ((size_t)ldc * (n - 1) + m) * sizeof(float), 1)) return CUBLAS_STATUS_INVALID_VALUE;
    return CUBLAS_STATUS_SUCCESS;
}

// cuBLAS's results are not OpenBLAS's (nor the CPU backend's) bits, and its kernel, so its summation order, depends
// on the shape: the emulation splits k into 1, 2 or 3 ranges picked by a hash of (m, n, k, ops), accumulates each
// in order with fused multiply-adds, and adds the partial sums in order. So a row's bits may change with the
// number of rows, as on a GPU, and a test that asks cuBLAS for the CPU's bits fails here too.
static void sgemm_run(cublasOperation_t ta, cublasOperation_t tb, int m, int n, int k, float alpha, const float *A,
                      int lda, const float *B, int ldb, float beta, float *C, int ldc) {
    mem_open();
    const int split = 1 + (int)(cuemu_hash(((uint64_t)m * 1000003u + (uint64_t)n) * 1000003u + (uint64_t)k * 4u +
                                           (uint64_t)ta * 2u + (uint64_t)tb) % 3);
    for (int j = 0; j < n; j++)
        for (int i = 0; i < m; i++) {
            float sum = 0.0f;
            for (int s = 0; s < split; s++) {
                const int l0 = (int)((int64_t)k * s / split), l1 = (int)((int64_t)k * (s + 1) / split);
                float part = 0.0f;
                for (int l = l0; l < l1; l++) {
                    const float a = ta == CUBLAS_OP_N ? A[i + (size_t)l * lda] : A[l + (size_t)i * lda];
                    const float b = tb == CUBLAS_OP_N ? B[l + (size_t)j * ldb] : B[j + (size_t)l * ldb];
                    part = fmaf(a, b, part);
                }
                sum = s == 0 ? part : sum + part;
            }
            float *c = C + (size_t)j * ldc + i;
            // beta 0: C is not read (it may hold NaN), as in BLAS
            *c = beta == 0.0f ? alpha * sum : alpha * sum + beta * *c;
        }
    mem_close();
}

cublasStatus_t cublasSgemm(cublasHandle_t h, cublasOperation_t ta, cublasOperation_t tb, int m, int n, int k,
                           const float *alpha, const float *A, int lda, const float *B, int ldb, const float *beta,
                           float *C, int ldc) {
    if (handle_ok(h)) return CUBLAS_STATUS_NOT_INITIALIZED;
    cublasStatus_t st = gemm_check("cublasSgemm", ta, tb, m, n, k, A, lda, 4, B, ldb, 4, C, ldc);
    if (st || m == 0 || n == 0) return st;
    const float al = *alpha, be = *beta; // host pointer mode: read at the call
    auto op = [=]() { sgemm_run(ta, tb, m, n, k, al, A, lda, B, ldb, be, C, ldc); };
    if (capturing)
        record("cublasSgemm", op);
    else
        op();
    return CUBLAS_STATUS_SUCCESS;
}

// bf16 (or fp32) inputs, fp32 accumulate and output: the inputs widened to fp32 copies, then Sgemm.
static float *widen(const void *p, cudaDataType t, int rows, int cols, int ld) {
    float *w = (float *)malloc(sizeof(float) * (size_t)ld * cols + 1);
    if (!w) die("out of memory");
    for (size_t i = 0; i < (size_t)ld * (cols - 1) + rows; i++)
        w[i] = t == CUDA_R_16BF ? __bfloat162float(((const __nv_bfloat16 *)p)[i]) : ((const float *)p)[i];
    return w;
}

cublasStatus_t cublasGemmEx(cublasHandle_t h, cublasOperation_t ta, cublasOperation_t tb, int m, int n, int k,
                            const void *alpha, const void *A, cudaDataType at, int lda, const void *B, cudaDataType bt,
                            int ldb, const void *beta, void *C, cudaDataType ct, int ldc, cublasComputeType_t compute,
                            cublasGemmAlgo_t algo) {
    (void)algo;
    if (handle_ok(h)) return CUBLAS_STATUS_NOT_INITIALIZED;
    if (ct != CUDA_R_32F || (at != CUDA_R_16BF && at != CUDA_R_32F) || (bt != CUDA_R_16BF && bt != CUDA_R_32F) ||
        (compute != CUBLAS_COMPUTE_32F && compute != CUBLAS_COMPUTE_32F_FAST_16BF))
        return CUBLAS_STATUS_NOT_SUPPORTED;
    const size_t esa = at == CUDA_R_16BF ? 2 : 4, esb = bt == CUDA_R_16BF ? 2 : 4;
    cublasStatus_t st = gemm_check("cublasGemmEx", ta, tb, m, n, k, A, lda, esa, B, ldb, esb, C, ldc);
    if (st || m == 0 || n == 0) return st;
    const float al = *(const float *)alpha, be = *(const float *)beta;
    auto op = [=]() {
        const int ar = ta == CUBLAS_OP_N ? m : k, ac = ta == CUBLAS_OP_N ? k : m;
        const int br = tb == CUBLAS_OP_N ? k : n, bc = tb == CUBLAS_OP_N ? n : k;
        float *wa = NULL, *wb = NULL;
        if (k > 0) {
            mem_open();
            wa = widen(A, at, ar, ac, lda);
            wb = widen(B, bt, br, bc, ldb);
            mem_close();
        }
        sgemm_run(ta, tb, m, n, k, al, wa, lda, wb, ldb, be, (float *)C, ldc);
        free(wa);
        free(wb);
    };
    if (capturing)
        record("cublasGemmEx", op);
    else
        op();
    return CUBLAS_STATUS_SUCCESS;
}

// For tests: how many graphs cudaGraphLaunch has replayed.
extern "C" long cuemu_graphs_launched(void) { return graphs_launched.load(); }
