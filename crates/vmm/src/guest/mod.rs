//! The built-in guest: workloads that run directly in 64-bit user mode (CPL 3), with no guest
//! kernel, so they run at full speed under PVM as well as on hardware KVM.

pub mod abi;
mod code;
mod event;
pub mod telemetry;

pub use code::{MAGIC, entry_offset, exception_stubs_offset, image, irq_handler_offset};
pub use event::Event;

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// A workload of the built-in guest, run by every vCPU over its own slice of memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Workload {
    /// Fill the slice with the `memload.c` pattern, report its checksum, stop.
    Fill,
    /// `memload.c write`: fill, then rewrite one word in every page in a loop, checking the
    /// clock every 256 pages and sending a heartbeat every 100 ms.
    Dirty,
    /// `memload.c read`: fill, then every 100 ms read one page in 64 and send a heartbeat.
    Read,
    /// Seeded random page touches (two per page, or until the run time is up).
    Random,
    /// Checksum the slice as it is and report it.
    Verify,
    /// Drive the PCI devices from user mode (vCPU 0 only): list bus 0 through configuration
    /// mechanism #1, loop the GPIO card's outputs back, run DMA copies with the DMA engine,
    /// and report the results as `(key, value)` pairs (see [`abi`]).
    Devices,
    /// Interrupt lab (vCPU 0): the VMM sets up an IDT whose vector [`abi::IRQ_VECTOR`] gate
    /// enters a handler at CPL 3 (its code segment has DPL 3: same privilege, no stack
    /// switch); the guest enables interrupts and spins; the handler records each arrival's TSC
    /// and EOIs (see [`abi::IRQ_AREA`]).
    Irq,
    /// The same with the handler at CPL 0 (a kernel code segment: a privilege change and a
    /// stack switch to the TSS's RSP0; emulated under PVM).
    IrqCpl0,
    /// Drive the virtio-mmio devices (vCPU 0) as a driver at CPL 3 would, with the
    /// interrupts through the irq workloads' handler: see [`abi::VIRTIO_PARAMS`].
    Virtio,
    /// Keep the vfio-user devices busy until stopped (vCPU 0), checking continuity: a DMA
    /// copy after another (each verified, the engine's COMPLETED register counting every
    /// one since the start), the GPIO card's inputs reading back the outputs written last,
    /// libvfio-user's sample keeping the BAR1 words written at the start. A failure stops
    /// the guest with its code ([`abi::KEY_SOAK_FAILED`]). A guest to snapshot and migrate
    /// with its devices.
    #[serde(rename = "devices-soak")]
    DevicesSoak,
}

impl Workload {
    /// Every workload.
    pub const ALL: [Workload; 10] = [
        Workload::Fill,
        Workload::Dirty,
        Workload::Read,
        Workload::Random,
        Workload::Verify,
        Workload::Devices,
        Workload::Irq,
        Workload::IrqCpl0,
        Workload::Virtio,
        Workload::DevicesSoak,
    ];

    /// Index in the guest image's entry table.
    pub fn index(self) -> usize {
        match self {
            Workload::Fill => 0,
            Workload::Dirty => 1,
            Workload::Read => 2,
            Workload::Random => 3,
            Workload::Verify => 4,
            Workload::Devices => 5,
            Workload::Irq => 6,
            Workload::IrqCpl0 => 7,
            Workload::Virtio => 10,
            Workload::DevicesSoak => 11,
        }
    }

    /// The name used on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Workload::Fill => "fill",
            Workload::Dirty => "dirty",
            Workload::Read => "read",
            Workload::Random => "random",
            Workload::Verify => "verify",
            Workload::Devices => "devices",
            Workload::Irq => "irq",
            Workload::IrqCpl0 => "irq-cpl0",
            Workload::Virtio => "virtio",
            Workload::DevicesSoak => "devices-soak",
        }
    }

    /// Whether the workload runs until stopped when no run time is given.
    pub fn runs_forever(self) -> bool {
        matches!(
            self,
            Workload::Dirty
                | Workload::Read
                | Workload::Irq
                | Workload::IrqCpl0
                | Workload::DevicesSoak
        )
    }

    /// Whether the VMM gives this workload an IDT, a handler and the in-kernel irqchip; its
    /// handler's privilege level.
    pub fn irq_handler_cpl(self) -> Option<u8> {
        match self {
            Workload::Irq => Some(3),
            Workload::IrqCpl0 | Workload::Virtio => Some(0),
            _ => None,
        }
    }
}

impl fmt::Display for Workload {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Workload {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        Workload::ALL
            .into_iter()
            .find(|w| w.name() == s)
            .ok_or_else(|| {
                format!(
                    "unknown workload '{s}' (expected one of: fill, dirty, read, random, verify, devices, irq, irq-cpl0, virtio, devices-soak)"
                )
            })
    }
}

