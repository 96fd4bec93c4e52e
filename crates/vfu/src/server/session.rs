//! One client connection: version negotiation, command handling, replies, and the
//! server-initiated `DMA_READ` / `DMA_WRITE` requests with their replies.

use std::collections::{HashMap, VecDeque};
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::{Mutex, mpsc};
use std::thread::ThreadId;
use std::time::Duration;

use vmm_sys_util::eventfd::EventFd;
use zerocopy::{FromBytes, IntoBytes};

use super::{DeviceContext, DeviceError, DmaError, DmaNotice, IoEventSpec, NUM_IRQS, lock};
use crate::proto::*;
use crate::sock::{self, Assembler, Message, RecvError};

/// Per-connection state.
pub(crate) struct Session {
    pub(crate) id: u64,
    pub(crate) sock: UnixStream,
    pub(crate) dev: DeviceContext,
    send_lock: Mutex<()>,
    state: Mutex<State>,
    pending: Mutex<HashMap<u16, mpsc::Sender<Message>>>,
    next_id: AtomicU16,
    serving: Mutex<Option<ThreadId>>,
    /// The message being received (the socket is non-blocking).
    reader: Mutex<Assembler>,
    /// ioeventfds handed out by GET_REGION_IO_FDS, for the server loop to watch.
    pub(crate) new_ioevents: Mutex<Vec<(EventFd, IoEventSpec)>>,
}

struct State {
    negotiated: bool,
    client: Caps,
    backlog: VecDeque<Message>,
}

/// Our capabilities.
pub(crate) fn server_caps() -> Caps {
    Caps {
        max_msg_fds: 16,
        max_data_xfer_size: DEFAULT_MAX_DATA_XFER,
        pgsizes: 4096,
        max_dma_maps: super::DmaTable::MAX_MAPS as u32,
        migration: Some(MigrationCaps {
            pgsize: 4096,
            max_bitmap_size: 256 << 10,
        }),
    }
}

/// Largest message accepted from a client.
pub(crate) fn max_in() -> u32 {
    DEFAULT_MAX_DATA_XFER + MSG_OVERHEAD
}

/// What handling a message led to.
pub(crate) enum Outcome {
    /// Keep serving.
    Continue,
    /// Drop the connection (with the reason, for the log).
    Close(String),
}

const DMA_TIMEOUT: Duration = Duration::from_secs(5);

impl Session {
    pub(crate) fn new(id: u64, sock: UnixStream, dev: DeviceContext) -> Session {
        Session {
            id,
            sock,
            dev,
            send_lock: Mutex::new(()),
            state: Mutex::new(State {
                negotiated: false,
                client: Caps::default(),
                backlog: VecDeque::new(),
            }),
            pending: Mutex::new(HashMap::new()),
            next_id: AtomicU16::new(0x8000),
            serving: Mutex::new(None),
            reader: Mutex::new(Assembler::new()),
            new_ioevents: Mutex::new(Vec::new()),
        }
    }

    /// Whether the client has hung up (closed or shut down its end).
    pub(crate) fn hung_up(&self) -> bool {
        let mut p = libc::pollfd {
            fd: self.sock.as_raw_fd(),
            events: libc::POLLRDHUP,
            revents: 0,
        };
        // SAFETY: one valid pollfd, no wait.
        let n = unsafe { libc::poll(&mut p, 1, 0) };
        n > 0 && p.revents & (libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR) != 0
    }

    fn send(&self, parts: &[&[u8]], fds: &[RawFd]) -> std::io::Result<()> {
        let _g = lock(&self.send_lock);
        sock::send(&self.sock, parts, fds)
    }

    /// Serve one message (a backlogged one first). Called when the socket is readable.
    pub(crate) fn serve_one(&self) -> Outcome {
        *lock(&self.serving) = Some(std::thread::current().id());
        let out = self.serve_inner();
        *lock(&self.serving) = None;
        out
    }

