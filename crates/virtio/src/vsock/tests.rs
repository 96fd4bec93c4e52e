//! The vsock device driven through the transport's registers over real guest memory, with
//! real Unix sockets in a temporary directory on the host side.

use std::collections::{HashSet, VecDeque};
use std::io::{Read, Write};
use std::os::fd::RawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

use super::packet::{HDR_LEN, HOST_CID, Header, Op, SHUTDOWN_RCV, SHUTDOWN_SEND, TYPE_STREAM};
use super::{Vsock, VsockError, VsockStats};
use crate::IrqMode;
use crate::mmio::status;
use crate::testing::{DATA, Driver};

pub(super) const GUEST_CID: u64 = 3;
const RX_BUF: u32 = 0x1000;
pub(super) const TX_AREA: u64 = DATA + 0x10_0000;
pub(super) const DEADLINE: Duration = Duration::from_secs(5);

pub(super) struct Env {
    _dir: tempfile::TempDir,
    pub(super) uds: PathBuf,
    pub(super) d: Driver,
    pub(super) stats: Arc<VsockStats>,
    pub(super) got: VecDeque<(Header, Vec<u8>)>,
    pub(super) rx_out: usize,
    /// The worker's epoll and the fds it polls.
    epoll: Epoll,
    polled: HashSet<RawFd>,
}

pub(super) fn env() -> Env {
    env_with(|v| v)
}

/// A device (adjusted by `f`) behind an initialised driver.
pub(super) fn env_with(f: impl FnOnce(Vsock) -> Vsock) -> Env {
    let dir = tempfile::tempdir().unwrap();
    let uds = dir.path().join("v.sock");
    let v = f(Vsock::new(GUEST_CID, &uds).unwrap());
    let stats = v.stats();
    let mut d = Driver::new(Box::new(v), IrqMode::Legacy);
    let s = d.init(0, false);
    assert_eq!(s & status::DRIVER_OK, status::DRIVER_OK, "status {s:#x}");
    Env {
        _dir: dir,
        uds,
        d,
        stats,
        got: VecDeque::new(),
        rx_out: 0,
        epoll: Epoll::new().unwrap(),
        polled: HashSet::new(),
    }
}

/// A header from the guest.
pub(super) fn g(op: Op, src_port: u32, dst_port: u32) -> Header {
    Header {
        src_cid: GUEST_CID,
        dst_cid: HOST_CID,
        src_port,
        dst_port,
        len: 0,
        type_: TYPE_STREAM,
        op: op as u16,
        flags: 0,
        buf_alloc: 64 * 1024,
        fwd_cnt: 0,
    }
}

pub(super) fn host_stream(e: &Env) -> UnixStream {
    let s = UnixStream::connect(&e.uds).unwrap();
    s.set_read_timeout(Some(DEADLINE)).unwrap();
    s
}

impl Env {
    /// Give the device rx buffers (one descriptor each, at DATA + head * RX_BUF) up to 8
    /// outstanding, and notify the rx queue.
    pub(super) fn give_rx(&mut self) {
        while self.rx_out < 8 {
            let head = self.d.add(0, &[(0, 0, true)]);
            // The chain is one descriptor at index `head`: point it at its own slot.
            let addr = DATA + u64::from(head) * u64::from(RX_BUF);
            self.d.raw_desc(0, head, addr, RX_BUF, 2, 0);
            self.rx_out += 1;
        }
        self.d.kick(0);
    }

    /// Collect the rx queue's used buffers.
    pub(super) fn collect(&mut self) {
        for (head, len) in self.d.used(0) {
            self.rx_out -= 1;
            let addr = DATA + u64::from(head) * u64::from(RX_BUF);
            assert!(len as usize >= HDR_LEN, "rx packet of {len} bytes");
            let raw: [u8; HDR_LEN] = self.d.get(addr, HDR_LEN).try_into().unwrap();
            let h = Header::parse(&raw);
            assert_eq!(len as usize, HDR_LEN + h.len as usize, "used length");
            let data = self.d.get(addr + HDR_LEN as u64, h.len as usize);
            self.got.push_back((h, data));
        }
    }

    /// Make the polled set what the device wants, as the worker does after each batch: add
    /// the new fds, delete the ones gone (a number it already has is left alone).
    fn sync(&mut self) {
        let want: HashSet<RawFd> = self.d.t.poll_fds().into_iter().collect();
        for fd in self.polled.difference(&want) {
            let _ = self
                .epoll
                .ctl(ControlOperation::Delete, *fd, EpollEvent::default());
        }
        for fd in want.difference(&self.polled) {
            let ev = EpollEvent::new(EventSet::IN, *fd as u32 as u64);
            self.epoll.ctl(ControlOperation::Add, *fd, ev).unwrap();
        }
        self.polled = want;
    }

