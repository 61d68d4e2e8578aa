//! Turning a fact into a Kafka record: value, key and headers.
//!
//! **Invariants**
//! - The value is a zero-copy slice of the WAL frame (the whole envelope, or
//!   the payload inside it).
//! - Header names are fixed (`factlib-*`, `traceparent`, `tracestate`) plus
//!   one per metadata entry, in the fact's metadata order.
//! - `go-factlib` writes the Go relay's headers with its map semantics: one
//!   header per name, a trace-metadata entry replacing a standard header of
//!   the same name. The fact's metadata is not written, as in Go.
//! - The sets other than `go-factlib` carry the fact's position (commit
//!   LSN); `go-factlib` the end of its XLogData ([`HeaderSet::lsn`]).

use std::sync::Arc;

use bytes::Bytes;
use rdkafka::message::{Header, OwnedHeaders};

use crate::fact::view::{FactView, TextField, TraceRef};
use crate::lsn::Lsn;

/// What the record's value holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ValueMode {
    /// The whole protobuf envelope, as the emitter wrote it.
    #[default]
    Envelope,
    /// Only the fact's payload bytes.
    Payload,
}

/// Which headers a fact's record carries. Each header costs librdkafka
/// about 0.7 µs of CPU per record on the reference machine (perf/README.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum HeaderSet {
    /// `factlib-id`, `factlib-event-type`, `factlib-lsn`, one per metadata
    /// entry, and `traceparent`/`tracestate` when the fact is traced.
    #[default]
    Standard,
    /// `standard` plus `factlib-aggregate-type`.
    Full,
    /// Only `factlib-lsn`; the rest stays inside the envelope value.
    Minimal,
    /// Exactly the Go Factlib relay's (owlpost) headers: `event_id`,
    /// `event_type`, `LSN` (the end of the fact's XLogData) and, when the
    /// fact has a non-empty trace id, `trace_id`, `span_id` and one per
    /// trace-metadata entry (replacing a header of the same name).
    GoFactlib,
}

impl HeaderSet {
    /// The LSN a fact's record carries: its `position` (the commit LSN, or
    /// a lone message's own) for Factlib's sets; for `go-factlib`, as the Go
    /// relay, `xlog_end`, the end of the XLogData that carried it (its
    /// WALStart plus the length of its pgoutput message).
    pub fn lsn(self, position: Lsn, xlog_end: Lsn) -> Lsn {
        match self {
            HeaderSet::GoFactlib => xlog_end,
            HeaderSet::Standard | HeaderSet::Full | HeaderSet::Minimal => position,
        }
    }
}

/// How facts become records: the value and the headers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RecordShape {
    /// What the value holds.
    pub value: ValueMode,
    /// Which headers are added.
    pub headers: HeaderSet,
}

/// One record ready for the producer.
pub struct Record {
    /// Destination topic.
    pub topic: Arc<str>,
    /// Destination partition, chosen by the relay (Java-compatible murmur2).
    pub partition: i32,
    /// The key (`aggregate_id`), or none for dead letters.
    pub key: Option<Bytes>,
    /// The value.
    pub value: Bytes,
    /// Headers (taken while librdkafka holds the record, handed back if the
    /// queue was full).
    pub headers: Option<OwnedHeaders>,
    /// Size of key + value + headers, for throughput accounting.
    pub bytes: usize,
    /// The ack token, returned in the delivery report.
    pub opaque: usize,
    /// Set on the last record of a PostgreSQL transaction (and on every lone
    /// fact): the end LSN of that unit. A producer may commit a batch here.
    pub txn_end: Option<Lsn>,
    /// The Kafka timestamp (CreateTime, Unix ms): the fact's `created_at`.
    /// Delivery reports use it to measure created → acknowledged latency.
    pub timestamp_ms: Option<i64>,
}

impl std::fmt::Debug for Record {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Record")
            .field("topic", &self.topic)
            .field("partition", &self.partition)
            .field("bytes", &self.bytes)
            .field("opaque", &self.opaque)
            .finish()
    }
}

