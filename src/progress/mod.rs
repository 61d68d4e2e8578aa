//! Progress: the stream's units, and in-flight units → the lowest
//! fully-acknowledged LSN.
//!
//! Owns the answer to "how far may the slot be confirmed?". [`Stream`]
//! turns CopyData bodies into facts and unit ends and feeds the
//! [`Tracker`]; `relay` and `tail` both drive a [`Stream`] and send its
//! watermark as the `flushed` position of their standby status updates.
//! This module is pure logic: no I/O, no clocks, no threads, no metrics.
//! One owner calls it; delivery acks reach that owner over a channel.
//!
//! A *unit* is one thing that arrives whole in the stream's decode order: a
//! transaction (`Begin` … `Commit`, confirmed at `Commit.end_lsn`), or a lone
//! non-transactional message (confirmed at its reported LSN, which is already
//! the end of its WAL record). Units are numbered in arrival order; a
//! [`Token`] names a unit, and every fact of that unit carries it to Kafka
//! and back.
//!
//! ```text
//!  stream order ──►  seq 7        seq 8         seq 9        seq 10
//!                  ┌──────────┐ ┌───────────┐ ┌──────────┐ ┌──────────┐
//!                  │ tx       │ │ lone fact │ │ tx       │ │ tx       │
//!                  │ end 0/A0 │ │ end 0/B0  │ │ end 0/C0 │ │ (open)   │
//!                  │ pending 0│ │ pending 1 │ │ pending 0│ │ pending 2│
//!                  └──────────┘ └───────────┘ └──────────┘ └──────────┘
//!                   popped by     blocks 9 and 10 until its ack arrives,
//!                   watermark()   even though 9 is fully acked
//!
//!  watermark() = 0/A0   (the end of the contiguous fully-acked prefix)
//!  ack(seq 8)  ──►  watermark() = 0/C0; seq 10 stays until it commits and
//!                   both of its facts are acked
//! ```
//!
//! A unit with no facts (an empty-of-facts transaction, a lone message of
//! another prefix) is acked as soon as it is sealed. To keep memory bounded
//! by the facts in flight rather than by the stream's length, such a unit is
//! folded into the sealed unit before it when there is one: confirming the
//! later end once the earlier unit is acked is exactly what popping both
//! would do.
//!
//! **Invariants**
//! 1. The watermark is the end of the last unit of the contiguous
//!    fully-acked, sealed prefix (or the start position, or a keepalive's
//!    `wal_end`); it is never at or beyond the end of a unit that still has
//!    an unacknowledged fact.
//! 2. The watermark never moves backwards: inputs below it are clamped, and
//!    a `debug_assert!` guards the output.
//! 3. An open (unsealed) unit is never popped, whatever its acks, so
//!    nothing from its `Begin` on is confirmed before its `Commit`. It is
//!    always the last unit: a lone message that arrives while it is open
//!    joins it (the message's record precedes the commit record).
//! 4. A keepalive advances the watermark only when no fact is in flight and
//!    no unit is open.

mod stream;

pub use stream::{Fact, Stream, StreamError, Txn};

use std::collections::VecDeque;
use std::fmt;

use crate::Lsn;

/// Misuse of the [`Tracker`] protocol.
///
/// Always *definite*: each one means the caller's model of the stream is
/// wrong (a bug, or a protocol violation by the server), so retrying is
/// pointless. The relay should stop and reconnect, starting a new
/// [`Tracker`] from the slot's confirmed position.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ProgressError {
    /// `Begin` arrived while a transaction was already open.
    #[error("Begin while a transaction is already open: the stream lost a Commit")]
    AlreadyOpen,
    /// A transactional fact or a `Commit` arrived with no open transaction.
    #[error("no transaction is open: a fact or Commit arrived without its Begin")]
    NotOpen,
    /// An ack named a unit that was never issued, is already confirmed, or
    /// whose facts are all acked already (an ack delivered twice).
    #[error("ack for {0}, which is unknown or already fully acknowledged")]
    UnknownToken(Token),
}

