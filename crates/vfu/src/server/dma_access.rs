//! DMA from the device's side: reads, writes and copies of client memory, through the
//! mapped fds or `DMA_READ` / `DMA_WRITE` messages, and dirty-page logging.

use std::sync::atomic::Ordering;

use super::dma::{DmaError, Piece};
use super::sigbus::Guard;

/// The access at `at` hit pages the client truncated away (its guard caught the SIGBUS).
fn truncated(guard: Option<&Guard>, at: u64) -> Result<(), DmaError> {
    match guard {
        Some(g) if g.truncated() => Err(DmaError::Truncated { address: at }),
        _ => Ok(()),
    }
}
use super::{DeviceContext, lock};
use crate::proto::{DMA_READ, DMA_WRITE};

impl DeviceContext {
    /// Read client memory at `address` (may span mappings).
    pub fn dma_read(&self, address: u64, buf: &mut [u8]) -> Result<(), DmaError> {
        self.dma_check()?;
        let mut by_message = Vec::new();
        {
            let table = self.0.dma.read().unwrap_or_else(|e| e.into_inner());
            let pieces = table.translate(address, buf.len() as u64, DMA_READ)?;
            let mut done = 0usize;
            for (p, at, n) in pieces {
                let dst = &mut buf[done..done + n as usize];
                match p {
                    Piece::Host(host, guard) => {
                        // SAFETY: `translate` checked that `host..host+n` lies inside a live
                        // mapping, kept alive by the read lock held for the whole copy. If the
                        // client truncated its (unsealed) file, the guard's SIGBUS handler
                        // puts anonymous pages in place and the copy completes on garbage,
                        // which is refused just below.
                        unsafe {
                            std::ptr::copy_nonoverlapping(
                                host as *const u8,
                                dst.as_mut_ptr(),
                                dst.len(),
                            )
                        };
                        truncated(guard, at)?;
                    }
                    Piece::Message(s) => by_message.push((s.clone(), at, done, n as usize)),
                }
                done += n as usize;
            }
        }
        // Message round trips run without the table lock, so a client that goes away (its
        // mappings removed under the write lock) never waits on a reply that cannot come.
        for (s, at, off, n) in by_message {
            let s = s
                .upgrade()
                .ok_or(DmaError::Message("the client has gone".into()))?;
            s.dma_read(at, &mut buf[off..off + n])?;
        }
        Ok(())
    }

    /// Write client memory at `address` (may span mappings).
    pub fn dma_write(&self, address: u64, data: &[u8]) -> Result<(), DmaError> {
        self.dma_check()?;
        let mut by_message = Vec::new();
        {
            let table = self.0.dma.read().unwrap_or_else(|e| e.into_inner());
            let pieces = table.translate(address, data.len() as u64, DMA_WRITE)?;
            let mut done = 0usize;
            for (p, at, n) in pieces {
                let src = &data[done..done + n as usize];
                match p {
                    Piece::Host(host, guard) => {
                        // SAFETY: `translate` checked the range is inside a live writable
                        // mapping, kept alive by the read lock (a truncated file: as in
                        // `dma_read`).
                        unsafe {
                            std::ptr::copy_nonoverlapping(src.as_ptr(), host as *mut u8, src.len())
                        };
                        truncated(guard, at)?;
                    }
                    Piece::Message(s) => by_message.push((s.clone(), at, done, n as usize)),
                }
                done += n as usize;
            }
        }
        for (s, at, off, n) in by_message {
            let s = s
                .upgrade()
                .ok_or(DmaError::Message("the client has gone".into()))?;
            s.dma_write(at, &data[off..off + n])?;
        }
        Ok(())
    }

    /// Copy `len` bytes of client memory from `src` to `dst`, through a bounce buffer of at
    /// most 1 MiB (both ranges checked before the first byte moves).
    pub fn dma_copy(&self, src: u64, dst: u64, len: u64) -> Result<(), DmaError> {
        {
            let table = self.0.dma.read().unwrap_or_else(|e| e.into_inner());
            table.translate(src, len, DMA_READ)?;
            table.translate(dst, len, DMA_WRITE)?;
        }
        let mut buf = vec![0u8; len.min(1 << 20) as usize];
        let mut done = 0u64;
        while done < len {
            let n = (len - done).min(buf.len() as u64) as usize;
            self.dma_read(src + done, &mut buf[..n])?;
            self.dma_write(dst + done, &buf[..n])?;
            done += n as u64;
        }
        Ok(())
    }

