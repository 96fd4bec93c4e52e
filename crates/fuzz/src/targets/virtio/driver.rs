//! A driver that writes `virtio_guest` inputs: it lays out rings and buffers in the guest
//! memory image and records the register accesses, notifies and host actions a virtio
//! driver makes, in the input layout of [`super`]. The seed generator and the tests use it.
//!
//! Layout in guest memory: queue `q`'s descriptor table at [`ring`]`(q)`, its available
//! ring 0x100 after it and its used ring 0x200 after it; buffers from [`DATA`] up.

use virtio::mmio::{F_EVENT_IDX, F_VERSION_1, reg, status};

use super::{Kind, MEM, OP_LEN, op};

/// Where queue `q`'s descriptor table is.
pub fn ring(q: usize) -> u64 {
    0x400 * q as u64
}

/// Where queue `q`'s available ring is.
pub fn avail(q: usize) -> u64 {
    ring(q) + 0x100
}

/// Where queue `q`'s used ring is.
pub fn used(q: usize) -> u64 {
    ring(q) + 0x200
}

/// The first address free for buffers.
pub const DATA: u64 = 0xc00;

/// A buffer of a chain: (address, length, device-writable).
pub type Buf = (u64, u32, bool);

/// An input under construction. Everything [`add`](Input::add) lays out goes into the
/// memory image the input starts with, so a session must not reuse a descriptor (at most
/// [`qsize`](Input::qsize) descriptors per queue); [`publish`](Input::publish) and
/// [`poke`](Input::poke) are guest stores during the session.
#[derive(Debug, Clone)]
pub struct Input {
    byte0: u8,
    mem: Vec<u8>,
    ops: Vec<[u8; OP_LEN]>,
    /// Queue size the driver uses.
    pub qsize: u16,
    next_desc: Vec<u16>,
    avail_idx: Vec<u16>,
}

impl Input {
    /// An input for device `kind` (`msi`: the transport offers MSI).
    pub fn new(kind: Kind, msi: bool) -> Input {
        Input {
            byte0: kind.byte() | if msi { 4 } else { 0 },
            mem: vec![0; MEM],
            ops: Vec::new(),
            qsize: 16,
            next_desc: vec![0; 3],
            avail_idx: vec![0; 3],
        }
    }

    /// The input's bytes (guest memory trimmed after its last non-zero byte).
    pub fn encode(&self) -> Vec<u8> {
        let n = self.mem.iter().rposition(|b| *b != 0).map_or(0, |i| i + 1);
        let mut out = vec![self.byte0];
        out.extend_from_slice(&(n as u16).to_le_bytes());
        out.extend_from_slice(&self.mem[..n]);
        for o in &self.ops {
            out.extend_from_slice(o);
        }
        out
    }

    /// Put bytes into the guest memory image.
    pub fn put(&mut self, addr: u64, data: &[u8]) {
        let a = addr as usize;
        self.mem[a..a + data.len()].copy_from_slice(data);
    }

    /// Record an operation.
    pub fn op(&mut self, code: u8, off: u16, v: u32, x: u8) {
        let [a, b] = off.to_le_bytes();
        let [v0, v1, v2, v3] = v.to_le_bytes();
        self.ops.push([code, a, b, v0, v1, v2, v3, x]);
    }

    /// A 32-bit register write.
    pub fn w32(&mut self, off: u64, v: u32) {
        self.op(op::WRITE32, off as u16, v, 0);
    }

    /// A 32-bit register read.
    pub fn r32(&mut self, off: u64) {
        self.op(op::READ, off as u16, 0, 2);
    }

    /// A 16-bit register write.
    pub fn w16(&mut self, off: u64, v: u16) {
        self.op(op::WRITE, off as u16, u32::from(v), 1);
    }

    /// Reset, read the device's identity and features, accept `features` (with
    /// `VERSION_1`, and `EVENT_IDX` if `event_idx`), `FEATURES_OK`.
    pub fn begin(&mut self, features: u64, event_idx: bool) {
        self.w32(reg::STATUS, 0);
        for r in [reg::MAGIC, reg::VERSION, reg::DEVICE_ID, reg::VENDOR_ID] {
            self.r32(r);
        }
        self.w32(reg::STATUS, status::ACKNOWLEDGE);
        self.w32(reg::STATUS, status::ACKNOWLEDGE | status::DRIVER);
        for sel in 0..2 {
            self.w32(reg::DEVICE_FEATURES_SEL, sel);
            self.r32(reg::DEVICE_FEATURES);
        }
        let f = features | F_VERSION_1 | if event_idx { F_EVENT_IDX } else { 0 };
        self.w32(reg::DRIVER_FEATURES_SEL, 0);
        self.w32(reg::DRIVER_FEATURES, f as u32);
        self.w32(reg::DRIVER_FEATURES_SEL, 1);
        self.w32(reg::DRIVER_FEATURES, (f >> 32) as u32);
        let s = status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK;
        self.w32(reg::STATUS, s);
        self.r32(reg::STATUS);
    }

