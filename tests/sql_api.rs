//! The SQL emitter API (`factlib.emit`, `factlib.emit_json`,
//! `factlib.emit_traced`, installed by `factlib setup`) against the real
//! PostgreSQL, and end to end through the relay into Kafka.
//!
//! ```text
//!  SELECT factlib.emit(…) ──WAL──► pgoutput slot (pg_logical_slot_get_binary_changes)
//!      ──'M' message content──► factlib::fact::decode == the arguments given
//!                           └─► the Go Factlib's OutboxEvent (prost, below) == the same
//!                           └─► factlib::fact::encode(decoded) == the same bytes
//! ```

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use bytes::Bytes;
use common::*;
use factlib::fact::{self, Fact, TraceInfo};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};

/// The Go Factlib's `OutboxEvent` (github.com/fampay-inc/factlib,
/// pkg/proto/outbox.proto), field for field.
#[derive(Clone, PartialEq, prost::Message)]
struct GoOutboxEvent {
    #[prost(string, tag = "1")]
    id: String,
    #[prost(string, tag = "2")]
    aggregate_type: String,
    #[prost(string, tag = "3")]
    aggregate_id: String,
    #[prost(string, tag = "4")]
    event_type: String,
    #[prost(bytes = "vec", tag = "5")]
    payload: Vec<u8>,
    #[prost(int64, tag = "6")]
    created_at: i64,
    #[prost(btree_map = "string, string", tag = "7")]
    metadata: BTreeMap<String, String>,
    #[prost(message, optional, tag = "8")]
    trace_info: Option<GoTraceInfo>,
}

/// The Go Factlib's `TraceInfo`.
#[derive(Clone, PartialEq, prost::Message)]
struct GoTraceInfo {
    #[prost(string, tag = "1")]
    trace_id: String,
    #[prost(string, tag = "2")]
    span_id: String,
    #[prost(btree_map = "string, string", tag = "3")]
    metadata: BTreeMap<String, String>,
}

/// The payload of a case: bytes for `factlib.emit(_traced)`, or JSON text
/// for `factlib.emit_json`.
#[derive(Debug, Clone)]
enum Payload {
    Bytes(Vec<u8>),
    Json(String),
}

/// One call of the SQL API.
#[derive(Debug, Clone)]
struct Case {
    aggregate_type: String,
    aggregate_id: String,
    event_type: String,
    payload: Payload,
    metadata: BTreeMap<String, String>,
    /// `factlib.emit_traced` with (trace_id, span_id, trace_metadata).
    trace: Option<(String, String, BTreeMap<String, String>)>,
}

/// What the server returned for one case.
struct Emitted {
    id: String,
    /// `clock_timestamp()` right before and after the call, Unix µs.
    before_us: i64,
    after_us: i64,
    /// The payload the server must have written (for JSON: its jsonb text).
    payload: Vec<u8>,
}

/// A messages-only publication and a pgoutput slot, read with
/// `pg_logical_slot_get_binary_changes`.
struct Wal {
    slot: String,
    publication: String,
}

impl Wal {
    async fn new(tag: &str) -> Self {
        let (slot, publication) = (unique(tag), unique("pub"));
        setup(&slot, &publication).await;
        Wal { slot, publication }
    }

    /// Consumes the slot up to now; returns the content of every logical
    /// message under `prefix`, in WAL order.
    async fn messages(&self, prefix: &str) -> Vec<Bytes> {
        let c = sql().await;
        wait_wal_flushed(&c).await;
        let rows = c
            .query(
                "SELECT data FROM pg_logical_slot_get_binary_changes($1, NULL, NULL, \
                 'proto_version', '1', 'publication_names', $2, 'messages', 'true')",
                &[&self.slot, &self.publication],
            )
            .await
            .unwrap();
        rows.iter()
            .filter_map(|r| parse_message(r.get::<_, &[u8]>(0)))
            .filter(|(p, _)| p == prefix)
            .map(|(_, content)| content)
            .collect()
    }

    async fn drop(self) {
        teardown(&self.slot, &self.publication).await;
    }
}

/// A pgoutput `Message` ('M', flags, LSN, prefix\0, length, content):
/// (prefix, content); None for any other message.
fn parse_message(data: &[u8]) -> Option<(String, Bytes)> {
    let rest = data.strip_prefix(b"M")?;
    let rest = rest.get(1 + 8..)?;
    let nul = rest.iter().position(|&b| b == 0)?;
    let prefix = String::from_utf8(rest[..nul].to_vec()).ok()?;
    let rest = &rest[nul + 1..];
    let len = u32::from_be_bytes(rest.get(..4)?.try_into().ok()?) as usize;
    let content = rest.get(4..4 + len)?;
    assert_eq!(4 + len, rest.len(), "message length matches the row");
    Some((prefix, Bytes::copy_from_slice(content)))
}

fn json_object(m: &BTreeMap<String, String>) -> String {
    serde_json::to_string(m).unwrap()
}