    fn serve_inner(&self) -> Outcome {
        let msg = match lock(&self.state).backlog.pop_front() {
            Some(m) => m,
            None => match lock(&self.reader).poll(&self.sock, max_in()) {
                Ok(Some(m)) => m,
                // Nothing more for now (perhaps half a message): serve the others meanwhile.
                Ok(None) | Err(RecvError::Idle) => return Outcome::Continue,
                Err(RecvError::Closed) => return Outcome::Close("client closed".into()),
                Err(RecvError::Header(e)) => {
                    // The stream cannot be resynchronised; say why, then drop it.
                    let errno = e.errno();
                    let h = Header::default().error_reply(errno);
                    let _ = self.send(&[h.as_bytes()], &[]);
                    return Outcome::Close(format!("bad header: {e}"));
                }
                Err(e) => return Outcome::Close(e.to_string()),
            },
        };
        if msg.header.is_reply() {
            self.dispatch_reply(msg);
            return Outcome::Continue;
        }
        self.handle(msg)
    }

    fn dispatch_reply(&self, msg: Message) {
        if let Some(tx) = lock(&self.pending).remove(&msg.header.msg_id) {
            let _ = tx.send(msg);
        }
        // A reply nobody waits for (late, or made up by the client) is dropped.
    }

    /// Wait while `busy()` holds, up to `deadline`. On the thread that reads this socket (a
    /// device callback run for one of this client's commands), keep reading it meanwhile:
    /// replies to the device's own DMA requests are handed to their waiters (its other
    /// threads may be waiting on them), commands are kept for later. Elsewhere: just wait.
    /// Returns whether `busy()` ended in time.
    pub(crate) fn pump_while(&self, busy: &dyn Fn() -> bool, deadline: std::time::Instant) -> bool {
        let inline = *lock(&self.serving) == Some(std::thread::current().id());
        while busy() {
            let now = std::time::Instant::now();
            if now >= deadline {
                return false;
            }
            if !inline {
                std::thread::sleep(std::time::Duration::from_micros(100));
                continue;
            }
            match lock(&self.reader).poll(&self.sock, max_in()) {
                Ok(Some(m)) if m.header.is_reply() => self.dispatch_reply(m),
                Ok(Some(m)) => lock(&self.state).backlog.push_back(m),
                Ok(None) | Err(RecvError::Idle) => {
                    let wait = (deadline - now).min(std::time::Duration::from_millis(1));
                    if sock::wait_for(self.sock.as_raw_fd(), libc::POLLIN, wait).is_err() {
                        std::thread::sleep(std::time::Duration::from_micros(100));
                    }
                }
                Err(_) => std::thread::sleep(std::time::Duration::from_micros(100)),
            }
        }
        true
    }

    /// The connection is gone: fail the DMA requests waiting for replies on it now, rather
    /// than when their timeout expires.
    pub(crate) fn fail_pending(&self) {
        lock(&self.pending).clear();
    }

    pub(crate) fn has_backlog(&self) -> bool {
        !lock(&self.state).backlog.is_empty()
    }

    fn handle(&self, msg: Message) -> Outcome {
        let h = msg.header;
        let negotiated = lock(&self.state).negotiated;
        // What a request may carry is bounded by what this server advertised; the client's
        // own max_data_xfer_size bounds what we send it (DMA messages).
        let max_data = server_caps().max_data_xfer_size;
        let req = parse_request(&h, &msg.payload, msg.fds.len(), max_data);
        let result = match req {
            Err(e) => Err(DeviceError {
                errno: e.errno(),
                msg: e.to_string(),
            }),
            Ok(Request::Version { major, minor, caps }) => {
                if negotiated {
                    Err(DeviceError::invalid("VERSION sent twice"))
                } else if major != VERSION_MAJOR {
                    let e = DeviceError {
                        errno: libc::ENOTSUP,
                        msg: format!(
                            "client speaks vfio-user {major}.{minor}, this server {VERSION_MAJOR}.{VERSION_MINOR}"
                        ),
                    };
                    let _ = self.send(&[h.error_reply(e.errno).as_bytes()], &[]);
                    return Outcome::Close(e.msg);
                } else if !self.dev.claim(self.id) {
                    // One client per device: the second is refused until the first goes.
                    let e = DeviceError {
                        errno: libc::EBUSY,
                        msg: format!("{} is in use by another client", self.dev.name()),
                    };
                    let _ = self.send(&[h.error_reply(e.errno).as_bytes()], &[]);
                    return Outcome::Close(e.msg);
                } else {
                    {
                        let mut st = lock(&self.state);
                        st.negotiated = true;
                        st.client = caps;
                    }
                    let mut p = VERSION_MAJOR.to_ne_bytes().to_vec();
                    p.extend(minor.min(VERSION_MINOR).to_ne_bytes());
                    p.extend(server_caps().to_json());
                    Ok((p, Vec::new()))
                }
            }
            Ok(_) if !negotiated => Err(DeviceError::invalid("the first message must be VERSION")),
            Ok(_) if !self.dev.owned_by(self.id) => {
                // Another client took the device over after this one hung up.
                return Outcome::Close("the device has another client now".into());
            }
            Ok(r) => self.command(r, msg.fds),
        };
        if h.no_reply() {
            return Outcome::Continue;
        }
        let sent = match result {
            Ok((payload, fds)) => {
                let rh = h.reply(HEADER_SIZE + payload.len());
                let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
                self.send(&[rh.as_bytes(), &payload], &raw)
            }
            Err(e) => self.send(&[h.error_reply(e.errno).as_bytes()], &[]),
        };
        match sent {
            Ok(()) => Outcome::Continue,
            Err(e) => Outcome::Close(format!("reply failed: {e}")),
        }
    }

