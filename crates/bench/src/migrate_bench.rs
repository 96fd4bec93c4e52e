//! `faultline bench migrate` (and `faultline demo`): live-migrate a microVM between two
//! `faultline run` processes over TCP loopback, as a user would, and report what both sides
//! measured.
//!
//! The shapes are the QEMU anchor's (`../shared/anchors/qemu-postcopy`): a 1 GiB guest whose
//! workload uses 512 MiB (`dirty`: rewrites one word in every page in a loop; `read`: every
//! 100 ms reads one page in 64), links `unlimited`, `10g` (1.25 GB/s) and `1g` (125 MB/s) as a
//! cap on the migration's own bandwidth (QEMU's `max-bandwidth`), modes precopy, postcopy and
//! hybrid, pre-copy given up after 20 s, downtime limit 300 ms.
//!
//! The `devices` workload is the built-in guest's `virtio` soak job with one device of each
//! kind: its disk (a 64 MiB image both ends share, as shared storage) kept busy, each
//! request waited for through its interrupt; a net device on a tap per end (created here,
//! which needs root), a vsock device, an entropy device. Its figures go beside a `read`
//! VM's of the same size with a 1 MiB working set (the soak guest's is smaller), measured
//! in the same invocation: what the devices add.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::{Value, json};

use crate::BenchError;

/// One migration to run.
#[derive(Debug, Clone)]
pub struct Shape {
    /// Guest memory, MiB.
    pub mem_mib: u64,
    /// Memory the workload uses, MiB.
    pub hot_mib: u64,
    /// vCPUs.
    pub vcpus: u32,
    /// `dirty`, `read`, `random`.
    pub workload: String,
    /// `precopy`, `postcopy`, `hybrid`.
    pub mode: String,
    /// Bytes per second; 0: unlimited.
    pub bandwidth: u64,
    /// Pre-copy downtime limit, ms.
    pub downtime_limit_ms: u64,
    /// Pre-copy deadline, ms.
    pub deadline_ms: u64,
    /// Keep the destination running this long after the migration (to show it goes on).
    pub after_ms: u64,
    /// TLS with a pre-shared key (a fresh key per run); otherwise plain TCP (`--insecure`).
    pub tls: bool,
    /// Stamp each remote fault's hops at both ends (`FAULTLINE_BREAKDOWN=1`, `xfer::hops`).
    pub breakdown: bool,
}

impl Shape {
    /// `"tls-psk"` or `"plain"`.
    pub fn security(&self) -> &'static str {
        if self.tls { "tls-psk" } else { "plain" }
    }
}

/// Write a fresh 32-byte pre-shared key (mode 0600) at `path`.
pub fn write_psk(path: &Path) -> Result<(), BenchError> {
    use std::io::{Read, Write};
    use std::os::unix::fs::OpenOptionsExt;
    let err = |e: std::io::Error| BenchError::Run(format!("{}: {e}", path.display()));
    let mut key = [0u8; 32];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut key))
        .map_err(err)?;
    let _ = std::fs::remove_file(path);
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .and_then(|mut f| f.write_all(&key))
        .map_err(err)
}

/// The anchor's link names and their caps in bytes per second (`200m`: a capped link where
/// the background stream is always paced, to show fault answers are not).
pub const LINKS: [(&str, u64); 4] = [
    ("unlimited", 0),
    ("10g", 1_250_000_000),
    ("1g", 125_000_000),
    ("200m", 25_000_000),
];

/// A child `faultline` that is killed if dropped.
struct Proc(Child, &'static str);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn api(sock: &Path, method: &str, path: &str, body: &str) -> Result<(u16, Value), BenchError> {
    let (code, b) = vmm::api::call(sock, method, path, body, Duration::from_secs(30))
        .map_err(|e| BenchError::Run(uffd::error_chain(&e)))?;
    Ok((code, serde_json::from_str(&b).unwrap_or(Value::Null)))
}

