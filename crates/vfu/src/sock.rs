//! Messages over a Unix stream socket, with file descriptors as `SCM_RIGHTS`.
//!
//! `vmm-sys-util`'s `ScmSocket` needs raw iovecs and unsafe at every call; these two functions
//! are the only places that touch `sendmsg`/`recvmsg`, and they hand back owned fds.

use std::io::{self, IoSlice, Read};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;

use crate::proto::{HEADER_SIZE, Header, ProtoError};

/// Most fds accepted in one message (more are closed and the message refused).
pub const MAX_FDS: usize = 64;

/// A failure to receive a message.
#[derive(Debug, thiserror::Error)]
pub enum RecvError {
    /// The peer closed the connection at a message boundary.
    #[error("the peer closed the connection")]
    Closed,
    /// No message started within the socket's timeout.
    #[error("timed out waiting for a message")]
    Idle,
    /// The socket failed (or the peer stopped mid-message past the timeout).
    #[error("socket read failed")]
    Io(#[source] io::Error),
    /// The header is malformed; the connection is out of step and must be dropped.
    #[error("malformed header")]
    Header(#[source] ProtoError),
    /// The message carried more fds than allowed.
    #[error("{0} file descriptors in one message (limit {MAX_FDS})")]
    TooManyFds(usize),
}

/// A received message.
#[derive(Debug)]
pub struct Message {
    /// Header.
    pub header: Header,
    /// Payload after the header.
    pub payload: Vec<u8>,
    /// Descriptors that came with it.
    pub fds: Vec<OwnedFd>,
}

/// How long [`send`] waits on a non-blocking socket whose peer reads nothing.
pub const SEND_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// Wait until `fd` is ready for `events` (`POLLIN`/`POLLOUT`) or `timeout` passes. `Ok(false)`:
/// timed out. Hang-ups and errors count as ready (the next read or write reports them).
pub fn wait_for(fd: RawFd, events: i16, timeout: std::time::Duration) -> io::Result<bool> {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        let mut p = libc::pollfd {
            fd,
            events,
            revents: 0,
        };
        let ms = left.as_millis().min(i32::MAX as u128) as i32;
        // SAFETY: one valid pollfd for the duration of the call.
        let n = unsafe { libc::poll(&mut p, 1, ms) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        return Ok(n > 0);
    }
}

/// Send one message: `parts` concatenated, `fds` attached. On a non-blocking socket it waits
/// for room up to [`SEND_TIMEOUT`].
pub fn send(sock: &UnixStream, parts: &[&[u8]], fds: &[RawFd]) -> io::Result<()> {
    let total: usize = parts.iter().map(|p| p.len()).sum();
    let mut sent = 0usize;
    let mut first = true;
    while sent < total {
        // Rebuild the iovecs from `sent` on.
        let mut skip = sent;
        let mut iov: Vec<IoSlice<'_>> = Vec::with_capacity(parts.len());
        for p in parts {
            if skip >= p.len() {
                skip -= p.len();
                continue;
            }
            iov.push(IoSlice::new(&p[skip..]));
            skip = 0;
        }
        let r = if first && !fds.is_empty() {
            sendmsg_fds(sock.as_raw_fd(), &iov, fds)
        } else {
            use std::io::Write;
            (&*sock).write_vectored(&iov)
        };
        let n = match r {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                // A non-blocking socket whose peer is not reading: wait for room, bounded.
                if !wait_for(sock.as_raw_fd(), libc::POLLOUT, SEND_TIMEOUT)? {
                    return Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!("the peer read nothing for {SEND_TIMEOUT:?}"),
                    ));
                }
                continue;
            }
            Err(e) => return Err(e),
        };
        if n == 0 {
            return Err(io::Error::new(io::ErrorKind::WriteZero, "socket closed"));
        }
        first = false;
        sent += n;
    }
    Ok(())
}

