//! What a block device stores its sectors in: the [`BlockBackend`] trait and a raw image
//! file, [`FileBackend`].

use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::path::{Path, PathBuf};

use thiserror::Error;

use super::{SECTOR_SIZE, VIRTIO_BLK_ID_BYTES};

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
}

impl FileBackend {
    /// Open the image at `path`, read-only or read-write. Its serial is its file name (the
    /// first 20 bytes).
    pub fn open(path: impl AsRef<Path>, read_only: bool) -> Result<FileBackend, OpenError> {
        let path = path.as_ref();
        let mut file = OpenOptions::new()
            .read(true)
            .write(!read_only)
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
        self.file.read_exact_at(buf, offset)
    }

    fn write_at(&self, offset: u64, buf: &[u8]) -> io::Result<()> {
        self.file.write_all_at(buf, offset)
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
            self.file.write_all_at(&zeroes[..n], offset + done)?;
            done += n as u64;
        }
        Ok(())
    }
}
