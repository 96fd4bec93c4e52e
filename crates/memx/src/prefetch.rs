//! The background prefetcher of [`FaultLoop::prefetch`](crate::FaultLoop::prefetch): pushes
//! pages in a given order while faults are served first.

use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::thread;

use uffd::{FaultKind, Uffd, error_chain, page_size};

use crate::control::{Control, How, RUN, Region, resolve};
use crate::source::{Completer, Fill, PageSource, Request};
use crate::stats::ShardStats;

/// The background pusher started by [`FaultLoop::prefetch`].
pub(crate) struct Prefetcher {
    pub(crate) targets: Vec<(Arc<Uffd>, Vec<Region>)>,
    pub(crate) source: Arc<dyn PageSource>,
    pub(crate) ctl: Arc<Control>,
    pub(crate) stats: Arc<ShardStats>,
    pub(crate) batch: usize,
}

impl Prefetcher {
    fn locate(&self, offset: u64) -> Option<(&Uffd, usize, usize)> {
        let page = page_size() as u64;
        for (u, parts) in &self.targets {
            for p in parts {
                let len = p.range.len() as u64;
                if offset >= p.offset && offset < p.offset + len {
                    let addr = p.range.start() + (offset - p.offset) as usize;
                    let left = ((p.offset + len - offset) / page) as usize;
                    return Some((u, addr, left));
                }
            }
        }
        None
    }

    pub(crate) fn run(&self, offsets: &[u64]) {
        let page = page_size() as u64;
        let mut scratch = vec![0u8; self.batch * page as usize];
        let Ok(completer) = Completer::new() else {
            return;
        };
        let mut i = 0;
        while i < offsets.len() {
            if self.ctl.cmd.load(Relaxed) != RUN {
                return;
            }
            // Faults first: stay out of the way while any is being served.
            while self.ctl.in_flight.load(Relaxed) > 0 {
                if self.ctl.cmd.load(Relaxed) != RUN {
                    return;
                }
                thread::yield_now();
            }
            let start = offsets[i];
            let Some((uffd, addr, left)) = self.locate(start) else {
                i += 1;
                continue;
            };
            let mut run = 1;
            while run < self.batch.min(left)
                && i + run < offsets.len()
                && offsets[i + run] == start + run as u64 * page
            {
                run += 1;
            }
            i += run;
            let req = Request {
                offset: start,
                max_pages: run,
                kind: FaultKind::Missing,
                write: false,
                background: true,
            };
            let how = match self.source.fetch(&req, &mut scratch, &completer) {
                Ok(Fill::Bytes(b)) if !b.is_empty() && b.len() % page as usize == 0 => How::Copy(b),
                Ok(Fill::Zero { pages }) => How::Zero(pages.clamp(1, run)),
                Ok(Fill::Present { pages }) => How::Continue(pages.clamp(1, run)),
                // Later answers and failures are left to the fault path.
                _ => continue,
            };
            let (copy, zero) = (matches!(how, How::Copy(_)), matches!(how, How::Zero(_)));
            match resolve(uffd, addr, how) {
                Ok(n) if n > 0 => {
                    self.stats.pages.fetch_add(n as u64, Relaxed);
                    self.stats.populated_pages.fetch_add(n as u64, Relaxed);
                    if copy {
                        self.stats.bytes_copied.fetch_add(n as u64 * page, Relaxed);
                    } else if zero {
                        self.stats.zero_pages.fetch_add(n as u64, Relaxed);
                    }
                }
                Ok(_) => {
                    self.stats.already_present.fetch_add(1, Relaxed);
                }
                Err(e) => {
                    self.stats
                        .record_error(format!("prefetch at {addr:#x}: {}", error_chain(&e)));
                }
            }
        }
    }
}