    fn command(
        &self,
        req: Request,
        fds: Vec<OwnedFd>,
    ) -> Result<(Vec<u8>, Vec<OwnedFd>), DeviceError> {
        let dev = &self.dev;
        let none = |p: Vec<u8>| Ok((p, Vec::new()));
        match req {
            Request::Version { .. } => unreachable!("handled by the caller"),
            Request::DmaMap(m) => {
                let fd = fds.into_iter().next().map(|f| (f, m.offset));
                let weak = self.self_weak();
                dev.0
                    .dma
                    .write()
                    .unwrap_or_else(|e| e.into_inner())
                    .map(m.address, m.size, m.flags, fd, self.id, weak)
                    .map_err(|e| DeviceError {
                        errno: e.errno(),
                        msg: e.to_string(),
                    })?;
                dev.0.ops.dma_notice(
                    dev,
                    DmaNotice::Mapped {
                        address: m.address,
                        size: m.size,
                    },
                );
                none(Vec::new())
            }
            Request::DmaUnmap(u) => {
                if u.flags & DMA_UNMAP_GET_DIRTY_BITMAP != 0 {
                    return Err(DeviceError {
                        errno: libc::ENOTSUP,
                        msg: "dirty bitmaps are not offered".into(),
                    });
                }
                let gone = {
                    let mut t = dev.0.dma.write().unwrap_or_else(|e| e.into_inner());
                    if u.flags & DMA_UNMAP_ALL != 0 {
                        // This session's mappings only (another session's are not its to drop).
                        t.unmap_all(Some(self.id))
                    } else {
                        t.unmap(u.address, u.size, self.id)
                            .map_err(|e| DeviceError {
                                errno: e.errno(),
                                msg: e.to_string(),
                            })?;
                        vec![(u.address, u.size)]
                    }
                };
                for (address, size) in gone {
                    dev.0
                        .ops
                        .dma_notice(dev, DmaNotice::Unmapped { address, size });
                }
                let r = DmaUnmap {
                    argsz: std::mem::size_of::<DmaUnmap>() as u32,
                    ..u
                };
                none(r.as_bytes().to_vec())
            }
            Request::DeviceGetInfo { argsz } => {
                if (argsz as usize) < std::mem::size_of::<DeviceInfo>() {
                    return Err(DeviceError::invalid(format!("argsz {argsz} < 16")));
                }
                let i = DeviceInfo {
                    argsz: std::mem::size_of::<DeviceInfo>() as u32,
                    flags: DEVICE_FLAGS_PCI | DEVICE_FLAGS_RESET,
                    num_regions: PCI_NUM_REGIONS,
                    num_irqs: NUM_IRQS,
                };
                none(i.as_bytes().to_vec())
            }
            Request::RegionInfo { argsz, index } => self.region_info(argsz, index),
            Request::RegionIoFds { argsz, index } => self.region_io_fds(argsz, index),
            Request::IrqInfo { index } => {
                let count = dev
                    .irq_count(index)
                    .ok_or_else(|| DeviceError::invalid(format!("IRQ index {index}")))?;
                let i = IrqInfo {
                    argsz: std::mem::size_of::<IrqInfo>() as u32,
                    flags: DeviceContext::irq_flags(index),
                    index,
                    count,
                };
                none(i.as_bytes().to_vec())
            }
            Request::SetIrqs { set, data } => {
                let count = dev
                    .irq_count(set.index)
                    .ok_or_else(|| DeviceError::invalid(format!("IRQ index {}", set.index)))?;
                let action = set.flags
                    & (IRQ_SET_ACTION_MASK | IRQ_SET_ACTION_UNMASK | IRQ_SET_ACTION_TRIGGER);
                if set.flags & IRQ_SET_DATA_EVENTFD != 0 {
                    if action != IRQ_SET_ACTION_TRIGGER {
                        return Err(DeviceError {
                            errno: libc::ENOTSUP,
                            msg: "eventfds for mask/unmask are not supported".into(),
                        });
                    }
                    if u64::from(set.start) + u64::from(set.count) > u64::from(count) {
                        return Err(DeviceError::invalid(format!(
                            "vectors {}+{} beyond the {count} of IRQ index {}",
                            set.start, set.count, set.index
                        )));
                    }
                    let efds = fds
                        .into_iter()
                        // SAFETY: each fd came from the client over SCM_RIGHTS and is ours
                        // alone; EventFd takes ownership. A non-eventfd fd only makes writes
                        // fail, which is the client's problem.
                        .map(|f| Some(unsafe { EventFd::from_raw_fd(f.into_raw_fd()) }))
                        .collect();
                    dev.set_irq_fds(set.index, set.start, efds, self.id)?;
                } else if set.flags & IRQ_SET_DATA_NONE != 0
                    && action == IRQ_SET_ACTION_TRIGGER
                    && set.count == 0
                {
                    dev.clear_irq_fds(set.index);
                } else {
                    let bools = (set.flags & IRQ_SET_DATA_BOOL != 0).then_some(&data[..]);
                    dev.irq_action(set.index, set.start, set.count, action, bools)?;
                }
                none(Vec::new())
            }
            Request::RegionRead(a) => {
                let mut data = vec![0u8; a.count as usize];
                dev.region_access(a.region, a.offset, &mut data, false)?;
                let mut p = a.as_bytes().to_vec();
                p.extend(data);
                none(p)
            }
            Request::RegionWrite { access, mut data } => {
                dev.region_access(access.region, access.offset, &mut data, true)?;
                none(access.as_bytes().to_vec())
            }
            Request::DeviceReset => {
                dev.reset()?;
                none(Vec::new())
            }
            Request::DeviceFeature { feature, data } => self.feature(feature, &data),
            Request::MigDataRead { size } => {
                let d = dev.mig_data_read(size as usize)?;
                let m = MigData {
                    argsz: (8 + d.len()) as u32,
                    size: d.len() as u32,
                };
                let mut p = m.as_bytes().to_vec();
                p.extend(d);
                // Padded to the size asked, as libvfio-user replies (its client reads exactly
                // that much); `size` says how much is data.
                p.resize(8 + size as usize, 0);
                none(p)
            }
            Request::MigDataWrite { data } => {
                let taken = dev.mig_data_write(&data)?;
                let m = MigData {
                    argsz: 8,
                    size: taken as u32,
                };
                none(m.as_bytes().to_vec())
            }
        }
    }

