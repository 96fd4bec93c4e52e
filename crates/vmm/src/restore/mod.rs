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
//! serves: when it closes (the handler exited or crashed), or when a fault stays unread by the
//! handler for longer than `handler_timeout` (it is stopped or stuck), the VM stops with an
//! error instead of leaving vCPUs blocked on faults nobody will serve: the VMM takes the
//! userfaultfd back and poisons every fault from then on ([`Pager`]).

mod handoff;
mod pager;

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use memx::{Config, FaultLoop, Region};
use serde::{Deserialize, Serialize};
use thiserror::Error;
use uffd::{Range, RegisterMode, UffdBuilder};

use crate::guest::Workload;
use crate::memory::{Backend, GuestMem};
use crate::snapshot::{self, Loaded, SnapshotError, SnapshotSource, WorkingSet};
use crate::vstate::kvm::create_vm;
use crate::vstate::machine::{BuildError, Parts, build_vcpus};
use crate::vstate::{StateError, Vm, VmError};

use handoff::connect_handler;
pub use handoff::{
    HANDOFF_PROTOCOL, HANDOFF_VERSION, Handoff, HandoffMapping, HandoffReply, msg_len, parse_body,
    recv_msg, send_msg,
};
use pager::PagerKind;
pub use pager::{Pager, PagerError, PagerReport};

/// How guest memory is brought back.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RestoreMode {
    /// Read every page, then run.
    Eager,
    /// Map the memory file privately (copy-on-write): no copy is made. Every chunk CRC is
    /// checked through the mapping before the guest runs. If the file shrinks while the VM
    /// runs, the VM fails with an error naming it (not the process with SIGBUS; see
    /// [`crate::memory::file`]).
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
    /// How long to wait for the handler to connect and answer the hand-off, and how long a
    /// page fault may then stay unread by it before the VM is stopped as stuck.
    pub handler_timeout: Duration,
    /// Pages served per fault (and per prefetch ioctl) by the in-process fault loop.
    pub batch_pages: usize,
    /// Record the working set of a `lazy` restore too (a `prefetch` restore records when the
    /// snapshot has none yet).
    pub record: bool,
    /// The backends of the snapshot's virtio devices, named here as `run` takes them: the
    /// same kinds in the same order (`config::rebind_virtio`).
    pub virtio: Vec<crate::config::VirtioSpec>,
    /// Where a Linux guest's console goes here (a file, or stdout).
    pub console: Option<PathBuf>,
    /// The servers of the snapshot's vfio-user devices, started here: one for each, in the
    /// same order (`config::rebind_vfio_user`).
    pub vfio_user: Vec<PathBuf>,
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
            virtio: Vec::new(),
            console: None,
            vfio_user: Vec::new(),
        }
    }
}

