//! Live migration of a microVM: pre-copy over KVM's dirty log, post-copy over userfaultfd, and
//! the hybrid of the two, with post-copy recovery after a lost link.
//!
//! # Layers
//! Pages move with the `xfer` crate; this module keeps what is the VM's. On the source
//! ([`source`]): guest memory is read only through an [`xfer::reader::PageReader`] (raw copies,
//! never a `&[u8]` over memory the vCPUs may write), KVM's dirty log is an
//! [`xfer::dirty::DirtyLog`], rounds are [`xfer::precopy::Precopy`] and post-copy is
//! [`xfer::push::Push`]; the pause, the `Switch`, `State` and `End` frames and the hand-over
//! are here. On the destination (`dest`, then `supervisor` after switchover): pre-copy frames
//! are checked and applied by [`xfer::precopy::Precopied`], post-copy pages are pulled by
//! [`xfer::pull::Pull`] into a [`memx::FaultLoop`] (its page source asks the source; the
//! receivers install through the loop's [`memx::Installer`]); the VM is built and started
//! here. The status is [`xfer::status::Status`], its state the checked [`State`] machine.
//!
//! # Modes
//! - **precopy**: round 0 sends every page that may hold data (pages never touched are
//!   skipped: the destination's memory starts zeroed); each later round sends the pages KVM's
//!   dirty log reports written since. When the dirty set fits the downtime limit at the
//!   measured rate, the source pauses, sends the last dirty pages and the vCPU state, and the
//!   destination resumes. If that never happens before the deadline, the source cancels and its
//!   guest runs on; nothing is lost.
//! - **postcopy**: the source pauses at once and sends the state plus a bitmap of the pages the
//!   destination must still receive; every other page is known to be zero. The destination
//!   registers its memory with userfaultfd (MISSING) and resumes the vCPUs at once. A fault on
//!   a page still needed is sent as a request on a **separate priority connection** and
//!   answered there, ahead of everything; a fault on any other page is answered locally with a
//!   zero page. Meanwhile the source pushes the rest on the main connection, jumping to just
//!   after each requested page (locality). Requests with a constant stride (a guest scanning
//!   with a step) make the source send the next pages of that stride too. No page is sent twice
//!   (a bitmap of claimed pages on the source); zero pages go as counts, never as bytes.
//! - **hybrid**: pre-copy rounds while the dirty set shrinks (at most `max_rounds`), then
//!   post-copy for what is left: pages dirtied since they were sent are discarded on the
//!   destination (`MADV_DONTNEED`) and fetched again.
//!
//! # Protocol (version 1)
//! Two connections from the source to the destination's listener: `main` (hello, pages in
//! the background, state, control) and `priority` (requests and their answers). Frames are a
//! 16-byte header and a payload (see [`xfer::wire`]). JSON payloads use the types of this module.
//!
//! ```text
//!  source                                              destination (`faultline run --incoming`)
//!  main:  Hello{protocol,version,id,config} ─────────▶ checks version, config; creates memory
//!         ◀──────────────────────────────── HelloAck{ok | error}   (refusal: guest untouched)
//!  prio:  Hello{channel:"priority",id} ──────────────▶
//!         ◀──────────────────────────────── HelloAck
//!  [precopy, hybrid]  Round, Pages*, Zero* ... (repeat) ▶ written into memory
//!  pause guest
//!  main:  Switch{heartbeats}, [Needed bitmap], State ──▶ restores vCPUs (+ fault loop, post-copy)
//!         ◀──────────────────────────────── Resumed            (downtime = pause → Resumed)
//!  [post-copy]  Pages*/Zero* (background) ───────────▶ memx Installer (COPY / ZEROPAGE)
//!  prio:        ◀──────────────── Request{page}   (a vCPU faulted on a needed page)
//!               Pages (that page, then its stride) ──▶ memx Installer, wakes the vCPU
//!  main:  End{downtime, tails, checksums?} ──────────▶ (all pages sent)
//!         ◀──────────────────────────────── Done{report, digest}  (all pages in)
//!         Verdict{digest of the frozen source memory} ▶ compared; the migration is complete
//! ```
//!
//! States ([`State`], checked transitions): `setup` → `precopy` → (`cancelled` |
//! `switchover`) → [`postcopy` → (`postcopy-paused` → `resuming` → `postcopy`)*] →
//! `completed`; any state not final may end in `failed`. A pre-copy migration stays in
//! `switchover` until it completes (the old `completing` is gone). Before the
//! `State` frame is sent, every failure resumes the source guest. After it, the guest may
//! run at the destination: the source resumes it only if the destination said it did not
//! start it (an `Error` frame with `"started": false`, e.g. a damaged frame or a digest
//! mismatch). Any other failure before the destination's `Resumed` leaves the source guest
//! paused and the status `failed` with `in_doubt: true`: no second migration starts, and
//! `PUT /vm/resume` does not release it; the operator decides with `PUT /migrate/reclaim`
//! (`faultline migrate --reclaim`: the guest runs here again; only when the destination is
//! known not to run it) or `PUT /vm/stop`. After `Resumed`, the guest belongs
//! to the destination: a lost link during post-copy leaves the source in `postcopy-paused`,
//! serving nothing, until `faultline migrate --resume` reconnects (`Hello{resume:true}`); the
//! destination answers with `Recover` (the pages it still needs) and post-copy goes on. On the
//! destination, vCPUs faulting on missing pages wait while the others run; if nobody recovers
//! within the recovery timeout, the VM stops with an error.
//!
//! # Integrity
//! Both sides compute a digest of guest memory at switchover: the sum, over non-zero pages,
//! of a mix of the page number and the page's CRC-32. The destination hashes every page as it
//! installs it; the source hashes its memory, frozen since the pause, after the transfer (so
//! it also catches a page the dirty log missed). A mismatch fails the migration loudly. In
//! pre-copy the source sends its digest in the `Switch` frame and the destination compares
//! before it starts the guest: a mismatch refuses the switchover (`"started": false`) and
//! the source guest runs on. With a peer that offers them, frames carrying memory or state
//! also carry a CRC32C trailer (see `xfer`): a damaged frame fails a pre-copy before
//! switchover, and in post-copy its pages are asked for again (`Resend`).
//!
//! # Liveness
//! Every migration socket has a write deadline (`xfer::wire::link_deadline`, 10 s;
//! `FAULTLINE_LINK_DEADLINE_MS`). After switchover both sides send keepalives on both
//! connections when idle (if both hellos announced them) and count a connection silent for
//! the deadline as lost: post-copy goes to `postcopy-paused` (the destination then waits for
//! a recovery), pre-copy to `failed`.
//! Destinations started with `--verify` run the guest's `verify` instead of resuming and
//! compare its checksums with the source's at switchover.
//!
//! # Guest-visible pause
//! The built-in guest beats every 100 ms. The longest gap a vCPU sees across the migration is
//! the largest of: its gaps on the source during pre-copy, (last source beat → pause) +
//! downtime + (resume → first destination beat), and its gaps on the destination until the
//! last page is in. `max_pause_ms` is that minus the 100 ms interval (QEMU's anchor measures
//! the same from its guest's serial heartbeats).

