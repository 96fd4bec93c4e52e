# The `virtio` workload (vCPU 0): a virtio-mmio driver at CPL 3 (see abi::VIRTIO_PARAMS).
# Registers: r12 = slice base (interrupt words at +0, parameters at +0x1000, scratch at
# +0x1200), r14 = TSC ticks per 100 ms, rbx = the device's MMIO window, r13 = the device's
# area (queue q at +0x1000 q: descriptors +0, available ring +0x100, used ring +0x200, the
# driver's next available index at +0xf00 and next used index at +0xf08; buffers from +0x4000),
# r15 = the device's index. Queues have 16 entries. Routines return a result in eax (0: ok).

    .macro VQ_DESC q, i, addr, len, flags, next
    mov [\q + 16 * \i], \addr
    mov dword ptr [\q + 16 * \i + 8], \len
    mov word ptr [\q + 16 * \i + 12], \flags
    mov word ptr [\q + 16 * \i + 14], \next
    .endm

    # In a wait, after a look at the clock (rax = TSC, r10 = the previous look): a gap of
    # over 400 ms means the VM did not run meanwhile (paused, snapshotted, migrated; under
    # PVM the TSC cannot be offset and jumps at a restore): the deadline r9 moves by the gap.
    # Clobbers rcx, rdx.
    .macro VQ_PAUSED
    mov rdx, rax
    sub rdx, r10
    mov r10, rax
    lea rcx, [r14 * 4]
    cmp rdx, rcx
    jb .Lvqp_\@
    add r9, rdx
.Lvqp_\@:
    .endm

.Lwl_virtio:
    FL_PROLOGUE
    xor eax, eax
    test rbx, rbx
    jnz .Lvio_halt
    mov qword ptr [r12 + 0x1208], 0
    mov rax, [r12 + 0x1008]
    test rax, rax
    jnz .Lvio_bench
    xor r15d, r15d
.Lvio_next:
    cmp r15, [r12 + 0x1028]
    jae .Lvio_end
    call .Lvio_select
    mov rax, [r12 + 0x1038 + rdx]
    mov [r12 + 0x1240], rax
    mov eax, r15d
    shl eax, 16
    or eax, [r12 + 0x1240]
    mov ecx, {key_vio_dev}
    call .Lkv
    mov rax, [r12]
    mov [r12 + 0x1200], rax
    mov rax, [r12 + 0x1240]
    cmp rax, 2
    je .Lvio_do_blk
    cmp rax, 4
    je .Lvio_do_rng
    cmp rax, 1
    je .Lvio_do_net
    cmp rax, 19
    je .Lvio_do_vsock
    mov eax, {fail_unknown}
    jmp .Lvio_result
.Lvio_do_blk:
    call .Lvio_blk
    jmp .Lvio_result
.Lvio_do_rng:
    call .Lvio_rng
    jmp .Lvio_result
.Lvio_do_net:
    call .Lvio_net
    jmp .Lvio_result
.Lvio_do_vsock:
    call .Lvio_vsock
.Lvio_result:
    or [r12 + 0x1208], eax
    mov ecx, {key_vio_result}
    call .Lkv
    mov qword ptr [r12 + 24], 0
    mov rax, [r12]
    sub rax, [r12 + 0x1200]
    mov ecx, {key_vio_irqs}
    call .Lkv
    inc r15
    jmp .Lvio_next
.Lvio_end:
    mov eax, [r12 + 0x1208]
    test eax, eax
    setnz al
    movzx eax, al
.Lvio_halt:
    mov dx, {done}
    out dx, eax
    jmp .Lvio_halt

# rbx, r13 for device r15; rdx = 16 * r15 (its parameter entry); in legacy mode the handler
# acknowledges this device (interrupt word +24 = its window).
.Lvio_select:
    mov rdx, r15
    shl rdx, 4
    mov rbx, [r12 + 0x1030 + rdx]
    mov r13, r15
    imul r13, r13, 0x40000
    lea r13, [r13 + r12 + 0x10000]
    mov rax, [r12 + 0x1000]
    test rax, rax
    jnz 1f
    mov [r12 + 24], rbx
