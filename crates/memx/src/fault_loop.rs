//! The fault loop: worker threads that own userfaultfds and serve faults from a [`PageSource`].

use std::collections::HashMap;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering::Relaxed};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use thiserror::Error;
use uffd::{
    ContinueMode, CopyMode, CreateError, Event, EventBuffer, FaultKind, Features, Range, ReadError,
    RegisterError, RegisterMode, ResolveError, Resolved, Uffd, UffdBuilder, error_chain, page_size,
};
use vmm_sys_util::eventfd::EventFd;

use crate::mapping::Mapping;
use crate::source::{Completer, Completion, Fill, PageSource, Request, SourceError};
use crate::stats::{ShardStats, Stats};

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

const RUN: u8 = 0;
const STOP: u8 = 1;
const FINISH: u8 = 2;

struct Control {
    cmd: AtomicU8,
    /// Faults read and not yet answered, across workers: the prefetcher waits while any are.
    in_flight: AtomicUsize,
}

/// A worker thread, its counters, and its doorbell: a page registered on the worker's own
/// userfaultfd. Touching it raises a fault the worker must read, which wakes it from its
/// blocking `read` without signals and without a lost-wakeup window; the worker maps a zero
/// page there, and `madvise(DONTNEED)` arms it again.
struct WorkerEntry {
    handle: JoinHandle<Result<(), LoopError>>,
    stats: Arc<ShardStats>,
    wake: Wake,
    /// Weak: the worker holds the only strong reference (the prefetcher one while it runs, and
    /// it is joined before any ring), so the uffd closes when the worker exits and ringing a
    /// gone worker's doorbell returns at once instead of waiting for a fault nobody serves.
    uffd: std::sync::Weak<Uffd>,
    parts: Vec<Region>,
}

/// How a worker is woken for shutdown.
enum Wake {
    /// A page on the worker's userfaultfd (the uffd belongs to this process).
    Doorbell(Mapping),
    /// An eventfd the worker polls beside the uffd (the uffd belongs to another process,
    /// whose address space no doorbell page of ours can be registered in).
    EventFd(Arc<EventFd>),
}

impl WorkerEntry {
    fn ring(&self) {
        let doorbell = match &self.wake {
            Wake::Doorbell(m) => m,
            Wake::EventFd(e) => {
                let _ = e.write(1);
                return;
            }
        };
        // Blocks until the worker has served the doorbell fault (or returns at once if the
        // worker is gone: its userfaultfd closed with it).
        doorbell.read_u8(0);
        // SAFETY: drops the page of our own one-page mapping; nothing references it.
        unsafe {
            libc::madvise(
                doorbell.as_ptr().cast(),
                doorbell.len(),
                libc::MADV_DONTNEED,
            )
        };
    }
}

/// A running fault loop. Dropping it stops it (as [`FaultLoop::stop`]).
pub struct FaultLoop {
    workers: Vec<WorkerEntry>,
    ctl: Arc<Control>,
    cfg: Config,
    source: Arc<dyn PageSource>,
    prefetcher: Option<(JoinHandle<()>, Arc<ShardStats>)>,
}

