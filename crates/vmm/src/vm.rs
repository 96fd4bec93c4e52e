//! The VM: KVM setup, vCPU threads, exits, the built-in guest's events, pause and resume.

use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering::SeqCst};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use kvm_bindings::KVM_MAX_CPUID_ENTRIES;
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};
use serde::Serialize;
use thiserror::Error;

use crate::cpl3;
use crate::guest::{self, Workload, abi};
use crate::memory::{Backend, GuestMem, MemoryError};

/// What to run.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct VmConfig {
    /// Guest memory in bytes (a multiple of 2 MiB).
    pub mem_bytes: u64,
    /// vCPUs.
    pub vcpus: u32,
    /// The built-in guest's workload.
    pub workload: Workload,
    /// Bytes of the workload area used (split among vCPUs); `None`: all of it.
    pub workload_bytes: Option<u64>,
    /// Run time; `None`: until the workload ends (`dirty` and `read` never do).
    pub run_for: Option<Duration>,
    /// Seed of the `random` workload.
    pub seed: u64,
    /// What backs guest memory.
    pub backend: Backend,
    /// Boot this Linux kernel instead of the built-in guest (the workload fields are unused).
    pub linux: Option<crate::linux::LinuxBoot>,
    /// vfio-user device sockets to attach to the PCI bus (guest memory becomes a memfd).
    #[serde(default)]
    pub vfio_user: Vec<std::path::PathBuf>,
}

impl Default for VmConfig {
    fn default() -> Self {
        Self {
            mem_bytes: 256 << 20,
            vcpus: 1,
            workload: Workload::Fill,
            workload_bytes: None,
            run_for: None,
            seed: 1,
            backend: Backend::Anonymous,
            linux: None,
            vfio_user: Vec::new(),
        }
    }
}

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
        /// The value, as `0x` hex (JSON numbers lose 64-bit precision).
        value: String,
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

/// Creating or running the VM.
#[derive(Debug, Error)]
pub enum VmError {
    /// A KVM ioctl failed.
    #[error("KVM: {what} failed")]
    Kvm {
        /// What was being done.
        what: &'static str,
        /// The ioctl's error (errno kept).
        #[source]
        source: kvm_ioctls::Error,
    },
    /// Guest memory could not be created.
    #[error("guest memory")]
    Memory(#[source] MemoryError),
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
    #[error("invalid VM configuration: {0}")]
    Config(String),
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
    /// The guest's checksum of its memory differs from the host's.
    #[error(
        "vCPU {vcpu}: guest checksum {guest:#018x} but the host reads {host:#018x}: guest memory is corrupt"
    )]
    Checksum {
        /// vCPU.
        vcpu: u32,
        /// Reported by the guest.
        guest: u64,
        /// Computed by the host over the same memory.
        host: u64,
    },
    /// The kernel could not be loaded.
    #[error("Linux boot")]
    Boot(#[source] crate::linux::BootError),
    /// The workload did not finish in time.
    #[error("the guest did not finish within {0:?}")]
    Timeout(Duration),
    /// A vCPU thread could not be started, or panicked.
    #[error("vCPU thread: {0}")]
    Thread(String),
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
    /// The page-fault handler (in-process fault loop or external process) failed.
    #[error("page-fault handler: {0}")]
    Pager(String),
    /// A migration failed after the guest started here.
    #[error("migration: {0}")]
    Migration(String),
    /// Attaching vfio-user devices failed.
    #[error("devices: {0}")]
    Devices(String),
}

/// Per-vCPU results.
#[derive(Debug, Clone, Default, Serialize)]
pub struct VcpuSummary {
    /// vCPU.
    pub vcpu: u32,
    /// Heartbeats after the first (number 0).
    pub heartbeats: u32,
    /// Longest gap between consecutive heartbeats numbered 1 and up, µs.
    pub max_gap_us: u64,
    /// Checksum reported by the guest (hex).
    pub checksum: Option<String>,
    /// Exit code, if the workload finished.
    pub exit_code: Option<u32>,
    /// Host time of `Ready`, µs.
    pub ready_us: Option<u64>,
    /// Host time of `Done`, µs.
    pub done_us: Option<u64>,
}

/// What a run produced.
#[derive(Debug, Clone, Serialize)]
pub struct RunSummary {
    /// The configuration.
    pub config: VmConfig,
    /// VM creation to the first heartbeat of any vCPU, µs.
    pub boot_to_first_heartbeat_us: Option<u64>,
    /// Per vCPU.
    pub vcpus: Vec<VcpuSummary>,
    /// The guest's checksums matched the host's reading of guest memory.
    pub checksums_verified: bool,
    /// Whole run, ms.
    pub wall_ms: u64,
    /// VM exits handled (all vCPUs).
    pub exits: u64,
    /// Stopped through the API before the workload finished.
    pub stopped: bool,
    /// Host time (µs since creation / restore start) of the first entry into the guest.
    pub first_run_us: Option<u64>,
    /// What the restore's page-fault handler did (lazy restores only).
    pub pager: Option<crate::restore::PagerReport>,
    /// The guest left through an outgoing migration.
    pub migrated: bool,
    /// The migration's final status (either side), if there was one.
    pub migration: Option<serde_json::Value>,
    /// `verify` after an incoming migration: the guest's checksums equal the source's at
    /// switchover.
    pub matches_source: Option<bool>,
    /// Values the guest reported: (key, value), in order.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub reports: Vec<(u32, u32)>,
    /// vfio-user devices on the PCI bus and what went through them.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub devices: Vec<crate::devices::pci::DeviceStats>,
}

/// Work a parked vCPU thread does on its own vCPU (saving state for a snapshot).
pub(crate) type Job = Box<dyn FnOnce(&mut VcpuFd) + Send>;

#[derive(Default)]
struct PauseState {
    paused: bool,
    stop: bool,
    jobs: Vec<Option<Job>>,
}

/// State shared by the controller and the vCPU threads.
pub(crate) struct Shared {
    t0: Instant,
    pause_req: AtomicBool,
    stop_req: AtomicBool,
    parked: AtomicU32,
    state: Mutex<PauseState>,
    cv: Condvar,
    exits: std::sync::atomic::AtomicU64,
    /// Host time (µs since `t0`) at which the first vCPU first entered `KVM_RUN`; 0: not yet.
    first_run_us: std::sync::atomic::AtomicU64,
    /// Per vCPU: heartbeat timing, thread id, whether its thread has ended.
    pub(crate) cpus: Vec<CpuTrack>,
    /// The vCPU threads (for the kick signal); filled by `start`.
    pthreads: Mutex<Vec<libc::pthread_t>>,
}

