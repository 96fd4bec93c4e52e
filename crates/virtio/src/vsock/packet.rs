//! The virtio-vsock packet header (virtio 1.2, section 5.10.6) and moving packets between
//! descriptor chains and the device.
//!
//! A packet is a 44-byte little-endian header followed by `len` payload bytes (only `OP_RW`
//! carries a payload):
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 8 | `src_cid` |
//! | 8 | 8 | `dst_cid` |
//! | 16 | 4 | `src_port` |
//! | 20 | 4 | `dst_port` |
//! | 24 | 4 | `len` (payload bytes) |
//! | 28 | 2 | `type` (1: stream) |
//! | 30 | 2 | `op` |
//! | 32 | 4 | `flags` (`OP_SHUTDOWN`: 1 receive, 2 send) |
//! | 36 | 4 | `buf_alloc` (the sender's receive buffer) |
//! | 40 | 4 | `fwd_cnt` (bytes the sender has consumed) |

use vm_memory::GuestMemoryMmap;

use crate::DeviceError;
use crate::chain::Chain;

/// Size of the header.
pub const HDR_LEN: usize = 44;
/// The host's CID.
pub const HOST_CID: u64 = 2;
/// `type`: a stream socket (the only type offered).
pub const TYPE_STREAM: u16 = 1;
/// The most payload bytes one packet may carry, either way.
pub const MAX_PAYLOAD: u32 = 64 * 1024;
/// `OP_SHUTDOWN` flag: the sender will receive no more.
pub const SHUTDOWN_RCV: u32 = 1;
/// `OP_SHUTDOWN` flag: the sender will send no more.
pub const SHUTDOWN_SEND: u32 = 2;

/// A packet's operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u16)]
pub enum Op {
    /// 1: connect.
    Request = 1,
    /// 2: connection accepted.
    Response = 2,
    /// 3: connection refused or torn down.
    Rst = 3,
    /// 4: one side will send or receive no more (`flags`).
    Shutdown = 4,
    /// 5: data.
    Rw = 5,
    /// 6: the sender's `buf_alloc`/`fwd_cnt` changed.
    CreditUpdate = 6,
    /// 7: the sender asks for a credit update.
    CreditRequest = 7,
}

impl Op {
    /// The operation with code `v`, if known.
    pub fn from_u16(v: u16) -> Option<Op> {
        Some(match v {
            1 => Op::Request,
            2 => Op::Response,
            3 => Op::Rst,
            4 => Op::Shutdown,
            5 => Op::Rw,
            6 => Op::CreditUpdate,
            7 => Op::CreditRequest,
            _ => return None,
        })
    }
}

/// A packet header, decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Header {
    /// Source CID.
    pub src_cid: u64,
    /// Destination CID.
    pub dst_cid: u64,
    /// Source port.
    pub src_port: u32,
    /// Destination port.
    pub dst_port: u32,
    /// Payload length.
    pub len: u32,
    /// Socket type.
    pub type_: u16,
    /// Operation code (see [`Op`]).
    pub op: u16,
    /// Flags.
    pub flags: u32,
    /// The sender's receive buffer size.
    pub buf_alloc: u32,
    /// Bytes the sender has consumed.
    pub fwd_cnt: u32,
}

