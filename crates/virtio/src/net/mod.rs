//! The virtio network device (virtio 1.2, section 5.1), with no offloads.
//!
//! # Device
//!
//! - Queues: 0 = receiveq, 1 = transmitq, at most [`QUEUE_SIZE`] entries each; no control
//!   queue, no multiqueue.
//! - Features: `VIRTIO_NET_F_MAC` (5) and `VIRTIO_NET_F_STATUS` (16); no checksum or
//!   segmentation offloads, no mergeable receive buffers.
//! - Configuration space (8 bytes, little-endian):
//!
//!   | offset | size | field | value |
//!   |---|---|---|---|
//!   | 0 | 6 | `mac` | the MAC given to [`Net::new`] |
//!   | 6 | 2 | `status` | 1 = `VIRTIO_NET_S_LINK_UP` |
//!
//! # Frames on the rings
//!
//! Every frame is preceded by the 12-byte `virtio_net_hdr_v1` (`VERSION_1` is always
//! negotiated): `flags` u8, `gso_type` u8, `hdr_len` u16, `gso_size` u16, `csum_start`
//! u16, `csum_offset` u16, `num_buffers` u16.
//!
//! - **Transmit**: a chain's readable bytes are the header (ignored: no offload was offered)
//!   and the frame. A chain shorter than the header, or whose frame is longer than
//!   [`MAX_FRAME`] bytes, is a malformed request: the device asks for a reset. A frame
//!   shorter than an Ethernet header ([`ETH_HLEN`]) is dropped and counted. The frame is
//!   given to the backend and the chain completed with length 0. A frame the backend
//!   refuses for now (`EAGAIN`, `ENOBUFS`) or for itself (`EINVAL`, `EMSGSIZE`) is dropped
//!   and counted ([`NetStats::dropped`]), the device's thread never waits; a backend that
//!   is gone (any other error: `EIO`, `EBADFD` after the tap was deleted, `EPIPE` or
//!   `ECONNREFUSED` once a socket's peer closed) fails the device
//!   ([`DeviceError::Backend`]).
//! - **Receive**: when the backend's fd is readable the device reads frames and puts each in
//!   a receive chain as a zero header with `num_buffers` = 1 then the frame, completing the
//!   chain with the bytes written. A frame that does not fit the chain's writable space is
//!   dropped and counted, and the chain stays available for the next frame. When no receive
//!   chain is available the frame is held (one frame) and the backend's fd is no longer
//!   polled until the driver adds receive buffers and notifies queue 0.
//!
//! # Backends
//!
//! [`NetBackend`]: [`Tap`] (a Linux tap interface) and [`SocketBackend`] (a Unix
//! `SOCK_SEQPACKET` socket, one message a frame).

mod backend;
mod tap;

use std::io;
use std::os::fd::RawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

pub use backend::{NetBackend, SocketBackend, SocketError};
pub use tap::{Tap, TapError};

use crate::chain::Chain;
use crate::device::{DeviceError, DeviceType, Queues, VirtioDevice};

/// Receive queue index.
pub const RX: usize = 0;
/// Transmit queue index.
pub const TX: usize = 1;
/// Largest size of each queue.
pub const QUEUE_SIZE: u16 = 256;
/// The longest frame (without the header) the device transmits or receives.
pub const MAX_FRAME: usize = 65550;
/// The shortest frame transmitted: an Ethernet header (shorter ones are dropped and counted).
pub const ETH_HLEN: usize = 14;
/// Length of `virtio_net_hdr_v1`.
pub const HDR_LEN: usize = 12;

/// `VIRTIO_NET_F_MAC`.
pub const F_MAC: u64 = 1 << 5;
/// `VIRTIO_NET_F_STATUS`.
pub const F_STATUS: u64 = 1 << 16;
/// `VIRTIO_NET_S_LINK_UP`.
pub const S_LINK_UP: u16 = 1;

/// The read buffer: larger than any frame a tap can hold (65535-byte MTU, Ethernet header,
/// a VLAN tag), so a tap's read never cuts a frame and a socket's longer one is seen as such.
const RX_BUF: usize = 65536 + 64;

/// Frames read from the backend per call at most.
const RX_BUDGET: usize = 2 * QUEUE_SIZE as usize;

