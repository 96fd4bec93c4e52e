//! Helpers shared by the end-to-end tests of restore and the page handler: the binary started
//! as a user would, real KVM, real sockets.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_faultline"))
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

/// A child process, killed on drop.
pub struct Proc(pub Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub fn wait_for(path: &Path) {
    let t = Instant::now();
    while !path.exists() {
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "{} never appeared",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Run a `dirty` VM of 64 MiB, snapshot it into `out` through its API, stop it.
pub fn make_snapshot(dir: &Path, out: &Path) {
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
            "dirty",
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

/// Wait for a child with a deadline; its output.
pub fn finish(mut p: Proc, limit: Duration) -> Output {
    let t = Instant::now();
    loop {
        if p.0.try_wait().unwrap().is_some() {
            break;
        }
        if t.elapsed() > limit {
            let _ = p.0.kill();
            let o = take_output(&mut p);
            panic!("still running after {limit:?}; stderr: {}", text(&o.stderr));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    take_output(&mut p)
}

fn take_output(p: &mut Proc) -> Output {
    use std::io::Read;
    let status = p.0.wait().unwrap();
    let mut stdout = Vec::new();
    let mut stderr = Vec::new();
    if let Some(mut s) = p.0.stdout.take() {
        let _ = s.read_to_end(&mut stdout);
    }
    if let Some(mut s) = p.0.stderr.take() {
        let _ = s.read_to_end(&mut stderr);
    }
    Output {
        status,
        stdout,
        stderr,
    }
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
