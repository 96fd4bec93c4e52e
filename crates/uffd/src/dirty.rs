//! Dirty-page tracking with asynchronous write protection (`UFFD_FEATURE_WP_ASYNC`) and the
//! `PAGEMAP_SCAN` ioctl (Linux 6.7): the kernel resolves write-protect faults by itself, and one
//! ioctl returns the pages written since the last scan and protects them again.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

use thiserror::Error;

use crate::error::{CreateError, RegisterError, ResolveError};
use crate::uffd::ioctl;
use crate::{Features, Range, RegisterMode, Uffd, UffdBuilder, page_size, sys};

/// Setting up or scanning a [`DirtyTracker`].
#[derive(Debug, Error)]
pub enum DirtyError {
    /// The async-WP userfaultfd could not be created (kernel older than 6.7?).
    #[error("cannot create a WP_ASYNC userfaultfd")]
    Create(#[source] CreateError),
    /// The range could not be registered for write protection.
    #[error("cannot register the tracked range")]
    Register(#[source] RegisterError),
    /// The initial write protection failed.
    #[error("cannot write-protect the tracked range")]
    Protect(#[source] ResolveError),
    /// `/proc/self/pagemap` could not be opened.
    #[error("cannot open /proc/self/pagemap")]
    Pagemap(#[source] io::Error),
    /// The uffd given to [`DirtyTracker::with_uffd`] lacks `WP_ASYNC`.
    #[error("the userfaultfd was not created with WP_ASYNC")]
    NotAsync,
    /// `PAGEMAP_SCAN` failed.
    #[error("PAGEMAP_SCAN of {range} failed")]
    Scan {
        /// The range scanned.
        range: Range,
        /// The ioctl's errno.
        #[source]
        source: io::Error,
    },
}

/// Tracks which pages of a range are written, without a fault handler.
///
/// ```no_run
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// # let mem: &mut [u8] = &mut [];
/// let range = uffd::Range::of_slice(mem)?;
/// let mut tracker = uffd::DirtyTracker::new(range)?;
/// mem[0] = 1; // written: reported by the next scan
/// let mut dirty = Vec::new();
/// tracker.collect(&mut dirty)?;
/// # Ok(()) }
/// ```
pub struct DirtyTracker {
    uffd: Uffd,
    pagemap: File,
    range: Range,
    vec: Vec<sys::page_region>,
}

impl DirtyTracker {
    /// Create an async-WP userfaultfd, register `range` and write-protect all of it.
    pub fn new(range: Range) -> Result<Self, DirtyError> {
        let uffd = UffdBuilder::new()
            .require_features(Features::WP_ASYNC | Features::WP_UNPOPULATED)
            .create()
            .map_err(DirtyError::Create)?;
        Self::with_uffd(uffd, range)
    }

    /// Track `range` with an existing userfaultfd created with [`Features::WP_ASYNC`].
    pub fn with_uffd(uffd: Uffd, range: Range) -> Result<Self, DirtyError> {
        if !uffd.features().contains(Features::WP_ASYNC) {
            return Err(DirtyError::NotAsync);
        }
        uffd.register(range, RegisterMode::WP)
            .map_err(DirtyError::Register)?;
        uffd.write_protect(range, true, false)
            .map_err(DirtyError::Protect)?;
        let pagemap = File::open("/proc/self/pagemap").map_err(DirtyError::Pagemap)?;
        Ok(Self {
            uffd,
            pagemap,
            range,
            vec: Vec::new(),
        })
    }

    /// The tracked range.
    pub fn range(&self) -> Range {
        self.range
    }

    /// The userfaultfd behind the tracker.
    pub fn uffd(&self) -> &Uffd {
        &self.uffd
    }

    /// Append to `out` the runs of pages written since the last call (or since creation), and
    /// write-protect them again, in one `PAGEMAP_SCAN` pass. Returns the number of pages.
    pub fn collect(&mut self, out: &mut Vec<Range>) -> Result<usize, DirtyError> {
        if self.vec.is_empty() {
            self.vec = vec![
                sys::page_region {
                    start: 0,
                    end: 0,
                    categories: 0,
                };
                512
            ];
        }
        let mut pages = 0;
        let mut start = self.range.start() as u64;
        let end = self.range.end() as u64;
        while start < end {
            let mut arg = sys::pm_scan_arg {
                size: std::mem::size_of::<sys::pm_scan_arg>() as u64,
                flags: sys::PM_SCAN_WP_MATCHING | sys::PM_SCAN_CHECK_WPASYNC,
                start,
                end,
                walk_end: 0,
                vec: self.vec.as_mut_ptr() as u64,
                vec_len: self.vec.len() as u64,
                max_pages: 0,
                category_inverted: 0,
                category_mask: sys::PAGE_IS_WRITTEN,
                category_anyof_mask: 0,
                return_mask: sys::PAGE_IS_WRITTEN,
            };
            let n =
                ioctl(self.pagemap.as_raw_fd(), sys::PAGEMAP_SCAN, &mut arg).map_err(|source| {
                    DirtyError::Scan {
                        range: self.range,
                        source,
                    }
                })? as usize;
            for r in &self.vec[..n.min(self.vec.len())] {
                if let Ok(run) = Range::new(r.start as usize, (r.end - r.start) as usize) {
                    pages += run.pages();
                    out.push(run);
                }
            }
            if arg.walk_end <= start {
                break;
            }
            start = arg.walk_end;
        }
        Ok(pages)
    }

    /// Like [`collect`](Self::collect) but into a bitmap of one bool per page of the range.
    pub fn collect_bitmap(&mut self, bitmap: &mut [bool]) -> Result<usize, DirtyError> {
        let mut runs = Vec::new();
        let pages = self.collect(&mut runs)?;
        let base = self.range.start();
        for r in runs {
            let first = (r.start() - base) / page_size();
            for b in bitmap.iter_mut().skip(first).take(r.pages()) {
                *b = true;
            }
        }
        Ok(pages)
    }
}
