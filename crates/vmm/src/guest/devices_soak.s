# devices-soak (vCPU 0; the others report done 0): keep the vfio-user devices busy until the
# run time is up, checking continuity (a snapshot or a migration may come at any point).
# Stack slots: [rsp+16] DMA engine BAR0, [rsp+24] GPIO BAR2, [rsp+32] libvfio-user sample's
# BAR0 (0: absent), [rsp+56] its BAR1, [rsp+40] iteration i, [rsp+48] the engine's
# COMPLETED at the start. The sample's BARs are I/O BARs: reached through the VMM's
# memory-mapped I/O window (port p at IO_WINDOW + p), as BAR0 takes only 8-byte accesses.
.Lwl_devices_soak:
    FL_PROLOGUE
    xor eax, eax
    test rbx, rbx
    jnz .Lds_done
    mov qword ptr [rsp + 16], 0
    mov qword ptr [rsp + 24], 0
    mov qword ptr [rsp + 32], 0
    mov qword ptr [rsp + 40], 0
    mov qword ptr [rsp + 48], 0
    xor ebp, ebp
.Lds_scan:
    mov ecx, ebp
    shl ecx, 11
    call .Lpci_rd
    cmp eax, {id_dma}
    jne 1f
    call .Lds_enable
    mov ecx, ebp
    shl ecx, 11
    or ecx, 0x10
    call .Lpci_bar
    mov [rsp + 16], rax
    mov eax, dword ptr [rax + 0x18]             # COMPLETED
    mov [rsp + 48], rax
    jmp 3f
1:
    cmp eax, {id_gpio}
    jne 2f
    call .Lds_enable
    mov ecx, ebp
    shl ecx, 11
    or ecx, 0x18
    call .Lpci_bar
    mov [rsp + 24], rax
    jmp 3f
2:
    cmp eax, {id_sample}
    jne 3f
    call .Lds_enable
    mov ecx, ebp
    shl ecx, 11
    or ecx, 0x10
    call .Lpci_rd
    and eax, -4
    movabs rdi, {io_window}
    add rdi, rax
    mov [rsp + 32], rdi
    mov ecx, ebp
    shl ecx, 11
    or ecx, 0x14
    call .Lpci_rd
    and eax, -4
    movabs rsi, {io_window}
    add rsi, rax
    mov [rsp + 56], rsi
    # BAR0 reads now - t (t = 0: the host's time); t = now + 10^5 s arms a timer that
    # never fires here, and every read after gives a small negative number
    mov rax, [rdi]
    add rax, 100000
    mov [rdi], rax
    # BAR1's first dword (its reads ignore the offset: only offset 0 reads back)
    movabs rax, {soak_seed}
    mov dword ptr [rsi], eax
3:
    inc ebp
    cmp ebp, 32
    jb .Lds_scan
    # report which devices were found
    xor eax, eax
    cmp qword ptr [rsp + 16], 0
    setne al
    xor ecx, ecx
    cmp qword ptr [rsp + 24], 0
    setne cl
    lea eax, [rax + rcx * 2]
    xor ecx, ecx
    cmp qword ptr [rsp + 32], 0
    setne cl
    lea eax, [rax + rcx * 4]
    mov ecx, {key_soak_devs}
    call .Lkv

.Lds_loop:
    mov rsi, [rsp + 40]
    mov r8, [rsp + 16]
    test r8, r8
    jz .Lds_gpio
    # DMA copy i: source word j = (i + 1) * FILL_MUL ^ j at slice + 0x2000, destination at
    # slice + 0x8000 (written by the device only: each copy's data differs from the last, so
    # a copy that did not happen is caught; and a migration that missed the device's writes
    # leaves the destination's memory unlike the source's, which its digest check refuses);
    # the descriptor at the slice's start (no interrupt: polled)
    lea r11, [rsi + 1]
    movabs r10, {fill_mul}
    imul r11, r10
    xor edi, edi
