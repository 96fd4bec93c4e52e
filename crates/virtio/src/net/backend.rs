//! What the net device needs from a backend, and the Unix socket backend.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use thiserror::Error;

/// Where the device's Ethernet frames go and come from: one call moves one whole frame.
///
/// Both calls are non-blocking: a backend with nothing to read, or no room to write, answers
/// [`io::ErrorKind::WouldBlock`]. The device treats `WouldBlock`, `ENOBUFS`, `EINVAL` and
/// `EMSGSIZE` on [`send`](Self::send) as "this frame is refused" (it drops and counts it),
/// and any other error on either call as "the backend is gone" (the device asks for a reset).
pub trait NetBackend: Send {
    /// Send one frame (no header: destination MAC first).
    fn send(&mut self, frame: &[u8]) -> io::Result<()>;
    /// Receive one frame into `buf`; returns the frame's full length, which is larger than
    /// `buf` when the frame did not fit (its tail was cut, the device drops it).
    /// A backend whose peer is gone for good answers an error (never `Ok(0)` forever).
    fn recv(&mut self, buf: &mut [u8]) -> io::Result<usize>;
    /// The fd to poll for readability (and hang-up).
    fn fd(&self) -> RawFd;
}

/// Making a socket pair failed.
#[derive(Debug, Error)]
pub enum SocketError {
    /// `socketpair(AF_UNIX, SOCK_SEQPACKET)` failed.
    #[error("socketpair(AF_UNIX, SOCK_SEQPACKET) failed")]
    Pair(#[source] io::Error),
}

/// A backend over a Unix `SOCK_SEQPACKET` socket: one message is one Ethernet frame, with
/// no header; a message of zero bytes (the peer closed) is the end of the link.
///
/// Both ends of [`pair`](Self::pair) are this type, so a test (or a switch in the same
/// process) can use the peer side with the same [`NetBackend`] calls.
#[derive(Debug)]
pub struct SocketBackend {
    fd: OwnedFd,
}

impl SocketBackend {
    /// A connected pair: (the device's side, the peer's side), both non-blocking.
    pub fn pair() -> Result<(SocketBackend, SocketBackend), SocketError> {
        let mut fds = [0 as libc::c_int; 2];
        // SAFETY: socketpair writes two fds into the 2-element array we own.
        let r = unsafe {
            libc::socketpair(
                libc::AF_UNIX,
                libc::SOCK_SEQPACKET | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                0,
                fds.as_mut_ptr(),
            )
        };
        if r < 0 {
            return Err(SocketError::Pair(io::Error::last_os_error()));
        }
        // SAFETY: both fds were just created by socketpair and are owned by nobody else.
        let (a, b) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        Ok((SocketBackend { fd: a }, SocketBackend { fd: b }))
    }

    /// A backend over a connected `SOCK_SEQPACKET` (or `SOCK_DGRAM`) Unix socket the caller
    /// made; it should be non-blocking (a blocking one would stall the device's thread).
    pub fn from_fd(fd: OwnedFd) -> SocketBackend {
        SocketBackend { fd }
    }
}

impl NetBackend for SocketBackend {
    fn send(&mut self, frame: &[u8]) -> io::Result<()> {
        // SAFETY: frame is a valid readable buffer of frame.len() bytes; MSG_NOSIGNAL turns a
        // closed peer into EPIPE instead of SIGPIPE.
        let n = unsafe {
            libc::send(
                self.fd.as_raw_fd(),
                frame.as_ptr().cast(),
                frame.len(),
                libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT,
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        if n as usize != frame.len() {
            // SEQPACKET sends whole messages; a partial one would be a kernel surprise.
            return Err(io::Error::new(
                io::ErrorKind::WriteZero,
                format!("sent {n} of {} bytes", frame.len()),
            ));
        }
        Ok(())
    }

    fn recv(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        // SAFETY: buf is a valid writable buffer of buf.len() bytes; MSG_TRUNC makes the
        // kernel return the message's real length when it was longer.
        let n = unsafe {
            libc::recv(
                self.fd.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                libc::MSG_TRUNC | libc::MSG_DONTWAIT,
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                "the peer closed the socket",
            ));
        }
        Ok(n as usize)
    }

    fn fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}
