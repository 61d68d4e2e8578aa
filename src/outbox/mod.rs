//! Outbox-table rows to fact envelopes: the Debezium outbox layout.
//!
//! Owns the relation cache (what pgoutput's `Relation` messages announced)
//! and the mapping of an inserted row's columns onto a `factlib.v1.Fact`.
//! It does not decide what is a unit or a fact in the stream; `progress`
//! asks it for one row at a time.
//!
//! ```text
//!  Relation ──Relations::relation──► Layout (column positions, or why the table does not map)
//!  Insert(relid, row) ──Relations::row──► Ok(envelope bytes)
//!                                      └► Err(BadRow { the row as JSON, the error }) ──► the DLQ
//! ```
//!
//! Column defaults follow Debezium's outbox event router: `id`,
//! `aggregatetype`, `aggregateid`, `type`, `payload`, and the optional
//! `timestamp` and `tracingspancontext`. Values arrive in text format: the
//! replication connection sets `DateStyle=ISO`, `TimeZone=UTC` and
//! `bytea_output=hex` (`pgwire::startup`), so each type's text is fixed.
//!
//! **Invariants**
//! - A `Relation` message replaces what was known of its table: a column
//!   added, dropped or renamed while the relay runs takes effect from the
//!   next row.
//! - Every row of a known relation gives an envelope or a [`BadRow`], never
//!   a panic; an Insert for a relation never announced is an error of the
//!   stream ([`UnknownRelation`]).
//! - The envelope holds exactly the mapped values: the payload's bytes
//!   (bytea decoded, any other type as its text), strings unchanged.

use std::collections::HashMap;

use bytes::Bytes;

use crate::fact::TraceInfo;
use crate::pgwire::pgoutput::{Relation, TupleData, TupleValue};

/// OIDs of the built-in types this module reads specially.
mod oid {
    pub(super) const BYTEA: u32 = 17;
    pub(super) const TIMESTAMP: u32 = 1114;
    pub(super) const TIMESTAMPTZ: u32 = 1184;
}

/// Which column holds each field (`--outbox-columns`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ColumnNames {
    /// The fact's id (Debezium: `id`, a uuid).
    pub id: String,
    /// `aggregatetype`: becomes the topic suffix.
    pub aggregate_type: String,
    /// `aggregateid`: the Kafka key.
    pub aggregate_id: String,
    /// `type`: the event type.
    pub event_type: String,
    /// `payload`: bytea is taken as its bytes, jsonb/json/text as their text.
    pub payload: String,
    /// `timestamp` (optional column): `created_at`; without it, or NULL, the
    /// transaction's commit time.
    pub timestamp: String,
    /// `tracingspancontext` (optional column): `key=value` lines; a
    /// `traceparent` entry gives the trace and span ids.
    pub tracing: String,
}

impl Default for ColumnNames {
    fn default() -> Self {
        ColumnNames {
            id: "id".into(),
            aggregate_type: "aggregatetype".into(),
            aggregate_id: "aggregateid".into(),
            event_type: "type".into(),
            payload: "payload".into(),
            timestamp: "timestamp".into(),
            tracing: "tracingspancontext".into(),
        }
    }
}

/// What becomes of columns outside the mapping (`--outbox-extra`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ExtraColumns {
    /// Each non-NULL one becomes a metadata entry named after the column.
    #[default]
    Metadata,
    /// They are dropped.
    Ignore,
}

/// How outbox rows become facts.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct OutboxSettings {
    /// Column names.
    pub columns: ColumnNames,
    /// Columns outside the mapping.
    pub extra: ExtraColumns,
}

/// A change for a relation no `Relation` message announced: the server
/// broke the protocol. Definite.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("a row change for relation {0}, which no Relation message announced")]
pub struct UnknownRelation(pub u32);

/// A row that does not map onto a fact: it goes to the dead-letter topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadRow {
    /// `{"table": "schema.table", "row": {column: text or null}}`.
    pub row: Bytes,
    /// What is wrong and what to do.
    pub error: String,
}

/// Where each mapped field sits in a row.
#[derive(Debug, Clone, Copy)]
struct Positions {
    id: usize,
    aggregate_type: usize,
    aggregate_id: usize,
    event_type: usize,
    payload: usize,
    timestamp: Option<usize>,
    tracing: Option<usize>,
}

