//! The machine: KVM, guest memory, vCPUs and devices, created ([`Vm`]) and then running
//! ([`Machine`]). It knows nothing of the API, snapshots or migrations: those drive it
//! through [`VcpuControl`] and read it through [`Machine`]'s accessors.

use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::Instant;

use kvm_bindings::KVM_MAX_CPUID_ENTRIES;
use kvm_ioctls::{Kvm, VcpuFd, VmFd};

use super::control::{SaveError, VcpuControl};
use super::error::VmError;
use super::irq::Interrupts;
use super::kvm::{KvmError, apic_cpuid, create_vm, kvm_err, reset_fpu};
use super::notice::Notifier;
use super::state::{DeviceRecords, StateError, VcpuState, VmState};
use super::stats::{KvmStats, StatsError};
use super::vcpu::{VcpuContext, install_signal_handlers, vcpu_thread};
use crate::config::{ConfigError, Slice, VmConfig};
use crate::cpl3;
use crate::devices::pci::{DmaBacking, MMIO_BASE, PciBus};
use crate::devices::virtio::{VIRTIO_BASE, VirtioBus};
use crate::devices::{DevicesError, LegacyDevices};
use crate::guest::{self, Workload, abi};
use crate::memory::{Backend, GuestMem};

/// A machine's devices (virtio-mmio, vfio-user devices on the PCI bus, a Linux guest's COM1
/// and i8042): what a snapshot or a migration freezes, saves and thaws.
#[derive(Clone, Default)]
pub struct DeviceSet {
    virtio: Option<Arc<VirtioBus>>,
    pci: Option<Arc<PciBus>>,
    legacy: Option<Arc<LegacyDevices>>,
}

impl DeviceSet {
    /// Stop every device touching guest memory or its backend (`VirtioBus::freeze`,
    /// `PciBus::freeze`). On an error, what was stopped runs again.
    pub fn freeze(&self) -> Result<(), DevicesError> {
        if let Some(b) = &self.virtio {
            b.freeze();
        }
        if let Some(p) = &self.pci
            && let Err(e) = p.freeze()
        {
            self.thaw();
            return Err(DevicesError::VfioUser(e));
        }
        Ok(())
    }

    /// Let them go on.
    pub fn thaw(&self) {
        if let Some(b) = &self.virtio {
            b.thaw();
        }
        if let Some(p) = &self.pci {
            p.thaw();
        }
    }

    /// Their records (they must be frozen).
    pub fn save(&self) -> Result<DeviceRecords, DevicesError> {
        Ok(DeviceRecords {
            virtio: match &self.virtio {
                Some(b) => b.save().map_err(DevicesError::Virtio)?,
                None => Vec::new(),
            },
            serial: self.legacy.as_ref().map(|l| l.save()),
            vfio_user: match &self.pci {
                Some(p) => p.save().map_err(DevicesError::VfioUser)?,
                None => Vec::new(),
            },
        })
    }

    /// Pre-copy starts: the devices log the guest pages they write (KVM's log sees only
    /// the vCPUs'), vfio-user devices through their DMA dirty-page logging.
    pub fn start_dirty_log(&self) -> Result<(), DevicesError> {
        if let Some(b) = &self.virtio {
            b.dirty().set_tracking(true);
        }
        if let Some(p) = &self.pci
            && let Err(e) = p.start_dirty_log()
        {
            self.stop_dirty_log();
            return Err(DevicesError::VfioUser(e));
        }
        Ok(())
    }

    /// OR the pages the devices wrote since the last call into `words` (a bit a page).
    pub fn take_dirty(&self, words: &mut [u64]) -> Result<(), DevicesError> {
        if let Some(b) = &self.virtio {
            for (a, d) in words.iter_mut().zip(b.dirty().take()) {
                *a |= d;
            }
        }
        if let Some(p) = &self.pci {
            p.take_dirty(words).map_err(DevicesError::VfioUser)?;
        }
        Ok(())
    }

    /// Pre-copy is over: logging stops (best effort).
    pub fn stop_dirty_log(&self) {
        if let Some(b) = &self.virtio {
            b.dirty().set_tracking(false);
        }
        if let Some(p) = &self.pci {
            p.stop_dirty_log();
        }
    }
}

