//! Guest memory: one region from guest-physical 0, through `vm-memory`. Memory mapped from a
//! snapshot's file ([`Backend::PrivateFile`]) is guarded against the file shrinking ([`file`]).

pub mod file;

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd};

use serde::{Deserialize, Serialize};
use thiserror::Error;
use vm_memory::{
    FileOffset, GuestAddress, GuestMemoryMmap, GuestRegionMmap, MmapRegion, mmap::MmapRegionBuilder,
};

/// What backs guest memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    /// Anonymous private memory (`MAP_NORESERVE`): pages are allocated when first touched.
    #[default]
    Anonymous,
    /// A shared memfd: needed for MINOR faults, for sharing with device processes (DMA) and
    /// for snapshots by reference.
    Memfd,
    /// Anonymous 2 MiB huge pages (`MAP_HUGETLB`; needs reserved huge pages).
    HugePages,
    /// A private mapping of a snapshot's memory file (copy-on-write; pages are read from the
    /// file when first touched): Firecracker's `File` restore backend.
    #[serde(rename = "file")]
    PrivateFile,
}

impl std::str::FromStr for Backend {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "anon" | "anonymous" => Ok(Backend::Anonymous),
            "memfd" => Ok(Backend::Memfd),
            "hugepages" | "huge" => Ok(Backend::HugePages),
            "file" => {
                Err("the 'file' backend is only used by `faultline restore --mode mmap`".into())
            }
            _ => Err(format!(
                "unknown memory backend '{s}' (anon, memfd, hugepages)"
            )),
        }
    }
}

