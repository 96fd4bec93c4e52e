//! End-to-end behaviour with several clients and misbehaving ones: two devices and
//! concurrent clients in one server, malformed messages (junk, huge or truncated headers,
//! unknown commands, bad sizes, wrong fd counts, bad VERSION, bad DMA_MAP) answered with an
//! error or a dropped connection while other clients go on, and clients stalled in the
//! middle of a message holding up only themselves. Raw messages over real Unix sockets.

mod common;

use std::io::Write;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use vfu::client::{Client, ClientError};
use vfu::devices::dma;
use vfu::devices::gpio;
use vfu::proto::*;
use vfu::sock;
use zerocopy::IntoBytes;

#[test]
fn several_clients_and_two_devices_in_one_server() {
    let h = Harness::one_thread();
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

#[test]
fn misbehaving_clients_get_errors_or_are_dropped() {
    let h = Harness::one_thread();
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
        Command::DeviceGetInfo,
        &[16, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        &[],
        libc::EINVAL,
    );
    r.negotiate();
    // VERSION twice.
    let mut p = vec![0, 0, 1, 0];
    p.extend(Caps::default().to_json());
    r.expect_error(Command::Version, &p, &[], libc::EINVAL);
    // Unknown command.
    r.expect_error_raw(99, &[], &[], libc::ENOSYS);
    r.expect_error_raw(0, &[1, 2, 3], &[], libc::ENOSYS);
    alive(&good);
    // REGION_READ of more than max_data_xfer_size.
    let big = RegionAccess {
        offset: 0,
        region: PCI_CONFIG_REGION,
        count: (1 << 20) + 1,
    };
    r.expect_error(Command::RegionRead, big.as_bytes(), &[], libc::EINVAL);
    alive(&good);
    // REGION_WRITE whose count disagrees with its data.
    let w = RegionAccess {
        offset: 0,
        region: 2,
        count: 8,
    };
    let mut p = w.as_bytes().to_vec();
    p.extend([0; 4]);
    r.expect_error(Command::RegionWrite, &p, &[], libc::EINVAL);
    // Truncated fixed parts.
    r.expect_error(Command::RegionRead, &[0; 8], &[], libc::EINVAL);
    r.expect_error(Command::DmaMap, &[0; 31], &[], libc::EINVAL);
    // A region that does not exist, an IRQ index that does not exist.
    let nr = RegionAccess {
        offset: 0,
        region: 42,
        count: 4,
    };
    r.expect_error(Command::RegionRead, nr.as_bytes(), &[], libc::EINVAL);
    let q = IrqInfo {
        argsz: 16,
        index: 9,
        ..Default::default()
    };
    r.expect_error(Command::DeviceGetIrqInfo, q.as_bytes(), &[], libc::EINVAL);
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
        Command::DeviceSetIrqs,
        s.as_bytes(),
        &[e1.as_raw_fd()],
        libc::EINVAL,
    );
    // ... beyond the index's vectors (INTx has one).
    let s2 = IrqSet { count: 2, ..s };
    r.expect_error(
        Command::DeviceSetIrqs,
        s2.as_bytes(),
        &[e1.as_raw_fd(), e1.as_raw_fd()],
        libc::EINVAL,
    );
    // ... fds on a command that takes none.
    r.expect_error(
        Command::RegionRead,
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
    r.expect_error(Command::Version, &p, &[], libc::ENOTSUP);
    r.expect_closed();
    // Bad capabilities JSON.
    let mut r = Raw::connect(&path);
    r.expect_error(Command::Version, b"\0\0\x01\0{not json", &[], libc::ENOTSUP);
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
    let mfd = memfd(0x20000, true);
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

#[test]
fn a_client_stalled_mid_message_holds_up_only_itself() {
    // One serving thread: before messages were assembled piecewise, a client that sent half
    // a message held that thread (and every other client) until its read timed out.
    let h = Harness::one_thread();
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
