//! The receiving side: `faultline run --incoming`. Builds the VM from the stream, starts it at
//! switchover, and (post-copy) serves its faults from the source until every page is in:
//! `xfer` checks and applies the pre-copy frames and pulls the rest into a `memx` fault loop
//! (see [`super::supervisor`]).

use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use memx::{FaultLoop, Region};
use uffd::Range;
use xfer::bitmap::{bytes_to_words, runs, words_for};
use xfer::precopy::Precopied;
use xfer::proto::{self, Channel, Hello, MigrationMode};
use xfer::pull::Pull;
use xfer::wire::{FrameError, HEADER, Header, Kind, Listener, PAGE, RecvError, Sock};

use super::supervisor::Supervisor;
use super::{
    Endpoint, Migration, MigrationError, Role, State, Status, Switch, fail, io_err, peer_text,
    pull_err, refuse,
};
use crate::config::VirtioSpec;
use crate::config::VmConfig;
use crate::guest::Workload;
use crate::memory::{Backend, GuestMem};
use crate::vstate::control::mono_ns;
use crate::vstate::kvm::create_vm;
use crate::vstate::machine::{Parts, build_devices, build_vcpus};
use crate::vstate::{Notifier, PauseOwner, VcpuControl, Vm, VmError};

/// `faultline run --incoming` options.
#[derive(Debug, Clone)]
pub struct IncomingOptions {
    /// Where to listen.
    pub listen: Endpoint,
    /// Run the guest's `verify` at switchover instead of resuming, and compare its checksums
    /// with the source's.
    pub verify: bool,
    /// How long to wait for a source to connect.
    pub accept_timeout: Duration,
    /// After a lost link during post-copy, how long to wait for the source to reconnect.
    pub recover_timeout: Duration,
    /// TLS credentials ([`xfer::tls`]); required on TCP unless `insecure`.
    pub tls: Option<xfer::tls::Credentials>,
    /// Accept plain TCP (no authentication, no encryption).
    pub insecure: bool,
    /// The backends of the source VM's virtio devices, named here as `run` takes them:
    /// the same kinds in the same order (`config::rebind_virtio`); checked before the hello
    /// is answered.
    pub virtio: Vec<crate::config::VirtioSpec>,
    /// Where a Linux guest's console goes here (a file, or stdout).
    pub console: Option<std::path::PathBuf>,
    /// The servers of the source VM's vfio-user devices, started here: one for each, in
    /// the same order; attached before the hello is answered, given their state at the
    /// switchover.
    pub vfio_user: Vec<std::path::PathBuf>,
}

impl Default for IncomingOptions {
    fn default() -> Self {
        Self {
            listen: Endpoint::Tcp("127.0.0.1:7777".into()),
            verify: false,
            accept_timeout: Duration::from_secs(3600),
            recover_timeout: Duration::from_secs(60),
            tls: None,
            insecure: false,
            virtio: Vec::new(),
            console: None,
            vfio_user: Vec::new(),
        }
    }
}

/// No frame for this long before switchover: the source is gone.
const STREAM_TIMEOUT: Duration = Duration::from_secs(60);

fn protocol(s: impl Into<String>) -> MigrationError {
    MigrationError::Protocol(s.into())
}

fn check_config(
    h: &Hello,
    backends: &[VirtioSpec],
    servers: &[std::path::PathBuf],
) -> Result<VmConfig, MigrationError> {
    if h.channel != Channel::Main {
        return Err(protocol(format!(
            "expected the main channel first, got {:?}",
            h.channel
        )));
    }
    if h.resume {
        return Err(protocol(
            "a resume, but no post-copy migration is waiting here".to_string(),
        ));
    }
    let config = h
        .config
        .clone()
        .ok_or_else(|| protocol("the hello has no VM configuration"))?;
    let mut cfg: VmConfig =
        serde_json::from_value(config).map_err(|source| MigrationError::Json {
            what: "VM configuration in the hello",
            source,
        })?;
    if cfg.mem_bytes % (2 << 20) != 0 || cfg.mem_bytes == 0 {
        return Err(MigrationError::Config(
            crate::config::ConfigError::MemAlignment(cfg.mem_bytes),
        ));
    }
    cfg.vfio_user =
        crate::config::rebind_vfio_user(&cfg.vfio_user, servers).map_err(MigrationError::Config)?;

    if cfg.linux.is_none() {
        cfg.check_builtin().map_err(MigrationError::Config)?;
        cfg.slices().map_err(MigrationError::Config)?;
    }
    cfg.virtio =
        crate::config::rebind_virtio(&cfg.virtio, backends).map_err(MigrationError::Config)?;
    // vfio-user devices map a pre-copy destination's memory (a memfd: every page is here
    // before they run); post-copy memory reaches them through messages the VMM serves.
    cfg.backend = if !cfg.vfio_user.is_empty() && h.mode == MigrationMode::Precopy {
        Backend::Memfd
    } else {
        Backend::Anonymous
    };
    Ok(cfg)
}

