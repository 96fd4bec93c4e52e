//! `faultline snapshot`, `faultline restore` and `faultline page-server` (serves only the
//! snapshot directories named on its command line, several VMs at once, each hand-off within a
//! deadline).

use std::io::Read;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::time::Duration;

use memx::{Completer, Fill, PageSource, Request, SourceError};
use vmm::restore::{
    AfterRestore, HANDOFF_PROTOCOL, HANDOFF_VERSION, Handoff, HandoffReply, RestoreMode,
    RestoreOptions, recv_msg, send_msg,
};

use crate::error::{CliError, CliResult, failed};

/// `faultline snapshot` options.
#[derive(clap::Args)]
pub struct SnapshotArgs {
    /// The running VM's API socket (`faultline run --api-sock`).
    #[arg(long)]
    api_sock: PathBuf,
    /// Directory to write the snapshot into (created if missing).
    #[arg(long)]
    out: PathBuf,
    /// Record a CRC-32 per page too (lets a restore catch an external handler serving wrong
    /// pages).
    #[arg(long)]
    page_checksums: bool,
}

/// A minimal HTTP/1.1 request over a Unix socket (what `curl --unix-socket` does).
/// One request to a VM's API socket (see [`vmm::api::call`]).
pub fn http_unix(
    sock: &std::path::Path,
    method: &str,
    path: &str,
    body: &str,
    timeout: Duration,
) -> CliResult<(u16, String)> {
    vmm::api::call(sock, method, path, body, timeout).map_err(failed(format!("{method} {path}")))
}

