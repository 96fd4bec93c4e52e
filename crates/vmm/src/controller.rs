//! The VM's controller: one thread (the one that calls [`RunningVm::wait`] or
//! [`RunningVm::next_event`]) owns the running VM and answers typed [`Command`]s with a
//! [`Response`] or a [`ControlError`]. HTTP lives elsewhere (`api`); so does long work:
//! snapshots and migrations run on threads of their own, so the controller keeps answering
//! (a `GET /vm` during a 1 GiB snapshot is answered at once; the snapshot's own answer comes
//! when it is written).
//!
//! What the lower layers report ([`Notice`]: guest events, failures, a migration's switchover)
//! arrives on the same channel as the commands, so the controller sees one ordered stream.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use serde::Serialize;
use thiserror::Error;

use crate::config::VmConfig;
use crate::devices::pci::DeviceStats;
use crate::guest::telemetry::{Telemetry, VcpuSummary};
use crate::guest::{Event, Workload};
use crate::memory::GuestMem;
use crate::migration::{self, IncomingOptions, MigrateRequest, Migration, MigrationError};
use crate::restore::{Pager, PagerError, PagerReport};
use crate::snapshot::{self, SnapshotError, SnapshotInfo};
use crate::vstate::control::STOP_DEADLINE;
use crate::vstate::kvm::KvmError;
use crate::vstate::machine::Joined;
use crate::vstate::{
    BoxError, Failure, Machine, Notice, Notifier, PauseOwner, Resumed, Vm, VmError,
};

/// A request to the controller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// The VM's state and configuration.
    GetVm,
    /// Take the operator's pause.
    Pause,
    /// Release the operator's pause.
    Resume,
    /// Stop the VM.
    Stop,
    /// Uptime, exits, heartbeats.
    Stats,
    /// Write a snapshot.
    SnapshotCreate {
        /// Where to write it.
        dir: std::path::PathBuf,
        /// Record a CRC per page as well.
        page_checksums: bool,
    },
    /// Start a migration, or resume one whose link was lost.
    Migrate(MigrateRequest),
    /// The migration's state, progress and statistics.
    MigrateStatus,
    /// The operator's decision after a migration failed with the guest in doubt (the
    /// destination may run it): the destination does not run it, run it here again.
    MigrateReclaim,
    /// Before boot: add or replace the virtio device called `id` (`PUT /drives/{id}`,
    /// `/network-interfaces/{id}`, `/vsock`, `/entropy`).
    PutDevice {
        /// Its name (a drive's or interface's id; `vsock`, `entropy`).
        id: String,
        /// The device.
        spec: crate::config::VirtioSpec,
    },
    /// Boot the configured VM (`PUT /actions` with `InstanceStart`).
    InstanceStart,
}

/// Whether the vCPUs run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum RunState {
    /// Not booted yet: the configuration can still change.
    #[serde(rename = "not_started")]
    NotStarted,
    /// They run.
    Running,
    /// Someone holds a pause.
    Paused,
    /// The VM is stopping.
    Stopping,
}

/// `GET /vm`.
#[derive(Debug, Clone, Serialize)]
pub struct VmInfo {
    /// Whether the vCPUs run.
    pub state: RunState,
    /// Who holds a pause.
    pub paused_by: Vec<PauseOwner>,
    /// The configuration.
    pub config: VmConfig,
}

/// One vCPU in [`VmStats`].
#[derive(Debug, Clone, Serialize)]
pub struct VcpuStats {
    /// vCPU.
    pub vcpu: u32,
    /// Heartbeats after the first.
    pub heartbeats: u32,
    /// Longest gap between heartbeats, µs.
    pub max_gap_us: u64,
    /// Host time of the last heartbeat, µs.
    pub last_heartbeat_us: Option<u64>,
}

