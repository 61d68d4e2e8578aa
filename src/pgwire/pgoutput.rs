//! Decoder for `pgoutput` messages: the payload of an XLogData frame.
//!
//! Owns the byte layout of the logical replication messages of `pgoutput`
//! protocol version 1 (PostgreSQL's "Logical Replication Message Formats"),
//! and nothing else: it does not track transaction state, relation caches or
//! LSN watermarks. Version 1 only, because the client only ever asks for it
//! (`"proto_version" '1'` in `source::ReplicationStream::start_pgoutput`):
//! the server then never streams in-progress transactions (v2), never sends
//! two-phase messages (v3) and never uses parallel streaming (v4). The tags
//! of those versions' messages (`S E c A b P K r p`) are rejected as
//! [`DecodeError::UnknownTag`], like any other unknown tag.
//!
//! ```text
//!  XLogData.data (Bytes) ──► PgOutput::decode(data) ──► PgOutput
//!                                                         ├─ Begin / Commit / Message …
//!                                                         └─ prefix, content, tuple values:
//!                                                            zero-copy slices of `data`
//! ```
//!
//! Layout notes (tag, then fields, all integers big-endian):
//! - With protocol 1 no message carries the leading `Int32 xid` that v2+
//!   puts in messages of streamed transactions, so every layout is fixed by
//!   its tag alone: the decoder needs no stream state.
//! - Strings (prefix, names) are kept as raw bytes without the NUL: they are
//!   in the server encoding, which need not be UTF-8.
//!
//! **Invariants**
//! - No input makes [`PgOutput::decode`] panic. Every read goes through
//!   [`Reader`]; every count from the wire is checked for sign, and no
//!   allocation is sized beyond what the remaining input could hold.
//! - A message consumes its input exactly; leftover bytes are
//!   [`DecodeError::TrailingBytes`].
//! - `LogicalMessage::prefix`, `LogicalMessage::content`, every name and
//!   every [`TupleValue`] payload are zero-copy `Bytes` slices of the input.

use bytes::{Buf, Bytes};

use super::{Cursor, DecodeError, Reader};
use crate::lsn::Lsn;

/// One decoded pgoutput message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PgOutput {
    /// `B`: a transaction starts.
    Begin(Begin),
    /// `C`: a transaction commits.
    Commit(Commit),
    /// `M`: a logical decoding message (`pg_logical_emit_message`).
    Message(LogicalMessage),
    /// `O`: the changes that follow came from another origin.
    Origin(Origin),
    /// `R`: a relation's description, sent before its first change.
    Relation(Relation),
    /// `Y`: a non-built-in type's name, sent before its first use.
    Type(TypeMsg),
    /// `I`: a row was inserted.
    Insert(Insert),
    /// `U`: a row was updated.
    Update(Update),
    /// `D`: a row was deleted.
    Delete(Delete),
    /// `T`: tables were truncated.
    Truncate(Truncate),
}

/// `B` Begin.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Begin {
    /// The final LSN of the transaction (where its commit record is).
    pub final_lsn: Lsn,
    /// Commit timestamp, PostgreSQL-epoch microseconds.
    pub commit_ts: i64,
    /// The transaction's xid.
    pub xid: u32,
}

/// `C` Commit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Commit {
    /// Flags; currently unused (0). Kept as sent, not validated.
    pub flags: u8,
    /// The LSN of the commit record.
    pub commit_lsn: Lsn,
    /// The end LSN of the transaction: the position to confirm once every
    /// fact of the transaction is durable.
    pub end_lsn: Lsn,
    /// Commit timestamp, PostgreSQL-epoch microseconds.
    pub commit_ts: i64,
}

/// `M` Message: a logical decoding message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogicalMessage {
    /// True if the message was emitted transactionally (it then arrives
    /// between Begin and Commit); false if it arrives on its own.
    pub transactional: bool,
    /// The LSN of the message.
    pub lsn: Lsn,
    /// The prefix, without its NUL; raw bytes in the server encoding.
    pub prefix: Bytes,
    /// The content, zero-copy.
    pub content: Bytes,
}

impl LogicalMessage {
    /// The only flag bit defined: the message is transactional.
    pub const FLAG_TRANSACTIONAL: u8 = 1;
}

/// `O` Origin.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    /// The LSN of the commit on the origin server.
    pub origin_lsn: Lsn,
    /// The origin's name, without its NUL.
    pub name: Bytes,
}

