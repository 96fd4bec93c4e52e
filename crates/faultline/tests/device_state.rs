//! End to end: a VM with one virtio device of each kind (block, net on a tap, vsock, rng),
//! its disk, net and entropy devices kept busy by the built-in guest's `soak` job (each request waited for through
//! its interrupt; each block read back and checked against what the guest wrote before),
//! through snapshot and restore in every mode and live migration in every mode, in both
//! interrupt modes. The guest ends with a failure code if a request in flight at the pause
//! never completes, an interrupt is lost, or a block does not hold what it wrote before the
//! pause; a device that comes back broken says so in the run summary. Backends are named
//! where the VM lands; missing or different ones are refused before the VM starts.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::time::{Duration, Instant};

use common::{Proc, Tap, api, bin, bin_short_deadline, kvm_present, text, wait_for};
use serde_json::Value;
use vmm::guest::abi;

/// The device options of a VM: its disk image, a tap, a vsock socket, an entropy device.
fn devices(disk: &Path, tap: &Tap, vsock: &Path) -> Vec<String> {
    vec![
        "--disk".into(),
        disk.display().to_string(),
        "--net".into(),
        tap.0.clone(),
        "--vsock".into(),
        vsock.display().to_string(),
        "--rng".into(),
    ]
}

/// A 16 MiB disk image.
fn image(dir: &Path, name: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::File::create(&p)
        .unwrap()
        .set_len(16 << 20)
        .unwrap();
    p
}

