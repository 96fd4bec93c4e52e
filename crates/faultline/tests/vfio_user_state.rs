//! End to end: vfio-user devices through snapshot, restore and live migration, their state
//! carried by vfio-user migration v2 from the client side. The devices are served by
//! `faultline device serve` (a GPIO card and a DMA engine), each end of a restore or a
//! migration with servers of its own; the built-in guest's `devices-soak` keeps them busy
//! and stops with a failure code if a DMA copy in flight at the pause never completes, the
//! engine's completion counter does not count every copy since the start (its state was not
//! carried), or the GPIO inputs do not show the outputs it wrote before the pause.
//! Every restore mode and every migration mode: where memory arrives on demand (lazy,
//! prefetch, post-copy, hybrid) or is a private file mapping (mmap), the devices reach it
//! through DMA messages the VMM serves, so their DMA faults pages in as the vCPUs do.
//!
//! The same with libvfio-user's own `samples/server` as the device (its migration stream:
//! BAR1's storage, then BAR0's timer): the guest arms the timer an hour and more ahead and
//! writes BAR1, through the VMM's I/O window (the sample's BARs are I/O BARs, BAR0 takes
//! only 8-byte accesses), and checks both at every iteration.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{Proc, api, bin, bin_short_deadline, kvm_present, text, wait_for};
use serde_json::Value;
use vmm::guest::abi;

/// `faultline device serve gpio --also dma:...`: the two sockets (GPIO, DMA engine).
fn servers(dir: &Path, tag: &str) -> (Proc, [PathBuf; 2]) {
    let g = dir.join(format!("gpio-{tag}.sock"));
    let d = dir.join(format!("dma-{tag}.sock"));
    let p = Proc(
        Command::new(env!("CARGO_BIN_EXE_faultline"))
            .args(["device", "serve", "gpio", "--socket"])
            .arg(&g)
            .arg("--also")
            .arg(format!("dma:{}", d.display()))
            .stderr(Stdio::null())
            .spawn()
            .expect("start faultline device serve"),
    );
    wait_for(&g);
    wait_for(&d);
    (p, [g, d])
}

fn vfio_args(socks: &[PathBuf]) -> Vec<String> {
    socks
        .iter()
        .flat_map(|s| ["--vfio-user".to_string(), s.display().to_string()])
        .collect()
}

