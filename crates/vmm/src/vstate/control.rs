//! Who may run the vCPUs: pause and stop with owners, parking, jobs run by a parked vCPU on its
//! own file descriptor, and what the rest of the VMM sees of each vCPU without asking it.
//!
//! # Pause has owners
//! The operator (`PUT /vm/pause`), a snapshot and a migration each hold their own pause. The
//! vCPUs run only when nobody holds one: a snapshot's resume does not release the operator's
//! pause, and an operator's resume during a migration's switchover does not let the source
//! guest run while its state and pages are being sent. Once a migration has handed the guest
//! over ([`VcpuControl::hand_over`]), nobody can resume it here.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering::SeqCst};
use std::sync::mpsc;
use std::sync::{Condvar, Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

use kvm_ioctls::VcpuFd;
use serde::Serialize;

use super::state::{StateError, VcpuState};

/// Who holds a pause.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PauseOwner {
    /// The operator, through the API.
    Operator,
    /// A snapshot being written.
    Snapshot,
    /// An outgoing migration (switchover and after).
    Migration,
}

impl PauseOwner {
    const ALL: [PauseOwner; 3] = [Self::Operator, Self::Snapshot, Self::Migration];

    fn bit(self) -> u8 {
        match self {
            Self::Operator => 1,
            Self::Snapshot => 2,
            Self::Migration => 4,
        }
    }
}

/// What became of a resume.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resumed {
    /// Nobody else holds a pause: the vCPUs run.
    Running,
    /// This owner's pause is released, but others still hold theirs.
    StillPaused,
    /// The guest was handed over to another host: it never runs here again.
    HandedOver,
}

/// Work a parked vCPU thread does on its own vCPU (saving state for a snapshot).
pub type Job = Box<dyn FnOnce(&mut VcpuFd) + Send>;

#[derive(Default)]
struct PauseState {
    owners: u8,
    handed_over: bool,
    stop: bool,
    jobs: Vec<Option<Job>>,
}

impl PauseState {
    fn held(&self) -> bool {
        self.owners != 0 || self.handed_over
    }
}

/// What the controller and the migration threads see of one vCPU without asking it.
#[derive(Debug, Default)]
pub struct CpuTrack {
    /// Host `CLOCK_MONOTONIC` ns of the last heartbeat (number 1 or later); 0: none yet.
    pub last_hb_ns: AtomicU64,
    /// Host `CLOCK_MONOTONIC` ns of the first heartbeat (number 1 or later); 0: none yet.
    pub first_hb_ns: AtomicU64,
    /// Longest gap between heartbeats since the last reset, ns.
    pub max_gap_ns: AtomicU64,
    /// Last heartbeat number.
    pub last_n: AtomicU32,
    /// Linux thread id of the vCPU thread (0 before it starts).
    pub tid: AtomicU32,
    /// The thread has returned from its loop.
    pub exited: AtomicBool,
    /// Heartbeats with their host `CLOCK_MONOTONIC` ns: the first [`BEATS_KEPT`] and the last
    /// [`BEATS_KEPT`] (a migration report's timeline around the pause).
    pub beats: std::sync::Mutex<Beats>,
}

/// Heartbeats a [`CpuTrack`] keeps, at each end.
pub const BEATS_KEPT: usize = 64;

/// The first and the last heartbeats of a vCPU: `(number, CLOCK_MONOTONIC ns)`.
#[derive(Debug, Default, Clone)]
pub struct Beats {
    /// The first ones (up to [`BEATS_KEPT`]).
    pub first: Vec<(u32, u64)>,
    /// The most recent ones (up to [`BEATS_KEPT`]), oldest first.
    pub last: std::collections::VecDeque<(u32, u64)>,
}

