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
    Begin, Column, Commit, Delete, Insert, LogicalMessage, OldTuple, Origin, PgOutput, PgOutputRef,
    Relation, Truncate, TupleData, TupleValue, TypeMsg, Update,
};
use factlib::pgwire::replication::{ReplicationMessage, ReplicationRef};
use factlib::pgwire::DecodeError;

/// Every pgoutput tag, for inputs that get past the tag dispatch.
const PGOUTPUT_TAGS: &[u8] = b"BCMORYIUDT";
/// Tags of pgoutput protocol v2-v4 messages, which the decoder (protocol 1
/// only) must reject as unknown.
const REMOVED_PGOUTPUT_TAGS: &[u8] = b"SEcAbPKrp";
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
            o.extend_from_slice(&t.type_oid.to_be_bytes());
            put_cstr(&mut o, &t.namespace);
            put_cstr(&mut o, &t.name);
        }
        PgOutput::Insert(i) => {
            o.extend_from_slice(&i.relation_id.to_be_bytes());
            o.push(b'N');
            put_tuple(&mut o, &i.new);
        }
        PgOutput::Update(u) => {
            o.extend_from_slice(&u.relation_id.to_be_bytes());
            if let Some(old) = &u.old {
                put_old(&mut o, old);
            }
            o.push(b'N');
            put_tuple(&mut o, &u.new);
        }
        PgOutput::Delete(d) => {
            o.extend_from_slice(&d.relation_id.to_be_bytes());
            put_old(&mut o, &d.old);
        }
        PgOutput::Truncate(t) => {
            o.extend_from_slice(&i32::try_from(t.relation_ids.len()).unwrap().to_be_bytes());
            o.push(t.options);
            for id in &t.relation_ids {
                o.extend_from_slice(&id.to_be_bytes());
            }
        }
    }
    o
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
    (any::<bool>(), lsn(), cstr(64), blob(4096)).prop_map(
        |(transactional, lsn, prefix, content)| {
            PgOutput::Message(LogicalMessage {
                transactional,
                lsn,
                prefix,
                content,
            })
        },
    )
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
        any::<u32>(),
        cstr(32),
        cstr(32),
        prop::sample::select(b"dnfi".to_vec()),
        prop::collection::vec(column, 0..12),
    )
        .prop_map(
            |(relation_id, namespace, name, replica_identity, columns)| {
                PgOutput::Relation(Relation {
                    relation_id,
                    namespace,
                    name,
                    replica_identity,
                    columns,
                })
            },
        );
    let type_msg = (any::<u32>(), cstr(32), cstr(32)).prop_map(|(type_oid, namespace, name)| {
        PgOutput::Type(TypeMsg {
            type_oid,
            namespace,
            name,
        })
    });
    let insert = (any::<u32>(), tuple())
        .prop_map(|(relation_id, new)| PgOutput::Insert(Insert { relation_id, new }));
    let update = (any::<u32>(), prop::option::of(old_tuple()), tuple()).prop_map(
        |(relation_id, old, new)| {
            PgOutput::Update(Update {
                relation_id,
                old,
                new,
            })
        },
    );
    let delete = (any::<u32>(), old_tuple())
        .prop_map(|(relation_id, old)| PgOutput::Delete(Delete { relation_id, old }));
    let truncate = (any::<u8>(), prop::collection::vec(any::<u32>(), 0..16)).prop_map(
        |(options, relation_ids)| {
            PgOutput::Truncate(Truncate {
                options,
                relation_ids,
            })
        },
    );
    prop_oneof![origin, relation, type_msg, insert, update, delete, truncate,]
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

fn feed_all(input: &[u8]) {
    let bytes = Bytes::copy_from_slice(input);
    let _ = PgOutput::decode(bytes.clone());
    if let Ok(ReplicationMessage::XLogData(x)) = ReplicationMessage::parse(bytes.clone()) {
        let _ = PgOutput::decode(x.data.clone());
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
    let owned = PgOutput::decode(bytes.clone());
    match (PgOutputRef::decode(bytes), owned) {
        (Ok(PgOutputRef::Begin(a)), Ok(PgOutput::Begin(b))) => assert_eq!(a, b),
        (Ok(PgOutputRef::Commit(a)), Ok(PgOutput::Commit(b))) => assert_eq!(a, b),
        (Ok(PgOutputRef::Message(a)), Ok(PgOutput::Message(b))) => {
            assert_eq!(
                (a.transactional, a.lsn, a.prefix, a.content),
                (b.transactional, b.lsn, &b.prefix[..], &b.content[..])
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
        let bytes = Bytes::from(encode(&msg));
        prop_assert_eq!(PgOutput::decode(bytes)?, msg);
    }

    #[test]
    fn every_message_round_trips(msg in any_pgoutput()) {
        let bytes = Bytes::from(encode(&msg));
        prop_assert_eq!(PgOutput::decode(bytes)?, msg);
    }

    #[test]
    fn message_content_is_zero_copy(msg in message()) {
        let bytes = Bytes::from(encode(&msg));
        let start = bytes.as_ptr() as usize;
        let end = start + bytes.len();
        let PgOutput::Message(m) = PgOutput::decode(bytes.clone())? else {
            panic!("decoded to another message");
        };
        for part in [&m.prefix, &m.content] {
            let p = part.as_ptr() as usize;
            prop_assert!(part.is_empty() || (p >= start && p + part.len() <= end));
        }
    }

    #[test]
    fn trailing_bytes_are_rejected(msg in any_pgoutput(), extra in prop::collection::vec(any::<u8>(), 1..32)) {
        let mut v = encode(&msg);
        v.extend_from_slice(&extra);
        prop_assert!(PgOutput::decode(Bytes::from(v)).is_err());
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
    fn protocol_v2_to_v4_tags_are_unknown(
        tag in prop::sample::select(REMOVED_PGOUTPUT_TAGS.to_vec()),
        body in prop::collection::vec(any::<u8>(), 0..256),
    ) {
        let mut v = vec![tag];
        v.extend_from_slice(&body);
        prop_assert_eq!(
            PgOutput::decode(Bytes::from(v.clone())),
            Err(DecodeError::UnknownTag { context: "pgoutput", tag })
        );
        prop_assert_eq!(PgOutputRef::decode(&v), Ok(PgOutputRef::Other));
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
