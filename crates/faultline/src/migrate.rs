//! `faultline migrate`, `faultline demo` (a post-copy live migration) and `faultline bench
//! migrate`.

use std::time::Duration;

use serde_json::{Value, json};
use vmm::migration::{Endpoint, MigrationMode};

use crate::error::{CliError, CliResult, failed};
use crate::progress::Progress;

/// `faultline migrate` options.
#[derive(clap::Args)]
pub struct Args {
    /// The source VM's API socket.
    #[arg(long)]
    api_sock: std::path::PathBuf,
    /// The destination (`faultline run --incoming ...`): tcp:HOST:PORT or unix:PATH.
    #[arg(long, required_unless_present_any = ["resume", "reclaim"])]
    to: Option<Endpoint>,
    /// precopy, postcopy or hybrid.
    #[arg(long, default_value = "postcopy")]
    mode: MigrationMode,
    /// Cap on the migration's bandwidth: bytes per second (K/M/G suffixes) or bits with
    /// `gbit`/`mbit` (e.g. 1gbit); 0: unlimited.
    #[arg(long, default_value = "0", value_parser = parse_rate)]
    max_bandwidth: u64,
    /// Pre-copy switches over when the rest fits this, ms.
    #[arg(long, default_value_t = 300)]
    downtime_limit_ms: u64,
    /// Pre-copy gives up after this, ms (the guest runs on at the source).
    #[arg(long, default_value_t = 20_000)]
    deadline_ms: u64,
    /// Reconnect a post-copy migration whose link was lost (optionally to a new --to).
    #[arg(long)]
    resume: bool,
    /// After a migration that failed with the guest in doubt (`in_doubt` in its status: the
    /// destination got the guest's state and may run it): the operator knows the
    /// destination does not run it; run it here again (`PUT /migrate/reclaim`).
    #[arg(long, conflicts_with_all = ["resume", "to"])]
    reclaim: bool,
    /// Print only the final status as JSON (no progress line).
    #[arg(long)]
    json: bool,
    /// Also write a report into this directory: plots (fault latency, progress over time)
    /// and an index.html with the figures.
    #[arg(long)]
    report: Option<std::path::PathBuf>,
    /// Whom we migrate to.
    #[command(flatten)]
    security: crate::tls::TlsArgs,
}

/// The source's status over time, for a report.
#[derive(Default)]
struct Samples(
    Vec<bench::report::ProgressSample>,
    Option<std::time::Instant>,
);

impl Samples {
    fn push(&mut self, v: &Value) {
        let t0 = *self.1.get_or_insert_with(std::time::Instant::now);
        self.0.push(bench::report::ProgressSample::from_status(
            t0.elapsed().as_secs_f64() * 1e3,
            v,
        ));
    }
}

/// Write a migration's report into `dir` and say where.
fn report(
    dir: &std::path::Path,
    title: &str,
    stats: &Value,
    samples: &[bench::report::ProgressSample],
) -> CliResult {
    let index = bench::report::migration(dir, title, stats, samples)
        .map_err(failed(format!("writing the report into {}", dir.display())))?;
    eprintln!("report: {}", index.display());
    Ok(())
}

/// `1gbit`, `10Gbit`, `125M` (bytes/s), `0`.
pub fn parse_rate(s: &str) -> Result<u64, String> {
    let l = s.to_ascii_lowercase();
    for (suffix, mul) in [("gbit", 1e9 / 8.0), ("mbit", 1e6 / 8.0)] {
        if let Some(n) = l.strip_suffix(suffix) {
            return n
                .parse::<f64>()
                .map(|v| (v * mul) as u64)
                .map_err(|_| format!("'{s}' is not a rate (examples: 1gbit, 125M, 0)"));
        }
    }
    crate::run::parse_size(s)
}

fn status_line(v: &Value) -> String {
    format!(
        "{:<16} round {:>2}  {:>5.1}%  {:>8.1} MB/s  {:>8.1} MiB left",
        v["state"].as_str().unwrap_or("?"),
        v["round"].as_u64().unwrap_or(0),
        v["percent"].as_f64().unwrap_or(0.0),
        v["rate_mbps"].as_f64().unwrap_or(0.0),
        v["remaining_bytes"].as_f64().unwrap_or(0.0) / 1048576.0
    )
}

