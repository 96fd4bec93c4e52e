//! virtio: a hostile guest driving one virtio device through the real virtio-mmio transport
//! ([`virtio::MmioTransport`]), with guest memory, descriptor tables, rings and buffers all
//! taken from the input.
//!
//! # Input layout
//!
//! | bytes | meaning |
//! |---|---|
//! | 0 | bits 0-1 the device: 0 block (over an 8 KiB image file), 1 entropy, 2 network (over [`virtio::net::SocketBackend::pair`], the harness holding the peer), 3 vsock (guest CID 3, a Unix socket in a temporary directory, with a listener at `<uds>_5000` for guest-initiated connections); bit 2: the transport offers MSI ([`IrqMode::Msi`]); bit 3: the block image is read-only |
//! | 1-2 | `n`, little-endian `u16`: how many bytes of guest memory follow |
//! | 3.. | `n` bytes (at most what is left): guest memory from address 0; the rest of its [`MEM`] bytes is zero |
//! | then | operations, 8 bytes each, at most [`MAX_OPS`] (a shorter tail is ignored): `[op, a, b, v (u32 LE), x]`, `off = a \| b << 8` |
//!
//! Operations (`op % 8`):
//!
//! | op | what the guest (or the host) does |
//! |---|---|
//! | 0 | 32-bit register write of `v` at `off`; a `QueueNotify` write that the transport turns into [`WriteAction::Notify`] is run, as the VMM runs a trapped notify |
//! | 1 | register read at `off`, of 1, 2, 4 or 8 bytes (`x % 4`) |
//! | 2 | register write at `off` of `v` (then `x` as the 5th to 8th byte), 1, 2, 4 or 8 bytes (`x % 4`) |
//! | 3 | `notify(v)`: a notify through an ioeventfd (the queue index is not checked by the register) |
//! | 4 | `backend_ready(fd)` with `fd` = entry `v % len` of the device's [`poll_fds`](virtio::MmioTransport::poll_fds) (when the device is not working, of the last non-empty list) |
//! | 5 | the guest writes `v` (4 bytes, little-endian) at guest address `off` |
//! | 6 | host side. net: the peer sends a frame of `v % 0x11000` bytes of `x`; vsock: a host process connects to the device's socket (at most 16 streams) and writes `CONNECT <v>\n` |
//! | 7 | host side. net: `a` even, the peer reads the frames the device sent; odd, the peer closes. vsock: accept what connected to `<uds>_5000`, then on stream `x % n`: `a % 4` = 0 read what is there, 1 write `v % 8192` bytes of `x`, 2 shut its write side, 3 close it |
//!
//! # What is checked besides "no panic"
//!
//! Around every call into the device (`notify`, `backend_ready`):
//!
//! - **Used index bound.** For each ready queue whose used index moved in the call, the
//!   driver's available index (read from guest memory) is at most the queue's size ahead of
//!   it and never behind it (one more when the call ended with the device failing on a chain
//!   it had taken); a call the transport counted no completion for (and that did not fail)
//!   moved no used index. Skipped for a call when the guest made the rings overlap each other or made
//!   any device-writable descriptor overlap a ring: the device then legitimately writes data
//!   over ring indices.
//! - **A device that needs a reset does nothing.** Once the device failed (the transport
//!   set `DEVICE_NEEDS_RESET`, 0x40, and keeps a reason: [`MmioTransport::broken`]; the
//!   status must then show the bit), until the guest resets it, a call completes no chain,
//!   raises no interrupt and leaves every byte of guest memory as it was. A bit the driver
//!   stored itself does not count: the transport keeps it and the device goes on working.
//!
//! The body returns `true` when the device reached `DRIVER_OK` and was working.

pub mod driver;
#[cfg(test)]
mod tests;

