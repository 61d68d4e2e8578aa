//! The inbox's metrics and events (`factlib inbox`), in a registry of their
//! own: an inbox process serves these, a relay process the relay's.
//!
//! ```text
//!  writer ──InboxBatch::emit──► facts written, duplicates, dead letters, batch seconds
//!         ──inbox_written_through──► next offset per partition ─┐
//!  librdkafka statistics ──inbox_stable_offsets──► LSO per partition ┴─► lag per partition (on scrape)
//!  retention ──InboxRetention::emit──► rows deleted
//! ```
//!
//! **Invariants**
//! - The lag series carry two labels, `topic` and `partition`, from the
//!   bounded set of partitions this process holds; a released partition's
//!   series is removed.
//! - Shared metrics (Kafka errors, reconnects, brokers up, process) are the
//!   relay registry's own handles, registered here too: one value each.

use std::collections::BTreeMap;
use std::sync::{LazyLock, Mutex, PoisonError};
use std::time::Duration;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

use super::metrics::{names, METRICS};

/// The exported names of the inbox's own metrics.
pub(crate) mod inbox_names {
    /// Facts written into `factlib.inbox`.
    pub(crate) const FACTS_WRITTEN: &str = "factlib_inbox_facts_written_total";
    /// Facts whose id was in the inbox already (a replay), not written.
    pub(crate) const DUPLICATES: &str = "factlib_inbox_duplicates_total";
    /// Records written to `factlib.inbox_dead_letters`.
    pub(crate) const DEAD_LETTERS: &str = "factlib_inbox_dead_letters_total";
    /// Batches committed.
    pub(crate) const BATCHES: &str = "factlib_inbox_batches_total";
    /// Time to write one batch (its transaction).
    pub(crate) const BATCH_SECONDS: &str = "factlib_inbox_batch_seconds";
    /// Processed rows deleted by `--inbox-retention`.
    pub(crate) const RETENTION_DELETED: &str = "factlib_inbox_retention_deleted_total";
    /// Records behind the partition's end, per partition.
    pub(crate) const LAG: &str = "factlib_inbox_lag_records";
    /// 1 while connected to the inbox database and consuming.
    pub(crate) const CONSUMING: &str = "factlib_inbox_consuming";
}

/// Bucket bounds of the batch histogram, in seconds: 0.5 ms to 10 s.
const BATCH_BUCKETS: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// Per partition held (topic, partition): the next offset written and the
/// last stable offset.
type Positions = BTreeMap<(String, i32), (Option<i64>, Option<i64>)>;

/// The inbox's metrics and their registry.
pub(crate) struct InboxMetrics {
    pub(crate) facts_written: Counter,
    pub(crate) duplicates: Counter,
    pub(crate) dead_letters: Counter,
    pub(crate) batches: Counter,
    pub(crate) batch_seconds: Histogram,
    pub(crate) retention_deleted: Counter,
    partitions: Mutex<Positions>,
    pub(crate) registry: Registry,
}

pub(crate) static INBOX: LazyLock<InboxMetrics> = LazyLock::new(InboxMetrics::new);

impl InboxMetrics {
    fn new() -> Self {
        use inbox_names::*;
        let mut r = Registry::default();
        let mut counter = |name: &'static str, help: &str| {
            let c = Counter::default();
            r.register(name.strip_suffix("_total").unwrap_or(name), help, c.clone());
            c
        };
        let facts_written = counter(FACTS_WRITTEN, "Facts written into factlib.inbox");
        let duplicates = counter(DUPLICATES, "Facts already in factlib.inbox (the same id read again: a replay or an at-least-once relay), not written again");
        let dead_letters = counter(DEAD_LETTERS, "Records written to factlib.inbox_dead_letters: not a Factlib envelope, a required field missing, an id that is not a UUID");
        let batches = counter(BATCHES, "Batches committed (one database transaction each)");
        let retention_deleted = counter(
            RETENTION_DELETED,
            "Processed rows deleted from factlib.inbox by --inbox-retention",
        );
        let batch_seconds = Histogram::new(BATCH_BUCKETS);
        r.register(
            BATCH_SECONDS,
            "Time to write one batch: its facts, dead letters and offsets in one transaction",
            batch_seconds.clone(),
        );
        let m = &*METRICS;
        let shared: [(&str, &str, Counter); 2] = [
            (names::KAFKA_ERRORS, "Client-wide errors and warnings librdkafka reported (brokers down, transport failures)", m.kafka_errors.clone()),
            (names::RECONNECTS, "Sessions ended by a transient failure and retried", m.reconnects.clone()),
        ];
        for (name, help, c) in shared {
            r.register(name.strip_suffix("_total").unwrap_or(name), help, c);
        }
        r.register(
            names::RECONNECT_ATTEMPT,
            "Attempt number of the latest reconnect in its run of failures; 1 after a healthy session",
            m.reconnect_attempt.clone(),
        );
        r.register(
            names::RECONNECT_DELAY,
            "The wait the latest reconnect chose before its attempt",
            m.reconnect_delay.clone(),
        );
        r.register_collector(Box::new(InboxDerived));
        r.register_collector(Box::new(super::metrics::Process));
        InboxMetrics {
            facts_written,
            duplicates,
            dead_letters,
            batches,
            batch_seconds,
            retention_deleted,
            partitions: Mutex::new(BTreeMap::new()),
            registry: r,
        }
    }

    fn partitions(&self) -> std::sync::MutexGuard<'_, Positions> {
        self.partitions
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }
}

/// The lag per partition and the consuming/brokers gauges, on scrape.
#[derive(Debug)]
struct InboxDerived;

