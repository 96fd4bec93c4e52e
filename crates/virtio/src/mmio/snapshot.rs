//! Saving and restoring the transport ([`MmioTransport::save`], [`MmioTransport::restore`]).

use thiserror::Error;
use virtio_queue::{Queue, QueueT};

use super::MmioTransport;
use crate::device::DeviceError;
use crate::state::{MAX_BROKEN, MAX_QUEUES, TransportState};

/// The transport's state could not be saved.
#[derive(Debug, Error)]
pub enum SaveError {
    /// More queues than a record carries.
    #[error("{0} queues: a record carries at most {MAX_QUEUES}")]
    TooManyQueues(usize),
    /// The broken reason is longer than a record carries.
    #[error("broken reason of {0} bytes: a record carries at most {MAX_BROKEN}")]
    BrokenTooLong(usize),
}

/// Saved state does not fit this transport; nothing was changed.
#[derive(Debug, Error)]
pub enum RestoreError {
    /// Another device type.
    #[error("saved device type {saved}, this device is {live}")]
    DeviceType {
        /// Saved DeviceID.
        saved: u32,
        /// This device's.
        live: u32,
    },
    /// Another number of queues.
    #[error("saved {saved} queues, this device has {live}")]
    QueueCount {
        /// Saved.
        saved: usize,
        /// This device's.
        live: usize,
    },
    /// A queue's max size differs, or its size is past it.
    #[error(
        "queue {queue}: saved max size {saved_max}, size {size}; this device's max is {live_max}"
    )]
    QueueSize {
        /// Queue.
        queue: usize,
        /// Saved max size.
        saved_max: u16,
        /// Saved size.
        size: u16,
        /// This device's max size.
        live_max: u16,
    },
    /// A queue's state is rejected by `virtio-queue` (a size not a power of two, a
    /// misaligned ring).
    #[error("queue {queue}: invalid state")]
    Queue {
        /// Queue.
        queue: usize,
        /// Cause.
        #[source]
        source: virtio_queue::Error,
    },
    /// A ready queue's rings are not inside guest memory.
    #[error(
        "queue {queue}: rings (desc {desc:#x}, avail {avail:#x}, used {used:#x}) not inside guest memory"
    )]
    QueueMemory {
        /// Queue.
        queue: usize,
        /// Descriptor table.
        desc: u64,
        /// Available ring.
        avail: u64,
        /// Used ring.
        used: u64,
    },
    /// The driver features include bits the device does not offer.
    #[error("saved driver features {saved:#x} include bits not offered ({offered:#x})")]
    Features {
        /// Saved.
        saved: u64,
        /// Offered.
        offered: u64,
    },
    /// MSI vector tables of the wrong length.
    #[error("saved {vectors} MSI vectors and {masked} mask bits, this device has {live}")]
    MsiVectors {
        /// Saved vectors.
        vectors: usize,
        /// Saved mask bits.
        masked: usize,
        /// This device's vectors (queues + 1).
        live: usize,
    },
    /// A status that contradicts the rest (activated without `DRIVER_OK` and `FEATURES_OK`).
    #[error("saved status {status:#x} with activated = {activated}")]
    Status {
        /// Saved status.
        status: u32,
        /// Saved activated flag.
        activated: bool,
    },
    /// MSI state saved for a transport that does not offer MSI.
    #[error("saved state has MSI on, this transport does not offer it")]
    MsiNotOffered,
    /// The device refused its bytes.
    #[error("device state refused")]
    Device(#[source] DeviceError),
    /// Re-programming an MSI route failed (the transport state is restored; the device is
    /// marked broken).
    #[error("MSI vector {vector} could not be routed")]
    MsiRoute {
        /// Vector.
        vector: u16,
        /// Cause (errno kept).
        #[source]
        source: std::io::Error,
    },
    /// Activating the device failed (the transport state is restored; the device is marked
    /// broken).
    #[error("activating the restored device failed")]
    Activate(#[source] DeviceError),
}

impl MmioTransport {
    /// Everything the transport holds, apart from the device's own bytes
    /// ([`save_device`](Self::save_device)).
    pub fn save(&self) -> Result<TransportState, SaveError> {
        if self.queues.len() > MAX_QUEUES {
            return Err(SaveError::TooManyQueues(self.queues.len()));
        }
        if let Some(b) = &self.broken
            && b.len() > MAX_BROKEN
        {
            return Err(SaveError::BrokenTooLong(b.len()));
        }
        Ok(TransportState {
            device_type: self.device.device_type().id(),
            status: self.status,
            device_features_sel: self.device_features_sel,
            driver_features_sel: self.driver_features_sel,
            driver_features: self.driver_features,
            queue_sel: self.queue_sel,
            interrupt_status: self.interrupt_status,
            config_generation: self.config_generation,
            msi: self.msi.clone(),
            activated: self.activated,
            broken: self.broken.clone(),
            queues: self.queues.iter().map(|q| q.state()).collect(),
        })
    }

    /// The device's own state ([`VirtioDevice::save_state`](crate::VirtioDevice::save_state)).
    pub fn save_device(&self) -> Vec<u8> {
        self.device.save_state()
    }

    /// Check `state` against this transport and its device; the queues it would have.
    fn check(&self, state: &TransportState) -> Result<Vec<Queue>, RestoreError> {
        let live = self.device.device_type().id();
        if state.device_type != live {
            return Err(RestoreError::DeviceType {
                saved: state.device_type,
                live,
            });
        }
        if state.queues.len() != self.queues.len() {
            return Err(RestoreError::QueueCount {
                saved: state.queues.len(),
                live: self.queues.len(),
            });
        }
        let offered = self.offered_features();
        if state.driver_features & !offered != 0 {
            return Err(RestoreError::Features {
                saved: state.driver_features,
                offered,
            });
        }
        let on = super::status::DRIVER_OK | super::status::FEATURES_OK;
        if state.activated && state.status & on != on {
            return Err(RestoreError::Status {
                status: state.status,
                activated: state.activated,
            });
        }
        let n = self.queues.len() + 1;
        if state.msi.vectors.len() != n || state.msi.masked.len() != n {
            return Err(RestoreError::MsiVectors {
                vectors: state.msi.vectors.len(),
                masked: state.msi.masked.len(),
                live: n,
            });
        }
        if state.msi.enabled && self.mode != super::IrqMode::Msi {
            return Err(RestoreError::MsiNotOffered);
        }
        let mut out = Vec::with_capacity(self.queues.len());
        for (i, (s, live)) in state.queues.iter().zip(&self.queues).enumerate() {
            if s.max_size != live.max_size() || s.size > s.max_size {
                return Err(RestoreError::QueueSize {
                    queue: i,
                    saved_max: s.max_size,
                    size: s.size,
                    live_max: live.max_size(),
                });
            }
            let q =
                Queue::try_from(*s).map_err(|source| RestoreError::Queue { queue: i, source })?;
            if q.ready() && !q.is_valid(&self.mem) {
                return Err(RestoreError::QueueMemory {
                    queue: i,
                    desc: s.desc_table,
                    avail: s.avail_ring,
                    used: s.used_ring,
                });
            }
            out.push(q);
        }
        Ok(out)
    }

    /// Take back a saved state on this (fresh) transport, with no device bytes; see
    /// [`restore_with_device`](Self::restore_with_device).
    pub fn restore(&mut self, state: &TransportState) -> Result<(), RestoreError> {
        self.restore_with_device(state, &[])
    }

    /// Take back a saved state and the device's bytes on this transport, freshly built (one
    /// the driver has not touched: its routes are not cleared first): checked
    /// first against the live device (its type, its queues, the features it offers, ring
    /// addresses inside guest memory, the MSI vector count); on a mismatch nothing is
    /// changed. Then the MSI routes are programmed again through the [`Interrupt`]
    /// (every programmed, unmasked vector), the device is activated if it was, and each
    /// ready queue is run once (chains the driver made available meanwhile are taken).
    ///
    /// [`Interrupt`]: crate::Interrupt
    pub fn restore_with_device(
        &mut self,
        state: &TransportState,
        device: &[u8],
    ) -> Result<(), RestoreError> {
        let queues = self.check(state)?;
        self.device
            .restore_state(device)
            .map_err(RestoreError::Device)?;
        self.queues = queues;
        self.status = state.status;
        self.device_features_sel = state.device_features_sel;
        self.driver_features_sel = state.driver_features_sel;
        self.driver_features = state.driver_features;
        self.queue_sel = state.queue_sel;
        self.interrupt_status = state.interrupt_status;
        self.config_generation = state.config_generation;
        self.msi = state.msi.clone();
        self.activated = false;
        self.broken = state.broken.clone();
        if self.msi.enabled {
            for v in 0..self.msi.vectors.len() {
                let Some(m) = self.msi.vectors[v] else {
                    continue;
                };
                let route = (!self.msi.masked[v]).then_some(m);
                if let Err(source) = self.irq.msi_route(v as u16, route) {
                    self.fail(format!("MSI vector {v} could not be routed: {source}"));
                    return Err(RestoreError::MsiRoute {
                        vector: v as u16,
                        source,
                    });
                }
            }
        }
        if state.activated {
            if let Err(e) = self.device.activate(self.driver_features) {
                self.fail(crate::error_chain(&e));
                return Err(RestoreError::Activate(e));
            }
            self.activated = true;
            for q in 0..self.queues.len() {
                self.notify(q);
            }
        }
        Ok(())
    }
}
