//! End to end: a fault-injection matrix for migration between real `faultline` processes
//! (64 MiB guests, a 16 MiB hot area, 4 MB/s so that each phase lasts long enough to hit).
//! Faults: the link cut (a relay between source and destination whose connections the test
//! shuts down), the source killed, the destination killed. Phases: the hello (the relay
//! drops every connection at once), a pre-copy round, early post-copy (< 40 % sent), late
//! post-copy (> 60 % sent). For each cell the guest runs on exactly one side with verified
//! memory, or there is a clear error (and, where the guest can still run, it does).
//!
//! Modes: pre-copy and post-copy at their phases, and hybrid at a pre-copy round and late in
//! its post-copy.
//!
//! The moments polling cannot hit (a window of a few ms each) are held open by fail points
//! in the processes (`FAULTLINE_FAILPOINT`, `vmm::migration::failpoint`): the hello at the
//! destination, the source's switchover before its `Switch` frame, the destination holding
//! the `State` frame before it starts the guest, and the end (every page in, before the
//! source's `Verdict`). The test cuts or kills inside the window.

mod common;

use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

/// A relay on a Unix socket to the destination's; [`Relay::cut`] shuts every relayed
/// connection down (a lost link). With `drop_all`, every connection is closed at once.
struct Relay {
    path: PathBuf,
    conns: Arc<Mutex<Vec<UnixStream>>>,
}

impl Relay {
    fn start(path: &Path, to: PathBuf, drop_all: bool) -> Relay {
        let l = UnixListener::bind(path).unwrap();
        let conns: Arc<Mutex<Vec<UnixStream>>> = Arc::default();
        let c = conns.clone();
        std::thread::spawn(move || {
            for s in l.incoming().map_while(Result::ok) {
                if drop_all {
                    drop(s);
                    continue;
                }
                let Ok(up) = UnixStream::connect(&to) else {
                    continue;
                };
                c.lock().unwrap().push(s.try_clone().unwrap());
                c.lock().unwrap().push(up.try_clone().unwrap());
                for (mut a, mut b) in [(s.try_clone().unwrap(), up.try_clone().unwrap()), (up, s)] {
                    std::thread::spawn(move || {
                        let _ = std::io::copy(&mut a, &mut b);
                        let _ = b.shutdown(std::net::Shutdown::Both);
                    });
                }
            }
        });
        Relay {
            path: path.to_owned(),
            conns,
        }
    }

    fn endpoint(&self) -> String {
        format!("unix:{}", self.path.display())
    }

