//! Flow control, limits and resets of the vsock device, over real Unix sockets.

use std::io::Read;
use std::os::unix::net::UnixStream;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use super::MAX_CONNS;
use super::conn::BUF_ALLOC;
use super::packet::{Op, SHUTDOWN_RCV, SHUTDOWN_SEND};
use super::tests::{DEADLINE, assert_closed, env, env_with, g, host_connect, host_stream};
use crate::mmio::reg;
use crate::testing::DATA;

#[test]
fn a_device_reset_closes_every_host_stream() {
    let mut e = env();
    let (mut s, _) = host_connect(&mut e, 1);
    let mut waiting = host_stream(&e);
    e.settle(30);
    e.d.w32(reg::STATUS, 0);
    assert_closed(&mut s, "connected stream after reset");
    assert_closed(&mut waiting, "stream without a CONNECT line after reset");
}

#[test]
fn the_guest_refusing_a_host_connect_closes_the_host_stream() {
    let mut e = env();
    let mut s = host_stream(&e);
    std::io::Write::write_all(&mut s, b"CONNECT 80\n").unwrap();
    let (h, _) = e.recv();
    assert_eq!(h.op(), Some(Op::Request));
    e.send(g(Op::Rst, 80, h.src_port), &[], None);
    e.settle(30);
    assert_closed(&mut s, "refused by the guest");
    assert!(e.got.is_empty(), "no answer to an RST: {:?}", e.got);
}

#[test]
fn an_rx_buffer_smaller_than_a_header_needs_reset() {
    let mut e = env();
    e.send(g(Op::Request, 7, 5002), &[], None); // an RST waits for the guest
    e.d.add(0, &[(DATA, 20, true)]);
    e.d.kick(0);
    assert!(e.d.needs_reset());
    let why = e.d.t.broken().unwrap_or_default().to_string();
    assert!(why.contains("cannot hold the 44-byte header"), "{why}");
}

/// The guest sends `n` packets of 64 KiB (bytes `i % 251`) on a connection.
fn send_64k(e: &mut super::tests::Env, port: u32, local: u32, n: usize, off: &mut usize) {
    for _ in 0..n {
        let chunk: Vec<u8> = (*off..*off + 65536).map(|i| (i % 251) as u8).collect();
        *off += chunk.len();
        e.send(g(Op::Rw, port, local), &chunk, None);
    }
}

#[test]
fn guest_bytes_wait_for_a_slow_host_and_flow_when_it_reads() {
    let mut e = env();
    let (s, local) = host_connect(&mut e, 2);
    let idle = e.d.t.poll_fds().len();
    // 256 KiB: all the credit the device gives; the host reads nothing yet.
    let mut off = 0;
    send_64k(&mut e, 2, local, 4, &mut off);
    assert!(!e.d.needs_reset());
    e.settle(20);
    assert!(
        e.got.iter().all(|(h, _)| h.op() != Some(Op::Rst)),
        "{:?}",
        e.got
    );
    assert_eq!(
        e.d.t.poll_fds().len(),
        idle + 1,
        "the writability epoll is polled while bytes wait"
    );
    let reader = std::thread::spawn(move || {
        let mut s = s;
        s.set_read_timeout(Some(DEADLINE)).unwrap();
        let mut all = vec![0u8; 4 * 65536];
        s.read_exact(&mut all).unwrap();
        (all, s) // the stream stays open
    });
    let end = Instant::now() + DEADLINE;
    while !reader.is_finished() {
        assert!(Instant::now() < end, "the host never got the bytes");
        e.round(10);
    }
    let (all, _s) = reader.join().unwrap();
    assert!(
        all.iter().enumerate().all(|(i, b)| *b == (i % 251) as u8),
        "bytes out of order"
    );
    e.settle(20);
    assert_eq!(e.d.t.poll_fds().len(), idle, "nothing waits: not polled");
    // The guest heard its credit come back, unasked.
    let updates: Vec<u32> = e
        .got
        .iter()
        .filter(|(h, _)| h.op() == Some(Op::CreditUpdate))
        .map(|(h, _)| h.fwd_cnt)
        .collect();
    assert!(
        updates.iter().any(|&f| f >= BUF_ALLOC / 2),
        "credit updates {updates:?}"
    );
    e.got.clear();
    e.send(g(Op::CreditRequest, 2, local), &[], None);
    let (h, _) = e.recv();
    assert_eq!((h.op(), h.fwd_cnt), (Some(Op::CreditUpdate), 4 * 65536));
}

