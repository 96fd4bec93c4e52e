//! A vfio-user device's state through a snapshot or a live migration: vfio-user migration
//! v2 driven from the client side, plus the VMM's own part of the device (the MSI-X routes
//! it programmed from the guest's table writes).
//!
//! - **Pre-copy** ([`PciBus::start_dirty_log`]): each device logs the guest pages it writes
//!   by DMA (`DMA_LOGGING_START` over all guest memory; KVM's dirty log sees only the
//!   vCPUs' writes), and enters `PRE_COPY` when it offers it (it keeps running). Each round
//!   ORs the devices' reports into the dirty set ([`PciBus::take_dirty`]). The early data a
//!   device may offer in `PRE_COPY` is left in its stream and read at the switchover: every
//!   device seen so far sends its whole state again in `STOP_COPY` (libvfio-user's sample
//!   restarts its stream there), so reading it early would only send it twice.
//! - **Switchover, snapshot** ([`PciBus::freeze`]): doorbells the guest rang before the
//!   pause that the device has not yet taken from its ioeventfd are delivered first (a
//!   doorbell is a write the guest made; it must not be lost or run after the state is
//!   taken); then `STOP_COPY` (the device finishes the work it holds and stops: no DMA, no
//!   interrupts). [`PciBus::save`] reads the stream (`MIG_DATA_READ`) into the device's
//!   record and leaves the device in `STOP`; [`PciBus::thaw`] runs it again.
//! - **Where the VM lands** ([`PciBus::restore`]): the device server named there is
//!   attached as at boot (same BAR placement, guest memory mapped for DMA, interrupts
//!   wired), then `RESUMING`, `MIG_DATA_WRITE` of the stream, `STOP`; the VMM checks the
//!   device's BARs where the guest left them and reprograms each MSI-X vector's route.
//!   `RUNNING` when the vCPUs start ([`PciBus::thaw`]).
//!
//! # Record (version 1)
//! Little-endian: magic `b"FLPC"`, `u32` version, `u32` PCI slot, `u32` vendor and device
//! ID (as config space's first dword), `u32` n ≤ [`MAX_VECTORS`] then n MSI-X table entries
//! as the guest wrote them (address low, address high, data, vector control: `u32` each),
//! `u32` m ≤ [`MAX_STREAM`] then the device's m bytes of migration data, and a CRC-32 (IEEE)
//! of everything before it.

use std::sync::atomic::Ordering;

use vfu::client::ClientError;
use vfu::proto::{MIGRATION_PRE_COPY, MigState};

use super::{Dev, PciBus};
use crate::vstate::irq::{IrqError, MsiMessage};

const MAGIC: &[u8; 4] = b"FLPC";
const VERSION: u32 = 1;
/// Most MSI-X vectors a record may hold (PCI's limit).
pub const MAX_VECTORS: usize = 2048;
/// Most bytes of migration data one device may send (the same cap our device framework
/// puts on what it takes).
pub const MAX_STREAM: usize = 64 << 20;
/// Dirty-page granule asked of the devices: guest pages.
const PAGE: u64 = 4096;
/// How much migration data is asked for at a time.
const READ_CHUNK: u32 = 64 << 10;

/// A vfio-user device's record, decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PciRecord {
    /// PCI slot on bus 0.
    pub slot: u32,
    /// Vendor ID | device ID << 16.
    pub id: u32,
    /// The MSI-X table as the guest wrote it: per vector [address low, high, data, control].
    pub table: Vec<[u32; 4]>,
    /// The device's migration data.
    pub stream: Vec<u8>,
}

