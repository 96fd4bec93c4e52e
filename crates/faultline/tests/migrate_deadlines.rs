//! End to end: the migration link's deadlines between two real `faultline` processes (real
//! KVM, userfaultfd, Unix sockets). Keepalives keep a quiet link alive; a peer that stops
//! (SIGSTOP) is detected within the link deadline on either side; a destination that stops
//! reading fails a pre-copy at its write deadline and the source guest runs on. Both
//! processes run with a short link deadline (`FAULTLINE_LINK_DEADLINE_MS`).

mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

/// A post-copy migration whose priority connection stays quiet for several link deadlines
/// (the guest is paused by the operator: no vCPU faults, so no request and no answer, while
/// the background stream runs at 2 MB/s for about 8 s) completes: keepalives, not requests,
/// keep the link alive.
#[test]
fn quiet_priority_link_is_not_taken_for_a_lost_one() {
    let dir = tempfile::tempdir().unwrap();
    let ep = format!("unix:{}", dir.path().join("mig.sock").display());
    let dst = destination(&ep, &[]);
    let (src, sock) = source(dir.path());
    api(&sock, "PUT", "/vm/pause");
    let t = Instant::now();
    let bg = migrate_bg(&sock, &ep, "postcopy", &["--max-bandwidth", "2M"]);
    let (out, _) = bg.join().unwrap();
    assert!(
        out.status.success(),
        "{}\n{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    let stats: Value = serde_json::from_str(text(&out.stdout).trim()).unwrap();
    assert_eq!(stats["digest_verified"], true, "{stats}");
    assert_eq!(stats["recoveries"], 0, "{stats}");
    assert_eq!(stats["faults_requested"], 0, "the guest faulted: {stats}");
    assert!(
        t.elapsed() > Duration::from_millis(2 * DEADLINE_MS),
        "too short to prove anything: {:?}",
        t.elapsed()
    );
    drop(dst);
    drop(src);
}

/// The destination stops (SIGSTOP) during post-copy: the source sees it within the link
/// deadline (no keepalive comes; its writes stall) and pauses the migration for a recovery.
#[test]
fn stopped_destination_is_detected_during_postcopy() {
    let dir = tempfile::tempdir().unwrap();
    let ep = format!("unix:{}", dir.path().join("mig.sock").display());
    let dst = destination(&ep, &[]);
    let (src, sock) = source(dir.path());
    let bg = migrate_bg(&sock, &ep, "postcopy", &["--max-bandwidth", "1M"]);
    wait_state(&sock, "postcopy", Duration::from_secs(30));
    std::thread::sleep(Duration::from_millis(500));
    dst.signal("STOP");
    let t = Instant::now();
    let v = wait_state(
        &sock,
        "postcopy-paused",
        Duration::from_millis(DEADLINE_MS + 3000),
    );
    let err = v["error"].as_str().unwrap_or_default();
    assert!(
        err.contains("not even a keepalive") || err.contains("took nothing"),
        "{v}"
    );
    eprintln!("detected after {:?}: {err}", t.elapsed());
    let (out, _) = bg.join().unwrap();
    assert!(!out.status.success());
    drop(dst);
    drop(src);
}

/// The source stops (SIGSTOP) during post-copy: the destination sees the silence within the
/// link deadline, waits for a recovery, and stops after its recovery timeout.
#[test]
fn stopped_source_is_detected_by_the_destination() {
    let dir = tempfile::tempdir().unwrap();
    let ep = format!("unix:{}", dir.path().join("mig.sock").display());
    let dst = destination(&ep, &["--recover-timeout", "1"]);
    let (src, sock) = source(dir.path());
    let bg = migrate_bg(&sock, &ep, "postcopy", &["--max-bandwidth", "1M"]);
    wait_state(&sock, "postcopy", Duration::from_secs(30));
    std::thread::sleep(Duration::from_millis(500));
    src.signal("STOP");
    let t = Instant::now();
    let d = dst.finish(Duration::from_secs(30));
    let waited = t.elapsed();
    let err = text(&d.stderr);
    assert!(!d.status.success(), "{err}");
    assert!(err.contains("not even a keepalive"), "{err}");
    assert!(err.contains("did not reconnect within"), "{err}");
    // The deadline, the 1 s recovery wait, and the destination's exit (stopping a vCPU
    // that waits on a page: bounded, but seconds on a loaded 2-core machine; CI once took
    // 8.8 s here). Without keepalives nothing would end it before `finish`'s 30 s.
    eprintln!("the destination stopped {waited:?} after the source");
    assert!(
        waited < Duration::from_millis(DEADLINE_MS + 10_000),
        "took {waited:?}"
    );
    drop(src);
    let _ = bg.join();
}

/// The destination stops reading (SIGSTOP) during pre-copy: the source's writes stall, it
/// fails at the write deadline (not at the 20 s pre-copy deadline), says what timed out, and
/// its guest keeps running.
#[test]
fn stopped_destination_fails_precopy_and_the_source_runs_on() {
    let dir = tempfile::tempdir().unwrap();
    let ep = format!("unix:{}", dir.path().join("mig.sock").display());
    let dst = destination(&ep, &[]);
    let (src, sock) = source(dir.path());
    let bg = migrate_bg(&sock, &ep, "precopy", &["--max-bandwidth", "1M"]);
    wait_state(&sock, "precopy", Duration::from_secs(30));
    std::thread::sleep(Duration::from_millis(300));
    dst.signal("STOP");
    let t = Instant::now();
    let v = wait_state(&sock, "failed", Duration::from_millis(DEADLINE_MS + 4000));
    eprintln!("failed after {:?}: {v}", t.elapsed());
    let err = v["error"].as_str().unwrap_or_default();
    assert!(err.contains("took nothing"), "{v}");
    let (out, _) = bg.join().unwrap();
    assert!(!out.status.success());
    assert_eq!(api(&sock, "GET", "/vm")["state"], "running");
    let a = heartbeats(&sock);
    std::thread::sleep(Duration::from_millis(400));
    let b = heartbeats(&sock);
    assert!(b > a, "the source guest stopped beating ({a} -> {b})");
    drop(dst);
    drop(src);
}
