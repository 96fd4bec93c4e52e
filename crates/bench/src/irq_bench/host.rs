//! Host-side wake-ups: a "device" thread raises, a "handler" thread wakes and answers
//! (ping-pong), both pinned. The one-way latency of a round is the handler's
//! `CLOCK_MONOTONIC` at wake-up minus the device's just before it raised: the same clock and
//! the same steps as the C reference (`c/irq_pingpong.c`), call for call.

use std::cell::Cell;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::Ordering::{Acquire, SeqCst};
use std::sync::atomic::{AtomicI32, AtomicI64, AtomicU32};
use std::sync::{Arc, Barrier};

use io_uring::{IoUring, opcode, types};

use super::IrqBenchError;

/// Busy-poll: spin this long, then sleep on the futex.
pub const SPIN_NS: i64 = 50_000;
const SLEEPING: u32 = 0x8000_0000;
const FUTEX_WAKE_PRIVATE: libc::c_int = libc::FUTEX_WAKE | libc::FUTEX_PRIVATE_FLAG;
const FUTEX_WAIT_PRIVATE: libc::c_int = libc::FUTEX_WAIT | libc::FUTEX_PRIVATE_FLAG;

/// A host wake-up method.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    /// `write` / `read` on an eventfd.
    Eventfd,
    /// An eventfd the handler waits for with `epoll_wait`, then reads.
    EventfdEpoll,
    /// One byte through a pipe.
    Pipe,
    /// `FUTEX_WAKE` / `FUTEX_WAIT` on a counter.
    Futex,
    /// `tgkill(SIGUSR1)` to a thread blocked in `sigwaitinfo`.
    Signal,
    /// `tgkill(SIGUSR2)` to a thread in `sigsuspend`: an asynchronous handler runs.
    SignalAsync,
    /// 8 bytes through a `socketpair(AF_UNIX, SOCK_DGRAM)`.
    UnixDgram,
    /// An eventfd read through io_uring (`IORING_OP_READ`, `io_uring_enter` waits).
    IoUring,
    /// A shared atomic: spin [`SPIN_NS`], then sleep on it as a futex.
    BusyPoll,
}

impl Method {
    /// Every method, in output order.
    pub const ALL: [Method; 9] = [
        Method::Eventfd,
        Method::EventfdEpoll,
        Method::Pipe,
        Method::Futex,
        Method::Signal,
        Method::SignalAsync,
        Method::UnixDgram,
        Method::IoUring,
        Method::BusyPoll,
    ];

    /// The `path` of its JSON lines (also the C reference's method argument).
    pub fn name(self) -> &'static str {
        match self {
            Method::Eventfd => "eventfd",
            Method::EventfdEpoll => "eventfd-epoll",
            Method::Pipe => "pipe",
            Method::Futex => "futex",
            Method::Signal => "signal",
            Method::SignalAsync => "signal-async",
            Method::UnixDgram => "unix-dgram",
            Method::IoUring => "io-uring",
            Method::BusyPoll => "busy-poll",
        }
    }
}

fn sys(what: &'static str) -> impl FnOnce(io::Error) -> IrqBenchError {
    move |source| IrqBenchError::Sys { what, source }
}

fn check(what: &'static str, r: libc::c_long) -> Result<libc::c_long, IrqBenchError> {
    if r < 0 {
        Err(IrqBenchError::Sys {
            what,
            source: io::Error::last_os_error(),
        })
    } else {
        Ok(r)
    }
}

fn owned(what: &'static str, fd: RawFd) -> Result<OwnedFd, IrqBenchError> {
    check(what, fd as libc::c_long)?;
    // SAFETY: a descriptor the caller just created and nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// `CLOCK_MONOTONIC` in nanoseconds (the vDSO call the C reference makes).
pub fn now_ns() -> i64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes the timespec we pass.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec * 1_000_000_000 + ts.tv_nsec
}

fn futex(w: &AtomicU32, op: libc::c_int, v: u32) {
    // SAFETY: a futex call on a live, aligned u32; no timeout, no second word.
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            w.as_ptr(),
            op,
            v,
            std::ptr::null::<libc::timespec>(),
            std::ptr::null::<u32>(),
            0,
        )
    };
}