impl ProgressError {
    /// Always false: see the type's documentation.
    pub fn is_transient(&self) -> bool {
        false
    }
}

/// The ack token of one unit, carried with each of its facts to Kafka (in
/// rdkafka's `DeliveryOpaque`) and handed back to [`Tracker::ack`] when the
/// delivery succeeds.
///
/// Every fact of a unit carries the same token; the tracker counts them. A
/// token means something only to the [`Tracker`] that issued it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Token {
    /// The unit's sequence number in stream order.
    seq: u64,
}

impl Token {
    /// The token as a plain integer, to carry through an opaque slot (e.g.
    /// rdkafka's `DeliveryOpaque` as a `usize`) without allocating.
    pub fn into_raw(self) -> u64 {
        self.seq
    }

    /// Rebuilds a token from [`Token::into_raw`]. Only for values that came
    /// from `into_raw` on a token of the same tracker.
    pub fn from_raw(raw: u64) -> Self {
        Token { seq: raw }
    }
}

impl fmt::Display for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "unit #{}", self.seq)
    }
}

/// One transaction or lone message, from arrival until it is popped.
#[derive(Debug, Clone, Copy)]
struct Unit {
    /// Where to confirm once this unit and all before it are acked.
    /// Meaningless until `sealed`.
    end: Lsn,
    /// Facts issued but not yet acked.
    pending: u64,
    /// The unit's end is known (its `Commit` arrived, or it is a lone
    /// message).
    sealed: bool,
    /// A token for this unit was handed out; its sequence number must then
    /// never be reused, so the unit is never folded away.
    issued: bool,
}

impl Unit {
    fn done(&self) -> bool {
        self.sealed && self.pending == 0
    }
}

/// Turns the stream's units and Kafka's acks into the position to confirm.
///
/// Feed it in stream order: [`begin`](Tracker::begin),
/// [`fact`](Tracker::fact)…, [`commit`](Tracker::commit) for each
/// transaction, [`lone`](Tracker::lone) for each non-transactional message,
/// [`keepalive`](Tracker::keepalive) for each primary keepalive. Feed it
/// [`ack`](Tracker::ack) for each delivered fact, in any order. Read
/// [`watermark`](Tracker::watermark) when building a status update.
#[derive(Debug, Clone)]
pub struct Tracker {
    /// Units not yet popped, in stream order; `units[i]` has sequence
    /// number `front_seq + i`.
    units: VecDeque<Unit>,
    /// Sequence number of `units[0]` (or of the next unit, when empty).
    front_seq: u64,
    /// Sequence number the next unit gets: `front_seq + units.len()`.
    next_seq: u64,
    /// Sequence number of the open transaction, if any.
    open: Option<u64>,
    /// Facts issued and not yet acked, over all units.
    in_flight: usize,
    /// The highest position confirmed so far.
    watermark: Lsn,
}

impl Tracker {
    /// A tracker with nothing in flight, starting at `start`: the slot's
    /// confirmed position, or `0/0`. The watermark never goes below it.
    pub fn new(start: Lsn) -> Self {
        Tracker {
            units: VecDeque::new(),
            front_seq: 0,
            next_seq: 0,
            open: None,
            in_flight: 0,
            watermark: start,
        }
    }

    /// A `Begin` arrived: opens a transaction unit.
    ///
    /// Fails with [`ProgressError::AlreadyOpen`] if one is already open (the
    /// tracker is left unchanged).
    pub fn begin(&mut self) -> Result<(), ProgressError> {
        if self.open.is_some() {
            return Err(ProgressError::AlreadyOpen);
        }
        let seq = self.push(Unit {
            end: Lsn::INVALID,
            pending: 0,
            sealed: false,
            issued: false,
        });
        self.open = Some(seq);
        Ok(())
    }

