//! `faultline bench restore`: restore a snapshot of a 1 GiB guest whose workload then touches
//! 256 MiB, in every mode, and time the first instruction and the workload.
//!
//! The snapshot is taken of the built-in guest's `dirty` workload over 256 MiB (filled, then
//! looping). Each restore runs the guest's `verify` over the same 256 MiB: it reads every word
//! of every page, so every page must arrive; its checksum must equal the snapshot's.
//! - `first_instruction_ms`: restore start (reading the snapshot) to the guest's first
//!   heartbeat, sent by its first instructions.
//! - `workload_ms`: first heartbeat to the end of `verify` (slowest vCPU).
//! - `faults`: lazy modes, userfaults served; other modes, the page faults the kernel served
//!   meanwhile (`getrusage` minor + major).
//! - `bytes_read`: bytes read from the memory file (eager, lazy, prefetch: counted by us; mmap
//!   and warm: pages resident in guest memory at the end, × 4096).
//! - `warm`: an eager restore again: memory is resident when the first instruction runs; its
//!   workload time is the reference the lazy modes are measured against.
//!
//! The memory file is in the page cache (it was just written), as for a platform restoring the
//! same function repeatedly.

use std::path::Path;
use std::time::Duration;

use serde::Serialize;
use vmm::restore::{AfterRestore, RestoreMode, RestoreOptions};
use vmm::{Event, Vm, VmConfig, Workload};

use crate::BenchError;

/// One line of output.
#[derive(Debug, Clone, Serialize)]
pub struct RestoreLine {
    /// `"restore"`.
    pub bench: &'static str,
    /// `eager`, `mmap`, `lazy`, `prefetch` or `warm`.
    pub mode: &'static str,
    /// Restore start to the first guest instruction, ms (median).
    pub first_instruction_ms: f64,
    /// The workload, ms (median).
    pub workload_ms: f64,
    /// Faults (see the module docs).
    pub faults: u64,
    /// Bytes read (see the module docs).
    pub bytes_read: u64,
}

/// Parameters.
#[derive(Debug, Clone)]
pub struct Params {
    /// Guest memory, MiB.
    pub mem_mib: u64,
    /// Memory the workload touches, MiB.
    pub touch_mib: u64,
    /// vCPUs.
    pub vcpus: u32,
    /// Runs per mode (median reported).
    pub runs: usize,
    /// Where to put the snapshot.
    pub dir: std::path::PathBuf,
}

fn err(e: impl std::error::Error) -> BenchError {
    BenchError::Run(uffd::error_chain(&e))
}

/// Take the benchmark's snapshot: `dirty` over `touch_mib`, paused after its first heartbeat.
pub fn take_snapshot(p: &Params) -> Result<(), BenchError> {
    let vm = Vm::new(VmConfig {
        mem_bytes: p.mem_mib << 20,
        vcpus: p.vcpus,
        workload: Workload::Dirty,
        workload_bytes: Some(p.touch_mib << 20),
        ..VmConfig::default()
    })
    .map_err(err)?;
    let mut running = vm.start().map_err(err)?;
    let mut ready = 0;
    while ready < p.vcpus {
        match running.next_event(Duration::from_secs(60)).map_err(err)? {
            Some(Event::Heartbeat { n, .. }) if n >= 1 => ready += 1,
            Some(_) => {}
            None => {
                return Err(BenchError::Run(
                    "the guest sent no heartbeat in 60 s".into(),
                ));
            }
        }
    }
    running.snapshot(&p.dir, false).map_err(err)?;
    running.stop();
    Ok(())
}

fn rusage_faults() -> u64 {
    // SAFETY: getrusage fills the struct we pass.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: valid pointer to a rusage.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    (ru.ru_minflt + ru.ru_majflt) as u64
}

