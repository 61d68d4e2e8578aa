//! The checkpoint topic of exactly-once delivery: `{prefix}.checkpoints`,
//! compacted, one partition. Each Kafka transaction writes one record there
//! naming the position its last PostgreSQL unit ends at; on start the relay
//! reads it back (`read_committed`) to know what is already in Kafka.
//!
//! ```text
//!  key   {"system_id":"7301…","database":"app","slot":"factlib"}     (one source)
//!  value {"lsn":"0/16B3748","relay":"factlib 0.1.0"}                  (C: the end of the last unit committed)
//! ```
//!
//! **Invariants**
//! - The key is a pure function of the source (system identifier, database,
//!   slot), byte for byte, so compaction keeps the newest checkpoint of each
//!   source and readers find it again.
//! - C is the *end* of the last unit in the transaction: `Commit.end_lsn`
//!   for a PostgreSQL transaction, the message's reported LSN (the end of
//!   its WAL record) for a lone one. Ends of different units never coincide;
//!   commit LSNs can (a lone message's reported LSN can equal the next
//!   transaction's commit LSN). See [`Checkpoint::covers`].
//! - [`read`] returns only checkpoints of committed transactions
//!   (`isolation.level=read_committed`): the newest one under the key, up
//!   to the end of the partition.

use std::time::{Duration, Instant};

use bytes::Bytes;
use rdkafka::client::ClientContext;
use rdkafka::config::{ClientConfig, RDKafkaLogLevel};
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};
use serde::{Deserialize, Serialize};

use super::{KafkaProducer, SinkError, SinkSettings};
use crate::lsn::Lsn;

/// The source a checkpoint belongs to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Source {
    /// The cluster's system identifier (`IDENTIFY_SYSTEM`).
    pub system_id: String,
    /// The database name.
    pub database: String,
    /// The replication slot.
    pub slot: String,
}

impl Source {
    /// The record key naming this source.
    pub fn key(&self) -> Bytes {
        // Serializing three strings cannot fail.
        Bytes::from(serde_json::to_vec(self).unwrap_or_default())
    }
}

#[derive(Serialize, Deserialize)]
struct Value {
    lsn: String,
    relay: String,
}

/// The checkpoint value for C = `through`.
pub fn value(through: Lsn) -> Bytes {
    let v = Value {
        lsn: through.to_string(),
        relay: concat!("factlib ", env!("CARGO_PKG_VERSION")).to_owned(),
    };
    Bytes::from(serde_json::to_vec(&v).unwrap_or_default())
}

/// What is already in Kafka for one source: every unit ending at or before
/// C.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Checkpoint(pub Lsn);

impl Checkpoint {
    /// True if a fact at `lsn` (its own reported LSN), in a transaction
    /// committed at `commit_lsn` (`None` for a lone fact), belongs to a unit
    /// that ends at or before C, and so is already in Kafka.
    ///
    /// A transaction's commit record starts at `commit_lsn` and ends at its
    /// unit's end, so its unit ends at or before C exactly when
    /// `commit_lsn < C` (records do not overlap, and C is some unit's end).
    /// A lone message's reported LSN is its unit's end.
    pub fn covers(self, lsn: Lsn, commit_lsn: Option<Lsn>) -> bool {
        match commit_lsn {
            Some(commit) => commit < self.0,
            None => lsn <= self.0,
        }
    }
}

/// Parses a checkpoint value.
pub fn parse(value: &[u8]) -> Result<Lsn, String> {
    let v: Value = serde_json::from_slice(value).map_err(|e| e.to_string())?;
    v.lsn
        .parse()
        .map_err(|_| format!("{:?} is not an LSN", v.lsn))
}

