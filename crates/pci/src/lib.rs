//! PCI configuration space with the semantics a device owner must get right, and no I/O.
//!
//! A [`ConfigBuilder`] describes a type-0 function: IDs, class, up to six BARs, INTx pin and
//! capabilities (Power Management, MSI, MSI-X, PCI Express, and extended capabilities in the
//! PCIe space above 0x100). [`ConfigBuilder::build`] lays the capabilities out and produces a
//! [`ConfigSpace`] that enforces, on every write:
//!
//! - per-byte write masks (read-only IDs, class, capability pointers, BAR flag bits);
//! - BAR sizing: writing all ones reads back `!(size - 1) | flags`, 64-bit BARs span two slots;
//! - write-one-to-clear status bits (PCI status, PM status, PCIe device status);
//! - MSI and MSI-X control fields, MSI per-vector masks;
//!
//! and reports what a write changed ([`ConfigChange`]) so a device framework can react
//! (re-evaluate MSI-X masking, move a BAR mapping, stop DMA when bus mastering goes off).
//! [`MsixTable`] is the MSI-X table and pending-bit array as the device's BAR exposes them.
//!
//! No crate in the rust-vmm family exposes a standalone config-space model with these
//! semantics (vm-device and the Cloud Hypervisor `pci` crate tie it to their VMM's bus and
//! interrupt types), so it is written here; [`lspci`] decodes any config space like `lspci -vvv`.

pub mod lspci;

use thiserror::Error;

/// Size of conventional configuration space.
pub const CFG_SIZE: usize = 256;
/// Size of PCI Express configuration space.
pub const CFG_EXT_SIZE: usize = 4096;

/// Vendor ID offset.
pub const VENDOR_ID: usize = 0x00;
/// Device ID offset.
pub const DEVICE_ID: usize = 0x02;
/// Command register offset.
pub const COMMAND: usize = 0x04;
/// Status register offset.
pub const STATUS: usize = 0x06;
/// Revision ID offset.
pub const REVISION: usize = 0x08;
/// Class code (prog-if, sub-class, base class) offset.
pub const CLASS: usize = 0x09;
/// Header type offset.
pub const HEADER_TYPE: usize = 0x0e;
/// BAR 0 offset.
pub const BAR0: usize = 0x10;
/// Subsystem vendor ID offset.
pub const SUBSYSTEM_VENDOR: usize = 0x2c;
/// Subsystem ID offset.
pub const SUBSYSTEM_ID: usize = 0x2e;
/// Capabilities pointer offset.
pub const CAP_PTR: usize = 0x34;
/// Interrupt line offset.
pub const INTERRUPT_LINE: usize = 0x3c;
/// Interrupt pin offset.
pub const INTERRUPT_PIN: usize = 0x3d;

/// Command: I/O space enable.
pub const CMD_IO: u16 = 1 << 0;
/// Command: memory space enable.
pub const CMD_MEMORY: u16 = 1 << 1;
/// Command: bus master enable (the device may DMA).
pub const CMD_BUS_MASTER: u16 = 1 << 2;
/// Command: INTx disable.
pub const CMD_INTX_DISABLE: u16 = 1 << 10;
/// Status: INTx asserted.
pub const STATUS_INTX: u16 = 1 << 3;
/// Status: capability list present.
pub const STATUS_CAP_LIST: u16 = 1 << 4;

/// Capability ID: Power Management.
pub const CAP_PM: u8 = 0x01;
/// Capability ID: MSI.
pub const CAP_MSI: u8 = 0x05;
/// Capability ID: vendor specific.
pub const CAP_VENDOR: u8 = 0x09;
/// Capability ID: PCI Express.
pub const CAP_PCIE: u8 = 0x10;
/// Capability ID: MSI-X.
pub const CAP_MSIX: u8 = 0x11;
/// Extended capability ID: Device Serial Number.
pub const EXT_CAP_DSN: u16 = 0x0003;
/// Extended capability ID: vendor specific.
pub const EXT_CAP_VENDOR: u16 = 0x000b;

/// Size of one MSI-X table entry.
pub const MSIX_ENTRY_SIZE: usize = 16;

/// What a BAR decodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BarKind {
    /// I/O ports.
    Io,
    /// 32-bit memory.
    Memory32 {
        /// Prefetchable.
        prefetchable: bool,
    },
    /// 64-bit memory (uses this slot and the next).
    Memory64 {
        /// Prefetchable.
        prefetchable: bool,
    },
}

/// A BAR's description.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bar {
    /// Size in bytes: a power of two, at least 16 for memory and 4 for I/O.
    pub size: u64,
    /// What it decodes.
    pub kind: BarKind,
}

impl Bar {
    /// A 32-bit non-prefetchable memory BAR.
    pub fn mem32(size: u64) -> Bar {
        Bar {
            size,
            kind: BarKind::Memory32 {
                prefetchable: false,
            },
        }
    }

    /// An I/O BAR.
    pub fn io(size: u64) -> Bar {
        Bar {
            size,
            kind: BarKind::Io,
        }
    }

    /// The read-only flag bits of the BAR's low dword.
    fn flags(&self) -> u32 {
        match self.kind {
            BarKind::Io => 1,
            BarKind::Memory32 { prefetchable } => u32::from(prefetchable) << 3,
            BarKind::Memory64 { prefetchable } => 0b100 | (u32::from(prefetchable) << 3),
        }
    }

    /// Whether the BAR decodes memory (not I/O).
    pub fn is_memory(&self) -> bool {
        !matches!(self.kind, BarKind::Io)
    }
}

