//! The migration wire format: 16-byte frame headers, their checks, the two transports (TCP and
//! Unix stream sockets), and the bandwidth cap shared by both connections.
//!
//! A frame is a header followed by `len` bytes of payload:
//!
//! | bytes | field | meaning |
//! |---|---|---|
//! | 0 | `kind` | [`Kind`] |
//! | 1 | `flags` | bit 0 [`FLAG_CRC`]: a CRC32C trailer follows; other bits reserved (refused) |
//! | 2..4 | `magic` | `0x464c` (`"FL"`, little-endian): catches a stream out of step |
//! | 4..8 | `len` | payload bytes, little-endian; at most [`Kind::max_len`] |
//! | 8..16 | `arg` | little-endian; meaning per kind (a guest-physical address for pages) |
//!
//! With [`FLAG_CRC`] (only when both hellos offered `crc32c`), the payload is followed by 4
//! bytes not counted in `len`: the CRC32C (Castagnoli, as the `crc32c` crate computes it,
//! hardware-accelerated), little-endian, of the 16 header bytes as sent (flags included)
//! followed by the payload. [`read_frame_checked`] verifies it after reading the whole frame,
//! so a damaged frame ([`RecvError::Checksum`]) leaves the stream in step.
//!
//! [`Header::decode`] checks every header from the peer: the magic, a known kind, known flags,
//! and the payload length against the kind's exact size or bound ([`Kind::check`]), so no
//! payload is read before its size is known to fit. Payloads with structure are parsed by
//! checked functions ([`count`], and `bitmap::bytes_to_words` for bitmaps); nothing indexes a short
//! payload. [`read_frame`] is the one reader of frames from a stream (fuzzed by the tests).

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::{AtomicU64, Ordering::SeqCst};
use std::time::{Duration, Instant};

use thiserror::Error;

use crate::link::stalled;
pub use crate::link::{Beat, Direction, Keepalive, LINK_DEADLINE_ENV, Stalled, link_deadline};

/// The frame magic.
pub const MAGIC: u16 = 0x464c;
/// Header flag: a 4-byte CRC32C trailer follows the payload (negotiated in the hello).
pub const FLAG_CRC: u8 = 0x01;
/// Header size.
pub const HEADER: usize = 16;
/// Page size on the wire.
pub const PAGE: u64 = 4096;
/// Most pages in one `Pages` frame.
pub const MAX_RUN: u64 = 64;

/// What a frame carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    /// Source → destination, first frame on each connection: JSON [`super::Hello`].
    Hello = 1,
    /// Destination → source: JSON [`super::HelloAck`].
    HelloAck = 2,
    /// Source → destination: `len / 4096` whole pages at guest-physical `arg`.
    Pages = 3,
    /// Source → destination: zero pages at `arg`; payload: `u32` count.
    Zero = 4,
    /// Source → destination: a pre-copy round begins; payload: JSON `{round, pages}`.
    Round = 5,
    /// Source → destination: the guest is paused; JSON [`super::Switch`] follows.
    Switch = 6,
    /// Source → destination: the machine state (for a VM, the snapshot `state.bin` encoding).
    State = 7,
    /// Source → destination: bitmap of pages the destination must still receive, from page
    /// `arg` (bit `i` of byte `j`: page `arg + 8j + i`).
    Needed = 8,
    /// Destination → source: the vCPUs run. JSON `{}`.
    Resumed = 9,
    /// Destination → source (priority connection): a vCPU faulted on page `arg`; payload:
    /// `u32` pages wanted.
    Request = 10,
    /// Source → destination: every page has been sent. JSON [`super::End`].
    End = 11,
    /// Destination → source: every page is in. JSON [`super::DestReport`].
    Done = 12,
    /// Either way: the sender gives up. JSON `{"error": ..}`.
    Error = 13,
    /// Destination → source after a `resume` hello: the pages still needed (bitmap from
    /// `arg`, as `Needed`).
    Recover = 14,
    /// Source → destination: the migration is cancelled (pre-copy gave up); JSON
    /// `{"reason": ..}`. The source guest runs on.
    Cancel = 15,
    /// Source → destination: the source's digest of guest memory at switchover, computed
    /// from its (frozen) memory. JSON `{"digest": "0x.."}`.
    Verdict = 16,
    /// Either way, either connection: nothing to say, the link is alive; empty payload.
    /// Sent only to a peer that announced keepalives in its hello or answer
    /// (`keepalive_ms`): a peer of the old code would refuse it as an unknown kind.
    Keepalive = 17,
    /// Destination → source (priority connection): the pages at `arg` arrived damaged (a
    /// CRC32C mismatch): send them again, even though they were sent; payload: `u32` count
    /// (1..=64). Sent only when CRC32C trailers were negotiated.
    Resend = 18,
}

