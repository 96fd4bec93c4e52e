//! Surviving a client that shrinks the file behind its DMA mapping.
//!
//! A client maps memory for DMA by handing an fd. If it later truncates that file, the
//! server's next touch of the vanished pages raises SIGBUS, whose default action kills the
//! whole server process (every device and every client in it). Refusing unsealed fds would
//! be simplest, but libvfio-user's own client maps an unsealed `mkstemp` file, so the server
//! recovers instead:
//!
//! - An fd sealed against shrinking (`F_SEAL_SHRINK`, as faultline's VMM and client hand
//!   out) cannot lose pages: it is mapped as is.
//! - Any other fd's mapping is *guarded*: its host range goes into a lock-free table that a
//!   process-wide SIGBUS handler consults. A fault inside a guarded range replaces the
//!   faulting page with an anonymous one (so the interrupted copy completes, on garbage) and
//!   marks the mapping truncated; the DMA access that touched it then fails with
//!   [`DmaError::Truncated`](super::DmaError::Truncated) and so does every later access to
//!   that mapping (the client must unmap and map again). Only this client's device sees an
//!   error; the process and the other devices and clients go on.
//! - A SIGBUS anywhere else goes to the handler that was installed before (Rust's own, which
//!   resets the default action so the fault kills the process as it would have).
//!
//! The table has [`SLOTS`] entries for the whole process; a DMA_MAP of an unsealed fd when it
//! is full is refused (`ENOSPC`), which a client avoids by sealing its fds.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

/// Guarded mappings the process can hold at once.
pub(crate) const SLOTS: usize = 4096;

struct Slot {
    start: AtomicUsize,
    /// 0: free.
    len: AtomicUsize,
    claimed: AtomicBool,
    truncated: AtomicBool,
}

#[allow(clippy::declare_interior_mutable_const)]
const FREE: Slot = Slot {
    start: AtomicUsize::new(0),
    len: AtomicUsize::new(0),
    claimed: AtomicBool::new(false),
    truncated: AtomicBool::new(false),
};

static TABLE: [Slot; SLOTS] = [FREE; SLOTS];

/// The handler that was there before ours, and the page size.
struct Installed {
    prev: libc::sigaction,
    page: usize,
}

static INSTALLED: OnceLock<Result<Installed, i32>> = OnceLock::new();

/// A guarded range; dropping it (after the munmap) frees the slot.
pub(crate) struct Guard(usize);

impl Guard {
    /// Whether a page of the range vanished under the server.
    pub(crate) fn truncated(&self) -> bool {
        TABLE[self.0].truncated.load(Ordering::SeqCst)
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        let s = &TABLE[self.0];
        s.len.store(0, Ordering::SeqCst);
        s.start.store(0, Ordering::SeqCst);
        s.truncated.store(false, Ordering::SeqCst);
        s.claimed.store(false, Ordering::SeqCst);
    }
}

/// Why a range could not be guarded.
#[derive(Debug, thiserror::Error)]
pub enum GuardError {
    /// Every slot is taken.
    #[error("{SLOTS} mappings of unsealed fds are guarded already; seal the fd (F_SEAL_SHRINK)")]
    Full,
    /// sigaction failed.
    #[error("installing the SIGBUS handler")]
    Install(#[source] std::io::Error),
}

impl GuardError {
    /// errno for the error reply.
    pub fn errno(&self) -> i32 {
        match self {
            GuardError::Full => libc::ENOSPC,
            GuardError::Install(e) => e.raw_os_error().unwrap_or(libc::EIO),
        }
    }
}

fn install() -> Result<&'static Installed, GuardError> {
    let r = INSTALLED.get_or_init(|| {
        // SAFETY: sysconf with a valid name.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(4096) as usize;
        // SAFETY: an all-zero sigaction is a valid value (no handler, empty mask) to fill.
        let mut act: libc::sigaction = unsafe { std::mem::zeroed() };
        act.sa_sigaction = on_sigbus as *const () as usize;
        act.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK;
        // SAFETY: as above.
        let mut prev: libc::sigaction = unsafe { std::mem::zeroed() };
        // The handler reads INSTALLED only once this initialiser has returned; until then a
        // SIGBUS in a guarded range cannot happen (nothing is registered yet).
        // SAFETY: valid sigaction structs; SIGBUS may be caught.
        if unsafe { libc::sigaction(libc::SIGBUS, &act, &mut prev) } != 0 {
            return Err(std::io::Error::last_os_error().raw_os_error().unwrap_or(0));
        }
        Ok(Installed { prev, page })
    });
    r.as_ref()
        .map_err(|&e| GuardError::Install(std::io::Error::from_raw_os_error(e)))
}

