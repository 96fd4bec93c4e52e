//! What a block device stores its sectors in: the [`BlockBackend`] trait and a raw image
//! file, [`FileBackend`].

use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::path::{Path, PathBuf};

use thiserror::Error;

use super::{CHUNK, SECTOR_SIZE, VIRTIO_BLK_ID_BYTES};

/// The most bytes written at once when zeroes have to be written out (no `ZERO_RANGE`).
const ZERO_CHUNK: usize = 1 << 20;

/// The storage behind a [`Block`](super::Block) device: a byte-addressed disk.
///
/// Offsets and lengths are in bytes; the device only calls with ranges inside
/// [`size`](Self::size) (checked before the call). Every error keeps its errno: the device
/// reports it to the driver as `VIRTIO_BLK_S_IOERR` for that one request and carries on.
pub trait BlockBackend: Send {
    /// The disk's size in bytes (a multiple of 512).
    fn size(&self) -> u64;
    /// The disk's serial, at most 20 bytes (`VIRTIO_BLK_T_GET_ID`).
    fn id(&self) -> &[u8];
    /// Whether writes, discards and write-zeroes are refused.
    fn read_only(&self) -> bool;
    /// Fill `buf` from `offset` (all of it, or an error).
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()>;
    /// Write all of `buf` at `offset`.
    fn write_at(&self, offset: u64, buf: &[u8]) -> io::Result<()>;
    /// Make every completed write durable.
    fn flush(&self) -> io::Result<()>;
    /// The range's contents are no longer needed (it may be deallocated).
    fn discard(&self, offset: u64, len: u64) -> io::Result<()>;
    /// The range reads as zeroes afterwards.
    fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()>;
}

