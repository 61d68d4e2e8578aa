//! `--inbox-retention`: deletes processed facts (and claims) older than
//! the retention, in bounded batches, on a connection of its own.
//!
//! ```text
//!  every RETENTION_EVERY ──DELETE … LIMIT RETENTION_BATCH (processed_at < now() - retention)──► repeat while full
//! ```
//!
//! **Invariants**
//! - Only rows with `processed_at` set are deleted: an unprocessed fact
//!   stays however old it is.
//! - Each statement deletes at most [`RETENTION_BATCH`] rows, so it never
//!   holds locks or bloats WAL in one large transaction.
//! - A failure is logged and retried at the next round; it never stops
//!   the inbox.
//!
//! Deleting a processed fact also forgets its id: a replay of it after the
//! retention would be written again. Keep the retention longer than any
//! replay you may run.

use std::time::Duration;

use tokio::sync::watch;
use tokio_postgres::Client;

use crate::telemetry;

/// How often retention runs.
pub(crate) const RETENTION_EVERY: Duration = Duration::from_secs(60);

/// Rows deleted per statement, at most.
pub(crate) const RETENTION_BATCH: i64 = 5_000;

const DELETE_FACTS: &str = "DELETE FROM factlib.inbox WHERE id IN (\
    SELECT id FROM factlib.inbox \
    WHERE processed_at IS NOT NULL AND processed_at < now() - $1::double precision * interval '1 second' \
    LIMIT $2)";

const DELETE_CLAIMS: &str = "DELETE FROM factlib.inbox_claims WHERE (consumer, fact_id) IN (\
    SELECT consumer, fact_id FROM factlib.inbox_claims \
    WHERE claimed_at < now() - $1::double precision * interval '1 second' LIMIT $2)";

/// Deletes processed rows older than `older_than` every
/// [`RETENTION_EVERY`] until `stop`.
pub(crate) async fn run(url: String, older_than: Duration, mut stop: watch::Receiver<bool>) {
    loop {
        match once(&url, older_than).await {
            Ok(rows) => telemetry::InboxRetention { rows, older_than }.emit(),
            Err(e) => {
                tracing::warn!(error = %e, "inbox retention failed; trying again in a minute")
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(RETENTION_EVERY) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
    }
}

/// One round: deletes in batches until a batch comes back short.
async fn once(url: &str, older_than: Duration) -> Result<u64, String> {
    let client = super::connect(url).await.map_err(|e| e.to_string())?;
    let secs = older_than.as_secs_f64();
    let mut total = 0;
    for sql in [DELETE_FACTS, DELETE_CLAIMS] {
        total += delete_all(&client, sql, secs).await?;
    }
    Ok(total)
}

async fn delete_all(client: &Client, sql: &str, secs: f64) -> Result<u64, String> {
    let statement = client.prepare(sql).await.map_err(|e| e.to_string())?;
    let mut total = 0;
    loop {
        let n = client
            .execute(&statement, &[&secs, &RETENTION_BATCH])
            .await
            .map_err(|e| e.to_string())?;
        total += n;
        if n < u64::try_from(RETENTION_BATCH).unwrap_or(u64::MAX) {
            return Ok(total);
        }
    }
}
