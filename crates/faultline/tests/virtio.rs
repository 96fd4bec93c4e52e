//! End to end: virtio-mmio devices attached by `faultline run --disk --net --vsock --rng` and
//! driven by the built-in guest's `virtio` workload (a driver at CPL 3), in both interrupt
//! modes. Real KVM, a real image file, a real tap created here (root), real Unix sockets.

mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use common::{Proc, Tap, bin, kvm_present, text};
use serde_json::Value;
use vmm::guest::abi;

/// Run the `virtio` workload with `args`; the run's summary (asserting the process ended well
/// within its deadline).
fn run_virtio(args: &[&str]) -> Value {
    kvm_present();
    let child = bin()
        .args([
            "run",
            "--guest",
            "virtio",
            "--timeout",
            "30",
            "--json-events",
        ])
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start faultline run");
    let o = Proc(child).finish_within(Duration::from_secs(60));
    let out = text(&o.stdout);
    assert!(
        o.status.success(),
        "faultline run {args:?} failed\nstdout:\n{out}\nstderr:\n{}",
        text(&o.stderr)
    );
    let line = out
        .lines()
        .rev()
        .find(|l| l.contains("\"summary\""))
        .unwrap_or_else(|| panic!("no summary in:\n{out}"));
    let v: Value = serde_json::from_str(line).unwrap();
    v["summary"].clone()
}

/// The guest's per-device results: (virtio device id, result code, interrupts taken).
fn results(summary: &Value) -> Vec<(u32, u32, u32)> {
    let mut out = Vec::new();
    let mut cur: Option<(u32, u32, u32)> = None;
    for r in summary["reports"].as_array().cloned().unwrap_or_default() {
        let (k, v) = (r[0].as_u64().unwrap() as u32, r[1].as_u64().unwrap() as u32);
        match k {
            abi::KEY_VIRTIO_DEVICE => {
                if let Some(c) = cur.take() {
                    out.push(c);
                }
                cur = Some((v & 0xffff, u32::MAX, 0));
            }
            abi::KEY_VIRTIO_RESULT => {
                if let Some(c) = cur.as_mut() {
                    c.1 = v;
                }
            }
            abi::KEY_VIRTIO_IRQS => {
                if let Some(c) = cur.as_mut() {
                    c.2 = v;
                }
            }
            _ => {}
        }
    }
    out.extend(cur);
    out
}

fn exit_code(summary: &Value) -> i64 {
    summary["vcpus"][0]["exit_code"].as_i64().unwrap_or(-1)
}

/// Every device passed, took interrupts, and the VMM's counters agree with the mode.
fn check_passed(summary: &Value, devices: usize, msi: bool) {
    let r = results(summary);
    assert_eq!(r.len(), devices, "results {r:?}\n{summary:#}");
    for (id, code, irqs) in &r {
        assert_eq!(*code, 0, "device {id} failed at step {code}: {summary:#}");
        assert!(*irqs > 0, "device {id} took no interrupt: {summary:#}");
    }
    assert_eq!(exit_code(summary), 0, "{summary:#}");
    for d in summary["virtio"].as_array().unwrap() {
        assert_eq!(d["msi"], Value::Bool(msi), "{d}");
        assert!(d["needs_reset"].is_null(), "{d}");
        let (legacy, msis) = (
            d["legacy_irqs"].as_u64().unwrap(),
            d["msi_irqs"].as_u64().unwrap(),
        );
        if msi {
            assert!(legacy == 0 && msis > 0, "{d}");
        } else {
            assert!(msis == 0 && legacy > 0, "{d}");
        }
    }
}

fn image(dir: &Path, bytes: u64) -> std::path::PathBuf {
    let p = dir.join("disk.img");
    let f = std::fs::File::create(&p).unwrap();
    f.set_len(bytes).unwrap();
    p
}

fn pattern() -> Vec<u8> {
    (0..512u64)
        .flat_map(|i| abi::virtio_blk_pattern(i).to_le_bytes())
        .collect()
}

#[test]
fn block_and_entropy_in_both_interrupt_modes() {
    for irq in ["legacy", "msi"] {
        let dir = tempfile::tempdir().unwrap();
        let img = image(dir.path(), 1 << 20);
        let s = run_virtio(&["--disk", img.to_str().unwrap(), "--rng", "--irq", irq]);
        check_passed(&s, 2, irq == "msi");
        // The guest's write reached the image file.
        let data = std::fs::read(&img).unwrap();
        assert_eq!(&data[..4096], &pattern()[..], "{irq}: image content");
        // Legacy interrupts cost a status read and an ACK write each; MSI none.
        let blk = &s["virtio"][0];
        let irqs = blk["legacy_irqs"].as_u64().unwrap() + blk["msi_irqs"].as_u64().unwrap();
        assert_eq!(blk["completed"].as_u64().unwrap(), 4, "{blk}");
        assert_eq!(irqs, 4, "{blk}");
    }
}

