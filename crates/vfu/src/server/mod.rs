//! The device framework (server side).
//!
//! Lifecycle, in types:
//!
//! ```text
//! DeviceDescription --realize(ops)--> RealizedDevice --attach(&Server, path)--> AttachedDevice
//!   (IDs, BARs,                        (config space,                    (listening; clients
//!    capabilities)                      IRQ and DMA state;                 served by the
//!                                       usable without a socket)           Server's loop)
//! ```
//!
//! The author implements [`DeviceOps`] (region access, reset, state save/load) and gets a
//! [`DeviceContext`]: a cheap, cloneable, thread-safe handle to trigger interrupts
//! ([`DeviceContext::trigger`]) and do DMA ([`DeviceContext::dma_read`],
//! [`DeviceContext::dma_write`]) from any thread. The framework owns config space (BAR
//! sizing, command register, capability lists), the MSI-X table and PBA, MSI and MSI-X
//! masking and pending bits, INTx automasking, the DMA table, ioeventfds, and the migration
//! v2 state machine.
//!
//! Interrupts go to the eventfds the client set with `SET_IRQS`. A vector with no eventfd, a
//! masked vector or a stopped device latches the interrupt as pending (PBA, MSI pending bits,
//! INTx status) and it is delivered when unmasked or resumed. The current vfio-user
//! specification has no interrupt message (earlier drafts' `VM_INTERRUPT` was dropped), so
//! a client that wants interrupts gives eventfds.
//!
//! Files: this one holds the device's handle ([`DeviceContext`]) and what a device author
//! implements ([`DeviceOps`]); `description` the lifecycle types, `bar` BAR memory,
//! `region` client region access, `irq` interrupts, `dma` the DMA table and `dma_access`
//! DMA from the device's side, `sigbus` the guard of mappings of unsealed client fds,
//! `migration` the v2 state machine and stream, `session` one client's connection and
//! `event` the serving loop.
//!
//! One client per device, and the bounds on what a client controls: see the crate docs.

mod bar;
mod description;
mod dma;
mod dma_access;
mod event;
mod irq;
mod migration;
mod region;
mod session;
mod sigbus;

pub use bar::BarMemory;
pub(crate) use bar::BarState;
pub(crate) use description::IoEventSpec;
pub use description::{AttachedDevice, DeviceDescription, RealizeError, RealizedDevice};
pub use dma::{DmaError, LogError, MapError};
pub use event::{MAX_CONNECTIONS, ServeError, Server, ShutdownHandle};
pub use irq::Delivery;
pub use sigbus::GuardError;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};

use pci::{ConfigChange, ConfigSpace, MsixTable};

use crate::proto::{MigState, PCI_NUM_IRQS};

use dma::DmaTable;
use irq::IrqState;
use migration::Migration;

/// An error a device callback returns; its errno goes back to the client.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
#[error("{msg} (errno {errno})")]
pub struct DeviceError {
    /// errno for the reply.
    pub errno: i32,
    /// What went wrong.
    pub msg: String,
}

impl DeviceError {
    /// `EINVAL` with a message.
    pub fn invalid(msg: impl Into<String>) -> DeviceError {
        DeviceError {
            errno: libc::EINVAL,
            msg: msg.into(),
        }
    }
}

/// What the client did to the DMA table (a notice; the framework already did the work).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DmaNotice {
    /// `address..address+size` is now mapped.
    Mapped {
        /// Start.
        address: u64,
        /// Size.
        size: u64,
    },
    /// It is gone: the device must not use it any more.
    Unmapped {
        /// Start.
        address: u64,
        /// Size.
        size: u64,
    },
}