/// A created VM, not yet running.
pub struct Vm {
    kvm: Kvm,
    vm: Arc<VmFd>,
    mem: Arc<GuestMem>,
    vcpus: Vec<VcpuFd>,
    slices: Vec<Slice>,
    cfg: VmConfig,
    control: Arc<VcpuControl>,
    legacy: Option<Arc<LegacyDevices>>,
    pci: Option<Arc<PciBus>>,
    virtio: Option<Arc<VirtioBus>>,
    irq: Arc<Interrupts>,
    last_heartbeat: Vec<u32>,
}

impl std::fmt::Debug for Vm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vm").field("cfg", &self.cfg).finish()
    }
}

/// The parts a restore or an incoming migration built (see [`Vm::from_parts`]).
pub struct Parts {
    /// `/dev/kvm`.
    pub kvm: Kvm,
    /// The VM, its state already restored.
    pub vm: Arc<VmFd>,
    /// Whether it has the in-kernel irqchip.
    pub irqchip: bool,
    /// Guest memory (slot 0).
    pub mem: Arc<GuestMem>,
    /// vCPUs, their state already restored.
    pub vcpus: Vec<VcpuFd>,
    /// The configuration.
    pub cfg: VmConfig,
    /// The time origin.
    pub t0: Instant,
    /// Last heartbeat number per vCPU.
    pub last_heartbeat: Vec<u32>,
    /// The devices' records: the devices of `cfg` are built (unless `built`) and given
    /// them back.
    pub devices: crate::vstate::DeviceRecords,
    /// The interrupt routes and devices, built ahead ([`build_devices`]: an incoming
    /// migration opens the backends when the source says hello, not in its downtime).
    pub built: Option<BuiltDevices>,
}

/// A VM's interrupt routes, vfio-user and virtio devices, built before its state is known
/// (their records are given back by [`Vm::from_parts`]).
pub struct BuiltDevices {
    irq: Arc<Interrupts>,
    pci: Option<Arc<PciBus>>,
    virtio: Option<Arc<VirtioBus>>,
}

/// Build the interrupt routes of `vm`, and the devices of `cfg`: the vfio-user devices
/// attached (servers connected, BARs placed, guest memory given for DMA: its memfd when it
/// has one, whole; otherwise through messages the VMM serves, see `devices::pci::dma`), the
/// virtio devices' backends opened; the devices fresh, and frozen until their records are
/// given back.
pub fn build_devices(
    vm: &Arc<VmFd>,
    irqchip: bool,
    mem: &Arc<GuestMem>,
    cfg: &VmConfig,
) -> Result<BuiltDevices, VmError> {
    let irq = Arc::new(Interrupts::new(vm.clone(), irqchip));
    let pci = if cfg.vfio_user.is_empty() {
        None
    } else {
        let dma = match mem.memfd() {
            Some(f) if !mem.on_demand() => DmaBacking::Memfd(f),
            _ => DmaBacking::Messages(mem.clone()),
        };
        Some(Arc::new(
            PciBus::new(irq.clone(), &cfg.vfio_user, dma, cfg.mem_bytes)
                .map_err(VmError::Devices)?,
        ))
    };
    let virtio = virtio_bus(&irq, mem, cfg)?;
    if let Some(b) = &virtio {
        b.freeze();
    }
    Ok(BuiltDevices { irq, pci, virtio })
}

