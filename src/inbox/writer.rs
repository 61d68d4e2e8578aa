//! The database side of the inbox: one transaction per batch writes the
//! facts, the dead letters and the partitions' next offsets together, in
//! one round trip.
//!
//! ```text
//!  ToWriter::Batch ──pipelined, one round trip──►
//!      BEGIN
//!      INSERT factlib.inbox SELECT unnest(…) ON CONFLICT (id) DO NOTHING   (rows: written; the rest: duplicates)
//!      INSERT factlib.inbox_dead_letters SELECT unnest(…) ON CONFLICT DO NOTHING
//!      SELECT factlib.inbox_advance(…)   (each offset from the value expected to the next; 40001 if it moved)
//!      SELECT pg_notify('factlib_inbox')   (wakes the workers)
//!      COMMIT   (a ROLLBACK if a statement before it failed)
//!  ToWriter::Assigned ──SELECT next_offset──► reply; remembered as expected
//!  ToWriter::Revoked ──► forget every partition; reply
//! ```
//!
//! **Invariants**
//! - A fact row and the offset past it commit in the same transaction, or
//!   neither does: after any crash the stored offsets say exactly which
//!   records are in the inbox.
//! - Offsets never go backwards or fork: each update is conditional on the
//!   value this writer read or wrote last. When another process moved a
//!   partition on (a rebalance this one missed), the batch is rolled back
//!   and the session ends with [`InboxError::Fenced`]; the next one reads
//!   the offsets again.
//! - A fact id seen before (a replay, an at-least-once relay) is not
//!   written again; it is counted as a duplicate.
//! - One round trip per batch: every statement, BEGIN and COMMIT included,
//!   is sent before the first answer is awaited (in order on the one
//!   connection); never one per fact.
//! - Rows are inserted in the batch's order, which is each partition's
//!   offset order, so `seq` follows the offsets within a partition. (No
//!   ORDER BY: `unnest` yields the arrays in order, and sorting the wide
//!   rows cost about a fifth of the insert.)

use std::collections::HashMap;
use std::time::{Instant, SystemTime};

use tokio::sync::mpsc;
use tokio_postgres::{Client, Statement};
use uuid::Uuid;

use super::consumer::{Batch, Partition, ToWriter};
use super::InboxError;
use crate::source::sql;
use crate::telemetry;

const INSERT_FACTS: &str = r#"
INSERT INTO factlib.inbox (id, topic, "partition", "offset", aggregate_type, aggregate_id,
                           event_type, payload, metadata, trace_id, span_id, created_at)
SELECT id, topic, p, o, at, ai, et, pl, md::jsonb, ti, si, ca
FROM unnest($1::uuid[], $2::text[], $3::int[], $4::bigint[], $5::text[], $6::text[], $7::text[],
            $8::bytea[], $9::text[], $10::text[], $11::text[], $12::timestamptz[])
     AS f(id, topic, p, o, at, ai, et, pl, md, ti, si, ca)
ON CONFLICT (id) DO NOTHING"#;

const INSERT_DEAD: &str = r#"
INSERT INTO factlib.inbox_dead_letters (topic, "partition", "offset", error, key, value)
SELECT * FROM unnest($1::text[], $2::int[], $3::bigint[], $4::text[], $5::bytea[], $6::bytea[])
ON CONFLICT DO NOTHING"#;

const ADVANCE_OFFSETS: &str =
    "SELECT factlib.inbox_advance($1, $2::text[], $3::int[], $4::bigint[], $5::bigint[])";

const NOTIFY: &str = "SELECT pg_notify('factlib_inbox', '')";

const READ_OFFSETS: &str = r#"
SELECT v.i, o.next_offset
FROM unnest($2::text[], $3::int[]) WITH ORDINALITY AS v(topic, p, i)
JOIN factlib.inbox_offsets o
  ON o.consumer_group = $1 AND o.topic = v.topic AND o."partition" = v.p"#;

/// What one batch did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct Written {
    pub(crate) facts: u64,
    pub(crate) duplicates: u64,
    pub(crate) dead: u64,
}

/// Writes batches into the inbox database; owns the offsets it expects.
pub(crate) struct Writer {
    client: Client,
    group: String,
    /// Per assigned partition, the stored next offset as this writer last
    /// read or wrote it (`None`: no row yet).
    expected: HashMap<Partition, Option<i64>>,
    statements: Statements,
}

struct Statements {
    facts: Statement,
    dead: Statement,
    advance: Statement,
    notify: Statement,
    read: Statement,
}

