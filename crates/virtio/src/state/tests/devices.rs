//! Save and restore of the block, network and vsock devices over real guest memory (a
//! real image file, a real socket pair, a real Unix listener).

use std::time::{Duration, Instant};

use crate::blk::{Block, FileBackend};
use crate::mmio::{IrqMode, RestoreError, status};
use crate::net::{F_MAC, F_STATUS, HDR_LEN, Net, NetBackend, SocketBackend, TX};
use crate::testing::{DATA, Driver};
use crate::vsock::Vsock;

const MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];

/// A net device over one end of a fresh socket pair (the other end dropped).
pub(super) fn two_queue_net() -> Net {
    let (dev, _peer) = SocketBackend::pair().unwrap();
    Net::new(Box::new(dev), MAC)
}

/// Block: write a sector through the first transport, restore onto a second over the same
/// image, read it back through the second: the used ring continues at index 1.
#[test]
fn block_restored_reads_what_was_written() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    let blk = Block::new(Box::new(FileBackend::open(&img, false).unwrap()));
    let mut d = Driver::new(Box::new(blk), IrqMode::Legacy);
    assert_eq!(d.init(0, true) & status::DRIVER_OK, status::DRIVER_OK);
    let (hdr, buf, st) = (DATA, DATA + 0x1000, DATA + 0x100);
    let request = |d: &mut Driver, kind: u32, data_write: bool| {
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&kind.to_le_bytes());
        h[8..16].copy_from_slice(&3u64.to_le_bytes());
        d.put(hdr, &h);
        d.put(st, &[0xff]);
        let head = d.add(
            0,
            &[(hdr, 16, false), (buf, 512, data_write), (st, 1, true)],
        );
        d.kick(0);
        let used = d.used(0);
        assert_eq!(used.len(), 1, "{used:?}");
        assert_eq!(used[0].0, head);
        assert_eq!(d.get(st, 1)[0], 0, "request status OK");
    };
    d.put(buf, &[0xab; 512]);
    request(&mut d, 1, false); // OUT
    let rec = crate::state::encode(&d.t.save().unwrap(), &d.t.save_device());
    let (state, dev) = crate::state::decode(&rec).unwrap();
    assert_eq!(dev.len(), 9, "capacity and read-only");

    // Another disk size is refused, nothing changed.
    let other = dir.path().join("other");
    std::fs::File::create(&other)
        .unwrap()
        .set_len(2 << 20)
        .unwrap();
    let b2 = Block::new(Box::new(FileBackend::open(&other, false).unwrap()));
    let mut wrong = d.successor(Box::new(b2), IrqMode::Legacy);
    let e = wrong.t.restore_with_device(&state, &dev).unwrap_err();
    assert!(matches!(e, RestoreError::Device(_)), "{e}");
    assert!(!wrong.t.active());
    // The same disk read-only is refused too.
    let b3 = Block::new(Box::new(FileBackend::open(&img, true).unwrap()));
    let mut ro = d.successor(Box::new(b3), IrqMode::Legacy);
    assert!(ro.t.restore_with_device(&state, &dev).is_err());

    let b = Block::new(Box::new(FileBackend::open(&img, false).unwrap()));
    let mut n = d.successor(Box::new(b), IrqMode::Legacy);
    n.t.restore_with_device(&state, &dev).unwrap();
    n.put(buf, &[0; 512]);
    request(&mut n, 0, true); // IN
    assert_eq!(n.get(buf, 512), vec![0xab; 512]);
    assert_eq!(n.used_idx(0), 2);
    assert!(!n.needs_reset());
}

fn recv_within(peer: &mut SocketBackend, deadline: Duration) -> Vec<u8> {
    let end = Instant::now() + deadline;
    let mut b = vec![0u8; 70000];
    loop {
        match peer.recv(&mut b) {
            Ok(n) => return b[..n].to_vec(),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                assert!(Instant::now() < end, "no frame within {deadline:?}");
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) => panic!("recv: {e}"),
        }
    }
}

