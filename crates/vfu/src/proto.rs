//! The vfio-user wire format (QEMU `docs/interop/vfio-user.rst`, protocol version 0.1).
//!
//! Every message is a 16-byte [`Header`] followed by a command-specific payload; file
//! descriptors travel as `SCM_RIGHTS` ancillary data with the message's first bytes. All
//! integers are in host byte order (the protocol is local to one host). The decoders here are
//! pure functions over bytes: they never allocate more than the message's declared size, which
//! is checked against the negotiated maximum first, and they are fuzzed
//! (`tests/fuzz.rs`, proptest).

use serde::{Deserialize, Serialize};
use thiserror::Error;
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

/// Header size.
pub const HEADER_SIZE: usize = 16;
/// Protocol major version spoken.
pub const VERSION_MAJOR: u16 = 0;
/// Protocol minor version spoken.
pub const VERSION_MINOR: u16 = 1;
/// Default `max_data_xfer_size` (1 MiB), also the most this server accepts and sends.
pub const DEFAULT_MAX_DATA_XFER: u32 = 1 << 20;
/// Default `max_msg_fds` when the peer does not say.
pub const DEFAULT_MAX_MSG_FDS: u32 = 1;
/// Bytes of a message beyond its data, allowed on top of `max_data_xfer_size`.
pub const MSG_OVERHEAD: u32 = 4096;

/// Header flags: message type mask.
pub const FLAG_TYPE_MASK: u32 = 0xf;
/// Message type: command.
pub const TYPE_COMMAND: u32 = 0;
/// Message type: reply.
pub const TYPE_REPLY: u32 = 1;
/// Header flag: the sender expects no reply.
pub const FLAG_NO_REPLY: u32 = 1 << 4;
/// Header flag: the reply is an error; `error` holds an errno.
pub const FLAG_ERROR: u32 = 1 << 5;

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

/// A command.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u16)]
pub enum Command {
    /// Version and capability negotiation.
    Version = 1,
    /// Map client memory for DMA.
    DmaMap = 2,
    /// Unmap it.
    DmaUnmap = 3,
    /// Device info.
    DeviceGetInfo = 4,
    /// Region info.
    DeviceGetRegionInfo = 5,
    /// ioeventfd sub-regions of a region.
    DeviceGetRegionIoFds = 6,
    /// IRQ info.
    DeviceGetIrqInfo = 7,
    /// Set IRQ signalling.
    DeviceSetIrqs = 8,
    /// Region read.
    RegionRead = 9,
    /// Region write.
    RegionWrite = 10,
    /// Server reads client memory.
    DmaRead = 11,
    /// Server writes client memory.
    DmaWrite = 12,
    /// Device reset.
    DeviceReset = 13,
    /// Migration v1 dirty pages (obsolete; refused).
    DirtyPages = 14,
    /// Several region writes in one message.
    RegionWriteMulti = 15,
    /// Device feature get/set/probe (migration v2).
    DeviceFeature = 16,
    /// Read migration data.
    MigDataRead = 17,
    /// Write migration data.
    MigDataWrite = 18,
}

impl Command {
    /// The command with this number.
    pub fn from_u16(v: u16) -> Option<Command> {
        use Command::*;
        Some(match v {
            1 => Version,
            2 => DmaMap,
            3 => DmaUnmap,
            4 => DeviceGetInfo,
            5 => DeviceGetRegionInfo,
            6 => DeviceGetRegionIoFds,
            7 => DeviceGetIrqInfo,
            8 => DeviceSetIrqs,
            9 => RegionRead,
            10 => RegionWrite,
            11 => DmaRead,
            12 => DmaWrite,
            13 => DeviceReset,
            14 => DirtyPages,
            15 => RegionWriteMulti,
            16 => DeviceFeature,
            17 => MigDataRead,
            18 => MigDataWrite,
            _ => return None,
        })
    }
}

/// The 16-byte message header.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable,
)]
#[repr(C)]
pub struct Header {
    /// Message ID (a reply carries its command's).
    pub msg_id: u16,
    /// Command number.
    pub cmd: u16,
    /// Size of the whole message, header included.
    pub size: u32,
    /// Type and flags.
    pub flags: u32,
    /// errno of an error reply.
    pub error: u32,
}

