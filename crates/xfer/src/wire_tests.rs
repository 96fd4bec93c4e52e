//! Tests of the wire format, the transports and the bandwidth cap.

use super::*;

#[test]
fn header_round_trip() {
    for (kind, len, arg) in [
        (Kind::Hello, 100, 0),
        (Kind::Pages, 8192, 0x10_0000),
        (Kind::Zero, 4, 0x2000),
        (Kind::Verdict, 10, 0),
    ] {
        let h = Header { kind, len, arg };
        assert_eq!(Header::decode(&h.encode()), Ok(h));
    }
}

#[test]
fn bad_headers_are_refused() {
    let good = Header {
        kind: Kind::Pages,
        len: 4096,
        arg: 4096,
    }
    .encode();
    let mut b = good;
    b[2] = 0;
    assert!(matches!(Header::decode(&b), Err(FrameError::Magic(_))));
    let mut b = good;
    b[0] = 99;
    assert_eq!(Header::decode(&b), Err(FrameError::Kind(99)));
    let mut b = good;
    b[1] = 2;
    assert_eq!(Header::decode(&b), Err(FrameError::Flags(2)));
    let mut b = good;
    b[1] = FLAG_CRC;
    assert!(Header::decode(&b).is_ok(), "the CRC flag is known");
    let mut b = good;
    b[4..8].copy_from_slice(&100u32.to_le_bytes());
    assert!(matches!(
        Header::decode(&b),
        Err(FrameError::Unaligned { .. })
    ));
    // A short Zero payload is refused at the header, before any payload is read.
    let z = Header {
        kind: Kind::Zero,
        len: 4,
        arg: 0,
    };
    let mut b = z.encode();
    b[4..8].copy_from_slice(&2u32.to_le_bytes());
    assert!(matches!(
        Header::decode(&b),
        Err(FrameError::Length { want: 4, .. })
    ));
    assert!(count(Kind::Zero, &[1, 0], 10).is_err());
    assert!(count(Kind::Zero, &0u32.to_le_bytes(), 10).is_err());
    assert!(count(Kind::Zero, &11u32.to_le_bytes(), 10).is_err());
    assert_eq!(count(Kind::Zero, &10u32.to_le_bytes(), 10), Ok(10));
    let mut b = good;
    b[4..8].copy_from_slice(&u32::MAX.to_le_bytes());
    assert!(matches!(
        Header::decode(&b),
        Err(FrameError::TooLong { .. })
    ));
}

/// Every byte string decodes to a header or an error; no panic (a fuzz loop over a
/// deterministic generator, plus every one-byte corruption of a valid header).
#[test]
fn decode_never_panics() {
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    for _ in 0..200_000 {
        let mut b = [0u8; HEADER];
        for c in b.chunks_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            c.copy_from_slice(&x.to_le_bytes()[..c.len()]);
        }
        if x & 1 == 0 {
            b[2..4].copy_from_slice(&MAGIC.to_le_bytes());
        }
        let _ = Header::decode(&b);
    }
    let good = Header {
        kind: Kind::Request,
        len: 4,
        arg: 8192,
    }
    .encode();
    for i in 0..HEADER {
        for v in 0..=255u8 {
            let mut b = good;
            b[i] = v;
            if let Ok(h) = Header::decode(&b) {
                assert!(h.len <= h.kind.max_len());
            }
        }
    }
}

#[test]
fn frames_the_peer_would_refuse_are_not_sent() {
    let (a, _b) = UnixStream::pair().unwrap();
    let mut s = Sock::Unix(a);
    for (kind, arg, len) in [
        (Kind::Zero, 0, 2),
        (Kind::Pages, 12, 4096),
        (Kind::Pages, 0, 65 * 4096),
        (Kind::Keepalive, 0, 1),
    ] {
        let e = s.send(kind, arg, &vec![0; len]).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput, "{kind:?}");
        let e = s.send_vectored(kind, arg, &vec![0; len]).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput, "{kind:?}");
    }
    s.send(Kind::Keepalive, 0, &[]).unwrap();
}