    /// A fact inside the open transaction: counts it as in flight and
    /// returns the token to send with it.
    ///
    /// Fails with [`ProgressError::NotOpen`] outside a transaction.
    pub fn fact(&mut self) -> Result<Token, ProgressError> {
        let seq = self.open.ok_or(ProgressError::NotOpen)?;
        let unit = self.unit_mut(seq).ok_or(ProgressError::NotOpen)?;
        unit.pending += 1;
        unit.issued = true;
        self.in_flight += 1;
        Ok(Token { seq })
    }

    /// A `Commit` arrived: seals the open transaction at `end_lsn`
    /// (`Commit.end_lsn`). A transaction with no facts, or whose facts are
    /// all acked, is done at once.
    ///
    /// Fails with [`ProgressError::NotOpen`] outside a transaction.
    pub fn commit(&mut self, end_lsn: Lsn) -> Result<(), ProgressError> {
        let seq = self.open.ok_or(ProgressError::NotOpen)?;
        let unit = self.unit_mut(seq).ok_or(ProgressError::NotOpen)?;
        unit.end = end_lsn;
        unit.sealed = true;
        self.open = None;
        self.fold_back();
        Ok(())
    }

    /// A non-transactional message at `lsn` (the end of its WAL record, as
    /// pgoutput reports it): a sealed unit of its own.
    ///
    /// Returns the token to send with it if `is_fact`; otherwise (another
    /// prefix, nothing to deliver) returns `None` and the unit is done at
    /// once.
    ///
    /// Arriving while a transaction is open (not seen with pgoutput protocol
    /// v1), the message joins that transaction instead: its record precedes
    /// the transaction's commit record, so confirming the commit's end would
    /// skip it on restart; it must be acked before the transaction is done.
    pub fn lone(&mut self, lsn: Lsn, is_fact: bool) -> Option<Token> {
        if self.open.is_some() {
            return if is_fact { self.fact().ok() } else { None };
        }
        let seq = self.push(Unit {
            end: lsn,
            pending: u64::from(is_fact),
            sealed: true,
            issued: is_fact,
        });
        if is_fact {
            self.in_flight += 1;
            Some(Token { seq })
        } else {
            self.fold_back();
            None
        }
    }

    /// Kafka acknowledged one fact carrying `token`. Acks may arrive in any
    /// order across units.
    ///
    /// Fails with [`ProgressError::UnknownToken`] for a token this tracker
    /// never issued, whose unit is already confirmed, or whose unit has no
    /// unacked fact left (a duplicate ack); the tracker is left unchanged.
    pub fn ack(&mut self, token: Token) -> Result<(), ProgressError> {
        let unit = self
            .unit_mut(token.seq)
            .filter(|u| u.pending > 0)
            .ok_or(ProgressError::UnknownToken(token))?;
        unit.pending -= 1;
        self.in_flight -= 1;
        Ok(())
    }

    /// Every fact of the units up to and including `token`'s was delivered
    /// at once (a Kafka transaction holding them committed). Units after it
    /// are untouched.
    ///
    /// Fails with [`ProgressError::UnknownToken`] if `token`'s unit is not
    /// in the tracker or not yet sealed (a commit cannot cover part of a
    /// unit); the tracker is left unchanged.
    pub fn ack_through(&mut self, token: Token) -> Result<(), ProgressError> {
        if !self.unit_mut(token.seq).is_some_and(|u| u.sealed) {
            return Err(ProgressError::UnknownToken(token));
        }
        // In range: `unit_mut` found it.
        let through = usize::try_from(token.seq - self.front_seq).unwrap_or(usize::MAX);
        for unit in self.units.iter_mut().take(through + 1) {
            let pending = usize::try_from(unit.pending).unwrap_or(usize::MAX);
            self.in_flight = self.in_flight.saturating_sub(pending);
            unit.pending = 0;
        }
        Ok(())
    }

