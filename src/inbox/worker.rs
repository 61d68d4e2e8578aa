//! Processing facts from the inbox, for services written in Rust: a
//! [`Consumer`] takes the oldest unprocessed fact whose aggregate has no
//! older unprocessed fact, runs the service's [`Handler`] inside the
//! transaction that marks it processed, and commits both together.
//!
//! ```text
//!  BEGIN ──CLAIM (oldest eligible, FOR UPDATE SKIP LOCKED)──► SAVEPOINT ──► Handler::handle ──► SET processed_at ──► COMMIT
//!                                                                         └─ Err ──► ROLLBACK TO SAVEPOINT; attempts + 1, last_error, retry_at ──► COMMIT
//!  idle: wait for NOTIFY factlib_inbox (sent by every inbox batch) or ConsumerOptions::idle_wait
//! ```
//!
//! **Invariants**
//! - A fact's effects happen once: the handler's writes and `processed_at`
//!   commit in one transaction, and a claimed fact is locked against every
//!   other worker until that transaction ends.
//! - Per aggregate, facts are processed in inbox order (`seq`, which follows
//!   the Kafka offsets of the aggregate's partition): only the oldest
//!   unprocessed fact of an aggregate is eligible, so the next one waits
//!   until it commits, whichever worker holds it. A failing fact holds its
//!   aggregate back until it succeeds; other aggregates go on. This holds
//!   while one transaction at a time writes a partition's facts into the
//!   inbox, as `factlib inbox` does (its offsets are updated conditionally):
//!   `seq` is drawn at insert and becomes visible at commit.
//! - A failed fact stays locked until its failure (attempts, `retry_at`)
//!   is committed: the handler runs under a savepoint, so no other worker
//!   can take it back before `retry_at`.
//! - The claim is [`CLAIM_SQL`], the same statement the README shows for
//!   workers in any language.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use futures_util::{FutureExt as _, StreamExt as _};
use tokio::sync::Notify;
use tokio_postgres::{AsyncMessage, Client, Row, Transaction};
use uuid::Uuid;

use super::InboxError;
use crate::source::sql;

/// Claims the next fact a worker may process: the oldest unprocessed one
/// (by `seq`) that is due and whose aggregate has no older unprocessed
/// fact, skipping facts other workers hold.
pub const CLAIM_SQL: &str = "\
SELECT i.id, i.seq, i.topic, i.partition, i.offset, i.aggregate_type, i.aggregate_id,
       i.event_type, i.payload, i.metadata::text, i.trace_id, i.span_id, i.created_at,
       i.received_at, i.attempts
FROM factlib.inbox i
WHERE i.processed_at IS NULL
  AND (i.retry_at IS NULL OR i.retry_at <= now())
  AND NOT EXISTS (
        SELECT 1 FROM factlib.inbox e
        WHERE e.processed_at IS NULL
          AND e.aggregate_type = i.aggregate_type
          AND e.aggregate_id = i.aggregate_id
          AND e.seq < i.seq)
ORDER BY i.seq
LIMIT 1
FOR UPDATE OF i SKIP LOCKED";

const DONE_SQL: &str = "UPDATE factlib.inbox SET processed_at = clock_timestamp() WHERE id = $1";

const FAILED_SQL: &str = "UPDATE factlib.inbox \
    SET attempts = attempts + 1, last_error = $2, \
        retry_at = now() + $3::double precision * interval '1 second' \
    WHERE id = $1 AND processed_at IS NULL";

/// A fact from `factlib.inbox`, as a handler sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InboxFact {
    /// The fact id (the envelope's, a UUID).
    pub id: Uuid,
    /// Its place in the inbox: increasing per aggregate.
    pub seq: i64,
    /// Where it was read from.
    pub topic: String,
    /// Its partition.
    pub partition: i32,
    /// Its offset there.
    pub offset: i64,
    /// E.g. "order".
    pub aggregate_type: String,
    /// E.g. "o-1".
    pub aggregate_id: String,
    /// E.g. "order.placed".
    pub event_type: String,
    /// The application payload.
    pub payload: Vec<u8>,
    /// The envelope's metadata.
    pub metadata: BTreeMap<String, String>,
    /// The trace id, if the fact was traced.
    pub trace_id: Option<String>,
    /// The span id, if the fact was traced.
    pub span_id: Option<String>,
    /// When the emitter created it.
    pub created_at: Option<SystemTime>,
    /// When `factlib inbox` wrote it.
    pub received_at: SystemTime,
    /// Failed attempts before this one.
    pub attempts: i32,
}

impl InboxFact {
    fn from_row(r: &Row) -> Result<Self, tokio_postgres::Error> {
        let metadata: String = r.try_get(9)?;
        Ok(InboxFact {
            id: r.try_get(0)?,
            seq: r.try_get(1)?,
            topic: r.try_get(2)?,
            partition: r.try_get(3)?,
            offset: r.try_get(4)?,
            aggregate_type: r.try_get(5)?,
            aggregate_id: r.try_get(6)?,
            event_type: r.try_get(7)?,
            payload: r.try_get(8)?,
            // Written by the inbox from a map of strings.
            metadata: serde_json::from_str(&metadata).unwrap_or_default(),
            trace_id: r.try_get(10)?,
            span_id: r.try_get(11)?,
            created_at: r.try_get(12)?,
            received_at: r.try_get(13)?,
            attempts: r.try_get(14)?,
        })
    }
}

