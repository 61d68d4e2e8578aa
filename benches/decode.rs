//! Decode throughput of the replication hot path: backend framing,
//! XLogData, pgoutput and the fact envelope, over streams built from the
//! golden fixtures captured from a real server (`tests/fixtures/pg15`).
//! The envelope is decoded with prost (`fact::decode`) or with the
//! zero-copy view (`fact::view::decode_view`, the `-view` lines).
//!
//! - `decode/*`: the `mixed` fixture (facts among other prefixes, lone
//!   messages and a rolled-back transaction);
//! - `relay-stream/*`: the `single_fact` fixture's transaction (Begin, one
//!   fact, Commit), as a relay's messages-only publication streams it.
//!
//! Lines decode the way the relay does: `backend::parse_run` cuts runs of
//! CopyData, `ReplicationRef` and `PgOutputRef` decode them in place, and
//! a fact's envelope is the one `Bytes` handle made. `owned-api+…` decodes
//! through `ReplicationMessage` and `PgOutput` instead, one handle per
//! message.
//!
//! `cargo bench --bench decode`

mod common;

use bytes::BytesMut;
use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use factlib::pgwire::backend::{self, Backend, DEFAULT_MAX_FRAME};
use factlib::pgwire::pgoutput::{PgOutput, PgOutputRef};
use factlib::pgwire::replication::{ReplicationMessage, ReplicationRef};

/// How far a line decodes each message.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Depth {
    /// Backend frames and XLogData.
    Frames,
    /// And pgoutput.
    Pgoutput,
    /// And the facts' envelopes, with prost.
    Prost,
    /// And the facts' envelopes, with the view.
    View,
    /// The view, through the owned API (`backend::parse`,
    /// `ReplicationMessage`, `PgOutput`): one `Bytes` per message, the path
    /// the relay took before runs.
    OwnedView,
}

/// What a line's throughput counts.
#[derive(Clone, Copy)]
enum Per {
    Byte,
    Fact,
}

/// One timed line: its name, its depth and its throughput unit.
type Line = (&'static str, Depth, Per);

const DECODE: [Line; 6] = [
    ("frames", Depth::Frames, Per::Byte),
    ("frames+pgoutput", Depth::Pgoutput, Per::Byte),
    ("frames+pgoutput+envelope", Depth::Prost, Per::Byte),
    ("frames+pgoutput+envelope-view", Depth::View, Per::Byte),
    ("facts", Depth::Prost, Per::Fact),
    ("facts-view", Depth::View, Per::Fact),
];

const RELAY_STREAM: [Line; 6] = [
    ("frames", Depth::Frames, Per::Byte),
    ("frames+pgoutput", Depth::Pgoutput, Per::Byte),
    ("frames+pgoutput+envelope-view", Depth::View, Per::Byte),
    ("frames+pgoutput+envelope-prost", Depth::Prost, Per::Byte),
    ("owned-api+envelope-view", Depth::OwnedView, Per::Byte),
    ("facts-view", Depth::View, Per::Fact),
];

/// Decodes the whole stream down to `depth` the way the relay does: runs of
/// CopyData decoded in place, one `Bytes` per fact. Returns the number of
/// XLogData messages (`Frames`) or of facts that decoded (the others).
fn count(mut buf: BytesMut, depth: Depth) -> u64 {
    if depth == Depth::OwnedView {
        return count_owned(buf);
    }
    let mut n = 0;
    while let Ok(Some(m)) = backend::parse_run(&mut buf, DEFAULT_MAX_FRAME) {
        let Backend::CopyRun(mut run) = m else {
            continue;
        };
        while let Some(body) = run.next_body() {
            let bytes = run.bytes();
            let Some(Ok(ReplicationRef::XLogData(x))) = bytes.get(body).map(ReplicationRef::parse)
            else {
                continue;
            };
            if depth == Depth::Frames {
                n += 1;
                continue;
            }
            let Ok(PgOutputRef::Message(msg)) = PgOutputRef::decode(x.data) else {
                continue;
            };
            if msg.prefix != b"factlib" {
                continue;
            }
            n += u64::from(match depth {
                Depth::Frames | Depth::Pgoutput => true,
                Depth::Prost => factlib::fact::decode(bytes.slice_ref(msg.content)).is_ok(),
                Depth::View | Depth::OwnedView => {
                    // (`OwnedView` returned above, through `count_owned`.)
                    factlib::fact::view::decode_view(bytes.slice_ref(msg.content)).is_ok()
                }
            });
        }
    }
    n
}

/// [`count`] at `Depth::View` through the owned API.
fn count_owned(mut buf: BytesMut) -> u64 {
    let mut n = 0;
    while let Ok(Some(m)) = backend::parse(&mut buf, DEFAULT_MAX_FRAME) {
        let Backend::CopyData(body) = m else { continue };
        let Ok(ReplicationMessage::XLogData(x)) = ReplicationMessage::parse(body) else {
            continue;
        };
        let Ok(PgOutput::Message(msg)) = PgOutput::decode(x.data) else {
            continue;
        };
        if &msg.prefix[..] != b"factlib" {
            continue;
        }
        n += u64::from(factlib::fact::view::decode_view(msg.content).is_ok());
    }
    n
}

/// Benches `lines` over `stream`, in the criterion group `name`.
fn group(c: &mut Criterion, name: &str, stream: &[u8], lines: &[Line]) {
    let facts = count(BytesMut::from(stream), Depth::Prost);
    let view = count(BytesMut::from(stream), Depth::View);
    assert_eq!(facts, view, "prost and the view must accept the same facts");
    let owned = count(BytesMut::from(stream), Depth::OwnedView);
    assert_eq!(
        owned, view,
        "the owned and in-place APIs must find the same facts"
    );
    assert!(facts > 0, "{name}: the stream holds facts");
    let mut g = c.benchmark_group(name);
    for &(line, depth, per) in lines {
        g.throughput(match per {
            Per::Byte => Throughput::Bytes(u64::try_from(stream.len()).unwrap_or(u64::MAX)),
            Per::Fact => Throughput::Elements(facts),
        });
        // The copy into a fresh read buffer is setup, outside the timing.
        g.bench_function(line, |b| {
            b.iter_batched(
                || BytesMut::from(stream),
                |buf| count(buf, depth),
                BatchSize::LargeInput,
            )
        });
    }
    g.finish();
}

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn bench(c: &mut Criterion) {
    group(c, "decode", &common::fixture_stream(), &DECODE);
    group(c, "relay-stream", &common::relay_stream(), &RELAY_STREAM);
}

criterion_group!(benches, bench);
criterion_main!(benches);
