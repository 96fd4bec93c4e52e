//! The virtio vsock device (virtio 1.2, section 5.10), stream sockets only, with the host
//! side as Firecracker's "hybrid vsock" over Unix sockets.
//!
//! # The device
//!
//! Device type 19, three queues of at most 256 entries: 0 rx (packets to the guest), 1 tx
//! (packets from the guest), 2 event: the device sends one event, `VIRTIO_VSOCK_EVENT_TRANSPORT_RESET`
//! (`le32 id = 0`), after a snapshot restore, as Firecracker does: connections are not
//! carried through a snapshot, the guest drops its own and starts over.
//! Configuration space: `le64 guest_cid` at offset 0. No feature bits are offered (so no
//! `VIRTIO_VSOCK_F_SEQPACKET`: stream sockets only). The host's CID is 2. The packet header
//! is in [`packet`].
//!
//! # The host side: Unix sockets (Firecracker's hybrid vsock)
//!
//! - **Host-initiated**: the device listens on the Unix socket `uds_path`. A host process
//!   connects and writes `CONNECT <port>\n` (decimal, at most 32 bytes with the newline; a
//!   longer or malformed line closes that stream, nothing else). The device sends the guest
//!   `OP_REQUEST` from (CID 2, an ephemeral local port, from 2^30 up) to (guest CID, port).
//!   On the guest's `OP_RESPONSE` it writes `OK <local port>\n` to the host stream, and bytes
//!   then flow both ways; on `OP_RST` it closes the host stream.
//! - **Guest-initiated**: the guest sends `OP_REQUEST` to (CID 2, port P); the device
//!   connects (without blocking) to the Unix socket `<uds_path>_<P>` and answers
//!   `OP_RESPONSE`, or `OP_RST` when nothing listens there.
//! - **Data**: `OP_RW` payloads are written to the host stream; host bytes become `OP_RW`
//!   packets of at most 64 KiB, within the guest's credit (its `buf_alloc` less what it has
//!   not consumed, `rx_cnt - fwd_cnt`). The device advertises `buf_alloc` = 256 KiB per
//!   connection and counts in `fwd_cnt` the bytes written to the host stream; bytes the
//!   host stream cannot take yet wait in the connection (the guest overrunning its credit
//!   resets the connection). It answers `OP_CREDIT_REQUEST` with `OP_CREDIT_UPDATE`, sends
//!   one when half its buffer was consumed since the guest last heard, and asks with
//!   `OP_CREDIT_REQUEST` when the guest's credit runs out.
//! - **Closing**, a direction at a time: host EOF sends the guest `OP_SHUTDOWN` with the
//!   send flag (the host may still read: a half-close; a host that closed fully makes the
//!   next write fail with `EPIPE`, and the guest gets `OP_RST`). The guest's `OP_SHUTDOWN`
//!   with the send flag shuts the host stream's write side once the bytes it holds are out;
//!   with the receive flag, host bytes stop. When the guest has shut both ways the device
//!   answers `OP_RST` once its bytes reached the host, and closes the host stream; when the
//!   guest shut its sending side and the host reached EOF, the device sends `OP_SHUTDOWN`
//!   with both flags and forgets the connection. The guest's `OP_RST` closes the host
//!   stream; a host read error resets the connection. A packet for a connection the device
//!   does not know gets `OP_RST` (never an RST).
//! - **Bounds**: at most [`MAX_CONNS`] connections and host streams still sending their
//!   `CONNECT` line (more are accepted and closed at once, after closing the streams that
//!   took longer than [`CONNECT_LINE_DEADLINE`] over their line); at most [`CTL_QUEUE`] control
//!   packets wait for rx buffers (the tx queue is left alone while it is full); a tx packet
//!   whose `len` is past its buffers or past 64 KiB, or an rx buffer smaller than the
//!   header, is malformed (`DeviceError::Request`: the device needs a reset). A packet with
//!   the wrong CIDs, type or op gets `OP_RST`.
//!
//! Every socket is non-blocking. [`Vsock::poll_fds`](crate::VirtioDevice::poll_fds) lists the
//! listener and the host streams whose bytes the device can take now (a stream waiting for
//! an rx buffer or for guest credit is left out until it can go on, so the worker never
//! spins), and an epoll fd that becomes readable when a stream holding guest bytes can be
//! written again.

mod conn;
mod host;
pub mod packet;
#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_flow;

use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use thiserror::Error;
use vmm_sys_util::epoll::Epoll;

