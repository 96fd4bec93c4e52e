//! BAR descriptions and the memfd-backed memory behind their mmap areas.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use pci::Bar;

/// A BAR as described.
#[derive(Debug, Clone)]
pub(crate) struct BarSpec {
    pub(crate) bar: Bar,
    /// Areas backed by the BAR's memfd, mappable by the client.
    pub(crate) mmap_areas: Vec<(u64, u64)>,
}

/// A BAR's memfd-backed memory (for its mmap areas).
pub struct BarMemory {
    fd: OwnedFd,
    addr: usize,
    size: u64,
}

// SAFETY: the mapping is process-wide memory accessed only through volatile copies.
unsafe impl Send for BarMemory {}
// SAFETY: as above; concurrent access is byte-wise racy by nature, like device memory.
unsafe impl Sync for BarMemory {}

impl BarMemory {
    pub(super) fn new(name: &str, size: u64) -> std::io::Result<BarMemory> {
        let cname = std::ffi::CString::new(format!("vfu-{name}")).unwrap_or_default();
        // SAFETY: memfd_create with a valid NUL-terminated name.
        let fd = unsafe {
            libc::memfd_create(cname.as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING)
        };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: `fd` is a new descriptor nobody else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: ftruncate on our own memfd.
        if unsafe { libc::ftruncate(fd.as_raw_fd(), size as libc::off_t) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        // Clients get this fd writable: sealed so that none can shrink it under the server's
        // own mapping (a SIGBUS at the next access would kill every device in the process)
        // or grow it, and the seals cannot be changed.
        // SAFETY: F_ADD_SEALS on our own memfd with an integer argument.
        if unsafe {
            libc::fcntl(
                fd.as_raw_fd(),
                libc::F_ADD_SEALS,
                libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL,
            )
        } != 0
        {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: a new shared mapping of our memfd, `size` bytes.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                size as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        Ok(BarMemory {
            fd,
            addr: p as usize,
            size,
        })
    }

    /// The memfd (sent to clients with the region info), sealed against shrinking and
    /// growing (`F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL`).
    pub fn fd(&self) -> &OwnedFd {
        &self.fd
    }

    /// Copy out of the BAR memory (false if out of range).
    pub fn read(&self, offset: u64, data: &mut [u8]) -> bool {
        if offset
            .checked_add(data.len() as u64)
            .is_none_or(|e| e > self.size)
        {
            return false;
        }
        // SAFETY: in range of the live mapping (checked above); the client may write it
        // concurrently, which makes the bytes racy but not the copy unsound for u8 data.
        unsafe {
            std::ptr::copy_nonoverlapping(
                (self.addr + offset as usize) as *const u8,
                data.as_mut_ptr(),
                data.len(),
            )
        };
        true
    }

    /// Copy into the BAR memory (false if out of range).
    pub fn write(&self, offset: u64, data: &[u8]) -> bool {
        if offset
            .checked_add(data.len() as u64)
            .is_none_or(|e| e > self.size)
        {
            return false;
        }
        // SAFETY: in range of the live, writable mapping (checked above).
        unsafe {
            std::ptr::copy_nonoverlapping(
                data.as_ptr(),
                (self.addr + offset as usize) as *mut u8,
                data.len(),
            )
        };
        true
    }
}

impl Drop for BarMemory {
    fn drop(&mut self) {
        // SAFETY: our own mapping of `size` bytes; no references into it outlive `self`.
        unsafe { libc::munmap(self.addr as *mut libc::c_void, self.size as usize) };
    }
}

pub(crate) struct BarState {
    pub(crate) spec: BarSpec,
    pub(crate) memory: Option<BarMemory>,
}
