//! A fault-loop worker: owns one userfaultfd, reads its faults, asks the source, resolves, and
//! on shutdown drains what is owed (and, for `finish`, populates every page).

use std::os::fd::AsFd;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use uffd::{Event, EventBuffer, FaultKind, Range, ReadError, Uffd, error_chain, page_size};
use vmm_sys_util::eventfd::EventFd;

use crate::control::{
    Config, Control, FINISH, How, LoopError, Mode, RUN, Region, borrow, pin_to, resolve,
};
use crate::install::{Pending, Slots};
use crate::source::{Completer, Completion, Fill, PageSource, Request, SourceError};
use crate::stats::ShardStats;

/// A faulting thread's request: when its fault was read, and who it is.
#[derive(Debug, Clone, Copy)]
struct Fault {
    t0: Instant,
    tid: Option<u32>,
}

/// One worker thread's state (see the module docs).
pub(crate) struct Worker<S> {
    pub(crate) id: usize,
    pub(crate) uffd: Arc<Uffd>,
    pub(crate) parts: Vec<Region>,
    pub(crate) source: Arc<S>,
    pub(crate) scratch: Vec<u8>,
    pub(crate) completer: Completer,
    /// Requests answered later, shared with the loop's installers.
    pub(crate) slots: Arc<Slots>,
    pub(crate) stats: Arc<ShardStats>,
    pub(crate) ctl: Arc<Control>,
    pub(crate) cfg: Config,
    pub(crate) doorbell: Option<usize>,
    /// Set when the uffd belongs to another process: shutdown is signalled here.
    pub(crate) stop_efd: Option<Arc<EventFd>>,
    /// Whether the uffd is in blocking mode (see `set_blocking`).
    pub(crate) blocking: bool,
}

impl<S: PageSource> Worker<S> {
    pub(crate) fn run(&mut self) -> Result<(), LoopError> {
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
            if self.slots.is_empty() && self.stop_efd.is_none() {
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
                r = r.and_then(|()| {
                    self.on_fault(
                        pf.page().start(),
                        pf.kind,
                        pf.write,
                        Fault {
                            t0,
                            tid: pf.thread_id,
                        },
                    )
                });
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
        fault: Fault,
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
        if self.slots.contains(offset) {
            return Ok(()); // already asked; the resolve will wake every waiter
        }
        if self.slots.is_installed(offset) {
            // A fault read after an install mapped the page (and woke the thread).
            let _ = self.uffd.wake(Range::page_of(addr));
            self.stats.already_present.fetch_add(1, Relaxed);
            return Ok(());
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
        self.serve(addr, &req, Some(fault)).map(|_| ())
    }

    /// Fetch `req` from the source and resolve it at `addr` (or park it until answered).
    fn serve(
        &mut self,
        addr: usize,
        req: &Request,
        fault: Option<Fault>,
    ) -> Result<Served, LoopError> {
        let page = page_size();
        let fill = self.source.fetch(req, &mut self.scratch, &self.completer);
        let how = match fill {
            Ok(Fill::Pending) => {
                self.stats.async_requests.fetch_add(1, Relaxed);
                let p = Pending {
                    addr,
                    since: fault.map_or_else(Instant::now, |f| f.t0),
                    fault: fault.is_some(),
                    tid: fault.and_then(|f| f.tid),
                };
                if self.slots.park(req.offset, p) {
                    return Ok(Served::Parked);
                }
                // Installed from outside meanwhile: the install woke the thread; settle here.
                let _ = self.uffd.wake(Range::page_of(addr));
                if let Some(f) = fault {
                    self.stats.settled_by_install.fetch_add(1, Relaxed);
                    self.stats
                        .record_latency(f.t0.elapsed().as_nanos() as u64, f.tid);
                }
                return Ok(Served::Mapped(1));
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
        self.account(n, is_copy, is_zero, fault);
        Ok(Served::Mapped(n))
    }

    fn account(&self, pages: usize, copy: bool, zero: bool, fault: Option<Fault>) {
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
        match fault {
            Some(f) => s.record_latency(f.t0.elapsed().as_nanos() as u64, f.tid),
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
            let Some(p) = self.slots.take(c.offset()) else {
                if self.slots.is_installed(c.offset()) {
                    // Installed from outside before the answer came: harmless.
                    self.stats.late_answers.fetch_add(1, Relaxed);
                    continue;
                }
                self.stats.record_error(format!(
                    "answer for offset {:#x}, which was not asked for",
                    c.offset()
                ));
                continue;
            };
            let t0 = p.fault.then_some(Fault {
                t0: p.since,
                tid: p.tid,
            });
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
        while !self.slots.is_empty() {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                let pages = self.slots.len();
                for p in self.slots.drain() {
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
                if self.slots.len() >= 64 {
                    self.serve_completions()?;
                }
                let offset = part.offset + (addr - part.range.start()) as u64;
                if self.slots.contains(offset) || self.slots.is_installed(offset) {
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