#[test]
fn a_read_only_disk_refuses_the_guests_write() {
    let dir = tempfile::tempdir().unwrap();
    let img = image(dir.path(), 1 << 20);
    std::fs::write(&img, vec![0x5a; 1 << 20]).unwrap();
    let arg = format!("{},ro", img.display());
    // The guest expects IOERR for its write on a read-only disk, then reads sector 0.
    let s = run_virtio(&["--disk", &arg, "--irq", "msi"]);
    check_passed(&s, 1, true);
    assert!(
        std::fs::read(&img).unwrap().iter().all(|&b| b == 0x5a),
        "a read-only image changed"
    );
    let data = s["reports"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r[0] == abi::KEY_VIRTIO_DATA)
        .map(|r| r[1].as_u64().unwrap());
    assert_eq!(data, Some(0x5a5a_5a5a), "the guest read the image: {s:#}");
}

#[test]
fn net_gets_the_hosts_arp_reply_in_both_interrupt_modes() {
    for (tag, irq) in [("l", "legacy"), ("m", "msi")] {
        let tap = Tap::new(tag);
        let s = run_virtio(&["--net", &tap.0, "--irq", irq]);
        check_passed(&s, 1, irq == "msi");
        assert!(s["virtio"][0]["completed"].as_u64().unwrap() >= 2, "{s:#}");
    }
}

/// An echo server on `path` (the guest's connections to the port), one connection.
fn echo(path: std::path::PathBuf) -> std::thread::JoinHandle<Vec<u8>> {
    let l = UnixListener::bind(&path).unwrap();
    std::thread::spawn(move || {
        let (mut c, _) = l.accept().unwrap();
        c.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let mut got = Vec::new();
        let mut b = [0u8; 64];
        while got.len() < abi::VIRTIO_VSOCK_PING.len() {
            match c.read(&mut b) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    got.extend_from_slice(&b[..n]);
                    c.write_all(&b[..n]).unwrap();
                }
            }
        }
        got
    })
}

#[test]
fn vsock_connects_to_the_host_and_echoes_in_both_interrupt_modes() {
    for irq in ["legacy", "msi"] {
        let dir = tempfile::tempdir().unwrap();
        let uds = dir.path().join("v.sock");
        let server = echo(dir.path().join("v.sock_5000"));
        let s = run_virtio(&["--vsock", uds.to_str().unwrap(), "--irq", irq]);
        check_passed(&s, 1, irq == "msi");
        assert_eq!(server.join().unwrap(), abi::VIRTIO_VSOCK_PING, "{irq}");
    }
}

#[test]
fn every_device_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let img = image(dir.path(), 1 << 20);
    let tap = Tap::new("a");
    let uds = dir.path().join("v.sock");
    let server = echo(dir.path().join("v.sock_5000"));
    let s = run_virtio(&[
        "--disk",
        img.to_str().unwrap(),
        "--net",
        &tap.0,
        "--vsock",
        uds.to_str().unwrap(),
        "--rng",
        "--irq",
        "msi",
    ]);
    check_passed(&s, 4, true);
    let kinds: Vec<u32> = results(&s).iter().map(|r| r.0).collect();
    assert_eq!(kinds, vec![2, 1, 19, 4]);
    assert_eq!(server.join().unwrap(), abi::VIRTIO_VSOCK_PING);
}

#[test]
fn a_missing_backend_is_refused_before_the_vm_starts() {
    kvm_present();
    let o = bin()
        .args([
            "run",
            "--guest",
            "virtio",
            "--disk",
            "/nonexistent/disk.img",
        ])
        .output()
        .unwrap();
    assert!(!o.status.success());
    let e = text(&o.stderr);
    assert!(e.contains("/nonexistent/disk.img"), "{e}");
    let o = bin()
        .args([
            "run",
            "--guest",
            "virtio",
            "--net",
            "no-such-tap-name-that-is-too-long",
        ])
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(text(&o.stderr).contains("tap"), "{}", text(&o.stderr));
    // Guest memory must end below the devices' windows.
    let dir = tempfile::tempdir().unwrap();
    let img = image(dir.path(), 1 << 20);
    let o = bin()
        .args(["run", "--guest", "virtio", "--mem", "4G", "--disk"])
        .arg(&img)
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(text(&o.stderr).contains("windows"), "{}", text(&o.stderr));
}
