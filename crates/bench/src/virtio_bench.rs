//! `faultline bench virtio`: the virtio-mmio devices driven by the built-in guest, each
//! figure beside its anchor measured in the same run.
//!
//! - `rr`: request/response round trips (8 bytes from the entropy device, each waited for
//!   through its interrupt) per second, legacy against MSI, with the exits each costs: the
//!   analog of netperf TCP_RR in the MSI-for-virtio-mmio series.
//! - `blk`: 4 KiB reads at random 4 KiB offsets and 1 MiB sequential reads, queue depth 1,
//!   from the guest, beside this process reading the same file the same way (`"impl":"host"`).
//! - `net`: 1514-byte frames from the guest into a tap (8 in flight), beside this process
//!   writing the same frames into the same tap.
//!
//! Exits: a baseline run of the same job with no iterations (the driver's setup) is
//! subtracted, so the figures are per request.

use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use serde::Serialize;
use vmm::guest::abi;
use vmm::{IrqMode, VirtioJob, VirtioSpec, Vm, VmConfig, Workload};

use crate::BenchError;

/// The device threads' poll window in the `poll` figures, µs.
pub const POLL_US: u64 = 200;

/// `rr` line.
#[derive(Debug, Clone, Serialize)]
pub struct RrLine {
    /// `"virtio"`.
    pub bench: &'static str,
    /// `"rr"`.
    pub case: &'static str,
    /// `"legacy"` or `"msi"`.
    pub irq: &'static str,
    /// The guest's interrupt handler: `"cpl0"` (a kernel's) or `"cpl3"`.
    pub handler: &'static str,
    /// The device's thread: `"woken"` by each notify (an ioeventfd), or `"polling"` its
    /// queues for [`POLL_US`] after each request (notifies off). The guest always waits for
    /// the interrupt.
    pub device: &'static str,
    /// Round trips per second (median of the runs).
    pub per_s: f64,
    /// Slowest and fastest run.
    pub per_s_range: [f64; 2],
    /// Exits to userspace per round trip.
    pub exits_user: f64,
    /// Exits handled in the kernel per round trip (`None`: no KVM binary stats here).
    pub exits_kernel: Option<f64>,
    /// Interrupts the guest took per round trip.
    pub irqs: f64,
    /// The guest's idle calls per round trip (its stand-in for `hlt`, an exit of its own,
    /// not counted in `exits_user`).
    pub idle_per_rt: f64,
    /// Round trips per run.
    pub iterations: u64,
    /// Runs.
    pub runs: usize,
}

/// `blk` line.
#[derive(Debug, Clone, Serialize)]
pub struct BlkLine {
    /// `"virtio"`.
    pub bench: &'static str,
    /// `"blk"`.
    pub case: &'static str,
    /// `"rand-4k-qd1"` or `"seq-1m-qd1"`.
    pub pattern: &'static str,
    /// `"page-cache"` (buffered, both sides) or `"direct"` (`O_DIRECT`, both sides).
    pub cache: &'static str,
    /// `"faultline"` (the guest) or `"host"` (this process, `pread`).
    #[serde(rename = "impl")]
    pub imp: &'static str,
    /// The guest's interrupt mode (`None` for the host).
    pub irq: Option<&'static str>,
    /// How the guest learns of a completion: `"interrupt"`, or `"poll"` (no interrupts, the
    /// guest polls the used ring, the device thread polls the queues for [`POLL_US`] with
    /// notifies off: no exit per request); `None` for the host.
    pub wait: Option<&'static str>,
    /// Requests per second (median of the runs).
    pub iops: f64,
    /// MB/s (10^6 bytes).
    pub mb_s: f64,
    /// Slowest and fastest run, IOPS.
    pub iops_range: [f64; 2],
    /// Requests per run.
    pub iterations: u64,
    /// Runs.
    pub runs: usize,
}

/// `net` line.
#[derive(Debug, Clone, Serialize)]
pub struct NetLine {
    /// `"virtio"`.
    pub bench: &'static str,
    /// `"net"`.
    pub case: &'static str,
    /// `"faultline"` (guest to tap) or `"host"` (this process writing into the tap).
    #[serde(rename = "impl")]
    pub imp: &'static str,
    /// The guest's interrupt mode (`None` for the host).
    pub irq: Option<&'static str>,
    /// `"interrupt"` or `"poll"` (as for `blk`); `None` for the host.
    pub wait: Option<&'static str>,
    /// Gbit/s of Ethernet frames (median of the runs).
    pub gbit_s: f64,
    /// Frames per second.
    pub frames_per_s: f64,
    /// Slowest and fastest run, Gbit/s.
    pub gbit_s_range: [f64; 2],
    /// Frames per run.
    pub frames: u64,
    /// Runs.
    pub runs: usize,
}