/// `R` Relation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Relation {
    /// The relation's OID; later change messages refer to it.
    pub relation_id: u32,
    /// Namespace (schema); empty for `pg_catalog`.
    pub namespace: Bytes,
    /// Relation name.
    pub name: Bytes,
    /// Replica identity setting, as `relreplident`: `d`, `n`, `f` or `i`.
    pub replica_identity: u8,
    /// The columns, in the order tuple data lists them.
    pub columns: Vec<Column>,
}

/// One column of a [`Relation`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Column {
    /// Flags: 0, or [`Column::FLAG_KEY`] if the column is part of the key.
    pub flags: u8,
    /// Column name.
    pub name: Bytes,
    /// OID of the column's data type.
    pub type_oid: u32,
    /// Type modifier (`atttypmod`).
    pub type_modifier: i32,
}

impl Column {
    /// The column is part of the replica identity key.
    pub const FLAG_KEY: u8 = 1;

    /// True if the column is part of the replica identity key.
    pub fn is_key(&self) -> bool {
        self.flags & Self::FLAG_KEY != 0
    }
}

/// `Y` Type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TypeMsg {
    /// The type's OID.
    pub type_oid: u32,
    /// Namespace; empty for `pg_catalog`.
    pub namespace: Bytes,
    /// Type name.
    pub name: Bytes,
}

/// One column value in tuple data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TupleValue {
    /// `n`: SQL NULL.
    Null,
    /// `u`: an unchanged TOASTed value; the value itself is not sent.
    UnchangedToast,
    /// `t`: the value in text format, zero-copy.
    Text(Bytes),
    /// `b`: the value in binary format, zero-copy. The server sends it only
    /// when the client sets the `binary` option, which the relay does not.
    Binary(Bytes),
}

/// A row: one value per column of the relation.
pub type TupleData = Vec<TupleValue>;

/// The old row sent with an Update or Delete.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OldTuple {
    /// `K`: only the replica identity key columns are meaningful; the
    /// others are null.
    Key(TupleData),
    /// `O`: the whole old row (replica identity full).
    Full(TupleData),
}

/// `I` Insert.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Insert {
    /// The relation, as announced by a [`Relation`] message.
    pub relation_id: u32,
    /// The new row.
    pub new: TupleData,
}

/// `U` Update.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Update {
    /// The relation, as announced by a [`Relation`] message.
    pub relation_id: u32,
    /// The old key or old row, when the server sends one.
    pub old: Option<OldTuple>,
    /// The new row.
    pub new: TupleData,
}

/// `D` Delete.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delete {
    /// The relation, as announced by a [`Relation`] message.
    pub relation_id: u32,
    /// The old key or old row.
    pub old: OldTuple,
}

/// `T` Truncate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Truncate {
    /// Option bits: [`Truncate::CASCADE`], [`Truncate::RESTART_IDENTITY`].
    pub options: u8,
    /// The truncated relations.
    pub relation_ids: Vec<u32>,
}

impl Truncate {
    /// `TRUNCATE … CASCADE`.
    pub const CASCADE: u8 = 1;
    /// `TRUNCATE … RESTART IDENTITY`.
    pub const RESTART_IDENTITY: u8 = 2;
}

/// The messages a messages-only publication streams, decoded from a
/// borrowed payload: Begin, Commit and Message are decoded in place, so no
/// `Bytes` handle is made; every other message is `Other`, left for
/// [`PgOutput::decode`]. [`PgOutput::decode`] uses this for those three
/// tags, so the two decoders cannot disagree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PgOutputRef<'a> {
    /// `B`
    Begin(Begin),
    /// `C`
    Commit(Commit),
    /// `M`
    Message(MessageRef<'a>),
    /// Any other tag, unread (an unknown tag included).
    Other,
}

/// [`LogicalMessage`] borrowed from its payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MessageRef<'a> {
    /// See [`LogicalMessage::transactional`].
    pub transactional: bool,
    /// The LSN of the message.
    pub lsn: Lsn,
    /// The prefix, without its NUL.
    pub prefix: &'a [u8],
    /// The content: always the payload's tail.
    pub content: &'a [u8],
}

impl<'a> PgOutputRef<'a> {
    /// Decodes a Begin, Commit or Message payload (the whole XLogData
    /// payload); any other tag gives `Other` and reads nothing.
    pub fn decode(data: &'a [u8]) -> Result<Self, DecodeError> {
        let mut r = Cursor::new(data);
        let (msg, what) = match r.u8("pgoutput tag")? {
            b'B' => (PgOutputRef::Begin(begin(&mut r)?), "Begin"),
            b'C' => (PgOutputRef::Commit(commit(&mut r)?), "Commit"),
            b'M' => (PgOutputRef::Message(message(&mut r)?), "Message"),
            _ => return Ok(PgOutputRef::Other),
        };
        r.finish(what)?;
        Ok(msg)
    }
}

