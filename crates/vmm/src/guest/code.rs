//! The built-in guest's code: position-independent x86-64 assembly, assembled into the VMM
//! binary (in a data section: the host never runs it) and copied into guest memory at boot.
//!
//! It starts at a table of entry offsets, one per [`Workload`](super::Workload), and uses only
//! relative jumps and calls, so it runs wherever it is loaded. It runs at CPL 3 without a
//! kernel: no syscalls, no interrupts (but for the irq workloads' handler); it talks to the VMM through the port-I/O ABI in
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
    .quad .Lwl_devices - faultline_guest_start
    .quad .Lwl_irq - faultline_guest_start
    .quad .Lwl_irq_cpl0 - faultline_guest_start
    .quad .Lirq_handler - faultline_guest_start  # not a workload: the irq workloads' handler
    .quad .Lexc_stubs - faultline_guest_start    # and their exception reporters, 16 B each
    .quad .Lwl_virtio - faultline_guest_start   # the virtio workload (after the two slots above)
    .quad .Lwl_devices_soak - faultline_guest_start

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

# devices: only the vCPU whose first page index (rbx) is 0 works; the others report done 0.
# Pass 1 reports every function 0 on bus 0; pass 2 tests the GPIO cards and DMA engines.
# rbp = device number, r15d = exit code (0, or 1 once a test failed).
.Lwl_devices:
    FL_PROLOGUE
    xor eax, eax
    test rbx, rbx
    jnz .Ldev_done
    xor r15d, r15d
    xor ebp, ebp
.Ldev_list:
    mov ecx, ebp
    shl ecx, 11
    call .Lpci_rd
    cmp ax, 0xffff
    je .Ldev_list_next
    mov ecx, {key_pci}
    call .Lkv
.Ldev_list_next:
    inc ebp
    cmp ebp, 32
    jb .Ldev_list
    xor ebp, ebp
.Ldev_test:
    mov ecx, ebp
    shl ecx, 11
    call .Lpci_rd
    cmp eax, {id_gpio}
    jne .Ldev_test_dma
    call .Ldev_gpio
    jmp .Ldev_test_next
.Ldev_test_dma:
    cmp eax, {id_dma}
    jne .Ldev_test_next
    call .Ldev_dma
.Ldev_test_next:
    inc ebp
    cmp ebp, 32
    jb .Ldev_test
    mov eax, r15d
.Ldev_done:
    mov dx, {done}
    out dx, eax
    jmp .Ldev_done

# eax = PCI configuration dword at ecx = dev << 11 | reg (bus 0). Clobbers rdx.
.Lpci_rd:
    mov eax, ecx
    or eax, 0x80000000
    mov dx, {pci_addr}
    out dx, eax
    mov dx, {pci_data}
    in eax, dx
    ret

# PCI configuration dword at ecx = dev << 11 | reg (bus 0) = eax. Clobbers rdx, r10.
.Lpci_wr:
    mov r10d, eax
    mov eax, ecx
    or eax, 0x80000000
    mov dx, {pci_addr}
    out dx, eax
    mov eax, r10d
    mov dx, {pci_data}
    out dx, eax
    ret

# rax = address of the memory BAR at configuration register ecx = dev << 11 | reg (64-bit
# BARs: with the next register). Clobbers rdx, r11.
.Lpci_bar:
    call .Lpci_rd
    mov r11d, eax
    and r11d, -16
    and eax, 6
    cmp eax, 4
    jne .Lpci_bar_end
    add ecx, 4
    call .Lpci_rd
    sub ecx, 4
    shl rax, 32
    or r11, rax
.Lpci_bar_end:
    mov rax, r11
    ret

# report key ecx with value eax. Clobbers rax, rdx, r10.
.Lkv:
    mov r10d, eax
    mov eax, ecx
    mov dx, {key}
    out dx, eax
    mov eax, r10d
    mov dx, {value}
    out dx, eax
    ret

# GPIO card at device ebp (gpio-pci-idio-16 layout in BAR2): for k in 0..256 write k to
# output byte BAR2+0 and !k to BAR2+4, read them back from input bytes BAR2+1 / BAR2+5.
# Clobbers rax, rcx, rdx, rdi, r8, r10, r11.
.Ldev_gpio:
    mov ecx, ebp
    shl ecx, 11
    or ecx, 0x18
    call .Lpci_bar
    mov rdi, rax
    mov ecx, ebp
    shl ecx, 11
    or ecx, 0x04
    mov eax, 6                                  # memory space + bus master
    call .Lpci_wr
    xor ecx, ecx
    xor r8d, r8d
