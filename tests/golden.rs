//! Golden fixtures: replication streams captured from a real PostgreSQL 15
//! (`tests/fixtures/pg15/`, see `tests/fixtures/README.md`) are cut into
//! frames, parsed and decoded by the library, and checked against what the
//! SQL side recorded when it emitted (`<name>.expected.json`). No server is
//! needed.
//!
//! ```text
//!  <name>.stream ──backend::parse──► CopyData ──ReplicationMessage::parse──► XLogData
//!      ──PgOutput::decode──► Begin / Message / Relation / Insert … / Commit
//!      ──fact::decode (prefix "factlib")──► Fact   ==?  <name>.expected.json
//! ```

use std::collections::BTreeMap;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use bytes::{Bytes, BytesMut};
use factlib::fact::{self, Fact, TraceInfo};
use factlib::pgwire::backend::{parse, Backend, DEFAULT_MAX_FRAME};
use factlib::pgwire::pgoutput::{
    Begin, Column, Commit, LogicalMessage, OldTuple, PgOutput, Relation, Truncate, TupleValue,
};
use factlib::pgwire::replication::{ReplicationMessage, XLogData};
use factlib::Lsn;
use serde_json::Value;

const SCENARIOS: [&str; 4] = ["single_fact", "mixed", "large", "tables"];

struct Fixture {
    name: &'static str,
    stream: Bytes,
    expected: Value,
}

fn fixture(name: &'static str) -> Fixture {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/pg15");
    let stream = std::fs::read(format!("{dir}/{name}.stream"))
        .unwrap_or_else(|e| panic!("read {name}.stream: {e}"));
    let json = std::fs::read_to_string(format!("{dir}/{name}.expected.json"))
        .unwrap_or_else(|e| panic!("read {name}.expected.json: {e}"));
    Fixture {
        name,
        stream: Bytes::from(stream),
        expected: serde_json::from_str(&json).expect("expected.json parses"),
    }
}

fn all() -> Vec<Fixture> {
    SCENARIOS.into_iter().map(fixture).collect()
}

fn lsn(v: &Value) -> Lsn {
    v.as_str()
        .unwrap_or_else(|| panic!("LSN string expected, got {v}"))
        .parse()
        .expect("X/Y LSN")
}

fn string(v: &Value) -> String {
    v.as_str()
        .unwrap_or_else(|| panic!("string expected, got {v}"))
        .to_owned()
}

fn b64(v: &Value) -> Vec<u8> {
    B64.decode(v.as_str().expect("base64 string"))
        .expect("valid base64")
}

fn string_map(v: &Value) -> BTreeMap<String, String> {
    v.as_object()
        .expect("object")
        .iter()
        .map(|(k, v)| (k.clone(), string(v)))
        .collect()
}

/// Cuts `stream` into CopyData bodies, feeding it `chunk` bytes at a time
/// as a socket would. Every frame must be CopyData, and nothing may be left.
fn cut(stream: &[u8], chunk: usize) -> Vec<Bytes> {
    let mut buf = BytesMut::new();
    let mut frames = Vec::new();
    for piece in stream.chunks(chunk) {
        buf.extend_from_slice(piece);
        while let Some(msg) = parse(&mut buf, DEFAULT_MAX_FRAME).expect("frame parses") {
            match msg {
                Backend::CopyData(body) => frames.push(body),
                other => panic!("only CopyData expected in CopyBoth, got {other:?}"),
            }
        }
    }
    assert!(
        buf.is_empty(),
        "{} bytes of a partial frame left over",
        buf.len()
    );
    frames
}

/// One XLogData frame, decoded.
struct Data {
    /// The CopyData body the message was decoded from.
    frame: Bytes,
    xlog: XLogData,
    msg: PgOutput,
}

