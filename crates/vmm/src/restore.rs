//! Restoring a VM from a snapshot: eagerly, through a private file mapping, or lazily through
//! userfaultfd (served in-process by the fault loop, with optional working-set prefetch, or by
//! an external handler process that receives the userfaultfd over a Unix socket).
//!
//! # External handler hand-off, protocol version 1
//! The VMM connects to the handler's Unix stream socket and sends one message: a `u32`
//! little-endian length, then that many bytes of JSON ([`Handoff`]), with the userfaultfd
//! attached as `SCM_RIGHTS` to the first byte. The memory is already registered (MISSING) by
//! the VMM; `mappings` has Firecracker's shape (`base_host_virt_addr`, `size`, `offset`,
//! `page_size`). The handler answers with a length-prefixed JSON [`HandoffReply`]. A handler
//! that speaks another version answers `ok: false` and names its version, and the restore
//! fails before any vCPU runs. The connection then stays open for as long as the handler
//! serves: when it closes (the handler exited or crashed) the VM stops with an error instead of
//! leaving vCPUs blocked on faults nobody will serve.

use std::cell::Cell;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::sync::mpsc::Sender;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use kvm_bindings::KVM_MAX_CPUID_ENTRIES;
use memx::{Config, FaultLoop, Region};
use serde::{Deserialize, Serialize};
use thiserror::Error;
use uffd::{Range, RegisterMode, UffdBuilder};

use crate::guest::Workload;
use crate::memory::{Backend, GuestMem};
use crate::snapshot::{self, Loaded, SnapshotError, SnapshotSource, WorkingSet};
use crate::vm::{Msg, Vm, VmError, apic_cpuid, kvm_err, kvm_vm_with};

/// How guest memory is brought back.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RestoreMode {
    /// Read every page, then run.
    Eager,
    /// Map the memory file privately (copy-on-write): the kernel reads pages on first touch.
    Mmap,
    /// Anonymous memory registered with userfaultfd; faults served from the memory file.
    Lazy,
    /// `lazy`, plus: the first restore records the order of faults; later ones push those
    /// pages in that order in the background, faults first.
    Prefetch,
}

impl std::str::FromStr for RestoreMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "eager" => Ok(Self::Eager),
            "mmap" => Ok(Self::Mmap),
            "lazy" => Ok(Self::Lazy),
            "prefetch" => Ok(Self::Prefetch),
            _ => Err(format!(
                "unknown restore mode '{s}' (eager, mmap, lazy, prefetch)"
            )),
        }
    }
}

impl RestoreMode {
    /// The name used on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Self::Eager => "eager",
            Self::Mmap => "mmap",
            Self::Lazy => "lazy",
            Self::Prefetch => "prefetch",
        }
    }
}

/// What the vCPUs do once restored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AfterRestore {
    /// Continue exactly where the snapshot paused them.
    Resume,
    /// Run the built-in guest's `verify` over each slice (reads every page, reports the
    /// checksum, stops): proves the memory is what was saved.
    Verify,
}

/// Restore options.
#[derive(Debug, Clone)]
pub struct RestoreOptions {
    /// Memory mode.
    pub mode: RestoreMode,
    /// What the vCPUs do.
    pub then: AfterRestore,
    /// Hand the userfaultfd to the handler listening on this socket (lazy modes).
    pub page_handler: Option<PathBuf>,
    /// How long to wait for the handler to connect and answer.
    pub handler_timeout: Duration,
    /// Pages served per fault (and per prefetch ioctl) by the in-process fault loop.
    pub batch_pages: usize,
    /// Record the working set of a `lazy` restore too (a `prefetch` restore records when the
    /// snapshot has none yet).
    pub record: bool,
}

impl Default for RestoreOptions {
    fn default() -> Self {
        Self {
            mode: RestoreMode::Lazy,
            then: AfterRestore::Resume,
            page_handler: None,
            handler_timeout: Duration::from_secs(5),
            batch_pages: 16,
            record: false,
        }
    }
}

