//! One replication connection's worth of relaying: read runs of CopyData,
//! hand each body to the stream's units, deliver the facts it releases,
//! apply acks, confirm the watermark.
//!
//! ```text
//!  ReplicationStream ──CopyRun──► progress::Stream::handle ──Fact──► Deliver::fact ──► rings
//!        ▲      acks (ledger) ──► Stream::ack ──► watermark ──confirm (every --confirm-interval-ms)──┘
//! ```
//!
//! **Invariants**
//! - The position confirmed is the stream's watermark, never more.
//! - Exactly-once: nothing is streamed before the checkpoint is read, and a
//!   fact the checkpoint covers is acked at once and never delivered.
//! - A stop takes effect only between transactions, and then waits for the
//!   facts in flight (up to the shutdown timeout) before the final confirm.
//! - A transient error ends the session as [`Ended::Lost`], a definite one
//!   as an error.

use std::time::{Duration, Instant};

use super::deliver::{Delivered, Waiting};
use super::exactly::Prepared;
use super::{Drained, Ended, Relay, RelayError};
use crate::lsn::Lsn;
use crate::pgwire::backend::CopyRun;
use crate::source::ReplicationStream;
use crate::telemetry::{self, ProgressReporter};

/// When the next confirm and progress line are due.
struct Timers {
    confirm_every: Duration,
    last_confirm: Instant,
    progress_every: Option<Duration>,
    next_progress: Option<Instant>,
}

impl Timers {
    fn new(confirm_every: Duration, progress_every: Option<Duration>) -> Self {
        let now = Instant::now();
        Timers {
            confirm_every,
            last_confirm: now,
            progress_every,
            next_progress: progress_every.map(|d| now + d),
        }
    }

    fn confirm_due(&self, now: Instant) -> bool {
        now.duration_since(self.last_confirm) >= self.confirm_every
    }

    fn progress_due(&mut self, now: Instant) -> bool {
        let due = self.next_progress.is_some_and(|at| now >= at);
        if due {
            self.next_progress = self.progress_every.map(|d| now + d);
        }
        due
    }

    /// The earliest moment a timer needs the loop, given whether there is
    /// something new to confirm.
    fn deadline(&self, unconfirmed: bool) -> Option<Instant> {
        let confirm = unconfirmed.then(|| self.last_confirm + self.confirm_every);
        [self.next_progress, confirm].into_iter().flatten().min()
    }
}

impl Relay {
    /// Streams from one connection until a stop, a definite error, or a
    /// transient one ([`Ended::Lost`]).
    pub(super) async fn session(&mut self) -> Result<Ended, RelayError> {
        let mut first_message = None;
        let ended = self.stream_once(&mut first_message).await;
        telemetry::stream_ended();
        match ended {
            Err(error) if error.is_transient() => Ok(Ended::Lost {
                error,
                streamed: first_message.map(|at: Instant| at.elapsed()),
            }),
            other => other,
        }
    }

    /// One connection: `first_message` is set when its first message
    /// arrives, the end of start-up for the reconnect policy.
    async fn stream_once(
        &mut self,
        first_message: &mut Option<Instant>,
    ) -> Result<Ended, RelayError> {
        let start = self.stream.watermark();
        let Some(mut conn) = self.connect(start).await? else {
            return Ok(Ended::Stopped);
        };
        telemetry::Connected {
            slot: &self.settings.slot,
            server: conn.server(),
            backend_pid: conn.backend_pid(),
            start,
            transport: conn.transport().name(),
        }
        .emit();
        let mut timers = Timers::new(
            self.settings.confirm_interval,
            self.settings.progress_interval,
        );
        let mut reporter = ProgressReporter::new();
        let mut stopping = false;
        let mut run = CopyRun::default();
        loop {
            self.acks.apply(&mut self.stream)?;
            let mark = self.stream.watermark();
            self.clock.acknowledged_through(mark);
            // One clock read per message serves both timers.
            let now = Instant::now();
            if mark > conn.confirmed() && timers.confirm_due(now) {
                conn.confirm(mark);
                conn.send_status(false).await?;
                telemetry::confirmed();
                timers.last_confirm = Instant::now();
            }
            if timers.progress_due(now) {
                reporter.emit(self.acks.outstanding(), conn.confirmed(), conn.server_lsn());
            }
            if *self.stop.borrow() || self.settings.stop_at_lsn.is_some_and(|at| mark >= at) {
                stopping = true;
            }
            if stopping && !self.stream.in_transaction() {
                return self.finish(conn).await;
            }
            let Some(body) = run.next_body() else {
                // Once per run of messages, and on each wake-up.
                telemetry::publish(self.acks.outstanding(), conn.confirmed(), conn.server_lsn());
                telemetry::outbox_skipped(self.stream.ignored_changes());
                let deadline = timers.deadline(mark > conn.confirmed());
                let (acks, stop) = (&self.acks, &mut self.stop);
                let interrupt = async {
                    tokio::select! {
                        _ = acks.arrived() => {}
                        _ = stop.changed(), if !stopping => {}
                        _ = sleep_until(deadline) => {}
                    }
                };
                if let Some(r) = conn.next_run_or(interrupt).await? {
                    first_message.get_or_insert_with(Instant::now);
                    run = r;
                }
                continue;
            };
            if let Some(fact) = self.stream.handle(run.bytes(), body)? {
                if let Some(x) = self.exactly.as_mut() {
                    if x.already_in_kafka(&fact) {
                        self.stream.ack(fact.token)?;
                        continue;
                    }
                }
                // Timed from its commit once the watermark passes it.
                let commit = fact.unit_end.zip(fact.txn.map(|t| t.commit_ts));
                let opaque = self.acks.opaque(fact.token);
                let mut w = Waiting {
                    conn: &mut conn,
                    stop: &mut self.stop,
                };
                match self.deliver.fact(fact, opaque, &mut w).await? {
                    Delivered::Pushed => {
                        self.acks.handed();
                        if let Some((end, commit_ts)) = commit {
                            self.clock.handed(end, commit_ts);
                        }
                    }
                    // Its unit stays unconfirmed: it comes again next time.
                    Delivered::Stopped => return self.finish(conn).await,
                }
            }
        }
    }

