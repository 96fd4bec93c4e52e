//! The destination's post-copy engine: memory served by a [`memx::FaultLoop`] whose source is
//! [`Pull::source`] (a fault on a page still at the source becomes a `Request` frame on the
//! priority connection and is answered `Pending`; a fault on any other page is a zero page),
//! and receiver threads that install arriving pages through the loop's [`Installer`], which
//! wakes the faulting threads and settles their faults.
//!
//! ```text
//!  vCPU / thread ──fault──▶ memx worker ──fetch──▶ RequestSource ──Request──▶ priority conn
//!                                                                               │ source
//!  main conn (background) ──Pages/Zero──▶ receiver ──install──▶ Installer ◀──── receiver
//! ```
//!
//! Each page installed is hashed for the digest. A receiver reports everything it does not
//! handle itself (control frames), the loss of its connection, and its own death (a failure,
//! even a panic) as an [`Event`]: the supervisor never waits on a silent receiver.

use std::sync::atomic::{AtomicU64, Ordering::SeqCst};
use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex, OnceLock};
use std::thread;

use memx::{Completer, Fill, InstallError, Installer, PageSource, Request, SourceError};
use serde::Serialize;
use thiserror::Error;

use crate::bitmap::{Bits, words_to_bytes};
use crate::digest::page_hash;
use crate::proto::Channel;
use crate::wire::{FrameError, Header, Kind, PAGE, RecvError, Sock};

/// A receiver could not go on.
#[derive(Debug, Error)]
pub enum PullError {
    /// Pages outside the memory.
    #[error("{kind:?} frame for pages {page:#x}..+{pages} outside the memory ({total} pages)")]
    OutOfRange {
        /// The frame's kind.
        kind: Kind,
        /// First page.
        page: u64,
        /// Pages.
        pages: u64,
        /// Pages of memory.
        total: u64,
    },
    /// A malformed payload.
    #[error("malformed payload")]
    Frame(#[source] FrameError),
    /// Installing the pages failed.
    #[error("installing pages at {page:#x}")]
    Install {
        /// First page.
        page: u64,
        /// Cause.
        #[source]
        source: InstallError,
    },
    /// CRC32C trailers were negotiated but a page frame came without one.
    #[error("a {0:?} frame without its CRC32C trailer (negotiated in the hello)")]
    Unchecked(Kind),
    /// The installer was not attached ([`Pull::attach`]) before pages came.
    #[error("pages came before the fault loop's installer was attached")]
    NotAttached,
    /// The receiver thread died (panicked): reported, never a silent hang.
    #[error("the {0:?} receiver died")]
    ReceiverDied(Channel),
    /// A receiver thread could not be started, or a socket cloned.
    #[error("starting a receiver")]
    Setup(#[source] std::io::Error),
}

/// What a receiver reports.
#[derive(Debug)]
pub enum Event {
    /// A frame the engine does not handle (End, Verdict, Error, ...), for the supervisor.
    Frame {
        /// The connection pair's generation ([`Pull::spawn_receivers`]).
        generation: u32,
        /// Which connection.
        channel: Channel,
        /// The header.
        header: Header,
        /// The payload.
        payload: Vec<u8>,
    },
    /// The connection was lost (closed or failing): recover or give up.
    Lost {
        /// Generation.
        generation: u32,
        /// Which connection.
        channel: Channel,
        /// Why.
        error: RecvError,
    },
    /// The receiver cannot go on (the peer broke the protocol, an install failed, or the
    /// receiver died).
    Failed {
        /// Generation.
        generation: u32,
        /// Which connection.
        channel: Channel,
        /// Why.
        error: PullError,
    },
}

/// What a pull has done.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct PullStats {
    /// Pages installed from the main (background) connection.
    pub pages_background: u64,
    /// Pages installed from the priority connection.
    pub pages_priority: u64,
    /// Zero pages the source announced.
    pub zero_pages_sent: u64,
    /// Faults on pages not at the source, answered locally with zero pages.
    pub zero_faults_local: u64,
    /// Faults that needed the source (requests made).
    pub faults_requested: u64,
    /// Requests sent (including re-requests after a reconnection).
    pub requests_sent: u64,
    /// Pages that came but were no longer needed.
    pub duplicates: u64,
    /// Payload and header bytes received by the receivers.
    pub bytes: u64,
    /// Pages still at the source.
    pub left: u64,
    /// Pages asked again because their frame arrived damaged.
    pub resends: u64,
}

struct Shared {
    pages: u64,
    /// Offset of page 0 in the fault loop's address space.
    base: u64,
    installer: OnceLock<Installer>,
    /// Pages still at the source.
    needed: Bits,
    left: AtomicU64,
    /// Pages asked for (once each, until a reconnection).
    requested: Bits,
    hashes: Vec<AtomicU64>,
    prio: Mutex<Option<Sock>>,
    /// When a frame last went out on the priority connection.
    prio_sent: Mutex<std::time::Instant>,
    pages_bg: AtomicU64,
    pages_prio: AtomicU64,
    zero_sent: AtomicU64,
    zero_local: AtomicU64,
    faults: AtomicU64,
    requests: AtomicU64,
    duplicates: AtomicU64,
    bytes: AtomicU64,
    /// CRC32C trailers were negotiated: page frames must carry one.
    crc: std::sync::atomic::AtomicBool,
    /// Pages asked again because their frame arrived damaged.
    resends: AtomicU64,
    /// Each request's hops (`FAULTLINE_BREAKDOWN=1`).
    hops: Option<crate::hops::DestHops>,
}

impl Shared {
    fn request(&self, p: u64) {
        let mut g = self.prio.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(s) = g.as_mut() {
            if s.send(Kind::Request, p * PAGE, &1u32.to_le_bytes())
                .is_err()
            {
                // The receivers notice the broken link; the request is sent again after a
                // reconnection (`Pull::rerequest`).
                *g = None;
            } else {
                self.requests.fetch_add(1, SeqCst);
                *self.prio_sent.lock().unwrap_or_else(|e| e.into_inner()) =
                    std::time::Instant::now();
            }
        }
    }

