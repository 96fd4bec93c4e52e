//! The virtio-mmio transport, version 2 (virtio 1.2, section 4.2), with Dragonball's MSI
//! registers. No I/O: the VMM feeds it the guest's register accesses and notifications and
//! gives it an [`Interrupt`] to raise.
//!
//! A register access the spec does not define (an unknown offset, a size other than 4 bytes
//! outside the configuration space and the 16-bit MSI registers) reads as zero and is
//! otherwise ignored, as a real device's bus would. A driver that breaks the protocol
//! (queue addresses outside memory, a queue size that is not a power of two, a malformed
//! chain) gets `DEVICE_NEEDS_RESET` and a configuration interrupt; the reason is logged and
//! kept ([`MmioTransport::broken`]).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;

use crate::device::{DeviceError, Queues, VirtioDevice};
use crate::dirty::DirtyPages;
use crate::interrupt::{Interrupt, MsiMessage};
use crate::state::MsiState;

mod snapshot;
pub use snapshot::{RestoreError, SaveError};

/// "virt".
pub const MAGIC: u32 = 0x7472_6976;
/// Our vendor ID when MSI is not offered ("FLTL").
pub const VENDOR_ID: u32 = 0x4c54_4c46;
/// Dragonball's vendor ID prefix; the low byte carries its extension flags.
pub const DRAGONBALL_VENDOR: u32 = 0xdbfc_db00;
/// Dragonball flag: MSI interrupts are offered.
pub const DRAGONBALL_MSI_INTR: u32 = 0x2;

/// `VIRTIO_F_VERSION_1`.
pub const F_VERSION_1: u64 = 1 << 32;
/// `VIRTIO_RING_F_EVENT_IDX`.
pub const F_EVENT_IDX: u64 = 1 << 29;

/// Register offsets.
pub mod reg {
    /// MagicValue.
    pub const MAGIC: u64 = 0x000;
    /// Version.
    pub const VERSION: u64 = 0x004;
    /// DeviceID.
    pub const DEVICE_ID: u64 = 0x008;
    /// VendorID.
    pub const VENDOR_ID: u64 = 0x00c;
    /// DeviceFeatures.
    pub const DEVICE_FEATURES: u64 = 0x010;
    /// DeviceFeaturesSel.
    pub const DEVICE_FEATURES_SEL: u64 = 0x014;
    /// DriverFeatures.
    pub const DRIVER_FEATURES: u64 = 0x020;
    /// DriverFeaturesSel.
    pub const DRIVER_FEATURES_SEL: u64 = 0x024;
    /// QueueSel.
    pub const QUEUE_SEL: u64 = 0x030;
    /// QueueNumMax.
    pub const QUEUE_NUM_MAX: u64 = 0x034;
    /// QueueNum.
    pub const QUEUE_NUM: u64 = 0x038;
    /// QueueReady.
    pub const QUEUE_READY: u64 = 0x044;
    /// QueueNotify.
    pub const QUEUE_NOTIFY: u64 = 0x050;
    /// InterruptStatus.
    pub const INTERRUPT_STATUS: u64 = 0x060;
    /// InterruptACK.
    pub const INTERRUPT_ACK: u64 = 0x064;
    /// Status.
    pub const STATUS: u64 = 0x070;
    /// QueueDescLow.
    pub const QUEUE_DESC_LOW: u64 = 0x080;
    /// QueueDescHigh.
    pub const QUEUE_DESC_HIGH: u64 = 0x084;
    /// QueueDriverLow (the available ring).
    pub const QUEUE_DRIVER_LOW: u64 = 0x090;
    /// QueueDriverHigh.
    pub const QUEUE_DRIVER_HIGH: u64 = 0x094;
    /// QueueDeviceLow (the used ring).
    pub const QUEUE_DEVICE_LOW: u64 = 0x0a0;
    /// QueueDeviceHigh.
    pub const QUEUE_DEVICE_HIGH: u64 = 0x0a4;
    /// Dragonball: MSI control and status (16 bit). Read: bit 15 = MSI offered. Write: bit
    /// 15 = enable MSI (before `DRIVER_OK` only).
    pub const MSI_CSR: u64 = 0x0c0;
    /// Dragonball: MSI command (16 bit, write): bits 12-15 the command, 0-11 the vector.
    pub const MSI_COMMAND: u64 = 0x0c2;
    /// Dragonball: MSI address, low 32 bits.
    pub const MSI_ADDRESS_LOW: u64 = 0x0c4;
    /// Dragonball: MSI address, high 32 bits.
    pub const MSI_ADDRESS_HIGH: u64 = 0x0c8;
    /// Dragonball: MSI data.
    pub const MSI_DATA: u64 = 0x0cc;
    /// ConfigGeneration.
    pub const CONFIG_GENERATION: u64 = 0x0fc;
    /// Start of the device's configuration space.
    pub const CONFIG: u64 = 0x100;
}

