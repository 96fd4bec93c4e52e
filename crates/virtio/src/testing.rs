//! A minimal driver for unit tests: it speaks to a [`MmioTransport`] through its registers,
//! as a guest would, over real guest memory (`GuestMemoryMmap`), and submits chains.

use std::sync::Arc;

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::VirtioDevice;
use crate::interrupt::Counted;
use crate::mmio::{F_EVENT_IDX, F_VERSION_1, IrqMode, MmioTransport, WriteAction, reg, status};

/// Guest memory size of the test driver.
pub const MEM: u64 = 4 << 20;
/// Where queue q's rings live: 0x10000 * (q + 1) (desc), + 0x1000 (avail), + 0x2000 (used).
pub fn ring(q: usize) -> u64 {
    0x10000 * (q as u64 + 1)
}
/// A data area free for buffers.
pub const DATA: u64 = 0x100000;

/// The test driver.
pub struct Driver {
    /// The transport under test.
    pub t: MmioTransport,
    /// Guest memory.
    pub mem: GuestMemoryMmap,
    /// Its interrupts.
    pub irq: Arc<Counted>,
    /// Queue size used.
    pub qsize: u16,
    next_desc: Vec<u16>,
    avail_idx: Vec<u16>,
    used_seen: Vec<u16>,
}

/// A buffer of a chain: (address, length, device-writable).
pub type Buf = (u64, u32, bool);