    /// One round of the worker (worker.rs): wait up to `ms` for a polled fd, hand every
    /// ready one of the batch to the device, then update the polled set. Returns how many
    /// were ready.
    pub(super) fn round(&mut self, ms: i32) -> usize {
        self.sync(); // the test called the device (a kick) since the last round
        let mut events = vec![EpollEvent::default(); 16];
        let n = self.epoll.wait(ms, &mut events).unwrap();
        for ev in &events[..n] {
            self.d.t.backend_ready(ev.data() as u32 as RawFd);
        }
        self.sync();
        self.collect();
        n
    }

    /// Run the worker's rounds for `ms` milliseconds.
    pub(super) fn settle(&mut self, ms: u64) {
        let end = Instant::now() + Duration::from_millis(ms);
        while Instant::now() < end {
            self.round(10);
        }
    }

    /// The next packet to the guest (the worker runs meanwhile), within the deadline.
    pub(super) fn recv(&mut self) -> (Header, Vec<u8>) {
        let end = Instant::now() + DEADLINE;
        loop {
            self.collect();
            if let Some(p) = self.got.pop_front() {
                return p;
            }
            assert!(
                Instant::now() < end,
                "no packet for the guest within {DEADLINE:?}"
            );
            self.give_rx();
            self.round(20);
        }
    }

    /// The guest sends a packet (one readable buffer of header + payload, or `buf_len`
    /// bytes when given).
    pub(super) fn send(&mut self, h: Header, payload: &[u8], buf_len: Option<u32>) {
        let mut h = h;
        if buf_len.is_none() {
            h.len = payload.len() as u32;
        }
        self.d.put(TX_AREA, &h.encode());
        self.d.put(TX_AREA + HDR_LEN as u64, payload);
        let len = buf_len.unwrap_or((HDR_LEN + payload.len()) as u32);
        self.d.add(1, &[(TX_AREA, len, false)]);
        self.d.kick(1);
    }
}

/// Read exactly `n` bytes from the host stream.
pub(super) fn host_read(s: &mut UnixStream, n: usize) -> Vec<u8> {
    let mut b = vec![0u8; n];
    s.read_exact(&mut b).unwrap();
    b
}

/// The device closed the host stream: EOF, or a reset when it left bytes unread.
pub(super) fn assert_closed(s: &mut UnixStream, what: &str) {
    let mut b = [0u8; 64];
    match s.read(&mut b) {
        Ok(0) => {}
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        r => panic!("{what}: the stream is not closed: {r:?}"),
    }
}

/// Host connects with `CONNECT port`, the guest accepts: returns the stream and the
/// device's local port.
pub(super) fn host_connect(e: &mut Env, port: u32) -> (UnixStream, u32) {
    let mut s = host_stream(e);
    s.write_all(format!("CONNECT {port}\n").as_bytes()).unwrap();
    let (h, _) = e.recv();
    assert_eq!(h.op(), Some(Op::Request));
    assert_eq!(
        (h.src_cid, h.dst_cid, h.dst_port),
        (HOST_CID, GUEST_CID, port)
    );
    assert_eq!(h.type_, TYPE_STREAM);
    assert!(h.buf_alloc > 0);
    let local = h.src_port;
    e.send(g(Op::Response, port, local), &[], None);
    let line = format!("OK {local}\n");
    assert_eq!(host_read(&mut s, line.len()), line.as_bytes());
    (s, local)
}

#[test]
fn the_config_space_holds_the_guest_cid_and_bad_cids_are_refused() {
    let mut e = env();
    assert_eq!(e.d.r32(0x100), GUEST_CID as u32);
    assert_eq!(e.d.r32(0x104), 0);
    assert_eq!(e.d.r32(0x000), 0x7472_6976);
    assert_eq!(e.d.r32(0x008), 19, "device ID: vsock");
    let dir = tempfile::tempdir().unwrap();
    for cid in [0, 1, 2, u64::from(u32::MAX)] {
        assert!(matches!(
            Vsock::new(cid, &dir.path().join("x")),
            Err(VsockError::Cid(_))
        ));
    }
    // The path is taken: a clear bind error.
    let err = Vsock::new(3, &e.uds).unwrap_err();
    assert!(matches!(err, VsockError::Bind { .. }), "{err}");
    // A dropped device leaves the path free for the next one.
    let p = dir.path().join("again");
    drop(Vsock::new(3, &p).unwrap());
    assert!(!p.exists(), "socket file left behind");
    drop(Vsock::new(3, &p).unwrap());
}

