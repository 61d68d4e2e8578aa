//! The Kafka side of the inbox: a `read_committed` consumer on a thread of
//! its own that turns records into batches for the writers, and seeks each
//! assigned partition to the offset stored in the database.
//!
//! ```text
//!  Kafka ──poll──► record::take ──► Batch (rows, dead letters, next offset per partition)
//!                                     └─ full (--batch-max-facts) or old (--batch-max-ms)
//!                                          ──split by partition──► writer k (--writers, one connection each)
//!  rebalance: Assign ──ToWriter::Assigned──► each writer reads its partitions' stored offsets ──► assign at them
//!             Revoke ──ToWriter::Revoked──► every writer has written every batch before it ──► unassign
//! ```
//!
//! **Invariants**
//! - Positions come only from the database: every assigned partition
//!   starts at its stored next offset, or at the beginning of the partition
//!   when it has none; never at Kafka's committed group offsets, never at
//!   the end. Nothing is committed to Kafka.
//! - A partition always goes to the same writer ([`Writers::of`]), so its
//!   batches are written one after another, in order.
//! - One channel per writer, in program order: a rebalance message reaches
//!   each writer after every batch sent to it before, so a revoke returns
//!   only once those batches are written, and offsets read for an
//!   assignment include them.
//! - A batch holds only records polled since the last rebalance: the one
//!   being filled when a rebalance happens is dropped, and its records are
//!   read again from the stored offsets.
//! - Memory is bounded: each writer's channel holds at most
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

/// Batches waiting for each writer, at most: one being written, one ready.
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
    /// Extra librdkafka properties, applied last.
    pub(crate) extra: Vec<(String, String)>,
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
    /// This batch's records per writer (`None` where a writer gets none).
    fn split(self, writers: &Writers) -> Vec<Option<Batch>> {
        let n = writers.len();
        if n == 1 {
            return vec![Some(self)];
        }
        let mut parts: Vec<Batch> = (0..n).map(|_| Batch::default()).collect();
        for r in self.rows {
            let k = writers.of(&r.origin.topic, r.origin.partition);
            parts[k].rows.push(r);
        }
        for d in self.dead {
            let k = writers.of(&d.origin.topic, d.origin.partition);
            parts[k].dead.push(d);
        }
        for (p, next) in self.next {
            parts[writers.of(&p.0, p.1)].next.insert(p, next);
        }
        parts
            .into_iter()
            .map(|b| (!b.next.is_empty()).then_some(b))
            .collect()
    }

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

/// The writers' channels: a partition's batches always go to the same one.
#[derive(Debug, Clone)]
pub(crate) struct Writers(Vec<mpsc::Sender<ToWriter>>);

impl Writers {
    pub(crate) fn new(channels: Vec<mpsc::Sender<ToWriter>>) -> Self {
        Writers(channels)
    }

    fn len(&self) -> usize {
        self.0.len()
    }

