//! One replication connection's worth of relaying: each pgoutput message is
//! handed to the stage that owns it.
//!
//! ```text
//!  CopyRun body ──ReplicationRef, PgOutputRef (in place)──► Begin/Commit ──► progress (units)
//!                    └──► Message(prefix) ──fact::decode_view_or_return──► route (topic, partition, ring)
//!                                                  └─► sink::record ──► rings ──► flushers
//!                                   (undecodable or unroutable) ──► dead-letter record
//!  Keepalive ──► progress.keepalive (only when nothing is in flight)
//! ```
//!
//! **Invariants**
//! - Every fact under our prefix gets an ack token before it is pushed, so
//!   its unit cannot be confirmed until Kafka has it (or its dead letter).
//! - Pushing waits while the ring is full, sending standby status updates
//!   meanwhile so the walsender does not time us out.

use std::ops::Range;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use super::{Opaque, RelayError, Shared};
use crate::fact::{self, FactView, TextField};
use crate::lsn::Lsn;
use crate::pgwire::backend::CopyRun;
use crate::pgwire::pgoutput::{MessageRef, PgOutput, PgOutputRef};
use crate::pgwire::replication::ReplicationRef;
use crate::progress::Tracker;
use crate::route::murmur2::partition_for_key;
use crate::sink::record::{dead_letter, fact_record};
use crate::sink::topics::TopicInfo;
use crate::sink::Record;
use crate::source::{ReplicationStream, SourceError};
use crate::telemetry;

/// The open transaction, if any.
#[derive(Debug, Clone, Copy)]
pub(super) struct Txn {
    /// Its commit LSN (Begin's final LSN), for the `factlib-lsn` header.
    pub commit_lsn: Lsn,
}

/// Handles one message of a run from the stream: the body at `body` in
/// `run`. Begin, Commit and Message are decoded in place; only a fact's
/// envelope becomes a `Bytes` handle.
pub(super) async fn handle(
    sh: &mut Shared,
    stream: &mut ReplicationStream,
    tracker: &mut Tracker,
    txn: &mut Option<Txn>,
    run: &CopyRun,
    body: Range<usize>,
) -> Result<(), RelayError> {
    let bytes = run.bytes();
    let body = bytes
        .get(body)
        .ok_or(RelayError::Internal("a run's body lies outside the run"))?;
    let x = match ReplicationRef::parse(body).map_err(SourceError::Decode)? {
        ReplicationRef::Keepalive(k) => {
            tracker.keepalive(k.wal_end);
            return Ok(());
        }
        ReplicationRef::XLogData(x) => x,
    };
    match PgOutputRef::decode(x.data).map_err(SourceError::Decode)? {
        PgOutputRef::Begin(b) => {
            tracker.begin()?;
            *txn = Some(Txn {
                commit_lsn: b.final_lsn,
            });
        }
        PgOutputRef::Commit(c) => {
            tracker.commit(c.end_lsn)?;
            *txn = None;
            // The transaction's last record closes its batch.
            if let Some((ring, mut rec)) = sh.held.take() {
                rec.txn_end = Some(c.end_lsn);
                push(sh, stream, ring, rec).await?;
            }
        }
        PgOutputRef::Message(m) => message(sh, stream, tracker, *txn, m, bytes).await?,
        // Nothing else matters to the relay, but it must still decode.
        PgOutputRef::Other => {
            PgOutput::decode(bytes.slice_ref(x.data)).map_err(SourceError::Decode)?;
        }
    }
    Ok(())
}