    /// Ask the source to send pages `[p, p + n)` again (their frame arrived damaged).
    /// `false`: there is no priority connection to ask on.
    fn resend(&self, p: u64, n: u64) -> bool {
        let mut g = self.prio.lock().unwrap_or_else(|e| e.into_inner());
        let Some(s) = g.as_mut() else {
            return false;
        };
        if s.send(Kind::Resend, p * PAGE, &(n as u32).to_le_bytes())
            .is_err()
        {
            *g = None;
            return false;
        }
        self.resends.fetch_add(n, SeqCst);
        *self.prio_sent.lock().unwrap_or_else(|e| e.into_inner()) = std::time::Instant::now();
        true
    }

    fn keepalive(&self, every: std::time::Duration) {
        let mut g = self.prio.lock().unwrap_or_else(|e| e.into_inner());
        let mut sent = self.prio_sent.lock().unwrap_or_else(|e| e.into_inner());
        if sent.elapsed() < every {
            return;
        }
        if let Some(s) = g.as_mut() {
            if s.send(Kind::Keepalive, 0, &[]).is_err() {
                // As for a request: the receivers notice the broken link.
                *g = None;
            } else {
                *sent = std::time::Instant::now();
            }
        }
    }

    fn settle(&self, p: u64) {
        if self.needed.clear(p) {
            self.left.fetch_sub(1, SeqCst);
        }
    }
}

/// The post-copy pull of one migration (see the module docs). Cloning is cheap.
#[derive(Clone)]
pub struct Pull {
    sh: Arc<Shared>,
}

impl std::fmt::Debug for Pull {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Pull({} of {} pages left)", self.left(), self.sh.pages)
    }
}