    /// The writer of a partition: FNV-1a over the topic, then the
    /// partition, modulo the writers.
    fn of(&self, topic: &str, partition: i32) -> usize {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in topic.bytes().chain(partition.to_be_bytes()) {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
        usize::try_from(h % self.0.len().max(1) as u64).unwrap_or(0)
    }

    fn closed(&self) -> bool {
        self.0.iter().any(mpsc::Sender::is_closed)
    }

    /// Sends each writer its part of `batch`, waiting while one is busy;
    /// false once a writer is gone.
    fn send(&self, batch: Batch) -> bool {
        batch
            .split(self)
            .into_iter()
            .zip(&self.0)
            .filter_map(|(part, w)| part.map(|b| (b, w)))
            .all(|(b, w)| w.blocking_send(ToWriter::Batch(b)).is_ok())
    }

    /// The stored next offset of each partition, each asked of its
    /// writer; `None` if a writer is gone.
    fn stored(&self, partitions: &[Partition]) -> Option<Vec<Option<i64>>> {
        let mut asked = Vec::new();
        for (k, w) in self.0.iter().enumerate() {
            let mine: Vec<Partition> = partitions
                .iter()
                .filter(|(t, p)| self.of(t, *p) == k)
                .cloned()
                .collect();
            if mine.is_empty() {
                continue;
            }
            let (reply, answer) = oneshot::channel();
            w.blocking_send(ToWriter::Assigned {
                partitions: mine.clone(),
                reply,
            })
            .ok()?;
            asked.push((mine, answer));
        }
        let mut stored: HashMap<Partition, Option<i64>> = HashMap::new();
        for (mine, answer) in asked {
            let offsets = answer.blocking_recv().ok()?;
            stored.extend(mine.into_iter().zip(offsets));
        }
        partitions.iter().map(|p| stored.get(p).copied()).collect()
    }

    /// Tells every writer the partitions are gone and waits until each has
    /// written what it was sent before; false if a writer is gone.
    fn revoked(&self) -> bool {
        let mut waits = Vec::new();
        for w in &self.0 {
            let (reply, written) = oneshot::channel();
            if w.blocking_send(ToWriter::Revoked { reply }).is_err() {
                return false;
            }
            waits.push(written);
        }
        waits.into_iter().all(|w| w.blocking_recv().is_ok())
    }
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
    writers: Writers,
    /// Bumped on every rebalance; a batch started before it is dropped.
    generation: AtomicU64,
    /// A writer is gone (or an assignment failed): the thread ends.
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

    /// Asks the writers for the stored offsets of `tpl`'s partitions and
    /// sets them in it; false if a writer is gone.
    fn stored_offsets(&self, tpl: &mut TopicPartitionList) -> bool {
        let partitions: Vec<Partition> = tpl
            .elements()
            .iter()
            .map(|e| (self.name(e.topic()), e.partition()))
            .collect();
        let Some(offsets) = self.writers.stored(&partitions) else {
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
                if !self.writers.revoked() {
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

/// Starts the consumer thread; it ends when `stop` is set, a writer is
/// gone, or on a definite error (its result).
pub(crate) fn spawn(
    s: &ConsumerSettings,
    writers: Writers,
    stop: Arc<AtomicBool>,
) -> Result<std::thread::JoinHandle<Result<(), InboxError>>, InboxError> {
    let consumer = create(s, writers.clone())?;
    let s = s.clone();
    std::thread::Builder::new()
        .name("factlib-inbox-consumer".into())
        .spawn(move || Reader::new(consumer, s, writers, stop).run())
        .map_err(InboxError::Thread)
}

fn create(
    s: &ConsumerSettings,
    writers: Writers,
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
        // librdkafka keeps a fetch response's buffer while any of its records
        // waits in the queue: smaller fetches keep the memory near the queue's
        // bound. In 1M-fact drains, 256 KiB per partition and half the queue
        // per fetch were about as fast as librdkafka's defaults (1 MiB, 50
        // MiB) and held 60-75 MiB less (perf/README.md).
        .set("max.partition.fetch.bytes", "262144")
        .set(
            "fetch.max.bytes",
            (s.fetch_queue_kbytes.saturating_mul(1024) / 2)
                .clamp(262_144, 52_428_800)
                .to_string(),
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
    for (k, v) in &s.extra {
        c.set(k, v);
    }
    let context = InboxContext {
        writers,
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
    writers: Writers,
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
        writers: Writers,
        stop: Arc<AtomicBool>,
    ) -> Self {
        Reader {
            consumer,
            s,
            writers,
            stop,
            batch: Batch::default(),
            generation: 0,
            missing: std::collections::HashSet::new(),
            beat: Beat::register("inbox-consumer"),
        }
    }

    fn run(mut self) -> Result<(), InboxError> {
        let result = self.poll_until_stopped();
        // Leaving the group revokes the partitions: the writers write
        // what they hold first (the rebalance callback waits for them).
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
            if self.consumer.context().broken.load(Ordering::SeqCst) || self.writers.closed() {
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

    /// Hands the batch to the writers (waiting while one is busy).
    fn send(&mut self) -> Result<(), InboxError> {
        if self.batch.len() == 0 {
            return Ok(());
        }
        let batch = std::mem::take(&mut self.batch);
        // A writer gone means the session is ending; its error says why.
        let _ = self.writers.send(batch);
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
