//! End to end: Debian's cloud kernel booted by `faultline run --kernel` (ELF vmlinux, PVH entry)
//! must print its banner on our serial console. On this machine kind (PVM) guest kernel code is
//! emulated, so the kernel dies later on an emulation failure; on hardware KVM the same command
//! reaches the initramfs shell (not checked here).
//! The kernel and initramfs come from `scripts/linux-guest.sh`, run here if not cached.

mod common;

use std::io::{BufRead, BufReader};

use common::linux::guest_dir;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// Start `faultline run` with `args` and collect console lines until `want` returns true for
/// one (or `limit` passes); returns whether it did, and the console and stderr.
fn console_until(
    args: &[&std::ffi::OsStr],
    limit: Duration,
    mut want: impl FnMut(&str) -> bool,
) -> (bool, String, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_faultline"))
        .arg("run")
        .args(args)
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
    let mut seen = Vec::new();
    let found = loop {
        match rx.recv_timeout(limit.saturating_sub(t.elapsed())) {
            Ok(l) => {
                let hit = want(&l);
                seen.push(l);
                if hit {
                    break true;
                }
            }
            Err(_) => break false,
        }
    };
    let _ = child.kill();
    let o = child.wait_with_output().unwrap();
    (
        found,
        seen.join("\n"),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

#[test]
fn bzimage_through_the_64_bit_boot_protocol_prints_the_banner() {
    // The bzImage decompresses itself first, which is slow when emulated: a longer limit.
    let d = guest_dir();
    let (k, i) = (d.join("vmlinuz"), d.join("initramfs.cpio.gz"));
    let args: Vec<&std::ffi::OsStr> = vec![
        "--mem".as_ref(),
        "512M".as_ref(),
        "--kernel".as_ref(),
        k.as_os_str(),
        "--initrd".as_ref(),
        i.as_os_str(),
    ];
    let t = Instant::now();
    let (found, console, stderr) = console_until(&args, Duration::from_secs(400), |l| {
        l.contains("Linux version")
    });
    assert!(
        found,
        "no banner from the bzImage; console:\n{console}\nstderr:\n{stderr}"
    );
    assert!(
        console.contains("KASLR disabled"),
        "the decompressor ran: {console}"
    );
    eprintln!("bzImage banner after {:?}", t.elapsed());
}

#[test]
fn debian_kernel_banner_reaches_the_serial_console_and_sees_both_cpus() {
    let d = guest_dir();
    let (k, i) = (d.join("vmlinux"), d.join("initramfs.cpio.gz"));
    let args: Vec<&std::ffi::OsStr> = vec![
        "--mem".as_ref(),
        "512M".as_ref(),
        "--vcpus".as_ref(),
        "2".as_ref(),
        "--kernel".as_ref(),
        k.as_os_str(),
        "--initrd".as_ref(),
        i.as_os_str(),
    ];
    let t = Instant::now();
    let mut banner_at = None;
    // The banner first, then the CPUs found through our ACPI MADT.
    let (found, console, stderr) = console_until(&args, Duration::from_secs(180), |l| {
        if l.contains("Linux version") {
            banner_at = Some(t.elapsed());
        }
        l.contains("smpboot: Allowing 2 CPUs")
    });
    let banner = console.lines().find(|l| l.contains("Linux version"));
    let banner = banner.unwrap_or_else(|| {
        panic!("no 'Linux version' on the console; console:\n{console}\nstderr:\n{stderr}")
    });
    assert!(banner.contains("cloud-amd64"), "{banner}");
    assert!(
        found,
        "the kernel did not find 2 CPUs; console:\n{console}\nstderr:\n{stderr}"
    );
    assert!(
        console.contains("ACPI: Using ACPI (MADT) for SMP configuration"),
        "{console}"
    );
    eprintln!(
        "banner after {banner_at:?}, 2 CPUs found after {:?}",
        t.elapsed()
    );
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

/// virtio devices for a Linux guest: `faultline run --kernel K --disk IMG --rng` puts them on
/// the kernel's command line as `virtio_mmio.device=4K@BASE:IRQ` (Linux's in-tree driver; it
/// uses the legacy interrupt). Here the kernel stops on an emulation failure before it probes
/// them; it prints its command line first, which is what this checks (on hardware KVM the same
/// command boots with the devices).
#[test]
fn virtio_devices_reach_the_kernel_command_line() {
    let d = guest_dir();
    let (k, i) = (d.join("vmlinux"), d.join("initramfs.cpio.gz"));
    let tmp = tempfile::tempdir().unwrap();
    let img = tmp.path().join("disk.img");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    let args: Vec<&std::ffi::OsStr> = vec![
        "--mem".as_ref(),
        "512M".as_ref(),
        "--kernel".as_ref(),
        k.as_os_str(),
        "--initrd".as_ref(),
        i.as_os_str(),
        "--disk".as_ref(),
        img.as_os_str(),
        "--rng".as_ref(),
    ];
    let (found, console, stderr) = console_until(&args, Duration::from_secs(180), |l| {
        l.contains("Command line:")
    });
    assert!(
        found,
        "no command line on the console; console:\n{console}\nstderr:\n{stderr}"
    );
    let line = console
        .lines()
        .find(|l| l.contains("Command line:"))
        .unwrap();
    assert!(
        line.contains("virtio_mmio.device=4K@0xd0000000:16")
            && line.contains("virtio_mmio.device=4K@0xd0001000:17"),
        "{line}"
    );
}
