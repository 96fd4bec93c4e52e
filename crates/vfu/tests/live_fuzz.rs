//! A live fuzz of the server: while well-behaved clients keep working on their devices
//! (region reads and writes checked continuously, DMA copies checked), a hostile client
//! sends many random and crafted messages to devices of the same server process: every
//! command and unknown ones, random header fields, sizes and offsets up to 2^64, truncated
//! messages, bogus fds (eventfds, /dev/null, sockets, directories, sealed and unsealed
//! memfds). The server must never die and the good clients must never see an error.
//!
//! Deterministic (a fixed xorshift seed; `VFU_FUZZ_SEED` picks another), bounded to about
//! 15 s of fuzzing (`VFU_FUZZ_SECS` changes it). It prints how many messages it sent.

mod common;

use std::io::Write;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::*;
use vfu::client::Client;
use vfu::devices::dma::{self, DmaEngine};
use vfu::devices::gpio;
use vfu::proto::*;
use vfu::sock;
use vmm_sys_util::eventfd::EventFd;
use zerocopy::IntoBytes;

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    fn chance(&mut self, one_in: u64) -> bool {
        self.below(one_in) == 0
    }

    /// A size or offset: the edges of every width, small values, and anything.
    fn wide(&mut self) -> u64 {
        const EDGES: [u64; 16] = [
            0,
            1,
            7,
            8,
            4095,
            4096,
            0x1000_0000,
            (1 << 20) + 1,
            u32::MAX as u64,
            1 << 32,
            1 << 40,
            1 << 47,
            1 << 48,
            1 << 62,
            i64::MAX as u64,
            u64::MAX,
        ];
        match self.below(4) {
            0 => EDGES[self.below(16) as usize],
            1 => EDGES[self.below(16) as usize].wrapping_sub(self.below(3)),
            2 => self.below(0x2_0000),
            _ => self.next(),
        }
    }

    fn wide32(&mut self) -> u32 {
        match self.below(3) {
            0 => self.wide() as u32,
            1 => self.below(64) as u32,
            _ => self.next() as u32,
        }
    }

    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }

    /// Up to `max - 1` random bytes.
    fn some_bytes(&mut self, max: u64) -> Vec<u8> {
        let n = self.below(max) as usize;
        self.bytes(n)
    }
}

/// Descriptors of every kind a hostile client might pass.
struct Fds {
    eventfds: Vec<EventFd>,
    null: std::fs::File,
    dir: std::fs::File,
    sock: (UnixStream, UnixStream),
    sealed: OwnedFd,
    unsealed: OwnedFd,
}

impl Fds {
    fn new() -> Fds {
        Fds {
            eventfds: (0..4)
                .map(|_| EventFd::new(libc::EFD_NONBLOCK).expect("eventfd"))
                .collect(),
            null: std::fs::File::open("/dev/null").expect("/dev/null"),
            dir: std::fs::File::open("/").expect("/"),
            sock: UnixStream::pair().expect("socketpair"),
            sealed: memfd(0x10000, true),
            unsealed: memfd(0x10000, false),
        }
    }

    fn pick(&self, r: &mut Rng) -> Vec<RawFd> {
        let one = |r: &mut Rng| match r.below(7) {
            0 => self.null.as_raw_fd(),
            1 => self.dir.as_raw_fd(),
            2 => self.sock.0.as_raw_fd(),
            3 => self.sealed.as_raw_fd(),
            4 => self.unsealed.as_raw_fd(),
            _ => self.eventfds[r.below(4) as usize].as_raw_fd(),
        };
        let n = match r.below(8) {
            0..=3 => 0,
            4..=6 => 1,
            _ => r.below(6) as usize,
        };
        (0..n).map(|_| one(r)).collect()
    }
}

