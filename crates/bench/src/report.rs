//! `--report DIR`: a run's figures as SVG plots (`plotters`) and an `index.html` that shows
//! them beside the run's numbers, to be looked at rather than read.
//!
//! For a migration: the remote-fault latency histogram in log2 buckets (as QEMU's
//! `postcopy-latency-dist`), and the migration's progress over time (bytes still to move,
//! per state) as the source reported it. For `bench irq`: the latency distributions per path
//! (`irq_bench::plot`). [`svgcheck`] renders a plot as a person would see it, for the tests.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use plotters::prelude::*;
use thiserror::Error;

pub mod svgcheck;

/// Writing a report failed.
#[derive(Debug, Error)]
pub enum ReportError {
    /// The directory or a file could not be written.
    #[error("cannot write {}", path.display())]
    Write {
        /// The path.
        path: PathBuf,
        /// Cause (errno kept).
        #[source]
        source: std::io::Error,
    },
    /// A plot could not be drawn.
    #[error("cannot draw {0}")]
    Plot(String),
}

/// The colours of every plot's series, in order (matplotlib's "tab10").
pub const PALETTE: [RGBColor; 8] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
];

fn plot_err(what: &str) -> impl Fn(String) -> ReportError + '_ {
    move |e| ReportError::Plot(format!("{what}: {e}"))
}

/// One sample of a migration's progress, as the source's `GET /migrate` answered it.
#[derive(Debug, Clone, PartialEq)]
pub struct ProgressSample {
    /// Since the migration started, ms.
    pub t_ms: f64,
    /// Its state (`precopy`, `postcopy`, ...).
    pub state: String,
    /// The pre-copy round.
    pub round: u64,
    /// Bytes still to send, MiB.
    pub remaining_mib: f64,
    /// Bytes sent so far, MiB.
    pub sent_mib: f64,
    /// Of which answers to the destination's requests (post-copy), MiB.
    pub priority_mib: f64,
}

impl ProgressSample {
    /// From a `GET /migrate` answer taken `t_ms` after the start.
    pub fn from_status(t_ms: f64, v: &serde_json::Value) -> ProgressSample {
        let mib = |k: &str| v[k].as_f64().unwrap_or(0.0) / 1048576.0;
        ProgressSample {
            t_ms,
            state: v["state"].as_str().unwrap_or("?").to_string(),
            round: v["round"].as_u64().unwrap_or(0),
            remaining_mib: mib("remaining_bytes"),
            sent_mib: mib("bytes_sent"),
            priority_mib: v["priority_pages"].as_f64().unwrap_or(0.0) * 4096.0 / 1048576.0,
        }
    }

    /// The phase it belongs to: a pre-copy round, the post-copy background push, or a state.
    fn phase(&self) -> String {
        match self.state.as_str() {
            "precopy" => format!("pre-copy round {}", self.round),
            "postcopy" => "post-copy (background push)".into(),
            s => s.to_string(),
        }
    }
}

/// The remote-fault latency histogram: `buckets[i]` faults took `[2^i, 2^(i+1))` µs.
pub fn fault_histogram(file: &Path, buckets: &[u64]) -> Result<(), ReportError> {
    let err = plot_err("the fault histogram");
    let last = buckets
        .iter()
        .rposition(|&n| n > 0)
        .map_or(8, |i| i + 1)
        .max(4);
    let top = buckets.iter().copied().max().unwrap_or(0).max(1);
    let root = SVGBackend::new(file, (900, 500)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(e.to_string()))?;
    let total: u64 = buckets.iter().sum();
    let mut chart = ChartBuilder::on(&root)
        .caption(
            format!("remote page faults: {total}, latency in log2 buckets"),
            ("sans-serif", 20),
        )
        .margin(10)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(0u32..last as u32, 0u64..top + top / 10 + 1)
        .map_err(|e| err(e.to_string()))?;
    chart
        .configure_mesh()
        .x_labels(last)
        .x_label_formatter(&|i| bucket_label(*i))
        .x_desc("fault latency, µs (bucket lower bound)")
        .y_desc("remote faults in the bucket")
        .draw()
        .map_err(|e| err(e.to_string()))?;
    chart
        .draw_series(buckets.iter().take(last).enumerate().map(|(i, &n)| {
            let i = i as u32;
            Rectangle::new([(i, 0), (i + 1, n)], PALETTE[0].filled())
        }))
        .map_err(|e| err(e.to_string()))?;
    root.present().map_err(|e| err(e.to_string()))?;
    Ok(())
}