impl Vm {
    /// Create the VM: KVM, memory, the built-in guest and its tables, vCPUs at their entry
    /// (or, with `cfg.linux`, a Linux kernel).
    pub fn new(cfg: VmConfig) -> Result<Vm, VmError> {
        let t0 = Instant::now();
        if cfg.linux.is_some() {
            return Self::new_linux(cfg, t0);
        }
        cfg.check_builtin()?;
        let slices = cfg.slices()?;
        let with_pci = !cfg.vfio_user.is_empty();
        let with_virtio = !cfg.virtio.is_empty();
        let irq_cpl = match cfg.workload {
            Workload::Virtio => Some(if cfg.virtio_job.handler_cpl == 3 {
                3
            } else {
                0
            }),
            w => w.irq_handler_cpl(),
        };
        let mut cfg = cfg;
        if with_virtio && cfg.mem_bytes > VIRTIO_BASE {
            return Err(ConfigError::VirtioWindow { limit: VIRTIO_BASE }.into());
        }
        if with_pci {
            if cfg.mem_bytes > MMIO_BASE {
                return Err(ConfigError::PciWindow { limit: MMIO_BASE }.into());
            }
            // Devices DMA into guest memory through its memfd.
            cfg.backend = Backend::Memfd;
        }
        let mem = Arc::new(GuestMem::new(cfg.mem_bytes, cfg.backend).map_err(VmError::Memory)?);
        let (kvm, vm, irqchip) = create_vm(
            &mem,
            cfg.irqchip || with_pci || with_virtio || irq_cpl.is_some(),
            false,
        )?;
        // Devices' BARs and windows and the LAPIC (the irq workloads' EOI) sit below 4 GiB.
        let map_bytes = if with_pci || with_virtio || irq_cpl.is_some() {
            4 << 30
        } else {
            cfg.mem_bytes
        };
        cpl3::write_tables(mem.mem(), cfg.mem_bytes, map_bytes).map_err(|source| {
            VmError::GuestWrite {
                what: "page tables and GDT",
                source,
            }
        })?;
        mem.write(cpl3::CODE, guest::image())
            .map_err(|source| VmError::GuestWrite {
                what: "the built-in guest",
                source,
            })?;

        if let Some(cpl) = irq_cpl {
            let handler = cpl3::CODE + guest::irq_handler_offset();
            let stubs = cpl3::CODE + guest::exception_stubs_offset();
            cpl3::write_idt(mem.mem(), abi::IRQ_VECTOR, handler, stubs, cpl).map_err(|source| {
                VmError::GuestWrite {
                    what: "the IDT",
                    source,
                }
            })?;
        }
        let cpuid = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(kvm_err("KVM_GET_SUPPORTED_CPUID"))?;
        let entry = guest::entry_offset(cfg.workload.index());
        let mut vcpus = Vec::new();
        for (i, s) in slices.iter().enumerate() {
            let vcpu = vm
                .create_vcpu(i as u64)
                .map_err(kvm_err("KVM_CREATE_VCPU"))?;
            vcpu.set_cpuid2(&apic_cpuid(&cpuid, i as u32))
                .map_err(kvm_err("KVM_SET_CPUID2"))?;
            let sregs = vcpu.get_sregs().map_err(kvm_err("KVM_GET_SREGS"))?;
            let mut sregs = cpl3::user_mode_sregs(sregs);
            if irq_cpl.is_some() {
                sregs.idt.limit = cpl3::IDT_LIMIT;
            }
            vcpu.set_sregs(&sregs).map_err(kvm_err("KVM_SET_SREGS"))?;
            let khz = vcpu.get_tsc_khz().map_err(kvm_err("KVM_GET_TSC_KHZ"))?;
            let run_ticks = cfg
                .run_for
                .map_or(0, |d| {
                    (d.as_micros() as u64).saturating_mul(u64::from(khz)) / 1000
                })
                .max(u64::from(cfg.run_for.is_some()));
            let regs = cpl3::entry_regs(
                entry,
                i as u64,
                s.start,
                s.len,
                s.first_page,
                u64::from(khz) * 100,
                run_ticks,
                cfg.seed.wrapping_add(i as u64),
            );
            let mut regs = regs;
            if irq_cpl.is_some() {
                regs.rflags |= 0x200; // IF: the irq workloads take interrupts from the start
            }
            vcpu.set_regs(&regs).map_err(kvm_err("KVM_SET_REGS"))?;
            vcpu.set_fpu(&reset_fpu()).map_err(kvm_err("KVM_SET_FPU"))?;
            if irqchip {
                // Software-enable the LAPIC so MSIs are accepted (they stay pending in IRR:
                // the built-in guest runs with interrupts off and polls).
                let mut lapic = vcpu.get_lapic().map_err(kvm_err("KVM_GET_LAPIC"))?;
                lapic.regs[0xf1] |= 1; // SVR bit 8: APIC software enable
                vcpu.set_lapic(&lapic).map_err(kvm_err("KVM_SET_LAPIC"))?;
                vcpu.set_mp_state(kvm_bindings::kvm_mp_state {
                    mp_state: kvm_bindings::KVM_MP_STATE_RUNNABLE,
                })
                .map_err(kvm_err("KVM_SET_MP_STATE"))?;
            }
            vcpus.push(vcpu);
        }
        let vm = Arc::new(vm);
        let irq = Arc::new(Interrupts::new(vm.clone(), irqchip));
        let pci = if with_pci {
            let memfd = mem
                .memfd()
                .expect("with devices guest memory is a memfd (set above)");
            Some(Arc::new(
                PciBus::new(
                    irq.clone(),
                    &cfg.vfio_user,
                    DmaBacking::Memfd(memfd),
                    cfg.mem_bytes,
                )
                .map_err(VmError::Devices)?,
            ))
        } else {
            None
        };
        let virtio = virtio_bus(&irq, &mem, &cfg)?;
        if let Some(b) = &virtio {
            // Firmware's part for a guest without a kernel: each device's IOAPIC pin, edge,
            // to the irq workloads' vector on vCPU 0 (a Linux guest programs its own).
            for d in b.stats() {
                irq.route_pin(d.gsi, abi::IRQ_VECTOR, false, 0)
                    .map_err(|source| {
                        VmError::Virtio(crate::devices::virtio::VirtioError::Irq {
                            index: d.index,
                            source,
                        })
                    })?;
            }
        }
        if cfg.workload == Workload::Virtio {
            write_virtio_params(&mem, &cfg).map_err(|source| VmError::GuestWrite {
                what: "the virtio workload's parameters",
                source,
            })?;
        }
        let n = vcpus.len();
        Ok(Vm {
            kvm,
            vm,
            mem,
            vcpus,
            slices,
            cfg,
            control: Arc::new(VcpuControl::new(t0, n)),
            legacy: None,
            pci,
            virtio,
            irq,
            last_heartbeat: vec![0; n],
        })
    }