/// A vfio-user device's state could not be saved, checked or given back.
#[derive(Debug, thiserror::Error)]
pub enum PciStateError {
    /// The record is not one of this format, or damaged.
    #[error("vfio-user device record: {0}")]
    Malformed(String),
    /// The device refused a step, or went away.
    #[error("vfio-user device {path} (PCI slot {slot}): {what}")]
    Client {
        /// Socket.
        path: String,
        /// Slot.
        slot: u32,
        /// The step.
        what: &'static str,
        /// The client's error (the server's errno, or the connection's).
        #[source]
        source: ClientError,
    },
    /// The device offers no migration (its state cannot be carried).
    #[error("vfio-user device {path} (PCI slot {slot}) offers no migration")]
    NoMigration {
        /// Socket.
        path: String,
        /// Slot.
        slot: u32,
    },
    /// The device named here is not the one the state was taken from.
    #[error("vfio-user device {path} (PCI slot {slot}): {what}")]
    Mismatch {
        /// Socket.
        path: String,
        /// Slot.
        slot: u32,
        /// What differs.
        what: String,
    },
    /// Not as many devices as records.
    #[error(
        "the state holds {saved} vfio-user device(s), this VM has {live} (name each with \
         --vfio-user, in the same order)"
    )]
    Count {
        /// Records.
        saved: usize,
        /// Devices attached.
        live: usize,
    },
    /// A vector's route could not be programmed.
    #[error("vfio-user device {path}: MSI-X vector {vector}'s route")]
    Route {
        /// Socket.
        path: String,
        /// Vector.
        vector: usize,
        /// Cause.
        #[source]
        source: IrqError,
    },
}

impl PciRecord {
    /// Encode.
    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(28 + self.table.len() * 16 + self.stream.len());
        v.extend_from_slice(MAGIC);
        for w in [VERSION, self.slot, self.id, self.table.len() as u32] {
            v.extend_from_slice(&w.to_le_bytes());
        }
        for e in &self.table {
            for w in e {
                v.extend_from_slice(&w.to_le_bytes());
            }
        }
        v.extend_from_slice(&(self.stream.len() as u32).to_le_bytes());
        v.extend_from_slice(&self.stream);
        let crc = crc32fast::hash(&v);
        v.extend_from_slice(&crc.to_le_bytes());
        v
    }

    /// Decode, checking magic, version, every size against its bound and the CRC.
    pub fn decode(b: &[u8]) -> Result<PciRecord, PciStateError> {
        let bad = |m: String| PciStateError::Malformed(m);
        if b.len() < 28 || &b[..4] != MAGIC {
            return Err(bad(format!("{} bytes, no FLPC magic", b.len())));
        }
        let (body, crc) = b.split_at(b.len() - 4);
        if crc32fast::hash(body) != u32::from_le_bytes(crc.try_into().expect("4 bytes")) {
            return Err(bad("CRC mismatch".into()));
        }
        let word = |at: usize| {
            body.get(at..at + 4)
                .map(|w| u32::from_le_bytes(w.try_into().expect("4 bytes")))
                .ok_or_else(|| bad(format!("truncated at byte {at}")))
        };
        let version = word(4)?;
        if version != VERSION {
            return Err(bad(format!(
                "version {version}; this faultline reads {VERSION}"
            )));
        }
        let (slot, id, n) = (word(8)?, word(12)?, word(16)? as usize);
        if n > MAX_VECTORS {
            return Err(bad(format!("{n} MSI-X vectors (at most {MAX_VECTORS})")));
        }
        let mut at = 20;
        let mut table = Vec::with_capacity(n);
        for _ in 0..n {
            table.push([word(at)?, word(at + 4)?, word(at + 8)?, word(at + 12)?]);
            at += 16;
        }
        let m = word(at)? as usize;
        at += 4;
        if m > MAX_STREAM {
            return Err(bad(format!(
                "{m} bytes of migration data (at most {MAX_STREAM})"
            )));
        }
        if body.len() != at + m {
            return Err(bad(format!(
                "{} bytes where the sizes say {}",
                body.len(),
                at + m
            )));
        }
        Ok(PciRecord {
            slot,
            id,
            table,
            stream: body[at..].to_vec(),
        })
    }
}

