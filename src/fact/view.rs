//! The zero-copy envelope decoder: [`decode_view`] reads `factlib.v1.Fact`
//! into a [`FactView`], which is the input `Bytes` itself plus where each
//! field lies in it.
//!
//! Owns the hand-written protobuf reader for the envelope. It decodes the
//! same envelope as prost's `Fact::decode` (see [`super::decode`]) but
//! records positions instead of copying: no `String` per field, no
//! `BTreeMap`, and one reference-counted handle per fact (the input, moved
//! in) rather than one per field.
//!
//! ```text
//!  content (Bytes) ──► read: spans of the last id / … / payload, metadata
//!       │                    entries as span pairs, trace_info as spans too
//!       └── moved into the FactView, beside the spans
//!              ├── id(), aggregate_type(), …, metadata(), trace_info() ──► &str borrowed from it
//!              ├── utf8(TextField) ──► the same strings as bytes, not checked a second time
//!              ├── aggregate_id_bytes(), payload() ──► Bytes slices of it (a count increment)
//!              └── into_envelope(), into_payload() ──► the handle itself (no count change)
//! ```
//!
//! **Invariants**
//! - One handle: a view holds the input `Bytes` (unchanged, not copied) and
//!   nothing else reference-counted. Decoding a fact without metadata does
//!   not allocate (an empty `Vec` does not allocate); only metadata entries
//!   fill a `Vec`, of positions.
//! - Every span lies inside the envelope and covers a whole string field
//!   that was checked to be UTF-8 while decoding, so the `&str` accessors,
//!   which re-check it because the crate forbids `unsafe`, never take their
//!   `""` fallback on a view from [`decode_view`].
//! - Same result as prost for every input: `decode_view(b).map(|v| v.to_fact())`
//!   is `Ok` exactly when `Fact::decode(b)` is, with an equal `Fact`. That
//!   includes prost's rules for odd but legal input: the last value of a
//!   repeated scalar or string field wins; a repeated `trace_info` merges
//!   into the first (scalars overridden, map entries accumulated); a map
//!   entry missing its key or value has `""` there, unknown fields in it are
//!   skipped, and the last of duplicate keys wins; unknown fields of wire
//!   types 0/1/2/5 and groups (3 … 4, nested up to prost's recursion limit)
//!   are skipped. A known field (maps included) with the wrong wire type,
//!   field number 0, wire types 6/7, a stray or mismatched end-group, a
//!   varint over 10 bytes or over `u64::MAX`, a key over 32 bits, a length
//!   beyond its message and invalid UTF-8 in a string are errors.
//! - Metadata iterates sorted by key with unique keys: the content and
//!   order of prost's `BTreeMap`.
//! - Decoding and every accessor never panic; malformed input is an
//!   [`EnvelopeError`]. Offsets only grow up to the input's length, so their
//!   sums cannot overflow.

use std::fmt;

use bytes::{Buf as _, Bytes};

use super::{EnvelopeError, Fact, TraceInfo};

/// prost's `RECURSION_LIMIT`: the nesting budget of a top-level field. Each
/// embedded message, map entry and group level spends one, and skipping a
/// field with no budget left is an error, as in prost.
const RECURSION_LIMIT: u32 = 100;

/// A decoded `factlib.v1.Fact`: the envelope it was decoded from and where
/// each field lies in it.
///
/// The string accessors return `&str` borrowed from the envelope. Because
/// the crate forbids `unsafe`, each call re-checks the field's UTF-8 (O(len),
/// fast on ASCII; it cannot fail after decoding): hold on to the `&str`
/// rather than calling an accessor in a loop.
///
/// Two views are equal when their envelopes are (and so their content).
#[derive(Clone, Default, PartialEq, Eq)]
pub struct FactView {
    envelope: Bytes,
    fields: Fields,
}

/// A map entry: where its key and its value lie.
type Entry = (Span, Span);

/// A fact's fields as positions in its envelope.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Fields {
    id: Span,
    aggregate_type: Span,
    aggregate_id: Span,
    event_type: Span,
    payload: Span,
    created_at: i64,
    /// Sorted by key bytes, keys unique.
    metadata: Vec<Entry>,
    trace_info: Option<TraceFields>,
}

/// A `TraceInfo`'s fields as positions in the fact's envelope.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct TraceFields {
    trace_id: Span,
    span_id: Span,
    /// Sorted by key bytes, keys unique.
    metadata: Vec<Entry>,
}

/// A string field of the envelope, for [`FactView::utf8`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TextField {
    /// [`FactView::id`]
    Id,
    /// [`FactView::aggregate_type`]
    AggregateType,
    /// [`FactView::aggregate_id`]
    AggregateId,
    /// [`FactView::event_type`]
    EventType,
}

impl FactView {
    /// A string field's bytes, UTF-8 as checked while decoding. The hot
    /// path's accessor: the `&str` ones check the bytes again (the crate
    /// forbids `unsafe`), which costs about as much as decoding the field.
    pub fn utf8(&self, field: TextField) -> &[u8] {
        let span = match field {
            TextField::Id => self.fields.id,
            TextField::AggregateType => self.fields.aggregate_type,
            TextField::AggregateId => self.fields.aggregate_id,
            TextField::EventType => self.fields.event_type,
        };
        span.bytes_in(&self.envelope)
    }

    /// A UUIDv7, unique per fact.
    pub fn id(&self) -> &str {
        self.fields.id.str_in(&self.envelope)
    }

    /// The kind of aggregate the fact is about, e.g. "order".
    pub fn aggregate_type(&self) -> &str {
        self.fields.aggregate_type.str_in(&self.envelope)
    }

    /// The aggregate instance, e.g. "o-1"; the Kafka key.
    pub fn aggregate_id(&self) -> &str {
        self.fields.aggregate_id.str_in(&self.envelope)
    }

    /// [`Self::aggregate_id`] as a zero-copy slice of the envelope (a
    /// reference-count increment; an empty id holds no reference).
    pub fn aggregate_id_bytes(&self) -> Bytes {
        self.fields.aggregate_id.slice_of(&self.envelope)
    }

    /// What happened, e.g. "order.placed".
    pub fn event_type(&self) -> &str {
        self.fields.event_type.str_in(&self.envelope)
    }

    /// The application payload, opaque to Factlib, as a zero-copy slice of
    /// the envelope (a reference-count increment; an empty payload holds no
    /// reference).
    pub fn payload(&self) -> Bytes {
        self.fields.payload.slice_of(&self.envelope)
    }