/// A malformed or unacceptable message.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum ProtoError {
    /// Fewer than 16 bytes.
    #[error("message of {0} bytes is shorter than the 16-byte header")]
    Short(usize),
    /// Declared size below the header or above the limit.
    #[error("message size {size} outside {min}..={max}")]
    Size {
        /// Declared size.
        size: u32,
        /// Smallest acceptable.
        min: u32,
        /// Largest acceptable.
        max: u32,
    },
    /// Type field neither command nor reply.
    #[error("message type {0} is neither command (0) nor reply (1)")]
    Type(u32),
    /// Unknown command number.
    #[error("unknown command {0}")]
    UnknownCommand(u16),
    /// Payload too short for the command.
    #[error("{cmd:?} payload of {got} bytes, need at least {need}")]
    Payload {
        /// Command.
        cmd: Command,
        /// Bytes present.
        got: usize,
        /// Bytes needed.
        need: usize,
    },
    /// A field with a bad value.
    #[error("{cmd:?}: {what}")]
    Field {
        /// Command.
        cmd: Command,
        /// What is wrong.
        what: String,
    },
    /// Wrong number of file descriptors.
    #[error("{cmd:?} came with {got} file descriptors, expected {expected}")]
    Fds {
        /// Command.
        cmd: Command,
        /// How many came.
        got: usize,
        /// How many it takes.
        expected: String,
    },
    /// Version negotiation failed.
    #[error("version: {0}")]
    Version(String),
}

impl ProtoError {
    /// The errno to put in an error reply.
    pub fn errno(&self) -> i32 {
        match self {
            ProtoError::UnknownCommand(_) => libc::ENOSYS,
            ProtoError::Size { .. } => libc::E2BIG,
            ProtoError::Version(_) => libc::ENOTSUP,
            _ => libc::EINVAL,
        }
    }
}

impl Header {
    /// A command header.
    pub fn command(msg_id: u16, cmd: Command, size: usize) -> Header {
        Header {
            msg_id,
            cmd: cmd as u16,
            size: size as u32,
            flags: TYPE_COMMAND,
            error: 0,
        }
    }

    /// The reply to `self` with `size` bytes in all.
    pub fn reply(&self, size: usize) -> Header {
        Header {
            msg_id: self.msg_id,
            cmd: self.cmd,
            size: size as u32,
            flags: TYPE_REPLY,
            error: 0,
        }
    }

    /// An error reply to `self`.
    pub fn error_reply(&self, errno: i32) -> Header {
        Header {
            msg_id: self.msg_id,
            cmd: self.cmd,
            size: HEADER_SIZE as u32,
            flags: TYPE_REPLY | FLAG_ERROR,
            error: errno as u32,
        }
    }

    /// Decode and check a header: type, and size within `HEADER_SIZE..=max_size`.
    pub fn decode(bytes: &[u8], max_size: u32) -> Result<Header, ProtoError> {
        let (h, _) = Header::read_from_prefix(bytes).map_err(|_| ProtoError::Short(bytes.len()))?;
        let ty = h.flags & FLAG_TYPE_MASK;
        if ty != TYPE_COMMAND && ty != TYPE_REPLY {
            return Err(ProtoError::Type(ty));
        }
        if h.size < HEADER_SIZE as u32 || h.size > max_size {
            return Err(ProtoError::Size {
                size: h.size,
                min: HEADER_SIZE as u32,
                max: max_size,
            });
        }
        Ok(h)
    }

    /// Whether it is a reply.
    pub fn is_reply(&self) -> bool {
        self.flags & FLAG_TYPE_MASK == TYPE_REPLY
    }

    /// Whether no reply is wanted.
    pub fn no_reply(&self) -> bool {
        self.flags & FLAG_NO_REPLY != 0
    }

    /// Whether it is an error reply.
    pub fn is_error(&self) -> bool {
        self.flags & FLAG_ERROR != 0
    }

    /// Bytes of the header.
    pub fn to_bytes(&self) -> [u8; HEADER_SIZE] {
        let mut b = [0; HEADER_SIZE];
        b.copy_from_slice(self.as_bytes());
        b
    }
}

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

/// `VERSION` capabilities (the JSON object under `"capabilities"`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Caps {
    /// Most fds in one message.
    #[serde(default = "default_max_msg_fds")]
    pub max_msg_fds: u32,
    /// Most data bytes in one message.
    #[serde(default = "default_max_data_xfer")]
    pub max_data_xfer_size: u32,
    /// Supported page sizes (bitmap).
    #[serde(default = "default_pgsizes")]
    pub pgsizes: u64,
    /// Most DMA mappings.
    #[serde(default = "default_max_dma_maps")]
    pub max_dma_maps: u32,
    /// Migration capabilities.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub migration: Option<MigrationCaps>,
}

