//! Fault-injection points for the migration's fault matrix (`faultline/tests/migrate_faults.rs`):
//! windows at the moments a test cannot hit by polling (switchover, the `State` frame, the
//! verdict, the hello), held open so that the test can cut the link or kill a process inside.
//!
//! Set `FAULTLINE_FAILPOINT=NAME:HOLD_MS:MARK` in a `faultline` process's environment: when
//! that process reaches point `NAME`, it creates the file `MARK` (the test's signal), sleeps
//! `HOLD_MS` milliseconds, and goes on as if nothing happened. Without the variable, or with
//! another name, a point costs one comparison. Points: `source-switchover` (the source paused
//! its guest, before the `Switch` frame), `dest-hello` (the destination read the hello, before
//! its answer), `dest-state` (the destination read the `State` frame, before it starts the
//! guest), `source-verdict` (every page is at the destination, before the source's `Verdict`).

use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::Duration;

/// A point armed by the environment.
#[derive(Debug, Clone, PartialEq)]
struct Armed {
    name: String,
    hold: Duration,
    mark: PathBuf,
}

/// `NAME:HOLD_MS:MARK`, or `None` if malformed.
fn parse(v: &str) -> Option<Armed> {
    let mut it = v.splitn(3, ':');
    let name = it.next()?.to_string();
    let hold = Duration::from_millis(it.next()?.parse().ok()?);
    let mark = PathBuf::from(it.next()?);
    (!name.is_empty() && !mark.as_os_str().is_empty()).then_some(Armed { name, hold, mark })
}

fn armed() -> Option<&'static Armed> {
    static ARMED: OnceLock<Option<Armed>> = OnceLock::new();
    ARMED
        .get_or_init(|| {
            std::env::var("FAULTLINE_FAILPOINT")
                .ok()
                .and_then(|v| parse(&v))
        })
        .as_ref()
}

/// Point `name`: if armed, mark and hold (see the module docs).
pub(crate) fn hold(name: &str) {
    if let Some(a) = armed()
        && a.name == name
    {
        let _ = std::fs::write(&a.mark, name);
        std::thread::sleep(a.hold);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_variable_names_a_point_a_hold_and_a_mark() {
        assert_eq!(
            parse("dest-state:1500:/tmp/m"),
            Some(Armed {
                name: "dest-state".into(),
                hold: Duration::from_millis(1500),
                mark: "/tmp/m".into()
            })
        );
        for bad in ["", "x", "x:1", "x:y:/m", ":1:/m", "x:1:"] {
            assert_eq!(parse(bad), None, "{bad}");
        }
    }
}