#[test]
fn host_initiated_connection_relays_both_ways() {
    let mut e = env();
    let (mut s, local) = host_connect(&mut e, 1234);
    assert!(local >= 1 << 30, "ephemeral port {local}");
    e.send(g(Op::Rw, 1234, local), b"ping", None);
    assert_eq!(host_read(&mut s, 4), b"ping");
    s.write_all(b"pong").unwrap();
    let (h, data) = e.recv();
    assert_eq!(h.op(), Some(Op::Rw));
    assert_eq!((h.src_port, h.dst_port), (local, 1234));
    assert_eq!(data, b"pong");
    assert_eq!(
        h.fwd_cnt, 4,
        "the 4 guest bytes were forwarded, the OK line is not counted"
    );
    assert_eq!(e.stats.connections.load(Ordering::Relaxed), 1);
    assert_eq!(e.stats.rx_bytes.load(Ordering::Relaxed), 4);
    assert_eq!(e.stats.tx_bytes.load(Ordering::Relaxed), 4);
    assert!(!e.d.needs_reset());
    // The guest resets: the host stream ends.
    e.send(g(Op::Rst, 1234, local), &[], None);
    e.settle(50);
    assert_closed(&mut s, "after the guest's RST");
}

#[test]
fn guest_initiated_connection_to_a_listener_echoes() {
    let mut e = env();
    let path = PathBuf::from(format!("{}_5000", e.uds.display()));
    let l = UnixListener::bind(&path).unwrap();
    let echo = std::thread::spawn(move || {
        let (mut s, _) = l.accept().unwrap();
        s.set_read_timeout(Some(DEADLINE)).unwrap();
        let mut b = [0u8; 5];
        s.read_exact(&mut b).unwrap();
        s.write_all(&b).unwrap();
        // Then the guest's shutdown of its send side reaches us as EOF.
        assert_eq!(s.read(&mut b).unwrap(), 0);
    });
    e.send(g(Op::Request, 7777, 5000), &[], None);
    let (h, _) = e.recv();
    assert_eq!(h.op(), Some(Op::Response));
    assert_eq!((h.src_port, h.dst_port, h.dst_cid), (5000, 7777, GUEST_CID));
    e.send(g(Op::Rw, 7777, 5000), b"hello", None);
    let (h, data) = e.recv();
    assert_eq!(h.op(), Some(Op::Rw));
    assert_eq!(data, b"hello");
    let mut sh = g(Op::Shutdown, 7777, 5000);
    sh.flags = SHUTDOWN_SEND;
    e.send(sh, &[], None);
    echo.join().unwrap();
    // The echo side closed: the guest hears a shutdown with both flags.
    let (h, _) = e.recv();
    assert_eq!(h.op(), Some(Op::Shutdown));
    assert_eq!(h.flags, SHUTDOWN_RCV | SHUTDOWN_SEND);
    assert_eq!(e.stats.connections.load(Ordering::Relaxed), 1);
}

#[test]
fn guest_connect_with_no_listener_gets_rst() {
    let mut e = env();
    e.send(g(Op::Request, 7777, 5001), &[], None);
    let (h, _) = e.recv();
    assert_eq!(h.op(), Some(Op::Rst));
    assert_eq!((h.src_port, h.dst_port), (5001, 7777));
    assert_eq!(e.stats.refused.load(Ordering::Relaxed), 1);
    assert!(!e.d.needs_reset());
}

#[test]
fn a_malformed_or_overlong_connect_line_closes_only_that_stream() {
    let mut e = env();
    let mut bad = host_stream(&e);
    bad.write_all(b"HELLO 12\n").unwrap();
    let mut long = host_stream(&e);
    long.write_all(&[b'7'; 40]).unwrap();
    let (mut s, local) = host_connect(&mut e, 99);
    e.settle(50);
    assert_closed(&mut bad, "malformed line");
    assert_closed(&mut long, "overlong line");
    assert_eq!(e.stats.refused.load(Ordering::Relaxed), 2);
    // The good connection is unaffected.
    e.send(g(Op::Rw, 99, local), b"still", None);
    assert_eq!(host_read(&mut s, 5), b"still");
    assert!(!e.d.needs_reset());
    assert!(
        e.got.is_empty(),
        "no packet for the bad streams: {:?}",
        e.got
    );
}

