//! The block device's counters.

use std::sync::atomic::{AtomicU64, Ordering};

use super::{RequestError, req};

/// Live counters of a [`Block`](super::Block) device, shared with whoever prints them.
#[derive(Debug, Default)]
pub struct BlockStats {
    requests: AtomicU64,
    reads: AtomicU64,
    writes: AtomicU64,
    flushes: AtomicU64,
    get_ids: AtomicU64,
    discards: AtomicU64,
    write_zeroes: AtomicU64,
    bytes_read: AtomicU64,
    bytes_written: AtomicU64,
    errors: AtomicU64,
    backend_errors: AtomicU64,
    out_of_range: AtomicU64,
    unaligned: AtomicU64,
    read_only: AtomicU64,
    bad_segments: AtomicU64,
    unsupported: AtomicU64,
}

/// The counters at one moment.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct BlockCounters {
    /// Requests answered with a status (any type).
    pub requests: u64,
    /// `IN` requests.
    pub reads: u64,
    /// `OUT` requests.
    pub writes: u64,
    /// `FLUSH` requests.
    pub flushes: u64,
    /// `GET_ID` requests.
    pub get_ids: u64,
    /// `DISCARD` requests.
    pub discards: u64,
    /// `WRITE_ZEROES` requests.
    pub write_zeroes: u64,
    /// Bytes read from the backend into the guest.
    pub bytes_read: u64,
    /// Bytes written from the guest to the backend.
    pub bytes_written: u64,
    /// Requests answered `IOERR` or `UNSUPP` (the sum of the reasons below).
    pub errors: u64,
    /// ... because the backend failed (e.g. `ENOSPC`).
    pub backend_errors: u64,
    /// ... because the range is past the capacity.
    pub out_of_range: u64,
    /// ... because the data is not whole sectors.
    pub unaligned: u64,
    /// ... because the disk is read-only.
    pub read_only: u64,
    /// ... because discard or write-zeroes segments are malformed.
    pub bad_segments: u64,
    /// ... because the type, a flag or the feature is not supported.
    pub unsupported: u64,
}

impl BlockStats {
    pub(super) fn request(&self, kind: u32) {
        self.requests.fetch_add(1, Ordering::Relaxed);
        let c = match kind {
            req::IN => &self.reads,
            req::OUT => &self.writes,
            req::FLUSH => &self.flushes,
            req::GET_ID => &self.get_ids,
            req::DISCARD => &self.discards,
            req::WRITE_ZEROES => &self.write_zeroes,
            _ => return,
        };
        c.fetch_add(1, Ordering::Relaxed);
    }

    pub(super) fn bytes_read(&self, n: u64) {
        self.bytes_read.fetch_add(n, Ordering::Relaxed);
    }

    pub(super) fn bytes_written(&self, n: u64) {
        self.bytes_written.fetch_add(n, Ordering::Relaxed);
    }

    /// Count a failed request; returns the errors so far (this one included).
    pub(super) fn failed(&self, e: &RequestError) -> u64 {
        let c = match e {
            RequestError::Backend { .. } => &self.backend_errors,
            RequestError::OutOfRange { .. } => &self.out_of_range,
            RequestError::Unaligned { .. } => &self.unaligned,
            RequestError::ReadOnly => &self.read_only,
            RequestError::Segments(_) => &self.bad_segments,
            RequestError::Unsupported(_) => &self.unsupported,
        };
        c.fetch_add(1, Ordering::Relaxed);
        self.errors.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// The counters now.
    pub fn snapshot(&self) -> BlockCounters {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        BlockCounters {
            requests: g(&self.requests),
            reads: g(&self.reads),
            writes: g(&self.writes),
            flushes: g(&self.flushes),
            get_ids: g(&self.get_ids),
            discards: g(&self.discards),
            write_zeroes: g(&self.write_zeroes),
            bytes_read: g(&self.bytes_read),
            bytes_written: g(&self.bytes_written),
            errors: g(&self.errors),
            backend_errors: g(&self.backend_errors),
            out_of_range: g(&self.out_of_range),
            unaligned: g(&self.unaligned),
            read_only: g(&self.read_only),
            bad_segments: g(&self.bad_segments),
            unsupported: g(&self.unsupported),
        }
    }
}
