//! Property tests for the sans-io decoders: pgoutput round trips against an
//! independent encoder written from PostgreSQL's "Logical Replication Message
//! Formats", and "never panics" over arbitrary and mutated input for the
//! pgoutput, replication (CopyBoth) and backend framing decoders. On every
//! input, the borrowed decoders (`ReplicationRef`, `PgOutputRef`) agree with
//! the owned ones, and framing by runs (`parse_run`) with framing one
//! message at a time (`parse`).

use bytes::{Bytes, BytesMut};
use proptest::prelude::*;

use factlib::lsn::Lsn;
use factlib::pgwire::backend::{self, Backend, DEFAULT_MAX_FRAME};
use factlib::pgwire::pgoutput::{
    Begin, BeginPrepare, Column, Commit, CommitPrepared, DecodeContext, Delete, Insert,
    LogicalMessage, OldTuple, Origin, PgOutput, PgOutputRef, Prepare, Relation, RollbackPrepared,
    StreamAbort, StreamAbortInfo, StreamCommit, StreamStart, Truncate, TupleData, TupleValue,
    TypeMsg, Update,
};
use factlib::pgwire::replication::{ReplicationMessage, ReplicationRef};

/// Every pgoutput tag, for inputs that get past the tag dispatch.
const PGOUTPUT_TAGS: &[u8] = b"BCMORYIUDTSEcAbPKrp";
/// Tags `backend::parse` handles, for framed inputs that reach a body parser.
const BACKEND_TAGS: &[u8] = b"dWHcENRSKZTDCI123ntsvA";

// ---------------------------------------------------------------------------
// Encoder, written from the documented wire format.
// ---------------------------------------------------------------------------

fn put_cstr(out: &mut Vec<u8>, s: &[u8]) {
    assert!(!s.contains(&0), "C strings cannot hold NUL");
    out.extend_from_slice(s);
    out.push(0);
}

fn put_counted(out: &mut Vec<u8>, s: &[u8]) {
    out.extend_from_slice(&i32::try_from(s.len()).unwrap().to_be_bytes());
    out.extend_from_slice(s);
}

fn put_xid(out: &mut Vec<u8>, xid: Option<u32>) {
    if let Some(x) = xid {
        out.extend_from_slice(&x.to_be_bytes());
    }
}

fn put_tuple(out: &mut Vec<u8>, t: &TupleData) {
    out.extend_from_slice(&i16::try_from(t.len()).unwrap().to_be_bytes());
    for v in t {
        match v {
            TupleValue::Null => out.push(b'n'),
            TupleValue::UnchangedToast => out.push(b'u'),
            TupleValue::Text(b) => {
                out.push(b't');
                put_counted(out, b);
            }
            TupleValue::Binary(b) => {
                out.push(b'b');
                put_counted(out, b);
            }
        }
    }
}

fn put_old(out: &mut Vec<u8>, old: &OldTuple) {
    match old {
        OldTuple::Key(t) => {
            out.push(b'K');
            put_tuple(out, t);
        }
        OldTuple::Full(t) => {
            out.push(b'O');
            put_tuple(out, t);
        }
    }
}

fn put_prepare(out: &mut Vec<u8>, p: &Prepare) {
    out.push(p.flags);
    out.extend_from_slice(&p.prepare_lsn.0.to_be_bytes());
    out.extend_from_slice(&p.end_lsn.0.to_be_bytes());
    out.extend_from_slice(&p.prepare_ts.to_be_bytes());
    out.extend_from_slice(&p.xid.to_be_bytes());
    put_cstr(out, &p.gid);
}

