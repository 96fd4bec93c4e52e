//! The REST API on a real Unix socket in front of a real VM: clients that send half a request
//! (or nothing) are cut off at the request deadline and hold up nobody else; sizes are
//! bounded.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use vmm::api::{ApiServer, MAX_IN_FLIGHT, REQUEST_DEADLINE, call};
use vmm::controller::Command;
use vmm::{Event, Vm, VmConfig, Workload};

/// Run a VM with its API on a socket, hand the socket to `f`, then stop the VM.
fn with_api(f: impl FnOnce(&Path) + Send + 'static) {
    let cfg = VmConfig {
        mem_bytes: 36 << 20,
        vcpus: 1,
        workload: Workload::Dirty,
        workload_bytes: Some(4 << 20),
        ..VmConfig::default()
    };
    let mut running = Vm::new(cfg).unwrap().start().unwrap();
    let t = Instant::now();
    loop {
        assert!(t.elapsed() < Duration::from_secs(60), "no heartbeat");
        if let Some(Event::Heartbeat { n, .. }) =
            running.next_event(Duration::from_secs(1)).unwrap()
            && n >= 1
        {
            break;
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("api.sock");
    let server = ApiServer::start(&sock, running.api_sender()).unwrap();
    let h = running.api_sender();
    let th = std::thread::spawn(move || {
        // Stop the VM whatever `f` did, then report its failure.
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(&sock)));
        drop(server);
        let _ = h.ask(Command::Stop, Some(Duration::from_secs(10)));
        if let Err(p) = r {
            std::panic::resume_unwind(p);
        }
    });
    running.wait(Duration::from_secs(300), |_| {}).unwrap();
    if let Err(p) = th.join() {
        std::panic::resume_unwind(p);
    }
}

/// A client that sends the headers of a PUT and half its body, then nothing.
fn half_request(sock: &Path) -> UnixStream {
    let mut s = UnixStream::connect(sock).unwrap();
    s.write_all(
        b"PUT /snapshot/create HTTP/1.1\r\nHost: x\r\nContent-Length: 4096\r\n\r\n{\"snapshot_dir\":",
    )
    .unwrap();
    s
}

/// Read what the server sends until it closes (or `limit` passes: a failure).
fn answer_within(mut s: UnixStream, limit: Duration) -> String {
    s.set_read_timeout(Some(limit)).unwrap();
    let mut out = Vec::new();
    match s.read_to_end(&mut out) {
        Ok(_) => String::from_utf8_lossy(&out).into_owned(),
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {
            String::from_utf8_lossy(&out).into_owned()
        }
        Err(e) => panic!(
            "no answer and no close within {limit:?} ({e}); got so far: {:?}",
            String::from_utf8_lossy(&out)
        ),
    }
}

fn get_vm_promptly(sock: &Path) {
    let t = Instant::now();
    let (code, body) = call(sock, "GET", "/vm", "", Duration::from_secs(5)).unwrap();
    assert_eq!(code, 200, "{body}");
    assert!(
        t.elapsed() < Duration::from_secs(2),
        "GET /vm took {:?}",
        t.elapsed()
    );
}

#[test]
fn a_half_sent_request_is_cut_off_at_the_deadline_and_holds_up_nobody() {
    with_api(|sock| {
        let t = Instant::now();
        let half = half_request(sock);
        // A client that connects and sends nothing at all.
        let silent = UnixStream::connect(sock).unwrap();
        for _ in 0..3 {
            get_vm_promptly(sock);
        }
        let a = answer_within(half, REQUEST_DEADLINE + Duration::from_secs(5));
        assert!(
            t.elapsed() >= REQUEST_DEADLINE - Duration::from_millis(500),
            "cut off early ({:?})",
            t.elapsed()
        );
        assert!(a.starts_with("HTTP/1.1 408"), "{a:?}");
        let b = answer_within(silent, Duration::from_secs(5));
        assert!(b.is_empty() || b.starts_with("HTTP/1.1 408"), "{b:?}");
    });
}

#[test]
fn slow_clients_holding_every_slot_are_released_at_the_deadline() {
    with_api(|sock| {
        let t = Instant::now();
        let slow: Vec<UnixStream> = (0..MAX_IN_FLIGHT).map(|_| half_request(sock)).collect();
        std::thread::sleep(Duration::from_millis(300));
        // While they hold every slot, others are refused at once, not left waiting.
        let (code, _) = call(sock, "GET", "/vm", "", Duration::from_secs(5)).unwrap();
        assert_eq!(code, 503);
        // At the deadline the slots come back.
        let mut served = false;
        while t.elapsed() < REQUEST_DEADLINE + Duration::from_secs(5) {
            if let Ok((200, _)) = call(sock, "GET", "/vm", "", Duration::from_secs(5)) {
                served = true;
                break;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        assert!(served, "slow clients held every slot past the deadline");
        for s in slow {
            let a = answer_within(s, Duration::from_secs(5));
            assert!(a.starts_with("HTTP/1.1 408"), "{a:?}");
        }
    });
}

#[test]
fn oversized_headers_and_bodies_are_refused_by_size() {
    with_api(|sock| {
        // The size is refused from the header: the server does not wait for the body.
        let mut s = UnixStream::connect(sock).unwrap();
        s.write_all(b"PUT /snapshot/create HTTP/1.1\r\nContent-Length: 200000\r\n\r\n{")
            .unwrap();
        let a = answer_within(s, Duration::from_secs(5));
        assert!(a.starts_with("HTTP/1.1 413"), "{a:?}");
        let mut s = UnixStream::connect(sock).unwrap();
        let head = format!(
            "GET /vm HTTP/1.1\r\nX-Pad: {}\r\n\r\n",
            "b".repeat(64 << 10)
        );
        let _ = s.write_all(head.as_bytes());
        let a = answer_within(s, Duration::from_secs(5));
        assert!(a.starts_with("HTTP/1.1 431"), "{a:?}");
        get_vm_promptly(sock);
    });
}