/// Smallest encoding of one Relation column: flags, empty name, oid, typmod.
const MIN_COLUMN_LEN: usize = 1 + 1 + 4 + 4;
/// Smallest encoding of one tuple value: its kind byte.
const MIN_TUPLE_VALUE_LEN: usize = 1;
/// Encoding of one relation OID in a Truncate.
const TRUNCATE_OID_LEN: usize = 4;

impl PgOutput {
    /// Decodes one pgoutput message (the whole XLogData payload).
    pub fn decode(mut data: Bytes) -> Result<PgOutput, DecodeError> {
        // Begin, Commit and Message have one decoder, the borrowed one.
        let m = match PgOutputRef::decode(&data)? {
            PgOutputRef::Begin(b) => return Ok(PgOutput::Begin(b)),
            PgOutputRef::Commit(c) => return Ok(PgOutput::Commit(c)),
            PgOutputRef::Message(m) => Some((
                data.slice_ref(m.prefix),
                data.len() - m.content.len(),
                m.transactional,
                m.lsn,
            )),
            PgOutputRef::Other => None,
        };
        if let Some((prefix, content_at, transactional, lsn)) = m {
            // The content is the input's tail: hand the input's own handle
            // over rather than make another.
            data.advance(content_at);
            return Ok(PgOutput::Message(LogicalMessage {
                transactional,
                lsn,
                prefix,
                content: data,
            }));
        }
        let mut r = Reader::new(data);
        let tag = r.u8("pgoutput tag")?;
        let (msg, what) = match tag {
            b'O' => (PgOutput::Origin(origin(&mut r)?), "Origin"),
            b'R' => (PgOutput::Relation(relation(&mut r)?), "Relation"),
            b'Y' => (PgOutput::Type(type_msg(&mut r)?), "Type"),
            b'I' => (PgOutput::Insert(insert(&mut r)?), "Insert"),
            b'U' => (PgOutput::Update(update(&mut r)?), "Update"),
            b'D' => (PgOutput::Delete(delete(&mut r)?), "Delete"),
            b'T' => (PgOutput::Truncate(truncate(&mut r)?), "Truncate"),
            tag => {
                return Err(DecodeError::UnknownTag {
                    context: "pgoutput",
                    tag,
                })
            }
        };
        r.finish(what)?;
        Ok(msg)
    }

    /// The message's tag byte on the wire.
    pub fn tag(&self) -> u8 {
        match self {
            PgOutput::Begin(_) => b'B',
            PgOutput::Commit(_) => b'C',
            PgOutput::Message(_) => b'M',
            PgOutput::Origin(_) => b'O',
            PgOutput::Relation(_) => b'R',
            PgOutput::Type(_) => b'Y',
            PgOutput::Insert(_) => b'I',
            PgOutput::Update(_) => b'U',
            PgOutput::Delete(_) => b'D',
            PgOutput::Truncate(_) => b'T',
        }
    }
}

fn lsn(r: &mut Reader, what: &'static str) -> Result<Lsn, DecodeError> {
    r.u64(what).map(Lsn)
}

/// A non-negative count from the wire, as `usize`.
fn count(what: &'static str, n: i64) -> Result<usize, DecodeError> {
    usize::try_from(n).map_err(|_| DecodeError::InvalidLength { what, len: n })
}

/// A capacity for `n` items of at least `min_len` bytes each that the
/// remaining input could actually hold.
fn capped(r: &Reader, n: usize, min_len: usize) -> usize {
    n.min(r.remaining() / min_len)
}

fn begin(r: &mut Cursor<'_>) -> Result<Begin, DecodeError> {
    Ok(Begin {
        final_lsn: Lsn(r.u64("Begin final_lsn")?),
        commit_ts: r.i64("Begin commit_ts")?,
        xid: r.u32("Begin xid")?,
    })
}

fn commit(r: &mut Cursor<'_>) -> Result<Commit, DecodeError> {
    Ok(Commit {
        flags: r.u8("Commit flags")?,
        commit_lsn: Lsn(r.u64("Commit commit_lsn")?),
        end_lsn: Lsn(r.u64("Commit end_lsn")?),
        commit_ts: r.i64("Commit commit_ts")?,
    })
}

