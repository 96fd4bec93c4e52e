//! `faultline bench irq`: every way to deliver an interrupt, measured side by side.
//!
//! - **Host** paths: a "device" thread raises, a "handler" thread wakes and answers
//!   (ping-pong, [`host`]), handler on the device's CPU (`same-cpu`) and on the other one
//!   (`cross-cpu`), both pinned. Anchor: the same methods in C (`c/irq_pingpong.c`, compiled
//!   at run time with the system `cc`), run in the same process invocation, interleaved with
//!   ours; each line of ours carries its p50 over C's (`vs_c_p50`).
//!
//! One JSON object per line; the keys `bench`, `path`, `placement`, `impl`, `p50_us`,
//! `p99_us`, `p999_us`, `max_us`, `exits_per_irq` are an interface. A path this host lacks is
//! reported as [`Out::Unavailable`] with the reason, never skipped silently.

pub mod cref;
pub mod guest;
pub mod host;
pub mod plot;

use std::io;

use serde::{Deserialize, Serialize};
use thiserror::Error;

pub use host::Method;

/// Running the interrupt bench failed.
#[derive(Debug, Error)]
pub enum IrqBenchError {
    /// A system call failed.
    #[error("{what} failed")]
    Sys {
        /// The call.
        what: &'static str,
        /// Its error (errno kept).
        #[source]
        source: io::Error,
    },
    /// A bench thread panicked.
    #[error("the {0} thread panicked")]
    Panicked(&'static str),
    /// A ping-pong did not finish in time (one side stopped answering); its threads are
    /// left behind rather than waited for.
    #[error("the {method} ping-pong did not finish within {secs} s")]
    Stalled {
        /// The method.
        method: &'static str,
        /// The deadline, s.
        secs: u64,
    },
    /// The C compiler could not be started.
    #[error("the C compiler '{cc}' could not be run")]
    CcMissing {
        /// The compiler.
        cc: String,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The C reference did not compile.
    #[error("'{cc}' could not compile the C reference: {stderr}")]
    CcFailed {
        /// The compiler.
        cc: String,
        /// Its diagnostics.
        stderr: String,
    },
    /// The C reference failed.
    #[error("the C reference failed for {method}: {stderr}")]
    CFailed {
        /// The method.
        method: String,
        /// Its diagnostics.
        stderr: String,
    },
    /// Setting up or running the guest failed.
    #[error("guest: {what}")]
    Guest {
        /// What was being done.
        what: &'static str,
        /// Why.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// A guest path delivered nothing (reported as unavailable, not as a failure of the run).
    #[error("{path}: {why}")]
    NotDelivered {
        /// The path.
        path: &'static str,
        /// What happened.
        why: String,
    },
    /// The plot could not be drawn or written.
    #[error("cannot draw the SVG plot")]
    Plot(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// The C reference printed something else than a JSON line.
    #[error("the C reference's output for {method} is not a JSON line")]
    CParse {
        /// The method.
        method: String,
        /// The parse error.
        #[source]
        source: serde_json::Error,
    },
}

/// One output line.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Line {
    /// `"irq"`.
    pub bench: String,
    /// The delivery path (`eventfd`, ..., `guest-irqfd-msi`).
    pub path: String,
    /// `same-cpu` or `cross-cpu`: the handler's CPU relative to the device's.
    pub placement: String,
    /// `faultline` or `c`.
    pub r#impl: String,
    /// One-way latency, median, µs.
    pub p50_us: f64,
    /// 99th percentile, µs.
    pub p99_us: f64,
    /// 99.9th percentile, µs.
    pub p999_us: f64,
    /// Largest, µs.
    pub max_us: f64,
    /// VM exits to userspace per interrupt (0 for host paths).
    pub exits_per_irq: f64,
    /// Interrupts delivered and measured.
    pub samples: usize,
    /// Guest paths: the IDT handler's privilege level (`cpl0`, `cpl3`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub handler: Option<String>,
    /// Guest paths: every VM exit KVM counted per interrupt (its binary stats' `exits`: those
    /// handled in the kernel and those passed to userspace), where the host has them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kvm_exits_per_irq: Option<f64>,
    /// Our p50 over the C reference's for the same path and placement (ours only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vs_c_p50: Option<f64>,
}

/// What the bench reports.
#[derive(Debug, Clone)]
pub enum Out {
    /// A measured path.
    Line(Line),
    /// A path this host cannot measure, and why.
    Unavailable {
        /// The path.
        path: String,
        /// The placement.
        placement: String,
        /// Why.
        reason: String,
    },
    /// A fact about the host found on the way (the guest's clock, posted interrupts).
    Probe {
        /// What was probed.
        what: String,
        /// What was found.
        value: String,
    },
}

/// What to run.
#[derive(Debug, Clone)]
pub struct Params {
    /// Round trips per host path and run (at least 20,000 for the real figure).
    pub round_trips: usize,
    /// Runs; each statistic is the median over runs.
    pub runs: usize,
    /// Interrupts per guest path, handler and placement (0: no guest paths).
    pub guest_irqs: usize,
}

/// Percentile `p` (0..=1) of sorted `v`.
pub fn pct(v: &[f64], p: f64) -> f64 {
    v[((v.len() - 1) as f64 * p).round() as usize]
}

/// A line from raw samples (µs).
pub fn line(path: &str, placement: &str, imp: &str, mut us: Vec<f64>, exits_per_irq: f64) -> Line {
    us.sort_by(|a, b| a.total_cmp(b));
    Line {
        bench: "irq".into(),
        path: path.into(),
        placement: placement.into(),
        r#impl: imp.into(),
        p50_us: pct(&us, 0.5),
        p99_us: pct(&us, 0.99),
        p999_us: pct(&us, 0.999),
        max_us: us.last().copied().unwrap_or(0.0),
        exits_per_irq,
        samples: us.len(),
        handler: None,
        kvm_exits_per_irq: None,
        vs_c_p50: None,
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// The median line of several runs' lines (each statistic on its own).
fn median_line(runs: &[Line]) -> Line {
    let opt = |f: fn(&Line) -> Option<f64>| {
        let v: Vec<f64> = runs.iter().filter_map(f).collect();
        (!v.is_empty()).then(|| median(v))
    };
    let m = |f: fn(&Line) -> f64| median(runs.iter().map(f).collect());
    Line {
        p50_us: m(|l| l.p50_us),
        p99_us: m(|l| l.p99_us),
        p999_us: m(|l| l.p999_us),
        max_us: m(|l| l.max_us),
        exits_per_irq: m(|l| l.exits_per_irq),
        samples: runs.iter().map(|l| l.samples).min().unwrap_or(0),
        kvm_exits_per_irq: opt(|l| l.kvm_exits_per_irq),
        ..runs[0].clone()
    }
}

/// A placement: `(name, device CPU, handler CPU)`, or `(name, why it is missing)`.
pub type Placement = Result<(&'static str, usize, usize), (&'static str, String)>;

/// The placements on this host.
pub fn placements() -> Vec<Placement> {
    let cpus = host::allowed_cpus();
    let c0 = cpus.first().copied().unwrap_or(0);
    vec![
        Ok(("same-cpu", c0, c0)),
        match cpus.get(1) {
            Some(&c1) => Ok(("cross-cpu", c0, c1)),
            None => Err((
                "cross-cpu",
                format!("this process may run on one CPU only ({c0})"),
            )),
        },
    ]
}

/// Run the host paths, ours and C's interleaved, `p.runs` times; report through `f`.
pub fn run_host(p: &Params, mut f: impl FnMut(Out)) -> Result<(), IrqBenchError> {
    let runs = p.runs.max(1);
    let c = match cref::CRef::build() {
        Ok(c) => Some(c),
        Err(e) => {
            f(Out::Unavailable {
                path: "c reference".into(),
                placement: "all".into(),
                reason: error_chain(&e),
            });
            None
        }
    };
    for pl in placements() {
        let (name, dev, hnd) = match pl {
            Ok(x) => x,
            Err((name, reason)) => {
                for m in Method::ALL {
                    f(Out::Unavailable {
                        path: m.name().into(),
                        placement: name.into(),
                        reason: reason.clone(),
                    });
                }
                continue;
            }
        };
        for m in Method::ALL {
            let mut ours = Vec::new();
            let mut theirs = Vec::new();
            for _ in 0..runs {
                let us = host::pingpong(m, dev, hnd, p.round_trips)?;
                ours.push(line(m.name(), name, "faultline", us, 0.0));
                if let Some(c) = &c {
                    theirs.push(c.run(m.name(), name, dev, hnd, p.round_trips)?);
                }
            }
            let mut o = median_line(&ours);
            let t = (!theirs.is_empty()).then(|| median_line(&theirs));
            if let Some(t) = &t {
                o.vs_c_p50 = Some(o.p50_us / t.p50_us);
            }
            f(Out::Line(o));
            if let Some(t) = t {
                f(Out::Line(t));
            }
        }
    }
    Ok(())
}

/// Run the guest paths, `p.runs` times each (a VM per run): the CPL 3 handler, then the CPL 0 one, the triggering thread on the
/// other CPU than the vCPU's (`cross-cpu`) and on the same (`same-cpu`).
pub fn run_guest(p: &Params, mut f: impl FnMut(Out)) -> Result<(), IrqBenchError> {
    for o in guest::probe_apicv() {
        f(o);
    }
    if p.guest_irqs == 0 {
        return Ok(());
    }
    for cpl in [3, 0] {
        for pl in placements() {
            match pl {
                Ok((name, dev, hnd)) => {
                    // The vCPU takes the handler's CPU; the trigger runs on the device's.
                    guest::run_guest(cpl, p.guest_irqs, p.runs, name, hnd, dev, &mut f)?
                }
                Err((name, reason)) => f(Out::Unavailable {
                    path: format!("guest paths (cpl{cpl} handler)"),
                    placement: name.into(),
                    reason,
                }),
            }
        }
    }
    Ok(())
}

/// An error and its causes on one line.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_host_path_delivers_every_interrupt() {
        for pl in placements().into_iter().flatten() {
            let (_, dev, hnd) = pl;
            for m in Method::ALL {
                let us = host::pingpong(m, dev, hnd, 200).unwrap();
                assert_eq!(us.len(), 200, "{}", m.name());
                assert!(us.iter().all(|&u| u > 0.0 && u < 1e6), "{}", m.name());
            }
        }
    }

    #[test]
    fn c_reference_builds_and_reports_the_same_keys() {
        let c = cref::CRef::build().expect("the system cc builds the C reference");
        for m in Method::ALL {
            let l = c.run(m.name(), "same-cpu", 0, 0, 100).unwrap();
            assert_eq!((l.bench.as_str(), l.r#impl.as_str()), ("irq", "c"));
            assert_eq!(l.path, m.name());
            assert_eq!(l.samples, 100);
            assert!(l.p50_us <= l.p99_us && l.p99_us <= l.max_us);
        }
    }

    #[test]
    fn percentiles_and_medians() {
        let l = line(
            "x",
            "same-cpu",
            "faultline",
            (1..=1000).map(f64::from).collect(),
            0.0,
        );
        assert_eq!(
            (l.p50_us, l.p99_us, l.p999_us, l.max_us),
            (501.0, 990.0, 999.0, 1000.0)
        );
        let m = median_line(&[l.clone(), l.clone(), line("x", "s", "f", vec![1.0], 0.0)]);
        assert_eq!(m.p50_us, 501.0);
        assert_eq!(m.samples, 1);
    }
}
