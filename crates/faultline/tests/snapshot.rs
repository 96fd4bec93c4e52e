//! End to end: snapshots through the API of a running `faultline run`, restores in every mode,
//! the external page handler (honest, lying, dying) and bad snapshots. Real KVM, real
//! userfaultfd, real Unix sockets; the binary started as a user would.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Output, Stdio};
use std::time::{Duration, Instant};

use common::{bin, copy_dir, kvm_present, restore, text, wait_for};

fn run(args: &[&str]) -> Output {
    bin().args(args).output().expect("run faultline")
}

/// A running `faultline run ... --api-sock`, killed on drop.
struct Running {
    child: Child,
    sock: PathBuf,
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_vm(dir: &Path, name: &str, vcpus: u32, guest: &str) -> Running {
    kvm_present();
    let sock = dir.join(format!("{name}.sock"));
    let child = bin()
        .args([
            "run",
            "--mem",
            "64M",
            "--vcpus",
            &vcpus.to_string(),
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
    wait_for(&sock);
    // Let the workload fill its memory and send heartbeats.
    std::thread::sleep(Duration::from_millis(600));
    Running { child, sock }
}

fn snapshot(vm: &Running, out: &Path, page_checksums: bool) -> serde_json::Value {
    snapshot_at(&vm.sock, out, page_checksums)
}

fn snapshot_at(sock: &Path, out: &Path, page_checksums: bool) -> serde_json::Value {
    let mut args = vec!["snapshot".to_string(), "--api-sock".into()];
    args.push(sock.display().to_string());
    args.push("--out".into());
    args.push(out.display().to_string());
    if page_checksums {
        args.push("--page-checksums".into());
    }
    let o = bin().args(&args).output().unwrap();
    assert!(o.status.success(), "snapshot: {}", text(&o.stderr));
    serde_json::from_str(text(&o.stdout).trim()).unwrap()
}

fn restored_json(o: &Output) -> serde_json::Value {
    assert!(o.status.success(), "restore failed: {}", text(&o.stderr));
    let line = text(&o.stdout)
        .lines()
        .last()
        .unwrap_or_default()
        .to_string();
    serde_json::from_str(&line).unwrap_or_else(|e| panic!("{line}: {e}"))
}

#[test]
fn every_mode_restores_a_snapshot_taken_mid_dirty_with_1_and_2_vcpus() {
    let t = tempfile::tempdir().unwrap();
    for vcpus in [1u32, 2] {
        let vm = start_vm(t.path(), &format!("vm{vcpus}"), vcpus, "dirty");
        let snap = t.path().join(format!("snap{vcpus}"));
        let info = snapshot(&vm, &snap, false);
        drop(vm);
        let want = info["checksums"].clone();
        assert_eq!(want.as_array().unwrap().len(), vcpus as usize);
        // prefetch twice: the first records the working set, the second pushes it.
        for mode in ["eager", "mmap", "lazy", "prefetch", "prefetch"] {
            let v = restored_json(&restore(&snap, &["--mode", mode, "--verify"]));
            assert_eq!(v["verify_matches_snapshot"], true, "{mode}: {v}");
            let got: Vec<_> = v["summary"]["vcpus"]
                .as_array()
                .unwrap()
                .iter()
                .map(|c| c["checksum"].clone())
                .collect();
            assert_eq!(serde_json::Value::from(got), want, "{mode}");
        }
        assert!(
            snap.join("working-set").exists(),
            "prefetch recorded no working set"
        );
    }
}

#[test]
fn resume_continues_where_the_guest_was_paused_and_snapshots_chain() {
    let t = tempfile::tempdir().unwrap();
    let vm = start_vm(t.path(), "src", 2, "dirty");
    let s1 = t.path().join("s1");
    let info = snapshot(&vm, &s1, false);
    drop(vm);
    let hb: Vec<u64> = info["heartbeats"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h.as_u64().unwrap())
        .collect();
    assert!(hb.iter().all(|&h| h >= 1), "{info}");
    // Resume: the guest's heartbeat counter (in its registers and stack) goes on from there.
    let v = restored_json(&restore(&s1, &["--mode", "lazy", "--seconds", "0.5"]));
    let first = &v["first_heartbeat_after_restore"];
    let vcpu = first["vcpu"].as_u64().unwrap() as usize;
    assert_eq!(first["n"].as_u64().unwrap(), hb[vcpu] + 1, "{v}");
    assert!(v["first_instruction_ms"].as_f64().unwrap() < 1000.0);

    // Chain: snapshot the restored VM, restore that.
    let sock = t.path().join("r.sock");
    let mut child = bin()
        .arg("restore")
        .arg(&s1)
        .args(["--mode", "lazy", "--timeout", "60", "--api-sock"])
        .arg(&sock)
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    wait_for(&sock);
    std::thread::sleep(Duration::from_millis(300));
    let restored = Running {
        child: bin().arg("--version").spawn().unwrap(),
        sock,
    };
    let s2 = t.path().join("s2");
    let info2 = snapshot(&restored, &s2, false);
    let _ = child.kill();
    let _ = child.wait();
    let hb2 = info2["heartbeats"][0].as_u64().unwrap();
    assert!(
        hb2 > hb[0],
        "the chained snapshot is later: {hb2} vs {}",
        hb[0]
    );
    let v = restored_json(&restore(&s2, &["--mode", "prefetch", "--verify"]));
    assert_eq!(v["verify_matches_snapshot"], true);
}

fn page_server(dir: &Path, name: &str, extra: &[&str]) -> (Child, PathBuf) {
    let sock = dir.join(format!("{name}.sock"));
    let child = bin()
        .args(["page-server", "--once", "--socket"])
        .arg(&sock)
        .arg("--snapshot-dir")
        .arg(dir.join("snap"))
        .args(extra)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_for(&sock);
    (child, sock)
}

#[test]
fn external_handler_serves_lies_are_caught_and_death_is_reported() {
    let t = tempfile::tempdir().unwrap();
    let vm = start_vm(t.path(), "src", 1, "dirty");
    let snap = t.path().join("snap");
    snapshot(&vm, &snap, true);
    drop(vm);
    let s = snap.to_str().unwrap();

    // Honest handler: every page checked against its CRC, and the guest's checksum matches.
    let (mut h, sock) = page_server(t.path(), "honest", &[]);
    let o = restore(
        Path::new(s),
        &[
            "--mode",
            "lazy",
            "--verify",
            "--page-handler",
            sock.to_str().unwrap(),
        ],
    );
    let v = restored_json(&o);
    assert_eq!(v["verify_matches_snapshot"], true);
    assert_eq!(v["pages_checked_against_snapshot"], 4096);
    assert!(h.wait().unwrap().success());

    // A handler that serves wrong pages: caught, naming the page.
    let (mut h, sock) = page_server(t.path(), "liar", &["--corrupt-every", "7"]);
    let o = restore(
        Path::new(s),
        &[
            "--mode",
            "lazy",
            "--verify",
            "--page-handler",
            sock.to_str().unwrap(),
        ],
    );
    assert!(!o.status.success());
    let e = text(&o.stderr);
    assert!(
        e.contains("the page handler served wrong data") && e.contains("guest page"),
        "{e}"
    );
    let _ = h.wait();

    // A handler that stops serving and dies: the VM says so, promptly, instead of hanging.
    let (mut h, sock) = page_server(t.path(), "dying", &[]);
    let pid = h.id() as i32;
    let killer = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(30));
        // SAFETY: signals to our own child process.
        unsafe { libc_kill(pid, 19) }; // SIGSTOP: faults now wait
        std::thread::sleep(Duration::from_millis(700));
        // SAFETY: as above.
        unsafe { libc_kill(pid, 9) };
    });
    let t0 = Instant::now();
    let o = restore(
        Path::new(s),
        &["--mode", "lazy", "--page-handler", sock.to_str().unwrap()],
    );
    killer.join().unwrap();
    let _ = h.wait();
    assert!(!o.status.success());
    let e = text(&o.stderr);
    assert!(e.contains("closed its connection"), "{e}");
    assert!(t0.elapsed() < Duration::from_secs(15), "{:?}", t0.elapsed());

