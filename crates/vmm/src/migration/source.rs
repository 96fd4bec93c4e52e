//! The sending side: runs on its own thread, started by `PUT /migrate`.

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::SeqCst};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use kvm_ioctls::VmFd;
use serde_json::json;

use super::wire::{Kind, MAX_RUN, PAGE, RateLimit, Sock};
use super::{
    Bits, DestReport, End, Endpoint, Hello, HelloAck, MigrateRequest, MigrationError,
    MigrationMode, PROTOCOL, Status, Switch, VERSION, io_err, is_zero, max_pause_ms, mix,
    page_hash, words_to_bytes,
};
use crate::config::VmConfig;
use crate::memory::{Backend, GuestMem};
use crate::vstate::control::mono_ns;
use crate::vstate::{Notice, Notifier, PauseOwner, VcpuControl};

/// What the migration thread needs of the running VM.
pub struct SourceCtx {
    pub(crate) control: Arc<VcpuControl>,
    pub(crate) vm: Arc<VmFd>,
    pub(crate) mem: Arc<GuestMem>,
    pub(crate) msr_list: Vec<u32>,
    pub(crate) irqchip: bool,
    pub(crate) cfg: VmConfig,
    /// (guest-physical start, length) of each workload slice.
    pub(crate) slices: Vec<(u64, u64)>,
    pub(crate) notify: Notifier,
}

/// How long to wait for the destination to answer a hello, or to resume after the state.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a source in `postcopy-paused` waits for `--resume` before giving up.
const RECOVER_WAIT: Duration = Duration::from_secs(3600);

/// Run a migration to its end; the status says how it went.
pub fn run(
    ctx: SourceCtx,
    req: MigrateRequest,
    status: Status,
    resume_rx: Receiver<Option<Endpoint>>,
) {
    let t0 = Instant::now();
    let r = migrate(&ctx, &req, &status, &resume_rx, t0);
    match r {
        Ok(stats) => status.update(|s| {
            s.state = "completed".into();
            s.percent = 100.0;
            s.remaining_bytes = 0;
            s.stats = Some(stats);
        }),
        Err(MigrationError::NotConverged(ms)) => status.update(|s| {
            s.state = "cancelled".into();
            s.error = Some(MigrationError::NotConverged(ms).to_string());
            s.stats = Some(json!({
                "role": "source",
                "mode": req.mode.name(),
                "converged": false,
                "total_ms": t0.elapsed().as_secs_f64() * 1e3,
                "rounds": s.round,
            }));
        }),
        Err(e) => status.update(|s| {
            s.state = "failed".into();
            s.error = Some(uffd::error_chain(&e));
        }),
    }
}

fn set_dirty_log(vm: &VmFd, mem: &GuestMem, on: bool) -> Result<(), MigrationError> {
    let region = kvm_bindings::kvm_userspace_memory_region {
        slot: 0,
        flags: if on {
            kvm_bindings::KVM_MEM_LOG_DIRTY_PAGES
        } else {
            0
        },
        guest_phys_addr: 0,
        memory_size: mem.size(),
        userspace_addr: mem.host_addr() as u64,
    };
    // SAFETY: the same region as registered at creation, owned by `mem`, which outlives the VM
    // fd's use here; only the flags change.
    unsafe { vm.set_user_memory_region(region) }.map_err(|source| MigrationError::Kvm {
        what: "KVM_SET_USER_MEMORY_REGION (dirty logging)",
        source,
    })
}

fn dirty_log(vm: &VmFd, mem: &GuestMem) -> Result<Vec<u64>, MigrationError> {
    vm.get_dirty_log(0, mem.size() as usize)
        .map_err(|source| MigrationError::Kvm {
            what: "KVM_GET_DIRTY_LOG",
            source,
        })
}

/// Pages that may hold data: for anonymous memory, pages the kernel has (present or swapped,
/// from `/proc/self/pagemap`) whose bytes are not all zero; for other backends every non-zero
/// page. Dirty logging is on, so a page written after it was looked at is caught later.
fn scan(mem: &GuestMem) -> Vec<u64> {
    let pages = mem.size() / PAGE;
    let mut bits = vec![0u64; pages.div_ceil(64) as usize];
    let pagemap = if mem.backend() == Backend::Anonymous {
        read_pagemap(mem.host_addr() as u64, pages).ok()
    } else {
        None
    };
    let mut buf = vec![0u8; PAGE as usize];
    for p in 0..pages {
        if let Some(pm) = &pagemap
            && pm[p as usize] & (3 << 62) == 0
        {
            continue; // never touched: reads as zero
        }
        read_pages(mem, p, 1, &mut buf);
        if !is_zero(&buf) {
            bits[(p / 64) as usize] |= 1 << (p % 64);
        }
    }
    bits
}

fn read_pagemap(addr: u64, pages: u64) -> io::Result<Vec<u64>> {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::open("/proc/self/pagemap")?;
    let mut b = vec![0u8; pages as usize * 8];
    f.read_exact_at(&mut b, addr / PAGE * 8)?;
    Ok(b.chunks_exact(8)
        .map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes")))
        .collect())
}

