//! Snapshots: a paused VM written to a directory, and read back for restore.
//!
//! # The snapshot directory, format version 3
//! Version 2 added the devices: the VM's virtio-mmio devices in the manifest's
//! configuration and their records in `state.bin` (its version 2), a Linux guest's COM1.
//! Version 3 (this one) adds vfio-user devices: their sockets at snapshot in the
//! configuration (a restore names its own with `--vfio-user`), their records in `state.bin`
//! (its version 3). Versions 1 and 2 still restore.
//!
//! | file | what |
//! |---|---|
//! | `manifest.json` | [`Manifest`]: format name and version, the VM configuration, the guest's slices and their checksums at snapshot, and the size and CRC-32 of every other file. Written last (atomically, by rename): a directory without it is not a snapshot. |
//! | `state.bin` | vCPU and VM state ([`state`] documents the layout). |
//! | `memory` | guest memory, byte for byte at its guest-physical offset; zero pages are holes (a sparse file). |
//! | `memory.idx` | [`MemoryIndex`]: which pages are non-zero, a CRC-32 per 64 KiB chunk, and optionally a CRC-32 per page. |
//! | `working-set` | written by a `prefetch` restore: the pages the guest faulted, in order ([`WorkingSet`]). |
//!
//! Every integer in the binary files is little-endian; each starts with an 8-byte magic and a
//! `u32` version. Loading checks, before any VM exists: the manifest's format and version, each
//! file's size and CRC, the memory size against the configuration, and the memory file's length.
//! Chunk CRCs are checked as memory is read: all of them by an `eager` restore (before the VM
//! starts), all of them by an `mmap` restore too, through the mapping, before the VM starts
//! ([`verify_mapped`]: chunks the file holds as holes are not read), and chunk by chunk on first fault by `lazy` and `prefetch` restores (a chunk that
//! fails stops the VM with an error naming it; its pages are never served).

mod create;
pub mod source;
pub mod state;

use std::fs::File;
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::config::VmConfig;
use crate::memory::GuestMem;

pub use create::create;
pub use source::{SnapshotSource, WorkingSet};
pub use state::{StateError, VcpuState, VmState};

/// The manifest's `format` value.
pub const FORMAT: &str = "faultline-snapshot";
/// The snapshot format version this code writes.
pub const VERSION: u32 = 3;
/// The oldest snapshot format version this code reads.
pub const VERSION_MIN: u32 = 1;
/// The version of `memory.idx`.
pub const INDEX_VERSION: u32 = 1;
/// Page size of the memory file.
pub const PAGE: u64 = 4096;
/// Pages per CRC chunk (64 KiB).
pub const CHUNK_PAGES: u64 = 16;
/// The most pages per chunk a memory index may name (16 MiB chunks).
pub const MAX_CHUNK_PAGES: u64 = 4096;
/// The most pages a memory index may name (1 TiB of guest memory).
pub const MAX_PAGES: u64 = 1 << 28;
/// Magic of `memory.idx`.
pub const INDEX_MAGIC: &[u8; 8] = b"FLMIDX\0\0";

/// File names inside a snapshot directory.
pub mod files {
    /// The manifest.
    pub const MANIFEST: &str = "manifest.json";
    /// vCPU and VM state.
    pub const STATE: &str = "state.bin";
    /// Guest memory.
    pub const MEMORY: &str = "memory";
    /// The memory index.
    pub const INDEX: &str = "memory.idx";
    /// The recorded working set.
    pub const WORKING_SET: &str = "working-set";
}

