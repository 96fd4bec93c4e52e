//! Transport tests with a small echo device, driven through the registers.

use std::sync::atomic::Ordering;

use super::*;
use crate::testing::{DATA, Driver};
use crate::{DeviceType, Queues};

/// Copies each chain's readable bytes, reversed, into its writable part.
struct Echo;

impl VirtioDevice for Echo {
    fn device_type(&self) -> DeviceType {
        DeviceType::Rng
    }
    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![64]
    }
    fn features(&self) -> u64 {
        0
    }
    fn config(&self) -> Vec<u8> {
        vec![1, 2, 3, 4]
    }
    fn activate(&mut self, _features: u64) -> Result<(), DeviceError> {
        Ok(())
    }
    fn reset(&mut self) {}
    fn process_queue(&mut self, qs: &mut Queues<'_>, q: usize) -> Result<(), DeviceError> {
        while let Some(c) = qs.pop(q)? {
            let mut b = vec![0u8; c.readable_len() as usize];
            c.read_at(qs.mem(), 0, &mut b)
                .map_err(|source| DeviceError::Memory { queue: q, source })?;
            b.reverse();
            let n = c
                .write_at(qs.mem(), 0, &b)
                .map_err(|source| DeviceError::Memory { queue: q, source })?;
            qs.complete(q, &c, n as u32)?;
        }
        Ok(())
    }
}

fn driver(mode: IrqMode) -> Driver {
    Driver::new(Box::new(Echo), mode)
}

#[test]
fn identity_registers() {
    let mut d = driver(IrqMode::Legacy);
    assert_eq!(d.r32(reg::MAGIC), MAGIC);
    assert_eq!(d.r32(reg::VERSION), 2);
    assert_eq!(d.r32(reg::DEVICE_ID), 4);
    assert_eq!(d.r32(reg::VENDOR_ID), VENDOR_ID);
    d.w32(reg::DEVICE_FEATURES_SEL, 1);
    assert_eq!(d.r32(reg::DEVICE_FEATURES) & 1, 1, "VERSION_1 offered");
    assert_eq!(d.r32(reg::CONFIG), u32::from_le_bytes([1, 2, 3, 4]));
    let mut b = [0u8; 2];
    d.t.read(reg::MSI_CSR, &mut b);
    assert_eq!(u16::from_le_bytes(b), 0, "MSI not offered in legacy mode");
    let mut m = driver(IrqMode::Msi);
    assert_eq!(
        m.r32(reg::VENDOR_ID),
        DRAGONBALL_VENDOR | DRAGONBALL_MSI_INTR
    );
    m.t.read(reg::MSI_CSR, &mut b);
    assert_eq!(u16::from_le_bytes(b), MSI_CSR_ENABLE);
}

#[test]
fn a_request_round_trip_with_a_legacy_interrupt() {
    let mut d = driver(IrqMode::Legacy);
    let s = d.init(0, false);
    assert_eq!(s & status::DRIVER_OK, status::DRIVER_OK, "status {s:#x}");
    d.put(DATA, b"hello");
    let head = d.add(0, &[(DATA, 5, false), (DATA + 0x100, 16, true)]);
    d.kick(0);
    assert_eq!(d.used(0), vec![(head, 5)]);
    assert_eq!(d.get(DATA + 0x100, 5), b"olleh");
    assert_eq!(d.irq.legacy.load(Ordering::SeqCst), 1);
    assert_eq!(d.r32(reg::INTERRUPT_STATUS), INT_VRING);
    d.w32(reg::INTERRUPT_ACK, INT_VRING);
    assert_eq!(d.r32(reg::INTERRUPT_STATUS), 0);
    assert_eq!(d.t.stats().completed.load(Ordering::SeqCst), 1);
}

#[test]
fn msi_vectors_are_routed_and_fired_without_interrupt_status() {
    let mut d = driver(IrqMode::Msi);
    d.begin(0, false);
    d.program_msi(2);
    assert!(d.finish() & status::DRIVER_OK != 0);
    assert!(d.t.msi_enabled());
    let routes = d.irq.routes.lock().unwrap().clone();
    assert_eq!(routes.len(), 2);
    assert_eq!(
        routes[1],
        (
            1,
            Some(MsiMessage {
                address: 0xfee0_0000,
                data: 0x41
            })
        )
    );
    d.add(0, &[(DATA, 4, false), (DATA + 0x100, 4, true)]);
    d.kick(0);
    assert_eq!(d.used(0).len(), 1);
    assert_eq!(d.irq.msi.load(Ordering::SeqCst), 1);
    assert_eq!(d.irq.legacy.load(Ordering::SeqCst), 0);
    assert_eq!(d.r32(reg::INTERRUPT_STATUS), 0, "MSI sets no status bits");
    // A masked vector does not fire.
    d.t.write(reg::MSI_COMMAND, &(MSI_CMD_MASK | 1).to_le_bytes());
    d.add(0, &[(DATA, 4, false), (DATA + 0x100, 4, true)]);
    d.kick(0);
    assert_eq!(d.irq.msi.load(Ordering::SeqCst), 1);
    // Switching the mode after DRIVER_OK fails the device.
    d.t.write(reg::MSI_CSR, &0u16.to_le_bytes());
    assert!(d.r32(reg::STATUS) & status::FAILED != 0);
}

