//! A vfio-user client: connects, negotiates, learns the device (regions, sparse mmap areas
//! and their fds, IRQs) and then reads and writes regions, maps DMA, sets interrupts, resets
//! and migrates it.
//!
//! It trusts nothing the server says: every reply is checked against the command it answers
//! (message ID, command, size, fields), every wait has a timeout, and a server that lies or
//! disconnects gives a [`ClientError`], never a panic or a hang. While it waits for a reply
//! it serves the server's `DMA_READ` / `DMA_WRITE` requests for memory mapped without an fd
//! ([`Client::dma_map_local`]). All methods take `&self`: calls from several threads are
//! serialised on the connection.
//!
//! What it bounds of the server's word, and what it refuses at connect time: see the crate
//! docs. Files: this one (connection, discovery, regions, DMA, IRQs) and `migration`
//! (DEVICE_FEATURE: migration and DMA dirty-page logging).

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use zerocopy::{FromBytes, IntoBytes};

use crate::proto::*;
use crate::sock::{self, Message, RecvError};

mod migration;

/// A client-side failure.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Connecting to the socket failed.
    #[error("connecting to {path}")]
    Connect {
        /// Socket path.
        path: String,
        /// errno.
        #[source]
        source: std::io::Error,
    },
    /// Socket I/O failed.
    #[error("socket I/O during {cmd:?}")]
    Io {
        /// Command in flight.
        cmd: Command,
        /// errno.
        #[source]
        source: std::io::Error,
    },
    /// No reply within the timeout.
    #[error("no reply to {cmd:?} within {timeout:?}")]
    Timeout {
        /// Command.
        cmd: Command,
        /// Timeout.
        timeout: Duration,
    },
    /// The server closed the connection.
    #[error("the server closed the connection during {0:?}")]
    Disconnected(Command),
    /// The server answered with an error.
    #[error("the server refused {cmd:?}: {}", std::io::Error::from_raw_os_error(*errno))]
    Server {
        /// Command.
        cmd: Command,
        /// errno it sent.
        errno: i32,
    },
    /// An fd for DMA_MAP that is not sealed against shrinking: truncating it would pull the
    /// pages from under the server (which survives it, but the device's DMA fails).
    #[error("fd {fd} is not sealed against shrinking (F_SEAL_SHRINK); seal it before DMA_MAP")]
    Unsealed {
        /// The fd.
        fd: RawFd,
        /// Why its seals could not be read (a file that cannot be sealed), if so.
        #[source]
        source: Option<std::io::Error>,
    },
    /// The server broke the protocol (bad reply, wrong ID, lying fields).
    #[error("protocol violation during {cmd:?}: {what}")]
    Protocol {
        /// Command.
        cmd: Command,
        /// What it did.
        what: String,
    },
}

/// A region as the server described it.
#[derive(Debug)]
pub struct Region {
    /// Index.
    pub index: u32,
    /// `REGION_*` flags.
    pub flags: u32,
    /// Size.
    pub size: u64,
    /// Offset to mmap the fd at.
    pub mmap_offset: u64,
    /// Sparse mmap areas (offset, size).
    pub sparse: Vec<(u64, u64)>,
    /// The fd for mmap, if the region is mappable.
    pub fd: Option<OwnedFd>,
}

/// Memory the client serves to the server's `DMA_READ` / `DMA_WRITE`.
pub trait DmaMemory: Send + Sync {
    /// Copy `buf.len()` bytes at `offset` (relative to the mapping) into `buf`; false if out
    /// of range.
    fn read(&self, offset: u64, buf: &mut [u8]) -> bool;
    /// Copy `data` to `offset`; false if out of range.
    fn write(&self, offset: u64, data: &[u8]) -> bool;
}

/// Client memory mapped to the server with an fd, reached with pread/pwrite when the
/// server uses messages anyway.
struct FdMemory {
    file: std::fs::File,
    offset: u64,
}

impl DmaMemory for FdMemory {
    fn read(&self, offset: u64, buf: &mut [u8]) -> bool {
        let Some(at) = self.offset.checked_add(offset) else {
            return false;
        };
        self.file.read_exact_at(buf, at).is_ok()
    }

