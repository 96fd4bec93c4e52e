//! Taking a snapshot of a running VM. It runs on a thread of its own (the controller goes on
//! answering meanwhile) and holds a pause of its own ([`PauseOwner::Snapshot`]): an operator's
//! pause taken before or during it stays in force after it.

use std::path::Path;
use std::sync::atomic::Ordering::SeqCst;
use std::time::Instant;

use super::{
    Manifest, MemoryInfo, PAGE, SliceInfo, SnapshotError, SnapshotInfo, files, write_file,
    write_manifest, write_memory,
};
use crate::vstate::{Machine, PauseOwner, VmError};

/// Pause (if running), write a snapshot of `machine` into `dir`, and resume (unless someone
/// else holds a pause). A VM with a part a snapshot cannot carry is refused by that part's
/// name before anything is paused or written.
pub fn create(
    machine: &Machine,
    dir: &Path,
    page_checksums: bool,
) -> Result<SnapshotInfo, SnapshotError> {
    let uncarried = machine.uncarried();
    if !uncarried.is_empty() {
        return Err(SnapshotError::Uncarried(
            uncarried.into_iter().map(|u| u.0).collect(),
        ));
    }
    if !machine.all_running() {
        return Err(SnapshotError::Finished);
    }
    let t0 = Instant::now();
    let control = machine.control();
    let was_paused = control.is_paused();
    control.pause(PauseOwner::Snapshot);
    let r = write(machine, dir, page_checksums, t0);
    control.resume(PauseOwner::Snapshot);
    let mut info = r?;
    info.paused_ms = if was_paused {
        0.0
    } else {
        t0.elapsed().as_secs_f64() * 1e3
    };
    Ok(info)
}

fn write(
    machine: &Machine,
    dir: &Path,
    page_checksums: bool,
    t0: Instant,
) -> Result<SnapshotInfo, SnapshotError> {
    let (vm_state, vcpus) = machine.save_state().map_err(SnapshotError::Save)?;
    std::fs::create_dir_all(dir).map_err(|source| SnapshotError::Io {
        what: "creating",
        path: dir.to_path_buf(),
        source,
    })?;
    // A half-written directory must not look like a snapshot.
    let _ = std::fs::remove_file(dir.join(files::MANIFEST));
    let _ = std::fs::remove_file(dir.join(files::WORKING_SET));
    let mem = machine.memory();
    let mem_path = dir.join(files::MEMORY);
    // SAFETY: every vCPU is parked (the snapshot's pause) and the VM has no device that could
    // write guest memory (a VM with one is refused above): nothing writes guest memory.
    let (idx, written) = unsafe { write_memory(mem, &mem_path, page_checksums) }?;
    let index = write_file(dir, files::INDEX, &idx.encode())?;
    let state = write_file(dir, files::STATE, &super::state::encode(&vm_state, &vcpus))?;
    let checksums = (0..machine.slices().len())
        .map(|i| machine.host_checksum(i))
        .collect::<Result<Vec<_>, VmError>>()
        .map_err(SnapshotError::Machine)?;
    let heartbeats: Vec<u32> = machine
        .control()
        .cpus
        .iter()
        .map(|c| c.last_n.load(SeqCst))
        .collect();
    let manifest = Manifest {
        format: super::FORMAT.into(),
        version: super::VERSION,
        created_unix_ms: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64),
        config: machine.config().clone(),
        irqchip: machine.irqchip(),
        slices: machine
            .slices()
            .iter()
            .map(|s| SliceInfo {
                start: s.start,
                len: s.len,
                first_page: s.first_page,
            })
            .collect(),
        checksums: checksums.clone(),
        heartbeats: heartbeats.clone(),
        memory: MemoryInfo {
            file: files::MEMORY.into(),
            bytes: mem.size(),
            page_size: PAGE,
            nonzero_pages: written.nonzero_pages,
            page_checksums,
        },
        index,
        state,
    };
    write_manifest(dir, &manifest)?;
    Ok(SnapshotInfo {
        dir: dir.to_path_buf(),
        total_ms: t0.elapsed().as_secs_f64() * 1e3,
        paused_ms: 0.0,
        mem_bytes: mem.size(),
        nonzero_pages: written.nonzero_pages,
        bytes_written: written.bytes_written,
        checksums,
        heartbeats,
    })
}
