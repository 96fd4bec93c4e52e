//! Interrupts into the built-in guest: the `irq` workloads (an IDT gate for
//! [`abi::IRQ_VECTOR`], the LAPIC software-enabled, `sti` at CPL 3 with IOPL 3, a handler that
//! stores its arrival TSC and EOIs by an MMIO store to the LAPIC), triggered from the host
//! through every route [`vmm::vstate::Interrupts`] offers.
//!
//! Latency is the guest handler's `rdtsc` at entry minus the host's `rdtsc` just before the
//! trigger: one clock only if the guest's TSC is the host's (it is under PVM, which cannot
//! offset it); every sample is checked to fall between the trigger and the host seeing the
//! handler's count move, and the number that do not is reported.

use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use vmm::guest::abi;
use vmm::vstate::{Interrupts, MsiMessage};
use vmm::{Event, RunningVm, Vm, VmConfig, Workload};
use vmm_sys_util::eventfd::EventFd;

use super::{IrqBenchError, Line, Out, host, line};

/// A route from the host into the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GuestPath {
    /// `KVM_IRQ_LINE` up then down on an edge-triggered IOAPIC pin.
    IrqLine,
    /// `KVM_IRQ_LINE` up on a level-triggered pin; the handler acknowledges it through a port
    /// (the VMM lowers the line: one exit to userspace) before its EOI.
    IrqLineLevel,
    /// An eventfd bound by `KVM_IRQFD` to an edge-triggered IOAPIC pin.
    IrqfdIoapic,
    /// An eventfd bound to a level-triggered pin with a resample eventfd: KVM lowers the line
    /// at the EOI and signals the resample eventfd, which the device drains.
    IrqfdResample,
    /// An eventfd bound to an MSI route.
    IrqfdMsi,
    /// `KVM_SIGNAL_MSI`.
    SignalMsi,
}

// IOAPIC-only pins: GSIs below 16 also reach KVM's (uninitialised) 8259 PIC, whose vector
// base 0 would deliver pin n as vector n through the BSP's LINT0 (ExtINT after reset).
const PIN_EDGE: u32 = 16;
const PIN_LEVEL: u32 = 17;
const PIN_IRQFD: u32 = 18;
const PIN_RESAMPLE: u32 = 19;
const DELIVERY_DEADLINE: Duration = Duration::from_secs(1);

impl GuestPath {
    /// Every path, in output order.
    pub const ALL: [GuestPath; 6] = [
        GuestPath::IrqLine,
        GuestPath::IrqLineLevel,
        GuestPath::IrqfdIoapic,
        GuestPath::IrqfdResample,
        GuestPath::IrqfdMsi,
        GuestPath::SignalMsi,
    ];

    /// The `path` of its JSON lines.
    pub fn name(self) -> &'static str {
        match self {
            GuestPath::IrqLine => "guest-irq-line",
            GuestPath::IrqLineLevel => "guest-irq-line-level",
            GuestPath::IrqfdIoapic => "guest-irqfd-ioapic",
            GuestPath::IrqfdResample => "guest-irqfd-resample",
            GuestPath::IrqfdMsi => "guest-irqfd-msi",
            GuestPath::SignalMsi => "guest-signal-msi",
        }
    }
}

fn irq_err(what: &'static str) -> impl FnOnce(vmm::vstate::IrqError) -> IrqBenchError {
    move |e| IrqBenchError::Guest {
        what,
        source: Box::new(e),
    }
}

fn efd() -> Result<EventFd, IrqBenchError> {
    EventFd::new(libc::EFD_NONBLOCK).map_err(|source| IrqBenchError::Sys {
        what: "eventfd",
        source,
    })
}

/// A path set up on a VM: what its trigger needs.
struct Trigger<'a> {
    path: GuestPath,
    irq: &'a Interrupts,
    efd: Option<EventFd>,
    resample: Option<EventFd>,
    gsi: u32,
    resampled: u64,
}

