//! The destination after switchover: the guest runs; `xfer`'s receivers install the pages
//! still at the source into the `memx` fault loop; this thread watches them, answers `End`
//! with `Done`, checks the source's `Verdict`, and waits for the source to reconnect when the
//! link is lost during post-copy.

use std::sync::Arc;
use std::sync::atomic::Ordering::SeqCst;
use std::sync::mpsc::{self, RecvTimeoutError};
use std::time::{Duration, Instant};

use memx::FaultLoop;
use serde_json::json;
use xfer::proto::{self, Channel};
use xfer::pull::{Event, Pull};
use xfer::wire::{Beat, Keepalive, Kind, Listener, PAGE, Sock};

use super::{
    DestReport, End, Latency, LinkLost, MigrationError, State, Status, fail, io_err, max_pause_ms,
    parse_verdict, peer_text, pull_err,
};
use crate::vstate::{Failure, Notifier, VcpuControl};

/// The destination's post-switchover thread.
pub(crate) struct Supervisor {
    pub(crate) pull: Pull,
    /// Post-copy: the loop serving the guest's faults, until every page is in.
    pub(crate) fault_loop: Option<FaultLoop>,
    /// The fault loop's counters once it stopped.
    pub(crate) loop_stats: Option<memx::Stats>,
    pub(crate) control: Arc<VcpuControl>,
    pub(crate) notify: Notifier,
    pub(crate) status: Status,
    pub(crate) resume_ns: u64,
    pub(crate) switch_t: Instant,
    pub(crate) id: u64,
    pub(crate) recover_timeout: Duration,
    /// Who may reconnect (the same rule as the first connection).
    pub(crate) security: xfer::tls::Security,
    /// Keepalives agreed with the source (`None`: an older source).
    pub(crate) keepalive: Option<Keepalive>,
    /// Bytes received before switchover.
    pub(crate) bytes: u64,
    pub(crate) rounds: u32,
    pub(crate) recoveries: u32,
}

/// How long to wait for each vCPU's first heartbeat here before reporting.
const HEADS_WAIT: Duration = Duration::from_secs(2);

/// How long to wait for the source's verdict after reporting every page in.
const VERDICT_WAIT: Duration = Duration::from_secs(60);

fn protocol(s: impl Into<String>) -> MigrationError {
    MigrationError::Protocol(s.into())
}

impl Supervisor {
    pub(crate) fn run(mut self, main: Sock, prio: Sock, listener: Listener) {
        let r = self.serve(main, prio, &listener);
        let end = match r {
            Ok(stats) => self.status.go_with(State::Completed, |s| {
                s.percent = 100.0;
                s.remaining_bytes = 0;
                s.stats = Some(stats);
            }),
            Err(e) => {
                let msg = uffd::error_chain(&e);
                let r = self
                    .status
                    .go_with(State::Failed, |s| s.error = Some(msg.clone()));
                // With every page here (pre-copy: checked against the source's digest before
                // the start), nothing the source or the link does any more can harm the
                // guest: it runs on, and only the migration is reported failed. Otherwise
                // (pages missing, or memory that differs) the guest cannot go on.
                let whole = self.pull.left() == 0 && !matches!(e, MigrationError::Integrity(_));
                if !whole {
                    self.notify.fail(Failure::Migration(Box::new(e)));
                }
                r
            }
        };
        if let Err(t) = end {
            let e = MigrationError::Transition(t);
            let _ = self
                .status
                .go_with(State::Failed, |s| s.error = Some(uffd::error_chain(&e)));
        }
    }

    /// Every page is in: stop trapping (pages never touched read as zero) and keep the loop's
    /// counters.
    fn stop_loop(&mut self) -> Result<(), MigrationError> {
        if let Some(fl) = self.fault_loop.take() {
            self.loop_stats = Some(fl.stop().map_err(MigrationError::Loop)?);
        }
        Ok(())
    }

