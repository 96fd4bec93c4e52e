//! The virtio block device (virtio 1.2, section 5.2): one request queue over a
//! [`BlockBackend`] (a raw image file: [`FileBackend`]).
//!
//! # Features offered
//!
//! `SEG_MAX` (2), `BLK_SIZE` (6), `FLUSH` (9), `DISCARD` (13), `WRITE_ZEROES` (14), and
//! `RO` (5) when the backend is read-only.
//!
//! # Configuration space (`struct virtio_blk_config`, little-endian)
//!
//! | offset | size | field | value |
//! |---|---|---|---|
//! | 0 | 8 | capacity | disk size in 512-byte sectors |
//! | 8 | 4 | size_max | 0 (`SIZE_MAX` not offered) |
//! | 12 | 4 | seg_max | [`QUEUE_SIZE`] - 2 |
//! | 16 | 4 | geometry | 0 (not offered) |
//! | 20 | 4 | blk_size | 512 |
//! | 24 | 8 | topology | 0 (not offered) |
//! | 32 | 1 | writeback | 0 |
//! | 34 | 2 | num_queues | 1 |
//! | 36 | 4 | max_discard_sectors | [`MAX_DISCARD_SECTORS`] |
//! | 40 | 4 | max_discard_seg | [`MAX_SEGMENTS`] |
//! | 44 | 4 | discard_sector_alignment | 8 (4 KiB) |
//! | 48 | 4 | max_write_zeroes_sectors | [`MAX_DISCARD_SECTORS`] |
//! | 52 | 4 | max_write_zeroes_seg | [`MAX_SEGMENTS`] |
//! | 56 | 1 | write_zeroes_may_unmap | 0 |
//!
//! # Requests
//!
//! A chain holds, in its device-readable part, a 16-byte header `{type: u32, reserved:
//! u32, sector: u64}` and then the data to write or the segments; its device-writable part
//! holds the data to read and, in its very last byte, the status the device writes back:
//! `OK` (0), `IOERR` (1), `UNSUPP` (2). Buffers may split these anywhere.
//!
//! | type | name | data |
//! |---|---|---|
//! | 0 | IN | writable, a multiple of 512 bytes, read from `sector` |
//! | 1 | OUT | readable, a multiple of 512 bytes, written at `sector` |
//! | 4 | FLUSH | none |
//! | 8 | GET_ID | writable, 20 bytes: the serial, NUL-padded |
//! | 11 | DISCARD | readable segments `{sector: u64, num_sectors: u32, flags: u32}` |
//! | 13 | WRITE_ZEROES | the same segments; flag bit 0 is "unmap" |
//!
//! The used length is every byte written to the guest, the status byte included.
//!
//! A request the device can answer gets a status: a range past the capacity, data that is
//! not whole sectors, a write to a read-only disk, a backend error (a full disk: `ENOSPC`)
//! are `IOERR` for that request only, counted in [`BlockStats`] and logged; an unknown type
//! or flag is `UNSUPP`. A chain the device cannot answer (no writable status byte, a header
//! shorter than 16 bytes) is [`DeviceError::Request`]: the device needs a reset.
//!
//! Data moves between guest memory and the backend in pieces of at most [`CHUNK`] bytes.

mod backend;
mod stats;

#[cfg(test)]
mod tests;

use std::sync::Arc;

use thiserror::Error;
use vm_memory::GuestMemoryMmap;

use crate::chain::Chain;
use crate::{DeviceError, DeviceType, Queues, VirtioDevice};

pub use backend::{BlockBackend, FileBackend, OpenError};
pub use stats::{BlockCounters, BlockStats};

/// Bytes in a sector (the unit of `sector` and `capacity`, whatever `blk_size` says).
pub const SECTOR_SIZE: u64 = 512;
/// Bytes of a `GET_ID` answer.
pub const VIRTIO_BLK_ID_BYTES: usize = 20;
/// The request queue's largest size.
pub const QUEUE_SIZE: u16 = 256;
/// The most bytes moved between guest memory and the backend at once.
pub const CHUNK: usize = 1 << 20;
/// The most sectors of one discard or write-zeroes segment (QEMU's bound: `INT_MAX`
/// bytes in whole sectors).
pub const MAX_DISCARD_SECTORS: u32 = (i32::MAX as u32) >> 9;
/// The most segments of one discard or write-zeroes request.
pub const MAX_SEGMENTS: u32 = 32;