fn send_frame(d: &mut Driver, f: &[u8]) -> u16 {
    d.put(DATA, &[0u8; HDR_LEN]);
    d.put(DATA + 0x100, f);
    let head = d.add(
        TX,
        &[
            (DATA, HDR_LEN as u32, false),
            (DATA + 0x100, f.len() as u32, false),
        ],
    );
    d.kick(TX);
    head
}

/// Net: a frame out through the first transport, one more through the restored one (on a
/// new backend, as after a migration); another MAC is refused.
#[test]
fn net_restored_transmits_and_refuses_another_mac() {
    let (dev, mut peer) = SocketBackend::pair().unwrap();
    let mut d = Driver::new(Box::new(Net::new(Box::new(dev), MAC)), IrqMode::Legacy);
    assert_eq!(
        d.init(F_MAC | F_STATUS, false) & status::DRIVER_OK,
        status::DRIVER_OK
    );
    let f = [0x11u8; 60];
    let head = send_frame(&mut d, &f);
    assert_eq!(d.used(TX), vec![(head, 0)]);
    assert_eq!(recv_within(&mut peer, Duration::from_secs(5)), f);
    let state = d.t.save().unwrap();
    let dev_bytes = d.t.save_device();
    assert_eq!(dev_bytes, MAC);

    let (dev2, _p) = SocketBackend::pair().unwrap();
    let mut other = d.successor(
        Box::new(Net::new(Box::new(dev2), [2, 0, 0, 0, 0, 1])),
        IrqMode::Legacy,
    );
    let e = other.t.restore_with_device(&state, &dev_bytes).unwrap_err();
    assert!(matches!(e, RestoreError::Device(_)), "{e}");

    let (dev3, mut peer3) = SocketBackend::pair().unwrap();
    let mut n = d.successor(Box::new(Net::new(Box::new(dev3), MAC)), IrqMode::Legacy);
    n.t.restore_with_device(&state, &dev_bytes).unwrap();
    let g = [0x22u8; 80];
    let head = send_frame(&mut n, &g);
    assert_eq!(n.used(TX), vec![(head, 0)]);
    assert_eq!(n.used_idx(TX), 2);
    assert_eq!(recv_within(&mut peer3, Duration::from_secs(5)), g);
}

/// Vsock: the restored device puts a TRANSPORT_RESET event (id 0) in the guest's event
/// buffer, once, and carries no connections.
#[test]
fn vsock_restored_sends_a_transport_reset_event() {
    let dir = tempfile::tempdir().unwrap();
    let v = Vsock::new(3, &dir.path().join("a.sock")).unwrap();
    let mut d = Driver::new(Box::new(v), IrqMode::Legacy);
    assert_eq!(d.init(0, false) & status::DRIVER_OK, status::DRIVER_OK);
    // An event buffer the guest posted before the snapshot: the old device never fills it.
    d.put(DATA, &[0xee; 8]);
    let ev1 = d.add(2, &[(DATA, 8, true)]);
    d.kick(2);
    assert!(d.used(2).is_empty());
    let state = d.t.save().unwrap();
    let dev_bytes = d.t.save_device();
    assert!(dev_bytes.is_empty());

    let v2 = Vsock::new(3, &dir.path().join("b.sock")).unwrap();
    let mut n = d.successor(Box::new(v2), IrqMode::Legacy);
    n.t.restore_with_device(&state, &dev_bytes).unwrap();
    assert_eq!(
        n.used(2),
        vec![(ev1, 4)],
        "the event filled the posted buffer"
    );
    assert_eq!(
        n.get(DATA, 4),
        0u32.to_le_bytes(),
        "TRANSPORT_RESET is id 0"
    );
    // Only once.
    let ev2 = n.add(2, &[(DATA + 0x100, 8, true)]);
    n.kick(2);
    assert!(n.used(2).is_empty(), "buffer {ev2} left for a later event");
    assert!(!n.needs_reset());
}
