//! Raw kernel ABI: ioctl numbers, mode bits and struct layouts.
//!
//! Structs and most constants come from `linux-raw-sys` (generated from the kernel's UAPI
//! headers). What it lacks — the ioctl numbers of `UFFDIO_MOVE`, `UFFDIO_POISON`,
//! `USERFAULTFD_IOC_NEW` and `PAGEMAP_SCAN`, and the mode bits the headers spell as
//! `((__u64)1 << n)` macros that bindgen drops — is computed here with the `_IOC` encoding and
//! checked at compile time against every number `linux-raw-sys` does provide.

use core::mem::size_of;

use linux_raw_sys::general as g;
pub use linux_raw_sys::general::{
    page_region, pm_scan_arg, uffd_msg, uffd_msg__bindgen_ty_1,
    uffd_msg__bindgen_ty_1__bindgen_ty_5, uffdio_api, uffdio_continue, uffdio_copy, uffdio_move,
    uffdio_poison, uffdio_range, uffdio_register, uffdio_writeprotect, uffdio_zeropage,
};
use linux_raw_sys::ioctl as io;

const IOC_NONE: u32 = 0;
const IOC_WRITE: u32 = 1;
const IOC_READ: u32 = 2;

/// `_IOC(dir, type, nr, size)` for x86_64 (and every architecture with the generic encoding).
const fn ioc(dir: u32, ty: u32, nr: u32, size: usize) -> u32 {
    assert!(
        size < (1 << 14),
        "ioctl argument too large for the size field"
    );
    (dir << 30) | ((size as u32) << 16) | (ty << 8) | nr
}

const fn iowr<T>(ty: u32, nr: u32) -> u32 {
    ioc(IOC_READ | IOC_WRITE, ty, nr, size_of::<T>())
}

const fn ior<T>(ty: u32, nr: u32) -> u32 {
    ioc(IOC_READ, ty, nr, size_of::<T>())
}

/// `UFFDIO_API`.
pub const UFFDIO_API: u32 = iowr::<uffdio_api>(g::UFFDIO, g::_UFFDIO_API);
/// `UFFDIO_REGISTER`.
pub const UFFDIO_REGISTER: u32 = iowr::<uffdio_register>(g::UFFDIO, g::_UFFDIO_REGISTER);
/// `UFFDIO_UNREGISTER`.
pub const UFFDIO_UNREGISTER: u32 = ior::<uffdio_range>(g::UFFDIO, g::_UFFDIO_UNREGISTER);
/// `UFFDIO_WAKE`.
pub const UFFDIO_WAKE: u32 = ior::<uffdio_range>(g::UFFDIO, g::_UFFDIO_WAKE);
/// `UFFDIO_COPY`.
pub const UFFDIO_COPY: u32 = iowr::<uffdio_copy>(g::UFFDIO, g::_UFFDIO_COPY);
/// `UFFDIO_ZEROPAGE`.
pub const UFFDIO_ZEROPAGE: u32 = iowr::<uffdio_zeropage>(g::UFFDIO, g::_UFFDIO_ZEROPAGE);
/// `UFFDIO_MOVE` (Linux 6.8).
pub const UFFDIO_MOVE: u32 = iowr::<uffdio_move>(g::UFFDIO, g::_UFFDIO_MOVE);
/// `UFFDIO_WRITEPROTECT`.
pub const UFFDIO_WRITEPROTECT: u32 =
    iowr::<uffdio_writeprotect>(g::UFFDIO, g::_UFFDIO_WRITEPROTECT);
/// `UFFDIO_CONTINUE` (Linux 5.13).
pub const UFFDIO_CONTINUE: u32 = iowr::<uffdio_continue>(g::UFFDIO, g::_UFFDIO_CONTINUE);
/// `UFFDIO_POISON` (Linux 6.6).
pub const UFFDIO_POISON: u32 = iowr::<uffdio_poison>(g::UFFDIO, g::_UFFDIO_POISON);
/// `USERFAULTFD_IOC_NEW` on `/dev/userfaultfd` (Linux 6.1): `_IO(0xAA, 0x00)`.
pub const USERFAULTFD_IOC_NEW: u32 = ioc(IOC_NONE, g::USERFAULTFD_IOC, 0, 0);
/// `PAGEMAP_SCAN` on `/proc/<pid>/pagemap` (Linux 6.7): `_IOWR('f', 16, struct pm_scan_arg)`.
pub const PAGEMAP_SCAN: u32 = iowr::<pm_scan_arg>(b'f' as u32, 16);

// Every number linux-raw-sys has must match ours: a wrong encoding fails the build.
const _: () = assert!(UFFDIO_API == io::UFFDIO_API);
const _: () = assert!(UFFDIO_REGISTER == io::UFFDIO_REGISTER);
const _: () = assert!(UFFDIO_UNREGISTER == io::UFFDIO_UNREGISTER);
const _: () = assert!(UFFDIO_WAKE == io::UFFDIO_WAKE);
const _: () = assert!(UFFDIO_COPY == io::UFFDIO_COPY);
const _: () = assert!(UFFDIO_ZEROPAGE == io::UFFDIO_ZEROPAGE);
const _: () = assert!(UFFDIO_WRITEPROTECT == io::UFFDIO_WRITEPROTECT);
const _: () = assert!(UFFDIO_CONTINUE == io::UFFDIO_CONTINUE);
// Numbers it lacks, checked against the values the kernel headers produce.
const _: () = assert!(UFFDIO_MOVE == 0xc028_aa05);
const _: () = assert!(UFFDIO_POISON == 0xc020_aa08);
const _: () = assert!(USERFAULTFD_IOC_NEW == 0xaa00);
const _: () = assert!(PAGEMAP_SCAN == 0xc060_6610);

