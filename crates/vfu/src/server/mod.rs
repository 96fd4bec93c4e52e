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

mod dma;
mod event;
mod session;

pub use dma::{DmaError, MapError};
pub use event::{ServeError, Server, ShutdownHandle};

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};

use pci::{Bar, ConfigBuilder, ConfigChange, ConfigError, ConfigSpace, Ids, MsixTable};
use vmm_sys_util::eventfd::EventFd;

use crate::proto::{
    DMA_READ, DMA_WRITE, IRQ_ERR, IRQ_INTX, IRQ_MSI, IRQ_MSIX, IRQ_REQ, MigState,
    PCI_CONFIG_REGION, PCI_NUM_IRQS,
};

use dma::{DmaTable, Piece};

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

/// What a device author implements. Callbacks may run on several threads at once (one per
/// client being served), so devices keep their state behind their own locks.
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

/// A BAR as described.
#[derive(Debug, Clone)]
pub(crate) struct BarSpec {
    pub(crate) bar: Bar,
    /// Areas backed by the BAR's memfd, mappable by the client.
    pub(crate) mmap_areas: Vec<(u64, u64)>,
}

/// An ioeventfd the client may register for a BAR offset.
#[derive(Debug, Clone, Copy)]
pub(crate) struct IoEventSpec {
    pub(crate) bar: u32,
    pub(crate) offset: u64,
    pub(crate) size: u64,
    pub(crate) datamatch: Option<u64>,
}

/// A bad description.
#[derive(Debug, thiserror::Error)]
pub enum RealizeError {
    /// Config space description.
    #[error("config space")]
    Config(#[source] ConfigError),
    /// An mmap area outside its BAR or not page-aligned.
    #[error("BAR {bar}: mmap area {offset:#x}+{size:#x} must be page-aligned and inside the BAR")]
    MmapArea {
        /// BAR.
        bar: usize,
        /// Offset.
        offset: u64,
        /// Size.
        size: u64,
    },
    /// An ioeventfd outside a BAR.
    #[error("ioeventfd at BAR {bar} offset {offset:#x} is outside the BAR")]
    IoEvent {
        /// BAR.
        bar: u32,
        /// Offset.
        offset: u64,
    },
    /// Creating the BAR's memfd or mapping it failed.
    #[error("BAR {bar} memory")]
    Memory {
        /// BAR.
        bar: usize,
        /// errno.
        #[source]
        source: std::io::Error,
    },
}

/// A device description: IDs, BARs, capabilities, interrupts.
pub struct DeviceDescription {
    name: String,
    config: ConfigBuilder,
    bars: [Option<BarSpec>; 6],
    config_err: Option<ConfigError>,
    intx: bool,
    msi: u32,
    msix: u32,
    ioevents: Vec<IoEventSpec>,
    device_stream: bool,
    dma_without_bus_master: bool,
}

impl DeviceDescription {
    /// A PCI function called `name` with these IDs.
    pub fn new(name: &str, ids: Ids) -> DeviceDescription {
        DeviceDescription {
            name: name.to_string(),
            config: ConfigBuilder::new(ids),
            bars: Default::default(),
            config_err: None,
            intx: false,
            msi: 0,
            msix: 0,
            ioevents: Vec::new(),
            device_stream: false,
            dma_without_bus_master: false,
        }
    }

    /// The device produces and consumes the whole migration data stream itself, through
    /// [`DeviceOps::migration_read`] and [`DeviceOps::migration_write`], as libvfio-user's
    /// devices do (and the framework adds nothing: config space and MSI-X are then the
    /// client's to restore). Without it the stream is the framework's versioned blob
    /// (config space, MSI-X, and [`DeviceOps::save`]).
    pub fn device_migration_stream(mut self) -> DeviceDescription {
        self.device_stream = true;
        self
    }

    /// Allow DMA while the command register's Bus Master bit is clear. A real PCI function
    /// must not master the bus then, and by default the framework refuses; libvfio-user does
    /// not check the bit and its clients never set it, so a device that must work with them
    /// opts out here.
    pub fn dma_without_bus_master(mut self) -> DeviceDescription {
        self.dma_without_bus_master = true;
        self
    }

    fn apply(
        mut self,
        f: impl FnOnce(ConfigBuilder) -> Result<ConfigBuilder, ConfigError>,
    ) -> DeviceDescription {
        if self.config_err.is_none() {
            match f(self.config.clone()) {
                Ok(c) => self.config = c,
                Err(e) => self.config_err = Some(e),
            }
        }
        self
    }