impl FaultLoop {
    /// Register `regions` (split among `cfg.threads` workers, one userfaultfd each) and serve
    /// their faults from `source`.
    pub fn start<S: PageSource + 'static>(
        regions: &[Region],
        source: S,
        cfg: Config,
    ) -> Result<FaultLoop, LoopError> {
        if cfg.threads == 0 || cfg.batch_pages == 0 || cfg.events_per_read == 0 {
            return Err(LoopError::Config(
                "threads, batch_pages and events_per_read must be at least 1",
            ));
        }
        if regions.is_empty() {
            return Err(LoopError::Config("no region to serve"));
        }
        let features = match cfg.mode {
            Mode::Missing => Features::empty(),
            Mode::Minor => Features::MINOR_SHMEM,
        };
        let mut shards = Vec::with_capacity(cfg.threads);
        for w in 0..cfg.threads {
            let uffd = UffdBuilder::new()
                .require_features(features)
                .create()
                .map_err(|source| LoopError::Create { worker: w, source })?;
            let mut parts = Vec::new();
            for r in regions {
                let split = r.range.split(cfg.threads);
                if let Some(part) = split.get(w) {
                    let offset = r.offset + (part.start() - r.range.start()) as u64;
                    parts.push(Region {
                        range: *part,
                        offset,
                    });
                }
            }
            shards.push((uffd, parts));
        }
        Self::serve_inner(shards, source, cfg, true)
    }

    /// Serve userfaultfds that are already set up (registered by the caller, e.g. received from
    /// another process): one worker per `(uffd, regions)` pair.
    pub fn serve<S: PageSource + 'static>(
        shards: Vec<(Uffd, Vec<Region>)>,
        source: S,
        cfg: Config,
    ) -> Result<FaultLoop, LoopError> {
        Self::serve_inner(shards, source, cfg, true)
    }

    /// Serve userfaultfds created by **another process** (received over a socket, as an
    /// external page-fault handler does): the regions are that process's addresses, already
    /// registered there. Workers poll the uffd beside a stop eventfd (no doorbell page can be
    /// registered in a foreign address space).
    pub fn serve_remote<S: PageSource + 'static>(
        shards: Vec<(Uffd, Vec<Region>)>,
        source: S,
        cfg: Config,
    ) -> Result<FaultLoop, LoopError> {
        Self::serve_inner(shards, source, cfg, false)
    }

    fn serve_inner<S: PageSource + 'static>(
        shards: Vec<(Uffd, Vec<Region>)>,
        source: S,
        cfg: Config,
        local: bool,
    ) -> Result<FaultLoop, LoopError> {
        let ctl = Arc::new(Control {
            cmd: AtomicU8::new(RUN),
            in_flight: AtomicUsize::new(0),
        });
        let source = Arc::new(source);
        let mut fl = FaultLoop {
            workers: Vec::new(),
            ctl: ctl.clone(),
            cfg: cfg.clone(),
            source: source.clone(),
            prefetcher: None,
        };
        let mode = match cfg.mode {
            Mode::Missing => RegisterMode::MISSING,
            Mode::Minor => RegisterMode::MINOR,
        };
        for (w, (uffd, parts)) in shards.into_iter().enumerate() {
            let (wake, doorbell_addr) = if local {
                for p in &parts {
                    // Registering an already-registered range with the same uffd is harmless.
                    uffd.register(p.range, mode)
                        .map_err(|source| LoopError::Register {
                            worker: w,
                            range: p.range,
                            source,
                        })?;
                }
                let doorbell = Mapping::anonymous(page_size()).map_err(|e| LoopError::Setup {
                    worker: w,
                    source: io::Error::other(e),
                })?;
                uffd.register(doorbell.range(), RegisterMode::MISSING)
                    .map_err(|source| LoopError::Register {
                        worker: w,
                        range: doorbell.range(),
                        source,
                    })?;
                let a = doorbell.range().start();
                (Wake::Doorbell(doorbell), Some(a))
            } else {
                let efd = EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC)
                    .map_err(|source| LoopError::Setup { worker: w, source })?;
                (Wake::EventFd(Arc::new(efd)), None)
            };
            let stop_efd = match &wake {
                Wake::EventFd(e) => Some(e.clone()),
                Wake::Doorbell(_) => None,
            };
            let uffd = Arc::new(uffd);
            uffd.set_nonblocking(true)
                .map_err(|source| LoopError::Setup { worker: w, source })?;
            let stats = Arc::new(ShardStats::new());
            let completer =
                Completer::new().map_err(|source| LoopError::Setup { worker: w, source })?;
            let mut worker = Worker {
                id: w,
                uffd: uffd.clone(),
                parts: parts.clone(),
                source: source.clone(),
                scratch: vec![0; cfg.batch_pages * page_size()],
                completer,
                pending: HashMap::new(),
                stats: stats.clone(),
                ctl: ctl.clone(),
                cfg: cfg.clone(),
                doorbell: doorbell_addr,
                stop_efd,
                blocking: false,
            };
            let handle = thread::Builder::new()
                .name(format!("fault-loop-{w}"))
                .spawn(move || worker.run())
                .map_err(|source| LoopError::Setup { worker: w, source })?;
            fl.workers.push(WorkerEntry {
                handle,
                stats,
                wake,
                uffd: Arc::downgrade(&uffd),
                parts,
            });
        }
        Ok(fl)
    }

    /// Counters so far (the prefetcher's pushes count as populated pages).
    pub fn stats(&self) -> Stats {
        let mut shards: Vec<&ShardStats> = self.workers.iter().map(|w| &*w.stats).collect();
        if let Some((_, s)) = &self.prefetcher {
            shards.push(s);
        }
        Stats::merge(&shards)
    }

    /// Push the pages at these source offsets, in this order, from a background thread while
    /// faults go on being served on demand, faults first: the thread waits whenever a fault
    /// is being served. Consecutive offsets are pushed together, up to `batch_pages` per
    /// ioctl. Pages already present are skipped (the kernel says EEXIST); pages the source
    /// answers later, or cannot produce, are left to the fault path. Call once.
    pub fn prefetch(&mut self, offsets: Vec<u64>, batch_pages: usize) -> Result<(), LoopError> {
        if self.prefetcher.is_some() {
            return Err(LoopError::Config("prefetch already running"));
        }
        let targets: Vec<(Arc<Uffd>, Vec<Region>)> = self
            .workers
            .iter()
            .filter_map(|w| Some((w.uffd.upgrade()?, w.parts.clone())))
            .collect();
        let stats = Arc::new(ShardStats::new());
        let p = Prefetcher {
            targets,
            source: self.source.clone(),
            ctl: self.ctl.clone(),
            stats: stats.clone(),
            batch: batch_pages.max(1),
        };
        let h = thread::Builder::new()
            .name("prefetch".into())
            .spawn(move || p.run(&offsets))
            .map_err(|source| LoopError::Setup {
                worker: usize::MAX,
                source,
            })?;
        self.prefetcher = Some((h, stats));
        Ok(())
    }

    /// Whether the prefetcher (if any) has pushed everything it was given.
    pub fn prefetch_done(&self) -> bool {
        self.prefetcher
            .as_ref()
            .is_none_or(|(h, _)| h.is_finished())
    }

    /// Number of workers.
    pub fn threads(&self) -> usize {
        self.workers.len()
    }

    /// Serve the faults already raised and the answers still owed, then stop and close the
    /// userfaultfds. Pages never faulted stay unpopulated: after this, the memory behaves as
    /// ordinary memory (use [`finish`](Self::finish) to populate it from the source first).
    pub fn stop(mut self) -> Result<Stats, LoopError> {
        self.shutdown(STOP)
    }

    /// Populate every page not yet present from the source (serving faults first, as they
    /// come), then stop. Nothing is left for a later access to miss.
    pub fn finish(mut self) -> Result<Stats, LoopError> {
        self.shutdown(FINISH)
    }

    fn shutdown(&mut self, cmd: u8) -> Result<Stats, LoopError> {
        self.ctl.cmd.store(cmd, Relaxed);
        let pre = self.prefetcher.take().map(|(h, s)| {
            let _ = h.join();
            s
        });
        for w in &self.workers {
            w.ring();
        }
        let mut first_err = None;
        let workers = std::mem::take(&mut self.workers);
        let mut stats = Vec::new();
        for (w, entry) in workers.into_iter().enumerate() {
            let (h, s) = (entry.handle, entry.stats);
            let r = h.join().unwrap_or_else(|p| {
                Err(LoopError::Panicked {
                    worker: w,
                    message: p
                        .downcast_ref::<String>()
                        .cloned()
                        .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                        .unwrap_or_default(),
                })
            });
            if let Err(e) = r {
                first_err.get_or_insert(e);
            }
            stats.push(s);
        }
        stats.extend(pre);
        let refs: Vec<&ShardStats> = stats.iter().map(|s| &**s).collect();
        let merged = Stats::merge(&refs);
        match first_err {
            Some(e) => Err(e),
            None => Ok(merged),
        }
    }

    /// The configuration the loop runs with.
    pub fn config(&self) -> &Config {
        &self.cfg
    }
}