/// Emits `cases` in one transaction and one statement (under `prefix`),
/// committed; returns what the server reported per case.
async fn emit_cases(prefix: &str, cases: &[Case]) -> Vec<Emitted> {
    let mut c = sql().await;
    let n = i32::try_from(cases.len()).unwrap();
    let idx: Vec<i32> = (0..n).collect();
    let at: Vec<&str> = cases.iter().map(|c| c.aggregate_type.as_str()).collect();
    let aid: Vec<&str> = cases.iter().map(|c| c.aggregate_id.as_str()).collect();
    let et: Vec<&str> = cases.iter().map(|c| c.event_type.as_str()).collect();
    let bytes: Vec<&[u8]> = cases
        .iter()
        .map(|c| match &c.payload {
            Payload::Bytes(b) => b.as_slice(),
            Payload::Json(_) => &[][..],
        })
        .collect();
    let json: Vec<Option<&str>> = cases
        .iter()
        .map(|c| match &c.payload {
            Payload::Bytes(_) => None,
            Payload::Json(j) => Some(j.as_str()),
        })
        .collect();
    let md: Vec<String> = cases.iter().map(|c| json_object(&c.metadata)).collect();
    let tid: Vec<Option<&str>> = cases
        .iter()
        .map(|c| c.trace.as_ref().map(|t| t.0.as_str()))
        .collect();
    let sid: Vec<Option<&str>> = cases
        .iter()
        .map(|c| c.trace.as_ref().map(|t| t.1.as_str()))
        .collect();
    let tmd: Vec<Option<String>> = cases
        .iter()
        .map(|c| c.trace.as_ref().map(|t| json_object(&t.2)))
        .collect();
    let tx = c.transaction().await.unwrap();
    // Target-list entries are evaluated in order: the clock readings
    // bracket the call.
    let rows = tx
        .query(
            "SELECT u.i,
                    (extract(epoch FROM clock_timestamp()) * 1000000)::int8,
                    (CASE WHEN u.j IS NOT NULL
                            THEN factlib.emit_json(u.at, u.aid, u.et, u.j::jsonb, u.md::jsonb, $11)
                          WHEN u.tid IS NULL
                            THEN factlib.emit(u.at, u.aid, u.et, u.p, u.md::jsonb, $11)
                          ELSE factlib.emit_traced(u.at, u.aid, u.et, u.p, u.tid, u.sid,
                                                   u.md::jsonb, u.tmd::jsonb, $11)
                     END)::text,
                    (extract(epoch FROM clock_timestamp()) * 1000000)::int8,
                    CASE WHEN u.j IS NOT NULL THEN convert_to(u.j::jsonb::text, 'UTF8') ELSE u.p END
               FROM unnest($1::int4[], $2::text[], $3::text[], $4::text[], $5::bytea[],
                           $6::text[], $7::text[], $8::text[], $9::text[], $10::text[])
                    AS u(i, at, aid, et, p, j, md, tid, sid, tmd)",
            &[
                &idx, &at, &aid, &et, &bytes, &json, &md, &tid, &sid, &tmd, &prefix,
            ],
        )
        .await
        .unwrap();
    tx.commit().await.unwrap();
    let mut out: Vec<Option<Emitted>> = (0..cases.len()).map(|_| None).collect();
    for r in rows {
        let i = usize::try_from(r.get::<_, i32>(0)).unwrap();
        out[i] = Some(Emitted {
            before_us: r.get(1),
            id: r.get(2),
            after_us: r.get(3),
            payload: r.get(4),
        });
    }
    out.into_iter()
        .map(|e| e.expect("a row per case"))
        .collect()
}

