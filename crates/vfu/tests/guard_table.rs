//! The SIGBUS guard table of unsealed client mappings is bounded per process: past it, a
//! DMA_MAP of an unsealed fd is refused with `ENOSPC` (a sealed fd needs no guard and is still
//! mapped), and an unmap frees a slot. Alone in its test binary: the table is process-wide.

mod common;

use std::os::fd::AsRawFd;

use common::*;
use vfu::proto::*;

/// Guarded mappings a process may hold (`server::sigbus::SLOTS`).
const SLOTS: u64 = 4096;

#[test]
fn unsealed_mappings_past_the_guard_table_are_refused() {
    let h = Harness::new();
    let (_a, dev_a) = h.dma("a.sock");
    let (_b, dev_b) = h.dma("b.sock");
    let unsealed = memfd(4096, false);
    let sealed = memfd(4096, true);
    let mut a = Raw::connect(dev_a.path());
    a.negotiate();
    for i in 0..SLOTS {
        a.ok(
            Command::DmaMap,
            &dma_map(i << 12, 4096, 0),
            &[unsealed.as_raw_fd()],
        );
    }
    let mut b = Raw::connect(dev_b.path());
    b.negotiate();
    b.expect_error(
        Command::DmaMap,
        &dma_map(0, 4096, 0),
        &[unsealed.as_raw_fd()],
        libc::ENOSPC,
    );
    b.ok(Command::DmaMap, &dma_map(0, 4096, 0), &[sealed.as_raw_fd()]);
    let u = DmaUnmap {
        argsz: 24,
        flags: 0,
        address: 0,
        size: 4096,
    };
    a.ok(Command::DmaUnmap, zerocopy::IntoBytes::as_bytes(&u), &[]);
    b.ok(
        Command::DmaMap,
        &dma_map(1 << 12, 4096, 0),
        &[unsealed.as_raw_fd()],
    );
    // A's disconnect frees all of its slots.
    drop(a);
    let mut a = Raw::connect(dev_a.path());
    a.negotiate();
    for i in 0..16 {
        a.ok(
            Command::DmaMap,
            &dma_map(i << 12, 4096, 0),
            &[unsealed.as_raw_fd()],
        );
    }
}