/// A table as its latest `Relation` message described it.
#[derive(Debug)]
struct Layout {
    table: String,
    columns: Vec<(String, u32)>,
    /// The positions, or why the table does not map.
    positions: Result<Positions, String>,
    /// The columns that become metadata, by name (the order of a map's
    /// encoded entries); none with `--outbox-extra ignore`.
    metadata_columns: Vec<usize>,
}

/// The relation cache and the mapping.
#[derive(Debug)]
pub struct Relations {
    settings: OutboxSettings,
    tables: HashMap<u32, Layout>,
}

impl Relations {
    /// An empty cache.
    pub fn new(settings: OutboxSettings) -> Self {
        Relations {
            settings,
            tables: HashMap::new(),
        }
    }

    /// Forgets every table (a new connection announces them again).
    pub fn clear(&mut self) {
        self.tables.clear();
    }

    /// Takes in a `Relation` message.
    pub fn relation(&mut self, r: &Relation) {
        let table = format!(
            "{}.{}",
            String::from_utf8_lossy(&r.namespace),
            String::from_utf8_lossy(&r.name)
        );
        let columns: Vec<(String, u32)> = r
            .columns
            .iter()
            .map(|c| (String::from_utf8_lossy(&c.name).into_owned(), c.type_oid))
            .collect();
        let positions = positions(&self.settings.columns, &table, &columns);
        let mut metadata_columns = Vec::new();
        if let (Ok(p), ExtraColumns::Metadata) = (&positions, self.settings.extra) {
            let mapped = [
                Some(p.id),
                Some(p.aggregate_type),
                Some(p.aggregate_id),
                Some(p.event_type),
                Some(p.payload),
                p.timestamp,
                p.tracing,
            ];
            metadata_columns = (0..columns.len())
                .filter(|i| !mapped.contains(&Some(*i)))
                .collect();
            metadata_columns.sort_unstable_by(|&a, &b| columns[a].0.cmp(&columns[b].0));
        }
        self.tables.insert(
            r.relation_id,
            Layout {
                table,
                columns,
                positions,
                metadata_columns,
            },
        );
    }

    /// The name (`schema.table`) of a known relation.
    pub fn table(&self, relation_id: u32) -> Option<&str> {
        self.tables.get(&relation_id).map(|l| l.table.as_str())
    }

    /// The envelope of an inserted row; `commit_ts` (PostgreSQL-epoch µs)
    /// is its `created_at` when the row has no timestamp.
    pub fn row(
        &self,
        relation_id: u32,
        row: &TupleData,
        commit_ts: i64,
    ) -> Result<Result<Bytes, BadRow>, UnknownRelation> {
        let layout = self
            .tables
            .get(&relation_id)
            .ok_or(UnknownRelation(relation_id))?;
        Ok(self.map(layout, row, commit_ts).map_err(|error| BadRow {
            row: row_json(layout, row),
            error: format!("outbox row of {} does not map: {error}", layout.table),
        }))
    }

    fn map(&self, layout: &Layout, row: &TupleData, commit_ts: i64) -> Result<Bytes, String> {
        let p = layout.positions.as_ref().map_err(Clone::clone)?;
        if row.len() != layout.columns.len() {
            return Err(format!(
                "the row has {} values for {} columns",
                row.len(),
                layout.columns.len()
            ));
        }
        let names = &self.settings.columns;
        let text = |i: usize| -> Result<Option<&str>, String> {
            let (name, _) = &layout.columns[i];
            match &row[i] {
                TupleValue::Null => Ok(None),
                TupleValue::Text(b) => std::str::from_utf8(b)
                    .map(Some)
                    .map_err(|_| format!("column {name} is not UTF-8")),
                TupleValue::UnchangedToast | TupleValue::Binary(_) => {
                    Err(format!("column {name} arrived without its text value"))
                }
            }
        };
        let required = |i: usize, field: &str| -> Result<&str, String> {
            match text(i)? {
                Some(s) if !s.is_empty() => Ok(s),
                got => Err(format!(
                    "column {} ({field}) is {}; every outbox row needs it",
                    layout.columns[i].0,
                    if got.is_none() { "NULL" } else { "empty" }
                )),
            }
        };
        let (id, aggregate_type, aggregate_id, event_type) = (
            required(p.id, "id")?,
            required(p.aggregate_type, "aggregate type")?,
            required(p.aggregate_id, "aggregate id")?,
            required(p.event_type, "event type")?,
        );
        let payload = match text(p.payload)? {
            None => Payload::Bytes(""),
            Some(t) if layout.columns[p.payload].1 == oid::BYTEA => Payload::Hex(
                t.strip_prefix("\\x")
                    .filter(|h| h.len() % 2 == 0 && h.bytes().all(|c| c.is_ascii_hexdigit()))
                    .ok_or_else(|| format!("column {} is not bytea hex text", names.payload))?,
            ),
            Some(t) => Payload::Bytes(t),
        };
        let created_at = match p.timestamp.map(text).transpose()?.flatten() {
            Some(t) => parse_timestamp(t)
                .ok_or_else(|| format!("column {} ({t:?}) is not a timestamp", names.timestamp))?,
            None => pg_micros_to_unix_nanos(commit_ts),
        };
        let trace_info = match p.tracing.map(text).transpose()?.flatten() {
            Some(t) => parse_trace(t),
            None => None,
        };
        let mut metadata: Vec<(&str, &str)> = Vec::with_capacity(layout.metadata_columns.len());
        for &i in &layout.metadata_columns {
            if let Some(v) = text(i)? {
                metadata.push((&layout.columns[i].0, v));
            }
        }
        Ok(encode_envelope(&Envelope {
            id,
            aggregate_type,
            aggregate_id,
            event_type,
            payload,
            created_at,
            metadata: &metadata,
            trace_info: trace_info.as_ref(),
        }))
    }
}