impl CpuTrack {
    /// Record heartbeat number `n` at host time `now_ns`.
    pub fn heartbeat(&self, n: u32, now_ns: u64) {
        if let Ok(mut b) = self.beats.lock() {
            if b.first.len() < BEATS_KEPT {
                b.first.push((n, now_ns));
            }
            if b.last.len() == BEATS_KEPT {
                b.last.pop_front();
            }
            b.last.push_back((n, now_ns));
        }
        if n >= 1 {
            let _ = self.first_hb_ns.compare_exchange(0, now_ns, SeqCst, SeqCst);
            let last = self.last_hb_ns.swap(now_ns, SeqCst);
            if last != 0 {
                self.max_gap_ns
                    .fetch_max(now_ns.saturating_sub(last), SeqCst);
            }
        }
        self.last_n.store(n, SeqCst);
    }
}

/// Host `CLOCK_MONOTONIC` in ns (comparable across processes on one host).
pub use xfer::hops::mono_ns;

/// The signal that interrupts `KVM_RUN` (EINTR) so a vCPU can park or stop.
pub fn kick_signal() -> libc::c_int {
    vmm_sys_util::signal::SIGRTMIN()
}

/// How long [`VcpuControl::stop`] waits for the vCPUs.
pub const STOP_DEADLINE: Duration = Duration::from_secs(10);

/// Pause, stop and jobs for every vCPU of one VM, shared by the controller, the vCPU threads
/// and long-running work (snapshot, migration).
pub struct VcpuControl {
    t0: Instant,
    pause_req: AtomicBool,
    stop_req: AtomicBool,
    parked: AtomicU32,
    state: Mutex<PauseState>,
    cv: Condvar,
    /// VM exits handled (all vCPUs).
    pub exits: AtomicU64,
    /// Of those, the guest's idle calls (`abi::PORT_IDLE`): not a device's cost.
    pub idle_exits: AtomicU64,
    /// Host time (µs since `t0`) at which the first vCPU first entered `KVM_RUN`; 0: not yet.
    pub first_run_us: AtomicU64,
    /// Per vCPU: heartbeat timing, thread id, whether its thread has ended.
    pub cpus: Vec<CpuTrack>,
    /// The vCPU threads (for the kick signal); filled when they start.
    pthreads: Mutex<Vec<libc::pthread_t>>,
}

impl std::fmt::Debug for VcpuControl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VcpuControl")
            .field("vcpus", &self.cpus.len())
            .field("paused_by", &self.paused_by())
            .finish()
    }
}

impl VcpuControl {
    /// Control for `vcpus` vCPUs whose clock starts at `t0`.
    pub fn new(t0: Instant, vcpus: usize) -> VcpuControl {
        VcpuControl {
            t0,
            pause_req: AtomicBool::new(false),
            stop_req: AtomicBool::new(false),
            parked: AtomicU32::new(0),
            state: Mutex::new(PauseState {
                jobs: (0..vcpus).map(|_| None).collect(),
                ..Default::default()
            }),
            cv: Condvar::new(),
            exits: AtomicU64::new(0),
            idle_exits: AtomicU64::new(0),
            first_run_us: AtomicU64::new(0),
            cpus: (0..vcpus).map(|_| CpuTrack::default()).collect(),
            pthreads: Mutex::new(Vec::new()),
        }
    }

    fn lock(&self) -> MutexGuard<'_, PauseState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The VM's time origin.
    pub fn t0(&self) -> Instant {
        self.t0
    }

    /// µs since the time origin.
    pub fn now_us(&self) -> u64 {
        self.t0.elapsed().as_micros() as u64
    }

    /// Record the vCPU threads (for kicks).
    pub fn set_threads(&self, threads: Vec<libc::pthread_t>) {
        *self.pthreads.lock().unwrap_or_else(|e| e.into_inner()) = threads;
    }

    /// Whether the vCPUs are held (someone holds a pause, or the guest was handed over).
    pub fn is_paused(&self) -> bool {
        self.lock().held()
    }

    /// Who holds a pause now.
    pub fn paused_by(&self) -> Vec<PauseOwner> {
        let owners = self.lock().owners;
        PauseOwner::ALL
            .into_iter()
            .filter(|o| owners & o.bit() != 0)
            .collect()
    }

    /// Whether the guest was handed over to another host.
    pub fn handed_over(&self) -> bool {
        self.lock().handed_over
    }

    /// vCPU threads not yet finished.
    pub fn running(&self) -> u32 {
        self.cpus.iter().filter(|c| !c.exited.load(SeqCst)).count() as u32
    }

