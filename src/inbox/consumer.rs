//! The Kafka side of the inbox: a `read_committed` consumer on a thread of
//! its own that turns records into batches for the writer, and seeks each
//! assigned partition to the offset stored in the database.
//!
//! ```text
//!  Kafka ──poll──► record::take ──► Batch (rows, dead letters, next offset per partition)
//!                                     └─ full (--batch-max-facts) or old (--batch-max-ms) ──► writer
//!  rebalance: Assign ──ToWriter::Assigned──► writer reads factlib.inbox_offsets ──► assign at them
//!             Revoke ──ToWriter::Revoked──► writer has written every batch before it ──► unassign
//! ```
//!
//! **Invariants**
//! - Positions come only from the database: every assigned partition
//!   starts at its stored next offset, or at the beginning of the partition
//!   when it has none; never at Kafka's committed group offsets, never at
//!   the end. Nothing is committed to Kafka.
//! - One channel, in program order: a rebalance message reaches the writer
//!   after every batch sent before it, so a revoke returns only once those
//!   batches are written, and offsets read for an assignment include them.
//! - A batch holds only records polled since the last rebalance: the one
//!   being filled when a rebalance happens is dropped, and its records are
//!   read again from the stored offsets.
//! - Memory is bounded: the writer's channel holds at most
//!   [`CHANNEL_BATCHES`] batches, and librdkafka's fetch queue
//!   `--fetch-queue-kbytes`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::client::ClientContext;
use rdkafka::config::{ClientConfig, RDKafkaLogLevel};
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::Message;
use rdkafka::types::RDKafkaRespErr;
use rdkafka::{Offset, TopicPartitionList};
use tokio::sync::{mpsc, oneshot};

use super::record::{self, Dead, Received, Row, Taken};
use super::{InboxError, Subscription};
use crate::sink::kafka::{broker_states, credentials_refused, librdkafka_error, librdkafka_log};
use crate::sink::KafkaSecurity;
use crate::telemetry::{self, Beat};

/// Batches waiting for the writer, at most: one being written, one ready.
pub(crate) const CHANNEL_BATCHES: usize = 2;

/// The consumer's own settings.
#[derive(Debug, Clone)]
pub(crate) struct ConsumerSettings {
    pub(crate) brokers: String,
    pub(crate) security: KafkaSecurity,
    pub(crate) group: String,
    pub(crate) topics: Subscription,
    pub(crate) batch_max_facts: usize,
    pub(crate) batch_max: Duration,
    pub(crate) fetch_queue_kbytes: usize,
    pub(crate) session_timeout: Duration,
    /// Serve librdkafka's statistics (for `/readyz`).
    pub(crate) statistics: bool,
}

/// A partition of a topic.
pub(crate) type Partition = (Arc<str>, i32);

/// Records polled since the last batch, ready to write in one transaction.
#[derive(Debug, Default)]
pub(crate) struct Batch {
    pub(crate) rows: Vec<Row>,
    pub(crate) dead: Vec<Dead>,
    /// Per partition, the offset after the last record in the batch.
    pub(crate) next: HashMap<Partition, i64>,
    /// When its first record was polled.
    pub(crate) since: Option<Instant>,
}

impl Batch {
    fn len(&self) -> usize {
        self.rows.len() + self.dead.len()
    }

    fn push(&mut self, taken: Taken) {
        let origin = match &taken {
            Taken::Row(r) => &r.origin,
            Taken::Dead(d) => &d.origin,
        };
        let next = origin.offset.saturating_add(1);
        let at = self
            .next
            .entry((Arc::clone(&origin.topic), origin.partition))
            .or_insert(next);
        *at = (*at).max(next);
        self.since.get_or_insert_with(Instant::now);
        match taken {
            Taken::Row(r) => self.rows.push(r),
            Taken::Dead(d) => self.dead.push(d),
        }
    }
}

