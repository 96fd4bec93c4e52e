//! The virtual machine's state as KVM holds it, and the threads that run it: the layer every
//! orchestration (controller, snapshot, restore, migration) drives and none of it is.
//!
//! - [`kvm`]: `/dev/kvm`, the VM fd with guest memory as slot 0, irqchip and PIT, CPUID.
//! - [`machine`]: the VM created ([`Vm`]) and running ([`Machine`]); which parts a snapshot
//!   cannot carry yet ([`Machine::uncarried`]).
//! - [`vcpu`]: a vCPU thread's loop and exits, the SIGBUS of a lost page.
//! - [`control`]: pause with owners, stop, jobs on parked vCPUs ([`VcpuControl`]).
//! - [`irq`]: the GSI routing table, irqfds and MSIs ([`Interrupts`]).
//! - [`state`]: each component's state ([`Persist`]): vCPU, LAPIC, irqchip, PIT, clock.
//! - [`stats`]: KVM's binary statistics of a vCPU (`KVM_GET_STATS_FD`), e.g. its exits.
//! - [`notice`]: what this layer reports upward ([`Notice`]), through a [`Notifier`].

pub mod control;
pub mod error;
pub mod irq;
pub mod kvm;
pub mod machine;
pub mod notice;
pub mod state;
pub mod stats;
pub mod vcpu;

pub use control::{PauseOwner, Resumed, SaveError, VcpuControl};
pub use error::VmError;
pub use irq::{Interrupts, IrqError, MsiMessage};
pub use machine::{DeviceSet, Machine, Parts, Uncarried, Vm};
pub use notice::{BoxError, Failure, Notice, Notifier};
pub use state::{DeviceRecords, Persist, StateError, VcpuState, VmState};
pub use stats::{KvmStats, StatsError};