    fn serve(
        &mut self,
        mut main: Sock,
        mut prio: Sock,
        listener: &Listener,
    ) -> Result<serde_json::Value, MigrationError> {
        let (tx, rx) = mpsc::channel();
        let mut generation = 0u32;
        self.pull
            .spawn_receivers(&main, &prio, generation, &tx)
            .map_err(MigrationError::Pull)?;
        let postcopy = self.fault_loop.is_some();
        let mut end: Option<End> = None;
        let mut report: Option<DestReport> = None;
        let mut postcopy_ms = None;
        let total = self.pull.left();
        let mut last = Instant::now();
        // This thread is the main connection's only writer: it keeps it alive; the pull's
        // requests and keepalives share the priority connection's lock.
        let mut beat = Beat::new(self.keepalive);
        let mut done_at: Option<Instant> = None;
        let mut heads_wait: Option<Instant> = None;
        let verdict = loop {
            beat.tick(&mut main)
                .map_err(io_err("sending a keepalive to the source"))?;
            if let Some(k) = self.keepalive {
                self.pull.keepalive(k.every);
            }
            if done_at.is_some_and(|t| t.elapsed() > VERDICT_WAIT) {
                // Everything is in; the source's verdict never came.
                break None;
            }
            let left = self.pull.left();
            if left == 0 && postcopy_ms.is_none() {
                postcopy_ms = Some(self.switch_t.elapsed().as_secs_f64() * 1e3);
                self.stop_loop()?;
            }
            // Let each vCPU beat once here (its head is part of the pause), at most 2 s,
            // keeping the link alive meanwhile.
            if let (0, None, Some(_)) = (left, &report, &end)
                && !self.heads_in()
                && heads_wait.get_or_insert_with(Instant::now).elapsed() < HEADS_WAIT
            {
                std::thread::sleep(Duration::from_millis(1));
                continue;
            }
            if let (0, None, Some(_)) = (left, &report, &end) {
                let r = self.report(postcopy_ms.unwrap_or(0.0));
                main.send_json(Kind::Done, &r)
                    .map_err(io_err("sending Done"))?;
                beat.sent();
                done_at = Some(Instant::now());
                report = Some(r);
            }
            if last.elapsed() > Duration::from_millis(100) {
                last = Instant::now();
                self.status.update(|s| {
                    s.percent = 100.0 - left as f64 * 100.0 / total.max(1) as f64;
                    s.remaining_bytes = left * PAGE;
                });
            }
            let ev = match rx.recv_timeout(Duration::from_millis(10)) {
                Ok(ev) => ev,
                Err(RecvTimeoutError::Timeout) => continue,
                Err(RecvTimeoutError::Disconnected) => return Err(protocol("receivers gone")),
            };
            match ev {
                Event::Frame {
                    channel,
                    header,
                    payload,
                    ..
                } => match (header.kind, channel) {
                    (Kind::End, Channel::Main) => {
                        let e: End = serde_json::from_slice(&payload).map_err(|source| {
                            fail(
                                &mut main,
                                MigrationError::Json {
                                    what: "End frame",
                                    source,
                                },
                            )
                        })?;
                        if let Some(c) = &e.checksums {
                            self.status.update(|s| s.source_checksums = Some(c.clone()));
                        }
                        end = Some(e);
                    }
                    (Kind::Verdict, Channel::Main) => {
                        let v = parse_verdict(&payload).map_err(|source| MigrationError::Json {
                            what: "Verdict frame",
                            source,
                        })?;
                        break Some(v.digest);
                    }
                    (Kind::Error, _) => return Err(MigrationError::Peer(peer_text(&payload))),
                    (k, ch) => {
                        return Err(fail(
                            &mut main,
                            protocol(format!(
                                "unexpected {k:?} frame on the {ch:?} connection after switchover"
                            )),
                        ));
                    }
                },
                // The other receiver of a connection pair already replaced.
                Event::Lost { generation: g, .. } | Event::Failed { generation: g, .. }
                    if g != generation => {}
                Event::Failed { error, .. } => return Err(fail(&mut main, pull_err(error))),
                Event::Lost { channel, error, .. } => {
                    if report.is_some() {
                        // Everything is in; only the source's verdict is missing.
                        break None;
                    }
                    let why = LinkLost::recv(channel, error);
                    if !postcopy {
                        return Err(MigrationError::Unconfirmed(why));
                    }
                    main.shutdown();
                    prio.shutdown();
                    (main, prio) = self.recover(why, listener)?;
                    generation += 1;
                    self.pull
                        .spawn_receivers(&main, &prio, generation, &tx)
                        .map_err(MigrationError::Pull)?;
                    // Ask again for every page a vCPU still waits on.
                    self.pull.rerequest();
                }
            }
        };
        let mut r = report.ok_or_else(|| protocol("no report"))?;
        let end = end.unwrap_or_default();
        let hex = |d: u64| format!("{d:#018x}");
        let verified = verdict.map(|d| d == r.digest);
        if verified == Some(false) {
            return Err(MigrationError::Integrity(format!(
                "guest memory here (digest {}) differs from the source's at switchover ({})",
                hex(r.digest),
                hex(verdict.unwrap_or_default())
            )));
        }
        r.bytes = self.bytes + self.pull.stats().bytes;
        let block: f64 = r.blocktime_ms.iter().sum();
        Ok(json!({
            "role": "destination",
            "converged": true,
            "downtime_ms": end.downtime_us as f64 / 1e3,
            "max_pause_ms": max_pause_ms(&end, &r),
            "bytes": r.bytes,
            "dirty_sync_rounds": self.rounds,
            "faults_requested": r.faults_requested,
            "fault_latency_us": r.fault_latency_us,
            "latency_log2_us": r.latency_log2_us,
            "blocktime_ms": block,
            "digest_verified": verified,
            "report": r,
        }))
    }

