//! `faultline bench uffd`: fault service cost of our fault loop against a minimal loop over raw
//! ioctls (the floor), same cases, same thread placement, same run.
//!
//! Each of `threads` faulting threads touches its own slice of the region once per fault unit
//! (1 page, or 16 pages for `copy-64k`), timing each touch; the time of a touch is the whole
//! fault as the faulting thread sees it (trap, wakeup of the handler, resolve, wakeup back).
//! Faulting thread `t` and the handler serving it are pinned to CPU `t % ncpus`: on a nested VM
//! a cross-CPU wakeup costs ~26 µs and would swamp what is measured.

use std::sync::{Arc, Barrier};
use std::thread;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use memx::{
    Completer, Config, FaultLoop, Fill, Mapping, Mode, PageCacheSource, PageSource, Region,
    Request, SourceError, ZeroSource, pin_to,
};
use serde::Serialize;
use uffd::{Features, RegisterMode, Uffd, UffdBuilder, error_chain, page_size, sys};

use crate::BenchError;

/// A benchmark case.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Case {
    /// MISSING fault resolved with a 4 KiB COPY.
    Copy4k,
    /// MISSING fault resolved with a 64 KiB COPY (the next 15 pages come with it).
    Copy64k,
    /// MISSING fault resolved with ZEROPAGE.
    ZeroPage,
    /// MINOR fault on a memfd resolved with CONTINUE.
    Continue,
}

impl Case {
    /// Every case.
    pub const ALL: [Case; 4] = [Case::Copy4k, Case::Copy64k, Case::ZeroPage, Case::Continue];

    /// The name used in the JSON lines.
    pub fn name(self) -> &'static str {
        match self {
            Case::Copy4k => "copy-4k",
            Case::Copy64k => "copy-64k",
            Case::ZeroPage => "zeropage",
            Case::Continue => "continue",
        }
    }

    fn pages_per_fault(self) -> usize {
        match self {
            Case::Copy64k => 16,
            _ => 1,
        }
    }
}

/// Which fault handler serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Impl {
    /// A minimal blocking `read` + resolve-ioctl loop over raw syscalls: the floor.
    Raw,
    /// `memx::FaultLoop`.
    Faultline,
}

impl Impl {
    fn name(self) -> &'static str {
        match self {
            Impl::Raw => "raw",
            Impl::Faultline => "faultline",
        }
    }
}

/// One result line.
#[derive(Debug, Clone, Serialize)]
pub struct Line {
    /// Always `"uffd"`.
    pub bench: &'static str,
    /// Case name.
    pub case: &'static str,
    /// `raw` or `faultline`.
    #[serde(rename = "impl")]
    pub imp: &'static str,
    /// Faulting threads.
    pub threads: usize,
    /// Pages faulted in.
    pub pages: usize,
    /// Median fault time seen by the faulting thread.
    pub median_ns: u64,
    /// 99th percentile.
    pub p99_ns: u64,
    /// Pages mapped per second over the whole run.
    pub pages_per_s: u64,
}

/// Parameters.
#[derive(Debug, Clone)]
pub struct Params {
    /// Faults per faulting thread per run.
    pub faults_per_thread: usize,
    /// Runs per cell; the line reports the run with the median `median_ns`.
    pub runs: usize,
    /// Thread counts.
    pub threads: Vec<usize>,
    /// Cases.
    pub cases: Vec<Case>,
}

impl Default for Params {
    fn default() -> Self {
        Self {
            faults_per_thread: 4096,
            runs: 3,
            threads: vec![1, 2],
            cases: Case::ALL.to_vec(),
        }
    }
}

fn ncpus() -> usize {
    thread::available_parallelism().map_or(1, |n| n.get())
}

/// Serves the same bytes for every request: the loop's cost, not a source's.
struct Pattern(Vec<u8>);

impl PageSource for Pattern {
    fn fetch<'a>(
        &'a self,
        req: &Request,
        _: &'a mut [u8],
        _: &Completer,
    ) -> Result<Fill<'a>, SourceError> {
        Ok(Fill::Bytes(&self.0[..req.max_pages * page_size()]))
    }
}

struct Memory {
    map: Mapping,
    // Keeps the page cache of a memfd region populated through a second mapping.
    _alias: Option<Mapping>,
}

