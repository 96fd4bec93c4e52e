//! The snapshot's memory file as a page source for the fault loop, and the recorded working
//! set.

use std::cell::RefCell;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};

use memx::{Completer, Fill, PageSource, Request, SourceError};

use super::{MemoryIndex, PAGE, SnapshotError, io_err};

/// Serves guest pages from a snapshot's memory file: holes as zero pages (ZEROPAGE, no copy),
/// data read with `pread`. Each 64 KiB chunk's CRC is checked the first time the chunk is
/// read; a chunk that fails is never served (the page is poisoned and the VM stops with the
/// error). Optionally records the order in which faults asked for pages (the working set).
pub struct SnapshotSource {
    file: File,
    index: Arc<MemoryIndex>,
    /// Per chunk: 0 unchecked, 1 checked good, 2 failed.
    checked: Vec<AtomicU8>,
    bytes_read: AtomicU64,
    record: Option<Mutex<Vec<u64>>>,
}

thread_local! {
    static CHUNK_BUF: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

impl SnapshotSource {
    /// A source over `file` described by `index`; `record`: keep the working set.
    pub fn new(file: File, index: Arc<MemoryIndex>, record: bool) -> Self {
        let checked = (0..index.chunks()).map(|_| AtomicU8::new(0)).collect();
        SnapshotSource {
            file,
            index,
            checked,
            bytes_read: AtomicU64::new(0),
            record: record.then(|| Mutex::new(Vec::new())),
        }
    }

    /// Bytes read from the file so far.
    pub fn bytes_read(&self) -> u64 {
        self.bytes_read.load(Relaxed)
    }

    /// The pages faulted so far, in order (empty unless recording).
    pub fn working_set(&self) -> Vec<u64> {
        self.record
            .as_ref()
            .map(|r| r.lock().unwrap_or_else(|e| e.into_inner()).clone())
            .unwrap_or_default()
    }

    /// Make sure chunk `c` was checked. When it has to be read for that, `then` gets its
    /// bytes (so the caller need not read them again) and its result is returned.
    fn check_chunk<R>(
        &self,
        c: u64,
        then: impl FnOnce(&[u8]) -> R,
    ) -> Result<Option<R>, SourceError> {
        let state = &self.checked[c as usize];
        let off = c * self.index.chunk_pages * PAGE;
        match state.load(Relaxed) {
            1 => return Ok(None),
            2 => {
                return Err(SourceError::Corrupt {
                    offset: off,
                    detail: format!("memory chunk {c} failed its CRC check earlier"),
                });
            }
            _ => {}
        }
        let len = (self.index.chunk_pages * PAGE).min(self.index.pages * PAGE - off) as usize;
        CHUNK_BUF.with(|b| {
            let mut b = b.borrow_mut();
            b.resize(len, 0);
            self.file
                .read_exact_at(&mut b[..len], off)
                .map_err(|source| SourceError::Io {
                    offset: off,
                    len,
                    source,
                })?;
            self.bytes_read.fetch_add(len as u64, Relaxed);
            let crc = crc32fast::hash(&b[..len]);
            let want = self.index.chunk_crc[c as usize];
            if crc != want {
                state.store(2, Relaxed);
                return Err(SourceError::Corrupt {
                    offset: off,
                    detail: format!(
                        "memory chunk {c} has CRC-32 {crc:#010x}, the snapshot recorded {want:#010x}"
                    ),
                });
            }
            state.store(1, Relaxed);
            Ok(Some(then(&b[..len])))
        })
    }
}

impl PageSource for SnapshotSource {
    fn fetch<'a>(
        &self,
        req: &Request,
        scratch: &'a mut [u8],
        _done: &Completer,
    ) -> Result<Fill<'a>, SourceError> {
        let page = req.offset / PAGE;
        if page >= self.index.pages {
            return Err(SourceError::OutOfRange {
                offset: req.offset,
                size: self.index.pages * PAGE,
            });
        }
        let max = (req.max_pages as u64)
            .min(self.index.pages - page)
            .min((scratch.len() as u64 / PAGE).max(1));
        let chunk = page / self.index.chunk_pages;
        let chunk_end = (chunk + 1) * self.index.chunk_pages;
        if !self.index.nonzero(page) {
            let mut n = 1;
            while n < max && !self.index.nonzero(page + n) {
                n += 1;
            }
            if let Some(r) = &self.record
                && !req.background
            {
                r.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .extend(page..page + n);
            }
            return Ok(Fill::Zero { pages: n as usize });
        }
        // Data pages up to the end of the chunk: copied from the chunk just checked, or read
        // with one pread from a chunk checked before.
        let n = max.min(chunk_end - page);
        let len = (n * PAGE) as usize;
        let skip = ((page - chunk * self.index.chunk_pages) * PAGE) as usize;
        let copied = self.check_chunk(chunk, |bytes| {
            scratch[..len].copy_from_slice(&bytes[skip..skip + len]);
        })?;
        if copied.is_none() {
            self.file
                .read_exact_at(&mut scratch[..len], req.offset)
                .map_err(|source| SourceError::Io {
                    offset: req.offset,
                    len,
                    source,
                })?;
            self.bytes_read.fetch_add(len as u64, Relaxed);
        }
        if let Some(r) = &self.record
            && !req.background
        {
            r.lock()
                .unwrap_or_else(|e| e.into_inner())
                .extend(page..page + n);
        }
        Ok(Fill::Bytes(&scratch[..len]))
    }
}