/// Writing or reading a snapshot.
#[derive(Debug, Error)]
pub enum SnapshotError {
    /// A file could not be read, written or created.
    #[error("{what} {path}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// Cause (errno kept).
        #[source]
        source: io::Error,
    },
    /// The manifest is not valid JSON of the expected shape.
    #[error("{path}: not a valid manifest")]
    Manifest {
        /// The manifest.
        path: PathBuf,
        /// Cause.
        #[source]
        source: serde_json::Error,
    },
    /// The snapshot is of another format or version.
    #[error("{path}: {what}; this faultline reads {FORMAT} versions {VERSION_MIN} to {VERSION}")]
    Version {
        /// The manifest.
        path: PathBuf,
        /// What it says.
        what: String,
    },
    /// A file is shorter or longer than the manifest says.
    #[error("{path} has {actual} bytes, the manifest says {expected} (truncated or replaced?)")]
    Size {
        /// The file.
        path: PathBuf,
        /// Bytes expected.
        expected: u64,
        /// Bytes found.
        actual: u64,
    },
    /// A CRC does not match.
    #[error(
        "{what}: CRC-32 {actual:#010x}, the snapshot recorded {expected:#010x}: the snapshot is corrupt"
    )]
    Crc {
        /// What was checked.
        what: String,
        /// Recorded.
        expected: u32,
        /// Computed.
        actual: u32,
    },
    /// The snapshot's contents contradict each other.
    #[error("inconsistent snapshot: {0}")]
    Inconsistent(String),
    /// vCPU / VM state could not be saved, decoded or restored.
    #[error("vCPU state")]
    State(#[source] StateError),
    /// Reading guest memory failed.
    #[error("guest memory")]
    Memory(#[source] vm_memory::GuestMemoryError),
    /// The VM has parts whose state a snapshot cannot carry yet: rather than drop them, the
    /// snapshot is refused, naming them.
    #[error("this VM cannot be snapshotted yet: a snapshot would not carry {}", .0.join(", "))]
    Uncarried(Vec<String>),
    /// A vCPU's workload has finished: there is nothing left to snapshot.
    #[error("a vCPU has already stopped (its workload finished): nothing to snapshot")]
    Finished,
    /// Guest memory mapped from a snapshot file was lost while it was being read.
    #[error("guest memory could not be read whole")]
    MemoryLost(#[source] crate::memory::file::MemoryLost),
    /// The vCPUs' or the VM's state could not be saved.
    #[error("saving vCPU/VM state")]
    Save(#[source] crate::vstate::SaveError),
    /// The running machine failed a request (reading a slice's checksum).
    #[error("the VM")]
    Machine(#[source] crate::vstate::VmError),
}

fn io_err(what: &'static str, path: &Path) -> impl FnOnce(io::Error) -> SnapshotError {
    let path = path.to_path_buf();
    move |source| SnapshotError::Io { what, path, source }
}

/// A file of the snapshot, as the manifest records it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct FileRef {
    /// Name inside the directory.
    pub file: String,
    /// Size in bytes.
    pub bytes: u64,
    /// CRC-32 (IEEE) of the whole file.
    pub crc32: u32,
}

/// A vCPU's slice of the built-in guest's workload area.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct SliceInfo {
    /// Guest-physical start.
    pub start: u64,
    /// Length in bytes.
    pub len: u64,
    /// Index of its first page within the workload area.
    pub first_page: u64,
}

/// `manifest.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Manifest {
    /// Always [`FORMAT`].
    pub format: String,
    /// Format version ([`VERSION`]).
    pub version: u32,
    /// Wall-clock time of the snapshot, ms since the Unix epoch.
    pub created_unix_ms: u64,
    /// The VM's configuration.
    pub config: VmConfig,
    /// Whether the VM has an in-kernel irqchip (its state is in `state.bin`).
    pub irqchip: bool,
    /// The built-in guest's slices, one per vCPU.
    pub slices: Vec<SliceInfo>,
    /// The checksum of each slice at snapshot (what the guest's `verify` computes), `0x` hex.
    #[serde(with = "crate::hex::vec")]
    pub checksums: Vec<u64>,
    /// The last heartbeat number seen from each vCPU before the pause.
    pub heartbeats: Vec<u32>,
    /// Guest memory: the file, its size (= the guest's memory) and non-zero pages.
    pub memory: MemoryInfo,
    /// `memory.idx`.
    pub index: FileRef,
    /// `state.bin`.
    pub state: FileRef,
}

/// The memory file as the manifest records it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct MemoryInfo {
    /// Name inside the directory.
    pub file: String,
    /// Length (the guest's memory size).
    pub bytes: u64,
    /// Page size.
    pub page_size: u64,
    /// Pages that hold data (the rest are holes).
    pub nonzero_pages: u64,
    /// Whether `memory.idx` has a CRC per page.
    pub page_checksums: bool,
}

