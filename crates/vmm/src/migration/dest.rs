//! The receiving side: `faultline run --incoming`. Builds the VM from the stream, starts it at
//! switchover, and (post-copy) serves its faults from the source until every page is in.

use std::collections::HashMap;
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};
use std::sync::mpsc::{self, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::json;
use uffd::{CopyMode, Event, EventBuffer, Features, Range, RegisterMode, Resolved, Uffd};

use super::wire::{Kind, Listener, PAGE, Sock};
use super::{
    Bits, DestReport, End, Endpoint, Hello, HelloAck, Latency, Migration, MigrationError, PROTOCOL,
    Status, Switch, VERSION, bytes_to_words, io_err, max_pause_ms, mix, page_hash, words_to_bytes,
};
use crate::config::VmConfig;
use crate::guest::Workload;
use crate::memory::{Backend, GuestMem};
use crate::vstate::control::mono_ns;
use crate::vstate::kvm::create_vm;
use crate::vstate::machine::{Parts, build_vcpus};
use crate::vstate::{Failure, Notifier, PauseOwner, VcpuControl, Vm, VmError};

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
}

impl Default for IncomingOptions {
    fn default() -> Self {
        Self {
            listen: Endpoint::Tcp("127.0.0.1:7777".into()),
            verify: false,
            accept_timeout: Duration::from_secs(3600),
            recover_timeout: Duration::from_secs(60),
        }
    }
}

/// No frame for this long before switchover: the source is gone.
const STREAM_TIMEOUT: Duration = Duration::from_secs(60);

fn protocol(s: impl Into<String>) -> MigrationError {
    MigrationError::Protocol(s.into())
}

/// Read the hello on a new connection.
fn read_hello(s: &mut Sock) -> Result<Hello, MigrationError> {
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(io_err("socket setup"))?;
    let mut buf = Vec::new();
    let h = s.recv(&mut buf).map_err(io_err("reading the hello"))?;
    if h.kind != Kind::Hello {
        return Err(protocol(format!(
            "the first frame is {:?}, not a hello",
            h.kind
        )));
    }
    let hello: Hello =
        serde_json::from_slice(&buf).map_err(|e| protocol(format!("malformed hello: {e}")))?;
    if hello.protocol != PROTOCOL || hello.version != VERSION {
        return Err(protocol(format!(
            "protocol {} version {} is not ours ({PROTOCOL} version {VERSION})",
            hello.protocol, hello.version
        )));
    }
    Ok(hello)
}

fn ack(s: &mut Sock, r: Result<bool, &MigrationError>) -> Result<(), MigrationError> {
    let a = match r {
        Ok(want_checksums) => HelloAck {
            version: VERSION,
            ok: true,
            error: None,
            want_checksums,
        },
        Err(e) => HelloAck {
            version: VERSION,
            ok: false,
            error: Some(uffd::error_chain(e)),
            want_checksums: false,
        },
    };
    s.send_json(Kind::HelloAck, &a)
        .map_err(io_err("answering the hello"))
}

