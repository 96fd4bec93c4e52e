//! An Intel MultiProcessor Specification 1.4 table, so a Linux guest finds its CPUs, the I/O
//! APIC and the ISA interrupt routing without ACPI. Linux scans the last KiB of base memory
//! (`0x9fc00`) for the floating pointer, which is where it is written.

use thiserror::Error;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// Where the floating pointer and the table go.
pub const MPTABLE_START: u64 = 0x9fc00;
/// The local APIC's address.
pub const APIC_ADDR: u32 = 0xfee0_0000;
/// The I/O APIC's address.
pub const IOAPIC_ADDR: u32 = 0xfec0_0000;
/// Most CPUs the table has room for in the last KiB of base memory.
pub const MAX_CPUS: u32 = 32;

/// Writing the table.
#[derive(Debug, Error)]
pub enum MpTableError {
    /// Too many CPUs for the space below 640 KiB.
    #[error("an MP table holds at most {MAX_CPUS} CPUs, not {0}")]
    TooManyCpus(u32),
    /// The guest memory write failed.
    #[error("writing the MP table failed")]
    Write(#[source] vm_memory::GuestMemoryError),
}

fn checksum(b: &[u8]) -> u8 {
    0u8.wrapping_sub(b.iter().fold(0u8, |s, x| s.wrapping_add(*x)))
}

/// The table's bytes for `cpus` CPUs (APIC ids 0..cpus, the I/O APIC after them), placed at
/// `at`: the 16-byte floating pointer followed by the configuration table.
pub fn build(cpus: u32, at: u64) -> Result<Vec<u8>, MpTableError> {
    if cpus == 0 || cpus > MAX_CPUS {
        return Err(MpTableError::TooManyCpus(cpus));
    }
    let ioapic_id = cpus as u8;
    let mut entries = Vec::new();
    let mut count = 0u16;
    for id in 0..cpus {
        // Processor: type 0, APIC id, version, flags (enabled, BSP), signature, features.
        entries.extend_from_slice(&[0, id as u8, 0x14, if id == 0 { 3 } else { 1 }]);
        entries.extend_from_slice(&0x600u32.to_le_bytes());
        entries.extend_from_slice(&0x201u32.to_le_bytes()); // FPU | APIC
        entries.extend_from_slice(&[0; 8]);
        count += 1;
    }
    entries.extend_from_slice(&[1, 0]); // bus 0
    entries.extend_from_slice(b"ISA   ");
    count += 1;
    entries.extend_from_slice(&[2, ioapic_id, 0x11, 1]); // I/O APIC, enabled
    entries.extend_from_slice(&IOAPIC_ADDR.to_le_bytes());
    count += 1;
    for irq in 0..16u8 {
        // I/O interrupt: INT, conforming, bus 0 IRQ n -> I/O APIC pin n.
        entries.extend_from_slice(&[3, 0, 0, 0, 0, irq, ioapic_id, irq]);
        count += 1;
    }
    // Local interrupts: ExtINT on LINT0, NMI on LINT1, every local APIC.
    entries.extend_from_slice(&[4, 3, 0, 0, 0, 0, 0xff, 0]);
    entries.extend_from_slice(&[4, 1, 0, 0, 0, 0, 0xff, 1]);
    count += 2;

    let table_at = at + 16;
    let mut table = Vec::with_capacity(44 + entries.len());
    table.extend_from_slice(b"PCMP");
    table.extend_from_slice(&((44 + entries.len()) as u16).to_le_bytes());
    table.push(4); // spec revision 1.4
    table.push(0); // checksum, below
    table.extend_from_slice(b"FAULTLNE");
    table.extend_from_slice(b"faultline   ");
    table.extend_from_slice(&0u32.to_le_bytes()); // OEM table
    table.extend_from_slice(&0u16.to_le_bytes());
    table.extend_from_slice(&count.to_le_bytes());
    table.extend_from_slice(&APIC_ADDR.to_le_bytes());
    table.extend_from_slice(&[0, 0, 0, 0]); // extended table length, checksum, reserved
    table.extend_from_slice(&entries);
    table[7] = checksum(&table);

    let mut fp = Vec::with_capacity(16);
    fp.extend_from_slice(b"_MP_");
    fp.extend_from_slice(&(table_at as u32).to_le_bytes());
    fp.extend_from_slice(&[1, 4, 0, 0, 0, 0, 0, 0]); // length 1 (x16), rev 1.4, checksum, features
    fp[10] = checksum(&fp);
    fp.extend_from_slice(&table);
    if at + fp.len() as u64 > 0xa0000 {
        return Err(MpTableError::TooManyCpus(cpus));
    }
    Ok(fp)
}

/// Write the table for `cpus` CPUs at [`MPTABLE_START`].
pub fn write(mem: &GuestMemoryMmap, cpus: u32) -> Result<(), MpTableError> {
    let b = build(cpus, MPTABLE_START)?;
    mem.write_slice(&b, GuestAddress(MPTABLE_START))
        .map_err(MpTableError::Write)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksums_and_counts() {
        for cpus in [1, 2, 8, MAX_CPUS] {
            let b = build(cpus, MPTABLE_START).unwrap();
            assert_eq!(&b[..4], b"_MP_");
            assert_eq!(b[..16].iter().fold(0u8, |s, x| s.wrapping_add(*x)), 0);
            let t = &b[16..];
            assert_eq!(&t[..4], b"PCMP");
            let len = u16::from_le_bytes([t[4], t[5]]) as usize;
            assert_eq!(len, t.len());
            assert_eq!(t.iter().fold(0u8, |s, x| s.wrapping_add(*x)), 0);
            let entries = u16::from_le_bytes([t[34], t[35]]) as u32;
            assert_eq!(entries, cpus + 2 + 16 + 2);
            let procs = t[44..]
                .iter()
                .step_by(1)
                .take(20 * cpus as usize)
                .step_by(20)
                .filter(|&&x| x == 0)
                .count();
            assert_eq!(procs as u32, cpus);
            assert_eq!(
                u32::from_le_bytes(b[4..8].try_into().unwrap()) as u64,
                MPTABLE_START + 16
            );
        }
        assert!(build(0, MPTABLE_START).is_err());
        assert!(build(MAX_CPUS + 1, MPTABLE_START).is_err());
    }
}
