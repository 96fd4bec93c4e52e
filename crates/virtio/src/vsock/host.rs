//! The device's reactions: to a guest packet, to a host connection, to a `CONNECT` line,
//! to a host stream that can be written again or that closed.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::Ordering;
use std::time::Instant;

use vmm_sys_util::epoll::{ControlOperation, EpollEvent, EventSet};

use super::conn::{self, Conn, LineRead, PendingHost, State};
use super::packet::{HOST_CID, Header, Op, SHUTDOWN_RCV, SHUTDOWN_SEND, TYPE_STREAM};
use super::{Key, MAX_CONNS, Vsock};
use crate::DeviceError;

/// The most connections accepted per readiness of the listener (the rest wait for the next).
const ACCEPT_BATCH: usize = 16;

impl Vsock {
    /// `OP_RST` in answer to a packet no connection can take (never to an RST).
    fn rst_reply(&mut self, h: &Header) {
        if h.op == Op::Rst as u16 {
            return;
        }
        self.ctl.push_back(Header {
            src_cid: HOST_CID,
            dst_cid: self.guest_cid,
            src_port: h.dst_port,
            dst_port: h.src_port,
            type_: TYPE_STREAM,
            op: Op::Rst as u16,
            ..Header::default()
        });
        self.stats.resets.fetch_add(1, Ordering::Relaxed);
    }

    /// A packet from the guest (the caller made room for two control packets).
    pub(super) fn handle_guest(&mut self, h: Header, payload: &[u8]) {
        let op = h.op();
        if h.src_cid != self.guest_cid
            || h.dst_cid != HOST_CID
            || h.type_ != TYPE_STREAM
            || op.is_none()
        {
            tracing::debug!(?h, "vsock: packet with a wrong CID, type or op: reset");
            self.rst_reply(&h);
            return;
        }
        let key: Key = (h.dst_port, h.src_port);
        let Some(op) = op else { return };
        if op == Op::Request {
            self.guest_connect(&h, key);
            return;
        }
        let Some(c) = self.conns.get_mut(&key) else {
            self.rst_reply(&h);
            return;
        };
        c.update_peer(&h);
        match (op, c.state) {
            (Op::Rst, _) => self.remove(key),
            (Op::Response, State::LocalInit) => {
                c.state = State::Established;
                self.stats.connections.fetch_add(1, Ordering::Relaxed);
                let line = format!("OK {}\n", key.0);
                if !self.send_host(key, line.as_bytes(), false) {
                    self.reset_conn(key);
                }
            }
            (Op::Rw, State::Established) if !c.shut_write => {
                if !self.send_host(key, payload, true) {
                    self.reset_conn(key);
                }
            }
            (Op::Shutdown, _) => {
                c.guest_no_rcv |= h.flags & SHUTDOWN_RCV != 0;
                c.shut_write |= h.flags & SHUTDOWN_SEND != 0;
                c.closing = c.guest_no_rcv && c.shut_write;
                // Shut the host's write side now if nothing waits for it.
                if c.flush().is_err() {
                    self.reset_conn(key);
                } else {
                    self.maybe_finish(key);
                }
            }
            (Op::CreditUpdate, _) => {}
            (Op::CreditRequest, _) => self.queue_ctl(key, Op::CreditUpdate, 0),
            // A response to nothing, data before the response or after the guest's shutdown:
            // the guest is confused about this connection.
            (Op::Response | Op::Rw, _) | (Op::Request, _) => self.reset_conn(key),
        }
    }

    /// Guest bytes for the host stream of `key`; `false` when the connection must be reset
    /// (the stream failed, or the guest overran its credit). `counted`: the bytes are
    /// payload (they count in `fwd_cnt`), not the device's own `OK` line.
    fn send_host(&mut self, key: Key, data: &[u8], counted: bool) -> bool {
        let Some(c) = self.conns.get_mut(&key) else {
            return false;
        };
        match c.send_to_host(data, counted) {
            Ok(true) => {}
            Ok(false) => {
                tracing::debug!(port = key.0, "vsock: the guest overran its credit: reset");
                return false;
            }
            Err(e) => {
                tracing::debug!(port = key.0, "vsock: writing to the host stream: {e}");
                return false;
            }
        }
        self.after_write(key)
    }