    /// The payload, reusing the envelope's handle: no reference-count
    /// change, unlike [`Self::payload`] followed by dropping the view.
    pub fn into_payload(self) -> Bytes {
        self.fields.payload.narrow(self.envelope)
    }

    /// The payload, borrowed from the envelope.
    pub fn payload_slice(&self) -> &[u8] {
        self.fields.payload.bytes_in(&self.envelope)
    }

    /// The payload's length in bytes.
    pub fn payload_len(&self) -> usize {
        self.payload_slice().len()
    }

    /// When the fact was created, in Unix nanoseconds.
    pub fn created_at(&self) -> i64 {
        self.fields.created_at
    }

    /// Free-form string metadata, sorted by key, keys unique (the last of
    /// duplicate keys won).
    pub fn metadata(&self) -> impl ExactSizeIterator<Item = (&str, &str)> + '_ {
        pairs(&self.envelope, &self.fields.metadata)
    }

    /// The number of metadata entries.
    pub fn metadata_len(&self) -> usize {
        self.fields.metadata.len()
    }

    /// Distributed-tracing context of the emitting request, when the fact
    /// carries one (possibly empty).
    pub fn trace_info(&self) -> Option<TraceRef<'_>> {
        self.fields.trace_info.as_ref().map(|fields| TraceRef {
            envelope: &self.envelope,
            fields,
        })
    }

    /// The envelope the view was decoded from, unchanged.
    pub fn envelope(&self) -> &Bytes {
        &self.envelope
    }

    /// The envelope the view was decoded from, without a reference-count
    /// change.
    pub fn into_envelope(self) -> Bytes {
        self.envelope
    }

    /// Checks the fields every fact must carry: `id`, `aggregate_type`,
    /// `aggregate_id` and `event_type`. A fact without one can't be routed,
    /// keyed or told apart from others, so it belongs in the dead-letter
    /// topic with this error. Every Factlib emitter requires the four; the
    /// aggregate id is the Kafka key, which keeps an aggregate's facts in
    /// order, so an empty one is refused too.
    pub fn check_required(&self) -> Result<(), EnvelopeError> {
        let missing = [
            (TextField::Id, "id (1)"),
            (TextField::AggregateType, "aggregate_type (2)"),
            (TextField::AggregateId, "aggregate_id (3)"),
            (TextField::EventType, "event_type (4)"),
        ]
        .into_iter()
        .find(|&(field, _)| self.utf8(field).is_empty());
        match missing {
            Some((_, name)) => Err(EnvelopeError(format!(
                "the required field {name} is missing or empty"
            ))),
            None => Ok(()),
        }
    }

    /// The prost type with the same content (copies every string).
    pub fn to_fact(&self) -> Fact {
        Fact {
            id: self.id().to_owned(),
            aggregate_type: self.aggregate_type().to_owned(),
            aggregate_id: self.aggregate_id().to_owned(),
            event_type: self.event_type().to_owned(),
            payload: self.payload(),
            created_at: self.created_at(),
            metadata: to_map(self.metadata()),
            trace_info: self.trace_info().map(|t| t.to_trace_info()),
        }
    }
}

impl fmt::Debug for FactView {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FactView")
            .field("id", &self.id())
            .field("aggregate_type", &self.aggregate_type())
            .field("aggregate_id", &self.aggregate_id())
            .field("event_type", &self.event_type())
            .field("payload_len", &self.payload_len())
            .field("created_at", &self.created_at())
            .field("metadata", &MapDebug(&self.envelope, &self.fields.metadata))
            .field("trace_info", &self.trace_info())
            .finish()
    }
}

/// A fact's `factlib.v1.TraceInfo`, borrowed from its [`FactView`].
#[derive(Clone, Copy)]
pub struct TraceRef<'a> {
    envelope: &'a [u8],
    fields: &'a TraceFields,
}

impl<'a> TraceRef<'a> {
    /// W3C trace id.
    pub fn trace_id(&self) -> &'a str {
        self.fields.trace_id.str_in(self.envelope)
    }

    /// W3C parent span id.
    pub fn span_id(&self) -> &'a str {
        self.fields.span_id.str_in(self.envelope)
    }

    /// The metadata value under `key`.
    pub fn get(&self, key: &str) -> Option<&'a str> {
        let entries = &self.fields.metadata;
        let i = entries
            .binary_search_by(|(k, _)| k.bytes_in(self.envelope).cmp(key.as_bytes()))
            .ok()?;
        entries.get(i).map(|(_, v)| v.str_in(self.envelope))
    }

    /// Extra tracing metadata (e.g. tracestate), sorted by key, keys unique
    /// (the last of duplicate keys won).
    pub fn metadata(&self) -> impl ExactSizeIterator<Item = (&'a str, &'a str)> + 'a {
        pairs(self.envelope, &self.fields.metadata)
    }

    /// The number of metadata entries.
    pub fn metadata_len(&self) -> usize {
        self.fields.metadata.len()
    }

    fn to_trace_info(self) -> TraceInfo {
        TraceInfo {
            trace_id: self.trace_id().to_owned(),
            span_id: self.span_id().to_owned(),
            metadata: to_map(self.metadata()),
        }
    }
}

impl fmt::Debug for TraceRef<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TraceRef")
            .field("trace_id", &self.trace_id())
            .field("span_id", &self.span_id())
            .field("metadata", &MapDebug(self.envelope, &self.fields.metadata))
            .finish()
    }
}

/// Decodes an envelope without copying: the view keeps `content` and the
/// positions of its fields. Accepts and rejects exactly what
/// [`super::decode`] does, with equal content.
pub fn decode_view(content: Bytes) -> Result<FactView, EnvelopeError> {
    decode_view_or_return(content).map_err(|(error, _)| error)
}

/// [`decode_view`], handing `content` back when it does not decode, so the
/// caller can still dead-letter the raw bytes without having cloned them
/// (a reference-count increment and decrement per fact) beforehand.
pub fn decode_view_or_return(content: Bytes) -> Result<FactView, (EnvelopeError, Bytes)> {
    let mut fields = Fields::default();
    match read_fact(&content, &mut fields) {
        Ok(()) => Ok(FactView {
            envelope: content,
            fields,
        }),
        Err(m) => Err((
            EnvelopeError(format!("{} at byte {}", m.reason, m.at)),
            content,
        )),
    }
}