1:
    ret

# Reset and set the device up: ecx = queues, edx = driver features (low word; VERSION_1 is
# added). MSI mode: enable it and point every vector at the handler's IDT vector.
.Lvio_setup:
    cmp dword ptr [rbx], 0x74726976
    jne .Lvs_probe
    cmp dword ptr [rbx + 4], 2
    jne .Lvs_probe
    mov dword ptr [rbx + 0x70], 0
    mov dword ptr [rbx + 0x70], 1
    mov dword ptr [rbx + 0x70], 3
    mov dword ptr [rbx + 0x24], 0
    mov [rbx + 0x20], edx
    mov dword ptr [rbx + 0x24], 1
    mov dword ptr [rbx + 0x20], 1
    mov dword ptr [rbx + 0x70], 11
    mov eax, [rbx + 0x70]
    test eax, 8
    jz .Lvs_features
    mov rax, [r12 + 0x1000]
    test rax, rax
    jz .Lvs_queues
    mov word ptr [rbx + 0xc0], 0x8000
    xor r8d, r8d
.Lvs_msi:
    mov dword ptr [rbx + 0xc4], 0xfee00000
    mov dword ptr [rbx + 0xc8], 0
    mov dword ptr [rbx + 0xcc], {irq_vector}
    lea eax, [r8 + 0x1000]
    mov word ptr [rbx + 0xc2], ax
    inc r8
    cmp r8, rcx
    jbe .Lvs_msi
.Lvs_queues:
    xor r8d, r8d
.Lvs_q:
    cmp r8, rcx
    jae .Lvs_ok
    mov rax, r8
    shl rax, 12
    add rax, r13
    mov qword ptr [rax + 0xf00], 0
    mov qword ptr [rax + 0xf08], 0
    mov rdx, [r12 + 0x1800]
    mov [rax + 0x100], dx
    mov [rbx + 0x30], r8d
    mov dword ptr [rbx + 0x38], 16
    mov [rbx + 0x80], eax
    mov dword ptr [rbx + 0x84], 0
    lea edx, [rax + 0x100]
    mov [rbx + 0x90], edx
    mov dword ptr [rbx + 0x94], 0
    lea edx, [rax + 0x200]
    mov [rbx + 0xa0], edx
    mov dword ptr [rbx + 0xa4], 0
    mov dword ptr [rbx + 0x44], 1
    inc r8
    jmp .Lvs_q
.Lvs_ok:
    mov dword ptr [rbx + 0x70], 15
    mov eax, [rbx + 0x70]
    test eax, 0x40
    jnz .Lvs_reset
    xor eax, eax
    ret
.Lvs_probe:
    mov eax, {fail_probe}
    ret
.Lvs_features:
    mov eax, {fail_features}
    ret
.Lvs_reset:
    mov eax, {fail_reset}
    ret

# Make chain ecx available on the queue at rsi (no notify). Clobbers rax, rdx.
.Lvq_push:
    mov rax, [rsi + 0xf00]
    mov edx, eax
    and edx, 15
    mov [rsi + 0x104 + rdx * 2], cx
    inc rax
    mov [rsi + 0xf00], rax
    mov [rsi + 0x102], ax
    ret

# Notify queue edx (a KVM ioeventfd: no exit to userspace) of the queue at rsi, unless the
# device polls (VIRTQ_USED_F_NO_NOTIFY in the used ring's flags).
.Lvq_notify:
    mfence
    test word ptr [rsi + 0x200], 1
    jnz 1f
    mov [rbx + 0x50], edx
1:
    ret

# Wait (2 s of the VM running) for the next used element of the queue at rsi: eax = 0 with
# ecx = its id and edx = its length, or the timeout code. Clobbers r9, r10.
.Lvq_wait:
    FL_RDTSC
    mov r10, rax
    mov r9, r14
    imul r9, r9, 20
    add r9, rax
.Lvw_spin:
    movzx eax, word ptr [rsi + 0x202]
    mov rdx, [rsi + 0xf08]
    cmp ax, dx
    jne .Lvw_got
    cmp qword ptr [r12 + 0x1800], 0
    jne 1f
    mov dx, {idle}
    out dx, eax
