//! One Kafka record to one inbox row, or to a dead letter with the reason.
//! Sans-io: no Kafka client, no database.
//!
//! ```text
//!  Received { partition, offset, key, value } from a topic
//!     ──decode_view──► FactView ──check_required, id as UUID, text PostgreSQL can store──► Row
//!     └─ no value, not an envelope, a field missing, a bad id, a NUL ──────────────────► Dead { error }
//! ```
//!
//! **Invariants**
//! - Every record becomes exactly one [`Taken`]: a row or a dead letter.
//!   Nothing is dropped, and nothing here panics on any input.
//! - A [`Row`] holds only what PostgreSQL accepts: a UUID id and text (and
//!   JSON text) without NUL characters, so one bad record can never fail
//!   the batch it is written in.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use uuid::Uuid;

use crate::fact::{decode_view, FactView, TextField};

/// A record as read from Kafka.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Received<'a> {
    pub(crate) partition: i32,
    pub(crate) offset: i64,
    pub(crate) key: Option<&'a [u8]>,
    pub(crate) value: Option<&'a [u8]>,
}

/// Where a record came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Origin {
    pub(crate) topic: Arc<str>,
    pub(crate) partition: i32,
    pub(crate) offset: i64,
}

/// A fact, ready for `factlib.inbox`.
#[derive(Debug, Clone)]
pub(crate) struct Row {
    pub(crate) origin: Origin,
    pub(crate) id: Uuid,
    /// The decoded envelope: the text fields and the payload are read from
    /// it when the row is written.
    pub(crate) fact: FactView,
    /// The metadata as a JSON object.
    pub(crate) metadata: String,
    /// `None` when the emitter left `created_at` unset (0).
    pub(crate) created_at: Option<SystemTime>,
}

impl Row {
    /// The trace and span ids, `None` where empty.
    pub(crate) fn trace(&self) -> (Option<&str>, Option<&str>) {
        fn nonempty(s: &str) -> Option<&str> {
            (!s.is_empty()).then_some(s)
        }
        match self.fact.trace_info() {
            Some(t) => (nonempty(t.trace_id()), nonempty(t.span_id())),
            None => (None, None),
        }
    }
}

/// A record that is not a fact the inbox can hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Dead {
    pub(crate) origin: Origin,
    pub(crate) error: String,
    pub(crate) key: Option<Bytes>,
    pub(crate) value: Option<Bytes>,
}

/// What became of a record.
#[derive(Debug, Clone)]
pub(crate) enum Taken {
    Row(Row),
    Dead(Dead),
}

/// Takes one record read from `topic`.
pub(crate) fn take(r: Received<'_>, topic: &Arc<str>) -> Taken {
    let origin = Origin {
        topic: Arc::clone(topic),
        partition: r.partition,
        offset: r.offset,
    };
    let value = r.value.map(Bytes::copy_from_slice);
    match row(origin.clone(), value.clone()) {
        Ok(row) => Taken::Row(row),
        Err(error) => Taken::Dead(Dead {
            origin,
            error,
            key: r.key.map(Bytes::copy_from_slice),
            value,
        }),
    }
}

fn row(origin: Origin, value: Option<Bytes>) -> Result<Row, String> {
    let value = value.ok_or(
        "the record has no value (a tombstone?); a Factlib record's value is its envelope",
    )?;
    let fact = decode_view(value).map_err(|e| {
        format!("{e}; is this a Factlib topic, relayed with --value envelope (the default)?")
    })?;
    fact.check_required().map_err(|e| e.to_string())?;
    let id = Uuid::parse_str(fact.id())
        .map_err(|e| format!("the fact id {:?} is not a UUID: {e}", fact.id()))?;
    for (field, name) in [
        (TextField::AggregateType, "aggregate_type"),
        (TextField::AggregateId, "aggregate_id"),
        (TextField::EventType, "event_type"),
    ] {
        if fact.utf8(field).contains(&0) {
            return Err(nul(name));
        }
    }
    if let Some(t) = fact.trace_info() {
        if t.trace_id().contains('\0') || t.span_id().contains('\0') {
            return Err(nul("trace_info"));
        }
    }
    let mut metadata = serde_json::Map::with_capacity(fact.metadata_len());
    for (k, v) in fact.metadata() {
        if k.contains('\0') || v.contains('\0') {
            return Err(nul("metadata"));
        }
        metadata.insert(k.to_owned(), serde_json::Value::String(v.to_owned()));
    }
    let metadata = serde_json::Value::Object(metadata).to_string();
    let created_at = created_at(fact.created_at());
    Ok(Row {
        origin,
        id,
        fact,
        metadata,
        created_at,
    })
}