pub fn snapshot(a: &SnapshotArgs) -> CliResult {
    let dir = std::path::absolute(&a.out).map_err(failed("--out"))?;
    let body = serde_json::json!({ "snapshot_dir": dir, "page_checksums": a.page_checksums });
    let sock = a.api_sock.clone();
    let call = std::thread::spawn(move || {
        http_unix(
            &sock,
            "PUT",
            "/snapshot/create",
            &body.to_string(),
            Duration::from_secs(600),
        )
    });
    let mut progress = crate::progress::Progress::spinner("snapshot");
    let t = std::time::Instant::now();
    while !call.is_finished() {
        progress.update(
            0.0,
            &format!(
                "writing {} ({:.1} s)",
                dir.display(),
                t.elapsed().as_secs_f64()
            ),
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let r = call
        .join()
        .map_err(|_| CliError::Check("the snapshot request thread panicked".into()))?;
    progress.finish(&format!(
        "{} in {:.1} s",
        if r.as_ref().is_ok_and(|(c, _)| *c == 200) {
            "written"
        } else {
            "failed"
        },
        t.elapsed().as_secs_f64()
    ));
    let (code, body) = r?;
    if code != 200 {
        return Err(CliError::Check(format!("snapshot failed ({code}): {body}")));
    }
    println!("{body}");
    Ok(())
}

/// `faultline restore` options.
#[derive(clap::Args)]
pub struct RestoreArgs {
    /// The snapshot directory.
    dir: PathBuf,
    /// eager, mmap, lazy or prefetch.
    #[arg(long, default_value = "lazy")]
    mode: RestoreMode,
    /// Instead of resuming the guest where it was paused, run `verify` over every slice and
    /// check the checksum against the one taken at snapshot.
    #[arg(long)]
    verify: bool,
    /// Hand the userfaultfd to the external handler listening here (`faultline page-server`).
    #[arg(long)]
    page_handler: Option<PathBuf>,
    /// Seconds to wait for the page handler to connect and answer, and then the longest a page
    /// fault may stay unread by it: a handler past that is stuck, and the VM stops with an
    /// error (the VMM takes the userfaultfd back).
    #[arg(long, default_value_t = 5)]
    handler_timeout: u64,
    /// Pages served per fault by the in-process fault loop.
    #[arg(long, default_value_t = 16)]
    batch_pages: usize,
    /// Record the working set of a lazy restore (prefetch restores record when none exists).
    #[arg(long)]
    record: bool,
    /// Serve the control API on this Unix socket (snapshots of the restored VM, stop, ...).
    #[arg(long)]
    api_sock: Option<PathBuf>,
    /// Print each guest event as a JSON line.
    #[arg(long)]
    json_events: bool,
    /// Stop the VM after this many seconds (default: when the workload ends, or --timeout).
    #[arg(long)]
    seconds: Option<f64>,
    /// Give up after this many seconds.
    #[arg(long, default_value_t = 3600)]
    timeout: u64,
    /// The backends of the snapshot's devices (one per device, same kinds, same order).
    #[command(flatten)]
    devices: crate::run::DeviceArgs,
}

pub fn restore(a: &RestoreArgs) -> CliResult {
    let opts = RestoreOptions {
        mode: a.mode,
        then: if a.verify {
            AfterRestore::Verify
        } else {
            AfterRestore::Resume
        },
        page_handler: a.page_handler.clone(),
        handler_timeout: Duration::from_secs(a.handler_timeout),
        batch_pages: a.batch_pages,
        record: a.record,
        virtio: a.devices.specs(),
        console: a.devices.console.clone(),
        vfio_user: a.devices.vfio_user.clone(),
    };
    let r = vmm::restore::restore(&a.dir, &opts).map_err(failed("restore"))?;
    let expect = r.checksums.clone();
    let heartbeats = r.heartbeats.clone();
    let index = r.index.clone();
    let r_vcpus = r.checksums.len();
    let running =
        vmm::RunningVm::start_with(r.vm, r.pager).map_err(failed("starting the restored VM"))?;
    let mem = running.memory().clone();
    let slices: Vec<(u64, u64, u64)> = (0..r_vcpus).map(|i| running.slice(i)).collect();
    let _api = match &a.api_sock {
        Some(p) => Some(
            vmm::api::ApiServer::start(p, running.api_sender())
                .map_err(failed(format!("API socket {}", p.display())))?,
        ),
        None => None,
    };
    if let Some(secs) = a.seconds {
        if !(secs > 0.0 && secs < 1e6) {
            return Err(CliError::Usage("--seconds must be positive".into()));
        }
        let sender = running.api_sender();
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_secs_f64(secs));
            let _ = sender.ask(
                vmm::controller::Command::Stop,
                Some(Duration::from_secs(30)),
            );
        });
    }
    let json = a.json_events;
    let mut first_resumed_hb = None;
    // The prefetch's progress, until it is done (a bar on a terminal, lines otherwise).
    let mut prefetch = running.prefetch_progress().map(|(h, total)| {
        (
            h,
            total.max(1),
            crate::progress::Progress::new("prefetch"),
            false,
        )
    });
    let summary = {
        let r = running.wait(Duration::from_secs(a.timeout), |e| {
            if let Some((h, total, p, done)) = &mut prefetch
                && !*done
            {
                let n = h.pages();
                let msg = format!("{n} of {total} working-set pages in");
                if n >= *total {
                    p.finish(&msg);
                    *done = true;
                } else {
                    p.update(n as f64 * 100.0 / *total as f64, &msg);
                }
            }
            if let vmm::Event::Heartbeat { vcpu, n, .. } = e
                && first_resumed_hb.is_none()
                && *n > 0
            {
                first_resumed_hb = Some((*vcpu, *n));
            }
            if json {
                println!("{}", serde_json::to_string(e).expect("events serialise"));
            }
        });
        r.map_err(failed("running the restored VM"))?
    };
    let mut verified = None;
    let mut pages_checked = None;
    if a.verify && index.page_crc.is_some() {
        // `verify` only reads: every page must still be exactly what the snapshot holds.
        let ranges: Vec<(u64, u64)> = (0..summary.vcpus.len())
            .map(|i| {
                let (start, len, _) = slices[i];
                (start, len)
            })
            .collect();
        // SAFETY: the vCPUs have stopped; nothing writes guest memory any more.
        let n = unsafe { vmm::snapshot::check_pages(&mem, &index, &ranges) }
            .map_err(failed("the page handler served wrong data"))?;
        pages_checked = Some(n);
    }
    if a.verify {
        for (i, v) in summary.vcpus.iter().enumerate() {
            let got = v.checksum;
            if got != expect.get(i).copied() {
                return Err(CliError::Check(format!(
                    "vCPU {i}: verify reports {} but the snapshot recorded {:#018x}: restored memory differs",
                    v.checksum.map_or("nothing".into(), vmm::hex::fmt),
                    expect.get(i).copied().unwrap_or(0)
                )));
            }
        }
        verified = Some(true);
    }
    let line = serde_json::json!({
        "event": "restored",
        "mode": a.mode.name(),
        "first_instruction_ms": summary.first_run_us.map(|t| t as f64 / 1e3),
        "snapshot_heartbeats": heartbeats,
        "first_heartbeat_after_restore": first_resumed_hb.map(|(v, n)| serde_json::json!({"vcpu": v, "n": n})),
        "verify_matches_snapshot": verified,
        "pages_checked_against_snapshot": pages_checked,
        "summary": summary,
    });
    println!("{line}");
    Ok(())
}

