//! The ack ledger: delivery reports (or, exactly-once, commits) from the
//! sink, back to the stream's units.
//!
//! ```text
//!  progress::Stream ──token──► Acks::opaque ──(generation, token) packed──► Record.opaque
//!  at-least-once: delivery report / flusher failure ──Delivery──► channel ──► Acks::apply ──► Stream::ack
//!  exactly-once:  Delivery::Committed(last opaque) ──► Acks::apply ──► Stream::ack_through
//!                 Acks::settle ──Command::Reset──► txn flusher ──Delivery::Reset──► Acks::apply
//! ```
//!
//! Owns the packing of a token into rdkafka's `DeliveryOpaque`, the
//! connection generation, the count of records handed to the sink and not
//! yet acknowledged, the command channel to the transaction flusher, and
//! waiting for acks.
//!
//! **Invariants**
//! - An ack applies only to the connection generation that issued its
//!   token; acks for an older connection (whose stream was restarted) are
//!   counted but change nothing.
//! - [`Acks::drain`] waits for the records handed to the sink, not for
//!   every fact the stream handed out: a fact whose record never reached a
//!   ring (its session ended first) has no ack coming. Its unit stays
//!   unconfirmed, so it is streamed again.
//! - A permanent delivery failure is an error: nothing after the failed
//!   fact is confirmed. In exactly-once mode only a record refused for
//!   good is; any other failed record fails its transaction's commit.
//! - Exactly-once: per-record reports never ack anything; the stream is
//!   restarted only after the flusher answered a reset, so every commit of
//!   the old session was applied first.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam::channel::{Receiver, Sender, TryRecvError};
use tokio::sync::{watch, Notify};

use super::{Refused, RelayError};
use crate::progress::{Stream, Token};
use crate::sink::producer::refused_for_good;
use crate::sink::txn::Command;
use crate::sink::{refusal_advice, Delivery};
use crate::telemetry;

/// How [`Acks::drain`] ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Drained {
    /// Nothing is in flight.
    All,
    /// The limit passed first.
    TimedOut,
    /// A stop was requested while waiting without a limit.
    Stopped,
}

/// What carries progress.
pub(super) enum Progress {
    /// At-least-once: each record's delivery report acks its fact.
    PerRecord,
    /// Exactly-once: each committed Kafka transaction acks every unit up to
    /// its last one; per-record reports only matter when they refuse a
    /// record for good. The sender reaches the transaction flusher.
    PerCommit(Sender<Command>),
}

/// Delivery reports, applied to the stream of the current connection.
pub(super) struct Acks {
    rx: Receiver<Delivery>,
    wake: Arc<Notify>,
    progress: Progress,
    /// Exactly-once: the flusher answered the last reset.
    reset_answered: bool,
    generation: u32,
    /// Records of this generation handed to the sink and not yet acked.
    outstanding: usize,
    /// For the advice on a record that is too large.
    max_message_bytes: u64,
}

impl Acks {
    /// A ledger reading `rx`; the sink notifies `wake` after each report.
    pub(super) fn new(
        rx: Receiver<Delivery>,
        wake: Arc<Notify>,
        progress: Progress,
        max_message_bytes: u64,
    ) -> Self {
        Acks {
            rx,
            wake,
            progress,
            reset_answered: false,
            generation: 0,
            outstanding: 0,
            max_message_bytes,
        }
    }

    /// The opaque a record of the fact with `token` carries.
    pub(super) fn opaque(&self, token: Token) -> usize {
        Opaque {
            generation: self.generation,
            token,
        }
        .into_raw()
    }

    /// A record carrying [`Acks::opaque`] was handed to the sink.
    pub(super) fn handed(&mut self) {
        self.outstanding += 1;
    }

    /// Records handed to the sink and not yet acked.
    pub(super) fn outstanding(&self) -> usize {
        self.outstanding
    }

    /// A new connection: acks of the old one no longer count.
    pub(super) fn next_generation(&mut self) {
        self.generation = self.generation.wrapping_add(1);
        self.outstanding = 0;
    }