    /// BAR `index`; `mmap_areas` (offset, size) are backed by a memfd the client may map
    /// (the rest of the BAR goes to [`DeviceOps`] callbacks).
    pub fn bar(mut self, index: usize, bar: Bar, mmap_areas: &[(u64, u64)]) -> DeviceDescription {
        if index < 6 {
            self.bars[index] = Some(BarSpec {
                bar,
                mmap_areas: mmap_areas.to_vec(),
            });
        }
        self.apply(|c| c.bar(index, bar))
    }

    /// INTx (pin A).
    pub fn intx(mut self) -> DeviceDescription {
        self.intx = true;
        self.config = self.config.intx_pin(1);
        self
    }

    /// A Power Management capability.
    pub fn pm(mut self) -> DeviceDescription {
        self.config = self.config.pm();
        self
    }

    /// MSI with `vectors` vectors.
    pub fn msi(mut self, vectors: u32, maskable: bool) -> DeviceDescription {
        self.msi = vectors;
        self.apply(|c| c.msi(vectors, maskable))
    }

    /// MSI-X with `vectors` vectors, table and PBA at (BAR, offset).
    pub fn msix(mut self, vectors: u32, table: (u8, u32), pba: (u8, u32)) -> DeviceDescription {
        self.msix = vectors;
        self.apply(|c| c.msix(vectors, table, pba))
    }

    /// The PCI Express capability (4 KiB config space).
    pub fn pcie(mut self) -> DeviceDescription {
        self.config = self.config.pcie();
        self
    }

    /// An extended capability.
    pub fn ext_cap(mut self, id: u16, version: u8, body: Vec<u8>) -> DeviceDescription {
        self.config = self.config.ext_cap(id, version, body);
        self
    }

    /// Offer an ioeventfd for writes of `size` bytes at `offset` of BAR `bar` (through
    /// `GET_REGION_IO_FDS`): a client such as a VMM registers it with KVM, so the guest's
    /// write reaches the device with no exit; the framework turns a signal into a
    /// `region_write` of `datamatch` (or zeros).
    pub fn ioeventfd(
        mut self,
        bar: u32,
        offset: u64,
        size: u64,
        datamatch: Option<u64>,
    ) -> DeviceDescription {
        self.ioevents.push(IoEventSpec {
            bar,
            offset,
            size,
            datamatch,
        });
        self
    }

