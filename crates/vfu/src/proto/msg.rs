//! The per-command payloads (`struct vfio_user_*`), their flags and indexes, the migration
//! states, and region capability chains.

use serde::{Deserialize, Serialize};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

use super::header::{Command, ProtoError, field};

/// `DEVICE_GET_INFO` flags: the device can be reset.
pub const DEVICE_FLAGS_RESET: u32 = 1 << 0;
/// `DEVICE_GET_INFO` flags: a PCI device.
pub const DEVICE_FLAGS_PCI: u32 = 1 << 1;

/// Region flag: readable.
pub const REGION_READ: u32 = 1 << 0;
/// Region flag: writable.
pub const REGION_WRITE: u32 = 1 << 1;
/// Region flag: mappable (an fd came with the reply).
pub const REGION_MMAP: u32 = 1 << 2;
/// Region flag: a capability chain follows the region info.
pub const REGION_CAPS: u32 = 1 << 3;
/// Region capability: sparse mmap areas.
pub const REGION_CAP_SPARSE_MMAP: u16 = 1;

/// PCI region index of BAR 0 (BARs 0..=5 are 0..=5).
pub const PCI_BAR0_REGION: u32 = 0;
/// PCI region index of the expansion ROM.
pub const PCI_ROM_REGION: u32 = 6;
/// PCI region index of config space.
pub const PCI_CONFIG_REGION: u32 = 7;
/// PCI region index of VGA.
pub const PCI_VGA_REGION: u32 = 8;
/// Regions of a PCI device.
pub const PCI_NUM_REGIONS: u32 = 9;

/// IRQ index: INTx.
pub const IRQ_INTX: u32 = 0;
/// IRQ index: MSI.
pub const IRQ_MSI: u32 = 1;
/// IRQ index: MSI-X.
pub const IRQ_MSIX: u32 = 2;
/// IRQ index: error.
pub const IRQ_ERR: u32 = 3;
/// IRQ index: request.
pub const IRQ_REQ: u32 = 4;
/// IRQ indexes of a PCI device.
pub const PCI_NUM_IRQS: u32 = 5;

/// IRQ info flag: signalled through an eventfd.
pub const IRQ_INFO_EVENTFD: u32 = 1 << 0;
/// IRQ info flag: maskable.
pub const IRQ_INFO_MASKABLE: u32 = 1 << 1;
/// IRQ info flag: masked automatically when triggered (INTx).
pub const IRQ_INFO_AUTOMASKED: u32 = 1 << 2;
/// IRQ info flag: the count cannot change.
pub const IRQ_INFO_NORESIZE: u32 = 1 << 3;

/// SET_IRQS data: none.
pub const IRQ_SET_DATA_NONE: u32 = 1 << 0;
/// SET_IRQS data: one byte per vector.
pub const IRQ_SET_DATA_BOOL: u32 = 1 << 1;
/// SET_IRQS data: eventfds (passed as fds).
pub const IRQ_SET_DATA_EVENTFD: u32 = 1 << 2;
/// SET_IRQS action: mask.
pub const IRQ_SET_ACTION_MASK: u32 = 1 << 3;
/// SET_IRQS action: unmask.
pub const IRQ_SET_ACTION_UNMASK: u32 = 1 << 4;
/// SET_IRQS action: trigger (or, with eventfds, set the trigger fds).
pub const IRQ_SET_ACTION_TRIGGER: u32 = 1 << 5;

/// DMA_MAP flag: readable by the device.
pub const DMA_READ: u32 = 1 << 0;
/// DMA_MAP flag: writable by the device.
pub const DMA_WRITE: u32 = 1 << 1;
/// DMA_UNMAP flag: return a dirty bitmap.
pub const DMA_UNMAP_GET_DIRTY_BITMAP: u32 = 1 << 0;
/// DMA_UNMAP flag: unmap everything.
pub const DMA_UNMAP_ALL: u32 = 1 << 1;

