//! Minimal ACPI tables so that a Linux guest finds its CPUs without legacy MP tables (which
//! kernels built without `CONFIG_X86_MPPARSE`, Debian's cloud kernel among them, ignore):
//! RSDP -> XSDT -> { FADT (hardware-reduced) -> DSDT (empty), MADT (local APICs, I/O APIC,
//! IRQ0 -> GSI 2) }. The RSDP sits at [`RSDP_ADDR`], in the BIOS area where a bzImage kernel
//! scans for it; PVH boot passes its address in `hvm_start_info.rsdp_paddr`.

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// Where the RSDP goes (the tables follow it).
pub const RSDP_ADDR: u64 = 0xe0000;

fn checksum(b: &[u8]) -> u8 {
    0u8.wrapping_sub(b.iter().fold(0u8, |s, x| s.wrapping_add(*x)))
}

/// A table: the 36-byte header then `body`, with length and checksum filled in.
fn table(sig: &[u8; 4], revision: u8, body: &[u8]) -> Vec<u8> {
    let mut t = Vec::with_capacity(36 + body.len());
    t.extend_from_slice(sig);
    t.extend_from_slice(&((36 + body.len()) as u32).to_le_bytes());
    t.push(revision);
    t.push(0);
    t.extend_from_slice(b"FLTLNE");
    t.extend_from_slice(b"FAULTLNE");
    t.extend_from_slice(&1u32.to_le_bytes());
    t.extend_from_slice(b"FLTL");
    t.extend_from_slice(&1u32.to_le_bytes());
    t.extend_from_slice(body);
    t[9] = checksum(&t);
    t
}

fn madt(cpus: u32) -> Vec<u8> {
    let mut b = Vec::new();
    b.extend_from_slice(&crate::mptable::APIC_ADDR.to_le_bytes());
    b.extend_from_slice(&1u32.to_le_bytes()); // PCAT_COMPAT: there are 8259s to disable
    for id in 0..cpus {
        b.extend_from_slice(&[0, 8, id as u8, id as u8]); // processor local APIC
        b.extend_from_slice(&1u32.to_le_bytes()); // enabled
    }
    b.extend_from_slice(&[1, 12, cpus as u8, 0]); // I/O APIC
    b.extend_from_slice(&crate::mptable::IOAPIC_ADDR.to_le_bytes());
    b.extend_from_slice(&0u32.to_le_bytes()); // GSI base
    b.extend_from_slice(&[2, 10, 0, 0]); // override: ISA IRQ 0 -> GSI 2
    b.extend_from_slice(&2u32.to_le_bytes());
    b.extend_from_slice(&0u16.to_le_bytes());
    table(b"APIC", 5, &b)
}

fn fadt(dsdt: u64) -> Vec<u8> {
    // Revision 6: 276 bytes in all, 240 after the header.
    let mut b = vec![0u8; 276 - 36];
    let at = |off: usize| off - 36;
    b[at(40)..at(44)].copy_from_slice(&(dsdt as u32).to_le_bytes());
    // IAPC_BOOT_ARCH: legacy devices, 8042; no VGA, no MSI problems.
    b[at(109)..at(111)].copy_from_slice(&0x0003u16.to_le_bytes());
    // Flags: HW_REDUCED_ACPI (no SCI, PM timer or fixed hardware to emulate).
    b[at(112)..at(116)].copy_from_slice(&(1u32 << 20).to_le_bytes());
    b[at(131)] = 1; // FADT minor version
    b[at(140)..at(148)].copy_from_slice(&dsdt.to_le_bytes());
    b[at(268)..at(276)].copy_from_slice(b"FAULTLNE");
    table(b"FACP", 6, &b)
}

