//! Pre-copy rounds: the source sends a round of pages ([`Precopy::round`]), fetches the dirty
//! log ([`Precopy::dirty`]) and, at switchover, the pages the destination must still receive
//! ([`Precopy::needed`]); the destination applies the round's frames to memory that nothing
//! runs on yet ([`Precopied::apply`]), checking every frame, and keeps the pages' hashes for
//! the digest (handed to [`Pull::new`](crate::pull::Pull::new) at switchover).

use std::sync::Arc;
use std::sync::atomic::Ordering::SeqCst;

use serde_json::json;
use thiserror::Error;

use crate::bitmap::{popcount, runs, words_for};
use crate::digest::page_hash;
use crate::dirty::{DirtyLog, DirtyLogError};
use crate::pull::PullError;
use crate::push::{SendError, Sent, send_run};
use crate::reader::PageReader;
use crate::wire::{Header, Kind, PAGE, RateLimit, Sock};

/// A pre-copy round failed.
#[derive(Debug, Error)]
pub enum RoundError {
    /// Sending the `Round` frame failed.
    #[error("announcing the round")]
    Announce(#[source] std::io::Error),
    /// Sending pages failed.
    #[error("sending pre-copy pages")]
    Send(#[source] SendError),
}

/// The source's side of pre-copy.
pub struct Precopy {
    reader: Arc<dyn PageReader>,
    rate: Arc<RateLimit>,
    sent: Arc<Sent>,
    /// Pages sent at least once (zero pages need announcing only after that).
    sent_once: Vec<u64>,
    /// Pages that may be non-zero (the first scan, and every page dirtied since).
    maybe: Vec<u64>,
    rounds: u32,
    buf: Vec<u8>,
    crc: bool,
}

impl Precopy {
    /// Pre-copy of `reader`'s memory, of which `maybe` (a bit per page) may hold data (every
    /// other page reads as zero at the destination without being sent).
    pub fn new(
        reader: Arc<dyn PageReader>,
        maybe: Vec<u64>,
        rate: Arc<RateLimit>,
        sent: Arc<Sent>,
    ) -> Precopy {
        let w = words_for(reader.pages());
        Precopy {
            reader,
            rate,
            sent,
            sent_once: vec![0; w],
            maybe,
            rounds: 0,
            buf: Vec::new(),
            crc: false,
        }
    }

    /// Send page frames with CRC32C trailers (when the hello negotiated them).
    pub fn set_crc(&mut self, crc: bool) {
        self.crc = crc;
    }

    /// Send one round: a `Round` frame, then the pages of `to_send` (zero pages as counts, and
    /// only if they were sent before: the destination's memory starts zeroed). Returns the
    /// pages of the round.
    pub fn round(&mut self, sock: &mut Sock, to_send: &[u64]) -> Result<u64, RoundError> {
        let total = popcount(to_send);
        sock.send_json(
            Kind::Round,
            &json!({ "round": self.rounds, "pages": total }),
        )
        .map_err(RoundError::Announce)?;
        for (p, n) in runs(to_send) {
            let once = &self.sent_once;
            send_run(
                sock,
                &*self.reader,
                p,
                n,
                &mut self.buf,
                &self.rate,
                false,
                &self.sent,
                &|q| once[(q / 64) as usize] & (1 << (q % 64)) != 0,
                self.crc,
            )
            .map_err(RoundError::Send)?;
            for q in p..p + n {
                self.sent_once[(q / 64) as usize] |= 1 << (q % 64);
            }
        }
        self.rounds += 1;
        Ok(total)
    }

    /// Fetch and clear the dirty log: the pages written since (they may now hold data).
    pub fn dirty(&mut self, log: &mut dyn DirtyLog) -> Result<Vec<u64>, DirtyLogError> {
        let d = log.fetch_and_clear()?;
        for (m, w) in self.maybe.iter_mut().zip(&d) {
            *m |= w;
        }
        Ok(d)
    }

    /// Rounds sent.
    pub fn rounds(&self) -> u32 {
        self.rounds
    }

    /// Bytes sent so far (all rounds).
    pub fn bytes(&self) -> u64 {
        self.sent.bytes.load(SeqCst)
    }

    /// The pages that may be non-zero (for the source's digest at the end).
    pub fn maybe(&self) -> &[u64] {
        &self.maybe
    }

    /// At a post-copy switchover: the pages the destination must still receive, given the
    /// last round's pages (`to_send`, not sent) and the dirty log since (`dirty`): those, and
    /// every page that may hold data but was never sent.
    pub fn needed(&self, to_send: &[u64], dirty: &[u64]) -> Vec<u64> {
        (0..self.maybe.len())
            .map(|i| {
                let g = |v: &[u64]| v.get(i).copied().unwrap_or(0);
                g(to_send) | g(dirty) | (self.maybe[i] & !self.sent_once[i])
            })
            .collect()
    }
}

/// The destination's side of pre-copy: applies `Pages` and `Zero` frames, checked, and keeps
/// each page's hash.
#[derive(Debug)]
pub struct Precopied {
    pages: u64,
    hashes: Vec<u64>,
}

impl Precopied {
    /// Memory of `pages` pages, all zero.
    pub fn new(pages: u64) -> Precopied {
        Precopied {
            pages,
            hashes: vec![0; pages as usize],
        }
    }

    /// Apply a `Pages` or `Zero` frame: `write(first page, bytes)` writes whole pages (zeros
    /// for `Zero`) into memory nothing runs on yet. Frames of other kinds are refused.
    pub fn apply(
        &mut self,
        h: &Header,
        payload: &[u8],
        mut write: impl FnMut(u64, &[u8]),
    ) -> Result<(), PullError> {
        let (n, zero) = match h.kind {
            Kind::Pages => (payload.len() as u64 / PAGE, false),
            Kind::Zero => {
                let max = u32::try_from(self.pages).unwrap_or(u32::MAX);
                let n = crate::wire::count(h.kind, payload, max).map_err(PullError::Frame)?;
                (u64::from(n), true)
            }
            k => {
                return Err(PullError::Frame(crate::wire::FrameError::Kind(k as u8)));
            }
        };
        let page = h.arg / PAGE;
        if h.arg % PAGE != 0 || page.checked_add(n).is_none_or(|e| e > self.pages) {
            return Err(PullError::OutOfRange {
                kind: h.kind,
                page,
                pages: n,
                total: self.pages,
            });
        }
        if zero {
            let z = vec![0u8; PAGE as usize];
            for q in page..page + n {
                write(q, &z);
                self.hashes[q as usize] = 0;
            }
        } else {
            write(page, payload);
            for (k, pg) in payload.chunks_exact(PAGE as usize).enumerate() {
                self.hashes[page as usize + k] = page_hash(pg);
            }
        }
        Ok(())
    }

    /// The pages' hashes (for [`Pull::new`](crate::pull::Pull::new), or the digest of a
    /// pre-copy that completes without post-copy).
    pub fn hashes(&self) -> &[u64] {
        &self.hashes
    }

    /// Take the pages' hashes (for [`Pull::new`](crate::pull::Pull::new)), leaving none.
    pub fn take_hashes(&mut self) -> Vec<u64> {
        std::mem::take(&mut self.hashes)
    }

    /// The digest of memory as applied.
    pub fn digest(&self) -> u64 {
        crate::digest::digest(self.hashes.iter().enumerate().map(|(p, &h)| (p as u64, h)))
    }
}