fn sendmsg_fds(fd: RawFd, iov: &[IoSlice<'_>], fds: &[RawFd]) -> io::Result<usize> {
    let fd_bytes = std::mem::size_of_val(fds);
    // SAFETY: CMSG_SPACE is a pure computation.
    let space = unsafe { libc::CMSG_SPACE(fd_bytes as u32) } as usize;
    let mut cbuf = vec![0u64; space.div_ceil(8)];
    // SAFETY: an all-zero msghdr is a valid value.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = iov.as_ptr() as *mut libc::iovec;
    msg.msg_iovlen = iov.len();
    msg.msg_control = cbuf.as_mut_ptr().cast();
    msg.msg_controllen = space;
    // SAFETY: msg_control points at `space` bytes, enough for one cmsg of `fd_bytes`; the
    // header pointer CMSG_FIRSTHDR returns is inside that buffer, as is CMSG_DATA's, and the
    // fds are copied into it (unaligned-safe copy).
    unsafe {
        let c = libc::CMSG_FIRSTHDR(&msg);
        (*c).cmsg_level = libc::SOL_SOCKET;
        (*c).cmsg_type = libc::SCM_RIGHTS;
        (*c).cmsg_len = libc::CMSG_LEN(fd_bytes as u32) as usize;
        std::ptr::copy_nonoverlapping(fds.as_ptr().cast::<u8>(), libc::CMSG_DATA(c), fd_bytes);
    }
    // SAFETY: msg points at live iovecs (IoSlice is ABI-compatible with iovec) and a control
    // buffer set up above; sendmsg does not keep them.
    let n = unsafe { libc::sendmsg(fd, &msg, libc::MSG_NOSIGNAL) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n as usize)
}

/// Receive the header's bytes with any fds. Returns bytes read (0: closed) and the fds.
fn recv_head(fd: RawFd, buf: &mut [u8]) -> io::Result<(usize, Vec<OwnedFd>)> {
    // SAFETY: CMSG_SPACE is a pure computation.
    let space =
        unsafe { libc::CMSG_SPACE((MAX_FDS * std::mem::size_of::<RawFd>()) as u32) } as usize;
    let mut cbuf = vec![0u64; space.div_ceil(8)];
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: an all-zero msghdr is a valid value.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cbuf.as_mut_ptr().cast();
    msg.msg_controllen = space;
    // SAFETY: iov points at `buf`, the control buffer at `space` bytes; both outlive the call.
    let n = unsafe { libc::recvmsg(fd, &mut msg, libc::MSG_CMSG_CLOEXEC) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut fds = Vec::new();
    // SAFETY: the kernel filled msg_control/msg_controllen; CMSG_FIRSTHDR/NXTHDR walk only
    // inside it, and each SCM_RIGHTS payload holds (cmsg_len - CMSG_LEN(0)) / 4 new fds that
    // this process now owns.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(&msg);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                let len = (*c).cmsg_len as usize - libc::CMSG_LEN(0) as usize;
                let data = libc::CMSG_DATA(c);
                for i in 0..len / std::mem::size_of::<RawFd>() {
                    let mut raw: RawFd = 0;
                    std::ptr::copy_nonoverlapping(
                        data.add(i * std::mem::size_of::<RawFd>()),
                        (&mut raw as *mut RawFd).cast::<u8>(),
                        std::mem::size_of::<RawFd>(),
                    );
                    fds.push(OwnedFd::from_raw_fd(raw));
                }
            }
            c = libc::CMSG_NXTHDR(&msg, c);
        }
    }
    if msg.msg_flags & libc::MSG_CTRUNC != 0 {
        return Err(io::Error::other(format!(
            "file descriptors truncated (more than {MAX_FDS} in one message)"
        )));
    }
    Ok((n as usize, fds))
}

/// Receive one message of at most `max_size` bytes (header included).
///
/// With a read timeout on the socket, [`RecvError::Idle`] means no message started; a peer
/// that stalls mid-message gets [`RecvError::Io`].
pub fn recv(sock: &UnixStream, max_size: u32) -> Result<Message, RecvError> {
    let mut head = [0u8; HEADER_SIZE];
    let mut got = 0;
    let mut fds = Vec::new();
    while got < HEADER_SIZE {
        match recv_head(sock.as_raw_fd(), &mut head[got..]) {
            Ok((0, _)) if got == 0 => return Err(RecvError::Closed),
            Ok((0, _)) => {
                return Err(RecvError::Io(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "connection closed inside a header",
                )));
            }
            Ok((n, f)) => {
                got += n;
                fds.extend(f);
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e)
                if got == 0
                    && matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
            {
                return Err(RecvError::Idle);
            }
            Err(e) => return Err(RecvError::Io(e)),
        }
    }
    if fds.len() > MAX_FDS {
        return Err(RecvError::TooManyFds(fds.len()));
    }
    let header = Header::decode(&head, max_size).map_err(RecvError::Header)?;
    let mut payload = vec![0u8; header.size as usize - HEADER_SIZE];
    (&*sock).read_exact(&mut payload).map_err(RecvError::Io)?;
    Ok(Message {
        header,
        payload,
        fds,
    })
}

/// Receives messages from a non-blocking socket a piece at a time, keeping a partly received
/// message between calls, so a peer that stops mid-message holds up nobody but itself.
#[derive(Debug, Default)]
pub struct Assembler {
    head: [u8; HEADER_SIZE],
    got: usize,
    header: Option<Header>,
    payload: Vec<u8>,
    filled: usize,
    fds: Vec<OwnedFd>,
}

impl Assembler {
    /// A fresh assembler (no message started).
    pub fn new() -> Assembler {
        Assembler::default()
    }

    /// Whether part of a message has arrived.
    pub fn is_partial(&self) -> bool {
        self.got > 0
    }

    /// Read what `sock` has. `Ok(Some)`: a whole message; `Ok(None)`: the socket has no more
    /// for now (what arrived is kept). Messages over `max_size` bytes are refused by header.
    pub fn poll(&mut self, sock: &UnixStream, max_size: u32) -> Result<Option<Message>, RecvError> {
        while self.got < HEADER_SIZE {
            match recv_head(sock.as_raw_fd(), &mut self.head[self.got..]) {
                Ok((0, _)) if self.got == 0 => return Err(RecvError::Closed),
                Ok((0, _)) => {
                    return Err(RecvError::Io(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "connection closed inside a header",
                    )));
                }
                Ok((n, f)) => {
                    self.got += n;
                    self.fds.extend(f);
                    if self.fds.len() > MAX_FDS {
                        return Err(RecvError::TooManyFds(self.fds.len()));
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(None),
                Err(e) => return Err(RecvError::Io(e)),
            }
        }
        let header = match self.header {
            Some(h) => h,
            None => {
                let h = Header::decode(&self.head, max_size).map_err(RecvError::Header)?;
                self.payload = vec![0u8; h.size as usize - HEADER_SIZE];
                self.filled = 0;
                self.header = Some(h);
                h
            }
        };
        while self.filled < self.payload.len() {
            match (&*sock).read(&mut self.payload[self.filled..]) {
                Ok(0) => {
                    return Err(RecvError::Io(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "connection closed inside a message",
                    )));
                }
                Ok(n) => self.filled += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(None),
                Err(e) => return Err(RecvError::Io(e)),
            }
        }
        let msg = Message {
            header,
            payload: std::mem::take(&mut self.payload),
            fds: std::mem::take(&mut self.fds),
        };
        *self = Assembler::default();
        Ok(Some(msg))
    }
}
