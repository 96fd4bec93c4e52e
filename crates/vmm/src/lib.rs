//! faultline's virtual machine monitor (KVM, x86-64).
//!
//! - [`memory`]: guest memory through `vm-memory`, backed by anonymous private memory, a
//!   shared memfd (for MINOR faults, device DMA and snapshots) or huge pages.
//! - [`cpl3`]: what the VMM builds so that a vCPU starts directly in 64-bit user mode: identity
//!   page tables with the User bit, a GDT with user segments, a busy 64-bit TSS, the sregs.
//! - [`guest`]: the built-in guest (workloads in assembly, shipped inside the binary) and its
//!   port-I/O [ABI](guest::abi).
//! - [`vm`]: the VM: vCPU threads, exits, heartbeats stamped with host time, pause/resume.
//! - [`api`]: the REST control API on a Unix socket, talking to the VM only over a channel.
//! - [`snapshot`]: the snapshot directory (versioned manifest, KVM state, sparse memory with
//!   CRCs), and its memory file as a fault-loop page source.
//! - [`restore`]: eager, mmap, lazy and prefetch restores, and the hand-off of the
//!   userfaultfd to an external handler. The state is KVM's own structures (kvm-bindings with
//!   zerocopy) in a small tagged file of our own: no crate writes Firecracker-independent KVM
//!   snapshots, and the format must stay versioned and checkable.
//!
//! On this project's CI machines `/dev/kvm` is PVM (nested, no VMX/SVM): CPL 3 guest code runs
//! natively and kernel-mode code is emulated, which is why the built-in guest has no kernel. The
//! same setup is valid on VMX and SVM.

pub mod acpi;
pub mod api;
pub mod cpl3;
pub mod devices;
pub mod guest;
pub mod linux;
pub mod memory;
pub mod migration;
pub mod mptable;
pub mod restore;
pub mod snapshot;
pub mod vm;

pub use guest::Workload;
pub use memory::Backend;
pub use vm::{Event, RunSummary, Vm, VmConfig, VmError};