pub fn migrate(a: &Args) -> CliResult {
    if a.reclaim {
        let (code, b) = crate::snap::http_unix(
            &a.api_sock,
            "PUT",
            "/migrate/reclaim",
            "",
            Duration::from_secs(30),
        )?;
        if code != 204 {
            return Err(CliError::Check(format!(
                "PUT /migrate/reclaim refused ({code}): {b}"
            )));
        }
        eprintln!("faultline migrate: reclaimed; the guest runs here again");
        return Ok(());
    }
    if let Some(to) = &a.to {
        a.security.check(to)?;
    }
    let body = json!({
        "tls": a.security.credentials(),
        "insecure": a.security.insecure,
        "to": a.to,
        "mode": a.mode,
        "max_bandwidth": a.max_bandwidth,
        "downtime_limit_ms": a.downtime_limit_ms,
        "deadline_ms": a.deadline_ms,
        "resume": a.resume,
    });
    let (code, b) = crate::snap::http_unix(
        &a.api_sock,
        "PUT",
        "/migrate",
        &body.to_string(),
        Duration::from_secs(30),
    )?;
    if code != 202 {
        return Err(CliError::Check(format!(
            "PUT /migrate refused ({code}): {b}"
        )));
    }
    let mut progress = (!a.json).then(|| Progress::new("migration"));
    let mut samples = Samples::default();
    loop {
        std::thread::sleep(Duration::from_millis(200));
        let (_, b) =
            crate::snap::http_unix(&a.api_sock, "GET", "/migrate", "", Duration::from_secs(30))?;
        let v: Value = serde_json::from_str(&b).map_err(failed(format!("GET /migrate: {b}")))?;
        samples.push(&v);
        let state = v["state"].as_str().unwrap_or("");
        let end = matches!(
            state,
            "completed" | "cancelled" | "failed" | "postcopy-paused"
        );
        if let Some(p) = &mut progress {
            let pct = v["percent"].as_f64().unwrap_or(0.0);
            if end {
                p.finish(&status_line(&v));
            } else {
                p.update(pct, &status_line(&v));
            }
        }
        match state {
            "completed" => {
                println!("{}", v["stats"]);
                if let Some(d) = &a.report {
                    report(d, "faultline migrate", &v["stats"], &samples.0)?;
                }
                return Ok(());
            }
            "cancelled" | "failed" | "postcopy-paused" => {
                if a.json {
                    println!("{v}");
                }
                return Err(CliError::Check(format!(
                    "migration {}: {}",
                    v["state"].as_str().unwrap_or(""),
                    v["error"].as_str().unwrap_or("")
                )));
            }
            _ => {}
        }
    }
}

/// `faultline demo` options.
#[derive(clap::Args)]
pub struct DemoArgs {
    /// Guest memory, MiB.
    #[arg(long, default_value_t = 1024)]
    mem_mib: u64,
    /// Memory the `dirty` workload rewrites, MiB.
    #[arg(long, default_value_t = 512)]
    hot_mib: u64,
    /// vCPUs.
    #[arg(long, default_value_t = 1)]
    vcpus: u32,
    /// precopy, postcopy or hybrid.
    #[arg(long, default_value = "postcopy")]
    mode: String,
    /// The guest's workload: dirty, read or random.
    #[arg(long, default_value = "dirty")]
    guest: String,
    /// Cap on the migration's bandwidth (as `faultline migrate --max-bandwidth`).
    #[arg(long, default_value = "0", value_parser = parse_rate)]
    max_bandwidth: u64,
    /// Print the final statistics as one JSON object.
    #[arg(long)]
    json: bool,
    /// Also write a report into this directory: plots (fault latency, progress over time)
    /// and an index.html with the figures.
    #[arg(long)]
    report: Option<std::path::PathBuf>,
    /// Plain TCP instead of TLS with a fresh pre-shared key.
    #[arg(long)]
    insecure: bool,
}

