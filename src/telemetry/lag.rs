//! Commit → ack timing: the commit times of the transactions handed to
//! Kafka, until the watermark passes them.
//!
//! ```text
//!  relay: last fact of a transaction pushed ──handed(end, commit_ts)──► pending (stream order)
//!  relay: watermark read ──acknowledged_through(mark)──► pop every end <= mark
//!           └─► commit→ack histogram (now − commit time), oldest unacked commit → ack lag gauge
//! ```
//!
//! Owned by the relay (one per process, like its stream); the values it
//! produces go to [`super::metrics::METRICS`].
//!
//! A transaction counts as acknowledged when the watermark passes its end:
//! Kafka acknowledged all of its facts and every earlier one (exactly-once:
//! the Kafka transaction holding it committed). Lone (non-transactional)
//! facts carry no commit time and are not timed. Times are the server's
//! commit timestamps against this machine's clock; a negative difference
//! (skew) counts as 0.
//!
//! **Invariants**
//! - `pending` is in stream order, so its ends ascend; it holds only
//!   transactions with a fact in flight, so it is bounded by the rings and
//!   the producer queue.
//! - The fast path (nothing passed) reads no clock and touches no atomic.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;

use super::metrics::{unix_us, METRICS};
use crate::lsn::Lsn;

/// Microseconds from the Unix epoch to the PostgreSQL epoch (2000-01-01).
const PG_EPOCH_UNIX_US: i64 = 946_684_800_000_000;

/// Transactions handed to Kafka, until acknowledged.
#[derive(Debug, Default)]
pub(crate) struct CommitClock {
    /// (unit end, commit time in Unix µs), in stream order.
    pending: VecDeque<(Lsn, i64)>,
}

impl CommitClock {
    /// An empty clock.
    pub(crate) fn new() -> Self {
        Self::default()
    }

    /// The last fact of the transaction ending at `end`, committed at
    /// `commit_ts` (PostgreSQL-epoch µs), was handed to Kafka.
    pub(crate) fn handed(&mut self, end: Lsn, commit_ts: i64) {
        let commit_us = commit_ts.saturating_add(PG_EPOCH_UNIX_US);
        if self.pending.is_empty() {
            METRICS
                .oldest_unacked_commit_us
                .store(commit_us, Ordering::Relaxed);
        }
        self.pending.push_back((end, commit_us));
    }

    /// The watermark is `mark`: every transaction ending at or below it is
    /// acknowledged.
    pub(crate) fn acknowledged_through(&mut self, mark: Lsn) {
        if self.pending.front().is_none_or(|&(end, _)| end > mark) {
            return;
        }
        let now = unix_us();
        while let Some(&(end, commit_us)) = self.pending.front() {
            if end > mark {
                break;
            }
            self.pending.pop_front();
            let seconds = now.saturating_sub(commit_us).max(0) as f64 / 1e6;
            METRICS.commit_to_ack.observe(seconds);
        }
        self.publish_oldest();
    }

    /// A new connection streams again from the watermark: what was pending
    /// comes again.
    pub(crate) fn clear(&mut self) {
        self.pending.clear();
        self.publish_oldest();
    }

    fn publish_oldest(&self) {
        let oldest = self.pending.front().map_or(0, |&(_, c)| c);
        METRICS
            .oldest_unacked_commit_us
            .store(oldest, Ordering::Relaxed);
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.pending.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn observed() -> u64 {
        super::super::metrics::render()
            .lines()
            .find_map(|l| l.strip_prefix("factlib_commit_to_ack_seconds_count "))
            .expect("the histogram's count")
            .parse()
            .unwrap()
    }

    #[test]
    fn transactions_are_timed_once_the_watermark_passes_them() {
        let before = observed();
        let mut c = CommitClock::new();
        let now_pg = unix_us() - PG_EPOCH_UNIX_US;
        c.handed(Lsn(0x100), now_pg - 2_000_000);
        c.handed(Lsn(0x200), now_pg - 1_000_000);
        c.handed(Lsn(0x300), now_pg);
        c.acknowledged_through(Lsn(0x0FF));
        assert_eq!(c.len(), 3);
        c.acknowledged_through(Lsn(0x200));
        assert_eq!(c.len(), 1);
        // Other tests may observe too: at least these two.
        assert!(observed() >= before + 2);
        c.clear();
        assert_eq!(c.len(), 0);
    }
}