/// The [`PageSource`] of the destination's fault loop: zero pages for pages not at the
/// source, requests (answered `Pending`, settled by an install) for the others.
pub struct RequestSource {
    sh: Arc<Shared>,
}

impl PageSource for RequestSource {
    fn fetch<'a>(
        &'a self,
        req: &Request,
        _: &'a mut [u8],
        _: &Completer,
    ) -> Result<Fill<'a>, SourceError> {
        let sh = &self.sh;
        let woke = sh.hops.as_ref().map(|_| crate::hops::mono_ns());
        let size = sh.pages * PAGE;
        let rel = req.offset.wrapping_sub(sh.base);
        if req.offset < sh.base || rel >= size {
            return Err(SourceError::OutOfRange {
                offset: req.offset,
                size,
            });
        }
        let p = rel / PAGE;
        if !sh.needed.get(p) {
            // Known zero, or installed meanwhile (then the zero page is refused as present).
            sh.zero_local.fetch_add(1, SeqCst);
            return Ok(Fill::Zero { pages: 1 });
        }
        if !req.background {
            sh.faults.fetch_add(1, SeqCst);
        }
        if !sh.requested.set(p) {
            sh.request(p);
            if let (Some(h), Some(w)) = (&sh.hops, woke) {
                h.requested(p, w);
            }
        }
        Ok(Fill::Pending)
    }

    fn size(&self) -> Option<u64> {
        Some(self.sh.pages * PAGE)
    }
}

/// The same words as atomics, in the same allocation (nothing is copied or touched).
fn atomic_words(v: Vec<u64>) -> Vec<AtomicU64> {
    const _: () = assert!(
        std::mem::size_of::<u64>() == std::mem::size_of::<AtomicU64>()
            && std::mem::align_of::<u64>() == std::mem::align_of::<AtomicU64>()
    );
    let mut v = std::mem::ManuallyDrop::new(v);
    // SAFETY: AtomicU64 has the same size and bit validity as u64 (std's documentation) and,
    // as asserted above, the same alignment, so the allocation, its length and capacity
    // describe a valid Vec<AtomicU64>, freed with the same layout; `v` is not used again.
    unsafe { Vec::from_raw_parts(v.as_mut_ptr().cast::<AtomicU64>(), v.len(), v.capacity()) }
}

impl Pull {
    /// A pull over `pages` pages whose page 0 sits at `base` in the fault loop's address
    /// space; `needed` (a bit per page) are still at the source. `hashes` are the pages'
    /// hashes so far (pre-copy), empty if none: those of needed pages are dropped.
    ///
    /// Built in the downtime, so it takes `hashes` over as they are (no copy: a 1 GiB
    /// guest's are 2 MiB, whose first touch cost up to 18 ms here) and writes only the
    /// entries of needed pages.
    pub fn new(pages: u64, base: u64, needed: &[u64], hashes: Vec<u64>) -> Pull {
        let n = Bits::new(pages);
        n.store_words(needed);
        for p in pages..n.words().len() as u64 * 64 {
            n.clear(p);
        }
        let mut hashes = hashes;
        if hashes.len() as u64 != pages {
            hashes.resize(pages as usize, 0);
        }
        for (wi, &w) in needed.iter().enumerate() {
            let mut w = w;
            while w != 0 {
                let p = wi * 64 + w.trailing_zeros() as usize;
                if let Some(h) = hashes.get_mut(p) {
                    *h = 0;
                }
                w &= w - 1;
            }
        }
        let hashes = atomic_words(hashes);
        let left = n.count();
        Pull {
            sh: Arc::new(Shared {
                pages,
                base,
                installer: OnceLock::new(),
                needed: n,
                left: AtomicU64::new(left),
                requested: Bits::new(pages),
                hashes,
                prio: Mutex::new(None),
                prio_sent: Mutex::new(std::time::Instant::now()),
                pages_bg: AtomicU64::new(0),
                pages_prio: AtomicU64::new(0),
                zero_sent: AtomicU64::new(0),
                zero_local: AtomicU64::new(0),
                faults: AtomicU64::new(0),
                requests: AtomicU64::new(0),
                duplicates: AtomicU64::new(0),
                bytes: AtomicU64::new(0),
                crc: std::sync::atomic::AtomicBool::new(false),
                resends: AtomicU64::new(0),
                hops: crate::hops::enabled().then(crate::hops::DestHops::default),
            }),
        }
    }

