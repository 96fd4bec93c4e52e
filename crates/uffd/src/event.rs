//! Events read from a userfaultfd, parsed into a typed enum; batched reads.

use std::io;
use std::mem::size_of;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use crate::error::ReadError;
use crate::{Features, Range, Uffd, sys};

/// Why a page fault happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultKind {
    /// The page is not present (MISSING mode).
    Missing,
    /// A write hit a write-protected page (WP mode).
    WriteProtect,
    /// The page is in the page cache but not mapped (MINOR mode).
    Minor,
}

/// A page fault event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pagefault {
    /// Faulting address: page-aligned unless [`Features::EXACT_ADDRESS`] is on.
    pub address: usize,
    /// Why it faulted.
    pub kind: FaultKind,
    /// Whether the access was a write.
    pub write: bool,
    /// The faulting thread's id, with [`Features::THREAD_ID`].
    pub thread_id: Option<u32>,
}

impl Pagefault {
    /// The page that faulted.
    pub fn page(&self) -> Range {
        Range::page_of(self.address)
    }
}

/// An event read from a userfaultfd.
#[derive(Debug)]
pub enum Event {
    /// A thread is blocked on a fault until it is resolved.
    Pagefault(Pagefault),
    /// The process forked; the child's registered ranges are served by `uffd`
    /// ([`Features::EVENT_FORK`]).
    ///
    /// The forking thread waits in the kernel until this event is read. glibc's `fork()` holds
    /// malloc's locks across the syscall, so a handler thread in the same process must read
    /// this event before it allocates, or fork with the raw `SYS_fork`/`clone` syscall.
    Fork {
        /// The child's userfaultfd, owned by the receiver.
        uffd: Uffd,
    },
    /// A registered range moved with `mremap` ([`Features::EVENT_REMAP`]).
    Remap {
        /// Old start.
        from: usize,
        /// New start.
        to: usize,
        /// Length.
        len: usize,
    },
    /// Pages were dropped with `madvise(MADV_DONTNEED/REMOVE)` ([`Features::EVENT_REMOVE`]):
    /// they fault as missing again.
    Remove {
        /// Start of the range.
        start: usize,
        /// End of the range.
        end: usize,
    },
    /// A registered range was unmapped ([`Features::EVENT_UNMAP`]).
    Unmap {
        /// Start of the range.
        start: usize,
        /// End of the range.
        end: usize,
    },
    /// An event code this crate does not know (a newer kernel).
    Unknown {
        /// The raw event code.
        code: u8,
    },
}

/// A reusable buffer for batched event reads: one `read(2)` returns up to `capacity` events.
pub struct EventBuffer {
    msgs: Vec<sys::uffd_msg>,
    events: Vec<Event>,
}

impl EventBuffer {
    /// A buffer for up to `capacity` events per read (at least 1).
    pub fn new(capacity: usize) -> Self {
        let zero = sys::uffd_msg {
            event: 0,
            reserved1: 0,
            reserved2: 0,
            reserved3: 0,
            arg: sys::uffd_msg__bindgen_ty_1 {
                reserved: sys::uffd_msg__bindgen_ty_1__bindgen_ty_5 {
                    reserved1: 0,
                    reserved2: 0,
                    reserved3: 0,
                },
            },
        };
        Self {
            msgs: vec![zero; capacity.max(1)],
            events: Vec::with_capacity(capacity.max(1)),
        }
    }

    /// Events per read.
    pub fn capacity(&self) -> usize {
        self.msgs.len()
    }
}

fn parse(uffd: &Uffd, m: &sys::uffd_msg) -> Event {
    let code = m.event;
    // SAFETY (for every union read below): `uffd_msg` is plain data, every bit pattern of its
    // union members is valid, and the kernel filled the member that `event` names.
    match code {
        sys::UFFD_EVENT_PAGEFAULT => {
            // SAFETY: see above.
            let pf = unsafe { m.arg.pagefault };
            let flags = pf.flags;
            let kind = if flags & sys::UFFD_PAGEFAULT_FLAG_WP != 0 {
                FaultKind::WriteProtect
            } else if flags & sys::UFFD_PAGEFAULT_FLAG_MINOR != 0 {
                FaultKind::Minor
            } else {
                FaultKind::Missing
            };
            // SAFETY: see above; `ptid` is the only member of `feat`.
            let ptid = unsafe { pf.feat.ptid };
            Event::Pagefault(Pagefault {
                address: pf.address as usize,
                kind,
                write: flags & sys::UFFD_PAGEFAULT_FLAG_WRITE != 0,
                thread_id: uffd
                    .features()
                    .contains(Features::THREAD_ID)
                    .then_some(ptid),
            })
        }
        sys::UFFD_EVENT_FORK => {
            // SAFETY: see above.
            let ufd = unsafe { m.arg.fork.ufd } as i32;
            // SAFETY: the kernel installed `ufd` in our fd table for this event; nobody else
            // owns it.
            let fd = unsafe { OwnedFd::from_raw_fd(ufd) };
            Event::Fork {
                uffd: uffd.inherit(fd),
            }
        }
        sys::UFFD_EVENT_REMAP => {
            // SAFETY: see above.
            let r = unsafe { m.arg.remap };
            Event::Remap {
                from: r.from as usize,
                to: r.to as usize,
                len: r.len as usize,
            }
        }
        sys::UFFD_EVENT_REMOVE | sys::UFFD_EVENT_UNMAP => {
            // SAFETY: see above.
            let r = unsafe { m.arg.remove };
            let (start, end) = (r.start as usize, r.end as usize);
            if code == sys::UFFD_EVENT_REMOVE {
                Event::Remove { start, end }
            } else {
                Event::Unmap { start, end }
            }
        }
        code => Event::Unknown { code },
    }
}

impl Uffd {
    /// Read the events that are ready, up to the buffer's capacity, in one `read(2)`.
    ///
    /// On a non-blocking fd, returns an empty batch when nothing is pending. Events are
    /// drained from the buffer by the returned iterator; fds of `Fork` events not taken are
    /// closed when the buffer is next used or dropped.
    pub fn read_events<'b>(
        &self,
        buf: &'b mut EventBuffer,
    ) -> Result<std::vec::Drain<'b, Event>, ReadError> {
        buf.events.clear();
        let bytes = buf.msgs.len() * size_of::<sys::uffd_msg>();
        let n = loop {
            // SAFETY: `buf.msgs` is a valid, writable buffer of `bytes` bytes of plain data.
            let r = unsafe {
                libc::read(
                    self.as_raw_fd(),
                    buf.msgs.as_mut_ptr().cast::<libc::c_void>(),
                    bytes,
                )
            };
            if r >= 0 {
                break r as usize;
            }
            let e = io::Error::last_os_error();
            match e.kind() {
                io::ErrorKind::Interrupted => continue,
                io::ErrorKind::WouldBlock => return Ok(buf.events.drain(..)),
                _ => return Err(ReadError::Read(e)),
            }
        };
        if n % size_of::<sys::uffd_msg>() != 0 {
            return Err(ReadError::Truncated(n));
        }
        for m in &buf.msgs[..n / size_of::<sys::uffd_msg>()] {
            buf.events.push(parse(self, m));
        }
        Ok(buf.events.drain(..))
    }

    /// Read at most one event (convenience for tests and simple handlers).
    pub fn read_event(&self) -> Result<Option<Event>, ReadError> {
        let mut buf = EventBuffer::new(1);
        Ok(self.read_events(&mut buf)?.next())
    }
}