/// True if `topic` holds no record at all, asked through `client`, an
/// open connection: then there is no checkpoint, and [`read`] (a consumer
/// of its own, about 70 ms to connect and more to close here) can be
/// skipped. A first start meets an empty topic.
pub fn holds_nothing(
    client: &KafkaProducer,
    topic: &str,
    timeout: Duration,
) -> Result<bool, SinkError> {
    let (low, high) = client
        .watermarks(topic, 0, timeout)
        .map_err(|e| client.or_refused(reading(topic)(e)))?;
    Ok(high <= low)
}

/// The first window [`read`] reads back from the end of the partition;
/// each next one reaches twice as far back.
const FIRST_WINDOW: i64 = 64;

/// Returns the newest checkpoint under `key` in `topic` (partition 0), read
/// with `read_committed`, if any. Blocks up to about twice `timeout`. A
/// missing topic is [`SinkError::CheckpointTopicMissing`].
///
/// It reads back from the end in windows that double, so a start reads
/// only as far back as the newest record for the key (the first window
/// that holds one), not the whole topic: its newest segment is never
/// compacted, and one relay commits up to ten transactions a second.
pub fn read(
    sink: &SinkSettings,
    topic: &str,
    key: &[u8],
    timeout: Duration,
) -> Result<Option<Lsn>, SinkError> {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &sink.brokers)
        .set("group.id", "factlib-checkpoint-reader")
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "true")
        .set("isolation.level", "read_committed")
        // The broker holds a fetch that finds nothing new for this long;
        // the default (500 ms) would be added to every start.
        .set("fetch.wait.max.ms", "10");
    sink.security.apply(&mut c);
    for (k, v) in sink.extra.iter().filter(|(k, _)| is_client_property(k)) {
        c.set(k, v);
    }
    let consumer: BaseConsumer<Quiet> = c
        .create_with_context(Quiet::default())
        .map_err(SinkError::Config)?;
    // A failure after the brokers refused the credentials is that refusal.
    newest(&consumer, topic, key, timeout).map_err(|e| consumer.context().refusal().unwrap_or(e))
}

/// [`read`] with its consumer.
fn newest(
    consumer: &BaseConsumer<Quiet>,
    topic: &str,
    key: &[u8],
    timeout: Duration,
) -> Result<Option<Lsn>, SinkError> {
    let kafka = reading(topic);
    let md = consumer
        .fetch_metadata(Some(topic), timeout)
        .map_err(kafka)?;
    let exists = md
        .topics()
        .iter()
        .any(|t| t.name() == topic && t.error().is_none() && !t.partitions().is_empty());
    if !exists {
        return Err(SinkError::CheckpointTopicMissing(topic.to_owned()));
    }
    let (low, high) = consumer
        .fetch_watermarks(topic, 0, timeout)
        .map_err(kafka)?;
    let deadline = Instant::now() + timeout;
    let mut end = high;
    let mut window = FIRST_WINDOW;
    while end > low {
        let start = end.saturating_sub(window).max(low);
        let found = newest_in(consumer, topic, key, start..end, deadline)?;
        if found.is_some() {
            return Ok(found);
        }
        end = start;
        window = window.saturating_mul(2);
    }
    Ok(None)
}

/// A Kafka error while reading `topic`.
fn reading(topic: &str) -> impl Fn(KafkaError) -> SinkError + Copy + '_ {
    move |source| SinkError::Checkpoint {
        topic: topic.to_owned(),
        source,
    }
}

