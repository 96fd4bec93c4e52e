//! What a device model implements, and the queue access the transport hands it.
//!
//! A device has no I/O of its own beyond its backend (a file, a tap, a socket): the transport
//! owns the registers and the rings, calls the device when a queue is notified or a backend
//! fd is ready, and raises the interrupts. A device only turns chains into work and answers.

use std::os::fd::RawFd;

use thiserror::Error;
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{GuestAddress, GuestMemoryMmap};

use crate::chain::{self, Chain, ChainError};
use crate::dirty::DirtyPages;

/// Virtio device types (virtio 1.2, section 5).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DeviceType {
    /// 1: network.
    Net,
    /// 2: block.
    Block,
    /// 4: entropy.
    Rng,
    /// 19: socket.
    Vsock,
}

impl DeviceType {
    /// The device ID register's value.
    pub fn id(self) -> u32 {
        match self {
            DeviceType::Net => 1,
            DeviceType::Block => 2,
            DeviceType::Rng => 4,
            DeviceType::Vsock => 19,
        }
    }

    /// Its name.
    pub fn name(self) -> &'static str {
        match self {
            DeviceType::Net => "net",
            DeviceType::Block => "block",
            DeviceType::Rng => "rng",
            DeviceType::Vsock => "vsock",
        }
    }
}

/// A device stopped working: the transport sets `DEVICE_NEEDS_RESET` and tells the driver.
#[derive(Debug, Error)]
pub enum DeviceError {
    /// The driver gave a malformed chain.
    #[error("queue {queue}: malformed descriptor chain")]
    Chain {
        /// Queue.
        queue: usize,
        /// What is wrong.
        #[source]
        source: ChainError,
    },
    /// The rings themselves are broken (an available index past the queue, a ring outside
    /// memory).
    #[error("queue {queue}: broken ring")]
    Ring {
        /// Queue.
        queue: usize,
        /// `virtio-queue`'s error.
        #[source]
        source: virtio_queue::Error,
    },
    /// Guest memory named by a valid chain could not be accessed.
    #[error("queue {queue}: guest memory access failed")]
    Memory {
        /// Queue.
        queue: usize,
        /// Cause.
        #[source]
        source: vm_memory::GuestMemoryError,
    },
    /// A request the device cannot make sense of (a header too short, a type it rejects in
    /// a way the protocol gives no status for).
    #[error("queue {queue}: {what}")]
    Request {
        /// Queue.
        queue: usize,
        /// What.
        what: String,
    },
    /// The backend failed in a way the device cannot report per request (a tap that is
    /// gone, a socket that cannot be polled).
    #[error("backend {what} failed")]
    Backend {
        /// What.
        what: String,
        /// Cause (errno kept).
        #[source]
        source: std::io::Error,
    },
    /// Saved device state does not fit this device (another disk size, another MAC).
    #[error("saved device state refused: {what}")]
    State {
        /// What differs.
        what: String,
    },
}