/// `MSI_CSR` bit 15.
pub const MSI_CSR_ENABLE: u16 = 0x8000;
/// `MSI_COMMAND`: program the vector from the address and data registers.
pub const MSI_CMD_UPDATE: u16 = 0x1000;
/// `MSI_COMMAND`: mask the vector.
pub const MSI_CMD_MASK: u16 = 0x2000;
/// `MSI_COMMAND`: unmask the vector.
pub const MSI_CMD_UNMASK: u16 = 0x3000;

/// Device status bits.
pub mod status {
    /// ACKNOWLEDGE.
    pub const ACKNOWLEDGE: u32 = 1;
    /// DRIVER.
    pub const DRIVER: u32 = 2;
    /// DRIVER_OK.
    pub const DRIVER_OK: u32 = 4;
    /// FEATURES_OK.
    pub const FEATURES_OK: u32 = 8;
    /// DEVICE_NEEDS_RESET.
    pub const NEEDS_RESET: u32 = 0x40;
    /// FAILED.
    pub const FAILED: u32 = 0x80;
}

/// InterruptStatus: a used buffer.
pub const INT_VRING: u32 = 1;
/// InterruptStatus: the configuration changed (or the device needs a reset).
pub const INT_CONFIG: u32 = 2;

/// How a device interrupts the driver.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum IrqMode {
    /// A line: InterruptStatus and InterruptACK.
    #[default]
    Legacy,
    /// MSI offered (Dragonball's registers); the driver still chooses.
    Msi,
}

/// What a register write asks of the VMM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteAction {
    /// Nothing more.
    None,
    /// The driver notified queue `q` through a trapped write (no ioeventfd): run it.
    Notify(u16),
}

/// Counters the VMM and the benchmark read.
#[derive(Debug, Default)]
pub struct TransportStats {
    /// Register reads that reached the transport (each one a VM exit to userspace).
    pub reads: AtomicU64,
    /// Register writes that reached it.
    pub writes: AtomicU64,
    /// Legacy interrupts raised.
    pub legacy_irqs: AtomicU64,
    /// MSIs raised.
    pub msi_irqs: AtomicU64,
    /// Chains completed.
    pub completed: AtomicU64,
}

/// A virtio device on the MMIO transport.
pub struct MmioTransport {
    device: Box<dyn VirtioDevice>,
    mem: GuestMemoryMmap,
    irq: Arc<dyn Interrupt>,
    mode: IrqMode,
    queues: Vec<Queue>,
    queue_sel: u32,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    status: u32,
    interrupt_status: u32,
    config_generation: u32,
    msi: MsiState,
    activated: bool,
    broken: Option<String>,
    stats: Arc<TransportStats>,
    dirty: Option<Arc<DirtyPages>>,
    frozen: bool,
}

impl std::fmt::Debug for MmioTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MmioTransport")
            .field("device", &self.device.device_type())
            .field("status", &self.status)
            .finish_non_exhaustive()
    }
}

fn lo(v: u64) -> u32 {
    v as u32
}

fn hi(v: u64) -> u32 {
    (v >> 32) as u32
}

impl MmioTransport {
    /// `device` on the transport, over guest memory `mem`, interrupting through `irq`.
    pub fn new(
        device: Box<dyn VirtioDevice>,
        mem: GuestMemoryMmap,
        irq: Arc<dyn Interrupt>,
        mode: IrqMode,
    ) -> Self {
        let queues = device
            .queue_max_sizes()
            .into_iter()
            .map(|m| Queue::new(m).unwrap_or_else(|_| Queue::new(256).expect("256 is valid")))
            .collect::<Vec<_>>();
        let n = queues.len() + 1;
        MmioTransport {
            device,
            mem,
            irq,
            mode,
            queues,
            queue_sel: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            status: 0,
            interrupt_status: 0,
            config_generation: 0,
            msi: MsiState {
                vectors: vec![None; n],
                masked: vec![false; n],
                ..MsiState::default()
            },
            activated: false,
            broken: None,
            stats: Arc::default(),
            dirty: None,
            frozen: false,
        }
    }

