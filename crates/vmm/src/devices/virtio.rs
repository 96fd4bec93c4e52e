//! virtio-mmio devices on the VM's MMIO bus: each device is a `virtio` crate transport with
//! its own worker thread, a 4 KiB window at [`VIRTIO_BASE`] + 4 KiB × index, and KVM doing
//! the fast paths:
//!
//! - **notify**: every queue's `QueueNotify` write (offset 0x50, data = queue index) is a KVM
//!   ioeventfd with that datamatch: the worker thread is woken with no exit to userspace;
//! - **legacy interrupt**: an irqfd on the device's IOAPIC pin ([`VIRTIO_GSI_BASE`] + index,
//!   edge-triggered); the driver then reads `InterruptStatus` and writes `InterruptACK`
//!   (two exits) and EOIs;
//! - **MSI** (Dragonball's registers, when the device offers it and the driver enables it):
//!   one GSI per vector, routed to the message the driver programs, and an irqfd on it; no
//!   status read, no ACK, no IOAPIC: no exit at all for an interrupt.
//!
//! Every other register access exits and is handled here, on the vCPU thread, under the
//! device's lock.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use kvm_ioctls::IoEventAddress;
use serde::Serialize;
use virtio::dirty::DirtyPages;
use virtio::mmio::{IrqMode, TransportStats, reg};
use virtio::{Interrupt, MmioTransport, MsiMessage, VirtioDevice, Worker, WriteAction};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

pub use crate::config::{VirtioSpec, derived_mac};
use crate::memory::GuestMem;
use crate::vstate::irq::{self, Interrupts};

/// Where the first device's window starts (below the PCI BAR window, above guest memory).
pub const VIRTIO_BASE: u64 = 0xd000_0000;
/// Each device's window.
pub const VIRTIO_STRIDE: u64 = 0x1000;
/// Most virtio devices.
pub const MAX_DEVICES: usize = 8;
/// The first device's IOAPIC pin (pins below 16 are shared with the legacy PIC; 16..24 are
/// the IOAPIC's own).
pub const VIRTIO_GSI_BASE: u32 = 16;

