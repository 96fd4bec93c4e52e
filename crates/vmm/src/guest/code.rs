//! The built-in guest's code: position-independent x86-64 assembly, assembled into the VMM
//! binary (in a data section: the host never runs it) and copied into guest memory at boot.
//!
//! It starts at a table of entry offsets, one per [`Workload`](super::Workload), and uses only
//! relative jumps and calls, so it runs wherever it is loaded. It runs at CPL 3 without a
//! kernel: no interrupts, no syscalls; it talks to the VMM through the port-I/O ABI in
//! [`abi`](super::abi).

use std::arch::global_asm;

use super::abi;

global_asm!(
    r#"
    .pushsection .rodata.faultline_guest, "a", @progbits
    .balign 4096
    .globl faultline_guest_start
faultline_guest_start:
    .quad 0x54534547454e494c                    # magic "LINEGEST"
    .quad .Lwl_fill - faultline_guest_start
    .quad .Lwl_dirty - faultline_guest_start
    .quad .Lwl_read - faultline_guest_start
    .quad .Lwl_random - faultline_guest_start
    .quad .Lwl_verify - faultline_guest_start

    # r12 = slice base, r13 = slice bytes, rbx = first page index, r14 = TSC ticks / 100 ms,
    # r15 = TSC deadline (all ones: none), rbp = seed; [rsp] = heartbeats, [rsp+8] = last one.
    .macro FL_PROLOGUE
    mov r12, rdi
    mov r13, rsi
    mov rbx, rdx
    mov r14, rcx
    mov rbp, r9
    xor eax, eax                                # heartbeat 0: the workload started
    mov dx, {hb}
    out dx, eax
    rdtsc
    shl rdx, 32
    or rax, rdx
    mov r15, -1
    lea r10, [rax + r8]
    test r8, r8
    cmovnz r15, r10
    sub rsp, 64
    mov qword ptr [rsp], 0
    mov [rsp + 8], rax
    .endm

    # rax = TSC
    .macro FL_RDTSC
    rdtsc
    shl rdx, 32
    or rax, rdx
    .endm

    .macro FL_HEARTBEAT
    inc qword ptr [rsp]
    mov rax, [rsp]
    mov dx, {hb}
    out dx, eax
    .endm

    # Every 100 ms of TSC: heartbeat, then compare the time with the deadline (flags for
    # the caller's jae/jb). Jumps to `skip` when less than 100 ms have passed.
    .macro FL_TICK skip
    FL_RDTSC
    mov r10, rax
    sub r10, [rsp + 8]
    cmp r10, r14
    jb \skip
    mov [rsp + 8], rax
    FL_HEARTBEAT
    mov rax, [rsp + 8]
    cmp rax, r15
    .endm

    .macro FL_PHASE n
    mov eax, \n
    mov dx, {phase}
    out dx, eax
    .endm

    .macro FL_FINISH
    call .Lchecksum
    call .Lreport
    xor eax, eax
    mov dx, {done}
.Ldone_\@:
    out dx, eax
    jmp .Ldone_\@
    .endm

# fill: word i of page p (index rbx + p) = ((rbx + p) * 512 + i) * FILL_MUL | 1
.Lfill:
    mov rcx, r13
    shr rcx, 12
    xor r8d, r8d
    movabs r10, {fill_mul}
.Lfill_page:
    cmp r8, rcx
    jae .Lfill_end
    lea rax, [rbx + r8]
    shl rax, 9
    mov r9, r8
    shl r9, 12
    add r9, r12
    xor r11d, r11d
.Lfill_word:
    lea rdx, [rax + r11]
    imul rdx, r10
    or rdx, 1
    mov [r9 + r11 * 8], rdx
    inc r11
    cmp r11, 512
    jb .Lfill_word
    inc r8
    jmp .Lfill_page
.Lfill_end:
    ret

# rax = checksum of the slice: h = (h ^ w) * CHECKSUM_MUL from CHECKSUM_INIT
.Lchecksum:
    mov rcx, r13
    shr rcx, 3
    movabs rax, {ck_init}
    movabs r10, {ck_mul}
    mov r9, r12
.Lck_loop:
    test rcx, rcx
    jz .Lck_end
    xor rax, [r9]
    imul rax, r10
    add r9, 8
    dec rcx
    jmp .Lck_loop
.Lck_end:
    ret

# report the checksum in rax
.Lreport:
    mov r9, rax
    mov dx, {ck_lo}
    out dx, eax
    mov rax, r9
    shr rax, 32
    mov dx, {ck_hi}
    out dx, eax
    ret

.Lwl_fill:
    FL_PROLOGUE
    call .Lfill
    FL_FINISH

.Lwl_verify:
    FL_PROLOGUE
    FL_FINISH

# dirty (memload.c "write"): fill, then forever: page p += 1 at word (passes + p) & 511;
# every 256 pages check the clock; heartbeat every 100 ms.
.Lwl_dirty:
    FL_PROLOGUE
    call .Lfill
    FL_PHASE {ready}
    FL_RDTSC
    mov [rsp + 8], rax
    xor esi, esi
    mov r9, r13
    shr r9, 12
.Ldirty_pass:
    xor r8d, r8d
.Ldirty_page:
    lea rax, [rsi + r8]
    and eax, 511
    mov r10, r8
    shl r10, 12
    add r10, r12
    inc qword ptr [r10 + rax * 8]
    mov eax, r8d
    and eax, 255
    cmp eax, 255
    jne .Ldirty_next
    FL_TICK .Ldirty_next
    jae .Ldirty_end
.Ldirty_next:
    inc r8
    cmp r8, r9
    jb .Ldirty_page
    inc rsi
    jmp .Ldirty_pass
.Ldirty_end:
    FL_FINISH

# read (memload.c "read"): fill, then forever: wait 100 ms on the TSC (sleeping through the
# VMM), read the first word of 1 page in 64 (starting at heartbeats % 64), heartbeat.
.Lwl_read:
    FL_PROLOGUE
    call .Lfill
    FL_PHASE {ready}
    FL_RDTSC
    mov [rsp + 8], rax
    mov r9, r13
    shr r9, 12
.Lread_loop:
    mov rsi, [rsp + 8]
    add rsi, r14
.Lread_wait:
    FL_RDTSC
    cmp rax, rsi
    jae .Lread_go
    mov rcx, rsi
    sub rcx, rax
    mov rax, rcx
    mov ecx, 100000
    mul rcx
    div r14
    inc eax
    mov dx, {sleep}
    out dx, eax
    jmp .Lread_wait
.Lread_go:
    mov r8, [rsp]
    and r8, 63
    xor r10d, r10d
.Lread_page:
    cmp r8, r9
    jae .Lread_hb
    mov rax, r8
    shl rax, 12
    add r10, [r12 + rax]
    add r8, 64
    jmp .Lread_page
.Lread_hb:
    FL_RDTSC
    mov [rsp + 8], rax
    FL_HEARTBEAT
    mov rax, [rsp + 8]
    cmp rax, r15
    jae .Lread_end
    jmp .Lread_loop
.Lread_end:
    FL_FINISH

# random: x = seed | 1; per touch: x = xorshift(x); word (x >> 55) of page (x % pages) += x.
# Without a run time: 2 touches per page, then done. With one: until the deadline, checking
# the clock every 256 touches and sending a heartbeat every 100 ms.
.Lwl_random:
    FL_PROLOGUE
    mov rsi, rbp
    or rsi, 1
    mov r9, r13
    shr r9, 12
    lea r11, [r9 + r9]
    cmp r15, -1
    je .Lrand_loop
    mov r11, -1
.Lrand_loop:
    test r11, r11
    jz .Lrand_end
    mov rax, rsi
    shl rax, 13
    xor rsi, rax
    mov rax, rsi
    shr rax, 7
    xor rsi, rax
    mov rax, rsi
    shl rax, 17
    xor rsi, rax
    mov rax, rsi
    xor edx, edx
    div r9
    shl rdx, 12
    add rdx, r12
    mov rcx, rsi
    shr rcx, 55
    add [rdx + rcx * 8], rsi
    dec r11
    test r11b, r11b
    jnz .Lrand_loop
    FL_TICK .Lrand_loop
    jb .Lrand_loop
.Lrand_end:
    FL_FINISH

    .balign 8
    .globl faultline_guest_end
faultline_guest_end:
    .popsection
"#,
    hb = const abi::PORT_HEARTBEAT,
    phase = const abi::PORT_PHASE,
    done = const abi::PORT_DONE,
    ck_lo = const abi::PORT_CHECKSUM_LO,
    ck_hi = const abi::PORT_CHECKSUM_HI,
    sleep = const abi::PORT_SLEEP_US,
    ready = const abi::PHASE_READY,
    fill_mul = const abi::FILL_MUL,
    ck_init = const abi::CHECKSUM_INIT,
    ck_mul = const abi::CHECKSUM_MUL,
);

unsafe extern "C" {
    static faultline_guest_start: u8;
    static faultline_guest_end: u8;
}

/// Magic at the start of the guest image.
pub const MAGIC: u64 = 0x5453_4547_454e_494c;

/// The assembled guest image: the entry table followed by the code.
pub fn image() -> &'static [u8] {
    // SAFETY: both symbols are defined by the global_asm! above, in one section, start before
    // end; the bytes between them are immutable data for the life of the program.
    unsafe {
        let start = &raw const faultline_guest_start;
        let end = &raw const faultline_guest_end;
        std::slice::from_raw_parts(start, end.offset_from(start) as usize)
    }
}

/// Offset of workload `index`'s entry point in [`image`].
pub fn entry_offset(index: usize) -> u64 {
    let img = image();
    let at = 8 * (1 + index);
    u64::from_le_bytes(img[at..at + 8].try_into().expect("8-byte table entry"))
}