fn resident_bytes(mem: &vmm::memory::GuestMem) -> u64 {
    let pages = (mem.size() / 4096) as usize;
    let mut v = vec![0u8; pages];
    // SAFETY: the range is guest memory's own mapping; `v` has one byte per page.
    let r = unsafe { libc::mincore(mem.host_addr().cast(), mem.size() as usize, v.as_mut_ptr()) };
    if r != 0 {
        return 0;
    }
    v.iter().filter(|&&b| b & 1 != 0).count() as u64 * 4096
}

/// One restore of `dir` in `mode`, `verify` run to the end. Returns
/// (first instruction ms, workload ms, faults, bytes read).
pub fn one(
    dir: &Path,
    mode: RestoreMode,
    batch_pages: usize,
) -> Result<(f64, f64, u64, u64), BenchError> {
    let f0 = rusage_faults();
    let r = vmm::restore::restore(
        dir,
        &RestoreOptions {
            mode,
            then: AfterRestore::Verify,
            batch_pages,
            ..Default::default()
        },
    )
    .map_err(err)?;
    let expect = r.checksums.clone();
    let upfront = r.bytes_read_upfront;
    let running = vmm::RunningVm::start_with(r.vm, r.pager).map_err(err)?;
    let mem = running.memory().clone();
    let s = running
        .wait(Duration::from_secs(300), |_| {})
        .map_err(err)?;
    for (i, v) in s.vcpus.iter().enumerate() {
        let got = v.checksum;
        if got != expect.get(i).copied() {
            return Err(BenchError::Run(format!(
                "{}: vCPU {i} verify checksum {:?} differs from the snapshot's",
                mode.name(),
                v.checksum
            )));
        }
    }
    let first_us = s
        .boot_to_first_heartbeat_us
        .ok_or_else(|| BenchError::Run("no heartbeat".into()))?;
    let done_us = s
        .vcpus
        .iter()
        .filter_map(|v| v.done_us)
        .max()
        .unwrap_or(first_us);
    let (faults, bytes) = match (&s.pager, mode) {
        (Some(p), _) => (p.faults, p.bytes_read),
        (None, RestoreMode::Mmap) => (rusage_faults() - f0, resident_bytes(&mem)),
        (None, _) => (rusage_faults() - f0, upfront),
    };
    Ok((
        first_us as f64 / 1e3,
        (done_us - first_us) as f64 / 1e3,
        faults,
        bytes,
    ))
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Run every mode; `on_line` gets each result as it is measured.
pub fn run(p: &Params, mut on_line: impl FnMut(&RestoreLine)) -> Result<(), BenchError> {
    take_snapshot(p)?;
    let ws = p.dir.join(vmm::snapshot::files::WORKING_SET);
    let modes: [(&'static str, RestoreMode); 5] = [
        ("eager", RestoreMode::Eager),
        ("mmap", RestoreMode::Mmap),
        ("lazy", RestoreMode::Lazy),
        ("prefetch", RestoreMode::Prefetch),
        ("warm", RestoreMode::Eager),
    ];
    for (name, mode) in modes {
        if mode == RestoreMode::Prefetch {
            // The recording restore: a lazy one that writes the working set.
            let _ = std::fs::remove_file(&ws);
            one(&p.dir, mode, 16)?;
            if !ws.exists() {
                return Err(BenchError::Run(
                    "the recording restore left no working set".into(),
                ));
            }
        }
        let mut fi = Vec::new();
        let mut wl = Vec::new();
        let mut last = (0, 0);
        for _ in 0..p.runs.max(1) {
            let (a, b, f, by) = one(&p.dir, mode, 16)?;
            fi.push(a);
            wl.push(b);
            last = (f, by);
        }
        on_line(&RestoreLine {
            bench: "restore",
            mode: name,
            first_instruction_ms: (median(fi) * 1000.0).round() / 1000.0,
            workload_ms: (median(wl) * 1000.0).round() / 1000.0,
            faults: last.0,
            bytes_read: last.1,
        });
    }
    Ok(())
}