/// Guard `start..start+len` (a live mapping of an unsealed fd).
pub(crate) fn guard(start: usize, len: usize) -> Result<Guard, GuardError> {
    install()?;
    for (i, s) in TABLE.iter().enumerate() {
        if s.claimed
            .compare_exchange(false, true, Ordering::SeqCst, Ordering::SeqCst)
            .is_ok()
        {
            s.truncated.store(false, Ordering::SeqCst);
            s.start.store(start, Ordering::SeqCst);
            s.len.store(len, Ordering::SeqCst);
            return Ok(Guard(i));
        }
    }
    Err(GuardError::Full)
}

/// Whether an fd is sealed against shrinking (its pages cannot vanish).
pub(crate) fn sealed_against_shrinking(fd: std::os::fd::RawFd) -> bool {
    // SAFETY: F_GET_SEALS on a descriptor the caller holds; -1 for files without seals.
    let seals = unsafe { libc::fcntl(fd, libc::F_GET_SEALS) };
    seals >= 0 && seals & libc::F_SEAL_SHRINK != 0
}

extern "C" fn on_sigbus(sig: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    // Only async-signal-safe work here: atomics, mmap, sigaction.
    // SAFETY: the kernel passes a valid siginfo for an SA_SIGINFO handler.
    let addr = unsafe { (*info).si_addr() } as usize;
    let inst = INSTALLED.get().and_then(|r| r.as_ref().ok());
    if let Some(inst) = inst {
        for s in TABLE.iter() {
            let len = s.len.load(Ordering::SeqCst);
            let start = s.start.load(Ordering::SeqCst);
            if len == 0 || addr < start || addr - start >= len {
                continue;
            }
            // An anonymous page (or huge page, for hugetlbfs mappings that refuse a smaller
            // replacement) in place of the one that vanished.
            for size in [inst.page, 2 << 20, 1 << 30] {
                let at = addr & !(size - 1);
                if at < start || at + size > start + len {
                    break;
                }
                // SAFETY: replaces pages inside a guarded mapping the server owns (it is
                // live: an access to it is what faulted); nothing else lives there.
                let p = unsafe {
                    libc::mmap(
                        at as *mut libc::c_void,
                        size,
                        libc::PROT_READ | libc::PROT_WRITE,
                        libc::MAP_FIXED | libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                        -1,
                        0,
                    )
                };
                if p != libc::MAP_FAILED {
                    s.truncated.store(true, Ordering::SeqCst);
                    return;
                }
            }
        }
    }
    // Not ours: what was there before.
    let prev = inst.map(|i| i.prev);
    match prev {
        Some(p) if p.sa_sigaction != libc::SIG_DFL && p.sa_sigaction != libc::SIG_IGN => {
            if p.sa_flags & libc::SA_SIGINFO != 0 {
                // SAFETY: the previous handler was installed as an SA_SIGINFO handler.
                let f: extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void) =
                    unsafe { std::mem::transmute(p.sa_sigaction) };
                f(sig, info, ctx);
            } else {
                // SAFETY: the previous handler was installed as a plain handler.
                let f: extern "C" fn(libc::c_int) = unsafe { std::mem::transmute(p.sa_sigaction) };
                f(sig);
            }
        }
        _ => {
            // The default action: reset it and return; the access faults again and the
            // process dies of SIGBUS, as it would have without us.
            // SAFETY: an all-zero sigaction with SIG_DFL (0) is valid.
            let dfl: libc::sigaction = unsafe { std::mem::zeroed() };
            // SAFETY: sigaction is async-signal-safe; valid struct.
            unsafe { libc::sigaction(libc::SIGBUS, &dfl, std::ptr::null_mut()) };
        }
    }
}
