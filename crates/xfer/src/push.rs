//! The source's post-copy engine: a background pusher on the main connection and a priority
//! responder on the priority connection, over a [`PageReader`].
//!
//! - **Claimed pages**: a bitmap of pages not yet sent; a page is claimed (its bit cleared)
//!   by whoever sends it, so no page goes twice.
//! - **Background push**: runs of up to [`MAX_RUN`] pages in address order, jumping to just
//!   after each requested page (locality); paced by the [`RateLimit`], paying for a run before
//!   claiming it (a claimed page is on the wire at once). It yields while a request is being
//!   answered.
//! - **Priority answers**: a request is answered at once, by the thread that reads it (no
//!   hand-off on a fault's path), on the priority connection (urgent:
//!   never paced: its bytes are debited from the [`RateLimit`] and the background pays for
//!   them). Requests with a constant stride (a scan with a step) make the responder push the
//!   next pages of that stride, a few at a time, stopping whenever a request comes; those go
//!   within the cap but ahead of the background (which leaves the tokens to them), and the
//!   responder waits for their tokens only while listening for requests.
//! - **Zero pages** go as counts ([`Kind::Zero`]), never as bytes.
//! - **Reconnect**: after a lost link, [`Push::stop`] the threads, reconnect, read the
//!   destination's `Recover` bitmap ([`read_recover`]), [`Push::recover`] and
//!   [`Push::start`] again on the new connections.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::SeqCst};
use std::sync::mpsc::{self, RecvTimeoutError, Sender};
use std::sync::{Arc, LazyLock, Mutex};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use serde::Serialize;
use thiserror::Error;

use crate::bitmap::{Bits, bytes_to_words, words_for};
use crate::digest::is_zero;
use crate::reader::{PageReader, ReadError};
use crate::wire::{
    Beat, FrameError, HEADER, Keepalive, Kind, MAX_RUN, PAGE, RateLimit, RecvError, Sock, Stalled,
    encode_frame,
};

