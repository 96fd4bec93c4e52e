//! A device's saved state (snapshots, live migration): [`TransportState`], what
//! [`MmioTransport::save`](crate::MmioTransport::save) captures, and its byte encoding.
//!
//! # Record format (version 1)
//!
//! All integers little-endian; booleans one byte, 0 or 1.
//!
//! | field | size | meaning |
//! |---|---|---|
//! | magic | 4 | `b"FLVS"` |
//! | version | u32 | 1 ([`VERSION`]) |
//! | device type | u32 | the DeviceID register's value |
//! | status, device features sel, driver features sel | 3 × u32 | registers |
//! | driver features | u64 | |
//! | queue sel, interrupt status, config generation | 3 × u32 | registers |
//! | activated | bool | the device's `activate` ran |
//! | broken | bool + u32 n + n bytes | why the device needs a reset (UTF-8, n ≤ [`MAX_BROKEN`]) |
//! | MSI enabled | bool | |
//! | MSI address low, high, data | 3 × u32 | the staging registers |
//! | vectors | u32 v ≤ [`MAX_QUEUES`] + 1, then v × (flags u8, address u64, data u32) | flags bit 0: programmed, bit 1: masked |
//! | queues | u32 q ≤ [`MAX_QUEUES`], then q × (max size u16, size u16, ready bool, event idx bool, desc u64, avail u64, used u64, next avail u16, next used u16) | |
//! | device bytes | u32 n ≤ [`MAX_DEVICE_BYTES`] + n bytes | the device's own state |
//! | crc | u32 | CRC-32 (IEEE) of every byte before it |
//!
//! [`decode`] bounds every count before it allocates, checks the magic, the version and the
//! CRC, and refuses trailing bytes.

use thiserror::Error;
use virtio_queue::QueueState;

use crate::interrupt::MsiMessage;

/// Record magic.
pub const RECORD_MAGIC: [u8; 4] = *b"FLVS";
/// The record version this code writes and reads.
pub const VERSION: u32 = 1;
/// Most queues a record may carry.
pub const MAX_QUEUES: usize = 1024;
/// Most device bytes a record may carry (1 MiB).
pub const MAX_DEVICE_BYTES: usize = 1 << 20;
/// Longest broken reason a record may carry.
pub const MAX_BROKEN: usize = 4096;

/// The transport's MSI state.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MsiState {
    /// The driver turned MSI on.
    pub enabled: bool,
    /// Staging register: address, low.
    pub address_low: u32,
    /// Staging register: address, high.
    pub address_high: u32,
    /// Staging register: data.
    pub data: u32,
    /// Per vector (0 configuration, 1 + q queue q): the programmed message.
    pub vectors: Vec<Option<MsiMessage>>,
    /// Per vector: masked.
    pub masked: Vec<bool>,
}

/// Everything an [`MmioTransport`](crate::MmioTransport) holds, apart from the device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TransportState {
    /// The DeviceID register's value.
    pub device_type: u32,
    /// Device status.
    pub status: u32,
    /// DeviceFeaturesSel.
    pub device_features_sel: u32,
    /// DriverFeaturesSel.
    pub driver_features_sel: u32,
    /// Features the driver wrote.
    pub driver_features: u64,
    /// QueueSel.
    pub queue_sel: u32,
    /// InterruptStatus.
    pub interrupt_status: u32,
    /// ConfigGeneration.
    pub config_generation: u32,
    /// MSI.
    pub msi: MsiState,
    /// The device was activated.
    pub activated: bool,
    /// Why the device needs a reset, if it does.
    pub broken: Option<String>,
    /// Each queue.
    pub queues: Vec<QueueState>,
}

/// A record could not be decoded.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum DecodeError {
    /// The record ends before a field.
    #[error("record truncated: {field} needs {need} bytes at offset {at}, {len} in all")]
    Truncated {
        /// The field.
        field: &'static str,
        /// Bytes it needs.
        need: usize,
        /// Where it starts.
        at: usize,
        /// Record length.
        len: usize,
    },
    /// Not a device record.
    #[error("bad magic {0:02x?}")]
    Magic([u8; 4]),
    /// A version this code does not read.
    #[error("unknown record version {0} (this build reads {VERSION})")]
    Version(u32),
    /// The CRC does not match.
    #[error("checksum mismatch: stored {stored:#010x}, computed {computed:#010x}")]
    Checksum {
        /// In the record.
        stored: u32,
        /// Over its bytes.
        computed: u32,
    },
    /// A count past its bound.
    #[error("{what}: {count} is more than {max}")]
    TooMany {
        /// Which count.
        what: &'static str,
        /// Its value.
        count: u64,
        /// The bound.
        max: usize,
    },
    /// A boolean byte other than 0 or 1, or a flags byte with unknown bits.
    #[error("{what}: invalid byte {value:#x}")]
    Invalid {
        /// Field.
        what: &'static str,
        /// Byte.
        value: u8,
    },
    /// The broken reason is not UTF-8.
    #[error("broken reason is not UTF-8")]
    Utf8(#[source] std::string::FromUtf8Error),
    /// Bytes after the CRC's range.
    #[error("{0} bytes after the record")]
    Trailing(usize),
}