/// Header names.
pub mod header {
    /// The fact's UUIDv7.
    pub const ID: &str = "factlib-id";
    /// The fact's event type.
    pub const EVENT_TYPE: &str = "factlib-event-type";
    /// The fact's aggregate type.
    pub const AGGREGATE_TYPE: &str = "factlib-aggregate-type";
    /// The commit LSN (`X/Y`) of the fact's transaction, or the message's
    /// own LSN for a non-transactional fact.
    pub const LSN: &str = "factlib-lsn";
    /// Why a dead letter could not be relayed.
    pub const ERROR: &str = "factlib-error";
    /// W3C trace context.
    pub const TRACEPARENT: &str = "traceparent";
    /// W3C trace state, when the fact carries one.
    pub const TRACESTATE: &str = "tracestate";
}

/// The Go Factlib relay's header names (`pkg/outbox/consumer/kafka.go`,
/// `KafkaEventHandler`), for `--headers go-factlib`.
pub mod go_header {
    /// The fact's id.
    pub const EVENT_ID: &str = "event_id";
    /// The fact's event type.
    pub const EVENT_TYPE: &str = "event_type";
    /// The end of the fact's XLogData, `%X/%X`.
    pub const LSN: &str = "LSN";
    /// The trace id, when not empty.
    pub const TRACE_ID: &str = "trace_id";
    /// The span id (possibly empty), when the trace id is not.
    pub const SPAN_ID: &str = "span_id";
    /// The names above: a trace-metadata entry with one of them replaces
    /// that header instead of adding one.
    pub const ALL: [&str; 5] = [EVENT_ID, EVENT_TYPE, LSN, TRACE_ID, SPAN_ID];
}

/// A W3C `traceparent` value, formatted on the stack.
pub struct TraceParent([u8; 55]);

impl TraceParent {
    /// The header text, e.g. `00-4bf9…4736-00f0…02b7-01`.
    pub fn as_str(&self) -> &str {
        std::str::from_utf8(&self.0).unwrap_or_default()
    }
}

/// Copies `hex` lower-cased into `out` when it is exactly `out.len()` hex
/// digits; false (and `out` unspecified) otherwise.
fn lower_hex_into(hex: &str, out: &mut [u8]) -> bool {
    hex.len() == out.len()
        && out.iter_mut().zip(hex.bytes()).all(|(o, b)| {
            *o = b.to_ascii_lowercase();
            o.is_ascii_digit() || (b'a'..=b'f').contains(o)
        })
}

/// The W3C `traceparent` for a fact's trace info, when it holds a valid,
/// non-zero trace id and span id. Flags come from the `traceflags` metadata
/// entry when it is two hex digits, else `01` (sampled).
pub fn traceparent(t: TraceRef<'_>) -> Option<TraceParent> {
    let mut out = *b"00-00000000000000000000000000000000-0000000000000000-01";
    let (trace, rest) = out.get_mut(3..)?.split_at_mut(32);
    let (span, rest) = rest.get_mut(1..)?.split_at_mut(16);
    let flags = rest.get_mut(1..)?;
    let nonzero = |h: &[u8]| h.iter().any(|&b| b != b'0');
    if !lower_hex_into(t.trace_id(), trace) || !nonzero(trace) {
        return None;
    }
    if !lower_hex_into(t.span_id(), span) || !nonzero(span) {
        return None;
    }
    let mut given = [0u8; 2];
    if let Some(f) = t.get("traceflags") {
        if lower_hex_into(f, &mut given) {
            flags.copy_from_slice(&given);
        }
    }
    Some(TraceParent(out))
}

