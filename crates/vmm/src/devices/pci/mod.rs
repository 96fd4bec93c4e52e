//! A PCI bus for vfio-user devices: a host bridge at 00:00.0 and each device at 00:NN.0.
//!
//! - Configuration mechanism #1 on ports 0xCF8 (address) and 0xCFC..0xCFF (data); a device's
//!   config space is its own (read and written through the vfio-user client), the bridge's is
//!   a [`pci::ConfigSpace`].
//! - Memory BARs are placed from [`MMIO_BASE`] up (firmware's job, done before the guest
//!   starts). Guest MMIO to a BAR exits to the VMM and becomes a `REGION_READ` / `WRITE`,
//!   except where the device offers sparse mmap areas: those are mapped from the device's fd
//!   straight into the guest as KVM memory slots, so the guest's accesses never exit.
//! - I/O BARs are placed in port space from [`IO_BASE`] up and reached two ways: with
//!   `in`/`out` on their ports, and through a memory-mapped I/O window at [`IO_WINDOW`]
//!   (port `p` at `IO_WINDOW + p`, as on platforms without port I/O): accesses wider than 4
//!   bytes (libvfio-user's sample server has an 8-byte I/O BAR) go through the window.
//!   Both become `REGION_READ` / `WRITE`.
//! - Guest memory is shared with each device as one DMA mapping of its memfd, or, when it
//!   arrives on demand or cannot be shared, through messages the VMM serves ([`dma`]).
//! - MSI-X: the VMM gives the device one eventfd per vector and registers it as a KVM irqfd
//!   on its own GSI; guest writes to the MSI-X table are forwarded to the device and also
//!   turned into the GSI's MSI route. A device's interrupt reaches the guest's LAPIC with no
//!   VMM thread in the path. Doorbells the device offers as ioeventfds
//!   (`GET_REGION_IO_FDS`) are registered with KVM on the BAR address: those guest writes do
//!   not exit either.

use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kvm_ioctls::{IoEventAddress, NoDatamatch, VmFd};
use serde::Serialize;
use vfu::client::Client;
use vfu::proto;
use vmm_sys_util::eventfd::EventFd;

pub mod dma;
mod state;
pub use dma::DmaBacking;
pub use state::{MAX_STREAM, MAX_VECTORS, PciRecord, PciStateError};

/// Where memory BARs start.
pub const MMIO_BASE: u64 = 0xe000_0000;
/// End of the BAR window (the I/O window, then the IOAPIC and LAPIC, live above).
pub const MMIO_END: u64 = IO_WINDOW;
/// The memory-mapped window onto PCI port space: port `p` at `IO_WINDOW + p`.
pub const IO_WINDOW: u64 = 0xfebf_0000;
/// First port of I/O BARs.
pub const IO_BASE: u64 = 0x4000;
/// End of the ports I/O BARs may take.
pub const IO_END: u64 = 0xf000;
/// First KVM memory slot for BAR mappings.
const BAR_SLOT_BASE: u32 = 8;

