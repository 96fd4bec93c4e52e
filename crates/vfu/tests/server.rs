//! End-to-end tests of the device framework: a real [`Server`] running its loop on a
//! background thread, the example GPIO and DMA-engine devices, and clients over real Unix
//! sockets with real fd passing, eventfds and memfds.

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vfu::client::{Client, ClientError, DmaMemory};
use vfu::devices::dma::{self, DmaEngine, DmaOps};
use vfu::devices::gpio::{self, Gpio};
use vfu::proto::*;
use vfu::server::{AttachedDevice, Server, ShutdownHandle};
use vfu::sock;
use vmm_sys_util::eventfd::EventFd;
use zerocopy::IntoBytes;

const TIMEOUT: Duration = Duration::from_secs(5);
/// Guest-physical address of the test's "guest memory".
const GUEST: u64 = 0x1000_0000;
const GUEST_SIZE: usize = 4 << 20;

// ---------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------

/// A server running `run()` on a thread, stopped and joined on drop.
struct Harness {
    dir: tempfile::TempDir,
    server: Server,
    stop: ShutdownHandle,
    thread: Option<JoinHandle<()>>,
}

impl Harness {
    fn new() -> Harness {
        let server = Server::new(false).expect("server");
        let stop = server.shutdown_handle();
        let s = server.clone();
        let thread = std::thread::spawn(move || s.run().expect("server loop"));
        Harness {
            dir: tempfile::tempdir().expect("tempdir"),
            server,
            stop,
            thread: Some(thread),
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn gpio(&self, name: &str) -> (Arc<Gpio>, AttachedDevice) {
        let g = Gpio::new(true);
        let dev = Gpio::description()
            .realize(g.clone())
            .expect("realize gpio")
            .attach(&self.server, &self.path(name))
            .expect("attach gpio");
        (g, dev)
    }

    fn dma(&self, name: &str) -> (Arc<DmaEngine>, AttachedDevice) {
        let e = DmaEngine::new();
        let dev = DmaEngine::description()
            .realize(Arc::new(DmaOps(e.clone())))
            .expect("realize dma")
            .attach(&self.server, &self.path(name))
            .expect("attach dma");
        (e, dev)
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        self.stop.shutdown();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn connect(path: &Path) -> Client {
    Client::connect(path, TIMEOUT).expect("connect")
}

/// Run `f` on a thread; fail the test if it takes longer than `secs` (a deadlock or hang).
fn within<T: Send + 'static>(secs: u64, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = mpsc::channel();
    let h = std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    match rx.recv_timeout(Duration::from_secs(secs)) {
        Ok(v) => {
            let _ = h.join();
            v
        }
        Err(mpsc::RecvTimeoutError::Timeout) => panic!("did not finish within {secs} s"),
        Err(mpsc::RecvTimeoutError::Disconnected) => match h.join() {
            Err(p) => std::panic::resume_unwind(p),
            Ok(()) => unreachable!("sent nothing but returned"),
        },
    }
}

fn eventfd() -> EventFd {
    EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC).expect("eventfd")
}

/// Whether `fd` becomes readable within `timeout`.
fn readable(fd: RawFd, timeout: Duration) -> bool {
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd for the duration of the call.
    let n = unsafe { libc::poll(&mut p, 1, timeout.as_millis() as i32) };
    n > 0 && p.revents & libc::POLLIN != 0
}

/// Drain an eventfd: its counter (0 if not signalled).
fn drain(e: &EventFd) -> u64 {
    e.read().unwrap_or(0)
}

fn memfd(size: usize) -> OwnedFd {
    // SAFETY: memfd_create with a valid NUL-terminated name.
    let fd = unsafe {
        libc::memfd_create(
            c"vfu-test".as_ptr(),
            libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING,
        )
    };
    assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
    // SAFETY: a new descriptor that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: ftruncate of our own memfd.
    let r = unsafe { libc::ftruncate(fd.as_raw_fd(), size as libc::off_t) };
    assert_eq!(r, 0);
    // Sealed against shrinking and growing: the client hands only such fds to DMA_MAP.
    // SAFETY: F_ADD_SEALS on our own memfd with an integer argument.
    let r = unsafe {
        libc::fcntl(
            fd.as_raw_fd(),
            libc::F_ADD_SEALS,
            libc::F_SEAL_SHRINK | libc::F_SEAL_GROW,
        )
    };
    assert_eq!(r, 0, "F_ADD_SEALS: {}", std::io::Error::last_os_error());
    fd
}

/// A shared mapping of an fd, accessed only through raw copies (the server writes the
/// same pages from its own mapping).
struct Mapped {
    ptr: *mut u8,
    len: usize,
}

impl Mapped {
    fn new(fd: RawFd, offset: u64, len: usize) -> Mapped {
        // SAFETY: a new shared mapping of a descriptor we hold; checked below.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd,
                offset as libc::off_t,
            )
        };
        assert_ne!(p, libc::MAP_FAILED, "{}", std::io::Error::last_os_error());
        Mapped { ptr: p.cast(), len }
    }

    fn read(&self, off: usize, buf: &mut [u8]) {
        assert!(off + buf.len() <= self.len);
        // SAFETY: inside the live mapping (checked); raw byte copy, no references held.
        unsafe { std::ptr::copy_nonoverlapping(self.ptr.add(off), buf.as_mut_ptr(), buf.len()) }
    }

    fn write(&self, off: usize, data: &[u8]) {
        assert!(off + data.len() <= self.len);
        // SAFETY: inside the live, writable mapping (checked).
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), self.ptr.add(off), data.len()) }
    }

    fn u32_at(&self, off: usize) -> u32 {
        let mut b = [0; 4];
        self.read(off, &mut b);
        u32::from_le_bytes(b)
    }
}

// SAFETY: the pointer is a process-wide shared mapping owned by this value; all access is
// through raw byte copies, which are sound from any thread (the bytes may race, as with the
// server's own copies of the same pages).
unsafe impl Send for Mapped {}
// SAFETY: as above: `&Mapped` only allows raw byte copies.
unsafe impl Sync for Mapped {}

impl Drop for Mapped {
    fn drop(&mut self) {
        // SAFETY: our own mapping of `len` bytes.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

fn rd32(c: &Client, region: u32, off: u64) -> u32 {
    let mut b = [0; 4];
    c.region_read(region, off, &mut b).expect("region read");
    u32::from_le_bytes(b)
}

fn rd16_cfg(c: &Client, off: u64) -> u16 {
    let mut b = [0; 2];
    c.config_read(off, &mut b).expect("config read");
    u16::from_le_bytes(b)
}

fn rd8(c: &Client, region: u32, off: u64) -> u8 {
    let mut b = [0; 1];
    c.region_read(region, off, &mut b).expect("region read");
    b[0]
}

fn config(c: &Client) -> Vec<u8> {
    let size = c.region(PCI_CONFIG_REGION).expect("config region").size as usize;
    let mut v = vec![0; size];
    c.config_read(0, &mut v).expect("config read");
    v
}

/// The standard capability list: (id, offset).
fn cap_chain(cfg: &[u8]) -> Vec<(u8, usize)> {
    let mut out = Vec::new();
    let mut at = usize::from(cfg[0x34]);
    while at != 0 && out.len() < 48 {
        out.push((cfg[at], at));
        at = usize::from(cfg[at + 1]);
    }
    out
}

fn cap_offset(c: &Client, id: u8) -> u64 {
    let cfg = config(c);
    cap_chain(&cfg)
        .into_iter()
        .find(|&(i, _)| i == id)
        .map(|(_, at)| at as u64)
        .unwrap_or_else(|| panic!("capability {id:#x} missing"))
}

/// Poll `cond` until true or the deadline.
fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + TIMEOUT;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(1));
    }
}

// ---- DMA engine rig ----

struct DmaRig {
    // Field order is drop order: the client goes before the server stops.
    client: Client,
    engine: Arc<DmaEngine>,
    dev: AttachedDevice,
    mem: Mapped,
    _memfd: OwnedFd,
    ev: [EventFd; 2],
    _h: Harness,
}

impl DmaRig {
    /// A DMA engine with 4 MiB of memfd guest memory mapped at [`GUEST`], MSI-X eventfds
    /// for both vectors, MSI-X enabled with both entries unmasked, and bus mastering on
    /// when `bus_master`.
    fn new(bus_master: bool) -> DmaRig {
        let h = Harness::new();
        let (engine, dev) = h.dma("dma.sock");
        let client = connect(dev.path());
        let memfd = memfd(GUEST_SIZE);
        let mem = Mapped::new(memfd.as_raw_fd(), 0, GUEST_SIZE);
        client
            .dma_map_fd(
                GUEST,
                GUEST_SIZE as u64,
                memfd.as_raw_fd(),
                0,
                DMA_READ | DMA_WRITE,
            )
            .expect("dma map");
        let ev = [eventfd(), eventfd()];
        client
            .set_irq_eventfds(IRQ_MSIX, 0, &[ev[0].as_raw_fd(), ev[1].as_raw_fd()])
            .expect("set msix eventfds");
        let cmd = rd16_cfg(&client, 4) | if bus_master { 0x6 } else { 0x2 };
        client.config_write(4, &cmd.to_le_bytes()).expect("command");
        let msix = cap_offset(&client, pci::CAP_MSIX);
        let ctl = rd16_cfg(&client, msix + 2) | 0x8000;
        client
            .config_write(msix + 2, &ctl.to_le_bytes())
            .expect("msix enable");
        let rig = DmaRig {
            client,
            engine,
            dev,
            mem,
            _memfd: memfd,
            ev,
            _h: h,
        };
        for v in 0..2 {
            rig.program_vector(v);
            rig.mask_vector(v, false);
        }
        rig
    }

    fn program_vector(&self, v: u64) {
        let at = 0x800 + 16 * v;
        self.client
            .region_write(0, at, &(0xfee0_0000u64 + v * 4).to_le_bytes())
            .expect("msix address");
        self.client
            .region_write(0, at + 8, &(0x40u32 + v as u32).to_le_bytes())
            .expect("msix data");
    }

    fn mask_vector(&self, v: u64, masked: bool) {
        self.client
            .region_write(0, 0x800 + 16 * v + 12, &u32::from(masked).to_le_bytes())
            .expect("msix vector control");
    }

    fn reg(&self, off: u64) -> u32 {
        rd32(&self.client, 0, off)
    }

    /// Write a descriptor at `off` in guest memory.
    fn put_desc(&self, off: usize, src: u64, dst: u64, len: u32, flags: u32) {
        let mut d = [0u8; 32];
        d[0..8].copy_from_slice(&src.to_le_bytes());
        d[8..16].copy_from_slice(&dst.to_le_bytes());
        d[16..20].copy_from_slice(&len.to_le_bytes());
        d[20..24].copy_from_slice(&flags.to_le_bytes());
        self.mem.write(off, &d);
    }

    /// Point the engine at `desc` and ring the doorbell through REGION_WRITE.
    fn ring(&self, desc: u64, count: u32) {
        self.client
            .region_write(0, dma::reg::DESC, &desc.to_le_bytes())
            .expect("DESC");
        self.client
            .region_write(0, dma::reg::DOORBELL, &count.to_le_bytes())
            .expect("doorbell");
    }

    fn status_of(&self, desc_off: usize) -> u32 {
        self.mem.u32_at(desc_off + 24)
    }