fn memory(case: Case, len: usize) -> Result<Memory, BenchError> {
    if case != Case::Continue {
        return Ok(Memory {
            map: Mapping::anonymous(len).map_err(BenchError::Map)?,
            _alias: None,
        });
    }
    let map = Mapping::memfd(c"bench-minor", len).map_err(BenchError::Map)?;
    let alias = map
        .alias()
        .expect("memfd mappings have an alias")
        .map_err(BenchError::Map)?;
    for p in 0..len / page_size() {
        alias.write_u8(p * page_size(), 1);
    }
    Ok(Memory {
        map,
        _alias: Some(alias),
    })
}

/// Touch one byte per fault unit of `slice` (from `start`), timing each touch.
fn fault_in(start: usize, faults: usize, stride: usize) -> Vec<u64> {
    let mut t = Vec::with_capacity(faults);
    for i in 0..faults {
        let p = (start + i * stride) as *const u8;
        let t0 = Instant::now();
        // SAFETY: `p` lies in the benchmark's mapping, which outlives this call.
        unsafe { std::ptr::read_volatile(p) };
        t.push(t0.elapsed().as_nanos() as u64);
    }
    t
}

/// The floor: one blocking `read` of one event, one resolve ioctl, repeat `faults` times.
fn raw_handler(uffd: &Uffd, case: Case, faults: usize, buf: &[u8]) -> Result<(), String> {
    use std::os::fd::AsRawFd;
    let fd = uffd.as_raw_fd();
    let len = (case.pages_per_fault() * page_size()) as u64;
    for _ in 0..faults {
        // SAFETY: uffd_msg is plain data; zeroed is valid.
        let mut msg: sys::uffd_msg = unsafe { std::mem::zeroed() };
        // SAFETY: reading one message into a buffer of exactly its size.
        let n = unsafe {
            libc::read(
                fd,
                (&mut msg as *mut sys::uffd_msg).cast(),
                std::mem::size_of::<sys::uffd_msg>(),
            )
        };
        if n != std::mem::size_of::<sys::uffd_msg>() as isize {
            return Err(format!("read: {}", std::io::Error::last_os_error()));
        }
        // SAFETY: the only events asked for are page faults.
        let addr = unsafe { msg.arg.pagefault.address } & !(page_size() as u64 - 1);
        // SAFETY: each ioctl below gets a valid pointer to its own argument struct (all arms).
        let r = unsafe {
            match case {
                Case::Copy4k | Case::Copy64k => {
                    let mut a = sys::uffdio_copy {
                        dst: addr,
                        src: buf.as_ptr() as u64,
                        len,
                        mode: 0,
                        copy: 0,
                    };
                    libc::ioctl(fd, sys::UFFDIO_COPY as libc::Ioctl, &mut a)
                }
                Case::ZeroPage => {
                    let mut a = sys::uffdio_zeropage {
                        range: sys::uffdio_range { start: addr, len },
                        mode: 0,
                        zeropage: 0,
                    };
                    libc::ioctl(fd, sys::UFFDIO_ZEROPAGE as libc::Ioctl, &mut a)
                }
                Case::Continue => {
                    let mut a = sys::uffdio_continue {
                        range: sys::uffdio_range { start: addr, len },
                        mode: 0,
                        mapped: 0,
                    };
                    libc::ioctl(fd, sys::UFFDIO_CONTINUE as libc::Ioctl, &mut a)
                }
            }
        };
        if r != 0 {
            return Err(format!("resolve: {}", std::io::Error::last_os_error()));
        }
    }
    Ok(())
}

struct RunResult {
    lat: Vec<u64>,
    wall: Duration,
}