use std::io::{Read, Write};
use std::os::fd::RawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use virtio::interrupt::Counted;
use virtio::mmio::{reg, status};
use virtio::net::{NetBackend, SocketBackend};
use virtio::{IrqMode, MmioTransport, VirtioDevice, WriteAction};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// Guest memory size.
pub const MEM: usize = 64 << 10;
/// The most operations one input runs.
pub const MAX_OPS: usize = 256;
/// Bytes per operation.
pub const OP_LEN: usize = 8;
/// The most host streams (vsock) one input opens.
const MAX_STREAMS: usize = 16;
/// The most bytes the host side keeps of what it received.
const MAX_HOST_BYTES: usize = 64 << 10;
/// The vsock port the harness listens on for guest-initiated connections.
pub const VSOCK_PORT: u32 = 5000;
/// The guest CID of the vsock device.
pub const GUEST_CID: u64 = 3;
/// Size of the block device's image.
pub const IMAGE: usize = 8 << 10;

/// Operation codes (see the module docs).
pub mod op {
    /// 32-bit register write.
    pub const WRITE32: u8 = 0;
    /// Register read.
    pub const READ: u8 = 1;
    /// Sized register write.
    pub const WRITE: u8 = 2;
    /// Notify through an ioeventfd.
    pub const NOTIFY: u8 = 3;
    /// A polled fd is ready.
    pub const BACKEND: u8 = 4;
    /// Guest memory write.
    pub const POKE: u8 = 5;
    /// Host side: send (net) or connect (vsock).
    pub const HOST_SEND: u8 = 6;
    /// Host side: read, write, shut or close.
    pub const HOST: u8 = 7;
}

/// The device byte 0 picks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// virtio-blk over an image file.
    Block,
    /// virtio-rng.
    Rng,
    /// virtio-net over a socket pair.
    Net,
    /// virtio-vsock over Unix sockets.
    Vsock,
}

impl Kind {
    /// The device for byte 0's bits 0-1.
    pub fn from_byte(b: u8) -> Kind {
        match b & 3 {
            0 => Kind::Block,
            1 => Kind::Rng,
            2 => Kind::Net,
            _ => Kind::Vsock,
        }
    }

    /// Its bits in byte 0.
    pub fn byte(self) -> u8 {
        match self {
            Kind::Block => 0,
            Kind::Rng => 1,
            Kind::Net => 2,
            Kind::Vsock => 3,
        }
    }
}

/// What one input did (for the tests and the seed generator).
#[derive(Debug)]
pub struct Outcome {
    /// The device was working after `DRIVER_OK` at some point.
    pub reached_driver_ok: bool,
    /// The status register at the end.
    pub status: u32,
    /// Why the device needs a reset, if it does.
    pub broken: Option<String>,
    /// Chains completed in all.
    pub completed: u64,
    /// Guest memory at the end.
    pub mem: Vec<u8>,
    /// Frames the net peer received.
    pub frames: Vec<Vec<u8>>,
    /// Bytes the vsock host streams received.
    pub host_bytes: Vec<u8>,
}

/// A thread's files: the image, the vsock socket and the listener at `<uds>_5000`, in a
/// temporary directory removed when the thread ends (libFuzzer's one thread never ends:
/// one directory per fuzzing process stays behind).
struct Files {
    image: PathBuf,
    uds: PathBuf,
    port_listener: UnixListener,
    _dir: tempfile::TempDir,
}

thread_local! {
    /// This thread's files (the unit tests run in parallel threads; libFuzzer runs one).
    static FILES: Files = Files::new();
}

impl Files {
    fn new() -> Files {
        // SAFETY: setting a signal's disposition to SIG_IGN installs no handler. libFuzzer's C
        // `main` does not ignore SIGPIPE as a Rust `main` does, and a write to a stream the
        // device closed would otherwise kill the fuzzer.
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_IGN) };
        // tmpfs when there is one: the block device's flush is an fdatasync.
        let dir = match tempfile::Builder::new()
            .prefix("faultline-fuzz-virtio")
            .tempdir_in("/dev/shm")
        {
            Ok(d) => d,
            Err(_) => tempfile::tempdir().expect("a temporary directory"),
        };
        let uds = dir.path().join("v.sock");
        let port = PathBuf::from(format!("{}_{VSOCK_PORT}", uds.display()));
        let port_listener = UnixListener::bind(&port).expect("binding the vsock port listener");
        port_listener
            .set_nonblocking(true)
            .expect("non-blocking listener");
        Files {
            image: dir.path().join("disk.img"),
            uds,
            port_listener,
            _dir: dir,
        }
    }
}