fn encode(msg: &PgOutput) -> Vec<u8> {
    let mut o = vec![msg.tag()];
    match msg {
        PgOutput::Begin(b) => {
            o.extend_from_slice(&b.final_lsn.0.to_be_bytes());
            o.extend_from_slice(&b.commit_ts.to_be_bytes());
            o.extend_from_slice(&b.xid.to_be_bytes());
        }
        PgOutput::Commit(c) => {
            o.push(c.flags);
            o.extend_from_slice(&c.commit_lsn.0.to_be_bytes());
            o.extend_from_slice(&c.end_lsn.0.to_be_bytes());
            o.extend_from_slice(&c.commit_ts.to_be_bytes());
        }
        PgOutput::Message(m) => {
            put_xid(&mut o, m.xid);
            o.push(u8::from(m.transactional));
            o.extend_from_slice(&m.lsn.0.to_be_bytes());
            put_cstr(&mut o, &m.prefix);
            put_counted(&mut o, &m.content);
        }
        PgOutput::Origin(x) => {
            o.extend_from_slice(&x.origin_lsn.0.to_be_bytes());
            put_cstr(&mut o, &x.name);
        }
        PgOutput::Relation(r) => {
            put_xid(&mut o, r.xid);
            o.extend_from_slice(&r.relation_id.to_be_bytes());
            put_cstr(&mut o, &r.namespace);
            put_cstr(&mut o, &r.name);
            o.push(r.replica_identity);
            o.extend_from_slice(&i16::try_from(r.columns.len()).unwrap().to_be_bytes());
            for c in &r.columns {
                o.push(c.flags);
                put_cstr(&mut o, &c.name);
                o.extend_from_slice(&c.type_oid.to_be_bytes());
                o.extend_from_slice(&c.type_modifier.to_be_bytes());
            }
        }
        PgOutput::Type(t) => {
            put_xid(&mut o, t.xid);
            o.extend_from_slice(&t.type_oid.to_be_bytes());
            put_cstr(&mut o, &t.namespace);
            put_cstr(&mut o, &t.name);
        }
        PgOutput::Insert(i) => {
            put_xid(&mut o, i.xid);
            o.extend_from_slice(&i.relation_id.to_be_bytes());
            o.push(b'N');
            put_tuple(&mut o, &i.new);
        }
        PgOutput::Update(u) => {
            put_xid(&mut o, u.xid);
            o.extend_from_slice(&u.relation_id.to_be_bytes());
            if let Some(old) = &u.old {
                put_old(&mut o, old);
            }
            o.push(b'N');
            put_tuple(&mut o, &u.new);
        }
        PgOutput::Delete(d) => {
            put_xid(&mut o, d.xid);
            o.extend_from_slice(&d.relation_id.to_be_bytes());
            put_old(&mut o, &d.old);
        }
        PgOutput::Truncate(t) => {
            put_xid(&mut o, t.xid);
            o.extend_from_slice(&i32::try_from(t.relation_ids.len()).unwrap().to_be_bytes());
            o.push(t.options);
            for id in &t.relation_ids {
                o.extend_from_slice(&id.to_be_bytes());
            }
        }
        PgOutput::StreamStart(s) => {
            o.extend_from_slice(&s.xid.to_be_bytes());
            o.push(u8::from(s.first_segment));
        }
        PgOutput::StreamStop => {}
        PgOutput::StreamCommit(c) => {
            o.extend_from_slice(&c.xid.to_be_bytes());
            o.push(c.flags);
            o.extend_from_slice(&c.commit_lsn.0.to_be_bytes());
            o.extend_from_slice(&c.end_lsn.0.to_be_bytes());
            o.extend_from_slice(&c.commit_ts.to_be_bytes());
        }
        PgOutput::StreamAbort(a) => {
            o.extend_from_slice(&a.xid.to_be_bytes());
            o.extend_from_slice(&a.subxid.to_be_bytes());
            if let Some(p) = &a.parallel {
                o.extend_from_slice(&p.abort_lsn.0.to_be_bytes());
                o.extend_from_slice(&p.abort_ts.to_be_bytes());
            }
        }
        PgOutput::BeginPrepare(b) => {
            o.extend_from_slice(&b.prepare_lsn.0.to_be_bytes());
            o.extend_from_slice(&b.end_lsn.0.to_be_bytes());
            o.extend_from_slice(&b.prepare_ts.to_be_bytes());
            o.extend_from_slice(&b.xid.to_be_bytes());
            put_cstr(&mut o, &b.gid);
        }
        PgOutput::Prepare(p) | PgOutput::StreamPrepare(p) => put_prepare(&mut o, p),
        PgOutput::CommitPrepared(c) => {
            o.push(c.flags);
            o.extend_from_slice(&c.commit_lsn.0.to_be_bytes());
            o.extend_from_slice(&c.end_lsn.0.to_be_bytes());
            o.extend_from_slice(&c.commit_ts.to_be_bytes());
            o.extend_from_slice(&c.xid.to_be_bytes());
            put_cstr(&mut o, &c.gid);
        }
        PgOutput::RollbackPrepared(r) => {
            o.push(r.flags);
            o.extend_from_slice(&r.prepare_end_lsn.0.to_be_bytes());
            o.extend_from_slice(&r.rollback_end_lsn.0.to_be_bytes());
            o.extend_from_slice(&r.prepare_ts.to_be_bytes());
            o.extend_from_slice(&r.rollback_ts.to_be_bytes());
            o.extend_from_slice(&r.xid.to_be_bytes());
            put_cstr(&mut o, &r.gid);
        }
    }
    o
}