    /// Applies every report received so far.
    pub(super) fn apply(&mut self, stream: &mut Stream) -> Result<(), RelayError> {
        let per_record = matches!(self.progress, Progress::PerRecord);
        loop {
            match self.rx.try_recv() {
                Ok(Delivery::Acked { opaque, bytes }) => {
                    let o = Opaque::from_raw(opaque);
                    if per_record && o.generation == self.generation {
                        stream.ack(o.token)?;
                        self.outstanding = self.outstanding.saturating_sub(1);
                        telemetry::acked(1, bytes);
                    }
                }
                Ok(Delivery::Committed {
                    opaque,
                    records,
                    bytes,
                    ..
                }) => {
                    let o = Opaque::from_raw(opaque);
                    if o.generation == self.generation {
                        stream.ack_through(o.token)?;
                        self.outstanding = self.outstanding.saturating_sub(records);
                    }
                    telemetry::acked(u64::try_from(records).unwrap_or(0), bytes);
                }
                Ok(Delivery::Failed {
                    topic,
                    bytes,
                    error,
                    ..
                }) if per_record || refused_for_good(&error) => {
                    telemetry::produce_failed();
                    return Err(RelayError::Delivery(Box::new(Refused {
                        advice: refusal_advice(&error, self.max_message_bytes),
                        topic,
                        bytes,
                        error,
                    })));
                }
                // In a transaction the commit decides: a record that failed
                // on the way makes it fail, and it is aborted.
                Ok(Delivery::Failed { .. }) => telemetry::produce_failed(),
                Ok(Delivery::Reset) => self.reset_answered = true,
                Ok(Delivery::Broken(e)) => {
                    telemetry::produce_failed();
                    return Err(RelayError::Sink(e));
                }
                Err(TryRecvError::Empty | TryRecvError::Disconnected) => return Ok(()),
            }
        }
    }

    /// Exactly-once, on a stop: commit at the next unit end without waiting
    /// for the transaction to be due.
    pub(super) fn flush(&self) {
        if let Progress::PerCommit(commands) = &self.progress {
            let _ = commands.send(Command::Flush);
        }
    }

    /// After a session ended, before the stream restarts at its watermark:
    /// at-least-once waits for every record handed to Kafka; exactly-once
    /// has the flusher drop what it holds of the old session and commit or
    /// abort its transaction, then waits for that answer. Both stop early
    /// on a stop request or once `limit` passes.
    pub(super) async fn settle(
        &mut self,
        stream: &mut Stream,
        stop: &mut watch::Receiver<bool>,
        limit: Option<Duration>,
    ) -> Result<Drained, RelayError> {
        let Progress::PerCommit(commands) = &self.progress else {
            return self.drain(stream, stop, limit).await;
        };
        self.reset_answered = false;
        commands
            .send(Command::Reset)
            .map_err(|_| RelayError::Internal("the transaction flusher is gone"))?;
        let settled = self
            .wait_until(stream, stop, limit, |a| a.reset_answered)
            .await?;
        if settled == Drained::All {
            self.outstanding = 0;
        }
        Ok(settled)
    }

    /// Resolves when a report may have arrived.
    pub(super) async fn arrived(&self) {
        self.wake.notified().await;
    }

    /// Applies reports until every record handed to the sink is acked,
    /// `limit` passes, or (with no limit) a stop is requested.
    pub(super) async fn drain(
        &mut self,
        stream: &mut Stream,
        stop: &mut watch::Receiver<bool>,
        limit: Option<Duration>,
    ) -> Result<Drained, RelayError> {
        self.wait_until(stream, stop, limit, |a| a.outstanding == 0)
            .await
    }

    /// Applies reports until `done`, `limit` passes, or (with no limit) a
    /// stop is requested.
    async fn wait_until(
        &mut self,
        stream: &mut Stream,
        stop: &mut watch::Receiver<bool>,
        limit: Option<Duration>,
        done: impl Fn(&Self) -> bool,
    ) -> Result<Drained, RelayError> {
        let deadline = limit.map(|l| Instant::now() + l);
        loop {
            self.apply(stream)?;
            if done(self) {
                return Ok(Drained::All);
            }
            if deadline.is_some_and(|d| Instant::now() >= d) {
                return Ok(Drained::TimedOut);
            }
            tokio::select! {
                _ = self.wake.notified() => {}
                _ = tokio::time::sleep(Duration::from_millis(200)) => {}
                _ = stop.changed(), if limit.is_none() => {
                    if *stop.borrow() {
                        return Ok(Drained::Stopped);
                    }
                }
            }
        }
    }
}

/// The ack token in a record's delivery opaque: connection generation plus
/// the stream's token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Opaque {
    generation: u32,
    token: Token,
}

impl Opaque {
    const TOKEN_BITS: u32 = 40;

