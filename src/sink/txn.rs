//! Exactly-once delivery: the one flusher thread that owns the Kafka
//! transactions. It sends the records of one ring, in stream order, inside
//! Kafka transactions that each hold a run of whole PostgreSQL units plus
//! one checkpoint record, and reports each commit.
//!
//! Two transactional producers take turns. Once a transaction's records
//! are all acknowledged, it goes to the committer thread with its producer,
//! and the other producer takes the next records: the commit's round trip,
//! and the coordinator's markers that would hold up the next transaction
//! of the same producer, overlap the stream instead of stopping it.
//!
//! ```text
//!  ring 0 ──pop──► begin? ──send──► … record with txn_end (a unit ends) ──due?──► checkpoint(C) ──all acked──┐
//!    ┌──────────────────────────────────────────────────────────────────────────────────────────────────────┘
//!    └► previous commit succeeded? ──► committer: commit_transaction ──► Delivery::Committed ──► producer back
//!                                  └─► swap producers; the next records go to the other one
//!  relay ──Command::Flush──► commit at the next unit end now
//!  relay ──Command::Reset──► drop what is queued, commit (whole units) or abort (a partial one),
//!                            wait for the commit ──► Delivery::Reset
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
//! - At most one commit is out, and a transaction goes to the committer
//!   only after the one before it committed: checkpoints are committed in
//!   stream order, and when a commit fails, the transaction after it is
//!   aborted too.
//! - The other producer sends nothing until every record of the
//!   transaction before is acknowledged: in each partition, a later
//!   transaction's records follow an earlier one's.
//! - After a failed transaction (aborted), nothing more is sent until the
//!   relay's [`Command::Reset`]: records still queued belong to units the
//!   relay will stream again.
//! - A fatal error (fenced by a newer producer with the same
//!   `transactional.id`, or any error librdkafka calls fatal) is reported
//!   once; from then on every record is dropped and nothing is committed.
//! - Once the rings close and the ring is empty the thread ends after the
//!   last commit's outcome is known: an open transaction is committed if it
//!   ends on a unit boundary, aborted otherwise. With Kafka away, each of
//!   those gives up [`GIVE_UP_AFTER_CLOSE`] after the close, so the process
//!   can exit; what was not committed was not confirmed either.

use std::sync::{Arc, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bytes::Bytes;
use crossbeam::channel::{Receiver, Sender, TryRecvError};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};

use super::checkpoint;
use super::producer::{
    refused_for_good, Delivery, SendOutcome, Transactional, TxnError, TxnErrorKind,
    GIVE_UP_AFTER_CLOSE,
};
use super::record::Record;
use super::SinkError;
use crate::lsn::Lsn;
use crate::route::Rings;
use crate::telemetry::Beat;

/// Records taken from the ring at a time.
const BATCH: usize = 512;

/// How long one commit or abort, or one wait for acknowledgements, may take
/// before it is tried again.
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
    /// ends on a unit boundary, abort it otherwise), wait for the last
    /// commit, clear a failure, and answer [`Delivery::Reset`].
    Reset,
}

/// Everything the transaction flusher is connected to.
pub struct TxnWiring {
    /// Ring 0 is read; the rings must have one ring and one flusher.
    pub rings: Arc<Rings<Record>>,
    /// The checkpoint key, set by the relay before it pushes the first
    /// record.
    pub source: Arc<OnceLock<Bytes>>,
    /// The relay's commands.
    pub commands: Receiver<Command>,
    /// Commits and failures, to the relay.
    pub reports: Sender<Delivery>,
    /// Notified after each report.
    pub wake: Arc<tokio::sync::Notify>,
}

/// The two producers' `transactional.id`s for `--transactional-id` `id`:
/// `{id}-0` and `{id}-1`.
pub fn transactional_ids(id: &str) -> [String; 2] {
    [format!("{id}-0"), format!("{id}-1")]
}

