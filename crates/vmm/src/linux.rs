//! Booting a Linux kernel: an ELF `vmlinux` through its PVH entry (32-bit protected mode,
//! `ebx` = `hvm_start_info`), or a `bzImage` through the 64-bit boot protocol (long mode,
//! `rsi` = `boot_params`), with the command line, an e820 map and an initramfs. Loading and the
//! boot structures are `linux-loader`'s; this module places them and sets the vCPU.
//!
//! Low memory: GDT at `0x500`, IDT at `0x520`, `hvm_start_info` at `0x6000` (modules at
//! `0x6040`), `boot_params` or the PVH memory map at `0x7000`, page tables (64-bit boot) at
//! `0x9000..0xc000`, command line at `0x20000`; the kernel at its load address (1 MiB and up);
//! the initramfs at the top of memory.

use std::fs::File;
use std::path::{Path, PathBuf};

use kvm_bindings::{kvm_regs, kvm_segment, kvm_sregs};
use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::pvh::PvhBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params};
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
};
use linux_loader::loader::{BzImage, Cmdline, Elf, KernelLoader, PvhBootCapability, load_cmdline};
use serde::Serialize;

use crate::cpl3::seg;
use thiserror::Error;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// What to boot.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct LinuxBoot {
    /// ELF `vmlinux` (PVH entry) or `bzImage`.
    pub kernel: PathBuf,
    /// An initramfs (cpio, optionally compressed).
    pub initrd: Option<PathBuf>,
    /// The kernel command line.
    pub cmdline: String,
}

/// The default command line: console and early console on ttyS0.
pub const DEFAULT_CMDLINE: &str =
    "console=ttyS0 earlyprintk=serial,ttyS0,115200 reboot=k panic=1 nokaslr";

