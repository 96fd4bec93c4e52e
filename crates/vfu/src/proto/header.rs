//! Framing: the 16-byte [`Header`], the command numbers, the message limits and the
//! errors of malformed messages.

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

/// A [`ProtoError::Field`] for `cmd`.
pub(super) fn field(cmd: Command, what: impl Into<String>) -> ProtoError {
    ProtoError::Field {
        cmd,
        what: what.into(),
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