/// One message's payload for `cmd`, with fields that are sometimes sane.
fn payload(r: &mut Rng, cmd: u16) -> Vec<u8> {
    let mut p = Vec::new();
    match Command::from_u16(cmd) {
        Some(Command::Version) => {
            p.extend((r.below(3) as u16).to_ne_bytes());
            p.extend((r.below(3) as u16).to_ne_bytes());
            if r.chance(3) {
                p.extend(r.some_bytes(64));
            } else {
                p.extend(
                    format!(
                        r#"{{"capabilities":{{"max_msg_fds":{},"max_data_xfer_size":{},"max_dma_maps":{},"migration":{{"pgsize":{},"max_bitmap_size":{}}}}}}}"#,
                        r.wide32(),
                        r.wide32(),
                        r.wide32(),
                        r.wide(),
                        r.wide()
                    )
                    .as_bytes(),
                );
            }
        }
        Some(Command::DmaMap) => {
            let m = DmaMap {
                argsz: if r.chance(4) { r.wide32() } else { 32 },
                flags: if r.chance(4) {
                    r.wide32()
                } else {
                    r.below(8) as u32
                },
                offset: r.wide(),
                address: r.wide(),
                size: r.wide(),
            };
            p.extend(m.as_bytes());
        }
        Some(Command::DmaUnmap) => {
            let u = DmaUnmap {
                argsz: if r.chance(4) { r.wide32() } else { 24 },
                flags: if r.chance(4) {
                    r.wide32()
                } else {
                    r.below(4) as u32
                },
                address: r.wide(),
                size: r.wide(),
            };
            p.extend(u.as_bytes());
        }
        Some(Command::DeviceGetInfo) => {
            p.extend(r.wide32().to_ne_bytes());
            p.extend(r.bytes(12));
        }
        Some(Command::DeviceGetRegionInfo) => {
            let q = RegionInfo {
                argsz: r.wide32(),
                flags: r.wide32(),
                index: r.wide32(),
                cap_offset: r.wide32(),
                size: r.wide(),
                offset: r.wide(),
            };
            p.extend(q.as_bytes());
        }
        Some(Command::DeviceGetRegionIoFds) => {
            let q = RegionIoFds {
                argsz: r.wide32(),
                flags: r.wide32(),
                index: r.below(12) as u32,
                count: r.wide32(),
            };
            p.extend(q.as_bytes());
        }
        Some(Command::DeviceGetIrqInfo) => {
            let q = IrqInfo {
                argsz: r.wide32(),
                flags: r.wide32(),
                index: r.wide32() % 8,
                count: r.wide32(),
            };
            p.extend(q.as_bytes());
        }
        Some(Command::DeviceSetIrqs) => {
            let s = IrqSet {
                argsz: r.wide32(),
                flags: if r.chance(3) {
                    r.wide32()
                } else {
                    (1 << r.below(3)) | (8 << r.below(3))
                },
                index: r.below(7) as u32,
                start: r.wide32(),
                count: if r.chance(2) {
                    r.below(5) as u32
                } else {
                    r.wide32()
                },
            };
            p.extend(s.as_bytes());
            p.extend(r.some_bytes(16));
        }
        Some(Command::RegionRead) | Some(Command::RegionWrite) => {
            let count = if r.chance(2) {
                1 << r.below(4)
            } else {
                r.wide32()
            };
            let a = RegionAccess {
                offset: if r.chance(2) {
                    r.below(0x1000)
                } else {
                    r.wide()
                },
                region: if r.chance(2) {
                    r.below(10) as u32
                } else {
                    r.wide32()
                },
                count,
            };
            p.extend(a.as_bytes());
            if cmd == Command::RegionWrite as u16 {
                let n = if r.chance(4) {
                    r.below(64) as usize
                } else {
                    (count as usize).min(0x1_0000)
                };
                p.extend(r.bytes(n));
            }
        }
        Some(Command::DeviceFeature) => {
            let feature = if r.chance(4) {
                r.wide32() & 0xffff
            } else {
                r.below(10) as u32
            };
            let op = [
                FEATURE_GET,
                FEATURE_SET,
                FEATURE_PROBE,
                FEATURE_GET | FEATURE_PROBE,
            ][r.below(4) as usize];
            let f = DeviceFeature {
                argsz: r.wide32(),
                flags: feature | if r.chance(8) { r.wide32() } else { op },
            };
            p.extend(f.as_bytes());
            match r.below(4) {
                0 => {
                    // DMA_LOGGING_START: page size, ranges announced, ranges.
                    p.extend((1u64 << r.below(64)).to_ne_bytes());
                    p.extend(r.wide32().to_ne_bytes());
                    p.extend(0u32.to_ne_bytes());
                    for _ in 0..r.below(3) {
                        p.extend(r.wide().to_ne_bytes());
                        p.extend(r.wide().to_ne_bytes());
                    }
                }
                1 => {
                    // DMA_LOGGING_REPORT: iova, length, page size.
                    p.extend(r.wide().to_ne_bytes());
                    p.extend(r.wide().to_ne_bytes());
                    p.extend((1u64 << r.below(64)).to_ne_bytes());
                }
                2 => {
                    // MIG_DEVICE_STATE.
                    p.extend((r.below(12) as u32).to_ne_bytes());
                    p.extend(u32::MAX.to_ne_bytes());
                }
                _ => p.extend(r.some_bytes(40)),
            }
        }
        Some(Command::MigDataRead) | Some(Command::MigDataWrite) => {
            let size = if r.chance(2) {
                r.below(0x2000) as u32
            } else {
                r.wide32()
            };
            let m = MigData {
                argsz: r.wide32(),
                size,
            };
            p.extend(m.as_bytes());
            if cmd == Command::MigDataWrite as u16 {
                p.extend(r.bytes((size as usize).min(0x1_0000)));
            }
        }
        Some(Command::DmaRead) | Some(Command::DmaWrite) => {
            p.extend(r.wide().to_ne_bytes());
            p.extend(r.wide().to_ne_bytes());
            p.extend(r.some_bytes(32));
        }
        _ => p.extend(r.some_bytes(64)),
    }
    if r.chance(10) {
        // Cut short or padded.
        let n = r.below(p.len() as u64 + 8) as usize;
        p.resize(n, 0xee);
    }
    p
}

