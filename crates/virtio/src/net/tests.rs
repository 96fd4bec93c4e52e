//! virtio-net over a real Unix socket pair, driven through the registers.

use std::os::fd::RawFd;
use std::time::{Duration, Instant};

use super::*;
use crate::IrqMode;
use crate::testing::{DATA, Driver};

pub(super) const MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];

/// A driver over a net device, initialised with MAC and STATUS.
pub(super) fn driver(backend: Box<dyn NetBackend>) -> (Driver, Arc<NetStats>) {
    let net = Net::new(backend, MAC);
    let stats = net.stats();
    let mut d = Driver::new(Box::new(net), IrqMode::Legacy);
    let s = d.init(F_MAC | F_STATUS, false);
    assert_eq!(s & 0x4, 0x4, "DRIVER_OK, status {s:#x}");
    (d, stats)
}

/// An Ethernet frame of `len` bytes: broadcast, from MAC, ethertype 0x88b5, a counting body.
pub(super) fn frame(len: usize, seed: u8) -> Vec<u8> {
    let mut f = vec![0xff; 6];
    f.extend_from_slice(&MAC);
    f.extend_from_slice(&[0x88, 0xb5]);
    f.extend((0..len.saturating_sub(14)).map(|i| (i as u8).wrapping_add(seed)));
    f.truncate(len);
    f
}

/// Transmit `f` from the guest: header and frame in two descriptors. Returns the head.
pub(super) fn tx(d: &mut Driver, f: &[u8]) -> u16 {
    let head = tx_chain(d, f);
    d.kick(TX);
    head
}

/// Put `f` on the transmit queue without notifying. Returns the head.
pub(super) fn tx_chain(d: &mut Driver, f: &[u8]) -> u16 {
    d.put(DATA, &[0u8; HDR_LEN]);
    d.put(DATA + 0x100, f);
    d.add(
        TX,
        &[
            (DATA, HDR_LEN as u32, false),
            (DATA + 0x100, f.len() as u32, false),
        ],
    )
}

/// Wait (up to 5 s) until `fd` is readable.
pub(super) fn wait_readable(fd: RawFd) {
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: p is one valid pollfd for the call.
    let n = unsafe { libc::poll(&mut p, 1, 5000) };
    assert_eq!(n, 1, "fd {fd} not readable within 5 s");
}

/// The peer's next frame (waiting up to 5 s).
fn peer_recv(peer: &mut SocketBackend) -> Vec<u8> {
    wait_readable(peer.fd());
    let mut b = vec![0u8; RX_BUF];
    let n = peer.recv(&mut b).expect("peer recv");
    b.truncate(n);
    b
}

/// The backend fd the transport polls (there must be exactly one).
pub(super) fn polled(d: &Driver) -> RawFd {
    let fds = d.t.poll_fds();
    assert_eq!(fds.len(), 1, "polled fds {fds:?}");
    fds[0]
}

#[test]
fn config_and_features() {
    let (dev, _peer) = SocketBackend::pair().unwrap();
    let (mut d, _) = driver(Box::new(dev));
    assert_eq!(d.r32(crate::mmio::reg::DEVICE_ID), 1);
    d.w32(crate::mmio::reg::DEVICE_FEATURES_SEL, 0);
    let f = d.r32(crate::mmio::reg::DEVICE_FEATURES);
    assert_eq!(f & ((1 << 5) | (1 << 16)), (1 << 5) | (1 << 16), "{f:#x}");
    let mut cfg = [0u8; 8];
    for (i, b) in cfg.iter_mut().enumerate() {
        let mut x = [0u8];
        d.t.read(crate::mmio::reg::CONFIG + i as u64, &mut x);
        *b = x[0];
    }
    assert_eq!(&cfg[..6], &MAC);
    assert_eq!(u16::from_le_bytes([cfg[6], cfg[7]]), S_LINK_UP);
    d.w32(crate::mmio::reg::QUEUE_SEL, 0);
    assert_eq!(d.r32(crate::mmio::reg::QUEUE_NUM_MAX), 256);
}

#[test]
fn a_transmitted_frame_reaches_the_peer_exactly() {
    let (dev, mut peer) = SocketBackend::pair().unwrap();
    let (mut d, stats) = driver(Box::new(dev));
    let f = frame(1514, 7);
    let head = tx(&mut d, &f);
    assert_eq!(d.used(TX), vec![(head, 0)]);
    assert_eq!(peer_recv(&mut peer), f);
    // header and frame in one descriptor, the smallest frame
    let g = frame(60, 9);
    let mut one = vec![0u8; HDR_LEN];
    one.extend_from_slice(&g);
    d.put(DATA, &one);
    let head = d.add(TX, &[(DATA, one.len() as u32, false)]);
    d.kick(TX);
    assert_eq!(d.used(TX), vec![(head, 0)]);
    assert_eq!(peer_recv(&mut peer), g);
    assert_eq!(stats.tx_frames.load(Ordering::Relaxed), 2);
    assert_eq!(stats.tx_bytes.load(Ordering::Relaxed), 1514 + 60);
    assert!(!d.needs_reset());
}

