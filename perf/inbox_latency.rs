//! perf/inbox_latency: from a fact's COMMIT in the producer's database to
//! its row being visible in `factlib.inbox`, end to end through the relay,
//! Kafka and `factlib inbox`.
//!
//! Emits RATE facts/s for SECS seconds, in transactions of TXN facts, with
//! the Rust emitter on two sessions, noting when each COMMIT returned. A
//! third session on the inbox database LISTENs for `factlib_inbox` (sent
//! by every inbox batch at its commit) and, on each notification (or every
//! 20 ms), reads the rows written since, noting when each became visible.
//! Latencies go into an hdrhistogram (µs).
//!
//! "Written since": with several inbox writers, `seq` is not in commit
//! order across partitions, but within a partition it is (one writer, one
//! transaction after another). So each read asks for `seq` above the lowest
//! of the partitions' highest seen `seq` (until rows of all PARTITIONS were
//! seen: the start), and ids already seen are skipped. (The 500 aggregates
//! keep every partition busy.)
//!
//! Usage: inbox_latency PRODUCER_URL PREFIX INBOX_URL RATE SECS [TXN [PARTITIONS]]
//! Prints `inbox-latency count=… p50_ms=… p99_ms=… p999_ms=… max_ms=… missing=…`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::StreamExt as _;
use tokio_postgres::{AsyncMessage, NoTls};

#[derive(Default)]
struct Times {
    committed: HashMap<String, Instant>,
    visible: HashMap<String, Instant>,
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (producer, prefix, inbox, rate, secs, txn, partitions) = match args.as_slice() {
        [_, p, pre, i, r, s] => (p, pre, i, r, s, "10", "6"),
        [_, p, pre, i, r, s, t] => (p, pre, i, r, s, t.as_str(), "6"),
        [_, p, pre, i, r, s, t, n] => (p, pre, i, r, s, t.as_str(), n.as_str()),
        _ => {
            eprintln!(
                "usage: inbox_latency PRODUCER_URL PREFIX INBOX_URL RATE SECS [TXN [PARTITIONS]]"
            );
            std::process::exit(2);
        }
    };
    let partitions: usize = partitions.parse().expect("PARTITIONS");
    let rate: f64 = rate.parse().expect("RATE");
    let secs: u64 = secs.parse().expect("SECS");
    let txn: usize = txn.parse().expect("TXN");
    let times = Arc::new(Mutex::new(Times::default()));

    let (reader, mut conn) = tokio_postgres::connect(inbox, NoTls)
        .await
        .expect("inbox database");
    let notified = Arc::new(tokio::sync::Notify::new());
    let wake = Arc::clone(&notified);
    tokio::spawn(async move {
        let mut messages = futures_util::stream::poll_fn(move |cx| conn.poll_message(cx));
        while let Some(Ok(m)) = messages.next().await {
            if let AsyncMessage::Notification(_) = m {
                wake.notify_one();
            }
        }
    });
    reader
        .batch_execute("LISTEN factlib_inbox")
        .await
        .expect("LISTEN");
    let start_seq: i64 = reader
        .query_one("SELECT coalesce(max(seq), 0) FROM factlib.inbox", &[])
        .await
        .expect("max(seq)")
        .get(0);

