//! The rdkafka producer: configuration, topic metadata and creation, and
//! delivery reports turned into acks.
//!
//! ```text
//!  flusher thread ──Producer::send(Record)──► librdkafka (batches, lz4/zstd, idempotent)
//!  librdkafka ──delivery report(opaque)──► Delivery channel ──► relay (progress)
//! ```
//!
//! **Invariants**
//! - `enable.idempotence=true` and `acks=all`: a record acked by Kafka is
//!   durably in the log once, and per-partition order holds across retries.
//! - `message.timeout.ms=0`: librdkafka retries a record until it is
//!   delivered or fails for good, so a delivery error is a *permanent* one.
//! - A full producer queue hands the record back to the caller; nothing is
//!   buffered without bound.
//! - Transactional (exactly-once) producers get reports of failed
//!   deliveries only (`delivery.report.only.error`), and turn them into
//!   [`Delivery`]: progress comes from `commit_transaction`. (librdkafka
//!   then frees a delivered message on its broker thread rather than the
//!   polling thread; in paired drains that cost no wall time, and it saves
//!   170 instructions and about 7 MiB of peak RSS: perf/README.md, issue 20.)
//! - The admin client made for topic creation never carries the
//!   `transactional.id`.

use std::sync::{Arc, PoisonError};
use std::time::Duration;

use crossbeam::channel::Sender;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::{ClientContext, DefaultClientContext};
use rdkafka::config::{ClientConfig, RDKafkaLogLevel};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{
    BaseRecord, DeliveryResult, Producer as _, ProducerContext, ThreadedProducer,
};
use rdkafka::types::RDKafkaRespErr;

use super::producer::{
    CreateTopics, Delivery, Producer, SendOutcome, Transactional, TxnError, TxnErrorKind,
};
use super::record::Record;
use super::security::KafkaSecurity;
use super::SinkError;

/// Kafka batch compression.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Compression {
    /// LZ4: fast, the default.
    #[default]
    Lz4,
    /// Zstandard: smaller, more CPU.
    Zstd,
    /// Snappy.
    Snappy,
    /// No compression.
    None,
}

impl Compression {
    /// The librdkafka `compression.type` value.
    pub fn as_str(self) -> &'static str {
        match self {
            Compression::Lz4 => "lz4",
            Compression::Zstd => "zstd",
            Compression::Snappy => "snappy",
            Compression::None => "none",
        }
    }
}

/// The producer's settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SinkSettings {
    /// `bootstrap.servers`.
    pub brokers: String,
    /// Security protocol, SASL credentials, CA.
    pub security: KafkaSecurity,
    /// `compression.type`.
    pub compression: Compression,
    /// `linger.ms`.
    pub linger_ms: u64,
    /// `batch.size` in bytes.
    pub batch_bytes: u64,
    /// `batch.num.messages`.
    pub batch_messages: u64,
    /// `queue.buffering.max.messages`.
    pub queue_messages: u64,
    /// `queue.buffering.max.kbytes`.
    pub queue_kbytes: u64,
    /// `message.max.bytes`: the largest record the producer accepts (and
    /// the `max.message.bytes` of topics it creates).
    pub max_message_bytes: u64,
    /// Extra librdkafka properties, `key=value`, applied last.
    pub extra: Vec<(String, String)>,
    /// `statistics.interval.ms`: how often librdkafka reports its brokers'
    /// states (for `/readyz`); `None`: never.
    pub statistics_interval: Option<Duration>,
}

impl Default for SinkSettings {
    fn default() -> Self {
        SinkSettings {
            brokers: "127.0.0.1:19092".to_owned(),
            security: KafkaSecurity::default(),
            compression: Compression::Lz4,
            linger_ms: 1,
            batch_bytes: 1 << 20,
            batch_messages: 10_000,
            queue_messages: 20_000,
            queue_kbytes: 16_384,
            max_message_bytes: 1_000_000,
            extra: Vec::new(),
            statistics_interval: None,
        }
    }
}

/// Turns delivery reports into [`Delivery`] messages and wakes the relay.
pub struct AckContext {
    acks: Sender<Delivery>,
    wake: Arc<tokio::sync::Notify>,
    /// Exactly-once: a delivered record says nothing (its commit will).
    transactional: bool,
    /// Why the brokers refused the credentials, once they did.
    refused: std::sync::Mutex<Option<String>>,
}