fn u32_at(b: &[u8; HDR_LEN], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn u64_at(b: &[u8; HDR_LEN], at: usize) -> u64 {
    u64::from(u32_at(b, at)) | (u64::from(u32_at(b, at + 4)) << 32)
}

impl Header {
    /// Decode a header.
    pub fn parse(b: &[u8; HDR_LEN]) -> Header {
        Header {
            src_cid: u64_at(b, 0),
            dst_cid: u64_at(b, 8),
            src_port: u32_at(b, 16),
            dst_port: u32_at(b, 20),
            len: u32_at(b, 24),
            type_: u16::from_le_bytes([b[28], b[29]]),
            op: u16::from_le_bytes([b[30], b[31]]),
            flags: u32_at(b, 32),
            buf_alloc: u32_at(b, 36),
            fwd_cnt: u32_at(b, 40),
        }
    }

    /// Encode it.
    pub fn encode(&self) -> [u8; HDR_LEN] {
        let mut b = [0u8; HDR_LEN];
        b[0..8].copy_from_slice(&self.src_cid.to_le_bytes());
        b[8..16].copy_from_slice(&self.dst_cid.to_le_bytes());
        b[16..20].copy_from_slice(&self.src_port.to_le_bytes());
        b[20..24].copy_from_slice(&self.dst_port.to_le_bytes());
        b[24..28].copy_from_slice(&self.len.to_le_bytes());
        b[28..30].copy_from_slice(&self.type_.to_le_bytes());
        b[30..32].copy_from_slice(&self.op.to_le_bytes());
        b[32..36].copy_from_slice(&self.flags.to_le_bytes());
        b[36..40].copy_from_slice(&self.buf_alloc.to_le_bytes());
        b[40..44].copy_from_slice(&self.fwd_cnt.to_le_bytes());
        b
    }

    /// Its operation, if known.
    pub fn op(&self) -> Option<Op> {
        Op::from_u16(self.op)
    }
}

/// Read a packet the driver put on the tx queue: its header and, for `OP_RW`, its payload.
/// A chain too short for the header, or a `len` past the chain or past [`MAX_PAYLOAD`], is
/// malformed ([`DeviceError::Request`]): the protocol has no way to answer it.
pub fn read_tx(
    mem: &GuestMemoryMmap,
    chain: &Chain,
    queue: usize,
) -> Result<(Header, Vec<u8>), DeviceError> {
    let avail = chain.readable_len();
    if avail < HDR_LEN as u64 {
        return Err(DeviceError::Request {
            queue,
            what: format!("a tx packet of {avail} bytes is shorter than the {HDR_LEN}-byte header"),
        });
    }
    let mut raw = [0u8; HDR_LEN];
    chain
        .read_at(mem, 0, &mut raw)
        .map_err(|source| DeviceError::Memory { queue, source })?;
    let h = Header::parse(&raw);
    if h.len > MAX_PAYLOAD {
        return Err(DeviceError::Request {
            queue,
            what: format!(
                "a tx packet claims {} payload bytes, more than the {MAX_PAYLOAD} allowed",
                h.len
            ),
        });
    }
    if u64::from(h.len) > avail - HDR_LEN as u64 {
        return Err(DeviceError::Request {
            queue,
            what: format!(
                "a tx packet claims {} payload bytes but its buffers hold {}",
                h.len,
                avail - HDR_LEN as u64
            ),
        });
    }
    let mut payload = Vec::new();
    if h.op() == Some(Op::Rw) && h.len > 0 {
        payload = vec![0u8; h.len as usize];
        chain
            .read_at(mem, HDR_LEN as u64, &mut payload)
            .map_err(|source| DeviceError::Memory { queue, source })?;
    }
    Ok((h, payload))
}

/// The room an rx chain has for a payload after the header; a chain too small for the
/// header is malformed.
pub fn rx_room(chain: &Chain, queue: usize) -> Result<u32, DeviceError> {
    let room = chain.writable_len();
    if room < HDR_LEN as u64 {
        return Err(DeviceError::Request {
            queue,
            what: format!("an rx buffer of {room} bytes cannot hold the {HDR_LEN}-byte header"),
        });
    }
    Ok((room - HDR_LEN as u64).min(u64::from(MAX_PAYLOAD)) as u32)
}

/// Write a packet (header with `len` set to the payload's length, then the payload) into an
/// rx chain; returns the bytes written. The caller checked the room with [`rx_room`].
pub fn write_rx(
    mem: &GuestMemoryMmap,
    chain: &Chain,
    queue: usize,
    h: &Header,
    payload: &[u8],
) -> Result<u32, DeviceError> {
    let mut h = *h;
    h.len = payload.len() as u32;
    let n = chain
        .write_at(mem, 0, &h.encode())
        .map_err(|source| DeviceError::Memory { queue, source })?;
    let m = chain
        .write_at(mem, HDR_LEN as u64, payload)
        .map_err(|source| DeviceError::Memory { queue, source })?;
    Ok((n + m) as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_header_round_trips_in_the_documented_layout() {
        let h = Header {
            src_cid: 3,
            dst_cid: 2,
            src_port: 0x1234,
            dst_port: 5000,
            len: 7,
            type_: TYPE_STREAM,
            op: Op::Rw as u16,
            flags: 3,
            buf_alloc: 0x4_0000,
            fwd_cnt: 9,
        };
        let b = h.encode();
        assert_eq!(&b[0..8], &3u64.to_le_bytes());
        assert_eq!(&b[20..24], &5000u32.to_le_bytes());
        assert_eq!(&b[30..32], &5u16.to_le_bytes());
        assert_eq!(&b[40..44], &9u32.to_le_bytes());
        assert_eq!(Header::parse(&b), h);
        assert_eq!(h.op(), Some(Op::Rw));
        assert_eq!(Op::from_u16(8), None);
    }
}
