//! Where pages come from: the [`PageSource`] trait and the sources that exist so far.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::{Arc, Mutex, mpsc};
use std::thread;

use thiserror::Error;
use uffd::FaultKind;
use vmm_sys_util::eventfd::EventFd;

/// A request for the page at `offset` and, if the source has them, the pages after it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    /// Byte offset of the faulting page in the source's address space (page-aligned).
    pub offset: u64,
    /// At most this many pages may be answered (batching; at least 1).
    pub max_pages: usize,
    /// What kind of fault asked (`Missing` also for background population).
    pub kind: FaultKind,
    /// Whether the faulting access was a write.
    pub write: bool,
    /// Asked by background population (`finish`, prefetch), not by a faulting thread.
    pub background: bool,
}

/// An answer given at once.
#[derive(Debug)]
pub enum Fill<'a> {
    /// The bytes of 1..=`max_pages` whole pages starting at `offset` (resolved with COPY).
    Bytes(&'a [u8]),
    /// `pages` pages of zeros (resolved with ZEROPAGE, no copy).
    Zero {
        /// Number of pages.
        pages: usize,
    },
    /// `pages` pages are already in the page cache (MINOR mode; resolved with CONTINUE).
    Present {
        /// Number of pages.
        pages: usize,
    },
    /// The source will answer later through the [`Completer`] it was given.
    Pending,
}

/// A later answer, delivered through a [`Completer`].
#[derive(Debug)]
pub enum Completion {
    /// Whole pages of data starting at `offset`.
    Bytes {
        /// Offset of the first page (as in the [`Request`]).
        offset: u64,
        /// The data: a non-zero multiple of the page size.
        data: Vec<u8>,
    },
    /// `pages` zero pages at `offset`.
    Zero {
        /// Offset of the first page.
        offset: u64,
        /// Number of pages.
        pages: usize,
    },
    /// The source could not produce the page at `offset`.
    Failed {
        /// Offset of the page.
        offset: u64,
        /// Why.
        error: SourceError,
    },
}

impl Completion {
    /// The offset the completion answers.
    pub fn offset(&self) -> u64 {
        match self {
            Completion::Bytes { offset, .. }
            | Completion::Zero { offset, .. }
            | Completion::Failed { offset, .. } => *offset,
        }
    }
}

/// Why a source could not produce a page.
#[derive(Debug, Error)]
pub enum SourceError {
    /// The offset lies outside the source.
    #[error("offset {offset:#x} is outside the source ({size:#x} bytes)")]
    OutOfRange {
        /// The offset asked for.
        offset: u64,
        /// The source's size.
        size: u64,
    },
    /// Reading the backing store failed.
    #[error("reading {len} bytes at offset {offset:#x} failed")]
    Io {
        /// The offset asked for.
        offset: u64,
        /// Bytes asked for.
        len: usize,
        /// The read's error (errno kept).
        #[source]
        source: io::Error,
    },
    /// The answer does not fit the request (not whole pages, too many, wrong kind).
    #[error("bad answer for offset {offset:#x}: {why}")]
    BadAnswer {
        /// The offset asked for.
        offset: u64,
        /// What was wrong.
        why: &'static str,
    },
    /// The data failed an integrity check (checksum mismatch): serving it would corrupt the
    /// reader silently.
    #[error("integrity check failed at offset {offset:#x}: {detail}")]
    Corrupt {
        /// The offset asked for.
        offset: u64,
        /// What did not match.
        detail: String,
    },
    /// The source is gone (peer disconnected, worker stopped).
    #[error("the page source is gone: {0}")]
    Gone(String),
}

/// Hands later answers back to the fault-loop worker that asked, and wakes it.
#[derive(Clone)]
pub struct Completer {
    inner: Arc<CompletionQueue>,
}

pub(crate) struct CompletionQueue {
    queue: Mutex<Vec<Completion>>,
    pub(crate) efd: EventFd,
}