/// The hostile client: connections to `targets`, reopened whenever the server drops one.
struct Fuzzer {
    targets: Vec<PathBuf>,
    conn: Option<UnixStream>,
    id: u16,
    sent: u64,
    replies: u64,
    dropped: u64,
    /// Replies that did not come within the read timeout.
    timeouts: u64,
}

impl Fuzzer {
    fn connect(&mut self, r: &mut Rng) -> &UnixStream {
        if self.conn.is_none() {
            let p = &self.targets[r.below(self.targets.len() as u64) as usize];
            let s = UnixStream::connect(p).expect("the server stopped accepting connections");
            s.set_read_timeout(Some(Duration::from_millis(500)))
                .unwrap();
            s.set_write_timeout(Some(Duration::from_secs(2))).unwrap();
            self.conn = Some(s);
        }
        self.conn.as_ref().expect("just set")
    }

    fn drop_conn(&mut self) {
        self.conn = None;
        self.dropped += 1;
    }

    /// Read until the reply to `id`, a close, or a timeout (then the connection is dropped:
    /// the server may be waiting for bytes this message promised).
    fn await_reply(&mut self, id: u16) -> Option<Header> {
        let s = self.conn.as_ref()?;
        loop {
            match sock::recv(s, 4 << 20) {
                Ok(m) if m.header.is_reply() && m.header.msg_id == id => {
                    self.replies += 1;
                    return Some(m.header);
                }
                // A DMA request from the engine, or a reply to something older: ignored.
                Ok(_) => continue,
                Err(e) => {
                    if matches!(e, sock::RecvError::Idle) {
                        self.timeouts += 1;
                    }
                    if std::env::var("VFU_FUZZ_DEBUG").is_ok() {
                        eprintln!("await {id}: {e} ({:?})", std::error::Error::source(&e));
                    }
                    self.drop_conn();
                    return None;
                }
            }
        }
    }

