//! Memory externalization: the contents of a memory range come from somewhere else, page by
//! page, when they are first touched.
//!
//! - [`PageSource`]: where pages come from. It answers at once ([`Fill::Bytes`],
//!   [`Fill::Zero`], [`Fill::Present`]) or later through a [`Completer`] ([`Fill::Pending`]),
//!   so a network peer or a slow disk never blocks the loop. Sources so far: [`ZeroSource`],
//!   [`BufferSource`] (zero-copy from memory), [`FileSource`] (`pread`, holes as zero pages),
//!   [`PageCacheSource`] (MINOR faults) and [`AsyncSource`] (any source on helper threads).
//! - [`FaultLoop`]: worker threads, each owning a userfaultfd over its share of the regions
//!   (sharded by address range, so no single wait queue serialises the faults), batch-resolving
//!   runs of pages in one ioctl, counting faults, bytes and a per-fault service-time histogram
//!   ([`Stats`]), and stopping cleanly: [`FaultLoop::stop`] serves every fault raised and every
//!   answer owed; [`FaultLoop::finish`] also populates every page never touched.
//!
//! - [`Installer`]: pages pushed into the loop's memory from any thread (a migration
//!   destination's receivers), settling the faults that wait on them.
//!
//! A page the source cannot produce is poisoned (`UFFDIO_POISON`): its reader gets `SIGBUS`,
//! never wrong data and never an endless wait.
//!
//! ```no_run
//! use memx::{BufferSource, Config, FaultLoop, Region};
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! # let range = uffd::Range::new(0x1000, 0x1000)?;
//! let image = vec![0xab_u8; range.len()];
//! let fl = FaultLoop::start(
//!     &[Region { range, offset: 0 }],
//!     BufferSource::new(image),
//!     Config { threads: 2, batch_pages: 16, ..Config::default() },
//! )?;
//! // ... the memory is touched; pages arrive on demand ...
//! let stats = fl.finish()?;
//! println!("{} faults, p99 {} ns", stats.faults, stats.latency.p99_ns);
//! # Ok(()) }
//! ```

mod control;
mod fault_loop;
mod install;
mod mapping;
mod prefetch;
mod source;
mod stats;
mod worker;

pub use control::{Config, LoopError, Mode, Region, pin_to};
pub use fault_loop::{FaultLoop, PrefetchProgress};
pub use install::{InstallError, Installed, Installer};
pub use mapping::{MapError, Mapping};
pub use source::{
    AsyncSource, BufferSource, Completer, Completion, FileSource, Fill, PageCacheSource,
    PageSource, Request, SourceError, ZeroSource,
};
pub use stats::{LOG2_BUCKETS, Latency, Stats};