/// `faultline page-server` options.
#[derive(clap::Args)]
pub struct PageServerArgs {
    /// Listen on this Unix socket.
    #[arg(long)]
    socket: PathBuf,
    /// A snapshot directory this server may serve (repeat for more). A VMM that names any
    /// other directory in its hand-off is refused.
    #[arg(long = "snapshot-dir", required = true)]
    snapshot_dirs: Vec<PathBuf>,
    /// Serve one VM, then exit (default: serve VMs, several at once, forever).
    #[arg(long)]
    once: bool,
    /// VMs served at once; a VMM beyond that is refused in its hand-off answer.
    #[arg(long, default_value_t = 8)]
    max_vms: usize,
    /// Seconds a connecting VMM has to send its hand-off, and to take the answer.
    #[arg(long, default_value_t = 10)]
    handoff_timeout: u64,
    /// Pages served per fault.
    #[arg(long, default_value_t = 16)]
    batch_pages: usize,
    /// Testing only: flip a byte in every Nth data page served (a handler that lies).
    #[arg(long, hide = true)]
    corrupt_every: Option<u64>,
}

/// A source that lies: flips one byte of every `every`th data answer.
struct Corrupting {
    inner: vmm::snapshot::SnapshotSource,
    every: u64,
    n: std::sync::atomic::AtomicU64,
}

impl PageSource for Corrupting {
    fn fetch<'a>(
        &self,
        req: &Request,
        scratch: &'a mut [u8],
        done: &Completer,
    ) -> Result<Fill<'a>, SourceError> {
        let lie = self.n.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % self.every == 0;
        let len = match self.inner.fetch(req, scratch, done)? {
            Fill::Bytes(b) => b.len(),
            Fill::Zero { pages } => return Ok(Fill::Zero { pages }),
            Fill::Present { pages } => return Ok(Fill::Present { pages }),
            Fill::Pending => return Ok(Fill::Pending),
        };
        if lie {
            scratch[8] ^= 0x5a;
        }
        Ok(Fill::Bytes(&scratch[..len]))
    }
}

/// Answer a hand-off with a refusal.
fn refuse_handoff(conn: &UnixStream, why: String) {
    let _ = send_msg(
        conn,
        &HandoffReply {
            version: HANDOFF_VERSION,
            ok: false,
            error: Some(why),
        },
        None,
    );
}

