//! Decoding a client's command into a [`Request`]: the pure, fuzzed entry point of the
//! server.

use zerocopy::{FromBytes, Immutable, KnownLayout};

use super::caps::Caps;
use super::header::*;
use super::msg::*;

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

#[cfg(test)]
mod tests {
    use zerocopy::IntoBytes;

    use super::*;

    fn msg(cmd: Command, payload: &[u8]) -> (Header, Vec<u8>) {
        (
            Header::command(7, cmd, HEADER_SIZE + payload.len()),
            payload.to_vec(),
        )
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
}