impl Kind {
    fn from_u8(b: u8) -> Option<Kind> {
        use Kind::*;
        Some(match b {
            1 => Hello,
            2 => HelloAck,
            3 => Pages,
            4 => Zero,
            5 => Round,
            6 => Switch,
            7 => State,
            8 => Needed,
            9 => Resumed,
            10 => Request,
            11 => End,
            12 => Done,
            13 => Error,
            14 => Recover,
            15 => Cancel,
            16 => Verdict,
            17 => Kind::Keepalive,
            18 => Kind::Resend,
            _ => return None,
        })
    }

    /// The largest payload a frame of this kind may carry.
    pub fn max_len(self) -> u32 {
        match self {
            Kind::Pages => (MAX_RUN * PAGE) as u32,
            Kind::Zero | Kind::Request | Kind::Resend => 4,
            Kind::Keepalive => 0,
            Kind::State => 16 << 20,
            // 64 GiB of memory: 2 MiB of bitmap.
            Kind::Needed | Kind::Recover => 2 << 20,
            _ => 1 << 20,
        }
    }

    /// Check a payload length (and the argument) against this kind: the exact size where the
    /// kind has one (`Zero` and `Request`: a `u32`; `Keepalive`: nothing), whole aligned pages
    /// for `Pages`, whole `u64` words for bitmaps, and [`max_len`](Self::max_len) for all.
    pub fn check(self, len: u32, arg: u64) -> Result<(), FrameError> {
        let max = self.max_len();
        if len > max {
            return Err(FrameError::TooLong {
                kind: self,
                len,
                max,
            });
        }
        let exact = |want: u32| {
            if len == want {
                Ok(())
            } else {
                Err(FrameError::Length {
                    kind: self,
                    len,
                    want,
                })
            }
        };
        match self {
            Kind::Zero | Kind::Request | Kind::Resend => exact(4),
            Kind::Keepalive => exact(0),
            Kind::Pages if len == 0 || u64::from(len) % PAGE != 0 || arg % PAGE != 0 => {
                Err(FrameError::Unaligned { arg, len })
            }
            Kind::Needed | Kind::Recover if len % 8 != 0 => Err(FrameError::Length {
                kind: self,
                len,
                want: len / 8 * 8,
            }),
            _ => Ok(()),
        }
    }
}

/// The `u32` count of a `Zero` or `Request` payload: exactly 4 bytes, at least 1, at most
/// `max` (the peer's sizes are bounded before use).
pub fn count(kind: Kind, payload: &[u8], max: u32) -> Result<u32, FrameError> {
    let b: [u8; 4] = payload.try_into().map_err(|_| FrameError::Length {
        kind,
        len: payload.len() as u32,
        want: 4,
    })?;
    let n = u32::from_le_bytes(b);
    if n == 0 || n > max {
        return Err(FrameError::Count { kind, n, max });
    }
    Ok(n)
}

/// A frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// Kind.
    pub kind: Kind,
    /// Payload length.
    pub len: u32,
    /// Argument.
    pub arg: u64,
}

