//! When to connect again after a transient failure, for the relay and the
//! inbox. Owns the count of failed attempts in a row and the jitter; reads
//! no clock (the caller says how long the session streamed), so it is
//! tested against a fake one.
//!
//! ```text
//!  session ends ──(streamed since its first message?)──► Backoff::after ──► Retry { attempt, delay }
//!                                                              │
//!      healthy: first message, then ≥ HEALTHY_SESSION ─────────┘ attempt 1, delay ≤ min
//!      anything else (refused, bad start-up, a crash loop): attempt n+1, delay doubles up to max
//! ```
//!
//! A session is *healthy* when it got through start-up (the relay:
//! connected, authenticated, `START_REPLICATION` accepted, its first message
//! received; the inbox: its database connected and its Kafka consumer
//! started) and then ran for at least [`HEALTHY_SESSION`]. After a healthy
//! session the count starts over, so a relay cut ten times a minute
//! reconnects as fast the tenth time as the first. Failures that never get
//! that far (a server refusing connections, a wrong password, a Kafka that
//! fails the start-up) and sessions that die within a second of starting (a
//! crash loop) keep counting, and the delay grows.
//!
//! **Invariants**
//! - Attempt `n` of a run of failures waits in `[b/2, b]` with
//!   `b = min(min_delay · 2^(n-1), max)`: the first never more than
//!   `min_delay`, none more than `max`, and up to the cap each at least as
//!   long as the one before.
//! - A healthy session makes the next attempt number 1.

use std::time::Duration;

/// A session that got its first message and then streamed this long was
/// healthy: the next failure's backoff starts from the minimum again.
/// Shorter sessions count as failures, so a crash loop still backs off.
pub const HEALTHY_SESSION: Duration = Duration::from_secs(1);

/// The first attempt after a failure waits at most this long (at least
/// half of it).
pub const MIN_DELAY: Duration = Duration::from_millis(100);

/// The next attempt: its number in the current run of failures and how
/// long to wait before it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Retry {
    /// 1 for the first attempt after a healthy session (or the start).
    pub(crate) attempt: u32,
    /// The wait before the attempt.
    pub(crate) delay: Duration,
}

/// The reconnect policy: exponential backoff with jitter, started over
/// after a healthy session.
#[derive(Debug)]
pub(crate) struct Backoff {
    min: Duration,
    max: Duration,
    /// Failures in a row since the last healthy session.
    failures: u32,
    jitter: SplitMix64,
}

impl Backoff {
    /// Delays from [`MIN_DELAY`] up to `max`, jittered by a generator
    /// seeded with `seed`.
    pub(crate) fn new(max: Duration, seed: u64) -> Self {
        Backoff {
            min: MIN_DELAY.min(max),
            max,
            failures: 0,
            jitter: SplitMix64(seed),
        }
    }

    /// The next attempt after a session that streamed for `streamed` since
    /// its first message (`None`: it never got that far).
    pub(crate) fn after(&mut self, streamed: Option<Duration>) -> Retry {
        if streamed.is_some_and(|s| s >= HEALTHY_SESSION) {
            self.failures = 0;
        }
        self.failures = self.failures.saturating_add(1);
        let doublings = (self.failures - 1).min(31);
        let ceiling = self.min.saturating_mul(1 << doublings).min(self.max);
        let delay = ceiling / 2 + ceiling.mul_f64(self.jitter.unit() / 2.0);
        Retry {
            attempt: self.failures,
            delay: delay.min(ceiling),
        }
    }
}

/// A small, fast pseudo-random generator (SplitMix64): jitter needs to be
/// spread, not secret.
#[derive(Debug)]
struct SplitMix64(u64);