/// Checks one message against its case: factlib's decoder, the Go field
/// numbers, prost's canonical encoding, the UUIDv7 and the clock.
fn check(case: &Case, got: &Emitted, content: &Bytes) -> Result<(), String> {
    let f = fact::decode(content.clone()).map_err(|e| e.to_string())?;
    let view = fact::decode_view(content.clone()).map_err(|e| e.to_string())?;
    let want_trace = case.trace.as_ref().map(|(t, s, m)| TraceInfo {
        trace_id: t.clone(),
        span_id: s.clone(),
        metadata: m.clone(),
    });
    let want = Fact {
        id: got.id.clone(),
        aggregate_type: case.aggregate_type.clone(),
        aggregate_id: case.aggregate_id.clone(),
        event_type: case.event_type.clone(),
        payload: Bytes::from(got.payload.clone()),
        created_at: f.created_at,
        metadata: case.metadata.clone(),
        trace_info: want_trace.clone(),
    };
    if f != want {
        return Err(format!(
            "decoded fact differs:\n got {:?}\nwant {:?}",
            short(&f),
            short(&want)
        ));
    }
    if let Payload::Bytes(b) = &case.payload {
        if &got.payload != b {
            return Err("the server's payload is not the one passed".into());
        }
    }
    if let Payload::Json(j) = &case.payload {
        let sent: serde_json::Value = serde_json::from_str(j).unwrap();
        let written: serde_json::Value =
            serde_json::from_slice(&f.payload).map_err(|e| format!("payload is not JSON: {e}"))?;
        if sent != written {
            return Err(format!("JSON payload {written} != {sent}"));
        }
    }
    if view.id() != f.id || view.created_at() != f.created_at {
        return Err("decode_view disagrees with decode".into());
    }
    if fact::encode(&f) != content[..] {
        return Err("not byte-for-byte prost's encoding of the same fact".into());
    }
    let go = <GoOutboxEvent as prost::Message>::decode(content.clone())
        .map_err(|e| format!("Go OutboxEvent: {e}"))?;
    let go_want = GoOutboxEvent {
        id: want.id.clone(),
        aggregate_type: want.aggregate_type.clone(),
        aggregate_id: want.aggregate_id.clone(),
        event_type: want.event_type.clone(),
        payload: got.payload.clone(),
        created_at: f.created_at,
        metadata: want.metadata.clone(),
        trace_info: want_trace.map(|t| GoTraceInfo {
            trace_id: t.trace_id,
            span_id: t.span_id,
            metadata: t.metadata,
        }),
    };
    if go != go_want {
        return Err("the Go OutboxEvent decoding differs".into());
    }
    let id = uuid::Uuid::parse_str(&f.id).map_err(|e| format!("id {}: {e}", f.id))?;
    if id.get_version_num() != 7 || id.get_variant() != uuid::Variant::RFC4122 {
        return Err(format!("id {id} is not an RFC 9562 UUIDv7"));
    }
    if id.to_string() != f.id {
        return Err(format!("id {} is not in canonical lowercase form", f.id));
    }
    let (secs, nanos) = id.get_timestamp().unwrap().to_unix();
    let id_ms = i64::try_from(secs).unwrap() * 1000 + i64::from(nanos / 1_000_000);
    if id_ms != f.created_at.div_euclid(1_000_000) {
        return Err(format!(
            "id's time {id_ms} ms is not created_at {}",
            f.created_at
        ));
    }
    if !(got.before_us * 1000 <= f.created_at && f.created_at <= got.after_us * 1000) {
        return Err(format!(
            "created_at {} outside the call's window [{}, {}] µs",
            f.created_at, got.before_us, got.after_us
        ));
    }
    Ok(())
}

/// A fact for messages, without a 1 MiB payload in them.
fn short(f: &Fact) -> String {
    format!(
        "id={} type={:?} agg={:?} event={:?} payload={} bytes created_at={} metadata={:?} trace={:?}",
        f.id,
        f.aggregate_type,
        f.aggregate_id,
        f.event_type,
        f.payload.len(),
        f.created_at,
        f.metadata,
        f.trace_info
    )
}

/// Emits `cases` under a fresh prefix, reads them back, checks each.
async fn round_trip(wal: &Wal, cases: &[Case]) -> Result<(), String> {
    let prefix = unique("p");
    let emitted = emit_cases(&prefix, cases).await;
    let messages = wal.messages(&prefix).await;
    if messages.len() != cases.len() {
        return Err(format!(
            "{} messages for {} calls",
            messages.len(),
            cases.len()
        ));
    }
    // Messages are in call order (one transaction, one statement); match
    // by id anyway, so the check does not rest on it.
    let mut by_id: BTreeMap<String, Bytes> = BTreeMap::new();
    for m in messages {
        let f = fact::decode(m.clone()).map_err(|e| e.to_string())?;
        if by_id.insert(f.id.clone(), m).is_some() {
            return Err(format!("id {} written twice", f.id));
        }
    }
    for (case, got) in cases.iter().zip(&emitted) {
        let content = by_id
            .get(&got.id)
            .ok_or_else(|| format!("no message with the returned id {}", got.id))?;
        check(case, got, content).map_err(|e| format!("{e}\ncase: {}", short_case(case)))?;
    }
    Ok(())
}

fn short_case(c: &Case) -> String {
    let payload = match &c.payload {
        Payload::Bytes(b) => format!("{} bytes", b.len()),
        Payload::Json(j) => format!("JSON {}", j.chars().take(80).collect::<String>()),
    };
    format!(
        "type={:?} agg={:?} event={:?} payload={payload} metadata={:?} trace={:?}",
        c.aggregate_type, c.aggregate_id, c.event_type, c.metadata, c.trace
    )
}

/// `len` pseudo-random bytes from `seed` (xorshift64*), for big payloads
/// that proptest need not generate or shrink byte by byte.
fn seeded_bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x >> 12;
            x ^= x << 25;
            x ^= x >> 27;
            (x.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 56) as u8
        })
        .collect()
}

const MIB: usize = 1 << 20;

fn text(min: usize, max: usize) -> impl Strategy<Value = String> {
    // Any Unicode scalar but control characters (PostgreSQL text holds no
    // NUL); ASCII often, so that short and empty strings are common too.
    prop_oneof![
        proptest::string::string_regex(&format!("\\PC{{{min},{max}}}")).unwrap(),
        proptest::string::string_regex(&format!("[a-z0-9._-]{{{min},{max}}}")).unwrap(),
    ]
}

