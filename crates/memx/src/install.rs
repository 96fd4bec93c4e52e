//! Installing pages from outside the fault loop: a migration destination's receivers put pages
//! that arrive unasked (the source's background push) or that answer a request straight into
//! the loop's memory through an [`Installer`], and the faults waiting on them are settled.
//!
//! A worker parks a fault that its source answered [`Fill::Pending`](crate::Fill::Pending) in
//! its [`Slots`]; an install maps the page (COPY / ZEROPAGE wakes every thread waiting on it),
//! marks it installed, and takes the parked entry, recording the fault's latency and the
//! faulting thread's blocktime. A worker that parks a fault after the page was installed sees
//! the mark and settles it at once, so no entry is leaked and none is resolved twice.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Instant;

use thiserror::Error;
use uffd::{CopyMode, Range, ResolveError, Resolved, Uffd, page_size};

use crate::control::{Mode, Region};
use crate::stats::ShardStats;

/// A fault (or a background request) waiting for its page.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Pending {
    /// Where the page is mapped.
    pub(crate) addr: usize,
    /// When the fault was read (or the request made).
    pub(crate) since: Instant,
    /// Raised by a faulting thread (else by background population).
    pub(crate) fault: bool,
    /// The faulting thread, when the kernel reports it.
    pub(crate) tid: Option<u32>,
}

/// One worker's parked requests and which of its pages were installed from outside.
pub(crate) struct Slots {
    pending: Mutex<HashMap<u64, Pending>>,
    /// Per part: a bit per page, set once an install mapped (or found) the page.
    installed: Vec<(Region, Vec<AtomicU64>)>,
}

impl Slots {
    pub(crate) fn new(parts: &[Region]) -> Slots {
        let installed = parts
            .iter()
            .map(|p| {
                let words = p.range.pages().div_ceil(64);
                (*p, (0..words).map(|_| AtomicU64::new(0)).collect())
            })
            .collect();
        Slots {
            pending: Mutex::new(HashMap::new()),
            installed,
        }
    }

    fn bit(&self, offset: u64) -> Option<(&AtomicU64, u64)> {
        let page = page_size() as u64;
        self.installed.iter().find_map(|(r, bits)| {
            let len = r.range.len() as u64;
            (offset >= r.offset && offset < r.offset + len).then(|| {
                let i = (offset - r.offset) / page;
                (&bits[(i / 64) as usize], 1u64 << (i % 64))
            })
        })
    }

    fn mark_installed(&self, offset: u64) {
        if let Some((w, m)) = self.bit(offset) {
            w.fetch_or(m, Relaxed);
        }
    }

