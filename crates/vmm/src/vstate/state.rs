//! The state of each part of the VM that KVM keeps: what a snapshot or a migration must carry.
//!
//! Every such part is a [`Persist`] component: the vCPU (registers, FPU, XSAVE, MSRs, events,
//! MP state, CPUID), its local APIC, the in-kernel irqchip (PIC master, PIC slave, IOAPIC), the
//! PIT and the clock. [`VcpuState`] and [`VmState`] gather them; `snapshot::state` writes them to
//! a file and the migration sends that file's bytes.
//!
//! Restore order (what works under PVM and on hardware KVM): irqchip, PIT, clock; then per
//! vCPU: CPUID, sregs, regs, FPU, XSAVE, XCRs, MSRs, LAPIC, debug registers, events, MP state.

use kvm_bindings::{
    Msrs, kvm_clock_data, kvm_cpuid_entry2, kvm_debugregs, kvm_fpu, kvm_irqchip, kvm_lapic_state,
    kvm_mp_state, kvm_msr_entry, kvm_pit_state2, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs,
    kvm_xsave,
};
use kvm_ioctls::{VcpuFd, VmFd};
use thiserror::Error;

/// A part of the VM whose state a snapshot or a migration carries.
///
/// There is no default method: a component that cannot save or restore its state says so with
/// an error, and a VM with a component that is not carried at all is refused by name (see
/// `Machine::uncarried`).
pub trait Persist {
    /// The saved state.
    type State;
    /// The component's name (in errors).
    const NAME: &'static str;
    /// Read the state.
    fn save(&self) -> Result<Self::State, StateError>;
    /// Write the state back (into a component that has not run yet).
    fn restore(&self, state: &Self::State) -> Result<(), StateError>;
}

/// The in-kernel irqchip: PIC master, PIC slave, IOAPIC.
pub struct Irqchip<'a>(pub &'a VmFd);

impl Persist for Irqchip<'_> {
    type State = Vec<kvm_irqchip>;
    const NAME: &'static str = "irqchip";
    fn save(&self) -> Result<Self::State, StateError> {
        (0..3)
            .map(|chip_id| {
                let mut c = kvm_irqchip {
                    chip_id,
                    ..Default::default()
                };
                self.0.get_irqchip(&mut c).map_err(kvm("KVM_GET_IRQCHIP"))?;
                Ok(c)
            })
            .collect()
    }
    fn restore(&self, state: &Self::State) -> Result<(), StateError> {
        for c in state {
            self.0.set_irqchip(c).map_err(kvm("KVM_SET_IRQCHIP"))?;
        }
        Ok(())
    }
}

/// The in-kernel PIT.
pub struct Pit<'a>(pub &'a VmFd);

impl Persist for Pit<'_> {
    type State = kvm_pit_state2;
    const NAME: &'static str = "PIT";
    fn save(&self) -> Result<Self::State, StateError> {
        self.0.get_pit2().map_err(kvm("KVM_GET_PIT2"))
    }
    fn restore(&self, state: &Self::State) -> Result<(), StateError> {
        self.0.set_pit2(state).map_err(kvm("KVM_SET_PIT2"))
    }
}

/// kvmclock.
pub struct Clock<'a>(pub &'a VmFd);

impl Persist for Clock<'_> {
    type State = kvm_clock_data;
    const NAME: &'static str = "clock";
    fn save(&self) -> Result<Self::State, StateError> {
        self.0.get_clock().map_err(kvm("KVM_GET_CLOCK"))
    }
    fn restore(&self, state: &Self::State) -> Result<(), StateError> {
        // Only the clock value can be set back; the flags describe the source read from.
        let c = kvm_clock_data {
            clock: state.clock,
            ..Default::default()
        };
        self.0.set_clock(&c).map_err(kvm("KVM_SET_CLOCK"))
    }
}

/// A vCPU's local APIC (with the in-kernel irqchip).
pub struct Lapic<'a>(pub &'a VcpuFd);

impl Persist for Lapic<'_> {
    type State = Box<kvm_lapic_state>;
    const NAME: &'static str = "LAPIC";
    fn save(&self) -> Result<Self::State, StateError> {
        Ok(Box::new(self.0.get_lapic().map_err(kvm("KVM_GET_LAPIC"))?))
    }
    fn restore(&self, state: &Self::State) -> Result<(), StateError> {
        self.0.set_lapic(state).map_err(kvm("KVM_SET_LAPIC"))
    }
}

/// A vCPU: its architectural state, and its LAPIC when `lapic`.
pub struct Vcpu<'a> {
    /// The vCPU (not in `KVM_RUN`, its last exit completed).
    pub fd: &'a VcpuFd,
    /// The MSRs to save (`KVM_GET_MSR_INDEX_LIST`).
    pub msrs: &'a [u32],
    /// Whether it has a LAPIC (in-kernel irqchip).
    pub lapic: bool,
}