fn string_map(max: usize) -> impl Strategy<Value = BTreeMap<String, String>> {
    prop_oneof![
        3 => Just(BTreeMap::new()),
        3 => proptest::collection::btree_map(text(0, 12), text(0, 24), 1..4),
        1 => proptest::collection::btree_map(text(0, 20), text(0, 40), 0..=max),
    ]
}

fn hex_id(len: usize) -> impl Strategy<Value = String> {
    proptest::string::string_regex(&format!("[0-9a-f]{{{len}}}"))
        .unwrap()
        .prop_filter("not all zero", |s| s.bytes().any(|b| b != b'0'))
}

fn payload() -> impl Strategy<Value = Payload> {
    prop_oneof![
        40 => proptest::collection::vec(any::<u8>(), 0..300).prop_map(Payload::Bytes),
        10 => Just(Payload::Bytes(Vec::new())),
        // Around the one-, two- and three-byte length varints.
        5 => (16_000usize..16_800).prop_map(|n| Payload::Bytes(seeded_bytes(n as u64, n))),
        // 1 MiB: a few per run.
        1 => any::<u64>().prop_map(|s| Payload::Bytes(seeded_bytes(s, MIB))),
        15 => proptest::collection::btree_map(text(0, 10), text(0, 30), 0..5)
            .prop_map(|m| Payload::Json(serde_json::to_string(&m).unwrap())),
        2 => text(0, 30).prop_map(|s| Payload::Json(serde_json::to_string(&s).unwrap())),
    ]
}

fn case() -> impl Strategy<Value = Case> {
    let trace = (
        hex_id(32),
        hex_id(16),
        prop_oneof![
            Just(BTreeMap::new()),
            ("[0-9a-f]{2}", text(0, 30)).prop_map(|(flags, state)| BTreeMap::from([
                ("traceflags".to_owned(), flags),
                ("tracestate".to_owned(), state),
            ])),
            string_map(5),
        ],
    );
    (
        text(1, 20),
        text(1, 40),
        text(1, 30),
        payload(),
        string_map(60),
        proptest::option::weighted(0.3, trace),
    )
        .prop_map(
            |(aggregate_type, aggregate_id, event_type, payload, metadata, trace)| {
                // emit_json has no trace variant.
                let trace = match payload {
                    Payload::Json(_) => None,
                    Payload::Bytes(_) => trace,
                };
                Case {
                    aggregate_type,
                    aggregate_id,
                    event_type,
                    payload,
                    metadata,
                    trace,
                }
            },
        )
}

/// 12 batches of 100 random calls (1,200 facts), each batch one statement
/// in one transaction, read back from the WAL and checked field by field.
#[test]
fn random_facts_round_trip_through_the_wal() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let wal = rt.block_on(Wal::new("sqlprop"));
    let mut runner = TestRunner::new(Config {
        cases: 12,
        max_shrink_iters: 200,
        ..Config::default()
    });
    let result = runner.run(&proptest::collection::vec(case(), 100..=100), |cases| {
        rt.block_on(round_trip(&wal, &cases))
            .map_err(TestCaseError::fail)
    });
    rt.block_on(wal.drop());
    if let Err(e) = result {
        panic!("{e}");
    }
}

fn bytes_case(payload: Vec<u8>) -> Case {
    Case {
        aggregate_type: "order".into(),
        aggregate_id: "o-1".into(),
        event_type: "order.placed".into(),
        payload: Payload::Bytes(payload),
        metadata: BTreeMap::new(),
        trace: None,
    }
}

/// The edges, every run: empty and 1 MiB payloads, each varint length
/// boundary, 500 metadata keys, empty keys and values, characters outside
/// the BMP, JSON scalars, trace context with flags and state.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edge_cases_round_trip() {
    let wal = Wal::new("sqledge").await;
    let mut cases = vec![
        bytes_case(Vec::new()),
        bytes_case(seeded_bytes(1, MIB)),
        bytes_case(seeded_bytes(2, MIB)),
        bytes_case(vec![0u8; MIB]),
    ];
    for n in [1, 127, 128, 16_383, 16_384, 2_097_151, 2_097_152] {
        cases.push(bytes_case(seeded_bytes(n as u64, n)));
    }
    let many: BTreeMap<String, String> = (0..500)
        .map(|i| (format!("k{i:03}"), format!("v{i}")))
        .collect();
    cases.push(Case {
        metadata: many,
        ..bytes_case(b"x".to_vec())
    });
    cases.push(Case {
        aggregate_type: "𝔬𝔯𝔡𝔢𝔯".into(),
        aggregate_id: "ключ-🔑".into(),
        event_type: "e\u{301}vénement.注文".into(),
        metadata: BTreeMap::from([
            (String::new(), "empty key".into()),
            ("empty value".into(), String::new()),
            ("é".into(), "e\u{301}".into()),
            // jsonb orders keys by length first ("b" before "aa"); prost
            // by bytes ("aa" before "b").
            ("b".into(), "short".into()),
            ("aa".into(), "long".into()),
        ]),
        ..bytes_case("🙂".as_bytes().to_vec())
    });
    for j in [
        "null",
        "\"\"",
        "0",
        "[]",
        "{}",
        "{\"b\": [1, 2.5, true], \"a\": {\"é\": null}}",
    ] {
        cases.push(Case {
            payload: Payload::Json(j.into()),
            ..bytes_case(Vec::new())
        });
    }
    cases.push(Case {
        trace: Some((
            "4bf92f3577b34da6a3ce929d0e0e4736".into(),
            "00f067aa0ba902b7".into(),
            BTreeMap::from([
                ("traceflags".into(), "00".into()),
                ("tracestate".into(), "vendor=v1,other=o2".into()),
            ]),
        )),
        ..bytes_case(b"{}".to_vec())
    });
    cases.push(Case {
        trace: Some((
            "0000000000000000000000000000000f".into(),
            "000000000000000f".into(),
            BTreeMap::new(),
        )),
        ..bytes_case(Vec::new())
    });
    round_trip(&wal, &cases).await.unwrap();
    wal.drop().await;
}