    /// Whether every vCPU has beaten here (or exited).
    fn heads_in(&self) -> bool {
        self.control
            .cpus
            .iter()
            .all(|c| c.first_hb_ns.load(SeqCst) != 0 || c.exited.load(SeqCst))
    }

    fn report(&self, postcopy_ms: f64) -> DestReport {
        let cpus = &self.control.cpus;
        let heads_us = cpus
            .iter()
            .map(|c| match c.first_hb_ns.load(SeqCst) {
                0 => None,
                t => Some(t.saturating_sub(self.resume_ns) / 1000),
            })
            .collect();
        let gaps_us = cpus
            .iter()
            .map(|c| c.max_gap_ns.load(SeqCst) / 1000)
            .collect();
        let first_heartbeats = cpus
            .iter()
            .map(|c| (c.first_hb_ns.load(SeqCst) != 0).then(|| c.last_n.load(SeqCst)))
            .collect();
        let beats_mono_us = cpus
            .iter()
            .map(|c| {
                c.beats
                    .lock()
                    .map(|b| {
                        b.first
                            .iter()
                            .map(|&(n, ns)| [u64::from(n), ns / 1000])
                            .collect()
                    })
                    .unwrap_or_default()
            })
            .collect();
        let ps = self.pull.stats();
        let ls = self.loop_stats.clone().unwrap_or_default();
        // Blocktime by the vCPU threads' ids (the fault loop knows threads, not vCPUs).
        let tids: Vec<u32> = cpus.iter().map(|c| c.tid.load(SeqCst)).collect();
        let blocked = |t: &u32| ls.blocktime_ns.get(t).copied().unwrap_or(0);
        let faults = |t: &u32| ls.faults_by_thread.get(t).copied().unwrap_or(0);
        let mean_us = |ns: u64, n: u64| {
            if n == 0 {
                0.0
            } else {
                ns as f64 / n as f64 / 1e3
            }
        };
        let blocktime_ms = tids.iter().map(|t| blocked(t) as f64 / 1e6).collect();
        let vcpu_faults = tids.iter().map(faults).collect();
        let vcpu_latency_us = tids
            .iter()
            .map(|t| mean_us(blocked(t), faults(t)))
            .collect();
        let (mut other_ns, mut other_n) = (0, 0);
        for (t, n) in &ls.faults_by_thread {
            if !tids.contains(t) {
                other_n += n;
                other_ns += blocked(t);
            }
        }
        DestReport {
            pages_background: ps.pages_background,
            pages_priority: ps.pages_priority,
            zero_pages_sent: ps.zero_pages_sent,
            zero_faults_local: ps.zero_faults_local,
            bytes: self.bytes + ps.bytes,
            faults_requested: ps.faults_requested,
            fault_latency_us: Latency::of_memx(&ls.latency),
            latency_log2_us: ls.latency_log2_us,
            blocktime_ms,
            vcpu_faults,
            vcpu_latency_us,
            non_vcpu_faults: other_n,
            non_vcpu_latency_us: mean_us(other_ns, other_n),
            heads_us,
            beats_mono_us,
            gaps_us,
            first_heartbeats,
            digest: self.pull.digest(),
            recoveries: self.recoveries,
            resends: ps.resends,
            postcopy_ms,
            hops: self.pull.hop_stamps(),
        }
    }

