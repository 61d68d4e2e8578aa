//! Exactly-once at the relay: what is already in Kafka before this process
//! streams anything, and dropping it.
//!
//! ```text
//!  connect ──IDENTIFY_SYSTEM, START_REPLICATION──► Source key ──(once) init_transactions, checkpoint topic ready, read C──► C
//!                                └─ every connect: C ≤ server's WAL position, or refuse to start
//!  progress::Fact ──Checkpoint::covers(C)?──► yes: acked at once, counted, not sent
//!                                         └─► no: delivered
//! ```
//!
//! Owns the source's checkpoint key (shared with the transaction flusher,
//! which writes it), C as read at start, and the count of dropped units.
//!
//! **Invariants**
//! - `init_transactions` of both producers runs before C is read: it
//!   fences any older producer with either transactional id and aborts its
//!   open transaction, so no checkpoint can be committed behind our back
//!   after we read C.
//! - Nothing streamed is read before C is known (or `--reset-checkpoint`
//!   said to ignore it), and C never passes the server's WAL position.
//! - `init_transactions` runs only once START_REPLICATION holds the slot: a
//!   relay that did not get the slot never fences the one that did.
//! - C is read once per process. Later connections restart at the stream's
//!   watermark, which is past every unit committed since (the relay waits
//!   for the flusher's answer to a reset before it restarts the stream).
//! - The key never changes within a process: a different server behind the
//!   same URL is refused.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::watch;

use super::RelayError;
use crate::lsn::Lsn;
use crate::progress::Fact;
use crate::sink::checkpoint::{self, Checkpoint, Source};
use crate::sink::topics::{off_thread, Topics};
use crate::sink::{KafkaProducer, SinkSettings};
use crate::source::SystemIdentity;

/// How long one `init_transactions` or checkpoint read may block.
const KAFKA_TIMEOUT: Duration = Duration::from_secs(30);

/// Why exactly-once refuses to go on.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    /// The server's identity changed between connections.
    #[error("the PostgreSQL server changed while the relay ran: it was {was}, it is now {now}; restart the relay to read that server's checkpoint")]
    ServerChanged {
        /// The key of the first server.
        was: String,
        /// The key of this one.
        now: String,
    },
    /// The checkpoint is beyond the server's WAL.
    #[error(
        "the checkpoint in {topic:?} for this source says Kafka already holds every fact up to \
         {checkpoint}, but the server's WAL only reaches {server}: this is a restored or \
         different database under the same system identifier, database name and slot. Starting \
         would drop its facts up to {checkpoint}. If that is so and this database's facts \
         must be relayed from its slot, start once with --reset-checkpoint"
    )]
    Ahead {
        /// The checkpoint topic.
        topic: String,
        /// C.
        checkpoint: Lsn,
        /// The server's WAL position.
        server: Lsn,
    },
}

impl CheckpointError {
    /// Always false: both need someone to decide.
    pub fn is_transient(&self) -> bool {
        false
    }
}

/// What the relay needs to deliver exactly once.
pub(super) struct Exactly {
    /// The transaction flusher's two producers, for `init_transactions`.
    producers: [KafkaProducer; 2],
    sink: SinkSettings,
    topics: Topics,
    topic: String,
    slot: String,
    reset_checkpoint: bool,
    /// The checkpoint key, once the server is identified.
    source: Arc<OnceLock<Bytes>>,
    initialized: bool,
    /// C, once read: `Some(None)` when there is none (or it is ignored).
    checkpoint: Option<Option<Checkpoint>>,
    /// Facts and units dropped since the last log line.
    dropped: (u64, u64),
}

/// What [`Exactly::prepare`] settled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Prepared {
    /// Streaming may start.
    Ready,
    /// A stop was requested while waiting for Kafka.
    Stopped,
}

impl Exactly {
    pub(super) fn new(
        producers: [KafkaProducer; 2],
        sink: SinkSettings,
        topics: Topics,
        checkpoint_topic: String,
        slot: String,
        reset_checkpoint: bool,
        source: Arc<OnceLock<Bytes>>,
    ) -> Self {
        Exactly {
            producers,
            sink,
            topics,
            topic: checkpoint_topic,
            slot,
            reset_checkpoint,
            source,
            initialized: false,
            checkpoint: None,
            dropped: (0, 0),
        }
    }