    /// After bytes went to (or wait for) a host stream: poll it for writability while it
    /// holds bytes, and tell the guest its credit when due. `false`: epoll failed.
    fn after_write(&mut self, key: Key) -> bool {
        let Some(c) = self.conns.get_mut(&key) else {
            return true;
        };
        let fd = c.stream.as_raw_fd();
        let want = !c.tx_buf.is_empty();
        if want != c.out_polled {
            let r = if want {
                let ev = EpollEvent::new(EventSet::OUT, fd as u32 as u64);
                self.out_epoll.ctl(ControlOperation::Add, fd, ev)
            } else {
                self.out_epoll
                    .ctl(ControlOperation::Delete, fd, EpollEvent::default())
            };
            if let Err(e) = r {
                tracing::warn!("vsock: epoll_ctl on a host stream: {e}");
                return false;
            }
            c.out_polled = want;
        }
        if c.credit_update_due() && self.ctl_room(1) {
            self.queue_ctl(key, Op::CreditUpdate, 0);
        }
        true
    }

    /// The guest's `OP_REQUEST` to host port `key.0`: connect to `<uds_path>_<port>`.
    fn guest_connect(&mut self, h: &Header, key: Key) {
        if self.conns.contains_key(&key) {
            tracing::debug!(?key, "vsock: a request on a connection that exists: reset");
            self.reset_conn(key);
            return;
        }
        if self.conns.len() + self.pending.len() >= MAX_CONNS {
            self.stats.refused.fetch_add(1, Ordering::Relaxed);
            self.rst_reply(h);
            return;
        }
        let mut path = self.uds_path.as_os_str().to_owned();
        path.push(format!("_{}", key.0));
        let stream = match conn::connect_nonblocking(path.as_ref()) {
            Ok(s) => s,
            Err(e) => {
                tracing::debug!(path = ?path, "vsock: guest connect refused: {e}");
                self.stats.refused.fetch_add(1, Ordering::Relaxed);
                self.rst_reply(h);
                return;
            }
        };
        self.by_fd.insert(stream.as_raw_fd(), key);
        let mut c = Conn::new(stream, State::Established);
        c.update_peer(h);
        self.conns.insert(key, c);
        self.stats.connections.fetch_add(1, Ordering::Relaxed);
        self.queue_ctl(key, Op::Response, 0);
    }