/// DEVICE_FEATURE flags: feature number mask.
pub const FEATURE_MASK: u32 = 0xffff;
/// DEVICE_FEATURE: get.
pub const FEATURE_GET: u32 = 1 << 16;
/// DEVICE_FEATURE: set.
pub const FEATURE_SET: u32 = 1 << 17;
/// DEVICE_FEATURE: probe.
pub const FEATURE_PROBE: u32 = 1 << 18;
/// Feature: migration (GET: `u64` flags).
pub const FEATURE_MIGRATION: u32 = 1;
/// Feature: migration device state (GET/SET: `u32 state, u32 data_fd`).
pub const FEATURE_MIG_DEVICE_STATE: u32 = 2;
/// Feature: DMA logging start.
pub const FEATURE_DMA_LOGGING_START: u32 = 6;
/// Feature: DMA logging stop.
pub const FEATURE_DMA_LOGGING_STOP: u32 = 7;
/// Feature: DMA logging report.
pub const FEATURE_DMA_LOGGING_REPORT: u32 = 8;
/// Migration feature flag: STOP_COPY supported.
pub const MIGRATION_STOP_COPY: u64 = 1 << 0;
/// Migration feature flag: P2P states supported.
pub const MIGRATION_P2P: u64 = 1 << 1;
/// Migration feature flag: PRE_COPY supported.
pub const MIGRATION_PRE_COPY: u64 = 1 << 2;

/// `struct vfio_user_dma_map`.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable,
)]
#[repr(C)]
pub struct DmaMap {
    /// Size of this structure.
    pub argsz: u32,
    /// `DMA_READ | DMA_WRITE`.
    pub flags: u32,
    /// Offset into the fd.
    pub offset: u64,
    /// Client (guest-physical / IOVA) address.
    pub address: u64,
    /// Length.
    pub size: u64,
}

/// `struct vfio_user_dma_unmap` (without the bitmap).
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable,
)]
#[repr(C)]
pub struct DmaUnmap {
    /// Size of this structure (plus bitmap).
    pub argsz: u32,
    /// `DMA_UNMAP_*`.
    pub flags: u32,
    /// Address.
    pub address: u64,
    /// Length.
    pub size: u64,
}

/// `struct vfio_user_device_info`.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable,
)]
#[repr(C)]
pub struct DeviceInfo {
    /// Size of this structure.
    pub argsz: u32,
    /// `DEVICE_FLAGS_*`.
    pub flags: u32,
    /// Regions.
    pub num_regions: u32,
    /// IRQ indexes.
    pub num_irqs: u32,
}

/// `struct vfio_region_info`.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable,
)]
#[repr(C)]
pub struct RegionInfo {
    /// Size of the reply buffer (request) / of the full info with caps (reply).
    pub argsz: u32,
    /// `REGION_*` flags.
    pub flags: u32,
    /// Region index.
    pub index: u32,
    /// Offset of the first capability (from the start of this structure), 0 if none.
    pub cap_offset: u32,
    /// Region size.
    pub size: u64,
    /// Offset to use when mmapping the fd.
    pub offset: u64,
}

/// `struct vfio_user_region_io_fds_request` and the fixed part of its reply.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable,
)]
#[repr(C)]
pub struct RegionIoFds {
    /// Size of the reply buffer / of the reply.
    pub argsz: u32,
    /// Flags (0).
    pub flags: u32,
    /// Region index.
    pub index: u32,
    /// Sub-regions in the reply.
    pub count: u32,
}

/// `struct vfio_user_sub_region_ioeventfd`.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable,
)]
#[repr(C)]
pub struct SubRegionIoEventFd {
    /// Offset in the region.
    pub offset: u64,
    /// Access size.
    pub size: u64,
    /// Index into the fds of the message.
    pub fd_index: u32,
    /// 0: ioeventfd.
    pub kind: u32,
    /// Bit 0: datamatch.
    pub flags: u32,
    /// Padding.
    pub padding: u32,
    /// Value to match.
    pub datamatch: u64,
}