fn bucket_label(i: u32) -> String {
    match 1u64.checked_shl(i) {
        Some(v) if v >= 1_000_000 => format!("{}s", v / 1_000_000),
        Some(v) if v >= 1000 => format!("{}ms", v / 1000),
        Some(v) => format!("{v}"),
        None => String::new(),
    }
}

/// Bytes over time: MiB sent so far, one colour per phase (each pre-copy round, the
/// post-copy background push), and of them the answers to the destination's page requests
/// (the priority connection).
pub fn progress_timeline(file: &Path, samples: &[ProgressSample]) -> Result<(), ReportError> {
    let err = plot_err("the bytes-over-time plot");
    let t_end = samples.last().map_or(1.0, |s| s.t_ms).max(1.0);
    let top = samples.iter().map(|s| s.sent_mib).fold(1.0f64, f64::max);
    let root = SVGBackend::new(file, (900, 500)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(e.to_string()))?;
    let mut chart = ChartBuilder::on(&root)
        .caption("bytes sent over time, by phase", ("sans-serif", 20))
        .margin(10)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(0f64..t_end * 1.02, 0f64..top * 1.25)
        .map_err(|e| err(e.to_string()))?;
    chart
        .configure_mesh()
        .x_desc("time since the migration started, ms")
        .y_desc("sent so far, MiB")
        .draw()
        .map_err(|e| err(e.to_string()))?;
    let mut phases: Vec<String> = Vec::new();
    for s in samples {
        let p = s.phase();
        if !phases.contains(&p) {
            phases.push(p);
        }
    }
    // Red is kept for the answers to page requests.
    let phase_colours: Vec<RGBColor> = PALETTE
        .iter()
        .copied()
        .filter(|&c| c != PALETTE[3])
        .collect();
    chart
        .draw_series(LineSeries::new(
            samples.iter().map(|s| (s.t_ms, s.sent_mib)),
            BLACK.mix(0.3),
        ))
        .map_err(|e| err(e.to_string()))?;
    for (k, ph) in phases.iter().enumerate() {
        let c = phase_colours[k % phase_colours.len()];
        chart
            .draw_series(
                samples
                    .iter()
                    .filter(|s| s.phase() == *ph)
                    .map(|s| Circle::new((s.t_ms, s.sent_mib), 4, c.filled())),
            )
            .map_err(|e| err(e.to_string()))?
            .label(ph.clone())
            .legend(move |(x, y)| Circle::new((x, y), 4, c.filled()));
    }
    let red = PALETTE[3];
    if samples.iter().any(|s| s.priority_mib > 0.0) {
        chart
            .draw_series(LineSeries::new(
                samples.iter().map(|s| (s.t_ms, s.priority_mib)),
                red.stroke_width(2),
            ))
            .map_err(|e| err(e.to_string()))?
            .label("of which answers to page requests (priority)")
            .legend(move |(x, y)| {
                PathElement::new(vec![(x - 8, y), (x + 8, y)], red.stroke_width(2))
            });
    }
    if !phases.is_empty() {
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperLeft)
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()
            .map_err(|e| err(e.to_string()))?;
    }
    root.present().map_err(|e| err(e.to_string()))?;
    Ok(())
}

