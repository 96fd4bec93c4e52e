//! DMA translation: the client's memory as the device sees it.
//!
//! A mapping that came with an fd is `mmap`ed here and accessed directly; one without an fd
//! is reached through `DMA_READ` / `DMA_WRITE` messages to the client that mapped it. Every
//! access is checked against the mappings and their permissions before a byte moves, and may
//! span several mappings (scatter-gather). The table is behind a read-write lock: any number
//! of device threads copy at once, and an unmap waits for them before the memory goes away.

use std::collections::BTreeMap;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::Weak;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::proto::{DMA_READ, DMA_WRITE};

use super::session::Session;
use super::sigbus;

/// A DMA access the device may not make.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum DmaError {
    /// Part of the range is not mapped.
    #[error("DMA to {address:#x}+{len:#x}: {hole:#x} is not mapped by the client")]
    Unmapped {
        /// Start.
        address: u64,
        /// Length.
        len: u64,
        /// First unmapped address.
        hole: u64,
    },
    /// The mapping does not allow this direction.
    #[error("DMA {dir} at {address:#x}: the mapping is not {dir}able")]
    Permission {
        /// "read" or "write".
        dir: &'static str,
        /// Address.
        address: u64,
    },
    /// Bus mastering is off in the command register, or the device is stopped for migration.
    #[error("DMA refused: {0}")]
    Disabled(&'static str),
    /// A message-based transfer failed.
    #[error("DMA through the client's socket failed: {0}")]
    Message(String),
    /// The client shrank the file behind this mapping: its pages are gone (the access hit
    /// SIGBUS, which the server survived; the mapping is unusable until mapped again).
    #[error("DMA at {address:#x}: the client truncated the file behind the mapping")]
    Truncated {
        /// Address of the access.
        address: u64,
    },
}

/// One mapping.
pub(crate) struct Mapping {
    pub(crate) size: u64,
    pub(crate) flags: u32,
    /// Host address of the mapping when an fd came with it.
    host: Option<(usize, OwnedFd)>,
    /// For an fd not sealed against shrinking: the SIGBUS guard of the host range (dropped
    /// after the munmap in `drop`).
    guard: Option<sigbus::Guard>,
    /// The session that mapped it (message-based DMA goes there; it unmaps on disconnect).
    pub(crate) owner: u64,
    pub(crate) session: Weak<Session>,
    /// Dirty pages (one bit a page of the logging page size, counted from the page that
    /// holds the mapping's first byte) while DMA logging is on; empty otherwise.
    dirty: Vec<AtomicU64>,
}

impl Mapping {
    /// 64-bit words of the bitmap of `start..start+size` (`size` > 0, no wrap) in `page`s.
    fn bitmap_words(start: u64, size: u64, page: u64) -> u64 {
        let pages = (start + (size - 1)) / page - start / page + 1;
        pages.div_ceil(64)
    }

    /// A zeroed bitmap of `words` words, or the allocator's refusal (never an abort).
    fn bitmap(words: u64) -> Result<Vec<AtomicU64>, LogError> {
        let bytes = words.saturating_mul(8);
        let mut v = Vec::new();
        v.try_reserve_exact(usize::try_from(words).unwrap_or(usize::MAX))
            .map_err(|source| LogError::Alloc { bytes, source })?;
        v.extend((0..words).map(|_| AtomicU64::new(0)));
        Ok(v)
    }

    fn mark(&self, start: u64, page: u64, at: u64, len: u64) {
        if self.dirty.is_empty() || len == 0 {
            return;
        }
        let first = at / page - start / page;
        let last = (at + len - 1) / page - start / page;
        for p in first..=last {
            if let Some(w) = self.dirty.get((p / 64) as usize) {
                w.fetch_or(1 << (p % 64), Ordering::Relaxed);
            }
        }
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        if let Some((addr, _)) = self.host {
            // SAFETY: `addr` is a mapping of `size` bytes made in `DmaTable::map`; the table's
            // write lock is held by whoever drops it, so no copy is using it.
            unsafe { libc::munmap(addr as *mut libc::c_void, self.size as usize) };
        }
    }
}

/// The device's DMA mappings.
#[derive(Default)]
pub(crate) struct DmaTable {
    maps: BTreeMap<u64, Mapping>,
    /// Bytes mapped in all.
    total: u64,
    /// DMA dirty-page logging: the page size, while on.
    log_page: Option<u64>,
    /// 64-bit words of all the mappings' dirty bitmaps, while logging.
    log_words: u64,
}