/// Check the hello's VM and prepare its memory, KVM VM and devices (before the hello is
/// answered, so a refusal leaves nothing behind).
fn prepare(
    h: &Hello,
    backends: &[VirtioSpec],
    servers: &[std::path::PathBuf],
) -> Result<(VmConfig, Parts), MigrationError> {
    let cfg = check_config(h, backends, servers)?;
    let t0 = Instant::now();
    let mem = Arc::new(
        GuestMem::new(cfg.mem_bytes, cfg.backend)
            .map_err(|e| MigrationError::Vm(VmError::Memory(e)))?,
    );
    let (kvm, vm, irqchip) =
        create_vm(&mem, h.irqchip, false).map_err(|e| MigrationError::Vm(e.into()))?;
    if irqchip != h.irqchip {
        return Err(MigrationError::Invalid(
            "the source VM has an in-kernel irqchip, which this host's KVM does not offer".into(),
        ));
    }
    // The devices' backends are opened now: one missing refuses the hello, and none is
    // opened in the downtime.
    let vm = Arc::new(vm);
    let built = build_devices(&vm, irqchip, &mem, &cfg).map_err(MigrationError::Vm)?;
    let parts = Parts {
        kvm,
        vm,
        built: Some(built),
        irqchip,
        mem,
        vcpus: Vec::new(),
        cfg: VmConfig::default(),
        t0,
        last_heartbeat: Vec::new(),
        devices: Default::default(),
    };
    Ok((cfg, parts))
}

/// An incoming migration whose guest runs here: post-copy (if any) goes on in the background
/// on its own thread, visible through [`Status`].
pub struct Incoming {
    /// The migration's status and thread, for the VM's controller.
    pub(crate) migration: Migration,
}

/// Wait for a source, receive the VM and start it with `start` (which launches the vCPUs and
/// returns their control); failures after that are reported to `notify`. Returns once the
/// guest runs here.
pub fn incoming(
    opts: &IncomingOptions,
    notify: Notifier,
    start: impl FnOnce(Vm) -> Result<Arc<VcpuControl>, VmError>,
) -> Result<Incoming, MigrationError> {
    let security = opts
        .listen
        .security(opts.tls.as_ref(), opts.insecure)
        .map_err(MigrationError::Security)?;
    let listener = opts
        .listen
        .listen()
        .map_err(io_err(format!("listening on {}", opts.listen)))?;
    let mut prepared = None;
    let accepted = proto::accept_pair(&listener, &security, opts.accept_timeout, |h| {
        super::failpoint::hold("dest-hello");
        let r = prepare(h, &opts.virtio, &opts.vfio_user).map(|(mut cfg, parts)| {
            cfg.console = opts.console.clone();
            (cfg, parts)
        });
        let answer = match &r {
            Ok(_) => Ok(opts.verify),
            Err(e) => Err(uffd::error_chain(e)),
        };
        prepared = Some(r);
        answer
    });
    let ((main, prio, hello), (cfg, parts)) = match (accepted, prepared) {
        (Ok(a), Some(Ok(p))) => (a, p),
        // The hello was refused for a reason of ours: report it as such.
        (Err(_), Some(Err(e))) => return Err(e),
        (Err(e), _) => return Err(MigrationError::Handshake(e)),
        (Ok(_), _) => {
            return Err(protocol("the hello was accepted but nothing was prepared"));
        }
    };
    let status = Status::new(Role::Destination, Some(hello.mode));
    let thread = receive(
        opts, listener, security, main, prio, &hello, cfg, parts, &status, notify, start,
    )?;
    Ok(Incoming {
        migration: Migration {
            status,
            resume: None,
            thread: Some(thread),
        },
    })
}