impl Driver {
    /// A transport over `device`, not yet initialised.
    pub fn new(device: Box<dyn VirtioDevice>, mode: IrqMode) -> Driver {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM as usize)]).unwrap();
        let irq = Arc::new(Counted::default());
        let t = MmioTransport::new(device, mem.clone(), irq.clone(), mode);
        let n = t.num_queues();
        Driver {
            t,
            mem,
            irq,
            qsize: 16,
            next_desc: vec![0; n],
            avail_idx: vec![0; n],
            used_seen: vec![0; n],
        }
    }

    /// A new transport over `device` on the same guest memory, with fresh interrupts, and
    /// this driver's ring positions (the guest side of a snapshot restore).
    pub fn successor(&self, device: Box<dyn VirtioDevice>, mode: IrqMode) -> Driver {
        let irq = Arc::new(Counted::default());
        let t = MmioTransport::new(device, self.mem.clone(), irq.clone(), mode);
        Driver {
            t,
            mem: self.mem.clone(),
            irq,
            qsize: self.qsize,
            next_desc: self.next_desc.clone(),
            avail_idx: self.avail_idx.clone(),
            used_seen: self.used_seen.clone(),
        }
    }

    /// The used index queue `q`'s ring shows now.
    pub fn used_idx(&self, q: usize) -> u16 {
        self.mem
            .read_obj(GuestAddress(ring(q) + 0x2000 + 2))
            .unwrap()
    }

    /// Read a 32-bit register.
    pub fn r32(&mut self, off: u64) -> u32 {
        let mut b = [0u8; 4];
        self.t.read(off, &mut b);
        u32::from_le_bytes(b)
    }

    /// Write a 32-bit register.
    pub fn w32(&mut self, off: u64, v: u32) -> WriteAction {
        self.t.write(off, &v.to_le_bytes())
    }

    /// Reset, negotiate `extra` device features on top of VERSION_1 (and EVENT_IDX if
    /// `event_idx`), set up every queue with `qsize` entries, DRIVER_OK. Returns the status.
    pub fn init(&mut self, extra: u64, event_idx: bool) -> u32 {
        self.begin(extra, event_idx);
        self.finish()
    }

    /// Reset and negotiate features (up to FEATURES_OK).
    pub fn begin(&mut self, extra: u64, event_idx: bool) {
        self.w32(reg::STATUS, 0);
        self.w32(reg::STATUS, status::ACKNOWLEDGE);
        self.w32(reg::STATUS, status::ACKNOWLEDGE | status::DRIVER);
        let f = F_VERSION_1 | extra | if event_idx { F_EVENT_IDX } else { 0 };
        self.w32(reg::DRIVER_FEATURES_SEL, 0);
        self.w32(reg::DRIVER_FEATURES, f as u32);
        self.w32(reg::DRIVER_FEATURES_SEL, 1);
        self.w32(reg::DRIVER_FEATURES, (f >> 32) as u32);
        let s = status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK;
        self.w32(reg::STATUS, s);
    }

    /// Set up every queue and set DRIVER_OK; returns the status.
    pub fn finish(&mut self) -> u32 {
        let s = status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK;
        for q in 0..self.t.num_queues() {
            self.setup_queue(q);
        }
        self.w32(reg::STATUS, s | status::DRIVER_OK);
        self.r32(reg::STATUS)
    }

    /// Program queue `q`'s size and ring addresses and make it ready.
    pub fn setup_queue(&mut self, q: usize) {
        let base = ring(q);
        self.w32(reg::QUEUE_SEL, q as u32);
        self.w32(reg::QUEUE_NUM, u32::from(self.qsize));
        self.w32(reg::QUEUE_DESC_LOW, base as u32);
        self.w32(reg::QUEUE_DESC_HIGH, 0);
        self.w32(reg::QUEUE_DRIVER_LOW, (base + 0x1000) as u32);
        self.w32(reg::QUEUE_DRIVER_HIGH, 0);
        self.w32(reg::QUEUE_DEVICE_LOW, (base + 0x2000) as u32);
        self.w32(reg::QUEUE_DEVICE_HIGH, 0);
        self.w32(reg::QUEUE_READY, 1);
    }

    /// Turn MSI on (Dragonball's registers) and program `vectors` vectors, vector v to
    /// data 0x40 + v at the LAPIC address (between `begin` and `finish`).
    pub fn program_msi(&mut self, vectors: u16) {
        use crate::mmio::{MSI_CMD_UPDATE, MSI_CSR_ENABLE};
        self.t.write(reg::MSI_CSR, &MSI_CSR_ENABLE.to_le_bytes());
        for v in 0..vectors {
            self.w32(reg::MSI_ADDRESS_LOW, 0xfee0_0000);
            self.w32(reg::MSI_ADDRESS_HIGH, 0);
            self.w32(reg::MSI_DATA, 0x40 + u32::from(v));
            self.t
                .write(reg::MSI_COMMAND, &(MSI_CMD_UPDATE | v).to_le_bytes());
        }
    }

    /// Put a chain on queue `q` (without notifying); returns its head.
    pub fn add(&mut self, q: usize, bufs: &[Buf]) -> u16 {
        let base = ring(q);
        let head = self.next_desc[q];
        for (i, &(addr, len, write)) in bufs.iter().enumerate() {
            let d = (head + i as u16) % self.qsize;
            let next = (d + 1) % self.qsize;
            let mut flags = if write { 2u16 } else { 0 };
            if i + 1 < bufs.len() {
                flags |= 1;
            }
            let at = GuestAddress(base + 16 * u64::from(d));
            self.mem.write_obj(addr, at).unwrap();
            self.mem.write_obj(len, GuestAddress(at.0 + 8)).unwrap();
            self.mem.write_obj(flags, GuestAddress(at.0 + 12)).unwrap();
            self.mem.write_obj(next, GuestAddress(at.0 + 14)).unwrap();
        }
        self.next_desc[q] = (head + bufs.len() as u16) % self.qsize;
        let avail = base + 0x1000;
        let idx = self.avail_idx[q];
        self.mem
            .write_obj(
                head,
                GuestAddress(avail + 4 + 2 * u64::from(idx % self.qsize)),
            )
            .unwrap();
        self.avail_idx[q] = idx.wrapping_add(1);
        self.mem
            .write_obj(self.avail_idx[q], GuestAddress(avail + 2))
            .unwrap();
        head
    }

    /// Write a raw descriptor (for malformed chains).
    pub fn raw_desc(&mut self, q: usize, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let at = ring(q) + 16 * u64::from(i);
        self.mem.write_obj(addr, GuestAddress(at)).unwrap();
        self.mem.write_obj(len, GuestAddress(at + 8)).unwrap();
        self.mem.write_obj(flags, GuestAddress(at + 12)).unwrap();
        self.mem.write_obj(next, GuestAddress(at + 14)).unwrap();
    }

    /// Make head `head` available on `q` (after [`raw_desc`](Self::raw_desc)).
    pub fn avail_raw(&mut self, q: usize, head: u16) {
        let avail = ring(q) + 0x1000;
        let idx = self.avail_idx[q];
        self.mem
            .write_obj(
                head,
                GuestAddress(avail + 4 + 2 * u64::from(idx % self.qsize)),
            )
            .unwrap();
        self.avail_idx[q] = idx.wrapping_add(1);
        self.mem
            .write_obj(self.avail_idx[q], GuestAddress(avail + 2))
            .unwrap();
    }

    /// Notify queue `q` as the VMM does for a trapped write or an ioeventfd.
    pub fn kick(&mut self, q: usize) {
        if let WriteAction::Notify(n) = self.w32(reg::QUEUE_NOTIFY, q as u32) {
            self.t.notify(usize::from(n));
        }
    }

    /// Used elements of `q` not seen yet: (head, len).
    pub fn used(&mut self, q: usize) -> Vec<(u16, u32)> {
        let used = ring(q) + 0x2000;
        let idx: u16 = self.mem.read_obj(GuestAddress(used + 2)).unwrap();
        let mut out = Vec::new();
        while self.used_seen[q] != idx {
            let e = used + 4 + 8 * u64::from(self.used_seen[q] % self.qsize);
            let id: u32 = self.mem.read_obj(GuestAddress(e)).unwrap();
            let len: u32 = self.mem.read_obj(GuestAddress(e + 4)).unwrap();
            out.push((id as u16, len));
            self.used_seen[q] = self.used_seen[q].wrapping_add(1);
        }
        out
    }

    /// Write bytes into guest memory.
    pub fn put(&self, addr: u64, data: &[u8]) {
        self.mem.write_slice(data, GuestAddress(addr)).unwrap();
    }

    /// Read bytes from guest memory.
    pub fn get(&self, addr: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        self.mem.read_slice(&mut v, GuestAddress(addr)).unwrap();
        v
    }

    /// Whether the device asks for a reset.
    pub fn needs_reset(&mut self) -> bool {
        self.r32(reg::STATUS) & status::NEEDS_RESET != 0
    }
}
