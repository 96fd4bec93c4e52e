//! `faultline run`: boot a microVM with the built-in guest and run a workload.

use std::time::Duration;

use vmm::{Backend, Vm, VmConfig, Workload};

use crate::error::{CliError, CliResult, failed};

/// `faultline run` options.
#[derive(clap::Args)]
pub struct Args {
    /// Guest memory, e.g. 512M, 1G (a multiple of 2 MiB).
    #[arg(long, default_value = "256M", value_parser = parse_size)]
    mem: u64,
    /// vCPUs.
    #[arg(long, default_value_t = 1)]
    vcpus: u32,
    /// Workload of the built-in guest: fill, dirty, read, random, verify.
    #[arg(long, default_value = "fill")]
    guest: Workload,
    /// Memory the workload uses (default: all but the first 4 MiB), e.g. 512M.
    #[arg(long, value_parser = parse_size)]
    workload_mem: Option<u64>,
    /// Run time in seconds (`dirty` and `read` run until stopped otherwise).
    #[arg(long)]
    seconds: Option<f64>,
    /// Seed of the `random` workload.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Guest memory backend: anon, memfd, hugepages.
    #[arg(long, default_value = "anon")]
    backend: Backend,
    /// Give the built-in guest KVM's in-kernel irqchip (LAPIC, IOAPIC, PIC) and PIT; its
    /// state then travels with snapshots and migrations.
    #[arg(long)]
    irqchip: bool,
    #[command(flatten)]
    devices: DeviceArgs,
    /// How the virtio devices interrupt: `legacy` (a line, InterruptStatus/ACK) or `msi`
    /// (offered through Dragonball's registers; the driver enables it).
    #[arg(long, default_value = "legacy", value_parser = parse_irq)]
    irq: vmm::IrqMode,
    /// Poll mode of the virtio devices: after each request a device's thread keeps polling
    /// its queues for this many microseconds (the guest's notifies turned off meanwhile), as
    /// QEMU's iothreads do (`poll-max-ns`); costs a spinning CPU while the window is open.
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u64).range(0..=1_000_000))]
    virtio_poll_us: u64,
    /// What `--guest virtio` does: `test` drives every device once and checks it; `soak`
    /// keeps the disk (the first device) busy until stopped, checking each block it wrote
    /// (a guest to snapshot and migrate with its devices).
    #[arg(long, default_value = "test", value_parser = parse_virtio_job)]
    virtio_job: u64,
    /// Print each guest event (heartbeats, checksums, ...) as a JSON line on stdout.
    #[arg(long)]
    json_events: bool,
    /// Boot this Linux kernel (ELF vmlinux with a PVH note, or bzImage) instead of the
    /// built-in guest; its console (ttyS0) goes to stdout.
    #[arg(long)]
    kernel: Option<std::path::PathBuf>,
    /// An initramfs for --kernel.
    #[arg(long, requires = "kernel")]
    initrd: Option<std::path::PathBuf>,
    /// Kernel command line for --kernel.
    #[arg(long, requires = "kernel", default_value = vmm::linux::DEFAULT_CMDLINE)]
    cmdline: String,
    /// Serve the REST control API on this Unix socket (`curl --unix-socket PATH
    /// http://localhost/vm`).
    #[arg(long)]
    api_sock: Option<std::path::PathBuf>,
    /// Do not boot until the API says so (`PUT /actions` with `{"action_type":
    /// "InstanceStart"}`); devices may be added through the API before (`PUT /drives/{id}`,
    /// `/network-interfaces/{id}`, `/vsock`, `/entropy`), as with Firecracker.
    #[arg(long, requires = "api_sock", conflicts_with = "incoming")]
    boot_via_api: bool,
    /// Give up after this many seconds.
    #[arg(long, default_value_t = 3600)]
    timeout: u64,
    /// Receive the VM from a migrating source instead of booting one: listen on
    /// `tcp:HOST:PORT` or `unix:PATH` (the VM's shape comes from the source).
    #[arg(long, value_name = "ENDPOINT")]
    incoming: Option<vmm::migration::Endpoint>,
    /// With --incoming: run the guest's `verify` at switchover instead of resuming, and
    /// compare its checksums with the source's.
    #[arg(long, requires = "incoming")]
    verify: bool,
    /// With --incoming: after a lost post-copy link, wait this many seconds for
    /// `faultline migrate --resume` before stopping the VM with an error.
    #[arg(long, default_value_t = 60, requires = "incoming")]
    recover_timeout: u64,
    /// With --incoming: who may migrate to us.
    #[command(flatten)]
    security: crate::tls::TlsArgs,
}

/// Parse `--virtio-job test|soak`.
fn parse_virtio_job(s: &str) -> Result<u64, String> {
    match s {
        "test" => Ok(vmm::guest::abi::VIRTIO_JOB_TEST),
        "soak" => Ok(vmm::guest::abi::VIRTIO_JOB_SOAK),
        _ => Err(format!("'{s}': expected test or soak")),
    }
}

