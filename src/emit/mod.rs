//! The emitter API: write a fact inside the caller's own transaction, from
//! Rust ([`emit`]) or from SQL (`sql_api`: `factlib.emit(…)`, which
//! `factlib setup` installs).
//!
//! ```text
//!  service tx ──emit(&tx, prefix, NewFact)──► pg_logical_emit_message(true, prefix, envelope)
//!  service tx ──SELECT factlib.emit(…)─────────┘   └─ commits (or rolls back) with the business rows
//! ```
//!
//! **Invariants**
//! - The message is transactional: it reaches the WAL stream only if the
//!   caller's transaction commits, and at its commit position.
//! - Required fields are checked before anything is sent; the id (UUIDv7)
//!   and `created_at` are always filled in here (by `factlib._emit` in SQL).

use std::collections::BTreeMap;
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use tokio_postgres::types::PgLsn;
use tokio_postgres::GenericClient;

use crate::fact::{self, Fact, TraceInfo};
use crate::lsn::Lsn;

pub(crate) mod sql_api;

/// A fact as a service describes it; Factlib adds the id and timestamp.
#[derive(Debug, Clone, Default)]
pub struct NewFact {
    /// The kind of aggregate, e.g. `order`. Required.
    pub aggregate_type: String,
    /// The aggregate's id; becomes the Kafka key. Required.
    pub aggregate_id: String,
    /// What happened, e.g. `order.placed`. Required.
    pub event_type: String,
    /// Application payload, opaque to Factlib.
    pub payload: Bytes,
    /// String metadata; each entry becomes a Kafka header.
    pub metadata: BTreeMap<String, String>,
    /// Tracing context, if the caller has one.
    pub trace_info: Option<TraceInfo>,
}

/// Why a fact was not emitted.
#[derive(Debug, thiserror::Error)]
pub enum EmitError {
    /// A required field is empty, or the prefix is unusable. Definite.
    #[error("invalid fact: {0}")]
    Invalid(&'static str),
    /// The database refused or the connection failed; the caller's
    /// transaction decides what happens next.
    #[error("emitting the fact failed: {0}")]
    Postgres(#[from] tokio_postgres::Error),
}

/// Fills in the id (UUIDv7) and `created_at`, after checking the required
/// fields.
pub fn build(new: NewFact) -> Result<Fact, EmitError> {
    if new.aggregate_type.is_empty() {
        return Err(EmitError::Invalid("aggregate_type is required"));
    }
    if new.aggregate_id.is_empty() {
        return Err(EmitError::Invalid("aggregate_id is required"));
    }
    if new.event_type.is_empty() {
        return Err(EmitError::Invalid("event_type is required"));
    }
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    Ok(Fact {
        id: uuid::Uuid::now_v7().to_string(),
        aggregate_type: new.aggregate_type,
        aggregate_id: new.aggregate_id,
        event_type: new.event_type,
        payload: new.payload,
        created_at: i64::try_from(now.as_nanos()).unwrap_or(i64::MAX),
        metadata: new.metadata,
        trace_info: new.trace_info,
    })
}

/// Emits a fact inside `client`'s current transaction (pass a
/// `tokio_postgres::Transaction`). Returns the fact as written and the LSN
/// of its WAL record. If the transaction rolls back, the fact is gone too.
pub async fn emit<C: GenericClient>(
    client: &C,
    prefix: &str,
    new: NewFact,
) -> Result<(Fact, Lsn), EmitError> {
    if prefix.is_empty() || prefix.contains('\0') {
        return Err(EmitError::Invalid(
            "prefix must be non-empty and contain no NUL",
        ));
    }
    let fact = build(new)?;
    let envelope = fact::encode(&fact);
    let row = client
        .query_one(
            "SELECT pg_logical_emit_message(true, $1::text, $2::bytea)",
            &[&prefix, &envelope],
        )
        .await?;
    let lsn: PgLsn = row.get(0);
    Ok((fact, Lsn(u64::from(lsn))))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn build_checks_required_fields_and_fills_id() {
        let ok = NewFact {
            aggregate_type: "order".into(),
            aggregate_id: "1".into(),
            event_type: "placed".into(),
            ..Default::default()
        };
        let f = build(ok.clone()).unwrap();
        let id = uuid::Uuid::parse_str(&f.id).unwrap();
        assert_eq!(id.get_version_num(), 7);
        assert!(f.created_at > 1_600_000_000_000_000_000);
        for (field, bad) in [
            (
                "aggregate_type",
                NewFact {
                    aggregate_type: String::new(),
                    ..ok.clone()
                },
            ),
            (
                "aggregate_id",
                NewFact {
                    aggregate_id: String::new(),
                    ..ok.clone()
                },
            ),
            (
                "event_type",
                NewFact {
                    event_type: String::new(),
                    ..ok.clone()
                },
            ),
        ] {
            let err = build(bad).unwrap_err().to_string();
            assert!(err.contains(field), "{err}");
        }
    }
}