    /// Mark the guest pages this device writes in `dirty` while its tracking is on (a live
    /// migration's rounds; see [`crate::dirty`]).
    pub fn set_dirty_log(&mut self, dirty: Arc<DirtyPages>) {
        self.dirty = Some(dirty);
    }

    /// Stop touching guest memory and the backend: until [`thaw`](Self::thaw) notifies
    /// and backend events are left where they are (a snapshot or a migration's switchover
    /// takes the device's state and the guest's memory meanwhile). Requests are handled
    /// whole under the transport's lock, so none is half done once this returns.
    pub fn freeze(&mut self) {
        self.frozen = true;
    }

    /// Whether the device is frozen.
    pub fn frozen(&self) -> bool {
        self.frozen
    }

    /// Go on after [`freeze`](Self::freeze). A notify that came meanwhile was consumed
    /// without a run: the caller runs every queue once, on the device's thread
    /// ([`Worker::thaw`](crate::Worker::thaw) does), not on its own (guest memory may not be
    /// there yet for the caller: an incoming post-copy migration's).
    pub fn thaw(&mut self) {
        self.frozen = false;
    }

    /// The counters.
    pub fn stats(&self) -> Arc<TransportStats> {
        self.stats.clone()
    }

    /// The device's type.
    pub fn device_type(&self) -> crate::DeviceType {
        self.device.device_type()
    }

    /// Number of queues.
    pub fn num_queues(&self) -> usize {
        self.queues.len()
    }

    /// The device status register.
    pub fn status(&self) -> u32 {
        self.status
    }

    /// Why the device needs a reset, if it does.
    pub fn broken(&self) -> Option<&str> {
        self.broken.as_deref()
    }

    /// Whether the driver set `DRIVER_OK` and the device is working.
    pub fn active(&self) -> bool {
        self.activated && self.broken.is_none()
    }

    /// Whether the driver turned MSI on.
    pub fn msi_enabled(&self) -> bool {
        self.msi.enabled
    }

    fn offered_features(&self) -> u64 {
        self.device.features() | F_VERSION_1 | F_EVENT_IDX
    }

    /// A guest read of `data.len()` bytes at `offset` into the device's window.
    pub fn read(&mut self, offset: u64, data: &mut [u8]) {
        self.stats.reads.fetch_add(1, Ordering::Relaxed);
        data.fill(0);
        if offset >= reg::CONFIG {
            let config = self.device.config();
            let start = (offset - reg::CONFIG) as usize;
            for (i, b) in data.iter_mut().enumerate() {
                *b = config.get(start + i).copied().unwrap_or(0);
            }
            return;
        }
        if data.len() == 2 && offset == reg::MSI_CSR {
            let v = if self.mode == IrqMode::Msi {
                MSI_CSR_ENABLE
            } else {
                0
            };
            data.copy_from_slice(&v.to_le_bytes());
            return;
        }
        if data.len() != 4 {
            return;
        }
        let q = self.queues.get(self.queue_sel as usize);
        let v: u32 = match offset {
            reg::MAGIC => MAGIC,
            reg::VERSION => 2,
            reg::DEVICE_ID => self.device.device_type().id(),
            reg::VENDOR_ID => match self.mode {
                IrqMode::Legacy => VENDOR_ID,
                IrqMode::Msi => DRAGONBALL_VENDOR | DRAGONBALL_MSI_INTR,
            },
            reg::DEVICE_FEATURES => match self.device_features_sel {
                0 => lo(self.offered_features()),
                1 => hi(self.offered_features()),
                _ => 0,
            },
            reg::QUEUE_NUM_MAX => q.map_or(0, |q| u32::from(q.max_size())),
            reg::QUEUE_READY => q.map_or(0, |q| u32::from(q.ready())),
            reg::INTERRUPT_STATUS => self.interrupt_status,
            reg::STATUS => self.status,
            reg::CONFIG_GENERATION => self.config_generation,
            reg::QUEUE_DESC_LOW => q.map_or(0, |q| lo(q.desc_table())),
            reg::QUEUE_DESC_HIGH => q.map_or(0, |q| hi(q.desc_table())),
            reg::QUEUE_DRIVER_LOW => q.map_or(0, |q| lo(q.avail_ring())),
            reg::QUEUE_DRIVER_HIGH => q.map_or(0, |q| hi(q.avail_ring())),
            reg::QUEUE_DEVICE_LOW => q.map_or(0, |q| lo(q.used_ring())),
            reg::QUEUE_DEVICE_HIGH => q.map_or(0, |q| hi(q.used_ring())),
            reg::QUEUE_NUM => q.map_or(0, |q| u32::from(q.size())),
            _ => 0,
        };
        data.copy_from_slice(&v.to_le_bytes());
    }

