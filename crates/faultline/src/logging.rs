//! Logging: every crate emits `tracing` events (libraries never print); this binary
//! subscribes once, filtered by `FAULTLINE_LOG` (the `EnvFilter` syntax: `info`, `debug`,
//! `vmm=debug,xfer=trace`, ...; default `info`), as text or as JSON lines
//! (`--log-format json`) on stderr. Results go to stdout and are not log events.

use clap::ValueEnum;
use tracing_subscriber::EnvFilter;

use crate::error::{CliError, CliResult};

/// The variable that sets the filter.
pub const ENV: &str = "FAULTLINE_LOG";

/// How log events are written.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// One human-readable line per event.
    #[default]
    Text,
    /// One JSON object per event (`timestamp`, `level`, `target`, `fields`).
    Json,
}

/// Install the subscriber; a filter that does not parse is an error naming it.
pub fn init(format: LogFormat) -> CliResult {
    let filter = match std::env::var(ENV) {
        Ok(v) => EnvFilter::try_new(&v)
            .map_err(|e| CliError::Usage(format!("{ENV}={v:?} is not a log filter: {e}")))?,
        Err(_) => EnvFilter::new("info"),
    };
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    let r = match format {
        LogFormat::Text => b.try_init(),
        LogFormat::Json => b.json().try_init(),
    };
    r.map_err(|e| CliError::Check(format!("cannot install the logger: {e}")))
}
