//! Decode throughput of the replication hot path: backend framing,
//! XLogData, pgoutput and the fact envelope, over a stream built from the
//! golden fixtures captured from a real server (`tests/fixtures/pg15`).
//!
//! `cargo bench --bench decode`

mod common;

use bytes::{Bytes, BytesMut};
use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use factlib::pgwire::backend::{self, Backend, DEFAULT_MAX_FRAME};
use factlib::pgwire::pgoutput::{DecodeContext, PgOutput};
use factlib::pgwire::replication::ReplicationMessage;

/// The `mixed` fixture's frames, repeated to about 8 MiB.
fn stream() -> (Bytes, u64) {
    let all = common::fixture_stream();
    let facts = count(BytesMut::from(&all[..]), true, true);
    (Bytes::from(all), facts)
}

/// Decodes the whole stream; returns the number of facts seen.
fn count(mut buf: BytesMut, pgoutput: bool, envelope: bool) -> u64 {
    let mut facts = 0;
    while let Ok(Some(m)) = backend::parse(&mut buf, DEFAULT_MAX_FRAME) {
        let Backend::CopyData(body) = m else { continue };
        let Ok(ReplicationMessage::XLogData(x)) = ReplicationMessage::parse(body) else {
            continue;
        };
        if !pgoutput {
            facts += 1;
            continue;
        }
        if let Ok(PgOutput::Message(msg)) = PgOutput::decode(x.data, DecodeContext::default()) {
            if &msg.prefix[..] == b"factlib" {
                if envelope {
                    if factlib::fact::decode(msg.content).is_ok() {
                        facts += 1;
                    }
                } else {
                    facts += 1;
                }
            }
        }
    }
    facts
}

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn bench(c: &mut Criterion) {
    let (stream, facts) = stream();
    let mut g = c.benchmark_group("decode");
    g.throughput(Throughput::Bytes(stream.len() as u64));
    // The copy into a fresh read buffer is setup, outside the timing.
    let input = || BytesMut::from(&stream[..]);
    let run = |b: &mut criterion::Bencher, pgoutput, envelope| {
        b.iter_batched(
            input,
            |buf| count(buf, pgoutput, envelope),
            BatchSize::LargeInput,
        )
    };
    g.bench_function("frames", |b| run(b, false, false));
    g.bench_function("frames+pgoutput", |b| run(b, true, false));
    g.bench_function("frames+pgoutput+envelope", |b| run(b, true, true));
    g.throughput(Throughput::Elements(facts));
    g.bench_function("facts", |b| run(b, true, true));
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