/// Pin the calling thread to `cpu`.
pub fn pin(cpu: usize) -> Result<(), IrqBenchError> {
    // SAFETY: a zeroed cpu_set_t is empty; CPU_SET stays inside it for cpu < CPU_SETSIZE.
    let r = unsafe {
        let mut s: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut s);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &s)
    };
    check("sched_setaffinity", r as libc::c_long).map(drop)
}

/// Pin thread `tid` (of this process) to `cpu`.
pub fn pin_thread(tid: i32, cpu: usize) -> Result<(), IrqBenchError> {
    // SAFETY: as in `pin`, for another thread of this process.
    let r = unsafe {
        let mut s: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut s);
        libc::sched_setaffinity(tid, std::mem::size_of::<libc::cpu_set_t>(), &s)
    };
    check("sched_setaffinity (vCPU thread)", r as libc::c_long).map(drop)
}

/// Let the calling thread run on any of `cpus` again.
pub fn pin_set(cpus: &[usize]) -> Result<(), IrqBenchError> {
    // SAFETY: as in `pin`, with several CPUs.
    let r = unsafe {
        let mut s: libc::cpu_set_t = std::mem::zeroed();
        for &c in cpus {
            libc::CPU_SET(c, &mut s);
        }
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &s)
    };
    check("sched_setaffinity", r as libc::c_long).map(drop)
}

/// The CPUs this process may run on.
pub fn allowed_cpus() -> Vec<usize> {
    // SAFETY: sched_getaffinity fills the zeroed set; CPU_ISSET reads inside it.
    unsafe {
        let mut s: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut s) != 0 {
            return vec![0];
        }
        (0..libc::CPU_SETSIZE as usize)
            .filter(|&c| libc::CPU_ISSET(c, &s))
            .collect()
    }
}

thread_local! {
    static GOT: Cell<bool> = const { Cell::new(false) };
}

extern "C" fn on_sigusr2(_: libc::c_int) {
    GOT.with(|g| g.set(true));
}

fn signal_set() -> libc::sigset_t {
    // SAFETY: sigemptyset/sigaddset initialise and fill the set we own.
    unsafe {
        let mut s: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut s);
        libc::sigaddset(&mut s, libc::SIGUSR1);
        libc::sigaddset(&mut s, libc::SIGUSR2);
        s
    }
}

fn block_signals() {
    let s = signal_set();
    // SAFETY: blocks two signals in the calling thread only.
    unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &s, std::ptr::null_mut()) };
}

/// Direction 0: device -> handler; 1: handler -> device.
struct Chan {
    method: Method,
    fds: Vec<OwnedFd>,
    words: [AtomicU32; 2],
    tids: [AtomicI32; 2],
    t_raise: AtomicI64,
}

/// What only the waiting side of a direction touches.
struct Waiter {
    d: usize,
    seen: u32,
    sent: u32,
    ring: Option<IoUring>,
    buf: u64,
}