    /// Whether an install has put the page at `offset` in.
    pub(crate) fn is_installed(&self, offset: u64) -> bool {
        self.bit(offset)
            .is_some_and(|(w, m)| w.load(Relaxed) & m != 0)
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, HashMap<u64, Pending>> {
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Park a request whose answer comes later; `false` (not parked) if an install already
    /// put the page in.
    pub(crate) fn park(&self, offset: u64, p: Pending) -> bool {
        let mut g = self.lock();
        // Under the lock: an install marks before it takes entries, so either it sees this
        // entry or this sees its mark.
        if self.is_installed(offset) {
            return false;
        }
        g.insert(offset, p);
        true
    }

    pub(crate) fn take(&self, offset: u64) -> Option<Pending> {
        self.lock().remove(&offset)
    }

    pub(crate) fn contains(&self, offset: u64) -> bool {
        self.lock().contains_key(&offset)
    }

    pub(crate) fn len(&self) -> usize {
        self.lock().len()
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub(crate) fn drain(&self) -> Vec<Pending> {
        self.lock().drain().map(|(_, p)| p).collect()
    }
}

/// Installing pages failed.
#[derive(Debug, Error)]
pub enum InstallError {
    /// The fault loop has stopped (its userfaultfds are closed).
    #[error("the fault loop has stopped")]
    Stopped,
    /// The loop serves MINOR faults: pages are put in the page cache, not installed.
    #[error("installing pages needs a loop in Missing mode")]
    Mode,
    /// The data is not whole pages.
    #[error("{len} bytes are not whole pages")]
    NotWholePages {
        /// Bytes given.
        len: usize,
    },
    /// The pages lie outside the loop's regions.
    #[error("pages at offset {offset:#x} (+{pages}) lie outside the loop's regions")]
    OutOfRange {
        /// Offset of the first page outside.
        offset: u64,
        /// Pages asked for.
        pages: usize,
    },
    /// The resolve ioctl failed (errno kept in the cause).
    #[error("installing the page at offset {offset:#x}")]
    Resolve {
        /// Offset of the page.
        offset: u64,
        /// Cause.
        #[source]
        source: ResolveError,
    },
}

/// Map `pages` pages at `addr` (COPY of `data`, or ZEROPAGE; both wake the waiters). Returns
/// the pages newly mapped, 0 if the first was present. Unlike the workers' resolve, an
/// `EAGAIN` with nothing done is retried and then reported, never taken for "present": a page
/// marked installed must be there.
fn place(
    uffd: &Uffd,
    addr: usize,
    pages: usize,
    data: Option<&[u8]>,
) -> Result<usize, ResolveError> {
    let page = page_size();
    let range = Range::from_pages(addr, pages).map_err(|_| ResolveError::ShortSource {
        op: uffd::Op::Copy,
        range: Range::page_of(addr),
        given: pages * page,
    })?;
    let mut tries = 0;
    loop {
        let r = match data {
            Some(d) => uffd.copy(range, d, CopyMode::empty()),
            None => uffd.zeropage(range, false),
        };
        match r {
            Ok(Resolved::Done(n)) => return Ok(n / page),
            Ok(Resolved::AlreadyPresent) => return Ok(0),
            Err(ResolveError::Partial { done, .. }) if done > 0 => return Ok(done / page),
            Err(ResolveError::Partial { done: 0, .. }) if tries < 1000 => {
                tries += 1;
                std::thread::yield_now();
            }
            Err(e) => return Err(e),
        }
    }
}

/// What an install did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Installed {
    /// Pages newly mapped.
    pub pages: usize,
    /// Pages that were already present (a duplicate, or another thread won).
    pub duplicates: usize,
    /// Faults waiting on these pages that this install settled.
    pub settled: usize,
}

struct Target {
    uffd: Weak<Uffd>,
    parts: Vec<Region>,
    slots: Arc<Slots>,
}

struct Shared {
    targets: Vec<Target>,
    stats: Arc<ShardStats>,
    mode: Mode,
}

/// Installs pages into a running [`FaultLoop`](crate::FaultLoop)'s memory from any thread:
/// whole pages of bytes ([`install`](Self::install)) or zero pages
/// ([`install_zero`](Self::install_zero)) at an offset in the loop's address space (the
/// [`Region`] offsets). A page already present is counted as a duplicate, not an error. The
/// install wakes every thread faulting on the page and settles a fault the source answered
/// `Pending`. Cloning is cheap; after the loop stops, installs fail with
/// [`InstallError::Stopped`].
#[derive(Clone)]
pub struct Installer {
    inner: Arc<Shared>,
}

impl std::fmt::Debug for Installer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Installer")
            .field("targets", &self.inner.targets.len())
            .finish()
    }
}

impl Installer {
    pub(crate) fn new(
        targets: Vec<(Weak<Uffd>, Vec<Region>, Arc<Slots>)>,
        stats: Arc<ShardStats>,
        mode: Mode,
    ) -> Installer {
        Installer {
            inner: Arc::new(Shared {
                targets: targets
                    .into_iter()
                    .map(|(uffd, parts, slots)| Target { uffd, parts, slots })
                    .collect(),
                stats,
                mode,
            }),
        }
    }

    /// The target holding `offset`: (target index, address, pages left in its part).
    fn locate(&self, offset: u64) -> Option<(usize, usize, usize)> {
        let page = page_size() as u64;
        for (i, t) in self.inner.targets.iter().enumerate() {
            for p in &t.parts {
                let len = p.range.len() as u64;
                if offset >= p.offset && offset < p.offset + len && offset % page == 0 {
                    let addr = p.range.start() + (offset - p.offset) as usize;
                    let left = ((p.offset + len - offset) / page) as usize;
                    return Some((i, addr, left));
                }
            }
        }
        None
    }

