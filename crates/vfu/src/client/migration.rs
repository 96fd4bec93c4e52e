//! DEVICE_FEATURE commands: migration (state machine, data), and DMA dirty-page logging.

use zerocopy::{FromBytes, IntoBytes};

use super::{Client, ClientError, u32_at};
use crate::proto::*;

impl Client {
    fn feature(&self, flags: u32, data: &[u8]) -> Result<Vec<u8>, ClientError> {
        self.feature_reply(flags, data, data.len().max(8))
    }

    /// A DEVICE_FEATURE whose reply carries `reply` bytes after the 8-byte header: `argsz`
    /// says so (libvfio-user refuses a GET whose `argsz` cannot hold its reply, e.g. a
    /// DMA_LOGGING_REPORT's bitmap).
    fn feature_reply(&self, flags: u32, data: &[u8], reply: usize) -> Result<Vec<u8>, ClientError> {
        let f = DeviceFeature {
            argsz: (8 + data.len().max(reply)) as u32,
            flags,
        };
        let r = self.call(Command::DeviceFeature, &[f.as_bytes(), data], &[])?;
        Ok(r.payload.get(8..).unwrap_or_default().to_vec())
    }

    /// Whether the server offers migration (DEVICE_FEATURE probe), and its flags.
    pub fn migration_flags(&self) -> Result<Option<u64>, ClientError> {
        match self.feature(FEATURE_GET | FEATURE_MIGRATION, &[]) {
            Ok(d) => Ok(d
                .get(..8)
                .map(|b| u64::from_ne_bytes(b.try_into().expect("8 bytes")))),
            Err(ClientError::Server { errno, .. }) if errno == libc::ENOTSUP => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// The device's migration state.
    pub fn migration_state(&self) -> Result<MigState, ClientError> {
        let cmd = Command::DeviceFeature;
        let d = self.feature(FEATURE_GET | FEATURE_MIG_DEVICE_STATE, &[])?;
        u32_at(&d, 0)
            .and_then(MigState::from_u32)
            .ok_or_else(|| ClientError::Protocol {
                cmd,
                what: "bad MIG_DEVICE_STATE reply".into(),
            })
    }

    /// Move the device to `state`.
    pub fn set_migration_state(&self, state: MigState) -> Result<(), ClientError> {
        let mut d = (state as u32).to_ne_bytes().to_vec();
        d.extend(u32::MAX.to_ne_bytes());
        self.feature(FEATURE_SET | FEATURE_MIG_DEVICE_STATE, &d)?;
        Ok(())
    }

    /// Start DMA dirty-page logging (DEVICE_FEATURE `DMA_LOGGING_START`) with pages of
    /// `page_size` bytes over `ranges` (iova, length); empty: all mapped memory.
    pub fn dma_logging_start(
        &self,
        page_size: u64,
        ranges: &[(u64, u64)],
    ) -> Result<(), ClientError> {
        let mut d = page_size.to_ne_bytes().to_vec();
        d.extend((ranges.len() as u32).to_ne_bytes());
        d.extend(0u32.to_ne_bytes());
        for &(iova, len) in ranges {
            d.extend(iova.to_ne_bytes());
            d.extend(len.to_ne_bytes());
        }
        self.feature(FEATURE_SET | FEATURE_DMA_LOGGING_START, &d)?;
        Ok(())
    }

    /// Stop DMA dirty-page logging.
    pub fn dma_logging_stop(&self) -> Result<(), ClientError> {
        let mut d = 0u64.to_ne_bytes().to_vec();
        d.extend([0u8; 8]);
        self.feature(FEATURE_SET | FEATURE_DMA_LOGGING_STOP, &d)?;
        Ok(())
    }

    /// The pages of `iova..iova+length` the device dirtied since the last report (one bit a
    /// `page_size` page, in 64-bit words), cleared by the report.
    pub fn dma_logging_report(
        &self,
        iova: u64,
        length: u64,
        page_size: u64,
    ) -> Result<Vec<u64>, ClientError> {
        let cmd = Command::DeviceFeature;
        let mut d = iova.to_ne_bytes().to_vec();
        d.extend(length.to_ne_bytes());
        d.extend(page_size.to_ne_bytes());
        let words = length.div_ceil(page_size.max(1)).div_ceil(64) as usize;
        let r = self.feature_reply(FEATURE_GET | FEATURE_DMA_LOGGING_REPORT, &d, 24 + words * 8)?;
        let bitmap = r
            .get(24..24 + words * 8)
            .ok_or_else(|| ClientError::Protocol {
                cmd,
                what: format!("report of {} bytes, need {}", r.len(), 24 + words * 8),
            })?;
        Ok(bitmap
            .chunks_exact(8)
            .map(|b| u64::from_ne_bytes(b.try_into().expect("8 bytes")))
            .collect())
    }

    /// MIG_DATA_READ of up to `max` bytes, and at most the negotiated `max_data_xfer_size`
    /// (empty: no more).
    pub fn mig_data_read(&self, max: u32) -> Result<Vec<u8>, ClientError> {
        let cmd = Command::MigDataRead;
        let max = max.min(self.max_data() as u32);
        let m = MigData {
            argsz: 8 + max,
            size: max,
        };
        let r = self.call(cmd, &[m.as_bytes()], &[])?;
        let (h, data) =
            MigData::read_from_prefix(&r.payload).map_err(|_| ClientError::Protocol {
                cmd,
                what: "short reply".into(),
            })?;
        // The reply may be padded to the size asked (libvfio-user's is); `size` says how
        // much of it is data.
        if h.size as usize > data.len() || h.size > max || data.len() > max as usize {
            return Err(ClientError::Protocol {
                cmd,
                what: format!("size {} with {} bytes (asked {max})", h.size, data.len()),
            });
        }
        Ok(data[..h.size as usize].to_vec())
    }

    /// MIG_DATA_WRITE (in messages of at most the negotiated `max_data_xfer_size`).
    pub fn mig_data_write(&self, data: &[u8]) -> Result<(), ClientError> {
        let chunk = self.max_data();
        if data.len() > chunk {
            for part in data.chunks(chunk) {
                self.mig_data_write(part)?;
            }
            return Ok(());
        }
        let m = MigData {
            argsz: 8 + data.len() as u32,
            size: data.len() as u32,
        };
        self.call(Command::MigDataWrite, &[m.as_bytes(), data], &[])?;
        Ok(())
    }

    /// Save the device's whole state (RUNNING -> STOP_COPY, read all, -> STOP).
    pub fn save_state(&self) -> Result<Vec<u8>, ClientError> {
        self.set_migration_state(MigState::StopCopy)?;
        let mut out = Vec::new();
        loop {
            let d = self.mig_data_read(64 << 10)?;
            if d.is_empty() {
                break;
            }
            out.extend(d);
        }
        self.set_migration_state(MigState::Stop)?;
        Ok(out)
    }

    /// Load a saved state (-> RESUMING, write all, -> STOP) and run the device.
    pub fn load_state(&self, state: &[u8]) -> Result<(), ClientError> {
        self.set_migration_state(MigState::Resuming)?;
        for c in state.chunks(64 << 10) {
            self.mig_data_write(c)?;
        }
        self.set_migration_state(MigState::Stop)?;
        self.set_migration_state(MigState::Running)
    }
}
