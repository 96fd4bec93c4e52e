//! What the built-in guest reports through its port-I/O ABI, stamped with host time.

use serde::Serialize;

/// Something the guest did, stamped with host time (µs since the VM was created).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    /// A heartbeat (number 0 is sent at the workload's entry).
    Heartbeat {
        /// vCPU.
        vcpu: u32,
        /// Heartbeat number.
        n: u32,
        /// Host time, µs.
        t_us: u64,
    },
    /// The workload's memory is filled and its loop starts.
    Ready {
        /// vCPU.
        vcpu: u32,
        /// Host time, µs.
        t_us: u64,
    },
    /// A checksum reported by the guest.
    Checksum {
        /// vCPU.
        vcpu: u32,
        /// The value (`0x` hex in JSON: JSON numbers lose 64-bit precision).
        #[serde(with = "crate::hex::u64_hex")]
        value: u64,
    },
    /// A log line.
    Log {
        /// vCPU.
        vcpu: u32,
        /// The line.
        line: String,
    },
    /// The guest asked for a reset (i8042): the VM stops.
    Reset {
        /// vCPU.
        vcpu: u32,
        /// Host time, µs.
        t_us: u64,
    },
    /// A value the guest reported (`PORT_KEY`, `PORT_VALUE`).
    Value {
        /// vCPU.
        vcpu: u32,
        /// Key (`abi::KEY_*`).
        key: u32,
        /// Value.
        value: u32,
    },
    /// The workload finished.
    Done {
        /// vCPU.
        vcpu: u32,
        /// Exit code.
        code: u32,
        /// Host time, µs.
        t_us: u64,
    },
}