fn serve_one(conn: UnixStream, a: &PageServerArgs, allowed: &[PathBuf]) -> CliResult {
    // The hand-off, and our answer, within the deadline; then the connection stays open for
    // as long as the VM runs (no deadline: its close is the signal).
    let deadline = Some(Duration::from_secs(a.handoff_timeout.max(1)));
    conn.set_read_timeout(deadline)
        .and_then(|()| conn.set_write_timeout(deadline))
        .map_err(failed("socket setup"))?;
    let (h, fd) = recv_msg::<Handoff>(&conn).map_err(failed("hand-off"))?;
    let refuse = |e: CliError| {
        let _ = send_msg(
            &conn,
            &HandoffReply {
                version: HANDOFF_VERSION,
                ok: false,
                error: Some(uffd::error_chain(&e)),
            },
            None,
        );
        e
    };
    if h.protocol != HANDOFF_PROTOCOL || h.version != HANDOFF_VERSION {
        return Err(refuse(CliError::Usage(format!(
            "hand-off {} version {}; this handler speaks {HANDOFF_PROTOCOL} version {HANDOFF_VERSION}",
            h.protocol, h.version
        ))));
    }
    let Some(fd) = fd else {
        return Err(refuse(CliError::Usage(
            "no userfaultfd came with the hand-off".into(),
        )));
    };
    let named = std::fs::canonicalize(&h.snapshot_dir).unwrap_or_else(|_| h.snapshot_dir.clone());
    if !allowed.contains(&named) {
        return Err(refuse(CliError::Usage(format!(
            "snapshot directory {} is not served here (this page server serves only the --snapshot-dir it was started with)",
            h.snapshot_dir.display()
        ))));
    }
    let loaded =
        vmm::snapshot::load(&named).map_err(|e| refuse(failed("loading the snapshot")(e)))?;
    let uffd = uffd::Uffd::from_owned_fd(fd, uffd::Features::from_bits_retain(h.uffd_features));
    let mut regions = Vec::new();
    for m in &h.mappings {
        let range = uffd::Range::new(m.base_host_virt_addr as usize, m.size as usize)
            .map_err(|e| refuse(failed("mapping")(e)))?;
        regions.push(memx::Region {
            range,
            offset: m.offset,
        });
    }
    let source =
        vmm::snapshot::SnapshotSource::new(loaded.memory, std::sync::Arc::new(loaded.index), false);
    let cfg = memx::Config {
        threads: 1,
        batch_pages: a.batch_pages.max(1),
        ..Default::default()
    };
    let shards = vec![(uffd, regions)];
    let fl = match a.corrupt_every {
        Some(every) => memx::FaultLoop::serve_remote(
            shards,
            Corrupting {
                inner: source,
                every: every.max(1),
                n: Default::default(),
            },
            cfg,
        ),
        None => memx::FaultLoop::serve_remote(shards, source, cfg),
    }
    .map_err(|e| refuse(failed("serving the userfaultfd")(e)))?;
    send_msg(
        &conn,
        &HandoffReply {
            version: HANDOFF_VERSION,
            ok: true,
            error: None,
        },
        None,
    )
    .map_err(failed("answering the VMM"))?;
    conn.set_read_timeout(None)
        .map_err(failed("socket setup"))?;
    eprintln!(
        "page-server: serving VMM pid {} from {}",
        h.vmm_pid,
        h.snapshot_dir.display()
    );
    // Serve until the VMM closes the connection (it exited or finished).
    let mut b = [0u8; 64];
    while matches!((&conn).read(&mut b), Ok(n) if n > 0) {}
    let stats = fl.stop().map_err(failed("stopping the fault loop"))?;
    eprintln!(
        "page-server: VMM pid {} gone; {} faults, {} pages, fault p50 {:.1} us",
        h.vmm_pid,
        stats.faults,
        stats.pages,
        stats.latency.p50_ns as f64 / 1e3
    );
    Ok(())
}

pub fn page_server(a: &PageServerArgs) -> CliResult {
    let allowed = a
        .snapshot_dirs
        .iter()
        .map(|d| {
            std::fs::canonicalize(d).map_err(failed(format!("--snapshot-dir {}", d.display())))
        })
        .collect::<CliResult<Vec<PathBuf>>>()?;
    if a.socket.exists() {
        std::fs::remove_file(&a.socket).map_err(failed(format!("{}", a.socket.display())))?;
    }
    let l = UnixListener::bind(&a.socket)
        .map_err(failed(format!("cannot listen on {}", a.socket.display())))?;
    eprintln!("page-server: listening on {}", a.socket.display());
    let active = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    std::thread::scope(|scope| {
        for conn in l.incoming() {
            let conn = conn.map_err(failed("accept"))?;
            if a.once {
                let r = serve_one(conn, a, &allowed);
                if let Err(e) = &r {
                    eprintln!("page-server: {}", uffd::error_chain(e));
                }
                return r;
            }
            use std::sync::atomic::Ordering::SeqCst;
            if active.fetch_add(1, SeqCst) >= a.max_vms.max(1) {
                active.fetch_sub(1, SeqCst);
                let _ = conn.set_write_timeout(Some(Duration::from_secs(1)));
                refuse_handoff(
                    &conn,
                    format!(
                        "this page server is serving {} VMs already (--max-vms)",
                        a.max_vms
                    ),
                );
                eprintln!(
                    "page-server: refused a VMM: --max-vms {} reached",
                    a.max_vms
                );
                continue;
            }
            let (active, allowed) = (active.clone(), &allowed);
            scope.spawn(move || {
                if let Err(e) = serve_one(conn, a, allowed) {
                    eprintln!("page-server: {}", uffd::error_chain(&e));
                }
                active.fetch_sub(1, SeqCst);
            });
        }
        Ok(())
    })
}
