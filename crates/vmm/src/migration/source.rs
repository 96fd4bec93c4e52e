//! The sending side: runs on its own thread, started by `PUT /migrate`. Pages move with
//! `xfer` (pre-copy rounds over KVM's dirty log, the post-copy push); this file keeps what is
//! the VM's: the pause, the switchover frames, the vCPU state, the heartbeat records.

use std::sync::Arc;
use std::sync::atomic::Ordering::SeqCst;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::thread;
use std::time::{Duration, Instant};

use kvm_ioctls::VmFd;
use serde_json::json;
use xfer::bitmap::{popcount, runs};
use xfer::digest::{mix, page_hash};
use xfer::precopy::{Precopy, RoundError};
use xfer::proto::{self, Channel, Hello};
use xfer::push::{Push, PushConfig, Sent};
use xfer::reader::PageReader;
use xfer::tls::Security;
use xfer::wire::{Beat, Keepalive, Kind, PAGE, RateLimit, RecvError, Sock, Stalled};

use super::guest_io::{GuestReader, KvmDirtyLog, kvm_touched_pages, scan};
use super::{
    DestReport, End, Endpoint, LinkLost, MigrateRequest, MigrationError, MigrationMode, State,
    Status, Switch, Verdict, io_err, max_pause_ms, peer_text,
};
use crate::config::VmConfig;
use crate::memory::GuestMem;
use crate::vstate::control::mono_ns;
use crate::vstate::{DeviceSet, Notice, Notifier, PauseOwner, VcpuControl};

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
    /// The VM's own devices: frozen at switchover, their records in the State frame, the
    /// pages they write merged into the dirty set.
    pub(crate) devices: DeviceSet,
    /// The connections' security (checked when the request came).
    pub(crate) security: Security,
}

/// How long to wait for the destination to answer a hello, or to resume after the state.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a source in `postcopy-paused` waits for `--resume` before giving up.
const RECOVER_WAIT: Duration = Duration::from_secs(3600);
/// How often progress is published.
const PROGRESS: Duration = Duration::from_millis(100);

/// Run a migration to its end; the status says how it went.
pub fn run(
    ctx: SourceCtx,
    req: MigrateRequest,
    status: Status,
    resume_rx: Receiver<Option<Endpoint>>,
) {
    let t0 = Instant::now();
    tracing::info!(mode = req.mode.name(), to = ?req.to, "migration started");
    let r = migrate(&ctx, &req, &status, &resume_rx, t0);
    match &r {
        Ok(_) => tracing::info!(
            ms = t0.elapsed().as_millis() as u64,
            "migration completed: the guest runs at the destination"
        ),
        Err(e) => tracing::warn!("migration failed: {}", uffd::error_chain(e)),
    }
    let end = match r {
        Ok(stats) => status.go_with(State::Completed, |s| {
            s.percent = 100.0;
            s.remaining_bytes = 0;
            s.error = None;
            s.stats = Some(stats);
        }),
        Err(MigrationError::NotConverged(ms)) => status.go_with(State::Cancelled, |s| {
            s.error = Some(MigrationError::NotConverged(ms).to_string());
            s.stats = Some(json!({
                "role": "source",
                "mode": req.mode.name(),
                "converged": false,
                "total_ms": t0.elapsed().as_secs_f64() * 1e3,
                "rounds": s.round,
            }));
        }),
        Err(e) => status.go_with(State::Failed, |s| s.error = Some(uffd::error_chain(&e))),
    };
    if let Err(e) = end {
        let e = MigrationError::Transition(e);
        let _ = status.go_with(State::Failed, |s| s.error = Some(uffd::error_chain(&e)));
    }
}

/// The two connections and what the destination asked for.
struct Conns {
    main: Sock,
    prio: Sock,
    want_checksums: bool,
    /// Keepalives agreed with the destination (`None`: an older destination).
    keepalive: Option<Keepalive>,
    /// CRC32C trailers on frames that carry memory or state.
    crc: bool,
}

