//! Live migration of a microVM: pre-copy over KVM's dirty log, post-copy over userfaultfd, and
//! the hybrid of the two, with post-copy recovery after a lost link.
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
//! 16-byte header and a payload (see [`wire`]). JSON payloads use the types of this module.
//!
//! ```text
//!  source                                              destination (`faultline run --incoming`)
//!  main:  Hello{protocol,version,id,config} ─────────▶ checks version, config; creates memory
//!         ◀──────────────────────────────── HelloAck{ok | error}   (refusal: guest untouched)
//!  prio:  Hello{channel:"priority",id} ──────────────▶
//!         ◀──────────────────────────────── HelloAck
//!  [precopy, hybrid]  Round, Pages*, Zero* ... (repeat) ▶ written into memory
//!  pause guest
//!  main:  Switch{heartbeats}, [Needed bitmap], State ──▶ restores vCPUs (+ uffd for post-copy)
//!         ◀──────────────────────────────── Resumed            (downtime = pause → Resumed)
//!  [post-copy]  Pages*/Zero* (background) ───────────▶ UFFDIO_COPY / ZEROPAGE
//!  prio:        ◀──────────────── Request{page}   (a vCPU faulted on a needed page)
//!               Pages (that page, then its stride) ──▶ UFFDIO_COPY, wakes the vCPU
//!  main:  End{downtime, tails, checksums?} ──────────▶ (all pages sent)
//!         ◀──────────────────────────────── Done{report, digest}  (all pages in)
//!         Verdict{digest of the frozen source memory} ▶ compared; the migration is complete
//! ```
//!
//! States of the source: `setup` → `precopy` → (`cancelled` | `switchover`) → `postcopy` →
//! (`postcopy-paused` ⇄ `postcopy`) → `completed`; any state may end in `failed`. Before the
//! `State` frame is sent, every failure resumes the source guest. After it, the guest belongs
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
//! it also catches a page the dirty log missed). A mismatch fails the migration loudly.
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
pub mod source;
pub mod wire;

use std::sync::atomic::{AtomicU64, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use thiserror::Error;

pub use dest::{Incoming, IncomingOptions, incoming};
pub use wire::Endpoint;

/// The protocol's name, in every hello.
pub const PROTOCOL: &str = "faultline-migrate";
/// The protocol version.
pub const VERSION: u32 = 1;

/// How memory moves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MigrationMode {
    /// Iterative pre-copy, then stop-and-copy.
    Precopy,
    /// State first, memory on demand and in the background.
    Postcopy,
    /// Pre-copy rounds, then post-copy.
    Hybrid,
}

impl MigrationMode {
    /// The name used on the command line and in JSON.
    pub fn name(self) -> &'static str {
        match self {
            Self::Precopy => "precopy",
            Self::Postcopy => "postcopy",
            Self::Hybrid => "hybrid",
        }
    }
}

impl std::str::FromStr for MigrationMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "precopy" => Ok(Self::Precopy),
            "postcopy" => Ok(Self::Postcopy),
            "hybrid" => Ok(Self::Hybrid),
            _ => Err(format!(
                "unknown migration mode '{s}' (precopy, postcopy, hybrid)"
            )),
        }
    }
}

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
}

fn default_mode() -> MigrationMode {
    MigrationMode::Postcopy
}

/// The first frame on each connection (JSON).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Hello {
    /// [`PROTOCOL`].
    pub protocol: String,
    /// [`VERSION`].
    pub version: u32,
    /// This migration's id (the priority connection and recoveries name it).
    pub id: u64,
    /// `main` or `priority`.
    pub channel: String,
    /// A recovery of a post-copy migration.
    #[serde(default)]
    pub resume: bool,
    /// The mode.
    pub mode: MigrationMode,
    /// The VM (main channel of a new migration).
    #[serde(default)]
    pub config: Option<crate::config::VmConfig>,
    /// Whether the VM has the in-kernel irqchip.
    #[serde(default)]
    pub irqchip: bool,
}

