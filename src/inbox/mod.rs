//! `factlib inbox`: the consuming service's half of exactly-once. Reads
//! facts from Kafka (`read_committed`) and writes each, decoded, into
//! `factlib.inbox` in the service's own PostgreSQL, with the consumed
//! offsets in the same transaction; and the API services process the inbox
//! with ([`Consumer`]).
//!
//! ```text
//!  Kafka ──consumer thread (record::take, Batch)──► bounded channel ──► writer: one transaction per batch
//!    ▲ seek to the stored offsets on every assignment ◄── factlib.inbox_offsets ◄──┘ (facts + offsets)
//!  service workers (SQL, or factlib::inbox::Consumer) ──FOR UPDATE SKIP LOCKED──► processed_at
//! ```
//!
//! - [`run`] wires the stages; `Inbox` (here) owns the lifecycle: sessions,
//!   retries with the shared backoff, the stop.
//! - `consumer` is the Kafka side, `writer` the database side, `record`
//!   turns a record into a row or a dead letter, `retention` deletes old
//!   processed rows, `schema` installs the tables, `worker` is the
//!   processing API.
//!
//! **Invariants**
//! - A fact is in the inbox once or not at all: its row and the offset past
//!   it commit together, positions come only from the database, and the
//!   fact id is the primary key.
//! - A transient failure (the database or Kafka gone, a rebalance this
//!   process missed) ends the session: the consumer leaves the group, and
//!   the next session reads the stored offsets again after a backoff.
//! - On SIGTERM/SIGINT the consumer stops polling, the batch being filled
//!   and every batch already read are written, then the process exits 0.

mod consumer;
mod record;
mod retention;
pub(crate) mod schema;
mod worker;
mod writer;

pub use worker::{Consumer, ConsumerOptions, Handler, InboxFact, ProcessError, CLAIM_SQL};

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt as _;
use tokio::sync::{mpsc, watch};
use tokio_postgres::Client;

use crate::backoff::{self, Backoff};
use crate::sink::KafkaSecurity;
use crate::source::sql::{self, is_transient_state, pg_message, SqlConnectError};
use crate::telemetry::{self, MetricsSettings, TelemetryError};
use consumer::{ConsumerSettings, Writers, CHANNEL_BATCHES};
use writer::Writer;

/// What `--topics` names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Subscription {
    /// These topics.
    Topics(Vec<String>),
    /// Every topic matching this regular expression (librdkafka's syntax;
    /// it starts with `^`).
    Pattern(String),
}

/// Everything `factlib inbox` needs. `Default` is the documented default
/// of each setting (with no topics).
#[derive(Debug, Clone)]
pub struct InboxSettings {
    /// The consuming service's PostgreSQL (`--inbox-database-url`).
    pub database_url: String,
    /// Kafka bootstrap servers.
    pub brokers: String,
    /// How to reach them.
    pub security: KafkaSecurity,
    /// The consumer group (`--group`).
    pub group: String,
    /// What to read (`--topics`).
    pub topics: Subscription,
    /// A batch is written once it holds this many records.
    pub batch_max_facts: usize,
    /// ... or once its first record is this old.
    pub batch_max: Duration,
    /// Database connections writing batches at once; each partition has
    /// one.
    pub writers: usize,
    /// librdkafka's fetch queue, in KiB (`queued.max.messages.kbytes`).
    pub fetch_queue_kbytes: usize,
    /// Kafka's `session.timeout.ms`: how soon a dead process's partitions
    /// go to the others.
    pub session_timeout: Duration,
    /// Extra librdkafka consumer properties, applied last.
    pub consumer_properties: Vec<(String, String)>,
    /// Delete processed rows older than this; `None`: keep them.
    pub retention: Option<Duration>,
    /// The longest wait between attempts after a transient failure.
    pub max_backoff: Duration,
    /// How often to log a progress line; `None` for never.
    pub progress_interval: Option<Duration>,
    /// Serve metrics, `/healthz` and `/readyz`; `None`: don't.
    pub metrics: Option<MetricsSettings>,
}

