//! End to end: a migration that fails after the machine state went out. The destination (a
//! stand-in that speaks the protocol, takes the `State` frame and then vanishes without a
//! word) may run the guest, so the real source must neither resume it by itself nor start a
//! second migration (whose failure would resume it); only the operator's
//! `faultline migrate --reclaim` runs it here again. The stand-in answers as an older
//! destination would (no `crc32c`, no `keepalive_ms`), so this also checks that the frames up
//! to the state carry no CRC32C trailer for such a peer.

mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::time::Duration;

use common::*;

fn read_frame(s: &mut impl Read) -> (u8, Vec<u8>) {
    let mut h = [0u8; 16];
    s.read_exact(&mut h).expect("a frame header");
    // This destination answers as an older one (no `keepalive_ms`, no `crc32c`): the
    // source must not send it flags or kinds it does not know.
    assert_eq!(h[1], 0, "flags sent to a peer that did not agree to them");
    assert_ne!(
        h[0], 17,
        "a keepalive sent to a peer that did not agree to them"
    );
    let len = u32::from_le_bytes(h[4..8].try_into().unwrap());
    let mut b = vec![0; len as usize];
    s.read_exact(&mut b).expect("a frame payload");
    (h[0], b)
}

fn write_ack(s: &mut impl Write) {
    let body = br#"{"version":1,"ok":true}"#;
    let mut f = vec![2u8, 0];
    f.extend_from_slice(&0x464cu16.to_le_bytes());
    f.extend_from_slice(&(body.len() as u32).to_le_bytes());
    f.extend_from_slice(&0u64.to_le_bytes());
    f.extend_from_slice(body);
    s.write_all(&f).unwrap();
}

/// A destination that accepts the migration, reads up to the `State` frame, then closes both
/// connections (as one that crashed after taking the state, or whose link died).
fn vanishing_destination(path: &Path) -> std::thread::JoinHandle<()> {
    let l = UnixListener::bind(path).unwrap();
    std::thread::spawn(move || {
        let (mut main, _) = l.accept().unwrap();
        assert_eq!(read_frame(&mut main).0, 1, "hello");
        write_ack(&mut main);
        let (mut prio, _) = l.accept().unwrap();
        assert_eq!(read_frame(&mut prio).0, 1, "priority hello");
        write_ack(&mut prio);
        loop {
            if read_frame(&mut main).0 == 7 {
                break;
            }
        }
    })
}

fn vm_paused_and_still(sock: &Path) {
    let v = api(sock, "GET", "/vm");
    assert_eq!(v["state"], "paused", "{v}");
    let a = heartbeats(sock);
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(heartbeats(sock), a, "the guest runs at the source");
}

#[test]
fn a_failure_after_the_state_leaves_the_guest_paused_until_the_operator_decides() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("fake.sock");
    let fake = vanishing_destination(&path);
    let (src, sock) = source(dir.path());
    let ep = format!("unix:{}", path.display());
    let (out, _) = migrate_bg(&sock, &ep, "postcopy", &[]).join().unwrap();
    fake.join().unwrap();
    assert!(!out.status.success());
    let st = wait_state(&sock, "failed", Duration::from_secs(30));
    assert_eq!(st["in_doubt"], true, "{st}");
    assert!(
        st["error"].as_str().unwrap().contains("/migrate/reclaim"),
        "{st}"
    );
    vm_paused_and_still(&sock);
    // The operator's resume does not release the migration's pause.
    api(&sock, "PUT", "/vm/resume");
    vm_paused_and_still(&sock);
    // A second migration is refused (its failure before switchover would resume the guest).
    let other = format!("unix:{}", dir.path().join("nobody.sock").display());
    let (out, _) = migrate_bg(&sock, &other, "precopy", &[]).join().unwrap();
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("may run there"),
        "{}",
        text(&out.stderr)
    );
    std::thread::sleep(Duration::from_millis(300));
    vm_paused_and_still(&sock);
    // The operator's decision: the destination does not run it.
    let p = Proc(
        bin_short_deadline()
            .args(["migrate", "--api-sock", sock.to_str().unwrap(), "--reclaim"])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let o = p.finish(Duration::from_secs(30));
    assert!(o.status.success(), "{}", text(&o.stderr));
    assert_eq!(api(&sock, "GET", "/vm")["state"], "running");
    let a = heartbeats(&sock);
    std::thread::sleep(Duration::from_millis(400));
    assert!(heartbeats(&sock) > a, "the reclaimed guest does not run");
    assert_eq!(api(&sock, "GET", "/migrate")["in_doubt"], false);
    drop(src);
}
