//! Metrics and events: each event is one struct whose `emit()` writes the
//! log line and updates the metric together.
//!
//! ```text
//!  relay/source/sink ──Event::emit()──► tracing (stderr) + METRICS counters
//!  relay ──ProgressLine::emit()──► one line every --progress-interval-secs
//! ```
//!
//! **Invariants**
//! - Telemetry never changes behaviour: no event can fail or block.
//! - Counter names are constants ending in `_total`; label values come from
//!   bounded sets.

use std::sync::atomic::{AtomicU64, Ordering};

use std::time::Duration;

use crate::lsn::Lsn;

/// Process-wide counters.
#[derive(Debug, Default)]
pub struct Metrics {
    /// Facts handed to the producer.
    pub facts_produced_total: AtomicU64,
    /// Facts acknowledged by Kafka.
    pub facts_acked_total: AtomicU64,
    /// Bytes (key + value + headers) acknowledged by Kafka.
    pub bytes_acked_total: AtomicU64,
    /// Records written to the dead-letter topic.
    pub dead_letters_total: AtomicU64,
    /// Replication connections established.
    pub connections_total: AtomicU64,
    /// Sessions ended by a transient failure (then retried).
    pub disconnects_total: AtomicU64,
    /// Standby status updates that raised the confirmed position.
    pub confirms_total: AtomicU64,
    /// Client-wide errors and warnings librdkafka reported.
    pub kafka_errors_total: AtomicU64,
    /// Kafka transactions committed (exactly-once).
    pub transactions_total: AtomicU64,
}

/// The counters.
pub static METRICS: Metrics = Metrics {
    facts_produced_total: AtomicU64::new(0),
    facts_acked_total: AtomicU64::new(0),
    bytes_acked_total: AtomicU64::new(0),
    dead_letters_total: AtomicU64::new(0),
    connections_total: AtomicU64::new(0),
    disconnects_total: AtomicU64::new(0),
    confirms_total: AtomicU64::new(0),
    kafka_errors_total: AtomicU64::new(0),
    transactions_total: AtomicU64::new(0),
};

fn inc(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}

/// Connected to PostgreSQL and streaming.
pub struct Connected<'a> {
    /// Slot name.
    pub slot: &'a str,
    /// Walsender PID.
    pub backend_pid: i32,
    /// Where streaming starts.
    pub start: Lsn,
    /// Transport in use.
    pub transport: &'a str,
}

impl Connected<'_> {
    /// Logs and counts.
    pub fn emit(&self) {
        inc(&METRICS.connections_total, 1);
        tracing::info!(slot = self.slot, backend_pid = self.backend_pid, start = %self.start, transport = self.transport, "streaming from slot");
    }
}

/// A transient failure (the replication connection lost, Kafka
/// unreachable) ended a session; the relay waits for what is in flight,
/// then streams again from the last confirmed position.
pub struct Interrupted<'a, E: std::fmt::Display> {
    /// Why.
    pub error: &'a E,
    /// Wait before the next attempt.
    pub retry_in: std::time::Duration,
}

impl<E: std::fmt::Display> Interrupted<'_, E> {
    /// Logs and counts.
    pub fn emit(&self) {
        inc(&METRICS.disconnects_total, 1);
        tracing::warn!(error = %self.error, retry_in_ms = u64::try_from(self.retry_in.as_millis()).unwrap_or(u64::MAX), "transient failure; retrying once the facts in flight are acknowledged, from the last confirmed position");
    }
}

/// A fact could not be decoded or routed and goes to the dead-letter topic.
pub struct DeadLettered<'a> {
    /// The DLQ topic.
    pub topic: &'a str,
    /// The message LSN.
    pub lsn: Lsn,
    /// Why.
    pub error: &'a str,
}

impl DeadLettered<'_> {
    /// Logs and counts.
    pub fn emit(&self) {
        inc(&METRICS.dead_letters_total, 1);
        tracing::warn!(topic = self.topic, lsn = %self.lsn, error = self.error, "fact sent to the dead-letter topic");
    }
}

/// librdkafka reported a client-wide error, or logged at warning level or
/// worse. While a broker is away that happens many times a second, each
/// error reported twice (as a log line and as an error), so one line per
/// [`KAFKA_LOG_INTERVAL`] is written, saying how many more were folded into
/// it; every one is counted.
pub struct KafkaTrouble<'a> {
    /// What librdkafka said.
    pub message: &'a dyn std::fmt::Display,
}

