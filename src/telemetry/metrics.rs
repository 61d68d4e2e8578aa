//! The metrics registry: every counter, gauge and histogram the relay
//! exports, in one `prometheus-client` [`Registry`], and its rendering in
//! the Prometheus text format for `/metrics`.
//!
//! ```text
//!  events (telemetry::*::emit) ──inc──► METRICS counters ─┐
//!  relay loop ──publish()──► gauges, LSN inputs ──────────┼─► Registry ──encode on scrape──► /metrics
//!  CommitClock ──observe──► commit→ack histogram ─────────┤
//!  health state, /proc/self ──read on scrape (collectors)─┘
//! ```
//!
//! Owns [`METRICS`]: the one home of each counter (the progress line reads
//! the same counters). Derived values (slot lag, ack lag) and the process
//! metrics are computed on each scrape by collectors, off the pipeline's
//! threads.
//!
//! **Invariants**
//! - Names follow Prometheus conventions: `factlib_` or `process_` prefix,
//!   counters end in `_total`, base units (`_seconds`, `_bytes`). The
//!   constants in [`names`] are the exported names; a test checks them
//!   against what is rendered.
//! - No labels: every series is process-wide (nothing per topic or
//!   aggregate).
//! - Updating a metric is a relaxed atomic operation (the histogram takes a
//!   short lock, once per transaction); nothing here can fail or block the
//!   pipeline. A scrape only reads.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::LazyLock;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use super::health;

/// The exported metric names (as they appear in `/metrics`).
pub(crate) mod names {
    /// Facts handed to the producer.
    pub(crate) const FACTS_PRODUCED: &str = "factlib_facts_produced_total";
    /// Facts acknowledged by Kafka (exactly-once: committed).
    pub(crate) const FACTS_RELAYED: &str = "factlib_facts_relayed_total";
    /// Bytes of the facts acknowledged by Kafka: key and value
    /// (exactly-once: with headers, as the sink counts them).
    pub(crate) const RELAYED_BYTES: &str = "factlib_relayed_bytes_total";
    /// Records written to the dead-letter topic.
    pub(crate) const DEAD_LETTERS: &str = "factlib_dead_letters_total";
    /// Updates, deletes and truncates of outbox tables, which are not facts.
    pub(crate) const OUTBOX_SKIPPED: &str = "factlib_outbox_changes_skipped_total";
    /// Records Kafka refused, and Kafka transactions that failed.
    pub(crate) const PRODUCE_ERRORS: &str = "factlib_produce_errors_total";
    /// Client-wide errors and warnings librdkafka reported.
    pub(crate) const KAFKA_ERRORS: &str = "factlib_kafka_errors_total";
    /// Replication connections established.
    pub(crate) const CONNECTIONS: &str = "factlib_replication_connections_total";
    /// Sessions ended by a transient failure, each followed by a reconnect.
    pub(crate) const RECONNECTS: &str = "factlib_reconnects_total";
    /// The attempt number of the latest reconnect in its run of failures
    /// (1 after a healthy session).
    pub(crate) const RECONNECT_ATTEMPT: &str = "factlib_reconnect_attempt";
    /// The wait the latest reconnect chose.
    pub(crate) const RECONNECT_DELAY: &str = "factlib_reconnect_delay_seconds";
    /// Standby status updates that raised the confirmed position.
    pub(crate) const CONFIRMS: &str = "factlib_confirms_total";
    /// Kafka transactions committed (exactly-once).
    pub(crate) const TRANSACTIONS: &str = "factlib_kafka_transactions_total";
    /// Records handed to Kafka and not yet acknowledged.
    pub(crate) const IN_FLIGHT: &str = "factlib_facts_in_flight";
    /// The position confirmed to PostgreSQL, as a number.
    pub(crate) const CONFIRMED_LSN: &str = "factlib_confirmed_lsn";
    /// The server's WAL end minus the confirmed position.
    pub(crate) const SLOT_LAG: &str = "factlib_slot_lag_bytes";
    /// How long the oldest unacknowledged transaction has been committed.
    pub(crate) const ACK_LAG: &str = "factlib_ack_lag_seconds";
    /// PostgreSQL commit → acknowledged by Kafka, per transaction.
    pub(crate) const COMMIT_TO_ACK: &str = "factlib_commit_to_ack_seconds";
    /// 1 while streaming from the slot.
    pub(crate) const STREAMING: &str = "factlib_streaming";
    /// Kafka brokers librdkafka last reported up.
    pub(crate) const BROKERS_UP: &str = "factlib_kafka_brokers_up";
    /// CPU time of the process.
    pub(crate) const CPU: &str = "process_cpu_seconds_total";
    /// Resident memory of the process.
    pub(crate) const RSS: &str = "process_resident_memory_bytes";
    /// Start time of the process, Unix seconds.
    pub(crate) const START_TIME: &str = "process_start_time_seconds";
    /// Open file descriptors of the process.
    pub(crate) const OPEN_FDS: &str = "process_open_fds";
}