1:
    pause
    FL_RDTSC
    VQ_PAUSED
    cmp rax, r9
    jb .Lvw_spin
    mov eax, {fail_timeout}
    ret
.Lvw_got:
    mov eax, edx
    and eax, 15
    mov ecx, [rsi + 0x204 + rax * 8]
    mov edx, [rsi + 0x208 + rax * 8]
    inc qword ptr [rsi + 0xf08]
    xor eax, eax
    ret

# Wait (2 s of the VM running) until the handler's count differs from r11 (an interrupt
# came), then for the used element as .Lvq_wait.
.Lvq_wait_irq:
    FL_RDTSC
    mov r10, rax
    mov r9, r14
    imul r9, r9, 20
    add r9, rax
.Lvwi_spin:
    cmp [r12], r11
    jne .Lvq_wait
    mov dx, {idle}
    out dx, eax
    FL_RDTSC
    VQ_PAUSED
    cmp rax, r9
    jb .Lvwi_spin
    mov eax, {fail_no_irq}
    ret

# Submit the chain at head 0 of queue edx (area rsi), wait for it through its interrupt (or,
# in poll mode, by polling the used ring).
.Lvq_roundtrip:
    mov r11, [r12]
    push rdx
    xor ecx, ecx
    call .Lvq_push
    pop rdx
    call .Lvq_notify
    cmp qword ptr [r12 + 0x1800], 0
    jne .Lvq_wait
    jmp .Lvq_wait_irq

# entropy: 64 bytes, not all zero.
.Lvio_rng:
    mov ecx, 1
    xor edx, edx
    call .Lvio_setup
    test eax, eax
    jnz 9f
    lea rax, [r13 + 0x5000]
    VQ_DESC r13, 0, rax, 64, 2, 0
    mov rsi, r13
    xor edx, edx
    call .Lvq_roundtrip
    test eax, eax
    jnz 9f
    mov eax, {fail_reply}
    cmp edx, 64
    jne 9f
    mov rax, [r13 + 0x5000]
    or rax, [r13 + 0x5008]
    or rax, [r13 + 0x5010]
    or rax, [r13 + 0x5018]
    or rax, [r13 + 0x5020]
    or rax, [r13 + 0x5028]
    or rax, [r13 + 0x5030]
    or rax, [r13 + 0x5038]
    test rax, rax
    mov eax, {fail_data}
    jz 9f
    xor eax, eax
9:
    ret

# block: request type ecx, sector rdx, data (r8 = address, r9d = length, r10w = flags; r9d
# = 0: none) through queue 0; status byte in al (0xff if the request failed to complete,
# with the failure code in [r12 + 0x1218]).
.Lblk_req:
    mov [r13 + 0x4000], ecx
    mov dword ptr [r13 + 0x4004], 0
    mov [r13 + 0x4008], rdx
    mov byte ptr [r13 + 0x4100], 0xff
    lea rax, [r13 + 0x4000]
    VQ_DESC r13, 0, rax, 16, 1, 1
    lea rax, [r13 + 0x4100]
    test r9d, r9d
    jz 1f
    mov [r13 + 16], r8
    mov [r13 + 24], r9d
    or r10w, 1
    mov [r13 + 28], r10w
    mov word ptr [r13 + 30], 2
    VQ_DESC r13, 2, rax, 1, 2, 0
    jmp 2f
1:
    VQ_DESC r13, 1, rax, 1, 2, 0
2:
    mov rsi, r13
    xor edx, edx
    call .Lvq_roundtrip
    mov [r12 + 0x1218], eax
    test eax, eax
    mov al, 0xff
    jnz 3f
    mov al, [r13 + 0x4100]
3:
    ret

# block: acknowledge FLUSH and, if offered, RO (then the write must fail with IOERR).
.Lvio_blk_setup:
    mov dword ptr [rbx + 0x14], 0
    mov edx, [rbx + 0x10]
    and edx, 0x20
    mov [r12 + 0x1210], rdx
    or edx, 0x200
    mov ecx, 1
    jmp .Lvio_setup

