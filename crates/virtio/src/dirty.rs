//! Pages of guest memory the devices wrote, for live migration: KVM's dirty log sees only
//! what the vCPUs write, so a buffer a device fills (a block read, a received frame) and the
//! used ring would otherwise be sent stale.
//!
//! The transport marks, when it gives a chain back to the driver, every device-writable
//! buffer of that chain and the queue's used ring; and the used ring again when it turns the
//! driver's notifications on or off. Marking after the write is enough: a page marked after
//! a round collected the set is sent by the next round. `vm-memory`'s own bitmap
//! (`backend-bitmap`) would mark at each write instead, but only on a
//! `GuestMemoryMmap<AtomicBitmap>`: a second type for guest memory through the VMM (KVM's
//! slot, snapshots, the migration's reader) for what the chain already says, since a device
//! writes only into the buffers of chains it is given.
//!
//! Tracking costs nothing while it is off (one relaxed load per completion).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// The page size the log counts in.
pub const PAGE: u64 = 4096;

/// One bit per guest page, set by the devices while tracking is on.
#[derive(Debug)]
pub struct DirtyPages {
    on: AtomicBool,
    pages: u64,
    words: Vec<AtomicU64>,
}

impl DirtyPages {
    /// A log for `bytes` of guest memory (from guest-physical 0), tracking off.
    pub fn new(bytes: u64) -> DirtyPages {
        let pages = bytes.div_ceil(PAGE);
        DirtyPages {
            on: AtomicBool::new(false),
            pages,
            words: (0..pages.div_ceil(64)).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    /// Turn tracking on or off (turning it on clears the log).
    pub fn set_tracking(&self, on: bool) {
        if on {
            for w in &self.words {
                w.store(0, Ordering::Relaxed);
            }
        }
        self.on.store(on, Ordering::SeqCst);
    }

    /// Whether tracking is on.
    pub fn tracking(&self) -> bool {
        self.on.load(Ordering::Relaxed)
    }

    /// Mark `len` bytes from guest-physical `addr` (pages past guest memory are ignored).
    pub fn mark(&self, addr: u64, len: u64) {
        if len == 0 || !self.tracking() {
            return;
        }
        let first = addr / PAGE;
        let last = addr.saturating_add(len - 1) / PAGE;
        for p in first..=last.min(self.pages.saturating_sub(1)) {
            self.words[(p / 64) as usize].fetch_or(1 << (p % 64), Ordering::Relaxed);
        }
    }

    /// The pages marked since the last call (one bit per page, 64 to a word), cleared.
    pub fn take(&self) -> Vec<u64> {
        self.words
            .iter()
            .map(|w| w.swap(0, Ordering::AcqRel))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marks_only_while_tracking_and_take_clears() {
        let d = DirtyPages::new(1 << 20);
        d.mark(0, 10);
        assert!(d.take().iter().all(|w| *w == 0));
        d.set_tracking(true);
        d.mark(PAGE - 1, 2); // pages 0 and 1
        d.mark(65 * PAGE, PAGE); // page 65 only
        d.mark(1 << 30, PAGE); // past memory: ignored
        let w = d.take();
        assert_eq!(w.len(), 4);
        assert_eq!(w[0], 0b11);
        assert_eq!(w[1], 0b10);
        assert!(d.take().iter().all(|w| *w == 0));
    }
}
