//! Exactly-once delivery: the one flusher thread that owns the Kafka
//! transaction. It sends the records of one ring, in stream order, inside
//! Kafka transactions that each hold a run of whole PostgreSQL units plus
//! one checkpoint record, and reports each commit.
//!
//! ```text
//!  ring 0 ──pop──► begin? ──send──► … record with txn_end (a unit ends) ──due?──► checkpoint(C) ──commit──► Delivery::Committed
//!  relay ──Command::Flush──► commit at the next unit end now
//!  relay ──Command::Reset──► drop what is queued, commit (whole units) or abort (a partial one) ──► Delivery::Reset
//! ```
//!
//! A transaction is *due* once [`TxnSettings::max_duration`] has passed
//! since it began or it holds [`TxnSettings::max_records`] records. It is
//! committed only right after a record that ends a unit, so a PostgreSQL
//! transaction is never split, however large.
//!
//! **Invariants**
//! - A commit covers exactly the records sent since the transaction began,
//!   the last of which ended a unit; [`Delivery::Committed`] names that
//!   record's opaque and the unit's end, which is the checkpoint's C.
//! - After a failed transaction (aborted), nothing more is sent until the
//!   relay's [`Command::Reset`]: records still queued belong to units the
//!   relay will stream again.
//! - A fatal error (fenced by a newer producer with the same
//!   `transactional.id`, or any error librdkafka calls fatal) is reported
//!   once; from then on every record is dropped and nothing is committed.
//! - Once the rings close and the ring is empty the thread ends: an open
//!   transaction is committed if it ends on a unit boundary, aborted
//!   otherwise. With Kafka away, each of those gives up
//!   [`GIVE_UP_AFTER_CLOSE`] after the close, so the process can exit; what
//!   was not committed was not confirmed either.

use std::sync::{Arc, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bytes::Bytes;
use crossbeam::channel::{Receiver, Sender, TryRecvError};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};

use super::checkpoint;
use super::flusher::GIVE_UP_AFTER_CLOSE;
use super::kafka::{Delivery, SendOutcome};
use super::record::Record;
use super::SinkError;
use crate::lsn::Lsn;
use crate::route::Rings;

/// Records taken from the ring at a time.
const BATCH: usize = 512;

/// How long one commit or abort may take before it is retried.
const COMMIT_TIMEOUT: Duration = Duration::from_secs(10);

/// Longest sleep while idle: how soon a command is noticed.
const IDLE_POLL: Duration = Duration::from_millis(20);

/// When to commit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TxnSettings {
    /// Commit once a transaction is this old (at the next unit end).
    pub max_duration: Duration,
    /// Commit once a transaction holds this many records (at the next unit
    /// end).
    pub max_records: usize,
    /// The checkpoint topic, `{prefix}.checkpoints`.
    pub checkpoint_topic: Arc<str>,
}

/// What the relay asks of the transaction flusher.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    /// Commit at the next unit end without waiting for the transaction to
    /// be due (a stop is under way).
    Flush,
    /// The relay stopped pushing and will stream again from its watermark:
    /// drop every queued record, end the open transaction (commit it if it
    /// ends on a unit boundary, abort it otherwise), clear a failure, and
    /// answer [`Delivery::Reset`].
    Reset,
}

/// How a transactional call failed, as librdkafka classifies it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TxnErrorKind {
    /// Try the same call again.
    Retriable,
    /// The transaction must be aborted; the producer stays usable.
    Abortable,
    /// The producer is unusable: fenced, or a fatal error.
    Fatal,
}

/// A failed transactional call.
#[derive(Debug)]
pub struct TxnError {
    /// What the caller must do.
    pub kind: TxnErrorKind,
    /// The error.
    pub error: KafkaError,
}

/// The transactional producer, as the flusher drives it.
pub trait Transactional: Send + 'static {
    /// `begin_transaction`.
    fn begin(&mut self) -> Result<(), TxnError>;
    /// Hands one record over without blocking; a full queue returns it.
    #[allow(clippy::result_large_err)]
    fn send(&mut self, rec: Record) -> Result<SendOutcome, (KafkaError, Record)>;
    /// `commit_transaction` (flushes first).
    fn commit(&mut self, timeout: Duration) -> Result<(), TxnError>;
    /// `abort_transaction`.
    fn abort(&mut self, timeout: Duration) -> Result<(), TxnError>;
}