/// What the controller and the migration threads see of one vCPU without asking it.
#[derive(Default)]
pub(crate) struct CpuTrack {
    /// Host `CLOCK_MONOTONIC` ns of the last heartbeat (number 1 or later); 0: none yet.
    pub(crate) last_hb_ns: AtomicU64,
    /// Host `CLOCK_MONOTONIC` ns of the first heartbeat (number 1 or later); 0: none yet.
    pub(crate) first_hb_ns: AtomicU64,
    /// Longest gap between heartbeats since the last reset, ns.
    pub(crate) max_gap_ns: AtomicU64,
    /// Last heartbeat number.
    pub(crate) last_n: AtomicU32,
    /// Linux thread id of the vCPU thread (0 before it starts).
    pub(crate) tid: AtomicU32,
    /// The thread has returned from its loop.
    pub(crate) exited: AtomicBool,
}

/// Host `CLOCK_MONOTONIC` in ns (comparable across processes on one host).
pub(crate) fn mono_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid timespec to write.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

impl Shared {
    fn new(t0: Instant, vcpus: usize) -> Arc<Self> {
        Arc::new(Shared {
            t0,
            pause_req: AtomicBool::new(false),
            stop_req: AtomicBool::new(false),
            parked: AtomicU32::new(0),
            state: Mutex::new(PauseState::default()),
            cv: Condvar::new(),
            exits: Default::default(),
            first_run_us: Default::default(),
            cpus: (0..vcpus).map(|_| CpuTrack::default()).collect(),
            pthreads: Mutex::new(Vec::new()),
        })
    }

    pub(crate) fn is_paused(&self) -> bool {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).paused
    }

    fn running(&self) -> u32 {
        self.cpus.iter().filter(|c| !c.exited.load(SeqCst)).count() as u32
    }

    fn kick_until(&self, done: impl Fn() -> bool) {
        // A kick can land outside KVM_RUN and be lost: repeat until the vCPUs answer.
        while !done() {
            let threads = self
                .pthreads
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone();
            for (i, t) in threads.iter().enumerate() {
                if !self.cpus[i].exited.load(SeqCst) {
                    // SAFETY: pthread_kill on a vCPU thread that has not been joined (the
                    // controller joins only after every thread has exited).
                    unsafe { libc::pthread_kill(*t, kick_signal()) };
                }
            }
            thread::sleep(Duration::from_micros(500));
        }
    }

    /// A guest-requested sleep that a pause or stop cuts short (the guest re-checks its clock
    /// and sleeps again if it must).
    fn sleep(&self, d: Duration) {
        let deadline = Instant::now() + d;
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        while !self.pause_req.load(SeqCst) && !self.stop_req.load(SeqCst) {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            st = self
                .cv
                .wait_timeout(st, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Pause every vCPU (returns when all are parked or finished).
    pub(crate) fn pause(&self) {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).paused = true;
        self.pause_req.store(true, SeqCst);
        self.cv.notify_all();
        self.kick_until(|| self.parked.load(SeqCst) >= self.running());
    }

    /// Resume paused vCPUs.
    pub(crate) fn resume(&self) {
        self.pause_req.store(false, SeqCst);
        self.state.lock().unwrap_or_else(|e| e.into_inner()).paused = false;
        self.cv.notify_all();
    }

    pub(crate) fn stop_vcpus(&self) {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).stop = true;
        self.stop_req.store(true, SeqCst);
        self.cv.notify_all();
        self.kick_until(|| self.running() == 0);
    }

    /// Reset every vCPU's longest heartbeat gap.
    pub(crate) fn reset_gaps(&self) {
        for c in &self.cpus {
            c.max_gap_ns.store(0, SeqCst);
        }
    }

    /// Save every parked vCPU's state, each on its own thread (after completing its last
    /// exit). The vCPUs must be paused.
    pub(crate) fn save_vcpus(
        &self,
        msr_list: &[u32],
        lapic: bool,
    ) -> Result<Vec<crate::snapshot::VcpuState>, crate::snapshot::SnapshotError> {
        use crate::snapshot::{SnapshotError, VcpuState};
        let n = self.cpus.len();
        let mut rxs = Vec::new();
        {
            let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
            for i in 0..n {
                let (tx, rx) = mpsc::channel();
                let msrs = msr_list.to_vec();
                st.jobs[i] = Some(Box::new(move |v: &mut VcpuFd| {
                    // Complete the exit the vCPU last took (an `in` whose data we supplied,
                    // an `out`) before reading its registers: KVM_RUN with immediate_exit
                    // finishes it and returns at once.
                    v.set_kvm_immediate_exit(1);
                    let _ = v.run();
                    v.set_kvm_immediate_exit(0);
                    let _ = tx.send(VcpuState::save(v, &msrs, lapic));
                }));
                rxs.push(rx);
            }
        }
        self.cv.notify_all();
        let mut vcpus = Vec::new();
        for (i, rx) in rxs.into_iter().enumerate() {
            let st = rx
                .recv_timeout(Duration::from_secs(10))
                .map_err(|_| {
                    SnapshotError::Inconsistent(format!(
                        "vCPU {i} did not hand over its state within 10 s"
                    ))
                })?
                .map_err(SnapshotError::State)?;
            vcpus.push(st);
        }
        Ok(vcpus)
    }
}

/// `/dev/kvm`, a VM (with the in-kernel irqchip and PIT when asked for and offered), and
/// guest memory registered as slot 0.
fn kvm_vm_memory(cfg: &VmConfig, irqchip: bool) -> Result<(Kvm, VmFd, Arc<GuestMem>), VmError> {
    let mem = Arc::new(GuestMem::new(cfg.mem_bytes, cfg.backend).map_err(VmError::Memory)?);
    let (kvm, vm) = kvm_vm_with(&mem, irqchip, false)?;
    Ok((kvm, vm, mem))
}

/// `/dev/kvm` and a VM over existing guest memory (slot 0; `dirty_log`: log guest writes).
pub(crate) fn kvm_vm_with(
    mem: &Arc<GuestMem>,
    irqchip: bool,
    dirty_log: bool,
) -> Result<(Kvm, VmFd), VmError> {
    let kvm = Kvm::new().map_err(kvm_err("opening /dev/kvm"))?;
    let vm = kvm.create_vm().map_err(kvm_err("KVM_CREATE_VM"))?;
    if irqchip && kvm.check_extension(kvm_ioctls::Cap::Irqchip) {
        vm.create_irq_chip()
            .map_err(kvm_err("KVM_CREATE_IRQCHIP"))?;
    }
    if irqchip && kvm.check_extension(kvm_ioctls::Cap::Pit2) {
        let pit = kvm_bindings::kvm_pit_config {
            flags: kvm_bindings::KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        vm.create_pit2(pit).map_err(kvm_err("KVM_CREATE_PIT2"))?;
    }
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
    unsafe { vm.set_user_memory_region(region) }.map_err(kvm_err("KVM_SET_USER_MEMORY_REGION"))?;
    Ok((kvm, vm))
}

/// The x87/SSE state at reset.
fn reset_fpu() -> kvm_bindings::kvm_fpu {
    kvm_bindings::kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    }
}