impl<'a> Trigger<'a> {
    fn new(path: GuestPath, irq: &'a Interrupts) -> Result<Trigger<'a>, IrqBenchError> {
        let v = abi::IRQ_VECTOR;
        let mut t = Trigger {
            path,
            irq,
            efd: None,
            resample: None,
            gsi: 0,
            resampled: 0,
        };
        match path {
            GuestPath::IrqLine => irq
                .route_pin(PIN_EDGE, v, false, 0)
                .map_err(irq_err("routing the edge pin"))?,
            GuestPath::IrqLineLevel => irq
                .route_pin(PIN_LEVEL, v, true, 0)
                .map_err(irq_err("routing the level pin"))?,
            GuestPath::IrqfdIoapic => {
                irq.route_pin(PIN_IRQFD, v, false, 0)
                    .map_err(irq_err("routing the irqfd pin"))?;
                let e = efd()?;
                irq.register_irqfd(&e, PIN_IRQFD)
                    .map_err(irq_err("KVM_IRQFD on an IOAPIC pin"))?;
                t.efd = Some(e);
                t.gsi = PIN_IRQFD;
            }
            GuestPath::IrqfdResample => {
                irq.route_pin(PIN_RESAMPLE, v, true, 0)
                    .map_err(irq_err("routing the resample pin"))?;
                let (e, r) = (efd()?, efd()?);
                irq.register_irqfd_resample(&e, &r, PIN_RESAMPLE)
                    .map_err(irq_err("KVM_IRQFD with resample"))?;
                t.efd = Some(e);
                t.resample = Some(r);
                t.gsi = PIN_RESAMPLE;
            }
            GuestPath::IrqfdMsi => {
                let gsi = irq
                    .allocate_msi_gsis(1)
                    .map_err(irq_err("allocating an MSI GSI"))?;
                irq.set_msi_route(gsi, MsiMessage::fixed(0, v))
                    .map_err(irq_err("routing the MSI"))?;
                let e = efd()?;
                irq.register_irqfd(&e, gsi)
                    .map_err(irq_err("KVM_IRQFD on an MSI route"))?;
                t.efd = Some(e);
                t.gsi = gsi;
            }
            GuestPath::SignalMsi => {}
        }
        Ok(t)
    }

    fn fire(&self) -> Result<(), IrqBenchError> {
        match self.path {
            GuestPath::IrqLine => {
                self.irq
                    .set_line(PIN_EDGE, true)
                    .map_err(irq_err("KVM_IRQ_LINE"))?;
                self.irq
                    .set_line(PIN_EDGE, false)
                    .map_err(irq_err("KVM_IRQ_LINE"))
            }
            GuestPath::IrqLineLevel => self
                .irq
                .set_line(PIN_LEVEL, true)
                .map_err(irq_err("KVM_IRQ_LINE")),
            GuestPath::SignalMsi => self
                .irq
                .signal_msi(MsiMessage::fixed(0, abi::IRQ_VECTOR))
                .map(drop)
                .map_err(irq_err("KVM_SIGNAL_MSI")),
            _ => self
                .efd
                .as_ref()
                .expect("eventfd paths have their eventfd")
                .write(1)
                .map_err(|source| IrqBenchError::Sys {
                    what: "eventfd write (irqfd)",
                    source,
                }),
        }
    }

    /// After a delivery: drain the resample eventfd (KVM signals it at the EOI).
    fn after(&mut self) {
        if let Some(r) = &self.resample
            && let Ok(n) = r.read()
        {
            self.resampled += n;
        }
    }
}

impl Drop for Trigger<'_> {
    fn drop(&mut self) {
        if let Some(e) = &self.efd {
            let _ = self.irq.unregister_irqfd(e, self.gsi);
        }
    }
}

fn rdtsc() -> u64 {
    // SAFETY: rdtsc has no preconditions on x86-64.
    unsafe { core::arch::x86_64::_rdtsc() }
}

/// The irq workloads' shared words in guest memory.
struct Area {
    base: *mut u64,
}

impl Area {
    fn word(&self, i: usize) -> u64 {
        // SAFETY: IRQ_AREA + 8 i (i < 3) lies in guest memory, mapped for the VM's life (the
        // caller holds the VM); an aligned volatile read of a word the guest writes.
        unsafe { self.base.add(i).read_volatile() }
    }

    fn set(&self, i: usize, v: u64) {
        // SAFETY: as in `word`; an aligned volatile store the guest's handler reads.
        unsafe { self.base.add(i).write_volatile(v) }
    }
}