/// A function's identity.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Ids {
    /// Vendor ID.
    pub vendor: u16,
    /// Device ID.
    pub device: u16,
    /// Subsystem vendor ID.
    pub subsystem_vendor: u16,
    /// Subsystem ID.
    pub subsystem: u16,
    /// Class code: base class << 16 | sub-class << 8 | prog-if.
    pub class: u32,
    /// Revision.
    pub revision: u8,
}

/// A bad device description.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum ConfigError {
    /// BAR index outside 0..6, or a 64-bit BAR in slot 5.
    #[error("BAR {0} does not exist (0..=5; a 64-bit BAR needs the next slot too)")]
    BarIndex(usize),
    /// BAR size not a power of two or too small.
    #[error("BAR {index}: size {size:#x} is not a power of two of at least {min}")]
    BarSize {
        /// BAR index.
        index: usize,
        /// Size given.
        size: u64,
        /// Smallest allowed.
        min: u64,
    },
    /// Two BARs overlap (a 64-bit BAR's upper half taken).
    #[error("BAR {0} is already used (a 64-bit BAR occupies two slots)")]
    BarTaken(usize),
    /// The capabilities do not fit.
    #[error("capabilities do not fit in {space} configuration space")]
    NoRoom {
        /// "conventional" or "extended".
        space: &'static str,
    },
    /// An MSI vector count that is not 1, 2, 4, 8, 16 or 32.
    #[error("MSI vectors must be 1, 2, 4, 8, 16 or 32, not {0}")]
    MsiVectors(u32),
    /// An MSI-X table size outside 1..=2048.
    #[error("MSI-X needs 1..=2048 vectors, not {0}")]
    MsixVectors(u32),
    /// MSI-X table or PBA outside its BAR, or in a BAR that does not exist.
    #[error("MSI-X {what} at BAR {bar} offset {offset:#x} does not fit a memory BAR")]
    MsixPlacement {
        /// "table" or "PBA".
        what: &'static str,
        /// BAR index.
        bar: u8,
        /// Offset in the BAR.
        offset: u32,
    },
    /// Extended capabilities without PCI Express.
    #[error("extended capabilities need the PCI Express capability (4 KiB config space)")]
    ExtendedWithoutPcie,
    /// An access outside configuration space.
    #[error("config access of {len} bytes at {offset:#x} is outside the {size}-byte space")]
    OutOfRange {
        /// Offset.
        offset: usize,
        /// Length.
        len: usize,
        /// Space size.
        size: usize,
    },
}

/// Where the MSI capability is and what it offers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MsiCap {
    /// Offset in config space.
    pub offset: usize,
    /// Vectors offered.
    pub vectors: u32,
    /// Per-vector masking.
    pub maskable: bool,
}

/// Where the MSI-X capability is and what it offers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MsixCap {
    /// Offset in config space.
    pub offset: usize,
    /// Table size (vectors).
    pub vectors: u32,
    /// BAR holding the table.
    pub table_bar: u8,
    /// Table offset in that BAR.
    pub table_offset: u32,
    /// BAR holding the pending-bit array.
    pub pba_bar: u8,
    /// PBA offset in that BAR.
    pub pba_offset: u32,
}

impl MsixCap {
    /// The MSI-X capability of a function, found by walking the capability list of its
    /// config space bytes (as a client reads them); `None` without one or on a broken list.
    pub fn find(cfg: &[u8]) -> Option<MsixCap> {
        if cfg.len() < 0x40 || u16::from_le_bytes([cfg[6], cfg[7]]) & STATUS_CAP_LIST == 0 {
            return None;
        }
        let mut p = (cfg[0x34] & 0xfc) as usize;
        // At most 48 capabilities fit in 192 bytes: a longer walk is a loop.
        for _ in 0..48 {
            if p < 0x40 || p + 12 > cfg.len() {
                return None;
            }
            if cfg[p] == CAP_MSIX {
                let ctl = u16::from_le_bytes([cfg[p + 2], cfg[p + 3]]);
                let t = u32::from_le_bytes(cfg[p + 4..p + 8].try_into().ok()?);
                let b = u32::from_le_bytes(cfg[p + 8..p + 12].try_into().ok()?);
                return Some(MsixCap {
                    offset: p,
                    vectors: u32::from(ctl & 0x7ff) + 1,
                    table_bar: (t & 7) as u8,
                    table_offset: t & !7,
                    pba_bar: (b & 7) as u8,
                    pba_offset: b & !7,
                });
            }
            p = (cfg[p + 1] & 0xfc) as usize;
            if p == 0 {
                return None;
            }
        }
        None
    }

    /// Bytes of the table.
    pub fn table_len(&self) -> u64 {
        u64::from(self.vectors) * MSIX_ENTRY_SIZE as u64
    }

    /// Bytes of the PBA (whole qwords).
    pub fn pba_len(&self) -> u64 {
        u64::from(self.vectors).div_ceil(64) * 8
    }
}

#[derive(Debug, Clone)]
enum CapSpec {
    Pm,
    Msi { vectors: u32, maskable: bool },
    Msix(MsixCap),
    Pcie,
    Vendor(Vec<u8>),
}

/// Describes a type-0 function; [`build`](ConfigBuilder::build) lays it out.
#[derive(Debug, Clone, Default)]
pub struct ConfigBuilder {
    ids: Ids,
    bars: [Option<Bar>; 6],
    pin: u8,
    caps: Vec<CapSpec>,
    ext: Vec<(u16, u8, Vec<u8>)>,
}