/// Every XLogData frame of the stream, in order (keepalives dropped after
/// they parse).
fn decode(f: &Fixture) -> Vec<Data> {
    let mut out = Vec::new();
    for frame in cut(&f.stream, f.stream.len()) {
        match ReplicationMessage::parse(frame.clone()).expect("replication message parses") {
            ReplicationMessage::Keepalive(_) => {}
            ReplicationMessage::XLogData(xlog) => {
                let msg = PgOutput::decode(xlog.data.clone())
                    .unwrap_or_else(|e| panic!("{}: pgoutput decode: {e}", f.name));
                out.push(Data { frame, xlog, msg });
            }
        }
    }
    out
}

/// A committed transaction as the stream shows it.
struct Tx {
    begin: Begin,
    begin_at: Lsn,
    /// Messages and row changes, in order (Relation messages kept apart).
    items: Vec<Data>,
    commit: Commit,
    commit_at: Lsn,
}

/// What a consumer sees: transactions and standalone (non-transactional)
/// messages, in stream order.
enum Unit {
    Tx(Tx),
    Standalone(LogicalMessage, Lsn),
}

/// Groups the stream into units, checking Begin/Commit pairing on the way.
/// Also returns every Relation message, with the index of the unit it came in.
fn group(data: Vec<Data>) -> (Vec<Unit>, Vec<(usize, Relation)>) {
    let mut units = Vec::new();
    let mut relations = Vec::new();
    let mut open: Option<(Begin, Lsn, Vec<Data>)> = None;
    for d in data {
        let at = d.xlog.wal_start;
        match d.msg {
            PgOutput::Begin(b) => {
                assert!(open.is_none(), "Begin inside a transaction");
                open = Some((b, at, Vec::new()));
            }
            PgOutput::Commit(c) => {
                let (begin, begin_at, items) = open.take().expect("Commit without Begin");
                units.push(Unit::Tx(Tx {
                    begin,
                    begin_at,
                    items,
                    commit: c,
                    commit_at: at,
                }));
            }
            PgOutput::Message(m) if !m.transactional => {
                assert!(
                    open.is_none(),
                    "non-transactional message inside Begin/Commit"
                );
                units.push(Unit::Standalone(m, at));
            }
            PgOutput::Relation(r) => {
                assert!(open.is_some(), "Relation outside a transaction");
                relations.push((units.len(), r));
            }
            PgOutput::Message(_)
            | PgOutput::Insert(_)
            | PgOutput::Update(_)
            | PgOutput::Delete(_)
            | PgOutput::Truncate(_) => {
                open.as_mut()
                    .expect("change outside Begin/Commit")
                    .2
                    .push(d);
            }
            other => panic!("unexpected pgoutput message {other:?}"),
        }
    }
    assert!(open.is_none(), "stream ends inside a transaction");
    (units, relations)
}

fn fact_from_json(v: &Value) -> Fact {
    Fact {
        id: string(&v["id"]),
        aggregate_type: string(&v["aggregate_type"]),
        aggregate_id: string(&v["aggregate_id"]),
        event_type: string(&v["event_type"]),
        payload: Bytes::from(b64(&v["payload_b64"])),
        created_at: v["created_at"].as_i64().expect("created_at"),
        metadata: string_map(&v["metadata"]),
        trace_info: v["trace_info"].as_object().map(|t| TraceInfo {
            trace_id: string(&t["trace_id"]),
            span_id: string(&t["span_id"]),
            metadata: string_map(&t["metadata"]),
        }),
    }
}

/// A logical message against its recorded emission: prefix, flag, the LSN
/// `pg_logical_emit_message` returned, and the fact or raw content.
fn check_message(exp: &Value, got: &LogicalMessage, at: Lsn) {
    assert_eq!(got.prefix, string(&exp["prefix"]).as_bytes(), "prefix");
    assert_eq!(
        got.transactional,
        exp["transactional"].as_bool().unwrap(),
        "transactional flag"
    );
    assert_eq!(
        got.lsn,
        lsn(&exp["lsn"]),
        "message LSN = what pg_logical_emit_message returned"
    );
    assert_eq!(at, got.lsn, "XLogData wal_start of a message = its LSN");
    if got.prefix == fact::DEFAULT_PREFIX.as_bytes() {
        let decoded = fact::decode(got.content.clone()).expect("fact envelope decodes");
        assert_eq!(decoded, fact_from_json(&exp["fact"]), "fact");
    } else {
        assert_eq!(
            got.content,
            b64(&exp["content_b64"]),
            "content of a non-fact message"
        );
    }
}