/// A failure to map.
#[derive(Debug, thiserror::Error)]
pub enum MapError {
    /// Overlaps an existing mapping.
    #[error("{address:#x}+{size:#x} overlaps an existing mapping")]
    Overlap {
        /// Start.
        address: u64,
        /// Size.
        size: u64,
    },
    /// Too many mappings.
    #[error("more than {0} DMA mappings")]
    TooMany(usize),
    /// mmap of the client's fd failed.
    #[error("mmap of the client's fd at offset {offset:#x}, {size:#x} bytes")]
    Mmap {
        /// Offset.
        offset: u64,
        /// Size.
        size: u64,
        /// errno.
        #[source]
        source: std::io::Error,
    },
    /// The client's file ends before `offset + size`: touching the rest would raise SIGBUS
    /// in the server process.
    #[error("{size:#x} bytes at offset {offset:#x} of a {file_size:#x}-byte file")]
    PastEnd {
        /// Offset.
        offset: u64,
        /// Size.
        size: u64,
        /// Size of the client's file.
        file_size: u64,
    },
    /// The mapping would take the client's mapped total past the server's limit.
    #[error("{size:#x} more bytes would map {total:#x} in all, past the limit of {limit:#x}")]
    TotalTooLarge {
        /// Size asked.
        size: u64,
        /// Mapped total with it.
        total: u128,
        /// The limit (256 TiB).
        limit: u64,
    },
    /// The fd is not sealed against shrinking and its mapping could not be guarded.
    #[error("guarding the mapping of an fd not sealed against shrinking")]
    Guard(#[source] sigbus::GuardError),
    /// Dirty-page logging is on and this mapping's bitmap would not fit the budget.
    #[error("logging this mapping")]
    Log(#[source] LogError),
    /// Nothing mapped exactly there.
    #[error("no mapping is exactly {address:#x}+{size:#x}")]
    NotMapped {
        /// Start.
        address: u64,
        /// Size.
        size: u64,
    },
}

impl MapError {
    /// errno for the error reply.
    pub fn errno(&self) -> i32 {
        match self {
            MapError::Overlap { .. } => libc::EEXIST,
            MapError::TooMany(_) => libc::ENOSPC,
            MapError::Mmap { source, .. } => source.raw_os_error().unwrap_or(libc::EINVAL),
            MapError::PastEnd { .. } => libc::EINVAL,
            MapError::TotalTooLarge { .. } => libc::ENOSPC,
            MapError::Log(e) => e.errno(),
            MapError::Guard(e) => e.errno(),
            MapError::NotMapped { .. } => libc::ENOENT,
        }
    }
}

/// A dirty-page logging request the server refuses.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    /// Logging is not started.
    #[error("DMA logging is not started")]
    NotStarted,
    /// A report asked with another page size than logging uses.
    #[error("report page size {asked}, logging with {logging}")]
    PageSize {
        /// Page size of the report.
        asked: u64,
        /// Page size of the logging.
        logging: u64,
    },
    /// A report range that is empty, unaligned or wraps.
    #[error("report range {iova:#x}+{len:#x}")]
    Range {
        /// Start.
        iova: u64,
        /// Length.
        len: u64,
    },
    /// The report's bitmap is larger than the advertised `max_bitmap_size`.
    #[error("a report of {pages} pages needs a {bytes}-byte bitmap, past max_bitmap_size {limit}")]
    ReportTooLarge {
        /// Pages asked.
        pages: u64,
        /// Bitmap bytes they need.
        bytes: u64,
        /// The advertised limit.
        limit: u64,
    },
    /// The bitmaps of all mappings would take more memory than the server allows.
    #[error("dirty bitmaps of {bytes} bytes for the mapped memory, past the limit of {limit}")]
    BitmapsTooLarge {
        /// Bytes needed (saturated).
        bytes: u64,
        /// The limit (64 MiB).
        limit: u64,
    },
    /// Allocating the bitmaps failed.
    #[error("allocating {bytes} bytes of dirty bitmaps")]
    Alloc {
        /// Bytes asked.
        bytes: u64,
        /// The allocator's refusal.
        #[source]
        source: std::collections::TryReserveError,
    },
}

impl LogError {
    /// errno for the error reply.
    pub fn errno(&self) -> i32 {
        match self {
            LogError::NotStarted | LogError::PageSize { .. } | LogError::Range { .. } => {
                libc::EINVAL
            }
            LogError::ReportTooLarge { .. } => libc::E2BIG,
            LogError::BitmapsTooLarge { .. } | LogError::Alloc { .. } => libc::ENOMEM,
        }
    }
}

/// One piece of a scatter-gather list.
pub(crate) enum Piece<'a> {
    /// Directly mapped: host address, and the mapping's SIGBUS guard if it has one.
    Host(usize, Option<&'a sigbus::Guard>),
    /// Through messages to this session.
    Message(&'a Weak<Session>),
}

impl DmaTable {
    /// Most mappings (advertised as `max_dma_maps`).
    pub(crate) const MAX_MAPS: usize = 4096;
    /// Most bytes mapped in all (256 TiB: the 48-bit address space of x86-64 and arm64).
    pub(crate) const MAX_TOTAL: u64 = 1 << 48;
    /// Most memory for the dirty bitmaps of all mappings while logging (64 MiB: 2 TiB of
    /// mappings in 4 KiB pages).
    pub(crate) const MAX_LOG_BITMAPS: u64 = 64 << 20;
    /// Most bytes of one report's bitmap (advertised as `max_bitmap_size`).
    pub(crate) const MAX_BITMAP_SIZE: u64 = 256 << 10;

    pub(crate) fn regions(&self) -> Vec<(u64, u64)> {
        self.maps.iter().map(|(&a, m)| (a, m.size)).collect()
    }

    pub(crate) fn map(
        &mut self,
        address: u64,
        size: u64,
        flags: u32,
        fd: Option<(OwnedFd, u64)>,
        owner: u64,
        session: Weak<Session>,
    ) -> Result<(), MapError> {
        let total = u128::from(self.total) + u128::from(size);
        let Some(end) = address
            .checked_add(size)
            .filter(|_| size != 0 && total <= u128::from(Self::MAX_TOTAL))
        else {
            return Err(MapError::TotalTooLarge {
                size,
                total,
                limit: Self::MAX_TOTAL,
            });
        };
        let overlaps = self
            .maps
            .range(..end)
            .next_back()
            .is_some_and(|(&a, m)| a + m.size > address);
        if overlaps {
            return Err(MapError::Overlap { address, size });
        }
        if self.maps.len() >= Self::MAX_MAPS {
            return Err(MapError::TooMany(Self::MAX_MAPS));
        }
        // The bitmap first (it may be refused), the mmap after.
        let dirty = match self.log_page {
            Some(page) => {
                let words = Mapping::bitmap_words(address, size, page);
                self.log_budget(self.log_words.saturating_add(words))
                    .map_err(MapError::Log)?;
                Mapping::bitmap(words).map_err(MapError::Log)?
            }
            None => Vec::new(),
        };
        let (host, guard) = match fd {
            Some((fd, offset)) => {
                // A regular file (a memfd, a hugetlbfs or tmpfs file) maps past its end, but
                // the first touch there kills this process with SIGBUS: refuse it up front.
                // SAFETY: an all-zero `stat` is a valid value for fstat to fill.
                let mut st: libc::stat = unsafe { std::mem::zeroed() };
                // SAFETY: fstat of a descriptor we own into a local struct.
                if unsafe { libc::fstat(fd.as_raw_fd(), &mut st) } == 0
                    && st.st_mode & libc::S_IFMT == libc::S_IFREG
                    && offset
                        .checked_add(size)
                        .is_none_or(|e| e > st.st_size as u64)
                {
                    return Err(MapError::PastEnd {
                        offset,
                        size,
                        file_size: st.st_size as u64,
                    });
                }
                let mut prot = 0;
                if flags & DMA_READ != 0 {
                    prot |= libc::PROT_READ;
                }
                if flags & DMA_WRITE != 0 {
                    prot |= libc::PROT_WRITE;
                }
                // SAFETY: a new shared mapping of the client's fd; the kernel checks the fd,
                // offset and size, and the result is only used within `size` bytes.
                let p = unsafe {
                    libc::mmap(
                        std::ptr::null_mut(),
                        size as usize,
                        prot.max(libc::PROT_READ),
                        libc::MAP_SHARED,
                        fd.as_raw_fd(),
                        offset as libc::off_t,
                    )
                };
                if p == libc::MAP_FAILED {
                    return Err(MapError::Mmap {
                        offset,
                        size,
                        source: std::io::Error::last_os_error(),
                    });
                }
                // A file that can shrink may lose pages under us: guard the range so that a
                // SIGBUS there is survived (see `sigbus`).
                if sigbus::sealed_against_shrinking(fd.as_raw_fd()) {
                    (Some((p as usize, fd)), None)
                } else {
                    match sigbus::guard(p as usize, size as usize) {
                        Ok(g) => (Some((p as usize, fd)), Some(g)),
                        Err(e) => {
                            // SAFETY: the mapping just made, used by nobody yet.
                            unsafe { libc::munmap(p, size as usize) };
                            return Err(MapError::Guard(e));
                        }
                    }
                }
            }
            None => (None, None),
        };
        self.total += size;
        self.log_words += dirty.len() as u64;
        self.maps.insert(
            address,
            Mapping {
                size,
                flags,
                host,
                guard,
                owner,
                session,
                dirty,
            },
        );
        Ok(())
    }

    /// Remove what `owner` mapped exactly at `address..address+size`.
    pub(crate) fn unmap(&mut self, address: u64, size: u64, owner: u64) -> Result<(), MapError> {
        match self.maps.get(&address) {
            Some(m) if m.size == size && m.owner == owner => {
                self.remove(address);
                Ok(())
            }
            _ => Err(MapError::NotMapped { address, size }),
        }
    }

    fn remove(&mut self, address: u64) -> Option<u64> {
        let m = self.maps.remove(&address)?;
        self.total -= m.size;
        self.log_words -= m.dirty.len() as u64;
        Some(m.size)
    }

    pub(crate) fn unmap_all(&mut self, owner: Option<u64>) -> Vec<(u64, u64)> {
        let gone: Vec<u64> = self
            .maps
            .iter()
            .filter(|(_, m)| owner.is_none_or(|o| m.owner == o))
            .map(|(&a, _)| a)
            .collect();
        gone.into_iter()
            .filter_map(|a| Some((a, self.remove(a)?)))
            .collect()
    }

    fn log_budget(&self, words: u64) -> Result<(), LogError> {
        let bytes = words.saturating_mul(8);
        if bytes > Self::MAX_LOG_BITMAPS {
            return Err(LogError::BitmapsTooLarge {
                bytes,
                limit: Self::MAX_LOG_BITMAPS,
            });
        }
        Ok(())
    }

    /// Start dirty-page logging with pages of `page` bytes (a power of two); restarting
    /// clears what was logged. The bitmaps of all mappings are checked against
    /// [`MAX_LOG_BITMAPS`](DmaTable::MAX_LOG_BITMAPS) and allocated before logging changes;
    /// a refusal leaves the table as it was.
    pub(crate) fn log_start(&mut self, page: u64) -> Result<(), LogError> {
        let words = self
            .maps
            .iter()
            .map(|(&a, m)| Mapping::bitmap_words(a, m.size, page))
            .fold(0u64, u64::saturating_add);
        self.log_budget(words)?;
        let mut fresh = Vec::with_capacity(self.maps.len());
        for (&a, m) in &self.maps {
            fresh.push(Mapping::bitmap(Mapping::bitmap_words(a, m.size, page))?);
        }
        for (m, d) in self.maps.values_mut().zip(fresh) {
            m.dirty = d;
        }
        self.log_page = Some(page);
        self.log_words = words;
        Ok(())
    }

    /// Stop logging and drop the bitmaps.
    pub(crate) fn log_stop(&mut self) {
        self.log_page = None;
        self.log_words = 0;
        for m in self.maps.values_mut() {
            m.dirty = Vec::new();
        }
    }

    /// The logging page size, if logging.
    pub(crate) fn log_page(&self) -> Option<u64> {
        self.log_page
    }

    /// Mark `address..address+len` dirty (written by the device some other way than
    /// through [`translate`](DmaTable::translate)). Unmapped parts are ignored.
    pub(crate) fn mark_dirty(&self, address: u64, len: u64) {
        let Some(page) = self.log_page else { return };
        let end = address.saturating_add(len);
        for (&a, m) in self.maps.range(..end) {
            let (lo, hi) = (a.max(address), (a + m.size).min(end));
            if lo < hi {
                m.mark(a, page, lo, hi - lo);
            }
        }
    }

    /// The dirty bitmap of `iova..iova+len` in `page`-byte pages (the logging page size),
    /// one bit a page, in 64-bit words; reported pages are cleared. Pages of no mapping read
    /// as clean.
    /// At most [`MAX_BITMAP_SIZE`](DmaTable::MAX_BITMAP_SIZE) bytes of bitmap.
    pub(crate) fn log_report(&self, iova: u64, len: u64, page: u64) -> Result<Vec<u8>, LogError> {
        let Some(lp) = self.log_page else {
            return Err(LogError::NotStarted);
        };
        if page != lp {
            return Err(LogError::PageSize {
                asked: page,
                logging: lp,
            });
        }
        if len == 0 || iova % page != 0 || iova.checked_add(len).is_none() {
            return Err(LogError::Range { iova, len });
        }
        let pages = len.div_ceil(page);
        let bytes = pages.div_ceil(64) * 8;
        if bytes > Self::MAX_BITMAP_SIZE {
            return Err(LogError::ReportTooLarge {
                pages,
                bytes,
                limit: Self::MAX_BITMAP_SIZE,
            });
        }
        let mut words = vec![0u64; pages.div_ceil(64) as usize];
        let end = iova + len;
        for (&a, m) in self.maps.range(..end) {
            if a + m.size <= iova || m.dirty.is_empty() {
                continue;
            }
            let lo = a.max(iova);
            let hi = (a + m.size).min(end);
            // Pages first..=last of the mapping's bitmap (counted from the page holding its
            // first byte); page p is page p + a/page - iova/page of the report. A word at a
            // time (one atomic swap of the bits in range), then only the bits that were set:
            // a report costs the bitmap's words, not one atomic per page.
            let (first, last) = (lo / page - a / page, (hi - 1) / page - a / page);
            let base = a / page;
            let from = iova / page;
            for wi in first / 64..=last / 64 {
                let lo_bit = if wi == first / 64 { first % 64 } else { 0 };
                let hi_bit = if wi == last / 64 { last % 64 } else { 63 };
                let mask = (u64::MAX >> (63 - hi_bit)) & (u64::MAX << lo_bit);
                let Some(w) = m.dirty.get(wi as usize) else {
                    break;
                };
                let mut v = w.fetch_and(!mask, Ordering::Relaxed) & mask;
                while v != 0 {
                    let p = wi * 64 + u64::from(v.trailing_zeros());
                    let out = p + base - from;
                    words[(out / 64) as usize] |= 1 << (out % 64);
                    v &= v - 1;
                }
            }
        }
        Ok(words.iter().flat_map(|w| w.to_ne_bytes()).collect())
    }

    /// The sessions serving `address..address+len` (checked for `need`), for DMA through
    /// messages even where the memory is mapped: (session, address, length) pieces.
    pub(crate) fn by_message(
        &self,
        address: u64,
        len: u64,
        need: u32,
    ) -> Result<Vec<(Weak<Session>, u64, u64)>, DmaError> {
        let pieces = self.translate_inner(address, len, need, false)?;
        Ok(pieces
            .into_iter()
            .map(|(start, at, n)| (self.maps[&start].session.clone(), at, n))
            .collect())
    }

    /// Split `address..address+len` into pieces, checking every byte is mapped with `need`.
    pub(crate) fn translate(
        &self,
        address: u64,
        len: u64,
        need: u32,
    ) -> Result<Vec<(Piece<'_>, u64, u64)>, DmaError> {
        let pieces = self.translate_inner(address, len, need, true)?;
        Ok(pieces
            .into_iter()
            .map(|(start, at, n)| {
                let m = &self.maps[&start];
                let piece = match &m.host {
                    Some((host, _)) => Piece::Host(host + (at - start) as usize, m.guard.as_ref()),
                    None => Piece::Message(&m.session),
                };
                (piece, at, n)
            })
            .collect())
    }

    /// The checked pieces as (mapping start, address, length); host-mapped writes are
    /// logged dirty when `log` (message-based writes are the client's to log).
    fn translate_inner(
        &self,
        address: u64,
        len: u64,
        need: u32,
        log: bool,
    ) -> Result<Vec<(u64, u64, u64)>, DmaError> {
        let end = address.checked_add(len).ok_or(DmaError::Unmapped {
            address,
            len,
            hole: u64::MAX,
        })?;
        let mut out = Vec::new();
        let mut at = address;
        while at < end {
            let (start, m) = self
                .maps
                .range(..=at)
                .next_back()
                .filter(|(a, m)| **a + m.size > at)
                .ok_or(DmaError::Unmapped {
                    address,
                    len,
                    hole: at,
                })?;
            if m.guard.as_ref().is_some_and(sigbus::Guard::truncated) {
                return Err(DmaError::Truncated { address: at });
            }
            if m.flags & need != need {
                return Err(DmaError::Permission {
                    dir: if need == DMA_WRITE { "writ" } else { "read" },
                    address: at,
                });
            }
            let n = (start + m.size).min(end) - at;
            out.push((*start, at, n));
            at += n;
        }
        if log
            && need & DMA_WRITE != 0
            && let Some(page) = self.log_page
        {
            for &(start, at, n) in &out {
                let m = &self.maps[&start];
                if m.host.is_some() {
                    m.mark(start, page, at, n);
                }
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::FromRawFd;

    fn memfd(size: u64) -> OwnedFd {
        // SAFETY: memfd_create with a valid NUL-terminated name.
        let fd = unsafe { libc::memfd_create(c"dma-test".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0);
        // SAFETY: fd is a new descriptor we own.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: ftruncate on our own memfd.
        assert_eq!(unsafe { libc::ftruncate(fd.as_raw_fd(), size as i64) }, 0);
        fd
    }

    #[test]
    fn log_reports_match_a_page_by_page_model_and_clear_what_they_report() {
        // Two mappings (one not at a multiple of 64 pages), random marks, reports over
        // ranges that start and end anywhere: each report holds exactly the marked pages
        // of its range not reported before, placed relative to the range's start.
        let page = 4096u64;
        let maps = [(0x5000u64, 200 * page), (0x5000 + 300 * page, 130 * page)];
        let mut t = DmaTable::default();
        for &(a, size) in &maps {
            t.map(
                a,
                size,
                DMA_READ | DMA_WRITE,
                Some((memfd(size), 0)),
                1,
                Weak::new(),
            )
            .unwrap();
        }
        t.log_start(page).unwrap();
        let mut model = std::collections::BTreeSet::new();
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = |n: u64| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x % n
        };
        let span = maps[1].0 + maps[1].1 + 8 * page;
        for _ in 0..200 {
            for _ in 0..next(20) {
                let at = next(span);
                let len = 1 + next(3 * page);
                t.mark_dirty(at, len);
                for &(a, size) in &maps {
                    let (lo, hi) = (at.max(a), (at + len).min(a + size));
                    if lo < hi {
                        model.extend(lo / page..=(hi - 1) / page);
                    }
                }
            }
            let iova = next(span / page) * page;
            let len = 1 + next(span - iova);
            let got = t.log_report(iova, len, page).unwrap();
            let pages = len.div_ceil(page);
            let mut want = vec![0u8; (pages.div_ceil(64) * 8) as usize];
            let in_range: Vec<u64> = model
                .range(iova / page..iova / page + pages)
                .copied()
                .collect();
            for p in in_range {
                model.remove(&p);
                let o = p - iova / page;
                want[(o / 8) as usize] |= 1 << (o % 8);
            }
            assert_eq!(got, want, "report of {iova:#x}+{len:#x}");
        }
    }

    #[test]
    fn translate_checks_holes_permissions_and_spans() {
        let mut t = DmaTable::default();
        t.map(
            0x1000,
            0x1000,
            DMA_READ | DMA_WRITE,
            Some((memfd(0x1000), 0)),
            1,
            Weak::new(),
        )
        .unwrap();
        t.map(
            0x2000,
            0x1000,
            DMA_READ,
            Some((memfd(0x1000), 0)),
            1,
            Weak::new(),
        )
        .unwrap();
        assert_eq!(t.translate(0x1800, 0x1000, DMA_READ).unwrap().len(), 2);
        assert!(matches!(
            t.translate(0x1800, 0x1000, DMA_WRITE),
            Err(DmaError::Permission { .. })
        ));
        assert_eq!(
            t.translate(0x2800, 0x1000, DMA_READ).err(),
            Some(DmaError::Unmapped {
                address: 0x2800,
                len: 0x1000,
                hole: 0x3000
            })
        );
        assert!(t.translate(u64::MAX, 2, DMA_READ).is_err());
        assert!(matches!(
            t.map(0x1fff, 2, DMA_READ, None, 1, Weak::new()),
            Err(MapError::Overlap { .. })
        ));
        assert!(t.unmap(0x1000, 0x800, 1).is_err());
        assert!(
            t.unmap(0x1000, 0x1000, 2).is_err(),
            "another owner's mapping"
        );
        t.unmap(0x1000, 0x1000, 1).unwrap();
        assert_eq!(t.unmap_all(Some(2)), vec![]);
        assert_eq!(t.unmap_all(Some(1)), vec![(0x2000, 0x1000)]);
    }
}