/// Frames with a CRC32C trailer: verified on the way in; a damaged one is reported with
/// the stream still in step (the next frame reads fine); frames without stay as they were.
#[test]
fn crc_trailers_catch_damage_and_keep_the_stream_in_step() {
    let page = vec![0xabu8; 4096];
    let mut out = Vec::new();
    encode_frame(&mut out, Kind::Pages, 8192, &page, true).unwrap();
    assert_eq!(out[1], FLAG_CRC);
    assert_eq!(out.len(), HEADER + 4096 + 4);
    let good = out.clone();
    out[HEADER + 100] ^= 1;
    encode_frame(&mut out, Kind::Zero, 0, &3u32.to_le_bytes(), true).unwrap();
    encode_frame(&mut out, Kind::Zero, 4096, &1u32.to_le_bytes(), false).unwrap();
    let mut r = &out[..];
    let mut buf = Vec::new();
    match read_frame_checked(&mut r, &mut buf) {
        Err(RecvError::Checksum {
            kind: Kind::Pages,
            arg: 8192,
            len: 4096,
            ..
        }) => {}
        other => panic!("{other:?}"),
    }
    let (h, checked) = read_frame_checked(&mut r, &mut buf).unwrap();
    assert_eq!((h.kind, h.arg, checked), (Kind::Zero, 0, true));
    let (h, checked) = read_frame_checked(&mut r, &mut buf).unwrap();
    assert_eq!((h.kind, h.arg, checked), (Kind::Zero, 4096, false));
    let mut r = &good[..];
    let (h, checked) = read_frame_checked(&mut r, &mut buf).unwrap();
    assert!(checked && h.kind == Kind::Pages && buf == page);
    // Damage in the header is caught too (here: the page address).
    let mut bad = good.clone();
    bad[9] ^= 0x10;
    assert!(matches!(
        read_frame_checked(&mut &bad[..], &mut buf),
        Err(RecvError::Checksum { .. })
    ));
    // A missing trailer is a truncated frame, not a hang or a panic.
    assert!(matches!(
        read_frame_checked(&mut &good[..good.len() - 2], &mut buf),
        Err(RecvError::Truncated)
    ));
}

#[test]
fn endpoints_parse() {
    assert_eq!(
        "tcp:127.0.0.1:4444".parse::<Endpoint>(),
        Ok(Endpoint::Tcp("127.0.0.1:4444".into()))
    );
    assert_eq!(
        "unix:/tmp/x".parse::<Endpoint>(),
        Ok(Endpoint::Unix("/tmp/x".into()))
    );
    for bad in ["tcp:host", "tcp:h:p", "unix:", "udp:1:2", ""] {
        assert!(bad.parse::<Endpoint>().is_err(), "{bad}");
    }
}

/// A TCP listener whose accept queue is full drops SYNs: a connect to it blocks for the
/// kernel's SYN retries (about 2 minutes) unless it has a timeout of its own.
#[test]
fn connect_to_a_host_that_drops_syns_ends_at_its_timeout() {
    use std::os::fd::FromRawFd;
    // SAFETY: a new socket; its fd is owned by the TcpListener at once.
    let l = unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0);
        assert!(fd >= 0, "socket: {}", io::Error::last_os_error());
        TcpListener::from_raw_fd(fd)
    };
    // SAFETY: sockaddr_in is plain data; all zeroes is a valid value.
    let mut addr: libc::sockaddr_in = unsafe { std::mem::zeroed() };
    addr.sin_family = libc::AF_INET as libc::sa_family_t;
    addr.sin_addr.s_addr = u32::from_ne_bytes([127, 0, 0, 1]);
    // SAFETY: a valid socket and a sockaddr_in of the size given; backlog 0.
    unsafe {
        assert_eq!(
            libc::bind(
                l.as_raw_fd(),
                (&addr as *const libc::sockaddr_in).cast(),
                std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
            ),
            0
        );
        assert_eq!(libc::listen(l.as_raw_fd(), 0), 0);
    }
    let port = l.local_addr().unwrap().port();
    // Fill the accept queue (never accepted).
    let mut held = Vec::new();
    for _ in 0..4 {
        if let Ok(s) =
            TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), Duration::from_millis(300))
        {
            held.push(s);
        }
    }
    assert!(!held.is_empty(), "no connection got into the queue");
    let ep = Endpoint::Tcp(format!("127.0.0.1:{port}"));
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let t = Instant::now();
        let r = ep.connect(Duration::from_secs(1));
        let _ = tx.send((r.map(|_| ()), t.elapsed()));
    });
    let (r, took) = rx
        .recv_timeout(Duration::from_secs(10))
        .expect("connect still blocked after 10 s");
    assert!(r.is_err(), "connected to a full queue?");
    assert!(took < Duration::from_secs(3), "took {took:?}");
    drop(l);
}

#[test]
fn rate_limit_paces() {
    let r = RateLimit::new(10 << 20);
    let t = Instant::now();
    for _ in 0..40 {
        r.take(65536, false);
    }
    // 2.5 MiB at 10 MiB/s: about 250 ms (minus the first burst).
    let ms = t.elapsed().as_millis();
    assert!((150..1000).contains(&ms), "{ms} ms");
}

#[test]
fn urgent_sends_never_wait_and_the_background_pays_for_them() {
    // 1 MiB/s: a background run of 256 KiB puts the bucket 250 ms in debt.
    let r = RateLimit::new(1 << 20);
    r.take(256 << 10, false);
    let t = Instant::now();
    for _ in 0..16 {
        r.take(4096 + 64, true);
    }
    assert!(t.elapsed() < Duration::from_millis(20), "{:?}", t.elapsed());
    // The background waits for its own debt and the urgent bytes: ~0.25 + 0.066 s.
    let t = Instant::now();
    r.take(4096, false);
    let ms = t.elapsed().as_millis();
    assert!((250..1500).contains(&ms), "{ms} ms");
}