/// Bucket bounds of the commit → ack histogram, in seconds: 1 ms to 5 min.
const LATENCY_BUCKETS: [f64; 17] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
    120.0, 300.0,
];

/// Every metric of the process, and the registry that renders them.
pub(crate) struct Metrics {
    pub(crate) facts_produced: Counter,
    pub(crate) facts_relayed: Counter,
    pub(crate) relayed_bytes: Counter,
    pub(crate) dead_letters: Counter,
    pub(crate) outbox_skipped: Counter,
    pub(crate) produce_errors: Counter,
    pub(crate) kafka_errors: Counter,
    pub(crate) connections: Counter,
    pub(crate) reconnects: Counter,
    pub(crate) reconnect_attempt: Gauge,
    pub(crate) reconnect_delay: Gauge<f64, AtomicU64>,
    pub(crate) confirms: Counter,
    pub(crate) transactions: Counter,
    pub(crate) in_flight: Gauge,
    pub(crate) confirmed_lsn: Gauge,
    pub(crate) commit_to_ack: Histogram,
    /// The highest WAL end the server reported (input of the slot lag).
    pub(crate) server_lsn: AtomicU64,
    /// Commit time (Unix µs) of the oldest transaction handed to Kafka and
    /// not yet acknowledged; 0 when there is none (input of the ack lag).
    pub(crate) oldest_unacked_commit_us: AtomicI64,
    registry: Registry,
}

/// The process's metrics.
pub(crate) static METRICS: LazyLock<Metrics> = LazyLock::new(Metrics::new);

/// Registers a counter under its exported name (prometheus-client adds the
/// `_total` itself).
fn counter(registry: &mut Registry, name: &'static str, help: &str) -> Counter {
    let c = Counter::default();
    registry.register(name.strip_suffix("_total").unwrap_or(name), help, c.clone());
    c
}

fn gauge(registry: &mut Registry, name: &'static str, help: &str) -> Gauge {
    let g = Gauge::default();
    registry.register(name, help, g.clone());
    g
}