impl Writer {
    /// Prepares the statements (and so checks the schema is there).
    ///
    /// The session commits with `synchronous_commit = off`: a batch's rows
    /// and its offsets share one transaction, so a commit lost in a crash
    /// loses both and the records are read again; and a worker's
    /// transaction that processed a row commits after it in the WAL, so
    /// its own (synchronous) commit makes the batch durable first.
    pub(crate) async fn new(client: Client, group: String) -> Result<Self, InboxError> {
        client
            .batch_execute("SET synchronous_commit = off")
            .await
            .map_err(|e| InboxError::db("setting synchronous_commit", e))?;
        let prepare = |sql: &'static str| {
            let client = &client;
            async move {
                client
                    .prepare(sql)
                    .await
                    .map_err(|e| InboxError::db("preparing the inbox statements", e))
            }
        };
        let statements = Statements {
            facts: prepare(INSERT_FACTS).await?,
            dead: prepare(INSERT_DEAD).await?,
            advance: prepare(ADVANCE_OFFSETS).await?,
            notify: prepare(NOTIFY).await?,
            read: prepare(READ_OFFSETS).await?,
        };
        Ok(Writer {
            client,
            group,
            expected: HashMap::new(),
            statements,
        })
    }

    /// Handles the consumer's messages until it is gone or a write fails.
    pub(crate) async fn run(mut self, mut rx: mpsc::Receiver<ToWriter>) -> Result<(), InboxError> {
        while let Some(msg) = rx.recv().await {
            match msg {
                ToWriter::Batch(b) => {
                    let started = Instant::now();
                    let lag: Vec<(Partition, i64)> =
                        b.next.iter().map(|(p, n)| (p.clone(), *n)).collect();
                    let w = self.write(b).await?;
                    telemetry::InboxBatch {
                        facts: w.facts,
                        duplicates: w.duplicates,
                        dead: w.dead,
                        took: started.elapsed(),
                    }
                    .emit();
                    for ((topic, partition), next) in lag {
                        telemetry::inbox_written_through(&topic, partition, next);
                    }
                }
                ToWriter::Assigned { partitions, reply } => {
                    let stored = self.read(&partitions).await?;
                    for (p, next) in partitions.iter().zip(&stored) {
                        self.expected.insert(p.clone(), *next);
                        if let Some(n) = next {
                            telemetry::inbox_written_through(&p.0, p.1, *n);
                        }
                    }
                    let _ = reply.send(stored);
                }
                ToWriter::Revoked { reply } => {
                    for (topic, partition) in self.expected.keys() {
                        telemetry::inbox_partition_released(topic, *partition);
                    }
                    self.expected.clear();
                    let _ = reply.send(());
                }
            }
        }
        Ok(())
    }

    /// The stored next offset of each partition (`None`: no row).
    async fn read(&self, partitions: &[Partition]) -> Result<Vec<Option<i64>>, InboxError> {
        let topics: Vec<&str> = partitions.iter().map(|(t, _)| &**t).collect();
        let numbers: Vec<i32> = partitions.iter().map(|(_, p)| *p).collect();
        let rows = self
            .client
            .query(&self.statements.read, &[&self.group, &topics, &numbers])
            .await
            .map_err(|e| InboxError::db("reading the stored offsets", e))?;
        let mut stored = vec![None; partitions.len()];
        for r in rows {
            let i: i64 = r.get(0);
            let slot = usize::try_from(i - 1)
                .ok()
                .and_then(|i| stored.get_mut(i))
                .ok_or(InboxError::Internal("an offset row out of range"))?;
            *slot = Some(r.get(1));
        }
        Ok(stored)
    }

    /// Writes one batch in one transaction, in one round trip.
    async fn write(&mut self, b: Batch) -> Result<Written, InboxError> {
        let mut offsets = Offsets::default();
        for (p, next) in &b.next {
            let Some(expected) = self.expected.get(p) else {
                return Err(InboxError::Internal(
                    "a batch holds a partition that is not assigned",
                ));
            };
            offsets.push(p, *expected, *next);
        }
        let facts = FactColumns::of(&b);
        let dead = DeadColumns::of(&b);
        let (c, s) = (&self.client, &self.statements);
        // Polled in this order, each sends its request on its first poll:
        // the server gets BEGIN, the statements and COMMIT in one go.
        let begin = c.batch_execute("BEGIN");
        let inserted = async {
            if facts.id.is_empty() {
                return Ok(0);
            }
            c.execute(
                &s.facts,
                &[
                    &facts.id,
                    &facts.topic,
                    &facts.partition,
                    &facts.offset,
                    &facts.aggregate_type,
                    &facts.aggregate_id,
                    &facts.event_type,
                    &facts.payload,
                    &facts.metadata,
                    &facts.trace_id,
                    &facts.span_id,
                    &facts.created_at,
                ],
            )
            .await
        };
        let dead_written = async {
            if dead.topic.is_empty() {
                return Ok(0);
            }
            c.execute(
                &s.dead,
                &[
                    &dead.topic,
                    &dead.partition,
                    &dead.offset,
                    &dead.error,
                    &dead.key,
                    &dead.value,
                ],
            )
            .await
        };
        let group = &self.group;
        let advanced = async {
            c.execute(
                &s.advance,
                &[
                    group,
                    &offsets.topic,
                    &offsets.partition,
                    &offsets.expected,
                    &offsets.next,
                ],
            )
            .await
        };
        let notified = c.execute(&s.notify, &[]);
        let commit = c.batch_execute("COMMIT");
        let (begin, inserted, dead_written, advanced, notified, commit) =
            tokio::join!(begin, inserted, dead_written, advanced, notified, commit);
        let db = |what: &'static str| move |e| InboxError::db(what, e);
        begin.map_err(db("starting a batch"))?;
        let inserted = inserted.map_err(db("writing facts to factlib.inbox"))?;
        let dead_written =
            dead_written.map_err(db("writing dead letters to factlib.inbox_dead_letters"))?;
        if let Err(e) = advanced {
            if e.code() == Some(&tokio_postgres::error::SqlState::T_R_SERIALIZATION_FAILURE) {
                tracing::warn!(error = %sql::pg_message(&e), "inbox: batch rolled back");
                return Err(InboxError::Fenced {
                    partitions: offsets.topic.len(),
                });
            }
            return Err(InboxError::db("advancing factlib.inbox_offsets", e));
        }
        notified.map_err(db("notifying the inbox workers"))?;
        // Every statement succeeded, so COMMIT committed.
        commit.map_err(db("committing a batch"))?;
        for (p, next) in &b.next {
            self.expected.insert(p.clone(), Some(*next));
        }
        let rows = u64::try_from(facts.id.len()).unwrap_or(u64::MAX);
        Ok(Written {
            facts: inserted,
            duplicates: rows.saturating_sub(inserted),
            dead: dead_written,
        })
    }
}