/// `struct vfio_irq_info`.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable,
)]
#[repr(C)]
pub struct IrqInfo {
    /// Size of this structure.
    pub argsz: u32,
    /// `IRQ_INFO_*`.
    pub flags: u32,
    /// IRQ index.
    pub index: u32,
    /// Vectors.
    pub count: u32,
}

/// `struct vfio_irq_set` (without data).
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable,
)]
#[repr(C)]
pub struct IrqSet {
    /// Size of this structure plus data.
    pub argsz: u32,
    /// `IRQ_SET_*`.
    pub flags: u32,
    /// IRQ index.
    pub index: u32,
    /// First vector.
    pub start: u32,
    /// Vectors.
    pub count: u32,
}

/// `struct vfio_user_region_access` (without data).
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable,
)]
#[repr(C)]
pub struct RegionAccess {
    /// Offset in the region.
    pub offset: u64,
    /// Region index.
    pub region: u32,
    /// Bytes.
    pub count: u32,
}

/// `struct vfio_user_dma_region_access` (without data).
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable,
)]
#[repr(C)]
pub struct DmaAccess {
    /// Client address.
    pub address: u64,
    /// Bytes.
    pub count: u64,
}

/// `struct vfio_user_device_feature` (without data).
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable,
)]
#[repr(C)]
pub struct DeviceFeature {
    /// Size of this structure plus data.
    pub argsz: u32,
    /// Feature number and `FEATURE_GET | FEATURE_SET | FEATURE_PROBE`.
    pub flags: u32,
}

/// `struct vfio_user_mig_data` (without data).
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable,
)]
#[repr(C)]
pub struct MigData {
    /// Size of this structure plus data.
    pub argsz: u32,
    /// Bytes of data (requested, or present).
    pub size: u32,
}

/// Migration device states (`enum vfio_device_mig_state`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[repr(u32)]
pub enum MigState {
    /// Error.
    Error = 0,
    /// Stopped: no DMA, no interrupts, state frozen.
    Stop = 1,
    /// Running.
    Running = 2,
    /// Stopped, state readable with MIG_DATA_READ.
    StopCopy = 3,
    /// Stopped, state writable with MIG_DATA_WRITE.
    Resuming = 4,
    /// Running without peer-to-peer DMA.
    RunningP2p = 5,
    /// Running, state readable.
    PreCopy = 6,
    /// Pre-copy without peer-to-peer DMA.
    PreCopyP2p = 7,
}

impl MigState {
    /// The state with this number.
    pub fn from_u32(v: u32) -> Option<MigState> {
        use MigState::*;
        Some(match v {
            0 => Error,
            1 => Stop,
            2 => Running,
            3 => StopCopy,
            4 => Resuming,
            5 => RunningP2p,
            6 => PreCopy,
            7 => PreCopyP2p,
            _ => return None,
        })
    }
}

/// A region capability chain with one sparse-mmap capability, to follow a [`RegionInfo`]
/// (`cap_offset` = size of `RegionInfo`).
pub fn sparse_mmap_cap(areas: &[(u64, u64)]) -> Vec<u8> {
    let mut v = Vec::with_capacity(16 + 16 * areas.len());
    v.extend_from_slice(&REGION_CAP_SPARSE_MMAP.to_ne_bytes());
    v.extend_from_slice(&1u16.to_ne_bytes());
    v.extend_from_slice(&0u32.to_ne_bytes());
    v.extend_from_slice(&(areas.len() as u32).to_ne_bytes());
    v.extend_from_slice(&0u32.to_ne_bytes());
    for (o, s) in areas {
        v.extend_from_slice(&o.to_ne_bytes());
        v.extend_from_slice(&s.to_ne_bytes());
    }
    v
}

