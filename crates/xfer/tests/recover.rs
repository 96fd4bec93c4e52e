//! Post-copy recovery: the link is cut while the push runs and threads fault; the source
//! reconnects with a resume hello, the destination answers with the pages it still lacks and
//! asks again for the pages threads wait on; the migration completes with equal digests.

use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::sync::{Arc, mpsc};
use std::thread;
use std::time::{Duration, Instant};

use memx::{Config, FaultLoop, Mapping, Region};
use serde_json::json;
use uffd::error_chain;
use xfer::bitmap::words_for;
use xfer::digest::{digest, page_hash};
use xfer::proto::{Hello, MigrationMode, accept_pair, connect_pair};
use xfer::pull::{Event, Pull};
use xfer::push::{Push, PushConfig, Sent, read_recover};
use xfer::reader::{MmapReader, PageReader};
use xfer::status::{Role, State, Status};
use xfer::wire::{Endpoint, Kind, PAGE, RateLimit};

const LEN: usize = 32 << 20;
const PAGES: u64 = LEN as u64 / PAGE;

fn byte(off: u64) -> u8 {
    (off / PAGE).wrapping_mul(131) as u8 ^ (off % 251) as u8 | 1
}

fn all_needed() -> Vec<u64> {
    vec![!0u64; words_for(PAGES)]
}

fn source(ep: Endpoint, mem: Arc<Mapping>, status: Status) -> u64 {
    let reader: Arc<dyn PageReader> = Arc::new(MmapReader::of_mapping(mem));
    let hello = Hello::new(42, MigrationMode::Postcopy, false, None);
    let (main, prio, _) = connect_pair(
        &ep,
        &xfer::tls::Security::Plain,
        &hello,
        Duration::from_secs(10),
    )
    .unwrap();
    status.go(State::Switchover).unwrap();
    // 64 MB/s: the 32 MiB take about half a second, so the cut lands mid-way.
    let mut push = Push::new(
        reader.clone(),
        &all_needed(),
        Arc::new(RateLimit::new(64_000_000)),
        Arc::new(Sent::default()),
        PushConfig::default(),
    );
    push.start(&main, &prio).unwrap();
    status.go(State::Postcopy).unwrap();
    thread::sleep(Duration::from_millis(150));
    assert!(push.remaining() > 0, "the cut must land mid-way");
    // The link drops.
    main.shutdown();
    prio.shutdown();
    let t = Instant::now();
    while !push.is_lost() && t.elapsed() < Duration::from_secs(5) {
        thread::sleep(Duration::from_millis(1));
    }
    push.stop();
    let why = push.take_lost().expect("the loss is reported");
    status
        .go_with(State::PostcopyPaused, |s| s.error = Some(error_chain(&why)))
        .unwrap();
    // Resume: reconnect, read what the destination lacks, push on.
    status.go(State::Resuming).unwrap();
    let resume = Hello::new(42, MigrationMode::Postcopy, true, None);
    let (mut main, prio, _) = connect_pair(
        &ep,
        &xfer::tls::Security::Plain,
        &resume,
        Duration::from_secs(10),
    )
    .unwrap();
    let missing = read_recover(&mut main, PAGES).unwrap_or_else(|e| panic!("{}", error_chain(&e)));
    push.recover(&missing).unwrap();
    push.start(&main, &prio).unwrap();
    status.go(State::Postcopy).unwrap();
    while !push.background_done() {
        assert!(!push.is_lost(), "{:?}", push.take_lost());
        thread::sleep(Duration::from_millis(2));
    }
    main.send_json(Kind::End, &json!({})).unwrap();
    let mut buf = Vec::new();
    let h = main.recv(&mut buf).unwrap();
    assert_eq!(h.kind, Kind::Done);
    push.stop();
    let mut hashes = Vec::new();
    let mut pg = vec![0u8; PAGE as usize];
    for p in 0..PAGES {
        reader.read(p, &mut pg).unwrap();
        hashes.push((p, page_hash(&pg)));
    }
    let d = digest(hashes);
    main.send_json(Kind::Verdict, &json!({ "digest": format!("{d:#018x}") }))
        .unwrap();
    status.go(State::Completed).unwrap();
    d
}

