//! Descriptor chains, walked strictly.
//!
//! `virtio-queue` handles the rings (available index, used ring, EVENT_IDX); its own chain
//! iterator stops quietly at a loop or an index past the table, which would let a driver's
//! mistake pass for a short request. A device must instead say the driver is broken
//! (`DEVICE_NEEDS_RESET`), so chains are walked here and every fault is named: a loop, a
//! next index outside the table, a buffer outside guest memory, a chain longer than the
//! queue or than [`MAX_CHAIN_BYTES`], an indirect descriptor (not offered).

use thiserror::Error;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemory, GuestMemoryMmap};

/// The most bytes one chain may describe (the spec's bound is 2^32; a device needs far less).
pub const MAX_CHAIN_BYTES: u64 = 1 << 30;

const VIRTQ_DESC_F_NEXT: u16 = 1;
const VIRTQ_DESC_F_WRITE: u16 = 2;
const VIRTQ_DESC_F_INDIRECT: u16 = 4;

/// One buffer of a chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Desc {
    /// Guest-physical address.
    pub addr: GuestAddress,
    /// Length in bytes.
    pub len: u32,
    /// The device writes it (else reads it).
    pub write: bool,
}

/// A chain the driver made available: its head (to give back in the used ring) and buffers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chain {
    /// Head descriptor index.
    pub head: u16,
    /// Buffers in order.
    pub descs: Vec<Desc>,
}

/// What is wrong with a chain (the driver's fault: the device needs a reset).
#[derive(Debug, Error, PartialEq, Eq)]
pub enum ChainError {
    /// The descriptor index is past the queue's size.
    #[error("descriptor index {index} is outside a queue of {size}")]
    IndexOutOfRange {
        /// Index.
        index: u16,
        /// Queue size.
        size: u16,
    },
    /// The chain visits more descriptors than the queue has: a loop.
    #[error("the chain starting at descriptor {head} loops (more than {size} descriptors)")]
    Loop {
        /// Head.
        head: u16,
        /// Queue size.
        size: u16,
    },
    /// The descriptor table itself cannot be read.
    #[error("descriptor {index} cannot be read at {addr:#x}")]
    TableUnreadable {
        /// Index.
        index: u16,
        /// Its address.
        addr: u64,
    },
    /// A buffer is not inside guest memory.
    #[error("descriptor {index}: buffer {addr:#x}+{len:#x} is outside guest memory")]
    OutsideMemory {
        /// Index.
        index: u16,
        /// Address.
        addr: u64,
        /// Length.
        len: u32,
    },
    /// The chain's buffers add up to too much.
    #[error("the chain starting at descriptor {head} describes more than {MAX_CHAIN_BYTES} bytes")]
    TooLong {
        /// Head.
        head: u16,
    },
    /// An indirect descriptor, which the device did not offer.
    #[error("descriptor {index} is indirect, which was not negotiated")]
    Indirect {
        /// Index.
        index: u16,
    },
    /// A readable buffer after a writable one (2.7.4.2: the device-readable part comes first).
    #[error("descriptor {index} is device-readable after a device-writable one")]
    ReadAfterWrite {
        /// Index.
        index: u16,
    },
}

