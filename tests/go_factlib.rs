//! `factlib relay --headers go-factlib` against the real PostgreSQL and
//! Kafka started by `tests/env/up`: on a slot and publication made the way
//! the Go relay (owlpost) makes them, every record carries exactly the Go
//! relay's headers, key, topic and value.
//!
//! The expected `LSN` header is found without the relay: before it starts,
//! `pg_logical_slot_peek_binary_changes` decodes the same slot with the
//! same pgoutput options. Each row's `lsn` is the position the walsender
//! also sends as a message's XLogData WALStart (both are the decoding
//! context's `write_location`, the message's own LSN), and `data` is the
//! pgoutput message, so the Go relay's `XLogPos` is `lsn + length(data)`.

mod common;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::Duration;

use bytes::Bytes;
use common::*;
use factlib::emit::{emit, NewFact};
use factlib::fact::{encode, Fact, TraceInfo};

/// Fact `n`: its trace info cycles through the cases that shape Go's
/// headers.
fn new_fact(n: usize) -> NewFact {
    let map = |pairs: &[(&str, &str)]| -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|&(k, v)| (k.to_owned(), v.to_owned()))
            .collect()
    };
    let trace_info = match n % 5 {
        // Traced, with trace metadata.
        0 => Some(TraceInfo {
            trace_id: format!("{:032x}", n + 1),
            span_id: format!("{:016x}", n + 1),
            metadata: map(&[("tracestate", "k=v"), ("baggage", "b=1")]),
        }),
        // Not traced.
        1 => None,
        // Traced with an empty span id, and trace metadata named like a
        // standard header: Go's map keeps the metadata's value.
        2 => Some(TraceInfo {
            trace_id: format!("{:032x}", n + 1),
            span_id: String::new(),
            metadata: map(&[("event_type", "replaced"), ("x-extra", "y")]),
        }),
        // Trace info without a trace id: Go writes none of it.
        3 => Some(TraceInfo {
            trace_id: String::new(),
            span_id: "00f067aa0ba902b7".into(),
            metadata: map(&[("k", "v")]),
        }),
        // Traced, no trace metadata.
        _ => Some(TraceInfo {
            trace_id: "4bf92f3577b34da6a3ce929d0e0e4736".into(),
            span_id: "00f067aa0ba902b7".into(),
            metadata: BTreeMap::new(),
        }),
    };
    let agg_type = if n.is_multiple_of(3) {
        "invoice"
    } else {
        "order"
    };
    NewFact {
        aggregate_type: agg_type.into(),
        aggregate_id: format!("a{}", n % 7),
        event_type: format!("{agg_type}.changed"),
        payload: Bytes::from(format!("{{\"n\":{n}}}")),
        // Go does not write the fact's metadata as headers.
        metadata: map(&[("tenant", "acme"), ("seq", &n.to_string())]),
        trace_info,
    }
}

/// The Go relay's headers for `fact` at `lsn`, built as
/// `pkg/outbox/consumer/kafka.go` builds them: one `map[string]string`,
/// written in its order.
fn go_headers(fact: &Fact, lsn: &str) -> BTreeMap<String, Vec<u8>> {
    let mut m = BTreeMap::new();
    m.insert("event_id".to_owned(), fact.id.clone().into_bytes());
    m.insert(
        "event_type".to_owned(),
        fact.event_type.clone().into_bytes(),
    );
    m.insert("LSN".to_owned(), lsn.as_bytes().to_vec());
    if let Some(t) = fact.trace_info.as_ref().filter(|t| !t.trace_id.is_empty()) {
        m.insert("trace_id".to_owned(), t.trace_id.clone().into_bytes());
        m.insert("span_id".to_owned(), t.span_id.clone().into_bytes());
        for (k, v) in &t.metadata {
            m.insert(k.clone(), v.clone().into_bytes());
        }
    }
    m
}

/// pglogrepl's `LSN.String()`: `fmt.Sprintf("%X/%X", uint32(lsn>>32), uint32(lsn))`.
fn go_lsn(lsn: u64) -> String {
    format!("{:X}/{:X}", lsn >> 32, lsn & 0xFFFF_FFFF)
}

/// PostgreSQL's `X/Y` text as a number.
fn parse_lsn(text: &str) -> u64 {
    let (hi, lo) = text.split_once('/').expect("X/Y");
    (u64::from_str_radix(hi, 16).unwrap() << 32) | u64::from_str_radix(lo, 16).unwrap()
}