/// The host side of the device (what the harness holds).
pub enum Host {
    /// Nothing (block, entropy).
    None,
    /// The net device's peer (`None` once closed).
    Net(Option<SocketBackend>),
    /// The vsock device's socket path and the listener for guest-initiated connections.
    Vsock {
        /// The device's socket.
        uds: PathBuf,
        /// `<uds>_5000`.
        listener: UnixListener,
    },
}

/// The device byte 0 asks for, and its host side.
fn device(b: u8) -> (Box<dyn VirtioDevice>, Host) {
    FILES.with(|f| device_in(f, b))
}

fn device_in(f: &Files, b: u8) -> (Box<dyn VirtioDevice>, Host) {
    match Kind::from_byte(b) {
        Kind::Block => {
            let image: Vec<u8> = (0..IMAGE).map(|i| (i / 512) as u8).collect();
            std::fs::write(&f.image, image).expect("writing the image");
            let backend = virtio::blk::FileBackend::open(&f.image, b & 8 != 0).expect("image");
            (
                Box::new(virtio::blk::Block::new(Box::new(backend))),
                Host::None,
            )
        }
        Kind::Rng => (Box::new(virtio::rng::Rng::new()), Host::None),
        Kind::Net => {
            let (dev, peer) = SocketBackend::pair().expect("socket pair");
            (
                Box::new(virtio::net::Net::new(
                    Box::new(dev),
                    [0x52, 0x54, 0, 0x12, 0x34, 0x56],
                )),
                Host::Net(Some(peer)),
            )
        }
        Kind::Vsock => {
            // Connections a previous input left.
            while f.port_listener.accept().is_ok() {}
            let _ = std::fs::remove_file(&f.uds);
            let dev = virtio::vsock::Vsock::new(GUEST_CID, &f.uds).expect("vsock device");
            (
                Box::new(dev),
                Host::Vsock {
                    uds: f.uds.clone(),
                    listener: f.port_listener.try_clone().expect("dup of the listener"),
                },
            )
        }
    }
}

/// The body: run the input (see the module docs); `true` if the device reached `DRIVER_OK`.
pub fn guest(data: &[u8]) -> bool {
    run(data).is_some_and(|o| o.reached_driver_ok)
}

/// Run the input; `None` if it is too short to pick a device.
pub fn run(data: &[u8]) -> Option<Outcome> {
    let [b0, n0, n1, rest @ ..] = data else {
        return None;
    };
    let n = usize::from(u16::from_le_bytes([*n0, *n1])).min(rest.len());
    let (image, ops) = rest.split_at(n);
    let mode = if b0 & 4 != 0 {
        IrqMode::Msi
    } else {
        IrqMode::Legacy
    };
    let (dev, host) = device(*b0);
    Some(execute(dev, host, mode, image, ops))
}

/// A queue's rings as the transport has them.
#[derive(Debug, Clone, Copy)]
struct Ring {
    size: u16,
    desc: u64,
    avail: u64,
    used: u64,
}

impl Ring {
    fn regions(&self) -> [(u64, u64); 3] {
        let n = u64::from(self.size);
        [
            (self.desc, 16 * n),
            (self.avail, 6 + 2 * n),
            (self.used, 6 + 8 * n),
        ]
    }
}

fn overlap(a: (u64, u64), b: (u64, u64)) -> bool {
    a.1 > 0 && b.1 > 0 && a.0 < b.0.saturating_add(b.1) && b.0 < a.0.saturating_add(a.1)
}

