//! The built-in guest's ABI: port I/O from CPL 3 (IOPL 3), one `out` per call.
//!
//! | port | width | meaning |
//! |---|---|---|
//! | `0x0f00` HEARTBEAT | 32 | heartbeat number; the VMM stamps it with host time |
//! | `0x0f01` CHECKSUM_LO | 32 | low half of a checksum |
//! | `0x0f02` CHECKSUM_HI | 32 | high half; completes the 64-bit checksum |
//! | `0x0f03` LOG | 8 | one byte of a log line; `\n` ends the line |
//! | `0x0f04` DONE | 32 | the workload finished with this exit code; the vCPU stops |
//! | `0x0f05` PHASE | 32 | progress marker (1: memory filled, workload loop starts) |
//! | `0x0f06` SLEEP_US | 32 | the vCPU sleeps this many microseconds (a guest without a kernel has no idle) |
//! | `0x0f07` KEY | 32 | a result key (`KEY_*`) for the next VALUE |
//! | `0x0f08` VALUE | 32 | the value for the last KEY; the VMM reports `(key, value)` |
//! | `0x0f0a` IDLE | 32 | the guest waits for an interrupt: the VMM yields the vCPU's CPU (`sched_yield`), a CPL-3 guest's stand-in for `hlt`; counted apart from other exits |
//! | `0x0f09` IRQ_ACK | 32 | the irq workloads' handler acknowledges level-triggered IOAPIC pin n: the VMM lowers the line |
//! | `0x0cf8` PCI_ADDR | 32 | PCI configuration mechanism #1: `0x8000_0000 \| bus << 16 \| dev << 11 \| fn << 8 \| reg` (`devices` only) |
//! | `0x0cfc` PCI_DATA | 32 | the configuration dword at PCI_ADDR (`devices` uses only 32-bit accesses, `reg` dword-aligned) |
//!
//! Registers at a workload's entry: `rdi` = slice start (guest-virtual = guest-physical),
//! `rsi` = slice length in bytes, `rdx` = index of the slice's first page in the workload area,
//! `rcx` = TSC ticks per 100 ms, `r8` = run time in TSC ticks (0: the workload's own end),
//! `r9` = seed. `rsp` is a private stack; `rflags` = 0x3002 (IOPL 3).
//!
//! The `devices` workload (only on the vCPU whose `rdx` is 0; the others report DONE 0 at
//! once) reports, in this order:
//! 1. heartbeat 0;
//! 2. [`KEY_PCI_DEVICE`] for every device 0..31 of bus 0 (function 0) whose vendor is not
//!    `0xffff`, in device order (the host bridge included);
//! 3. then, again in device order, for each [`PCI_ID_GPIO`]: [`KEY_GPIO_ITERATIONS`],
//!    [`KEY_GPIO_MISMATCHES`]; for each [`PCI_ID_DMA`]: [`KEY_BAR_MMAP_WRITTEN`],
//!    [`KEY_DMA_COMPLETED_REG`], [`KEY_DMA_OK`], [`KEY_DMA_FAILED`];
//! 4. DONE: 0 if every tested device passed (or none was found), else 1.
//!
//! It makes no checksum report.

/// Heartbeat.
pub const PORT_HEARTBEAT: u16 = 0x0f00;
/// Low half of a checksum.
pub const PORT_CHECKSUM_LO: u16 = 0x0f01;
/// High half of a checksum (completes it).
pub const PORT_CHECKSUM_HI: u16 = 0x0f02;
/// Log byte.
pub const PORT_LOG: u16 = 0x0f03;
/// Done, with exit code.
pub const PORT_DONE: u16 = 0x0f04;
/// Phase marker.
pub const PORT_PHASE: u16 = 0x0f05;
/// Sleep, in microseconds.
pub const PORT_SLEEP_US: u16 = 0x0f06;

/// The irq workloads: the handler acknowledges a level-triggered IOAPIC pin (the VMM lowers it).
pub const PORT_IRQ_ACK: u16 = 0x0f09;

/// The guest has nothing to do until an interrupt comes: the VMM yields the CPU once.
pub const PORT_IDLE: u16 = 0x0f0a;
/// The irq workloads' IDT vector (every path delivers it).
pub const IRQ_VECTOR: u8 = 0x40;
/// The irq workloads' shared words (guest-physical, the start of vCPU 0's slice): `+0`
/// interrupts handled, `+8` the TSC at the handler's entry for the last one, `+16` an IOAPIC
/// pin + 1 to acknowledge through [`PORT_IRQ_ACK`] before the EOI (0: none).
pub const IRQ_AREA: u64 = 0x40_0000;
/// The LAPIC's EOI register (the default APIC base + 0xb0): the handler's EOI is one 32-bit
/// store there.
pub const LAPIC_EOI: u64 = 0xfee0_00b0;

