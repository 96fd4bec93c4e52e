//! Creating or running the machine.

use thiserror::Error;

use super::kvm::KvmError;

/// Creating or running the VM's machine (KVM, memory, vCPUs, devices).
#[derive(Debug, Error)]
pub enum VmError {
    /// A KVM ioctl failed.
    #[error(transparent)]
    Kvm(#[from] KvmError),
    /// Guest memory could not be created.
    #[error("guest memory")]
    Memory(#[source] crate::memory::MemoryError),
    /// Writing to guest memory failed.
    #[error("writing {what} into guest memory failed")]
    GuestWrite {
        /// What was being written.
        what: &'static str,
        /// Cause.
        #[source]
        source: vm_memory::GuestMemoryError,
    },
    /// The configuration cannot work.
    #[error("invalid VM configuration")]
    Config(#[from] crate::config::ConfigError),
    /// A vCPU stopped on an exit it cannot go on from.
    #[error("vCPU {vcpu}: {exit} at guest RIP {rip:#x}")]
    Exit {
        /// vCPU.
        vcpu: u32,
        /// The exit and what it means.
        exit: String,
        /// Guest instruction pointer.
        rip: u64,
    },
    /// A vCPU's `KVM_RUN` failed.
    #[error("vCPU {vcpu}: KVM_RUN failed")]
    Run {
        /// vCPU.
        vcpu: u32,
        /// Cause.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// The kernel could not be loaded.
    #[error("Linux boot")]
    Boot(#[source] crate::linux::BootError),
    /// A host resource (eventfd, signal handler, thread) could not be set up.
    #[error("cannot set up {what}")]
    Host {
        /// What.
        what: &'static str,
        /// The cause, errno kept.
        #[source]
        source: std::io::Error,
    },
    /// The MP table could not be written.
    #[error("MP table")]
    MpTable(#[source] crate::mptable::MpTableError),
    /// A guest page could not be supplied (its source failed or was corrupt; the page was
    /// poisoned rather than filled with wrong data).
    #[error(
        "vCPU {vcpu}: the guest touched a page that could not be loaded (host address {host_addr:#x}); the VM stops rather than run on wrong memory"
    )]
    LostPage {
        /// vCPU.
        vcpu: u32,
        /// Host virtual address of the page.
        host_addr: u64,
    },
    /// Guest memory mapped from a snapshot's file was lost: the file shrank under the VM.
    #[error("vCPU {vcpu}: guest memory lost")]
    MemoryLost {
        /// vCPU.
        vcpu: u32,
        /// What was lost.
        #[source]
        source: crate::memory::file::MemoryLost,
    },
    /// The built-in guest has no such workload slice.
    #[error("no workload slice {0}")]
    NoSlice(usize),
    /// Attaching vfio-user devices failed.
    #[error("devices")]
    Devices(#[source] crate::devices::pci::AttachError),
    /// A vfio-user device's saved state could not be given back.
    #[error("vfio-user device state")]
    VfioUserState(#[source] crate::devices::pci::PciStateError),
    /// A virtio device could not be attached.
    #[error("virtio devices")]
    Virtio(#[source] crate::devices::virtio::VirtioError),
    /// COM1's saved state was refused.
    #[error("COM1")]
    Serial(#[source] crate::devices::SerialRecordError),
    /// The guest acknowledged an interrupt line the VMM could not lower.
    #[error("vCPU {vcpu}: lowering the acknowledged interrupt line failed")]
    IrqAck {
        /// The vCPU.
        vcpu: u32,
        /// Cause.
        #[source]
        source: super::irq::IrqError,
    },
}
