//! The one retry policy of the workspace: exponential backoff with full jitter, a cap on each
//! pause, and an overall deadline.
//!
//! A network call that may meet a transient failure (a coordinator calling an agent or telling
//! it a rollout ended, the control client looking for the leader, Raft replication to a peer
//! that is down) waits between attempts as a [`Backoff`] says, so that many callers that failed
//! together do not retry together (full jitter: each pause is drawn uniformly from zero to the
//! exponential bound), no pause grows past the cap, and no caller retries past its deadline.
//!
//! Three ways to use it, from the simplest:
//!
//! - [`Backoff::retry`] runs an async operation until it succeeds, fails with an error the
//!   predicate says is not worth retrying, or the deadline is near; it returns the last error.
//! - [`Backoff::start`] gives an [`Attempts`] for loops with their own control flow (a redirect
//!   retried at once, a verdict reached over several attempts): ask it for the next pause with
//!   [`Attempts::next_delay`] and stop when it says `None`.
//! - [`Backoff::delays`] is the bare infinite iterator of pauses, for a library that sleeps
//!   itself (openraft's network backoff).
//!
//! Time is tokio's (`tokio::time::Instant` and `sleep`), so tests run it on a paused clock;
//! the jitter comes from a seedable generator ([`Backoff::start_seeded`]), so they are
//! deterministic too.

use std::future::Future;
use std::time::Duration;

use tokio::time::Instant;

/// How to wait between attempts. Pause `n` (from 0) is drawn uniformly from
/// `[0, min(cap, first * 2^n)]`; a retry is made only while the time since the first attempt
/// plus the pause stays below `deadline`, and at most `max_retries` times.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    /// Upper bound of the first pause.
    pub first: Duration,
    /// Upper bound of every pause.
    pub cap: Duration,
    /// No retry starts after this long since the first attempt (`None`: no limit).
    pub deadline: Option<Duration>,
    /// At most this many retries (`None`: no limit).
    pub max_retries: Option<u32>,
}

impl Backoff {
    /// Pauses bounded by `first`, doubling up to `cap`; no deadline and no retry limit.
    pub const fn new(first: Duration, cap: Duration) -> Backoff {
        Backoff {
            first,
            cap,
            deadline: None,
            max_retries: None,
        }
    }

    /// The same, retrying only while less than `deadline` has passed since the first attempt.
    pub const fn with_deadline(self, deadline: Duration) -> Backoff {
        Backoff {
            deadline: Some(deadline),
            ..self
        }
    }

    /// The same, retrying at most `n` times.
    pub const fn with_max_retries(self, n: u32) -> Backoff {
        Backoff {
            max_retries: Some(n),
            ..self
        }
    }

    /// The upper bound of pause `n` (from 0), before jitter.
    pub fn bound(&self, n: u32) -> Duration {
        // 2^n overflows quickly; past 2^31 every bound is the cap anyway.
        let factor = 1u32.checked_shl(n.min(31)).unwrap_or(u32::MAX);
        self.first.saturating_mul(factor).min(self.cap)
    }

    /// The infinite series of pauses, jittered from a random seed (ignores the deadline and the
    /// retry limit: for callers that keep their own).
    pub fn delays(&self) -> Delays {
        Delays::new(*self, fastrand::Rng::new())
    }

    /// Starts counting attempts now, with random jitter.
    pub fn start(&self) -> Attempts {
        Attempts::new(Delays::new(*self, fastrand::Rng::new()))
    }

    /// Starts counting attempts now, with jitter drawn from `seed` (tests).
    pub fn start_seeded(&self, seed: u64) -> Attempts {
        Attempts::new(Delays::new(*self, fastrand::Rng::with_seed(seed)))
    }

    /// Runs `op` until it succeeds, fails with an error `retryable` refuses, or the policy gives
    /// up; then returns that last result.
    pub async fn retry<T, E, F, Fut>(
        &self,
        op: F,
        retryable: impl FnMut(&E) -> bool,
    ) -> Result<T, E>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        self.start().run(op, retryable).await
    }
}

/// The pauses of a [`Backoff`], jittered: an infinite iterator.
#[derive(Debug)]
pub struct Delays {
    policy: Backoff,
    rng: fastrand::Rng,
    n: u32,
}

impl Delays {
    fn new(policy: Backoff, rng: fastrand::Rng) -> Delays {
        Delays { policy, rng, n: 0 }
    }
}

impl Iterator for Delays {
    type Item = Duration;

    fn next(&mut self) -> Option<Duration> {
        let bound = self.policy.bound(self.n);
        self.n = self.n.saturating_add(1);
        // Full jitter: anywhere from nothing to the bound, in nanoseconds.
        let nanos = u64::try_from(bound.as_nanos()).unwrap_or(u64::MAX);
        Some(Duration::from_nanos(self.rng.u64(0..=nanos)))
    }
}

/// One operation's attempts under a [`Backoff`]: when it started, how many retries it made.
#[derive(Debug)]
pub struct Attempts {
    delays: Delays,
    started: Instant,
    retries: u32,
}

impl Attempts {
    fn new(delays: Delays) -> Attempts {
        Attempts {
            delays,
            started: Instant::now(),
            retries: 0,
        }
    }

    /// Time since the first attempt.
    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    /// Retries made so far.
    pub fn retries(&self) -> u32 {
        self.retries
    }

    /// Whether the deadline has passed (an immediate retry, without a pause, is still allowed
    /// before it).
    pub fn expired(&self) -> bool {
        self.delays
            .policy
            .deadline
            .is_some_and(|d| self.elapsed() >= d)
    }

