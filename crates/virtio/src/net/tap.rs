//! The tap backend: a Linux tap interface (`/dev/net/tun`, `IFF_TAP | IFF_NO_PI`, no vnet
//! header), so a read or a write on its fd is exactly one Ethernet frame.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use thiserror::Error;

use super::backend::NetBackend;

/// `IFNAMSIZ`: an interface name is at most 15 bytes and a NUL.
const IFNAMSIZ: usize = 16;

/// `struct ifreq` as TUNSETIFF reads it: the name, then the flags in the union (40 bytes).
#[repr(C)]
struct IfReq {
    name: [u8; IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// Opening a tap failed.
#[derive(Debug, Error)]
pub enum TapError {
    /// The name is empty, longer than 15 bytes or holds a NUL or a '/'.
    #[error("tap name {name:?} is not a valid interface name (1 to 15 bytes, no NUL or '/')")]
    Name {
        /// The name given.
        name: String,
    },
    /// `/dev/net/tun` could not be opened.
    #[error("open /dev/net/tun failed")]
    Open(#[source] io::Error),
    /// `TUNSETIFF` refused the interface (not a tap, owned by another user, busy, no
    /// CAP_NET_ADMIN to create it).
    #[error("TUNSETIFF {name} (IFF_TAP | IFF_NO_PI) failed")]
    SetIff {
        /// Interface name.
        name: String,
        /// Cause.
        #[source]
        source: io::Error,
    },
}

/// A tap interface attached to this process (non-blocking).
#[derive(Debug)]
pub struct Tap {
    fd: OwnedFd,
    name: String,
}

impl Tap {
    /// Attach to tap `name` (made beforehand with `ip tuntap add dev NAME mode tap`, or
    /// created now if we may), without packet information and without a vnet header.
    pub fn open(name: &str) -> Result<Tap, TapError> {
        let bad = || TapError::Name {
            name: name.to_string(),
        };
        if name.is_empty() || name.len() >= IFNAMSIZ || name.contains('/') {
            return Err(bad());
        }
        let cname = CString::new(name).map_err(|_| bad())?;
        let path = c"/dev/net/tun";
        // SAFETY: path is a NUL-terminated string; open has no other memory effects.
        let fd = unsafe {
            libc::open(
                path.as_ptr(),
                libc::O_RDWR | libc::O_NONBLOCK | libc::O_CLOEXEC,
            )
        };
        if fd < 0 {
            return Err(TapError::Open(io::Error::last_os_error()));
        }
        // SAFETY: fd was just returned by open and is owned by nobody else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let mut req = IfReq {
            name: [0; IFNAMSIZ],
            flags: (libc::IFF_TAP | libc::IFF_NO_PI) as libc::c_short,
            _pad: [0; 22],
        };
        req.name[..name.len()].copy_from_slice(cname.as_bytes());
        // SAFETY: TUNSETIFF reads (and writes back) a struct ifreq; req is one, 40 bytes,
        // alive for the call.
        let r = unsafe { libc::ioctl(fd.as_raw_fd(), libc::TUNSETIFF as _, &mut req) };
        if r < 0 {
            return Err(TapError::SetIff {
                name: name.to_string(),
                source: io::Error::last_os_error(),
            });
        }
        Ok(Tap {
            fd,
            name: name.to_string(),
        })
    }

    /// The interface's name.
    pub fn name(&self) -> &str {
        &self.name
    }
}

impl NetBackend for Tap {
    fn send(&mut self, frame: &[u8]) -> io::Result<()> {
        // SAFETY: frame is a valid readable buffer of frame.len() bytes.
        let n = unsafe { libc::write(self.fd.as_raw_fd(), frame.as_ptr().cast(), frame.len()) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        if n as usize != frame.len() {
            return Err(io::Error::new(
                io::ErrorKind::WriteZero,
                format!("tap took {n} of {} bytes", frame.len()),
            ));
        }
        Ok(())
    }

    fn recv(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        // SAFETY: buf is a valid writable buffer of buf.len() bytes.
        let n = unsafe { libc::read(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n as usize)
    }

    fn fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}