/// Walk the chain at `head` of the descriptor table at `table` (`size` entries).
pub fn walk(
    mem: &GuestMemoryMmap,
    table: GuestAddress,
    size: u16,
    head: u16,
) -> Result<Chain, ChainError> {
    let mut descs = Vec::new();
    let mut index = head;
    let mut total: u64 = 0;
    let mut seen_write = false;
    loop {
        if index >= size {
            return Err(ChainError::IndexOutOfRange { index, size });
        }
        if descs.len() >= usize::from(size) {
            return Err(ChainError::Loop { head, size });
        }
        let at = table.unchecked_add(16 * u64::from(index));
        let mut raw = [0u8; 16];
        mem.read_slice(&mut raw, at)
            .map_err(|_| ChainError::TableUnreadable {
                index,
                addr: at.raw_value(),
            })?;
        let addr = u64::from_le_bytes(raw[0..8].try_into().unwrap_or_default());
        let len = u32::from_le_bytes(raw[8..12].try_into().unwrap_or_default());
        let flags = u16::from_le_bytes([raw[12], raw[13]]);
        let next = u16::from_le_bytes([raw[14], raw[15]]);
        if flags & VIRTQ_DESC_F_INDIRECT != 0 {
            return Err(ChainError::Indirect { index });
        }
        let write = flags & VIRTQ_DESC_F_WRITE != 0;
        if !write && seen_write {
            return Err(ChainError::ReadAfterWrite { index });
        }
        seen_write |= write;
        if len > 0
            && !mem.check_range(
                GuestAddress(addr),
                len as usize,
                vm_memory::Permissions::ReadWrite,
            )
        {
            return Err(ChainError::OutsideMemory { index, addr, len });
        }
        total += u64::from(len);
        if total > MAX_CHAIN_BYTES {
            return Err(ChainError::TooLong { head });
        }
        descs.push(Desc {
            addr: GuestAddress(addr),
            len,
            write,
        });
        if flags & VIRTQ_DESC_F_NEXT == 0 {
            return Ok(Chain { head, descs });
        }
        index = next;
    }
}

impl Chain {
    /// The device-readable buffers.
    pub fn readable(&self) -> impl Iterator<Item = &Desc> {
        self.descs.iter().filter(|d| !d.write)
    }

    /// The device-writable buffers.
    pub fn writable(&self) -> impl Iterator<Item = &Desc> {
        self.descs.iter().filter(|d| d.write)
    }

    /// Bytes the device may read.
    pub fn readable_len(&self) -> u64 {
        self.readable().map(|d| u64::from(d.len)).sum()
    }

    /// Bytes the device may write.
    pub fn writable_len(&self) -> u64 {
        self.writable().map(|d| u64::from(d.len)).sum()
    }

    /// Copy the readable bytes from `offset` into `out` (volatile reads of guest memory);
    /// returns how many were copied (fewer when the chain is shorter).
    pub fn read_at(
        &self,
        mem: &GuestMemoryMmap,
        mut offset: u64,
        out: &mut [u8],
    ) -> Result<usize, vm_memory::GuestMemoryError> {
        let mut done = 0;
        for d in self.readable() {
            if done == out.len() {
                break;
            }
            let len = u64::from(d.len);
            if offset >= len {
                offset -= len;
                continue;
            }
            let n = ((len - offset) as usize).min(out.len() - done);
            mem.read_slice(&mut out[done..done + n], d.addr.unchecked_add(offset))?;
            done += n;
            offset = 0;
        }
        Ok(done)
    }

    /// Copy `data` into the writable buffers from `offset`; returns how many bytes fit.
    pub fn write_at(
        &self,
        mem: &GuestMemoryMmap,
        mut offset: u64,
        data: &[u8],
    ) -> Result<usize, vm_memory::GuestMemoryError> {
        let mut done = 0;
        for d in self.writable() {
            if done == data.len() {
                break;
            }
            let len = u64::from(d.len);
            if offset >= len {
                offset -= len;
                continue;
            }
            let n = ((len - offset) as usize).min(data.len() - done);
            mem.write_slice(&data[done..done + n], d.addr.unchecked_add(offset))?;
            done += n;
            offset = 0;
        }
        Ok(done)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap()
    }

    pub(crate) fn put(
        mem: &GuestMemoryMmap,
        table: u64,
        i: u16,
        addr: u64,
        len: u32,
        flags: u16,
        next: u16,
    ) {
        let at = GuestAddress(table + 16 * u64::from(i));
        mem.write_obj(addr, at).unwrap();
        mem.write_obj(len, at.unchecked_add(8)).unwrap();
        mem.write_obj(flags, at.unchecked_add(12)).unwrap();
        mem.write_obj(next, at.unchecked_add(14)).unwrap();
    }

