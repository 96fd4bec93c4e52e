//! The binary file the VM's and vCPUs' state ([`crate::vstate::state`]) is kept in.
//!
//! # `state.bin`, version 3
//! Little-endian. A 16-byte header: magic `b"FLSTATE\0"`, `u32` version, `u32` record count.
//! Then records, each: `u16` tag, `u16` owner (vCPU index, or `0xffff` for the VM), `u32`
//! length, then `length` bytes. A KVM record's bytes are the kernel's own structure (`struct
//! kvm_regs`, ...) exactly as `KVM_GET_*` returns it: the KVM ABI is stable, so the layout is
//! the kernel's, checked on load by length. Unknown tags are an error (a newer writer).
//! The file's CRC-32 is in the manifest (a migration's State frame has its own CRC).
//!
//! Version 2 adds the VMM's device records, owned by the VM: tag 30, one per virtio-mmio
//! device in bus order (each `virtio::state`'s record, versioned and CRC-checked on its
//! own), and tag 31, a Linux guest's COM1 (`devices::SerialRecord`). Version 1 files (no
//! device records) are still read.
//!
//! Version 3 adds tag 32: one per vfio-user device in bus order (`devices::pci::PciRecord`:
//! the VMM's MSI-X shadow and the device's vfio-user migration data, CRC-checked). Versions
//! 1 and 2 are still read.

use kvm_bindings::{
    kvm_cpuid_entry2, kvm_debugregs, kvm_fpu, kvm_lapic_state, kvm_mp_state, kvm_msr_entry,
    kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave,
};
use zerocopy::{FromBytes, IntoBytes};

pub use crate::vstate::state::{StateError, VcpuState, VmState};

/// Magic at the start of `state.bin`.
pub const STATE_MAGIC: &[u8; 8] = b"FLSTATE\0";
/// The state file's format version.
pub const STATE_VERSION: u32 = 3;
/// The oldest version still read.
pub const STATE_VERSION_MIN: u32 = 1;
/// Most device records of one kind a state file may hold.
pub const MAX_DEVICE_RECORDS: usize = 64;
/// Owner of VM-wide records.
pub const VM_OWNER: u16 = 0xffff;

/// Record tags.
mod tag {
    pub const CLOCK: u16 = 1;
    pub const IRQCHIP: u16 = 2;
    pub const PIT2: u16 = 3;
    pub const REGS: u16 = 10;
    pub const SREGS: u16 = 11;
    pub const FPU: u16 = 12;
    pub const XSAVE: u16 = 13;
    pub const XCRS: u16 = 14;
    pub const MSRS: u16 = 15;
    pub const LAPIC: u16 = 16;
    pub const EVENTS: u16 = 17;
    pub const DEBUGREGS: u16 = 18;
    pub const MP_STATE: u16 = 19;
    pub const CPUID: u16 = 20;
    pub const VIRTIO: u16 = 30;
    pub const SERIAL: u16 = 31;
    pub const VFIO_USER: u16 = 32;
}

/// `kvm_fpu` has no zerocopy derive in kvm-bindings: its fields, in order, all without padding.
fn fpu_bytes(f: &kvm_fpu) -> Vec<u8> {
    let mut v = Vec::with_capacity(416);
    for r in &f.fpr {
        v.extend_from_slice(r);
    }
    v.extend_from_slice(&f.fcw.to_le_bytes());
    v.extend_from_slice(&f.fsw.to_le_bytes());
    v.push(f.ftwx);
    v.push(f.pad1);
    v.extend_from_slice(&f.last_opcode.to_le_bytes());
    v.extend_from_slice(&f.last_ip.to_le_bytes());
    v.extend_from_slice(&f.last_dp.to_le_bytes());
    for r in &f.xmm {
        v.extend_from_slice(r);
    }
    v.extend_from_slice(&f.mxcsr.to_le_bytes());
    v.extend_from_slice(&f.pad2.to_le_bytes());
    v
}