/// Builds the record for a decoded fact. The key and value are zero-copy
/// slices of the envelope the fact was decoded from (the value reuses the
/// view's handle). `lsn` is the one its LSN header carries
/// ([`HeaderSet::lsn`] of the fact's positions).
pub fn fact_record(
    fact: FactView,
    shape: RecordShape,
    lsn: Lsn,
    topic: Arc<str>,
    partition: i32,
    opaque: usize,
) -> Record {
    let headers = match shape.headers {
        HeaderSet::GoFactlib => go_factlib_headers(&fact, lsn),
        set => factlib_headers(&fact, set, lsn),
    };
    let created_at = fact.created_at();
    let timestamp_ms = (created_at > 0).then_some(created_at / 1_000_000);
    let key = fact.aggregate_id_bytes();
    let value = match shape.value {
        ValueMode::Envelope => fact.into_envelope(),
        ValueMode::Payload => fact.into_payload(),
    };
    let bytes = headers.bytes + key.len() + value.len();
    Record {
        topic,
        partition,
        key: Some(key),
        value,
        headers: headers.owned,
        bytes,
        opaque,
        txn_end: None,
        timestamp_ms,
    }
}

/// The headers of Factlib's own sets (`standard`, `full`, `minimal`).
#[inline]
fn factlib_headers(fact: &FactView, set: HeaderSet, lsn: Lsn) -> Headers {
    let lsn = lsn.text();
    let mut headers = Headers::with_capacity(match set {
        HeaderSet::Minimal => 1,
        // go-factlib has its own builder and never comes here.
        HeaderSet::Standard | HeaderSet::GoFactlib => 5 + fact.metadata_len(),
        HeaderSet::Full => 6 + fact.metadata_len(),
    });
    if set != HeaderSet::Minimal {
        headers.add(header::ID, fact.utf8(TextField::Id));
        headers.add(header::EVENT_TYPE, fact.utf8(TextField::EventType));
    }
    if set == HeaderSet::Full {
        headers.add(header::AGGREGATE_TYPE, fact.utf8(TextField::AggregateType));
    }
    headers.add(header::LSN, lsn.as_bytes());
    if set != HeaderSet::Minimal {
        for (k, v) in fact.metadata() {
            headers.add(k, v.as_bytes());
        }
        if let Some(t) = fact.trace_info() {
            if let Some(tp) = traceparent(t) {
                headers.add(header::TRACEPARENT, tp.as_str().as_bytes());
            }
            if let Some(ts) = t.get("tracestate") {
                headers.add(header::TRACESTATE, ts.as_bytes());
            }
        }
    }
    headers
}

/// The Go relay's headers. Go builds them as a `map[string]string`:
/// `event_id`, `event_type`, `LSN`; then, if the fact has trace info with a
/// non-empty trace id, `trace_id`, `span_id` and every trace-metadata entry,
/// each written over a name already there. So there is one header per name,
/// and a trace-metadata entry named like a standard header replaces its
/// value. (Go's map order is random, so header order carries nothing.)
fn go_factlib_headers(fact: &FactView, lsn: Lsn) -> Headers {
    let lsn = lsn.text();
    let trace = fact.trace_info().filter(|t| !t.trace_id().is_empty());
    let mut headers = Headers::with_capacity(3 + trace.map_or(0, |t| 2 + t.metadata_len()));
    let id = fact.utf8(TextField::Id);
    headers.add(
        go_header::EVENT_ID,
        go_value(trace, go_header::EVENT_ID, id),
    );
    let event_type = fact.utf8(TextField::EventType);
    let event_type = go_value(trace, go_header::EVENT_TYPE, event_type);
    headers.add(go_header::EVENT_TYPE, event_type);
    headers.add(
        go_header::LSN,
        go_value(trace, go_header::LSN, lsn.as_bytes()),
    );
    if let Some(t) = trace {
        let trace_id = go_value(trace, go_header::TRACE_ID, t.trace_id().as_bytes());
        headers.add(go_header::TRACE_ID, trace_id);
        let span_id = go_value(trace, go_header::SPAN_ID, t.span_id().as_bytes());
        headers.add(go_header::SPAN_ID, span_id);
        for (k, v) in t.metadata() {
            if !go_header::ALL.contains(&k) {
                headers.add(k, v.as_bytes());
            }
        }
    }
    headers
}