.Lvio_blk:
    call .Lvio_blk_setup
    test eax, eax
    jnz 9f
    xor ecx, ecx
    movabs r10, {fill_mul}
    movabs r11, 0x56495254494f0000
1:
    mov rax, rcx
    imul rax, r10
    xor rax, r11
    mov [r13 + 0x5000 + rcx * 8], rax
    inc ecx
    cmp ecx, 512
    jb 1b
    # OUT sector 0, 4 KiB
    mov ecx, 1
    xor edx, edx
    lea r8, [r13 + 0x5000]
    mov r9d, 4096
    xor r10d, r10d
    call .Lblk_req
    cmp al, 0xff
    je 8f
    xor ecx, ecx
    cmp qword ptr [r12 + 0x1210], 0
    setnz cl
    cmp al, cl
    mov eax, {fail_status}
    jne 9f
    # FLUSH
    mov ecx, 4
    xor edx, edx
    xor r9d, r9d
    call .Lblk_req
    cmp al, 0xff
    je 8f
    test al, al
    mov eax, {fail_status}
    jnz 9f
    # IN sector 0, 4 KiB
    xor ecx, ecx
    xor edx, edx
    lea r8, [r13 + 0x6000]
    mov r9d, 4096
    mov r10d, 2
    call .Lblk_req
    cmp al, 0xff
    je 8f
    test al, al
    mov eax, {fail_status}
    jnz 9f
    mov eax, [r13 + 0x6000]
    mov ecx, {key_vio_data}
    call .Lkv
    cmp qword ptr [r12 + 0x1210], 0
    jne 2f
    xor ecx, ecx
3:
    mov rax, [r13 + 0x5000 + rcx * 8]
    cmp rax, [r13 + 0x6000 + rcx * 8]
    mov eax, {fail_data}
    jne 9f
    inc ecx
    cmp ecx, 512
    jb 3b
2:
    # GET_ID
    mov ecx, 8
    xor edx, edx
    lea r8, [r13 + 0x4200]
    mov r9d, 20
    mov r10d, 2
    call .Lblk_req
    cmp al, 0xff
    je 8f
    test al, al
    mov eax, {fail_status}
    jnz 9f
    cmp byte ptr [r13 + 0x4200], 0
    mov eax, {fail_reply}
    je 9f
    xor eax, eax
    ret
8:
    mov eax, [r12 + 0x1218]
9:
    ret

# net: post a receive buffer, send an ARP request for the host's address, wait for the reply
# (other frames are skipped, 16 at most).
.Lvio_net:
    mov ecx, 2
    mov edx, 0x20
    call .Lvio_setup
    test eax, eax
    jnz 9f
    lea rdi, [r13 + 0x9000]
    xor eax, eax
    mov ecx, 64
1:
    mov byte ptr [rdi + rcx - 1], 0
    loop 1b
    mov qword ptr [rdi + 12], -1
    xor ecx, ecx
2:
    mov al, [rbx + 0x100 + rcx]
    mov [rdi + 18 + rcx], al
    mov [rdi + 34 + rcx], al
    inc ecx
    cmp ecx, 6
    jb 2b
    mov word ptr [rdi + 24], 0x0608
    mov dword ptr [rdi + 26], 0x00080100
    mov dword ptr [rdi + 30], 0x01000406
    mov eax, [r12 + 0x1020]
    mov [rdi + 40], eax
    mov eax, [r12 + 0x1024]
    mov [rdi + 50], eax
    call .Lnet_post_rx
    lea rsi, [r13 + 0x1000]
    lea rax, [r13 + 0x9000]
    VQ_DESC rsi, 0, rax, 54, 0, 0
    mov edx, 1
    call .Lvq_roundtrip
    test eax, eax
    jnz 9f
    mov qword ptr [r12 + 0x1220], 16