/// Copy `n` pages from page `p` into `buf`.
fn read_pages(mem: &GuestMem, p: u64, n: u64, buf: &mut Vec<u8>) {
    let len = (n * PAGE) as usize;
    buf.resize(len, 0);
    // SAFETY: guest memory is plain bytes the guest may change concurrently; the copy may see a
    // mix of old and new bytes, which the dirty log (pre-copy) or the pause (post-copy) makes
    // harmless: such a page is sent again, or cannot change any more.
    if let Some(src) = unsafe { mem.slice(p * PAGE, len) } {
        // SAFETY: both ranges are valid for `len` bytes and do not overlap.
        unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), buf.as_mut_ptr(), len) };
    }
}

/// Counters of what was sent.
#[derive(Default)]
struct Sent {
    bytes: AtomicU64,
    pages: AtomicU64,
    zero_pages: AtomicU64,
}

/// Send pages `[p, p + n)` as runs of data and (when `announce_zero` says so) zero runs,
/// straight from guest memory.
#[allow(clippy::too_many_arguments)]
fn send_run(
    sock: &mut Sock,
    mem: &GuestMem,
    p: u64,
    n: u64,
    rate: &RateLimit,
    urgent: bool,
    sent: &Sent,
    announce_zero: &dyn Fn(u64) -> bool,
) -> io::Result<()> {
    // SAFETY: guest memory is plain bytes the guest may change concurrently: a page sent while
    // it changes is caught by the dirty log and sent again (pre-copy), or cannot change any
    // more (post-copy: the guest is paused here). The range was checked by `slice`.
    let Some(buf) = (unsafe { mem.slice(p * PAGE, (n * PAGE) as usize) }) else {
        return Err(io::Error::other("pages outside guest memory"));
    };
    let mut i = 0;
    while i < n {
        let page = |k: u64| &buf[(k * PAGE) as usize..((k + 1) * PAGE) as usize];
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
                rate.take(super::wire::HEADER + 4, urgent);
                sock.send(Kind::Zero, (p + k) * PAGE, &((e - k) as u32).to_le_bytes())?;
                sent.bytes.fetch_add(20, SeqCst);
                sent.zero_pages.fetch_add(e - k, SeqCst);
                k = e;
            }
        } else {
            let data = &buf[(i * PAGE) as usize..(j * PAGE) as usize];
            rate.take(data.len() + super::wire::HEADER, urgent);
            sock.send_vectored(Kind::Pages, (p + i) * PAGE, data)?;
            sent.bytes.fetch_add(data.len() as u64 + 16, SeqCst);
            sent.pages.fetch_add(j - i, SeqCst);
        }
        i = j;
    }
    Ok(())
}

/// Send single pages (not contiguous) in one write: a frame each, zero pages as counts.
fn send_pages(
    sock: &mut Sock,
    mem: &GuestMem,
    pages: &[u64],
    rate: &RateLimit,
    sent: &Sent,
) -> io::Result<()> {
    use super::wire::Header;
    let mut out = Vec::with_capacity(pages.len() * (PAGE as usize + 16));
    for &p in pages {
        // SAFETY: as in `send_run` (the guest is paused during post-copy).
        let Some(pg) = (unsafe { mem.slice(p * PAGE, PAGE as usize) }) else {
            return Err(io::Error::other("page outside guest memory"));
        };
        if is_zero(pg) {
            let h = Header {
                kind: Kind::Zero,
                len: 4,
                arg: p * PAGE,
            };
            out.extend_from_slice(&h.encode());
            out.extend_from_slice(&1u32.to_le_bytes());
            sent.zero_pages.fetch_add(1, SeqCst);
        } else {
            let h = Header {
                kind: Kind::Pages,
                len: PAGE as u32,
                arg: p * PAGE,
            };
            out.extend_from_slice(&h.encode());
            out.extend_from_slice(pg);
            sent.pages.fetch_add(1, SeqCst);
        }
    }
    // Speculative: it waits for the link like the background stream.
    rate.take(out.len(), false);
    io::Write::write_all(sock, &out)?;
    sent.bytes.fetch_add(out.len() as u64, SeqCst);
    Ok(())
}

/// Give the calling thread a scheduling priority: `nice` below 0 for the threads a faulting
/// vCPU waits on, above 0 for the background stream. Best effort (needs CAP_SYS_NICE to go
/// below 0).
pub(crate) fn set_nice(nice: i32) {
    // SAFETY: gettid has no preconditions; setpriority on our own thread id only changes its
    // scheduling weight.
    unsafe {
        let tid = libc::gettid();
        libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, nice);
    }
}