/// Result key; the next VALUE belongs to it.
pub const PORT_KEY: u16 = 0x0f07;
/// Result value for the last KEY.
pub const PORT_VALUE: u16 = 0x0f08;
/// PCI configuration mechanism #1: address register (32-bit).
pub const PORT_PCI_ADDR: u16 = 0x0cf8;
/// PCI configuration mechanism #1: data register (`PORT_PCI_DATA + (reg & 3)`).
pub const PORT_PCI_DATA: u16 = 0x0cfc;

/// Key: a PCI function was found; value: `vendor | device << 16` (configuration dword 0).
pub const KEY_PCI_DEVICE: u32 = 1;
/// Key: GPIO loopback mismatches; value: the number of byte reads (two per iteration, at
/// BAR2 + 1 and BAR2 + 5) that did not return what was written to BAR2 + 0 / BAR2 + 4.
pub const KEY_GPIO_MISMATCHES: u32 = 2;
/// Key: DMA copies that completed with status 1 and the right data; value: their number.
pub const KEY_DMA_OK: u32 = 3;
/// Key: DMA copies that timed out (2 s), completed with a status other than 1, or left wrong
/// data; value: their number (`DMA_ITERATIONS - ok`).
pub const KEY_DMA_FAILED: u32 = 4;
/// Key: the DMA engine's completed-count register (BAR0 + 0x18) after the copies; value: it.
pub const KEY_DMA_COMPLETED_REG: u32 = 5;
/// Key: GPIO loopback iterations done; value: [`GPIO_ITERATIONS`].
pub const KEY_GPIO_ITERATIONS: u32 = 6;
/// Key: the guest stored [`BAR_MMAP_MAGIC`] at DMA BAR2 + [`BAR_MMAP_OFFSET`] (one 8-byte
/// store); value: its low 32 bits.
pub const KEY_BAR_MMAP_WRITTEN: u32 = 7;
/// Reported by the VMM (not the guest) when a vCPU of a VM with PCI devices finishes: one
/// report per vector pending in the vCPU's LAPIC IRR, i.e. a device MSI that reached the
/// guest through eventfd -> KVM irqfd with no VMM thread involved.
pub const KEY_VMM_LAPIC_IRR: u32 = 0x100;

/// Key (irq workloads): the guest took exception `value` (then DONE `0x100 + value`).
pub const KEY_EXCEPTION: u32 = 0x200;
/// Key (irq workloads): a word at the top of the exception's frame (low 32 bits; two
/// reports: `[rsp]`, `[rsp + 8]`).
pub const KEY_EXCEPTION_FRAME: u32 = 0x201;

/// `vendor | device << 16` of the GPIO card (gpio-pci-idio-16 register layout, in BAR2).
pub const PCI_ID_GPIO: u32 = 0x0dc8_494f;
/// `vendor | device << 16` of the DMA engine.
pub const PCI_ID_DMA: u32 = 0x0d3a_fa17;
/// `vendor | device << 16` of libvfio-user's `samples/server` (`devices-soak` sets its BAR0
/// timer an hour and more ahead and writes BAR1's first dword, then checks both: they are
/// in the sample's own migration stream).
pub const PCI_ID_SAMPLE: u32 = 0xbeef_dead;
/// `devices-soak`: the failure (a [`SOAK_FAIL_DMA_TIMEOUT`]... code); the guest then stops
/// with that exit code.
pub const KEY_SOAK_FAILED: u32 = 0x400;
/// `devices-soak`: iterations done, every 100 ms.
pub const KEY_SOAK_ITERATIONS: u32 = 0x401;
/// `devices-soak`: the devices found (bit 0 DMA engine, 1 GPIO, 2 libvfio-user sample).
pub const KEY_SOAK_DEVICES: u32 = 0x402;
/// A DMA copy did not complete within 2 s of running time.
pub const SOAK_FAIL_DMA_TIMEOUT: u32 = 1;
/// A DMA copy completed with an error status.
pub const SOAK_FAIL_DMA_STATUS: u32 = 2;
/// A DMA copy's destination does not hold the source.
pub const SOAK_FAIL_DMA_DATA: u32 = 3;
/// The engine's COMPLETED register does not count every copy since the start.
pub const SOAK_FAIL_DMA_COUNT: u32 = 4;
/// The GPIO inputs do not read back the outputs last written.
pub const SOAK_FAIL_GPIO: u32 = 5;
/// The sample's BAR0 timer or BAR1 storage does not hold what the guest wrote at the start.
pub const SOAK_FAIL_SAMPLE: u32 = 6;
/// Bytes per `devices-soak` DMA copy (source at slice + 0x2000, destination slice + 0x8000).
pub const SOAK_DMA_LEN: u32 = 0x4000;
/// The sample's BAR1 first dword in `devices-soak` is this constant's low half.
pub const SOAK_SAMPLE_SEED: u64 = 0x5A3C_0FF1_CE00_D00D;
/// GPIO loopback iterations (`k` = 0..256).
pub const GPIO_ITERATIONS: u32 = 256;
/// DMA copies per DMA engine.
pub const DMA_ITERATIONS: u32 = 32;
/// Bytes per DMA copy: from slice + `DMA_LEN` to slice + 1 MiB; the descriptor is at the
/// slice's start.
pub const DMA_LEN: u32 = 0x1_0000;
/// The magic the guest stores at DMA BAR2 + [`BAR_MMAP_OFFSET`].
pub const BAR_MMAP_MAGIC: u64 = 0x5EED_F00D_CAFE_0001;
/// Offset in the DMA engine's BAR2 of the magic's store (the part mapped into the guest).
pub const BAR_MMAP_OFFSET: u64 = 0x1000;

