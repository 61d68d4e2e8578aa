//! One fact to one record on its ring: decode the envelope, check it, route
//! it, build the record, push it (or its dead letter).
//!
//! ```text
//!  progress::Fact ──fact::decode_view──► check_required ──Router::route──► fact_record ──► rings[ring]
//!        │ (does not decode, lacks a field, no legal topic, a bad outbox row) ──► dead_letter ──► rings[DLQ's ring]
//!        └ topic not known yet ──Topics::partitions (own thread)──► Router::learn
//! ```
//!
//! **Invariants**
//! - Every fact becomes exactly one record: itself, or its dead letter with
//!   the error in a header. None is dropped.
//! - While waiting (for ring space, or for a topic's metadata) standby
//!   status updates keep going out, so the walsender does not time us out;
//!   and nothing more is read from the socket, so memory stays bounded.
//! - A stop request ends a wait: the fact is then not pushed, and its unit
//!   is not confirmed (its token stays unacked).

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::watch;

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

/// What became of a fact.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Delivered {
    /// Its record (or dead letter) is on its ring.
    Pushed,
    /// A stop was requested while waiting; nothing was pushed.
    Stopped,
}

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
        w: &mut Waiting<'_>,
    ) -> Result<Delivered, RelayError> {
        let position = fact.position();
        let lsn = self.shape.headers.lsn(position, fact.xlog_end);
        let made = if let Some(error) = &fact.bad_row {
            self.dead(fact.content, error, position, opaque, w).await?
        } else {
            match decode_view_or_return(fact.content) {
                Ok(view) => self.record(view, position, lsn, opaque, w).await?,
                Err((e, raw)) => self.dead(raw, &e.to_string(), position, opaque, w).await?,
            }
        };
        let Some((ring, mut rec)) = made else {
            return Ok(Delivered::Stopped);
        };
        rec.txn_end = fact.unit_end;
        if !self.push(ring, rec, w).await? {
            return Ok(Delivered::Stopped);
        }
        telemetry::produced(1);
        Ok(Delivered::Pushed)
    }

    /// The record of a decoded fact (its LSN header carrying `lsn`), or its
    /// dead letter (carrying `position`); `None` if a stop came while
    /// waiting for a topic's metadata.
    async fn record(
        &mut self,
        view: FactView,
        position: Lsn,
        lsn: Lsn,
        opaque: usize,
        w: &mut Waiting<'_>,
    ) -> Result<Option<(usize, Record)>, RelayError> {
        if let Err(e) = view.check_required() {
            let raw = view.into_envelope();
            return self.dead(raw, &e.to_string(), position, opaque, w).await;
        }
        let routed = match self.router.route(&view) {
            Ok(Routed::Unknown(topic)) => {
                if !self.learn(&topic, w).await? {
                    return Ok(None);
                }
                self.router.route(&view)
            }
            other => other,
        };
        match routed {
            Ok(Routed::To(to)) => Ok(Some((
                to.ring,
                fact_record(view, self.shape, lsn, to.topic, to.partition, opaque),
            ))),
            Ok(Routed::Unknown(_)) => Err(RelayError::Internal("a learned topic is unknown")),
            Err(e) => {
                let raw = view.into_envelope();
                self.dead(raw, &e.to_string(), position, opaque, w).await
            }
        }
    }

    /// A dead-letter record for a fact that cannot be relayed as itself;
    /// `None` if a stop came while waiting for the DLQ's metadata.
    async fn dead(
        &mut self,
        raw: Bytes,
        error: &str,
        position: Lsn,
        opaque: usize,
        w: &mut Waiting<'_>,
    ) -> Result<Option<(usize, Record)>, RelayError> {
        let to = match self.router.dead_letter() {
            Routed::To(to) => to,
            Routed::Unknown(topic) => {
                if !self.learn(&topic, w).await? {
                    return Ok(None);
                }
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
        Ok(Some((
            ring,
            dead_letter(raw, error, position, topic, partition, opaque),
        )))
    }

    /// Looks `topic` up (off this thread) and teaches the router its
    /// partition count. False if a stop came first.
    async fn learn(&mut self, topic: &str, w: &mut Waiting<'_>) -> Result<bool, RelayError> {
        let Some(partitions) = w.until(self.topics.partitions(topic)).await? else {
            return Ok(false);
        };
        self.router.learn(topic, partitions?);
        Ok(true)
    }

    /// Pushes onto a ring, waiting while it is full. False if a stop came
    /// first.
    async fn push(
        &self,
        ring: usize,
        mut rec: Record,
        w: &mut Waiting<'_>,
    ) -> Result<bool, RelayError> {
        loop {
            match self.rings.try_push(ring, rec) {
                Ok(()) => return Ok(true),
                Err(back) => rec = back,
            }
            if self.rings.is_closed() {
                return Err(RelayError::Internal("rings closed while relaying"));
            }
            if w.until(self.rings.room(ring)).await?.is_none() {
                return Ok(false);
            }
        }
    }
}

/// What a wait inside [`Deliver::fact`] needs: the connection to keep
/// alive, and the stop request that ends it.
pub(super) struct Waiting<'a> {
    pub(super) conn: &'a mut ReplicationStream,
    pub(super) stop: &'a mut watch::Receiver<bool>,
}

impl Waiting<'_> {
    /// Awaits `fut`, sending status updates when due; `None` if a stop is
    /// requested first.
    async fn until<F: std::future::Future>(
        &mut self,
        fut: F,
    ) -> Result<Option<F::Output>, RelayError> {
        tokio::pin!(fut);
        loop {
            tokio::select! {
                out = &mut fut => return Ok(Some(out)),
                _ = tokio::time::sleep(KEEP_ALIVE_EVERY) => self.conn.keep_alive().await?,
                _ = self.stop.wait_for(|s| *s) => return Ok(None),
            }
        }
    }
}
