//! A vCPU's thread: `KVM_RUN`, its exits dispatched to the devices and to the built-in guest's
//! port-I/O ABI, parking on a pause, and the SIGBUS of a poisoned guest page turned into an
//! error of this vCPU.

use std::cell::Cell;
use std::io;
use std::sync::atomic::Ordering::{Relaxed, SeqCst};
use std::time::Duration;

use kvm_ioctls::{VcpuExit, VcpuFd};

use super::control::{VcpuControl, mono_ns};
use super::error::VmError;
use super::irq::Interrupts;
use super::notice::{Notice, Notifier};
use crate::devices::pci::PciBus;
use crate::devices::virtio::VirtioBus;
use crate::devices::{LegacyDevices, PioResult};
use crate::guest::{Event, abi};
use crate::memory::GuestMem;

/// What a vCPU thread reaches.
pub struct VcpuContext<'a> {
    /// Pause, stop, counters.
    pub control: &'a VcpuControl,
    /// A Linux guest's legacy devices.
    pub legacy: Option<&'a LegacyDevices>,
    /// The PCI bus with vfio-user devices.
    pub pci: Option<&'a PciBus>,
    /// The virtio-mmio devices.
    pub virtio: Option<&'a VirtioBus>,
    /// The VM's interrupt routes (the irq workloads acknowledge level-triggered pins).
    pub irq: &'a Interrupts,
    /// Where to report.
    pub notify: &'a Notifier,
    /// Guest memory (checked for pages lost from a shrunk memory file).
    pub mem: &'a GuestMem,
}

/// The body of vCPU thread `id`: run until stopped, finished or failed; report how it ended.
pub fn vcpu_thread(id: u32, mut vcpu: VcpuFd, ctx: VcpuContext<'_>) {
    let track = &ctx.control.cpus[id as usize];
    // SAFETY: gettid has no preconditions.
    track.tid.store(unsafe { libc::gettid() } as u32, SeqCst);
    if let Err(e) = run(id, &mut vcpu, &ctx) {
        // Whatever the guest did after its memory file shrank (a fault, a triple fault), the
        // cause is the lost memory: say so.
        let e = match ctx.mem.file_lost() {
            Some(source) if !matches!(e, VmError::MemoryLost { .. }) => {
                VmError::MemoryLost { vcpu: id, source }
            }
            _ => e,
        };
        ctx.notify.fail(e);
    }
    track.exited.store(true, SeqCst);
    ctx.notify.send(Notice::Exited(id));
}

thread_local! {
    static IN_RUN: Cell<bool> = const { Cell::new(false) };
    static LOST: Cell<u64> = const { Cell::new(0) };
}

extern "C" fn on_sigbus(_: libc::c_int, info: *mut libc::siginfo_t, _: *mut libc::c_void) {
    if IN_RUN.with(Cell::get) {
        // SAFETY: the kernel passes a valid siginfo to an SA_SIGINFO handler.
        let addr = unsafe { (*info).si_addr() } as u64;
        LOST.with(|l| l.set(addr.max(1)));
        return;
    }
    // Not a vCPU in KVM_RUN: a host thread reading guest memory mapped from a snapshot file
    // that shrank is repaired (and the VM failed, see `memory::file`); anything else is a real
    // bug. Fall back to the default action, which the faulting access, retried on return, then
    // takes.
    // SAFETY: the kernel passes a valid siginfo to an SA_SIGINFO handler.
    let addr = unsafe { (*info).si_addr() } as usize;
    if crate::memory::file::recover_sigbus(addr) {
        return;
    }
    // SAFETY: resetting a signal disposition is async-signal-safe.
    unsafe { libc::signal(libc::SIGBUS, libc::SIG_DFL) };
}

extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