/// The session: the transport, its memory and what the harness mirrors.
struct Session {
    t: MmioTransport,
    mem: GuestMemoryMmap,
    irq: Arc<Counted>,
    host: Host,
    streams: Vec<UnixStream>,
    /// The last `QueueSel` the guest wrote (the register cannot be read back).
    queue_sel: u32,
    last_fds: Vec<RawFd>,
    reached_driver_ok: bool,
    frames: Vec<Vec<u8>>,
    host_bytes: Vec<u8>,
}

/// Run `ops` against `dev` over guest memory starting with `image`.
pub fn execute(
    dev: Box<dyn VirtioDevice>,
    host: Host,
    mode: IrqMode,
    image: &[u8],
    ops: &[u8],
) -> Outcome {
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM)]).expect("guest memory");
    mem.write_slice(&image[..image.len().min(MEM)], GuestAddress(0))
        .expect("the image fits");
    let irq = Arc::new(Counted::default());
    let t = MmioTransport::new(dev, mem.clone(), irq.clone(), mode);
    let mut s = Session {
        t,
        mem,
        irq,
        host,
        streams: Vec::new(),
        queue_sel: 0,
        last_fds: Vec::new(),
        reached_driver_ok: false,
        frames: Vec::new(),
        host_bytes: Vec::new(),
    };
    for rec in ops.chunks_exact(OP_LEN).take(MAX_OPS) {
        s.op(rec.try_into().expect("8 bytes"));
        s.reached_driver_ok |= s.t.active();
    }
    let mut mem = vec![0u8; MEM];
    s.mem
        .read_slice(&mut mem, GuestAddress(0))
        .expect("reading guest memory");
    Outcome {
        reached_driver_ok: s.reached_driver_ok,
        status: s.t.status(),
        broken: s.t.broken().map(str::to_string),
        completed: s.t.stats().completed.load(Ordering::SeqCst),
        mem,
        frames: s.frames,
        host_bytes: s.host_bytes,
    }
}

impl Session {
    fn op(&mut self, r: &[u8; OP_LEN]) {
        let off = u64::from(u16::from_le_bytes([r[1], r[2]]));
        let v = u32::from_le_bytes([r[3], r[4], r[5], r[6]]);
        let x = r[7];
        match r[0] % 8 {
            op::WRITE32 => self.write(off, &v.to_le_bytes()),
            op::READ => {
                let mut b = vec![0u8; 1 << (x % 4)];
                self.t.read(off, &mut b);
            }
            op::WRITE => {
                let mut b = [0u8; 8];
                b[..4].copy_from_slice(&v.to_le_bytes());
                b[4..].fill(x);
                self.write(off, &b[..1 << (x % 4)]);
            }
            op::NOTIFY => self.call(|t| t.notify(v as usize)),
            op::BACKEND => {
                let fds = if self.t.active() {
                    self.t.poll_fds()
                } else {
                    Vec::new()
                };
                if !fds.is_empty() {
                    self.last_fds = fds;
                }
                if !self.last_fds.is_empty() {
                    let fd = self.last_fds[v as usize % self.last_fds.len()];
                    self.call(|t| t.backend_ready(fd));
                }
            }
            op::POKE => {
                let at = off as usize;
                let b = v.to_le_bytes();
                let n = b.len().min(MEM - at);
                self.mem
                    .write_slice(&b[..n], GuestAddress(off))
                    .expect("inside guest memory");
            }
            op::HOST_SEND => self.host_send(v, x),
            _ => self.host(r[1], v, x),
        }
    }

    fn write(&mut self, off: u64, data: &[u8]) {
        if data.len() == 4 {
            let v = u32::from_le_bytes(data.try_into().expect("4 bytes"));
            match off {
                reg::QUEUE_SEL => self.queue_sel = v,
                reg::STATUS if v == 0 => self.queue_sel = 0,
                _ => {}
            }
        }
        if let WriteAction::Notify(q) = self.t.write(off, data) {
            self.call(|t| t.notify(usize::from(q)));
        }
    }