    fn write(&self, offset: u64, data: &[u8]) -> bool {
        let Some(at) = self.offset.checked_add(offset) else {
            return false;
        };
        self.file.write_all_at(data, at).is_ok()
    }
}

struct Local {
    address: u64,
    size: u64,
    flags: u32,
    mem: Arc<dyn DmaMemory>,
}

struct Conn {
    sock: UnixStream,
    next_id: u16,
    local: Vec<Local>,
}

/// A connection to one vfio-user device.
pub struct Client {
    conn: Mutex<Conn>,
    timeout: Duration,
    server_caps: Caps,
    version: (u16, u16),
    info: DeviceInfo,
    regions: Vec<Region>,
    irqs: Vec<IrqInfo>,
    /// Server-initiated DMA requests served.
    dma_served: std::sync::atomic::AtomicU64,
}

/// The most data bytes in one message either way (advertised as our `max_data_xfer_size`; a
/// server's larger value is capped to it).
pub const CLIENT_MAX_DATA_XFER: u32 = DEFAULT_MAX_DATA_XFER;

/// The largest message this client receives.
const MAX_IN: u32 = CLIENT_MAX_DATA_XFER + MSG_OVERHEAD;

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    b.get(at..at + 4)
        .map(|x| u32::from_ne_bytes(x.try_into().expect("4 bytes")))
}

impl Client {
    /// Connect to `path`, negotiate, and read the device's description.
    pub fn connect(path: &Path, timeout: Duration) -> Result<Client, ClientError> {
        let sock = UnixStream::connect(path).map_err(|source| ClientError::Connect {
            path: path.display().to_string(),
            source,
        })?;
        let io = |source| ClientError::Io {
            cmd: Command::Version,
            source,
        };
        sock.set_read_timeout(Some(timeout)).map_err(io)?;
        sock.set_write_timeout(Some(timeout)).map_err(io)?;
        let mut c = Client {
            conn: Mutex::new(Conn {
                sock,
                next_id: 1,
                local: Vec::new(),
            }),
            timeout,
            server_caps: Caps::default(),
            version: (0, 0),
            info: DeviceInfo::default(),
            regions: Vec::new(),
            irqs: Vec::new(),
            dma_served: Default::default(),
        };
        c.negotiate()?;
        c.discover()?;
        Ok(c)
    }

    fn lock(&self) -> MutexGuard<'_, Conn> {
        self.conn.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn negotiate(&mut self) -> Result<(), ClientError> {
        let cmd = Command::Version;
        let ours = Caps {
            max_msg_fds: 16,
            migration: Some(MigrationCaps {
                pgsize: 4096,
                max_bitmap_size: 256 << 10,
            }),
            ..Caps::default()
        };
        let mut p = VERSION_MAJOR.to_ne_bytes().to_vec();
        p.extend(VERSION_MINOR.to_ne_bytes());
        p.extend(ours.to_json());
        let r = self.call(cmd, &[&p], &[])?;
        if r.payload.len() < 4 {
            return Err(ClientError::Protocol {
                cmd,
                what: "VERSION reply shorter than 4 bytes".into(),
            });
        }
        let major = u16::from_ne_bytes([r.payload[0], r.payload[1]]);
        let minor = u16::from_ne_bytes([r.payload[2], r.payload[3]]);
        if major != VERSION_MAJOR {
            return Err(ClientError::Protocol {
                cmd,
                what: format!("server speaks {major}.{minor}, this client {VERSION_MAJOR}.x"),
            });
        }
        self.version = (major, minor);
        let mut caps = Caps::from_json(&r.payload[4..]).map_err(|e| ClientError::Protocol {
            cmd,
            what: e.to_string(),
        })?;
        // What the server accepts per message: we never send more than we accept ourselves
        // (1 MiB), whatever it says (4 GiB would be a 4 GiB buffer per message).
        caps.max_data_xfer_size = caps.max_data_xfer_size.min(CLIENT_MAX_DATA_XFER);
        self.server_caps = caps;
        Ok(())
    }