/// A slice of the workload area.
#[derive(Debug, Clone, Copy)]
struct Slice {
    start: u64,
    len: u64,
    first_page: u64,
}

/// Check that the built-in guest's slices fit `cfg`.
pub(crate) fn slices_of_cfg(cfg: &VmConfig) -> Result<(), VmError> {
    slices_of(cfg).map(|_| ())
}

/// The built-in guest's workload slices, one per vCPU.
fn slices_of(cfg: &VmConfig) -> Result<Vec<Slice>, VmError> {
    let area = cfg.workload_bytes.unwrap_or(cfg.mem_bytes - cpl3::WORKLOAD);
    if cfg.mem_bytes <= cpl3::WORKLOAD || area > cfg.mem_bytes - cpl3::WORKLOAD {
        return Err(VmError::Config(format!(
            "workload area of {} MiB does not fit in {} MiB of memory",
            area >> 20,
            cfg.mem_bytes >> 20
        )));
    }
    let per = (area / u64::from(cfg.vcpus.max(1))) & !((1 << 20) - 1);
    if per < (1 << 20) {
        return Err(VmError::Config(
            "each vCPU needs at least 1 MiB of workload memory".into(),
        ));
    }
    Ok((0..u64::from(cfg.vcpus))
        .map(|i| Slice {
            start: cpl3::WORKLOAD + i * per,
            len: per,
            first_page: i * per / 4096,
        })
        .collect())
}

/// A created VM, not yet running.
pub struct Vm {
    _kvm: Kvm,
    _vm: Arc<VmFd>,
    mem: Arc<GuestMem>,
    vcpus: Vec<VcpuFd>,
    slices: Vec<Slice>,
    cfg: VmConfig,
    shared: Arc<Shared>,
    devices: Option<Arc<crate::devices::LegacyDevices>>,
    pci: Option<Arc<crate::devices::pci::PciBus>>,
    irqchip: bool,
    pager: Option<crate::restore::Pager>,
    last_heartbeat: Vec<u32>,
}

pub(crate) fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    move |source| VmError::Kvm { what, source }
}

