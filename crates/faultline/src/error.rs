//! What a `faultline` command reports when it fails: what it was doing, and the whole cause
//! chain below it (errno included), printed by `main` as one line.

use thiserror::Error;

/// A cause, kept whole (its own chain included).
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// A `faultline` command failed.
#[derive(Debug, Error)]
pub enum CliError {
    /// The command line asks for something that cannot work.
    #[error("{0}")]
    Usage(String),
    /// A check found a difference (a checksum, a byte, a page).
    #[error("{0}")]
    Check(String),
    /// An operation failed.
    #[error("{what}")]
    Failed {
        /// What was being done.
        what: String,
        /// Why.
        #[source]
        source: BoxError,
    },
}

/// `map_err` helper: `what` failed because of the error given.
pub fn failed<E: Into<BoxError>>(what: impl Into<String>) -> impl FnOnce(E) -> CliError {
    let what = what.into();
    move |e| CliError::Failed {
        what,
        source: e.into(),
    }
}

/// The result of a command.
pub type CliResult<T = ()> = Result<T, CliError>;