impl Metrics {
    fn new() -> Self {
        use names::*;
        let mut r = Registry::default();
        let commit_to_ack = Histogram::new(LATENCY_BUCKETS);
        r.register(
            COMMIT_TO_ACK,
            "Time from a transaction's commit in PostgreSQL until Kafka acknowledged all of its facts (and every earlier one), per transaction",
            commit_to_ack.clone(),
        );
        Metrics {
            facts_produced: counter(&mut r, FACTS_PRODUCED, "Facts handed to the Kafka producer"),
            facts_relayed: counter(&mut r, FACTS_RELAYED, "Facts acknowledged by Kafka (exactly-once: in committed transactions)"),
            relayed_bytes: counter(&mut r, RELAYED_BYTES, "Bytes of the facts acknowledged by Kafka: key and value (exactly-once: with headers)"),
            dead_letters: counter(&mut r, DEAD_LETTERS, "Facts sent to the dead-letter topic"),
            outbox_skipped: counter(&mut r, OUTBOX_SKIPPED, "Updates, deletes and truncates of outbox tables, skipped: only inserted rows are facts"),
            produce_errors: counter(&mut r, PRODUCE_ERRORS, "Records Kafka refused and Kafka transactions that failed"),
            kafka_errors: counter(&mut r, KAFKA_ERRORS, "Client-wide errors and warnings librdkafka reported (brokers down, transport failures)"),
            connections: counter(&mut r, CONNECTIONS, "Replication connections established"),
            reconnects: counter(&mut r, RECONNECTS, "Sessions ended by a transient failure and retried"),
            reconnect_attempt: gauge(&mut r, RECONNECT_ATTEMPT, "Attempt number of the latest reconnect in its run of failures; 1 after a healthy session (first message, then 1 s of streaming)"),
            reconnect_delay: {
                let g = Gauge::<f64, AtomicU64>::default();
                r.register(RECONNECT_DELAY, "The wait the latest reconnect chose before its attempt", g.clone());
                g
            },
            confirms: counter(&mut r, CONFIRMS, "Standby status updates that raised the confirmed position"),
            transactions: counter(&mut r, TRANSACTIONS, "Kafka transactions committed (exactly-once)"),
            in_flight: gauge(&mut r, IN_FLIGHT, "Facts handed to Kafka and not yet acknowledged"),
            confirmed_lsn: gauge(&mut r, CONFIRMED_LSN, "The position confirmed to PostgreSQL (the slot's flush LSN), as a number"),
            commit_to_ack,
            server_lsn: AtomicU64::new(0),
            oldest_unacked_commit_us: AtomicI64::new(0),
            registry: {
                r.register_collector(Box::new(Derived));
                r.register_collector(Box::new(Process));
                r
            },
        }
    }
}

/// Renders every metric in the Prometheus text format (version 0.0.4).
pub(crate) fn render() -> String {
    let mut out = String::with_capacity(8 << 10);
    // Writing to a String cannot fail; a collector's error leaves the
    // output cut short, which a scraper reports.
    let registry = match super::role() {
        super::Role::Relay => &METRICS.registry,
        super::Role::Inbox => &super::inbox::INBOX.registry,
    };
    let _ = prometheus_client::encoding::prometheus_text::encode(&mut out, registry);
    out
}

/// The `Content-Type` of [`render`]'s output.
pub(crate) const CONTENT_TYPE: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

/// Microseconds since the Unix epoch, now.
pub(crate) fn unix_us() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// The ack lag in seconds: how long ago the oldest unacknowledged
/// transaction committed, while facts are in flight; 0 otherwise (and
/// never negative, whatever the clocks' skew).
pub(crate) fn ack_lag_seconds(in_flight: i64, oldest_commit_us: i64, now_us: i64) -> f64 {
    if in_flight <= 0 || oldest_commit_us <= 0 {
        return 0.0;
    }
    now_us.saturating_sub(oldest_commit_us).max(0) as f64 / 1e6
}

fn encode_gauge<N>(
    encoder: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    value: N,
) -> Result<(), std::fmt::Error>
where
    N: prometheus_client::encoding::EncodeGaugeValue + Send + Sync + std::fmt::Debug + 'static,
{
    let g = ConstGauge::new(value);
    g.encode(encoder.encode_descriptor(name, help, None, g.metric_type())?)
}

/// Values computed on each scrape from the pipeline's state.
#[derive(Debug)]
struct Derived;

impl Collector for Derived {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        let m = &*METRICS;
        let confirmed = u64::try_from(m.confirmed_lsn.get()).unwrap_or(0);
        let server = m.server_lsn.load(Ordering::Relaxed);
        let lag = if server == 0 {
            0
        } else {
            server.saturating_sub(confirmed)
        };
        encode_gauge(
            &mut encoder,
            names::SLOT_LAG,
            "The server's WAL end (from its keepalives) minus the confirmed position",
            lag,
        )?;
        let ack_lag = ack_lag_seconds(
            m.in_flight.get(),
            m.oldest_unacked_commit_us.load(Ordering::Relaxed),
            unix_us(),
        );
        encode_gauge(
            &mut encoder,
            names::ACK_LAG,
            "While facts are in flight: now minus the commit time of the oldest transaction not yet acknowledged by Kafka; 0 otherwise",
            ack_lag,
        )?;
        let state = health::snapshot();
        encode_gauge(
            &mut encoder,
            names::STREAMING,
            "1 while the relay streams from its replication slot",
            u64::from(state.streaming),
        )?;
        encode_gauge(
            &mut encoder,
            names::BROKERS_UP,
            "Kafka brokers librdkafka reported up in its last statistics",
            u64::try_from(state.brokers_up).unwrap_or(0),
        )
    }
}