fn row(v: &Value) -> Vec<Option<String>> {
    v.as_array()
        .expect("row array")
        .iter()
        .map(|c| c.as_str().map(str::to_owned))
        .collect()
}

fn text(v: &[Option<String>]) -> Vec<TupleValue> {
    v.iter()
        .map(|c| match c {
            Some(s) => TupleValue::Text(Bytes::copy_from_slice(s.as_bytes())),
            None => TupleValue::Null,
        })
        .collect()
}

/// Columns pgoutput flags as part of the replica identity, from the catalog
/// as recorded: the primary key for `DEFAULT`, every column for `FULL`.
fn key_columns(rel: &Value) -> Vec<bool> {
    let full = rel["relreplident"] == "f";
    rel["columns"]
        .as_array()
        .expect("columns")
        .iter()
        .map(|c| full || c["primary_key"].as_bool().unwrap())
        .collect()
}

/// The old tuple pgoutput sends for a row: the whole row for `FULL`, else
/// the key with every other column null.
fn old_tuple(rel: &Value, old: &[Option<String>]) -> OldTuple {
    if rel["relreplident"] == "f" {
        return OldTuple::Full(text(old));
    }
    let keyed: Vec<Option<String>> = old
        .iter()
        .zip(key_columns(rel))
        .map(|(v, k)| if k { v.clone() } else { None })
        .collect();
    OldTuple::Key(text(&keyed))
}

/// A row change against the rows the SQL side got back from `RETURNING`.
fn check_change(exp: &Value, got: &PgOutput, relations: &Value) {
    let rel_of = |name: &Value| -> (&Value, u32) {
        let rel = &relations[name.as_str().expect("relation name")];
        (
            rel,
            u32::try_from(rel["oid"].as_u64().expect("oid")).expect("oid fits u32"),
        )
    };
    match (exp["op"].as_str().expect("op"), got) {
        ("insert", PgOutput::Insert(i)) => {
            let (_, oid) = rel_of(&exp["relation"]);
            assert_eq!(i.relation_id, oid);
            assert_eq!(i.new, text(&row(&exp["new"])));
        }
        ("update", PgOutput::Update(u)) => {
            let (rel, oid) = rel_of(&exp["relation"]);
            assert_eq!(u.relation_id, oid);
            let (old, new) = (row(&exp["old"]), row(&exp["new"]));
            let key_changed = key_columns(rel)
                .iter()
                .zip(old.iter().zip(&new))
                .any(|(k, (o, n))| *k && o != n);
            let want_old = if rel["relreplident"] == "f" || key_changed {
                Some(old_tuple(rel, &old))
            } else {
                None
            };
            assert_eq!(u.old, want_old, "old tuple");
            let unchanged: Vec<&str> = exp["unchanged_toast_columns"]
                .as_array()
                .map(|a| a.iter().map(|c| c.as_str().unwrap()).collect())
                .unwrap_or_default();
            let mut want_new = text(&new);
            for (i, c) in rel["columns"].as_array().unwrap().iter().enumerate() {
                if unchanged.contains(&c["name"].as_str().unwrap()) {
                    want_new[i] = TupleValue::UnchangedToast;
                }
            }
            assert_eq!(u.new, want_new, "new tuple");
        }
        ("delete", PgOutput::Delete(d)) => {
            let (rel, oid) = rel_of(&exp["relation"]);
            assert_eq!(d.relation_id, oid);
            assert_eq!(d.old, old_tuple(rel, &row(&exp["old"])));
        }
        ("truncate", PgOutput::Truncate(t)) => {
            let oids: Vec<u32> = exp["relations"]
                .as_array()
                .unwrap()
                .iter()
                .map(|n| rel_of(n).1)
                .collect();
            assert_eq!(t.relation_ids, oids);
            let mut options = 0;
            if exp["cascade"] == true {
                options |= Truncate::CASCADE;
            }
            if exp["restart_identity"] == true {
                options |= Truncate::RESTART_IDENTITY;
            }
            assert_eq!(t.options, options);
        }
        (op, got) => panic!("expected {op}, got {got:?}"),
    }
}