fn check_config(h: &Hello) -> Result<VmConfig, MigrationError> {
    if h.channel != "main" {
        return Err(protocol(format!(
            "expected the main channel first, got '{}'",
            h.channel
        )));
    }
    if h.resume {
        return Err(protocol(
            "a resume, but no post-copy migration is waiting here".to_string(),
        ));
    }
    let mut cfg = h
        .config
        .clone()
        .ok_or_else(|| protocol("the hello has no VM configuration"))?;
    if cfg.linux.is_some() {
        return Err(MigrationError::Invalid(
            "migration of Linux guests is not supported yet (serial and i8042 state)".into(),
        ));
    }
    if cfg.mem_bytes % (2 << 20) != 0 || cfg.mem_bytes == 0 {
        return Err(MigrationError::Config(
            crate::config::ConfigError::MemAlignment(cfg.mem_bytes),
        ));
    }
    if !cfg.vfio_user.is_empty() {
        return Err(MigrationError::Invalid(
            "the source VM has vfio-user devices, whose state a migration does not carry yet"
                .into(),
        ));
    }
    cfg.check_builtin().map_err(MigrationError::Config)?;
    cfg.slices().map_err(MigrationError::Config)?;
    cfg.backend = Backend::Anonymous;
    Ok(cfg)
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
    let listener = opts
        .listen
        .listen()
        .map_err(io_err(format!("listening on {}", opts.listen)))?;
    let mut main = listener
        .accept(opts.accept_timeout)
        .map_err(io_err("accepting the source"))?
        .ok_or_else(|| {
            MigrationError::Invalid(format!(
                "no source connected to {} within {:?}",
                opts.listen, opts.accept_timeout
            ))
        })?;
    let hello = read_hello(&mut main).inspect_err(|e| {
        let _ = ack(&mut main, Err(e));
    })?;
    let cfg = check_config(&hello).inspect_err(|e| {
        let _ = ack(&mut main, Err(e));
    })?;
    let t0 = Instant::now();
    let mem = Arc::new(
        GuestMem::new(cfg.mem_bytes, Backend::Anonymous)
            .map_err(|e| MigrationError::Vm(VmError::Memory(e)))?,
    );
    let (kvm, vm, irqchip) = create_vm(&mem, hello.irqchip, false)
        .map_err(|e| MigrationError::Vm(e.into()))
        .inspect_err(|e| {
            let _ = ack(&mut main, Err(e));
        })?;
    if irqchip != hello.irqchip {
        let e = MigrationError::Invalid(
            "the source VM has an in-kernel irqchip, which this host's KVM does not offer".into(),
        );
        let _ = ack(&mut main, Err(&e));
        return Err(e);
    }
    ack(&mut main, Ok(opts.verify))?;
    main.set_buffers(super::source::MAIN_BUFFER);
    let mut prio = listener
        .accept(Duration::from_secs(10))
        .map_err(io_err("accepting the priority connection"))?
        .ok_or_else(|| protocol("the source did not open its priority connection"))?;
    let ph = read_hello(&mut prio)?;
    if ph.channel != "priority" || ph.id != hello.id {
        let e = protocol("the second connection is not this migration's priority channel");
        let _ = ack(&mut prio, Err(&e));
        return Err(e);
    }
    ack(&mut prio, Ok(opts.verify))?;
    let status = Status::new("destination", Some(hello.mode));
    let thread = receive(
        opts,
        listener,
        main,
        prio,
        hello,
        cfg,
        Parts {
            kvm,
            vm,
            irqchip,
            mem,
            vcpus: Vec::new(),
            cfg: VmConfig::default(),
            t0,
            last_heartbeat: Vec::new(),
        },
        &status,
        notify,
        start,
    )?;
    Ok(Incoming {
        migration: Migration {
            status,
            resume: None,
            thread: Some(thread),
        },
    })
}

/// Per-page hashes of what was installed (for the digest).
type Hashes = Arc<Vec<AtomicU64>>;

fn digest(h: &Hashes) -> String {
    let d = h.iter().enumerate().fold(0u64, |d, (p, x)| {
        d.wrapping_add(mix(p as u64, x.load(SeqCst)))
    });
    format!("{d:#018x}")
}

