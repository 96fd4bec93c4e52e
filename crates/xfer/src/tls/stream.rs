//! The TLS connection the engines use: the handshake, then [`TlsStream`], shared by the
//! clones of a `xfer::wire::Sock`.

use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::net::TcpStream;
use std::os::fd::AsFd;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::{HANDSHAKE_TIMEOUT, TlsError};

/// Run the handshake on `tcp` (within [`HANDSHAKE_TIMEOUT`]); the socket's write timeout is
/// kept for the stream.
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
    while conn.is_handshaking() || conn.wants_write() {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(hs_err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("no handshake within {HANDSHAKE_TIMEOUT:?}"),
            )));
        }
        tcp.set_read_timeout(Some(left)).map_err(hs_err)?;
        tcp.set_write_timeout(Some(left)).map_err(hs_err)?;
        match conn.complete_io(&mut tcp) {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(hs_err(e)),
        }
    }
    tcp.set_read_timeout(None).map_err(hs_err)?;
    tcp.set_write_timeout(write_timeout).map_err(hs_err)?;
    conn.set_buffer_limit(None);
    Ok(TlsStream(Arc::new(Inner {
        conn: Mutex::new(conn),
        rx: Mutex::new(Rx {
            cipher: vec![0; RX_BUF],
            start: 0,
            end: 0,
            eof: false,
        }),
        tx: Mutex::new(Vec::new()),
        tcp,
    })))
}

/// A TLS connection over TCP, shared by its clones: each thread that reads or writes does
/// its own decryption or encryption, with the rustls state locked only for that work (never
/// across a blocking socket call), so a reader waiting for data never holds up a writer.
#[derive(Clone)]
pub struct TlsStream(Arc<Inner>);

impl std::fmt::Debug for TlsStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "TlsStream({:?})", self.0.tcp)
    }
}

struct Inner {
    conn: Mutex<rustls::Connection>,
    /// One reader at a time, with its buffers.
    rx: Mutex<Rx>,
    /// One writer at a time: records reach the socket in the order they were sealed.
    /// Its buffer of sealed records, reused (a fresh 256 KiB buffer a frame costs page faults).
    tx: Mutex<Vec<u8>>,
    tcp: TcpStream,
}

/// Bytes read from the socket at once (rustls itself reads 4 KiB a call).
const RX_BUF: usize = 256 << 10;

/// The reader's buffer: ciphertext read from the socket and not yet given to rustls
/// (`cipher[start..end]`); the plaintext stays in rustls until a caller reads it.
struct Rx {
    cipher: Vec<u8>,
    start: usize,
    end: usize,
    eof: bool,
}

fn fatal(e: rustls::Error) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, TlsError::Closed(e.to_string()))
}

impl TlsStream {
    /// The TCP socket underneath (timeouts, shutdown, polling).
    pub fn tcp(&self) -> &TcpStream {
        &self.0.tcp
    }

    fn conn(&self) -> std::sync::MutexGuard<'_, rustls::Connection> {
        self.0.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Send whatever rustls has sealed, through `out` (the `tx` buffer, held by the caller).
    fn send_sealed(&self, out: &mut Vec<u8>) -> io::Result<()> {
        out.clear();
        {
            let mut c = self.conn();
            while c.wants_write() {
                c.write_tls(out)?;
            }
        }
        (&self.0.tcp).write_all(out)
    }