/// Migration capabilities inside [`Caps`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MigrationCaps {
    /// Dirty-page granularity.
    pub pgsize: u64,
    /// Largest dirty bitmap.
    #[serde(default)]
    pub max_bitmap_size: u64,
}

fn default_max_msg_fds() -> u32 {
    DEFAULT_MAX_MSG_FDS
}
fn default_max_data_xfer() -> u32 {
    DEFAULT_MAX_DATA_XFER
}
fn default_pgsizes() -> u64 {
    4096
}
fn default_max_dma_maps() -> u32 {
    65535
}

impl Default for Caps {
    fn default() -> Caps {
        Caps {
            max_msg_fds: default_max_msg_fds(),
            max_data_xfer_size: default_max_data_xfer(),
            pgsizes: default_pgsizes(),
            max_dma_maps: default_max_dma_maps(),
            migration: None,
        }
    }
}

#[derive(Serialize, Deserialize)]
struct CapsDoc {
    capabilities: Caps,
}

impl Caps {
    /// The VERSION payload after major/minor: NUL-terminated JSON.
    pub fn to_json(&self) -> Vec<u8> {
        let mut v = serde_json::to_vec(&CapsDoc {
            capabilities: self.clone(),
        })
        .expect("plain struct serializes");
        v.push(0);
        v
    }

    /// Parse the JSON (with or without the terminating NUL; empty means defaults).
    pub fn from_json(data: &[u8]) -> Result<Caps, ProtoError> {
        let end = data.iter().position(|&b| b == 0).unwrap_or(data.len());
        let s = &data[..end];
        if s.iter().all(u8::is_ascii_whitespace) {
            return Ok(Caps::default());
        }
        let doc: CapsDoc = serde_json::from_slice(s)
            .map_err(|e| ProtoError::Version(format!("bad capabilities JSON: {e}")))?;
        let c = doc.capabilities;
        // No minimum in the specification; libvfio-user's sample client says 1024.
        if c.max_data_xfer_size == 0 {
            return Err(ProtoError::Version("max_data_xfer_size 0".into()));
        }
        Ok(c)
    }
}

/// A decoded client command (fds are carried beside it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// VERSION.
    Version {
        /// Major.
        major: u16,
        /// Minor.
        minor: u16,
        /// Capabilities.
        caps: Caps,
    },
    /// DMA_MAP.
    DmaMap(DmaMap),
    /// DMA_UNMAP.
    DmaUnmap(DmaUnmap),
    /// DEVICE_GET_INFO.
    DeviceGetInfo {
        /// Reply buffer size.
        argsz: u32,
    },
    /// DEVICE_GET_REGION_INFO.
    RegionInfo {
        /// Reply buffer size.
        argsz: u32,
        /// Region.
        index: u32,
    },
    /// DEVICE_GET_REGION_IO_FDS.
    RegionIoFds {
        /// Reply buffer size.
        argsz: u32,
        /// Region.
        index: u32,
    },
    /// DEVICE_GET_IRQ_INFO.
    IrqInfo {
        /// IRQ index.
        index: u32,
    },
    /// DEVICE_SET_IRQS.
    SetIrqs {
        /// Fixed part.
        set: IrqSet,
        /// Data (bools); eventfds come as fds.
        data: Vec<u8>,
    },
    /// REGION_READ.
    RegionRead(RegionAccess),
    /// REGION_WRITE.
    RegionWrite {
        /// Fixed part.
        access: RegionAccess,
        /// Bytes to write.
        data: Vec<u8>,
    },
    /// DEVICE_RESET.
    DeviceReset,
    /// DEVICE_FEATURE.
    DeviceFeature {
        /// Fixed part.
        feature: DeviceFeature,
        /// Data.
        data: Vec<u8>,
    },
    /// MIG_DATA_READ.
    MigDataRead {
        /// Bytes wanted.
        size: u32,
    },
    /// MIG_DATA_WRITE.
    MigDataWrite {
        /// Bytes.
        data: Vec<u8>,
    },
}