/// What the device moved, counted since it was made (shared: read it from any thread).
#[derive(Debug, Default)]
pub struct NetStats {
    /// Frames given to the backend.
    pub tx_frames: AtomicU64,
    /// Their bytes (frames only, no header).
    pub tx_bytes: AtomicU64,
    /// Frames put in receive buffers.
    pub rx_frames: AtomicU64,
    /// Their bytes (frames only, no header).
    pub rx_bytes: AtomicU64,
    /// Frames dropped: refused by the backend, or too big for the receive buffer.
    pub dropped: AtomicU64,
}

/// Whether the driver has set `DRIVER_OK`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Made, or reset.
    Idle,
    /// Activated.
    Active,
}

/// The receive side's one-frame slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Slot {
    /// Nothing read from the backend waits.
    Empty,
    /// A frame of this length, read from the backend, waits in the buffer for a receive chain.
    Held(usize),
}

/// The virtio-net device.
pub struct Net {
    backend: Box<dyn NetBackend>,
    mac: [u8; 6],
    state: State,
    slot: Slot,
    rx_buf: Vec<u8>,
    tx_buf: Vec<u8>,
    stats: Arc<NetStats>,
}

impl std::fmt::Debug for Net {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Net")
            .field("mac", &self.mac)
            .field("state", &self.state)
            .field("slot", &self.slot)
            .field("stats", &self.stats)
            .finish_non_exhaustive()
    }
}

/// Whether a send error refuses only this frame (drop it) rather than meaning the backend
/// is gone.
fn refused(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::WouldBlock
        || matches!(
            e.raw_os_error(),
            Some(libc::ENOBUFS | libc::EINVAL | libc::EMSGSIZE | libc::EAGAIN)
        )
}

impl Net {
    /// A device over `backend` with MAC address `mac`.
    pub fn new(backend: Box<dyn NetBackend>, mac: [u8; 6]) -> Net {
        Net {
            backend,
            mac,
            state: State::Idle,
            slot: Slot::Empty,
            rx_buf: vec![0; RX_BUF],
            tx_buf: vec![0; HDR_LEN + MAX_FRAME],
            stats: Arc::default(),
        }
    }

    /// Its counters.
    pub fn stats(&self) -> Arc<NetStats> {
        self.stats.clone()
    }