impl ClientContext for AckContext {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, log_message: &str) {
        librdkafka_log(level, fac, log_message);
    }

    fn error(&self, error: KafkaError, reason: &str) {
        librdkafka_error(&error, reason);
        if let Some(why) = credentials_refused(&error, reason) {
            let mut refused = self.refused.lock().unwrap_or_else(PoisonError::into_inner);
            if refused.is_none() {
                *refused = Some(why.clone());
                let _ = self
                    .acks
                    .send(Delivery::Broken(SinkError::Authentication(why)));
                self.wake.notify_one();
            }
        }
    }

    fn stats_raw(&self, statistics: &[u8]) {
        broker_states(statistics);
    }
}

/// The part of librdkafka's statistics JSON that says which brokers are
/// connected.
#[derive(serde::Deserialize)]
struct Statistics {
    brokers: std::collections::HashMap<String, BrokerState>,
}

#[derive(serde::Deserialize)]
struct BrokerState {
    /// INIT, DOWN, CONNECT, …, UP.
    state: String,
    /// `configured` (bootstrap), `learned`, `internal` or `logical`.
    source: String,
}

/// Counts the real brokers (bootstrap or learned; not librdkafka's
/// internal or logical ones) in state UP, for `/readyz`. Statistics that do
/// not parse are ignored.
pub fn broker_states(json: &[u8]) {
    if let Some((up, total)) = brokers_up(json) {
        crate::telemetry::KafkaBrokers { up, total }.emit();
    }
}

/// (brokers up, brokers) in librdkafka's statistics JSON.
fn brokers_up(json: &[u8]) -> Option<(usize, usize)> {
    let stats = serde_json::from_slice::<Statistics>(json).ok()?;
    let real = || {
        stats
            .brokers
            .values()
            .filter(|b| b.source == "configured" || b.source == "learned")
    };
    Some((real().filter(|b| b.state == "UP").count(), real().count()))
}

/// Why, if a client-wide error says the brokers refused the credentials:
/// librdkafka retries that for ever, the relay stops instead
/// ([`SinkError::Authentication`]).
pub fn credentials_refused(error: &KafkaError, reason: &str) -> Option<String> {
    matches!(
        error.rdkafka_error_code(),
        Some(RDKafkaErrorCode::Authentication | RDKafkaErrorCode::SaslAuthenticationFailed)
    )
    .then(|| reason.to_owned())
}

/// Where librdkafka's log lines go: chatter to debug, warnings and worse
/// into the rate-limited trouble line.
pub fn librdkafka_log(level: RDKafkaLogLevel, fac: &str, log_message: &str) {
    match level {
        RDKafkaLogLevel::Notice | RDKafkaLogLevel::Info | RDKafkaLogLevel::Debug => {
            tracing::debug!(target: "librdkafka", "{fac} {log_message}");
        }
        _ => crate::telemetry::KafkaTrouble {
            message: &format_args!("{fac} {log_message}"),
        }
        .emit(),
    }
}

/// Where librdkafka's client-wide errors go: the rate-limited trouble line
/// (and, when every broker is down, `/readyz`).
pub fn librdkafka_error(error: &KafkaError, reason: &str) {
    if error.rdkafka_error_code() == Some(RDKafkaErrorCode::AllBrokersDown) {
        crate::telemetry::kafka_all_brokers_down();
    }
    crate::telemetry::KafkaTrouble {
        message: &format_args!("{error}: {reason}"),
    }
    .emit();
}

impl ProducerContext for AckContext {
    type DeliveryOpaque = usize;

    fn delivery(&self, result: &DeliveryResult<'_>, opaque: usize) {
        let d = match result {
            Ok(_) if self.transactional => return,
            Ok(msg) => {
                use rdkafka::Message as _;
                if let rdkafka::Timestamp::CreateTime(ts) = msg.timestamp() {
                    crate::telemetry::latency_since_ms(ts);
                }
                let bytes = msg.payload_len() + msg.key().map_or(0, <[u8]>::len);
                Delivery::Acked {
                    opaque,
                    bytes: u64::try_from(bytes).unwrap_or(0),
                }
            }
            Err((error, msg)) => {
                use rdkafka::Message as _;
                Delivery::Failed {
                    opaque,
                    topic: msg.topic().to_owned(),
                    bytes: msg.payload_len() + msg.key().map_or(0, <[u8]>::len),
                    error: error.clone(),
                }
            }
        };
        // The receiver only goes away when the relay is exiting.
        let _ = self.acks.send(d);
        self.wake.notify_one();
    }
}