/// Runs of set bits, at most `MAX_RUN` long.
pub(crate) fn runs(bits: &[u64]) -> impl Iterator<Item = (u64, u64)> + '_ {
    let mut p = 0u64;
    let total = bits.len() as u64 * 64;
    std::iter::from_fn(move || {
        while p < total {
            let w = bits[(p / 64) as usize] >> (p % 64);
            if w == 0 {
                p = (p / 64 + 1) * 64;
                continue;
            }
            p += u64::from(w.trailing_zeros());
            let start = p;
            while p < total && p - start < MAX_RUN && bits[(p / 64) as usize] & (1 << (p % 64)) != 0
            {
                p += 1;
            }
            return Some((start, p - start));
        }
        None
    })
}

fn popcount(bits: &[u64]) -> u64 {
    bits.iter().map(|w| u64::from(w.count_ones())).sum()
}

fn hello(ep: &Endpoint, h: &Hello) -> Result<(Sock, HelloAck), MigrationError> {
    let mut s = ep.connect(Duration::from_secs(10)).map_err(io_err(format!(
        "connecting to {ep} ({} channel)",
        h.channel
    )))?;
    s.set_read_timeout(Some(ANSWER_TIMEOUT))
        .map_err(io_err("socket setup"))?;
    s.send_json(Kind::Hello, h)
        .map_err(io_err(format!("sending the hello to {ep}")))?;
    let mut buf = Vec::new();
    let hd = s
        .recv(&mut buf)
        .map_err(io_err(format!("waiting for {ep} to answer the hello")))?;
    if hd.kind != Kind::HelloAck {
        return Err(MigrationError::Protocol(format!(
            "{ep} answered the hello with a {:?} frame",
            hd.kind
        )));
    }
    let ack: HelloAck = serde_json::from_slice(&buf)
        .map_err(|e| MigrationError::Protocol(format!("{ep}: malformed hello answer: {e}")))?;
    if !ack.ok || ack.version != VERSION {
        return Err(MigrationError::Protocol(format!(
            "{ep} refused (its protocol version {}, ours {VERSION}): {}",
            ack.version,
            ack.error.clone().unwrap_or_default()
        )));
    }
    s.set_read_timeout(None).map_err(io_err("socket setup"))?;
    Ok((s, ack))
}

struct Conns {
    main: Sock,
    prio: Sock,
    ack: HelloAck,
}

fn connect(
    ep: &Endpoint,
    id: u64,
    mode: MigrationMode,
    cfg: Option<&VmConfig>,
    irqchip: bool,
    resume: bool,
) -> Result<Conns, MigrationError> {
    let mut h = Hello {
        protocol: PROTOCOL.into(),
        version: VERSION,
        id,
        channel: "main".into(),
        resume,
        mode,
        config: cfg.cloned(),
        irqchip,
    };
    let (main, ack) = hello(ep, &h)?;
    main.set_buffers(MAIN_BUFFER);
    h.channel = "priority".into();
    h.config = None;
    let (prio, _) = hello(ep, &h)?;
    Ok(Conns { main, prio, ack })
}

fn migrate(
    ctx: &SourceCtx,
    req: &MigrateRequest,
    status: &Status,
    resume_rx: &Receiver<Option<Endpoint>>,
    t0: Instant,
) -> Result<serde_json::Value, MigrationError> {
    let to = req
        .to
        .clone()
        .ok_or_else(|| MigrationError::Invalid("`to` is missing".into()))?;
    let id = mono_ns() ^ (u64::from(std::process::id()) << 40);
    let mut c = connect(&to, id, req.mode, Some(&ctx.cfg), ctx.irqchip, false)?;
    let mem = &*ctx.mem;
    let rate = Arc::new(RateLimit::new(req.max_bandwidth));
    let sent = Arc::new(Sent::default());
    set_dirty_log(&ctx.vm, mem, true)?;
    let r = (|| {
        dirty_log(&ctx.vm, mem)?; // clear
        ctx.control.reset_gaps();
        let maybe = scan(mem);
        let setup_ms = t0.elapsed().as_secs_f64() * 1e3;
        precopy_then_switch(ctx, req, status, &mut c, &rate, &sent, maybe, setup_ms, t0)
    })();
    let out = match r {
        Ok(Switched::Before(e)) | Err(e) => {
            // The guest never left: it runs on here.
            let _ = set_dirty_log(&ctx.vm, mem, false);
            ctx.control.resume(PauseOwner::Migration);
            return Err(e);
        }
        Ok(Switched::After(out)) => out,
    };
    finish(ctx, req, status, c, rate, sent, out, resume_rx, to, id, t0)
}

/// Where the switchover left things.
struct AfterSwitch {
    pause: Instant,
    postcopy: bool,
    /// Pages the destination still needs (post-copy).
    needed: Vec<u64>,
    /// Pages that may be non-zero at switchover (for the source digest).
    maybe: Vec<u64>,
    rounds: u32,
    setup_ms: f64,
    tails_us: Vec<Option<u64>>,
    gaps_us: Vec<u64>,
}

enum Switched {
    /// Failed before the state was sent: resume the source.
    Before(MigrationError),
    After(AfterSwitch),
}