impl Persist for Vcpu<'_> {
    type State = VcpuState;
    const NAME: &'static str = "vCPU";
    fn save(&self) -> Result<Self::State, StateError> {
        VcpuState::save(self.fd, self.msrs, self.lapic)
    }
    fn restore(&self, state: &Self::State) -> Result<(), StateError> {
        state.restore(self.fd)
    }
}

/// Saving or restoring vCPU / VM state.
#[derive(Debug, Error)]
pub enum StateError {
    /// A KVM ioctl failed.
    #[error("{what} failed")]
    Kvm {
        /// The ioctl.
        what: &'static str,
        /// Its error (errno kept).
        #[source]
        source: kvm_ioctls::Error,
    },
    /// KVM set fewer MSRs than given.
    #[error("KVM_SET_MSRS set {set} of {total} MSRs; MSR {index:#x} was refused")]
    Msrs {
        /// MSRs set.
        set: usize,
        /// MSRs given.
        total: usize,
        /// The first one refused.
        index: u32,
    },
    /// The state file is not what this version writes.
    #[error("state file: {0}")]
    Format(String),
}

fn kvm(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> StateError {
    move |source| StateError::Kvm { what, source }
}

/// One vCPU's architectural state.
pub struct VcpuState {
    /// General registers.
    pub regs: kvm_regs,
    /// Segment and control registers.
    pub sregs: kvm_sregs,
    /// x87 / SSE.
    pub fpu: kvm_fpu,
    /// The XSAVE area (4 KiB).
    pub xsave: Option<Box<kvm_xsave>>,
    /// Extended control registers.
    pub xcrs: Option<kvm_xcrs>,
    /// The MSRs KVM lists (`KVM_GET_MSR_INDEX_LIST`) that could be read.
    pub msrs: Vec<kvm_msr_entry>,
    /// The local APIC (only with an in-kernel irqchip).
    pub lapic: Option<Box<kvm_lapic_state>>,
    /// Pending exceptions, interrupts, NMIs.
    pub events: kvm_vcpu_events,
    /// Debug registers.
    pub debugregs: kvm_debugregs,
    /// Run state.
    pub mp_state: kvm_mp_state,
    /// The CPUID the vCPU was given.
    pub cpuid: Vec<kvm_cpuid_entry2>,
}

impl std::fmt::Debug for VcpuState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VcpuState")
            .field("rip", &format_args!("{:#x}", self.regs.rip))
            .field("msrs", &self.msrs.len())
            .field("lapic", &self.lapic.is_some())
            .finish()
    }
}

/// VM-wide state.
#[derive(Default)]
pub struct VmState {
    /// kvmclock.
    pub clock: Option<kvm_clock_data>,
    /// PIC master, PIC slave, IOAPIC (with an in-kernel irqchip).
    pub irqchips: Vec<kvm_irqchip>,
    /// The PIT (when one was created).
    pub pit: Option<kvm_pit_state2>,
    /// The VMM's own devices (not KVM's): their records, each checked by its device.
    pub devices: DeviceRecords,
}

/// The records of the devices the VMM emulates: each is its device's own versioned,
/// checksummed encoding, which the device checks when it takes it back.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct DeviceRecords {
    /// One per virtio-mmio device, in bus order (`virtio::state`).
    pub virtio: Vec<Vec<u8>>,
    /// A Linux guest's COM1 (`devices::SerialRecord`); its i8042 has no state to carry
    /// (vm-superio's only acts on the reset command).
    pub serial: Option<Vec<u8>>,
    /// One per vfio-user device, in bus order (`devices::pci::PciRecord`: the VMM's MSI-X
    /// shadow and the device's own vfio-user migration data).
    pub vfio_user: Vec<Vec<u8>>,
}

impl std::fmt::Debug for VmState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VmState")
            .field("clock", &self.clock.is_some())
            .field("irqchips", &self.irqchips.len())
            .field("pit", &self.pit.is_some())
            .field("virtio", &self.devices.virtio.len())
            .field("serial", &self.devices.serial.is_some())
            .field("vfio_user", &self.devices.vfio_user.len())
            .finish()
    }
}

impl VmState {
    /// Read the VM-wide state (`irqchip`: whether an in-kernel irqchip and PIT were created).
    pub fn save(vm: &VmFd, irqchip: bool) -> Result<Self, StateError> {
        let mut s = VmState {
            // Not every KVM offers kvmclock; without it there is nothing to restore.
            clock: Clock(vm).save().ok(),
            ..Default::default()
        };
        if irqchip {
            s.irqchips = Irqchip(vm).save()?;
            // A PIT exists only where KVM offered one.
            s.pit = Pit(vm).save().ok();
        }
        Ok(s)
    }

    /// Write it into a new VM (before its vCPUs are restored).
    pub fn restore(&self, vm: &VmFd) -> Result<(), StateError> {
        Irqchip(vm).restore(&self.irqchips)?;
        if let Some(p) = &self.pit {
            Pit(vm).restore(p)?;
        }
        if let Some(c) = &self.clock {
            Clock(vm).restore(c)?;
        }
        Ok(())
    }
}