/// The pages a restored guest faulted, in order: what a `prefetch` restore pushes first.
///
/// File layout (`working-set`, version 1): magic `b"FLWSET\0\0"`, `u32` version, `u32` page
/// size, `u64` count, `count` × `u64` page numbers, then a `u32` CRC-32 of everything before it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkingSet {
    /// Page numbers (guest-physical address / 4096), first fault first.
    pub pages: Vec<u64>,
}

const WS_MAGIC: &[u8; 8] = b"FLWSET\0\0";

impl WorkingSet {
    /// Encode.
    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(24 + 8 * self.pages.len() + 4);
        v.extend_from_slice(WS_MAGIC);
        v.extend_from_slice(&super::INDEX_VERSION.to_le_bytes());
        v.extend_from_slice(&(PAGE as u32).to_le_bytes());
        v.extend_from_slice(&(self.pages.len() as u64).to_le_bytes());
        for p in &self.pages {
            v.extend_from_slice(&p.to_le_bytes());
        }
        let crc = crc32fast::hash(&v);
        v.extend_from_slice(&crc.to_le_bytes());
        v
    }

    /// Decode, checking magic, version, length and CRC; pages must lie below `pages`.
    pub fn decode(b: &[u8], pages: u64) -> Result<Self, SnapshotError> {
        let bad = |m: &str| SnapshotError::Inconsistent(format!("working set: {m}"));
        if b.len() < 28 || &b[..8] != WS_MAGIC {
            return Err(bad("bad magic or truncated"));
        }
        if u32::from_le_bytes(b[8..12].try_into().expect("4")) != super::INDEX_VERSION {
            return Err(bad("unknown version"));
        }
        let count = u64::from_le_bytes(b[16..24].try_into().expect("8"));
        if count > pages.saturating_mul(4) || b.len() as u64 != 24 + 8 * count + 4 {
            return Err(bad("length does not match its count"));
        }
        let body = &b[..b.len() - 4];
        let crc = u32::from_le_bytes(b[b.len() - 4..].try_into().expect("4"));
        if crc32fast::hash(body) != crc {
            return Err(bad("CRC mismatch"));
        }
        let list: Vec<u64> = body[24..]
            .chunks_exact(8)
            .map(|c| u64::from_le_bytes(c.try_into().expect("8")))
            .collect();
        if list.iter().any(|&p| p >= pages) {
            return Err(bad("a page lies outside guest memory"));
        }
        Ok(WorkingSet { pages: list })
    }

    /// Read `dir/working-set` if there is one.
    pub fn load(dir: &Path, pages: u64) -> Result<Option<Self>, SnapshotError> {
        let path = dir.join(super::files::WORKING_SET);
        match std::fs::read(&path) {
            Ok(b) => Self::decode(&b, pages).map(Some),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_err("reading", &path)(e)),
        }
    }

    /// Write `dir/working-set` (atomically).
    pub fn store(&self, dir: &Path) -> Result<(), SnapshotError> {
        let tmp = ".working-set.tmp";
        // A leftover of an interrupted store (never followed if it is a link).
        let _ = std::fs::remove_file(dir.join(tmp));
        super::write_file(dir, tmp, &self.encode())?;
        let path = dir.join(super::files::WORKING_SET);
        std::fs::rename(dir.join(tmp), &path).map_err(io_err("renaming into", &path))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn working_set_round_trip_and_corruption() {
        let ws = WorkingSet {
            pages: vec![5, 6, 7, 100, 1],
        };
        let b = ws.encode();
        assert_eq!(WorkingSet::decode(&b, 200).unwrap(), ws);
        assert!(WorkingSet::decode(&b, 50).is_err());
        for i in 0..b.len() {
            let mut v = b.clone();
            v[i] ^= 1;
            assert!(WorkingSet::decode(&v, 200).is_err(), "byte {i}");
        }
        assert!(WorkingSet::decode(&b[..b.len() - 1], 200).is_err());
    }
}