5:
    mov rax, r11
    xor rax, rdi
    mov [r12 + 0x2000 + rdi * 8], rax
    inc edi
    cmp edi, {soak_dma_len} / 8
    jb 5b
    lea rax, [r12 + 0x2000]
    mov [r12], rax
    lea rax, [r12 + 0x8000]
    mov [r12 + 8], rax
    mov dword ptr [r12 + 16], {soak_dma_len}
    mov dword ptr [r12 + 20], 0
    mov dword ptr [r12 + 24], 0
    mov dword ptr [r12 + 28], 0
    mov qword ptr [r8 + 0x08], r12              # descriptor address
    mov dword ptr [r8 + 0x10], 1                # doorbell (an ioeventfd)
    FL_RDTSC
    mov r10, rax
    imul r9, r14, 20                            # 2 s of running time
    add r9, rax
6:
    mov eax, dword ptr [r12 + 24]
    test eax, eax
    jnz 7f
    FL_RDTSC
    VQ_PAUSED
    cmp rax, r9
    jae .Lds_f_timeout
    mov eax, 20
    mov dx, {sleep}
    out dx, eax
    jmp 6b
7:
    cmp eax, 1
    jne .Lds_f_status
    xor edi, edi
8:
    mov rax, r11
    xor rax, rdi
    cmp rax, [r12 + 0x8000 + rdi * 8]
    jne .Lds_f_data
    inc edi
    cmp edi, {soak_dma_len} / 8
    jb 8b
    mov eax, dword ptr [r8 + 0x18]              # COMPLETED counts every copy since the start
    sub eax, [rsp + 48]
    lea ecx, [esi + 1]
    cmp eax, ecx
    jne .Lds_f_count

.Lds_gpio:
    mov rdi, [rsp + 24]
    test rdi, rdi
    jz .Lds_sample
    test rsi, rsi
    jz 9f
    lea ecx, [esi - 1]                          # the inputs still show the last outputs
    mov al, byte ptr [rdi + 1]
    cmp al, cl
    jne .Lds_f_gpio
9:
    mov byte ptr [rdi], sil
    mov al, byte ptr [rdi + 1]
    cmp al, sil
    jne .Lds_f_gpio

.Lds_sample:
    mov rdi, [rsp + 32]
    test rdi, rdi
    jz .Lds_next
    mov rax, [rdi]                              # now - t: in (-10^5 - 10^4, 0] if t was kept
    test rax, rax
    jg .Lds_f_sample
    cmp rax, -110000
    jl .Lds_f_sample
    mov rdi, [rsp + 56]
    mov eax, dword ptr [rdi]
    movabs r10, {soak_seed}
    cmp eax, r10d
    jne .Lds_f_sample

.Lds_next:
    mov eax, 20                                 # 20 us off the CPU: the device servers and
    mov dx, {sleep}                             # the VMM share the host's cores
    out dx, eax
    inc qword ptr [rsp + 40]
    FL_TICK .Lds_loop
    jae .Lds_end
    mov eax, [rsp + 40]
    mov ecx, {key_soak_iters}
    call .Lkv
    jmp .Lds_loop
.Lds_end:
    mov eax, [rsp + 40]
    mov ecx, {key_soak_iters}
    call .Lkv
    xor eax, eax
.Lds_done:
    mov dx, {done}
    out dx, eax
    jmp .Lds_done

.Lds_f_timeout:
    mov r11d, {sf_timeout}
    jmp .Lds_fail
.Lds_f_status:
    mov r11d, {sf_status}
    jmp .Lds_fail
.Lds_f_data:
    mov r11d, {sf_data}
    jmp .Lds_fail
.Lds_f_count:
    mov r11d, {sf_count}
    jmp .Lds_fail
.Lds_f_gpio:
    mov r11d, {sf_gpio}
    jmp .Lds_fail
.Lds_f_sample:
    mov r11d, {sf_sample}
.Lds_fail:
    mov eax, [rsp + 40]
    mov ecx, {key_soak_iters}
    call .Lkv
    mov eax, r11d
    mov ecx, {key_soak_failed}
    call .Lkv
    mov eax, r11d
    jmp .Lds_done

# Memory space and bus mastering on for device ebp. Clobbers rax, rcx, rdx, r10.
.Lds_enable:
    mov ecx, ebp
    shl ecx, 11
    or ecx, 0x04
    mov eax, 7                                  # I/O space, memory space, bus master
    jmp .Lpci_wr
