//! Feature, ioctl and mode bit sets, all probed or negotiated at run time.

use bitflags::bitflags;
use linux_raw_sys::general as g;

bitflags! {
    /// `UFFD_FEATURE_*`: what a userfaultfd reports or is asked for in the `UFFDIO_API` handshake.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
    pub struct Features: u64 {
        /// Report write-protect faults (`UFFD_PAGEFAULT_FLAG_WP`).
        const PAGEFAULT_FLAG_WP = g::UFFD_FEATURE_PAGEFAULT_FLAG_WP as u64;
        /// `UFFD_EVENT_FORK`: a forked child keeps its registrations, on a new uffd.
        const EVENT_FORK = g::UFFD_FEATURE_EVENT_FORK as u64;
        /// `UFFD_EVENT_REMAP` on `mremap`.
        const EVENT_REMAP = g::UFFD_FEATURE_EVENT_REMAP as u64;
        /// `UFFD_EVENT_REMOVE` on `madvise(DONTNEED/REMOVE)`.
        const EVENT_REMOVE = g::UFFD_FEATURE_EVENT_REMOVE as u64;
        /// MISSING registration of hugetlbfs.
        const MISSING_HUGETLBFS = g::UFFD_FEATURE_MISSING_HUGETLBFS as u64;
        /// MISSING registration of shmem / memfd.
        const MISSING_SHMEM = g::UFFD_FEATURE_MISSING_SHMEM as u64;
        /// `UFFD_EVENT_UNMAP` on `munmap`.
        const EVENT_UNMAP = g::UFFD_FEATURE_EVENT_UNMAP as u64;
        /// Deliver SIGBUS instead of an event (no handler thread).
        const SIGBUS = g::UFFD_FEATURE_SIGBUS as u64;
        /// Report the faulting thread's id.
        const THREAD_ID = g::UFFD_FEATURE_THREAD_ID as u64;
        /// MINOR registration of hugetlbfs.
        const MINOR_HUGETLBFS = g::UFFD_FEATURE_MINOR_HUGETLBFS as u64;
        /// MINOR registration of shmem / memfd.
        const MINOR_SHMEM = g::UFFD_FEATURE_MINOR_SHMEM as u64;
        /// Report the exact fault address instead of the page address.
        const EXACT_ADDRESS = g::UFFD_FEATURE_EXACT_ADDRESS as u64;
        /// WP registration of hugetlbfs and shmem.
        const WP_HUGETLBFS_SHMEM = g::UFFD_FEATURE_WP_HUGETLBFS_SHMEM as u64;
        /// Write-protect unpopulated pages too (PTE markers).
        const WP_UNPOPULATED = g::UFFD_FEATURE_WP_UNPOPULATED as u64;
        /// `UFFDIO_POISON`.
        const POISON = g::UFFD_FEATURE_POISON as u64;
        /// Write-protect faults resolved by the kernel itself (dirty tracking with PAGEMAP_SCAN).
        const WP_ASYNC = g::UFFD_FEATURE_WP_ASYNC as u64;
        /// `UFFDIO_MOVE`.
        const MOVE = g::UFFD_FEATURE_MOVE as u64;
    }
}

bitflags! {
    /// The ioctls a userfaultfd or a registered range supports (`1 << _UFFDIO_*`).
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
    pub struct Ioctls: u64 {
        /// `UFFDIO_REGISTER`.
        const REGISTER = 1 << g::_UFFDIO_REGISTER;
        /// `UFFDIO_UNREGISTER`.
        const UNREGISTER = 1 << g::_UFFDIO_UNREGISTER;
        /// `UFFDIO_WAKE`.
        const WAKE = 1 << g::_UFFDIO_WAKE;
        /// `UFFDIO_COPY`.
        const COPY = 1 << g::_UFFDIO_COPY;
        /// `UFFDIO_ZEROPAGE`.
        const ZEROPAGE = 1 << g::_UFFDIO_ZEROPAGE;
        /// `UFFDIO_MOVE`.
        const MOVE = 1 << g::_UFFDIO_MOVE;
        /// `UFFDIO_WRITEPROTECT`.
        const WRITEPROTECT = 1 << g::_UFFDIO_WRITEPROTECT;
        /// `UFFDIO_CONTINUE`.
        const CONTINUE = 1 << g::_UFFDIO_CONTINUE;
        /// `UFFDIO_POISON`.
        const POISON = 1 << g::_UFFDIO_POISON;
        /// `UFFDIO_API`.
        const API = 1 << g::_UFFDIO_API;
    }
}

bitflags! {
    /// How a range is registered (`UFFDIO_REGISTER_MODE_*`); at least one bit must be set.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
    pub struct RegisterMode: u64 {
        /// Faults on pages that are not present.
        const MISSING = crate::sys::UFFDIO_REGISTER_MODE_MISSING;
        /// Write faults on write-protected pages.
        const WP = crate::sys::UFFDIO_REGISTER_MODE_WP;
        /// Faults on pages present in the page cache but not mapped (shmem, hugetlbfs).
        const MINOR = crate::sys::UFFDIO_REGISTER_MODE_MINOR;
    }
}

bitflags! {
    /// Modes of [`Uffd::copy`](crate::Uffd::copy).
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
    pub struct CopyMode: u64 {
        /// Do not wake the faulting threads (wake later with [`Uffd::wake`](crate::Uffd::wake)).
        const DONTWAKE = crate::sys::UFFDIO_COPY_MODE_DONTWAKE;
        /// Map the new pages write-protected.
        const WP = crate::sys::UFFDIO_COPY_MODE_WP;
    }
}

bitflags! {
    /// Modes of [`Uffd::continue_range`](crate::Uffd::continue_range).
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
    pub struct ContinueMode: u64 {
        /// Do not wake the faulting threads.
        const DONTWAKE = crate::sys::UFFDIO_CONTINUE_MODE_DONTWAKE;
        /// Map the pages write-protected.
        const WP = crate::sys::UFFDIO_CONTINUE_MODE_WP;
    }
}

bitflags! {
    /// Modes of [`Uffd::move_pages`](crate::Uffd::move_pages).
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
    pub struct MoveMode: u64 {
        /// Do not wake the faulting threads.
        const DONTWAKE = crate::sys::UFFDIO_MOVE_MODE_DONTWAKE;
        /// Treat holes in the source as success (they stay holes in the destination).
        const ALLOW_SRC_HOLES = crate::sys::UFFDIO_MOVE_MODE_ALLOW_SRC_HOLES;
    }
}