impl ConfigBuilder {
    /// A function with these IDs and no BARs, capabilities or interrupt pin.
    pub fn new(ids: Ids) -> ConfigBuilder {
        ConfigBuilder {
            ids,
            ..Default::default()
        }
    }

    /// BAR `index`.
    pub fn bar(mut self, index: usize, bar: Bar) -> Result<ConfigBuilder, ConfigError> {
        let wide = matches!(bar.kind, BarKind::Memory64 { .. });
        if index >= 6 || (wide && index == 5) {
            return Err(ConfigError::BarIndex(index));
        }
        let min = if bar.is_memory() { 16 } else { 4 };
        if !bar.size.is_power_of_two() || bar.size < min || (!wide && bar.size > 1 << 31) {
            return Err(ConfigError::BarSize {
                index,
                size: bar.size,
                min,
            });
        }
        if self.bars[index].is_some() || (index > 0 && self.is_upper_half(index)) {
            return Err(ConfigError::BarTaken(index));
        }
        if wide && self.bars[index + 1].is_some() {
            return Err(ConfigError::BarTaken(index + 1));
        }
        self.bars[index] = Some(bar);
        Ok(self)
    }

    fn is_upper_half(&self, index: usize) -> bool {
        matches!(
            self.bars[index - 1],
            Some(Bar {
                kind: BarKind::Memory64 { .. },
                ..
            })
        )
    }

    /// INTx pin: 1 = INTA# .. 4 = INTD#; 0 = none.
    pub fn intx_pin(mut self, pin: u8) -> ConfigBuilder {
        self.pin = pin.min(4);
        self
    }

    /// A Power Management capability (version 3, D0 only, no soft reset on D3hot->D0).
    pub fn pm(mut self) -> ConfigBuilder {
        self.caps.push(CapSpec::Pm);
        self
    }

    /// A 64-bit MSI capability with `vectors` vectors, per-vector maskable if `maskable`.
    pub fn msi(mut self, vectors: u32, maskable: bool) -> Result<ConfigBuilder, ConfigError> {
        if !vectors.is_power_of_two() || vectors > 32 {
            return Err(ConfigError::MsiVectors(vectors));
        }
        self.caps.push(CapSpec::Msi { vectors, maskable });
        Ok(self)
    }

    /// An MSI-X capability: `vectors` entries, table and PBA in memory BARs (checked in
    /// [`build`](ConfigBuilder::build)).
    pub fn msix(
        mut self,
        vectors: u32,
        table: (u8, u32),
        pba: (u8, u32),
    ) -> Result<ConfigBuilder, ConfigError> {
        if vectors == 0 || vectors > 2048 {
            return Err(ConfigError::MsixVectors(vectors));
        }
        self.caps.push(CapSpec::Msix(MsixCap {
            offset: 0,
            vectors,
            table_bar: table.0,
            table_offset: table.1,
            pba_bar: pba.0,
            pba_offset: pba.1,
        }));
        Ok(self)
    }

    /// A PCI Express (version 2) endpoint capability; makes config space 4 KiB.
    pub fn pcie(mut self) -> ConfigBuilder {
        self.caps.push(CapSpec::Pcie);
        self
    }

    /// A vendor-specific capability with this body (after the id, next and length bytes).
    pub fn vendor_cap(mut self, body: Vec<u8>) -> ConfigBuilder {
        self.caps.push(CapSpec::Vendor(body));
        self
    }

    /// An extended capability (needs [`pcie`](ConfigBuilder::pcie)) with this body (after
    /// its 4-byte header).
    pub fn ext_cap(mut self, id: u16, version: u8, body: Vec<u8>) -> ConfigBuilder {
        self.ext.push((id, version & 0xf, body));
        self
    }

    /// The BARs described so far.
    pub fn bars(&self) -> [Option<Bar>; 6] {
        self.bars
    }