fn connect(
    to: &Endpoint,
    sec: &Security,
    id: u64,
    mode: MigrationMode,
    cfg: Option<&VmConfig>,
    irqchip: bool,
    resume: bool,
) -> Result<Conns, MigrationError> {
    let config = cfg
        .map(serde_json::to_value)
        .transpose()
        .map_err(|source| MigrationError::Json {
            what: "VM configuration",
            source,
        })?;
    let mut h = Hello::new(id, mode, resume, config);
    h.irqchip = irqchip;
    let (main, prio, ack) =
        proto::connect_pair(to, sec, &h, ANSWER_TIMEOUT).map_err(MigrationError::Handshake)?;
    Ok(Conns {
        main,
        prio,
        want_checksums: ack.want_checksums,
        keepalive: ack.keepalive(),
        crc: ack.crc32c,
    })
}

/// What a migration moves pages with.
struct Pipes {
    reader: Arc<dyn PageReader>,
    rate: Arc<RateLimit>,
    sent: Arc<Sent>,
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
    let mut c = connect(
        &to,
        &ctx.security,
        id,
        req.mode,
        Some(&ctx.cfg),
        ctx.irqchip,
        false,
    )?;
    let pipes = Pipes {
        reader: Arc::new(GuestReader::new(ctx.mem.clone())),
        rate: Arc::new(RateLimit::new(req.max_bandwidth)),
        sent: Arc::new(Sent::default()),
    };
    let mut log = KvmDirtyLog::start(ctx.vm.clone(), ctx.mem.clone(), ctx.devices.clone())?;
    let r = (|| {
        ctx.control.reset_gaps();
        let maybe = scan(&ctx.mem, &*pipes.reader).map_err(MigrationError::Read)?;
        let setup_ms = t0.elapsed().as_secs_f64() * 1e3;
        let mut pc = Precopy::new(
            pipes.reader.clone(),
            maybe,
            pipes.rate.clone(),
            pipes.sent.clone(),
        );
        pc.set_crc(c.crc);
        precopy_then_switch(ctx, req, status, &mut c, &mut log, pc, &pipes, setup_ms, t0)
    })();
    let out = match r {
        Ok(Switched::Before(e)) | Err(e) => {
            // The guest never left: it runs on here.
            log.stop();
            ctx.devices.thaw();
            ctx.control.resume(PauseOwner::Migration);
            return Err(peer_reason(&mut c.main, e));
        }
        Ok(Switched::Unsure(e)) => {
            // The state may have reached the destination: the guest must not run twice.
            log.stop();
            status.update(|s| s.in_doubt = true);
            return Err(e);
        }
        Ok(Switched::After(out)) => out,
    };
    match finish(
        ctx, req, status, c, &log, &pipes, out, resume_rx, to, id, t0,
    ) {
        Err(e @ MigrationError::Refused(_)) => {
            // The destination said it did not start the guest: it runs on here.
            log.stop();
            ctx.devices.thaw();
            ctx.control.resume(PauseOwner::Migration);
            Err(e)
        }
        Err(e) if !ctx.control.handed_over() => {
            // The destination had the state and never said it runs the guest, nor that it
            // does not: the guest may run there. It stays paused here until the operator
            // decides (`PUT /migrate/reclaim`), and no other migration starts.
            log.stop();
            status.update(|s| s.in_doubt = true);
            Err(e)
        }
        r => r,
    }
}

/// The digest of the pages of `maybe` (the source's frozen memory), keeping `keep` alive
/// meanwhile (called every run: keepalives on a quiet connection).
fn memory_digest(
    reader: &dyn PageReader,
    maybe: &[u64],
    mut keep: impl FnMut(),
) -> Result<u64, MigrationError> {
    let mut digest = 0u64;
    let mut buf = Vec::new();
    for (p, n) in runs(maybe) {
        keep();
        // Grown once to the longest run, never re-zeroed.
        let len = (n * PAGE) as usize;
        if buf.len() < len {
            buf.resize(len, 0);
        }
        let run = &mut buf[..len];
        reader.read(p, run).map_err(MigrationError::Read)?;
        for (k, pg) in run.chunks_exact(PAGE as usize).enumerate() {
            digest = digest.wrapping_add(mix(p + k as u64, page_hash(pg)));
        }
    }
    Ok(digest)
}