struct W(Vec<u8>);

impl W {
    fn u8(&mut self, v: u8) {
        self.0.push(v);
    }
    fn u16(&mut self, v: u16) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn u32(&mut self, v: u32) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn bytes(&mut self, b: &[u8]) {
        self.u32(b.len() as u32);
        self.0.extend_from_slice(b);
    }
}

/// Encode `state` and the device's bytes as one record. The caller keeps the bounds
/// ([`MmioTransport::save`](crate::MmioTransport::save) refuses a state past them; device
/// bytes past [`MAX_DEVICE_BYTES`] make a record [`decode`] refuses).
pub fn encode(state: &TransportState, device: &[u8]) -> Vec<u8> {
    let mut w = W(Vec::with_capacity(
        128 + device.len() + 40 * state.queues.len(),
    ));
    w.0.extend_from_slice(&RECORD_MAGIC);
    w.u32(VERSION);
    w.u32(state.device_type);
    w.u32(state.status);
    w.u32(state.device_features_sel);
    w.u32(state.driver_features_sel);
    w.u64(state.driver_features);
    w.u32(state.queue_sel);
    w.u32(state.interrupt_status);
    w.u32(state.config_generation);
    w.u8(u8::from(state.activated));
    match &state.broken {
        Some(s) => {
            w.u8(1);
            w.bytes(s.as_bytes());
        }
        None => w.u8(0),
    }
    let m = &state.msi;
    w.u8(u8::from(m.enabled));
    w.u32(m.address_low);
    w.u32(m.address_high);
    w.u32(m.data);
    w.u32(m.vectors.len() as u32);
    for (i, v) in m.vectors.iter().enumerate() {
        let masked = m.masked.get(i).copied().unwrap_or(false);
        w.u8(u8::from(v.is_some()) | (u8::from(masked) << 1));
        let v = v.unwrap_or_default();
        w.u64(v.address);
        w.u32(v.data);
    }
    w.u32(state.queues.len() as u32);
    for q in &state.queues {
        w.u16(q.max_size);
        w.u16(q.size);
        w.u8(u8::from(q.ready));
        w.u8(u8::from(q.event_idx_enabled));
        w.u64(q.desc_table);
        w.u64(q.avail_ring);
        w.u64(q.used_ring);
        w.u16(q.next_avail);
        w.u16(q.next_used);
    }
    w.bytes(device);
    let crc = crc32fast::hash(&w.0);
    w.u32(crc);
    w.0
}

struct R<'a> {
    b: &'a [u8],
    at: usize,
}