3:
    mov rsi, r13
    call .Lvq_wait
    test eax, eax
    jnz 9f
    cmp word ptr [r13 + 0x8000 + 24], 0x0608
    jne 4f
    cmp word ptr [r13 + 0x8000 + 32], 0x0200
    jne 4f
    mov eax, [r13 + 0x8000 + 40]
    cmp eax, [r12 + 0x1024]
    jne 4f
    xor eax, eax
    ret
4:
    call .Lnet_post_rx
    dec qword ptr [r12 + 0x1220]
    jnz 3b
    mov eax, {fail_reply}
9:
    ret

# vsock: connect to the host port, send the ping, expect it echoed, shut down.
.Lvio_vsock:
    mov ecx, 3
    xor edx, edx
    call .Lvio_setup
    test eax, eax
    jnz 9f
    call .Lvsock_post_rx
    lea rsi, [r13 + 0x2000]
    lea rax, [r13 + 0xa000]
    VQ_DESC rsi, 0, rax, 8, 2, 0
    xor ecx, ecx
    call .Lvq_push
    mov edx, 2
    call .Lvq_notify
    # REQUEST, answered by RESPONSE
    mov ecx, 1
    xor edx, edx
    mov r8d, 2
    call .Lvsock_exchange
    test eax, eax
    jnz 9f
    # RW with the ping, answered by RW with the echo
    movabs rax, {ping_lo}
    mov [r13 + 0x9100], rax
    movabs rax, {ping_hi}
    mov [r13 + 0x9108], rax
    mov ecx, 5
    mov edx, 16
    mov r8d, 5
    call .Lvsock_exchange
    test eax, eax
    jnz 9f
    cmp dword ptr [r13 + 0x8000 + 24], 16
    jne 8f
    mov rax, [r13 + 0x8000 + 44]
    cmp rax, [r13 + 0x9100]
    jne 7f
    mov rax, [r13 + 0x8000 + 52]
    cmp rax, [r13 + 0x9108]
    jne 7f
    call .Lvsock_post_rx
    mov ecx, 4
    xor edx, edx
    mov dword ptr [r13 + 0x9000 + 32], 3
    jmp .Lvsock_tx
7:
    mov eax, {fail_data}
    ret
8:
    mov eax, {fail_reply}
9:
    ret

# Send a packet (op ecx, payload edx bytes) and wait for one with op r8d (CREDIT_UPDATEs
# skipped, 8 packets at most); the receive buffer is posted again after each one skipped.
.Lvsock_exchange:
    mov [r12 + 0x1248], r8
    call .Lvsock_tx
    test eax, eax
    jnz 9f
    mov qword ptr [r12 + 0x1220], 8
1:
    mov rsi, r13
    call .Lvq_wait
    test eax, eax
    jnz 9f
    movzx eax, word ptr [r13 + 0x8000 + 30]
    cmp rax, [r12 + 0x1248]
    je 3f
    cmp eax, 6
    jne 8f
    call .Lvsock_post_rx
    dec qword ptr [r12 + 0x1220]
    jnz 1b
8:
    mov eax, {fail_reply}
9:
    ret
3:
    cmp eax, 5
    je 4f
    call .Lvsock_post_rx
4:
    xor eax, eax
    ret

.Lnet_post_rx:
    mov r8d, 2048
    jmp .Lpost_rx

.Lvsock_post_rx:
    mov r8d, 4096

# Post the receive buffer (r8d bytes at +0x8000) on queue 0.
.Lpost_rx:
    lea rax, [r13 + 0x8000]
    VQ_DESC r13, 0, rax, r8d, 2, 0
    mov rsi, r13
    xor ecx, ecx
    call .Lvq_push
    xor edx, edx
    jmp .Lvq_notify

# Send a packet: op ecx, payload length edx (at +0x9100), flags as left at +0x9000 + 32.
.Lvsock_tx:
    mov rax, [rbx + 0x100]
    mov [r13 + 0x9000], rax
    mov qword ptr [r13 + 0x9008], 2
    mov dword ptr [r13 + 0x9010], {vsock_local_port}
    mov eax, [r12 + 0x1018]
    mov [r13 + 0x9014], eax
    mov [r13 + 0x9018], edx
    mov word ptr [r13 + 0x901c], 1
    mov [r13 + 0x901e], cx
    cmp ecx, 4
    je 1f
    mov dword ptr [r13 + 0x9020], 0
