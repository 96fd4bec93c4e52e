//! Migration v2: the state machine, the data stream (the device's own, or the framework's
//! versioned blob of config space, MSI-X and the device's state).

use std::sync::atomic::Ordering;

use super::{DeviceContext, DeviceError, lock};
use crate::proto::MigState;

pub(super) struct Migration {
    pub(super) state: MigState,
    pub(super) out: Vec<u8>,
    pub(super) out_pos: usize,
    pub(super) incoming: Vec<u8>,
}

impl DeviceContext {
    /// Walk the state machine to `to`, one arc at a time, along libvfio-user's (and VFIO's)
    /// next-state table: RUNNING -> STOP_COPY goes through STOP, PRE_COPY -> STOP through
    /// RUNNING, and so on. P2P states are not offered.
    pub(crate) fn set_migration_state(&self, to: MigState) -> Result<(), DeviceError> {
        use MigState::*;
        let bad =
            |from: MigState| DeviceError::invalid(format!("no transition {from:?} -> {to:?}"));
        if !matches!(to, Running | Stop | StopCopy | Resuming | PreCopy) {
            return Err(DeviceError {
                errno: libc::ENOTSUP,
                msg: format!("state {to:?} (P2P states are not offered)"),
            });
        }
        loop {
            let from = lock(&self.0.mig).state;
            if from == to {
                return Ok(());
            }
            let step = match (from, to) {
                (Error, _) => return Err(bad(from)),
                (Stop, PreCopy) => Running,
                (Stop, t) => t,
                (Running, PreCopy) => PreCopy,
                (Running, _) => Stop,
                (PreCopy, StopCopy) => StopCopy,
                (PreCopy, _) => Running,
                (StopCopy, PreCopy) => return Err(bad(from)),
                (StopCopy | Resuming, _) => Stop,
                _ => return Err(bad(from)),
            };
            // An arc that stops a running device tells the device first, so that it can
            // finish what it is doing (a DMA in flight) while DMA is still allowed; the
            // framework then stops it. Other arcs: the framework first, then the device.
            let stopping = matches!((from, step), (Running, Stop) | (PreCopy, StopCopy));
            let r = if stopping {
                self.0
                    .ops
                    .migration_transition(self, step)
                    .and_then(|()| self.migration_step(from, step))
            } else {
                self.migration_step(from, step)
                    .and_then(|()| self.0.ops.migration_transition(self, step))
            };
            if let Err(e) = r {
                lock(&self.0.mig).state = Error;
                return Err(e);
            }
            lock(&self.0.mig).state = step;
        }
    }

    fn migration_step(&self, from: MigState, to: MigState) -> Result<(), DeviceError> {
        use MigState::*;
        let framework = !self.0.device_stream;
        match (from, to) {
            (Running, Stop) => self.0.running.store(false, Ordering::Release),
            (Stop, Running) => {
                self.0.running.store(true, Ordering::Release);
                self.release_deferred();
            }
            // PRE_COPY: the device keeps running; in framework mode it has no early data.
            (Running, PreCopy) | (PreCopy, Running) => {}
            (Stop | PreCopy, StopCopy) => {
                self.0.running.store(false, Ordering::Release);
                if framework {
                    let blob = self.save_all()?;
                    let mut m = lock(&self.0.mig);
                    m.out = blob;
                    m.out_pos = 0;
                }
            }
            (StopCopy, Stop) => lock(&self.0.mig).out.clear(),
            (Stop, Resuming) => lock(&self.0.mig).incoming.clear(),
            (Resuming, Stop) => {
                if framework {
                    let data = std::mem::take(&mut lock(&self.0.mig).incoming);
                    self.load_all(&data)?;
                }
            }
            _ => return Err(DeviceError::invalid(format!("{from:?} -> {to:?}"))),
        }
        Ok(())
    }

