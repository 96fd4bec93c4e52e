//! Hand-made hostile guests: each must end with the device asking for a reset, without a
//! panic, and the device must do nothing more until the guest resets it. Also: the
//! used-index check catches a device that completes more chains than it was given.

use virtio::mmio::{reg, status};
use virtio::{DeviceError, DeviceType, IrqMode, Queues, VirtioDevice};

use super::driver::{DATA, Input, avail, ring, used};
use super::{Host, Kind, Outcome, execute, run};

/// Run `i` and check that it ends with `NEEDS_RESET`.
fn needs_reset(i: &Input) -> Outcome {
    let o = run(&i.encode()).expect("a whole input");
    assert!(
        o.status & status::NEEDS_RESET != 0,
        "status {:#x}, the device does not ask for a reset",
        o.status
    );
    assert!(o.broken.is_some());
    o
}

/// After the fault, the guest keeps notifying and feeding good chains (the harness checks
/// that nothing happens), then resets the device and makes it work again.
fn keep_kicking(i: &mut Input, q: usize) {
    i.put(DATA + 0x800, &[0; 64]);
    i.desc(q, 5, DATA + 0x800, 64, 2, 0);
    i.avail_head(q, 5);
    i.publish(q);
    for _ in 0..3 {
        i.w32(reg::QUEUE_NOTIFY, q as u32);
        i.notify(q as u32);
        i.backends(2);
    }
}

#[test]
fn a_descriptor_loop_asks_for_a_reset() {
    let mut i = Input::new(Kind::Rng, false);
    i.init(0, false, 1);
    i.desc(0, 0, DATA, 16, 1 | 2, 1);
    i.desc(0, 1, DATA + 16, 16, 1 | 2, 0);
    i.avail_head(0, 0);
    i.kick(0);
    keep_kicking(&mut i, 0);
    let o = needs_reset(&i);
    assert!(o.reached_driver_ok);
    assert_eq!(o.completed, 0);
    assert!(o.broken.as_deref().unwrap().contains("malformed"), "{o:?}");
}

#[test]
fn a_ring_outside_memory_asks_for_a_reset() {
    let mut i = Input::new(Kind::Block, false);
    i.begin(0, false);
    i.w32(reg::QUEUE_SEL, 0);
    i.w32(reg::QUEUE_NUM, 8);
    i.w32(reg::QUEUE_DESC_LOW, ring(0) as u32);
    i.w32(reg::QUEUE_DRIVER_LOW, avail(0) as u32);
    i.w32(reg::QUEUE_DEVICE_LOW, used(0) as u32);
    i.w32(reg::QUEUE_DEVICE_HIGH, 1); // the used ring at 4 GiB + 0x200
    i.w32(reg::QUEUE_READY, 1);
    i.driver_ok();
    keep_kicking(&mut i, 0);
    let o = needs_reset(&i);
    assert!(!o.reached_driver_ok, "DRIVER_OK on a broken device");
    assert!(o.broken.as_deref().unwrap().contains("invalid"), "{o:?}");
}

#[test]
fn a_buffer_outside_memory_asks_for_a_reset() {
    let mut i = Input::new(Kind::Rng, false);
    i.init(0, false, 1);
    i.add(0, &[(super::MEM as u64 - 8, 64, true)]);
    i.kick(0);
    keep_kicking(&mut i, 0);
    let o = needs_reset(&i);
    assert!(o.reached_driver_ok);
    assert_eq!(o.completed, 0);
}

#[test]
fn a_huge_available_index_asks_for_a_reset() {
    let mut i = Input::new(Kind::Block, false);
    i.init(0, false, 1);
    i.poke(avail(0), 0x8000 << 16);
    i.w32(reg::QUEUE_NOTIFY, 0);
    keep_kicking(&mut i, 0);
    let o = needs_reset(&i);
    assert!(o.reached_driver_ok);
    assert_eq!(o.completed, 0);
}

#[test]
fn a_net_peer_that_closed_asks_for_a_reset() {
    let mut i = Input::new(Kind::Net, false);
    i.init(0, false, 2);
    i.put(DATA, &[0x11; 12 + 60]);
    i.add(1, &[(DATA, 72, false)]);
    i.host(1, 0, 0); // the peer closes
    i.kick(1);
    keep_kicking(&mut i, 1);
    let o = needs_reset(&i);
    assert!(o.reached_driver_ok);
}

#[test]
fn a_vsock_packet_longer_than_its_chain_asks_for_a_reset() {
    let mut i = Input::new(Kind::Vsock, false);
    i.init(0, false, 3);
    let mut h = [0u8; 44];
    h[24..28].copy_from_slice(&1000u32.to_le_bytes()); // len, past the chain
    h[30..32].copy_from_slice(&5u16.to_le_bytes()); // OP_RW
    i.put(DATA, &h);
    i.add(1, &[(DATA, 44, false), (DATA + 0x40, 8, false)]);
    i.kick(1);
    keep_kicking(&mut i, 1);
    needs_reset(&i);
}