/// Before switchover the destination says nothing on the main connection unless it gives
/// up: when sending failed, its `Error` frame (if one came) says why, better than a broken
/// pipe.
fn peer_reason(main: &mut Sock, e: MigrationError) -> MigrationError {
    if matches!(e, MigrationError::NotConverged(_))
        || !main.poll_readable(PROGRESS).unwrap_or(false)
    {
        return e;
    }
    let _ = main.set_read_timeout(Some(PROGRESS));
    let mut buf = Vec::new();
    match main.recv(&mut buf) {
        Ok(h) if h.kind == Kind::Error => MigrationError::Peer(format!(
            "{} (here: {})",
            peer_text(&buf),
            uffd::error_chain(&e)
        )),
        _ => e,
    }
}

/// Where the switchover left things.
struct AfterSwitch {
    /// The pause, host `CLOCK_MONOTONIC` µs.
    pause_mono_us: u64,
    /// Per vCPU, its last heartbeats before the pause: `[number, CLOCK_MONOTONIC µs]`.
    beats_mono_us: Vec<Vec<[u64; 2]>>,
    pause: Instant,
    /// Pre-copy: the source's memory digest, computed at switchover.
    digest: Option<u64>,
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
    /// Sending the state failed: the destination may have it; the source stays paused.
    Unsure(MigrationError),
    After(AfterSwitch),
}

/// How a watched round ended badly.
enum RoundEnd {
    /// The deadline passed during the round (the connection was shut down to stop it).
    Expired,
    Failed(RoundError),
}

/// One pre-copy round, with progress published and the deadline watched meanwhile: when it
/// passes, the main connection is shut down, which ends the round at once.
fn watched_round(
    pc: &mut Precopy,
    main: &mut Sock,
    to_send: &[u64],
    status: &Status,
    sent: &Sent,
    deadline: Instant,
) -> Result<(), MigrationError> {
    let total = popcount(to_send);
    let killer = main.try_clone().map_err(io_err("socket setup"))?;
    let pages = || sent.pages.load(SeqCst) + sent.zero_pages.load(SeqCst);
    let (p0, b0, t) = (pages(), sent.bytes.load(SeqCst), Instant::now());
    let (tx, rx) = mpsc::channel::<()>();
    let r = thread::scope(|sc| {
        let watch = sc.spawn(move || {
            loop {
                match rx.recv_timeout(PROGRESS) {
                    Err(RecvTimeoutError::Timeout) => {}
                    _ => return false,
                }
                let done = (pages() - p0).min(total);
                let secs = t.elapsed().as_secs_f64().max(1e-6);
                let all = sent.bytes.load(SeqCst);
                let bytes = all - b0;
                status.update(|s| {
                    s.bytes_sent = all;
                    s.percent = done as f64 * 100.0 / total.max(1) as f64;
                    s.rate_mbps = bytes as f64 / secs / 1e6;
                    s.remaining_bytes = (total - done) * PAGE;
                });
                if Instant::now() >= deadline {
                    killer.shutdown();
                    return true;
                }
            }
        });
        let r = pc.round(main, to_send);
        drop(tx);
        let expired = watch.join().unwrap_or(false);
        match r {
            Err(_) if expired => Err(RoundEnd::Expired),
            Err(e) => Err(RoundEnd::Failed(e)),
            Ok(_) => Ok(()),
        }
    });
    match r {
        Ok(()) => Ok(()),
        Err(RoundEnd::Expired) => Err(MigrationError::NotConverged(0)),
        Err(RoundEnd::Failed(e)) => Err(MigrationError::Round(e)),
    }
}

fn cancel(main: &mut Sock) {
    let _ = main.send_json(
        Kind::Cancel,
        &json!({"reason": "pre-copy did not converge before the deadline"}),
    );
}

