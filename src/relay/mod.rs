//! `factlib relay`: wires the stages and owns the lifecycle — connecting,
//! reconnecting with jittered backoff, confirming, and shutting down.
//!
//! ```text
//!  source (ReplicationStream) ──► session::handle ──► rings ──► sink flushers ──► Kafka
//!        ▲                                                            │
//!        └── confirm(watermark) ◄── progress::Tracker ◄── acks ◄──────┘
//! ```
//!
//! **Invariants**
//! - The flush position sent to PostgreSQL is the tracker's watermark: the
//!   end of the last unit of the contiguous fully-acknowledged prefix.
//! - A permanent delivery failure stops the relay without confirming past
//!   the failed fact.
//! - After a lost connection the relay waits until everything already
//!   handed to Kafka is acknowledged, then restarts streaming exactly at the
//!   watermark; acks from an older connection are ignored.
//! - On SIGTERM/SIGINT: stop reading at a transaction boundary, wait (up to
//!   the shutdown timeout) for in-flight facts, send the final position,
//!   exit 0.

mod session;

use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam::channel::{Receiver, TryRecvError};
use tokio::sync::{watch, Notify};

use crate::config::{CommonArgs, ConnectionConfig, RelayArgs};
use crate::lsn::Lsn;
use crate::pgwire::backend::CopyRun;
use crate::progress::{ProgressError, Token, Tracker};
use crate::route::{Rings, RouteError, TopicTemplate};
use crate::sink::topics::{CreateTopics, Topics};
use crate::sink::{Delivery, KafkaProducer, ProducerConfig, Record, RecordShape, SinkError};
use crate::source::{effective_transport, ReplicationStream, SourceError};
use crate::telemetry::{self, ProgressReporter};