    /// Wait for the source to reconnect after a lost link (post-copy): a resume hello on both
    /// connections, answered with the `Recover` bitmap.
    fn recover(
        &mut self,
        why: LinkLost,
        listener: &Listener,
    ) -> Result<(Sock, Sock), MigrationError> {
        self.pull.set_priority(None);
        let msg = format!(
            "post-copy link lost: {}; {} pages are still at the source; vCPUs that need them wait. Waiting {:?} for `faultline migrate --resume`",
            uffd::error_chain(&why),
            self.pull.left(),
            self.recover_timeout
        );
        tracing::warn!("migration: {msg}");
        self.status
            .go_with(State::PostcopyPaused, |s| s.error = Some(msg))
            .map_err(MigrationError::Transition)?;
        let deadline = Instant::now() + self.recover_timeout;
        loop {
            let wait = deadline.saturating_duration_since(Instant::now());
            let mut main = match proto::accept_secure(listener, &self.security, wait) {
                Ok(s) => s,
                Err(proto::HandshakeError::Accept(e)) => {
                    return Err(io_err("accepting a recovery")(e));
                }
                Err(_) => {
                    return Err(MigrationError::NotRecovered {
                        timeout: self.recover_timeout,
                        left: self.pull.left(),
                        source: why,
                    });
                }
            };
            match proto::read_hello(&mut main) {
                Ok(h) if h.resume && h.id == self.id && h.channel == Channel::Main => {
                    if proto::ack_hello(&mut main, &h, Ok(false)).is_err() {
                        continue;
                    }
                }
                Ok(_) => {
                    let _ = proto::ack(
                        &mut main,
                        Err("not a resume of the migration in progress here".into()),
                    );
                    continue;
                }
                Err(e) => {
                    let _ = proto::ack(&mut main, Err(uffd::error_chain(&e)));
                    continue;
                }
            }
            main.set_buffers(proto::MAIN_BUFFER);
            let wait = Duration::from_secs(10);
            let mut prio = match proto::accept_secure(listener, &self.security, wait) {
                Ok(s) => s,
                Err(proto::HandshakeError::Accept(e)) => {
                    return Err(io_err("accepting the priority connection")(e));
                }
                Err(_) => continue,
            };
            match proto::read_hello(&mut prio) {
                Ok(p) if p.id == self.id && p.channel == Channel::Priority => {
                    if proto::ack_hello(&mut prio, &p, Ok(false)).is_err() {
                        continue;
                    }
                }
                _ => continue,
            }
            if main
                .send(Kind::Recover, 0, &self.pull.recover_bitmap())
                .is_err()
            {
                continue;
            }
            let deadline = self.keepalive.map(|k| k.deadline);
            for s in [&main, &prio] {
                s.set_read_timeout(deadline)
                    .map_err(io_err("socket setup"))?;
            }
            self.recoveries += 1;
            tracing::info!("migration: the source reconnected; post-copy goes on");
            self.status
                .go(State::Resuming)
                .and_then(|()| self.status.go_with(State::Postcopy, |s| s.error = None))
                .map_err(MigrationError::Transition)?;
            return Ok((main, prio));
        }
    }
}
