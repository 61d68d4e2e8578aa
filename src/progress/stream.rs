//! The stream's units, from CopyData bodies to facts: the one owner of
//! "which transaction is open, which fact ends a unit, how far may the slot
//! be confirmed". `relay` and `tail` both drive it; neither keeps a copy of
//! the unit structure.
//!
//! ```text
//!  CopyData body ──ReplicationRef──► Keepalive ──► Tracker::keepalive
//!                 └─XLogData──PgOutputRef──► Begin ──► open transaction, Tracker::begin
//!                                          ├► Message(prefix) ──► held ──(next message)──► Fact
//!                                          ├► Message(other prefix) ──► skipped (a lone one is a unit)
//!                                          ├► Relation ──► outbox::Relations (the table's layout)
//!                                          ├► Insert ──outbox::Relations::row──► held ──► Fact (an envelope, or a bad row)
//!                                          ├► Commit ──► held fact released with unit_end, Tracker::commit
//!                                          ├► Update / Delete / Truncate ──► counted, skipped
//!                                          └► anything else: decoded (it must be well formed), skipped
//!  caller ──ack(token)──► Tracker ──watermark()──► position to confirm
//! ```
//!
//! An Insert into a table of the publication (an outbox table) is a fact
//! like a message under the prefix, in its place in the transaction: its
//! envelope is built from the row (`outbox`), and a row that does not map
//! is still a fact, marked [`Fact::bad_row`], so that it reaches the
//! dead-letter topic in order and its unit is confirmed only after that.
//!
//! A transactional fact is held back until the next message of its
//! transaction arrives, so that the fact which ends a unit is known when it
//! is handed out: the caller sees [`Fact::unit_end`] on exactly the last
//! fact of each unit that has facts (a producer may end a batch there).
//! A held fact has no token yet; it gets one when it is released, so a
//! connection cut in the middle of a transaction leaves nothing in flight
//! that was never handed out.
//!
//! This module is sans-io: no sockets, clocks or metrics.
//!
//! **Invariants**
//! - Every fact under the prefix is handed out exactly once per connection,
//!   in stream order, each with a token from the [`Tracker`]; nothing from a
//!   unit is confirmed before all of its facts are acked and its end is
//!   known (the [`Tracker`]'s invariants).
//! - [`Fact::unit_end`] is `Some` on the last fact of each unit with facts,
//!   and only there.
//! - A transaction is open from its `Begin` until its `Commit`, and
//!   [`Stream::in_transaction`] says so; a held fact exists only while one
//!   is open.

use std::ops::Range;

use bytes::Bytes;

use super::{ProgressError, Token, Tracker};
use crate::lsn::Lsn;
use crate::outbox::{OutboxSettings, Relations, UnknownRelation};
use crate::pgwire::pgoutput::{PgOutput, PgOutputRef};
use crate::pgwire::replication::ReplicationRef;
use crate::pgwire::DecodeError;

/// Why the stream cannot go on. Both kinds are definite: the server sent
/// something the protocol does not allow, and reading the same bytes again
/// gives the same answer.
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    /// A message that does not decode.
    #[error("malformed message from the server: {0}")]
    Decode(#[from] DecodeError),
    /// Messages out of the order the protocol guarantees.
    #[error("unexpected replication stream structure: {0}")]
    Progress(#[from] ProgressError),
    /// A row change for a table the server never described.
    #[error(transparent)]
    Relation(#[from] UnknownRelation),
    /// A body range outside its run: a bug in the caller.
    #[error("a CopyData body lies outside its run")]
    OutOfRun,
}

impl StreamError {
    /// Always false: see the type's documentation.
    pub fn is_transient(&self) -> bool {
        false
    }
}

/// The transaction a fact belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Txn {
    /// Its xid.
    pub xid: u32,
    /// Its commit LSN (Begin's final LSN).
    pub commit_lsn: Lsn,
    /// Its commit timestamp as the server reported it (Begin's), in
    /// microseconds since the PostgreSQL epoch (2000-01-01 UTC).
    pub commit_ts: i64,
}

/// A fact to deliver.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fact {
    /// Ack it with [`Stream::ack`] once it is delivered.
    pub token: Token,
    /// The message's own LSN (for a non-transactional message, the end of
    /// its WAL record).
    pub lsn: Lsn,
    /// The transaction of a transactional fact; `None` for a
    /// non-transactional one.
    pub txn: Option<Txn>,
    /// The end of the XLogData that carried the fact (its start plus the
    /// length of its pgoutput message): the position the Go Factlib relay
    /// reports for a fact, kept for `--headers go-factlib`.
    pub xlog_end: Lsn,
    /// The fact's envelope: for a message, its content (a zero-copy slice of
    /// the run); for an outbox row, built from the row. For a bad row, the
    /// row as JSON.
    pub content: Bytes,
    /// Set on an outbox row that does not map onto a fact: why. It goes to
    /// the dead-letter topic.
    pub bad_row: Option<Box<str>>,
    /// Set on the last fact of a unit: the position the unit confirms at.
    pub unit_end: Option<Lsn>,
}