/// A Relation message against the catalog rows recorded at emit time.
fn check_relation(r: &Relation, relations: &Value) {
    let name = std::str::from_utf8(&r.name).expect("UTF-8 relation name");
    let exp = &relations[name];
    assert!(exp.is_object(), "Relation {name} was not recorded");
    assert_eq!(u64::from(r.relation_id), exp["oid"].as_u64().unwrap());
    assert_eq!(r.namespace, string(&exp["namespace"]).as_bytes());
    assert_eq!(
        r.replica_identity,
        string(&exp["relreplident"]).as_bytes()[0]
    );
    let want: Vec<Column> = exp["columns"]
        .as_array()
        .unwrap()
        .iter()
        .zip(key_columns(exp))
        .map(|(c, key)| Column {
            flags: if key { Column::FLAG_KEY } else { 0 },
            name: Bytes::from(string(&c["name"])),
            type_oid: u32::try_from(c["type_oid"].as_u64().unwrap()).unwrap(),
            type_modifier: i32::try_from(c["type_modifier"].as_i64().unwrap()).unwrap(),
        })
        .collect();
    assert_eq!(r.columns, want, "columns of {name}");
}

/// The expected units: the recorded stream without the transactions that
/// sent nothing (PostgreSQL 15's pgoutput skips empty transactions: no
/// Begin, no Commit).
fn expected_units(f: &Fixture) -> Vec<&Value> {
    f.expected["stream"]
        .as_array()
        .expect("stream")
        .iter()
        .filter(|u| u["kind"] == "message" || !u["items"].as_array().unwrap().is_empty())
        .collect()
}

/// Decodes a fixture and checks it unit by unit against what was emitted.
fn check(f: &Fixture) -> Vec<Unit> {
    let (units, relations) = group(decode(f));
    let exp_units = expected_units(f);
    assert_eq!(
        units.len(),
        exp_units.len(),
        "{}: units in the stream",
        f.name
    );
    let exp_relations = &f.expected["relations"];
    for (i, (unit, exp)) in units.iter().zip(&exp_units).enumerate() {
        match unit {
            Unit::Standalone(m, at) => {
                assert_eq!(exp["kind"], "message", "{}: unit {i}", f.name);
                check_message(exp, m, *at);
            }
            Unit::Tx(tx) => {
                assert_eq!(exp["kind"], "transaction", "{}: unit {i}", f.name);
                let xid = exp["xid"].as_u64().unwrap();
                assert_eq!(u64::from(tx.begin.xid), xid & 0xFFFF_FFFF, "Begin xid");
                let items = exp["items"].as_array().unwrap();
                assert_eq!(
                    tx.items.len(),
                    items.len(),
                    "{}: items of xid {xid}",
                    f.name
                );
                for (d, e) in tx.items.iter().zip(items) {
                    match &d.msg {
                        PgOutput::Message(m) => {
                            assert_eq!(e["kind"], "message");
                            check_message(e, m, d.xlog.wal_start);
                        }
                        change => {
                            assert_eq!(e["kind"], "change");
                            check_change(e, change, exp_relations);
                        }
                    }
                }
                // A change always follows a Relation for its table.
                for d in &tx.items {
                    let rel_id = match &d.msg {
                        PgOutput::Insert(x) => x.relation_id,
                        PgOutput::Update(x) => x.relation_id,
                        PgOutput::Delete(x) => x.relation_id,
                        _ => continue,
                    };
                    assert!(
                        relations
                            .iter()
                            .any(|(u, r)| *u <= i && r.relation_id == rel_id),
                        "change on relation {rel_id} without a Relation message"
                    );
                }
            }
        }
    }
    for (_, r) in &relations {
        check_relation(r, exp_relations);
    }
    units
}