#[allow(clippy::too_many_arguments)]
fn precopy_then_switch(
    ctx: &SourceCtx,
    req: &MigrateRequest,
    status: &Status,
    c: &mut Conns,
    log: &mut KvmDirtyLog,
    mut pc: Precopy,
    pipes: &Pipes,
    setup_ms: f64,
    t0: Instant,
) -> Result<Switched, MigrationError> {
    let sent = &pipes.sent;
    let mut rounds = 0u32;
    let mut postcopy = req.mode == MigrationMode::Postcopy;
    let mut to_send = pc.maybe().to_vec();
    let deadline = t0 + Duration::from_millis(req.deadline_ms);
    let mut prev_dirty = u64::MAX;
    if !postcopy {
        status
            .go(State::Precopy)
            .map_err(MigrationError::Transition)?;
        loop {
            status.update(|s| s.round = rounds);
            let t = Instant::now();
            let b0 = sent.bytes.load(SeqCst);
            match watched_round(&mut pc, &mut c.main, &to_send, status, sent, deadline) {
                Err(MigrationError::NotConverged(_)) => {
                    return Err(MigrationError::NotConverged(req.deadline_ms));
                }
                r => r?,
            }
            rounds += 1;
            let secs = t.elapsed().as_secs_f64().max(1e-3);
            let bps = ((sent.bytes.load(SeqCst) - b0) as f64 / secs).max(1e6);
            let d = pc.dirty(log).map_err(MigrationError::DirtyLog)?;
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
                cancel(&mut c.main);
                return Err(MigrationError::NotConverged(req.deadline_ms));
            }
            prev_dirty = dirty;
        }
    }
    // Switchover.
    status
        .go(State::Switchover)
        .map_err(MigrationError::Transition)?;
    let pause = Instant::now();
    // The operator's pause (if any) travels with the guest: it stays paused where it lands.
    let operator_paused = ctx.control.paused_by().contains(&PauseOwner::Operator);
    ctx.control.pause(PauseOwner::Migration);
    let step = |what: &str| {
        tracing::debug!(
            us = pause.elapsed().as_micros() as u64,
            "switchover: {what}"
        );
    };
    step("vCPUs paused");
    let now = mono_ns();
    let cpus = &ctx.control.cpus;
    let tails_us = cpus
        .iter()
        .map(|c| match c.last_hb_ns.load(SeqCst) {
            0 => None,
            t => Some(now.saturating_sub(t) / 1000),
        })
        .collect();
    let gaps_us = cpus
        .iter()
        .map(|c| c.max_gap_ns.load(SeqCst) / 1000)
        .collect();
    let heartbeats = cpus.iter().map(|c| c.last_n.load(SeqCst)).collect();
    // The last heartbeats before the pause, for a report's timeline.
    let beats_mono_us: Vec<Vec<[u64; 2]>> = cpus
        .iter()
        .map(|c| {
            c.beats
                .lock()
                .map(|b| {
                    b.last
                        .iter()
                        .map(|&(n, ns)| [u64::from(n), ns / 1000])
                        .collect()
                })
                .unwrap_or_default()
        })
        .collect();
    let pause_mono_us = now / 1000;
    // The devices finish what they hold and stop: what they wrote is in the last dirty set,
    // and nothing changes guest memory from here on.
    let before = |e| Ok(Switched::Before(e));
    if let Err(e) = ctx.devices.freeze() {
        return before(MigrationError::Devices(e));
    }
    step("devices frozen");
    super::failpoint::hold("source-switchover");
    let d = match pc.dirty(log) {
        Ok(d) => d,
        Err(e) => return before(MigrationError::DirtyLog(e)),
    };
    let mut needed = if postcopy {
        // Dirty since sent, or never sent and maybe non-zero.
        pc.needed(&to_send, &d)
    } else {
        // The pages dirtied during the last round, and since.
        let last: Vec<u64> = to_send.iter().zip(&d).map(|(a, b)| a | b).collect();
        if let Err(e) = pc.round(&mut c.main, &last) {
            return before(MigrationError::Round(e));
        }
        Vec::new()
    };
    step("last dirty pages sent");
    let vcpus = match ctx.control.save_vcpus(&ctx.msr_list, ctx.irqchip) {
        Ok(v) => v,
        Err(e) => return before(MigrationError::Save(e)),
    };
    step("vCPUs saved");
    let mut vm_state = match crate::vstate::VmState::save(&ctx.vm, ctx.irqchip) {
        Ok(v) => v,
        Err(e) => return before(MigrationError::State(e)),
    };
    vm_state.devices = match ctx.devices.save() {
        Ok(d) => d,
        Err(e) => return before(MigrationError::Devices(e)),
    };
    if postcopy {
        // The pages KVM touches when the destination restores the vCPUs go now, before the
        // switch: the destination could not ask for them in time.
        let pinned = kvm_touched_pages(&vcpus, pipes.reader.pages());
        if pinned.iter().any(|w| *w != 0) {
            if let Err(e) = pc.round(&mut c.main, &pinned) {
                return before(MigrationError::Round(e));
            }
            for (n, p) in needed.iter_mut().zip(&pinned) {
                *n &= !p;
            }
        }
    }
    // Pre-copy: the destination checks memory against this before it starts the guest.
    let digest = if postcopy {
        None
    } else {
        match memory_digest(&*pipes.reader, pc.maybe(), || {}) {
            Ok(d) => Some(d),
            Err(e) => return before(e),
        }
    };
    step("state taken, digest computed");
    let sw = Switch {
        postcopy,
        heartbeats,
        rounds,
        paused: operator_paused,
        digest,
    };
    let body = match serde_json::to_vec(&sw) {
        Ok(b) => b,
        Err(source) => {
            return before(MigrationError::Json {
                what: "Switch frame",
                source,
            });
        }
    };
    if let Err(e) = c.main.send_crc(Kind::Switch, 0, &body, c.crc) {
        return before(io_err("sending the switchover")(e));
    }
    if postcopy
        && let Err(e) = c.main.send_crc(
            Kind::Needed,
            0,
            &xfer::bitmap::words_to_bytes(&needed),
            c.crc,
        )
    {
        return before(io_err("sending the bitmap of needed pages")(e));
    }
    // After this frame the destination may run the guest: never resume it here (unless it
    // says it did not start it).
    if let Err(e) = c.main.send_crc(
        Kind::State,
        0,
        &crate::snapshot::state::encode(&vm_state, &vcpus),
        c.crc,
    ) {
        return Ok(Switched::Unsure(io_err(
            "sending the vCPU state (the source stays paused)",
        )(e)));
    }
    Ok(Switched::After(AfterSwitch {
        pause,
        pause_mono_us,
        beats_mono_us,
        digest,
        postcopy,
        needed,
        maybe: pc.maybe().to_vec(),
        rounds,
        setup_ms,
        tails_us,
        gaps_us,
    }))
}