#[test]
fn a_guest_overrunning_its_credit_gets_rst() {
    let mut e = env();
    let (mut s, local) = host_connect(&mut e, 3);
    let mut off = 0;
    // 1 MiB with the host reading nothing: far more than the 256 KiB of credit plus what
    // the socket buffer holds (the credit updates the device sends meanwhile are ignored).
    send_64k(&mut e, 3, local, 16, &mut off);
    assert!(
        !e.d.needs_reset(),
        "an overrun is the connection's fault, not the device's"
    );
    let h = loop {
        let (h, _) = e.recv();
        if h.op() != Some(Op::CreditUpdate) {
            break h;
        }
    };
    assert_eq!(h.op(), Some(Op::Rst));
    assert!(e.stats.resets.load(Ordering::Relaxed) >= 1);
    // The host gets what was written before, then the end.
    let mut b = vec![0u8; 1 << 16];
    let mut n = 0;
    loop {
        match s.read(&mut b) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break,
            Err(e) => panic!("host read: {e}"),
        }
    }
    assert!(n < 16 * 65536, "{n} bytes");
}

#[test]
fn connections_are_bounded_and_slow_connect_lines_make_room() {
    let deadline = Duration::from_millis(2500);
    let mut e = env_with(|v| v.with_line_deadline(deadline));
    let start = Instant::now();
    let mut idle: Vec<UnixStream> = (0..MAX_CONNS).map(|_| host_stream(&e)).collect();
    // Accept them all (16 per readiness of the listener).
    while e.round(20) > 0 {}
    // Each silent stream's deadline runs from when it was accepted.
    let accepted = Instant::now();
    let mut over = host_stream(&e);
    e.settle(30);
    assert!(
        start.elapsed() < deadline,
        "setting up took too long for the test ({:?})",
        start.elapsed()
    );
    assert_closed(&mut over, "one stream over the limit");
    assert_eq!(e.stats.refused.load(Ordering::Relaxed), 1);
    // Past the deadline, a new stream closes the silent ones and gets its connection.
    std::thread::sleep(deadline.saturating_sub(accepted.elapsed()) + Duration::from_millis(50));
    let mut late = host_stream(&e);
    std::io::Write::write_all(&mut late, b"CONNECT 9\n").unwrap();
    let (h, _) = e.recv();
    assert_eq!((h.op(), h.dst_port), (Some(Op::Request), 9));
    assert_eq!(
        e.stats.refused.load(Ordering::Relaxed),
        1 + MAX_CONNS as u64
    );
    assert_closed(&mut idle[0], "a silent stream past the deadline");
    idle.clear();
}

#[test]
fn a_guest_close_waits_for_its_bytes_to_reach_a_slow_host() {
    let mut e = env();
    let (s, local) = host_connect(&mut e, 4);
    let mut off = 0;
    send_64k(&mut e, 4, local, 4, &mut off);
    let mut sh = g(Op::Shutdown, 4, local);
    sh.flags = SHUTDOWN_RCV | SHUTDOWN_SEND;
    e.send(sh, &[], None);
    e.settle(20);
    assert!(
        e.got.iter().all(|(h, _)| h.op() != Some(Op::Rst)),
        "RST before the bytes are out: {:?}",
        e.got
    );
    let reader = std::thread::spawn(move || {
        let mut s = s;
        s.set_read_timeout(Some(DEADLINE)).unwrap();
        let mut all = Vec::new();
        s.read_to_end(&mut all).unwrap();
        all
    });
    let end = Instant::now() + DEADLINE;
    while !reader.is_finished() {
        assert!(Instant::now() < end, "the host never got its EOF");
        e.round(10);
    }
    let all = reader.join().unwrap();
    assert_eq!(all.len(), 4 * 65536, "every byte, then EOF");
    assert!(all.iter().enumerate().all(|(i, b)| *b == (i % 251) as u8));
    let h = loop {
        let (h, _) = e.recv();
        if h.op() != Some(Op::CreditUpdate) {
            break h;
        }
    };
    assert_eq!(h.op(), Some(Op::Rst));
}