/// Restoring a VM.
#[derive(Debug, Error)]
pub enum RestoreError {
    /// The snapshot could not be read or is not valid.
    #[error("snapshot")]
    Snapshot(#[from] SnapshotError),
    /// The VM could not be created.
    #[error("creating the VM")]
    Vm(#[source] VmError),
    /// Guest memory could not be created.
    #[error("guest memory")]
    Memory(#[source] crate::memory::MemoryError),
    /// The fault loop could not start.
    #[error("fault loop")]
    FaultLoop(#[source] memx::LoopError),
    /// The userfaultfd could not be created or registered.
    #[error("userfaultfd: {0}")]
    Uffd(String),
    /// The external handler could not be reached or refused.
    #[error("page-fault handler at {path}: {why}")]
    Handler {
        /// Its socket.
        path: PathBuf,
        /// What went wrong.
        why: String,
        /// Cause, if an I/O error.
        #[source]
        source: Option<io::Error>,
    },
    /// The snapshot is of something restore cannot bring back.
    #[error("cannot restore: {0}")]
    Unsupported(String),
}

/// The hand-off message's protocol name.
pub const HANDOFF_PROTOCOL: &str = "faultline-uffd-handoff";
/// The hand-off protocol version.
pub const HANDOFF_VERSION: u32 = 1;

/// One guest memory mapping, as Firecracker describes it to its handlers.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct HandoffMapping {
    /// Host virtual address of the mapping in the VMM.
    pub base_host_virt_addr: u64,
    /// Size in bytes.
    pub size: u64,
    /// Offset of its first byte in the memory file.
    pub offset: u64,
    /// Page size.
    pub page_size: u64,
}

/// The hand-off message (JSON).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Handoff {
    /// [`HANDOFF_PROTOCOL`].
    pub protocol: String,
    /// [`HANDOFF_VERSION`].
    pub version: u32,
    /// The VMM's pid (for messages).
    pub vmm_pid: u32,
    /// The snapshot directory whose memory file backs the mappings.
    pub snapshot_dir: PathBuf,
    /// The userfaultfd's features (`UFFDIO_API`).
    pub uffd_features: u64,
    /// Guest memory.
    pub mappings: Vec<HandoffMapping>,
}

/// The handler's answer (JSON).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HandoffReply {
    /// The handler's protocol version.
    pub version: u32,
    /// Whether it will serve.
    pub ok: bool,
    /// Why not.
    #[serde(default)]
    pub error: Option<String>,
}

/// Largest hand-off message accepted.
const MAX_MSG: u32 = 1 << 20;

/// Send a length-prefixed JSON message, optionally with an fd.
pub fn send_msg<T: Serialize>(s: &UnixStream, v: &T, fd: Option<&OwnedFd>) -> io::Result<()> {
    use vmm_sys_util::sock_ctrl_msg::ScmSocket;
    let body = serde_json::to_vec(v).map_err(io::Error::other)?;
    let mut msg = (body.len() as u32).to_le_bytes().to_vec();
    msg.extend_from_slice(&body);
    match fd {
        Some(fd) => {
            let n = s
                .send_with_fd(&msg[..], fd.as_raw_fd())
                .map_err(|e| io::Error::from_raw_os_error(e.errno()))?;
            (&*s).write_all(&msg[n..])
        }
        None => (&*s).write_all(&msg),
    }
}

/// Receive a length-prefixed JSON message and the fd sent with it, if any.
pub fn recv_msg<T: for<'de> Deserialize<'de>>(s: &UnixStream) -> io::Result<(T, Option<OwnedFd>)> {
    use vmm_sys_util::sock_ctrl_msg::ScmSocket;
    let mut len = [0u8; 4];
    let (n, file) = s
        .recv_with_fd(&mut len)
        .map_err(|e| io::Error::from_raw_os_error(e.errno()))?;
    if n == 0 {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "the peer closed the connection",
        ));
    }
    (&*s).read_exact(&mut len[n..])?;
    let len = u32::from_le_bytes(len);
    if len > MAX_MSG {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("message of {len} bytes (at most {MAX_MSG})"),
        ));
    }
    let mut body = vec![0; len as usize];
    (&*s).read_exact(&mut body)?;
    let v =
        serde_json::from_slice(&body).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
    Ok((v, file.map(OwnedFd::from)))
}

