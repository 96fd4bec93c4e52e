//! The installer against real userfaultfd: a source that answers `Pending` and whose requests
//! are answered by another thread through the installer; background installs racing faults on
//! the same pages; duplicates and late answers; stop and finish with installs in flight; the
//! latency histogram and blocktime.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Mutex, mpsc};
use std::thread;
use std::time::{Duration, Instant};

use memx::*;
use uffd::{error_chain, page_size};

fn pattern(len: usize) -> Arc<Vec<u8>> {
    Arc::new(
        (0..len)
            .map(|i| ((i / page_size()) as u8).wrapping_mul(37) ^ (i as u8) | 1)
            .collect(),
    )
}

/// Answers every request later: sends its offset to whoever installs the page.
struct Asker {
    tx: Mutex<mpsc::Sender<u64>>,
    asked: AtomicUsize,
}

impl PageSource for Asker {
    fn fetch<'a>(
        &'a self,
        req: &Request,
        _: &'a mut [u8],
        _: &Completer,
    ) -> Result<Fill<'a>, SourceError> {
        self.asked.fetch_add(1, SeqCst);
        self.tx
            .lock()
            .unwrap()
            .send(req.offset)
            .map_err(|_| SourceError::Gone("answerer gone".into()))?;
        Ok(Fill::Pending)
    }
}

fn asker() -> (Arc<Asker>, mpsc::Receiver<u64>) {
    let (tx, rx) = mpsc::channel();
    (
        Arc::new(Asker {
            tx: Mutex::new(tx),
            asked: AtomicUsize::new(0),
        }),
        rx,
    )
}

fn start(m: &Mapping, src: Arc<Asker>, threads: usize) -> FaultLoop {
    FaultLoop::start(
        &[Region {
            range: m.range(),
            offset: 0,
        }],
        src,
        Config {
            threads,
            ..Config::default()
        },
    )
    .unwrap_or_else(|e| panic!("fault loop: {}", error_chain(&e)))
}

/// Install the asked pages from `expect`, on a thread of its own.
fn answerer(
    inst: Installer,
    rx: mpsc::Receiver<u64>,
    expect: Arc<Vec<u8>>,
) -> thread::JoinHandle<()> {
    thread::spawn(move || {
        for off in rx {
            let o = off as usize;
            match inst.install(off, &expect[o..o + page_size()]) {
                Ok(_) => {}
                Err(InstallError::Stopped) => return,
                Err(e) => panic!("install at {off:#x}: {}", error_chain(&e)),
            }
        }
    })
}

/// Read every page from `threads` threads in scattered order, checking each; returns their
/// thread ids.
fn touch(m: &Arc<Mapping>, expect: &Arc<Vec<u8>>, threads: usize) -> Vec<u32> {
    let pages = m.len() / page_size();
    let hs: Vec<_> = (0..threads)
        .map(|t| {
            let (m, expect) = (m.clone(), expect.clone());
            thread::spawn(move || {
                for i in (t..pages).step_by(threads) {
                    let p = (i * 7919) % pages;
                    let off = p * page_size() + (i * 13) % page_size();
                    assert_eq!(m.read_u8(off), expect[off], "page {p}");
                }
                // SAFETY: gettid has no preconditions.
                unsafe { libc::gettid() as u32 }
            })
        })
        .collect();
    hs.into_iter().map(|h| h.join().unwrap()).collect()
}

#[test]
fn pending_requests_answered_through_the_installer() {
    let len = 8 << 20;
    let m = Arc::new(Mapping::anonymous(len).unwrap());
    let expect = pattern(len);
    let (src, rx) = asker();
    let fl = start(&m, src.clone(), 2);
    let ans = answerer(fl.installer(), rx, expect.clone());
    let tids = touch(&m, &expect, 4);
    // A stale fault event (a thread that faulted while its page was being installed) may
    // still be parked and answered: wait for it, but nothing may stay.
    let t = Instant::now();
    while !fl.installer().pending().is_empty() && t.elapsed() < Duration::from_secs(5) {
        thread::sleep(Duration::from_millis(1));
    }
    let left = fl.installer().pending();
    assert!(
        left.is_empty(),
        "leaked pending entries {left:x?}: {:?}",
        fl.stats()
    );
    let stats = fl.stop().unwrap_or_else(|e| panic!("{}", error_chain(&e)));
    let asked = src.asked.load(SeqCst) as u64;
    drop(src);
    ans.join().unwrap();
    let pages = (len / page_size()) as u64;
    assert_eq!(stats.errors, 0, "{:?}", stats.last_error);
    assert_eq!(stats.pages_installed, pages, "each page installed once");
    assert_eq!(stats.bytes_installed, pages * page_size() as u64);
    assert_eq!(stats.pages, 0, "the worker itself mapped nothing");
    assert!(stats.faults >= asked);
    assert_eq!(
        stats.faults_settled_by_install, asked,
        "every parked fault settled once"
    );
    // Latency: every settled fault measured, in the histogram and the log2 buckets, sane.
    assert_eq!(stats.latency.count, stats.faults_settled_by_install);
    assert_eq!(stats.latency_log2_us.len(), LOG2_BUCKETS);
    assert_eq!(
        stats.latency_log2_us.iter().sum::<u64>(),
        stats.latency.count
    );
    assert!(stats.latency.p50_ns > 0 && stats.latency.max_ns < 10_000_000_000);
    assert!(stats.blocktime_total_ns > 0);
    if fl_thread_ids() {
        let known: u64 = tids.iter().filter_map(|t| stats.blocktime_ns.get(t)).sum();
        assert!(known > 0, "blocktime per toucher: {:?}", stats.blocktime_ns);
        assert_eq!(
            stats.blocktime_ns.values().sum::<u64>(),
            stats.blocktime_total_ns
        );
    } else {
        eprintln!("kernel without UFFD_FEATURE_THREAD_ID: blocktime only in total");
    }
}