/// `VIRTIO_BLK_F_SEG_MAX`.
pub const F_SEG_MAX: u64 = 1 << 2;
/// `VIRTIO_BLK_F_RO`.
pub const F_RO: u64 = 1 << 5;
/// `VIRTIO_BLK_F_BLK_SIZE`.
pub const F_BLK_SIZE: u64 = 1 << 6;
/// `VIRTIO_BLK_F_FLUSH`.
pub const F_FLUSH: u64 = 1 << 9;
/// `VIRTIO_BLK_F_DISCARD`.
pub const F_DISCARD: u64 = 1 << 13;
/// `VIRTIO_BLK_F_WRITE_ZEROES`.
pub const F_WRITE_ZEROES: u64 = 1 << 14;

/// Request types.
pub mod req {
    /// Read.
    pub const IN: u32 = 0;
    /// Write.
    pub const OUT: u32 = 1;
    /// Flush.
    pub const FLUSH: u32 = 4;
    /// Get the serial.
    pub const GET_ID: u32 = 8;
    /// Discard.
    pub const DISCARD: u32 = 11;
    /// Write zeroes.
    pub const WRITE_ZEROES: u32 = 13;
}

/// Status values.
pub mod status {
    /// Success.
    pub const OK: u8 = 0;
    /// The request failed.
    pub const IOERR: u8 = 1;
    /// The request is not supported.
    pub const UNSUPP: u8 = 2;
}

const HEADER: u64 = 16;
const SEGMENT: u64 = 16;
const WRITE_ZEROES_UNMAP: u32 = 1;
const DISCARD_ALIGNMENT: u32 = 8;
const CONFIG_LEN: usize = 60;

/// Why one request failed (reported in its status byte, counted and logged).
#[derive(Debug, Error)]
pub enum RequestError {
    /// The range is not inside the disk.
    #[error("sectors {sector}+{bytes} bytes are past the capacity of {capacity} bytes")]
    OutOfRange {
        /// First sector.
        sector: u64,
        /// Length in bytes.
        bytes: u64,
        /// Disk size in bytes.
        capacity: u64,
    },
    /// The data is not whole sectors.
    #[error("{bytes} bytes of data are not whole 512-byte sectors")]
    Unaligned {
        /// Length.
        bytes: u64,
    },
    /// A write to a read-only disk.
    #[error("the disk is read-only")]
    ReadOnly,
    /// Discard or write-zeroes segments that are malformed or too many.
    #[error("bad segments: {0}")]
    Segments(String),
    /// An unknown request type, a flag not supported, or a feature not negotiated.
    #[error("unsupported: {0}")]
    Unsupported(String),
    /// The backend failed.
    #[error("backend {op} at byte {offset} ({len} bytes) failed")]
    Backend {
        /// The operation.
        op: &'static str,
        /// Byte offset.
        offset: u64,
        /// Length.
        len: u64,
        /// Cause (errno kept).
        #[source]
        source: std::io::Error,
    },
}

impl RequestError {
    fn status(&self) -> u8 {
        match self {
            RequestError::Unsupported(_) => status::UNSUPP,
            _ => status::IOERR,
        }
    }
}

/// A virtio block device over a [`BlockBackend`].
pub struct Block {
    backend: Box<dyn BlockBackend>,
    acked: u64,
    stats: Arc<BlockStats>,
    buf: Vec<u8>,
}

impl Block {
    /// A block device over `backend` (its size must be whole sectors; the rest is ignored).
    pub fn new(backend: Box<dyn BlockBackend>) -> Block {
        Block {
            backend,
            acked: 0,
            stats: Arc::new(BlockStats::default()),
            buf: Vec::new(),
        }
    }

    /// Its counters (shared: they go on counting while the device runs).
    pub fn stats(&self) -> Arc<BlockStats> {
        self.stats.clone()
    }

    fn capacity(&self) -> u64 {
        self.backend.size() / SECTOR_SIZE
    }