#[allow(clippy::too_many_arguments)]
fn precopy_then_switch(
    ctx: &SourceCtx,
    req: &MigrateRequest,
    status: &Status,
    c: &mut Conns,
    rate: &Arc<RateLimit>,
    sent: &Arc<Sent>,
    maybe: Vec<u64>,
    setup_ms: f64,
    t0: Instant,
) -> Result<Switched, MigrationError> {
    let mem = &*ctx.mem;
    let mut sent_once = vec![0u64; maybe.len()];
    let mut rounds = 0u32;
    let mut postcopy = req.mode == MigrationMode::Postcopy;
    let mut to_send = maybe.clone();
    let mut maybe = maybe;
    let deadline = t0 + Duration::from_millis(req.deadline_ms);
    let mut prev_dirty = u64::MAX;
    if !postcopy {
        loop {
            status.update(|s| {
                s.state = "precopy".into();
                s.round = rounds;
            });
            let total = popcount(&to_send);
            c.main
                .send_json(Kind::Round, &json!({ "round": rounds, "pages": total }))
                .map_err(io_err("sending a pre-copy round"))?;
            let t = Instant::now();
            let b0 = sent.bytes.load(SeqCst);
            let mut done = 0u64;
            let mut last_report = Instant::now();
            for (p, n) in runs(&to_send) {
                let once = &sent_once;
                send_run(&mut c.main, mem, p, n, rate, false, sent, &|q| {
                    once[(q / 64) as usize] & (1 << (q % 64)) != 0
                })
                .map_err(io_err("sending pre-copy pages"))?;
                for q in p..p + n {
                    sent_once[(q / 64) as usize] |= 1 << (q % 64);
                }
                done += n;
                if last_report.elapsed() > Duration::from_millis(100) {
                    last_report = Instant::now();
                    let secs = t.elapsed().as_secs_f64().max(1e-6);
                    let bytes = sent.bytes.load(SeqCst) - b0;
                    status.update(|s| {
                        s.percent = done as f64 * 100.0 / total.max(1) as f64;
                        s.rate_mbps = bytes as f64 / secs / 1e6;
                        s.remaining_bytes = (total - done) * PAGE;
                    });
                    if Instant::now() >= deadline {
                        let _ = c.main.send_json(
                            Kind::Cancel,
                            &json!({"reason": "pre-copy did not converge before the deadline"}),
                        );
                        return Err(MigrationError::NotConverged(req.deadline_ms));
                    }
                }
            }
            rounds += 1;
            let secs = t.elapsed().as_secs_f64().max(1e-3);
            let bps = ((sent.bytes.load(SeqCst) - b0) as f64 / secs).max(1e6);
            let d = dirty_log(&ctx.vm, mem)?;
            for (m, w) in maybe.iter_mut().zip(&d) {
                *m |= w;
            }
            let dirty = popcount(&d);
            let eta_ms = (dirty * PAGE) as f64 / bps * 1e3;
            status.update(|s| {
                s.round = rounds;
                s.remaining_bytes = dirty * PAGE;
                s.rate_mbps = bps / 1e6;
            });
            to_send = d;
            if req.mode == MigrationMode::Hybrid
                && (rounds >= req.max_rounds.max(1)
                    || dirty as f64 >= prev_dirty as f64 * 0.9
                    || eta_ms <= req.downtime_limit_ms as f64)
            {
                postcopy = true;
                break;
            }
            if req.mode == MigrationMode::Precopy && eta_ms <= req.downtime_limit_ms as f64 {
                break;
            }
            if Instant::now() >= deadline {
                let _ = c.main.send_json(
                    Kind::Cancel,
                    &json!({"reason": "pre-copy did not converge before the deadline"}),
                );
                return Err(MigrationError::NotConverged(req.deadline_ms));
            }
            prev_dirty = dirty;
        }
    }
    // Switchover.
    status.update(|s| s.state = "switchover".into());
    let pause = Instant::now();
    // The operator's pause (if any) travels with the guest: it stays paused where it lands.
    let operator_paused = ctx.control.paused_by().contains(&PauseOwner::Operator);
    ctx.control.pause(PauseOwner::Migration);
    let now = mono_ns();
    let tails_us = ctx
        .control
        .cpus
        .iter()
        .map(|c| match c.last_hb_ns.load(SeqCst) {
            0 => None,
            t => Some(now.saturating_sub(t) / 1000),
        })
        .collect();
    let gaps_us = ctx
        .control
        .cpus
        .iter()
        .map(|c| c.max_gap_ns.load(SeqCst) / 1000)
        .collect();
    let heartbeats = ctx
        .control
        .cpus
        .iter()
        .map(|c| c.last_n.load(SeqCst))
        .collect();
    let before = |e| Ok(Switched::Before(e));
    let d = match dirty_log(&ctx.vm, mem) {
        Ok(d) => d,
        Err(e) => return before(e),
    };
    for (m, w) in maybe.iter_mut().zip(&d) {
        *m |= w;
    }
    let mut needed = Vec::new();
    if postcopy {
        // Dirty since sent, or never sent and maybe non-zero (round 0 skipped nothing in
        // pre-copy; in pure post-copy nothing was sent).
        needed = to_send
            .iter()
            .zip(&d)
            .zip(maybe.iter().zip(&sent_once))
            .map(|((t, d), (m, s))| t | d | (m & !s))
            .collect();
    } else {
        // The pages dirtied during the last round, and since.
        let last: Vec<u64> = to_send.iter().zip(&d).map(|(a, b)| a | b).collect();
        for (p, n) in runs(&last) {
            let once = &sent_once;
            if let Err(e) = send_run(&mut c.main, mem, p, n, rate, false, sent, &|q| {
                once[(q / 64) as usize] & (1 << (q % 64)) != 0
            }) {
                return before(io_err("sending the last dirty pages")(e));
            }
        }
    }
    let msr_list = &ctx.msr_list;
    let vcpus = match ctx.control.save_vcpus(msr_list, ctx.irqchip) {
        Ok(v) => v,
        Err(e) => return before(MigrationError::Save(e)),
    };
    let vm_state = match crate::vstate::VmState::save(&ctx.vm, ctx.irqchip) {
        Ok(v) => v,
        Err(e) => return before(MigrationError::State(e)),
    };
    let sw = Switch {
        postcopy,
        heartbeats,
        rounds,
        paused: operator_paused,
    };
    let r = (|| -> io::Result<()> {
        c.main.send_json(Kind::Switch, &sw)?;
        if postcopy {
            c.main.send(Kind::Needed, 0, &words_to_bytes(&needed))?;
        }
        Ok(())
    })();
    if let Err(e) = r {
        return before(io_err("sending the switchover")(e));
    }
    // After this frame the destination may run the guest: never resume it here.
    c.main
        .send(
            Kind::State,
            0,
            &crate::snapshot::state::encode(&vm_state, &vcpus),
        )
        .map_err(io_err("sending the vCPU state (the source stays paused)"))?;
    Ok(Switched::After(AfterSwitch {
        pause,
        postcopy,
        needed,
        maybe,
        rounds,
        setup_ms,
        tails_us,
        gaps_us,
    }))
}

