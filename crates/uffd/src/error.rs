//! One error enum per operation; every variant keeps the kernel's errno in its `source`.

use std::fmt;
use std::io;

use thiserror::Error;

use crate::{Features, Range, RegisterMode};

/// Creating a userfaultfd and completing the `UFFDIO_API` handshake.
#[derive(Debug, Error)]
pub enum CreateError {
    /// `/dev/userfaultfd` could not be opened (and the syscall was not to be tried).
    #[error("cannot open /dev/userfaultfd")]
    OpenDevice(#[source] io::Error),
    /// `USERFAULTFD_IOC_NEW` on `/dev/userfaultfd` failed.
    #[error("USERFAULTFD_IOC_NEW on /dev/userfaultfd failed")]
    DeviceNew(#[source] io::Error),
    /// The `userfaultfd(2)` syscall failed; `device` says why the device was not used.
    #[error(
        "userfaultfd(2) failed (the /dev/userfaultfd path failed too: {device}); \
         kernel-mode faults need CAP_SYS_PTRACE or vm.unprivileged_userfaultfd=1"
    )]
    Syscall {
        /// Why `/dev/userfaultfd` was not used.
        device: String,
        /// The syscall's errno.
        #[source]
        source: io::Error,
    },
    /// The `UFFDIO_API` handshake failed.
    #[error("UFFDIO_API handshake failed (features requested: {requested:?})")]
    Handshake {
        /// Features that were asked for.
        requested: Features,
        /// The ioctl's errno (EPERM: EVENT_FORK needs CAP_SYS_PTRACE).
        #[source]
        source: io::Error,
    },
    /// The kernel does not support features that were required.
    #[error("the kernel lacks userfaultfd features {missing:?} (it supports {supported:?})")]
    Unsupported {
        /// Required but unsupported.
        missing: Features,
        /// What the kernel offers.
        supported: Features,
    },
}

/// Registering or unregistering a range.
#[derive(Debug, Error)]
pub enum RegisterError {
    /// `UFFDIO_REGISTER` failed.
    #[error("UFFDIO_REGISTER of {range} with {mode:?} failed{}", hint(.source))]
    Register {
        /// The range.
        range: Range,
        /// The mode asked for.
        mode: RegisterMode,
        /// The ioctl's errno.
        #[source]
        source: io::Error,
    },
    /// A mode needs a feature this userfaultfd did not negotiate.
    #[error(
        "registering {range} with {mode:?} needs features {missing:?}, not enabled on this userfaultfd"
    )]
    ModeNeedsFeature {
        /// The range.
        range: Range,
        /// The mode asked for.
        mode: RegisterMode,
        /// Features to request at creation.
        missing: Features,
    },
    /// `UFFDIO_UNREGISTER` failed.
    #[error("UFFDIO_UNREGISTER of {range} failed{}", hint(.source))]
    Unregister {
        /// The range.
        range: Range,
        /// The ioctl's errno.
        #[source]
        source: io::Error,
    },
}

fn hint(e: &io::Error) -> &'static str {
    match e.raw_os_error() {
        Some(libc::EBUSY) => ": part of it is registered with another userfaultfd",
        Some(libc::ENOMEM) => ": part of it is not mapped",
        Some(libc::EINVAL) => {
            ": not mapped, or the mapping (anonymous / shmem / hugetlbfs) does not support this mode"
        }
        Some(libc::EPERM) => ": the mapping is not writable or the process may not do this",
        Some(libc::EBADF) => ": the file descriptor is closed or not a userfaultfd",
        _ => "",
    }
}

/// The operation a [`ResolveError`] is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// `UFFDIO_COPY`.
    Copy,
    /// `UFFDIO_ZEROPAGE`.
    ZeroPage,
    /// `UFFDIO_CONTINUE`.
    Continue,
    /// `UFFDIO_WRITEPROTECT`.
    WriteProtect,
    /// `UFFDIO_MOVE`.
    Move,
    /// `UFFDIO_POISON`.
    Poison,
    /// `UFFDIO_WAKE`.
    Wake,
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Op::Copy => "UFFDIO_COPY",
            Op::ZeroPage => "UFFDIO_ZEROPAGE",
            Op::Continue => "UFFDIO_CONTINUE",
            Op::WriteProtect => "UFFDIO_WRITEPROTECT",
            Op::Move => "UFFDIO_MOVE",
            Op::Poison => "UFFDIO_POISON",
            Op::Wake => "UFFDIO_WAKE",
        })
    }
}

/// Resolving a fault: COPY, ZEROPAGE, CONTINUE, WRITEPROTECT, MOVE, POISON, WAKE.
#[derive(Debug, Error)]
pub enum ResolveError {
    /// The kernel did part of the range and returned `EAGAIN` (a page further on already
    /// existed, or the address space was changing). Retry from `range.start() + done`.
    #[error("{op} of {range}: partial progress, {done} of {} bytes done", .range.len())]
    Partial {
        /// The operation.
        op: Op,
        /// The whole range asked for.
        range: Range,
        /// Bytes done (a multiple of the page size; may be 0).
        done: usize,
        /// `EAGAIN`.
        #[source]
        source: io::Error,
    },
    /// The faulting process or the target mapping is gone (`ESRCH` / `ENOENT`).
    #[error("{op} of {range}: the target process or mapping is gone")]
    TargetGone {
        /// The operation.
        op: Op,
        /// The range.
        range: Range,
        /// `ESRCH` or `ENOENT`.
        #[source]
        source: io::Error,
    },
    /// The data given does not cover the range.
    #[error("{op} of {range}: {given} bytes of data given for a {}-byte range", .range.len())]
    ShortSource {
        /// The operation.
        op: Op,
        /// The range.
        range: Range,
        /// Bytes given.
        given: usize,
    },
    /// Any other failure.
    #[error("{op} of {range} failed")]
    Failed {
        /// The operation.
        op: Op,
        /// The range.
        range: Range,
        /// The ioctl's errno.
        #[source]
        source: io::Error,
    },
}

impl ResolveError {
    /// The errno behind this error, if the kernel gave one.
    pub fn errno(&self) -> Option<i32> {
        match self {
            ResolveError::Partial { source, .. }
            | ResolveError::TargetGone { source, .. }
            | ResolveError::Failed { source, .. } => source.raw_os_error(),
            ResolveError::ShortSource { .. } => None,
        }
    }
}

/// Reading events.
#[derive(Debug, Error)]
pub enum ReadError {
    /// `read(2)` on the userfaultfd failed.
    #[error("reading userfaultfd events failed")]
    Read(#[source] io::Error),
    /// `poll(2)` on the userfaultfd failed.
    #[error("polling the userfaultfd failed")]
    Poll(#[source] io::Error),
    /// The kernel returned a partial message (never seen; reported rather than misparsed).
    #[error("read returned {0} bytes, not a whole number of 32-byte messages")]
    Truncated(usize),
}