1:
    mov dword ptr [r13 + 0x9024], 65536
    mov dword ptr [r13 + 0x9028], 0
    lea rsi, [r13 + 0x1000]
    lea rax, [r13 + 0x9000]
    test edx, edx
    jz 2f
    VQ_DESC rsi, 0, rax, 44, 1, 1
    lea rax, [r13 + 0x9100]
    mov [rsi + 16], rax
    mov [rsi + 24], edx
    mov word ptr [rsi + 28], 0
    mov word ptr [rsi + 30], 0
    jmp 3f
2:
    VQ_DESC rsi, 0, rax, 44, 0, 0
3:
    mov edx, 1
    jmp .Lvq_roundtrip

# Benchmarks: device 0, [r12 + 0x1010] iterations.
.Lvio_bench:
    xor r15d, r15d
    call .Lvio_select
    mov rax, [r12]
    mov [r12 + 0x1200], rax
    mov qword ptr [r12 + 0x1228], 0
    mov rax, [r12 + 0x1008]
    cmp rax, {job_rr}
    je .Lvb_rr
    cmp rax, {job_net_tx}
    je .Lvb_net
    cmp rax, {job_soak}
    je .Lvb_soak
    call .Lvio_blk_setup
    test eax, eax
    jnz .Lvb_end
    mov rax, [rbx + 0x100]
    mov [r12 + 0x1230], rax
    FL_RDTSC
    mov [r12 + 0x1220], rax
.Lvb_blk_loop:
    mov rax, [r12 + 0x1228]
    cmp rax, [r12 + 0x1010]
    jae .Lvb_done
    mov rax, [r12 + 0x1008]
    cmp rax, {job_blk_seq}
    je 1f
    # random 4 KiB: sector = (xorshift(seed) mod (capacity / 8)) * 8
    mov rax, rbp
    mov rdx, rax
    shl rdx, 13
    xor rax, rdx
    mov rdx, rax
    shr rdx, 7
    xor rax, rdx
    mov rdx, rax
    shl rdx, 17
    xor rax, rdx
    mov rbp, rax
    mov rcx, [r12 + 0x1230]
    shr rcx, 3
    xor edx, edx
    div rcx
    lea rdx, [rdx * 8]
    lea r8, [r13 + 0x6000]
    mov r9d, 4096
    jmp 2f
1:
    # sequential 1 MiB: sector = (i * 2048) mod (capacity - capacity mod 2048)
    mov rcx, [r12 + 0x1230]
    shr rcx, 11
    mov rax, [r12 + 0x1228]
    xor edx, edx
    div rcx
    shl rdx, 11
    lea r8, [r12 + 0x300000]
    mov r9d, 0x100000
2:
    xor ecx, ecx
    mov r10d, 2
    call .Lblk_req
    cmp al, 0xff
    je .Lvb_err
    test al, al
    jnz .Lvb_status
    inc qword ptr [r12 + 0x1228]
    jmp .Lvb_blk_loop

.Lvb_rr:
    mov ecx, 1
    xor edx, edx
    call .Lvio_setup
    test eax, eax
    jnz .Lvb_end
    lea rax, [r13 + 0x5000]
    VQ_DESC r13, 0, rax, 8, 2, 0
    FL_RDTSC
    mov [r12 + 0x1220], rax
1:
    mov rax, [r12 + 0x1228]
    cmp rax, [r12 + 0x1010]
    jae .Lvb_done
    mov rsi, r13
    xor edx, edx
    call .Lvq_roundtrip
    test eax, eax
    jnz .Lvb_end
    inc qword ptr [r12 + 0x1228]
    jmp 1b

.Lvb_net:
    mov ecx, 2
    mov edx, 0x20
    call .Lvio_setup
    test eax, eax
    jnz .Lvb_end
    lea rdi, [r13 + 0x9000]
    mov qword ptr [rdi + 12], -1
    mov word ptr [rdi + 24], 0xb588
    lea rsi, [r13 + 0x1000]
    xor ecx, ecx