/// The supported CPUID with vCPU `id`'s APIC id in leaves 1, 0xB and 0x1F.
pub(crate) fn apic_cpuid(cpuid: &kvm_bindings::CpuId, id: u32) -> kvm_bindings::CpuId {
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

extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

fn kick_signal() -> libc::c_int {
    vmm_sys_util::signal::SIGRTMIN()
}

impl Vm {
    /// Create the VM: KVM, memory, the built-in guest and its tables, vCPUs at their entry.
    pub fn new(cfg: VmConfig) -> Result<Vm, VmError> {
        let t0 = Instant::now();
        if cfg.vcpus == 0 || u64::from(cfg.vcpus) > cpl3::MAX_VCPUS {
            return Err(VmError::Config(format!(
                "vcpus must be 1..={}",
                cpl3::MAX_VCPUS
            )));
        }
        if cfg.mem_bytes > cpl3::MAX_MEM {
            return Err(VmError::Config(format!(
                "memory above {} GiB is not supported by the built-in guest",
                cpl3::MAX_MEM >> 30
            )));
        }
        if cfg.mem_bytes <= cpl3::WORKLOAD {
            return Err(VmError::Config(format!(
                "memory must be more than {} MiB (the built-in guest's fixed layout)",
                cpl3::WORKLOAD >> 20
            )));
        }
        if cfg.linux.is_some() {
            return Self::new_linux(cfg, t0);
        }
        let slices = slices_of(&cfg)?;

        let with_pci = !cfg.vfio_user.is_empty();
        let mut cfg = cfg;
        if with_pci {
            if cfg.mem_bytes > crate::devices::pci::MMIO_BASE {
                return Err(VmError::Config(format!(
                    "with vfio-user devices guest memory must end below the PCI window at {:#x}",
                    crate::devices::pci::MMIO_BASE
                )));
            }
            // Devices DMA into guest memory through its memfd.
            cfg.backend = Backend::Memfd;
        }
        let irqchip = with_pci
            && Kvm::new()
                .map(|k| k.check_extension(kvm_ioctls::Cap::Irqchip))
                .unwrap_or(false);
        let (kvm, vm, mem) = kvm_vm_memory(&cfg, irqchip)?;
        let map_bytes = if with_pci { 4 << 30 } else { cfg.mem_bytes };
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
            vcpu.set_sregs(&cpl3::user_mode_sregs(sregs))
                .map_err(kvm_err("KVM_SET_SREGS"))?;
            let khz = vcpu.get_tsc_khz().map_err(kvm_err("KVM_GET_TSC_KHZ"))?;
            let tsc_100ms = u64::from(khz) * 100;
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
                tsc_100ms,
                run_ticks,
                cfg.seed.wrapping_add(i as u64),
            );
            vcpu.set_regs(&regs).map_err(kvm_err("KVM_SET_REGS"))?;
            vcpu.set_fpu(&reset_fpu()).map_err(kvm_err("KVM_SET_FPU"))?;
            if irqchip {
                // Software-enable the LAPIC so device MSIs are accepted (they stay pending
                // in IRR: the built-in guest runs with interrupts off and polls).
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
        let n = vcpus.len();
        let vm = Arc::new(vm);
        let pci = if with_pci {
            let memfd = mem.memfd().ok_or_else(|| {
                VmError::Config("vfio-user devices need memfd guest memory".into())
            })?;
            Some(Arc::new(
                crate::devices::pci::PciBus::new(
                    vm.clone(),
                    irqchip,
                    &cfg.vfio_user,
                    memfd,
                    cfg.mem_bytes,
                )
                .map_err(|e| VmError::Devices(uffd::error_chain(&e)))?,
            ))
        } else {
            None
        };
        Ok(Vm {
            _kvm: kvm,
            _vm: vm,
            pci,
            mem,
            vcpus,
            slices,
            cfg,
            shared: Shared::new(t0, n),
            devices: None,
            irqchip,
            pager: None,
            last_heartbeat: vec![0; n],
        })
    }

    /// A VM over restored parts (see [`crate::restore`]).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn from_parts(
        kvm: Kvm,
        vm: VmFd,
        mem: Arc<GuestMem>,
        vcpus: Vec<VcpuFd>,
        cfg: VmConfig,
        t0: Instant,
        pager: Option<crate::restore::Pager>,
        last_heartbeat: Vec<u32>,
    ) -> Result<Vm, VmError> {
        let slices = slices_of(&cfg)?;
        let n = vcpus.len();
        Ok(Vm {
            _kvm: kvm,
            _vm: Arc::new(vm),
            mem,
            vcpus,
            slices,
            cfg,
            shared: Shared::new(t0, n),
            devices: None,
            pci: None,
            irqchip: false,
            pager,
            last_heartbeat,
        })
    }

    /// A Linux VM: in-kernel irqchip and PIT where KVM offers them, COM1 on an irqfd, the
    /// i8042 reset line, the kernel loaded by `linux-loader`.
    fn new_linux(cfg: VmConfig, t0: Instant) -> Result<Vm, VmError> {
        use kvm_ioctls::Cap;
        let boot = cfg.linux.clone().expect("called for Linux configurations");
        if cfg.vcpus == 0 || cfg.vcpus > crate::mptable::MAX_CPUS {
            return Err(VmError::Config(format!(
                "Linux boot supports 1..={} vCPUs (MP table)",
                crate::mptable::MAX_CPUS
            )));
        }
        let (kvm, vm, mem) = kvm_vm_memory(&cfg, true)?;
        let irqchip = kvm.check_extension(Cap::Irqchip);
        let irq = vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK).map_err(|source| {
            VmError::Host {
                what: "the COM1 interrupt eventfd",
                source,
            }
        })?;
        if irqchip {
            vm.register_irqfd(&irq, crate::devices::COM1_GSI)
                .map_err(kvm_err("KVM_IRQFD for COM1"))?;
        }
        let devices = Arc::new(crate::devices::LegacyDevices::new(
            irq,
            Box::new(std::io::stdout()),
        ));
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
            _kvm: kvm,
            _vm: Arc::new(vm),
            mem,
            vcpus,
            slices: Vec::new(),
            cfg,
            shared: Shared::new(t0, n),
            devices: Some(devices),
            pci: None,
            irqchip,
            pager: None,
            last_heartbeat: vec![0; n],
        })
    }

    /// Guest memory.
    pub fn memory(&self) -> &Arc<GuestMem> {
        &self.mem
    }

    /// The built-in guest's entry registers for `workload` on vCPU `i` (fresh start, no run
    /// time limit).
    pub(crate) fn entry_regs_for(
        vcpu: &VcpuFd,
        cfg: &VmConfig,
        i: usize,
        workload: Workload,
    ) -> Result<kvm_bindings::kvm_regs, VmError> {
        let s = slices_of(cfg)?[i];
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

    /// Start the vCPU threads.
    pub fn start(self) -> Result<RunningVm, VmError> {
        // The kick signal interrupts KVM_RUN (EINTR) so a vCPU can park or stop.
        vmm_sys_util::signal::register_signal_handler(kick_signal(), kick_handler).map_err(
            |e| VmError::Host {
                what: "the vCPU kick signal handler",
                source: std::io::Error::from_raw_os_error(e.errno()),
            },
        )?;
        crate::restore::install_sigbus_handler().map_err(|source| VmError::Host {
            what: "the SIGBUS handler for lost guest pages",
            source,
        })?;
        let (tx, rx) = mpsc::channel();
        let api_tx = tx.clone();
        let n = self.vcpus.len();
        self.shared
            .state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .jobs
            .resize_with(n, || None);
        let mut pager = match self.pager {
            Some(mut p) => {
                p.watch(tx.clone())?;
                Some(p)
            }
            None => None,
        };
        let mut threads = Vec::new();
        for (i, vcpu) in self.vcpus.into_iter().enumerate() {
            let tx = tx.clone();
            let shared = self.shared.clone();
            let devices = self.devices.clone();
            let pci = self.pci.clone();
            let h = thread::Builder::new()
                .name(format!("vcpu-{i}"))
                .spawn(move || {
                    vcpu_loop(
                        i as u32,
                        vcpu,
                        &shared,
                        devices.as_deref(),
                        pci.as_deref(),
                        &tx,
                    )
                })
                .map_err(|source| VmError::Host {
                    what: "a vCPU thread",
                    source,
                })?;
            threads.push(h);
        }
        {
            use std::os::unix::thread::JoinHandleExt;
            *self
                .shared
                .pthreads
                .lock()
                .unwrap_or_else(|e| e.into_inner()) =
                threads.iter().map(|t| t.as_pthread_t()).collect();
        }
        if let Some(p) = &mut pager {
            p.launch()?;
        }
        Ok(RunningVm {
            _kvm: self._kvm,
            _vm: self._vm,
            mem: self.mem,
            slices: self.slices,
            cfg: self.cfg,
            shared: self.shared,
            threads,
            rx,
            summary: vec![VcpuSummary::default(); n],
            last_hb: vec![None; n],
            last_n: self.last_heartbeat,
            first_hb: None,
            live: n,
            api_tx,
            stopped: false,
            irqchip: self.irqchip,
            pager,
            pci: self.pci,
            reports: Vec::new(),
            migration: None,
            migrated: false,
            final_seen: false,
        })
    }
}

pub(crate) enum Msg {
    Event(Event),
    Failed(VmError),
    Exited,
    Api(crate::api::ApiRequest, Sender<crate::api::ApiReply>),
    /// An outgoing migration switched over: the guest runs elsewhere; stop the vCPUs.
    Migrated,
}

fn rip(vcpu: &VcpuFd) -> u64 {
    vcpu.get_regs().map(|r| r.rip).unwrap_or(0)
}

fn vcpu_loop(
    id: u32,
    mut vcpu: VcpuFd,
    shared: &Shared,
    devices: Option<&crate::devices::LegacyDevices>,
    pci: Option<&crate::devices::pci::PciBus>,
    tx: &Sender<Msg>,
) {
    // SAFETY: gettid has no preconditions.
    let tid = unsafe { libc::gettid() } as u32;
    shared.cpus[id as usize].tid.store(tid, SeqCst);
    let r = run_vcpu(id, &mut vcpu, shared, devices, pci, tx);
    if let Err(e) = r {
        let _ = tx.send(Msg::Failed(e));
    }
    shared.cpus[id as usize].exited.store(true, SeqCst);
    let _ = tx.send(Msg::Exited);
}

fn park(shared: &Shared, id: u32, vcpu: &mut VcpuFd) -> bool {
    let mut st = shared.state.lock().unwrap_or_else(|e| e.into_inner());
    shared.parked.fetch_add(1, SeqCst);
    loop {
        if let Some(job) = st.jobs.get_mut(id as usize).and_then(Option::take) {
            drop(st);
            job(vcpu);
            st = shared.state.lock().unwrap_or_else(|e| e.into_inner());
            continue;
        }
        if !st.paused || st.stop {
            break;
        }
        st = shared.cv.wait(st).unwrap_or_else(|e| e.into_inner());
    }
    shared.parked.fetch_sub(1, SeqCst);
    st.stop
}

