//! Turning a fact into a Kafka record: value, key and headers.
//!
//! **Invariants**
//! - The value is a zero-copy slice of the WAL frame (the whole envelope, or
//!   the payload inside it).
//! - Header names are fixed (`factlib-*`, `traceparent`, `tracestate`) plus
//!   one per metadata entry, in the fact's metadata order.

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
/// view's handle).
pub fn fact_record(
    fact: FactView,
    shape: RecordShape,
    lsn: Lsn,
    topic: Arc<str>,
    partition: i32,
    opaque: usize,
) -> Record {
    let lsn = lsn.text();
    let set = shape.headers;
    let mut headers = Headers::with_capacity(match set {
        HeaderSet::Minimal => 1,
        HeaderSet::Standard => 5 + fact.metadata_len(),
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