/// What the restore's page-fault handler did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct PagerReport {
    /// `local` (in-process fault loop) or `external`.
    pub handler: String,
    /// Faults served (in-process only).
    pub faults: u64,
    /// Pages mapped in total (faults, prefetch, zero pages).
    pub pages: u64,
    /// Of which zero pages.
    pub zero_pages: u64,
    /// Pages pushed by the prefetcher.
    pub prefetched_pages: u64,
    /// Bytes read from the memory file.
    pub bytes_read: u64,
    /// Fault service time, p50 and p99, µs.
    pub fault_p50_us: f64,
    /// p99.
    pub fault_p99_us: f64,
    /// Pages the source could not produce (poisoned).
    pub errors: u64,
    /// The last such error.
    pub last_error: Option<String>,
    /// Pages recorded as the working set (written beside the snapshot when the VM ends).
    pub working_set_pages: usize,
}

/// Serves a lazily restored VM's page faults for as long as it runs.
pub struct Pager {
    kind: PagerKind,
    /// Working-set offsets to push once the vCPUs run (not before: the push would compete
    /// with setting up the VM and delay its first instruction).
    prefetch: Option<(Vec<u64>, usize)>,
    record_to: Option<PathBuf>,
    watcher: Option<(JoinHandle<()>, Arc<AtomicBool>)>,
}

enum PagerKind {
    Local {
        fl: FaultLoop,
        source: Arc<SnapshotSource>,
        recording: bool,
    },
    External {
        conn: UnixStream,
        /// The VMM keeps its copy: while it is open, faults stay blocked (never silently
        /// filled with zeros) even after the handler is gone.
        _uffd: uffd::Uffd,
        path: PathBuf,
    },
}

impl std::fmt::Debug for Pager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pager").finish_non_exhaustive()
    }
}

impl Pager {
    /// Start watching for handler failure: a closed hand-off connection stops the VM.
    pub(crate) fn watch(&mut self, tx: Sender<Msg>) -> Result<(), VmError> {
        let PagerKind::External { conn, path, .. } = &self.kind else {
            return Ok(());
        };
        let conn = conn.try_clone().map_err(|source| VmError::Host {
            what: "the page-fault handler watcher",
            source,
        })?;
        let path = path.clone();
        let stop = Arc::new(AtomicBool::new(false));
        let st = stop.clone();
        let h = thread::Builder::new()
            .name("handler-watch".into())
            .spawn(move || {
                while !st.load(SeqCst) {
                    let mut p = libc::pollfd {
                        fd: conn.as_fd().as_raw_fd(),
                        events: libc::POLLIN | libc::POLLRDHUP,
                        revents: 0,
                    };
                    // SAFETY: one valid pollfd.
                    let r = unsafe { libc::poll(&mut p, 1, 50) };
                    if r > 0 {
                        let mut b = [0u8; 64];
                        if matches!((&conn).read(&mut b), Ok(0) | Err(_)) {
                            let _ = tx.send(Msg::Failed(VmError::Pager(format!(
                                "the external page-fault handler at {} closed its connection (it exited or crashed); vCPUs waiting on its pages cannot go on",
                                path.display()
                            ))));
                            return;
                        }
                    }
                }
            })
            .map_err(|source| VmError::Host {
                what: "the page-fault handler watcher",
                source,
            })?;
        self.watcher = Some((h, stop));
        Ok(())
    }

    /// Begin pushing the working set, if there is one (called once the vCPUs are started).
    pub(crate) fn launch(&mut self) -> Result<(), VmError> {
        if let (Some((offsets, batch)), PagerKind::Local { fl, .. }) =
            (self.prefetch.take(), &mut self.kind)
        {
            fl.prefetch(offsets, batch)
                .map_err(|e| VmError::Pager(uffd::error_chain(&e)))?;
        }
        Ok(())
    }

    /// Counters so far.
    pub fn report(&self) -> PagerReport {
        match &self.kind {
            PagerKind::Local { fl, source, .. } => {
                let s = fl.stats();
                PagerReport {
                    handler: "local".into(),
                    faults: s.faults,
                    pages: s.pages,
                    zero_pages: s.zero_pages,
                    prefetched_pages: s.populated_pages,
                    bytes_read: source.bytes_read(),
                    fault_p50_us: s.latency.p50_ns as f64 / 1e3,
                    fault_p99_us: s.latency.p99_ns as f64 / 1e3,
                    errors: s.errors,
                    last_error: s.last_error.clone(),
                    working_set_pages: source.working_set().len(),
                }
            }
            PagerKind::External { .. } => PagerReport {
                handler: "external".into(),
                ..Default::default()
            },
        }
    }

