//! The fact envelope: prost types generated from `proto/factlib/v1/fact.proto`.
//!
//! Owns encoding and decoding the envelope, and nothing about Kafka or the
//! WAL.
//!
//! ```text
//!  LogicalMessage.content (Bytes) ──► decode ──► Fact { payload: Bytes (zero-copy), … }
//!                                 └─► view::decode_view ──► FactView { the content itself,
//!                                                           field positions in it }
//! ```
//!
//! [`decode`] is prost's decoder; [`view::decode_view`] is the hot-path one:
//! allocation-free for facts without metadata, one reference-counted handle
//! per fact (the content, moved in), and it accepts exactly what [`decode`]
//! accepts, with equal content.
//!
//! **Invariants**
//! - Field numbers match the Go Factlib `OutboxEvent`, so bytes written by the
//!   Go and Python emitters decode unchanged.
//! - Decoding from `Bytes` keeps `payload` a zero-copy slice of the input.
//! - Decoding never panics; malformed input is an [`EnvelopeError`].

use bytes::Bytes;
use prost::Message as _;

/// Generated protobuf types (`factlib.v1`).
#[allow(missing_docs, clippy::all, clippy::pedantic)]
pub mod pb {
    include!(concat!(env!("OUT_DIR"), "/factlib.v1.rs"));
}

pub use pb::{Fact, TraceInfo};

pub mod view;

pub use view::{decode_view, decode_view_or_return, FactView, TextField, TraceRef};

/// The default logical-message prefix that marks a fact.
pub const DEFAULT_PREFIX: &str = "factlib";

/// A message under our prefix that is not a valid envelope. Definite: it
/// goes to the dead-letter topic, never retried.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("fact envelope does not decode as factlib.v1.Fact: {0}")]
pub struct EnvelopeError(String);

/// Decodes an envelope. `payload` stays a zero-copy slice of `content`.
pub fn decode(content: Bytes) -> Result<Fact, EnvelopeError> {
    Fact::decode(content).map_err(|e| EnvelopeError(e.to_string()))
}

/// Encodes an envelope.
pub fn encode(fact: &Fact) -> Vec<u8> {
    fact.encode_to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    /// A fact with every field set; also used by `view`'s tests.
    pub(super) fn sample() -> Fact {
        Fact {
            id: "0190f0c1-0000-7000-8000-000000000001".into(),
            aggregate_type: "order".into(),
            aggregate_id: "o-1".into(),
            event_type: "order.placed".into(),
            payload: Bytes::from_static(b"{\"total\":42}"),
            created_at: 1_700_000_000_123_456_789,
            metadata: BTreeMap::from([("tenant".into(), "acme".into())]),
            trace_info: Some(TraceInfo {
                trace_id: "4bf92f3577b34da6a3ce929d0e0e4736".into(),
                span_id: "00f067aa0ba902b7".into(),
                metadata: BTreeMap::from([("tracestate".into(), "k=v".into())]),
            }),
        }
    }

    #[test]
    fn round_trips_and_payload_is_zero_copy() {
        let f = sample();
        let bytes = Bytes::from(encode(&f));
        let d = decode(bytes.clone()).unwrap();
        assert_eq!(d, f);
        let range = bytes.as_ptr() as usize..bytes.as_ptr() as usize + bytes.len();
        assert!(
            range.contains(&(d.payload.as_ptr() as usize)),
            "payload must borrow the input"
        );
    }

    /// Bytes as written by the Go emitter's `proto.Marshal` of an
    /// `OutboxEvent` (field order 1..8, map entries as nested messages).
    /// Built by hand from the protobuf wire format so the field numbers are
    /// checked independently of prost.
    #[test]
    fn decodes_go_field_numbers() {
        let mut b = Vec::new();
        let mut field = |num: u8, val: &[u8]| {
            b.push((num << 3) | 2);
            b.push(u8::try_from(val.len()).unwrap());
            b.extend_from_slice(val);
        };
        field(1, b"id-1");
        field(2, b"order");
        field(3, b"o-9");
        field(4, b"order.paid");
        field(5, b"\x00\x01binary");
        field(7, b"\x0a\x01k\x12\x01v");
        field(8, b"\x0a\x02tt\x12\x02ss");
        b.extend_from_slice(&[6 << 3, 0x96, 0x01]); // created_at = 150, varint
        let f = decode(Bytes::from(b)).unwrap();
        assert_eq!(f.id, "id-1");
        assert_eq!(f.aggregate_type, "order");
        assert_eq!(f.aggregate_id, "o-9");
        assert_eq!(f.event_type, "order.paid");
        assert_eq!(&f.payload[..], b"\x00\x01binary");
        assert_eq!(f.created_at, 150);
        assert_eq!(f.metadata.get("k").map(String::as_str), Some("v"));
        let t = f.trace_info.unwrap();
        assert_eq!((t.trace_id.as_str(), t.span_id.as_str()), ("tt", "ss"));
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        for bad in [
            &b"\xff"[..],
            b"\x0a\xff\xff\xff\xff\x0f",
            b"\x0a\x05ab",
            b"\x08",
        ] {
            assert!(decode(Bytes::copy_from_slice(bad)).is_err(), "{bad:?}");
        }
    }
}