/// `memory.idx`: which pages hold data, and their checksums.
///
/// Layout (version 1): magic [`INDEX_MAGIC`], `u32` version, `u32` page size, `u64` pages,
/// `u32` pages per chunk, `u32` flags (bit 0: per-page CRCs present); then the non-zero bitmap
/// as `ceil(pages / 64)` `u64` words (bit `p % 64` of word `p / 64`); then one `u32` CRC-32 per
/// chunk (over the chunk's bytes, zeros included); then, if flagged, one `u32` CRC-32 per page.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemoryIndex {
    /// Pages.
    pub pages: u64,
    /// Pages per chunk.
    pub chunk_pages: u64,
    /// Non-zero bitmap.
    pub bitmap: Vec<u64>,
    /// CRC-32 per chunk.
    pub chunk_crc: Vec<u32>,
    /// CRC-32 per page, if recorded.
    pub page_crc: Option<Vec<u32>>,
}

/// CRC-32 of `n` zero bytes.
pub fn zero_crc(n: usize) -> u32 {
    let mut h = crc32fast::Hasher::new();
    let z = [0u8; 4096];
    let mut left = n;
    while left > 0 {
        let k = left.min(z.len());
        h.update(&z[..k]);
        left -= k;
    }
    h.finalize()
}

impl MemoryIndex {
    /// Whether page `p` holds data.
    pub fn nonzero(&self, p: u64) -> bool {
        self.bitmap
            .get((p / 64) as usize)
            .is_some_and(|w| w & (1 << (p % 64)) != 0)
    }

    /// Chunks.
    pub fn chunks(&self) -> u64 {
        self.pages.div_ceil(self.chunk_pages)
    }

    /// Encode as `memory.idx`.
    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::new();
        v.extend_from_slice(INDEX_MAGIC);
        v.extend_from_slice(&INDEX_VERSION.to_le_bytes());
        v.extend_from_slice(&(PAGE as u32).to_le_bytes());
        v.extend_from_slice(&self.pages.to_le_bytes());
        v.extend_from_slice(&(self.chunk_pages as u32).to_le_bytes());
        v.extend_from_slice(&u32::from(self.page_crc.is_some()).to_le_bytes());
        for w in &self.bitmap {
            v.extend_from_slice(&w.to_le_bytes());
        }
        for c in &self.chunk_crc {
            v.extend_from_slice(&c.to_le_bytes());
        }
        for c in self.page_crc.iter().flatten() {
            v.extend_from_slice(&c.to_le_bytes());
        }
        v
    }

    /// Decode `memory.idx`.
    pub fn decode(b: &[u8]) -> Result<Self, SnapshotError> {
        let bad = |m: String| SnapshotError::Inconsistent(format!("memory.idx: {m}"));
        if b.len() < 32 || &b[..8] != INDEX_MAGIC {
            return Err(bad("bad magic".into()));
        }
        let u32_at = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().expect("4 bytes"));
        if u32_at(8) != INDEX_VERSION {
            return Err(bad(format!("version {}", u32_at(8))));
        }
        if u64::from(u32_at(12)) != PAGE {
            return Err(bad(format!("page size {}", u32_at(12))));
        }
        let pages = u64::from_le_bytes(b[16..24].try_into().expect("8 bytes"));
        let chunk_pages = u64::from(u32_at(24));
        let flags = u32_at(28);
        // Bounded before use: a chunk is read and hashed whole, and the buffers follow from
        // these numbers (the writer uses CHUNK_PAGES).
        if !(1..=MAX_CHUNK_PAGES).contains(&chunk_pages) || pages > MAX_PAGES {
            return Err(bad(format!("{pages} pages in chunks of {chunk_pages}")));
        }
        let words = pages.div_ceil(64) as usize;
        let chunks = pages.div_ceil(chunk_pages) as usize;
        let page_crcs = if flags & 1 != 0 { pages as usize } else { 0 };
        let want = 32 + 8 * words + 4 * chunks + 4 * page_crcs;
        if b.len() != want {
            return Err(bad(format!("{} bytes, expected {want}", b.len())));
        }
        let mut at = 32;
        let bitmap = (0..words)
            .map(|i| u64::from_le_bytes(b[at + 8 * i..at + 8 * i + 8].try_into().expect("8")))
            .collect();
        at += 8 * words;
        let chunk_crc = (0..chunks).map(|i| u32_at(at + 4 * i)).collect();
        at += 4 * chunks;
        let page_crc =
            (flags & 1 != 0).then(|| (0..page_crcs).map(|i| u32_at(at + 4 * i)).collect());
        Ok(MemoryIndex {
            pages,
            chunk_pages,
            bitmap,
            chunk_crc,
            page_crc,
        })
    }
}

