//! End to end: Debian's cloud kernel booted by `faultline run --kernel` (ELF vmlinux, PVH entry)
//! must print its banner on our serial console. On this machine kind (PVM) guest kernel code is
//! emulated, so the kernel dies later on an emulation failure; on hardware KVM the same command
//! reaches the initramfs shell (not checked here).
//! The kernel and initramfs come from `scripts/linux-guest.sh`, run here if not cached.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// The kernel and initramfs, fetched once per test process by `scripts/linux-guest.sh` if
/// they are not cached yet (so `cargo test` works on a fresh clone).
fn guest_dir() -> PathBuf {
    static DIR: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    DIR.get_or_init(|| {
        let top = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
        let d = top.join(".cache/linux");
        let have = |d: &PathBuf| {
            ["vmlinux", "initramfs.cpio.gz"]
                .iter()
                .all(|f| d.join(f).exists())
        };
        if !have(&d) {
            let st = Command::new("bash")
                .arg(top.join("scripts/linux-guest.sh"))
                .status()
                .expect("run scripts/linux-guest.sh");
            assert!(
                st.success() && have(&d),
                "scripts/linux-guest.sh could not fetch Debian's kernel and build the initramfs \
                 (needs Debian's package mirror and root for apt-get)"
            );
        }
        d
    })
    .clone()
}

#[test]
fn debian_kernel_banner_reaches_the_serial_console_and_sees_both_cpus() {
    let d = guest_dir();
    let mut child = Command::new(env!("CARGO_BIN_EXE_faultline"))
        .args(["run", "--mem", "512M", "--vcpus", "2", "--kernel"])
        .arg(d.join("vmlinux"))
        .arg("--initrd")
        .arg(d.join("initramfs.cpio.gz"))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let out = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let t = Instant::now();
    let limit = Duration::from_secs(180);
    let mut seen = Vec::new();
    // The banner first, then the CPUs found through our ACPI MADT.
    let mut banner = None;
    let found = loop {
        match rx.recv_timeout(limit.saturating_sub(t.elapsed())) {
            Ok(l) if l.contains("Linux version") => {
                eprintln!("banner after {:?}: {l}", t.elapsed());
                banner = Some(l);
            }
            Ok(l) if l.contains("smpboot: Allowing 2 CPUs") => break true,
            Ok(l) => seen.push(l),
            Err(_) => break false,
        }
    };
    let _ = child.kill();
    let o = child.wait_with_output().unwrap();
    let console = seen.join("\n");
    let stderr = String::from_utf8_lossy(&o.stderr);
    let banner = banner.unwrap_or_else(|| {
        panic!("no 'Linux version' on the console within {limit:?}; console:\n{console}\nstderr:\n{stderr}")
    });
    assert!(banner.contains("cloud-amd64"), "{banner}");
    assert!(
        found,
        "the kernel did not find 2 CPUs within {limit:?}; console:\n{console}\nstderr:\n{stderr}"
    );
    assert!(
        console.contains("ACPI: Using ACPI (MADT) for SMP configuration"),
        "{console}"
    );
    eprintln!("2 CPUs found after {:?}", t.elapsed());
}

#[test]
fn bad_kernels_are_refused_before_the_vm_starts() {
    let dir = tempfile::tempdir().unwrap();
    let junk = dir.path().join("junk");
    std::fs::write(&junk, vec![0x5a; 100_000]).unwrap();
    let d = guest_dir();
    let cases: [(Vec<String>, &str); 4] = [
        (
            vec!["--kernel".into(), "/nonexistent/vmlinux".into()],
            "cannot read kernel",
        ),
        (
            vec!["--kernel".into(), junk.display().to_string()],
            "not a bootable kernel",
        ),
        (
            vec![
                "--kernel".into(),
                d.join("vmlinux").display().to_string(),
                "--initrd".into(),
                "/nonexistent/initrd".into(),
            ],
            "cannot read initrd",
        ),
        (
            vec![
                "--kernel".into(),
                d.join("vmlinux").display().to_string(),
                "--vcpus".into(),
                "33".into(),
            ],
            "1..=32 vCPUs",
        ),
    ];
    for (args, want) in cases {
        let o = Command::new(env!("CARGO_BIN_EXE_faultline"))
            .args(["run", "--mem", "64M"])
            .args(&args)
            .output()
            .unwrap();
        let e = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "{args:?} succeeded");
        assert!(e.contains(want), "{args:?}: {e}");
        assert!(!e.contains("panicked"), "{args:?}: {e}");
    }
}