#[test]
fn a_peer_frame_lands_in_a_receive_buffer_with_the_header() {
    let (dev, mut peer) = SocketBackend::pair().unwrap();
    let (mut d, stats) = driver(Box::new(dev));
    let head = d.add(RX, &[(DATA, 4096, true)]);
    d.kick(RX);
    assert!(d.used(RX).is_empty());
    let f = frame(1000, 3);
    peer.send(&f).unwrap();
    let fd = polled(&d);
    wait_readable(fd);
    d.t.backend_ready(fd);
    assert_eq!(d.used(RX), vec![(head, (HDR_LEN + f.len()) as u32)]);
    let mut want_hdr = [0u8; HDR_LEN];
    want_hdr[10] = 1; // num_buffers = 1
    assert_eq!(d.get(DATA, HDR_LEN), want_hdr);
    assert_eq!(d.get(DATA + HDR_LEN as u64, f.len()), f);
    assert_eq!(stats.rx_frames.load(Ordering::Relaxed), 1);
    assert_eq!(stats.rx_bytes.load(Ordering::Relaxed), 1000);
    // a chain split into header and frame buffers
    let head = d.add(RX, &[(DATA, 10, true), (DATA + 0x1000, 2000, true)]);
    let g = frame(100, 5);
    peer.send(&g).unwrap();
    wait_readable(fd);
    d.t.backend_ready(fd);
    assert_eq!(d.used(RX), vec![(head, (HDR_LEN + g.len()) as u32)]);
    assert_eq!(d.get(DATA, 10), &want_hdr[..10]);
    let mut rest = d.get(DATA + 0x1000, 2 + g.len());
    assert_eq!(rest.drain(..2).collect::<Vec<_>>(), &want_hdr[10..]);
    assert_eq!(rest, g);
}

#[test]
fn a_frame_without_a_buffer_waits_and_its_fd_is_not_polled() {
    let (dev, mut peer) = SocketBackend::pair().unwrap();
    let (mut d, stats) = driver(Box::new(dev));
    let fd = polled(&d);
    let f = frame(200, 1);
    let g = frame(300, 2);
    peer.send(&f).unwrap();
    peer.send(&g).unwrap();
    wait_readable(fd);
    d.t.backend_ready(fd);
    assert!(d.used(RX).is_empty());
    assert!(
        d.t.poll_fds().is_empty(),
        "a held frame and no buffer: the fd must not be polled (the worker would spin)"
    );
    // the driver gives one buffer and notifies: the held frame arrives, the next one is held
    let h1 = d.add(RX, &[(DATA, 2048, true)]);
    d.kick(RX);
    assert_eq!(d.used(RX), vec![(h1, (HDR_LEN + f.len()) as u32)]);
    assert_eq!(d.get(DATA + HDR_LEN as u64, f.len()), f);
    assert!(d.t.poll_fds().is_empty(), "the second frame is held");
    let h2 = d.add(RX, &[(DATA + 0x1000, 2048, true)]);
    d.kick(RX);
    assert_eq!(d.used(RX), vec![(h2, (HDR_LEN + g.len()) as u32)]);
    assert_eq!(d.get(DATA + 0x1000 + HDR_LEN as u64, g.len()), g);
    assert_eq!(polled(&d), fd, "polled again once nothing is held");
    assert_eq!(stats.rx_frames.load(Ordering::Relaxed), 2);
    assert_eq!(stats.dropped.load(Ordering::Relaxed), 0);
}

#[test]
fn a_frame_too_big_for_the_buffer_is_dropped_and_the_buffer_kept() {
    let (dev, mut peer) = SocketBackend::pair().unwrap();
    let (mut d, stats) = driver(Box::new(dev));
    let head = d.add(RX, &[(DATA, 512, true)]);
    peer.send(&frame(1514, 0)).unwrap();
    let small = frame(400, 4);
    peer.send(&small).unwrap();
    let fd = polled(&d);
    wait_readable(fd);
    d.t.backend_ready(fd);
    assert_eq!(d.used(RX), vec![(head, (HDR_LEN + 400) as u32)]);
    assert_eq!(d.get(DATA + HDR_LEN as u64, 400), small);
    assert_eq!(stats.dropped.load(Ordering::Relaxed), 1);
    // a frame over MAX_FRAME from the peer is dropped too (its length is seen, not cut)
    peer.send(&frame(MAX_FRAME + 1, 0)).unwrap();
    wait_readable(fd);
    d.t.backend_ready(fd);
    assert_eq!(stats.dropped.load(Ordering::Relaxed), 2);
    assert!(!d.needs_reset());
}