    /// Each answered request's hops so far, `[page, handler woke, request sent, page
    /// received, installed]` (`CLOCK_MONOTONIC` ns; empty unless `FAULTLINE_BREAKDOWN=1`).
    pub fn hop_stamps(&self) -> Vec<[u64; 5]> {
        self.sh.hops.as_ref().map(|h| h.take()).unwrap_or_default()
    }

    /// The page source to start the destination's fault loop with.
    pub fn source(&self) -> RequestSource {
        RequestSource {
            sh: self.sh.clone(),
        }
    }

    /// Attach the fault loop's installer (once, before the receivers start).
    pub fn attach(&self, installer: Installer) {
        let _ = self.sh.installer.set(installer);
    }

    /// Where requests go (`None`: nowhere, while the link is down).
    pub fn set_priority(&self, prio: Option<Sock>) {
        *self.sh.prio.lock().unwrap_or_else(|e| e.into_inner()) = prio;
    }

    /// Start a receiver on each connection (clones of the sockets), reporting to `tx`;
    /// `generation` tells a lost old pair from the current one after a reconnection. Also
    /// makes `prio` the connection requests go out on.
    pub fn spawn_receivers(
        &self,
        main: &Sock,
        prio: &Sock,
        generation: u32,
        tx: &Sender<Event>,
    ) -> Result<(), PullError> {
        self.set_priority(Some(prio.try_clone().map_err(PullError::Setup)?));
        for (s, channel) in [(main, Channel::Main), (prio, Channel::Priority)] {
            let sock = s.try_clone().map_err(PullError::Setup)?;
            let (sh, tx) = (self.sh.clone(), tx.clone());
            thread::Builder::new()
                .name(format!("xfer-{channel:?}-in").to_lowercase())
                .spawn(move || {
                    let mut guard = Death {
                        tx,
                        generation,
                        channel,
                        armed: true,
                    };
                    receiver(&sh, sock, &mut guard);
                })
                .map_err(PullError::Setup)?;
        }
        Ok(())
    }

    /// Send a keepalive on the priority connection if nothing (no request) went out on it
    /// for `every` (the supervisor calls this often; requests and keepalives share one lock,
    /// so frames never interleave).
    pub fn keepalive(&self, every: std::time::Duration) {
        self.sh.keepalive(every);
    }

    /// Page frames must carry a CRC32C trailer (negotiated in the hello); a damaged one is
    /// asked for again ([`Kind::Resend`]).
    pub fn set_crc(&self, crc: bool) {
        self.sh.crc.store(crc, SeqCst);
    }

    /// Pages still at the source.
    pub fn left(&self) -> u64 {
        self.sh.left.load(SeqCst)
    }

    /// Whether page `p` is still at the source.
    pub fn needed(&self, p: u64) -> bool {
        self.sh.needed.get(p)
    }

    /// The digest of memory as installed (see [`crate::digest`]).
    pub fn digest(&self) -> u64 {
        crate::digest::digest(
            self.sh
                .hashes
                .iter()
                .enumerate()
                .map(|(p, h)| (p as u64, h.load(SeqCst))),
        )
    }

    /// The `Recover` payload after a reconnection: the bitmap of pages still needed.
    pub fn recover_bitmap(&self) -> Vec<u8> {
        words_to_bytes(&self.sh.needed.words())
    }