#[test]
fn a_tx_packet_longer_than_its_buffer_needs_reset() {
    let mut e = env();
    let mut h = g(Op::Rw, 1, 2);
    h.len = 100;
    e.send(h, &[0u8; 10], Some(HDR_LEN as u32 + 10));
    assert!(e.d.needs_reset());
    let why = e.d.t.broken().unwrap_or_default().to_string();
    assert!(why.contains("100 payload bytes"), "{why}");

    // Past 64 KiB, even with the buffer to back it.
    let mut e = env();
    let mut h = g(Op::Rw, 1, 2);
    h.len = 64 * 1024 + 1;
    e.send(h, &[], Some(HDR_LEN as u32 + 64 * 1024 + 1));
    assert!(e.d.needs_reset());

    // Shorter than a header.
    let mut e = env();
    e.send(g(Op::Rw, 1, 2), &[], Some(20));
    assert!(e.d.needs_reset());
}

#[test]
fn wrong_cid_type_or_op_gets_rst_not_a_reset() {
    let mut e = env();
    let mut h = g(Op::Request, 7, 8);
    h.src_cid = 4;
    e.send(h, &[], None);
    let mut h = g(Op::Request, 7, 9);
    h.type_ = 2;
    e.send(h, &[], None);
    let mut h = g(Op::Request, 7, 10);
    h.op = 99;
    e.send(h, &[], None);
    // An RST for nothing is not answered.
    e.send(g(Op::Rst, 7, 11), &[], None);
    for port in [8, 9, 10] {
        let (h, _) = e.recv();
        assert_eq!(h.op(), Some(Op::Rst));
        assert_eq!((h.src_port, h.dst_port, h.dst_cid), (port, 7, GUEST_CID));
    }
    e.settle(30);
    assert!(e.got.is_empty(), "{:?}", e.got);
    assert!(!e.d.needs_reset());
    assert_eq!(e.stats.resets.load(Ordering::Relaxed), 3);
}

#[test]
fn host_bytes_respect_the_guest_credit() {
    let mut e = env();
    let (mut s, local) = host_connect(&mut e, 42);
    // The guest has room for 8 bytes only.
    let mut cu = g(Op::CreditUpdate, 42, local);
    cu.buf_alloc = 8;
    e.send(cu, &[], None);
    s.write_all(b"0123456789abcdef").unwrap();
    let (h, data) = e.recv();
    assert_eq!(h.op(), Some(Op::Rw));
    assert_eq!(data, b"01234567");
    // Out of credit: the device asks for some and sends nothing else.
    let (h, _) = e.recv();
    assert_eq!(h.op(), Some(Op::CreditRequest));
    e.settle(50);
    assert!(e.got.is_empty(), "{:?}", e.got);
    // The guest consumed the 8 bytes.
    cu.fwd_cnt = 8;
    e.send(cu, &[], None);
    let (h, data) = e.recv();
    assert_eq!(data, b"89abcdef", "{h:?}");
    // A credit request is answered.
    e.send(g(Op::CreditRequest, 42, local), &[], None);
    let h = loop {
        // The device may first ask for credit again (it used all it had).
        let (h, _) = e.recv();
        if h.op() != Some(Op::CreditRequest) {
            break h;
        }
    };
    assert_eq!(h.op(), Some(Op::CreditUpdate));
    assert_eq!(h.buf_alloc, super::conn::BUF_ALLOC);
}

#[test]
fn a_stream_is_not_polled_while_its_bytes_cannot_go_anywhere() {
    let mut e = env();
    let (mut s, _local) = host_connect(&mut e, 43);
    let with_stream = e.d.t.poll_fds();
    // Use up the device's rx buffers with host bytes (no buffers are given back).
    let mut written = 0;
    let end = Instant::now() + DEADLINE;
    while e.rx_out > 0 {
        assert!(Instant::now() < end, "rx buffers not used up");
        s.write_all(&[b'y'; 100]).unwrap();
        written += 100;
        e.round(20);
    }
    // More bytes: the device sees them and cannot deliver them.
    s.write_all(&[b'z'; 100]).unwrap();
    written += 100;
    e.round(50);
    let starved = e.d.t.poll_fds();
    assert_eq!(
        starved.len() + 1,
        with_stream.len(),
        "the stream with bytes and no rx buffer is still polled: {with_stream:?} -> {starved:?}"
    );
    // No spinning: nothing polled is ready while there are no buffers.
    assert_eq!(e.round(50), 0);
    // Buffers come back: every byte arrives.
    let mut n = 0;
    while n < written {
        let (h, data) = e.recv();
        assert_eq!(h.op(), Some(Op::Rw));
        n += data.len();
    }
    assert_eq!(n, written);
    assert_eq!(e.d.t.poll_fds().len(), with_stream.len(), "polled again");
}

