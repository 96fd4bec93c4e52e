//! Progress of a long operation on stderr: a bar (`indicatif`) on a terminal; otherwise one
//! plain line every few seconds and a final one, so that a log (`faultline demo | tee
//! demo.log`, CI) holds short lines, never carriage-return updates.

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};

/// How often a plain line is written when stderr is not a terminal.
const EVERY: Duration = Duration::from_secs(2);

/// A progress report.
pub struct Progress {
    what: &'static str,
    bar: Option<ProgressBar>,
    last: Option<Instant>,
}

impl Progress {
    /// Progress of `what` (a short name: "migration"), in percent.
    pub fn new(what: &'static str) -> Progress {
        let bar = std::io::stderr().is_terminal().then(|| {
            let b = ProgressBar::new(1000);
            if let Ok(st) = ProgressStyle::with_template("{prefix} [{bar:30}] {msg}") {
                b.set_style(st.progress_chars("=> "));
            }
            b.set_prefix(what);
            b
        });
        Progress {
            what,
            bar,
            last: None,
        }
    }

    /// Progress of `what` whose end cannot be told in advance: a spinner on a terminal.
    pub fn spinner(what: &'static str) -> Progress {
        let bar = std::io::stderr().is_terminal().then(|| {
            let b = ProgressBar::new_spinner();
            if let Ok(st) = ProgressStyle::with_template("{prefix} {spinner} {msg}") {
                b.set_style(st);
            }
            b.set_prefix(what);
            b.enable_steady_tick(Duration::from_millis(120));
            b
        });
        Progress {
            what,
            bar,
            last: None,
        }
    }

    /// Now at `percent` (ignored by a spinner), with a one-line `msg`.
    pub fn update(&mut self, percent: f64, msg: &str) {
        match &self.bar {
            Some(b) => {
                b.set_position((percent.clamp(0.0, 100.0) * 10.0) as u64);
                b.set_message(msg.to_string());
            }
            None => {
                if self.last.is_none_or(|t| t.elapsed() >= EVERY) {
                    self.last = Some(Instant::now());
                    eprintln!("{}: {msg}", self.what);
                }
            }
        }
    }

    /// The end, with a last one-line `msg`.
    pub fn finish(&mut self, msg: &str) {
        match self.bar.take() {
            Some(b) => b.finish_with_message(msg.to_string()),
            None => eprintln!("{}: {msg}", self.what),
        }
    }
}