    /// A VM over restored parts (a snapshot's or an incoming migration's): the irqchip they
    /// were built with is kept, so a later snapshot carries it again.
    pub fn from_parts(p: Parts) -> Result<Vm, VmError> {
        let linux = p.cfg.linux.is_some();
        let slices = if linux { Vec::new() } else { p.cfg.slices()? };
        let n = p.vcpus.len();
        let vm = p.vm;
        let control = VcpuControl::new(p.t0, n);
        for (c, &hb) in control.cpus.iter().zip(&p.last_heartbeat) {
            c.last_n.store(hb, std::sync::atomic::Ordering::SeqCst);
        }
        let BuiltDevices { irq, pci, virtio } = match p.built {
            Some(b) => b,
            None => build_devices(&vm, p.irqchip, &p.mem, &p.cfg)?,
        };
        let legacy = if linux {
            let l = legacy_devices(&vm, p.irqchip, p.cfg.console.as_deref())?;
            if let Some(r) = &p.devices.serial {
                l.restore(r).map_err(VmError::Serial)?;
            }
            Some(l)
        } else {
            None
        };
        match &virtio {
            Some(b) => b.restore(&p.devices.virtio).map_err(VmError::Virtio)?,
            None if !p.devices.virtio.is_empty() => {
                return Err(VmError::Virtio(
                    crate::devices::virtio::VirtioError::RecordCount {
                        saved: p.devices.virtio.len(),
                        live: 0,
                    },
                ));
            }
            None => {}
        }
        match &pci {
            Some(b) => b
                .restore(&p.devices.vfio_user)
                .map_err(VmError::VfioUserState)?,
            None if !p.devices.vfio_user.is_empty() => {
                return Err(VmError::VfioUserState(
                    crate::devices::pci::PciStateError::Count {
                        saved: p.devices.vfio_user.len(),
                        live: 0,
                    },
                ));
            }
            None => {}
        }
        Ok(Vm {
            kvm: p.kvm,
            irq,
            vm,
            mem: p.mem,
            vcpus: p.vcpus,
            slices,
            cfg: p.cfg,
            control: Arc::new(control),
            legacy,
            pci,
            virtio,
            last_heartbeat: p.last_heartbeat,
        })
    }