fn irq_name(m: IrqMode) -> &'static str {
    match m {
        IrqMode::Legacy => "legacy",
        IrqMode::Msi => "msi",
    }
}

/// What a guest job did.
#[derive(Debug, Clone, Copy)]
struct Job {
    iterations: u64,
    secs: f64,
    irqs: u64,
    exits_user: u64,
    idle: u64,
    exits_kernel: Option<u64>,
}

fn err(what: &str) -> impl FnOnce(&dyn std::error::Error) -> BenchError + '_ {
    move |e| BenchError::Run(format!("{what}: {}", uffd::error_chain(e)))
}

/// How a request's two ends wait.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Wait {
    /// The device thread is woken by the notify (an ioeventfd); the guest by the interrupt.
    Interrupt,
    /// The device thread polls its queues (notifies off); the guest waits for interrupts.
    DevicePolls,
    /// Both poll: no notify, no interrupt.
    Poll,
}

/// Run the `virtio` workload's `job` on `devices` for `iterations`, its handler at
/// `handler_cpl`, the two ends waiting as `wait` says.
fn guest_job(
    devices: &[VirtioSpec],
    irq: IrqMode,
    job: u64,
    iterations: u64,
    handler_cpl: u8,
    wait: Wait,
) -> Result<Job, BenchError> {
    let poll = wait == Wait::Poll;
    let vm = Vm::new(VmConfig {
        mem_bytes: 64 << 20,
        vcpus: 1,
        workload: Workload::Virtio,
        virtio: devices.to_vec(),
        virtio_irq: irq,
        virtio_job: VirtioJob {
            job,
            iterations,
            handler_cpl,
            poll,
            ..VirtioJob::default()
        },
        virtio_poll_us: if wait == Wait::Interrupt { 0 } else { POLL_US },
        ..VmConfig::default()
    })
    .map_err(|e| err("creating the VM")(&e))?;
    let stats = vm.vcpu_stats(0).map_err(|e| err("KVM_GET_STATS_FD")(&e))?;
    let khz = f64::from(vm.tsc_khz().map_err(|e| err("KVM_GET_TSC_KHZ")(&e))?);
    let running = vm.start().map_err(|e| err("starting the VM")(&e))?;
    let s = running
        .wait(Duration::from_secs(300), |_| {})
        .map_err(|e| err("running the VM")(&e))?;
    let get = |k: u32| {
        s.reports
            .iter()
            .rev()
            .find(|r| r.0 == k)
            .map(|r| u64::from(r.1))
    };
    let result = get(abi::KEY_VIRTIO_RESULT).unwrap_or(u64::MAX);
    if result != 0 {
        return Err(BenchError::Run(format!(
            "the guest's virtio job {job} failed at step {result} after {} requests; devices: {}",
            get(abi::KEY_VIRTIO_ITERATIONS).unwrap_or(0),
            serde_json::to_string(&s.virtio).unwrap_or_default()
        )));
    }
    let ticks = get(abi::KEY_VIRTIO_TICKS_LO).unwrap_or(0)
        | (get(abi::KEY_VIRTIO_TICKS_HI).unwrap_or(0) << 32);
    let kernel = stats
        .as_ref()
        .and_then(|st| st.read("exits").ok())
        .map(|k| k.saturating_sub(s.exits));
    {
        tracing::debug!(
            "job {job} wait {wait:?} cpl {handler_cpl}: {} iters, ticks {ticks}, exits {} idle {} kvm {:?} irqs {:?} virtio {}",
            get(abi::KEY_VIRTIO_ITERATIONS).unwrap_or(0),
            s.exits,
            s.idle_exits,
            kernel,
            get(abi::KEY_VIRTIO_IRQS),
            serde_json::to_string(&s.virtio).unwrap_or_default()
        );
    }
    Ok(Job {
        iterations: get(abi::KEY_VIRTIO_ITERATIONS).unwrap_or(0),
        secs: ticks as f64 / (khz * 1000.0),
        irqs: get(abi::KEY_VIRTIO_IRQS).unwrap_or(0),
        exits_user: s.exits - s.idle_exits,
        idle: s.idle_exits,
        exits_kernel: kernel,
    })
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() { 0.0 } else { v[v.len() / 2] }
}

fn range(v: &[f64]) -> [f64; 2] {
    let lo = v.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    [lo, hi]
}