impl Drop for FaultLoop {
    fn drop(&mut self) {
        if !self.workers.is_empty() {
            let _ = self.shutdown(STOP);
        }
    }
}

/// How a run of pages is resolved.
enum How<'a> {
    Copy(&'a [u8]),
    Zero(usize),
    Continue(usize),
}

/// Resolve `how` at `addr`; returns the pages newly mapped (0 if the first was present).
fn resolve(uffd: &Uffd, addr: usize, how: How<'_>) -> Result<usize, ResolveError> {
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

struct Pending {
    addr: usize,
    since: Instant,
    fault: bool,
}

/// The background pusher started by [`FaultLoop::prefetch`].
struct Prefetcher {
    targets: Vec<(Arc<Uffd>, Vec<Region>)>,
    source: Arc<dyn PageSource>,
    ctl: Arc<Control>,
    stats: Arc<ShardStats>,
    batch: usize,
}

impl Prefetcher {
    fn locate(&self, offset: u64) -> Option<(&Uffd, usize, usize)> {
        let page = page_size() as u64;
        for (u, parts) in &self.targets {
            for p in parts {
                let len = p.range.len() as u64;
                if offset >= p.offset && offset < p.offset + len {
                    let addr = p.range.start() + (offset - p.offset) as usize;
                    let left = ((p.offset + len - offset) / page) as usize;
                    return Some((u, addr, left));
                }
            }
        }
        None
    }

    fn run(&self, offsets: &[u64]) {
        let page = page_size() as u64;
        let mut scratch = vec![0u8; self.batch * page as usize];
        let Ok(completer) = Completer::new() else {
            return;
        };
        let mut i = 0;
        while i < offsets.len() {
            if self.ctl.cmd.load(Relaxed) != RUN {
                return;
            }
            // Faults first: stay out of the way while any is being served.
            while self.ctl.in_flight.load(Relaxed) > 0 {
                if self.ctl.cmd.load(Relaxed) != RUN {
                    return;
                }
                thread::yield_now();
            }
            let start = offsets[i];
            let Some((uffd, addr, left)) = self.locate(start) else {
                i += 1;
                continue;
            };
            let mut run = 1;
            while run < self.batch.min(left)
                && i + run < offsets.len()
                && offsets[i + run] == start + run as u64 * page
            {
                run += 1;
            }
            i += run;
            let req = Request {
                offset: start,
                max_pages: run,
                kind: FaultKind::Missing,
                write: false,
                background: true,
            };
            let how = match self.source.fetch(&req, &mut scratch, &completer) {
                Ok(Fill::Bytes(b)) if !b.is_empty() && b.len() % page as usize == 0 => How::Copy(b),
                Ok(Fill::Zero { pages }) => How::Zero(pages.clamp(1, run)),
                Ok(Fill::Present { pages }) => How::Continue(pages.clamp(1, run)),
                // Later answers and failures are left to the fault path.
                _ => continue,
            };
            let (copy, zero) = (matches!(how, How::Copy(_)), matches!(how, How::Zero(_)));
            match resolve(uffd, addr, how) {
                Ok(n) if n > 0 => {
                    self.stats.pages.fetch_add(n as u64, Relaxed);
                    self.stats.populated_pages.fetch_add(n as u64, Relaxed);
                    if copy {
                        self.stats.bytes_copied.fetch_add(n as u64 * page, Relaxed);
                    } else if zero {
                        self.stats.zero_pages.fetch_add(n as u64, Relaxed);
                    }
                }
                Ok(_) => {
                    self.stats.already_present.fetch_add(1, Relaxed);
                }
                Err(e) => {
                    self.stats
                        .record_error(format!("prefetch at {addr:#x}: {}", error_chain(&e)));
                }
            }
        }
    }
}

struct Worker<S> {
    id: usize,
    uffd: Arc<Uffd>,
    parts: Vec<Region>,
    source: Arc<S>,
    scratch: Vec<u8>,
    completer: Completer,
    pending: HashMap<u64, Pending>,
    stats: Arc<ShardStats>,
    ctl: Arc<Control>,
    cfg: Config,
    doorbell: Option<usize>,
    /// Set when the uffd belongs to another process: shutdown is signalled here.
    stop_efd: Option<Arc<EventFd>>,
    /// Whether the uffd is in blocking mode (see `set_blocking`).
    blocking: bool,
}

/// Borrow an eventfd's descriptor for `poll` (vmm-sys-util's `EventFd` has no `AsFd`).
fn borrow(efd: &EventFd) -> BorrowedFd<'_> {
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

impl<S: PageSource> Worker<S> {
    fn run(&mut self) -> Result<(), LoopError> {
        if !self.cfg.cpus.is_empty() {
            let cpu = self.cfg.cpus[self.id % self.cfg.cpus.len()];
            pin_to(cpu).map_err(|source| LoopError::Setup {
                worker: self.id,
                source,
            })?;
        }
        let mut events = EventBuffer::new(self.cfg.events_per_read);
        loop {
            let cmd = self.ctl.cmd.load(Relaxed);
            if cmd != RUN {
                return self.shut_down(cmd, &mut events);
            }
            if self.pending.is_empty() && self.stop_efd.is_none() {
                // Nothing owed by the source: sleep in read(2) itself.
                self.serve_events(&mut events, true)?;
                continue;
            }
            self.set_blocking(false)?;
            let stop = self.stop_efd.clone();
            let mut fds = vec![self.uffd.as_fd(), borrow(self.completer.efd())];
            if let Some(e) = &stop {
                fds.push(borrow(e));
            }
            let ready = uffd::poll_in(&fds, None).map_err(|e| LoopError::Read {
                worker: self.id,
                source: ReadError::Poll(e),
            })?;
            if ready & 1 != 0 {
                self.serve_events(&mut events, false)?;
            }
            if ready & 2 != 0 {
                self.serve_completions()?;
            }
        }
    }

    /// The fast path sleeps in a blocking `read(2)`: one syscall per wakeup, as in a minimal
    /// loop. `poll(2)` on a blocking userfaultfd reports `EPOLLERR`, so the fd is switched to
    /// non-blocking while answers are owed (poll on the uffd and the completion eventfd) and
    /// while draining; the switch happens only on those transitions.
    fn set_blocking(&mut self, on: bool) -> Result<(), LoopError> {
        if self.blocking != on {
            self.uffd
                .set_nonblocking(!on)
                .map_err(|source| LoopError::Setup {
                    worker: self.id,
                    source,
                })?;
            self.blocking = on;
        }
        Ok(())
    }

    /// Read and serve fault events. `wait`: one (blocking) read of whatever is ready or next;
    /// otherwise every event ready now and none more.
    fn serve_events(&mut self, events: &mut EventBuffer, wait: bool) -> Result<usize, LoopError> {
        let mut served = 0;
        self.set_blocking(wait)?;
        loop {
            let batch = self
                .uffd
                .read_events(events)
                .map_err(|source| LoopError::Read {
                    worker: self.id,
                    source,
                })?;
            let t0 = Instant::now();
            let mut n = 0;
            // Collect first: the batch borrows `events`, serving borrows `self`.
            let mut faults = [None; 64];
            let mut extra = Vec::new();
            for ev in batch {
                if let Event::Pagefault(pf) = ev {
                    if n < faults.len() {
                        faults[n] = Some(pf);
                    } else {
                        extra.push(pf);
                    }
                    n += 1;
                }
                // Other events are only delivered when asked for; the loop asks for none.
            }
            if n == 0 {
                return Ok(served);
            }
            self.ctl.in_flight.fetch_add(n, Relaxed);
            let mut r = Ok(());
            for pf in faults.iter().flatten().copied().chain(extra) {
                r = r.and_then(|()| self.on_fault(pf.page().start(), pf.kind, pf.write, t0));
            }
            self.ctl.in_flight.fetch_sub(n, Relaxed);
            r?;
            served += n;
            if wait || n < events.capacity() {
                // Waited once, or the kernel gave all it had.
                return Ok(served);
            }
        }
    }

    fn part_of(&self, addr: usize) -> Option<Region> {
        self.parts.iter().find(|p| p.range.contains(addr)).copied()
    }

    fn on_fault(
        &mut self,
        addr: usize,
        kind: FaultKind,
        write: bool,
        t0: Instant,
    ) -> Result<(), LoopError> {
        if Some(addr) == self.doorbell {
            resolve(&self.uffd, addr, How::Zero(1)).map_err(|source| LoopError::Resolve {
                worker: self.id,
                source,
            })?;
            return Ok(());
        }
        self.stats.faults.fetch_add(1, Relaxed);
        let Some(part) = self.part_of(addr) else {
            // Not ours (cannot happen: the kernel only reports registered ranges).
            self.stats
                .record_error(format!("fault at {addr:#x} outside the served regions"));
            return Ok(());
        };
        let offset = part.offset + (addr - part.range.start()) as u64;
        if self.pending.contains_key(&offset) {
            return Ok(()); // already asked; the resolve will wake every waiter
        }
        let max_pages = self
            .cfg
            .batch_pages
            .min((part.range.end() - addr) / page_size());
        let req = Request {
            offset,
            max_pages,
            kind,
            write,
            background: false,
        };
        self.serve(addr, &req, Some(t0)).map(|_| ())
    }

    /// Fetch `req` from the source and resolve it at `addr` (or park it until answered).
    fn serve(
        &mut self,
        addr: usize,
        req: &Request,
        t0: Option<Instant>,
    ) -> Result<Served, LoopError> {
        let page = page_size();
        let fill = self.source.fetch(req, &mut self.scratch, &self.completer);
        let how = match fill {
            Ok(Fill::Pending) => {
                self.stats.async_requests.fetch_add(1, Relaxed);
                self.pending.insert(
                    req.offset,
                    Pending {
                        addr,
                        since: t0.unwrap_or_else(Instant::now),
                        fault: t0.is_some(),
                    },
                );
                return Ok(Served::Parked);
            }
            Ok(Fill::Bytes(b))
                if !b.is_empty() && b.len() % page == 0 && b.len() / page <= req.max_pages =>
            {
                if self.cfg.mode == Mode::Minor {
                    Err(SourceError::BadAnswer {
                        offset: req.offset,
                        why: "data for a MINOR fault (write it to the page cache, answer Present)",
                    })
                } else {
                    Ok(How::Copy(b))
                }
            }
            Ok(Fill::Bytes(_)) => Err(SourceError::BadAnswer {
                offset: req.offset,
                why: "not 1..=max_pages whole pages",
            }),
            Ok(Fill::Zero { pages }) if self.cfg.mode == Mode::Missing => {
                Ok(How::Zero(pages.clamp(1, req.max_pages)))
            }
            Ok(Fill::Present { pages }) if self.cfg.mode == Mode::Minor => {
                Ok(How::Continue(pages.clamp(1, req.max_pages)))
            }
            Ok(Fill::Zero { .. } | Fill::Present { .. }) => Err(SourceError::BadAnswer {
                offset: req.offset,
                why: "answer kind does not match the fault mode",
            }),
            Err(e) => Err(e),
        };
        let how = match how {
            Ok(h) => h,
            Err(e) => return self.fail(addr, e).map(|()| Served::Failed),
        };
        let is_copy = matches!(how, How::Copy(_));
        let is_zero = matches!(how, How::Zero(_));
        let n = resolve(&self.uffd, addr, how).map_err(|source| LoopError::Resolve {
            worker: self.id,
            source,
        })?;
        self.account(n, is_copy, is_zero, t0);
        Ok(Served::Mapped(n))
    }

    fn account(&self, pages: usize, copy: bool, zero: bool, t0: Option<Instant>) {
        let s = &self.stats;
        if pages == 0 {
            s.already_present.fetch_add(1, Relaxed);
        } else {
            s.pages.fetch_add(pages as u64, Relaxed);
            if copy {
                s.bytes_copied
                    .fetch_add((pages * page_size()) as u64, Relaxed);
            } else if zero {
                s.zero_pages.fetch_add(pages as u64, Relaxed);
            } else {
                s.continued_pages.fetch_add(pages as u64, Relaxed);
            }
        }
        match t0 {
            Some(t0) => s.record_latency(t0.elapsed().as_nanos() as u64),
            None => {
                s.populated_pages.fetch_add(pages as u64, Relaxed);
            }
        }
    }

    /// The source cannot produce the page at `addr`: poison it so that its readers get SIGBUS
    /// rather than wrong data or a hang.
    fn fail(&mut self, addr: usize, e: SourceError) -> Result<(), LoopError> {
        self.stats
            .record_error(format!("page {addr:#x}: {}", error_chain(&e)));
        match self.uffd.poison(Range::page_of(addr), false) {
            Ok(_) => Ok(()),
            Err(source) => Err(LoopError::Resolve {
                worker: self.id,
                source,
            }),
        }
    }

    fn serve_completions(&mut self) -> Result<(), LoopError> {
        let mut done = Vec::new();
        self.completer.drain(&mut done);
        for c in done {
            let Some(p) = self.pending.remove(&c.offset()) else {
                self.stats.record_error(format!(
                    "answer for offset {:#x}, which was not asked for",
                    c.offset()
                ));
                continue;
            };
            let t0 = p.fault.then_some(p.since);
            let page = page_size();
            let res = match c {
                Completion::Bytes { data, .. } if !data.is_empty() && data.len() % page == 0 => {
                    resolve(&self.uffd, p.addr, How::Copy(&data))
                        .map(|n| self.account(n, true, false, t0))
                }
                Completion::Bytes { offset, .. } => {
                    self.fail(
                        p.addr,
                        SourceError::BadAnswer {
                            offset,
                            why: "not whole pages",
                        },
                    )?;
                    Ok(())
                }
                Completion::Zero { pages, .. } => {
                    resolve(&self.uffd, p.addr, How::Zero(pages.max(1)))
                        .map(|n| self.account(n, false, true, t0))
                }
                Completion::Failed { error, .. } => {
                    self.fail(p.addr, error)?;
                    Ok(())
                }
            };
            res.map_err(|source| LoopError::Resolve {
                worker: self.id,
                source,
            })?;
        }
        Ok(())
    }

    fn shut_down(&mut self, cmd: u8, events: &mut EventBuffer) -> Result<(), LoopError> {
        self.serve_events(events, false)?;
        if cmd == FINISH {
            self.populate(events)?;
        }
        // Answers still owed: keep serving faults and completions until they arrive.
        let deadline = Instant::now() + self.cfg.drain_timeout;
        while !self.pending.is_empty() {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                let pages = self.pending.len();
                for (_, p) in std::mem::take(&mut self.pending) {
                    let _ = self.fail(
                        p.addr,
                        SourceError::Gone("no answer before the drain timeout".into()),
                    );
                }
                return Err(LoopError::DrainTimeout {
                    worker: self.id,
                    pages,
                    timeout: self.cfg.drain_timeout,
                });
            }
            let fds = [self.uffd.as_fd(), borrow(self.completer.efd())];
            uffd::poll_in(&fds, Some(left.min(Duration::from_millis(10)))).map_err(|e| {
                LoopError::Read {
                    worker: self.id,
                    source: ReadError::Poll(e),
                }
            })?;
            self.serve_events(events, false)?;
            self.serve_completions()?;
        }
        // Faults raised while draining.
        self.serve_events(events, false)?;
        Ok(())
    }

    /// Push every page of every part from the source, faults first.
    fn populate(&mut self, events: &mut EventBuffer) -> Result<(), LoopError> {
        let page = page_size();
        // Once the source answers later, ask one page at a time: a parked batch may come back
        // shorter than asked, and each page must be asked for by someone.
        let mut one_by_one = false;
        for part in self.parts.clone() {
            let mut addr = part.range.start();
            while addr < part.range.end() {
                self.serve_events(events, false)?;
                if self.pending.len() >= 64 {
                    self.serve_completions()?;
                }
                let offset = part.offset + (addr - part.range.start()) as u64;
                if self.pending.contains_key(&offset) {
                    addr += page;
                    continue;
                }
                let left = (part.range.end() - addr) / page;
                let req = Request {
                    offset,
                    max_pages: if one_by_one {
                        1
                    } else {
                        self.cfg.batch_pages.min(left)
                    },
                    kind: FaultKind::Missing,
                    write: false,
                    background: true,
                };
                let step = match self.serve(addr, &req, None)? {
                    Served::Mapped(n) => n.max(1),
                    Served::Parked => {
                        one_by_one = true;
                        1
                    }
                    Served::Failed => 1,
                };
                addr += step * page;
            }
        }
        Ok(())
    }
}

/// What [`Worker::serve`] did.
enum Served {
    /// Pages newly mapped (0: the first page was already present).
    Mapped(usize),
    /// Waiting for the source's answer.
    Parked,
    /// The source failed; the page was poisoned.
    Failed,
}
