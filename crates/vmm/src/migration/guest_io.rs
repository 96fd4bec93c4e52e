//! The source's access to guest memory for `xfer`: pages read through a [`PageReader`] (raw
//! copies, never a `&[u8]` over memory the vCPUs or devices may write), the pages written as
//! KVM's dirty log ([`KvmDirtyLog`]), and the first scan for pages that may hold data.

use std::io;
use std::sync::Arc;

use kvm_ioctls::VmFd;
use xfer::bitmap::words_for;
use xfer::digest::is_zero;
use xfer::dirty::{DirtyLog, DirtyLogError};
use xfer::reader::{MmapReader, PageReader, ReadError};
use xfer::wire::PAGE;

use super::MigrationError;
use crate::memory::{Backend, GuestMem};
use crate::vstate::DeviceSet;

/// Guest memory as an [`xfer::reader::PageReader`]: an [`MmapReader`] over the mapping, which
/// the reader keeps alive.
pub(crate) struct GuestReader {
    inner: MmapReader,
    _mem: Arc<GuestMem>,
}

impl GuestReader {
    pub(crate) fn new(mem: Arc<GuestMem>) -> GuestReader {
        // SAFETY: the mapping `host_addr()..+size()` is owned by `mem`, which this reader holds
        // for as long as it lives; the reader only ever copies from it with raw reads.
        let inner = unsafe { MmapReader::new(mem.host_addr(), mem.size() as usize) };
        GuestReader { inner, _mem: mem }
    }
}

impl PageReader for GuestReader {
    fn pages(&self) -> u64 {
        self.inner.pages()
    }

    fn read(&self, page: u64, buf: &mut [u8]) -> Result<(), ReadError> {
        self.inner.read(page, buf)
    }
}

/// KVM's dirty log of memory slot 0 (guest memory), on from [`KvmDirtyLog::start`] until
/// [`KvmDirtyLog::stop`], with the pages the VMM's devices wrote (which KVM does not see:
/// `virtio::dirty`).
pub(crate) struct KvmDirtyLog {
    vm: Arc<VmFd>,
    mem: Arc<GuestMem>,
    devices: DeviceSet,
}

fn set_dirty_log(vm: &VmFd, mem: &GuestMem, on: bool) -> Result<(), kvm_ioctls::Error> {
    let region = kvm_bindings::kvm_userspace_memory_region {
        slot: 0,
        flags: if on {
            kvm_bindings::KVM_MEM_LOG_DIRTY_PAGES
        } else {
            0
        },
        guest_phys_addr: 0,
        memory_size: mem.size(),
        userspace_addr: mem.host_addr() as u64,
    };
    // SAFETY: the same region as registered at creation, owned by `mem`, which outlives the VM
    // fd's use here; only the flags change.
    unsafe { vm.set_user_memory_region(region) }
}

impl KvmDirtyLog {
    /// Turn dirty logging on and clear the log.
    pub(crate) fn start(
        vm: Arc<VmFd>,
        mem: Arc<GuestMem>,
        devices: DeviceSet,
    ) -> Result<KvmDirtyLog, MigrationError> {
        set_dirty_log(&vm, &mem, true).map_err(|source| MigrationError::Kvm {
            what: "KVM_SET_USER_MEMORY_REGION (dirty logging on)",
            source,
        })?;
        if let Err(e) = devices.start_dirty_log() {
            let _ = set_dirty_log(&vm, &mem, false);
            return Err(MigrationError::Devices(e));
        }
        let mut log = KvmDirtyLog { vm, mem, devices };
        log.fetch_and_clear().map_err(MigrationError::DirtyLog)?;
        Ok(log)
    }

    /// Turn dirty logging off (best effort: the migration is over either way).
    pub(crate) fn stop(&self) {
        self.devices.stop_dirty_log();
        let _ = set_dirty_log(&self.vm, &self.mem, false);
    }
}

impl DirtyLog for KvmDirtyLog {
    fn fetch_and_clear(&mut self) -> Result<Vec<u64>, DirtyLogError> {
        let mut w = self
            .vm
            .get_dirty_log(0, self.mem.size() as usize)
            .map_err(|e| DirtyLogError::Other {
                what: "KVM_GET_DIRTY_LOG".into(),
                source: io::Error::from_raw_os_error(e.errno()),
            })?;
        w.resize(words_for(self.mem.size() / PAGE), 0);
        self.devices
            .take_dirty(&mut w)
            .map_err(|e| DirtyLogError::Other {
                what: "the devices' dirty-page logs".into(),
                source: io::Error::other(e),
            })?;
        Ok(w)
    }
}

/// Pages that may hold data: for anonymous memory, pages the kernel has (present or swapped,
/// from `/proc/self/pagemap`) whose bytes are not all zero; for other backends, and for
/// memory a pager fills on demand, every non-zero page. Dirty logging is on, so a page written after it was looked at is caught later.
pub(crate) fn scan(mem: &GuestMem, reader: &dyn PageReader) -> Result<Vec<u64>, ReadError> {
    let pages = reader.pages();
    let mut bits = vec![0u64; words_for(pages)];
    // Memory a pager fills on first touch (a lazy restore, a post-copy destination) holds
    // data in pages the process does not have yet: read them all (reading brings them in).
    let pagemap = if mem.backend() == Backend::Anonymous && !mem.on_demand() {
        read_pagemap(mem.host_addr() as u64, pages).ok()
    } else {
        None
    };
    let mut buf = vec![0u8; PAGE as usize];
    for p in 0..pages {
        if let Some(pm) = &pagemap
            && pm.get(p as usize).is_some_and(|e| e & (3 << 62) == 0)
        {
            continue; // never touched: reads as zero
        }
        reader.read(p, &mut buf)?;
        if !is_zero(&buf) {
            bits[(p / 64) as usize] |= 1 << (p % 64);
        }
    }
    Ok(bits)
}

/// The guest pages KVM itself reads or writes when a vCPU's MSRs are restored (kvmclock's
/// time structures, steal time, async page faults, PV EOI), as a bitmap of `pages` pages.
/// A post-copy destination must have them before it restores the vCPUs: `KVM_SET_MSRS`
/// touches them from the restoring thread, before the guest runs and before the source
/// serves a page.
pub(crate) fn kvm_touched_pages(vcpus: &[crate::vstate::VcpuState], pages: u64) -> Vec<u64> {
    let mut bits = vec![0u64; words_for(pages)];
    for v in vcpus {
        for m in &v.msrs {
            let gpa = match m.index {
                // MSR_KVM_WALL_CLOCK(_NEW): a guest-physical address, no enable bit.
                0x11 | 0x4b56_4d00 if m.data != 0 => m.data,
                // System time (old and new), async PF, steal time, PV EOI: bit 0 enables.
                0x12 | 0x4b56_4d01..=0x4b56_4d04 if m.data & 1 != 0 => m.data & !0x3f,
                _ => continue,
            };
            let p = gpa / PAGE;
            if p < pages {
                bits[(p / 64) as usize] |= 1 << (p % 64);
            }
        }
    }
    bits
}

fn read_pagemap(addr: u64, pages: u64) -> io::Result<Vec<u64>> {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::open("/proc/self/pagemap")?;
    let mut b = vec![0u8; pages as usize * 8];
    f.read_exact_at(&mut b, addr / PAGE * 8)?;
    Ok(b.chunks_exact(8)
        .map(|c| u64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
        .collect())
}