    fn discover(&mut self) -> Result<(), ClientError> {
        let cmd = Command::DeviceGetInfo;
        let q = DeviceInfo {
            argsz: 16,
            ..Default::default()
        };
        let r = self.call(cmd, &[q.as_bytes()], &[])?;
        let (info, _) =
            DeviceInfo::read_from_prefix(&r.payload).map_err(|_| ClientError::Protocol {
                cmd,
                what: format!("DEVICE_GET_INFO reply of {} bytes", r.payload.len()),
            })?;
        if info.num_regions > 64 || info.num_irqs > 64 {
            return Err(ClientError::Protocol {
                cmd,
                what: format!(
                    "{} regions and {} IRQ indexes is not believable",
                    info.num_regions, info.num_irqs
                ),
            });
        }
        self.info = info;
        for i in 0..info.num_regions {
            let reg = self.region_info(i)?;
            self.regions.push(reg);
        }
        for i in 0..info.num_irqs {
            let irq = self.irq_info(i)?;
            self.irqs.push(irq);
        }
        Ok(())
    }

    fn region_info(&self, index: u32) -> Result<Region, ClientError> {
        let cmd = Command::DeviceGetRegionInfo;
        let base = std::mem::size_of::<RegionInfo>() as u32;
        let mut argsz = base;
        for _ in 0..2 {
            let q = RegionInfo {
                argsz,
                index,
                ..Default::default()
            };
            let mut r = self.call(cmd, &[q.as_bytes()], &[])?;
            let (info, caps) =
                RegionInfo::read_from_prefix(&r.payload).map_err(|_| ClientError::Protocol {
                    cmd,
                    what: format!("region {index}: reply of {} bytes", r.payload.len()),
                })?;
            if info.index != index {
                return Err(ClientError::Protocol {
                    cmd,
                    what: format!("asked for region {index}, got region {}", info.index),
                });
            }
            if r.fds.len() > 1 {
                return Err(ClientError::Protocol {
                    cmd,
                    what: format!("region {index}: {} fds", r.fds.len()),
                });
            }
            // A larger argsz means "ask again with this much room" (libvfio-user sets it
            // without the CAPS flag, which it only sets once the capabilities fit).
            if info.argsz > argsz {
                if info.argsz > 65536 {
                    return Err(ClientError::Protocol {
                        cmd,
                        what: format!("region {index}: argsz {}", info.argsz),
                    });
                }
                argsz = info.argsz;
                continue;
            }
            let sparse = if info.flags & REGION_CAPS != 0 && info.cap_offset != 0 {
                parse_sparse_areas(&info, caps).map_err(|e| ClientError::Protocol {
                    cmd,
                    what: format!("region {index}: {e}"),
                })?
            } else {
                Vec::new()
            };
            let fd = r.fds.pop();
            let mut flags = info.flags;
            if flags & REGION_MMAP != 0 && fd.is_none() {
                // A server may say so without sending an fd: treat the region as trapped
                // (every access through REGION_READ/WRITE), which is always correct.
                flags &= !REGION_MMAP;
            }
            return Ok(Region {
                index,
                flags,
                size: info.size,
                mmap_offset: info.offset,
                sparse: if fd.is_some() { sparse } else { Vec::new() },
                fd,
            });
        }
        Err(ClientError::Protocol {
            cmd,
            what: format!("region {index}: argsz keeps growing"),
        })
    }

    fn irq_info(&self, index: u32) -> Result<IrqInfo, ClientError> {
        let cmd = Command::DeviceGetIrqInfo;
        let q = IrqInfo {
            argsz: 16,
            index,
            ..Default::default()
        };
        let r = self.call(cmd, &[q.as_bytes()], &[])?;
        let (i, _) = IrqInfo::read_from_prefix(&r.payload).map_err(|_| ClientError::Protocol {
            cmd,
            what: format!("IRQ {index}: reply of {} bytes", r.payload.len()),
        })?;
        if i.index != index || i.count > 2048 {
            return Err(ClientError::Protocol {
                cmd,
                what: format!("asked IRQ {index}, got index {} count {}", i.index, i.count),
            });
        }
        Ok(i)
    }