    /// Lay the function out.
    pub fn build(self) -> Result<ConfigSpace, ConfigError> {
        let pcie = self.caps.iter().any(|c| matches!(c, CapSpec::Pcie));
        if !self.ext.is_empty() && !pcie {
            return Err(ConfigError::ExtendedWithoutPcie);
        }
        let size = if pcie { CFG_EXT_SIZE } else { CFG_SIZE };
        let mut cs = ConfigSpace {
            bytes: vec![0; size],
            wmask: vec![0; size],
            w1c: vec![0; size],
            initial: Vec::new(),
            bars: self.bars,
            msi: None,
            msix: None,
            pm: None,
            pcie: None,
        };
        cs.put16(VENDOR_ID, self.ids.vendor);
        cs.put16(DEVICE_ID, self.ids.device);
        cs.bytes[REVISION] = self.ids.revision;
        cs.bytes[CLASS] = self.ids.class as u8;
        cs.bytes[CLASS + 1] = (self.ids.class >> 8) as u8;
        cs.bytes[CLASS + 2] = (self.ids.class >> 16) as u8;
        cs.put16(SUBSYSTEM_VENDOR, self.ids.subsystem_vendor);
        cs.put16(SUBSYSTEM_ID, self.ids.subsystem);
        cs.bytes[INTERRUPT_PIN] = self.pin;
        let mut cmd_mask = CMD_MEMORY | CMD_BUS_MASTER | (1 << 6) | (1 << 8);
        if self.bars.iter().flatten().any(|b| !b.is_memory()) {
            cmd_mask |= CMD_IO;
        }
        if self.pin != 0 {
            cmd_mask |= CMD_INTX_DISABLE;
        }
        cs.mask16(COMMAND, cmd_mask);
        cs.w1c16(STATUS, 0xf900);
        cs.wmask[0x0c] = 0xff; // cache line size
        cs.wmask[0x0d] = 0xff; // latency timer
        cs.wmask[INTERRUPT_LINE] = 0xff;
        for (i, bar) in self.bars.iter().enumerate() {
            let Some(bar) = bar else { continue };
            let off = BAR0 + 4 * i;
            cs.put32(off, bar.flags());
            let low_mask = !((bar.size - 1) as u32) & !(if bar.is_memory() { 0xf } else { 0x3 });
            cs.mask32(off, low_mask);
            if let BarKind::Memory64 { .. } = bar.kind {
                cs.mask32(off + 4, !((bar.size - 1) >> 32) as u32);
            }
        }
        // Standard capabilities from 0x40, 4-byte aligned.
        let mut at = 0x40usize;
        let mut prev_next: Option<usize> = None;
        for cap in &self.caps {
            let (id, len) = match cap {
                CapSpec::Pm => (CAP_PM, 8),
                CapSpec::Msi { maskable, .. } => (CAP_MSI, if *maskable { 24 } else { 16 }),
                CapSpec::Msix(_) => (CAP_MSIX, 12),
                CapSpec::Pcie => (CAP_PCIE, 0x3c),
                CapSpec::Vendor(body) => (CAP_VENDOR, (3 + body.len()).div_ceil(4) * 4),
            };
            if at + len > CFG_SIZE {
                return Err(ConfigError::NoRoom {
                    space: "conventional",
                });
            }
            match prev_next {
                None => cs.bytes[CAP_PTR] = at as u8,
                Some(p) => cs.bytes[p] = at as u8,
            }
            cs.bytes[at] = id;
            prev_next = Some(at + 1);
            match cap {
                CapSpec::Pm => {
                    cs.put16(at + 2, 0x0003); // version 3
                    cs.put16(at + 4, 0x0008); // D0, No_Soft_Reset
                    cs.mask16(at + 4, 0x0103); // power state, PME_En
                    cs.w1c16(at + 4, 0x8000); // PME status
                    cs.pm = Some(at);
                }
                CapSpec::Msi { vectors, maskable } => {
                    let mmc = vectors.trailing_zeros() as u16;
                    let ctl = (mmc << 1) | (1 << 7) | (u16::from(*maskable) << 8);
                    cs.put16(at + 2, ctl);
                    cs.mask16(at + 2, 0x0071); // enable, multiple message enable
                    cs.mask32(at + 4, 0xffff_fffc);
                    cs.mask32(at + 8, 0xffff_ffff);
                    cs.mask16(at + 12, 0xffff);
                    if *maskable {
                        let bits = if *vectors == 32 {
                            u32::MAX
                        } else {
                            (1u32 << vectors) - 1
                        };
                        cs.mask32(at + 16, bits);
                    }
                    cs.msi = Some(MsiCap {
                        offset: at,
                        vectors: *vectors,
                        maskable: *maskable,
                    });
                }
                CapSpec::Msix(m) => {
                    for (what, bar, off, len) in [
                        ("table", m.table_bar, m.table_offset, m.table_len()),
                        ("PBA", m.pba_bar, m.pba_offset, m.pba_len()),
                    ] {
                        let ok = self
                            .bars
                            .get(bar as usize)
                            .copied()
                            .flatten()
                            .is_some_and(|b| {
                                b.is_memory() && off % 8 == 0 && u64::from(off) + len <= b.size
                            });
                        if !ok {
                            return Err(ConfigError::MsixPlacement {
                                what,
                                bar,
                                offset: off,
                            });
                        }
                    }
                    cs.put16(at + 2, (m.vectors - 1) as u16);
                    cs.mask16(at + 2, 0xc000);
                    cs.put32(at + 4, m.table_offset | u32::from(m.table_bar));
                    cs.put32(at + 8, m.pba_offset | u32::from(m.pba_bar));
                    cs.msix = Some(MsixCap { offset: at, ..*m });
                }
                CapSpec::Pcie => {
                    cs.put16(at + 2, 0x0002); // version 2, endpoint
                    cs.put32(at + 4, 0x1000_8000); // DevCap: 128 B payload, role-based error
                    cs.mask16(at + 8, 0xfcff);
                    cs.put16(at + 8, 0x2810);
                    cs.w1c16(at + 10, 0x000f);
                    cs.put32(at + 12, 0x0000_0011); // LnkCap: 2.5 GT/s x1
                    cs.mask16(at + 16, 0x0fc3);
                    cs.put16(at + 18, 0x0011); // LnkSta: 2.5 GT/s x1
                    cs.put32(at + 0x24, 0x0000_0010); // DevCap2: completion timeout disable
                    cs.mask16(at + 0x28, 0x041f);
                    cs.pcie = Some(at);
                }
                CapSpec::Vendor(body) => {
                    cs.bytes[at + 2] = (3 + body.len()) as u8;
                    cs.bytes[at + 3..at + 3 + body.len()].copy_from_slice(body);
                }
            }
            at += len;
        }
        if prev_next.is_some() {
            let s = cs.get16(STATUS) | STATUS_CAP_LIST;
            cs.put16(STATUS, s);
        }
        // Extended capabilities from 0x100.
        let mut at = 0x100usize;
        let n = self.ext.len();
        for (i, (id, ver, body)) in self.ext.iter().enumerate() {
            let len = (4 + body.len()).div_ceil(4) * 4;
            if at + len > CFG_EXT_SIZE {
                return Err(ConfigError::NoRoom { space: "extended" });
            }
            let next = if i + 1 < n { at + len } else { 0 };
            cs.put32(
                at,
                u32::from(*id) | (u32::from(*ver) << 16) | ((next as u32) << 20),
            );
            cs.bytes[at + 4..at + 4 + body.len()].copy_from_slice(body);
            at += len;
        }
        cs.initial = cs.bytes.clone();
        Ok(cs)
    }
}