    /// Build config space, BAR memory and interrupt state.
    pub fn realize(self, ops: Arc<dyn DeviceOps>) -> Result<RealizedDevice, RealizeError> {
        if let Some(e) = self.config_err {
            return Err(RealizeError::Config(e));
        }
        let config = self.config.build().map_err(RealizeError::Config)?;
        let page = 4096u64;
        let mut bars: [Option<BarState>; 6] = Default::default();
        for (i, spec) in self.bars.iter().enumerate() {
            let Some(spec) = spec else { continue };
            for &(o, s) in &spec.mmap_areas {
                if o % page != 0
                    || s % page != 0
                    || s == 0
                    || o.checked_add(s).is_none_or(|e| e > spec.bar.size)
                {
                    return Err(RealizeError::MmapArea {
                        bar: i,
                        offset: o,
                        size: s,
                    });
                }
            }
            let memory = if spec.mmap_areas.is_empty() {
                None
            } else {
                Some(
                    BarMemory::new(&self.name, spec.bar.size)
                        .map_err(|source| RealizeError::Memory { bar: i, source })?,
                )
            };
            bars[i] = Some(BarState {
                spec: spec.clone(),
                memory,
            });
        }
        for io in &self.ioevents {
            let ok = bars
                .get(io.bar as usize)
                .and_then(|b| b.as_ref())
                .is_some_and(|b| {
                    io.offset
                        .checked_add(io.size)
                        .is_some_and(|e| e <= b.spec.bar.size)
                });
            if !ok {
                return Err(RealizeError::IoEvent {
                    bar: io.bar,
                    offset: io.offset,
                });
            }
        }
        let counts = [
            u32::from(self.intx),
            self.msi,
            self.msix,
            1, // ERR
            1, // REQ
        ];
        let irqs = IrqState {
            fds: counts
                .iter()
                .map(|&n| (0..n).map(|_| None).collect())
                .collect(),
            intx_masked: false,
            intx_level: false,
            msi_pending: 0,
            deferred: Vec::new(),
        };
        let msix = MsixTable::new(self.msix.max(1));
        let inner = Inner {
            name: self.name,
            ops,
            config: Mutex::new(config),
            msix: Mutex::new(msix),
            irq: Mutex::new(irqs),
            irq_counts: counts,
            dma: RwLock::new(DmaTable::default()),
            bars,
            ioevents: self.ioevents,
            device_stream: self.device_stream,
            dma_without_bus_master: self.dma_without_bus_master,
            mig: Mutex::new(Migration {
                state: MigState::Running,
                out: Vec::new(),
                out_pos: 0,
                incoming: Vec::new(),
            }),
            running: AtomicBool::new(true),
            stats: IrqStats::default(),
        };
        Ok(RealizedDevice {
            ctx: DeviceContext(Arc::new(inner)),
        })
    }
}

/// A BAR's memfd-backed memory (for its mmap areas).
pub struct BarMemory {
    fd: OwnedFd,
    addr: usize,
    size: u64,
}

// SAFETY: the mapping is process-wide memory accessed only through volatile copies.
unsafe impl Send for BarMemory {}
// SAFETY: as above; concurrent access is byte-wise racy by nature, like device memory.
unsafe impl Sync for BarMemory {}

impl BarMemory {
    fn new(name: &str, size: u64) -> std::io::Result<BarMemory> {
        let cname = std::ffi::CString::new(format!("vfu-{name}")).unwrap_or_default();
        // SAFETY: memfd_create with a valid NUL-terminated name.
        let fd = unsafe { libc::memfd_create(cname.as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: `fd` is a new descriptor nobody else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: ftruncate on our own memfd.
        if unsafe { libc::ftruncate(fd.as_raw_fd(), size as libc::off_t) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: a new shared mapping of our memfd, `size` bytes.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                size as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        Ok(BarMemory {
            fd,
            addr: p as usize,
            size,
        })
    }

    /// The memfd (sent to clients with the region info).
    pub fn fd(&self) -> &OwnedFd {
        &self.fd
    }

    /// Copy out of the BAR memory (false if out of range).
    pub fn read(&self, offset: u64, data: &mut [u8]) -> bool {
        if offset
            .checked_add(data.len() as u64)
            .is_none_or(|e| e > self.size)
        {
            return false;
        }
        // SAFETY: in range of the live mapping (checked above); the client may write it
        // concurrently, which makes the bytes racy but not the copy unsound for u8 data.
        unsafe {
            std::ptr::copy_nonoverlapping(
                (self.addr + offset as usize) as *const u8,
                data.as_mut_ptr(),
                data.len(),
            )
        };
        true
    }

    /// Copy into the BAR memory (false if out of range).
    pub fn write(&self, offset: u64, data: &[u8]) -> bool {
        if offset
            .checked_add(data.len() as u64)
            .is_none_or(|e| e > self.size)
        {
            return false;
        }
        // SAFETY: in range of the live, writable mapping (checked above).
        unsafe {
            std::ptr::copy_nonoverlapping(
                data.as_ptr(),
                (self.addr + offset as usize) as *mut u8,
                data.len(),
            )
        };
        true
    }
}

impl Drop for BarMemory {
    fn drop(&mut self) {
        // SAFETY: our own mapping of `size` bytes; no references into it outlive `self`.
        unsafe { libc::munmap(self.addr as *mut libc::c_void, self.size as usize) };
    }
}

pub(crate) struct BarState {
    pub(crate) spec: BarSpec,
    pub(crate) memory: Option<BarMemory>,
}

struct IrqState {
    /// Per IRQ index, per vector: the client's eventfd and the session that set it.
    fds: Vec<Vec<Option<(EventFd, u64)>>>,
    intx_masked: bool,
    intx_level: bool,
    msi_pending: u32,
    /// Vectors triggered while the device was stopped.
    deferred: Vec<u32>,
}

struct Migration {
    state: MigState,
    out: Vec<u8>,
    out_pos: usize,
    incoming: Vec<u8>,
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
}

/// A device with config space and interrupt state, not yet reachable by clients.
pub struct RealizedDevice {
    ctx: DeviceContext,
}

impl RealizedDevice {
    /// The device's handle.
    pub fn context(&self) -> &DeviceContext {
        &self.ctx
    }

    /// Listen at `path` (removed first if it is a stale socket) and serve clients from
    /// `server`'s loop.
    pub fn attach(
        self,
        server: &Server,
        path: &std::path::Path,
    ) -> Result<AttachedDevice, ServeError> {
        server.add_device(self.ctx.clone(), path)?;
        Ok(AttachedDevice {
            ctx: self.ctx,
            path: path.to_path_buf(),
        })
    }
}

/// A device clients can reach.
pub struct AttachedDevice {
    ctx: DeviceContext,
    path: std::path::PathBuf,
}

impl AttachedDevice {
    /// The device's handle.
    pub fn context(&self) -> &DeviceContext {
        &self.ctx
    }

    /// The socket path.
    pub fn path(&self) -> &std::path::Path {
        &self.path
    }
}

/// How an interrupt went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    /// An eventfd was signalled.
    Signalled,
    /// Latched as pending (masked, no eventfd, device stopped).
    Pending,
    /// No interrupt mode is enabled (MSI-X, MSI and INTx all off); dropped.
    Dropped,
}

/// Which interrupt mode the guest enabled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Msix { function_masked: bool },
    Msi { vectors: u32, mask: u32 },
    Intx,
    None,
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

    fn mode(&self) -> Mode {
        let cfg = lock(&self.0.config);
        if let Some((true, fm)) = cfg.msix_control() {
            return Mode::Msix {
                function_masked: fm,
            };
        }
        if let Some(m) = cfg.msi_state().filter(|m| m.enabled) {
            return Mode::Msi {
                vectors: m.vectors,
                mask: m.mask,
            };
        }
        if self.0.irq_counts[0] > 0 && cfg.command() & pci::CMD_INTX_DISABLE == 0 {
            return Mode::Intx;
        }
        Mode::None
    }

    fn signal(&self, irq: &IrqState, index: u32, vector: u32) -> bool {
        match irq
            .fds
            .get(index as usize)
            .and_then(|v| v.get(vector as usize))
        {
            Some(Some((fd, _))) => {
                let _ = fd.write(1);
                self.0.stats.signalled.fetch_add(1, Ordering::Relaxed);
                true
            }
            _ => false,
        }
    }

    /// Raise interrupt `vector` in whichever mode the guest enabled (MSI-X, else MSI, else
    /// INTx, where vector is ignored). Thread-safe; never blocks on I/O.
    pub fn trigger(&self, vector: u32) -> Delivery {
        let st = &self.0.stats;
        st.triggered.fetch_add(1, Ordering::Relaxed);
        let mode = self.mode();
        if !self.0.running.load(Ordering::Acquire) {
            if mode != Mode::None {
                lock(&self.0.irq).deferred.push(vector);
                st.latched.fetch_add(1, Ordering::Relaxed);
                return Delivery::Pending;
            }
            return Delivery::Dropped;
        }
        match mode {
            Mode::Msix { function_masked } => {
                let mut t = lock(&self.0.msix);
                let Some(e) = t.entry(vector).filter(|_| vector < self.0.irq_counts[2]) else {
                    return Delivery::Dropped;
                };
                let irq = lock(&self.0.irq);
                if function_masked || e.masked || !self.signal(&irq, IRQ_MSIX, vector) {
                    t.set_pending(vector, true);
                    st.latched.fetch_add(1, Ordering::Relaxed);
                    return Delivery::Pending;
                }
                Delivery::Signalled
            }
            Mode::Msi { vectors, mask } => {
                if vector >= vectors {
                    return Delivery::Dropped;
                }
                let mut irq = lock(&self.0.irq);
                if mask & (1 << vector) != 0 || !self.signal(&irq, IRQ_MSI, vector) {
                    irq.msi_pending |= 1 << vector;
                    let p = irq.msi_pending;
                    drop(irq);
                    lock(&self.0.config).set_msi_pending(p);
                    st.latched.fetch_add(1, Ordering::Relaxed);
                    return Delivery::Pending;
                }
                Delivery::Signalled
            }
            Mode::Intx => self.set_intx(true),
            Mode::None => Delivery::Dropped,
        }
    }

    /// Assert or deassert INTx (level-triggered). Asserting signals the INTx eventfd unless
    /// the line is masked (it automasks until the client unmasks).
    pub fn set_intx(&self, level: bool) -> Delivery {
        if self.0.irq_counts[0] == 0 {
            return Delivery::Dropped;
        }
        // The status bit follows the line; the command register's INTx Disable keeps the
        // function from signalling it (clearing that bit re-asserts, see `config_access`).
        let disabled = {
            let mut cfg = lock(&self.0.config);
            cfg.set_intx_status(level);
            cfg.command() & pci::CMD_INTX_DISABLE != 0
        };
        let mut irq = lock(&self.0.irq);
        irq.intx_level = level;
        if !level {
            return Delivery::Dropped;
        }
        if irq.intx_masked || disabled || !self.signal(&irq, IRQ_INTX, 0) {
            self.0.stats.latched.fetch_add(1, Ordering::Relaxed);
            return Delivery::Pending;
        }
        irq.intx_masked = true;
        Delivery::Signalled
    }

    /// Deliver MSI-X vectors that are pending and now unmasked.
    fn release_msix(&self) {
        let Some((true, false)) = lock(&self.0.config).msix_control() else {
            return;
        };
        let mut t = lock(&self.0.msix);
        let irq = lock(&self.0.irq);
        for v in 0..self.0.irq_counts[2] {
            if t.is_pending(v)
                && t.entry(v).is_some_and(|e| !e.masked)
                && self.signal(&irq, IRQ_MSIX, v)
            {
                t.set_pending(v, false);
                self.0.stats.released.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    fn release_msi(&self) {
        let Some(m) = lock(&self.0.config).msi_state().filter(|m| m.enabled) else {
            return;
        };
        let mut irq = lock(&self.0.irq);
        for v in 0..m.vectors {
            if irq.msi_pending & (1 << v) != 0
                && m.mask & (1 << v) == 0
                && self.signal(&irq, IRQ_MSI, v)
            {
                irq.msi_pending &= !(1 << v);
                self.0.stats.released.fetch_add(1, Ordering::Relaxed);
            }
        }
        let p = irq.msi_pending;
        drop(irq);
        lock(&self.0.config).set_msi_pending(p);
    }

    fn release_deferred(&self) {
        let d = std::mem::take(&mut lock(&self.0.irq).deferred);
        for v in d {
            if self.trigger(v) == Delivery::Signalled {
                self.0.stats.released.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

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
                    // SAFETY: `translate` checked that `host..host+n` lies inside a live
                    // mapping, kept alive by the read lock held for the whole copy.
                    Piece::Host(host) => unsafe {
                        std::ptr::copy_nonoverlapping(
                            host as *const u8,
                            dst.as_mut_ptr(),
                            dst.len(),
                        )
                    },
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
                    // SAFETY: `translate` checked the range is inside a live writable
                    // mapping, kept alive by the read lock.
                    Piece::Host(host) => unsafe {
                        std::ptr::copy_nonoverlapping(src.as_ptr(), host as *mut u8, src.len())
                    },
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

    // ---- framework side, used by sessions ----

    pub(crate) fn config_access(
        &self,
        offset: u64,
        data: &mut [u8],
        write: bool,
    ) -> Result<(), DeviceError> {
        let inval = |e: ConfigError| DeviceError::invalid(e.to_string());
        if !write {
            return lock(&self.0.config)
                .read(offset as usize, data)
                .map_err(inval);
        }
        let change = lock(&self.0.config)
            .write(offset as usize, data)
            .map_err(inval)?;
        if change.msix {
            self.release_msix();
        }
        if change.msi {
            self.release_msi();
        }
        if let Some((old, new)) = change.command
            && old & pci::CMD_INTX_DISABLE != 0
            && new & pci::CMD_INTX_DISABLE == 0
        {
            let level = lock(&self.0.irq).intx_level;
            if level {
                self.set_intx(true);
            }
        }
        if change != ConfigChange::default() {
            self.0.ops.config_notice(self, change);
        }
        Ok(())
    }

    /// A client's access to region `region` (config space, a BAR).
    pub(crate) fn region_access(
        &self,
        region: u32,
        offset: u64,
        data: &mut [u8],
        write: bool,
    ) -> Result<(), DeviceError> {
        if region == PCI_CONFIG_REGION {
            return self.config_access(offset, data, write);
        }
        let bar = self
            .0
            .bars
            .get(region as usize)
            .and_then(|b| b.as_ref())
            .ok_or_else(|| DeviceError::invalid(format!("region {region} does not exist")))?;
        let len = data.len() as u64;
        if offset
            .checked_add(len)
            .is_none_or(|e| e > bar.spec.bar.size)
        {
            return Err(DeviceError::invalid(format!(
                "access {offset:#x}+{len:#x} outside region {region} ({:#x} bytes)",
                bar.spec.bar.size
            )));
        }
        let inside = |o: u64, s: u64| offset >= o && offset + len <= o + s;
        let overlaps = |o: u64, s: u64| offset < o + s && o < offset + len;
        let cap = lock(&self.0.config).msix_cap();
        if let Some(m) = cap {
            for (is_table, b, o, s) in [
                (true, m.table_bar, m.table_offset, m.table_len()),
                (false, m.pba_bar, m.pba_offset, m.pba_len()),
            ] {
                let o = u64::from(o);
                if u32::from(b) != region || !overlaps(o, s) {
                    continue;
                }
                if !inside(o, s) {
                    return Err(DeviceError::invalid("access straddles the MSI-X structure"));
                }
                let rel = offset - o;
                if is_table {
                    if write {
                        let unmasked = lock(&self.0.msix).write_table(rel, data);
                        if !unmasked.is_empty() {
                            self.release_msix();
                        }
                    } else {
                        lock(&self.0.msix).read_table(rel, data);
                    }
                } else if !write {
                    lock(&self.0.msix).read_pba(rel, data);
                }
                return Ok(());
            }
        }
        let Some(mem) = &bar.memory else {
            return self.bar_callback(region, offset, data, write);
        };
        // Split at mmap-area edges: area bytes live in the BAR's memory, the rest goes to the
        // device (an access may cover both, as libvfio-user's client's 12 KiB BAR1 write does).
        let mut at = offset;
        let end = offset + len;
        while at < end {
            let area = bar
                .spec
                .mmap_areas
                .iter()
                .find(|&&(o, s)| at >= o && at < o + s)
                .copied();
            let (next, in_area) = match area {
                Some((o, s)) => ((o + s).min(end), true),
                None => {
                    let next_area = bar
                        .spec
                        .mmap_areas
                        .iter()
                        .map(|&(o, _)| o)
                        .filter(|&o| o > at)
                        .min()
                        .unwrap_or(end);
                    (next_area.min(end), false)
                }
            };
            let piece = &mut data[(at - offset) as usize..(next - offset) as usize];
            if in_area {
                let ok = if write {
                    mem.write(at, piece)
                } else {
                    mem.read(at, piece)
                };
                debug_assert!(ok, "checked against the BAR size");
            } else {
                self.bar_callback(region, at, piece, write)?;
            }
            at = next;
        }
        Ok(())
    }

    fn bar_callback(
        &self,
        region: u32,
        offset: u64,
        data: &mut [u8],
        write: bool,
    ) -> Result<(), DeviceError> {
        if write {
            self.0.ops.region_write(self, region, offset, data)
        } else {
            self.0.ops.region_read(self, region, offset, data)
        }
    }

    pub(crate) fn irq_count(&self, index: u32) -> Option<u32> {
        self.0.irq_counts.get(index as usize).copied()
    }

    /// SET_IRQS with eventfds: install (`Some`) or remove (`None`, fd -1) per vector.
    pub(crate) fn set_irq_fds(
        &self,
        index: u32,
        start: u32,
        fds: Vec<Option<EventFd>>,
        owner: u64,
    ) -> Result<(), DeviceError> {
        let mut irq = lock(&self.0.irq);
        let slots = irq
            .fds
            .get_mut(index as usize)
            .ok_or_else(|| DeviceError::invalid(format!("IRQ index {index}")))?;
        if start as usize + fds.len() > slots.len() {
            return Err(DeviceError::invalid(format!(
                "vectors {start}+{} beyond the {} of IRQ index {index}",
                fds.len(),
                slots.len()
            )));
        }
        for (i, fd) in fds.into_iter().enumerate() {
            slots[start as usize + i] = fd.map(|f| (f, owner));
        }
        drop(irq);
        match index {
            IRQ_MSIX => self.release_msix(),
            IRQ_MSI => self.release_msi(),
            _ => {}
        }
        Ok(())
    }

    /// SET_IRQS with DATA_NONE and count 0: disable the index.
    pub(crate) fn clear_irq_fds(&self, index: u32) {
        if let Some(v) = lock(&self.0.irq).fds.get_mut(index as usize) {
            v.iter_mut().for_each(|s| *s = None);
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

    /// SET_IRQS mask/unmask/trigger on `start..start+count`.
    pub(crate) fn irq_action(
        &self,
        index: u32,
        start: u32,
        count: u32,
        action: u32,
        bools: Option<&[u8]>,
    ) -> Result<(), DeviceError> {
        use crate::proto::{IRQ_SET_ACTION_MASK, IRQ_SET_ACTION_TRIGGER, IRQ_SET_ACTION_UNMASK};
        let n = self.irq_count(index).unwrap_or(0);
        if u64::from(start) + u64::from(count) > u64::from(n) {
            return Err(DeviceError::invalid(format!(
                "vectors {start}+{count} beyond the {n} of IRQ index {index}"
            )));
        }
        let on = |i: u32| bools.is_none_or(|b| b.get(i as usize).copied().unwrap_or(0) != 0);
        for i in 0..count {
            if !on(i) {
                continue;
            }
            let v = start + i;
            match (action, index) {
                (IRQ_SET_ACTION_MASK, IRQ_INTX) => lock(&self.0.irq).intx_masked = true,
                (IRQ_SET_ACTION_UNMASK, IRQ_INTX) => {
                    let level = {
                        let mut irq = lock(&self.0.irq);
                        irq.intx_masked = false;
                        irq.intx_level
                    };
                    if level {
                        self.set_intx(true);
                    }
                }
                (IRQ_SET_ACTION_MASK, IRQ_MSIX) => {
                    lock(&self.0.msix).set_masked(v, true);
                }
                (IRQ_SET_ACTION_UNMASK, IRQ_MSIX) => {
                    lock(&self.0.msix).set_masked(v, false);
                    self.release_msix();
                }
                (IRQ_SET_ACTION_TRIGGER, IRQ_INTX) => {
                    self.set_intx(true);
                }
                (IRQ_SET_ACTION_TRIGGER, _) => {
                    let irq = lock(&self.0.irq);
                    self.signal(&irq, index, v);
                }
                _ => {
                    return Err(DeviceError {
                        errno: libc::ENOTSUP,
                        msg: format!("action {action:#x} on IRQ index {index}"),
                    });
                }
            }
        }
        Ok(())
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

    /// IRQ info flags for `index`.
    pub(crate) fn irq_flags(index: u32) -> u32 {
        use crate::proto::{
            IRQ_INFO_AUTOMASKED, IRQ_INFO_EVENTFD, IRQ_INFO_MASKABLE, IRQ_INFO_NORESIZE,
        };
        match index {
            IRQ_INTX => IRQ_INFO_EVENTFD | IRQ_INFO_MASKABLE | IRQ_INFO_AUTOMASKED,
            IRQ_MSI => IRQ_INFO_EVENTFD | IRQ_INFO_NORESIZE,
            IRQ_MSIX => IRQ_INFO_EVENTFD | IRQ_INFO_MASKABLE | IRQ_INFO_NORESIZE,
            IRQ_ERR | IRQ_REQ => IRQ_INFO_EVENTFD,
            _ => 0,
        }
    }

    // ---- migration v2 ----

    /// Walk the state machine to `to`, one arc at a time, along libvfio-user's (and VFIO's)
    /// next-state table: RUNNING -> STOP_COPY goes through STOP, PRE_COPY -> STOP through
    /// RUNNING, and so on. P2P states are not offered.
    pub(crate) fn set_migration_state(&self, to: MigState) -> Result<(), DeviceError> {
        use MigState::*;
        let bad =
            |from: MigState| DeviceError::invalid(format!("no transition {from:?} -> {to:?}"));
        if !matches!(to, Running | Stop | StopCopy | Resuming | PreCopy) {
            return Err(DeviceError {
                errno: libc::ENOTSUP,
                msg: format!("state {to:?} (P2P states are not offered)"),
            });
        }
        loop {
            let from = lock(&self.0.mig).state;
            if from == to {
                return Ok(());
            }
            let step = match (from, to) {
                (Error, _) => return Err(bad(from)),
                (Stop, PreCopy) => Running,
                (Stop, t) => t,
                (Running, PreCopy) => PreCopy,
                (Running, _) => Stop,
                (PreCopy, StopCopy) => StopCopy,
                (PreCopy, _) => Running,
                (StopCopy, PreCopy) => return Err(bad(from)),
                (StopCopy | Resuming, _) => Stop,
                _ => return Err(bad(from)),
            };
            let r = self
                .migration_step(from, step)
                .and_then(|()| self.0.ops.migration_transition(self, step));
            if let Err(e) = r {
                lock(&self.0.mig).state = Error;
                return Err(e);
            }
            lock(&self.0.mig).state = step;
        }
    }

    fn migration_step(&self, from: MigState, to: MigState) -> Result<(), DeviceError> {
        use MigState::*;
        let framework = !self.0.device_stream;
        match (from, to) {
            (Running, Stop) => self.0.running.store(false, Ordering::Release),
            (Stop, Running) => {
                self.0.running.store(true, Ordering::Release);
                self.release_deferred();
            }
            // PRE_COPY: the device keeps running; in framework mode it has no early data.
            (Running, PreCopy) | (PreCopy, Running) => {}
            (Stop | PreCopy, StopCopy) => {
                self.0.running.store(false, Ordering::Release);
                if framework {
                    let blob = self.save_all()?;
                    let mut m = lock(&self.0.mig);
                    m.out = blob;
                    m.out_pos = 0;
                }
            }
            (StopCopy, Stop) => lock(&self.0.mig).out.clear(),
            (Stop, Resuming) => lock(&self.0.mig).incoming.clear(),
            (Resuming, Stop) => {
                if framework {
                    let data = std::mem::take(&mut lock(&self.0.mig).incoming);
                    self.load_all(&data)?;
                }
            }
            _ => return Err(DeviceError::invalid(format!("{from:?} -> {to:?}"))),
        }
        Ok(())
    }

    pub(crate) fn mig_data_read(&self, max: usize) -> Result<Vec<u8>, DeviceError> {
        let state = lock(&self.0.mig).state;
        if !matches!(state, MigState::StopCopy | MigState::PreCopy) {
            return Err(DeviceError::invalid(format!(
                "MIG_DATA_READ in state {state:?}"
            )));
        }
        if self.0.device_stream {
            let mut buf = vec![0u8; max];
            let n = self.0.ops.migration_read(self, &mut buf)?;
            if n > max {
                return Err(DeviceError {
                    errno: libc::EIO,
                    msg: format!("the device returned {n} bytes of state for {max}"),
                });
            }
            buf.truncate(n);
            return Ok(buf);
        }
        let mut m = lock(&self.0.mig);
        if m.state == MigState::PreCopy {
            return Ok(Vec::new());
        }
        let n = (m.out.len() - m.out_pos).min(max);
        let v = m.out[m.out_pos..m.out_pos + n].to_vec();
        m.out_pos += n;
        Ok(v)
    }

    /// Returns how many bytes were taken.
    pub(crate) fn mig_data_write(&self, data: &[u8]) -> Result<usize, DeviceError> {
        let state = lock(&self.0.mig).state;
        if state != MigState::Resuming {
            return Err(DeviceError::invalid(format!(
                "MIG_DATA_WRITE in state {state:?}"
            )));
        }
        if self.0.device_stream {
            let n = self.0.ops.migration_write(self, data)?;
            return Ok(n.min(data.len()));
        }
        let mut m = lock(&self.0.mig);
        if m.incoming.len() + data.len() > 64 << 20 {
            return Err(DeviceError {
                errno: libc::EFBIG,
                msg: "more than 64 MiB of device state".into(),
            });
        }
        m.incoming.extend_from_slice(data);
        Ok(data.len())
    }

    /// Device state: `"VFUS"`, version 1, then length-prefixed config space, MSI-X table
    /// words, MSI-X PBA bits, and the device's own blob.
    fn save_all(&self) -> Result<Vec<u8>, DeviceError> {
        let cfg = self.config_bytes();
        let (table, pba) = {
            let t = lock(&self.0.msix);
            let mut table = vec![0u8; t.vectors() as usize * 16];
            t.read_table(0, &mut table);
            let mut pba = vec![0u8; (t.vectors() as usize).div_ceil(64) * 8];
            t.read_pba(0, &mut pba);
            (table, pba)
        };
        let dev = self.0.ops.save(self)?;
        let mut out = b"VFUS".to_vec();
        out.extend(1u32.to_le_bytes());
        for part in [&cfg, &table, &pba, &dev] {
            out.extend((part.len() as u32).to_le_bytes());
            out.extend_from_slice(part);
        }
        Ok(out)
    }

    fn load_all(&self, data: &[u8]) -> Result<(), DeviceError> {
        let bad = |what: &str| DeviceError::invalid(format!("device state: {what}"));
        if data.len() < 8 || &data[..4] != b"VFUS" {
            return Err(bad("no VFUS magic"));
        }
        let ver = u32::from_le_bytes(data[4..8].try_into().expect("4 bytes"));
        if ver != 1 {
            return Err(bad(&format!("version {ver}, this build reads 1")));
        }
        let mut parts = Vec::new();
        let mut at = 8usize;
        for _ in 0..4 {
            let n = data
                .get(at..at + 4)
                .map(|b| u32::from_le_bytes(b.try_into().expect("4 bytes")) as usize)
                .ok_or_else(|| bad("truncated"))?;
            let p = data
                .get(at + 4..at + 4 + n)
                .ok_or_else(|| bad("truncated"))?;
            parts.push(p);
            at += 4 + n;
        }
        let (cfg, table, pba) = (parts[0], parts[1], parts[2]);
        {
            let mut c = lock(&self.0.config);
            if cfg.len() != c.len() {
                return Err(bad(&format!(
                    "config space of {} bytes, this device has {}",
                    cfg.len(),
                    c.len()
                )));
            }
            let mut t = lock(&self.0.msix);
            if table.len() != t.vectors() as usize * 16 {
                return Err(bad("MSI-X table size differs"));
            }
            // Restore through the write masks, so read-only fields stay this device's.
            c.reset();
            let _ = c.write(4, &cfg[4..6]);
            let _ = c.write(0x0c, &cfg[0x0c..0x40]);
            let _ = c.write(0x40, &cfg[0x40..]);
            t.write_table(0, table);
            for v in 0..t.vectors() {
                let on = pba
                    .get(v as usize / 8)
                    .is_some_and(|b| b & (1 << (v % 8)) != 0);
                t.set_pending(v, on);
            }
        }
        self.0.ops.load(self, parts[3])
    }
}

/// Number of IRQ indexes a PCI device reports.
pub(crate) const NUM_IRQS: u32 = PCI_NUM_IRQS;