pub(crate) mod dest;
mod failpoint;
mod guest_io;
pub mod source;
mod supervisor;

use std::time::Duration;

use serde::{Deserialize, Serialize};
use thiserror::Error;

pub use dest::{Incoming, IncomingOptions, incoming};
pub use xfer::proto::{MigrationMode, PROTOCOL, VERSION};
pub use xfer::status::{Role, State, Status, StatusInner, TransitionError};
pub use xfer::wire::Endpoint;

fn default_downtime() -> u64 {
    300
}
fn default_deadline() -> u64 {
    20_000
}
fn default_rounds() -> u32 {
    3
}

/// `PUT /migrate`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MigrateRequest {
    /// The destination (`tcp:HOST:PORT` or `unix:PATH`). With `resume`, optional: the last one.
    #[serde(default)]
    pub to: Option<Endpoint>,
    /// The mode.
    #[serde(default = "default_mode")]
    pub mode: MigrationMode,
    /// Bytes per second over both connections; 0: unlimited.
    #[serde(default)]
    pub max_bandwidth: u64,
    /// Pre-copy switches over when the rest fits this (ms).
    #[serde(default = "default_downtime")]
    pub downtime_limit_ms: u64,
    /// Pre-copy gives up (and the guest runs on) after this (ms).
    #[serde(default = "default_deadline")]
    pub deadline_ms: u64,
    /// Hybrid: at most this many pre-copy rounds.
    #[serde(default = "default_rounds")]
    pub max_rounds: u32,
    /// Reconnect a post-copy migration whose link was lost.
    #[serde(default)]
    pub resume: bool,
    /// TLS credentials ([`xfer::tls`]); required for TCP unless `insecure`.
    #[serde(default)]
    pub tls: Option<xfer::tls::Credentials>,
    /// Allow plain TCP (no authentication, no encryption).
    #[serde(default)]
    pub insecure: bool,
}