/// What the main connection's reader saw.
enum FromDest {
    Resumed,
    /// The destination failed before starting the guest, and says so.
    Refused(String),
    Done(Box<DestReport>),
    Lost(LinkLost),
}

/// Read the destination's frames on the main connection (on a clone) into a channel. With
/// keepalives, once the destination has said something (`Resumed`), silence for the
/// deadline is a lost link (waits with `poll`; the socket's read deadline catches a frame
/// that stops half-way).
fn spawn_reader(main: &Sock, ka: Option<Keepalive>) -> Result<Receiver<FromDest>, MigrationError> {
    let mut sock = main.try_clone().map_err(io_err("socket setup"))?;
    if let Some(k) = ka {
        sock.set_read_timeout(Some(k.deadline))
            .map_err(io_err("socket setup"))?;
    }
    let (tx, rx) = mpsc::channel();
    thread::Builder::new()
        .name("migration-rd".into())
        .spawn(move || {
            let mut buf = Vec::new();
            let mut heard: Option<Instant> = None;
            loop {
                match sock.poll_readable(PROGRESS) {
                    Ok(true) => heard = Some(Instant::now()),
                    Ok(false) => {
                        let silent = ka.zip(heard).filter(|(k, h)| h.elapsed() >= k.deadline);
                        if let Some((k, _)) = silent {
                            let e = RecvError::Io(Stalled::Silent(k.deadline).into_io());
                            let _ = tx.send(FromDest::Lost(LinkLost::recv(Channel::Main, e)));
                            return;
                        }
                        continue;
                    }
                    Err(e) => {
                        let e = LinkLost::recv(Channel::Main, RecvError::Io(e));
                        let _ = tx.send(FromDest::Lost(e));
                        return;
                    }
                }
                let m = match sock.recv(&mut buf) {
                    Ok(h) => match h.kind {
                        Kind::Resumed => FromDest::Resumed,
                        Kind::Keepalive => continue,
                        Kind::Done => match serde_json::from_slice::<DestReport>(&buf) {
                            Ok(r) => FromDest::Done(Box::new(r)),
                            Err(e) => FromDest::Lost(LinkLost::Malformed(Kind::Done, e)),
                        },
                        Kind::Error if super::peer_not_started(&buf) => {
                            FromDest::Refused(peer_text(&buf))
                        }
                        Kind::Error => FromDest::Lost(LinkLost::Peer(peer_text(&buf))),
                        k => FromDest::Lost(LinkLost::Protocol(format!(
                            "unexpected {k:?} frame from the destination"
                        ))),
                    },
                    Err(e) => FromDest::Lost(LinkLost::recv(Channel::Main, e)),
                };
                let last = !matches!(m, FromDest::Resumed);
                if tx.send(m).is_err() || last {
                    return;
                }
            }
        })
        .map_err(io_err("starting the connection reader"))?;
    Ok(rx)
}

