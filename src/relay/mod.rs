//! `factlib relay`: wires the stages and owns the lifecycle: connecting,
//! retrying transient failures with jittered backoff, confirming, and
//! shutting down.
//!
//! ```text
//!  source (ReplicationStream) ──CopyRun──► progress::Stream ──Fact──► deliver (route, record) ──► rings ──► sink flushers ──► Kafka
//!        ▲                                       ▲                                                             │
//!        └── confirm(watermark) ◄────────────────┴──── acks (ledger) ◄──────── delivery reports ◄──────────────┘
//! ```
//!
//! - [`run`] wires the stages and nothing else.
//! - `Relay::run` (here) is the lifecycle: sessions, retries, the final stop.
//! - `session` streams one connection; `deliver` turns one fact into a
//!   record on its ring; `acks` applies delivery reports.
//!
//! **Invariants**
//! - The flush position sent to PostgreSQL is the stream's watermark: the
//!   end of the last unit of the contiguous fully-acknowledged prefix.
//! - A definite error stops the relay without confirming past the failed
//!   fact. A transient one (the connection lost, Kafka unreachable) ends the
//!   session; the relay waits until everything already handed to Kafka is
//!   acknowledged, then streams again exactly from the watermark after a
//!   backoff; acks from an older connection are ignored.
//! - The backoff starts over after a healthy session (`crate::backoff`): one
//!   that got its first message and streamed for [`HEALTHY_SESSION`].
//! - On SIGTERM/SIGINT: stop reading at a transaction boundary, wait (up to
//!   the shutdown timeout) for in-flight facts, send the final position,
//!   exit 0.
//!
//! **Exactly-once** (`DeliveryMode::ExactlyOnce`): one ring and one
//! transaction flusher (`sink::txn`) carry the facts in stream order; a
//! fact counts as acknowledged only when the Kafka transaction holding its
//! whole unit commits, with the checkpoint. After a transient failure the
//! flusher drops what it holds of the old session and commits (whole units)
//! or aborts (a partial one) before the stream restarts at the watermark.
//! `exactly` reads the checkpoint at start and drops units already in
//! Kafka.

mod acks;
mod deliver;
mod exactly;
mod session;

pub use crate::backoff::{HEALTHY_SESSION, MIN_DELAY};
pub use exactly::CheckpointError;

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use tokio::sync::{watch, Notify};

use crate::backoff::{self, Backoff};
use crate::lsn::Lsn;
use crate::progress::{ProgressError, Stream, StreamError};
use crate::route::{checkpoint_topic, RingSettings, Rings, RouteError, Router, TopicTemplate};
use crate::sink::topics::Topics;
use crate::sink::txn::{transactional_ids, TxnSettings, TxnWiring};
use crate::sink::{CreateTopics, KafkaProducer, RecordShape, SinkError, SinkSettings};
use crate::source::{ConnectionConfig, SourceError, SourceSettings};
use crate::telemetry;

use acks::{Acks, Drained, Progress};
use deliver::Deliver;
use exactly::Exactly;

/// Exactly-once's one ring holds this many times `--ring-capacity`. In 1M-fact
/// drains 4 × 1024 was as fast as 16 × 1024 and used 25–30 MiB less memory
/// (`perf/README.md`).
pub const EXACTLY_ONCE_RING_FACTOR: usize = 4;

