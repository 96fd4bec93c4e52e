//! Helpers shared by the hardening tests (`limits.rs`, `sharing.rs`, `live_fuzz.rs`): a
//! real [`Server`] on a background thread, a raw connection that sends crafted messages over
//! a real Unix socket, and memfds.

#![allow(dead_code)]

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use vfu::devices::dma::{DmaEngine, DmaOps};
use vfu::devices::gpio::Gpio;
use vfu::proto::*;
use vfu::server::{AttachedDevice, Server, ShutdownHandle};
use vfu::sock;
use zerocopy::IntoBytes;

/// Every wait in these tests.
pub const TIMEOUT: Duration = Duration::from_secs(5);

/// A server running `run()` on two threads, stopped and joined on drop.
pub struct Harness {
    pub dir: tempfile::TempDir,
    pub server: Server,
    stop: ShutdownHandle,
    thread: Option<JoinHandle<()>>,
}

impl Harness {
    /// A new server with no devices.
    pub fn new() -> Harness {
        let server = Server::new(false).expect("server");
        let stop = server.shutdown_handle();
        let s = server.clone();
        let thread = std::thread::spawn(move || s.run_threads(2).expect("server loop"));
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
        let id = self.send(cmd as u16, payload, fds);
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
