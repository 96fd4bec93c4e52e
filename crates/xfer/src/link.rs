//! Liveness of a migration link: the link deadline, socket stalls as errors ([`Stalled`]),
//! and keepalives ([`Keepalive`] negotiated in the hello, [`Beat`] to send them).

use std::io;
use std::time::{Duration, Instant};

use thiserror::Error;

/// The environment variable that sets [`link_deadline`] in milliseconds (tests shorten it).
pub const LINK_DEADLINE_ENV: &str = "FAULTLINE_LINK_DEADLINE_MS";

/// How long a connection may make no progress before it counts as lost: the write deadline
/// of every socket, and (with a peer that sends keepalives) the longest silence accepted
/// from it. 10 s, or [`LINK_DEADLINE_ENV`] (100 ms to 1 h).
pub fn link_deadline() -> Duration {
    static D: std::sync::OnceLock<Duration> = std::sync::OnceLock::new();
    *D.get_or_init(|| {
        std::env::var(LINK_DEADLINE_ENV)
            .ok()
            .and_then(|v| v.parse::<u64>().ok())
            .map(|ms| Duration::from_millis(ms.clamp(100, 3_600_000)))
            .unwrap_or(Duration::from_secs(10))
    })
}

/// Keepalives agreed in the handshake: send one on a connection when nothing was sent on
/// it for `every`; count the link lost when nothing came on it for `deadline`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Keepalive {
    /// Send a keepalive after this long without sending.
    pub every: Duration,
    /// Nothing received for this long: the link is lost.
    pub deadline: Duration,
}

impl Keepalive {
    /// From our own deadline and the peer's (announced in the hello or its answer; 0: the
    /// peer does not know keepalives, so none are sent or expected). We send at a quarter of
    /// the peer's deadline, at most every second.
    pub fn negotiate(ours: Duration, peer_ms: u64) -> Option<Keepalive> {
        (peer_ms > 0).then(|| Keepalive {
            every: (Duration::from_millis(peer_ms) / 4).min(Duration::from_secs(1)),
            deadline: ours,
        })
    }
}

/// Sends keepalives for one writer of one connection: [`Beat::due`] says when.
#[derive(Debug)]
pub struct Beat {
    every: Option<Duration>,
    last: Instant,
}

impl Beat {
    /// A beat every `ka.every` (never without keepalives).
    pub fn new(ka: Option<Keepalive>) -> Beat {
        Beat {
            every: ka.map(|k| k.every),
            last: Instant::now(),
        }
    }

    /// Something else was sent: the link is not idle.
    pub fn sent(&mut self) {
        self.last = Instant::now();
    }

    /// Whether a keepalive is due (nothing sent for the interval); if so, it counts as sent.
    /// (`Beat::tick` in `wire` sends it.)
    pub fn due(&mut self) -> bool {
        match self.every {
            Some(e) if self.last.elapsed() >= e => {
                self.last = Instant::now();
                true
            }
            _ => false,
        }
    }
}

/// Which way a connection stalled past its deadline.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Nothing came (not even a keepalive).
    Receiving,
    /// The peer took nothing (it stopped reading).
    Sending,
}

/// A connection that made no progress within its deadline (a socket timeout, or no frame
/// at all within the keepalive deadline); the errno (`EAGAIN`) is kept as the cause when
/// there was one. Carried inside an `io::Error` of kind `TimedOut`.
#[derive(Debug, Error)]
pub enum Stalled {
    /// A socket deadline expired.
    #[error("{}", stall_text(*.dir, *.after))]
    Socket {
        /// Which way.
        dir: Direction,
        /// The deadline.
        after: Duration,
        /// The socket's error.
        #[source]
        source: io::Error,
    },
    /// No frame within the keepalive deadline (seen between frames, by `poll`).
    #[error("{}", stall_text(Direction::Receiving, *.0))]
    Silent(Duration),
}

fn stall_text(dir: Direction, after: Duration) -> String {
    match dir {
        Direction::Receiving => format!(
            "nothing received for {after:?}, not even a keepalive (the link deadline): the peer is stopped or the link is dead"
        ),
        Direction::Sending => format!(
            "the peer took nothing for {after:?} (the write deadline): it stopped reading or the link is dead"
        ),
    }
}

impl Stalled {
    /// As the `io::Error` (kind `TimedOut`) the socket calls return.
    pub fn into_io(self) -> io::Error {
        io::Error::new(io::ErrorKind::TimedOut, self)
    }
}

/// A socket timeout (`EAGAIN` from a blocking socket with `SO_RCVTIMEO`/`SO_SNDTIMEO`)
/// becomes a [`Stalled`] error naming the deadline; other errors pass unchanged.
pub(crate) fn stalled(e: io::Error, dir: Direction, after: Option<Duration>) -> io::Error {
    match (e.kind(), after) {
        (io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut, Some(after)) => Stalled::Socket {
            dir,
            after,
            source: e,
        }
        .into_io(),
        _ => e,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::Sock;

    #[test]
    fn keepalives_only_with_a_peer_that_announced_them() {
        let ours = Duration::from_secs(10);
        assert_eq!(Keepalive::negotiate(ours, 0), None, "an older peer");
        let k = Keepalive::negotiate(ours, 2000).unwrap();
        assert_eq!(
            k.every,
            Duration::from_millis(500),
            "a quarter of its deadline"
        );
        assert_eq!(k.deadline, ours, "our own deadline for its silence");
        let k = Keepalive::negotiate(ours, 60_000).unwrap();
        assert_eq!(k.every, Duration::from_secs(1), "at most every second");
    }

    /// A peer that stops reading fails a write at the write deadline with [`Stalled`] (kind
    /// `TimedOut`, the socket's `EAGAIN` kept as the cause), instead of blocking.
    #[test]
    fn a_peer_that_stops_reading_fails_the_write_at_the_deadline() {
        use std::io::Write;
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        let mut s = Sock::Unix(a);
        s.set_write_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        let t = Instant::now();
        let chunk = vec![0u8; 1 << 16];
        let e = loop {
            if let Err(e) = s.write_all(&chunk) {
                break e;
            }
            assert!(t.elapsed() < Duration::from_secs(10), "never stalled");
        };
        assert_eq!(e.kind(), io::ErrorKind::TimedOut);
        let inner = e.get_ref().and_then(|i| i.downcast_ref::<Stalled>());
        assert!(
            matches!(
                inner,
                Some(Stalled::Socket {
                    dir: Direction::Sending,
                    ..
                })
            ),
            "{e:?}"
        );
        assert!(e.to_string().contains("took nothing for 200ms"), "{e}");
        assert!(t.elapsed() < Duration::from_secs(5));
    }
}
