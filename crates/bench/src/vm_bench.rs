//! `faultline bench vm`: boot time of the built-in guest and its dirtying speed against the
//! same loop in a host process, measured in the same run.

use std::time::{Duration, Instant};

use serde::Serialize;
use vmm::guest::{self, abi};
use vmm::{Event, Vm, VmConfig, Workload};

use crate::BenchError;

/// `boot-to-first-heartbeat` line.
#[derive(Debug, Serialize)]
pub struct BootLine {
    /// `"vm"`.
    pub bench: &'static str,
    /// `"boot-to-first-heartbeat"`.
    pub case: &'static str,
    /// Guest memory.
    pub mem_mib: u64,
    /// Median over the runs: VM creation (KVM, memory, tables, vCPUs) to heartbeat 0.
    pub median_ms: f64,
}

/// `dirty-rate` line.
#[derive(Debug, Serialize)]
pub struct DirtyLine {
    /// `"vm"`.
    pub bench: &'static str,
    /// `"dirty-rate"`.
    pub case: &'static str,
    /// Pages rewritten per second by the guest's `dirty` loop.
    pub guest_pages_per_s: u64,
    /// Pages per second of the same loop in this process.
    pub native_pages_per_s: u64,
    /// guest / native.
    pub ratio: f64,
}

fn vm_err(e: impl std::error::Error) -> BenchError {
    BenchError::Run(uffd::error_chain(&e))
}

/// Median time from `Vm::new` to the guest's first heartbeat, over `runs` boots.
pub fn boot(mem_mib: u64, runs: usize) -> Result<BootLine, BenchError> {
    let mut ms = Vec::new();
    for _ in 0..runs.max(1) {
        let vm = Vm::new(VmConfig {
            mem_bytes: mem_mib << 20,
            vcpus: 1,
            workload: Workload::Dirty,
            ..VmConfig::default()
        })
        .map_err(vm_err)?;
        let mut running = vm.start().map_err(vm_err)?;
        loop {
            match running
                .next_event(Duration::from_secs(10))
                .map_err(vm_err)?
            {
                Some(Event::Heartbeat { t_us, .. }) => {
                    ms.push(t_us as f64 / 1e3);
                    break;
                }
                Some(_) => {}
                None => return Err(BenchError::Run("no heartbeat within 10 s".into())),
            }
        }
        running.stop();
    }
    ms.sort_by(f64::total_cmp);
    Ok(BootLine {
        bench: "vm",
        case: "boot-to-first-heartbeat",
        mem_mib,
        median_ms: ms[ms.len() / 2],
    })
}

/// The `dirty` loop of `memload.c` in this process, for `dur` after filling: pages per second.
fn native_dirty(bytes: usize, dur: Duration) -> u64 {
    let words = bytes / 8;
    let mut buf = vec![0u64; words];
    for (i, w) in buf.iter_mut().enumerate() {
        *w = abi::fill_word((i / 512) as u64, (i % 512) as u64);
    }
    let pages = bytes / 4096;
    let p = buf.as_mut_ptr();
    let start = Instant::now();
    let (mut passes, mut touched) = (0usize, 0u64);
    'outer: loop {
        for pg in 0..pages {
            // SAFETY: `pg * 512 + ((passes + pg) & 511)` is inside `buf`.
            unsafe {
                let w = p.add(pg * 512 + ((passes + pg) & 511));
                std::ptr::write_volatile(w, std::ptr::read_volatile(w).wrapping_add(1));
            }
            if pg & 255 == 255 {
                touched += 256;
                if start.elapsed() >= dur {
                    break 'outer;
                }
            }
        }
        passes += 1;
    }
    (touched as f64 / start.elapsed().as_secs_f64()) as u64
}

/// The guest's `dirty` loop (1 vCPU, `mib` MiB) and the same loop natively, `secs` each.
pub fn dirty_rate(mib: u64, secs: f64) -> Result<DirtyLine, BenchError> {
    let bytes = mib << 20;
    let vm = Vm::new(VmConfig {
        mem_bytes: bytes + (8 << 20),
        vcpus: 1,
        workload: Workload::Dirty,
        workload_bytes: Some(bytes),
        run_for: Some(Duration::from_secs_f64(secs)),
        ..VmConfig::default()
    })
    .map_err(vm_err)?;
    let mem = vm.memory().clone();
    let s = vm
        .start()
        .map_err(vm_err)?
        .wait(Duration::from_secs_f64(secs * 4.0 + 60.0), |_| {})
        .map_err(vm_err)?;
    let v = &s.vcpus[0];
    let (Some(ready), Some(done)) = (v.ready_us, v.done_us) else {
        return Err(BenchError::Run(
            "the guest never reported ready/done".into(),
        ));
    };
    // Every touch adds 1 to a word: the sum of (word - filled word) counts them exactly.
    let data = mem
        .read(vmm::cpl3::WORKLOAD, bytes as usize)
        .map_err(|e| BenchError::Run(e.to_string()))?;
    let model = guest::fill_model(0, bytes as usize);
    let touches = data
        .chunks_exact(8)
        .zip(model.chunks_exact(8))
        .map(|(a, b)| {
            u64::from_le_bytes(a.try_into().expect("8 bytes"))
                .wrapping_sub(u64::from_le_bytes(b.try_into().expect("8 bytes")))
        })
        .fold(0u64, u64::wrapping_add);
    let guest = (touches as f64 / ((done - ready) as f64 / 1e6)) as u64;
    let native = native_dirty(bytes as usize, Duration::from_secs_f64(secs));
    Ok(DirtyLine {
        bench: "vm",
        case: "dirty-rate",
        guest_pages_per_s: guest,
        native_pages_per_s: native,
        ratio: (guest as f64 / native.max(1) as f64 * 1000.0).round() / 1000.0,
    })
}