/// Phase: memory filled; the workload's main loop starts.
pub const PHASE_READY: u32 = 1;

/// The fill pattern's multiplier (as in the QEMU anchor's `memload.c`).
pub const FILL_MUL: u64 = 0x9E37_79B9_7F4A_7C15;
/// FNV-1a 64-bit offset basis: the checksum's start value.
pub const CHECKSUM_INIT: u64 = 0xcbf2_9ce4_8422_2325;
/// FNV 64-bit prime: the checksum's multiplier.
pub const CHECKSUM_MUL: u64 = 0x0000_0100_0000_01b3;

/// The word the `fill` workload writes at word `i` of page `page` of the workload area
/// (`memload.c`: `(p*512+i)*0x9E3779B97F4A7C15|1`).
pub fn fill_word(page: u64, i: u64) -> u64 {
    (page * 512 + i).wrapping_mul(FILL_MUL) | 1
}

/// The checksum the guest computes over 64-bit words: `h = (h ^ w) * prime` from the basis.
pub fn checksum(words: impl IntoIterator<Item = u64>) -> u64 {
    words
        .into_iter()
        .fold(CHECKSUM_INIT, |h, w| (h ^ w).wrapping_mul(CHECKSUM_MUL))
}

/// Checksum of a byte slice (length a multiple of 8), as the guest computes it.
pub fn checksum_bytes(mem: &[u8]) -> u64 {
    checksum(
        mem.chunks_exact(8)
            .map(|c| u64::from_le_bytes(c.try_into().expect("8-byte chunk"))),
    )
}

/// One xorshift64 step, as the `random` workload does it.
pub fn xorshift(mut x: u64) -> u64 {
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    x
}

/// The `virtio` workload's parameters (guest-physical, vCPU 0's slice + 0x1000), written by
/// the VMM before the guest starts:
///
/// | offset | size | meaning |
/// |---|---|---|
/// | 0x00 | 8 | interrupt mode: 0 legacy, 1 MSI (the driver enables Dragonball's registers) |
/// | 0x08 | 8 | job: [`VIRTIO_JOB_TEST`], [`VIRTIO_JOB_RR`], [`VIRTIO_JOB_BLK_RANDOM`], [`VIRTIO_JOB_BLK_SEQ`], [`VIRTIO_JOB_NET_TX`], [`VIRTIO_JOB_SOAK`] |
/// | 0x10 | 8 | iterations (the benchmark jobs) |
/// | 0x18 | 8 | vsock: the host port the guest connects to |
/// | 0x20 | 4 | net: the guest's IPv4 address (network order) |
/// | 0x24 | 4 | net: the host's IPv4 address on the tap (network order) |
/// | 0x28 | 8 | number of devices |
/// | 0x30 + 16 i | 8 | device i: its window's address |
/// | 0x38 + 16 i | 8 | device i: its virtio device ID |
/// | 0x800 | 8 | benchmark jobs: 1 = no interrupts (`VIRTQ_AVAIL_F_NO_INTERRUPT`), poll the used ring |
///
/// The driver skips a notify while the device says it polls (`VIRTQ_USED_F_NO_NOTIFY`).
///
/// The test job drives every device in order: **block** writes a pattern
/// ([`virtio_blk_pattern`]) to sectors 0..8, flushes, reads it back and compares, and asks
/// for the device ID (on a read-only disk the write must fail with IOERR); **entropy** reads
/// 64 bytes and checks they are not all zero; **net** posts a receive buffer, sends an ARP
/// request for the host's address and waits for the kernel's ARP reply; **vsock** connects
/// to the host port, sends [`VIRTIO_VSOCK_PING`], expects it echoed, shuts down. For each
/// device it reports [`KEY_VIRTIO_DEVICE`], [`KEY_VIRTIO_RESULT`], [`KEY_VIRTIO_IRQS`];
/// DONE is 0 when every device passed. Every wait has a 2 s deadline.
///
/// A benchmark job drives device 0 for the given iterations, each request waited for
/// through its interrupt, and reports [`KEY_VIRTIO_ITERATIONS`], [`KEY_VIRTIO_TICKS_LO`],
/// [`KEY_VIRTIO_TICKS_HI`] (TSC ticks of the loop), [`KEY_VIRTIO_IRQS`], [`KEY_VIRTIO_RESULT`].
pub const VIRTIO_PARAMS: u64 = IRQ_AREA + 0x1000;
/// Job: drive every device once and check it.
pub const VIRTIO_JOB_TEST: u64 = 0;
/// Job: request/response round trips: 8 bytes from the entropy device.
pub const VIRTIO_JOB_RR: u64 = 1;
/// Job: 4 KiB reads at random 4 KiB-aligned offsets, queue depth 1.
pub const VIRTIO_JOB_BLK_RANDOM: u64 = 2;
/// Job: 1 MiB sequential reads, queue depth 1.
pub const VIRTIO_JOB_BLK_SEQ: u64 = 3;
/// Job: 1514-byte frames to the tap, 8 in flight.
pub const VIRTIO_JOB_NET_TX: u64 = 4;
/// Job: the disk (device 0) kept busy for snapshots and migrations: request i writes
/// [`virtio_soak_pattern`]`(i)` to 4 KiB block i mod 64, then block (i - 1) mod 64 is read
/// back and checked; a heartbeat and [`KEY_VIRTIO_ITERATIONS`] every 100 ms; iterations 0:
/// forever. A mismatch ends the guest with [`VIRTIO_FAIL_DATA`].
pub const VIRTIO_JOB_SOAK: u64 = 5;
/// Word `k` of the soak job's block written by request `i`.
pub fn virtio_soak_pattern(i: u64, k: u64) -> u64 {
    k.wrapping_mul(FILL_MUL) ^ (i + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15)
}

