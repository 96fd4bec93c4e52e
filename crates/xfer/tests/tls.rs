//! TLS streams (`xfer::tls`) as the engines use them: clones of one [`Sock`] reading and
//! writing at once, read timeouts, shutdown.

use std::io::{self, Read, Write};
use std::path::Path;
use std::time::{Duration, Instant};

use xfer::proto::{secure_client, secure_server};
use xfer::tls::Credentials;
use xfer::wire::{Endpoint, Sock};

/// A TLS pair over loopback with the pre-shared key in `dir`.
fn pair(dir: &Path) -> (Sock, Sock) {
    let key = dir.join("psk");
    std::fs::write(&key, (0u8..32).collect::<Vec<u8>>()).unwrap();
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let ep: Endpoint = format!("tcp:{}", l.local_addr().unwrap()).parse().unwrap();
    let sec = ep
        .security(Some(&Credentials::Psk { key_file: key }), false)
        .unwrap();
    let s2 = sec.clone();
    let server = std::thread::spawn(move || {
        let (t, _) = l.accept().unwrap();
        secure_server(Sock::Tcp(t), &s2).unwrap()
    });
    let c = secure_client(
        Sock::Tcp(std::net::TcpStream::connect(l_addr(&ep)).unwrap()),
        &sec,
        &ep,
    )
    .unwrap();
    (c, server.join().unwrap())
}

fn l_addr(ep: &Endpoint) -> String {
    match ep {
        Endpoint::Tcp(a) => a.clone(),
        Endpoint::Unix(_) => unreachable!(),
    }
}

#[test]
fn clones_carry_both_directions_at_once_and_timeouts_hold() {
    let d = tempfile::tempdir().unwrap();
    let (c, s) = pair(d.path());
    const N: usize = 16 << 20;
    fn pattern(i: usize) -> u8 {
        (i * 7 + i / 4093) as u8
    }
    // Each side writes 16 MiB from one clone while reading 16 MiB on another.
    let run = move |sock: Sock| {
        let mut w = sock.try_clone().unwrap();
        let writer = std::thread::spawn(move || {
            let buf: Vec<u8> = (0..N).map(pattern).collect();
            for chunk in buf.chunks(100_003) {
                w.write_all(chunk).unwrap();
            }
        });
        let mut r = sock;
        let mut got = vec![0u8; N];
        r.read_exact(&mut got).unwrap();
        writer.join().unwrap();
        assert!(got.iter().enumerate().all(|(i, &b)| b == pattern(i)));
        r
    };
    let t = std::thread::spawn(move || run(s));
    let mut c = run(c);
    let mut s = t.join().unwrap();
    // Nothing more comes: a read timeout ends the read.
    c.set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let t0 = Instant::now();
    let e = c.read(&mut [0u8; 8]).unwrap_err();
    assert!(
        matches!(
            e.kind(),
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
        ),
        "{e}"
    );
    assert!(t0.elapsed() < Duration::from_secs(2));
    // A shutdown is the end of the stream for the peer.
    c.shutdown();
    assert_eq!(s.read(&mut [0u8; 8]).unwrap(), 0);
}