/// A fact in a rolled-back transaction, or a rolled-back savepoint, never
/// reaches the WAL stream; the committed ones around it do.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rolled_back_facts_never_appear() {
    let wal = Wal::new("sqlrb").await;
    let prefix = unique("p");
    let mut c = sql().await;
    let emit = "SELECT factlib.emit('order', $1, 'order.placed', '\\x'::bytea, '{}', $2)::text";
    let id = |r: tokio_postgres::Row| r.get::<_, String>(0);

    let tx = c.transaction().await.unwrap();
    let gone1 = id(tx.query_one(emit, &[&"gone-1", &prefix]).await.unwrap());
    tx.rollback().await.unwrap();

    let mut tx = c.transaction().await.unwrap();
    let kept1 = id(tx.query_one(emit, &[&"kept-1", &prefix]).await.unwrap());
    let sp = tx.savepoint("sp").await.unwrap();
    let gone2 = id(sp.query_one(emit, &[&"gone-2", &prefix]).await.unwrap());
    sp.rollback().await.unwrap();
    let kept2 = id(tx.query_one(emit, &[&"kept-2", &prefix]).await.unwrap());
    tx.commit().await.unwrap();

    let tx = c.transaction().await.unwrap();
    let gone3 = id(tx.query_one(emit, &[&"gone-3", &prefix]).await.unwrap());
    drop(tx); // rolled back on drop

    let got: Vec<String> = wal
        .messages(&prefix)
        .await
        .into_iter()
        .map(|m| fact::decode(m).unwrap().id)
        .collect();
    assert_eq!(
        got,
        vec![kept1, kept2],
        "only the committed facts, in order"
    );
    for gone in [gone1, gone2, gone3] {
        assert!(!got.contains(&gone));
    }
    wal.drop().await;
}