/// Attaching a vfio-user device.
#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    /// The client failed.
    #[error("vfio-user device at {path}")]
    Client {
        /// Socket.
        path: PathBuf,
        /// Cause.
        #[source]
        source: vfu::client::ClientError,
    },
    /// Not a PCI device or no config space.
    #[error("vfio-user device at {path}: {what}")]
    Device {
        /// Socket.
        path: PathBuf,
        /// What.
        what: String,
    },
    /// A KVM call failed.
    #[error("{what}")]
    Kvm {
        /// What.
        what: &'static str,
        /// errno.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// mmap of a sparse area failed.
    #[error("mapping a BAR area of {path}")]
    Mmap {
        /// Socket.
        path: PathBuf,
        /// errno.
        #[source]
        source: std::io::Error,
    },
    /// Interrupt routes could not be set up.
    #[error("interrupt routes")]
    Irq(#[source] crate::vstate::irq::IrqError),
    /// Out of BAR space or devices.
    #[error("{0}")]
    NoRoom(String),
}

/// Where the next BAR and memory slot go.
struct Next {
    mmio: u64,
    io: u64,
    slot: u32,
}

#[derive(Debug, Clone, Copy)]
struct BarMap {
    addr: u64,
    size: u64,
}

struct Mapped {
    host: usize,
    size: usize,
}

/// Per-device counters.
#[derive(Debug, Default, Serialize, Clone)]
pub struct DeviceStats {
    /// Socket.
    pub path: String,
    /// Slot on bus 0.
    pub slot: u32,
    /// Vendor and device ID.
    pub id: String,
    /// MMIO exits forwarded as REGION_READ/WRITE.
    pub mmio_exits: u64,
    /// Config-space accesses forwarded.
    pub config_accesses: u64,
    /// MSI-X vectors wired eventfd -> irqfd.
    pub irqfd_vectors: u32,
    /// MSI routes (re)programmed from guest writes to the MSI-X table.
    pub msi_routes_set: u64,
    /// BAR areas mapped into the guest (no exits).
    pub mapped_areas: u32,
    /// Doorbells registered as KVM ioeventfds (no exits).
    pub ioeventfds: u32,
    /// Failed forwards (the device refused or went away).
    pub errors: u64,
    /// The device's `DMA_READ` / `DMA_WRITE` messages served (guest memory given through
    /// messages: see [`dma`]).
    pub dma_messages: u64,
}

struct Dev {
    path: PathBuf,
    slot: u32,
    client: Arc<Client>,
    /// Pages written through DMA messages (`DmaBacking::Messages`), logged by the VMM.
    dma_dirty: Option<Arc<virtio::dirty::DirtyPages>>,
    bars: [Option<BarMap>; 6],
    /// I/O BARs: `addr` is the first port.
    io_bars: [Option<BarMap>; 6],
    msix: Option<pci::MsixCap>,
    /// Shadow of the MSI-X table as the guest wrote it: per vector [lo, hi, data, ctrl].
    table: Mutex<Vec<[u32; 4]>>,
    gsi_base: u32,
    _efds: Vec<EventFd>,
    _mapped: Vec<Mapped>,
    mmio_exits: AtomicU64,
    config_accesses: AtomicU64,
    routes_set: AtomicU64,
    errors: AtomicU64,
    id: u32,
    mapped_areas: u32,
    ioeventfds: u32,
    /// Doorbells registered with KVM: the eventfd, BAR, offset, size, datamatch.
    doorbells: Vec<(EventFd, u32, u64, u32, Option<u64>)>,
    /// The device's migration flags (`None`: it offers no migration).
    mig_flags: Option<u64>,
}

impl Dev {
    /// A guest access to BAR `bar` at `off`, as `REGION_READ` / `WRITE`: counted; a failure
    /// is counted too, and a failed read reads as all ones (as a missing device does).
    fn forward(&self, bar: u32, off: u64, data: &mut [u8], write: bool) {
        self.mmio_exits.fetch_add(1, Ordering::Relaxed);
        let r = if write {
            self.client.region_write(bar, off, data)
        } else {
            self.client.region_read(bar, off, data)
        };
        if r.is_err() {
            self.errors.fetch_add(1, Ordering::Relaxed);
            if !write {
                data.fill(0xff);
            }
        }
    }
}

impl Drop for PciBus {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

impl Drop for Mapped {
    fn drop(&mut self) {
        // SAFETY: our own mapping; the VM (and its slot) is gone before the bus is dropped.
        unsafe { libc::munmap(self.host as *mut libc::c_void, self.size) };
    }
}

/// The bus.
pub struct PciBus {
    address: AtomicU32,
    bridge: Mutex<pci::ConfigSpace>,
    devs: Vec<Dev>,
    vm: Arc<VmFd>,
    irq: Arc<crate::vstate::irq::Interrupts>,
    mem_size: u64,
    /// Tells the threads serving devices' DMA messages to end.
    stop: Arc<std::sync::atomic::AtomicBool>,
    /// The devices were stopped (or given a state) by this VMM and not run again yet.
    frozen: std::sync::atomic::AtomicBool,
}

fn kvm(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> AttachError {
    move |source| AttachError::Kvm { what, source }
}

impl PciBus {
    /// A bus with the host bridge and these vfio-user devices attached: BARs placed, guest
    /// memory (`mem_size` bytes at guest-physical 0) given for DMA as `dma` says, sparse
    /// areas and ioeventfds registered with KVM, MSI-X vectors wired to irqfds (when `irq`
    /// has the in-kernel irqchip).
    pub fn new(
        irq: Arc<crate::vstate::irq::Interrupts>,
        paths: &[PathBuf],
        dma: DmaBacking<'_>,
        mem_size: u64,
    ) -> Result<PciBus, AttachError> {
        let bridge = pci::ConfigBuilder::new(pci::Ids {
            vendor: 0x8086,
            device: 0x29c0, // Q35 host bridge
            subsystem_vendor: 0x1af4,
            subsystem: 0x1100,
            class: 0x060000,
            revision: 0,
        })
        .build()
        .map_err(|e| AttachError::NoRoom(format!("host bridge: {e}")))?;
        let mut bus = PciBus {
            address: AtomicU32::new(0),
            bridge: Mutex::new(bridge),
            devs: Vec::new(),
            vm: irq.vm().clone(),
            irq,
            mem_size,
            stop: Arc::new(std::sync::atomic::AtomicBool::new(false)),
            frozen: std::sync::atomic::AtomicBool::new(false),
        };
        let mut next = Next {
            mmio: MMIO_BASE,
            io: IO_BASE,
            slot: BAR_SLOT_BASE,
        };
        for (i, p) in paths.iter().enumerate() {
            let d = bus.attach(p, i as u32 + 1, &dma, mem_size, &mut next)?;
            if d.dma_dirty.is_some() {
                let (client, stop, name) =
                    (d.client.clone(), bus.stop.clone(), p.display().to_string());
                std::thread::Builder::new()
                    .name("vfio-user-dma".into())
                    .spawn(move || dma::serve(client, stop, name))
                    .map_err(|e| AttachError::NoRoom(format!("a DMA thread: {e}")))?;
            }
            bus.devs.push(d);
        }
        Ok(bus)
    }

    fn attach(
        &self,
        path: &Path,
        slot: u32,
        dma: &DmaBacking<'_>,
        mem_size: u64,
        next: &mut Next,
    ) -> Result<Dev, AttachError> {
        let cerr = |source| AttachError::Client {
            path: path.to_path_buf(),
            source,
        };
        let derr = |what: String| AttachError::Device {
            path: path.to_path_buf(),
            what,
        };
        if slot > 31 {
            return Err(AttachError::NoRoom("more than 31 devices on bus 0".into()));
        }
        let client = Client::connect(path, Duration::from_secs(5)).map_err(cerr)?;
        let info = client.device_info();
        if info.flags & proto::DEVICE_FLAGS_PCI == 0 {
            return Err(derr("not a PCI device".into()));
        }
        let cfg_size = client
            .region(proto::PCI_CONFIG_REGION)
            .map_or(0, |r| r.size);
        if cfg_size < 256 {
            return Err(derr(format!("config region of {cfg_size} bytes")));
        }
        let mut cfg = vec![0u8; 256];
        client.config_read(0, &mut cfg).map_err(cerr)?;
        let id = u32::from_le_bytes(cfg[0..4].try_into().expect("4 bytes"));
        // Place memory BARs.
        let mut bars: [Option<BarMap>; 6] = Default::default();
        let mut io_bars: [Option<BarMap>; 6] = Default::default();
        let mut b = 0usize;
        while b < 6 {
            let size = client.region(b as u32).map_or(0, |r| r.size);
            let raw = u32::from_le_bytes(cfg[0x10 + 4 * b..0x14 + 4 * b].try_into().expect("4"));
            let wide = raw & 0b111 == 0b100;
            if size == 0 {
                b += 1;
                continue; // absent
            }
            if raw & 1 == 1 {
                // An I/O BAR: ports (at least 4, aligned to the size).
                let size = size.max(4);
                if !size.is_power_of_two() || size > IO_END - IO_BASE {
                    return Err(derr(format!("I/O BAR {b}: size {size:#x}")));
                }
                let port = next.io.div_ceil(size) * size;
                if port + size > IO_END {
                    return Err(AttachError::NoRoom(format!(
                        "no port space for I/O BAR {b} ({size:#x} ports) of {}",
                        path.display()
                    )));
                }
                next.io = port + size;
                client
                    .config_write(0x10 + 4 * b as u64, &(port as u32 | 1).to_le_bytes())
                    .map_err(cerr)?;
                io_bars[b] = Some(BarMap { addr: port, size });
                b += 1;
                continue;
            }
            if !size.is_power_of_two() || size > 1 << 30 {
                return Err(derr(format!("BAR {b}: size {size:#x}")));
            }
            let addr = next.mmio.div_ceil(size) * size;
            if addr + size > MMIO_END {
                return Err(AttachError::NoRoom(format!(
                    "no room for BAR {b} ({size:#x} bytes) of {}",
                    path.display()
                )));
            }
            next.mmio = addr + size;
            client
                .config_write(0x10 + 4 * b as u64, &(addr as u32).to_le_bytes())
                .map_err(cerr)?;
            if wide {
                client
                    .config_write(0x14 + 4 * b as u64, &0u32.to_le_bytes())
                    .map_err(cerr)?;
            }
            bars[b] = Some(BarMap { addr, size });
            b += if wide { 2 } else { 1 };
        }
        // Guest memory for DMA.
        let dma_dirty = match dma {
            DmaBacking::Memfd(memfd) => {
                client
                    .dma_map_fd(
                        0,
                        mem_size,
                        memfd.as_raw_fd(),
                        0,
                        proto::DMA_READ | proto::DMA_WRITE,
                    )
                    .map_err(cerr)?;
                None
            }
            DmaBacking::Messages(mem) => {
                let dirty = Arc::new(virtio::dirty::DirtyPages::new(mem_size));
                client
                    .dma_map_local(
                        0,
                        mem_size,
                        proto::DMA_READ | proto::DMA_WRITE,
                        Arc::new(dma::GuestDma {
                            mem: mem.clone(),
                            dirty: dirty.clone(),
                        }),
                    )
                    .map_err(cerr)?;
                Some(dirty)
            }
        };
        // Sparse mmap areas straight into the guest.
        let mut mapped = Vec::new();
        let mut mapped_areas = 0;
        for (bi, bar) in bars.iter().enumerate() {
            let (Some(bar), Some(r)) = (bar, client.region(bi as u32)) else {
                continue;
            };
            let Some(fd) = &r.fd else { continue };
            for &(off, size) in &r.sparse {
                // The client checked these against the region and off_t; checked again here,
                // as the slot's guest address is computed from them.
                let (Some(file_off), Some(gpa), Ok(len)) = (
                    r.mmap_offset
                        .checked_add(off)
                        .and_then(|o| libc::off_t::try_from(o).ok()),
                    bar.addr.checked_add(off).filter(|a| {
                        a.checked_add(size)
                            .is_some_and(|e| e <= bar.addr + bar.size)
                    }),
                    usize::try_from(size),
                ) else {
                    return Err(derr(format!(
                        "BAR {bi}: sparse area {off:#x}+{size:#x} at mmap offset {:#x} lies \
                         outside the BAR or the file",
                        r.mmap_offset
                    )));
                };
                let prot = libc::PROT_READ
                    | if r.flags & proto::REGION_WRITE != 0 {
                        libc::PROT_WRITE
                    } else {
                        0
                    };
                // SAFETY: a new shared mapping of the device's fd, `size` bytes at the offset
                // it gave; used only as guest memory for the slot registered below.
                let p = unsafe {
                    libc::mmap(
                        std::ptr::null_mut(),
                        len,
                        prot,
                        libc::MAP_SHARED,
                        fd.as_raw_fd(),
                        file_off,
                    )
                };
                if p == libc::MAP_FAILED {
                    return Err(AttachError::Mmap {
                        path: path.to_path_buf(),
                        source: std::io::Error::last_os_error(),
                    });
                }
                mapped.push(Mapped {
                    host: p as usize,
                    size: len,
                });
                let region = kvm_bindings::kvm_userspace_memory_region {
                    slot: next.slot,
                    flags: 0,
                    guest_phys_addr: gpa,
                    memory_size: size,
                    userspace_addr: p as u64,
                };
                next.slot += 1;
                // SAFETY: the slot is backed by the mapping above, which lives in `Dev` for
                // as long as the bus (and so the VM it serves) does.
                unsafe { self.vm.set_user_memory_region(region) }
                    .map_err(kvm("KVM_SET_USER_MEMORY_REGION (BAR area)"))?;
                mapped_areas += 1;
            }
        }
        // Doorbells as ioeventfds.
        let mut io_fds = Vec::new();
        for (bi, bar) in bars.iter().enumerate() {
            let Some(bar) = bar else { continue };
            let subs = match client.region_io_fds(bi as u32) {
                Ok(s) => s,
                Err(vfu::client::ClientError::Server { .. }) => continue, // not offered
                Err(e) => return Err(cerr(e)),
            };
            for (sub, fd) in subs {
                // The client checked the access lies inside the region; checked again here
                // (a wrapped address would be an ioeventfd anywhere in the guest).
                if sub.kind != 0 {
                    continue; // not an ioeventfd
                }
                if sub
                    .offset
                    .checked_add(sub.size)
                    .is_none_or(|e| e > bar.size)
                {
                    return Err(derr(format!(
                        "BAR {bi}: ioeventfd at {:#x}+{:#x} outside the BAR",
                        sub.offset, sub.size
                    )));
                }
                // SAFETY: the fd came from the device over SCM_RIGHTS and is ours alone.
                let efd = unsafe {
                    <EventFd as std::os::fd::FromRawFd>::from_raw_fd(
                        std::os::fd::IntoRawFd::into_raw_fd(fd),
                    )
                };
                let addr = IoEventAddress::Mmio(bar.addr + sub.offset);
                let r = if sub.flags & 1 != 0 {
                    match sub.size {
                        4 => self.vm.register_ioevent(&efd, &addr, sub.datamatch as u32),
                        8 => self.vm.register_ioevent(&efd, &addr, sub.datamatch),
                        _ => continue,
                    }
                } else {
                    self.vm.register_ioevent(&efd, &addr, NoDatamatch)
                };
                r.map_err(kvm("KVM_IOEVENTFD"))?;
                // Non-blocking, so that a look for a doorbell the device has not taken yet
                // (at a snapshot's or a migration's pause) never waits.
                // SAFETY: F_GETFL / F_SETFL on a descriptor we own.
                unsafe {
                    let fl = libc::fcntl(efd.as_raw_fd(), libc::F_GETFL);
                    if fl >= 0 {
                        libc::fcntl(efd.as_raw_fd(), libc::F_SETFL, fl | libc::O_NONBLOCK);
                    }
                }
                let datamatch = (sub.flags & 1 != 0).then_some(sub.datamatch);
                io_fds.push((efd, bi as u32, sub.offset, sub.size as u32, datamatch));
            }
        }
        let ioeventfds = io_fds.len() as u32;
        // MSI-X vectors -> eventfds -> irqfds.
        let msix_count = client
            .irqs()
            .get(proto::IRQ_MSIX as usize)
            .map_or(0, |i| i.count);
        let msix = pci::MsixCap::find(&cfg).filter(|_| msix_count > 0 && self.irq.irqchip());
        let mut efds = Vec::new();
        let mut gsi_base = 0;
        if let Some(m) = msix {
            let vectors = m.vectors.min(msix_count);
            gsi_base = self
                .irq
                .allocate_msi_gsis(vectors)
                .map_err(AttachError::Irq)?;
            for v in 0..vectors {
                let e =
                    EventFd::new(libc::EFD_CLOEXEC).map_err(|e| derr(format!("eventfd: {e}")))?;
                self.irq
                    .register_irqfd(&e, gsi_base + v)
                    .map_err(AttachError::Irq)?;
                efds.push(e);
            }
            let raw: Vec<i32> = efds.iter().map(|e| e.as_raw_fd()).collect();
            client
                .set_irq_eventfds(proto::IRQ_MSIX, 0, &raw)
                .map_err(cerr)?;
        }
        let vectors = efds.len();
        let mig_flags = match client.migration_flags() {
            Ok(f) => f,
            Err(vfu::client::ClientError::Server { .. }) => None,
            Err(e) => return Err(cerr(e)),
        };
        Ok(Dev {
            path: path.to_path_buf(),
            slot,
            client: Arc::new(client),
            dma_dirty,
            bars,
            io_bars,
            msix,
            table: Mutex::new(vec![[0, 0, 0, 1]; vectors]),
            gsi_base,
            _efds: efds,
            _mapped: mapped,
            mmio_exits: AtomicU64::new(0),
            config_accesses: AtomicU64::new(0),
            routes_set: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            id,
            mapped_areas,
            ioeventfds,
            doorbells: io_fds,
            mig_flags,
        })
    }

    /// Whether `port` belongs to the bus (configuration mechanism #1, or an I/O BAR).
    pub fn claims_port(&self, port: u16) -> bool {
        (0xcf8..=0xcff).contains(&port) || self.find_io(u64::from(port), 1).is_some()
    }

    fn find_io(&self, port: u64, len: usize) -> Option<(&Dev, u32, u64)> {
        self.devs.iter().find_map(|d| {
            d.io_bars.iter().enumerate().find_map(|(i, b)| {
                let b = (*b)?;
                (port >= b.addr && port + len as u64 <= b.addr + b.size)
                    .then(|| (d, i as u32, port - b.addr))
            })
        })
    }

    /// An access to an I/O BAR at `port` (by `in`/`out`, or through the I/O window).
    fn io_bar(&self, port: u64, data: &mut [u8], write: bool) -> bool {
        let Some((d, bar, off)) = self.find_io(port, data.len()) else {
            return false;
        };
        d.forward(bar, off, data, write);
        true
    }

    fn config(&self, write: bool, port: u16, data: &mut [u8]) {
        let a = self.address.load(Ordering::SeqCst);
        let bus = (a >> 16) & 0xff;
        let dev = (a >> 11) & 0x1f;
        let func = (a >> 8) & 7;
        let reg = u64::from(a & 0xfc) + u64::from(port - 0xcfc);
        if a & 0x8000_0000 == 0 || bus != 0 || func != 0 {
            if !write {
                data.fill(0xff);
            }
            return;
        }
        if dev == 0 {
            let mut b = self.bridge.lock().unwrap_or_else(|e| e.into_inner());
            let r = if write {
                b.write(reg as usize, data).map(|_| ())
            } else {
                b.read(reg as usize, data)
            };
            if r.is_err() && !write {
                data.fill(0xff);
            }
            return;
        }
        let Some(d) = self.devs.iter().find(|d| d.slot == dev) else {
            if !write {
                data.fill(0xff);
            }
            return;
        };
        d.config_accesses.fetch_add(1, Ordering::Relaxed);
        let r = if write {
            d.client.config_write(reg, data)
        } else {
            d.client.config_read(reg, data)
        };
        if r.is_err() {
            d.errors.fetch_add(1, Ordering::Relaxed);
            if !write {
                data.fill(0xff);
            }
        }
    }

    /// A guest `out`.
    pub fn pio_write(&self, port: u16, data: &[u8]) {
        if port == 0xcf8 && data.len() == 4 {
            self.address.store(
                u32::from_le_bytes(data.try_into().expect("4 bytes")),
                Ordering::SeqCst,
            );
        } else if (0xcfc..=0xcff).contains(&port) {
            let mut d = data.to_vec();
            self.config(true, port, &mut d);
        } else {
            let mut d = data.to_vec();
            self.io_bar(u64::from(port), &mut d, true);
        }
    }

    /// A guest `in`.
    pub fn pio_read(&self, port: u16, data: &mut [u8]) {
        if port == 0xcf8 && data.len() == 4 {
            data.copy_from_slice(&self.address.load(Ordering::SeqCst).to_le_bytes());
        } else if (0xcfc..=0xcff).contains(&port) {
            self.config(false, port, data);
        } else if !self.io_bar(u64::from(port), data, false) {
            data.fill(0xff);
        }
    }

    fn find(&self, addr: u64, len: usize) -> Option<(&Dev, u32, u64)> {
        self.devs.iter().find_map(|d| {
            d.bars.iter().enumerate().find_map(|(i, b)| {
                let b = (*b)?;
                // Lazily: the offset exists only once the address is known to be inside.
                (addr >= b.addr && addr + len as u64 <= b.addr + b.size)
                    .then(|| (d, i as u32, addr - b.addr))
            })
        })
    }

    /// A guest MMIO access; false if no BAR is there.
    pub fn mmio(&self, addr: u64, data: &mut [u8], write: bool) -> bool {
        if (IO_WINDOW..IO_WINDOW + 0x1_0000).contains(&addr) {
            return self.io_bar(addr - IO_WINDOW, data, write);
        }
        let Some((d, bar, off)) = self.find(addr, data.len()) else {
            return false;
        };
        d.forward(bar, off, data, write);
        if write
            && let Some(m) = d.msix
            && u32::from(m.table_bar) == bar
        {
            let start = u64::from(m.table_offset);
            if off >= start && off + data.len() as u64 <= start + m.table_len() {
                self.snoop_table(d, off - start, data);
            }
        }
        true
    }

    fn snoop_table(&self, d: &Dev, rel: u64, data: &[u8]) {
        let v = (rel / 16) as usize;
        let changed = {
            let mut t = d.table.lock().unwrap_or_else(|e| e.into_inner());
            let Some(e) = t.get_mut(v) else { return };
            let mut bytes = [0u8; 16];
            for (i, w) in e.iter().enumerate() {
                bytes[4 * i..4 * i + 4].copy_from_slice(&w.to_le_bytes());
            }
            let o = (rel % 16) as usize;
            let n = data.len().min(16 - o);
            bytes[o..o + n].copy_from_slice(&data[..n]);
            for (i, w) in e.iter_mut().enumerate() {
                *w = u32::from_le_bytes(bytes[4 * i..4 * i + 4].try_into().expect("4"));
            }
            *e
        };
        let gsi = d.gsi_base + v as u32;
        let msg = crate::vstate::irq::MsiMessage {
            address: u64::from(changed[0]) | (u64::from(changed[1]) << 32),
            data: changed[2],
        };
        if self.irq.set_msi_route(gsi, msg).is_ok() {
            d.routes_set.fetch_add(1, Ordering::Relaxed);
        } else {
            d.errors.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Read device `i`'s region (for host-side checks).
    pub fn region_read(
        &self,
        i: usize,
        region: u32,
        off: u64,
        buf: &mut [u8],
    ) -> Result<(), String> {
        let d = self.devs.get(i).ok_or("no such device")?;
        d.client
            .region_read(region, off, buf)
            .map_err(|e| e.to_string())
    }

    /// Counters per device.
    pub fn stats(&self) -> Vec<DeviceStats> {
        self.devs
            .iter()
            .map(|d| DeviceStats {
                path: d.path.display().to_string(),
                slot: d.slot,
                id: format!("{:04x}:{:04x}", d.id & 0xffff, d.id >> 16),
                mmio_exits: d.mmio_exits.load(Ordering::Relaxed),
                config_accesses: d.config_accesses.load(Ordering::Relaxed),
                irqfd_vectors: d._efds.len() as u32,
                msi_routes_set: d.routes_set.load(Ordering::Relaxed),
                mapped_areas: d.mapped_areas,
                ioeventfds: d.ioeventfds,
                errors: d.errors.load(Ordering::Relaxed),
                dma_messages: d.client.dma_requests_served(),
            })
            .collect()
    }
}
