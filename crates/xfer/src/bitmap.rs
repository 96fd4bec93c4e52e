//! Page bitmaps: a shared atomic bitmap ([`Bits`]) and helpers over plain word vectors (a bit
//! per page, bit `i % 64` of word `i / 64`), as KVM's dirty log and the wire's `Needed` and
//! `Recover` frames lay them out.

use std::sync::atomic::{AtomicU64, Ordering::SeqCst};

use crate::wire::MAX_RUN;

/// A bitmap of pages, shared between threads.
#[derive(Debug)]
pub struct Bits(Vec<AtomicU64>);

impl Bits {
    /// `pages` clear bits.
    pub fn new(pages: u64) -> Bits {
        Bits((0..pages.div_ceil(64)).map(|_| AtomicU64::new(0)).collect())
    }

    /// From words.
    pub fn from_words(w: &[u64]) -> Bits {
        Bits(w.iter().map(|&x| AtomicU64::new(x)).collect())
    }

    /// Whether page `p` is set (pages past the end are not).
    pub fn get(&self, p: u64) -> bool {
        self.0
            .get((p / 64) as usize)
            .is_some_and(|w| w.load(SeqCst) & (1 << (p % 64)) != 0)
    }

    /// Set; returns whether it was already set (pages past the end count as set).
    pub fn set(&self, p: u64) -> bool {
        self.0
            .get((p / 64) as usize)
            .is_none_or(|w| w.fetch_or(1 << (p % 64), SeqCst) & (1 << (p % 64)) != 0)
    }

    /// Clear; returns whether it was set.
    pub fn clear(&self, p: u64) -> bool {
        self.0
            .get((p / 64) as usize)
            .is_some_and(|w| w.fetch_and(!(1 << (p % 64)), SeqCst) & (1 << (p % 64)) != 0)
    }

    /// Set bits.
    pub fn count(&self) -> u64 {
        self.0
            .iter()
            .map(|w| u64::from(w.load(SeqCst).count_ones()))
            .sum()
    }

    /// A copy of the words.
    pub fn words(&self) -> Vec<u64> {
        self.0.iter().map(|w| w.load(SeqCst)).collect()
    }

    /// Replace the words with `w` (the same length; extra words are ignored, missing ones
    /// cleared).
    pub fn store_words(&self, w: &[u64]) {
        for (i, a) in self.0.iter().enumerate() {
            a.store(w.get(i).copied().unwrap_or(0), SeqCst);
        }
    }

    /// The first set bit at or after `from`, wrapping once; `None` if none is set below
    /// `pages`.
    pub fn next_set(&self, from: u64, pages: u64) -> Option<u64> {
        let n = self.0.len() as u64;
        if n == 0 {
            return None;
        }
        let start = from.min(pages.saturating_sub(1));
        let (w0, b0) = (start / 64, start % 64);
        for k in 0..=n {
            let wi = (w0 + k) % n;
            let mut w = self.0[wi as usize].load(SeqCst);
            if k == 0 {
                w &= !0u64 << b0;
            }
            if k == n {
                w = self.0[wi as usize].load(SeqCst) & !(!0u64 << b0);
            }
            if w != 0 {
                let p = wi * 64 + u64::from(w.trailing_zeros());
                if p < pages {
                    return Some(p);
                }
            }
        }
        None
    }
}

/// Runs of set bits as `(first page, pages)`, at most [`MAX_RUN`] long.
pub fn runs(bits: &[u64]) -> impl Iterator<Item = (u64, u64)> + '_ {
    let mut p = 0u64;
    let total = bits.len() as u64 * 64;
    std::iter::from_fn(move || {
        while p < total {
            let w = bits[(p / 64) as usize] >> (p % 64);
            if w == 0 {
                p = (p / 64 + 1) * 64;
                continue;
            }
            p += u64::from(w.trailing_zeros());
            let start = p;
            while p < total && p - start < MAX_RUN && bits[(p / 64) as usize] & (1 << (p % 64)) != 0
            {
                p += 1;
            }
            return Some((start, p - start));
        }
        None
    })
}

/// Set bits.
pub fn popcount(bits: &[u64]) -> u64 {
    bits.iter().map(|w| u64::from(w.count_ones())).sum()
}

/// Words for `pages` pages.
pub fn words_for(pages: u64) -> usize {
    pages.div_ceil(64) as usize
}

/// Bytes of a bitmap (little-endian words) for the wire.
pub fn words_to_bytes(w: &[u64]) -> Vec<u8> {
    w.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// Words from wire bytes; `None` if the length does not fit `pages` exactly, or a bit is set
/// past the last page.
pub fn bytes_to_words(b: &[u8], pages: u64) -> Option<Vec<u64>> {
    if b.len() as u64 != pages.div_ceil(64) * 8 {
        return None;
    }
    let w: Vec<u64> = b
        .chunks_exact(8)
        .map(|c| u64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
        .collect();
    let tail = pages % 64;
    if tail != 0 && w.last().is_some_and(|&x| x >> tail != 0) {
        return None;
    }
    Some(w)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bits_next_set_wraps() {
        let b = Bits::new(200);
        assert_eq!(b.next_set(0, 200), None);
        b.set(5);
        b.set(130);
        assert_eq!(b.next_set(0, 200), Some(5));
        assert_eq!(b.next_set(6, 200), Some(130));
        assert_eq!(b.next_set(131, 200), Some(5));
        assert!(b.clear(5));
        assert!(!b.clear(5));
        assert_eq!(b.next_set(131, 200), Some(130));
        assert_eq!(b.count(), 1);
        assert!(b.set(999), "past the end counts as set");
        let w = b.words();
        assert_eq!(bytes_to_words(&words_to_bytes(&w), 200), Some(w));
        assert_eq!(bytes_to_words(&[0; 3], 200), None);
        // A bit past page 200 is refused.
        let mut bad = vec![0u64; 4];
        bad[3] = 1 << 9;
        assert_eq!(bytes_to_words(&words_to_bytes(&bad), 200), None);
    }

    #[test]
    fn runs_split_at_gaps_and_max() {
        let mut bits = vec![0u64; 4];
        for p in [1u64, 2, 3, 70] {
            bits[(p / 64) as usize] |= 1 << (p % 64);
        }
        for p in 128..256u64 {
            bits[(p / 64) as usize] |= 1 << (p % 64);
        }
        let r: Vec<_> = runs(&bits).collect();
        assert_eq!(r, vec![(1, 3), (70, 1), (128, 64), (192, 64)]);
        assert_eq!(popcount(&bits), 4 + 128);
    }
}
