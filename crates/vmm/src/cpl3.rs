//! Starting a vCPU directly in 64-bit user mode (CPL 3), with no guest kernel.
//!
//! The VMM writes into guest memory an identity map (2 MiB pages, User bit at every level), a
//! GDT with kernel and user segments and a 64-bit TSS, and sets the segment and control
//! registers through `KVM_SET_SREGS`, as measured to work under PVM (see `shared/PVM.md`) and as
//! VMX/SVM guest-state checks require (busy TSS in TR, unusable LDTR).
//!
//! Guest-physical layout:
//!
//! | range | use |
//! |---|---|
//! | `0x1000` | GDT |
//! | `0x2000` | IDT (empty: an exception is a triple fault, reported as a clear error; the irq workloads get theirs, [`write_idt`]) |
//! | `0x3000` | TSS, with an I/O bitmap allowing every port |
//! | `0x8000..` | PML4, PDPT, one page directory per GiB |
//! | `0x10_0000` | guest code ([`guest::image`](crate::guest::image)) |
//! | `0x20_0000..0x30_0000` | stacks, 16 KiB per vCPU |
//! | `0x40_0000..` | the workload area, split into one slice per vCPU |

use kvm_bindings::{kvm_regs, kvm_segment, kvm_sregs};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// GDT address.
pub const GDT: u64 = 0x1000;
/// IDT address.
pub const IDT: u64 = 0x2000;
/// TSS address.
pub const TSS: u64 = 0x3000;
/// PML4 address (CR3).
pub const PML4: u64 = 0x8000;
/// Guest code address.
pub const CODE: u64 = 0x10_0000;
/// Bottom of the stack area.
pub const STACKS: u64 = 0x20_0000;
/// Stack size per vCPU.
pub const STACK_SIZE: u64 = 16 * 1024;
/// Start of the workload area.
pub const WORKLOAD: u64 = 0x40_0000;
/// Most vCPUs the stack area holds.
pub const MAX_VCPUS: u64 = (WORKLOAD - 0x10_0000 - STACKS) / STACK_SIZE;
/// Most guest memory the page tables map (page directories fit below the code).
pub const MAX_MEM: u64 = ((CODE - PML4 - 0x2000) / 0x1000) << 30;

/// TSS limit: 104-byte header, 8 KiB I/O bitmap, the terminating 0xff byte.
pub const TSS_LIMIT: u64 = 0x68 + 8192;

/// User data selector (GDT entry 5, RPL 3), as Linux's `__USER_DS`.
pub const USER_DS: u16 = 0x2b;
/// User 64-bit code selector (GDT entry 6, RPL 3), as Linux's `__USER_CS`.
pub const USER_CS: u16 = 0x33;
/// TSS selector (GDT entries 8-9).
pub const TSS_SEL: u16 = 0x40;

const PTE_P: u64 = 1;
const PTE_W: u64 = 1 << 1;
const PTE_U: u64 = 1 << 2;
const PTE_PS: u64 = 1 << 7;

/// Write the GDT, TSS and identity page tables for `mem_size` bytes of guest memory,
/// mapping `map_bytes` (at least `mem_size`; more to reach device BARs above memory).
pub fn write_tables(
    mem: &GuestMemoryMmap,
    mem_size: u64,
    map_bytes: u64,
) -> Result<(), vm_memory::GuestMemoryError> {
    let mem_size = map_bytes.max(mem_size);
    // GDT: null, kernel code/data, user data (5), user code (6), TSS (8-9).
    let mut gdt = [0u64; 10];
    gdt[1] = 0x00af_9b00_0000_ffff;
    gdt[2] = 0x00cf_9300_0000_ffff;
    gdt[5] = 0x00cf_f300_0000_ffff;
    gdt[6] = 0x00af_fb00_0000_ffff;
    let (base, limit) = (TSS, TSS_LIMIT);
    gdt[8] = (limit & 0xffff)
        | ((base & 0xff_ffff) << 16)
        | (0x8b << 40) // present, type 11: busy 64-bit TSS
        | (((base >> 24) & 0xff) << 56);
    gdt[9] = base >> 32;
    for (i, e) in gdt.iter().enumerate() {
        mem.write_obj(*e, GuestAddress(GDT + 8 * i as u64))?;
    }
    // TSS: RSP0 at the top of the stack area (unused until the guest takes interrupts), and an
    // all-zero I/O permission bitmap (every port allowed) after the 104-byte header: IOPL 3
    // alone allows CPL 3 port I/O on hardware, but PVM checks the bitmap.
    mem.write_slice(&[0u8; TSS_LIMIT as usize + 1], GuestAddress(TSS))?;
    mem.write_obj(WORKLOAD - 16, GuestAddress(TSS + 4))?;
    mem.write_obj(0x68u16, GuestAddress(TSS + 0x66))?;
    mem.write_obj(0xffu8, GuestAddress(TSS + TSS_LIMIT))?;
    // Page tables: PML4[0] -> PDPT; PDPT[g] -> PD g; PD entries map 2 MiB pages.
    let pdpt = PML4 + 0x1000;
    mem.write_obj(pdpt | PTE_P | PTE_W | PTE_U, GuestAddress(PML4))?;
    let gibs = mem_size.div_ceil(1 << 30);
    for g in 0..gibs {
        let pd = pdpt + 0x1000 * (1 + g);
        mem.write_obj(pd | PTE_P | PTE_W | PTE_U, GuestAddress(pdpt + 8 * g))?;
        for e in 0..512u64 {
            let addr = (g << 30) | (e << 21);
            if addr >= mem_size {
                break;
            }
            mem.write_obj(
                addr | PTE_P | PTE_W | PTE_U | PTE_PS,
                GuestAddress(pd + 8 * e),
            )?;
        }
    }
    Ok(())
}

