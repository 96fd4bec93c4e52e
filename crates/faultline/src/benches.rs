//! The benchmarks' commands that print lines (uffd, vfio-user, vm, restore): their tables or
//! JSON lines, their progress, and their `--report DIR`.

use crate::CaseArg;
use crate::error::{CliError, CliResult, failed};

pub fn bench_uffd(
    json: bool,
    (faults, runs): (u64, u64),
    threads: Vec<usize>,
    case: Vec<CaseArg>,
    report: Option<&std::path::Path>,
) -> CliResult {
    use bench::uffd_bench::{Case, Params, run};
    if threads.iter().any(|&t| t == 0 || t > 64) {
        return Err(CliError::Usage(
            "--threads: each count must be 1..=64".into(),
        ));
    }
    let p = Params {
        faults_per_thread: faults as usize,
        runs: runs as usize,
        threads,
        cases: if case.is_empty() {
            Case::ALL.to_vec()
        } else {
            case.into_iter().map(Case::from).collect()
        },
    };
    if !json {
        println!(
            "{:<10} {:<10} {:>7} {:>8} {:>11} {:>11} {:>13}",
            "case", "impl", "threads", "pages", "median_ns", "p99_ns", "pages_per_s"
        );
    }
    let mut raw_median = 0;
    let mut progress = crate::progress::Progress::spinner("bench uffd");
    let mut n = 0;
    let mut bars: Vec<Bar> = Vec::new();
    let r = run(&p, |l| {
        n += 1;
        bars.push((
            format!("{} x{}", l.case, l.threads),
            l.imp.to_string(),
            l.median_ns as f64 / 1e3,
            format!(
                "median {} ns, p99 {} ns, {} pages/s",
                l.median_ns, l.p99_ns, l.pages_per_s
            ),
        ));
        progress.update(
            0.0,
            &format!("{n} lines, last {} {} x{}", l.case, l.imp, l.threads),
        );
        if json {
            println!(
                "{}",
                serde_json::to_string(l).expect("plain struct serialises")
            );
        } else {
            let ratio = if l.imp == "raw" {
                raw_median = l.median_ns;
                String::new()
            } else {
                format!(
                    "  ({:.2}x raw)",
                    l.median_ns as f64 / raw_median.max(1) as f64
                )
            };
            println!(
                "{:<10} {:<10} {:>7} {:>8} {:>11} {:>11} {:>13}{ratio}",
                l.case, l.imp, l.threads, l.pages, l.median_ns, l.p99_ns, l.pages_per_s
            );
        }
    });
    progress.finish(&format!("{n} lines"));
    r.map_err(failed("bench uffd"))?;
    match report {
        Some(d) => bars_report(
            d,
            "faultline bench uffd",
            "Fault service time: our fault loop beside the raw-ioctl loop",
            (
                "case x faulting threads",
                "median per fault, µs (log scale)",
            ),
            &bars,
        ),
        None => Ok(()),
    }
}

