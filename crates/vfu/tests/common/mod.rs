//! Helpers shared by the end-to-end tests of the device framework (`server_*.rs`) and the
//! hardening tests (`limits.rs`, `sharing.rs`, `live_fuzz.rs`, ...): a real [`Server`] on
//! background threads, our client and a raw connection that sends crafted messages over a
//! real Unix socket, memfds and their mappings, eventfds, config-space readers, and a DMA
//! engine rig with guest memory and MSI-X set up.

#![allow(dead_code)]

use std::io::Read;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, mpsc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vfu::client::{Client, DmaMemory};
use vfu::devices::dma::{self, DmaEngine, DmaOps};
use vfu::devices::gpio::Gpio;
use vfu::proto::*;
use vfu::server::{AttachedDevice, Server, ShutdownHandle};
use vfu::sock;
use vmm_sys_util::eventfd::EventFd;
use zerocopy::IntoBytes;

/// Every wait in these tests.
pub const TIMEOUT: Duration = Duration::from_secs(5);
/// Guest-physical address of the tests' "guest memory".
pub const GUEST: u64 = 0x1000_0000;
/// Size of the [`DmaRig`]'s guest memory.
pub const GUEST_SIZE: usize = 4 << 20;

/// A server running `run()` on two threads, stopped and joined on drop.
pub struct Harness {
    pub dir: tempfile::TempDir,
    pub server: Server,
    stop: ShutdownHandle,
    thread: Option<JoinHandle<()>>,
}

impl Harness {
    /// A new server with no devices, serving from two threads.
    pub fn new() -> Harness {
        Harness::with_threads(2)
    }

    /// A new server with no devices, serving from one thread (`Server::run`): what one
    /// stalled client could hold up, it would hold up for everyone.
    pub fn one_thread() -> Harness {
        Harness::with_threads(1)
    }

    /// A new server with no devices, serving from `threads` threads.
    pub fn with_threads(threads: usize) -> Harness {
        let server = Server::new(false).expect("server");
        let stop = server.shutdown_handle();
        let s = server.clone();
        let thread = std::thread::spawn(move || s.run_threads(threads).expect("server loop"));
        Harness {
            dir: tempfile::tempdir().expect("tempdir"),
            server,
            stop,
            thread: Some(thread),
        }
    }

    /// Whether the serving loop still runs (it ends only on shutdown, or on an error).
    pub fn server_alive(&self) -> bool {
        self.thread.as_ref().is_some_and(|t| !t.is_finished())
    }

    /// A socket path in the test's directory.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Attach a GPIO card at `name`.
    pub fn gpio(&self, name: &str) -> (Arc<Gpio>, AttachedDevice) {
        let g = Gpio::new(true);
        let dev = Gpio::description()
            .realize(g.clone())
            .expect("realize gpio")
            .attach(&self.server, &self.path(name))
            .expect("attach gpio");
        (g, dev)
    }

