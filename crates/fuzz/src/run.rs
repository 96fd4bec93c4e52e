//! Building the libFuzzer targets with the stable toolchain and running each for a bounded
//! time, seeded from the committed corpus.
//!
//! The build mirrors what `cargo fuzz build -s none -a` passes (cargo-fuzz's `project.rs`):
//! `--release`, an explicit `--target` (so build scripts get no coverage flags), and
//! [`RUSTFLAGS`]. Binaries go to `target/fuzz`; each run's new inputs to
//! `target/fuzz/corpus/TARGET` (the committed seeds in `crates/fuzz/corpus/TARGET` are only
//! read); a crash's input to `target/fuzz/artifacts/TARGET/`.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use thiserror::Error;

/// The coverage flags, as `cargo fuzz build -s none -a` on Linux passes them, less
/// `-Ccodegen-units=1` (a slower build for a faster binary; the CI budget prefers the build).
pub const RUSTFLAGS: &str = "-Cpasses=sancov-module \
-Cllvm-args=-sanitizer-coverage-level=4 \
-Cllvm-args=-sanitizer-coverage-inline-8bit-counters \
-Cllvm-args=-sanitizer-coverage-pc-table \
-Cllvm-args=-sanitizer-coverage-trace-compares \
-Cllvm-args=-simplifycfg-branch-fold-threshold=0 \
--cfg fuzzing \
-Clink-dead-code \
-Cllvm-args=-sanitizer-coverage-stack-depth \
-Cdebug-assertions";

/// Building or running the targets failed.
#[derive(Debug, Error)]
pub enum RunError {
    /// `rustc -vV` did not name the host.
    #[error("cannot tell the host target from `rustc -vV`")]
    Host(#[source] io::Error),
    /// Cargo could not be started.
    #[error("starting `{what}`")]
    Spawn {
        /// The command.
        what: String,
        /// Cause (errno kept).
        #[source]
        source: io::Error,
    },
    /// The build failed.
    #[error("building the fuzz targets failed ({status}); its output is above")]
    Build {
        /// Cargo's exit status.
        status: std::process::ExitStatus,
    },
    /// A directory or log could not be made or read.
    #[error("{what} {}", path.display())]
    Io {
        /// What was being done.
        what: &'static str,
        /// Where.
        path: PathBuf,
        /// Cause (errno kept).
        #[source]
        source: io::Error,
    },
    /// A target ended without libFuzzer's summary and without a crash input.
    #[error("{target} exited with {status} and left no crash input; log: {}", log.display())]
    Failed {
        /// The target.
        target: String,
        /// Its exit status.
        status: std::process::ExitStatus,
        /// Its log.
        log: PathBuf,
    },
}

/// The workspace root (two levels above this crate).
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .ancestors()
        .nth(2)
        .expect("crates/fuzz lies two levels down")
        .to_path_buf()
}

/// The committed seeds of `target`.
pub fn seeds_dir(target: &str) -> PathBuf {
    root().join("crates/fuzz/corpus").join(target)
}

fn host() -> Result<String, RunError> {
    let out = Command::new("rustc")
        .arg("-vV")
        .output()
        .map_err(RunError::Host)?;
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("host: ").map(str::to_string))
        .ok_or_else(|| RunError::Host(io::Error::other("no host line")))
}

/// Build every target (and the canary); returns the directory of the binaries.
pub fn build() -> Result<PathBuf, RunError> {
    let root = root();
    let triple = host()?;
    let target_dir = root.join("target/fuzz");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    // Not `--locked`: the targets' lock file follows the workspace's, and a merge that adds a
    // dependency to a workspace crate must not break the fuzz build (cargo adds the entry and
    // keeps every other version; we say so below).
    let lock = root.join("crates/fuzz/targets/Cargo.lock");
    let before = fs::read(&lock).ok();
    let mut cmd = Command::new(&cargo);
    cmd.args(["build", "--release", "--bins", "--manifest-path"])
        .arg(root.join("crates/fuzz/targets/Cargo.toml"))
        .arg("--target")
        .arg(&triple)
        .arg("--target-dir")
        .arg(&target_dir)
        .env("RUSTFLAGS", RUSTFLAGS)
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .env_remove("CARGO_TARGET_DIR")
        .env_remove("CARGO_BUILD_TARGET")
        .env_remove("RUSTC_WRAPPER")
        .stdin(Stdio::null());
    let status = cmd.status().map_err(|source| RunError::Spawn {
        what: format!("{cargo} build (fuzz targets)"),
        source,
    })?;
    if !status.success() {
        return Err(RunError::Build { status });
    }
    if fs::read(&lock).ok() != before {
        eprintln!(
            "note: cargo updated {} to match the workspace; commit it",
            lock.display()
        );
    }
    Ok(target_dir.join(triple).join("release"))
}