/// Attaching a virtio device failed.
#[derive(Debug, thiserror::Error)]
pub enum VirtioError {
    /// Too many devices.
    #[error("at most {MAX_DEVICES} virtio devices")]
    TooMany,
    /// The backend could not be opened.
    #[error("virtio {kind} device {index}: {what}")]
    Backend {
        /// Device type.
        kind: &'static str,
        /// Index.
        index: usize,
        /// What.
        what: String,
    },
    /// An interrupt route or irqfd.
    #[error("virtio device {index}: interrupts")]
    Irq {
        /// Index.
        index: usize,
        /// Cause.
        #[source]
        source: irq::IrqError,
    },
    /// An eventfd or the worker thread.
    #[error("virtio device {index}: {what}")]
    Host {
        /// Index.
        index: usize,
        /// What.
        what: &'static str,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The worker thread.
    #[error("virtio device {index}: worker")]
    Worker {
        /// Index.
        index: usize,
        /// Cause.
        #[source]
        source: virtio::worker::WorkerError,
    },
    /// A device's saved state was refused (malformed, or not this device's).
    #[error("virtio {kind} device {index}: saved state refused")]
    Restore {
        /// Device type.
        kind: &'static str,
        /// Index.
        index: usize,
        /// Cause.
        #[source]
        source: DeviceStateError,
    },
    /// The saved state names another number of devices.
    #[error("the saved state has {saved} virtio device records, this VM has {live} devices")]
    RecordCount {
        /// Records saved.
        saved: usize,
        /// Devices here.
        live: usize,
    },
    /// A queue's ioeventfd.
    #[error("virtio device {index}: KVM_IOEVENTFD for queue {queue}")]
    Ioeventfd {
        /// Index.
        index: usize,
        /// Queue.
        queue: usize,
        /// Cause.
        #[source]
        source: kvm_ioctls::Error,
    },
}

/// Why one device's record could not be taken or given back.
#[derive(Debug, thiserror::Error)]
pub enum DeviceStateError {
    /// The record is malformed (bad magic, version, CRC, sizes).
    #[error("malformed record")]
    Decode(#[source] virtio::DecodeError),
    /// The record does not fit the device (type, queues, features, disk size, MAC).
    #[error("the record does not fit this device")]
    Restore(#[source] virtio::RestoreError),
    /// The transport's state could not be saved.
    #[error("saving")]
    Save(#[source] virtio::SaveError),
    /// The device's lock is poisoned (its thread panicked).
    #[error("the device's lock is poisoned")]
    Poisoned,
}

/// A device's interrupts through KVM: an irqfd on its pin, an irqfd per MSI vector.
struct KvmIrq {
    irq: Arc<Interrupts>,
    legacy: EventFd,
    msi_gsi: u32,
    msi: Vec<EventFd>,
}

impl Interrupt for KvmIrq {
    fn legacy(&self) -> std::io::Result<()> {
        self.legacy.write(1)
    }

    fn msi(&self, vector: u16) -> std::io::Result<()> {
        match self.msi.get(usize::from(vector)) {
            Some(e) => e.write(1),
            None => Ok(()),
        }
    }

    fn msi_route(&self, vector: u16, message: Option<MsiMessage>) -> std::io::Result<()> {
        // A masked vector keeps its route; the transport does not fire it.
        let Some(m) = message else { return Ok(()) };
        if usize::from(vector) >= self.msi.len() {
            return Ok(());
        }
        self.irq
            .set_msi_route(
                self.msi_gsi + u32::from(vector),
                irq::MsiMessage {
                    address: m.address,
                    data: m.data,
                },
            )
            .map_err(std::io::Error::other)
    }
}

/// What the VMM reports of one device.
#[derive(Debug, Clone, Serialize)]
pub struct VirtioDeviceStats {
    /// Index on the bus.
    pub index: usize,
    /// Type.
    pub kind: &'static str,
    /// Guest-physical address of its window.
    pub base: u64,
    /// IOAPIC pin of its legacy interrupt.
    pub gsi: u32,
    /// Whether the driver enabled MSI.
    pub msi: bool,
    /// Register reads that exited to the VMM.
    pub reads: u64,
    /// Register writes that exited to the VMM.
    pub writes: u64,
    /// Legacy interrupts raised.
    pub legacy_irqs: u64,
    /// MSIs raised.
    pub msi_irqs: u64,
    /// Requests completed.
    pub completed: u64,
    /// Why the device needs a reset, if it does.
    pub needs_reset: Option<String>,
}

struct Slot {
    kind: &'static str,
    worker: Worker,
    stats: Arc<TransportStats>,
}

/// The virtio-mmio devices of a VM.
pub struct VirtioBus {
    slots: Vec<Slot>,
    dirty: Arc<DirtyPages>,
}

impl std::fmt::Debug for VirtioBus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VirtioBus")
            .field("devices", &self.slots.len())
            .finish()
    }
}

fn open(spec: &VirtioSpec, index: usize) -> Result<Box<dyn VirtioDevice>, VirtioError> {
    let kind = spec.kind();
    let fail = |what: String| VirtioError::Backend { kind, index, what };
    Ok(match spec {
        VirtioSpec::Block {
            path,
            read_only,
            direct,
        } => {
            let file = virtio::blk::FileBackend::open_with(path, *read_only, *direct)
                .map_err(|e| fail(format!("{}: {}", path.display(), virtio::error_chain(&e))))?;
            Box::new(virtio::blk::Block::new(Box::new(file)))
        }
        VirtioSpec::Net { tap, mac } => {
            let backend = virtio::net::Tap::open(tap)
                .map_err(|e| fail(format!("tap {tap}: {}", virtio::error_chain(&e))))?;
            let mac = mac.unwrap_or_else(|| derived_mac(tap));
            Box::new(virtio::net::Net::new(Box::new(backend), mac))
        }
        VirtioSpec::Vsock { cid, uds } => Box::new(
            virtio::vsock::Vsock::new(*cid, uds)
                .map_err(|e| fail(format!("{}: {}", uds.display(), virtio::error_chain(&e))))?,
        ),
        VirtioSpec::Rng => Box::new(virtio::rng::Rng::new()),
    })
}

impl VirtioBus {
    /// Open every device of `specs`, wire its interrupts (`mode`) and notifies through KVM,
    /// start its worker.
    pub fn new(
        irq: Arc<Interrupts>,
        guest: &GuestMem,
        specs: &[VirtioSpec],
        mode: IrqMode,
        poll: std::time::Duration,
    ) -> Result<VirtioBus, VirtioError> {
        if specs.len() > MAX_DEVICES {
            return Err(VirtioError::TooMany);
        }
        let mut slots = Vec::new();
        let mem = guest.mem();
        let dirty = Arc::new(DirtyPages::new(guest.size()));
        for (index, spec) in specs.iter().enumerate() {
            let device = open(spec, index)?;
            let nq = device.queue_max_sizes().len();
            let host = |what: &'static str| {
                move |source: std::io::Error| VirtioError::Host {
                    index,
                    what,
                    source,
                }
            };
            let irq_err = |source| VirtioError::Irq { index, source };
            let legacy = EventFd::new(EFD_NONBLOCK).map_err(host("legacy eventfd"))?;
            let gsi = VIRTIO_GSI_BASE + index as u32;
            irq.register_irqfd(&legacy, gsi).map_err(irq_err)?;
            let msi_gsi = irq.allocate_msi_gsis(nq as u32 + 1).map_err(irq_err)?;
            let mut msi = Vec::new();
            for v in 0..=nq as u32 {
                let e = EventFd::new(EFD_NONBLOCK).map_err(host("MSI eventfd"))?;
                irq.register_irqfd(&e, msi_gsi + v).map_err(irq_err)?;
                msi.push(e);
            }
            let kirq = Arc::new(KvmIrq {
                irq: irq.clone(),
                legacy,
                msi_gsi,
                msi,
            });
            let mut transport = MmioTransport::new(device, mem.clone(), kirq, mode);
            transport.set_dirty_log(dirty.clone());
            let stats = transport.stats();
            let name = format!("virtio-{}{index}", spec.kind());
            let worker = Worker::spawn_polling(transport, name, poll)
                .map_err(|source| VirtioError::Worker { index, source })?;
            let base = VIRTIO_BASE + VIRTIO_STRIDE * index as u64;
            for q in 0..nq {
                let Some(fd) = worker.notify_fd(q) else {
                    continue;
                };
                irq.vm()
                    .register_ioevent(
                        fd,
                        &IoEventAddress::Mmio(base + reg::QUEUE_NOTIFY),
                        q as u32,
                    )
                    .map_err(|source| VirtioError::Ioeventfd {
                        index,
                        queue: q,
                        source,
                    })?;
            }
            slots.push(Slot {
                kind: spec.kind(),
                worker,
                stats,
            });
        }
        Ok(VirtioBus { slots, dirty })
    }