fn run_vcpu(
    id: u32,
    vcpu: &mut VcpuFd,
    shared: &Shared,
    devices: Option<&crate::devices::LegacyDevices>,
    pci: Option<&crate::devices::pci::PciBus>,
    tx: &Sender<Msg>,
) -> Result<(), VmError> {
    use crate::devices::PioResult;
    let send = |e: Event| {
        let _ = tx.send(Msg::Event(e));
    };
    let now_us = || shared.t0.elapsed().as_micros() as u64;
    let mut checksum_lo = 0u32;
    let mut key = 0u32;
    let mut log = Vec::new();
    loop {
        if shared.stop_req.load(SeqCst) {
            return Ok(());
        }
        if shared.pause_req.load(SeqCst) && park(shared, id, vcpu) {
            return Ok(());
        }
        if shared.first_run_us.load(SeqCst) == 0 {
            let _ = shared.first_run_us.compare_exchange(
                0,
                (shared.t0.elapsed().as_micros() as u64).max(1),
                SeqCst,
                SeqCst,
            );
        }
        let r = crate::restore::in_vcpu_run(|| vcpu.run());
        if let Some(hva) = crate::restore::take_lost_page() {
            return Err(VmError::LostPage {
                vcpu: id,
                host_addr: hva,
            });
        }
        let exit = match r {
            Ok(e) => e,
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => continue,
            Err(source) => return Err(VmError::Run { vcpu: id, source }),
        };
        shared
            .exits
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        match exit {
            VcpuExit::IoOut(port, data) if devices.is_some() => {
                if let Some(d) = devices
                    && d.pio_write(port, data) == PioResult::Reset
                {
                    send(Event::Reset {
                        vcpu: id,
                        t_us: now_us(),
                    });
                    return Ok(());
                }
            }
            VcpuExit::IoIn(port, data) if devices.is_some() => {
                if let Some(d) = devices
                    && d.pio_read(port, data) == PioResult::Unclaimed
                {
                    data.fill(0xff);
                }
            }
            VcpuExit::IoOut(port, data)
                if pci.is_some() && crate::devices::pci::PciBus::claims_port(port) =>
            {
                if let Some(p) = pci {
                    p.pio_write(port, data);
                }
            }
            VcpuExit::IoIn(port, data)
                if pci.is_some() && crate::devices::pci::PciBus::claims_port(port) =>
            {
                if let Some(p) = pci {
                    p.pio_read(port, data);
                }
            }
            VcpuExit::MmioRead(addr, data) if pci.is_some() => {
                if let Some(p) = pci
                    && !p.mmio(addr, data, false)
                {
                    data.fill(0xff);
                }
            }
            VcpuExit::MmioWrite(addr, data) if pci.is_some() => {
                if let Some(p) = pci {
                    let mut d = data.to_vec();
                    p.mmio(addr, &mut d, true);
                }
            }
            VcpuExit::IoOut(port, data) => {
                let mut b = [0u8; 4];
                b[..data.len().min(4)].copy_from_slice(&data[..data.len().min(4)]);
                let v = u32::from_le_bytes(b);
                match port {
                    abi::PORT_HEARTBEAT => {
                        let c = &shared.cpus[id as usize];
                        if v >= 1 {
                            let now = mono_ns();
                            let _ = c.first_hb_ns.compare_exchange(0, now, SeqCst, SeqCst);
                            let last = c.last_hb_ns.swap(now, SeqCst);
                            if last != 0 {
                                c.max_gap_ns.fetch_max(now.saturating_sub(last), SeqCst);
                            }
                        }
                        c.last_n.store(v, SeqCst);
                        send(Event::Heartbeat {
                            vcpu: id,
                            n: v,
                            t_us: now_us(),
                        })
                    }
                    abi::PORT_PHASE if v == abi::PHASE_READY => send(Event::Ready {
                        vcpu: id,
                        t_us: now_us(),
                    }),
                    abi::PORT_CHECKSUM_LO => checksum_lo = v,
                    abi::PORT_KEY => key = v,
                    abi::PORT_VALUE => send(Event::Value {
                        vcpu: id,
                        key,
                        value: v,
                    }),
                    abi::PORT_CHECKSUM_HI => send(Event::Checksum {
                        vcpu: id,
                        value: format!("{:#018x}", (u64::from(v) << 32) | u64::from(checksum_lo)),
                    }),
                    abi::PORT_LOG => {
                        if data[0] == b'\n' || log.len() >= 1024 {
                            send(Event::Log {
                                vcpu: id,
                                line: String::from_utf8_lossy(&log).into_owned(),
                            });
                            log.clear();
                        } else {
                            log.push(data[0]);
                        }
                    }
                    abi::PORT_SLEEP_US => {
                        shared.sleep(Duration::from_micros(u64::from(v.min(1_000_000))))
                    }
                    abi::PORT_DONE => {
                        if pci.is_some()
                            && let Ok(lapic) = vcpu.get_lapic()
                        {
                            // Device MSIs delivered through irqfd wait in the LAPIC's IRR
                            // (the guest runs with interrupts off): report them.
                            for v in 32..256usize {
                                let reg = 0x200 + 0x10 * (v / 32);
                                let r = &lapic.regs[reg..reg + 4];
                                let word = u32::from_le_bytes([
                                    r[0] as u8, r[1] as u8, r[2] as u8, r[3] as u8,
                                ]);
                                if word & (1 << (v % 32)) != 0 {
                                    send(Event::Value {
                                        vcpu: id,
                                        key: abi::KEY_VMM_LAPIC_IRR,
                                        value: v as u32,
                                    });
                                }
                            }
                        }
                        send(Event::Done {
                            vcpu: id,
                            code: v,
                            t_us: now_us(),
                        });
                        return Ok(());
                    }
                    _ => {} // no device there: writes are dropped, as on real hardware
                }
            }
            VcpuExit::IoIn(_, data) => data.fill(0xff),
            VcpuExit::MmioRead(_, data) => data.fill(0xff),
            VcpuExit::MmioWrite(..) => {}
            VcpuExit::Intr => {}
            VcpuExit::Hlt => {
                return Err(VmError::Exit {
                    vcpu: id,
                    exit: "HLT with no interrupt source".into(),
                    rip: rip(vcpu),
                });
            }
            VcpuExit::Shutdown => {
                return Err(VmError::Exit {
                    vcpu: id,
                    exit: "SHUTDOWN (triple fault: the guest took an exception it cannot handle)"
                        .into(),
                    rip: rip(vcpu),
                });
            }
            VcpuExit::InternalError => {
                // SAFETY: after KVM_EXIT_INTERNAL_ERROR the kernel filled the `internal` member.
                let sub = unsafe { vcpu.get_kvm_run().__bindgen_anon_1.internal.suberror };
                return Err(VmError::Exit {
                    vcpu: id,
                    exit: format!("KVM internal error (suberror {sub}: 1 = emulation failure)"),
                    rip: rip(vcpu),
                });
            }
            VcpuExit::FailEntry(reason, cpu) => {
                return Err(VmError::Exit {
                    vcpu: id,
                    exit: format!("entry failed (hardware reason {reason:#x} on host CPU {cpu})"),
                    rip: rip(vcpu),
                });
            }
            other => {
                let what = format!("unexpected exit {other:?}");
                return Err(VmError::Exit {
                    vcpu: id,
                    exit: what,
                    rip: rip(vcpu),
                });
            }
        }
    }
}

