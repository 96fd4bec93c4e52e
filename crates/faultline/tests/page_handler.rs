//! The external page handler end to end: a handler that takes the userfaultfd and then serves
//! nothing stops the VM at the deadline; `faultline page-server` serves only the snapshot
//! directories it was started with, several VMs at once, and drops a VMM that sends no
//! hand-off. Real KVM, real userfaultfd, real processes and Unix sockets.

mod common;

use std::io::Read;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::*;
use vmm::restore::{Handoff, HandoffReply, recv_msg, send_msg};

fn page_server(dir: &Path, name: &str, args: &[&str]) -> (Proc, std::path::PathBuf) {
    let s = sock(dir, name);
    let child = bin()
        .args(["page-server", "--socket"])
        .arg(&s)
        .args(args)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let p = Proc(child);
    wait_for(&s);
    (p, s)
}

#[test]
fn a_handler_that_takes_the_userfaultfd_and_serves_nothing_stops_the_vm_at_the_deadline() {
    let t = tempfile::tempdir().unwrap();
    let snap = t.path().join("snap");
    make_snapshot(t.path(), &snap);
    // The handler: accepts the hand-off, says yes, keeps the userfaultfd and the connection,
    // and never reads a fault.
    let hs = sock(t.path(), "stuck");
    let l = UnixListener::bind(&hs).unwrap();
    let handler = std::thread::spawn(move || {
        let (c, _) = l.accept().unwrap();
        let (h, fd) = recv_msg::<Handoff>(&c).unwrap();
        assert!(fd.is_some() && !h.mappings.is_empty());
        send_msg(
            &c,
            &HandoffReply {
                version: h.version,
                ok: true,
                error: None,
            },
            None,
        )
        .unwrap();
        // Held until the VMM closes the connection.
        let mut b = [0u8; 16];
        c.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        let _ = (&c).read(&mut b);
        drop(fd);
    });
    let t0 = Instant::now();
    let p = spawn_restore(
        &snap,
        &[
            "--mode",
            "lazy",
            "--page-handler",
            hs.to_str().unwrap(),
            "--handler-timeout",
            "2",
        ],
    );
    let o = p.finish_within(Duration::from_secs(30));
    let e = text(&o.stderr);
    assert!(!o.status.success(), "the VM ran without a handler: {e}");
    assert!(e.contains("is stuck") && e.contains("unanswered"), "{e}");
    assert!(
        t0.elapsed() < Duration::from_secs(15),
        "took {:?}",
        t0.elapsed()
    );
    handler.join().unwrap();
}

#[test]
fn a_handler_that_reads_faults_and_never_resolves_them_stops_the_vm_at_the_deadline() {
    let t = tempfile::tempdir().unwrap();
    let snap = t.path().join("snap");
    make_snapshot(t.path(), &snap);
    // The handler: accepts the hand-off, reads every fault it is sent (the userfaultfd is
    // empty again, as with a working handler), and resolves none.
    let hs = sock(t.path(), "reads");
    let l = UnixListener::bind(&hs).unwrap();
    let handler = std::thread::spawn(move || {
        let (c, _) = l.accept().unwrap();
        let (h, fd) = recv_msg::<Handoff>(&c).unwrap();
        let u = uffd::Uffd::from_owned_fd(fd.unwrap(), uffd::Features::empty());
        send_msg(
            &c,
            &HandoffReply {
                version: h.version,
                ok: true,
                error: None,
            },
            None,
        )
        .unwrap();
        c.set_nonblocking(true).unwrap();
        let mut read = 0u64;
        let t = Instant::now();
        // Until the VMM closes the connection (it stops the VM), or 60 s.
        while t.elapsed() < Duration::from_secs(60) {
            let mut p = [
                libc::pollfd {
                    fd: std::os::fd::AsRawFd::as_raw_fd(&u),
                    events: libc::POLLIN,
                    revents: 0,
                },
                libc::pollfd {
                    fd: std::os::fd::AsRawFd::as_raw_fd(&c),
                    events: libc::POLLIN,
                    revents: 0,
                },
            ];
            // SAFETY: two valid pollfds for the call's duration.
            unsafe { libc::poll(p.as_mut_ptr(), 2, 100) };
            if p[1].revents != 0 {
                match (&c).read(&mut [0u8; 16]) {
                    Ok(0) => break,
                    Err(e) if e.kind() != std::io::ErrorKind::WouldBlock => break,
                    _ => {}
                }
            }
            // One event per readable poll: a read never blocks.
            if p[0].revents & libc::POLLIN != 0 && matches!(u.read_event(), Ok(Some(_))) {
                read += 1;
            }
        }
        read
    });
    let t0 = Instant::now();
    let p = spawn_restore(
        &snap,
        &[
            "--mode",
            "lazy",
            "--page-handler",
            hs.to_str().unwrap(),
            "--handler-timeout",
            "2",
        ],
    );
    let o = p.finish_within(Duration::from_secs(30));
    let e = text(&o.stderr);
    assert!(!o.status.success(), "the VM ran without its pages: {e}");
    assert!(e.contains("left it unresolved"), "{e}");
    assert!(
        t0.elapsed() < Duration::from_secs(15),
        "took {:?}",
        t0.elapsed()
    );
    let read = handler.join().unwrap();
    assert!(read >= 1, "the handler read no fault");
}