/// Drop what pre-copy put in pages that changed since (they come again, through the fault
/// loop).
fn discard(mem: &GuestMem, needed: &[u64]) -> Result<(), MigrationError> {
    let base = mem.host_addr() as usize;
    for (p, n) in runs(needed) {
        // SAFETY: inside guest memory (the bitmap was checked against its pages); no vCPU runs
        // yet, so nothing uses these pages.
        let r = unsafe {
            libc::madvise(
                (base + (p * PAGE) as usize) as *mut libc::c_void,
                (n * PAGE) as usize,
                libc::MADV_DONTNEED,
            )
        };
        if r != 0 {
            return Err(MigrationError::Io {
                what: "discarding stale pages (MADV_DONTNEED)".into(),
                source: std::io::Error::last_os_error(),
            });
        }
    }
    Ok(())
}

/// What came before the `State` frame.
struct Received {
    sw: Switch,
    /// Post-copy: the pages still at the source.
    needed: Option<Vec<u64>>,
    pre: Precopied,
    bytes: u64,
}

/// Read a frame; with CRC32C trailers negotiated, the frames that carry memory or state must
/// have one (verified by the read).
fn recv_checked(main: &mut Sock, buf: &mut Vec<u8>, crc: bool) -> Result<Header, RecvError> {
    let (h, checked) = main.recv_checked(buf)?;
    let must = matches!(
        h.kind,
        Kind::Pages | Kind::Zero | Kind::Switch | Kind::Needed | Kind::State
    );
    if crc && must && !checked {
        return Err(RecvError::Frame(FrameError::Unchecked(h.kind)));
    }
    Ok(h)
}

