//! Record encoding tests, and save/restore of real devices over real guest memory.

use std::sync::Arc;

use proptest::prelude::*;

use super::*;
use crate::mmio::{IrqMode, MSI_CMD_MASK, reg, status};
use crate::rng::Rng;
use crate::testing::{DATA, Driver};
use crate::{MmioTransport, RestoreError};

mod devices;

/// An rng transport, initialised, one request done.
fn rng_driver(mode: IrqMode, msi: bool) -> Driver {
    let mut d = Driver::new(Box::new(Rng::new()), mode);
    d.begin(0, true);
    if msi {
        d.program_msi(2);
    }
    let s = d.finish();
    assert_eq!(s & status::DRIVER_OK, status::DRIVER_OK, "status {s:#x}");
    rng_request(&mut d, 0);
    d
}

/// One entropy request; checks it completes with the next used index.
fn rng_request(d: &mut Driver, expect_used_idx_before: u16) {
    assert_eq!(d.used_idx(0), expect_used_idx_before);
    // EVENT_IDX: ask for an interrupt at this request (used_event after the avail ring).
    let used_event = crate::testing::ring(0) + 0x1000 + 4 + 2 * u64::from(d.qsize);
    d.put(used_event, &expect_used_idx_before.to_le_bytes());
    let head = d.add(0, &[(DATA, 64, true)]);
    d.kick(0);
    assert_eq!(d.used(0), vec![(head, 64)]);
    assert_eq!(d.used_idx(0), expect_used_idx_before.wrapping_add(1));
    assert!(!d.needs_reset());
}

fn sample_record() -> Vec<u8> {
    let d = rng_driver(IrqMode::Msi, true);
    let st = d.t.save().unwrap();
    encode(&st, b"device bytes")
}

#[test]
fn a_record_round_trips() {
    let d = rng_driver(IrqMode::Msi, true);
    let st = d.t.save().unwrap();
    let rec = encode(&st, b"abc");
    let (back, dev) = decode(&rec).unwrap();
    assert_eq!(back, st);
    assert_eq!(dev, b"abc");
    assert!(back.msi.enabled && back.activated);
    assert_eq!(back.queues[0].next_used, 1);
}

#[test]
fn truncated_records_are_refused() {
    let rec = sample_record();
    for n in 0..rec.len() {
        assert!(
            decode(&rec[..n]).is_err(),
            "{n} of {} bytes decoded",
            rec.len()
        );
    }
    let mut long = rec.clone();
    long.push(0);
    assert!(decode(&long).is_err(), "a trailing byte is refused");
}

#[test]
fn every_flipped_bit_is_refused() {
    let rec = sample_record();
    for i in 0..rec.len() * 8 {
        let mut r = rec.clone();
        r[i / 8] ^= 1 << (i % 8);
        assert!(decode(&r).is_err(), "bit {i} flipped still decodes");
    }
    let mut r = rec.clone();
    r[20] ^= 1;
    assert!(matches!(decode(&r), Err(DecodeError::Checksum { .. })));
}

/// Replace the CRC so only the field changed is wrong.
fn reseal(r: &mut [u8]) {
    let n = r.len() - 4;
    let crc = crc32fast::hash(&r[..n]);
    r[n..].copy_from_slice(&crc.to_le_bytes());
}

#[test]
fn an_unknown_version_is_named() {
    let mut r = sample_record();
    r[4..8].copy_from_slice(&2u32.to_le_bytes());
    reseal(&mut r);
    assert_eq!(decode(&r).unwrap_err(), DecodeError::Version(2));
    let mut r = sample_record();
    r[0] = b'X';
    assert!(matches!(decode(&r), Err(DecodeError::Magic(_))));
}

#[test]
fn counts_are_bounded_before_use() {
    let st = rng_driver(IrqMode::Legacy, false).t.save().unwrap();
    let rec = encode(&st, &[]);
    // The queue count sits right before the queue entries: 4 + 34 bytes from the end
    // for one queue, then the device length (4) and the CRC (4).
    let at = rec.len() - 4 - 4 - 34 - 4;
    assert_eq!(rec[at..at + 4], 1u32.to_le_bytes());
    let mut r = rec.clone();
    r[at..at + 4].copy_from_slice(&u32::MAX.to_le_bytes());
    reseal(&mut r);
    assert!(matches!(
        decode(&r),
        Err(DecodeError::TooMany { what: "queues", .. })
    ));
    let mut r = rec;
    let dl = r.len() - 8;
    r[dl..dl + 4].copy_from_slice(&(2u32 << 20).to_le_bytes());
    reseal(&mut r);
    assert!(matches!(
        decode(&r),
        Err(DecodeError::TooMany {
            what: "device bytes",
            ..
        })
    ));
}

proptest! {
    #[test]
    fn random_bytes_never_panic(b in proptest::collection::vec(any::<u8>(), 0..512)) {
        let _ = decode(&b);
        // The same with a valid header and CRC, so the body parser sees them.
        let mut r = b"FLVS".to_vec();
        r.extend_from_slice(&1u32.to_le_bytes());
        r.extend_from_slice(&b);
        r.extend_from_slice(&[0; 4]);
        reseal(&mut r);
        let _ = decode(&r);
    }

    #[test]
    fn mutated_records_never_panic(i in 0usize..4096, v in any::<u8>(), cut in 0usize..4096) {
        let mut r = sample_record();
        let n = r.len();
        r[i % n] = v;
        r.truncate(n - cut % n);
        let _ = decode(&r);
        if r.len() >= 4 {
            reseal(&mut r);
            let _ = decode(&r);
        }
    }
}