impl Completer {
    pub(crate) fn new() -> io::Result<Self> {
        Ok(Self {
            inner: Arc::new(CompletionQueue {
                queue: Mutex::new(Vec::new()),
                efd: EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC)?,
            }),
        })
    }

    /// Deliver an answer; the worker resolves the fault. Never blocks.
    pub fn complete(&self, c: Completion) {
        self.inner
            .queue
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(c);
        // An eventfd write only fails on counter overflow, which a pending wakeup makes moot.
        let _ = self.inner.efd.write(1);
    }

    pub(crate) fn efd(&self) -> &EventFd {
        &self.inner.efd
    }

    pub(crate) fn drain(&self, into: &mut Vec<Completion>) {
        let _ = self.inner.efd.read();
        into.append(&mut self.inner.queue.lock().unwrap_or_else(|e| e.into_inner()));
    }
}

/// A supplier of page contents for a fault loop.
///
/// `fetch` runs on a fault-loop worker thread, so it must be quick: answer from memory or a
/// local file at once ([`Fill::Bytes`], [`Fill::Zero`], [`Fill::Present`]), or start the work
/// elsewhere and return [`Fill::Pending`], later calling [`Completer::complete`] (a network
/// peer, a slow disk; see [`AsyncSource`]). `scratch` is the worker's buffer of
/// `max_pages` pages that a source may fill and return as `Fill::Bytes`.
pub trait PageSource: Send + Sync {
    /// Answer `req`.
    fn fetch<'a>(
        &'a self,
        req: &Request,
        scratch: &'a mut [u8],
        later: &Completer,
    ) -> Result<Fill<'a>, SourceError>;

    /// The source's size in bytes, if bounded.
    fn size(&self) -> Option<u64> {
        None
    }
}

impl<S: PageSource + ?Sized> PageSource for Arc<S> {
    fn fetch<'a>(
        &'a self,
        req: &Request,
        scratch: &'a mut [u8],
        later: &Completer,
    ) -> Result<Fill<'a>, SourceError> {
        (**self).fetch(req, scratch, later)
    }

    fn size(&self) -> Option<u64> {
        (**self).size()
    }
}

/// Every page is zero.
#[derive(Debug, Default, Clone, Copy)]
pub struct ZeroSource;

impl PageSource for ZeroSource {
    fn fetch<'a>(
        &'a self,
        req: &Request,
        _: &'a mut [u8],
        _: &Completer,
    ) -> Result<Fill<'a>, SourceError> {
        Ok(Fill::Zero {
            pages: req.max_pages,
        })
    }
}

/// Pages already in the page cache (MINOR faults on shmem / hugetlbfs): resolve with CONTINUE.
#[derive(Debug, Default, Clone, Copy)]
pub struct PageCacheSource;

impl PageSource for PageCacheSource {
    fn fetch<'a>(
        &'a self,
        req: &Request,
        _: &'a mut [u8],
        _: &Completer,
    ) -> Result<Fill<'a>, SourceError> {
        Ok(Fill::Present {
            pages: req.max_pages,
        })
    }
}

fn page_bytes(pages: usize) -> usize {
    pages * uffd::page_size()
}

/// Pages served from an in-memory buffer, without copying it (zero-copy `Fill::Bytes`).
#[derive(Debug, Clone)]
pub struct BufferSource {
    data: Arc<[u8]>,
}

impl BufferSource {
    /// Serve `data` (its length should be a multiple of the page size; a short last page is
    /// padded with zeros).
    pub fn new(data: impl Into<Arc<[u8]>>) -> Self {
        Self { data: data.into() }
    }
}

impl PageSource for BufferSource {
    fn fetch<'a>(
        &'a self,
        req: &Request,
        scratch: &'a mut [u8],
        _: &Completer,
    ) -> Result<Fill<'a>, SourceError> {
        let size = self.data.len() as u64;
        if req.offset >= size {
            return Err(SourceError::OutOfRange {
                offset: req.offset,
                size,
            });
        }
        let off = req.offset as usize;
        let avail = self.data.len() - off;
        let whole = avail / uffd::page_size();
        if whole == 0 {
            // A partial last page: pad it in the scratch buffer.
            let n = uffd::page_size();
            scratch[..avail].copy_from_slice(&self.data[off..]);
            scratch[avail..n].fill(0);
            return Ok(Fill::Bytes(&scratch[..n]));
        }
        let n = page_bytes(whole.min(req.max_pages));
        Ok(Fill::Bytes(&self.data[off..off + n]))
    }

    fn size(&self) -> Option<u64> {
        Some(self.data.len() as u64)
    }
}

