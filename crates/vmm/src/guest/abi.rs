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
//!
//! Registers at a workload's entry: `rdi` = slice start (guest-virtual = guest-physical),
//! `rsi` = slice length in bytes, `rdx` = index of the slice's first page in the workload area,
//! `rcx` = TSC ticks per 100 ms, `r8` = run time in TSC ticks (0: the workload's own end),
//! `r9` = seed. `rsp` is a private stack; `rflags` = 0x3002 (IOPL 3).

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
