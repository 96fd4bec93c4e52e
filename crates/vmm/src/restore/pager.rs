//! Serving a lazily restored VM's page faults for as long as it runs: the in-process fault
//! loop over the snapshot's memory file (recording or pushing the working set), or an external
//! handler process whose death, a fault it leaves unread past the deadline
//! (`--handler-timeout`), or a fault it read and left unresolved past it, stops the VM instead
//! of leaving vCPUs blocked.

use std::io::Read;
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::thread::{self, JoinHandle};
use std::time::Instant;

use memx::FaultLoop;
use serde::Serialize;
use thiserror::Error;

use crate::snapshot::{SnapshotError, SnapshotSource, WorkingSet};
use crate::vstate::{Failure, Notifier, VcpuControl};

/// The page-fault handler failed.
#[derive(Debug, Error)]
pub enum PagerError {
    /// The external handler closed its connection.
    #[error(
        "the external page-fault handler at {} closed its connection (it exited or crashed); vCPUs waiting on its pages cannot go on",
        .0.display()
    )]
    HandlerGone(PathBuf),
    /// The external handler is connected but left a fault unread past the deadline.
    #[error(
        "the external page-fault handler at {} left a page fault unanswered for {waited:?} (deadline {deadline:?}): it is stuck; the VMM took the userfaultfd back and stops the VM",
        .path.display()
    )]
    HandlerStuck {
        /// Its socket.
        path: PathBuf,
        /// How long the fault waited.
        waited: std::time::Duration,
        /// The deadline (`--handler-timeout`).
        deadline: std::time::Duration,
    },
    /// The external handler read a fault and left it unresolved past the deadline.
    #[error(
        "the external page-fault handler at {} read a page fault and left it unresolved: vCPU {vcpu} waited {waited:?} in the kernel's userfault wait (deadline {deadline:?}); the VMM took the userfaultfd back and stops the VM",
        .path.display()
    )]
    HandlerUnresolved {
        /// Its socket.
        path: PathBuf,
        /// The vCPU left waiting.
        vcpu: usize,
        /// How long it waited.
        waited: std::time::Duration,
        /// The deadline (`--handler-timeout`).
        deadline: std::time::Duration,
    },
    /// The in-process fault loop failed.
    #[error("fault loop")]
    FaultLoop(#[source] memx::LoopError),
    /// The recorded working set could not be stored.
    #[error("storing the working set")]
    WorkingSet(#[source] SnapshotError),
    /// A host resource could not be set up.
    #[error("cannot set up {what}")]
    Host {
        /// What.
        what: &'static str,
        /// Cause (errno kept).
        #[source]
        source: std::io::Error,
    },
}

/// What the restore's page-fault handler did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct PagerReport {
    /// `local` (in-process fault loop) or `external`.
    pub handler: String,
    /// Faults served (in-process only).
    pub faults: u64,
    /// Pages mapped in total (faults, prefetch, zero pages).
    pub pages: u64,
    /// Of which zero pages.
    pub zero_pages: u64,
    /// Pages pushed by the prefetcher.
    pub prefetched_pages: u64,
    /// Bytes read from the memory file.
    pub bytes_read: u64,
    /// Fault service time, p50 and p99, µs.
    pub fault_p50_us: f64,
    /// p99.
    pub fault_p99_us: f64,
    /// Pages the source could not produce (poisoned).
    pub errors: u64,
    /// The last such error.
    pub last_error: Option<String>,
    /// Pages recorded as the working set (written beside the snapshot when the VM ends).
    pub working_set_pages: usize,
}

/// Serves a lazily restored VM's page faults for as long as it runs.
pub struct Pager {
    pub(super) kind: PagerKind,
    /// Working-set offsets to push once the vCPUs run (not before: the push would compete
    /// with setting up the VM and delay its first instruction).
    pub(super) prefetch: Option<(Vec<u64>, usize)>,
    /// Pages the prefetch was given (0: no prefetch).
    pub(super) prefetch_total: u64,
    pub(super) record_to: Option<PathBuf>,
    pub(super) watcher: Option<(JoinHandle<()>, Arc<AtomicBool>)>,
}

pub(super) enum PagerKind {
    Local {
        fl: FaultLoop,
        source: Arc<SnapshotSource>,
        recording: bool,
    },
    External {
        conn: UnixStream,
        /// The VMM keeps its copy: while it is open, faults stay blocked (never silently
        /// filled with zeros) even after the handler is gone. The watcher takes it over.
        uffd: Option<uffd::Uffd>,
        /// Guest memory, registered with it.
        range: uffd::Range,
        path: PathBuf,
        /// How long a fault may stay unread by the handler.
        deadline: std::time::Duration,
    },
}

impl std::fmt::Debug for Pager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pager").finish_non_exhaustive()
    }
}

