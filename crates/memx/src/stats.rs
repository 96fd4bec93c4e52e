//! Fault-loop counters and the per-fault service-time histogram.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use hdrhistogram::Histogram;
use serde::Serialize;

/// Counters of one worker, readable while it runs.
pub(crate) struct ShardStats {
    pub faults: AtomicU64,
    pub pages: AtomicU64,
    pub bytes_copied: AtomicU64,
    pub zero_pages: AtomicU64,
    pub continued_pages: AtomicU64,
    pub already_present: AtomicU64,
    pub async_requests: AtomicU64,
    pub populated_pages: AtomicU64,
    pub errors: AtomicU64,
    pub hist: Mutex<Histogram<u64>>,
    pub last_error: Mutex<Option<String>>,
}

pub(crate) fn new_histogram() -> Histogram<u64> {
    // 1 ns .. 100 s at 3 significant digits; the bounds are constants that are valid.
    Histogram::new_with_bounds(1, 100_000_000_000, 3).expect("valid histogram bounds")
}

impl ShardStats {
    pub fn new() -> Self {
        Self {
            faults: AtomicU64::new(0),
            pages: AtomicU64::new(0),
            bytes_copied: AtomicU64::new(0),
            zero_pages: AtomicU64::new(0),
            continued_pages: AtomicU64::new(0),
            already_present: AtomicU64::new(0),
            async_requests: AtomicU64::new(0),
            populated_pages: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            hist: Mutex::new(new_histogram()),
            last_error: Mutex::new(None),
        }
    }

    pub fn record_latency(&self, ns: u64) {
        self.hist
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .saturating_record(ns.max(1));
    }

    pub fn record_error(&self, msg: String) {
        self.errors.fetch_add(1, Relaxed);
        *self.last_error.lock().unwrap_or_else(|e| e.into_inner()) = Some(msg);
    }
}

/// Percentiles of the per-fault service time: from reading the fault event to the resolving
/// ioctl's return (for asynchronous sources, to the resolve after the answer arrived).
#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq)]
pub struct Latency {
    /// Faults measured.
    pub count: u64,
    /// Median, ns.
    pub p50_ns: u64,
    /// 90th percentile, ns.
    pub p90_ns: u64,
    /// 99th percentile, ns.
    pub p99_ns: u64,
    /// Maximum, ns.
    pub max_ns: u64,
    /// Mean, ns.
    pub mean_ns: u64,
}

impl Latency {
    /// Summarise a histogram of nanoseconds.
    pub fn of(h: &Histogram<u64>) -> Self {
        if h.is_empty() {
            return Self::default();
        }
        Self {
            count: h.len(),
            p50_ns: h.value_at_quantile(0.50),
            p90_ns: h.value_at_quantile(0.90),
            p99_ns: h.value_at_quantile(0.99),
            max_ns: h.max(),
            mean_ns: h.mean() as u64,
        }
    }
}

/// What a fault loop has done, over all its workers.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct Stats {
    /// Page-fault events served.
    pub faults: u64,
    /// Pages mapped (by faults and by population).
    pub pages: u64,
    /// Bytes installed with COPY.
    pub bytes_copied: u64,
    /// Pages mapped with ZEROPAGE.
    pub zero_pages: u64,
    /// Pages mapped with CONTINUE.
    pub continued_pages: u64,
    /// Resolves that found the page already present (another thread won).
    pub already_present: u64,
    /// Requests answered later by the source.
    pub async_requests: u64,
    /// Pages mapped by background population ([`FaultLoop::finish`](crate::FaultLoop::finish)).
    pub populated_pages: u64,
    /// Pages the source failed to produce (poisoned, so their readers get SIGBUS, not junk).
    pub errors: u64,
    /// The most recent source error.
    pub last_error: Option<String>,
    /// Per-fault service time.
    pub latency: Latency,
}

impl Stats {
    pub(crate) fn merge(shards: &[&ShardStats]) -> Self {
        let mut s = Stats::default();
        let mut h = new_histogram();
        for sh in shards {
            s.faults += sh.faults.load(Relaxed);
            s.pages += sh.pages.load(Relaxed);
            s.bytes_copied += sh.bytes_copied.load(Relaxed);
            s.zero_pages += sh.zero_pages.load(Relaxed);
            s.continued_pages += sh.continued_pages.load(Relaxed);
            s.already_present += sh.already_present.load(Relaxed);
            s.async_requests += sh.async_requests.load(Relaxed);
            s.populated_pages += sh.populated_pages.load(Relaxed);
            s.errors += sh.errors.load(Relaxed);
            if let Some(e) = sh
                .last_error
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone()
            {
                s.last_error = Some(e);
            }
            // Histograms with equal bounds always add.
            let _ = h.add(&*sh.hist.lock().unwrap_or_else(|e| e.into_inner()));
        }
        s.latency = Latency::of(&h);
        s
    }
}