    /// Send a command and wait for its reply, serving DMA requests meanwhile.
    fn call(&self, cmd: Command, parts: &[&[u8]], fds: &[RawFd]) -> Result<Message, ClientError> {
        let mut c = self.lock();
        let id = c.next_id;
        c.next_id = c.next_id.wrapping_add(1) & 0x7fff;
        let size: usize = HEADER_SIZE + parts.iter().map(|p| p.len()).sum::<usize>();
        let h = Header::command(id, cmd, size);
        let mut all: Vec<&[u8]> = vec![h.as_bytes()];
        all.extend_from_slice(parts);
        sock::send(&c.sock, &all, fds).map_err(|source| {
            if source.kind() == std::io::ErrorKind::BrokenPipe {
                ClientError::Disconnected(cmd)
            } else {
                ClientError::Io { cmd, source }
            }
        })?;
        let max = MAX_IN;
        let deadline = std::time::Instant::now() + self.timeout;
        loop {
            let m = match sock::recv(&c.sock, max) {
                Ok(m) => m,
                Err(RecvError::Closed) => return Err(ClientError::Disconnected(cmd)),
                Err(RecvError::Idle) => {
                    return Err(ClientError::Timeout {
                        cmd,
                        timeout: self.timeout,
                    });
                }
                Err(RecvError::Io(source)) => {
                    return Err(if source.kind() == std::io::ErrorKind::UnexpectedEof {
                        ClientError::Disconnected(cmd)
                    } else {
                        ClientError::Io { cmd, source }
                    });
                }
                Err(e) => {
                    return Err(ClientError::Protocol {
                        cmd,
                        what: e.to_string(),
                    });
                }
            };
            if !m.header.is_reply() {
                self.serve_dma(&c, m);
                if std::time::Instant::now() > deadline {
                    return Err(ClientError::Timeout {
                        cmd,
                        timeout: self.timeout,
                    });
                }
                continue;
            }
            if m.header.msg_id != id || m.header.cmd != cmd as u16 {
                return Err(ClientError::Protocol {
                    cmd,
                    what: format!(
                        "reply to message {} (command {}) while waiting for message {id}",
                        m.header.msg_id, m.header.cmd
                    ),
                });
            }
            if m.header.is_error() {
                return Err(ClientError::Server {
                    cmd,
                    errno: m.header.error as i32,
                });
            }
            return Ok(m);
        }
    }

    /// Serve the server's own requests (`DMA_READ` / `DMA_WRITE`) without sending a command,
    /// until none comes for `idle` (or `limit` are served). A server that does DMA by itself
    /// and reads only the reply it waits for (libvfio-user's do) needs its client quiet and
    /// listening; [`call`](Client::region_read) serves them too, in passing. Returns how many
    /// were served.
    pub fn serve_requests(&self, idle: Duration, limit: usize) -> Result<usize, ClientError> {
        let cmd = Command::DmaWrite;
        let c = self.lock();
        let mut served = 0;
        while served < limit {
            let ready = sock::wait_for(c.sock.as_raw_fd(), libc::POLLIN, idle)
                .map_err(|source| ClientError::Io { cmd, source })?;
            if !ready {
                break;
            }
            let m = match sock::recv(&c.sock, MAX_IN) {
                Ok(m) => m,
                Err(RecvError::Closed) => return Err(ClientError::Disconnected(cmd)),
                Err(e) => {
                    return Err(ClientError::Protocol {
                        cmd,
                        what: e.to_string(),
                    });
                }
            };
            if m.header.is_reply() {
                return Err(ClientError::Protocol {
                    cmd,
                    what: format!("a reply to message {} nobody sent", m.header.msg_id),
                });
            }
            self.serve_dma(&c, m);
            served += 1;
        }
        Ok(served)
    }

