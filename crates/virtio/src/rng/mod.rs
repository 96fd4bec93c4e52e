//! The virtio entropy device (virtio 1.2, section 5.4): one request queue; the device fills
//! each chain's device-writable buffers with bytes from the kernel (`getrandom(2)`).
//!
//! # Requests
//!
//! A chain's device-writable buffers are filled from the start, at most [`MAX_REQUEST`]
//! bytes per chain (the driver asks again for more); the used length is the bytes written.
//! Device-readable buffers are ignored; a chain with no writable buffer is given back with a
//! used length of 0 (5.4.6.2 lets the device write fewer bytes than there is room for).
//! There is no configuration space and no feature bit.
//!
//! A `getrandom` failure other than `EINTR` is [`DeviceError::Backend`]: the kernel cannot
//! give entropy, which no request can report.

#[cfg(test)]
mod tests;

use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::{DeviceError, DeviceType, Queues, VirtioDevice};

/// The request queue's largest size.
pub const QUEUE_SIZE: u16 = 256;
/// The most bytes written into one chain.
pub const MAX_REQUEST: usize = 64 << 10;

/// Live counters of an [`Rng`] device, shared with whoever prints them.
#[derive(Debug, Default)]
pub struct RngStats {
    requests: AtomicU64,
    bytes: AtomicU64,
    errors: AtomicU64,
}

/// The counters at one moment.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct RngCounters {
    /// Chains answered.
    pub requests: u64,
    /// Random bytes written to the guest.
    pub bytes: u64,
    /// `getrandom` failures (each stops the device).
    pub errors: u64,
}

impl RngStats {
    /// The counters now.
    pub fn snapshot(&self) -> RngCounters {
        RngCounters {
            requests: self.requests.load(Ordering::Relaxed),
            bytes: self.bytes.load(Ordering::Relaxed),
            errors: self.errors.load(Ordering::Relaxed),
        }
    }
}

/// A virtio entropy device fed by the kernel's `getrandom(2)`.
pub struct Rng {
    stats: Arc<RngStats>,
    buf: Vec<u8>,
}

impl Default for Rng {
    fn default() -> Self {
        Rng::new()
    }
}

impl Rng {
    /// An entropy device.
    pub fn new() -> Rng {
        Rng {
            stats: Arc::new(RngStats::default()),
            buf: Vec::new(),
        }
    }

    /// Its counters (shared: they go on counting while the device runs).
    pub fn stats(&self) -> Arc<RngStats> {
        self.stats.clone()
    }
}

/// Fill `buf` with random bytes from the kernel.
fn getrandom(buf: &mut [u8]) -> io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        let rest = &mut buf[done..];
        // SAFETY: the kernel writes at most `rest.len()` bytes into `rest`, a live, exclusively
        // borrowed slice of host memory.
        let n = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), 0) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        // n >= 0 and at most rest.len(): the cast cannot wrap.
        done += n as usize;
    }
    Ok(())
}

impl VirtioDevice for Rng {
    fn device_type(&self) -> DeviceType {
        DeviceType::Rng
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        0
    }

    fn config(&self) -> Vec<u8> {
        Vec::new()
    }

    fn activate(&mut self, _features: u64) -> Result<(), DeviceError> {
        Ok(())
    }

    fn reset(&mut self) {
        self.buf = Vec::new();
    }

    fn process_queue(&mut self, queues: &mut Queues<'_>, index: usize) -> Result<(), DeviceError> {
        while let Some(c) = queues.pop(index)? {
            let want = usize::try_from(c.writable_len())
                .unwrap_or(MAX_REQUEST)
                .min(MAX_REQUEST);
            if self.buf.len() < want {
                self.buf.resize(want, 0);
            }
            let buf = &mut self.buf[..want];
            if let Err(source) = getrandom(buf) {
                self.stats.errors.fetch_add(1, Ordering::Relaxed);
                return Err(DeviceError::Backend {
                    what: "getrandom".into(),
                    source,
                });
            }
            let n = c
                .write_at(queues.mem(), 0, buf)
                .map_err(|source| DeviceError::Memory {
                    queue: index,
                    source,
                })?;
            queues.complete(index, &c, n as u32)?;
            self.stats.requests.fetch_add(1, Ordering::Relaxed);
            self.stats.bytes.fetch_add(n as u64, Ordering::Relaxed);
        }
        Ok(())
    }
}