    fn wait_idle(&self) {
        wait_for("the engine to go idle", || {
            self.reg(dma::reg::STATUS) & 1 == 0
        });
    }
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

// ---------------------------------------------------------------------------------------
// Discovery: negotiation, device info, regions, IRQs
// ---------------------------------------------------------------------------------------

#[test]
fn negotiation_device_regions_and_irqs() {
    let h = Harness::new();
    let (_g, gdev) = h.gpio("gpio.sock");
    let (_e, ddev) = h.dma("dma.sock");

    for path in [gdev.path(), ddev.path()] {
        let c = connect(path);
        assert_eq!(c.version(), (VERSION_MAJOR, VERSION_MINOR));
        let caps = c.server_caps();
        assert_eq!(caps.max_data_xfer_size, DEFAULT_MAX_DATA_XFER);
        assert!(caps.max_msg_fds >= 2, "{caps:?}");
        assert_eq!(caps.pgsizes & 4096, 4096);
        let mig = caps.migration.as_ref().expect("migration capability");
        assert_eq!(mig.pgsize, 4096);
        let info = c.device_info();
        assert_eq!(info.num_regions, PCI_NUM_REGIONS);
        assert_eq!(info.num_irqs, PCI_NUM_IRQS);
        assert_eq!(
            info.flags & (DEVICE_FLAGS_PCI | DEVICE_FLAGS_RESET),
            DEVICE_FLAGS_PCI | DEVICE_FLAGS_RESET
        );
        assert_eq!(c.regions().len(), 9);
        assert_eq!(c.irqs().len(), 5);
        for (i, r) in c.regions().iter().enumerate() {
            assert_eq!(r.index, i as u32);
        }
        for (i, q) in c.irqs().iter().enumerate() {
            assert_eq!(q.index, i as u32);
        }
        assert_eq!(
            c.migration_flags().unwrap(),
            Some(MIGRATION_STOP_COPY | MIGRATION_PRE_COPY)
        );
    }

    // GPIO: config 256 bytes, BAR2 256 bytes not mappable, INTx only.
    let g = connect(gdev.path());
    assert_eq!(g.region(PCI_CONFIG_REGION).unwrap().size, 256);
    let bar2 = g.region(2).unwrap();
    assert_eq!(bar2.size, 256);
    assert_eq!(
        bar2.flags & (REGION_READ | REGION_WRITE),
        REGION_READ | REGION_WRITE
    );
    assert_eq!(bar2.flags & REGION_MMAP, 0);
    assert!(bar2.fd.is_none() && bar2.sparse.is_empty());
    for i in [0, 1, 3, 4, 5, PCI_ROM_REGION, PCI_VGA_REGION] {
        assert_eq!(g.region(i).unwrap().size, 0, "region {i}");
    }
    let counts: Vec<u32> = g.irqs().iter().map(|i| i.count).collect();
    assert_eq!(counts, vec![1, 0, 0, 1, 1]);
    let intx = g.irqs()[IRQ_INTX as usize];
    assert_ne!(intx.flags & IRQ_INFO_EVENTFD, 0);
    assert_ne!(intx.flags & IRQ_INFO_AUTOMASKED, 0);
    assert_ne!(intx.flags & IRQ_INFO_MASKABLE, 0);

    // DMA engine: config 4 KiB, BAR0 4 KiB, BAR2 64 KiB mappable at 0x1000..0x10000.
    let d = connect(ddev.path());
    assert_eq!(d.region(PCI_CONFIG_REGION).unwrap().size, 4096);
    assert_eq!(d.region(0).unwrap().size, 0x1000);
    assert!(d.region(0).unwrap().fd.is_none());
    let bar2 = d.region(2).unwrap();
    assert_eq!(bar2.size, 0x10000);
    assert_ne!(bar2.flags & REGION_MMAP, 0);
    assert_ne!(bar2.flags & REGION_CAPS, 0);
    assert_eq!(bar2.sparse, vec![(0x1000, 0xf000)]);
    let counts: Vec<u32> = d.irqs().iter().map(|i| i.count).collect();
    assert_eq!(counts, vec![0, 1, 2, 1, 1]);
    assert_ne!(d.irqs()[IRQ_MSIX as usize].flags & IRQ_INFO_MASKABLE, 0);
    assert_ne!(d.irqs()[IRQ_MSI as usize].flags & IRQ_INFO_NORESIZE, 0);
}

#[test]
fn dma_engine_bar2_mmap_is_the_same_memory_as_region_access() {
    let h = Harness::new();
    let (_e, dev) = h.dma("dma.sock");
    let c = connect(dev.path());
    let bar2 = c.region(2).unwrap();
    let (off, len) = bar2.sparse[0];
    let fd = bar2.fd.as_ref().expect("BAR2 fd").as_raw_fd();
    let map = Mapped::new(fd, bar2.mmap_offset + off, len as usize);

    // Write through the mmap, read through REGION_READ.
    let p = pattern(256, 7);
    map.write(0x20, &p);
    let mut back = vec![0; 256];
    c.region_read(2, off + 0x20, &mut back).unwrap();
    assert_eq!(back, p);

    // Write through REGION_WRITE, read through the mmap.
    let q = pattern(4096, 99);
    c.region_write(2, off + 0x3000, &q).unwrap();
    let mut back = vec![0; 4096];
    map.read(0x3000, &mut back);
    assert_eq!(back, q);

    // The trapped first page reads the same memfd through the device callback.
    c.region_write(2, 0x10, &[1, 2, 3, 4]).unwrap();
    let mut b = [0; 4];
    c.region_read(2, 0x10, &mut b).unwrap();
    assert_eq!(b, [1, 2, 3, 4]);
    // An access straddling the trapped page and the mmap area is split: the trapped half
    // goes to the device, the mapped half to the memory.
    c.region_write(2, 0xffc, &[9, 8, 7, 6, 5, 4, 3, 2]).unwrap();
    let mut b = [0; 8];
    c.region_read(2, 0xffc, &mut b).unwrap();
    assert_eq!(b, [9, 8, 7, 6, 5, 4, 3, 2]);
    let mut hi = [0; 4];
    c.region_read(2, 0x1000, &mut hi).unwrap();
    assert_eq!(hi, [5, 4, 3, 2]);
    // Out of the region: refused.
    assert!(c.region_read(2, 0x10000 - 2, &mut b).is_err());
    assert!(c.region_read(5, 0, &mut b).is_err());
}

// ---------------------------------------------------------------------------------------
// Config space over the wire
// ---------------------------------------------------------------------------------------

#[test]
fn config_space_semantics_over_the_wire() {
    let h = Harness::new();
    let (_e, ddev) = h.dma("dma.sock");
    let (_g, gdev) = h.gpio("gpio.sock");
    let d = connect(ddev.path());
    let g = connect(gdev.path());

    // IDs, class, revision; read-only.
    assert_eq!(rd32(&d, PCI_CONFIG_REGION, 0), 0x0d3a_fa17);
    assert_eq!(rd32(&d, PCI_CONFIG_REGION, 8), 0x0880_0001);
    assert_eq!(rd32(&g, PCI_CONFIG_REGION, 0), 0x0dc8_494f);
    d.config_write(0, &[0xff; 4]).unwrap();
    assert_eq!(rd32(&d, PCI_CONFIG_REGION, 0), 0x0d3a_fa17);
    assert_eq!(rd32(&d, PCI_CONFIG_REGION, 0x2c), 0x0d3a_fa17);

    // BAR sizing: all ones reads back ~(size - 1) | flags.
    for (c, off, size) in [
        (&d, 0x10u64, 0x1000u32),
        (&d, 0x18, 0x10000),
        (&g, 0x18, 0x100),
    ] {
        c.config_write(off, &u32::MAX.to_le_bytes()).unwrap();
        assert_eq!(
            rd32(c, PCI_CONFIG_REGION, off),
            !(size - 1),
            "BAR at {off:#x}"
        );
        c.config_write(off, &0xe000_0000u32.to_le_bytes()).unwrap();
        assert_eq!(rd32(c, PCI_CONFIG_REGION, off), 0xe000_0000);
    }
    // An unimplemented BAR stays 0.
    d.config_write(0x14, &u32::MAX.to_le_bytes()).unwrap();
    assert_eq!(rd32(&d, PCI_CONFIG_REGION, 0x14), 0);

    // Command register: only implemented bits stick (INTx disable only with a pin).
    d.config_write(4, &0xffffu16.to_le_bytes()).unwrap();
    assert_eq!(rd16_cfg(&d, 4), 0x0146);
    g.config_write(4, &0xffffu16.to_le_bytes()).unwrap();
    assert_eq!(rd16_cfg(&g, 4), 0x0546);
    d.config_write(4, &0u16.to_le_bytes()).unwrap();
    assert_eq!(rd16_cfg(&d, 4), 0);
    // Status: capability list present.
    assert_ne!(rd16_cfg(&d, 6) & pci::STATUS_CAP_LIST, 0);

    // Capability chains.
    let cfg = config(&d);
    assert_eq!(cfg.len(), 4096);
    let ids: Vec<u8> = cap_chain(&cfg).iter().map(|c| c.0).collect();
    assert_eq!(
        ids,
        vec![pci::CAP_PM, pci::CAP_MSI, pci::CAP_MSIX, pci::CAP_PCIE]
    );
    let msix = cap_chain(&cfg)[2].1;
    let dw = |o: usize| u32::from_le_bytes(cfg[o..o + 4].try_into().unwrap());
    assert_eq!(
        u16::from_le_bytes([cfg[msix + 2], cfg[msix + 3]]) & 0x7ff,
        1
    );
    assert_eq!(dw(msix + 4), 0x800); // table: BAR 0, offset 0x800
    assert_eq!(dw(msix + 8), 0xc00); // PBA: BAR 0, offset 0xc00
    assert_eq!(dw(0x100) & 0xffff, u32::from(pci::EXT_CAP_DSN));
    let gcfg = config(&g);
    assert_eq!(gcfg.len(), 256);
    let ids: Vec<u8> = cap_chain(&gcfg).iter().map(|c| c.0).collect();
    assert_eq!(ids, vec![pci::CAP_PM]);
    assert_eq!(gcfg[pci::INTERRUPT_PIN], 1);

    // Capability registers are read-only where they must be.
    let msix = msix as u64;
    d.config_write(msix + 4, &u32::MAX.to_le_bytes()).unwrap();
    assert_eq!(rd32(&d, PCI_CONFIG_REGION, msix + 4), 0x800);

    // lspci decodes what came over the wire.
    let text = pci::lspci::describe("00:03.0", &config(&d));
    for needle in [
        "MSI-X: Enable- Count=2 Masked-",
        "MSI: Enable- Count=1/1 Maskable+ 64bit+",
        "Power Management version 3",
        "Express (v2) Endpoint",
        "Device Serial Number",
        "Vector table: BAR=0 offset=00000800",
        "PBA: BAR=0 offset=00000c00",
    ] {
        assert!(text.contains(needle), "{needle:?} missing from:\n{text}");
    }
    let ctl = rd16_cfg(&d, msix + 2) | 0x8000;
    d.config_write(msix + 2, &ctl.to_le_bytes()).unwrap();
    let text = pci::lspci::describe("00:03.0", &config(&d));
    assert!(text.contains("MSI-X: Enable+ Count=2 Masked-"), "{text}");
    let text = pci::lspci::describe("00:04.0", &config(&g));
    assert!(text.contains("Interrupt: pin A"), "{text}");

    // Out-of-range config access is refused, and the connection survives.
    assert!(d.config_read(4095, &mut [0; 2]).is_err());
    assert!(g.config_write(255, &[0; 2]).is_err());
    assert_eq!(rd32(&g, PCI_CONFIG_REGION, 0), 0x0dc8_494f);

    // Reset restores config space.
    d.reset().unwrap();
    assert_eq!(rd32(&d, PCI_CONFIG_REGION, 0x10), 0);
    assert_eq!(rd16_cfg(&d, msix + 2) & 0x8000, 0);
}

// ---------------------------------------------------------------------------------------
// GPIO
// ---------------------------------------------------------------------------------------

#[test]
fn gpio_loopback_and_intx_with_automask() {
    let h = Harness::new();
    let (gpio, dev) = h.gpio("gpio.sock");
    let c = connect(dev.path());
    let bar = gpio::BAR;

    // Outputs loop back to inputs.
    c.region_write(bar, 0, &[0x5a]).unwrap();
    c.region_write(bar, 4, &[0xc3]).unwrap();
    assert_eq!(rd8(&c, bar, 0), 0x5a);
    assert_eq!(rd8(&c, bar, 1), 0x5a);
    assert_eq!(rd8(&c, bar, 4), 0xc3);
    assert_eq!(rd8(&c, bar, 5), 0xc3);
    assert_eq!(gpio.outputs(), 0xc35a);
    assert_eq!(rd8(&c, bar, 6), 0, "no change interrupt while disabled");

    // INTx through an eventfd.
    let ev = eventfd();
    c.set_irq_eventfds(IRQ_INTX, 0, &[ev.as_raw_fd()]).unwrap();
    c.region_write(bar, 2, &[0]).unwrap(); // enable the change interrupt
    assert!(!readable(ev.as_raw_fd(), Duration::from_millis(50)));
    c.region_write(bar, 0, &[0x01]).unwrap();
    assert!(readable(ev.as_raw_fd(), TIMEOUT), "INTx not signalled");
    assert_eq!(drain(&ev), 1);
    assert_eq!(rd8(&c, bar, 6), 1, "irq status");
    assert_ne!(rd16_cfg(&c, 6) & pci::STATUS_INTX, 0, "status INTx bit");

    // Automasked: a second change does not signal until the client unmasks.
    c.region_write(bar, 0, &[0x02]).unwrap();
    assert!(!readable(ev.as_raw_fd(), Duration::from_millis(100)));
    c.mask_irqs(IRQ_INTX, 0, 1, false).unwrap();
    assert!(readable(ev.as_raw_fd(), TIMEOUT), "INTx not re-signalled");
    assert_eq!(drain(&ev), 1);

    // Clear the interrupt (write offset 1): line deasserted; unmasking does not re-signal.
    c.region_write(bar, 1, &[0]).unwrap();
    assert_eq!(rd8(&c, bar, 6), 0);
    assert_eq!(rd16_cfg(&c, 6) & pci::STATUS_INTX, 0);
    c.mask_irqs(IRQ_INTX, 0, 1, false).unwrap();
    assert!(!readable(ev.as_raw_fd(), Duration::from_millis(50)));

    // External inputs changing raise it too.
    gpio.set_inputs(0x0100);
    assert!(readable(ev.as_raw_fd(), TIMEOUT));
    assert_eq!(drain(&ev), 1);
    c.region_write(bar, 1, &[0]).unwrap();
    c.mask_irqs(IRQ_INTX, 0, 1, false).unwrap();

    // Command register INTx disable: the function must not signal INTx; clearing the bit
    // with the line still asserted delivers it.
    c.config_write(4, &pci::CMD_INTX_DISABLE.to_le_bytes())
        .unwrap();
    c.region_write(bar, 0, &[0x03]).unwrap();
    assert_eq!(rd8(&c, bar, 6), 1);
    assert!(
        !readable(ev.as_raw_fd(), Duration::from_millis(100)),
        "INTx signalled with INTx disabled in the command register"
    );
    assert_ne!(
        rd16_cfg(&c, 6) & pci::STATUS_INTX,
        0,
        "status still shows it"
    );
    c.config_write(4, &0u16.to_le_bytes()).unwrap();
    assert!(readable(ev.as_raw_fd(), TIMEOUT), "INTx not delivered");
    assert_eq!(drain(&ev), 1);

    // Reading offset 2 disables the interrupt and deasserts the line.
    let _ = rd8(&c, bar, 2);
    c.mask_irqs(IRQ_INTX, 0, 1, false).unwrap();
    c.region_write(bar, 0, &[0x44]).unwrap();
    assert!(!readable(ev.as_raw_fd(), Duration::from_millis(50)));

    // Disabling the index (DATA_NONE, count 0) removes the eventfd.
    c.region_write(bar, 2, &[0]).unwrap();
    c.disable_irqs(IRQ_INTX).unwrap();
    c.region_write(bar, 0, &[0x45]).unwrap();
    assert!(!readable(ev.as_raw_fd(), Duration::from_millis(50)));

    // Reset: outputs back to 0.
    c.reset().unwrap();
    assert_eq!(rd8(&c, bar, 0), 0);
    assert_eq!(gpio.outputs(), 0);
}

// ---------------------------------------------------------------------------------------
// DMA engine
// ---------------------------------------------------------------------------------------

#[test]
fn dma_engine_copies_and_raises_msix() {
    let rig = DmaRig::new(true);
    assert_eq!(rig.reg(dma::reg::ID), dma::ID);

    let src = pattern(0x3000, 5);
    rig.mem.write(0x1000, &src);
    rig.put_desc(0, GUEST + 0x1000, GUEST + 0x20000, 0x3000, 1);
    rig.ring(GUEST, 1);
    assert!(
        readable(rig.ev[0].as_raw_fd(), TIMEOUT),
        "no completion IRQ"
    );
    assert_eq!(drain(&rig.ev[0]), 1);
    assert_eq!(drain(&rig.ev[1]), 0);
    let mut dst = vec![0; 0x3000];
    rig.mem.read(0x20000, &mut dst);
    assert_eq!(dst, src);
    assert_eq!(rig.status_of(0), dma::STATUS_DONE);
    assert_eq!(rig.reg(dma::reg::COMPLETED), 1);
    assert_eq!(rig.engine.completed(), 1);
    rig.wait_idle();
    assert_eq!(rig.reg(dma::reg::STATUS), 0);
    let mut b = [0; 8];
    rig.client.region_read(0, dma::reg::BYTES, &mut b).unwrap();
    assert_eq!(u64::from_le_bytes(b), 0x3000);
    let mut b = [0; 8];
    rig.client.region_read(0, dma::reg::DESC, &mut b).unwrap();
    assert_eq!(u64::from_le_bytes(b), GUEST);

    // Two descriptors in one ring, spanning the mapping's middle.
    let a = pattern(100, 1);
    let b2 = pattern(5000, 2);
    rig.mem.write(0x100000, &a);
    rig.mem.write(0x200000, &b2);
    rig.put_desc(0x40, GUEST + 0x100000, GUEST + 0x300000, 100, 0);
    rig.put_desc(0x60, GUEST + 0x200000, GUEST + 0x310000, 5000, 1);
    rig.ring(GUEST + 0x40, 2);
    assert!(readable(rig.ev[0].as_raw_fd(), TIMEOUT));
    assert_eq!(drain(&rig.ev[0]), 1, "only the second asked for an IRQ");
    let mut got = vec![0; 100];
    rig.mem.read(0x300000, &mut got);
    assert_eq!(got, a);
    let mut got = vec![0; 5000];
    rig.mem.read(0x310000, &mut got);
    assert_eq!(got, b2);
    assert_eq!(rig.status_of(0x40), dma::STATUS_DONE);
    assert_eq!(rig.status_of(0x60), dma::STATUS_DONE);
    assert_eq!(rig.reg(dma::reg::COMPLETED), 3);

    // The doorbell's ioeventfd: one sub-region at 0x10; a signal rings without any
    // REGION_WRITE.
    let io = rig.client.region_io_fds(0).unwrap();
    assert_eq!(io.len(), 1);
    let (sub, fd) = &io[0];
    assert_eq!((sub.offset, sub.size), (dma::reg::DOORBELL, 4));
    assert_eq!(sub.kind, 0);
    assert!(rig.client.region_io_fds(2).unwrap().is_empty());
    let src = pattern(777, 42);
    rig.mem.write(0x5000, &src);
    rig.put_desc(0x80, GUEST + 0x5000, GUEST + 0x6000, 777, 1);
    rig.client
        .region_write(0, dma::reg::DESC, &(GUEST + 0x80).to_le_bytes())
        .unwrap();
    let mut f = std::fs::File::from(fd.try_clone().unwrap());
    f.write_all(&1u64.to_ne_bytes()).unwrap();
    assert!(
        readable(rig.ev[0].as_raw_fd(), TIMEOUT),
        "ioeventfd did not ring"
    );
    assert_eq!(drain(&rig.ev[0]), 1);
    let mut got = vec![0; 777];
    rig.mem.read(0x6000, &mut got);
    assert_eq!(got, src);
    assert_eq!(rig.status_of(0x80), dma::STATUS_DONE);
    assert_eq!(rig.reg(dma::reg::COMPLETED), 4);

    // Unmap: the engine can no longer reach the memory.
    rig.client.dma_unmap(GUEST, GUEST_SIZE as u64).unwrap();
    assert!(rig.dev.context().dma_regions().is_empty());
    let errors = rig.reg(dma::reg::ERRORS);
    rig.ring(GUEST, 1);
    wait_for("the error count", || {
        rig.reg(dma::reg::ERRORS) == errors + 1
    });
    assert!(rig.client.dma_unmap(GUEST, GUEST_SIZE as u64).is_err());
}

#[test]
fn msix_masking_latches_pba_and_unmask_delivers() {
    let rig = DmaRig::new(true);
    rig.mask_vector(0, true);
    rig.put_desc(0, GUEST + 0x1000, GUEST + 0x2000, 64, 1);
    rig.ring(GUEST, 1);
    wait_for("completion", || rig.reg(dma::reg::COMPLETED) == 1);
    rig.wait_idle();
    let mut pba = [0u8; 8];
    rig.client.region_read(0, 0xc00, &mut pba).unwrap();
    assert_eq!(u64::from_le_bytes(pba), 1, "PBA bit 0");
    assert!(!readable(rig.ev[0].as_raw_fd(), Duration::from_millis(100)));
    let stats = rig.dev.context().irq_stats();
    assert!(stats.latched.load(Ordering::Relaxed) >= 1);

    // Unmask through the table: delivered, PBA clear.
    rig.mask_vector(0, false);
    assert!(readable(rig.ev[0].as_raw_fd(), TIMEOUT), "not released");
    assert_eq!(drain(&rig.ev[0]), 1);
    rig.client.region_read(0, 0xc00, &mut pba).unwrap();
    assert_eq!(u64::from_le_bytes(pba), 0);
    assert!(stats.released.load(Ordering::Relaxed) >= 1);

    // Function mask in MSI-X control: latched too, released when cleared.
    let msix = cap_offset(&rig.client, pci::CAP_MSIX);
    rig.client
        .config_write(msix + 2, &0xc000u16.to_le_bytes())
        .unwrap();
    rig.ring(GUEST, 1);
    wait_for("completion", || rig.reg(dma::reg::COMPLETED) == 2);
    rig.wait_idle();
    assert!(!readable(rig.ev[0].as_raw_fd(), Duration::from_millis(50)));
    rig.client.region_read(0, 0xc00, &mut pba).unwrap();
    assert_eq!(u64::from_le_bytes(pba), 1);
    rig.client
        .config_write(msix + 2, &0x8000u16.to_le_bytes())
        .unwrap();
    assert!(readable(rig.ev[0].as_raw_fd(), TIMEOUT));
    assert_eq!(drain(&rig.ev[0]), 1);

    // SET_IRQS mask/unmask on the MSI-X index works the same way.
    rig.client.mask_irqs(IRQ_MSIX, 0, 1, true).unwrap();
    rig.ring(GUEST, 1);
    wait_for("completion", || rig.reg(dma::reg::COMPLETED) == 3);
    rig.wait_idle();
    assert!(!readable(rig.ev[0].as_raw_fd(), Duration::from_millis(50)));
    rig.client.mask_irqs(IRQ_MSIX, 0, 1, false).unwrap();
    assert!(readable(rig.ev[0].as_raw_fd(), TIMEOUT));
    assert_eq!(drain(&rig.ev[0]), 1);
}

#[test]
fn bus_master_off_refuses_dma() {
    let rig = DmaRig::new(false);
    rig.mem.write(0x1000, &[0xaa; 64]);
    rig.put_desc(0, GUEST + 0x1000, GUEST + 0x2000, 64, 1);
    rig.ring(GUEST, 1);
    wait_for("the error count", || rig.reg(dma::reg::ERRORS) == 1);
    rig.wait_idle();
    assert_eq!(rig.reg(dma::reg::STATUS), 2, "last run had an error");
    assert_eq!(rig.reg(dma::reg::COMPLETED), 0);
    assert_eq!(
        rig.status_of(0),
        0,
        "the device could not even write status"
    );
    let mut dst = [0u8; 64];
    rig.mem.read(0x2000, &mut dst);
    assert_eq!(dst, [0; 64]);
    assert!(!readable(rig.ev[0].as_raw_fd(), Duration::from_millis(50)));
    assert!(rig.dev.context().dma_read(GUEST, &mut [0; 4]).is_err());

    // Turning bus mastering on makes the same descriptor work.
    let cmd = rd16_cfg(&rig.client, 4) | pci::CMD_BUS_MASTER;
    rig.client.config_write(4, &cmd.to_le_bytes()).unwrap();
    rig.ring(GUEST, 1);
    assert!(readable(rig.ev[0].as_raw_fd(), TIMEOUT));
    rig.mem.read(0x2000, &mut dst);
    assert_eq!(dst, [0xaa; 64]);
    assert_eq!(rig.status_of(0), dma::STATUS_DONE);
}

#[test]
fn dma_outside_any_mapping_fails_the_descriptor() {
    let rig = DmaRig::new(true);
    // Source unmapped.
    rig.put_desc(0, 0x9000_0000, GUEST + 0x2000, 64, 1);
    rig.ring(GUEST, 1);
    assert!(readable(rig.ev[1].as_raw_fd(), TIMEOUT), "error vector 1");
    assert_eq!(drain(&rig.ev[1]), 1);
    assert_eq!(drain(&rig.ev[0]), 0);
    let st = rig.status_of(0);
    assert_ne!(st & dma::STATUS_FAILED, 0, "status {st:#x}");
    assert_eq!(st & 0xffff, libc::EFAULT as u32);
    // Destination straddling the end of the mapping.
    let end = GUEST + GUEST_SIZE as u64;
    rig.put_desc(0x20, GUEST + 0x1000, end - 16, 64, 1);
    rig.ring(GUEST + 0x20, 1);
    assert!(readable(rig.ev[1].as_raw_fd(), TIMEOUT));
    drain(&rig.ev[1]);
    assert_eq!(
        rig.status_of(0x20),
        dma::STATUS_FAILED | libc::EFAULT as u32
    );
    // Too long.
    rig.put_desc(0x40, GUEST, GUEST + 0x1000, dma::MAX_LEN + 1, 1);
    rig.ring(GUEST + 0x40, 1);
    assert!(readable(rig.ev[1].as_raw_fd(), TIMEOUT));
    drain(&rig.ev[1]);
    assert_eq!(rig.status_of(0x40), dma::STATUS_FAILED | libc::E2BIG as u32);
    // The descriptor itself unmapped: nothing to write status to, counted as an error.
    rig.ring(0x7000_0000, 1);
    wait_for("the error count", || rig.reg(dma::reg::ERRORS) == 4);
    rig.wait_idle();
    assert_eq!(rig.reg(dma::reg::COMPLETED), 0);

    // Still serving.
    assert_eq!(rig.reg(dma::reg::ID), dma::ID);
    rig.put_desc(0x60, GUEST + 0x1000, GUEST + 0x2000, 64, 1);
    rig.ring(GUEST + 0x60, 1);
    assert!(readable(rig.ev[0].as_raw_fd(), TIMEOUT));
    assert_eq!(rig.status_of(0x60), dma::STATUS_DONE);
}

/// Guest memory the client serves through DMA_READ / DMA_WRITE messages.
struct VecMem(Mutex<Vec<u8>>);

impl DmaMemory for VecMem {
    fn read(&self, offset: u64, buf: &mut [u8]) -> bool {
        let m = self.0.lock().unwrap();
        let Some(s) = m.get(offset as usize..offset as usize + buf.len()) else {
            return false;
        };
        buf.copy_from_slice(s);
        true
    }

