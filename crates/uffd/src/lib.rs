//! A safe, complete binding of Linux `userfaultfd`.
//!
//! - **Create** through `/dev/userfaultfd` (Linux 6.1) or the `userfaultfd(2)` syscall, with
//!   close-on-exec, non-blocking and user-mode-only as options ([`UffdBuilder`]). The
//!   `UFFDIO_API` handshake negotiates [`Features`]; what the kernel offers is probed at run time
//!   ([`Support::probe`]), never chosen by cargo features, so no struct changes shape.
//! - **Register** typed, page-aligned [`Range`]s with [`RegisterMode`] MISSING, WP and MINOR.
//! - **Resolve** with COPY (DONTWAKE, WP), ZEROPAGE, CONTINUE, WRITEPROTECT, MOVE, POISON and
//!   WAKE. Partial progress (`EAGAIN` with bytes done) is [`ResolveError::Partial`]; `EEXIST`
//!   (someone resolved the page first) wakes the range and returns
//!   [`Resolved::AlreadyPresent`]; a vanished target (`ENOENT`/`ESRCH`) is
//!   [`ResolveError::TargetGone`]; every error keeps the errno as its `source`.
//! - **Events**: [`Event`] PAGEFAULT (address, missing / WP / minor, write, thread id), FORK
//!   (with the child's [`Uffd`]), REMAP, REMOVE, UNMAP, read in batches ([`EventBuffer`]).
//! - **Dirty tracking**: [`DirtyTracker`] uses async write protection and `PAGEMAP_SCAN` to
//!   return the pages written since the last scan and re-protect them in one call.
//!
//! # Example: serve one missing page
//!
//! ```no_run
//! use uffd::{CopyMode, Event, Range, RegisterMode, UffdBuilder};
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! # let (addr, len) = (0usize, 4096usize);
//! let uffd = UffdBuilder::new().create()?;
//! let range = Range::new(addr, len)?;
//! uffd.register(range, RegisterMode::MISSING)?;
//! let page = vec![0x5a_u8; uffd::page_size()];
//! uffd.poll_readable(None)?;
//! if let Some(Event::Pagefault(pf)) = uffd.read_event()? {
//!     uffd.copy(pf.page(), &page, CopyMode::empty())?;
//! }
//! # Ok(()) }
//! ```
//!
//! # Why not the `userfaultfd` crate
//!
//! It has no MOVE, POISON, WP_ASYNC or PAGEMAP_SCAN, generates its bindings with bindgen (so
//! building needs libclang), selects kernel features with cargo features that change struct
//! shapes, passes ranges as raw pointers and drops errno from several errors. This crate takes
//! its structs and most constants from `linux-raw-sys`, computes the few ioctl numbers that
//! crate lacks, and checks all of them and every struct size at compile time ([`sys`]).

mod dirty;
mod error;
mod event;
mod features;
mod range;
pub mod sys;
mod uffd;

pub use dirty::{DirtyError, DirtyTracker};
pub use error::{CreateError, Op, ReadError, RegisterError, ResolveError};
pub use event::{Event, EventBuffer, FaultKind, Pagefault};
pub use features::{ContinueMode, CopyMode, Features, Ioctls, MoveMode, RegisterMode};
pub use range::{Range, RangeError, page_size};
pub use uffd::{Origin, Resolved, Support, Uffd, UffdBuilder, Via, poll_in};

/// Render an error and its chain of causes on one line: `outer: cause: root cause`.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}