/// Creating guest memory.
#[derive(Debug, Error)]
pub enum MemoryError {
    /// The size is zero, unaligned or larger than the host's RAM.
    #[error("guest memory of {size} bytes: {why}")]
    BadSize {
        /// Size asked for.
        size: u64,
        /// Why it cannot be.
        why: String,
    },
    /// The memfd could not be created or sized.
    #[error("cannot create a {size}-byte memfd for guest memory")]
    Memfd {
        /// Size asked for.
        size: u64,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// The file to map could not be duplicated.
    #[error("cannot use the {size}-byte memory file for guest memory")]
    File {
        /// Size asked for.
        size: u64,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// The mapping failed (for huge pages: are enough reserved in /proc/sys/vm/nr_hugepages?).
    #[error("cannot map {size} bytes of {backend:?} guest memory")]
    Map {
        /// Size asked for.
        size: u64,
        /// Backend.
        backend: Backend,
        /// Cause.
        #[source]
        source: vm_memory::mmap::MmapRegionError,
    },
    /// vm-memory refused the region (cannot happen for one region at 0).
    #[error("vm-memory rejected the guest memory layout")]
    Layout(#[source] vm_memory::GuestRegionCollectionError),
    /// The region does not fit the guest-physical address space.
    #[error("guest memory of {0} bytes overflows the guest address space")]
    Overflow(u64),
}

/// Guest memory and what a VMM needs to know about it.
#[derive(Debug)]
pub struct GuestMem {
    mem: GuestMemoryMmap,
    host: *mut u8,
    size: u64,
    backend: Backend,
    memfd: Option<File>,
    /// The file behind [`Backend::PrivateFile`] memory, and its size at mapping.
    backing: Option<(File, u64)>,
    /// Pages come in on first touch from a pager (a lazy restore, a post-copy migration):
    /// a page the kernel does not have yet is not a zero page.
    on_demand: std::sync::atomic::AtomicBool,
}

// SAFETY: `host` points into the mapping owned by `mem`, which is itself Send + Sync; the
// pointer is only an address used for raw, volatile or kernel (KVM, userfaultfd) access.
unsafe impl Send for GuestMem {}
// SAFETY: as above.
unsafe impl Sync for GuestMem {}

fn host_ram() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Bytes of free huge pages of the default size.
fn huge_free() -> u64 {
    let Ok(info) = std::fs::read_to_string("/proc/meminfo") else {
        return 0;
    };
    let field = |name: &str| -> u64 {
        info.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    field("HugePages_Free:") * field("Hugepagesize:") * 1024
}

impl GuestMem {
    /// `size` bytes of guest memory at guest-physical 0.
    pub fn new(size: u64, backend: Backend) -> Result<Self, MemoryError> {
        let bad = |why: String| MemoryError::BadSize { size, why };
        if size == 0 || size % (2 << 20) != 0 {
            return Err(bad("must be a non-zero multiple of 2 MiB".into()));
        }
        if let Some(ram) = host_ram()
            && size > ram
        {
            return Err(bad(format!(
                "larger than this host's {} MiB of RAM",
                ram >> 20
            )));
        }
        let len =
            usize::try_from(size).map_err(|_| bad("does not fit the address space".into()))?;
        let prot = libc::PROT_READ | libc::PROT_WRITE;
        let (builder, memfd) = match backend {
            Backend::Anonymous | Backend::HugePages => {
                let mut flags = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS;
                if backend == Backend::HugePages {
                    // Reserve at mmap time: with MAP_NORESERVE a shortage of huge pages would
                    // surface as SIGBUS on first touch instead of an error here.
                    flags |= libc::MAP_HUGETLB;
                    let free = huge_free();
                    if free < size {
                        return Err(bad(format!(
                            "only {} MiB of free 2 MiB huge pages (raise /proc/sys/vm/nr_hugepages)",
                            free >> 20
                        )));
                    }
                } else {
                    flags |= libc::MAP_NORESERVE;
                }
                (
                    MmapRegionBuilder::new(len)
                        .with_mmap_prot(prot)
                        .with_mmap_flags(flags)
                        .with_hugetlbfs(backend == Backend::HugePages),
                    None,
                )
            }
            Backend::PrivateFile => {
                return Err(bad(
                    "a private file mapping is made by GuestMem::from_file".into()
                ));
            }
            Backend::Memfd => {
                // SAFETY: a valid C string; memfd_create returns a new fd or -1.
                let fd = unsafe {
                    libc::memfd_create(
                        c"faultline-guest".as_ptr(),
                        libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING,
                    )
                };
                if fd < 0 {
                    return Err(MemoryError::Memfd {
                        size,
                        source: io::Error::last_os_error(),
                    });
                }
                // SAFETY: a fresh fd we own.
                let file = unsafe { File::from_raw_fd(fd) };
                file.set_len(size)
                    .map_err(|source| MemoryError::Memfd { size, source })?;
                // Devices get this fd (DMA): none of them may shrink guest memory under the
                // VM (a SIGBUS for the VMM) or grow it.
                // SAFETY: F_ADD_SEALS on our own fd with a plain integer argument.
                if unsafe {
                    libc::fcntl(
                        file.as_raw_fd(),
                        libc::F_ADD_SEALS,
                        libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL,
                    )
                } != 0
                {
                    return Err(MemoryError::Memfd {
                        size,
                        source: io::Error::last_os_error(),
                    });
                }
                let fo = FileOffset::new(
                    file.try_clone()
                        .map_err(|source| MemoryError::Memfd { size, source })?,
                    0,
                );
                (
                    MmapRegionBuilder::new(len)
                        .with_mmap_prot(prot)
                        .with_mmap_flags(libc::MAP_SHARED)
                        .with_file_offset(fo),
                    Some(file),
                )
            }
        };
        Self::build(builder, size, backend, memfd)
    }

    /// Map `builder`'s region and make it guest memory at guest-physical 0.
    fn build(
        builder: MmapRegionBuilder,
        size: u64,
        backend: Backend,
        memfd: Option<File>,
    ) -> Result<Self, MemoryError> {
        let region: MmapRegion = builder.build().map_err(|source| MemoryError::Map {
            size,
            backend,
            source,
        })?;
        let host = region.as_ptr();
        let region =
            GuestRegionMmap::new(region, GuestAddress(0)).ok_or(MemoryError::Overflow(size))?;
        let mem = GuestMemoryMmap::from_regions(vec![region]).map_err(MemoryError::Layout)?;
        Ok(Self {
            mem,
            host,
            size,
            backend,
            memfd,
            backing: None,
            on_demand: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// Say that this memory's pages come in on first touch from a pager (a lazy restore, a
    /// post-copy migration's destination): the kernel's page table no longer tells which
    /// pages hold data (see [`on_demand`](Self::on_demand)).
    pub fn set_on_demand(&self) {
        self.on_demand
            .store(true, std::sync::atomic::Ordering::SeqCst);
    }

    /// Whether [`set_on_demand`](Self::set_on_demand) was called: a page missing from the
    /// process may be one the pager has not brought in yet, not a zero page.
    pub fn on_demand(&self) -> bool {
        self.on_demand.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// `size` bytes of guest memory mapped privately (copy-on-write) from `file` at offset 0:
    /// pages are read from the file when first touched, and guest writes never reach it.
    pub fn from_file(file: &File, size: u64) -> Result<Self, MemoryError> {
        let bad = |why: String| MemoryError::BadSize { size, why };
        if size == 0 || size % (2 << 20) != 0 {
            return Err(bad("must be a non-zero multiple of 2 MiB".into()));
        }
        let len =
            usize::try_from(size).map_err(|_| bad("does not fit the address space".into()))?;
        let fo = FileOffset::new(
            file.try_clone()
                .map_err(|source| MemoryError::File { size, source })?,
            0,
        );
        let builder = MmapRegionBuilder::new(len)
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .with_mmap_flags(libc::MAP_PRIVATE | libc::MAP_NORESERVE)
            .with_file_offset(fo);
        let mut m = Self::build(builder, size, Backend::PrivateFile, None)?;
        let expected = file::size_now(file).unwrap_or(size);
        let keep = file
            .try_clone()
            .map_err(|source| MemoryError::File { size, source })?;
        m.backing = Some((keep, expected));
        file::register(m.host as usize, len);
        Ok(m)
    }

    /// For memory mapped from a file: whether part of it was lost because the file shrank
    /// (see [`file`]). `None` for other memory, and while the file is whole and no page was
    /// lost.
    pub fn file_lost(&self) -> Option<file::MemoryLost> {
        let (f, expected) = self.backing.as_ref()?;
        let host_addr = file::lost_in(self.host as usize, self.size as usize).map(|a| a as u64);
        let now = file::size_now(f).unwrap_or(0);
        (host_addr.is_some() || now < self.size).then_some(file::MemoryLost {
            now,
            expected: *expected,
            host_addr,
        })
    }

    /// Whether a host thread's access to this memory hit a page lost from its file (cheap: one
    /// atomic load; the vCPUs ask before every `KVM_RUN`).
    pub fn file_page_lost(&self) -> bool {
        self.backing.is_some() && file::lost_in(self.host as usize, self.size as usize).is_some()
    }

    /// Guest-physical `[gpa, gpa + len)` as a host slice, or `None` if outside memory.
    ///
    /// # Safety
    /// While the slice lives, nothing may write the range: no vCPU running over it, no other
    /// host thread writing it. (Page faults served by a fault loop are fine: they fill pages
    /// that were not there, with the bytes the reader expects.)
    pub unsafe fn slice(&self, gpa: u64, len: usize) -> Option<&[u8]> {
        let p = self.host_ptr(gpa, len)?;
        // SAFETY: in bounds of the mapping owned by `self`; exclusivity is the caller's.
        Some(unsafe { std::slice::from_raw_parts(p, len) })
    }

    /// Host pointer to guest-physical `gpa` if `[gpa, gpa + len)` lies inside guest memory.
    fn host_ptr(&self, gpa: u64, len: usize) -> Option<*mut u8> {
        if gpa.checked_add(len as u64)? > self.size {
            return None;
        }
        // SAFETY: `gpa` is within the mapping, so the offset stays inside it.
        Some(unsafe { self.host.add(gpa as usize) })
    }

    /// Guest-physical `[gpa, gpa + len)` as a mutable host slice, or `None` if outside memory.
    ///
    /// # Safety
    /// While the slice lives, nothing else may read or write the range (no vCPU running).
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn slice_mut(&self, gpa: u64, len: usize) -> Option<&mut [u8]> {
        let p = self.host_ptr(gpa, len)?;
        // SAFETY: in bounds of the mapping owned by `self`; exclusivity is the caller's.
        Some(unsafe { std::slice::from_raw_parts_mut(p, len) })
    }

    /// The `vm-memory` view.
    pub fn mem(&self) -> &GuestMemoryMmap {
        &self.mem
    }

    /// Host address of guest-physical 0.
    pub fn host_addr(&self) -> *mut u8 {
        self.host
    }

    /// Size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The backend.
    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// The memfd behind [`Backend::Memfd`] memory.
    pub fn memfd(&self) -> Option<&File> {
        self.memfd.as_ref()
    }

    /// A copy of guest-physical `[gpa, gpa + len)`, read with volatile accesses by vm-memory.
    pub fn read(&self, gpa: u64, len: usize) -> Result<Vec<u8>, vm_memory::GuestMemoryError> {
        use vm_memory::Bytes;
        let mut v = vec![0; len];
        self.mem.read_slice(&mut v, GuestAddress(gpa))?;
        Ok(v)
    }

    /// Write `data` at guest-physical `gpa`.
    pub fn write(&self, gpa: u64, data: &[u8]) -> Result<(), vm_memory::GuestMemoryError> {
        use vm_memory::Bytes;
        self.mem.write_slice(data, GuestAddress(gpa))
    }
}

impl Drop for GuestMem {
    fn drop(&mut self) {
        if self.backing.is_some() {
            file::unregister(self.host as usize);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_device_cannot_shrink_or_grow_the_guest_memfd() {
        let m = GuestMem::new(4 << 20, Backend::Memfd).unwrap();
        let f = m.memfd().expect("a memfd").try_clone().unwrap();
        // What a device process holding the fd would try.
        let e = f.set_len(1 << 20).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EPERM), "{e}");
        let e = f.set_len(8 << 20).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EPERM), "{e}");
        // The seals themselves are sealed.
        // SAFETY: F_ADD_SEALS on an fd we own.
        let r = unsafe { libc::fcntl(f.as_raw_fd(), libc::F_ADD_SEALS, libc::F_SEAL_WRITE) };
        assert_eq!(r, -1);
        m.write(0x1000, b"still writable").unwrap();
        assert_eq!(m.read(0x1000, 14).unwrap(), b"still writable");
    }
}