/// The destination's answer (JSON).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HelloAck {
    /// The destination's protocol version.
    pub version: u32,
    /// Whether it accepts.
    pub ok: bool,
    /// Why not.
    #[serde(default)]
    pub error: Option<String>,
    /// The destination runs `verify` and wants the source's checksums at switchover.
    #[serde(default)]
    pub want_checksums: bool,
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
    /// Fault → page installed, for requested faults.
    pub fault_latency_us: Latency,
    /// Time each vCPU spent blocked on remote faults, ms.
    pub blocktime_ms: Vec<f64>,
    /// Per vCPU: resume → first heartbeat, µs.
    pub heads_us: Vec<Option<u64>>,
    /// Per vCPU: longest heartbeat gap on the destination during post-copy, µs.
    pub gaps_us: Vec<u64>,
    /// Per vCPU: first heartbeat number on the destination.
    pub first_heartbeats: Vec<Option<u32>>,
    /// Digest of memory as installed.
    pub digest: String,
    /// Link losses recovered from.
    pub recoveries: u32,
    /// Switchover (state received) → every page in, ms.
    pub postcopy_ms: f64,
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
    /// Saving the vCPUs' state failed.
    #[error("saving vCPU state")]
    Save(#[source] crate::vstate::SaveError),
    /// The VM could not be built or started.
    #[error("VM")]
    Vm(#[source] crate::vstate::VmError),
    /// The configuration received cannot work here.
    #[error("VM configuration")]
    Config(#[source] crate::config::ConfigError),
    /// userfaultfd failed.
    #[error("userfaultfd: {0}")]
    Uffd(String),
    /// The vCPUs could not be rebuilt from the state.
    #[error("rebuilding the vCPUs")]
    Build(#[source] crate::vstate::machine::BuildError),
    /// Guest memory could not be read.
    #[error("reading guest memory")]
    GuestMemory(#[source] vm_memory::GuestMemoryError),
    /// Memory differs between the two sides.
    #[error("integrity: {0}")]
    Integrity(String),
    /// Nothing to migrate, or a migration is running.
    #[error("{0}")]
    Invalid(String),
}

pub(crate) fn io_err(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> MigrationError {
    let what = what.into();
    move |source| MigrationError::Io { what, source }
}

/// A migration's status, shared by its threads and the API (`GET /migrate`).
#[derive(Debug, Clone, Default)]
pub struct Status(Arc<Mutex<StatusInner>>);

/// What [`Status`] holds.
#[derive(Debug, Clone, Default, Serialize)]
pub struct StatusInner {
    /// `source` or `destination`.
    pub role: String,
    /// See the module docs' states.
    pub state: String,
    /// The mode.
    pub mode: Option<MigrationMode>,
    /// Pre-copy round.
    pub round: u32,
    /// Progress, percent of the pages to send.
    pub percent: f64,
    /// Current rate, MB/s.
    pub rate_mbps: f64,
    /// Bytes still to send (estimate).
    pub remaining_bytes: u64,
    /// The error, when failed or paused.
    pub error: Option<String>,
    /// Final statistics.
    pub stats: Option<Value>,
    /// Source checksums at switchover (destination, `--verify`).
    #[serde(skip)]
    pub source_checksums: Option<Vec<u64>>,
}

impl Status {
    pub(crate) fn new(role: &str, mode: Option<MigrationMode>) -> Status {
        Status(Arc::new(Mutex::new(StatusInner {
            role: role.into(),
            state: "setup".into(),
            mode,
            ..Default::default()
        })))
    }

    /// Change it.
    pub fn update(&self, f: impl FnOnce(&mut StatusInner)) {
        f(&mut self.0.lock().unwrap_or_else(|e| e.into_inner()));
    }

    /// A copy.
    pub fn get(&self) -> StatusInner {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// As JSON.
    pub fn json(&self) -> Value {
        serde_json::to_value(self.get()).unwrap_or(Value::Null)
    }

    /// In a final state (`completed`, `failed`, `cancelled`).
    pub fn is_final(&self) -> bool {
        matches!(
            self.get().state.as_str(),
            "completed" | "failed" | "cancelled"
        )
    }
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

/// A bitmap of pages, shared between threads.
pub(crate) struct Bits(Vec<AtomicU64>);

impl Bits {
    pub(crate) fn new(pages: u64) -> Bits {
        Bits((0..pages.div_ceil(64)).map(|_| AtomicU64::new(0)).collect())
    }
    pub(crate) fn from_words(w: &[u64]) -> Bits {
        Bits(w.iter().map(|&x| AtomicU64::new(x)).collect())
    }
    pub(crate) fn get(&self, p: u64) -> bool {
        self.0
            .get((p / 64) as usize)
            .is_some_and(|w| w.load(SeqCst) & (1 << (p % 64)) != 0)
    }
    /// Set; returns whether it was already set.
    pub(crate) fn set(&self, p: u64) -> bool {
        self.0
            .get((p / 64) as usize)
            .is_none_or(|w| w.fetch_or(1 << (p % 64), SeqCst) & (1 << (p % 64)) != 0)
    }
    /// Clear; returns whether it was set.
    pub(crate) fn clear(&self, p: u64) -> bool {
        self.0
            .get((p / 64) as usize)
            .is_some_and(|w| w.fetch_and(!(1 << (p % 64)), SeqCst) & (1 << (p % 64)) != 0)
    }
    pub(crate) fn count(&self) -> u64 {
        self.0
            .iter()
            .map(|w| u64::from(w.load(SeqCst).count_ones()))
            .sum()
    }
    pub(crate) fn words(&self) -> Vec<u64> {
        self.0.iter().map(|w| w.load(SeqCst)).collect()
    }
    /// The first set bit at or after `from`, wrapping once; `None` if none is set.
    pub(crate) fn next_set(&self, from: u64, pages: u64) -> Option<u64> {
        let n = self.0.len() as u64;
        if n == 0 {
            return None;
        }
        let start = from.min(pages.saturating_sub(1));
        let (w0, b0) = (start / 64, start % 64);
        for k in 0..=n {
            let wi = (w0 + k) % n;
            let mut w = self.0[wi as usize].load(SeqCst);
            if k == 0 {
                w &= !0u64 << b0;
            }
            if k == n {
                w = self.0[wi as usize].load(SeqCst) & !(!0u64 << b0);
            }
            if w != 0 {
                let p = wi * 64 + u64::from(w.trailing_zeros());
                if p < pages {
                    return Some(p);
                }
            }
        }
        None
    }
}

/// Bytes of a bitmap (little-endian words) for the wire.
pub(crate) fn words_to_bytes(w: &[u64]) -> Vec<u8> {
    w.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// Words from wire bytes; `None` if the length does not fit `pages`.
pub(crate) fn bytes_to_words(b: &[u8], pages: u64) -> Option<Vec<u64>> {
    if b.len() as u64 != pages.div_ceil(64) * 8 {
        return None;
    }
    Some(
        b.chunks_exact(8)
            .map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes")))
            .collect(),
    )
}

/// A page's hash for the digest: 0 for a zero page, else its CRC-32 with bit 32 set.
pub(crate) fn page_hash(page: &[u8]) -> u64 {
    if is_zero(page) {
        0
    } else {
        u64::from(crc32fast::hash(page)) | 1 << 32
    }
}

/// One page's contribution to the digest.
pub(crate) fn mix(page: u64, h: u64) -> u64 {
    if h == 0 {
        return 0;
    }
    let mut x = page.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ h;
    x ^= x >> 31;
    x = x.wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x ^ (x >> 29)
}

/// Whether every byte is zero.
pub(crate) fn is_zero(b: &[u8]) -> bool {
    let (pre, mid, post) = {
        // SAFETY: any bytes are valid u64s; align_to only reinterprets the aligned middle.
        unsafe { b.align_to::<u64>() }
    };
    pre.iter().all(|&x| x == 0) && post.iter().all(|&x| x == 0) && mid.iter().all(|&x| x == 0)
}

/// Wait at most `d` on a condition polled every millisecond.
pub(crate) fn wait_for(d: Duration, f: impl Fn() -> bool) -> bool {
    let deadline = std::time::Instant::now() + d;
    while !f() {
        if std::time::Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bits_next_set_wraps() {
        let b = Bits::new(200);
        assert_eq!(b.next_set(0, 200), None);
        b.set(5);
        b.set(130);
        assert_eq!(b.next_set(0, 200), Some(5));
        assert_eq!(b.next_set(6, 200), Some(130));
        assert_eq!(b.next_set(131, 200), Some(5));
        assert!(b.clear(5));
        assert!(!b.clear(5));
        assert_eq!(b.next_set(131, 200), Some(130));
        assert_eq!(b.count(), 1);
        let w = b.words();
        assert_eq!(bytes_to_words(&words_to_bytes(&w), 200), Some(w));
        assert_eq!(bytes_to_words(&[0; 3], 200), None);
    }

    #[test]
    fn digest_parts() {
        let z = vec![0u8; 4096];
        let mut d = vec![0u8; 4096];
        assert_eq!(page_hash(&z), 0);
        d[4095] = 1;
        assert_ne!(page_hash(&d), 0);
        assert_eq!(mix(3, 0), 0);
        assert_ne!(mix(3, page_hash(&d)), mix(4, page_hash(&d)));
    }

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