/// Where a field's bytes lie in the envelope: `start..end`. Spans come from
/// the reader, so they are inside the envelope with `start <= end`; the
/// accessors still check, and treat anything else as empty.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Span {
    start: usize,
    end: usize,
}

impl Span {
    /// `content[self]`, or empty.
    fn bytes_in(self, content: &[u8]) -> &[u8] {
        content.get(self.start..self.end).unwrap_or_default()
    }

    /// `content[self]` as a string, or `""`: checked to be UTF-8 while
    /// decoding, so the fallback is never taken.
    fn str_in(self, content: &[u8]) -> &str {
        std::str::from_utf8(self.bytes_in(content)).unwrap_or_default()
    }

    fn is_within(self, content: &[u8]) -> bool {
        self.start < self.end && self.end <= content.len()
    }

    /// `content[self]`, zero-copy; an empty span yields an empty `Bytes`
    /// that holds no reference.
    fn slice_of(self, content: &Bytes) -> Bytes {
        if self.is_within(content) {
            content.slice(self.start..self.end)
        } else {
            Bytes::new()
        }
    }

    /// `content[self]`, reusing the `content` handle.
    fn narrow(self, mut content: Bytes) -> Bytes {
        if self.is_within(&content) {
            content.truncate(self.end);
            content.advance(self.start);
            content
        } else {
            Bytes::new()
        }
    }
}

/// Map entries as string pairs.
fn pairs<'a>(
    content: &'a [u8],
    entries: &'a [Entry],
) -> impl ExactSizeIterator<Item = (&'a str, &'a str)> + 'a {
    entries
        .iter()
        .map(move |&(k, v)| (k.str_in(content), v.str_in(content)))
}

fn to_map<'a>(
    pairs: impl Iterator<Item = (&'a str, &'a str)>,
) -> std::collections::BTreeMap<String, String> {
    pairs.map(|(k, v)| (k.to_owned(), v.to_owned())).collect()
}

/// Formats map entries as a map of strings.
struct MapDebug<'a>(&'a [u8], &'a [Entry]);

impl fmt::Debug for MapDebug<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map().entries(pairs(self.0, self.1)).finish()
    }
}

/// Map entries in arrival order → sorted by key, the last of equal keys
/// kept: what inserting them one by one into a `BTreeMap` gives.
fn sort_dedup(content: &[u8], entries: &mut Vec<Entry>) {
    if entries.len() < 2 {
        return;
    }
    // Stable, so equal keys stay in arrival order.
    entries.sort_by(|a, b| a.0.bytes_in(content).cmp(b.0.bytes_in(content)));
    // `later` is dropped when it matches `kept`; it hands over its value first.
    entries.dedup_by(|later, kept| {
        let same = later.0.bytes_in(content) == kept.0.bytes_in(content);
        if same {
            kept.1 = later.1;
        }
        same
    });
}

/// Reads a whole envelope into `f`.
fn read_fact(content: &[u8], f: &mut Fields) -> Result<(), Malformed> {
    let mut r = Reader {
        rest: content,
        at: 0,
    };
    while !r.rest.is_empty() {
        let (tag, wire) = r.key()?;
        match tag {
            1 => f.id = r.string(wire)?,
            2 => f.aggregate_type = r.string(wire)?,
            3 => f.aggregate_id = r.string(wire)?,
            4 => f.event_type = r.string(wire)?,
            5 => {
                r.expect(wire, Wire::Len)?;
                f.payload = r.body()?.0;
            }
            6 => {
                r.expect(wire, Wire::Varint)?;
                // Two's-complement reinterpretation, as prost's `int64`.
                f.created_at = r.varint()? as i64;
            }
            7 => f.metadata.push(r.map_entry(wire, RECURSION_LIMIT - 1)?),
            8 => {
                r.expect(wire, Wire::Len)?;
                let t = f.trace_info.get_or_insert_with(TraceFields::default);
                read_trace(&mut r.nested()?, t)?;
            }
            _ => r.skip(wire, tag, RECURSION_LIMIT)?,
        }
    }
    sort_dedup(content, &mut f.metadata);
    if let Some(t) = &mut f.trace_info {
        sort_dedup(content, &mut t.metadata);
    }
    Ok(())
}

/// Merges one `TraceInfo` occurrence into `t`; its metadata is sorted by the
/// caller once all occurrences are in.
fn read_trace(r: &mut Reader<'_>, t: &mut TraceFields) -> Result<(), Malformed> {
    // One level below the fact.
    let budget = RECURSION_LIMIT - 1;
    while !r.rest.is_empty() {
        let (tag, wire) = r.key()?;
        match tag {
            1 => t.trace_id = r.string(wire)?,
            2 => t.span_id = r.string(wire)?,
            3 => t.metadata.push(r.map_entry(wire, budget - 1)?),
            _ => r.skip(wire, tag, budget)?,
        }
    }
    Ok(())
}

/// Protobuf wire types 0–5; 6 and 7 do not decode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Wire {
    Varint,
    Fixed64,
    Len,
    StartGroup,
    EndGroup,
    Fixed32,
}

/// Why and where the input is malformed.
#[derive(Debug)]
struct Malformed {
    reason: &'static str,
    at: usize,
}