/// Starts the transaction flusher on ring 0 of `rings` (which must have
/// one ring and one flusher). `source` is set by the relay before it
/// pushes the first record: the checkpoint key.
pub fn spawn<P: Transactional>(
    rings: Arc<Rings<Record>>,
    producer: P,
    settings: TxnSettings,
    source: Arc<OnceLock<Bytes>>,
    commands: Receiver<Command>,
    reports: Sender<Delivery>,
    wake: Arc<tokio::sync::Notify>,
) -> std::io::Result<JoinHandle<()>> {
    std::thread::Builder::new()
        .name("factlib-txn".into())
        .spawn(move || {
            TxnFlusher {
                producer,
                settings,
                source,
                commands,
                reports,
                wake,
                open: None,
                state: State::Running,
                flush: false,
            }
            .run(&rings)
        })
}

/// How long a call that keeps failing retriably (Kafka away) is retried:
/// for ever while the rings are open, [`GIVE_UP_AFTER_CLOSE`] once they
/// close (the relay is exiting; what was not committed was not confirmed).
#[derive(Default)]
struct Patience {
    closed_since: Option<Instant>,
}

impl Patience {
    fn exhausted(&mut self, rings: &Rings<Record>) -> bool {
        if rings.is_closed() {
            self.closed_since.get_or_insert_with(Instant::now);
        }
        self.closed_since
            .is_some_and(|t| t.elapsed() >= GIVE_UP_AFTER_CLOSE)
    }
}

/// The open Kafka transaction.
struct Open {
    since: Instant,
    /// Fact records sent in it (the checkpoint not counted).
    records: usize,
    /// Their bytes.
    bytes: u64,
    /// Their Kafka timestamps (the facts' `created_at`, Unix ms), for the
    /// created → committed latency.
    created: Vec<i64>,
    /// Set while the last record sent ended a unit: its opaque and end.
    boundary: Option<(usize, Lsn)>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Running,
    /// A transaction failed and was aborted: drop records until a reset.
    Aborted,
    /// Fatal: drop everything for good.
    Dead,
}

struct TxnFlusher<P> {
    producer: P,
    settings: TxnSettings,
    source: Arc<OnceLock<Bytes>>,
    commands: Receiver<Command>,
    reports: Sender<Delivery>,
    wake: Arc<tokio::sync::Notify>,
    open: Option<Open>,
    state: State,
    /// Commit at the next unit end.
    flush: bool,
}

impl<P: Transactional> TxnFlusher<P> {
    fn run(mut self, rings: &Rings<Record>) {
        let mut batch = Vec::with_capacity(BATCH);
        loop {
            self.obey(rings);
            let took = rings.pop_into(0, &mut batch, BATCH);
            for rec in batch.drain(..) {
                self.record(rec, rings);
            }
            if took > 0 {
                continue;
            }
            if self.open.as_ref().is_some_and(|o| o.boundary.is_some())
                && (self.flush || self.due() || rings.is_closed())
            {
                self.commit(rings);
            }
            if rings.is_closed() && rings.is_empty(0) {
                if self.open.is_some() && self.state == State::Running {
                    // A partial unit: it was never confirmed, so it is
                    // streamed again on the next start.
                    self.abort(rings);
                }
                return;
            }
            // Sleep until the open transaction is due, if that is what
            // the loop waits for; a push or a close wakes it earlier.
            let wait = match &self.open {
                Some(o) if o.boundary.is_some() => (o.since + self.settings.max_duration)
                    .saturating_duration_since(Instant::now())
                    .clamp(Duration::from_millis(1), IDLE_POLL),
                _ => IDLE_POLL,
            };
            rings.wait_for_work(0, wait);
        }
    }