/// `GET /vm/stats`.
#[derive(Debug, Clone, Serialize)]
pub struct VmStats {
    /// Since the VM was created, ms.
    pub uptime_ms: u64,
    /// VM exits handled.
    pub exits: u64,
    /// Whether someone holds a pause.
    pub paused: bool,
    /// VM creation to the first heartbeat, µs.
    pub boot_to_first_heartbeat_us: Option<u64>,
    /// Per vCPU.
    pub vcpus: Vec<VcpuStats>,
}

/// The controller's answer.
#[derive(Debug, Clone)]
pub enum Response {
    /// The VM's state.
    Vm(VmInfo),
    /// Done; nothing to say.
    Done,
    /// Statistics.
    Stats(VmStats),
    /// A snapshot was written.
    Snapshot(SnapshotInfo),
    /// A migration started (or its recovery did): its status.
    MigrationStarted(serde_json::Value),
    /// The migration's status.
    Migration(serde_json::Value),
}

/// Why the controller refused or failed a command.
#[derive(Debug, Error)]
pub enum ControlError {
    /// The snapshot failed or was refused.
    #[error("snapshot")]
    Snapshot(#[source] SnapshotError),
    /// Another long operation holds the VM.
    #[error("{0} is in progress")]
    Busy(&'static str),
    /// The operator's pause is released but someone else still holds one.
    #[error("the VM stays paused: held by {}", names(.0))]
    StillPaused(Vec<PauseOwner>),
    /// The guest was handed over to another host by a migration.
    #[error("the guest migrated away; it cannot run here again")]
    HandedOver,
    /// No migration to report or resume.
    #[error("no migration")]
    NoMigration,
    /// The migration cannot be resumed in its state.
    #[error("the migration is {0}, not postcopy-paused")]
    NotResumable(migration::State),
    /// Only the source resumes a migration.
    #[error("this side cannot resume the migration")]
    CannotResumeHere,
    /// A migration is running or the guest left already.
    #[error("a migration is already running or done")]
    MigrationDone,
    /// The last migration failed after the machine state went out: the guest may run at
    /// the destination.
    #[error(
        "the last migration failed after the destination got the guest's state: the guest may run there. If it does not, `PUT /migrate/reclaim` runs it here again; otherwise `PUT /vm/stop`"
    )]
    InDoubt,
    /// Nothing to reclaim.
    #[error("no migration left the guest in doubt")]
    NotInDoubt,
    /// The VM has parts a migration cannot carry yet.
    #[error("this VM cannot be migrated yet: a migration would not carry {}", .0.join(", "))]
    Uncarried(Vec<String>),
    /// A migration request without a destination.
    #[error("`to` is missing: where to migrate")]
    NoDestination,
    /// The migration's security could not be set up (credentials, or plain TCP refused).
    #[error("migration security")]
    Security(#[source] xfer::tls::TlsError),
    /// A vCPU's workload has finished.
    #[error("a vCPU has already stopped (its workload finished): nothing to migrate")]
    Finished,
    /// A KVM call failed.
    #[error("KVM")]
    Kvm(#[source] KvmError),
    /// A thread could not be started.
    #[error("cannot start the {what} thread")]
    Thread {
        /// Which.
        what: &'static str,
        /// Cause (errno kept).
        #[source]
        source: std::io::Error,
    },
    /// The controller is gone or did not answer in time.
    #[error("the VM is not answering (stopped?)")]
    Gone,
    /// A request that needs a running VM, before boot.
    #[error("the VM has not booted yet (PUT /actions with InstanceStart boots it)")]
    NotStarted,
    /// A pre-boot request after boot.
    #[error("the VM has booted: devices are set up before boot")]
    AfterBoot,
    /// The VM could not be built from its configuration.
    #[error("the VM cannot boot with this configuration")]
    Boot(#[source] VmError),
}

fn names(o: &[PauseOwner]) -> String {
    o.iter()
        .map(|o| format!("{o:?}").to_lowercase())
        .collect::<Vec<_>>()
        .join(", ")
}

/// A command's outcome.
pub type Reply = Result<Response, ControlError>;

pub(crate) enum Msg {
    Notice(Notice),
    Command(Command, Sender<Reply>),
}

/// Sends commands to a VM's controller (any thread).
#[derive(Clone)]
pub struct ControlHandle(pub(crate) Sender<Msg>);

impl ControlHandle {
    /// Ask the controller; [`ControlError::Gone`] if it is gone or does not answer within
    /// `timeout` (`None`: wait as long as it takes, e.g. for a snapshot).
    pub fn ask(&self, cmd: Command, timeout: Option<Duration>) -> Reply {
        let (tx, rx) = mpsc::channel();
        self.0
            .send(Msg::Command(cmd, tx))
            .map_err(|_| ControlError::Gone)?;
        match timeout {
            Some(t) => rx.recv_timeout(t).map_err(|_| ControlError::Gone)?,
            None => rx.recv().map_err(|_| ControlError::Gone)?,
        }
    }
}

/// Running the VM failed.
#[derive(Debug, Error)]
pub enum RunError {
    /// The machine (a vCPU) failed.
    #[error(transparent)]
    Vm(#[from] VmError),
    /// The page-fault handler failed.
    #[error("page-fault handler")]
    Pager(#[source] BoxError),
    /// An incoming migration failed after the guest started here.
    #[error("migration")]
    Migration(#[source] BoxError),
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
    /// `verify` after an incoming migration computed another checksum than the source had.
    #[error(
        "vCPU {vcpu}: `verify` computed {} here, but the source's memory had {at_source:#018x} at switchover",
        here.map_or("nothing".into(), crate::hex::fmt)
    )]
    SourceMismatch {
        /// vCPU.
        vcpu: u32,
        /// What the guest computed here.
        here: Option<u64>,
        /// What the source had.
        at_source: u64,
    },
    /// The workload did not finish in time.
    #[error("the guest did not finish within {0:?}")]
    Timeout(Duration),
    /// A vCPU thread panicked.
    #[error("a vCPU thread panicked")]
    Thread,
    /// A vCPU did not stop when asked (the kernel held it inside `KVM_RUN`).
    #[error("a vCPU did not stop within {0:?}")]
    Stuck(Duration),
}

impl From<Failure> for RunError {
    fn from(f: Failure) -> Self {
        match f {
            Failure::Vcpu(e) => RunError::Vm(e),
            Failure::Pager(e) => RunError::Pager(e),
            Failure::Migration(e) => RunError::Migration(e),
        }
    }
}

impl From<PagerError> for RunError {
    fn from(e: PagerError) -> Self {
        RunError::Pager(Box::new(e))
    }
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
    /// Of those, the guest's idle calls (`abi::PORT_IDLE`).
    pub idle_exits: u64,
    /// Stopped through the API before the workload finished.
    pub stopped: bool,
    /// Host time (µs since creation / restore start) of the first entry into the guest.
    pub first_run_us: Option<u64>,
    /// What the restore's page-fault handler did (lazy restores only).
    pub pager: Option<PagerReport>,
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
    pub devices: Vec<DeviceStats>,
    /// virtio-mmio devices and what went through them.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub virtio: Vec<crate::devices::virtio::VirtioDeviceStats>,
}

/// A running VM and its controller.
pub struct RunningVm {
    machine: Arc<Machine>,
    rx: Receiver<Msg>,
    tx: Sender<Msg>,
    notify: Notifier,
    telemetry: Telemetry,
    /// vCPU threads still in their loop.
    live: usize,
    stopped: bool,
    pager: Option<Pager>,
    /// An outgoing or incoming migration of this VM.
    migration: Option<Migration>,
    /// The guest left for another host (outgoing migration switched over).
    migrated: bool,
    /// Someone read the migration's final status through the API.
    final_seen: bool,
    /// A snapshot being written on its own thread, and whether it has answered.
    snapshot: Option<(JoinHandle<()>, Arc<AtomicBool>)>,
}

impl std::fmt::Debug for RunningVm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RunningVm")
            .field("machine", &self.machine)
            .finish_non_exhaustive()
    }
}

pub(crate) fn channel() -> (Sender<Msg>, Receiver<Msg>, Notifier) {
    let (tx, rx) = mpsc::channel();
    let ntx = tx.clone();
    let notify = Notifier::new(move |n| {
        let _ = ntx.send(Msg::Notice(n));
    });
    (tx, rx, notify)
}

impl Vm {
    /// Start the vCPU threads under a controller.
    pub fn start(self) -> Result<RunningVm, RunError> {
        RunningVm::start_with(self, None)
    }
}

impl RunningVm {
    /// Start `vm` with the page-fault handler of its restore (if any).
    pub fn start_with(vm: Vm, pager: Option<Pager>) -> Result<RunningVm, RunError> {
        let (tx, rx, notify) = channel();
        Self::launch(vm, pager, tx, rx, notify)
    }

    pub(crate) fn launch(
        vm: Vm,
        mut pager: Option<Pager>,
        tx: Sender<Msg>,
        rx: Receiver<Msg>,
        notify: Notifier,
    ) -> Result<RunningVm, RunError> {
        if let Some(p) = &mut pager {
            p.watch(notify.clone(), vm.control().clone())?;
        }
        let mut running = Self::launch_vm(vm, tx, rx, notify)?;
        if let Some(p) = &mut pager {
            p.launch()?;
        }
        running.pager = pager;
        Ok(running)
    }

    fn launch_vm(
        vm: Vm,
        tx: Sender<Msg>,
        rx: Receiver<Msg>,
        notify: Notifier,
    ) -> Result<RunningVm, VmError> {
        let telemetry = Telemetry::new(vm.config().vcpus as usize, vm.last_heartbeats().to_vec());
        let (vcpus, mem_mib) = (vm.config().vcpus, vm.config().mem_bytes >> 20);
        let machine = Arc::new(vm.launch(notify.clone())?);
        let live = machine.control().cpus.len();
        tracing::info!(vcpus, mem_mib, "VM started");
        Ok(RunningVm {
            machine,
            rx,
            tx,
            notify,
            telemetry,
            live,
            stopped: false,
            pager: None,
            migration: None,
            migrated: false,
            final_seen: false,
            snapshot: None,
        })
    }

    /// Wait for a migrating VM (`faultline run --incoming`) and run it here. Returns once the
    /// guest runs; post-copy goes on in the background.
    pub fn incoming(opts: &IncomingOptions) -> Result<RunningVm, MigrationError> {
        let (tx, rx, notify) = channel();
        let mut running = None;
        let inc = migration::incoming(opts, notify.clone(), |vm| {
            let r = Self::launch_vm(vm, tx, rx, notify)?;
            let control = r.machine.control().clone();
            running = Some(r);
            Ok(control)
        })?;
        let mut running = running.expect("the VM was started before the migration returned");
        running.migration = Some(inc.migration);
        Ok(running)
    }

    /// The running machine.
    pub fn machine(&self) -> &Arc<Machine> {
        &self.machine
    }

    /// Guest memory.
    pub fn memory(&self) -> &Arc<GuestMem> {
        self.machine.memory()
    }

    /// A handle through which the control API reaches this VM's controller.
    pub fn api_sender(&self) -> ControlHandle {
        ControlHandle(self.tx.clone())
    }

    /// Take the operator's pause (returns when every vCPU is parked or finished).
    pub fn pause(&self) {
        self.machine.control().pause(PauseOwner::Operator);
    }

    /// Release the operator's pause.
    pub fn resume(&self) -> Resumed {
        self.machine.control().resume(PauseOwner::Operator)
    }

    /// Write a snapshot on the calling thread (the API's `PUT /snapshot/create` runs it on a
    /// thread of its own instead).
    pub fn snapshot(
        &self,
        dir: &std::path::Path,
        page_checksums: bool,
    ) -> Result<SnapshotInfo, SnapshotError> {
        snapshot::create(&self.machine, dir, page_checksums)
    }

    /// The migration's status, if this VM has one (either side).
    pub fn migration_status(&self) -> Option<migration::Status> {
        self.migration.as_ref().map(|m| m.status.clone())
    }

    /// Host time (µs since the VM was created or its restore began) at which a vCPU first
    /// entered the guest; `None` before that.
    pub fn first_run_us(&self) -> Option<u64> {
        match self.machine.control().first_run_us.load(SeqCst) {
            0 => None,
            t => Some(t),
        }
    }

    /// What the restore's page-fault handler has done so far (`None`: not a lazy restore).
    pub fn pager_report(&self) -> Option<PagerReport> {
        self.pager.as_ref().map(|p| p.report())
    }

    /// The restore's prefetch: a handle to poll and the pages it was given (`None`: none).
    pub fn prefetch_progress(&self) -> Option<(memx::PrefetchProgress, u64)> {
        self.pager.as_ref().and_then(|p| p.prefetch_progress())
    }

    /// The host's checksum of vCPU `i`'s slice (the same function the guest computes).
    pub fn host_checksum(&self, i: usize) -> Result<u64, VmError> {
        self.machine.host_checksum(i)
    }

    /// vCPU `i`'s slice: (guest-physical start, length, index of its first page).
    pub fn slice(&self, i: usize) -> (u64, u64, u64) {
        let s = self.machine.slices()[i];
        (s.start, s.len, s.first_page)
    }

    fn snapshot_busy(&self) -> bool {
        self.snapshot
            .as_ref()
            .is_some_and(|(_, done)| !done.load(SeqCst))
    }

    fn migration_busy(&self) -> bool {
        self.migration.as_ref().is_some_and(|m| m.busy())
    }

    /// Answer `cmd`; `None` when the answer is sent later by the thread doing the work.
    fn answer(&mut self, cmd: Command, reply: &Sender<Reply>) -> Option<Reply> {
        let control = self.machine.control().clone();
        Some(match cmd {
            Command::GetVm => Ok(Response::Vm(VmInfo {
                state: if self.stopped {
                    RunState::Stopping
                } else if control.is_paused() {
                    RunState::Paused
                } else {
                    RunState::Running
                },
                paused_by: control.paused_by(),
                config: self.machine.config().clone(),
            })),
            Command::Pause => {
                control.pause(PauseOwner::Operator);
                Ok(Response::Done)
            }
            Command::Resume => match control.resume(PauseOwner::Operator) {
                Resumed::Running => Ok(Response::Done),
                Resumed::StillPaused => Err(ControlError::StillPaused(control.paused_by())),
                Resumed::HandedOver => Err(ControlError::HandedOver),
            },
            Command::Stop => {
                self.stopped = true;
                control.stop();
                Ok(Response::Done)
            }
            Command::Stats => Ok(Response::Stats(self.stats())),
            Command::SnapshotCreate {
                dir,
                page_checksums,
            } => {
                if self.snapshot_busy() {
                    return Some(Err(ControlError::Busy("a snapshot")));
                }
                if self.migration_busy() || self.migrated {
                    return Some(Err(ControlError::Busy("a migration")));
                }
                let uncarried = self.machine.uncarried();
                if !uncarried.is_empty() {
                    return Some(Err(ControlError::Snapshot(SnapshotError::Uncarried(
                        uncarried.into_iter().map(|u| u.0).collect(),
                    ))));
                }
                let machine = self.machine.clone();
                let reply = reply.clone();
                let done = Arc::new(AtomicBool::new(false));
                let d = done.clone();
                let spawned = thread::Builder::new()
                    .name("snapshot".into())
                    .spawn(move || {
                        let r = snapshot::create(&machine, &dir, page_checksums)
                            .map(Response::Snapshot)
                            .map_err(ControlError::Snapshot);
                        d.store(true, SeqCst);
                        let _ = reply.send(r);
                    });
                match spawned {
                    Ok(t) => {
                        self.snapshot = Some((t, done));
                        return None;
                    }
                    Err(source) => Err(ControlError::Thread {
                        what: "snapshot",
                        source,
                    }),
                }
            }
            Command::Migrate(req) => self.start_migration(req),
            Command::MigrateReclaim => self.reclaim(),
            Command::PutDevice { .. } | Command::InstanceStart => Err(ControlError::AfterBoot),
            Command::MigrateStatus => match &self.migration {
                Some(m) => {
                    if m.status.is_final() {
                        self.final_seen = true;
                    }
                    Ok(Response::Migration(m.status.json()))
                }
                None => Err(ControlError::NoMigration),
            },
        })
    }

    fn stats(&self) -> VmStats {
        let control = self.machine.control();
        VmStats {
            uptime_ms: control.t0().elapsed().as_millis() as u64,
            exits: control.exits.load(SeqCst),
            paused: control.is_paused(),
            boot_to_first_heartbeat_us: self.telemetry.first_hb_us,
            vcpus: self
                .telemetry
                .vcpus
                .iter()
                .enumerate()
                .map(|(i, v)| VcpuStats {
                    vcpu: i as u32,
                    heartbeats: v.heartbeats,
                    max_gap_us: v.max_gap_us,
                    last_heartbeat_us: self.telemetry.last_hb_us[i],
                })
                .collect(),
        }
    }

    /// Whether the last migration left the guest in doubt (see [`ControlError::InDoubt`]).
    fn in_doubt(&self) -> bool {
        self.migration
            .as_ref()
            .is_some_and(|m| !m.busy() && m.status.get().in_doubt)
    }

    /// `PUT /migrate/reclaim`: the operator says the destination does not run the guest.
    fn reclaim(&mut self) -> Reply {
        if !self.in_doubt() {
            return Err(ControlError::NotInDoubt);
        }
        if let Some(m) = &self.migration {
            m.status.update(|s| {
                s.in_doubt = false;
                s.error = Some(format!(
                    "{}; reclaimed by the operator: the guest runs here",
                    s.error.clone().unwrap_or_default()
                ));
            });
        }
        match self.machine.control().resume(PauseOwner::Migration) {
            Resumed::Running | Resumed::StillPaused => Ok(Response::Done),
            Resumed::HandedOver => Err(ControlError::HandedOver),
        }
    }

    fn start_migration(&mut self, req: MigrateRequest) -> Reply {
        if req.resume {
            let m = self.migration.as_ref().ok_or(ControlError::NoMigration)?;
            let Some(resume) = m.resume.as_ref() else {
                return Err(ControlError::CannotResumeHere);
            };
            let state = m.status.state();
            if state != migration::State::PostcopyPaused {
                return Err(ControlError::NotResumable(state));
            }
            // `resuming` first: the migration thread moves on from there.
            m.status
                .go(migration::State::Resuming)
                .map_err(|e| ControlError::NotResumable(e.from))?;
            return match resume.send(req.to.clone()) {
                Ok(()) => Ok(Response::MigrationStarted(m.status.json())),
                Err(_) => Err(ControlError::CannotResumeHere),
            };
        }
        if self.migration_busy() || self.migrated {
            return Err(ControlError::MigrationDone);
        }
        if self.in_doubt() {
            return Err(ControlError::InDoubt);
        }
        if self.snapshot_busy() {
            return Err(ControlError::Busy("a snapshot"));
        }
        let uncarried = self.machine.uncarried();
        if !uncarried.is_empty() {
            return Err(ControlError::Uncarried(
                uncarried.into_iter().map(|u| u.0).collect(),
            ));
        }
        if !self.machine.all_running() {
            return Err(ControlError::Finished);
        }
        let to = req.to.as_ref().ok_or(ControlError::NoDestination)?;
        let security = to
            .security(req.tls.as_ref(), req.insecure)
            .map_err(ControlError::Security)?;
        let msr_list = self.machine.msr_list().map_err(ControlError::Kvm)?;
        let ctx = migration::source::SourceCtx {
            security,
            control: self.machine.control().clone(),
            vm: self.machine.vm_fd().clone(),
            mem: self.machine.memory().clone(),
            msr_list,
            irqchip: self.machine.irqchip(),
            cfg: self.machine.config().clone(),
            slices: self
                .machine
                .slices()
                .iter()
                .map(|s| (s.start, s.len))
                .collect(),
            notify: self.notify.clone(),
            devices: self.machine.devices(),
        };
        let status = migration::Status::new(migration::Role::Source, Some(req.mode));
        let (rtx, rrx) = mpsc::channel();
        let st = status.clone();
        let th = thread::Builder::new()
            .name("migration-out".into())
            .spawn(move || migration::source::run(ctx, req, st, rrx))
            .map_err(|source| ControlError::Thread {
                what: "migration",
                source,
            })?;
        // A new migration's final status has not been read (an earlier failed one's was).
        self.final_seen = false;
        self.migration = Some(Migration {
            status: status.clone(),
            resume: Some(rtx),
            thread: Some(th),
        });
        Ok(Response::MigrationStarted(status.json()))
    }

    /// Take a notice into account; a failure is returned.
    fn absorb(&mut self, n: Notice) -> Result<Option<Event>, RunError> {
        match n {
            Notice::Event(e) => {
                if self.telemetry.absorb(&e) {
                    self.stopped = true;
                    self.machine.control().stop();
                }
                Ok(Some(e))
            }
            Notice::Failed(f) => Err(f.into()),
            Notice::Exited(_) => {
                self.live = self.live.saturating_sub(1);
                Ok(None)
            }
            Notice::Migrated => {
                self.migrated = true;
                self.stopped = true;
                self.machine.control().stop();
                Ok(None)
            }
        }
    }

    fn handle(&mut self, cmd: Command, reply: Sender<Reply>) {
        if let Some(r) = self.answer(cmd, &reply) {
            let _ = reply.send(r);
        }
    }

    /// The next guest event, waiting at most `timeout` (`Ok(None)`: none came). A failure of
    /// the VM is returned as the error.
    pub fn next_event(&mut self, timeout: Duration) -> Result<Option<Event>, RunError> {
        loop {
            match self.rx.recv_timeout(timeout) {
                Ok(Msg::Notice(n)) => {
                    if let Some(e) = self.absorb(n)? {
                        return Ok(Some(e));
                    }
                }
                Ok(Msg::Command(c, reply)) => self.handle(c, reply),
                Err(_) => return Ok(None),
            }
        }
    }

    /// Stop every vCPU now and release the VM.
    pub fn stop(mut self) {
        if self.machine.stop_and_join() != Joined::Stuck {
            self.join_snapshot();
        }
        if let Some(p) = self.pager.take() {
            let _ = p.finish();
        }
    }

    fn join_snapshot(&mut self) {
        if let Some((t, _)) = self.snapshot.take() {
            let _ = t.join();
        }
    }

    /// Run until every vCPU's workload is done (or `timeout`), passing each event to
    /// `on_event`; then check each guest checksum against the host's reading of guest memory.
    pub fn wait(
        mut self,
        timeout: Duration,
        mut on_event: impl FnMut(&Event),
    ) -> Result<RunSummary, RunError> {
        let deadline = Instant::now() + timeout;
        let mut failure = None;
        // After an outgoing migration, linger (at most 5 s) until its final status has been
        // read through the API, so `faultline migrate` can print it.
        let mut linger: Option<Instant> = None;
        // A vCPU that does not stop when asked ends the loop (it ends with the process).
        let mut stuck = false;
        while !stuck
            && (self.live > 0
                || (self.migration_busy() && failure.is_none())
                || (self.migrated
                    && !self.final_seen
                    && linger.get_or_insert_with(Instant::now).elapsed() < Duration::from_secs(5)))
        {
            let left = deadline.saturating_duration_since(Instant::now());
            let tick = if self.live > 0 {
                left
            } else {
                left.min(Duration::from_millis(50))
            };
            match self.rx.recv_timeout(tick) {
                Ok(Msg::Notice(n)) => match self.absorb(n) {
                    Ok(Some(e)) => on_event(&e),
                    Ok(None) => {}
                    Err(e) => {
                        failure.get_or_insert(e);
                        stuck = !self.machine.control().stop();
                    }
                },
                Ok(Msg::Command(c, reply)) => self.handle(c, reply),
                Err(RecvTimeoutError::Timeout) if self.live == 0 && Instant::now() < deadline => {}
                Err(RecvTimeoutError::Timeout) => {
                    failure.get_or_insert(RunError::Timeout(timeout));
                    stuck = !self.machine.control().stop();
                }
                Err(RecvTimeoutError::Disconnected) => break,
            }
        }
        let joined = self.machine.join();
        if joined != Joined::Stuck {
            self.join_snapshot();
        }
        if let Some(e) = failure {
            if let Some(p) = self.pager.take() {
                let _ = p.finish();
            }
            return Err(e);
        }
        match joined {
            Joined::All => {}
            Joined::Panicked => return Err(RunError::Thread),
            Joined::Stuck => return Err(RunError::Stuck(STOP_DEADLINE)),
        }
        let pager = match self.pager.take() {
            Some(p) => Some(p.finish()?),
            None => None,
        };
        self.summarize(pager)
    }

    fn summarize(&self, pager: Option<PagerReport>) -> Result<RunSummary, RunError> {
        let mut verified = true;
        for i in 0..self.machine.slices().len() {
            let Some(guest) = self.telemetry.vcpus[i].checksum else {
                verified = false;
                continue;
            };
            let host = self.machine.host_checksum(i)?;
            if guest != host {
                return Err(RunError::Checksum {
                    vcpu: i as u32,
                    guest,
                    host,
                });
            }
        }
        let mut matches_source = None;
        if self.machine.config().workload == Workload::Verify
            && let Some(src) = self
                .migration
                .as_ref()
                .and_then(|m| m.status.get().source_checksums)
        {
            for (i, &want) in src.iter().enumerate() {
                let got = self.telemetry.vcpus.get(i).and_then(|s| s.checksum);
                if got != Some(want) {
                    return Err(RunError::SourceMismatch {
                        vcpu: i as u32,
                        here: got,
                        at_source: want,
                    });
                }
            }
            matches_source = Some(true);
        }
        let control = self.machine.control();
        Ok(RunSummary {
            boot_to_first_heartbeat_us: self.telemetry.first_hb_us,
            vcpus: self.telemetry.vcpus.clone(),
            checksums_verified: verified,
            wall_ms: control.t0().elapsed().as_millis() as u64,
            exits: control.exits.load(SeqCst),
            idle_exits: control.idle_exits.load(SeqCst),
            stopped: self.stopped,
            config: self.machine.config().clone(),
            first_run_us: self.first_run_us(),
            pager,
            migrated: self.migrated,
            migration: self.migration.as_ref().map(|m| m.status.json()),
            matches_source,
            reports: self.telemetry.reports.clone(),
            devices: self.machine.pci().map(|p| p.stats()).unwrap_or_default(),
            virtio: self.machine.virtio().map(|v| v.stats()).unwrap_or_default(),
        })
    }
}

impl Drop for RunningVm {
    fn drop(&mut self) {
        if self.machine.stop_and_join() != Joined::Stuck {
            self.join_snapshot();
        }
    }
}