    fn drain(&mut self) {
        let Some(s) = self.conn.as_ref() else { return };
        while sock::wait_for(s.as_raw_fd(), libc::POLLIN, Duration::ZERO).unwrap_or(false) {
            if sock::recv(s, 4 << 20).is_err() {
                self.drop_conn();
                return;
            }
        }
    }

    fn one(&mut self, r: &mut Rng, fds: &Fds) {
        // A fresh connection negotiates most of the time, so that commands reach the device.
        if self.conn.is_none() && !r.chance(8) {
            let s = self.connect(r).try_clone().unwrap();
            let mut p = vec![0, 0, 1, 0];
            p.extend(Caps::default().to_json());
            self.id = self.id.wrapping_add(1);
            let h = Header::command(self.id, Command::Version, HEADER_SIZE + p.len());
            self.sent += 1;
            if sock::send(&s, &[h.as_bytes(), &p], &[]).is_err() {
                self.drop_conn();
                return;
            }
            // Refused (EBUSY on a device in use): the server closes the connection.
            if self.await_reply(self.id).is_some_and(|h| h.is_error()) {
                self.drop_conn();
            }
            return;
        }
        let s = self.connect(r).try_clone().unwrap();
        let cmd = match r.below(20) {
            0 => r.next() as u16,
            1 => 0,
            _ => 1 + r.below(18) as u16,
        };
        let p = payload(r, cmd);
        let chosen = fds.pick(r);
        self.id = self.id.wrapping_add(1);
        let mut h = Header {
            msg_id: self.id,
            cmd,
            size: (HEADER_SIZE + p.len()) as u32,
            flags: TYPE_COMMAND,
            error: 0,
        };
        let mut expect_reply = true;
        match r.below(12) {
            0 => {
                // Random header fields (the size too: the stream may be lost after this).
                h.flags = r.wide32();
                h.error = r.wide32();
                if r.chance(2) {
                    h.size = r.wide32();
                }
                expect_reply = h.flags & FLAG_TYPE_MASK == TYPE_COMMAND
                    && h.flags & FLAG_NO_REPLY == 0
                    && h.size as usize == HEADER_SIZE + p.len();
                // The stream is lost (or the server closes it): send, then go.
                if h.size as usize != HEADER_SIZE + p.len() || h.flags & FLAG_TYPE_MASK > 1 {
                    self.sent += 1;
                    let _ = sock::send(&s, &[h.as_bytes(), &p], &chosen);
                    self.drop_conn();
                    return;
                }
            }
            1 => {
                // No reply wanted.
                h.flags |= FLAG_NO_REPLY;
                expect_reply = false;
            }
            2 => {
                // A "reply" the server never asked for.
                h.flags = TYPE_REPLY | if r.chance(2) { FLAG_ERROR } else { 0 };
                h.msg_id = 0x8000 | r.next() as u16;
                expect_reply = false;
            }
            3 => {
                // Truncated: part of the message, then the connection goes.
                let mut all = h.as_bytes().to_vec();
                all.extend(&p);
                let cut = r.below(all.len() as u64) as usize;
                self.sent += 1;
                let _ = (&s).write_all(&all[..cut]);
                self.drop_conn();
                return;
            }
            _ => {}
        }
        self.sent += 1;
        if std::env::var("VFU_FUZZ_DEBUG").is_ok() {
            eprintln!("send {h:?} {} bytes {} fds", p.len(), chosen.len());
        }
        if sock::send(&s, &[h.as_bytes(), &p], &chosen).is_err() {
            self.drop_conn();
            return;
        }
        if expect_reply {
            self.await_reply(h.msg_id);
        } else {
            // Whatever came meanwhile (error replies, DMA requests) is read and dropped, so
            // that the server never waits for room on this socket.
            self.drain();
        }
        if r.chance(200) {
            self.drop_conn();
        }
    }
}