/// What a config write changed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ConfigChange {
    /// The command register, before and after, if it changed.
    pub command: Option<(u16, u16)>,
    /// BARs whose address changed (bit i: BAR i).
    pub bars: u8,
    /// The MSI capability was written.
    pub msi: bool,
    /// The MSI-X message control was written.
    pub msix: bool,
    /// The PM control/status register was written.
    pub pm: bool,
}

/// MSI state as the guest programmed it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MsiState {
    /// MSI enabled.
    pub enabled: bool,
    /// Vectors enabled (multiple message enable).
    pub vectors: u32,
    /// Message address.
    pub address: u64,
    /// Message data (vector `i` uses `data | i`).
    pub data: u16,
    /// Per-vector mask bits (0 when not maskable).
    pub mask: u32,
}

/// A function's configuration space (see the crate docs for what it enforces).
#[derive(Debug, Clone)]
pub struct ConfigSpace {
    bytes: Vec<u8>,
    wmask: Vec<u8>,
    w1c: Vec<u8>,
    initial: Vec<u8>,
    bars: [Option<Bar>; 6],
    msi: Option<MsiCap>,
    msix: Option<MsixCap>,
    pm: Option<usize>,
    pcie: Option<usize>,
}

impl ConfigSpace {
    fn get16(&self, off: usize) -> u16 {
        u16::from_le_bytes([self.bytes[off], self.bytes[off + 1]])
    }

    fn get32(&self, off: usize) -> u32 {
        u32::from_le_bytes(self.bytes[off..off + 4].try_into().expect("4 bytes"))
    }

    fn put16(&mut self, off: usize, v: u16) {
        self.bytes[off..off + 2].copy_from_slice(&v.to_le_bytes());
    }

    fn put32(&mut self, off: usize, v: u32) {
        self.bytes[off..off + 4].copy_from_slice(&v.to_le_bytes());
    }

    fn mask16(&mut self, off: usize, m: u16) {
        self.wmask[off..off + 2].copy_from_slice(&m.to_le_bytes());
    }

    fn mask32(&mut self, off: usize, m: u32) {
        self.wmask[off..off + 4].copy_from_slice(&m.to_le_bytes());
    }

    fn w1c16(&mut self, off: usize, m: u16) {
        self.w1c[off..off + 2].copy_from_slice(&m.to_le_bytes());
    }

    /// Size in bytes (256 or 4096).
    pub fn len(&self) -> usize {
        self.bytes.len()
    }