    pub(crate) fn mig_data_read(&self, max: usize) -> Result<Vec<u8>, DeviceError> {
        let state = lock(&self.0.mig).state;
        if !matches!(state, MigState::StopCopy | MigState::PreCopy) {
            return Err(DeviceError::invalid(format!(
                "MIG_DATA_READ in state {state:?}"
            )));
        }
        if self.0.device_stream {
            let mut buf = vec![0u8; max];
            let n = self.0.ops.migration_read(self, &mut buf)?;
            if n > max {
                return Err(DeviceError {
                    errno: libc::EIO,
                    msg: format!("the device returned {n} bytes of state for {max}"),
                });
            }
            buf.truncate(n);
            return Ok(buf);
        }
        let mut m = lock(&self.0.mig);
        if m.state == MigState::PreCopy {
            return Ok(Vec::new());
        }
        let n = (m.out.len() - m.out_pos).min(max);
        let v = m.out[m.out_pos..m.out_pos + n].to_vec();
        m.out_pos += n;
        Ok(v)
    }

    /// Returns how many bytes were taken.
    pub(crate) fn mig_data_write(&self, data: &[u8]) -> Result<usize, DeviceError> {
        let state = lock(&self.0.mig).state;
        if state != MigState::Resuming {
            return Err(DeviceError::invalid(format!(
                "MIG_DATA_WRITE in state {state:?}"
            )));
        }
        if self.0.device_stream {
            let n = self.0.ops.migration_write(self, data)?;
            return Ok(n.min(data.len()));
        }
        let mut m = lock(&self.0.mig);
        if m.incoming.len() + data.len() > 64 << 20 {
            return Err(DeviceError {
                errno: libc::EFBIG,
                msg: "more than 64 MiB of device state".into(),
            });
        }
        m.incoming.extend_from_slice(data);
        Ok(data.len())
    }

    /// Device state: `"VFUS"`, version 1, then length-prefixed config space, MSI-X table
    /// words, MSI-X PBA bits, and the device's own blob.
    fn save_all(&self) -> Result<Vec<u8>, DeviceError> {
        let cfg = self.config_bytes();
        let (table, pba) = {
            let t = lock(&self.0.msix);
            let mut table = vec![0u8; t.vectors() as usize * 16];
            t.read_table(0, &mut table);
            let mut pba = vec![0u8; (t.vectors() as usize).div_ceil(64) * 8];
            t.read_pba(0, &mut pba);
            (table, pba)
        };
        let dev = self.0.ops.save(self)?;
        let mut out = b"VFUS".to_vec();
        out.extend(1u32.to_le_bytes());
        for part in [&cfg, &table, &pba, &dev] {
            out.extend((part.len() as u32).to_le_bytes());
            out.extend_from_slice(part);
        }
        Ok(out)
    }

    fn load_all(&self, data: &[u8]) -> Result<(), DeviceError> {
        let bad = |what: &str| DeviceError::invalid(format!("device state: {what}"));
        if data.len() < 8 || &data[..4] != b"VFUS" {
            return Err(bad("no VFUS magic"));
        }
        let ver = u32::from_le_bytes(data[4..8].try_into().expect("4 bytes"));
        if ver != 1 {
            return Err(bad(&format!("version {ver}, this build reads 1")));
        }
        let mut parts = Vec::new();
        let mut at = 8usize;
        for _ in 0..4 {
            let n = data
                .get(at..at + 4)
                .map(|b| u32::from_le_bytes(b.try_into().expect("4 bytes")) as usize)
                .ok_or_else(|| bad("truncated"))?;
            let p = data
                .get(at + 4..at + 4 + n)
                .ok_or_else(|| bad("truncated"))?;
            parts.push(p);
            at += 4 + n;
        }
        let (cfg, table, pba) = (parts[0], parts[1], parts[2]);
        {
            let mut c = lock(&self.0.config);
            if cfg.len() != c.len() {
                return Err(bad(&format!(
                    "config space of {} bytes, this device has {}",
                    cfg.len(),
                    c.len()
                )));
            }
            let mut t = lock(&self.0.msix);
            if table.len() != t.vectors() as usize * 16 {
                return Err(bad("MSI-X table size differs"));
            }
            // Restore through the write masks, so read-only fields stay this device's.
            c.reset();
            let _ = c.write(4, &cfg[4..6]);
            let _ = c.write(0x0c, &cfg[0x0c..0x40]);
            let _ = c.write(0x40, &cfg[0x40..]);
            t.write_table(0, table);
            for v in 0..t.vectors() {
                let on = pba
                    .get(v as usize / 8)
                    .is_some_and(|b| b & (1 << (v % 8)) != 0);
                t.set_pending(v, on);
            }
        }
        self.0.ops.load(self, parts[3])
    }
}