fn default_mode() -> MigrationMode {
    MigrationMode::Postcopy
}

/// Sent at switchover (JSON).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Switch {
    /// `precopy` (memory complete) or `postcopy` (a `Needed` bitmap follows).
    pub postcopy: bool,
    /// Last heartbeat number per vCPU.
    pub heartbeats: Vec<u32>,
    /// Pre-copy rounds done.
    pub rounds: u32,
    /// The operator had paused the guest: it stays paused at the destination.
    #[serde(default)]
    pub paused: bool,
    /// Pre-copy: the digest of the source's (frozen) memory, which the destination checks
    /// before it starts the guest (absent from an older source, and in post-copy).
    #[serde(default)]
    pub digest: Option<u64>,
}

/// Sent when every page has been sent (JSON).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct End {
    /// Pause → `Resumed`, µs.
    pub downtime_us: u64,
    /// Per vCPU: last source heartbeat → pause, µs (`None`: it never beat).
    pub tails_us: Vec<Option<u64>>,
    /// Per vCPU: longest heartbeat gap on the source during the migration, µs.
    pub gaps_us: Vec<u64>,
    /// Each slice's checksum at switchover (when the destination asked).
    #[serde(default)]
    #[serde(with = "crate::hex::opt_vec")]
    pub checksums: Option<Vec<u64>>,
}

/// Latency percentiles, µs.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Latency {
    /// Samples.
    pub count: u64,
    /// Median.
    pub p50: f64,
    /// 90th percentile.
    pub p90: f64,
    /// 99th percentile.
    pub p99: f64,
    /// Largest.
    pub max: f64,
}

impl Latency {
    /// From samples in ns.
    pub fn of(mut ns: Vec<u64>) -> Latency {
        if ns.is_empty() {
            return Latency::default();
        }
        ns.sort_unstable();
        let at = |q: f64| ns[((ns.len() - 1) as f64 * q).round() as usize] as f64 / 1e3;
        Latency {
            count: ns.len() as u64,
            p50: at(0.5),
            p90: at(0.9),
            p99: at(0.99),
            max: at(1.0),
        }
    }

    /// From a fault loop's latency summary (ns).
    pub fn of_memx(l: &memx::Latency) -> Latency {
        let us = |ns: u64| ns as f64 / 1e3;
        Latency {
            count: l.count,
            p50: us(l.p50_ns),
            p90: us(l.p90_ns),
            p99: us(l.p99_ns),
            max: us(l.max_ns),
        }
    }
}

/// What the destination measured (JSON, in `Done`, and printed by the destination).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct DestReport {
    /// Pages installed from the main (background) connection.
    pub pages_background: u64,
    /// Pages installed from the priority connection.
    pub pages_priority: u64,
    /// Zero pages the source announced in the stream.
    pub zero_pages_sent: u64,
    /// Faults on known-zero pages answered locally.
    pub zero_faults_local: u64,
    /// Payload bytes received.
    pub bytes: u64,
    /// Faults that needed the source (requests).
    pub faults_requested: u64,
    /// Fault read → page in, for every fault the destination's fault loop served.
    pub fault_latency_us: Latency,
    /// The same as log2 buckets of µs (bucket `i`: `[2^i, 2^(i+1))` µs), as QEMU's
    /// `postcopy-latency-dist`.
    #[serde(default)]
    pub latency_log2_us: Vec<u64>,
    /// Time each vCPU spent blocked on remote faults, ms.
    pub blocktime_ms: Vec<f64>,
    /// Faults each vCPU took (QEMU's `postcopy-vcpu-latency` is their mean latency).
    #[serde(default)]
    pub vcpu_faults: Vec<u64>,
    /// Each vCPU's mean fault latency, µs.
    #[serde(default)]
    pub vcpu_latency_us: Vec<f64>,
    /// Faults taken by other threads (the VMM's devices, DMA), and their mean latency, µs
    /// (QEMU's `postcopy-non-vcpu-latency`).
    #[serde(default)]
    pub non_vcpu_faults: u64,
    /// Mean latency of those, µs (0 without any).
    #[serde(default)]
    pub non_vcpu_latency_us: f64,
    /// Per vCPU: resume → first heartbeat, µs.
    pub heads_us: Vec<Option<u64>>,
    /// Per vCPU: its first heartbeats here, `[number, CLOCK_MONOTONIC µs]` (a report's
    /// timeline; absent from older destinations).
    #[serde(default)]
    pub beats_mono_us: Vec<Vec<[u64; 2]>>,
    /// Per vCPU: longest heartbeat gap on the destination during post-copy, µs.
    pub gaps_us: Vec<u64>,
    /// Per vCPU: first heartbeat number on the destination.
    pub first_heartbeats: Vec<Option<u32>>,
    /// Digest of memory as installed (`"0x…"` in JSON).
    #[serde(with = "xfer::digest::hex")]
    pub digest: u64,
    /// Link losses recovered from.
    pub recoveries: u32,
    /// Pages asked for again because their frame arrived damaged (CRC32C).
    #[serde(default)]
    pub resends: u64,
    /// Switchover (state received) → every page in, ms.
    pub postcopy_ms: f64,
    /// `FAULTLINE_BREAKDOWN=1`: each request's hop stamps, `[page, handler woke, request
    /// sent, page received, installed]` (`xfer::hops`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hops: Vec<[u64; 5]>,
}