    /// A guest write of `data` at `offset`.
    pub fn write(&mut self, offset: u64, data: &[u8]) -> WriteAction {
        self.stats.writes.fetch_add(1, Ordering::Relaxed);
        if offset >= reg::CONFIG {
            if self.status & status::DRIVER != 0 {
                self.device.write_config(offset - reg::CONFIG, data);
            }
            return WriteAction::None;
        }
        if data.len() == 2 && (offset == reg::MSI_CSR || offset == reg::MSI_COMMAND) {
            let v = u16::from_le_bytes([data[0], data[1]]);
            if offset == reg::MSI_CSR {
                self.msi_csr(v);
            } else {
                self.msi_command(v);
            }
            return WriteAction::None;
        }
        if data.len() != 4 {
            return WriteAction::None;
        }
        let v = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
        let sel = self.queue_sel as usize;
        // Queue registers may change only before the queue is ready and before DRIVER_OK.
        let queue_writable = self.status & status::DRIVER_OK == 0
            && self.queues.get(sel).is_some_and(|q| !q.ready());
        match offset {
            reg::DEVICE_FEATURES_SEL => self.device_features_sel = v,
            reg::DRIVER_FEATURES_SEL => self.driver_features_sel = v,
            reg::DRIVER_FEATURES if self.status & status::FEATURES_OK == 0 => {
                match self.driver_features_sel {
                    0 => {
                        self.driver_features = (self.driver_features & !0xffff_ffff) | u64::from(v)
                    }
                    1 => {
                        self.driver_features =
                            (self.driver_features & 0xffff_ffff) | (u64::from(v) << 32)
                    }
                    _ => {}
                }
            }
            reg::QUEUE_SEL => self.queue_sel = v,
            reg::QUEUE_NUM if queue_writable => {
                let size = u16::try_from(v).unwrap_or(0);
                if let Err(e) = self.queues[sel].try_set_size(size) {
                    self.fail(format!("queue {sel}: size {v}: {e}"));
                }
            }
            reg::QUEUE_READY if self.queues.get(sel).is_some() => {
                if v == 1 && queue_writable {
                    let q = &mut self.queues[sel];
                    q.set_event_idx(self.driver_features & F_EVENT_IDX != 0);
                    q.set_ready(true);
                    if !q.is_valid(&self.mem) {
                        q.set_ready(false);
                        let why = format!(
                            "queue {sel}: size {} or ring addresses (desc {:#x}, avail {:#x}, used {:#x}) are invalid",
                            q.size(),
                            q.desc_table(),
                            q.avail_ring(),
                            q.used_ring()
                        );
                        self.fail(why);
                    }
                } else if v == 0 {
                    self.queues[sel].set_ready(false);
                }
            }
            reg::QUEUE_DESC_LOW if queue_writable => {
                self.queues[sel].set_desc_table_address(Some(v), None)
            }
            reg::QUEUE_DESC_HIGH if queue_writable => {
                self.queues[sel].set_desc_table_address(None, Some(v))
            }
            reg::QUEUE_DRIVER_LOW if queue_writable => {
                self.queues[sel].set_avail_ring_address(Some(v), None)
            }
            reg::QUEUE_DRIVER_HIGH if queue_writable => {
                self.queues[sel].set_avail_ring_address(None, Some(v))
            }
            reg::QUEUE_DEVICE_LOW if queue_writable => {
                self.queues[sel].set_used_ring_address(Some(v), None)
            }
            reg::QUEUE_DEVICE_HIGH if queue_writable => {
                self.queues[sel].set_used_ring_address(None, Some(v))
            }
            reg::QUEUE_NOTIFY if (v as usize) < self.queues.len() => {
                return WriteAction::Notify(v as u16);
            }
            reg::INTERRUPT_ACK => self.interrupt_status &= !v,
            reg::STATUS => self.set_status(v),
            reg::MSI_ADDRESS_LOW => self.msi.address_low = v,
            reg::MSI_ADDRESS_HIGH => self.msi.address_high = v,
            reg::MSI_DATA => self.msi.data = v,
            _ => {}
        }
        WriteAction::None
    }