#[allow(clippy::too_many_arguments)]
fn finish(
    ctx: &SourceCtx,
    req: &MigrateRequest,
    status: &Status,
    mut c: Conns,
    log: &KvmDirtyLog,
    pipes: &Pipes,
    sw: AfterSwitch,
    resume_rx: &Receiver<Option<Endpoint>>,
    mut to: Endpoint,
    id: u64,
    t0: Instant,
) -> Result<serde_json::Value, MigrationError> {
    let pages = pipes.reader.pages();
    let mut rrx = spawn_reader(&c.main, c.keepalive)?;
    // The destination starts the vCPUs: that ends the downtime.
    let downtime = match rrx.recv_timeout(ANSWER_TIMEOUT) {
        Ok(FromDest::Resumed) => sw.pause.elapsed(),
        Ok(FromDest::Refused(why)) => return Err(MigrationError::Refused(why)),
        Ok(FromDest::Lost(e)) => return Err(MigrationError::AfterSwitchover(e)),
        Ok(FromDest::Done(_)) | Err(_) => {
            return Err(MigrationError::AfterSwitchover(LinkLost::Protocol(
                "the destination did not report resuming".into(),
            )));
        }
    };
    // The guest now runs at the destination.
    ctx.control.hand_over();
    ctx.notify.send(Notice::Migrated);
    log.stop();
    if sw.postcopy {
        status
            .go_with(State::Postcopy, |s| s.percent = 0.0)
            .map_err(MigrationError::Transition)?;
    }
    let mut push = sw.postcopy.then(|| {
        Push::new(
            pipes.reader.clone(),
            &sw.needed,
            pipes.rate.clone(),
            pipes.sent.clone(),
            PushConfig {
                keepalive: c.keepalive,
                crc: c.crc,
                ..PushConfig::default()
            },
        )
    });
    let total_needed = popcount(&sw.needed);
    let checksums = c
        .want_checksums
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
    let report = loop {
        // Serve until every page is sent, then say so and wait for the destination.
        if let Some(p) = push.as_mut() {
            p.start(&c.main, &c.prio).map_err(MigrationError::Push)?;
        }
        let outcome = serve(
            &mut c,
            push.as_ref(),
            &rrx,
            &end,
            status,
            pipes,
            total_needed,
            t0,
        );
        let why = match outcome {
            Ok(r) => break r,
            Err(why) => why,
        };
        // Wake threads blocked on the dead link, then stop them.
        c.main.shutdown();
        c.prio.shutdown();
        let Some(p) = push.as_mut() else {
            return Err(MigrationError::AfterSwitchover(why));
        };
        p.stop();
        status
            .go_with(State::PostcopyPaused, |s| {
                s.error = Some(format!(
                    "link lost during post-copy: {}. The guest runs at the destination; vCPUs that need missing pages wait. Reconnect with `faultline migrate --api-sock SOCK --resume [--to ENDPOINT]`",
                    uffd::error_chain(&why)
                ));
            })
            .map_err(MigrationError::Transition)?;
        // Wait for --resume, then reconnect; the destination names what it lacks.
        loop {
            let new_to = resume_rx
                .recv_timeout(RECOVER_WAIT)
                .map_err(|_| MigrationError::NoResume(RECOVER_WAIT))?;
            // The controller moved to `resuming` already; staying there is legal.
            status
                .go(State::Resuming)
                .map_err(MigrationError::Transition)?;
            if let Some(t) = new_to {
                to = t;
            }
            // A new endpoint gets the same credentials (and the same rule on plain TCP).
            let sec = match to.security(req.tls.as_ref(), req.insecure) {
                Ok(s) => s,
                Err(e) => {
                    status
                        .go_with(State::PostcopyPaused, |s| {
                            s.error = Some(uffd::error_chain(&MigrationError::Security(e)))
                        })
                        .map_err(MigrationError::Transition)?;
                    continue;
                }
            };
            match reconnect(&to, &sec, id, req.mode, pages) {
                Ok((nc, missing)) => {
                    // Requests read but not answered died with the old connection; the
                    // destination asks again for every page a vCPU still waits on.
                    p.recover(&missing).map_err(MigrationError::Push)?;
                    c = nc;
                    break;
                }
                Err(e) => status
                    .go_with(State::PostcopyPaused, |s| {
                        s.error = Some(format!(
                            "resume failed: {}; try again with --resume",
                            uffd::error_chain(&e)
                        ))
                    })
                    .map_err(MigrationError::Transition)?,
            }
        }
        recoveries += 1;
        rrx = spawn_reader(&c.main, c.keepalive)?;
        status
            .go_with(State::Postcopy, |s| s.error = None)
            .map_err(MigrationError::Transition)?;
    };
    let (push_stats, hops) = push
        .as_mut()
        .map(|p| {
            p.stop();
            (p.stats(), p.hop_stamps())
        })
        .unwrap_or_default();
    // Digest of the frozen source memory (pre-copy: taken at switchover), then the verdict.
    let digest = match sw.digest {
        Some(d) => d,
        None => {
            // The destination waits for the verdict meanwhile: keep both connections alive
            // (the responder has stopped).
            let (mut beat, mut prio_beat) = (Beat::new(c.keepalive), Beat::new(c.keepalive));
            let (main, prio) = (&mut c.main, &mut c.prio);
            memory_digest(&*pipes.reader, &sw.maybe, || {
                let _ = beat.tick(main);
                let _ = prio_beat.tick(prio);
            })?
        }
    };
    super::failpoint::hold("source-verdict");
    let _ = c.main.send_json(Kind::Verdict, &Verdict { digest });
    let total_ms = t0.elapsed().as_secs_f64() * 1e3;
    let verified = digest == report.digest;
    let max_pause = max_pause_ms(&end, &report);
    let block: Vec<f64> = report.blocktime_ms.clone();
    let sent = &pipes.sent;
    let hex = |d: u64| format!("{d:#018x}");
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
        "requests_served": push_stats.requests,
        "stride_pages": push_stats.stride_pages,
        "fault_latency_us": report.fault_latency_us,
        "latency_log2_us": report.latency_log2_us,
        "blocktime_ms": block.iter().sum::<f64>(),
        "blocktime_per_vcpu_ms": block,
        "recoveries": recoveries,
        "pause_mono_us": sw.pause_mono_us,
        "beats_mono_us": sw.beats_mono_us,
        "resent_pages": push_stats.resent,
        "digest": hex(digest),
        "digest_verified": verified,
        "destination": report,
    });
    let mut stats = stats;
    if !hops.is_empty() {
        // `FAULTLINE_BREAKDOWN=1`: each answer's hop stamps (`xfer::hops`).
        stats["hops_source"] = json!(hops);
    }
    if !verified {
        return Err(MigrationError::Integrity(format!(
            "the destination's memory digest {} differs from the source's {} at switchover",
            hex(report.digest),
            hex(digest)
        )));
    }
    Ok(stats)
}