/// A cursor over one message of the input: `rest` is the unread part of the
/// message, starting `at` bytes into the input.
struct Reader<'a> {
    rest: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn fail<T>(&self, reason: &'static str) -> Result<T, Malformed> {
        Err(Malformed {
            reason,
            at: self.at,
        })
    }

    /// Consumes `n` bytes of the message.
    fn take(&mut self, n: usize) -> Result<&'a [u8], Malformed> {
        let Some((head, tail)) = self.rest.split_at_checked(n) else {
            return self.fail("field runs past the end of its message");
        };
        self.rest = tail;
        self.at += n;
        Ok(head)
    }

    /// A base-128 varint of at most 10 bytes whose value fits a `u64` (the
    /// tenth byte is 0 or 1), as prost's `decode_varint`.
    fn varint(&mut self) -> Result<u64, Malformed> {
        // Keys and short lengths are one byte: the common case, inline.
        if let Some((&byte, tail)) = self.rest.split_first() {
            if byte < 0x80 {
                self.rest = tail;
                self.at += 1;
                return Ok(u64::from(byte));
            }
        }
        let mut value = 0u64;
        for (i, &byte) in self.rest.iter().take(10).enumerate() {
            value |= u64::from(byte & 0x7f) << (7 * i);
            if byte < 0x80 {
                if i == 9 && byte > 1 {
                    return self.fail("varint overflows 64 bits");
                }
                self.take(i + 1)?;
                return Ok(value);
            }
        }
        self.fail("invalid varint")
    }

    /// A field key: the field number (not 0, key within `u32`) and wire type.
    fn key(&mut self) -> Result<(u32, Wire), Malformed> {
        let key = self.varint()?;
        let Ok(key) = u32::try_from(key) else {
            return self.fail("field key exceeds 32 bits");
        };
        let wire = match key & 7 {
            0 => Wire::Varint,
            1 => Wire::Fixed64,
            2 => Wire::Len,
            3 => Wire::StartGroup,
            4 => Wire::EndGroup,
            5 => Wire::Fixed32,
            _ => return self.fail("invalid wire type"),
        };
        let tag = key >> 3;
        if tag == 0 {
            return self.fail("field number 0");
        }
        Ok((tag, wire))
    }

    fn expect(&self, actual: Wire, expected: Wire) -> Result<(), Malformed> {
        if actual == expected {
            Ok(())
        } else {
            self.fail("known field with the wrong wire type")
        }
    }

    /// A length prefix and the body it covers: where the body lies in the
    /// input, and its bytes.
    fn body(&mut self) -> Result<(Span, &'a [u8]), Malformed> {
        let len = self.varint()?;
        let Ok(len) = usize::try_from(len) else {
            return self.fail("field runs past the end of its message");
        };
        let start = self.at;
        let body = self.take(len)?;
        Ok((
            Span {
                start,
                end: self.at,
            },
            body,
        ))
    }

    /// A reader over the next length-delimited body.
    fn nested(&mut self) -> Result<Reader<'a>, Malformed> {
        let (span, rest) = self.body()?;
        Ok(Reader {
            rest,
            at: span.start,
        })
    }

    /// Where a `string` field's value lies, checked to be UTF-8.
    fn string(&mut self, wire: Wire) -> Result<Span, Malformed> {
        self.expect(wire, Wire::Len)?;
        let (span, body) = self.body()?;
        // `is_ascii` first: envelope strings are mostly ASCII, and it
        // inlines where `from_utf8` is a call.
        if body.is_ascii() || std::str::from_utf8(body).is_ok() {
            Ok(span)
        } else {
            Err(Malformed {
                reason: "string field is not valid UTF-8",
                at: span.start,
            })
        }
    }

    /// One `map<string, string>` entry: a message with key = 1, value = 2.
    /// `budget` is the recursion budget of the entry's own fields.
    fn map_entry(&mut self, wire: Wire, budget: u32) -> Result<Entry, Malformed> {
        self.expect(wire, Wire::Len)?;
        let mut r = self.nested()?;
        let (mut key, mut value) = (Span::default(), Span::default());
        while !r.rest.is_empty() {
            let (tag, wire) = r.key()?;
            match tag {
                1 => key = r.string(wire)?,
                2 => value = r.string(wire)?,
                _ => r.skip(wire, tag, budget)?,
            }
        }
        Ok((key, value))
    }

    /// Skips an unknown field, as prost's `skip_field`: a group is skipped up
    /// to the end-group key of the same field number, each nesting level
    /// spending one of `budget`.
    fn skip(&mut self, wire: Wire, tag: u32, budget: u32) -> Result<(), Malformed> {
        let Some(inner) = budget.checked_sub(1) else {
            return self.fail("recursion limit reached");
        };
        match wire {
            Wire::Varint => {
                self.varint()?;
            }
            Wire::Fixed64 => {
                self.take(8)?;
            }
            Wire::Fixed32 => {
                self.take(4)?;
            }
            Wire::Len => {
                self.body()?;
            }
            Wire::StartGroup => loop {
                let (t, w) = self.key()?;
                if w == Wire::EndGroup {
                    if t != tag {
                        return self.fail("end-group key does not match its group");
                    }
                    break;
                }
                self.skip(w, t, inner)?;
            },
            Wire::EndGroup => return self.fail("end-group key outside a group"),
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use proptest::sample::Index;
    use proptest::test_runner::TestCaseError;
    use prost::Message as _;
    use std::collections::BTreeMap;

    /// The bug: a protobuf holding only `aggregate_type` was relayed as a
    /// fact with an empty key and an empty `factlib-id`.
    #[test]
    fn facts_missing_a_required_field_are_refused_naming_it() {
        let full = crate::fact::tests::sample();
        assert!(decode_view(Bytes::from(full.encode_to_vec()))
            .unwrap()
            .check_required()
            .is_ok());
        let only_type = Fact {
            aggregate_type: "order".into(),
            ..Fact::default()
        };
        let e = decode_view(Bytes::from(only_type.encode_to_vec()))
            .unwrap()
            .check_required()
            .unwrap_err();
        assert!(e.to_string().contains("id (1)"), "{e}");
        for (name, f) in [
            (
                "aggregate_type",
                Fact {
                    aggregate_type: String::new(),
                    ..full.clone()
                },
            ),
            (
                "aggregate_id",
                Fact {
                    aggregate_id: String::new(),
                    ..full.clone()
                },
            ),
            (
                "event_type",
                Fact {
                    event_type: String::new(),
                    ..full.clone()
                },
            ),
        ] {
            let e = decode_view(Bytes::from(f.encode_to_vec()))
                .unwrap()
                .check_required()
                .unwrap_err();
            assert!(e.to_string().contains(name), "{name}: {e}");
        }
    }

    // ---- helpers ----------------------------------------------------------

    fn put_varint(out: &mut Vec<u8>, mut v: u64) {
        while v >= 0x80 {
            out.push(u8::try_from(v & 0x7f).unwrap() | 0x80);
            v >>= 7;
        }
        out.push(u8::try_from(v).unwrap());
    }

    fn put_key(out: &mut Vec<u8>, tag: u32, wire: u8) {
        put_varint(out, (u64::from(tag) << 3) | u64::from(wire));
    }

    fn put_len(out: &mut Vec<u8>, tag: u32, body: &[u8]) {
        put_key(out, tag, 2);
        put_varint(out, body.len() as u64);
        out.extend_from_slice(body);
    }

    fn inside(input: &Bytes, part: &[u8]) -> bool {
        let start = input.as_ptr() as usize;
        let p = part.as_ptr() as usize;
        p >= start && p + part.len() <= start + input.len()
    }

    fn all_strs(v: &FactView) -> Vec<&str> {
        let mut out = vec![v.id(), v.aggregate_type(), v.aggregate_id(), v.event_type()];
        out.extend(v.metadata().flat_map(|(k, v)| [k, v]));
        if let Some(t) = v.trace_info() {
            out.extend([t.trace_id(), t.span_id()]);
            out.extend(t.metadata().flat_map(|(k, v)| [k, v]));
        }
        out
    }

    fn sorted_unique<'a>(m: impl Iterator<Item = (&'a str, &'a str)>) -> bool {
        let keys: Vec<_> = m.map(|(k, _)| k).collect();
        keys.windows(2).all(|w| w[0] < w[1])
    }

    /// `decode_view` and prost agree on `input`: both fail, or both succeed
    /// with the same fact. On success, the view keeps the input and its
    /// accessors borrow or slice it.
    fn agree(input: &[u8]) -> Result<(), TestCaseError> {
        let b = Bytes::copy_from_slice(input);
        let prost = Fact::decode(b.clone());
        let view = decode_view(b.clone());
        match (prost, view) {
            (Ok(p), Ok(v)) => {
                prop_assert_eq!(v.to_fact(), p, "input {:02x?}", input);
                prop_assert_eq!(
                    v.envelope().as_ptr(),
                    b.as_ptr(),
                    "the view keeps the input"
                );
                for s in all_strs(&v).into_iter().filter(|s| !s.is_empty()) {
                    prop_assert!(inside(&b, s.as_bytes()), "{s:?} is a copy");
                }
                for (field, text) in [
                    (TextField::Id, v.id()),
                    (TextField::AggregateType, v.aggregate_type()),
                    (TextField::AggregateId, v.aggregate_id()),
                    (TextField::EventType, v.event_type()),
                ] {
                    prop_assert_eq!(v.utf8(field), text.as_bytes(), "{:?}", field);
                }
                let (key, payload) = (v.aggregate_id_bytes(), v.payload());
                prop_assert_eq!(&key[..], v.aggregate_id().as_bytes());
                prop_assert!(key.is_empty() || inside(&b, &key));
                prop_assert!(payload.is_empty() || inside(&b, &payload));
                prop_assert_eq!(payload.len(), v.payload_len());
                prop_assert_eq!(&v.clone().into_payload(), &payload);
                prop_assert_eq!(v.metadata().len(), v.metadata_len());
                prop_assert!(sorted_unique(v.metadata()));
                if let Some(t) = v.trace_info() {
                    prop_assert_eq!(t.metadata().len(), t.metadata_len());
                    prop_assert!(sorted_unique(t.metadata()));
                    for (k, value) in t.metadata() {
                        prop_assert_eq!(t.get(k), Some(value));
                    }
                }
            }
            (Err(_), Err(_)) => {}
            (p, v) => {
                return Err(TestCaseError::fail(format!(
                    "prost {:?} but view {:?} on {input:02x?}",
                    p.map(|_| ()),
                    v.map(|_| ()),
                )))
            }
        }
        Ok(())
    }

    fn assert_agree(input: &[u8]) {
        if let Err(e) = agree(input) {
            panic!("{e}");
        }
    }

    // ---- strategies -------------------------------------------------------

    fn arb_string() -> impl Strategy<Value = String> {
        prop_oneof![
            3 => "[a-z0-9._-]{0,12}",
            // Any scalar values: multi-byte, control and non-characters.
            2 => proptest::collection::vec(any::<char>(), 0..8).prop_map(String::from_iter),
        ]
    }

    fn arb_map() -> impl Strategy<Value = BTreeMap<String, String>> {
        prop_oneof![
            2 => Just(BTreeMap::new()),
            3 => proptest::collection::btree_map(arb_string(), arb_string(), 1..5),
        ]
    }

    fn arb_trace() -> impl Strategy<Value = TraceInfo> {
        (arb_string(), arb_string(), arb_map()).prop_map(|(trace_id, span_id, metadata)| {
            TraceInfo {
                trace_id,
                span_id,
                metadata,
            }
        })
    }

    fn arb_fact() -> impl Strategy<Value = Fact> {
        (
            (arb_string(), arb_string(), arb_string(), arb_string()),
            proptest::collection::vec(any::<u8>(), 0..48),
            any::<i64>(),
            arb_map(),
            proptest::option::of(arb_trace()),
        )
            .prop_map(
                |(
                    (id, aggregate_type, aggregate_id, event_type),
                    payload,
                    created_at,
                    metadata,
                    trace_info,
                )| {
                    Fact {
                        id,
                        aggregate_type,
                        aggregate_id,
                        event_type,
                        payload: Bytes::from(payload),
                        created_at,
                        metadata,
                        trace_info,
                    }
                },
            )
    }

    /// An edit of an encoding.
    #[derive(Debug, Clone)]
    enum Edit {
        Set(Index, u8),
        Insert(Index, Vec<u8>),
        Remove(Index),
        Truncate(Index),
    }

    fn arb_edit() -> impl Strategy<Value = Edit> {
        prop_oneof![
            3 => (any::<Index>(), any::<u8>()).prop_map(|(i, b)| Edit::Set(i, b)),
            2 => (any::<Index>(), proptest::collection::vec(any::<u8>(), 1..4))
                .prop_map(|(i, b)| Edit::Insert(i, b)),
            2 => any::<Index>().prop_map(Edit::Remove),
            1 => any::<Index>().prop_map(Edit::Truncate),
        ]
    }

    fn apply(mut bytes: Vec<u8>, edits: &[Edit]) -> Vec<u8> {
        for e in edits {
            let n = bytes.len();
            match e {
                Edit::Set(i, b) if n > 0 => bytes[i.index(n)] = *b,
                Edit::Insert(i, b) => {
                    let at = i.index(n + 1);
                    bytes.splice(at..at, b.iter().copied());
                }
                Edit::Remove(i) if n > 0 => {
                    bytes.remove(i.index(n));
                }
                Edit::Truncate(i) => bytes.truncate(i.index(n + 1)),
                _ => {}
            }
        }
        bytes
    }

    /// Hand-assembled wire fields: any field number with any wire type,
    /// nested messages, groups (matched or not) and raw junk.
    #[derive(Debug, Clone)]
    enum Node {
        Varint(u32, u64),
        Fixed(u32, bool),
        Len(u32, Vec<u8>),
        Text(u32, String),
        Msg(u32, u8, Vec<Node>),
        Group(u32, Vec<Node>, u32),
        Raw(Vec<u8>),
    }

    fn encode_nodes(out: &mut Vec<u8>, nodes: &[Node]) {
        for n in nodes {
            match n {
                Node::Varint(t, v) => {
                    put_key(out, *t, 0);
                    put_varint(out, *v);
                }
                Node::Fixed(t, wide) => {
                    put_key(out, *t, if *wide { 1 } else { 5 });
                    out.extend_from_slice(if *wide { &[7; 8][..] } else { &[5; 4][..] });
                }
                Node::Len(t, b) => put_len(out, *t, b),
                Node::Text(t, s) => put_len(out, *t, s.as_bytes()),
                Node::Msg(t, wire, children) => {
                    let mut body = Vec::new();
                    encode_nodes(&mut body, children);
                    put_key(out, *t, *wire);
                    put_varint(out, body.len() as u64);
                    out.extend_from_slice(&body);
                }
                Node::Group(t, children, end) => {
                    put_key(out, *t, 3);
                    encode_nodes(out, children);
                    put_key(out, *end, 4);
                }
                Node::Raw(b) => out.extend_from_slice(b),
            }
        }
    }

    fn arb_tag() -> impl Strategy<Value = u32> {
        prop_oneof![
            8 => 1u32..=8,
            2 => 0u32..=20,
            1 => Just((1u32 << 29) - 1),
            1 => Just(1u32 << 29),
        ]
    }

    fn arb_nodes() -> impl Strategy<Value = Vec<Node>> {
        let leaf = prop_oneof![
            2 => (arb_tag(), any::<u64>()).prop_map(|(t, v)| Node::Varint(t, v)),
            1 => (arb_tag(), any::<bool>()).prop_map(|(t, w)| Node::Fixed(t, w)),
            2 => (arb_tag(), proptest::collection::vec(any::<u8>(), 0..6))
                .prop_map(|(t, b)| Node::Len(t, b)),
            4 => (arb_tag(), "[a-c]{0,3}").prop_map(|(t, s)| Node::Text(t, s)),
            1 => proptest::collection::vec(any::<u8>(), 1..4).prop_map(Node::Raw),
        ];
        let node = leaf.prop_recursive(4, 48, 6, |inner| {
            let wire = prop_oneof![6 => Just(2u8), 1 => 0u8..=7];
            prop_oneof![
                4 => (arb_tag(), wire, proptest::collection::vec(inner.clone(), 0..5))
                    .prop_map(|(t, w, c)| Node::Msg(t, w, c)),
                1 => (arb_tag(), proptest::collection::vec(inner, 0..4), any::<bool>())
                    .prop_map(|(t, c, same)| Node::Group(t, c, if same { t } else { t ^ 1 })),
            ]
        });
        proptest::collection::vec(node, 0..8)
    }

    // ---- properties -------------------------------------------------------

    // Case counts keep the whole module under ~10 s in a debug build.
    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        #[test]
        fn valid_facts_decode_as_prost_and_borrow_the_input(fact in arb_fact()) {
            let input = Bytes::from(fact.encode_to_vec());
            let view = decode_view(input.clone()).unwrap();
            prop_assert_eq!(&view.to_fact(), &fact);
            prop_assert_eq!(&view.to_fact(), &Fact::decode(input.clone()).unwrap());
            prop_assert!(view.id().is_empty() || inside(&input, view.id().as_bytes()));
            prop_assert!(view.payload().is_empty() || inside(&input, &view.payload()));
            agree(&input)?;
        }

        #[test]
        fn mutated_encodings_agree_with_prost(
            fact in arb_fact(),
            edits in proptest::collection::vec(arb_edit(), 1..4),
        ) {
            agree(&apply(fact.encode_to_vec(), &edits))?;
        }

        #[test]
        fn hand_assembled_fields_agree_with_prost(nodes in arb_nodes()) {
            let mut bytes = Vec::new();
            encode_nodes(&mut bytes, &nodes);
            agree(&bytes)?;
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(5000))]

        #[test]
        fn arbitrary_bytes_agree_with_prost(
            bytes in proptest::collection::vec(any::<u8>(), 0..96),
        ) {
            agree(&bytes)?;
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(1000))]

        /// Two encodings back to back are one valid message: the second
        /// merges into the first.
        #[test]
        fn concatenated_encodings_agree_with_prost(
            a in arb_fact(),
            b in arb_fact(),
            edits in proptest::collection::vec(arb_edit(), 0..2),
        ) {
            let mut twice = a.encode_to_vec();
            twice.extend_from_slice(&a.encode_to_vec());
            agree(&twice)?;
            let mut both = a.encode_to_vec();
            both.extend_from_slice(&b.encode_to_vec());
            agree(&both)?;
            agree(&apply(both, &edits))?;
        }
    }

    // ---- cases ------------------------------------------------------------

    #[test]
    fn empty_input_is_all_defaults() {
        assert_eq!(decode_view(Bytes::new()).unwrap(), FactView::default());
        assert_agree(b"");
    }

    #[test]
    fn repeated_trace_info_merges() {
        let first = TraceInfo {
            trace_id: "t1".into(),
            span_id: "s1".into(),
            metadata: BTreeMap::from([("k".into(), "1".into()), ("z".into(), "z".into())]),
        };
        let second = TraceInfo {
            trace_id: String::new(), // not encoded: t1 stays
            span_id: "s2".into(),
            metadata: BTreeMap::from([("k".into(), "2".into()), ("a".into(), "a".into())]),
        };
        let mut b = Vec::new();
        put_len(&mut b, 8, &first.encode_to_vec());
        put_len(&mut b, 1, b"id");
        put_len(&mut b, 8, &second.encode_to_vec());
        put_len(&mut b, 8, b""); // an empty occurrence changes nothing
        let v = decode_view(Bytes::from(b.clone())).unwrap();
        let t = v.trace_info().unwrap();
        assert_eq!(t.trace_id(), "t1");
        assert_eq!(t.span_id(), "s2");
        let meta: Vec<_> = t.metadata().collect();
        assert_eq!(meta, [("a", "a"), ("k", "2"), ("z", "z")]);
        assert_eq!(t.get("k"), Some("2"));
        assert_eq!(t.get("b"), None);
        assert_agree(&b);

        // Present but empty is Some(default), not None.
        let v = decode_view(Bytes::from_static(b"\x42\x00")).unwrap();
        let t = v.trace_info().expect("present but empty");
        assert_eq!((t.trace_id(), t.span_id(), t.metadata_len()), ("", "", 0));
        assert_agree(b"\x42\x00");
    }

    #[test]
    fn duplicate_map_keys_keep_the_last_value() {
        let mut b = Vec::new();
        for (k, v) in [("b", "1"), ("a", "x"), ("b", "2"), ("c", "y"), ("b", "3")] {
            let mut entry = Vec::new();
            put_len(&mut entry, 1, k.as_bytes());
            put_len(&mut entry, 2, v.as_bytes());
            put_len(&mut b, 7, &entry);
        }
        // Key and value missing: ("", ""); value twice: the last wins; an
        // unknown field in the entry is skipped.
        put_len(&mut b, 7, b"");
        put_len(&mut b, 7, b"\x0a\x01d\x12\x01p\x18\x05\x12\x01q");
        let v = decode_view(Bytes::from(b.clone())).unwrap();
        let meta: Vec<_> = v.metadata().collect();
        assert_eq!(
            meta,
            [("", ""), ("a", "x"), ("b", "3"), ("c", "y"), ("d", "q")]
        );
        assert_agree(&b);
    }

    #[test]
    fn last_scalar_and_string_win() {
        let b = b"\x0a\x01a\x30\x01\x0a\x01b\x30\x02\x2a\x01x\x2a\x00";
        let v = decode_view(Bytes::from_static(b)).unwrap();
        assert_eq!((v.id(), v.created_at()), ("b", 2));
        assert!(v.payload().is_empty());
        assert_agree(b);
    }

    #[test]
    fn wrong_wire_type_on_a_known_field_is_an_error() {
        for tag in [1u32, 2, 3, 4, 5, 6, 7, 8] {
            for wire in 0u8..=5 {
                let mut b = Vec::new();
                put_key(&mut b, tag, wire);
                b.extend_from_slice(&[0; 8]);
                let expected_ok = wire == if tag == 6 { 0 } else { 2 };
                if !expected_ok {
                    assert!(decode_view(Bytes::from(b.clone())).is_err(), "{b:02x?}");
                }
                assert_agree(&b);
            }
        }
    }

    /// Map fields (Fact.metadata = 7, TraceInfo.metadata = 3) too.
    #[test]
    fn wrong_wire_type_on_a_map_field_is_an_error() {
        for wire in [0u8, 1, 3, 4, 5] {
            let mut b = Vec::new();
            put_key(&mut b, 7, wire);
            b.extend_from_slice(b"\x06\x0a\x01k\x12\x01v");
            assert!(decode_view(Bytes::from(b.clone())).is_err(), "{b:02x?}");
            assert_agree(&b);
            let mut t = Vec::new();
            put_key(&mut t, 3, wire);
            t.extend_from_slice(b"\x00");
            let mut b = Vec::new();
            put_len(&mut b, 8, &t);
            assert!(decode_view(Bytes::from(b.clone())).is_err(), "{b:02x?}");
            assert_agree(&b);
        }
        // And in an entry: the key and value are strings.
        for b in [&b"\x3a\x02\x08\x01"[..], b"\x3a\x02\x10\x01"] {
            assert!(decode_view(Bytes::copy_from_slice(b)).is_err(), "{b:02x?}");
            assert_agree(b);
        }
    }

    #[test]
    fn field_number_zero_is_an_error() {
        for b in [&b"\x00\x00"[..], b"\x02\x00", b"\x0a\x00\x00"] {
            assert!(decode_view(Bytes::copy_from_slice(b)).is_err(), "{b:02x?}");
            assert_agree(b);
        }
        // Also inside a map entry and inside trace_info.
        for b in [&b"\x3a\x02\x00\x00"[..], b"\x42\x02\x00\x00"] {
            assert!(decode_view(Bytes::copy_from_slice(b)).is_err(), "{b:02x?}");
            assert_agree(b);
        }
    }

    #[test]
    fn ten_byte_varint_edges() {
        let max = b"\x30\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01"; // u64::MAX
        let v = decode_view(Bytes::from_static(max)).unwrap();
        assert_eq!(v.created_at(), -1);
        let min = b"\x30\x80\x80\x80\x80\x80\x80\x80\x80\x80\x01"; // 1 << 63
        assert_eq!(
            decode_view(Bytes::from_static(min)).unwrap().created_at(),
            i64::MIN
        );
        let padded = b"\x30\x80\x80\x80\x80\x80\x80\x80\x80\x80\x00"; // 0 in 10 bytes
        assert_eq!(
            decode_view(Bytes::from_static(padded))
                .unwrap()
                .created_at(),
            0
        );
        for ok in [&max[..], min, padded] {
            assert_agree(ok);
        }
        let bad: [&[u8]; 7] = [
            b"\x30\xff\xff\xff\xff\xff\xff\xff\xff\xff\x02", // overflows u64
            b"\x30\xff\xff\xff\xff\xff\xff\xff\xff\xff\x7f",
            b"\x30\x80\x80\x80\x80\x80\x80\x80\x80\x80\x80\x00", // 11 bytes
            b"\x30\xff\xff\xff\xff\xff\xff\xff\xff\xff",         // truncated at 10
            b"\x30\xff",                                         // truncated at 1
            b"\x88\x80\x80\x80\x80\x01\x00",                     // key over 32 bits
            b"\x80\x80\x80\x80\x10\x00",                         // key just over u32
        ];
        for b in bad {
            assert!(decode_view(Bytes::copy_from_slice(b)).is_err(), "{b:02x?}");
            assert_agree(b);
        }
        // A padded key within 32 bits is fine: field 6, varint, value 5.
        let padded_key = b"\xb0\x80\x80\x80\x00\x05";
        assert_eq!(
            decode_view(Bytes::from_static(padded_key))
                .unwrap()
                .created_at(),
            5
        );
        assert_agree(padded_key);
        // A 10-byte length prefix fits u64 but not the buffer.
        let huge_len = b"\x0a\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01";
        assert!(decode_view(Bytes::from_static(huge_len)).is_err());
        assert_agree(huge_len);
    }

    #[test]
    fn invalid_utf8_is_an_error() {
        let cases: [&[u8]; 6] = [
            b"\x0a\x01\xff",                 // id
            b"\x22\x02\xc3\x28",             // event_type
            b"\x3a\x03\x0a\x01\xff",         // metadata key
            b"\x3a\x03\x12\x01\x80",         // metadata value
            b"\x42\x03\x12\x01\xff",         // trace_info.span_id
            b"\x42\x05\x1a\x03\x12\x01\xff", // trace_info.metadata value
        ];
        for b in cases {
            assert!(decode_view(Bytes::copy_from_slice(b)).is_err(), "{b:02x?}");
            assert_agree(b);
        }
        // Even when a later valid value would overwrite it.
        let overwritten = b"\x0a\x01\xff\x0a\x01a";
        assert!(decode_view(Bytes::from_static(overwritten)).is_err());
        assert_agree(overwritten);
        // The payload is bytes, not a string.
        let v = decode_view(Bytes::from_static(b"\x2a\x01\xff")).unwrap();
        assert_eq!(&v.payload()[..], b"\xff");
    }

    #[test]
    fn unknown_fields_and_wire_types() {
        let skipped: [&[u8]; 5] = [
            b"\x48\x96\x01\x0a\x01a",                // field 9 varint
            b"\x51\x01\x02\x03\x04\x05\x06\x07\x08", // field 10 fixed64
            b"\x5d\x01\x02\x03\x04",                 // field 11 fixed32
            b"\x62\x02zz",                           // field 12 bytes
            b"\x6b\x08\x01\x0a\x00\x73\x74\x6c",     // field 13 group, nested group
        ];
        for b in skipped {
            assert!(decode_view(Bytes::copy_from_slice(b)).is_ok(), "{b:02x?}");
            assert_agree(b);
        }
        let errors: [&[u8]; 7] = [
            b"\x4e",         // wire type 6
            b"\x4f",         // wire type 7
            b"\x4c",         // end group outside a group
            b"\x4b\x08\x01", // group without its end
            b"\x4b\x54",     // group closed by another field number
            b"\x51\x01\x02", // fixed64 cut short
            b"\x62\x05zz",   // length beyond the input
        ];
        for b in errors {
            assert!(decode_view(Bytes::copy_from_slice(b)).is_err(), "{b:02x?}");
            assert_agree(b);
        }
        // A field that runs past its enclosing message is an error even
        // though the outer buffer holds the bytes.
        let past = b"\x42\x02\x0a\x05abcde";
        assert!(decode_view(Bytes::from_static(past)).is_err());
        assert_agree(past);
    }

    /// Nested groups spend prost's recursion budget: at the top level, in a
    /// map entry, in trace_info and in its map entries.
    #[test]
    fn group_nesting_follows_prost_recursion_limit() {
        fn groups(depth: usize) -> Vec<u8> {
            let mut b = Vec::new();
            for _ in 0..depth {
                put_key(&mut b, 9, 3);
            }
            for _ in 0..depth {
                put_key(&mut b, 9, 4);
            }
            b
        }
        for depth in 96..=102 {
            let g = groups(depth);
            let mut entry = Vec::new();
            put_len(&mut entry, 7, &g);
            let mut trace = Vec::new();
            put_len(&mut trace, 8, &g);
            let mut trace_entry = Vec::new();
            put_len(&mut trace_entry, 3, &g);
            let mut in_trace_entry = Vec::new();
            put_len(&mut in_trace_entry, 8, &trace_entry);
            for b in [&g, &entry, &trace, &in_trace_entry] {
                assert_agree(b);
            }
        }
        // The limit is actually reached: 100 levels are fine at the top,
        // 101 are not.
        assert!(decode_view(Bytes::from(groups(100))).is_ok());
        assert!(decode_view(Bytes::from(groups(101))).is_err());
    }

    #[test]
    fn default_view_is_empty() {
        let d = FactView::default();
        assert_eq!((d.id(), d.aggregate_id(), d.created_at()), ("", "", 0));
        assert_eq!((d.payload_len(), d.metadata_len()), (0, 0));
        assert!(d.payload().is_empty() && d.aggregate_id_bytes().is_empty());
        assert!(d.trace_info().is_none());
        assert!(d.clone().into_payload().is_empty() && d.into_envelope().is_empty());
    }

    #[test]
    fn debug_shows_the_strings() {
        let fact = Fact {
            id: "héllo".into(),
            payload: Bytes::from_static(b"\xff\x00"),
            metadata: BTreeMap::from([("k".into(), "v".into())]),
            trace_info: Some(TraceInfo::default()),
            ..Fact::default()
        };
        let v = decode_view(Bytes::from(fact.encode_to_vec())).unwrap();
        assert_eq!(
            format!("{v:?}"),
            "FactView { id: \"héllo\", aggregate_type: \"\", aggregate_id: \"\", \
             event_type: \"\", payload_len: 2, created_at: 0, metadata: {\"k\": \"v\"}, \
             trace_info: Some(TraceRef { trace_id: \"\", span_id: \"\", metadata: {} }) }"
        );
    }

    #[test]
    fn sample_decodes_and_borrows() {
        let fact = crate::fact::tests::sample();
        let input = Bytes::from(fact.encode_to_vec());
        let v = decode_view(input.clone()).unwrap();
        assert_eq!(v.to_fact(), fact);
        assert_eq!(v.aggregate_id(), "o-1");
        let t = v.trace_info().unwrap();
        assert_eq!(t.get("tracestate"), Some("k=v"));
        for s in all_strs(&v) {
            assert!(inside(&input, s.as_bytes()), "{s:?}");
        }
        assert!(inside(&input, &v.payload()));
        assert!(inside(&input, &v.aggregate_id_bytes()));
        let payload = v.clone().into_payload();
        assert_eq!(&payload[..], b"{\"total\":42}");
        assert!(inside(&input, &payload));
        assert_eq!(v.into_envelope().as_ptr(), input.as_ptr());
    }

    /// The error path hands the input back, unchanged.
    #[test]
    fn undecodable_input_is_handed_back() {
        let input = Bytes::from_static(b"\x0a\x05ab");
        let (err, back) = decode_view_or_return(input.clone()).unwrap_err();
        assert_eq!(back.as_ptr(), input.as_ptr());
        assert_eq!(back, input);
        assert_eq!(Some(err), decode_view(input).err());
    }
}
