//! End to end: the `faultline` binary started as a user would start it.

use std::process::{Command, Output};

fn faultline(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_faultline"))
        .args(args)
        .output()
        .expect("run faultline")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn probe_reports_features_as_json() {
    let o = faultline(&["probe", "--json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_str(stdout(&o).trim()).unwrap();
    let features: Vec<&str> = v["features"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f.as_str().unwrap())
        .collect();
    for f in ["MOVE", "POISON", "WP_ASYNC", "MINOR_SHMEM"] {
        assert!(features.contains(&f), "{features:?}");
    }
}

#[test]
fn demo_serves_and_verifies() {
    let o = faultline(&["memx-demo", "--mem-mib", "16", "--json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_str(stdout(&o).trim()).unwrap();
    assert_eq!(v["verified"], true);
    assert_eq!(v["stats"]["pages"], 16 * 256);
    assert!(v["faults_on_demand"].as_u64().unwrap() > 0);
    assert_eq!(v["stats"]["errors"], 0);
}

#[test]
fn bench_uffd_json_lines_have_the_interface_keys() {
    let o = faultline(&["bench", "uffd", "--json", "--faults", "64", "--runs", "1"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let lines: Vec<serde_json::Value> = stdout(&o)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l}: {e}")))
        .collect();
    assert_eq!(
        lines.len(),
        4 * 2 * 2,
        "4 cases x 2 thread counts x 2 impls"
    );
    let mut seen = std::collections::BTreeSet::new();
    for l in &lines {
        let keys: Vec<&String> = l.as_object().unwrap().keys().collect();
        assert_eq!(
            keys,
            [
                "bench",
                "case",
                "impl",
                "median_ns",
                "p99_ns",
                "pages",
                "pages_per_s",
                "threads"
            ],
            "{l}"
        );
        assert_eq!(l["bench"], "uffd");
        assert!(l["median_ns"].as_u64().unwrap() > 0);
        assert!(l["p99_ns"].as_u64().unwrap() >= l["median_ns"].as_u64().unwrap());
        assert!(l["pages_per_s"].as_u64().unwrap() > 0);
        seen.insert((
            l["case"].as_str().unwrap().to_string(),
            l["impl"].as_str().unwrap().to_string(),
            l["threads"].as_u64().unwrap(),
        ));
    }
    for case in ["copy-4k", "copy-64k", "zeropage", "continue"] {
        for imp in ["raw", "faultline"] {
            for t in [1, 2] {
                assert!(
                    seen.contains(&(case.to_string(), imp.to_string(), t)),
                    "{case} {imp} {t}"
                );
            }
        }
    }
}

#[test]
fn bad_command_lines_fail_clearly() {
    for args in [
        &["bench", "uffd", "--case", "copy-8k"][..],
        &["bench", "uffd", "--threads", "0"],
        &["memx-demo", "--mem-mib", "0"],
        &["no-such-command"],
    ] {
        let o = faultline(args);
        assert!(!o.status.success(), "{args:?} succeeded");
        let e = stderr(&o);
        assert!(e.contains("error"), "{args:?}: {e}");
        assert!(!e.contains("panicked"), "{args:?}: {e}");
    }
}

#[test]
fn run_every_workload_as_a_user_would() {
    for guest in ["fill", "random", "verify"] {
        for vcpus in ["1", "2"] {
            let o = faultline(&[
                "run",
                "--mem",
                "36M",
                "--vcpus",
                vcpus,
                "--guest",
                guest,
                "--json-events",
            ]);
            assert!(o.status.success(), "{guest}/{vcpus}: {}", stderr(&o));
            let last: serde_json::Value =
                serde_json::from_str(stdout(&o).lines().last().unwrap()).unwrap();
            assert_eq!(last["event"], "summary");
            assert_eq!(last["summary"]["checksums_verified"], true, "{last}");
            assert_eq!(
                last["summary"]["vcpus"].as_array().unwrap().len(),
                vcpus.parse::<usize>().unwrap()
            );
        }
    }
    for guest in ["dirty", "read"] {
        let o = faultline(&[
            "run",
            "--mem",
            "36M",
            "--vcpus",
            "2",
            "--guest",
            guest,
            // Long enough for 3 beats each after a fill that is slow on a loaded machine.
            "--seconds",
            "1.5",
            "--json-events",
        ]);
        assert!(o.status.success(), "{guest}: {}", stderr(&o));
        let out = stdout(&o);
        let beats = out.lines().filter(|l| l.contains("\"heartbeat\"")).count();
        assert!(beats >= 2 * 3, "{guest}: {beats} heartbeats\n{out}");
    }
}

#[test]
fn run_rejects_bad_input_clearly() {
    let cases: [(&[&str], &str); 5] = [
        (&["run", "--guest", "nope"], "unknown workload"),
        (&["run", "--mem", "64Q"], "is not a size"),
        (&["run", "--mem", "200G"], "RAM"),
        (&["run", "--vcpus", "0"], "vcpus"),
        (&["run", "--mem", "3M"], "more than"),
    ];
    for (args, want) in cases {
        let o = faultline(args);
        assert!(!o.status.success(), "{args:?} succeeded");
        let e = stderr(&o);
        assert!(e.contains(want), "{args:?}: {e}");
        assert!(!e.contains("panicked"), "{args:?}: {e}");
    }
}

#[test]
fn bench_vm_json_lines() {
    let o = faultline(&["bench", "vm", "--json", "--boots", "1", "--seconds", "0.3"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let lines: Vec<serde_json::Value> = stdout(&o)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines[0]["case"], "boot-to-first-heartbeat");
    assert_eq!(lines[0]["mem_mib"], 1024);
    assert!(lines[0]["median_ms"].as_f64().unwrap() > 0.0);
    assert_eq!(lines[1]["case"], "dirty-rate");
    assert!(lines[1]["guest_pages_per_s"].as_u64().unwrap() > 0);
    assert!(lines[1]["native_pages_per_s"].as_u64().unwrap() > 0);
}

/// One HTTP/1.1 request over a Unix socket; returns (status, body).
fn http(sock: &std::path::Path, method: &str, path: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let mut s = std::os::unix::net::UnixStream::connect(sock).expect("connect to the API socket");
    s.set_read_timeout(Some(std::time::Duration::from_secs(30)))
        .unwrap();
    write!(s, "{method} {path} HTTP/1.1\r\nHost: localhost\r\nContent-Length: 0\r\nConnection: close\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let status = out.split_whitespace().nth(1).unwrap().parse().unwrap();
    let body = out.split("\r\n\r\n").nth(1).unwrap_or("").to_string();
    (status, body)
}

#[test]
fn control_api_pause_resume_stop_over_a_unix_socket() {
    use std::time::{Duration, Instant};
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("api.sock");
    let child = Command::new(env!("CARGO_BIN_EXE_faultline"))
        .args([
            "run",
            "--mem",
            "36M",
            "--vcpus",
            "2",
            "--guest",
            "dirty",
            "--json-events",
            "--api-sock",
        ])
        .arg(&sock)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let t = Instant::now();
    while !sock.exists() {
        assert!(t.elapsed() < Duration::from_secs(10), "no API socket");
        std::thread::sleep(Duration::from_millis(20));
    }
    // Pause only once every vCPU beats (its fill phase is slow on a loaded machine): the
    // pause must fall between heartbeats to show as a gap.
    loop {
        let st: serde_json::Value =
            serde_json::from_str(&http(&sock, "GET", "/vm/stats").1).unwrap();
        if st["vcpus"]
            .as_array()
            .is_some_and(|v| v.len() == 2 && v.iter().all(|c| c["heartbeats"].as_u64() >= Some(1)))
        {
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(30), "no heartbeats: {st}");
        std::thread::sleep(Duration::from_millis(20));
    }
    let (code, body) = http(&sock, "GET", "/vm");
    assert_eq!(code, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["state"], "running");
    assert_eq!(v["config"]["vcpus"], 2);
    assert_eq!(http(&sock, "PUT", "/vm/pause").0, 204);
    let v: serde_json::Value = serde_json::from_str(&http(&sock, "GET", "/vm").1).unwrap();
    assert_eq!(v["state"], "paused");
    let before: serde_json::Value =
        serde_json::from_str(&http(&sock, "GET", "/vm/stats").1).unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let after: serde_json::Value =
        serde_json::from_str(&http(&sock, "GET", "/vm/stats").1).unwrap();
    assert_eq!(before["vcpus"], after["vcpus"], "no heartbeat while paused");
    assert_eq!(http(&sock, "PUT", "/vm/resume").0, 204);
    assert_eq!(http(&sock, "POST", "/vm/pause").0, 405);
    assert_eq!(http(&sock, "GET", "/nope").0, 404);
    std::thread::sleep(Duration::from_millis(400));
    assert_eq!(http(&sock, "PUT", "/vm/stop").0, 204);
    let o = child.wait_with_output().unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let last: serde_json::Value = serde_json::from_str(stdout(&o).lines().last().unwrap()).unwrap();
    assert_eq!(last["summary"]["stopped"], true);
    for v in last["summary"]["vcpus"].as_array().unwrap() {
        let gap = v["max_gap_us"].as_u64().unwrap();
        assert!(gap >= 450_000, "the pause is one long heartbeat gap: {v}");
    }
    assert!(!sock.exists(), "the socket is removed on exit");
}

#[test]
fn bench_irq_json_lines_have_the_interface_keys_and_the_plot_is_drawn() {
    let dir = tempfile::tempdir().unwrap();
    let svg = dir.path().join("irq.svg");
    let o = faultline(&[
        "bench",
        "irq",
        "--json",
        "--round-trips",
        "50",
        "--guest-irqs",
        "10",
        "--runs",
        "2",
        "--plot",
        svg.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let lines: Vec<serde_json::Value> = stdout(&o)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l}: {e}")))
        .collect();
    let mut seen = std::collections::BTreeSet::new();
    let mut once = std::collections::BTreeSet::new();
    for l in lines.iter().filter(|l| l.get("p50_us").is_some()) {
        // One line per path, placement, implementation and handler: the median of the runs.
        assert!(
            once.insert((
                l["path"].to_string(),
                l["placement"].to_string(),
                l["impl"].to_string(),
                l.get("handler").map(|h| h.to_string()),
            )),
            "a second line for {l}"
        );
        for k in [
            "bench",
            "path",
            "placement",
            "impl",
            "p50_us",
            "p99_us",
            "p999_us",
            "max_us",
            "exits_per_irq",
        ] {
            assert!(l.get(k).is_some(), "{k} missing in {l}");
        }
        assert_eq!(l["bench"], "irq");
        assert!(l["p50_us"].as_f64().unwrap() <= l["max_us"].as_f64().unwrap());
        seen.insert((
            l["path"].as_str().unwrap().to_string(),
            l["impl"].as_str().unwrap().to_string(),
        ));
    }
    for p in [
        "eventfd",
        "eventfd-epoll",
        "pipe",
        "futex",
        "signal",
        "signal-async",
        "unix-dgram",
        "io-uring",
        "busy-poll",
    ] {
        for imp in ["faultline", "c"] {
            assert!(
                seen.contains(&(p.to_string(), imp.to_string())),
                "{p} {imp}"
            );
        }
    }
    assert!(seen.contains(&("guest-irqfd-msi".to_string(), "faultline".to_string())));
    let svg = std::fs::read_to_string(&svg).unwrap();
    assert!(svg.contains("<svg") && svg.contains("guest-irqfd-msi"));
}

#[test]
fn irq_workloads_run_and_finish_cleanly() {
    // No interrupt comes: the guest spins with interrupts on until its run time is up, then
    // reports DONE 0 (an exception would be DONE 0x100 + vector).
    for guest in ["irq", "irq-cpl0"] {
        let o = faultline(&[
            "run",
            "--mem",
            "36M",
            "--guest",
            guest,
            "--seconds",
            "0.2",
            "--json-events",
        ]);
        assert!(o.status.success(), "{guest}: {}", stderr(&o));
        let out = stdout(&o);
        assert!(
            out.lines()
                .any(|l| l.contains("\"event\":\"done\"") && l.contains("\"code\":0,")),
            "{guest}: {out}"
        );
    }
}