    /// Applies the relay's commands received so far.
    fn obey(&mut self, rings: &Rings<Record>) {
        loop {
            match self.commands.try_recv() {
                Ok(Command::Flush) => self.flush = true,
                Ok(Command::Reset) => {
                    let mut dropped = Vec::new();
                    while rings.pop_into(0, &mut dropped, BATCH) > 0 {
                        dropped.clear();
                    }
                    if self.state == State::Running {
                        match self.open.as_ref().map(|o| o.boundary.is_some()) {
                            Some(true) => self.commit(rings),
                            Some(false) => self.abort(rings),
                            None => {}
                        }
                    }
                    if self.state == State::Aborted {
                        self.state = State::Running;
                    }
                    self.flush = false;
                    self.report(Delivery::Reset);
                }
                Err(TryRecvError::Empty | TryRecvError::Disconnected) => return,
            }
        }
    }

    fn due(&self) -> bool {
        self.open.as_ref().is_some_and(|o| {
            o.records >= self.settings.max_records
                || o.since.elapsed() >= self.settings.max_duration
        })
    }

    /// Sends one record inside the open transaction (beginning one if
    /// needed), and commits after it if it ends a unit and the transaction
    /// is due.
    fn record(&mut self, rec: Record, rings: &Rings<Record>) {
        if self.state != State::Running {
            return;
        }
        if self.open.is_none() {
            if let Err(e) = self.producer.begin() {
                self.failed("begin", e, rings);
                return;
            }
            self.open = Some(Open {
                since: Instant::now(),
                records: 0,
                bytes: 0,
                created: Vec::new(),
                boundary: None,
            });
        }
        let end = rec.txn_end.map(|lsn| (rec.opaque, lsn));
        let bytes = u64::try_from(rec.bytes).unwrap_or(u64::MAX);
        let created = rec.timestamp_ms;
        if !self.send(rec, rings) {
            return;
        }
        if let Some(o) = self.open.as_mut() {
            o.records += 1;
            o.bytes += bytes;
            o.created.extend(created);
            o.boundary = end;
        }
        if end.is_some() && (self.flush || self.due()) {
            self.commit(rings);
        }
    }

    /// Sends one record, waiting while the producer's queue is full. False
    /// if it was not sent (the flusher is then no longer running, or the
    /// rings closed while Kafka kept the queue full).
    fn send(&mut self, mut rec: Record, rings: &Rings<Record>) -> bool {
        let mut wait = Duration::from_micros(100);
        let mut patience = Patience::default();
        loop {
            match self.producer.send(rec) {
                Ok(SendOutcome::Queued) => return true,
                Ok(SendOutcome::Full(back)) => {
                    rec = back;
                    if patience.exhausted(rings) {
                        self.abort(rings);
                        self.state = State::Dead;
                        return false;
                    }
                    std::thread::sleep(wait);
                    wait = (wait * 2).min(Duration::from_millis(50));
                }
                Err((error, back)) if refused_for_good(&error) => {
                    self.state = State::Dead;
                    self.report(Delivery::Failed {
                        opaque: back.opaque,
                        topic: back.topic.to_string(),
                        bytes: back.value.len() + back.key.as_ref().map_or(0, Bytes::len),
                        error,
                    });
                    return false;
                }
                Err((error, _)) => {
                    self.failed(
                        "produce",
                        TxnError {
                            kind: TxnErrorKind::Abortable,
                            error,
                        },
                        rings,
                    );
                    return false;
                }
            }
        }
    }

    /// Writes the checkpoint and commits the open transaction, which ends
    /// on a unit boundary. Retries a retriable failure until it succeeds or
    /// the rings close.
    fn commit(&mut self, rings: &Rings<Record>) {
        let Some((opaque, through)) = self.open.as_ref().and_then(|o| o.boundary) else {
            return;
        };
        let Some(key) = self.source.get().cloned() else {
            self.state = State::Dead;
            self.report(Delivery::Broken(SinkError::Internal(
                "a transaction was to be committed before the source was identified",
            )));
            return;
        };
        let cp = Record {
            topic: Arc::clone(&self.settings.checkpoint_topic),
            partition: 0,
            key: Some(key),
            value: checkpoint::value(through),
            headers: None,
            bytes: 0,
            opaque: usize::MAX,
            txn_end: None,
            timestamp_ms: None,
        };
        if !self.send(cp, rings) {
            return;
        }
        let mut patience = Patience::default();
        let started = Instant::now();
        loop {
            match self.producer.commit(COMMIT_TIMEOUT) {
                Ok(()) => break,
                Err(e) if e.kind == TxnErrorKind::Retriable && !patience.exhausted(rings) => {
                    crate::telemetry::KafkaTrouble {
                        message: &format_args!("committing a transaction: {}; retrying", e.error),
                    }
                    .emit();
                }
                Err(e) => {
                    self.failed("commit", e, rings);
                    return;
                }
            }
        }
        let (records, bytes) = match self.open.take() {
            Some(o) => {
                crate::telemetry::latencies_since_ms(&o.created);
                crate::telemetry::transaction_committed(
                    o.records,
                    through,
                    started.duration_since(o.since),
                    started.elapsed(),
                );
                (o.records, o.bytes)
            }
            None => (0, 0),
        };
        self.flush = false;
        self.report(Delivery::Committed {
            opaque,
            records,
            bytes,
            through,
        });
    }

