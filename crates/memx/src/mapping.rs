//! Owned memory mappings for externalized memory: anonymous private, or a shared memfd.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::ptr;

use thiserror::Error;
use uffd::{Range, page_size};

/// Creating a [`Mapping`].
#[derive(Debug, Error)]
pub enum MapError {
    /// `memfd_create` or `ftruncate` failed.
    #[error("cannot create a {len}-byte memfd")]
    Memfd {
        /// Size asked for.
        len: usize,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// `mmap` failed.
    #[error("cannot map {len} bytes")]
    Mmap {
        /// Size asked for.
        len: usize,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// The size is zero or not page-aligned.
    #[error("mapping size {0} is zero or not a multiple of the page size")]
    BadSize(usize),
}

/// A read-write mapping, unmapped on drop. Its contents are accessed through raw pointers or
/// volatile reads, never through long-lived references: a fault handler may fill its pages at
/// any time.
#[derive(Debug)]
pub struct Mapping {
    addr: usize,
    len: usize,
    memfd: Option<OwnedFd>,
}

impl Mapping {
    /// Anonymous private memory (`MAP_NORESERVE`: pages are allocated when first touched).
    pub fn anonymous(len: usize) -> Result<Self, MapError> {
        Self::map(
            len,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            None,
        )
    }

    /// A shared mapping of a new memfd of `len` bytes (needed for MINOR faults and for
    /// sharing with other processes).
    pub fn memfd(name: &std::ffi::CStr, len: usize) -> Result<Self, MapError> {
        // SAFETY: `name` is a valid C string; memfd_create returns a new fd or -1.
        let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(MapError::Memfd {
                len,
                source: io::Error::last_os_error(),
            });
        }
        // SAFETY: a fresh fd we own.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: ftruncate on our own fd.
        if unsafe { libc::ftruncate(fd.as_raw_fd(), len as libc::off_t) } != 0 {
            return Err(MapError::Memfd {
                len,
                source: io::Error::last_os_error(),
            });
        }
        Self::map(len, libc::MAP_SHARED, Some(fd))
    }

    /// A second shared mapping of this mapping's memfd (an alias through which a MINOR-fault
    /// handler writes the page cache). `None` for anonymous mappings.
    pub fn alias(&self) -> Option<Result<Mapping, MapError>> {
        let fd = self.memfd.as_ref()?;
        Some(
            fd.try_clone()
                .map_err(|source| MapError::Memfd {
                    len: self.len,
                    source,
                })
                .and_then(|fd| Self::map(self.len, libc::MAP_SHARED, Some(fd))),
        )
    }

    fn map(len: usize, flags: i32, memfd: Option<OwnedFd>) -> Result<Self, MapError> {
        if len == 0 || len % page_size() != 0 {
            return Err(MapError::BadSize(len));
        }
        let fd = memfd.as_ref().map_or(-1, |f| f.as_raw_fd());
        // SAFETY: a new mapping at an address the kernel picks; no existing memory changes.
        let p = unsafe {
            libc::mmap(
                ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                flags,
                fd,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(MapError::Mmap {
                len,
                source: io::Error::last_os_error(),
            });
        }
        Ok(Self {
            addr: p as usize,
            len,
            memfd,
        })
    }

    /// The mapped range.
    pub fn range(&self) -> Range {
        // A successful mmap of a page-multiple length is a valid range.
        Range::new(self.addr, self.len).expect("mmap returns page-aligned memory")
    }

    /// First byte.
    pub fn as_ptr(&self) -> *mut u8 {
        self.addr as *mut u8
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Always false (mappings are never empty).
    pub fn is_empty(&self) -> bool {
        false
    }

    /// The memfd behind a shared mapping.
    pub fn memfd_fd(&self) -> Option<&OwnedFd> {
        self.memfd.as_ref()
    }

    /// Volatile read of the byte at `off` (which may fault, and so wait for a handler).
    pub fn read_u8(&self, off: usize) -> u8 {
        assert!(
            off < self.len,
            "offset {off} outside a {}-byte mapping",
            self.len
        );
        // SAFETY: `off` is inside the mapping, which is readable.
        unsafe { ptr::read_volatile(self.as_ptr().add(off)) }
    }

    /// Volatile write of `v` at `off`.
    pub fn write_u8(&self, off: usize, v: u8) {
        assert!(
            off < self.len,
            "offset {off} outside a {}-byte mapping",
            self.len
        );
        // SAFETY: `off` is inside the mapping, which is writable.
        unsafe { ptr::write_volatile(self.as_ptr().add(off), v) }
    }

    /// Copy the contents out (faults in every page).
    pub fn to_vec(&self) -> Vec<u8> {
        let mut v = vec![0; self.len];
        // SAFETY: both ranges are valid for `len` bytes and do not overlap.
        unsafe { ptr::copy_nonoverlapping(self.as_ptr(), v.as_mut_ptr(), self.len) };
        v
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: unmapping our own mapping; no reference into it outlives `self`.
        unsafe { libc::munmap(self.addr as *mut libc::c_void, self.len) };
    }
}
