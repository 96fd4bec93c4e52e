//! The fault loop: worker threads that own userfaultfds and serve faults from a [`PageSource`].

use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering::Relaxed};
use std::thread::{self, JoinHandle};

use uffd::{Features, RegisterMode, Uffd, UffdBuilder, page_size};
use vmm_sys_util::eventfd::EventFd;

use crate::control::{Config, Control, FINISH, LoopError, Mode, RUN, Region, STOP};
use crate::install::{Installer, Slots};
use crate::mapping::Mapping;
use crate::prefetch::Prefetcher;
use crate::source::{Completer, PageSource};
use crate::stats::{ShardStats, Stats};
use crate::worker::Worker;

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

/// How far a prefetch has come ([`FaultLoop::prefetch_progress`]); cheap to clone and poll.
#[derive(Clone)]
pub struct PrefetchProgress(Arc<ShardStats>);

impl std::fmt::Debug for PrefetchProgress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PrefetchProgress({} pages)", self.pages())
    }
}

impl PrefetchProgress {
    /// Pages the prefetch placed so far.
    pub fn pages(&self) -> u64 {
        self.0
            .populated_pages
            .load(std::sync::atomic::Ordering::Relaxed)
    }
}

/// A running fault loop. Dropping it stops it (as [`FaultLoop::stop`]).
pub struct FaultLoop {
    workers: Vec<WorkerEntry>,
    ctl: Arc<Control>,
    cfg: Config,
    source: Arc<dyn PageSource>,
    prefetcher: Option<(JoinHandle<()>, Arc<ShardStats>)>,
    installer: Installer,
    /// The installers' counters.
    install_stats: Arc<ShardStats>,
    thread_ids: bool,
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
            // Faulting threads' ids (for blocktime) where the kernel offers them.
            let uffd = UffdBuilder::new()
                .require_features(features | Features::THREAD_ID)
                .create()
                .or_else(|_| UffdBuilder::new().require_features(features).create())
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
        let thread_ids = shards
            .iter()
            .all(|(u, _)| u.features().contains(Features::THREAD_ID));
        let shards: Vec<(Arc<Uffd>, Vec<Region>, Arc<Slots>)> = shards
            .into_iter()
            .map(|(u, parts)| {
                let slots = Arc::new(Slots::new(&parts));
                (Arc::new(u), parts, slots)
            })
            .collect();
        let install_stats = Arc::new(ShardStats::new());
        let installer = Installer::new(
            shards
                .iter()
                .map(|(u, p, s)| (Arc::downgrade(u), p.clone(), s.clone()))
                .collect(),
            install_stats.clone(),
            cfg.mode,
        );
        let mut fl = FaultLoop {
            workers: Vec::new(),
            ctl: ctl.clone(),
            cfg: cfg.clone(),
            source: source.clone(),
            prefetcher: None,
            installer,
            install_stats,
            thread_ids,
        };
        let mode = match cfg.mode {
            Mode::Missing => RegisterMode::MISSING,
            Mode::Minor => RegisterMode::MINOR,
        };
        for (w, (uffd, parts, slots)) in shards.into_iter().enumerate() {
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
                slots: slots.clone(),
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
        shards.push(&self.install_stats);
        Stats::merge(&shards)
    }

    /// A handle through which any thread installs pages into the loop's memory (pages that
    /// arrive unasked, or answers to requests the source left `Pending`); see [`Installer`].
    pub fn installer(&self) -> Installer {
        self.installer.clone()
    }

    /// Whether faults carry the faulting thread's id (`UFFD_FEATURE_THREAD_ID`, probed at
    /// [`start`](Self::start); for [`serve`](Self::serve), whether the given userfaultfds
    /// have it), so that [`Stats::blocktime_ns`] is per thread.
    pub fn thread_ids(&self) -> bool {
        self.thread_ids
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

    /// A handle on the running prefetch's progress (pages it placed so far), to poll from
    /// another thread; `None` before [`prefetch`](Self::prefetch).
    pub fn prefetch_progress(&self) -> Option<PrefetchProgress> {
        self.prefetcher
            .as_ref()
            .map(|(_, s)| PrefetchProgress(s.clone()))
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
        stats.push(self.install_stats.clone());
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
