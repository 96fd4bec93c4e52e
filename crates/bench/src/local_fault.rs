//! The local fault a remote one is compared with (`faultline bench migrate`, first line):
//! the same guest (1 vCPU, the `read` workload over the same memory), snapshotted into
//! memory (`/dev/shm`) and restored lazily in this process, so its page faults are served
//! by the same fault loop (memx, one worker, unpinned, as at a migration's destination)
//! from a file in memory. Its latency is measured the same way as a remote fault's (the
//! handler reads the fault → the page is installed), so their ratio is honest.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde::Serialize;
use vmm::restore::{AfterRestore, RestoreMode, RestoreOptions};
use vmm::{Event, Vm, VmConfig, Workload};

use crate::BenchError;

/// `{"bench":"migrate","case":"local-fault",...}`.
#[derive(Debug, Clone, Serialize)]
pub struct LocalFault {
    /// `"migrate"`.
    pub bench: &'static str,
    /// `"local-fault"`.
    pub case: &'static str,
    /// The guest's workload (`read`).
    pub workload: &'static str,
    /// Faults served while it ran.
    pub faults: u64,
    /// Fault latency p50, µs.
    pub fault_p50_us: f64,
    /// p99, µs.
    pub fault_p99_us: f64,
}

fn err(e: impl std::error::Error) -> BenchError {
    BenchError::Run(format!("local fault: {}", uffd::error_chain(&e)))
}

/// Removes the snapshot directory however the measurement ends.
struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Measure: `mem_mib` of guest memory, `hot_mib` read by the workload, faults served for
/// `run` after the restore.
pub fn measure(mem_mib: u64, hot_mib: u64, run: Duration) -> Result<LocalFault, BenchError> {
    let shm = PathBuf::from("/dev/shm");
    let base = if shm.is_dir() {
        shm
    } else {
        std::env::temp_dir()
    };
    let dir = Scratch(base.join(format!("faultline-local-fault-{}", std::process::id())));
    let _ = std::fs::remove_dir_all(&dir.0);
    let vm = Vm::new(VmConfig {
        mem_bytes: mem_mib << 20,
        vcpus: 1,
        workload: Workload::Read,
        workload_bytes: Some(hot_mib << 20),
        ..VmConfig::default()
    })
    .map_err(err)?;
    let mut running = vm.start().map_err(err)?;
    // Its memory filled and beating, as the migrated guest is when its migration starts.
    let t = Instant::now();
    loop {
        match running.next_event(Duration::from_secs(60)).map_err(err)? {
            Some(Event::Heartbeat { n, .. }) if n >= 3 => break,
            Some(_) if t.elapsed() < Duration::from_secs(120) => {}
            _ => {
                return Err(BenchError::Run(
                    "local fault: the guest did not beat".into(),
                ));
            }
        }
    }
    running.snapshot(&dir.0, false).map_err(err)?;
    running.stop();
    let r = vmm::restore::restore(
        &dir.0,
        &RestoreOptions {
            mode: RestoreMode::Lazy,
            then: AfterRestore::Resume,
            ..Default::default()
        },
    )
    .map_err(err)?;
    let running = vmm::RunningVm::start_with(r.vm, r.pager).map_err(err)?;
    std::thread::sleep(run);
    let rep = running
        .pager_report()
        .ok_or_else(|| BenchError::Run("local fault: the restore has no pager".into()))?;
    running.stop();
    if rep.errors > 0 || rep.faults == 0 {
        return Err(BenchError::Run(format!(
            "local fault: {} faults, {} errors ({:?})",
            rep.faults, rep.errors, rep.last_error
        )));
    }
    Ok(LocalFault {
        bench: "migrate",
        case: "local-fault",
        workload: "read",
        faults: rep.faults,
        fault_p50_us: rep.fault_p50_us,
        fault_p99_us: rep.fault_p99_us,
    })
}
