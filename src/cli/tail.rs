//! `factlib tail`: stream facts from the slot, one JSON object per line.
//!
//! ```text
//!  ReplicationStream ──CopyRun──► progress::Stream ──Fact──► render ──► stdout (JSON)
//!                     ◄──confirm(watermark, once stdout is flushed)──┘ (ack each fact once written)
//! ```
//!
//! The unit structure (transactions, lone messages, keepalives) is
//! `progress::Stream`'s, as in the relay; this command only renders facts
//! and confirms what it has flushed.
//!
//! **Invariants**
//! - The slot is confirmed only up to the stream's watermark after stdout
//!   is flushed, so only whole units whose facts were all written; never
//!   with `--no-confirm`.
//! - On SIGINT/SIGTERM the transaction being printed is finished first
//!   (it has already been committed and sent whole), then the final position
//!   is confirmed and the connection closed.

use std::io::Write;
use std::process::ExitCode;
use std::time::Duration;

use base64::Engine as _;
use bytes::Bytes;
use serde::Serialize;

use super::{spawn_signal_watch, CliError};
use crate::config::{CommonArgs, TailArgs};
use crate::fact;
use crate::lsn::Lsn;
use crate::pgwire::backend::CopyRun;
use crate::progress::Stream;
use crate::source::{ConnectionConfig, ReplicationStream};

/// One printed line.
#[derive(Debug, Serialize)]
pub struct TailLine {
    /// The message's WAL position.
    pub lsn: String,
    /// The commit LSN of its transaction; null for a non-transactional message.
    pub commit_lsn: Option<String>,
    /// The transaction id; null for a non-transactional message.
    pub xid: Option<u32>,
    /// Envelope fields (absent when the envelope did not decode).
    #[serde(flatten)]
    pub body: TailBody,
}

/// The envelope part of a line.
#[derive(Debug, Serialize)]
#[serde(untagged)]
pub enum TailBody {
    /// A decoded fact.
    Fact {
        /// UUIDv7.
        id: String,
        /// Aggregate type.
        aggregate_type: String,
        /// Aggregate id.
        aggregate_id: String,
        /// Event type.
        event_type: String,
        /// The payload: UTF-8 text, or base64 when not valid UTF-8.
        payload: String,
        /// `utf8` or `base64`: how `payload` is written.
        payload_encoding: &'static str,
        /// Metadata entries.
        metadata: std::collections::BTreeMap<String, String>,
        /// Unix nanoseconds.
        created_at: i64,
    },
    /// A message under our prefix that is not a valid envelope.
    Undecodable {
        /// Why it did not decode.
        error: String,
        /// The raw message content, base64.
        raw_base64: String,
    },
}

/// Renders a fact as a line; a bad outbox row (`bad_row`: why it does not
/// map) is shown as undecodable, with the row as JSON.
pub fn render(
    lsn: Lsn,
    txn: Option<(u32, Lsn)>,
    content: Bytes,
    bad_row: Option<&str>,
) -> TailLine {
    let b64 = |b: &[u8]| base64::engine::general_purpose::STANDARD.encode(b);
    let decoded = match bad_row {
        Some(e) => Err(e.to_owned()),
        None => fact::decode(content.clone()).map_err(|e| e.to_string()),
    };
    let body = match decoded {
        Ok(f) => {
            let (payload, payload_encoding) = match std::str::from_utf8(&f.payload) {
                Ok(s) => (s.to_owned(), "utf8"),
                Err(_) => (b64(&f.payload), "base64"),
            };
            TailBody::Fact {
                id: f.id,
                aggregate_type: f.aggregate_type,
                aggregate_id: f.aggregate_id,
                event_type: f.event_type,
                payload,
                payload_encoding,
                metadata: f.metadata,
                created_at: f.created_at,
            }
        }
        Err(error) => TailBody::Undecodable {
            error,
            raw_base64: b64(&content),
        },
    };
    TailLine {
        lsn: lsn.to_string(),
        commit_lsn: txn.map(|(_, c)| c.to_string()),
        xid: txn.map(|(x, _)| x),
        body,
    }
}

/// Runs `factlib tail`.
pub async fn run(common: &CommonArgs, args: &TailArgs) -> Result<ExitCode, CliError> {
    let conn = ConnectionConfig::from_url(&common.database_url)
        .map_err(crate::config::ConfigError::from)?;
    let mut stop = spawn_signal_watch();
    let mut stream = ReplicationStream::connect(&conn, &args.source.settings()).await?;
    let id = stream.identify_system().await?;
    tracing::info!(
        system_id = %id.system_id, timeline = id.timeline, xlogpos = %id.xlogpos,
        backend_pid = stream.backend_pid(), "connected for replication"
    );
    stream
        .start_pgoutput(&common.slot, Lsn::INVALID, &common.publication)
        .await?;

    let mut units = Stream::new(&common.prefix, Lsn::INVALID).with_outbox(args.outbox.settings()?);
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::with_capacity(64 * 1024, stdout.lock());
    let io_err = |source| CliError::Io {
        context: "writing to stdout".into(),
        source,
    };
    let mut printed: u64 = 0;
    // Set by a signal, or when --limit is reached: finish the open
    // transaction (it was committed and is sent whole), then stop.
    let mut stopping = false;
    // A fact of the open transaction was not printed (limit reached).
    let mut cut_short = None;
    let limit = args.limit.unwrap_or(u64::MAX);
    let mut run = CopyRun::default();

    loop {
        if printed >= limit {
            stopping = true;
        }
        if stopping && !units.in_transaction() {
            break;
        }
        let Some(body) = run.next_body() else {
            let next = if stopping {
                stream.next_run_or(std::future::pending::<()>()).await?
            } else {
                stream
                    .next_run_or(async {
                        let _ = stop.wait_for(|v| *v).await;
                    })
                    .await?
            };
            match next {
                Some(r) => run = r,
                None => stopping = true,
            }
            continue;
        };
        if let Some(f) = units.handle(run.bytes(), body)? {
            if printed >= limit {
                // This fact is not printed, so its unit is not confirmed.
                cut_short = f.txn.map(|t| t.xid);
                break;
            }
            let line = render(
                f.lsn,
                f.txn.map(|t| (t.xid, t.commit_lsn)),
                f.content,
                f.bad_row.as_deref(),
            );
            serde_json::to_writer(&mut out, &line).map_err(|e| io_err(e.into()))?;
            out.write_all(b"\n").map_err(io_err)?;
            printed += 1;
            units
                .ack(f.token)
                .map_err(crate::progress::StreamError::from)?;
        }
        let mark = units.watermark();
        if !args.no_confirm && mark > stream.confirmed() {
            out.flush().map_err(io_err)?;
            stream.confirm(mark);
        }
    }
    out.flush().map_err(io_err)?;
    if let Some(xid) = cut_short {
        tracing::warn!(
            xid,
            "--limit ended inside a transaction; its facts printed so far will be printed again by the next tail"
        );
    }
    let confirmed = stream.confirmed();
    stream.shutdown(Duration::from_secs(5)).await?;
    tracing::info!(printed, confirmed = %confirmed, "tail stopped");
    Ok(ExitCode::SUCCESS)
}
