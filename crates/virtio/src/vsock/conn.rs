//! One connection's host side: its Unix stream, its state and its credit accounting; the
//! `CONNECT <port>\n` line of a host stream not yet connected; non-blocking socket helpers.

use std::io::{self, Read};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::UnixStream;
use std::path::Path;

use super::packet::Header;

/// The receive buffer the device advertises per connection (`buf_alloc`): the most bytes
/// the guest may have sent that the device has not yet written to the host stream.
pub const BUF_ALLOC: u32 = 256 * 1024;
/// The longest `CONNECT <port>\n` line, newline included.
pub const MAX_CONNECT_LINE: usize = 32;

/// Where a connection is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// The host connected and the device sent the guest `OP_REQUEST`; waiting for its
    /// `OP_RESPONSE`.
    LocalInit,
    /// Bytes flow both ways.
    Established,
}

/// A connection between a guest port and a host Unix stream.
#[derive(Debug)]
pub struct Conn {
    /// The host stream (non-blocking).
    pub stream: UnixStream,
    /// Its state.
    pub state: State,
    /// Bytes from the guest not yet written to the host stream (at most [`BUF_ALLOC`]).
    pub tx_buf: Vec<u8>,
    /// How many bytes at the front of `tx_buf` are the device's own (the `OK` line), not
    /// the guest's.
    pub uncounted: usize,
    /// Bytes from the guest written to the host stream (wrapping), sent as `fwd_cnt`.
    pub fwd_cnt: u32,
    /// The `fwd_cnt` the guest last heard.
    pub fwd_cnt_sent: u32,
    /// Payload bytes sent to the guest (wrapping).
    pub rx_cnt: u32,
    /// The guest's receive buffer.
    pub peer_buf_alloc: u32,
    /// Bytes the guest has consumed.
    pub peer_fwd_cnt: u32,
    /// The host stream was readable and its bytes wait for an rx buffer or for credit.
    pub rx_hint: bool,
    /// A `CREDIT_REQUEST` went to the guest and no credit came back since.
    pub credit_requested: bool,
    /// The guest will send no more (`OP_SHUTDOWN` with the send flag): shut the host
    /// stream's write side once `tx_buf` is out.
    pub shut_write: bool,
    /// The guest will receive no more (`OP_SHUTDOWN` with the receive flag).
    pub guest_no_rcv: bool,
    /// The host stream reached its end (the guest was sent `OP_SHUTDOWN`, send flag).
    pub host_eof: bool,
    /// The guest shut both ways: `OP_RST` once `tx_buf` is out.
    pub closing: bool,
    /// The stream is registered for writability (its `tx_buf` is not empty).
    pub out_polled: bool,
}

/// What a read from the host stream gave.
#[derive(Debug)]
pub enum HostRead {
    /// This many bytes.
    Data(usize),
    /// Nothing now.
    WouldBlock,
    /// The host closed (or shut down its write side).
    Eof,
    /// The stream failed.
    Failed(io::Error),
}

impl Conn {
    /// A connection over `stream` in `state`.
    pub fn new(stream: UnixStream, state: State) -> Conn {
        Conn {
            stream,
            state,
            tx_buf: Vec::new(),
            uncounted: 0,
            fwd_cnt: 0,
            fwd_cnt_sent: 0,
            rx_cnt: 0,
            peer_buf_alloc: 0,
            peer_fwd_cnt: 0,
            rx_hint: false,
            credit_requested: false,
            shut_write: false,
            guest_no_rcv: false,
            host_eof: false,
            closing: false,
            out_polled: false,
        }
    }

    /// Whether host bytes may go to the guest (given credit): established, and neither
    /// side has ended that direction.
    pub fn relaying(&self) -> bool {
        self.state == State::Established && !self.host_eof && !self.guest_no_rcv && !self.closing
    }

    /// Take the guest's credit from one of its packets.
    pub fn update_peer(&mut self, h: &Header) {
        self.peer_buf_alloc = h.buf_alloc;
        self.peer_fwd_cnt = h.fwd_cnt;
        self.credit_requested = false;
    }