/// Loading a kernel.
#[derive(Debug, Error)]
pub enum BootError {
    /// The kernel or initrd file cannot be read.
    #[error("cannot read {what} {path}")]
    Read {
        /// Kernel or initrd.
        what: &'static str,
        /// The path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// Neither an ELF with a PVH note nor a bzImage.
    #[error("{path} is not a bootable kernel (ELF vmlinux with a PVH note, or bzImage): {why}")]
    NotAKernel {
        /// The path.
        path: PathBuf,
        /// What the loaders said.
        why: String,
    },
    /// The command line is invalid or too long.
    #[error("invalid kernel command line: {0}")]
    Cmdline(String),
    /// The initrd does not fit above the kernel.
    #[error("the initrd ({size} bytes) does not fit in guest memory above the kernel")]
    InitrdTooBig {
        /// Its size.
        size: u64,
    },
    /// Writing boot structures failed.
    #[error("writing {what} into guest memory failed")]
    Write {
        /// What was being written.
        what: &'static str,
        /// The cause (a guest-memory or boot-configurator error).
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

const GDT: u64 = 0x500;
const IDT: u64 = 0x520;
const START_INFO: u64 = 0x6000;
const MODLIST: u64 = 0x6040;
const ZERO_PAGE: u64 = 0x7000;
const MEMMAP: u64 = 0x7000;
const PML4: u64 = 0x9000;
const CMDLINE: u64 = 0x20000;
const CMDLINE_MAX: usize = 4096;
const HIMEM: u64 = 0x10_0000;
const EBDA: u64 = 0x9fc00;

/// The boot CPU's entry state.
pub struct Entry {
    /// Registers.
    pub regs: kvm_regs,
    /// What to change in the reset `sregs`.
    pub sregs: fn(kvm_sregs) -> kvm_sregs,
    /// How the kernel was entered.
    pub protocol: &'static str,
}

fn open(what: &'static str, path: &Path) -> Result<File, BootError> {
    File::open(path).map_err(|source| BootError::Read {
        what,
        path: path.to_path_buf(),
        source,
    })
}

fn tss() -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0x67,
        selector: 0x18,
        type_: 0xb,
        present: 1,
        ..Default::default()
    }
}

/// Flat CPL-0 segments, the GDT and IDT above; `long`: 64-bit code, paging and long mode
/// (the 64-bit boot protocol), otherwise 32-bit protected mode without paging (PVH).
fn boot_sregs(mut s: kvm_sregs, long: bool) -> kvm_sregs {
    s.cs = seg(0x08, 0xb, 0, long);
    let d = seg(0x10, 0x3, 0, false);
    (s.ds, s.es, s.fs, s.gs, s.ss) = (d, d, d, d, d);
    s.tr = tss();
    s.gdt.base = GDT;
    s.gdt.limit = 4 * 8 - 1;
    s.idt.base = IDT;
    s.idt.limit = 7;
    if long {
        s.cr0 = 0x8000_0011; // PE | ET | PG
        s.cr3 = PML4;
        s.cr4 = 0x20; // PAE
        s.efer = 0x500; // LME | LMA
    } else {
        s.cr0 = 0x11; // PE | ET
        s.cr4 = 0;
        s.efer = 0;
    }
    s
}

fn pvh_sregs(s: kvm_sregs) -> kvm_sregs {
    boot_sregs(s, false)
}

fn long_sregs(s: kvm_sregs) -> kvm_sregs {
    boot_sregs(s, true)
}

fn w<T: vm_memory::ByteValued>(
    mem: &GuestMemoryMmap,
    v: T,
    at: u64,
    what: &'static str,
) -> Result<(), BootError> {
    mem.write_obj(v, GuestAddress(at))
        .map_err(|e| BootError::Write {
            what,
            source: Box::new(e),
        })
}

/// Load `boot` into `mem` (`mem_size` bytes) and return the boot CPU's entry state.
pub fn load(mem: &GuestMemoryMmap, mem_size: u64, boot: &LinuxBoot) -> Result<Entry, BootError> {
    // GDT: null, code (32-bit for PVH, 64-bit for the 64-bit protocol: patched below), data, TSS.
    let mut kernel = open("kernel", &boot.kernel)?;
    let elf = Elf::load(mem, None, &mut kernel, Some(GuestAddress(HIMEM)));
    let (loaded, pvh_entry, bz) = match elf {
        Ok(r) => match r.pvh_boot_cap {
            PvhBootCapability::PvhEntryPresent(e) => (r, Some(e.0), false),
            _ => {
                return Err(BootError::NotAKernel {
                    path: boot.kernel.clone(),
                    why: "ELF without a PVH entry note (use the bzImage)".into(),
                });
            }
        },
        Err(elf_err) => {
            let mut kernel = open("kernel", &boot.kernel)?;
            match BzImage::load(mem, None, &mut kernel, Some(GuestAddress(HIMEM))) {
                Ok(r) => (r, None, true),
                Err(bz_err) => {
                    return Err(BootError::NotAKernel {
                        path: boot.kernel.clone(),
                        why: format!("as ELF: {elf_err}; as bzImage: {bz_err}"),
                    });
                }
            }
        }
    };
    let code = if bz {
        0x00af_9b00_0000_ffffu64
    } else {
        0x00cf_9b00_0000_ffff
    };
    for (i, e) in [0u64, code, 0x00cf_9300_0000_ffff, 0x0000_8b00_0000_0067]
        .into_iter()
        .enumerate()
    {
        w(mem, e, GDT + 8 * i as u64, "the GDT")?;
    }
    w(mem, 0u64, IDT, "the IDT")?;

    let mut cmdline = Cmdline::new(CMDLINE_MAX).map_err(|e| BootError::Cmdline(e.to_string()))?;
    cmdline
        .insert_str(&boot.cmdline)
        .map_err(|e| BootError::Cmdline(e.to_string()))?;
    load_cmdline(mem, GuestAddress(CMDLINE), &cmdline).map_err(|e| BootError::Write {
        what: "the command line",
        source: Box::new(e),
    })?;
    let cmdline_len = boot.cmdline.len() as u32 + 1;

    // The initramfs goes at the top of memory, page-aligned.
    let initrd = match &boot.initrd {
        None => None,
        Some(p) => {
            let data = std::fs::read(p).map_err(|source| BootError::Read {
                what: "initrd",
                path: p.clone(),
                source,
            })?;
            let size = data.len() as u64;
            let at = mem_size.checked_sub(size).map(|a| a & !0xfff);
            let at = match at {
                Some(a) if a > loaded.kernel_end => a,
                _ => return Err(BootError::InitrdTooBig { size }),
            };
            mem.write_slice(&data, GuestAddress(at))
                .map_err(|e| BootError::Write {
                    what: "the initrd",
                    source: Box::new(e),
                })?;
            Some((at, size))
        }
    };

    if let Some(entry) = pvh_entry {
        let mut info = hvm_start_info {
            magic: 0x336e_c578,
            version: 1,
            cmdline_paddr: CMDLINE,
            memmap_paddr: MEMMAP,
            memmap_entries: 2,
            rsdp_paddr: crate::acpi::RSDP_ADDR,
            ..Default::default()
        };
        let memmap = [
            hvm_memmap_table_entry {
                addr: 0,
                size: EBDA,
                type_: 1,
                reserved: 0,
            },
            hvm_memmap_table_entry {
                addr: HIMEM,
                size: mem_size - HIMEM,
                type_: 1,
                reserved: 0,
            },
        ];
        let mut params = BootParams::new(&info, GuestAddress(START_INFO));
        params.set_sections(&memmap, GuestAddress(MEMMAP));
        if let Some((at, size)) = initrd {
            info.nr_modules = 1;
            info.modlist_paddr = MODLIST;
            params = BootParams::new(&info, GuestAddress(START_INFO));
            params.set_sections(&memmap, GuestAddress(MEMMAP));
            params.set_modules(
                &[hvm_modlist_entry {
                    paddr: at,
                    size,
                    cmdline_paddr: 0,
                    reserved: 0,
                }],
                GuestAddress(MODLIST),
            );
        }
        PvhBootConfigurator::write_bootparams::<GuestMemoryMmap>(&params, mem).map_err(|e| {
            BootError::Write {
                what: "hvm_start_info",
                source: Box::new(e),
            }
        })?;
        return Ok(Entry {
            regs: kvm_regs {
                rip: entry,
                rbx: START_INFO,
                rflags: 2,
                ..Default::default()
            },
            sregs: pvh_sregs,
            protocol: "pvh",
        });
    }

    // bzImage: boot_params ("zero page") and identity page tables for the first GiB.
    let mut bp = boot_params::default();
    if let Some(h) = loaded.setup_header {
        bp.hdr = h;
    }
    bp.hdr.type_of_loader = 0xff;
    bp.hdr.boot_flag = 0xaa55;
    bp.hdr.header = 0x5372_6448;
    bp.hdr.cmd_line_ptr = CMDLINE as u32;
    bp.hdr.cmdline_size = cmdline_len;
    bp.hdr.kernel_alignment = 0x100_0000;
    if let Some((at, size)) = initrd {
        bp.hdr.ramdisk_image = at as u32;
        bp.hdr.ramdisk_size = size as u32;
    }
    let e820 = [(0u64, EBDA), (HIMEM, mem_size - HIMEM)];
    for (i, (addr, size)) in e820.iter().enumerate() {
        bp.e820_table[i] = boot_e820_entry {
            addr: *addr,
            size: *size,
            r#type: 1,
        };
    }
    bp.e820_entries = e820.len() as u8;
    LinuxBootConfigurator::write_bootparams::<GuestMemoryMmap>(
        &BootParams::new(&bp, GuestAddress(ZERO_PAGE)),
        mem,
    )
    .map_err(|e| BootError::Write {
        what: "boot_params",
        source: Box::new(e),
    })?;
    let (pdpt, pd) = (PML4 + 0x1000, PML4 + 0x2000);
    w(mem, pdpt | 3, PML4, "page tables")?;
    w(mem, pd | 3, pdpt, "page tables")?;
    for i in 0..512u64 {
        w(mem, (i << 21) | 0x83, pd + 8 * i, "page tables")?;
    }
    Ok(Entry {
        regs: kvm_regs {
            rip: loaded.kernel_load.0 + 0x200,
            rsi: ZERO_PAGE,
            rflags: 2,
            ..Default::default()
        },
        sregs: long_sregs,
        protocol: "bzimage-64",
    })
}