/// Install the process-wide handlers every vCPU thread relies on: the kick signal (which
/// interrupts `KVM_RUN` so a vCPU can park or stop) and the SIGBUS handler that turns a
/// poisoned guest page (a page the fault handler could not produce, so poisoned rather than
/// filled with wrong bytes) into a VM error.
pub fn install_signal_handlers() -> Result<(), VmError> {
    vmm_sys_util::signal::register_signal_handler(super::control::kick_signal(), kick_handler)
        .map_err(|e| VmError::Host {
            what: "the vCPU kick signal handler",
            source: io::Error::from_raw_os_error(e.errno()),
        })?;
    // SAFETY: a zeroed sigaction is valid; we fill handler, flags and an empty mask.
    let mut sa: libc::sigaction = unsafe { std::mem::zeroed() };
    sa.sa_sigaction = on_sigbus as *const () as usize;
    sa.sa_flags = libc::SA_SIGINFO;
    // SAFETY: sa_mask is a valid sigset_t inside `sa`.
    unsafe { libc::sigemptyset(&mut sa.sa_mask) };
    // SAFETY: installs a handler that only touches const-initialised thread-locals.
    if unsafe { libc::sigaction(libc::SIGBUS, &sa, std::ptr::null_mut()) } != 0 {
        return Err(VmError::Host {
            what: "the SIGBUS handler for lost guest pages",
            source: io::Error::last_os_error(),
        });
    }
    Ok(())
}

fn rip(vcpu: &VcpuFd) -> u64 {
    vcpu.get_regs().map(|r| r.rip).unwrap_or(0)
}

/// The built-in guest's port-I/O ABI state of one vCPU.
#[derive(Default)]
struct GuestPorts {
    checksum_lo: u32,
    key: u32,
    log: Vec<u8>,
}

/// What a guest port write asks of the loop.
enum PortAction {
    Continue,
    Finished,
    Failed(VmError),
}