/// Parse `--disk PATH[,ro][,direct]`.
pub fn parse_disk(s: &str) -> Result<vmm::VirtioSpec, String> {
    let mut parts = s.split(',');
    let path = parts.next().unwrap_or("");
    if path.is_empty() {
        return Err("--disk needs an image path".into());
    }
    let (mut read_only, mut direct) = (false, false);
    for p in parts {
        match p {
            "ro" => read_only = true,
            "direct" => direct = true,
            _ => return Err(format!("--disk option '{p}': expected ro or direct")),
        }
    }
    Ok(vmm::VirtioSpec::Block {
        path: path.into(),
        read_only,
        direct,
    })
}

/// Parse `--irq legacy|msi`.
pub fn parse_irq(s: &str) -> Result<vmm::IrqMode, String> {
    match s {
        "legacy" => Ok(vmm::IrqMode::Legacy),
        "msi" => Ok(vmm::IrqMode::Msi),
        _ => Err(format!("'{s}': expected legacy or msi")),
    }
}

/// The virtio devices and their backends, as `run`, `restore` and `run --incoming` name
/// them (a restored or incoming VM's devices get these backends, in the same order).
#[derive(clap::Args, Debug, Clone, Default)]
pub struct DeviceArgs {
    /// Attach a virtio-blk disk over this raw image (repeatable): `,ro` refuses writes,
    /// `,direct` bypasses the host's page cache (O_DIRECT, QEMU's cache=none).
    #[arg(long = "disk", value_name = "IMG[,ro][,direct]", value_parser = parse_disk)]
    disks: Vec<vmm::VirtioSpec>,
    /// Attach a virtio-net device on this existing tap interface (repeatable).
    #[arg(long = "net", value_name = "TAP")]
    nets: Vec<String>,
    /// Attach a virtio-vsock device whose host side is this Unix socket (Firecracker's
    /// hybrid convention: connect and write `CONNECT <port>\n`; the guest's connections to
    /// port P go to `SOCK_P`).
    #[arg(long, value_name = "SOCK")]
    vsock: Option<std::path::PathBuf>,
    /// The guest's vsock CID.
    #[arg(long, default_value_t = 3, requires = "vsock")]
    vsock_cid: u64,
    /// Attach a virtio-rng device.
    #[arg(long)]
    rng: bool,
    /// A Linux guest's serial console goes to this file (appended) instead of stdout.
    #[arg(long, value_name = "FILE")]
    pub console: Option<std::path::PathBuf>,
    /// Attach the vfio-user device at this socket to the guest's PCI bus (repeatable; guest
    /// memory becomes a memfd shared with the devices). `--guest devices` and
    /// `devices-soak` drive them. Where a VM lands (restore, --incoming): a server of the
    /// same device, one for each, in the same order; its state is carried.
    #[arg(long = "vfio-user", value_name = "SOCKET")]
    pub vfio_user: Vec<std::path::PathBuf>,
}

impl DeviceArgs {
    /// The virtio devices named on the command line, in bus order: disks, nets, vsock, rng.
    pub fn specs(&self) -> Vec<vmm::VirtioSpec> {
        let mut v = self.disks.clone();
        v.extend(self.nets.iter().map(|t| vmm::VirtioSpec::Net {
            tap: t.clone(),
            mac: None,
        }));
        if let Some(u) = &self.vsock {
            v.push(vmm::VirtioSpec::Vsock {
                cid: self.vsock_cid,
                uds: u.clone(),
            });
        }
        if self.rng {
            v.push(vmm::VirtioSpec::Rng);
        }
        v
    }
}

/// Parse `512M`, `1G`, `4096K` or a byte count.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, mul) = match s.char_indices().last() {
        Some((i, 'K' | 'k')) => (&s[..i], 1u64 << 10),
        Some((i, 'M' | 'm')) => (&s[..i], 1 << 20),
        Some((i, 'G' | 'g')) => (&s[..i], 1 << 30),
        _ => (s, 1),
    };
    num.parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(mul))
        .ok_or_else(|| format!("'{s}' is not a size (examples: 512M, 1G)"))
}