    /// Never empty; present for API completeness.
    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }

    /// The raw bytes.
    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    fn check(&self, offset: usize, len: usize) -> Result<(), ConfigError> {
        if offset
            .checked_add(len)
            .is_none_or(|end| end > self.bytes.len())
        {
            return Err(ConfigError::OutOfRange {
                offset,
                len,
                size: self.bytes.len(),
            });
        }
        Ok(())
    }

    /// Read `data.len()` bytes at `offset`.
    pub fn read(&self, offset: usize, data: &mut [u8]) -> Result<(), ConfigError> {
        self.check(offset, data.len())?;
        data.copy_from_slice(&self.bytes[offset..offset + data.len()]);
        Ok(())
    }

    /// Write `data` at `offset` through the write masks.
    pub fn write(&mut self, offset: usize, data: &[u8]) -> Result<ConfigChange, ConfigError> {
        self.check(offset, data.len())?;
        let cmd_before = self.command();
        let bars_before: Vec<Option<u64>> = (0..6).map(|i| self.bar_address(i)).collect();
        for (i, &b) in data.iter().enumerate() {
            let o = offset + i;
            let (m, c) = (self.wmask[o], self.w1c[o]);
            self.bytes[o] = (self.bytes[o] & !m) | (b & m);
            self.bytes[o] &= !(b & c);
        }
        let end = offset + data.len();
        let touches = |start: usize, len: usize| offset < start + len && start < end;
        let mut change = ConfigChange::default();
        let cmd = self.command();
        if cmd != cmd_before {
            change.command = Some((cmd_before, cmd));
        }
        for (i, before) in bars_before.iter().enumerate() {
            if self.bar_address(i) != *before {
                change.bars |= 1 << i;
            }
        }
        change.msi = self.msi.is_some_and(|m| touches(m.offset, 24));
        change.msix = self.msix.is_some_and(|m| touches(m.offset + 2, 2));
        change.pm = self.pm.is_some_and(|p| touches(p + 4, 2));
        Ok(change)
    }

    /// Back to the state after [`ConfigBuilder::build`] (a function-level reset).
    pub fn reset(&mut self) {
        self.bytes.copy_from_slice(&self.initial);
    }

    /// The command register.
    pub fn command(&self) -> u16 {
        self.get16(COMMAND)
    }

    /// Set or clear the status register's INTx bit (device-owned, read-only to software).
    pub fn set_intx_status(&mut self, asserted: bool) {
        let s = self.get16(STATUS) & !STATUS_INTX;
        self.put16(STATUS, s | if asserted { STATUS_INTX } else { 0 });
    }

    /// The BAR descriptions.
    pub fn bars(&self) -> &[Option<Bar>; 6] {
        &self.bars
    }

    /// The address BAR `index` is programmed with (`None`: no such BAR).
    pub fn bar_address(&self, index: usize) -> Option<u64> {
        let bar = self.bars.get(index).copied().flatten()?;
        let off = BAR0 + 4 * index;
        let low = u64::from(self.get32(off) & !(if bar.is_memory() { 0xf } else { 0x3 }));
        Some(match bar.kind {
            BarKind::Memory64 { .. } => low | (u64::from(self.get32(off + 4)) << 32),
            _ => low,
        })
    }

    /// Program BAR `index` with `address` (firmware's job; masked like a write).
    pub fn set_bar_address(&mut self, index: usize, address: u64) {
        let Some(bar) = self.bars.get(index).copied().flatten() else {
            return;
        };
        let off = BAR0 + 4 * index;
        let _ = self.write(off, &(address as u32).to_le_bytes());
        if let BarKind::Memory64 { .. } = bar.kind {
            let _ = self.write(off + 4, &((address >> 32) as u32).to_le_bytes());
        }
    }

    /// The MSI capability, if any.
    pub fn msi_cap(&self) -> Option<MsiCap> {
        self.msi
    }

    /// The MSI-X capability, if any.
    pub fn msix_cap(&self) -> Option<MsixCap> {
        self.msix
    }

    /// The PCI Express capability's offset, if any.
    pub fn pcie_offset(&self) -> Option<usize> {
        self.pcie
    }

    /// MSI as programmed.
    pub fn msi_state(&self) -> Option<MsiState> {
        let m = self.msi?;
        let ctl = self.get16(m.offset + 2);
        let mme = (ctl >> 4) & 7;
        Some(MsiState {
            enabled: ctl & 1 != 0,
            vectors: (1u32 << mme).min(m.vectors),
            address: u64::from(self.get32(m.offset + 4))
                | (u64::from(self.get32(m.offset + 8)) << 32),
            data: self.get16(m.offset + 12),
            mask: if m.maskable {
                self.get32(m.offset + 16)
            } else {
                0
            },
        })
    }

    /// Set MSI pending bits (device-owned) when the capability is maskable.
    pub fn set_msi_pending(&mut self, pending: u32) {
        if let Some(m) = self.msi.filter(|m| m.maskable) {
            self.put32(m.offset + 20, pending);
        }
    }

    /// MSI-X (enabled, function masked).
    pub fn msix_control(&self) -> Option<(bool, bool)> {
        let m = self.msix?;
        let ctl = self.get16(m.offset + 2);
        Some((ctl & 0x8000 != 0, ctl & 0x4000 != 0))
    }

    /// Power state from the PM capability (0 = D0 .. 3 = D3hot).
    pub fn power_state(&self) -> u8 {
        self.pm.map_or(0, |p| self.bytes[p + 4] & 3)
    }
}

/// One MSI-X table entry.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MsixEntry {
    /// Message address.
    pub address: u64,
    /// Message data.
    pub data: u32,
    /// Vector control bit 0: masked.
    pub masked: bool,
}

/// The MSI-X table and pending-bit array of a device.
#[derive(Debug, Clone)]
pub struct MsixTable {
    words: Vec<u32>,
    pending: Vec<u64>,
}

impl MsixTable {
    /// A table of `vectors` entries, all masked (the reset state).
    pub fn new(vectors: u32) -> MsixTable {
        let mut words = vec![0u32; vectors as usize * 4];
        for e in words.chunks_mut(4) {
            e[3] = 1;
        }
        MsixTable {
            words,
            pending: vec![0; (vectors as usize).div_ceil(64)],
        }
    }

    /// Vectors in the table.
    pub fn vectors(&self) -> u32 {
        (self.words.len() / 4) as u32
    }

    /// Entry `v`.
    pub fn entry(&self, v: u32) -> Option<MsixEntry> {
        let e = self.words.get(v as usize * 4..v as usize * 4 + 4)?;
        Some(MsixEntry {
            address: u64::from(e[0]) | (u64::from(e[1]) << 32),
            data: e[2],
            masked: e[3] & 1 != 0,
        })
    }