#[test]
fn the_page_server_serves_only_its_snapshot_dirs_and_several_vms_at_once() {
    let t = tempfile::tempdir().unwrap();
    let snap = t.path().join("snap");
    make_snapshot(t.path(), &snap);
    let other = t.path().join("other");
    copy_dir(&snap, &other);
    let (_server, hs) = page_server(t.path(), "ps", &["--snapshot-dir", snap.to_str().unwrap()]);
    let h = hs.to_str().unwrap();
    // A directory it was not started with: refused, naming it.
    let o = restore(&other, &["--mode", "lazy", "--page-handler", h]);
    let e = text(&o.stderr);
    assert!(!o.status.success(), "served a directory not named: {e}");
    assert!(e.contains("is not served here"), "{e}");
    // Two VMs at once: the second is served while the first still runs.
    let first = spawn_restore(
        &snap,
        &["--mode", "lazy", "--page-handler", h, "--seconds", "8"],
    );
    std::thread::sleep(Duration::from_millis(1500));
    let t0 = Instant::now();
    let o = restore(
        &snap,
        &[
            "--mode",
            "lazy",
            "--page-handler",
            h,
            "--seconds",
            "1",
            "--handler-timeout",
            "3",
        ],
    );
    assert!(o.status.success(), "second VM: {}", text(&o.stderr));
    assert!(t0.elapsed() < Duration::from_secs(6), "{:?}", t0.elapsed());
    let o = first.finish_within(Duration::from_secs(30));
    assert!(o.status.success(), "first VM: {}", text(&o.stderr));
}

#[test]
fn the_page_server_drops_a_client_that_sends_no_hand_off_at_its_deadline() {
    kvm_present();
    let t = tempfile::tempdir().unwrap();
    let snap = t.path().join("snap");
    std::fs::create_dir_all(&snap).unwrap();
    let (_server, hs) = page_server(
        t.path(),
        "ps",
        &[
            "--snapshot-dir",
            snap.to_str().unwrap(),
            "--handoff-timeout",
            "1",
        ],
    );
    let t0 = Instant::now();
    let mut silent = UnixStream::connect(&hs).unwrap();
    // Another client meanwhile is not held up behind it: it gets an answer (a refusal: it
    // names a directory that is not served) at once.
    let other = UnixStream::connect(&hs).unwrap();
    other
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut h: Handoff = serde_json::from_value(serde_json::json!({
        "protocol": "faultline-uffd-handoff", "version": 1, "vmm_pid": 1,
        "snapshot_dir": "/nonexistent", "uffd_features": 0, "mappings": []
    }))
    .unwrap();
    h.vmm_pid = std::process::id();
    send_msg(&other, &h, None).unwrap();
    let (reply, _) = recv_msg::<HandoffReply>(&other).unwrap();
    assert!(!reply.ok);
    assert!(
        t0.elapsed() < Duration::from_millis(900),
        "{:?}",
        t0.elapsed()
    );
    // The silent one is closed at the deadline.
    silent
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut b = Vec::new();
    let r = silent.read_to_end(&mut b);
    assert!(r.is_ok(), "not closed: {r:?}");
    let waited = t0.elapsed();
    assert!(
        waited >= Duration::from_millis(900) && waited < Duration::from_secs(5),
        "{waited:?}"
    );
}
