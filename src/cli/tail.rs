//! `factlib tail`: stream facts from the slot, one JSON object per line.
//!
//! ```text
//!  ReplicationStream ──XLogData──► pgoutput ──Message(prefix)──► fact::decode ──► stdout (JSON)
//!                     ◄──confirm(end of each unit printed and flushed)──┘
//! ```
//!
//! **Invariants**
//! - The slot is confirmed only up to the end of the last *whole* unit
//!   (transaction, or lone non-transactional message) whose facts were all
//!   written to stdout and flushed; never with `--no-confirm`.
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
use crate::config::{CommonArgs, ConnectionConfig, TailArgs};
use crate::fact;
use crate::lsn::Lsn;
use crate::pgwire::pgoutput::PgOutput;
use crate::pgwire::replication::ReplicationMessage;
use crate::source::ReplicationStream;

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

/// Renders a fact message as a line.
pub fn render(lsn: Lsn, txn: Option<(u32, Lsn)>, content: Bytes) -> TailLine {
    let b64 = |b: &[u8]| base64::engine::general_purpose::STANDARD.encode(b);
    let body = match fact::decode(content.clone()) {
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
        Err(e) => TailBody::Undecodable {
            error: e.to_string(),
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
    let conn = ConnectionConfig::from_url(&common.database_url)?;
    let mut stop = spawn_signal_watch();
    let mut stream = ReplicationStream::connect(&conn, &args.source).await?;
    let id = stream.identify_system().await?;
    tracing::info!(
        system_id = %id.system_id, timeline = id.timeline, xlogpos = %id.xlogpos,
        backend_pid = stream.backend_pid(), "connected for replication"
    );
    stream
        .start_pgoutput(&common.slot, Lsn::INVALID, &common.publication)
        .await?;

    let prefix = common.prefix.as_bytes();
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::with_capacity(64 * 1024, stdout.lock());
    let io_err = |source| CliError::Io {
        context: "writing to stdout".into(),
        source,
    };
    let mut printed: u64 = 0;
    let mut txn: Option<(u32, Lsn)> = None;
    // Set by a signal, or when --limit is reached: finish the open
    // transaction (it was committed and is sent whole), then stop.
    let mut stopping = false;
    // The open transaction has a fact we did not print (limit reached).
    let mut cut_short = false;
    let limit = args.limit.unwrap_or(u64::MAX);
    let confirm = |stream: &mut ReplicationStream, lsn: Lsn| {
        if !args.no_confirm {
            stream.confirm(lsn);
        }
    };

    loop {
        if printed >= limit {
            stopping = true;
        }
        if stopping && txn.is_none() {
            break;
        }
        let msg = if stopping {
            stream.next().await?
        } else {
            match stream.next_or_stop(&mut stop).await? {
                Some(m) => m,
                None => {
                    stopping = true;
                    continue;
                }
            }
        };
        let x = match msg {
            ReplicationMessage::XLogData(x) => x,
            ReplicationMessage::Keepalive(_) => continue,
        };
        match PgOutput::decode(x.data).map_err(crate::source::SourceError::Decode)? {
            PgOutput::Begin(b) => txn = Some((b.xid, b.final_lsn)),
            PgOutput::Commit(c) => {
                txn = None;
                out.flush().map_err(io_err)?;
                confirm(&mut stream, c.end_lsn);
            }
            PgOutput::Message(m) => {
                if &m.prefix[..] == prefix {
                    if printed >= limit {
                        // Only reachable inside a transaction: this fact will
                        // not be printed, so the transaction is not confirmed.
                        cut_short = true;
                        break;
                    }
                    let line = render(m.lsn, if m.transactional { txn } else { None }, m.content);
                    serde_json::to_writer(&mut out, &line).map_err(|e| io_err(e.into()))?;
                    out.write_all(b"\n").map_err(io_err)?;
                    printed += 1;
                }
                if !m.transactional {
                    // A lone message is a whole unit. pgoutput reports the
                    // *end* of its WAL record, so confirming exactly that
                    // position skips it on restart and nothing after it.
                    out.flush().map_err(io_err)?;
                    confirm(&mut stream, m.lsn);
                }
            }
            _ => {}
        }
    }
    out.flush().map_err(io_err)?;
    if cut_short {
        if let Some((xid, _)) = txn {
            tracing::warn!(
                xid,
                "--limit ended inside a transaction; its facts printed so far will be printed again by the next tail"
            );
        }
    }
    let confirmed = stream.confirmed();
    stream.shutdown(Duration::from_secs(5)).await?;
    tracing::info!(printed, confirmed = %confirmed, "tail stopped");
    Ok(ExitCode::SUCCESS)
}