/// Pages read from a file with `pread`; pages that read as all zeros (holes) are served with
/// ZEROPAGE, and reads past the end of the file as zeros.
#[derive(Debug)]
pub struct FileSource {
    file: File,
    size: u64,
}

impl FileSource {
    /// Serve `file`, whose current length is its size.
    pub fn new(file: File) -> io::Result<Self> {
        let size = file.metadata()?.len();
        Ok(Self { file, size })
    }
}

impl PageSource for FileSource {
    fn fetch<'a>(
        &'a self,
        req: &Request,
        scratch: &'a mut [u8],
        _: &Completer,
    ) -> Result<Fill<'a>, SourceError> {
        if req.offset >= self.size {
            return Ok(Fill::Zero {
                pages: req.max_pages,
            });
        }
        let want = page_bytes(req.max_pages).min(scratch.len());
        let buf = &mut scratch[..want];
        let mut got = 0;
        while got < want {
            match self.file.read_at(&mut buf[got..], req.offset + got as u64) {
                Ok(0) => break,
                Ok(n) => got += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(source) => {
                    return Err(SourceError::Io {
                        offset: req.offset,
                        len: want,
                        source,
                    });
                }
            }
        }
        // Round up to whole pages; what lies past the end of the file reads as zero.
        let pages = got.div_ceil(uffd::page_size()).max(1);
        let n = page_bytes(pages);
        buf[got..n].fill(0);
        if buf[..n].iter().all(|&b| b == 0) {
            return Ok(Fill::Zero { pages });
        }
        Ok(Fill::Bytes(&buf[..n]))
    }

    fn size(&self) -> Option<u64> {
        Some(self.size)
    }
}

/// Runs a blocking source on its own threads so the fault loop never waits on it: `fetch`
/// queues the request and returns [`Fill::Pending`]; a helper thread answers later.
pub struct AsyncSource {
    tx: Mutex<mpsc::Sender<(Request, Completer)>>,
    size: Option<u64>,
}

impl AsyncSource {
    /// Serve `inner` from `threads` helper threads (at least 1), each with its own buffer of
    /// `max_pages` pages.
    pub fn new<S: PageSource + 'static>(inner: S, threads: usize, max_pages: usize) -> Self {
        let size = inner.size();
        let inner = Arc::new(inner);
        let (tx, rx) = mpsc::channel::<(Request, Completer)>();
        let rx = Arc::new(Mutex::new(rx));
        for _ in 0..threads.max(1) {
            let (inner, rx) = (inner.clone(), rx.clone());
            thread::spawn(move || {
                let mut scratch = vec![0u8; page_bytes(max_pages.max(1))];
                let helper = match Completer::new() {
                    Ok(c) => c,
                    Err(_) => return,
                };
                loop {
                    let next = rx.lock().unwrap_or_else(|e| e.into_inner()).recv();
                    let Ok((req, done)) = next else { return };
                    let c = match inner.fetch(&req, &mut scratch, &helper) {
                        Ok(Fill::Bytes(b)) => Completion::Bytes {
                            offset: req.offset,
                            data: b.to_vec(),
                        },
                        Ok(Fill::Zero { pages }) => Completion::Zero {
                            offset: req.offset,
                            pages,
                        },
                        Ok(Fill::Present { .. } | Fill::Pending) => Completion::Failed {
                            offset: req.offset,
                            error: SourceError::BadAnswer {
                                offset: req.offset,
                                why: "AsyncSource wraps sources that answer with data at once",
                            },
                        },
                        Err(error) => Completion::Failed {
                            offset: req.offset,
                            error,
                        },
                    };
                    done.complete(c);
                }
            });
        }
        Self {
            tx: Mutex::new(tx),
            size,
        }
    }
}

impl PageSource for AsyncSource {
    fn fetch<'a>(
        &'a self,
        req: &Request,
        _: &'a mut [u8],
        later: &Completer,
    ) -> Result<Fill<'a>, SourceError> {
        self.tx
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .send((*req, later.clone()))
            .map_err(|_| SourceError::Gone("AsyncSource helper threads exited".into()))?;
        Ok(Fill::Pending)
    }

    fn size(&self) -> Option<u64> {
        self.size
    }
}