.Lgpio_loop:
    mov byte ptr [rdi], cl
    mov dl, cl
    not dl
    mov byte ptr [rdi + 4], dl
    mov al, byte ptr [rdi + 1]
    cmp al, cl
    je .Lgpio_hi
    inc r8d
.Lgpio_hi:
    mov al, byte ptr [rdi + 5]
    cmp al, dl
    je .Lgpio_next
    inc r8d
.Lgpio_next:
    inc ecx
    cmp ecx, {gpio_iters}
    jb .Lgpio_loop
    mov ecx, {key_gpio_iters}
    mov eax, {gpio_iters}
    call .Lkv
    mov ecx, {key_gpio_mis}
    mov eax, r8d
    call .Lkv
    mov eax, 1
    test r8d, r8d
    cmovnz r15d, eax
    ret

# DMA engine at device ebp: r8 = BAR0 (registers, MSI-X table at 0x800), r9 = BAR2 (device
# memory), then r9d = copies ok; rbx (saved) = copies failed, rsi = copy number.
# Clobbers rax, rcx, rdx, rsi, rdi, r8 - r11.
.Ldev_dma:
    push rbx
    mov ecx, ebp
    shl ecx, 11
    or ecx, 0x04
    mov eax, 6                                  # memory space + bus master
    call .Lpci_wr
    mov ecx, ebp
    shl ecx, 11
    or ecx, 0x10
    call .Lpci_bar
    mov r8, rax
    mov ecx, ebp
    shl ecx, 11
    or ecx, 0x18
    call .Lpci_bar
    mov r9, rax
    # MSI-X: walk the capability list (at most 16 steps) for id 0x11
    mov ecx, ebp
    shl ecx, 11
    or ecx, 0x34
    call .Lpci_rd
    movzx esi, al
    mov edi, 16
.Lmsix_walk:
    and esi, 0xfc
    jz .Lmsix_done
    mov ecx, ebp
    shl ecx, 11
    or ecx, esi
    call .Lpci_rd
    cmp al, 0x11
    je .Lmsix_found
    movzx esi, ah
    dec edi
    jnz .Lmsix_walk
    jmp .Lmsix_done
.Lmsix_found:
    or eax, 0x80000000                          # MSI-X enable
    call .Lpci_wr
    mov dword ptr [r8 + 0x800], 0xfee00000      # table entry 0: addr lo, addr hi, data, control
    mov dword ptr [r8 + 0x804], 0
    mov dword ptr [r8 + 0x808], 0x41
    mov dword ptr [r8 + 0x80c], 0
.Lmsix_done:
    movabs rax, {bar_magic}
    mov qword ptr [r9 + {bar_off}], rax
    mov ecx, {key_bar}
    mov eax, {bar_magic_lo}
    call .Lkv
    xor esi, esi
    xor r9d, r9d
    xor ebx, ebx
    movabs r10, {fill_mul}
.Ldma_iter:
    # src word j = (i * FILL_MUL) ^ j at slice + DMA_LEN; dst (slice + 1 MiB) zeroed
    mov r11, rsi
    imul r11, r10
    xor edi, edi
.Ldma_fill:
    mov rax, r11
    xor rax, rdi
    mov [r12 + {dma_len} + rdi * 8], rax
    mov qword ptr [r12 + 0x100000 + rdi * 8], 0
    inc edi
    cmp edi, {dma_len} / 8
    jb .Ldma_fill
    # descriptor at the slice's start: src, dst, len, flags 1, status 0, 0
    lea rax, [r12 + {dma_len}]
    mov [r12], rax
    lea rax, [r12 + 0x100000]
    mov [r12 + 8], rax
    mov dword ptr [r12 + 16], {dma_len}
    mov dword ptr [r12 + 20], 1
    mov dword ptr [r12 + 24], 0
    mov dword ptr [r12 + 28], 0
    mov qword ptr [r8 + 0x08], r12              # descriptor address
    mov dword ptr [r8 + 0x10], 1                # doorbell
    FL_RDTSC
    imul rdi, r14, 20                           # 2 s
    add rdi, rax
.Ldma_poll:
    mov eax, dword ptr [r12 + 24]
    test eax, eax
    jnz .Ldma_status
    FL_RDTSC
    cmp rax, rdi
    jae .Ldma_bad
    mov eax, 20
    mov dx, {sleep}
    out dx, eax
    jmp .Ldma_poll
.Ldma_status:
    cmp eax, 1
    jne .Ldma_bad
    xor edi, edi
.Ldma_cmp:
    mov rax, r11
    xor rax, rdi
    cmp rax, [r12 + 0x100000 + rdi * 8]
    jne .Ldma_bad
    inc edi
    cmp edi, {dma_len} / 8
    jb .Ldma_cmp
    inc r9d
    jmp .Ldma_next