/// Start the soak guest with `devs`, interrupts `irq`; wait until it has beaten twice.
fn soak(dir: &Path, devs: &[String], irq: &str) -> (Proc, PathBuf) {
    kvm_present();
    let sock = dir.join(format!("src-{irq}.sock"));
    let child = bin_short_deadline()
        .args([
            "run",
            "--guest",
            "virtio",
            "--virtio-job",
            "soak",
            "--irq",
            irq,
            "--timeout",
            "120",
            "--json-events",
            "--api-sock",
        ])
        .arg(&sock)
        .args(devs)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the soak guest");
    let p = Proc(child);
    wait_for(&sock);
    let t = Instant::now();
    while common::heartbeats(&sock) < 3 {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "the soak guest never beat"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    (p, sock)
}

/// The run summary in a process's output.
fn summary(o: &Output) -> Value {
    let out = text(&o.stdout);
    let line = out
        .lines()
        .rev()
        .find(|l| l.contains("\"summary\""))
        .unwrap_or_else(|| panic!("no summary in:\n{out}\nstderr:\n{}", text(&o.stderr)));
    let v: Value = serde_json::from_str(line).unwrap();
    v["summary"].clone()
}

/// The guest went on after the pause: it is still running (no failure code), beat, and
/// every device is whole; the disk completed requests here.
fn check_went_on(s: &Value, what: &str) {
    let failed = s["reports"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r[0] == abi::KEY_VIRTIO_RESULT);
    assert!(
        failed.is_none(),
        "{what}: the guest failed (result {failed:?}; 4 timeout, 6 data, 8 no interrupt): {s:#}"
    );
    assert!(
        s["vcpus"][0]["exit_code"].is_null(),
        "{what}: the guest stopped: {s:#}"
    );
    let devs = s["virtio"].as_array().unwrap();
    assert_eq!(devs.len(), 4, "{what}: {s:#}");
    for d in devs {
        assert!(d["needs_reset"].is_null(), "{what}: a device broke: {d}");
    }
    assert!(
        devs[0]["completed"].as_u64().unwrap() >= 20,
        "{what}: the disk did little after the pause: {}",
        devs[0]
    );
    // The net device sends a frame and the entropy device answers a request at every
    // iteration too.
    for (i, name) in [(1, "net"), (3, "entropy")] {
        assert!(
            devs[i]["completed"].as_u64().unwrap() >= 20,
            "{what}: the {name} device did little after the pause: {}",
            devs[i]
        );
    }
}

/// Pause the soak guest, snapshot it into `out`, copy its disk as it is then (a disk is
/// the user's to snapshot along), stop it.
fn snapshot_paused(vm: Proc, sock: &Path, out: &Path, disk: &Path, disk_copy: &Path) {
    api(sock, "PUT", "/vm/pause");
    let o = bin()
        .args(["snapshot", "--api-sock"])
        .arg(sock)
        .arg("--out")
        .arg(out)
        .output()
        .unwrap();
    assert!(o.status.success(), "snapshot: {}", text(&o.stderr));
    std::fs::copy(disk, disk_copy).unwrap();
    api(sock, "PUT", "/vm/stop");
    vm.finish(Duration::from_secs(10));
}

#[test]
fn snapshot_and_restore_in_every_mode_with_every_device_busy() {
    for irq in ["legacy", "msi"] {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let tap = Tap::new(&irq[..1]);
        let disk = image(d, "disk.img");
        let (vm, sock) = soak(d, &devices(&disk, &tap, &d.join("v.sock")), irq);
        let snap = d.join("snap");
        let at_snapshot = d.join("disk-at-snapshot.img");
        snapshot_paused(vm, &sock, &snap, &disk, &at_snapshot);
        for mode in ["lazy", "eager", "mmap", "prefetch"] {
            let disk = d.join(format!("disk-{mode}.img"));
            std::fs::copy(&at_snapshot, &disk).unwrap();
            let mut args = vec![
                "--mode".to_string(),
                mode.into(),
                "--seconds".into(),
                "2".into(),
                "--json-events".into(),
            ];
            args.extend(devices(&disk, &tap, &d.join(format!("v-{mode}.sock"))));
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            let o = common::restore(&snap, &args);
            assert!(
                o.status.success(),
                "restore --mode {mode} ({irq}): {}",
                text(&o.stderr)
            );
            let s = summary(&o);
            check_went_on(&s, &format!("restore --mode {mode}, {irq} interrupts"));
            assert_eq!(s["virtio"][0]["msi"], irq == "msi", "{s:#}");
        }
    }
}

#[test]
fn live_migration_in_every_mode_with_every_device_busy() {
    for (mode, irq) in [
        ("precopy", "legacy"),
        ("postcopy", "msi"),
        ("hybrid", "legacy"),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        // The disk is shared storage: both ends name the same image. Each end has its own
        // tap and vsock socket.
        let disk = image(d, "disk.img");
        let (src_tap, dst_tap) = (Tap::new("s"), Tap::new("d"));
        let (src, sock) = soak(d, &devices(&disk, &src_tap, &d.join("vs.sock")), irq);
        let to = format!("unix:{}", d.join("m.sock").display());
        let dst_sock = d.join("dst.sock");
        let mut extra = vec!["--api-sock".to_string(), dst_sock.display().to_string()];
        extra.extend(devices(&disk, &dst_tap, &d.join("vd.sock")));
        let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
        let dst = common::destination(&to, &extra);
        wait_for(&d.join("m.sock"));
        let (o, _) = common::migrate_bg(&sock, &to, mode, &[]).join().unwrap();
        assert!(
            o.status.success(),
            "migrate --mode {mode}: {}\n{}",
            text(&o.stdout),
            text(&o.stderr)
        );
        // The guest runs on at the destination for a while, then stops there.
        wait_for(&dst_sock);
        std::thread::sleep(Duration::from_secs(2));
        api(&dst_sock, "PUT", "/vm/stop");
        let out = dst.finish(Duration::from_secs(20));
        let s = summary(&out);
        check_went_on(&s, &format!("migrate --mode {mode}, {irq} interrupts"));
        assert_eq!(s["virtio"][0]["msi"], irq == "msi", "{s:#}");
        drop(src);
    }
}

#[test]
fn backends_missing_or_different_are_refused_before_the_vm_starts() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let tap = Tap::new("r");
    let disk = image(d, "disk.img");
    let (vm, sock) = soak(d, &devices(&disk, &tap, &d.join("v.sock")), "legacy");
    let snap = d.join("snap");
    snapshot_paused(vm, &sock, &snap, &disk, &d.join("copy.img"));
    // No backends at all.
    let o = common::restore(&snap, &["--mode", "eager"]);
    assert!(!o.status.success());
    let e = text(&o.stderr);
    assert!(
        e.contains("[block, net, vsock, rng]") && e.contains("--disk"),
        "{e}"
    );
    // A disk of another size.
    let small = d.join("small.img");
    std::fs::File::create(&small)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    let mut args = vec!["--mode".to_string(), "eager".into()];
    args.extend(devices(&small, &tap, &d.join("v2.sock")));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let o = common::restore(&snap, &args);
    assert!(!o.status.success());
    let e = text(&o.stderr);
    assert!(e.contains("block device 0") && e.contains("disk"), "{e}");
    // A migration to a destination without them: refused in the handshake, and the guest
    // runs on at the source.
    let disk2 = image(d, "disk2.img");
    let (src, sock) = soak(d, &devices(&disk2, &tap, &d.join("v3.sock")), "legacy");
    let to = format!("unix:{}", d.join("m.sock").display());
    let dst = common::destination(&to, &["--disk", disk2.to_str().unwrap()]);
    wait_for(&d.join("m.sock"));
    let (o, _) = common::migrate_bg(&sock, &to, "precopy", &[])
        .join()
        .unwrap();
    assert!(!o.status.success());
    let all = format!("{}{}", text(&o.stdout), text(&o.stderr));
    assert!(all.contains("[block, net, vsock, rng]"), "{all}");
    let before = common::heartbeats(&sock);
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        common::heartbeats(&sock) > before,
        "the source guest stopped after a refused migration"
    );
    drop((src, dst));
}