    #[test]
    fn a_good_chain_and_its_bytes() {
        let m = mem();
        put(&m, 0x1000, 0, 0x8000, 4, VIRTQ_DESC_F_NEXT, 3);
        put(&m, 0x1000, 3, 0x9000, 8, VIRTQ_DESC_F_WRITE, 0);
        m.write_slice(b"abcd", GuestAddress(0x8000)).unwrap();
        let c = walk(&m, GuestAddress(0x1000), 8, 0).unwrap();
        assert_eq!(c.descs.len(), 2);
        assert_eq!((c.readable_len(), c.writable_len()), (4, 8));
        let mut b = [0u8; 3];
        assert_eq!(c.read_at(&m, 1, &mut b).unwrap(), 3);
        assert_eq!(&b, b"bcd");
        assert_eq!(c.write_at(&m, 4, b"0123456789").unwrap(), 4);
        let mut w = [0u8; 8];
        m.read_slice(&mut w, GuestAddress(0x9000)).unwrap();
        assert_eq!(&w[4..], b"0123");
    }

    #[test]
    fn malformed_chains_are_named() {
        let m = mem();
        // a loop 0 -> 1 -> 0
        put(&m, 0x1000, 0, 0x8000, 4, VIRTQ_DESC_F_NEXT, 1);
        put(&m, 0x1000, 1, 0x8000, 4, VIRTQ_DESC_F_NEXT, 0);
        assert_eq!(
            walk(&m, GuestAddress(0x1000), 8, 0),
            Err(ChainError::Loop { head: 0, size: 8 })
        );
        // next past the table
        put(&m, 0x1000, 1, 0x8000, 4, VIRTQ_DESC_F_NEXT, 9);
        assert!(matches!(
            walk(&m, GuestAddress(0x1000), 8, 0),
            Err(ChainError::IndexOutOfRange { index: 9, .. })
        ));
        // a head past the table
        assert!(matches!(
            walk(&m, GuestAddress(0x1000), 8, 8),
            Err(ChainError::IndexOutOfRange { index: 8, .. })
        ));
        // a buffer past the end of memory
        put(&m, 0x1000, 2, (1 << 20) - 2, 4, 0, 0);
        assert!(matches!(
            walk(&m, GuestAddress(0x1000), 8, 2),
            Err(ChainError::OutsideMemory { .. })
        ));
        // an address that wraps
        put(&m, 0x1000, 2, u64::MAX - 1, 4, 0, 0);
        assert!(matches!(
            walk(&m, GuestAddress(0x1000), 8, 2),
            Err(ChainError::OutsideMemory { .. })
        ));
        // too many bytes
        put(&m, 0x1000, 3, 0, u32::MAX, VIRTQ_DESC_F_NEXT, 4);
        put(&m, 0x1000, 4, 0, u32::MAX, 0, 0);
        let big = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        put(&big, 0x1000, 0, 0, 1 << 19, VIRTQ_DESC_F_NEXT, 0);
        assert!(walk(&m, GuestAddress(0x1000), 8, 3).is_err());
        // indirect, and readable after writable
        put(&m, 0x1000, 5, 0x8000, 16, VIRTQ_DESC_F_INDIRECT, 0);
        assert_eq!(
            walk(&m, GuestAddress(0x1000), 8, 5),
            Err(ChainError::Indirect { index: 5 })
        );
        put(
            &m,
            0x1000,
            6,
            0x8000,
            4,
            VIRTQ_DESC_F_WRITE | VIRTQ_DESC_F_NEXT,
            7,
        );
        put(&m, 0x1000, 7, 0x8000, 4, 0, 0);
        assert_eq!(
            walk(&m, GuestAddress(0x1000), 8, 6),
            Err(ChainError::ReadAfterWrite { index: 7 })
        );
        // a table outside memory
        assert!(matches!(
            walk(&m, GuestAddress(1 << 20), 8, 0),
            Err(ChainError::TableUnreadable { .. })
        ));
    }
}