    fn serve_dma(&self, c: &Conn, m: Message) {
        let h = m.header;
        let reply_err = |errno| {
            let _ = sock::send(&c.sock, &[h.error_reply(errno).as_bytes()], &[]);
        };
        let Ok((a, data)) = DmaAccess::read_from_prefix(&m.payload) else {
            return reply_err(libc::EINVAL);
        };
        let find = |need: u32| {
            c.local.iter().find(|l| {
                a.address >= l.address
                    && a.address
                        .checked_add(a.count)
                        .is_some_and(|e| e <= l.address.saturating_add(l.size))
                    && l.flags & need == need
            })
        };
        match Command::from_u16(h.cmd) {
            Some(Command::DmaRead) if a.count <= u64::from(CLIENT_MAX_DATA_XFER) => {
                let Some(l) = find(DMA_READ) else {
                    return reply_err(libc::EFAULT);
                };
                let mut buf = vec![0u8; a.count as usize];
                if !l.mem.read(a.address - l.address, &mut buf) {
                    return reply_err(libc::EFAULT);
                }
                let rh = h.reply(HEADER_SIZE + 16 + buf.len());
                let _ = sock::send(&c.sock, &[rh.as_bytes(), a.as_bytes(), &buf], &[]);
            }
            Some(Command::DmaWrite) if data.len() as u64 == a.count => {
                let Some(l) = find(DMA_WRITE) else {
                    return reply_err(libc::EFAULT);
                };
                if !l.mem.write(a.address - l.address, data) {
                    return reply_err(libc::EFAULT);
                }
                let rh = h.reply(HEADER_SIZE + 16);
                let _ = sock::send(&c.sock, &[rh.as_bytes(), a.as_bytes()], &[]);
            }
            _ => return reply_err(libc::EINVAL),
        }
        self.dma_served
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    /// Negotiated version.
    pub fn version(&self) -> (u16, u16) {
        self.version
    }

    /// The server's capabilities.
    pub fn server_caps(&self) -> &Caps {
        &self.server_caps
    }

    /// DEVICE_GET_INFO.
    pub fn device_info(&self) -> DeviceInfo {
        self.info
    }

    /// The regions.
    pub fn regions(&self) -> &[Region] {
        &self.regions
    }

    /// Region `index`.
    pub fn region(&self, index: u32) -> Option<&Region> {
        self.regions.get(index as usize)
    }

    /// The IRQ indexes.
    pub fn irqs(&self) -> &[IrqInfo] {
        &self.irqs
    }

    /// DMA requests from the server this client served.
    pub fn dma_requests_served(&self) -> u64 {
        self.dma_served.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Most data bytes in one message each way: the server's `max_data_xfer_size` (what it
    /// accepts) and ours (what we accept: the default we advertised).
    fn max_data(&self) -> usize {
        self.server_caps
            .max_data_xfer_size
            .min(CLIENT_MAX_DATA_XFER) as usize
    }

    /// REGION_READ (split into messages of at most the negotiated `max_data_xfer_size`).
    pub fn region_read(&self, region: u32, offset: u64, buf: &mut [u8]) -> Result<(), ClientError> {
        if buf.len() <= self.max_data() {
            return self.region_read_one(region, offset, buf);
        }
        let chunk = self.max_data();
        for (i, part) in buf.chunks_mut(chunk).enumerate() {
            self.region_read_one(region, offset.saturating_add((i * chunk) as u64), part)?;
        }
        Ok(())
    }

    fn region_read_one(&self, region: u32, offset: u64, buf: &mut [u8]) -> Result<(), ClientError> {
        let cmd = Command::RegionRead;
        let a = RegionAccess {
            offset,
            region,
            count: buf.len() as u32,
        };
        let r = self.call(cmd, &[a.as_bytes()], &[])?;
        let (got, data) =
            RegionAccess::read_from_prefix(&r.payload).map_err(|_| ClientError::Protocol {
                cmd,
                what: "short REGION_READ reply".into(),
            })?;
        if got.count as usize != buf.len() || data.len() != buf.len() {
            return Err(ClientError::Protocol {
                cmd,
                what: format!(
                    "asked {} bytes, reply says {} and carries {}",
                    buf.len(),
                    got.count,
                    data.len()
                ),
            });
        }
        buf.copy_from_slice(data);
        Ok(())
    }

    /// REGION_WRITE (split into messages of at most the negotiated `max_data_xfer_size`).
    pub fn region_write(&self, region: u32, offset: u64, data: &[u8]) -> Result<(), ClientError> {
        if data.len() <= self.max_data() {
            return self.region_write_one(region, offset, data);
        }
        let chunk = self.max_data();
        for (i, part) in data.chunks(chunk).enumerate() {
            self.region_write_one(region, offset.saturating_add((i * chunk) as u64), part)?;
        }
        Ok(())
    }

    fn region_write_one(&self, region: u32, offset: u64, data: &[u8]) -> Result<(), ClientError> {
        let a = RegionAccess {
            offset,
            region,
            count: data.len() as u32,
        };
        self.call(Command::RegionWrite, &[a.as_bytes(), data], &[])?;
        Ok(())
    }

    /// Read config space.
    pub fn config_read(&self, offset: u64, buf: &mut [u8]) -> Result<(), ClientError> {
        self.region_read(PCI_CONFIG_REGION, offset, buf)
    }

    /// Write config space.
    pub fn config_write(&self, offset: u64, data: &[u8]) -> Result<(), ClientError> {
        self.region_write(PCI_CONFIG_REGION, offset, data)
    }

    /// SET_IRQS: signal vectors `start..` of `index` through these eventfds.
    pub fn set_irq_eventfds(
        &self,
        index: u32,
        start: u32,
        fds: &[RawFd],
    ) -> Result<(), ClientError> {
        let s = IrqSet {
            argsz: 20,
            flags: IRQ_SET_DATA_EVENTFD | IRQ_SET_ACTION_TRIGGER,
            index,
            start,
            count: fds.len() as u32,
        };
        self.call(Command::DeviceSetIrqs, &[s.as_bytes()], fds)?;
        Ok(())
    }

    /// SET_IRQS: stop signalling `index`.
    pub fn disable_irqs(&self, index: u32) -> Result<(), ClientError> {
        let s = IrqSet {
            argsz: 20,
            flags: IRQ_SET_DATA_NONE | IRQ_SET_ACTION_TRIGGER,
            index,
            start: 0,
            count: 0,
        };
        self.call(Command::DeviceSetIrqs, &[s.as_bytes()], &[])?;
        Ok(())
    }

    /// SET_IRQS: mask or unmask vectors.
    pub fn mask_irqs(
        &self,
        index: u32,
        start: u32,
        count: u32,
        mask: bool,
    ) -> Result<(), ClientError> {
        let s = IrqSet {
            argsz: 20,
            flags: IRQ_SET_DATA_NONE
                | if mask {
                    IRQ_SET_ACTION_MASK
                } else {
                    IRQ_SET_ACTION_UNMASK
                },
            index,
            start,
            count,
        };
        self.call(Command::DeviceSetIrqs, &[s.as_bytes()], &[])?;
        Ok(())
    }

    /// DMA_MAP with an fd: the server maps `fd` at `offset`. The fd must be sealed against
    /// shrinking (`F_SEAL_SHRINK`; a memfd created with `MFD_ALLOW_SEALING`), so that no
    /// truncation can pull pages from under the server: [`ClientError::Unsealed`] otherwise.
    pub fn dma_map_fd(
        &self,
        address: u64,
        size: u64,
        fd: RawFd,
        offset: u64,
        flags: u32,
    ) -> Result<(), ClientError> {
        let m = DmaMap {
            argsz: 32,
            flags,
            offset,
            address,
            size,
        };
        // SAFETY: F_GET_SEALS on a descriptor the caller holds; -1 for unsealable files.
        let seals = unsafe { libc::fcntl(fd, libc::F_GET_SEALS) };
        if seals < 0 {
            return Err(ClientError::Unsealed {
                fd,
                source: Some(std::io::Error::last_os_error()),
            });
        }
        if seals & libc::F_SEAL_SHRINK == 0 {
            return Err(ClientError::Unsealed { fd, source: None });
        }
        // Keep the fd too: a server may still reach this memory through DMA_READ/WRITE
        // messages (libvfio-user's sample server does, on purpose), served with pread/pwrite.
        // SAFETY: F_DUPFD_CLOEXEC on a descriptor the caller holds; the result is checked.
        let dup = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 0) };
        if dup < 0 {
            return Err(ClientError::Io {
                cmd: Command::DmaMap,
                source: std::io::Error::last_os_error(),
            });
        }
        // SAFETY: `dup` is a new descriptor we own.
        let dup = unsafe { OwnedFd::from_raw_fd(dup) };
        self.call(Command::DmaMap, &[m.as_bytes()], &[fd])?;
        self.lock().local.push(Local {
            address,
            size,
            flags,
            mem: Arc::new(FdMemory {
                file: std::fs::File::from(dup),
                offset,
            }),
        });
        Ok(())
    }