    fn r32(&mut self, off: u64) -> u32 {
        let mut b = [0u8; 4];
        self.t.read(off, &mut b);
        u32::from_le_bytes(b)
    }

    /// The ready queues' rings, read through the registers (`QueueSel` put back after).
    fn rings(&mut self) -> Vec<Option<Ring>> {
        let mut out = Vec::new();
        for q in 0..self.t.num_queues() {
            self.t.write(reg::QUEUE_SEL, &(q as u32).to_le_bytes());
            if self.r32(reg::QUEUE_READY) != 1 {
                out.push(None);
                continue;
            }
            let addr = |s: &mut Self, lo, hi| u64::from(s.r32(lo)) | (u64::from(s.r32(hi)) << 32);
            out.push(Some(Ring {
                size: self.r32(reg::QUEUE_NUM) as u16,
                desc: addr(self, reg::QUEUE_DESC_LOW, reg::QUEUE_DESC_HIGH),
                avail: addr(self, reg::QUEUE_DRIVER_LOW, reg::QUEUE_DRIVER_HIGH),
                used: addr(self, reg::QUEUE_DEVICE_LOW, reg::QUEUE_DEVICE_HIGH),
            }));
        }
        self.t.write(reg::QUEUE_SEL, &self.queue_sel.to_le_bytes());
        out
    }

    /// Whether the device may write over ring indices: rings overlapping each other, or a
    /// device-writable descriptor overlapping a ring.
    fn aliased(&self, rings: &[Option<Ring>]) -> bool {
        let regions: Vec<(u64, u64)> = rings.iter().flatten().flat_map(Ring::regions).collect();
        for (i, a) in regions.iter().enumerate() {
            if regions[i + 1..].iter().any(|b| overlap(*a, *b)) {
                return true;
            }
        }
        for r in rings.iter().flatten() {
            let mut table = vec![0u8; 16 * usize::from(r.size)];
            self.mem
                .read_slice(&mut table, GuestAddress(r.desc))
                .expect("a ready descriptor table is in memory");
            for d in table.chunks_exact(16) {
                let addr = u64::from_le_bytes(d[0..8].try_into().expect("8 bytes"));
                let len = u32::from_le_bytes(d[8..12].try_into().expect("4 bytes"));
                let flags = u16::from_le_bytes([d[12], d[13]]);
                if flags & 2 != 0 && regions.iter().any(|g| overlap((addr, u64::from(len)), *g)) {
                    return true;
                }
            }
        }
        false
    }

    fn idx(&self, at: u64) -> u16 {
        self.mem
            .read_obj(GuestAddress(at + 2))
            .expect("a ready ring is in memory")
    }

    fn snapshot(&self) -> Vec<u8> {
        let mut m = vec![0u8; MEM];
        self.mem
            .read_slice(&mut m, GuestAddress(0))
            .expect("reading guest memory");
        m
    }

    fn irqs(&self) -> (u64, u64) {
        (
            self.irq.legacy.load(Ordering::SeqCst),
            self.irq.msi.load(Ordering::SeqCst),
        )
    }