use crate::{DeviceError, DeviceType, Queues, VirtioDevice};
use conn::{Conn, PendingHost};
use packet::{HOST_CID, Header, Op, TYPE_STREAM};

/// Queue 0: packets to the guest.
const RX: usize = 0;
/// Queue 1: packets from the guest.
const TX: usize = 1;
/// The event queue.
const EVENT: usize = 2;
/// `VIRTIO_VSOCK_EVENT_TRANSPORT_RESET`.
pub const EVENT_TRANSPORT_RESET: u32 = 0;
/// The largest size of each queue.
const QUEUE_MAX: u16 = 256;
/// The guest CID when the VMM names none.
pub const DEFAULT_GUEST_CID: u64 = 3;
/// The most connections (and host streams still sending their `CONNECT` line).
pub const MAX_CONNS: usize = 256;
/// The most control packets waiting for rx buffers.
pub const CTL_QUEUE: usize = 1024;
/// How long a host stream may take to send its `CONNECT` line before it may be closed to
/// make room for another (when all [`MAX_CONNS`] are taken).
pub const CONNECT_LINE_DEADLINE: Duration = Duration::from_secs(5);
/// The first ephemeral local port of host-initiated connections.
const FIRST_LOCAL_PORT: u32 = 1 << 30;

/// Making the device failed.
#[derive(Debug, Error)]
pub enum VsockError {
    /// The guest CID is reserved (0, 1, 2, `u32::MAX`) or past 32 bits.
    #[error("guest CID {0} is reserved or out of range")]
    Cid(u64),
    /// The listening socket could not be bound.
    #[error("binding the vsock Unix socket {path}")]
    Bind {
        /// Its path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The listener or the writability epoll could not be set up.
    #[error("setting up the vsock device: {what}")]
    Setup {
        /// What.
        what: &'static str,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
}

/// What the device has done, readable while it runs.
#[derive(Debug, Default)]
pub struct VsockStats {
    /// Connections established (both directions).
    pub connections: AtomicU64,
    /// Connections turned away: host streams over the limit or with a bad `CONNECT` line,
    /// guest requests nothing listens for.
    pub refused: AtomicU64,
    /// Packets given to the guest.
    pub rx_packets: AtomicU64,
    /// Payload bytes given to the guest.
    pub rx_bytes: AtomicU64,
    /// Packets taken from the guest.
    pub tx_packets: AtomicU64,
    /// Payload bytes taken from the guest.
    pub tx_bytes: AtomicU64,
    /// `OP_RST` packets sent to the guest.
    pub resets: AtomicU64,
}

/// A connection's key: (host-side port, guest port).
type Key = (u32, u32);

/// The vsock device: a guest CID, the host's Unix listener and its connections.
#[derive(Debug)]
pub struct Vsock {
    guest_cid: u64,
    uds_path: PathBuf,
    listener: UnixListener,
    /// Readable when a stream registered in it (one holding guest bytes) is writable.
    out_epoll: Epoll,
    /// Streams that connected and have not finished their `CONNECT` line, by fd.
    pending: HashMap<RawFd, PendingHost>,
    conns: BTreeMap<Key, Conn>,
    by_fd: HashMap<RawFd, Key>,
    /// Control packets (no payload) waiting for rx buffers.
    ctl: VecDeque<Header>,
    /// The tx queue was left with chains because `ctl` was full.
    tx_stalled: bool,
    /// accept(2) failed other than `EAGAIN` (out of fds): leave the listener until a
    /// connection goes away.
    listener_paused: bool,
    /// The next ephemeral local port to try.
    next_port: u32,
    /// [`CONNECT_LINE_DEADLINE`] (shorter in tests).
    line_deadline: Duration,
    /// The connection served last (rx round robin).
    last_served: Option<Key>,
    /// Streams closed (shut down) since the worker last asked for [`poll_fds`]: their fds
    /// are released then, once the worker knows not to poll them. Released earlier, a
    /// stream accepted later in the same epoll batch could reuse the number, and the
    /// worker, seeing a number it already polls, would never register the new stream.
    ///
    /// [`poll_fds`]: VirtioDevice::poll_fds
    graveyard: RefCell<Vec<UnixStream>>,
    stats: Arc<VsockStats>,
    /// A transport reset event waits for an event buffer (after a restore).
    reset_event: bool,
}

impl Vsock {
    /// A vsock device for a guest with CID `guest_cid` (usually [`DEFAULT_GUEST_CID`]),
    /// listening for host connections on the Unix socket `uds_path` (which must not exist;
    /// it is removed when the device is dropped). Guest-initiated connections go to
    /// `<uds_path>_<port>`.
    pub fn new(guest_cid: u64, uds_path: &Path) -> Result<Vsock, VsockError> {
        if guest_cid <= HOST_CID || guest_cid >= u64::from(u32::MAX) {
            return Err(VsockError::Cid(guest_cid));
        }
        let listener = UnixListener::bind(uds_path).map_err(|source| VsockError::Bind {
            path: uds_path.to_path_buf(),
            source,
        })?;
        let setup = || -> Result<Epoll, VsockError> {
            listener
                .set_nonblocking(true)
                .map_err(|source| VsockError::Setup {
                    what: "making the listener non-blocking",
                    source,
                })?;
            Epoll::new().map_err(|source| VsockError::Setup {
                what: "epoll_create",
                source,
            })
        };
        let out_epoll = setup().inspect_err(|_| {
            let _ = std::fs::remove_file(uds_path);
        })?;
        Ok(Vsock {
            guest_cid,
            uds_path: uds_path.to_path_buf(),
            listener,
            out_epoll,
            pending: HashMap::new(),
            conns: BTreeMap::new(),
            by_fd: HashMap::new(),
            ctl: VecDeque::new(),
            tx_stalled: false,
            listener_paused: false,
            next_port: FIRST_LOCAL_PORT,
            line_deadline: CONNECT_LINE_DEADLINE,
            last_served: None,
            graveyard: RefCell::new(Vec::new()),
            stats: Arc::default(),
            reset_event: false,
        })
    }

    /// The same device with another `CONNECT` line deadline (tests).
    #[cfg(test)]
    fn with_line_deadline(mut self, d: Duration) -> Vsock {
        self.line_deadline = d;
        self
    }

    /// Its counters.
    pub fn stats(&self) -> Arc<VsockStats> {
        self.stats.clone()
    }

    /// The guest's CID.
    pub fn guest_cid(&self) -> u64 {
        self.guest_cid
    }

    /// The Unix socket host processes connect to.
    pub fn uds_path(&self) -> &Path {
        &self.uds_path
    }

    /// A packet header from the host to the guest for connection `key`.
    fn hdr(&self, key: Key, op: Op) -> Header {
        let (buf_alloc, fwd_cnt) = match self.conns.get(&key) {
            Some(c) => (conn::BUF_ALLOC, c.fwd_cnt),
            None => (0, 0),
        };
        Header {
            src_cid: HOST_CID,
            dst_cid: self.guest_cid,
            src_port: key.0,
            dst_port: key.1,
            len: 0,
            type_: TYPE_STREAM,
            op: op as u16,
            flags: 0,
            buf_alloc,
            fwd_cnt,
        }
    }

    /// Queue a control packet for connection `key` (the caller made sure there is room).
    fn queue_ctl(&mut self, key: Key, op: Op, flags: u32) {
        let mut h = self.hdr(key, op);
        h.flags = flags;
        if let Some(c) = self.conns.get_mut(&key) {
            c.fwd_cnt_sent = c.fwd_cnt;
        }
        self.ctl.push_back(h);
    }

    /// Whether `n` more control packets fit.
    fn ctl_room(&self, n: usize) -> bool {
        self.ctl.len() + n <= CTL_QUEUE
    }

    /// Forget connection `key` and close its host stream (its fd is released at the next
    /// call into the device).
    fn remove(&mut self, key: Key) {
        if let Some(c) = self.conns.remove(&key) {
            let fd = c.stream.as_raw_fd();
            self.by_fd.remove(&fd);
            if c.out_polled {
                let _ = self.out_epoll.ctl(
                    vmm_sys_util::epoll::ControlOperation::Delete,
                    fd,
                    vmm_sys_util::epoll::EpollEvent::default(),
                );
            }
            // The host sees the end now, whatever the worker does with the fd.
            let _ = c.stream.shutdown(std::net::Shutdown::Both);
            self.graveyard.get_mut().push(c.stream);
            self.listener_paused = false;
        }
    }

    /// Reset connection `key`: `OP_RST` to the guest and forget it.
    fn reset_conn(&mut self, key: Key) {
        self.queue_ctl(key, Op::Rst, 0);
        self.stats.resets.fetch_add(1, Ordering::Relaxed);
        self.remove(key);
    }

    /// Move everything that can move: control packets and host bytes into rx buffers, and
    /// the tx queue when it was left for want of control-queue room.
    fn pump(&mut self, qs: &mut Queues<'_>) -> Result<(), DeviceError> {
        loop {
            self.fill_rx(qs)?;
            if !(self.tx_stalled && self.ctl_room(2)) {
                return Ok(());
            }
            let before = self.ctl.len();
            self.process_tx(qs)?;
            if self.ctl.len() == before {
                return Ok(());
            }
        }
    }

    /// Take the guest's packets off the tx queue while replies fit.
    fn process_tx(&mut self, qs: &mut Queues<'_>) -> Result<(), DeviceError> {
        if !qs.ready(TX) {
            return Ok(());
        }
        loop {
            if !self.ctl_room(2) {
                self.tx_stalled = true;
                return Ok(());
            }
            let Some(chain) = qs.pop(TX)? else {
                self.tx_stalled = false;
                return Ok(());
            };
            let (h, payload) = packet::read_tx(qs.mem(), &chain, TX)?;
            qs.complete(TX, &chain, 0)?;
            self.stats.tx_packets.fetch_add(1, Ordering::Relaxed);
            self.stats
                .tx_bytes
                .fetch_add(payload.len() as u64, Ordering::Relaxed);
            self.handle_guest(h, &payload);
        }
    }

    /// The next connection whose host bytes can go to the guest now (round robin).
    fn next_ready(&self) -> Option<Key> {
        let ok = |c: &Conn| c.rx_hint && c.relaying() && c.peer_credit() > 0;
        let after = self.last_served.map(|k| {
            self.conns
                .range((std::ops::Bound::Excluded(k), std::ops::Bound::Unbounded))
        });
        after
            .into_iter()
            .flatten()
            .chain(self.conns.iter())
            .find(|(_, c)| ok(c))
            .map(|(k, _)| *k)
    }

    /// Fill rx buffers: control packets first, then host bytes.
    fn fill_rx(&mut self, qs: &mut Queues<'_>) -> Result<(), DeviceError> {
        if !qs.ready(RX) {
            return Ok(());
        }
        let mut data = Vec::new();
        loop {
            if let Some(h) = self.ctl.front().copied() {
                let Some(chain) = qs.pop(RX)? else {
                    return Ok(());
                };
                packet::rx_room(&chain, RX)?;
                let n = packet::write_rx(qs.mem(), &chain, RX, &h, &[])?;
                qs.complete(RX, &chain, n)?;
                self.ctl.pop_front();
                self.stats.rx_packets.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            let Some(key) = self.next_ready() else {
                let before = self.ctl.len();
                self.ask_credit();
                if self.ctl.len() > before {
                    continue;
                }
                return Ok(());
            };
            let Some(chain) = qs.pop(RX)? else {
                return Ok(());
            };
            let room = packet::rx_room(&chain, RX)?;
            if room == 0 {
                // A buffer with room for a header only (a read of 0 bytes would look like
                // EOF): it takes a credit update, and the bytes go to the next buffer.
                qs.unpop(RX);
                self.queue_ctl(key, Op::CreditUpdate, 0);
                continue;
            }
            let Some(c) = self.conns.get_mut(&key) else {
                qs.unpop(RX);
                continue;
            };
            self.last_served = Some(key);
            let want = room.min(c.peer_credit()) as usize;
            data.resize(want, 0);
            match c.read_host(&mut data) {
                conn::HostRead::Data(n) => {
                    c.rx_cnt = c.rx_cnt.wrapping_add(n as u32);
                    let h = self.hdr(key, Op::Rw);
                    if let Some(c) = self.conns.get_mut(&key) {
                        c.fwd_cnt_sent = c.fwd_cnt;
                    }
                    let w = packet::write_rx(qs.mem(), &chain, RX, &h, &data[..n])?;
                    qs.complete(RX, &chain, w)?;
                    self.stats.rx_packets.fetch_add(1, Ordering::Relaxed);
                    self.stats.rx_bytes.fetch_add(n as u64, Ordering::Relaxed);
                }
                conn::HostRead::WouldBlock => {
                    c.rx_hint = false;
                    qs.unpop(RX);
                }
                conn::HostRead::Eof => {
                    qs.unpop(RX);
                    self.host_closed(key, None);
                }
                conn::HostRead::Failed(e) => {
                    qs.unpop(RX);
                    self.host_closed(key, Some(e));
                }
            }
        }
    }

    /// Ask the guest for credit on connections whose host bytes wait for it (once each).
    fn ask_credit(&mut self) {
        let starved: Vec<Key> = self
            .conns
            .iter()
            .filter(|(_, c)| {
                c.rx_hint && c.relaying() && c.peer_credit() == 0 && !c.credit_requested
            })
            .map(|(k, _)| *k)
            .collect();
        for key in starved {
            if !self.ctl_room(1) {
                return;
            }
            self.queue_ctl(key, Op::CreditRequest, 0);
            if let Some(c) = self.conns.get_mut(&key) {
                c.credit_requested = true;
            }
        }
    }

    /// Close every connection and forget every packet (a device reset).
    /// Put a waiting transport reset event in the guest's next event buffer.
    fn send_reset_event(&mut self, qs: &mut Queues<'_>) -> Result<(), DeviceError> {
        if !self.reset_event {
            return Ok(());
        }
        let Some(c) = qs.pop(EVENT)? else {
            return Ok(());
        };
        let n = c
            .write_at(qs.mem(), 0, &EVENT_TRANSPORT_RESET.to_le_bytes())
            .map_err(|source| DeviceError::Memory {
                queue: EVENT,
                source,
            })?;
        qs.complete(EVENT, &c, n as u32)?;
        self.reset_event = false;
        Ok(())
    }

    fn clear(&mut self) {
        let keys: Vec<Key> = self.conns.keys().copied().collect();
        for k in keys {
            self.remove(k);
        }
        for (_, p) in self.pending.drain() {
            let _ = p.stream.shutdown(std::net::Shutdown::Both);
            self.graveyard.get_mut().push(p.stream);
        }
        self.ctl.clear();
        self.tx_stalled = false;
        self.last_served = None;
    }
}

impl Drop for Vsock {
    /// The listening socket's path goes with the device (a new device can bind it again).
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_file(&self.uds_path) {
            tracing::debug!("vsock: removing {}: {e}", self.uds_path.display());
        }
    }
}

impl VirtioDevice for Vsock {
    fn device_type(&self) -> DeviceType {
        DeviceType::Vsock
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![QUEUE_MAX; 3]
    }

    fn features(&self) -> u64 {
        0
    }

    fn config(&self) -> Vec<u8> {
        self.guest_cid.to_le_bytes().to_vec()
    }

    fn activate(&mut self, _features: u64) -> Result<(), DeviceError> {
        Ok(())
    }

    fn reset(&mut self) {
        self.clear();
        self.reset_event = false;
    }

    /// Connections are not carried: the restored device starts with none and queues a
    /// `VIRTIO_VSOCK_EVENT_TRANSPORT_RESET` for the guest (sent on the event queue once it
    /// has a buffer), as Firecracker does after a snapshot restore.
    fn restore_state(&mut self, bytes: &[u8]) -> Result<(), DeviceError> {
        if !bytes.is_empty() {
            return Err(DeviceError::State {
                what: format!("{} bytes for vsock, which saves none", bytes.len()),
            });
        }
        self.clear();
        self.reset_event = true;
        Ok(())
    }

    fn process_queue(&mut self, qs: &mut Queues<'_>, index: usize) -> Result<(), DeviceError> {
        match index {
            TX => self.process_tx(qs)?,
            RX => {}
            EVENT => return self.send_reset_event(qs),
            _ => return Ok(()),
        }
        self.pump(qs)
    }

    fn poll_fds(&self) -> Vec<RawFd> {
        // The worker stops polling what is not listed here: the closed streams can go.
        self.graveyard.borrow_mut().clear();
        let mut fds = Vec::new();
        if !self.listener_paused && self.ctl_room(1) {
            fds.push(self.listener.as_raw_fd());
        }
        if self.ctl_room(1) {
            fds.extend(self.pending.keys().copied());
        }
        let mut out = false;
        for c in self.conns.values() {
            out |= c.out_polled;
            if c.relaying() && !c.rx_hint && c.peer_credit() > 0 {
                fds.push(c.stream.as_raw_fd());
            }
        }
        // Writing out may end a connection (a control packet): not while they are full.
        if out && self.ctl_room(2) {
            fds.push(self.out_epoll.as_raw_fd());
        }
        fds
    }

    fn backend_ready(&mut self, qs: &mut Queues<'_>, fd: RawFd) -> Result<(), DeviceError> {
        if fd == self.listener.as_raw_fd() {
            self.accept();
        } else if fd == self.out_epoll.as_raw_fd() {
            self.writable()?;
        } else if self.pending.contains_key(&fd) {
            self.connect_line(fd);
        } else if let Some(key) = self.by_fd.get(&fd).copied() {
            if let Some(c) = self.conns.get_mut(&key) {
                c.rx_hint = true;
            }
        }
        self.pump(qs)
    }
}
