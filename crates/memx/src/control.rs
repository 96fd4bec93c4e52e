//! What the fault loop's parts share: regions, configuration, errors, the control word, and
//! the resolve primitive (COPY / ZEROPAGE / CONTINUE with EEXIST and EAGAIN handled).

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::sync::atomic::{AtomicU8, AtomicUsize};
use std::thread;
use std::time::Duration;

use thiserror::Error;
use uffd::{
    ContinueMode, CopyMode, CreateError, Range, ReadError, RegisterError, ResolveError, Resolved,
    Uffd, page_size,
};
use vmm_sys_util::eventfd::EventFd;

/// A range of memory served by the loop, and where its pages sit in the source.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Region {
    /// The registered memory.
    pub range: Range,
    /// Source offset of the range's first page.
    pub offset: u64,
}

/// Which faults the loop serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Mode {
    /// Missing pages (anonymous or shmem memory), resolved with COPY / ZEROPAGE.
    #[default]
    Missing,
    /// Minor faults on shmem / hugetlbfs, resolved with CONTINUE.
    Minor,
}

/// How the loop is run.
#[derive(Debug, Clone)]
pub struct Config {
    /// Worker threads; each owns one userfaultfd over its share of every region.
    pub threads: usize,
    /// Pages resolved per ioctl when the source has them (1 = no batching).
    pub batch_pages: usize,
    /// Events read per `read(2)`.
    pub events_per_read: usize,
    /// Which faults to serve.
    pub mode: Mode,
    /// Pin worker `i` to CPU `cpus[i % len]` (empty: no pinning). Place a worker on the CPU of
    /// the threads it serves: a cross-CPU wakeup costs ~26 µs on a nested VM.
    pub cpus: Vec<usize>,
    /// How long `stop`/`finish` wait for answers still owed by an asynchronous source.
    pub drain_timeout: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            threads: 1,
            batch_pages: 1,
            events_per_read: 64,
            mode: Mode::Missing,
            cpus: Vec::new(),
            drain_timeout: Duration::from_secs(5),
        }
    }
}

/// Starting, running or stopping a fault loop.
#[derive(Debug, Error)]
pub enum LoopError {
    /// A worker's userfaultfd could not be created.
    #[error("cannot create the userfaultfd of worker {worker}")]
    Create {
        /// Worker index.
        worker: usize,
        /// Cause.
        #[source]
        source: CreateError,
    },
    /// A region could not be registered.
    #[error("cannot register {range} for worker {worker}")]
    Register {
        /// Worker index.
        worker: usize,
        /// The range.
        range: Range,
        /// Cause.
        #[source]
        source: RegisterError,
    },
    /// The configuration cannot work.
    #[error("invalid fault-loop configuration: {0}")]
    Config(&'static str),
    /// An eventfd or thread could not be created.
    #[error("cannot set up worker {worker}")]
    Setup {
        /// Worker index.
        worker: usize,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// Reading events failed.
    #[error("worker {worker} cannot read events")]
    Read {
        /// Worker index.
        worker: usize,
        /// Cause.
        #[source]
        source: ReadError,
    },
    /// A resolve ioctl failed in a way that leaves the faulting thread blocked.
    #[error("worker {worker} cannot resolve a fault")]
    Resolve {
        /// Worker index.
        worker: usize,
        /// Cause.
        #[source]
        source: ResolveError,
    },
    /// Answers still owed by the source did not arrive in time; those pages were poisoned.
    #[error(
        "worker {worker}: {pages} page(s) still awaited from the source after {timeout:?}; poisoned"
    )]
    DrainTimeout {
        /// Worker index.
        worker: usize,
        /// Pages still pending.
        pages: usize,
        /// The drain timeout.
        timeout: Duration,
    },
    /// A worker thread panicked (a bug); its message.
    #[error("worker {worker} panicked: {message}")]
    Panicked {
        /// Worker index.
        worker: usize,
        /// Panic message.
        message: String,
    },
}

/// Command: serve.
pub(crate) const RUN: u8 = 0;
/// Command: serve what is owed, then stop.
pub(crate) const STOP: u8 = 1;
/// Command: populate every page, then stop.
pub(crate) const FINISH: u8 = 2;

/// What the loop's threads share: the command and the faults being served.
pub(crate) struct Control {
    /// [`RUN`], [`STOP`] or [`FINISH`].
    pub(crate) cmd: AtomicU8,
    /// Faults read and not yet answered, across workers: the prefetcher waits while any are.
    pub(crate) in_flight: AtomicUsize,
}

/// How a run of pages is resolved.
pub(crate) enum How<'a> {
    Copy(&'a [u8]),
    Zero(usize),
    Continue(usize),
}

/// Resolve `how` at `addr`; returns the pages newly mapped (0 if the first was present).
pub(crate) fn resolve(uffd: &Uffd, addr: usize, how: How<'_>) -> Result<usize, ResolveError> {
    let page = page_size();
    let pages = match how {
        How::Copy(b) => b.len() / page,
        How::Zero(n) | How::Continue(n) => n,
    };
    let range = Range::from_pages(addr, pages).map_err(|_| ResolveError::ShortSource {
        op: uffd::Op::Copy,
        range: Range::page_of(addr),
        given: pages * page,
    })?;
    // EAGAIN with nothing done means the address space was changing: retry a few times.
    for _ in 0..16 {
        let r = match how {
            How::Copy(b) => uffd.copy(range, b, CopyMode::empty()),
            How::Zero(_) => uffd.zeropage(range, false),
            How::Continue(_) => uffd.continue_range(range, ContinueMode::empty()),
        };
        match r {
            Ok(Resolved::Done(n)) => return Ok(n / page),
            Ok(Resolved::AlreadyPresent) => return Ok(0),
            Err(ResolveError::Partial { done, .. }) if done > 0 => return Ok(done / page),
            Err(ResolveError::Partial { .. }) => thread::yield_now(),
            Err(e) => return Err(e),
        }
    }
    uffd.wake(range)?;
    Ok(0)
}

/// Borrow an eventfd's descriptor for `poll` (vmm-sys-util's `EventFd` has no `AsFd`).
pub(crate) fn borrow(efd: &EventFd) -> BorrowedFd<'_> {
    // SAFETY: the fd stays open for as long as `efd` is borrowed.
    unsafe { BorrowedFd::borrow_raw(efd.as_raw_fd()) }
}

/// Pin the calling thread to `cpu`.
pub fn pin_to(cpu: usize) -> io::Result<()> {
    // SAFETY: cpu_set_t is plain data; zeroed is a valid empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: CPU_SET writes one bit of the set; out-of-range CPUs are ignored by libc's macro.
    unsafe { libc::CPU_SET(cpu, &mut set) };
    // SAFETY: `set` is a valid cpu_set_t of the size passed.
    let r = unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