/// A device model behind the virtio-mmio transport.
pub trait VirtioDevice: Send {
    /// Its type.
    fn device_type(&self) -> DeviceType;
    /// The largest size of each of its queues.
    fn queue_max_sizes(&self) -> Vec<u16>;
    /// Device feature bits it offers (the transport adds `VERSION_1` and `EVENT_IDX`).
    fn features(&self) -> u64;
    /// Its configuration space, little-endian, as it is now.
    fn config(&self) -> Vec<u8>;
    /// A driver write to the configuration space (ignored by most devices).
    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
    /// The driver set `DRIVER_OK` with these features accepted.
    fn activate(&mut self, features: u64) -> Result<(), DeviceError>;
    /// The driver reset the device: forget everything in flight.
    fn reset(&mut self);
    /// Queue `index` has chains (the driver notified it).
    fn process_queue(&mut self, queues: &mut Queues<'_>, index: usize) -> Result<(), DeviceError>;
    /// Host fds the device wants polled (asked again after every call into the device).
    fn poll_fds(&self) -> Vec<RawFd> {
        Vec::new()
    }
    /// One of [`poll_fds`](Self::poll_fds) is readable (or hung up).
    fn backend_ready(&mut self, _queues: &mut Queues<'_>, _fd: RawFd) -> Result<(), DeviceError> {
        Ok(())
    }
    /// The device's own state beyond the transport's, for a snapshot (see
    /// [`crate::state`]); at most [`crate::state::MAX_DEVICE_BYTES`].
    fn save_state(&self) -> Vec<u8> {
        Vec::new()
    }
    /// Take back [`save_state`](Self::save_state)'s bytes on a freshly built device, before
    /// the transport activates it; refuse state that does not fit this device.
    fn restore_state(&mut self, bytes: &[u8]) -> Result<(), DeviceError> {
        if bytes.is_empty() {
            Ok(())
        } else {
            Err(DeviceError::State {
                what: format!("{} bytes for a device that saves none", bytes.len()),
            })
        }
    }
}

/// Mark `queue`'s used ring (flags, index, elements, avail event) in the dirty log.
pub(crate) fn mark_used_ring(d: &DirtyPages, queue: &Queue) {
    d.mark(queue.used_ring(), 6 + 8 * u64::from(queue.size()));
}

/// A device's view of its queues while it is called: take chains, give them back.
pub struct Queues<'a> {
    mem: &'a GuestMemoryMmap,
    queues: &'a mut [Queue],
    used: &'a mut [u32],
    dirty: Option<&'a DirtyPages>,
}

impl<'a> Queues<'a> {
    pub(crate) fn new(
        mem: &'a GuestMemoryMmap,
        queues: &'a mut [Queue],
        used: &'a mut [u32],
        dirty: Option<&'a DirtyPages>,
    ) -> Self {
        Queues {
            mem,
            queues,
            used,
            dirty,
        }
    }

    /// Guest memory (touch it through `vm-memory`'s volatile accessors or [`Chain`]'s).
    pub fn mem(&self) -> &GuestMemoryMmap {
        self.mem
    }

    /// The next available chain of queue `q`, walked strictly; `None` when there is none.
    pub fn pop(&mut self, q: usize) -> Result<Option<Chain>, DeviceError> {
        let mem = self.mem;
        let queue = &mut self.queues[q];
        let (table, size) = (GuestAddress(queue.desc_table()), queue.size());
        let head = {
            let mut it = queue
                .iter(mem)
                .map_err(|source| DeviceError::Ring { queue: q, source })?;
            match it.next() {
                Some(c) => c.head_index(),
                None => return Ok(None),
            }
        };
        chain::walk(mem, table, size, head)
            .map(Some)
            .map_err(|source| DeviceError::Chain { queue: q, source })
    }

    /// Put back the chain most recently popped from `q` (the device cannot take it now).
    pub fn unpop(&mut self, q: usize) {
        self.queues[q].go_to_previous_position();
    }

    /// Give `chain` back to the driver with `len` bytes written (its device-writable buffers
    /// and the used ring go into the dirty log while it tracks).
    pub fn complete(&mut self, q: usize, chain: &Chain, len: u32) -> Result<(), DeviceError> {
        if let Some(d) = self.dirty.filter(|d| d.tracking()) {
            for b in chain.descs.iter().filter(|b| b.write) {
                d.mark(b.addr.0, u64::from(b.len));
            }
            mark_used_ring(d, &self.queues[q]);
        }
        self.queues[q]
            .add_used(self.mem, chain.head, len)
            .map_err(|source| DeviceError::Ring { queue: q, source })?;
        self.used[q] += 1;
        Ok(())
    }

    /// Whether queue `q` is ready (set up by the driver).
    pub fn ready(&self, q: usize) -> bool {
        self.queues.get(q).is_some_and(|x| x.ready())
    }

    /// Number of queues.
    pub fn len(&self) -> usize {
        self.queues.len()
    }

    /// Whether the device has no queues.
    pub fn is_empty(&self) -> bool {
        self.queues.is_empty()
    }
}