    fn transmit(&mut self, qs: &mut Queues<'_>) -> Result<(), DeviceError> {
        while let Some(c) = qs.pop(TX)? {
            let total = c.readable_len();
            if total < HDR_LEN as u64 {
                return Err(DeviceError::Request {
                    queue: TX,
                    what: format!("a transmit chain of {total} bytes is shorter than the header"),
                });
            }
            let len = total - HDR_LEN as u64;
            if len > MAX_FRAME as u64 {
                return Err(DeviceError::Request {
                    queue: TX,
                    what: format!("a transmit frame of {len} bytes is over {MAX_FRAME}"),
                });
            }
            if len < ETH_HLEN as u64 {
                // Not an Ethernet frame (a tap refuses it; on a socket an empty message
                // would read as the end of the link): dropped, as a wire would.
                self.stats.dropped.fetch_add(1, Ordering::Relaxed);
                qs.complete(TX, &c, 0)?;
                continue;
            }
            let buf = &mut self.tx_buf[..HDR_LEN + len as usize];
            c.read_at(qs.mem(), 0, buf)
                .map_err(|source| DeviceError::Memory { queue: TX, source })?;
            let frame = &buf[HDR_LEN..];
            match self.backend.send(frame) {
                Ok(()) => {
                    self.stats.tx_frames.fetch_add(1, Ordering::Relaxed);
                    self.stats.tx_bytes.fetch_add(len, Ordering::Relaxed);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {
                    // retry once: a signal is not the frame's fault
                    if let Err(e) = self.backend.send(frame) {
                        self.send_failed(e)?;
                    }
                }
                Err(e) => self.send_failed(e)?,
            }
            qs.complete(TX, &c, 0)?;
        }
        Ok(())
    }

    fn send_failed(&self, e: io::Error) -> Result<(), DeviceError> {
        if refused(&e) {
            self.stats.dropped.fetch_add(1, Ordering::Relaxed);
            tracing::debug!("virtio-net: frame dropped: {e}");
            Ok(())
        } else {
            Err(DeviceError::Backend {
                what: "net send".into(),
                source: e,
            })
        }
    }

    /// Move frames from the backend to receive chains while both exist.
    /// At most [`RX_BUDGET`] frames are read per call (the fd stays polled: the worker comes
    /// back), so a flood cannot hold the device's thread.
    fn receive(&mut self, qs: &mut Queues<'_>) -> Result<(), DeviceError> {
        for _ in 0..RX_BUDGET {
            let len = match self.slot {
                Slot::Held(n) => n,
                Slot::Empty => match self.backend.recv(&mut self.rx_buf) {
                    Ok(n) if n > MAX_FRAME || n > self.rx_buf.len() => {
                        self.stats.dropped.fetch_add(1, Ordering::Relaxed);
                        continue;
                    }
                    Ok(n) => {
                        self.slot = Slot::Held(n);
                        n
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        return Err(DeviceError::Backend {
                            what: "net receive".into(),
                            source: e,
                        });
                    }
                },
            };
            if !qs.ready(RX) {
                return Ok(());
            }
            let Some(c) = qs.pop(RX)? else {
                return Ok(()); // held until the driver gives a buffer and notifies queue 0
            };
            self.slot = Slot::Empty;
            if c.writable_len() < HDR_LEN as u64 {
                return Err(DeviceError::Request {
                    queue: RX,
                    what: format!(
                        "a receive chain of {} writable bytes cannot hold the header",
                        c.writable_len()
                    ),
                });
            }
            if c.writable_len() < (HDR_LEN + len) as u64 {
                // Too big for this buffer: drop the frame, keep the buffer for the next one.
                qs.unpop(RX);
                self.stats.dropped.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            self.put_frame(qs, &c, len)?;
        }
        Ok(())
    }

    fn put_frame(&self, qs: &mut Queues<'_>, c: &Chain, len: usize) -> Result<(), DeviceError> {
        let mut hdr = [0u8; HDR_LEN];
        hdr[10..12].copy_from_slice(&1u16.to_le_bytes()); // num_buffers
        let mem = qs.mem();
        let mem_err = |source| DeviceError::Memory { queue: RX, source };
        c.write_at(mem, 0, &hdr).map_err(mem_err)?;
        c.write_at(mem, HDR_LEN as u64, &self.rx_buf[..len])
            .map_err(mem_err)?;
        qs.complete(RX, c, (HDR_LEN + len) as u32)?;
        self.stats.rx_frames.fetch_add(1, Ordering::Relaxed);
        self.stats.rx_bytes.fetch_add(len as u64, Ordering::Relaxed);
        Ok(())
    }
}

impl VirtioDevice for Net {
    fn device_type(&self) -> DeviceType {
        DeviceType::Net
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![QUEUE_SIZE, QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        F_MAC | F_STATUS
    }

    fn config(&self) -> Vec<u8> {
        let mut c = self.mac.to_vec();
        c.extend_from_slice(&S_LINK_UP.to_le_bytes());
        c
    }

    fn activate(&mut self, _features: u64) -> Result<(), DeviceError> {
        self.state = State::Active;
        Ok(())
    }

    fn reset(&mut self) {
        self.state = State::Idle;
        self.slot = Slot::Empty;
    }

    /// The MAC (6 bytes). A frame read from the backend and held for a receive chain is not
    /// saved: it is dropped (as a switch may drop one), and the restored device starts
    /// with an empty slot.
    fn save_state(&self) -> Vec<u8> {
        self.mac.to_vec()
    }

    fn restore_state(&mut self, bytes: &[u8]) -> Result<(), DeviceError> {
        if bytes != self.mac {
            return Err(DeviceError::State {
                what: format!("saved MAC {bytes:02x?}, this device {:02x?}", self.mac),
            });
        }
        self.slot = Slot::Empty;
        Ok(())
    }

    fn process_queue(&mut self, qs: &mut Queues<'_>, index: usize) -> Result<(), DeviceError> {
        if self.state != State::Active {
            return Ok(());
        }
        match index {
            RX => self.receive(qs),
            TX => self.transmit(qs),
            _ => Ok(()),
        }
    }

    fn poll_fds(&self) -> Vec<RawFd> {
        match (self.state, self.slot) {
            (State::Active, Slot::Empty) => vec![self.backend.fd()],
            _ => Vec::new(),
        }
    }

    fn backend_ready(&mut self, qs: &mut Queues<'_>, fd: RawFd) -> Result<(), DeviceError> {
        if self.state != State::Active || fd != self.backend.fd() {
            return Ok(());
        }
        self.receive(qs)
    }
}

#[cfg(test)]
mod tap_tests;
#[cfg(test)]
mod tests;
#[cfg(test)]
mod worker_tests;
