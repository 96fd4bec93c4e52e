//! Page transfer for live migration, shared by VM and process migration; no KVM dependency.
//!
//! - [`wire`]: frames (a 16-byte header and a bounded payload), the two transports (TCP and
//!   Unix stream sockets), listeners and endpoints, the bandwidth cap.
//! - [`link`]: liveness: the link deadline, stalls as errors, keepalives.
//! - [`proto`]: the handshake (hello, answer, the main and priority connections).
//! - [`bitmap`], [`digest`], [`status`]: page bitmaps, the memory digest, the state machine.
//! - [`reader`], [`dirty`]: memory to read pages from ([`reader::PageReader`]) and the log
//!   of written pages ([`dirty::DirtyLog`]).
//! - [`precopy`]: pre-copy rounds (source) and their checked application (destination).
//! - [`push`]: the source's post-copy engine; [`pull`]: the destination's, feeding pages into
//!   a [`memx::FaultLoop`] through its [`memx::Installer`].
//!
//! # Protocol, version 1
//! This crate speaks version 1 of `faultline-migrate` (frames, JSON payloads and their order
//! as the VMM's own migration code has sent them), so a migration between old and new code
//! works. Additions are negotiated, so an old peer never sees them:
//!
//! - **Keepalives** ([`wire::Kind::Keepalive`], kind 17): a hello and its answer carry
//!   `keepalive_ms`, the sender's link deadline (absent or 0 in an old peer's). When both
//!   carry one, after switchover each side sends a keepalive on each connection it has sent
//!   nothing on for a quarter of the peer's deadline (at most every second), and counts a
//!   connection lost when nothing came on it for its own deadline. Pre-copy frames flow
//!   without pause; before switchover the destination bounds its reads by a 60 s stream
//!   timeout.
//! - **CRC32C trailers**: a hello and its answer carry `crc32c: true` (absent: false). When
//!   both do, every `Pages`, `Zero`, `Switch`, `Needed` and `State` frame carries the
//!   [`wire::FLAG_CRC`] flag and a 4-byte CRC32C trailer (format in [`wire`]); the
//!   destination refuses such a frame without one. A damaged frame before switchover fails
//!   the migration there (`Error` frame; the source guest runs on). After switchover a
//!   damaged `Pages` frame is asked for again with [`wire::Kind::Resend`] (kind 18, priority
//!   connection, `u32` count of pages at `arg`), which the source answers even for pages it
//!   sent already; any other damaged frame counts as a lost link (recovery).
//! - **Pre-copy digest before start**: a pre-copy `Switch` carries `digest` (the source's
//!   memory digest at switchover, a JSON number); the destination compares it with its own
//!   before it starts the guest.
//! - **"Not started"**: an `Error` frame the destination sends before it starts the guest
//!   says `"started": false`; only then may the source resume its guest after the `State`
//!   frame went out (otherwise it stays paused: the destination may run the guest).
//! - **Deadlines** (local, no wire change): every socket has a write deadline
//!   ([`wire::link_deadline`], 10 s, `FAULTLINE_LINK_DEADLINE_MS`): a peer that takes
//!   nothing for that long fails the write with [`wire::Stalled`] (kind `TimedOut`, errno
//!   kept). A TCP connect is bounded by its timeout (`connect_timeout`).
//!
//! Two connections from the source to the destination's listener: **main** (hello, pages in
//! the background, state, control) and **priority** (requests and their answers).
//!
//! ```text
//!  source                                              destination
//!  main:  Hello{protocol,version,id,channel:main,config} ─▶ checks; prepares memory
//!         ◀──────────────────────────────── HelloAck{ok | error}
//!  prio:  Hello{channel:priority,id} ────────────────▶
//!         ◀──────────────────────────────── HelloAck
//!  [precopy, hybrid]  Round, Pages*, Zero* ... (repeat) ▶ written into memory
//!  pause
//!  main:  Switch{postcopy,...}, [Needed bitmap], State ─▶ restores; (post-copy: uffd)
//!         ◀──────────────────────────────── Resumed        (downtime = pause → Resumed)
//!  [post-copy]  Pages*/Zero* (background push) ──────▶ Installer: COPY / ZEROPAGE
//!  prio:        ◀──────────────── Request{page}   (a fault on a page still at the source)
//!               Pages/Zero (that page, then its stride) ▶ Installer, wakes the thread
//!  main:  End{...} ──────────────────────────────────▶ (every page sent)
//!         ◀──────────────────────────────── Done{report, digest}  (every page in)
//!         Verdict{digest of the frozen source memory} ▶ compared: completed
//!  [link lost in post-copy]  source: postcopy-paused; reconnect with Hello{resume:true}
//!         ◀──────────────────────────────── Recover{bitmap of pages still needed}
//!         post-copy goes on; the destination asks again for the pages threads wait on
//! ```
//!
//! ## Frames
//! | kind | # | direction | payload (checked before use) |
//! |---|---|---|---|
//! | Hello | 1 | S→D | JSON [`proto::Hello`], ≤ 1 MiB |
//! | HelloAck | 2 | D→S | JSON [`proto::HelloAck`], ≤ 1 MiB |
//! | Pages | 3 | S→D | 1..=64 whole pages at `arg` (page-aligned) |
//! | Zero | 4 | S→D | exactly a `u32` count ≥ 1 of zero pages at `arg` |
//! | Round | 5 | S→D | JSON `{round, pages}` |
//! | Switch | 6 | S→D | JSON |
//! | State | 7 | S→D | machine state, ≤ 16 MiB |
//! | Needed | 8 | S→D | bitmap, whole `u64` words, exactly the memory's pages, ≤ 2 MiB |
//! | Resumed | 9 | D→S | JSON `{}` |
//! | Request | 10 | D→S (prio) | exactly a `u32` count (1..=64) of pages at `arg` |
//! | End | 11 | S→D | JSON |
//! | Done | 12 | D→S | JSON report |
//! | Error | 13 | both | JSON `{"error": .., "started": false?}` |
//! | Recover | 14 | D→S | bitmap as `Needed` |
//! | Cancel | 15 | S→D | JSON `{"reason": ..}` |
//! | Verdict | 16 | S→D | JSON `{"digest": "0x%016x"}` ([`digest::hex`]) |
//! | Keepalive | 17 | both, either connection | empty; only to a peer whose hello/answer had `keepalive_ms` > 0 |
//! | Resend | 18 | D→S (prio) | exactly a `u32` count (1..=64) of pages at `arg`; only with `crc32c` |
//!
//! ## States
//! See [`status`]: `setup → precopy → switchover → (postcopy ⇄ postcopy-paused → resuming)
//! → completed`, `cancelled` before switchover, `failed` from anywhere not final.

pub mod bitmap;
pub mod digest;
pub mod dirty;
pub mod hops;
pub mod link;
pub mod precopy;
pub mod proto;
pub mod pull;
pub mod push;
mod rate;
pub mod reader;
pub mod status;
pub mod tls;
pub mod wire;
