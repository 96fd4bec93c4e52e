//! End to end: damaged frames between two real `faultline` processes. The source's test hook
//! `FAULTLINE_TEST_CORRUPT_PAGE_FRAME=N` flips a byte of its `N`th `Pages` frame after the
//! frame's CRC32C was computed, as a bad link would. Pre-copy refuses the migration before
//! switchover and the source guest runs on; post-copy asks for the pages again and completes
//! with verified memory; without CRC32C (`FAULTLINE_TEST_NO_CRC`, as with an older peer) the
//! destination checks the memory digest before it starts the guest, and refuses.

mod common;

use std::time::Duration;

use common::*;
use serde_json::Value;

const CORRUPT: &str = "FAULTLINE_TEST_CORRUPT_PAGE_FRAME";

/// The source failed, said `want`, and its guest still runs.
fn source_failed_and_runs_on(sock: &std::path::Path, want: &str) {
    let v = wait_state(sock, "failed", Duration::from_secs(30));
    let err = v["error"].as_str().unwrap_or_default();
    assert!(err.contains(want), "{v}");
    assert_eq!(api(sock, "GET", "/vm")["state"], "running");
    let a = heartbeats(sock);
    std::thread::sleep(Duration::from_millis(400));
    let b = heartbeats(sock);
    assert!(b > a, "the source guest stopped beating ({a} -> {b})");
}

#[test]
fn damaged_precopy_frame_is_refused_and_the_source_runs_on() {
    let dir = tempfile::tempdir().unwrap();
    let ep = format!("unix:{}", dir.path().join("mig.sock").display());
    let dst = destination(&ep, &[]);
    let (src, sock) = source_with(dir.path(), &[(CORRUPT, "5")]);
    let (out, _) = migrate_bg(&sock, &ep, "precopy", &[]).join().unwrap();
    assert!(!out.status.success(), "{}", text(&out.stdout));
    source_failed_and_runs_on(&sock, "arrived damaged");
    let d = dst.finish(Duration::from_secs(20));
    let err = text(&d.stderr);
    assert!(!d.status.success(), "{err}");
    assert!(err.contains("arrived damaged"), "{err}");
    assert!(err.contains("nothing was started here"), "{err}");
    drop(src);
}

#[test]
fn damaged_postcopy_frame_is_sent_again() {
    let dir = tempfile::tempdir().unwrap();
    let ep = format!("unix:{}", dir.path().join("mig.sock").display());
    let dst = destination(&ep, &["--verify"]);
    let (src, sock) = source_with(dir.path(), &[(CORRUPT, "5")]);
    let (out, _) = migrate_bg(&sock, &ep, "postcopy", &[]).join().unwrap();
    assert!(
        out.status.success(),
        "{}\n{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    let stats: Value = serde_json::from_str(text(&out.stdout).trim()).unwrap();
    assert_eq!(stats["digest_verified"], true, "{stats}");
    assert!(stats["resent_pages"].as_u64() >= Some(1), "{stats}");
    assert!(
        stats["destination"]["resends"].as_u64() >= Some(1),
        "{stats}"
    );
    let d = dst.finish(Duration::from_secs(60));
    assert!(d.status.success(), "{}", text(&d.stderr));
    let s = text(&d.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find(|v| v["event"] == "summary")
        .unwrap_or(Value::Null);
    assert_eq!(s["summary"]["matches_source"], true, "{s}");
    assert_eq!(s["summary"]["checksums_verified"], true, "{s}");
    drop(src);
}

#[test]
fn without_crc_the_destination_checks_the_digest_before_starting() {
    let dir = tempfile::tempdir().unwrap();
    let ep = format!("unix:{}", dir.path().join("mig.sock").display());
    let dst = destination(&ep, &[]);
    let (src, sock) = source_with(
        dir.path(),
        &[(CORRUPT, "5"), ("FAULTLINE_TEST_NO_CRC", "1")],
    );
    let (out, _) = migrate_bg(&sock, &ep, "precopy", &[]).join().unwrap();
    assert!(!out.status.success(), "{}", text(&out.stdout));
    source_failed_and_runs_on(&sock, "did not start the guest");
    let d = dst.finish(Duration::from_secs(20));
    let err = text(&d.stderr);
    assert!(!d.status.success(), "{err}");
    assert!(err.contains("the guest was not started here"), "{err}");
    drop(src);
}

/// A post-copy frame whose header arrived damaged (its page address) cannot be asked for
/// again (which pages it held is what was damaged): the destination counts the link as lost
/// and waits; the resumed migration sends exactly the pages still needed (`Recover`) and
/// memory verifies.
#[test]
fn damaged_postcopy_header_is_recovered() {
    let dir = tempfile::tempdir().unwrap();
    let ep = format!("unix:{}", dir.path().join("mig.sock").display());
    let dst = destination(&ep, &["--verify"]);
    let (src, sock) = source_with(dir.path(), &[(CORRUPT, "addr:5")]);
    let (out, _) = migrate_bg(&sock, &ep, "postcopy", &["--max-bandwidth", "4M"])
        .join()
        .unwrap();
    assert!(!out.status.success(), "{}", text(&out.stdout));
    wait_state(&sock, "postcopy-paused", Duration::from_secs(10));
    let p = Proc(
        bin_short_deadline()
            .args([
                "migrate",
                "--api-sock",
                sock.to_str().unwrap(),
                "--resume",
                "--json",
            ])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let o = p.finish(Duration::from_secs(60));
    assert!(o.status.success(), "{}", text(&o.stderr));
    let stats: Value = serde_json::from_str(text(&o.stdout).trim()).unwrap();
    assert_eq!(stats["digest_verified"], true, "{stats}");
    assert_eq!(stats["recoveries"], 1, "{stats}");
    let d = dst.finish(Duration::from_secs(60));
    let err = text(&d.stderr);
    assert!(d.status.success(), "{err}");
    assert!(err.contains("arrived damaged"), "{err}");
    drop(src);
}