    // No handler listening: a clear error before the VM starts.
    let o = restore(
        Path::new(s),
        &[
            "--mode",
            "lazy",
            "--page-handler",
            "/nonexistent/h.sock",
            "--handler-timeout",
            "1",
        ],
    );
    assert!(!o.status.success());
    assert!(
        text(&o.stderr).contains("cannot connect"),
        "{}",
        text(&o.stderr)
    );
}

unsafe extern "C" {
    #[link_name = "kill"]
    fn libc_kill(pid: i32, sig: i32) -> i32;
}

#[test]
fn bad_snapshots_are_refused_with_a_clear_error() {
    let t = tempfile::tempdir().unwrap();
    let vm = start_vm(t.path(), "src", 1, "dirty");
    let good = t.path().join("good");
    snapshot(&vm, &good, false);
    drop(vm);
    let case = |name: &str, damage: &dyn Fn(&Path), mode: &str, expect: &str| {
        let d = t.path().join(name);
        copy_dir(&good, &d);
        damage(&d);
        let o = restore(&d, &["--mode", mode, "--verify"]);
        assert!(!o.status.success(), "{name}: restore succeeded");
        let e = text(&o.stderr);
        assert!(e.contains(expect), "{name}: expected '{expect}' in: {e}");
        assert!(!e.contains("panicked"), "{name}: {e}");
    };
    let edit_manifest = |d: &Path, f: &dyn Fn(&mut serde_json::Value)| {
        let p = d.join("manifest.json");
        let mut v: serde_json::Value = serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap();
        f(&mut v);
        std::fs::write(&p, serde_json::to_vec(&v).unwrap()).unwrap();
    };
    case(
        "truncated",
        &|d| {
            let f = std::fs::OpenOptions::new()
                .write(true)
                .open(d.join("memory"))
                .unwrap();
            f.set_len(1 << 20).unwrap();
        },
        "lazy",
        "truncated or replaced",
    );
    case(
        "version",
        &|d| edit_manifest(d, &|v| v["version"] = 99.into()),
        "eager",
        "version Some(99)",
    );
    case(
        "state-crc",
        &|d| {
            let p = d.join("state.bin");
            let mut b = std::fs::read(&p).unwrap();
            b[100] ^= 1;
            std::fs::write(&p, b).unwrap();
        },
        "lazy",
        "the snapshot is corrupt",
    );
    case(
        "mem-size",
        &|d| edit_manifest(d, &|v| v["config"]["mem_bytes"] = (128u64 << 20).into()),
        "eager",
        "memory file of 67108864 bytes for a VM of 134217728 bytes",
    );
    case(
        "no-manifest",
        &|d| std::fs::remove_file(d.join("manifest.json")).unwrap(),
        "lazy",
        "manifest.json",
    );
    // A flipped byte in guest memory: eager refuses before the VM starts; lazy never serves
    // the chunk and stops the VM with the chunk named.
    let flip = |d: &Path| {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(d.join("memory"))
            .unwrap();
        let off = 4 << 20; // the first page of the workload slice
        let mut b = [0u8; 1];
        f.read_exact_at(&mut b, off).unwrap();
        f.write_all_at(&[b[0] ^ 0xff], off).unwrap();
    };
    case(
        "mem-crc-eager",
        &flip,
        "eager",
        "memory chunk 64 (guest-physical 0x400000",
    );
    case("mem-crc-lazy", &flip, "lazy", "could not be loaded");
    // The original is still good.
    let v = restored_json(&restore(&good, &["--mode", "lazy", "--verify"]));
    assert_eq!(v["verify_matches_snapshot"], true);
}

#[test]
fn bench_restore_json_lines_have_the_interface_keys() {
    kvm_present();
    let o = run(&[
        "bench",
        "restore",
        "--json",
        "--runs",
        "1",
        "--mem-mib",
        "64",
        "--touch-mib",
        "16",
    ]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    let modes: Vec<String> = text(&o.stdout)
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            let keys: Vec<&String> = v.as_object().unwrap().keys().collect();
            assert_eq!(
                keys,
                [
                    "bench",
                    "bytes_read",
                    "faults",
                    "first_instruction_ms",
                    "mode",
                    "workload_ms"
                ],
                "{l}"
            );
            assert_eq!(v["bench"], "restore");
            assert!(v["workload_ms"].as_f64().unwrap() > 0.0);
            v["mode"].as_str().unwrap().to_string()
        })
        .collect();
    assert_eq!(modes, ["eager", "mmap", "lazy", "prefetch", "warm"]);
}
