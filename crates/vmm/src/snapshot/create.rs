//! Taking a snapshot of a running VM. It runs on a thread of its own (the controller goes on
//! answering meanwhile) and holds a pause of its own ([`PauseOwner::Snapshot`]): an operator's
//! pause taken before or during it stays in force after it.
//!
//! The snapshot is written into a new directory beside the one asked for, synced, and only
//! then put in its place (an atomic exchange when one exists: `renameat2(RENAME_EXCHANGE)`),
//! so an older snapshot there is never truncated or half-overwritten: a failure (a full disk)
//! leaves it whole, and a VM restored from it (`mmap`, `lazy`) keeps reading its files.

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering::SeqCst;
use std::time::Instant;

use super::{
    Manifest, MemoryInfo, PAGE, SliceInfo, SnapshotError, SnapshotInfo, files, write_file,
    write_manifest, write_memory,
};
use crate::vstate::control::mono_ns;
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
    // The devices finish what they hold and take nothing more until the snapshot is
    // written: their records and guest memory are of one instant.
    if let Err(e) = machine.freeze_devices() {
        control.resume(PauseOwner::Snapshot);
        return Err(SnapshotError::Save(crate::vstate::SaveError::Devices(e)));
    }
    let r = write(machine, dir, page_checksums, t0);
    machine.thaw_devices();
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
    let staging = Staging::new(dir)?;
    let info = write_into(
        machine,
        &staging.path,
        dir,
        page_checksums,
        t0,
        vm_state,
        &vcpus,
    )?;
    staging.commit(dir)?;
    Ok(info)
}

/// A fresh directory beside the target, removed unless committed.
struct Staging {
    path: PathBuf,
    committed: bool,
}

fn io(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> SnapshotError {
    let path = path.to_path_buf();
    move |source| SnapshotError::Io { what, path, source }
}

impl Staging {
    fn new(dir: &Path) -> Result<Staging, SnapshotError> {
        let name = dir.file_name().ok_or_else(|| {
            SnapshotError::Inconsistent(format!("{} names no directory", dir.display()))
        })?;
        let parent = dir
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        std::fs::create_dir_all(parent).map_err(io("creating", parent))?;
        match std::fs::symlink_metadata(dir) {
            Ok(m) if !m.is_dir() => {
                return Err(SnapshotError::Inconsistent(format!(
                    "{} exists and is not a directory (a link or a file): not written",
                    dir.display()
                )));
            }
            _ => {}
        }
        let mut tmp = name.to_os_string();
        tmp.push(format!(".new-{}-{}", std::process::id(), mono_ns()));
        let path = parent.join(tmp);
        std::fs::create_dir(&path).map_err(io("creating", &path))?;
        Ok(Staging {
            path,
            committed: false,
        })
    }

    /// Put the written snapshot in place of `dir` (swapping with an older one, then removing
    /// that), syncing the directories so the exchange survives a crash.
    fn commit(mut self, dir: &Path) -> Result<(), SnapshotError> {
        sync_dir(&self.path)?;
        if dir.exists() {
            exchange(&self.path, dir)?;
            // `self.path` now holds the older snapshot.
            let _ = std::fs::remove_dir_all(&self.path);
        } else {
            std::fs::rename(&self.path, dir).map_err(io("renaming into", dir))?;
        }
        self.committed = true;
        if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
            sync_dir(parent)?;
        }
        Ok(())
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        if !self.committed {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

fn sync_dir(d: &Path) -> Result<(), SnapshotError> {
    std::fs::File::open(d)
        .and_then(|f| f.sync_all())
        .map_err(io("syncing", d))
}

/// Swap two directory entries atomically.
fn exchange(a: &Path, b: &Path) -> Result<(), SnapshotError> {
    use std::os::unix::ffi::OsStrExt;
    let c = |p: &Path| {
        std::ffi::CString::new(p.as_os_str().as_bytes())
            .map_err(|_| SnapshotError::Inconsistent(format!("{} has a NUL byte", p.display())))
    };
    let (ca, cb) = (c(a)?, c(b)?);
    // SAFETY: two valid C strings; renameat2 only reads them.
    let r = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            ca.as_ptr(),
            libc::AT_FDCWD,
            cb.as_ptr(),
            libc::RENAME_EXCHANGE,
        )
    };
    if r != 0 {
        return Err(io("exchanging it with", b)(std::io::Error::last_os_error()));
    }
    Ok(())
}

fn write_into(
    machine: &Machine,
    dir: &Path,
    target: &Path,
    page_checksums: bool,
    t0: Instant,
    vm_state: crate::vstate::VmState,
    vcpus: &[crate::vstate::VcpuState],
) -> Result<SnapshotInfo, SnapshotError> {
    let mem = machine.memory();
    let mem_path = dir.join(files::MEMORY);
    // SAFETY: every vCPU is parked (the snapshot's pause) and every virtio device is frozen
    // (`create`); a VM with a vfio-user device, which could DMA, is refused above: nothing
    // writes guest memory.
    let (idx, written) = unsafe { write_memory(mem, &mem_path, page_checksums) }?;
    // Memory mapped from a snapshot file that shrank meanwhile read as zeros where it was
    // lost: such a copy is not the guest's memory.
    if let Some(lost) = mem.file_lost() {
        return Err(SnapshotError::MemoryLost(lost));
    }
    let index = write_file(dir, files::INDEX, &idx.encode())?;
    let state = write_file(dir, files::STATE, &super::state::encode(&vm_state, vcpus))?;
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
        dir: target.to_path_buf(),
        total_ms: t0.elapsed().as_secs_f64() * 1e3,
        paused_ms: 0.0,
        mem_bytes: mem.size(),
        nonzero_pages: written.nonzero_pages,
        bytes_written: written.bytes_written,
        checksums,
        heartbeats,
    })
}