/// For every message under `prefix` in the slot (peeked, not consumed):
/// its content and where the Go relay puts it, the row's LSN plus the
/// length of the pgoutput message.
async fn peek_xlog_ends(slot: &str, publication: &str, prefix: &str) -> Vec<(Vec<u8>, u64)> {
    let c = sql().await;
    wait_wal_flushed(&c).await;
    let rows = c
        .query(
            "SELECT lsn::text, data FROM pg_logical_slot_peek_binary_changes($1::text::name, \
             NULL, NULL, 'proto_version', '1', 'publication_names', $2::text, \
             'messages', 'true')",
            &[&slot, &publication],
        )
        .await
        .expect("peek the slot through pgoutput");
    let mut out = Vec::new();
    for row in rows {
        let lsn = parse_lsn(row.get::<_, &str>(0));
        let data: Vec<u8> = row.get(1);
        // 'M', flags, LSN, prefix\0, length, content.
        if data.first() != Some(&b'M') {
            continue;
        }
        let own_lsn = u64::from_be_bytes(data[2..10].try_into().unwrap());
        assert_eq!(own_lsn, lsn, "a message's row is at the message's LSN");
        let rest = &data[10..];
        let nul = rest.iter().position(|&b| b == 0).expect("prefix\\0");
        if &rest[..nul] != prefix.as_bytes() {
            continue;
        }
        let len = u32::from_be_bytes(rest[nul + 1..nul + 5].try_into().unwrap()) as usize;
        let content = rest[nul + 5..].to_vec();
        assert_eq!(content.len(), len);
        out.push((content, lsn + data.len() as u64));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn go_factlib_headers_are_the_go_relays() {
    let (slot, publication) = (unique("go"), unique("pub"));
    let prefix = format!("p{slot}");
    // As owlpost's ensurePublication / ensureReplicationSlot make them.
    let c = sql().await;
    c.batch_execute(&format!("CREATE PUBLICATION \"{publication}\""))
        .await
        .unwrap();
    c.execute(
        "SELECT pg_create_logical_replication_slot($1, 'pgoutput')",
        &[&slot],
    )
    .await
    .unwrap();

    // Facts in transactions of three, a lone (non-transactional) one, and
    // a message under another prefix.
    let mut written: Vec<Fact> = Vec::new();
    let mut c = sql().await;
    for t in 0..8 {
        let tx = c.transaction().await.unwrap();
        for i in 0..3 {
            let (f, _) = emit(&tx, &prefix, new_fact(t * 3 + i)).await.unwrap();
            written.push(f);
        }
        if t == 5 {
            emit(&tx, "not-ours", new_fact(0)).await.unwrap();
        }
        tx.commit().await.unwrap();
    }
    let lone = Fact {
        id: unique("lone"),
        aggregate_type: "order".into(),
        aggregate_id: "lone".into(),
        event_type: "order.lone".into(),
        payload: Bytes::from_static(b"{}"),
        created_at: 1_700_000_000_000_000_000,
        metadata: BTreeMap::new(),
        trace_info: Some(TraceInfo {
            trace_id: "0af7651916cd43dd8448eb211c80319c".into(),
            span_id: "b7ad6b7169203331".into(),
            metadata: BTreeMap::from([("LSN-note".to_owned(), "kept".to_owned())]),
        }),
    };
    c.execute(
        "SELECT pg_logical_emit_message(false, $1::text, $2::bytea)",
        &[&prefix, &encode(&lone)],
    )
    .await
    .unwrap();
    written.push(lone);

    let ends = peek_xlog_ends(&slot, &publication, &prefix).await;
    assert_eq!(ends.len(), written.len(), "the slot holds every fact once");
    // id -> (the fact as emitted, its envelope, the expected LSN header)
    let mut want: HashMap<String, (Fact, Vec<u8>, String)> = HashMap::new();
    for (content, end) in ends {
        let fact = factlib::fact::decode(Bytes::from(content.clone())).expect("an envelope");
        let emitted = written
            .iter()
            .find(|w| w.id == fact.id)
            .expect("a written fact");
        assert_eq!(&fact, emitted);
        want.insert(fact.id.clone(), (fact, content, go_lsn(end)));
    }

    let mut cmd = relay(&slot, &publication, &prefix);
    cmd.args(["--headers", "go-factlib"]);
    let child = spawn(cmd);
    let topics = vec![format!("{prefix}.order"), format!("{prefix}.invoice")];
    let got = consume_async(
        &topics,
        written.len(),
        Duration::from_secs(3),
        Duration::from_secs(120),
    )
    .await;
    let out = stop_ok(child).await;
    let log = String::from_utf8_lossy(&out.stderr);

    assert_eq!(got.len(), written.len(), "every fact once:\n{log}");
    let mut seen = HashSet::new();
    for r in &got {
        let value = factlib::fact::decode(Bytes::from(r.value.clone())).expect("an envelope");
        let (fact, envelope, lsn) = want
            .get(&value.id)
            .unwrap_or_else(|| panic!("unexpected fact {} on {}", value.id, r.topic));
        assert!(seen.insert(value.id.clone()), "{} twice", value.id);
        // Go re-marshals the envelope it decoded: the same fields. Factlib
        // sends the emitter's bytes themselves.
        assert_eq!(&value, fact);
        assert_eq!(&r.value, envelope);
        assert_eq!(r.topic, format!("{prefix}.{}", fact.aggregate_type));
        assert_eq!(r.key.as_deref(), Some(fact.aggregate_id.as_bytes()));
        // franz-go's StickyKeyPartitioner(nil) hashes a key with Kafka's
        // murmur2, as the relay does.
        assert_eq!(
            u32::try_from(r.partition).unwrap(),
            factlib::route::murmur2::partition_for_key(fact.aggregate_id.as_bytes(), 3),
        );
        // Exact bytes, as text (Go's values are UTF-8 strings) for messages.
        let text = |v: &[u8]| String::from_utf8(v.to_vec()).expect("a UTF-8 value");
        let headers: BTreeMap<String, String> = r
            .headers
            .iter()
            .map(|(k, v)| (k.clone(), text(v)))
            .collect();
        assert_eq!(
            headers.len(),
            r.headers.len(),
            "one header per name: {:?}",
            r.headers
        );
        let go: BTreeMap<String, String> = go_headers(fact, lsn)
            .into_iter()
            .map(|(k, v)| (k, text(&v)))
            .collect();
        assert_eq!(headers, go, "headers of {}", fact.id);
    }
    // The cases really occurred.
    let with = |name: &str, value: &str| {
        got.iter()
            .filter(|r| r.header(name).as_deref() == Some(value))
            .count()
    };
    assert_eq!(with("event_type", "replaced"), 5, "facts 2, 7, …, 22");
    assert_eq!(with("span_id", ""), 5);
    assert_eq!(with("LSN-note", "kept"), 1);
    assert_eq!(got.iter().filter(|r| r.headers.len() == 3).count(), 10);
    teardown(&slot, &publication).await;
}