fn fpu_from(b: &[u8]) -> Option<kvm_fpu> {
    if b.len() != 416 {
        return None;
    }
    let mut f = kvm_fpu::default();
    let mut at = 0;
    let mut take = |n: usize| {
        let s = &b[at..at + n];
        at += n;
        s
    };
    for r in &mut f.fpr {
        r.copy_from_slice(take(16));
    }
    f.fcw = u16::from_le_bytes(take(2).try_into().ok()?);
    f.fsw = u16::from_le_bytes(take(2).try_into().ok()?);
    f.ftwx = take(1)[0];
    f.pad1 = take(1)[0];
    f.last_opcode = u16::from_le_bytes(take(2).try_into().ok()?);
    f.last_ip = u64::from_le_bytes(take(8).try_into().ok()?);
    f.last_dp = u64::from_le_bytes(take(8).try_into().ok()?);
    for r in &mut f.xmm {
        r.copy_from_slice(take(16));
    }
    f.mxcsr = u32::from_le_bytes(take(4).try_into().ok()?);
    f.pad2 = u32::from_le_bytes(take(4).try_into().ok()?);
    Some(f)
}

struct Writer {
    out: Vec<u8>,
    records: u32,
}

impl Writer {
    fn rec(&mut self, tag: u16, owner: u16, bytes: &[u8]) {
        self.out.extend_from_slice(&tag.to_le_bytes());
        self.out.extend_from_slice(&owner.to_le_bytes());
        self.out
            .extend_from_slice(&(bytes.len() as u32).to_le_bytes());
        self.out.extend_from_slice(bytes);
        self.records += 1;
    }
}

/// Encode the VM's and every vCPU's state as `state.bin`.
pub fn encode(vm: &VmState, vcpus: &[VcpuState]) -> Vec<u8> {
    let mut w = Writer {
        out: Vec::new(),
        records: 0,
    };
    if let Some(c) = &vm.clock {
        w.rec(tag::CLOCK, VM_OWNER, c.as_bytes());
    }
    for c in &vm.irqchips {
        w.rec(tag::IRQCHIP, VM_OWNER, c.as_bytes());
    }
    if let Some(p) = &vm.pit {
        w.rec(tag::PIT2, VM_OWNER, p.as_bytes());
    }
    for r in &vm.devices.virtio {
        w.rec(tag::VIRTIO, VM_OWNER, r);
    }
    if let Some(r) = &vm.devices.serial {
        w.rec(tag::SERIAL, VM_OWNER, r);
    }
    for r in &vm.devices.vfio_user {
        w.rec(tag::VFIO_USER, VM_OWNER, r);
    }
    for (i, v) in vcpus.iter().enumerate() {
        let o = i as u16;
        w.rec(tag::CPUID, o, v.cpuid.as_bytes());
        w.rec(tag::SREGS, o, v.sregs.as_bytes());
        w.rec(tag::REGS, o, v.regs.as_bytes());
        w.rec(tag::FPU, o, &fpu_bytes(&v.fpu));
        if let Some(x) = &v.xsave {
            w.rec(tag::XSAVE, o, x.as_bytes());
        }
        if let Some(x) = &v.xcrs {
            w.rec(tag::XCRS, o, x.as_bytes());
        }
        w.rec(tag::MSRS, o, v.msrs.as_bytes());
        if let Some(l) = &v.lapic {
            w.rec(tag::LAPIC, o, l.as_bytes());
        }
        w.rec(tag::DEBUGREGS, o, v.debugregs.as_bytes());
        w.rec(tag::EVENTS, o, v.events.as_bytes());
        w.rec(tag::MP_STATE, o, v.mp_state.as_bytes());
    }
    let mut out = Vec::with_capacity(16 + w.out.len());
    out.extend_from_slice(STATE_MAGIC);
    out.extend_from_slice(&STATE_VERSION.to_le_bytes());
    out.extend_from_slice(&w.records.to_le_bytes());
    out.extend_from_slice(&w.out);
    out
}