/// Starts the transaction flusher and its committer. The two producers
/// must have different transactional ids, both initialized.
pub fn spawn<P: Transactional>(
    producers: [P; 2],
    settings: TxnSettings,
    wiring: TxnWiring,
) -> std::io::Result<JoinHandle<()>> {
    let [first, second] = producers;
    let (jobs, job_rx) = crossbeam::channel::bounded::<Finished<P>>(1);
    let (outcome_tx, outcomes) = crossbeam::channel::bounded(1);
    let reporter = Reporter {
        reports: wiring.reports,
        wake: wiring.wake,
    };
    // One heartbeat for the pair: while the flusher waits for a commit,
    // the committer ticks on each attempt.
    let beat = Beat::register("txn-flusher");
    let committer = {
        let (rings, reporter, beat) = (Arc::clone(&wiring.rings), reporter.clone(), beat.clone());
        std::thread::Builder::new()
            .name("factlib-commit".into())
            .spawn(move || commit_each(&job_rx, &outcome_tx, &rings, &reporter, &beat))?
    };
    let rings = wiring.rings;
    let source = wiring.source;
    let commands = wiring.commands;
    std::thread::Builder::new()
        .name("factlib-txn".into())
        .spawn(move || {
            TxnFlusher {
                producer: first,
                spare: Some(second),
                jobs,
                outcomes,
                settings,
                source,
                commands,
                reporter,
                open: None,
                state: State::Running,
                flush: false,
                beat,
            }
            .run(&rings);
            // The flusher's end dropped the committer's queue: it ends.
            let _ = committer.join();
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

/// A transaction whose records are all acknowledged, on its way to
/// `commit_transaction` with its producer.
struct Finished<P> {
    producer: P,
    open: Open,
    /// The last record's opaque, and C.
    opaque: usize,
    through: Lsn,
    /// When its records were all acknowledged.
    acked: Instant,
}

/// The committer's answer: the producer, and whether its transaction
/// committed.
struct Outcome<P> {
    producer: P,
    result: Result<(), TxnError>,
}

/// Reports to the relay; shared by the flusher and the committer.
#[derive(Clone)]
struct Reporter {
    reports: Sender<Delivery>,
    wake: Arc<tokio::sync::Notify>,
}

impl Reporter {
    fn report(&self, d: Delivery) {
        let _ = self.reports.send(d);
        self.wake.notify_one();
    }
}

/// The committer thread: commits each finished transaction, retrying a
/// retriable failure while [`Patience`] lasts, reports a success at once,
/// and hands the producer back.
fn commit_each<P: Transactional>(
    jobs: &Receiver<Finished<P>>,
    outcomes: &Sender<Outcome<P>>,
    rings: &Rings<Record>,
    reporter: &Reporter,
    beat: &Beat,
) {
    for Finished {
        mut producer,
        open,
        opaque,
        through,
        acked,
    } in jobs
    {
        let mut patience = Patience::default();
        let result = loop {
            beat.tick();
            match producer.commit(COMMIT_TIMEOUT) {
                Err(e) if e.kind == TxnErrorKind::Retriable && !patience.exhausted(rings) => {
                    crate::telemetry::KafkaTrouble {
                        message: &format_args!("committing a transaction: {}; retrying", e.error),
                    }
                    .emit();
                }
                other => break other,
            }
        };
        if result.is_ok() {
            crate::telemetry::latencies_since_ms(&open.created);
            crate::telemetry::transaction_committed(
                open.records,
                through,
                acked.duration_since(open.since),
                acked.elapsed(),
            );
            reporter.report(Delivery::Committed {
                opaque,
                records: open.records,
                bytes: open.bytes,
                through,
            });
        }
        if outcomes.send(Outcome { producer, result }).is_err() {
            return;
        }
    }
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
    /// The producer that takes records; `open` is its transaction.
    producer: P,
    /// The other producer, while its last transaction is not out with the
    /// committer.
    spare: Option<P>,
    /// To the committer, which ends when this is dropped.
    jobs: Sender<Finished<P>>,
    outcomes: Receiver<Outcome<P>>,
    settings: TxnSettings,
    source: Arc<OnceLock<Bytes>>,
    commands: Receiver<Command>,
    reporter: Reporter,
    open: Option<Open>,
    state: State,
    /// Commit at the next unit end.
    flush: bool,
    /// Liveness, shared with the committer (`/healthz`).
    beat: Beat,
}

impl<P: Transactional> TxnFlusher<P> {
    fn run(mut self, rings: &Rings<Record>) {
        let mut batch = Vec::with_capacity(BATCH);
        loop {
            self.beat.tick();
            self.obey(rings);
            self.collect(false, rings);
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
                self.collect(true, rings);
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
                    // Every commit's outcome is reported before the answer.
                    self.collect(true, rings);
                    if self.state == State::Aborted {
                        self.state = State::Running;
                    }
                    self.flush = false;
                    self.reporter.report(Delivery::Reset);
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
                    self.beat.tick();
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
                    self.reporter.report(Delivery::Failed {
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

    /// Writes the checkpoint into the open transaction, which ends on a
    /// unit boundary, waits until its records are all acknowledged and the
    /// previous transaction committed, and hands it to the committer; the
    /// other producer takes the next records.
    fn commit(&mut self, rings: &Rings<Record>) {
        let Some((opaque, through)) = self.open.as_ref().and_then(|o| o.boundary) else {
            return;
        };
        let Some(key) = self.source.get().cloned() else {
            self.broken(SinkError::Internal(
                "a transaction was to be committed before the source was identified",
            ));
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
        while !self.producer.settle(COMMIT_TIMEOUT) {
            self.beat.tick();
            if patience.exhausted(rings) {
                self.failed(
                    "commit",
                    TxnError {
                        kind: TxnErrorKind::Retriable,
                        error: KafkaError::Flush(RDKafkaErrorCode::OperationTimedOut),
                    },
                    rings,
                );
                return;
            }
            crate::telemetry::KafkaTrouble {
                message: &"waiting for Kafka to acknowledge a transaction's records",
            }
            .emit();
        }
        let acked = Instant::now();
        // The previous transaction's checkpoint is older: it must have
        // committed before this one may.
        self.collect(true, rings);
        if self.state != State::Running {
            return;
        }
        let (Some(spare), Some(open)) = (self.spare.take(), self.open.take()) else {
            self.broken(SinkError::Internal(
                "the transaction flusher lost track of its producers",
            ));
            return;
        };
        let producer = std::mem::replace(&mut self.producer, spare);
        let job = Finished {
            producer,
            open,
            opaque,
            through,
            acked,
        };
        if self.jobs.send(job).is_err() {
            self.broken(SinkError::Internal("the committer thread ended"));
            return;
        }
        self.flush = false;
    }

    /// Takes the committer's answer for the transaction out with it, if
    /// any: waiting for it if `block`, else only if it is there. A failed
    /// commit aborts the open transaction too (its units come after).
    fn collect(&mut self, block: bool, rings: &Rings<Record>) {
        if self.spare.is_some() {
            return;
        }
        let outcome = if block {
            self.outcomes.recv().ok()
        } else {
            match self.outcomes.try_recv() {
                Ok(o) => Some(o),
                Err(TryRecvError::Empty) => return,
                Err(TryRecvError::Disconnected) => None,
            }
        };
        let Some(Outcome {
            mut producer,
            result,
        }) = outcome
        else {
            self.broken(SinkError::Internal("the committer thread ended"));
            return;
        };
        if let Err(e) = result {
            if e.kind != TxnErrorKind::Fatal {
                // The failed producer's transaction is aborted before it
                // takes records again.
                if let Err(e) = abort_until_given_up(&mut producer, rings, &self.beat) {
                    self.open = None;
                    self.broken(SinkError::TransactionFatal {
                        op: "abort",
                        source: e.error,
                    });
                    self.spare = Some(producer);
                    return;
                }
            }
            self.failed("commit", e, rings);
        }
        self.spare = Some(producer);
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
        if let Err(e) = abort_until_given_up(&mut self.producer, rings, &self.beat) {
            self.broken(SinkError::TransactionFatal {
                op: "abort",
                source: e.error,
            });
        }
    }

    /// A transactional call failed: abort if the producer allows it, and
    /// tell the relay.
    fn failed(&mut self, op: &'static str, e: TxnError, rings: &Rings<Record>) {
        match e.kind {
            TxnErrorKind::Fatal => {
                self.open = None;
                self.broken(SinkError::TransactionFatal {
                    op,
                    source: e.error,
                });
            }
            TxnErrorKind::Abortable | TxnErrorKind::Retriable => {
                // After a failed `begin` nothing is open to abort.
                self.abort(rings);
                if self.state == State::Running {
                    self.state = State::Aborted;
                    self.reporter
                        .report(Delivery::Broken(SinkError::TransactionAborted {
                            op,
                            source: e.error,
                        }));
                }
            }
        }
    }

    /// Ends sending for good, once, and tells the relay why.
    fn broken(&mut self, e: SinkError) {
        if self.state != State::Dead {
            self.state = State::Dead;
            self.reporter.report(Delivery::Broken(e));
        }
    }
}

/// `abort_transaction`, retried while it fails retriably and [`Patience`]
/// lasts.
fn abort_until_given_up<P: Transactional>(
    producer: &mut P,
    rings: &Rings<Record>,
    beat: &Beat,
) -> Result<(), TxnError> {
    let mut patience = Patience::default();
    loop {
        beat.tick();
        match producer.abort(COMMIT_TIMEOUT) {
            Err(e) if e.kind == TxnErrorKind::Retriable && !patience.exhausted(rings) => {}
            other => return other,
        }
    }
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
        Settle,
        Commit,
        Abort,
    }

    /// Records its calls, tagged with its index, in a log shared with the
    /// other producer.
    #[derive(Clone, Default)]
    struct Fake {
        id: usize,
        log: Arc<Mutex<Vec<(usize, Call)>>>,
        /// The next commits fail this way (popped from the end).
        fail_commit: Arc<Mutex<Vec<TxnErrorKind>>>,
        /// Every abort fails this way (Kafka away).
        abort_fails: Arc<Mutex<Option<TxnErrorKind>>>,
    }

    impl Fake {
        fn call(&self, c: Call) {
            self.log.lock().unwrap().push((self.id, c));
        }
    }

    /// Two producers sharing one log.
    fn pair() -> [Fake; 2] {
        let first = Fake::default();
        let second = Fake {
            id: 1,
            log: Arc::clone(&first.log),
            ..Fake::default()
        };
        [first, second]
    }

    /// Two producers; the first one's next commit fails as `kind`.
    fn first_commit_fails(kind: TxnErrorKind) -> [Fake; 2] {
        let fakes = pair();
        fakes[0].fail_commit.lock().unwrap().push(kind);
        fakes
    }

    fn err(kind: TxnErrorKind) -> TxnError {
        TxnError {
            kind,
            error: KafkaError::Flush(RDKafkaErrorCode::OperationTimedOut),
        }
    }

    impl Transactional for Fake {
        fn begin(&mut self) -> Result<(), TxnError> {
            self.call(Call::Begin);
            Ok(())
        }
        fn send(&mut self, rec: Record) -> Result<SendOutcome, (KafkaError, Record)> {
            self.call(if rec.opaque == usize::MAX {
                Call::Checkpoint(checkpoint::parse(&rec.value).unwrap().to_string())
            } else {
                Call::Send(rec.opaque)
            });
            Ok(SendOutcome::Queued)
        }
        fn settle(&mut self, _: Duration) -> bool {
            self.call(Call::Settle);
            true
        }
        fn commit(&mut self, _: Duration) -> Result<(), TxnError> {
            self.call(Call::Commit);
            match self.fail_commit.lock().unwrap().pop() {
                Some(kind) => Err(err(kind)),
                None => Ok(()),
            }
        }
        fn abort(&mut self, _: Duration) -> Result<(), TxnError> {
            {
                let mut log = self.log.lock().unwrap();
                if log.last() != Some(&(self.id, Call::Abort)) {
                    log.push((self.id, Call::Abort));
                }
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

    /// Three one-record units, ending at 0x100, 0x200 and 0x300.
    fn three_units() -> Vec<Record> {
        (1..=3).map(|i| rec(i, Some(0x100 * i as u64))).collect()
    }

    /// The first producer's calls for unit 1 (ending at 0x100), up to its
    /// commit.
    fn first_commit() -> Vec<Call> {
        use Call::*;
        vec![Begin, Send(1), Checkpoint("0/100".into()), Settle, Commit]
    }

    struct Run {
        log: Vec<(usize, Call)>,
        reports: Vec<Delivery>,
    }

    impl Run {
        /// The calls producer `id` received, in order.
        fn of(&self, id: usize) -> Vec<Call> {
            self.log
                .iter()
                .filter(|(p, _)| *p == id)
                .map(|(_, c)| c.clone())
                .collect()
        }

        /// Where in the whole log producer `id` received `call` first.
        fn at(&self, id: usize, call: &Call) -> usize {
            self.log
                .iter()
                .position(|(p, c)| *p == id && c == call)
                .unwrap()
        }
    }

    /// Pushes `recs`, sends `commands` first, closes the rings and runs the
    /// flusher to its end.
    fn run(recs: Vec<Record>, commands: &[Command], max_records: usize, fakes: [Fake; 2]) -> Run {
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
        let log = Arc::clone(&fakes[0].log);
        spawn(
            fakes,
            TxnSettings {
                max_duration: Duration::from_secs(3600),
                max_records,
                checkpoint_topic: "p.checkpoints".into(),
            },
            TxnWiring {
                rings: Arc::clone(&rings),
                source,
                commands: crx,
                reports: tx,
                wake: Arc::new(tokio::sync::Notify::new()),
            },
        )
        .unwrap()
        .join()
        .unwrap();
        let log = log.lock().unwrap().clone();
        Run {
            log,
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
    fn commits_whole_units_with_a_checkpoint_once_due_taking_turns() {
        use Call::*;
        // Units: [1,2,3] ends 0x100; [4] ends 0x120; [5,6] ends 0x200;
        // [7] ends 0x300.
        let recs = vec![
            rec(1, None),
            rec(2, None),
            rec(3, Some(0x100)),
            rec(4, Some(0x120)),
            rec(5, None),
            rec(6, Some(0x200)),
            rec(7, Some(0x300)),
        ];
        let r = run(recs, &[], 2, pair());
        assert_eq!(
            r.of(0),
            vec![
                Begin,
                Send(1),
                Send(2),
                Send(3),
                Checkpoint("0/100".into()),
                Settle,
                Commit,
                Begin,
                Send(7),
                Checkpoint("0/300".into()),
                Settle,
                Commit,
            ],
            "due after 2 records, but committed only at a unit end"
        );
        assert_eq!(
            r.of(1),
            vec![
                Begin,
                Send(4),
                Send(5),
                Send(6),
                Checkpoint("0/200".into()),
                Settle,
                Commit,
            ],
            "the second producer takes the next transaction"
        );
        assert!(
            r.at(0, &Settle) < r.at(1, &Begin),
            "the second producer sends only once the first one's records are acknowledged"
        );
        assert_eq!(
            committed(&r.reports),
            vec![(3, 3, 0x100), (6, 3, 0x200), (7, 1, 0x300)],
            "commits are reported in stream order"
        );
    }

    /// A PostgreSQL transaction larger than --txn-max-facts stays whole.
    #[test]
    fn a_large_unit_is_never_split() {
        let mut recs: Vec<Record> = (0..50).map(|i| rec(i, None)).collect();
        recs.push(rec(50, Some(0x900)));
        let r = run(recs, &[], 10, pair());
        let commits = r.log.iter().filter(|(_, c)| *c == Call::Commit).count();
        assert_eq!(commits, 1);
        assert_eq!(committed(&r.reports), vec![(50, 51, 0x900)]);
    }

    /// Closing with a partial unit open aborts it; nothing is reported
    /// committed past the last unit end.
    #[test]
    fn a_partial_unit_at_close_is_aborted() {
        use Call::*;
        let recs = vec![rec(1, Some(0x100)), rec(2, None)];
        let r = run(recs, &[], 1000, pair());
        assert_eq!(
            r.of(0),
            vec![Begin, Send(1), Send(2), Abort],
            "the transaction holding a partial unit is aborted, not committed"
        );
        assert_eq!(r.of(1), vec![]);
        assert!(committed(&r.reports).is_empty());
    }

    #[test]
    fn reset_drops_queued_records_and_answers() {
        let recs = vec![rec(1, None), rec(2, Some(0x100))];
        let r = run(recs, &[Command::Reset], 1000, pair());
        assert_eq!(r.log, vec![], "queued records are dropped, not sent");
        assert!(matches!(r.reports.as_slice(), [Delivery::Reset]));
    }

    /// An abortable commit failure aborts that transaction and the one
    /// after it (which must not commit: its checkpoint would cover the
    /// failed one's units), reports a transient error, and drops records
    /// until the relay resets.
    #[test]
    fn an_abortable_commit_failure_aborts_the_next_transaction_too() {
        use Call::*;
        let fakes = first_commit_fails(TxnErrorKind::Abortable);
        let r = run(three_units(), &[], 1, fakes);
        assert_eq!(r.of(0), [first_commit(), vec![Abort]].concat());
        assert_eq!(
            r.of(1),
            vec![Begin, Send(2), Checkpoint("0/200".into()), Settle, Abort],
            "not committed; record 3 is dropped: the relay streams it again after a reset"
        );
        match r.reports.as_slice() {
            [Delivery::Broken(e)] => assert!(e.is_transient(), "{e}"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_fatal_commit_failure_is_definite_and_ends_sending() {
        use Call::*;
        let fakes = first_commit_fails(TxnErrorKind::Fatal);
        let r = run(three_units(), &[], 1, fakes);
        assert_eq!(r.of(0), first_commit());
        assert_eq!(
            r.of(1),
            vec![Begin, Send(2), Checkpoint("0/200".into()), Settle],
            "nothing is committed after a fatal error"
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
        let fakes = pair();
        *fakes[0].abort_fails.lock().unwrap() = Some(TxnErrorKind::Retriable);
        let log = Arc::clone(&fakes[0].log);
        let (done, exited) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let r = run(vec![rec(1, Some(0x100)), rec(2, None)], &[], 1000, fakes);
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
            log.lock().unwrap().last().unwrap(),
            &(0, Call::Abort),
            "nothing is committed"
        );
    }

    #[test]
    fn a_retriable_commit_failure_is_retried() {
        let fakes = first_commit_fails(TxnErrorKind::Retriable);
        let r = run(vec![rec(1, Some(0x100))], &[Command::Flush], 1000, fakes);
        assert_eq!(
            r.of(0),
            [first_commit(), vec![Call::Commit]].concat(),
            "committed again"
        );
        assert_eq!(committed(&r.reports), vec![(1, 1, 0x100)]);
    }
}