    /// A Linux VM: in-kernel irqchip and PIT where KVM offers them, COM1 on an irqfd, the
    /// i8042 reset line, the kernel loaded by `linux-loader`.
    fn new_linux(cfg: VmConfig, t0: Instant) -> Result<Vm, VmError> {
        let mut boot = cfg.linux.clone().expect("called for Linux configurations");
        if !cfg.virtio.is_empty() {
            if cfg.mem_bytes > VIRTIO_BASE {
                return Err(ConfigError::VirtioWindow { limit: VIRTIO_BASE }.into());
            }
            // Linux's virtio-mmio driver finds the devices on its command line (it uses the
            // legacy interrupt: the MSI registers are not in mainline Linux).
            boot.cmdline = format!(
                "{} {}",
                boot.cmdline,
                VirtioBus::linux_cmdline(cfg.virtio.len())
            );
        }
        if cfg.vcpus == 0 || cfg.vcpus > crate::mptable::MAX_CPUS {
            return Err(ConfigError::LinuxVcpus {
                max: crate::mptable::MAX_CPUS,
            }
            .into());
        }
        let mem = Arc::new(GuestMem::new(cfg.mem_bytes, cfg.backend).map_err(VmError::Memory)?);
        let (kvm, vm, irqchip) = create_vm(&mem, true, false)?;
        let vm = Arc::new(vm);
        let irq = Arc::new(Interrupts::new(vm.clone(), irqchip));
        let legacy = legacy_devices(&vm, irqchip, cfg.console.as_deref())?;
        let virtio = virtio_bus(&irq, &mem, &cfg)?;
        let entry = crate::linux::load(mem.mem(), cfg.mem_bytes, &boot).map_err(VmError::Boot)?;
        crate::mptable::write(mem.mem(), cfg.vcpus).map_err(VmError::MpTable)?;
        crate::acpi::write(mem.mem(), cfg.vcpus).map_err(|source| VmError::GuestWrite {
            what: "ACPI tables",
            source,
        })?;
        let cpuid = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(kvm_err("KVM_GET_SUPPORTED_CPUID"))?;
        let mut vcpus = Vec::new();
        for i in 0..cfg.vcpus {
            let vcpu = vm
                .create_vcpu(u64::from(i))
                .map_err(kvm_err("KVM_CREATE_VCPU"))?;
            vcpu.set_cpuid2(&apic_cpuid(&cpuid, i))
                .map_err(kvm_err("KVM_SET_CPUID2"))?;
            vcpus.push(vcpu);
        }
        // The boot CPU enters the kernel; the others wait for the kernel's INIT/SIPI (with an
        // in-kernel irqchip, KVM keeps application processors in wait-for-SIPI).
        let vcpu = &vcpus[0];
        let sregs = vcpu.get_sregs().map_err(kvm_err("KVM_GET_SREGS"))?;
        vcpu.set_sregs(&(entry.sregs)(sregs))
            .map_err(kvm_err("KVM_SET_SREGS"))?;
        vcpu.set_regs(&entry.regs)
            .map_err(kvm_err("KVM_SET_REGS"))?;
        vcpu.set_fpu(&reset_fpu()).map_err(kvm_err("KVM_SET_FPU"))?;
        let n = vcpus.len();
        Ok(Vm {
            kvm,
            vm,
            mem,
            vcpus,
            slices: Vec::new(),
            cfg,
            control: Arc::new(VcpuControl::new(t0, n)),
            legacy: Some(legacy),
            pci: None,
            virtio,
            irq,
            last_heartbeat: vec![0; n],
        })
    }

    /// Guest memory.
    pub fn memory(&self) -> &Arc<GuestMem> {
        &self.mem
    }

    /// vCPU `i`'s KVM statistics (`KVM_GET_STATS_FD`), opened before it runs; `None` where
    /// the host's KVM has no binary stats.
    pub fn vcpu_stats(&self, i: usize) -> Result<Option<KvmStats>, StatsError> {
        match self.vcpus.get(i) {
            Some(v) => KvmStats::of_vcpu(v),
            None => Err(StatsError::NoVcpu(i)),
        }
    }

    /// The guest's TSC frequency in kHz (`KVM_GET_TSC_KHZ` of vCPU 0).
    pub fn tsc_khz(&self) -> Result<u32, StatsError> {
        let v = self.vcpus.first().ok_or(StatsError::NoVcpu(0))?;
        v.get_tsc_khz()
            .map_err(kvm_err("KVM_GET_TSC_KHZ"))
            .map_err(StatsError::Kvm)
    }

    /// Pause and stop control (a VM may be held paused before it starts).
    pub fn control(&self) -> &Arc<VcpuControl> {
        &self.control
    }

    /// The configuration.
    pub fn config(&self) -> &VmConfig {
        &self.cfg
    }

    /// Last heartbeat number per vCPU (carried over from a snapshot or a migration).
    pub fn last_heartbeats(&self) -> &[u32] {
        &self.last_heartbeat
    }