fn is_zero(b: &[u8]) -> bool {
    let (pre, mid, post) = // SAFETY: any bytes are a valid u128.
        unsafe { b.align_to::<u128>() };
    pre.iter().all(|&x| x == 0) && mid.iter().all(|&x| x == 0) && post.iter().all(|&x| x == 0)
}

/// What writing guest memory produced.
#[derive(Debug, Clone, Copy)]
pub struct MemoryWritten {
    /// Pages with data.
    pub nonzero_pages: u64,
    /// Bytes written to the memory file.
    pub bytes_written: u64,
}

/// Write `mem` as a sparse memory file at `path` and return its index.
///
/// # Safety
/// Nothing may write guest memory meanwhile (the VM is paused).
pub unsafe fn write_memory(
    mem: &GuestMem,
    path: &Path,
    page_checksums: bool,
) -> Result<(MemoryIndex, MemoryWritten), SnapshotError> {
    let f = create_file(path)?;
    f.set_len(mem.size()).map_err(io_err("sizing", path))?;
    let pages = mem.size() / PAGE;
    let mut idx = MemoryIndex {
        pages,
        chunk_pages: CHUNK_PAGES,
        bitmap: vec![0; pages.div_ceil(64) as usize],
        chunk_crc: Vec::with_capacity(pages.div_ceil(CHUNK_PAGES) as usize),
        page_crc: page_checksums.then(|| Vec::with_capacity(pages as usize)),
    };
    let chunk = (CHUNK_PAGES * PAGE) as usize;
    let mut written = 0u64;
    let mut nonzero = 0u64;
    for c in 0..idx.chunks() {
        let gpa = c * CHUNK_PAGES * PAGE;
        let len = chunk.min((mem.size() - gpa) as usize);
        // SAFETY: the caller guarantees nobody writes guest memory meanwhile.
        let data = unsafe { mem.slice(gpa, len) }.expect("chunk inside guest memory");
        idx.chunk_crc.push(crc32fast::hash(data));
        // Runs of non-zero pages, one pwrite each.
        let mut run_start: Option<usize> = None;
        for (i, page) in data.chunks(PAGE as usize).enumerate() {
            let p = gpa / PAGE + i as u64;
            if let Some(pc) = idx.page_crc.as_mut() {
                pc.push(crc32fast::hash(page));
            }
            let nz = !is_zero(page);
            if nz {
                idx.bitmap[(p / 64) as usize] |= 1 << (p % 64);
                nonzero += 1;
                run_start.get_or_insert(i);
            }
            let last = (i + 1) * PAGE as usize >= len;
            if let Some(s) = run_start
                && (!nz || last)
            {
                let end = if nz { i + 1 } else { i };
                let bytes = &data[s * PAGE as usize..end * PAGE as usize];
                f.write_all_at(bytes, gpa + s as u64 * PAGE)
                    .map_err(io_err("writing", path))?;
                written += bytes.len() as u64;
                run_start = None;
            }
        }
    }
    f.sync_data().map_err(io_err("syncing", path))?;
    Ok((
        idx,
        MemoryWritten {
            nonzero_pages: nonzero,
            bytes_written: written,
        },
    ))
}

/// Create a new file at `path` for writing: never through a symbolic link, never over an
/// existing file (snapshots are written into a fresh directory).
pub fn create_file(path: &Path) -> Result<File, SnapshotError> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .mode(0o600)
        .open(path)
        .map_err(io_err("creating", path))
}