fn run(id: u32, vcpu: &mut VcpuFd, ctx: &VcpuContext<'_>) -> Result<(), VmError> {
    let control = ctx.control;
    let mut ports = GuestPorts::default();
    loop {
        if control.stop_requested() {
            return Ok(());
        }
        if control.pause_requested() && control.park(id, vcpu) {
            return Ok(());
        }
        if ctx.mem.file_page_lost()
            && let Some(source) = ctx.mem.file_lost()
        {
            // A host thread found a page gone from the memory file (and put zeros there so
            // that it could go on): the guest must not run on them.
            return Err(VmError::MemoryLost { vcpu: id, source });
        }
        control.note_first_run();
        IN_RUN.with(|c| c.set(true));
        let r = vcpu.run();
        IN_RUN.with(|c| c.set(false));
        if let Some(hva) = take_lost_page() {
            return Err(VmError::LostPage {
                vcpu: id,
                host_addr: hva,
            });
        }
        let exit = match r {
            Ok(e) => e,
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => continue,
            Err(e) if e.errno() == libc::EFAULT && ctx.mem.file_lost().is_some() => {
                let source = ctx.mem.file_lost().expect("checked just above");
                return Err(VmError::MemoryLost { vcpu: id, source });
            }
            Err(source) => return Err(VmError::Run { vcpu: id, source }),
        };
        control.exits.fetch_add(1, Relaxed);
        match exit {
            VcpuExit::IoOut(port, data) if ctx.legacy.is_some() => {
                if let Some(d) = ctx.legacy
                    && d.pio_write(port, data) == PioResult::Reset
                {
                    ctx.notify.send(Notice::Event(Event::Reset {
                        vcpu: id,
                        t_us: control.now_us(),
                    }));
                    return Ok(());
                }
            }
            VcpuExit::IoIn(port, data) if ctx.legacy.is_some() => {
                if let Some(d) = ctx.legacy
                    && d.pio_read(port, data) == PioResult::Unclaimed
                {
                    data.fill(0xff);
                }
            }
            VcpuExit::IoOut(port, data) if ctx.pci.is_some_and(|p| p.claims_port(port)) => {
                if let Some(p) = ctx.pci {
                    p.pio_write(port, data);
                }
            }
            VcpuExit::IoIn(port, data) if ctx.pci.is_some_and(|p| p.claims_port(port)) => {
                if let Some(p) = ctx.pci {
                    p.pio_read(port, data);
                }
            }
            VcpuExit::MmioRead(addr, data) => {
                if !ctx.virtio.is_some_and(|v| v.mmio(addr, data, false))
                    && !ctx.pci.is_some_and(|p| p.mmio(addr, data, false))
                {
                    data.fill(0xff);
                }
            }
            VcpuExit::MmioWrite(addr, data) => {
                let mut d = [0u8; 8];
                let n = data.len().min(8);
                d[..n].copy_from_slice(&data[..n]);
                if !ctx.virtio.is_some_and(|v| v.mmio(addr, &mut d[..n], true))
                    && let Some(p) = ctx.pci
                {
                    p.mmio(addr, &mut d[..n], true);
                }
            }
            VcpuExit::IoOut(port, data) => {
                // The ABI's ports take at most 4 bytes; copy them out of the run area so the
                // vCPU can be asked for more (its LAPIC) while they are handled.
                let mut b = [0u8; 4];
                let n = data.len().min(4);
                b[..n].copy_from_slice(&data[..n]);
                match guest_port(id, vcpu, ctx, &mut ports, port, &b[..n]) {
                    PortAction::Continue => {}
                    PortAction::Finished => return Ok(()),
                    PortAction::Failed(e) => return Err(e),
                }
            }
            VcpuExit::IoIn(_, data) => data.fill(0xff),
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

/// A write to one of the built-in guest's ports (see [`abi`]).
fn guest_port(
    id: u32,
    vcpu: &VcpuFd,
    ctx: &VcpuContext<'_>,
    ports: &mut GuestPorts,
    port: u16,
    data: &[u8],
) -> PortAction {
    let control = ctx.control;
    let send = |e: Event| ctx.notify.send(Notice::Event(e));
    let mut b = [0u8; 4];
    b[..data.len()].copy_from_slice(data);
    let v = u32::from_le_bytes(b);
    match port {
        abi::PORT_HEARTBEAT => {
            control.cpus[id as usize].heartbeat(v, mono_ns());
            send(Event::Heartbeat {
                vcpu: id,
                n: v,
                t_us: control.now_us(),
            })
        }
        abi::PORT_PHASE if v == abi::PHASE_READY => send(Event::Ready {
            vcpu: id,
            t_us: control.now_us(),
        }),
        abi::PORT_CHECKSUM_LO => ports.checksum_lo = v,
        abi::PORT_KEY => ports.key = v,
        abi::PORT_VALUE => send(Event::Value {
            vcpu: id,
            key: ports.key,
            value: v,
        }),
        abi::PORT_CHECKSUM_HI => send(Event::Checksum {
            vcpu: id,
            value: (u64::from(v) << 32) | u64::from(ports.checksum_lo),
        }),
        abi::PORT_LOG => {
            if data.first() == Some(&b'\n') || ports.log.len() >= 1024 {
                send(Event::Log {
                    vcpu: id,
                    line: String::from_utf8_lossy(&ports.log).into_owned(),
                });
                ports.log.clear();
            } else if let Some(&c) = data.first() {
                ports.log.push(c);
            }
        }
        abi::PORT_IRQ_ACK => {
            if let Err(source) = ctx.irq.set_line(v, false) {
                return PortAction::Failed(VmError::IrqAck { vcpu: id, source });
            }
        }
        abi::PORT_IDLE => {
            control.idle_exits.fetch_add(1, Relaxed);
            std::thread::yield_now();
        }
        abi::PORT_SLEEP_US => control.sleep(Duration::from_micros(u64::from(v.min(1_000_000)))),
        abi::PORT_DONE => {
            if ctx.pci.is_some() {
                report_pending_vectors(id, vcpu, &send);
            }
            send(Event::Done {
                vcpu: id,
                code: v,
                t_us: control.now_us(),
            });
            return PortAction::Finished;
        }
        _ => {} // no device there: writes are dropped, as on real hardware
    }
    PortAction::Continue
}

/// Device MSIs delivered through irqfd wait in the LAPIC's IRR (the built-in guest runs with
/// interrupts off): report each pending vector.
fn report_pending_vectors(id: u32, vcpu: &VcpuFd, send: &impl Fn(Event)) {
    let Ok(lapic) = vcpu.get_lapic() else { return };
    for v in 32..256usize {
        let reg = 0x200 + 0x10 * (v / 32);
        let r = &lapic.regs[reg..reg + 4];
        let word = u32::from_le_bytes([r[0] as u8, r[1] as u8, r[2] as u8, r[3] as u8]);
        if word & (1 << (v % 32)) != 0 {
            send(Event::Value {
                vcpu: id,
                key: abi::KEY_VMM_LAPIC_IRR,
                value: v as u32,
            });
        }
    }
}

/// The host address of a poisoned page this vCPU hit, if any.
fn take_lost_page() -> Option<u64> {
    match LOST.with(|l| l.replace(0)) {
        0 => None,
        a => Some(a),
    }
}