pub fn run(a: &Args) -> CliResult {
    if a.seconds.is_some_and(|s| !(s > 0.0 && s < 1e6)) {
        return Err(CliError::Usage("--seconds must be positive".into()));
    }
    let cfg = VmConfig {
        mem_bytes: a.mem,
        vcpus: a.vcpus,
        workload: a.guest,
        workload_bytes: a.workload_mem,
        run_for: a.seconds.map(Duration::from_secs_f64),
        seed: a.seed,
        backend: a.backend,
        linux: a.kernel.as_ref().map(|k| vmm::linux::LinuxBoot {
            kernel: k.clone(),
            initrd: a.initrd.clone(),
            cmdline: a.cmdline.clone(),
        }),
        console: a.devices.console.clone(),
        vfio_user: a.devices.vfio_user.clone(),
        irqchip: a.irqchip,
        virtio: a.devices.specs(),
        virtio_irq: a.irq,
        virtio_job: vmm::VirtioJob {
            job: a.virtio_job,
            ..Default::default()
        },
        virtio_poll_us: a.virtio_poll_us,
    };
    let mut api = None;
    let running = match &a.incoming {
        None if a.boot_via_api => {
            let pre = vmm::preboot::PreBoot::new();
            let p = a.api_sock.as_ref().expect("clap requires --api-sock");
            api = Some(
                vmm::api::ApiServer::start(p, pre.handle())
                    .map_err(failed(format!("API socket {}", p.display())))?,
            );
            eprintln!(
                "faultline run: waiting for PUT /actions {{\"action_type\":\"InstanceStart\"}} on {}",
                p.display()
            );
            pre.run(cfg, Duration::from_secs(a.timeout))
                .map_err(failed("booting through the API"))?
        }
        Some(ep) => {
            a.security.check(ep)?;
            eprintln!("faultline run: waiting for a migration on {ep}");
            let r = vmm::RunningVm::incoming(&vmm::migration::IncomingOptions {
                listen: ep.clone(),
                verify: a.verify,
                recover_timeout: Duration::from_secs(a.recover_timeout),
                tls: a.security.credentials(),
                insecure: a.security.insecure,
                virtio: a.devices.specs(),
                console: a.devices.console.clone(),
                vfio_user: a.devices.vfio_user.clone(),
                ..Default::default()
            })
            .map_err(failed("incoming migration"))?;
            if let Some(st) = r.migration_status() {
                // Print the statistics as soon as the migration completes (the guest runs on).
                std::thread::spawn(move || {
                    while !st.is_final() {
                        std::thread::sleep(Duration::from_millis(50));
                    }
                    let s = st.get();
                    eprintln!(
                        "faultline run: incoming migration {}{}",
                        s.state,
                        s.error.map(|e| format!(": {e}")).unwrap_or_default()
                    );
                    if let Some(stats) = s.stats {
                        println!(
                            "{}",
                            serde_json::json!({ "event": "migration", "stats": stats })
                        );
                    }
                });
            }
            r
        }
        None => {
            let vm = Vm::new(cfg).map_err(failed("creating the VM"))?;
            vm.start().map_err(failed("starting the VM"))?
        }
    };
    let _api = match (&a.api_sock, api) {
        (_, Some(api)) => Some(api),
        (Some(p), None) => Some(
            vmm::api::ApiServer::start(p, running.api_sender())
                .map_err(failed(format!("API socket {}", p.display())))?,
        ),
        (None, None) => None,
    };
    let json = a.json_events;
    let summary = running
        .wait(Duration::from_secs(a.timeout), |e| {
            if json {
                println!(
                    "{}",
                    serde_json::to_string(e).expect("plain enum serialises")
                );
            }
        })
        .map_err(failed("running the VM"))?;
    let line = serde_json::json!({ "event": "summary", "summary": summary });
    if json {
        println!("{line}");
    } else if summary.migrated {
        println!(
            "faultline run: the guest migrated away after {} ms",
            summary.wall_ms
        );
        if let Some(m) = &summary.migration {
            println!(
                "{}",
                serde_json::json!({ "event": "migration", "stats": m["stats"] })
            );
        }
    } else {
        println!(
            "faultline run: {} on {} vCPU(s), {} MiB: {} after {} ms, checksums verified: {}",
            summary.config.workload,
            summary.config.vcpus,
            summary.config.mem_bytes >> 20,
            if summary.stopped {
                "stopped through the API"
            } else {
                "done"
            },
            summary.wall_ms,
            summary.checksums_verified
        );
        for d in &summary.virtio {
            println!(
                "  virtio {} {} at {:#x}: {} requests, {} register exits, {} legacy / {} MSI interrupts{}",
                d.kind,
                d.index,
                d.base,
                d.completed,
                d.reads + d.writes,
                d.legacy_irqs,
                d.msi_irqs,
                d.needs_reset
                    .as_ref()
                    .map(|r| format!(", NEEDS RESET: {r}"))
                    .unwrap_or_default()
            );
        }
        for v in &summary.vcpus {
            println!(
                "  vCPU {}: checksum {}, {} heartbeats, max gap {:.1} ms, exit code {}",
                v.vcpu,
                v.checksum.map_or("-".into(), vmm::hex::fmt),
                v.heartbeats,
                v.max_gap_us as f64 / 1e3,
                v.exit_code.map_or("-".into(), |c| c.to_string())
            );
        }
    }
    Ok(())
}