    /// A call into the device, with the invariants checked around it.
    fn call(&mut self, f: impl FnOnce(&mut MmioTransport)) {
        let stats = self.t.stats();
        let completed = || stats.completed.load(Ordering::SeqCst);
        // The device set DEVICE_NEEDS_RESET (the driver may write the bit itself: the
        // transport keeps it, and the device goes on working).
        let broken_before = self.t.broken().is_some();
        assert!(
            !broken_before || self.t.status() & status::NEEDS_RESET != 0,
            "the device failed but the status does not say so"
        );
        if broken_before {
            let (mem, irqs, done) = (self.snapshot(), self.irqs(), completed());
            f(&mut self.t);
            assert_eq!(
                completed(),
                done,
                "a device that needs a reset completed chains"
            );
            assert_eq!(
                self.irqs(),
                irqs,
                "a device that needs a reset raised an interrupt"
            );
            assert!(
                self.snapshot() == mem,
                "a device that needs a reset wrote guest memory"
            );
            return;
        }
        let rings = self.rings();
        let aliased = self.aliased(&rings);
        let before: Vec<Option<u16>> = rings.iter().map(|r| r.map(|r| self.idx(r.used))).collect();
        let done = completed();
        f(&mut self.t);
        if aliased {
            return;
        }
        let broke = self.t.broken().is_some();
        let mut moved = 0u64;
        for (q, (r, u0)) in rings.iter().zip(&before).enumerate() {
            let (Some(r), Some(u0)) = (r, u0) else {
                continue;
            };
            let (a, u) = (self.idx(r.avail), self.idx(r.used));
            if u == *u0 {
                continue;
            }
            // Only the device's add_used writes the used index here (nothing aliases it),
            // so `u` is the device's own count, whatever the guest stored there before.
            moved += 1;
            let behind = a.wrapping_sub(u);
            let allowed = r.size + u16::from(broke);
            assert!(
                behind <= allowed,
                "queue {q}: used index {u} (was {u0}) is not within {allowed} behind the \
                 available index {a} (queue size {})",
                r.size
            );
        }
        // The transport counts a call's completions only when the call succeeded.
        if !broke {
            assert!(
                completed() - done >= moved,
                "{moved} used indices moved, {} chains counted completed",
                completed() - done
            );
        }
    }

    fn host_send(&mut self, v: u32, x: u8) {
        match &mut self.host {
            Host::None => {}
            Host::Net(peer) => {
                if let Some(p) = peer {
                    let frame = vec![x; v as usize % 0x11000];
                    let _ = p.send(&frame);
                }
            }
            Host::Vsock { uds, .. } => {
                if self.streams.len() >= MAX_STREAMS {
                    return;
                }
                if let Ok(mut s) = UnixStream::connect(&*uds) {
                    let _ = s.set_nonblocking(true);
                    let _ = s.write_all(format!("CONNECT {v}\n").as_bytes());
                    self.streams.push(s);
                }
            }
        }
    }

    fn host(&mut self, a: u8, v: u32, x: u8) {
        match &mut self.host {
            Host::None => {}
            Host::Net(peer) => {
                if a % 2 == 1 {
                    *peer = None;
                    return;
                }
                let Some(p) = peer else { return };
                let mut buf = vec![0u8; 0x11000];
                while let Ok(n) = p.recv(&mut buf) {
                    if self.frames.iter().map(Vec::len).sum::<usize>() < MAX_HOST_BYTES {
                        self.frames.push(buf[..n.min(buf.len())].to_vec());
                    }
                }
            }
            Host::Vsock { listener, .. } => {
                while let Ok((s, _)) = listener.accept() {
                    if self.streams.len() < MAX_STREAMS && s.set_nonblocking(true).is_ok() {
                        self.streams.push(s);
                    }
                }
                if self.streams.is_empty() {
                    return;
                }
                let i = usize::from(x) % self.streams.len();
                match a % 4 {
                    0 => read_some(&mut self.streams[i], &mut self.host_bytes),
                    1 => {
                        let _ = self.streams[i].write(&vec![x; v as usize % 8192]);
                    }
                    2 => {
                        let _ = self.streams[i].shutdown(std::net::Shutdown::Write);
                    }
                    _ => {
                        self.streams.swap_remove(i);
                    }
                }
            }
        }
    }
}

/// Read what `s` has now (non-blocking), keeping at most [`MAX_HOST_BYTES`] in `out`.
fn read_some(s: &mut UnixStream, out: &mut Vec<u8>) {
    let mut b = [0u8; 4096];
    while let Ok(n) = s.read(&mut b) {
        if n == 0 {
            break;
        }
        let keep = n.min(MAX_HOST_BYTES.saturating_sub(out.len()));
        out.extend_from_slice(&b[..keep]);
    }
}