fn run_once(case: Case, imp: Impl, threads: usize, faults: usize) -> Result<RunResult, BenchError> {
    let ppf = case.pages_per_fault();
    let slice = faults * ppf * page_size();
    let mem = memory(case, slice * threads)?;
    let base = mem.map.as_ptr() as usize;
    let cpus = ncpus();
    let buf = vec![0x5a_u8; ppf * page_size()];
    let uffd_err = |e: &dyn std::error::Error| BenchError::Uffd(error_chain(e));

    // Handlers first (registered and waiting), then the faulting threads.
    let mut raw = Vec::new();
    let mut fl = None;
    match imp {
        Impl::Raw => {
            for t in 0..threads {
                let mut b = UffdBuilder::new().non_blocking(false);
                if case == Case::Continue {
                    b = b.require_features(Features::MINOR_SHMEM);
                }
                let uffd = b.create().map_err(|e| uffd_err(&e))?;
                let range = mem.map.range().split(threads)[t];
                let mode = if case == Case::Continue {
                    RegisterMode::MINOR
                } else {
                    RegisterMode::MISSING
                };
                uffd.register(range, mode).map_err(|e| uffd_err(&e))?;
                let buf = buf.clone();
                raw.push(thread::spawn(move || {
                    let _ = pin_to(t % cpus);
                    raw_handler(&uffd, case, faults, &buf)
                }));
            }
        }
        Impl::Faultline => {
            let cfg = Config {
                threads,
                batch_pages: ppf,
                mode: if case == Case::Continue {
                    Mode::Minor
                } else {
                    Mode::Missing
                },
                cpus: (0..threads).map(|t| t % cpus).collect(),
                ..Config::default()
            };
            let region = [Region {
                range: mem.map.range(),
                offset: 0,
            }];
            let started = match case {
                Case::Copy4k | Case::Copy64k => FaultLoop::start(&region, Pattern(buf), cfg),
                Case::ZeroPage => FaultLoop::start(&region, ZeroSource, cfg),
                Case::Continue => FaultLoop::start(&region, PageCacheSource, cfg),
            };
            fl = Some(started.map_err(BenchError::Loop)?);
        }
    }

    let barrier = Arc::new(Barrier::new(threads + 1));
    let workers: Vec<_> = (0..threads)
        .map(|t| {
            let barrier = barrier.clone();
            thread::spawn(move || {
                let _ = pin_to(t % cpus);
                barrier.wait();
                fault_in(base + t * slice, faults, ppf * page_size())
            })
        })
        .collect();
    barrier.wait();
    let t0 = Instant::now();
    let mut lat = Vec::with_capacity(faults * threads);
    for w in workers {
        lat.extend(
            w.join()
                .map_err(|_| BenchError::Run("faulting thread panicked".into()))?,
        );
    }
    let wall = t0.elapsed();
    for h in raw {
        h.join()
            .map_err(|_| BenchError::Run("raw handler panicked".into()))?
            .map_err(BenchError::Run)?;
    }
    if let Some(fl) = fl {
        let st = fl.stop().map_err(BenchError::Loop)?;
        if st.faults as usize != faults * threads {
            return Err(BenchError::Run(format!(
                "expected {} faults, the loop saw {}",
                faults * threads,
                st.faults
            )));
        }
    }
    // Check the data arrived (a benchmark that maps the wrong thing measures nothing).
    let want = match case {
        Case::Copy4k | Case::Copy64k => 0x5a,
        Case::ZeroPage => 0,
        Case::Continue => 1,
    };
    for p in (0..slice * threads).step_by(page_size() * 61) {
        if mem.map.read_u8(p) != want {
            return Err(BenchError::Run(format!("wrong data at offset {p:#x}")));
        }
    }
    Ok(RunResult { lat, wall })
}

/// Run one cell (`runs` times) and summarise the run with the median median.
pub fn cell(case: Case, imp: Impl, threads: usize, p: &Params) -> Result<Line, BenchError> {
    // One short warm-up run: page tables, allocator, CPU frequency.
    run_once(case, imp, threads, p.faults_per_thread.min(256))?;
    let mut lines = Vec::new();
    for _ in 0..p.runs.max(1) {
        let r = run_once(case, imp, threads, p.faults_per_thread)?;
        let mut h = Histogram::<u64>::new_with_bounds(1, 100_000_000_000, 3)
            .map_err(|e| BenchError::Run(e.to_string()))?;
        for v in &r.lat {
            h.saturating_record((*v).max(1));
        }
        let pages = r.lat.len() * case.pages_per_fault();
        lines.push(Line {
            bench: "uffd",
            case: case.name(),
            imp: imp.name(),
            threads,
            pages,
            median_ns: h.value_at_quantile(0.5),
            p99_ns: h.value_at_quantile(0.99),
            pages_per_s: (pages as f64 / r.wall.as_secs_f64()) as u64,
        });
    }
    lines.sort_by_key(|l| l.median_ns);
    Ok(lines.swap_remove(lines.len() / 2))
}

/// Run every cell, raw and ours back to back, calling `out` with each line.
pub fn run(p: &Params, mut out: impl FnMut(&Line)) -> Result<(), BenchError> {
    for &case in &p.cases {
        for &threads in &p.threads {
            for imp in [Impl::Raw, Impl::Faultline] {
                out(&cell(case, imp, threads, p)?);
            }
        }
    }
    Ok(())
}