/// Opening an image file failed.
#[derive(Debug, Error)]
pub enum OpenError {
    /// The file could not be opened.
    #[error("cannot open {path}")]
    Open {
        /// Path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// Its size could not be found.
    #[error("cannot find the size of {path}")]
    Size {
        /// Path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// It is neither a regular file nor a block device.
    #[error("{path} is neither a regular file nor a block device")]
    NotADisk {
        /// Path.
        path: PathBuf,
    },
    /// Its size is not a whole number of 512-byte sectors.
    #[error("{path} is {size} bytes, not a multiple of {SECTOR_SIZE}")]
    NotSectors {
        /// Path.
        path: PathBuf,
        /// Its size.
        size: u64,
    },
}

/// A raw disk image (or a block device node) accessed with `pread`/`pwrite`.
///
/// `flush` is `fdatasync`, `discard` punches a hole (`FALLOC_FL_PUNCH_HOLE |
/// FALLOC_FL_KEEP_SIZE`; a file system without holes makes it a no-op, which a discard
/// allows), `write_zeroes` is `FALLOC_FL_ZERO_RANGE`, or zeroes written out where the file
/// system does not support it (`EOPNOTSUPP`, e.g. tmpfs).
#[derive(Debug)]
pub struct FileBackend {
    file: File,
    size: u64,
    id: Vec<u8>,
    read_only: bool,
    /// With `O_DIRECT` (the page cache bypassed, QEMU's `cache=none`): a bounce buffer
    /// aligned to 4 KiB, as direct I/O needs, for data from unaligned buffers.
    direct: Option<std::sync::Mutex<Vec<u8>>>,
}

/// Direct I/O's buffer alignment (covers 512-byte and 4 KiB logical blocks).
const DIRECT_ALIGN: usize = 4096;

impl FileBackend {
    /// Open the image at `path`, read-only or read-write. Its serial is its file name (the
    /// first 20 bytes).
    pub fn open(path: impl AsRef<Path>, read_only: bool) -> Result<FileBackend, OpenError> {
        Self::open_with(path, read_only, false)
    }

    /// Open the image, with `O_DIRECT` if `direct` (the page cache bypassed; requests must
    /// then be aligned to the file system's logical block, which 512-byte sectors are on
    /// most; a file system without direct I/O refuses the open).
    pub fn open_with(
        path: impl AsRef<Path>,
        read_only: bool,
        direct: bool,
    ) -> Result<FileBackend, OpenError> {
        use std::os::unix::fs::OpenOptionsExt;
        let path = path.as_ref();
        let mut file = OpenOptions::new()
            .read(true)
            .write(!read_only)
            .custom_flags(if direct { libc::O_DIRECT } else { 0 })
            .open(path)
            .map_err(|source| OpenError::Open {
                path: path.to_owned(),
                source,
            })?;
        let kind = file
            .metadata()
            .map_err(|source| OpenError::Size {
                path: path.to_owned(),
                source,
            })?
            .file_type();
        if !kind.is_file() && !kind.is_block_device() {
            return Err(OpenError::NotADisk {
                path: path.to_owned(),
            });
        }
        // Seeking to the end also sizes a block device node (whose metadata says 0).
        let size = file
            .seek(SeekFrom::End(0))
            .map_err(|source| OpenError::Size {
                path: path.to_owned(),
                source,
            })?;
        if size % SECTOR_SIZE != 0 {
            return Err(OpenError::NotSectors {
                path: path.to_owned(),
                size,
            });
        }
        let mut id = path
            .file_name()
            .map(|n| n.as_encoded_bytes().to_vec())
            .unwrap_or_default();
        id.truncate(VIRTIO_BLK_ID_BYTES);
        Ok(FileBackend {
            file,
            size,
            id,
            read_only,
            direct: direct.then(|| std::sync::Mutex::new(vec![0u8; CHUNK + DIRECT_ALIGN])),
        })
    }

    fn fallocate(&self, mode: libc::c_int, offset: u64, len: u64) -> io::Result<()> {
        let (Ok(off), Ok(n)) = (libc::off_t::try_from(offset), libc::off_t::try_from(len)) else {
            return Err(io::Error::from_raw_os_error(libc::EFBIG));
        };
        loop {
            // SAFETY: fallocate on a file descriptor we own, with plain integers; no memory
            // is passed.
            let r = unsafe { libc::fallocate(self.file.as_raw_fd(), mode, off, n) };
            if r == 0 {
                return Ok(());
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
    }
}

/// The first `len` bytes of `v` from its first 4 KiB-aligned address (`v` has CHUNK +
/// DIRECT_ALIGN bytes, `len` is at most CHUNK).
fn aligned(v: &mut [u8], len: usize) -> &mut [u8] {
    let off = v.as_ptr().align_offset(DIRECT_ALIGN).min(DIRECT_ALIGN);
    &mut v[off..off + len]
}

fn unsupported(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS)
    )
}

impl BlockBackend for FileBackend {
    fn size(&self) -> u64 {
        self.size
    }

    fn id(&self) -> &[u8] {
        &self.id
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let Some(bounce) = &self.direct else {
            return self.file.read_exact_at(buf, offset);
        };
        let mut b = bounce
            .lock()
            .map_err(|_| io::Error::other("bounce buffer poisoned"))?;
        let mut done = 0;
        for piece in buf.chunks_mut(CHUNK) {
            let a = aligned(&mut b, piece.len());
            self.file.read_exact_at(a, offset + done)?;
            piece.copy_from_slice(a);
            done += piece.len() as u64;
        }
        Ok(())
    }

    fn write_at(&self, offset: u64, buf: &[u8]) -> io::Result<()> {
        let Some(bounce) = &self.direct else {
            return self.file.write_all_at(buf, offset);
        };
        let mut b = bounce
            .lock()
            .map_err(|_| io::Error::other("bounce buffer poisoned"))?;
        let mut done = 0;
        for piece in buf.chunks(CHUNK) {
            let a = aligned(&mut b, piece.len());
            a.copy_from_slice(piece);
            self.file.write_all_at(a, offset + done)?;
            done += piece.len() as u64;
        }
        Ok(())
    }

    fn flush(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        match self.fallocate(
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            offset,
            len,
        ) {
            Err(e) if unsupported(&e) => Ok(()),
            r => r,
        }
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()> {
        match self.fallocate(libc::FALLOC_FL_ZERO_RANGE, offset, len) {
            Err(e) if unsupported(&e) => {}
            r => return r,
        }
        let zeroes = vec![0u8; usize::try_from(len).unwrap_or(ZERO_CHUNK).min(ZERO_CHUNK)];
        let mut done = 0u64;
        while done < len {
            let n = (len - done).min(zeroes.len() as u64) as usize;
            self.write_at(offset + done, &zeroes[..n])?;
            done += n as u64;
        }
        Ok(())
    }
}

#[cfg(test)]
mod direct_tests {
    use super::*;

    #[test]
    fn direct_io_reads_and_writes_through_an_aligned_bounce_buffer() {
        // /var/tmp: a disk file system with O_DIRECT (tmpfs has none).
        let dir = tempfile::tempdir_in("/var/tmp").unwrap();
        let p = dir.path().join("d.img");
        std::fs::write(&p, vec![7u8; 1 << 21]).unwrap();
        let b = FileBackend::open_with(&p, false, true)
            .expect("O_DIRECT open on /var/tmp (a disk file system is needed)");
        // An unaligned buffer, more than one chunk.
        let mut v = vec![0u8; CHUNK + 4096 + 1];
        let buf = &mut v[1..];
        b.read_at(4096, buf).unwrap();
        assert!(buf.iter().all(|&x| x == 7));
        let data: Vec<u8> = (0..8192u32).map(|i| i as u8).collect();
        b.write_at(512, &data).unwrap();
        let mut back = vec![0u8; 8192];
        b.read_at(512, &mut back).unwrap();
        assert_eq!(back, data);
        let on_disk = std::fs::read(&p).unwrap();
        assert_eq!(&on_disk[512..512 + 8192], &data[..]);
        // Not sector-aligned: the kernel refuses, the error comes back (IOERR for the guest).
        assert!(b.read_at(100, &mut [0u8; 512]).is_err());
    }
}
