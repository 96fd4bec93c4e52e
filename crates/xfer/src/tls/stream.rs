//! The TLS connection the engines use: the handshake (rustls), then [`TlsStream`], whose
//! records are sealed and opened by [`super::record`], shared by the clones of a
//! `xfer::wire::Sock`.

use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::net::TcpStream;
use std::ops::Range;
use std::os::fd::AsFd;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::record::{self, ALERT, APPLICATION_DATA, HANDSHAKE, Keys};
use super::{HANDSHAKE_TIMEOUT, TlsError};

/// Bytes read from the socket at once.
const RX_BUF: usize = 256 << 10;

/// Run the handshake on `tcp` (within [`HANDSHAKE_TIMEOUT`]), feeding rustls whole records
/// only, so that once it is over rustls holds nothing we have not seen: what follows the last
/// handshake record stays in our buffer for the reader. Then take the traffic keys from
/// rustls. The socket's write timeout is kept for the stream.
pub(super) fn handshake(
    mut tcp: TcpStream,
    mut conn: rustls::Connection,
    peer: String,
) -> Result<TlsStream, TlsError> {
    let hs_err = |source| TlsError::Handshake {
        peer: peer.clone(),
        source,
    };
    let write_timeout = tcp.write_timeout().map_err(hs_err)?;
    let deadline = Instant::now() + HANDSHAKE_TIMEOUT;
    let left = || {
        let l = deadline.saturating_duration_since(Instant::now());
        if l.is_zero() {
            Err(hs_err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("no handshake within {HANDSHAKE_TIMEOUT:?}"),
            )))
        } else {
            Ok(l)
        }
    };
    let mut rx = Rx::new();
    loop {
        while conn.wants_write() {
            tcp.set_write_timeout(Some(left()?)).map_err(hs_err)?;
            conn.write_tls(&mut tcp).map_err(hs_err)?;
        }
        if !conn.is_handshaking() {
            break;
        }
        let n = loop {
            match record::record_len(rx.pending()) {
                Ok(Some(n)) if rx.pending().len() >= n => break n,
                Ok(_) => {}
                Err(e) => return Err(hs_err(io::Error::new(io::ErrorKind::InvalidData, e))),
            }
            tcp.set_read_timeout(Some(left()?)).map_err(hs_err)?;
            if !rx.fill(&tcp).map_err(hs_err)? {
                return Err(hs_err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the peer closed the connection during the handshake",
                )));
            }
        };
        let mut rec = &rx.buf[rx.start..rx.start + n];
        while !rec.is_empty() {
            conn.read_tls(&mut rec).map_err(hs_err)?;
            if let Err(e) = conn.process_new_packets() {
                // Tell the peer why (the alert rustls queued), then fail.
                let _ = conn.write_tls(&mut tcp);
                return Err(TlsError::Rustls(e));
            }
        }
        rx.start += n;
    }
    tcp.set_read_timeout(None).map_err(hs_err)?;
    tcp.set_write_timeout(write_timeout).map_err(hs_err)?;
    let s = conn.dangerous_extract_secrets().map_err(TlsError::Rustls)?;
    let keys = |(seq, s): &(u64, rustls::ConnectionTrafficSecrets)| {
        Keys::new(*seq, s).map_err(|e| TlsError::Closed(e.to_string()))
    };
    rx.keys = Some(keys(&s.rx)?);
    Ok(TlsStream(Arc::new(Inner {
        rx: Mutex::new(rx),
        tx: Mutex::new(Tx {
            keys: keys(&s.tx)?,
            out: Vec::new(),
        }),
        tcp,
    })))
}

/// A TLS connection over TCP, shared by its clones: a reader opens records in its own buffer
/// and a writer seals them in its own, each with its own key, so neither ever waits for the
/// other.
#[derive(Clone)]
pub struct TlsStream(Arc<Inner>);

impl std::fmt::Debug for TlsStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "TlsStream({:?})", self.0.tcp)
    }
}