fn nul(field: &str) -> String {
    format!("the field {field} contains a NUL character, which PostgreSQL text cannot store")
}

/// `created_at` (nanoseconds since the Unix epoch) as a time; 0 is unset.
fn created_at(ns: i64) -> Option<SystemTime> {
    if ns == 0 {
        return None;
    }
    let d = Duration::from_nanos(ns.unsigned_abs());
    if ns > 0 {
        UNIX_EPOCH.checked_add(d)
    } else {
        UNIX_EPOCH.checked_sub(d)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fact::{encode, Fact, TraceInfo};
    use std::collections::BTreeMap;

    fn fact() -> Fact {
        Fact {
            id: "0190f0c1-0000-7000-8000-000000000001".into(),
            aggregate_type: "order".into(),
            aggregate_id: "o-1".into(),
            event_type: "order.placed".into(),
            payload: Bytes::from_static(b"{\"total\":42}"),
            created_at: 1_700_000_000_123_456_789,
            metadata: BTreeMap::from([("tenant".into(), "acme \"x\"".into())]),
            trace_info: Some(TraceInfo {
                trace_id: "4bf92f3577b34da6a3ce929d0e0e4736".into(),
                span_id: String::new(),
                metadata: BTreeMap::new(),
            }),
        }
    }

    fn take_value(value: Option<&[u8]>) -> Taken {
        let topic: Arc<str> = Arc::from("factlib.order");
        take(
            Received {
                partition: 2,
                offset: 41,
                key: Some(b"o-1"),
                value,
            },
            &topic,
        )
    }

    fn dead(value: Option<&[u8]>) -> Dead {
        match take_value(value) {
            Taken::Dead(d) => d,
            Taken::Row(r) => panic!("a row: {r:?}"),
        }
    }

    #[test]
    fn an_envelope_becomes_a_row_with_json_metadata_and_trace_ids() {
        let bytes = encode(&fact());
        let Taken::Row(r) = take_value(Some(&bytes)) else {
            panic!("dead")
        };
        assert_eq!(r.id.to_string(), "0190f0c1-0000-7000-8000-000000000001");
        assert_eq!(r.fact.aggregate_id(), "o-1");
        assert_eq!(&r.fact.payload()[..], b"{\"total\":42}");
        let m: serde_json::Value = serde_json::from_str(&r.metadata).unwrap();
        assert_eq!(m, serde_json::json!({"tenant": "acme \"x\""}));
        assert_eq!(r.trace(), (Some("4bf92f3577b34da6a3ce929d0e0e4736"), None));
        let since = r.created_at.unwrap().duration_since(UNIX_EPOCH).unwrap();
        assert_eq!(since.as_nanos(), 1_700_000_000_123_456_789);
        assert_eq!(
            r.origin,
            Origin {
                topic: Arc::from("factlib.order"),
                partition: 2,
                offset: 41
            }
        );
    }

    #[test]
    fn unset_and_negative_created_at() {
        assert_eq!(created_at(0), None);
        assert_eq!(
            created_at(-1_000_000_000),
            UNIX_EPOCH.checked_sub(Duration::from_secs(1))
        );
        assert!(created_at(i64::MIN).is_some());
        assert!(created_at(i64::MAX).is_some());
    }

    #[test]
    fn bad_records_become_dead_letters_that_say_why() {
        let d = dead(Some(b"not an envelope at all, just text"));
        assert!(d.error.contains("does not decode"), "{}", d.error);
        assert_eq!(d.key.as_deref(), Some(&b"o-1"[..]));
        assert_eq!(d.origin.offset, 41);

        let whole = encode(&fact());
        let d = dead(Some(&whole[..whole.len() / 2]));
        assert!(d.error.contains("does not decode"), "{}", d.error);

        assert!(dead(None).error.contains("no value"));

        let mut f = fact();
        f.event_type.clear();
        assert!(dead(Some(&encode(&f))).error.contains("event_type"));

        let mut f = fact();
        f.id = "not-a-uuid".into();
        assert!(dead(Some(&encode(&f))).error.contains("not a UUID"));

        let mut f = fact();
        f.aggregate_id = "a\0b".into();
        assert!(dead(Some(&encode(&f))).error.contains("NUL"));

        let mut f = fact();
        f.metadata.insert("k".into(), "v\0".into());
        assert!(dead(Some(&encode(&f))).error.contains("NUL"));
    }

    proptest::proptest! {
        /// Any bytes: a row or a dead letter, never a panic.
        #[test]
        fn never_panics(value in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..256)) {
            let _ = take_value(Some(&value));
        }
    }
}