/// The producer shared by the flusher threads.
#[derive(Clone)]
pub struct KafkaProducer {
    producer: ThreadedProducer<AckContext>,
    config: ClientConfig,
}

/// What the cluster's metadata says of a topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TopicState {
    /// It does not exist.
    Missing,
    /// It exists, but a partition has no leader yet (or none at all is
    /// listed): just created, or its broker is away.
    NotReady,
    /// It exists with this many partitions, each with a leader.
    Ready(u32),
}

impl TopicState {
    /// The state of a topic whose partitions have these leaders and errors.
    ///
    /// A topic is ready only once every partition has a leader. Producing
    /// to a partition the broker has not applied yet fails with a
    /// retriable NOT_LEADER_OR_FOLLOWER; with several requests in flight a
    /// later batch can then be appended first, and on brokers without the
    /// fix for KAFKA-15591 the earlier batch is lost although the
    /// idempotent producer reports it delivered.
    pub fn of_partitions(
        partitions: impl ExactSizeIterator<Item = (i32, Option<RDKafkaRespErr>)>,
    ) -> Self {
        let n = partitions.len();
        let mut all_led = true;
        for (leader, error) in partitions {
            all_led &= leader >= 0 && error.is_none();
        }
        match u32::try_from(n) {
            Ok(n) if n > 0 && all_led => TopicState::Ready(n),
            _ => TopicState::NotReady,
        }
    }
}

impl KafkaProducer {
    /// Builds the producer. Acks go to `acks`; `wake` is notified after each.
    ///
    /// With a `transactional_id` the producer is transactional (call
    /// [`KafkaProducer::init_transactions`] before anything else), and only
    /// failed deliveries reach `acks`: commits carry progress.
    pub fn new(
        cfg: &SinkSettings,
        transactional_id: Option<&str>,
        acks: Sender<Delivery>,
        wake: Arc<tokio::sync::Notify>,
    ) -> Result<Self, SinkError> {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", &cfg.brokers)
            .set("client.id", "factlib")
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("compression.type", cfg.compression.as_str())
            .set("linger.ms", cfg.linger_ms.to_string())
            .set("batch.size", cfg.batch_bytes.to_string())
            .set("batch.num.messages", cfg.batch_messages.to_string())
            .set(
                "queue.buffering.max.messages",
                cfg.queue_messages.to_string(),
            )
            .set("queue.buffering.max.kbytes", cfg.queue_kbytes.to_string())
            .set("message.max.bytes", cfg.max_message_bytes.to_string())
            .set("message.timeout.ms", "0")
            .set("topic.metadata.refresh.interval.ms", "30000");
        cfg.security.apply(&mut c);
        if let Some(id) = transactional_id {
            // Progress comes from commit_transaction; a delivery report
            // matters only when a record fails (see the module's doc).
            c.set("transactional.id", id)
                .set("delivery.report.only.error", "true");
        }
        if let Some(every) = cfg.statistics_interval {
            c.set(
                "statistics.interval.ms",
                every.as_millis().max(1).to_string(),
            );
        }
        for (k, v) in &cfg.extra {
            c.set(k, v);
        }
        let producer = c
            .create_with_context(AckContext {
                acks,
                wake,
                transactional: transactional_id.is_some(),
                refused: std::sync::Mutex::new(None),
            })
            .map_err(SinkError::Config)?;
        Ok(KafkaProducer {
            producer,
            config: c,
        })
    }

