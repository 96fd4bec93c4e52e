//! Guest memory mapped privately from a snapshot's memory file (`restore --mode mmap`), and
//! what happens when that file shrinks under the VM.
//!
//! A page the VM has not written yet is the file's page-cache page; truncating the file takes
//! it away, and the next access to it fails:
//! - by a vCPU (KVM reads the page): `KVM_RUN` fails with `EFAULT`; the vCPU checks
//!   [`GuestMem::file_lost`](super::GuestMem::file_lost) and stops the VM with
//!   [`MemoryLost`], which names the file and its sizes;
//! - by a host thread (a snapshot of the restored VM, a migration reading memory): the kernel
//!   sends SIGBUS. The vCPU layer's SIGBUS handler calls [`recover_sigbus`]: if the address
//!   lies in such a mapping, the page is replaced by a zero page (so the access completes
//!   instead of killing the process), the loss is recorded, and from then on the VM is
//!   failed: the snapshot refuses to complete and every vCPU stops with [`MemoryLost`] before
//!   it runs the guest again. The zeros are never taken for data.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};

/// File-backed guest mappings the SIGBUS handler may repair: `(start, len)`, 0 = free slot.
static RANGES: [(AtomicUsize, AtomicUsize); 8] =
    [const { (AtomicUsize::new(0), AtomicUsize::new(0)) }; 8];
/// The first address lost in any of them (0: none).
static LOST: AtomicUsize = AtomicUsize::new(0);

/// Guest memory from a file became unreadable: the file shrank under the VM.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "guest memory is mapped from the snapshot's memory file, which shrank to {now} bytes (of {expected}) while the VM ran{}: pages the VM had not written yet are lost (never truncate or rewrite a snapshot an mmap restore is running from)",
    .host_addr.map(|a| format!(" (lost page at host address {a:#x})")).unwrap_or_default()
)]
pub struct MemoryLost {
    /// The file's size now.
    pub now: u64,
    /// Its size at restore.
    pub expected: u64,
    /// The page whose access raised SIGBUS, if a host thread hit one.
    pub host_addr: Option<u64>,
}

/// Register `[start, start + len)` as file-backed guest memory (false: no free slot; then a
/// SIGBUS there is not repaired).
pub(super) fn register(start: usize, len: usize) -> bool {
    for (s, l) in &RANGES {
        if s.compare_exchange(0, start, SeqCst, SeqCst).is_ok() {
            l.store(len, SeqCst);
            return true;
        }
    }
    false
}

/// Forget a range registered with [`register`].
pub(super) fn unregister(start: usize) {
    for (s, l) in &RANGES {
        if s.load(SeqCst) == start {
            let len = l.swap(0, SeqCst);
            // A later mapping may reuse the addresses: the loss was this one's.
            if let Some(a) = lost_in(start, len) {
                let _ = LOST.compare_exchange(a, 0, SeqCst, SeqCst);
            }
            s.store(0, SeqCst);
        }
    }
}

/// The lost address inside `[start, start + len)`, if any.
pub(super) fn lost_in(start: usize, len: usize) -> Option<usize> {
    let a = LOST.load(SeqCst);
    (a != 0 && a >= start && a - start < len).then_some(a)
}

/// Called from the SIGBUS handler of a thread that is not a vCPU in `KVM_RUN`: if `addr` lies
/// in file-backed guest memory, put a zero page there, record the loss and return true (the
/// access then completes); otherwise false (the caller lets SIGBUS take its default course).
///
/// Async-signal-safe: atomics and one `mmap` system call.
pub fn recover_sigbus(addr: usize) -> bool {
    let in_range = RANGES.iter().any(|(s, l)| {
        let (s, l) = (s.load(SeqCst), l.load(SeqCst));
        s != 0 && addr >= s && addr - s < l
    });
    if !in_range {
        return false;
    }
    let page = addr & !(4095usize);
    // SAFETY: replaces one page inside a guest memory mapping this process owns (registered
    // above) by an anonymous zero page at the same address; no Rust reference covers guest
    // memory (host code reaches it through raw pointers and volatile accesses only).
    let p = unsafe {
        libc::mmap(
            page as *mut libc::c_void,
            4096,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED,
            -1,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        return false;
    }
    let _ = LOST.compare_exchange(0, addr.max(1), SeqCst, SeqCst);
    true
}

/// The size of `file` now (`None` if it cannot be read).
pub(super) fn size_now(file: &File) -> Option<u64> {
    // SAFETY: a zeroed stat is valid; fstat fills it for an fd we own.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: a valid fd and a valid out pointer.
    (unsafe { libc::fstat(file.as_raw_fd(), &mut st) } == 0).then_some(st.st_size as u64)
}
