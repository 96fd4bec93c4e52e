//! Soak: one running guest migrated back and forth 50 times between `faultline` processes,
//! modes alternating (pre-copy, post-copy, hybrid), every fifth hop over TCP with TLS (a
//! pre-shared key), the rest over Unix sockets. Each hop must complete with the memory digest
//! verified on both sides, and the guest's heartbeat counter (in guest memory) must go on
//! from where it was; at the end the guest stops cleanly.

mod common;

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::{
    Proc, api, bin_short_deadline, destination, heartbeats, kvm_present, migrate_bg, text, wait_for,
};
use serde_json::Value;

const HOPS: usize = 50;

fn first_vm(dir: &Path) -> (Proc, std::path::PathBuf) {
    kvm_present();
    let sock = dir.join("vm-start.sock");
    let p = Proc(
        bin_short_deadline()
            .args([
                "run",
                "--mem",
                "64M",
                "--workload-mem",
                "16M",
                "--guest",
                "dirty",
            ])
            .args(["--seconds", "1800", "--api-sock", sock.to_str().unwrap()])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start the first VM"),
    );
    wait_for(&sock);
    let t = Instant::now();
    while heartbeats(&sock) < 2 {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "the guest never beat"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    (p, sock)
}

#[test]
fn fifty_migrations_back_and_forth_each_verified() {
    let dir = tempfile::tempdir().unwrap();
    let psk = dir.path().join("psk");
    std::fs::write(
        &psk,
        (0u8..32).map(|b| b.wrapping_mul(37)).collect::<Vec<_>>(),
    )
    .unwrap();
    let psk = psk.to_str().unwrap().to_string();
    let (mut vm, mut sock) = first_vm(dir.path());
    let t0 = Instant::now();
    let mut pauses = Vec::new();
    for hop in 0..HOPS {
        let mode = ["precopy", "postcopy", "hybrid"][hop % 3];
        let tls = hop % 5 == 4;
        let ep = if tls {
            let port = std::net::TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port();
            format!("tcp:127.0.0.1:{port}")
        } else {
            format!(
                "unix:{}",
                dir.path().join(format!("mig{hop}.sock")).display()
            )
        };
        let security: Vec<&str> = if tls { vec!["--tls-psk", &psk] } else { vec![] };
        let next = dir.path().join(format!("vm{hop}.sock"));
        let mut dst_args = vec!["--api-sock", next.to_str().unwrap()];
        dst_args.extend(&security);
        let dst = destination(&ep, &dst_args);
        let before = heartbeats(&sock);
        let mut extra = vec!["--downtime-limit-ms", "2000"];
        extra.extend(&security);
        let (out, _) = migrate_bg(&sock, &ep, mode, &extra).join().unwrap();
        let stats: Value = serde_json::from_str(text(&out.stdout).trim()).unwrap_or(Value::Null);
        assert!(
            out.status.success() && stats["digest_verified"] == true,
            "hop {hop} ({mode}, {}): {}\n{}",
            if tls { "TLS" } else { "unix" },
            text(&out.stdout),
            text(&out.stderr)
        );
        pauses.push(stats["max_pause_ms"].as_f64().unwrap_or(f64::NAN));
        // The guest goes on at the destination from where it was.
        wait_for(&next);
        let t = Instant::now();
        loop {
            let now = heartbeats(&next);
            if now > before {
                break;
            }
            assert!(
                t.elapsed() < Duration::from_secs(30),
                "hop {hop}: the guest does not beat on at the destination ({now} <= {before})"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        // The source hands over and exits on its own, successfully.
        let old = std::mem::replace(&mut vm, dst);
        let o = old.finish(Duration::from_secs(30));
        assert!(
            o.status.success(),
            "hop {hop}: the source exited with {:?}: {}",
            o.status,
            text(&o.stderr)
        );
        sock = next;
    }
    let _ = api(&sock, "PUT", "/vm/stop");
    let o = vm.finish(Duration::from_secs(30));
    assert!(
        o.status.success(),
        "the last VM: {:?} {}",
        o.status,
        text(&o.stderr)
    );
    pauses.sort_by(f64::total_cmp);
    println!(
        "soak: {HOPS} migrations in {:.1} s, every digest verified; guest-visible pause p50 {:.1} ms, max {:.1} ms",
        t0.elapsed().as_secs_f64(),
        pauses[pauses.len() / 2],
        pauses[pauses.len() - 1]
    );
}