impl Dev {
    fn err(&self, what: &'static str) -> impl FnOnce(ClientError) -> PciStateError + '_ {
        move |source| PciStateError::Client {
            path: self.path.display().to_string(),
            slot: self.slot,
            what,
            source,
        }
    }

    fn mismatch(&self, what: String) -> PciStateError {
        PciStateError::Mismatch {
            path: self.path.display().to_string(),
            slot: self.slot,
            what,
        }
    }

    /// Deliver the doorbells the guest rang (KVM signalled the ioeventfd) that the device
    /// has not taken yet, as the writes they stand for; the device then sees them before it
    /// stops. Reading the eventfd takes the signal from the device's own loop (whichever
    /// reads first gets it): each doorbell is delivered once.
    fn deliver_doorbells(&self) -> Result<(), PciStateError> {
        for (efd, bar, offset, size, datamatch) in &self.doorbells {
            // The descriptor is non-blocking on our side (set at attach): nothing pending
            // reads as EAGAIN.
            if efd.read().is_ok() {
                let v = datamatch.unwrap_or(0).to_le_bytes();
                let n = (*size as usize).min(8);
                self.client
                    .region_write(*bar, *offset, &v[..n])
                    .map_err(self.err("delivering a doorbell rung before the pause"))?;
            }
        }
        Ok(())
    }
}

/// Logs how long a step over every device took, when dropped (debug level).
struct Logged(&'static str, std::time::Instant);

impl Drop for Logged {
    fn drop(&mut self) {
        tracing::debug!(
            us = self.1.elapsed().as_micros() as u64,
            "vfio-user devices {}",
            self.0
        );
    }
}

impl PciBus {
    /// The devices whose state cannot be carried (no migration offered), by name.
    pub fn without_migration(&self) -> Vec<String> {
        self.devs
            .iter()
            .filter(|d| d.mig_flags.is_none())
            .map(|d| {
                format!(
                    "vfio-user device {:04x}:{:04x} at {} (PCI slot {}: it offers no migration)",
                    d.id & 0xffff,
                    d.id >> 16,
                    d.path.display(),
                    d.slot
                )
            })
            .collect()
    }

    /// Pre-copy starts: every device logs the pages it writes, and runs in `PRE_COPY` when
    /// it offers it.
    pub fn start_dirty_log(&self) -> Result<(), PciStateError> {
        for d in &self.devs {
            let flags = d.mig_flags.ok_or_else(|| PciStateError::NoMigration {
                path: d.path.display().to_string(),
                slot: d.slot,
            })?;
            match &d.dma_dirty {
                // Through messages: the VMM writes the pages itself, and logs them.
                Some(dirty) => dirty.set_tracking(true),
                None => d
                    .client
                    .dma_logging_start(PAGE, &[(0, self.mem_size)])
                    .map_err(d.err("starting DMA dirty-page logging"))?,
            }
            if flags & MIGRATION_PRE_COPY != 0 {
                d.client
                    .set_migration_state(MigState::PreCopy)
                    .map_err(d.err("entering PRE_COPY"))?;
            }
        }
        Ok(())
    }

    /// OR the pages each device wrote since the last call into `words` (one bit a page).
    pub fn take_dirty(&self, words: &mut [u64]) -> Result<(), PciStateError> {
        let _done = Logged("reported their dirty pages", std::time::Instant::now());
        for d in &self.devs {
            let bits = match &d.dma_dirty {
                Some(dirty) => dirty.take(),
                None => d
                    .client
                    .dma_logging_report(0, self.mem_size, PAGE)
                    .map_err(d.err("reading the DMA dirty-page log"))?,
            };
            for (w, b) in words.iter_mut().zip(bits) {
                *w |= b;
            }
        }
        Ok(())
    }

    /// Pre-copy is over (either way): logging stops (best effort).
    pub fn stop_dirty_log(&self) {
        for d in &self.devs {
            if let Some(dirty) = &d.dma_dirty {
                dirty.set_tracking(false);
                continue;
            }
            if let Err(e) = d.client.dma_logging_stop() {
                d.errors.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(device = %d.path.display(), "stopping DMA logging: {e}");
            }
        }
    }

    /// Stop every device (the vCPUs are paused): doorbells rung before the pause are
    /// delivered, then `STOP_COPY`: the device finishes what it holds and stops.
    pub fn freeze(&self) -> Result<(), PciStateError> {
        self.frozen.store(true, Ordering::SeqCst);
        let t = std::time::Instant::now();
        let _done = Logged("stopped", t);
        for d in &self.devs {
            if d.mig_flags.is_none() {
                return Err(PciStateError::NoMigration {
                    path: d.path.display().to_string(),
                    slot: d.slot,
                });
            }
            d.deliver_doorbells()?;
            d.client
                .set_migration_state(MigState::StopCopy)
                .map_err(d.err("stopping it (STOP_COPY)"))?;
        }
        Ok(())
    }

    /// Each device's record (after [`freeze`](Self::freeze)): its migration data, read to
    /// the end; the device is left in `STOP`.
    pub fn save(&self) -> Result<Vec<Vec<u8>>, PciStateError> {
        let _done = Logged("saved", std::time::Instant::now());
        let mut out = Vec::with_capacity(self.devs.len());
        for d in &self.devs {
            let mut stream = Vec::new();
            loop {
                let part = d
                    .client
                    .mig_data_read(READ_CHUNK)
                    .map_err(d.err("reading its state (MIG_DATA_READ)"))?;
                if part.is_empty() {
                    break;
                }
                if stream.len() + part.len() > MAX_STREAM {
                    return Err(
                        d.mismatch(format!("it sends more than {MAX_STREAM} bytes of state"))
                    );
                }
                stream.extend(part);
            }
            d.client
                .set_migration_state(MigState::Stop)
                .map_err(d.err("STOP after its state was read"))?;
            let table = d.table.lock().unwrap_or_else(|e| e.into_inner()).clone();
            out.push(
                PciRecord {
                    slot: d.slot,
                    id: d.id,
                    table,
                    stream,
                }
                .encode(),
            );
        }
        Ok(out)
    }

    /// Run every device again (after a snapshot, a failed migration, or at the
    /// destination when the vCPUs start). A device that refuses is counted in its errors
    /// and logged: the guest will see it stopped.
    pub fn thaw(&self) {
        if !self.frozen.swap(false, Ordering::SeqCst) {
            return; // running already (a fresh boot)
        }
        let _done = Logged("running again", std::time::Instant::now());
        for d in &self.devs {
            if d.mig_flags.is_none() {
                continue;
            }
            if let Err(e) = d.client.set_migration_state(MigState::Running) {
                d.errors.fetch_add(1, Ordering::Relaxed);
                tracing::error!(device = %d.path.display(), "vfio-user device did not resume: {e}");
            }
        }
    }

    /// Give each device its record back (the devices are attached, the vCPUs not running):
    /// `RESUMING`, the data, `STOP`; the BARs checked, the MSI-X routes programmed.
    pub fn restore(&self, records: &[Vec<u8>]) -> Result<(), PciStateError> {
        self.frozen.store(true, Ordering::SeqCst);
        let _done = Logged("given their state", std::time::Instant::now());
        if records.len() != self.devs.len() {
            return Err(PciStateError::Count {
                saved: records.len(),
                live: self.devs.len(),
            });
        }
        for (d, raw) in self.devs.iter().zip(records) {
            let r = PciRecord::decode(raw)?;
            if r.slot != d.slot || r.id != d.id {
                return Err(d.mismatch(format!(
                    "the state is of {:04x}:{:04x} in slot {}, this is {:04x}:{:04x}",
                    r.id & 0xffff,
                    r.id >> 16,
                    r.slot,
                    d.id & 0xffff,
                    d.id >> 16
                )));
            }
            let vectors = d.table.lock().unwrap_or_else(|e| e.into_inner()).len();
            if r.table.len() != vectors {
                return Err(d.mismatch(format!(
                    "{} MSI-X vectors in the state, {vectors} wired here",
                    r.table.len()
                )));
            }
            if d.mig_flags.is_none() {
                return Err(PciStateError::NoMigration {
                    path: d.path.display().to_string(),
                    slot: d.slot,
                });
            }
            d.client
                .set_migration_state(MigState::Resuming)
                .map_err(d.err("entering RESUMING"))?;
            d.client
                .mig_data_write(&r.stream)
                .map_err(d.err("writing its state (MIG_DATA_WRITE)"))?;
            d.client
                .set_migration_state(MigState::Stop)
                .map_err(d.err("loading its state (RESUMING -> STOP)"))?;
            // The BARs the guest sees must be where this VMM placed them.
            let placed = d.bars.iter().map(|b| (b, !0xf)).enumerate();
            let ports = d.io_bars.iter().map(|b| (b, !0x3)).enumerate();
            for (b, (bar, mask)) in placed.chain(ports) {
                let Some(bar) = bar else { continue };
                let mut raw = [0u8; 4];
                d.client
                    .config_read(0x10 + 4 * b as u64, &mut raw)
                    .map_err(d.err("reading its BARs"))?;
                let at = u64::from(u32::from_le_bytes(raw) & mask);
                if at != bar.addr & u64::from(mask) & 0xffff_ffff {
                    return Err(d.mismatch(format!(
                        "BAR {b} at {at:#x} in the state, placed at {:#x} here",
                        bar.addr
                    )));
                }
            }
            for (v, e) in r.table.iter().enumerate() {
                if *e == [0, 0, 0, 1] {
                    continue; // never written: masked, no route
                }
                let msg = MsiMessage {
                    address: u64::from(e[0]) | (u64::from(e[1]) << 32),
                    data: e[2],
                };
                self.irq
                    .set_msi_route(d.gsi_base + v as u32, msg)
                    .map_err(|source| PciStateError::Route {
                        path: d.path.display().to_string(),
                        vector: v,
                        source,
                    })?;
            }
            *d.table.lock().unwrap_or_else(|e| e.into_inner()) = r.table;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec() -> PciRecord {
        PciRecord {
            slot: 2,
            id: 0x0d3a_fa17,
            table: vec![[0xfee0_0000, 0, 0x41, 0], [0, 0, 0, 1]],
            stream: b"VFUS some state".to_vec(),
        }
    }

    #[test]
    fn records_round_trip_and_damage_is_refused() {
        let r = rec();
        let b = r.encode();
        assert_eq!(PciRecord::decode(&b).unwrap(), r);
        for cut in [0, 4, 27, b.len() - 1] {
            assert!(PciRecord::decode(&b[..cut]).is_err(), "cut at {cut}");
        }
        let mut flip = b.clone();
        flip[30] ^= 1;
        assert!(
            PciRecord::decode(&flip)
                .unwrap_err()
                .to_string()
                .contains("CRC")
        );
        // A newer version is refused by name.
        let mut v2 = b[..b.len() - 4].to_vec();
        v2[4] = 2;
        let crc = crc32fast::hash(&v2);
        v2.extend(crc.to_le_bytes());
        assert!(
            PciRecord::decode(&v2)
                .unwrap_err()
                .to_string()
                .contains("version 2")
        );
    }

    #[test]
    fn sizes_are_bounded_before_use() {
        // A vector count past the bound, with a valid CRC.
        let mut b = rec().encode();
        b.truncate(b.len() - 4);
        b[16..20].copy_from_slice(&(MAX_VECTORS as u32 + 1).to_le_bytes());
        let crc = crc32fast::hash(&b);
        b.extend(crc.to_le_bytes());
        let e = PciRecord::decode(&b).unwrap_err().to_string();
        assert!(e.contains("MSI-X vectors"), "{e}");
        // A stream length that lies.
        let mut b = rec().encode();
        b.truncate(b.len() - 4);
        let at = 20 + 2 * 16;
        b[at..at + 4].copy_from_slice(&u32::MAX.to_le_bytes());
        let crc = crc32fast::hash(&b);
        b.extend(crc.to_le_bytes());
        assert!(PciRecord::decode(&b).is_err());
    }
}
