//! One fact to one record on its ring: decode the envelope, check it, route
//! it, build the record, push it (or its dead letter).
//!
//! ```text
//!  progress::Fact ──fact::decode_view──► check_required ──Router::route──► fact_record ──► rings[ring]
//!        │ (does not decode, lacks a field, no legal topic) ──► dead_letter ──► rings[DLQ's ring]
//!        └ topic not known yet ──Topics::partitions (blocking pool)──► Router::learn
//! ```
//!
//! **Invariants**
//! - Every fact becomes exactly one record: itself, or its dead letter with
//!   the error in a header. None is dropped.
//! - While waiting (for ring space, or for a topic's metadata) standby
//!   status updates keep going out, so the walsender does not time us out;
//!   and nothing more is read from the socket, so memory stays bounded.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use super::RelayError;
use crate::fact::{decode_view_or_return, FactView};
use crate::lsn::Lsn;
use crate::progress;
use crate::route::{Destination, Rings, Routed, Router};
use crate::sink::record::{dead_letter, fact_record};
use crate::sink::topics::Topics;
use crate::sink::{Record, RecordShape};
use crate::source::ReplicationStream;
use crate::telemetry;

/// How often a wait sends a status update (when one is due).
const KEEP_ALIVE_EVERY: Duration = Duration::from_secs(1);

/// Turns facts into records on their rings.
pub(super) struct Deliver {
    router: Router,
    topics: Topics,
    rings: Arc<Rings<Record>>,
    shape: RecordShape,
}

impl Deliver {
    pub(super) fn new(
        router: Router,
        topics: Topics,
        rings: Arc<Rings<Record>>,
        shape: RecordShape,
    ) -> Self {
        Deliver {
            router,
            topics,
            rings,
            shape,
        }
    }

    /// Pushes `fact`'s record (carrying `opaque`) onto its ring.
    pub(super) async fn fact(
        &mut self,
        fact: progress::Fact,
        opaque: usize,
        conn: &mut ReplicationStream,
    ) -> Result<(), RelayError> {
        let position = fact.position();
        let (ring, mut rec) = match decode_view_or_return(fact.content) {
            Ok(view) => self.record(view, position, opaque, conn).await?,
            Err((e, raw)) => {
                self.dead(raw, &e.to_string(), position, opaque, conn)
                    .await?
            }
        };
        rec.txn_end = fact.unit_end;
        self.push(ring, rec, conn).await?;
        telemetry::produced(1);
        Ok(())
    }

    /// The record of a decoded fact, or its dead letter.
    async fn record(
        &mut self,
        view: FactView,
        position: Lsn,
        opaque: usize,
        conn: &mut ReplicationStream,
    ) -> Result<(usize, Record), RelayError> {
        if let Err(e) = view.check_required() {
            let raw = view.into_envelope();
            return self.dead(raw, &e.to_string(), position, opaque, conn).await;
        }
        let routed = match self.router.route(&view) {
            Ok(Routed::Unknown(topic)) => {
                self.learn(&topic, conn).await?;
                self.router.route(&view)
            }
            other => other,
        };
        match routed {
            Ok(Routed::To(to)) => Ok((
                to.ring,
                fact_record(view, self.shape, position, to.topic, to.partition, opaque),
            )),
            Ok(Routed::Unknown(_)) => Err(RelayError::Internal("a learned topic is unknown")),
            Err(e) => {
                let raw = view.into_envelope();
                self.dead(raw, &e.to_string(), position, opaque, conn).await
            }
        }
    }

    /// A dead-letter record for a fact that cannot be relayed as itself.
    async fn dead(
        &mut self,
        raw: Bytes,
        error: &str,
        position: Lsn,
        opaque: usize,
        conn: &mut ReplicationStream,
    ) -> Result<(usize, Record), RelayError> {
        let to = match self.router.dead_letter() {
            Routed::To(to) => to,
            Routed::Unknown(topic) => {
                self.learn(&topic, conn).await?;
                match self.router.dead_letter() {
                    Routed::To(to) => to,
                    Routed::Unknown(_) => {
                        return Err(RelayError::Internal("the learned DLQ topic is unknown"))
                    }
                }
            }
        };
        let Destination {
            topic,
            partition,
            ring,
        } = to;
        telemetry::DeadLettered {
            topic: &topic,
            lsn: position,
            error,
        }
        .emit();
        Ok((
            ring,
            dead_letter(raw, error, position, topic, partition, opaque),
        ))
    }

    /// Looks `topic` up (off this thread) and teaches the router its
    /// partition count.
    async fn learn(&mut self, topic: &str, conn: &mut ReplicationStream) -> Result<(), RelayError> {
        let lookup = self.topics.partitions(topic);
        tokio::pin!(lookup);
        let partitions = loop {
            tokio::select! {
                r = &mut lookup => break r?,
                _ = tokio::time::sleep(KEEP_ALIVE_EVERY) => conn.keep_alive().await?,
            }
        };
        self.router.learn(topic, partitions);
        Ok(())
    }

    /// Pushes onto a ring, waiting while it is full.
    async fn push(
        &self,
        ring: usize,
        mut rec: Record,
        conn: &mut ReplicationStream,
    ) -> Result<(), RelayError> {
        loop {
            match self.rings.try_push(ring, rec) {
                Ok(()) => return Ok(()),
                Err(back) => rec = back,
            }
            if self.rings.is_closed() {
                return Err(RelayError::Internal("rings closed while relaying"));
            }
            tokio::select! {
                _ = self.rings.room(ring) => {}
                _ = tokio::time::sleep(KEEP_ALIVE_EVERY) => conn.keep_alive().await?,
            }
        }
    }
}