/// A running VM.
pub struct RunningVm {
    _kvm: Kvm,
    _vm: Arc<VmFd>,
    mem: Arc<GuestMem>,
    slices: Vec<Slice>,
    cfg: VmConfig,
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
    rx: Receiver<Msg>,
    summary: Vec<VcpuSummary>,
    last_hb: Vec<Option<u64>>,
    first_hb: Option<u64>,
    live: usize,
    api_tx: Sender<Msg>,
    stopped: bool,
    /// Last heartbeat number per vCPU (carried over from a snapshot).
    last_n: Vec<u32>,
    irqchip: bool,
    pager: Option<crate::restore::Pager>,
    pci: Option<Arc<crate::devices::pci::PciBus>>,
    reports: Vec<(u32, u32)>,
    /// An outgoing or incoming migration of this VM.
    migration: Option<crate::migration::Migration>,
    /// The guest left for another host (outgoing migration switched over).
    migrated: bool,
    /// Someone read the migration's final status through the API.
    final_seen: bool,
}

impl fmt::Debug for RunningVm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RunningVm").field("cfg", &self.cfg).finish()
    }
}

impl RunningVm {
    /// Guest memory.
    pub fn memory(&self) -> &Arc<GuestMem> {
        &self.mem
    }

    /// A handle through which the control API reaches this VM's controller (the thread that
    /// calls [`wait`](Self::wait)).
    pub fn api_sender(&self) -> crate::api::ApiSender {
        crate::api::ApiSender(self.api_tx.clone())
    }

    fn is_paused(&self) -> bool {
        self.shared.is_paused()
    }

    fn answer(&mut self, req: crate::api::ApiRequest) -> crate::api::ApiReply {
        use crate::api::ApiRequest;
        use serde_json::{Value, json};
        match req {
            ApiRequest::GetVm => (
                200,
                json!({
                    "state": if self.stopped { "stopping" } else if self.is_paused() { "paused" } else { "running" },
                    "config": self.cfg,
                }),
            ),
            ApiRequest::Pause => {
                self.pause();
                (204, Value::Null)
            }
            ApiRequest::Resume => {
                self.resume();
                (204, Value::Null)
            }
            ApiRequest::Stop => {
                self.stopped = true;
                self.resume();
                self.stop_vcpus();
                (204, Value::Null)
            }
            ApiRequest::SnapshotCreate {
                dir,
                page_checksums,
            } => match self.snapshot(&dir, page_checksums) {
                Ok(info) => (200, json!(info)),
                Err(e) => (500, json!({ "error": uffd::error_chain(&e) })),
            },
            ApiRequest::Migrate(req) => self.start_migration(req),
            ApiRequest::MigrateStatus => match &self.migration {
                Some(m) => {
                    if m.status.is_final() {
                        self.final_seen = true;
                    }
                    (200, m.status.json())
                }
                None => (404, json!({ "error": "no migration" })),
            },
            ApiRequest::Stats => (
                200,
                json!({
                    "uptime_ms": self.shared.t0.elapsed().as_millis() as u64,
                    "exits": self.shared.exits.load(SeqCst),
                    "paused": self.is_paused(),
                    "boot_to_first_heartbeat_us": self.first_hb,
                    "vcpus": self.summary.iter().enumerate().map(|(i, v)| json!({
                        "vcpu": i,
                        "heartbeats": v.heartbeats,
                        "max_gap_us": v.max_gap_us,
                        "last_heartbeat_us": self.last_hb[i],
                    })).collect::<Vec<_>>(),
                }),
            ),
        }
    }

    /// Pause every vCPU (returns when all are parked or finished).
    pub fn pause(&self) {
        self.shared.pause();
    }

    fn start_migration(&mut self, req: crate::migration::MigrateRequest) -> crate::api::ApiReply {
        use serde_json::json;
        if req.resume {
            let Some(m) = &self.migration else {
                return (404, json!({ "error": "no migration to resume" }));
            };
            if m.status.get().state != "postcopy-paused" {
                return (
                    409,
                    json!({ "error": format!("the migration is {}, not postcopy-paused", m.status.get().state) }),
                );
            }
            return match m.resume.as_ref().map(|r| r.send(req.to.clone())) {
                Some(Ok(())) => {
                    m.status.update(|s| s.state = "resuming".into());
                    (202, m.status.json())
                }
                _ => (
                    409,
                    json!({ "error": "this side cannot resume the migration" }),
                ),
            };
        }
        if self.migration.as_ref().is_some_and(|m| m.busy()) || self.migrated {
            return (
                409,
                json!({ "error": "a migration is already running or done" }),
            );
        }
        if self.cfg.linux.is_some() {
            return (
                400,
                json!({ "error": "migration of Linux guests is not supported yet (serial and i8042 state)" }),
            );
        }
        if self.shared.cpus.iter().any(|c| c.exited.load(SeqCst)) {
            return (
                400,
                json!({ "error": "a vCPU has already stopped (its workload finished): nothing to migrate" }),
            );
        }
        let msr_list = match self._kvm.get_msr_index_list() {
            Ok(l) => l.as_slice().to_vec(),
            Err(e) => {
                return (
                    500,
                    json!({ "error": format!("KVM_GET_MSR_INDEX_LIST: {e}") }),
                );
            }
        };
        let ctx = crate::migration::source::SourceCtx {
            shared: self.shared.clone(),
            vm: self._vm.clone(),
            mem: self.mem.clone(),
            msr_list,
            irqchip: self.irqchip,
            cfg: self.cfg.clone(),
            slices: self.slices.iter().map(|s| (s.start, s.len)).collect(),
            tx: self.api_tx.clone(),
        };
        let status = crate::migration::Status::new("source", Some(req.mode));
        let (rtx, rrx) = mpsc::channel();
        let st = status.clone();
        let th = thread::Builder::new()
            .name("migration-out".into())
            .spawn(move || crate::migration::source::run(ctx, req, st, rrx));
        match th {
            Ok(th) => {
                self.migration = Some(crate::migration::Migration {
                    status: status.clone(),
                    resume: Some(rtx),
                    thread: Some(th),
                });
                (202, status.json())
            }
            Err(e) => (
                500,
                json!({ "error": format!("cannot start the migration thread: {e}") }),
            ),
        }
    }