/// A row's payload as its text shows it.
enum Payload<'a> {
    /// These bytes.
    Bytes(&'a str),
    /// The bytes these hex digits (checked: an even number) spell.
    Hex(&'a str),
}

/// An envelope's fields, borrowed from the row.
struct Envelope<'a> {
    id: &'a str,
    aggregate_type: &'a str,
    aggregate_id: &'a str,
    event_type: &'a str,
    payload: Payload<'a>,
    created_at: i64,
    metadata: &'a [(&'a str, &'a str)],
    trace_info: Option<&'a TraceInfo>,
}

/// Encodes `factlib.v1.Fact` straight from the row's slices, as prost would
/// (fields in number order, proto3 defaults left out), without building a
/// [`Fact`] first: one allocation per row.
fn encode_envelope(e: &Envelope<'_>) -> Bytes {
    use prost::encoding::{encode_key, encode_varint, encoded_len_varint, WireType};
    use prost::Message as _;

    fn field(buf: &mut Vec<u8>, tag: u32, bytes: &[u8]) {
        if !bytes.is_empty() {
            encode_key(tag, WireType::LengthDelimited, buf);
            encode_varint(bytes.len() as u64, buf);
            buf.extend_from_slice(bytes);
        }
    }
    let entry_len = |k: &str, v: &str| {
        let part = |s: &str| {
            if s.is_empty() {
                0
            } else {
                1 + encoded_len_varint(s.len() as u64) + s.len()
            }
        };
        part(k) + part(v)
    };
    let payload_len = match e.payload {
        Payload::Bytes(b) => b.len(),
        Payload::Hex(h) => h.len() / 2,
    };
    let metadata_len: usize = e
        .metadata
        .iter()
        .map(|(k, v)| 2 + 10 + entry_len(k, v))
        .sum();
    let mut buf = Vec::with_capacity(
        64 + e.id.len()
            + e.aggregate_type.len()
            + e.aggregate_id.len()
            + e.event_type.len()
            + payload_len
            + metadata_len
            + e.trace_info.map_or(0, |t| 12 + t.encoded_len()),
    );
    field(&mut buf, 1, e.id.as_bytes());
    field(&mut buf, 2, e.aggregate_type.as_bytes());
    field(&mut buf, 3, e.aggregate_id.as_bytes());
    field(&mut buf, 4, e.event_type.as_bytes());
    match e.payload {
        Payload::Bytes(b) => field(&mut buf, 5, b.as_bytes()),
        Payload::Hex(h) if !h.is_empty() => {
            encode_key(5, WireType::LengthDelimited, &mut buf);
            encode_varint(payload_len as u64, &mut buf);
            let digit = |c: u8| (c as char).to_digit(16).unwrap_or(0) as u8;
            buf.extend(
                h.as_bytes()
                    .chunks_exact(2)
                    .map(|p| digit(p[0]) << 4 | digit(p[1])),
            );
        }
        Payload::Hex(_) => {}
    }
    if e.created_at != 0 {
        encode_key(6, WireType::Varint, &mut buf);
        encode_varint(e.created_at as u64, &mut buf);
    }
    for (k, v) in e.metadata {
        encode_key(7, WireType::LengthDelimited, &mut buf);
        encode_varint(entry_len(k, v) as u64, &mut buf);
        field(&mut buf, 1, k.as_bytes());
        field(&mut buf, 2, v.as_bytes());
    }
    if let Some(t) = e.trace_info {
        prost::encoding::message::encode(8, t, &mut buf);
    }
    Bytes::from(buf)
}