fn one<T: FromBytes>(what: &str, b: &[u8]) -> Result<T, StateError> {
    T::read_from_bytes(b).map_err(|_| {
        StateError::Format(format!(
            "{what} record has {} bytes, this KVM's structure has {}",
            b.len(),
            std::mem::size_of::<T>()
        ))
    })
}

fn many<T: FromBytes + Clone>(what: &str, b: &[u8]) -> Result<Vec<T>, StateError> {
    let sz = std::mem::size_of::<T>();
    if b.len() % sz != 0 {
        return Err(StateError::Format(format!(
            "{what} record of {} bytes is not a whole number of {sz}-byte entries",
            b.len()
        )));
    }
    b.chunks_exact(sz).map(|c| one::<T>(what, c)).collect()
}

/// Decode `state.bin` for a VM of `vcpus` vCPUs.
pub fn decode(data: &[u8], vcpus: usize) -> Result<(VmState, Vec<VcpuState>), StateError> {
    let bad = |m: String| StateError::Format(m);
    if data.len() < 16 || &data[..8] != STATE_MAGIC {
        return Err(bad("not a faultline state file (bad magic)".into()));
    }
    let version = u32::from_le_bytes(data[8..12].try_into().expect("4 bytes"));
    if !(STATE_VERSION_MIN..=STATE_VERSION).contains(&version) {
        return Err(bad(format!(
            "version {version}; this faultline reads versions {STATE_VERSION_MIN} to {STATE_VERSION}"
        )));
    }
    let records = u32::from_le_bytes(data[12..16].try_into().expect("4 bytes"));
    let mut vm = VmState::default();
    let mut parts: Vec<PartialVcpu> = (0..vcpus).map(|_| PartialVcpu::default()).collect();
    let mut at = 16usize;
    for r in 0..records {
        let hdr = data
            .get(at..at + 8)
            .ok_or_else(|| bad(format!("truncated at record {r} of {records}")))?;
        let tag = u16::from_le_bytes([hdr[0], hdr[1]]);
        let owner = u16::from_le_bytes([hdr[2], hdr[3]]);
        let len = u32::from_le_bytes(hdr[4..8].try_into().expect("4 bytes")) as usize;
        let body = data
            .get(at + 8..at + 8 + len)
            .ok_or_else(|| bad(format!("record {r} (tag {tag}) is truncated")))?;
        at += 8 + len;
        if owner == VM_OWNER {
            match tag {
                tag::CLOCK => vm.clock = Some(one("clock", body)?),
                tag::IRQCHIP => vm.irqchips.push(one("irqchip", body)?),
                tag::PIT2 => vm.pit = Some(one("PIT", body)?),
                tag::VIRTIO if version >= 2 => {
                    if vm.devices.virtio.len() >= MAX_DEVICE_RECORDS {
                        return Err(bad(format!(
                            "more than {MAX_DEVICE_RECORDS} virtio device records"
                        )));
                    }
                    vm.devices.virtio.push(body.to_vec());
                }
                tag::SERIAL if version >= 2 => {
                    if vm.devices.serial.is_some() {
                        return Err(bad("two serial port records".into()));
                    }
                    vm.devices.serial = Some(body.to_vec());
                }
                tag::VFIO_USER if version >= 3 => {
                    if vm.devices.vfio_user.len() >= MAX_DEVICE_RECORDS {
                        return Err(bad(format!(
                            "more than {MAX_DEVICE_RECORDS} vfio-user device records"
                        )));
                    }
                    vm.devices.vfio_user.push(body.to_vec());
                }
                _ => return Err(bad(format!("unknown VM record tag {tag}"))),
            }
            continue;
        }
        let p = parts.get_mut(owner as usize).ok_or_else(|| {
            bad(format!(
                "record for vCPU {owner}, but the manifest has {vcpus}"
            ))
        })?;
        match tag {
            tag::REGS => p.regs = Some(one("regs", body)?),
            tag::SREGS => p.sregs = Some(one("sregs", body)?),
            tag::FPU => {
                p.fpu = Some(fpu_from(body).ok_or_else(|| bad("FPU record of wrong size".into()))?)
            }
            tag::XSAVE => p.xsave = Some(Box::new(one("XSAVE", body)?)),
            tag::XCRS => p.xcrs = Some(one("XCRs", body)?),
            tag::MSRS => p.msrs = many("MSRs", body)?,
            tag::LAPIC => p.lapic = Some(Box::new(one("LAPIC", body)?)),
            tag::EVENTS => p.events = Some(one("vCPU events", body)?),
            tag::DEBUGREGS => p.debugregs = Some(one("debug registers", body)?),
            tag::MP_STATE => p.mp_state = Some(one("MP state", body)?),
            tag::CPUID => p.cpuid = many("CPUID", body)?,
            _ => return Err(bad(format!("unknown vCPU record tag {tag}"))),
        }
    }
    if at != data.len() {
        return Err(bad(format!(
            "{} bytes after the last record",
            data.len() - at
        )));
    }
    let vcpus = parts
        .into_iter()
        .enumerate()
        .map(|(i, p)| p.finish(i))
        .collect::<Result<Vec<_>, _>>()?;
    Ok((vm, vcpus))
}