fn message<'a>(r: &mut Cursor<'a>) -> Result<MessageRef<'a>, DecodeError> {
    let flags = r.u8("Message flags")?;
    if flags & !LogicalMessage::FLAG_TRANSACTIONAL != 0 {
        return Err(DecodeError::InvalidValue {
            what: "Message flags",
            value: i64::from(flags),
        });
    }
    let lsn = Lsn(r.u64("Message lsn")?);
    let prefix = r.cstr_bytes("Message prefix")?;
    let content = r
        .len_prefixed("Message content", false)?
        .unwrap_or_default();
    Ok(MessageRef {
        transactional: flags & LogicalMessage::FLAG_TRANSACTIONAL != 0,
        lsn,
        prefix,
        content,
    })
}

fn origin(r: &mut Reader) -> Result<Origin, DecodeError> {
    Ok(Origin {
        origin_lsn: lsn(r, "Origin lsn")?,
        name: r.cstr_bytes("Origin name")?,
    })
}

fn relation(r: &mut Reader) -> Result<Relation, DecodeError> {
    let relation_id = r.u32("Relation id")?;
    let namespace = r.cstr_bytes("Relation namespace")?;
    let name = r.cstr_bytes("Relation name")?;
    let replica_identity = r.u8("Relation replica identity")?;
    let n = count(
        "Relation column count",
        i64::from(r.i16("Relation column count")?),
    )?;
    let mut columns = Vec::with_capacity(capped(r, n, MIN_COLUMN_LEN));
    for _ in 0..n {
        columns.push(Column {
            flags: r.u8("Relation column flags")?,
            name: r.cstr_bytes("Relation column name")?,
            type_oid: r.u32("Relation column type")?,
            type_modifier: r.i32("Relation column type modifier")?,
        });
    }
    Ok(Relation {
        relation_id,
        namespace,
        name,
        replica_identity,
        columns,
    })
}

fn type_msg(r: &mut Reader) -> Result<TypeMsg, DecodeError> {
    Ok(TypeMsg {
        type_oid: r.u32("Type oid")?,
        namespace: r.cstr_bytes("Type namespace")?,
        name: r.cstr_bytes("Type name")?,
    })
}

fn tuple_data(r: &mut Reader) -> Result<TupleData, DecodeError> {
    let n = count(
        "TupleData column count",
        i64::from(r.i16("TupleData column count")?),
    )?;
    let mut values = Vec::with_capacity(capped(r, n, MIN_TUPLE_VALUE_LEN));
    for _ in 0..n {
        let value = match r.u8("TupleData value kind")? {
            b'n' => TupleValue::Null,
            b'u' => TupleValue::UnchangedToast,
            b't' => TupleValue::Text(
                r.len_prefixed("TupleData text value", false)?
                    .unwrap_or_default(),
            ),
            b'b' => TupleValue::Binary(
                r.len_prefixed("TupleData binary value", false)?
                    .unwrap_or_default(),
            ),
            kind => {
                return Err(DecodeError::InvalidValue {
                    what: "TupleData value kind",
                    value: i64::from(kind),
                })
            }
        };
        values.push(value);
    }
    Ok(values)
}

/// Expects the `N` marker, then the new tuple.
fn new_tuple(r: &mut Reader, kind: u8, what: &'static str) -> Result<TupleData, DecodeError> {
    if kind != b'N' {
        return Err(DecodeError::InvalidValue {
            what,
            value: i64::from(kind),
        });
    }
    tuple_data(r)
}

fn insert(r: &mut Reader) -> Result<Insert, DecodeError> {
    let relation_id = r.u32("Insert relation id")?;
    let kind = r.u8("Insert tuple kind")?;
    let new = new_tuple(r, kind, "Insert tuple kind")?;
    Ok(Insert { relation_id, new })
}

fn update(r: &mut Reader) -> Result<Update, DecodeError> {
    let relation_id = r.u32("Update relation id")?;
    let mut kind = r.u8("Update tuple kind")?;
    let old = match kind {
        b'K' | b'O' => {
            let tuple = tuple_data(r)?;
            let old = if kind == b'K' {
                OldTuple::Key(tuple)
            } else {
                OldTuple::Full(tuple)
            };
            kind = r.u8("Update new tuple kind")?;
            Some(old)
        }
        _ => None,
    };
    let new = new_tuple(r, kind, "Update tuple kind")?;
    Ok(Update {
        relation_id,
        old,
        new,
    })
}

