//! Helpers shared by the end-to-end tests that start `faultline` processes as a user would
//! (real KVM, real userfaultfd, real sockets): processes continued and killed on drop, the
//! API, a source VM and a destination, `faultline migrate` on a thread (the migration tests,
//! with a short link deadline: [`bin_short_deadline`]), snapshots and restores (the restore
//! and page-handler tests, with the default deadline: [`bin`]).
#![allow(dead_code)]

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

pub mod libvfio_user;
pub mod linux;

/// The link deadline of the processes [`bin_short_deadline`] starts, ms.
pub const DEADLINE_MS: u64 = 2500;

/// The `faultline` binary, with the default link deadline.
pub fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_faultline"))
}

/// The `faultline` binary with the link deadline [`DEADLINE_MS`] (the migration tests).
pub fn bin_short_deadline() -> Command {
    let mut c = bin();
    c.env("FAULTLINE_LINK_DEADLINE_MS", DEADLINE_MS.to_string());
    c
}

pub fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

pub fn kvm_present() {
    assert!(
        Path::new("/dev/kvm").exists(),
        "these tests need /dev/kvm (KVM) and userfaultfd; run them as root on a KVM host"
    );
}

/// A child process, continued and killed on drop (unless already waited for).
pub struct Proc(pub Child);

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(Some(_)) = self.0.try_wait() {
            return;
        }
        self.signal("CONT");
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Proc {
    pub fn signal(&self, sig: &str) {
        let st = Command::new("kill")
            .args([&format!("-{sig}"), &self.0.id().to_string()])
            .stderr(Stdio::null())
            .status()
            .expect("run kill");
        assert!(st.success() || sig == "CONT", "kill -{sig} failed");
    }

    /// Wait for it to exit (at most `t`); whether it did.
    fn exited_within(&mut self, t: Duration) -> bool {
        let start = Instant::now();
        loop {
            if let Ok(Some(_)) = self.0.try_wait() {
                return true;
            }
            if start.elapsed() >= t {
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Kill it if it still runs; its stdout and stderr.
    fn output(mut self) -> Output {
        if !matches!(self.0.try_wait(), Ok(Some(_))) {
            self.signal("CONT");
            let _ = self.0.kill();
        }
        let status = self.0.wait().expect("wait");
        let mut stdout = Vec::new();
        let mut stderr = Vec::new();
        if let Some(mut s) = self.0.stdout.take() {
            let _ = s.read_to_end(&mut stdout);
        }
        if let Some(mut s) = self.0.stderr.take() {
            let _ = s.read_to_end(&mut stderr);
        }
        Output {
            status,
            stdout,
            stderr,
        }
    }

    /// Wait for it to exit (at most `t`, then it is killed); its stdout and stderr.
    pub fn finish(mut self, t: Duration) -> Output {
        self.exited_within(t);
        self.output()
    }

    /// Wait for it to exit; fail the test if it still runs after `limit`. Its output.
    pub fn finish_within(mut self, limit: Duration) -> Output {
        if !self.exited_within(limit) {
            let o = self.output();
            panic!("still running after {limit:?}; stderr: {}", text(&o.stderr));
        }
        self.output()
    }
}

pub fn wait_for(path: &Path) {
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

pub fn api(sock: &Path, method: &str, path: &str) -> Value {
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

pub fn heartbeats(sock: &Path) -> u64 {
    api(sock, "GET", "/vm/stats")["vcpus"][0]["heartbeats"]
        .as_u64()
        .unwrap_or(0)
}

/// Start a source VM with an API socket (64 MiB, a 16 MiB hot area); wait until it beats.
pub fn source(dir: &Path) -> (Proc, PathBuf) {
    source_with(dir, &[])
}

/// [`source`] with more environment variables (test hooks).
pub fn source_with(dir: &Path, env: &[(&str, &str)]) -> (Proc, PathBuf) {
    kvm_present();
    let sock = dir.join("src.sock");
    let child = bin_short_deadline()
        .envs(env.iter().copied())
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

pub fn destination(endpoint: &str, extra: &[&str]) -> Proc {
    let mut args = vec!["run", "--incoming", endpoint, "--json-events"];
    args.extend_from_slice(extra);
    Proc(
        bin_short_deadline()
            .args(&args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start the destination"),
    )
}

/// `faultline migrate` on a thread (it returns when the migration ends).
pub fn migrate_bg(
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
            bin_short_deadline()
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

pub fn wait_state(sock: &Path, want: &str, t: Duration) -> Value {
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

/// Run a `dirty` VM of 64 MiB, snapshot it into `out` through its API, stop it.
pub fn make_snapshot(dir: &Path, out: &Path) {
    make_snapshot_of(dir, out, "dirty")
}

/// [`make_snapshot`] of a VM running `guest`.
pub fn make_snapshot_of(dir: &Path, out: &Path, guest: &str) {
    kvm_present();
    let sock = dir.join("src.sock");
    let child = bin()
        .args([
            "run",
            "--mem",
            "64M",
            "--vcpus",
            "1",
            "--guest",
            guest,
            "--workload-mem",
            "16M",
            "--timeout",
            "120",
            "--api-sock",
        ])
        .arg(&sock)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start faultline run");
    let _vm = Proc(child);
    wait_for(&sock);
    std::thread::sleep(Duration::from_millis(600));
    let o = bin()
        .args(["snapshot", "--api-sock"])
        .arg(&sock)
        .arg("--out")
        .arg(out)
        .output()
        .unwrap();
    assert!(o.status.success(), "snapshot: {}", text(&o.stderr));
}

/// `faultline restore DIR EXTRA.. --timeout 60`, run to the end.
pub fn restore(dir: &Path, extra: &[&str]) -> Output {
    bin()
        .arg("restore")
        .arg(dir)
        .args(extra)
        .args(["--timeout", "60"])
        .output()
        .unwrap()
}

/// `faultline restore` started in the background with its output piped.
pub fn spawn_restore(dir: &Path, extra: &[&str]) -> Proc {
    Proc(
        bin()
            .arg("restore")
            .arg(dir)
            .args(extra)
            .args(["--timeout", "60"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    )
}

pub fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

/// The socket path `name.sock` in `dir`.
pub fn sock(dir: &Path, name: &str) -> PathBuf {
    dir.join(format!("{name}.sock"))
}

/// A tap for one test, with the host's address, deleted on drop.
pub struct Tap(pub String);

impl Tap {
    pub fn new(tag: &str) -> Tap {
        let name = format!("flv{}{tag}", std::process::id() % 100_000);
        let ip = |args: &[&str]| {
            let o = Command::new("ip").args(args).output().expect("run ip");
            assert!(
                o.status.success(),
                "ip {args:?} failed (these tests need root and tun/tap): {}",
                text(&o.stderr)
            );
        };
        ip(&["tuntap", "add", "dev", &name, "mode", "tap"]);
        let t = Tap(name.clone());
        let _ = std::fs::write(format!("/proc/sys/net/ipv6/conf/{name}/disable_ipv6"), "1");
        ip(&["addr", "add", "172.30.0.1/24", "dev", &name]);
        ip(&["link", "set", &name, "up"]);
        t
    }
}

impl Drop for Tap {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["link", "del", &self.0])
            .stderr(Stdio::null())
            .status();
    }
}