#[test]
fn host_eof_sends_shutdown_and_a_closed_host_resets_later_data() {
    let mut e = env();
    let (s, local) = host_connect(&mut e, 44);
    drop(s);
    let (h, _) = e.recv();
    assert_eq!(h.op(), Some(Op::Shutdown));
    assert_eq!(h.flags, SHUTDOWN_SEND, "the host sends no more");
    e.send(g(Op::Rw, 44, local), b"late", None);
    let (h, _) = e.recv();
    assert_eq!(h.op(), Some(Op::Rst), "nobody reads: EPIPE, reset");
    // The connection is gone: a packet on it gets RST too.
    e.send(g(Op::Rw, 44, local), b"later", None);
    let (h, _) = e.recv();
    assert_eq!(h.op(), Some(Op::Rst));
    assert!(!e.d.needs_reset());
}

#[test]
fn a_half_closed_host_still_gets_the_guest_reply() {
    let mut e = env();
    let (mut s, local) = host_connect(&mut e, 45);
    s.write_all(b"request").unwrap();
    s.shutdown(std::net::Shutdown::Write).unwrap();
    let (h, data) = e.recv();
    assert_eq!((h.op(), data.as_slice()), (Some(Op::Rw), &b"request"[..]));
    let (h, _) = e.recv();
    assert_eq!((h.op(), h.flags), (Some(Op::Shutdown), SHUTDOWN_SEND));
    e.send(g(Op::Rw, 45, local), b"reply", None);
    assert_eq!(host_read(&mut s, 5), b"reply");
    // The guest closes: shutdown both ways, the device answers RST and ends the stream.
    let mut sh = g(Op::Shutdown, 45, local);
    sh.flags = SHUTDOWN_RCV | SHUTDOWN_SEND;
    e.send(sh, &[], None);
    let (h, _) = e.recv();
    assert_eq!(h.op(), Some(Op::Rst));
    e.settle(20);
    assert_closed(&mut s, "after the guest's close");
}

#[test]
fn a_stream_closed_and_one_accepted_in_the_same_batch_are_both_served() {
    let mut e = env();
    let mut bad = host_stream(&e);
    e.settle(30); // accepted: it waits for its line
    // One batch: the bad line (the device closes that stream) and the listener (it accepts
    // a stream that could get the closed one's fd number).
    bad.write_all(b"BAD\n").unwrap();
    let mut good = host_stream(&e);
    good.write_all(b"CONNECT 5\n").unwrap();
    let (h, _) = e.recv();
    assert_eq!((h.op(), h.dst_port), (Some(Op::Request), 5));
    assert_closed(&mut bad, "bad line");
}

#[test]
fn an_rx_buffer_with_room_for_a_header_only_takes_no_data() {
    let mut e = env();
    let (mut s, local) = host_connect(&mut e, 46);
    // Use up the rx buffers the device holds.
    let end = Instant::now() + DEADLINE;
    let mut written = 0;
    while e.rx_out > 0 {
        assert!(Instant::now() < end, "rx buffers not used up");
        s.write_all(b"abcd").unwrap();
        written += 4;
        e.round(20);
    }
    e.got.clear();
    // Bytes wait; the guest gives a 44-byte buffer, then normal ones.
    s.write_all(b"wxyz").unwrap();
    written += 4;
    e.round(50);
    let head = e.d.add(0, &[(0, 0, true)]);
    let addr = DATA + u64::from(head) * u64::from(RX_BUF);
    e.d.raw_desc(0, head, addr, HDR_LEN as u32, 2, 0);
    e.rx_out += 1;
    e.d.kick(0);
    let (h, data) = e.recv();
    assert_eq!(h.op(), Some(Op::CreditUpdate), "{h:?} {data:?}");
    let (h, data) = e.recv();
    assert_eq!((h.op(), h.src_port), (Some(Op::Rw), local));
    assert_eq!(data, b"wxyz");
    assert!(written > 4);
}