#[test]
fn an_oversized_or_short_transmit_chain_needs_reset() {
    let (dev, _peer) = SocketBackend::pair().unwrap();
    let (mut d, stats) = driver(Box::new(dev));
    // header + MAX_FRAME + 1 bytes of frame
    let head_len = HDR_LEN as u32;
    d.add(
        TX,
        &[
            (DATA, head_len, false),
            (DATA + 0x100, MAX_FRAME as u32 + 1, false),
        ],
    );
    d.kick(TX);
    assert!(d.needs_reset());
    let why = d.t.broken().unwrap_or_default().to_string();
    assert!(why.contains("65551"), "{why}");
    assert_eq!(stats.tx_frames.load(Ordering::Relaxed), 0);

    // exactly MAX_FRAME is accepted (the socket takes it)
    let (dev, mut peer) = SocketBackend::pair().unwrap();
    let (mut d, _) = driver(Box::new(dev));
    let big = frame(MAX_FRAME, 1);
    d.put(DATA + 0x100, &big);
    let head = d.add(
        TX,
        &[
            (DATA, head_len, false),
            (DATA + 0x100, MAX_FRAME as u32, false),
        ],
    );
    d.kick(TX);
    assert_eq!(d.used(TX), vec![(head, 0)]);
    assert_eq!(peer_recv(&mut peer), big);

    // shorter than the header
    d.add(TX, &[(DATA, 11, false)]);
    d.kick(TX);
    assert!(d.needs_reset());
}

#[test]
fn a_receive_chain_without_room_for_the_header_needs_reset() {
    let (dev, mut peer) = SocketBackend::pair().unwrap();
    let (mut d, _) = driver(Box::new(dev));
    d.add(RX, &[(DATA, 8, true)]);
    peer.send(&frame(60, 0)).unwrap();
    let fd = polled(&d);
    wait_readable(fd);
    d.t.backend_ready(fd);
    assert!(d.needs_reset());
}

#[test]
fn a_closed_peer_fails_the_device_on_transmit() {
    let (dev, peer) = SocketBackend::pair().unwrap();
    let (mut d, _) = driver(Box::new(dev));
    drop(peer);
    tx(&mut d, &frame(60, 0));
    assert!(d.needs_reset());
    let why = d.t.broken().unwrap_or_default().to_string();
    assert!(why.contains("net send"), "{why}");
    assert!(d.t.poll_fds().is_empty(), "a failed device polls nothing");
}

#[test]
fn a_closed_peer_fails_the_device_on_receive() {
    let (dev, peer) = SocketBackend::pair().unwrap();
    let (mut d, _) = driver(Box::new(dev));
    let fd = polled(&d);
    drop(peer);
    wait_readable(fd);
    d.t.backend_ready(fd);
    assert!(d.needs_reset());
}

#[test]
fn frames_the_peer_cannot_take_are_dropped_without_blocking() {
    let (dev, _peer) = SocketBackend::pair().unwrap();
    let (mut d, stats) = driver(Box::new(dev));
    let f = frame(1514, 0);
    let start = Instant::now();
    let mut sent = 0;
    // nobody reads the peer: its queue fills, then sends fail with EAGAIN
    while stats.dropped.load(Ordering::Relaxed) == 0 {
        let head = tx(&mut d, &f);
        assert_eq!(d.used(TX), vec![(head, 0)], "completed even when dropped");
        sent += 1;
        assert!(
            sent < 100_000 && start.elapsed() < Duration::from_secs(10),
            "no drop after {sent} frames"
        );
    }
    assert!(!d.needs_reset());
    assert_eq!(stats.tx_frames.load(Ordering::Relaxed), sent - 1);
}

#[test]
fn reset_forgets_a_held_frame() {
    let (dev, mut peer) = SocketBackend::pair().unwrap();
    let (mut d, _) = driver(Box::new(dev));
    let fd = polled(&d);
    peer.send(&frame(100, 0)).unwrap();
    wait_readable(fd);
    d.t.backend_ready(fd);
    assert!(d.t.poll_fds().is_empty());
    d.init(F_MAC | F_STATUS, false);
    assert_eq!(
        polled(&d),
        fd,
        "after a reset and DRIVER_OK the fd is polled again"
    );
}

#[test]
fn a_frame_shorter_than_an_ethernet_header_is_dropped() {
    let (dev, mut peer) = SocketBackend::pair().unwrap();
    let (mut d, stats) = driver(Box::new(dev));
    // only the header, then 13 bytes of frame: neither reaches the peer, nor resets
    d.put(DATA, &[0u8; HDR_LEN]);
    let h1 = d.add(TX, &[(DATA, HDR_LEN as u32, false)]);
    let h2 = tx(&mut d, &frame(13, 0));
    assert_eq!(d.used(TX), vec![(h1, 0), (h2, 0)]);
    assert_eq!(stats.dropped.load(Ordering::Relaxed), 2);
    assert!(!d.needs_reset());
    let mut b = [0u8; 64];
    let e = peer.recv(&mut b).expect_err("nothing sent to the peer");
    assert_eq!(e.kind(), std::io::ErrorKind::WouldBlock, "{e}");
    // the shortest frame goes through
    let f = frame(ETH_HLEN, 0);
    tx(&mut d, &f);
    assert_eq!(peer_recv(&mut peer), f);
}
