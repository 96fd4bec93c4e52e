//! `faultline demo`: a memory image in a file, served lazily into anonymous memory by the
//! fault loop while several threads read it at random, then the rest pushed in the
//! background, and every byte checked against the file.

use std::io::Write;
use std::sync::Arc;
use std::thread;
use std::time::Instant;

use memx::{Config, FaultLoop, FileSource, Mapping, Region};
use uffd::page_size;

use crate::error::{CliError, CliResult, failed};

/// `faultline demo` options.
#[derive(clap::Args)]
pub struct Args {
    /// Memory size in MiB.
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u64).range(1..=65536))]
    mem_mib: u64,
    /// Fault-loop worker threads.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u64).range(1..=64))]
    handlers: u64,
    /// Threads touching the memory.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u64).range(1..=64))]
    touchers: u64,
    /// Pages resolved per fault when the file has them.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u64).range(1..=512))]
    batch: u64,
    /// Print the final statistics as one JSON object.
    #[arg(long)]
    json: bool,
}

/// Cheap deterministic content: non-zero, different in every page, with holes every 8th page.
fn fill(buf: &mut [u8], first_page: usize) {
    let p = page_size();
    for (i, chunk) in buf.chunks_mut(p).enumerate() {
        let page = first_page + i;
        if page % 8 == 7 {
            chunk.fill(0);
            continue;
        }
        for (j, w) in chunk.chunks_mut(8).enumerate() {
            let v = (page as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ j as u64 | 1;
            w.copy_from_slice(&v.to_le_bytes()[..w.len()]);
        }
    }
}

pub fn run(a: &Args) -> CliResult {
    let len = a.mem_mib as usize * 1024 * 1024;
    let pages = len / page_size();
    // 1. The image: a sparse temporary file.
    let mut file = tempfile_in_tmp()?;
    let mut chunk = vec![0u8; 256 * page_size()];
    for first in (0..pages).step_by(256) {
        let n = (pages - first).min(256);
        fill(&mut chunk[..n * page_size()], first);
        file.write_all(&chunk[..n * page_size()])
            .map_err(failed("writing the image"))?;
    }
    let image = file.try_clone().map_err(failed("reopening the image"))?;

    // 2. Empty memory, served from the file on demand.
    let mem = Arc::new(Mapping::anonymous(len).map_err(failed("mapping memory"))?);
    let t0 = Instant::now();
    let fl = FaultLoop::start(
        &[Region {
            range: mem.range(),
            offset: 0,
        }],
        FileSource::new(image).map_err(failed("opening the image"))?,
        Config {
            threads: a.handlers as usize,
            batch_pages: a.batch as usize,
            ..Config::default()
        },
    )
    .map_err(failed("starting the fault loop"))?;
    let setup = t0.elapsed();

    // 3. Threads read random pages and check each against the generator.
    let touched_each = pages / 4 / a.touchers as usize;
    let t1 = Instant::now();
    let hs: Vec<_> = (0..a.touchers as usize)
        .map(|t| {
            let mem = mem.clone();
            thread::spawn(move || -> CliResult {
                let mut x = 0x2545_f491_4f6c_dd1d_u64 ^ t as u64;
                let mut want = vec![0u8; page_size()];
                for _ in 0..touched_each {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    let page = (x % pages as u64) as usize;
                    fill(&mut want, page);
                    let off = page * page_size() + (x as usize >> 40) % page_size();
                    if mem.read_u8(off) != want[off % page_size()] {
                        return Err(CliError::Check(format!(
                            "page {page}: wrong byte at offset {off:#x}"
                        )));
                    }
                }
                Ok(())
            })
        })
        .collect();
    for h in hs {
        h.join()
            .map_err(|_| CliError::Check("a toucher thread panicked".into()))??;
    }
    let on_demand = t1.elapsed();
    let during = fl.stats();

    // 4. Push the rest, then check every byte.
    let t2 = Instant::now();
    let st = fl.finish().map_err(failed("finishing the fault loop"))?;
    let push = t2.elapsed();
    let mut want = vec![0u8; page_size()];
    for page in 0..pages {
        fill(&mut want, page);
        // SAFETY: the page lies inside `mem`, fully populated by `finish`.
        let got = unsafe {
            std::slice::from_raw_parts(mem.as_ptr().add(page * page_size()), page_size())
        };
        if got != want.as_slice() {
            return Err(CliError::Check(format!(
                "verification failed at page {page}"
            )));
        }
    }
    if a.json {
        let v = serde_json::json!({
            "mem_mib": a.mem_mib,
            "verified": true,
            "setup_us": setup.as_micros() as u64,
            "on_demand_ms": on_demand.as_millis() as u64,
            "push_ms": push.as_millis() as u64,
            "faults_on_demand": during.faults,
            "stats": st,
        });
        println!("{v}");
    } else {
        println!(
            "faultline demo: {} MiB served lazily from a file by {} fault-loop thread(s)",
            a.mem_mib, a.handlers
        );
        println!(
            "  on demand: {} threads read {} random pages in {:.1} ms: {} faults, fault service p50 {:.1} us, p99 {:.1} us",
            a.touchers,
            touched_each * a.touchers as usize,
            on_demand.as_secs_f64() * 1e3,
            during.faults,
            during.latency.p50_ns as f64 / 1e3,
            during.latency.p99_ns as f64 / 1e3
        );
        println!(
            "  background push: {} pages in {:.1} ms; total {} pages ({} copied, {} zero)",
            st.populated_pages,
            push.as_secs_f64() * 1e3,
            st.pages,
            st.bytes_copied / page_size() as u64,
            st.zero_pages
        );
        println!("  verified: all {pages} pages match the image");
    }
    Ok(())
}

fn tempfile_in_tmp() -> CliResult<std::fs::File> {
    let dir = std::env::temp_dir();
    let path = dir.join(format!("faultline-demo-{}.img", std::process::id()));
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&path)
        .map_err(failed(format!("creating {}", path.display())))?;
    // Unlinked at once: the open fd keeps it alive and nothing is left behind.
    let _ = std::fs::remove_file(&path);
    Ok(f)
}