/// What one guest run measured.
struct Measured {
    us: Vec<f64>,
    exits: f64,
    kvm_exits: Option<f64>,
    clock_misses: usize,
    resampled: u64,
    /// Handler runs and triggers (they differ if a line fires again after its EOI).
    handled: u64,
    triggers: u64,
}

/// What the guest said after a delivery failed: an exception its reporters caught (vector,
/// frame words), or the vCPU's failure.
fn guest_report(running: &mut RunningVm) -> String {
    let mut s = String::new();
    while let Some(r) = running.next_event(Duration::from_millis(100)).transpose() {
        match r {
            Ok(Event::Value { key, value, .. }) if key == abi::KEY_EXCEPTION => {
                s.push_str(&format!("; the guest took exception {value}"))
            }
            Ok(Event::Value { key, value, .. }) if key == abi::KEY_EXCEPTION_FRAME => {
                s.push_str(&format!(", frame word {value:#x}"))
            }
            Ok(Event::Done { code, .. }) => {
                s.push_str(&format!("; the guest stopped (DONE {code:#x})"));
                break;
            }
            Ok(_) => {}
            Err(e) => {
                s.push_str(&format!("; the vCPU failed: {}", super::error_chain(&e)));
                break;
            }
        }
    }
    s
}

/// The vCPU's RIP and whether the irq vector is in its LAPIC's ISR / IRR (paused to read).
fn lapic_report(running: &RunningVm) -> String {
    let m = running.machine();
    if !m.all_running() {
        return String::new();
    }
    running.pause();
    let st = m.save_state();
    running.resume();
    match st {
        Ok((_, v)) => {
            let Some(cpu) = v.first() else {
                return String::new();
            };
            let bit = |base: usize| {
                cpu.lapic.as_ref().map(|l| {
                    let v = usize::from(abi::IRQ_VECTOR);
                    let at = base + 0x10 * (v / 32);
                    let w = u32::from_le_bytes([
                        l.regs[at] as u8,
                        l.regs[at + 1] as u8,
                        l.regs[at + 2] as u8,
                        l.regs[at + 3] as u8,
                    ]);
                    w & (1 << (v % 32)) != 0
                })
            };
            format!(
                "; the vCPU is at RIP {:#x} (CS {:#x}, RFLAGS {:#x}); vector {:#x} in the \
                 LAPIC's ISR: {:?}, IRR: {:?}",
                cpu.regs.rip,
                cpu.sregs.cs.selector,
                cpu.regs.rflags,
                abi::IRQ_VECTOR,
                bit(0x100),
                bit(0x200)
            )
        }
        Err(e) => format!("; its state could not be read: {}", super::error_chain(&e)),
    }
}

fn spin_for(ticks: u64) {
    let t = rdtsc();
    while rdtsc().wrapping_sub(t) < ticks {
        std::hint::spin_loop();
    }
}