    /// Read from the table at byte `offset` (any size and alignment; outside reads as 0).
    pub fn read_table(&self, offset: u64, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            let o = offset as usize + i;
            *b = self.words.get(o / 4).map_or(0, |w| w.to_le_bytes()[o % 4]);
        }
    }

    /// Write to the table; returns the vectors whose mask bit went from set to clear.
    pub fn write_table(&mut self, offset: u64, data: &[u8]) -> Vec<u32> {
        let before: Vec<bool> = (0..self.vectors())
            .map(|v| self.words[v as usize * 4 + 3] & 1 != 0)
            .collect();
        for (i, &b) in data.iter().enumerate() {
            let o = offset as usize + i;
            let Some(w) = self.words.get_mut(o / 4) else {
                continue;
            };
            let mut bytes = w.to_le_bytes();
            // Vector control: only bit 0 is defined; the rest reads as 0.
            bytes[o % 4] = if o % 16 >= 12 {
                if o % 16 == 12 { b & 1 } else { 0 }
            } else {
                b
            };
            *w = u32::from_le_bytes(bytes);
        }
        (0..self.vectors())
            .filter(|&v| before[v as usize] && self.words[v as usize * 4 + 3] & 1 == 0)
            .collect()
    }

    /// Read from the PBA at byte `offset`.
    pub fn read_pba(&self, offset: u64, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            let o = offset as usize + i;
            *b = self
                .pending
                .get(o / 8)
                .map_or(0, |q| q.to_le_bytes()[o % 8]);
        }
    }

    /// Set or clear vector `v`'s pending bit.
    pub fn set_pending(&mut self, v: u32, on: bool) {
        if let Some(q) = self.pending.get_mut(v as usize / 64) {
            let bit = 1u64 << (v % 64);
            if on {
                *q |= bit;
            } else {
                *q &= !bit;
            }
        }
    }

    /// Whether vector `v` is pending.
    pub fn is_pending(&self, v: u32) -> bool {
        self.pending
            .get(v as usize / 64)
            .is_some_and(|q| q & (1 << (v % 64)) != 0)
    }

    /// Set vector `v`'s mask bit (as `SET_IRQS` mask/unmask does); returns whether it changed.
    pub fn set_masked(&mut self, v: u32, masked: bool) -> bool {
        let Some(w) = self.words.get_mut(v as usize * 4 + 3) else {
            return false;
        };
        let old = *w & 1 != 0;
        *w = u32::from(masked);
        old != masked
    }

    /// Back to reset: every entry masked and zero, nothing pending.
    pub fn reset(&mut self) {
        *self = MsixTable::new(self.vectors());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> ConfigSpace {
        ConfigBuilder::new(Ids {
            vendor: 0x1234,
            device: 0x5678,
            class: 0x088000,
            ..Default::default()
        })
        .bar(0, Bar::mem32(0x1000))
        .unwrap()
        .bar(
            2,
            Bar {
                size: 1 << 32,
                kind: BarKind::Memory64 { prefetchable: true },
            },
        )
        .unwrap()
        .bar(4, Bar::io(0x100))
        .unwrap()
        .intx_pin(1)
        .pm()
        .msi(4, true)
        .unwrap()
        .msix(8, (0, 0x800), (0, 0xc00))
        .unwrap()
        .pcie()
        .ext_cap(EXT_CAP_DSN, 1, vec![1, 2, 3, 4, 5, 6, 7, 8])
        .build()
        .unwrap()
    }

    fn rd32(cs: &ConfigSpace, off: usize) -> u32 {
        let mut b = [0; 4];
        cs.read(off, &mut b).unwrap();
        u32::from_le_bytes(b)
    }

    #[test]
    fn msix_found_by_walking_the_bytes() {
        let cs = sample();
        let found = MsixCap::find(cs.bytes()).expect("the sample has MSI-X");
        let own = cs.msix_cap().expect("the sample has MSI-X");
        assert_eq!(found.offset, own.offset);
        assert_eq!(found.vectors, 8);
        assert_eq!((found.table_bar, found.table_offset), (0, 0x800));
        assert_eq!((found.pba_bar, found.pba_offset), (0, 0xc00));
        // A list that points at itself ends; a cleared capability-list bit means none.
        let mut looped = cs.bytes().to_vec();
        let first = looped[0x34] as usize;
        looped[0x34] = first as u8;
        looped[first] = 0x05; // not MSI-X
        looped[first + 1] = first as u8;
        assert!(MsixCap::find(&looped).is_none());
        let mut none = cs.bytes().to_vec();
        none[6] &= !(STATUS_CAP_LIST as u8);
        assert!(MsixCap::find(&none).is_none());
        assert!(MsixCap::find(&none[..0x20]).is_none());
    }

    #[test]
    fn ids_are_read_only() {
        let mut cs = sample();
        cs.write(0, &[0xff; 4]).unwrap();
        assert_eq!(rd32(&cs, 0), 0x5678_1234);
        assert_eq!(rd32(&cs, 8) >> 8, 0x088000);
    }

    #[test]
    fn bar_sizing_and_programming() {
        let mut cs = sample();
        cs.write(BAR0, &[0xff; 4]).unwrap();
        assert_eq!(rd32(&cs, BAR0), 0xffff_f000);
        cs.write(BAR0 + 8, &[0xff; 4]).unwrap();
        cs.write(BAR0 + 12, &[0xff; 4]).unwrap();
        assert_eq!(rd32(&cs, BAR0 + 8), 0x0000_000c);
        assert_eq!(rd32(&cs, BAR0 + 12), 0xffff_ffff);
        cs.write(BAR0 + 16, &[0xff; 4]).unwrap();
        assert_eq!(rd32(&cs, BAR0 + 16), 0xffff_ff01);
        let ch = cs.write(BAR0, &0xe000_0000u32.to_le_bytes()).unwrap();
        assert_eq!(ch.bars, 1);
        assert_eq!(cs.bar_address(0), Some(0xe000_0000));
        cs.set_bar_address(2, 0x8_0000_0000);
        assert_eq!(cs.bar_address(2), Some(0x8_0000_0000));
        assert_eq!(cs.bar_address(1), None);
        // An unused BAR reads as 0 whatever is written.
        cs.write(BAR0 + 4, &[0xff; 4]).unwrap();
        assert_eq!(rd32(&cs, BAR0 + 4), 0);
    }

    #[test]
    fn command_and_status_semantics() {
        let mut cs = sample();
        let ch = cs.write(COMMAND, &[0xff, 0xff]).unwrap();
        assert_eq!(
            ch.command,
            Some((
                0,
                CMD_IO | CMD_MEMORY | CMD_BUS_MASTER | 0x40 | 0x100 | 0x400
            ))
        );
        assert_ne!(rd32(&cs, COMMAND) >> 16 & u32::from(STATUS_CAP_LIST), 0);
        cs.set_intx_status(true);
        assert_ne!(rd32(&cs, COMMAND) >> 16 & u32::from(STATUS_INTX), 0);
        // Writing the status register cannot clear INTx (not W1C) nor set anything.
        cs.write(STATUS, &[0xff, 0xff]).unwrap();
        assert_ne!(rd32(&cs, COMMAND) >> 16 & u32::from(STATUS_INTX), 0);
    }

    #[test]
    fn capability_chain_and_msi() {
        let mut cs = sample();
        let mut ids = Vec::new();
        let mut p = cs.bytes()[CAP_PTR] as usize;
        while p != 0 {
            ids.push(cs.bytes()[p]);
            p = cs.bytes()[p + 1] as usize;
        }
        assert_eq!(ids, vec![CAP_PM, CAP_MSI, CAP_MSIX, CAP_PCIE]);
        let m = cs.msi_cap().unwrap();
        cs.write(m.offset + 4, &0xfee0_0000u32.to_le_bytes())
            .unwrap();
        cs.write(m.offset + 12, &0x41u16.to_le_bytes()).unwrap();
        let ch = cs.write(m.offset + 2, &0x0021u16.to_le_bytes()).unwrap();
        assert!(ch.msi);
        let s = cs.msi_state().unwrap();
        assert!(s.enabled);
        assert_eq!((s.vectors, s.address, s.data), (4, 0xfee0_0000, 0x41));
        cs.write(m.offset + 16, &[0xff; 4]).unwrap();
        assert_eq!(cs.msi_state().unwrap().mask, 0xf);
        // Capability bits (64-bit, maskable, MMC) are read-only.
        cs.write(m.offset + 2, &[0, 0]).unwrap();
        assert_eq!(cs.bytes()[m.offset + 2] & 0x8e, 0x84);
    }

    #[test]
    fn msix_control_and_table() {
        let mut cs = sample();
        let m = cs.msix_cap().unwrap();
        assert_eq!(cs.msix_control(), Some((false, false)));
        let ch = cs.write(m.offset + 2, &0xc000u16.to_le_bytes()).unwrap();
        assert!(ch.msix);
        assert_eq!(cs.msix_control(), Some((true, true)));
        let mut t = MsixTable::new(m.vectors);
        assert!(t.entry(0).unwrap().masked);
        t.write_table(16, &0xfee0_1000u32.to_le_bytes());
        t.write_table(24, &0x33u32.to_le_bytes());
        assert_eq!(t.write_table(28, &[0, 0, 0, 0]), vec![1]);
        let e = t.entry(1).unwrap();
        assert_eq!((e.address, e.data, e.masked), (0xfee0_1000, 0x33, false));
        t.set_pending(7, true);
        let mut pba = [0u8; 8];
        t.read_pba(0, &mut pba);
        assert_eq!(u64::from_le_bytes(pba), 0x80);
        let mut word = [0u8; 4];
        t.read_table(28, &mut word);
        assert_eq!(word, [0; 4]);
        t.write_table(28, &[0xff; 4]);
        t.read_table(28, &mut word);
        assert_eq!(word, [1, 0, 0, 0]);
    }

    #[test]
    fn extended_caps_and_reset() {
        let mut cs = sample();
        assert_eq!(cs.len(), CFG_EXT_SIZE);
        assert_eq!(rd32(&cs, 0x100) & 0xffff, u32::from(EXT_CAP_DSN));
        cs.write(COMMAND, &[0x06, 0]).unwrap();
        cs.reset();
        assert_eq!(cs.command(), 0);
        assert!(cs.read(4095, &mut [0; 2]).is_err());
        assert!(cs.write(usize::MAX, &[0]).is_err());
    }

    #[test]
    fn bad_descriptions() {
        let b = ConfigBuilder::new(Ids::default());
        assert_eq!(
            b.clone().bar(6, Bar::mem32(16)).unwrap_err(),
            ConfigError::BarIndex(6)
        );
        assert!(matches!(
            b.clone().bar(0, Bar::mem32(100)),
            Err(ConfigError::BarSize { .. })
        ));
        let wide = Bar {
            size: 0x1000,
            kind: BarKind::Memory64 {
                prefetchable: false,
            },
        };
        assert_eq!(
            b.clone()
                .bar(0, wide)
                .unwrap()
                .bar(1, Bar::mem32(16))
                .unwrap_err(),
            ConfigError::BarTaken(1)
        );
        assert!(matches!(
            b.clone().msix(4, (0, 0), (0, 0x40)).unwrap().build(),
            Err(ConfigError::MsixPlacement { .. })
        ));
        assert_eq!(
            b.clone().ext_cap(3, 1, vec![]).build().unwrap_err(),
            ConfigError::ExtendedWithoutPcie
        );
        assert_eq!(b.msi(3, false).unwrap_err(), ConfigError::MsiVectors(3));
    }

    #[test]
    fn random_writes_never_panic_and_keep_ids() {
        let mut cs = sample();
        let mut x = 0x1234_5678_9abc_def0u64;
        for _ in 0..20_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let off = (x % 4100) as usize;
            let len = [1, 2, 4][(x >> 20) as usize % 3];
            let _ = cs.write(off, &(x >> 8).to_le_bytes()[..len]);
        }
        assert_eq!(rd32(&cs, 0), 0x5678_1234);
    }
}