    fn set_status(&mut self, v: u32) {
        if v == 0 {
            self.reset();
            return;
        }
        let old = self.status;
        // DEVICE_NEEDS_RESET is the device's to set: a driver's write of it is ignored.
        let v = v & !status::NEEDS_RESET;
        let old_driver = old & !status::NEEDS_RESET;
        // The driver may only add bits (2.1.2), and FEATURES_OK only for features we offer.
        if v & old_driver != old_driver {
            return;
        }
        let mut v = v;
        if v & status::FEATURES_OK != 0 && old & status::FEATURES_OK == 0 {
            let extra = self.driver_features & !self.offered_features();
            if extra != 0 || self.driver_features & F_VERSION_1 == 0 {
                v &= !status::FEATURES_OK;
                tracing::warn!(
                    device = self.device.device_type().name(),
                    features = format_args!("{:#x}", self.driver_features),
                    "driver features refused (unknown bits or no VERSION_1)"
                );
            }
        }
        self.status = v | (old & status::NEEDS_RESET);
        if v & status::DRIVER_OK != 0 && old & status::DRIVER_OK == 0 && self.broken.is_none() {
            if v & status::FEATURES_OK == 0 {
                self.fail("DRIVER_OK without FEATURES_OK".to_string());
                return;
            }
            match self.device.activate(self.driver_features) {
                Ok(()) => self.activated = true,
                Err(e) => self.fail(crate::error_chain(&e)),
            }
        }
    }

    fn reset(&mut self) {
        self.device.reset();
        for q in &mut self.queues {
            q.reset();
        }
        if self.msi.enabled {
            for v in 0..self.msi.vectors.len() {
                let _ = self.irq.msi_route(v as u16, None);
            }
        }
        let n = self.queues.len() + 1;
        self.msi = MsiState {
            vectors: vec![None; n],
            masked: vec![false; n],
            ..MsiState::default()
        };
        self.status = 0;
        self.interrupt_status = 0;
        self.driver_features = 0;
        self.queue_sel = 0;
        self.activated = false;
        self.broken = None;
    }

    fn msi_csr(&mut self, v: u16) {
        let enable = v & MSI_CSR_ENABLE != 0;
        if enable == self.msi.enabled {
            return;
        }
        if self.mode != IrqMode::Msi {
            return; // not offered: the bit is read-only zero
        }
        if self.status & status::DRIVER_OK != 0 {
            // Dragonball: switching the interrupt mode of an active device fails it.
            self.status |= status::FAILED;
            self.fail("the driver switched the interrupt mode after DRIVER_OK".into());
            return;
        }
        self.msi.enabled = enable;
    }

    fn msi_command(&mut self, v: u16) {
        let vector = usize::from(v & 0x0fff);
        if vector >= self.msi.vectors.len() {
            return;
        }
        let route = match v & 0xf000 {
            MSI_CMD_UPDATE => {
                let m = MsiMessage {
                    address: u64::from(self.msi.address_low)
                        | (u64::from(self.msi.address_high) << 32),
                    data: self.msi.data,
                };
                self.msi.vectors[vector] = Some(m);
                (!self.msi.masked[vector]).then_some(m)
            }
            MSI_CMD_MASK => {
                self.msi.masked[vector] = true;
                None
            }
            MSI_CMD_UNMASK => {
                self.msi.masked[vector] = false;
                self.msi.vectors[vector]
            }
            _ => return,
        };
        if let Err(e) = self.irq.msi_route(vector as u16, route) {
            self.fail(format!("MSI vector {vector} could not be routed: {e}"));
        }
    }

    /// The device needs a reset: say so to the driver (status bit and a configuration
    /// interrupt) and keep the reason.
    fn fail(&mut self, why: String) {
        tracing::warn!(
            device = self.device.device_type().name(),
            "device needs reset: {why}"
        );
        self.broken = Some(why);
        self.status |= status::NEEDS_RESET;
        self.raise(0);
    }

    /// Raise `vector` (0: configuration, 1 + q: queue q).
    fn raise(&mut self, vector: u16) {
        let r = if self.msi.enabled {
            let v = usize::from(vector);
            if self.msi.vectors.get(v).copied().flatten().is_none() || self.msi.masked[v] {
                return; // not programmed or masked: MSI has no pending bit to keep
            }
            self.stats.msi_irqs.fetch_add(1, Ordering::Relaxed);
            self.irq.msi(vector)
        } else {
            self.interrupt_status |= if vector == 0 { INT_CONFIG } else { INT_VRING };
            self.stats.legacy_irqs.fetch_add(1, Ordering::Relaxed);
            self.irq.legacy()
        };
        if let Err(e) = r {
            tracing::warn!(
                device = self.device.device_type().name(),
                "interrupt could not be raised: {e}"
            );
        }
    }