/// The service's processing of one fact. It runs inside the transaction
/// that marks the fact processed: write through `tx`, and the writes
/// commit exactly when the fact is marked; return an error and neither
/// happens (the fact is tried again after [`ConsumerOptions::retry_after`]).
pub trait Handler {
    /// What a failed fact reports; stored in `factlib.inbox.last_error`.
    type Error: std::fmt::Display;

    /// Processes `fact` inside `tx`.
    fn handle(
        &mut self,
        tx: &Transaction<'_>,
        fact: &InboxFact,
    ) -> impl Future<Output = Result<(), Self::Error>>;
}

/// How a [`Consumer`] waits and retries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsumerOptions {
    /// With nothing to process, look again after this long (a `NOTIFY`
    /// from the inbox wakes it sooner).
    pub idle_wait: Duration,
    /// A fact whose handler failed is tried again after this long.
    pub retry_after: Duration,
}

impl Default for ConsumerOptions {
    fn default() -> Self {
        ConsumerOptions {
            idle_wait: Duration::from_secs(1),
            retry_after: Duration::from_secs(5),
        }
    }
}

/// Why processing a fact did not complete.
#[derive(Debug, thiserror::Error)]
pub enum ProcessError<E: std::fmt::Display> {
    /// The handler failed; the fact stays unprocessed, retried later.
    #[error("processing fact {fact} failed: {error}")]
    Handler {
        /// The fact.
        fact: Uuid,
        /// The handler's error.
        error: E,
    },
    /// The database failed (the transaction is rolled back).
    #[error("inbox database: {}", sql::pg_message(.0))]
    Db(#[from] tokio_postgres::Error),
}

/// A worker processing facts from `factlib.inbox`. Run as many as you
/// like, in as many processes: each fact is processed once, and each
/// aggregate's facts in order.
pub struct Consumer {
    client: Client,
    woken: Arc<Notify>,
    options: ConsumerOptions,
}

impl Consumer {
    /// Connects to the inbox database (TLS as the URL's `sslmode` says)
    /// and listens for the inbox's notifications. Needs a Tokio runtime:
    /// the connection is driven by a spawned task.
    pub async fn connect(url: &str, options: ConsumerOptions) -> Result<Self, InboxError> {
        let (client, mut messages) = sql::connect(url).await?;
        let woken = Arc::new(Notify::new());
        let wake = Arc::clone(&woken);
        tokio::spawn(async move {
            while let Some(m) = messages.next().await {
                if let Ok(AsyncMessage::Notification(_)) = m {
                    wake.notify_one();
                }
            }
            // The connection ended: a waiting worker finds out at once.
            wake.notify_one();
        });
        client
            .batch_execute("LISTEN factlib_inbox")
            .await
            .map_err(|e| InboxError::db("listening for factlib_inbox", e))?;
        Ok(Consumer {
            client,
            woken,
            options,
        })
    }

    /// Processes the next eligible fact, if there is one: `Some(id)` once
    /// its handler's writes and its `processed_at` are committed, `None`
    /// when nothing is eligible now.
    pub async fn process_next<H: Handler>(
        &mut self,
        handler: &mut H,
    ) -> Result<Option<Uuid>, ProcessError<H::Error>> {
        let mut tx = self.client.transaction().await?;
        let Some(row) = tx.query_opt(CLAIM_SQL, &[]).await? else {
            tx.commit().await?;
            return Ok(None);
        };
        let fact = InboxFact::from_row(&row)?;
        let sp = tx.savepoint("factlib_handler").await?;
        match handler.handle(&sp, &fact).await {
            Ok(()) => {
                sp.commit().await?;
                tx.execute(DONE_SQL, &[&fact.id]).await?;
                tx.commit().await?;
                Ok(Some(fact.id))
            }
            Err(error) => {
                sp.rollback().await?;
                let retry = self.options.retry_after.as_secs_f64();
                tx.execute(FAILED_SQL, &[&fact.id, &error.to_string(), &retry])
                    .await?;
                tx.commit().await?;
                Err(ProcessError::Handler {
                    fact: fact.id,
                    error,
                })
            }
        }
    }

    /// Processes facts until `stop` completes: waits for the inbox's
    /// notifications when idle, logs a failed fact (which is retried
    /// later) and goes on. Returns how many facts it processed, or the
    /// first database error.
    pub async fn run<H: Handler>(
        &mut self,
        handler: &mut H,
        stop: impl Future<Output = ()>,
    ) -> Result<u64, tokio_postgres::Error> {
        tokio::pin!(stop);
        let mut done = 0;
        loop {
            // A fact begun is finished: the stop is looked at between facts.
            if stop.as_mut().now_or_never().is_some() {
                return Ok(done);
            }
            match self.process_next(handler).await {
                Ok(Some(_)) => {
                    done += 1;
                    continue;
                }
                Ok(None) => {}
                Err(ProcessError::Handler { fact, error }) => {
                    // It waits for its retry_at; other facts may be ready.
                    tracing::warn!(%fact, %error, "inbox: processing a fact failed; it is tried again later");
                    continue;
                }
                Err(ProcessError::Db(e)) => return Err(e),
            }
            tokio::select! {
                () = self.woken.notified() => {}
                () = tokio::time::sleep(self.options.idle_wait) => {}
                () = &mut stop => return Ok(done),
            }
        }
    }
}
