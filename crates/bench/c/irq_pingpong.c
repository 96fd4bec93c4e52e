/* irq_pingpong: the C reference of `faultline bench irq`.
 *
 * A "device" thread raises, a "handler" thread wakes and answers (ping-pong), both pinned.
 * The one-way latency is the handler's CLOCK_MONOTONIC at wake-up minus the device's just
 * before it raised. Prints one JSON line with the same keys as faultline's own figures.
 *
 * usage: irq_pingpong METHOD PLACEMENT DEVICE_CPU HANDLER_CPU ROUND_TRIPS
 * methods: eventfd eventfd-epoll pipe futex signal signal-async unix-dgram io-uring busy-poll
 *
 * Built by `faultline bench irq` with the system cc: cc -O2 -pthread. No liburing: io_uring
 * through its raw system calls.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <linux/futex.h>
#include <linux/io_uring.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#define SPIN_NS 50000 /* busy-poll: spin this long, then sleep on the futex */
#define SLEEPING 0x80000000u

static const char *method;
static long iters, warmup;
static double *samples;
static _Atomic int64_t t_raise;
static pid_t tids[2]; /* [0] handler (waits on direction 0), [1] device */

static void die(const char *what) {
    fprintf(stderr, "irq_pingpong: %s: %s\n", what, strerror(errno));
    exit(1);
}

static int64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static long futex(_Atomic uint32_t *w, int op, uint32_t v) {
    return syscall(SYS_futex, w, op, v, NULL, NULL, 0);
}

/* Direction d: 0 = device -> handler, 1 = handler -> device. */
static int efd[2], ep[2], pfd[2][2], sv[2];
static _Atomic uint32_t word[2];
/* Per thread, as each side keeps its own sequence (and no shared line is written for it). */
static __thread uint32_t seen[2], sent[2];
static __thread volatile sig_atomic_t got;

static void on_sig(int s) {
    (void)s;
    got = 1;
}

struct ring {
    int fd;
    unsigned *sq_tail, *sq_mask, *sq_array, *cq_head, *cq_tail, *cq_mask;
    struct io_uring_sqe *sqes;
    struct io_uring_cqe *cqes;
};
static struct ring rings[2];

static void ring_init(struct ring *r) {
    struct io_uring_params p;
    memset(&p, 0, sizeof p);
    r->fd = (int)syscall(SYS_io_uring_setup, 8, &p);
    if (r->fd < 0) die("io_uring_setup");
    size_t sq_sz = p.sq_off.array + p.sq_entries * sizeof(unsigned);
    size_t cq_sz = p.cq_off.cqes + p.cq_entries * sizeof(struct io_uring_cqe);
    if (p.features & IORING_FEAT_SINGLE_MMAP) sq_sz = cq_sz = sq_sz > cq_sz ? sq_sz : cq_sz;
    char *sq = mmap(0, sq_sz, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, r->fd,
                    IORING_OFF_SQ_RING);
    if (sq == MAP_FAILED) die("mmap sq ring");
    char *cq = sq;
    if (!(p.features & IORING_FEAT_SINGLE_MMAP)) {
        cq = mmap(0, cq_sz, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, r->fd,
                  IORING_OFF_CQ_RING);
        if (cq == MAP_FAILED) die("mmap cq ring");
    }
    r->sqes = mmap(0, p.sq_entries * sizeof(struct io_uring_sqe), PROT_READ | PROT_WRITE,
                   MAP_SHARED | MAP_POPULATE, r->fd, IORING_OFF_SQES);
    if (r->sqes == MAP_FAILED) die("mmap sqes");
    r->sq_tail = (unsigned *)(sq + p.sq_off.tail);
    r->sq_mask = (unsigned *)(sq + p.sq_off.ring_mask);
    r->sq_array = (unsigned *)(sq + p.sq_off.array);
    r->cq_head = (unsigned *)(cq + p.cq_off.head);
    r->cq_tail = (unsigned *)(cq + p.cq_off.tail);
    r->cq_mask = (unsigned *)(cq + p.cq_off.ring_mask);
    r->cqes = (struct io_uring_cqe *)(cq + p.cq_off.cqes);
}