/// Receive pre-copy rounds up to the switchover: pages go straight into memory (nothing runs
/// yet), every frame checked.
fn precopy(
    main: &mut Sock,
    mem: &GuestMem,
    cfg: &VmConfig,
    status: &Status,
    crc: bool,
) -> Result<Received, MigrationError> {
    let pages = mem.size() / PAGE;
    let mut pre = Precopied::new(pages);
    let mut bytes = 0u64;
    let mut buf = Vec::new();
    loop {
        let h = match recv_checked(main, &mut buf, crc) {
            Ok(h) => h,
            Err(e @ (RecvError::Frame(_) | RecvError::Checksum { .. })) => {
                return Err(refuse(main, MigrationError::BeforeSwitchover(e)));
            }
            Err(e) => return Err(MigrationError::BeforeSwitchover(e)),
        };
        bytes += u64::from(h.len) + HEADER as u64;
        match h.kind {
            Kind::Round => {
                if status.state() == State::Setup {
                    status
                        .go(State::Precopy)
                        .map_err(MigrationError::Transition)?;
                }
            }
            Kind::Pages | Kind::Zero => {
                let mut wrote = Ok(());
                pre.apply(&h, &buf, |p, data| {
                    if wrote.is_ok() {
                        wrote = mem.write(p * PAGE, data);
                    }
                })
                .map_err(|e| refuse(main, pull_err(e)))?;
                wrote.map_err(|e| refuse(main, MigrationError::GuestMemory(e)))?;
            }
            Kind::Switch => {
                let sw: Switch = serde_json::from_slice(&buf).map_err(|source| {
                    refuse(
                        main,
                        MigrationError::Json {
                            what: "Switch frame",
                            source,
                        },
                    )
                })?;
                if sw.heartbeats.len() != cfg.vcpus as usize {
                    return Err(refuse(
                        main,
                        protocol("Switch names the wrong number of vCPUs"),
                    ));
                }
                let needed =
                    if sw.postcopy {
                        let h = recv_checked(main, &mut buf, crc)
                            .map_err(|e| refuse(main, MigrationError::BeforeSwitchover(e)))?;
                        if h.kind != Kind::Needed {
                            return Err(refuse(main, protocol("expected the Needed bitmap")));
                        }
                        bytes += u64::from(h.len) + HEADER as u64;
                        Some(bytes_to_words(&buf, pages).ok_or_else(|| {
                            refuse(main, protocol("Needed bitmap of the wrong size"))
                        })?)
                    } else {
                        None
                    };
                return Ok(Received {
                    sw,
                    needed,
                    pre,
                    bytes,
                });
            }
            Kind::Cancel => {
                return Err(MigrationError::Cancelled(peer_text(&buf)));
            }
            Kind::Error => {
                return Err(MigrationError::Peer(peer_text(&buf)));
            }
            k => {
                return Err(refuse(
                    main,
                    protocol(format!("unexpected {k:?} frame before switchover")),
                ));
            }
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn receive(
    opts: &IncomingOptions,
    listener: Listener,
    security: xfer::tls::Security,
    mut main: Sock,
    prio: Sock,
    hello: &Hello,
    mut cfg: VmConfig,
    mut parts: Parts,
    status: &Status,
    notify: Notifier,
    start: impl FnOnce(Vm) -> Result<Arc<VcpuControl>, VmError>,
) -> Result<thread::JoinHandle<()>, MigrationError> {
    let mem = parts.mem.clone();
    let pages = mem.size() / PAGE;
    main.set_read_timeout(Some(STREAM_TIMEOUT))
        .map_err(io_err("socket setup"))?;
    let crc = hello.crc32c;
    let mut rx = precopy(&mut main, &mem, &cfg, status, crc)?;
    status
        .go(State::Switchover)
        .map_err(MigrationError::Transition)?;
    let mut buf = Vec::new();
    let h = recv_checked(&mut main, &mut buf, crc)
        .map_err(|e| refuse(&mut main, MigrationError::BeforeSwitchover(e)))?;
    if h.kind != Kind::State {
        return Err(refuse(&mut main, protocol("expected the State frame")));
    }
    super::failpoint::hold("dest-state");
    let bytes = rx.bytes + u64::from(h.len) + HEADER as u64;
    let switch_t = Instant::now();
    let step = |what: &str| {
        tracing::debug!(
            us = switch_t.elapsed().as_micros() as u64,
            "switchover here: {what}"
        );
    };
    let (vm_state, vcpu_states) = crate::snapshot::state::decode(&buf, cfg.vcpus as usize)
        .map_err(|e| refuse(&mut main, MigrationError::State(e)))?;
    step("state decoded");
    let none = vec![0u64; words_for(pages)];
    let needed = rx.needed.as_deref().unwrap_or(&none);
    // Page 0 of guest memory is offset 0 of the fault loop's single region.
    let pull = Pull::new(pages, 0, needed, rx.pre.take_hashes());
    pull.set_crc(crc);
    step("pull set up");
    // Pre-copy: every page is here; the guest starts only if memory is the source's.
    if let (None, Some(want)) = (&rx.needed, rx.sw.digest) {
        let got = pull.digest();
        if got != want {
            return Err(refuse(
                &mut main,
                MigrationError::Integrity(format!(
                    "guest memory here (digest {got:#018x}) differs from the source's at switchover ({want:#018x}); the guest was not started here"
                )),
            ));
        }
    }
    step("state decoded, memory checked");
    // Post-copy: drop stale copies of needed pages, then let the fault loop catch every
    // access to a page not yet here.
    let fault_loop = match &rx.needed {
        Some(words) => {
            let fl = (|| {
                discard(&mem, words)?;
                mem.set_on_demand();
                let range = Range::new(mem.host_addr() as usize, mem.size() as usize)
                    .map_err(MigrationError::Range)?;
                let fl = FaultLoop::start(
                    &[Region { range, offset: 0 }],
                    pull.source(),
                    memx::Config::default(),
                )
                .map_err(MigrationError::Loop)?;
                pull.attach(fl.installer());
                Ok(fl)
            })()
            .map_err(|e| refuse(&mut main, e))?;
            Some(fl)
        }
        None => None,
    };
    vm_state
        .restore(&parts.vm)
        .map_err(|e| refuse(&mut main, MigrationError::State(e)))?;
    step("VM state restored");
    parts.vcpus = build_vcpus(&parts.kvm, &parts.vm, &vcpu_states, &cfg, opts.verify)
        .map_err(|e| refuse(&mut main, MigrationError::Build(e)))?;
    step("vCPUs built");
    if opts.verify {
        cfg.workload = Workload::Verify;
        cfg.run_for = None;
    }
    parts.cfg = cfg;
    parts.last_heartbeat = rx.sw.heartbeats.clone();
    parts.devices = vm_state.devices.clone();
    let vm = Vm::from_parts(parts).map_err(|e| refuse(&mut main, MigrationError::Vm(e)))?;
    step("devices given their state");
    if rx.sw.paused {
        // The operator had paused the guest at the source: it lands paused.
        vm.control().hold(PauseOwner::Operator);
    }
    // A start that failed half-way may have run a vCPU: no "not started" claim here.
    let control = start(vm).map_err(|e| fail(&mut main, MigrationError::Vm(e)))?;
    let resume_ns = mono_ns();
    tracing::info!(
        postcopy = fault_loop.is_some(),
        "migration: the guest runs here"
    );
    if let Err(e) = main.send(Kind::Resumed, 0, b"{}") {
        if fault_loop.is_some() {
            return Err(io_err("telling the source the guest runs")(e));
        }
        // Pre-copy: every page is here and matched the source's digest, so the guest runs
        // on. The source never hears it (it stays paused, in doubt, until its operator
        // decides); the supervisor finds the link lost and reports the migration unconfirmed.
    }
    // From here the source sends keepalives (if it announced them): silence for the
    // deadline on either connection is a lost link. Without them, reads block.
    let keepalive = hello.keepalive();
    for s in [&main, &prio] {
        s.set_read_timeout(keepalive.map(|k| k.deadline))
            .map_err(io_err("socket setup"))?;
    }
    if fault_loop.is_some() {
        status
            .go(State::Postcopy)
            .map_err(MigrationError::Transition)?;
    }
    let sup = Supervisor {
        pull,
        fault_loop,
        loop_stats: None,
        control,
        notify,
        status: status.clone(),
        resume_ns,
        switch_t,
        id: hello.id,
        recover_timeout: opts.recover_timeout,
        security,
        keepalive,
        bytes,
        rounds: rx.sw.rounds,
        recoveries: 0,
    };
    let th = thread::Builder::new()
        .name("migration-in".into())
        .spawn(move || sup.run(main, prio, listener))
        .map_err(io_err("starting the migration thread"))?;
    Ok(th)
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::os::unix::net::UnixStream;

    use super::*;

    fn frame(kind: u8, len: u32, arg: u64, payload: &[u8]) -> Vec<u8> {
        let mut b = vec![kind, 0];
        b.extend_from_slice(&0x464cu16.to_le_bytes());
        b.extend_from_slice(&len.to_le_bytes());
        b.extend_from_slice(&arg.to_le_bytes());
        b.extend_from_slice(payload);
        b
    }

    /// Feed `bytes` to the pre-copy receiver (then end the stream).
    fn feed(bytes: &[u8]) -> (Result<Received, MigrationError>, GuestMem) {
        let (a, mut b) = UnixStream::pair().unwrap();
        b.write_all(bytes).unwrap();
        b.shutdown(std::net::Shutdown::Write).unwrap();
        let mut main = Sock::Unix(a);
        let mem = GuestMem::new(2 << 20, Backend::Anonymous).unwrap();
        let status = Status::new(Role::Destination, None);
        let r = precopy(&mut main, &mem, &VmConfig::default(), &status, false);
        (r, mem)
    }

    #[test]
    fn bad_precopy_frames_are_errors_not_panics() {
        // A Zero frame with a short payload.
        let (r, _) = feed(&frame(4, 2, 0, &[1, 0]));
        assert!(
            matches!(
                r,
                Err(MigrationError::BeforeSwitchover(RecvError::Frame(_)))
            ),
            "{:?}",
            r.as_ref().err()
        );
        // Pages outside guest memory, and zero pages running past its end.
        let (r, _) = feed(&frame(3, 4096, 1 << 40, &[7; 4096]));
        assert!(matches!(r, Err(MigrationError::OutsideMemory(_))));
        let (r, _) = feed(&frame(4, 4, 510 * 4096, &3u32.to_le_bytes()));
        assert!(matches!(r, Err(MigrationError::OutsideMemory(_))));
        // Good frames are written; the stream ending before switchover is an error.
        let mut b = frame(5, 2, 0, b"{}");
        b.extend(frame(3, 4096, 4096, &[9; 4096]));
        let (r, mem) = feed(&b);
        assert!(matches!(
            r,
            Err(MigrationError::BeforeSwitchover(RecvError::Closed))
        ));
        assert_eq!(mem.read(4096, 4096).unwrap(), vec![9; 4096]);
    }
}