/// What the post-copy threads share.
struct Post {
    mem: Arc<GuestMem>,
    pages: u64,
    /// Pages not yet claimed for sending.
    todo: Bits,
    /// Where the background pusher should go on (set after each request).
    hint: AtomicU64,
    /// Requests being answered (the pusher yields meanwhile).
    busy: AtomicUsize,
    rate: Arc<RateLimit>,
    sent: Arc<Sent>,
    lost: Mutex<Option<String>>,
    stop: AtomicBool,
    requests: AtomicU64,
    stride_pages: AtomicU64,
}

impl Post {
    fn lose(&self, why: String) {
        self.lost
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get_or_insert(why);
    }
    fn is_lost(&self) -> bool {
        self.lost
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_some()
    }
}

const NO_HINT: u64 = u64::MAX;

/// For sends already paid for.
static UNLIMITED: std::sync::LazyLock<RateLimit> = std::sync::LazyLock::new(|| RateLimit::new(0));

/// Kernel socket buffer of the main connection (each side), bytes.
pub(crate) const MAIN_BUFFER: usize = 128 << 10;

fn pusher(post: &Post, mut sock: Sock) {
    set_nice(5);
    let mut cursor = 0;
    while !post.stop.load(SeqCst) && !post.is_lost() {
        while post.busy.load(SeqCst) > 0 && !post.stop.load(SeqCst) {
            thread::yield_now();
        }
        if post.todo.next_set(cursor, post.pages).is_none() {
            return;
        }
        // Pay for the run before claiming its pages: a claimed page is on the wire at once,
        // never waiting for the link while a vCPU waits for it.
        post.rate.take((MAX_RUN * PAGE) as usize + 16, false);
        let h = post.hint.swap(NO_HINT, SeqCst);
        if h != NO_HINT {
            cursor = h;
        }
        let Some(p) = post.todo.next_set(cursor, post.pages) else {
            return;
        };
        let mut n = 0;
        while n < MAX_RUN && p + n < post.pages && post.todo.clear(p + n) {
            n += 1;
        }
        post.rate.refund(((MAX_RUN - n) * PAGE) as usize);
        if n == 0 {
            cursor = p + 1;
            continue;
        }
        if let Err(e) = send_run(
            &mut sock,
            &post.mem,
            p,
            n,
            &UNLIMITED,
            false,
            &post.sent,
            &|_| true,
        ) {
            post.lose(format!("background stream: {e}"));
            return;
        }
        cursor = p + n;
    }
}