/// Kernel 64-bit code selector (GDT entry 1).
pub const KERNEL_CS: u16 = 0x08;
/// IDT limit with all 256 gates.
pub const IDT_LIMIT: u16 = 256 * 16 - 1;

/// Write the irq workloads' IDT: a gate for `vector` to `handler` (guest-virtual) and gates
/// for the exceptions (0..32) to the reporters at `exception_stubs` (16 bytes each), all
/// entered at privilege `cpl`: 0 through the kernel code segment (a privilege change: the CPU
/// switches to the TSS's RSP0), 3 through the user code segment, whose DPL 3 makes the handler
/// run at the interrupted code's privilege on its stack. Every other vector has no gate.
pub fn write_idt(
    mem: &GuestMemoryMmap,
    vector: u8,
    handler: u64,
    exception_stubs: u64,
    cpl: u8,
) -> Result<(), vm_memory::GuestMemoryError> {
    mem.write_slice(&[0u8; IDT_LIMIT as usize + 1], GuestAddress(IDT))?;
    let sel = if cpl == 3 { USER_CS } else { KERNEL_CS };
    let gate = |v: u8, to: u64| -> Result<(), vm_memory::GuestMemoryError> {
        // P, DPL 0 (the gate's DPL only limits software `int`), IST 0; type 0xe, a 64-bit
        // interrupt gate (IF cleared on entry) for CPL 0, 0xf, a trap gate (IF kept) for
        // CPL 3: under PVM a CPL-3 `iretq` runs natively and cannot set the guest's IF again
        // (PVM keeps it virtual), so an interrupt gate would leave interrupts off for good.
        let attrs: u64 = if cpl == 3 { 0x8f } else { 0x8e };
        let lo =
            (to & 0xffff) | (u64::from(sel) << 16) | (attrs << 40) | (((to >> 16) & 0xffff) << 48);
        let at = IDT + 16 * u64::from(v);
        mem.write_obj(lo, GuestAddress(at))?;
        mem.write_obj(to >> 32, GuestAddress(at + 8))
    };
    for v in 0..32u8 {
        gate(v, exception_stubs + 16 * u64::from(v))?;
    }
    gate(vector, handler)
}

/// A flat 4 GiB segment at privilege `dpl`: 64-bit code if `code` (L=1), else 32-bit (D/B=1).
pub(crate) fn seg(selector: u16, type_: u8, dpl: u8, code: bool) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_,
        present: 1,
        dpl,
        db: u8::from(!code),
        s: 1,
        l: u8::from(code),
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}

/// Long mode, paging, CPL 3 segments and the TSS, on top of the vCPU's reset `sregs`.
pub fn user_mode_sregs(mut s: kvm_sregs) -> kvm_sregs {
    s.cs = seg(USER_CS, 0xb, 3, true);
    let data = seg(USER_DS, 0x3, 3, false);
    s.ds = data;
    s.es = data;
    s.fs = data;
    s.gs = data;
    s.ss = data;
    s.tr = kvm_segment {
        base: TSS,
        limit: TSS_LIMIT as u32,
        selector: TSS_SEL,
        type_: 0xb,
        present: 1,
        dpl: 0,
        db: 0,
        s: 0,
        l: 0,
        g: 0,
        avl: 0,
        unusable: 0,
        padding: 0,
    };
    s.ldt = kvm_segment {
        unusable: 1,
        type_: 0x2,
        ..Default::default()
    };
    s.gdt.base = GDT;
    s.gdt.limit = 10 * 8 - 1;
    s.idt.base = IDT;
    s.idt.limit = 0;
    // CR0: PE MP ET NE WP PG. CR4: PAE OSFXSR OSXMMEXCPT. EFER: LME LMA.
    s.cr0 = 0x8001_0033;
    s.cr4 = 0x620;
    s.cr3 = PML4;
    s.efer = 0x500;
    s
}

/// Registers at a workload's entry (see [`guest::abi`](crate::guest::abi)).
#[allow(clippy::too_many_arguments)]
pub fn entry_regs(
    entry: u64,
    vcpu: u64,
    slice_start: u64,
    slice_len: u64,
    first_page: u64,
    tsc_per_100ms: u64,
    run_ticks: u64,
    seed: u64,
) -> kvm_regs {
    kvm_regs {
        rip: CODE + entry,
        rsp: STACKS + (vcpu + 1) * STACK_SIZE - 64,
        rflags: 0x3002,
        rdi: slice_start,
        rsi: slice_len,
        rdx: first_page,
        rcx: tsc_per_100ms,
        r8: run_ticks,
        r9: seed,
        ..Default::default()
    }
}
