//! End to end: live migration between two `faultline` processes, as a user runs it. Real KVM,
//! real userfaultfd, real TCP and Unix sockets. Every mode with `dirty` and `random` on 1 and 2
//! vCPUs (the destination runs `verify` at switchover and must match the source's memory); a
//! post-copy link cut and resumed; a source killed during post-copy; pre-copy link loss; bad
//! streams.

mod common;

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{Proc, api, bin, kvm_present, text, wait_for};
use serde_json::Value;

/// Start a source VM with an API socket; wait until every vCPU beats.
fn source(dir: &Path, vcpus: u32, guest: &str) -> (Proc, PathBuf) {
    kvm_present();
    let sock = dir.join("src.sock");
    let child = bin()
        .args([
            "run",
            "--mem",
            "64M",
            "--workload-mem",
            "16M",
            "--vcpus",
            &vcpus.to_string(),
            "--guest",
            guest,
            "--seconds",
            "120",
            "--api-sock",
            sock.to_str().unwrap(),
            "--json-events",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the source");
    let p = Proc(child);
    wait_for(&sock);
    let t = Instant::now();
    loop {
        let st = api(&sock, "GET", "/vm/stats");
        if st["vcpus"]
            .as_array()
            .is_some_and(|v| v.iter().all(|c| c["heartbeats"].as_u64() >= Some(2)))
        {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "source never beat: {st}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    (p, sock)
}

fn destination(endpoint: &str, extra: &[&str]) -> Proc {
    let mut args = vec!["run", "--incoming", endpoint, "--json-events"];
    args.extend_from_slice(extra);
    // Plain TCP here (these tests are about the migration; `migrate_tls.rs` is about TLS).
    if endpoint.starts_with("tcp:") {
        args.push("--insecure");
    }
    Proc(
        bin()
            .args(&args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start the destination"),
    )
}

fn migrate(sock: &Path, to: &str, mode: &str, extra: &[&str]) -> Output {
    let mut args = vec![
        "migrate",
        "--api-sock",
        sock.to_str().unwrap(),
        "--to",
        to,
        "--mode",
        mode,
        "--json",
    ];
    args.extend_from_slice(extra);
    if to.starts_with("tcp:") {
        args.push("--insecure");
    }
    output_within(bin().args(&args), Duration::from_secs(120))
}

/// Run a command; kill it if it takes longer than `t` (a hang fails the test, not CI).
fn output_within(cmd: &mut Command, t: Duration) -> Output {
    let p = Proc(
        cmd.stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn"),
    );
    let start = Instant::now();
    let out = p.finish(t);
    assert!(start.elapsed() < t, "command hung for {t:?}");
    out
}

fn summary(out: &Output) -> Value {
    text(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find(|v| v["event"] == "summary")
        .unwrap_or(Value::Null)
}

/// Migrate with `verify` at the destination and check everything the issue asks.
fn verified_migration(mode: &str, guest: &str, vcpus: u32) {
    let dir = tempfile::tempdir().unwrap();
    let ep = format!("unix:{}", dir.path().join("mig.sock").display());
    let dst = destination(&ep, &["--verify"]);
    let (src, sock) = source(dir.path(), vcpus, guest);
    let out = migrate(&sock, &ep, mode, &["--downtime-limit-ms", "2000"]);
    let stats: Value = serde_json::from_str(text(&out.stdout).trim()).unwrap_or(Value::Null);
    assert!(
        out.status.success(),
        "{mode} {guest} x{vcpus}: {}\n{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    assert_eq!(stats["digest_verified"], true, "{stats}");
    assert_eq!(stats["mode"], mode);
    if mode != "postcopy" {
        assert!(stats["dirty_sync_rounds"].as_u64() >= Some(1), "{stats}");
    }
    if mode == "postcopy" {
        assert_eq!(stats["dirty_sync_rounds"], 0);
        // Zero pages never travel as bytes: at most the hot area (plus tables) is sent.
        assert!(stats["pages"].as_u64().unwrap() < 8192, "{stats}");
    }
    assert!(stats["downtime_ms"].as_f64().unwrap() < 5000.0, "{stats}");
    let d = dst.finish(Duration::from_secs(60));
    let s = summary(&d);
    assert!(
        d.status.success(),
        "destination: {}\n{}",
        text(&d.stdout),
        text(&d.stderr)
    );
    assert_eq!(s["summary"]["matches_source"], true, "{s}");
    assert_eq!(s["summary"]["checksums_verified"], true, "{s}");
    // The source ends once the guest has left.
    let so = src.finish(Duration::from_secs(20));
    let ss = summary(&so);
    assert_eq!(ss["summary"]["migrated"], true, "{}", text(&so.stdout));
}

#[test]
fn precopy_dirty_and_random_1_and_2_vcpus() {
    for (g, n) in [("dirty", 1), ("random", 2), ("random", 1), ("dirty", 2)] {
        verified_migration("precopy", g, n);
    }
}

#[test]
fn postcopy_dirty_and_random_1_and_2_vcpus() {
    for (g, n) in [("dirty", 1), ("random", 2), ("random", 1), ("dirty", 2)] {
        verified_migration("postcopy", g, n);
    }
}

#[test]
fn hybrid_dirty_and_random_1_and_2_vcpus() {
    for (g, n) in [("dirty", 2), ("random", 1), ("random", 2), ("dirty", 1)] {
        verified_migration("hybrid", g, n);
    }
}

/// The main job: the guest goes on at the destination (resumed, not `verify`), the memory
/// digest matches, and heartbeats continue where they stopped.
#[test]
fn demo_migrates_a_running_guest() {
    kvm_present();
    let o = output_within(
        bin().args([
            "demo",
            "--mem-mib",
            "128",
            "--hot-mib",
            "32",
            "--vcpus",
            "2",
            "--json",
        ]),
        Duration::from_secs(120),
    );
    assert!(
        o.status.success(),
        "{}\n{}",
        text(&o.stdout),
        text(&o.stderr)
    );
    let v: Value = serde_json::from_str(text(&o.stdout).trim()).unwrap();
    let m = &v["migration"];
    assert_eq!(m["digest_verified"], true, "{m}");
    assert!(m["max_pause_ms"].as_f64().is_some(), "{m}");
    let first = m["destination"]["first_heartbeats"].as_array().unwrap();
    assert_eq!(first.len(), 2);
    assert!(first.iter().all(|h| h.as_u64() >= Some(3)), "{m}");
    // The destination ran on and stopped through its API, with a clean summary.
    assert_eq!(v["destination_summary"]["summary"]["stopped"], true, "{v}");
}

/// A TCP proxy whose connections the test can cut (a lost link).
struct Proxy {
    port: u16,
    conns: Arc<Mutex<Vec<TcpStream>>>,
}

impl Proxy {
    fn start(to: u16) -> Proxy {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let conns: Arc<Mutex<Vec<TcpStream>>> = Arc::default();
        let c = conns.clone();
        std::thread::spawn(move || {
            for s in l.incoming().map_while(Result::ok) {
                let Ok(up) = TcpStream::connect(("127.0.0.1", to)) else {
                    continue;
                };
                c.lock().unwrap().push(s.try_clone().unwrap());
                c.lock().unwrap().push(up.try_clone().unwrap());
                for (mut a, mut b) in [(s.try_clone().unwrap(), up.try_clone().unwrap()), (up, s)] {
                    std::thread::spawn(move || {
                        let _ = std::io::copy(&mut a, &mut b);
                        let _ = b.shutdown(Shutdown::Both);
                    });
                }
            }
        });
        Proxy { port, conns }
    }

    fn cut(&self) {
        for s in self.conns.lock().unwrap().drain(..) {
            let _ = s.shutdown(Shutdown::Both);
        }
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn wait_state(sock: &Path, want: &str, t: Duration) -> Value {
    let start = Instant::now();
    loop {
        let v = api(sock, "GET", "/migrate");
        if v["state"] == want {
            return v;
        }
        assert!(start.elapsed() < t, "never reached {want}: {v}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Post-copy over a link that is cut mid-way: the source pauses the migration, the destination
/// waits, `faultline migrate --resume` reconnects and finishes; memory still verifies.
#[test]
fn postcopy_link_cut_and_resumed() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let dst = destination(&format!("tcp:127.0.0.1:{port}"), &["--verify"]);
    let proxy = Proxy::start(port);
    let (src, sock) = source(dir.path(), 2, "dirty");
    let to = format!("tcp:127.0.0.1:{}", proxy.port);
    let bg = {
        let sock = sock.clone();
        let to = to.clone();
        // 2 MB/s: the 16 MiB hot area takes about 8 s.
        std::thread::spawn(move || migrate(&sock, &to, "postcopy", &["--max-bandwidth", "2M"]))
    };
    wait_state(&sock, "postcopy", Duration::from_secs(30));
    std::thread::sleep(Duration::from_millis(1500));
    proxy.cut();
    let paused = wait_state(&sock, "postcopy-paused", Duration::from_secs(10));
    assert!(
        paused["error"].as_str().unwrap().contains("--resume"),
        "{paused}"
    );
    let first = bg.join().unwrap();
    assert!(!first.status.success());
    assert!(
        text(&first.stderr).contains("postcopy-paused"),
        "{}",
        text(&first.stderr)
    );
    // Resume, this time without a cap.
    let out = output_within(
        bin().args([
            "migrate",
            "--api-sock",
            sock.to_str().unwrap(),
            "--resume",
            "--json",
        ]),
        Duration::from_secs(120),
    );
    assert!(
        out.status.success(),
        "{}\n{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    let stats: Value = serde_json::from_str(text(&out.stdout).trim()).unwrap();
    assert_eq!(stats["recoveries"], 1, "{stats}");
    assert_eq!(stats["digest_verified"], true, "{stats}");
    let d = dst.finish(Duration::from_secs(60));
    assert!(d.status.success(), "{}", text(&d.stderr));
    assert!(
        text(&d.stderr).contains("post-copy link lost"),
        "{}",
        text(&d.stderr)
    );
    assert_eq!(summary(&d)["summary"]["matches_source"], true);
    drop(src);
}

/// The source is killed during post-copy: the destination says so and stops after its recovery
/// timeout instead of hanging.
#[test]
fn source_killed_during_postcopy() {
    let dir = tempfile::tempdir().unwrap();
    let ep = format!("unix:{}", dir.path().join("mig.sock").display());
    let dst = destination(&ep, &["--recover-timeout", "2"]);
    let (mut src, sock) = source(dir.path(), 1, "dirty");
    let s2 = sock.clone();
    let e2 = ep.clone();
    let bg = std::thread::spawn(move || migrate(&s2, &e2, "postcopy", &["--max-bandwidth", "1M"]));
    wait_state(&sock, "postcopy", Duration::from_secs(30));
    std::thread::sleep(Duration::from_millis(500));
    let _ = src.0.kill();
    let t = Instant::now();
    let d = dst.finish(Duration::from_secs(30));
    assert!(
        t.elapsed() < Duration::from_secs(25),
        "the destination hung"
    );
    let err = text(&d.stderr);
    assert!(!d.status.success(), "{err}");
    // A killed source closes its sockets; with requests still unread in its buffer the
    // destination reads a reset instead of the end of the stream.
    assert!(
        err.contains("closed the connection") || err.contains("Connection reset by peer"),
        "{err}"
    );
    assert!(err.contains("did not reconnect within"), "{err}");
    let _ = bg.join();
}

/// Pre-copy over a link that drops: the migration fails, the source guest keeps running.
#[test]
fn precopy_link_lost_source_runs_on() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let dst = destination(&format!("tcp:127.0.0.1:{port}"), &[]);
    let proxy = Proxy::start(port);
    let (src, sock) = source(dir.path(), 1, "dirty");
    let to = format!("tcp:127.0.0.1:{}", proxy.port);
    let s2 = sock.clone();
    let bg = std::thread::spawn(move || migrate(&s2, &to, "precopy", &["--max-bandwidth", "1M"]));
    wait_state(&sock, "precopy", Duration::from_secs(30));
    std::thread::sleep(Duration::from_millis(500));
    proxy.cut();
    let out = bg.join().unwrap();
    assert!(!out.status.success());
    let v = api(&sock, "GET", "/vm");
    assert_eq!(v["state"], "running", "{v}");
    let hb = |v: &Value| v["vcpus"][0]["heartbeats"].as_u64().unwrap();
    let a = hb(&api(&sock, "GET", "/vm/stats"));
    std::thread::sleep(Duration::from_millis(400));
    let b = hb(&api(&sock, "GET", "/vm/stats"));
    assert!(b > a, "the source guest stopped beating ({a} -> {b})");
    let d = dst.finish(Duration::from_secs(20));
    assert!(!d.status.success());
    assert!(
        text(&d.stderr).contains("before switchover"),
        "{}",
        text(&d.stderr)
    );
    drop(src);
}

/// Frame header bytes, as the wire format documents them.
fn frame(kind: u8, len: u32, arg: u64) -> Vec<u8> {
    let mut b = vec![kind, 0];
    b.extend_from_slice(&0x464cu16.to_le_bytes());
    b.extend_from_slice(&len.to_le_bytes());
    b.extend_from_slice(&arg.to_le_bytes());
    b
}

fn hello_json(version: u32) -> String {
    format!(
        r#"{{"protocol":"faultline-migrate","version":{version},"id":1,"channel":"main","mode":"postcopy","config":{{"mem_bytes":67108864,"vcpus":1,"workload":"dirty","workload_bytes":null,"run_for":null,"seed":1,"backend":"anonymous","linux":null}}}}"#
    )
}

fn try_read_frame(s: &mut impl Read) -> Option<(u8, Vec<u8>)> {
    let mut h = [0u8; 16];
    s.read_exact(&mut h).ok()?;
    let len = u32::from_le_bytes(h[4..8].try_into().unwrap());
    let mut b = vec![0; len as usize];
    s.read_exact(&mut b).ok()?;
    Some((h[0], b))
}

fn read_frame(s: &mut impl Read) -> (u8, Vec<u8>) {
    let mut h = [0u8; 16];
    s.read_exact(&mut h).unwrap();
    let len = u32::from_le_bytes(h[4..8].try_into().unwrap());
    let mut b = vec![0; len as usize];
    s.read_exact(&mut b).unwrap();
    (h[0], b)
}

/// A destination refuses a wrong protocol version with its own version, and garbage with a
/// clear error; neither crashes it or leaves it hanging.
#[test]
fn bad_streams_are_refused() {
    kvm_present();
    // Unix sockets: a TCP port picked ahead could be taken meanwhile (or self-connected).
    // Wrong version.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("mig.sock");
    let _ = std::fs::remove_file(&path);
    let dst = destination(&format!("unix:{}", path.display()), &[]);
    let mut s = connect(&path);
    let body = hello_json(99);
    s.write_all(&frame(1, body.len() as u32, 0)).unwrap();
    s.write_all(body.as_bytes()).unwrap();
    // The refusal names both versions (unless the exiting destination's close overtakes it;
    // its stderr says the same).
    if let Some((kind, ack)) = try_read_frame(&mut s) {
        assert_eq!(kind, 2);
        let ack: Value = serde_json::from_slice(&ack).unwrap();
        assert_eq!(ack["ok"], false);
        assert_eq!(ack["version"], 1);
        assert!(
            ack["error"].as_str().unwrap().contains("version 99"),
            "{ack}"
        );
    }
    let d = dst.finish(Duration::from_secs(10));
    assert!(!d.status.success());
    assert!(
        text(&d.stderr).contains("version 99"),
        "{}",
        text(&d.stderr)
    );

    // Not a migration stream at all.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("mig.sock");
    let _ = std::fs::remove_file(&path);
    let dst = destination(&format!("unix:{}", path.display()), &[]);
    let mut s = connect(&path);
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let d = dst.finish(Duration::from_secs(10));
    assert!(!d.status.success());
    assert!(
        text(&d.stderr).contains("bad frame magic"),
        "{}",
        text(&d.stderr)
    );

    // A valid hello, then pages outside guest memory.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("mig.sock");
    let _ = std::fs::remove_file(&path);
    let dst = destination(&format!("unix:{}", path.display()), &[]);
    let mut s = connect(&path);
    let body = hello_json(1);
    s.write_all(&frame(1, body.len() as u32, 0)).unwrap();
    s.write_all(body.as_bytes()).unwrap();
    let (_, ack) = read_frame(&mut s);
    assert_eq!(serde_json::from_slice::<Value>(&ack).unwrap()["ok"], true);
    let mut p = connect(&path);
    let ph = r#"{"protocol":"faultline-migrate","version":1,"id":1,"channel":"priority","mode":"postcopy"}"#;
    p.write_all(&frame(1, ph.len() as u32, 0)).unwrap();
    p.write_all(ph.as_bytes()).unwrap();
    let _ = read_frame(&mut p);
    s.write_all(&frame(3, 4096, 1 << 40)).unwrap();
    s.write_all(&[7u8; 4096]).unwrap();
    // The answer is an Error frame, unless the exiting destination's close overtakes it.
    let mut h = [0u8; 16];
    if s.read_exact(&mut h).is_ok() {
        assert_eq!(h[0], 13, "an Error frame");
    }
    let d = dst.finish(Duration::from_secs(10));
    assert!(!d.status.success());
    assert!(
        text(&d.stderr).contains("outside guest memory"),
        "{}",
        text(&d.stderr)
    );
}

fn connect(path: &Path) -> std::os::unix::net::UnixStream {
    let t = Instant::now();
    loop {
        if let Ok(s) = std::os::unix::net::UnixStream::connect(path) {
            return s;
        }
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "no listener on {}",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A source asked to migrate to something that is not a faultline destination refuses
/// before pausing the guest, and the guest runs on.
#[test]
fn migrating_to_a_non_destination_fails_before_pausing() {
    let dir = tempfile::tempdir().unwrap();
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for mut s in l.incoming().map_while(Result::ok) {
            let _ = s.write_all(b"SSH-2.0-OpenSSH_9.2\r\n");
        }
    });
    let (src, sock) = source(dir.path(), 1, "dirty");
    let out = migrate(&sock, &format!("tcp:127.0.0.1:{port}"), "postcopy", &[]);
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(err.contains("failed"), "{err}");
    assert_eq!(api(&sock, "GET", "/vm")["state"], "running");
    drop(src);
}

/// A VM restored lazily holds most of its memory in the snapshot file, not in the process,
/// until the guest touches it: a migration of it must still send every page (the kernel's
/// page table cannot tell which pages hold data). `read` touches one page in 64 every 100 ms.
#[test]
fn a_lazily_restored_vm_migrates_whole() {
    for mode in ["precopy", "postcopy"] {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let snap = d.join("snap");
        common::make_snapshot_of(d, &snap, "read");
        let rsock = d.join("r.sock");
        let restored = common::spawn_restore(
            &snap,
            &["--mode", "lazy", "--api-sock", rsock.to_str().unwrap()],
        );
        common::wait_for(&rsock);
        let ep = format!("unix:{}", d.join("mig.sock").display());
        let dst = destination(&ep, &["--verify"]);
        common::wait_for(&d.join("mig.sock"));
        let out = migrate(&rsock, &ep, mode, &["--downtime-limit-ms", "2000"]);
        assert!(
            out.status.success(),
            "{mode}: {}\n{}",
            text(&out.stdout),
            text(&out.stderr)
        );
        let o = dst.finish(Duration::from_secs(60));
        let s = summary(&o);
        assert_eq!(
            s["summary"]["matches_source"],
            true,
            "{mode}: the destination's memory is not the restored VM's: {s}\n{}",
            text(&o.stderr)
        );
        drop(restored);
    }
}

/// `bench migrate --breakdown` as a user runs it: the local fault first, then the cell with
/// QEMU-style statistics, then each hop of its remote faults, joined across both processes.
#[test]
fn bench_migrate_breakdown_and_local_fault_lines() {
    kvm_present();
    let out = output_within(
        bin().args([
            "bench",
            "migrate",
            "--json",
            "--breakdown",
            "--workloads",
            "read",
            "--links",
            "200m",
            "--modes",
            "postcopy",
            "--runs",
            "1",
            "--mem-mib",
            "256",
            "--hot-mib",
            "64",
        ]),
        Duration::from_secs(240),
    );
    let lines: Vec<Value> = text(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l}: {e}")))
        .collect();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let case = |c: &str| lines.iter().find(|l| l["case"] == c).cloned();
    let local = case("local-fault").expect("a local-fault line");
    let lp50 = local["fault_p50_us"].as_f64().unwrap();
    assert!(
        lp50 > 0.0 && local["faults"].as_u64() > Some(100),
        "{local}"
    );
    let cell = lines
        .iter()
        .find(|l| l["case"].is_null() && l["mode"] == "postcopy")
        .expect("the cell's line");
    assert_eq!(cell["link"], "200m");
    let faults = cell["faults_requested"].as_f64().unwrap();
    assert!(faults > 0.0, "{cell}");
    // The histogram counts every fault the destination served.
    let hist: u64 = cell["latency_log2_us"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap())
        .sum();
    assert!(hist as f64 >= faults, "{cell}");
    assert_eq!(cell["vcpu_blocktime_ms"].as_array().map(Vec::len), Some(1));
    assert!(cell["vcpu_faults"][0].as_f64() > Some(0.0), "{cell}");
    assert!(cell["vcpu_latency_us"][0].as_f64() > Some(0.0), "{cell}");
    assert_eq!(cell["non_vcpu_faults"].as_f64(), Some(0.0), "{cell}");
    assert_eq!(cell["local_fault_p50_us"].as_f64(), Some(lp50));
    let ratio = cell["remote_to_local_p50"].as_f64().unwrap();
    assert!((ratio - cell["fault_p50_us"].as_f64().unwrap() / lp50).abs() < 1e-6);
    let b = case("breakdown").expect("a breakdown line");
    assert!(b["samples"].as_u64() > Some(10), "{b}");
    let hops = [
        "request_sent_us",
        "source_read_us",
        "responder_us",
        "page_sent_us",
        "page_received_us",
        "installed_us",
    ];
    for h in hops {
        assert!(b[h].as_f64().is_some_and(|v| v >= 0.0), "{h}: {b}");
    }
    // Each hop is part of the whole.
    let total = b["total_us"].as_f64().unwrap();
    for h in hops {
        assert!(b[h].as_f64().unwrap() <= total, "{h}: {b}");
    }
}
