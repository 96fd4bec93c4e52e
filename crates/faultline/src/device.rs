//! `faultline device serve|probe`: vfio-user devices as processes, and a client-side view of
//! any vfio-user server.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::{Args as ClapArgs, Subcommand, ValueEnum};
use vfu::client::Client;
use vfu::devices::{dma, gpio, sample};
use vfu::proto;
use vfu::server::Server;

use crate::error::{CliError, CliResult, failed};

/// `faultline device ...`.
#[derive(Subcommand)]
pub enum DeviceCmd {
    /// Serve a device over vfio-user until killed.
    Serve(ServeArgs),
    /// Connect to any vfio-user server and print what a client sees.
    Probe(ProbeArgs),
}

/// A device kind.
#[derive(Clone, Copy, ValueEnum, Debug)]
pub enum Kind {
    /// ACCES PCI-IDIO-16 digital I/O card (Linux `gpio-pci-idio-16` layout).
    Gpio,
    /// DMA copy engine with MSI-X.
    Dma,
    /// The device of libvfio-user's `samples/server` (dead:beef: BAR0 timer, BAR1 with sparse
    /// mmap, INTx, DMA, PRE_COPY migration), so libvfio-user's own client can test us.
    Sample,
}

/// `device serve`.
#[derive(ClapArgs)]
pub struct ServeArgs {
    /// The device.
    kind: Kind,
    /// Its socket.
    #[arg(long)]
    socket: PathBuf,
    /// More devices in the same process: KIND:PATH (repeatable).
    #[arg(long = "also", value_name = "KIND:PATH")]
    also: Vec<String>,
    /// Threads serving clients.
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// GPIO: inputs are not wired to outputs.
    #[arg(long)]
    no_loopback: bool,
    /// Exit when the last client disconnects (as libvfio-user's samples do).
    #[arg(long)]
    once: bool,
}

/// `device probe`.
#[derive(ClapArgs)]
pub struct ProbeArgs {
    /// The server's socket.
    #[arg(long)]
    socket: PathBuf,
    /// Reply timeout, ms.
    #[arg(long, default_value_t = 5000)]
    timeout_ms: u64,
    /// One JSON object instead of text.
    #[arg(long)]
    json: bool,
}

fn add(server: &Server, kind: Kind, path: &std::path::Path, loopback: bool) -> CliResult {
    let realize = || failed(format!("realizing the {kind:?} device"));
    let attach = || failed(format!("serving the {kind:?} device at {}", path.display()));
    match kind {
        Kind::Gpio => {
            let g = gpio::Gpio::new(loopback);
            gpio::Gpio::description()
                .realize(g)
                .map_err(realize())?
                .attach(server, path)
                .map_err(attach())?;
        }
        Kind::Dma => {
            let e = dma::DmaEngine::new();
            dma::DmaEngine::description()
                .realize(Arc::new(dma::DmaOps(e)))
                .map_err(realize())?
                .attach(server, path)
                .map_err(attach())?;
        }
        Kind::Sample => {
            let s = sample::Sample::new();
            let d = sample::Sample::description()
                .realize(s.clone())
                .map_err(realize())?
                .attach(server, path)
                .map_err(attach())?;
            s.start(d.context());
        }
    }
    eprintln!("faultline: serving {kind:?} at {}", path.display());
    Ok(())
}

/// Run `device serve`.
pub fn serve(a: &ServeArgs) -> CliResult {
    let server = Server::new(true).map_err(failed("starting the vfio-user server"))?;
    if a.once {
        server.exit_when_idle();
    }
    add(&server, a.kind, &a.socket, !a.no_loopback)?;
    for spec in &a.also {
        let (k, p) = spec
            .split_once(':')
            .ok_or_else(|| CliError::Usage(format!("--also {spec}: expected KIND:PATH")))?;
        let kind =
            Kind::from_str(k, true).map_err(|e| CliError::Usage(format!("--also {spec}: {e}")))?;
        add(&server, kind, std::path::Path::new(p), !a.no_loopback)?;
    }
    server
        .run_threads(a.threads.clamp(1, 64))
        .map_err(failed("serving"))
}

fn flags(f: u32) -> String {
    let mut v = Vec::new();
    for (b, n) in [
        (proto::REGION_READ, "read"),
        (proto::REGION_WRITE, "write"),
        (proto::REGION_MMAP, "mmap"),
        (proto::REGION_CAPS, "caps"),
    ] {
        if f & b != 0 {
            v.push(n);
        }
    }
    v.join(",")
}