impl SplitMix64 {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A number in `[0, 1)`.
    fn unit(&mut self) -> f64 {
        // The top 53 bits fill an f64's mantissa exactly.
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// A seed that differs between processes, so relays restarted together do
/// not retry in step.
pub(crate) fn seed() -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    (u64::from(std::process::id()) << 32) | u64::from(nanos)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    /// A fake clock: time passes only as the test says, through the
    /// sessions' lengths and the delays the policy chooses.
    struct FakeClock {
        now: Duration,
    }

    impl FakeClock {
        fn wait(&mut self, r: Retry) {
            self.now += r.delay;
        }
        fn stream(&mut self, d: Duration) -> Option<Duration> {
            self.now += d;
            Some(d)
        }
    }

    fn in_bounds(r: Retry, ceiling: Duration) {
        assert!(
            r.delay >= ceiling / 2 && r.delay <= ceiling,
            "attempt {}: {:?} outside [{:?}, {ceiling:?}]",
            r.attempt,
            r.delay,
            ceiling / 2
        );
    }

    /// The issue: ten drops in 60 s, each after a few seconds of
    /// streaming, once waited 0.13 s growing to 27 s. Now every one waits at
    /// most the minimum and is attempt 1.
    #[test]
    fn every_drop_after_a_healthy_session_retries_at_the_minimum() {
        let mut clock = FakeClock {
            now: Duration::ZERO,
        };
        let mut b = Backoff::new(Duration::from_secs(30), 7);
        for i in 0..10u64 {
            let streamed = clock.stream(Duration::from_millis(2_000 + 700 * i));
            let r = b.after(streamed);
            assert_eq!(r.attempt, 1);
            in_bounds(r, MIN_DELAY);
            clock.wait(r);
        }
        assert!(clock.now < Duration::from_secs(60), "{:?}", clock.now);
    }

    /// A server refusing connections for 20 s: the delays double, each in
    /// its jitter window, up to the cap; the first attempt after the server
    /// is back comes within one capped delay.
    #[test]
    fn refused_connections_back_off_up_to_the_cap() {
        let max = Duration::from_secs(4);
        let mut clock = FakeClock {
            now: Duration::ZERO,
        };
        let mut b = Backoff::new(max, 11);
        let back_at = Duration::from_secs(20);
        let mut previous = Duration::ZERO;
        let mut capped = false;
        loop {
            let r = b.after(None);
            let ceiling = MIN_DELAY.saturating_mul(1 << (r.attempt - 1)).min(max);
            in_bounds(r, ceiling);
            if ceiling < max {
                assert!(r.delay >= previous, "{:?} after {previous:?}", r.delay);
            } else {
                capped = true;
            }
            previous = r.delay;
            let before = clock.now;
            clock.wait(r);
            if clock.now >= back_at {
                assert!(clock.now - before <= max);
                assert!(clock.now - back_at <= max);
                break;
            }
        }
        assert!(capped, "20 s of refusals reach a 4 s cap");
        assert!(b.failures >= 8, "{}", b.failures);
    }

    /// Sessions that die within a second of starting are a crash loop: they
    /// keep the growth.
    #[test]
    fn a_crash_loop_still_backs_off() {
        let mut clock = FakeClock {
            now: Duration::ZERO,
        };
        let mut b = Backoff::new(Duration::from_secs(30), 3);
        let mut last = Retry {
            attempt: 0,
            delay: Duration::ZERO,
        };
        for n in 1..=8 {
            let streamed = clock.stream(200 * MS);
            last = b.after(streamed);
            assert_eq!(last.attempt, n);
            clock.wait(last);
        }
        assert!(last.delay >= Duration::from_millis(6_400), "{last:?}");
        // One healthy session, and the next drop starts over.
        let r = b.after(clock.stream(HEALTHY_SESSION));
        assert_eq!(r.attempt, 1);
        in_bounds(r, MIN_DELAY);
    }

    #[test]
    fn a_failure_before_the_first_message_is_not_a_success() {
        let mut b = Backoff::new(Duration::from_secs(30), 5);
        assert_eq!(b.after(None).attempt, 1);
        assert_eq!(b.after(None).attempt, 2);
        // A session that just missed the threshold.
        assert_eq!(b.after(Some(HEALTHY_SESSION - MS)).attempt, 3);
        assert_eq!(b.after(Some(HEALTHY_SESSION)).attempt, 1);
    }

    #[test]
    fn a_cap_below_the_minimum_is_the_minimum_and_many_failures_do_not_overflow() {
        let mut b = Backoff::new(Duration::from_millis(40), 1);
        for _ in 0..100 {
            assert!(b.after(None).delay <= Duration::from_millis(40));
        }
        let mut b = Backoff::new(Duration::from_secs(3_600), 2);
        for _ in 0..1_000 {
            let r = b.after(None);
            assert!(r.delay <= Duration::from_secs(3_600));
        }
        assert_eq!(b.after(None).attempt, 1_001);
    }

    #[test]
    fn jitter_spreads_the_delays() {
        let mut b = Backoff::new(Duration::from_secs(30), 9);
        let delays: std::collections::HashSet<_> = (0..50)
            .map(|_| b.after(Some(HEALTHY_SESSION)).delay)
            .collect();
        assert!(delays.len() > 40, "{}", delays.len());
    }
}