.Ldma_bad:
    inc ebx
.Ldma_next:
    inc esi
    cmp esi, {dma_iters}
    jb .Ldma_iter
    mov eax, dword ptr [r8 + 0x18]              # completed count
    mov ecx, {key_dma_done}
    call .Lkv
    mov ecx, {key_dma_ok}
    mov eax, r9d
    call .Lkv
    mov ecx, {key_dma_failed}
    mov eax, ebx
    call .Lkv
    mov eax, 1
    test ebx, ebx
    cmovnz r15d, eax
    cmp r9d, {dma_iters}
    cmovne r15d, eax
    pop rbx
    ret

# irq (CPL 3 handler) and irq-cpl0 (CPL 0 handler; the VMM's IDT is the only difference):
# the VMM starts them with RFLAGS.IF set (under PVM `sti` at CPL 3 faults, IOPL 3 or not);
# ready, then spin with pause until the run time is up. The handler below does the work.
.Lwl_irq_cpl0:
    nop
.Lwl_irq:
    FL_PROLOGUE
    FL_PHASE {ready}
.Lirq_spin:
    pause
    FL_RDTSC
    cmp rax, r15
    jb .Lirq_spin
    xor eax, eax                                # (no cli: it faults at CPL 3 under PVM too)
    mov dx, {done}
.Lirq_done:
    out dx, eax
    jmp .Lirq_done

# The interrupt handler (IDT vector abi::IRQ_VECTOR), at CPL 3 or CPL 0: arrival TSC to
# IRQ_AREA + 8; if IRQ_AREA + 16 holds pin + 1, acknowledge the level-triggered pin (port
# IRQ_ACK, the VMM lowers the line); EOI (LAPIC MMIO write); count += 1 at IRQ_AREA.
.Lirq_handler:
    push rax
    push rcx
    push rdx
    FL_RDTSC
    movabs rcx, {irq_area}
    mov [rcx + 8], rax
    mov rax, [rcx + 24]                         # a legacy virtio device to acknowledge
    test rax, rax
    jz .Lirq_pin
    mov edx, [rax + 0x60]
    mov [rax + 0x64], edx
.Lirq_pin:
    mov rax, [rcx + 16]
    test rax, rax
    jz .Lirq_eoi
    dec eax
    mov dx, {irq_ack}
    out dx, eax
.Lirq_eoi:
    movabs rax, {lapic_eoi}
    mov dword ptr [rax], 0
    inc qword ptr [rcx]
    # The frame's RFLAGS: under PVM a delivery to CPL 3 pushes it without IF and IOPL (0x17
    # was seen), so iretq would leave interrupts off; put back what the spin loop runs with.
    or qword ptr [rsp + 40], 0x3202
    pop rdx
    pop rcx
    pop rax
    iretq

# Exception reporters of the irq workloads (IDT vectors 0-31): stub v reports KEY_EXCEPTION
# = v, then the two words at the top of the exception frame (the error code or RIP, then
# RIP or CS), and DONE 0x100 + v.
    .balign 16
.Lexc_stubs:
    .set fl_vec, 0
    .rept 32
    .balign 16
    mov r11d, fl_vec
    jmp .Lexc_common
    .set fl_vec, fl_vec + 1
    .endr
.Lexc_common:
    mov eax, {key_exc}
    mov dx, {key}
    out dx, eax
    mov eax, r11d
    mov dx, {value}
    out dx, eax
    mov eax, {key_exc_frame}
    mov dx, {key}
    out dx, eax
    mov eax, [rsp]
    mov dx, {value}
    out dx, eax
    mov eax, {key_exc_frame}
    mov dx, {key}
    out dx, eax
    mov eax, [rsp + 8]
    mov dx, {value}
    out dx, eax
    lea eax, [r11d + 0x100]
    mov dx, {done}
.Lexc_done:
    out dx, eax
    jmp .Lexc_done