impl Default for InboxSettings {
    fn default() -> Self {
        InboxSettings {
            database_url: "postgresql://factlib:factlib@127.0.0.1:54329/factlib".into(),
            brokers: "127.0.0.1:19092".into(),
            security: KafkaSecurity::default(),
            group: "factlib-inbox".into(),
            topics: Subscription::Topics(Vec::new()),
            batch_max_facts: 1_000,
            batch_max: Duration::from_millis(50),
            writers: 2,
            fetch_queue_kbytes: 16 * 1024,
            session_timeout: Duration::from_secs(10),
            consumer_properties: Vec::new(),
            retention: None,
            max_backoff: Duration::from_secs(30),
            progress_interval: Some(Duration::from_secs(10)),
            metrics: None,
        }
    }
}

/// Why the inbox stopped, or a session ended.
#[derive(Debug, thiserror::Error)]
pub enum InboxError {
    /// The inbox database could not be reached.
    #[error("inbox database: {0}")]
    Connect(#[from] SqlConnectError),
    /// A statement failed.
    #[error("inbox database: {context}: {}", pg_message(.source))]
    Db {
        /// What was being done.
        context: &'static str,
        /// The driver's error.
        #[source]
        source: tokio_postgres::Error,
    },
    /// The schema is missing or of another version.
    #[error("{0}")]
    Schema(String),
    /// Another process moved a partition's stored offset on: this one
    /// lost it in a rebalance it had not seen yet. Its batch was rolled
    /// back; the next session reads the offsets again.
    #[error("the stored offsets of {partitions} partition(s) moved under this inbox (another process took them in a rebalance); its batch was rolled back")]
    Fenced {
        /// How many partitions moved.
        partitions: usize,
    },
    /// The Kafka consumer could not be created or subscribe (a bad
    /// setting or pattern).
    #[error("kafka consumer: {0}")]
    KafkaClient(#[source] rdkafka::error::KafkaError),
    /// The brokers refused the credentials.
    #[error("Kafka refused the inbox's credentials ({0}): check --kafka-sasl-username and --kafka-sasl-password")]
    KafkaAuthentication(String),
    /// Starting the consumer thread failed.
    #[error("cannot start the consumer thread: {0}")]
    Thread(#[source] std::io::Error),
    /// The metrics endpoint cannot start.
    #[error(transparent)]
    Telemetry(#[from] TelemetryError),
    /// The Kafka consumer stopped on its own (a rebalance failed).
    #[error("the Kafka consumer stopped (a rebalance failed); starting again")]
    ConsumerEnded,
    /// A bug: an invariant of the inbox itself broke.
    #[error("internal error: {0}")]
    Internal(&'static str),
}

impl InboxError {
    fn db(context: &'static str, source: tokio_postgres::Error) -> Self {
        InboxError::Db { context, source }
    }

    /// True if a new session may succeed: the database or Kafka
    /// unreachable, a serialization failure, a lost rebalance. A wrong
    /// password, a missing schema or a bad setting is definite.
    pub fn is_transient(&self) -> bool {
        match self {
            InboxError::Connect(e) => e.is_transient(),
            InboxError::Db { source, .. } => {
                source.is_closed() || source.code().is_none_or(|c| is_transient_state(c.code()))
            }
            InboxError::Fenced { .. } | InboxError::ConsumerEnded => true,
            InboxError::Schema(_)
            | InboxError::KafkaClient(_)
            | InboxError::KafkaAuthentication(_)
            | InboxError::Thread(_)
            | InboxError::Telemetry(_)
            | InboxError::Internal(_) => false,
        }
    }
}

/// Connects a SQL session whose connection is driven by a local task.
pub(crate) async fn connect(url: &str) -> Result<Client, InboxError> {
    let (client, mut messages) = sql::connect(url).await?;
    tokio::task::spawn_local(async move { while messages.next().await.is_some() {} });
    Ok(client)
}

/// Runs `factlib inbox` until `stop` turns true or a definite error.
pub async fn run(settings: InboxSettings, stop: watch::Receiver<bool>) -> Result<(), InboxError> {
    telemetry::set_role(telemetry::Role::Inbox);
    if let Some(m) = &settings.metrics {
        telemetry::serve(m)?;
    }
    let heartbeat = telemetry::spawn_heartbeat("inbox");
    let retention = settings.retention.map(|older_than| {
        tokio::task::spawn_local(retention::run(
            settings.database_url.clone(),
            older_than,
            stop.clone(),
        ))
    });
    let progress = settings.progress_interval.map(|every| {
        tokio::task::spawn_local(async move {
            let mut line = telemetry::InboxProgress::new();
            let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
            loop {
                tick.tick().await;
                line.emit();
            }
        })
    });
    let mut inbox = Inbox {
        backoff: Backoff::new(settings.max_backoff, backoff::seed()),
        settings,
        stop,
    };
    let result = inbox.run().await;
    for task in [Some(heartbeat), retention, progress].into_iter().flatten() {
        task.abort();
    }
    result
}

/// The inbox's state across sessions.
struct Inbox {
    settings: InboxSettings,
    backoff: Backoff,
    stop: watch::Receiver<bool>,
}

impl Inbox {
    /// Sessions until a stop or a definite error.
    async fn run(&mut self) -> Result<(), InboxError> {
        loop {
            let mut started = None;
            let error = match self.session(&mut started).await {
                Ok(()) => {
                    tracing::info!("inbox stopped");
                    return Ok(());
                }
                Err(e) if e.is_transient() => e,
                Err(e) => return Err(e),
            };
            let failed_at = tokio::time::Instant::now();
            let ran = started.map(|s: Instant| s.elapsed());
            let retry = self.backoff.after(ran);
            telemetry::Interrupted {
                error: &error,
                attempt: retry.attempt,
                retry_in: retry.delay,
                streamed: ran,
            }
            .emit();
            tokio::select! {
                _ = tokio::time::sleep_until(failed_at + retry.delay) => {}
                _ = self.stop.wait_for(|s| *s) => return Ok(()),
            }
        }
    }

    /// One session: a database connection and a consumer in the group,
    /// until a stop (`Ok`) or an error. `started` is set once both run.
    async fn session(&mut self, started: &mut Option<Instant>) -> Result<(), InboxError> {
        if *self.stop.borrow() {
            return Ok(());
        }
        let s = &self.settings;
        let mut writers = Vec::with_capacity(s.writers);
        let mut channels = Vec::with_capacity(s.writers);
        for _ in 0..s.writers.max(1) {
            let client = connect(&s.database_url).await?;
            if writers.is_empty() {
                schema::check(&client).await?;
            }
            let (tx, rx) = mpsc::channel(CHANNEL_BATCHES);
            writers.push(Writer::new(client, s.group.clone()).await?.run(rx));
            channels.push(tx);
        }
        let halt = Arc::new(AtomicBool::new(false));
        let settings = ConsumerSettings {
            brokers: s.brokers.clone(),
            security: s.security.clone(),
            group: s.group.clone(),
            topics: s.topics.clone(),
            batch_max_facts: s.batch_max_facts,
            batch_max: s.batch_max,
            fetch_queue_kbytes: s.fetch_queue_kbytes,
            session_timeout: s.session_timeout,
            extra: s.consumer_properties.clone(),
            statistics: s.metrics.is_some(),
        };
        let thread = consumer::spawn(&settings, Writers::new(channels), Arc::clone(&halt))?;
        *started = Some(Instant::now());
        telemetry::set_working(true);
        tracing::info!(group = %s.group, topics = ?s.topics, writers = s.writers, "inbox: consuming into factlib.inbox");
        // The first writer's error ends them all (and so the consumer).
        let written = futures_util::future::try_join_all(writers);
        tokio::pin!(written);
        let mut waiting = true;
        let result = loop {
            tokio::select! {
                r = &mut written => break r,
                stop = self.stop.wait_for(|s| *s), if waiting => {
                    waiting = false;
                    if stop.is_ok() {
                        tracing::info!("inbox: stopping; writing what was read");
                        halt.store(true, Ordering::Relaxed);
                    }
                }
            }
        };
        telemetry::set_working(false);
        halt.store(true, Ordering::Relaxed);
        let consumed = tokio::task::spawn_blocking(move || thread.join())
            .await
            .map_err(|_| InboxError::Internal("the consumer thread's join failed"))?
            .map_err(|_| InboxError::Internal("the consumer thread panicked"))?;
        result?;
        consumed?;
        if *self.stop.borrow() {
            Ok(())
        } else {
            Err(InboxError::ConsumerEnded)
        }
    }
}