#[allow(clippy::too_many_arguments)]
fn measure(
    running: &mut RunningVm,
    area: &Area,
    stats: Option<&vmm::vstate::KvmStats>,
    khz: u64,
    path: GuestPath,
    irqs: usize,
    yield_in_poll: bool,
) -> Result<Measured, IrqBenchError> {
    let machine = running.machine().clone();
    let irq = machine.interrupts();
    let mut t = Trigger::new(path, irq)?;
    area.set(
        2,
        if path == GuestPath::IrqLineLevel {
            u64::from(PIN_LEVEL) + 1
        } else {
            0
        },
    );
    let warmup = irqs / 20 + 5;
    let mut us = Vec::with_capacity(irqs);
    let mut clock_misses = 0;
    let (mut e0, mut k0) = (0, None);
    let deadline_ticks = khz * DELIVERY_DEADLINE.as_millis() as u64;
    let exits_at_start = machine.control().exits.load(Relaxed);
    let handled_at_start = area.word(0);
    for i in 0..warmup + irqs {
        if i == warmup {
            e0 = machine.control().exits.load(Relaxed);
            k0 = stats.and_then(|s| s.read("exits").ok());
        }
        let c0 = area.word(0);
        let t0 = rdtsc();
        t.fire()?;
        loop {
            if area.word(0) != c0 {
                break;
            }
            if rdtsc().wrapping_sub(t0) > deadline_ticks {
                let why = format!(
                    "interrupt {i} did not reach the handler within {DELIVERY_DEADLINE:?} \
                     ({c0} delivered before, {} exits to userspace on this path){}",
                    machine.control().exits.load(Relaxed) - exits_at_start,
                    guest_report(running) + &lapic_report(running)
                );
                return Err(IrqBenchError::NotDelivered {
                    path: path.name(),
                    why,
                });
            }
            if yield_in_poll {
                std::thread::yield_now();
            } else {
                std::hint::spin_loop();
            }
        }
        let t1 = rdtsc();
        let tg = area.word(1);
        if i >= warmup {
            if tg < t0 || tg > t1 {
                clock_misses += 1;
            }
            us.push(tg.wrapping_sub(t0) as i64 as f64 * 1000.0 / khz as f64);
        }
        // Let the handler return (its pops and iretq) before the next trigger.
        spin_for(khz / 20);
        t.after();
    }
    let n = irqs.max(1) as f64;
    let exits = (machine.control().exits.load(Relaxed) - e0) as f64 / n;
    let kvm_exits = match (stats, k0) {
        (Some(s), Some(k0)) => s.read("exits").ok().map(|k| (k - k0) as f64 / n),
        _ => None,
    };
    Ok(Measured {
        us,
        exits,
        kvm_exits,
        clock_misses,
        resampled: t.resampled,
        handled: area.word(0) - handled_at_start,
        triggers: (warmup + irqs) as u64,
    })
}

/// A guest booted for one path: running, ready (past its prologue), its vCPU pinned.
struct Booted {
    running: RunningVm,
    stats: Option<vmm::vstate::KvmStats>,
    khz: u64,
    area: Area,
}

fn guest_err<E: std::error::Error + Send + Sync + 'static>(
    what: &'static str,
) -> impl FnOnce(E) -> IrqBenchError {
    move |e| IrqBenchError::Guest {
        what,
        source: Box::new(e),
    }
}

/// Boot the irq workload with the handler at `cpl`; `Ok(Err(why))` if it never got ready.
fn boot(cpl: u8, vcpu_cpu: usize) -> Result<Result<Booted, String>, IrqBenchError> {
    let workload = if cpl == 3 {
        Workload::Irq
    } else {
        Workload::IrqCpl0
    };
    let vm = Vm::new(VmConfig {
        mem_bytes: 64 << 20,
        vcpus: 1,
        workload,
        irqchip: true,
        ..VmConfig::default()
    })
    .map_err(guest_err("creating the VM"))?;
    let stats = vm.vcpu_stats(0).map_err(guest_err("KVM_GET_STATS_FD"))?;
    let khz = u64::from(vm.tsc_khz().map_err(guest_err("KVM_GET_TSC_KHZ"))?);
    let mut running = vm.start().map_err(guest_err("starting the VM"))?;
    // The workload's prologue (native CPL 3), then the ready phase.
    let ready = loop {
        match running.next_event(Duration::from_secs(10)) {
            Ok(Some(Event::Ready { .. })) => break Ok(()),
            Ok(Some(_)) => {}
            Ok(None) => break Err("the guest did not report ready within 10 s".to_string()),
            Err(e) => break Err(format!("the vCPU failed: {}", super::error_chain(&e))),
        }
    };
    if let Err(why) = ready {
        running.stop();
        return Ok(Err(why));
    }
    let machine = running.machine().clone();
    let tid = machine.control().cpus[0].tid.load(Relaxed);
    host::pin_thread(tid as i32, vcpu_cpu)?;
    let area = Area {
        // Guest memory is one mapping from guest-physical 0, alive as long as `running`.
        base: machine
            .memory()
            .host_addr()
            .wrapping_add(abi::IRQ_AREA as usize)
            .cast(),
    };
    Ok(Ok(Booted {
        running,
        stats,
        khz,
        area,
    }))
}