impl Fact {
    /// The position a consumer sees for the fact: its transaction's commit
    /// LSN, or its own for a non-transactional fact.
    pub fn position(&self) -> Lsn {
        self.txn.map_or(self.lsn, |t| t.commit_lsn)
    }
}

/// A fact of the open transaction, waiting for the next message to know
/// whether it ends the unit.
#[derive(Debug)]
struct Held {
    lsn: Lsn,
    xlog_end: Lsn,
    transactional: bool,
    content: Bytes,
    bad_row: Option<Box<str>>,
}

/// The stream of one replication connection, as units and facts.
///
/// Feed it every CopyData body in stream order with [`Stream::handle`]; ack
/// each fact it returns with [`Stream::ack`]; read
/// [`Stream::watermark`] for the position to confirm.
#[derive(Debug)]
pub struct Stream {
    prefix: Box<[u8]>,
    tracker: Tracker,
    open: Option<Txn>,
    held: Option<Held>,
    relations: Relations,
    ignored: u64,
}

impl Stream {
    /// A stream of facts under `prefix`, starting at `start` (the slot's
    /// confirmed position, or `0/0`).
    /// Outbox rows map with the default (Debezium) layout.
    pub fn new(prefix: &str, start: Lsn) -> Self {
        Stream {
            prefix: prefix.as_bytes().into(),
            tracker: Tracker::new(start),
            open: None,
            held: None,
            relations: Relations::new(OutboxSettings::default()),
            ignored: 0,
        }
    }

    /// Maps outbox rows as `settings` say.
    pub fn with_outbox(mut self, settings: OutboxSettings) -> Self {
        self.relations = Relations::new(settings);
        self
    }

    /// Updates, deletes and truncates of outbox tables seen and skipped so
    /// far.
    pub fn ignored_changes(&self) -> u64 {
        self.ignored
    }

    /// Handles the CopyData body at `body` in `run`. Returns the fact it
    /// releases, if any: at most one per body.
    pub fn handle(&mut self, run: &Bytes, body: Range<usize>) -> Result<Option<Fact>, StreamError> {
        let data = run.get(body).ok_or(StreamError::OutOfRun)?;
        let x = match ReplicationRef::parse(data)? {
            ReplicationRef::Keepalive(k) => {
                self.tracker.keepalive(k.wal_end);
                return Ok(None);
            }
            ReplicationRef::XLogData(x) => x,
        };
        // Saturates only on a wal_start within a message of the end of the
        // LSN space, which no server reaches.
        let xlog_end = Lsn(x.wal_start.0.saturating_add(x.data.len() as u64));
        match PgOutputRef::decode(x.data)? {
            PgOutputRef::Begin(b) => {
                self.tracker.begin()?;
                self.open = Some(Txn {
                    xid: b.xid,
                    commit_lsn: b.final_lsn,
                    commit_ts: b.commit_ts,
                });
                Ok(None)
            }
            PgOutputRef::Commit(c) => {
                let last = match self.held.take() {
                    Some(h) => Some(self.release(h, Some(c.end_lsn))?),
                    None => None,
                };
                self.tracker.commit(c.end_lsn)?;
                self.open = None;
                Ok(last)
            }
            PgOutputRef::Message(m) => {
                let ours = *m.prefix == *self.prefix;
                if !m.transactional && self.open.is_none() {
                    // A lone message is a unit of its own.
                    return Ok(self.tracker.lone(m.lsn, ours).map(|token| Fact {
                        token,
                        lsn: m.lsn,
                        xlog_end,
                        txn: None,
                        content: run.slice_ref(m.content),
                        bad_row: None,
                        unit_end: Some(m.lsn),
                    }));
                }
                if m.transactional && self.open.is_none() {
                    return Err(ProgressError::NotOpen.into());
                }
                if !ours {
                    return Ok(None);
                }
                // A transactional fact, or (not seen with protocol 1) a
                // non-transactional one inside an open transaction, which
                // joins it: its record precedes the commit record.
                let next = Held {
                    lsn: m.lsn,
                    xlog_end,
                    transactional: m.transactional,
                    content: run.slice_ref(m.content),
                    bad_row: None,
                };
                self.hold(next)
            }
            PgOutputRef::Other => self.change(
                PgOutput::decode(run.slice_ref(x.data))?,
                x.wal_start,
                xlog_end,
            ),
        }
    }