/// The soak guest with these devices; waits until it has beaten three times.
fn soak(dir: &Path, socks: &[PathBuf]) -> (Proc, PathBuf) {
    kvm_present();
    let sock = dir.join("src-api.sock");
    let p = Proc(
        bin_short_deadline()
            .args([
                "run",
                "--mem",
                "64M",
                "--guest",
                "devices-soak",
                "--timeout",
                "120",
                "--json-events",
                "--api-sock",
            ])
            .arg(&sock)
            .args(vfio_args(socks))
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start the devices-soak guest"),
    );
    wait_for(&sock);
    let t = Instant::now();
    while common::heartbeats(&sock) < 3 {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "the guest never beat"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    (p, sock)
}

fn summary(o: &Output) -> Value {
    let out = text(&o.stdout);
    let line = out
        .lines()
        .rev()
        .find(|l| l.contains("\"summary\""))
        .unwrap_or_else(|| panic!("no summary in:\n{out}\nstderr:\n{}", text(&o.stderr)));
    serde_json::from_str::<Value>(line).unwrap()["summary"].clone()
}

fn reports(s: &Value, key: u32) -> Vec<u64> {
    s["reports"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r[0] == key)
        .map(|r| r[1].as_u64().unwrap())
        .collect()
}

/// The guest went on where it was paused: no failure, still running, more iterations than
/// at the pause, both devices used with no forward failing.
fn check_went_on(s: &Value, at_pause: u64, what: &str) {
    let failed = reports(s, abi::KEY_SOAK_FAILED);
    assert!(
        failed.is_empty(),
        "{what}: the guest failed with {failed:?} (1 DMA timeout, 2 DMA status, 3 DMA data, \
         4 DMA count: state lost, 5 GPIO): {s:#}"
    );
    assert!(
        s["vcpus"][0]["exit_code"].is_null(),
        "{what}: the guest stopped: {s:#}"
    );
    let iters = reports(s, abi::KEY_SOAK_ITERATIONS);
    assert!(
        iters.iter().max().copied().unwrap_or(0) > at_pause + 20,
        "{what}: the guest did little after the pause ({iters:?}, {at_pause} at the pause)"
    );
    let devs = s["devices"].as_array().unwrap();
    assert_eq!(devs.len(), 2, "{what}: {s:#}");
    for d in devs {
        assert_eq!(d["errors"], 0, "{what}: a forward failed: {d}");
        assert!(d["mmio_exits"].as_u64().unwrap() > 0, "{what}: unused: {d}");
    }
}

/// Pause the VM behind `sock` and snapshot it into `dir/snap` (the VM stays paused).
fn snapshot_paused(sock: &Path, dir: &Path) -> PathBuf {
    api(sock, "PUT", "/vm/pause");
    let snap = dir.join("snap");
    let o = bin()
        .args(["snapshot", "--api-sock"])
        .arg(sock)
        .arg("--out")
        .arg(&snap)
        .output()
        .unwrap();
    assert!(o.status.success(), "snapshot: {}", text(&o.stderr));
    snap
}

/// A destination listening on `dir/m.sock` with its API on `dir/dst-api.sock`, these extra
/// arguments; returns it, the endpoint and the API socket.
fn destination(dir: &Path, extra: &[String]) -> (Proc, String, PathBuf) {
    let to = format!("unix:{}", dir.join("m.sock").display());
    let dst_api = dir.join("dst-api.sock");
    let mut args = vec!["--api-sock".to_string(), dst_api.display().to_string()];
    args.extend_from_slice(extra);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let dest = common::destination(&to, &args);
    wait_for(&dir.join("m.sock"));
    (dest, to, dst_api)
}

/// Migrate the VM behind `sock` to `to` in `mode`, which must succeed; the source's report.
fn migrate(sock: &Path, to: &str, mode: &str) -> String {
    let (o, _) = common::migrate_bg(sock, to, mode, &[]).join().unwrap();
    assert!(
        o.status.success(),
        "migrate --mode {mode}: {}\n{}",
        text(&o.stdout),
        text(&o.stderr)
    );
    text(&o.stdout)
}

/// Let the guest run `secs` at the destination, stop it there, and return its summary.
fn run_then_stop(dest: Proc, dst_api: &Path, secs: u64) -> Value {
    wait_for(dst_api);
    std::thread::sleep(Duration::from_secs(secs));
    api(dst_api, "PUT", "/vm/stop");
    summary(&dest.finish(Duration::from_secs(20)))
}

/// The DMA engine reached guest memory through messages (memory on demand, or a private
/// mapping) or through its own mapping of the memfd (memory whole before it ran).
fn check_dma_path(s: &Value, messages: bool, what: &str) {
    let dma = &s["devices"][1];
    assert_eq!(dma["id"], "fa17:0d3a", "{what}: {s:#}");
    let n = dma["dma_messages"].as_u64().unwrap();
    if messages {
        assert!(
            n > 20,
            "{what}: the engine's DMA went through {n} messages: {dma}"
        );
    } else {
        assert_eq!(n, 0, "{what}: the engine's DMA should map the memfd: {dma}");
    }
}

#[test]
fn snapshot_and_restore_in_every_mode_carry_busy_vfio_user_devices() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (_src_srv, src) = servers(d, "src");
    let (vm, sock) = soak(d, &src);
    std::thread::sleep(Duration::from_millis(500));
    let snap = snapshot_paused(&sock, d);
    // The source's devices run again after the snapshot: the guest goes on there too.
    api(&sock, "PUT", "/vm/resume");
    std::thread::sleep(Duration::from_millis(500));
    api(&sock, "PUT", "/vm/stop");
    let s = summary(&vm.finish(Duration::from_secs(20)));
    check_went_on(&s, 0, "the source after its snapshot");
    // The restored guest starts from the iteration it was paused at (in guest memory).
    let at_pause = *reports(&s, abi::KEY_SOAK_ITERATIONS).first().unwrap_or(&0) / 2;

    // Restored onto new servers of the same devices, in every mode (one restore after
    // another on the same servers: each takes the state the snapshot holds).
    let (_dst_srv, dst) = servers(d, "dst");
    for mode in ["eager", "lazy", "prefetch", "mmap"] {
        let mut args = vec!["--mode", mode, "--seconds", "2", "--json-events"];
        let va = vfio_args(&dst);
        args.extend(va.iter().map(String::as_str));
        let o = common::restore(&snap, &args);
        assert!(
            o.status.success(),
            "restore --mode {mode}: {}",
            text(&o.stderr)
        );
        let s = summary(&o);
        check_went_on(&s, at_pause, &format!("restore --mode {mode}"));
        check_dma_path(&s, mode != "eager", &format!("restore --mode {mode}"));
    }

    // Refused before anything runs: no servers, servers in another order.
    let o = common::restore(&snap, &["--mode", "eager"]);
    assert!(!o.status.success());
    let e = text(&o.stderr);
    assert!(
        e.contains("2 vfio-user device(s), 0 server(s)"),
        "no servers named: {e}"
    );
    let swapped = [dst[1].clone(), dst[0].clone()];
    for mode in ["eager", "lazy"] {
        let mut args = vec!["--mode", mode];
        let va = vfio_args(&swapped);
        args.extend(va.iter().map(String::as_str));
        let o = common::restore(&snap, &args);
        assert!(!o.status.success());
        let e = text(&o.stderr);
        assert!(
            e.contains("the state is of"),
            "servers swapped, {mode}: {e}"
        );
    }
}