/// A frame that breaks the format.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum FrameError {
    /// Not our magic: the stream is not a migration stream or is out of step.
    #[error(
        "bad frame magic {0:#06x} (expected {MAGIC:#06x}): not a faultline migration stream, or out of step"
    )]
    Magic(u16),
    /// Unknown kind.
    #[error("unknown frame kind {0}")]
    Kind(u8),
    /// Reserved flags set.
    #[error("frame flags {0:#x} are reserved")]
    Flags(u8),
    /// Too long for its kind.
    #[error("{kind:?} frame of {len} bytes (at most {max})")]
    TooLong {
        /// Kind.
        kind: Kind,
        /// Claimed length.
        len: u32,
        /// Limit.
        max: u32,
    },
    /// A payload of the wrong size for its kind.
    #[error("{kind:?} frame of {len} bytes (must be {want})")]
    Length {
        /// Kind.
        kind: Kind,
        /// Claimed length.
        len: u32,
        /// The size it must have.
        want: u32,
    },
    /// A count (pages) of 0 or over the bound.
    #[error("{kind:?} frame counts {n} pages (1..={max})")]
    Count {
        /// Kind.
        kind: Kind,
        /// The count.
        n: u32,
        /// The bound.
        max: u32,
    },
    /// CRC32C trailers were negotiated, but a frame that must carry one came without.
    #[error("a {0:?} frame without its CRC32C trailer (negotiated in the hello)")]
    Unchecked(Kind),
    /// A pages frame that is not whole pages, or not page-aligned.
    #[error("pages frame at {arg:#x} of {len} bytes: not whole, aligned pages")]
    Unaligned {
        /// Address.
        arg: u64,
        /// Length.
        len: u32,
    },
}

impl Header {
    /// Encode.
    pub fn encode(&self) -> [u8; HEADER] {
        self.encode_with(0)
    }

    /// Encode with `flags` ([`FLAG_CRC`] or 0).
    pub fn encode_with(&self, flags: u8) -> [u8; HEADER] {
        let mut b = [0u8; HEADER];
        b[0] = self.kind as u8;
        b[1] = flags;
        b[2..4].copy_from_slice(&MAGIC.to_le_bytes());
        b[4..8].copy_from_slice(&self.len.to_le_bytes());
        b[8..16].copy_from_slice(&self.arg.to_le_bytes());
        b
    }

    /// Decode and check a header from untrusted bytes.
    pub fn decode(b: &[u8; HEADER]) -> Result<Header, FrameError> {
        let magic = u16::from_le_bytes([b[2], b[3]]);
        if magic != MAGIC {
            return Err(FrameError::Magic(magic));
        }
        let kind = Kind::from_u8(b[0]).ok_or(FrameError::Kind(b[0]))?;
        if b[1] & !FLAG_CRC != 0 {
            return Err(FrameError::Flags(b[1]));
        }
        let len = u32::from_le_bytes([b[4], b[5], b[6], b[7]]);
        let arg = u64::from_le_bytes([b[8], b[9], b[10], b[11], b[12], b[13], b[14], b[15]]);
        kind.check(len, arg)?;
        Ok(Header { kind, len, arg })
    }
}

/// A connected stream: TCP or Unix.
#[derive(Debug)]
pub enum Sock {
    /// TCP.
    Tcp(TcpStream),
    /// Unix stream socket.
    Unix(UnixStream),
    /// TLS over TCP ([`crate::tls`]).
    Tls(crate::tls::TlsStream),
}

impl Beat {
    /// Send a keepalive on `s` if nothing was sent for the interval.
    pub fn tick(&mut self, s: &mut Sock) -> io::Result<()> {
        if self.due() {
            s.send(Kind::Keepalive, 0, &[])?;
        }
        Ok(())
    }
}

impl Sock {
    /// Another handle on the same connection.
    pub fn try_clone(&self) -> io::Result<Sock> {
        Ok(match self {
            Sock::Tcp(s) => Sock::Tcp(s.try_clone()?),
            Sock::Unix(s) => Sock::Unix(s.try_clone()?),
            Sock::Tls(s) => Sock::Tls(s.clone()),
        })
    }