impl Chan {
    fn new(method: Method) -> Result<Chan, IrqBenchError> {
        let mut fds = Vec::new();
        match method {
            Method::Eventfd | Method::EventfdEpoll | Method::IoUring => {
                for _ in 0..2 {
                    // SAFETY: eventfd creates a descriptor we own.
                    fds.push(owned("eventfd", unsafe { libc::eventfd(0, 0) })?);
                }
                if method == Method::EventfdEpoll {
                    for d in 0..2 {
                        // SAFETY: epoll_create1 creates a descriptor we own.
                        let ep = owned("epoll_create1", unsafe { libc::epoll_create1(0) })?;
                        let mut ev = libc::epoll_event {
                            events: libc::EPOLLIN as u32,
                            u64: d as u64,
                        };
                        // SAFETY: adds our live eventfd to our epoll with a valid event.
                        let r = unsafe {
                            libc::epoll_ctl(
                                ep.as_raw_fd(),
                                libc::EPOLL_CTL_ADD,
                                fds[d].as_raw_fd(),
                                &mut ev,
                            )
                        };
                        check("epoll_ctl", r as libc::c_long)?;
                        fds.push(ep);
                    }
                }
            }
            Method::Pipe => {
                for _ in 0..2 {
                    let mut p = [0; 2];
                    // SAFETY: pipe fills the two-element array.
                    let r = unsafe { libc::pipe(p.as_mut_ptr()) };
                    check("pipe", r as _)?;
                    fds.push(owned("pipe", p[0])?);
                    fds.push(owned("pipe", p[1])?);
                }
            }
            Method::UnixDgram => {
                let mut sv = [0; 2];
                // SAFETY: socketpair fills the two-element array.
                let r = unsafe {
                    libc::socketpair(libc::AF_UNIX, libc::SOCK_DGRAM, 0, sv.as_mut_ptr())
                };
                check("socketpair", r as libc::c_long)?;
                fds.push(owned("socketpair", sv[0])?);
                fds.push(owned("socketpair", sv[1])?);
            }
            Method::SignalAsync => {
                // SAFETY: a zeroed sigaction with our handler and an empty mask; the handler
                // only sets a const-initialised thread-local.
                let r = unsafe {
                    let mut sa: libc::sigaction = std::mem::zeroed();
                    sa.sa_sigaction = on_sigusr2 as *const () as usize;
                    libc::sigemptyset(&mut sa.sa_mask);
                    libc::sigaction(libc::SIGUSR2, &sa, std::ptr::null_mut())
                };
                check("sigaction(SIGUSR2)", r as libc::c_long)?;
            }
            Method::Futex | Method::Signal | Method::BusyPoll => {}
        }
        Ok(Chan {
            method,
            fds,
            words: [AtomicU32::new(0), AtomicU32::new(0)],
            tids: [AtomicI32::new(0), AtomicI32::new(0)],
            t_raise: AtomicI64::new(0),
        })
    }

    fn fd(&self, i: usize) -> RawFd {
        self.fds[i].as_raw_fd()
    }

    fn waiter(&self, d: usize) -> Result<Waiter, IrqBenchError> {
        let ring = if self.method == Method::IoUring {
            Some(IoUring::new(8).map_err(sys("io_uring_setup"))?)
        } else {
            None
        };
        Ok(Waiter {
            d,
            seen: 0,
            sent: 0,
            ring,
            buf: 0,
        })
    }

    /// Raise direction `d` (the raiser's `w` keeps its own sequence for busy-poll).
    fn raise(&self, d: usize, w: &mut Waiter) -> Result<(), IrqBenchError> {
        let one = 1u64;
        let p = (&one as *const u64).cast();
        match self.method {
            Method::Eventfd | Method::EventfdEpoll | Method::IoUring => {
                // SAFETY: writes 8 bytes from a live u64 to our eventfd.
                let r = unsafe { libc::write(self.fd(d), p, 8) };
                check("eventfd write", r as _)?;
            }
            Method::Pipe => {
                // SAFETY: writes 1 byte from a live u64 to our pipe's write end.
                let r = unsafe { libc::write(self.fd(2 * d + 1), p, 1) };
                check("pipe write", r as _)?;
            }
            Method::UnixDgram => {
                // SAFETY: sends 8 bytes from a live u64 on our socket.
                let r = unsafe { libc::send(self.fd(d), p, 8, 0) };
                check("send", r as _)?;
            }
            Method::Futex => {
                self.words[d].fetch_add(1, SeqCst);
                futex(&self.words[d], FUTEX_WAKE_PRIVATE, 1);
            }
            Method::Signal | Method::SignalAsync => {
                let sig = if self.method == Method::Signal {
                    libc::SIGUSR1
                } else {
                    libc::SIGUSR2
                };
                // SAFETY: a signal to a thread of this process that blocks it (or handles it).
                let r = unsafe {
                    libc::syscall(
                        libc::SYS_tgkill,
                        libc::getpid(),
                        self.tids[d].load(SeqCst),
                        sig,
                    )
                };
                check("tgkill", r)?;
            }
            Method::BusyPoll => {
                w.sent = (w.sent + 1) & !SLEEPING;
                if self.words[d].swap(w.sent, SeqCst) & SLEEPING != 0 {
                    futex(&self.words[d], FUTEX_WAKE_PRIVATE, 1);
                }
            }
        }
        Ok(())
    }

