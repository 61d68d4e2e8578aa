//! Metrics and events: each event is one struct whose `emit()` writes the
//! log line and updates the metric together; the metrics are served on
//! `--metrics-addr` with `/healthz` and `/readyz`.
//!
//! ```text
//!  relay/source/sink ──Event::emit()──► tracing (stderr) + metrics::METRICS
//!  relay loop ──publish()──► gauges;  CommitClock ──► commit→ack histogram, ack lag
//!  loops ──Beat::tick()──► health (liveness);  session, librdkafka ──► health (readiness)
//!  http (own thread) ──reads──► /metrics, /healthz, /readyz
//!  relay ──ProgressLine::emit()──► one line every --progress-interval-secs
//! ```
//!
//! Owns every metric (`metrics`), the liveness and readiness state
//! (`health`), the commit → ack timing (`lag`) and the HTTP endpoint
//! (`http`); the rest of the crate only reports into them.
//!
//! **Invariants**
//! - Telemetry never changes behaviour: no event can fail or block.
//! - Counter names are constants ending in `_total`; there are no labels
//!   (nothing per topic or aggregate).

mod health;
mod http;
mod inbox;
mod lag;
mod metrics;

pub(crate) use health::{spawn_heartbeat, Beat, KAFKA_STATS_INTERVAL};
pub(crate) use http::serve;
pub use http::{MetricsSettings, TelemetryError};
pub(crate) use inbox::{
    inbox_partition_released, inbox_stable_offsets, inbox_written_through, InboxBatch,
    InboxDeadLetter, InboxProgress, InboxRetention,
};
pub(crate) use lag::CommitClock;

use std::sync::OnceLock;
use std::time::Duration;

use crate::lsn::Lsn;
use metrics::METRICS;

/// Which command this process runs: it decides what `/metrics` serves and
/// what `/readyz` waits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Role {
    /// `factlib relay`: the relay's metrics; ready while streaming.
    Relay,
    /// `factlib inbox`: the inbox's metrics; ready while consuming.
    Inbox,
}

static ROLE: OnceLock<Role> = OnceLock::new();

/// Sets this process's role, once, before serving metrics; later calls
/// are ignored.
pub(crate) fn set_role(role: Role) {
    let _ = ROLE.set(role);
}

/// This process's role (the relay unless set).
pub(crate) fn role() -> Role {
    ROLE.get().copied().unwrap_or(Role::Relay)
}

/// Connected and working (relay: streaming from the slot; inbox:
/// consuming into its database), or not any more.
pub(crate) fn set_working(on: bool) {
    health::set_streaming(on);
}

/// Connected to PostgreSQL and streaming.
pub struct Connected<'a> {
    /// Slot name.
    pub slot: &'a str,
    /// `host:port` of the server.
    pub server: &'a str,
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
        METRICS.connections.inc();
        health::set_streaming(true);
        tracing::info!(slot = self.slot, server = self.server, backend_pid = self.backend_pid, start = %self.start, transport = self.transport, "streaming from slot");
    }
}

/// A transient failure (the replication connection lost, Kafka
/// unreachable) ended a session; the relay waits for what is in flight,
/// then streams again from the last confirmed position.
pub struct Interrupted<'a, E: std::fmt::Display> {
    /// Why.
    pub error: &'a E,
    /// The next attempt's number in this run of failures (1 after a
    /// healthy session).
    pub attempt: u32,
    /// Wait before the next attempt.
    pub retry_in: Duration,
    /// How long the session streamed after its first message; `None` if
    /// start-up never got that far.
    pub streamed: Option<Duration>,
}

impl<E: std::fmt::Display> Interrupted<'_, E> {
    /// Logs, counts, and publishes the attempt and its delay.
    pub fn emit(&self) {
        METRICS.reconnects.inc();
        METRICS.reconnect_attempt.set(i64::from(self.attempt));
        METRICS.reconnect_delay.set(self.retry_in.as_secs_f64());
        let streamed_ms = self.streamed.map(millis);
        tracing::warn!(error = %self.error, attempt = self.attempt, retry_in_ms = millis(self.retry_in), streamed_ms, "transient failure; retrying once the facts in flight are acknowledged, from the last confirmed position");
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Another process streams from the slot: the relay waits as a standby.
pub struct Standby<'a, E: std::fmt::Display> {
    /// Who holds the slot.
    pub error: &'a E,
    /// How often the relay checks the slot.
    pub poll: std::time::Duration,
}