fn wait_sock(p: &Path, child: &mut Proc) -> Result<(), BenchError> {
    let t = Instant::now();
    while !p.exists() {
        if let Ok(Some(st)) = child.0.try_wait() {
            return Err(BenchError::Run(format!(
                "the {} process exited early ({st})",
                child.1
            )));
        }
        if t.elapsed() > Duration::from_secs(30) {
            return Err(BenchError::Run(format!("{} did not start", child.1)));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(())
}

fn free_port() -> Result<u16, BenchError> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")
        .map_err(|e| BenchError::Run(format!("no free port: {e}")))?;
    Ok(l.local_addr()
        .map_err(|e| BenchError::Run(e.to_string()))?
        .port())
}

/// Collect the `{"event":"summary"}` line of a child's `--json-events` output.
/// Read a `faultline run --json-events` stream to its end: its summary line.
fn summary_reader(
    out: Option<std::process::ChildStdout>,
) -> std::thread::JoinHandle<Option<Value>> {
    std::thread::spawn(move || {
        use std::io::BufRead;
        let mut summary = None;
        if let Some(o) = out {
            for line in std::io::BufReader::new(o).lines().map_while(Result::ok) {
                if let Ok(v) = serde_json::from_str::<Value>(&line)
                    && v["event"] == "summary"
                {
                    summary = Some(v);
                }
            }
        }
        summary
    })
}

/// What [`run_one`] observed.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// The source's final `GET /migrate` (state, error, stats).
    pub status: Value,
    /// The destination's summary line (`faultline run --json-events`), when it ran.
    pub dest_summary: Option<Value>,
}