fn check_range(mem: &GuestMem, arg: u64, len: u64) -> Result<(), MigrationError> {
    if arg % PAGE != 0 || arg.checked_add(len).is_none_or(|e| e > mem.size()) {
        return Err(protocol(format!(
            "pages at {arg:#x}+{len:#x} lie outside guest memory ({:#x} bytes)",
            mem.size()
        )));
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn receive(
    opts: &IncomingOptions,
    listener: Listener,
    mut main: Sock,
    prio: Sock,
    hello: Hello,
    mut cfg: VmConfig,
    mut parts: Parts,
    status: &Status,
    notify: Notifier,
    start: impl FnOnce(Vm) -> Result<Arc<VcpuControl>, VmError>,
) -> Result<thread::JoinHandle<()>, MigrationError> {
    let mem = parts.mem.clone();
    let pages = mem.size() / PAGE;
    let hashes: Hashes = Arc::new((0..pages).map(|_| AtomicU64::new(0)).collect());
    let mut rounds = 0u32;
    let mut bytes = 0u64;
    let mut buf = Vec::new();
    main.set_read_timeout(Some(STREAM_TIMEOUT))
        .map_err(io_err("socket setup"))?;
    let fail = |main: &mut Sock, e: MigrationError| {
        let _ = main.send_json(Kind::Error, &json!({ "error": uffd::error_chain(&e) }));
        e
    };
    status.update(|s| s.state = "precopy".into());
    // Before switchover: pages go straight into memory (nothing runs yet).
    let (sw, needed) = loop {
        let h = match main.recv(&mut buf) {
            Ok(h) => h,
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                return Err(protocol(
                    "the source disconnected before switchover; nothing was started here",
                ));
            }
            Err(e) => return Err(fail(&mut main, io_err("receiving the stream")(e))),
        };
        bytes += u64::from(h.len) + 16;
        match h.kind {
            Kind::Round => rounds += 1,
            Kind::Pages => {
                check_range(&mem, h.arg, u64::from(h.len)).map_err(|e| fail(&mut main, e))?;
                // SAFETY: no vCPU exists yet; this thread is the only user of guest memory.
                let dst = unsafe { mem.slice_mut(h.arg, buf.len()) }.expect("range checked");
                dst.copy_from_slice(&buf);
                for (k, pg) in buf.chunks_exact(PAGE as usize).enumerate() {
                    hashes[(h.arg / PAGE) as usize + k].store(page_hash(pg), SeqCst);
                }
            }
            Kind::Zero => {
                let n = u64::from(u32::from_le_bytes(buf[..4].try_into().unwrap_or([0; 4])));
                check_range(&mem, h.arg, n * PAGE).map_err(|e| fail(&mut main, e))?;
                // SAFETY: as above.
                let dst = unsafe { mem.slice_mut(h.arg, (n * PAGE) as usize) }.expect("checked");
                dst.fill(0);
                for k in 0..n {
                    hashes[(h.arg / PAGE + k) as usize].store(0, SeqCst);
                }
            }
            Kind::Switch => {
                let sw: Switch = serde_json::from_slice(&buf)
                    .map_err(|e| fail(&mut main, protocol(format!("malformed Switch: {e}"))))?;
                if sw.heartbeats.len() != cfg.vcpus as usize {
                    return Err(fail(
                        &mut main,
                        protocol("Switch names the wrong number of vCPUs"),
                    ));
                }
                let needed = if sw.postcopy {
                    let h = main
                        .recv(&mut buf)
                        .map_err(|e| fail(&mut main, io_err("receiving the bitmap")(e)))?;
                    if h.kind != Kind::Needed {
                        return Err(fail(&mut main, protocol("expected the Needed bitmap")));
                    }
                    Some(bytes_to_words(&buf, pages).ok_or_else(|| {
                        fail(&mut main, protocol("Needed bitmap of the wrong size"))
                    })?)
                } else {
                    None
                };
                break (sw, needed);
            }
            Kind::Cancel => {
                return Err(MigrationError::Cancelled(
                    String::from_utf8_lossy(&buf).into_owned(),
                ));
            }
            Kind::Error => {
                return Err(MigrationError::Peer(
                    String::from_utf8_lossy(&buf).into_owned(),
                ));
            }
            k => {
                return Err(fail(
                    &mut main,
                    protocol(format!("unexpected {k:?} frame before switchover")),
                ));
            }
        }
    };
    let h = main
        .recv(&mut buf)
        .map_err(|e| fail(&mut main, io_err("receiving the vCPU state")(e)))?;
    if h.kind != Kind::State {
        return Err(fail(&mut main, protocol("expected the State frame")));
    }
    let switch_t = Instant::now();
    let (vm_state, vcpu_states) = crate::snapshot::state::decode(&buf, cfg.vcpus as usize)
        .map_err(|e| fail(&mut main, MigrationError::State(e)))?;
    // Post-copy: drop stale copies of needed pages, then let userfaultfd catch every access.
    let engine = match &needed {
        Some(words) => {
            let e = Engine::new(&mem, words, hashes.clone(), prio.try_clone().ok())
                .map_err(|e| fail(&mut main, e))?;
            Some(Arc::new(e))
        }
        None => None,
    };
    vm_state
        .restore(&parts.vm)
        .map_err(|e| fail(&mut main, MigrationError::State(e)))?;
    parts.vcpus = build_vcpus(&parts.kvm, &parts.vm, &vcpu_states, &cfg, opts.verify)
        .map_err(|e| fail(&mut main, MigrationError::Build(e)))?;
    if opts.verify {
        cfg.workload = Workload::Verify;
        cfg.run_for = None;
    }
    parts.cfg = cfg;
    parts.last_heartbeat = sw.heartbeats.clone();
    let vm = Vm::from_parts(parts).map_err(|e| fail(&mut main, MigrationError::Vm(e)))?;
    if sw.paused {
        // The operator had paused the guest at the source: it lands paused.
        vm.control().hold(PauseOwner::Operator);
    }
    let control = start(vm).map_err(|e| fail(&mut main, MigrationError::Vm(e)))?;
    let resume_ns = mono_ns();
    main.send(Kind::Resumed, 0, b"{}")
        .map_err(io_err("telling the source the guest runs"))?;
    main.set_read_timeout(None)
        .map_err(io_err("socket setup"))?;
    status.update(|s| {
        s.state = if engine.is_some() {
            "postcopy"
        } else {
            "completing"
        }
        .into()
    });
    let sup = Supervisor {
        engine,
        mem: mem.clone(),
        hashes,
        control,
        notify,
        status: status.clone(),
        resume_ns,
        switch_t,
        id: hello.id,
        recover_timeout: opts.recover_timeout,
        bytes: AtomicU64::new(bytes),
        rounds,
        recoveries: 0,
    };
    let th = thread::Builder::new()
        .name("migration-in".into())
        .spawn(move || sup.run(main, prio, listener))
        .map_err(io_err("starting the migration thread"))?;
    Ok(th)
}

/// The post-copy fault server of the destination.
struct Engine {
    uffd: Uffd,
    base: usize,
    pages: u64,
    needed: Bits,
    left: AtomicU64,
    requested: Bits,
    pending: Mutex<HashMap<u64, (Instant, u32)>>,
    lat_ns: Mutex<Vec<u64>>,
    block_ns: Mutex<HashMap<u32, u64>>,
    hashes: Hashes,
    prio: Mutex<Option<Sock>>,
    stop: AtomicBool,
    pages_bg: AtomicU64,
    pages_prio: AtomicU64,
    zero_sent: AtomicU64,
    zero_local: AtomicU64,
    faults: AtomicU64,
    duplicates: AtomicU64,
    range: Range,
}

impl Engine {
    fn new(
        mem: &GuestMem,
        needed: &[u64],
        hashes: Hashes,
        prio: Option<Sock>,
    ) -> Result<Engine, MigrationError> {
        let pages = mem.size() / PAGE;
        let base = mem.host_addr() as usize;
        let uf = |e: &dyn std::error::Error| MigrationError::Uffd(e.to_string());
        // Drop what pre-copy put in pages that changed since.
        for (p, n) in super::source::runs(needed) {
            // SAFETY: inside guest memory; no vCPU runs yet, so nothing uses these pages.
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
                    source: io::Error::last_os_error(),
                });
            }
            for k in p..p + n {
                hashes[k as usize].store(0, SeqCst);
            }
        }
        let uffd = uffd::UffdBuilder::new()
            .require_features(Features::THREAD_ID)
            .create()
            .or_else(|_| uffd::UffdBuilder::new().create())
            .map_err(|e| uf(&e))?;
        let range = Range::new(base, mem.size() as usize).map_err(|e| uf(&e))?;
        uffd.register(range, RegisterMode::MISSING)
            .map_err(|e| uf(&e))?;
        uffd.set_nonblocking(true)
            .map_err(|e| MigrationError::Uffd(e.to_string()))?;
        let needed = Bits::from_words(needed);
        let left = needed.count();
        Ok(Engine {
            uffd,
            base,
            pages,
            left: AtomicU64::new(left),
            needed,
            requested: Bits::new(pages),
            pending: Mutex::new(HashMap::new()),
            lat_ns: Mutex::new(Vec::new()),
            block_ns: Mutex::new(HashMap::new()),
            hashes,
            prio: Mutex::new(prio),
            stop: AtomicBool::new(false),
            pages_bg: AtomicU64::new(0),
            pages_prio: AtomicU64::new(0),
            zero_sent: AtomicU64::new(0),
            zero_local: AtomicU64::new(0),
            faults: AtomicU64::new(0),
            duplicates: AtomicU64::new(0),
            range,
        })
    }

    fn page_range(&self, p: u64, n: u64) -> Range {
        Range::new(self.base + (p * PAGE) as usize, (n * PAGE) as usize)
            .expect("page-aligned range inside guest memory")
    }

    fn request(&self, p: u64) {
        let mut g = self.prio.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(s) = g.as_mut()
            && s.send(Kind::Request, p * PAGE, &1u32.to_le_bytes())
                .is_err()
        {
            // The receivers notice the broken link; the request is re-sent after recovery.
            *g = None;
        }
    }

    /// Serve faults until stopped.
    fn fault_loop(&self) {
        super::source::set_nice(-10);
        let mut eb = EventBuffer::new(64);
        while !self.stop.load(SeqCst) {
            if !matches!(
                self.uffd.poll_readable(Some(Duration::from_millis(50))),
                Ok(true)
            ) {
                continue;
            }
            let Ok(events) = self.uffd.read_events(&mut eb) else {
                continue;
            };
            for ev in events {
                let Event::Pagefault(pf) = ev else { continue };
                let off = pf.address.saturating_sub(self.base) as u64;
                let p = off / PAGE;
                if p >= self.pages {
                    continue;
                }
                if !self.needed.get(p) {
                    // Known zero (or already in: the copy woke the thread; waking is harmless).
                    if let Ok(Resolved::Done(_)) = self.uffd.zeropage(self.page_range(p, 1), false)
                    {
                        self.zero_local.fetch_add(1, SeqCst);
                    }
                    continue;
                }
                self.faults.fetch_add(1, SeqCst);
                self.pending
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .entry(p)
                    .or_insert((Instant::now(), pf.thread_id.unwrap_or(0)));
                if !self.needed.get(p) {
                    // Installed meanwhile.
                    self.pending
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .remove(&p);
                    let _ = self.uffd.wake(self.page_range(p, 1));
                    continue;
                }
                if !self.requested.set(p) {
                    self.request(p);
                }
            }
        }
    }

    fn settle(&self, p: u64, n: u64, now: Instant) {
        for q in p..p + n {
            if self.needed.clear(q) {
                self.left.fetch_sub(1, SeqCst);
            }
        }
        let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        if pending.is_empty() {
            return;
        }
        for q in p..p + n {
            if let Some((t, tid)) = pending.remove(&q) {
                let ns = now.duration_since(t).as_nanos() as u64;
                self.lat_ns
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push(ns);
                *self
                    .block_ns
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .entry(tid)
                    .or_default() += ns;
            }
        }
    }

    /// Install `data` (whole pages) at page `p`.
    fn install(&self, p: u64, data: &[u8], prio: bool) -> Result<(), MigrationError> {
        let n = data.len() as u64 / PAGE;
        // Only pages still needed are installed; the source never sends a page twice, so
        // anything else is counted and dropped.
        let all_needed = (p..p + n).all(|q| self.needed.get(q));
        let uf = |e: uffd::ResolveError| MigrationError::Uffd(uffd::error_chain(&e));
        if all_needed {
            match self
                .uffd
                .copy(self.page_range(p, n), data, CopyMode::empty())
                .map_err(uf)?
            {
                Resolved::Done(_) => {}
                Resolved::AlreadyPresent => self.install_each(p, data)?,
            }
        } else {
            self.install_each(p, data)?;
        }
        for (k, pg) in data.chunks_exact(PAGE as usize).enumerate() {
            self.hashes[(p as usize) + k].store(page_hash(pg), SeqCst);
        }
        let c = if prio {
            &self.pages_prio
        } else {
            &self.pages_bg
        };
        c.fetch_add(n, SeqCst);
        self.settle(p, n, Instant::now());
        Ok(())
    }

    fn install_each(&self, p: u64, data: &[u8]) -> Result<(), MigrationError> {
        for (k, pg) in data.chunks_exact(PAGE as usize).enumerate() {
            let q = p + k as u64;
            if !self.needed.get(q) {
                self.duplicates.fetch_add(1, SeqCst);
                continue;
            }
            self.uffd
                .copy(self.page_range(q, 1), pg, CopyMode::empty())
                .map_err(|e| MigrationError::Uffd(uffd::error_chain(&e)))?;
        }
        Ok(())
    }

    fn install_zero(&self, p: u64, n: u64) -> Result<(), MigrationError> {
        for q in p..p + n {
            if self.needed.get(q) {
                self.uffd
                    .zeropage(self.page_range(q, 1), false)
                    .map_err(|e| MigrationError::Uffd(uffd::error_chain(&e)))?;
                self.hashes[q as usize].store(0, SeqCst);
            } else {
                self.duplicates.fetch_add(1, SeqCst);
            }
        }
        self.zero_sent.fetch_add(n, SeqCst);
        self.settle(p, n, Instant::now());
        Ok(())
    }
}

