//! Memory to read pages from: [`PageReader`], over a mapping of this process
//! ([`MmapReader`]) or another process's memory ([`ProcessReader`]). Live memory that another
//! thread (a vCPU, the migrated process) may write is copied through raw pointers (or by the
//! kernel), never borrowed as a `&[u8]`.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use thiserror::Error;

use crate::wire::PAGE;

/// Reading pages failed.
#[derive(Debug, Error)]
pub enum ReadError {
    /// The pages lie outside the memory.
    #[error("pages {page}..+{pages} lie outside the memory ({total} pages)")]
    OutOfRange {
        /// First page.
        page: u64,
        /// Pages asked for.
        pages: u64,
        /// Pages of the memory.
        total: u64,
    },
    /// The buffer is not whole pages.
    #[error("a buffer of {0} bytes is not whole pages")]
    Buffer(usize),
    /// Reading another process's memory failed (errno kept).
    #[error("reading {len} bytes at {addr:#x} of process {pid}")]
    Process {
        /// The process.
        pid: i32,
        /// Address.
        addr: u64,
        /// Bytes.
        len: usize,
        /// Cause.
        #[source]
        source: io::Error,
    },
}

/// Memory to read pages from (page `p` is the 4 KiB at byte `p * 4096`).
pub trait PageReader: Send + Sync {
    /// Pages of memory.
    fn pages(&self) -> u64;

    /// Copy `buf.len() / 4096` whole pages from page `page` into `buf`. The copy may see a
    /// page while it changes; callers make that harmless (the dirty log sends it again, or the
    /// memory is frozen).
    fn read(&self, page: u64, buf: &mut [u8]) -> Result<(), ReadError>;
}

fn check(page: u64, buf: &[u8], total: u64) -> Result<u64, ReadError> {
    if buf.len() as u64 % PAGE != 0 {
        return Err(ReadError::Buffer(buf.len()));
    }
    let n = buf.len() as u64 / PAGE;
    if page.checked_add(n).is_none_or(|e| e > total) {
        return Err(ReadError::OutOfRange {
            page,
            pages: n,
            total,
        });
    }
    Ok(n)
}

/// Pages of a mapping in this process.
pub struct MmapReader {
    base: usize,
    len: usize,
    _owner: Option<Arc<dyn Send + Sync>>,
}

impl std::fmt::Debug for MmapReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "MmapReader({:#x}+{:#x})", self.base, self.len)
    }
}

impl MmapReader {
    /// Read the `len` bytes at `base`.
    ///
    /// # Safety
    /// `base..base + len` must stay mapped and readable for the reader's lifetime (other
    /// threads may write it: reads are raw copies).
    pub unsafe fn new(base: *const u8, len: usize) -> MmapReader {
        MmapReader {
            base: base as usize,
            len,
            _owner: None,
        }
    }

    /// Read a [`memx::Mapping`], kept alive by the reader.
    pub fn of_mapping(m: Arc<memx::Mapping>) -> MmapReader {
        MmapReader {
            base: m.as_ptr() as usize,
            len: m.len(),
            _owner: Some(m),
        }
    }
}

impl PageReader for MmapReader {
    fn pages(&self) -> u64 {
        self.len as u64 / PAGE
    }

    fn read(&self, page: u64, buf: &mut [u8]) -> Result<(), ReadError> {
        check(page, buf, self.pages())?;
        let src = (self.base + (page * PAGE) as usize) as *const u8;
        // SAFETY: the range was checked against the mapping, which the constructor's contract
        // (or the owned Mapping) keeps alive; the destination is our own buffer, and the two
        // cannot overlap. A raw copy, never a reference to memory another thread may write.
        unsafe { std::ptr::copy_nonoverlapping(src, buf.as_mut_ptr(), buf.len()) };
        Ok(())
    }
}

/// Pages of another process's memory (`process_vm_readv`, falling back to `/proc/PID/mem`
/// where the call is not permitted).
#[derive(Debug)]
pub struct ProcessReader {
    pid: i32,
    base: u64,
    len: u64,
    mem: Option<File>,
}

impl ProcessReader {
    /// Read the `len` bytes at `base` in process `pid` (opens `/proc/PID/mem` as the
    /// fallback; the caller needs ptrace rights over it).
    pub fn new(pid: i32, base: u64, len: u64) -> Result<ProcessReader, ReadError> {
        let mem = File::open(format!("/proc/{pid}/mem")).ok();
        Ok(ProcessReader {
            pid,
            base,
            len,
            mem,
        })
    }

    fn vm_readv(&self, addr: u64, buf: &mut [u8]) -> io::Result<usize> {
        let local = libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        };
        let remote = libc::iovec {
            iov_base: addr as *mut libc::c_void,
            iov_len: buf.len(),
        };
        // SAFETY: one local iovec over our own buffer and one remote iovec the kernel checks
        // against the other process's mappings; nothing else is touched.
        let r = unsafe { libc::process_vm_readv(self.pid, &local, 1, &remote, 1, 0) };
        if r < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(r as usize)
        }
    }
}

impl PageReader for ProcessReader {
    fn pages(&self) -> u64 {
        self.len / PAGE
    }

    fn read(&self, page: u64, buf: &mut [u8]) -> Result<(), ReadError> {
        check(page, buf, self.pages())?;
        let addr = self.base + page * PAGE;
        let len = buf.len();
        let err = |source| ReadError::Process {
            pid: self.pid,
            addr,
            len,
            source,
        };
        match self.vm_readv(addr, buf) {
            Ok(n) if n == buf.len() => Ok(()),
            Ok(n) => Err(err(io::Error::other(format!(
                "short read: {n} of {len} bytes"
            )))),
            Err(e) => match &self.mem {
                Some(f) if e.raw_os_error() == Some(libc::EPERM) => {
                    f.read_exact_at(buf, addr).map_err(err)
                }
                _ => Err(err(e)),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readers_agree_and_check_bounds() {
        let m = Arc::new(memx::Mapping::anonymous(4 * PAGE as usize).unwrap());
        for i in 0..4 * PAGE as usize {
            m.write_u8(i, (i % 251) as u8);
        }
        let a = MmapReader::of_mapping(m.clone());
        let b = ProcessReader::new(std::process::id() as i32, m.as_ptr() as u64, m.len() as u64)
            .unwrap();
        let (mut x, mut y) = (vec![0u8; 2 * PAGE as usize], vec![0u8; 2 * PAGE as usize]);
        a.read(1, &mut x).unwrap();
        b.read(1, &mut y).unwrap();
        assert_eq!(x, y);
        assert_eq!(x[0], (PAGE % 251) as u8);
        assert!(matches!(
            a.read(3, &mut x),
            Err(ReadError::OutOfRange { .. })
        ));
        assert!(matches!(
            b.read(3, &mut x),
            Err(ReadError::OutOfRange { .. })
        ));
        assert!(matches!(
            a.read(0, &mut [0u8; 10]),
            Err(ReadError::Buffer(10))
        ));
        let gone = ProcessReader::new(i32::MAX, 0x1000, PAGE).unwrap();
        assert!(matches!(
            gone.read(0, &mut y[..PAGE as usize]),
            Err(ReadError::Process { .. })
        ));
    }
}