    /// DMA_MAP without an fd: the server reaches `mem` through DMA_READ / DMA_WRITE messages
    /// that this client serves while it waits for replies.
    pub fn dma_map_local(
        &self,
        address: u64,
        size: u64,
        flags: u32,
        mem: Arc<dyn DmaMemory>,
    ) -> Result<(), ClientError> {
        let m = DmaMap {
            argsz: 32,
            flags,
            offset: 0,
            address,
            size,
        };
        self.lock().local.push(Local {
            address,
            size,
            flags,
            mem,
        });
        if let Err(e) = self.call(Command::DmaMap, &[m.as_bytes()], &[]) {
            self.lock().local.retain(|l| l.address != address);
            return Err(e);
        }
        Ok(())
    }

    /// DMA_UNMAP.
    pub fn dma_unmap(&self, address: u64, size: u64) -> Result<(), ClientError> {
        let u = DmaUnmap {
            argsz: 24,
            flags: 0,
            address,
            size,
        };
        self.call(Command::DmaUnmap, &[u.as_bytes()], &[])?;
        self.lock().local.retain(|l| l.address != address);
        Ok(())
    }

    /// DEVICE_RESET.
    pub fn reset(&self) -> Result<(), ClientError> {
        self.call(Command::DeviceReset, &[], &[])?;
        Ok(())
    }

