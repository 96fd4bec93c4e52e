//! Describing a device and bringing it up: [`DeviceDescription`] -> [`RealizedDevice`] ->
//! [`AttachedDevice`].

use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex, RwLock};

use pci::{Bar, ConfigBuilder, ConfigError, Ids, MsixTable};

use super::bar::{BarMemory, BarSpec, BarState};
use super::dma::DmaTable;
use super::irq::IrqState;
use super::migration::Migration;
use super::{DeviceContext, DeviceOps, Inner, IrqStats, ServeError, Server};
use crate::proto::MigState;

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
            owner: Mutex::new(None),
        };
        Ok(RealizedDevice {
            ctx: DeviceContext(Arc::new(inner)),
        })
    }
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