    /// The pages the devices write while its tracking is on (a migration's rounds).
    pub fn dirty(&self) -> &Arc<DirtyPages> {
        &self.dirty
    }

    /// Stop every device (see [`MmioTransport::freeze`]): after this, no device touches
    /// guest memory or its backend until [`thaw`](Self::thaw). The vCPUs must be paused.
    pub fn freeze(&self) {
        for s in &self.slots {
            if let Ok(mut t) = s.worker.transport().lock() {
                t.freeze();
            }
        }
    }

    /// Let every device go on (each runs its queues once and polls its backend again).
    pub fn thaw(&self) {
        for s in &self.slots {
            s.worker.thaw();
        }
    }

    /// Every device's record ([`virtio::state`]: transport, queues, interrupts, the device's
    /// own bytes), in bus order. The devices should be frozen, or the records may be out
    /// of date as soon as they are taken.
    pub fn save(&self) -> Result<Vec<Vec<u8>>, VirtioError> {
        self.slots
            .iter()
            .enumerate()
            .map(|(index, s)| {
                let fail = |source| VirtioError::Restore {
                    kind: s.kind,
                    index,
                    source,
                };
                let t = s
                    .worker
                    .transport()
                    .lock()
                    .map_err(|_| fail(DeviceStateError::Poisoned))?;
                let state = t.save().map_err(|e| fail(DeviceStateError::Save(e)))?;
                Ok(virtio::encode(&state, &t.save_device()))
            })
            .collect()
    }