    fn self_weak(&self) -> std::sync::Weak<Session> {
        lock(&SESSIONS).get(&self.id).cloned().unwrap_or_default()
    }

    fn region_info(&self, argsz: u32, index: u32) -> Result<(Vec<u8>, Vec<OwnedFd>), DeviceError> {
        if index >= PCI_NUM_REGIONS {
            return Err(DeviceError::invalid(format!("region {index}")));
        }
        let base = std::mem::size_of::<RegionInfo>();
        if (argsz as usize) < base {
            return Err(DeviceError::invalid(format!("argsz {argsz} < {base}")));
        }
        let mut info = RegionInfo {
            argsz: base as u32,
            index,
            ..Default::default()
        };
        let mut fds = Vec::new();
        let mut caps = Vec::new();
        if index == PCI_CONFIG_REGION {
            info.flags = REGION_READ | REGION_WRITE;
            info.size = self.dev.config_bytes().len() as u64;
        } else if let Some(Some(b)) = self.dev.0.bars.get(index as usize) {
            info.flags = REGION_READ | REGION_WRITE;
            info.size = b.spec.bar.size;
            if let Some(mem) = &b.memory {
                info.flags |= REGION_MMAP | REGION_CAPS;
                caps = sparse_mmap_cap(&b.spec.mmap_areas);
                info.cap_offset = base as u32;
                info.argsz = (base + caps.len()) as u32;
                let dup = mem.fd().try_clone().map_err(|e| DeviceError {
                    errno: e.raw_os_error().unwrap_or(libc::EIO),
                    msg: format!("dup of the BAR memfd: {e}"),
                })?;
                fds.push(dup);
            }
        }
        let mut p = info.as_bytes().to_vec();
        if argsz >= info.argsz {
            p.extend(caps);
        } else {
            // Too small for the capabilities: the client learns the size it needs from
            // argsz and asks again; say there are none in this reply, and send no fd (as
            // libvfio-user does: its client receives this reply with no room for fds).
            let mut short = info;
            short.cap_offset = 0;
            p = short.as_bytes().to_vec();
            fds.clear();
        }
        Ok((p, fds))
    }