struct Inner {
    /// One reader at a time, with its buffer and key.
    rx: Mutex<Rx>,
    /// One writer at a time: records reach the socket in the order they were sealed.
    tx: Mutex<Tx>,
    tcp: TcpStream,
}

/// The reader's side: records read from the socket (`buf[start..end]`), the opened content
/// of the current one not yet read (`plain`), and the key.
struct Rx {
    buf: Vec<u8>,
    start: usize,
    end: usize,
    plain: Range<usize>,
    keys: Option<Keys>,
    /// The socket reached its end.
    eof: bool,
    /// The peer sent `close_notify`.
    closed: bool,
}

/// The writer's side: its key, and its buffer of sealed records (reused: a fresh 256 KiB
/// buffer a frame costs page faults).
struct Tx {
    keys: Keys,
    out: Vec<u8>,
}

fn invalid(e: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

impl Rx {
    fn new() -> Rx {
        Rx {
            buf: vec![0; RX_BUF],
            start: 0,
            end: 0,
            plain: 0..0,
            keys: None,
            eof: false,
            closed: false,
        }
    }

    fn pending(&self) -> &[u8] {
        &self.buf[self.start..self.end]
    }

    /// One read from the socket after what is pending (moved to the front first); `false`
    /// at the end of the stream.
    fn fill(&mut self, tcp: &TcpStream) -> io::Result<bool> {
        if self.start > 0 {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        loop {
            match (&*tcp).read(&mut self.buf[self.end..]) {
                Ok(0) => {
                    self.eof = true;
                    return Ok(false);
                }
                Ok(n) => {
                    self.end += n;
                    return Ok(true);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }

    /// A whole record is pending.
    fn has_record(&self) -> bool {
        matches!(record::record_len(self.pending()), Ok(Some(n)) if self.end - self.start >= n)
            || record::record_len(self.pending()).is_err()
    }

    /// Open the pending record (the caller saw it whole): its content becomes `plain`, or the
    /// peer's alert ends the stream.
    fn open_one(&mut self) -> io::Result<()> {
        let n = record::record_len(self.pending())
            .map_err(invalid)?
            .expect("a whole record");
        let at = self.start;
        self.start += n;
        let keys = self.keys.as_mut().expect("keys after the handshake");
        let (ty, r) = keys.open(&mut self.buf[at..at + n]).map_err(invalid)?;
        match ty {
            APPLICATION_DATA => self.plain = at + r.start..at + r.end,
            ALERT => {
                // close_notify (level, description 0) ends the stream; any other alert is
                // the peer's error.
                if self.buf[at + r.start..at + r.end].get(1) == Some(&0) {
                    self.closed = true;
                } else {
                    return Err(invalid(TlsError::Closed(format!(
                        "the peer sent the alert {:?}",
                        &self.buf[at + r.start..at + r.end]
                    ))));
                }
            }
            HANDSHAKE => {
                return Err(invalid(TlsError::Closed(
                    "the peer sent a handshake message after the handshake (a key update or a ticket), which this connection does not take".into(),
                )));
            }
            t => return Err(invalid(format!("a TLS record of content type {t}"))),
        }
        Ok(())
    }
}

impl TlsStream {
    /// The TCP socket underneath (timeouts, shutdown, polling).
    pub fn tcp(&self) -> &TcpStream {
        &self.0.tcp
    }

    fn rx(&self) -> MutexGuard<'_, Rx> {
        self.0.rx.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn tx(&self) -> MutexGuard<'_, Tx> {
        self.0.tx.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether a read would find content (or the end, or an error) without the socket.
    fn buffered(&self) -> bool {
        match self.0.rx.try_lock() {
            Ok(rx) => !rx.plain.is_empty() || rx.eof || rx.closed || rx.has_record(),
            // Someone is reading: the socket tells.
            Err(_) => false,
        }
    }

    /// Whether a read would find data (or the end) within `timeout`.
    pub fn poll_readable(&self, timeout: Duration) -> io::Result<bool> {
        if self.buffered() {
            return Ok(true);
        }
        Ok(uffd::poll_in(&[self.0.tcp.as_fd()], Some(timeout))? & 1 != 0)
    }

    /// Read content: what is opened, else the next record (one socket read at a time, each
    /// bounded by the socket's read timeout). The end of the stream without a `close_notify`
    /// reads as the end (the frame layer finds a frame cut short).
    pub fn read(&self, b: &mut [u8]) -> io::Result<usize> {
        if b.is_empty() {
            return Ok(0);
        }
        let mut rx = self.rx();
        loop {
            if !rx.plain.is_empty() {
                let n = b.len().min(rx.plain.len());
                let from = rx.plain.start;
                b[..n].copy_from_slice(&rx.buf[from..from + n]);
                rx.plain.start += n;
                return Ok(n);
            }
            if rx.closed {
                return Ok(0);
            }
            if rx.has_record() {
                rx.open_one()?;
                continue;
            }
            if rx.eof {
                return Ok(0);
            }
            // Wait holding only the reader's lock, honouring the read timeout.
            let t = self.0.tcp.read_timeout()?;
            if uffd::poll_in(&[self.0.tcp.as_fd()], t)? & 1 == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::WouldBlock,
                    "nothing received within the read timeout",
                ));
            }
            rx.fill(&self.0.tcp)?;
        }
    }

    /// Seal `slices` (in order, as one stream of bytes) into records in the writer's buffer
    /// and send them (bounded by the socket's write timeout).
    fn send(&self, slices: &[&[u8]]) -> io::Result<()> {
        let mut tx = self.tx();
        let Tx { keys, out } = &mut *tx;
        out.clear();
        let (mut i, mut at) = (0, 0);
        let total: usize = slices.iter().map(|s| s.len()).sum();
        let mut left = total;
        while left > 0 {
            let take = left.min(record::MAX_PLAIN);
            keys.seal_with(APPLICATION_DATA, out, |o| {
                let mut want = take;
                while want > 0 {
                    let s = &slices[i][at..];
                    let n = s.len().min(want);
                    o.extend_from_slice(&s[..n]);
                    want -= n;
                    at += n;
                    if at == slices[i].len() {
                        (i, at) = (i + 1, 0);
                    }
                }
            })
            .map_err(invalid)?;
            left -= take;
            // Skip empty slices so that `slices[i]` is never read past its end.
            while i < slices.len() && at == slices[i].len() {
                (i, at) = (i + 1, 0);
            }
        }
        (&self.0.tcp).write_all(out)
    }

    /// Seal and send all of `b`.
    pub fn write(&self, b: &[u8]) -> io::Result<usize> {
        self.send(&[b])?;
        Ok(b.len())
    }

    /// Seal and send all the slices as one write.
    pub fn write_vectored(&self, b: &[io::IoSlice<'_>]) -> io::Result<usize> {
        let s: Vec<&[u8]> = b.iter().map(|x| &**x).collect();
        self.send(&s)?;
        Ok(s.iter().map(|x| x.len()).sum())
    }

    /// Send `close_notify` (best effort, within the write timeout, unless a writer is busy)
    /// and shut the socket down.
    pub fn shutdown(&self) {
        if let Ok(mut tx) = self.0.tx.try_lock() {
            let Tx { keys, out } = &mut *tx;
            out.clear();
            // Alert level 1 (warning), description 0 (close_notify).
            if keys
                .seal_with(ALERT, out, |o| o.extend_from_slice(&[1, 0]))
                .is_ok()
            {
                let _ = (&self.0.tcp).write_all(out);
            }
        }
        let _ = self.0.tcp.shutdown(Shutdown::Both);
    }
}

impl Read for TlsStream {
    fn read(&mut self, b: &mut [u8]) -> io::Result<usize> {
        TlsStream::read(self, b)
    }
}

impl Write for TlsStream {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        TlsStream::write(self, b)
    }
    fn write_vectored(&mut self, b: &[io::IoSlice<'_>]) -> io::Result<usize> {
        TlsStream::write_vectored(self, b)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}