"#,
    include_str!("virtio.s"),
    include_str!("devices_soak.s"),
    r#"
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
    key = const abi::PORT_KEY,
    value = const abi::PORT_VALUE,
    pci_addr = const abi::PORT_PCI_ADDR,
    pci_data = const abi::PORT_PCI_DATA,
    key_pci = const abi::KEY_PCI_DEVICE,
    key_gpio_iters = const abi::KEY_GPIO_ITERATIONS,
    key_gpio_mis = const abi::KEY_GPIO_MISMATCHES,
    key_bar = const abi::KEY_BAR_MMAP_WRITTEN,
    key_dma_done = const abi::KEY_DMA_COMPLETED_REG,
    key_dma_ok = const abi::KEY_DMA_OK,
    key_dma_failed = const abi::KEY_DMA_FAILED,
    id_gpio = const abi::PCI_ID_GPIO,
    id_dma = const abi::PCI_ID_DMA,
    gpio_iters = const abi::GPIO_ITERATIONS,
    dma_iters = const abi::DMA_ITERATIONS,
    dma_len = const abi::DMA_LEN,
    bar_magic = const abi::BAR_MMAP_MAGIC,
    bar_magic_lo = const abi::BAR_MMAP_MAGIC as u32,
    bar_off = const abi::BAR_MMAP_OFFSET,
    irq_area = const abi::IRQ_AREA,
    irq_ack = const abi::PORT_IRQ_ACK,
    lapic_eoi = const abi::LAPIC_EOI,
    key_exc = const abi::KEY_EXCEPTION,
    key_exc_frame = const abi::KEY_EXCEPTION_FRAME,
    irq_vector = const abi::IRQ_VECTOR,
    idle = const abi::PORT_IDLE,
    key_vio_dev = const abi::KEY_VIRTIO_DEVICE,
    key_vio_result = const abi::KEY_VIRTIO_RESULT,
    key_vio_irqs = const abi::KEY_VIRTIO_IRQS,
    key_vio_iters = const abi::KEY_VIRTIO_ITERATIONS,
    key_vio_ticks_lo = const abi::KEY_VIRTIO_TICKS_LO,
    key_vio_ticks_hi = const abi::KEY_VIRTIO_TICKS_HI,
    key_vio_data = const abi::KEY_VIRTIO_DATA,
    fail_probe = const abi::VIRTIO_FAIL_PROBE,
    fail_features = const abi::VIRTIO_FAIL_FEATURES,
    fail_reset = const abi::VIRTIO_FAIL_NEEDS_RESET,
    fail_timeout = const abi::VIRTIO_FAIL_TIMEOUT,
    fail_status = const abi::VIRTIO_FAIL_STATUS,
    fail_data = const abi::VIRTIO_FAIL_DATA,
    fail_reply = const abi::VIRTIO_FAIL_REPLY,
    fail_no_irq = const abi::VIRTIO_FAIL_NO_IRQ,
    fail_unknown = const abi::VIRTIO_FAIL_UNKNOWN,
    ping_lo = const u64::from_le_bytes(*b"faultlin"),
    ping_hi = const u64::from_le_bytes(*b"e-vsock!"),
    vsock_local_port = const abi::VIRTIO_VSOCK_LOCAL_PORT,
    job_rr = const abi::VIRTIO_JOB_RR,
    job_net_tx = const abi::VIRTIO_JOB_NET_TX,
    job_soak = const abi::VIRTIO_JOB_SOAK,
    job_blk_seq = const abi::VIRTIO_JOB_BLK_SEQ,
    id_sample = const abi::PCI_ID_SAMPLE,
    key_soak_failed = const abi::KEY_SOAK_FAILED,
    key_soak_iters = const abi::KEY_SOAK_ITERATIONS,
    key_soak_devs = const abi::KEY_SOAK_DEVICES,
    soak_dma_len = const abi::SOAK_DMA_LEN,
    soak_seed = const abi::SOAK_SAMPLE_SEED,
    io_window = const crate::devices::pci::IO_WINDOW,
    sf_timeout = const abi::SOAK_FAIL_DMA_TIMEOUT,
    sf_status = const abi::SOAK_FAIL_DMA_STATUS,
    sf_data = const abi::SOAK_FAIL_DMA_DATA,
    sf_count = const abi::SOAK_FAIL_DMA_COUNT,
    sf_gpio = const abi::SOAK_FAIL_GPIO,
    sf_sample = const abi::SOAK_FAIL_SAMPLE,
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

/// Slot of the irq workloads' interrupt handler in the entry table (after the workloads).
const IRQ_HANDLER_SLOT: usize = 8;

/// Offset of the irq workloads' interrupt handler in [`image`].
pub fn irq_handler_offset() -> u64 {
    entry_offset(IRQ_HANDLER_SLOT)
}

/// Offset of the irq workloads' exception reporters in [`image`]: the one for vector `v`
/// (0..32) is 16 `v` bytes further.
pub fn exception_stubs_offset() -> u64 {
    entry_offset(IRQ_HANDLER_SLOT + 1)
}

/// Offset of workload `index`'s entry point in [`image`].
pub fn entry_offset(index: usize) -> u64 {
    let img = image();
    let at = 8 * (1 + index);
    u64::from_le_bytes(img[at..at + 8].try_into().expect("8-byte table entry"))
}