    /// The byte range of `bytes` bytes at `sector`, if inside the disk.
    fn range(&self, sector: u64, bytes: u64) -> Result<u64, RequestError> {
        let capacity = self.capacity() * SECTOR_SIZE;
        let out = || RequestError::OutOfRange {
            sector,
            bytes,
            capacity,
        };
        let offset = sector.checked_mul(SECTOR_SIZE).ok_or_else(out)?;
        let end = offset.checked_add(bytes).ok_or_else(out)?;
        if end > capacity {
            return Err(out());
        }
        Ok(offset)
    }

    /// Serve one chain: `Ok(used length)` once its status is written.
    fn request(&mut self, mem: &GuestMemoryMmap, q: usize, c: &Chain) -> Result<u32, DeviceError> {
        let mem_err = |source| DeviceError::Memory { queue: q, source };
        let writable = c.writable_len();
        if writable == 0 {
            return Err(DeviceError::Request {
                queue: q,
                what: format!("request at descriptor {} has no status byte", c.head),
            });
        }
        let mut header = [0u8; HEADER as usize];
        let n = c.read_at(mem, 0, &mut header).map_err(mem_err)?;
        if n < header.len() {
            return Err(DeviceError::Request {
                queue: q,
                what: format!(
                    "request at descriptor {} has a {n}-byte header (16 needed)",
                    c.head
                ),
            });
        }
        let kind = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
        let mut s = [0u8; 8];
        s.copy_from_slice(&header[8..16]);
        let sector = u64::from_le_bytes(s);
        let data_in = writable - 1;
        let data_out = c.readable_len() - HEADER;

        self.stats.request(kind);
        let mut written = 0u64;
        let result = match kind {
            req::IN => self.read(mem, q, c, sector, data_in, &mut written),
            req::OUT => self.write(mem, q, c, sector, data_out),
            req::FLUSH => self.flush(),
            req::GET_ID => self.get_id(mem, q, c, data_in, &mut written),
            req::DISCARD | req::WRITE_ZEROES => self.segments(mem, q, c, kind, data_out),
            other => Err(Ok(RequestError::Unsupported(format!(
                "request type {other}"
            )))),
        };
        let st = match result {
            Ok(()) => status::OK,
            Err(Err(e)) => return Err(e),
            Err(Ok(e)) => {
                let st = e.status();
                let n = self.stats.failed(&e);
                // Every error is counted; the log shows the first ones and then every
                // power of two, so a guest cannot flood it.
                if n.is_power_of_two() {
                    tracing::warn!(
                        queue = q,
                        head = c.head,
                        kind,
                        errors = n,
                        "block request failed: {}",
                        crate::error_chain(&e)
                    );
                }
                st
            }
        };
        c.write_at(mem, data_in, &[st]).map_err(mem_err)?;
        Ok(u32::try_from(written + 1).unwrap_or(u32::MAX))
    }

    fn read(
        &mut self,
        mem: &GuestMemoryMmap,
        q: usize,
        c: &Chain,
        sector: u64,
        len: u64,
        written: &mut u64,
    ) -> Outcome {
        if len % SECTOR_SIZE != 0 {
            return Err(Ok(RequestError::Unaligned { bytes: len }));
        }
        let offset = self.range(sector, len).map_err(Ok)?;
        let mut done = 0u64;
        while done < len {
            let piece = len - done;
            let buf = scratch(&mut self.buf, piece);
            let n = buf.len() as u64;
            let at = offset + done;
            self.backend.read_at(at, buf).map_err(|source| {
                Ok(RequestError::Backend {
                    op: "read",
                    offset: at,
                    len: n,
                    source,
                })
            })?;
            let buf = &self.buf[..n as usize];
            c.write_at(mem, done, buf)
                .map_err(|source| Err(DeviceError::Memory { queue: q, source }))?;
            done += n;
            *written = done;
            self.stats.bytes_read(n);
        }
        Ok(())
    }