    /// Start the vCPU threads; they report to `notify`.
    pub fn launch(self, notify: Notifier) -> Result<Machine, VmError> {
        install_signal_handlers()?;
        let mut threads = Vec::new();
        for (i, vcpu) in self.vcpus.into_iter().enumerate() {
            let notify = notify.clone();
            let control = self.control.clone();
            let legacy = self.legacy.clone();
            let pci = self.pci.clone();
            let virtio = self.virtio.clone();
            let irq = self.irq.clone();
            let mem = self.mem.clone();
            let h = thread::Builder::new()
                .name(format!("vcpu-{i}"))
                .spawn(move || {
                    let ctx = VcpuContext {
                        control: &control,
                        legacy: legacy.as_deref(),
                        pci: pci.as_deref(),
                        virtio: virtio.as_deref(),
                        irq: &irq,
                        notify: &notify,
                        mem: &mem,
                    };
                    vcpu_thread(i as u32, vcpu, ctx)
                })
                .map_err(|source| VmError::Host {
                    what: "a vCPU thread",
                    source,
                })?;
            threads.push(h);
        }
        {
            use std::os::unix::thread::JoinHandleExt;
            self.control
                .set_threads(threads.iter().map(|t| t.as_pthread_t()).collect());
        }
        // Restored devices were kept frozen until now (`VirtioBus::restore`,
        // `PciBus::restore`); a fresh vfio-user device runs already (thawing it is a no-op).
        if let Some(b) = &self.virtio {
            b.thaw();
        }
        if let Some(p) = &self.pci {
            p.thaw();
        }
        Ok(Machine {
            kvm: self.kvm,
            vm: self.vm,
            mem: self.mem,
            slices: self.slices,
            cfg: self.cfg,
            control: self.control,
            threads: Mutex::new(threads),
            legacy: self.legacy,
            pci: self.pci,
            virtio: self.virtio,
            irq: self.irq,
        })
    }
}

/// COM1 (on an irqfd to its GSI, with an in-kernel irqchip) writing to stdout, and the i8042.
fn legacy_devices(
    vm: &VmFd,
    irqchip: bool,
    console: Option<&std::path::Path>,
) -> Result<Arc<LegacyDevices>, VmError> {
    let out: Box<dyn std::io::Write + Send> = match console {
        Some(p) => Box::new(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)
                .map_err(|source| VmError::Host {
                    what: "the console file",
                    source,
                })?,
        ),
        // vm-superio flushes after every byte: a partial line (a prompt) shows at once.
        None => Box::new(std::io::stdout()),
    };
    let com1 = vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK).map_err(|source| {
        VmError::Host {
            what: "the COM1 interrupt eventfd",
            source,
        }
    })?;
    if irqchip {
        vm.register_irqfd(&com1, crate::devices::COM1_GSI)
            .map_err(kvm_err("KVM_IRQFD for COM1"))?;
    }
    Ok(Arc::new(LegacyDevices::new(com1, out)))
}

/// The `virtio` workload's parameter block (`abi::VIRTIO_PARAMS`).
fn write_virtio_params(mem: &GuestMem, cfg: &VmConfig) -> Result<(), vm_memory::GuestMemoryError> {
    use crate::devices::virtio::VIRTIO_STRIDE;
    let j = &cfg.virtio_job;
    let mut p = Vec::with_capacity(0x30 + 16 * cfg.virtio.len());
    p.extend_from_slice(&u64::from(cfg.virtio_irq == virtio::IrqMode::Msi).to_le_bytes());
    p.extend_from_slice(&j.job.to_le_bytes());
    p.extend_from_slice(&j.iterations.to_le_bytes());
    p.extend_from_slice(&u64::from(j.vsock_port).to_le_bytes());
    p.extend_from_slice(&j.guest_ip);
    p.extend_from_slice(&j.host_ip);
    p.extend_from_slice(&(cfg.virtio.len() as u64).to_le_bytes());
    for (i, d) in cfg.virtio.iter().enumerate() {
        let id: u64 = match d {
            crate::config::VirtioSpec::Net { .. } => 1,
            crate::config::VirtioSpec::Block { .. } => 2,
            crate::config::VirtioSpec::Rng => 4,
            crate::config::VirtioSpec::Vsock { .. } => 19,
        };
        p.extend_from_slice(&(VIRTIO_BASE + VIRTIO_STRIDE * i as u64).to_le_bytes());
        p.extend_from_slice(&id.to_le_bytes());
    }
    vm_memory::Bytes::write_slice(mem.mem(), &p, vm_memory::GuestAddress(abi::VIRTIO_PARAMS))?;
    vm_memory::Bytes::write_obj(
        mem.mem(),
        u64::from(j.poll),
        vm_memory::GuestAddress(abi::VIRTIO_PARAMS + 0x800),
    )
}

/// The VM's virtio-mmio devices, if its configuration names any.
fn virtio_bus(
    irq: &Arc<Interrupts>,
    mem: &GuestMem,
    cfg: &VmConfig,
) -> Result<Option<Arc<VirtioBus>>, VmError> {
    if cfg.virtio.is_empty() {
        return Ok(None);
    }
    let poll = std::time::Duration::from_micros(cfg.virtio_poll_us.min(1_000_000));
    VirtioBus::new(irq.clone(), mem, &cfg.virtio, cfg.virtio_irq, poll)
        .map(|b| Some(Arc::new(b)))
        .map_err(VmError::Virtio)
}