    let emitting = {
        let times = Arc::clone(&times);
        let (producer, prefix) = (producer.clone(), prefix.clone());
        tokio::spawn(async move { emit(&producer, &prefix, rate, secs, txn, times).await })
    };
    let expected = {
        let times = Arc::clone(&times);
        let read = async {
            let mut last = Floor::new(start_seq, partitions);
            loop {
                tokio::select! {
                    () = notified.notified() => {}
                    () = tokio::time::sleep(Duration::from_millis(20)) => {}
                }
                let rows = reader
                    .query(
                        "SELECT seq, id::text, \"partition\" FROM factlib.inbox WHERE seq > $1",
                        &[&last.floor()],
                    )
                    .await
                    .expect("read the inbox");
                note_visible(&times, &rows, &mut last);
            }
        };
        tokio::select! {
            n = emitting => n.expect("the emitter"),
            () = read => unreachable!(),
        }
    };
    // The tail: wait until every committed fact is visible (up to 60 s).
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut last = Floor::new(start_seq, partitions);
    loop {
        let rows = reader
            .query(
                "SELECT seq, id::text, \"partition\" FROM factlib.inbox WHERE seq > $1",
                &[&start_seq],
            )
            .await
            .expect("read the inbox");
        note_visible(&times, &rows, &mut last);
        if seen(&times) >= expected || Instant::now() >= deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let t = times.lock().unwrap();
    let mut h = hdrhistogram::Histogram::<u64>::new_with_bounds(1, 3_600_000_000, 3).unwrap();
    let mut missing = 0;
    for (id, committed) in &t.committed {
        match t.visible.get(id) {
            Some(v) => {
                let us = v.saturating_duration_since(*committed).as_micros();
                let _ = h.record(u64::try_from(us).unwrap_or(u64::MAX).max(1));
            }
            None => missing += 1,
        }
    }
    let ms = |q: f64| h.value_at_quantile(q) as f64 / 1e3;
    println!(
        "inbox-latency count={} p50_ms={:.1} p99_ms={:.1} p999_ms={:.1} max_ms={:.1} missing={missing}",
        h.len(),
        ms(0.5),
        ms(0.99),
        ms(0.999),
        h.max() as f64 / 1e3
    );
}

/// The highest `seq` seen per partition; rows above the lowest of them
/// may still be new.
struct Floor {
    start: i64,
    partitions: usize,
    seen: HashMap<i32, i64>,
}

impl Floor {
    fn new(start: i64, partitions: usize) -> Self {
        Floor {
            start,
            partitions,
            seen: HashMap::new(),
        }
    }

    fn floor(&self) -> i64 {
        if self.seen.len() < self.partitions {
            return self.start;
        }
        self.seen.values().copied().min().unwrap_or(self.start)
    }
}

/// Notes the rows (seq, id, partition) as visible now (the first time each
/// is seen).
fn note_visible(times: &Mutex<Times>, rows: &[tokio_postgres::Row], last: &mut Floor) {
    let now = Instant::now();
    let mut t = times.lock().unwrap();
    for r in rows {
        let (seq, partition): (i64, i32) = (r.get(0), r.get(2));
        let top = last.seen.entry(partition).or_insert(seq);
        *top = (*top).max(seq);
        t.visible.entry(r.get(1)).or_insert(now);
    }
}

/// How many committed facts are visible so far.
fn seen(times: &Mutex<Times>) -> usize {
    let t = times.lock().unwrap();
    t.committed
        .keys()
        .filter(|id| t.visible.contains_key(*id))
        .count()
}

/// Emits at `rate` for `secs` on two sessions; returns how many facts
/// committed.
async fn emit(
    url: &str,
    prefix: &str,
    rate: f64,
    secs: u64,
    txn: usize,
    times: Arc<Mutex<Times>>,
) -> usize {
    let sessions = 2;
    let per_session = rate / sessions as f64 / txn as f64;
    let mut tasks = Vec::new();
    for s in 0..sessions {
        let (url, prefix, times) = (url.to_owned(), prefix.to_owned(), Arc::clone(&times));
        tasks.push(tokio::spawn(async move {
            let (mut c, conn) = tokio_postgres::connect(&url, NoTls)
                .await
                .expect("producer");
            tokio::spawn(conn);
            c.batch_execute("SET synchronous_commit = on")
                .await
                .expect("SET");
            let every = Duration::from_secs_f64(1.0 / per_session);
            let start = Instant::now();
            let mut next = start;
            let mut n = 0usize;
            while start.elapsed() < Duration::from_secs(secs) {
                let tx = c.transaction().await.expect("BEGIN");
                let mut ids = Vec::with_capacity(txn);
                for i in 0..txn {
                    let f = factlib::emit::NewFact {
                        aggregate_type: "order".into(),
                        aggregate_id: format!("o-{}", (n + i) % 500),
                        event_type: "order.changed".into(),
                        payload: bytes::Bytes::from(format!("{{\"s\":{s},\"n\":{}}}", n + i)),
                        ..Default::default()
                    };
                    let (fact, _) = factlib::emit::emit(&tx, &prefix, f).await.expect("emit");
                    ids.push(fact.id);
                }
                tx.commit().await.expect("COMMIT");
                let now = Instant::now();
                n += txn;
                {
                    let mut t = times.lock().unwrap();
                    for id in ids {
                        t.committed.insert(id, now);
                    }
                }
                next += every;
                if let Some(wait) = next.checked_duration_since(Instant::now()) {
                    tokio::time::sleep(wait).await;
                }
            }
            n
        }));
    }
    let mut total = 0;
    for t in tasks {
        total += t.await.expect("an emitting session");
    }
    total
}