/// At most one [`KafkaTrouble`] line per this interval.
pub const KAFKA_LOG_INTERVAL: std::time::Duration = std::time::Duration::from_secs(10);

static KAFKA_LOG: std::sync::Mutex<RateLimit> =
    std::sync::Mutex::new(RateLimit::new(KAFKA_LOG_INTERVAL));

impl KafkaTrouble<'_> {
    /// Counts, and logs unless a line was written less than
    /// [`KAFKA_LOG_INTERVAL`] ago.
    pub fn emit(&self) {
        inc(&METRICS.kafka_errors_total, 1);
        let admitted = KAFKA_LOG
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .admit(std::time::Instant::now());
        if let Some(folded) = admitted {
            tracing::warn!(target: "librdkafka", folded, "kafka: {}", self.message);
        }
    }
}

/// Lets one event through per interval and counts the rest.
#[derive(Debug)]
pub(crate) struct RateLimit {
    interval: std::time::Duration,
    last: Option<std::time::Instant>,
    folded: u64,
}

impl RateLimit {
    pub(crate) const fn new(interval: std::time::Duration) -> Self {
        RateLimit {
            interval,
            last: None,
            folded: 0,
        }
    }

    /// An event at `now`: `Some(n)` if it is to be written, `n` being how
    /// many were held back since the last one written; `None` to hold it back.
    pub(crate) fn admit(&mut self, now: std::time::Instant) -> Option<u64> {
        if self
            .last
            .is_some_and(|last| now.saturating_duration_since(last) < self.interval)
        {
            self.folded += 1;
            return None;
        }
        self.last = Some(now);
        Some(std::mem::take(&mut self.folded))
    }
}

/// Facts handed to the producer.
pub fn produced(n: u64) {
    inc(&METRICS.facts_produced_total, n);
}

/// Facts acknowledged by Kafka.
pub fn acked(facts: u64, bytes: u64) {
    inc(&METRICS.facts_acked_total, facts);
    inc(&METRICS.bytes_acked_total, bytes);
}

/// A Kafka transaction of `facts` records committed, with its checkpoint
/// at `through`; `commit` is how long `commit_transaction` took
/// (exactly-once).
pub fn transaction_committed(facts: usize, through: Lsn, open: Duration, commit: Duration) {
    inc(&METRICS.transactions_total, 1);
    tracing::debug!(
        facts,
        checkpoint = %through,
        open_ms = open.as_secs_f64() * 1e3,
        commit_ms = commit.as_secs_f64() * 1e3,
        "Kafka transaction committed"
    );
}

/// The confirmed position moved.
pub fn confirmed() {
    inc(&METRICS.confirms_total, 1);
}

/// Created → acknowledged latency, in microseconds: (interval, whole run).
static LATENCY: std::sync::Mutex<
    Option<(hdrhistogram::Histogram<u64>, hdrhistogram::Histogram<u64>)>,
> = std::sync::Mutex::new(None);

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// Records the latency of a record created at `created_ms` (Unix ms) and
/// acknowledged now. Millisecond resolution: Kafka timestamps are in ms.
pub fn latency_since_ms(created_ms: i64) {
    latencies_since_ms(&[created_ms]);
}

/// Records the latencies of records created at `created_ms` (Unix ms) and
/// acknowledged now (exactly-once: committed now), under one lock.
pub fn latencies_since_ms(created_ms: &[i64]) {
    if created_ms.is_empty() {
        return;
    }
    let now = now_ms();
    let mut g = LATENCY
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if g.is_none() {
        let new = || hdrhistogram::Histogram::new_with_bounds(1, 3_600_000_000, 3);
        let (Ok(a), Ok(b)) = (new(), new()) else {
            return;
        };
        *g = Some((a, b));
    }
    let Some((interval, total)) = g.as_mut() else {
        return;
    };
    for &created in created_ms {
        let us = u64::try_from(now.saturating_sub(created))
            .unwrap_or(0)
            .saturating_mul(1000)
            .max(1);
        let _ = interval.record(us);
        let _ = total.record(us);
    }
}