/// The tables for `cpus` CPUs, placed from [`RSDP_ADDR`].
pub fn build(cpus: u32) -> Vec<u8> {
    let rsdp_len = 36u64;
    let xsdt_at = RSDP_ADDR + 64;
    let dsdt = table(b"DSDT", 2, &[]);
    let madt = madt(cpus);
    let xsdt_len = 36 + 2 * 8;
    let dsdt_at = xsdt_at + xsdt_len as u64;
    let fadt_at = dsdt_at + dsdt.len() as u64;
    let fadt = fadt(dsdt_at);
    let madt_at = fadt_at + fadt.len() as u64;
    let mut x = Vec::new();
    x.extend_from_slice(&fadt_at.to_le_bytes());
    x.extend_from_slice(&madt_at.to_le_bytes());
    let xsdt = table(b"XSDT", 1, &x);

    let mut rsdp = Vec::with_capacity(rsdp_len as usize);
    rsdp.extend_from_slice(b"RSD PTR ");
    rsdp.push(0); // checksum of the first 20 bytes
    rsdp.extend_from_slice(b"FLTLNE");
    rsdp.push(2); // ACPI 2.0+
    rsdp.extend_from_slice(&0u32.to_le_bytes()); // no RSDT
    rsdp.extend_from_slice(&(rsdp_len as u32).to_le_bytes());
    rsdp.extend_from_slice(&xsdt_at.to_le_bytes());
    rsdp.extend_from_slice(&[0, 0, 0, 0]); // extended checksum, reserved
    rsdp[8] = checksum(&rsdp[..20]);
    rsdp[32] = checksum(&rsdp);

    let mut all = vec![0u8; (xsdt_at - RSDP_ADDR) as usize];
    all[..rsdp.len()].copy_from_slice(&rsdp);
    all.extend_from_slice(&xsdt);
    all.extend_from_slice(&dsdt);
    all.extend_from_slice(&fadt);
    all.extend_from_slice(&madt);
    all
}

/// Write the tables for `cpus` CPUs at [`RSDP_ADDR`].
pub fn write(mem: &GuestMemoryMmap, cpus: u32) -> Result<(), vm_memory::GuestMemoryError> {
    mem.write_slice(&build(cpus), GuestAddress(RSDP_ADDR))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |s, x| s.wrapping_add(*x))
    }

    #[test]
    fn tables_link_and_checksum() {
        let all = build(4);
        let base = RSDP_ADDR as usize;
        assert_eq!(&all[..8], b"RSD PTR ");
        assert_eq!(sum(&all[..20]), 0);
        assert_eq!(sum(&all[..36]), 0);
        let at = |addr: u64| addr as usize - base;
        let xsdt = u64::from_le_bytes(all[24..32].try_into().unwrap());
        let t = &all[at(xsdt)..];
        assert_eq!(&t[..4], b"XSDT");
        let len = u32::from_le_bytes(t[4..8].try_into().unwrap()) as usize;
        assert_eq!(sum(&t[..len]), 0);
        let mut sigs = Vec::new();
        for i in 0..(len - 36) / 8 {
            let p = u64::from_le_bytes(t[36 + 8 * i..44 + 8 * i].try_into().unwrap());
            let tb = &all[at(p)..];
            let l = u32::from_le_bytes(tb[4..8].try_into().unwrap()) as usize;
            assert_eq!(sum(&tb[..l]), 0, "{:?}", &tb[..4]);
            sigs.push(tb[..4].to_vec());
            if &tb[..4] == b"APIC" {
                let cpus = tb[44..l].chunks(1).count(); // walk entries
                assert!(cpus > 0);
                let mut off = 44;
                let mut lapics = 0;
                while off < l {
                    if tb[off] == 0 {
                        lapics += 1;
                    }
                    off += tb[off + 1] as usize;
                }
                assert_eq!(lapics, 4);
            }
            if &tb[..4] == b"FACP" {
                let dsdt = u64::from_le_bytes(tb[140..148].try_into().unwrap());
                assert_eq!(&all[at(dsdt)..at(dsdt) + 4], b"DSDT");
            }
        }
        assert_eq!(sigs, vec![b"FACP".to_vec(), b"APIC".to_vec()]);
    }
}