/// What a receiver thread reports.
enum In {
    End(Box<End>),
    Verdict(String),
    /// The connection of this generation was lost.
    Lost(u32, String),
    Fatal(MigrationError),
}

fn receiver(
    engine: Option<Arc<Engine>>,
    mem: Arc<GuestMem>,
    mut sock: Sock,
    prio: bool,
    tx: Sender<In>,
    bytes: Arc<AtomicU64>,
    generation: u32,
) {
    super::source::set_nice(if prio { -10 } else { 5 });
    let mut buf = Vec::new();
    loop {
        let h = match sock.recv(&mut buf) {
            Ok(h) => h,
            Err(e) => {
                let why = if e.kind() == io::ErrorKind::UnexpectedEof {
                    "the source closed the connection (it exited, was killed, or the link dropped)"
                        .to_string()
                } else {
                    format!("{} connection: {e}", if prio { "priority" } else { "main" })
                };
                let _ = tx.send(In::Lost(generation, why));
                return;
            }
        };
        bytes.fetch_add(u64::from(h.len) + 16, SeqCst);
        let r = match (h.kind, &engine) {
            (Kind::Pages, Some(e)) => check_range(&mem, h.arg, u64::from(h.len))
                .and_then(|_| e.install(h.arg / PAGE, &buf, prio)),
            (Kind::Zero, Some(e)) => {
                let n = u64::from(u32::from_le_bytes(buf[..4].try_into().unwrap_or([0; 4])));
                check_range(&mem, h.arg, n * PAGE).and_then(|_| e.install_zero(h.arg / PAGE, n))
            }
            (Kind::End, _) if !prio => match serde_json::from_slice::<End>(&buf) {
                Ok(end) => {
                    let _ = tx.send(In::End(Box::new(end)));
                    Ok(())
                }
                Err(e) => Err(protocol(format!("malformed End: {e}"))),
            },
            (Kind::Verdict, _) if !prio => {
                let d = serde_json::from_slice::<serde_json::Value>(&buf)
                    .ok()
                    .and_then(|v| v["digest"].as_str().map(String::from))
                    .unwrap_or_default();
                let _ = tx.send(In::Verdict(d));
                return;
            }
            (Kind::Error, _) => Err(MigrationError::Peer(
                String::from_utf8_lossy(&buf).into_owned(),
            )),
            (k, _) => Err(protocol(format!("unexpected {k:?} frame after switchover"))),
        };
        if let Err(e) = r {
            let _ = tx.send(In::Fatal(e));
            return;
        }
    }
}