/// Each bad argument raises SQLSTATE 22023 with a message naming it, and
/// emits nothing; a good call after them in a new transaction does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_arguments_raise_22023_and_emit_nothing() {
    let wal = Wal::new("sqlbad").await;
    let prefix = unique("p");
    let c = sql().await;
    let tid = "4bf92f3577b34da6a3ce929d0e0e4736";
    let sid = "00f067aa0ba902b7";
    // (call, expected message fragment)
    let cases: Vec<(String, &str)> = vec![
        (format!("factlib.emit(NULL, 'o-1', 'e', '\\x'::bytea, '{{}}', '{prefix}')"), "aggregate_type must be a non-empty string"),
        (format!("factlib.emit('', 'o-1', 'e', '\\x'::bytea, '{{}}', '{prefix}')"), "aggregate_type must be a non-empty string"),
        (format!("factlib.emit('order', NULL, 'e', '\\x'::bytea, '{{}}', '{prefix}')"), "aggregate_id must be a non-empty string"),
        (format!("factlib.emit('order', '', 'e', '\\x'::bytea, '{{}}', '{prefix}')"), "aggregate_id must be a non-empty string"),
        (format!("factlib.emit('order', 'o-1', NULL, '\\x'::bytea, '{{}}', '{prefix}')"), "event_type must be a non-empty string"),
        (format!("factlib.emit('order', 'o-1', '', '\\x'::bytea, '{{}}', '{prefix}')"), "event_type must be a non-empty string"),
        (format!("factlib.emit('order', 'o-1', 'e', NULL::bytea, '{{}}', '{prefix}')"), "payload must not be NULL"),
        (format!("factlib.emit_json('order', 'o-1', 'e', NULL::jsonb, '{{}}', '{prefix}')"), "payload must not be NULL"),
        ("factlib.emit('order', 'o-1', 'e', '\\x'::bytea, '{}', '')".into(), "prefix must be a non-empty string"),
        ("factlib.emit('order', 'o-1', 'e', '\\x'::bytea, '{}', NULL)".into(), "prefix must be a non-empty string"),
        (format!("factlib.emit('order', 'o-1', 'e', '\\x'::bytea, '[\"a\"]', '{prefix}')"), "metadata must be a JSON object of string values, not a JSON array"),
        (format!("factlib.emit('order', 'o-1', 'e', '\\x'::bytea, '\"s\"', '{prefix}')"), "metadata must be a JSON object of string values, not a JSON string"),
        (format!("factlib.emit('order', 'o-1', 'e', '\\x'::bytea, '{{\"a\": \"x\", \"n\": 1}}', '{prefix}')"), "metadata value for key \"n\" is a JSON number, but metadata values must be JSON strings"),
        (format!("factlib.emit_json('order', 'o-1', 'e', '{{}}', '{{\"o\": {{}}}}', '{prefix}')"), "metadata value for key \"o\" is a JSON object"),
        (format!("factlib.emit('order', 'o-1', 'e', '\\x'::bytea, '{{\"z\": null}}', '{prefix}')"), "metadata value for key \"z\" is a JSON null"),
        (format!("factlib.emit_traced('order', 'o-1', 'e', '\\x'::bytea, NULL, '{sid}', prefix => '{prefix}')"), "trace_id must be 32 lowercase hex digits, not all zero (a W3C trace-id); got NULL"),
        (format!("factlib.emit_traced('order', 'o-1', 'e', '\\x'::bytea, '{}', '{sid}', prefix => '{prefix}')", tid.to_uppercase()), "trace_id must be 32 lowercase hex digits"),
        (format!("factlib.emit_traced('order', 'o-1', 'e', '\\x'::bytea, '{}', '{sid}', prefix => '{prefix}')", &tid[1..]), "trace_id must be 32 lowercase hex digits"),
        (format!("factlib.emit_traced('order', 'o-1', 'e', '\\x'::bytea, '{}', '{sid}', prefix => '{prefix}')", "0".repeat(32)), "trace_id must be 32 lowercase hex digits, not all zero"),
        (format!("factlib.emit_traced('order', 'o-1', 'e', '\\x'::bytea, '{tid}', NULL, prefix => '{prefix}')"), "span_id must be 16 lowercase hex digits, not all zero (a W3C parent-id); got NULL"),
        (format!("factlib.emit_traced('order', 'o-1', 'e', '\\x'::bytea, '{tid}', '{}', prefix => '{prefix}')", "0".repeat(16)), "span_id must be 16 lowercase hex digits"),
        (format!("factlib.emit_traced('order', 'o-1', 'e', '\\x'::bytea, '{tid}', '00f067aa0ba902bg', prefix => '{prefix}')"), "span_id must be 16 lowercase hex digits"),
        (format!("factlib.emit_traced('order', 'o-1', 'e', '\\x'::bytea, '{tid}', '{sid}', trace_metadata => '{{\"traceflags\": 1}}', prefix => '{prefix}')"), "trace_metadata value for key \"traceflags\" is a JSON number"),
        (format!("factlib.emit_traced('order', 'o-1', 'e', '\\x'::bytea, '{tid}', '{sid}', trace_metadata => '[]', prefix => '{prefix}')"), "trace_metadata must be a JSON object"),
    ];
    for (call, want) in &cases {
        let err = c
            .query_one(&format!("SELECT {call}"), &[])
            .await
            .expect_err(call);
        let db = err
            .as_db_error()
            .unwrap_or_else(|| panic!("{call}: not a server error: {err}"));
        assert_eq!(db.code().code(), "22023", "{call}: {}", db.message());
        assert!(
            db.message().starts_with("factlib: ") && db.message().contains(want),
            "{call}: message {:?} lacks {want:?}",
            db.message()
        );
        assert!(db.hint().is_some(), "{call}: a hint says what to do");
    }
    let ok: String = c
        .query_one(
            "SELECT factlib.emit('order', 'o-1', 'e', '\\x'::bytea, prefix => $1)::text",
            &[&prefix],
        )
        .await
        .unwrap()
        .get(0);
    let got: Vec<String> = wal
        .messages(&prefix)
        .await
        .into_iter()
        .map(|m| fact::decode(m).unwrap().id)
        .collect();
    assert_eq!(got, vec![ok], "nothing from the bad calls");
    wal.drop().await;
}