/// The context a message must be decoded with: streamed iff it carries the
/// optional xid. `None` for messages whose layout does not depend on it.
fn required_ctx(msg: &PgOutput) -> Option<DecodeContext> {
    let xid = match msg {
        PgOutput::Message(m) => m.xid,
        PgOutput::Relation(r) => r.xid,
        PgOutput::Type(t) => t.xid,
        PgOutput::Insert(i) => i.xid,
        PgOutput::Update(u) => u.xid,
        PgOutput::Delete(d) => d.xid,
        PgOutput::Truncate(t) => t.xid,
        _ => return None,
    };
    Some(DecodeContext {
        in_streamed_txn: xid.is_some(),
    })
}

// ---------------------------------------------------------------------------
// Strategies.
// ---------------------------------------------------------------------------

fn lsn() -> impl Strategy<Value = Lsn> {
    any::<u64>().prop_map(Lsn)
}

/// A C string's bytes: anything but NUL.
fn cstr(max: usize) -> impl Strategy<Value = Bytes> {
    prop::collection::vec(1u8..=255, 0..max).prop_map(Bytes::from)
}

fn blob(max: usize) -> impl Strategy<Value = Bytes> {
    prop::collection::vec(any::<u8>(), 0..max).prop_map(Bytes::from)
}

fn tuple_value() -> impl Strategy<Value = TupleValue> {
    prop_oneof![
        Just(TupleValue::Null),
        Just(TupleValue::UnchangedToast),
        blob(64).prop_map(TupleValue::Text),
        blob(64).prop_map(TupleValue::Binary),
    ]
}

fn tuple() -> impl Strategy<Value = TupleData> {
    prop::collection::vec(tuple_value(), 0..12)
}

fn old_tuple() -> impl Strategy<Value = OldTuple> {
    prop_oneof![
        tuple().prop_map(OldTuple::Key),
        tuple().prop_map(OldTuple::Full)
    ]
}

fn begin() -> impl Strategy<Value = PgOutput> {
    (lsn(), any::<i64>(), any::<u32>()).prop_map(|(final_lsn, commit_ts, xid)| {
        PgOutput::Begin(Begin {
            final_lsn,
            commit_ts,
            xid,
        })
    })
}

fn commit() -> impl Strategy<Value = PgOutput> {
    (any::<u8>(), lsn(), lsn(), any::<i64>()).prop_map(|(flags, commit_lsn, end_lsn, commit_ts)| {
        PgOutput::Commit(Commit {
            flags,
            commit_lsn,
            end_lsn,
            commit_ts,
        })
    })
}

fn message() -> impl Strategy<Value = PgOutput> {
    (
        any::<Option<u32>>(),
        any::<bool>(),
        lsn(),
        cstr(64),
        blob(4096),
    )
        .prop_map(|(xid, transactional, lsn, prefix, content)| {
            PgOutput::Message(LogicalMessage {
                xid,
                transactional,
                lsn,
                prefix,
                content,
            })
        })
}

