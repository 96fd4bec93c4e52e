//! Malformed frames give errors, never panics: on a real socket, into the destination's
//! receivers and the source's request reader; and a property test of the frame reader over
//! arbitrary byte streams.

use std::io::{Cursor, Write};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, mpsc};
use std::time::Duration;

use memx::{Config, FaultLoop, Mapping, Region};
use proptest::prelude::*;
use uffd::error_chain;
use xfer::proto::Channel;
use xfer::pull::{Event, Pull, PullError};
use xfer::push::{LinkError, Push, PushConfig, Sent};
use xfer::reader::MmapReader;
use xfer::wire::{
    FrameError, HEADER, Header, Kind, MAGIC, PAGE, RateLimit, RecvError, Sock, read_frame,
};

fn raw(kind: u8, len: u32, arg: u64) -> [u8; HEADER] {
    let mut b = [0u8; HEADER];
    b[0] = kind;
    b[2..4].copy_from_slice(&MAGIC.to_le_bytes());
    b[4..8].copy_from_slice(&len.to_le_bytes());
    b[8..16].copy_from_slice(&arg.to_le_bytes());
    b
}

fn pair() -> (Sock, UnixStream) {
    let (a, b) = UnixStream::pair().unwrap();
    (Sock::Unix(a), b)
}

#[test]
fn malformed_frames_on_a_socket_are_errors() {
    let cases: Vec<(Vec<u8>, &str)> = vec![
        // A Zero frame claiming 2 bytes: refused at the header.
        ([&raw(4, 2, 0)[..], &[1, 0]].concat(), "length"),
        // A Request of 8 bytes.
        ([&raw(10, 8, 0)[..], &[0; 8]].concat(), "too long"),
        // Pages of 4 GiB, and of a bit more than 64 pages.
        (raw(3, u32::MAX, 0).to_vec(), "too long"),
        (raw(3, 65 * 4096, 0).to_vec(), "too long"),
        // A JSON frame over its bound.
        (raw(1, 2 << 20, 0).to_vec(), "too long"),
        // Unknown kinds, reserved flags, bad magic.
        (raw(99, 0, 0).to_vec(), "kind"),
        (raw(0, 0, 0).to_vec(), "kind"),
        (
            {
                let mut b = raw(4, 4, 0);
                b[1] = 2;
                b.to_vec()
            },
            "flags",
        ),
        (
            {
                let mut b = raw(4, 4, 0);
                b[2] = 0;
                b.to_vec()
            },
            "magic",
        ),
        // Unaligned pages, a bitmap that is not whole words.
        ([&raw(3, 4096, 12)[..], &[0; 4096]].concat(), "unaligned"),
        (raw(8, 12, 0).to_vec(), "length"),
        // The stream ends inside a header, and inside a payload.
        (raw(4, 4, 0)[..7].to_vec(), "truncated"),
        ([&raw(3, 4096, 0)[..], &[0; 100]].concat(), "truncated"),
    ];
    for (bytes, what) in cases {
        let (mut s, mut peer) = pair();
        peer.write_all(&bytes).unwrap();
        drop(peer);
        let mut buf = Vec::new();
        let e = s.recv(&mut buf).expect_err(what);
        let ok = matches!(
            (what, &e),
            ("length", RecvError::Frame(FrameError::Length { .. }))
                | ("too long", RecvError::Frame(FrameError::TooLong { .. }))
                | ("kind", RecvError::Frame(FrameError::Kind(_)))
                | ("flags", RecvError::Frame(FrameError::Flags(_)))
                | ("magic", RecvError::Frame(FrameError::Magic(_)))
                | ("unaligned", RecvError::Frame(FrameError::Unaligned { .. }))
                | ("truncated", RecvError::Truncated)
        );
        assert!(ok, "{what}: got {}", error_chain(&e));
        assert!(buf.len() <= 4096 + 100, "nothing huge was allocated");
    }
    // A clean close between frames.
    let (mut s, peer) = pair();
    drop(peer);
    assert!(matches!(s.recv(&mut Vec::new()), Err(RecvError::Closed)));
}

/// A destination over a small memory, its receivers on a socket pair whose far ends are
/// returned.
fn destination(
    pages: u64,
) -> (
    FaultLoop,
    Pull,
    mpsc::Receiver<Event>,
    UnixStream,
    UnixStream,
) {
    let mem = Mapping::anonymous((pages * PAGE) as usize).unwrap();
    let pull = Pull::new(pages, 0, &[!0u64; 1], Vec::new());
    let fl = FaultLoop::start(
        &[Region {
            range: mem.range(),
            offset: 0,
        }],
        pull.source(),
        Config::default(),
    )
    .unwrap();
    // The mapping must outlive the loop: leak it (a test).
    std::mem::forget(mem);
    pull.attach(fl.installer());
    let (tx, rx) = mpsc::channel();
    let (m, mp) = pair();
    let (p, pp) = pair();
    pull.spawn_receivers(&m, &p, 7, &tx).unwrap();
    (fl, pull, rx, mp, pp)
}

fn next(rx: &mpsc::Receiver<Event>) -> Event {
    rx.recv_timeout(Duration::from_secs(5))
        .expect("the receiver reported")
}