/// Write `data` to the new file `dir/name` and describe it.
pub fn write_file(dir: &Path, name: &str, data: &[u8]) -> Result<FileRef, SnapshotError> {
    let path = dir.join(name);
    let mut f = create_file(&path)?;
    f.write_all(data).map_err(io_err("writing", &path))?;
    f.sync_data().map_err(io_err("syncing", &path))?;
    Ok(FileRef {
        file: name.into(),
        bytes: data.len() as u64,
        crc32: crc32fast::hash(data),
    })
}

/// Write the manifest last, atomically (a directory without one is not a snapshot).
pub fn write_manifest(dir: &Path, m: &Manifest) -> Result<(), SnapshotError> {
    let tmp = dir.join(".manifest.json.tmp");
    let _ = std::fs::remove_file(&tmp);
    let json = serde_json::to_vec_pretty(m).expect("the manifest serialises");
    write_file(dir, ".manifest.json.tmp", &json)?;
    let path = dir.join(files::MANIFEST);
    std::fs::rename(&tmp, &path).map_err(io_err("renaming into", &path))
}

/// A snapshot read back and checked: everything but the memory itself.
#[derive(Debug)]
pub struct Loaded {
    /// The directory.
    pub dir: PathBuf,
    /// The manifest.
    pub manifest: Manifest,
    /// VM-wide state.
    pub vm: VmState,
    /// Per-vCPU state.
    pub vcpus: Vec<VcpuState>,
    /// The memory index.
    pub index: MemoryIndex,
    /// The memory file, open for reading.
    pub memory: File,
}

fn read_checked(dir: &Path, r: &FileRef, what: &str) -> Result<Vec<u8>, SnapshotError> {
    if r.file.contains('/') || r.file.starts_with('.') {
        return Err(SnapshotError::Inconsistent(format!(
            "{what} file name '{}' leaves the snapshot directory",
            r.file
        )));
    }
    let path = dir.join(&r.file);
    let data = std::fs::read(&path).map_err(io_err("reading", &path))?;
    if data.len() as u64 != r.bytes {
        return Err(SnapshotError::Size {
            path,
            expected: r.bytes,
            actual: data.len() as u64,
        });
    }
    let crc = crc32fast::hash(&data);
    if crc != r.crc32 {
        return Err(SnapshotError::Crc {
            what: format!("{what} ({})", path.display()),
            expected: r.crc32,
            actual: crc,
        });
    }
    Ok(data)
}

/// Parse and check `manifest.json` (`raw`, read from `mpath`): format and version first (a
/// newer layout is reported as such), then the fields, then what the manifest alone can check
/// (memory size and page size against the configuration, one slice and checksum per vCPU,
/// slices inside guest memory).
pub fn parse_manifest(raw: &[u8], mpath: &Path) -> Result<Manifest, SnapshotError> {
    // Format and version first, so that a newer layout is reported as such.
    let head: serde_json::Value =
        serde_json::from_slice(raw).map_err(|source| SnapshotError::Manifest {
            path: mpath.to_path_buf(),
            source,
        })?;
    let format = head.get("format").and_then(|v| v.as_str()).unwrap_or("");
    let version = head.get("version").and_then(|v| v.as_u64());
    if format != FORMAT
        || !version.is_some_and(|v| (u64::from(VERSION_MIN)..=u64::from(VERSION)).contains(&v))
    {
        return Err(SnapshotError::Version {
            path: mpath.to_path_buf(),
            what: format!("format '{format}' version {version:?}"),
        });
    }
    let manifest: Manifest =
        serde_json::from_value(head).map_err(|source| SnapshotError::Manifest {
            path: mpath.to_path_buf(),
            source,
        })?;
    let cfg = &manifest.config;
    let bad = |m: String| Err(SnapshotError::Inconsistent(m));
    if manifest.memory.bytes != cfg.mem_bytes {
        return bad(format!(
            "memory file of {} bytes for a VM of {} bytes",
            manifest.memory.bytes, cfg.mem_bytes
        ));
    }
    if manifest.memory.page_size != PAGE {
        return bad(format!("page size {}", manifest.memory.page_size));
    }
    // The built-in guest has a slice (and its checksum) per vCPU; a Linux guest has none.
    let slices = if cfg.linux.is_some() {
        0
    } else {
        cfg.vcpus as usize
    };
    if manifest.slices.len() != slices || manifest.checksums.len() != slices {
        return bad(format!(
            "{} slices and {} checksums for {} vCPUs",
            manifest.slices.len(),
            manifest.checksums.len(),
            cfg.vcpus
        ));
    }
    if manifest
        .slices
        .iter()
        .any(|s| s.start.checked_add(s.len).is_none_or(|e| e > cfg.mem_bytes))
    {
        return bad("a slice lies outside guest memory".into());
    }
    Ok(manifest)
}