    /// Kick the vCPU threads until `done`; `false` if `deadline` passed first.
    fn kick_until(&self, done: impl Fn() -> bool, deadline: Option<Instant>) -> bool {
        // A kick can land outside KVM_RUN and be lost: repeat until the vCPUs answer.
        while !done() {
            if deadline.is_some_and(|d| Instant::now() >= d) {
                return false;
            }
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
        true
    }

    /// Take `owner`'s pause without waiting for the vCPUs to park (for vCPUs that have not
    /// started yet: they park before their first entry).
    pub fn hold(&self, owner: PauseOwner) {
        self.lock().owners |= owner.bit();
        self.pause_req.store(true, SeqCst);
        self.cv.notify_all();
    }

    /// Take `owner`'s pause and return once every vCPU is parked or finished.
    pub fn pause(&self, owner: PauseOwner) {
        self.hold(owner);
        self.kick_until(|| self.parked.load(SeqCst) >= self.running(), None);
    }

    /// Release `owner`'s pause; the vCPUs run again only if nobody else holds one.
    pub fn resume(&self, owner: PauseOwner) -> Resumed {
        let mut st = self.lock();
        st.owners &= !owner.bit();
        if st.handed_over {
            return Resumed::HandedOver;
        }
        if st.owners != 0 {
            return Resumed::StillPaused;
        }
        self.pause_req.store(false, SeqCst);
        drop(st);
        self.cv.notify_all();
        Resumed::Running
    }

    /// The guest now belongs to another host: the vCPUs stay parked whoever resumes.
    pub fn hand_over(&self) {
        self.lock().handed_over = true;
        self.pause_req.store(true, SeqCst);
    }

    /// Stop every vCPU: returns `true` when all have finished, `false` if one still runs
    /// after [`STOP_DEADLINE`] (a vCPU the kernel keeps inside `KVM_RUN`, e.g. on a page fault
    /// nobody serves; it ends with the process).
    pub fn stop(&self) -> bool {
        self.lock().stop = true;
        self.stop_req.store(true, SeqCst);
        self.cv.notify_all();
        self.kick_until(|| self.running() == 0, Some(Instant::now() + STOP_DEADLINE))
    }

    /// Whether a stop was asked for.
    pub fn stop_requested(&self) -> bool {
        self.stop_req.load(SeqCst)
    }

    /// Whether a pause was asked for (checked by a vCPU before each entry).
    pub fn pause_requested(&self) -> bool {
        self.pause_req.load(SeqCst)
    }

    /// A guest-requested sleep that a pause or stop cuts short (the guest re-checks its clock
    /// and sleeps again if it must).
    pub fn sleep(&self, d: Duration) {
        let deadline = Instant::now() + d;
        let mut st = self.lock();
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

    /// Park vCPU `id` (its thread calls this when a pause is asked for): run the jobs handed
    /// to it, wait until nobody holds a pause. Returns whether the vCPU must stop.
    pub fn park(&self, id: u32, vcpu: &mut VcpuFd) -> bool {
        let mut st = self.lock();
        self.parked.fetch_add(1, SeqCst);
        loop {
            if let Some(job) = st.jobs.get_mut(id as usize).and_then(Option::take) {
                drop(st);
                job(vcpu);
                st = self.lock();
                continue;
            }
            if !st.held() || st.stop {
                break;
            }
            st = self.cv.wait(st).unwrap_or_else(|e| e.into_inner());
        }
        self.parked.fetch_sub(1, SeqCst);
        st.stop
    }

    /// Note the first entry into the guest.
    pub fn note_first_run(&self) {
        if self.first_run_us.load(SeqCst) == 0 {
            let _ = self
                .first_run_us
                .compare_exchange(0, self.now_us().max(1), SeqCst, SeqCst);
        }
    }

    /// Reset every vCPU's longest heartbeat gap.
    pub fn reset_gaps(&self) {
        for c in &self.cpus {
            c.max_gap_ns.store(0, SeqCst);
        }
    }

    /// Save every parked vCPU's state, each on its own thread (after completing its last
    /// exit). The vCPUs must be paused.
    pub fn save_vcpus(&self, msr_list: &[u32], lapic: bool) -> Result<Vec<VcpuState>, SaveError> {
        let n = self.cpus.len();
        let mut rxs = Vec::new();
        {
            let mut st = self.lock();
            if !st.held() {
                return Err(SaveError::NotPaused);
            }
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
                .map_err(|_| SaveError::NoAnswer { vcpu: i as u32 })?
                .map_err(|source| SaveError::State {
                    vcpu: i as u32,
                    source,
                })?;
            vcpus.push(st);
        }
        Ok(vcpus)
    }
}

/// Saving the vCPUs' state failed.
#[derive(Debug, thiserror::Error)]
pub enum SaveError {
    /// A KVM call failed.
    #[error(transparent)]
    Kvm(#[from] super::kvm::KvmError),
    /// The VM-wide state could not be read.
    #[error("VM state (irqchip, PIT, clock)")]
    Vm(#[source] StateError),
    /// The vCPUs were not paused.
    #[error("the vCPUs must be paused to save their state")]
    NotPaused,
    /// A device's state could not be taken.
    #[error("device state")]
    Devices(#[source] crate::devices::DevicesError),
    /// A vCPU thread did not run its job in time.
    #[error("vCPU {vcpu} did not hand over its state within 10 s")]
    NoAnswer {
        /// The vCPU.
        vcpu: u32,
    },
    /// Reading the state failed.
    #[error("vCPU {vcpu}")]
    State {
        /// The vCPU.
        vcpu: u32,
        /// Cause.
        #[source]
        source: StateError,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pause_is_released_only_by_its_owner() {
        let c = VcpuControl::new(Instant::now(), 0);
        assert!(!c.is_paused());
        c.pause(PauseOwner::Migration);
        c.pause(PauseOwner::Operator);
        assert_eq!(
            c.paused_by(),
            vec![PauseOwner::Operator, PauseOwner::Migration]
        );
        // An operator resume during a migration's switchover does not resume the guest.
        assert_eq!(c.resume(PauseOwner::Operator), Resumed::StillPaused);
        assert!(c.is_paused());
        assert!(c.pause_requested());
        // Resuming an owner that holds nothing changes nothing.
        assert_eq!(c.resume(PauseOwner::Snapshot), Resumed::StillPaused);
        assert_eq!(c.resume(PauseOwner::Migration), Resumed::Running);
        assert!(!c.is_paused());
        assert!(!c.pause_requested());
    }

    #[test]
    fn a_guest_handed_over_never_runs_here_again() {
        let c = VcpuControl::new(Instant::now(), 0);
        c.pause(PauseOwner::Migration);
        c.hand_over();
        assert_eq!(c.resume(PauseOwner::Operator), Resumed::HandedOver);
        assert_eq!(c.resume(PauseOwner::Migration), Resumed::HandedOver);
        assert!(c.is_paused());
        assert!(c.pause_requested());
    }

    #[test]
    fn a_snapshot_resume_keeps_the_operator_pause() {
        let c = VcpuControl::new(Instant::now(), 0);
        c.pause(PauseOwner::Operator);
        c.pause(PauseOwner::Snapshot);
        assert_eq!(c.resume(PauseOwner::Snapshot), Resumed::StillPaused);
        assert_eq!(c.paused_by(), vec![PauseOwner::Operator]);
        assert!(matches!(
            VcpuControl::new(Instant::now(), 1).save_vcpus(&[], false),
            Err(SaveError::NotPaused)
        ));
    }

    #[test]
    fn heartbeats_track_the_longest_gap() {
        let t = CpuTrack::default();
        t.heartbeat(0, 5);
        assert_eq!(t.first_hb_ns.load(SeqCst), 0);
        t.heartbeat(1, 100);
        t.heartbeat(2, 250);
        t.heartbeat(3, 300);
        assert_eq!(t.first_hb_ns.load(SeqCst), 100);
        assert_eq!(t.max_gap_ns.load(SeqCst), 150);
        assert_eq!(t.last_n.load(SeqCst), 3);
    }
}