impl<'a> R<'a> {
    fn take(&mut self, field: &'static str, n: usize) -> Result<&'a [u8], DecodeError> {
        let end = self.at.checked_add(n).filter(|e| *e <= self.b.len());
        let Some(end) = end else {
            return Err(DecodeError::Truncated {
                field,
                need: n,
                at: self.at,
                len: self.b.len(),
            });
        };
        let s = &self.b[self.at..end];
        self.at = end;
        Ok(s)
    }
    fn u8(&mut self, f: &'static str) -> Result<u8, DecodeError> {
        Ok(self.take(f, 1)?[0])
    }
    fn bool(&mut self, f: &'static str) -> Result<bool, DecodeError> {
        match self.u8(f)? {
            0 => Ok(false),
            1 => Ok(true),
            value => Err(DecodeError::Invalid { what: f, value }),
        }
    }
    fn u16(&mut self, f: &'static str) -> Result<u16, DecodeError> {
        let s = self.take(f, 2)?;
        Ok(u16::from_le_bytes([s[0], s[1]]))
    }
    fn u32(&mut self, f: &'static str) -> Result<u32, DecodeError> {
        let s = self.take(f, 4)?;
        Ok(u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
    }
    fn u64(&mut self, f: &'static str) -> Result<u64, DecodeError> {
        let s = self.take(f, 8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(s);
        Ok(u64::from_le_bytes(a))
    }
    fn count(&mut self, what: &'static str, max: usize) -> Result<usize, DecodeError> {
        let n = self.u32(what)?;
        if n as usize > max {
            return Err(DecodeError::TooMany {
                what,
                count: u64::from(n),
                max,
            });
        }
        Ok(n as usize)
    }
}

/// Decode a record made by [`encode`]: the transport state and the device's bytes.
pub fn decode(bytes: &[u8]) -> Result<(TransportState, Vec<u8>), DecodeError> {
    let mut r = R { b: bytes, at: 0 };
    let magic = r.take("magic", 4)?;
    if magic != RECORD_MAGIC {
        return Err(DecodeError::Magic([magic[0], magic[1], magic[2], magic[3]]));
    }
    let version = r.u32("version")?;
    if version != VERSION {
        return Err(DecodeError::Version(version));
    }
    if bytes.len() < 12 {
        return Err(DecodeError::Truncated {
            field: "crc",
            need: 4,
            at: bytes.len(),
            len: bytes.len(),
        });
    }
    let (body, tail) = bytes.split_at(bytes.len() - 4);
    let stored = u32::from_le_bytes([tail[0], tail[1], tail[2], tail[3]]);
    let computed = crc32fast::hash(body);
    if stored != computed {
        return Err(DecodeError::Checksum { stored, computed });
    }
    let mut r = R { b: body, at: 8 };
    let device_type = r.u32("device type")?;
    let status = r.u32("status")?;
    let device_features_sel = r.u32("device features sel")?;
    let driver_features_sel = r.u32("driver features sel")?;
    let driver_features = r.u64("driver features")?;
    let queue_sel = r.u32("queue sel")?;
    let interrupt_status = r.u32("interrupt status")?;
    let config_generation = r.u32("config generation")?;
    let activated = r.bool("activated")?;
    let broken = if r.bool("broken")? {
        let n = r.count("broken reason length", MAX_BROKEN)?;
        let s = r.take("broken reason", n)?.to_vec();
        Some(String::from_utf8(s).map_err(DecodeError::Utf8)?)
    } else {
        None
    };
    let enabled = r.bool("msi enabled")?;
    let address_low = r.u32("msi address low")?;
    let address_high = r.u32("msi address high")?;
    let data = r.u32("msi data")?;
    let nv = r.count("msi vectors", MAX_QUEUES + 1)?;
    let mut vectors = Vec::with_capacity(nv);
    let mut masked = Vec::with_capacity(nv);
    for _ in 0..nv {
        let flags = r.u8("msi vector flags")?;
        if flags & !3 != 0 {
            return Err(DecodeError::Invalid {
                what: "msi vector flags",
                value: flags,
            });
        }
        let address = r.u64("msi vector address")?;
        let data = r.u32("msi vector data")?;
        vectors.push((flags & 1 != 0).then_some(MsiMessage { address, data }));
        masked.push(flags & 2 != 0);
    }
    let nq = r.count("queues", MAX_QUEUES)?;
    let mut queues = Vec::with_capacity(nq);
    for _ in 0..nq {
        queues.push(QueueState {
            max_size: r.u16("queue max size")?,
            size: r.u16("queue size")?,
            ready: r.bool("queue ready")?,
            event_idx_enabled: r.bool("queue event idx")?,
            desc_table: r.u64("queue desc")?,
            avail_ring: r.u64("queue avail")?,
            used_ring: r.u64("queue used")?,
            next_avail: r.u16("queue next avail")?,
            next_used: r.u16("queue next used")?,
        });
    }
    let nd = r.count("device bytes", MAX_DEVICE_BYTES)?;
    let device = r.take("device bytes", nd)?.to_vec();
    if r.at != body.len() {
        return Err(DecodeError::Trailing(body.len() - r.at));
    }
    let state = TransportState {
        device_type,
        status,
        device_features_sel,
        driver_features_sel,
        driver_features,
        queue_sel,
        interrupt_status,
        config_generation,
        msi: MsiState {
            enabled,
            address_low,
            address_high,
            data,
            vectors,
            masked,
        },
        activated,
        broken,
        queues,
    };
    Ok((state, device))
}

#[cfg(test)]
mod tests;