/// The positions of the mapped columns, or which one is missing.
fn positions(
    names: &ColumnNames,
    table: &str,
    columns: &[(String, u32)],
) -> Result<Positions, String> {
    let find = |name: &str| columns.iter().position(|(c, _)| c == name);
    let need = |name: &str, field: &str| {
        find(name).ok_or_else(|| {
            format!(
                "table {table} has no column {name:?} for the {field}; \
                 rename it back or map it with --outbox-columns {field}=<column>"
            )
        })
    };
    let timestamp = find(&names.timestamp);
    if let Some(i) = timestamp {
        let ty = columns[i].1;
        if ty != oid::TIMESTAMPTZ && ty != oid::TIMESTAMP {
            return Err(format!(
                "column {:?} of {table} has type oid {ty}; the timestamp must be timestamptz or timestamp",
                names.timestamp
            ));
        }
    }
    Ok(Positions {
        id: need(&names.id, "id")?,
        aggregate_type: need(&names.aggregate_type, "aggregate_type")?,
        aggregate_id: need(&names.aggregate_id, "aggregate_id")?,
        event_type: need(&names.event_type, "event_type")?,
        payload: need(&names.payload, "payload")?,
        timestamp,
        tracing: find(&names.tracing),
    })
}

/// The row for the dead-letter topic.
fn row_json(layout: &Layout, row: &TupleData) -> Bytes {
    let mut values = serde_json::Map::new();
    for (i, value) in row.iter().enumerate() {
        let name = layout
            .columns
            .get(i)
            .map_or_else(|| format!("${}", i + 1), |(n, _)| n.clone());
        let v = match value {
            TupleValue::Null => serde_json::Value::Null,
            TupleValue::Text(b) => String::from_utf8_lossy(b).into_owned().into(),
            TupleValue::UnchangedToast => "(unchanged TOAST value)".into(),
            TupleValue::Binary(_) => "(binary value)".into(),
        };
        values.insert(name, v);
    }
    let doc = serde_json::json!({ "table": layout.table, "row": values });
    Bytes::from(doc.to_string())
}

/// PostgreSQL-epoch microseconds to Unix nanoseconds.
fn pg_micros_to_unix_nanos(micros: i64) -> i64 {
    const PG_EPOCH_UNIX_MICROS: i64 = 946_684_800_000_000;
    micros
        .saturating_add(PG_EPOCH_UNIX_MICROS)
        .saturating_mul(1000)
}

/// `YYYY-MM-DD HH:MM:SS[.ffffff][+HH[:MM[:SS]]]` (DateStyle ISO) to Unix
/// nanoseconds; without an offset the time is UTC.
fn parse_timestamp(t: &str) -> Option<i64> {
    let (date, rest) = t.split_once(' ')?;
    let mut d = date.split('-');
    let (y, m, day): (i64, u32, u32) = (
        d.next()?.parse().ok()?,
        d.next()?.parse().ok()?,
        d.next()?.parse().ok()?,
    );
    // PostgreSQL's own range of years (BC years print with a suffix, which
    // fails the parse above).
    if d.next().is_some()
        || !(1..=294_276).contains(&y)
        || !(1..=12).contains(&m)
        || !(1..=31).contains(&day)
    {
        return None;
    }
    let split = rest.find(['+', '-']).unwrap_or(rest.len());
    let (time, offset) = rest.split_at(split);
    let (hms, frac) = time.split_once('.').unwrap_or((time, ""));
    let mut h = hms.split(':');
    let (hh, mm, ss): (i64, i64, i64) = (
        h.next()?.parse().ok()?,
        h.next()?.parse().ok()?,
        h.next()?.parse().ok()?,
    );
    if h.next().is_some() || hh > 24 || mm > 59 || ss > 60 {
        return None;
    }
    if frac.len() > 9 || !frac.bytes().all(|c| c.is_ascii_digit()) {
        return None;
    }
    let nanos: i64 = if frac.is_empty() {
        0
    } else {
        format!("{frac:0<9}").parse().ok()?
    };
    let offset_secs = if offset.is_empty() {
        0
    } else {
        let sign = if offset.starts_with('-') { -1 } else { 1 };
        let mut parts = offset[1..].split(':');
        let mut secs = 0;
        for unit in [3600, 60, 1] {
            match parts.next() {
                Some(p) if p.len() <= 2 => secs += p.parse::<i64>().ok()? * unit,
                Some(_) => return None,
                None => break,
            }
        }
        sign * secs
    };
    let days = days_from_civil(y, m, day);
    let secs = days * 86_400 + hh * 3600 + mm * 60 + ss - offset_secs;
    secs.checked_mul(1_000_000_000)?.checked_add(nanos)
}

/// Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's
/// algorithm).
fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let m = i64::from(m);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// Debezium's `tracingspancontext`: `key=value` (or `key: value`) lines,
/// `#` comments skipped. A W3C `traceparent` entry gives the trace and span
/// ids; every other entry is trace metadata.
fn parse_trace(t: &str) -> Option<TraceInfo> {
    let mut info = TraceInfo::default();
    for line in t.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') || line.starts_with('!') {
            continue;
        }
        let Some((k, v)) = line.split_once(['=', ':']) else {
            continue;
        };
        let (k, v) = (k.trim(), v.trim());
        if k == "traceparent" {
            let parts: Vec<&str> = v.split('-').collect();
            if let [_, trace, span, _] = parts[..] {
                if trace.len() == 32 && span.len() == 16 {
                    info.trace_id = trace.to_owned();
                    info.span_id = span.to_owned();
                    continue;
                }
            }
        }
        info.metadata.insert(k.to_owned(), v.to_owned());
    }
    let empty = info.trace_id.is_empty() && info.metadata.is_empty();
    (!empty).then_some(info)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fact::{self, Fact};
    use crate::pgwire::pgoutput::Column;

    const TEXT: u32 = 25;
    const JSONB: u32 = 3802;
    const UUID: u32 = 2950;

    fn relation(id: u32, cols: &[(&str, u32)]) -> Relation {
        Relation {
            relation_id: id,
            namespace: Bytes::from_static(b"public"),
            name: Bytes::from_static(b"outbox"),
            replica_identity: b'd',
            columns: cols
                .iter()
                .map(|(n, t)| Column {
                    flags: 0,
                    name: Bytes::copy_from_slice(n.as_bytes()),
                    type_oid: *t,
                    type_modifier: -1,
                })
                .collect(),
        }
    }

    fn debezium() -> Vec<(&'static str, u32)> {
        vec![
            ("id", UUID),
            ("aggregatetype", TEXT),
            ("aggregateid", TEXT),
            ("type", TEXT),
            ("payload", JSONB),
        ]
    }

    fn t(s: &str) -> TupleValue {
        TupleValue::Text(Bytes::copy_from_slice(s.as_bytes()))
    }

    fn row(values: &[Option<&str>]) -> TupleData {
        values
            .iter()
            .map(|v| v.map_or(TupleValue::Null, t))
            .collect()
    }

    fn decoded(r: &Relations, rel: u32, values: &[Option<&str>]) -> Result<Fact, BadRow> {
        r.row(rel, &row(values), 0)
            .expect("known relation")
            .map(|b| fact::decode(b).unwrap())
    }

    const ID: &str = "0190f0c1-0000-7000-8000-000000000001";

    #[test]
    fn a_debezium_row_maps_onto_the_envelope() {
        let mut r = Relations::new(OutboxSettings::default());
        r.relation(&relation(7, &debezium()));
        let f = decoded(
            &r,
            7,
            &[
                Some(ID),
                Some("order"),
                Some("o-1"),
                Some("order.placed"),
                Some("{\"total\": 42}"),
            ],
        )
        .unwrap();
        assert_eq!(f.id, ID);
        assert_eq!(
            (
                f.aggregate_type.as_str(),
                f.aggregate_id.as_str(),
                f.event_type.as_str()
            ),
            ("order", "o-1", "order.placed")
        );
        assert_eq!(&f.payload[..], b"{\"total\": 42}");
        assert_eq!(f.created_at, 946_684_800_000_000_000, "the commit time");
        assert!(f.metadata.is_empty() && f.trace_info.is_none());
    }

    #[test]
    fn bytea_payloads_are_their_bytes_and_null_is_empty() {
        let mut cols = debezium();
        cols[4].1 = oid::BYTEA;
        let mut r = Relations::new(OutboxSettings::default());
        r.relation(&relation(1, &cols));
        let base = [Some(ID), Some("a"), Some("b"), Some("c")];
        let with = |p: Option<&str>| {
            let mut v = base.to_vec();
            v.push(p);
            decoded(&r, 1, &v)
        };
        assert_eq!(
            &with(Some("\\x00ff10")).unwrap().payload[..],
            b"\x00\xff\x10"
        );
        assert!(with(None).unwrap().payload.is_empty());
        let bad = with(Some("\\x0")).unwrap_err();
        assert!(bad.error.contains("bytea"), "{}", bad.error);
    }

    #[test]
    fn extra_columns_become_metadata_unless_ignored() {
        let mut cols = debezium();
        cols.push(("tenant", TEXT));
        cols.push(("note", TEXT));
        let values = [
            Some(ID),
            Some("a"),
            Some("b"),
            Some("c"),
            Some("{}"),
            Some("acme"),
            None,
        ];
        let mut r = Relations::new(OutboxSettings::default());
        r.relation(&relation(1, &cols));
        let f = decoded(&r, 1, &values).unwrap();
        assert_eq!(
            f.metadata.into_iter().collect::<Vec<_>>(),
            [("tenant".to_owned(), "acme".to_owned())]
        );
        let mut r = Relations::new(OutboxSettings {
            extra: ExtraColumns::Ignore,
            ..OutboxSettings::default()
        });
        r.relation(&relation(1, &cols));
        assert!(decoded(&r, 1, &values).unwrap().metadata.is_empty());
    }

    #[test]
    fn timestamps_and_trace_context_are_read() {
        let mut cols = debezium();
        cols.push(("timestamp", oid::TIMESTAMPTZ));
        cols.push(("tracingspancontext", TEXT));
        let mut r = Relations::new(OutboxSettings::default());
        r.relation(&relation(1, &cols));
        let f = decoded(
            &r,
            1,
            &[
                Some(ID),
                Some("a"),
                Some("b"),
                Some("c"),
                Some("{}"),
                Some("2026-11-30 19:00:01.5+00"),
                Some("#comment\ntraceparent=00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01\ntracestate=k=v"),
            ],
        )
        .unwrap();
        assert_eq!(f.created_at, 1_796_065_201_500_000_000);
        let tr = f.trace_info.unwrap();
        assert_eq!(tr.trace_id, "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(tr.span_id, "00f067aa0ba902b7");
        assert_eq!(
            tr.metadata.get("tracestate").map(String::as_str),
            Some("k=v")
        );
    }

    /// The hand-written encoder writes what prost writes for the same fact.
    #[test]
    fn the_envelope_is_prosts_encoding() {
        let mut cols = debezium();
        cols[4].1 = oid::BYTEA;
        cols.extend([("zeta", TEXT), ("alpha", TEXT), ("empty", TEXT)]);
        cols.push(("tracingspancontext", TEXT));
        let mut r = Relations::new(OutboxSettings::default());
        r.relation(&relation(1, &cols));
        let values = [
            Some(ID),
            Some("ü-type"),
            Some("k"),
            Some("e"),
            Some("\\x00ff"),
            Some("z"),
            Some("a"),
            Some(""),
            Some("traceparent=00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01\nk=v"),
        ];
        let bytes = r.row(1, &row(&values), 12_345).unwrap().unwrap();
        let f = fact::decode(bytes.clone()).unwrap();
        assert_eq!(f.metadata.len(), 3);
        assert_eq!(&f.payload[..], b"\x00\xff");
        assert!(f.trace_info.is_some());
        assert_eq!(&bytes[..], &fact::encode(&f)[..]);
    }

    #[test]
    fn timestamp_text_parses_like_postgres_prints_it() {
        let cases = [
            ("1970-01-01 00:00:00+00", Some(0)),
            ("1970-01-01 00:00:00", Some(0)),
            (
                "2000-01-01 00:00:00.000001+00",
                Some(946_684_800_000_001_000),
            ),
            ("1969-12-31 23:59:59+00", Some(-1_000_000_000)),
            ("1970-01-01 01:00:00+01", Some(0)),
            ("1970-01-01 00:00:00-05:30", Some(19_800_000_000_000)),
            ("2024-02-29 12:00:00+00", Some(1_709_208_000_000_000_000)),
            ("infinity", None),
            ("2024-13-01 00:00:00", None),
            ("2024-01-01", None),
            ("2024-01-01 00:00:00.1234567890", None),
            ("99999999999999-01-01 00:00:00", None),
            ("2024-01-01 00:00:00+99999999999999", None),
        ];
        for (text, want) in cases {
            assert_eq!(parse_timestamp(text), want, "{text}");
        }
    }

    #[test]
    fn rows_that_do_not_map_are_bad_rows_with_the_row_and_the_reason() {
        let mut r = Relations::new(OutboxSettings::default());
        r.relation(&relation(1, &debezium()));
        let bad = decoded(&r, 1, &[Some(ID), None, Some("b"), Some("c"), Some("{}")]).unwrap_err();
        assert!(
            bad.error.contains("aggregatetype") && bad.error.contains("NULL"),
            "{}",
            bad.error
        );
        let json: serde_json::Value = serde_json::from_slice(&bad.row).unwrap();
        assert_eq!(json["table"], "public.outbox");
        assert_eq!(json["row"]["aggregatetype"], serde_json::Value::Null);
        assert_eq!(json["row"]["aggregateid"], "b");

        let empty = decoded(&r, 1, &[Some(ID), Some("a"), Some(""), Some("c"), None]).unwrap_err();
        assert!(empty.error.contains("empty"), "{}", empty.error);
        assert!(r.row(2, &row(&[]), 0).is_err(), "unknown relation");
    }

    #[test]
    fn a_new_relation_message_replaces_the_layout() {
        let mut r = Relations::new(OutboxSettings::default());
        r.relation(&relation(1, &debezium()));
        let mut renamed = debezium();
        renamed[1].0 = "kind";
        r.relation(&relation(1, &renamed));
        let values = [Some(ID), Some("a"), Some("b"), Some("c"), Some("{}")];
        let bad = decoded(&r, 1, &values).unwrap_err();
        assert!(
            bad.error.contains("\"aggregatetype\"") && bad.error.contains("--outbox-columns"),
            "{}",
            bad.error
        );
        let mut r = Relations::new(OutboxSettings {
            columns: ColumnNames {
                aggregate_type: "kind".into(),
                ..ColumnNames::default()
            },
            ..OutboxSettings::default()
        });
        r.relation(&relation(1, &renamed));
        assert_eq!(decoded(&r, 1, &values).unwrap().aggregate_type, "a");
    }

    #[test]
    fn a_timestamp_of_another_type_is_refused_for_the_table() {
        let mut cols = debezium();
        cols.push(("timestamp", TEXT));
        let mut r = Relations::new(OutboxSettings::default());
        r.relation(&relation(1, &cols));
        let bad = decoded(
            &r,
            1,
            &[Some(ID), Some("a"), Some("b"), Some("c"), None, None],
        )
        .unwrap_err();
        assert!(bad.error.contains("timestamptz"), "{}", bad.error);
    }

    proptest::proptest! {
        /// Any relation and any row (any values, any count, any types): an
        /// envelope or a bad row, never a panic; an envelope decodes.
        #[test]
        fn any_row_maps_or_is_a_bad_row(
            cols in proptest::collection::vec(
                (proptest::sample::select(vec!["id", "aggregatetype", "aggregateid", "type", "payload", "timestamp", "tracingspancontext", "x"]),
                 proptest::sample::select(vec![TEXT, JSONB, UUID, oid::BYTEA, oid::TIMESTAMP, oid::TIMESTAMPTZ])),
                0..9),
            vals in proptest::collection::vec(
                proptest::option::of(proptest::string::string_regex("(\\\\x[0-9a-f]{0,6}|[ -~]{0,12}|[0-9]{4}-[0-9]{2}-[0-9]{2} [0-9:.+-]{0,16})").unwrap()),
                0..9),
            commit_ts in proptest::num::i64::ANY,
        ) {
            let mut r = Relations::new(OutboxSettings::default());
            r.relation(&relation(1, &cols));
            let values: Vec<Option<&str>> = vals.iter().map(Option::as_deref).collect();
            if let Ok(envelope) = r.row(1, &row(&values), commit_ts).unwrap() {
                fact::decode(envelope).unwrap();
            }
        }
    }
}