impl Pager {
    /// Start watching for handler failure: a closed hand-off connection, or a fault that stays
    /// unread by the handler past the deadline (the userfaultfd is readable the whole time: a
    /// handler that is stopped, or alive and not serving), stops the VM. The VMM then takes the
    /// userfaultfd back: from then on every fault is answered by poisoning its page, and
    /// vCPUs already waiting are woken to fault again (the faulting vCPU gets SIGBUS and stops
    /// with an error): no vCPU waits on a handler that is gone or stuck, never wrong data.
    ///
    /// A fault the handler read and never resolved leaves no trace in the userfaultfd; it is
    /// seen on the vCPU threads of `control` instead ([`UserfaultWaits`]).
    pub(crate) fn watch(
        &mut self,
        notify: Notifier,
        control: Arc<VcpuControl>,
    ) -> Result<(), PagerError> {
        let PagerKind::External {
            conn,
            path,
            uffd,
            range,
            deadline,
        } = &mut self.kind
        else {
            return Ok(());
        };
        let Some(uffd) = uffd.take() else {
            return Ok(());
        };
        let (range, deadline) = (*range, *deadline);
        let conn = conn.try_clone().map_err(|source| PagerError::Host {
            what: "the page-fault handler watcher",
            source,
        })?;
        let path = path.clone();
        let stop = Arc::new(AtomicBool::new(false));
        let st = stop.clone();
        let h = thread::Builder::new()
            .name("handler-watch".into())
            .spawn(move || {
                let mut unread_since: Option<Instant> = None;
                let mut waits = UserfaultWaits::default();
                while !st.load(SeqCst) {
                    if let Some((vcpu, waited)) = waits.longest(&control)
                        && waited >= deadline
                    {
                        notify.fail(Failure::Pager(Box::new(PagerError::HandlerUnresolved {
                            path: path.clone(),
                            vcpu,
                            waited,
                            deadline,
                        })));
                        take_over(uffd, range, &path, &st);
                        return;
                    }
                    let mut p = [
                        libc::pollfd {
                            fd: conn.as_fd().as_raw_fd(),
                            events: libc::POLLIN | libc::POLLRDHUP,
                            revents: 0,
                        },
                        libc::pollfd {
                            fd: uffd.as_fd().as_raw_fd(),
                            events: libc::POLLIN,
                            revents: 0,
                        },
                    ];
                    // SAFETY: two valid pollfds, for the duration of the call.
                    let r = unsafe { libc::poll(p.as_mut_ptr(), 2, 50) };
                    if r > 0 && p[0].revents != 0 {
                        let mut b = [0u8; 64];
                        if matches!((&conn).read(&mut b), Ok(0) | Err(_)) {
                            notify.fail(Failure::Pager(Box::new(PagerError::HandlerGone(
                                path.clone(),
                            ))));
                            take_over(uffd, range, &path, &st);
                            return;
                        }
                    }
                    // A fault waits unread: since when (across polls)?
                    if r > 0 && p[1].revents & libc::POLLIN != 0 {
                        let since = *unread_since.get_or_insert_with(Instant::now);
                        if since.elapsed() >= deadline {
                            notify.fail(Failure::Pager(Box::new(PagerError::HandlerStuck {
                                path: path.clone(),
                                waited: since.elapsed(),
                                deadline,
                            })));
                            take_over(uffd, range, &path, &st);
                            return;
                        }
                        // Readable stays readable: do not spin on it.
                        thread::sleep(std::time::Duration::from_millis(20));
                    } else {
                        unread_since = None;
                    }
                }
            })
            .map_err(|source| PagerError::Host {
                what: "the page-fault handler watcher",
                source,
            })?;
        self.watcher = Some((h, stop));
        Ok(())
    }

    /// Begin pushing the working set, if there is one (called once the vCPUs are started).
    pub(crate) fn launch(&mut self) -> Result<(), PagerError> {
        if let (Some((offsets, batch)), PagerKind::Local { fl, .. }) =
            (self.prefetch.take(), &mut self.kind)
        {
            self.prefetch_total = offsets.len() as u64;
            fl.prefetch(offsets, batch).map_err(PagerError::FaultLoop)?;
        }
        Ok(())
    }

    /// The prefetch's progress handle and the pages it was given (`None`: no prefetch).
    pub fn prefetch_progress(&self) -> Option<(memx::PrefetchProgress, u64)> {
        match &self.kind {
            PagerKind::Local { fl, .. } => fl.prefetch_progress().map(|p| (p, self.prefetch_total)),
            PagerKind::External { .. } => None,
        }
    }

    /// Counters so far.
    pub fn report(&self) -> PagerReport {
        match &self.kind {
            PagerKind::Local { fl, source, .. } => {
                let s = fl.stats();
                PagerReport {
                    handler: "local".into(),
                    faults: s.faults,
                    pages: s.pages,
                    zero_pages: s.zero_pages,
                    prefetched_pages: s.populated_pages,
                    bytes_read: source.bytes_read(),
                    fault_p50_us: s.latency.p50_ns as f64 / 1e3,
                    fault_p99_us: s.latency.p99_ns as f64 / 1e3,
                    errors: s.errors,
                    last_error: s.last_error.clone(),
                    working_set_pages: source.working_set().len(),
                }
            }
            PagerKind::External { .. } => PagerReport {
                handler: "external".into(),
                ..Default::default()
            },
        }
    }