/// Every fact id in the expected stream, in order.
fn expected_fact_ids(f: &Fixture) -> Vec<String> {
    let mut ids = Vec::new();
    for u in expected_units(f) {
        let msgs: Vec<&Value> = if u["kind"] == "message" {
            vec![u]
        } else {
            u["items"].as_array().unwrap().iter().collect()
        };
        for m in msgs {
            if m["prefix"] == fact::DEFAULT_PREFIX {
                ids.push(string(&m["fact"]["id"]));
            }
        }
    }
    ids
}

/// Every fact in the stream, decoded, in stream order.
fn stream_facts(units: &[Unit]) -> Vec<Fact> {
    let mut out = Vec::new();
    let mut push = |m: &LogicalMessage| {
        if m.prefix == fact::DEFAULT_PREFIX.as_bytes() {
            out.push(fact::decode(m.content.clone()).unwrap());
        }
    };
    for u in units {
        match u {
            Unit::Standalone(m, _) => push(m),
            Unit::Tx(tx) => {
                for d in &tx.items {
                    if let PgOutput::Message(m) = &d.msg {
                        push(m);
                    }
                }
            }
        }
    }
    out
}

#[test]
fn fixtures_come_from_postgresql_15() {
    for f in all() {
        let num = string(&f.expected["server_version_num"]);
        assert!(
            num.starts_with("15"),
            "{}: server_version_num {num}",
            f.name
        );
        assert_eq!(f.expected["scenario"], f.name);
        assert!(!f.stream.is_empty());
    }
}

#[test]
fn frames_are_the_same_whatever_the_read_size() {
    for f in all() {
        let whole = cut(&f.stream, f.stream.len());
        assert!(!whole.is_empty());
        // The frames cover the stream exactly: 5 header bytes each.
        let covered: usize = whole.iter().map(|b| b.len() + 5).sum();
        assert_eq!(covered, f.stream.len(), "{}", f.name);
        for chunk in [1, 7, 4096, 65_536] {
            assert_eq!(
                cut(&f.stream, chunk),
                whole,
                "{}: fed {chunk} bytes at a time",
                f.name
            );
        }
    }
}