    /// Whether plaintext (or ciphertext to open) is ready without reading the socket.
    fn buffered(&self) -> bool {
        match self.0.rx.try_lock() {
            Ok(rx) => {
                rx.start < rx.end
                    || rx.eof
                    || self
                        .conn()
                        .process_new_packets()
                        .is_ok_and(|st| st.plaintext_bytes_to_read() > 0)
            }
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

    /// Read plaintext: what rustls holds, else one socket read (bounded by the socket's read
    /// timeout) decrypted. The end of the stream without a `close_notify` reads as the end
    /// (the frame layer finds a frame cut short).
    pub fn read(&self, b: &mut [u8]) -> io::Result<usize> {
        if b.is_empty() {
            return Ok(0);
        }
        let mut guard = self.0.rx.lock().unwrap_or_else(|p| p.into_inner());
        let rx = &mut *guard;
        loop {
            // What rustls has opened goes straight to the caller.
            match self.conn().reader().read(b) {
                Ok(n) => return Ok(n), // 0: close_notify
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(0),
                Err(e) => return Err(e),
            }
            if rx.start < rx.end || rx.eof {
                let fed = self.open(rx)?;
                if fed || !rx.eof {
                    continue;
                }
                return Ok(0);
            }
            // Wait without any lock but ours, honouring the read timeout.
            let t = self.0.tcp.read_timeout()?;
            if uffd::poll_in(&[self.0.tcp.as_fd()], t)? & 1 == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::WouldBlock,
                    "nothing received within the read timeout",
                ));
            }
            match (&self.0.tcp).read(&mut rx.cipher) {
                Ok(0) => rx.eof = true,
                Ok(n) => (rx.start, rx.end) = (0, n),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }

    /// Give rustls the ciphertext read (until its plaintext buffer is full), and let it open
    /// the records; `false` if nothing was left to give (the end of the stream was told).
    fn open(&self, rx: &mut Rx) -> io::Result<bool> {
        let mut c = self.conn();
        let mut fed = false;
        while rx.start < rx.end {
            let mut rest = &rx.cipher[rx.start..rx.end];
            let before = rest.len();
            match c.read_tls(&mut rest) {
                Ok(_) => {}
                // "received plaintext buffer full": the caller reads first.
                Err(e) if e.kind() == io::ErrorKind::Other && fed => break,
                Err(e) => return Err(e),
            }
            rx.start += before - rest.len();
            fed = true;
            self.process(&mut c)?;
        }
        if !fed && rx.eof {
            let _ = c.read_tls(&mut &[][..]); // tells rustls the stream ended
            self.process(&mut c)?;
        }
        if c.wants_write() {
            drop(c);
            let mut tx = self.0.tx.lock().unwrap_or_else(|p| p.into_inner());
            self.send_sealed(&mut tx)?;
        }
        Ok(fed)
    }

    /// Open what rustls was given; on a fatal error, send the alert rustls queued and fail.
    fn process(&self, c: &mut std::sync::MutexGuard<'_, rustls::Connection>) -> io::Result<()> {
        let Err(e) = c.process_new_packets() else {
            return Ok(());
        };
        // Best effort, without the writers' lock (taking it under `conn` would invert the lock
        // order): the connection is dead either way.
        let mut alert = Vec::new();
        while c.wants_write() && c.write_tls(&mut alert).is_ok_and(|n| n > 0) {}
        let _ = (&self.0.tcp).write_all(&alert);
        Err(fatal(e))
    }

    /// Seal and send all of `b` (bounded by the socket's write timeout).
    pub fn write(&self, b: &[u8]) -> io::Result<usize> {
        let mut tx = self.0.tx.lock().unwrap_or_else(|p| p.into_inner());
        self.conn().writer().write_all(b)?;
        self.send_sealed(&mut tx)?;
        Ok(b.len())
    }

    /// Seal and send all the slices as one write.
    pub fn write_vectored(&self, b: &[io::IoSlice<'_>]) -> io::Result<usize> {
        let mut tx = self.0.tx.lock().unwrap_or_else(|p| p.into_inner());
        {
            let mut c = self.conn();
            for x in b {
                c.writer().write_all(x)?;
            }
        }
        self.send_sealed(&mut tx)?;
        Ok(b.iter().map(|x| x.len()).sum())
    }

    /// Send `close_notify` (best effort, within the write timeout) and shut the socket down.
    pub fn shutdown(&self) {
        if let Ok(mut tx) = self.0.tx.try_lock() {
            self.conn().send_close_notify();
            let _ = self.send_sealed(&mut tx);
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