    /// Shut both directions down (wakes a blocked reader).
    pub fn shutdown(&self) {
        let _ = match self {
            Sock::Tcp(s) => s.shutdown(Shutdown::Both),
            Sock::Unix(s) => s.shutdown(Shutdown::Both),
            Sock::Tls(s) => {
                s.shutdown();
                Ok(())
            }
        };
    }

    /// Read timeout (`None`: block).
    pub fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Sock::Tcp(s) => s.set_read_timeout(t),
            Sock::Unix(s) => s.set_read_timeout(t),
            Sock::Tls(s) => s.tcp().set_read_timeout(t),
        }
    }

    /// Write timeout (`None`: block).
    pub fn set_write_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Sock::Tcp(s) => s.set_write_timeout(t),
            Sock::Unix(s) => s.set_write_timeout(t),
            Sock::Tls(s) => s.tcp().set_write_timeout(t),
        }
    }

    /// Cap the kernel's send and receive buffers: the background stream then has little in
    /// flight, so a page the pusher has claimed arrives soon after a vCPU asks for it.
    pub fn set_buffers(&self, bytes: usize) {
        set_sock_buffers(self, bytes)
    }

    /// Every new connection: no Nagle delay (TCP), and a write deadline of
    /// [`link_deadline`]: a peer that takes nothing for that long fails the write with
    /// [`Stalled`] instead of blocking the sender forever.
    fn tune(&self) {
        if let Sock::Tcp(s) = self {
            let _ = s.set_nodelay(true);
        }
        let _ = self.set_write_timeout(Some(link_deadline()));
    }

    /// Write one frame (header and payload in one `write`, so a priority answer is one
    /// segment).
    pub fn send(&mut self, kind: Kind, arg: u64, payload: &[u8]) -> io::Result<()> {
        self.send_crc(kind, arg, payload, false)
    }

    /// [`send`](Self::send), with a CRC32C trailer when `crc` (negotiated in the hello).
    pub fn send_crc(&mut self, kind: Kind, arg: u64, payload: &[u8], crc: bool) -> io::Result<()> {
        let mut buf = Vec::with_capacity(HEADER + payload.len() + 4);
        encode_frame(&mut buf, kind, arg, payload, crc)?;
        self.write_all(&buf)
    }

    /// Write one frame with `writev`, straight from `payload` (no copy: guest memory goes to
    /// the socket as it is).
    pub fn send_vectored(&mut self, kind: Kind, arg: u64, payload: &[u8]) -> io::Result<()> {
        self.send_vectored_crc(kind, arg, payload, false)
    }

    /// [`send_vectored`](Self::send_vectored), with a CRC32C trailer when `crc`.
    pub fn send_vectored_crc(
        &mut self,
        kind: Kind,
        arg: u64,
        payload: &[u8],
        crc: bool,
    ) -> io::Result<()> {
        let mut h = outgoing(kind, arg, payload)?.encode_with(if crc { FLAG_CRC } else { 0 });
        let trailer = crc32c::crc32c_append(crc32c::crc32c(&h), payload).to_le_bytes();
        let corrupt;
        let payload = match test_corruption(kind) {
            Some(Damage::Payload) => {
                corrupt = damaged(payload);
                &corrupt[..]
            }
            Some(Damage::Address) => {
                h[15] ^= 0x5a;
                payload
            }
            None => payload,
        };
        let mut bufs = [
            io::IoSlice::new(&h),
            io::IoSlice::new(payload),
            io::IoSlice::new(if crc { &trailer[..] } else { &[] }),
        ];
        let mut bufs = &mut bufs[..];
        while !bufs.is_empty() {
            match self.write_vectored(bufs) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => io::IoSlice::advance_slices(&mut bufs, n),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Write a JSON frame.
    pub fn send_json<T: serde::Serialize>(&mut self, kind: Kind, v: &T) -> io::Result<()> {
        let body = serde_json::to_vec(v).map_err(io::Error::other)?;
        self.send(kind, 0, &body)
    }

    /// Read one frame into `buf` (resized to the payload, which [`Header::decode`] bounded).
    pub fn recv(&mut self, buf: &mut Vec<u8>) -> Result<Header, RecvError> {
        read_frame(self, buf)
    }

    /// [`recv`](Self::recv), also saying whether the frame carried a checksum (then it was
    /// verified: a mismatch is [`RecvError::Checksum`], the stream still in step).
    pub fn recv_checked(&mut self, buf: &mut Vec<u8>) -> Result<(Header, bool), RecvError> {
        read_frame_checked(self, buf)
    }

    /// Wait at most `timeout` for the connection to be readable (data, end of stream or an
    /// error): wait this way, then [`recv`](Self::recv), rather than with a read timeout,
    /// which could split a frame.
    pub fn poll_readable(&self, timeout: Duration) -> io::Result<bool> {
        if let Sock::Tls(s) = self {
            return s.poll_readable(timeout);
        }
        Ok(uffd::poll_in(&[self.as_fd()], Some(timeout))? & 1 != 0)
    }
}

impl AsFd for Sock {
    fn as_fd(&self) -> BorrowedFd<'_> {
        match self {
            Sock::Tcp(s) => s.as_fd(),
            Sock::Unix(s) => s.as_fd(),
            Sock::Tls(s) => s.tcp().as_fd(),
        }
    }
}