#[test]
fn live_migration_in_every_mode_carries_busy_vfio_user_devices() {
    for mode in ["precopy", "postcopy", "hybrid"] {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let (_src_srv, src) = servers(d, "src");
        let (_dst_srv, dst) = servers(d, "dst");
        let (vm, sock) = soak(d, &src);
        let (dest, to, dst_api) = destination(d, &vfio_args(&dst));
        migrate(&sock, &to, mode);
        let s = run_then_stop(dest, &dst_api, 2);
        check_went_on(&s, 0, &format!("migrate --mode {mode}"));
        check_dma_path(&s, mode != "precopy", &format!("migrate --mode {mode}"));
        drop(vm);
    }
}

/// libvfio-user's `samples/server` at `sock` (killed on drop).
fn sample_server(sock: &Path) -> Proc {
    let p = Proc(
        Command::new(common::libvfio_user::samples_dir().join("server"))
            .arg(sock)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start libvfio-user's samples/server"),
    );
    let t = Instant::now();
    while !sock.exists() {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "samples/server did not create {}",
            sock.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    p
}

#[test]
fn libvfio_user_sample_server_state_through_lazy_restore_and_post_copy() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let socks: Vec<PathBuf> = (0..3).map(|i| d.join(format!("sample-{i}.sock"))).collect();
    let _servers: Vec<Proc> = socks.iter().map(|s| sample_server(s)).collect();
    let (vm, sock) = soak(d, &socks[..1]);
    let snap = snapshot_paused(&sock, d);
    // The sample runs again after the snapshot (its RUNNING re-arms the timer the guest set).
    api(&sock, "PUT", "/vm/resume");
    // Post-copy migration of the same VM onto the third server (guest memory reaches the
    // device through messages until it has all arrived).
    let (dest, to, dst_api) = destination(d, &vfio_args(&socks[2..]));
    migrate(&sock, &to, "postcopy");
    let s = run_then_stop(dest, &dst_api, 1);
    check_sample(&s, "migrate --mode postcopy (libvfio-user sample)");
    drop(vm);
    // The snapshot restored lazily onto the second server.
    let va = vfio_args(&socks[1..2]);
    let mut args = vec!["--mode", "lazy", "--seconds", "1", "--json-events"];
    args.extend(va.iter().map(String::as_str));
    let o = common::restore(&snap, &args);
    assert!(o.status.success(), "restore: {}", text(&o.stderr));
    check_sample(&summary(&o), "restore --mode lazy (libvfio-user sample)");
}

/// The guest found the sample (and only it) and its checks held.
fn check_sample(s: &Value, what: &str) {
    let failed = reports(s, abi::KEY_SOAK_FAILED);
    assert!(
        failed.is_empty(),
        "{what}: the guest failed with {failed:?} (6: the sample's timer or BAR1 lost): {s:#}"
    );
    assert!(
        s["vcpus"][0]["exit_code"].is_null(),
        "{what}: the guest stopped: {s:#}"
    );
    assert!(
        reports(s, abi::KEY_SOAK_ITERATIONS)
            .iter()
            .max()
            .copied()
            .unwrap_or(0)
            > 20,
        "{what}: the guest did little: {s:#}"
    );
    let devs = s["devices"].as_array().unwrap();
    assert_eq!(devs.len(), 1, "{what}: {s:#}");
    assert_eq!(devs[0]["id"], "dead:beef", "{what}");
    assert_eq!(
        devs[0]["errors"], 0,
        "{what}: a forward failed: {}",
        devs[0]
    );
}

/// A VM restored lazily (its devices' DMA through messages) migrates with pre-copy: the
/// pages the devices wrote through messages are logged by the VMM and sent again (the
/// destination's memory digest check refuses the migration otherwise), and at the
/// destination the devices map the memfd again.
#[test]
fn a_lazily_restored_vm_with_vfio_user_devices_migrates_pre_copy() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (_a, src) = servers(d, "a");
    let (_b, restored) = servers(d, "b");
    let (_c, dst) = servers(d, "c");
    let (vm, sock) = soak(d, &src);
    let snap = snapshot_paused(&sock, d);
    api(&sock, "PUT", "/vm/stop");
    drop(vm);
    let api_r = d.join("restored-api.sock");
    let mut args = vec![
        "--mode".to_string(),
        "lazy".into(),
        "--json-events".into(),
        "--api-sock".into(),
        api_r.display().to_string(),
    ];
    args.extend(vfio_args(&restored));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let r = common::spawn_restore(&snap, &args);
    wait_for(&api_r);
    std::thread::sleep(Duration::from_millis(500));
    let (dest, to, dst_api) = destination(d, &vfio_args(&dst));
    let report = migrate(&api_r, &to, "precopy");
    assert!(report.contains("\"digest_verified\":true"), "{report}");
    let s = run_then_stop(dest, &dst_api, 1);
    check_went_on(&s, 0, "pre-copy of a lazily restored VM");
    check_dma_path(&s, false, "pre-copy of a lazily restored VM");
    drop(r);
}