/// Grouped bars: for each of `categories`, one bar per series (`series`: name and one value
/// per category), on a log scale.
pub fn grouped_bars(
    file: &Path,
    caption: &str,
    (x_desc, y_desc): (&str, &str),
    categories: &[String],
    series: &[(String, Vec<f64>)],
) -> Result<(), ReportError> {
    let err = plot_err("the bar chart");
    let vals = series
        .iter()
        .flat_map(|(_, v)| v.iter().copied())
        .filter(|v| *v > 0.0);
    let (lo, hi) = vals.fold((f64::MAX, 0f64), |(a, b), v| (a.min(v), b.max(v)));
    let (lo, hi) = if hi > 0.0 { (lo, hi) } else { (1.0, 10.0) };
    let floor = (lo / 2.0).max(1e-3);
    let root = SVGBackend::new(file, (900, 500)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(e.to_string()))?;
    let n = categories.len().max(1);
    let k = series.len().max(1) as f64;
    let mut chart = ChartBuilder::on(&root)
        .caption(caption, ("sans-serif", 20))
        .margin(10)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(-0.5f64..n as f64 - 0.5, (floor..hi * 20.0).log_scale())
        .map_err(|e| err(e.to_string()))?;
    let cats = categories.to_vec();
    chart
        .configure_mesh()
        .x_labels(n + 1)
        .x_label_formatter(&|x| {
            let i = x.round();
            if (x - i).abs() < 0.01 && i >= 0.0 {
                cats.get(i as usize).cloned().unwrap_or_default()
            } else {
                String::new()
            }
        })
        .x_desc(x_desc)
        .y_desc(y_desc)
        .draw()
        .map_err(|e| err(e.to_string()))?;
    for (si, (name, v)) in series.iter().enumerate() {
        let c = PALETTE[si % PALETTE.len()];
        let w = 0.7 / k;
        let off = -0.35 + w * si as f64;
        chart
            .draw_series(
                v.iter()
                    .enumerate()
                    .filter(|(_, y)| **y > 0.0)
                    .map(|(i, &y)| {
                        let x = i as f64 + off;
                        Rectangle::new([(x, floor), (x + w * 0.9, y)], c.filled())
                    }),
            )
            .map_err(|e| err(e.to_string()))?
            .label(name.clone())
            .legend(move |(x, y)| Rectangle::new([(x - 5, y - 5), (x + 5, y + 5)], c.filled()));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(|e| err(e.to_string()))?;
    root.present().map_err(|e| err(e.to_string()))?;
    Ok(())
}

/// A guest heartbeat on the timeline.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TimelineBeat {
    /// Since the migration was asked for, ms (negative: before).
    pub t_ms: f64,
    /// At the destination (else at the source).
    pub destination: bool,
    /// Its number.
    pub n: u64,
}

/// The guest's heartbeats around the pause from a migration's final stats (the source's
/// last ones before it paused the guest, `beats_mono_us`, and the destination's first ones,
/// `destination.beats_mono_us`: `[number, CLOCK_MONOTONIC µs]`), in ms from the pause
/// (`pause_mono_us`). Both processes run on one host, so one clock. Empty if the stats carry
/// none (an older peer).
pub fn beats_from_stats(stats: &serde_json::Value) -> Vec<TimelineBeat> {
    let Some(pause) = stats["pause_mono_us"].as_u64() else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for (v, destination) in [
        (&stats["beats_mono_us"], false),
        (&stats["destination"]["beats_mono_us"], true),
    ] {
        for cpu in v.as_array().into_iter().flatten() {
            for b in cpu.as_array().into_iter().flatten() {
                if let (Some(n), Some(us)) = (b[0].as_u64(), b[1].as_u64()) {
                    out.push(TimelineBeat {
                        t_ms: (us as f64 - pause as f64) / 1e3,
                        destination,
                        n,
                    });
                }
            }
        }
    }
    out
}

/// The guest's pause as its heartbeats show it: the last beat at the source before the
/// first at the destination, and that first one (ms since the migration was asked for).
pub fn pause_of(beats: &[TimelineBeat]) -> Option<(f64, f64)> {
    let first_dst = beats
        .iter()
        .filter(|b| b.destination)
        .map(|b| b.t_ms)
        .fold(f64::INFINITY, f64::min);
    let last_src = beats
        .iter()
        .filter(|b| !b.destination && b.t_ms <= first_dst)
        .map(|b| b.t_ms)
        .fold(f64::NEG_INFINITY, f64::max);
    (first_dst.is_finite() && last_src.is_finite()).then_some((last_src, first_dst))
}