/// What the consumer thread tells the writer, in order.
#[derive(Debug)]
pub(crate) enum ToWriter {
    /// Write these records and their offsets in one transaction.
    Batch(Batch),
    /// These partitions are now ours: answer with their stored next
    /// offsets (`None`: no row yet).
    Assigned {
        partitions: Vec<Partition>,
        reply: oneshot::Sender<Vec<Option<i64>>>,
    },
    /// Every partition was taken away: answer once every earlier batch is
    /// written.
    Revoked { reply: oneshot::Sender<()> },
}

/// The part of librdkafka's statistics JSON with each partition's last
/// stable offset (the end a `read_committed` reader sees).
#[derive(serde::Deserialize)]
struct Statistics {
    #[serde(default)]
    topics: HashMap<String, TopicStatistics>,
}

#[derive(serde::Deserialize)]
struct TopicStatistics {
    #[serde(default)]
    partitions: HashMap<String, PartitionStatistics>,
}

#[derive(serde::Deserialize)]
struct PartitionStatistics {
    partition: i32,
    ls_offset: i64,
}

/// The consumer's context: librdkafka's logs, and the rebalances.
struct InboxContext {
    writer: mpsc::Sender<ToWriter>,
    /// Bumped on every rebalance; a batch started before it is dropped.
    generation: AtomicU64,
    /// The writer is gone (or refused an assignment): the thread ends.
    broken: AtomicBool,
    /// Why, when the brokers refused the credentials.
    refused: std::sync::Mutex<Option<String>>,
    /// Topic names, shared by the records of a topic.
    names: std::sync::Mutex<HashMap<String, Arc<str>>>,
}

impl InboxContext {
    fn name(&self, topic: &str) -> Arc<str> {
        let mut names = self
            .names
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(n) = names.get(topic) {
            return Arc::clone(n);
        }
        let n: Arc<str> = Arc::from(topic);
        names.insert(topic.to_owned(), Arc::clone(&n));
        n
    }

    /// Asks the writer for the stored offsets of `tpl`'s partitions and
    /// sets them in it; false if the writer is gone.
    fn stored_offsets(&self, tpl: &mut TopicPartitionList) -> bool {
        let partitions: Vec<Partition> = tpl
            .elements()
            .iter()
            .map(|e| (self.name(e.topic()), e.partition()))
            .collect();
        let (reply, answer) = oneshot::channel();
        let asked = self.writer.blocking_send(ToWriter::Assigned {
            partitions: partitions.clone(),
            reply,
        });
        let Ok(offsets) = asked
            .map_err(drop)
            .and_then(|()| answer.blocking_recv().map_err(drop))
        else {
            return false;
        };
        for ((topic, partition), next) in partitions.iter().zip(offsets) {
            let at = next.map_or(Offset::Beginning, Offset::Offset);
            if tpl.set_partition_offset(topic, *partition, at).is_err() {
                return false;
            }
            tracing::info!(topic = %topic, partition, start = %next.map_or_else(|| "beginning".to_owned(), |n| n.to_string()), "inbox: assigned; reading from the offset stored in the database");
        }
        true
    }
}

impl ClientContext for InboxContext {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, log_message: &str) {
        librdkafka_log(level, fac, log_message);
    }

    fn error(&self, error: KafkaError, reason: &str) {
        librdkafka_error(&error, reason);
        if let Some(why) = credentials_refused(&error, reason) {
            let mut refused = self
                .refused
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            refused.get_or_insert(why);
        }
    }

    fn stats_raw(&self, statistics: &[u8]) {
        broker_states(statistics);
        if let Ok(s) = serde_json::from_slice::<Statistics>(statistics) {
            telemetry::inbox_stable_offsets(s.topics.into_iter().flat_map(|(topic, t)| {
                t.partitions
                    .into_values()
                    .filter(|p| p.partition >= 0)
                    .map(move |p| (topic.clone(), p.partition, p.ls_offset))
            }));
        }
    }
}