/// The expected content of a slice after `fill`, as bytes (for host-side checks).
pub fn fill_model(first_page: u64, bytes: usize) -> Vec<u8> {
    let mut v = Vec::with_capacity(bytes);
    for p in 0..(bytes / 4096) as u64 {
        for i in 0..512 {
            v.extend_from_slice(&abi::fill_word(first_page + p, i).to_le_bytes());
        }
    }
    v
}

/// The expected content of a zeroed slice after `random` without a run time.
pub fn random_model(seed: u64, bytes: usize) -> Vec<u8> {
    let pages = (bytes / 4096) as u64;
    let mut words = vec![0u64; bytes / 8];
    let mut x = seed | 1;
    for _ in 0..2 * pages {
        x = abi::xorshift(x);
        let w = (x % pages) * 512 + (x >> 55);
        words[w as usize] = words[w as usize].wrapping_add(x);
    }
    words.iter().flat_map(|w| w.to_le_bytes()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_has_magic_and_entries_inside() {
        let img = image();
        assert_eq!(u64::from_le_bytes(img[..8].try_into().unwrap()), MAGIC);
        let table_end = 8 * (3 + Workload::ALL.len()) as u64;
        for w in Workload::ALL {
            let e = entry_offset(w.index());
            assert!(e >= table_end && e < img.len() as u64, "{w}: {e}");
        }
        assert!(img.len() < 64 * 1024);
    }

    #[test]
    fn workload_names_round_trip() {
        for w in Workload::ALL {
            assert_eq!(w.name().parse::<Workload>().unwrap(), w);
        }
        assert!(
            "nope"
                .parse::<Workload>()
                .unwrap_err()
                .contains("unknown workload")
        );
    }

    #[test]
    fn entry_table_follows_all() {
        // Slots 8 and 9 of the table are the irq workloads' handler and exception reporters;
        // the workloads added after them (`virtio`) follow.
        for (i, w) in Workload::ALL.into_iter().enumerate() {
            let slot = if i < 8 { i } else { i + 2 };
            assert_eq!(w.index(), slot, "{w}");
        }
        let mut entries: Vec<u64> = Workload::ALL
            .iter()
            .map(|w| entry_offset(w.index()))
            .collect();
        entries.sort_unstable();
        entries.dedup();
        assert_eq!(entries.len(), Workload::ALL.len());
    }

    #[test]
    fn devices_workload() {
        let w = Workload::Devices;
        assert_eq!(w.index(), 5);
        assert_eq!(w.name(), "devices");
        assert_eq!("devices".parse::<Workload>().unwrap(), w);
        assert!(!w.runs_forever());
        assert_eq!(Workload::ALL[5], w);
        // Its code follows every other workload's.
        let e = entry_offset(w.index());
        for o in &Workload::ALL[..5] {
            assert!(entry_offset(o.index()) < e, "{o}");
        }
        assert_eq!(abi::PCI_ID_GPIO & 0xffff, 0x494f);
        assert_eq!(abi::PCI_ID_GPIO >> 16, 0x0dc8);
        assert_eq!(abi::PCI_ID_DMA & 0xffff, 0xfa17);
        assert_eq!(abi::PCI_ID_DMA >> 16, 0x0d3a);
        assert_eq!(abi::BAR_MMAP_MAGIC as u32, 0xCAFE_0001);
        // The DMA scratch (descriptor, source, destination) fits a 2 MiB slice.
        assert!(0x10_0000 + u64::from(abi::DMA_LEN) <= 2 << 20);
        assert!(u64::from(abi::DMA_LEN) >= 32);
    }

    #[test]
    fn irq_workloads() {
        assert_eq!(Workload::Irq.irq_handler_cpl(), Some(3));
        assert_eq!(Workload::IrqCpl0.irq_handler_cpl(), Some(0));
        assert_eq!(Workload::Fill.irq_handler_cpl(), None);
        assert_eq!("irq-cpl0".parse::<Workload>().unwrap(), Workload::IrqCpl0);
        let h = irq_handler_offset();
        assert!(h > entry_offset(Workload::Irq.index()) && h < image().len() as u64);
        assert_eq!(abi::IRQ_AREA, crate::cpl3::WORKLOAD);
    }

    #[test]
    fn models_match_the_abi() {
        let f = fill_model(3, 4096);
        assert_eq!(&f[8..16], &abi::fill_word(3, 1).to_le_bytes());
        assert_eq!(abi::checksum([]), abi::CHECKSUM_INIT);
        let r = random_model(7, 8 * 4096);
        assert!(r.iter().any(|&b| b != 0));
    }
}