/// The guest's heartbeats over time at the source and at the destination, the pause
/// between them shaded.
pub fn heartbeat_timeline(file: &Path, beats: &[TimelineBeat]) -> Result<(), ReportError> {
    let err = plot_err("the heartbeat timeline");
    let t0 = beats.iter().map(|b| b.t_ms).fold(0f64, f64::min);
    let t1 = beats.iter().map(|b| b.t_ms).fold(1f64, f64::max);
    let n0 = beats.iter().map(|b| b.n).min().unwrap_or(0) as f64;
    let n1 = beats.iter().map(|b| b.n).max().unwrap_or(1) as f64 + 1.0;
    let pause = pause_of(beats);
    let caption = match pause {
        Some((a, b)) => format!(
            "guest heartbeats: between the sides, {:.0} ms without a beat",
            b - a
        ),
        None => "guest heartbeats".to_string(),
    };
    let root = SVGBackend::new(file, (900, 500)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(e.to_string()))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(caption, ("sans-serif", 20))
        .margin(10)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(t0 - 50.0..t1 + 50.0, n0..n1 + (n1 - n0) * 0.15)
        .map_err(|e| err(e.to_string()))?;
    chart
        .configure_mesh()
        .x_desc("time from the pause at the source, ms")
        .y_desc("heartbeat number")
        .draw()
        .map_err(|e| err(e.to_string()))?;
    if let Some((a, b)) = pause {
        chart
            .draw_series(std::iter::once(Rectangle::new(
                [(a, n0), (b, n1 + (n1 - n0) * 0.15)],
                PALETTE[3].mix(0.2).filled(),
            )))
            .map_err(|e| err(e.to_string()))?
            .label("the guest paused")
            .legend(|(x, y)| {
                Rectangle::new(
                    [(x - 5, y - 5), (x + 5, y + 5)],
                    PALETTE[3].mix(0.4).filled(),
                )
            });
    }
    for (dest, name, c) in [
        (false, "at the source", PALETTE[0]),
        (true, "at the destination", PALETTE[1]),
    ] {
        chart
            .draw_series(
                beats
                    .iter()
                    .filter(|b| b.destination == dest)
                    .map(|b| Circle::new((b.t_ms, b.n as f64), 3, c.filled())),
            )
            .map_err(|e| err(e.to_string()))?
            .label(name)
            .legend(move |(x, y)| Circle::new((x, y), 4, c.filled()));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(|e| err(e.to_string()))?;
    root.present().map_err(|e| err(e.to_string()))?;
    Ok(())
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// Write `index.html` into `dir`: `title`, the `figures` (caption, SVG file name in `dir`)
/// and the run's numbers (`rows` of name and value).
pub fn index(
    dir: &Path,
    title: &str,
    figures: &[(&str, &str)],
    rows: &[(String, String)],
) -> Result<PathBuf, ReportError> {
    index_with_links(dir, title, figures, rows, &[])
}

/// [`index`] with `links` (text, relative address) to other reports under it.
pub fn index_with_links(
    dir: &Path,
    title: &str,
    figures: &[(&str, &str)],
    rows: &[(String, String)],
    links: &[(String, String)],
) -> Result<PathBuf, ReportError> {
    let mut h = String::new();
    let _ = write!(
        h,
        "<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>{t}</title>\
         <style>body{{font-family:sans-serif;max-width:960px;margin:2em auto}}\
         td{{padding:2px 12px}}td:first-child{{color:#555}}</style></head><body>\n\
         <h1>{t}</h1>\n<table>\n",
        t = escape(title)
    );
    for (k, v) in rows {
        let _ = writeln!(h, "<tr><td>{}</td><td>{}</td></tr>", escape(k), escape(v));
    }
    h.push_str("</table>\n");
    if !links.is_empty() {
        h.push_str("<ul>\n");
        for (text, href) in links {
            let _ = writeln!(
                h,
                "<li><a href=\"{}\">{}</a></li>",
                escape(href),
                escape(text)
            );
        }
        h.push_str("</ul>\n");
    }
    for (cap, file) in figures {
        let _ = writeln!(
            h,
            "<figure><img src=\"{f}\" alt=\"{c}\" width=\"900\"><figcaption>{c}</figcaption></figure>",
            f = escape(file),
            c = escape(cap)
        );
    }
    h.push_str("</body></html>\n");
    let path = dir.join("index.html");
    std::fs::write(&path, h).map_err(|source| ReportError::Write {
        path: path.clone(),
        source,
    })?;
    Ok(path)
}

/// A migration's report in `dir`: `faults.svg` (from the stats' `latency_log2_us`),
/// `progress.svg` (from `samples`), `heartbeats.svg` ([`beats_from_stats`], when there are
/// any) and
/// `index.html` with the stats' main figures. Returns the `index.html` path.
pub fn migration(
    dir: &Path,
    title: &str,
    stats: &serde_json::Value,
    samples: &[ProgressSample],
) -> Result<PathBuf, ReportError> {
    let beats = beats_from_stats(stats);
    create_dir(dir)?;
    let buckets: Vec<u64> = stats["latency_log2_us"]
        .as_array()
        .map(|a| a.iter().map(|v| v.as_u64().unwrap_or(0)).collect())
        .unwrap_or_default();
    fault_histogram(&dir.join("faults.svg"), &buckets)?;
    progress_timeline(&dir.join("progress.svg"), samples)?;
    let f = |k: &str| stats[k].as_f64().unwrap_or(f64::NAN);
    let rows = vec![
        (
            "mode".to_string(),
            stats["mode"].as_str().unwrap_or("?").to_string(),
        ),
        ("total".into(), format!("{:.1} ms", f("total_ms"))),
        ("downtime".into(), format!("{:.1} ms", f("downtime_ms"))),
        (
            "longest pause the guest saw".into(),
            format!("{:.1} ms", f("max_pause_ms")),
        ),
        ("sent".into(), format!("{:.1} MiB", f("bytes") / 1048576.0)),
        (
            "remote faults".into(),
            format!(
                "{} (p50 {:.1} µs, p99 {:.1} µs)",
                stats["faults_requested"],
                stats["fault_latency_us"]["p50"]
                    .as_f64()
                    .unwrap_or(f64::NAN),
                stats["fault_latency_us"]["p99"]
                    .as_f64()
                    .unwrap_or(f64::NAN)
            ),
        ),
        (
            "vCPU blocktime".into(),
            format!("{:.1} ms", f("blocktime_ms")),
        ),
        (
            "memory digest".into(),
            format!(
                "{} (verified: {})",
                stats["digest"], stats["digest_verified"]
            ),
        ),
    ];
    let mut figures = vec![
        ("Remote page-fault latency (log2 buckets)", "faults.svg"),
        ("Bytes still to send over time, by state", "progress.svg"),
    ];
    if !beats.is_empty() {
        heartbeat_timeline(&dir.join("heartbeats.svg"), &beats)?;
        figures.insert(
            0,
            ("The guest's heartbeats, the pause shaded", "heartbeats.svg"),
        );
    }
    index(dir, title, &figures, &rows)
}

/// Create `dir` (and its parents).
pub fn create_dir(dir: &Path) -> Result<(), ReportError> {
    std::fs::create_dir_all(dir).map_err(|source| ReportError::Write {
        path: dir.to_path_buf(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_migration_plots_render_with_their_labels_and_marks() {
        let dir = tempfile::tempdir().unwrap();
        let h = dir.path().join("faults.svg");
        let mut b = vec![0u64; 32];
        (b[6], b[7], b[8], b[12]) = (40, 120, 30, 2);
        fault_histogram(&h, &b).unwrap();
        let p = dir.path().join("progress.svg");
        let samples: Vec<ProgressSample> = (0..20)
            .map(|i| ProgressSample {
                t_ms: f64::from(i) * 50.0,
                state: if i < 8 { "precopy" } else { "postcopy" }.into(),
                round: (i / 4) as u64,
                remaining_mib: 512.0 - f64::from(i) * 25.0,
                sent_mib: f64::from(i) * 30.0,
                priority_mib: if i < 8 { 0.0 } else { f64::from(i - 8) * 2.0 },
            })
            .collect();
        progress_timeline(&p, &samples).unwrap();
        let hb = dir.path().join("heartbeats.svg");
        let beats: Vec<TimelineBeat> = (0..30)
            .map(|i| TimelineBeat {
                t_ms: f64::from(i) * 100.0 - 1000.0 + if i >= 12 { 40.0 } else { 0.0 },
                destination: i >= 12,
                n: 40 + i as u64,
            })
            .collect();
        assert_eq!(pause_of(&beats), Some((100.0, 240.0)));
        heartbeat_timeline(&hb, &beats).unwrap();
        let bars = dir.path().join("bars.svg");
        grouped_bars(
            &bars,
            "restore modes",
            ("restore mode", "time, ms"),
            &["eager".into(), "lazy".into()],
            &[
                ("first instruction".into(), vec![150.0, 4.0]),
                ("workload".into(), vec![400.0, 1200.0]),
            ],
        )
        .unwrap();
        for (f, labels) in [
            (
                &bars,
                &["restore modes", "time, ms", "eager", "first instruction"][..],
            ),
            (
                &hb,
                &[
                    "heartbeat number",
                    "the guest paused",
                    "140 ms without a beat",
                ][..],
            ),
            (&h, &["fault latency", "faults", "remote page faults"][..]),
            (
                &p,
                &[
                    "sent so far",
                    "time since",
                    "pre-copy round 1",
                    "background push",
                    "priority",
                ][..],
            ),
        ] {
            let svg = std::fs::read_to_string(f).unwrap();
            for l in labels {
                assert!(svg.contains(l), "{}: no {l:?}", f.display());
            }
            let img = svgcheck::render(f).unwrap();
            img.assert_looks_like_a_plot(&f.display().to_string());
        }
        let i = index(
            dir.path(),
            "a <run>",
            &[("faults", "faults.svg")],
            &[("total".into(), "5 ms".into())],
        )
        .unwrap();
        let html = std::fs::read_to_string(i).unwrap();
        assert!(
            html.contains("faults.svg") && html.contains("a &lt;run&gt;") && html.contains("5 ms")
        );
    }
}
