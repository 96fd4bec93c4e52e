//! Interrupt routes: the one owner of the VM's GSI routing table, irqfds and MSIs.
//!
//! KVM keeps a single routing table per VM and every `KVM_SET_GSI_ROUTING` replaces all of
//! it, so every route (the IOAPIC's pins and each MSI) lives here and the table is always
//! written whole. Devices (vfio-user MSI-X today, virtio next) and the interrupt lab get their
//! GSIs, irqfds and MSI routes from [`Interrupts`]; nothing else calls the routing ioctls.
//!
//! - **Pin** routes: GSI n → IOAPIC pin n (0..24), present from the start (KVM's default).
//! - **MSI** routes: a GSI from 24 up whose message (address, data) the guest programs.
//! - An **irqfd** binds an eventfd to a GSI: a write to the eventfd injects the interrupt in
//!   the kernel, with no exit to userspace; a resample eventfd re-arms a level-triggered pin
//!   after the guest's EOI.

use std::sync::{Arc, Mutex, MutexGuard};

use kvm_bindings::{
    KVM_IRQ_ROUTING_IRQCHIP, KVM_IRQ_ROUTING_MSI, KvmIrqRouting, kvm_irq_routing_entry, kvm_msi,
};
use kvm_ioctls::VmFd;
use thiserror::Error;
use vmm_sys_util::eventfd::EventFd;

/// Pins of the in-kernel IOAPIC.
pub const IOAPIC_PINS: u32 = 24;
/// The first GSI handed out for MSI routes.
pub const MSI_GSI_BASE: u32 = IOAPIC_PINS;
/// The largest number of routes KVM takes (`KVM_MAX_IRQ_ROUTES`).
pub const MAX_ROUTES: u32 = 4096;

/// An MSI message, as a device writes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct MsiMessage {
    /// Address (the LAPIC's window at 0xfee0_0000 and the destination).
    pub address: u64,
    /// Data (the vector and delivery mode).
    pub data: u32,
}

impl MsiMessage {
    /// The message for fixed delivery of `vector` to the LAPIC with id `apic_id`.
    pub fn fixed(apic_id: u8, vector: u8) -> MsiMessage {
        MsiMessage {
            address: 0xfee0_0000 | (u64::from(apic_id) << 12),
            data: u32::from(vector),
        }
    }
}

/// Routing interrupts failed.
#[derive(Debug, Error)]
pub enum IrqError {
    /// The VM has no in-kernel irqchip, which every route needs.
    #[error("the VM has no in-kernel irqchip")]
    NoIrqchip,
    /// Every GSI KVM offers is taken.
    #[error("no GSI left: {asked} asked for, {MAX_ROUTES} in all")]
    NoGsi {
        /// GSIs asked for.
        asked: u32,
    },
    /// A GSI that is not an IOAPIC pin or was not handed out.
    #[error("GSI {0} is not an IOAPIC pin nor an allocated MSI")]
    UnknownGsi(u32),
    /// A KVM ioctl failed.
    #[error("{what} failed")]
    Kvm {
        /// The ioctl.
        what: &'static str,
        /// Its error (errno kept).
        #[source]
        source: kvm_ioctls::Error,
    },
}

fn kvm(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> IrqError {
    move |source| IrqError::Kvm { what, source }
}

struct Table {
    routes: Vec<kvm_irq_routing_entry>,
    next_gsi: u32,
}

/// The VM's interrupt routes.
pub struct Interrupts {
    vm: Arc<VmFd>,
    irqchip: bool,
    table: Mutex<Table>,
}

impl std::fmt::Debug for Interrupts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Interrupts")
            .field("irqchip", &self.irqchip)
            .finish_non_exhaustive()
    }
}

fn pin_route(pin: u32) -> kvm_irq_routing_entry {
    let mut e = kvm_irq_routing_entry {
        gsi: pin,
        type_: KVM_IRQ_ROUTING_IRQCHIP,
        ..Default::default()
    };
    e.u.irqchip.irqchip = kvm_bindings::KVM_IRQCHIP_IOAPIC;
    e.u.irqchip.pin = pin;
    e
}