    /// Stop serving; store the recorded working set if any. Returns the final report.
    pub(crate) fn finish(mut self) -> Result<PagerReport, PagerError> {
        if let Some((h, stop)) = self.watcher.take() {
            stop.store(true, SeqCst);
            let _ = h.join();
        }
        let report = self.report();
        if let PagerKind::Local {
            fl,
            source,
            recording,
        } = self.kind
        {
            fl.stop().map_err(PagerError::FaultLoop)?;
            if recording && let Some(dir) = &self.record_to {
                let ws = WorkingSet {
                    pages: source.working_set(),
                };
                if !ws.pages.is_empty() {
                    ws.store(dir).map_err(PagerError::WorkingSet)?;
                }
            }
        }
        Ok(report)
    }
}

/// vCPU threads asleep in the kernel's userfault wait, and since when: a thread whose wait
/// channel (`/proc/self/task/TID/wchan`) is `handle_userfault` and whose count of voluntary
/// context switches has not moved waits on one fault the whole time (every new fault is a
/// new sleep, which moves the count; a handler serving fault after fault quickly is never
/// taken for a stuck one). Where the kernel does not name wait channels (no kallsyms), nothing
/// is seen and only the other checks apply.
#[derive(Debug, Default)]
pub(crate) struct UserfaultWaits {
    /// Per vCPU: (voluntary context switches when the wait was first seen, since when).
    seen: Vec<Option<(u64, Instant)>>,
}

impl UserfaultWaits {
    /// The vCPU that has waited longest on one fault, and how long (sampled now).
    pub(crate) fn longest(
        &mut self,
        control: &VcpuControl,
    ) -> Option<(usize, std::time::Duration)> {
        let n = control.cpus.len();
        self.seen.resize(n, None);
        let mut worst: Option<(usize, std::time::Duration)> = None;
        for (i, cpu) in control.cpus.iter().enumerate() {
            let tid = cpu.tid.load(SeqCst);
            let waiting = (tid != 0 && !cpu.exited.load(SeqCst))
                .then(|| userfault_wait(tid))
                .flatten();
            self.seen[i] = match (waiting, self.seen[i]) {
                (Some(sw), Some((sw0, t))) if sw == sw0 => Some((sw0, t)),
                (Some(sw), _) => Some((sw, Instant::now())),
                (None, _) => None,
            };
            if let Some((_, t)) = self.seen[i]
                && worst.is_none_or(|(_, w)| t.elapsed() > w)
            {
                worst = Some((i, t.elapsed()));
            }
        }
        worst
    }
}

/// If thread `tid` of this process sleeps in `handle_userfault`: its voluntary context
/// switches so far.
fn userfault_wait(tid: u32) -> Option<u64> {
    let base = format!("/proc/self/task/{tid}");
    let wchan = std::fs::read_to_string(format!("{base}/wchan")).ok()?;
    if wchan.trim() != "handle_userfault" {
        return None;
    }
    let status = std::fs::read_to_string(format!("{base}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("voluntary_ctxt_switches:"))
        .and_then(|v| v.trim().parse().ok())
}

/// Answers every fault by poisoning its page: what the VMM does once the handler is gone.
struct Poison(PathBuf);

impl memx::PageSource for Poison {
    fn fetch<'a>(
        &'a self,
        _: &memx::Request,
        _: &'a mut [u8],
        _: &memx::Completer,
    ) -> Result<memx::Fill<'a>, memx::SourceError> {
        Err(memx::SourceError::Gone(format!(
            "the page-fault handler at {} is gone",
            self.0.display()
        )))
    }
}

/// Serve `uffd`'s faults by poisoning until `stop`; wake the vCPUs already waiting on faults
/// the handler read (they fault again, and are answered).
fn take_over(uffd: uffd::Uffd, range: uffd::Range, path: &std::path::Path, stop: &AtomicBool) {
    let features = uffd.features();
    let waker = uffd
        .as_fd()
        .try_clone_to_owned()
        .ok()
        .map(|fd| uffd::Uffd::from_owned_fd(fd, features));
    let fl = FaultLoop::serve(
        vec![(uffd, vec![memx::Region { range, offset: 0 }])],
        Poison(path.to_path_buf()),
        memx::Config {
            threads: 1,
            batch_pages: 1,
            ..Default::default()
        },
    );
    if fl.is_ok()
        && let Some(w) = &waker
    {
        let _ = w.wake(range);
    }
    // Without the loop (it could not start) faults stay blocked until the VM stops.
    while !stop.load(SeqCst) {
        thread::sleep(std::time::Duration::from_millis(20));
    }
    if let Ok(fl) = fl {
        let _ = fl.stop();
    }
}