/// Migrate once. `progress` receives the source's status about every 200 ms.
pub fn run_one(
    exe: &Path,
    dir: &Path,
    s: &Shape,
    mut progress: impl FnMut(&Value),
) -> Result<Outcome, BenchError> {
    let src_sock = dir.join("src.sock");
    let dst_sock = dir.join("dst.sock");
    for p in [&src_sock, &dst_sock] {
        let _ = std::fs::remove_file(p);
    }
    let port = free_port()?;
    let mem = format!("{}M", s.mem_mib);
    let hot = format!("{}M", s.hot_mib);
    let vcpus = s.vcpus.to_string();
    let spawn = |args: &[&str], name: &'static str, out: Stdio| -> Result<Proc, BenchError> {
        Command::new(exe)
            .args(args)
            .env("FAULTLINE_BREAKDOWN", if s.breakdown { "1" } else { "0" })
            .stdout(out)
            .stderr(Stdio::inherit())
            .spawn()
            .map(|c| Proc(c, name))
            .map_err(|e| BenchError::Run(format!("cannot start {}: {e}", exe.display())))
    };
    let devices = match s.workload.as_str() {
        "devices" => Some(Devices::virtio(dir)?),
        "vfio-user" => Some(Devices::vfio_user(exe, dir)?),
        _ => None,
    };
    let guest: Vec<&str> = match s.workload.as_str() {
        "devices" => vec!["--guest", "virtio", "--virtio-job", "soak"],
        "vfio-user" => vec!["--guest", "devices-soak"],
        w => vec!["--guest", w],
    };
    let mut src_args = vec![
        "run",
        "--mem",
        &mem,
        "--vcpus",
        &vcpus,
        "--workload-mem",
        &hot,
        "--api-sock",
        src_sock.to_str().unwrap_or_default(),
        "--seconds",
        "600",
        "--json-events",
    ];
    src_args.extend(&guest);
    let src_devs = devices.as_ref().map(|d| d.args(0)).unwrap_or_default();
    src_args.extend(src_devs.iter().map(String::as_str));
    let mut src = spawn(&src_args, "source", Stdio::piped())?;
    let src_reader = summary_reader(src.0.stdout.take());
    let incoming = format!("tcp:127.0.0.1:{port}");
    let psk = dir.join("psk");
    let psk_s = psk.to_str().unwrap_or_default();
    let security: Vec<&str> = if s.tls {
        write_psk(&psk)?;
        vec!["--tls-psk", psk_s]
    } else {
        vec!["--insecure"]
    };
    let mut dst_args = vec![
        "run",
        "--incoming",
        &incoming,
        "--api-sock",
        dst_sock.to_str().unwrap_or_default(),
        "--json-events",
    ];
    dst_args.extend(&security);
    let dst_devs = devices.as_ref().map(|d| d.args(1)).unwrap_or_default();
    dst_args.extend(dst_devs.iter().map(String::as_str));
    let mut dst = spawn(&dst_args, "destination", Stdio::piped())?;
    let reader = summary_reader(dst.0.stdout.take());
    wait_sock(&src_sock, &mut src)?;
    // Wait until every vCPU has filled its memory and beats.
    let t = Instant::now();
    loop {
        let (_, st) = api(&src_sock, "GET", "/vm/stats", "")?;
        let ready = st["vcpus"].as_array().is_some_and(|v| {
            !v.is_empty() && v.iter().all(|c| c["heartbeats"].as_u64() >= Some(3))
        });
        if ready {
            break;
        }
        if t.elapsed() > Duration::from_secs(60) {
            return Err(BenchError::Run(
                "the source guest did not start beating".into(),
            ));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut body = json!({
        "to": incoming,
        "mode": s.mode,
        "max_bandwidth": s.bandwidth,
        "downtime_limit_ms": s.downtime_limit_ms,
        "deadline_ms": s.deadline_ms,
    });
    if s.tls {
        body["tls"] = json!({"psk": {"key_file": psk}});
    } else {
        body["insecure"] = json!(true);
    }
    let (code, v) = api(&src_sock, "PUT", "/migrate", &body.to_string())?;
    if code != 202 {
        return Err(BenchError::Run(format!("PUT /migrate: {code} {v}")));
    }
    let status = loop {
        std::thread::sleep(Duration::from_millis(200));
        let v = match api(&src_sock, "GET", "/migrate", "") {
            Ok((_, v)) => v,
            // The source exits once its migration is complete: its summary has the status.
            Err(_) if matches!(src.0.try_wait(), Ok(Some(_))) || !src_sock.exists() => {
                let _ = src.0.wait();
                let sum = src_reader.join().ok().flatten();
                break sum
                    .map(|s| s["summary"]["migration"].clone())
                    .filter(|m| !m.is_null())
                    .ok_or_else(|| {
                        BenchError::Run("the source exited without a migration summary".into())
                    })?;
            }
            Err(e) => return Err(e),
        };
        progress(&v);
        let st = v["state"].as_str().unwrap_or("");
        if matches!(st, "completed" | "failed" | "cancelled" | "postcopy-paused") {
            break v;
        }
    };
    if status["state"] == "completed" {
        std::thread::sleep(Duration::from_millis(s.after_ms));
        let _ = wait_sock(&dst_sock, &mut dst);
        let _ = api(&dst_sock, "PUT", "/vm/stop", "");
    } else {
        let _ = api(&src_sock, "PUT", "/vm/stop", "");
    }
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(10) {
        if matches!(dst.0.try_wait(), Ok(Some(_))) {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    drop(dst);
    let dest_summary = reader.join().ok().flatten();
    drop(src);
    Ok(Outcome {
        status,
        dest_summary,
    })
}

/// The `devices` workload's backends: a disk image both ends share, a tap and a vsock
/// socket per end; the taps are deleted on drop. The `vfio-user` workload's: a GPIO card and
/// a DMA engine served by `faultline device serve` for each end.
struct Devices {
    disk: PathBuf,
    taps: [String; 2],
    vsock: [PathBuf; 2],
    /// vfio-user: each end's servers (GPIO, DMA engine sockets), killed on drop.
    servers: Vec<(Proc, [PathBuf; 2])>,
}

impl Devices {
    fn vfio_user(exe: &Path, dir: &Path) -> Result<Devices, BenchError> {
        let mut d = Devices {
            disk: PathBuf::new(),
            taps: [String::new(), String::new()],
            vsock: [PathBuf::new(), PathBuf::new()],
            servers: Vec::new(),
        };
        for end in ["src", "dst"] {
            let g = dir.join(format!("gpio-{end}.sock"));
            let dma = dir.join(format!("dma-{end}.sock"));
            for p in [&g, &dma] {
                let _ = std::fs::remove_file(p);
            }
            let c = Command::new(exe)
                .args(["device", "serve", "gpio", "--socket"])
                .arg(&g)
                .arg("--also")
                .arg(format!("dma:{}", dma.display()))
                .stderr(Stdio::null())
                .spawn()
                .map_err(|e| BenchError::Run(format!("faultline device serve: {e}")))?;
            let mut p = Proc(c, "device server");
            wait_sock(&dma, &mut p)?;
            d.servers.push((p, [g, dma]));
        }
        Ok(d)
    }

    fn virtio(dir: &Path) -> Result<Devices, BenchError> {
        let disk = dir.join("devices-disk.img");
        std::fs::File::create(&disk)
            .and_then(|f| f.set_len(64 << 20))
            .map_err(|e| BenchError::Run(format!("{}: {e}", disk.display())))?;
        let id = std::process::id() % 10_000;
        let taps = [format!("flbs{id}"), format!("flbd{id}")];
        let mut d = Devices {
            disk,
            taps: [String::new(), String::new()],
            vsock: [dir.join("vs.sock"), dir.join("vd.sock")],
            servers: Vec::new(),
        };
        for (i, t) in taps.iter().enumerate() {
            let _ = std::fs::remove_file(&d.vsock[i]);
            let o = Command::new("ip")
                .args(["tuntap", "add", "dev", t, "mode", "tap"])
                .output()
                .map_err(|e| BenchError::Run(format!("ip: {e}")))?;
            if !o.status.success() {
                return Err(BenchError::Run(format!(
                    "the devices workload needs a tap per end (root): ip tuntap add {t}: {}",
                    String::from_utf8_lossy(&o.stderr).trim()
                )));
            }
            d.taps[i] = t.clone();
            let _ = Command::new("ip").args(["link", "set", t, "up"]).status();
        }
        Ok(d)
    }

    /// The device options of end `i` (0 source, 1 destination).
    fn args(&self, i: usize) -> Vec<String> {
        if let Some((_, socks)) = self.servers.get(i) {
            return socks
                .iter()
                .flat_map(|s| ["--vfio-user".to_string(), s.display().to_string()])
                .collect();
        }
        vec![
            "--disk".into(),
            self.disk.display().to_string(),
            "--net".into(),
            self.taps[i].clone(),
            "--vsock".into(),
            self.vsock[i].display().to_string(),
            "--rng".into(),
        ]
    }
}

impl Drop for Devices {
    fn drop(&mut self) {
        self.servers.clear();
        for t in self.taps.iter().filter(|t| !t.is_empty()) {
            let _ = Command::new("ip")
                .args(["link", "del", t])
                .stderr(Stdio::null())
                .status();
        }
        if !self.disk.as_os_str().is_empty() {
            let _ = std::fs::remove_file(&self.disk);
        }
    }
}

/// One output line (the interface; keys and values as written there).
#[derive(Debug, Clone, Serialize)]
pub struct MigrateLine {
    /// `"migrate"`.
    pub bench: &'static str,
    /// `dirty` or `read`.
    pub workload: String,
    /// `unlimited`, `10g`, `1g`.
    pub link: String,
    /// `precopy`, `postcopy`, `hybrid`.
    pub mode: String,
    /// `plain` (TCP, `--insecure`) or `tls-psk` (TLS 1.3, pre-shared key).
    pub security: &'static str,
    /// Every run converged.
    pub converged: bool,
    /// Runs that converged, of all runs (`"2/3"`).
    pub converged_runs: String,
    /// Medians of the converged runs (or of all runs for `total_ms`).
    pub total_ms: f64,
    /// Pause → destination resumed.
    pub downtime_ms: f64,
    /// Longest guest-visible pause from the heartbeats (gap − 100 ms).
    pub max_pause_ms: f64,
    /// vCPU time blocked on remote faults (sum over vCPUs).
    pub blocktime_ms: f64,
    /// Bytes sent.
    pub bytes: u64,
    /// Remote fault latency, p50, µs.
    pub fault_p50_us: f64,
    /// p99.
    pub fault_p99_us: f64,
    /// Non-zero pages at switchover × 4096 (what `bytes` is compared with).
    pub nonzero_bytes: u64,
    /// Remote fault latency, p90, µs.
    pub fault_p90_us: f64,
    /// Remote faults (requests the destination made), median.
    pub faults_requested: f64,
    /// Remote fault latency of every converged run together, log2 buckets of µs (bucket `i`:
    /// `[2^i, 2^(i+1))` µs), as QEMU's `postcopy-latency-dist`.
    pub latency_log2_us: Vec<u64>,
    /// Per vCPU: time blocked on remote faults, ms (median), as QEMU's
    /// `postcopy-vcpu-blocktime`.
    pub vcpu_blocktime_ms: Vec<f64>,
    /// Per vCPU: its remote faults, and their mean latency, µs (median over runs), as
    /// QEMU's `postcopy-vcpu-latency`.
    pub vcpu_faults: Vec<f64>,
    /// Per vCPU: mean remote fault latency, µs.
    pub vcpu_latency_us: Vec<f64>,
    /// Faults taken by threads other than the vCPUs (the VMM's devices, DMA), median, as
    /// QEMU's `postcopy-non-vcpu-latency` counts them.
    pub non_vcpu_faults: f64,
    /// The local fault's p50 measured first in the same invocation (`local_fault`), µs.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub local_fault_p50_us: Option<f64>,
    /// `fault_p50_us` / `local_fault_p50_us` (goal: at most 2).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub remote_to_local_p50: Option<f64>,
    /// Each hop of a remote fault, medians (`--breakdown`; printed as a line of its own).
    #[serde(skip)]
    pub breakdown: Option<xfer::hops::Breakdown>,
}

fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// Run `runs` migrations of one cell and summarise them.
pub fn cell(
    exe: &Path,
    dir: &Path,
    shape: &Shape,
    link: &str,
    runs: usize,
    report: Option<&Path>,
) -> Result<MigrateLine, BenchError> {
    let mut stats = Vec::new();
    let mut conv = 0;
    let mut totals = Vec::new();
    for _ in 0..runs {
        let mut samples = Vec::new();
        let mut t0 = None;
        let o = run_one(exe, dir, shape, |v| {
            let t = *t0.get_or_insert_with(Instant::now);
            samples.push(crate::report::ProgressSample::from_status(
                t.elapsed().as_secs_f64() * 1e3,
                v,
            ));
        })?;
        let st = &o.status["stats"];
        // The report shows the cell's last run that completed.
        if let Some(d) = report
            && o.status["state"] == "completed"
        {
            let title = format!(
                "faultline bench migrate: {} {link} {} {}",
                shape.workload,
                shape.mode,
                shape.security()
            );
            crate::report::migration(d, &title, st, &samples)
                .map_err(|e| BenchError::Run(format!("the report in {}: {e}", d.display())))?;
        }
        totals.push(st["total_ms"].as_f64().unwrap_or(f64::NAN));
        if o.status["state"] == "completed" {
            conv += 1;
            stats.push(st.clone());
        } else if o.status["state"] != "cancelled" {
            return Err(BenchError::Run(format!(
                "{} {} {link}: {}",
                shape.workload, shape.mode, o.status
            )));
        }
    }
    let m = |k: &str| median(stats.iter().filter_map(|s| s[k].as_f64()).collect());
    let dm = |k: &str| {
        median(
            stats
                .iter()
                .filter_map(|s| s["destination"][k].as_f64())
                .collect(),
        )
    };
    // Per vCPU: the median over runs of each vCPU's figure in the destination's report.
    let per_vcpu = |k: &str| -> Vec<f64> {
        (0..shape.vcpus as usize)
            .map(|i| {
                median(
                    stats
                        .iter()
                        .filter_map(|s| s["destination"][k][i].as_f64())
                        .collect(),
                )
            })
            .collect()
    };
    let mut log2 = Vec::<u64>::new();
    for s in &stats {
        for (i, v) in s["latency_log2_us"]
            .as_array()
            .into_iter()
            .flatten()
            .enumerate()
        {
            if log2.len() <= i {
                log2.resize(i + 1, 0);
            }
            log2[i] += v.as_u64().unwrap_or(0);
        }
    }
    let breakdown = shape.breakdown.then(|| {
        let runs: Vec<xfer::hops::Breakdown> = stats
            .iter()
            .map(|s| {
                let dest: Vec<[u64; 5]> =
                    serde_json::from_value(s["destination"]["hops"].clone()).unwrap_or_default();
                let src: Vec<[u64; 4]> =
                    serde_json::from_value(s["hops_source"].clone()).unwrap_or_default();
                xfer::hops::join(&dest, &src)
            })
            .filter(|b| b.samples > 0)
            .collect();
        let f = |g: fn(&xfer::hops::Breakdown) -> f64| median(runs.iter().map(g).collect());
        xfer::hops::Breakdown {
            samples: runs.iter().map(|b| b.samples).sum(),
            request_sent_us: f(|b| b.request_sent_us),
            source_read_us: f(|b| b.source_read_us),
            responder_us: f(|b| b.responder_us),
            page_sent_us: f(|b| b.page_sent_us),
            page_received_us: f(|b| b.page_received_us),
            installed_us: f(|b| b.installed_us),
            total_us: f(|b| b.total_us),
        }
    });
    let lat = |k: &str| {
        median(
            stats
                .iter()
                .filter_map(|s| s["fault_latency_us"][k].as_f64())
                .collect(),
        )
    };
    Ok(MigrateLine {
        bench: "migrate",
        workload: shape.workload.clone(),
        link: link.into(),
        mode: shape.mode.clone(),
        security: shape.security(),
        converged: conv == runs,
        converged_runs: format!("{conv}/{runs}"),
        total_ms: if conv > 0 {
            m("total_ms")
        } else {
            median(totals)
        },
        downtime_ms: m("downtime_ms"),
        max_pause_ms: m("max_pause_ms"),
        blocktime_ms: m("blocktime_ms"),
        bytes: m("bytes") as u64,
        fault_p50_us: lat("p50"),
        fault_p99_us: lat("p99"),
        nonzero_bytes: median(
            stats
                .iter()
                .filter_map(|s| s["nonzero_pages"].as_f64())
                .collect(),
        ) as u64
            * 4096,
        fault_p90_us: lat("p90"),
        faults_requested: m("faults_requested"),
        latency_log2_us: log2,
        vcpu_blocktime_ms: per_vcpu("blocktime_ms"),
        vcpu_faults: per_vcpu("vcpu_faults"),
        vcpu_latency_us: per_vcpu("vcpu_latency_us"),
        non_vcpu_faults: dm("non_vcpu_faults"),
        local_fault_p50_us: None,
        remote_to_local_p50: None,
        breakdown,
    })
}

/// A scratch directory for sockets.
pub fn scratch() -> Result<PathBuf, BenchError> {
    let d = std::env::temp_dir().join(format!("faultline-mig-{}", std::process::id()));
    std::fs::create_dir_all(&d).map_err(|e| BenchError::Run(format!("{}: {e}", d.display())))?;
    Ok(d)
}