/// Read and check a snapshot directory: manifest, state, index, memory file length.
pub fn load(dir: &Path) -> Result<Loaded, SnapshotError> {
    let mpath = dir.join(files::MANIFEST);
    let raw = std::fs::read(&mpath).map_err(io_err("reading", &mpath))?;
    let manifest = parse_manifest(&raw, &mpath)?;
    let cfg = &manifest.config;
    let bad = |m: String| Err(SnapshotError::Inconsistent(m));
    let state = read_checked(dir, &manifest.state, "vCPU state")?;
    let (vm, vcpus) = state::decode(&state, cfg.vcpus as usize).map_err(SnapshotError::State)?;
    let index = MemoryIndex::decode(&read_checked(dir, &manifest.index, "memory index")?)?;
    if index.pages * PAGE != cfg.mem_bytes {
        return bad(format!(
            "memory index covers {} pages, the VM has {}",
            index.pages,
            cfg.mem_bytes / PAGE
        ));
    }
    if index.page_crc.is_some() != manifest.memory.page_checksums {
        return bad("page checksums flagged in one place but not the other".into());
    }
    let ones: u64 = index.bitmap.iter().map(|w| u64::from(w.count_ones())).sum();
    if ones != manifest.memory.nonzero_pages {
        return bad(format!(
            "memory index has {ones} non-zero pages, the manifest {}",
            manifest.memory.nonzero_pages
        ));
    }
    let mem_path = dir.join(&manifest.memory.file);
    if manifest.memory.file.contains('/') {
        return bad("memory file name leaves the snapshot directory".into());
    }
    let memory = File::open(&mem_path).map_err(io_err("opening", &mem_path))?;
    let len = memory
        .metadata()
        .map_err(io_err("reading the size of", &mem_path))?
        .len();
    if len != manifest.memory.bytes {
        return Err(SnapshotError::Size {
            path: mem_path,
            expected: manifest.memory.bytes,
            actual: len,
        });
    }
    Ok(Loaded {
        dir: dir.to_path_buf(),
        manifest,
        vm,
        vcpus,
        index,
        memory,
    })
}

/// Check chunk `c` of guest memory (already loaded) against the index.
///
/// # Safety
/// Nothing may write that part of guest memory meanwhile.
pub unsafe fn check_chunk(mem: &GuestMem, idx: &MemoryIndex, c: u64) -> Result<(), SnapshotError> {
    let gpa = c * idx.chunk_pages * PAGE;
    let len = ((idx.chunk_pages * PAGE).min(mem.size() - gpa)) as usize;
    // SAFETY: the caller's guarantee.
    let data = unsafe { mem.slice(gpa, len) }.expect("chunk inside guest memory");
    let crc = crc32fast::hash(data);
    if crc != idx.chunk_crc[c as usize] {
        return Err(SnapshotError::Crc {
            what: format!("memory chunk {c} (guest-physical {gpa:#x}, {len} bytes)"),
            expected: idx.chunk_crc[c as usize],
            actual: crc,
        });
    }
    Ok(())
}