impl Collector for InboxDerived {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        let state = super::health::snapshot();
        for (name, help, value) in [
            (
                inbox_names::CONSUMING,
                "1 while connected to the inbox database and consuming from Kafka",
                i64::from(state.streaming),
            ),
            (
                names::BROKERS_UP,
                "Kafka brokers librdkafka reported up in its last statistics",
                state.brokers_up,
            ),
        ] {
            let g = ConstGauge::new(value);
            g.encode(encoder.encode_descriptor(name, help, None, g.metric_type())?)?;
        }
        let lags: Vec<((String, i32), i64)> = INBOX
            .partitions()
            .iter()
            .filter_map(|(k, (next, stable))| Some((k.clone(), lag(*next, (*stable)?))))
            .collect();
        let mut family = encoder.encode_descriptor(
            inbox_names::LAG,
            "Records between the next offset written to the inbox and the partition's last stable offset (read_committed end), per partition held",
            None,
            MetricType::Gauge,
        )?;
        for ((topic, partition), lag) in lags {
            let labels = [("topic", topic), ("partition", partition.to_string())];
            let g = ConstGauge::new(lag);
            g.encode(family.encode_family(&labels)?)?;
        }
        Ok(())
    }
}

/// Records between `next` (none written yet: 0) and the stable end.
fn lag(next: Option<i64>, stable: i64) -> i64 {
    stable.saturating_sub(next.unwrap_or(0)).max(0)
}

/// One batch committed.
pub(crate) struct InboxBatch {
    pub(crate) facts: u64,
    pub(crate) duplicates: u64,
    pub(crate) dead: u64,
    pub(crate) took: Duration,
}

impl InboxBatch {
    /// Counts; a duplicate or a dead letter is also logged (at most once
    /// per batch).
    pub(crate) fn emit(&self) {
        let m = &*INBOX;
        m.facts_written.inc_by(self.facts);
        m.duplicates.inc_by(self.duplicates);
        m.dead_letters.inc_by(self.dead);
        m.batches.inc();
        m.batch_seconds.observe(self.took.as_secs_f64());
        if self.duplicates > 0 {
            tracing::info!(
                duplicates = self.duplicates,
                "inbox: facts already in the inbox were read again (a replay or an at-least-once relay); dropped"
            );
        }
    }
}

/// A record that is not a fact the inbox can hold; it goes to the
/// dead-letter table with its batch.
pub(crate) struct InboxDeadLetter<'a> {
    pub(crate) topic: &'a str,
    pub(crate) partition: i32,
    pub(crate) offset: i64,
    pub(crate) error: &'a str,
}

impl InboxDeadLetter<'_> {
    /// Logs; counted once written ([`InboxBatch`]).
    pub(crate) fn emit(&self) {
        tracing::warn!(
            topic = self.topic,
            partition = self.partition,
            offset = self.offset,
            error = self.error,
            "inbox: record is not a fact; writing it to factlib.inbox_dead_letters and going on"
        );
    }
}

/// Retention deleted `rows` processed rows.
pub(crate) struct InboxRetention {
    pub(crate) rows: u64,
    pub(crate) older_than: Duration,
}

impl InboxRetention {
    pub(crate) fn emit(&self) {
        INBOX.retention_deleted.inc_by(self.rows);
        if self.rows > 0 {
            tracing::info!(
                rows = self.rows,
                older_than_s = self.older_than.as_secs(),
                "inbox retention: deleted processed facts"
            );
        }
    }
}

/// Partition `topic`/`partition` is written up to (not including) `next`.
pub(crate) fn inbox_written_through(topic: &str, partition: i32, next: i64) {
    INBOX
        .partitions()
        .entry((topic.to_owned(), partition))
        .or_default()
        .0 = Some(next);
}

/// The partition is no longer held: its lag series goes.
pub(crate) fn inbox_partition_released(topic: &str, partition: i32) {
    INBOX.partitions().remove(&(topic.to_owned(), partition));
}

/// librdkafka's statistics: the last stable offset of each partition
/// consumed. Partitions not held are ignored.
pub(crate) fn inbox_stable_offsets(offsets: impl IntoIterator<Item = (String, i32, i64)>) {
    let mut parts = INBOX.partitions();
    for (topic, partition, lso) in offsets {
        if lso < 0 {
            continue;
        }
        if let Some(e) = parts.get_mut(&(topic, partition)) {
            e.1 = Some(lso);
        }
    }
}

/// The inbox's progress line, from its counters.
#[derive(Debug)]
pub(crate) struct InboxProgress {
    last: std::time::Instant,
    last_facts: u64,
}

impl InboxProgress {
    pub(crate) fn new() -> Self {
        InboxProgress {
            last: std::time::Instant::now(),
            last_facts: INBOX.facts_written.get(),
        }
    }

    /// Logs one line: facts per second since the last, totals, and the
    /// summed lag.
    pub(crate) fn emit(&mut self) {
        let now = std::time::Instant::now();
        let secs = now.duration_since(self.last).as_secs_f64().max(1e-3);
        let m = &*INBOX;
        let facts = m.facts_written.get();
        let lag: i64 = m
            .partitions()
            .values()
            .filter_map(|(next, stable)| Some(lag(*next, (*stable)?)))
            .sum();
        tracing::info!(
            facts_per_s = format_args!("{:.0}", (facts - self.last_facts) as f64 / secs),
            total_written = facts,
            duplicates = m.duplicates.get(),
            dead_letters = m.dead_letters.get(),
            lag_records = lag,
            "inbox progress"
        );
        self.last = now;
        self.last_facts = facts;
    }
}