struct Supervisor {
    engine: Option<Arc<Engine>>,
    mem: Arc<GuestMem>,
    hashes: Hashes,
    control: Arc<VcpuControl>,
    notify: Notifier,
    status: Status,
    resume_ns: u64,
    switch_t: Instant,
    id: u64,
    recover_timeout: Duration,
    bytes: AtomicU64,
    rounds: u32,
    recoveries: u32,
}

impl Supervisor {
    fn run(mut self, main: Sock, prio: Sock, listener: Listener) {
        let r = self.serve(main, prio, &listener);
        if let Some(e) = &self.engine {
            e.stop.store(true, SeqCst);
        }
        match r {
            Ok(stats) => self.status.update(|s| {
                s.state = "completed".into();
                s.percent = 100.0;
                s.stats = Some(stats);
            }),
            Err(e) => {
                let msg = uffd::error_chain(&e);
                self.status.update(|s| {
                    s.state = "failed".into();
                    s.error = Some(msg.clone());
                });
                self.notify.fail(Failure::Migration(Box::new(e)));
            }
        }
    }

    fn spawn_receivers(
        &self,
        main: &Sock,
        prio: &Sock,
        mem: &Arc<GuestMem>,
        tx: &Sender<In>,
        bytes: &Arc<AtomicU64>,
    ) -> Result<(), MigrationError> {
        for (s, is_prio) in [(main, false), (prio, true)] {
            let s = s.try_clone().map_err(io_err("socket setup"))?;
            let (e, m, t, b) = (self.engine.clone(), mem.clone(), tx.clone(), bytes.clone());
            let g = self.recoveries;
            thread::Builder::new()
                .name(
                    if is_prio {
                        "mig-prio-in"
                    } else {
                        "mig-main-in"
                    }
                    .into(),
                )
                .spawn(move || receiver(e, m, s, is_prio, t, b, g))
                .map_err(io_err("starting a receiver"))?;
        }
        Ok(())
    }

