//! A migration's status: its [`State`] (a checked state machine), progress and result, shared
//! between the migration's threads and whoever asks (`GET /migrate`).
//!
//! ```text
//!  setup ──▶ precopy ──▶ switchover ──▶ postcopy ──▶ completed
//!    │          │            │   ╲          │  ▲
//!    │          │            │    ╲─────────┼──┼──▶ completed   (pre-copy: memory complete)
//!    ├──────────┴──▶ cancelled              ▼  │
//!    │   (setup ──▶ switchover: post-copy)  postcopy-paused ──▶ resuming ──▶ postcopy
//!    │                                          ▲                  │
//!    │                                          └──────────────────┘ (resume failed)
//!  any state but completed / cancelled ──▶ failed
//! ```

use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use serde_json::Value;
use thiserror::Error;

/// Where a migration is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum State {
    /// Connecting, checking, preparing.
    #[default]
    Setup,
    /// Pre-copy rounds: the source runs, its memory streams.
    Precopy,
    /// The source is paused; the last pages and the machine state go.
    Switchover,
    /// The destination runs; missing pages come on demand and in the background.
    Postcopy,
    /// Post-copy with the link lost: waiting for a reconnection.
    PostcopyPaused,
    /// Post-copy reconnecting.
    Resuming,
    /// Done: the destination has every page and the digests agree.
    Completed,
    /// Given up before switchover: the source runs on.
    Cancelled,
    /// Failed.
    Failed,
}

impl State {
    /// The name, as in JSON.
    pub fn name(self) -> &'static str {
        match self {
            State::Setup => "setup",
            State::Precopy => "precopy",
            State::Switchover => "switchover",
            State::Postcopy => "postcopy",
            State::PostcopyPaused => "postcopy-paused",
            State::Resuming => "resuming",
            State::Completed => "completed",
            State::Cancelled => "cancelled",
            State::Failed => "failed",
        }
    }

    /// Whether nothing follows.
    pub fn is_final(self) -> bool {
        matches!(self, State::Completed | State::Cancelled | State::Failed)
    }

    /// Whether `self → to` is a legal step (staying in a state that is not final is).
    pub fn can_go(self, to: State) -> bool {
        use State::*;
        if self.is_final() {
            return false;
        }
        if self == to || to == Failed {
            return true;
        }
        matches!(
            (self, to),
            (Setup, Precopy | Switchover | Cancelled)
                | (Precopy, Switchover | Cancelled)
                | (Switchover, Postcopy | Completed)
                | (Postcopy, PostcopyPaused | Completed)
                | (PostcopyPaused, Resuming)
                | (Resuming, Postcopy | PostcopyPaused)
        )
    }
}

impl std::fmt::Display for State {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Which side.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// The sending side.
    #[default]
    Source,
    /// The receiving side.
    Destination,
}

/// An illegal state change.
#[derive(Debug, Error, PartialEq, Eq)]
#[error("illegal migration state change {from} → {to}")]
pub struct TransitionError {
    /// The state it was in.
    pub from: State,
    /// The state asked for.
    pub to: State,
}

/// What [`Status`] holds.
#[derive(Debug, Clone, Default, Serialize)]
pub struct StatusInner {
    /// Which side.
    pub role: Role,
    /// Where it is.
    pub state: State,
    /// The mode (`precopy`, `postcopy`, `hybrid`).
    pub mode: Option<crate::proto::MigrationMode>,
    /// Pre-copy round.
    pub round: u32,
    /// Progress, percent of the pages to send.
    pub percent: f64,
    /// Current rate, MB/s.
    pub rate_mbps: f64,
    /// Bytes still to send (estimate).
    pub remaining_bytes: u64,
    /// Source: bytes sent so far on both connections (headers included).
    pub bytes_sent: u64,
    /// Source, post-copy: pages sent as answers to the destination's requests (the priority
    /// connection: each requested page, and the pages of a stride pushed with it).
    pub priority_pages: u64,
    /// The error, when failed or paused.
    pub error: Option<String>,
    /// Final statistics.
    pub stats: Option<Value>,
    /// Source checksums at switchover (destination, `--verify`).
    #[serde(skip)]
    pub source_checksums: Option<Vec<u64>>,
    /// Source: the migration failed after the machine state went out, so the destination
    /// may run the guest. The guest stays paused here and no other migration starts until
    /// the operator decides (the VMM's `PUT /migrate/reclaim`: the guest runs here again).
    pub in_doubt: bool,
}