/// Why the relay stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    /// The replication side failed.
    #[error(transparent)]
    Source(#[from] SourceError),
    /// The stream broke the protocol.
    #[error(transparent)]
    Stream(#[from] StreamError),
    /// The Kafka side failed.
    #[error(transparent)]
    Sink(#[from] SinkError),
    /// A fact was refused by Kafka for good; nothing after it is confirmed.
    #[error(transparent)]
    Delivery(Box<Refused>),
    /// Bad routing configuration.
    #[error(transparent)]
    Route(#[from] RouteError),
    /// Exactly-once cannot start from the checkpoint it found.
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    /// Another process streams from the slot: this relay waits as a
    /// standby.
    #[error("replication slot {slot:?} is in use by PID {pid} (another relay?)")]
    SlotInUse {
        /// The slot.
        slot: String,
        /// The walsender serving the other process.
        pid: i32,
    },
    /// The slot is still held by the walsender of this relay's previous
    /// connection, which is exiting (it was just cut off): retried like a
    /// lost connection, not waited out as a standby.
    #[error("replication slot still held by this relay's previous walsender (PID {pid}), which is exiting")]
    OwnWalsenderExiting {
        /// That walsender.
        pid: i32,
    },
    /// An ack that matches no fact in flight.
    #[error("unexpected delivery report: {0}")]
    Progress(#[from] ProgressError),
    /// Starting a thread failed.
    #[error("cannot start a flusher thread: {0}")]
    Thread(#[source] std::io::Error),
    /// The metrics endpoint cannot start.
    #[error(transparent)]
    Telemetry(#[from] telemetry::TelemetryError),
    /// A bug: an invariant of the relay itself broke.
    #[error("internal error: {0}")]
    Internal(&'static str),
}

impl RelayError {
    /// True if waiting and streaming again from the watermark may succeed:
    /// each layer's own classification. The relay retries these and stops
    /// on the rest.
    pub fn is_transient(&self) -> bool {
        match self {
            RelayError::Source(e) => e.is_transient(),
            RelayError::Stream(e) => e.is_transient(),
            RelayError::Sink(e) => e.is_transient(),
            RelayError::Route(e) => e.is_transient(),
            RelayError::Checkpoint(e) => e.is_transient(),
            RelayError::Progress(e) => e.is_transient(),
            RelayError::SlotInUse { .. } | RelayError::OwnWalsenderExiting { .. } => true,
            RelayError::Telemetry(e) => e.is_transient(),
            RelayError::Delivery(_) | RelayError::Thread(_) | RelayError::Internal(_) => false,
        }
    }

    /// True when another process holds the slot: checked before streaming,
    /// or refused by START_REPLICATION (two relays checked at once).
    fn slot_in_use(&self) -> bool {
        match self {
            RelayError::SlotInUse { .. } | RelayError::OwnWalsenderExiting { .. } => true,
            RelayError::Source(e) => e.sqlstate() == Some("55006"),
            _ => false,
        }
    }
}

/// A fact Kafka refused for good.
#[derive(Debug, thiserror::Error)]
#[error("Kafka refused a fact for good (topic {topic:?}, {bytes} bytes): {error}{advice}\n  the slot stays before it: fix the cause and restart the relay")]
pub struct Refused {
    /// Where it was going.
    pub topic: String,
    /// Its key + value bytes.
    pub bytes: usize,
    /// Kafka's error.
    pub error: rdkafka::error::KafkaError,
    /// What to do about it, when there is something specific to say.
    pub advice: String,
}

/// How facts reach Kafka.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum DeliveryMode {
    /// Every fact at least once: idempotent producer, delivery reports.
    #[default]
    AtLeastOnce,
    /// Every fact exactly once for `read_committed` consumers: Kafka
    /// transactions of whole units, with a checkpoint.
    ExactlyOnce(ExactlyOnce),
}

/// Exactly-once settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExactlyOnce {
    /// `--transactional-id`: the two producers' `transactional.id`s are
    /// this with `-0` and `-1` appended.
    pub transactional_id: String,
    /// Commit a transaction once it is this old (at the next unit end).
    pub txn_max: Duration,
    /// Commit a transaction once it holds this many facts (at the next
    /// unit end).
    pub txn_max_facts: usize,
    /// Ignore the stored checkpoint once (a restored or different database).
    pub reset_checkpoint: bool,
}

/// Everything the relay needs to know. `Default` is the documented default
/// of each setting.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelaySettings {
    /// The PostgreSQL server and role.
    pub connection: ConnectionConfig,
    /// The replication slot.
    pub slot: String,
    /// The publication the slot streams.
    pub publication: String,
    /// The logical-message prefix that marks a fact.
    pub prefix: String,
    /// The topic for each fact.
    pub template: TopicTemplate,
    /// The replication connection.
    pub source: SourceSettings,
    /// At-least-once or exactly-once.
    pub delivery: DeliveryMode,
    /// The Kafka producer.
    pub sink: SinkSettings,
    /// The rings between the reader and the flushers.
    pub rings: RingSettings,
    /// How facts become records.
    pub shape: RecordShape,
    /// Create missing topics (with these settings) instead of stopping.
    pub create_topics: Option<CreateTopics>,
    /// Confirm newly acknowledged positions at most this often.
    pub confirm_interval: Duration,
    /// How often to log a progress line; `None` for never.
    pub progress_interval: Option<Duration>,
    /// On a stop, wait at most this long for in-flight facts.
    pub shutdown_timeout: Duration,
    /// The longest wait between attempts after a transient failure.
    pub max_backoff: Duration,
    /// How often a standby checks whether the slot is free.
    pub standby_poll: Duration,
    /// Stop once everything up to this position is confirmed.
    pub stop_at_lsn: Option<Lsn>,
    /// Serve metrics, `/healthz` and `/readyz`; `None`: don't.
    pub metrics: Option<telemetry::MetricsSettings>,
    /// How outbox-table rows become facts.
    pub outbox: crate::outbox::OutboxSettings,
}

impl Default for RelaySettings {
    fn default() -> Self {
        RelaySettings {
            connection: ConnectionConfig {
                hosts: vec![crate::source::Endpoint {
                    host: "127.0.0.1".into(),
                    hostaddr: None,
                    port: 54329,
                }],
                target_session_attrs: crate::source::SessionAttrs::Any,
                user: "factlib".into(),
                password: Some("factlib".into()),
                dbname: "factlib".into(),
                tls: crate::source::TlsSettings::default(),
            },
            slot: "factlib".into(),
            publication: "factlib".into(),
            prefix: crate::fact::DEFAULT_PREFIX.into(),
            template: TopicTemplate::default(),
            source: SourceSettings::default(),
            delivery: DeliveryMode::AtLeastOnce,
            sink: SinkSettings::default(),
            rings: RingSettings::default(),
            shape: RecordShape::default(),
            create_topics: None,
            confirm_interval: Duration::from_secs(1),
            progress_interval: Some(Duration::from_secs(10)),
            shutdown_timeout: Duration::from_secs(30),
            max_backoff: Duration::from_secs(30),
            standby_poll: Duration::from_secs(1),
            stop_at_lsn: None,
            metrics: None,
            outbox: crate::outbox::OutboxSettings::default(),
        }
    }
}

/// Runs the relay until `stop` turns true (SIGTERM/SIGINT) or a definite
/// error. Wires the stages; [`Relay::run`] does the rest.
pub async fn run(settings: RelaySettings, stop: watch::Receiver<bool>) -> Result<(), RelayError> {
    if let Some(m) = &settings.metrics {
        telemetry::serve(m)?;
    }
    let (ack_tx, ack_rx) = crossbeam::channel::unbounded();
    let wake = Arc::new(Notify::new());
    let exactly_once = match &settings.delivery {
        DeliveryMode::AtLeastOnce => None,
        DeliveryMode::ExactlyOnce(e) => Some(e),
    };
    let ids = exactly_once.map(|e| transactional_ids(&e.transactional_id));
    let producer_with = |id: Option<&String>| {
        KafkaProducer::new(
            &settings.sink,
            id.map(String::as_str),
            ack_tx.clone(),
            Arc::clone(&wake),
        )
    };
    let producer = producer_with(ids.as_ref().map(|[first, _]| first))?;
    let r = ring_layout(settings.rings, exactly_once.is_some());
    let rings = Rings::new(r.rings, r.capacity, r.flushers)?;
    let router = Router::new(&settings.prefix, settings.template.clone(), r.rings)?;
    let topics = || Topics::new(producer.clone(), settings.create_topics);
    let mut flushers = Vec::new();
    let (progress, exactly) = match exactly_once {
        None => {
            for k in 0..rings.flusher_count() {
                let h = crate::sink::flusher::spawn(
                    k,
                    Arc::clone(&rings),
                    producer.clone(),
                    ack_tx.clone(),
                    Arc::clone(&wake),
                )
                .map_err(RelayError::Thread)?;
                flushers.push(h);
            }
            (Progress::PerRecord, None)
        }
        Some(e) => {
            let (commands, command_rx) = crossbeam::channel::unbounded();
            let source = Arc::new(OnceLock::new());
            let topic = checkpoint_topic(&settings.prefix);
            let txn = TxnSettings {
                max_duration: e.txn_max,
                max_records: e.txn_max_facts,
                checkpoint_topic: topic.as_str().into(),
            };
            let second = producer_with(ids.as_ref().map(|[_, second]| second))?;
            let wiring = TxnWiring {
                rings: Arc::clone(&rings),
                source: Arc::clone(&source),
                commands: command_rx,
                reports: ack_tx.clone(),
                wake: Arc::clone(&wake),
            };
            let h = crate::sink::txn::spawn([producer.clone(), second.clone()], txn, wiring)
                .map_err(RelayError::Thread)?;
            flushers.push(h);
            let exactly = Exactly::new(
                [producer.clone(), second],
                settings.sink.clone(),
                topics(),
                topic,
                settings.slot.clone(),
                e.reset_checkpoint,
                source,
            );
            (Progress::PerCommit(commands), Some(exactly))
        }
    };
    drop(ack_tx);
    let relay = Relay {
        stream: Stream::new(&settings.prefix, Lsn::INVALID).with_outbox(settings.outbox.clone()),
        acks: Acks::new(ack_rx, wake, progress, settings.sink.max_message_bytes),
        deliver: Deliver::new(router, topics(), Arc::clone(&rings), settings.shape),
        exactly,
        backoff: Backoff::new(settings.max_backoff, backoff::seed()),
        own_walsender: None,
        standby_since: None,
        clock: telemetry::CommitClock::new(),
        settings,
        stop,
    };
    let heartbeat = telemetry::spawn_heartbeat("relay");
    let result = relay.run().await;
    heartbeat.abort();
    rings.close();
    for h in flushers {
        let _ = h.join();
    }
    let _ = producer.flush(Duration::from_secs(5));
    result
}

/// The rings for a delivery mode. Exactly-once keeps one stream order:
/// one ring of [`EXACTLY_ONCE_RING_FACTOR`] × the ring capacity, and one
/// flusher.
fn ring_layout(r: RingSettings, exactly_once: bool) -> RingSettings {
    if exactly_once {
        RingSettings {
            rings: 1,
            capacity: r.capacity.saturating_mul(EXACTLY_ONCE_RING_FACTOR),
            flushers: 1,
        }
    } else {
        r
    }
}

/// The relay's state across connections; each piece has this one owner.
struct Relay {
    settings: RelaySettings,
    /// The stream's units and the watermark.
    stream: Stream,
    /// Delivery reports.
    acks: Acks,
    /// Facts to records on their rings.
    deliver: Deliver,
    /// Exactly-once: the checkpoint, and dropping what it covers.
    exactly: Option<Exactly>,
    /// When to connect again after a transient failure.
    backoff: Backoff,
    /// The walsender of this relay's latest connection: a slot it still
    /// holds is this relay's own, not another relay's.
    own_walsender: Option<i32>,
    /// Since when this relay waits as a standby for the slot.
    standby_since: Option<std::time::Instant>,
    /// Commit → ack timing of the transactions in flight.
    clock: telemetry::CommitClock,
    stop: watch::Receiver<bool>,
}

/// How a session ended.
enum Ended {
    /// Stop requested; everything confirmed that could be.
    Stopped,
    /// A transient failure, after streaming for `streamed` since the
    /// first message (`None`: start-up never got that far).
    Lost {
        error: RelayError,
        streamed: Option<Duration>,
    },
}

impl Relay {
    /// Sessions until a stop or a definite error.
    async fn run(mut self) -> Result<(), RelayError> {
        loop {
            let (error, streamed) = match self.session().await? {
                Ended::Stopped => return Ok(()),
                Ended::Lost { error, streamed } => (error, streamed),
            };
            let failed_at = tokio::time::Instant::now();
            let wait = if error.slot_in_use() {
                if self.standby_since.is_none() {
                    self.standby_since = Some(std::time::Instant::now());
                    telemetry::Standby {
                        error: &error,
                        poll: self.settings.standby_poll,
                    }
                    .emit();
                }
                self.settings.standby_poll
            } else {
                let retry = self.backoff.after(streamed);
                telemetry::Interrupted {
                    error: &error,
                    attempt: retry.attempt,
                    retry_in: retry.delay,
                    streamed,
                }
                .emit();
                retry.delay
            };
            // What was handed to Kafka must be settled (acknowledged, or
            // in exactly-once committed or aborted) before streaming
            // restarts at the watermark. The wait runs from the failure,
            // so settling is part of it.
            if self
                .acks
                .settle(&mut self.stream, &mut self.stop, None)
                .await?
                == Drained::Stopped
            {
                return Ok(());
            }
            self.clock.acknowledged_through(self.stream.watermark());
            self.stream.restart();
            self.clock.clear();
            self.acks.next_generation();
            tokio::select! {
                _ = tokio::time::sleep_until(failed_at + wait) => {}
                _ = self.stop.wait_for(|s| *s) => return Ok(()),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_say_whether_they_are_transient() {
        let lost = RelayError::Source(SourceError::Closed);
        assert!(lost.is_transient());
        let kafka_away = RelayError::Sink(SinkError::Metadata {
            topic: "t".into(),
            source: rdkafka::error::KafkaError::MetadataFetch(
                rdkafka::types::RDKafkaErrorCode::AllBrokersDown,
            ),
        });
        assert!(kafka_away.is_transient());
        assert!(!RelayError::Sink(SinkError::TopicMissing("t".into())).is_transient());
        assert!(!RelayError::Progress(ProgressError::NotOpen).is_transient());
        assert!(!RelayError::Internal("x").is_transient());
    }
}