/// `rr` for both interrupt modes and both handler privileges, `runs` runs of `iterations`
/// round trips each.
pub fn rr(iterations: u64, runs: usize) -> Result<Vec<RrLine>, BenchError> {
    let mut out = Vec::new();
    for (device, wait) in [("woken", Wait::Interrupt), ("polling", Wait::DevicePolls)] {
        for (handler, cpl) in [("cpl0", 0u8), ("cpl3", 3u8)] {
            for irq in [IrqMode::Legacy, IrqMode::Msi] {
                let job = |n| guest_job(&[VirtioSpec::Rng], irq, abi::VIRTIO_JOB_RR, n, cpl, wait);
                let base = job(0)?;
                let mut rates = Vec::new();
                let mut last = None;
                for _ in 0..runs.max(1) {
                    let j = job(iterations)?;
                    rates.push(j.iterations as f64 / j.secs.max(1e-9));
                    last = Some(j);
                }
                let j = last.expect("at least one run");
                let n = j.iterations.max(1) as f64;
                out.push(RrLine {
                    bench: "virtio",
                    case: "rr",
                    irq: irq_name(irq),
                    handler,
                    device,
                    per_s_range: range(&rates),
                    per_s: median(&mut rates),
                    exits_user: (j.exits_user.saturating_sub(base.exits_user)) as f64 / n,
                    exits_kernel: match (j.exits_kernel, base.exits_kernel) {
                        (Some(a), Some(b)) => Some(a.saturating_sub(b) as f64 / n),
                        _ => None,
                    },
                    irqs: (j.irqs.saturating_sub(base.irqs)) as f64 / n,
                    idle_per_rt: (j.idle.saturating_sub(base.idle)) as f64 / n,
                    iterations: j.iterations,
                    runs: runs.max(1),
                });
            }
        }
    }
    Ok(out)
}

fn xorshift(mut x: u64) -> u64 {
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    x
}

/// A file of `bytes` with non-zero data, written through and left in the page cache.
fn image(dir: &Path, bytes: u64) -> Result<std::path::PathBuf, BenchError> {
    let p = dir.join("bench-disk.img");
    let io = |e: std::io::Error| BenchError::Run(format!("{}: {e}", p.display()));
    let mut f = std::fs::File::create(&p).map_err(io)?;
    let chunk: Vec<u8> = (0..1 << 20).map(|i: u32| (i * 7 + 1) as u8).collect();
    for _ in 0..bytes >> 20 {
        f.write_all(&chunk).map_err(io)?;
    }
    f.sync_all().map_err(io)?;
    Ok(p)
}

/// The host's reads of `path`, as the guest's job does them (`O_DIRECT` if `direct`): IOPS.
fn host_reads(
    path: &Path,
    seq: bool,
    direct: bool,
    iterations: u64,
    seed: u64,
) -> Result<f64, BenchError> {
    use std::os::unix::fs::OpenOptionsExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(if direct { libc::O_DIRECT } else { 0 })
        .open(path)
        .map_err(|e| BenchError::Run(format!("{}: {e}", path.display())))?;
    let len = f
        .metadata()
        .map_err(|e| BenchError::Run(format!("{e}")))?
        .len();
    let (sectors, req) = (len / 512, if seq { 1 << 20 } else { 4096usize });
    // Aligned, as O_DIRECT needs.
    let mut backing = vec![0u8; req + 4096];
    let off = backing.as_ptr().align_offset(4096).min(4096);
    let buf = &mut backing[off..off + req];
    let mut x = seed;
    let t = Instant::now();
    for i in 0..iterations {
        let sector = if seq {
            (i % (sectors >> 11)) << 11
        } else {
            x = xorshift(x);
            (x % (sectors >> 3)) * 8
        };
        f.read_exact_at(buf, sector * 512)
            .map_err(|e| BenchError::Run(format!("host pread: {e}")))?;
    }
    Ok(iterations as f64 / t.elapsed().as_secs_f64())
}

