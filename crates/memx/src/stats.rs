//! Fault-loop counters and the per-fault service-time histogram.

use std::collections::{BTreeMap, HashMap};
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
    pub installed_pages: AtomicU64,
    pub installed_bytes: AtomicU64,
    pub installed_zero: AtomicU64,
    pub install_duplicates: AtomicU64,
    pub settled_by_install: AtomicU64,
    pub late_answers: AtomicU64,
    pub hist: Mutex<Histogram<u64>>,
    pub log2: [AtomicU64; LOG2_BUCKETS],
    /// By thread id: (blocked ns, faults).
    pub blocktime: Mutex<HashMap<u32, (u64, u64)>>,
    pub blocktime_total: AtomicU64,
    pub last_error: Mutex<Option<String>>,
}

/// Buckets of [`Stats::latency_log2_us`].
pub const LOG2_BUCKETS: usize = 32;

/// The log2 bucket of a latency: `i` holds `[2^i, 2^(i+1))` µs, bucket 0 also everything
/// under 1 µs, the last one everything above.
pub(crate) fn log2_bucket(ns: u64) -> usize {
    let us = ns / 1000;
    if us == 0 {
        0
    } else {
        (us.ilog2() as usize).min(LOG2_BUCKETS - 1)
    }
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
            installed_pages: AtomicU64::new(0),
            installed_bytes: AtomicU64::new(0),
            installed_zero: AtomicU64::new(0),
            install_duplicates: AtomicU64::new(0),
            settled_by_install: AtomicU64::new(0),
            late_answers: AtomicU64::new(0),
            hist: Mutex::new(new_histogram()),
            log2: std::array::from_fn(|_| AtomicU64::new(0)),
            blocktime: Mutex::new(HashMap::new()),
            blocktime_total: AtomicU64::new(0),
            last_error: Mutex::new(None),
        }
    }

    /// One fault served in `ns`: the histogram, the log2 buckets, and the blocktime of the
    /// faulting thread (`tid`, when the kernel reports it).
    pub fn record_latency(&self, ns: u64, tid: Option<u32>) {
        self.hist
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .saturating_record(ns.max(1));
        self.log2[log2_bucket(ns)].fetch_add(1, Relaxed);
        self.blocktime_total.fetch_add(ns, Relaxed);
        if let Some(t) = tid {
            let mut b = self.blocktime.lock().unwrap_or_else(|e| e.into_inner());
            let e = b.entry(t).or_default();
            e.0 += ns;
            e.1 += 1;
        }
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
    /// Pages installed through an [`Installer`](crate::Installer) (pushed or answered from
    /// outside the loop), newly mapped.
    pub pages_installed: u64,
    /// Bytes of those installed with COPY.
    pub bytes_installed: u64,
    /// Of those, pages installed as zero pages.
    pub zero_pages_installed: u64,
    /// Installs that found the page already present (counted, not an error).
    pub install_duplicates: u64,
    /// Faults answered `Pending` by the source and settled by an install.
    pub faults_settled_by_install: u64,
    /// Answers through a [`Completer`](crate::Completer) for pages already installed (dropped).
    pub late_answers: u64,
    /// Per-fault service time as log2 buckets of µs, as QEMU's `postcopy-latency-dist`:
    /// bucket `i` counts faults served in `[2^i, 2^(i+1))` µs (bucket 0 also those under
    /// 1 µs, the last bucket everything longer).
    pub latency_log2_us: Vec<u64>,
    /// Time each faulting thread spent blocked, ns, by thread id (only with the kernel's
    /// `UFFD_FEATURE_THREAD_ID`; see [`FaultLoop::thread_ids`](crate::FaultLoop::thread_ids)).
    pub blocktime_ns: BTreeMap<u32, u64>,
    /// Faults each thread took, by thread id (as [`blocktime_ns`](Self::blocktime_ns)).
    pub faults_by_thread: BTreeMap<u32, u64>,
    /// Time all faulting threads spent blocked, ns (also without thread ids).
    pub blocktime_total_ns: u64,
}

impl Stats {
    pub(crate) fn merge(shards: &[&ShardStats]) -> Self {
        let mut s = Stats {
            latency_log2_us: vec![0; LOG2_BUCKETS],
            ..Stats::default()
        };
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
            s.pages_installed += sh.installed_pages.load(Relaxed);
            s.bytes_installed += sh.installed_bytes.load(Relaxed);
            s.zero_pages_installed += sh.installed_zero.load(Relaxed);
            s.install_duplicates += sh.install_duplicates.load(Relaxed);
            s.faults_settled_by_install += sh.settled_by_install.load(Relaxed);
            s.late_answers += sh.late_answers.load(Relaxed);
            s.blocktime_total_ns += sh.blocktime_total.load(Relaxed);
            for (b, x) in s.latency_log2_us.iter_mut().zip(&sh.log2) {
                *b += x.load(Relaxed);
            }
            for (t, ns) in sh
                .blocktime
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .iter()
            {
                *s.blocktime_ns.entry(*t).or_default() += ns.0;
                *s.faults_by_thread.entry(*t).or_default() += ns.1;
            }
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
