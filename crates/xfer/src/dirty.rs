//! Which pages were written: [`DirtyLog`], fetched and cleared once per pre-copy round. A VM
//! implements it over KVM's dirty log; [`WriteProtectLog`] tracks memory of this process with
//! userfaultfd asynchronous write protection; [`RecordingLog`] is a test double that records
//! the writes it is told of.

use std::sync::Arc;

use thiserror::Error;

use crate::bitmap::{Bits, words_for};

/// Fetching the dirty log failed.
#[derive(Debug, Error)]
pub enum DirtyLogError {
    /// userfaultfd write-protect tracking failed.
    #[error("write-protect tracking")]
    WriteProtect(#[source] uffd::DirtyError),
    /// The implementation's own failure (a KVM ioctl, ...), errno kept in the cause.
    #[error("{what}")]
    Other {
        /// What failed.
        what: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
}

/// A log of written pages.
pub trait DirtyLog: Send {
    /// The bitmap (a bit per page from page 0, [`words_for`] words) of pages written since the
    /// previous call (or since the log started), clearing it.
    fn fetch_and_clear(&mut self) -> Result<Vec<u64>, DirtyLogError>;
}

/// Dirty pages of a range of this process, with userfaultfd asynchronous write protection and
/// `PAGEMAP_SCAN` (Linux 6.7): no fault handler runs.
pub struct WriteProtectLog {
    tracker: uffd::DirtyTracker,
    pages: u64,
}

impl WriteProtectLog {
    /// Start tracking `range` (every page starts clean).
    pub fn new(range: uffd::Range) -> Result<WriteProtectLog, DirtyLogError> {
        let tracker = uffd::DirtyTracker::new(range).map_err(DirtyLogError::WriteProtect)?;
        Ok(WriteProtectLog {
            tracker,
            pages: range.pages() as u64,
        })
    }
}

impl DirtyLog for WriteProtectLog {
    fn fetch_and_clear(&mut self) -> Result<Vec<u64>, DirtyLogError> {
        let mut b = vec![false; self.pages as usize];
        self.tracker
            .collect_bitmap(&mut b)
            .map_err(DirtyLogError::WriteProtect)?;
        let mut w = vec![0u64; words_for(self.pages)];
        for (p, _) in b.iter().enumerate().filter(|(_, d)| **d) {
            w[p / 64] |= 1 << (p % 64);
        }
        Ok(w)
    }
}

/// A test double: the writes it is told of ([`RecordingLog::record`]), from any thread.
#[derive(Debug, Clone)]
pub struct RecordingLog {
    bits: Arc<Bits>,
    pages: u64,
}

impl RecordingLog {
    /// A log over `pages` pages.
    pub fn new(pages: u64) -> RecordingLog {
        RecordingLog {
            bits: Arc::new(Bits::new(pages)),
            pages,
        }
    }

    /// Page `p` was written.
    pub fn record(&self, p: u64) {
        self.bits.set(p);
    }
}

impl DirtyLog for RecordingLog {
    fn fetch_and_clear(&mut self) -> Result<Vec<u64>, DirtyLogError> {
        let w = self.bits.words();
        for p in 0..self.pages {
            if w[(p / 64) as usize] & (1 << (p % 64)) != 0 {
                self.bits.clear(p);
            }
        }
        Ok(w)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_protect_log_sees_writes() {
        let m = memx::Mapping::anonymous(64 * 4096).unwrap();
        let mut log =
            WriteProtectLog::new(m.range()).unwrap_or_else(|e| panic!("{}", uffd::error_chain(&e)));
        assert_eq!(crate::bitmap::popcount(&log.fetch_and_clear().unwrap()), 0);
        m.write_u8(3 * 4096, 1);
        m.write_u8(40 * 4096 + 7, 1);
        let w = log.fetch_and_clear().unwrap();
        assert_eq!(w, vec![(1 << 3) | (1 << 40)]);
        assert_eq!(crate::bitmap::popcount(&log.fetch_and_clear().unwrap()), 0);
        let mut r = RecordingLog::new(100);
        r.record(99);
        assert_eq!(crate::bitmap::popcount(&r.fetch_and_clear().unwrap()), 1);
        assert_eq!(crate::bitmap::popcount(&r.fetch_and_clear().unwrap()), 0);
    }
}