/// The built-in guest's entry registers for `workload` on vCPU `i` (fresh start, no run
/// time limit).
pub fn entry_regs_for(
    vcpu: &VcpuFd,
    cfg: &VmConfig,
    i: usize,
    workload: Workload,
) -> Result<kvm_bindings::kvm_regs, VmError> {
    let slices = cfg.slices()?;
    let s = slices.get(i).ok_or(VmError::NoSlice(i))?;
    let khz = vcpu.get_tsc_khz().map_err(kvm_err("KVM_GET_TSC_KHZ"))?;
    Ok(cpl3::entry_regs(
        guest::entry_offset(workload.index()),
        i as u64,
        s.start,
        s.len,
        s.first_page,
        u64::from(khz) * 100,
        0,
        cfg.seed.wrapping_add(i as u64),
    ))
}

/// Create vCPUs with the saved states (and, for `verify`, at that workload's entry).
pub fn build_vcpus(
    kvm: &Kvm,
    vm: &VmFd,
    states: &[VcpuState],
    cfg: &VmConfig,
    verify: bool,
) -> Result<Vec<VcpuFd>, BuildError> {
    let cpuid = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(kvm_err("KVM_GET_SUPPORTED_CPUID"))?;
    let mut vcpus = Vec::new();
    for (i, st) in states.iter().enumerate() {
        let vcpu = vm
            .create_vcpu(i as u64)
            .map_err(kvm_err("KVM_CREATE_VCPU"))?;
        vcpu.set_cpuid2(&apic_cpuid(&cpuid, i as u32))
            .map_err(kvm_err("KVM_SET_CPUID2"))?;
        st.restore(&vcpu)
            .map_err(|source| BuildError::State { vcpu: i, source })?;
        if verify {
            let regs = entry_regs_for(&vcpu, cfg, i, Workload::Verify)?;
            vcpu.set_regs(&regs).map_err(kvm_err("KVM_SET_REGS"))?;
        }
        vcpus.push(vcpu);
    }
    Ok(vcpus)
}

/// Building vCPUs from saved state failed.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// A KVM call failed.
    #[error(transparent)]
    Kvm(#[from] KvmError),
    /// A vCPU's state could not be restored.
    #[error("restoring vCPU {vcpu}'s state")]
    State {
        /// The vCPU.
        vcpu: usize,
        /// Cause.
        #[source]
        source: StateError,
    },
    /// The configuration does not fit.
    #[error(transparent)]
    Vm(#[from] VmError),
}

/// A part of the VM whose state neither snapshots nor migrations carry yet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Uncarried(pub String);

impl std::fmt::Display for Uncarried {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// How the vCPU threads ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Joined {
    /// Every thread returned.
    All,
    /// A thread panicked.
    Panicked,
    /// A thread did not return in time (held inside `KVM_RUN` by the kernel).
    Stuck,
}

/// A running VM: vCPU threads, memory, devices.
pub struct Machine {
    kvm: Kvm,
    vm: Arc<VmFd>,
    mem: Arc<GuestMem>,
    slices: Vec<Slice>,
    cfg: VmConfig,
    control: Arc<VcpuControl>,
    threads: Mutex<Vec<JoinHandle<()>>>,
    legacy: Option<Arc<LegacyDevices>>,
    pci: Option<Arc<PciBus>>,
    virtio: Option<Arc<VirtioBus>>,
    irq: Arc<Interrupts>,
}

impl std::fmt::Debug for Machine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Machine").field("cfg", &self.cfg).finish()
    }
}

impl Machine {
    /// Guest memory.
    pub fn memory(&self) -> &Arc<GuestMem> {
        &self.mem
    }

    /// The configuration.
    pub fn config(&self) -> &VmConfig {
        &self.cfg
    }

    /// Pause, stop and per-vCPU tracking.
    pub fn control(&self) -> &Arc<VcpuControl> {
        &self.control
    }

    /// The VM file descriptor.
    pub fn vm_fd(&self) -> &Arc<VmFd> {
        &self.vm
    }

    /// The VM's interrupt routes.
    pub fn interrupts(&self) -> &Arc<Interrupts> {
        &self.irq
    }

