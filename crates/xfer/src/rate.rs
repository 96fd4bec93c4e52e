//! The migration's bandwidth cap ([`RateLimit`], re-exported as `wire::RateLimit`).

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// A token bucket over both connections: the link's capacity, as QEMU's `max-bandwidth`.
///
/// The cap is for the background. A priority send (a page a vCPU waits for) never waits for
/// tokens: it is sent at once and its bytes are debited, so the bucket may go into debt and
/// the background stream, which waits for the debt to be paid, slows down by as much. The
/// link's average stays at the cap; a fault's answer never queues behind a background run.
#[derive(Debug)]
pub struct RateLimit {
    bytes_per_s: f64,
    /// (last refill, tokens): tokens go negative after priority sends.
    state: Mutex<(Instant, f64)>,
}

impl RateLimit {
    /// `bytes_per_s` of 0: unlimited.
    pub fn new(bytes_per_s: u64) -> RateLimit {
        RateLimit {
            bytes_per_s: bytes_per_s as f64,
            state: Mutex::new((Instant::now(), 0.0)),
        }
    }

    /// Whether there is a cap.
    pub fn limited(&self) -> bool {
        self.bytes_per_s > 0.0
    }

    /// Give back tokens taken for bytes that were not sent.
    pub fn refund(&self, bytes: usize) {
        if self.limited() {
            self.state.lock().unwrap_or_else(|e| e.into_inner()).1 += bytes as f64;
        }
    }

    /// The burst: 2 ms of the link, at least 64 KiB.
    fn burst(&self) -> f64 {
        (self.bytes_per_s * 0.002).max(65536.0)
    }

    /// Refill and return the tokens now (at most a burst).
    fn refill(&self, st: &mut (Instant, f64)) -> f64 {
        let now = Instant::now();
        let tokens =
            (st.1 + now.duration_since(st.0).as_secs_f64() * self.bytes_per_s).min(self.burst());
        st.0 = now;
        tokens
    }

    /// Take tokens for `bytes` if the bucket has them now; otherwise how long until it will
    /// (never waits: for a thread that must stay free to answer requests).
    pub fn try_take(&self, bytes: usize) -> Result<(), Duration> {
        if !self.limited() {
            return Ok(());
        }
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let tokens = self.refill(&mut st);
        let b = bytes as f64;
        if tokens >= b || (tokens >= 0.0 && b > self.burst()) {
            st.1 = tokens - b;
            Ok(())
        } else {
            st.1 = tokens;
            Err(Duration::from_secs_f64(
                (b.min(self.burst()) - tokens) / self.bytes_per_s,
            ))
        }
    }

    /// Wait until `bytes` may be sent. `urgent` (a vCPU waits for them): never waits; the
    /// bytes are debited and the background pays for them.
    pub fn take(&self, bytes: usize, urgent: bool) {
        if !self.limited() {
            return;
        }
        loop {
            let wait = {
                let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
                let tokens = self.refill(&mut st);
                let b = bytes as f64;
                if urgent || tokens >= b || (tokens >= 0.0 && b > self.burst()) {
                    st.1 = tokens - b;
                    None
                } else {
                    st.1 = tokens;
                    Some((b - tokens) / self.bytes_per_s)
                }
            };
            match wait {
                None => break,
                Some(s) => std::thread::sleep(Duration::from_secs_f64(s.min(0.01))),
            }
        }
    }
}
