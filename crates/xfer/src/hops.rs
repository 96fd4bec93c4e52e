//! Where a remote fault's time goes: `CLOCK_MONOTONIC` stamps at each hop of a page request,
//! on both sides, for `faultline bench migrate --breakdown`.
//!
//! Off unless `FAULTLINE_BREAKDOWN=1` is in the environment (read once): then the destination
//! records, per requested page, when its fault handler asked the source ([`DestHops`]:
//! handler woke, request sent, page received, page installed), and the source when it read
//! the request, when its responder took it and when the page was written
//! ([`SourceHops`]). `CLOCK_MONOTONIC` is one clock for every process of a host, so on one
//! host (loopback) the two sides' stamps can be joined by page number
//! ([`join`]); across hosts only each side's own hops mean something.
//!
//! The two hops the host cannot see are left out: the vCPU's fault until the kernel makes
//! the event readable, and `UFFDIO_COPY`'s wake-up until the vCPU runs again. The fault
//! latency the fault loop reports (handler woke → installed) is the sum of the hops here.
//! At most [`MAX_SAMPLES`] faults are kept per side (the destination's go back in its
//! report, within a `Done` frame's 1 MiB).

use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};

use serde::Serialize;

/// Faults recorded per side, at most.
pub const MAX_SAMPLES: usize = 4096;

/// Whether stamps are taken (`FAULTLINE_BREAKDOWN=1`).
pub fn enabled() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| std::env::var("FAULTLINE_BREAKDOWN").is_ok_and(|v| v == "1"))
}

/// `CLOCK_MONOTONIC`, ns.
pub fn mono_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes the timespec we pass; CLOCK_MONOTONIC always exists.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// The destination's stamps: `[page, handler woke, request sent, page received, installed]`.
#[derive(Debug, Default)]
pub struct DestHops {
    open: Mutex<HashMap<u64, [u64; 2]>>,
    done: Mutex<Vec<[u64; 5]>>,
}

impl DestHops {
    /// A request for `page` went out: the handler woke at `woke`, the request was sent now.
    pub fn requested(&self, page: u64, woke: u64) {
        let sent = mono_ns();
        let mut o = self.open.lock().unwrap_or_else(|e| e.into_inner());
        if o.len() < MAX_SAMPLES {
            o.insert(page, [woke, sent]);
        }
    }

    /// Pages `[page, page + n)` arrived (on the priority connection) at `received` and
    /// are installed now.
    pub fn installed(&self, page: u64, n: u64, received: u64) {
        let inst = mono_ns();
        let mut o = self.open.lock().unwrap_or_else(|e| e.into_inner());
        if o.is_empty() {
            return;
        }
        let mut d = self.done.lock().unwrap_or_else(|e| e.into_inner());
        for p in page..page + n {
            if let Some([w, s]) = o.remove(&p)
                && d.len() < MAX_SAMPLES
            {
                d.push([p, w, s, received, inst]);
            }
        }
    }

    /// The faults recorded so far.
    pub fn take(&self) -> Vec<[u64; 5]> {
        self.done.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// The source's stamps: `[page, request read, responder took it, page written]`.
#[derive(Debug, Default)]
pub struct SourceHops {
    done: Mutex<Vec<[u64; 4]>>,
}

impl SourceHops {
    /// The answer to the request for `page` (read at `read`, taken at `took`) is written.
    pub fn answered(&self, page: u64, read: u64, took: u64) {
        let sent = mono_ns();
        let mut d = self.done.lock().unwrap_or_else(|e| e.into_inner());
        if d.len() < MAX_SAMPLES {
            d.push([page, read, took, sent]);
        }
    }

    /// The answers recorded so far.
    pub fn take(&self) -> Vec<[u64; 4]> {
        self.done.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// Medians of each hop, µs, over the faults both sides recorded (joined by page).
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct Breakdown {
    /// Faults joined.
    pub samples: usize,
    /// Handler woke → request written (destination).
    pub request_sent_us: f64,
    /// Request written → read by the source (the network, and the source's wake-up).
    pub source_read_us: f64,
    /// Read → taken by the responder (a thread hand-off at the source, if any).
    pub responder_us: f64,
    /// Taken → page written (reading guest memory, the write).
    pub page_sent_us: f64,
    /// Written → received by the destination (the network, and the receiver's wake-up).
    pub page_received_us: f64,
    /// Received → installed (`UFFDIO_COPY`, which wakes the vCPU).
    pub installed_us: f64,
    /// Handler woke → installed: the fault loop's own fault latency.
    pub total_us: f64,
}

fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Join both sides' stamps by page; a page recorded twice at the source (asked again after a
/// reconnection) is left out.
pub fn join(dest: &[[u64; 5]], source: &[[u64; 4]]) -> Breakdown {
    let mut src: HashMap<u64, Option<[u64; 4]>> = HashMap::new();
    for s in source {
        src.entry(s[0])
            .and_modify(|v| *v = None)
            .or_insert(Some(*s));
    }
    let us = |a: u64, b: u64| b.saturating_sub(a) as f64 / 1e3;
    let mut cols: [Vec<f64>; 7] = Default::default();
    for d in dest {
        let Some(Some(s)) = src.get(&d[0]) else {
            continue;
        };
        // Stamps out of order belong to different requests: skip.
        if !(d[1] <= d[2] && d[2] <= s[1] && s[1] <= s[2] && s[2] <= s[3] && s[3] <= d[3])
            || d[3] > d[4]
        {
            continue;
        }
        for (c, v) in cols.iter_mut().zip([
            us(d[1], d[2]),
            us(d[2], s[1]),
            us(s[1], s[2]),
            us(s[2], s[3]),
            us(s[3], d[3]),
            us(d[3], d[4]),
            us(d[1], d[4]),
        ]) {
            c.push(v);
        }
    }
    let samples = cols[0].len();
    let [a, b, c, d, e, f, g] = cols.map(median);
    Breakdown {
        samples,
        request_sent_us: a,
        source_read_us: b,
        responder_us: c,
        page_sent_us: d,
        page_received_us: e,
        installed_us: f,
        total_us: g,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn join_takes_medians_of_each_hop_and_skips_what_does_not_match() {
        let dest = [
            [7, 1_000, 3_000, 20_000, 25_000],
            [8, 2_000, 4_000, 30_000, 31_000],
            [9, 0, 1, 2, 3], // no source stamp
            [10, 0, 5, 10, 20],
        ];
        let source = [
            [7, 5_000, 6_000, 10_000],
            [8, 6_000, 6_000, 8_000],
            [10, 1, 2, 3], // before the request was sent: another request
            [11, 1, 2, 3], // no destination stamp
        ];
        let b = join(&dest, &source);
        assert_eq!(b.samples, 2);
        assert_eq!(b.request_sent_us, 2.0);
        assert_eq!(b.source_read_us, 2.0);
        assert_eq!(b.total_us, 29.0);
        // A page answered twice at the source is left out.
        let twice = [source[0], source[0]];
        assert_eq!(join(&dest, &twice).samples, 0);
        assert_eq!(join(&[], &[]).samples, 0);
    }

    #[test]
    fn dest_hops_pair_requests_with_installs() {
        let h = DestHops::default();
        h.requested(3, mono_ns());
        h.installed(2, 4, mono_ns());
        h.installed(3, 1, mono_ns()); // already taken
        let d = h.take();
        assert_eq!(d.len(), 1);
        assert_eq!(d[0][0], 3);
        assert!(d[0][1] <= d[0][2] && d[0][2] <= d[0][4]);
    }
}