/// One path measured once, on a VM of its own: `Ok(Err(why))` if it delivered nothing.
fn run_path(
    cpl: u8,
    p: GuestPath,
    irqs: usize,
    vcpu_cpu: usize,
    trigger_cpu: usize,
) -> Result<Result<(Measured, bool), String>, IrqBenchError> {
    let mut b = match boot(cpl, vcpu_cpu)? {
        Ok(b) => b,
        Err(why) => return Ok(Err(why)),
    };
    let has_stats = b.stats.is_some();
    let m = measure(
        &mut b.running,
        &b.area,
        b.stats.as_ref(),
        b.khz,
        p,
        irqs,
        vcpu_cpu == trigger_cpu,
    );
    b.running.stop();
    match m {
        Ok(m) => Ok(Ok((m, has_stats))),
        Err(IrqBenchError::NotDelivered { why, .. }) => Ok(Err(why)),
        Err(e) => Err(e),
    }
}

/// Run every guest path with the handler at `cpl` (3 or 0), `irqs` interrupts each, `runs`
/// times, each run on a VM of its own, the vCPU pinned to `vcpu_cpu` and the triggering
/// thread to `trigger_cpu` (`placement` names the pair). Reports a line per path (each
/// statistic the median over the runs that delivered), or why it is unavailable, and the
/// clock check.
pub fn run_guest(
    cpl: u8,
    irqs: usize,
    runs: usize,
    placement: &'static str,
    vcpu_cpu: usize,
    trigger_cpu: usize,
    f: &mut dyn FnMut(Out),
) -> Result<(), IrqBenchError> {
    let handler = format!("cpl{cpl}");
    let unavailable = |f: &mut dyn FnMut(Out), path: &str, reason: String| {
        f(Out::Unavailable {
            path: format!("{path} ({handler} handler)"),
            placement: placement.into(),
            reason,
        })
    };
    let all = host::allowed_cpus();
    host::pin(trigger_cpu)?;
    let r = (|| -> Result<(usize, usize), IrqBenchError> {
        let mut clock_misses = 0;
        let mut samples = 0;
        let mut said_no_stats = false;
        for p in GuestPath::ALL {
            let mut lines = Vec::new();
            let mut failures = Vec::new();
            let (mut handled, mut triggers, mut resampled) = (0, 0, 0);
            for _ in 0..runs.max(1) {
                let (m, has_stats) = match run_path(cpl, p, irqs, vcpu_cpu, trigger_cpu)? {
                    Ok(x) => x,
                    Err(why) => {
                        failures.push(why);
                        continue;
                    }
                };
                if !has_stats && !said_no_stats {
                    said_no_stats = true;
                    unavailable(
                        f,
                        "kvm-exits",
                        "this KVM has no binary stats (KVM_GET_STATS_FD failed)".into(),
                    );
                }
                clock_misses += m.clock_misses;
                samples += m.us.len();
                handled += m.handled;
                triggers += m.triggers;
                resampled += m.resampled;
                let mut l: Line = line(p.name(), placement, "faultline", m.us, m.exits);
                l.handler = Some(handler.clone());
                l.kvm_exits_per_irq = m.kvm_exits;
                lines.push(l);
            }
            if lines.is_empty() {
                unavailable(f, p.name(), failures.swap_remove(0));
                continue;
            }
            if !failures.is_empty() {
                f(Out::Probe {
                    what: format!("{} ({handler} handler, {placement}): failed runs", p.name()),
                    value: format!(
                        "{} of {} runs delivered nothing: {}",
                        failures.len(),
                        runs.max(1),
                        failures[0]
                    ),
                });
            }
            if handled != triggers {
                f(Out::Probe {
                    what: format!(
                        "{} ({handler} handler, {placement}): handler runs",
                        p.name()
                    ),
                    value: format!("{handled} for {triggers} triggers"),
                });
            }
            if p == GuestPath::IrqfdResample && resampled == 0 {
                unavailable(
                    f,
                    p.name(),
                    "delivered, but KVM never signalled the resample eventfd".into(),
                );
            }
            f(Out::Line(super::median_line(&lines)));
        }
        Ok((clock_misses, samples))
    })();
    host::pin_set(&all)?;
    let (clock_misses, samples) = r?;
    f(Out::Probe {
        what: format!("guest-tsc-is-host-tsc ({handler} handler, {placement})"),
        value: format!(
            "{} of {samples} arrivals fell between the host's trigger and its observation",
            samples - clock_misses
        ),
    });
    Ok(())
}