/// Read requests from the priority connection into a channel (so that answering never waits
/// behind reading, and speculative pushes can stop the moment a request comes).
fn request_reader(post: &Post, mut rd: Sock, tx: Sender<u64>) {
    let _ = rd.set_read_timeout(Some(Duration::from_millis(100)));
    set_nice(-10);
    let mut buf = Vec::new();
    while !post.stop.load(SeqCst) && !post.is_lost() {
        let h = match rd.recv(&mut buf) {
            Ok(h) => h,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                continue;
            }
            Err(e) => {
                post.lose(format!("priority connection: {e}"));
                return;
            }
        };
        if h.kind != Kind::Request
            || buf.len() != 4
            || h.arg % PAGE != 0
            || h.arg / PAGE >= post.pages
        {
            post.lose(format!(
                "priority connection: bad {:?} frame (page {:#x})",
                h.kind, h.arg
            ));
            return;
        }
        post.busy.fetch_add(1, SeqCst);
        if tx.send(h.arg / PAGE).is_err() {
            return;
        }
    }
}

/// Answer requests on the priority connection: the page asked for at once; then, when the
/// recent requests show a stride, the next pages of that stride, a few at a time, stopping
/// whenever a new request comes; otherwise the background stream goes on right after the
/// page (locality).
fn priority(post: &Post, mut sock: Sock) {
    let rd = match sock.try_clone() {
        Ok(s) => s,
        Err(e) => {
            post.lose(format!("priority connection: {e}"));
            return;
        }
    };
    set_nice(-10);
    let (tx, rx) = mpsc::channel();
    thread::scope(|sc| {
        sc.spawn(|| request_reader(post, rd, tx));
        let mut history: Vec<u64> = Vec::with_capacity(16);
        const DEPTH: u64 = 4096;
        const CHUNK: u64 = 8;
        // (next page, stride, pages left) of the speculative push.
        let mut spec: Option<(u64, u64, u64)> = None;
        let mut ok = true;
        while ok && !post.stop.load(SeqCst) && !post.is_lost() {
            let req = if spec.is_some() {
                rx.try_recv().ok()
            } else {
                match rx.recv_timeout(Duration::from_millis(100)) {
                    Ok(p) => Some(p),
                    Err(RecvTimeoutError::Timeout) => continue,
                    Err(RecvTimeoutError::Disconnected) => break,
                }
            };
            if let Some(p) = req {
                post.requests.fetch_add(1, SeqCst);
                if post.todo.clear(p) {
                    ok = send_run(
                        &mut sock,
                        &post.mem,
                        p,
                        1,
                        &post.rate,
                        true,
                        &post.sent,
                        &|_| true,
                    )
                    .is_ok();
                }
                post.busy.fetch_sub(1, SeqCst);
                let stride = history.iter().rev().find_map(|&a| {
                    let s = p.checked_sub(a).filter(|&s| s > 1 && s <= 4096)?;
                    history.contains(&(p.checked_sub(2 * s)?)).then_some(s)
                });
                match stride {
                    Some(s) => spec = Some((p + s, s, DEPTH)),
                    None => post.hint.store((p + 1).min(post.pages - 1), SeqCst),
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
            let mut batch = Vec::new();
            while (batch.len() as u64) < CHUNK && left > 0 && next < post.pages {
                if post.todo.clear(next) {
                    batch.push(next);
                }
                next += s;
                left -= 1;
            }
            if !batch.is_empty() {
                ok = send_pages(&mut sock, &post.mem, &batch, &post.rate, &post.sent).is_ok();
                post.stride_pages.fetch_add(batch.len() as u64, SeqCst);
            }
            spec = (left > 0 && next < post.pages).then_some((next, s, left));
        }
        if !ok {
            post.lose("priority connection: send failed".into());
        }
    });
}

/// What the main connection's reader saw.
enum FromDest {
    Resumed,
    Done(Box<DestReport>),
    Error(String),
}

fn reader(mut sock: Sock, tx: Sender<FromDest>) {
    let mut buf = Vec::new();
    loop {
        let m = match sock.recv(&mut buf) {
            Ok(h) => match h.kind {
                Kind::Resumed => FromDest::Resumed,
                Kind::Done => match serde_json::from_slice::<DestReport>(&buf) {
                    Ok(r) => FromDest::Done(Box::new(r)),
                    Err(e) => FromDest::Error(format!("malformed Done: {e}")),
                },
                Kind::Error => FromDest::Error(format!(
                    "the destination failed: {}",
                    String::from_utf8_lossy(&buf)
                )),
                k => FromDest::Error(format!("unexpected {k:?} frame from the destination")),
            },
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => FromDest::Error(
                "the destination closed the connection (it exited, was killed, or the link dropped)"
                    .into(),
            ),
            Err(e) => FromDest::Error(format!("main connection: {e}")),
        };
        let last = !matches!(m, FromDest::Resumed);
        if tx.send(m).is_err() || last {
            return;
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn finish(
    ctx: &SourceCtx,
    req: &MigrateRequest,
    status: &Status,
    mut c: Conns,
    rate: Arc<RateLimit>,
    sent: Arc<Sent>,
    sw: AfterSwitch,
    resume_rx: &Receiver<Option<Endpoint>>,
    mut to: Endpoint,
    id: u64,
    t0: Instant,
) -> Result<serde_json::Value, MigrationError> {
    let pages = ctx.mem.size() / PAGE;
    let (rtx, rrx) = mpsc::channel();
    {
        let rd = c.main.try_clone().map_err(io_err("socket setup"))?;
        let tx = rtx.clone();
        thread::spawn(move || reader(rd, tx));
    }
    // The destination starts the vCPUs: that ends the downtime.
    let downtime = match rrx.recv_timeout(ANSWER_TIMEOUT) {
        Ok(FromDest::Resumed) => sw.pause.elapsed(),
        Ok(FromDest::Error(e)) => {
            return Err(MigrationError::Peer(format!(
                "{e}; after the state was sent: the source stays paused (PUT /vm/resume if the destination is not running the guest)"
            )));
        }
        Ok(FromDest::Done(_)) | Err(_) => {
            return Err(MigrationError::Protocol(
                "the destination did not report resuming; the source stays paused".into(),
            ));
        }
    };
    // The guest now runs at the destination.
    ctx.control.hand_over();
    ctx.notify.send(Notice::Migrated);
    let _ = set_dirty_log(&ctx.vm, &ctx.mem, false);
    status.update(|s| {
        s.state = if sw.postcopy {
            "postcopy"
        } else {
            "completing"
        }
        .into();
        s.percent = 0.0;
    });
    let post = Arc::new(Post {
        mem: ctx.mem.clone(),
        pages,
        todo: Bits::from_words(&sw.needed),
        hint: AtomicU64::new(NO_HINT),
        busy: AtomicUsize::new(0),
        rate,
        sent: sent.clone(),
        lost: Mutex::new(None),
        stop: AtomicBool::new(false),
        requests: AtomicU64::new(0),
        stride_pages: AtomicU64::new(0),
    });
    let total_needed = popcount(&sw.needed);
    let want_checksums = c.ack.want_checksums;
    let checksums = want_checksums
        .then(|| {
            ctx.slices
                .iter()
                .map(|&(s, l)| {
                    ctx.mem
                        .read(s, l as usize)
                        .map(|b| crate::guest::abi::checksum_bytes(&b))
                })
                .collect::<Result<Vec<_>, _>>()
        })
        .transpose()
        .map_err(MigrationError::GuestMemory)?;
    let end = End {
        downtime_us: downtime.as_micros() as u64,
        tails_us: sw.tails_us.clone(),
        gaps_us: sw.gaps_us.clone(),
        checksums,
    };
    let mut recoveries = 0u32;
    let mut rrx = rrx;
    let report = loop {
        // Serve until every page is sent, then say so and wait for the destination.
        let handles = if sw.postcopy {
            let (p1, p2) = (post.clone(), post.clone());
            let bg = c.main.try_clone().map_err(io_err("socket setup"))?;
            let pr = c.prio.try_clone().map_err(io_err("socket setup"))?;
            vec![
                thread::spawn(move || pusher(&p1, bg)),
                thread::spawn(move || priority(&p2, pr)),
            ]
        } else {
            Vec::new()
        };
        let mut last = Instant::now();
        let mut end_sent = false;
        let outcome = loop {
            if !end_sent && handles.first().is_none_or(|h| h.is_finished()) && !post.is_lost() {
                if let Err(e) = c.main.send_json(Kind::End, &end) {
                    post.lose(format!("sending End: {e}"));
                } else {
                    end_sent = true;
                }
            }
            if let Some(why) = post.lost.lock().unwrap_or_else(|e| e.into_inner()).clone() {
                break Err(why);
            }
            match rrx.recv_timeout(Duration::from_millis(20)) {
                Ok(FromDest::Done(r)) => break Ok(r),
                Ok(FromDest::Error(e)) => break Err(e),
                Ok(FromDest::Resumed) => {}
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => break Err("reader gone".into()),
            }
            if last.elapsed() > Duration::from_millis(100) {
                last = Instant::now();
                let left = post.todo.count();
                let secs = t0.elapsed().as_secs_f64();
                status.update(|s| {
                    s.percent = 100.0 - left as f64 * 100.0 / total_needed.max(1) as f64;
                    s.remaining_bytes = left * PAGE;
                    s.rate_mbps = sent.bytes.load(SeqCst) as f64 / secs / 1e6;
                });
            }
        };
        post.stop.store(true, SeqCst);
        for h in handles {
            let _ = h.join();
        }
        match outcome {
            Ok(r) => break r,
            Err(why) => {
                c.main.shutdown();
                c.prio.shutdown();
                if !sw.postcopy {
                    return Err(MigrationError::Peer(format!(
                        "{why} (after switchover: the source stays paused)"
                    )));
                }
                status.update(|s| {
                    s.state = "postcopy-paused".into();
                    s.error = Some(format!(
                        "link lost during post-copy: {why}. The guest runs at the destination; vCPUs that need missing pages wait. Reconnect with `faultline migrate --api-sock SOCK --resume [--to ENDPOINT]`"
                    ));
                });
                // Wait for --resume, then reconnect; the destination names what it lacks.
                loop {
                    let new_to = resume_rx.recv_timeout(RECOVER_WAIT).map_err(|_| {
                        MigrationError::Protocol(
                            "post-copy link lost and no --resume came; giving up".into(),
                        )
                    })?;
                    if let Some(t) = new_to {
                        to = t;
                    }
                    match reconnect(&to, id, req.mode, &post) {
                        Ok(nc) => {
                            c = nc;
                            break;
                        }
                        Err(e) => status.update(|s| {
                            s.error = Some(format!(
                                "resume failed: {}; try again with --resume",
                                uffd::error_chain(&e)
                            ))
                        }),
                    }
                }
                recoveries += 1;
                // Requests read but not answered died with the old connection; the destination
                // asks again for every page a vCPU still waits on.
                post.busy.store(0, SeqCst);
                *post.lost.lock().unwrap_or_else(|e| e.into_inner()) = None;
                post.stop.store(false, SeqCst);
                let (tx2, rx2) = mpsc::channel();
                let rd = c.main.try_clone().map_err(io_err("socket setup"))?;
                thread::spawn(move || reader(rd, tx2));
                rrx = rx2;
                status.update(|s| {
                    s.state = "postcopy".into();
                    s.error = None;
                });
            }
        }
    };
    // Digest of the frozen source memory, then the verdict.
    let mut digest = 0u64;
    let mut buf = Vec::new();
    for (p, n) in runs(&sw.maybe) {
        read_pages(&ctx.mem, p, n, &mut buf);
        for k in 0..n {
            digest = digest.wrapping_add(mix(
                p + k,
                page_hash(&buf[(k * PAGE) as usize..((k + 1) * PAGE) as usize]),
            ));
        }
    }
    let digest = format!("{digest:#018x}");
    let _ = c
        .main
        .send_json(Kind::Verdict, &json!({ "digest": digest }));
    let total_ms = t0.elapsed().as_secs_f64() * 1e3;
    let verified = digest == report.digest;
    let max_pause = max_pause_ms(&end, &report);
    let block: Vec<f64> = report.blocktime_ms.clone();
    let stats = json!({
        "role": "source",
        "mode": req.mode.name(),
        "converged": true,
        "total_ms": total_ms,
        "setup_ms": sw.setup_ms,
        "downtime_ms": downtime.as_secs_f64() * 1e3,
        "max_pause_ms": max_pause,
        "bytes": sent.bytes.load(SeqCst),
        "pages": sent.pages.load(SeqCst),
        "zero_pages": sent.zero_pages.load(SeqCst),
        "dirty_sync_rounds": sw.rounds,
        "nonzero_pages": popcount(&sw.maybe),
        "postcopy_pages": total_needed,
        "faults_requested": report.faults_requested,
        "requests_served": post.requests.load(SeqCst),
        "stride_pages": post.stride_pages.load(SeqCst),
        "fault_latency_us": report.fault_latency_us,
        "blocktime_ms": block.iter().sum::<f64>(),
        "blocktime_per_vcpu_ms": block,
        "recoveries": recoveries,
        "digest": digest,
        "digest_verified": verified,
        "destination": report,
    });
    if !verified {
        return Err(MigrationError::Integrity(format!(
            "the destination's memory digest {} differs from the source's {digest} at switchover",
            stats["destination"]["digest"]
        )));
    }
    Ok(stats)
}

fn reconnect(
    to: &Endpoint,
    id: u64,
    mode: MigrationMode,
    post: &Post,
) -> Result<Conns, MigrationError> {
    let mut c = connect(to, id, mode, None, false, true)?;
    let mut buf = Vec::new();
    c.main
        .set_read_timeout(Some(ANSWER_TIMEOUT))
        .map_err(io_err("socket setup"))?;
    let h = c.main.recv(&mut buf).map_err(io_err(
        "waiting for the destination's list of missing pages",
    ))?;
    c.main
        .set_read_timeout(None)
        .map_err(io_err("socket setup"))?;
    if h.kind != Kind::Recover {
        return Err(MigrationError::Protocol(format!(
            "expected Recover, got {:?}",
            h.kind
        )));
    }
    let w = super::bytes_to_words(&buf, post.pages)
        .ok_or_else(|| MigrationError::Protocol("Recover bitmap of the wrong size".into()))?;
    for (i, x) in w.iter().enumerate() {
        post.todo.0[i].store(*x, SeqCst);
    }
    post.hint.store(NO_HINT, SeqCst);
    Ok(c)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_split_at_gaps_and_max() {
        let mut bits = vec![0u64; 4];
        for p in [1u64, 2, 3, 70] {
            bits[(p / 64) as usize] |= 1 << (p % 64);
        }
        for p in 128..256u64 {
            bits[(p / 64) as usize] |= 1 << (p % 64);
        }
        let r: Vec<_> = runs(&bits).collect();
        assert_eq!(r, vec![(1, 3), (70, 1), (128, 64), (192, 64)]);
    }
}
