//! The fuzzing, run by `cargo test`: the committed seeds are traffic the parsers accept, the
//! runner reports a crash with its input, and every target runs for a bounded time
//! (`FUZZ_SECONDS`, default 15) without one.

use std::sync::OnceLock;

use fuzz::run;

/// Build the targets once for this binary's tests.
fn bins() -> &'static std::path::Path {
    static BINS: OnceLock<Result<std::path::PathBuf, String>> = OnceLock::new();
    match BINS.get_or_init(|| run::build().map_err(|e| format!("{e}"))) {
        Ok(p) => p,
        Err(e) => panic!("building the fuzz targets: {e}"),
    }
}

#[test]
fn every_committed_seed_parses_in_its_target() {
    for t in fuzz::TARGETS {
        let dir = run::seeds_dir(t.name);
        let mut n = 0;
        for e in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
            let p = e.unwrap().path();
            let b = std::fs::read(&p).unwrap();
            assert!(
                (t.body)(&b),
                "{}: seed {} does not parse",
                t.name,
                p.display()
            );
            n += 1;
        }
        assert!(n > 0, "{}: no seeds in {}", t.name, dir.display());
    }
}

#[test]
fn the_runner_reports_a_crash_and_its_input() {
    let seeds = tempfile::tempdir().unwrap();
    std::fs::write(seeds.path().join("seed"), b"a FUZZ b").unwrap();
    let o = run::run_target(bins(), "canary", 5, seeds.path()).unwrap();
    assert_eq!(o.crashes.len(), 1, "{o}");
    let input = std::fs::read(&o.crashes[0]).unwrap();
    assert!(input.windows(4).any(|w| w == b"FUZZ"), "{o}");
}

#[test]
fn every_target_runs_without_crashing() {
    let seconds = std::env::var("FUZZ_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(15);
    let jobs = std::thread::available_parallelism().map_or(1, |n| n.get());
    let all = run::run_all(bins(), seconds, jobs).unwrap();
    assert_eq!(all.len(), fuzz::TARGETS.len());
    let crashed: Vec<String> = all
        .iter()
        .filter(|o| !o.crashes.is_empty())
        .map(|o| format!("{o}\n    log: {}", o.log.display()))
        .collect();
    assert!(crashed.is_empty(), "crashes:\n{}", crashed.join("\n"));
    for o in &all {
        assert!(o.execs > 0, "{o}: no executions (log {})", o.log.display());
    }
}
