//! `/dev/kvm` and the VM file descriptor: creation with guest memory as slot 0, the in-kernel
//! irqchip and PIT where KVM offers them, CPUID per vCPU, the reset FPU state.

use std::sync::Arc;

use kvm_ioctls::{Kvm, VmFd};
use thiserror::Error;

use crate::memory::GuestMem;

/// A KVM ioctl failed.
#[derive(Debug, Error)]
#[error("KVM: {what} failed")]
pub struct KvmError {
    /// What was being done.
    pub what: &'static str,
    /// The ioctl's error (errno kept).
    #[source]
    pub source: kvm_ioctls::Error,
}

/// Map a `kvm_ioctls` error to a [`KvmError`] naming `what` failed.
pub fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> KvmError {
    move |source| KvmError { what, source }
}

/// Whether this host's KVM offers the in-kernel irqchip (probed, never assumed).
pub fn has_irqchip() -> bool {
    Kvm::new().is_ok_and(|k| k.check_extension(kvm_ioctls::Cap::Irqchip))
}

/// `/dev/kvm` and a VM over existing guest memory (slot 0; `dirty_log`: log guest writes),
/// with the in-kernel irqchip and PIT when `irqchip` is asked for and KVM offers them.
/// Returns whether the irqchip was created.
pub fn create_vm(
    mem: &Arc<GuestMem>,
    irqchip: bool,
    dirty_log: bool,
) -> Result<(Kvm, VmFd, bool), KvmError> {
    let kvm = Kvm::new().map_err(kvm_err("opening /dev/kvm"))?;
    let vm = kvm.create_vm().map_err(kvm_err("KVM_CREATE_VM"))?;
    let with_chip = irqchip && kvm.check_extension(kvm_ioctls::Cap::Irqchip);
    if with_chip {
        vm.create_irq_chip()
            .map_err(kvm_err("KVM_CREATE_IRQCHIP"))?;
    }
    if with_chip && kvm.check_extension(kvm_ioctls::Cap::Pit2) {
        let pit = kvm_bindings::kvm_pit_config {
            flags: kvm_bindings::KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        vm.create_pit2(pit).map_err(kvm_err("KVM_CREATE_PIT2"))?;
    }
    set_memory(&vm, mem, dirty_log)?;
    Ok((kvm, vm, with_chip))
}

/// (Re)register guest memory as slot 0, logging writes when `dirty_log`.
pub fn set_memory(vm: &VmFd, mem: &GuestMem, dirty_log: bool) -> Result<(), KvmError> {
    let region = kvm_bindings::kvm_userspace_memory_region {
        slot: 0,
        flags: if dirty_log {
            kvm_bindings::KVM_MEM_LOG_DIRTY_PAGES
        } else {
            0
        },
        guest_phys_addr: 0,
        memory_size: mem.size(),
        userspace_addr: mem.host_addr() as u64,
    };
    // SAFETY: the region is the mapping owned by `mem`, which every holder of the VM fd keeps
    // alive alongside it.
    unsafe { vm.set_user_memory_region(region) }.map_err(kvm_err("KVM_SET_USER_MEMORY_REGION"))
}

/// The x87/SSE state at reset.
pub fn reset_fpu() -> kvm_bindings::kvm_fpu {
    kvm_bindings::kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    }
}

/// The supported CPUID with vCPU `id`'s APIC id in leaves 1, 0xB and 0x1F.
pub fn apic_cpuid(cpuid: &kvm_bindings::CpuId, id: u32) -> kvm_bindings::CpuId {
    let mut c = cpuid.clone();
    for e in c.as_mut_slice() {
        if e.function == 1 {
            e.ebx = (e.ebx & 0x00ff_ffff) | (id << 24);
        }
        if e.function == 0xb || e.function == 0x1f {
            e.edx = id;
        }
    }
    c
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn apic_ids_land_in_every_topology_leaf() {
        let entries = [1u32, 0xb, 0x1f, 7].map(|function| kvm_bindings::kvm_cpuid_entry2 {
            function,
            ebx: 0x00ab_cdef,
            ..Default::default()
        });
        let c = kvm_bindings::CpuId::from_entries(&entries).unwrap();
        let c = apic_cpuid(&c, 3);
        let s = c.as_slice();
        assert_eq!(s[0].ebx >> 24, 3);
        assert_eq!(s[0].ebx & 0xff_ffff, 0xab_cdef);
        assert_eq!(s[1].edx, 3);
        assert_eq!(s[2].edx, 3);
        assert_eq!(s[3].edx, 0);
    }
}