#[test]
fn postcopy_recovers_after_a_lost_link() {
    let dir = tempfile::tempdir().unwrap();
    let l = Endpoint::Unix(dir.path().join("m.sock")).listen().unwrap();
    let ep = l.endpoint().unwrap();
    let src = Arc::new(Mapping::anonymous(LEN).unwrap());
    for off in (0..LEN as u64).step_by(509) {
        src.write_u8(off as usize, byte(off));
    }
    let expect = |off: u64| if off % 509 == 0 { byte(off) } else { 0 };
    let src_status = Status::new(Role::Source, Some(MigrationMode::Postcopy));
    let (s2, st2) = (src.clone(), src_status.clone());
    let sh = thread::spawn(move || source(ep, s2, st2));

    // Destination.
    let status = Status::new(Role::Destination, Some(MigrationMode::Postcopy));
    let (mut main, mut prio, _) = accept_pair(
        &l,
        &xfer::tls::Security::Plain,
        Duration::from_secs(10),
        |_| Ok(false),
    )
    .unwrap();
    status.go(State::Switchover).unwrap();
    let mem = Arc::new(Mapping::anonymous(LEN).unwrap());
    let pull = Pull::new(PAGES, 0, &all_needed(), Vec::new());
    let fl = FaultLoop::start(
        &[Region {
            range: mem.range(),
            offset: 0,
        }],
        pull.source(),
        Config {
            threads: 2,
            ..Config::default()
        },
    )
    .unwrap();
    pull.attach(fl.installer());
    let (tx, rx) = mpsc::channel();
    pull.spawn_receivers(&main, &prio, 0, &tx).unwrap();
    status.go(State::Postcopy).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let touchers: Vec<_> = (0..3u64)
        .map(|t| {
            let (mem, stop) = (mem.clone(), stop.clone());
            thread::spawn(move || {
                let mut x = 0x9e37_79b9_7f4a_7c15u64 ^ t;
                while !stop.load(SeqCst) {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    let off = (x % (LEN as u64 / 509)) * 509;
                    assert_eq!(mem.read_u8(off as usize), expect(off), "{off:#x}");
                }
            })
        })
        .collect();
    let mut generation = 0;
    let mut end = false;
    let mut done = false;
    let t = Instant::now();
    loop {
        assert!(t.elapsed() < Duration::from_secs(60), "{:?}", pull.stats());
        if end && !done && pull.left() == 0 {
            main.send_json(
                Kind::Done,
                &json!({ "digest": format!("{:#018x}", pull.digest()) }),
            )
            .unwrap();
            done = true;
        }
        match rx.recv_timeout(Duration::from_millis(5)) {
            Ok(Event::Frame {
                header, payload, ..
            }) => match header.kind {
                Kind::End => end = true,
                Kind::Verdict => {
                    let v: serde_json::Value = serde_json::from_slice(&payload).unwrap();
                    let d = xfer::digest::hex::parse(v["digest"].as_str().unwrap()).unwrap();
                    assert_eq!(d, pull.digest());
                    break;
                }
                k => panic!("unexpected {k:?}"),
            },
            Ok(Event::Lost { generation: g, .. }) if g != generation || done => {}
            Ok(Event::Lost { error, .. }) => {
                // Post-copy recovery: wait for the source, tell it what is missing, ask again.
                pull.set_priority(None);
                main.shutdown();
                prio.shutdown();
                status
                    .go_with(State::PostcopyPaused, |s| {
                        s.error = Some(error_chain(&error))
                    })
                    .unwrap();
                let (m2, p2, h) = accept_pair(
                    &l,
                    &xfer::tls::Security::Plain,
                    Duration::from_secs(10),
                    |h| {
                        if h.resume && h.id == 42 {
                            Ok(false)
                        } else {
                            Err("not a resume of this migration".into())
                        }
                    },
                )
                .unwrap();
                assert!(h.resume);
                status.go(State::Resuming).unwrap();
                (main, prio) = (m2, p2);
                main.send(Kind::Recover, 0, &pull.recover_bitmap()).unwrap();
                generation += 1;
                pull.spawn_receivers(&main, &prio, generation, &tx).unwrap();
                pull.rerequest();
                status.go(State::Postcopy).unwrap();
            }
            Ok(Event::Failed { error, .. }) => panic!("{}", error_chain(&error)),
            Err(_) => {}
        }
    }
    stop.store(true, SeqCst);
    for h in touchers {
        h.join().unwrap();
    }
    let stats = fl.stop().unwrap();
    status.go(State::Completed).unwrap();
    let src_digest = sh.join().unwrap();
    assert_eq!(src_digest, pull.digest());
    assert_eq!(generation, 1, "one recovery");
    assert_eq!(src_status.state(), State::Completed);
    assert_eq!(stats.errors, 0, "{:?}", stats.last_error);
    for off in (0..LEN as u64).step_by(509) {
        assert_eq!(mem.read_u8(off as usize), byte(off));
    }
    eprintln!("{:?}\n{:?}", pull.stats(), stats.latency);
}
