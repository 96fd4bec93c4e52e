//! Post-copy migration of an anonymous region between two threads over real sockets (Unix and
//! TCP loopback): the destination's memory is served by a memx fault loop over real
//! userfaultfd, toucher threads fault on it while the background push runs, and both sides'
//! digests and every byte are compared.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};
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
use xfer::push::{Push, PushConfig, Sent};
use xfer::reader::{MmapReader, PageReader};
use xfer::wire::{Endpoint, Kind, PAGE, RateLimit, Sock};

/// The 8 bytes at word `k` of page `p` of the source (pages with `p % 5 == 0` are zero).
fn word(p: u64, k: u64) -> u64 {
    if p % 5 == 0 {
        0
    } else {
        ((p << 20) | k).wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1
    }
}

fn byte(off: u64) -> u8 {
    let (p, o) = (off / PAGE, off % PAGE);
    word(p, o / 8).to_le_bytes()[(o % 8) as usize]
}

fn source_memory(len: usize) -> Arc<Mapping> {
    let m = Arc::new(Mapping::anonymous(len).unwrap());
    let base = m.as_ptr().cast::<u64>();
    for p in 0..(len as u64 / PAGE) {
        if p % 5 == 0 {
            continue; // never touched: reads as zero
        }
        for k in 0..PAGE / 8 {
            // SAFETY: inside our own mapping, aligned; no other thread uses it yet.
            unsafe { base.add((p * PAGE / 8 + k) as usize).write(word(p, k)) };
        }
    }
    m
}

/// Pages the destination must receive: all but the known-zero ones (`p % 10 == 0`); the
/// other zero pages (`p % 10 == 5`) go as zero counts.
fn needed(pages: u64) -> Vec<u64> {
    let mut w = vec![0u64; words_for(pages)];
    for p in 0..pages {
        if p % 10 != 0 {
            w[(p / 64) as usize] |= 1 << (p % 64);
        }
    }
    w
}

fn reader_digest(r: &dyn PageReader) -> u64 {
    let mut buf = vec![0u8; (64 * PAGE) as usize];
    let mut hashes = Vec::new();
    let pages = r.pages();
    let mut p = 0;
    while p < pages {
        let n = 64.min(pages - p);
        let b = &mut buf[..(n * PAGE) as usize];
        r.read(p, b).unwrap();
        for (k, pg) in b.chunks_exact(PAGE as usize).enumerate() {
            hashes.push((p + k as u64, page_hash(pg)));
        }
        p += n;
    }
    digest(hashes)
}

fn recv_kind(s: &mut Sock, want: Kind) -> Vec<u8> {
    let mut buf = Vec::new();
    let h = s
        .recv(&mut buf)
        .unwrap_or_else(|e| panic!("waiting for {want:?}: {}", error_chain(&e)));
    assert_eq!(h.kind, want);
    buf
}

/// The source: post-copy push of every needed page, `End`, wait for `Done`, `Verdict`.
fn source(ep: Endpoint, mem: Arc<Mapping>, rate: u64) -> (u64, xfer::push::PushStats) {
    let pages = mem.len() as u64 / PAGE;
    let h = Hello::new(42, MigrationMode::Postcopy, false, None);
    let (mut main, prio, _) = connect_pair(
        &ep,
        &xfer::tls::Security::Plain,
        &h,
        Duration::from_secs(10),
    )
    .unwrap_or_else(|e| panic!("{}", error_chain(&e)));
    let reader: Arc<dyn PageReader> = Arc::new(MmapReader::of_mapping(mem));
    let mut push = Push::new(
        reader.clone(),
        &needed(pages),
        Arc::new(RateLimit::new(rate)),
        Arc::new(Sent::default()),
        PushConfig::default(),
    );
    push.start(&main, &prio).unwrap();
    let t = Instant::now();
    while !push.background_done() {
        assert!(!push.is_lost(), "{:?}", push.take_lost());
        assert!(t.elapsed() < Duration::from_secs(120), "push too slow");
        thread::sleep(Duration::from_millis(2));
    }
    assert_eq!(push.remaining(), 0);
    main.send_json(Kind::End, &json!({})).unwrap();
    let done: serde_json::Value =
        serde_json::from_slice(&recv_kind(&mut main, Kind::Done)).unwrap();
    push.stop();
    let d = reader_digest(&*reader);
    main.send_json(Kind::Verdict, &json!({ "digest": format!("{d:#018x}") }))
        .unwrap();
    assert_eq!(
        done["digest"].as_str(),
        Some(format!("{d:#018x}").as_str()),
        "the destination's digest"
    );
    (d, push.stats())
}