    /// Program queue `q` (size [`qsize`](Self::qsize), the rings at [`ring`]) and make it
    /// ready.
    pub fn setup_queue(&mut self, q: usize) {
        self.w32(reg::QUEUE_SEL, q as u32);
        self.r32(reg::QUEUE_NUM_MAX);
        self.w32(reg::QUEUE_NUM, u32::from(self.qsize));
        self.w32(reg::QUEUE_DESC_LOW, ring(q) as u32);
        self.w32(reg::QUEUE_DESC_HIGH, 0);
        self.w32(reg::QUEUE_DRIVER_LOW, avail(q) as u32);
        self.w32(reg::QUEUE_DRIVER_HIGH, 0);
        self.w32(reg::QUEUE_DEVICE_LOW, used(q) as u32);
        self.w32(reg::QUEUE_DEVICE_HIGH, 0);
        self.w32(reg::QUEUE_READY, 1);
    }

    /// `DRIVER_OK`.
    pub fn driver_ok(&mut self) {
        let s = status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK;
        self.w32(reg::STATUS, s);
        self.r32(reg::STATUS);
    }

    /// [`begin`](Self::begin), every one of `queues` set up, [`driver_ok`](Self::driver_ok).
    pub fn init(&mut self, features: u64, event_idx: bool, queues: usize) {
        self.begin(features, event_idx);
        for q in 0..queues {
            self.setup_queue(q);
        }
        self.driver_ok();
    }

    /// Write a descriptor into the image.
    pub fn desc(&mut self, q: usize, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let at = ring(q) + 16 * u64::from(i);
        self.put(at, &addr.to_le_bytes());
        self.put(at + 8, &len.to_le_bytes());
        self.put(at + 12, &flags.to_le_bytes());
        self.put(at + 14, &next.to_le_bytes());
    }

    /// Lay out a chain on queue `q` in the image and its head in the available ring's next
    /// slot; the driver publishes it with [`kick`](Self::kick). Returns the head.
    pub fn add(&mut self, q: usize, bufs: &[Buf]) -> u16 {
        let head = self.next_desc[q];
        for (i, &(addr, len, write)) in bufs.iter().enumerate() {
            let d = (head + i as u16) % self.qsize;
            let mut flags = if write { 2 } else { 0 };
            if i + 1 < bufs.len() {
                flags |= 1;
            }
            self.desc(q, d, addr, len, flags, (d + 1) % self.qsize);
        }
        self.next_desc[q] = (head + bufs.len() as u16) % self.qsize;
        self.avail_head(q, head);
        head
    }

    /// Put `head` in queue `q`'s next available slot (in the image).
    pub fn avail_head(&mut self, q: usize, head: u16) {
        let slot = self.avail_idx[q] % self.qsize;
        self.put(avail(q) + 4 + 2 * u64::from(slot), &head.to_le_bytes());
        self.avail_idx[q] = self.avail_idx[q].wrapping_add(1);
    }

    /// Publish what was added to `q` (the guest writes the available index: flags 0 and
    /// the index, one 32-bit store) and notify it through `QueueNotify`.
    pub fn kick(&mut self, q: usize) {
        self.publish(q);
        self.w32(reg::QUEUE_NOTIFY, q as u32);
    }

    /// The guest writes queue `q`'s available index.
    pub fn publish(&mut self, q: usize) {
        let v = u32::from(self.avail_idx[q]) << 16;
        self.op(op::POKE, avail(q) as u16, v, 0);
    }

    /// The guest writes `v` at `addr` (after the image was loaded).
    pub fn poke(&mut self, addr: u64, v: u32) {
        self.op(op::POKE, addr as u16, v, 0);
    }

    /// A notify through an ioeventfd.
    pub fn notify(&mut self, q: u32) {
        self.op(op::NOTIFY, 0, q, 0);
    }

    /// `backend_ready` on each of the first `n` polled fds.
    pub fn backends(&mut self, n: u32) {
        for i in 0..n {
            self.op(op::BACKEND, 0, i, 0);
        }
    }

    /// Host side, send (net: a frame of `len` bytes of `fill`; vsock: `CONNECT <len>`).
    pub fn host_send(&mut self, len: u32, fill: u8) {
        self.op(op::HOST_SEND, 0, len, fill);
    }

    /// Host side, the other actions (see the module docs of [`super`]).
    pub fn host(&mut self, a: u8, v: u32, x: u8) {
        self.op(op::HOST, u16::from(a), v, x);
    }

    /// Used index of queue `q` in a final memory image.
    pub fn used_idx(mem: &[u8], q: usize) -> u16 {
        let at = used(q) as usize + 2;
        u16::from_le_bytes([mem[at], mem[at + 1]])
    }

    /// Used element `i` of queue `q` in a final memory image: (head, length).
    pub fn used_elem(&self, mem: &[u8], q: usize, i: u16) -> (u32, u32) {
        let at = used(q) as usize + 4 + 8 * usize::from(i % self.qsize);
        let w = |o: usize| u32::from_le_bytes(mem[o..o + 4].try_into().expect("4 bytes"));
        (w(at), w(at + 4))
    }
}