pub fn bench_vfu(json: bool, quick: bool, report: Option<&std::path::Path>) -> CliResult {
    if !json {
        println!(
            "{:<10} {:<10} {:>10} {:>10} {:>8}",
            "case", "impl", "p50_us", "p99_us", "GB/s"
        );
    }
    let mut progress = crate::progress::Progress::spinner("bench vfio-user");
    let mut n = 0;
    let mut bars: Vec<Bar> = Vec::new();
    let r = bench::vfu_bench::run(quick, |l| {
        n += 1;
        bars.push((
            l.case.to_string(),
            l.r#impl.to_string(),
            l.p50_us,
            format!(
                "p50 {:.2} µs, p99 {:.2} µs, {:.2} GB/s",
                l.p50_us, l.p99_us, l.gbps
            ),
        ));
        progress.update(
            0.0,
            &format!("{n} cases measured, last {} {}", l.case, l.r#impl),
        );
        if json {
            println!(
                "{}",
                serde_json::to_string(l).expect("plain struct serialises")
            );
        } else {
            println!(
                "{:<10} {:<10} {:>10.2} {:>10.2} {:>8.2}",
                l.case, l.r#impl, l.p50_us, l.p99_us, l.gbps
            );
        }
    });
    progress.finish(&format!("{n} cases measured"));
    r.map_err(failed("bench vfio-user"))?;
    match report {
        Some(d) => bars_report(
            d,
            "faultline bench vfio-user",
            "vfio-user: ours beside libvfio-user, rust-vmm's client, memcpy and an eventfd",
            ("case", "p50, µs (log scale)"),
            &bars,
        ),
        None => Ok(()),
    }
}

pub fn bench_virtio(
    json: bool,
    cases: &[String],
    runs: usize,
    irq: vmm::IrqMode,
    iterations: u64,
    report: Option<&std::path::Path>,
) -> CliResult {
    for c in cases {
        if !["rr", "blk", "net"].contains(&c.as_str()) {
            return Err(CliError::Usage(format!(
                "unknown case '{c}' (expected rr, blk, net)"
            )));
        }
    }
    if iterations == 0 || iterations > 10_000_000 {
        return Err(CliError::Usage(
            "--iterations must be in 1..=10000000".into(),
        ));
    }
    let has = |c: &str| cases.iter().any(|x| x == c);
    let mut progress = crate::progress::Progress::spinner("bench virtio");
    let mut lines: Vec<serde_json::Value> = Vec::new();
    let mut bars: Vec<Bar> = Vec::new();
    if has("rr") {
        progress.update(0.0, "rr: legacy and MSI round trips");
        for l in bench::virtio_bench::rr(iterations, runs).map_err(failed("bench virtio: rr"))? {
            bars.push((
                format!("rr, {} handler, device {}", l.handler, l.device),
                l.irq.into(),
                l.per_s,
                format!(
                    "{:.0}/s ({:.0}-{:.0}); {:.2} exits to userspace, {} in the kernel per round trip",
                    l.per_s,
                    l.per_s_range[0],
                    l.per_s_range[1],
                    l.exits_user,
                    l.exits_kernel.map_or("-".into(), |k| format!("{k:.2}"))
                ),
            ));
            lines.push(serde_json::to_value(&l).expect("plain struct serialises"));
        }
    }
    if has("blk") {
        progress.update(
            0.0,
            "blk: 4 KiB random and 1 MiB sequential reads, guest and host",
        );
        let dir = tempfile_dir()?;
        for l in bench::virtio_bench::blk(dir.path(), 20_000, 300, irq, runs)
            .map_err(failed("bench virtio: blk"))?
        {
            bars.push((
                format!("blk {} {}", l.pattern, l.cache),
                format!(
                    "{}{}",
                    l.imp,
                    l.wait.map(|w| format!(" ({w})")).unwrap_or_default()
                ),
                l.iops,
                format!("{:.0} IOPS, {:.1} MB/s", l.iops, l.mb_s),
            ));
            lines.push(serde_json::to_value(&l).expect("plain struct serialises"));
        }
    }
    if has("net") {
        progress.update(0.0, "net: frames into a tap, guest and host");
        for l in bench::virtio_bench::net(40_000, irq, runs).map_err(failed("bench virtio: net"))? {
            bars.push((
                "net".into(),
                l.imp.into(),
                l.frames_per_s,
                format!("{:.3} Gbit/s, {:.0} frames/s", l.gbit_s, l.frames_per_s),
            ));
            lines.push(serde_json::to_value(&l).expect("plain struct serialises"));
        }
    }
    progress.finish("done");
    if let Some(dir) = report {
        bars_report(
            dir,
            "faultline bench virtio",
            "virtio-mmio devices driven by the built-in guest, beside their anchors",
            ("case", "requests (frames) per second, log scale"),
            &bars,
        )?;
    }
    for l in &lines {
        if json {
            println!("{l}");
        } else {
            println!("{}", human_virtio(l));
        }
    }
    if !json {
        for handler in ["cpl0", "cpl3"] {
            let rate = |irq: &str| {
                lines
                    .iter()
                    .find(|l| l["case"] == "rr" && l["irq"] == irq && l["handler"] == handler)
                    .and_then(|l| l["per_s"].as_f64())
            };
            if let (Some(a), Some(b)) = (rate("legacy"), rate("msi")) {
                println!(
                    "rr, {handler} handler: MSI / legacy = {:.2}x (goal 1.3x)",
                    b / a
                );
            }
        }
        for cache in ["page-cache", "direct"] {
            let iops = |imp: &str, wait: Option<&str>| {
                lines
                    .iter()
                    .find(|l| {
                        l["case"] == "blk"
                            && l["pattern"] == "rand-4k-qd1"
                            && l["cache"] == cache
                            && l["impl"] == imp
                            && l["wait"].as_str() == wait
                    })
                    .and_then(|l| l["iops"].as_f64())
            };
            for wait in ["interrupt", "poll"] {
                if let (Some(g), Some(h)) = (iops("faultline", Some(wait)), iops("host", None)) {
                    println!(
                        "blk 4 KiB random QD1, {cache}, {wait}: guest / host = {:.1}% (goal 70%)",
                        100.0 * g / h
                    );
                }
            }
        }
    }
    Ok(())
}

fn tempfile_dir() -> Result<tempfile::TempDir, CliError> {
    tempfile::Builder::new()
        .prefix("faultline-bench-virtio")
        .tempdir()
        .map_err(failed("a temporary directory for the disk image"))
}

fn human_virtio(l: &serde_json::Value) -> String {
    match l["case"].as_str() {
        Some("rr") => format!(
            "rr {:<6} ({} handler, device {:<7}): {:>7.0} round trips/s ({:.0}-{:.0}), {:.2} exits to userspace + {} in the kernel, {:.2} interrupts per round trip",
            l["irq"].as_str().unwrap_or(""),
            l["handler"].as_str().unwrap_or(""),
            l["device"].as_str().unwrap_or(""),
            l["per_s"].as_f64().unwrap_or(0.0),
            l["per_s_range"][0].as_f64().unwrap_or(0.0),
            l["per_s_range"][1].as_f64().unwrap_or(0.0),
            l["exits_user"].as_f64().unwrap_or(0.0),
            l["exits_kernel"]
                .as_f64()
                .map_or("-".into(), |k| format!("{k:.2}")),
            l["irqs"].as_f64().unwrap_or(0.0),
        ),
        Some("blk") => format!(
            "blk {} {:<10} {:<9} {:<6} {:<9}: {:>9.0} IOPS ({:.0}-{:.0}), {:.1} MB/s",
            l["pattern"].as_str().unwrap_or(""),
            l["cache"].as_str().unwrap_or(""),
            l["impl"].as_str().unwrap_or(""),
            l["irq"].as_str().unwrap_or(""),
            l["wait"].as_str().unwrap_or(""),
            l["iops"].as_f64().unwrap_or(0.0),
            l["iops_range"][0].as_f64().unwrap_or(0.0),
            l["iops_range"][1].as_f64().unwrap_or(0.0),
            l["mb_s"].as_f64().unwrap_or(0.0),
        ),
        _ => format!(
            "net {:<9} {:<6}: {:.3} Gbit/s ({:.3}-{:.3}), {:.0} frames/s",
            l["impl"].as_str().unwrap_or(""),
            l["irq"].as_str().unwrap_or(""),
            l["gbit_s"].as_f64().unwrap_or(0.0),
            l["gbit_s_range"][0].as_f64().unwrap_or(0.0),
            l["gbit_s_range"][1].as_f64().unwrap_or(0.0),
            l["frames_per_s"].as_f64().unwrap_or(0.0),
        ),
    }
}

pub fn bench_vm(
    json: bool,
    boots: usize,
    seconds: f64,
    report: Option<&std::path::Path>,
) -> CliResult {
    if !(seconds > 0.0 && seconds <= 600.0) {
        return Err(CliError::Usage("--seconds must be in (0, 600]".into()));
    }
    let mut progress = crate::progress::Progress::spinner("bench vm");
    progress.update(0.0, &format!("{boots} boots of a 1 GiB VM"));
    let b = bench::vm_bench::boot(1024, boots).map_err(failed("bench vm: boot"))?;
    progress.update(
        0.0,
        &format!("dirty rate, guest and native, {seconds} s each"),
    );
    let d = bench::vm_bench::dirty_rate(256, seconds).map_err(failed("bench vm: dirty rate"))?;
    progress.finish("done");
    if let Some(dir) = report {
        bars_report(
            dir,
            "faultline bench vm",
            "The guest's dirtying speed beside the same loop natively",
            ("measurement", "pages written per second (log scale)"),
            &[
                (
                    "dirty rate".to_string(),
                    "guest".to_string(),
                    d.guest_pages_per_s as f64,
                    format!(
                        "{} pages/s; boot to first heartbeat ({} MiB): median {:.2} ms",
                        d.guest_pages_per_s, b.mem_mib, b.median_ms
                    ),
                ),
                (
                    "dirty rate".to_string(),
                    "native".to_string(),
                    d.native_pages_per_s as f64,
                    format!("{} pages/s; ratio {:.3}", d.native_pages_per_s, d.ratio),
                ),
            ],
        )?;
    }
    if json {
        println!(
            "{}",
            serde_json::to_string(&b).expect("plain struct serialises")
        );
        println!(
            "{}",
            serde_json::to_string(&d).expect("plain struct serialises")
        );
    } else {
        println!(
            "boot to first heartbeat ({} MiB): median {:.2} ms (goal 20 ms)",
            b.mem_mib, b.median_ms
        );
        println!(
            "dirty rate: guest {} pages/s, native {} pages/s, ratio {:.3} (goal 0.8)",
            d.guest_pages_per_s, d.native_pages_per_s, d.ratio
        );
    }
    Ok(())
}

/// `bench restore --report DIR`: the times per mode, plotted, and an index.html.
fn restore_report(d: &std::path::Path, lines: &[bench::restore_bench::RestoreLine]) -> CliResult {
    let what = format!("the report in {}", d.display());
    bench::report::create_dir(d).map_err(failed(what.clone()))?;
    let modes: Vec<String> = lines.iter().map(|l| l.mode.to_string()).collect();
    bench::report::grouped_bars(
        &d.join("restore.svg"),
        "snapshot restore: time per mode (median of the runs)",
        ("restore mode", "ms (log scale)"),
        &modes,
        &[
            (
                "first instruction".to_string(),
                lines.iter().map(|l| l.first_instruction_ms).collect(),
            ),
            (
                "the workload, after the restore".to_string(),
                lines.iter().map(|l| l.workload_ms).collect(),
            ),
        ],
    )
    .map_err(failed(what.clone()))?;
    let rows: Vec<(String, String)> = lines
        .iter()
        .map(|l| {
            (
                l.mode.to_string(),
                format!(
                    "first instruction {:.2} ms, workload {:.2} ms, {} faults, {} MiB read",
                    l.first_instruction_ms,
                    l.workload_ms,
                    l.faults,
                    l.bytes_read >> 20
                ),
            )
        })
        .collect();
    let index = bench::report::index(
        d,
        "faultline bench restore",
        &[(
            "Time to the first instruction and of the workload, per mode",
            "restore.svg",
        )],
        &rows,
    )
    .map_err(failed(what))?;
    eprintln!("report: {}", index.display());
    Ok(())
}

pub fn bench_restore(
    json: bool,
    runs: u64,
    (mem_mib, touch_mib, vcpus): (u64, u64, u32),
    dir: Option<std::path::PathBuf>,
    report: Option<&std::path::Path>,
) -> CliResult {
    let tmp;
    let dir = match dir {
        Some(d) => d,
        None => {
            tmp = std::env::temp_dir()
                .join(format!("faultline-bench-restore-{}", std::process::id()));
            tmp.clone()
        }
    };
    let p = bench::restore_bench::Params {
        mem_mib,
        touch_mib,
        vcpus,
        runs: runs as usize,
        dir: dir.clone(),
    };
    let mut warm = None;
    let mut lazy = None;
    let mut prefetch = None;
    let mut progress = crate::progress::Progress::new("bench restore");
    let mut done = 0;
    progress.update(
        0.0,
        "taking the snapshot, then eager, mmap, lazy, prefetch, warm",
    );
    let mut all = Vec::new();
    let r = bench::restore_bench::run(&p, |l| {
        all.push(l.clone());
        done += 1;
        progress.update(
            f64::from(done) * 20.0,
            &format!("{} done ({done}/5)", l.mode),
        );
        match l.mode {
            "warm" => warm = Some(l.workload_ms),
            "lazy" => lazy = Some(l.workload_ms),
            "prefetch" => prefetch = Some(l.workload_ms),
            _ => {}
        }
        if json {
            println!(
                "{}",
                serde_json::to_string(l).expect("plain struct serialises")
            );
        } else {
            println!(
                "{:<9} first instruction {:>8.2} ms  workload {:>9.2} ms  faults {:>8}  read {:>6} MiB",
                l.mode,
                l.first_instruction_ms,
                l.workload_ms,
                l.faults,
                l.bytes_read >> 20
            );
        }
    });
    progress.finish(&format!("{done} modes"));
    let _ = std::fs::remove_dir_all(&dir);
    r.map_err(failed("bench restore"))?;
    if let Some(d) = report {
        restore_report(d, &all)?;
    }
    if !json && let (Some(w), Some(l), Some(p)) = (warm, lazy, prefetch) {
        println!(
            "prefetch/warm {:.2}x (goal <= 1.2), lazy/prefetch {:.2}x (goal >= 3)",
            p / w,
            l / p
        );
    }
    Ok(())
}

/// One measured value of a bench, for its report: (category, series, value, a row's text).
type Bar = (String, String, f64, String);

/// A bench's `--report DIR`: one grouped bar chart (`bench.svg`) of `bars` and an index.html
/// listing every row.
fn bars_report(
    dir: &std::path::Path,
    title: &str,
    caption: &str,
    axes: (&str, &str),
    bars: &[Bar],
) -> CliResult {
    let what = format!("the report in {}", dir.display());
    bench::report::create_dir(dir).map_err(failed(what.clone()))?;
    let mut cats: Vec<String> = Vec::new();
    let mut names: Vec<String> = Vec::new();
    for (c, n, _, _) in bars {
        if !cats.contains(c) {
            cats.push(c.clone());
        }
        if !names.contains(n) {
            names.push(n.clone());
        }
    }
    let series: Vec<(String, Vec<f64>)> = names
        .iter()
        .map(|n| {
            let v = cats
                .iter()
                .map(|c| {
                    bars.iter()
                        .find(|(bc, bn, _, _)| bc == c && bn == n)
                        .map_or(0.0, |b| b.2)
                })
                .collect();
            (n.clone(), v)
        })
        .collect();
    bench::report::grouped_bars(&dir.join("bench.svg"), caption, axes, &cats, &series)
        .map_err(failed(what.clone()))?;
    let rows: Vec<(String, String)> = bars
        .iter()
        .map(|(c, n, _, text)| (format!("{c} {n}"), text.clone()))
        .collect();
    let index =
        bench::report::index(dir, title, &[(caption, "bench.svg")], &rows).map_err(failed(what))?;
    eprintln!("report: {}", index.display());
    Ok(())
}