/// What a device author implements. Callbacks may run on several threads at once (the
/// client's commands, its ioeventfds, the device's own threads; a device has one client at a
/// time), so devices keep their state behind their own locks.
pub trait DeviceOps: Send + Sync + 'static {
    /// A read of BAR `bar` (0..=5) at `offset`, outside any mmap area and MSI-X structure.
    fn region_read(
        &self,
        dev: &DeviceContext,
        bar: u32,
        offset: u64,
        data: &mut [u8],
    ) -> Result<(), DeviceError>;

    /// A write of BAR `bar` at `offset`, outside any mmap area and MSI-X structure.
    fn region_write(
        &self,
        dev: &DeviceContext,
        bar: u32,
        offset: u64,
        data: &[u8],
    ) -> Result<(), DeviceError>;

    /// Device reset: back to power-on state (the framework resets config space and IRQs).
    fn reset(&self, dev: &DeviceContext) -> Result<(), DeviceError>;

    /// The device's own state for migration (the framework adds config space and MSI-X).
    fn save(&self, dev: &DeviceContext) -> Result<Vec<u8>, DeviceError>;

    /// Load what [`save`](DeviceOps::save) produced on the source.
    fn load(&self, dev: &DeviceContext, state: &[u8]) -> Result<(), DeviceError>;

    /// A DMA mapping came or went. Informational: the framework has already updated its table.
    fn dma_notice(&self, dev: &DeviceContext, notice: DmaNotice) {
        let _ = (dev, notice);
    }

    /// Config space changed (command register, BARs, MSI, MSI-X, PM). Informational.
    fn config_notice(&self, dev: &DeviceContext, change: ConfigChange) {
        let _ = (dev, change);
    }

    /// The migration state machine takes a step to `to` (one arc of the VFIO v2 graph:
    /// RUNNING <-> STOP, RUNNING <-> PRE_COPY, PRE_COPY -> STOP_COPY, STOP <-> STOP_COPY,
    /// STOP <-> RESUMING). An error puts the device in the ERROR state. Default: nothing.
    ///
    /// On the arcs that stop a running device (RUNNING -> STOP, PRE_COPY -> STOP_COPY) this
    /// is called *before* the framework stops it: a device finishes (or holds) the work it
    /// has in flight here, while its DMA still works; after it returns, DMA is refused.
    fn migration_transition(&self, dev: &DeviceContext, to: MigState) -> Result<(), DeviceError> {
        let _ = (dev, to);
        Ok(())
    }

    /// For a device that owns its migration stream
    /// ([`DeviceDescription::device_migration_stream`]): the next bytes of state, in
    /// PRE_COPY (while running) or STOP_COPY. `Ok(0)`: nothing more in this state.
    fn migration_read(&self, dev: &DeviceContext, buf: &mut [u8]) -> Result<usize, DeviceError> {
        let _ = (dev, buf);
        Ok(0)
    }

    /// For a device that owns its migration stream: bytes from the source, in RESUMING, in
    /// order. Returns how many it took.
    fn migration_write(&self, dev: &DeviceContext, data: &[u8]) -> Result<usize, DeviceError> {
        let _ = (dev, data);
        Err(DeviceError::invalid(
            "this device does not take a migration stream",
        ))
    }
}

/// Interrupt counters.
#[derive(Debug, Default)]
pub struct IrqStats {
    /// `trigger` calls.
    pub triggered: AtomicU64,
    /// Eventfd signals sent.
    pub signalled: AtomicU64,
    /// Interrupts latched as pending (masked, no fd, or device stopped).
    pub latched: AtomicU64,
    /// Pending interrupts delivered later.
    pub released: AtomicU64,
}

pub(crate) struct Inner {
    pub(crate) name: String,
    pub(crate) ops: Arc<dyn DeviceOps>,
    config: Mutex<ConfigSpace>,
    msix: Mutex<MsixTable>,
    irq: Mutex<IrqState>,
    pub(crate) irq_counts: [u32; 5],
    pub(crate) dma: RwLock<DmaTable>,
    pub(crate) bars: [Option<BarState>; 6],
    pub(crate) ioevents: Vec<IoEventSpec>,
    device_stream: bool,
    dma_without_bus_master: bool,
    mig: Mutex<Migration>,
    running: AtomicBool,
    stats: IrqStats,
    /// The session that negotiated and owns the device. One client at a time.
    pub(crate) owner: Mutex<Option<u64>>,
}