/// The longest guest-visible pause, ms, from both sides' heartbeat records (see the module
/// docs).
pub fn max_pause_ms(end: &End, dst: &DestReport) -> f64 {
    let mut worst = 0u64;
    for i in 0..end.tails_us.len().max(dst.heads_us.len()) {
        let src_gap = end.gaps_us.get(i).copied().unwrap_or(0);
        let dst_gap = dst.gaps_us.get(i).copied().unwrap_or(0);
        let cross = match (
            end.tails_us.get(i).copied().flatten(),
            dst.heads_us.get(i).copied().flatten(),
        ) {
            (Some(t), Some(h)) => t + end.downtime_us + h,
            _ => 0,
        };
        worst = worst.max(src_gap).max(dst_gap).max(cross);
    }
    (worst as f64 / 1e3 - 100.0).max(0.0)
}

/// Migration failures.
#[derive(Debug, Error)]
pub enum MigrationError {
    /// A socket operation failed.
    #[error("{what}")]
    Io {
        /// What was being done.
        what: String,
        /// Cause (errno kept).
        #[source]
        source: std::io::Error,
    },
    /// The peer refused or broke the protocol.
    #[error("protocol: {0}")]
    Protocol(String),
    /// The peer said it gives up.
    #[error("the peer reported: {0}")]
    Peer(String),
    /// Pre-copy did not converge before the deadline; the source guest runs on.
    #[error("pre-copy did not converge within {0} ms; cancelled, the guest runs on at the source")]
    NotConverged(u64),
    /// The source cancelled the migration.
    #[error("the source cancelled the migration: {0}")]
    Cancelled(String),
    /// A KVM call failed.
    #[error("KVM: {what}")]
    Kvm {
        /// What.
        what: &'static str,
        /// Cause.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// Reading, decoding or restoring VM state failed.
    #[error("VM state")]
    State(#[source] crate::vstate::StateError),
    /// The devices' state could not be taken at switchover.
    #[error("device state")]
    Devices(#[source] crate::devices::DevicesError),
    /// Saving the vCPUs' state failed.
    #[error("saving vCPU state")]
    Save(#[source] crate::vstate::SaveError),
    /// The VM could not be built or started.
    #[error("VM")]
    Vm(#[source] crate::vstate::VmError),
    /// The configuration received cannot work here.
    #[error("VM configuration")]
    Config(#[source] crate::config::ConfigError),
    /// The connections' security could not be set up (credentials, or plain TCP refused).
    #[error("migration security")]
    Security(#[source] xfer::tls::TlsError),
    /// The handshake (hello, answer, the connection pair) failed.
    #[error("handshake")]
    Handshake(#[source] xfer::proto::HandshakeError),
    /// A pre-copy round could not be sent.
    #[error("pre-copy round")]
    Round(#[source] xfer::precopy::RoundError),
    /// KVM's dirty log could not be fetched.
    #[error("dirty log")]
    DirtyLog(#[source] xfer::dirty::DirtyLogError),
    /// Guest memory could not be read for sending.
    #[error("reading guest memory")]
    Read(#[source] xfer::reader::ReadError),
    /// The post-copy push could not start or recover.
    #[error("post-copy push")]
    Push(#[source] xfer::push::PushError),
    /// After switchover the link to the destination failed (not in post-copy, where the
    /// source waits for a recovery instead).
    #[error(
        "after switchover: the destination may run the guest, so it stays paused here; if the destination is not running it, `PUT /migrate/reclaim` (or `faultline migrate --api-sock SOCK --reclaim`) runs it here again"
    )]
    AfterSwitchover(#[source] LinkLost),
    /// Post-copy lost its link and no `--resume` came.
    #[error("post-copy link lost and no --resume came within {0:?}; giving up")]
    NoResume(Duration),
    /// The stream ended or broke before switchover.
    #[error("the source's stream ended before switchover; nothing was started here")]
    BeforeSwitchover(#[source] xfer::wire::RecvError),
    /// A frame named pages outside guest memory.
    #[error("pages outside guest memory")]
    OutsideMemory(#[source] xfer::pull::PullError),
    /// A page frame could not be applied or installed.
    #[error("receiving pages")]
    Pull(#[source] xfer::pull::PullError),
    /// The destination's fault loop failed.
    #[error("the fault loop")]
    Loop(#[source] memx::LoopError),
    /// Post-copy lost its link and the source did not come back.
    #[error(
        "post-copy link lost and the source did not reconnect within {timeout:?}: {left} guest pages are lost; the VM stops"
    )]
    NotRecovered {
        /// How long the destination waited.
        timeout: Duration,
        /// Pages still at the source.
        left: u64,
        /// How the link was lost.
        #[source]
        source: LinkLost,
    },
    /// Guest memory is not a range userfaultfd can register.
    #[error("guest memory for userfaultfd")]
    Range(#[source] uffd::RangeError),
    /// After a pre-copy switchover the link was lost before the source confirmed the
    /// migration.
    #[error(
        "after switchover; the guest runs here with all its memory but the migration was not confirmed"
    )]
    Unconfirmed(#[source] LinkLost),
    /// A JSON payload did not parse.
    #[error("malformed {what}")]
    Json {
        /// What.
        what: &'static str,
        /// Cause.
        #[source]
        source: serde_json::Error,
    },
    /// An illegal status change (a bug, reported rather than hidden).
    #[error("status")]
    Transition(#[source] TransitionError),
    /// The vCPUs could not be rebuilt from the state.
    #[error("rebuilding the vCPUs")]
    Build(#[source] crate::vstate::machine::BuildError),
    /// Guest memory could not be read.
    #[error("reading guest memory")]
    GuestMemory(#[source] vm_memory::GuestMemoryError),
    /// Memory differs between the two sides.
    #[error("integrity: {0}")]
    Integrity(String),
    /// The destination refused the switchover before starting the guest (it says so in its
    /// `Error` frame): the guest runs on at the source.
    #[error("the destination refused the switchover and did not start the guest: {0}")]
    Refused(String),
    /// Nothing to migrate, or a migration is running.
    #[error("{0}")]
    Invalid(String),
}

/// How a connection to the peer was lost.
#[derive(Debug, Error)]
pub enum LinkLost {
    /// The peer closed the connection, or it ended inside a frame.
    #[error("the peer closed the connection (it exited, was killed, or the link dropped)")]
    Closed(#[source] xfer::wire::RecvError),
    /// Reading from the peer failed.
    #[error("{0:?} connection")]
    Recv(xfer::proto::Channel, #[source] xfer::wire::RecvError),
    /// Sending to the peer failed.
    #[error("sending {0:?}")]
    Send(xfer::wire::Kind, #[source] std::io::Error),
    /// The post-copy push's link failed.
    #[error("post-copy push")]
    Push(#[source] xfer::push::LinkError),
    /// A frame's JSON did not parse.
    #[error("malformed {0:?} frame")]
    Malformed(xfer::wire::Kind, #[source] serde_json::Error),
    /// The peer reported a failure.
    #[error("the peer failed: {0}")]
    Peer(String),
    /// The peer sent what the protocol does not allow here.
    #[error("protocol: {0}")]
    Protocol(String),
}

impl LinkLost {
    /// From a receive error on `channel`.
    pub fn recv(channel: xfer::proto::Channel, e: xfer::wire::RecvError) -> LinkLost {
        use xfer::wire::RecvError;
        match e {
            RecvError::Closed | RecvError::Truncated => LinkLost::Closed(e),
            e => LinkLost::Recv(channel, e),
        }
    }
}

/// An `Error` (or `Cancel`) frame's text, bounded (a peer's bytes).
pub fn peer_text(b: &[u8]) -> String {
    let v: Option<serde_json::Value> = serde_json::from_slice(b).ok();
    match v.as_ref().and_then(|v| v["error"].as_str()) {
        Some(e) => e.chars().take(4096).collect(),
        None => String::from_utf8_lossy(&b[..b.len().min(4096)]).into_owned(),
    }
}

/// The `Verdict` frame (JSON `{"digest": "0x.."}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Verdict {
    /// The source's digest of guest memory at switchover.
    #[serde(with = "xfer::digest::hex")]
    pub digest: u64,
}

/// Parse a `Verdict` frame's payload.
pub fn parse_verdict(b: &[u8]) -> Result<Verdict, serde_json::Error> {
    serde_json::from_slice(b)
}

/// A page frame the destination refuses: pages outside guest memory are named as such.
pub(crate) fn pull_err(e: xfer::pull::PullError) -> MigrationError {
    match e {
        xfer::pull::PullError::OutOfRange { .. } => MigrationError::OutsideMemory(e),
        e => MigrationError::Pull(e),
    }
}

/// Destination, before it starts the guest: send an `Error` frame saying the guest was not
/// started (`"started": false`, so the source may resume it) and hand the error back.
pub(crate) fn refuse(main: &mut xfer::wire::Sock, e: MigrationError) -> MigrationError {
    let _ = main.send_json(
        xfer::wire::Kind::Error,
        &serde_json::json!({ "error": uffd::error_chain(&e), "started": false }),
    );
    e
}

/// Whether an `Error` frame's payload says the destination did not start the guest.
pub(crate) fn peer_not_started(b: &[u8]) -> bool {
    serde_json::from_slice::<serde_json::Value>(b)
        .is_ok_and(|v| v["started"] == serde_json::Value::Bool(false))
}

/// Send an `Error` frame to the peer (best effort) and hand the error back.
pub(crate) fn fail(main: &mut xfer::wire::Sock, e: MigrationError) -> MigrationError {
    let _ = main.send_json(
        xfer::wire::Kind::Error,
        &serde_json::json!({ "error": uffd::error_chain(&e) }),
    );
    e
}

pub(crate) fn io_err(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> MigrationError {
    let what = what.into();
    move |source| MigrationError::Io { what, source }
}

/// A migration attached to a running VM (either side).
pub(crate) struct Migration {
    pub(crate) status: Status,
    /// Source: hands `--resume` requests to the migration thread.
    pub(crate) resume: Option<std::sync::mpsc::Sender<Option<Endpoint>>>,
    pub(crate) thread: Option<std::thread::JoinHandle<()>>,
}

impl Migration {
    /// Whether its thread still runs.
    pub(crate) fn busy(&self) -> bool {
        self.thread.as_ref().is_some_and(|t| !t.is_finished())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pause_from_heartbeats() {
        let end = End {
            downtime_us: 5_000,
            tails_us: vec![Some(40_000), Some(90_000)],
            gaps_us: vec![100_000, 101_000],
            checksums: None,
        };
        let dst = DestReport {
            heads_us: vec![Some(60_000), Some(20_000)],
            gaps_us: vec![130_000, 100_000],
            ..Default::default()
        };
        // vCPU 1 crosses with 90 + 5 + 20 = 115 ms; vCPU 0's gap after is 130 ms.
        assert_eq!(max_pause_ms(&end, &dst), 30.0);
    }

    #[test]
    fn requests_parse_with_defaults() {
        let r: MigrateRequest =
            serde_json::from_str(r#"{"to":"tcp:127.0.0.1:7000","mode":"hybrid"}"#).unwrap();
        assert_eq!(r.mode, MigrationMode::Hybrid);
        assert_eq!(r.downtime_limit_ms, 300);
        assert!(!r.resume);
        assert!(serde_json::from_str::<MigrateRequest>(r#"{"to":"ftp:x"}"#).is_err());
    }
}