fn delete(r: &mut Reader) -> Result<Delete, DecodeError> {
    let relation_id = r.u32("Delete relation id")?;
    let old = match r.u8("Delete tuple kind")? {
        b'K' => OldTuple::Key(tuple_data(r)?),
        b'O' => OldTuple::Full(tuple_data(r)?),
        kind => {
            return Err(DecodeError::InvalidValue {
                what: "Delete tuple kind",
                value: i64::from(kind),
            })
        }
    };
    Ok(Delete { relation_id, old })
}

fn truncate(r: &mut Reader) -> Result<Truncate, DecodeError> {
    let n = count(
        "Truncate relation count",
        i64::from(r.i32("Truncate relation count")?),
    )?;
    let options = r.u8("Truncate options")?;
    let mut relation_ids = Vec::with_capacity(capped(r, n, TRUNCATE_OID_LEN));
    for _ in 0..n {
        relation_ids.push(r.u32("Truncate relation id")?);
    }
    Ok(Truncate {
        options,
        relation_ids,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A tiny big-endian byte builder for hand-written fixtures.
    struct B(Vec<u8>);

    impl B {
        fn tag(t: u8) -> Self {
            B(vec![t])
        }
        fn u8(mut self, v: u8) -> Self {
            self.0.push(v);
            self
        }
        fn i16(mut self, v: i16) -> Self {
            self.0.extend_from_slice(&v.to_be_bytes());
            self
        }
        fn i32(mut self, v: i32) -> Self {
            self.0.extend_from_slice(&v.to_be_bytes());
            self
        }
        fn u32(mut self, v: u32) -> Self {
            self.0.extend_from_slice(&v.to_be_bytes());
            self
        }
        fn u64(mut self, v: u64) -> Self {
            self.0.extend_from_slice(&v.to_be_bytes());
            self
        }
        fn i64(mut self, v: i64) -> Self {
            self.0.extend_from_slice(&v.to_be_bytes());
            self
        }
        fn cstr(mut self, s: &[u8]) -> Self {
            self.0.extend_from_slice(s);
            self.0.push(0);
            self
        }
        fn raw(mut self, s: &[u8]) -> Self {
            self.0.extend_from_slice(s);
            self
        }
        fn counted(self, s: &[u8]) -> Self {
            let n = i32::try_from(s.len()).unwrap();
            self.i32(n).raw(s)
        }
        fn done(self) -> Bytes {
            Bytes::from(self.0)
        }
    }

    fn decode(b: &Bytes) -> Result<PgOutput, DecodeError> {
        PgOutput::decode(b.clone())
    }

    fn within(outer: &Bytes, inner: &Bytes) -> bool {
        let start = outer.as_ptr() as usize;
        let p = inner.as_ptr() as usize;
        p >= start && p + inner.len() <= start + outer.len()
    }

    fn begin_bytes() -> Bytes {
        B::tag(b'B').u64(0x16_B374_D848).i64(777).u32(4242).done()
    }

    fn message_bytes(flags: u8) -> Bytes {
        B::tag(b'M')
            .u8(flags)
            .u64(0x10)
            .cstr(b"factlib")
            .counted(b"{\"k\":1}")
            .done()
    }

    fn update_bytes() -> Bytes {
        B::tag(b'U')
            .u32(16384)
            .u8(b'K')
            .i16(2)
            .u8(b't')
            .counted(b"1")
            .u8(b'n')
            .u8(b'N')
            .i16(2)
            .u8(b't')
            .counted(b"2")
            .u8(b'u')
            .done()
    }

    fn relation_bytes() -> Bytes {
        B::tag(b'R')
            .u32(16384)
            .cstr(b"public")
            .cstr(b"outbox")
            .u8(b'd')
            .i16(2)
            .u8(1)
            .cstr(b"id")
            .u32(20)
            .i32(-1)
            .u8(0)
            .cstr(b"payload")
            .u32(17)
            .i32(-1)
            .done()
    }

    #[test]
    fn decodes_begin() {
        let b = begin_bytes();
        assert_eq!(
            decode(&b).unwrap(),
            PgOutput::Begin(Begin {
                final_lsn: Lsn(0x16_B374_D848),
                commit_ts: 777,
                xid: 4242
            })
        );
        assert_eq!(decode(&b).unwrap().tag(), b'B');
    }

    #[test]
    fn borrowed_decode_reads_begin_commit_message_and_leaves_the_rest() {
        let b = message_bytes(1);
        let Ok(PgOutputRef::Message(m)) = PgOutputRef::decode(&b) else {
            panic!("a message")
        };
        assert_eq!(m.content.as_ptr(), b[b.len() - m.content.len()..].as_ptr());
        assert!(matches!(
            PgOutputRef::decode(&begin_bytes()),
            Ok(PgOutputRef::Begin(_))
        ));
        for other in [
            update_bytes(),
            relation_bytes(),
            Bytes::from_static(b"?junk"),
        ] {
            assert_eq!(PgOutputRef::decode(&other), Ok(PgOutputRef::Other));
        }
        assert!(PgOutputRef::decode(&begin_bytes()[..5]).is_err());
    }

    #[test]
    fn decodes_commit() {
        let b = B::tag(b'C').u8(0).u64(0x20).u64(0x28).i64(-5).done();
        assert_eq!(
            decode(&b).unwrap(),
            PgOutput::Commit(Commit {
                flags: 0,
                commit_lsn: Lsn(0x20),
                end_lsn: Lsn(0x28),
                commit_ts: -5
            })
        );
    }

    #[test]
    fn decodes_messages_zero_copy() {
        for (flags, transactional) in [(0u8, false), (1u8, true)] {
            let b = message_bytes(flags);
            let PgOutput::Message(m) = decode(&b).unwrap() else {
                panic!("not a message");
            };
            assert_eq!(m.transactional, transactional);
            assert_eq!(m.lsn, Lsn(0x10));
            assert_eq!(&m.prefix[..], b"factlib");
            assert_eq!(&m.content[..], b"{\"k\":1}");
            assert!(within(&b, &m.content), "content is a slice of the input");
            assert!(within(&b, &m.prefix), "prefix is a slice of the input");
        }
    }

    #[test]
    fn decodes_empty_message_content_and_prefix() {
        let b = B::tag(b'M').u8(0).u64(1).cstr(b"").counted(b"").done();
        let PgOutput::Message(m) = decode(&b).unwrap() else {
            panic!("not a message");
        };
        assert!(m.prefix.is_empty() && m.content.is_empty());
    }

    #[test]
    fn decodes_relation() {
        let b = relation_bytes();
        let PgOutput::Relation(rel) = decode(&b).unwrap() else {
            panic!("not a relation");
        };
        assert_eq!(rel.relation_id, 16384);
        assert_eq!(&rel.namespace[..], b"public");
        assert_eq!(&rel.name[..], b"outbox");
        assert_eq!(rel.replica_identity, b'd');
        assert_eq!(
            rel.columns,
            vec![
                Column {
                    flags: 1,
                    name: Bytes::from_static(b"id"),
                    type_oid: 20,
                    type_modifier: -1
                },
                Column {
                    flags: 0,
                    name: Bytes::from_static(b"payload"),
                    type_oid: 17,
                    type_modifier: -1
                },
            ]
        );
        assert!(rel.columns[0].is_key() && !rel.columns[1].is_key());
    }

    #[test]
    fn decodes_insert_with_text_null_toast_binary() {
        let b = B::tag(b'I')
            .u32(16384)
            .u8(b'N')
            .i16(4)
            .u8(b't')
            .counted(b"42")
            .u8(b'n')
            .u8(b'u')
            .u8(b'b')
            .counted(b"\x00\x01")
            .done();
        let PgOutput::Insert(ins) = decode(&b).unwrap() else {
            panic!("not an insert");
        };
        assert_eq!(ins.relation_id, 16384);
        assert_eq!(
            ins.new,
            vec![
                TupleValue::Text(Bytes::from_static(b"42")),
                TupleValue::Null,
                TupleValue::UnchangedToast,
                TupleValue::Binary(Bytes::from_static(b"\x00\x01")),
            ]
        );
        let TupleValue::Text(t) = &ins.new[0] else {
            panic!("not text");
        };
        assert!(within(&b, t), "tuple values are slices of the input");
    }

    #[test]
    fn decodes_update_with_and_without_old_key() {
        let b = update_bytes();
        assert_eq!(
            decode(&b).unwrap(),
            PgOutput::Update(Update {
                relation_id: 16384,
                old: Some(OldTuple::Key(vec![
                    TupleValue::Text(Bytes::from_static(b"1")),
                    TupleValue::Null
                ])),
                new: vec![
                    TupleValue::Text(Bytes::from_static(b"2")),
                    TupleValue::UnchangedToast
                ],
            })
        );
        let b = B::tag(b'U').u32(7).u8(b'O').i16(0).u8(b'N').i16(0).done();
        assert_eq!(
            decode(&b).unwrap(),
            PgOutput::Update(Update {
                relation_id: 7,
                old: Some(OldTuple::Full(vec![])),
                new: vec![],
            })
        );
    }

    #[test]
    fn decodes_delete() {
        let b = B::tag(b'D')
            .u32(16384)
            .u8(b'K')
            .i16(1)
            .u8(b't')
            .counted(b"9")
            .done();
        assert_eq!(
            decode(&b).unwrap(),
            PgOutput::Delete(Delete {
                relation_id: 16384,
                old: OldTuple::Key(vec![TupleValue::Text(Bytes::from_static(b"9"))]),
            })
        );
        let b = B::tag(b'D').u32(1).u8(b'N').i16(0).done();
        assert!(matches!(
            decode(&b),
            Err(DecodeError::InvalidValue { value, .. }) if value == i64::from(b'N')
        ));
    }

    #[test]
    fn decodes_truncate() {
        let b = B::tag(b'T').i32(2).u8(3).u32(10).u32(11).done();
        let PgOutput::Truncate(t) = decode(&b).unwrap() else {
            panic!("not a truncate");
        };
        assert_eq!(t.relation_ids, vec![10, 11]);
        assert_eq!(t.options, Truncate::CASCADE | Truncate::RESTART_IDENTITY);
    }

    #[test]
    fn decodes_origin_and_type() {
        let b = B::tag(b'O').u64(0x99).cstr(b"node_a").done();
        assert_eq!(
            decode(&b).unwrap(),
            PgOutput::Origin(Origin {
                origin_lsn: Lsn(0x99),
                name: Bytes::from_static(b"node_a")
            })
        );
        let b = B::tag(b'Y').u32(16500).cstr(b"").cstr(b"mood").done();
        assert_eq!(
            decode(&b).unwrap(),
            PgOutput::Type(TypeMsg {
                type_oid: 16500,
                namespace: Bytes::new(),
                name: Bytes::from_static(b"mood")
            })
        );
    }

    #[test]
    fn protocol_v2_to_v4_tags_are_unknown() {
        // Well-formed v2-v4 messages (Stream Start, Stream Stop, Stream
        // Commit, Stream Abort in both layouts, Begin Prepare, Prepare,
        // Stream Prepare, Commit Prepared, Rollback Prepared): with protocol
        // 1 the server never sends them, so they are unknown tags.
        let removed = [
            B::tag(b'S').u32(5).u8(1).done(),
            B::tag(b'E').done(),
            B::tag(b'c').u32(5).u8(0).u64(1).u64(2).i64(3).done(),
            B::tag(b'A').u32(5).u32(6).done(),
            B::tag(b'A').u32(5).u32(5).u64(7).i64(8).done(),
            B::tag(b'b').u64(1).u64(2).i64(3).u32(4).cstr(b"g1").done(),
            B::tag(b'P')
                .u8(0)
                .u64(1)
                .u64(2)
                .i64(3)
                .u32(4)
                .cstr(b"g1")
                .done(),
            B::tag(b'p')
                .u8(0)
                .u64(1)
                .u64(2)
                .i64(3)
                .u32(4)
                .cstr(b"g1")
                .done(),
            B::tag(b'K')
                .u8(0)
                .u64(1)
                .u64(2)
                .i64(3)
                .u32(4)
                .cstr(b"g1")
                .done(),
            B::tag(b'r')
                .u8(0)
                .u64(1)
                .u64(2)
                .i64(3)
                .i64(4)
                .u32(5)
                .cstr(b"g1")
                .done(),
        ];
        let mut tags: Vec<u8> = removed.iter().map(|b| b[0]).collect();
        tags.sort_unstable();
        tags.dedup();
        assert_eq!(tags, b"AEKPSbcpr", "every removed tag is covered");
        for bytes in removed {
            let tag = bytes[0];
            let unknown = DecodeError::UnknownTag {
                context: "pgoutput",
                tag,
            };
            assert_eq!(decode(&bytes), Err(unknown.clone()));
            // Also as a bare tag, and whatever follows it.
            assert_eq!(decode(&B::tag(tag).done()), Err(unknown.clone()));
            assert_eq!(
                decode(&B::tag(tag).raw(b"\xff\x00junk").done()),
                Err(unknown)
            );
            assert_eq!(PgOutputRef::decode(&bytes), Ok(PgOutputRef::Other));
        }
    }

    #[test]
    fn every_truncation_is_an_error() {
        let valid = [
            begin_bytes(),
            B::tag(b'C').u8(0).u64(1).u64(2).i64(3).done(),
            message_bytes(1),
            message_bytes(0),
            relation_bytes(),
            update_bytes(),
            B::tag(b'T').i32(2).u8(0).u32(10).u32(11).done(),
            B::tag(b'O').u64(0x99).cstr(b"o").done(),
            B::tag(b'Y').u32(1).cstr(b"n").cstr(b"t").done(),
        ];
        for bytes in valid {
            assert!(decode(&bytes).is_ok(), "{bytes:?}");
            for cut in 0..bytes.len() {
                assert!(
                    decode(&bytes.slice(..cut)).is_err(),
                    "prefix of {cut} bytes of {bytes:?} decoded"
                );
            }
        }
    }

    #[test]
    fn rejects_unknown_tag_and_empty_input() {
        assert_eq!(
            decode(&B::tag(b'Z').done()),
            Err(DecodeError::UnknownTag {
                context: "pgoutput",
                tag: b'Z'
            })
        );
        assert!(matches!(
            decode(&Bytes::new()),
            Err(DecodeError::Truncated { .. })
        ));
    }

    #[test]
    fn rejects_negative_counts_and_lengths() {
        let b = B::tag(b'R')
            .u32(1)
            .cstr(b"s")
            .cstr(b"t")
            .u8(b'd')
            .i16(-1)
            .done();
        assert!(matches!(
            decode(&b),
            Err(DecodeError::InvalidLength { len: -1, .. })
        ));
        let b = B::tag(b'I').u32(1).u8(b'N').i16(-3).done();
        assert!(matches!(
            decode(&b),
            Err(DecodeError::InvalidLength { len: -3, .. })
        ));
        let b = B::tag(b'T').i32(i32::MIN).u8(0).done();
        assert!(matches!(decode(&b), Err(DecodeError::InvalidLength { .. })));
        let b = B::tag(b'M').u8(0).u64(1).cstr(b"p").i32(-1).done();
        assert!(matches!(
            decode(&b),
            Err(DecodeError::InvalidLength { len: -1, .. })
        ));
        let b = B::tag(b'I').u32(1).u8(b'N').i16(1).u8(b't').i32(-1).done();
        assert!(matches!(
            decode(&b),
            Err(DecodeError::InvalidLength { len: -1, .. })
        ));
    }

    #[test]
    fn huge_counts_fail_without_huge_allocations() {
        // i32::MAX relations and i16::MAX columns with almost no input: a
        // truncation error, not an attempt to reserve gigabytes.
        let b = B::tag(b'T').i32(i32::MAX).u8(0).u32(1).done();
        assert!(matches!(decode(&b), Err(DecodeError::Truncated { .. })));
        let b = B::tag(b'I').u32(1).u8(b'N').i16(i16::MAX).u8(b'n').done();
        assert!(matches!(decode(&b), Err(DecodeError::Truncated { .. })));
        let b = B::tag(b'M')
            .u8(0)
            .u64(1)
            .cstr(b"p")
            .i32(i32::MAX)
            .raw(b"abc")
            .done();
        assert!(matches!(decode(&b), Err(DecodeError::Truncated { .. })));
    }

    #[test]
    fn rejects_trailing_bytes() {
        let mut v = begin_bytes().to_vec();
        v.push(0);
        assert_eq!(
            decode(&Bytes::from(v)),
            Err(DecodeError::TrailingBytes {
                what: "Begin",
                extra: 1
            })
        );
        let mut v = message_bytes(1).to_vec();
        v.extend_from_slice(b"xx");
        assert!(matches!(
            decode(&Bytes::from(v)),
            Err(DecodeError::TrailingBytes { extra: 2, .. })
        ));
    }

    #[test]
    fn rejects_unknown_message_flags_and_kinds() {
        for flags in [2u8, 3, 0x80, 0xff] {
            assert_eq!(
                decode(&message_bytes(flags)),
                Err(DecodeError::InvalidValue {
                    what: "Message flags",
                    value: i64::from(flags)
                })
            );
        }
        let b = B::tag(b'I').u32(1).u8(b'N').i16(1).u8(b'x').done();
        assert!(matches!(
            decode(&b),
            Err(DecodeError::InvalidValue { value, .. }) if value == i64::from(b'x')
        ));
        let b = B::tag(b'I').u32(1).u8(b'K').i16(0).done();
        assert!(decode(&b).is_err());
        let b = B::tag(b'U').u32(1).u8(b'K').i16(0).u8(b'K').i16(0).done();
        assert!(decode(&b).is_err(), "two old tuples");
    }

    #[test]
    fn rejects_prefix_without_nul() {
        let b = B::tag(b'M').u8(0).u64(1).raw(b"no-terminator").done();
        assert!(matches!(decode(&b), Err(DecodeError::InvalidString { .. })));
    }
}