1:
    mov rax, rcx
    shl rax, 4
    mov [rsi + rax], rdi
    mov dword ptr [rsi + rax + 8], 1526
    mov dword ptr [rsi + rax + 12], 0
    inc ecx
    cmp ecx, 8
    jb 1b
    FL_RDTSC
    mov [r12 + 0x1220], rax
2:
    mov rax, [r12 + 0x1228]
    cmp rax, [r12 + 0x1010]
    jae .Lvb_done
    lea rsi, [r13 + 0x1000]
    xor ecx, ecx
3:
    push rcx
    call .Lvq_push
    pop rcx
    inc ecx
    cmp ecx, 8
    jb 3b
    mov edx, 1
    call .Lvq_notify
    mov qword ptr [r12 + 0x1238], 8
4:
    lea rsi, [r13 + 0x1000]
    call .Lvq_wait
    test eax, eax
    jnz .Lvb_end
    dec qword ptr [r12 + 0x1238]
    jnz 4b
    add qword ptr [r12 + 0x1228], 8
    jmp 2b

# Soak (device 0, a disk): request i writes pattern(i) to 4 KiB block i mod 64, then reads
# block (i - 1) mod 64 back and checks it holds pattern(i - 1), each request waited for
# through its interrupt; with an entropy device, 64 bytes from it too at every iteration
# ([r12 + 0x1260] = its index + 1, 0: none), and with a net device a 60-byte broadcast
# frame sent (ethertype 0x88b5, local experimental; [r12 + 0x1268]), each waited for through
# its interrupt; a heartbeat and the count every 100 ms;
# [r12 + 0x1010] requests (0: forever). Continuity across a snapshot or a migration: the
# block written last before the pause is read after it, and the request in flight at the
# pause completes.
.Lvb_soak:
    call .Lvio_blk_setup
    test eax, eax
    jnz .Lvb_end
    mov qword ptr [r12 + 0x1260], 0
    mov qword ptr [r12 + 0x1268], 0
    mov ecx, 1
    call .Lvio_find
    test rax, rax
    jz 5f
    lea r15, [rax - 1]
    call .Lvio_select
    mov ecx, 2
    mov edx, 0x20
    call .Lvio_setup
    test eax, eax
    jnz .Lvb_end
    lea rdi, [r13 + 0x9000]
    xor eax, eax
    mov ecx, 72
    rep stosb
    lea rdi, [r13 + 0x9000]
    mov qword ptr [rdi + 12], -1
    mov word ptr [rdi + 24], 0xb588
    lea rax, [r15 + 1]
    mov [r12 + 0x1268], rax
5:
    mov ecx, 4
    call .Lvio_find
    test rax, rax
    jz 7f
    lea r15, [rax - 1]
    call .Lvio_select
    mov ecx, 1
    xor edx, edx
    call .Lvio_setup
    test eax, eax
    jnz .Lvb_end
    lea rax, [r15 + 1]
    mov [r12 + 0x1260], rax
7:
    xor r15d, r15d
    call .Lvio_select
    FL_RDTSC
    mov [r12 + 0x1220], rax
.Lvk_loop:
    mov rax, [r12 + 0x1010]
    test rax, rax
    jz 1f
    cmp [r12 + 0x1228], rax
    jae .Lvb_done
1:
    mov rax, [r12 + 0x1228]
    call .Lsoak_fill
    mov rdx, [r12 + 0x1228]
    and edx, 63
    shl edx, 3
    mov ecx, 1
    lea r8, [r13 + 0x5000]
    mov r9d, 4096
    xor r10d, r10d
    call .Lblk_req
    cmp al, 0xff
    je .Lvb_err
    test al, al
    jnz .Lvb_status
    mov rax, [r12 + 0x1228]
    test rax, rax
    jz 3f
    lea rdx, [rax - 1]
    and edx, 63
    shl edx, 3
    xor ecx, ecx
    lea r8, [r13 + 0x6000]
    mov r9d, 4096
    mov r10d, 2
    call .Lblk_req
    cmp al, 0xff
    je .Lvb_err
    test al, al
    jnz .Lvb_status
    mov rax, [r12 + 0x1228]
    dec rax
    call .Lsoak_fill
    xor ecx, ecx