impl ConsumerContext for InboxContext {
    fn rebalance(
        &self,
        consumer: &BaseConsumer<Self>,
        err: RDKafkaRespErr,
        tpl: &mut TopicPartitionList,
    ) {
        self.generation.fetch_add(1, Ordering::SeqCst);
        match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => {
                if self.stored_offsets(tpl) {
                    if let Err(e) = consumer.assign(tpl) {
                        tracing::warn!(error = %e, "inbox: cannot take the assigned partitions");
                        self.broken.store(true, Ordering::SeqCst);
                    }
                } else {
                    self.broken.store(true, Ordering::SeqCst);
                    let _ = consumer.assign(&TopicPartitionList::new());
                }
            }
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => {
                let (reply, written) = oneshot::channel();
                let told = self.writer.blocking_send(ToWriter::Revoked { reply });
                if told.is_err() || written.blocking_recv().is_err() {
                    self.broken.store(true, Ordering::SeqCst);
                }
                tracing::info!(
                    partitions = tpl.count(),
                    "inbox: partitions revoked; every batch read from them is written"
                );
                let _ = consumer.unassign();
            }
            other => {
                tracing::warn!(error = ?other, "inbox: rebalance failed; giving up the assignment");
                let _ = consumer.unassign();
            }
        }
    }
}

/// Starts the consumer thread; it ends when `stop` is set, the writer is
/// gone, or on a definite error (its result).
pub(crate) fn spawn(
    s: &ConsumerSettings,
    writer: mpsc::Sender<ToWriter>,
    stop: Arc<AtomicBool>,
) -> Result<std::thread::JoinHandle<Result<(), InboxError>>, InboxError> {
    let consumer = create(s, writer.clone())?;
    let s = s.clone();
    std::thread::Builder::new()
        .name("factlib-inbox-consumer".into())
        .spawn(move || Reader::new(consumer, s, writer, stop).run())
        .map_err(InboxError::Thread)
}

fn create(
    s: &ConsumerSettings,
    writer: mpsc::Sender<ToWriter>,
) -> Result<BaseConsumer<InboxContext>, InboxError> {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &s.brokers)
        .set("group.id", &s.group)
        .set("client.id", "factlib-inbox")
        .set("isolation.level", "read_committed")
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        // Partitions without a stored offset are assigned at the
        // beginning explicitly; this only covers an offset that fell out of
        // retention, where the beginning is the oldest record left.
        .set("auto.offset.reset", "earliest")
        // Eager assignors: a rebalance revokes everything, then assigns.
        .set("partition.assignment.strategy", "range,roundrobin")
        .set(
            "queued.max.messages.kbytes",
            s.fetch_queue_kbytes.to_string(),
        )
        .set("fetch.wait.max.ms", "100")
        .set(
            "session.timeout.ms",
            s.session_timeout.as_millis().to_string(),
        )
        .set(
            "heartbeat.interval.ms",
            (s.session_timeout / 4).as_millis().max(100).to_string(),
        )
        .set("topic.metadata.refresh.interval.ms", "10000")
        .set_log_level(RDKafkaLogLevel::Warning);
    if s.statistics {
        c.set(
            "statistics.interval.ms",
            telemetry::KAFKA_STATS_INTERVAL.as_millis().to_string(),
        );
    }
    s.security.apply(&mut c);
    let context = InboxContext {
        writer,
        generation: AtomicU64::new(0),
        broken: AtomicBool::new(false),
        refused: std::sync::Mutex::new(None),
        names: std::sync::Mutex::new(HashMap::new()),
    };
    let consumer: BaseConsumer<InboxContext> = c
        .create_with_context(context)
        .map_err(InboxError::KafkaClient)?;
    match &s.topics {
        Subscription::Topics(names) => {
            let names: Vec<&str> = names.iter().map(String::as_str).collect();
            consumer.subscribe(&names)
        }
        Subscription::Pattern(p) => consumer.subscribe(&[p.as_str()]),
    }
    .map_err(InboxError::KafkaClient)?;
    Ok(consumer)
}