    fn serve(
        &mut self,
        mut main: Sock,
        mut prio: Sock,
        listener: &Listener,
    ) -> Result<serde_json::Value, MigrationError> {
        let (tx, rx) = mpsc::channel();
        let bytes = Arc::new(AtomicU64::new(self.bytes.load(SeqCst)));
        let mem = self.mem.clone();
        let fault_thread = match &self.engine {
            Some(e) => {
                let e = e.clone();
                Some(
                    thread::Builder::new()
                        .name("mig-faults".into())
                        .spawn(move || e.fault_loop())
                        .map_err(io_err("starting the fault thread"))?,
                )
            }
            None => None,
        };
        self.spawn_receivers(&main, &prio, &mem, &tx, &bytes)?;
        let mut end: Option<End> = None;
        let mut report: Option<DestReport> = None;
        let mut postcopy_ms = 0.0;
        let total = self.engine.as_ref().map_or(0, |e| e.needed.count());
        let mut last = Instant::now();
        let verdict = loop {
            let left = self.engine.as_ref().map_or(0, |e| e.left.load(SeqCst));
            if left == 0 && postcopy_ms == 0.0 {
                postcopy_ms = self.switch_t.elapsed().as_secs_f64() * 1e3;
                // Every page is in: stop trapping (the rest read as zero).
                if let Some(e) = &self.engine {
                    e.stop.store(true, SeqCst);
                    if let Some(t) = &fault_thread {
                        while !t.is_finished() {
                            thread::sleep(Duration::from_millis(1));
                        }
                    }
                    e.uffd
                        .unregister(e.range)
                        .map_err(|x| MigrationError::Uffd(uffd::error_chain(&x)))?;
                }
            }
            if left == 0 && report.is_none() && end.is_some() {
                let r = self.report(&bytes, postcopy_ms);
                main.send_json(Kind::Done, &r)
                    .map_err(io_err("sending Done"))?;
                report = Some(r);
            }
            if last.elapsed() > Duration::from_millis(100) {
                last = Instant::now();
                self.status.update(|s| {
                    s.percent = 100.0 - left as f64 * 100.0 / total.max(1) as f64;
                    s.remaining_bytes = left * PAGE;
                });
            }
            match rx.recv_timeout(Duration::from_millis(10)) {
                Ok(In::End(e)) => {
                    if let Some(c) = &e.checksums {
                        self.status.update(|s| s.source_checksums = Some(c.clone()));
                    }
                    end = Some(*e);
                }
                Ok(In::Verdict(d)) => break Some(d),
                Ok(In::Fatal(e)) => {
                    let _ = main.send_json(Kind::Error, &json!({"error": uffd::error_chain(&e)}));
                    return Err(e);
                }
                // The other receiver of a connection pair already replaced.
                Ok(In::Lost(g, _)) if g != self.recoveries => {}
                Ok(In::Lost(_, why)) => {
                    if report.is_some() {
                        // Everything is in; only the source's verdict is missing.
                        break None;
                    }
                    if self.engine.is_none() {
                        return Err(MigrationError::Peer(format!(
                            "{why}, after switchover; the guest runs here with all its memory but the migration was not confirmed"
                        )));
                    }
                    main.shutdown();
                    prio.shutdown();
                    (main, prio) = self.recover(&why, listener)?;
                    self.spawn_receivers(&main, &prio, &mem, &tx, &bytes)?;
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => {
                    return Err(protocol("receivers gone"));
                }
            }
        };
        let mut r = report.ok_or_else(|| protocol("no report"))?;
        let end = end.unwrap_or_default();
        let verified = verdict.as_ref().map(|d| *d == r.digest);
        if verified == Some(false) {
            return Err(MigrationError::Integrity(format!(
                "guest memory here (digest {}) differs from the source's at switchover ({})",
                r.digest,
                verdict.unwrap_or_default()
            )));
        }
        r.bytes = bytes.load(SeqCst);
        let block: f64 = r.blocktime_ms.iter().sum();
        Ok(json!({
            "role": "destination",
            "converged": true,
            "downtime_ms": end.downtime_us as f64 / 1e3,
            "max_pause_ms": max_pause_ms(&end, &r),
            "bytes": r.bytes,
            "dirty_sync_rounds": self.rounds,
            "faults_requested": r.faults_requested,
            "fault_latency_us": r.fault_latency_us,
            "blocktime_ms": block,
            "digest_verified": verified,
            "report": r,
        }))
    }

    fn report(&self, bytes: &AtomicU64, postcopy_ms: f64) -> DestReport {
        // Let each vCPU beat once here (its head is part of the pause), at most 2 s.
        super::wait_for(Duration::from_secs(2), || {
            self.control
                .cpus
                .iter()
                .all(|c| c.first_hb_ns.load(SeqCst) != 0 || c.exited.load(SeqCst))
        });
        let heads = self
            .control
            .cpus
            .iter()
            .map(|c| match c.first_hb_ns.load(SeqCst) {
                0 => None,
                t => Some(t.saturating_sub(self.resume_ns) / 1000),
            })
            .collect();
        let gaps = self
            .control
            .cpus
            .iter()
            .map(|c| c.max_gap_ns.load(SeqCst) / 1000)
            .collect();
        let first = self
            .control
            .cpus
            .iter()
            .map(|c| (c.first_hb_ns.load(SeqCst) != 0).then(|| c.last_n.load(SeqCst)))
            .collect();
        let mut r = DestReport {
            heads_us: heads,
            gaps_us: gaps,
            first_heartbeats: first,
            digest: digest(&self.hashes),
            recoveries: self.recoveries,
            postcopy_ms,
            bytes: bytes.load(SeqCst),
            blocktime_ms: vec![0.0; self.control.cpus.len()],
            ..Default::default()
        };
        if let Some(e) = &self.engine {
            r.pages_background = e.pages_bg.load(SeqCst);
            r.pages_priority = e.pages_prio.load(SeqCst);
            r.zero_pages_sent = e.zero_sent.load(SeqCst);
            r.zero_faults_local = e.zero_local.load(SeqCst);
            r.faults_requested = e.faults.load(SeqCst);
            r.fault_latency_us =
                Latency::of(e.lat_ns.lock().unwrap_or_else(|x| x.into_inner()).clone());
            let block = e.block_ns.lock().unwrap_or_else(|x| x.into_inner());
            for (i, c) in self.control.cpus.iter().enumerate() {
                let tid = c.tid.load(SeqCst);
                r.blocktime_ms[i] = block.get(&tid).copied().unwrap_or(0) as f64 / 1e6;
            }
        }
        r
    }

    /// Wait for the source to reconnect after a lost link (post-copy).
    fn recover(&mut self, why: &str, listener: &Listener) -> Result<(Sock, Sock), MigrationError> {
        let engine = self.engine.clone().expect("recovery is for post-copy");
        *engine.prio.lock().unwrap_or_else(|e| e.into_inner()) = None;
        let msg = format!(
            "post-copy link lost: {why}; {} pages are still at the source; vCPUs that need them wait. Waiting {:?} for `faultline migrate --resume`",
            engine.left.load(SeqCst),
            self.recover_timeout
        );
        eprintln!("faultline: migration: {msg}");
        self.status.update(|s| {
            s.state = "postcopy-paused".into();
            s.error = Some(msg);
        });
        let deadline = Instant::now() + self.recover_timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let Some(mut main) = listener
                .accept(left)
                .map_err(io_err("accepting a recovery"))?
            else {
                return Err(MigrationError::Peer(format!(
                    "post-copy link lost ({why}) and the source did not reconnect within {:?}: {} guest pages are lost; the VM stops",
                    self.recover_timeout,
                    engine.left.load(SeqCst)
                )));
            };
            let h = match read_hello(&mut main) {
                Ok(h) if h.resume && h.id == self.id && h.channel == "main" => h,
                Ok(_) => {
                    let _ = ack(
                        &mut main,
                        Err(&protocol("not a resume of the migration in progress here")),
                    );
                    continue;
                }
                Err(e) => {
                    let _ = ack(&mut main, Err(&e));
                    continue;
                }
            };
            ack(&mut main, Ok(false))?;
            main.set_buffers(super::source::MAIN_BUFFER);
            let Some(mut prio) = listener
                .accept(Duration::from_secs(10))
                .map_err(io_err("accepting the priority connection"))?
            else {
                continue;
            };
            match read_hello(&mut prio) {
                Ok(p) if p.id == h.id && p.channel == "priority" => ack(&mut prio, Ok(false))?,
                _ => continue,
            }
            main.send(Kind::Recover, 0, &words_to_bytes(&engine.needed.words()))
                .map_err(io_err("sending the missing-page list"))?;
            main.set_read_timeout(None)
                .map_err(io_err("socket setup"))?;
            prio.set_read_timeout(None)
                .map_err(io_err("socket setup"))?;
            *engine.prio.lock().unwrap_or_else(|e| e.into_inner()) =
                Some(prio.try_clone().map_err(io_err("socket setup"))?);
            // Ask again for every page a vCPU still waits on.
            let waiting: Vec<u64> = engine
                .pending
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .keys()
                .copied()
                .collect();
            for p in waiting {
                engine.request(p);
            }
            self.recoveries += 1;
            eprintln!("faultline: migration: the source reconnected; post-copy goes on");
            self.status.update(|s| {
                s.state = "postcopy".into();
                s.error = None;
            });
            return Ok((main, prio));
        }
    }
}