/// The header of a frame to send, checked as the peer will check it (`InvalidInput`: a frame
/// the peer would refuse is never sent).
fn outgoing(kind: Kind, arg: u64, payload: &[u8]) -> io::Result<Header> {
    let len = u32::try_from(payload.len())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "payload over 4 GiB"))?;
    kind.check(len, arg)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    Ok(Header { kind, len, arg })
}

/// Set a socket's kernel send and receive buffers (best effort).
pub(crate) fn set_sock_buffers(s: &impl AsFd, bytes: usize) {
    let v = bytes as libc::c_int;
    for opt in [libc::SO_SNDBUF, libc::SO_RCVBUF] {
        // SAFETY: a valid socket fd and a c_int option value of the right size.
        unsafe {
            libc::setsockopt(
                s.as_fd().as_raw_fd(),
                libc::SOL_SOCKET,
                opt,
                (&v as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
    }
}

/// Reading a frame failed.
#[derive(Debug, Error)]
pub enum RecvError {
    /// The peer closed the connection cleanly between frames.
    #[error("the peer closed the connection")]
    Closed,
    /// The stream ended inside a frame.
    #[error("the connection ended inside a frame")]
    Truncated,
    /// Reading failed (errno kept).
    #[error("reading a frame")]
    Io(#[source] io::Error),
    /// The header breaks the format.
    #[error("malformed frame")]
    Frame(#[source] FrameError),
    /// The frame's CRC32C trailer does not match its bytes: damaged on the way. The whole
    /// frame was read; the stream is still in step.
    #[error(
        "{kind:?} frame at {arg:#x} ({len} bytes) arrived damaged: CRC32C {got:#010x}, sent as {sent:#010x}"
    )]
    Checksum {
        /// The kind the header names (the header is covered too: it may be damaged itself).
        kind: Kind,
        /// The argument it names.
        arg: u64,
        /// The payload length.
        len: u32,
        /// The trailer.
        sent: u32,
        /// Computed here.
        got: u32,
    },
}

impl RecvError {
    /// Whether the link is gone (closed, cut, or failing), as opposed to a peer that broke the
    /// format or a damaged frame.
    pub fn is_link(&self) -> bool {
        !matches!(self, RecvError::Frame(_) | RecvError::Checksum { .. })
    }
}

fn read_full(r: &mut impl Read, b: &mut [u8]) -> Result<usize, io::Error> {
    let mut got = 0;
    while got < b.len() {
        match r.read(&mut b[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(got)
}

/// Read one frame from `r` into `buf`: the header is decoded and checked before a byte of the
/// payload is read, so a peer's length is bounded before use.
pub fn read_frame(r: &mut impl Read, buf: &mut Vec<u8>) -> Result<Header, RecvError> {
    read_frame_checked(r, buf).map(|(h, _)| h)
}

/// [`read_frame`], and whether the frame carried a CRC32C trailer ([`FLAG_CRC`]); one that
/// does is verified over the header and the payload ([`RecvError::Checksum`] on a mismatch,
/// after the whole frame was read: the stream stays in step).
pub fn read_frame_checked(
    r: &mut impl Read,
    buf: &mut Vec<u8>,
) -> Result<(Header, bool), RecvError> {
    let mut raw = [0u8; HEADER];
    match read_full(r, &mut raw).map_err(RecvError::Io)? {
        0 => return Err(RecvError::Closed),
        HEADER => {}
        _ => return Err(RecvError::Truncated),
    }
    let h = Header::decode(&raw).map_err(RecvError::Frame)?;
    buf.resize(h.len as usize, 0);
    if read_full(r, buf).map_err(RecvError::Io)? != buf.len() {
        return Err(RecvError::Truncated);
    }
    if raw[1] & FLAG_CRC == 0 {
        return Ok((h, false));
    }
    let mut t = [0u8; 4];
    if read_full(r, &mut t).map_err(RecvError::Io)? != 4 {
        return Err(RecvError::Truncated);
    }
    let sent = u32::from_le_bytes(t);
    let got = crc32c::crc32c_append(crc32c::crc32c(&raw), buf);
    if sent != got {
        return Err(RecvError::Checksum {
            kind: h.kind,
            arg: h.arg,
            len: h.len,
            sent,
            got,
        });
    }
    Ok((h, true))
}

/// Append one frame to `out`: header, payload and (with `crc`) the CRC32C trailer, checked
/// as the peer will check it.
pub fn encode_frame(
    out: &mut Vec<u8>,
    kind: Kind,
    arg: u64,
    payload: &[u8],
    crc: bool,
) -> io::Result<()> {
    let h = outgoing(kind, arg, payload)?.encode_with(if crc { FLAG_CRC } else { 0 });
    out.extend_from_slice(&h);
    let at = out.len();
    out.extend_from_slice(payload);
    if crc {
        let c = crc32c::crc32c_append(crc32c::crc32c(&h), payload);
        out.extend_from_slice(&c.to_le_bytes());
    }
    match test_corruption(kind) {
        Some(Damage::Payload) => {
            let bad = damaged(&out[at..at + payload.len()]);
            out[at..at + payload.len()].copy_from_slice(&bad);
        }
        Some(Damage::Address) => out[at - HEADER + 15] ^= 0x5a,
        None => {}
    }
    Ok(())
}

/// The environment variable of the corruption test hook: `N` flips one byte of the payload
/// of the `N`th `Pages` frame this process sends (counted from 1), after its checksum was
/// computed, as a bad link would; `addr:N` flips the top byte of its page address instead
/// (a damaged header). For tests only; unset, nothing happens.
pub const CORRUPT_ENV: &str = "FAULTLINE_TEST_CORRUPT_PAGE_FRAME";

/// What the corruption test hook damages.
#[derive(Clone, Copy)]
enum Damage {
    Payload,
    Address,
}

fn damaged(p: &[u8]) -> Vec<u8> {
    let mut v = p.to_vec();
    if let Some(b) = v.get_mut(p.len() / 2) {
        *b ^= 0x5a;
    }
    v
}

fn test_corruption(kind: Kind) -> Option<Damage> {
    static NTH: std::sync::OnceLock<Option<(Damage, u64)>> = std::sync::OnceLock::new();
    static SENT: AtomicU64 = AtomicU64::new(0);
    let (what, nth) = (*NTH.get_or_init(|| {
        let v = std::env::var(CORRUPT_ENV).ok()?;
        match v.strip_prefix("addr:") {
            Some(n) => Some((Damage::Address, n.parse().ok()?)),
            None => Some((Damage::Payload, v.parse().ok()?)),
        }
    }))?;
    if kind != Kind::Pages {
        return None;
    }
    (SENT.fetch_add(1, SeqCst) + 1 == nth).then_some(what)
}

impl Sock {
    fn read_deadline(&self) -> Option<Duration> {
        match self {
            Sock::Tcp(s) => s.read_timeout().ok().flatten(),
            Sock::Unix(s) => s.read_timeout().ok().flatten(),
            Sock::Tls(s) => s.tcp().read_timeout().ok().flatten(),
        }
    }

    fn write_deadline(&self) -> Option<Duration> {
        match self {
            Sock::Tcp(s) => s.write_timeout().ok().flatten(),
            Sock::Unix(s) => s.write_timeout().ok().flatten(),
            Sock::Tls(s) => s.tcp().write_timeout().ok().flatten(),
        }
    }
}

impl Read for Sock {
    fn read(&mut self, b: &mut [u8]) -> io::Result<usize> {
        let r = match self {
            Sock::Tcp(s) => s.read(b),
            Sock::Unix(s) => s.read(b),
            Sock::Tls(s) => s.read(b),
        };
        r.map_err(|e| stalled(e, Direction::Receiving, self.read_deadline()))
    }
}

impl Write for Sock {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        let r = match self {
            Sock::Tcp(s) => s.write(b),
            Sock::Unix(s) => s.write(b),
            Sock::Tls(s) => s.write(b),
        };
        r.map_err(|e| stalled(e, Direction::Sending, self.write_deadline()))
    }
    fn write_vectored(&mut self, b: &[io::IoSlice<'_>]) -> io::Result<usize> {
        let r = match self {
            Sock::Tcp(s) => s.write_vectored(b),
            Sock::Unix(s) => s.write_vectored(b),
            Sock::Tls(s) => s.write_vectored(b),
        };
        r.map_err(|e| stalled(e, Direction::Sending, self.write_deadline()))
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Where to migrate to / listen on: `tcp:HOST:PORT` or `unix:PATH`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum Endpoint {
    /// `tcp:HOST:PORT`.
    Tcp(String),
    /// `unix:PATH`.
    Unix(std::path::PathBuf),
}

impl std::str::FromStr for Endpoint {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if let Some(a) = s.strip_prefix("tcp:") {
            if a.rsplit_once(':')
                .is_none_or(|(_, p)| p.parse::<u16>().is_err())
            {
                return Err(format!("'{s}': expected tcp:HOST:PORT"));
            }
            Ok(Endpoint::Tcp(a.into()))
        } else if let Some(p) = s.strip_prefix("unix:") {
            if p.is_empty() {
                return Err(format!("'{s}': expected unix:PATH"));
            }
            Ok(Endpoint::Unix(p.into()))
        } else {
            Err(format!("'{s}': expected tcp:HOST:PORT or unix:PATH"))
        }
    }
}

impl TryFrom<String> for Endpoint {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        s.parse()
    }
}

impl From<Endpoint> for String {
    fn from(e: Endpoint) -> String {
        e.to_string()
    }
}

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Endpoint::Tcp(a) => write!(f, "tcp:{a}"),
            Endpoint::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

impl Endpoint {
    /// The security for this endpoint ([`crate::tls::Security::choose`]): TLS with `creds`;
    /// without, a Unix socket is plain (mode 0600) and TCP is refused unless `insecure`.
    pub fn security(
        &self,
        creds: Option<&crate::tls::Credentials>,
        insecure: bool,
    ) -> Result<crate::tls::Security, crate::tls::TlsError> {
        crate::tls::Security::choose(
            matches!(self, Endpoint::Tcp(_)),
            &self.to_string(),
            creds,
            insecure,
        )
    }

    /// Connect, retrying until `timeout` (the destination may still be starting). Each TCP
    /// attempt is itself bounded by what is left of `timeout` (`connect_timeout`: a host that
    /// drops SYNs would otherwise block for the kernel's ~2 minutes of retries).
    pub fn connect(&self, timeout: Duration) -> io::Result<Sock> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline
                .saturating_duration_since(Instant::now())
                .max(Duration::from_millis(1));
            let r = match self {
                Endpoint::Tcp(a) => tcp_connect(a, left).map(Sock::Tcp),
                Endpoint::Unix(p) => UnixStream::connect(p).map(Sock::Unix),
            };
            match r {
                Ok(s) => {
                    s.tune();
                    return Ok(s);
                }
                Err(e) if Instant::now() >= deadline => return Err(e),
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
    }

    /// Listen.
    pub fn listen(&self) -> io::Result<Listener> {
        Ok(match self {
            Endpoint::Tcp(a) => {
                let l = TcpListener::bind(a)?;
                l.set_nonblocking(true)?;
                Listener::Tcp(l)
            }
            Endpoint::Unix(p) => {
                // Bound under a temporary name, made 0600, then renamed into place: nobody
                // but our user can connect, at any moment.
                let mut tmp = p.clone().into_os_string();
                tmp.push(format!(".{}.tmp", std::process::id()));
                let tmp = std::path::PathBuf::from(tmp);
                let _ = std::fs::remove_file(&tmp);
                let l = UnixListener::bind(&tmp)?;
                let placed = std::fs::set_permissions(
                    &tmp,
                    std::os::unix::fs::PermissionsExt::from_mode(0o600),
                )
                .and_then(|_| refuse_non_socket(p))
                .and_then(|_| std::fs::rename(&tmp, p));
                if let Err(e) = placed {
                    let _ = std::fs::remove_file(&tmp);
                    return Err(e);
                }
                l.set_nonblocking(true)?;
                Listener::Unix(l, p.clone())
            }
        })
    }
}

/// Anything but a socket (or nothing) at `p` is refused, never replaced.
fn refuse_non_socket(p: &std::path::Path) -> io::Result<()> {
    use std::os::unix::fs::FileTypeExt;
    match std::fs::symlink_metadata(p) {
        Ok(m) if !m.file_type().is_socket() => Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            format!("{} exists and is not a socket", p.display()),
        )),
        _ => Ok(()),
    }
}

/// Connect to the first address of `a` that answers, each attempt bounded by `within`.
fn tcp_connect(a: &str, within: Duration) -> io::Result<TcpStream> {
    use std::net::ToSocketAddrs;
    let mut last = io::Error::new(io::ErrorKind::NotFound, format!("{a}: no address"));
    for addr in a.to_socket_addrs()? {
        match TcpStream::connect_timeout(&addr, within) {
            Ok(s) => return Ok(s),
            Err(e) => last = e,
        }
    }
    Err(last)
}

/// A listening socket (non-blocking; [`Listener::accept`] waits with a timeout).
#[derive(Debug)]
pub enum Listener {
    /// TCP.
    Tcp(TcpListener),
    /// Unix, with its path (removed on drop).
    Unix(UnixListener, std::path::PathBuf),
}

impl Listener {
    /// Accept one connection, waiting at most `timeout` (`Ok(None)`: none came).
    pub fn accept(&self, timeout: Duration) -> io::Result<Option<Sock>> {
        let deadline = Instant::now() + timeout;
        loop {
            let r = match self {
                Listener::Tcp(l) => l.accept().map(|(s, _)| Sock::Tcp(s)),
                Listener::Unix(l, _) => l.accept().map(|(s, _)| Sock::Unix(s)),
            };
            match r {
                Ok(s) => {
                    match &s {
                        Sock::Tcp(t) => t.set_nonblocking(false)?,
                        Sock::Unix(u) => u.set_nonblocking(false)?,
                        Sock::Tls(_) => {}
                    }
                    s.tune();
                    return Ok(Some(s));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if Instant::now() >= deadline {
                        return Ok(None);
                    }
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// The bound address, as an endpoint (a TCP port 0 becomes the real port).
    pub fn endpoint(&self) -> io::Result<Endpoint> {
        Ok(match self {
            Listener::Tcp(l) => Endpoint::Tcp(l.local_addr()?.to_string()),
            Listener::Unix(_, p) => Endpoint::Unix(p.clone()),
        })
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Listener::Unix(_, p) = self {
            let _ = std::fs::remove_file(p);
        }
    }
}

pub use crate::rate::RateLimit;

#[cfg(test)]
#[path = "wire_tests.rs"]
mod tests;