impl<E: std::fmt::Display> Standby<'_, E> {
    /// Logs, once per wait.
    pub fn emit(&self) {
        tracing::info!(
            poll_ms = u64::try_from(self.poll.as_millis()).unwrap_or(u64::MAX),
            "standby: {}; waiting, and taking over once the slot is free",
            self.error
        );
    }
}

/// A standby found the slot free and streams from it now.
pub struct TookOver<'a> {
    /// The slot.
    pub slot: &'a str,
    /// How long it waited as a standby.
    pub waited: std::time::Duration,
}

impl TookOver<'_> {
    /// Logs.
    pub fn emit(&self) {
        tracing::info!(
            slot = self.slot,
            waited_ms = u64::try_from(self.waited.as_millis()).unwrap_or(u64::MAX),
            "standby: the slot is free; taking over"
        );
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
        METRICS.dead_letters.inc();
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
        METRICS.kafka_errors.inc();
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
    METRICS.facts_produced.inc_by(n);
}

/// Facts acknowledged by Kafka.
pub fn acked(facts: u64, bytes: u64) {
    METRICS.facts_relayed.inc_by(facts);
    METRICS.relayed_bytes.inc_by(bytes);
}

/// Kafka refused a record, or a Kafka transaction failed (the relay says
/// what it does about it).
pub(crate) fn produce_failed() {
    METRICS.produce_errors.inc();
}

/// The replication stream ended (the session is over; the relay may
/// connect again).
pub(crate) fn stream_ended() {
    health::set_streaming(false);
}

/// The stream has skipped `total` changes of outbox tables so far (a
/// count that never decreases).
pub(crate) fn outbox_skipped(total: u64) {
    let c = &METRICS.outbox_skipped;
    c.inc_by(total.saturating_sub(c.get()));
}

/// The relay's position, published on each pass of its loop: facts handed
/// to Kafka and not yet acknowledged, the position confirmed to the
/// server, and the server's WAL end.
pub(crate) fn publish(in_flight: usize, confirmed: Lsn, server: Lsn) {
    METRICS
        .in_flight
        .set(i64::try_from(in_flight).unwrap_or(i64::MAX));
    METRICS
        .confirmed_lsn
        .set(i64::try_from(confirmed.0).unwrap_or(i64::MAX));
    METRICS
        .server_lsn
        .store(server.0, std::sync::atomic::Ordering::Relaxed);
}

/// librdkafka's statistics: `up` of `total` brokers are connected.
pub(crate) struct KafkaBrokers {
    /// Brokers in state UP.
    pub(crate) up: usize,
    /// Brokers known (bootstrap and learned).
    pub(crate) total: usize,
}

impl KafkaBrokers {
    /// Records the state for `/readyz` and the brokers-up gauge.
    pub(crate) fn emit(&self) {
        health::kafka_brokers(self.up);
        tracing::trace!(
            target: "librdkafka",
            up = self.up,
            total = self.total,
            "broker states"
        );
    }
}

/// librdkafka reported that every broker is down: counted as a Kafka
/// error, and `/readyz` fails until a broker is reported up again.
pub(crate) fn kafka_all_brokers_down() {
    health::kafka_all_down();
}

/// A Kafka transaction of `facts` records committed, with its checkpoint
/// at `through`; `commit` is how long `commit_transaction` took
/// (exactly-once).
pub fn transaction_committed(facts: usize, through: Lsn, open: Duration, commit: Duration) {
    METRICS.transactions.inc();
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
    METRICS.confirms.inc();
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
            last_facts: METRICS.facts_relayed.get(),
            last_bytes: METRICS.relayed_bytes.get(),
        }
    }

    /// Logs one progress line: rates since the last call, facts in flight,
    /// the acknowledged (confirmed) LSN and the lag behind the server.
    pub fn emit(&mut self, in_flight: usize, acked: Lsn, server: Lsn) {
        let now = std::time::Instant::now();
        let secs = now.duration_since(self.last).as_secs_f64().max(1e-3);
        let facts = METRICS.facts_relayed.get();
        let bytes = METRICS.relayed_bytes.get();
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
            dead_letters = METRICS.dead_letters.get(),
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
