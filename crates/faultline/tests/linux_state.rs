//! End to end: a Linux guest (Debian's cloud kernel) snapshotted part-way through its boot,
//! restored, then live-migrated three times (pre-copy, post-copy, hybrid), goes on printing
//! exactly the console lines an uninterrupted boot prints (timestamps aside), up to the same
//! point, and stops where that boot stops. Under PVM the kernel is emulated and stops on an
//! instruction the emulator lacks a little after its "Memory:" line; on hardware KVM the
//! same journey goes on to the initramfs.
//!
//! The state this exercises: the vCPU (registers, MSRs, LAPIC and its timer), the in-kernel
//! irqchip (PIC, IOAPIC), the PIT, kvmclock, and COM1 (vm-superio's `SerialState`).

mod common;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::linux::guest_dir;
use common::{Proc, api, bin, kvm_present, text, wait_for};

/// Where the snapshot is taken: a line early in the boot.
const AT: &str = "ACPI: Early table checksum verification disabled";
/// Where the comparison ends: the last line the kernel prints here before it stops.
const END: &str = "Memory: ";

fn kernel(console: &Path) -> Vec<String> {
    let d = guest_dir();
    vec![
        "--mem".into(),
        "512M".into(),
        "--kernel".into(),
        d.join("vmlinux").display().to_string(),
        "--initrd".into(),
        d.join("initramfs.cpio.gz").display().to_string(),
        "--console".into(),
        console.display().to_string(),
    ]
}

fn read(p: &Path) -> String {
    String::from_utf8_lossy(&std::fs::read(p).unwrap_or_default()).into_owned()
}

/// Wait until `console` holds `want` (a substring) or, with `want` empty, `lines` more
/// lines than `base`.
fn wait_console(console: &Path, want: &str, base: usize, lines: usize, limit: Duration) {
    let t = Instant::now();
    loop {
        let c = read(console);
        if (!want.is_empty() && c.contains(want))
            || (want.is_empty() && c.lines().count() >= base + lines)
        {
            return;
        }
        assert!(
            t.elapsed() < limit,
            "{}: no {want:?} (or {lines} more lines) after {limit:?}:\n{c}",
            console.display()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The kernel's lines up to [`END`], timestamps cut; the one line whose value differs from
/// boot to boot (the kvmclock's scheduler offset) left out.
fn kernel_lines(console: &str) -> Vec<String> {
    let mut out = Vec::new();
    for l in console.lines() {
        let Some(rest) = l.strip_prefix('[') else {
            continue;
        };
        let Some((_, line)) = rest.split_once("] ") else {
            continue;
        };
        if line.starts_with("kvm-clock: using sched offset") {
            continue;
        }
        out.push(line.trim_end().to_string());
        if line.starts_with(END) {
            break;
        }
    }
    out
}

/// A destination for `faultline migrate --to unix:SOCK`, with its console and API socket.
fn destination(dir: &Path, n: usize) -> (Proc, String, PathBuf, PathBuf) {
    let m = dir.join(format!("m{n}.sock"));
    let api_sock = dir.join(format!("d{n}.sock"));
    let console = dir.join(format!("console-{n}.txt"));
    let to = format!("unix:{}", m.display());
    let p = common::destination(
        &to,
        &[
            "--api-sock",
            api_sock.to_str().unwrap(),
            "--console",
            console.to_str().unwrap(),
        ],
    );
    wait_for(&m);
    (p, to, api_sock, console)
}

#[test]
fn a_linux_guest_through_snapshot_and_three_migrations_prints_what_an_uninterrupted_boot_prints() {
    kvm_present();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // The uninterrupted boot, alongside.
    let reference = d.join("reference.txt");
    let reference_vm = Proc(
        bin()
            .arg("run")
            .args(kernel(&reference))
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    // The journey: boot, pause at AT, snapshot, stop.
    let c0 = d.join("console-0.txt");
    let src_sock = d.join("src.sock");
    let src = Proc(
        bin()
            .arg("run")
            .args(kernel(&c0))
            .arg("--api-sock")
            .arg(&src_sock)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    wait_console(&c0, AT, 0, 0, Duration::from_secs(180));
    api(&src_sock, "PUT", "/vm/pause");
    let snap = d.join("snap");
    let o = bin()
        .args(["snapshot", "--api-sock"])
        .arg(&src_sock)
        .arg("--out")
        .arg(&snap)
        .output()
        .unwrap();
    assert!(o.status.success(), "snapshot: {}", text(&o.stderr));
    api(&src_sock, "PUT", "/vm/stop");
    src.finish(Duration::from_secs(10));
    // Restore (lazy), and let it print two lines.
    let c1 = d.join("console-1.txt");
    let r_sock = d.join("r.sock");
    let restored = common::spawn_restore(
        &snap,
        &[
            "--mode",
            "lazy",
            "--api-sock",
            r_sock.to_str().unwrap(),
            "--console",
            c1.to_str().unwrap(),
        ],
    );
    wait_for(&r_sock);
    wait_console(&c1, "", 0, 2, Duration::from_secs(120));
    // Three hops, back to back (the guest reaches the end of what it can do here within
    // some 20 s of the snapshot point).
    let mut consoles = vec![c0, c1.clone()];
    let mut from = (restored, r_sock, c1);
    let mut ends = Vec::new();
    for (n, mode) in [(2, "precopy"), (3, "postcopy"), (4, "hybrid")] {
        let (p, to, api_sock, console) = destination(d, n);
        wait_for(&from.1);
        let (o, _) = common::migrate_bg(&from.1, &to, mode, &[]).join().unwrap();
        assert!(
            o.status.success(),
            "migrate --mode {mode}: {}\n{}",
            text(&o.stdout),
            text(&o.stderr)
        );
        consoles.push(console.clone());
        ends.push(from.0);
        from = (p, api_sock, console);
    }
    wait_console(&from.2, END, 0, 0, Duration::from_secs(180));
    wait_console(&reference, END, 0, 0, Duration::from_secs(180));
    let journey: String = consoles.iter().map(|c| read(c)).collect();
    let want = kernel_lines(&read(&reference));
    let got = kernel_lines(&journey);
    assert!(
        want.len() > 40 && want.iter().any(|l| l.starts_with(AT)),
        "the reference boot: {want:#?}"
    );
    let at = want.iter().position(|l| l.starts_with(AT)).unwrap();
    assert_eq!(
        got, want,
        "the console of the journey (snapshot after line {at}) differs from the uninterrupted boot's"
    );
    assert!(
        !read(&consoles[1]).is_empty(),
        "the restored guest printed nothing before the first migration"
    );
    // And it stops where the uninterrupted boot stops (here, the emulator's limit).
    let stop = |o: std::process::Output| {
        let e = text(&o.stderr);
        e.split_once("at guest RIP ")
            .map(|(_, r)| r.split_whitespace().next().unwrap_or("").to_string())
            .unwrap_or_else(|| format!("(no stop: {e})"))
    };
    let want_stop = stop(reference_vm.finish(Duration::from_secs(120)));
    let got_stop = stop(from.0.finish(Duration::from_secs(120)));
    assert_eq!(got_stop, want_stop, "where the guest stopped");
    drop(ends);
}