    /// Whether the VM has the in-kernel irqchip.
    pub fn irqchip(&self) -> bool {
        self.irq.irqchip()
    }

    /// The workload slices of the built-in guest.
    pub fn slices(&self) -> &[Slice] {
        &self.slices
    }

    /// The PCI bus, if the VM has devices.
    pub fn pci(&self) -> Option<&Arc<PciBus>> {
        self.pci.as_ref()
    }

    /// The virtio-mmio devices, if the VM has any.
    pub fn virtio(&self) -> Option<&Arc<VirtioBus>> {
        self.virtio.as_ref()
    }

    /// The MSRs KVM lists for saving.
    pub fn msr_list(&self) -> Result<Vec<u32>, KvmError> {
        Ok(self
            .kvm
            .get_msr_index_list()
            .map_err(kvm_err("KVM_GET_MSR_INDEX_LIST"))?
            .as_slice()
            .to_vec())
    }

    /// The parts of this VM whose state cannot be carried by a snapshot or a migration yet:
    /// those refuse such a VM by these names rather than drop the parts.
    pub fn uncarried(&self) -> Vec<Uncarried> {
        self.pci
            .as_ref()
            .map(|p| p.without_migration().into_iter().map(Uncarried).collect())
            .unwrap_or_default()
    }

    /// The VMM's own devices, for a thread that freezes, saves or thaws them.
    pub fn devices(&self) -> DeviceSet {
        DeviceSet {
            virtio: self.virtio.clone(),
            pci: self.pci.clone(),
            legacy: self.legacy.clone(),
        }
    }

    /// Stop the devices touching guest memory and their backends (a snapshot, a migration's
    /// switchover): see [`DeviceSet::freeze`]. The vCPUs must be paused.
    pub fn freeze_devices(&self) -> Result<(), DevicesError> {
        self.devices().freeze()
    }

    /// Let the devices go on after [`freeze_devices`](Self::freeze_devices).
    pub fn thaw_devices(&self) {
        self.devices().thaw();
    }

    /// Save the VM's, every vCPU's and every device's state. The vCPUs must be paused and
    /// the devices frozen ([`freeze_devices`](Self::freeze_devices)).
    pub fn save_state(&self) -> Result<(VmState, Vec<VcpuState>), SaveError> {
        let msrs = self.msr_list()?;
        let vcpus = self.control.save_vcpus(&msrs, self.irqchip())?;
        let mut vm = VmState::save(&self.vm, self.irqchip()).map_err(SaveError::Vm)?;
        vm.devices = self.devices().save().map_err(SaveError::Devices)?;
        Ok((vm, vcpus))
    }

    /// The host's checksum of vCPU `i`'s slice (the same function the guest computes).
    pub fn host_checksum(&self, i: usize) -> Result<u64, VmError> {
        let sl = self.slices.get(i).copied().ok_or(VmError::NoSlice(i))?;
        let bytes =
            self.mem
                .read(sl.start, sl.len as usize)
                .map_err(|source| VmError::GuestWrite {
                    what: "(reading) a workload slice",
                    source,
                })?;
        Ok(abi::checksum_bytes(&bytes))
    }

    fn threads(&self) -> std::sync::MutexGuard<'_, Vec<JoinHandle<()>>> {
        self.threads.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether every vCPU thread is still in its loop.
    pub fn all_running(&self) -> bool {
        !self.threads().iter().any(|t| t.is_finished())
    }

    /// Stop every vCPU and wait for the threads (see [`join`](Self::join)).
    pub fn stop_and_join(&self) -> Joined {
        if self.threads().is_empty() {
            return Joined::All;
        }
        self.control.stop();
        self.join()
    }

    /// Wait for the vCPU threads, which must be finishing (their loops returned, or a stop
    /// was asked and waited for), at most 2 s: a thread still running then is left behind (it
    /// ends with the process) rather than waited for forever.
    pub fn join(&self) -> Joined {
        let threads = std::mem::take(&mut *self.threads());
        let deadline = Instant::now() + std::time::Duration::from_secs(2);
        let mut r = Joined::All;
        for t in threads {
            while !t.is_finished() && Instant::now() < deadline {
                thread::sleep(std::time::Duration::from_millis(1));
            }
            if !t.is_finished() {
                r = Joined::Stuck;
            } else if t.join().is_err() && r == Joined::All {
                r = Joined::Panicked;
            }
        }
        r
    }
}

impl Drop for Machine {
    fn drop(&mut self) {
        self.stop_and_join();
    }
}