    /// Wait for direction `w.d`.
    fn wait(&self, w: &mut Waiter) -> Result<(), IrqBenchError> {
        let d = w.d;
        let mut v = 0u64;
        let p = (&mut v as *mut u64).cast();
        match self.method {
            Method::Eventfd => {
                // SAFETY: reads 8 bytes into a live u64 from our eventfd.
                let r = unsafe { libc::read(self.fd(d), p, 8) };
                check("eventfd read", r as _)?;
            }
            Method::EventfdEpoll => {
                let mut ev = libc::epoll_event { events: 0, u64: 0 };
                loop {
                    // SAFETY: waits on our epoll for one event into a live epoll_event.
                    let n = unsafe { libc::epoll_wait(self.fd(2 + d), &mut ev, 1, -1) };
                    if n == 1 {
                        break;
                    }
                    let e = io::Error::last_os_error();
                    if e.kind() != io::ErrorKind::Interrupted {
                        return Err(sys("epoll_wait")(e));
                    }
                }
                // SAFETY: reads 8 bytes into a live u64 from our eventfd.
                let r = unsafe { libc::read(self.fd(d), p, 8) };
                check("eventfd read", r as _)?;
            }
            Method::IoUring => self.ring_wait(w)?,
            Method::Pipe => {
                // SAFETY: reads 1 byte into a live u64 from our pipe's read end.
                let r = unsafe { libc::read(self.fd(2 * d), p, 1) };
                check("pipe read", r as _)?;
            }
            Method::UnixDgram => {
                // SAFETY: receives up to 8 bytes into a live u64 from our socket.
                let r = unsafe { libc::recv(self.fd(1 - d), p, 8, 0) };
                check("recv", r as _)?;
            }
            Method::Futex => loop {
                let v = self.words[d].load(SeqCst);
                if v != w.seen {
                    w.seen = v;
                    break;
                }
                futex(&self.words[d], FUTEX_WAIT_PRIVATE, v);
            },
            Method::Signal => {
                let mut s = signal_set();
                // SAFETY: removes SIGUSR2 from our own set.
                unsafe { libc::sigdelset(&mut s, libc::SIGUSR2) };
                loop {
                    // SAFETY: waits for SIGUSR1 (blocked in this thread); info may be null.
                    let r = unsafe { libc::sigwaitinfo(&s, std::ptr::null_mut()) };
                    if r == libc::SIGUSR1 {
                        break;
                    }
                    let e = io::Error::last_os_error();
                    if e.kind() != io::ErrorKind::Interrupted {
                        return Err(sys("sigwaitinfo")(e));
                    }
                }
            }
            Method::SignalAsync => {
                // SAFETY: reads this thread's mask, then sigsuspend with SIGUSR2 unblocked.
                unsafe {
                    let mut s: libc::sigset_t = std::mem::zeroed();
                    libc::pthread_sigmask(libc::SIG_BLOCK, std::ptr::null(), &mut s);
                    libc::sigdelset(&mut s, libc::SIGUSR2);
                    while !GOT.with(Cell::get) {
                        libc::sigsuspend(&s);
                    }
                }
                GOT.with(|g| g.set(false));
            }
            Method::BusyPoll => self.busy_wait(w),
        }
        Ok(())
    }

    fn ring_wait(&self, w: &mut Waiter) -> Result<(), IrqBenchError> {
        let fd = self.fd(w.d);
        let buf = (&mut w.buf as *mut u64).cast::<u8>();
        let ring = w
            .ring
            .as_mut()
            .expect("an io-uring waiter has its ring (made in Chan::waiter)");
        let sqe = opcode::Read::new(types::Fd(fd), buf, 8).build();
        // SAFETY: the read's buffer (`w.buf`) outlives the operation: we wait for its
        // completion below before returning.
        unsafe { ring.submission().push(&sqe) }.map_err(|_| IrqBenchError::Sys {
            what: "io_uring submission queue",
            source: io::Error::from_raw_os_error(libc::EBUSY),
        })?;
        loop {
            if let Some(c) = ring.completion().next() {
                if c.result() != 8 {
                    return Err(IrqBenchError::Sys {
                        what: "io_uring eventfd read",
                        source: io::Error::from_raw_os_error(if c.result() < 0 {
                            -c.result()
                        } else {
                            libc::EIO
                        }),
                    });
                }
                return Ok(());
            }
            match ring.submit_and_wait(1) {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(sys("io_uring_enter")(e)),
            }
        }
    }