/// Setting up the userfaultfd of a lazy restore failed.
#[derive(Debug, Error)]
pub enum UffdError {
    /// Guest memory is not a valid range.
    #[error("guest memory range")]
    Range(#[source] uffd::RangeError),
    /// The userfaultfd could not be created.
    #[error("creating it")]
    Create(#[source] uffd::CreateError),
    /// Guest memory could not be registered.
    #[error("registering guest memory")]
    Register(#[source] uffd::RegisterError),
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
    /// The VM-wide state could not be restored.
    #[error("restoring the VM's state (irqchip, PIT, clock)")]
    State(#[source] StateError),
    /// The vCPUs could not be rebuilt.
    #[error("rebuilding the vCPUs")]
    Build(#[source] BuildError),
    /// Guest memory could not be created.
    #[error("guest memory")]
    Memory(#[source] crate::memory::MemoryError),
    /// The fault loop could not start.
    #[error("fault loop")]
    FaultLoop(#[source] memx::LoopError),
    /// The userfaultfd could not be created or registered.
    #[error("userfaultfd")]
    Uffd(#[source] UffdError),
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

/// A restored VM, not yet started, and what the snapshot says it should compute.
pub struct Restored {
    /// The VM.
    pub vm: Vm,
    /// Its page-fault handler (lazy restores): start the two together
    /// (`RunningVm::start_with`).
    pub pager: Option<Pager>,
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

/// Restore the snapshot in `dir`. Everything about the snapshot is checked before the VM
/// exists; the returned VM has not run yet.
pub fn restore(dir: &Path, opts: &RestoreOptions) -> Result<Restored, RestoreError> {
    let t0 = Instant::now();
    let loaded: Loaded = snapshot::load(dir)?;
    let m = &loaded.manifest;
    if m.config.linux.is_some() && opts.then == AfterRestore::Verify {
        return Err(RestoreError::Unsupported(
            "--verify runs the built-in guest's check; this is a snapshot of a Linux guest".into(),
        ));
    }
    let mut cfg = m.config.clone();
    cfg.virtio = crate::config::rebind_virtio(&m.config.virtio, &opts.virtio)
        .map_err(|e| RestoreError::Vm(VmError::Config(e)))?;
    cfg.console = opts.console.clone();
    cfg.vfio_user = crate::config::rebind_vfio_user(&m.config.vfio_user, &opts.vfio_user)
        .map_err(|e| RestoreError::Vm(VmError::Config(e)))?;
    cfg.backend = Backend::Anonymous;
    // vfio-user devices map an eager restore's memory (a memfd); other modes' memory
    // reaches them through messages the VMM serves (`devices::pci::dma`).
    let pci = !cfg.vfio_user.is_empty();
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
            if pci {
                // Devices DMA into guest memory through its memfd.
                cfg.backend = Backend::Memfd;
            }
            let mem = Arc::new(GuestMem::new(size, cfg.backend).map_err(RestoreError::Memory)?);
            // SAFETY: the VM does not exist yet; nothing else touches this memory.
            bytes_read_upfront = unsafe { snapshot::load_eager(&loaded, &mem) }?;
            (mem, None)
        }
        RestoreMode::Mmap => {
            cfg.backend = Backend::PrivateFile;
            let mem =
                Arc::new(GuestMem::from_file(&loaded.memory, size).map_err(RestoreError::Memory)?);
            // A file shrinking from here on fails the VM, not the process (`memory::file`).
            crate::vstate::vcpu::install_signal_handlers().map_err(RestoreError::Vm)?;
            // Every chunk's CRC, before the guest runs (read through the mapping: no copy).
            // SAFETY: the VM does not exist yet; nothing else touches this memory.
            bytes_read_upfront = unsafe { snapshot::verify_mapped(&loaded, &mem) }?;
            (mem, None)
        }
        RestoreMode::Lazy | RestoreMode::Prefetch => {
            let mem =
                Arc::new(GuestMem::new(size, Backend::Anonymous).map_err(RestoreError::Memory)?);
            mem.set_on_demand();
            let range = Range::new(mem.host_addr() as usize, size as usize)
                .map_err(|e| RestoreError::Uffd(UffdError::Range(e)))?;
            if let Some(path) = &opts.page_handler {
                let u = UffdBuilder::new()
                    .create()
                    .map_err(|e| RestoreError::Uffd(UffdError::Create(e)))?;
                u.register(range, RegisterMode::MISSING)
                    .map_err(|e| RestoreError::Uffd(UffdError::Register(e)))?;
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
                            uffd: Some(u),
                            range,
                            path: path.clone(),
                            deadline: opts.handler_timeout,
                        },
                        record_to: None,
                        watcher: None,
                        prefetch: None,
                        prefetch_total: 0,
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
                        prefetch_total: 0,
                    }),
                )
            }
        }
    };
    let (kvm, vm, irqchip) =
        create_vm(&mem, m.irqchip, false).map_err(|e| RestoreError::Vm(e.into()))?;
    if irqchip != m.irqchip {
        return Err(RestoreError::Unsupported(
            "the snapshot has in-kernel irqchip state, and this host's KVM offers no irqchip"
                .into(),
        ));
    }
    loaded.vm.restore(&vm).map_err(RestoreError::State)?;
    let vcpus = build_vcpus(
        &kvm,
        &vm,
        &loaded.vcpus,
        &cfg,
        opts.then == AfterRestore::Verify,
    )
    .map_err(RestoreError::Build)?;
    let checksums = m.checksums.clone();
    let heartbeats = m.heartbeats.clone();
    if opts.then == AfterRestore::Verify {
        cfg.workload = Workload::Verify;
        cfg.run_for = None;
    }
    let vm = Vm::from_parts(Parts {
        kvm,
        vm: Arc::new(vm),
        built: None,
        irqchip,
        mem,
        vcpus,
        cfg,
        t0,
        last_heartbeat: if heartbeats.len() == loaded.vcpus.len() {
            heartbeats.clone()
        } else {
            vec![0; loaded.vcpus.len()]
        },
        devices: loaded.vm.devices.clone(),
    })
    .map_err(RestoreError::Vm)?;
    Ok(Restored {
        vm,
        pager,
        checksums,
        heartbeats,
        bytes_read_upfront,
        prefetching,
        t0,
        index,
    })
}
