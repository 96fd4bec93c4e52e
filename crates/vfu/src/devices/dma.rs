//! A DMA copy engine: the guest writes descriptors in its memory, points the engine at them
//! and rings the doorbell; a worker thread copies between guest buffers through the
//! framework's DMA translation and raises MSI-X vector 0 on completion.
//!
//! BAR 0 (4 KiB, registers; MSI-X table at 0x800, PBA at 0xc00):
//!
//! | offset | access | meaning |
//! |---|---|---|
//! | 0x00 | R32 | ID `0x444d_4131` ("DMA1") |
//! | 0x08 | RW64 | guest address of the first descriptor |
//! | 0x10 | W32 | doorbell: process this many descriptors (0 means 1); also an ioeventfd |
//! | 0x14 | R32 | status: bit 0 busy, bit 1 the last run had an error |
//! | 0x18 | R32 | descriptors completed |
//! | 0x1c | R32 | descriptors failed |
//! | 0x20 | R64 | bytes copied |
//!
//! BAR 2 (64 KiB of device memory): bytes 0x1000.. are a sparse mmap area backed by a memfd
//! (a client maps them); the first page is trapped and reads back the same memory.
//!
//! Descriptor (32 bytes, in guest memory): `u64 src, u64 dst, u32 len, u32 flags (bit 0:
//! interrupt on completion), u32 status (written by the device: 1 done, 0x8000_0000 | errno
//! failed), u32 reserved`.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::mpsc::{Sender, channel};
use std::sync::{Arc, Mutex};

use pci::{Bar, Ids};

use crate::proto::MigState;
use crate::server::{DeviceContext, DeviceDescription, DeviceError, DeviceOps, DmaError};

/// PCI vendor ID used by faultline's example devices.
pub const VENDOR: u16 = 0xfa17;
/// Device ID of the DMA engine.
pub const DEVICE: u16 = 0x0d3a;
/// ID register value.
pub const ID: u32 = 0x444d_4131;
/// Register offsets.
pub mod reg {
    /// ID.
    pub const ID: u64 = 0x00;
    /// Descriptor address.
    pub const DESC: u64 = 0x08;
    /// Doorbell.
    pub const DOORBELL: u64 = 0x10;
    /// Status.
    pub const STATUS: u64 = 0x14;
    /// Completed count.
    pub const COMPLETED: u64 = 0x18;
    /// Failed count.
    pub const ERRORS: u64 = 0x1c;
    /// Bytes copied.
    pub const BYTES: u64 = 0x20;
}
/// Descriptor size.
pub const DESC_SIZE: u64 = 32;
/// Descriptor status: done.
pub const STATUS_DONE: u32 = 1;
/// Descriptor status: failed (ORed with an errno).
pub const STATUS_FAILED: u32 = 0x8000_0000;
/// How long a stop (for migration) waits for the copy in flight.
pub const STOP_DEADLINE: std::time::Duration = std::time::Duration::from_secs(5);
/// Largest copy one descriptor may ask for.
pub const MAX_LEN: u32 = 64 << 20;

/// The engine.
pub struct DmaEngine {
    desc: AtomicU64,
    busy: AtomicU32,
    error: AtomicU32,
    completed: AtomicU32,
    failed: AtomicU32,
    bytes: AtomicU64,
    worker: Mutex<Option<Sender<(u64, u32)>>>,
}

impl DmaEngine {
    /// A new engine.
    pub fn new() -> Arc<DmaEngine> {
        Arc::new(DmaEngine {
            desc: AtomicU64::new(0),
            busy: AtomicU32::new(0),
            error: AtomicU32::new(0),
            completed: AtomicU32::new(0),
            failed: AtomicU32::new(0),
            bytes: AtomicU64::new(0),
            worker: Mutex::new(None),
        })
    }

    /// The device description.
    pub fn description() -> DeviceDescription {
        DeviceDescription::new(
            "dma-engine",
            Ids {
                vendor: VENDOR,
                device: DEVICE,
                subsystem_vendor: VENDOR,
                subsystem: DEVICE,
                class: 0x088000, // system peripheral
                revision: 1,
            },
        )
        .bar(0, Bar::mem32(0x1000), &[])
        .bar(2, Bar::mem32(0x10000), &[(0x1000, 0xf000)])
        .pm()
        .msi(1, true)
        .msix(2, (0, 0x800), (0, 0xc00))
        .pcie()
        .ext_cap(
            pci::EXT_CAP_DSN,
            1,
            0x0d3a_fa17_0000_0001u64.to_le_bytes().to_vec(),
        )
        .ioeventfd(0, reg::DOORBELL, 4, None)
    }

