//! End to end: the migration link's deadlines between two real `faultline` processes (real
//! KVM, userfaultfd, Unix sockets). Keepalives keep a quiet link alive; a peer that stops
//! (SIGSTOP) is detected within the link deadline on either side; a destination that stops
//! reading fails a pre-copy at its write deadline and the source guest runs on. Both
//! processes run with a short link deadline (`FAULTLINE_LINK_DEADLINE_MS`).

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// The link deadline both processes use here, ms.
const DEADLINE_MS: u64 = 2500;

fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_faultline"));
    c.env("FAULTLINE_LINK_DEADLINE_MS", DEADLINE_MS.to_string());
    c
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn kvm_present() {
    assert!(
        Path::new("/dev/kvm").exists(),
        "these tests need /dev/kvm (KVM) and userfaultfd; run them as root on a KVM host"
    );
}

/// A child process, continued and killed on drop.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        self.signal("CONT");
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Proc {
    fn signal(&self, sig: &str) {
        let st = Command::new("kill")
            .args([&format!("-{sig}"), &self.0.id().to_string()])
            .stderr(Stdio::null())
            .status()
            .expect("run kill");
        assert!(st.success() || sig == "CONT", "kill -{sig} failed");
    }

    /// Wait for it to exit (at most `t`); its stdout and stderr.
    fn finish(mut self, t: Duration) -> Output {
        let start = Instant::now();
        while start.elapsed() < t {
            if let Ok(Some(_)) = self.0.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.signal("CONT");
        let _ = self.0.kill();
        let child = std::mem::replace(
            &mut self.0,
            Command::new("true").spawn().expect("spawn true"),
        );
        let out = child.wait_with_output().expect("wait");
        let _ = self.0.wait();
        out
    }
}

fn wait_for(path: &Path) {
    let t = Instant::now();
    while !path.exists() {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "{} never appeared",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn api(sock: &Path, method: &str, path: &str) -> Value {
    let mut s = std::os::unix::net::UnixStream::connect(sock).expect("API socket");
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut r = String::new();
    s.read_to_string(&mut r).unwrap();
    let body = r.split_once("\r\n\r\n").map(|x| x.1).unwrap_or("");
    serde_json::from_str(body).unwrap_or(Value::Null)
}

fn heartbeats(sock: &Path) -> u64 {
    api(sock, "GET", "/vm/stats")["vcpus"][0]["heartbeats"]
        .as_u64()
        .unwrap_or(0)
}

/// Start a source VM with an API socket (64 MiB, a 16 MiB hot area); wait until it beats.
fn source(dir: &Path) -> (Proc, PathBuf) {
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
            "1",
            "--guest",
            "dirty",
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
    while heartbeats(&sock) < 2 {
        assert!(t.elapsed() < Duration::from_secs(30), "source never beat");
        std::thread::sleep(Duration::from_millis(20));
    }
    (p, sock)
}

fn destination(endpoint: &str, extra: &[&str]) -> Proc {
    let mut args = vec!["run", "--incoming", endpoint, "--json-events"];
    args.extend_from_slice(extra);
    Proc(
        bin()
            .args(&args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start the destination"),
    )
}

/// `faultline migrate` on a thread (it returns when the migration ends).
fn migrate_bg(
    sock: &Path,
    to: &str,
    mode: &str,
    extra: &[&str],
) -> std::thread::JoinHandle<(Output, Instant)> {
    let mut args: Vec<String> = [
        "migrate",
        "--api-sock",
        sock.to_str().unwrap(),
        "--to",
        to,
        "--mode",
        mode,
        "--json",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.extend(extra.iter().map(|s| s.to_string()));
    std::thread::spawn(move || {
        let p = Proc(
            bin()
                .args(&args)
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .expect("spawn migrate"),
        );
        let out = p.finish(Duration::from_secs(120));
        (out, Instant::now())
    })
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

/// A post-copy migration whose priority connection stays quiet for several link deadlines
/// (the guest is paused by the operator: no vCPU faults, so no request and no answer, while
/// the background stream runs at 2 MB/s for about 8 s) completes: keepalives, not requests,
/// keep the link alive.
#[test]
fn quiet_priority_link_is_not_taken_for_a_lost_one() {
    let dir = tempfile::tempdir().unwrap();
    let ep = format!("unix:{}", dir.path().join("mig.sock").display());
    let dst = destination(&ep, &[]);
    let (src, sock) = source(dir.path());
    api(&sock, "PUT", "/vm/pause");
    let t = Instant::now();
    let bg = migrate_bg(&sock, &ep, "postcopy", &["--max-bandwidth", "2M"]);
    let (out, _) = bg.join().unwrap();
    assert!(
        out.status.success(),
        "{}\n{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    let stats: Value = serde_json::from_str(text(&out.stdout).trim()).unwrap();
    assert_eq!(stats["digest_verified"], true, "{stats}");
    assert_eq!(stats["recoveries"], 0, "{stats}");
    assert_eq!(stats["faults_requested"], 0, "the guest faulted: {stats}");
    assert!(
        t.elapsed() > Duration::from_millis(2 * DEADLINE_MS),
        "too short to prove anything: {:?}",
        t.elapsed()
    );
    drop(dst);
    drop(src);
}

/// The destination stops (SIGSTOP) during post-copy: the source sees it within the link
/// deadline (no keepalive comes; its writes stall) and pauses the migration for a recovery.
#[test]
fn stopped_destination_is_detected_during_postcopy() {
    let dir = tempfile::tempdir().unwrap();
    let ep = format!("unix:{}", dir.path().join("mig.sock").display());
    let dst = destination(&ep, &[]);
    let (src, sock) = source(dir.path());
    let bg = migrate_bg(&sock, &ep, "postcopy", &["--max-bandwidth", "1M"]);
    wait_state(&sock, "postcopy", Duration::from_secs(30));
    std::thread::sleep(Duration::from_millis(500));
    dst.signal("STOP");
    let t = Instant::now();
    let v = wait_state(
        &sock,
        "postcopy-paused",
        Duration::from_millis(DEADLINE_MS + 3000),
    );
    let err = v["error"].as_str().unwrap_or_default();
    assert!(
        err.contains("not even a keepalive") || err.contains("took nothing"),
        "{v}"
    );
    eprintln!("detected after {:?}: {err}", t.elapsed());
    let (out, _) = bg.join().unwrap();
    assert!(!out.status.success());
    drop(dst);
    drop(src);
}

/// The source stops (SIGSTOP) during post-copy: the destination sees the silence within the
/// link deadline, waits for a recovery, and stops after its recovery timeout.
#[test]
fn stopped_source_is_detected_by_the_destination() {
    let dir = tempfile::tempdir().unwrap();
    let ep = format!("unix:{}", dir.path().join("mig.sock").display());
    let dst = destination(&ep, &["--recover-timeout", "1"]);
    let (src, sock) = source(dir.path());
    let bg = migrate_bg(&sock, &ep, "postcopy", &["--max-bandwidth", "1M"]);
    wait_state(&sock, "postcopy", Duration::from_secs(30));
    std::thread::sleep(Duration::from_millis(500));
    src.signal("STOP");
    let t = Instant::now();
    let d = dst.finish(Duration::from_secs(30));
    let waited = t.elapsed();
    let err = text(&d.stderr);
    assert!(!d.status.success(), "{err}");
    assert!(err.contains("not even a keepalive"), "{err}");
    assert!(err.contains("did not reconnect within"), "{err}");
    // The deadline, the 1 s recovery wait, and the destination's exit.
    assert!(
        waited < Duration::from_millis(DEADLINE_MS + 6000),
        "took {waited:?}"
    );
    drop(src);
    let _ = bg.join();
}

/// The destination stops reading (SIGSTOP) during pre-copy: the source's writes stall, it
/// fails at the write deadline (not at the 20 s pre-copy deadline), says what timed out, and
/// its guest keeps running.
#[test]
fn stopped_destination_fails_precopy_and_the_source_runs_on() {
    let dir = tempfile::tempdir().unwrap();
    let ep = format!("unix:{}", dir.path().join("mig.sock").display());
    let dst = destination(&ep, &[]);
    let (src, sock) = source(dir.path());
    let bg = migrate_bg(&sock, &ep, "precopy", &["--max-bandwidth", "1M"]);
    wait_state(&sock, "precopy", Duration::from_secs(30));
    std::thread::sleep(Duration::from_millis(300));
    dst.signal("STOP");
    let t = Instant::now();
    let v = wait_state(&sock, "failed", Duration::from_millis(DEADLINE_MS + 4000));
    eprintln!("failed after {:?}: {v}", t.elapsed());
    let err = v["error"].as_str().unwrap_or_default();
    assert!(err.contains("took nothing"), "{v}");
    let (out, _) = bg.join().unwrap();
    assert!(!out.status.success());
    assert_eq!(api(&sock, "GET", "/vm")["state"], "running");
    let a = heartbeats(&sock);
    std::thread::sleep(Duration::from_millis(400));
    let b = heartbeats(&sock);
    assert!(b > a, "the source guest stopped beating ({a} -> {b})");
    drop(dst);
    drop(src);
}