/// `blk`: both patterns, through the page cache and direct, the guest in `irq` mode and the
/// host doing the same, `runs` runs each.
pub fn blk(
    dir: &Path,
    rand_iterations: u64,
    seq_iterations: u64,
    irq: IrqMode,
    runs: usize,
) -> Result<Vec<BlkLine>, BenchError> {
    let img = image(dir, 256 << 20)?;
    let mut out = Vec::new();
    for (cache, direct) in [("page-cache", false), ("direct", true)] {
        let spec = VirtioSpec::Block {
            path: img.clone(),
            read_only: true,
            direct,
        };
        for (pattern, seq, iters, job) in [
            (
                "rand-4k-qd1",
                false,
                rand_iterations,
                abi::VIRTIO_JOB_BLK_RANDOM,
            ),
            ("seq-1m-qd1", true, seq_iterations, abi::VIRTIO_JOB_BLK_SEQ),
        ] {
            let bytes = if seq { 1u64 << 20 } else { 4096 };
            let (mut irqd, mut polled, mut host) = (Vec::new(), Vec::new(), Vec::new());
            for _ in 0..runs.max(1) {
                let spec = std::slice::from_ref(&spec);
                let j = guest_job(spec, irq, job, iters, 0, Wait::Interrupt)?;
                irqd.push(j.iterations as f64 / j.secs.max(1e-9));
                let j = guest_job(spec, irq, job, iters, 0, Wait::Poll)?;
                polled.push(j.iterations as f64 / j.secs.max(1e-9));
                // The guest's seed: VmConfig's default (1) for vCPU 0.
                host.push(host_reads(&img, seq, direct, iters, 1)?);
            }
            for (imp, irq, wait, v) in [
                (
                    "faultline",
                    Some(irq_name(irq)),
                    Some("interrupt"),
                    &mut irqd,
                ),
                ("faultline", Some(irq_name(irq)), Some("poll"), &mut polled),
                ("host", None, None, &mut host),
            ] {
                let r = range(v);
                let iops = median(v);
                out.push(BlkLine {
                    bench: "virtio",
                    case: "blk",
                    pattern,
                    cache,
                    imp,
                    irq,
                    wait,
                    iops,
                    mb_s: iops * bytes as f64 / 1e6,
                    iops_range: r,
                    iterations: iters,
                    runs: runs.max(1),
                });
            }
        }
    }
    let _ = std::fs::remove_file(&img);
    Ok(out)
}

/// A tap for the benchmark, deleted on drop.
struct BenchTap(String);

impl BenchTap {
    fn new() -> Result<BenchTap, BenchError> {
        let name = format!("flbench{}", std::process::id() % 10_000);
        let ip = |args: &[&str]| -> Result<(), BenchError> {
            let o = Command::new("ip")
                .args(args)
                .output()
                .map_err(|e| BenchError::Run(format!("ip: {e}")))?;
            if o.status.success() {
                Ok(())
            } else {
                Err(BenchError::Run(format!(
                    "ip {args:?}: {} (the net case needs root and tun/tap)",
                    String::from_utf8_lossy(&o.stderr).trim()
                )))
            }
        };
        ip(&["tuntap", "add", "dev", &name, "mode", "tap"])?;
        let t = BenchTap(name.clone());
        ip(&["link", "set", &name, "up"])?;
        Ok(t)
    }
}

impl Drop for BenchTap {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["link", "del", &self.0]).output();
    }
}

/// `net`: guest to tap in `irq` mode, and this process into the same tap.
pub fn net(frames: u64, irq: IrqMode, runs: usize) -> Result<Vec<NetLine>, BenchError> {
    use virtio::net::NetBackend;
    let tap = BenchTap::new()?;
    let spec = VirtioSpec::Net {
        tap: tap.0.clone(),
        mac: None,
    };
    let frame_bits = 1514.0 * 8.0;
    let (mut guest, mut polled, mut host) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..runs.max(1) {
        let specs = std::slice::from_ref(&spec);
        let j = guest_job(
            specs,
            irq,
            abi::VIRTIO_JOB_NET_TX,
            frames,
            0,
            Wait::Interrupt,
        )?;
        guest.push(j.iterations as f64 / j.secs.max(1e-9));
        let j = guest_job(specs, irq, abi::VIRTIO_JOB_NET_TX, frames, 0, Wait::Poll)?;
        polled.push(j.iterations as f64 / j.secs.max(1e-9));
        // The same frames from this process, the tap opened again once the VM closed it.
        let mut t = virtio::net::Tap::open(&tap.0).map_err(|e| err("opening the tap")(&e))?;
        let mut frame = vec![0u8; 1514];
        frame[..6].fill(0xff);
        frame[12] = 0x88;
        frame[13] = 0xb5;
        let start = Instant::now();
        let mut sent = 0u64;
        while sent < frames {
            match t.send(&frame) {
                Ok(()) => sent += 1,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => std::thread::yield_now(),
                Err(e) => return Err(BenchError::Run(format!("host write to the tap: {e}"))),
            }
        }
        host.push(sent as f64 / start.elapsed().as_secs_f64());
    }
    let mut out = Vec::new();
    for (imp, irq, wait, v) in [
        (
            "faultline",
            Some(irq_name(irq)),
            Some("interrupt"),
            &mut guest,
        ),
        ("faultline", Some(irq_name(irq)), Some("poll"), &mut polled),
        ("host", None, None, &mut host),
    ] {
        let r = range(v);
        let fps = median(v);
        out.push(NetLine {
            bench: "virtio",
            case: "net",
            imp,
            irq,
            wait,
            gbit_s: fps * frame_bits / 1e9,
            frames_per_s: fps,
            gbit_s_range: [r[0] * frame_bits / 1e9, r[1] * frame_bits / 1e9],
            frames,
            runs: runs.max(1),
        });
    }
    Ok(out)
}