#[test]
fn msi_cannot_be_enabled_when_not_offered() {
    let mut d = driver(IrqMode::Legacy);
    d.begin(0, false);
    d.t.write(reg::MSI_CSR, &MSI_CSR_ENABLE.to_le_bytes());
    d.finish();
    assert!(!d.t.msi_enabled());
}

#[test]
fn event_idx_suppresses_interrupts_the_driver_did_not_ask_for() {
    let mut d = driver(IrqMode::Legacy);
    d.init(0, true);
    // used_event (after the avail ring's entries) = 5: interrupt only when used idx passes 5.
    let used_event = crate::testing::ring(0) + 0x1000 + 4 + 2 * u64::from(d.qsize);
    d.put(used_event, &5u16.to_le_bytes());
    for _ in 0..3 {
        d.add(0, &[(DATA, 4, false), (DATA + 0x100, 4, true)]);
        d.kick(0);
    }
    assert_eq!(d.used(0).len(), 3);
    assert_eq!(d.irq.legacy.load(Ordering::SeqCst), 0);
    for _ in 0..3 {
        d.add(0, &[(DATA, 4, false), (DATA + 0x100, 4, true)]);
        d.kick(0);
    }
    assert_eq!(d.irq.legacy.load(Ordering::SeqCst), 1);
}

#[test]
fn a_malformed_chain_needs_a_reset_and_a_reset_recovers() {
    let mut d = driver(IrqMode::Legacy);
    d.init(0, false);
    d.raw_desc(0, 0, DATA, 4, 1, 1);
    d.raw_desc(0, 1, DATA, 4, 1, 0); // a loop
    d.avail_raw(0, 0);
    d.kick(0);
    assert!(d.needs_reset());
    assert!(
        d.t.broken().unwrap().contains("loops"),
        "{:?}",
        d.t.broken()
    );
    assert_eq!(d.r32(reg::INTERRUPT_STATUS), INT_CONFIG);
    // Nothing more is processed until the driver resets.
    d.kick(0);
    assert!(d.used(0).is_empty());
    let mut d2 = driver(IrqMode::Legacy);
    assert!(d2.init(0, false) & status::DRIVER_OK != 0);
    d.w32(reg::STATUS, 0);
    assert_eq!(d.r32(reg::STATUS), 0);
    assert!(d.t.broken().is_none());
}

#[test]
fn bad_queue_setups_need_a_reset() {
    // A size that is not a power of two.
    let mut d = driver(IrqMode::Legacy);
    d.qsize = 12;
    d.init(0, false);
    assert!(d.needs_reset());
    // Rings outside guest memory.
    let mut d = driver(IrqMode::Legacy);
    d.w32(reg::STATUS, status::ACKNOWLEDGE | status::DRIVER);
    d.w32(reg::DRIVER_FEATURES_SEL, 1);
    d.w32(reg::DRIVER_FEATURES, 1);
    d.w32(
        reg::STATUS,
        status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
    );
    d.w32(reg::QUEUE_SEL, 0);
    d.w32(reg::QUEUE_NUM, 16);
    d.w32(reg::QUEUE_DESC_LOW, 0xffff_0000);
    d.w32(reg::QUEUE_READY, 1);
    assert!(d.needs_reset());
    // An available index far ahead of the ring.
    let mut d = driver(IrqMode::Legacy);
    d.init(0, false);
    d.put(crate::testing::ring(0) + 0x1000 + 2, &100u16.to_le_bytes());
    d.kick(0);
    assert!(d.needs_reset());
    assert!(d.t.broken().unwrap().contains("ring"), "{:?}", d.t.broken());
}

#[test]
fn features_not_offered_or_without_version_1_are_refused() {
    let mut d = driver(IrqMode::Legacy);
    d.w32(reg::STATUS, status::ACKNOWLEDGE | status::DRIVER);
    d.w32(reg::DRIVER_FEATURES_SEL, 0);
    d.w32(reg::DRIVER_FEATURES, 1 << 5);
    d.w32(reg::DRIVER_FEATURES_SEL, 1);
    d.w32(reg::DRIVER_FEATURES, 1);
    d.w32(
        reg::STATUS,
        status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
    );
    assert_eq!(d.r32(reg::STATUS) & status::FEATURES_OK, 0);
    let mut d = driver(IrqMode::Legacy);
    d.w32(reg::STATUS, status::ACKNOWLEDGE | status::DRIVER);
    d.w32(
        reg::STATUS,
        status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
    );
    assert_eq!(d.r32(reg::STATUS) & status::FEATURES_OK, 0, "no VERSION_1");
}