/// Check guest memory mapped from the memory file (`restore --mode mmap`) against every chunk
/// CRC of the index, before any vCPU runs. Chunks the file holds as a hole (`SEEK_DATA` finds
/// no data in them) read as zeros without being read, and are checked against the zero CRC;
/// every other chunk is read through the mapping (which also maps its pages for the guest: no
/// copy is made). Returns the bytes read.
///
/// # Safety
/// No vCPU may run and nothing else may write guest memory meanwhile.
pub unsafe fn verify_mapped(loaded: &Loaded, mem: &GuestMem) -> Result<u64, SnapshotError> {
    use std::os::fd::AsRawFd;
    let idx = &loaded.index;
    let chunk = idx.chunk_pages * PAGE;
    let full_zero = zero_crc(chunk as usize);
    let fd = loaded.memory.as_raw_fd();
    let mut data = Vec::new();
    let mut next_data: i64 = -1;
    for c in 0..idx.chunks() {
        let start = c * chunk;
        let end = (start + chunk).min(mem.size());
        if next_data < start as i64 {
            // SAFETY: lseek on an fd we own; no memory is passed.
            next_data = unsafe { libc::lseek(fd, start as i64, libc::SEEK_DATA) };
            if next_data < 0 {
                // ENXIO: no data at or after `start`. Any other error: read everything.
                let e = io::Error::last_os_error();
                next_data = if e.raw_os_error() == Some(libc::ENXIO) {
                    i64::MAX
                } else {
                    start as i64
                };
            }
        }
        if next_data < end as i64 {
            data.push(c);
            continue;
        }
        let want = if end - start == chunk {
            full_zero
        } else {
            zero_crc((end - start) as usize)
        };
        if idx.chunk_crc[c as usize] != want {
            return Err(SnapshotError::Crc {
                what: format!(
                    "memory chunk {c} (guest-physical {start:#x}, {} bytes; a hole in the file)",
                    end - start
                ),
                expected: idx.chunk_crc[c as usize],
                actual: want,
            });
        }
    }
    // The chunks with data, read and checked on up to 4 threads.
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .clamp(1, 4);
    let per = data.len().div_ceil(threads).max(1);
    std::thread::scope(|s| {
        let parts: Vec<_> = data
            .chunks(per)
            .map(|part| {
                s.spawn(move || {
                    for &c in part {
                        // SAFETY: the caller's guarantee.
                        unsafe { check_chunk(mem, idx, c) }?;
                    }
                    Ok::<(), SnapshotError>(())
                })
            })
            .collect();
        parts
            .into_iter()
            .try_for_each(|h| h.join().expect("a CRC thread does not panic"))
    })?;
    Ok(data.len() as u64 * chunk)
}

/// Read every non-zero page of the memory file into fresh (zeroed) guest memory, checking
/// every chunk's CRC. Returns the bytes read.
///
/// # Safety
/// No vCPU may run and nothing else may touch guest memory meanwhile.
pub unsafe fn load_eager(loaded: &Loaded, mem: &GuestMem) -> Result<u64, SnapshotError> {
    let idx = &loaded.index;
    let path = loaded.dir.join(&loaded.manifest.memory.file);
    let zero_chunk = zero_crc((idx.chunk_pages * PAGE) as usize);
    let mut read = 0u64;
    for c in 0..idx.chunks() {
        let p0 = c * idx.chunk_pages;
        let p1 = (p0 + idx.chunk_pages).min(idx.pages);
        let mut p = p0;
        let mut any = false;
        while p < p1 {
            if !idx.nonzero(p) {
                p += 1;
                continue;
            }
            let mut e = p;
            while e < p1 && idx.nonzero(e) {
                e += 1;
            }
            let len = ((e - p) * PAGE) as usize;
            // SAFETY: the caller guarantees exclusive access to guest memory.
            let dst = unsafe { mem.slice_mut(p * PAGE, len) }.expect("inside guest memory");
            loaded
                .memory
                .read_exact_at(dst, p * PAGE)
                .map_err(io_err("reading", &path))?;
            read += len as u64;
            any = true;
            p = e;
        }
        if any || (p1 - p0) != idx.chunk_pages {
            // SAFETY: as above.
            unsafe { check_chunk(mem, idx, c) }?;
        } else if idx.chunk_crc[c as usize] != zero_chunk {
            return Err(SnapshotError::Crc {
                what: format!("memory chunk {c} (all zero pages in the index)"),
                expected: idx.chunk_crc[c as usize],
                actual: zero_chunk,
            });
        }
    }
    Ok(read)
}