    /// Give every device its record back (a freshly built bus, before the vCPUs run): all
    /// are decoded and checked first; one that does not fit refuses the lot. The devices
    /// stay frozen, touching neither guest memory nor their backends, until
    /// [`thaw`](Self::thaw) (when the vCPUs start): an incoming post-copy migration's memory
    /// is not there before that.
    pub fn restore(&self, records: &[Vec<u8>]) -> Result<(), VirtioError> {
        if records.len() != self.slots.len() {
            return Err(VirtioError::RecordCount {
                saved: records.len(),
                live: self.slots.len(),
            });
        }
        let decoded = records
            .iter()
            .zip(&self.slots)
            .enumerate()
            .map(|(index, (r, s))| {
                virtio::decode(r).map_err(|e| VirtioError::Restore {
                    kind: s.kind,
                    index,
                    source: DeviceStateError::Decode(e),
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        for (index, ((state, bytes), s)) in decoded.iter().zip(&self.slots).enumerate() {
            let fail = |source| VirtioError::Restore {
                kind: s.kind,
                index,
                source,
            };
            let mut t = s
                .worker
                .transport()
                .lock()
                .map_err(|_| fail(DeviceStateError::Poisoned))?;
            t.freeze();
            t.restore_with_device(state, bytes)
                .map_err(|e| fail(DeviceStateError::Restore(e)))?;
        }
        Ok(())
    }

    /// Whether `addr` is in a device's window.
    pub fn claims(&self, addr: u64) -> bool {
        addr >= VIRTIO_BASE && addr < VIRTIO_BASE + VIRTIO_STRIDE * self.slots.len() as u64
    }

    /// A guest MMIO access; returns whether a device took it.
    pub fn mmio(&self, addr: u64, data: &mut [u8], write: bool) -> bool {
        if !self.claims(addr) {
            return false;
        }
        let i = ((addr - VIRTIO_BASE) / VIRTIO_STRIDE) as usize;
        let off = (addr - VIRTIO_BASE) % VIRTIO_STRIDE;
        let slot = &self.slots[i];
        let Ok(mut t) = slot.worker.transport().lock() else {
            data.fill(0);
            return true;
        };
        if write {
            let action = t.write(off, data);
            drop(t);
            match action {
                WriteAction::Notify(q) => slot.worker.notify(usize::from(q)),
                WriteAction::None if off == reg::STATUS => slot.worker.resync(),
                WriteAction::None => {}
            }
        } else {
            t.read(off, data);
        }
        true
    }

    /// Number of devices.
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// Each device's counters.
    pub fn stats(&self) -> Vec<VirtioDeviceStats> {
        self.slots
            .iter()
            .enumerate()
            .map(|(index, s)| {
                let (msi, needs_reset) = s
                    .worker
                    .transport()
                    .lock()
                    .map(|t| (t.msi_enabled(), t.broken().map(str::to_string)))
                    .unwrap_or((false, Some("lock poisoned".into())));
                VirtioDeviceStats {
                    index,
                    kind: s.kind,
                    base: VIRTIO_BASE + VIRTIO_STRIDE * index as u64,
                    gsi: VIRTIO_GSI_BASE + index as u32,
                    msi,
                    reads: s.stats.reads.load(Ordering::Relaxed),
                    writes: s.stats.writes.load(Ordering::Relaxed),
                    legacy_irqs: s.stats.legacy_irqs.load(Ordering::Relaxed),
                    msi_irqs: s.stats.msi_irqs.load(Ordering::Relaxed),
                    completed: s.stats.completed.load(Ordering::Relaxed),
                    needs_reset,
                }
            })
            .collect()
    }

    /// Linux's command-line entries for the devices (`virtio_mmio.device=4K@BASE:IRQ`).
    pub fn linux_cmdline(n: usize) -> String {
        (0..n)
            .map(|i| {
                format!(
                    "virtio_mmio.device=4K@{:#x}:{}",
                    VIRTIO_BASE + VIRTIO_STRIDE * i as u64,
                    VIRTIO_GSI_BASE + i as u32
                )
            })
            .collect::<Vec<_>>()
            .join(" ")
    }
}