    /// Install whole pages of `data` at `offset` (COPY; wakes the faulting threads).
    pub fn install(&self, offset: u64, data: &[u8]) -> Result<Installed, InstallError> {
        let page = page_size();
        if data.is_empty() || data.len() % page != 0 {
            return Err(InstallError::NotWholePages { len: data.len() });
        }
        self.run(offset, data.len() / page, Some(data))
    }

    /// Install `pages` zero pages at `offset` (ZEROPAGE; wakes the faulting threads).
    pub fn install_zero(&self, offset: u64, pages: usize) -> Result<Installed, InstallError> {
        self.run(offset, pages, None)
    }

    fn run(
        &self,
        offset: u64,
        pages: usize,
        data: Option<&[u8]>,
    ) -> Result<Installed, InstallError> {
        if self.inner.mode != Mode::Missing {
            return Err(InstallError::Mode);
        }
        let page = page_size();
        // Check the whole run first: nothing is installed from a run that does not fit.
        let mut k = 0;
        while k < pages {
            let off = offset + (k * page) as u64;
            let (_, _, left) = self
                .locate(off)
                .ok_or(InstallError::OutOfRange { offset: off, pages })?;
            k += left;
        }
        let mut out = Installed::default();
        let mut done = 0;
        while done < pages {
            let off = offset + (done * page) as u64;
            let (ti, addr, left) = self
                .locate(off)
                .ok_or(InstallError::OutOfRange { offset: off, pages })?;
            let t = &self.inner.targets[ti];
            let uffd = t.uffd.upgrade().ok_or(InstallError::Stopped)?;
            let n = left.min(pages - done);
            let data = data.map(|d| &d[done * page..(done + n) * page]);
            let mapped = place(&uffd, addr, n, data)
                .map_err(|source| InstallError::Resolve {
                    offset: off,
                    source,
                })?
                .min(n);
            // 0: the first page was present; skip just it.
            let (step, dup) = if mapped == 0 {
                (1, true)
            } else {
                (mapped, false)
            };
            let s = &self.inner.stats;
            if dup {
                out.duplicates += 1;
                s.install_duplicates.fetch_add(1, Relaxed);
            } else {
                out.pages += step;
                s.installed_pages.fetch_add(step as u64, Relaxed);
                if data.is_some() {
                    s.installed_bytes.fetch_add((step * page) as u64, Relaxed);
                } else {
                    s.installed_zero.fetch_add(step as u64, Relaxed);
                }
            }
            out.settled += self.settle(t, &uffd, off, step, dup);
            done += step;
        }
        Ok(out)
    }

    /// Mark `pages` pages from `offset` installed and settle the requests parked on them.
    fn settle(&self, t: &Target, uffd: &Uffd, offset: u64, pages: usize, dup: bool) -> usize {
        let page = page_size() as u64;
        for k in 0..pages as u64 {
            t.slots.mark_installed(offset + k * page);
        }
        let now = Instant::now();
        let taken: Vec<Pending> = {
            let mut g = t.slots.lock();
            if g.is_empty() {
                return 0;
            }
            (0..pages as u64)
                .filter_map(|k| g.remove(&(offset + k * page)))
                .collect()
        };
        let s = &self.inner.stats;
        let mut settled = 0;
        for p in taken {
            if dup {
                // Mapped by someone else, whose resolve woke the waiters; waking again is
                // harmless and covers a resolve that did not wake.
                let _ = uffd.wake(Range::page_of(p.addr));
            }
            if p.fault {
                settled += 1;
                s.settled_by_install.fetch_add(1, Relaxed);
                s.record_latency(now.duration_since(p.since).as_nanos() as u64, p.tid);
            }
        }
        settled
    }

    /// Offsets of the requests still waiting for their page (faults and background
    /// population), sorted: after a lost link, the destination asks for them again.
    pub fn pending(&self) -> Vec<u64> {
        let mut v: Vec<u64> = self
            .inner
            .targets
            .iter()
            .flat_map(|t| t.slots.lock().keys().copied().collect::<Vec<_>>())
            .collect();
        v.sort_unstable();
        v
    }

    /// Whether an install has put the page at `offset` in.
    pub fn is_installed(&self, offset: u64) -> bool {
        self.inner
            .targets
            .iter()
            .any(|t| t.slots.is_installed(offset))
    }
}