/// Whether this kernel reports faulting thread ids (probed the way the loop does).
fn fl_thread_ids() -> bool {
    let m = Mapping::anonymous(page_size()).unwrap();
    let fl = FaultLoop::start(
        &[Region {
            range: m.range(),
            offset: 0,
        }],
        ZeroSource,
        Config::default(),
    )
    .unwrap();
    fl.thread_ids()
}

#[test]
fn background_installs_race_faults_on_the_same_pages() {
    let len = 16 << 20;
    let pages = len / page_size();
    let m = Arc::new(Mapping::anonymous(len).unwrap());
    let expect = pattern(len);
    let (src, rx) = asker();
    let fl = start(&m, src.clone(), 2);
    let ans = answerer(fl.installer(), rx, expect.clone());
    // A background push over every page, in runs of 16, from the middle, wrapping: it meets
    // the touchers on the same pages.
    let inst = fl.installer();
    let e2 = expect.clone();
    let bg = thread::spawn(move || {
        let mut dups = 0;
        for k in 0..pages / 16 {
            let p = ((pages / 2 + k * 16) % pages) * page_size();
            let r = inst
                .install(p as u64, &e2[p..p + 16 * page_size()])
                .unwrap();
            dups += r.duplicates;
        }
        dups
    });
    touch(&m, &expect, 3);
    let bg_dups = bg.join().unwrap();
    let stats = fl.stop().unwrap_or_else(|e| panic!("{}", error_chain(&e)));
    drop(src);
    ans.join().unwrap();
    assert_eq!(stats.errors, 0, "{:?}", stats.last_error);
    // Every page mapped exactly once, by whoever came first; the rest are duplicates.
    assert_eq!(stats.pages_installed, pages as u64);
    assert!(stats.install_duplicates >= bg_dups as u64);
    assert_eq!(stats.late_answers, 0);
    // All bytes right after the race, read again.
    assert_eq!(m.to_vec(), *expect);
}

/// A source that parks everything and hands the completer out, to answer late.
struct Late {
    tx: Mutex<mpsc::Sender<(u64, Completer)>>,
}

impl PageSource for Late {
    fn fetch<'a>(
        &'a self,
        req: &Request,
        _: &'a mut [u8],
        later: &Completer,
    ) -> Result<Fill<'a>, SourceError> {
        let _ = self.tx.lock().unwrap().send((req.offset, later.clone()));
        Ok(Fill::Pending)
    }
}