/// A good client on a GPIO card: outputs written, read back on the loopback inputs, and
/// config space, over and over.
fn gpio_worker(path: &Path, stop: Arc<AtomicBool>, done: Arc<AtomicU64>) -> Result<(), String> {
    let c = Client::connect(path, TIMEOUT).map_err(|e| format!("connect: {e}"))?;
    let mut id = [0u8; 4];
    c.config_read(0, &mut id)
        .map_err(|e| format!("config: {e}"))?;
    let mut v = 0u8;
    while !stop.load(Ordering::Relaxed) {
        v = v.wrapping_add(37);
        c.region_write(gpio::BAR, 0, &[v])
            .map_err(|e| format!("write: {e}"))?;
        let mut b = [0u8; 2];
        c.region_read(gpio::BAR, 0, &mut b)
            .map_err(|e| format!("read: {e}"))?;
        if b != [v, v] {
            return Err(format!("wrote {v:#x}, read outputs/inputs {b:x?}"));
        }
        let mut again = [0u8; 4];
        c.config_read(0, &mut again)
            .map_err(|e| format!("config: {e}"))?;
        if again != id {
            return Err(format!("config ID {again:x?}, was {id:x?}"));
        }
        done.fetch_add(1, Ordering::Relaxed);
    }
    Ok(())
}

/// A good client of a DMA engine: copies in its (sealed) memfd, checked.
fn dma_worker(
    path: &Path,
    engine: Arc<DmaEngine>,
    stop: Arc<AtomicBool>,
    done: Arc<AtomicU64>,
) -> Result<(), String> {
    const GUEST: u64 = 0x4000_0000;
    let c = Client::connect(path, TIMEOUT).map_err(|e| format!("connect: {e}"))?;
    let mem = memfd(0x10000, true);
    let f = std::fs::File::from(mem.try_clone().unwrap());
    c.dma_map_fd(GUEST, 0x10000, mem.as_raw_fd(), 0, DMA_READ | DMA_WRITE)
        .map_err(|e| format!("map: {e}"))?;
    c.config_write(4, &0x6u16.to_le_bytes())
        .map_err(|e| format!("bus master: {e}"))?;
    let mut n = 0u8;
    while !stop.load(Ordering::Relaxed) {
        n = n.wrapping_add(1);
        let mut d = Vec::new();
        d.extend((GUEST + 0x1000).to_le_bytes());
        d.extend((GUEST + 0x2000).to_le_bytes());
        d.extend(0x200u32.to_le_bytes());
        d.extend([0u8; 12]);
        std::os::unix::fs::FileExt::write_all_at(&f, &d, 0).unwrap();
        std::os::unix::fs::FileExt::write_all_at(&f, &[n; 0x200], 0x1000).unwrap();
        let before = engine.completed();
        c.region_write(0, dma::reg::DESC, &GUEST.to_le_bytes())
            .map_err(|e| format!("desc: {e}"))?;
        c.region_write(0, dma::reg::DOORBELL, &1u32.to_le_bytes())
            .map_err(|e| format!("doorbell: {e}"))?;
        let t = Instant::now();
        while engine.completed() == before {
            if t.elapsed() > TIMEOUT {
                return Err("a copy did not complete".into());
            }
            std::thread::yield_now();
        }
        let mut got = vec![0u8; 0x200];
        std::os::unix::fs::FileExt::read_exact_at(&f, &mut got, 0x2000).unwrap();
        if got.iter().any(|&b| b != n) {
            return Err(format!("copy {n}: wrong bytes"));
        }
        let mut e = [0u8; 4];
        c.region_read(0, dma::reg::ERRORS, &mut e)
            .map_err(|e| format!("errors: {e}"))?;
        if e != [0; 4] {
            return Err(format!("engine errors {e:x?}"));
        }
        done.fetch_add(1, Ordering::Relaxed);
    }
    Ok(())
}