    /// Aborts the open transaction, if any. A failure to abort is fatal; so
    /// is a retriable one that lasts [`GIVE_UP_AFTER_CLOSE`] after the rings
    /// closed (Kafka away while the relay exits: the coordinator aborts the
    /// transaction on its timeout, or the next relay's `init_transactions`
    /// does).
    fn abort(&mut self, rings: &Rings<Record>) {
        if self.open.take().is_none() {
            return;
        }
        let mut patience = Patience::default();
        loop {
            match self.producer.abort(COMMIT_TIMEOUT) {
                Ok(()) => return,
                Err(e) if e.kind == TxnErrorKind::Retriable && !patience.exhausted(rings) => {
                    continue
                }
                Err(e) => {
                    self.state = State::Dead;
                    self.report(Delivery::Broken(SinkError::TransactionFatal {
                        op: "abort",
                        source: e.error,
                    }));
                    return;
                }
            }
        }
    }

    /// A transactional call failed: abort if the producer allows it, and
    /// tell the relay.
    fn failed(&mut self, op: &'static str, e: TxnError, rings: &Rings<Record>) {
        match e.kind {
            TxnErrorKind::Fatal => {
                self.open = None;
                self.state = State::Dead;
                self.report(Delivery::Broken(SinkError::TransactionFatal {
                    op,
                    source: e.error,
                }));
            }
            TxnErrorKind::Abortable | TxnErrorKind::Retriable => {
                // After a failed `begin` nothing is open to abort.
                self.abort(rings);
                if self.state == State::Running {
                    self.state = State::Aborted;
                    self.report(Delivery::Broken(SinkError::TransactionAborted {
                        op,
                        source: e.error,
                    }));
                }
            }
        }
    }

    fn report(&self, d: Delivery) {
        let _ = self.reports.send(d);
        self.wake.notify_one();
    }
}

