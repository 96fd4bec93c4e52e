//! The fault loop against real userfaultfd: every source, sharding, batching, async answers,
//! clean shutdown, and failures (a source that errs, one that never answers).

use std::sync::Arc;
use std::thread;
use std::time::Duration;

use memx::*;
use uffd::{error_chain, page_size};

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i / 7) as u8 ^ seed ^ ((i / page_size()) as u8).wrapping_mul(31) | 1)
        .collect()
}

fn start<S: PageSource + 'static>(m: &Mapping, src: S, cfg: Config) -> FaultLoop {
    FaultLoop::start(
        &[Region {
            range: m.range(),
            offset: 0,
        }],
        src,
        cfg,
    )
    .unwrap_or_else(|e| panic!("fault loop: {}", error_chain(&e)))
}

/// Touch pages in a scattered order from `threads` threads; check every byte we read.
fn touch_and_check(m: &Arc<Mapping>, expect: &Arc<Vec<u8>>, threads: usize) {
    let pages = m.len() / page_size();
    let hs: Vec<_> = (0..threads)
        .map(|t| {
            let (m, expect) = (m.clone(), expect.clone());
            thread::spawn(move || {
                for i in (t..pages).step_by(threads) {
                    let p = (i * 7919) % pages; // a permutation when pages is not a multiple of 7919
                    let off = p * page_size() + (i % page_size());
                    assert_eq!(m.read_u8(off), expect[off], "page {p}");
                }
            })
        })
        .collect();
    for h in hs {
        h.join().unwrap();
    }
}

#[test]
fn buffer_source_sharded_batched_many_threads() {
    let len = 512 * page_size();
    let data = Arc::new(pattern(len, 0x11));
    let m = Arc::new(Mapping::anonymous(len).unwrap());
    let fl = start(
        &m,
        BufferSource::new(data.to_vec()),
        Config {
            threads: 2,
            batch_pages: 8,
            ..Config::default()
        },
    );
    assert_eq!(fl.threads(), 2);
    touch_and_check(&m, &data, 6);
    let live = fl.stats();
    assert!(live.faults > 0 && live.faults <= 512);
    let st = fl.finish().unwrap();
    assert_eq!(st.pages, 512, "every page mapped exactly once: {st:?}");
    assert_eq!(st.bytes_copied, len as u64);
    assert!(
        st.faults >= 512 / 8,
        "batching maps up to 8 pages per fault"
    );
    assert_eq!(st.latency.count, st.faults);
    assert!(st.latency.p50_ns > 0 && st.latency.p99_ns >= st.latency.p50_ns);
    assert_eq!(st.errors, 0);
    // Populated before the uffds closed: the whole image is there.
    assert!(m.to_vec() == *data);
}

#[test]
fn zero_source_uses_zeropage() {
    let m = Arc::new(Mapping::anonymous(64 * page_size()).unwrap());
    let fl = start(
        &m,
        ZeroSource,
        Config {
            batch_pages: 4,
            ..Config::default()
        },
    );
    for p in 0..64 {
        assert_eq!(m.read_u8(p * page_size() + 3), 0);
    }
    let st = fl.stop().unwrap();
    assert_eq!(st.zero_pages, 64);
    assert_eq!(st.bytes_copied, 0);
    assert_eq!(st.faults, 16);
}

#[test]
fn file_source_with_holes_and_short_tail() {
    use std::io::{Seek, SeekFrom, Write};
    let p = page_size();
    let mut f = tempfile::tempfile().unwrap();
    let data = pattern(4 * p, 0x22);
    f.write_all(&data[..p]).unwrap(); // page 0
    f.seek(SeekFrom::Start(3 * p as u64)).unwrap(); // pages 1-2: a hole
    f.write_all(&data[3 * p..3 * p + 100]).unwrap(); // page 3: 100 bytes, then EOF
    let m = Arc::new(Mapping::anonymous(8 * p).unwrap());
    let fl = start(&m, FileSource::new(f).unwrap(), Config::default());
    let got = m.to_vec();
    assert_eq!(&got[..p], &data[..p]);
    assert!(got[p..3 * p].iter().all(|&b| b == 0));
    assert_eq!(&got[3 * p..3 * p + 100], &data[3 * p..3 * p + 100]);
    assert!(
        got[3 * p + 100..].iter().all(|&b| b == 0),
        "past EOF reads as zero"
    );
    let st = fl.stop().unwrap();
    assert_eq!(st.pages, 8);
    assert_eq!(st.zero_pages, 6, "holes and pages past EOF are zero pages");
}

#[test]
fn async_source_answers_later() {
    let len = 256 * page_size();
    let data = Arc::new(pattern(len, 0x33));
    let m = Arc::new(Mapping::anonymous(len).unwrap());
    let src = AsyncSource::new(BufferSource::new(data.to_vec()), 2, 4);
    let fl = start(
        &m,
        src,
        Config {
            threads: 2,
            batch_pages: 4,
            ..Config::default()
        },
    );
    touch_and_check(&m, &data, 4);
    let st = fl.finish().unwrap();
    assert!(st.async_requests > 0);
    assert_eq!(st.pages, 256, "{st:?}");
    assert!(m.to_vec() == *data);
}