#[test]
fn registers_ignore_odd_sizes_and_offsets() {
    let mut d = driver(IrqMode::Legacy);
    let mut b = [0xffu8; 1];
    d.t.read(reg::MAGIC, &mut b);
    assert_eq!(b, [0]);
    let mut b = [0xffu8; 8];
    d.t.read(0x0f0, &mut b);
    assert_eq!(b, [0; 8]);
    assert_eq!(d.t.write(reg::QUEUE_NOTIFY, &[0, 0]), WriteAction::None);
    assert_eq!(d.w32(reg::QUEUE_NOTIFY, 7), WriteAction::None, "no queue 7");
    d.w32(reg::QUEUE_SEL, 9);
    assert_eq!(d.r32(reg::QUEUE_NUM_MAX), 0);
    d.w32(reg::QUEUE_READY, 1);
}

#[test]
fn a_driver_that_asks_for_no_interrupts_gets_none() {
    let mut d = driver(IrqMode::Legacy);
    d.init(0, false);
    // VIRTQ_AVAIL_F_NO_INTERRUPT in the available ring's flags.
    d.put(crate::testing::ring(0) + 0x1000, &1u16.to_le_bytes());
    d.add(0, &[(DATA, 4, false), (DATA + 0x100, 4, true)]);
    d.kick(0);
    assert_eq!(d.used(0).len(), 1);
    assert_eq!(d.irq.legacy.load(Ordering::SeqCst), 0);
    d.put(crate::testing::ring(0) + 0x1000, &0u16.to_le_bytes());
    d.add(0, &[(DATA, 4, false), (DATA + 0x100, 4, true)]);
    d.kick(0);
    assert_eq!(d.irq.legacy.load(Ordering::SeqCst), 1);
}

#[test]
fn a_driver_cannot_set_needs_reset_itself() {
    let mut d = driver(IrqMode::Legacy);
    d.init(0, false);
    let s = d.r32(reg::STATUS);
    d.w32(reg::STATUS, s | status::NEEDS_RESET);
    assert!(!d.needs_reset());
    d.add(0, &[(DATA, 4, false), (DATA + 0x100, 4, true)]);
    d.kick(0);
    assert_eq!(d.used(0).len(), 1);
}

#[test]
fn a_frozen_device_takes_nothing_until_thawed() {
    let mut d = driver(IrqMode::Legacy);
    d.init(0, false);
    d.setup_queue(0);
    d.finish();
    d.t.freeze();
    d.put(DATA, b"abcd");
    let head = d.add(0, &[(DATA, 4, false), (DATA + 0x100, 4, true)]);
    d.kick(0);
    assert!(d.used(0).is_empty(), "a frozen device completed a chain");
    assert!(!d.t.poll_queues(), "a frozen device polled its queues");
    assert!(d.t.poll_fds().is_empty());
    assert_eq!(
        d.get(DATA + 0x100, 4),
        vec![0; 4],
        "a frozen device wrote memory"
    );
    // The notify was consumed while frozen: after the thaw the queue is run again (the
    // worker notifies every queue).
    d.t.thaw();
    assert!(d.used(0).is_empty());
    d.t.notify(0);
    assert_eq!(d.used(0), vec![(head, 4)]);
    assert_eq!(d.get(DATA + 0x100, 4), b"dcba");
}

#[test]
fn completions_mark_the_written_buffers_and_the_used_ring_while_tracking() {
    use crate::dirty::{DirtyPages, PAGE};
    let mut d = driver(IrqMode::Legacy);
    let dirty = Arc::new(DirtyPages::new(crate::testing::MEM));
    d.t.set_dirty_log(dirty.clone());
    d.init(0, false);
    d.setup_queue(0);
    d.finish();
    let bit = |w: &[u64], addr: u64| w[(addr / PAGE / 64) as usize] >> (addr / PAGE % 64) & 1;
    // Off: nothing marked.
    d.add(0, &[(DATA, 4, false), (DATA + 0x100, 4, true)]);
    d.kick(0);
    assert_eq!(d.used(0).len(), 1);
    assert!(dirty.take().iter().all(|w| *w == 0));
    dirty.set_tracking(true);
    // A writable buffer across a page boundary, a readable one on its own page.
    d.add(0, &[(DATA + 0x3000, 4, false), (DATA + 0x1ffe, 4, true)]);
    d.kick(0);
    assert_eq!(d.used(0).len(), 1);
    let w = dirty.take();
    assert_eq!(bit(&w, DATA + 0x1000), 1);
    assert_eq!(bit(&w, DATA + 0x2000), 1);
    assert_eq!(bit(&w, DATA + 0x3000), 0, "a buffer the device only read");
    assert_eq!(
        bit(&w, crate::testing::ring(0) + 0x2000),
        1,
        "the used ring"
    );
    assert_eq!(bit(&w, crate::testing::ring(0)), 0, "the descriptor table");
}