    /// Before streaming from a connection to the server `id`: fixes the
    /// key, starts transactions and reads C (once), and checks C against
    /// the server's WAL (every time).
    pub(super) async fn prepare(
        &mut self,
        id: &SystemIdentity,
        dbname: &str,
        stop: &mut watch::Receiver<bool>,
    ) -> Result<Prepared, RelayError> {
        let source = Source {
            system_id: id.system_id.clone(),
            database: id.dbname.clone().unwrap_or_else(|| dbname.to_owned()),
            slot: self.slot.clone(),
        };
        let key = source.key();
        let known = self.source.get_or_init(|| key.clone());
        if *known != key {
            return Err(CheckpointError::ServerChanged {
                was: String::from_utf8_lossy(known).into_owned(),
                now: String::from_utf8_lossy(&key).into_owned(),
            }
            .into());
        }
        // init_transactions and making sure of the checkpoint topic do not
        // depend on each other: they run together. C is read after both.
        let init = async {
            if self.initialized {
                return Ok(());
            }
            let init = |producer: &KafkaProducer| {
                let producer = producer.clone();
                off_thread("factlib-txn-init", move || {
                    producer.init_transactions(KAFKA_TIMEOUT)
                })
            };
            let [first, second] = &self.producers;
            let (first, second) = tokio::join!(init(first), init(second));
            first.and(second)
        };
        let topic = async {
            match self.checkpoint {
                Some(_) => Ok(()),
                None => self.topics.checkpoints(&self.topic).await,
            }
        };
        // A definite answer about the topic (the brokers refused the
        // credentials, say) need not wait for init_transactions, which
        // librdkafka retries until its timeout; the relay stops on it.
        let both = async {
            tokio::pin!(init, topic);
            tokio::select! {
                t = &mut topic => match t {
                    Err(e) if !e.is_transient() => (None, Err(e)),
                    t => (Some(init.await), t),
                },
                i = &mut init => (Some(i), topic.await),
            }
        };
        let Some((init, topic)) = until_stopped(both, stop).await else {
            return Ok(Prepared::Stopped);
        };
        if let Some(init) = init {
            init?;
            self.initialized = true;
        }
        topic?;
        let c = match self.checkpoint {
            Some(c) => c,
            None => {
                let (sink, topic) = (self.sink.clone(), self.topic.clone());
                let [client, _] = &self.producers;
                let client = client.clone();
                let read = off_thread("factlib-checkpoint", move || {
                    if checkpoint::holds_nothing(&client, &topic, KAFKA_TIMEOUT)? {
                        return Ok(None);
                    }
                    checkpoint::read(&sink, &topic, &key, KAFKA_TIMEOUT)
                });
                let Some(read) = until_stopped(read, stop).await else {
                    return Ok(Prepared::Stopped);
                };
                let found = read?.map(Checkpoint);
                let c = match found {
                    Some(c) if self.reset_checkpoint => {
                        tracing::warn!(checkpoint = %c.0, topic = %self.topic,
                            "--reset-checkpoint: ignoring the stored checkpoint; the next commit replaces it");
                        None
                    }
                    other => other,
                };
                tracing::info!(
                    checkpoint = %c.map_or_else(|| "none".to_owned(), |c| c.0.to_string()),
                    topic = %self.topic,
                    "exactly-once: read the checkpoint; units up to it are already in Kafka"
                );
                self.checkpoint = Some(c);
                c
            }
        };
        if let Some(c) = c.filter(|c| c.0 > id.xlogpos) {
            return Err(CheckpointError::Ahead {
                topic: self.topic.clone(),
                checkpoint: c.0,
                server: id.xlogpos,
            }
            .into());
        }
        Ok(Prepared::Ready)
    }

    /// True if `fact` is already in Kafka: it is then counted, and must be
    /// acked without being sent.
    pub(super) fn already_in_kafka(&mut self, fact: &Fact) -> bool {
        let covered = self
            .checkpoint
            .flatten()
            .is_some_and(|c| c.covers(fact.lsn, fact.txn.map(|t| t.commit_lsn)));
        if covered {
            self.dropped.0 += 1;
            self.dropped.1 += u64::from(fact.unit_end.is_some());
        } else {
            self.log_dropped();
        }
        covered
    }

    /// Logs the facts dropped since the last call, if any.
    pub(super) fn log_dropped(&mut self) {
        let (facts, units) = std::mem::take(&mut self.dropped);
        if facts > 0 {
            tracing::info!(
                units,
                facts,
                checkpoint = %self.checkpoint.flatten().map_or(Lsn::INVALID, |c| c.0),
                "dropped units the checkpoint says are already in Kafka"
            );
        }
    }
}

/// Awaits `fut` unless a stop is requested first.
async fn until_stopped<F: std::future::Future>(
    fut: F,
    stop: &mut watch::Receiver<bool>,
) -> Option<F::Output> {
    tokio::select! {
        out = fut => Some(out),
        _ = stop.wait_for(|s| *s) => None,
    }
}