#[test]
fn rng_restored_continues_the_used_ring_with_msi_routes() {
    let d = rng_driver(IrqMode::Msi, true);
    // Mask vector 0 so a masked route is restored as masked.
    let mut d = d;
    d.t.write(reg::MSI_COMMAND, &MSI_CMD_MASK.to_le_bytes());
    let rec = encode(&d.t.save().unwrap(), &d.t.save_device());
    let (st, dev) = decode(&rec).unwrap();
    let mut n = d.successor(Box::new(Rng::new()), IrqMode::Msi);
    n.t.restore_with_device(&st, &dev).unwrap();
    assert!(n.t.active() && n.t.msi_enabled());
    let routes = n.irq.routes.lock().unwrap().clone();
    assert_eq!(routes.len(), 2, "{routes:?}");
    assert_eq!(routes[0], (0, None), "vector 0 stays masked");
    assert_eq!(
        routes[1],
        (
            1,
            Some(crate::MsiMessage {
                address: 0xfee0_0000,
                data: 0x41
            })
        )
    );
    rng_request(&mut n, 1);
    assert_eq!(n.irq.msi.load(std::sync::atomic::Ordering::SeqCst), 1);
    assert_eq!(n.r32(reg::STATUS), d.r32(reg::STATUS));
}

#[test]
fn rng_restored_with_legacy_interrupts() {
    let d = rng_driver(IrqMode::Legacy, false);
    let st = d.t.save().unwrap();
    let mut n = d.successor(Box::new(Rng::new()), IrqMode::Legacy);
    n.t.restore(&st).unwrap();
    assert!(n.irq.routes.lock().unwrap().is_empty());
    rng_request(&mut n, 1);
    rng_request(&mut n, 2);
    assert_eq!(n.irq.legacy.load(std::sync::atomic::Ordering::SeqCst), 2);
}

/// `restore` refused with `e`, and the transport is still the fresh one.
fn refused_untouched(t: &mut MmioTransport, st: &TransportState) -> RestoreError {
    let before = t.save().unwrap();
    let e = t.restore(st).unwrap_err();
    assert_eq!(t.save().unwrap(), before, "nothing changed on {e}");
    assert!(!t.active());
    e
}

#[test]
fn mismatched_states_are_refused_untouched() {
    let d = rng_driver(IrqMode::Msi, true);
    let st = d.t.save().unwrap();
    // Another device type.
    let mut other = d.successor(Box::new(devices::two_queue_net()), IrqMode::Msi);
    let e = refused_untouched(&mut other.t, &st);
    assert!(
        matches!(e, RestoreError::DeviceType { saved: 4, live: 1 }),
        "{e}"
    );
    let mut n = d.successor(Box::new(Rng::new()), IrqMode::Msi);
    // More queues.
    let mut more = st.clone();
    more.queues.push(more.queues[0]);
    let e = refused_untouched(&mut n.t, &more);
    assert!(
        matches!(e, RestoreError::QueueCount { saved: 2, live: 1 }),
        "{e}"
    );
    // A size past the max.
    let mut big = st.clone();
    big.queues[0].size = big.queues[0].max_size * 2;
    let e = refused_untouched(&mut n.t, &big);
    assert!(matches!(e, RestoreError::QueueSize { queue: 0, .. }), "{e}");
    // Rings outside guest memory.
    let mut far = st.clone();
    far.queues[0].used_ring = crate::testing::MEM + 0x1000;
    let e = refused_untouched(&mut n.t, &far);
    assert!(
        matches!(e, RestoreError::QueueMemory { queue: 0, .. }),
        "{e}"
    );
    // Features the device does not offer.
    let mut feat = st.clone();
    feat.driver_features |= 1 << 5;
    let e = refused_untouched(&mut n.t, &feat);
    assert!(matches!(e, RestoreError::Features { .. }), "{e}");
    // MSI vectors for more queues.
    let mut vec = st.clone();
    vec.msi.vectors.push(None);
    vec.msi.masked.push(false);
    let e = refused_untouched(&mut n.t, &vec);
    assert!(matches!(e, RestoreError::MsiVectors { .. }), "{e}");
    // Activated without DRIVER_OK.
    let mut st_bad = st.clone();
    st_bad.status &= !status::DRIVER_OK;
    let e = refused_untouched(&mut n.t, &st_bad);
    assert!(matches!(e, RestoreError::Status { .. }), "{e}");
    // MSI on, on a transport that does not offer it.
    let mut legacy = d.successor(Box::new(Rng::new()), IrqMode::Legacy);
    let e = refused_untouched(&mut legacy.t, &st);
    assert!(matches!(e, RestoreError::MsiNotOffered), "{e}");
    // Device bytes the rng does not take.
    let e = n.t.restore_with_device(&st, b"x").unwrap_err();
    assert!(matches!(e, RestoreError::Device(_)), "{e}");
    assert!(!n.t.active());
    // And the right state still restores.
    n.t.restore(&st).unwrap();
    let _ = Arc::strong_count(&n.irq);
    rng_request(&mut n, 1);
}