    fn run<F>(&mut self, f: F)
    where
        F: FnOnce(&mut dyn VirtioDevice, &mut Queues<'_>) -> Result<(), DeviceError>,
    {
        if !self.active() || self.frozen {
            return;
        }
        let mut used = vec![0u32; self.queues.len()];
        let r = {
            let mut qs = Queues::new(
                &self.mem,
                &mut self.queues,
                &mut used,
                self.dirty.as_deref(),
            );
            f(self.device.as_mut(), &mut qs)
        };
        if let Err(e) = r {
            self.fail(crate::error_chain(&e));
            return;
        }
        for (q, u) in used.iter().enumerate() {
            if *u == 0 {
                continue;
            }
            self.stats
                .completed
                .fetch_add(u64::from(*u), Ordering::Relaxed);
            match self.queues[q].needs_notification(&self.mem) {
                Ok(true) if !self.no_interrupt(q) => self.raise(q as u16 + 1),
                Ok(true) => {}
                Ok(false) => {}
                Err(e) => self.fail(format!("queue {q}: used ring: {e}")),
            }
        }
    }

    /// Whether the driver asked queue `q` for no interrupts (`VIRTQ_AVAIL_F_NO_INTERRUPT`,
    /// which `virtio-queue` does not read; without EVENT_IDX only: with it, the used event
    /// index says when).
    fn no_interrupt(&self, q: usize) -> bool {
        use vm_memory::Bytes;
        let queue = &self.queues[q];
        if queue.event_idx_enabled() {
            return false;
        }
        let flags: Result<u16, _> = self
            .mem
            .read_obj(vm_memory::GuestAddress(queue.avail_ring()));
        flags.is_ok_and(|f| f & 1 != 0)
    }

    /// The driver notified queue `q`: let the device take its chains.
    pub fn notify(&mut self, q: usize) {
        if q >= self.queues.len() || !self.queues[q].ready() {
            return;
        }
        self.run(|d, qs| d.process_queue(qs, q));
    }

    /// Poll mode: run every ready queue whose driver made chains available since the
    /// device last looked (no notify needed); returns whether any had some.
    pub fn poll_queues(&mut self) -> bool {
        if !self.active() || self.frozen {
            return false;
        }
        let mut any = false;
        for q in 0..self.queues.len() {
            let queue = &self.queues[q];
            if !queue.ready() {
                continue;
            }
            let avail = queue.avail_idx(&self.mem, std::sync::atomic::Ordering::Acquire);
            if avail.is_ok_and(|a| a.0 != queue.next_avail()) {
                any = true;
                self.notify(q);
            }
        }
        any
    }

    /// Poll mode: tell the driver not to notify (`VIRTQ_USED_F_NO_NOTIFY`, or the avail
    /// event index with EVENT_IDX) while the device polls, or to notify again.
    pub fn suppress_notifies(&mut self, suppress: bool) {
        if !self.active() || self.frozen {
            return;
        }
        for q in 0..self.queues.len() {
            if !self.queues[q].ready() {
                continue;
            }
            if let Some(d) = &self.dirty {
                crate::device::mark_used_ring(d, &self.queues[q]);
            }
            let r = if suppress {
                self.queues[q].disable_notification(&self.mem)
            } else {
                self.queues[q].enable_notification(&self.mem).map(|_| ())
            };
            if let Err(e) = r {
                self.fail(format!("queue {q}: notification flags: {e}"));
                return;
            }
        }
    }

    /// A backend fd the device polls is ready.
    pub fn backend_ready(&mut self, fd: std::os::fd::RawFd) {
        self.run(|d, qs| d.backend_ready(qs, fd));
    }

    /// The fds the device wants polled now.
    pub fn poll_fds(&self) -> Vec<std::os::fd::RawFd> {
        if self.active() && !self.frozen {
            self.device.poll_fds()
        } else {
            Vec::new()
        }
    }

    /// Tell the driver the configuration changed.
    pub fn config_changed(&mut self) {
        self.config_generation = self.config_generation.wrapping_add(1);
        self.raise(0);
    }
}

#[cfg(test)]
mod tests;