    /// The migration's status, if this VM has one (either side).
    pub fn migration_status(&self) -> Option<crate::migration::Status> {
        self.migration.as_ref().map(|m| m.status.clone())
    }

    pub(crate) fn attach_migration(&mut self, m: crate::migration::Migration) {
        self.migration = Some(m);
    }

    pub(crate) fn shared(&self) -> Arc<Shared> {
        self.shared.clone()
    }

    pub(crate) fn failure_sender(&self) -> Sender<Msg> {
        self.api_tx.clone()
    }

    fn migration_busy(&self) -> bool {
        self.migration.as_ref().is_some_and(|m| m.busy())
    }

    /// Resume paused vCPUs.
    pub fn resume(&self) {
        self.shared.resume();
    }

    fn stop_vcpus(&self) {
        self.shared.stop_vcpus();
    }

    fn absorb(&mut self, e: &Event) {
        match *e {
            Event::Heartbeat { vcpu, n, t_us } => {
                self.first_hb.get_or_insert(t_us);
                if let Some(l) = self.last_n.get_mut(vcpu as usize) {
                    *l = n;
                }
                let s = &mut self.summary[vcpu as usize];
                if n >= 1 {
                    s.heartbeats += 1;
                    if let Some(prev) = self.last_hb[vcpu as usize] {
                        s.max_gap_us = s.max_gap_us.max(t_us - prev);
                    }
                    self.last_hb[vcpu as usize] = Some(t_us);
                }
            }
            Event::Ready { vcpu, t_us } => self.summary[vcpu as usize].ready_us = Some(t_us),
            Event::Checksum { vcpu, ref value } => {
                self.summary[vcpu as usize].checksum = Some(value.clone())
            }
            Event::Done { vcpu, code, t_us } => {
                let s = &mut self.summary[vcpu as usize];
                s.exit_code = Some(code);
                s.done_us = Some(t_us);
            }
            Event::Log { .. } => {}
            Event::Value { key, value, .. } => self.reports.push((key, value)),
            Event::Reset { .. } => {
                self.stopped = true;
                self.stop_vcpus();
            }
        }
    }

    /// The next guest event, waiting at most `timeout` (`Ok(None)`: none came). A vCPU
    /// failure is returned as the error.
    pub fn next_event(&mut self, timeout: Duration) -> Result<Option<Event>, VmError> {
        loop {
            match self.rx.recv_timeout(timeout) {
                Ok(Msg::Event(e)) => {
                    self.absorb(&e);
                    return Ok(Some(e));
                }
                Ok(Msg::Failed(e)) => return Err(e),
                Ok(Msg::Exited) => self.live -= 1,
                Ok(Msg::Migrated) => {
                    self.migrated = true;
                    self.stopped = true;
                    self.stop_vcpus();
                }
                Ok(Msg::Api(req, reply)) => {
                    let r = self.answer(req);
                    let _ = reply.send(r);
                }
                Err(_) => return Ok(None),
            }
        }
    }

    /// Stop every vCPU now and release the VM.
    pub fn stop(mut self) {
        self.stop_vcpus();
        for t in std::mem::take(&mut self.threads) {
            let _ = t.join();
        }
        if let Some(p) = self.pager.take() {
            let _ = p.finish();
        }
    }

    /// Host time (µs since the VM was created or its restore began) at which a vCPU first
    /// entered the guest; `None` before that.
    pub fn first_run_us(&self) -> Option<u64> {
        match self.shared.first_run_us.load(SeqCst) {
            0 => None,
            t => Some(t),
        }
    }

    /// What the restore's page-fault handler has done so far (`None`: not a lazy restore).
    pub fn pager_report(&self) -> Option<crate::restore::PagerReport> {
        self.pager.as_ref().map(|p| p.report())
    }

    /// Pause (if running), write a snapshot into `dir`, and resume (if it was running).
    pub fn snapshot(
        &mut self,
        dir: &std::path::Path,
        page_checksums: bool,
    ) -> Result<crate::snapshot::SnapshotInfo, crate::snapshot::SnapshotError> {
        use crate::snapshot::SnapshotError;
        if self.cfg.linux.is_some() {
            return Err(SnapshotError::Inconsistent(
                "snapshots of Linux guests are not supported yet (serial and i8042 state is not saved)".into(),
            ));
        }
        if self.threads.iter().any(|t| t.is_finished()) {
            return Err(SnapshotError::Inconsistent(
                "a vCPU has already stopped (its workload finished): nothing to snapshot".into(),
            ));
        }
        let t0 = Instant::now();
        let was_paused = self.is_paused();
        self.pause();
        let r = self.snapshot_paused(dir, page_checksums, t0);
        if !was_paused {
            self.resume();
        }
        let mut info = r?;
        info.paused_ms = if was_paused {
            0.0
        } else {
            t0.elapsed().as_secs_f64() * 1e3
        };
        Ok(info)
    }