/// A logical message; `run` holds its bytes.
async fn message(
    sh: &mut Shared,
    stream: &mut ReplicationStream,
    tracker: &mut Tracker,
    txn: Option<Txn>,
    m: MessageRef<'_>,
    run: &Bytes,
) -> Result<(), RelayError> {
    if m.prefix != sh.prefix.as_bytes() {
        if !m.transactional {
            tracker.lone(m.lsn, false);
        }
        return Ok(());
    }
    let token = match (m.transactional, txn) {
        (true, Some(_)) => tracker.fact()?,
        (false, _) => tracker
            .lone(m.lsn, true)
            .ok_or(RelayError::Internal("a lone fact must get an ack token"))?,
        (true, None) => {
            return Err(RelayError::Internal(
                "transactional message outside a transaction",
            ))
        }
    };
    // Transactional facts carry their commit LSN, lone ones their own.
    let lsn = match txn {
        Some(t) if m.transactional => t.commit_lsn,
        _ => m.lsn,
    };
    let opaque = Opaque {
        generation: sh.generation,
        token,
    }
    .into_raw();
    // The envelope's one handle moves into the view; it comes back for a
    // dead letter.
    let rec = match fact::decode_view_or_return(run.slice_ref(m.content)) {
        Ok(f) => match route(sh, &f).await? {
            Ok(info) => {
                let partition = partition_for_key(f.utf8(TextField::AggregateId), info.partitions);
                let ring = ring_of(info.ring_base, partition, sh.rings.ring_count());
                let partition = i32::try_from(partition).unwrap_or(0);
                (
                    ring,
                    fact_record(f, sh.shape, lsn, info.name, partition, opaque),
                )
            }
            Err(e) => dead(sh, f.into_envelope(), &e, lsn, opaque).await?,
        },
        Err((e, raw)) => dead(sh, raw, &e.to_string(), lsn, opaque).await?,
    };
    let (ring, mut rec) = rec;
    if m.transactional {
        // Hold the newest record back until the next one or the Commit, so
        // the transaction's last record can be marked as its batch's end.
        if let Some((r, prev)) = sh.held.replace((ring, rec)) {
            push(sh, stream, r, prev).await?;
        }
    } else {
        rec.txn_end = Some(m.lsn);
        push(sh, stream, ring, rec).await?;
    }
    telemetry::produced(1);
    Ok(())
}

/// The previous fact's route, reused while facts keep the same types (the
/// common case: a transaction's facts are often about one aggregate type).
pub(super) struct LastRoute {
    aggregate_type: String,
    event_type: String,
    info: TopicInfo,
}

/// The destination topic of a fact with these types, or why it has none
/// (a definite error for the fact: it goes to the DLQ). Renders the
/// template and looks the topic up only when the types differ from the
/// previous fact's.
async fn route(sh: &mut Shared, f: &FactView) -> Result<Result<TopicInfo, String>, RelayError> {
    if let Some(last) = &sh.last_route {
        if last.aggregate_type.as_bytes() == f.utf8(TextField::AggregateType)
            && last.event_type.as_bytes() == f.utf8(TextField::EventType)
        {
            return Ok(Ok(last.info.clone()));
        }
    }
    let (aggregate_type, event_type) = (f.aggregate_type(), f.event_type());
    let topic = match sh.template.render(&sh.prefix, aggregate_type, event_type) {
        Ok(topic) => topic,
        Err(e) => return Ok(Err(e.to_string())),
    };
    let info = sh.topics.get(&topic).await?.clone();
    sh.last_route = Some(LastRoute {
        aggregate_type: aggregate_type.to_owned(),
        event_type: event_type.to_owned(),
        info: info.clone(),
    });
    Ok(Ok(info))
}

fn ring_of(base: usize, partition: u32, rings: usize) -> usize {
    base.wrapping_add(usize::try_from(partition).unwrap_or(0)) % rings.max(1)
}

/// A dead-letter record for a fact that cannot be relayed as itself.
async fn dead(
    sh: &mut Shared,
    raw: Bytes,
    error: &str,
    lsn: Lsn,
    opaque: usize,
) -> Result<(usize, Record), RelayError> {
    let topic = crate::route::dlq_topic(&sh.prefix);
    let info = sh.topics.get(&topic).await?;
    let ring = ring_of(info.ring_base, 0, sh.rings.ring_count());
    telemetry::DeadLettered {
        topic: &topic,
        lsn,
        error,
    }
    .emit();
    Ok((
        ring,
        dead_letter(raw, error, lsn, Arc::clone(&info.name), 0, opaque),
    ))
}

/// After a lost connection: the held record of the cut transaction still
/// owes an ack, so it is pushed (without a batch end) rather than dropped.
pub(super) async fn push_held(sh: &mut Shared) {
    if let Some((ring, mut rec)) = sh.held.take() {
        while let Err(back) = sh.rings.try_push(ring, rec) {
            rec = back;
            if sh.rings.is_closed() {
                return;
            }
            sh.rings.room(ring).await;
        }
    }
}

/// Pushes onto a ring, waiting while it is full and keeping the replication
/// connection alive meanwhile.
async fn push(
    sh: &Shared,
    stream: &mut ReplicationStream,
    ring: usize,
    mut rec: Record,
) -> Result<(), RelayError> {
    loop {
        match sh.rings.try_push(ring, rec) {
            Ok(()) => return Ok(()),
            Err(back) => rec = back,
        }
        if sh.rings.is_closed() {
            return Err(RelayError::Internal("rings closed while relaying"));
        }
        tokio::select! {
            _ = sh.rings.room(ring) => {}
            _ = tokio::time::sleep(Duration::from_secs(1)) => stream.keep_alive().await?,
        }
    }
}