fn other_messages() -> impl Strategy<Value = PgOutput> {
    let origin = (lsn(), cstr(32))
        .prop_map(|(origin_lsn, name)| PgOutput::Origin(Origin { origin_lsn, name }));
    let column = (any::<u8>(), cstr(32), any::<u32>(), any::<i32>()).prop_map(
        |(flags, name, type_oid, type_modifier)| Column {
            flags,
            name,
            type_oid,
            type_modifier,
        },
    );
    let relation = (
        any::<Option<u32>>(),
        any::<u32>(),
        cstr(32),
        cstr(32),
        prop::sample::select(b"dnfi".to_vec()),
        prop::collection::vec(column, 0..12),
    )
        .prop_map(
            |(xid, relation_id, namespace, name, replica_identity, columns)| {
                PgOutput::Relation(Relation {
                    xid,
                    relation_id,
                    namespace,
                    name,
                    replica_identity,
                    columns,
                })
            },
        );
    let type_msg = (any::<Option<u32>>(), any::<u32>(), cstr(32), cstr(32)).prop_map(
        |(xid, type_oid, namespace, name)| {
            PgOutput::Type(TypeMsg {
                xid,
                type_oid,
                namespace,
                name,
            })
        },
    );
    let insert =
        (any::<Option<u32>>(), any::<u32>(), tuple()).prop_map(|(xid, relation_id, new)| {
            PgOutput::Insert(Insert {
                xid,
                relation_id,
                new,
            })
        });
    let update = (
        any::<Option<u32>>(),
        any::<u32>(),
        prop::option::of(old_tuple()),
        tuple(),
    )
        .prop_map(|(xid, relation_id, old, new)| {
            PgOutput::Update(Update {
                xid,
                relation_id,
                old,
                new,
            })
        });
    let delete =
        (any::<Option<u32>>(), any::<u32>(), old_tuple()).prop_map(|(xid, relation_id, old)| {
            PgOutput::Delete(Delete {
                xid,
                relation_id,
                old,
            })
        });
    let truncate = (
        any::<Option<u32>>(),
        any::<u8>(),
        prop::collection::vec(any::<u32>(), 0..16),
    )
        .prop_map(|(xid, options, relation_ids)| {
            PgOutput::Truncate(Truncate {
                xid,
                options,
                relation_ids,
            })
        });
    let stream_start = (any::<u32>(), any::<bool>())
        .prop_map(|(xid, first_segment)| PgOutput::StreamStart(StreamStart { xid, first_segment }));
    let stream_commit = (any::<u32>(), any::<u8>(), lsn(), lsn(), any::<i64>()).prop_map(
        |(xid, flags, commit_lsn, end_lsn, commit_ts)| {
            PgOutput::StreamCommit(StreamCommit {
                xid,
                flags,
                commit_lsn,
                end_lsn,
                commit_ts,
            })
        },
    );
    let stream_abort = (
        any::<u32>(),
        any::<u32>(),
        prop::option::of((lsn(), any::<i64>())),
    )
        .prop_map(|(xid, subxid, parallel)| {
            PgOutput::StreamAbort(StreamAbort {
                xid,
                subxid,
                parallel: parallel.map(|(abort_lsn, abort_ts)| StreamAbortInfo {
                    abort_lsn,
                    abort_ts,
                }),
            })
        });
    let begin_prepare = (lsn(), lsn(), any::<i64>(), any::<u32>(), cstr(200)).prop_map(
        |(prepare_lsn, end_lsn, prepare_ts, xid, gid)| {
            PgOutput::BeginPrepare(BeginPrepare {
                prepare_lsn,
                end_lsn,
                prepare_ts,
                xid,
                gid,
            })
        },
    );
    let prepare = || {
        (
            any::<u8>(),
            lsn(),
            lsn(),
            any::<i64>(),
            any::<u32>(),
            cstr(200),
        )
            .prop_map(
                |(flags, prepare_lsn, end_lsn, prepare_ts, xid, gid)| Prepare {
                    flags,
                    prepare_lsn,
                    end_lsn,
                    prepare_ts,
                    xid,
                    gid,
                },
            )
    };
    let commit_prepared = (
        any::<u8>(),
        lsn(),
        lsn(),
        any::<i64>(),
        any::<u32>(),
        cstr(200),
    )
        .prop_map(|(flags, commit_lsn, end_lsn, commit_ts, xid, gid)| {
            PgOutput::CommitPrepared(CommitPrepared {
                flags,
                commit_lsn,
                end_lsn,
                commit_ts,
                xid,
                gid,
            })
        });
    let rollback_prepared = (
        any::<u8>(),
        lsn(),
        lsn(),
        any::<i64>(),
        any::<i64>(),
        any::<u32>(),
        cstr(200),
    )
        .prop_map(
            |(flags, prepare_end_lsn, rollback_end_lsn, prepare_ts, rollback_ts, xid, gid)| {
                PgOutput::RollbackPrepared(RollbackPrepared {
                    flags,
                    prepare_end_lsn,
                    rollback_end_lsn,
                    prepare_ts,
                    rollback_ts,
                    xid,
                    gid,
                })
            },
        );
    prop_oneof![
        origin,
        relation,
        type_msg,
        insert,
        update,
        delete,
        truncate,
        stream_start,
        Just(PgOutput::StreamStop),
        stream_commit,
        stream_abort,
        begin_prepare,
        prepare().prop_map(PgOutput::Prepare),
        commit_prepared,
        rollback_prepared,
        prepare().prop_map(PgOutput::StreamPrepare),
    ]
}

