//! Throughput of the progress tracker: feed transactions of `k` facts each
//! (`begin`, `fact` × k, `commit`), then ack every fact, in stream order or
//! in a shuffled (fixed-seed) order, reading the watermark every 100 acks
//! as the relay does when it builds status updates.
//!
//! Acking everything after feeding everything keeps all units in flight at
//! once: the shuffled case is the tracker's worst case for queue length.
//!
//! `cargo bench --bench progress`

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use factlib::progress::{Token, Tracker};
use factlib::Lsn;

// The allocator the relay binary uses (`src/main.rs`), so allocation costs
// (topic strings, keys, headers, queue growth) are the ones it pays.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Facts fed and acked per iteration.
const FACTS: usize = 100_000;
/// Acks between two watermark reads.
const WATERMARK_EVERY: usize = 100;

/// Ack orders: a permutation of fact indices (in stream order of `fact()`).
fn in_order() -> Vec<usize> {
    (0..FACTS).collect()
}

/// Fisher–Yates with a fixed-seed xorshift64, so every run acks alike.
fn shuffled() -> Vec<usize> {
    let mut order = in_order();
    let mut x: u64 = 0x5eed_f00d_cafe_d00d;
    for i in (1..order.len()).rev() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let j = usize::try_from(x % (i as u64 + 1)).unwrap_or(0);
        order.swap(i, j);
    }
    order
}

/// Feeds `FACTS / k` transactions and acks every fact in `order`; returns
/// the final watermark. `tokens` is scratch space, reused across runs.
fn run(k: usize, order: &[usize], tokens: &mut Vec<Token>) -> Lsn {
    let mut t = Tracker::new(Lsn(0));
    tokens.clear();
    let mut end = 0u64;
    for _ in 0..FACTS / k {
        t.begin().expect("no transaction is open");
        for _ in 0..k {
            tokens.push(t.fact().expect("a transaction is open"));
        }
        end += 0x100;
        t.commit(Lsn(end)).expect("a transaction is open");
    }
    let mut mark = Lsn(0);
    for (n, &i) in order.iter().enumerate() {
        t.ack(tokens[i]).expect("each fact is acked once");
        if (n + 1) % WATERMARK_EVERY == 0 {
            mark = t.watermark();
        }
    }
    mark.max(t.watermark())
}

fn bench(c: &mut Criterion) {
    let orders = [("in_order", in_order()), ("shuffled", shuffled())];
    let mut tokens = Vec::with_capacity(FACTS);
    let mut g = c.benchmark_group("progress");
    g.throughput(Throughput::Elements(FACTS as u64));
    for k in [1, 10] {
        for (name, order) in &orders {
            // Not a timing check: makes sure the bench measures a run that
            // ends with everything confirmed.
            let last = Lsn(0x100 * (FACTS / k) as u64);
            assert_eq!(run(k, order, &mut tokens), last, "{name}, k={k}");
            g.bench_function(BenchmarkId::new(*name, format!("k={k}")), |b| {
                b.iter(|| run(k, order, &mut tokens))
            });
        }
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