/// Key: the next results are device `value & 0xffff` (its virtio ID) at index `value >> 16`.
pub const KEY_VIRTIO_DEVICE: u32 = 0x300;
/// Key: 0 if the device passed, else the step that failed ([`VIRTIO_FAIL_PROBE`]...).
pub const KEY_VIRTIO_RESULT: u32 = 0x301;
/// Key: interrupts the guest's handler took while it drove the device.
pub const KEY_VIRTIO_IRQS: u32 = 0x302;
/// Key: requests a benchmark job completed.
pub const KEY_VIRTIO_ITERATIONS: u32 = 0x303;
/// Key: TSC ticks of the benchmark loop, low 32 bits.
pub const KEY_VIRTIO_TICKS_LO: u32 = 0x304;
/// Key: TSC ticks of the benchmark loop, high 32 bits.
pub const KEY_VIRTIO_TICKS_HI: u32 = 0x305;
/// Key: a value the device returned (block on a read-only disk: the first word read).
pub const KEY_VIRTIO_DATA: u32 = 0x306;
/// Failure: no virtio-mmio version 2 device at the window.
pub const VIRTIO_FAIL_PROBE: u32 = 1;
/// Failure: the device refused the features (FEATURES_OK did not stick).
pub const VIRTIO_FAIL_FEATURES: u32 = 2;
/// Failure: the device asks for a reset after setup.
pub const VIRTIO_FAIL_NEEDS_RESET: u32 = 3;
/// Failure: a request did not complete within 2 s.
pub const VIRTIO_FAIL_TIMEOUT: u32 = 4;
/// Failure: a request completed with a bad status.
pub const VIRTIO_FAIL_STATUS: u32 = 5;
/// Failure: data read back differs.
pub const VIRTIO_FAIL_DATA: u32 = 6;
/// Failure: an unexpected reply (length, packet, frame).
pub const VIRTIO_FAIL_REPLY: u32 = 7;
/// Failure: a completion came without its interrupt within 2 s.
pub const VIRTIO_FAIL_NO_IRQ: u32 = 8;
/// Failure: a device type the guest does not drive.
pub const VIRTIO_FAIL_UNKNOWN: u32 = 9;
/// The payload the vsock test sends and expects back.
pub const VIRTIO_VSOCK_PING: &[u8; 16] = b"faultline-vsock!";
/// The guest's local vsock port.
pub const VIRTIO_VSOCK_LOCAL_PORT: u32 = 0x4000;

/// Word `i` (0..512) of the block test's 4 KiB pattern at sector 0.
pub fn virtio_blk_pattern(i: u64) -> u64 {
    0x5649_5254_494f_0000 ^ i.wrapping_mul(FILL_MUL)
}