#[test]
fn duplicates_late_answers_and_bad_installs() {
    let pg = page_size();
    let m = Arc::new(Mapping::anonymous(16 * pg).unwrap());
    let (tx, rx) = mpsc::channel();
    let fl = FaultLoop::start(
        &[Region {
            range: m.range(),
            offset: 0x10_0000,
        }],
        Late { tx: Mutex::new(tx) },
        Config::default(),
    )
    .unwrap();
    let inst = fl.installer();
    let data = vec![7u8; 2 * pg];
    let r = inst.install(0x10_0000, &data).unwrap();
    assert_eq!((r.pages, r.duplicates), (2, 0));
    // The same pages again: duplicates, not errors; zero over a present page likewise.
    let r = inst.install(0x10_0000, &data).unwrap();
    assert_eq!((r.pages, r.duplicates), (0, 2));
    let r = inst.install_zero(0x10_0000 + pg as u64, 2).unwrap();
    assert_eq!((r.pages, r.duplicates), (1, 1));
    assert_eq!(m.read_u8(pg), 7);
    assert_eq!(m.read_u8(2 * pg), 0);
    assert!(matches!(
        inst.install(0x10_0000, &[1u8; 100]),
        Err(InstallError::NotWholePages { len: 100 })
    ));
    assert!(matches!(
        inst.install(0, &data),
        Err(InstallError::OutOfRange { .. })
    ));
    // Nothing of a run that overflows the region is installed.
    assert!(matches!(
        inst.install_zero(0x10_0000 + 15 * pg as u64, 2),
        Err(InstallError::OutOfRange { .. })
    ));
    // A fault parked Pending, settled by an install, then answered late through the
    // Completer: harmless, counted.
    let m2 = m.clone();
    let reader = thread::spawn(move || m2.read_u8(5 * pg + 1));
    let (off, completer) = rx.recv_timeout(Duration::from_secs(5)).unwrap();
    assert_eq!(off, 0x10_0000 + 5 * pg as u64);
    // The source was asked just before the worker parks the fault.
    let t = Instant::now();
    while inst.pending().is_empty() && t.elapsed() < Duration::from_secs(5) {
        thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(inst.pending(), vec![off]);
    let r = inst.install(off, &vec![9u8; pg]).unwrap();
    assert_eq!((r.pages, r.settled), (1, 1));
    assert_eq!(reader.join().unwrap(), 9);
    completer.complete(Completion::Bytes {
        offset: off,
        data: vec![1u8; pg],
    });
    let t = Instant::now();
    while fl.stats().late_answers == 0 && t.elapsed() < Duration::from_secs(5) {
        thread::sleep(Duration::from_millis(1));
    }
    assert!(inst.pending().is_empty());
    let stats = fl.stop().unwrap();
    assert_eq!(stats.late_answers, 1);
    assert_eq!(stats.errors, 0, "{:?}", stats.last_error);
    assert_eq!(stats.faults_settled_by_install, 1);
    assert_eq!(stats.install_duplicates, 3);
    assert_eq!(stats.zero_pages_installed, 1);
    assert_eq!(m.read_u8(5 * pg), 9, "the late answer did not overwrite");
    // After the loop stopped, installs fail cleanly.
    assert!(matches!(
        inst.install_zero(0x10_0000 + 10 * pg as u64, 1),
        Err(InstallError::Stopped)
    ));
}

#[test]
fn stop_with_installs_in_flight() {
    let len = 32 << 20;
    let pages = len / page_size();
    let m = Arc::new(Mapping::anonymous(len).unwrap());
    let expect = pattern(len);
    let (src, rx) = asker();
    let fl = start(&m, src, 2);
    let ans = answerer(fl.installer(), rx, expect.clone());
    let inst = fl.installer();
    let go = Arc::new(AtomicBool::new(true));
    let (e2, g2) = (expect.clone(), go.clone());
    let bg = thread::spawn(move || {
        let mut done = 0;
        for p in 0..pages {
            let o = p * page_size();
            match inst.install(o as u64, &e2[o..o + page_size()]) {
                Ok(_) => done += 1,
                Err(InstallError::Stopped) => break,
                Err(e) => panic!("{}", error_chain(&e)),
            }
            if !g2.load(SeqCst) && p % 64 == 0 {
                thread::yield_now();
            }
        }
        done
    });
    // A few faults while the push runs, then stop in the middle of it.
    for p in (0..pages).step_by(pages / 16) {
        let off = p * page_size() + 3;
        assert_eq!(m.read_u8(off), expect[off]);
    }
    go.store(false, SeqCst);
    let stats = fl.stop().unwrap_or_else(|e| panic!("{}", error_chain(&e)));
    let done = bg.join().unwrap();
    ans.join().unwrap();
    assert_eq!(stats.errors, 0, "{:?}", stats.last_error);
    assert!(done > 0);
    // After stop the memory is ordinary memory: pages installed hold their data; the rest,
    // never installed, read as zero.
    let p = 7 * page_size();
    assert!(m.read_u8(p) == expect[p] || m.read_u8(p) == 0);
}

#[test]
fn finish_populates_through_requests_answered_by_the_installer() {
    let len = 4 << 20;
    let m = Arc::new(Mapping::anonymous(len).unwrap());
    let expect = pattern(len);
    let (src, rx) = asker();
    let fl = start(&m, src, 2);
    let ans = answerer(fl.installer(), rx, expect.clone());
    // Touch a few, push a few, then finish: every other page is asked for and installed.
    let inst = fl.installer();
    inst.install(0, &expect[..64 * page_size()]).unwrap();
    for p in [100usize, 200, 300] {
        assert_eq!(m.read_u8(p * page_size()), expect[p * page_size()]);
    }
    let stats = fl
        .finish()
        .unwrap_or_else(|e| panic!("{}", error_chain(&e)));
    ans.join().unwrap();
    assert_eq!(stats.errors, 0, "{:?}", stats.last_error);
    assert_eq!(stats.pages_installed, (len / page_size()) as u64);
    assert_eq!(m.to_vec(), *expect);
}