    /// Bytes the guest can take now: its buffer less what it has not consumed yet.
    pub fn peer_credit(&self) -> u32 {
        let in_flight = self.rx_cnt.wrapping_sub(self.peer_fwd_cnt);
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    /// Whether the guest consumed enough of our buffer since it last heard `fwd_cnt` that a
    /// `CREDIT_UPDATE` is due (half the buffer).
    pub fn credit_update_due(&self) -> bool {
        self.fwd_cnt.wrapping_sub(self.fwd_cnt_sent) >= BUF_ALLOC / 2
    }

    /// Bytes for the host: write what the stream takes now, keep the rest. `counted`: the
    /// guest's payload (it counts in `fwd_cnt` and against the credit given to the guest),
    /// else the device's own `OK` line. `Ok(false)`: the guest overran its credit.
    pub fn send_to_host(&mut self, data: &[u8], counted: bool) -> io::Result<bool> {
        let held = self.tx_buf.len() - self.uncounted;
        if counted && held + data.len() > BUF_ALLOC as usize {
            return Ok(false);
        }
        let n = if self.tx_buf.is_empty() {
            send_some(&self.stream, data)?
        } else {
            0
        };
        if counted {
            self.fwd_cnt = self.fwd_cnt.wrapping_add(n as u32);
        } else {
            self.uncounted += data.len() - n;
        }
        self.tx_buf.extend_from_slice(&data[n..]);
        Ok(true)
    }

    /// Write out what `tx_buf` holds, as far as the stream takes it; `Ok(true)` when empty
    /// (and, if the guest asked, the write side is then shut).
    pub fn flush(&mut self) -> io::Result<bool> {
        if !self.tx_buf.is_empty() {
            let n = send_some(&self.stream, &self.tx_buf)?;
            self.tx_buf.drain(..n);
            // The device's own bytes come first in the buffer and are not counted.
            let own = n.min(self.uncounted);
            self.uncounted -= own;
            self.fwd_cnt = self.fwd_cnt.wrapping_add((n - own) as u32);
        }
        if self.tx_buf.is_empty() && self.shut_write {
            // ENOTCONN: the host already closed; nothing left to tell it.
            let _ = self.stream.shutdown(std::net::Shutdown::Write);
        }
        Ok(self.tx_buf.is_empty())
    }

    /// Read host bytes into `buf` (non-blocking).
    pub fn read_host(&mut self, buf: &mut [u8]) -> HostRead {
        loop {
            return match self.stream.read(buf) {
                Ok(0) => HostRead::Eof,
                Ok(n) => HostRead::Data(n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => HostRead::WouldBlock,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => HostRead::Failed(e),
            };
        }
    }
}

/// `send(2)` with `MSG_NOSIGNAL` (a host that closed gives `EPIPE`, not a `SIGPIPE`);
/// 0 bytes when the stream's buffer is full.
pub fn send_some(stream: &UnixStream, data: &[u8]) -> io::Result<usize> {
    let mut done = 0;
    while done < data.len() {
        let rest = &data[done..];
        // SAFETY: `rest` is a live slice of `rest.len()` bytes and the fd is open for the
        // call (borrowed from `stream`); send only reads the buffer.
        let n = unsafe {
            libc::send(
                stream.as_raw_fd(),
                rest.as_ptr().cast(),
                rest.len(),
                libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT,
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            match e.kind() {
                io::ErrorKind::Interrupted => continue,
                io::ErrorKind::WouldBlock => break,
                _ => return Err(e),
            }
        }
        done += n as usize;
    }
    Ok(done)
}

/// Connect to the Unix stream socket at `path` without blocking: a listener whose backlog
/// is full gives `EAGAIN` instead of holding the device's thread.
pub fn connect_nonblocking(path: &Path) -> io::Result<UnixStream> {
    // SAFETY: sockaddr_un is plain old data; all zeroes is a valid (empty) value.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    let bytes = path.as_os_str().as_bytes();
    if bytes.len() >= addr.sun_path.len() || bytes.contains(&0) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "socket path of {} bytes does not fit sun_path ({} bytes with the NUL)",
                bytes.len(),
                addr.sun_path.len()
            ),
        ));
    }
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (d, s) in addr.sun_path.iter_mut().zip(bytes) {
        *d = *s as libc::c_char;
    }
    // SAFETY: socket(2) with constant arguments; the result is checked.
    let fd = unsafe {
        libc::socket(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a new socket nothing else owns.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    let len = std::mem::size_of::<libc::sa_family_t>() + bytes.len() + 1;
    // SAFETY: `addr` is a valid sockaddr_un that lives across the call and `len` is within
    // its size (checked above); the fd is open (owned above).
    let r = unsafe {
        libc::connect(
            owned.as_raw_fd(),
            (&addr as *const libc::sockaddr_un).cast(),
            len as libc::socklen_t,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(UnixStream::from(owned))
}

/// A host stream that connected to the listener and has not finished its `CONNECT` line.
#[derive(Debug)]
pub struct PendingHost {
    /// The stream (non-blocking).
    pub stream: UnixStream,
    /// The line so far.
    pub line: Vec<u8>,
    /// When it connected.
    pub since: std::time::Instant,
}

/// What reading a `CONNECT` line gave.
#[derive(Debug, PartialEq, Eq)]
pub enum LineRead {
    /// The whole line: connect to this guest port.
    Port(u32),
    /// Not all there yet.
    More,
    /// Close the stream: why.
    Bad(String),
}

impl PendingHost {
    /// Read what is there of the line, a byte at a time so no byte past the newline (the
    /// connection's first data) is taken.
    pub fn read_line(&mut self) -> LineRead {
        let mut b = [0u8; 1];
        loop {
            match self.stream.read(&mut b) {
                Ok(0) => return LineRead::Bad("the host closed before its CONNECT line".into()),
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return LineRead::More,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return LineRead::Bad(format!("reading the CONNECT line: {e}")),
            }
            if b[0] == b'\n' {
                return parse_connect(&self.line);
            }
            self.line.push(b[0]);
            if self.line.len() >= MAX_CONNECT_LINE {
                return LineRead::Bad(format!(
                    "no newline within the {MAX_CONNECT_LINE} bytes a CONNECT line may have"
                ));
            }
        }
    }
}

/// Parse `CONNECT <port>` (without the newline): a decimal port that fits 32 bits.
pub fn parse_connect(line: &[u8]) -> LineRead {
    let bad = || {
        LineRead::Bad(format!(
            "malformed CONNECT line {:?}",
            String::from_utf8_lossy(line)
        ))
    };
    let Some(rest) = line.strip_prefix(b"CONNECT ") else {
        return bad();
    };
    if rest.is_empty() || !rest.iter().all(u8::is_ascii_digit) {
        return bad();
    }
    match std::str::from_utf8(rest)
        .ok()
        .and_then(|s| s.parse::<u32>().ok())
    {
        Some(p) => LineRead::Port(p),
        None => bad(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connect_lines_are_parsed_strictly() {
        assert_eq!(parse_connect(b"CONNECT 1234"), LineRead::Port(1234));
        assert_eq!(
            parse_connect(b"CONNECT 4294967295"),
            LineRead::Port(u32::MAX)
        );
        for bad in [
            &b"CONNECT 4294967296"[..],
            b"CONNECT ",
            b"CONNECT -1",
            b"CONNECT 12a",
            b"connect 1",
            b"CONNECT  1",
            b"",
        ] {
            assert!(matches!(parse_connect(bad), LineRead::Bad(_)), "{bad:?}");
        }
    }

    #[test]
    fn credit_is_the_peer_buffer_less_what_it_has_not_consumed() {
        let (a, _b) = UnixStream::pair().unwrap();
        let mut c = Conn::new(a, State::Established);
        assert_eq!(c.peer_credit(), 0);
        c.update_peer(&Header {
            buf_alloc: 1000,
            fwd_cnt: 0,
            ..Header::default()
        });
        c.rx_cnt = 600;
        assert_eq!(c.peer_credit(), 400);
        c.rx_cnt = 1200; // the guest shrank its buffer
        assert_eq!(c.peer_credit(), 0);
        // wrapping counters
        c.peer_fwd_cnt = u32::MAX - 10;
        c.rx_cnt = 20;
        assert_eq!(c.peer_credit(), 1000 - 31);
    }

    #[test]
    fn the_device_own_bytes_held_for_the_host_are_not_counted() {
        let (a, mut b) = UnixStream::pair().unwrap();
        a.set_nonblocking(true).unwrap();
        let mut c = Conn::new(a, State::Established);
        // Fill the socket so everything after is held.
        let mut filler = 0;
        while send_some(&c.stream, &[0u8; 4096]).unwrap() > 0 {
            filler += 1;
        }
        assert!(filler > 0);
        assert!(c.send_to_host(b"OK 9\n", false).unwrap());
        assert!(c.send_to_host(b"data", true).unwrap());
        assert_eq!((c.tx_buf.len(), c.uncounted, c.fwd_cnt), (9, 5, 0));
        // The host drains its socket: the held bytes go, only the guest's are counted.
        b.set_nonblocking(true).unwrap();
        let mut sink = [0u8; 65536];
        while let Ok(n) = b.read(&mut sink) {
            if n == 0 {
                break;
            }
        }
        assert!(c.flush().unwrap());
        assert_eq!((c.uncounted, c.fwd_cnt), (0, 4));
        // Credit: BUF_ALLOC of the guest's bytes may be held, not one more.
        while send_some(&c.stream, &[0u8; 4096]).unwrap() > 0 {}
        assert!(
            c.send_to_host(&vec![1u8; BUF_ALLOC as usize], true)
                .unwrap()
        );
        assert!(!c.send_to_host(b"x", true).unwrap(), "overrun");
    }
}