    /// After a reconnection (and [`spawn_receivers`](Self::spawn_receivers) on the new
    /// pair): ask again for every page a faulting thread still waits on. Returns how many.
    pub fn rerequest(&self) -> usize {
        let Some(inst) = self.sh.installer.get() else {
            return 0;
        };
        let mut n = 0;
        for off in inst.pending() {
            let p = off.wrapping_sub(self.sh.base) / PAGE;
            if p < self.sh.pages && self.sh.needed.get(p) {
                self.sh.requested.set(p);
                self.sh.request(p);
                n += 1;
            }
        }
        n
    }

    /// Counters so far.
    pub fn stats(&self) -> PullStats {
        let s = &self.sh;
        PullStats {
            pages_background: s.pages_bg.load(SeqCst),
            pages_priority: s.pages_prio.load(SeqCst),
            zero_pages_sent: s.zero_sent.load(SeqCst),
            zero_faults_local: s.zero_local.load(SeqCst),
            faults_requested: s.faults.load(SeqCst),
            requests_sent: s.requests.load(SeqCst),
            duplicates: s.duplicates.load(SeqCst),
            bytes: s.bytes.load(SeqCst),
            left: s.left.load(SeqCst),
            resends: s.resends.load(SeqCst),
        }
    }
}

/// Reports a receiver's end: the event it ends with, or (dropped armed, as in a panic) its
/// death.
struct Death {
    tx: Sender<Event>,
    generation: u32,
    channel: Channel,
    armed: bool,
}

impl Death {
    fn send(&self, e: Event) -> bool {
        self.tx.send(e).is_ok()
    }

    fn end(&mut self, e: Event) {
        self.armed = false;
        let _ = self.tx.send(e);
    }
}

impl Drop for Death {
    fn drop(&mut self) {
        if self.armed {
            let _ = self.tx.send(Event::Failed {
                generation: self.generation,
                channel: self.channel,
                error: PullError::ReceiverDied(self.channel),
            });
        }
    }
}

fn receiver(sh: &Shared, mut sock: Sock, d: &mut Death) {
    if d.channel == Channel::Priority {
        crate::push::set_nice(-10);
    }
    let mut buf = Vec::new();
    let (generation, channel) = (d.generation, d.channel);
    loop {
        let h = match sock.recv_checked(&mut buf) {
            Ok((h, checked)) => {
                if sh.crc.load(SeqCst) && !checked && matches!(h.kind, Kind::Pages | Kind::Zero) {
                    return d.end(Event::Failed {
                        generation,
                        channel,
                        error: PullError::Unchecked(h.kind),
                    });
                }
                h
            }
            Err(e @ RecvError::Checksum { .. }) => {
                // Damaged on the way: a `Pages` frame is asked for again (the pages it names
                // that are still needed). The header is covered too: if it named other
                // pages, those never come and the source's wait for `Done` ends in a
                // recovery. Anything else cannot be asked for again: the link counts as lost.
                if let RecvError::Checksum {
                    kind: Kind::Pages,
                    arg,
                    len,
                    ..
                } = e
                {
                    let (p, n) = (arg / PAGE, u64::from(len) / PAGE);
                    if arg % PAGE == 0 && n > 0 && p.checked_add(n).is_some_and(|e| e <= sh.pages) {
                        // Runs of the pages still needed (others came meanwhile).
                        let mut q = p;
                        while q < p + n {
                            if !sh.needed.get(q) {
                                q += 1;
                                continue;
                            }
                            let mut e = q + 1;
                            while e < p + n && sh.needed.get(e) {
                                e += 1;
                            }
                            sh.resend(q, e - q);
                            q = e;
                        }
                        continue;
                    }
                }
                // As a lost link: after a reconnection the source learns exactly which pages
                // are still needed (`Recover`).
                return d.end(Event::Lost {
                    generation,
                    channel,
                    error: e,
                });
            }
            Err(RecvError::Frame(e)) => {
                return d.end(Event::Failed {
                    generation,
                    channel,
                    error: PullError::Frame(e),
                });
            }
            Err(error) => {
                return d.end(Event::Lost {
                    generation,
                    channel,
                    error,
                });
            }
        };
        let received = sh.hops.as_ref().map(|_| crate::hops::mono_ns());
        sh.bytes
            .fetch_add(u64::from(h.len) + crate::wire::HEADER as u64, SeqCst);
        let r = match h.kind {
            Kind::Pages => {
                let r = pages(sh, &h, &buf, channel);
                if let (Some(hops), Some(t), true) = (&sh.hops, received, r.is_ok()) {
                    hops.installed(h.arg / PAGE, u64::from(h.len) / PAGE, t);
                }
                r
            }
            Kind::Zero => zero(sh, &h, &buf),
            Kind::Keepalive => Ok(()),
            _ => {
                let e = Event::Frame {
                    generation,
                    channel,
                    header: h,
                    payload: std::mem::take(&mut buf),
                };
                if d.send(e) {
                    Ok(())
                } else {
                    // Nobody listens any more.
                    d.armed = false;
                    return;
                }
            }
        };
        if let Err(error) = r {
            return d.end(Event::Failed {
                generation,
                channel,
                error,
            });
        }
    }
}