/// Serve one connection pair until the destination reports every page in (`Done`), or the
/// link is lost.
#[allow(clippy::too_many_arguments)]
fn serve(
    c: &mut Conns,
    push: Option<&Push>,
    rrx: &Receiver<FromDest>,
    end: &End,
    status: &Status,
    pipes: &Pipes,
    total_needed: u64,
    t0: Instant,
) -> Result<Box<DestReport>, LinkLost> {
    let mut last = Instant::now();
    let mut end_sent: Option<Instant> = None;
    // Keepalives on the main connection once the pusher is done with it, and on the
    // priority connection when no responder runs (pre-copy).
    let mut main_beat = Beat::new(c.keepalive);
    let mut prio_beat = Beat::new(c.keepalive);
    loop {
        if let Some(p) = push
            && p.is_lost()
        {
            return Err(p.take_lost().map_or_else(
                || LinkLost::Protocol("the post-copy push lost its link".into()),
                LinkLost::Push,
            ));
        }
        let main_free = push.is_none_or(|p| p.background_done());
        if end_sent.is_none() && main_free {
            c.main
                .send_json(Kind::End, end)
                .map_err(|e| LinkLost::Send(Kind::End, e))?;
            main_beat.sent();
            end_sent = Some(Instant::now());
        }
        if main_free {
            main_beat
                .tick(&mut c.main)
                .map_err(|e| LinkLost::Send(Kind::Keepalive, e))?;
        }
        if push.is_none() {
            prio_beat
                .tick(&mut c.prio)
                .map_err(|e| LinkLost::Send(Kind::Keepalive, e))?;
        }
        if let Some(t) = end_sent
            && t.elapsed() > ANSWER_TIMEOUT
        {
            return Err(LinkLost::Protocol(format!(
                "every page was sent but the destination did not report them in (Done) within {ANSWER_TIMEOUT:?}"
            )));
        }
        match rrx.recv_timeout(Duration::from_millis(20)) {
            Ok(FromDest::Done(r)) => return Ok(r),
            Ok(FromDest::Lost(e)) => return Err(e),
            Ok(FromDest::Refused(why)) => return Err(LinkLost::Peer(why)),
            Ok(FromDest::Resumed) | Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => {
                return Err(LinkLost::Protocol("the connection reader is gone".into()));
            }
        }
        if last.elapsed() > PROGRESS {
            last = Instant::now();
            let left = push.map_or(0, |p| p.remaining());
            let secs = t0.elapsed().as_secs_f64();
            let bytes = pipes.sent.bytes.load(SeqCst);
            let priority = push.map_or(0, |p| {
                let st = p.stats();
                st.requests + st.stride_pages
            });
            status.update(|s| {
                s.bytes_sent = bytes;
                s.priority_pages = priority;
                s.percent = 100.0 - left as f64 * 100.0 / total_needed.max(1) as f64;
                s.remaining_bytes = left * PAGE;
                s.rate_mbps = bytes as f64 / secs / 1e6;
            });
        }
    }
}

/// Reconnect after a lost post-copy link: a resume hello on both connections, then the
/// destination's `Recover` bitmap (the pages it still needs).
fn reconnect(
    to: &Endpoint,
    sec: &Security,
    id: u64,
    mode: MigrationMode,
    pages: u64,
) -> Result<(Conns, Vec<u64>), MigrationError> {
    let mut c = connect(to, sec, id, mode, None, false, true)?;
    c.main
        .set_read_timeout(Some(ANSWER_TIMEOUT))
        .map_err(io_err("socket setup"))?;
    let missing = xfer::push::read_recover(&mut c.main, pages).map_err(MigrationError::Push)?;
    c.main
        .set_read_timeout(None)
        .map_err(io_err("socket setup"))?;
    Ok((c, missing))
}