    fn into_raw(self) -> usize {
        let t = self.token.into_raw() & ((1 << Self::TOKEN_BITS) - 1);
        usize::try_from((u64::from(self.generation) << Self::TOKEN_BITS) | t).unwrap_or(usize::MAX)
    }

    fn from_raw(raw: usize) -> Self {
        let raw = u64::try_from(raw).unwrap_or(u64::MAX);
        Opaque {
            generation: u32::try_from(raw >> Self::TOKEN_BITS).unwrap_or(u32::MAX),
            token: Token::from_raw(raw & ((1 << Self::TOKEN_BITS) - 1)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lsn::Lsn;
    use bytes::Bytes;

    #[test]
    fn opaque_round_trips() {
        for (g, t) in [(0u32, 0u64), (1, 5), (7, (1 << 40) - 1), (0xFF_FFFF, 123)] {
            let o = Opaque {
                generation: g,
                token: Token::from_raw(t),
            };
            assert_eq!(Opaque::from_raw(o.into_raw()), o);
        }
    }

    /// A stream with one lone fact at 0x10 in flight, and its token.
    fn one_fact() -> (Stream, Token) {
        let mut body = vec![b'w'];
        body.extend_from_slice(&[0; 24]);
        body.push(b'M');
        body.push(0);
        body.extend_from_slice(&0x10u64.to_be_bytes());
        body.extend_from_slice(b"p\0");
        body.extend_from_slice(&1u32.to_be_bytes());
        body.push(b'x');
        let len = body.len();
        let mut s = Stream::new("p", Lsn(0));
        let f = s.handle(&Bytes::from(body), 0..len).unwrap().unwrap();
        (s, f.token)
    }

    #[test]
    fn acks_of_an_older_generation_change_nothing() {
        let (tx, rx) = crossbeam::channel::unbounded();
        let mut acks = Acks::new(rx, Arc::new(Notify::new()), Progress::PerRecord, 1);
        let (mut stream, token) = one_fact();
        let old = acks.opaque(token);
        acks.handed();
        acks.next_generation();
        tx.send(Delivery::Acked {
            opaque: old,
            bytes: 1,
        })
        .unwrap();
        acks.apply(&mut stream).unwrap();
        assert_eq!(stream.in_flight(), 1);
        acks.handed();
        tx.send(Delivery::Acked {
            opaque: acks.opaque(token),
            bytes: 1,
        })
        .unwrap();
        acks.apply(&mut stream).unwrap();
        assert_eq!(stream.in_flight(), 0);
        assert_eq!(stream.watermark(), Lsn(0x10));
    }

    /// The hang: a session that ended between handing a fact out and
    /// pushing its record left the drain waiting for an ack that could
    /// never come.
    #[test]
    fn drain_waits_only_for_records_handed_to_the_sink() {
        let (_tx, rx) = crossbeam::channel::unbounded();
        let mut acks = Acks::new(rx, Arc::new(Notify::new()), Progress::PerRecord, 1);
        let (mut stream, _never_pushed) = one_fact();
        let (_, mut stop) = watch::channel(false);
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let drained = rt.block_on(acks.drain(&mut stream, &mut stop, Some(Duration::ZERO)));
        assert_eq!(drained.unwrap(), Drained::All);
        assert_eq!(stream.watermark(), Lsn(0), "its unit stays unconfirmed");
        acks.handed();
        let drained = rt.block_on(acks.drain(&mut stream, &mut stop, Some(Duration::ZERO)));
        assert_eq!(drained.unwrap(), Drained::TimedOut);
    }

    #[test]
    fn a_failed_delivery_is_an_error_with_advice() {
        let (tx, rx) = crossbeam::channel::unbounded();
        let mut acks = Acks::new(rx, Arc::new(Notify::new()), Progress::PerRecord, 1_000_000);
        let (mut stream, token) = one_fact();
        tx.send(Delivery::Failed {
            opaque: acks.opaque(token),
            topic: "t".into(),
            bytes: 3 << 20,
            error: rdkafka::error::KafkaError::MessageProduction(
                rdkafka::types::RDKafkaErrorCode::MessageSizeTooLarge,
            ),
        })
        .unwrap();
        let e = acks.apply(&mut stream).unwrap_err().to_string();
        for part in [
            "3145728 bytes",
            "--max-message-bytes",
            "message.max.bytes, now 1000000",
            "topic's max.message.bytes",
            "broker's message.max.bytes",
        ] {
            assert!(e.contains(part), "{part:?} missing from: {e}");
        }
        assert_eq!(stream.watermark(), Lsn(0), "nothing confirmed past it");
    }
}