/// The consumer thread's loop.
struct Reader {
    consumer: BaseConsumer<InboxContext>,
    s: ConsumerSettings,
    writer: mpsc::Sender<ToWriter>,
    stop: Arc<AtomicBool>,
    batch: Batch,
    /// The rebalance generation the batch belongs to.
    generation: u64,
    /// Topics reported missing, so each is logged once.
    missing: std::collections::HashSet<String>,
    beat: Beat,
}

impl Reader {
    fn new(
        consumer: BaseConsumer<InboxContext>,
        s: ConsumerSettings,
        writer: mpsc::Sender<ToWriter>,
        stop: Arc<AtomicBool>,
    ) -> Self {
        Reader {
            consumer,
            s,
            writer,
            stop,
            batch: Batch::default(),
            generation: 0,
            missing: std::collections::HashSet::new(),
            beat: Beat::register("inbox-consumer"),
        }
    }

    fn run(mut self) -> Result<(), InboxError> {
        let result = self.poll_until_stopped();
        // Leaving the group revokes the partitions: the writer writes
        // what it holds first (the rebalance callback waits for it).
        self.consumer.unsubscribe();
        let _ = self.consumer.poll(Duration::ZERO);
        result
    }

    fn poll_until_stopped(&mut self) -> Result<(), InboxError> {
        loop {
            self.beat.tick();
            if let Some(why) = self.refused() {
                return Err(InboxError::KafkaAuthentication(why));
            }
            if self.consumer.context().broken.load(Ordering::SeqCst) {
                return Ok(());
            }
            if self.stop.load(Ordering::Relaxed) {
                return self.send();
            }
            let wait = match self.batch.since {
                Some(since) => self.s.batch_max.saturating_sub(since.elapsed()),
                None => Duration::from_millis(100),
            };
            let polled = self.consumer.poll(wait);
            let generation = self.consumer.context().generation.load(Ordering::SeqCst);
            if generation != self.generation {
                // A rebalance ran inside poll: what was read before it is
                // read again from the stored offsets.
                self.batch = Batch::default();
                self.generation = generation;
            }
            match polled {
                Some(Ok(m)) => {
                    let topic = self.consumer.context().name(m.topic());
                    let taken = record::take(
                        Received {
                            partition: m.partition(),
                            offset: m.offset(),
                            key: m.key(),
                            value: m.payload(),
                        },
                        &topic,
                    );
                    if let Taken::Dead(d) = &taken {
                        telemetry::InboxDeadLetter {
                            topic: &d.origin.topic,
                            partition: d.origin.partition,
                            offset: d.origin.offset,
                            error: &d.error,
                        }
                        .emit();
                    }
                    self.batch.push(taken);
                }
                Some(Err(e)) => self.consume_error(&e),
                None => {}
            }
            let full = self.batch.len() >= self.s.batch_max_facts;
            let due = self
                .batch
                .since
                .is_some_and(|s| s.elapsed() >= self.s.batch_max);
            if full || due {
                self.send()?;
            }
        }
    }

    /// Hands the batch to the writer (waiting while it is busy).
    fn send(&mut self) -> Result<(), InboxError> {
        if self.batch.len() == 0 {
            return Ok(());
        }
        let batch = std::mem::take(&mut self.batch);
        // The writer gone means the session is ending; its error says why.
        let _ = self.writer.blocking_send(ToWriter::Batch(batch));
        Ok(())
    }

    fn refused(&self) -> Option<String> {
        self.consumer
            .context()
            .refused
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// An error polled instead of a record: logged (a missing topic once),
    /// and the consumer goes on.
    fn consume_error(&mut self, e: &KafkaError) {
        match e.rdkafka_error_code() {
            Some(RDKafkaErrorCode::UnknownTopicOrPartition | RDKafkaErrorCode::UnknownTopic) => {
                let what = e.to_string();
                if self.missing.insert(what.clone()) {
                    tracing::warn!(error = %what, "inbox: a subscribed topic does not exist (yet); reading the others, and this one once it is created");
                }
            }
            _ => telemetry::KafkaTrouble {
                message: &format_args!("consuming: {e}"),
            }
            .emit(),
        }
    }
}
