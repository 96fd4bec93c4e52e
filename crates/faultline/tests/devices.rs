//! End to end: vfio-user devices served by `faultline device serve`, probed by `faultline
//! device probe`, and attached to a microVM (`faultline run --vfio-user`) whose built-in guest
//! drives them from user mode. Real KVM, real sockets, two processes.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_faultline")
}

/// A `faultline device serve` process, killed on drop.
struct Served(Child);

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn serve(args: &[&str], sockets: &[&Path]) -> Served {
    let child = Command::new(bin())
        .args(["device", "serve"])
        .args(args)
        .stderr(Stdio::null())
        .spawn()
        .expect("start faultline device serve");
    let s = Served(child);
    let t = Instant::now();
    while !sockets
        .iter()
        .all(|p| std::os::unix::net::UnixStream::connect(p).is_ok())
    {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "device server did not listen within 10 s"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    s
}

/// Run a command with a deadline (a hang fails the test instead of stalling CI).
fn run_for(args: &[&str], limit: Duration) -> Output {
    let mut c = Command::new(bin())
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start faultline");
    let t = Instant::now();
    loop {
        if c.try_wait().expect("wait").is_some() {
            return c.wait_with_output().expect("output");
        }
        if t.elapsed() > limit {
            let _ = c.kill();
            let o = c.wait_with_output().expect("output");
            panic!(
                "faultline {args:?} did not finish within {limit:?}; stderr: {}",
                String::from_utf8_lossy(&o.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn kvm_present() {
    assert!(
        Path::new("/dev/kvm").exists(),
        "/dev/kvm is missing: these tests need KVM (run as root on a KVM host)"
    );
}

fn sockets(dir: &Path) -> (PathBuf, PathBuf) {
    (dir.join("gpio.sock"), dir.join("dma.sock"))
}

#[test]
fn guest_drives_gpio_and_dma_engine_through_the_pci_bus() {
    kvm_present();
    let dir = tempfile::tempdir().unwrap();
    let (g, d) = sockets(dir.path());
    let also = format!("dma:{}", d.display());
    let _srv = serve(
        &["gpio", "--socket", g.to_str().unwrap(), "--also", &also],
        &[&g, &d],
    );
    let o = run_for(
        &[
            "run",
            "--mem",
            "64M",
            "--guest",
            "devices",
            "--vfio-user",
            g.to_str().unwrap(),
            "--vfio-user",
            d.to_str().unwrap(),
            "--json-events",
            "--timeout",
            "60",
        ],
        Duration::from_secs(90),
    );
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success(),
        "run failed: {}\n{out}",
        String::from_utf8_lossy(&o.stderr)
    );
    let summary: serde_json::Value = out
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|v| v["event"] == "summary")
        .expect("a summary line")["summary"]
        .clone();
    let reports: Vec<(u64, u64)> = summary["reports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| (p[0].as_u64().unwrap(), p[1].as_u64().unwrap()))
        .collect();
    let get = |k: u64| -> Vec<u64> {
        reports
            .iter()
            .filter(|(key, _)| *key == k)
            .map(|&(_, v)| v)
            .collect()
    };
    // Enumeration through 0xCF8/0xCFC: host bridge, GPIO at 00:01.0, DMA engine at 00:02.0.
    assert_eq!(
        get(1),
        vec![0x29c0_8086, 0x0dc8_494f, 0x0d3a_fa17],
        "{reports:?}"
    );
    // GPIO: 256 output patterns read back on the looped-back inputs, MMIO forwarded.
    assert_eq!(get(6), vec![256]);
    assert_eq!(get(2), vec![0], "GPIO mismatches");
    // DMA engine: 32 descriptors of 64 KiB copied and verified by the guest.
    assert_eq!(get(3), vec![32], "DMA copies verified by the guest");
    assert_eq!(get(4), vec![0], "DMA copies failed");
    assert_eq!(get(5), vec![32], "the engine's COMPLETED register");
    // The MSI-X completion interrupt (vector 0x41 as the guest programmed it) reached the
    // guest's LAPIC through eventfd -> irqfd.
    assert!(get(0x100).contains(&0x41), "{reports:?}");
    assert_eq!(summary["vcpus"][0]["exit_code"], 0);
    let devs = summary["devices"].as_array().unwrap();
    assert_eq!(devs.len(), 2);
    let dma = &devs[1];
    assert_eq!(dma["id"], "fa17:0d3a");
    assert_eq!(
        dma["mapped_areas"], 1,
        "BAR2's sparse area mapped into the guest"
    );
    assert_eq!(dma["ioeventfds"], 1, "the doorbell is an ioeventfd");
    assert_eq!(dma["irqfd_vectors"], 2);
    assert!(dma["msi_routes_set"].as_u64().unwrap() >= 1);
    assert_eq!(dma["errors"], 0);
    // 32 doorbells went through the ioeventfd: fewer exits than one per register access.
    assert!(dma["mmio_exits"].as_u64().unwrap() < 64, "{dma}");
    assert_eq!(devs[0]["mmio_exits"], 1024, "GPIO: 4 accesses x 256");

    // The guest's 8-byte store to BAR2+0x1000 did not exit: that area is a KVM slot over
    // the device's memfd (the GPIO's 1024 exits above are the trapped accesses).
    assert_eq!(get(7), vec![0xcafe_0001]);
}

#[test]
fn probe_shows_what_a_client_sees() {
    let dir = tempfile::tempdir().unwrap();
    let (_, d) = sockets(dir.path());
    let _srv = serve(&["dma", "--socket", d.to_str().unwrap()], &[&d]);
    let o = run_for(
        &["device", "probe", "--socket", d.to_str().unwrap()],
        Duration::from_secs(20),
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let text = String::from_utf8_lossy(&o.stdout);
    for want in [
        "vfio-user 0.1",
        "max_data_xfer_size=1048576",
        "region 2 BAR2   size 0x10000 [read,write,mmap,caps] sparse mmap: 0x1000+0xf000 (fd)",
        "irq 2 MSI-X count 2",
        "migration: v2",
        "System peripheral [0880]: Device fa17:0d3a (rev 01)",
        "MSI-X: Enable- Count=2 Masked-",
        "Vector table: BAR=0 offset=00000800",
        "Express (v2) Endpoint",
        "Device Serial Number",
        "[size=64K]",
    ] {
        assert!(text.contains(want), "missing {want:?} in:\n{text}");
    }
    let j = run_for(
        &["device", "probe", "--socket", d.to_str().unwrap(), "--json"],
        Duration::from_secs(20),
    );
    let v: serde_json::Value = serde_json::from_slice(&j.stdout).unwrap();
    assert_eq!(v["regions"][2]["sparse_mmap"][0][0], 0x1000);
    assert_eq!(v["irqs"][2]["count"], 2);
}

#[test]
fn clear_errors_for_missing_or_bogus_servers() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nobody.sock");
    let o = run_for(
        &["device", "probe", "--socket", missing.to_str().unwrap()],
        Duration::from_secs(20),
    );
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("connecting to"));
    // A server that accepts and says nothing: the probe times out instead of hanging.
    let silent = dir.path().join("silent.sock");
    let l = std::os::unix::net::UnixListener::bind(&silent).unwrap();
    let h = std::thread::spawn(move || {
        let c = l.accept();
        std::thread::sleep(Duration::from_secs(3));
        drop(c);
    });
    let o = run_for(
        &[
            "device",
            "probe",
            "--socket",
            silent.to_str().unwrap(),
            "--timeout-ms",
            "500",
        ],
        Duration::from_secs(20),
    );
    assert!(!o.status.success());
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(e.contains("no reply to Version"), "{e}");
    h.join().unwrap();
    // A VM asked to attach a device that is not there fails before the guest starts.
    kvm_present();
    let o = run_for(
        &[
            "run",
            "--mem",
            "64M",
            "--guest",
            "devices",
            "--vfio-user",
            missing.to_str().unwrap(),
        ],
        Duration::from_secs(30),
    );
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("vfio-user device at"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
}

#[test]
fn bench_vfio_user_prints_the_json_interface() {
    let o = run_for(
        &["bench", "vfio-user", "--json", "--quick"],
        Duration::from_secs(120),
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&o.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    for case in ["region-rw", "dma", "dma-msg", "irq"] {
        let l = lines
            .iter()
            .find(|l| l["case"] == case && l["impl"] == "faultline")
            .unwrap_or_else(|| panic!("no {case} line"));
        assert_eq!(l["bench"], "vfio-user");
        for k in ["p50_us", "p99_us", "gbps"] {
            assert!(l[k].is_number(), "{case}: {k}");
        }
    }
    assert!(lines.iter().any(|l| l["impl"] == "rust-vmm"));
    let dma = lines
        .iter()
        .find(|l| l["case"] == "dma" && l["impl"] == "faultline")
        .unwrap();
    assert!(dma["gbps"].as_f64().unwrap() > 0.0);
}