#[test]
fn minor_faults_on_memfd_continue() {
    let len = 32 * page_size();
    let m = Arc::new(Mapping::memfd(c"minor", len).unwrap());
    let alias = m.alias().unwrap().unwrap();
    let data = Arc::new(pattern(len, 0x44));
    for (i, b) in data.iter().enumerate() {
        alias.write_u8(i, *b);
    }
    let fl = start(
        &m,
        PageCacheSource,
        Config {
            mode: Mode::Minor,
            batch_pages: 2,
            ..Config::default()
        },
    );
    touch_and_check(&m, &data, 2);
    let st = fl.stop().unwrap();
    assert_eq!(st.continued_pages, 32);
    // Two threads may fault on the two pages of one batch at once: 16..=32 fault events.
    assert!((16..=32).contains(&st.faults), "{st:?}");
}

/// A source that fails for one page.
struct Flaky(BufferSource, u64);

impl PageSource for Flaky {
    fn fetch<'a>(
        &'a self,
        req: &Request,
        scratch: &'a mut [u8],
        later: &Completer,
    ) -> Result<Fill<'a>, SourceError> {
        if req.offset == self.1 {
            return Err(SourceError::Io {
                offset: req.offset,
                len: page_size(),
                source: std::io::Error::from_raw_os_error(libc::EIO),
            });
        }
        self.0.fetch(req, scratch, later)
    }
}

fn child_reads(m: &Mapping, off: usize) -> i32 {
    // SAFETY: the child only reads memory and calls _exit.
    let pid = unsafe { libc::syscall(libc::SYS_fork) } as libc::pid_t;
    assert!(pid >= 0);
    if pid == 0 {
        // SAFETY: a read of the mapping and _exit.
        unsafe {
            std::ptr::read_volatile(m.as_ptr().add(off));
            libc::_exit(0);
        }
    }
    let mut status = 0;
    // SAFETY: waiting for our own child.
    assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
    status
}

#[test]
fn source_error_poisons_the_page_never_junk() {
    let p = page_size();
    let len = 16 * p;
    let data = pattern(len, 0x55);
    let m = Mapping::anonymous(len).unwrap();
    let fl = start(
        &m,
        Flaky(BufferSource::new(data.clone()), 5 * p as u64),
        Config::default(),
    );
    let st = fl.finish().unwrap();
    assert_eq!(st.errors, 1);
    let msg = st.last_error.unwrap();
    assert!(msg.contains("0x5000") || msg.contains("offset"), "{msg}");
    assert!(msg.contains("Input/output error"), "errno kept: {msg}");
    assert_eq!(st.pages, 15);
    // Every other page is right; the failed one raises SIGBUS instead of reading junk.
    assert_eq!(m.read_u8(4 * p + 9), data[4 * p + 9]);
    assert_eq!(m.read_u8(6 * p), data[6 * p]);
    let status = child_reads(&m, 5 * p);
    assert!(
        libc::WIFSIGNALED(status) && libc::WTERMSIG(status) == libc::SIGBUS,
        "status {status:#x}"
    );
}

/// A source that never answers.
struct Silent;

impl PageSource for Silent {
    fn fetch<'a>(
        &'a self,
        _: &Request,
        _: &'a mut [u8],
        _: &Completer,
    ) -> Result<Fill<'a>, SourceError> {
        Ok(Fill::Pending)
    }
}

#[test]
fn source_that_never_answers_times_out_and_poisons() {
    let m = Mapping::anonymous(4 * page_size()).unwrap();
    let fl = start(
        &m,
        Silent,
        Config {
            drain_timeout: Duration::from_millis(200),
            ..Config::default()
        },
    );
    let t = std::time::Instant::now();
    let err = fl.finish().unwrap_err();
    assert!(t.elapsed() < Duration::from_secs(5));
    assert!(
        matches!(err, LoopError::DrainTimeout { pages: 4, .. }),
        "{err}"
    );
    assert!(libc::WIFSIGNALED(child_reads(&m, 0)));
}

#[test]
fn bad_configuration_and_regions() {
    let m = Mapping::anonymous(4 * page_size()).unwrap();
    let r = [Region {
        range: m.range(),
        offset: 0,
    }];
    let e = FaultLoop::start(
        &r,
        ZeroSource,
        Config {
            threads: 0,
            ..Config::default()
        },
    )
    .err()
    .unwrap();
    assert!(matches!(e, LoopError::Config(_)));
    let e = FaultLoop::start(&[], ZeroSource, Config::default())
        .err()
        .unwrap();
    assert!(matches!(e, LoopError::Config(_)));
    // A range nobody mapped: below mmap_min_addr, so no other test's mapping can land there
    // (an unmapped hole elsewhere is refilled by parallel tests' mappings).
    let range = uffd::Range::new(page_size(), 2 * page_size()).unwrap();
    let e = FaultLoop::start(
        &[Region { range, offset: 0 }],
        ZeroSource,
        Config::default(),
    )
    .err()
    .unwrap();
    assert!(matches!(e, LoopError::Register { .. }), "{e}");
    assert!(
        error_chain(&e).contains("not mapped"),
        "{}",
        error_chain(&e)
    );
    // Two loops over the same memory: the second is refused, the first keeps serving.
    let fl = FaultLoop::start(&r, ZeroSource, Config::default()).unwrap();
    let e = FaultLoop::start(&r, ZeroSource, Config::default())
        .err()
        .unwrap();
    assert!(
        error_chain(&e).contains("another userfaultfd"),
        "{}",
        error_chain(&e)
    );
    assert_eq!(m.read_u8(0), 0);
    assert_eq!(fl.stop().unwrap().faults, 1);
}