impl Interrupts {
    /// The routes of `vm` (`irqchip`: whether it has the in-kernel irqchip).
    pub fn new(vm: Arc<VmFd>, irqchip: bool) -> Interrupts {
        Interrupts {
            vm,
            irqchip,
            table: Mutex::new(Table {
                routes: if irqchip {
                    (0..IOAPIC_PINS).map(pin_route).collect()
                } else {
                    Vec::new()
                },
                next_gsi: MSI_GSI_BASE,
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn need_chip(&self) -> Result<(), IrqError> {
        if self.irqchip {
            Ok(())
        } else {
            Err(IrqError::NoIrqchip)
        }
    }

    /// Whether the VM has the in-kernel irqchip.
    pub fn irqchip(&self) -> bool {
        self.irqchip
    }

    /// The VM.
    pub fn vm(&self) -> &Arc<VmFd> {
        &self.vm
    }

    /// Hand out `n` consecutive GSIs for MSI routes; returns the first.
    pub fn allocate_msi_gsis(&self, n: u32) -> Result<u32, IrqError> {
        self.need_chip()?;
        let mut t = self.lock();
        let first = t.next_gsi;
        if first.saturating_add(n) > MAX_ROUTES {
            return Err(IrqError::NoGsi { asked: n });
        }
        t.next_gsi += n;
        Ok(first)
    }

    fn known(&self, t: &Table, gsi: u32) -> Result<(), IrqError> {
        if gsi < IOAPIC_PINS || (gsi >= MSI_GSI_BASE && gsi < t.next_gsi) {
            Ok(())
        } else {
            Err(IrqError::UnknownGsi(gsi))
        }
    }

    /// Point `gsi` (handed out by [`allocate_msi_gsis`](Self::allocate_msi_gsis)) at `msg`.
    pub fn set_msi_route(&self, gsi: u32, msg: MsiMessage) -> Result<(), IrqError> {
        self.need_chip()?;
        let mut t = self.lock();
        if gsi < MSI_GSI_BASE {
            return Err(IrqError::UnknownGsi(gsi));
        }
        self.known(&t, gsi)?;
        let mut e = kvm_irq_routing_entry {
            gsi,
            type_: KVM_IRQ_ROUTING_MSI,
            ..Default::default()
        };
        e.u.msi.address_lo = msg.address as u32;
        e.u.msi.address_hi = (msg.address >> 32) as u32;
        e.u.msi.data = msg.data;
        t.routes.retain(|r| r.gsi != gsi);
        t.routes.push(e);
        let table =
            KvmIrqRouting::from_entries(&t.routes).map_err(|_| IrqError::NoGsi { asked: 1 })?;
        self.vm
            .set_gsi_routing(&table)
            .map_err(kvm("KVM_SET_GSI_ROUTING"))
    }

    /// Bind `efd` to `gsi`: each write injects the interrupt in the kernel.
    pub fn register_irqfd(&self, efd: &EventFd, gsi: u32) -> Result<(), IrqError> {
        self.need_chip()?;
        self.known(&self.lock(), gsi)?;
        self.vm.register_irqfd(efd, gsi).map_err(kvm("KVM_IRQFD"))
    }

    /// Bind `efd` to the level-triggered pin `gsi`, re-armed through `resample` after the
    /// guest's EOI (KVM signals `resample`; the device raises `efd` again if still asserted).
    pub fn register_irqfd_resample(
        &self,
        efd: &EventFd,
        resample: &EventFd,
        gsi: u32,
    ) -> Result<(), IrqError> {
        self.need_chip()?;
        if gsi >= IOAPIC_PINS {
            return Err(IrqError::UnknownGsi(gsi));
        }
        self.vm
            .register_irqfd_with_resample(efd, resample, gsi)
            .map_err(kvm("KVM_IRQFD (resample)"))
    }

    /// Unbind `efd` from `gsi`.
    pub fn unregister_irqfd(&self, efd: &EventFd, gsi: u32) -> Result<(), IrqError> {
        self.vm
            .unregister_irqfd(efd, gsi)
            .map_err(kvm("KVM_IRQFD (deassign)"))
    }

    /// Set IOAPIC pin `pin` to `level` (`KVM_IRQ_LINE`).
    pub fn set_line(&self, pin: u32, level: bool) -> Result<(), IrqError> {
        self.need_chip()?;
        if pin >= IOAPIC_PINS {
            return Err(IrqError::UnknownGsi(pin));
        }
        self.vm
            .set_irq_line(pin, level)
            .map_err(kvm("KVM_IRQ_LINE"))
    }

    /// Program IOAPIC pin `pin`'s redirection entry: fixed delivery of `vector` to the LAPIC
    /// with id `apic_id` (physical destination), edge- or `level`-triggered, unmasked (what a
    /// guest kernel writes through the IOAPIC's MMIO window; a guest without one gets it here).
    pub fn route_pin(
        &self,
        pin: u32,
        vector: u8,
        level: bool,
        apic_id: u8,
    ) -> Result<(), IrqError> {
        self.need_chip()?;
        if pin >= IOAPIC_PINS {
            return Err(IrqError::UnknownGsi(pin));
        }
        let mut chip = kvm_bindings::kvm_irqchip {
            chip_id: kvm_bindings::KVM_IRQCHIP_IOAPIC,
            ..Default::default()
        };
        self.vm
            .get_irqchip(&mut chip)
            .map_err(kvm("KVM_GET_IRQCHIP (IOAPIC)"))?;
        let bits = u64::from(vector) | (u64::from(level) << 15) | (u64::from(apic_id) << 56);
        // SAFETY: the IOAPIC member is the one KVM filled for KVM_IRQCHIP_IOAPIC; `bits` is the
        // plain-integer view of its redirection entry.
        unsafe { chip.chip.ioapic.redirtbl[pin as usize].bits = bits };
        self.vm
            .set_irqchip(&chip)
            .map_err(kvm("KVM_SET_IRQCHIP (IOAPIC)"))
    }

    /// Inject `msg` at once (`KVM_SIGNAL_MSI`). Returns whether it was delivered (`false`:
    /// the guest's LAPIC blocked it).
    pub fn signal_msi(&self, msg: MsiMessage) -> Result<bool, IrqError> {
        self.need_chip()?;
        let m = kvm_msi {
            address_lo: msg.address as u32,
            address_hi: (msg.address >> 32) as u32,
            data: msg.data,
            ..Default::default()
        };
        self.vm
            .signal_msi(m)
            .map(|n| n > 0)
            .map_err(kvm("KVM_SIGNAL_MSI"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vm(irqchip: bool) -> Arc<VmFd> {
        let kvm = kvm_ioctls::Kvm::new().expect("/dev/kvm is needed for this test");
        let vm = kvm.create_vm().expect("KVM_CREATE_VM");
        if irqchip {
            vm.create_irq_chip().expect("KVM_CREATE_IRQCHIP");
        }
        Arc::new(vm)
    }

    #[test]
    fn routes_need_an_irqchip_and_known_gsis() {
        let none = Interrupts::new(vm(false), false);
        assert!(matches!(
            none.allocate_msi_gsis(1),
            Err(IrqError::NoIrqchip)
        ));
        let irq = Interrupts::new(vm(true), true);
        let g = irq.allocate_msi_gsis(4).unwrap();
        assert_eq!(g, MSI_GSI_BASE);
        assert_eq!(irq.allocate_msi_gsis(1).unwrap(), MSI_GSI_BASE + 4);
        irq.set_msi_route(g + 1, MsiMessage::fixed(0, 0x40))
            .unwrap();
        // Pins keep their routes when MSI routes are written.
        assert_eq!(irq.lock().routes.len(), IOAPIC_PINS as usize + 1);
        assert!(matches!(
            irq.set_msi_route(MSI_GSI_BASE + 100, MsiMessage::default()),
            Err(IrqError::UnknownGsi(_))
        ));
        assert!(matches!(
            irq.set_msi_route(3, MsiMessage::default()),
            Err(IrqError::UnknownGsi(3))
        ));
        let e = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        irq.register_irqfd(&e, g + 1).unwrap();
        irq.unregister_irqfd(&e, g + 1).unwrap();
        assert!(matches!(
            irq.allocate_msi_gsis(MAX_ROUTES),
            Err(IrqError::NoGsi { .. })
        ));
        irq.set_line(4, true).unwrap();
        irq.set_line(4, false).unwrap();
        irq.route_pin(5, 0x40, true, 0).unwrap();
        let mut chip = kvm_bindings::kvm_irqchip {
            chip_id: kvm_bindings::KVM_IRQCHIP_IOAPIC,
            ..Default::default()
        };
        irq.vm().get_irqchip(&mut chip).unwrap();
        // SAFETY: KVM filled the IOAPIC member.
        let bits = unsafe { chip.chip.ioapic.redirtbl[5].bits };
        assert_eq!(bits & 0x1_ffff, 0x40 | 1 << 15);
        assert!(matches!(
            irq.route_pin(24, 0x40, false, 0),
            Err(IrqError::UnknownGsi(24))
        ));
    }
}