    /// Connects and starts streaming at `start` (a slot another process
    /// streams from is [`RelayError::SlotInUse`]); in exactly-once mode,
    /// then makes sure of the checkpoint. `None` if a stop came first.
    async fn connect(&mut self, start: Lsn) -> Result<Option<ReplicationStream>, RelayError> {
        let s = &self.settings;
        let mut conn = ReplicationStream::connect(&s.connection, &s.source).await?;
        let id = conn.identify_system().await?;
        match slot_holder(&mut conn, &s.slot).await? {
            Some(pid) if self.own_walsender == Some(pid) => {
                return Err(RelayError::OwnWalsenderExiting { pid })
            }
            Some(pid) => {
                return Err(RelayError::SlotInUse {
                    slot: s.slot.clone(),
                    pid,
                })
            }
            None => {}
        }
        self.own_walsender = Some(conn.backend_pid());
        // The slot first, then Kafka: a relay that lost the race for the
        // slot to another one must not fence that one's transactional
        // producers. Until prepared, the stream waits in the socket.
        conn.start_pgoutput(&s.slot, start, &s.publication).await?;
        if let Some(x) = self.exactly.as_mut() {
            let dbname = &s.connection.dbname;
            if x.prepare(&id, dbname, &mut self.stop).await? == Prepared::Stopped {
                return Ok(None);
            }
        }
        if let Some(since) = self.standby_since.take() {
            telemetry::TookOver {
                slot: &s.slot,
                waited: since.elapsed(),
            }
            .emit();
        }
        Ok(Some(conn))
    }

    /// Graceful end: wait for in-flight facts, confirm, release the slot.
    async fn finish(&mut self, mut conn: ReplicationStream) -> Result<Ended, RelayError> {
        tracing::info!(
            in_flight = self.acks.outstanding(),
            "stopping: waiting for in-flight facts"
        );
        if let Some(x) = self.exactly.as_mut() {
            x.log_dropped();
        }
        let limit = Some(self.settings.shutdown_timeout);
        let drained = if self.stream.in_transaction() {
            // Stopped inside a unit (a stop ended a wait): exactly-once
            // aborts the transaction holding its first part.
            self.acks
                .settle(&mut self.stream, &mut self.stop, limit)
                .await?
        } else {
            self.acks.flush();
            self.acks
                .drain(&mut self.stream, &mut self.stop, limit)
                .await?
        };
        if drained != Drained::All {
            tracing::warn!(
                in_flight = self.acks.outstanding(),
                "shutdown timeout: facts still unacknowledged; they will be sent again on restart"
            );
        }
        let mark = self.stream.watermark();
        conn.confirm(mark);
        self.clock.acknowledged_through(mark);
        telemetry::publish(self.acks.outstanding(), conn.confirmed(), conn.server_lsn());
        if let Err(e) = conn.shutdown(Duration::from_secs(5)).await {
            tracing::warn!(error = %e, "could not send the final position; it will be resent from the last confirmed one");
        }
        telemetry::emit_latency_summary();
        tracing::info!(confirmed = %mark, "relay stopped");
        Ok(Ended::Stopped)
    }
}

/// The process id of the walsender that streams from `slot`, if one does.
async fn slot_holder(conn: &mut ReplicationStream, slot: &str) -> Result<Option<i32>, RelayError> {
    // The slot name is checked (lowercase letters, digits, `_`) by config.
    let sql = format!("SELECT active_pid FROM pg_replication_slots WHERE slot_name = '{slot}'");
    let rows = conn.query(&sql).await?;
    Ok(rows
        .first()
        .and_then(|r| r.first().cloned().flatten())
        .and_then(|pid| pid.parse().ok()))
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d.into()).await,
        None => std::future::pending().await,
    }
}