    /// Stop serving; store the recorded working set if any. Returns the final report.
    pub(crate) fn finish(mut self) -> Result<PagerReport, VmError> {
        if let Some((h, stop)) = self.watcher.take() {
            stop.store(true, SeqCst);
            let _ = h.join();
        }
        let report = self.report();
        if let PagerKind::Local {
            fl,
            source,
            recording,
        } = self.kind
        {
            fl.stop()
                .map_err(|e| VmError::Pager(uffd::error_chain(&e)))?;
            if recording && let Some(dir) = &self.record_to {
                let ws = WorkingSet {
                    pages: source.working_set(),
                };
                if !ws.pages.is_empty() {
                    ws.store(dir)
                        .map_err(|e| VmError::Pager(uffd::error_chain(&e)))?;
                }
            }
        }
        Ok(report)
    }
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
    // Not a vCPU in KVM_RUN: a real bug. Fall back to the default action, which the faulting
    // access, retried on return, then takes.
    // SAFETY: resetting a signal disposition is async-signal-safe.
    unsafe { libc::signal(libc::SIGBUS, libc::SIG_DFL) };
}

/// Install the SIGBUS handler that turns a poisoned guest page (a page the fault handler
/// could not produce, so poisoned rather than filled with wrong bytes) into a VM error.
pub(crate) fn install_sigbus_handler() -> io::Result<()> {
    // SAFETY: a zeroed sigaction is valid; we fill handler, flags and an empty mask.
    let mut sa: libc::sigaction = unsafe { std::mem::zeroed() };
    sa.sa_sigaction = on_sigbus as *const () as usize;
    sa.sa_flags = libc::SA_SIGINFO;
    // SAFETY: sa_mask is a valid sigset_t inside `sa`.
    unsafe { libc::sigemptyset(&mut sa.sa_mask) };
    // SAFETY: installs a handler that only touches const-initialised thread-locals.
    if unsafe { libc::sigaction(libc::SIGBUS, &sa, std::ptr::null_mut()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Run `f` (a `KVM_RUN`) with SIGBUS attributed to this vCPU.
pub(crate) fn in_vcpu_run<T>(f: impl FnOnce() -> T) -> T {
    IN_RUN.with(|c| c.set(true));
    let r = f();
    IN_RUN.with(|c| c.set(false));
    r
}

/// The host address of a poisoned page this vCPU hit, if any.
pub(crate) fn take_lost_page() -> Option<u64> {
    match LOST.with(|l| l.replace(0)) {
        0 => None,
        a => Some(a),
    }
}

/// A restored VM, not yet started, and what the snapshot says it should compute.
pub struct Restored {
    /// The VM.
    pub vm: Vm,
    /// Each slice's checksum at snapshot (`verify` must report these).
    pub checksums: Vec<u64>,
    /// Each vCPU's last heartbeat number at snapshot.
    pub heartbeats: Vec<u32>,
    /// Bytes read before the VM could start (eager).
    pub bytes_read_upfront: u64,
    /// Whether a recorded working set is being pushed.
    pub prefetching: bool,
    /// Restore start (the VM's time origin).
    pub t0: Instant,
    /// The snapshot's memory index (per-page CRCs, if recorded, for [`snapshot::check_pages`]).
    pub index: Arc<snapshot::MemoryIndex>,
}

fn connect_handler(
    path: &Path,
    uffd: &uffd::Uffd,
    handoff: &Handoff,
    timeout: Duration,
) -> Result<UnixStream, RestoreError> {
    let err = |why: &str, source: Option<io::Error>| RestoreError::Handler {
        path: path.to_path_buf(),
        why: why.into(),
        source,
    };
    let deadline = Instant::now() + timeout;
    let conn = loop {
        match UnixStream::connect(path) {
            Ok(c) => break c,
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                thread::sleep(Duration::from_millis(10));
            }
            Err(e) => return Err(err("cannot connect", Some(e))),
        }
    };
    conn.set_read_timeout(Some(timeout))
        .map_err(|e| err("socket setup", Some(e)))?;
    let fd = uffd
        .as_fd()
        .try_clone_to_owned()
        .map_err(|e| err("duplicating the userfaultfd", Some(e)))?;
    send_msg(&conn, handoff, Some(&fd)).map_err(|e| err("sending the hand-off", Some(e)))?;
    let (reply, _) = recv_msg::<HandoffReply>(&conn)
        .map_err(|e| err("no valid answer to the hand-off", Some(e)))?;
    if !reply.ok || reply.version != HANDOFF_VERSION {
        return Err(err(
            &format!(
                "refused (handler protocol version {}, ours {HANDOFF_VERSION}): {}",
                reply.version,
                reply.error.unwrap_or_default()
            ),
            None,
        ));
    }
    conn.set_read_timeout(None)
        .map_err(|e| err("socket setup", Some(e)))?;
    Ok(conn)
}

/// Create vCPUs with the saved states (and, for `verify`, at that workload's entry).
pub(crate) fn build_vcpus(
    kvm: &kvm_ioctls::Kvm,
    vm: &kvm_ioctls::VmFd,
    states: &[crate::snapshot::VcpuState],
    cfg: &crate::VmConfig,
    verify: bool,
) -> Result<Vec<kvm_ioctls::VcpuFd>, RestoreError> {
    let cpuid = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(kvm_err("KVM_GET_SUPPORTED_CPUID"))
        .map_err(RestoreError::Vm)?;
    let mut vcpus = Vec::new();
    for (i, st) in states.iter().enumerate() {
        let vcpu = vm
            .create_vcpu(i as u64)
            .map_err(kvm_err("KVM_CREATE_VCPU"))
            .map_err(RestoreError::Vm)?;
        vcpu.set_cpuid2(&apic_cpuid(&cpuid, i as u32))
            .map_err(kvm_err("KVM_SET_CPUID2"))
            .map_err(RestoreError::Vm)?;
        st.restore(&vcpu)
            .map_err(|e| RestoreError::Snapshot(SnapshotError::State(e)))?;
        if verify {
            let regs =
                Vm::entry_regs_for(&vcpu, cfg, i, Workload::Verify).map_err(RestoreError::Vm)?;
            vcpu.set_regs(&regs)
                .map_err(kvm_err("KVM_SET_REGS"))
                .map_err(RestoreError::Vm)?;
        }
        vcpus.push(vcpu);
    }
    Ok(vcpus)
}

/// Restore the snapshot in `dir`. Everything about the snapshot is checked before the VM
/// exists; the returned VM has not run yet.
pub fn restore(dir: &Path, opts: &RestoreOptions) -> Result<Restored, RestoreError> {
    let t0 = Instant::now();
    let loaded: Loaded = snapshot::load(dir)?;
    let m = &loaded.manifest;
    if m.config.linux.is_some() {
        return Err(RestoreError::Unsupported(
            "snapshots of Linux guests".into(),
        ));
    }
    let mut cfg = m.config.clone();
    cfg.backend = Backend::Anonymous;
    let size = cfg.mem_bytes;
    let lazy = matches!(opts.mode, RestoreMode::Lazy | RestoreMode::Prefetch);
    let index = Arc::new(loaded.index.clone());
    if opts.page_handler.is_some() && !lazy {
        return Err(RestoreError::Unsupported(
            "an external page-fault handler serves lazy restores only (--mode lazy)".into(),
        ));
    }
    let mut bytes_read_upfront = 0;
    let mut prefetching = false;
    let (mem, pager) = match opts.mode {
        RestoreMode::Eager => {
            let mem =
                Arc::new(GuestMem::new(size, Backend::Anonymous).map_err(RestoreError::Memory)?);
            // SAFETY: the VM does not exist yet; nothing else touches this memory.
            bytes_read_upfront = unsafe { snapshot::load_eager(&loaded, &mem) }?;
            (mem, None)
        }
        RestoreMode::Mmap => {
            cfg.backend = Backend::PrivateFile;
            let mem =
                Arc::new(GuestMem::from_file(&loaded.memory, size).map_err(RestoreError::Memory)?);
            (mem, None)
        }
        RestoreMode::Lazy | RestoreMode::Prefetch => {
            let mem =
                Arc::new(GuestMem::new(size, Backend::Anonymous).map_err(RestoreError::Memory)?);
            let range = Range::new(mem.host_addr() as usize, size as usize)
                .map_err(|e| RestoreError::Uffd(e.to_string()))?;
            if let Some(path) = &opts.page_handler {
                let u = UffdBuilder::new()
                    .create()
                    .map_err(|e| RestoreError::Uffd(uffd::error_chain(&e)))?;
                u.register(range, RegisterMode::MISSING)
                    .map_err(|e| RestoreError::Uffd(uffd::error_chain(&e)))?;
                let handoff = Handoff {
                    protocol: HANDOFF_PROTOCOL.into(),
                    version: HANDOFF_VERSION,
                    vmm_pid: std::process::id(),
                    snapshot_dir: std::fs::canonicalize(dir).unwrap_or_else(|_| dir.into()),
                    uffd_features: u.features().bits(),
                    mappings: vec![HandoffMapping {
                        base_host_virt_addr: mem.host_addr() as u64,
                        size,
                        offset: 0,
                        page_size: snapshot::PAGE,
                    }],
                };
                let conn = connect_handler(path, &u, &handoff, opts.handler_timeout)?;
                (
                    mem,
                    Some(Pager {
                        kind: PagerKind::External {
                            conn,
                            _uffd: u,
                            path: path.clone(),
                        },
                        record_to: None,
                        watcher: None,
                        prefetch: None,
                    }),
                )
            } else {
                let ws = if opts.mode == RestoreMode::Prefetch {
                    WorkingSet::load(dir, loaded.index.pages)?
                } else {
                    None
                };
                let recording = opts.record || (opts.mode == RestoreMode::Prefetch && ws.is_none());
                let file = loaded
                    .memory
                    .try_clone()
                    .map_err(|source| SnapshotError::Io {
                        what: "reopening",
                        path: dir.join(snapshot::files::MEMORY),
                        source,
                    })?;
                let source = Arc::new(SnapshotSource::new(file, index.clone(), recording));
                let fl = FaultLoop::start(
                    &[Region { range, offset: 0 }],
                    source.clone(),
                    Config {
                        threads: 1,
                        batch_pages: opts.batch_pages.max(1),
                        ..Default::default()
                    },
                )
                .map_err(RestoreError::FaultLoop)?;
                let prefetch = ws.map(|ws| {
                    prefetching = true;
                    (
                        ws.pages.iter().map(|p| p * snapshot::PAGE).collect(),
                        opts.batch_pages.max(1),
                    )
                });
                (
                    mem,
                    Some(Pager {
                        kind: PagerKind::Local {
                            fl,
                            source,
                            recording,
                        },
                        record_to: Some(dir.to_path_buf()),
                        watcher: None,
                        prefetch,
                    }),
                )
            }
        }
    };
    let (kvm, vm) = kvm_vm_with(&mem, m.irqchip, false).map_err(RestoreError::Vm)?;
    loaded
        .vm
        .restore(&vm)
        .map_err(|e| RestoreError::Snapshot(SnapshotError::State(e)))?;
    let vcpus = build_vcpus(
        &kvm,
        &vm,
        &loaded.vcpus,
        &cfg,
        opts.then == AfterRestore::Verify,
    )?;
    let checksums = m
        .checksums
        .iter()
        .map(|c| u64::from_str_radix(c.trim_start_matches("0x"), 16))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|_| SnapshotError::Inconsistent("a checksum is not hex".into()))?;
    let heartbeats = m.heartbeats.clone();
    if opts.then == AfterRestore::Verify {
        cfg.workload = Workload::Verify;
        cfg.run_for = None;
    }
    let vm = Vm::from_parts(
        kvm,
        vm,
        mem,
        vcpus,
        cfg,
        t0,
        pager,
        if heartbeats.len() == loaded.vcpus.len() {
            heartbeats.clone()
        } else {
            vec![0; loaded.vcpus.len()]
        },
    )
    .map_err(RestoreError::Vm)?;
    Ok(Restored {
        vm,
        checksums,
        heartbeats,
        bytes_read_upfront,
        prefetching,
        t0,
        index,
    })
}