/// What ended a push session's link.
#[derive(Debug, Error)]
pub enum LinkError {
    /// Sending on the main (background) connection failed.
    #[error("background stream")]
    Background(#[source] std::io::Error),
    /// Sending on the priority connection failed.
    #[error("priority connection: sending")]
    PrioritySend(#[source] std::io::Error),
    /// Reading requests failed (or the destination closed the connection).
    #[error("priority connection: reading requests")]
    PriorityRecv(#[source] RecvError),
    /// The destination sent something that is not a valid request.
    #[error("priority connection: a {kind:?} frame for page {page:#x} is not a valid request")]
    BadRequest {
        /// The kind that came.
        kind: Kind,
        /// The page it names.
        page: u64,
    },
    /// A request's count is out of bounds.
    #[error("priority connection: bad request")]
    BadCount(#[source] FrameError),
    /// Reading memory failed.
    #[error("reading memory")]
    Read(#[source] ReadError),
    /// A socket could not be cloned for a thread.
    #[error("socket setup")]
    Setup(#[source] std::io::Error),
}

/// Starting or recovering a push failed.
#[derive(Debug, Error)]
pub enum PushError {
    /// The threads are running (stop them first).
    #[error("the push threads are running")]
    Running,
    /// A socket could not be cloned, or a thread started.
    #[error("setting up the push threads")]
    Setup(#[source] std::io::Error),
    /// Reading the destination's `Recover` frame failed.
    #[error("reading the destination's list of missing pages")]
    Recv(#[source] RecvError),
    /// Another frame came instead of `Recover`.
    #[error("expected Recover, got {0:?}")]
    NotRecover(Kind),
    /// The `Recover` bitmap does not fit the memory.
    #[error("a Recover bitmap of {len} bytes does not fit {pages} pages")]
    RecoverSize {
        /// Bytes received.
        len: usize,
        /// Pages of memory.
        pages: u64,
    },
}

/// Counters of what was sent.
#[derive(Debug, Default)]
pub struct Sent {
    /// Bytes on the wire (headers included).
    pub bytes: AtomicU64,
    /// Pages sent as data.
    pub pages: AtomicU64,
    /// Pages sent as zero counts.
    pub zero_pages: AtomicU64,
}

/// What a push has done.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct PushStats {
    /// Bytes on the wire (headers included).
    pub bytes: u64,
    /// Pages sent as data.
    pub pages: u64,
    /// Pages sent as zero counts.
    pub zero_pages: u64,
    /// Requests answered.
    pub requests: u64,
    /// Pages pushed speculatively along a stride.
    pub stride_pages: u64,
    /// Pages not yet sent.
    pub remaining: u64,
    /// Pages sent again because they arrived damaged ([`Kind::Resend`]).
    pub resent: u64,
}

/// Tuning of the priority responder.
#[derive(Debug, Clone)]
pub struct PushConfig {
    /// Pages pushed along a detected stride after a request (0: no stride detection).
    pub stride_depth: u64,
    /// Stride pages sent per write between checks for requests.
    pub stride_chunk: u64,
    /// Largest stride recognised, pages.
    pub max_stride: u64,
    /// Give the responder a higher and the pusher a lower scheduling priority (best effort).
    pub nice: bool,
    /// Keepalives agreed with the destination: the responder sends one on the priority
    /// connection when it has sent nothing for a while, and the link counts as lost when
    /// nothing (no request, no keepalive) came on it for the deadline. `None`: an older
    /// destination; silence is then never an error.
    pub keepalive: Option<Keepalive>,
    /// CRC32C trailers on every page frame (negotiated in the hello); the destination then
    /// asks again ([`Kind::Resend`]) for the pages of a frame that arrived damaged.
    pub crc: bool,
}

impl Default for PushConfig {
    fn default() -> Self {
        PushConfig {
            stride_depth: 4096,
            stride_chunk: 8,
            max_stride: 4096,
            nice: true,
            keepalive: None,
            crc: false,
        }
    }
}

const NO_HINT: u64 = u64::MAX;

/// For sends already paid for.
static UNLIMITED: LazyLock<RateLimit> = LazyLock::new(|| RateLimit::new(0));

struct Shared {
    reader: Arc<dyn PageReader>,
    pages: u64,
    cfg: PushConfig,
    /// Pages not yet claimed for sending.
    todo: Bits,
    /// Where the background pusher goes on (set after each request).
    hint: AtomicU64,
    /// Requests being answered (the pusher yields meanwhile).
    busy: AtomicUsize,
    /// A stride push is under way on a capped link: the pusher leaves the link to it (these
    /// are the pages the guest touches next).
    striding: AtomicBool,
    rate: Arc<RateLimit>,
    sent: Arc<Sent>,
    lost: Mutex<Option<LinkError>>,
    stop: AtomicBool,
    requests: AtomicU64,
    stride_pages: AtomicU64,
    resent: AtomicU64,
    /// Each answer's hops (`FAULTLINE_BREAKDOWN=1`).
    hops: Option<crate::hops::SourceHops>,
}

impl Shared {
    fn lose(&self, e: LinkError) {
        self.lost
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get_or_insert(e);
    }

    fn is_lost(&self) -> bool {
        self.lost
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_some()
    }

    fn done(&self) -> bool {
        self.stop.load(SeqCst) || self.is_lost()
    }
}

/// The post-copy push of one migration (see the module docs).
pub struct Push {
    sh: Arc<Shared>,
    pusher: Option<JoinHandle<()>>,
    responder: Option<JoinHandle<()>>,
}

impl Push {
    /// A push of the pages set in `needed` (a bit per page of `reader`), paced by `rate`
    /// (the background only; answers to requests are never held back).
    pub fn new(
        reader: Arc<dyn PageReader>,
        needed: &[u64],
        rate: Arc<RateLimit>,
        sent: Arc<Sent>,
        cfg: PushConfig,
    ) -> Push {
        let pages = reader.pages();
        let todo = Bits::new(pages);
        todo.store_words(needed);
        // Bits past the memory are never sent.
        for p in pages..words_for(pages) as u64 * 64 {
            todo.clear(p);
        }
        Push {
            sh: Arc::new(Shared {
                reader,
                pages,
                cfg,
                todo,
                hint: AtomicU64::new(NO_HINT),
                busy: AtomicUsize::new(0),
                striding: AtomicBool::new(false),
                rate,
                sent,
                lost: Mutex::new(None),
                stop: AtomicBool::new(false),
                requests: AtomicU64::new(0),
                stride_pages: AtomicU64::new(0),
                resent: AtomicU64::new(0),
                hops: crate::hops::enabled().then(crate::hops::SourceHops::default),
            }),
            pusher: None,
            responder: None,
        }
    }

    /// Start the background pusher on `main` and the responder on `prio` (each on its own
    /// clone of the socket).
    pub fn start(&mut self, main: &Sock, prio: &Sock) -> Result<(), PushError> {
        if self.pusher.is_some() || self.responder.is_some() {
            return Err(PushError::Running);
        }
        self.sh.stop.store(false, SeqCst);
        let bg = main.try_clone().map_err(PushError::Setup)?;
        let pr = prio.try_clone().map_err(PushError::Setup)?;
        let rd = prio.try_clone().map_err(PushError::Setup)?;
        let sh = self.sh.clone();
        self.pusher = Some(
            thread::Builder::new()
                .name("xfer-push".into())
                .spawn(move || pusher(&sh, bg))
                .map_err(PushError::Setup)?,
        );
        let sh = self.sh.clone();
        self.responder = Some(
            thread::Builder::new()
                .name("xfer-prio".into())
                .spawn(move || responder(&sh, pr, rd))
                .map_err(PushError::Setup)?,
        );
        Ok(())
    }

    /// Whether the background pusher has sent every page (then send `End`).
    pub fn background_done(&self) -> bool {
        self.pusher.as_ref().is_none_or(|h| h.is_finished()) && !self.sh.is_lost()
    }

    /// Whether the link was lost (see [`take_lost`](Self::take_lost)).
    pub fn is_lost(&self) -> bool {
        self.sh.is_lost()
    }

    /// The error that lost the link, if any (taken: a recovered push starts clean).
    pub fn take_lost(&self) -> Option<LinkError> {
        self.sh
            .lost
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
    }

    /// Stop the threads and wait for them. Shut the sockets down first if a thread may be
    /// blocked sending on a dead link.
    pub fn stop(&mut self) {
        self.sh.stop.store(true, SeqCst);
        for h in [self.pusher.take(), self.responder.take()]
            .into_iter()
            .flatten()
        {
            let _ = h.join();
        }
    }

    /// After a reconnection: the pages the destination still lacks (its `Recover` bitmap)
    /// are the pages to send. Requests read but not answered died with the old connection;
    /// the destination asks again.
    pub fn recover(&mut self, missing: &[u64]) -> Result<(), PushError> {
        if self.pusher.is_some() || self.responder.is_some() {
            return Err(PushError::Running);
        }
        self.sh.todo.store_words(missing);
        self.sh.hint.store(NO_HINT, SeqCst);
        self.sh.busy.store(0, SeqCst);
        *self.sh.lost.lock().unwrap_or_else(|e| e.into_inner()) = None;
        Ok(())
    }

    /// Pages not yet sent.
    pub fn remaining(&self) -> u64 {
        self.sh.todo.count()
    }

    /// Counters so far.
    pub fn stats(&self) -> PushStats {
        let s = &self.sh;
        PushStats {
            bytes: s.sent.bytes.load(SeqCst),
            pages: s.sent.pages.load(SeqCst),
            zero_pages: s.sent.zero_pages.load(SeqCst),
            requests: s.requests.load(SeqCst),
            stride_pages: s.stride_pages.load(SeqCst),
            remaining: s.todo.count(),
            resent: s.resent.load(SeqCst),
        }
    }
}

impl Push {
    /// Each answer's hops so far, `[page, request read, responder took it, page written]`
    /// (`CLOCK_MONOTONIC` ns; empty unless `FAULTLINE_BREAKDOWN=1`).
    pub fn hop_stamps(&self) -> Vec<[u64; 4]> {
        self.sh.hops.as_ref().map(|h| h.take()).unwrap_or_default()
    }
}

impl Drop for Push {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Read the destination's `Recover` frame after a reconnection (on the new main
/// connection): the bitmap of pages it still needs.
pub fn read_recover(main: &mut Sock, pages: u64) -> Result<Vec<u64>, PushError> {
    let mut buf = Vec::new();
    let h = main.recv(&mut buf).map_err(PushError::Recv)?;
    if h.kind != Kind::Recover {
        return Err(PushError::NotRecover(h.kind));
    }
    bytes_to_words(&buf, pages).ok_or(PushError::RecoverSize {
        len: buf.len(),
        pages,
    })
}

/// Give the calling thread a scheduling priority: `nice` below 0 for the threads a faulting
/// thread waits on, above 0 for the background stream. Best effort (below 0 needs
/// CAP_SYS_NICE).
pub fn set_nice(nice: i32) {
    // SAFETY: gettid has no preconditions; setpriority on our own thread id only changes its
    // scheduling weight.
    unsafe {
        let tid = libc::gettid();
        libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, nice);
    }
}

/// Why [`send_run`] failed.
#[derive(Debug, Error)]
pub enum SendError {
    /// Reading memory failed.
    #[error("reading memory")]
    Read(#[source] ReadError),
    /// Writing to the socket failed.
    #[error("writing to the connection")]
    Io(#[source] std::io::Error),
}

/// Send pages `[p, p + n)` of `reader` as runs of data and (where `announce_zero` says so)
/// zero counts, reading them into `buf` first. Pre-copy rounds call it too.
#[allow(clippy::too_many_arguments)]
pub fn send_run(
    sock: &mut Sock,
    reader: &dyn PageReader,
    p: u64,
    n: u64,
    buf: &mut Vec<u8>,
    rate: &RateLimit,
    urgent: bool,
    sent: &Sent,
    announce_zero: &dyn Fn(u64) -> bool,
    crc: bool,
) -> Result<(), SendError> {
    // The buffer only grows (to the longest run): re-zeroing it for every run of another
    // length cost a memory pass per page on the pre-copy switchover's hot path.
    let len = (n * PAGE) as usize;
    if buf.len() < len {
        buf.resize(len, 0);
    }
    let buf = &mut buf[..len];
    reader.read(p, buf).map_err(SendError::Read)?;
    let page = |k: u64| &buf[(k * PAGE) as usize..((k + 1) * PAGE) as usize];
    let mut i = 0;
    while i < n {
        let zero = is_zero(page(i));
        let mut j = i + 1;
        while j < n && is_zero(page(j)) == zero {
            j += 1;
        }
        if zero {
            let mut k = i;
            while k < j {
                if !announce_zero(p + k) {
                    k += 1;
                    continue;
                }
                let mut e = k + 1;
                while e < j && announce_zero(p + e) {
                    e += 1;
                }
                rate.take(HEADER + 4, urgent);
                let count = ((e - k) as u32).to_le_bytes();
                sock.send_crc(Kind::Zero, (p + k) * PAGE, &count, crc)
                    .map_err(SendError::Io)?;
                sent.bytes.fetch_add(HEADER as u64 + 4, SeqCst);
                sent.zero_pages.fetch_add(e - k, SeqCst);
                k = e;
            }
        } else {
            let data = &buf[(i * PAGE) as usize..(j * PAGE) as usize];
            rate.take(data.len() + HEADER, urgent);
            sock.send_vectored_crc(Kind::Pages, (p + i) * PAGE, data, crc)
                .map_err(SendError::Io)?;
            sent.bytes.fetch_add((data.len() + HEADER) as u64, SeqCst);
            sent.pages.fetch_add(j - i, SeqCst);
        }
        i = j;
    }
    Ok(())
}

/// Send single pages (not contiguous) in one write: a frame each, zero pages as counts.
fn send_pages(sh: &Shared, sock: &mut Sock, pages: &[u64]) -> Result<usize, LinkError> {
    let mut out = Vec::with_capacity(pages.len() * (PAGE as usize + HEADER));
    let mut pg = vec![0u8; PAGE as usize];
    for &p in pages {
        sh.reader.read(p, &mut pg).map_err(LinkError::Read)?;
        let zero = is_zero(&pg);
        let r = if zero {
            sh.sent.zero_pages.fetch_add(1, SeqCst);
            encode_frame(
                &mut out,
                Kind::Zero,
                p * PAGE,
                &1u32.to_le_bytes(),
                sh.cfg.crc,
            )
        } else {
            sh.sent.pages.fetch_add(1, SeqCst);
            encode_frame(&mut out, Kind::Pages, p * PAGE, &pg, sh.cfg.crc)
        };
        r.map_err(LinkError::PrioritySend)?;
    }
    // Paid for by the caller (`RateLimit::try_take`): the responder never sleeps on tokens.
    std::io::Write::write_all(sock, &out).map_err(LinkError::PrioritySend)?;
    sh.sent.bytes.fetch_add(out.len() as u64, SeqCst);
    Ok(out.len())
}

fn pusher(sh: &Shared, mut sock: Sock) {
    if sh.cfg.nice {
        set_nice(5);
    }
    let mut cursor = 0;
    let mut buf = Vec::new();
    // The main connection's only writer: while it waits (for answers, a stride push, the
    // cap's tokens, which answers may have run into debt) it keeps the connection alive.
    let mut beat = Beat::new(sh.cfg.keepalive);
    let run_bytes = (MAX_RUN * PAGE) as usize + HEADER;
    while !sh.done() {
        while (sh.busy.load(SeqCst) > 0 || sh.striding.load(SeqCst)) && !sh.done() {
            if let Err(e) = beat.tick(&mut sock) {
                return sh.lose(LinkError::Background(e));
            }
            if sh.striding.load(SeqCst) {
                thread::sleep(Duration::from_micros(100));
            } else {
                thread::yield_now();
            }
        }
        if sh.todo.next_set(cursor, sh.pages).is_none() {
            return;
        }
        // Pay for the run before claiming its pages.
        while let Err(wait) = sh.rate.try_take(run_bytes) {
            if sh.done() {
                return;
            }
            if let Err(e) = beat.tick(&mut sock) {
                return sh.lose(LinkError::Background(e));
            }
            thread::sleep(wait.min(Duration::from_millis(10)));
        }
        let h = sh.hint.swap(NO_HINT, SeqCst);
        if h != NO_HINT {
            cursor = h;
        }
        let Some(p) = sh.todo.next_set(cursor, sh.pages) else {
            return;
        };
        let mut n = 0;
        while n < MAX_RUN && p + n < sh.pages && sh.todo.clear(p + n) {
            n += 1;
        }
        sh.rate.refund(((MAX_RUN - n) * PAGE) as usize);
        if n == 0 {
            cursor = p + 1;
            continue;
        }
        let r = send_run(
            &mut sock,
            &*sh.reader,
            p,
            n,
            &mut buf,
            &UNLIMITED,
            false,
            &sh.sent,
            &|_| true,
            sh.cfg.crc,
        );
        match r {
            Ok(()) => {
                beat.sent();
                cursor = p + n;
            }
            Err(SendError::Io(e)) => return sh.lose(LinkError::Background(e)),
            Err(SendError::Read(e)) => return sh.lose(LinkError::Read(e)),
        }
    }
}

/// The priority connection's writing side, shared by the request reader (answers) and the
/// responder (stride pushes, keepalives): frames never interleave.
struct Out {
    sock: Sock,
    beat: Beat,
    buf: Vec<u8>,
}

/// Read requests and answer each at once on the reading thread (no hand-off to another
/// thread on a fault's path: a wake-up costs tens of µs on a nested VM), then tell the
/// responder, which pushes along a stride or moves the background's cursor. Waits with
/// `poll`, never with a read timeout that could split a frame.
fn request_reader(sh: &Shared, mut rd: Sock, out: &Mutex<Out>, tx: Sender<u64>) {
    if sh.cfg.nice {
        set_nice(-10);
    }
    let mut buf = Vec::new();
    let mut heard = std::time::Instant::now();
    while !sh.done() {
        match rd.poll_readable(Duration::from_millis(100)) {
            Ok(false) => {
                if let Some(k) = sh.cfg.keepalive
                    && heard.elapsed() >= k.deadline
                {
                    let e = Stalled::Silent(k.deadline).into_io();
                    return sh.lose(LinkError::PriorityRecv(RecvError::Io(e)));
                }
                continue;
            }
            Ok(true) => heard = std::time::Instant::now(),
            Err(e) => return sh.lose(LinkError::PriorityRecv(RecvError::Io(e))),
        }
        let h = match rd.recv(&mut buf) {
            Ok(h) => h,
            Err(e) => return sh.lose(LinkError::PriorityRecv(e)),
        };
        let read = sh.hops.as_ref().map_or(0, |_| crate::hops::mono_ns());
        let page = h.arg / PAGE;
        if h.kind == Kind::Keepalive {
            continue;
        }
        if !matches!(h.kind, Kind::Request | Kind::Resend) || page >= sh.pages {
            return sh.lose(LinkError::BadRequest { kind: h.kind, page });
        }
        let n = match crate::wire::count(h.kind, &buf, MAX_RUN as u32) {
            Ok(n) => u64::from(n).min(sh.pages - page),
            Err(e) => return sh.lose(LinkError::BadCount(e)),
        };
        sh.busy.fetch_add(1, SeqCst);
        {
            let mut o = out.lock().unwrap_or_else(|e| e.into_inner());
            let o = &mut *o;
            if h.kind == Kind::Resend {
                // Damaged on the way: sent again, whoever sent them first.
                for q in page..page + n {
                    sh.todo.clear(q);
                }
                o.beat.sent();
                answer(sh, &mut o.sock, page, n, &mut o.buf);
                sh.resent.fetch_add(n, SeqCst);
            } else {
                sh.requests.fetch_add(1, SeqCst);
                if sh.todo.clear(page) {
                    o.beat.sent();
                    answer(sh, &mut o.sock, page, 1, &mut o.buf);
                    if let Some(hp) = &sh.hops {
                        hp.answered(page, read, read);
                    }
                }
            }
        }
        sh.busy.fetch_sub(1, SeqCst);
        if h.kind == Kind::Request && tx.send(page).is_err() {
            return;
        }
    }
}

/// The constant stride of the recent requests ending at `p`, if any.
fn stride_of(history: &[u64], p: u64, max: u64) -> Option<u64> {
    history.iter().rev().find_map(|&a| {
        let s = p.checked_sub(a).filter(|&s| s > 1 && s <= max)?;
        history.contains(&(p.checked_sub(2 * s)?)).then_some(s)
    })
}

/// Send pages `p..p + n` on the priority connection, ahead of the background; a failure
/// loses the link.
fn answer(sh: &Shared, sock: &mut Sock, p: u64, n: u64, buf: &mut Vec<u8>) {
    let r = send_run(
        sock,
        &*sh.reader,
        p,
        n,
        buf,
        &sh.rate,
        true,
        &sh.sent,
        &|_| true,
        sh.cfg.crc,
    );
    match r {
        Ok(()) => {}
        Err(SendError::Io(e)) => sh.lose(LinkError::PrioritySend(e)),
        Err(SendError::Read(e)) => sh.lose(LinkError::Read(e)),
    }
}

/// After each answered request: when the recent requests show a stride, push the next
/// pages of that stride (a few at a time, between requests); otherwise the background goes
/// on after the page. Also keeps the priority connection alive.
fn responder(sh: &Shared, sock: Sock, rd: Sock) {
    if sh.cfg.nice {
        set_nice(-10);
    }
    let (tx, rx) = mpsc::channel();
    // The responder writes keepalives when nothing else went out.
    let out = Mutex::new(Out {
        sock,
        beat: Beat::new(sh.cfg.keepalive),
        buf: Vec::new(),
    });
    thread::scope(|sc| {
        sc.spawn(|| request_reader(sh, rd, &out, tx));
        let mut history: Vec<u64> = Vec::with_capacity(16);
        // (next page, stride, pages left) of the speculative push.
        let mut spec: Option<(u64, u64, u64)> = None;
        // How long the stride push must wait for the link's tokens.
        let mut stride_wait: Option<Duration> = None;
        while !sh.done() {
            {
                let mut o = out.lock().unwrap_or_else(|e| e.into_inner());
                let o = &mut *o;
                if let Err(e) = o.beat.tick(&mut o.sock) {
                    sh.lose(LinkError::PrioritySend(e));
                    break;
                }
            }
            let req = if let Some(wait) = spec.and(stride_wait) {
                // The stride push waits for the link's tokens, but for requests too.
                stride_wait = None;
                match rx.recv_timeout(wait) {
                    Ok(p) => Some(p),
                    Err(RecvTimeoutError::Timeout) => None,
                    Err(RecvTimeoutError::Disconnected) => break,
                }
            } else if spec.is_some() {
                rx.try_recv().ok()
            } else {
                match rx.recv_timeout(Duration::from_millis(100)) {
                    Ok(p) => Some(p),
                    Err(RecvTimeoutError::Timeout) => continue,
                    Err(RecvTimeoutError::Disconnected) => break,
                }
            };
            if let Some(p) = req {
                let stride = (sh.cfg.stride_depth > 0)
                    .then(|| stride_of(&history, p, sh.cfg.max_stride))
                    .flatten();
                match stride {
                    Some(s) => {
                        spec = Some((p + s, s, sh.cfg.stride_depth));
                        sh.striding.store(sh.rate.limited(), SeqCst);
                    }
                    None => sh.hint.store((p + 1).min(sh.pages - 1), SeqCst),
                }
                if history.len() == 16 {
                    history.remove(0);
                }
                history.push(p);
                continue;
            }
            // No request waiting: a few more pages of the stride.
            let Some((mut next, s, mut left)) = spec else {
                continue;
            };
            // Paced like the background (the cap holds), ahead of it (these are the pages the
            // guest touches next), and never by sleeping here.
            let chunk = sh.cfg.stride_chunk.max(1) as usize * (PAGE as usize + HEADER + 4);
            if let Err(wait) = sh.rate.try_take(chunk) {
                stride_wait =
                    Some(wait.clamp(Duration::from_micros(50), Duration::from_millis(10)));
                continue;
            }
            let mut batch = Vec::new();
            while (batch.len() as u64) < sh.cfg.stride_chunk.max(1) && left > 0 && next < sh.pages {
                if sh.todo.clear(next) {
                    batch.push(next);
                }
                next += s;
                left -= 1;
            }
            if batch.is_empty() {
                sh.rate.refund(chunk);
            } else {
                let mut o = out.lock().unwrap_or_else(|e| e.into_inner());
                let o = &mut *o;
                o.beat.sent();
                match send_pages(sh, &mut o.sock, &batch) {
                    Ok(bytes) => sh.rate.refund(chunk.saturating_sub(bytes)),
                    Err(e) => sh.lose(e),
                }
                sh.stride_pages.fetch_add(batch.len() as u64, SeqCst);
            }
            spec = (left > 0 && next < sh.pages).then_some((next, s, left));
            if spec.is_none() {
                sh.striding.store(false, SeqCst);
            }
        }
        // Whatever ended the responder, the background is not held for it.
        sh.striding.store(false, SeqCst);
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strides() {
        assert_eq!(stride_of(&[10, 20], 30, 4096), Some(10));
        assert_eq!(
            stride_of(&[10, 11], 12, 4096),
            None,
            "stride 1 is the background's"
        );
        assert_eq!(stride_of(&[5, 20], 30, 4096), None);
        assert_eq!(stride_of(&[0, 5000], 10000, 4096), None);
    }
}