#[test]
fn control_packets_are_bounded_and_the_tx_queue_waits_for_rx_buffers() {
    let mut e = env();
    // Packets with a wrong CID each get an RST; no rx buffer takes them.
    let mut sent = 0u32;
    loop {
        let mut h = g(Op::Request, 1, sent);
        h.src_cid = 9;
        e.send(h, &[], None);
        if e.d.used(1).is_empty() {
            break; // the device left this one on the queue
        }
        sent += 1;
        assert!(
            sent as usize <= super::CTL_QUEUE,
            "control packets unbounded"
        );
    }
    assert!(
        sent as usize >= super::CTL_QUEUE - 2,
        "stalled early: {sent}"
    );
    assert!(!e.d.needs_reset());
    // Rx buffers come: every RST arrives in order, and the waiting packet is taken.
    for port in 0..=sent {
        let (h, _) = e.recv();
        assert_eq!((h.op(), h.src_port), (Some(Op::Rst), port));
    }
    assert_eq!(e.d.used(1).len(), 1, "the waiting tx packet was completed");
}

/// Wait for the next used rx buffer while the real worker thread runs the device.
fn wait_rx(e: &mut super::tests::Env) -> (super::packet::Header, Vec<u8>) {
    let end = Instant::now() + DEADLINE;
    loop {
        e.collect();
        if let Some(p) = e.got.pop_front() {
            return p;
        }
        assert!(
            Instant::now() < end,
            "no packet for the guest within {DEADLINE:?}"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
}

#[test]
fn the_real_worker_thread_runs_a_connection() {
    use std::io::Write;

    use crate::{IrqMode, MmioTransport, Worker};

    let mut e = env();
    // Hand the initialised transport to a worker thread (worker.rs); the driver keeps
    // writing rings in the shared guest memory and notifies through the worker.
    let spare = tempfile::tempdir().unwrap();
    let placeholder = MmioTransport::new(
        Box::new(super::Vsock::new(3, &spare.path().join("p")).unwrap()),
        e.d.mem.clone(),
        std::sync::Arc::new(crate::interrupt::Counted::default()),
        IrqMode::Legacy,
    );
    let t = std::mem::replace(&mut e.d.t, placeholder);
    let mut w = Worker::spawn(t, "vsock-test".into()).unwrap();
    for _ in 0..8 {
        let head = e.d.add(0, &[(0, 0, true)]);
        let addr = DATA + u64::from(head) * 0x1000;
        e.d.raw_desc(0, head, addr, 0x1000, 2, 0);
        e.rx_out += 1;
    }
    w.notify(0);
    let mut s = host_stream(&e);
    s.write_all(b"CONNECT 77\n").unwrap();
    let (h, _) = wait_rx(&mut e);
    assert_eq!((h.op(), h.dst_port), (Some(Op::Request), 77));
    let local = h.src_port;
    let send = |e: &mut super::tests::Env, w: &Worker, h: super::packet::Header, p: &[u8]| {
        let mut h = h;
        h.len = p.len() as u32;
        e.d.put(super::tests::TX_AREA, &h.encode());
        e.d.put(super::tests::TX_AREA + 44, p);
        e.d.add(1, &[(super::tests::TX_AREA, 44 + p.len() as u32, false)]);
        w.notify(1);
    };
    send(&mut e, &w, g(Op::Response, 77, local), &[]);
    let line = format!("OK {local}\n");
    assert_eq!(super::tests::host_read(&mut s, line.len()), line.as_bytes());
    s.write_all(b"hi").unwrap();
    let (h, data) = wait_rx(&mut e);
    assert_eq!((h.op(), data.as_slice()), (Some(Op::Rw), &b"hi"[..]));
    send(&mut e, &w, g(Op::Rw, 77, local), b"yo");
    assert_eq!(super::tests::host_read(&mut s, 2), b"yo");
    w.stop();
    assert!(
        w.transport().lock().unwrap().broken().is_none(),
        "the device did not fail"
    );
}