    /// Holds `next`, releasing the fact held before it.
    fn hold(&mut self, next: Held) -> Result<Option<Fact>, StreamError> {
        match self.held.replace(next) {
            Some(prev) => self.release(prev, None).map(Some),
            None => Ok(None),
        }
    }

    /// A message other than Begin, Commit and Message, starting at `lsn`.
    fn change(
        &mut self,
        msg: PgOutput,
        lsn: Lsn,
        xlog_end: Lsn,
    ) -> Result<Option<Fact>, StreamError> {
        match msg {
            PgOutput::Relation(r) => {
                self.relations.relation(&r);
                Ok(None)
            }
            PgOutput::Insert(i) => {
                let Some(txn) = self.open else {
                    return Err(ProgressError::NotOpen.into());
                };
                let (content, bad_row) =
                    match self.relations.row(i.relation_id, &i.new, txn.commit_ts)? {
                        Ok(envelope) => (envelope, None),
                        Err(bad) => (bad.row, Some(bad.error.into_boxed_str())),
                    };
                self.hold(Held {
                    lsn,
                    xlog_end,
                    transactional: true,
                    content,
                    bad_row,
                })
            }
            PgOutput::Update(u) => Ok(self.ignore("update", u.relation_id)),
            PgOutput::Delete(d) => Ok(self.ignore("delete", d.relation_id)),
            PgOutput::Truncate(t) => {
                for id in t.relation_ids {
                    self.ignore("truncate", id);
                }
                Ok(None)
            }
            // Nothing else matters here, but it had to be well formed.
            _ => Ok(None),
        }
    }

    /// Counts and logs a row change the relay does not relay.
    fn ignore(&mut self, kind: &str, relation_id: u32) -> Option<Fact> {
        self.ignored += 1;
        let table = self.relations.table(relation_id).unwrap_or("(unannounced)");
        tracing::debug!(
            kind,
            table,
            "skipped a change of an outbox table: only inserts are facts"
        );
        None
    }

    /// Hands out a held fact of the open transaction with its token.
    fn release(&mut self, h: Held, unit_end: Option<Lsn>) -> Result<Fact, StreamError> {
        let token = self.tracker.fact()?;
        Ok(Fact {
            token,
            lsn: h.lsn,
            xlog_end: h.xlog_end,
            txn: self.open.filter(|_| h.transactional),
            content: h.content,
            bad_row: h.bad_row,
            unit_end,
        })
    }

    /// A fact handed out with `token` was delivered.
    pub fn ack(&mut self, token: Token) -> Result<(), ProgressError> {
        self.tracker.ack(token)
    }

    /// Every fact handed out up to and including `token`'s unit was
    /// delivered (see [`Tracker::ack_through`]).
    pub fn ack_through(&mut self, token: Token) -> Result<(), ProgressError> {
        self.tracker.ack_through(token)
    }