/// One column array per parameter of [`INSERT_FACTS`].
struct FactColumns<'a> {
    id: Vec<Uuid>,
    topic: Vec<&'a str>,
    partition: Vec<i32>,
    offset: Vec<i64>,
    aggregate_type: Vec<&'a str>,
    aggregate_id: Vec<&'a str>,
    event_type: Vec<&'a str>,
    payload: Vec<&'a [u8]>,
    metadata: Vec<&'a str>,
    trace_id: Vec<Option<&'a str>>,
    span_id: Vec<Option<&'a str>>,
    created_at: Vec<Option<SystemTime>>,
}

impl<'a> FactColumns<'a> {
    fn of(b: &'a Batch) -> Self {
        let n = b.rows.len();
        let mut c = FactColumns {
            id: Vec::with_capacity(n),
            topic: Vec::with_capacity(n),
            partition: Vec::with_capacity(n),
            offset: Vec::with_capacity(n),
            aggregate_type: Vec::with_capacity(n),
            aggregate_id: Vec::with_capacity(n),
            event_type: Vec::with_capacity(n),
            payload: Vec::with_capacity(n),
            metadata: Vec::with_capacity(n),
            trace_id: Vec::with_capacity(n),
            span_id: Vec::with_capacity(n),
            created_at: Vec::with_capacity(n),
        };
        for r in &b.rows {
            let (trace_id, span_id) = r.trace();
            c.id.push(r.id);
            c.topic.push(&r.origin.topic);
            c.partition.push(r.origin.partition);
            c.offset.push(r.origin.offset);
            c.aggregate_type.push(r.fact.aggregate_type());
            c.aggregate_id.push(r.fact.aggregate_id());
            c.event_type.push(r.fact.event_type());
            c.payload.push(r.fact.payload_slice());
            c.metadata.push(&r.metadata);
            c.trace_id.push(trace_id);
            c.span_id.push(span_id);
            c.created_at.push(r.created_at);
        }
        c
    }
}

/// One column array per parameter of [`INSERT_DEAD`].
struct DeadColumns<'a> {
    topic: Vec<&'a str>,
    partition: Vec<i32>,
    offset: Vec<i64>,
    error: Vec<&'a str>,
    key: Vec<Option<&'a [u8]>>,
    value: Vec<Option<&'a [u8]>>,
}

impl<'a> DeadColumns<'a> {
    fn of(b: &'a Batch) -> Self {
        DeadColumns {
            topic: b.dead.iter().map(|d| &*d.origin.topic).collect(),
            partition: b.dead.iter().map(|d| d.origin.partition).collect(),
            offset: b.dead.iter().map(|d| d.origin.offset).collect(),
            error: b.dead.iter().map(|d| d.error.as_str()).collect(),
            key: b.dead.iter().map(|d| d.key.as_deref()).collect(),
            value: b.dead.iter().map(|d| d.value.as_deref()).collect(),
        }
    }
}

/// The offsets of a batch's partitions, as columns for
/// `factlib.inbox_advance`.
#[derive(Default)]
struct Offsets<'a> {
    topic: Vec<&'a str>,
    partition: Vec<i32>,
    /// `None`: no row yet (the partition's first batch).
    expected: Vec<Option<i64>>,
    next: Vec<i64>,
}

impl<'a> Offsets<'a> {
    fn push(&mut self, (topic, partition): &'a Partition, expected: Option<i64>, next: i64) {
        self.topic.push(topic);
        self.partition.push(*partition);
        self.expected.push(expected);
        self.next.push(next);
    }
}