    fn busy_wait(&self, w: &mut Waiter) {
        let word = &self.words[w.d];
        let t0 = now_ns();
        let mut n = 0u32;
        loop {
            let v = word.load(Acquire);
            if v != w.seen {
                w.seen = v;
                return;
            }
            std::hint::spin_loop();
            if n & 63 == 63 && now_ns() - t0 > SPIN_NS {
                break;
            }
            n = n.wrapping_add(1);
        }
        loop {
            match word.compare_exchange(w.seen, w.seen | SLEEPING, SeqCst, SeqCst) {
                Ok(_) => futex(word, FUTEX_WAIT_PRIVATE, w.seen | SLEEPING),
                Err(v) if v == w.seen | SLEEPING => {
                    futex(word, FUTEX_WAIT_PRIVATE, w.seen | SLEEPING)
                }
                Err(v) => {
                    w.seen = v & !SLEEPING;
                    return;
                }
            }
        }
    }
}

fn gettid() -> i32 {
    // SAFETY: gettid has no preconditions.
    unsafe { libc::gettid() }
}

/// Ping-pong `round_trips` times (after `round_trips / 20 + 10` warm-up rounds) with the
/// device on `device_cpu` and the handler on `handler_cpu`; returns the one-way latencies in
/// µs, one per measured round (so their number proves every interrupt was delivered).
pub fn pingpong(
    method: Method,
    device_cpu: usize,
    handler_cpu: usize,
    round_trips: usize,
) -> Result<Vec<f64>, IrqBenchError> {
    let warmup = round_trips / 20 + 10;
    let chan = Arc::new(Chan::new(method)?);
    let start = Arc::new(Barrier::new(2));
    let h = {
        let chan = chan.clone();
        let start = start.clone();
        std::thread::Builder::new()
            .name("irq-handler".into())
            .spawn(move || -> Result<Vec<f64>, IrqBenchError> {
                let pinned = pin(handler_cpu);
                block_signals();
                chan.tids[0].store(gettid(), SeqCst);
                let made = chan.waiter(0);
                start.wait();
                pinned?;
                let mut w = made?;
                let mut out = Vec::with_capacity(round_trips);
                for i in 0..warmup + round_trips {
                    chan.wait(&mut w)?;
                    let t = now_ns();
                    if i >= warmup {
                        out.push((t - chan.t_raise.load(SeqCst)) as f64 / 1000.0);
                    }
                    chan.raise(1, &mut w)?;
                }
                Ok(out)
            })
            .map_err(sys("spawning the handler thread"))?
    };
    // The device side runs on a thread of its own too, so the caller's mask and affinity
    // are left alone.
    let d = {
        let chan = chan.clone();
        std::thread::Builder::new()
            .name("irq-device".into())
            .spawn(move || -> Result<(), IrqBenchError> {
                let pinned = pin(device_cpu);
                block_signals();
                chan.tids[1].store(gettid(), SeqCst);
                let made = chan.waiter(1);
                start.wait();
                pinned?;
                let mut w = made?;
                for _ in 0..warmup + round_trips {
                    chan.t_raise.store(now_ns(), SeqCst);
                    chan.raise(0, &mut w)?;
                    chan.wait(&mut w)?;
                }
                Ok(())
            })
            .map_err(sys("spawning the device thread"))?
    };
    // Never wait forever: if one side fails without waking the other, or a wake-up is lost,
    // the run fails at a deadline far beyond any healthy run (20,000 cross-CPU round trips
    // take about 2 s here).
    let secs = 60 + (warmup + round_trips) as u64 / 500;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(secs);
    while !(d.is_finished() && h.is_finished()) {
        if std::time::Instant::now() >= deadline {
            return Err(IrqBenchError::Stalled {
                method: method.name(),
                secs,
            });
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    let dr = d
        .join()
        .map_err(|_| IrqBenchError::Panicked("irq-device"))?;
    let hr = h
        .join()
        .map_err(|_| IrqBenchError::Panicked("irq-handler"))?;
    dr?;
    hr
}