#[test]
fn after_a_reset_the_device_works_again() {
    let mut i = Input::new(Kind::Rng, false);
    i.init(0, false, 1);
    i.desc(0, 0, DATA, 16, 1 | 2, 0); // a loop of one
    i.avail_head(0, 0);
    i.kick(0);
    i.init(0, false, 1);
    // The driver starts its rings again from index 0.
    i.poke(avail(0), 0);
    i.poke(used(0), 0);
    // The same layout: descriptor 0, available slot 0, written by the guest after the reset.
    i.poke(ring(0), (DATA + 0x100) as u32);
    i.poke(ring(0) + 8, 32);
    i.poke(ring(0) + 12, 2);
    i.poke(avail(0), 1 << 16);
    i.w32(reg::QUEUE_NOTIFY, 0);
    let o = run(&i.encode()).expect("a whole input");
    assert_eq!(o.status & status::NEEDS_RESET, 0, "{o:?}");
    assert_eq!(o.completed, 1);
    assert_eq!(Input::used_idx(&o.mem, 0), 1);
}

#[test]
fn the_seed_sessions_do_their_work() {
    // Each session is checked inside the generator (used indices, status bytes, data read
    // back, frames and stream bytes at the host end).
    let seeds = crate::seeds::virtio();
    assert_eq!(seeds.len(), 6);
    for (_, name, b) in &seeds {
        assert!(b.len() < 8 << 10, "{name}: {} bytes", b.len());
    }
}

/// A device that completes two chains for every one it takes.
struct Greedy;

impl VirtioDevice for Greedy {
    fn device_type(&self) -> DeviceType {
        DeviceType::Rng
    }
    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![16]
    }
    fn features(&self) -> u64 {
        0
    }
    fn config(&self) -> Vec<u8> {
        Vec::new()
    }
    fn activate(&mut self, _features: u64) -> Result<(), DeviceError> {
        Ok(())
    }
    fn reset(&mut self) {}
    fn process_queue(&mut self, qs: &mut Queues<'_>, index: usize) -> Result<(), DeviceError> {
        while let Some(c) = qs.pop(index)? {
            qs.complete(index, &c, 0)?;
            qs.complete(index, &c, 0)?;
        }
        Ok(())
    }
}

#[test]
#[should_panic(expected = "not within")]
fn the_used_index_check_catches_a_device_that_completes_too_much() {
    let mut i = Input::new(Kind::Rng, false);
    i.init(0, false, 1);
    for _ in 0..5 {
        i.add(0, &[(DATA, 16, true)]);
    }
    i.kick(0);
    let b = i.encode();
    let n = usize::from(u16::from_le_bytes([b[1], b[2]]));
    let (image, ops) = b[3..].split_at(n);
    execute(Box::new(Greedy), Host::None, IrqMode::Legacy, image, ops);
}

#[test]
fn short_inputs_do_nothing() {
    assert!(run(&[]).is_none());
    assert!(run(&[3, 0]).is_none());
    let o = run(&[3, 0xff, 0xff, 1, 2, 3]).expect("a device");
    assert!(!o.reached_driver_ok);
}

#[test]
fn a_used_index_the_guest_scribbled_is_not_taken_for_the_devices() {
    // The guest stores 7 in the used index; the device, which completed nothing yet,
    // writes 1 after its first chain: no invariant may fire.
    let mut i = Input::new(Kind::Rng, false);
    i.init(0, false, 1);
    i.add(0, &[(DATA, 16, true)]);
    i.poke(used(0), 7 << 16);
    i.kick(0);
    let o = run(&i.encode()).expect("a whole input");
    assert!(o.reached_driver_ok && o.broken.is_none(), "{o:?}");
    assert_eq!(Input::used_idx(&o.mem, 0), 1);
}

#[test]
fn a_needs_reset_bit_the_driver_wrote_itself_is_not_a_failed_device() {
    // DEVICE_NEEDS_RESET is the device's to set: the transport ignores a driver that
    // stores it, and the device goes on working; the harness must not take it for a failed
    // device either.
    let mut i = Input::new(Kind::Rng, false);
    i.init(0, false, 1);
    let s = status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK;
    i.w32(reg::STATUS, s | status::NEEDS_RESET);
    i.add(0, &[(DATA, 16, true)]);
    i.kick(0);
    let o = run(&i.encode()).expect("a whole input");
    assert_eq!(o.status & status::NEEDS_RESET, 0);
    assert!(o.broken.is_none(), "{o:?}");
    assert_eq!(o.completed, 1);
}