pub fn demo(a: &DemoArgs) -> CliResult {
    let exe = std::env::current_exe().map_err(failed("cannot find this program"))?;
    let dir = bench::migrate_bench::scratch().map_err(failed("scratch directory"))?;
    let shape = bench::migrate_bench::Shape {
        mem_mib: a.mem_mib,
        hot_mib: a.hot_mib,
        vcpus: a.vcpus,
        workload: a.guest.clone(),
        mode: a.mode.clone(),
        bandwidth: a.max_bandwidth,
        downtime_limit_ms: 300,
        deadline_ms: 20_000,
        after_ms: 500,
        tls: !a.insecure,
        breakdown: false,
    };
    if !a.json {
        println!(
            "faultline demo: a {} MiB microVM ({} vCPU, built-in guest `{}` over {} MiB) live-migrated with {} over TCP loopback ({}) to a second faultline process",
            a.mem_mib,
            a.vcpus,
            a.guest,
            a.hot_mib,
            a.mode,
            if a.insecure {
                "plain, --insecure"
            } else {
                "TLS 1.3, a fresh pre-shared key"
            }
        );
    }
    let mut progress = (!a.json).then(|| Progress::new("migration"));
    let mut samples = Samples::default();
    let out = bench::migrate_bench::run_one(&exe, &dir, &shape, |v| {
        samples.push(v);
        if let Some(p) = &mut progress {
            p.update(v["percent"].as_f64().unwrap_or(0.0), &status_line(v));
        }
    })
    .map_err(failed("the migration"));
    let _ = std::fs::remove_dir_all(&dir);
    let out = out?;
    if let Some(p) = &mut progress {
        p.finish(&status_line(&out.status));
    }
    let st = &out.status;
    if st["state"] != "completed" {
        return Err(CliError::Check(format!(
            "migration {}: {}",
            st["state"].as_str().unwrap_or("?"),
            st["error"].as_str().unwrap_or("")
        )));
    }
    let s = &st["stats"];
    let d = &s["destination"];
    if s["digest_verified"] != true {
        return Err(CliError::Check(format!("memory digest mismatch: {s}")));
    }
    if let Some(dir) = &a.report {
        report(dir, "faultline demo", s, &samples.0)?;
    }
    let dest_ok = out
        .dest_summary
        .as_ref()
        .map(|v| &v["summary"])
        .filter(|v| v["stopped"] == true);
    if a.json {
        println!(
            "{}",
            json!({ "migration": s, "destination_summary": out.dest_summary })
        );
        return Ok(());
    }
    let f = |v: &Value| v.as_f64().unwrap_or(f64::NAN);
    println!(
        "  total        {:>9.1} ms   (setup {:.1} ms)",
        f(&s["total_ms"]),
        f(&s["setup_ms"])
    );
    println!(
        "  downtime     {:>9.1} ms   (pause at the source -> vCPUs running at the destination)",
        f(&s["downtime_ms"])
    );
    println!(
        "  max pause    {:>9.1} ms   (longest heartbeat gap the guest saw, minus its 100 ms interval)",
        f(&s["max_pause_ms"])
    );
    println!(
        "  sent         {:>9.1} MiB  ({} pages, {} zero pages as counts, {} post-copy)",
        f(&s["bytes"]) / 1048576.0,
        s["pages"],
        s["zero_pages"],
        s["postcopy_pages"]
    );
    println!(
        "  faults       {:>9}      remote, latency p50 {:.1} us, p99 {:.1} us, max {:.1} us; {} answered locally as zero",
        s["faults_requested"],
        f(&s["fault_latency_us"]["p50"]),
        f(&s["fault_latency_us"]["p99"]),
        f(&s["fault_latency_us"]["max"]),
        d["zero_faults_local"]
    );
    println!(
        "  blocktime    {:>9.1} ms   (vCPU time waiting for pages)",
        f(&s["blocktime_ms"])
    );
    println!(
        "  integrity    memory digest {} equal on both sides at switchover",
        s["digest"].as_str().unwrap_or("?")
    );
    println!(
        "  heartbeats   the guest went on at the destination with beat {} (each vCPU)",
        d["first_heartbeats"]
    );
    match dest_ok {
        Some(v) => println!(
            "  destination  ran {} ms more, then stopped through its API",
            v["wall_ms"]
        ),
        None => println!("  destination  (no summary)"),
    }
    Ok(())
}