    /// GET_REGION_IO_FDS: ioeventfd sub-regions of `region` with their fds.
    pub fn region_io_fds(
        &self,
        region: u32,
    ) -> Result<Vec<(SubRegionIoEventFd, OwnedFd)>, ClientError> {
        let cmd = Command::DeviceGetRegionIoFds;
        let mut argsz = 16u32;
        for _ in 0..2 {
            let q = RegionIoFds {
                argsz,
                flags: 0,
                index: region,
                count: 0,
            };
            let r = self.call(cmd, &[q.as_bytes()], &[])?;
            let (h, rest) =
                RegionIoFds::read_from_prefix(&r.payload).map_err(|_| ClientError::Protocol {
                    cmd,
                    what: "short reply".into(),
                })?;
            if h.count == 0 && h.argsz > argsz && h.argsz <= 16 + 40 * 256 {
                argsz = h.argsz;
                continue;
            }
            let mut out = Vec::new();
            let mut fds: Vec<Option<OwnedFd>> = r.fds.into_iter().map(Some).collect();
            for k in 0..h.count as usize {
                let (sub, _) = rest
                    .get(40 * k..)
                    .and_then(|b| SubRegionIoEventFd::read_from_prefix(b).ok())
                    .ok_or_else(|| ClientError::Protocol {
                        cmd,
                        what: format!("{} sub-regions announced, fewer present", h.count),
                    })?;
                let fd = fds
                    .get_mut(sub.fd_index as usize)
                    .and_then(Option::take)
                    .ok_or_else(|| ClientError::Protocol {
                        cmd,
                        what: format!(
                            "sub-region {k} names fd {} (missing or reused)",
                            sub.fd_index
                        ),
                    })?;
                if sub
                    .offset
                    .checked_add(sub.size)
                    .is_none_or(|e| e > self.region(region).map_or(0, |r| r.size))
                    || !matches!(sub.size, 1 | 2 | 4 | 8)
                {
                    return Err(ClientError::Protocol {
                        cmd,
                        what: format!(
                            "ioeventfd {k} at {:#x}+{:#x} is not an access inside region {region}",
                            sub.offset, sub.size
                        ),
                    });
                }
                out.push((sub, fd));
            }
            return Ok(out);
        }
        Err(ClientError::Protocol {
            cmd,
            what: "argsz keeps growing".into(),
        })
    }

    /// The raw socket (for tests that send bytes of their own).
    pub fn raw_fd(&self) -> RawFd {
        self.lock().sock.as_raw_fd()
    }
}