/// Posted interrupts / APIC virtualization, by the host's KVM module parameters.
pub fn probe_apicv() -> Vec<Out> {
    [
        "/sys/module/kvm_intel/parameters/enable_apicv",
        "/sys/module/kvm_amd/parameters/avic",
        "/sys/module/kvm_amd/parameters/enable_apicv",
    ]
    .into_iter()
    .map(|p| Out::Probe {
        what: p.into(),
        value: match std::fs::read_to_string(p) {
            Ok(v) => v.trim().to_string(),
            Err(e) => format!("unavailable ({e})"),
        },
    })
    .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Run the guest paths for `cpl` with a few interrupts; return lines and unavailable paths.
    fn short(cpl: u8) -> (Vec<Line>, Vec<String>, Vec<String>) {
        let cpus = host::allowed_cpus();
        let (vcpu, trig) = (cpus[0], *cpus.get(1).unwrap_or(&cpus[0]));
        let mut outs = Vec::new();
        run_guest(cpl, 20, 1, "test", vcpu, trig, &mut |o| outs.push(o)).unwrap();
        let (mut lines, mut missing, mut probes) = (Vec::new(), Vec::new(), Vec::new());
        for o in outs {
            match o {
                Out::Line(l) => lines.push(l),
                Out::Unavailable { path, reason, .. } => missing.push(format!("{path}: {reason}")),
                Out::Probe { what, value } => probes.push(format!("{what}: {value}")),
            }
        }
        (lines, missing, probes)
    }

    fn check_delivered(l: &Line) {
        assert_eq!(l.samples, 20, "{}", l.path);
        assert!(l.p50_us > 0.0, "{}: {}", l.path, l.p50_us);
        // KVM's count has at least the exit that injected the interrupt.
        if let Some(k) = l.kvm_exits_per_irq {
            assert!(k >= 1.0, "{}: {k} KVM exits per interrupt", l.path);
        }
        if l.path == GuestPath::IrqLineLevel.name() {
            assert!(l.exits_per_irq >= 1.0, "the level acknowledgement exits");
        }
    }

    #[test]
    fn every_guest_path_delivers_to_a_cpl0_handler_with_exits_counted() {
        let (lines, missing, probes) = short(0);
        assert!(
            missing.iter().all(|m| m.starts_with("kvm-exits")),
            "{missing:?}"
        );
        assert_eq!(lines.len(), GuestPath::ALL.len(), "{missing:?}");
        for (l, p) in lines.iter().zip(GuestPath::ALL) {
            assert_eq!(l.path, p.name());
            assert_eq!(l.handler.as_deref(), Some("cpl0"));
            check_delivered(l);
        }
        let clock: Vec<&String> = probes.iter().filter(|p| p.contains("arrivals")).collect();
        assert_eq!(clock.len(), 1, "{probes:?}");
        assert!(clock[0].contains(" of 120 arrivals"), "{probes:?}");
        // Every handler run is accounted for: only the level-triggered KVM_IRQ_LINE path
        // may run its handler more than once per trigger (under PVM it does: README,
        // "Choosing an interrupt path"), and it says so.
        for p in probes.iter().filter(|p| p.contains("handler runs")) {
            assert!(p.starts_with("guest-irq-line-level "), "{p}");
            assert!(p.ends_with("for 26 triggers"), "{p}");
        }
    }

    #[test]
    fn cpl3_handler_paths_deliver_or_are_reported_unavailable() {
        let (lines, missing, _) = short(3);
        for p in GuestPath::ALL {
            let delivered = lines.iter().find(|l| l.path == p.name());
            let reported = missing.iter().any(|m| m.starts_with(p.name()));
            assert!(
                delivered.is_some() || reported,
                "{} neither delivered nor reported",
                p.name()
            );
            if let Some(l) = delivered {
                check_delivered(l);
            }
        }
        // Edge and MSI paths need no acknowledgement: they deliver at CPL 3 here.
        for p in [
            GuestPath::IrqLine,
            GuestPath::IrqfdMsi,
            GuestPath::SignalMsi,
        ] {
            assert!(
                lines.iter().any(|l| l.path == p.name()),
                "{}: {missing:?}",
                p.name()
            );
        }
    }
}