/// Check the pages of guest-physical `ranges` (start, length) against the per-page CRCs. The
/// guest must not have written them since the restore (e.g. the built-in guest's slices after
/// a `verify` run; not its GDT, where the CPU sets accessed and busy bits). Returns the pages
/// checked.
///
/// # Safety
/// Nothing may write guest memory meanwhile.
pub unsafe fn check_pages(
    mem: &GuestMem,
    idx: &MemoryIndex,
    ranges: &[(u64, u64)],
) -> Result<u64, SnapshotError> {
    let Some(table) = &idx.page_crc else {
        return Err(SnapshotError::Inconsistent(
            "the snapshot has no per-page checksums (take it with page checksums on)".into(),
        ));
    };
    let mut n = 0;
    for &(start, len) in ranges {
        for p in start / PAGE..(start + len).div_ceil(PAGE).min(table.len() as u64) {
            n += 1;
            let want = table[p as usize];
            let gpa = p * PAGE;
            // SAFETY: the caller's guarantee.
            let page = unsafe { mem.slice(gpa, PAGE as usize) }.expect("page inside guest memory");
            let got = crc32fast::hash(page);
            if got != want {
                return Err(SnapshotError::Crc {
                    what: format!("guest page {p} (guest-physical {gpa:#x}) as served"),
                    expected: want,
                    actual: got,
                });
            }
        }
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn index_round_trip_and_bad_input() {
        let idx = MemoryIndex {
            pages: 100,
            chunk_pages: 16,
            bitmap: vec![0b1011, 1 << 35],
            chunk_crc: (0..7).collect(),
            page_crc: Some((0..100).collect()),
        };
        let b = idx.encode();
        assert_eq!(MemoryIndex::decode(&b).unwrap(), idx);
        assert!(idx.nonzero(0) && !idx.nonzero(2) && idx.nonzero(99));
        for cut in [0, 8, 31, 32, b.len() - 1] {
            assert!(MemoryIndex::decode(&b[..cut]).is_err());
        }
        let mut v = b.clone();
        v[8] = 2;
        assert!(
            MemoryIndex::decode(&v)
                .unwrap_err()
                .to_string()
                .contains("version 2")
        );
        // A crafted index with huge chunks (2^32 - 1 pages each: 16 TiB hashed per chunk) and
        // a consistent length is refused before anything is sized from it.
        let huge = MemoryIndex {
            pages: 100,
            chunk_pages: u64::from(u32::MAX),
            bitmap: vec![0, 0],
            chunk_crc: vec![0],
            page_crc: None,
        };
        let e = MemoryIndex::decode(&huge.encode()).unwrap_err().to_string();
        assert!(e.contains("in chunks of 4294967295"), "{e}");
        let mut many = idx.encode();
        many[16..24].copy_from_slice(&(MAX_PAGES + 1).to_le_bytes());
        assert!(MemoryIndex::decode(&many).is_err());
    }

    #[test]
    fn zero_detection() {
        let mut p = vec![0u8; 4096];
        assert!(is_zero(&p));
        p[4095] = 1;
        assert!(!is_zero(&p));
        assert!(is_zero(&p[1..4095]));
        assert_eq!(zero_crc(5000), crc32fast::hash(&[0u8; 5000]));
    }
}

/// What taking a snapshot did.
#[derive(Debug, Clone, Serialize)]
pub struct SnapshotInfo {
    /// The directory.
    pub dir: PathBuf,
    /// Whole operation, ms.
    pub total_ms: f64,
    /// How long the guest was paused for it, ms (0 if it was paused already).
    pub paused_ms: f64,
    /// Guest memory size.
    pub mem_bytes: u64,
    /// Pages with data.
    pub nonzero_pages: u64,
    /// Bytes written to the memory file.
    pub bytes_written: u64,
    /// Per-vCPU slice checksums (what `verify` must report after a restore), `0x` hex.
    #[serde(with = "crate::hex::vec")]
    pub checksums: Vec<u64>,
    /// Last heartbeat number per vCPU.
    pub heartbeats: Vec<u32>,
}