/// Standard process metrics, read from `/proc/self` on each scrape (Linux
/// only; a value that cannot be read is left out).
#[derive(Debug)]
pub(crate) struct Process;

/// The kernel reports CPU times in `/proc` in USER_HZ, which is 100 on
/// every Linux ABI.
const USER_HZ: f64 = 100.0;

impl Collector for Process {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        let stat = std::fs::read_to_string("/proc/self/stat")
            .ok()
            .and_then(|s| ProcStat::parse(&s));
        if let Some(stat) = &stat {
            let cpu = ConstCounter::new((stat.utime + stat.stime) as f64 / USER_HZ);
            cpu.encode(encoder.encode_descriptor(
                names::CPU.strip_suffix("_total").unwrap_or(names::CPU),
                "Total user and system CPU time spent in seconds",
                None,
                cpu.metric_type(),
            )?)?;
        }
        let rss = std::fs::read_to_string("/proc/self/status")
            .ok()
            .and_then(|s| status_kib(&s, "VmRSS:"));
        if let Some(kib) = rss {
            encode_gauge(
                &mut encoder,
                names::RSS,
                "Resident memory size in bytes",
                kib.saturating_mul(1024),
            )?;
        }
        let boot = std::fs::read_to_string("/proc/stat")
            .ok()
            .and_then(|s| boot_time(&s));
        if let (Some(stat), Some(boot)) = (&stat, boot) {
            encode_gauge(
                &mut encoder,
                names::START_TIME,
                "Start time of the process since the Unix epoch in seconds",
                boot as f64 + stat.starttime as f64 / USER_HZ,
            )?;
        }
        if let Ok(fds) = std::fs::read_dir("/proc/self/fd") {
            encode_gauge(
                &mut encoder,
                names::OPEN_FDS,
                "Number of open file descriptors",
                fds.count() as u64,
            )?;
        }
        Ok(())
    }
}

/// The fields of `/proc/self/stat` the process metrics use.
#[derive(Debug, PartialEq, Eq)]
struct ProcStat {
    utime: u64,
    stime: u64,
    starttime: u64,
}

impl ProcStat {
    /// Parses `/proc/<pid>/stat`. The command name (field 2) is in
    /// parentheses and may itself hold spaces and parentheses, so fields are
    /// counted from the last `)`.
    fn parse(s: &str) -> Option<Self> {
        let rest = &s[s.rfind(')')? + 1..];
        // Field 3 (state) is the first after the name.
        let f: Vec<&str> = rest.split_whitespace().collect();
        let field = |n: usize| f.get(n - 3)?.parse::<u64>().ok();
        Some(ProcStat {
            utime: field(14)?,
            stime: field(15)?,
            starttime: field(22)?,
        })
    }
}