    fn cut(&self) {
        for s in self.conns.lock().unwrap().drain(..) {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Phase {
    Hello,
    PrecopyRound,
    EarlyPostcopy,
    LatePostcopy,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Fault {
    Cut,
    KillSource,
    KillDestination,
}

fn percent(sock: &Path) -> (String, f64) {
    let v = api(sock, "GET", "/migrate");
    (
        v["state"].as_str().unwrap_or("").to_string(),
        v["percent"].as_f64().unwrap_or(0.0),
    )
}

fn wait_phase(sock: &Path, phase: Phase) {
    let t = Instant::now();
    loop {
        let (state, pct) = percent(sock);
        let there = match phase {
            Phase::Hello => true,
            Phase::PrecopyRound => state == "precopy" && pct > 5.0,
            Phase::EarlyPostcopy => state == "postcopy" && pct > 1.0 && pct < 40.0,
            Phase::LatePostcopy => state == "postcopy" && pct > 60.0,
        };
        if there {
            return;
        }
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "{phase:?} never came ({state} {pct}%)"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn runs(sock: &Path) -> bool {
    if api(sock, "GET", "/vm")["state"] != "running" {
        return false;
    }
    let a = heartbeats(sock);
    std::thread::sleep(Duration::from_millis(400));
    heartbeats(sock) > a
}

fn cell(mode: &str, phase: Phase, fault: Fault) {
    eprintln!("cell: {mode} {phase:?} {fault:?}");
    let dir = tempfile::tempdir().unwrap();
    let dst_path = dir.path().join("dst.sock");
    let dst_api = dir.path().join("dst-api.sock");
    let mut dst = destination(
        &format!("unix:{}", dst_path.display()),
        &[
            "--recover-timeout",
            "2",
            "--api-sock",
            dst_api.to_str().unwrap(),
        ],
    );
    let relay = Relay::start(
        &dir.path().join("relay.sock"),
        dst_path.clone(),
        phase == Phase::Hello,
    );
    let (mut src, sock) = source(dir.path());
    let bg = migrate_bg(&sock, &relay.endpoint(), mode, &["--max-bandwidth", "4M"]);
    wait_phase(&sock, phase);
    match fault {
        Fault::Cut => relay.cut(),
        Fault::KillSource => {
            let _ = src.0.kill();
        }
        Fault::KillDestination => {
            let _ = dst.0.kill();
        }
    }
    let before = matches!(phase, Phase::Hello | Phase::PrecopyRound);
    let ctx = format!("{mode} {phase:?} {fault:?}");
    match (before, fault) {
        // Before switchover, with the source alive: it fails and its guest runs on.
        (true, Fault::Cut | Fault::KillDestination) => {
            let (out, _) = bg.join().unwrap();
            assert!(!out.status.success(), "{ctx}: {}", text(&out.stdout));
            let st = api(&sock, "GET", "/migrate");
            assert!(
                st["state"] == "failed" || st["state"] == "cancelled",
                "{ctx}: {st}"
            );
            assert!(st["error"].as_str().is_some_and(|e| !e.is_empty()), "{ctx}");
            assert!(runs(&sock), "{ctx}: the source guest does not run");
            if fault == Fault::Cut {
                // The destination never started a guest: it stops with an error.
                let d = dst.finish(Duration::from_secs(20));
                assert!(!d.status.success(), "{ctx}: {}", text(&d.stderr));
            }
        }
        // Before switchover, the source killed: the destination says so and stops.
        (true, Fault::KillSource) => {
            let d = dst.finish(Duration::from_secs(20));
            let err = text(&d.stderr);
            assert!(!d.status.success(), "{ctx}: {err}");
            assert!(err.contains("before switchover"), "{ctx}: {err}");
            let _ = bg.join();
        }
        // Post-copy, link cut: both sides wait; a resume straight to the destination
        // finishes with verified memory, and the guest runs there only.
        (false, Fault::Cut) => {
            let (out, _) = bg.join().unwrap();
            assert!(!out.status.success(), "{ctx}");
            wait_state(&sock, "postcopy-paused", Duration::from_secs(10));
            let o = output_of(bin_short_deadline().args([
                "migrate",
                "--api-sock",
                sock.to_str().unwrap(),
                "--resume",
                "--to",
                &format!("unix:{}", dst_path.display()),
                "--json",
            ]));
            assert!(o.status.success(), "{ctx}: {}", text(&o.stderr));
            let stats: Value = serde_json::from_str(text(&o.stdout).trim()).unwrap();
            assert_eq!(stats["digest_verified"], true, "{ctx}: {stats}");
            assert!(runs(&dst_api), "{ctx}: the destination guest does not run");
            let so = src.finish(Duration::from_secs(20));
            assert!(text(&so.stdout).contains("\"migrated\":true"), "{ctx}");
        }
        // Post-copy, the destination killed: the guest is lost (part of its memory was
        // only there); the source says so and never runs it again.
        (false, Fault::KillDestination) => {
            let (out, _) = bg.join().unwrap();
            assert!(!out.status.success(), "{ctx}");
            let st = wait_state(&sock, "postcopy-paused", Duration::from_secs(10));
            assert!(
                st["error"].as_str().unwrap_or("").contains("link lost"),
                "{ctx}: {st}"
            );
            if let Ok(None) = src.0.try_wait() {
                assert!(!runs(&sock), "{ctx}: the source guest runs again");
            }
        }
        // Post-copy, the source killed: the destination waits for a recovery, then stops.
        (false, Fault::KillSource) => {
            let d = dst.finish(Duration::from_secs(30));
            let err = text(&d.stderr);
            assert!(!d.status.success(), "{ctx}: {err}");
            assert!(err.contains("did not reconnect within"), "{ctx}: {err}");
            let _ = bg.join();
        }
    }
}

fn output_of(cmd: &mut std::process::Command) -> std::process::Output {
    Proc(
        cmd.stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("spawn"),
    )
    .finish(Duration::from_secs(60))
}

const FAULTS: [Fault; 3] = [Fault::Cut, Fault::KillSource, Fault::KillDestination];

#[test]
fn precopy_faults() {
    cell("precopy", Phase::Hello, Fault::Cut);
    for f in FAULTS {
        cell("precopy", Phase::PrecopyRound, f);
    }
}

#[test]
fn postcopy_faults_early() {
    cell("postcopy", Phase::Hello, Fault::Cut);
    for f in FAULTS {
        cell("postcopy", Phase::EarlyPostcopy, f);
    }
}

#[test]
fn postcopy_faults_late() {
    for f in FAULTS {
        cell("postcopy", Phase::LatePostcopy, f);
    }
}

#[test]
fn hybrid_faults() {
    for f in FAULTS {
        cell("hybrid", Phase::PrecopyRound, f);
    }
    for f in FAULTS {
        cell("hybrid", Phase::LatePostcopy, f);
    }
}

/// A fail point held open in one of the two processes.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Point {
    /// The destination read the hello and holds its answer.
    DestHello,
    /// The source paused its guest and holds the `Switch` frame.
    SourceSwitchover,
    /// The destination read the `State` frame and holds the start of the guest.
    DestState,
    /// Every page is in; the source holds its `Verdict`.
    SourceVerdict,
}

impl Point {
    fn name(self) -> &'static str {
        match self {
            Point::DestHello => "dest-hello",
            Point::SourceSwitchover => "source-switchover",
            Point::DestState => "dest-state",
            Point::SourceVerdict => "source-verdict",
        }
    }

    fn in_source(self) -> bool {
        matches!(self, Point::SourceSwitchover | Point::SourceVerdict)
    }
}

/// How long a point holds: long enough to cut or kill inside, shorter than the link deadline.
const HOLD_MS: u64 = 1500;

fn destination_with(endpoint: &str, extra: &[&str], env: &[(&str, &str)]) -> Proc {
    let mut args = vec!["run", "--incoming", endpoint, "--json-events"];
    args.extend_from_slice(extra);
    Proc(
        bin_short_deadline()
            .envs(env.iter().copied())
            .args(&args)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("start the destination"),
    )
}

/// Wait until the destination's API answers (its guest started); fail with its stderr if it
/// stopped instead.
fn up_or_dead(dst: &mut Proc, api_sock: &Path, ctx: &str) {
    let t = Instant::now();
    while std::os::unix::net::UnixStream::connect(api_sock).is_err() {
        if let Ok(Some(_)) = dst.0.try_wait() {
            let d = std::mem::replace(
                dst,
                Proc(std::process::Command::new("true").spawn().unwrap()),
            )
            .finish(Duration::from_secs(1));
            panic!("{ctx}: the destination stopped: {}", text(&d.stderr));
        }
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "{ctx}: no destination API"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The guest is paused at the source and in doubt; a reclaim runs it there again.
fn reclaim_runs_it_at_the_source(sock: &Path, ctx: &str) {
    let st = api(sock, "GET", "/migrate");
    assert_eq!(st["in_doubt"], true, "{ctx}: {st}");
    assert!(!runs(sock), "{ctx}: the source guest runs while in doubt");
    let o = output_of(bin().args(["migrate", "--api-sock", sock.to_str().unwrap(), "--reclaim"]));
    assert!(o.status.success(), "{ctx}: reclaim: {}", text(&o.stderr));
    assert!(runs(sock), "{ctx}: the reclaimed guest does not run");
}

fn point_cell(mode: &str, point: Point, fault: Fault) {
    eprintln!("point cell: {mode} {point:?} {fault:?}");
    let ctx = format!("{mode} {point:?} {fault:?}");
    let dir = tempfile::tempdir().unwrap();
    let mark = dir.path().join("mark");
    let fp = format!("{}:{HOLD_MS}:{}", point.name(), mark.display());
    let env = [("FAULTLINE_FAILPOINT", fp.as_str())];
    let dst_path = dir.path().join("dst.sock");
    let dst_api = dir.path().join("dst-api.sock");
    let mut dst = destination_with(
        &format!("unix:{}", dst_path.display()),
        &[
            "--recover-timeout",
            "2",
            "--api-sock",
            dst_api.to_str().unwrap(),
        ],
        if point.in_source() { &[] } else { &env },
    );
    let relay = Relay::start(&dir.path().join("relay.sock"), dst_path.clone(), false);
    let (mut src, sock) = source_with(dir.path(), if point.in_source() { &env } else { &[] });
    let bg = migrate_bg(&sock, &relay.endpoint(), mode, &[]);
    let t = Instant::now();
    while !mark.exists() {
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "{ctx}: the point never came"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    match fault {
        Fault::Cut => relay.cut(),
        Fault::KillSource => {
            let _ = src.0.kill();
        }
        Fault::KillDestination => {
            let _ = dst.0.kill();
        }
    }
    match (point, fault) {
        // Before the State frame left, with the source alive: it fails and its guest runs
        // on; the destination never started one and stops with an error.
        (Point::DestHello | Point::SourceSwitchover, Fault::Cut | Fault::KillDestination) => {
            let (out, _) = bg.join().unwrap();
            assert!(!out.status.success(), "{ctx}: {}", text(&out.stdout));
            let st = api(&sock, "GET", "/migrate");
            assert!(
                st["error"].as_str().is_some_and(|e| !e.is_empty()),
                "{ctx}: {st}"
            );
            assert_ne!(st["in_doubt"], true, "{ctx}: {st}");
            assert!(runs(&sock), "{ctx}: the source guest does not run");
            if fault == Fault::Cut {
                let d = dst.finish(Duration::from_secs(30));
                assert!(!d.status.success(), "{ctx}: {}", text(&d.stderr));
            }
        }
        // The source killed before its State frame: the destination says so and stops.
        (Point::DestHello | Point::SourceSwitchover, Fault::KillSource) => {
            let d = dst.finish(Duration::from_secs(30));
            let err = text(&d.stderr);
            assert!(!d.status.success(), "{ctx}: {err}");
            let _ = bg.join();
        }
        // The State frame arrived; the destination holds the start of the guest and loses
        // its peer. Pre-copy: every page is there (checked against the source's digest), so
        // the guest starts there and runs; the source, which never heard so, stays paused
        // and in doubt (its operator stops it). Post-copy: pages only the source has are
        // missing; the destination fails (at once, or after waiting for a recovery), and the
        // source, in doubt, runs the guest again when its operator reclaims it.
        (Point::DestState, Fault::Cut) => {
            let (out, _) = bg.join().unwrap();
            assert!(!out.status.success(), "{ctx}: {}", text(&out.stdout));
            if mode == "precopy" {
                up_or_dead(&mut dst, &dst_api, &ctx);
                assert!(runs(&dst_api), "{ctx}: the destination guest does not run");
                let st = api(&sock, "GET", "/migrate");
                assert_eq!(st["in_doubt"], true, "{ctx}: {st}");
                assert!(!runs(&sock), "{ctx}: the source guest runs as well");
            } else {
                let d = dst.finish(Duration::from_secs(30));
                assert!(!d.status.success(), "{ctx}: {}", text(&d.stderr));
                reclaim_runs_it_at_the_source(&sock, &ctx);
            }
        }
        // The destination killed holding the State frame: the source is in doubt and runs
        // the guest again when its operator reclaims it.
        (Point::DestState, Fault::KillDestination) => {
            let (out, _) = bg.join().unwrap();
            assert!(!out.status.success(), "{ctx}: {}", text(&out.stdout));
            reclaim_runs_it_at_the_source(&sock, &ctx);
        }
        // The source killed once the destination had the State frame: pre-copy moved every
        // page (checked against the source's digest), so the guest runs at the
        // destination; post-copy lacks pages only the source had: the destination stops
        // with an error (its `Resumed` cannot reach the source, which cannot come back).
        (Point::DestState, Fault::KillSource) => {
            let _ = bg.join();
            if mode == "precopy" {
                up_or_dead(&mut dst, &dst_api, &ctx);
                assert!(runs(&dst_api), "{ctx}: the destination guest does not run");
            } else {
                let d = dst.finish(Duration::from_secs(30));
                let err = text(&d.stderr);
                assert!(!d.status.success(), "{ctx}: {err}");
                assert!(
                    err.contains("telling the source the guest runs"),
                    "{ctx}: {err}"
                );
            }
        }
        // Every page is in: the guest runs at the destination whatever happens to the
        // source or the link; the source never runs it again.
        (Point::SourceVerdict, Fault::Cut | Fault::KillSource) => {
            let _ = bg.join();
            assert!(runs(&dst_api), "{ctx}: the destination guest does not run");
            if fault == Fault::Cut {
                let so = src.finish(Duration::from_secs(30));
                assert!(text(&so.stdout).contains("\"migrated\":true"), "{ctx}");
            }
        }
        // The destination killed after every page was in: the guest was there only; the
        // source had handed it over and does not run it again.
        (Point::SourceVerdict, Fault::KillDestination) => {
            let _ = bg.join();
            if let Ok(None) = src.0.try_wait() {
                assert!(!runs(&sock), "{ctx}: the source guest runs again");
            }
        }
    }
}

#[test]
fn precopy_fault_points() {
    for p in [
        Point::SourceSwitchover,
        Point::DestState,
        Point::SourceVerdict,
    ] {
        for f in FAULTS {
            point_cell("precopy", p, f);
        }
    }
}

#[test]
fn postcopy_fault_points() {
    for p in [
        Point::DestHello,
        Point::SourceSwitchover,
        Point::DestState,
        Point::SourceVerdict,
    ] {
        for f in FAULTS {
            point_cell("postcopy", p, f);
        }
    }
}

#[test]
fn hybrid_fault_points() {
    for f in FAULTS {
        point_cell("hybrid", Point::DestState, f);
    }
}