/// A device's handle: cloneable, usable from any thread.
#[derive(Clone)]
pub struct DeviceContext(pub(crate) Arc<Inner>);

/// A handle that does not keep the device alive: for a device's own threads (a handle
/// stored inside the device would be a reference cycle, and the device would never go).
#[derive(Clone)]
pub struct WeakDeviceContext(std::sync::Weak<Inner>);

impl WeakDeviceContext {
    /// The device, if it still exists.
    pub fn upgrade(&self) -> Option<DeviceContext> {
        self.0.upgrade().map(DeviceContext)
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl DeviceContext {
    /// A handle that does not keep the device alive.
    pub fn downgrade(&self) -> WeakDeviceContext {
        WeakDeviceContext(Arc::downgrade(&self.0))
    }

    /// The device's name.
    pub fn name(&self) -> &str {
        &self.0.name
    }

    /// Interrupt counters.
    pub fn irq_stats(&self) -> &IrqStats {
        &self.0.stats
    }

    /// A copy of config space.
    pub fn config_bytes(&self) -> Vec<u8> {
        lock(&self.0.config).bytes().to_vec()
    }

    /// The memory behind BAR `bar`'s mmap areas.
    pub fn bar_memory(&self, bar: usize) -> Option<&BarMemory> {
        self.0.bars.get(bar)?.as_ref()?.memory.as_ref()
    }

    /// The migration state.
    pub fn migration_state(&self) -> MigState {
        lock(&self.0.mig).state
    }

    /// Make session `id` the device's one client. Another live owner keeps the device
    /// (false), unless its client has hung up, in which case what it installed is removed
    /// now (its own cleanup may come later) and `id` takes over.
    pub(crate) fn claim(&self, id: u64) -> bool {
        let mut owner = lock(&self.0.owner);
        let gone = match *owner {
            None => None,
            Some(cur) if cur == id => return true,
            Some(cur) => {
                let alive = lock(&session::SESSIONS)
                    .get(&cur)
                    .and_then(std::sync::Weak::upgrade)
                    .is_some_and(|s| !s.hung_up());
                if alive {
                    return false;
                }
                Some(cur)
            }
        };
        *owner = Some(id);
        drop(owner);
        if let Some(old) = gone {
            self.forget_session(old);
        }
        true
    }

    /// Whether session `id` owns the device.
    pub(crate) fn owned_by(&self, id: u64) -> bool {
        *lock(&self.0.owner) == Some(id)
    }

    /// Session `id` is gone: the device is free again if it owned it.
    pub(crate) fn release(&self, id: u64) {
        let mut owner = lock(&self.0.owner);
        if *owner == Some(id) {
            *owner = None;
        }
    }

    /// Remove everything a session installed.
    pub(crate) fn forget_session(&self, owner: u64) {
        let mut irq = lock(&self.0.irq);
        for v in irq.fds.iter_mut() {
            for s in v.iter_mut() {
                if s.as_ref().is_some_and(|(_, o)| *o == owner) {
                    *s = None;
                }
            }
        }
        drop(irq);
        let gone = self
            .0
            .dma
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .unmap_all(Some(owner));
        for (address, size) in gone {
            self.0
                .ops
                .dma_notice(self, DmaNotice::Unmapped { address, size });
        }
    }

    /// DEVICE_RESET.
    pub(crate) fn reset(&self) -> Result<(), DeviceError> {
        lock(&self.0.config).reset();
        lock(&self.0.msix).reset();
        {
            let mut irq = lock(&self.0.irq);
            irq.intx_masked = false;
            irq.intx_level = false;
            irq.msi_pending = 0;
            irq.deferred.clear();
        }
        {
            let mut m = lock(&self.0.mig);
            m.state = MigState::Running;
            m.out.clear();
            m.incoming.clear();
        }
        self.0.running.store(true, Ordering::Release);
        self.0.ops.reset(self)
    }
}

/// Number of IRQ indexes a PCI device reports.
pub(crate) const NUM_IRQS: u32 = PCI_NUM_IRQS;