/// `faultline bench migrate`.
#[allow(clippy::too_many_arguments)]
pub fn bench(
    json: bool,
    runs: usize,
    workloads: &[String],
    links: &[String],
    modes: &[String],
    security: &[String],
    (mem_mib, hot_mib): (u64, u64),
    report: Option<&std::path::Path>,
    (breakdown, local): (bool, bool),
) -> CliResult {
    let mut tls = Vec::new();
    for s in security {
        match s.as_str() {
            "plain" => tls.push(false),
            "tls" => tls.push(true),
            _ => {
                return Err(CliError::Usage(format!(
                    "--security {s}: expected plain or tls"
                )));
            }
        }
    }
    if let Some(l) = links
        .iter()
        .find(|l| !bench::migrate_bench::LINKS.iter().any(|(k, _)| k == l))
    {
        return Err(CliError::Usage(format!(
            "--links {l}: expected unlimited, 10g, 1g or 200m"
        )));
    }
    let exe = std::env::current_exe().map_err(failed("cannot find this program"))?;
    let dir = bench::migrate_bench::scratch().map_err(failed("scratch directory"))?;
    let n_links = bench::migrate_bench::LINKS
        .iter()
        .filter(|(l, _)| links.iter().any(|x| x == l))
        .count();
    let cells = (workloads.len() * n_links * modes.len() * tls.len()).max(1);
    let mut done = 0usize;
    if let Some(r) = report {
        bench::report::create_dir(r).map_err(failed("the report directory"))?;
    }
    let mut progress = Progress::new("bench migrate");
    // The local fault a remote one is compared with, measured first, in this invocation.
    let remote = modes.iter().any(|m| m != "precopy");
    let local_p50 = if local && remote {
        progress.update(
            0.0,
            "local fault: a lazy restore from memory of the same guest",
        );
        let lf = bench::local_fault::measure(mem_mib, hot_mib, std::time::Duration::from_secs(3))
            .map_err(failed("bench migrate"))?;
        if json {
            println!("{}", serde_json::to_string(&lf).map_err(failed("JSON"))?);
        } else {
            println!(
                "local fault (lazy restore from memory, same guest): {} faults, p50 {:.1} us, p99 {:.1} us",
                lf.faults, lf.fault_p50_us, lf.fault_p99_us
            );
        }
        Some(lf.fault_p50_us)
    } else {
        None
    };
    let mut cell_links = Vec::new();
    for w in workloads {
        for (link, bw) in bench::migrate_bench::LINKS {
            if !links.iter().any(|l| l == link) {
                continue;
            }
            for m in modes {
                let mut totals = Vec::new();
                for &tls in &tls {
                    let shape = bench::migrate_bench::Shape {
                        mem_mib,
                        hot_mib,
                        vcpus: 1,
                        workload: w.clone(),
                        mode: m.clone(),
                        bandwidth: bw,
                        downtime_limit_ms: 300,
                        deadline_ms: 20_000,
                        after_ms: 0,
                        tls,
                        breakdown,
                    };
                    progress.update(
                        done as f64 * 100.0 / cells as f64,
                        &format!(
                            "cell {}/{cells}: {w} {link} {m} {}",
                            done + 1,
                            if tls { "tls" } else { "plain" }
                        ),
                    );
                    let name = format!("{w}-{link}-{m}-{}", if tls { "tls" } else { "plain" });
                    let cell_report = report.map(|r| r.join(&name));
                    let line = bench::migrate_bench::cell(
                        &exe,
                        &dir,
                        &shape,
                        link,
                        runs,
                        cell_report.as_deref(),
                    )
                    .map_err(failed("bench migrate"))?;
                    let mut line = line;
                    if let Some(l) = local_p50
                        && m != "precopy"
                        && line.fault_p50_us > 0.0
                    {
                        line.local_fault_p50_us = Some(l);
                        line.remote_to_local_p50 = Some(line.fault_p50_us / l);
                    }
                    if cell_report
                        .as_ref()
                        .is_some_and(|d| d.join("index.html").exists())
                    {
                        cell_links.push((
                            format!(
                                "{name}: total {:.1} ms, downtime {:.1} ms, fault p50 {:.1} µs",
                                line.total_ms, line.downtime_ms, line.fault_p50_us
                            ),
                            format!("{name}/index.html"),
                        ));
                    }
                    done += 1;
                    totals.push((line.security, line.total_ms, line.bytes));
                    print_line(&line, json)?;
                    if w == "devices" || w == "vfio-user" {
                        // The same VM without devices: a `read` guest of the same size whose
                        // working set (1 MiB) is as small as the soak guest's.
                        let without = bench::migrate_bench::Shape {
                            workload: "read".into(),
                            hot_mib: 1,
                            ..shape.clone()
                        };
                        let base =
                            bench::migrate_bench::cell(&exe, &dir, &without, link, runs, None)
                                .map_err(failed("bench migrate"))?;
                        print_line(&base, json)?;
                        print_devices_cost(w, &line, &base, json);
                    }
                }
                if let [("plain", plain, _), ("tls-psk", secure, bytes)] = totals[..] {
                    // The crypto alone of the bytes the TLS runs moved, measured now: what TLS
                    // must add when the migration's threads share one core.
                    let crypto = xfer::tls::crypto_cost(bytes).as_secs_f64() * 1e3;
                    let v = json!({
                        "bench": "migrate",
                        "case": "tls-cost",
                        "workload": w,
                        "link": link,
                        "mode": m,
                        "plain_total_ms": plain,
                        "tls_total_ms": secure,
                        "tls_over_plain": secure / plain,
                        "crypto_ms": crypto,
                        "crypto_over_plain": crypto / plain,
                    });
                    if json {
                        println!("{v}");
                    } else {
                        println!(
                            "{w:<6} {link:<9} {m:<8} TLS costs {:+.1}% total time ({secure:.1} ms vs {plain:.1} ms plain; goal <= +15%); AES-GCM alone, sealing and opening those {:.1} MiB on one core: {crypto:.1} ms ({:+.1}%)",
                            (secure / plain - 1.0) * 100.0,
                            bytes as f64 / 1048576.0,
                            crypto / plain * 100.0
                        );
                    }
                }
            }
        }
    }
    progress.finish(&format!("{done} cells"));
    if let Some(r) = report {
        let index = bench::report::index_with_links(
            r,
            "faultline bench migrate",
            &[],
            &[("runs per cell".to_string(), runs.to_string())],
            &cell_links,
        )
        .map_err(failed(format!("the report in {}", r.display())))?;
        eprintln!("report: {}", index.display());
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

/// One cell's line: JSON, or a line of text.
fn print_line(line: &bench::migrate_bench::MigrateLine, json: bool) -> CliResult {
    print_cell(line, json)?;
    // Pre-copy takes no remote fault: nothing to break down.
    if let Some(b) = line.breakdown.as_ref().filter(|_| line.mode != "precopy") {
        if json {
            let mut v = json!({
                "bench": "migrate",
                "case": "breakdown",
                "workload": line.workload,
                "link": line.link,
                "mode": line.mode,
                "security": line.security,
            });
            if let (Some(o), Ok(serde_json::Value::Object(h))) =
                (v.as_object_mut(), serde_json::to_value(b))
            {
                o.extend(h);
            }
            println!("{v}");
        } else {
            println!(
                "  hops (medians of {} faults): request sent {:.1} us, source read {:.1}, responder {:.1}, page sent {:.1}, page received {:.1}, installed {:.1}; total {:.1} us",
                b.samples,
                b.request_sent_us,
                b.source_read_us,
                b.responder_us,
                b.page_sent_us,
                b.page_received_us,
                b.installed_us,
                b.total_us
            );
        }
    }
    Ok(())
}

fn print_cell(line: &bench::migrate_bench::MigrateLine, json: bool) -> CliResult {
    if json {
        println!("{}", serde_json::to_string(&line).map_err(failed("JSON"))?);
    } else {
        println!(
            "{:<6} {:<9} {:<8} {:<7} converged {:<4} total {:>8.1} ms  downtime {:>7.1} ms  max pause {:>7.1} ms  blocktime {:>7.1} ms  {:>7.1} MiB  fault p50 {:>6.1} us p99 {:>7.1} us",
            line.workload,
            line.link,
            line.mode,
            line.security,
            line.converged_runs,
            line.total_ms,
            line.downtime_ms,
            line.max_pause_ms,
            line.blocktime_ms,
            line.bytes as f64 / 1048576.0,
            line.fault_p50_us,
            line.fault_p99_us
        );
        if let Some(r) = line.remote_to_local_p50 {
            println!(
                "  remote fault p50 = {r:.2} x the local fault's; {:.0} remote faults, non-vCPU {:.0}",
                line.faults_requested, line.non_vcpu_faults
            );
        }
    }
    Ok(())
}

/// What the devices add: the `devices` cell beside the same VM without them (a `read`
/// guest of the same size with a 1 MiB working set), measured in the same invocation. Goal: at most 5 ms more
/// downtime.
fn print_devices_cost(
    devices: &str,
    d: &bench::migrate_bench::MigrateLine,
    base: &bench::migrate_bench::MigrateLine,
    json: bool,
) {
    let extra = d.downtime_ms - base.downtime_ms;
    let v = json!({
        "bench": "migrate",
        "case": "devices-cost",
        "devices": if devices == "vfio-user" { "vfio-user" } else { "virtio" },
        "link": d.link,
        "mode": d.mode,
        "security": d.security,
        "downtime_ms": d.downtime_ms,
        "downtime_ms_without": base.downtime_ms,
        "extra_downtime_ms": extra,
        "max_pause_ms": d.max_pause_ms,
        "max_pause_ms_without": base.max_pause_ms,
        "goal_extra_downtime_ms": 5.0,
        "goal_met": extra <= 5.0,
    });
    if json {
        println!("{v}");
    } else {
        println!(
            "{devices} {:<9} {:<8} downtime {:.1} ms with every device, {:.1} ms without: {:+.1} ms (goal <= +5 ms); max pause {:.1} vs {:.1} ms",
            d.link,
            d.mode,
            d.downtime_ms,
            base.downtime_ms,
            extra,
            d.max_pause_ms,
            base.max_pause_ms
        );
    }
}
