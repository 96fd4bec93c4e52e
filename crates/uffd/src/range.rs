//! Typed, page-aligned address ranges.

use std::fmt;
use std::sync::OnceLock;

use thiserror::Error;

/// The base page size of this host (`sysconf(_SC_PAGESIZE)`), read once.
pub fn page_size() -> usize {
    static PAGE: OnceLock<usize> = OnceLock::new();
    *PAGE.get_or_init(|| {
        // SAFETY: sysconf has no memory-safety preconditions.
        let v = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
        if v > 0 { v as usize } else { 4096 }
    })
}

/// Why a [`Range`] could not be built.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum RangeError {
    /// The start address is not a multiple of the page size.
    #[error("range start {start:#x} is not aligned to the {page}-byte page size")]
    UnalignedStart {
        /// The start address given.
        start: usize,
        /// The page size it must be a multiple of.
        page: usize,
    },
    /// The length is not a multiple of the page size.
    #[error("range length {len:#x} is not a multiple of the {page}-byte page size")]
    UnalignedLen {
        /// The length given.
        len: usize,
        /// The page size it must be a multiple of.
        page: usize,
    },
    /// The length is zero (the kernel treats a zero-length wake as "wake everything").
    #[error("range at {start:#x} is empty")]
    Empty {
        /// The start address given.
        start: usize,
    },
    /// `start + len` overflows the address space.
    #[error("range {start:#x} + {len:#x} overflows the address space")]
    Overflow {
        /// The start address given.
        start: usize,
        /// The length given.
        len: usize,
    },
}

/// A non-empty range of virtual addresses, aligned to the base page size at both ends.
///
/// Built only through checked constructors, so every ioctl that takes a `Range` receives a
/// page-aligned, non-empty, non-overflowing range.
///
/// ```
/// use uffd::{page_size, Range};
/// let p = page_size();
/// let r = Range::new(16 * p, 4 * p).unwrap();
/// assert_eq!(r.pages(), 4);
/// assert!(Range::new(16 * p + 1, p).is_err());
/// assert!(Range::new(16 * p, 0).is_err());
/// ```
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Range {
    start: usize,
    len: usize,
}

impl Range {
    /// A range of `len` bytes at `start`; both must be page-aligned and `len` non-zero.
    pub fn new(start: usize, len: usize) -> Result<Self, RangeError> {
        let page = page_size();
        if start % page != 0 {
            return Err(RangeError::UnalignedStart { start, page });
        }
        if len == 0 {
            return Err(RangeError::Empty { start });
        }
        if len % page != 0 {
            return Err(RangeError::UnalignedLen { len, page });
        }
        if start.checked_add(len).is_none() {
            return Err(RangeError::Overflow { start, len });
        }
        Ok(Self { start, len })
    }

    /// `pages` base pages starting at `start`.
    pub fn from_pages(start: usize, pages: usize) -> Result<Self, RangeError> {
        let len = pages.checked_mul(page_size()).ok_or(RangeError::Overflow {
            start,
            len: usize::MAX,
        })?;
        Self::new(start, len)
    }

    /// The single page that contains `addr`.
    pub fn page_of(addr: usize) -> Self {
        let page = page_size();
        let start = addr & !(page - 1);
        // A page-aligned start below usize::MAX - page + 1 cannot overflow.
        Self {
            start,
            len: page.min(usize::MAX - start),
        }
    }

    /// The range covering the bytes of `mem` (which must be page-aligned, e.g. from `mmap`).
    pub fn of_slice(mem: &[u8]) -> Result<Self, RangeError> {
        Self::new(mem.as_ptr() as usize, mem.len())
    }

    /// First address.
    pub const fn start(&self) -> usize {
        self.start
    }

    /// Length in bytes.
    pub const fn len(&self) -> usize {
        self.len
    }

    /// Always false: a `Range` is never empty. Present for API symmetry with slices.
    pub const fn is_empty(&self) -> bool {
        false
    }

    /// One past the last address.
    pub const fn end(&self) -> usize {
        self.start + self.len
    }

    /// Number of base pages.
    pub fn pages(&self) -> usize {
        self.len / page_size()
    }

    /// Whether `addr` lies inside the range.
    pub const fn contains(&self, addr: usize) -> bool {
        addr >= self.start && addr < self.start + self.len
    }

    /// Whether `other` lies entirely inside this range.
    pub const fn contains_range(&self, other: &Range) -> bool {
        other.start >= self.start && other.end() <= self.end()
    }

    /// The sub-range `[self.start + offset, + len)`, if it lies inside `self` and is aligned.
    pub fn subrange(&self, offset: usize, len: usize) -> Result<Self, RangeError> {
        let r = Self::new(self.start.wrapping_add(offset), len)?;
        if offset > self.len || !self.contains_range(&r) {
            return Err(RangeError::Overflow {
                start: r.start,
                len,
            });
        }
        Ok(r)
    }

    /// Split into `n` contiguous, page-aligned parts of near-equal size (at most `pages()`).
    pub fn split(&self, n: usize) -> Vec<Range> {
        let pages = self.pages();
        let n = n.clamp(1, pages);
        let page = page_size();
        let mut out = Vec::with_capacity(n);
        let mut start = self.start;
        for i in 0..n {
            let count = pages / n + usize::from(i < pages % n);
            out.push(Range {
                start,
                len: count * page,
            });
            start += count * page;
        }
        out
    }

    pub(crate) fn as_raw(&self) -> crate::sys::uffdio_range {
        crate::sys::uffdio_range {
            start: self.start as u64,
            len: self.len as u64,
        }
    }
}

impl fmt::Debug for Range {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:#x}..{:#x}", self.start, self.end())
    }
}

impl fmt::Display for Range {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "[{:#x}, {:#x})", self.start, self.end())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checked_construction() {
        let p = page_size();
        assert!(matches!(
            Range::new(1, p),
            Err(RangeError::UnalignedStart { .. })
        ));
        assert!(matches!(
            Range::new(p, 1),
            Err(RangeError::UnalignedLen { .. })
        ));
        assert!(matches!(Range::new(p, 0), Err(RangeError::Empty { .. })));
        let top = usize::MAX - p + 1;
        assert!(matches!(
            Range::new(top, 2 * p),
            Err(RangeError::Overflow { .. })
        ));
        let r = Range::new(p, 3 * p).unwrap();
        assert_eq!(
            (r.start(), r.len(), r.end(), r.pages()),
            (p, 3 * p, 4 * p, 3)
        );
        assert!(r.contains(p) && !r.contains(4 * p));
        assert_eq!(Range::page_of(p + 17), Range::new(p, p).unwrap());
    }

    #[test]
    fn subrange_and_split() {
        let p = page_size();
        let r = Range::new(8 * p, 10 * p).unwrap();
        assert_eq!(
            r.subrange(2 * p, 3 * p).unwrap(),
            Range::new(10 * p, 3 * p).unwrap()
        );
        assert!(r.subrange(8 * p, 3 * p).is_err());
        assert!(r.subrange(usize::MAX - p + 1, p).is_err());
        let parts = r.split(3);
        assert_eq!(parts.len(), 3);
        assert_eq!(
            parts.iter().map(Range::pages).collect::<Vec<_>>(),
            vec![4, 3, 3]
        );
        assert_eq!(parts[0].start(), r.start());
        assert_eq!(parts[2].end(), r.end());
        assert_eq!(r.split(100).len(), 10);
    }
}