/// Why the relay stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    /// The replication side failed for good.
    #[error(transparent)]
    Source(#[from] SourceError),
    /// The Kafka side failed for good.
    #[error(transparent)]
    Sink(#[from] SinkError),
    /// A fact was refused by Kafka for good; nothing after it is confirmed.
    #[error("Kafka refused a fact for good (topic {topic:?}): {error}; the slot stays before it: fix the cause and restart the relay")]
    Delivery {
        /// Where it was going.
        topic: String,
        /// Kafka's error.
        error: rdkafka::error::KafkaError,
    },
    /// Bad routing configuration.
    #[error(transparent)]
    Route(#[from] RouteError),
    /// The stream broke the transaction structure the tracker relies on.
    #[error("unexpected replication stream structure: {0}")]
    Progress(#[from] ProgressError),
    /// A bad setting.
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    /// Starting a thread failed.
    #[error("cannot start a flusher thread: {0}")]
    Thread(#[source] std::io::Error),
    /// A bug: an invariant of the relay itself broke.
    #[error("internal error: {0}")]
    Internal(&'static str),
}

/// The ack token in a record's delivery opaque: connection generation plus
/// the tracker's token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Opaque {
    generation: u32,
    token: Token,
}

impl Opaque {
    const TOKEN_BITS: u32 = 40;

    fn into_raw(self) -> usize {
        let t = self.token.into_raw() & ((1 << Self::TOKEN_BITS) - 1);
        usize::try_from((u64::from(self.generation) << Self::TOKEN_BITS) | t).unwrap_or(usize::MAX)
    }

    fn from_raw(raw: usize) -> Self {
        let raw = u64::try_from(raw).unwrap_or(u64::MAX);
        Opaque {
            generation: u32::try_from(raw >> Self::TOKEN_BITS).unwrap_or(u32::MAX),
            token: Token::from_raw(raw & ((1 << Self::TOKEN_BITS) - 1)),
        }
    }
}

/// What every connection shares.
pub(crate) struct Shared {
    prefix: String,
    template: TopicTemplate,
    shape: RecordShape,
    topics: Topics,
    rings: Arc<Rings<Record>>,
    generation: u32,
    /// The newest record of the open transaction, pushed when the next one
    /// arrives or, marked as the batch end, at Commit.
    held: Option<(usize, Record)>,
    /// The previous fact's route (see `session::route`).
    last_route: Option<session::LastRoute>,
}

/// How a session ended.
enum Ended {
    /// Stop requested; everything confirmed that could be.
    Stopped,
    /// The connection failed in a way worth retrying.
    Lost(SourceError),
}

/// Runs the relay until SIGTERM/SIGINT (`stop`) or a definite error.
pub async fn run(
    common: &CommonArgs,
    args: &RelayArgs,
    mut stop: watch::Receiver<bool>,
) -> Result<(), RelayError> {
    let conn = ConnectionConfig::from_url(&common.database_url)?;
    let template = TopicTemplate::parse(&args.topic_template)?;
    let (ack_tx, ack_rx) = crossbeam::channel::unbounded();
    let wake = Arc::new(Notify::new());
    let producer = KafkaProducer::new(
        &ProducerConfig {
            brokers: args.brokers.clone(),
            compression: args.compression.as_str().to_owned(),
            linger_ms: args.linger_ms,
            batch_bytes: args.batch_bytes,
            batch_messages: args.batch_messages,
            queue_messages: args.queue_messages,
            queue_kbytes: args.queue_kbytes,
            extra: args.producer_properties.clone(),
        },
        ack_tx.clone(),
        Arc::clone(&wake),
    )?;
    let rings = Rings::new(
        usize::try_from(args.rings).unwrap_or(64),
        usize::try_from(args.ring_capacity).unwrap_or(8192),
        usize::try_from(args.flushers).unwrap_or(1),
    )?;
    let mut flushers = Vec::new();
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
    drop(ack_tx);
    let create = args.create_topics.then_some(CreateTopics {
        partitions: args.partitions,
        replication: args.replication_factor,
    });
    let mut sh = Shared {
        prefix: common.prefix.clone(),
        template,
        shape: RecordShape {
            value: args.value,
            headers: args.headers,
        },
        topics: Topics::new(producer.clone(), create),
        rings: Arc::clone(&rings),
        generation: 0,
        held: None,
        last_route: None,
    };
    let mut tracker = Tracker::new(Lsn::INVALID);
    let mut backoff = Backoff::new(Duration::from_millis(args.max_backoff_ms));

    let result = loop {
        match session(
            &mut sh,
            common,
            args,
            &conn,
            &mut tracker,
            &ack_rx,
            &wake,
            &mut stop,
        )
        .await
        {
            Ok(Ended::Stopped) => break Ok(()),
            Ok(Ended::Lost(e)) if e.is_transient() => {
                session::push_held(&mut sh).await;
                let wait = backoff.next();
                telemetry::Disconnected {
                    error: &e,
                    retry_in: wait,
                }
                .emit();
                // Everything already handed to Kafka must be acknowledged
                // before streaming restarts at the watermark.
                if let Err(e) =
                    drain(&mut tracker, &ack_rx, &wake, &mut stop, sh.generation, None).await
                {
                    break Err(e);
                }
                let mark = tracker.watermark();
                sh.generation = sh.generation.wrapping_add(1);
                tracker = Tracker::new(mark);
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = stop.wait_for(|s| *s) => break Ok(()),
                }
            }
            Ok(Ended::Lost(e)) => break Err(e.into()),
            Err(e) => break Err(e),
        }
    };
    rings.close();
    for h in flushers {
        let _ = h.join();
    }
    let _ = producer.flush(Duration::from_secs(5));
    result
}

/// Streams from one connection until stop, failure or a lost connection.
#[allow(clippy::too_many_arguments)]
async fn session(
    sh: &mut Shared,
    common: &CommonArgs,
    args: &RelayArgs,
    conn: &ConnectionConfig,
    tracker: &mut Tracker,
    acks: &Receiver<Delivery>,
    wake: &Notify,
    stop: &mut watch::Receiver<bool>,
) -> Result<Ended, RelayError> {
    let start = tracker.watermark();
    let mut stream = match connect(common, args, conn, start).await {
        Ok(s) => s,
        Err(e) if e.is_transient() => return Ok(Ended::Lost(e)),
        Err(e) => return Err(e.into()),
    };
    telemetry::Connected {
        slot: &common.slot,
        backend_pid: stream.backend_pid(),
        start,
        transport: match effective_transport(args.source.transport) {
            crate::config::Transport::Uring => "io_uring",
            _ => "tokio",
        },
    }
    .emit();
    let confirm_every = Duration::from_millis(args.confirm_interval_ms);
    let progress_every =
        (args.progress_interval_secs > 0).then(|| Duration::from_secs(args.progress_interval_secs));
    let mut reporter = ProgressReporter::new();
    let mut next_progress = progress_every.map(|d| Instant::now() + d);
    let mut last_confirm = Instant::now();
    let mut txn = None;
    let mut stopping = false;
    let mut run = CopyRun::default();

    loop {
        apply_acks(tracker, acks, sh.generation)?;
        let mark = tracker.watermark();
        // One clock read per message serves both timers.
        let now = Instant::now();
        if mark > stream.confirmed() && now.duration_since(last_confirm) >= confirm_every {
            stream.confirm(mark);
            if let Err(e) = stream.send_status(false).await {
                return lost(e);
            }
            telemetry::confirmed();
            last_confirm = Instant::now();
        }
        if next_progress.is_some_and(|at| now >= at) {
            reporter.emit(tracker.in_flight(), stream.confirmed(), stream.server_lsn());
            next_progress = progress_every.map(|d| now + d);
        }
        if *stop.borrow() || args.stop_at_lsn.is_some_and(|at| mark >= at) {
            stopping = true;
        }
        if stopping && txn.is_none() {
            return finish(stream, tracker, acks, wake, stop, sh.generation, args).await;
        }
        let deadline = [
            next_progress,
            (mark > stream.confirmed()).then(|| last_confirm + confirm_every),
        ]
        .into_iter()
        .flatten()
        .min();
        let Some(body) = run.next_body() else {
            let interrupt = async {
                tokio::select! {
                    _ = wake.notified() => {}
                    _ = stop.changed(), if !stopping => {}
                    _ = sleep_until(deadline) => {}
                }
            };
            match stream.next_run_or(interrupt).await {
                Ok(Some(r)) => run = r,
                Ok(None) => {}
                Err(e) => return lost(e),
            }
            continue;
        };
        match session::handle(sh, &mut stream, tracker, &mut txn, &run, body).await {
            Ok(()) => {}
            Err(RelayError::Source(e)) => return lost(e),
            Err(e) => return Err(e),
        }
    }
}

fn lost(e: SourceError) -> Result<Ended, RelayError> {
    Ok(Ended::Lost(e))
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d.into()).await,
        None => std::future::pending().await,
    }
}

async fn connect(
    common: &CommonArgs,
    args: &RelayArgs,
    conn: &ConnectionConfig,
    start: Lsn,
) -> Result<ReplicationStream, SourceError> {
    let mut stream = ReplicationStream::connect(conn, &args.source).await?;
    stream.identify_system().await?;
    stream
        .start_pgoutput(&common.slot, start, &common.publication)
        .await?;
    Ok(stream)
}

/// Applies every ack received so far.
fn apply_acks(
    tracker: &mut Tracker,
    acks: &Receiver<Delivery>,
    generation: u32,
) -> Result<(), RelayError> {
    loop {
        match acks.try_recv() {
            Ok(Delivery::Acked { opaque, bytes }) => {
                let o = Opaque::from_raw(opaque);
                if o.generation == generation {
                    tracker.ack(o.token)?;
                }
                telemetry::acked(1, bytes);
            }
            Ok(Delivery::Failed { topic, error, .. }) => {
                return Err(RelayError::Delivery { topic, error })
            }
            Ok(Delivery::Broken(e)) => return Err(RelayError::Sink(e)),
            Err(TryRecvError::Empty) | Err(TryRecvError::Disconnected) => return Ok(()),
        }
    }
}

/// Waits until nothing is in flight (or `limit` passes, or a second stop
/// signal while not stopping), applying acks.
async fn drain(
    tracker: &mut Tracker,
    acks: &Receiver<Delivery>,
    wake: &Notify,
    stop: &mut watch::Receiver<bool>,
    generation: u32,
    limit: Option<Duration>,
) -> Result<(), RelayError> {
    let deadline = limit.map(|l| Instant::now() + l);
    loop {
        apply_acks(tracker, acks, generation)?;
        if tracker.in_flight() == 0 {
            return Ok(());
        }
        if deadline.is_some_and(|d| Instant::now() >= d) {
            tracing::warn!(
                in_flight = tracker.in_flight(),
                "shutdown timeout: facts still unacknowledged; they will be sent again on restart"
            );
            return Ok(());
        }
        tokio::select! {
            _ = wake.notified() => {}
            _ = tokio::time::sleep(Duration::from_millis(200)) => {}
            _ = stop.changed(), if limit.is_none() => {
                if *stop.borrow() {
                    return Ok(());
                }
            }
        }
    }
}

/// Graceful end: wait for in-flight facts, confirm, release the slot.
async fn finish(
    mut stream: ReplicationStream,
    tracker: &mut Tracker,
    acks: &Receiver<Delivery>,
    wake: &Notify,
    stop: &mut watch::Receiver<bool>,
    generation: u32,
    args: &RelayArgs,
) -> Result<Ended, RelayError> {
    tracing::info!(
        in_flight = tracker.in_flight(),
        "stopping: waiting for in-flight facts"
    );
    drain(
        tracker,
        acks,
        wake,
        stop,
        generation,
        Some(Duration::from_secs(args.shutdown_timeout_secs)),
    )
    .await?;
    let mark = tracker.watermark();
    stream.confirm(mark);
    if let Err(e) = stream.shutdown(Duration::from_secs(5)).await {
        tracing::warn!(error = %e, "could not send the final position; it will be resent from the last confirmed one");
    }
    telemetry::emit_latency_summary();
    tracing::info!(confirmed = %mark, "relay stopped");
    Ok(Ended::Stopped)
}

/// Exponential backoff with full jitter, from 100 ms up to `max`.
struct Backoff {
    next: Duration,
    max: Duration,
}

impl Backoff {
    fn new(max: Duration) -> Self {
        Backoff {
            next: Duration::from_millis(100),
            max,
        }
    }

    fn next(&mut self) -> Duration {
        let cap = self.next;
        self.next = (self.next * 2).min(self.max);
        // Jitter in [cap/2, cap], from the clock's sub-second noise.
        let noise = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let half = cap / 2;
        half + Duration::from_nanos(
            u64::from(noise) % (u64::try_from(half.as_nanos()).unwrap_or(1).max(1)),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opaque_round_trips() {
        for (g, t) in [(0u32, 0u64), (1, 5), (7, (1 << 40) - 1), (0xFF_FFFF, 123)] {
            let o = Opaque {
                generation: g,
                token: Token::from_raw(t),
            };
            assert_eq!(Opaque::from_raw(o.into_raw()), o);
        }
    }

    #[test]
    fn backoff_grows_with_jitter_and_caps() {
        let mut b = Backoff::new(Duration::from_secs(1));
        let first = b.next();
        assert!(first >= Duration::from_millis(50) && first <= Duration::from_millis(100));
        for _ in 0..20 {
            let d = b.next();
            assert!(d <= Duration::from_secs(1), "{d:?}");
        }
        assert!(b.next() >= Duration::from_millis(500));
    }
}
