//! `faultline`: the command line. Thin: parsing and printing; the work is in the crates.

mod benches;
mod demo;
mod device;
mod docs;
mod error;
mod irq;
mod logging;
mod migrate;
mod progress;
mod run;
mod snap;
mod tls;

use std::process::ExitCode;

use clap::{CommandFactory, Parser, Subcommand, ValueEnum};

use error::{CliResult, failed};

#[derive(Parser)]
#[command(
    name = "faultline",
    version,
    about = "Userspace page faults, devices and interrupts for microVMs"
)]
struct Cli {
    /// Log events as text or JSON lines on stderr (filter: FAULTLINE_LOG, EnvFilter syntax,
    /// default info).
    #[arg(long, global = true, value_enum, default_value_t)]
    log_format: logging::LogFormat,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// The main job: a microVM running the built-in guest, live-migrated with post-copy to
    /// a second faultline process over TCP loopback, memory verified, statistics printed.
    Demo(migrate::DemoArgs),
    /// Memory served lazily from a file by the fault loop, touched by several threads,
    /// then verified against the file.
    MemxDemo(demo::Args),
    /// Live-migrate a running VM (through its API socket) to `faultline run --incoming`.
    Migrate(migrate::Args),
    /// Boot a microVM with the built-in guest and run a workload.
    Run(Box<run::Args>),
    /// Snapshot a running VM through its API socket.
    Snapshot(snap::SnapshotArgs),
    /// Restore a VM from a snapshot (eager, mmap, lazy, prefetch; optionally with an external
    /// page-fault handler).
    Restore(snap::RestoreArgs),
    /// An external page-fault handler: receives a restoring VMM's userfaultfd over a Unix
    /// socket and serves its pages from the snapshot.
    PageServer(snap::PageServerArgs),
    /// vfio-user devices: serve one as a process, or probe any vfio-user server.
    Device {
        #[command(subcommand)]
        cmd: device::DeviceCmd,
    },
    /// Report what this kernel's userfaultfd supports.
    Probe {
        /// One JSON object instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Benchmarks: our figure beside the anchor's, measured in the same run.
    Bench {
        #[command(subcommand)]
        which: BenchCmd,
    },
    /// Print a shell completion script (`faultline completions bash >
    /// /etc/bash_completion.d/faultline`).
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
    /// Print the man page faultline(1), or write it and one page per subcommand into a
    /// directory.
    Man {
        /// Write every page here instead (faultline.1, faultline-migrate.1, ...).
        #[arg(long)]
        dir: Option<std::path::PathBuf>,
    },
}

#[derive(Subcommand)]
enum BenchCmd {
    /// Live migration: 1 GiB guest, 512 MiB hot, workloads x links x modes (the QEMU
    /// post-copy anchor's shapes); medians of `runs`.
    Migrate {
        /// JSON lines.
        #[arg(long)]
        json: bool,
        /// Runs per cell.
        #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u64).range(1..=100))]
        runs: u64,
        /// Workloads: dirty, read, random (the built-in guest), devices (every virtio
        /// device busy), vfio-user (a GPIO card and a DMA engine busy).
        #[arg(long, value_delimiter = ',', default_values_t = ["dirty".to_string(), "read".to_string()])]
        workloads: Vec<String>,
        /// Links: unlimited, 10g, 1g, 200m (a cap on the migration's bandwidth).
        #[arg(long, value_delimiter = ',', default_values_t = ["unlimited".to_string(), "10g".to_string(), "1g".to_string()])]
        links: Vec<String>,
        /// Modes.
        #[arg(long, value_delimiter = ',', default_values_t = ["precopy".to_string(), "postcopy".to_string(), "hybrid".to_string()])]
        modes: Vec<String>,
        /// Security of the link: plain (TCP, --insecure) and/or tls (TLS 1.3, pre-shared
        /// key); with both, a `tls-cost` line compares their total times.
        #[arg(long, value_delimiter = ',', default_values_t = ["plain".to_string()])]
        security: Vec<String>,
        /// Guest memory, MiB.
        #[arg(long, default_value_t = 1024)]
        mem_mib: u64,
        /// Memory the workload uses, MiB.
        #[arg(long, default_value_t = 512)]
        hot_mib: u64,
        /// Also write a report into this directory: per cell, the plots of its last
        /// completed run; an index.html with every cell's figures.
        #[arg(long)]
        report: Option<std::path::PathBuf>,
        /// Stamp each remote fault's hops at both ends (handler woke, request sent, source
        /// read, responder, page sent, page received, installed) and print the median of each
        /// per cell (a `"case":"breakdown"` line).
        #[arg(long)]
        breakdown: bool,
        /// Skip the local fault measured first (a lazy restore from memory of the same
        /// guest: what a remote fault is compared with).
        #[arg(long)]
        no_local_fault: bool,
    },
    /// vfio-user: region round trip, DMA throughput, IRQ trigger to eventfd wake-up, beside
    /// rust-vmm's vfio-user, memcpy and a bare eventfd.
    #[command(name = "vfio-user")]
    VfioUser {
        /// JSON lines.
        #[arg(long)]
        json: bool,
        /// Fewer samples (for tests).
        #[arg(long)]
        quick: bool,
        /// Also write a report into this directory (a chart and an index.html).
        #[arg(long)]
        report: Option<std::path::PathBuf>,
    },
    /// Interrupt delivery, every way side by side: host wake-ups (ours beside C) and, into
    /// the built-in guest, KVM_IRQ_LINE, irqfds and MSIs.
    Irq {
        /// JSON lines.
        #[arg(long)]
        json: bool,
        /// Runs per path (each statistic is the median over runs).
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=100))]
        runs: u64,
        /// Round trips per host path and run.
        #[arg(long, default_value_t = 20_000, value_parser = clap::value_parser!(u64).range(10..=10_000_000))]
        round_trips: u64,
        /// Interrupts per guest path, handler and placement (0: host paths only).
        #[arg(long, default_value_t = 2_000, value_parser = clap::value_parser!(u64).range(0..=1_000_000))]
        guest_irqs: u64,
        /// Also draw the figures into this SVG file.
        #[arg(long)]
        plot: Option<std::path::PathBuf>,
        /// Also write a report into this directory (irq.svg and an index.html with the
        /// figures).
        #[arg(long)]
        report: Option<std::path::PathBuf>,
    },
    /// Snapshot restore: 1 GiB guest, 256 MiB touched after restore, every mode.
    Restore {
        /// JSON lines.
        #[arg(long)]
        json: bool,
        /// Runs per mode (median reported).
        #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u64).range(1..=100))]
        runs: u64,
        /// Guest memory, MiB.
        #[arg(long, default_value_t = 1024)]
        mem_mib: u64,
        /// Memory the workload touches after restore, MiB.
        #[arg(long, default_value_t = 256)]
        touch_mib: u64,
        /// vCPUs.
        #[arg(long, default_value_t = 1)]
        vcpus: u32,
        /// Snapshot directory (default: a temporary one).
        #[arg(long)]
        dir: Option<std::path::PathBuf>,
        /// Also write a report into this directory (times per mode, plotted, and an
        /// index.html).
        #[arg(long)]
        report: Option<std::path::PathBuf>,
    },
    /// virtio-mmio devices driven by the built-in guest: request/response round trips
    /// (legacy against MSI interrupts, with exits), block reads (beside the host reading
    /// the same file), frames into a tap (beside the host writing them).
    Virtio {
        /// JSON lines.
        #[arg(long)]
        json: bool,
        /// Which cases: rr, blk, net (comma-separated).
        #[arg(long, value_delimiter = ',', default_value = "rr,blk,net")]
        cases: Vec<String>,
        /// Runs per figure (medians reported, with the range).
        #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u64).range(1..=100))]
        runs: u64,
        /// Interrupt mode of the blk and net cases (rr measures both).
        #[arg(long, default_value = "msi", value_parser = run::parse_irq)]
        irq: vmm::IrqMode,
        /// Round trips per run of `rr`.
        #[arg(long, default_value_t = 20000)]
        iterations: u64,
        /// Also write a report into this directory (charts and an index.html).
        #[arg(long)]
        report: Option<std::path::PathBuf>,
    },
    /// The microVM: boot to the first heartbeat (1 GiB), and the guest's dirtying speed
    /// against the same loop in a host process.
    Vm {
        /// JSON lines.
        #[arg(long)]
        json: bool,
        /// Boots to time (median reported).
        #[arg(long, default_value_t = 11, value_parser = clap::value_parser!(u64).range(1..=1000))]
        boots: u64,
        /// Seconds of dirtying, guest and native each.
        #[arg(long, default_value_t = 3.0)]
        seconds: f64,
        /// Also write a report into this directory (a chart and an index.html).
        #[arg(long)]
        report: Option<std::path::PathBuf>,
    },
    /// Fault service cost: faultline's fault loop against a minimal raw-ioctl loop.
    Uffd {
        /// JSON lines instead of a table.
        #[arg(long)]
        json: bool,
        /// Faults per faulting thread per run.
        #[arg(long, default_value_t = 4096, value_parser = clap::value_parser!(u64).range(16..=1_000_000))]
        faults: u64,
        /// Runs per cell (the median run is reported).
        #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u64).range(1..=100))]
        runs: u64,
        /// Faulting-thread counts.
        #[arg(long, value_delimiter = ',', default_values_t = [1usize, 2])]
        threads: Vec<usize>,
        /// Cases (default: all).
        #[arg(long, value_delimiter = ',')]
        case: Vec<CaseArg>,
        /// Also write a report into this directory (a chart and an index.html).
        #[arg(long)]
        report: Option<std::path::PathBuf>,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum CaseArg {
    #[value(name = "copy-4k")]
    Copy4k,
    #[value(name = "copy-64k")]
    Copy64k,
    Zeropage,
    Continue,
}

impl From<CaseArg> for bench::uffd_bench::Case {
    fn from(c: CaseArg) -> Self {
        use bench::uffd_bench::Case;
        match c {
            CaseArg::Copy4k => Case::Copy4k,
            CaseArg::Copy64k => Case::Copy64k,
            CaseArg::Zeropage => Case::ZeroPage,
            CaseArg::Continue => Case::Continue,
        }
    }
}

fn probe(json: bool) -> CliResult {
    let s = uffd::Support::probe().map_err(failed("probing userfaultfd"))?;
    let names: Vec<String> = s
        .features
        .iter_names()
        .map(|(n, _)| n.to_string())
        .collect();
    let ioctls: Vec<String> = s.ioctls.iter_names().map(|(n, _)| n.to_string()).collect();
    if json {
        let v = serde_json::json!({
            "origin": format!("{:?}", s.origin).to_lowercase(),
            "features": names,
            "features_bits": s.features.bits(),
            "ioctls": ioctls,
            "page_size": uffd::page_size(),
        });
        println!("{v}");
    } else {
        println!("userfaultfd via {:?}", s.origin);
        println!("features: {}", names.join(" "));
        println!("api ioctls: {}", ioctls.join(" "));
    }
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Err(e) = logging::init(cli.log_format) {
        eprintln!("faultline: {e}");
        return ExitCode::from(2);
    }
    let r = match cli.cmd {
        Cmd::Completions { shell } => docs::completions(shell, Cli::command()),
        Cmd::Man { dir } => docs::man(Cli::command(), dir.as_deref()),
        Cmd::Demo(a) => migrate::demo(&a),
        Cmd::MemxDemo(a) => demo::run(&a),
        Cmd::Migrate(a) => migrate::migrate(&a),
        Cmd::Bench {
            which:
                BenchCmd::Migrate {
                    json,
                    runs,
                    workloads,
                    links,
                    modes,
                    security,
                    mem_mib,
                    hot_mib,
                    report,
                    breakdown,
                    no_local_fault,
                },
        } => migrate::bench(
            json,
            runs as usize,
            &workloads,
            &links,
            &modes,
            &security,
            (mem_mib, hot_mib),
            report.as_deref(),
            (breakdown, !no_local_fault),
        ),
        Cmd::Run(a) => run::run(&a),
        Cmd::Probe { json } => probe(json),
        Cmd::Bench {
            which:
                BenchCmd::VfioUser {
                    json,
                    quick,
                    report,
                },
        } => benches::bench_vfu(json, quick, report.as_deref()),
        Cmd::Bench {
            which:
                BenchCmd::Irq {
                    json,
                    runs,
                    round_trips,
                    guest_irqs,
                    plot,
                    report,
                },
        } => irq::bench(
            json,
            runs as usize,
            round_trips as usize,
            guest_irqs as usize,
            plot.as_deref(),
            report.as_deref(),
        ),
        Cmd::Device {
            cmd: device::DeviceCmd::Serve(a),
        } => device::serve(&a),
        Cmd::Device {
            cmd: device::DeviceCmd::Probe(a),
        } => device::probe(&a),
        Cmd::Snapshot(a) => snap::snapshot(&a),
        Cmd::Restore(a) => snap::restore(&a),
        Cmd::PageServer(a) => snap::page_server(&a),
        Cmd::Bench {
            which:
                BenchCmd::Restore {
                    json,
                    runs,
                    mem_mib,
                    touch_mib,
                    vcpus,
                    dir,
                    report,
                },
        } => benches::bench_restore(
            json,
            runs,
            (mem_mib, touch_mib, vcpus),
            dir,
            report.as_deref(),
        ),
        Cmd::Bench {
            which:
                BenchCmd::Uffd {
                    json,
                    faults,
                    runs,
                    threads,
                    case,
                    report,
                },
        } => benches::bench_uffd(json, (faults, runs), threads, case, report.as_deref()),
        Cmd::Bench {
            which:
                BenchCmd::Virtio {
                    json,
                    cases,
                    runs,
                    irq,
                    iterations,
                    report,
                },
        } => benches::bench_virtio(
            json,
            &cases,
            runs as usize,
            irq,
            iterations,
            report.as_deref(),
        ),
        Cmd::Bench {
            which:
                BenchCmd::Vm {
                    json,
                    boots,
                    seconds,
                    report,
                },
        } => benches::bench_vm(json, boots as usize, seconds, report.as_deref()),
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("faultline: error: {}", uffd::error_chain(&e));
            ExitCode::FAILURE
        }
    }
}
