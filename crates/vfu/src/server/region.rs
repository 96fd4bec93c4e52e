//! Region access from clients: config space, the MSI-X table and PBA, BAR memory behind
//! the mmap areas, and the device's callbacks for the rest.

use pci::{ConfigChange, ConfigError};

use super::{DeviceContext, DeviceError, lock};
use crate::proto::PCI_CONFIG_REGION;

impl DeviceContext {
    pub(crate) fn config_access(
        &self,
        offset: u64,
        data: &mut [u8],
        write: bool,
    ) -> Result<(), DeviceError> {
        let inval = |e: ConfigError| DeviceError::invalid(e.to_string());
        if !write {
            return lock(&self.0.config)
                .read(offset as usize, data)
                .map_err(inval);
        }
        let change = lock(&self.0.config)
            .write(offset as usize, data)
            .map_err(inval)?;
        if change.msix {
            self.release_msix();
        }
        if change.msi {
            self.release_msi();
        }
        if let Some((old, new)) = change.command
            && old & pci::CMD_INTX_DISABLE != 0
            && new & pci::CMD_INTX_DISABLE == 0
        {
            let level = lock(&self.0.irq).intx_level;
            if level {
                self.set_intx(true);
            }
        }
        if change != ConfigChange::default() {
            self.0.ops.config_notice(self, change);
        }
        Ok(())
    }

    /// A client's access to region `region` (config space, a BAR).
    pub(crate) fn region_access(
        &self,
        region: u32,
        offset: u64,
        data: &mut [u8],
        write: bool,
    ) -> Result<(), DeviceError> {
        if region == PCI_CONFIG_REGION {
            return self.config_access(offset, data, write);
        }
        let bar = self
            .0
            .bars
            .get(region as usize)
            .and_then(|b| b.as_ref())
            .ok_or_else(|| DeviceError::invalid(format!("region {region} does not exist")))?;
        let len = data.len() as u64;
        if offset
            .checked_add(len)
            .is_none_or(|e| e > bar.spec.bar.size)
        {
            return Err(DeviceError::invalid(format!(
                "access {offset:#x}+{len:#x} outside region {region} ({:#x} bytes)",
                bar.spec.bar.size
            )));
        }
        let inside = |o: u64, s: u64| offset >= o && offset + len <= o + s;
        let overlaps = |o: u64, s: u64| offset < o + s && o < offset + len;
        let cap = lock(&self.0.config).msix_cap();
        if let Some(m) = cap {
            for (is_table, b, o, s) in [
                (true, m.table_bar, m.table_offset, m.table_len()),
                (false, m.pba_bar, m.pba_offset, m.pba_len()),
            ] {
                let o = u64::from(o);
                if u32::from(b) != region || !overlaps(o, s) {
                    continue;
                }
                if !inside(o, s) {
                    return Err(DeviceError::invalid("access straddles the MSI-X structure"));
                }
                let rel = offset - o;
                if is_table {
                    if write {
                        let unmasked = lock(&self.0.msix).write_table(rel, data);
                        if !unmasked.is_empty() {
                            self.release_msix();
                        }
                    } else {
                        lock(&self.0.msix).read_table(rel, data);
                    }
                } else if !write {
                    lock(&self.0.msix).read_pba(rel, data);
                }
                return Ok(());
            }
        }
        let Some(mem) = &bar.memory else {
            return self.bar_callback(region, offset, data, write);
        };
        // Split at mmap-area edges: area bytes live in the BAR's memory, the rest goes to the
        // device (an access may cover both, as libvfio-user's client's 12 KiB BAR1 write does).
        let mut at = offset;
        let end = offset + len;
        while at < end {
            let area = bar
                .spec
                .mmap_areas
                .iter()
                .find(|&&(o, s)| at >= o && at < o + s)
                .copied();
            let (next, in_area) = match area {
                Some((o, s)) => ((o + s).min(end), true),
                None => {
                    let next_area = bar
                        .spec
                        .mmap_areas
                        .iter()
                        .map(|&(o, _)| o)
                        .filter(|&o| o > at)
                        .min()
                        .unwrap_or(end);
                    (next_area.min(end), false)
                }
            };
            let piece = &mut data[(at - offset) as usize..(next - offset) as usize];
            if in_area {
                let ok = if write {
                    mem.write(at, piece)
                } else {
                    mem.read(at, piece)
                };
                debug_assert!(ok, "checked against the BAR size");
            } else {
                self.bar_callback(region, at, piece, write)?;
            }
            at = next;
        }
        Ok(())
    }

    fn bar_callback(
        &self,
        region: u32,
        offset: u64,
        data: &mut [u8],
        write: bool,
    ) -> Result<(), DeviceError> {
        if write {
            self.0.ops.region_write(self, region, offset, data)
        } else {
            self.0.ops.region_read(self, region, offset, data)
        }
    }
}
