//! The device of libvfio-user's `samples/server.c`, on this framework: what libvfio-user's
//! own test client (`samples/client.c`) expects to find, so that client can judge our server.
//!
//! - IDs `dead:beef`, subsystem `cafe:babe`; INTx.
//! - BAR 0 (16 bytes; the register is the 8 bytes at offset 0, other accesses fail with
//!   `EINVAL` as in the sample): a timer. Writing a `time_t` (seconds since the epoch) arms it
//!   for that moment while the device runs; reading returns how many seconds have passed
//!   since the written time. When it fires the device pulses INTx, then does DMA: 4 KiB
//!   ('A', 'B', 'C', 'D' in 1 KiB pieces) written and read back on the second DMA region the
//!   client mapped, straight through the mapped fd (logged dirty by the framework), and the
//!   same on the first region through `DMA_WRITE` / `DMA_READ` messages (the client logs those
//!   itself). "First" and "second" follow the sample: slots in mapping order, an unmapped
//!   slot reused first.
//! - BAR 1 (16 KiB window): 12 KiB of storage (the sample's `0x3000`), pages 0 and 2
//!   mappable (sparse areas); the last 4 KiB are reserved (read zero, writes dropped), since
//!   a PCI BAR's size is a power of two where libvfio-user lets the sample use 12 KiB.
//! - Migration with the sample's own stream ([`DeviceDescription::device_migration_stream`]):
//!   in PRE_COPY the 12 KiB of BAR 1; in STOP_COPY BAR 1 then BAR 0's 8 bytes; RESUMING
//!   takes the STOP_COPY stream and RUNNING re-arms the timer, so an interrupt scheduled on
//!   the source fires on the destination.
//! - DMA does not need the Bus Master bit (libvfio-user's client never sets it).

use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use pci::{Bar, Ids};

use crate::proto::MigState;
use crate::server::{
    DeviceContext, DeviceDescription, DeviceError, DeviceOps, DmaNotice, WeakDeviceContext,
};

/// PCI vendor ID of the sample.
pub const VENDOR: u16 = 0xdead;
/// PCI device ID of the sample.
pub const DEVICE: u16 = 0xbeef;
/// BAR 1 storage: the sample's `bar1_size`.
pub const BAR1_STORAGE: u64 = 0x3000;
/// BAR 1 window.
pub const BAR1_SIZE: u64 = 0x4000;
/// DMA slots, as in the sample (`NR_DMA_REGIONS`).
const SLOTS: usize = 96;
/// Bytes the DMA pass writes and reads on each region.
const DMA_CHUNK: usize = 1024;
const DMA_COUNT: usize = 4;

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

struct State {
    bar0: i64,
    slots: Vec<Option<(u64, u64)>>,
    mig: MigState,
    transferred: u64,
    /// RESUMING received less than a whole stream.
    resumed_short: bool,
    /// Timer: the epoch second it fires at (re-arming replaces it, as `setitimer` does).
    timer: Option<i64>,
}

/// The sample device.
pub struct Sample {
    state: Mutex<State>,
    wake: Condvar,
    /// Timer fires and DMA passes done (for tests and logs).
    pub fired: std::sync::atomic::AtomicU64,
}

impl Sample {
    /// A device, with its timer thread stopped until armed.
    pub fn new() -> Arc<Sample> {
        Arc::new(Sample {
            state: Mutex::new(State {
                bar0: 0,
                slots: vec![None; SLOTS],
                mig: MigState::Running,
                transferred: 0,
                resumed_short: false,
                timer: None,
            }),
            wake: Condvar::new(),
            fired: std::sync::atomic::AtomicU64::new(0),
        })
    }

    /// The device description.
    pub fn description() -> DeviceDescription {
        DeviceDescription::new(
            "libvfio-user-sample",
            Ids {
                vendor: VENDOR,
                device: DEVICE,
                subsystem_vendor: 0xcafe,
                subsystem: 0xbabe,
                class: 0,
                revision: 0,
            },
        )
        .bar(0, Bar::mem32(16), &[])
        .bar(1, Bar::mem32(BAR1_SIZE), &[(0, 0x1000), (0x2000, 0x1000)])
        .intx()
        .device_migration_stream()
        .dma_without_bus_master()
    }

    /// Start the timer thread (it holds the device weakly and ends with it).
    pub fn start(self: &Arc<Self>, dev: &DeviceContext) {
        let me = Arc::downgrade(self);
        let ctx = dev.downgrade();
        let _ = std::thread::Builder::new()
            .name("sample-timer".into())
            .spawn(move || timer_thread(me, ctx));
    }