    /// The pause before the next retry, or `None` when the policy gives up: the retry limit is
    /// reached, or the pause would end at or past the deadline.
    pub fn next_delay(&mut self) -> Option<Duration> {
        let policy = self.delays.policy;
        if policy.max_retries.is_some_and(|m| self.retries >= m) {
            return None;
        }
        let delay = self.delays.next()?;
        if policy
            .deadline
            .is_some_and(|d| self.elapsed().saturating_add(delay) >= d)
        {
            return None;
        }
        self.retries += 1;
        Some(delay)
    }

    /// Sleeps the next pause; `false` (at once) when the policy gives up.
    pub async fn wait(&mut self) -> bool {
        match self.next_delay() {
            Some(d) => {
                tokio::time::sleep(d).await;
                true
            }
            None => false,
        }
    }

    /// Runs `op` until it succeeds, fails with an error `retryable` refuses, or the policy gives
    /// up; then returns that last result.
    pub async fn run<T, E, F, Fut>(
        mut self,
        mut op: F,
        mut retryable: impl FnMut(&E) -> bool,
    ) -> Result<T, E>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        loop {
            match op().await {
                Ok(v) => return Ok(v),
                Err(e) if retryable(&e) && self.wait().await => {}
                Err(e) => return Err(e),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn bounds_double_up_to_the_cap_and_never_overflow() {
        let b = Backoff::new(100 * MS, 1000 * MS);
        let bounds: Vec<u128> = (0..6).map(|n| b.bound(n).as_millis()).collect();
        assert_eq!(bounds, [100, 200, 400, 800, 1000, 1000]);
        assert_eq!(b.bound(u32::MAX), 1000 * MS);
        let huge = Backoff::new(Duration::MAX, Duration::MAX);
        assert_eq!(huge.bound(40), Duration::MAX);
    }

    #[test]
    fn pauses_are_jittered_within_their_bounds_and_seeded_runs_repeat() {
        let b = Backoff::new(100 * MS, 1000 * MS);
        let run = |seed| -> Vec<Duration> {
            Delays::new(b, fastrand::Rng::with_seed(seed))
                .take(200)
                .collect()
        };
        let a = run(7);
        assert_eq!(a, run(7), "the same seed gives the same pauses");
        assert_ne!(a, run(8), "another seed gives others");
        for (n, d) in a.iter().enumerate() {
            assert!(*d <= b.bound(n as u32), "pause {n}: {d:?}");
        }
        // Full jitter spreads the capped pauses over the whole range, not just near the cap.
        let capped = &a[10..];
        assert!(capped.iter().any(|d| *d < 300 * MS));
        assert!(capped.iter().any(|d| *d > 700 * MS));
    }

    #[tokio::test(start_paused = true)]
    async fn retries_transient_errors_until_success() {
        let calls = Cell::new(0);
        let r: Result<u32, &str> = Backoff::new(100 * MS, 1000 * MS)
            .start_seeded(1)
            .run(
                || {
                    calls.set(calls.get() + 1);
                    let n = calls.get();
                    async move { if n < 4 { Err("transient") } else { Ok(n) } }
                },
                |_| true,
            )
            .await;
        assert_eq!(r, Ok(4));
        assert_eq!(calls.get(), 4);
    }

    #[tokio::test(start_paused = true)]
    async fn an_error_the_predicate_refuses_is_returned_at_once() {
        let calls = Cell::new(0);
        let start = Instant::now();
        let r: Result<(), &str> = Backoff::new(100 * MS, 1000 * MS)
            .retry(
                || {
                    calls.set(calls.get() + 1);
                    async { Err("fatal") }
                },
                |e| *e != "fatal",
            )
            .await;
        assert_eq!(r, Err("fatal"));
        assert_eq!(calls.get(), 1);
        assert_eq!(start.elapsed(), Duration::ZERO);
    }

    #[tokio::test(start_paused = true)]
    async fn no_retry_starts_past_the_deadline_and_the_last_error_is_returned() {
        let b = Backoff::new(100 * MS, 400 * MS).with_deadline(2000 * MS);
        let calls = Cell::new(0u32);
        let start = Instant::now();
        let r: Result<(), u32> = b
            .start_seeded(3)
            .run(
                || {
                    calls.set(calls.get() + 1);
                    let n = calls.get();
                    async move { Err(n) }
                },
                |_| true,
            )
            .await;
        let waited = start.elapsed();
        assert!(waited < 2000 * MS, "{waited:?}");
        // With pauses of at most 400 ms, giving up means the next one would have crossed 2 s.
        assert!(waited + 400 * MS >= 2000 * MS, "{waited:?}");
        assert_eq!(r, Err(calls.get()), "the last attempt's error");
        assert!(calls.get() > 5);
    }

    #[tokio::test(start_paused = true)]
    async fn the_retry_limit_counts_retries_not_attempts() {
        let b = Backoff::new(10 * MS, 10 * MS).with_max_retries(2);
        let calls = Cell::new(0);
        let r: Result<(), ()> = b
            .retry(
                || {
                    calls.set(calls.get() + 1);
                    async { Err(()) }
                },
                |_| true,
            )
            .await;
        assert!(r.is_err());
        assert_eq!(calls.get(), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn attempts_report_expiry_for_loops_of_their_own() {
        let b = Backoff::new(100 * MS, 100 * MS).with_deadline(250 * MS);
        let mut a = b.start_seeded(5);
        assert!(!a.expired());
        let mut slept = Duration::ZERO;
        while let Some(d) = a.next_delay() {
            tokio::time::sleep(d).await;
            slept += d;
        }
        assert!(slept < 250 * MS);
        tokio::time::sleep(250 * MS).await;
        assert!(a.expired());
        assert_eq!(a.next_delay(), None);
    }
}
