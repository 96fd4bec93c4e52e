//! faultline's virtual machine monitor (KVM, x86-64).
//!
//! Layers, each using only those below it (see `ARCHITECTURE.md` at the repository root):
//!
//! - [`api`]: the REST control API on a Unix socket: HTTP ⇄ typed commands; the only place
//!   that knows status codes.
//! - [`controller`]: the VM's event loop ([`RunningVm`]): commands, guest events, failures;
//!   starts snapshots and migrations on threads of their own.
//! - [`migration`], [`snapshot`] (with [`restore`]): moving and persisting a VM.
//! - [`vstate`]: KVM, the machine and its vCPU threads, pause with owners, interrupt routes,
//!   each component's state.
//! - [`devices`]: the legacy port-I/O devices and the PCI bus with vfio-user devices.
//! - [`guest`], [`cpl3`], [`linux`], [`mptable`], [`acpi`]: what is loaded into the guest.
//! - [`memory`], [`config`], [`hex`]: guest memory, what to run, JSON helpers.
//!
//! The state files and the migration stream hold KVM's own structures (kvm-bindings with
//! zerocopy) in small tagged formats of our own: no crate writes Firecracker-independent KVM
//! snapshots, and the formats must stay versioned and checkable.
//!
//! On this project's CI machines `/dev/kvm` is PVM (nested, no VMX/SVM): CPL 3 guest code runs
//! natively and kernel-mode code is emulated, which is why the built-in guest has no kernel. The
//! same setup is valid on VMX and SVM.

pub mod acpi;
pub mod api;
pub mod config;
pub mod controller;
pub mod cpl3;
pub mod devices;
pub mod guest;
pub mod hex;
pub mod linux;
pub mod memory;
pub mod migration;
pub mod mptable;
pub mod preboot;
pub mod restore;
pub mod snapshot;
pub mod vstate;

pub use config::{VirtioJob, VirtioSpec, VmConfig};
pub use controller::{RunError, RunSummary, RunningVm};
pub use guest::{Event, Workload};
pub use memory::Backend;
pub use virtio::IrqMode;
pub use vstate::{Vm, VmError};