    /// The listener is readable: accept host streams.
    pub(super) fn accept(&mut self) {
        for _ in 0..ACCEPT_BATCH {
            let stream = match self.listener.accept() {
                Ok((s, _)) => s,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::Interrupted | io::ErrorKind::ConnectionAborted
                    ) =>
                {
                    continue;
                }
                Err(e) => {
                    // Out of fds, most likely: stop polling the listener until a connection
                    // goes away, rather than spin on it.
                    tracing::warn!("vsock: accept on {}: {e}", self.uds_path.display());
                    self.listener_paused = true;
                    return;
                }
            };
            if self.conns.len() + self.pending.len() >= MAX_CONNS {
                self.evict_slow_lines();
            }
            if self.conns.len() + self.pending.len() >= MAX_CONNS {
                self.stats.refused.fetch_add(1, Ordering::Relaxed);
                continue; // dropped: closed at once
            }
            if let Err(e) = stream.set_nonblocking(true) {
                tracing::warn!("vsock: making a host stream non-blocking: {e}");
                continue;
            }
            self.pending.insert(
                stream.as_raw_fd(),
                PendingHost {
                    stream,
                    line: Vec::new(),
                    since: Instant::now(),
                },
            );
        }
    }

    /// Close the host streams that have not sent their `CONNECT` line within the deadline
    /// (done when the connections are all taken: they hold slots others could use).
    fn evict_slow_lines(&mut self) {
        let now = Instant::now();
        let slow: Vec<RawFd> = self
            .pending
            .iter()
            .filter(|(_, p)| now.duration_since(p.since) >= self.line_deadline)
            .map(|(fd, _)| *fd)
            .collect();
        for fd in slow {
            if let Some(p) = self.pending.remove(&fd) {
                tracing::debug!("vsock: host stream closed: no CONNECT line in time");
                self.stats.refused.fetch_add(1, Ordering::Relaxed);
                let _ = p.stream.shutdown(std::net::Shutdown::Both);
                self.graveyard.get_mut().push(p.stream);
            }
        }
    }

    /// A host stream that has not finished its `CONNECT` line is readable.
    pub(super) fn connect_line(&mut self, fd: RawFd) {
        if !self.ctl_room(1) {
            return; // polled again once the guest took some control packets
        }
        let Some(p) = self.pending.get_mut(&fd) else {
            return;
        };
        let port = match p.read_line() {
            LineRead::More => return,
            LineRead::Port(port) => port,
            LineRead::Bad(why) => {
                tracing::debug!("vsock: host stream closed: {why}");
                self.stats.refused.fetch_add(1, Ordering::Relaxed);
                if let Some(p) = self.pending.remove(&fd) {
                    let _ = p.stream.shutdown(std::net::Shutdown::Both);
                    self.graveyard.get_mut().push(p.stream);
                }
                return;
            }
        };
        let Some(p) = self.pending.remove(&fd) else {
            return;
        };
        let local = self.ephemeral_port(port);
        let key = (local, port);
        self.by_fd.insert(fd, key);
        self.conns
            .insert(key, Conn::new(p.stream, State::LocalInit));
        self.queue_ctl(key, Op::Request, 0);
    }

    /// A local port no connection to guest port `peer` uses, from 2^30 up.
    fn ephemeral_port(&mut self, peer: u32) -> u32 {
        loop {
            let p = self.next_port;
            // u32::MAX is VMADDR_PORT_ANY: never a port.
            self.next_port = match self.next_port.wrapping_add(1) {
                u32::MAX => super::FIRST_LOCAL_PORT,
                n => n,
            };
            if !self.conns.contains_key(&(p, peer)) {
                return p;
            }
        }
    }

    /// The writability epoll is readable: write out what host streams hold (and end the
    /// connections that waited for that).
    pub(super) fn writable(&mut self) -> Result<(), DeviceError> {
        let mut events = vec![EpollEvent::default(); 32];
        let n = match self.out_epoll.wait(0, &mut events) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => 0,
            Err(source) => {
                return Err(DeviceError::Backend {
                    what: "vsock writability epoll".into(),
                    source,
                });
            }
        };
        for ev in &events[..n] {
            if !self.ctl_room(2) {
                break; // the rest stay ready in the epoll
            }
            let fd = ev.data() as u32 as RawFd;
            let Some(key) = self.by_fd.get(&fd).copied() else {
                continue;
            };
            let Some(c) = self.conns.get_mut(&key) else {
                continue;
            };
            let ok = match c.flush() {
                Ok(_) => {
                    let ok = self.after_write(key);
                    if ok {
                        self.maybe_finish(key);
                    }
                    ok
                }
                Err(e) => {
                    tracing::debug!(port = key.0, "vsock: writing to the host stream: {e}");
                    false
                }
            };
            if !ok {
                if self.ctl_room(1) {
                    self.reset_conn(key);
                } else {
                    self.remove(key);
                }
            }
        }
        Ok(())
    }

    /// The host stream of `key` ended (EOF) or failed. At EOF the guest hears
    /// `OP_SHUTDOWN` (send flag: the host may still read, a half-close); on an error, RST.
    pub(super) fn host_closed(&mut self, key: Key, err: Option<io::Error>) {
        match err {
            None => {
                let Some(c) = self.conns.get_mut(&key) else {
                    return;
                };
                c.host_eof = true;
                if c.shut_write && c.tx_buf.is_empty() {
                    self.maybe_finish(key); // both ways done: SHUTDOWN with both flags
                } else {
                    self.queue_ctl(key, Op::Shutdown, SHUTDOWN_SEND);
                }
            }
            Some(e) => {
                tracing::debug!(port = key.0, "vsock: reading the host stream: {e}");
                self.reset_conn(key);
            }
        }
    }

    /// End connection `key` if both sides are done with it and no guest bytes wait for
    /// the host: the guest shut both ways (answer `OP_RST`), or the guest shut its sending
    /// side and the host stream ended (`OP_SHUTDOWN` with both flags). The caller made
    /// room for one control packet.
    pub(super) fn maybe_finish(&mut self, key: Key) {
        let Some(c) = self.conns.get(&key) else {
            return;
        };
        if !c.tx_buf.is_empty() {
            return;
        }
        if c.closing {
            self.reset_conn(key);
        } else if c.host_eof && c.shut_write {
            self.queue_ctl(key, Op::Shutdown, SHUTDOWN_RCV | SHUTDOWN_SEND);
            self.remove(key);
        }
    }
}