fn any_pgoutput() -> impl Strategy<Value = PgOutput> {
    prop_oneof![begin(), commit(), message(), other_messages()]
}

/// One edit to a valid encoding.
#[derive(Debug, Clone)]
enum Mutation {
    Flip { at: usize, bit: u8 },
    Set { at: usize, byte: u8 },
    Insert { at: usize, byte: u8 },
    Delete { at: usize },
    Truncate { at: usize },
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<usize>(), 0u8..8).prop_map(|(at, bit)| Mutation::Flip { at, bit }),
        (any::<usize>(), any::<u8>()).prop_map(|(at, byte)| Mutation::Set { at, byte }),
        (any::<usize>(), any::<u8>()).prop_map(|(at, byte)| Mutation::Insert { at, byte }),
        any::<usize>().prop_map(|at| Mutation::Delete { at }),
        any::<usize>().prop_map(|at| Mutation::Truncate { at }),
    ]
}

fn mutate(mut v: Vec<u8>, edits: &[Mutation]) -> Vec<u8> {
    for m in edits {
        let len = v.len();
        match *m {
            Mutation::Flip { at, bit } if len > 0 => v[at % len] ^= 1 << bit,
            Mutation::Set { at, byte } if len > 0 => v[at % len] = byte,
            Mutation::Insert { at, byte } => v.insert(at % (len + 1), byte),
            Mutation::Delete { at } if len > 0 => {
                v.remove(at % len);
            }
            Mutation::Truncate { at } => v.truncate(at % (len + 1)),
            _ => {}
        }
    }
    v
}

// ---------------------------------------------------------------------------
// Feeding every decoder; none may panic, whatever the result.
// ---------------------------------------------------------------------------

const CONTEXTS: [DecodeContext; 2] = [
    DecodeContext {
        in_streamed_txn: false,
    },
    DecodeContext {
        in_streamed_txn: true,
    },
];

fn feed_all(input: &[u8]) {
    let bytes = Bytes::copy_from_slice(input);
    for ctx in CONTEXTS {
        let _ = PgOutput::decode(bytes.clone(), ctx);
    }
    if let Ok(ReplicationMessage::XLogData(x)) = ReplicationMessage::parse(bytes.clone()) {
        for ctx in CONTEXTS {
            let _ = PgOutput::decode(x.data.clone(), ctx);
        }
    }
    check_borrowed_decoders_agree(&bytes);
    // The framing ways must agree, whatever the input.
    assert_eq!(framed(input, false), framed(input, true));
}

/// What framing a stream gave: every message (a CopyData as its body), then
/// how it ended and how much input was left.
#[derive(Debug, PartialEq, Eq)]
enum Seen {
    Body(Vec<u8>),
    Other(String),
    Error(String),
    Left(usize),
}