/// Errors that refuse a record for good: sending it again fails again.
pub fn refused_for_good(error: &KafkaError) -> bool {
    matches!(
        error.rdkafka_error_code(),
        Some(
            RDKafkaErrorCode::MessageSizeTooLarge
                | RDKafkaErrorCode::MessageBatchTooLarge
                | RDKafkaErrorCode::InvalidRecord
                | RDKafkaErrorCode::TopicAuthorizationFailed
                | RDKafkaErrorCode::InvalidTopic
        )
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sink::record::dead_letter;
    use std::sync::Mutex;

    #[derive(Debug, Clone, PartialEq, Eq)]
    enum Call {
        Begin,
        Send(usize),
        Checkpoint(String),
        Commit,
        Abort,
    }

    /// Records calls; `fail_commit` makes the next commit fail that way.
    #[derive(Clone, Default)]
    struct Fake {
        calls: Arc<Mutex<Vec<Call>>>,
        fail_commit: Arc<Mutex<Vec<TxnErrorKind>>>,
        /// Every abort fails this way (Kafka away).
        abort_fails: Arc<Mutex<Option<TxnErrorKind>>>,
    }

    impl Fake {
        /// A producer whose next commit fails as `kind`.
        fn failing_commit(kind: TxnErrorKind) -> Self {
            let fake = Fake::default();
            fake.fail_commit.lock().unwrap().push(kind);
            fake
        }
    }

    fn err(kind: TxnErrorKind) -> TxnError {
        TxnError {
            kind,
            error: KafkaError::Flush(RDKafkaErrorCode::OperationTimedOut),
        }
    }

    impl Transactional for Fake {
        fn begin(&mut self) -> Result<(), TxnError> {
            self.calls.lock().unwrap().push(Call::Begin);
            Ok(())
        }
        fn send(&mut self, rec: Record) -> Result<SendOutcome, (KafkaError, Record)> {
            let call = if rec.opaque == usize::MAX {
                Call::Checkpoint(checkpoint::parse(&rec.value).unwrap().to_string())
            } else {
                Call::Send(rec.opaque)
            };
            self.calls.lock().unwrap().push(call);
            Ok(SendOutcome::Queued)
        }
        fn commit(&mut self, _: Duration) -> Result<(), TxnError> {
            self.calls.lock().unwrap().push(Call::Commit);
            match self.fail_commit.lock().unwrap().pop() {
                Some(kind) => Err(err(kind)),
                None => Ok(()),
            }
        }
        fn abort(&mut self, _: Duration) -> Result<(), TxnError> {
            let mut calls = self.calls.lock().unwrap();
            if calls.last() != Some(&Call::Abort) {
                calls.push(Call::Abort);
            }
            match *self.abort_fails.lock().unwrap() {
                Some(kind) => {
                    std::thread::sleep(Duration::from_millis(100));
                    Err(err(kind))
                }
                None => Ok(()),
            }
        }
    }

    fn rec(opaque: usize, txn_end: Option<u64>) -> Record {
        let mut r = dead_letter(Bytes::from_static(b"x"), "e", Lsn(1), "t".into(), 0, opaque);
        r.txn_end = txn_end.map(Lsn);
        r
    }

    struct Run {
        calls: Vec<Call>,
        reports: Vec<Delivery>,
    }

    /// Pushes `recs`, sends `commands` first, closes the rings and runs the
    /// flusher to its end.
    fn run(recs: Vec<Record>, commands: &[Command], max_records: usize, fake: Fake) -> Run {
        let rings = Rings::new(1, 64, 1).unwrap();
        for r in recs {
            rings.try_push(0, r).unwrap();
        }
        rings.close();
        let (ctx, crx) = crossbeam::channel::unbounded();
        for c in commands {
            ctx.send(*c).unwrap();
        }
        let (tx, rx) = crossbeam::channel::unbounded();
        let source = Arc::new(OnceLock::new());
        source.set(Bytes::from_static(b"k")).unwrap();
        spawn(
            Arc::clone(&rings),
            fake.clone(),
            TxnSettings {
                max_duration: Duration::from_secs(3600),
                max_records,
                checkpoint_topic: "p.checkpoints".into(),
            },
            source,
            crx,
            tx,
            Arc::new(tokio::sync::Notify::new()),
        )
        .unwrap()
        .join()
        .unwrap();
        let calls = fake.calls.lock().unwrap().clone();
        Run {
            calls,
            reports: rx.try_iter().collect(),
        }
    }

    fn committed(reports: &[Delivery]) -> Vec<(usize, usize, u64)> {
        reports
            .iter()
            .filter_map(|d| match d {
                Delivery::Committed {
                    opaque,
                    records,
                    through,
                    ..
                } => Some((*opaque, *records, through.0)),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn commits_whole_units_with_a_checkpoint_once_due() {
        use Call::*;
        // Units: [1,2,3] ends 0x100; [4] ends 0x120; [5,6] ends 0x200.
        let recs = vec![
            rec(1, None),
            rec(2, None),
            rec(3, Some(0x100)),
            rec(4, Some(0x120)),
            rec(5, None),
            rec(6, Some(0x200)),
        ];
        let r = run(recs, &[], 2, Fake::default());
        assert_eq!(
            r.calls,
            vec![
                Begin,
                Send(1),
                Send(2),
                Send(3),
                Checkpoint("0/100".into()),
                Commit,
                Begin,
                Send(4),
                Send(5),
                Send(6),
                Checkpoint("0/200".into()),
                Commit,
            ],
            "due after 2 records, but committed only at a unit end"
        );
        assert_eq!(committed(&r.reports), vec![(3, 3, 0x100), (6, 3, 0x200)]);
    }

    /// A PostgreSQL transaction larger than --txn-max-facts stays whole.
    #[test]
    fn a_large_unit_is_never_split() {
        let mut recs: Vec<Record> = (0..50).map(|i| rec(i, None)).collect();
        recs.push(rec(50, Some(0x900)));
        let r = run(recs, &[], 10, Fake::default());
        let commits = r.calls.iter().filter(|c| **c == Call::Commit).count();
        assert_eq!(commits, 1);
        assert_eq!(committed(&r.reports), vec![(50, 51, 0x900)]);
    }

    /// Closing with a partial unit open aborts it; nothing is reported
    /// committed past the last unit end.
    #[test]
    fn a_partial_unit_at_close_is_aborted() {
        use Call::*;
        let recs = vec![rec(1, Some(0x100)), rec(2, None)];
        let r = run(recs, &[], 1000, Fake::default());
        assert_eq!(
            r.calls,
            vec![Begin, Send(1), Send(2), Abort],
            "the transaction holding a partial unit is aborted, not committed"
        );
        assert!(committed(&r.reports).is_empty());
    }

    #[test]
    fn reset_drops_queued_records_and_answers() {
        let recs = vec![rec(1, None), rec(2, Some(0x100))];
        let r = run(recs, &[Command::Reset], 1000, Fake::default());
        assert_eq!(r.calls, vec![], "queued records are dropped, not sent");
        assert!(matches!(r.reports.as_slice(), [Delivery::Reset]));
    }

    /// An abortable commit failure aborts, reports a transient error, and
    /// drops records until the relay resets.
    #[test]
    fn an_abortable_commit_failure_aborts_and_waits_for_a_reset() {
        use Call::*;
        let fake = Fake::failing_commit(TxnErrorKind::Abortable);
        let recs = vec![rec(1, Some(0x100)), rec(2, Some(0x200))];
        let r = run(recs, &[], 1, fake);
        assert_eq!(
            r.calls,
            vec![Begin, Send(1), Checkpoint("0/100".into()), Commit, Abort],
            "record 2 is dropped: the relay streams it again after a reset"
        );
        match r.reports.as_slice() {
            [Delivery::Broken(e)] => assert!(e.is_transient(), "{e}"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_fatal_commit_failure_is_definite_and_ends_sending() {
        use Call::*;
        let fake = Fake::failing_commit(TxnErrorKind::Fatal);
        let recs = vec![rec(1, Some(0x100)), rec(2, Some(0x200))];
        let r = run(recs, &[], 1, fake);
        assert_eq!(
            r.calls,
            vec![Begin, Send(1), Checkpoint("0/100".into()), Commit]
        );
        match r.reports.as_slice() {
            [Delivery::Broken(e)] => assert!(!e.is_transient(), "{e}"),
            other => panic!("{other:?}"),
        }
    }

    /// The hang this prevents: exiting while Kafka is away, the abort of a
    /// partial unit's transaction was retried for ever.
    #[test]
    fn an_abort_that_keeps_timing_out_after_close_is_given_up() {
        let fake = Fake::default();
        *fake.abort_fails.lock().unwrap() = Some(TxnErrorKind::Retriable);
        let (done, exited) = std::sync::mpsc::channel();
        let f = fake.clone();
        std::thread::spawn(move || {
            let r = run(vec![rec(1, Some(0x100)), rec(2, None)], &[], 1000, f);
            let _ = done.send(r.reports.len());
        });
        // Far beyond GIVE_UP_AFTER_CLOSE: not a speed bound, a hang detector.
        let reports = exited.recv_timeout(Duration::from_secs(60));
        assert_eq!(
            reports,
            Ok(1),
            "the flusher exits and reports the abort failed"
        );
        assert_eq!(
            *fake.calls.lock().unwrap().last().unwrap(),
            Call::Abort,
            "nothing is committed"
        );
    }

    #[test]
    fn a_retriable_commit_failure_is_retried() {
        use Call::*;
        let fake = Fake::failing_commit(TxnErrorKind::Retriable);
        let r = run(vec![rec(1, Some(0x100))], &[Command::Flush], 1000, fake);
        assert_eq!(
            r.calls,
            vec![Begin, Send(1), Checkpoint("0/100".into()), Commit, Commit]
        );
        assert_eq!(committed(&r.reports), vec![(1, 1, 0x100)]);
    }
}