/// Walk a region's capability chain (`caps` = the bytes after the [`RegionInfo`]) and return
/// the sparse mmap areas, checked to lie inside a region of `region_size` bytes.
pub fn parse_sparse_areas(info: &RegionInfo, caps: &[u8]) -> Result<Vec<(u64, u64)>, ProtoError> {
    let cmd = Command::DeviceGetRegionInfo;
    let base = std::mem::size_of::<RegionInfo>();
    let mut areas = Vec::new();
    let mut next = info.cap_offset as usize;
    let mut seen = 0;
    while next != 0 {
        seen += 1;
        if seen > 16 || next < base {
            return Err(field(cmd, format!("capability chain bad at offset {next}")));
        }
        let at = next - base;
        let hdr = caps
            .get(at..at + 8)
            .ok_or_else(|| field(cmd, format!("capability at {next} outside the reply")))?;
        let id = u16::from_ne_bytes([hdr[0], hdr[1]]);
        let n = u32::from_ne_bytes(hdr[4..8].try_into().expect("4 bytes")) as usize;
        if n != 0 && n <= next {
            return Err(field(cmd, format!("capability chain loops at {next}")));
        }
        if id == REGION_CAP_SPARSE_MMAP {
            let cnt = caps
                .get(at + 8..at + 12)
                .map(|b| u32::from_ne_bytes(b.try_into().expect("4 bytes")) as usize)
                .ok_or_else(|| field(cmd, "sparse mmap capability truncated"))?;
            for k in 0..cnt {
                let o = at + 16 + 16 * k;
                let b = caps.get(o..o + 16).ok_or_else(|| {
                    field(cmd, format!("sparse mmap says {cnt} areas; not there"))
                })?;
                let off = u64::from_ne_bytes(b[..8].try_into().expect("8 bytes"));
                let len = u64::from_ne_bytes(b[8..].try_into().expect("8 bytes"));
                if off.checked_add(len).is_none_or(|e| e > info.size) {
                    return Err(field(
                        cmd,
                        format!(
                            "sparse area {off:#x}+{len:#x} outside the {:#x}-byte region",
                            info.size
                        ),
                    ));
                }
                // Where the client mmaps it: `info.offset + off .. + len` of the fd, which
                // must be a valid (non-negative) off_t.
                if info
                    .offset
                    .checked_add(off)
                    .and_then(|o| o.checked_add(len))
                    .is_none_or(|e| e > i64::MAX as u64)
                {
                    return Err(field(
                        cmd,
                        format!(
                            "sparse area {off:#x}+{len:#x} at mmap offset {:#x} overflows",
                            info.offset
                        ),
                    ));
                }
                areas.push((off, len));
            }
        }
        next = n;
    }
    Ok(areas)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sparse_areas_round_trip_and_bounds() {
        let caps = sparse_mmap_cap(&[(0, 0x1000), (0x2000, 0x1000)]);
        let info = RegionInfo {
            argsz: 32 + caps.len() as u32,
            flags: REGION_CAPS,
            cap_offset: 32,
            size: 0x4000,
            ..Default::default()
        };
        assert_eq!(
            parse_sparse_areas(&info, &caps).unwrap(),
            vec![(0, 0x1000), (0x2000, 0x1000)]
        );
        let small = RegionInfo {
            size: 0x2000,
            ..info
        };
        assert!(parse_sparse_areas(&small, &caps).is_err());
        let mut looped = caps.clone();
        looped[4..8].copy_from_slice(&32u32.to_ne_bytes());
        assert!(parse_sparse_areas(&info, &looped).is_err());
        assert!(parse_sparse_areas(&info, &caps[..20]).is_err());
        let wraps = RegionInfo {
            offset: u64::MAX - 0x1800,
            ..info
        };
        assert!(parse_sparse_areas(&wraps, &caps).is_err());
        let past_off_t = RegionInfo {
            offset: i64::MAX as u64 - 0x1000,
            ..info
        };
        assert!(parse_sparse_areas(&past_off_t, &caps).is_err());
    }
}