/// Frames `input` with `backend::parse`, or with `backend::parse_run`
/// (each run walked with `next_body`, which must agree with `bodies`).
fn framed(input: &[u8], runs: bool) -> Vec<Seen> {
    let mut buf = BytesMut::from(input);
    let mut seen = Vec::new();
    loop {
        let before = buf.len();
        let got = if runs {
            backend::parse_run(&mut buf, DEFAULT_MAX_FRAME)
        } else {
            backend::parse(&mut buf, DEFAULT_MAX_FRAME)
        };
        match got {
            Ok(Some(Backend::CopyData(b))) => {
                assert!(!runs, "parse_run never returns a lone CopyData");
                seen.push(Seen::Body(b.to_vec()));
            }
            Ok(Some(Backend::CopyRun(mut run))) => {
                let peeked: Vec<Vec<u8>> = run.bodies().map(<[u8]>::to_vec).collect();
                let mut walked = Vec::new();
                while let Some(r) = run.next_body() {
                    walked.push(run.bytes()[r].to_vec());
                }
                assert_eq!(peeked, walked, "bodies() and next_body() agree");
                assert!(!walked.is_empty(), "a run holds at least one message");
                assert_eq!(run.bodies().count(), 0, "a walked run is empty");
                seen.extend(walked.into_iter().map(Seen::Body));
            }
            Ok(Some(other)) => seen.push(Seen::Other(format!("{other:?}"))),
            Ok(None) => {
                assert_eq!(buf.len(), before, "Ok(None) consumes nothing");
                seen.push(Seen::Left(buf.len()));
                return seen;
            }
            Err(e) => {
                seen.push(Seen::Error(e.to_string()));
                seen.push(Seen::Left(buf.len()));
                return seen;
            }
        }
        assert!(buf.len() < before, "a message consumes input");
    }
}

/// The borrowed decoders agree with the owned ones on any input.
fn check_borrowed_decoders_agree(bytes: &Bytes) {
    match (
        ReplicationRef::parse(bytes),
        ReplicationMessage::parse(bytes.clone()),
    ) {
        (Ok(ReplicationRef::Keepalive(a)), Ok(ReplicationMessage::Keepalive(b))) => {
            assert_eq!(a, b)
        }
        (Ok(ReplicationRef::XLogData(a)), Ok(ReplicationMessage::XLogData(b))) => {
            assert_eq!(
                (a.wal_start, a.wal_end, a.server_clock, a.data),
                (b.wal_start, b.wal_end, b.server_clock, &b.data[..])
            );
        }
        (Err(a), Err(b)) => assert_eq!(a, b),
        (a, b) => panic!("replication decoders disagree: {a:?} vs {b:?}"),
    }
    for ctx in CONTEXTS {
        let owned = PgOutput::decode(bytes.clone(), ctx);
        match (PgOutputRef::decode(bytes, ctx), owned) {
            (Ok(PgOutputRef::Begin(a)), Ok(PgOutput::Begin(b))) => assert_eq!(a, b),
            (Ok(PgOutputRef::Commit(a)), Ok(PgOutput::Commit(b))) => assert_eq!(a, b),
            (Ok(PgOutputRef::Message(a)), Ok(PgOutput::Message(b))) => {
                assert_eq!(
                    (a.xid, a.transactional, a.lsn, a.prefix, a.content),
                    (b.xid, b.transactional, b.lsn, &b.prefix[..], &b.content[..])
                );
                assert_eq!(
                    a.content.as_ptr(),
                    b.content.as_ptr(),
                    "the owned content is the input's tail"
                );
            }
            (Ok(PgOutputRef::Other), _) => {
                assert!(!matches!(bytes.first(), Some(b'B' | b'C' | b'M')));
            }
            (Err(a), Err(b)) => assert_eq!(a, b),
            (a, b) => panic!("pgoutput decoders disagree: {a:?} vs {b:?}"),
        }
    }
}

/// `tag` + body as a backend frame with a correct length.
fn frame(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut v = vec![tag];
    v.extend_from_slice(&(i32::try_from(body.len()).unwrap() + 4).to_be_bytes());
    v.extend_from_slice(body);
    v
}

/// An XLogData CopyData body around a pgoutput message.
fn xlogdata(payload: &[u8]) -> Vec<u8> {
    let mut v = vec![b'w'];
    v.extend_from_slice(&0x10u64.to_be_bytes());
    v.extend_from_slice(&0x20u64.to_be_bytes());
    v.extend_from_slice(&0i64.to_be_bytes());
    v.extend_from_slice(payload);
    v
}