2:
    mov rax, [r13 + 0x5000 + rcx * 8]
    cmp rax, [r13 + 0x6000 + rcx * 8]
    jne .Lvk_bad
    inc ecx
    cmp ecx, 512
    jb 2b
3:
    mov rax, [r12 + 0x1260]
    test rax, rax
    jz 4f
    lea r15, [rax - 1]
    call .Lvio_select
    lea rax, [r13 + 0x5000]
    VQ_DESC r13, 0, rax, 64, 2, 0
    mov rsi, r13
    xor edx, edx
    call .Lvq_roundtrip
    test eax, eax
    jnz .Lvb_end
    mov eax, {fail_reply}
    cmp edx, 64
    jne .Lvb_end
    xor r15d, r15d
    call .Lvio_select
4:
    mov rax, [r12 + 0x1268]
    test rax, rax
    jz 4f
    lea r15, [rax - 1]
    call .Lvio_select
    lea rsi, [r13 + 0x1000]
    lea rax, [r13 + 0x9000]
    VQ_DESC rsi, 0, rax, 72, 0, 0
    mov edx, 1
    call .Lvq_roundtrip
    test eax, eax
    jnz .Lvb_end
    xor r15d, r15d
    call .Lvio_select
4:
    inc qword ptr [r12 + 0x1228]
    FL_TICK .Lvk_loop
    mov eax, [r12 + 0x1228]
    mov ecx, {key_vio_iters}
    call .Lkv
    jmp .Lvk_loop
.Lvk_bad:
    mov eax, {fail_data}
    jmp .Lvb_end

# rax = 1 + the index of the first device after device 0 of type ecx (virtio device ID),
# 0 if none. Clobbers rdx, r8.
.Lvio_find:
    mov r8d, 1
1:
    cmp r8, [r12 + 0x1028]
    jae 2f
    mov rdx, r8
    shl rdx, 4
    cmp [r12 + 0x1038 + rdx], rcx
    je 3f
    inc r8d
    jmp 1b
2:
    xor eax, eax
    ret
3:
    lea rax, [r8 + 1]
    ret

# Soak: pattern(rax) into [r13 + 0x5000], 512 words: word k = k * FILL_MUL ^ (rax + 1) *
# 0x9e3779b97f4a7c15. Clobbers rcx, rdx, r10, r11.
.Lsoak_fill:
    lea r11, [rax + 1]
    movabs r10, 0x9e3779b97f4a7c15
    imul r11, r10
    movabs r10, {fill_mul}
    xor ecx, ecx
1:
    mov rdx, rcx
    imul rdx, r10
    xor rdx, r11
    mov [r13 + 0x5000 + rcx * 8], rdx
    inc ecx
    cmp ecx, 512
    jb 1b
    ret

.Lvb_err:
    mov eax, [r12 + 0x1218]
    jmp .Lvb_end
.Lvb_status:
    mov eax, {fail_status}
    jmp .Lvb_end
.Lvb_done:
    FL_RDTSC
    sub rax, [r12 + 0x1220]
    mov [r12 + 0x1220], rax
    mov eax, [r12 + 0x1220]
    mov ecx, {key_vio_ticks_lo}
    call .Lkv
    mov eax, [r12 + 0x1224]
    mov ecx, {key_vio_ticks_hi}
    call .Lkv
    xor eax, eax
.Lvb_end:
    mov [r12 + 0x1208], eax
    mov eax, [r12 + 0x1228]
    mov ecx, {key_vio_iters}
    call .Lkv
    mov rax, [r12]
    sub rax, [r12 + 0x1200]
    mov ecx, {key_vio_irqs}
    call .Lkv
    mov eax, [r12 + 0x1208]
    mov ecx, {key_vio_result}
    call .Lkv
    mov eax, [r12 + 0x1208]
    test eax, eax
    setnz al
    movzx eax, al
    jmp .Lvio_halt