    fn write(&self, offset: u64, data: &[u8]) -> bool {
        let mut m = self.0.lock().unwrap();
        let Some(s) = m.get_mut(offset as usize..offset as usize + data.len()) else {
            return false;
        };
        s.copy_from_slice(data);
        true
    }
}

#[test]
fn message_based_dma_through_the_client() {
    let h = Harness::new();
    let (engine, dev) = h.dma("dma.sock");
    let c = connect(dev.path());
    let base = 0x4000_0000u64;
    // The mapping is twice the memory the client actually holds (see the error case below).
    let size = 1 << 20;
    let mem = Arc::new(VecMem(Mutex::new(vec![0; size])));
    c.dma_map_local(base, 2 * size as u64, DMA_READ | DMA_WRITE, mem.clone())
        .unwrap();
    assert_eq!(dev.context().dma_regions(), vec![(base, 2 * size as u64)]);
    c.config_write(4, &0x6u16.to_le_bytes()).unwrap();

    // 200 KiB: one DMA_READ and one DMA_WRITE message of that size.
    let len = 200 << 10;
    let src = pattern(len, 3);
    {
        let mut m = mem.0.lock().unwrap();
        m[0x1000..0x1000 + len].copy_from_slice(&src);
        let mut d = [0u8; 32];
        d[0..8].copy_from_slice(&(base + 0x1000).to_le_bytes());
        d[8..16].copy_from_slice(&(base + 0x80000).to_le_bytes());
        d[16..20].copy_from_slice(&(len as u32).to_le_bytes());
        m[..32].copy_from_slice(&d);
    }
    c.region_write(0, dma::reg::DESC, &base.to_le_bytes())
        .unwrap();
    c.region_write(0, dma::reg::DOORBELL, &1u32.to_le_bytes())
        .unwrap();
    // The client serves the server's DMA requests only inside a call: keep calling.
    let deadline = Instant::now() + TIMEOUT;
    let status = || u32::from_le_bytes(mem.0.lock().unwrap()[24..28].try_into().unwrap());
    while rd32(&c, 0, dma::reg::COMPLETED) < 1 || status() != dma::STATUS_DONE {
        assert!(Instant::now() < deadline, "message DMA did not complete");
        let _ = rd32(&c, 0, dma::reg::STATUS);
    }
    assert_eq!(&mem.0.lock().unwrap()[0x80000..0x80000 + len], &src[..]);
    assert!(c.dma_requests_served() >= 4, "{}", c.dma_requests_served());
    assert_eq!(engine.completed(), 1);

    // The framework's own dma_read goes through the same path (from a thread that is not
    // serving the socket), while this thread keeps the client inside calls.
    let ctx = dev.context().clone();
    let t = std::thread::spawn(move || {
        let mut b = [0u8; 16];
        ctx.dma_read(base + 0x1000, &mut b).map(|()| b)
    });
    let deadline = Instant::now() + TIMEOUT;
    while !t.is_finished() {
        assert!(Instant::now() < deadline, "dma_read did not complete");
        let _ = rd32(&c, 0, dma::reg::STATUS);
    }
    assert_eq!(t.join().unwrap().unwrap(), src[..16]);

    // Inside the mapping but outside the memory the client holds: the client answers the
    // DMA_WRITE with an error and the descriptor fails with EIO.
    {
        let mut m = mem.0.lock().unwrap();
        m[32..40].copy_from_slice(&(base + 0x1000).to_le_bytes());
        m[40..48].copy_from_slice(&(base + size as u64 + 0x100).to_le_bytes());
        m[48..52].copy_from_slice(&64u32.to_le_bytes());
        m[52..56].copy_from_slice(&0u32.to_le_bytes());
    }
    c.region_write(0, dma::reg::DESC, &(base + 32).to_le_bytes())
        .unwrap();
    c.region_write(0, dma::reg::DOORBELL, &1u32.to_le_bytes())
        .unwrap();
    let deadline = Instant::now() + TIMEOUT;
    let status2 = || u32::from_le_bytes(mem.0.lock().unwrap()[56..60].try_into().unwrap());
    while rd32(&c, 0, dma::reg::ERRORS) < 1 || status2() == 0 {
        assert!(Instant::now() < deadline, "no error");
    }
    assert_eq!(status2(), dma::STATUS_FAILED | libc::EIO as u32);
    assert_eq!(rd32(&c, 0, dma::reg::COMPLETED), 1);
    c.dma_unmap(base, 2 * size as u64).unwrap();
    assert!(dev.context().dma_regions().is_empty());
}

// ---------------------------------------------------------------------------------------
// Migration v2
// ---------------------------------------------------------------------------------------

#[test]
fn migration_save_load_and_bad_state() {
    let h = Harness::new();
    let (src_gpio, src_dev) = h.gpio("src.sock");
    let (dst_gpio, dst_dev) = h.gpio("dst.sock");
    let (_e, dma_dev) = h.dma("dma.sock");
    let src = connect(src_dev.path());
    let dst = connect(dst_dev.path());

    src.region_write(gpio::BAR, 0, &[0x12]).unwrap();
    src.region_write(gpio::BAR, 4, &[0x34]).unwrap();
    src.region_write(gpio::BAR, 2, &[0]).unwrap(); // interrupt enabled
    src.config_write(4, &0x0002u16.to_le_bytes()).unwrap();
    src.config_write(0x18, &0xd000_0000u32.to_le_bytes())
        .unwrap();
    assert_eq!(src.migration_state().unwrap(), MigState::Running);

    let blob = src.save_state().unwrap();
    assert_eq!(&blob[..4], b"VFUS");
    assert_eq!(src.migration_state().unwrap(), MigState::Stop);
    assert_eq!(src_dev.context().migration_state(), MigState::Stop);
    // Stopped: MIG_DATA_READ refused outside STOP_COPY.
    assert!(src.mig_data_read(16).is_err());
    src.set_migration_state(MigState::Running).unwrap();

    dst.load_state(&blob).unwrap();
    assert_eq!(dst.migration_state().unwrap(), MigState::Running);
    assert_eq!(dst_gpio.outputs(), 0x3412);
    assert_eq!(rd8(&dst, gpio::BAR, 0), 0x12);
    assert_eq!(rd8(&dst, gpio::BAR, 4), 0x34);
    assert_eq!(rd16_cfg(&dst, 4), 0x0002);
    assert_eq!(rd32(&dst, PCI_CONFIG_REGION, 0x18), 0xd000_0000);
    // The interrupt-enable state came along: a change on the destination sets the status.
    dst.region_write(gpio::BAR, 0, &[0x13]).unwrap();
    assert_eq!(rd8(&dst, gpio::BAR, 6), 1);
    assert_eq!(src_gpio.outputs(), 0x3412);

    // Garbage: the load fails, the device is in ERROR, and only reset recovers it.
    let err = dst
        .load_state(b"this is not a device state at all")
        .unwrap_err();
    assert!(
        matches!(err, ClientError::Server { cmd: Command::DeviceFeature, errno } if errno == libc::EINVAL),
        "{err:?}"
    );
    assert_eq!(dst.migration_state().unwrap(), MigState::Error);
    assert_eq!(dst_dev.context().migration_state(), MigState::Error);
    assert!(dst.set_migration_state(MigState::Running).is_err());
    // Still answering region accesses while in ERROR.
    assert_eq!(rd32(&dst, PCI_CONFIG_REGION, 0), 0x0dc8_494f);
    dst.reset().unwrap();
    assert_eq!(dst.migration_state().unwrap(), MigState::Running);
    assert_eq!(dst_gpio.outputs(), 0);

    // A truncated state and another device's state are refused the same way.
    for bad in [&blob[..blob.len() - 3], &blob[..9]] {
        assert!(dst.load_state(bad).is_err());
        assert_eq!(dst.migration_state().unwrap(), MigState::Error);
        dst.reset().unwrap();
    }
    let dma_client = connect(dma_dev.path());
    let dma_blob = dma_client.save_state().unwrap();
    assert!(dst.load_state(&dma_blob).is_err());
    assert_eq!(dst.migration_state().unwrap(), MigState::Error);
    dst.reset().unwrap();
    // Unsupported states are refused without breaking the device.
    assert!(matches!(
        dst.set_migration_state(MigState::PreCopyP2p),
        Err(ClientError::Server { errno, .. }) if errno == libc::ENOTSUP
    ));
    assert_eq!(dst.migration_state().unwrap(), MigState::Running);
    // PRE_COPY: the device keeps running and (framework stream) has no early data; it can be
    // abandoned back to RUNNING, or finished through STOP_COPY with the whole state.
    dst.set_migration_state(MigState::PreCopy).unwrap();
    assert_eq!(dst.mig_data_read(4096).unwrap(), Vec::<u8>::new());
    dst.set_migration_state(MigState::Running).unwrap();
    dst.set_migration_state(MigState::PreCopy).unwrap();
    dst.set_migration_state(MigState::StopCopy).unwrap();
    let mut again = Vec::new();
    loop {
        let d = dst.mig_data_read(1000).unwrap();
        if d.is_empty() {
            break;
        }
        again.extend(d);
    }
    assert_eq!(&again[..4], b"VFUS");
    // STOP_COPY cannot go back to PRE_COPY.
    assert!(dst.set_migration_state(MigState::PreCopy).is_err());
}

#[test]
fn stopped_device_defers_interrupts_until_running() {
    let rig = DmaRig::new(true);
    let ctx = rig.dev.context().clone();
    rig.client.set_migration_state(MigState::Stop).unwrap();
    assert_eq!(ctx.trigger(0), vfu::server::Delivery::Pending);
    assert!(
        ctx.dma_read(GUEST, &mut [0; 4]).is_err(),
        "no DMA while stopped"
    );
    assert!(!readable(rig.ev[0].as_raw_fd(), Duration::from_millis(50)));
    rig.client.set_migration_state(MigState::Running).unwrap();
    assert!(readable(rig.ev[0].as_raw_fd(), TIMEOUT));
    assert_eq!(drain(&rig.ev[0]), 1);
    assert!(ctx.dma_read(GUEST, &mut [0; 4]).is_ok());
}

// ---------------------------------------------------------------------------------------
// Several clients and devices; misbehaving clients
// ---------------------------------------------------------------------------------------

#[test]
fn several_clients_and_two_devices_in_one_server() {
    let h = Harness::new();
    let (gpio, gdev) = h.gpio("gpio.sock");
    let (_e, ddev) = h.dma("dma.sock");
    let a = connect(gdev.path());
    let d = connect(ddev.path());

    a.region_write(gpio::BAR, 0, &[0x11]).unwrap();
    assert_eq!(rd8(&a, gpio::BAR, 1), 0x11);
    assert_eq!(gpio.outputs(), 0x11);
    assert_eq!(rd32(&d, 0, dma::reg::ID), dma::ID);

    // One client per device: the devices' clients run concurrently, each from two threads.
    let (a, d) = (Arc::new(a), Arc::new(d));
    let threads: Vec<_> = (0..4)
        .map(|i| {
            let c = if i % 2 == 0 { a.clone() } else { d.clone() };
            std::thread::spawn(move || {
                for _ in 0..200 {
                    let v = rd32(&c, PCI_CONFIG_REGION, 0);
                    assert!(v == 0x0dc8_494f || v == 0x0d3a_fa17);
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    // Another client of a device in use is refused (tests/sharing.rs has the details).
    assert!(matches!(
        Client::connect(gdev.path(), TIMEOUT),
        Err(ClientError::Server {
            errno: libc::EBUSY,
            ..
        })
    ));
}

/// A raw connection for sending malformed messages.
struct Raw {
    s: UnixStream,
    id: u16,
}

impl Raw {
    fn connect(path: &Path) -> Raw {
        let s = UnixStream::connect(path).unwrap();
        s.set_read_timeout(Some(TIMEOUT)).unwrap();
        s.set_write_timeout(Some(TIMEOUT)).unwrap();
        Raw { s, id: 1 }
    }

    fn send(&mut self, cmd: u16, payload: &[u8], fds: &[RawFd]) -> u16 {
        self.id += 1;
        let h = Header {
            msg_id: self.id,
            cmd,
            size: (HEADER_SIZE + payload.len()) as u32,
            flags: TYPE_COMMAND,
            error: 0,
        };
        sock::send(&self.s, &[h.as_bytes(), payload], fds).unwrap();
        self.id
    }

    fn recv(&self) -> sock::Message {
        sock::recv(&self.s, 2 << 20).expect("reply")
    }

    /// Send and expect an error reply with `errno` (echoing the message ID).
    fn expect_error(&mut self, cmd: u16, payload: &[u8], fds: &[RawFd], errno: i32) {
        let id = self.send(cmd, payload, fds);
        let r = self.recv();
        assert!(r.header.is_reply() && r.header.is_error(), "{:?}", r.header);
        assert_eq!(r.header.msg_id, id);
        assert_eq!(r.header.error, errno as u32, "cmd {cmd}");
    }

    fn negotiate(&mut self) {
        let mut p = vec![0, 0, 1, 0];
        p.extend(Caps::default().to_json());
        self.send(Command::Version as u16, &p, &[]);
        let r = self.recv();
        assert!(!r.header.is_error());
    }

    /// The server closes the connection (after any error reply).
    fn expect_closed(&self) {
        let mut b = [0u8; 4096];
        loop {
            match (&self.s).read(&mut b) {
                Ok(0) => return,
                Ok(_) => continue,
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return,
                Err(e) => panic!("the server did not close the connection: {e}"),
            }
        }
    }
}

#[test]
fn misbehaving_clients_get_errors_or_are_dropped() {
    let h = Harness::new();
    let (_g, dev) = h.gpio("gpio.sock");
    let path = dev.path().to_path_buf();
    // One client per device: the raw client that negotiates below talks to a second card.
    let (_g2, dev2) = h.gpio("gpio2.sock");
    let good = connect(&path);
    let alive = |good: &Client| assert_eq!(rd32(good, PCI_CONFIG_REGION, 0), 0x0dc8_494f);

    // Random bytes, then EOF.
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    for n in [1usize, 7, 16, 17, 100, 5000] {
        let r = Raw::connect(&path);
        let junk: Vec<u8> = (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        (&r.s).write_all(&junk).unwrap();
        r.s.shutdown(std::net::Shutdown::Write).unwrap();
        r.expect_closed();
        alive(&good);
    }

    // A header claiming 0xffffffff bytes: an E2BIG error, then the connection is dropped.
    let r = Raw::connect(&path);
    let h0 = Header {
        msg_id: 5,
        cmd: Command::RegionRead as u16,
        size: u32::MAX,
        flags: 0,
        error: 0,
    };
    (&r.s).write_all(h0.as_bytes()).unwrap();
    let m = r.recv();
    assert!(m.header.is_error());
    assert_eq!(m.header.error, libc::E2BIG as u32);
    r.expect_closed();
    alive(&good);

    // A header of the wrong type.
    let r = Raw::connect(&path);
    let h1 = Header {
        flags: 7,
        size: 16,
        ..h0
    };
    (&r.s).write_all(h1.as_bytes()).unwrap();
    assert!(r.recv().header.is_error());
    r.expect_closed();
    alive(&good);

    // Commands before VERSION are refused; the connection stays usable.
    let mut r = Raw::connect(dev2.path());
    r.expect_error(
        Command::DeviceGetInfo as u16,
        &[16, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        &[],
        libc::EINVAL,
    );
    r.negotiate();
    // VERSION twice.
    let mut p = vec![0, 0, 1, 0];
    p.extend(Caps::default().to_json());
    r.expect_error(Command::Version as u16, &p, &[], libc::EINVAL);
    // Unknown command.
    r.expect_error(99, &[], &[], libc::ENOSYS);
    r.expect_error(0, &[1, 2, 3], &[], libc::ENOSYS);
    alive(&good);
    // REGION_READ of more than max_data_xfer_size.
    let big = RegionAccess {
        offset: 0,
        region: PCI_CONFIG_REGION,
        count: (1 << 20) + 1,
    };
    r.expect_error(
        Command::RegionRead as u16,
        big.as_bytes(),
        &[],
        libc::EINVAL,
    );
    alive(&good);
    // REGION_WRITE whose count disagrees with its data.
    let w = RegionAccess {
        offset: 0,
        region: 2,
        count: 8,
    };
    let mut p = w.as_bytes().to_vec();
    p.extend([0; 4]);
    r.expect_error(Command::RegionWrite as u16, &p, &[], libc::EINVAL);
    // Truncated fixed parts.
    r.expect_error(Command::RegionRead as u16, &[0; 8], &[], libc::EINVAL);
    r.expect_error(Command::DmaMap as u16, &[0; 31], &[], libc::EINVAL);
    // A region that does not exist, an IRQ index that does not exist.
    let nr = RegionAccess {
        offset: 0,
        region: 42,
        count: 4,
    };
    r.expect_error(Command::RegionRead as u16, nr.as_bytes(), &[], libc::EINVAL);
    let q = IrqInfo {
        argsz: 16,
        index: 9,
        ..Default::default()
    };
    r.expect_error(
        Command::DeviceGetIrqInfo as u16,
        q.as_bytes(),
        &[],
        libc::EINVAL,
    );
    alive(&good);
    // SET_IRQS with the wrong number of fds.
    let e1 = eventfd();
    let s = IrqSet {
        argsz: 20,
        flags: IRQ_SET_DATA_EVENTFD | IRQ_SET_ACTION_TRIGGER,
        index: IRQ_INTX,
        start: 0,
        count: 2,
    };
    r.expect_error(
        Command::DeviceSetIrqs as u16,
        s.as_bytes(),
        &[e1.as_raw_fd()],
        libc::EINVAL,
    );
    // ... beyond the index's vectors (INTx has one).
    let s2 = IrqSet { count: 2, ..s };
    r.expect_error(
        Command::DeviceSetIrqs as u16,
        s2.as_bytes(),
        &[e1.as_raw_fd(), e1.as_raw_fd()],
        libc::EINVAL,
    );
    // ... fds on a command that takes none.
    r.expect_error(
        Command::RegionRead as u16,
        nr.as_bytes(),
        &[e1.as_raw_fd()],
        libc::EINVAL,
    );
    alive(&good);
    // The connection still works after all those errors.
    let ok = RegionAccess {
        offset: 0,
        region: PCI_CONFIG_REGION,
        count: 4,
    };
    r.send(Command::RegionRead as u16, ok.as_bytes(), &[]);
    let m = r.recv();
    assert!(!m.header.is_error());
    assert_eq!(&m.payload[16..], &0x0dc8_494fu32.to_le_bytes());

    // Too many fds in one message: dropped.
    let many: Vec<RawFd> = vec![e1.as_raw_fd(); sock::MAX_FDS + 8];
    let _ = r.send(Command::RegionRead as u16, ok.as_bytes(), &many);
    r.expect_closed();
    alive(&good);

    // A VERSION with another major: refused and dropped.
    let mut r = Raw::connect(&path);
    let mut p = vec![1, 0, 0, 0];
    p.extend(Caps::default().to_json());
    r.expect_error(Command::Version as u16, &p, &[], libc::ENOTSUP);
    r.expect_closed();
    // Bad capabilities JSON.
    let mut r = Raw::connect(&path);
    r.expect_error(
        Command::Version as u16,
        b"\0\0\x01\0{not json",
        &[],
        libc::ENOTSUP,
    );
    alive(&good);

    // A client that stops mid-message and closes.
    let r = Raw::connect(&path);
    let h2 = Header {
        msg_id: 1,
        cmd: Command::Version as u16,
        size: 100,
        flags: 0,
        error: 0,
    };
    (&r.s).write_all(&h2.as_bytes()[..10]).unwrap();
    drop(r);
    let r = Raw::connect(&path);
    (&r.s).write_all(h2.as_bytes()).unwrap();
    (&r.s).write_all(&[0; 20]).unwrap();
    drop(r);
    alive(&good);

    // DMA_MAP: overlapping, not mappable, zero-sized.
    let mfd = memfd(0x20000);
    good.dma_map_fd(GUEST, 0x10000, mfd.as_raw_fd(), 0, DMA_READ | DMA_WRITE)
        .unwrap();
    let err = good
        .dma_map_fd(GUEST + 0x8000, 0x10000, mfd.as_raw_fd(), 0, DMA_READ)
        .unwrap_err();
    assert!(
        matches!(err, ClientError::Server { cmd: Command::DmaMap, errno } if errno == libc::EEXIST),
        "{err:?}"
    );
    assert!(
        good.dma_map_fd(GUEST + 0x100000, 0x1000, e1.as_raw_fd(), 0, DMA_READ)
            .is_err()
    );
    assert!(
        good.dma_map_fd(GUEST + 0x200000, 0, mfd.as_raw_fd(), 0, DMA_READ)
            .is_err()
    );
    assert!(good.dma_unmap(GUEST, 0x8000).is_err(), "partial unmap");
    assert_eq!(dev.context().dma_regions(), vec![(GUEST, 0x10000)]);
    good.dma_unmap(GUEST, 0x10000).unwrap();
    alive(&good);
}

// ---------------------------------------------------------------------------------------
// A lying server
// ---------------------------------------------------------------------------------------

/// A fake server: accepts one connection and hands it to `f`.
fn fake_server(
    dir: &tempfile::TempDir,
    name: &str,
    f: impl FnOnce(UnixStream) + Send + 'static,
) -> (PathBuf, JoinHandle<()>) {
    let path = dir.path().join(name);
    let l = UnixListener::bind(&path).unwrap();
    let t = std::thread::spawn(move || {
        let (s, _) = l.accept().unwrap();
        s.set_read_timeout(Some(TIMEOUT)).unwrap();
        f(s)
    });
    (path, t)
}

fn reply(s: &UnixStream, to: &Header, payload: &[u8]) {
    let h = to.reply(HEADER_SIZE + payload.len());
    let _ = sock::send(s, &[h.as_bytes(), payload], &[]);
}

fn version_payload() -> Vec<u8> {
    let mut p = vec![0, 0, 1, 0];
    p.extend(Caps::default().to_json());
    p
}

/// Answer VERSION and DEVICE_GET_INFO (one region, no IRQs) honestly.
fn honest_start(s: &UnixStream) {
    let m = sock::recv(s, 1 << 21).unwrap();
    assert_eq!(m.header.cmd, Command::Version as u16);
    reply(s, &m.header, &version_payload());
    let m = sock::recv(s, 1 << 21).unwrap();
    assert_eq!(m.header.cmd, Command::DeviceGetInfo as u16);
    let i = DeviceInfo {
        argsz: 16,
        flags: DEVICE_FLAGS_PCI,
        num_regions: 1,
        num_irqs: 0,
    };
    reply(s, &m.header, i.as_bytes());
}

/// Wait until the client hangs up.
fn until_closed(s: &UnixStream) {
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    while sock::recv(s, 1 << 21).is_ok() {}
}

#[test]
fn client_survives_a_lying_server() {
    let dir = tempfile::tempdir().unwrap();
    let short = Duration::from_millis(500);

    // (a) A reply with the wrong message ID.
    let (p, t) = fake_server(&dir, "a.sock", |s| {
        let m = sock::recv(&s, 1 << 21).unwrap();
        let mut h = m.header;
        h.msg_id = h.msg_id.wrapping_add(1);
        reply(&s, &h, &version_payload());
        until_closed(&s);
    });
    let err = Client::connect(&p, short)
        .err()
        .expect("wrong msg_id accepted");
    assert!(
        matches!(
            err,
            ClientError::Protocol {
                cmd: Command::Version,
                ..
            }
        ),
        "{err:?}"
    );
    t.join().unwrap();

    // (b) A sparse mmap area outside its region.
    let (p, t) = fake_server(&dir, "b.sock", |s| {
        honest_start(&s);
        while let Ok(m) = sock::recv(&s, 1 << 21) {
            let caps = sparse_mmap_cap(&[(0x800, 0x1000)]);
            let info = RegionInfo {
                argsz: (32 + caps.len()) as u32,
                flags: REGION_READ | REGION_CAPS,
                index: 0,
                cap_offset: 32,
                size: 0x1000,
                offset: 0,
            };
            let mut p = info.as_bytes().to_vec();
            p.extend(caps);
            reply(&s, &m.header, &p);
        }
    });
    let err = Client::connect(&p, short)
        .err()
        .expect("bad sparse area accepted");
    assert!(
        matches!(
            err,
            ClientError::Protocol {
                cmd: Command::DeviceGetRegionInfo,
                ..
            }
        ),
        "{err:?}"
    );
    t.join().unwrap();

    // (c) Disconnects in the middle of negotiation (half a reply header).
    let (p, t) = fake_server(&dir, "c.sock", |s| {
        let m = sock::recv(&s, 1 << 21).unwrap();
        let h = m.header.reply(64);
        let _ = (&s).write_all(&h.as_bytes()[..8]);
    });
    let err = Client::connect(&p, short)
        .err()
        .expect("half a reply accepted");
    assert!(
        matches!(err, ClientError::Disconnected(Command::Version)),
        "{err:?}"
    );
    t.join().unwrap();
    // ... or before replying at all.
    let (p, t) = fake_server(&dir, "c2.sock", |s| {
        let _ = sock::recv(&s, 1 << 21);
    });
    let err = Client::connect(&p, short).err().expect("no reply accepted");
    assert!(
        matches!(err, ClientError::Disconnected(Command::Version)),
        "{err:?}"
    );
    t.join().unwrap();

    // (d) Never replies: a timeout within the given time.
    let (p, t) = fake_server(&dir, "d.sock", |s| {
        let _ = sock::recv(&s, 1 << 21);
        until_closed(&s);
    });
    let t0 = Instant::now();
    let err = Client::connect(&p, short).err().expect("silence accepted");
    let took = t0.elapsed();
    assert!(
        matches!(
            err,
            ClientError::Timeout {
                cmd: Command::Version,
                ..
            }
        ),
        "{err:?}"
    );
    assert!(took >= short && took < short * 4, "took {took:?}");
    t.join().unwrap();

    // (e) Region info for another region than asked.
    let (p, t) = fake_server(&dir, "e.sock", |s| {
        honest_start(&s);
        if let Ok(m) = sock::recv(&s, 1 << 21) {
            let info = RegionInfo {
                argsz: 32,
                index: 5,
                size: 16,
                ..Default::default()
            };
            reply(&s, &m.header, info.as_bytes());
        }
        until_closed(&s);
    });
    let err = Client::connect(&p, short)
        .err()
        .expect("wrong region accepted");
    assert!(
        matches!(
            err,
            ClientError::Protocol {
                cmd: Command::DeviceGetRegionInfo,
                ..
            }
        ),
        "{err:?}"
    );
    t.join().unwrap();

    // (f) A reply larger than anything negotiated: refused without allocating it.
    let (p, t) = fake_server(&dir, "f.sock", |s| {
        let m = sock::recv(&s, 1 << 21).unwrap();
        let h = m.header.reply(usize::MAX >> 33);
        let _ = (&s).write_all(h.as_bytes());
        until_closed(&s);
    });
    let err = Client::connect(&p, short)
        .err()
        .expect("huge reply accepted");
    assert!(
        matches!(
            err,
            ClientError::Protocol {
                cmd: Command::Version,
                ..
            }
        ),
        "{err:?}"
    );
    t.join().unwrap();

    // (g) Claims thousands of regions.
    let (p, t) = fake_server(&dir, "g.sock", |s| {
        let m = sock::recv(&s, 1 << 21).unwrap();
        reply(&s, &m.header, &version_payload());
        let m = sock::recv(&s, 1 << 21).unwrap();
        let i = DeviceInfo {
            argsz: 16,
            flags: DEVICE_FLAGS_PCI,
            num_regions: 100_000,
            num_irqs: 5,
        };
        reply(&s, &m.header, i.as_bytes());
        until_closed(&s);
    });
    let err = Client::connect(&p, short)
        .err()
        .expect("100000 regions accepted");
    assert!(
        matches!(
            err,
            ClientError::Protocol {
                cmd: Command::DeviceGetInfo,
                ..
            }
        ),
        "{err:?}"
    );
    t.join().unwrap();

    // (h) A server-initiated DMA request for unmapped memory while the client waits: the
    // client answers with an error and still gets its reply.
    let (p, t) = fake_server(&dir, "h.sock", |s| {
        honest_start(&s);
        let m = sock::recv(&s, 1 << 21).unwrap();
        let a = DmaAccess {
            address: 0x1234_0000,
            count: 16,
        };
        let dh = Header::command(0x8001, Command::DmaRead, HEADER_SIZE + 16);
        sock::send(&s, &[dh.as_bytes(), a.as_bytes()], &[]).unwrap();
        let r = sock::recv(&s, 1 << 21).unwrap();
        assert!(r.header.is_reply() && r.header.is_error());
        assert_eq!(r.header.msg_id, 0x8001);
        assert_eq!(r.header.error, libc::EFAULT as u32);
        let info = RegionInfo {
            argsz: 32,
            flags: REGION_READ,
            index: 0,
            size: 16,
            ..Default::default()
        };
        reply(&s, &m.header, info.as_bytes());
        until_closed(&s);
    });
    let c = Client::connect(&p, short).expect("honest server");
    assert_eq!(c.regions().len(), 1);
    assert_eq!(c.dma_requests_served(), 0);
    drop(c);
    t.join().unwrap();
}

// ---------------------------------------------------------------------------------------
// Thread safety of the interrupt path
// ---------------------------------------------------------------------------------------

#[test]
fn concurrent_triggers_and_region_reads() {
    within(25, || {
        let rig = Arc::new(DmaRig::new(true));
        let ctx = rig.dev.context().clone();
        let done = Arc::new(AtomicBool::new(false));
        let triggers: Vec<_> = (0..4)
            .map(|_| {
                let ctx = ctx.clone();
                std::thread::spawn(move || {
                    for _ in 0..10_000 {
                        ctx.trigger(0);
                    }
                })
            })
            .collect();
        let reader = {
            let rig = rig.clone();
            let done = done.clone();
            std::thread::spawn(move || {
                let mut n = 0u64;
                while !done.load(Ordering::Relaxed) {
                    assert_eq!(rig.reg(dma::reg::ID), dma::ID);
                    let mut pba = [0u8; 8];
                    rig.client.region_read(0, 0xc00, &mut pba).unwrap();
                    n += 1;
                }
                n
            })
        };
        let mut counted = 0u64;
        while triggers.iter().any(|t| !t.is_finished()) {
            counted += drain(&rig.ev[0]);
        }
        for t in triggers {
            t.join().unwrap();
        }
        done.store(true, Ordering::Relaxed);
        let reads = reader.join().unwrap();
        counted += drain(&rig.ev[0]);
        let st = ctx.irq_stats();
        let signalled = st.signalled.load(Ordering::Relaxed);
        assert_eq!(st.triggered.load(Ordering::Relaxed), 40_000);
        assert_eq!(signalled, 40_000, "all unmasked, all signalled");
        assert_eq!(counted, signalled, "eventfd counts vs signals");
        assert!(reads > 0);
    });
}

// ---------------------------------------------------------------------------------------
// MSI, big regions, and DMA edge cases
// ---------------------------------------------------------------------------------------

#[test]
fn msi_masking_and_pending_bits() {
    let h = Harness::new();
    let (_e, dev) = h.dma("dma.sock");
    let c = connect(dev.path());
    let ctx = dev.context().clone();
    let ev = eventfd();
    c.set_irq_eventfds(IRQ_MSI, 0, &[ev.as_raw_fd()]).unwrap();
    // Nothing enabled: dropped.
    assert_eq!(ctx.trigger(0), vfu::server::Delivery::Dropped);
    let msi = cap_offset(&c, pci::CAP_MSI);
    c.config_write(msi + 4, &0xfee0_0000u32.to_le_bytes())
        .unwrap();
    c.config_write(msi + 2, &1u16.to_le_bytes()).unwrap();
    assert_eq!(ctx.trigger(0), vfu::server::Delivery::Signalled);
    assert!(readable(ev.as_raw_fd(), TIMEOUT));
    assert_eq!(drain(&ev), 1);
    assert_eq!(ctx.trigger(1), vfu::server::Delivery::Dropped, "one vector");
    // Masked: pending bit in config space, delivered on unmask.
    c.config_write(msi + 16, &1u32.to_le_bytes()).unwrap();
    assert_eq!(ctx.trigger(0), vfu::server::Delivery::Pending);
    assert_eq!(rd32(&c, PCI_CONFIG_REGION, msi + 20), 1, "MSI pending bit");
    assert!(!readable(ev.as_raw_fd(), Duration::from_millis(50)));
    c.config_write(msi + 16, &0u32.to_le_bytes()).unwrap();
    assert!(readable(ev.as_raw_fd(), TIMEOUT));
    assert_eq!(drain(&ev), 1);
    assert_eq!(rd32(&c, PCI_CONFIG_REGION, msi + 20), 0);
    // The pending-bit register is read-only to the client.
    c.config_write(msi + 20, &1u32.to_le_bytes()).unwrap();
    assert_eq!(rd32(&c, PCI_CONFIG_REGION, msi + 20), 0);
    // No eventfd yet: pending until one is given.
    c.disable_irqs(IRQ_MSI).unwrap();
    assert_eq!(ctx.trigger(0), vfu::server::Delivery::Pending);
    c.set_irq_eventfds(IRQ_MSI, 0, &[ev.as_raw_fd()]).unwrap();
    assert!(readable(ev.as_raw_fd(), TIMEOUT));
    assert_eq!(drain(&ev), 1);
    // MSI-X takes precedence once enabled.
    let msix = cap_offset(&c, pci::CAP_MSIX);
    c.config_write(msix + 2, &0x8000u16.to_le_bytes()).unwrap();
    assert_eq!(
        ctx.trigger(0),
        vfu::server::Delivery::Pending,
        "entry masked"
    );
    assert!(!readable(ev.as_raw_fd(), Duration::from_millis(50)));
}

/// A device with one big BAR of plain memory served by callbacks.
struct Ram(Mutex<Vec<u8>>);

impl vfu::server::DeviceOps for Ram {
    fn region_read(
        &self,
        _dev: &vfu::server::DeviceContext,
        _bar: u32,
        offset: u64,
        data: &mut [u8],
    ) -> Result<(), vfu::server::DeviceError> {
        let m = self.0.lock().unwrap();
        data.copy_from_slice(&m[offset as usize..offset as usize + data.len()]);
        Ok(())
    }

    fn region_write(
        &self,
        _dev: &vfu::server::DeviceContext,
        _bar: u32,
        offset: u64,
        data: &[u8],
    ) -> Result<(), vfu::server::DeviceError> {
        let mut m = self.0.lock().unwrap();
        m[offset as usize..offset as usize + data.len()].copy_from_slice(data);
        Ok(())
    }

    fn reset(&self, _dev: &vfu::server::DeviceContext) -> Result<(), vfu::server::DeviceError> {
        Ok(())
    }

    fn save(&self, _dev: &vfu::server::DeviceContext) -> Result<Vec<u8>, vfu::server::DeviceError> {
        Ok(self.0.lock().unwrap().clone())
    }

    fn load(
        &self,
        _dev: &vfu::server::DeviceContext,
        s: &[u8],
    ) -> Result<(), vfu::server::DeviceError> {
        self.0.lock().unwrap().copy_from_slice(s);
        Ok(())
    }
}

#[test]
fn region_access_larger_than_max_data_xfer_size() {
    let h = Harness::new();
    let size = 4 << 20;
    let ram = Arc::new(Ram(Mutex::new(vec![0; size])));
    let dev = vfu::server::DeviceDescription::new(
        "ram",
        pci::Ids {
            vendor: 0x1234,
            device: 0x5678,
            class: 0x050000,
            ..Default::default()
        },
    )
    .bar(0, pci::Bar::mem32(size as u64), &[])
    .realize(ram.clone())
    .unwrap()
    .attach(&h.server, &h.path("ram.sock"))
    .unwrap();
    let c = connect(dev.path());
    assert_eq!(c.region(0).unwrap().size, size as u64);
    // 3 MiB in one call: the client must split it to respect max_data_xfer_size (1 MiB).
    let data = pattern(3 << 20, 9);
    c.region_write(0, 0x1000, &data).unwrap();
    assert_eq!(
        &ram.0.lock().unwrap()[0x1000..0x1000 + data.len()],
        &data[..]
    );
    let mut back = vec![0; data.len()];
    c.region_read(0, 0x1000, &mut back).unwrap();
    assert_eq!(back, data);
    // Migration state bigger than one MIG_DATA_READ also round-trips.
    let blob = c.save_state().unwrap();
    assert!(blob.len() > size);
    c.set_migration_state(MigState::Running).unwrap();
    ram.0.lock().unwrap().fill(0);
    c.load_state(&blob).unwrap();
    assert_eq!(
        &ram.0.lock().unwrap()[0x1000..0x1000 + data.len()],
        &data[..]
    );
}

#[test]
fn dma_map_while_message_dma_is_in_flight() {
    let h = Harness::new();
    let (engine, dev) = h.dma("dma.sock");
    let c = connect(dev.path());
    let base = 0x4000_0000u64;
    let mem = Arc::new(VecMem(Mutex::new(vec![0; 1 << 20])));
    c.dma_map_local(base, 1 << 20, DMA_READ | DMA_WRITE, mem.clone())
        .unwrap();
    c.config_write(4, &0x6u16.to_le_bytes()).unwrap();
    {
        let mut m = mem.0.lock().unwrap();
        m[0x1000..0x1100].fill(0x77);
        m[0..8].copy_from_slice(&(base + 0x1000).to_le_bytes());
        m[8..16].copy_from_slice(&(base + 0x2000).to_le_bytes());
        m[16..20].copy_from_slice(&0x100u32.to_le_bytes());
    }
    c.region_write(0, dma::reg::DESC, &base.to_le_bytes())
        .unwrap();
    c.region_write(0, dma::reg::DOORBELL, &1u32.to_le_bytes())
        .unwrap();
    // The engine now waits for this client to serve its DMA_READ; meanwhile the client
    // maps more memory (with an fd). That must neither stall the server nor fail the copy.
    std::thread::sleep(Duration::from_millis(50));
    let fd = memfd(0x10000);
    let t0 = Instant::now();
    c.dma_map_fd(GUEST, 0x10000, fd.as_raw_fd(), 0, DMA_READ | DMA_WRITE)
        .unwrap();
    let deadline = Instant::now() + TIMEOUT;
    while engine.completed() + rd32(&c, 0, dma::reg::ERRORS) < 1 {
        assert!(Instant::now() < deadline, "copy never finished");
    }
    assert!(
        t0.elapsed() < Duration::from_secs(2),
        "DMA_MAP stalled {:?} behind the in-flight message DMA",
        t0.elapsed()
    );
    assert_eq!(engine.completed(), 1, "the copy failed");
    assert_eq!(&mem.0.lock().unwrap()[0x2000..0x2100], &[0x77; 0x100][..]);

    // A client that goes away while the engine waits on it does not stall the server for
    // the next client either (one client per device: it takes over once `c` hung up).
    c.region_write(0, dma::reg::DOORBELL, &1u32.to_le_bytes())
        .unwrap();
    std::thread::sleep(Duration::from_millis(50));
    drop(c);
    let t0 = Instant::now();
    let other = connect(dev.path());
    assert_eq!(rd32(&other, 0, dma::reg::ID), dma::ID);
    wait_for("the orphaned copy to fail", || {
        rd32(&other, 0, dma::reg::ERRORS) == 1
    });
    assert!(
        t0.elapsed() < Duration::from_secs(2),
        "stalled {:?}",
        t0.elapsed()
    );
}

#[test]
fn dma_map_of_an_fd_smaller_than_the_mapping_is_refused() {
    let rig = DmaRig::new(true);
    // 4 KiB of memfd mapped as 64 KiB: touching the rest would SIGBUS the server process.
    let small = memfd(0x1000);
    let err = rig
        .client
        .dma_map_fd(
            0x2000_0000,
            0x10000,
            small.as_raw_fd(),
            0,
            DMA_READ | DMA_WRITE,
        )
        .unwrap_err();
    assert!(
        matches!(err, ClientError::Server { cmd: Command::DmaMap, errno } if errno == libc::EINVAL),
        "{err:?}"
    );
    // ... and with an offset that pushes it past the end.
    assert!(
        rig.client
            .dma_map_fd(0x2000_0000, 0x1000, small.as_raw_fd(), 0x1000, DMA_READ)
            .is_err()
    );
    // Exactly the file: fine.
    rig.client
        .dma_map_fd(
            0x2000_0000,
            0x1000,
            small.as_raw_fd(),
            0,
            DMA_READ | DMA_WRITE,
        )
        .unwrap();
    // A descriptor reaching into what would have been past the end: an error, not a crash.
    rig.put_desc(0, 0x2000_0000, 0x2000_8000, 16, 1);
    rig.ring(GUEST, 1);
    assert!(readable(rig.ev[1].as_raw_fd(), TIMEOUT));
    assert_eq!(rig.status_of(0), dma::STATUS_FAILED | libc::EFAULT as u32);
    assert_eq!(rig.reg(dma::reg::ID), dma::ID);
}

#[test]
fn a_client_stalled_mid_message_holds_up_only_itself() {
    // One serving thread: before messages were assembled piecewise, a client that sent half
    // a message held that thread (and every other client) until its read timed out.
    let h = Harness::new();
    let (_g, dev) = h.gpio("gpio.sock");
    // One client per device: three cards.
    let (_g2, dev2) = h.gpio("gpio2.sock");
    let (_g3, dev3) = h.gpio("gpio3.sock");
    let mut stalled = Raw::connect(dev.path());
    stalled.negotiate();
    let mut half = Raw::connect(dev2.path());
    half.negotiate();
    // Half a header from one, a header and part of the payload from the other.
    let info = Header {
        msg_id: 77,
        cmd: Command::DeviceGetInfo as u16,
        size: (HEADER_SIZE + 16) as u32,
        flags: TYPE_COMMAND,
        error: 0,
    };
    let mut q = [0u8; 16];
    q[..4].copy_from_slice(&16u32.to_ne_bytes());
    (&stalled.s).write_all(&info.as_bytes()[..8]).unwrap();
    (&half.s).write_all(info.as_bytes()).unwrap();
    (&half.s).write_all(&q[..5]).unwrap();

    let c = connect(dev3.path());
    let t = Instant::now();
    for _ in 0..50 {
        rd8(&c, gpio::BAR, 0);
    }
    assert!(
        t.elapsed() < Duration::from_secs(1),
        "50 reads by a healthy client took {:?} while two clients stalled mid-message",
        t.elapsed()
    );
    // The stalled clients finish their messages later and get their replies.
    (&stalled.s).write_all(&info.as_bytes()[8..]).unwrap();
    (&stalled.s).write_all(&q).unwrap();
    (&half.s).write_all(&q[5..]).unwrap();
    for r in [&stalled, &half] {
        let m = r.recv();
        assert!(
            m.header.is_reply() && !m.header.is_error(),
            "{:?}",
            m.header
        );
        assert_eq!(m.header.msg_id, 77);
        assert_eq!(m.payload.len(), 16);
    }
}

#[test]
fn dma_dirty_logging_reports_and_clears_device_writes() {
    let rig = DmaRig::new(true);
    let c = &rig.client;
    let page = 4096u64;
    // Not started: a report is refused.
    assert!(c.dma_logging_report(GUEST, 16 * page, page).is_err());
    assert!(matches!(
        c.dma_logging_start(1000, &[]),
        Err(ClientError::Server { errno, .. }) if errno == libc::EINVAL
    ));
    c.dma_logging_start(page, &[]).unwrap();
    assert_eq!(rig.dev.context().dma_logging(), Some(page));
    let ctx = rig.dev.context();
    // Device writes through the fd mapping: pages 1 and 2 (a write across their edge) and 9.
    ctx.dma_write(GUEST + page + page - 8, &[1; 16]).unwrap();
    ctx.dma_write(GUEST + 9 * page, &[2; 1]).unwrap();
    // Reads do not dirty.
    let mut b = [0u8; 64];
    ctx.dma_read(GUEST + 5 * page, &mut b).unwrap();
    // A write the device made some other way, marked by hand.
    ctx.dma_mark_dirty(GUEST + 12 * page, 1);
    let words = c.dma_logging_report(GUEST, 16 * page, page).unwrap();
    assert_eq!(words, vec![(1 << 1) | (1 << 2) | (1 << 9) | (1 << 12)]);
    // Reported pages are cleared.
    assert_eq!(
        c.dma_logging_report(GUEST, 16 * page, page).unwrap(),
        vec![0]
    );
    // A report of a sub-range counts from its own first page.
    ctx.dma_write(GUEST + 3 * page, &[3; 8]).unwrap();
    assert_eq!(
        c.dma_logging_report(GUEST + 2 * page, 4 * page, page)
            .unwrap(),
        vec![1 << 1]
    );
    // Another page size than logging's is refused; so is a misaligned range.
    assert!(c.dma_logging_report(GUEST, 16 * page, 2 * page).is_err());
    assert!(c.dma_logging_report(GUEST + 1, page, page).is_err());
    c.dma_logging_stop().unwrap();
    assert_eq!(ctx.dma_logging(), None);
    assert!(c.dma_logging_report(GUEST, 16 * page, page).is_err());
}

mod sample {
    //! libvfio-user's sample device on our framework, driven by our client.
    use super::*;
    use vfu::devices::sample::{self, Sample};

    fn serve(h: &Harness, name: &str) -> (Arc<Sample>, AttachedDevice) {
        let s = Sample::new();
        let dev = Sample::description()
            .realize(s.clone())
            .expect("realize sample")
            .attach(&h.server, &h.path(name))
            .expect("attach sample");
        s.start(dev.context());
        (s, dev)
    }

    fn epoch() -> i64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64
    }

    fn read_all(c: &Client, chunk: u32) -> Vec<u8> {
        let mut out = Vec::new();
        loop {
            let d = c.mig_data_read(chunk).unwrap();
            if d.is_empty() {
                return out;
            }
            out.extend(d);
        }
    }

    #[test]
    fn timer_intx_dma_dirty_logging_and_precopy_migration() {
        let h = Harness::new();
        let (src_dev, src) = serve(&h, "src.sock");
        let c = connect(src.path());
        let mut cfg = [0u8; 4];
        c.config_read(0, &mut cfg).unwrap();
        assert_eq!(cfg, [0xad, 0xde, 0xef, 0xbe]);
        assert_eq!(c.region(1).unwrap().size, sample::BAR1_SIZE);
        // Slot 0: memory served through messages; slot 1: a memfd the server maps.
        let ram = Arc::new(VecMem(Mutex::new(vec![0u8; 4096])));
        c.dma_map_local(0, 4096, DMA_READ | DMA_WRITE, ram.clone())
            .unwrap();
        let fd = memfd(4096);
        c.dma_map_fd(0x1000, 4096, fd.as_raw_fd(), 0, DMA_READ | DMA_WRITE)
            .unwrap();
        let intx = eventfd();
        c.set_irq_eventfds(IRQ_INTX, 0, &[intx.as_raw_fd()])
            .unwrap();
        c.dma_logging_start(4096, &[]).unwrap();
        // BAR0: the timer, due now.
        c.region_write(0, 0, &epoch().to_ne_bytes()).unwrap();
        assert!(
            readable(intx.as_raw_fd(), Duration::from_secs(3)),
            "no INTx"
        );
        // The message DMA needs the client to read its socket: keep it busy until done.
        wait_for("the sample's DMA pass", || {
            let mut b = [0u8; 8];
            c.region_read(0, 0, &mut b).unwrap();
            src_dev.fired.load(Ordering::Relaxed) >= 1
        });
        let want: Vec<u8> = (0..4).flat_map(|i| [b'A' + i; 1024]).collect();
        assert_eq!(
            *ram.0.lock().unwrap(),
            want,
            "written through DMA_WRITE messages"
        );
        let m = Mapped::new(fd.as_raw_fd(), 0, 4096);
        let mut direct = vec![0u8; 4096];
        m.read(0, &mut direct);
        assert_eq!(direct, want, "written through the fd");
        // The fd-mapped page is logged dirty by the server; the message one is the client's.
        assert_eq!(c.dma_logging_report(0x1000, 4096, 4096).unwrap(), vec![1]);
        assert_eq!(c.dma_logging_report(0, 4096, 4096).unwrap(), vec![0]);
        c.dma_logging_stop().unwrap();

        // BAR1: 12 KiB of storage (a write across the trapped middle page), 4 KiB reserved.
        let garbage = pattern(0x3000, 7);
        c.region_write(1, 0, &garbage).unwrap();
        let mut tail = [1u8; 16];
        c.region_write(1, 0x3000, &tail).unwrap();
        c.region_read(1, 0x3000, &mut tail).unwrap();
        assert_eq!(tail, [0; 16]);
        // Schedule an interrupt 2 s ahead, then migrate: PRE_COPY yields BAR1 (12 KiB),
        // STOP_COPY BAR1 and the timer (12 KiB + 8).
        let due = epoch() + 2;
        c.region_write(0, 0, &due.to_ne_bytes()).unwrap();
        assert_eq!(
            c.migration_flags().unwrap(),
            Some(MIGRATION_STOP_COPY | MIGRATION_PRE_COPY)
        );
        c.set_migration_state(MigState::PreCopy).unwrap();
        let pre = read_all(&c, 1024);
        assert_eq!(pre, garbage);
        c.set_migration_state(MigState::StopCopy).unwrap();
        let state = read_all(&c, 1024);
        assert_eq!(state.len(), 0x3000 + 8);
        assert_eq!(&state[..0x3000], &garbage[..]);
        assert_eq!(&state[0x3000..], &due.to_ne_bytes());
        c.set_migration_state(MigState::Stop).unwrap();

        // The destination: RESUMING takes the stream; a short one cannot run.
        let (_dst_dev, dst) = serve(&h, "dst.sock");
        let d = connect(dst.path());
        d.set_migration_state(MigState::Resuming).unwrap();
        d.mig_data_write(&state[..100]).unwrap();
        assert!(d.set_migration_state(MigState::Running).is_err());
        d.reset().unwrap();
        d.set_migration_state(MigState::Resuming).unwrap();
        for piece in state.chunks(1024) {
            d.mig_data_write(piece).unwrap();
        }
        d.set_migration_state(MigState::Stop).unwrap();
        let mut back = vec![0u8; 0x3000];
        d.region_read(1, 0, &mut back).unwrap();
        assert_eq!(back, garbage);
        let intx = eventfd();
        d.set_irq_eventfds(IRQ_INTX, 0, &[intx.as_raw_fd()])
            .unwrap();
        d.set_migration_state(MigState::Running).unwrap();
        // The interrupt scheduled on the source fires on the destination.
        assert!(
            readable(intx.as_raw_fd(), Duration::from_secs(5)),
            "the migrated timer did not fire"
        );
        assert!(epoch() >= due);
    }

    #[test]
    fn bad_bar0_accesses_are_refused() {
        let h = Harness::new();
        let (_s, dev) = serve(&h, "s.sock");
        let c = connect(dev.path());
        for (off, len) in [(0u64, 4usize), (8, 8), (1, 8)] {
            let mut b = vec![0u8; len];
            assert!(matches!(
                c.region_read(0, off, &mut b),
                Err(ClientError::Server { errno, .. }) if errno == libc::EINVAL
            ));
        }
        // MIG_DATA_READ outside PRE_COPY / STOP_COPY is refused.
        assert!(c.mig_data_read(64).is_err());
    }
}