    /// The position to confirm: the end of the contiguous fully-acked
    /// prefix of units. Never decreases.
    pub fn watermark(&mut self) -> Lsn {
        self.tracker.watermark()
    }

    /// Facts handed out and not yet acked.
    pub fn in_flight(&self) -> usize {
        self.tracker.in_flight()
    }

    /// True between a transaction's `Begin` and its `Commit`: stopping now
    /// would cut a unit.
    pub fn in_transaction(&self) -> bool {
        self.open.is_some()
    }

    /// Starts over for a new connection, which streams again from the
    /// watermark; returns that position. Whatever was open, held or not yet
    /// acked is dropped: the server sends it again from the watermark, which
    /// never passed it. Acks for the old connection's tokens must not reach
    /// the new stream.
    pub fn restart(&mut self) -> Lsn {
        let mark = self.tracker.watermark();
        self.tracker = Tracker::new(mark);
        self.open = None;
        self.held = None;
        self.relations.clear();
        mark
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::BufMut;

    /// A run of XLogData bodies, and the range of each.
    struct Run {
        bytes: Bytes,
        bodies: Vec<Range<usize>>,
    }

    /// An XLogData body at `wal_start` (written twice, as the walsender
    /// does for logical replication) carrying `payload`.
    fn xlog(out: &mut Vec<u8>, wal_start: u64, payload: &[u8]) {
        out.put_u8(b'w');
        out.put_u64(wal_start);
        out.put_u64(wal_start);
        out.put_i64(0);
        out.extend_from_slice(payload);
    }

    #[derive(Clone, Copy)]
    enum M<'a> {
        Begin(u64, u32),
        Commit(u64),
        Msg(bool, u64, &'a str, &'a [u8]),
        Keepalive(u64),
        Truncate,
        /// Any pgoutput message, as bytes.
        Raw(&'a [u8]),
    }

    fn run(msgs: &[M<'_>]) -> Run {
        let mut bytes = Vec::new();
        let mut bodies = Vec::new();
        for m in msgs {
            let start = bytes.len();
            let mut p = Vec::new();
            // The walsender sends a message at its own LSN; the rest here
            // at 0/0 (which nothing reads).
            let mut wal_start = 0;
            match *m {
                M::Begin(final_lsn, xid) => {
                    p.put_u8(b'B');
                    p.put_u64(final_lsn);
                    p.put_i64(0x7E57);
                    p.put_u32(xid);
                }
                M::Commit(end) => {
                    p.put_u8(b'C');
                    p.put_u8(0);
                    p.put_u64(end - 8);
                    p.put_u64(end);
                    p.put_i64(0);
                }
                M::Msg(transactional, lsn, prefix, content) => {
                    wal_start = lsn;
                    p.put_u8(b'M');
                    p.put_u8(u8::from(transactional));
                    p.put_u64(lsn);
                    p.extend_from_slice(prefix.as_bytes());
                    p.put_u8(0);
                    p.put_u32(u32::try_from(content.len()).unwrap());
                    p.extend_from_slice(content);
                }
                M::Keepalive(wal_end) => {
                    bytes.put_u8(b'k');
                    bytes.put_u64(wal_end);
                    bytes.put_i64(0);
                    bytes.put_u8(0);
                    bodies.push(start..bytes.len());
                    continue;
                }
                M::Truncate => {
                    p.put_u8(b'T');
                    p.put_u32(1);
                    p.put_u8(0);
                    p.put_u32(16384);
                }
                M::Raw(msg) => p.extend_from_slice(msg),
            }
            xlog(&mut bytes, wal_start, &p);
            bodies.push(start..bytes.len());
        }
        Run {
            bytes: Bytes::from(bytes),
            bodies,
        }
    }

    /// Feeds every body; returns the facts in order.
    fn feed(s: &mut Stream, msgs: &[M<'_>]) -> Vec<Fact> {
        let r = run(msgs);
        r.bodies
            .iter()
            .filter_map(|b| s.handle(&r.bytes, b.clone()).unwrap())
            .collect()
    }

    fn ends(facts: &[Fact]) -> Vec<Option<u64>> {
        facts.iter().map(|f| f.unit_end.map(|l| l.0)).collect()
    }

    #[test]
    fn last_fact_of_a_transaction_carries_the_unit_end() {
        let mut s = Stream::new("p", Lsn(0));
        let facts = feed(
            &mut s,
            &[
                M::Begin(0x100, 7),
                M::Msg(true, 0x10, "p", b"a"),
                M::Msg(true, 0x20, "other", b"x"),
                M::Msg(true, 0x30, "p", b"b"),
                M::Msg(true, 0x40, "p", b"c"),
                M::Commit(0x108),
            ],
        );
        assert_eq!(ends(&facts), [None, None, Some(0x108)]);
        let contents: Vec<_> = facts.iter().map(|f| &f.content[..]).collect();
        assert_eq!(contents, [b"a", b"b", b"c"]);
        let txn = Some(Txn {
            xid: 7,
            commit_lsn: Lsn(0x100),
            commit_ts: 0x7E57,
        });
        assert!(facts.iter().all(|f| f.txn == txn));
        assert_eq!(facts[1].lsn, Lsn(0x30));
        assert_eq!(facts[1].position(), Lsn(0x100));
        assert_eq!(s.in_flight(), 3);
        assert!(!s.in_transaction());
        for f in &facts {
            assert_eq!(s.watermark(), Lsn(0), "a fact is unacked");
            s.ack(f.token).unwrap();
        }
        assert_eq!(s.watermark(), Lsn(0x108));
    }

    #[test]
    fn xlog_end_is_the_wal_start_plus_the_message_length() {
        let msgs = [
            M::Msg(false, 0x1_0000_0050, "p", b"lone"),
            M::Begin(0x1_0000_0200, 4),
            M::Msg(true, 0x1_0000_0100, "p", b"a"),
            M::Msg(true, 0x1_0000_0140, "p", b"a longer one"),
            M::Commit(0x1_0000_0208),
        ];
        let r = run(&msgs);
        // Each body is `w`, 24 header bytes, then the pgoutput message.
        let end = |i: usize, at: u64| Lsn(at + (r.bodies[i].len() - 25) as u64);
        let mut s = Stream::new("p", Lsn(0));
        let facts = feed(&mut s, &msgs);
        let got: Vec<_> = facts.iter().map(|f| (f.lsn, f.xlog_end)).collect();
        assert_eq!(
            got,
            [
                (Lsn(0x1_0000_0050), end(0, 0x1_0000_0050)),
                (Lsn(0x1_0000_0100), end(2, 0x1_0000_0100)),
                (Lsn(0x1_0000_0140), end(3, 0x1_0000_0140)),
            ]
        );
        // 'M', flags, LSN, "p\0", length, content.
        assert_eq!(end(3, 0x1_0000_0140), Lsn(0x1_0000_0140 + 16 + 12));
        assert_eq!(facts[1].position(), Lsn(0x1_0000_0200), "not the commit's");
    }

    #[test]
    fn a_held_fact_waits_for_the_next_message_even_across_runs() {
        let mut s = Stream::new("p", Lsn(0));
        let first = feed(&mut s, &[M::Begin(0x100, 1), M::Msg(true, 0x10, "p", b"a")]);
        assert!(first.is_empty(), "the fact may be the unit's last");
        assert_eq!(s.in_flight(), 0, "a held fact has no token yet");
        assert!(s.in_transaction());
        let rest = feed(&mut s, &[M::Commit(0x108)]);
        assert_eq!(ends(&rest), [Some(0x108)]);
        assert_eq!(&rest[0].content[..], b"a");
    }

    #[test]
    fn lone_facts_are_units_and_other_prefixes_are_skipped() {
        let mut s = Stream::new("p", Lsn(0));
        let facts = feed(
            &mut s,
            &[
                M::Msg(false, 0x50, "other", b"x"),
                M::Msg(false, 0x60, "p", b"lone"),
                M::Begin(0x100, 2),
                M::Commit(0x108),
            ],
        );
        assert_eq!(ends(&facts), [Some(0x60)]);
        assert_eq!((facts[0].txn, facts[0].position()), (None, Lsn(0x60)));
        assert_eq!(s.watermark(), Lsn(0x50), "the skipped lone unit is done");
        s.ack(facts[0].token).unwrap();
        assert_eq!(s.watermark(), Lsn(0x108));
    }

    #[test]
    fn a_lone_fact_inside_an_open_transaction_joins_it() {
        let mut s = Stream::new("p", Lsn(0));
        let facts = feed(
            &mut s,
            &[
                M::Begin(0x100, 3),
                M::Msg(true, 0x10, "p", b"a"),
                M::Msg(false, 0x20, "p", b"lone"),
                M::Commit(0x108),
            ],
        );
        assert_eq!(ends(&facts), [None, Some(0x108)]);
        assert_eq!(facts[1].txn, None);
        assert_eq!(facts[1].position(), Lsn(0x20));
        s.ack(facts[0].token).unwrap();
        assert_eq!(s.watermark(), Lsn(0), "the joined fact is unacked");
        s.ack(facts[1].token).unwrap();
        assert_eq!(s.watermark(), Lsn(0x108));
    }

    #[test]
    fn keepalives_advance_only_when_idle_and_other_messages_decode() {
        let mut s = Stream::new("p", Lsn(0));
        assert!(feed(&mut s, &[M::Keepalive(0x80), M::Truncate]).is_empty());
        assert_eq!(s.watermark(), Lsn(0x80));
        let f = feed(
            &mut s,
            &[M::Msg(false, 0x90, "p", b"x"), M::Keepalive(0x200)],
        );
        assert_eq!(s.watermark(), Lsn(0x80), "a fact is in flight");
        s.ack(f[0].token).unwrap();
        feed(&mut s, &[M::Keepalive(0x200)]);
        assert_eq!(s.watermark(), Lsn(0x200));
    }

    #[test]
    fn broken_structure_and_bad_bytes_are_errors() {
        let mut s = Stream::new("p", Lsn(0));
        let r = run(&[M::Msg(true, 0x10, "p", b"a")]);
        assert!(matches!(
            s.handle(&r.bytes, r.bodies[0].clone()),
            Err(StreamError::Progress(ProgressError::NotOpen))
        ));
        let r = run(&[M::Commit(0x108)]);
        assert!(matches!(
            s.handle(&r.bytes, r.bodies[0].clone()),
            Err(StreamError::Progress(ProgressError::NotOpen))
        ));
        let r = run(&[M::Begin(0x100, 1), M::Begin(0x200, 2)]);
        s.handle(&r.bytes, r.bodies[0].clone()).unwrap();
        assert!(matches!(
            s.handle(&r.bytes, r.bodies[1].clone()),
            Err(StreamError::Progress(ProgressError::AlreadyOpen))
        ));
        let bad = Bytes::from_static(b"w\0\0");
        assert!(matches!(s.handle(&bad, 0..3), Err(StreamError::Decode(_))));
        assert!(matches!(s.handle(&bad, 0..9), Err(StreamError::OutOfRun)));
    }

    #[test]
    fn restart_drops_the_cut_transaction_and_resumes_at_the_watermark() {
        let mut s = Stream::new("p", Lsn(0x10));
        let done = feed(
            &mut s,
            &[M::Msg(false, 0x20, "p", b"x"), M::Begin(0x100, 1)],
        );
        s.ack(done[0].token).unwrap();
        // The transaction is cut: its facts come again on the next connection.
        let cut = feed(
            &mut s,
            &[M::Msg(true, 0x30, "p", b"a"), M::Msg(true, 0x40, "p", b"b")],
        );
        s.ack(cut[0].token).unwrap();
        assert_eq!(s.restart(), Lsn(0x20));
        assert!(!s.in_transaction());
        let again = feed(
            &mut s,
            &[
                M::Begin(0x100, 1),
                M::Msg(true, 0x30, "p", b"a"),
                M::Msg(true, 0x40, "p", b"b"),
                M::Commit(0x108),
            ],
        );
        assert_eq!(ends(&again), [None, Some(0x108)]);
    }

    /// `R` for table `public.outbox` (oid `id`) with text columns.
    fn relation_msg(id: u32, cols: &[&str]) -> Vec<u8> {
        let mut p = vec![b'R'];
        p.put_u32(id);
        p.extend_from_slice(b"public\0outbox\0d");
        p.put_i16(i16::try_from(cols.len()).unwrap());
        for c in cols {
            p.put_u8(0);
            p.extend_from_slice(c.as_bytes());
            p.put_u8(0);
            p.put_u32(25);
            p.put_i32(-1);
        }
        p
    }

    /// `I` (or `U`/`D` by `tag`) of a row of text values into `id`.
    fn row_msg(tag: u8, id: u32, vals: &[Option<&str>]) -> Vec<u8> {
        let mut p = vec![tag];
        p.put_u32(id);
        p.put_u8(if tag == b'D' { b'K' } else { b'N' });
        p.put_i16(i16::try_from(vals.len()).unwrap());
        for v in vals {
            match v {
                None => p.put_u8(b'n'),
                Some(t) => {
                    p.put_u8(b't');
                    p.put_u32(u32::try_from(t.len()).unwrap());
                    p.extend_from_slice(t.as_bytes());
                }
            }
        }
        p
    }

    const OUTBOX: [&str; 5] = ["id", "aggregatetype", "aggregateid", "type", "payload"];

    #[test]
    fn outbox_rows_are_facts_in_commit_order_with_the_messages() {
        let mut s = Stream::new("p", Lsn(0));
        let row = |agg: Option<&'static str>, payload: &'static str| {
            row_msg(
                b'I',
                9,
                &[
                    Some("id-1"),
                    agg,
                    Some("o-1"),
                    Some("placed"),
                    Some(payload),
                ],
            )
        };
        let (r, i1, bad, upd, del) = (
            relation_msg(9, &OUTBOX),
            row(Some("order"), "{}"),
            row(None, "x"),
            row_msg(
                b'U',
                9,
                &[
                    Some("id-1"),
                    Some("order"),
                    Some("o-1"),
                    Some("placed"),
                    Some("{}"),
                ],
            ),
            row_msg(b'D', 9, &[Some("id-1"), None, None, None, None]),
        );
        let facts = feed(
            &mut s,
            &[
                M::Begin(0x100, 7),
                M::Raw(&r),
                M::Msg(true, 0x10, "p", b"m1"),
                M::Raw(&i1),
                M::Raw(&upd),
                M::Raw(&del),
                M::Raw(&bad),
                M::Msg(true, 0x40, "p", b"m2"),
                M::Commit(0x108),
            ],
        );
        assert_eq!(ends(&facts), [None, None, None, Some(0x108)]);
        assert_eq!(&facts[0].content[..], b"m1");
        let envelope = crate::fact::decode(facts[1].content.clone()).unwrap();
        assert_eq!(
            (
                envelope.aggregate_type.as_str(),
                envelope.event_type.as_str(),
                &envelope.payload[..]
            ),
            ("order", "placed", &b"{}"[..])
        );
        assert!(facts[1].bad_row.is_none());
        let why = facts[2].bad_row.as_deref().expect("a NULL aggregatetype");
        assert!(why.contains("aggregatetype"), "{why}");
        assert!(facts.iter().all(|f| f.txn.is_some_and(|t| t.xid == 7)));
        assert_eq!(s.ignored_changes(), 2, "the update and the delete");
        for f in &facts {
            assert_eq!(s.watermark(), Lsn(0), "a fact is unacked");
            s.ack(f.token).unwrap();
        }
        assert_eq!(s.watermark(), Lsn(0x108));
    }

    #[test]
    fn a_row_of_an_unannounced_table_is_an_error() {
        let mut s = Stream::new("p", Lsn(0));
        let i = row_msg(b'I', 3, &[None]);
        let r = run(&[M::Begin(0x100, 1), M::Raw(&i)]);
        s.handle(&r.bytes, r.bodies[0].clone()).unwrap();
        let err = s.handle(&r.bytes, r.bodies[1].clone()).unwrap_err();
        assert!(matches!(err, StreamError::Relation(_)), "{err}");
    }
}