    fn write(
        &mut self,
        mem: &GuestMemoryMmap,
        q: usize,
        c: &Chain,
        sector: u64,
        len: u64,
    ) -> Outcome {
        if self.backend.read_only() {
            return Err(Ok(RequestError::ReadOnly));
        }
        if len % SECTOR_SIZE != 0 {
            return Err(Ok(RequestError::Unaligned { bytes: len }));
        }
        let offset = self.range(sector, len).map_err(Ok)?;
        let mut done = 0u64;
        while done < len {
            let buf = scratch(&mut self.buf, len - done);
            let n = buf.len() as u64;
            c.read_at(mem, HEADER + done, buf)
                .map_err(|source| Err(DeviceError::Memory { queue: q, source }))?;
            let at = offset + done;
            self.backend
                .write_at(at, &self.buf[..n as usize])
                .map_err(|source| {
                    Ok(RequestError::Backend {
                        op: "write",
                        offset: at,
                        len: n,
                        source,
                    })
                })?;
            done += n;
            self.stats.bytes_written(n);
        }
        Ok(())
    }

    fn flush(&mut self) -> Outcome {
        if self.acked & F_FLUSH == 0 {
            return Err(Ok(RequestError::Unsupported("FLUSH not negotiated".into())));
        }
        self.backend.flush().map_err(|source| {
            Ok(RequestError::Backend {
                op: "flush",
                offset: 0,
                len: 0,
                source,
            })
        })
    }

    fn get_id(
        &mut self,
        mem: &GuestMemoryMmap,
        q: usize,
        c: &Chain,
        room: u64,
        written: &mut u64,
    ) -> Outcome {
        let mut id = [0u8; VIRTIO_BLK_ID_BYTES];
        let serial = self.backend.id();
        let n = serial.len().min(VIRTIO_BLK_ID_BYTES);
        id[..n].copy_from_slice(&serial[..n]);
        let fit = usize::try_from(room)
            .unwrap_or(VIRTIO_BLK_ID_BYTES)
            .min(VIRTIO_BLK_ID_BYTES);
        let n = c
            .write_at(mem, 0, &id[..fit])
            .map_err(|source| Err(DeviceError::Memory { queue: q, source }))?;
        *written = n as u64;
        Ok(())
    }

    /// DISCARD and WRITE_ZEROES: read and check every segment, then do them in order.
    fn segments(
        &mut self,
        mem: &GuestMemoryMmap,
        q: usize,
        c: &Chain,
        kind: u32,
        len: u64,
    ) -> Outcome {
        let zeroes = kind == req::WRITE_ZEROES;
        let (feature, name) = if zeroes {
            (F_WRITE_ZEROES, "WRITE_ZEROES")
        } else {
            (F_DISCARD, "DISCARD")
        };
        if self.acked & feature == 0 {
            return Err(Ok(RequestError::Unsupported(format!(
                "{name} not negotiated"
            ))));
        }
        if self.backend.read_only() {
            return Err(Ok(RequestError::ReadOnly));
        }
        if len % SEGMENT != 0 || len == 0 {
            return Err(Ok(RequestError::Segments(format!(
                "{len} bytes are not whole 16-byte segments"
            ))));
        }
        let count = len / SEGMENT;
        if count > u64::from(MAX_SEGMENTS) {
            return Err(Ok(RequestError::Segments(format!(
                "{count} segments (at most {MAX_SEGMENTS})"
            ))));
        }
        let mut raw = [0u8; (MAX_SEGMENTS as usize) * SEGMENT as usize];
        let raw = &mut raw[..len as usize];
        c.read_at(mem, HEADER, raw)
            .map_err(|source| Err(DeviceError::Memory { queue: q, source }))?;
        let mut ranges = Vec::with_capacity(count as usize);
        for seg in raw.chunks_exact(SEGMENT as usize) {
            let mut s = [0u8; 8];
            s.copy_from_slice(&seg[0..8]);
            let sector = u64::from_le_bytes(s);
            let sectors = u32::from_le_bytes([seg[8], seg[9], seg[10], seg[11]]);
            let flags = u32::from_le_bytes([seg[12], seg[13], seg[14], seg[15]]);
            let known = if zeroes { WRITE_ZEROES_UNMAP } else { 0 };
            if flags & !known != 0 {
                return Err(Ok(RequestError::Unsupported(format!(
                    "{name} flags {flags:#x}"
                ))));
            }
            if sectors > MAX_DISCARD_SECTORS {
                return Err(Ok(RequestError::Segments(format!(
                    "{sectors} sectors in one segment (at most {MAX_DISCARD_SECTORS})"
                ))));
            }
            let bytes = u64::from(sectors) * SECTOR_SIZE;
            let offset = self.range(sector, bytes).map_err(Ok)?;
            ranges.push((offset, bytes));
        }
        for (offset, bytes) in ranges {
            let r = if zeroes {
                self.backend.write_zeroes(offset, bytes)
            } else {
                self.backend.discard(offset, bytes)
            };
            r.map_err(|source| {
                Ok(RequestError::Backend {
                    op: if zeroes { "write-zeroes" } else { "discard" },
                    offset,
                    len: bytes,
                    source,
                })
            })?;
        }
        Ok(())
    }
}