fn range(sh: &Shared, kind: Kind, arg: u64, pages: u64) -> Result<u64, PullError> {
    let page = arg / PAGE;
    if arg % PAGE != 0 || page.checked_add(pages).is_none_or(|e| e > sh.pages) {
        return Err(PullError::OutOfRange {
            kind,
            page,
            pages,
            total: sh.pages,
        });
    }
    Ok(page)
}

/// Runs of pages in `[p, p + n)` still needed, as `(first, count)`.
fn needed_runs(sh: &Shared, p: u64, n: u64) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for q in p..p + n {
        if !sh.needed.get(q) {
            sh.duplicates.fetch_add(1, SeqCst);
            continue;
        }
        match out.last_mut() {
            Some((s, c)) if *s + *c == q => *c += 1,
            _ => out.push((q, 1)),
        }
    }
    out
}

fn pages(sh: &Shared, h: &Header, data: &[u8], channel: Channel) -> Result<(), PullError> {
    let n = data.len() as u64 / PAGE;
    let p = range(sh, h.kind, h.arg, n)?;
    let inst = sh.installer.get().ok_or(PullError::NotAttached)?;
    for (q, c) in needed_runs(sh, p, n) {
        let k = ((q - p) * PAGE) as usize;
        let run = &data[k..k + (c * PAGE) as usize];
        inst.install(sh.base + q * PAGE, run)
            .map_err(|source| PullError::Install { page: q, source })?;
        for (i, pg) in run.chunks_exact(PAGE as usize).enumerate() {
            let r = q + i as u64;
            sh.hashes[r as usize].store(page_hash(pg), SeqCst);
            sh.settle(r);
        }
        let ctr = match channel {
            Channel::Main => &sh.pages_bg,
            Channel::Priority => &sh.pages_prio,
        };
        ctr.fetch_add(c, SeqCst);
    }
    Ok(())
}

fn zero(sh: &Shared, h: &Header, payload: &[u8]) -> Result<(), PullError> {
    let max = u32::try_from(sh.pages).unwrap_or(u32::MAX);
    let n = u64::from(crate::wire::count(h.kind, payload, max).map_err(PullError::Frame)?);
    let p = range(sh, h.kind, h.arg, n)?;
    let inst = sh.installer.get().ok_or(PullError::NotAttached)?;
    for (q, c) in needed_runs(sh, p, n) {
        inst.install_zero(sh.base + q * PAGE, c as usize)
            .map_err(|source| PullError::Install { page: q, source })?;
        for r in q..q + c {
            sh.hashes[r as usize].store(0, SeqCst);
            sh.settle(r);
        }
    }
    sh.zero_sent.fetch_add(n, SeqCst);
    Ok(())
}