/// An application role with LOGIN only (no REPLICATION, no superuser)
/// cannot reach the API before `GRANT USAGE ON SCHEMA factlib`, and emits
/// after it, through all three functions.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_app_role_emits_after_the_documented_grant() {
    let wal = Wal::new("sqlperm").await;
    let prefix = unique("p");
    let role = unique("app");
    let admin = sql().await;
    admin
        .batch_execute(&format!(
            "CREATE ROLE {role} LOGIN NOREPLICATION NOSUPERUSER PASSWORD 'app-secret'"
        ))
        .await
        .unwrap();
    let (mut app, conn) =
        tokio_postgres::connect(&url_for(&role, Some("app-secret")), tokio_postgres::NoTls)
            .await
            .expect("the app role logs in");
    tokio::spawn(conn);
    let attrs = app
        .query_one(
            "SELECT rolsuper, rolreplication FROM pg_roles WHERE rolname = current_user",
            &[],
        )
        .await
        .unwrap();
    assert_eq!((attrs.get(0), attrs.get(1)), (false, false));
    let call =
        "SELECT factlib.emit('order', 'o-1', 'order.placed', '\\x01'::bytea, '{}', $1)::text";
    let err = app.query_one(call, &[&prefix]).await.unwrap_err();
    let db = err.as_db_error().expect("a server error");
    assert_eq!(db.code().code(), "42501", "{}", db.message());
    assert!(
        db.message()
            .contains("permission denied for schema factlib"),
        "{}",
        db.message()
    );

    admin
        .batch_execute(&format!("GRANT USAGE ON SCHEMA factlib TO {role}"))
        .await
        .unwrap();
    let tx = app.transaction().await.unwrap();
    let a: String = tx.query_one(call, &[&prefix]).await.unwrap().get(0);
    let b: String = tx
        .query_one(
            "SELECT factlib.emit_json('order', 'o-2', 'order.placed', '{\"n\": 1}', '{}', $1)::text",
            &[&prefix],
        )
        .await
        .unwrap()
        .get(0);
    let t: String = tx
        .query_one(
            "SELECT factlib.emit_traced('order', 'o-3', 'order.placed', '\\x'::bytea, \
             '4bf92f3577b34da6a3ce929d0e0e4736', '00f067aa0ba902b7', prefix => $1)::text",
            &[&prefix],
        )
        .await
        .unwrap()
        .get(0);
    tx.commit().await.unwrap();
    let got: Vec<String> = wal
        .messages(&prefix)
        .await
        .into_iter()
        .map(|m| fact::decode(m).unwrap().id)
        .collect();
    assert_eq!(got, vec![a, b, t]);
    drop(app);
    admin
        .batch_execute(&format!("DROP OWNED BY {role}; DROP ROLE {role}"))
        .await
        .unwrap();
    wal.drop().await;
}

/// A scratch database of its own, for the install tests: the shared one
/// has the API installed by every other test's `setup`.
struct Scratch {
    name: String,
    url: String,
}

impl Scratch {
    async fn new() -> Self {
        let name = unique("db");
        sql()
            .await
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .unwrap();
        let base = database_url();
        let (head, tail) = base.split_once('?').unwrap_or((&base, ""));
        let root = head.rsplit_once('/').expect("URL with a database").0;
        let url = if tail.is_empty() {
            format!("{root}/{name}")
        } else {
            format!("{root}/{name}?{tail}")
        };
        Scratch { name, url }
    }

    async fn client(&self) -> tokio_postgres::Client {
        let (client, conn) = tokio_postgres::connect(&self.url, tokio_postgres::NoTls)
            .await
            .unwrap();
        tokio::spawn(conn);
        client
    }

    async fn setup(&self, slot: &str, extra: &[&str]) -> Run {
        let mut c = factlib(slot, slot, "factlib");
        c.env("FACTLIB_DATABASE_URL", &self.url)
            .arg("setup")
            .args(extra);
        let r = run(c, Duration::from_secs(60)).await;
        assert_eq!(r.code, 0, "setup failed: {}\n{}", r.stdout, r.stderr);
        r
    }

    async fn drop(self, slot: &str) {
        let c = sql().await;
        c.execute(
            "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await
        .unwrap();
        c.batch_execute(&format!("DROP DATABASE {} WITH (FORCE)", self.name))
            .await
            .unwrap();
    }
}

async fn api_functions(c: &tokio_postgres::Client) -> Vec<String> {
    c.query(
        "SELECT p.proname::text FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace \
         WHERE n.nspname = 'factlib' ORDER BY 1",
        &[],
    )
    .await
    .unwrap()
    .iter()
    .map(|r| r.get(0))
    .collect()
}

/// `setup` installs v1 once, says "unchanged" the second time, installs
/// nothing with `--sql-api none`, upgrades an older version and leaves a
/// newer one alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn setup_installs_versioned_and_idempotent() {
    // --sql-api none: no schema, no functions.
    let db = Scratch::new().await;
    let slot = unique("sqlsetup");
    let r = db.setup(&slot, &["--sql-api", "none"]).await;
    assert!(
        r.stdout.contains("sql api: skipped (--sql-api none)"),
        "{}",
        r.stdout
    );
    let c = db.client().await;
    assert_eq!(api_functions(&c).await, Vec::<String>::new());
    let schema = c
        .query_opt("SELECT 1 FROM pg_namespace WHERE nspname = 'factlib'", &[])
        .await
        .unwrap();
    assert!(schema.is_none(), "no schema factlib with --sql-api none");

    // Default: installed, then unchanged.
    let r = db.setup(&slot, &[]).await;
    assert!(
        r.stdout.contains(
            "sql api: installed v1 (factlib.emit, factlib.emit_json, factlib.emit_traced)"
        ),
        "{}",
        r.stdout
    );
    let installed = api_functions(&c).await;
    for f in ["api_version", "emit", "emit_json", "emit_traced"] {
        assert!(installed.contains(&f.to_owned()), "{f} in {installed:?}");
    }
    let r = db.setup(&slot, &[]).await;
    assert!(
        r.stdout.contains("sql api: v1 exists, unchanged"),
        "{}",
        r.stdout
    );
    assert_eq!(api_functions(&c).await, installed);