    /// Hands a record to librdkafka. Never blocks. An error is permanent
    /// for this record (e.g. larger than `message.max.bytes`).
    // The record comes back by value so a full queue costs no allocation.
    #[allow(clippy::result_large_err)]
    pub fn send(&self, mut rec: Record) -> Result<SendOutcome, (KafkaError, Record)> {
        let headers = rec.headers.take();
        let (result, headers) = {
            let mut base = BaseRecord::with_opaque_to(&rec.topic, rec.opaque)
                .payload(&rec.value[..])
                .partition(rec.partition);
            base.headers = headers;
            base.timestamp = rec.timestamp_ms;
            if let Some(k) = &rec.key {
                base = base.key(&k[..]);
            }
            match self.producer.send(base) {
                Ok(()) => (Ok(()), None),
                Err((e, mut back)) => (Err(e), back.headers.take()),
            }
        };
        match result {
            Ok(()) => Ok(SendOutcome::Queued),
            Err(KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull)) => {
                rec.headers = headers;
                Ok(SendOutcome::Full(rec))
            }
            Err(e) => {
                rec.headers = headers;
                Err((e, rec))
            }
        }
    }

    /// Records queued in librdkafka and not yet reported.
    pub fn in_flight(&self) -> i32 {
        self.producer.in_flight_count()
    }

    /// Waits up to `timeout` for every queued record to be reported.
    pub fn flush(&self, timeout: Duration) -> Result<(), SinkError> {
        self.producer.flush(timeout).map_err(SinkError::Flush)
    }

    /// The low and high watermarks of `partition` of `topic`. Blocks up to
    /// `timeout`.
    pub fn watermarks(
        &self,
        topic: &str,
        partition: i32,
        timeout: Duration,
    ) -> Result<(i64, i64), KafkaError> {
        self.producer
            .client()
            .fetch_watermarks(topic, partition, timeout)
    }

    /// The first partition of `topic` (of `n`) whose leader does not yet
    /// answer a ListOffsets request for it, with the error; `None` when
    /// all do. Blocks up to `timeout` per partition.
    pub fn unserved_partition(
        &self,
        topic: &str,
        n: u32,
        timeout: Duration,
    ) -> Option<(i32, KafkaError)> {
        (0..i32::try_from(n).unwrap_or(i32::MAX)).find_map(|p| {
            self.producer
                .client()
                .fetch_watermarks(topic, p, timeout)
                .err()
                .map(|e| (p, e))
        })
    }

    /// Whether `topic` exists and every one of its partitions has a
    /// leader. Blocks up to `timeout`.
    pub fn topic_state(&self, topic: &str, timeout: Duration) -> Result<TopicState, SinkError> {
        let md = self
            .producer
            .client()
            .fetch_metadata(Some(topic), timeout)
            .map_err(|source| {
                self.or_refused(SinkError::Metadata {
                    topic: topic.to_owned(),
                    source,
                })
            })?;
        let Some(t) = md.topics().iter().find(|t| t.name() == topic) else {
            return Ok(TopicState::Missing);
        };
        match t.error() {
            None => Ok(TopicState::of_partitions(
                t.partitions().iter().map(|p| (p.leader(), p.error())),
            )),
            Some(RDKafkaRespErr::RD_KAFKA_RESP_ERR_UNKNOWN_TOPIC_OR_PART) => {
                Ok(TopicState::Missing)
            }
            Some(RDKafkaRespErr::RD_KAFKA_RESP_ERR_LEADER_NOT_AVAILABLE) => {
                Ok(TopicState::NotReady)
            }
            Some(e) => Err(SinkError::Metadata {
                topic: topic.to_owned(),
                source: KafkaError::MetadataFetch(e.into()),
            }),
        }
    }

    /// Creates `topic` with topic `configs` besides `max.message.bytes`; an
    /// already existing topic is fine.
    pub async fn create_topic(
        &self,
        topic: &str,
        c: CreateTopics,
        configs: &[(&str, &str)],
    ) -> Result<(), SinkError> {
        // An admin client is a producer handle underneath: it must not
        // carry the transactional id.
        let admin: AdminClient<DefaultClientContext> = self
            .config
            .clone()
            .remove("transactional.id")
            .remove("statistics.interval.ms")
            .create()
            .map_err(SinkError::Config)?;
        let max_bytes = c.max_message_bytes.to_string();
        let mut new = NewTopic::new(topic, c.partitions, TopicReplication::Fixed(c.replication))
            .set("max.message.bytes", &max_bytes);
        for (k, v) in configs {
            new = new.set(k, v);
        }
        let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
        let results = admin.create_topics([&new], &opts).await.map_err(|source| {
            self.or_refused(SinkError::CreateTopic {
                topic: topic.to_owned(),
                source,
            })
        })?;
        for r in results {
            match r {
                Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                Err((_, code)) => {
                    return Err(SinkError::CreateTopic {
                        topic: topic.to_owned(),
                        source: KafkaError::AdminOp(code),
                    })
                }
            }
        }
        Ok(())
    }
}