    /// Attach a DMA engine at `name`.
    pub fn dma(&self, name: &str) -> (Arc<DmaEngine>, AttachedDevice) {
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

/// A raw connection for sending crafted messages.
pub struct Raw {
    pub s: UnixStream,
    pub id: u16,
}

impl Raw {
    /// Connect (no VERSION yet).
    pub fn connect(path: &Path) -> Raw {
        let s = UnixStream::connect(path).expect("connect");
        s.set_read_timeout(Some(TIMEOUT)).unwrap();
        s.set_write_timeout(Some(TIMEOUT)).unwrap();
        Raw { s, id: 1 }
    }

    /// Send a command; returns its message ID.
    pub fn send(&mut self, cmd: u16, payload: &[u8], fds: &[RawFd]) -> u16 {
        self.id = self.id.wrapping_add(1);
        let h = Header {
            msg_id: self.id,
            cmd,
            size: (HEADER_SIZE + payload.len()) as u32,
            flags: TYPE_COMMAND,
            error: 0,
        };
        sock::send(&self.s, &[h.as_bytes(), payload], fds).expect("send");
        self.id
    }

    /// The next message.
    pub fn recv(&self) -> sock::Message {
        sock::recv(&self.s, 2 << 20).expect("reply")
    }

    /// Send and return the reply (checked to echo the message ID).
    pub fn call(&mut self, cmd: Command, payload: &[u8], fds: &[RawFd]) -> sock::Message {
        self.call_raw(cmd as u16, payload, fds)
    }

    /// [`Raw::call`] with any command number, known or not.
    pub fn call_raw(&mut self, cmd: u16, payload: &[u8], fds: &[RawFd]) -> sock::Message {
        let id = self.send(cmd, payload, fds);
        let r = self.recv();
        assert!(r.header.is_reply(), "{:?}", r.header);
        assert_eq!(r.header.msg_id, id);
        r
    }

    /// Send and expect success; the reply's payload.
    pub fn ok(&mut self, cmd: Command, payload: &[u8], fds: &[RawFd]) -> Vec<u8> {
        let r = self.call(cmd, payload, fds);
        assert!(
            !r.header.is_error(),
            "{cmd:?} refused: errno {}",
            r.header.error
        );
        r.payload
    }

    /// Send and expect an error reply with `errno`.
    pub fn expect_error(&mut self, cmd: Command, payload: &[u8], fds: &[RawFd], errno: i32) {
        let r = self.call(cmd, payload, fds);
        check_errno(&r, &cmd, errno);
    }

    /// [`Raw::expect_error`] with any command number, known or not.
    pub fn expect_error_raw(&mut self, cmd: u16, payload: &[u8], fds: &[RawFd], errno: i32) {
        let r = self.call_raw(cmd, payload, fds);
        check_errno(&r, &cmd, errno);
    }

    /// The server closes the connection (after any error reply).
    pub fn expect_closed(&self) {
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

    /// VERSION with default capabilities; the raw reply.
    pub fn version(&mut self) -> sock::Message {
        let mut p = vec![0, 0, 1, 0];
        p.extend(Caps::default().to_json());
        self.call(Command::Version, &p, &[])
    }

    /// VERSION, expected to succeed.
    pub fn negotiate(&mut self) {
        let r = self.version();
        assert!(
            !r.header.is_error(),
            "VERSION refused: errno {}",
            r.header.error
        );
    }

    /// REGION_READ of 4 bytes.
    pub fn read32(&mut self, region: u32, offset: u64) -> u32 {
        let a = RegionAccess {
            offset,
            region,
            count: 4,
        };
        let p = self.ok(Command::RegionRead, a.as_bytes(), &[]);
        u32::from_ne_bytes(p[16..20].try_into().unwrap())
    }
}

/// `r` is an error reply to `cmd` with `errno`.
fn check_errno(r: &sock::Message, cmd: &dyn std::fmt::Debug, errno: i32) {
    assert!(
        r.header.is_error(),
        "{cmd:?} was accepted; expected errno {errno}"
    );
    assert_eq!(
        r.header.error,
        errno as u32,
        "{cmd:?}: errno {} ({}), expected {errno} ({})",
        r.header.error,
        std::io::Error::from_raw_os_error(r.header.error as i32),
        std::io::Error::from_raw_os_error(errno)
    );
}

/// DMA_MAP payload.
pub fn dma_map(address: u64, size: u64, offset: u64) -> Vec<u8> {
    DmaMap {
        argsz: 32,
        flags: DMA_READ | DMA_WRITE,
        offset,
        address,
        size,
    }
    .as_bytes()
    .to_vec()
}

/// DEVICE_FEATURE payload.
pub fn feature(flags: u32, data: &[u8]) -> Vec<u8> {
    let mut p = DeviceFeature {
        argsz: (8 + data.len()) as u32,
        flags,
    }
    .as_bytes()
    .to_vec();
    p.extend_from_slice(data);
    p
}

/// A memfd of `size` bytes, optionally sealed against shrinking and growing.
pub fn memfd(size: u64, sealed: bool) -> OwnedFd {
    // SAFETY: memfd_create with a valid NUL-terminated name.
    let fd = unsafe {
        libc::memfd_create(
            c"vfu-hardening".as_ptr(),
            libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING,
        )
    };
    assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
    // SAFETY: a new descriptor that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: ftruncate of our own memfd.
    let r = unsafe { libc::ftruncate(fd.as_raw_fd(), size as libc::off_t) };
    assert_eq!(r, 0);
    if sealed {
        // SAFETY: F_ADD_SEALS on our own memfd with an integer argument.
        let r = unsafe {
            libc::fcntl(
                fd.as_raw_fd(),
                libc::F_ADD_SEALS,
                libc::F_SEAL_SHRINK | libc::F_SEAL_GROW,
            )
        };
        assert_eq!(r, 0, "F_ADD_SEALS: {}", std::io::Error::last_os_error());
    }
    fd
}

/// Our client, connected to `path` (VERSION and discovery done).
pub fn connect(path: &Path) -> Client {
    Client::connect(path, TIMEOUT).expect("connect")
}

/// Run `f` on a thread; fail the test if it takes longer than `secs` (a deadlock or hang).
pub fn within<T: Send + 'static>(secs: u64, f: impl FnOnce() -> T + Send + 'static) -> T {
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

/// A non-blocking eventfd.
pub fn eventfd() -> EventFd {
    EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC).expect("eventfd")
}

/// Whether `fd` becomes readable within `timeout`.
pub fn readable(fd: RawFd, timeout: Duration) -> bool {
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
pub fn drain(e: &EventFd) -> u64 {
    e.read().unwrap_or(0)
}

/// A shared mapping of an fd, accessed only through raw copies (the server writes the
/// same pages from its own mapping).
pub struct Mapped {
    ptr: *mut u8,
    len: usize,
}

impl Mapped {
    /// Map `len` bytes of `fd` from `offset`, shared, read-write.
    pub fn new(fd: RawFd, offset: u64, len: usize) -> Mapped {
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

    /// Copy out of the mapping at `off`.
    pub fn read(&self, off: usize, buf: &mut [u8]) {
        assert!(off + buf.len() <= self.len);
        // SAFETY: inside the live mapping (checked); raw byte copy, no references held.
        unsafe { std::ptr::copy_nonoverlapping(self.ptr.add(off), buf.as_mut_ptr(), buf.len()) }
    }

    /// Copy into the mapping at `off`.
    pub fn write(&self, off: usize, data: &[u8]) {
        assert!(off + data.len() <= self.len);
        // SAFETY: inside the live, writable mapping (checked).
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), self.ptr.add(off), data.len()) }
    }

    /// The little-endian u32 at `off`.
    pub fn u32_at(&self, off: usize) -> u32 {
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

/// REGION_READ of a little-endian u32.
pub fn rd32(c: &Client, region: u32, off: u64) -> u32 {
    let mut b = [0; 4];
    c.region_read(region, off, &mut b).expect("region read");
    u32::from_le_bytes(b)
}

/// A little-endian u16 of config space.
pub fn rd16_cfg(c: &Client, off: u64) -> u16 {
    let mut b = [0; 2];
    c.config_read(off, &mut b).expect("config read");
    u16::from_le_bytes(b)
}

/// REGION_READ of one byte.
pub fn rd8(c: &Client, region: u32, off: u64) -> u8 {
    let mut b = [0; 1];
    c.region_read(region, off, &mut b).expect("region read");
    b[0]
}

/// The whole config space.
pub fn config(c: &Client) -> Vec<u8> {
    let size = c.region(PCI_CONFIG_REGION).expect("config region").size as usize;
    let mut v = vec![0; size];
    c.config_read(0, &mut v).expect("config read");
    v
}

/// The standard capability list: (id, offset).
pub fn cap_chain(cfg: &[u8]) -> Vec<(u8, usize)> {
    let mut out = Vec::new();
    let mut at = usize::from(cfg[0x34]);
    while at != 0 && out.len() < 48 {
        out.push((cfg[at], at));
        at = usize::from(cfg[at + 1]);
    }
    out
}

/// The config-space offset of capability `id` (which must be there).
pub fn cap_offset(c: &Client, id: u8) -> u64 {
    let cfg = config(c);
    cap_chain(&cfg)
        .into_iter()
        .find(|&(i, _)| i == id)
        .map(|(_, at)| at as u64)
        .unwrap_or_else(|| panic!("capability {id:#x} missing"))
}

/// Poll `cond` until true or the deadline.
pub fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + TIMEOUT;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// A DMA engine with guest memory mapped, MSI-X set up and eventfds on both vectors.
pub struct DmaRig {
    // Field order is drop order: the client goes before the server stops.
    /// Our client, connected.
    pub client: Client,
    /// The device.
    pub engine: Arc<DmaEngine>,
    /// Its attachment to the server.
    pub dev: AttachedDevice,
    /// The guest memory, mapped here too.
    pub mem: Mapped,
    _memfd: OwnedFd,
    /// The MSI-X eventfds of vectors 0 (completion) and 1 (error).
    pub ev: [EventFd; 2],
    _h: Harness,
}

impl DmaRig {
    /// A DMA engine with 4 MiB of memfd guest memory mapped at [`GUEST`], MSI-X eventfds
    /// for both vectors, MSI-X enabled with both entries unmasked, and bus mastering on
    /// when `bus_master`.
    pub fn new(bus_master: bool) -> DmaRig {
        let h = Harness::one_thread();
        let (engine, dev) = h.dma("dma.sock");
        let client = connect(dev.path());
        let memfd = memfd(GUEST_SIZE as u64, true);
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

    /// Write MSI-X table entry `v` (address and data).
    pub fn program_vector(&self, v: u64) {
        let at = 0x800 + 16 * v;
        self.client
            .region_write(0, at, &(0xfee0_0000u64 + v * 4).to_le_bytes())
            .expect("msix address");
        self.client
            .region_write(0, at + 8, &(0x40u32 + v as u32).to_le_bytes())
            .expect("msix data");
    }

    /// Mask or unmask MSI-X table entry `v`.
    pub fn mask_vector(&self, v: u64, masked: bool) {
        self.client
            .region_write(0, 0x800 + 16 * v + 12, &u32::from(masked).to_le_bytes())
            .expect("msix vector control");
    }

    /// A BAR0 register.
    pub fn reg(&self, off: u64) -> u32 {
        rd32(&self.client, 0, off)
    }

    /// Write a descriptor at `off` in guest memory.
    pub fn put_desc(&self, off: usize, src: u64, dst: u64, len: u32, flags: u32) {
        let mut d = [0u8; 32];
        d[0..8].copy_from_slice(&src.to_le_bytes());
        d[8..16].copy_from_slice(&dst.to_le_bytes());
        d[16..20].copy_from_slice(&len.to_le_bytes());
        d[20..24].copy_from_slice(&flags.to_le_bytes());
        self.mem.write(off, &d);
    }

    /// Point the engine at `desc` and ring the doorbell through REGION_WRITE.
    pub fn ring(&self, desc: u64, count: u32) {
        self.client
            .region_write(0, dma::reg::DESC, &desc.to_le_bytes())
            .expect("DESC");
        self.client
            .region_write(0, dma::reg::DOORBELL, &count.to_le_bytes())
            .expect("doorbell");
    }

    /// The status word of the descriptor at `desc_off` in guest memory.
    pub fn status_of(&self, desc_off: usize) -> u32 {
        self.mem.u32_at(desc_off + 24)
    }

    /// Wait until the engine is idle.
    pub fn wait_idle(&self) {
        wait_for("the engine to go idle", || {
            self.reg(dma::reg::STATUS) & 1 == 0
        });
    }
}

/// `len` bytes of a pattern that depends on `seed`.
pub fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

/// Guest memory the client serves through DMA_READ / DMA_WRITE messages.
pub struct VecMem(pub Mutex<Vec<u8>>);

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