    /// A primary keepalive reporting `wal_end`. When no fact is in flight
    /// and no transaction is open, every unit seen is done and the server
    /// will still send any transaction that commits later, so the watermark
    /// may advance to `wal_end`. Otherwise the keepalive is ignored.
    pub fn keepalive(&mut self, wal_end: Lsn) {
        if self.in_flight != 0 || self.open.is_some() {
            return;
        }
        let mark = self.watermark();
        debug_assert!(self.units.is_empty(), "idle tracker kept a unit");
        self.raise(mark.max(wal_end));
    }

    /// The position to confirm: pops every leading unit that is sealed and
    /// fully acked, and raises the watermark to the end of the last one
    /// popped. Never decreases.
    pub fn watermark(&mut self) -> Lsn {
        let mut mark = self.watermark;
        while let Some(unit) = self.units.front() {
            if !unit.done() {
                break;
            }
            mark = mark.max(unit.end);
            self.units.pop_front();
            self.front_seq += 1;
        }
        self.raise(mark);
        self.watermark
    }

    /// Facts issued and not yet acked.
    pub fn in_flight(&self) -> usize {
        self.in_flight
    }

    /// Units not yet popped by [`watermark`](Tracker::watermark), including
    /// an open one. Units without facts may be folded into the unit before
    /// them, so this can be lower than the number of units fed.
    pub fn open_units(&self) -> usize {
        self.units.len()
    }

    /// Appends `unit` and returns its sequence number.
    fn push(&mut self, unit: Unit) -> u64 {
        let seq = self.next_seq;
        self.units.push_back(unit);
        self.next_seq += 1;
        seq
    }

    fn unit_mut(&mut self, seq: u64) -> Option<&mut Unit> {
        let idx = usize::try_from(seq.checked_sub(self.front_seq)?).ok()?;
        self.units.get_mut(idx)
    }

    /// Folds the last unit into the one before it when the last is sealed
    /// with no token ever issued and the one before is sealed: confirming
    /// the later end once the earlier unit is done is what popping both
    /// would do. Keeps memory proportional to the units with facts.
    fn fold_back(&mut self) {
        let n = self.units.len();
        if n < 2 {
            return;
        }
        let last = self.units[n - 1];
        if !last.sealed || last.issued || !self.units[n - 2].sealed {
            return;
        }
        self.units.pop_back();
        self.next_seq -= 1;
        let prev = &mut self.units[n - 2];
        prev.end = prev.end.max(last.end);
    }

