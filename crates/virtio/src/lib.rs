//! virtio-mmio devices for faultline's microVM.
//!
//! # Layout
//!
//! - [`mmio`]: the transport, virtio-mmio version 2 (virtio 1.2, section 4.2), with the two
//!   interrupt paths:
//!   - **legacy**: one line per device; the driver reads `InterruptStatus` (0x060) and writes
//!     `InterruptACK` (0x064), each a trapped MMIO access, and EOIs the IOAPIC;
//!   - **MSI**, in the register layout of Kata's Dragonball VMM (it ships in a real VMM;
//!     Linux's MSI-for-virtio-mmio series was never merged): offered through the vendor ID
//!     `0xdbfcdb00 | 0x2`, enabled by the driver before `DRIVER_OK`:
//!
//!     | offset | size | access | meaning |
//!     |---|---|---|---|
//!     | 0x0c0 | 16 | R | bit 15: MSI offered |
//!     | 0x0c0 | 16 | W | bit 15: enable MSI (before `DRIVER_OK`; after it, the device fails) |
//!     | 0x0c2 | 16 | W | command: 0x1000 \| v program vector v from the registers below; 0x2000 \| v mask; 0x3000 \| v unmask |
//!     | 0x0c4 | 32 | W | message address, low |
//!     | 0x0c8 | 32 | W | message address, high |
//!     | 0x0cc | 32 | W | message data |
//!
//!     Vector 0 is the configuration change, vector 1 + q queue q. With MSI on, the device
//!     never sets `InterruptStatus`: no status read, no ACK, no IOAPIC EOI; the VMM turns each
//!     vector into a KVM MSI route and an irqfd, so an interrupt costs no exit to userspace.
//! - [`chain`]: descriptor chains walked strictly (a loop, an index or a buffer out of range,
//!   an over-long chain is named, and the device asks for a reset);
//! - [`device`]: the [`VirtioDevice`] trait a device model implements, and [`Queues`];
//! - [`state`]: a device's saved state for snapshots and live migration
//!   ([`MmioTransport::save`], [`MmioTransport::restore_with_device`],
//!   [`VirtioDevice::save_state`]) and its versioned, CRC-checked record format;
//! - [`dirty`]: the guest pages devices wrote, for a live migration's rounds (KVM's dirty
//!   log sees only the vCPUs' writes);
//! - [`worker`]: one thread per device waiting on its queues' ioeventfds and backend fds;
//! - the devices, a folder each: [`blk`], [`net`], [`vsock`], [`rng`].
//!
//! Rings (available index, used ring, EVENT_IDX suppression) are rust-vmm's `virtio-queue`.

pub mod chain;
pub mod device;
pub mod dirty;
pub mod interrupt;
pub mod mmio;
pub mod state;
pub mod worker;

pub mod blk;
pub mod net;
pub mod rng;
pub mod vsock;

#[cfg(test)]
pub(crate) mod testing;

pub use device::{DeviceError, DeviceType, Queues, VirtioDevice};
pub use interrupt::{Interrupt, MsiMessage};
pub use mmio::{IrqMode, MmioTransport, RestoreError, SaveError, WriteAction};
pub use state::{DecodeError, TransportState, decode, encode};
pub use worker::Worker;

/// An error and its causes on one line ("a: b: c").
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}