/// A `kB` value of `/proc/self/status`.
fn status_kib(s: &str, key: &str) -> Option<u64> {
    s.lines()
        .find_map(|l| l.strip_prefix(key))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// `btime` of `/proc/stat`: boot time in Unix seconds.
fn boot_time(s: &str) -> Option<u64> {
    s.lines()
        .find_map(|l| l.strip_prefix("btime "))?
        .trim()
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each `# TYPE` line of a rendering: (name, type).
    fn families(text: &str) -> Vec<(String, String)> {
        text.lines()
            .filter_map(|l| l.strip_prefix("# TYPE "))
            .map(|l| {
                let (n, t) = l.split_once(' ').unwrap();
                (n.to_owned(), t.to_owned())
            })
            .collect()
    }

    #[test]
    fn names_follow_prometheus_conventions() {
        let text = render();
        let families = families(&text);
        assert!(families.len() >= 20, "{text}");
        for (name, kind) in &families {
            assert!(
                name.starts_with("factlib_") || name.starts_with("process_"),
                "{name}: no namespace"
            );
            assert!(
                name.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_'),
                "{name}: not snake_case"
            );
            assert_eq!(
                kind == "counter",
                name.ends_with("_total"),
                "{name} ({kind}): counters, and only they, end in _total"
            );
            for unit in ["_ms", "_milliseconds", "_kb", "_kib", "_mb", "_percent"] {
                assert!(!name.contains(unit), "{name}: not a base unit");
            }
        }
        // Each sample belongs to a declared family, and carries no labels
        // beyond a histogram's `le`.
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let series = line.split([' ', '{']).next().unwrap();
            let family = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| series.strip_suffix(s))
                .filter(|f| families.iter().any(|(n, _)| n == f))
                .unwrap_or(series);
            assert!(
                families.iter().any(|(n, _)| n == family),
                "{series} has no # TYPE"
            );
            if let Some(labels) = line.split_once('{').map(|(_, l)| l) {
                assert!(labels.starts_with("le=\""), "{line}: a label");
            }
        }
    }

    #[test]
    fn every_name_constant_is_rendered_with_its_type() {
        use names::*;
        let families = families(&render());
        let kind = |n: &str| {
            families
                .iter()
                .find(|(f, _)| f == n)
                .map(|(_, t)| t.as_str())
        };
        for c in [
            FACTS_PRODUCED,
            FACTS_RELAYED,
            RELAYED_BYTES,
            DEAD_LETTERS,
            PRODUCE_ERRORS,
            KAFKA_ERRORS,
            CONNECTIONS,
            RECONNECTS,
            CONFIRMS,
            TRANSACTIONS,
            CPU,
        ] {
            assert_eq!(kind(c), Some("counter"), "{c}");
        }
        for g in [
            IN_FLIGHT,
            CONFIRMED_LSN,
            SLOT_LAG,
            ACK_LAG,
            STREAMING,
            BROKERS_UP,
            RECONNECT_ATTEMPT,
            RECONNECT_DELAY,
            RSS,
            START_TIME,
            OPEN_FDS,
        ] {
            assert_eq!(kind(g), Some("gauge"), "{g}");
        }
        assert_eq!(kind(COMMIT_TO_ACK), Some("histogram"));
    }

    #[test]
    fn the_ack_lag_counts_only_while_facts_are_in_flight() {
        let s = 1_000_000;
        assert_eq!(ack_lag_seconds(0, 5 * s, 9 * s), 0.0);
        assert_eq!(ack_lag_seconds(3, 0, 9 * s), 0.0);
        assert_eq!(ack_lag_seconds(3, 5 * s, 9 * s), 4.0);
        assert_eq!(ack_lag_seconds(3, 9 * s, 5 * s), 0.0, "clock skew");
    }

    #[test]
    fn proc_stat_fields_are_counted_from_the_last_parenthesis() {
        // A command name with spaces and parentheses.
        let mut line = String::from("4242 (fact (lib) x) S");
        for n in 4..=52 {
            line.push_str(&format!(" {n}"));
        }
        assert_eq!(
            ProcStat::parse(&line),
            Some(ProcStat {
                utime: 14,
                stime: 15,
                starttime: 22
            })
        );
        assert_eq!(ProcStat::parse("4242 (x) S 1 2"), None);
        assert_eq!(ProcStat::parse("garbage"), None);
        assert_eq!(
            status_kib("Name:\tx\nVmRSS:\t  1234 kB\n", "VmRSS:"),
            Some(1234)
        );
        assert_eq!(
            boot_time("cpu 1 2\nbtime 1700000000\n"),
            Some(1_700_000_000)
        );
    }

    #[test]
    fn process_metrics_are_read_from_proc() {
        let text = render();
        let value = |name: &str| -> f64 {
            text.lines()
                .find_map(|l| l.strip_prefix(&format!("{name} ")))
                .unwrap_or_else(|| panic!("{name} missing:\n{text}"))
                .parse()
                .unwrap()
        };
        assert!(value(names::RSS) > 0.0);
        assert!(value(names::OPEN_FDS) >= 3.0);
        assert!(value(names::START_TIME) > 1.6e9);
        assert!(value(names::CPU) >= 0.0);
    }
}