#[test]
fn hostile_client_never_kills_the_server_nor_disturbs_other_clients() {
    let seed = std::env::var("VFU_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x5eed_f00d_cafe_d00du64);
    let secs = std::env::var("VFU_FUZZ_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(15u64);
    let h = Harness::new();
    let (_fg, fuzz_gpio) = h.gpio("fuzz-gpio.sock");
    let (_fe, fuzz_dma) = h.dma("fuzz-dma.sock");
    let (_wg, work_gpio) = h.gpio("work-gpio.sock");
    let (work_engine, work_dma) = h.dma("work-dma.sock");

    let stop = Arc::new(AtomicBool::new(false));
    let gpio_done = Arc::new(AtomicU64::new(0));
    let dma_done = Arc::new(AtomicU64::new(0));
    let gw = {
        let (p, s, d) = (
            work_gpio.path().to_path_buf(),
            stop.clone(),
            gpio_done.clone(),
        );
        std::thread::spawn(move || gpio_worker(&p, s, d))
    };
    let dw = {
        let (p, s, d) = (
            work_dma.path().to_path_buf(),
            stop.clone(),
            dma_done.clone(),
        );
        std::thread::spawn(move || dma_worker(&p, work_engine, s, d))
    };
    // Wait until both good clients hold their devices.
    let t = Instant::now();
    while gpio_done.load(Ordering::Relaxed) == 0 || dma_done.load(Ordering::Relaxed) == 0 {
        assert!(
            !gw.is_finished() && !dw.is_finished(),
            "a good client stopped before the fuzzing started"
        );
        assert!(t.elapsed() < TIMEOUT, "the good clients did not start");
        std::thread::sleep(Duration::from_millis(5));
    }

    let mut r = Rng(seed | 1);
    let fds = Fds::new();
    let mut f = Fuzzer {
        // The hostile client's own devices, and the good clients' (where it is refused).
        targets: vec![
            fuzz_gpio.path().to_path_buf(),
            fuzz_dma.path().to_path_buf(),
            fuzz_dma.path().to_path_buf(),
            work_gpio.path().to_path_buf(),
        ],
        conn: None,
        id: 0,
        sent: 0,
        replies: 0,
        dropped: 0,
        timeouts: 0,
    };
    let t = Instant::now();
    let limit = Duration::from_secs(secs);
    while t.elapsed() < limit {
        for _ in 0..32 {
            f.one(&mut r, &fds);
        }
        assert!(
            !gw.is_finished() && !dw.is_finished(),
            "a good client stopped after {} fuzz messages",
            f.sent
        );
    }
    let fuzz_time = t.elapsed();
    stop.store(true, Ordering::Relaxed);
    let g = gw.join().expect("gpio worker");
    let d = dw.join().expect("dma worker");
    eprintln!(
        "live fuzz (seed {seed:#x}): {} messages sent in {:.1} s ({} replies, {} timeouts, {} \
         connections dropped); good clients: {} GPIO rounds, {} DMA copies",
        f.sent,
        fuzz_time.as_secs_f64(),
        f.replies,
        f.timeouts,
        f.dropped,
        gpio_done.load(Ordering::Relaxed),
        dma_done.load(Ordering::Relaxed)
    );
    g.expect("the GPIO client saw an error");
    d.expect("the DMA client saw an error");
    assert!(f.sent > 1000, "only {} messages sent", f.sent);

    // The server still serves every device, the fuzzed ones too.
    drop(f);
    for p in [fuzz_gpio.path(), fuzz_dma.path()] {
        let t = Instant::now();
        let c = loop {
            // The hostile connection may take a moment to be noticed as gone.
            match Client::connect(p, TIMEOUT) {
                Ok(c) => break c,
                Err(e) => assert!(t.elapsed() < TIMEOUT, "{}: {e}", p.display()),
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        c.config_read(0, &mut [0u8; 4]).expect("config read");
    }
    assert!(h.server_alive(), "the server's loop ended");
}
