//! End to end: pause has owners. A VM the operator paused stays paused where a live migration
//! lands it (and runs once the operator resumes it there); the source, once it has handed the
//! guest over, refuses to resume. Two `faultline` processes, real KVM, userfaultfd, sockets.

mod common;

use std::io::{Read, Write};
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::{Proc, bin, wait_for};
use serde_json::Value;

/// One API call: (status, JSON body or null).
fn api(sock: &Path, method: &str, path: &str, body: &str) -> (u16, Value) {
    try_api(sock, method, path, body).expect("API socket")
}

/// One API call, `None` if nobody listens any more.
fn try_api(sock: &Path, method: &str, path: &str, body: &str) -> Option<(u16, Value)> {
    let mut s = std::os::unix::net::UnixStream::connect(sock).ok()?;
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut r = String::new();
    s.read_to_string(&mut r).unwrap();
    let code = r
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = r.split_once("\r\n\r\n").map(|x| x.1).unwrap_or("");
    Some((code, serde_json::from_str(body).unwrap_or(Value::Null)))
}

fn heartbeats(sock: &Path) -> Vec<u64> {
    api(sock, "GET", "/vm/stats", "").1["vcpus"]
        .as_array()
        .map(|v| v.iter().filter_map(|c| c["heartbeats"].as_u64()).collect())
        .unwrap_or_default()
}

fn run(args: &[&str]) -> Proc {
    Proc(
        bin()
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start faultline"),
    )
}

#[test]
fn an_operator_paused_vm_lands_paused_and_the_source_never_resumes() {
    assert!(
        Path::new("/dev/kvm").exists(),
        "this test needs /dev/kvm (KVM) and userfaultfd; run it as root on a KVM host"
    );
    let dir = tempfile::tempdir().unwrap();
    let (src, dst) = (dir.path().join("src.sock"), dir.path().join("dst.sock"));
    let mig = dir.path().join("mig.sock");
    let _source = run(&[
        "run",
        "--mem",
        "64M",
        "--workload-mem",
        "16M",
        "--guest",
        "dirty",
        "--api-sock",
        src.to_str().unwrap(),
    ]);
    wait_for(&src);
    let t = Instant::now();
    while heartbeats(&src).first().is_none_or(|&n| n < 2) {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "the source never beat"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(api(&src, "PUT", "/vm/pause", "").0, 204);
    let _dest = run(&[
        "run",
        "--incoming",
        &format!("unix:{}", mig.display()),
        "--api-sock",
        dst.to_str().unwrap(),
    ]);
    wait_for(&mig);
    let (code, st) = api(
        &src,
        "PUT",
        "/migrate",
        &format!(r#"{{"to":"unix:{}","mode":"postcopy"}}"#, mig.display()),
    );
    assert_eq!(code, 202, "{st}");
    // The destination's API comes up once the guest is there.
    wait_for(&dst);
    // The destination holds the operator's pause until the operator releases it there.
    let t = Instant::now();
    loop {
        let (_, m) = api(&dst, "GET", "/migrate", "");
        if m["state"] == "completed" {
            break;
        }
        assert!(
            m["state"] != "failed" && t.elapsed() < Duration::from_secs(60),
            "{m}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let (_, vm) = api(&dst, "GET", "/vm", "");
    assert_eq!(vm["state"], "paused", "{vm}");
    assert_eq!(vm["paused_by"], serde_json::json!(["operator"]), "{vm}");
    let before = heartbeats(&dst);
    std::thread::sleep(Duration::from_millis(400));
    assert_eq!(heartbeats(&dst), before, "the guest ran while paused");
    // The source handed the guest over: an operator's resume there cannot run it again.
    // (It may also have exited already, its migration complete.)
    if let Some((code, e)) = try_api(&src, "PUT", "/vm/resume", "") {
        assert_eq!(code, 409, "{e}");
    }
    assert_eq!(api(&dst, "PUT", "/vm/resume", "").0, 204);
    let t = Instant::now();
    while heartbeats(&dst).iter().sum::<u64>() <= before.iter().sum::<u64>() {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "no heartbeat after the resume"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(api(&dst, "PUT", "/vm/stop", "").0, 204);
}