    /// Read client memory at `address` through `DMA_READ` messages to the client that
    /// mapped it, even where the mapping came with an fd (for devices that prefer messages,
    /// or to test a client's handling of them).
    pub fn dma_read_by_message(&self, address: u64, buf: &mut [u8]) -> Result<(), DmaError> {
        self.dma_check()?;
        let pieces = self
            .0
            .dma
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .by_message(address, buf.len() as u64, DMA_READ)?;
        let mut done = 0usize;
        for (s, at, n) in pieces {
            let s = s
                .upgrade()
                .ok_or(DmaError::Message("the client has gone".into()))?;
            s.dma_read(at, &mut buf[done..done + n as usize])?;
            done += n as usize;
        }
        Ok(())
    }

    /// Write client memory through `DMA_WRITE` messages (see
    /// [`dma_read_by_message`](DeviceContext::dma_read_by_message)). The client logs these
    /// pages dirty itself, as the protocol has it.
    pub fn dma_write_by_message(&self, address: u64, data: &[u8]) -> Result<(), DmaError> {
        self.dma_check()?;
        let pieces = self
            .0
            .dma
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .by_message(address, data.len() as u64, DMA_WRITE)?;
        let mut done = 0usize;
        for (s, at, n) in pieces {
            let s = s
                .upgrade()
                .ok_or(DmaError::Message("the client has gone".into()))?;
            s.dma_write(at, &data[done..done + n as usize])?;
            done += n as usize;
        }
        Ok(())
    }

    /// Mark client memory dirty for DMA logging, for writes the device made some way other
    /// than [`dma_write`](DeviceContext::dma_write) / [`dma_copy`](DeviceContext::dma_copy)
    /// (which log by themselves). Does nothing while logging is off.
    pub fn dma_mark_dirty(&self, address: u64, len: u64) {
        self.0
            .dma
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .mark_dirty(address, len);
    }

    /// Wait (up to `timeout`) while `busy()` holds: for work of the device's own that needs
    /// the client, such as a DMA copy in flight through `DMA_READ` / `DMA_WRITE` messages,
    /// from a callback run for a client command (a migration state change). The client's
    /// replies to that DMA keep being read meanwhile, which waiting any other way would
    /// block: the callback runs on the thread that reads the client's socket. Returns
    /// whether `busy()` ended in time.
    pub fn wait_while(&self, busy: impl Fn() -> bool, timeout: std::time::Duration) -> bool {
        let deadline = std::time::Instant::now() + timeout;
        let owner = *lock(&self.0.owner);
        let session = owner.and_then(|id| {
            lock(&super::session::SESSIONS)
                .get(&id)
                .and_then(std::sync::Weak::upgrade)
        });
        match session {
            Some(s) => s.pump_while(&busy, deadline),
            None => {
                while busy() {
                    if std::time::Instant::now() >= deadline {
                        return false;
                    }
                    std::thread::sleep(std::time::Duration::from_micros(100));
                }
                true
            }
        }
    }

    /// The DMA logging page size while the client has dirty-page logging on.
    pub fn dma_logging(&self) -> Option<u64> {
        self.0
            .dma
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .log_page()
    }

    /// Mapped DMA regions: (address, size).
    pub fn dma_regions(&self) -> Vec<(u64, u64)> {
        let t = self.0.dma.read().unwrap_or_else(|e| e.into_inner());
        t.regions()
    }

    fn dma_check(&self) -> Result<(), DmaError> {
        if !self.0.running.load(Ordering::Acquire) {
            return Err(DmaError::Disabled("the device is stopped for migration"));
        }
        if !self.0.dma_without_bus_master
            && lock(&self.0.config).command() & pci::CMD_BUS_MASTER == 0
        {
            return Err(DmaError::Disabled("bus mastering is off"));
        }
        Ok(())
    }
}