struct DestOutcome {
    digest: u64,
    touched: u64,
    stats: memx::Stats,
    pull: xfer::pull::PullStats,
}

/// The destination: fault loop + pull; toucher threads fault while the push runs.
fn destination(
    l: xfer::wire::Listener,
    len: usize,
    touchers: usize,
    gap: Duration,
) -> (Arc<Mapping>, DestOutcome) {
    let (mut main, prio, hello) = accept_pair(
        &l,
        &xfer::tls::Security::Plain,
        Duration::from_secs(20),
        |_| Ok(false),
    )
    .unwrap_or_else(|e| panic!("{}", error_chain(&e)));
    assert_eq!(hello.id, 42);
    let pages = len as u64 / PAGE;
    let mem = Arc::new(Mapping::anonymous(len).unwrap());
    let pull = Pull::new(pages, 0, &needed(pages), Vec::new());
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
    .unwrap_or_else(|e| panic!("{}", error_chain(&e)));
    pull.attach(fl.installer());
    let (tx, rx) = mpsc::channel();
    pull.spawn_receivers(&main, &prio, 0, &tx).unwrap();
    // Touchers: read pages all over the memory and check them, while the push runs.
    let stop = Arc::new(AtomicBool::new(false));
    let touched = Arc::new(AtomicU64::new(0));
    let hs: Vec<_> = (0..touchers)
        .map(|t| {
            let (mem, stop, touched) = (mem.clone(), stop.clone(), touched.clone());
            thread::spawn(move || {
                let mut x = 0x1234_5678_9abc_def1u64 ^ (t as u64) << 32;
                while !stop.load(SeqCst) {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    let off = x % (len as u64);
                    assert_eq!(mem.read_u8(off as usize), byte(off), "offset {off:#x}");
                    touched.fetch_add(1, SeqCst);
                    if !gap.is_zero() {
                        thread::sleep(gap);
                    }
                }
            })
        })
        .collect();
    let mut end = false;
    let mut done_sent = false;
    let t = Instant::now();
    let verdict = loop {
        assert!(t.elapsed() < Duration::from_secs(180), "migration too slow");
        if end && !done_sent && pull.left() == 0 {
            main.send_json(
                Kind::Done,
                &json!({ "digest": format!("{:#018x}", pull.digest()) }),
            )
            .unwrap();
            done_sent = true;
        }
        match rx.recv_timeout(Duration::from_millis(5)) {
            Ok(Event::Frame {
                header, payload, ..
            }) => match header.kind {
                Kind::End => end = true,
                Kind::Verdict => break payload,
                k => panic!("unexpected {k:?}"),
            },
            Ok(Event::Lost { error, channel, .. }) if done_sent => {
                // The source may close after its verdict; the verdict is read already or
                // comes on main before the close.
                let _ = (error, channel);
            }
            Ok(Event::Lost { error, channel, .. }) => {
                panic!("{channel:?} lost: {}", error_chain(&error))
            }
            Ok(Event::Failed { error, channel, .. }) => {
                panic!("{channel:?} failed: {}", error_chain(&error))
            }
            Err(_) => {}
        }
    };
    stop.store(true, SeqCst);
    for h in hs {
        h.join().unwrap();
    }
    let v: serde_json::Value = serde_json::from_slice(&verdict).unwrap();
    let d = xfer::digest::hex::parse(v["digest"].as_str().unwrap()).unwrap();
    assert_eq!(d, pull.digest(), "the source's verdict");
    assert!(fl.installer().pending().is_empty());
    let stats = fl.stop().unwrap_or_else(|e| panic!("{}", error_chain(&e)));
    (
        mem,
        DestOutcome {
            digest: pull.digest(),
            touched: touched.load(SeqCst),
            stats,
            pull: pull.stats(),
        },
    )
}