/// One target's run.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// The target.
    pub target: String,
    /// Inputs executed (libFuzzer's `number_of_executed_units`, or its last `#N` line).
    pub execs: u64,
    /// Crash, timeout, leak or out-of-memory inputs it wrote (libFuzzer stops at the first).
    pub crashes: Vec<PathBuf>,
    /// Its log (libFuzzer's output).
    pub log: PathBuf,
}

impl std::fmt::Display for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{:<18} executions {:>10}  crashes {}",
            self.target,
            self.execs,
            self.crashes.len()
        )?;
        for c in &self.crashes {
            write!(f, "\n    crash input: {}", c.display())?;
        }
        Ok(())
    }
}

fn mkdir(p: &Path) -> Result<(), RunError> {
    fs::create_dir_all(p).map_err(|source| RunError::Io {
        what: "creating",
        path: p.to_path_buf(),
        source,
    })
}

/// Executions from a libFuzzer log.
pub fn executions(log: &str) -> u64 {
    if let Some(n) = log
        .lines()
        .find_map(|l| l.strip_prefix("stat::number_of_executed_units:"))
        .and_then(|n| n.trim().parse().ok())
    {
        return n;
    }
    log.lines()
        .filter_map(|l| l.strip_prefix('#'))
        .filter_map(|l| l.split_whitespace().next()?.parse::<u64>().ok())
        .max()
        .unwrap_or(0)
}

/// Run the binary `target` in `bins` for `seconds`, seeded from `seeds`.
pub fn run_target(
    bins: &Path,
    target: &str,
    seconds: u64,
    seeds: &Path,
) -> Result<Outcome, RunError> {
    let work = root().join("target/fuzz");
    let corpus = work.join("corpus").join(target);
    let artifacts = work.join("artifacts").join(target);
    mkdir(&corpus)?;
    let _ = fs::remove_dir_all(&artifacts);
    mkdir(&artifacts)?;
    let log = work.join("logs").join(format!("{target}.log"));
    mkdir(log.parent().expect("logs dir"))?;
    let out = fs::File::create(&log).map_err(|source| RunError::Io {
        what: "creating",
        path: log.clone(),
        source,
    })?;
    let err = out.try_clone().map_err(|source| RunError::Io {
        what: "duplicating",
        path: log.clone(),
        source,
    })?;
    let bin = bins.join(target);
    let mut prefix = artifacts.clone().into_os_string();
    prefix.push("/");
    let mut child = Command::new(&bin)
        .arg(format!("-max_total_time={seconds}"))
        .arg("-timeout=10")
        .arg("-rss_limit_mb=2048")
        .arg("-print_final_stats=1")
        .arg({
            let mut a = std::ffi::OsString::from("-artifact_prefix=");
            a.push(&prefix);
            a
        })
        .arg(&corpus)
        .arg(seeds)
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()
        .map_err(|source| RunError::Spawn {
            what: bin.display().to_string(),
            source,
        })?;
    let pid = child.id();
    let status = child.wait().map_err(|source| RunError::Spawn {
        what: bin.display().to_string(),
        source,
    })?;
    let _ = fs::remove_file(crate::targets::vfu::socket_path(pid));
    let text = fs::read(&log).map_err(|source| RunError::Io {
        what: "reading",
        path: log.clone(),
        source,
    })?;
    let text = String::from_utf8_lossy(&text);
    let mut crashes: Vec<PathBuf> = fs::read_dir(&artifacts)
        .map_err(|source| RunError::Io {
            what: "listing",
            path: artifacts.clone(),
            source,
        })?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    crashes.sort();
    if !status.success() && crashes.is_empty() {
        return Err(RunError::Failed {
            target: target.into(),
            status,
            log,
        });
    }
    Ok(Outcome {
        target: target.into(),
        execs: executions(&text),
        crashes,
        log,
    })
}

/// Run every target in [`crate::TARGETS`] for `seconds` each, `jobs` at a time, printing a
/// line per target as it ends.
pub fn run_all(bins: &Path, seconds: u64, jobs: usize) -> Result<Vec<Outcome>, RunError> {
    let names: Vec<&str> = crate::TARGETS.iter().map(|t| t.name).collect();
    let mut all = Vec::new();
    for group in names.chunks(jobs.max(1)) {
        let results: Vec<Result<Outcome, RunError>> = std::thread::scope(|s| {
            let hs: Vec<_> = group
                .iter()
                .map(|t| s.spawn(move || run_target(bins, t, seconds, &seeds_dir(t))))
                .collect();
            hs.into_iter()
                .map(|h| h.join().expect("runner thread"))
                .collect()
        });
        for r in results {
            let o = r?;
            println!("{o}");
            all.push(o);
        }
    }
    Ok(all)
}