proptest! {
    #[test]
    fn begin_commit_message_round_trip(msg in prop_oneof![begin(), commit(), message()]) {
        let ctx = required_ctx(&msg).unwrap_or_default();
        let bytes = Bytes::from(encode(&msg));
        prop_assert_eq!(PgOutput::decode(bytes, ctx)?, msg);
    }

    #[test]
    fn every_message_round_trips(msg in any_pgoutput(), other_ctx: bool) {
        let bytes = Bytes::from(encode(&msg));
        match required_ctx(&msg) {
            Some(ctx) => prop_assert_eq!(PgOutput::decode(bytes, ctx)?, msg),
            None => {
                // Layout independent of the stream state.
                let ctx = DecodeContext { in_streamed_txn: other_ctx };
                prop_assert_eq!(PgOutput::decode(bytes, ctx)?, msg);
            }
        }
    }

    #[test]
    fn message_content_is_zero_copy(msg in message()) {
        let ctx = required_ctx(&msg).unwrap_or_default();
        let bytes = Bytes::from(encode(&msg));
        let start = bytes.as_ptr() as usize;
        let end = start + bytes.len();
        let PgOutput::Message(m) = PgOutput::decode(bytes.clone(), ctx)? else {
            panic!("decoded to another message");
        };
        for part in [&m.prefix, &m.content] {
            let p = part.as_ptr() as usize;
            prop_assert!(part.is_empty() || (p >= start && p + part.len() <= end));
        }
    }

    #[test]
    fn trailing_bytes_are_rejected(msg in any_pgoutput(), extra in prop::collection::vec(any::<u8>(), 1..32)) {
        // Stream Abort without its v4 tail plus 16 extra bytes is a valid v4
        // Stream Abort; everything else must be refused.
        let abort_tail_ambiguous = matches!(&msg, PgOutput::StreamAbort(a) if a.parallel.is_none())
            && extra.len() == 16;
        prop_assume!(!abort_tail_ambiguous);
        let ctx = required_ctx(&msg).unwrap_or_default();
        let mut v = encode(&msg);
        v.extend_from_slice(&extra);
        prop_assert!(PgOutput::decode(Bytes::from(v), ctx).is_err());
    }

    #[test]
    fn arbitrary_bytes_never_panic(input in prop::collection::vec(any::<u8>(), 0..2048)) {
        feed_all(&input);
    }

    #[test]
    fn arbitrary_bodies_after_known_tags_never_panic(
        tag in prop::sample::select(PGOUTPUT_TAGS.to_vec()),
        body in prop::collection::vec(any::<u8>(), 0..2048),
    ) {
        let mut v = vec![tag];
        v.extend_from_slice(&body);
        feed_all(&v);
        feed_all(&xlogdata(&v));
        feed_all(&frame(b'd', &xlogdata(&v)));
    }

    #[test]
    fn arbitrary_backend_frames_never_panic(
        tag in prop::sample::select(BACKEND_TAGS.to_vec()),
        body in prop::collection::vec(any::<u8>(), 0..512),
        tail in prop::collection::vec(any::<u8>(), 0..16),
    ) {
        let mut v = frame(tag, &body);
        v.extend_from_slice(&tail);
        feed_all(&v);
    }

    #[test]
    fn runs_frame_a_stream_as_single_messages_do(
        frames in prop::collection::vec(
            (prop::sample::select(b"ddddddNcZ?".to_vec()), prop::collection::vec(any::<u8>(), 0..64)),
            0..24,
        ),
        cut in any::<prop::sample::Index>(),
        bad_len: bool,
    ) {
        let mut stream = Vec::new();
        for (tag, body) in &frames {
            stream.extend_from_slice(&frame(*tag, body));
        }
        if bad_len && !stream.is_empty() {
            // A negative length somewhere: both ways must stop there.
            let at = cut.index(stream.len());
            stream.splice(at..at, frame(b'd', b"").iter().copied().take(1).chain([0xff; 4]));
        }
        prop_assert_eq!(framed(&stream, true), framed(&stream, false));
        // Fed in two reads, as a socket might deliver it.
        let at = cut.index(stream.len() + 1);
        for end in [at, stream.len()] {
            prop_assert_eq!(framed(&stream[..end], true), framed(&stream[..end], false));
        }
    }

    #[test]
    fn mutated_encodings_never_panic(
        msg in any_pgoutput(),
        edits in prop::collection::vec(mutation(), 1..6),
    ) {
        let encoded = encode(&msg);
        let mutated = mutate(encoded.clone(), &edits);
        feed_all(&mutated);
        feed_all(&xlogdata(&mutated));
        feed_all(&frame(b'd', &xlogdata(&mutated)));
        // Mutating the frame itself, length header included.
        feed_all(&mutate(frame(b'd', &xlogdata(&encoded)), &edits));
    }
}