impl Producer for KafkaProducer {
    fn send(&mut self, rec: Record) -> Result<SendOutcome, (KafkaError, Record)> {
        KafkaProducer::send(self, rec)
    }
}

impl KafkaProducer {
    /// `init_transactions`: fences every older producer with the same
    /// transactional id and aborts its open transaction. Blocks up to
    /// `timeout`.
    pub fn init_transactions(&self, timeout: Duration) -> Result<(), SinkError> {
        self.producer.init_transactions(timeout).map_err(|source| {
            self.or_refused(SinkError::TransactionInit {
                id: self
                    .config
                    .get("transactional.id")
                    .unwrap_or_default()
                    .to_owned(),
                source,
            })
        })
    }

    /// The brokers' refusal of the credentials, if they refused them.
    pub fn refusal(&self) -> Option<SinkError> {
        let refused = self.producer.context().refused.lock();
        let refused = refused.unwrap_or_else(PoisonError::into_inner);
        refused.clone().map(SinkError::Authentication)
    }

    /// `error`, unless the brokers refused the credentials: then that, the
    /// cause that retrying cannot fix.
    pub fn or_refused(&self, error: SinkError) -> SinkError {
        self.refusal().unwrap_or(error)
    }
}

/// What a failed transactional call asks of the caller, as librdkafka
/// says.
fn classify(error: KafkaError) -> TxnError {
    let kind = match &error {
        KafkaError::Transaction(e) if e.is_fatal() => TxnErrorKind::Fatal,
        KafkaError::Transaction(e) if e.txn_requires_abort() => TxnErrorKind::Abortable,
        KafkaError::Transaction(e) if e.is_retriable() => TxnErrorKind::Retriable,
        // commit_transaction flushes first; a flush timeout is retried.
        KafkaError::Flush(_) => TxnErrorKind::Retriable,
        _ => TxnErrorKind::Abortable,
    };
    TxnError { kind, error }
}

impl Transactional for KafkaProducer {
    fn begin(&mut self) -> Result<(), TxnError> {
        self.producer.begin_transaction().map_err(classify)
    }

    fn send(&mut self, rec: Record) -> Result<SendOutcome, (KafkaError, Record)> {
        KafkaProducer::send(self, rec)
    }