    /// Descriptors completed.
    pub fn completed(&self) -> u32 {
        self.completed.load(Ordering::SeqCst)
    }

    fn run(&self, dev: &DeviceContext, first: u64, count: u32) {
        let mut any_error = false;
        for i in 0..u64::from(count.max(1)) {
            let at = first + i * DESC_SIZE;
            let mut d = [0u8; DESC_SIZE as usize];
            if dev.dma_read(at, &mut d).is_err() {
                self.failed.fetch_add(1, Ordering::SeqCst);
                any_error = true;
                break;
            }
            let src = u64::from_le_bytes(d[0..8].try_into().expect("8 bytes"));
            let dst = u64::from_le_bytes(d[8..16].try_into().expect("8 bytes"));
            let len = u32::from_le_bytes(d[16..20].try_into().expect("4 bytes"));
            let flags = u32::from_le_bytes(d[20..24].try_into().expect("4 bytes"));
            let res = if len > MAX_LEN {
                Err(libc::E2BIG)
            } else {
                dev.dma_copy(src, dst, u64::from(len)).map_err(|e| match e {
                    DmaError::Unmapped { .. } => libc::EFAULT,
                    DmaError::Permission { .. } => libc::EACCES,
                    DmaError::Disabled(_) => libc::EPERM,
                    DmaError::Message(_) => libc::EIO,
                    DmaError::Truncated { .. } => libc::EFAULT,
                })
            };
            let status = match res {
                Ok(()) => {
                    self.completed.fetch_add(1, Ordering::SeqCst);
                    self.bytes.fetch_add(u64::from(len), Ordering::SeqCst);
                    STATUS_DONE
                }
                Err(errno) => {
                    self.failed.fetch_add(1, Ordering::SeqCst);
                    any_error = true;
                    STATUS_FAILED | errno as u32
                }
            };
            let _ = dev.dma_write(at + 24, &status.to_le_bytes());
            if flags & 1 != 0 {
                dev.trigger(u32::from(status != STATUS_DONE));
            }
        }
        self.error.store(u32::from(any_error), Ordering::SeqCst);
        self.busy.store(0, Ordering::SeqCst);
    }

    fn ring(self: &Arc<Self>, dev: &DeviceContext, count: u32) -> Result<(), DeviceError> {
        let mut w = self.worker.lock().unwrap_or_else(|e| e.into_inner());
        if w.is_none() {
            let (tx, rx) = channel::<(u64, u32)>();
            // Weak handles: the worker must not keep the device (which owns the sender) alive,
            // or it would never see the channel close and never exit.
            let me = Arc::downgrade(self);
            let ctx = dev.downgrade();
            std::thread::Builder::new()
                .name("dma-engine".into())
                .spawn(move || {
                    while let Ok((first, n)) = rx.recv() {
                        let (Some(me), Some(ctx)) = (me.upgrade(), ctx.upgrade()) else {
                            break;
                        };
                        me.run(&ctx, first, n);
                    }
                })
                .map_err(|e| DeviceError {
                    errno: libc::EAGAIN,
                    msg: format!("worker thread: {e}"),
                })?;
            *w = Some(tx);
        }
        self.busy.store(1, Ordering::SeqCst);
        let first = self.desc.load(Ordering::SeqCst);
        w.as_ref()
            .expect("started above")
            .send((first, count))
            .map_err(|_| DeviceError {
                errno: libc::EIO,
                msg: "the worker has stopped".into(),
            })
    }
}

/// The ops need an `Arc` of the engine to start its worker.
pub struct DmaOps(pub Arc<DmaEngine>);

impl DeviceOps for DmaOps {
    fn region_read(
        &self,
        dev: &DeviceContext,
        bar: u32,
        offset: u64,
        data: &mut [u8],
    ) -> Result<(), DeviceError> {
        let e = &self.0;
        if bar == 2 {
            let mem = dev
                .bar_memory(2)
                .ok_or_else(|| DeviceError::invalid("no BAR 2 memory"))?;
            mem.read(offset, data);
            return Ok(());
        }
        let v: u64 = match (offset, data.len()) {
            (reg::ID, 4) => u64::from(ID),
            (reg::DESC, 8) => e.desc.load(Ordering::SeqCst),
            (reg::DESC, 4) => e.desc.load(Ordering::SeqCst) & 0xffff_ffff,
            (0x0c, 4) => e.desc.load(Ordering::SeqCst) >> 32,
            (reg::STATUS, 4) => {
                u64::from(e.busy.load(Ordering::SeqCst) | e.error.load(Ordering::SeqCst) << 1)
            }
            (reg::COMPLETED, 4) => u64::from(e.completed.load(Ordering::SeqCst)),
            (reg::ERRORS, 4) => u64::from(e.failed.load(Ordering::SeqCst)),
            (reg::BYTES, 8) => e.bytes.load(Ordering::SeqCst),
            _ => 0,
        };
        let b = v.to_le_bytes();
        let n = data.len().min(8);
        data[..n].copy_from_slice(&b[..n]);
        Ok(())
    }