/// The newest checkpoint under `key` at an offset in `offsets`.
fn newest_in(
    consumer: &BaseConsumer<Quiet>,
    topic: &str,
    key: &[u8],
    offsets: std::ops::Range<i64>,
    deadline: Instant,
) -> Result<Option<Lsn>, SinkError> {
    let kafka = reading(topic);
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(topic, 0, Offset::Offset(offsets.start))
        .map_err(kafka)?;
    consumer.assign(&tpl).map_err(kafka)?;
    let mut found = None;
    loop {
        if Instant::now() >= deadline {
            return Err(kafka(KafkaError::MessageConsumption(
                RDKafkaErrorCode::OperationTimedOut,
            )));
        }
        // Records of aborted transactions and transaction markers are not
        // delivered, so the window ends at the first record past it or at
        // the end of what is committed.
        match consumer.poll(Duration::from_millis(200)) {
            None => {}
            Some(Err(KafkaError::PartitionEOF(_))) => return Ok(found),
            Some(Err(e)) => return Err(kafka(e)),
            Some(Ok(m)) if m.offset() >= offsets.end => return Ok(found),
            Some(Ok(m)) => {
                if m.key() == Some(key) {
                    let value = m.payload().unwrap_or_default();
                    found = Some(parse(value).map_err(|detail| SinkError::CheckpointCorrupt {
                        topic: topic.to_owned(),
                        offset: m.offset(),
                        detail,
                    })?);
                }
                if m.offset() + 1 >= offsets.end {
                    return Ok(found);
                }
            }
        }
    }
}

/// The reader's client context: librdkafka's end-of-partition event is
/// what the reader waits for, not trouble; the rest goes where the
/// producer's goes, and a refusal of the credentials is kept.
#[derive(Default)]
struct Quiet {
    refused: std::sync::Mutex<Option<String>>,
}

impl Quiet {
    /// The brokers' refusal of the credentials, if they refused them.
    fn refusal(&self) -> Option<SinkError> {
        let reason = self
            .refused
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        reason.clone().map(SinkError::Authentication)
    }
}

impl ClientContext for Quiet {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, log_message: &str) {
        super::kafka::librdkafka_log(level, fac, log_message);
    }

    fn error(&self, error: KafkaError, reason: &str) {
        if error.rdkafka_error_code() != Some(RDKafkaErrorCode::PartitionEOF) {
            super::kafka::librdkafka_error(&error, reason);
        }
        if let Some(why) = super::kafka::credentials_refused(&error, reason) {
            *self
                .refused
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(why);
        }
    }
}

impl ConsumerContext for Quiet {}

/// Whether a `--producer-property` also applies to the checkpoint reader:
/// connection and security settings do, producer tuning does not.
fn is_client_property(key: &str) -> bool {
    [
        "security.",
        "ssl.",
        "sasl.",
        "client.",
        "socket.",
        "broker.",
    ]
    .iter()
    .any(|p| key.starts_with(p))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_round_trip_and_keys_are_stable() {
        let v = value(Lsn(0x1_0000_0042));
        assert_eq!(parse(&v), Ok(Lsn(0x1_0000_0042)));
        let text = String::from_utf8(v.to_vec()).unwrap();
        assert!(text.contains("\"lsn\":\"1/42\""), "{text}");
        assert!(text.contains(env!("CARGO_PKG_VERSION")), "{text}");
        let s = Source {
            system_id: "7301".into(),
            database: "app/db".into(),
            slot: "factlib".into(),
        };
        assert_eq!(
            &s.key()[..],
            br#"{"system_id":"7301","database":"app/db","slot":"factlib"}"#
        );
        assert!(parse(b"{\"lsn\":\"nope\",\"relay\":\"x\"}").is_err());
        assert!(parse(b"garbage").is_err());
    }

    /// C is the end of the last unit committed. A transaction whose commit
    /// record starts exactly at C (right after a lone message ending there)
    /// is *not* covered; one that ends at C is.
    #[test]
    fn covers_compares_unit_ends_not_commit_lsns() {
        let c = Checkpoint(Lsn(0x200));
        // The lone message that ended at C, and one before it.
        assert!(c.covers(Lsn(0x200), None));
        assert!(c.covers(Lsn(0x100), None));
        assert!(!c.covers(Lsn(0x208), None));
        // A transaction whose commit record ends at C starts before it.
        assert!(c.covers(Lsn(0x1f0), Some(Lsn(0x1e0))));
        // The next transaction's commit record may start right at C.
        assert!(!c.covers(Lsn(0x1f8), Some(Lsn(0x200))));
        assert!(!c.covers(Lsn(0x300), Some(Lsn(0x310))));
    }
}
