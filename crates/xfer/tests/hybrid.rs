//! Hybrid migration: pre-copy rounds over a real dirty log (userfaultfd asynchronous write
//! protection) while a writer thread dirties the source, then post-copy for the rest into a
//! fault loop; both sides' digests and every byte agree.

use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};
use std::sync::{Arc, mpsc};
use std::thread;
use std::time::{Duration, Instant};

use memx::{Config, FaultLoop, Mapping, Region};
use uffd::error_chain;
use xfer::bitmap::{popcount, runs, words_for};
use xfer::digest::{digest, page_hash};
use xfer::dirty::WriteProtectLog;
use xfer::precopy::{Precopied, Precopy};
use xfer::pull::{Event, Pull};
use xfer::push::{Push, PushConfig, Sent};
use xfer::reader::{MmapReader, PageReader};
use xfer::wire::{Kind, PAGE, RateLimit, Sock};

const LEN: usize = 16 << 20;
const PAGES: u64 = LEN as u64 / PAGE;

fn pair() -> (Sock, Sock) {
    let (a, b) = UnixStream::pair().unwrap();
    (Sock::Unix(a), Sock::Unix(b))
}

#[test]
fn precopy_rounds_then_postcopy() {
    let src = Arc::new(Mapping::anonymous(LEN).unwrap());
    // A quarter of the pages hold data at the start; the rest were never touched.
    for p in (0..PAGES).step_by(4) {
        src.write_u8((p * PAGE) as usize + 1, p as u8 | 1);
    }
    let mut log =
        WriteProtectLog::new(src.range()).unwrap_or_else(|e| panic!("{}", error_chain(&e)));
    let mut maybe = vec![0u64; words_for(PAGES)];
    for p in (0..PAGES).step_by(4) {
        maybe[(p / 64) as usize] |= 1 << (p % 64);
    }
    // A writer dirties pages (some never touched before) while the rounds go.
    let stop = Arc::new(AtomicBool::new(false));
    let writes = Arc::new(AtomicU64::new(0));
    let (s2, st2, w2) = (src.clone(), stop.clone(), writes.clone());
    let writer = thread::spawn(move || {
        let mut x = 88172645463325252u64;
        while !st2.load(SeqCst) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let p = x % PAGES;
            s2.write_u8((p * PAGE + x % PAGE) as usize, (x >> 32) as u8 | 1);
            w2.fetch_add(1, SeqCst);
            if x % 64 == 0 {
                thread::sleep(Duration::from_micros(50));
            }
        }
    });
    let reader: Arc<dyn PageReader> = Arc::new(MmapReader::of_mapping(src.clone()));
    let (mut main, mut main_in) = pair();
    let (prio, prio_in) = pair();
    let sent = Arc::new(Sent::default());
    let rate = Arc::new(RateLimit::new(0));
    let mut pre = Precopy::new(reader.clone(), maybe.clone(), rate.clone(), sent.clone());

    // The destination applies pre-copy frames into its memory (nothing runs on it yet).
    let dst = Arc::new(Mapping::anonymous(LEN).unwrap());
    let d2 = dst.clone();
    let dest = thread::spawn(move || {
        let mut applied = Precopied::new(PAGES);
        let mut buf = Vec::new();
        loop {
            let h = main_in.recv(&mut buf).unwrap();
            match h.kind {
                Kind::Round => {}
                Kind::Switch => break,
                _ => applied
                    .apply(&h, &buf, |p, bytes| {
                        // SAFETY: inside the destination mapping, which nothing else uses yet.
                        unsafe {
                            std::ptr::copy_nonoverlapping(
                                bytes.as_ptr(),
                                d2.as_ptr().add((p * PAGE) as usize),
                                bytes.len(),
                            )
                        }
                    })
                    .unwrap_or_else(|e| panic!("{}", error_chain(&e))),
            }
        }
        (applied, main_in)
    });

    let mut to_send = maybe;
    for _ in 0..3 {
        pre.round(&mut main, &to_send).unwrap();
        to_send = pre.dirty(&mut log).unwrap();
    }
    // Switchover: the source pauses (the writer stops), the rest goes post-copy.
    stop.store(true, SeqCst);
    writer.join().unwrap();
    let dirty = pre.dirty(&mut log).unwrap();
    let needed = pre.needed(&to_send, &dirty);
    assert!(popcount(&needed) > 0, "the writer left pages for post-copy");
    main.send_json(Kind::Switch, &serde_json::json!({}))
        .unwrap();
    let (applied, main_in) = dest.join().unwrap();

    // Destination: drop stale copies of the needed pages, then serve them on demand.
    for (p, n) in runs(&needed) {
        // SAFETY: inside the destination mapping; nothing uses these pages now.
        let r = unsafe {
            libc::madvise(
                dst.as_ptr().add((p * PAGE) as usize).cast(),
                (n * PAGE) as usize,
                libc::MADV_DONTNEED,
            )
        };
        assert_eq!(r, 0);
    }
    let pull = Pull::new(PAGES, 0, &needed, applied.hashes().to_vec());
    let fl = FaultLoop::start(
        &[Region {
            range: dst.range(),
            offset: 0,
        }],
        pull.source(),
        Config::default(),
    )
    .unwrap();
    pull.attach(fl.installer());
    let (tx, rx) = mpsc::channel();
    pull.spawn_receivers(&main_in, &prio_in, 0, &tx).unwrap();
    let mut push = Push::new(reader.clone(), &needed, rate, sent, PushConfig::default());
    push.start(&main, &prio).unwrap();
    // Touch every needed page from here while the push runs.
    let d3 = dst.clone();
    let n2 = needed.clone();
    let toucher = thread::spawn(move || {
        for (p, n) in runs(&n2).collect::<Vec<_>>().into_iter().rev() {
            for q in p..p + n {
                let _ = d3.read_u8((q * PAGE) as usize);
            }
        }
    });
    let t = Instant::now();
    while pull.left() > 0 {
        assert!(t.elapsed() < Duration::from_secs(60), "{:?}", pull.stats());
        match rx.recv_timeout(Duration::from_millis(2)) {
            Ok(Event::Failed { error, .. }) => panic!("{}", error_chain(&error)),
            Ok(Event::Lost { error, .. }) => panic!("{}", error_chain(&error)),
            Ok(Event::Frame { header, .. }) => panic!("unexpected {:?}", header.kind),
            Err(_) => {}
        }
    }
    toucher.join().unwrap();
    push.stop();
    let stats = fl.stop().unwrap();
    assert_eq!(stats.errors, 0, "{:?}", stats.last_error);
    // Digests: the source's over the pages that may hold data, the destination's as
    // installed; and every byte.
    let mut pg = vec![0u8; PAGE as usize];
    let mut hashes = Vec::new();
    for p in 0..PAGES {
        reader.read(p, &mut pg).unwrap();
        hashes.push((p, page_hash(&pg)));
    }
    assert_eq!(digest(hashes), pull.digest());
    assert_eq!(src.to_vec(), dst.to_vec());
    eprintln!(
        "writes {}, rounds {}, post-copy pages {}, {:?}",
        writes.load(SeqCst),
        pre.rounds(),
        popcount(&needed),
        pull.stats()
    );
}