impl VcpuState {
    /// Read a vCPU's state. The vCPU must not be in `KVM_RUN`, and any exit it took must have
    /// been completed (see `VcpuControl::save_vcpus`: a `KVM_RUN` with `immediate_exit`).
    pub fn save(vcpu: &VcpuFd, msr_index: &[u32], lapic: bool) -> Result<Self, StateError> {
        let mut msrs = Msrs::from_entries(
            &msr_index
                .iter()
                .map(|&index| kvm_msr_entry {
                    index,
                    ..Default::default()
                })
                .collect::<Vec<_>>(),
        )
        .map_err(|e| StateError::Format(format!("too many MSRs: {e:?}")))?;
        let n = vcpu.get_msrs(&mut msrs).map_err(kvm("KVM_GET_MSRS"))?;
        let cpuid = vcpu
            .get_cpuid2(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
            .map_err(kvm("KVM_GET_CPUID2"))?;
        Ok(VcpuState {
            regs: vcpu.get_regs().map_err(kvm("KVM_GET_REGS"))?,
            sregs: vcpu.get_sregs().map_err(kvm("KVM_GET_SREGS"))?,
            fpu: vcpu.get_fpu().map_err(kvm("KVM_GET_FPU"))?,
            xsave: vcpu.get_xsave().ok().map(Box::new),
            xcrs: vcpu.get_xcrs().ok(),
            msrs: msrs.as_slice()[..n].to_vec(),
            lapic: if lapic {
                Some(Lapic(vcpu).save()?)
            } else {
                None
            },
            events: vcpu.get_vcpu_events().map_err(kvm("KVM_GET_VCPU_EVENTS"))?,
            debugregs: vcpu.get_debug_regs().map_err(kvm("KVM_GET_DEBUGREGS"))?,
            mp_state: vcpu.get_mp_state().map_err(kvm("KVM_GET_MP_STATE"))?,
            cpuid: cpuid.as_slice().to_vec(),
        })
    }

    /// Write the state into a fresh vCPU (one that has never run: under PVM the privilege
    /// level can only be set before the first `KVM_RUN`).
    pub fn restore(&self, vcpu: &VcpuFd) -> Result<(), StateError> {
        if !self.cpuid.is_empty() {
            let cpuid = kvm_bindings::CpuId::from_entries(&self.cpuid)
                .map_err(|e| StateError::Format(format!("CPUID: {e:?}")))?;
            vcpu.set_cpuid2(&cpuid).map_err(kvm("KVM_SET_CPUID2"))?;
        }
        vcpu.set_sregs(&self.sregs).map_err(kvm("KVM_SET_SREGS"))?;
        vcpu.set_regs(&self.regs).map_err(kvm("KVM_SET_REGS"))?;
        vcpu.set_fpu(&self.fpu).map_err(kvm("KVM_SET_FPU"))?;
        if let Some(x) = &self.xsave {
            // SAFETY: `x` is a whole `kvm_xsave` read by KVM_GET_XSAVE (4 KiB); no larger
            // XSAVE2 state was saved, so the kernel reads no more than the struct.
            unsafe { vcpu.set_xsave(x) }.map_err(kvm("KVM_SET_XSAVE"))?;
        }
        if let Some(x) = &self.xcrs {
            vcpu.set_xcrs(x).map_err(kvm("KVM_SET_XCRS"))?;
        }
        // KVM stops at the first MSR it refuses (some paravirtual MSRs refuse even their
        // reset value). A refused MSR whose value in this fresh vCPU already equals the saved
        // one needs no write: skip it and go on; any other refusal is an error.
        let mut at = 0;
        while at < self.msrs.len() {
            let msrs = Msrs::from_entries(&self.msrs[at..])
                .map_err(|e| StateError::Format(format!("MSRs: {e:?}")))?;
            let set = vcpu.set_msrs(&msrs).map_err(kvm("KVM_SET_MSRS"))?;
            at += set;
            if at >= self.msrs.len() {
                break;
            }
            let want = self.msrs[at];
            let mut cur = Msrs::from_entries(&[kvm_msr_entry {
                index: want.index,
                ..Default::default()
            }])
            .map_err(|e| StateError::Format(format!("MSRs: {e:?}")))?;
            let got = vcpu.get_msrs(&mut cur).map_err(kvm("KVM_GET_MSRS"))?;
            if got == 1 && cur.as_slice()[0].data == want.data {
                at += 1;
                continue;
            }
            return Err(StateError::Msrs {
                set: at,
                total: self.msrs.len(),
                index: want.index,
            });
        }
        if let Some(l) = &self.lapic {
            Lapic(vcpu).restore(l)?;
        }
        vcpu.set_debug_regs(&self.debugregs)
            .map_err(kvm("KVM_SET_DEBUGREGS"))?;
        vcpu.set_vcpu_events(&self.events)
            .map_err(kvm("KVM_SET_VCPU_EVENTS"))?;
        vcpu.set_mp_state(self.mp_state)
            .map_err(kvm("KVM_SET_MP_STATE"))?;
        Ok(())
    }
}
