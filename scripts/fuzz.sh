#!/usr/bin/env bash
# Build the libFuzzer targets (stable toolchain, coverage flags as `cargo fuzz build -s none -a`)
# and run each for SECONDS (default 60), seeded from crates/fuzz/corpus; one line per target:
# target, executions, crashes (and each crash input's path). Exits 1 if any target crashed.
# CI runs the same for 15 s a target inside `cargo test` (crates/fuzz/tests/fuzz.rs).
set -euo pipefail
cd "$(dirname "$0")/.."
exec cargo run -q --locked -p fuzz --bin fuzz-run -- "${1:-60}"
