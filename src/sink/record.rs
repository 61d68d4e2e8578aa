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

use crate::fact::{Fact, TraceInfo};
use crate::lsn::Lsn;

/// What the record's value holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ValueMode {
    /// The whole protobuf envelope, as the emitter wrote it.
    Envelope,
    /// Only the fact's payload bytes.
    Payload,
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

fn is_lower_hex(s: &str, len: usize) -> bool {
    s.len() == len
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// The W3C `traceparent` for a fact's trace info, when it holds a valid,
/// non-zero trace id and span id. Flags come from the `traceflags` metadata
/// entry when it is two hex digits, else `01` (sampled).
pub fn traceparent(t: &TraceInfo) -> Option<String> {
    let trace = t.trace_id.to_ascii_lowercase();
    let span = t.span_id.to_ascii_lowercase();
    if !is_lower_hex(&trace, 32) || !is_lower_hex(&span, 16) {
        return None;
    }
    if trace.bytes().all(|b| b == b'0') || span.bytes().all(|b| b == b'0') {
        return None;
    }
    let flags = t
        .metadata
        .get("traceflags")
        .map(|f| f.to_ascii_lowercase())
        .filter(|f| is_lower_hex(f, 2))
        .unwrap_or_else(|| "01".to_owned());
    Some(format!("00-{trace}-{span}-{flags}"))
}

/// Builds the record for a decoded fact. `envelope` is the raw message
/// content the fact was decoded from.
pub fn fact_record(
    fact: Fact,
    envelope: Bytes,
    mode: ValueMode,
    lsn: Lsn,
    topic: Arc<str>,
    partition: i32,
    opaque: usize,
) -> Record {
    let lsn = lsn.to_string();
    let mut headers = OwnedHeaders::new_with_capacity(5 + fact.metadata.len())
        .insert(Header {
            key: header::ID,
            value: Some(fact.id.as_bytes()),
        })
        .insert(Header {
            key: header::EVENT_TYPE,
            value: Some(fact.event_type.as_bytes()),
        })
        .insert(Header {
            key: header::AGGREGATE_TYPE,
            value: Some(fact.aggregate_type.as_bytes()),
        })
        .insert(Header {
            key: header::LSN,
            value: Some(lsn.as_bytes()),
        });
    let mut bytes = fact.id.len() + fact.event_type.len() + fact.aggregate_type.len() + lsn.len();
    for (k, v) in &fact.metadata {
        headers = headers.insert(Header {
            key: k,
            value: Some(v.as_bytes()),
        });
        bytes += k.len() + v.len();
    }
    if let Some(t) = &fact.trace_info {
        if let Some(tp) = traceparent(t) {
            bytes += tp.len();
            headers = headers.insert(Header {
                key: header::TRACEPARENT,
                value: Some(tp.as_bytes()),
            });
        }
        if let Some(ts) = t.metadata.get("tracestate") {
            bytes += ts.len();
            headers = headers.insert(Header {
                key: header::TRACESTATE,
                value: Some(ts.as_bytes()),
            });
        }
    }
    let value = match mode {
        ValueMode::Envelope => envelope,
        ValueMode::Payload => fact.payload,
    };
    let timestamp_ms = (fact.created_at > 0).then_some(fact.created_at / 1_000_000);
    let key = Bytes::from(fact.aggregate_id.into_bytes());
    bytes += key.len() + value.len();
    Record {
        topic,
        partition,
        key: Some(key),
        value,
        headers: Some(headers),
        bytes,
        opaque,
        txn_end: None,
        timestamp_ms,
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
    let lsn = lsn.to_string();
    let headers = OwnedHeaders::new_with_capacity(2)
        .insert(Header {
            key: header::ERROR,
            value: Some(error.as_bytes()),
        })
        .insert(Header {
            key: header::LSN,
            value: Some(lsn.as_bytes()),
        });
    let bytes = raw.len() + error.len() + lsn.len();
    Record {
        topic,
        partition,
        key: None,
        value: raw,
        headers: Some(headers),
        bytes,
        opaque,
        txn_end: None,
        timestamp_ms: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rdkafka::message::Headers;
    use std::collections::BTreeMap;

    fn headers_of(r: &Record) -> Vec<(String, Vec<u8>)> {
        r.headers
            .as_ref()
            .unwrap()
            .iter()
            .map(|h| (h.key.to_owned(), h.value.unwrap_or_default().to_vec()))
            .collect()
    }

    #[test]
    fn traceparent_only_for_valid_ids() {
        let mut t = TraceInfo {
            trace_id: "4BF92F3577B34DA6A3CE929D0E0E4736".into(),
            span_id: "00f067aa0ba902b7".into(),
            metadata: BTreeMap::new(),
        };
        assert_eq!(
            traceparent(&t).unwrap(),
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
        );
        t.metadata.insert("traceflags".into(), "00".into());
        assert!(traceparent(&t).unwrap().ends_with("-00"));
        t.span_id = "0000000000000000".into();
        assert!(traceparent(&t).is_none());
        t.span_id = "xyz".into();
        assert!(traceparent(&t).is_none());
    }

    #[test]
    fn fact_record_carries_key_value_and_headers() {
        let envelope = Bytes::from_static(b"raw-envelope-bytes");
        let fact = Fact {
            id: "id-1".into(),
            aggregate_type: "order".into(),
            aggregate_id: "o-7".into(),
            event_type: "placed".into(),
            payload: envelope.slice(4..12),
            created_at: 1,
            metadata: BTreeMap::from([("tenant".into(), "acme".into())]),
            trace_info: Some(TraceInfo {
                trace_id: "4bf92f3577b34da6a3ce929d0e0e4736".into(),
                span_id: "00f067aa0ba902b7".into(),
                metadata: BTreeMap::from([("tracestate".into(), "k=v".into())]),
            }),
        };
        let r = fact_record(
            fact.clone(),
            envelope.clone(),
            ValueMode::Envelope,
            Lsn(0x1_0000_00AB),
            "t".into(),
            3,
            9,
        );
        assert_eq!(r.key.as_deref(), Some(&b"o-7"[..]));
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
        let p = fact_record(
            fact,
            envelope.clone(),
            ValueMode::Payload,
            Lsn(1),
            "t".into(),
            0,
            0,
        );
        assert_eq!(&p.value[..], b"envelope");
        assert_eq!(
            p.value.as_ptr(),
            envelope[4..].as_ptr(),
            "payload value is zero-copy"
        );
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