#[test]
fn single_fact_matches_what_was_emitted() {
    let f = fixture("single_fact");
    let units = check(&f);
    assert_eq!(units.len(), 1);
    let facts = stream_facts(&units);
    assert_eq!(facts.len(), 1);
    assert_eq!(facts[0].aggregate_type, "order");
    assert_eq!(&facts[0].payload[..], br#"{"total":42}"#);
}

#[test]
fn mixed_matches_what_was_emitted() {
    let f = fixture("mixed");
    let units = check(&f);

    // Facts: same ids, same order; three transactions of three facts and two
    // standalone facts.
    let facts = stream_facts(&units);
    let ids: Vec<String> = facts.iter().map(|x| x.id.clone()).collect();
    assert_eq!(ids, expected_fact_ids(&f));
    assert_eq!(ids.len(), 11);
    let tx_sizes: Vec<usize> = units
        .iter()
        .filter_map(|u| match u {
            Unit::Tx(tx) => Some(
                tx.items
                    .iter()
                    .filter(|d| matches!(&d.msg, PgOutput::Message(m) if m.prefix == "factlib"))
                    .count(),
            ),
            Unit::Standalone(..) => None,
        })
        .collect();
    assert_eq!(tx_sizes, [3, 3, 3]);

    // Rolled-back facts are absent; the non-transactional message written
    // inside the rolled-back transaction is not.
    let rolled_back = f.expected["rolled_back"].as_array().unwrap();
    assert_eq!(rolled_back.len(), 1);
    assert_eq!(rolled_back[0]["end_record"]["type"], "ABORT");
    for m in rolled_back[0]["items"].as_array().unwrap() {
        assert!(
            !ids.contains(&string(&m["fact"]["id"])),
            "rolled-back fact in the stream"
        );
    }
    let others: Vec<(bool, &[u8])> = units
        .iter()
        .flat_map(|u| match u {
            Unit::Standalone(m, _) => vec![m],
            Unit::Tx(tx) => tx
                .items
                .iter()
                .filter_map(|d| match &d.msg {
                    PgOutput::Message(m) => Some(m),
                    _ => None,
                })
                .collect(),
        })
        .filter(|m| m.prefix == "other")
        .map(|m| (m.transactional, &m.content[..]))
        .collect();
    assert_eq!(
        others,
        [
            (true, &b"other, transactional"[..]),
            (
                false,
                b"other, non-transactional, inside a rolled-back transaction"
            ),
            (false, b"other, non-transactional, standalone"),
        ]
    );

    // The binary (non-UTF-8) payload and its metadata came through intact.
    let binary = facts
        .iter()
        .find(|x| x.event_type == "file.uploaded")
        .unwrap();
    assert!(std::str::from_utf8(&binary.payload).is_err());
    assert_eq!(binary.metadata["tenant"], "acme");
    assert!(binary.trace_info.is_some());

    // The transaction that only wrote to an unpublished table sent nothing.
    let all_txs = f.expected["stream"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|u| u["kind"] == "transaction")
        .count();
    assert_eq!(all_txs, 4, "three with facts, one empty");
}

/// Stream order is commit order: a non-transactional message written in the
/// middle of a transaction is sent before that transaction's Begin, so a
/// message LSN can be lower than one sent before it. Only commit positions
/// are monotonic.
#[test]
fn stream_order_is_commit_order_not_message_lsn_order() {
    let units = check(&fixture("mixed"));
    let clock2 = units
        .iter()
        .position(|u| matches!(u, Unit::Standalone(m, _) if fact::decode(m.content.clone()).is_ok_and(|x| x.aggregate_id == "c-2")))
        .expect("standalone fact c-2");
    let Unit::Standalone(standalone, _) = &units[clock2] else {
        unreachable!()
    };
    let Unit::Tx(next) = &units[clock2 + 1] else {
        panic!("c-2 should be followed by the transaction it was written in");
    };
    let PgOutput::Message(first) = &next.items[0].msg else {
        panic!("message expected")
    };
    assert!(
        first.lsn < standalone.lsn,
        "the transaction's first fact is older in the WAL"
    );
    assert!(standalone.lsn < next.commit.commit_lsn);
}

#[test]
fn large_payload_is_exact_and_zero_copy() {
    let f = fixture("large");
    let units = check(&f);
    let [Unit::Tx(tx)] = &units[..] else {
        panic!("one transaction expected")
    };
    let [d] = &tx.items[..] else {
        panic!("one message expected")
    };
    // One CopyData frame carries the whole message.
    assert!(
        d.frame.len() > 200 * 1024,
        "frame is {} bytes",
        d.frame.len()
    );
    let PgOutput::Message(m) = &d.msg else {
        panic!("message expected")
    };
    let fact = fact::decode(m.content.clone()).unwrap();
    assert_eq!(fact.payload.len(), 200 * 1024);
    let exp = &expected_units(&f)[0]["items"][0]["fact"];
    assert_eq!(&fact.payload[..], &b64(&exp["payload_b64"])[..]);
    // The payload points into the frame cut from the read buffer.
    let frame = d.frame.as_ptr() as usize..d.frame.as_ptr() as usize + d.frame.len();
    let payload = fact.payload.as_ptr() as usize;
    assert!(frame.contains(&payload) && frame.contains(&(payload + fact.payload.len() - 1)));
}

#[test]
fn tables_yield_relation_insert_update_delete_truncate() {
    let f = fixture("tables");
    let units = check(&f);
    let [Unit::Tx(tx)] = &units[..] else {
        panic!("one transaction expected")
    };
    let tags: String = tx.items.iter().map(|d| char::from(d.msg.tag())).collect();
    assert_eq!(tags, "IIIUUDUMT");

    let rel_t = f.expected["relations"]["fixture_t"]["oid"]
        .as_u64()
        .unwrap();
    let updates: Vec<_> = tx
        .items
        .iter()
        .filter_map(|d| match &d.msg {
            PgOutput::Update(u) => Some(u),
            _ => None,
        })
        .collect();
    // Key change under REPLICA IDENTITY DEFAULT: old key, other columns null.
    assert_eq!(
        updates[0].old,
        Some(OldTuple::Key(vec![
            TupleValue::Text(Bytes::from_static(b"1")),
            TupleValue::Null,
            TupleValue::Null
        ]))
    );
    assert_eq!(u64::from(updates[0].relation_id), rel_t);
    // Key unchanged: no old tuple; the untouched out-of-line value is not resent.
    assert_eq!(updates[1].old, None);
    assert_eq!(updates[1].new[2], TupleValue::UnchangedToast);
    // REPLICA IDENTITY FULL: the whole old row.
    assert!(
        matches!(&updates[2].old, Some(OldTuple::Full(row)) if row[1] == TupleValue::Text(Bytes::from_static(b"before")))
    );
    let Some(PgOutput::Delete(del)) = tx.items.iter().map(|d| &d.msg).find(|m| m.tag() == b'D')
    else {
        panic!("Delete expected")
    };
    assert_eq!(
        del.old,
        OldTuple::Key(vec![
            TupleValue::Text(Bytes::from_static(b"2")),
            TupleValue::Null,
            TupleValue::Null
        ])
    );

    // Relation messages carry no WAL position; fixture_t is announced again
    // before the Truncate (TRUNCATE invalidates pgoutput's relation cache).
    let relations: Vec<(String, Lsn)> = decode(&f)
        .into_iter()
        .filter_map(|d| match d.msg {
            PgOutput::Relation(r) => Some((
                String::from_utf8(r.name.to_vec()).unwrap(),
                d.xlog.wal_start,
            )),
            _ => None,
        })
        .collect();
    assert_eq!(
        relations,
        [
            ("fixture_t".to_owned(), Lsn::INVALID),
            ("fixture_full".to_owned(), Lsn::INVALID),
            ("fixture_t".to_owned(), Lsn::INVALID),
        ]
    );
}

#[test]
fn begin_commit_pair_and_commit_positions_increase() {
    for f in all() {
        let units = check(&f);
        let mut last_end = Lsn::INVALID;
        for u in &units {
            let Unit::Tx(tx) = u else { continue };
            let name = f.name;
            assert_eq!(
                tx.begin.final_lsn, tx.commit.commit_lsn,
                "{name}: Begin.final_lsn"
            );
            assert_eq!(
                tx.begin.commit_ts, tx.commit.commit_ts,
                "{name}: commit timestamps"
            );
            assert!(
                tx.commit.end_lsn > tx.commit.commit_lsn,
                "{name}: end_lsn after commit_lsn"
            );
            assert!(
                tx.commit.commit_lsn >= last_end,
                "{name}: commits in WAL order"
            );
            last_end = tx.commit.end_lsn;
            // XLogData positions: Begin at its first sent change, Commit at end_lsn.
            assert_eq!(
                tx.begin_at, tx.items[0].xlog.wal_start,
                "{name}: Begin wal_start"
            );
            assert_eq!(tx.commit_at, tx.commit.end_lsn, "{name}: Commit wal_start");
            for d in &tx.items {
                assert!(
                    d.xlog.wal_start <= tx.commit.commit_lsn,
                    "{name}: change after commit"
                );
            }
        }
        // For logical replication the walsender sends wal_end = wal_start.
        for d in decode(&f) {
            assert_eq!(
                d.xlog.wal_end, d.xlog.wal_start,
                "{}: XLogData wal_end",
                f.name
            );
        }
    }
}

/// The LSN pgoutput reports for a logical message is the value
/// `pg_logical_emit_message` returned, which is the END of the message's WAL
/// record (where the next record starts), not its start. For the last
/// message of a transaction that is exactly the commit record's start.
#[test]
fn message_lsn_is_the_end_of_its_wal_record() {
    let mut checked = 0;
    for f in all() {
        if f.expected["wal_records_from"] != "pg_walinspect" {
            continue;
        }
        let units = check(&f);
        for u in expected_units(&f) {
            let msgs: Vec<&Value> = if u["kind"] == "message" {
                vec![u]
            } else {
                let end = &u["end_record"];
                assert_eq!(end["type"], "COMMIT");
                let tx = tx_by_xid(&units, u["xid"].as_u64().unwrap());
                assert_eq!(
                    tx.commit.commit_lsn,
                    lsn(&end["start"]),
                    "{}: commit_lsn = commit record start",
                    f.name
                );
                assert_eq!(
                    tx.commit.end_lsn,
                    lsn(&end["end"]),
                    "{}: end_lsn = commit record end",
                    f.name
                );
                u["items"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .filter(|i| i["kind"] == "message")
                    .collect()
            };
            for m in msgs {
                // check() already asserted stream LSN == returned LSN.
                let (start, end) = (lsn(&m["wal_record"]["start"]), lsn(&m["wal_record"]["end"]));
                assert_eq!(
                    lsn(&m["lsn"]),
                    end,
                    "{}: reported LSN is the record's end",
                    f.name
                );
                assert!(start < end);
                checked += 1;
            }
        }
    }
    assert!(
        checked >= 15,
        "only {checked} messages had WAL record positions"
    );

    // The single fact's record ends where its commit record starts.
    let f = fixture("single_fact");
    let units = check(&f);
    let Unit::Tx(tx) = &units[0] else { panic!() };
    let PgOutput::Message(m) = &tx.items[0].msg else {
        panic!()
    };
    assert_eq!(m.lsn, tx.commit.commit_lsn);
}

fn tx_by_xid(units: &[Unit], xid: u64) -> &Tx {
    units
        .iter()
        .find_map(|u| match u {
            Unit::Tx(tx) if u64::from(tx.begin.xid) == xid & 0xFFFF_FFFF => Some(tx),
            _ => None,
        })
        .unwrap_or_else(|| panic!("xid {xid} not in the stream"))
}

/// Keepalives in the captures parse, and carry the position the slot was
/// created at or later.
#[test]
fn keepalives_parse() {
    let mut seen = 0;
    for f in all() {
        let consistent = lsn(&f.expected["slot_consistent_point"]);
        for frame in cut(&f.stream, f.stream.len()) {
            if let ReplicationMessage::Keepalive(k) = ReplicationMessage::parse(frame).unwrap() {
                assert!(k.wal_end >= consistent, "{}", f.name);
                seen += 1;
            }
        }
    }
    assert!(seen > 0);
}

/// Row changes, unlike messages, are positioned at the START of their WAL
/// record (checked against the Heap records `pg_walinspect` listed for the
/// capture's transactions).
#[test]
fn row_change_position_is_the_start_of_its_wal_record() {
    let f = fixture("tables");
    assert_eq!(f.expected["wal_records_from"], "pg_walinspect");
    let heap: Vec<(Lsn, Lsn, String)> = f.expected["heap_records"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (lsn(&r["start"]), lsn(&r["end"]), string(&r["type"])))
        .collect();
    let mut checked = 0;
    for d in decode(&f) {
        let kind = match d.msg.tag() {
            b'I' => "INSERT",
            b'U' => "UPDATE",
            b'D' => "DELETE",
            b'T' => "TRUNCATE",
            _ => continue,
        };
        let at = d.xlog.wal_start;
        let (_, end, t) = heap
            .iter()
            .find(|(start, ..)| *start == at)
            .unwrap_or_else(|| panic!("no Heap record starts at {at} ({kind})"));
        assert!(t.contains(kind), "{kind} at {at} is a {t} record");
        assert!(*end > at);
        checked += 1;
    }
    assert_eq!(checked, 8);
}