#[derive(Default)]
struct PartialVcpu {
    regs: Option<kvm_regs>,
    sregs: Option<kvm_sregs>,
    fpu: Option<kvm_fpu>,
    xsave: Option<Box<kvm_xsave>>,
    xcrs: Option<kvm_xcrs>,
    msrs: Vec<kvm_msr_entry>,
    lapic: Option<Box<kvm_lapic_state>>,
    events: Option<kvm_vcpu_events>,
    debugregs: Option<kvm_debugregs>,
    mp_state: Option<kvm_mp_state>,
    cpuid: Vec<kvm_cpuid_entry2>,
}

impl PartialVcpu {
    fn finish(self, i: usize) -> Result<VcpuState, StateError> {
        let missing = |what: &str| StateError::Format(format!("vCPU {i} has no {what} record"));
        Ok(VcpuState {
            regs: self.regs.ok_or_else(|| missing("regs"))?,
            sregs: self.sregs.ok_or_else(|| missing("sregs"))?,
            fpu: self.fpu.ok_or_else(|| missing("FPU"))?,
            xsave: self.xsave,
            xcrs: self.xcrs,
            msrs: self.msrs,
            lapic: self.lapic,
            events: self.events.ok_or_else(|| missing("events"))?,
            debugregs: self.debugregs.ok_or_else(|| missing("debug registers"))?,
            mp_state: self.mp_state.ok_or_else(|| missing("MP state"))?,
            cpuid: self.cpuid,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvm_bindings::kvm_clock_data;

    fn sample() -> VcpuState {
        let mut regs = kvm_regs {
            rip: 0x10_1234,
            rsp: 0x20_0000,
            ..Default::default()
        };
        regs.rflags = 0x3002;
        let mut fpu = kvm_fpu {
            fcw: 0x37f,
            mxcsr: 0x1f80,
            ..Default::default()
        };
        fpu.xmm[3][5] = 9;
        VcpuState {
            regs,
            sregs: kvm_sregs::default(),
            fpu,
            xsave: Some(Box::default()),
            xcrs: Some(kvm_xcrs::default()),
            msrs: vec![kvm_msr_entry {
                index: 0xc000_0080,
                data: 0x500,
                ..Default::default()
            }],
            lapic: None,
            events: kvm_vcpu_events::default(),
            debugregs: kvm_debugregs::default(),
            mp_state: kvm_mp_state::default(),
            cpuid: vec![kvm_cpuid_entry2::default(); 3],
        }
    }

    #[test]
    fn round_trip() {
        let vm = VmState {
            clock: Some(kvm_clock_data {
                clock: 77,
                ..Default::default()
            }),
            ..Default::default()
        };
        let bytes = encode(&vm, &[sample(), sample()]);
        let (vm2, v) = decode(&bytes, 2).unwrap();
        assert_eq!(vm2.clock.unwrap().clock, 77);
        assert_eq!(v.len(), 2);
        assert_eq!(v[1].regs.rip, 0x10_1234);
        assert_eq!(v[1].fpu.xmm[3][5], 9);
        assert_eq!(v[0].msrs[0].data, 0x500);
        assert_eq!(v[0].cpuid.len(), 3);
    }

    #[test]
    fn device_records_round_trip_and_version_1_files_still_read() {
        let vm = VmState {
            devices: crate::vstate::DeviceRecords {
                virtio: vec![b"FLVS-a".to_vec(), b"FLVS-b".to_vec()],
                serial: Some(b"FLSR".to_vec()),
                vfio_user: vec![b"FLPC".to_vec()],
            },
            ..Default::default()
        };
        let bytes = encode(&vm, &[sample()]);
        let (back, _) = decode(&bytes, 1).unwrap();
        assert_eq!(back.devices, vm.devices);
        // A version 1 file: the same layout without device records.
        let mut v1 = encode(&VmState::default(), &[sample()]);
        v1[8..12].copy_from_slice(&1u32.to_le_bytes());
        let (old, cpus) = decode(&v1, 1).unwrap();
        assert_eq!(old.devices, Default::default());
        assert_eq!(cpus.len(), 1);
        // ... which cannot hold device records.
        let mut bad = bytes.clone();
        bad[8..12].copy_from_slice(&1u32.to_le_bytes());
        assert!(decode(&bad, 1).unwrap_err().to_string().contains("tag 30"));
        // A newer version is refused by name.
        let mut v4 = bytes.clone();
        v4[8..12].copy_from_slice(&4u32.to_le_bytes());
        let e = decode(&v4, 1).unwrap_err().to_string();
        assert!(e.contains("version 4") && e.contains("1 to 3"), "{e}");
        // A version 2 file cannot hold vfio-user records.
        let with_pci = VmState {
            devices: crate::vstate::DeviceRecords {
                vfio_user: vec![vec![7; 9]],
                ..Default::default()
            },
            ..Default::default()
        };
        let b = encode(&with_pci, &[sample()]);
        assert_eq!(decode(&b, 1).unwrap().0.devices.vfio_user, vec![vec![7; 9]]);
        let mut v2 = b.clone();
        v2[8..12].copy_from_slice(&2u32.to_le_bytes());
        assert!(decode(&v2, 1).unwrap_err().to_string().contains("tag 32"));
        // Two serial records, or too many virtio records, are refused.
        let two = VmState {
            devices: crate::vstate::DeviceRecords {
                virtio: vec![vec![1]; MAX_DEVICE_RECORDS + 1],
                ..Default::default()
            },
            ..Default::default()
        };
        assert!(decode(&encode(&two, &[sample()]), 1).is_err());
    }

    #[test]
    fn bad_input_is_an_error_never_a_panic() {
        let good = encode(&VmState::default(), &[sample()]);
        for cut in [0, 5, 15, 16, 17, 30, good.len() - 1] {
            assert!(decode(&good[..cut], 1).is_err(), "cut at {cut}");
        }
        let mut v = good.clone();
        v[8] = 9;
        assert!(decode(&v, 1).unwrap_err().to_string().contains("version 9"));
        assert!(decode(&good, 0).unwrap_err().to_string().contains("vCPU 0"));
        let two = decode(&good, 2).unwrap_err().to_string();
        assert!(two.contains("vCPU 1 has no regs"), "{two}");
        // Every single-byte corruption of the header area and a wrong-size record are refused
        // or decoded without panicking.
        for i in 0..good.len().min(200) {
            let mut v = good.clone();
            v[i] ^= 0xff;
            let _ = decode(&v, 1);
        }
    }
}