/* Submit a read of the eventfd and wait for its completion. */
static void ring_wait(struct ring *r, int fd) {
    static __thread uint64_t buf;
    unsigned tail = atomic_load_explicit((_Atomic unsigned *)r->sq_tail, memory_order_relaxed);
    unsigned idx = tail & *r->sq_mask;
    struct io_uring_sqe *s = &r->sqes[idx];
    memset(s, 0, sizeof *s);
    s->opcode = IORING_OP_READ;
    s->fd = fd;
    s->addr = (uint64_t)(uintptr_t)&buf;
    s->len = 8;
    r->sq_array[idx] = idx;
    atomic_store_explicit((_Atomic unsigned *)r->sq_tail, tail + 1, memory_order_release);
    for (;;) {
        unsigned head = *r->cq_head;
        if (head != atomic_load_explicit((_Atomic unsigned *)r->cq_tail, memory_order_acquire)) {
            struct io_uring_cqe *c = &r->cqes[head & *r->cq_mask];
            if (c->res != 8) {
                errno = c->res < 0 ? -c->res : EIO;
                die("io_uring read");
            }
            atomic_store_explicit((_Atomic unsigned *)r->cq_head, head + 1, memory_order_release);
            return;
        }
        int n = (int)syscall(SYS_io_uring_enter, r->fd, 1, 1, IORING_ENTER_GETEVENTS, NULL, 0);
        if (n < 0 && errno != EINTR) die("io_uring_enter");
    }
}

/* The method, resolved once: the raise and wait paths switch on it with no string compares. */
enum m { M_EVENTFD, M_EVENTFD_EPOLL, M_PIPE, M_FUTEX, M_SIGNAL, M_SIGNAL_ASYNC, M_UNIX_DGRAM, M_IO_URING, M_BUSY_POLL };
static const char *const names[] = {"eventfd", "eventfd-epoll", "pipe", "futex", "signal", "signal-async", "unix-dgram", "io-uring", "busy-poll"};
static enum m meth;

static int is(enum m x) { return meth == x; }

static void resolve(void) {
    for (unsigned i = 0; i < sizeof names / sizeof names[0]; i++)
        if (strcmp(method, names[i]) == 0) {
            meth = (enum m)i;
            return;
        }
    fprintf(stderr, "irq_pingpong: unknown method %s\n", method);
    exit(2);
}

static void setup(void) {
    if (is(M_EVENTFD) || is(M_EVENTFD_EPOLL) || is(M_IO_URING)) {
        for (int d = 0; d < 2; d++) {
            efd[d] = eventfd(0, 0);
            if (efd[d] < 0) die("eventfd");
            if (is(M_EVENTFD_EPOLL)) {
                ep[d] = epoll_create1(0);
                struct epoll_event ev = {.events = EPOLLIN, .data.u32 = (uint32_t)d};
                if (ep[d] < 0 || epoll_ctl(ep[d], EPOLL_CTL_ADD, efd[d], &ev)) die("epoll");
            }
            if (is(M_IO_URING)) ring_init(&rings[d]);
        }
    } else if (is(M_PIPE)) {
        if (pipe(pfd[0]) || pipe(pfd[1])) die("pipe");
    } else if (is(M_UNIX_DGRAM)) {
        if (socketpair(AF_UNIX, SOCK_DGRAM, 0, sv)) die("socketpair");
    } else if (is(M_SIGNAL_ASYNC)) {
        struct sigaction sa;
        memset(&sa, 0, sizeof sa);
        sa.sa_handler = on_sig;
        sigemptyset(&sa.sa_mask);
        if (sigaction(SIGUSR2, &sa, NULL)) die("sigaction");
    }
}

static void raise_dir(int d) {
    uint64_t one = 1;
    char c = 1;
    if (is(M_EVENTFD) || is(M_EVENTFD_EPOLL) || is(M_IO_URING)) {
        if (write(efd[d], &one, 8) != 8) die("eventfd write");
    } else if (is(M_PIPE)) {
        if (write(pfd[d][1], &c, 1) != 1) die("pipe write");
    } else if (is(M_UNIX_DGRAM)) {
        if (send(sv[d], &one, 8, 0) != 8) die("send");
    } else if (is(M_FUTEX)) {
        atomic_fetch_add(&word[d], 1);
        futex(&word[d], FUTEX_WAKE_PRIVATE, 1);
    } else if (is(M_SIGNAL)) {
        if (syscall(SYS_tgkill, getpid(), tids[d], SIGUSR1)) die("tgkill");
    } else if (is(M_SIGNAL_ASYNC)) {
        if (syscall(SYS_tgkill, getpid(), tids[d], SIGUSR2)) die("tgkill");
    } else { /* busy-poll */
        sent[d] = (sent[d] + 1) & ~SLEEPING;
        if (atomic_exchange(&word[d], sent[d]) & SLEEPING) futex(&word[d], FUTEX_WAKE_PRIVATE, 1);
    }
}