#[test]
fn malformed_payloads_fail_the_receiver_with_an_error() {
    let frames: Vec<(Vec<u8>, &str)> = vec![
        // A count of 0 and a count past the memory.
        ([&raw(4, 4, 0)[..], &0u32.to_le_bytes()].concat(), "count"),
        (
            [&raw(4, 4, 0)[..], &u32::MAX.to_le_bytes()].concat(),
            "count",
        ),
        // Zero pages that run past the end.
        (
            [&raw(4, 4, 60 * PAGE)[..], &10u32.to_le_bytes()].concat(),
            "range",
        ),
        // Pages beyond the memory.
        ([&raw(3, 4096, 1 << 40)[..], &[1; 4096]].concat(), "range"),
        // An unknown kind, a short Zero payload.
        (raw(77, 0, 0).to_vec(), "frame"),
        ([&raw(4, 3, 0)[..], &[1, 0, 0]].concat(), "frame"),
    ];
    for (bytes, what) in frames {
        let (fl, pull, rx, mut main, _prio) = destination(64);
        main.write_all(&bytes).unwrap();
        match next(&rx) {
            Event::Failed {
                generation: 7,
                channel: Channel::Main,
                error,
            } => {
                let ok = match what {
                    "count" => matches!(error, PullError::Frame(FrameError::Count { .. })),
                    "range" => matches!(error, PullError::OutOfRange { .. }),
                    _ => matches!(error, PullError::Frame(_)),
                };
                assert!(ok, "{what}: {}", error_chain(&error));
            }
            e => panic!("{what}: {e:?}"),
        }
        assert_eq!(pull.left(), 64, "nothing installed");
        fl.stop().unwrap();
    }
    // Valid frames still work, control frames are handed up, a close is a loss.
    let (fl, pull, rx, mut main, prio) = destination(64);
    main.write_all(&[&raw(4, 4, 0)[..], &2u32.to_le_bytes()].concat())
        .unwrap();
    main.write_all(&[&raw(3, 4096, 2 * PAGE)[..], &[5u8; 4096]].concat())
        .unwrap();
    main.write_all(&[&raw(11, 2, 0)[..], b"{}"].concat())
        .unwrap();
    match next(&rx) {
        Event::Frame {
            header, payload, ..
        } => {
            assert_eq!(header.kind, Kind::End);
            assert_eq!(payload, b"{}");
        }
        e => panic!("{e:?}"),
    }
    assert_eq!(pull.left(), 61);
    drop(prio);
    match next(&rx) {
        Event::Lost {
            channel: Channel::Priority,
            error: RecvError::Closed,
            ..
        } => {}
        e => panic!("{e:?}"),
    }
    let stats = fl.stop().unwrap();
    assert_eq!(stats.pages_installed, 3);
}

#[test]
fn bad_requests_lose_the_source_link_with_an_error() {
    let m = Arc::new(Mapping::anonymous(16 * PAGE as usize).unwrap());
    for (bytes, want) in [
        // A page past the memory, a count past MAX_RUN, a frame that is not a request.
        (
            [&raw(10, 4, 99 * PAGE)[..], &1u32.to_le_bytes()].concat(),
            "page",
        ),
        (
            [&raw(10, 4, 0)[..], &1000u32.to_le_bytes()].concat(),
            "count",
        ),
        ([&raw(3, 4096, 0)[..], &[0; 4096]].concat(), "page"),
        (raw(200, 0, 0).to_vec(), "recv"),
    ] {
        let mut push = Push::new(
            Arc::new(MmapReader::of_mapping(m.clone())),
            &[0xffff],
            Arc::new(RateLimit::new(0)),
            Arc::new(Sent::default()),
            PushConfig::default(),
        );
        let (main, _main_peer) = pair();
        let (prio, mut prio_peer) = pair();
        // Nothing to push in the background: only requests.
        push.recover(&[0]).unwrap();
        push.start(&main, &prio).unwrap();
        prio_peer.write_all(&bytes).unwrap();
        let t = std::time::Instant::now();
        while !push.is_lost() && t.elapsed() < Duration::from_secs(5) {
            std::thread::sleep(Duration::from_millis(2));
        }
        push.stop();
        let e = push.take_lost().expect("the link is lost");
        let ok = match want {
            "page" => matches!(e, LinkError::BadRequest { .. }),
            "count" => matches!(e, LinkError::BadCount(_)),
            _ => matches!(e, LinkError::PriorityRecv(RecvError::Frame(_))),
        };
        assert!(ok, "{want}: {}", error_chain(&e));
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    /// Any byte stream reads as frames then an error; every frame read fits its kind.
    #[test]
    fn frame_reader_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..600),
                                 valid in any::<bool>(), kind in 1u8..=17, len in 0u32..64) {
        let mut stream = Vec::new();
        if valid {
            // A plausible header first, so the checks past the magic are reached too.
            stream.extend_from_slice(&raw(kind, len, 0));
        }
        stream.extend_from_slice(&bytes);
        let mut c = Cursor::new(stream);
        let mut buf = Vec::new();
        for _ in 0..64 {
            match read_frame(&mut c, &mut buf) {
                Ok(h) => {
                    prop_assert!(h.len <= h.kind.max_len());
                    prop_assert_eq!(buf.len(), h.len as usize);
                    prop_assert!(h.kind.check(h.len, h.arg).is_ok());
                    prop_assert_eq!(Header::decode(&h.encode()), Ok(h));
                }
                Err(_) => break,
            }
        }
    }

    /// Counts parse only from exactly four bytes within bounds.
    #[test]
    fn counts_are_bounded(payload in proptest::collection::vec(any::<u8>(), 0..9), max in 1u32..100) {
        if let Ok(n) = xfer::wire::count(Kind::Zero, &payload, max) {
            prop_assert_eq!(payload.len(), 4);
            prop_assert!(n >= 1 && n <= max);
        }
    }
}