/// The first `len` bytes (at most [`CHUNK`]) of the reused buffer.
fn scratch(buf: &mut Vec<u8>, len: u64) -> &mut [u8] {
    let n = usize::try_from(len).unwrap_or(CHUNK).min(CHUNK);
    if buf.len() < n {
        buf.resize(n, 0);
    }
    &mut buf[..n]
}

/// A request's outcome: done, failed with a status (`Err(Ok)`), or the device is broken
/// (`Err(Err)`).
type Outcome = Result<(), Result<RequestError, DeviceError>>;

impl VirtioDevice for Block {
    fn device_type(&self) -> DeviceType {
        DeviceType::Block
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        let ro = if self.backend.read_only() { F_RO } else { 0 };
        F_SEG_MAX | F_BLK_SIZE | F_FLUSH | F_DISCARD | F_WRITE_ZEROES | ro
    }

    fn config(&self) -> Vec<u8> {
        let mut c = vec![0u8; CONFIG_LEN];
        let mut put = |at: usize, v: &[u8]| c[at..at + v.len()].copy_from_slice(v);
        put(0, &self.capacity().to_le_bytes());
        put(12, &u32::from(QUEUE_SIZE - 2).to_le_bytes());
        put(20, &(SECTOR_SIZE as u32).to_le_bytes());
        put(34, &1u16.to_le_bytes());
        put(36, &MAX_DISCARD_SECTORS.to_le_bytes());
        put(40, &MAX_SEGMENTS.to_le_bytes());
        put(44, &DISCARD_ALIGNMENT.to_le_bytes());
        put(48, &MAX_DISCARD_SECTORS.to_le_bytes());
        put(52, &MAX_SEGMENTS.to_le_bytes());
        c
    }

    fn activate(&mut self, features: u64) -> Result<(), DeviceError> {
        self.acked = features;
        Ok(())
    }

    fn reset(&mut self) {
        self.acked = 0;
        self.buf = Vec::new();
    }

    /// The disk's capacity (u64, sectors) and whether it is read-only (u8): the device keeps
    /// nothing else between requests. A restore onto another disk is refused.
    fn save_state(&self) -> Vec<u8> {
        let mut v = self.capacity().to_le_bytes().to_vec();
        v.push(u8::from(self.backend.read_only()));
        v
    }

    fn restore_state(&mut self, bytes: &[u8]) -> Result<(), DeviceError> {
        let live = self.save_state();
        if bytes != live.as_slice() {
            let describe = |b: &[u8]| match b {
                [c @ .., ro] if c.len() == 8 => format!(
                    "{} sectors, {}",
                    u64::from_le_bytes(c.try_into().expect("8 bytes")),
                    if *ro == 1 { "read-only" } else { "read-write" }
                ),
                _ => format!("{} bytes of state", b.len()),
            };
            return Err(DeviceError::State {
                what: format!(
                    "the saved disk had {}, this disk has {}",
                    describe(bytes),
                    describe(&live)
                ),
            });
        }
        Ok(())
    }

    fn process_queue(&mut self, queues: &mut Queues<'_>, index: usize) -> Result<(), DeviceError> {
        while let Some(c) = queues.pop(index)? {
            let len = self.request(queues.mem(), index, &c)?;
            queues.complete(index, &c, len)?;
        }
        Ok(())
    }
}