fn fixed<T: FromBytes + KnownLayout + Immutable + Copy>(
    cmd: Command,
    p: &[u8],
) -> Result<(T, &[u8]), ProtoError> {
    T::read_from_prefix(p).map_err(|_| ProtoError::Payload {
        cmd,
        got: p.len(),
        need: std::mem::size_of::<T>(),
    })
}

fn no_fds(cmd: Command, nfds: usize) -> Result<(), ProtoError> {
    if nfds != 0 {
        return Err(ProtoError::Fds {
            cmd,
            got: nfds,
            expected: "0".into(),
        });
    }
    Ok(())
}

fn field(cmd: Command, what: impl Into<String>) -> ProtoError {
    ProtoError::Field {
        cmd,
        what: what.into(),
    }
}

/// Decode a client command: `payload` is the message after the header, `nfds` how many
/// descriptors came with it, `max_data` the negotiated `max_data_xfer_size`.
pub fn parse_request(
    h: &Header,
    payload: &[u8],
    nfds: usize,
    max_data: u32,
) -> Result<Request, ProtoError> {
    let cmd = Command::from_u16(h.cmd).ok_or(ProtoError::UnknownCommand(h.cmd))?;
    if h.is_reply() {
        return Err(field(cmd, "a reply where a command was expected"));
    }
    if payload.len() + HEADER_SIZE != h.size as usize {
        return Err(field(
            cmd,
            format!(
                "header says {} bytes, message has {}",
                h.size,
                payload.len() + HEADER_SIZE
            ),
        ));
    }
    let too_big = |n: u64| -> Result<(), ProtoError> {
        if n > u64::from(max_data) {
            return Err(field(
                cmd,
                format!("{n} bytes exceed max_data_xfer_size {max_data}"),
            ));
        }
        Ok(())
    };
    Ok(match cmd {
        Command::Version => {
            no_fds(cmd, nfds)?;
            if payload.len() < 4 {
                return Err(ProtoError::Payload {
                    cmd,
                    got: payload.len(),
                    need: 4,
                });
            }
            let major = u16::from_ne_bytes([payload[0], payload[1]]);
            let minor = u16::from_ne_bytes([payload[2], payload[3]]);
            Request::Version {
                major,
                minor,
                caps: Caps::from_json(&payload[4..])?,
            }
        }
        Command::DmaMap => {
            let (m, _) = fixed::<DmaMap>(cmd, payload)?;
            if nfds > 1 {
                return Err(ProtoError::Fds {
                    cmd,
                    got: nfds,
                    expected: "0 or 1".into(),
                });
            }
            if m.size == 0 || m.address.checked_add(m.size).is_none() {
                return Err(field(
                    cmd,
                    format!("bad range {:#x}+{:#x}", m.address, m.size),
                ));
            }
            if m.flags & !(DMA_READ | DMA_WRITE | 4) != 0 {
                return Err(field(cmd, format!("unknown flags {:#x}", m.flags)));
            }
            Request::DmaMap(m)
        }
        Command::DmaUnmap => {
            no_fds(cmd, nfds)?;
            let (u, _) = fixed::<DmaUnmap>(cmd, payload)?;
            if u.flags & !(DMA_UNMAP_GET_DIRTY_BITMAP | DMA_UNMAP_ALL) != 0 {
                return Err(field(cmd, format!("unknown flags {:#x}", u.flags)));
            }
            Request::DmaUnmap(u)
        }
        Command::DeviceGetInfo => {
            no_fds(cmd, nfds)?;
            let (d, _) = fixed::<DeviceInfo>(cmd, payload)?;
            Request::DeviceGetInfo { argsz: d.argsz }
        }
        Command::DeviceGetRegionInfo => {
            no_fds(cmd, nfds)?;
            let (r, _) = fixed::<RegionInfo>(cmd, payload)?;
            Request::RegionInfo {
                argsz: r.argsz,
                index: r.index,
            }
        }
        Command::DeviceGetRegionIoFds => {
            no_fds(cmd, nfds)?;
            let (r, _) = fixed::<RegionIoFds>(cmd, payload)?;
            Request::RegionIoFds {
                argsz: r.argsz,
                index: r.index,
            }
        }
        Command::DeviceGetIrqInfo => {
            no_fds(cmd, nfds)?;
            let (i, _) = fixed::<IrqInfo>(cmd, payload)?;
            Request::IrqInfo { index: i.index }
        }
        Command::DeviceSetIrqs => {
            let (s, rest) = fixed::<IrqSet>(cmd, payload)?;
            let data_kind =
                s.flags & (IRQ_SET_DATA_NONE | IRQ_SET_DATA_BOOL | IRQ_SET_DATA_EVENTFD);
            let action =
                s.flags & (IRQ_SET_ACTION_MASK | IRQ_SET_ACTION_UNMASK | IRQ_SET_ACTION_TRIGGER);
            if data_kind.count_ones() != 1 || action.count_ones() != 1 {
                return Err(field(
                    cmd,
                    format!(
                        "flags {:#x}: need exactly one data type and one action",
                        s.flags
                    ),
                ));
            }
            if s.flags & !0x3f != 0 {
                return Err(field(cmd, format!("unknown flags {:#x}", s.flags)));
            }
            if s.start.checked_add(s.count).is_none() || s.count > 2048 {
                return Err(field(cmd, format!("bad range {}+{}", s.start, s.count)));
            }
            match data_kind {
                IRQ_SET_DATA_EVENTFD => {
                    if nfds != s.count as usize {
                        return Err(ProtoError::Fds {
                            cmd,
                            got: nfds,
                            expected: s.count.to_string(),
                        });
                    }
                }
                IRQ_SET_DATA_BOOL => {
                    no_fds(cmd, nfds)?;
                    if rest.len() < s.count as usize {
                        return Err(ProtoError::Payload {
                            cmd,
                            got: payload.len(),
                            need: 20 + s.count as usize,
                        });
                    }
                }
                _ => no_fds(cmd, nfds)?,
            }
            let data = if data_kind == IRQ_SET_DATA_BOOL {
                rest[..s.count as usize].to_vec()
            } else {
                Vec::new()
            };
            Request::SetIrqs { set: s, data }
        }
        Command::RegionRead => {
            no_fds(cmd, nfds)?;
            let (a, _) = fixed::<RegionAccess>(cmd, payload)?;
            too_big(u64::from(a.count))?;
            Request::RegionRead(a)
        }
        Command::RegionWrite => {
            no_fds(cmd, nfds)?;
            let (a, rest) = fixed::<RegionAccess>(cmd, payload)?;
            too_big(u64::from(a.count))?;
            if rest.len() != a.count as usize {
                return Err(field(
                    cmd,
                    format!("count {} but {} data bytes", a.count, rest.len()),
                ));
            }
            Request::RegionWrite {
                access: a,
                data: rest.to_vec(),
            }
        }
        Command::DeviceReset => {
            no_fds(cmd, nfds)?;
            Request::DeviceReset
        }
        Command::DeviceFeature => {
            no_fds(cmd, nfds)?;
            let (f, rest) = fixed::<DeviceFeature>(cmd, payload)?;
            let ops = f.flags & (FEATURE_GET | FEATURE_SET | FEATURE_PROBE);
            if ops == 0 || (ops & FEATURE_GET != 0 && ops & FEATURE_SET != 0) {
                return Err(field(
                    cmd,
                    format!("flags {:#x}: need GET, SET or PROBE", f.flags),
                ));
            }
            Request::DeviceFeature {
                feature: f,
                data: rest.to_vec(),
            }
        }
        Command::MigDataRead => {
            no_fds(cmd, nfds)?;
            let (m, _) = fixed::<MigData>(cmd, payload)?;
            too_big(u64::from(m.size))?;
            Request::MigDataRead { size: m.size }
        }
        Command::MigDataWrite => {
            no_fds(cmd, nfds)?;
            let (m, rest) = fixed::<MigData>(cmd, payload)?;
            too_big(u64::from(m.size))?;
            if rest.len() != m.size as usize {
                return Err(field(
                    cmd,
                    format!("size {} but {} data bytes", m.size, rest.len()),
                ));
            }
            Request::MigDataWrite {
                data: rest.to_vec(),
            }
        }
        Command::DmaRead | Command::DmaWrite => {
            return Err(field(cmd, "a server-to-client command sent by the client"));
        }
        Command::DirtyPages | Command::RegionWriteMulti => {
            return Err(ProtoError::Field {
                cmd,
                what: "not supported (migration v1 / write_multiple not negotiated)".into(),
            });
        }
    })
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

    fn msg(cmd: Command, payload: &[u8]) -> (Header, Vec<u8>) {
        (
            Header::command(7, cmd, HEADER_SIZE + payload.len()),
            payload.to_vec(),
        )
    }

    #[test]
    fn header_round_trip_and_checks() {
        let h = Header::command(3, Command::RegionRead, 32);
        assert_eq!(Header::decode(&h.to_bytes(), 64).unwrap(), h);
        assert!(matches!(
            Header::decode(&h.to_bytes(), 16),
            Err(ProtoError::Size { .. })
        ));
        let mut b = h.to_bytes();
        b[8] = 7;
        assert_eq!(Header::decode(&b, 64), Err(ProtoError::Type(7)));
        assert_eq!(Header::decode(&b[..10], 64), Err(ProtoError::Short(10)));
        let e = h.error_reply(libc::EINVAL);
        assert!(e.is_reply() && e.is_error());
    }

    #[test]
    fn version_caps() {
        let caps = Caps {
            max_msg_fds: 8,
            max_data_xfer_size: 1 << 20,
            pgsizes: 4096,
            max_dma_maps: 100,
            migration: Some(MigrationCaps {
                pgsize: 4096,
                max_bitmap_size: 1 << 20,
            }),
        };
        let mut p = vec![0, 0, 1, 0];
        p.extend(caps.to_json());
        let (h, p) = msg(Command::Version, &p);
        let r = parse_request(&h, &p, 0, 1 << 20).unwrap();
        assert_eq!(
            r,
            Request::Version {
                major: 0,
                minor: 1,
                caps
            }
        );
        // Unknown keys are ignored; missing ones take the defaults.
        let c = Caps::from_json(br#"{"capabilities":{"twin_socket":{"supported":true}}}"#).unwrap();
        assert_eq!(c, Caps::default());
        assert!(Caps::from_json(b"{nope").is_err());
        assert!(Caps::from_json(br#"{"capabilities":{"max_data_xfer_size":0}}"#).is_err());
        assert_eq!(
            Caps::from_json(br#"{"capabilities":{"max_data_xfer_size":1024}}"#)
                .unwrap()
                .max_data_xfer_size,
            1024
        );
    }

    #[test]
    fn region_write_checks_count_and_limit() {
        let a = RegionAccess {
            offset: 0,
            region: 0,
            count: 4,
        };
        let mut p = a.as_bytes().to_vec();
        p.extend([1, 2, 3, 4]);
        let (h, p) = msg(Command::RegionWrite, &p);
        assert!(parse_request(&h, &p, 0, 4096).is_ok());
        assert!(parse_request(&h, &p, 1, 4096).is_err());
        assert!(parse_request(&h, &p[..p.len() - 1], 0, 4096).is_err());
        let big = RegionAccess { count: 8192, ..a };
        let (h, p) = msg(Command::RegionRead, big.as_bytes());
        assert!(parse_request(&h, &p, 0, 4096).is_err());
    }

    #[test]
    fn set_irqs_fd_count() {
        let s = IrqSet {
            argsz: 20,
            flags: IRQ_SET_DATA_EVENTFD | IRQ_SET_ACTION_TRIGGER,
            index: IRQ_MSIX,
            start: 0,
            count: 2,
        };
        let (h, p) = msg(Command::DeviceSetIrqs, s.as_bytes());
        assert!(parse_request(&h, &p, 2, 4096).is_ok());
        assert!(matches!(
            parse_request(&h, &p, 1, 4096),
            Err(ProtoError::Fds { .. })
        ));
        let bad = IrqSet {
            flags: IRQ_SET_DATA_EVENTFD | IRQ_SET_DATA_NONE | IRQ_SET_ACTION_TRIGGER,
            ..s
        };
        let (h, p) = msg(Command::DeviceSetIrqs, bad.as_bytes());
        assert!(parse_request(&h, &p, 2, 4096).is_err());
    }

    #[test]
    fn unknown_and_reversed_commands() {
        let h = Header {
            cmd: 99,
            size: 16,
            ..Default::default()
        };
        assert_eq!(
            parse_request(&h, &[], 0, 4096),
            Err(ProtoError::UnknownCommand(99))
        );
        assert_eq!(ProtoError::UnknownCommand(99).errno(), libc::ENOSYS);
        let (h, p) = msg(Command::DmaRead, &[0; 16]);
        assert!(parse_request(&h, &p, 0, 4096).is_err());
    }

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
    }
}