// Struct sizes fixed by the kernel ABI.
const _: () = assert!(size_of::<uffd_msg>() == 32);
const _: () = assert!(size_of::<uffdio_api>() == 24);
const _: () = assert!(size_of::<uffdio_range>() == 16);
const _: () = assert!(size_of::<uffdio_register>() == 32);
const _: () = assert!(size_of::<uffdio_copy>() == 40);
const _: () = assert!(size_of::<uffdio_zeropage>() == 32);
const _: () = assert!(size_of::<uffdio_writeprotect>() == 24);
const _: () = assert!(size_of::<uffdio_continue>() == 32);
const _: () = assert!(size_of::<uffdio_poison>() == 32);
const _: () = assert!(size_of::<uffdio_move>() == 40);
const _: () = assert!(size_of::<pm_scan_arg>() == 96);
const _: () = assert!(size_of::<page_region>() == 24);

/// `UFFD_API`: the only API version there is.
pub const UFFD_API: u64 = g::UFFD_API as u64;
/// `UFFD_USER_MODE_ONLY` creation flag.
pub const UFFD_USER_MODE_ONLY: i32 = g::UFFD_USER_MODE_ONLY as i32;

/// Event codes of `uffd_msg.event`.
pub const UFFD_EVENT_PAGEFAULT: u8 = g::UFFD_EVENT_PAGEFAULT as u8;
/// `UFFD_EVENT_FORK`.
pub const UFFD_EVENT_FORK: u8 = g::UFFD_EVENT_FORK as u8;
/// `UFFD_EVENT_REMAP`.
pub const UFFD_EVENT_REMAP: u8 = g::UFFD_EVENT_REMAP as u8;
/// `UFFD_EVENT_REMOVE`.
pub const UFFD_EVENT_REMOVE: u8 = g::UFFD_EVENT_REMOVE as u8;
/// `UFFD_EVENT_UNMAP`.
pub const UFFD_EVENT_UNMAP: u8 = g::UFFD_EVENT_UNMAP as u8;

/// Page fault flags.
pub const UFFD_PAGEFAULT_FLAG_WRITE: u64 = g::UFFD_PAGEFAULT_FLAG_WRITE as u64;
/// `UFFD_PAGEFAULT_FLAG_WP`.
pub const UFFD_PAGEFAULT_FLAG_WP: u64 = g::UFFD_PAGEFAULT_FLAG_WP as u64;
/// `UFFD_PAGEFAULT_FLAG_MINOR`.
pub const UFFD_PAGEFAULT_FLAG_MINOR: u64 = g::UFFD_PAGEFAULT_FLAG_MINOR as u64;

/// Registration modes.
pub const UFFDIO_REGISTER_MODE_MISSING: u64 = g::UFFDIO_REGISTER_MODE_MISSING as u64;
/// `UFFDIO_REGISTER_MODE_WP`.
pub const UFFDIO_REGISTER_MODE_WP: u64 = g::UFFDIO_REGISTER_MODE_WP as u64;
/// `UFFDIO_REGISTER_MODE_MINOR`.
pub const UFFDIO_REGISTER_MODE_MINOR: u64 = g::UFFDIO_REGISTER_MODE_MINOR as u64;

/// `UFFDIO_COPY_MODE_DONTWAKE`.
pub const UFFDIO_COPY_MODE_DONTWAKE: u64 = g::UFFDIO_COPY_MODE_DONTWAKE as u64;
/// `UFFDIO_COPY_MODE_WP`.
pub const UFFDIO_COPY_MODE_WP: u64 = g::UFFDIO_COPY_MODE_WP as u64;
/// `UFFDIO_ZEROPAGE_MODE_DONTWAKE`.
pub const UFFDIO_ZEROPAGE_MODE_DONTWAKE: u64 = g::UFFDIO_ZEROPAGE_MODE_DONTWAKE as u64;
/// `UFFDIO_WRITEPROTECT_MODE_WP` (not in linux-raw-sys: a `(__u64)1 << 0` macro).
pub const UFFDIO_WRITEPROTECT_MODE_WP: u64 = 1 << 0;
/// `UFFDIO_WRITEPROTECT_MODE_DONTWAKE`.
pub const UFFDIO_WRITEPROTECT_MODE_DONTWAKE: u64 = 1 << 1;
/// `UFFDIO_CONTINUE_MODE_DONTWAKE`.
pub const UFFDIO_CONTINUE_MODE_DONTWAKE: u64 = 1 << 0;
/// `UFFDIO_CONTINUE_MODE_WP`.
pub const UFFDIO_CONTINUE_MODE_WP: u64 = 1 << 1;
/// `UFFDIO_POISON_MODE_DONTWAKE`.
pub const UFFDIO_POISON_MODE_DONTWAKE: u64 = 1 << 0;
/// `UFFDIO_MOVE_MODE_DONTWAKE`.
pub const UFFDIO_MOVE_MODE_DONTWAKE: u64 = 1 << 0;
/// `UFFDIO_MOVE_MODE_ALLOW_SRC_HOLES`.
pub const UFFDIO_MOVE_MODE_ALLOW_SRC_HOLES: u64 = 1 << 1;

/// `PAGE_IS_WRITTEN` category of `PAGEMAP_SCAN`.
pub const PAGE_IS_WRITTEN: u64 = g::PAGE_IS_WRITTEN as u64;
/// `PM_SCAN_WP_MATCHING`: write-protect the pages that matched.
pub const PM_SCAN_WP_MATCHING: u64 = g::PM_SCAN_WP_MATCHING as u64;
/// `PM_SCAN_CHECK_WPASYNC`: fail if a page in range is not async-WP registered.
pub const PM_SCAN_CHECK_WPASYNC: u64 = g::PM_SCAN_CHECK_WPASYNC as u64;