fn migrate(l: xfer::wire::Listener, len: usize, rate: u64) -> DestOutcome {
    migrate_with(l, len, rate, 4, Duration::ZERO)
}

/// `touchers` threads, each sleeping `gap` after every touch.
fn migrate_with(
    l: xfer::wire::Listener,
    len: usize,
    rate: u64,
    touchers: usize,
    gap: Duration,
) -> DestOutcome {
    let ep = l.endpoint().unwrap();
    let src = source_memory(len);
    let s2 = src.clone();
    let sh = thread::spawn(move || source(ep, s2, rate));
    let (dst, out) = destination(l, len, touchers, gap);
    let (src_digest, push) = sh.join().unwrap();
    assert_eq!(out.digest, src_digest);
    let pages = len as u64 / PAGE;
    let needed_pages = (0..pages).filter(|p| p % 10 != 0).count() as u64;
    let zero_sent = (0..pages).filter(|p| p % 10 == 5).count() as u64;
    eprintln!(
        "{} MiB: source {push:?}; destination {:?}; touches {}; faults {} settled {} latency {:?} log2 {:?} blocktime {:?}",
        len >> 20,
        out.pull,
        out.touched,
        out.stats.faults,
        out.stats.faults_settled_by_install,
        out.stats.latency,
        out.stats.latency_log2_us,
        out.stats.blocktime_ns
    );
    // Every needed page sent exactly once (data or zero count), and received.
    assert_eq!(push.pages + push.zero_pages, needed_pages);
    assert_eq!(
        push.zero_pages, zero_sent,
        "the p % 10 == 5 pages go as counts"
    );
    assert_eq!(
        out.pull.pages_background + out.pull.pages_priority,
        push.pages,
        "{:?}",
        out.pull
    );
    assert_eq!(out.pull.duplicates, 0);
    assert_eq!(out.stats.errors, 0, "{:?}", out.stats.last_error);
    assert!(out.touched > 0);
    // The touchers faulted ahead of the push: requests went out and were answered.
    assert!(out.pull.faults_requested > 0, "{:?}", out.pull);
    assert!(push.requests > 0);
    assert!(out.stats.faults_settled_by_install > 0);
    assert!(out.stats.latency.count > 0 && out.stats.latency.max_ns < 30_000_000_000);
    assert!(out.stats.blocktime_total_ns > 0);
    // Every byte.
    let (a, b) = (MmapReader::of_mapping(src), MmapReader::of_mapping(dst));
    let mut x = vec![0u8; (64 * PAGE) as usize];
    let mut y = x.clone();
    for p in (0..pages).step_by(64) {
        a.read(p, &mut x).unwrap();
        b.read(p, &mut y).unwrap();
        assert!(x == y, "pages {p}..+64 differ");
    }
    out
}

#[test]
fn postcopy_over_unix_socket() {
    let dir = tempfile::tempdir().unwrap();
    let ep = Endpoint::Unix(dir.path().join("mig.sock"));
    // Paced at 2 GB/s: the touchers get ahead of the background push.
    migrate(ep.listen().unwrap(), 256 << 20, 2_000_000_000);
}

#[test]
fn faults_are_answered_ahead_of_a_capped_background() {
    // 32 MiB at 8 MB/s: the background takes ~4 s, and each of its 256 KiB runs puts the
    // link 33 ms in debt. One toucher, resting 2 ms between touches (the background runs
    // meanwhile): answers to its faults are never paced, so they come in well under that.
    let dir = tempfile::tempdir().unwrap();
    let ep = Endpoint::Unix(dir.path().join("mig.sock"));
    let out = migrate_with(
        ep.listen().unwrap(),
        32 << 20,
        8_000_000,
        1,
        Duration::from_millis(2),
    );
    let lat = &out.stats.latency;
    assert!(lat.count >= 20, "{lat:?}");
    assert!(lat.p50_ns < 10_000_000, "fault p50 behind the cap: {lat:?}");
}

#[test]
fn postcopy_over_tcp_loopback() {
    let ep = Endpoint::Tcp("127.0.0.1:0".into());
    migrate(ep.listen().unwrap(), 256 << 20, 1_000_000_000);
}