/// The value Go leaves in header `name`: the trace-metadata entry of that
/// name when `trace` has one (it was written last), else `own`.
fn go_value<'a>(trace: Option<TraceRef<'a>>, name: &str, own: &'a [u8]) -> &'a [u8] {
    trace.and_then(|t| t.get(name)).map_or(own, str::as_bytes)
}

/// rdkafka headers plus the count of value bytes added.
struct Headers {
    owned: Option<OwnedHeaders>,
    bytes: usize,
}

impl Headers {
    fn with_capacity(n: usize) -> Self {
        Headers {
            owned: Some(OwnedHeaders::new_with_capacity(n)),
            bytes: 0,
        }
    }

    fn add(&mut self, key: &str, value: &[u8]) {
        self.bytes += value.len();
        self.owned = self.owned.take().map(|h| {
            h.insert(Header {
                key,
                value: Some(value),
            })
        });
    }
}

/// Builds a dead-letter record: the raw message content, with the error and
/// the LSN in headers.
pub fn dead_letter(
    raw: Bytes,
    error: &str,
    lsn: Lsn,
    topic: Arc<str>,
    partition: i32,
    opaque: usize,
) -> Record {
    let mut headers = Headers::with_capacity(2);
    headers.add(header::ERROR, error.as_bytes());
    headers.add(header::LSN, lsn.text().as_bytes());
    let bytes = raw.len() + headers.bytes;
    Record {
        topic,
        partition,
        key: None,
        value: raw,
        headers: headers.owned,
        bytes,
        opaque,
        txn_end: None,
        timestamp_ms: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fact::view::decode_view;
    use crate::fact::{encode, Fact, TraceInfo};
    use rdkafka::message::Headers as _;
    use std::collections::BTreeMap;

    fn headers_of(r: &Record) -> Vec<(String, Vec<u8>)> {
        r.headers
            .as_ref()
            .unwrap()
            .iter()
            .map(|h| (h.key.to_owned(), h.value.unwrap_or_default().to_vec()))
            .collect()
    }

    /// The `traceparent` of a fact carrying this trace info.
    fn traceparent_of(
        trace_id: &str,
        span_id: &str,
        metadata: &[(&str, &str)],
    ) -> Option<TraceParent> {
        let fact = Fact {
            trace_info: Some(TraceInfo {
                trace_id: trace_id.into(),
                span_id: span_id.into(),
                metadata: metadata
                    .iter()
                    .map(|&(k, v)| (k.to_owned(), v.to_owned()))
                    .collect(),
            }),
            ..Fact::default()
        };
        let view = decode_view(Bytes::from(encode(&fact))).unwrap();
        traceparent(view.trace_info().unwrap())
    }

    #[test]
    fn traceparent_only_for_valid_ids() {
        let (tid, sid) = ("4BF92F3577B34DA6A3CE929D0E0E4736", "00f067aa0ba902b7");
        assert_eq!(
            traceparent_of(tid, sid, &[]).unwrap().as_str(),
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
        );
        let flagged = traceparent_of(tid, sid, &[("traceflags", "00")]).unwrap();
        assert!(flagged.as_str().ends_with("-00"));
        let upper = traceparent_of(tid, sid, &[("traceflags", "0A")]).unwrap();
        assert!(upper.as_str().ends_with("-0a"));
        let bad_flags = traceparent_of(tid, sid, &[("traceflags", "x")]).unwrap();
        assert!(bad_flags.as_str().ends_with("-01"));
        assert!(traceparent_of(tid, "0000000000000000", &[]).is_none());
        assert!(traceparent_of(&"0".repeat(32), sid, &[]).is_none());
        assert!(traceparent_of(tid, "xyz", &[]).is_none());
        assert!(traceparent_of(tid, "00f067aa0ba902bg", &[]).is_none());
    }

    /// The envelope and its view (which holds a clone of the same handle).
    fn sample() -> (Bytes, FactView) {
        let fact = Fact {
            id: "id-1".into(),
            aggregate_type: "order".into(),
            aggregate_id: "o-7".into(),
            event_type: "placed".into(),
            payload: Bytes::from_static(b"envelope"),
            created_at: 1,
            metadata: BTreeMap::from([("tenant".into(), "acme".into())]),
            trace_info: Some(TraceInfo {
                trace_id: "4bf92f3577b34da6a3ce929d0e0e4736".into(),
                span_id: "00f067aa0ba902b7".into(),
                metadata: BTreeMap::from([("tracestate".into(), "k=v".into())]),
            }),
        };
        let envelope = Bytes::from(encode(&fact));
        (envelope.clone(), decode_view(envelope).unwrap())
    }

    fn within(outer: &Bytes, inner: &[u8]) -> bool {
        let range = outer.as_ptr() as usize..=outer.as_ptr() as usize + outer.len();
        range.contains(&(inner.as_ptr() as usize))
    }

    fn shape(value: ValueMode, headers: HeaderSet) -> RecordShape {
        RecordShape { value, headers }
    }

    #[test]
    fn fact_record_carries_key_value_and_headers() {
        let (envelope, fact) = sample();
        let r = fact_record(
            fact.clone(),
            shape(ValueMode::Envelope, HeaderSet::Full),
            Lsn(0x1_0000_00AB),
            "t".into(),
            3,
            9,
        );
        assert_eq!(r.key.as_deref(), Some(&b"o-7"[..]));
        assert!(
            within(&envelope, r.key.as_deref().unwrap()),
            "key is zero-copy"
        );
        assert_eq!(r.value, envelope);
        assert_eq!(
            r.value.as_ptr(),
            envelope.as_ptr(),
            "envelope value is zero-copy"
        );
        assert_eq!((r.partition, r.opaque), (3, 9));
        let h = headers_of(&r);
        let names: Vec<_> = h.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(
            names,
            [
                "factlib-id",
                "factlib-event-type",
                "factlib-aggregate-type",
                "factlib-lsn",
                "tenant",
                "traceparent",
                "tracestate"
            ]
        );
        assert_eq!(h[3].1, b"1/AB");
        let header_bytes: usize = h.iter().map(|(_, v)| v.len()).sum();
        assert_eq!(r.bytes, header_bytes + 3 + envelope.len());
        let p = fact_record(
            fact,
            shape(ValueMode::Payload, HeaderSet::Full),
            Lsn(1),
            "t".into(),
            0,
            0,
        );
        assert_eq!(&p.value[..], b"envelope");
        assert!(within(&envelope, &p.value), "payload value is zero-copy");
    }

    #[test]
    fn header_sets() {
        let (_, fact) = sample();
        let names = |set| {
            let r = fact_record(
                fact.clone(),
                shape(ValueMode::Envelope, set),
                Lsn(2),
                "t".into(),
                0,
                0,
            );
            headers_of(&r)
                .into_iter()
                .map(|(k, _)| k)
                .collect::<Vec<_>>()
        };
        assert_eq!(
            names(HeaderSet::Standard),
            [
                "factlib-id",
                "factlib-event-type",
                "factlib-lsn",
                "tenant",
                "traceparent",
                "tracestate"
            ]
        );
        assert_eq!(names(HeaderSet::Minimal), ["factlib-lsn"]);
    }

    /// The Go relay's headers for `fact` at `lsn`, modelled the way
    /// `KafkaEventHandler` builds them: one map, written in Go's order.
    fn go_model(fact: &Fact, lsn: &str) -> BTreeMap<String, Vec<u8>> {
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

    /// The go-factlib record of `fact` at `lsn`: its headers as a map,
    /// failing on a repeated name.
    fn go_headers(fact: &Fact, lsn: Lsn) -> BTreeMap<String, Vec<u8>> {
        let view = decode_view(Bytes::from(encode(fact))).unwrap();
        let r = fact_record(
            view,
            shape(ValueMode::Envelope, HeaderSet::GoFactlib),
            lsn,
            "t".into(),
            0,
            0,
        );
        let list = headers_of(&r);
        let map: BTreeMap<_, _> = list.iter().cloned().collect();
        assert_eq!(map.len(), list.len(), "one header per name: {list:?}");
        let header_bytes: usize = list.iter().map(|(_, v)| v.len()).sum();
        assert_eq!(
            r.bytes,
            header_bytes + fact.aggregate_id.len() + r.value.len()
        );
        map
    }

    fn traced(trace_id: &str, span_id: &str, metadata: &[(&str, &str)]) -> Fact {
        let (_, view) = sample();
        Fact {
            trace_info: Some(TraceInfo {
                trace_id: trace_id.into(),
                span_id: span_id.into(),
                metadata: metadata
                    .iter()
                    .map(|&(k, v)| (k.to_owned(), v.to_owned()))
                    .collect(),
            }),
            ..view.to_fact()
        }
    }

    fn text_map(pairs: &[(&str, &str)]) -> BTreeMap<String, Vec<u8>> {
        pairs
            .iter()
            .map(|&(k, v)| (k.to_owned(), v.as_bytes().to_vec()))
            .collect()
    }

    #[test]
    fn go_factlib_headers_without_trace_info() {
        let (envelope, view) = sample();
        let untraced = Fact {
            trace_info: None,
            ..view.to_fact()
        };
        assert_eq!(
            go_headers(&untraced, Lsn(0x1_ABCD_EF00)),
            text_map(&[
                ("event_id", "id-1"),
                ("event_type", "placed"),
                ("LSN", "1/ABCDEF00")
            ]),
            "the fact's metadata (tenant) is not a header in Go"
        );
        // A trace info with an empty trace id adds nothing, its metadata
        // neither (Go checks `TraceId != ""`).
        let empty_id = traced("", "00f067aa0ba902b7", &[("k", "v"), ("LSN", "x")]);
        assert_eq!(go_headers(&empty_id, Lsn(0)), go_model(&empty_id, "0/0"));
        assert_eq!(go_headers(&empty_id, Lsn(0)).len(), 3);
        // Key and value are the same as the other sets'.
        let r = fact_record(
            view,
            shape(ValueMode::Envelope, HeaderSet::GoFactlib),
            Lsn(1),
            "t".into(),
            2,
            5,
        );
        assert_eq!(r.key.as_deref(), Some(&b"o-7"[..]));
        assert_eq!(r.value, envelope);
        assert_eq!((r.partition, r.opaque), (2, 5));
    }

    #[test]
    fn go_factlib_headers_with_trace_info() {
        let (_, view) = sample();
        let fact = view.to_fact();
        assert_eq!(
            go_headers(&fact, Lsn(0x16_B374_D848)),
            text_map(&[
                ("event_id", "id-1"),
                ("event_type", "placed"),
                ("LSN", "16/B374D848"),
                ("trace_id", "4bf92f3577b34da6a3ce929d0e0e4736"),
                ("span_id", "00f067aa0ba902b7"),
                ("tracestate", "k=v"),
            ])
        );
        // Values are the fields as written: no W3C checks or lower-casing.
        let odd = traced("NOT-HEX", "", &[]);
        assert_eq!(
            go_headers(&odd, Lsn(0x10)),
            text_map(&[
                ("event_id", "id-1"),
                ("event_type", "placed"),
                ("LSN", "0/10"),
                ("trace_id", "NOT-HEX"),
                ("span_id", ""),
            ]),
            "an empty span id is still a header"
        );
    }

    #[test]
    fn go_factlib_trace_metadata_replaces_a_header_of_the_same_name() {
        let fact = traced(
            "t1",
            "s1",
            &[
                ("LSN", "over-lsn"),
                ("event_id", "over-id"),
                ("event_type", "over-type"),
                ("trace_id", "over-trace"),
                ("span_id", "over-span"),
                ("lsn", "lower-case is another name"),
                ("extra", "e"),
            ],
        );
        let got = go_headers(&fact, Lsn(0x20));
        assert_eq!(
            got,
            text_map(&[
                ("event_id", "over-id"),
                ("event_type", "over-type"),
                ("LSN", "over-lsn"),
                ("trace_id", "over-trace"),
                ("span_id", "over-span"),
                ("lsn", "lower-case is another name"),
                ("extra", "e"),
            ])
        );
        assert_eq!(got, go_model(&fact, "0/20"));
    }

    #[test]
    fn go_factlib_lsn_text_is_pglogrepls() {
        // pglogrepl's LSN.String(): fmt.Sprintf("%X/%X", uint32(lsn>>32),
        // uint32(lsn)); these are its outputs for the same values.
        for (lsn, go) in [
            (0, "0/0"),
            (0xA, "0/A"),
            (0x1_0000_0000, "1/0"),
            (0x1_ABCD_EF00, "1/ABCDEF00"),
            (0xABCD_EF00_0000_0000, "ABCDEF00/0"),
            (u64::MAX, "FFFFFFFF/FFFFFFFF"),
        ] {
            let (_, view) = sample();
            let untraced = Fact {
                trace_info: None,
                ..view.to_fact()
            };
            assert_eq!(go_headers(&untraced, Lsn(lsn))["LSN"], go.as_bytes());
        }
    }

    #[test]
    fn only_go_factlib_carries_the_xlog_end() {
        let (position, xlog_end) = (Lsn(0x100), Lsn(0x9A));
        assert_eq!(HeaderSet::GoFactlib.lsn(position, xlog_end), xlog_end);
        for set in [HeaderSet::Standard, HeaderSet::Full, HeaderSet::Minimal] {
            assert_eq!(set.lsn(position, xlog_end), position, "{set:?}");
        }
    }

    use proptest::prelude::*;

    proptest! {
        /// Any fact: exactly the headers of Go's map, names drawn so that
        /// they often collide with the standard ones.
        #[test]
        fn go_factlib_headers_are_gos_map(
            id in "[a-z0-9-]{0,8}",
            event_type in "[a-z.]{0,8}",
            trace in prop::option::of((
                "[0-9a-f]{0,4}",
                "[0-9a-f]{0,4}",
                prop::collection::btree_map(
                    prop::sample::select(vec![
                        "event_id", "event_type", "LSN", "trace_id", "span_id", "lsn", "", "k",
                    ]).prop_map(str::to_owned),
                    "[ -~]{0,6}",
                    0..6,
                ),
            )),
            metadata in prop::collection::btree_map("[a-zA-Z_]{0,6}", "[a-z]{0,4}", 0..4),
            lsn: u64,
        ) {
            let fact = Fact {
                id,
                aggregate_type: "order".into(),
                aggregate_id: "o-1".into(),
                event_type,
                payload: Bytes::from_static(b"p"),
                created_at: 1,
                metadata,
                trace_info: trace.map(|(trace_id, span_id, metadata)| TraceInfo {
                    trace_id,
                    span_id,
                    metadata,
                }),
            };
            let go_lsn = format!("{:X}/{:X}", lsn >> 32, lsn & 0xFFFF_FFFF);
            prop_assert_eq!(go_headers(&fact, Lsn(lsn)), go_model(&fact, &go_lsn));
        }
    }

    #[test]
    fn dead_letter_keeps_raw_bytes_and_error() {
        let r = dead_letter(
            Bytes::from_static(b"\xff\x00"),
            "bad envelope",
            Lsn(16),
            "p.dlq".into(),
            0,
            1,
        );
        assert_eq!(&r.value[..], b"\xff\x00");
        assert!(r.key.is_none());
        assert_eq!(
            headers_of(&r),
            vec![
                ("factlib-error".to_owned(), b"bad envelope".to_vec()),
                ("factlib-lsn".to_owned(), b"0/10".to_vec())
            ]
        );
    }
}