    // An older version (a stub emit that writes nothing) is replaced.
    c.batch_execute(
        "CREATE OR REPLACE FUNCTION factlib.api_version() RETURNS integer LANGUAGE sql RETURN 0;
         CREATE OR REPLACE FUNCTION factlib.emit(aggregate_type text, aggregate_id text,
             event_type text, payload bytea, metadata jsonb DEFAULT '{}',
             prefix text DEFAULT 'factlib')
           RETURNS uuid LANGUAGE sql RETURN '00000000-0000-0000-0000-000000000000'::uuid;",
    )
    .await
    .unwrap();
    let r = db.setup(&slot, &[]).await;
    assert!(
        r.stdout.contains("sql api: upgraded v0 to v1"),
        "{}",
        r.stdout
    );
    let v: i32 = c
        .query_one("SELECT factlib.api_version()", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(v, 1);
    let id: String = c
        .query_one(
            "SELECT factlib.emit('order', 'o-1', 'e', '\\x'::bytea)::text",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_ne!(
        id, "00000000-0000-0000-0000-000000000000",
        "the stub is gone"
    );

    // A newer version is left as it is.
    c.batch_execute(
        "CREATE OR REPLACE FUNCTION factlib.api_version() RETURNS integer LANGUAGE sql RETURN 2;",
    )
    .await
    .unwrap();
    let r = db.setup(&slot, &[]).await;
    assert!(
        r.stdout
            .contains("sql api: v2 exists, newer than this factlib's v1; left unchanged"),
        "{}",
        r.stdout
    );
    let v: i32 = c
        .query_one("SELECT factlib.api_version()", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(v, 2);
    drop(c);
    db.drop(&slot).await;
}

/// Facts from factlib.emit, factlib.emit_json and factlib.emit_traced,
/// relayed by `factlib relay`, arrive in `{prefix}.{aggregate_type}` keyed
/// by aggregate id, with the envelope as value and the headers from it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relayed_to_kafka_with_topic_key_value_and_headers() {
    let (slot, publication) = (unique("sqlrelay"), unique("pub"));
    let prefix = format!("p{slot}");
    setup(&slot, &publication).await;
    let mut c = sql().await;
    let tx = c.transaction().await.unwrap();
    let row = tx
        .query_one(
            "SELECT factlib.emit('order', 'o-1', 'order.placed', '\\x00ff'::bytea,
                                 '{\"tenant\": \"acme\"}', $1)::text,
                    factlib.emit_json('invoice', 'i-7', 'invoice.sent', '{\"total\": 42}',
                                      prefix => $1)::text,
                    factlib.emit_traced('order', 'o-2', 'order.paid', '\\x'::bytea,
                                        '4bf92f3577b34da6a3ce929d0e0e4736', '00f067aa0ba902b7',
                                        trace_metadata => '{\"tracestate\": \"k=v\"}',
                                        prefix => $1)::text",
            &[&prefix],
        )
        .await
        .unwrap();
    let (placed, sent, paid): (String, String, String) = (row.get(0), row.get(1), row.get(2));
    tx.commit().await.unwrap();

    let child = spawn(relay(&slot, &publication, &prefix));
    let topics = vec![format!("{prefix}.order"), format!("{prefix}.invoice")];
    let got = consume_async(&topics, 3, Duration::from_secs(2), Duration::from_secs(120)).await;
    stop_ok(child).await;
    assert_eq!(got.len(), 3, "{got:?}");
    let find = |id: &str| {
        got.iter()
            .find(|r| r.header("factlib-id").as_deref() == Some(id))
            .unwrap_or_else(|| panic!("no record for {id}"))
    };

    let r = find(&placed);
    assert_eq!(r.topic, format!("{prefix}.order"));
    assert_eq!(r.key.as_deref(), Some(&b"o-1"[..]));
    let f = fact::decode(Bytes::from(r.value.clone())).unwrap();
    assert_eq!(
        (f.id.as_str(), &f.payload[..]),
        (placed.as_str(), &b"\x00\xff"[..])
    );
    assert_eq!(
        r.header("factlib-event-type").as_deref(),
        Some("order.placed")
    );
    assert_eq!(r.header("tenant").as_deref(), Some("acme"));
    assert_eq!(r.header("traceparent"), None);

    let r = find(&sent);
    assert_eq!(r.topic, format!("{prefix}.invoice"));
    assert_eq!(r.key.as_deref(), Some(&b"i-7"[..]));
    let f = fact::decode(Bytes::from(r.value.clone())).unwrap();
    assert_eq!(&f.payload[..], br#"{"total": 42}"#, "the jsonb's text form");
    assert_eq!(f.event_type, "invoice.sent");

    let r = find(&paid);
    assert_eq!(r.topic, format!("{prefix}.order"));
    assert_eq!(r.key.as_deref(), Some(&b"o-2"[..]));
    assert_eq!(
        r.header("traceparent").as_deref(),
        Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
    );
    assert_eq!(r.header("tracestate").as_deref(), Some("k=v"));
    teardown(&slot, &publication).await;
}
