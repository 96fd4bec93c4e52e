//! virtio-net on its worker thread (epoll on the notify eventfds and the backend's fd), over
//! a real socket pair: frames arrive without the test calling the device, and a held frame
//! does not make the thread spin.

use std::time::{Duration, Instant};

use super::tests::{MAC, driver, frame};
use super::*;
use crate::testing::{DATA, Driver};
use crate::{IrqMode, MmioTransport, Worker};

/// Move the driver's transport onto a worker thread named `name` (the driver keeps guest
/// memory, so it can still add chains and read the used rings).
fn on_worker(d: &mut Driver, name: &str) -> Worker {
    let (spare, _) = SocketBackend::pair().unwrap();
    let spare = MmioTransport::new(
        Box::new(Net::new(Box::new(spare), MAC)),
        d.mem.clone(),
        d.irq.clone(),
        IrqMode::Legacy,
    );
    let t = std::mem::replace(&mut d.t, spare);
    Worker::spawn(t, name.to_string()).expect("spawn the worker")
}

/// Wait (5 s at most) until `f` holds.
fn until(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// CPU time (user + system, clock ticks) of this process's thread named `name`.
fn thread_ticks(name: &str) -> u64 {
    for t in std::fs::read_dir("/proc/self/task").unwrap() {
        let dir = t.unwrap().path();
        let comm = std::fs::read_to_string(dir.join("comm")).unwrap_or_default();
        if comm.trim_end() != name {
            continue;
        }
        let stat = std::fs::read_to_string(dir.join("stat")).unwrap();
        let rest = &stat[stat.rfind(')').unwrap() + 2..];
        let f: Vec<&str> = rest.split(' ').collect();
        // fields 14 and 15 of stat; `rest` starts at field 3
        return f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap();
    }
    panic!("no thread named {name}");
}

#[test]
fn the_worker_receives_and_does_not_spin_on_a_held_frame() {
    let (dev, mut peer) = SocketBackend::pair().unwrap();
    let (mut d, stats) = driver(Box::new(dev));
    let name = "fl-net-held";
    let w = on_worker(&mut d, name);
    // the worker asks for the device's fds after each event: a first notify
    w.notify(RX);
    until("the backend fd polled", || {
        w.transport().lock().unwrap().poll_fds().len() == 1
    });

    // two frames and no receive buffer: the first is held, the second waits in the socket
    // (readable: were the fd still polled, the thread would spin)
    let f = frame(600, 1);
    let f2 = frame(650, 9);
    peer.send(&f).unwrap();
    peer.send(&f2).unwrap();
    std::thread::sleep(Duration::from_millis(100)); // the worker reads it and holds it
    let before = thread_ticks(name);
    std::thread::sleep(Duration::from_millis(500));
    let spent = thread_ticks(name) - before;
    assert!(
        spent <= 5,
        "the worker used {spent} ticks of CPU in 500 ms with a held frame (spinning)"
    );
    assert!(w.transport().lock().unwrap().poll_fds().is_empty());

    // a buffer and a notify: the frame arrives, and the fd is polled again
    let h1 = d.add(RX, &[(DATA, 2048, true)]);
    w.notify(RX);
    let mut used = Vec::new();
    until("the held frame delivered", || {
        used.extend(d.used(RX));
        !used.is_empty()
    });
    assert_eq!(used, vec![(h1, (HDR_LEN + f.len()) as u32)]);
    assert_eq!(d.get(DATA + HDR_LEN as u64, f.len()), f);
    let h2 = d.add(RX, &[(DATA + 0x1000, 2048, true)]);
    w.notify(RX);
    let mut used = Vec::new();
    until("the second frame delivered", || {
        used.extend(d.used(RX));
        !used.is_empty()
    });
    assert_eq!(used, vec![(h2, (HDR_LEN + f2.len()) as u32)]);
    assert_eq!(d.get(DATA + 0x1000 + HDR_LEN as u64, f2.len()), f2);
    let h3 = d.add(RX, &[(DATA + 0x2000, 2048, true)]);
    w.notify(RX);
    let g = frame(700, 2);
    peer.send(&g).unwrap();
    let mut used = Vec::new();
    until("the next frame delivered by the worker alone", || {
        used.extend(d.used(RX));
        !used.is_empty()
    });
    assert_eq!(used, vec![(h3, (HDR_LEN + g.len()) as u32)]);
    assert_eq!(d.get(DATA + 0x2000 + HDR_LEN as u64, g.len()), g);
    assert_eq!(stats.rx_frames.load(Ordering::Relaxed), 3);
    assert!(
        d.irq.legacy.load(Ordering::SeqCst) >= 2,
        "interrupts raised"
    );
    let tx_head = super::tests::tx_chain(&mut d, &frame(60, 3));
    w.notify(TX);
    let mut done = Vec::new();
    until("the transmit completed", || {
        done.extend(d.used(TX));
        !done.is_empty()
    });
    assert_eq!(done, vec![(tx_head, 0)]);
}