static void wait_dir(int d) {
    uint64_t v;
    char c;
    if (is(M_EVENTFD)) {
        if (read(efd[d], &v, 8) != 8) die("eventfd read");
    } else if (is(M_EVENTFD_EPOLL)) {
        struct epoll_event ev;
        while (epoll_wait(ep[d], &ev, 1, -1) != 1)
            if (errno != EINTR) die("epoll_wait");
        if (read(efd[d], &v, 8) != 8) die("eventfd read");
    } else if (is(M_IO_URING)) {
        ring_wait(&rings[d], efd[d]);
    } else if (is(M_PIPE)) {
        if (read(pfd[d][0], &c, 1) != 1) die("pipe read");
    } else if (is(M_UNIX_DGRAM)) {
        if (recv(sv[1 - d], &v, 8, 0) != 8) die("recv");
    } else if (is(M_FUTEX)) {
        uint32_t w;
        while ((w = atomic_load(&word[d])) == seen[d])
            futex(&word[d], FUTEX_WAIT_PRIVATE, w);
        seen[d] = w;
    } else if (is(M_SIGNAL)) {
        sigset_t s;
        siginfo_t info;
        sigemptyset(&s);
        sigaddset(&s, SIGUSR1);
        while (sigwaitinfo(&s, &info) != SIGUSR1)
            if (errno != EINTR) die("sigwaitinfo");
    } else if (is(M_SIGNAL_ASYNC)) {
        sigset_t s;
        pthread_sigmask(SIG_BLOCK, NULL, &s);
        sigdelset(&s, SIGUSR2);
        while (!got) sigsuspend(&s);
        got = 0;
    } else { /* busy-poll */
        int64_t t0 = now_ns();
        for (unsigned n = 0;; n++) {
            uint32_t w = atomic_load_explicit(&word[d], memory_order_acquire);
            if (w != seen[d]) {
                seen[d] = w;
                return;
            }
            __builtin_ia32_pause();
            if ((n & 63) == 63 && now_ns() - t0 > SPIN_NS) break;
        }
        for (;;) {
            uint32_t expect = seen[d];
            if (atomic_compare_exchange_strong(&word[d], &expect, seen[d] | SLEEPING) ||
                expect == (seen[d] | SLEEPING)) {
                futex(&word[d], FUTEX_WAIT_PRIVATE, seen[d] | SLEEPING);
                continue;
            }
            seen[d] = expect & ~SLEEPING;
            return;
        }
    }
}

static void pin(int cpu) {
    cpu_set_t s;
    CPU_ZERO(&s);
    CPU_SET(cpu, &s);
    if (sched_setaffinity(0, sizeof s, &s)) die("sched_setaffinity");
}

static int cpus[2];
static pthread_barrier_t start;

static void block_signals(void) {
    sigset_t s;
    sigemptyset(&s);
    sigaddset(&s, SIGUSR1);
    sigaddset(&s, SIGUSR2);
    pthread_sigmask(SIG_BLOCK, &s, NULL);
}

static void *handler(void *arg) {
    (void)arg;
    pin(cpus[1]);
    block_signals();
    tids[0] = (pid_t)syscall(SYS_gettid);
    pthread_barrier_wait(&start);
    for (long i = 0; i < warmup + iters; i++) {
        wait_dir(0);
        int64_t t = now_ns();
        if (i >= warmup) samples[i - warmup] = (double)(t - atomic_load(&t_raise)) / 1000.0;
        raise_dir(1);
    }
    return NULL;
}

static int cmp(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static double pct(double p) { return samples[(long)((double)(iters - 1) * p + 0.5)]; }

int main(int argc, char **argv) {
    if (argc != 6) {
        fprintf(stderr, "usage: irq_pingpong METHOD PLACEMENT DEVICE_CPU HANDLER_CPU ROUND_TRIPS\n");
        return 2;
    }
    method = argv[1];
    cpus[0] = atoi(argv[3]);
    cpus[1] = atoi(argv[4]);
    iters = atol(argv[5]);
    if (iters < 1) return 2;
    warmup = iters / 20 + 10;
    samples = calloc((size_t)iters, sizeof *samples);
    if (!samples) die("calloc");
    resolve();
    block_signals();
    setup();
    pthread_barrier_init(&start, NULL, 2);
    pthread_t h;
    if (pthread_create(&h, NULL, handler, NULL)) die("pthread_create");
    pin(cpus[0]);
    tids[1] = (pid_t)syscall(SYS_gettid);
    pthread_barrier_wait(&start);
    for (long i = 0; i < warmup + iters; i++) {
        atomic_store(&t_raise, now_ns());
        raise_dir(0);
        wait_dir(1);
    }
    pthread_join(h, NULL);
    qsort(samples, (size_t)iters, sizeof *samples, cmp);
    printf("{\"bench\":\"irq\",\"path\":\"%s\",\"placement\":\"%s\",\"impl\":\"c\","
           "\"p50_us\":%.3f,\"p99_us\":%.3f,\"p999_us\":%.3f,\"max_us\":%.3f,"
           "\"exits_per_irq\":0,\"samples\":%ld}\n",
           method, argv[2], pct(0.5), pct(0.99), pct(0.999), samples[iters - 1], iters);
    return 0;
}