    fn region_write(
        &self,
        dev: &DeviceContext,
        bar: u32,
        offset: u64,
        data: &[u8],
    ) -> Result<(), DeviceError> {
        let e = &self.0;
        if bar == 2 {
            let mem = dev
                .bar_memory(2)
                .ok_or_else(|| DeviceError::invalid("no BAR 2 memory"))?;
            mem.write(offset, data);
            return Ok(());
        }
        let mut b = [0u8; 8];
        let n = data.len().min(8);
        b[..n].copy_from_slice(&data[..n]);
        let v = u64::from_le_bytes(b);
        match (offset, data.len()) {
            (reg::DESC, 8) => e.desc.store(v, Ordering::SeqCst),
            (reg::DESC, 4) => {
                let hi = e.desc.load(Ordering::SeqCst) & !0xffff_ffff;
                e.desc.store(hi | v, Ordering::SeqCst)
            }
            (0x0c, 4) => {
                let lo = e.desc.load(Ordering::SeqCst) & 0xffff_ffff;
                e.desc.store(lo | (v << 32), Ordering::SeqCst)
            }
            (reg::DOORBELL, _) => e.ring(dev, v as u32)?,
            _ => {} // read-only or unused: ignored, as hardware does
        }
        Ok(())
    }

    fn reset(&self, _dev: &DeviceContext) -> Result<(), DeviceError> {
        let e = &self.0;
        e.desc.store(0, Ordering::SeqCst);
        e.error.store(0, Ordering::SeqCst);
        e.completed.store(0, Ordering::SeqCst);
        e.failed.store(0, Ordering::SeqCst);
        e.bytes.store(0, Ordering::SeqCst);
        Ok(())
    }

    /// Stopping (a snapshot, a migration's switchover): the copy in flight, if any, is
    /// finished first (its descriptor status written, its interrupt raised), so the state
    /// saved next holds no half-done copy and the guest sees the completion after it resumes.
    /// (A copy through DMA messages needs the client's replies, which `wait_while` keeps
    /// reading.)
    fn migration_transition(&self, dev: &DeviceContext, to: MigState) -> Result<(), DeviceError> {
        if matches!(to, MigState::Stop | MigState::StopCopy)
            && !dev.wait_while(|| self.0.busy.load(Ordering::SeqCst) != 0, STOP_DEADLINE)
        {
            return Err(DeviceError {
                errno: libc::EBUSY,
                msg: format!("a copy still runs after {STOP_DEADLINE:?}"),
            });
        }
        Ok(())
    }

    fn save(&self, _dev: &DeviceContext) -> Result<Vec<u8>, DeviceError> {
        let e = &self.0;
        if e.busy.load(Ordering::SeqCst) != 0 {
            return Err(DeviceError {
                errno: libc::EBUSY,
                msg: "a copy is in flight".into(),
            });
        }
        let mut v = vec![1u8];
        v.extend(e.desc.load(Ordering::SeqCst).to_le_bytes());
        v.extend(e.completed.load(Ordering::SeqCst).to_le_bytes());
        v.extend(e.failed.load(Ordering::SeqCst).to_le_bytes());
        v.extend(e.bytes.load(Ordering::SeqCst).to_le_bytes());
        Ok(v)
    }

    fn load(&self, _dev: &DeviceContext, s: &[u8]) -> Result<(), DeviceError> {
        if s.len() != 25 || s[0] != 1 {
            return Err(DeviceError::invalid(format!(
                "DMA engine state: {} bytes (want 25, version 1)",
                s.len()
            )));
        }
        let e = &self.0;
        e.desc.store(
            u64::from_le_bytes(s[1..9].try_into().expect("8")),
            Ordering::SeqCst,
        );
        e.completed.store(
            u32::from_le_bytes(s[9..13].try_into().expect("4")),
            Ordering::SeqCst,
        );
        e.failed.store(
            u32::from_le_bytes(s[13..17].try_into().expect("4")),
            Ordering::SeqCst,
        );
        e.bytes.store(
            u64::from_le_bytes(s[17..25].try_into().expect("8")),
            Ordering::SeqCst,
        );
        Ok(())
    }
}