/// A migration's status, shared by its threads and the API.
#[derive(Debug, Clone, Default)]
pub struct Status(Arc<Mutex<StatusInner>>);

impl Status {
    /// A new status in [`State::Setup`].
    pub fn new(role: Role, mode: Option<crate::proto::MigrationMode>) -> Status {
        Status(Arc::new(Mutex::new(StatusInner {
            role,
            mode,
            ..Default::default()
        })))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, StatusInner> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Move to `to` if legal from the current state.
    pub fn go(&self, to: State) -> Result<(), TransitionError> {
        self.go_with(to, |_| {})
    }

    /// Move to `to` if legal, and change other fields under the same lock.
    pub fn go_with(
        &self,
        to: State,
        f: impl FnOnce(&mut StatusInner),
    ) -> Result<(), TransitionError> {
        let mut g = self.lock();
        if !g.state.can_go(to) {
            return Err(TransitionError { from: g.state, to });
        }
        g.state = to;
        f(&mut g);
        Ok(())
    }

    /// Change fields other than the state (progress, rate).
    pub fn update(&self, f: impl FnOnce(&mut StatusInner)) {
        let mut g = self.lock();
        let state = g.state;
        f(&mut g);
        // The state only moves through `go`.
        g.state = state;
    }

    /// The current state.
    pub fn state(&self) -> State {
        self.lock().state
    }

    /// A copy.
    pub fn get(&self) -> StatusInner {
        self.lock().clone()
    }

    /// As JSON.
    pub fn json(&self) -> Value {
        serde_json::to_value(self.get()).unwrap_or(Value::Null)
    }

    /// In a final state.
    pub fn is_final(&self) -> bool {
        self.state().is_final()
    }
}

#[cfg(test)]
mod tests {
    use super::State::*;
    use super::*;

    const ALL: [State; 9] = [
        Setup,
        Precopy,
        Switchover,
        Postcopy,
        PostcopyPaused,
        Resuming,
        Completed,
        Cancelled,
        Failed,
    ];

    #[test]
    fn legal_paths() {
        for path in [
            &[Setup, Precopy, Precopy, Switchover, Completed][..],
            &[Setup, Switchover, Postcopy, Completed],
            &[
                Setup,
                Precopy,
                Switchover,
                Postcopy,
                PostcopyPaused,
                Resuming,
                Postcopy,
                Completed,
            ],
            &[Setup, Precopy, Cancelled],
            &[
                Setup,
                Switchover,
                Postcopy,
                PostcopyPaused,
                Resuming,
                PostcopyPaused,
                Failed,
            ],
        ] {
            let s = Status::new(Role::Source, None);
            for &st in &path[1..] {
                s.go(st).unwrap();
            }
            assert!(s.is_final());
        }
    }

    #[test]
    fn illegal_steps() {
        // Nothing leaves a final state; nothing goes back before switchover after it.
        for from in [Completed, Cancelled, Failed] {
            for to in ALL {
                assert!(!from.can_go(to), "{from} → {to}");
            }
        }
        for from in [Switchover, Postcopy, PostcopyPaused, Resuming] {
            for to in [Setup, Precopy, Cancelled] {
                assert!(!from.can_go(to), "{from} → {to}");
            }
        }
        assert!(!Precopy.can_go(Postcopy));
        assert!(!PostcopyPaused.can_go(Postcopy), "through resuming");
        assert!(!Postcopy.can_go(Resuming));
        for from in ALL {
            assert_eq!(from.can_go(Failed), !from.is_final());
        }
        let s = Status::new(Role::Destination, None);
        assert_eq!(
            s.go(Completed),
            Err(TransitionError {
                from: Setup,
                to: Completed
            })
        );
        s.update(|i| {
            i.state = Completed;
            i.round = 3;
        });
        assert_eq!(s.state(), Setup, "update does not move the state");
        assert_eq!(s.get().round, 3);
    }

    #[test]
    fn json_names() {
        for st in ALL {
            assert_eq!(serde_json::to_value(st).unwrap(), st.name());
        }
        let s = Status::new(Role::Destination, None);
        s.go(Switchover).unwrap();
        s.go(Postcopy).unwrap();
        s.go(PostcopyPaused).unwrap();
        assert_eq!(s.json()["state"], "postcopy-paused");
        assert_eq!(s.json()["role"], "destination");
    }
}