fn region_name(i: u32) -> String {
    match i {
        0..=5 => format!("BAR{i}"),
        proto::PCI_ROM_REGION => "ROM".into(),
        proto::PCI_CONFIG_REGION => "config".into(),
        proto::PCI_VGA_REGION => "VGA".into(),
        _ => format!("region{i}"),
    }
}

const IRQ_NAMES: [&str; 5] = ["INTx", "MSI", "MSI-X", "ERR", "REQ"];

/// Run `device probe`.
pub fn probe(a: &ProbeArgs) -> CliResult {
    let c = Client::connect(&a.socket, Duration::from_millis(a.timeout_ms))
        .map_err(failed("connecting"))?;
    let info = c.device_info();
    let cfg_size = c
        .region(proto::PCI_CONFIG_REGION)
        .map_or(0, |r| r.size.min(4096)) as usize;
    let mut cfg = vec![0u8; cfg_size];
    if cfg_size > 0 {
        c.config_read(0, &mut cfg)
            .map_err(failed("reading config space"))?;
    }
    let mut sizes = [0u64; 6];
    for r in c.regions().iter().take(6) {
        sizes[r.index as usize] = r.size;
    }
    let mig = c
        .migration_flags()
        .map_err(failed("reading the migration capability"))?;
    let (maj, min) = c.version();
    if a.json {
        let regions: Vec<_> = c
            .regions()
            .iter()
            .map(|r| {
                serde_json::json!({
                    "index": r.index, "name": region_name(r.index), "size": r.size,
                    "flags": flags(r.flags), "sparse_mmap": r.sparse, "fd": r.fd.is_some(),
                })
            })
            .collect();
        let irqs: Vec<_> = c
            .irqs()
            .iter()
            .map(|i| serde_json::json!({"index": i.index, "count": i.count, "flags": i.flags}))
            .collect();
        let v = serde_json::json!({
            "version": format!("{maj}.{min}"),
            "caps": c.server_caps(),
            "device_flags": info.flags,
            "regions": regions,
            "irqs": irqs,
            "migration_flags": mig,
            "config": cfg.iter().map(|b| format!("{b:02x}")).collect::<String>(),
            "lspci": pci::lspci::describe_with_sizes("00:00.0", &cfg, &sizes),
        });
        println!("{v}");
        return Ok(());
    }
    let caps = c.server_caps();
    println!("vfio-user {maj}.{min} at {}", a.socket.display());
    println!(
        "  capabilities: max_msg_fds={} max_data_xfer_size={} pgsizes={:#x} max_dma_maps={}{}",
        caps.max_msg_fds,
        caps.max_data_xfer_size,
        caps.pgsizes,
        caps.max_dma_maps,
        caps.migration
            .as_ref()
            .map_or(String::new(), |m| format!(" migration.pgsize={}", m.pgsize))
    );
    println!(
        "  device: flags={:#x}{}{} regions={} irqs={}",
        info.flags,
        if info.flags & proto::DEVICE_FLAGS_PCI != 0 {
            " pci"
        } else {
            ""
        },
        if info.flags & proto::DEVICE_FLAGS_RESET != 0 {
            " reset"
        } else {
            ""
        },
        info.num_regions,
        info.num_irqs
    );
    for r in c.regions() {
        if r.size == 0 {
            continue;
        }
        let sparse: Vec<String> = r
            .sparse
            .iter()
            .map(|(o, s)| format!("{o:#x}+{s:#x}"))
            .collect();
        println!(
            "  region {} {:<6} size {:#x} [{}]{}{}",
            r.index,
            region_name(r.index),
            r.size,
            flags(r.flags),
            if sparse.is_empty() {
                String::new()
            } else {
                format!(" sparse mmap: {}", sparse.join(" "))
            },
            if r.fd.is_some() { " (fd)" } else { "" }
        );
    }
    for i in c.irqs() {
        println!(
            "  irq {} {:<5} count {} flags {:#x}",
            i.index,
            IRQ_NAMES.get(i.index as usize).unwrap_or(&"?"),
            i.count,
            i.flags
        );
    }
    match mig {
        Some(f) => println!("  migration: v2, flags {f:#x} (1 = STOP_COPY)"),
        None => println!("  migration: not offered"),
    }
    println!();
    print!(
        "{}",
        pci::lspci::describe_with_sizes("00:00.0", &cfg, &sizes)
    );
    Ok(())
}