    fn settle(&mut self, timeout: Duration) -> bool {
        // Not rdkafka's flush: it waits in polls of up to 100 ms for
        // delivery events, which (the background thread polls them first)
        // mostly never reach it, so a commit took about 100 ms longer than
        // Kafka did. After this wait, commit_transaction's own flush
        // returns at once.
        let deadline = std::time::Instant::now() + timeout;
        while self.in_flight() > 0 {
            if std::time::Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        true
    }

    fn commit(&mut self, timeout: Duration) -> Result<(), TxnError> {
        self.producer.commit_transaction(timeout).map_err(classify)
    }

    fn abort(&mut self, timeout: Duration) -> Result<(), TxnError> {
        self.producer.abort_transaction(timeout).map_err(classify)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use rdkafka::mocking::MockCluster;

    /// Trimmed from librdkafka 2.x statistics: the internal broker is
    /// always UP and must not count.
    #[test]
    fn brokers_up_counts_real_brokers_in_state_up() {
        let stats = br#"{"name":"factlib#producer-1","ts":1,"brokers":{
            ":0/internal":{"name":":0/internal","nodeid":-1,"source":"internal","state":"UP","rtt":{"avg":0}},
            "127.0.0.1:19092/bootstrap":{"nodeid":-1,"source":"configured","state":"DOWN"},
            "127.0.0.1:19092/1":{"nodeid":1,"source":"learned","state":"UP"}},
            "topics":{"t":{"partitions":{"0":{"msgq_cnt":0}}}}}"#;
        assert_eq!(brokers_up(stats), Some((1, 2)));
        let down = br#"{"brokers":{":0/internal":{"source":"internal","state":"UP"},
            "127.0.0.1:19092/1":{"source":"learned","state":"TRY_CONNECT"}}}"#;
        assert_eq!(brokers_up(down), Some((0, 1)));
        assert_eq!(brokers_up(b"not json"), None);
    }

    #[test]
    fn a_topic_is_ready_only_when_every_partition_has_a_leader() {
        use RDKafkaRespErr::RD_KAFKA_RESP_ERR_LEADER_NOT_AVAILABLE as NO_LEADER;
        let ready =
            |ps: &[(i32, Option<RDKafkaRespErr>)]| TopicState::of_partitions(ps.iter().copied());
        assert_eq!(
            ready(&[(1, None), (1, None), (2, None)]),
            TopicState::Ready(3)
        );
        assert_eq!(
            ready(&[(1, None), (-1, None), (2, None)]),
            TopicState::NotReady
        );
        assert_eq!(
            ready(&[(1, None), (1, Some(NO_LEADER))]),
            TopicState::NotReady
        );
        assert_eq!(ready(&[]), TopicState::NotReady);
    }

    /// The loss this guards against: the first batch to a just-created
    /// partition failed NOT_LEADER_OR_FOLLOWER, a later batch was appended
    /// first, and the first was reported delivered but never written.
    #[test]
    fn topic_state_waits_for_leaders_against_a_mock_cluster() {
        let mock = MockCluster::new(1).unwrap();
        mock.create_topic("t", 3, 1).unwrap();
        let (tx, _rx) = crossbeam::channel::unbounded();
        let producer = KafkaProducer::new(
            &SinkSettings {
                brokers: mock.bootstrap_servers(),
                ..SinkSettings::default()
            },
            None,
            tx,
            Arc::new(tokio::sync::Notify::new()),
        )
        .unwrap();
        let state = |topic: &str| {
            producer
                .topic_state(topic, Duration::from_secs(10))
                .unwrap()
        };
        assert_eq!(state("t"), TopicState::Ready(3));
        mock.partition_leader("t", 1, None).unwrap();
        assert_eq!(state("t"), TopicState::NotReady);
        mock.partition_leader("t", 1, Some(1)).unwrap();
        assert_eq!(state("t"), TopicState::Ready(3));
    }

    /// Exactly-once: a delivered record says nothing (the commit does), and
    /// is still freed: nothing stays in flight after the commit.
    /// At-least-once: each delivered record is an ack.
    #[test]
    fn only_an_untransactional_producer_turns_deliveries_into_acks() {
        let mock = MockCluster::new(1).unwrap();
        mock.create_topic("t", 1, 1).unwrap();
        let acks_of = |transactional_id: Option<&str>| {
            let (tx, rx) = crossbeam::channel::unbounded();
            let mut producer = KafkaProducer::new(
                &SinkSettings {
                    brokers: mock.bootstrap_servers(),
                    ..SinkSettings::default()
                },
                transactional_id,
                tx,
                Arc::new(tokio::sync::Notify::new()),
            )
            .unwrap();
            let record = |opaque: usize| Record {
                topic: Arc::from("t"),
                partition: 0,
                key: None,
                value: Bytes::from_static(b"v"),
                headers: None,
                bytes: 1,
                opaque,
                txn_end: None,
                timestamp_ms: None,
            };
            if transactional_id.is_some() {
                producer.init_transactions(Duration::from_secs(10)).unwrap();
                Transactional::begin(&mut producer).unwrap();
            }
            for opaque in 1..=3 {
                assert!(matches!(
                    producer.send(record(opaque)),
                    Ok(SendOutcome::Queued)
                ));
            }
            if transactional_id.is_some() {
                Transactional::commit(&mut producer, Duration::from_secs(10)).unwrap();
            } else {
                let deadline = std::time::Instant::now() + Duration::from_secs(10);
                while producer.in_flight() > 0 && std::time::Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(5));
                }
            }
            assert_eq!(producer.in_flight(), 0, "every record was delivered");
            rx.try_iter().collect::<Vec<_>>()
        };
        let acked = acks_of(None);
        let opaques: Vec<usize> = acked
            .iter()
            .filter_map(|d| match d {
                Delivery::Acked { opaque, .. } => Some(*opaque),
                _ => None,
            })
            .collect();
        assert_eq!(opaques, [1, 2, 3]);
        assert!(acks_of(Some("t-txn")).is_empty());
    }
}