    /// Moves the watermark to `to`, never backwards.
    fn raise(&mut self, to: Lsn) {
        let before = self.watermark;
        self.watermark = self.watermark.max(to);
        debug_assert!(self.watermark >= before, "watermark moved backwards");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lsn(v: u64) -> Lsn {
        Lsn(v)
    }

    /// A committed transaction with `n` facts; returns their tokens.
    fn tx(t: &mut Tracker, n: usize, end: u64) -> Vec<Token> {
        t.begin().unwrap();
        let tokens = (0..n).map(|_| t.fact().unwrap()).collect();
        t.commit(lsn(end)).unwrap();
        tokens
    }

    #[test]
    fn starts_at_the_slot_position() {
        let mut t = Tracker::new(lsn(0x500));
        assert_eq!(t.watermark(), lsn(0x500));
        assert_eq!(t.in_flight(), 0);
        assert_eq!(t.open_units(), 0);
    }

    #[test]
    fn transaction_confirms_at_commit_end_once_all_facts_are_acked() {
        let mut t = Tracker::new(lsn(0));
        let toks = tx(&mut t, 3, 0x100);
        assert_eq!(t.in_flight(), 3);
        assert_eq!(t.watermark(), lsn(0));
        t.ack(toks[2]).unwrap();
        t.ack(toks[0]).unwrap();
        assert_eq!(t.watermark(), lsn(0), "one fact still unacked");
        t.ack(toks[1]).unwrap();
        assert_eq!(t.watermark(), lsn(0x100));
        assert_eq!(t.in_flight(), 0);
        assert_eq!(t.open_units(), 0);
    }

    /// The Go Factlib bug: confirming the newest ack loses the earlier,
    /// unacked facts on a crash.
    #[test]
    fn out_of_order_acks_never_pass_an_unacked_earlier_unit() {
        let mut t = Tracker::new(lsn(0));
        let a = tx(&mut t, 1, 0x100);
        let b = tx(&mut t, 2, 0x200);
        let c = t.lone(lsn(0x300), true).unwrap();
        t.ack(c).unwrap();
        t.ack(b[0]).unwrap();
        t.ack(b[1]).unwrap();
        assert_eq!(t.watermark(), lsn(0), "unit a is unacked");
        assert_eq!(t.in_flight(), 1);
        t.ack(a[0]).unwrap();
        assert_eq!(t.watermark(), lsn(0x300));
    }

    #[test]
    fn partial_acks_stop_at_the_first_unacked_unit() {
        let mut t = Tracker::new(lsn(0));
        let a = tx(&mut t, 1, 0x100);
        let b = tx(&mut t, 1, 0x200);
        let c = tx(&mut t, 1, 0x300);
        t.ack(a[0]).unwrap();
        t.ack(c[0]).unwrap();
        assert_eq!(t.watermark(), lsn(0x100));
        t.ack(b[0]).unwrap();
        assert_eq!(t.watermark(), lsn(0x300));
    }

    /// Exactly-once: a committed Kafka transaction acks every unit up to
    /// its last one at once, and nothing after it.
    #[test]
    fn ack_through_covers_the_prefix_up_to_a_unit() {
        let mut t = Tracker::new(lsn(0));
        let _a = tx(&mut t, 2, 0x100);
        let b = tx(&mut t, 1, 0x200);
        let c = t.lone(lsn(0x300), true).unwrap();
        t.begin().unwrap();
        let open = t.fact().unwrap();
        assert_eq!(t.in_flight(), 5);
        t.ack_through(b[0]).unwrap();
        assert_eq!(t.in_flight(), 2);
        assert_eq!(t.watermark(), lsn(0x200), "c is not covered");
        assert_eq!(
            t.ack_through(open),
            Err(ProgressError::UnknownToken(open)),
            "an open unit cannot be committed"
        );
        assert_eq!(t.in_flight(), 2, "a refused ack_through changes nothing");
        t.ack_through(c).unwrap();
        assert_eq!(t.watermark(), lsn(0x300));
        assert_eq!(
            t.ack_through(b[0]),
            Err(ProgressError::UnknownToken(b[0])),
            "a popped unit is unknown"
        );
        t.commit(lsn(0x400)).unwrap();
        t.ack_through(open).unwrap();
        assert_eq!(t.watermark(), lsn(0x400));
        assert_eq!(t.in_flight(), 0);
    }

    #[test]
    fn lone_message_between_transactions() {
        let mut t = Tracker::new(lsn(0));
        let a = tx(&mut t, 1, 0x100);
        let m = t.lone(lsn(0x180), true).unwrap();
        let b = tx(&mut t, 1, 0x200);
        t.ack(a[0]).unwrap();
        t.ack(b[0]).unwrap();
        assert_eq!(t.watermark(), lsn(0x100), "the lone fact blocks b");
        t.ack(m).unwrap();
        assert_eq!(t.watermark(), lsn(0x200));
    }

    #[test]
    fn lone_fact_confirms_at_its_own_lsn() {
        let mut t = Tracker::new(lsn(0));
        let m = t.lone(lsn(0x180), true).unwrap();
        assert_eq!(t.watermark(), lsn(0));
        t.ack(m).unwrap();
        assert_eq!(t.watermark(), lsn(0x180));
    }

    #[test]
    fn skipped_lone_message_is_acked_at_once() {
        let mut t = Tracker::new(lsn(0));
        assert_eq!(t.lone(lsn(0x180), false), None);
        assert_eq!(t.in_flight(), 0);
        assert_eq!(t.watermark(), lsn(0x180));
    }

    #[test]
    fn empty_transactions_advance_immediately() {
        let mut t = Tracker::new(lsn(0));
        tx(&mut t, 0, 0x100);
        assert_eq!(t.watermark(), lsn(0x100));
        tx(&mut t, 0, 0x200);
        tx(&mut t, 0, 0x300);
        assert_eq!(t.watermark(), lsn(0x300));
    }

    #[test]
    fn empty_units_behind_a_pending_one_wait_and_are_folded() {
        let mut t = Tracker::new(lsn(0));
        let a = tx(&mut t, 1, 0x100);
        for i in 2..1000u64 {
            tx(&mut t, 0, i * 0x100);
        }
        assert_eq!(t.lone(lsn(1000 * 0x100), false), None);
        assert_eq!(t.open_units(), 1, "empty units fold into the pending one");
        assert_eq!(t.watermark(), lsn(0));
        t.ack(a[0]).unwrap();
        assert_eq!(t.watermark(), lsn(1000 * 0x100));
    }

    #[test]
    fn facts_acked_before_commit_still_wait_for_the_commit() {
        let mut t = Tracker::new(lsn(0));
        t.begin().unwrap();
        let f = t.fact().unwrap();
        t.ack(f).unwrap();
        assert_eq!(t.watermark(), lsn(0), "open unit");
        t.commit(lsn(0x100)).unwrap();
        assert_eq!(t.watermark(), lsn(0x100));
    }

    #[test]
    fn open_unit_blocks_until_its_commit() {
        let mut t = Tracker::new(lsn(0));
        let a = tx(&mut t, 1, 0x100);
        t.begin().unwrap();
        let f = t.fact().unwrap();
        t.ack(f).unwrap();
        t.ack(a[0]).unwrap();
        assert_eq!(t.watermark(), lsn(0x100), "stops before the open unit");
        assert_eq!(t.open_units(), 1);
        t.commit(lsn(0x200)).unwrap();
        assert_eq!(t.watermark(), lsn(0x200));
    }

    /// Not seen with protocol v1, but must stay safe: the lone message's
    /// record precedes the open transaction's commit, so confirming that
    /// commit before the lone fact is acked would lose the fact.
    #[test]
    fn lone_message_inside_an_open_transaction_joins_it() {
        let mut t = Tracker::new(lsn(0));
        t.begin().unwrap();
        let f = t.fact().unwrap();
        assert_eq!(t.lone(lsn(0x80), false), None);
        let m = t.lone(lsn(0x90), true).unwrap();
        assert_eq!(t.in_flight(), 2);
        assert_eq!(t.open_units(), 1);
        t.commit(lsn(0x100)).unwrap();
        t.ack(f).unwrap();
        assert_eq!(t.watermark(), lsn(0), "the lone fact is unacked");
        t.ack(m).unwrap();
        assert_eq!(t.watermark(), lsn(0x100));
    }

    #[test]
    fn keepalive_advances_when_idle() {
        let mut t = Tracker::new(lsn(0x10));
        t.keepalive(lsn(0x100));
        assert_eq!(t.watermark(), lsn(0x100));
        let a = tx(&mut t, 1, 0x200);
        t.ack(a[0]).unwrap();
        // Acked but not yet popped: the keepalive pops it first.
        t.keepalive(lsn(0x300));
        assert_eq!(t.open_units(), 0);
        assert_eq!(t.watermark(), lsn(0x300));
    }

    #[test]
    fn keepalive_ignored_while_a_fact_is_in_flight() {
        let mut t = Tracker::new(lsn(0));
        let a = tx(&mut t, 1, 0x100);
        t.keepalive(lsn(0x200));
        assert_eq!(t.watermark(), lsn(0));
        t.ack(a[0]).unwrap();
        assert_eq!(t.watermark(), lsn(0x100));
        t.keepalive(lsn(0x200));
        assert_eq!(t.watermark(), lsn(0x200));
    }

    #[test]
    fn keepalive_ignored_while_a_unit_is_open() {
        let mut t = Tracker::new(lsn(0));
        t.begin().unwrap();
        t.keepalive(lsn(0x200));
        assert_eq!(t.watermark(), lsn(0));
        t.commit(lsn(0x300)).unwrap();
        t.keepalive(lsn(0x400));
        assert_eq!(t.watermark(), lsn(0x400));
    }

    #[test]
    fn never_backwards() {
        let mut t = Tracker::new(lsn(0x100));
        t.keepalive(lsn(0x50));
        assert_eq!(t.watermark(), lsn(0x100), "keepalive below start");
        t.keepalive(lsn(0x400));
        assert_eq!(t.watermark(), lsn(0x400));
        t.keepalive(lsn(0x300));
        assert_eq!(t.watermark(), lsn(0x400), "lower keepalive");
        tx(&mut t, 0, 0x200);
        assert_eq!(t.watermark(), lsn(0x400), "commit below the watermark");
        let m = t.lone(lsn(0x250), true).unwrap();
        t.ack(m).unwrap();
        assert_eq!(t.watermark(), lsn(0x400), "lone below the watermark");
        // A unit with a lower end than the one before it.
        let a = tx(&mut t, 1, 0x600);
        let b = tx(&mut t, 1, 0x500);
        t.ack(b[0]).unwrap();
        t.ack(a[0]).unwrap();
        assert_eq!(t.watermark(), lsn(0x600));
    }

    #[test]
    fn protocol_misuse_is_an_error() {
        let mut t = Tracker::new(lsn(0));
        assert_eq!(t.fact(), Err(ProgressError::NotOpen));
        assert_eq!(t.commit(lsn(1)), Err(ProgressError::NotOpen));
        t.begin().unwrap();
        assert_eq!(t.begin(), Err(ProgressError::AlreadyOpen));
        t.commit(lsn(0x100)).unwrap();
        assert_eq!(t.commit(lsn(0x200)), Err(ProgressError::NotOpen));
        assert_eq!(t.watermark(), lsn(0x100));
    }

    #[test]
    fn unknown_and_duplicate_acks_are_errors() {
        let mut t = Tracker::new(lsn(0));
        let a = tx(&mut t, 1, 0x100);
        let b = tx(&mut t, 1, 0x200);
        t.ack(a[0]).unwrap();
        assert_eq!(t.ack(a[0]), Err(ProgressError::UnknownToken(a[0])));
        assert_eq!(t.watermark(), lsn(0x100));
        // Unit a is popped now.
        assert_eq!(t.ack(a[0]), Err(ProgressError::UnknownToken(a[0])));
        let never = Token::from_raw(99);
        assert_eq!(t.ack(never), Err(ProgressError::UnknownToken(never)));
        assert_eq!(t.in_flight(), 1);
        t.ack(b[0]).unwrap();
        assert_eq!(t.watermark(), lsn(0x200));
    }

    #[test]
    fn folded_units_never_reuse_an_issued_token() {
        let mut t = Tracker::new(lsn(0));
        let a = tx(&mut t, 1, 0x100);
        // Facts all acked before commit: the unit had tokens, so it is not
        // folded, and its sequence number is not reused.
        t.begin().unwrap();
        let f = t.fact().unwrap();
        t.ack(f).unwrap();
        t.commit(lsn(0x200)).unwrap();
        let c = tx(&mut t, 1, 0x300);
        assert_ne!(f, c[0]);
        assert_eq!(t.ack(f), Err(ProgressError::UnknownToken(f)));
        t.ack(a[0]).unwrap();
        assert_eq!(t.watermark(), lsn(0x200));
        t.ack(c[0]).unwrap();
        assert_eq!(t.watermark(), lsn(0x300));
    }

    #[test]
    fn token_round_trips_through_raw() {
        let mut t = Tracker::new(lsn(0));
        let m = t.lone(lsn(0x10), true).unwrap();
        let back = Token::from_raw(m.into_raw());
        assert_eq!(back, m);
        t.ack(back).unwrap();
        assert_eq!(t.watermark(), lsn(0x10));
    }
}