    fn region_io_fds(
        &self,
        argsz: u32,
        index: u32,
    ) -> Result<(Vec<u8>, Vec<OwnedFd>), DeviceError> {
        let specs: Vec<IoEventSpec> = self
            .dev
            .0
            .ioevents
            .iter()
            .filter(|s| s.bar == index)
            .copied()
            .collect();
        if index >= PCI_NUM_REGIONS {
            return Err(DeviceError::invalid(format!("region {index}")));
        }
        let need = 16 + 40 * specs.len();
        let mut hdr = RegionIoFds {
            argsz: need as u32,
            flags: 0,
            index,
            count: specs.len() as u32,
        };
        if (argsz as usize) < need {
            hdr.count = 0;
            return Ok((hdr.as_bytes().to_vec(), Vec::new()));
        }
        let mut p = hdr.as_bytes().to_vec();
        let mut fds = Vec::new();
        let mut watch = Vec::new();
        for (i, s) in specs.iter().enumerate() {
            let efd =
                EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC).map_err(|e| DeviceError {
                    errno: e.raw_os_error().unwrap_or(libc::EIO),
                    msg: format!("eventfd: {e}"),
                })?;
            let dup = efd.try_clone().map_err(|e| DeviceError {
                errno: e.raw_os_error().unwrap_or(libc::EIO),
                msg: format!("eventfd dup: {e}"),
            })?;
            // SAFETY: `dup` is a fresh descriptor we own; OwnedFd takes it over.
            fds.push(unsafe { OwnedFd::from_raw_fd(dup.into_raw_fd()) });
            let sub = SubRegionIoEventFd {
                offset: s.offset,
                size: s.size,
                fd_index: i as u32,
                kind: 0,
                flags: u32::from(s.datamatch.is_some()),
                padding: 0,
                datamatch: s.datamatch.unwrap_or(0),
            };
            p.extend(sub.as_bytes());
            watch.push((efd, *s));
        }
        lock(&self.new_ioevents).extend(watch);
        Ok((p, fds))
    }

    fn feature(
        &self,
        f: DeviceFeature,
        data: &[u8],
    ) -> Result<(Vec<u8>, Vec<OwnedFd>), DeviceError> {
        let feature = f.flags & FEATURE_MASK;
        let supported = matches!(
            feature,
            FEATURE_MIGRATION
                | FEATURE_MIG_DEVICE_STATE
                | FEATURE_DMA_LOGGING_START
                | FEATURE_DMA_LOGGING_STOP
                | FEATURE_DMA_LOGGING_REPORT
        );
        if !supported {
            return Err(DeviceError {
                errno: libc::ENOTSUP,
                msg: format!("device feature {feature}"),
            });
        }
        let reply = |body: &[u8]| {
            let h = DeviceFeature {
                argsz: (8 + body.len()) as u32,
                flags: f.flags,
            };
            let mut p = h.as_bytes().to_vec();
            p.extend_from_slice(body);
            Ok((p, Vec::new()))
        };
        if f.flags & FEATURE_PROBE != 0 {
            let set = f.flags & FEATURE_SET != 0;
            let get = f.flags & FEATURE_GET != 0;
            let ok = match feature {
                FEATURE_MIGRATION | FEATURE_DMA_LOGGING_REPORT => !set,
                FEATURE_DMA_LOGGING_START | FEATURE_DMA_LOGGING_STOP => !get,
                _ => true,
            };
            if !ok {
                return Err(DeviceError::invalid(format!(
                    "device feature {feature} does not take that direction"
                )));
            }
            return reply(&[]);
        }
        match (feature, f.flags & FEATURE_SET != 0) {
            (FEATURE_MIGRATION, false) => {
                reply(&(MIGRATION_STOP_COPY | MIGRATION_PRE_COPY).to_ne_bytes())
            }
            (FEATURE_MIGRATION, true) => Err(DeviceError::invalid("migration is get-only")),
            (FEATURE_DMA_LOGGING_START, true) => {
                let page = data
                    .get(..8)
                    .map(|b| u64::from_ne_bytes(b.try_into().expect("8 bytes")))
                    .ok_or_else(|| DeviceError::invalid("DMA_LOGGING_START without a page size"))?;
                let ranges = data
                    .get(8..12)
                    .map(|b| u32::from_ne_bytes(b.try_into().expect("4 bytes")))
                    .ok_or_else(|| DeviceError::invalid("DMA_LOGGING_START without num_ranges"))?;
                if !page.is_power_of_two() || page < 512 {
                    return Err(DeviceError::invalid(format!("logging page size {page}")));
                }
                // Ranges (16 bytes each) may narrow what is logged; logging all the mapped
                // memory is a superset, which is what the report may return.
                if data.len() < 16 + 16 * ranges as usize {
                    return Err(DeviceError::invalid(format!(
                        "DMA_LOGGING_START: {ranges} ranges announced, {} bytes sent",
                        data.len()
                    )));
                }
                self.dev
                    .0
                    .dma
                    .write()
                    .unwrap_or_else(|e| e.into_inner())
                    .log_start(page)
                    .map_err(|e| DeviceError {
                        errno: e.errno(),
                        msg: e.to_string(),
                    })?;
                // The reply echoes the request, as libvfio-user's does (its client expects
                // the same size back).
                reply(data)
            }
            (FEATURE_DMA_LOGGING_STOP, true) => {
                self.dev
                    .0
                    .dma
                    .write()
                    .unwrap_or_else(|e| e.into_inner())
                    .log_stop();
                reply(data)
            }
            (FEATURE_DMA_LOGGING_REPORT, false) => {
                let word = |i: usize| {
                    data.get(i * 8..i * 8 + 8)
                        .map(|b| u64::from_ne_bytes(b.try_into().expect("8 bytes")))
                        .ok_or_else(|| DeviceError::invalid("DMA_LOGGING_REPORT: short request"))
                };
                let (iova, length, page) = (word(0)?, word(1)?, word(2)?);
                let bitmap = self
                    .dev
                    .0
                    .dma
                    .read()
                    .unwrap_or_else(|e| e.into_inner())
                    .log_report(iova, length, page)
                    .map_err(|e| DeviceError {
                        errno: e.errno(),
                        msg: e.to_string(),
                    })?;
                let mut body = data[..24].to_vec();
                body.extend(bitmap);
                reply(&body)
            }
            (FEATURE_DMA_LOGGING_START | FEATURE_DMA_LOGGING_STOP, false)
            | (FEATURE_DMA_LOGGING_REPORT, true) => Err(DeviceError::invalid(format!(
                "device feature {feature} does not take that direction"
            ))),
            (_, false) => {
                let mut b = (self.dev.migration_state() as u32).to_ne_bytes().to_vec();
                b.extend(u32::MAX.to_ne_bytes());
                reply(&b)
            }
            (_, true) => {
                let raw = data
                    .get(..4)
                    .map(|b| u32::from_ne_bytes(b.try_into().expect("4 bytes")))
                    .ok_or_else(|| DeviceError::invalid("MIG_DEVICE_STATE without a state"))?;
                let to = MigState::from_u32(raw)
                    .ok_or_else(|| DeviceError::invalid(format!("device state {raw}")))?;
                self.dev.set_migration_state(to)?;
                let mut b = (to as u32).to_ne_bytes().to_vec();
                b.extend(u32::MAX.to_ne_bytes());
                reply(&b)
            }
        }
    }

    // ---- server-initiated DMA ----

    fn client_max_data(&self) -> usize {
        // The client's limit on DMA messages it receives (libvfio-user's sample client says
        // 1 KiB and counts the messages).
        lock(&self.state)
            .client
            .max_data_xfer_size
            .clamp(1, DEFAULT_MAX_DATA_XFER) as usize
    }

    fn request(&self, cmd: Command, body: &[u8], data: &[u8]) -> Result<Message, DmaError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed) | 0x8000;
        let h = Header::command(id, cmd, HEADER_SIZE + body.len() + data.len());
        let (tx, rx) = mpsc::channel();
        lock(&self.pending).insert(id, tx);
        let fail = |e: String| {
            lock(&self.pending).remove(&id);
            DmaError::Message(e)
        };
        self.send(&[h.as_bytes(), body, data], &[])
            .map_err(|e| fail(format!("send {cmd:?}: {e}")))?;
        let inline = *lock(&self.serving) == Some(std::thread::current().id());
        let reply = if inline {
            // We are the thread that reads this socket: read until our reply, keeping any
            // commands that arrive meanwhile for later.
            let deadline = std::time::Instant::now() + DMA_TIMEOUT;
            loop {
                let got = lock(&self.reader).poll(&self.sock, max_in());
                match got {
                    Ok(Some(m)) if m.header.is_reply() && m.header.msg_id == id => {
                        lock(&self.pending).remove(&id);
                        break m;
                    }
                    Ok(Some(m)) if m.header.is_reply() => self.dispatch_reply(m),
                    Ok(Some(m)) => lock(&self.state).backlog.push_back(m),
                    Ok(None) | Err(RecvError::Idle) => {
                        let left = deadline.saturating_duration_since(std::time::Instant::now());
                        let ready = sock::wait_for(self.sock.as_raw_fd(), libc::POLLIN, left)
                            .map_err(|e| fail(format!("waiting for {cmd:?} reply: {e}")))?;
                        if !ready {
                            return Err(fail(format!(
                                "no reply to {cmd:?} within {DMA_TIMEOUT:?}"
                            )));
                        }
                    }
                    Err(e) => return Err(fail(format!("waiting for {cmd:?} reply: {e}"))),
                }
            }
        } else {
            rx.recv_timeout(DMA_TIMEOUT)
                .map_err(|e| fail(format!("no reply to {cmd:?}: {e}")))?
        };
        if reply.header.is_error() {
            return Err(DmaError::Message(format!(
                "client refused {cmd:?}: errno {}",
                reply.header.error
            )));
        }
        Ok(reply)
    }

    pub(crate) fn dma_read(&self, address: u64, dst: &mut [u8]) -> Result<(), DmaError> {
        let chunk = self.client_max_data();
        let mut done = 0;
        while done < dst.len() {
            let n = (dst.len() - done).min(chunk);
            let a = DmaAccess {
                address: address + done as u64,
                count: n as u64,
            };
            let r = self.request(Command::DmaRead, a.as_bytes(), &[])?;
            let (got, rest) = DmaAccess::read_from_prefix(&r.payload)
                .map_err(|_| DmaError::Message("short DMA_READ reply".into()))?;
            if got.count != n as u64 || rest.len() != n {
                return Err(DmaError::Message(format!(
                    "DMA_READ reply has {} bytes, asked {n}",
                    rest.len()
                )));
            }
            dst[done..done + n].copy_from_slice(rest);
            done += n;
        }
        Ok(())
    }

    pub(crate) fn dma_write(&self, address: u64, src: &[u8]) -> Result<(), DmaError> {
        let chunk = self.client_max_data();
        let mut done = 0;
        while done < src.len() {
            let n = (src.len() - done).min(chunk);
            let a = DmaAccess {
                address: address + done as u64,
                count: n as u64,
            };
            self.request(Command::DmaWrite, a.as_bytes(), &src[done..done + n])?;
            done += n;
        }
        Ok(())
    }
}

/// Live sessions by id (weak), so a DMA mapping can name the session that serves it.
pub(crate) static SESSIONS: std::sync::LazyLock<Mutex<HashMap<u64, std::sync::Weak<Session>>>> =
    std::sync::LazyLock::new(|| Mutex::new(HashMap::new()));

#[allow(dead_code)]
fn _assert_send_sync() {
    fn ok<T: Send + Sync>() {}
    ok::<Session>();
}
