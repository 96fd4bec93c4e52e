//! Helpers shared by the migration tests that start `faultline` processes with a short link
//! deadline: processes killed (and continued) on drop, the API, a source VM, a destination,
//! `faultline migrate` on a thread.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// The link deadline both processes use here, ms.
pub const DEADLINE_MS: u64 = 2500;

pub fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_faultline"));
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

/// A child process, continued and killed on drop.
pub struct Proc(pub Child);

impl Drop for Proc {
    fn drop(&mut self) {
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

    /// Wait for it to exit (at most `t`); its stdout and stderr.
    pub fn finish(mut self, t: Duration) -> Output {
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
    let child = bin()
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
        bin()
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