    fn snapshot_paused(
        &mut self,
        dir: &std::path::Path,
        page_checksums: bool,
        t0: Instant,
    ) -> Result<crate::snapshot::SnapshotInfo, crate::snapshot::SnapshotError> {
        use crate::snapshot::{self as snap, SnapshotError, StateError, VmState};
        let kvm_fail = |what: &'static str| {
            move |source| SnapshotError::State(StateError::Kvm { what, source })
        };
        let msr_list = self
            ._kvm
            .get_msr_index_list()
            .map_err(kvm_fail("KVM_GET_MSR_INDEX_LIST"))?
            .as_slice()
            .to_vec();
        let vcpus = self.shared.save_vcpus(&msr_list, self.irqchip)?;
        let vm_state = VmState::save(&self._vm, self.irqchip).map_err(SnapshotError::State)?;
        std::fs::create_dir_all(dir).map_err(|source| SnapshotError::Io {
            what: "creating",
            path: dir.to_path_buf(),
            source,
        })?;
        // A half-written directory must not look like a snapshot.
        let _ = std::fs::remove_file(dir.join(snap::files::MANIFEST));
        let _ = std::fs::remove_file(dir.join(snap::files::WORKING_SET));
        let mem_path = dir.join(snap::files::MEMORY);
        // SAFETY: every vCPU is parked; nothing else writes guest memory.
        let (idx, written) = unsafe { snap::write_memory(&self.mem, &mem_path, page_checksums) }?;
        let index = snap::write_file(dir, snap::files::INDEX, &idx.encode())?;
        let state = snap::write_file(
            dir,
            snap::files::STATE,
            &snap::state::encode(&vm_state, &vcpus),
        )?;
        let mut checksums = Vec::new();
        for i in 0..self.slices.len() {
            let c = self.host_checksum(i).map_err(|e| match e {
                VmError::GuestWrite { source, .. } => SnapshotError::Memory(source),
                other => SnapshotError::Inconsistent(other.to_string()),
            })?;
            checksums.push(format!("{c:#018x}"));
        }
        let manifest = snap::Manifest {
            format: snap::FORMAT.into(),
            version: snap::VERSION,
            created_unix_ms: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64),
            config: self.cfg.clone(),
            irqchip: self.irqchip,
            slices: self
                .slices
                .iter()
                .map(|s| snap::SliceInfo {
                    start: s.start,
                    len: s.len,
                    first_page: s.first_page,
                })
                .collect(),
            checksums: checksums.clone(),
            heartbeats: self.last_n.clone(),
            memory: snap::MemoryInfo {
                file: snap::files::MEMORY.into(),
                bytes: self.mem.size(),
                page_size: snap::PAGE,
                nonzero_pages: written.nonzero_pages,
                page_checksums,
            },
            index,
            state,
        };
        snap::write_manifest(dir, &manifest)?;
        Ok(snap::SnapshotInfo {
            dir: dir.to_path_buf(),
            total_ms: t0.elapsed().as_secs_f64() * 1e3,
            paused_ms: 0.0,
            mem_bytes: self.mem.size(),
            nonzero_pages: written.nonzero_pages,
            bytes_written: written.bytes_written,
            checksums,
            heartbeats: self.last_n.clone(),
        })
    }

    /// Run until every vCPU's workload is done (or `timeout`), passing each event to
    /// `on_event`; then check each guest checksum against the host's reading of guest memory.
    pub fn wait(
        mut self,
        timeout: Duration,
        mut on_event: impl FnMut(&Event),
    ) -> Result<RunSummary, VmError> {
        let deadline = Instant::now() + timeout;
        let mut failure = None;
        // After an outgoing migration, linger (at most 5 s) until its final status has been
        // read through the API, so `faultline migrate` can print it.
        let mut linger: Option<Instant> = None;
        while self.live > 0
            || (self.migration_busy() && failure.is_none())
            || (self.migrated
                && !self.final_seen
                && linger.get_or_insert_with(Instant::now).elapsed() < Duration::from_secs(5))
        {
            let left = deadline.saturating_duration_since(Instant::now());
            let tick = if self.live > 0 {
                left
            } else {
                left.min(Duration::from_millis(50))
            };
            match self.rx.recv_timeout(tick) {
                Ok(Msg::Event(e)) => {
                    self.absorb(&e);
                    on_event(&e);
                }
                Ok(Msg::Failed(e)) => {
                    failure.get_or_insert(e);
                    self.stop_vcpus();
                }
                Ok(Msg::Exited) => self.live -= 1,
                Ok(Msg::Migrated) => {
                    self.migrated = true;
                    self.stopped = true;
                    self.stop_vcpus();
                }
                Ok(Msg::Api(req, reply)) => {
                    let r = self.answer(req);
                    let _ = reply.send(r);
                }
                Err(RecvTimeoutError::Timeout) if self.live == 0 && Instant::now() < deadline => {}
                Err(RecvTimeoutError::Timeout) => {
                    failure.get_or_insert(VmError::Timeout(timeout));
                    self.stop_vcpus();
                }
                Err(RecvTimeoutError::Disconnected) => break,
            }
        }
        for t in std::mem::take(&mut self.threads) {
            t.join()
                .map_err(|_| VmError::Thread("a vCPU thread panicked".into()))?;
        }
        if let Some(e) = failure {
            if let Some(p) = self.pager.take() {
                let _ = p.finish();
            }
            return Err(e);
        }
        let pager = match self.pager.take() {
            Some(p) => Some(p.finish()?),
            None => None,
        };
        for (i, s) in self.summary.iter_mut().enumerate() {
            s.vcpu = i as u32;
        }
        let mut verified = true;
        for i in 0..self.slices.len() {
            let Some(hex) = &self.summary[i].checksum else {
                verified = false;
                continue;
            };
            let guest = u64::from_str_radix(hex.trim_start_matches("0x"), 16).unwrap_or(0);
            let host = self.host_checksum(i)?;
            if guest != host {
                return Err(VmError::Checksum {
                    vcpu: i as u32,
                    guest,
                    host,
                });
            }
        }
        let mut matches_source = None;
        if self.cfg.workload == Workload::Verify
            && let Some(src) = self
                .migration
                .as_ref()
                .and_then(|m| m.status.get().source_checksums)
        {
            for (i, want) in src.iter().enumerate() {
                let got = self.summary.get(i).and_then(|s| s.checksum.as_deref());
                let got =
                    got.and_then(|h| u64::from_str_radix(h.trim_start_matches("0x"), 16).ok());
                if got != Some(*want) {
                    return Err(VmError::Migration(format!(
                        "vCPU {i}: `verify` computed {} here, but the source's memory had {want:#018x} at switchover",
                        got.map_or("nothing".into(), |g| format!("{g:#018x}"))
                    )));
                }
            }
            matches_source = Some(true);
        }
        Ok(RunSummary {
            boot_to_first_heartbeat_us: self.first_hb,
            vcpus: self.summary.clone(),
            checksums_verified: verified,
            wall_ms: self.shared.t0.elapsed().as_millis() as u64,
            exits: self.shared.exits.load(SeqCst),
            stopped: self.stopped,
            config: self.cfg.clone(),
            first_run_us: self.first_run_us(),
            pager,
            migrated: self.migrated,
            migration: self.migration.as_ref().map(|m| m.status.json()),
            matches_source,
            reports: self.reports.clone(),
            devices: self.pci.as_ref().map(|p| p.stats()).unwrap_or_default(),
        })
    }

    /// The host's checksum of vCPU `i`'s slice (the same function the guest computes).
    pub fn host_checksum(&self, i: usize) -> Result<u64, VmError> {
        let sl = self.slices[i];
        let bytes =
            self.mem
                .read(sl.start, sl.len as usize)
                .map_err(|source| VmError::GuestWrite {
                    what: "(reading) a workload slice",
                    source,
                })?;
        Ok(abi::checksum_bytes(&bytes))
    }

    /// vCPU `i`'s slice: (guest-physical start, length, index of its first page).
    pub fn slice(&self, i: usize) -> (u64, u64, u64) {
        let s = self.slices[i];
        (s.start, s.len, s.first_page)
    }
}

impl Drop for RunningVm {
    fn drop(&mut self) {
        if !self.threads.is_empty() {
            self.stop_vcpus();
            for t in std::mem::take(&mut self.threads) {
                let _ = t.join();
            }
        }
    }
}