    fn st(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn arm(&self, st: &mut State, at: i64) {
        st.timer = Some(at);
        self.wake.notify_all();
    }

    fn disarm(&self, st: &mut State) {
        st.timer = None;
        self.wake.notify_all();
    }

    /// The timer fired: INTx, then the sample's DMA on its first two slots.
    fn fire(&self, dev: &DeviceContext) {
        dev.set_intx(true);
        dev.set_intx(false);
        let (direct, by_msg) = {
            let st = self.st();
            (st.slots[1], st.slots[0])
        };
        if let Some((addr, _)) = direct
            && let Err(e) = dma_pass(dev, addr, false)
        {
            tracing::warn!("sample: direct DMA at {addr:#x}: {e}");
        }
        if let Some((addr, _)) = by_msg
            && let Err(e) = dma_pass(dev, addr, true)
        {
            tracing::warn!("sample: DMA by message at {addr:#x}: {e}");
        }
        self.fired
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
}

/// Write 4 x 1 KiB and read it back 2 KiB at a time, as the sample's `do_dma_io`.
fn dma_pass(dev: &DeviceContext, addr: u64, messages: bool) -> Result<(), String> {
    let mut buf = vec![0u8; DMA_CHUNK * DMA_COUNT];
    for i in 0..DMA_COUNT {
        let piece = &mut buf[i * DMA_CHUNK..(i + 1) * DMA_CHUNK];
        piece.fill(b'A' + i as u8);
        let at = addr + (i * DMA_CHUNK) as u64;
        let r = if messages {
            dev.dma_write_by_message(at, piece)
        } else {
            dev.dma_write(at, piece)
        };
        r.map_err(|e| e.to_string())?;
    }
    let mut back = vec![0u8; buf.len()];
    for i in (0..DMA_COUNT).step_by(2) {
        let piece = &mut back[i * DMA_CHUNK..(i + 2) * DMA_CHUNK];
        let at = addr + (i * DMA_CHUNK) as u64;
        let r = if messages {
            dev.dma_read_by_message(at, piece)
        } else {
            dev.dma_read(at, piece)
        };
        r.map_err(|e| e.to_string())?;
    }
    if back != buf {
        return Err("DMA write and DMA read mismatch".into());
    }
    Ok(())
}

fn timer_thread(me: std::sync::Weak<Sample>, ctx: WeakDeviceContext) {
    loop {
        let Some(s) = me.upgrade() else { return };
        // Wait (a second at a time, so a dropped device ends the thread) for an armed timer
        // to come due.
        let due = {
            let st = s.st();
            let (mut st, _) = s
                .wake
                .wait_timeout_while(st, Duration::from_secs(1), |st| {
                    st.timer.is_none_or(|t| t > now())
                })
                .unwrap_or_else(|e| e.into_inner());
            match st.timer {
                Some(t) if t <= now() => {
                    st.timer = None;
                    true
                }
                _ => false,
            }
        };
        if due {
            let Some(dev) = ctx.upgrade() else { return };
            s.fire(&dev);
        }
    }
}

impl DeviceOps for Sample {
    fn region_read(
        &self,
        dev: &DeviceContext,
        bar: u32,
        offset: u64,
        data: &mut [u8],
    ) -> Result<(), DeviceError> {
        match bar {
            0 if offset == 0 && data.len() == 8 => {
                let delta = now() - self.st().bar0;
                data.copy_from_slice(&delta.to_ne_bytes());
                Ok(())
            }
            0 => Err(DeviceError::invalid(format!(
                "bad BAR0 access {offset:#x}+{}",
                data.len()
            ))),
            1 => {
                data.fill(0);
                let end = (offset + data.len() as u64).min(BAR1_STORAGE);
                if offset < end {
                    let mem = dev
                        .bar_memory(1)
                        .ok_or_else(|| DeviceError::invalid("BAR1 has no memory"))?;
                    mem.read(offset, &mut data[..(end - offset) as usize]);
                }
                Ok(())
            }
            _ => Err(DeviceError::invalid(format!("BAR{bar}"))),
        }
    }

    fn region_write(
        &self,
        dev: &DeviceContext,
        bar: u32,
        offset: u64,
        data: &[u8],
    ) -> Result<(), DeviceError> {
        match bar {
            0 if offset == 0 && data.len() == 8 => {
                let t = i64::from_ne_bytes(data.try_into().expect("8 bytes"));
                let mut st = self.st();
                st.bar0 = t;
                if st.mig == MigState::Running {
                    self.arm(&mut st, t);
                }
                Ok(())
            }
            0 => Err(DeviceError::invalid(format!(
                "bad BAR0 access {offset:#x}+{}",
                data.len()
            ))),
            1 => {
                let end = (offset + data.len() as u64).min(BAR1_STORAGE);
                if offset < end {
                    let mem = dev
                        .bar_memory(1)
                        .ok_or_else(|| DeviceError::invalid("BAR1 has no memory"))?;
                    mem.write(offset, &data[..(end - offset) as usize]);
                }
                Ok(())
            }
            _ => Err(DeviceError::invalid(format!("BAR{bar}"))),
        }
    }

    fn reset(&self, _dev: &DeviceContext) -> Result<(), DeviceError> {
        let mut st = self.st();
        st.mig = MigState::Running;
        st.transferred = 0;
        Ok(())
    }

    fn save(&self, dev: &DeviceContext) -> Result<Vec<u8>, DeviceError> {
        let mut out = vec![0u8; BAR1_STORAGE as usize];
        if let Some(m) = dev.bar_memory(1) {
            m.read(0, &mut out);
        }
        out.extend(self.st().bar0.to_ne_bytes());
        Ok(out)
    }

    fn load(&self, dev: &DeviceContext, state: &[u8]) -> Result<(), DeviceError> {
        if state.len() != BAR1_STORAGE as usize + 8 {
            return Err(DeviceError::invalid(format!(
                "sample state of {} bytes, expected {}",
                state.len(),
                BAR1_STORAGE + 8
            )));
        }
        if let Some(m) = dev.bar_memory(1) {
            m.write(0, &state[..BAR1_STORAGE as usize]);
        }
        self.st().bar0 = i64::from_ne_bytes(state[BAR1_STORAGE as usize..].try_into().expect("8"));
        Ok(())
    }

    fn dma_notice(&self, _dev: &DeviceContext, notice: DmaNotice) {
        let mut st = self.st();
        match notice {
            DmaNotice::Mapped { address, size } => {
                if let Some(slot) = st.slots.iter_mut().find(|s| s.is_none()) {
                    *slot = Some((address, size));
                } else {
                    tracing::warn!("sample: DMA slots full, {address:#x}+{size:#x} not used");
                }
            }
            DmaNotice::Unmapped { address, size } => {
                for slot in st.slots.iter_mut() {
                    if *slot == Some((address, size)) {
                        *slot = None;
                    }
                }
            }
        }
    }

    fn migration_transition(&self, _dev: &DeviceContext, to: MigState) -> Result<(), DeviceError> {
        let mut st = self.st();
        match to {
            MigState::StopCopy => {
                self.disarm(&mut st);
                st.transferred = 0;
            }
            MigState::PreCopy => st.transferred = 0,
            MigState::Resuming => {
                st.transferred = 0;
                st.resumed_short = true;
            }
            MigState::Running => {
                if st.resumed_short {
                    return Err(DeviceError::invalid(format!(
                        "resumed with {} of {} bytes of state",
                        st.transferred,
                        BAR1_STORAGE + 8
                    )));
                }
                let t = st.bar0;
                if t != 0 {
                    self.arm(&mut st, t);
                }
            }
            MigState::Stop if st.mig == MigState::Running => self.disarm(&mut st),
            _ => {}
        }
        st.mig = to;
        Ok(())
    }

    fn migration_read(&self, dev: &DeviceContext, buf: &mut [u8]) -> Result<usize, DeviceError> {
        let mut st = self.st();
        let total = match st.mig {
            MigState::PreCopy => BAR1_STORAGE,
            MigState::StopCopy => BAR1_STORAGE + 8,
            s => return Err(DeviceError::invalid(format!("migration read in {s:?}"))),
        };
        let start = st.transferred;
        let end = (start + buf.len() as u64).min(total);
        if start >= end {
            return Ok(0);
        }
        let mut whole = vec![0u8; BAR1_STORAGE as usize];
        if let Some(m) = dev.bar_memory(1) {
            m.read(0, &mut whole);
        }
        whole.extend(st.bar0.to_ne_bytes());
        let n = (end - start) as usize;
        buf[..n].copy_from_slice(&whole[start as usize..end as usize]);
        st.transferred = end;
        Ok(n)
    }

    fn migration_write(&self, dev: &DeviceContext, data: &[u8]) -> Result<usize, DeviceError> {
        let mut st = self.st();
        let total = BAR1_STORAGE + 8;
        let start = st.transferred;
        let end = (start + data.len() as u64).min(total);
        if start >= end {
            return Ok(0);
        }
        let n = (end - start) as usize;
        let piece = &data[..n];
        // Split between BAR 1's storage and BAR 0's register.
        let in_bar1 = BAR1_STORAGE.saturating_sub(start).min(n as u64) as usize;
        if in_bar1 > 0
            && let Some(m) = dev.bar_memory(1)
        {
            m.write(start, &piece[..in_bar1]);
        }
        if in_bar1 < n {
            let mut b = st.bar0.to_ne_bytes();
            let at = (start + in_bar1 as u64 - BAR1_STORAGE) as usize;
            b[at..at + (n - in_bar1)].copy_from_slice(&piece[in_bar1..]);
            st.bar0 = i64::from_ne_bytes(b);
        }
        st.transferred = end;
        if end == total {
            st.resumed_short = false;
        }
        Ok(n)
    }
}