/// A latency summary: count, p50, p99, p999, max in ms.
#[derive(Debug, Clone, Copy, Default)]
pub struct LatencySummary {
    /// Records measured.
    pub count: u64,
    /// Median, ms.
    pub p50_ms: f64,
    /// 99th percentile, ms.
    pub p99_ms: f64,
    /// 99.9th percentile, ms.
    pub p999_ms: f64,
    /// Maximum, ms.
    pub max_ms: f64,
}

fn summarize(h: &hdrhistogram::Histogram<u64>) -> LatencySummary {
    let ms = |v: u64| v as f64 / 1000.0;
    LatencySummary {
        count: h.len(),
        p50_ms: ms(h.value_at_quantile(0.50)),
        p99_ms: ms(h.value_at_quantile(0.99)),
        p999_ms: ms(h.value_at_quantile(0.999)),
        max_ms: ms(h.max()),
    }
}

/// The latency since the last call (interval) and over the whole run.
pub fn latency(reset_interval: bool) -> (LatencySummary, LatencySummary) {
    let mut g = LATENCY
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    match g.as_mut() {
        Some((interval, total)) => {
            let r = (summarize(interval), summarize(total));
            if reset_interval {
                interval.reset();
            }
            r
        }
        None => Default::default(),
    }
}

/// Logs the whole run's latency (at shutdown).
pub fn emit_latency_summary() {
    let (_, t) = latency(false);
    tracing::info!(
        count = t.count,
        p50_ms = t.p50_ms,
        p99_ms = t.p99_ms,
        p999_ms = t.p999_ms,
        max_ms = t.max_ms,
        "latency created->acked over the run"
    );
}

/// Computes the periodic progress line from the counters.
#[derive(Debug)]
pub struct ProgressReporter {
    last: std::time::Instant,
    last_facts: u64,
    last_bytes: u64,
}

impl Default for ProgressReporter {
    fn default() -> Self {
        Self::new()
    }
}

impl ProgressReporter {
    /// Starts measuring now.
    pub fn new() -> Self {
        ProgressReporter {
            last: std::time::Instant::now(),
            last_facts: METRICS.facts_acked_total.load(Ordering::Relaxed),
            last_bytes: METRICS.bytes_acked_total.load(Ordering::Relaxed),
        }
    }

    /// Logs one progress line: rates since the last call, facts in flight,
    /// the acknowledged (confirmed) LSN and the lag behind the server.
    pub fn emit(&mut self, in_flight: usize, acked: Lsn, server: Lsn) {
        let now = std::time::Instant::now();
        let secs = now.duration_since(self.last).as_secs_f64().max(1e-3);
        let facts = METRICS.facts_acked_total.load(Ordering::Relaxed);
        let bytes = METRICS.bytes_acked_total.load(Ordering::Relaxed);
        let fps = (facts - self.last_facts) as f64 / secs;
        let mbps = (bytes - self.last_bytes) as f64 / secs / 1e6;
        let lag = server.checked_sub(acked).unwrap_or(0);
        let (lat, _) = latency(true);
        tracing::info!(
            facts_per_s = format_args!("{fps:.0}"),
            mb_per_s = format_args!("{mbps:.2}"),
            in_flight,
            acked_lsn = %acked,
            lag_bytes = lag,
            total_acked = facts,
            dead_letters = METRICS.dead_letters_total.load(Ordering::Relaxed),
            p50_ms = lat.p50_ms,
            p99_ms = lat.p99_ms,
            "progress"
        );
        self.last = now;
        self.last_facts = facts;
        self.last_bytes = bytes;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    /// The log flood: about 40 lines a second while Kafka was away.
    #[test]
    fn rate_limit_writes_one_line_per_interval_and_counts_the_rest() {
        let mut r = RateLimit::new(Duration::from_secs(10));
        let t0 = Instant::now();
        assert_eq!(r.admit(t0), Some(0));
        let written = (1..=400u64)
            .filter_map(|i| r.admit(t0 + Duration::from_millis(25 * i)))
            .collect::<Vec<_>>();
        // 400 events over 10 s: the one at exactly 10 s is written.
        assert_eq!(written, [399]);
        assert_eq!(r.admit(t0 + Duration::from_secs(15)), None);
        assert_eq!(r.admit(t0 + Duration::from_secs(20)), Some(1));
    }
}
