//! Entropy device tests through the register-level driver over real guest memory.

use super::*;
use crate::mmio::{IrqMode, reg};
use crate::testing::{DATA, Driver};

fn device() -> (Driver, Arc<RngStats>) {
    let rng = Rng::new();
    let stats = rng.stats();
    let mut d = Driver::new(Box::new(rng), IrqMode::Legacy);
    let s = d.init(0, false);
    assert_eq!(s & 0x4, 0x4, "DRIVER_OK refused: status {s:#x}");
    (d, stats)
}

/// Whether `b` looks random: not all one value, and many distinct values.
fn varied(b: &[u8]) -> bool {
    let mut seen = [false; 256];
    for &x in b {
        seen[usize::from(x)] = true;
    }
    seen.iter().filter(|&&s| s).count() > 64
}

#[test]
fn identity() {
    let (mut d, _) = device();
    assert_eq!(d.r32(reg::DEVICE_ID), 4);
    d.w32(reg::DEVICE_FEATURES_SEL, 0);
    // Only the transport's EVENT_IDX (29) in the low word: no device feature.
    assert_eq!(d.r32(reg::DEVICE_FEATURES), 1 << 29);
}

#[test]
fn writable_buffers_are_filled_with_random_bytes() {
    let (mut d, stats) = device();
    d.put(DATA, &[0u8; 1024]);
    let head = d.add(0, &[(DATA, 100, true), (DATA + 512, 400, true)]);
    d.kick(0);
    assert_eq!(d.used(0), vec![(head, 500)]);
    let a: Vec<u8> = [d.get(DATA, 100), d.get(DATA + 512, 400)].concat();
    assert!(varied(&a), "not random: {a:?}");
    assert!(
        d.get(DATA + 100, 412).iter().all(|&b| b == 0),
        "wrote outside the buffers"
    );

    // A second request gets other bytes.
    let head = d.add(0, &[(DATA + 2048, 500, true)]);
    d.kick(0);
    assert_eq!(d.used(0), vec![(head, 500)]);
    assert_ne!(d.get(DATA + 2048, 500), a);
    assert_eq!(
        stats.snapshot(),
        RngCounters {
            requests: 2,
            bytes: 1000,
            errors: 0
        }
    );
    assert!(!d.needs_reset());
}

#[test]
fn one_request_gets_at_most_64_kib() {
    let (mut d, stats) = device();
    let room = 100 << 10;
    d.put(DATA, &vec![0u8; room]);
    let head = d.add(0, &[(DATA, room as u32, true)]);
    d.kick(0);
    assert_eq!(d.used(0), vec![(head, MAX_REQUEST as u32)]);
    assert!(varied(&d.get(DATA, MAX_REQUEST)));
    assert!(
        d.get(DATA + MAX_REQUEST as u64, room - MAX_REQUEST)
            .iter()
            .all(|&b| b == 0),
        "wrote past 64 KiB"
    );
    assert_eq!(stats.snapshot().bytes, MAX_REQUEST as u64);
}

#[test]
fn a_chain_with_only_readable_buffers_gets_nothing_and_no_reset() {
    let (mut d, stats) = device();
    d.put(DATA, &[7u8; 64]);
    let head = d.add(0, &[(DATA, 64, false)]);
    d.kick(0);
    assert_eq!(d.used(0), vec![(head, 0)]);
    assert!(!d.needs_reset());
    assert_eq!(d.get(DATA, 64), vec![7u8; 64], "readable buffer untouched");

    // Readable buffers before writable ones are skipped.
    let head = d.add(0, &[(DATA, 64, false), (DATA + 4096, 32, true)]);
    d.kick(0);
    assert_eq!(d.used(0), vec![(head, 32)]);
    assert_eq!(d.get(DATA, 64), vec![7u8; 64]);
    assert_eq!(stats.snapshot().requests, 2);
}
