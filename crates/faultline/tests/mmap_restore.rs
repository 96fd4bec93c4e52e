//! `faultline restore --mode mmap` end to end: the memory file is checked against the
//! snapshot's CRCs before the guest runs, and a memory file that shrinks under the running VM
//! fails the VM with a clear error instead of killing the VMM with SIGBUS.

mod common;

use std::os::unix::fs::FileExt;
use std::time::Duration;

use common::*;

#[test]
fn a_corrupted_page_in_the_memory_file_is_refused_by_an_mmap_restore() {
    let t = tempfile::tempdir().unwrap();
    let good = t.path().join("good");
    make_snapshot(t.path(), &good);
    let bad = t.path().join("bad");
    copy_dir(&good, &bad);
    // Flip one byte of the last non-zero page (not the first: the workload's data, where
    // nothing but a CRC notices).
    let mem = std::fs::read(bad.join("memory")).unwrap();
    let at = mem.iter().rposition(|&b| b != 0).expect("a non-zero byte");
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(bad.join("memory"))
        .unwrap();
    f.write_all_at(&[mem[at] ^ 0x40], at as u64).unwrap();
    drop(f);
    let o = restore(&bad, &["--mode", "mmap", "--seconds", "1"]);
    let e = text(&o.stderr);
    assert!(
        !o.status.success(),
        "restore of a corrupted memory file succeeded: {e}"
    );
    assert!(e.contains("CRC"), "no CRC mismatch named: {e}");
    assert!(e.contains("memory chunk"), "{e}");
    // The intact snapshot still restores in that mode.
    let o = restore(&good, &["--mode", "mmap", "--seconds", "1"]);
    assert!(o.status.success(), "{}", text(&o.stderr));
}

/// One request to an API socket; the status line.
fn put(sock: &std::path::Path, path: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::os::unix::net::UnixStream::connect(sock).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(s, "PUT {path} HTTP/1.1\r\nContent-Length: 0\r\n\r\n").unwrap();
    let mut a = String::new();
    s.read_to_string(&mut a).unwrap();
    a.lines().next().unwrap_or_default().to_string()
}

#[test]
fn a_memory_file_truncated_under_a_paused_mmap_restore_fails_its_snapshot_and_the_vm_not_the_process()
 {
    truncated_under_a_restore(true);
}

#[test]
fn a_memory_file_truncated_under_a_running_mmap_restore_fails_the_vm_not_the_process() {
    truncated_under_a_restore(false);
}

fn truncated_under_a_restore(pause: bool) {
    let t = tempfile::tempdir().unwrap();
    let snap = t.path().join("snap");
    make_snapshot(t.path(), &snap);
    let api = sock(t.path(), "restored");
    let p = spawn_restore(
        &snap,
        &[
            "--mode",
            "mmap",
            "--seconds",
            "20",
            "--api-sock",
            api.to_str().unwrap(),
        ],
    );
    wait_for(&api);
    std::thread::sleep(Duration::from_millis(300));
    if pause {
        // Parked vCPUs touch nothing: the snapshot below is the first to meet the lost pages,
        // on a host thread (SIGBUS).
        assert_eq!(put(&api, "/vm/pause"), "HTTP/1.1 204 No Content");
    }
    // Shrink the memory file to nothing: every page the VM has not made its own is gone.
    std::fs::OpenOptions::new()
        .write(true)
        .open(snap.join("memory"))
        .unwrap()
        .set_len(0)
        .unwrap();
    // A snapshot of the restored VM reads all of its memory.
    let o = bin()
        .args(["snapshot", "--api-sock"])
        .arg(&api)
        .arg("--out")
        .arg(t.path().join("second"))
        .output()
        .unwrap();
    let se = text(&o.stderr);
    assert!(!o.status.success(), "a snapshot of lost memory succeeded");
    if pause {
        assert!(
            se.contains("shrank"),
            "the snapshot's error does not say why: {se}"
        );
        let _ = put(&api, "/vm/resume");
    }
    let o = p.finish_within(Duration::from_secs(30));
    let e = text(&o.stderr);
    {
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(
            o.status.signal(),
            None,
            "the VMM died by signal {:?}; snapshot said: {se}; stderr: {e}",
            o.status.signal()
        );
    }
    assert!(
        !o.status.success(),
        "the VM carried on over lost memory: {e}"
    );
    assert!(e.contains("memory file"), "no clear error: {e}");
    assert!(
        e.contains("shrank") || e.contains("truncated"),
        "no clear error: {e}"
    );
}
