//! Processing facts from `factlib.inbox` (src/inbox/schema.sql,
//! src/inbox/worker.rs) against the real PostgreSQL; no Kafka: the facts are
//! inserted into the inbox with SQL.
//!
//! ```text
//!  INSERT INTO factlib.inbox ──► 4 workers ──CLAIM_SQL (FOR UPDATE SKIP LOCKED)──► log table + processed_at, one transaction
//!       factlib::inbox::Consumer (Rust) | raw tokio_postgres (the README's SQL) | examples/inbox/{python,go}
//!  check: every fact once in the log, processed_at set, and per aggregate the log order == seq order
//!
//!  8 sessions × 10,000 × SELECT factlib.inbox_claim('svc', id), pipelined ──► true exactly once per id
//! ```
//!
//! Shuffles, ids and jitter come from a seeded generator; a failing test
//! prints its seed (`FACTLIB_TEST_SEED` replays it). No assertion depends on timing: waits are bounded only so that
//! a hang fails the test.

mod common;

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use common::*;
use factlib::inbox::{Consumer, ConsumerOptions, Handler, InboxFact, ProcessError, CLAIM_SQL};
use futures_util::StreamExt as _;
use tokio::process::Command;
use tokio::sync::watch;
use tokio_postgres::{Client, Transaction};
use uuid::Uuid;

/// How long a whole processing run may take before the test fails (a hang,
/// not a slow machine: the runs here take seconds).
const LIMIT: Duration = Duration::from_secs(90);

/// The README's "mark it processed" statement.
const DONE_SQL: &str = "UPDATE factlib.inbox SET processed_at = clock_timestamp() WHERE id = $1";

/// SplitMix64: a small seeded generator for shuffles, ids and jitter.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Rng(seed)
    }

    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform enough in `0..n` for tests.
    fn below(&mut self, n: usize) -> usize {
        let n = u64::try_from(n).expect("n fits u64");
        usize::try_from(self.next() % n).expect("below n")
    }

    fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            v.swap(i, self.below(i + 1));
        }
    }

    /// A version 4 (random) UUID from this generator.
    fn uuid_v4(&mut self) -> Uuid {
        let mut bytes = [0u8; 16];
        bytes[..8].copy_from_slice(&self.next().to_le_bytes());
        bytes[8..].copy_from_slice(&self.next().to_le_bytes());
        uuid::Builder::from_random_bytes(bytes).into_uuid()
    }
}

/// A seed from the clock, or from `FACTLIB_TEST_SEED` to replay a run;
/// printed, so that a failing test shows it.
fn seed(test: &str) -> u64 {
    let seed = match std::env::var("FACTLIB_TEST_SEED") {
        Ok(s) => s.parse().expect("FACTLIB_TEST_SEED is a u64"),
        Err(_) => {
            let nanos = SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .unwrap()
                .as_nanos();
            u64::try_from(nanos % u128::from(u64::MAX)).unwrap()
        }
    };
    println!("{test}: seed {seed} (FACTLIB_TEST_SEED={seed} replays it)");
    seed
}

/// A fact as the tests insert it.
#[derive(Debug, Clone)]
struct Inserted {
    id: Uuid,
    aggregate_id: String,
    seq: i64,
}

/// Inserts `n` facts of type "order" over `aggregates` aggregates
/// ("a00", "a01", …), each fact's aggregate picked at random, so the
/// aggregates interleave. Returns them in insertion order, which is `seq`
/// order (checked).
async fn insert_facts(c: &Client, rng: &mut Rng, n: usize, aggregates: usize) -> Vec<Inserted> {
    let ids: Vec<Uuid> = (0..n).map(|_| rng.uuid_v4()).collect();
    let aggs: Vec<String> = (0..n)
        .map(|_| format!("a{:02}", rng.below(aggregates)))
        .collect();
    let rows = c
        .query(
            "INSERT INTO factlib.inbox
                 (id, topic, partition, \"offset\", aggregate_type, aggregate_id, event_type, payload)
             SELECT f.id, 'orders', 0, f.ord - 1, 'order', f.agg, 'order.changed',
                    convert_to(format('{\"i\":%s}', f.ord), 'UTF8')
             FROM unnest($1::uuid[], $2::text[]) WITH ORDINALITY AS f(id, agg, ord)
             ORDER BY f.ord
             RETURNING id, seq",
            &[&ids, &aggs],
        )
        .await
        .expect("insert the facts");
    let seqs: HashMap<Uuid, i64> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
    assert_eq!(seqs.len(), n, "every fact inserted");
    let facts: Vec<Inserted> = ids
        .into_iter()
        .zip(aggs)
        .map(|(id, aggregate_id)| Inserted {
            id,
            aggregate_id,
            seq: seqs[&id],
        })
        .collect();
    assert!(
        facts.windows(2).all(|w| w[0].seq < w[1].seq),
        "seq follows insertion order"
    );
    let distinct: HashSet<&str> = facts.iter().map(|f| f.aggregate_id.as_str()).collect();
    assert_eq!(distinct.len(), aggregates, "every aggregate has facts");
    // Statistics, as autoanalyze would make them a little later. Without
    // them the planner runs the claim as a nested loop over all unprocessed
    // facts (about 30 ms a claim at 1,200 facts, instead of 0.3 ms), which
    // only makes these tests slow, and by how much depends on when
    // autoanalyze runs.
    c.batch_execute("ANALYZE factlib.inbox")
        .await
        .expect("analyze the inbox");
    facts
}

/// Creates the tests' processing log. `n` is taken when the row is
/// inserted, inside the processing transaction, so per aggregate it orders
/// the processing.
async fn create_log(c: &Client, table: &str) {
    c.batch_execute(&format!(
        "CREATE TABLE {table} (
             n            bigserial PRIMARY KEY,
             fact_id      uuid NOT NULL,
             aggregate_id text NOT NULL,
             seq          bigint NOT NULL)"
    ))
    .await
    .expect("create the processing log");
}

/// What the checks found, for the test output.
#[derive(Debug)]
struct Checked {
    facts: usize,
    aggregates: usize,
}

/// Every fact of the inbox processed exactly once: `processed_at` set, its
/// id once in `log` (ordered by `n`); and per aggregate, the log's order is
/// the inbox's `seq` order.
async fn check_processed(c: &Client, log: &str) -> Checked {
    let inbox = c
        .query(
            "SELECT id, aggregate_type, aggregate_id, seq, processed_at IS NOT NULL
             FROM factlib.inbox ORDER BY seq",
            &[],
        )
        .await
        .unwrap();
    let unprocessed: Vec<Uuid> = inbox
        .iter()
        .filter(|r| !r.get::<_, bool>(4))
        .map(|r| r.get(0))
        .collect();
    assert!(
        unprocessed.is_empty(),
        "{} of {} facts have no processed_at, e.g. {:?}",
        unprocessed.len(),
        inbox.len(),
        unprocessed.first()
    );

    let logged: Vec<Uuid> = c
        .query(&format!("SELECT fact_id FROM {log} ORDER BY n"), &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    let mut seen = HashSet::new();
    let dups: Vec<&Uuid> = logged.iter().filter(|id| !seen.insert(**id)).collect();
    assert!(
        dups.is_empty(),
        "{} facts processed more than once, e.g. {:?}",
        dups.len(),
        dups.first()
    );
    let ids: HashSet<Uuid> = inbox.iter().map(|r| r.get(0)).collect();
    assert_eq!(
        seen,
        ids,
        "the log holds exactly the inbox's facts ({} logged, {} in the inbox)",
        seen.len(),
        ids.len()
    );

    // Per aggregate: the seqs in inbox order (ascending) and in log order.
    type Key = (String, String);
    let mut key_of: HashMap<Uuid, (Key, i64)> = HashMap::new();
    let mut want: HashMap<Key, Vec<i64>> = HashMap::new();
    for r in &inbox {
        let key: Key = (r.get(1), r.get(2));
        key_of.insert(r.get(0), (key.clone(), r.get(3)));
        want.entry(key).or_default().push(r.get(3));
    }
    let mut got: HashMap<Key, Vec<i64>> = HashMap::new();
    for id in &logged {
        let (key, seq) = &key_of[id];
        got.entry(key.clone()).or_default().push(*seq);
    }
    for (key, want) in &want {
        let got = &got[key];
        if let Some(at) = got.windows(2).position(|w| w[0] > w[1]) {
            panic!(
                "aggregate {key:?} processed out of order: seq {} before seq {} (log order {got:?}, inbox order {want:?})",
                got[at],
                got[at + 1]
            );
        }
        assert_eq!(got, want, "aggregate {key:?}: log order is seq order");
    }
    Checked {
        facts: inbox.len(),
        aggregates: want.len(),
    }
}

/// Polls until no fact of the inbox is unprocessed; fails after [`LIMIT`].
async fn wait_all_processed(c: &Client, what: &str) {
    let start = Instant::now();
    loop {
        let left: i64 = c
            .query_one(
                "SELECT count(*) FROM factlib.inbox WHERE processed_at IS NULL",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        if left == 0 {
            return;
        }
        assert!(
            start.elapsed() < LIMIT,
            "{what}: {left} facts still unprocessed after {LIMIT:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The failure bookkeeping of `id`: (attempts, last_error, retried no
/// sooner than retry_at, processed).
async fn failure_record(c: &Client, id: Uuid) -> (i32, Option<String>, Option<bool>, bool) {
    let r = c
        .query_one(
            "SELECT attempts, last_error, processed_at >= retry_at, processed_at IS NOT NULL
             FROM factlib.inbox WHERE id = $1",
            &[&id],
        )
        .await
        .unwrap();
    (r.get(0), r.get(1), r.get(2), r.get(3))
}

// ---------------------------------------------------------------------------
// factlib.inbox_claim
// ---------------------------------------------------------------------------

const CLAIM_FN: &str = "SELECT factlib.inbox_claim($1, $2)";

async fn claim(c: &Client, consumer: &str, id: Uuid) -> bool {
    c.query_one(CLAIM_FN, &[&consumer, &id])
        .await
        .unwrap()
        .get(0)
}

/// Waits until the backend `pid` waits for a lock; fails after [`LIMIT`].
async fn wait_lock_wait(observer: &Client, pid: i32) {
    let start = Instant::now();
    loop {
        let waiting: bool = observer
            .query_one(
                "SELECT coalesce(bool_or(wait_event_type = 'Lock'), false)
                 FROM pg_stat_activity WHERE pid = $1",
                &[&pid],
            )
            .await
            .unwrap()
            .get(0);
        if waiting {
            return;
        }
        assert!(
            start.elapsed() < LIMIT,
            "backend {pid} never waited for the first claim's lock"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// A claim made while another transaction holds an uncommitted claim of the
/// same fact waits for it: once it ends with `end` ("COMMIT" or
/// "ROLLBACK"), the waiting claim returns what it returns.
async fn claim_behind(url: &str, consumer: &str, id: Uuid, end: &str) -> bool {
    let first = sql_at(url).await;
    let second = sql_at(url).await;
    let observer = sql_at(url).await;
    first.batch_execute("BEGIN").await.unwrap();
    assert!(
        claim(&first, consumer, id).await,
        "the first claim of a new fact"
    );
    let pid: i32 = second
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    let consumer = consumer.to_owned();
    let waiting = tokio::spawn(async move {
        second
            .query_one(CLAIM_FN, &[&consumer, &id])
            .await
            .map(|r| r.get::<_, bool>(0))
    });
    wait_lock_wait(&observer, pid).await;
    first.batch_execute(end).await.unwrap();
    tokio::time::timeout(LIMIT, waiting)
        .await
        .expect("the waiting claim ends with the first transaction")
        .expect("the claim task")
        .expect("the waiting claim")
}

/// 8 sessions claim the same 10,000 facts, each in its own order, each
/// call its own autocommit statement (pipelined): every fact is claimed
/// (true) exactly once, and refused (false) to the 7 others. A claim in a
/// rolled-back transaction does not count, a concurrent claim waits for
/// the first one's transaction, and consumers are independent.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn inbox_claim_is_true_exactly_once_per_fact_under_concurrency() {
    const SESSIONS: u64 = 8;
    const FACTS: usize = 10_000;
    let seed = seed("inbox_claim");
    let url = inbox_db("claim").await;
    let ids: Vec<Uuid> = (0..FACTS).map(|_| Uuid::now_v7()).collect();

    let started = Instant::now();
    let mut sessions = Vec::new();
    for s in 0..SESSIONS {
        let (url, mut order) = (url.clone(), ids.clone());
        sessions.push(tokio::spawn(async move {
            Rng::new(seed ^ s).shuffle(&mut order);
            let c = sql_at(&url).await;
            let stmt = c.prepare(CLAIM_FN).await.unwrap();
            let (c, stmt) = (&c, &stmt);
            futures_util::stream::iter(order)
                .map(|id| async move {
                    let got = c.query_one(stmt, &[&"svc", &id]).await;
                    (id, got.expect("inbox_claim").get::<_, bool>(0))
                })
                // Pipelined: up to 128 statements in flight per session.
                .buffered(128)
                .collect::<Vec<(Uuid, bool)>>()
                .await
        }));
    }
    let mut tally: HashMap<Uuid, (u32, u32)> = HashMap::new();
    let mut won = Vec::new();
    for s in sessions {
        let results = tokio::time::timeout(LIMIT, s)
            .await
            .expect("the claims finish")
            .expect("a claiming session");
        assert_eq!(results.len(), FACTS, "a session claimed every fact");
        won.push(results.iter().filter(|(_, ok)| *ok).count());
        for (id, ok) in results {
            let t = tally.entry(id).or_default();
            if ok {
                t.0 += 1;
            } else {
                t.1 += 1;
            }
        }
    }
    println!(
        "inbox_claim: {SESSIONS} sessions × {FACTS} claims in {:?}; facts won per session {won:?}",
        started.elapsed()
    );
    assert_eq!(tally.len(), FACTS);
    let wrong: Vec<_> = tally.iter().filter(|(_, t)| **t != (1, 7)).collect();
    assert!(
        wrong.is_empty(),
        "{} facts not claimed exactly once (true, false counts), e.g. {:?}",
        wrong.len(),
        wrong.first()
    );
    let c = sql_at(&url).await;
    let rows: i64 = c
        .query_one(
            "SELECT count(*) FROM factlib.inbox_claims WHERE consumer = 'svc'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        rows,
        i64::try_from(FACTS).unwrap(),
        "one claim row per fact"
    );

    // A claim in a transaction that rolls back does not count.
    let mut c = c;
    let fresh = Uuid::now_v7();
    let tx = c.transaction().await.unwrap();
    let in_tx: bool = tx
        .query_one(CLAIM_FN, &[&"svc", &fresh])
        .await
        .unwrap()
        .get(0);
    assert!(in_tx, "the first claim, in a transaction");
    tx.rollback().await.unwrap();
    assert!(
        claim(&c, "svc", fresh).await,
        "a rolled-back claim does not count: the next claim is true"
    );
    assert!(!claim(&c, "svc", fresh).await, "and the one after is false");

    // Another consumer's claims are its own.
    assert!(!claim(&c, "svc", ids[0]).await, "svc claimed it already");
    assert!(claim(&c, "billing", ids[0]).await, "billing's first claim");
    assert!(
        !claim(&c, "billing", ids[0]).await,
        "billing's second claim"
    );
    assert!(!claim(&c, "svc", ids[0]).await, "svc's claim is unchanged");

    // A concurrent claim waits for the first claim's transaction, and gets
    // what that transaction leaves.
    assert!(
        claim_behind(&url, "svc", Uuid::now_v7(), "ROLLBACK").await,
        "the first claim rolled back: the waiting claim is true"
    );
    assert!(
        !claim_behind(&url, "svc", Uuid::now_v7(), "COMMIT").await,
        "the first claim committed: the waiting claim is false"
    );

    // NULLs are refused, not claimed.
    let err = c
        .query_one(CLAIM_FN, &[&"svc", &None::<Uuid>])
        .await
        .expect_err("a NULL fact id is refused");
    assert_eq!(
        err.code(),
        Some(&tokio_postgres::error::SqlState::INVALID_PARAMETER_VALUE),
        "{err:?}"
    );
}

// ---------------------------------------------------------------------------
// factlib::inbox::Consumer
// ---------------------------------------------------------------------------

/// A handler that logs each fact into `processed_log` through the
/// processing transaction, sometimes sleeps 0–2 ms inside it (so workers
/// interleave), and fails `fail` while `failing` is set (clearing it, when
/// `once`).
struct LogHandler {
    rng: Rng,
    fail: Option<Uuid>,
    failing: Arc<AtomicBool>,
    once: bool,
    /// `InboxFact::attempts` of each fact this handler saw, in order.
    seen: Vec<(Uuid, i32)>,
}

impl LogHandler {
    fn new(seed: u64) -> Self {
        LogHandler {
            rng: Rng::new(seed),
            fail: None,
            failing: Arc::new(AtomicBool::new(false)),
            once: false,
            seen: Vec::new(),
        }
    }
}

impl Handler for LogHandler {
    type Error = String;

    async fn handle(&mut self, tx: &Transaction<'_>, fact: &InboxFact) -> Result<(), String> {
        self.seen.push((fact.id, fact.attempts));
        if self.fail == Some(fact.id) {
            let failing = if self.once {
                self.failing.swap(false, Ordering::SeqCst)
            } else {
                self.failing.load(Ordering::SeqCst)
            };
            if failing {
                return Err(format!("injected failure for fact {}", fact.id));
            }
        }
        tx.execute(
            "INSERT INTO processed_log (fact_id, aggregate_id, seq) VALUES ($1, $2, $3)",
            &[&fact.id, &fact.aggregate_id, &fact.seq],
        )
        .await
        .map_err(|e| e.to_string())?;
        if self.rng.below(3) == 0 {
            let micros = u64::try_from(self.rng.below(2_000)).unwrap();
            tokio::time::sleep(Duration::from_micros(micros)).await;
        }
        Ok(())
    }
}

/// 4 `Consumer` workers process ~3,000 facts of 30 aggregates: each fact
/// once, each aggregate in `seq` order; a fact whose handler fails once is
/// retried later (attempts = 1, last_error set, not before retry_at).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn consumers_with_skip_locked_from_4_sessions_keep_per_aggregate_order() {
    const WORKERS: u64 = 4;
    let seed = seed("consumers");
    let mut rng = Rng::new(seed);
    let url = inbox_db("consumers").await;
    let c = sql_at(&url).await;
    create_log(&c, "processed_log").await;
    let facts = insert_facts(&c, &mut rng, 3_000, 30).await;
    // The failing fact: one in the middle of its aggregate.
    let victim = {
        let agg = &facts[facts.len() / 2].aggregate_id;
        let of_agg: Vec<&Inserted> = facts.iter().filter(|f| &f.aggregate_id == agg).collect();
        of_agg[of_agg.len() / 2].clone()
    };
    let failing = Arc::new(AtomicBool::new(true));

    let options = ConsumerOptions {
        idle_wait: Duration::from_millis(20),
        retry_after: Duration::from_millis(200),
    };
    let (stop_tx, stop_rx) = watch::channel(false);
    let started = Instant::now();
    let mut workers = Vec::new();
    for w in 0..WORKERS {
        let (url, options, mut stop) = (url.clone(), options.clone(), stop_rx.clone());
        let mut handler = LogHandler::new(seed ^ (w + 1));
        handler.fail = Some(victim.id);
        handler.failing = Arc::clone(&failing);
        handler.once = true;
        workers.push(tokio::spawn(async move {
            let mut consumer = Consumer::connect(&url, options)
                .await
                .expect("Consumer::connect");
            let stop = async move {
                let _ = stop.wait_for(|s| *s).await;
            };
            let done = consumer.run(&mut handler, stop).await;
            (done.expect("the worker's database"), handler.seen)
        }));
    }
    wait_all_processed(&c, "4 Consumer workers").await;
    let elapsed = started.elapsed();
    stop_tx.send(true).unwrap();
    let mut per_worker = Vec::new();
    let mut victim_seen = Vec::new();
    for w in workers {
        let (done, seen) = tokio::time::timeout(LIMIT, w)
            .await
            .expect("the workers stop")
            .expect("a worker task");
        per_worker.push(done);
        victim_seen.extend(seen.into_iter().filter(|(id, _)| *id == victim.id));
    }
    let checked = check_processed(&c, "processed_log").await;
    println!(
        "consumers: {checked:?} by {WORKERS} workers in {elapsed:?}; processed per worker {per_worker:?}"
    );
    assert_eq!((checked.facts, checked.aggregates), (facts.len(), 30));
    assert_eq!(
        per_worker.iter().sum::<u64>(),
        u64::try_from(facts.len()).unwrap(),
        "the workers' counts add up to the facts"
    );

    assert!(
        !failing.load(Ordering::SeqCst),
        "the failing fact's handler ran"
    );
    let (attempts, last_error, after_retry_at, processed) = failure_record(&c, victim.id).await;
    assert!(processed, "the failed fact was processed on a retry");
    assert_eq!(
        attempts, 1,
        "one failed attempt recorded (0: another worker took the fact before its failure was \
         written, see a_failed_fact_stays_locked_until_its_failure_is_recorded)"
    );
    assert_eq!(
        last_error.as_deref(),
        Some(format!("injected failure for fact {}", victim.id).as_str())
    );
    assert_eq!(
        after_retry_at,
        Some(true),
        "retried no sooner than retry_at"
    );
    victim_seen.sort_by_key(|(_, attempts)| *attempts);
    assert_eq!(
        victim_seen,
        vec![(victim.id, 0), (victim.id, 1)],
        "the handler saw the fact twice: first try, then one failed attempt before"
    );
}

/// With one consumer: a fact whose handler fails holds back the later facts
/// of its aggregate until it succeeds; the other aggregates go on.
#[tokio::test]
async fn a_failing_fact_holds_back_its_aggregate_only() {
    let url = inbox_db("holdback").await;
    let c = sql_at(&url).await;
    create_log(&c, "processed_log").await;
    // a1 b1 a2 b2 a3, in this seq order.
    let mut ids = HashMap::new();
    for (name, agg) in [
        ("a1", "a"),
        ("b1", "b"),
        ("a2", "a"),
        ("b2", "b"),
        ("a3", "a"),
    ] {
        let id = Uuid::now_v7();
        c.execute(
            "INSERT INTO factlib.inbox
                 (id, topic, partition, \"offset\", aggregate_type, aggregate_id, event_type, payload)
             VALUES ($1, 'orders', 0, 0, 'order', $2, 'order.changed', '\\x00')",
            &[&id, &agg],
        )
        .await
        .unwrap();
        ids.insert(name, id);
    }
    let name_of = |id: Uuid| *ids.iter().find(|(_, v)| **v == id).unwrap().0;

    let mut consumer = Consumer::connect(
        &url,
        ConsumerOptions {
            idle_wait: Duration::from_millis(20),
            // Never due during the test: the retry is made due by hand below.
            retry_after: Duration::from_secs(3600),
        },
    )
    .await
    .expect("Consumer::connect");
    let mut handler = LogHandler::new(1);
    handler.fail = Some(ids["a1"]);
    handler.failing.store(true, Ordering::SeqCst);

    let mut order = Vec::new();
    match consumer.process_next(&mut handler).await {
        Err(ProcessError::Handler { fact, error }) => {
            assert_eq!(fact, ids["a1"]);
            assert!(error.contains("injected failure"), "{error}");
        }
        other => panic!("a1 fails first, got {other:?}"),
    }
    while let Some(id) = consumer.process_next(&mut handler).await.unwrap() {
        order.push(name_of(id));
        assert!(order.len() <= 5, "more facts than inserted: {order:?}");
    }
    assert_eq!(
        order,
        ["b1", "b2"],
        "aggregate b goes on while a1 waits for its retry"
    );
    let (attempts, last_error, _, processed) = failure_record(&c, ids["a1"]).await;
    assert_eq!((attempts, processed), (1, false));
    assert!(last_error.unwrap().contains("injected failure"));
    let waiting: i64 = c
        .query_one(
            "SELECT count(*) FROM factlib.inbox WHERE processed_at IS NULL AND aggregate_id = 'a'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(waiting, 3, "a1, a2 and a3 wait");

    // The retry comes due (as if the time had passed), and the handler heals.
    handler.failing.store(false, Ordering::SeqCst);
    c.execute(
        "UPDATE factlib.inbox SET retry_at = now() WHERE id = $1",
        &[&ids["a1"]],
    )
    .await
    .unwrap();
    while let Some(id) = consumer.process_next(&mut handler).await.unwrap() {
        order.push(name_of(id));
        assert!(order.len() <= 5, "more facts than inserted: {order:?}");
    }
    assert_eq!(order, ["b1", "b2", "a1", "a2", "a3"]);
    let retried: Vec<i32> = handler
        .seen
        .iter()
        .filter(|(id, _)| *id == ids["a1"])
        .map(|(_, attempts)| *attempts)
        .collect();
    assert_eq!(retried, [0, 1], "the retry sees attempts = 1");
    check_processed(&c, "processed_log").await;
}

/// What [`FailWatched`] hands the test: the other session's backend pid,
/// and its task, which ends with what it saw of the row once it got it:
/// (attempts, retry_at in the future).
type Watcher = (i32, tokio::task::JoinHandle<(i32, Option<bool>)>);

/// A handler that fails, but first queues another session for the fact's
/// row lock (`SELECT … FOR UPDATE`, waiting), as a worker taking the fact
/// the moment it is free would.
struct FailWatched {
    url: String,
    tell: Option<tokio::sync::oneshot::Sender<Watcher>>,
}

impl Handler for FailWatched {
    type Error = String;

    async fn handle(&mut self, _tx: &Transaction<'_>, fact: &InboxFact) -> Result<(), String> {
        let other = sql_at(&self.url).await;
        let observer = sql_at(&self.url).await;
        let pid: i32 = other
            .query_one("SELECT pg_backend_pid()", &[])
            .await
            .unwrap()
            .get(0);
        let id = fact.id;
        let watcher = tokio::spawn(async move {
            let r = other
                .query_one(
                    "SELECT attempts, retry_at > now() FROM factlib.inbox WHERE id = $1 FOR UPDATE",
                    &[&id],
                )
                .await
                .expect("the other session's FOR UPDATE");
            (r.get(0), r.get(1))
        });
        wait_lock_wait(&observer, pid).await;
        if let Some(tell) = self.tell.take() {
            let _ = tell.send((pid, watcher));
        }
        Err("injected failure".into())
    }
}

/// When a failed fact's row lock is released, its failure is already
/// recorded (attempts = 1, retry_at in the future), so SKIP LOCKED workers
/// leave it until retry_at. Otherwise another worker can take the fact
/// before its retry_at is set, and when that try succeeds the failure is
/// never recorded.
///
/// Deterministic: a session holds `LOCK TABLE factlib.inbox IN SHARE MODE`,
/// which lets the claim and the other session's `FOR UPDATE` through but
/// stops any UPDATE of the inbox before it touches a row. Once the consumer
/// waits there to write the failure, the fact must still be locked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_fact_stays_locked_until_its_failure_is_recorded() {
    let url = inbox_db("failrecord").await;
    let c = sql_at(&url).await;
    let id = Uuid::now_v7();
    c.execute(
        "INSERT INTO factlib.inbox
             (id, topic, partition, \"offset\", aggregate_type, aggregate_id, event_type, payload)
         VALUES ($1, 'orders', 0, 0, 'order', 'a', 'order.changed', '\\x00')",
        &[&id],
    )
    .await
    .unwrap();
    let mut consumer = Consumer::connect(
        &url,
        ConsumerOptions {
            idle_wait: Duration::from_millis(20),
            retry_after: Duration::from_secs(3600),
        },
    )
    .await
    .expect("Consumer::connect");

    let gate = sql_at(&url).await;
    gate.batch_execute("BEGIN; LOCK TABLE factlib.inbox IN SHARE MODE")
        .await
        .unwrap();
    let (tell, told) = tokio::sync::oneshot::channel();
    let mut handler = FailWatched {
        url: url.clone(),
        tell: Some(tell),
    };
    let processing = tokio::spawn(async move { consumer.process_next(&mut handler).await });
    let (watcher_pid, watcher) = tokio::time::timeout(LIMIT, told)
        .await
        .expect("the handler runs")
        .expect("the handler's watcher");

    // The consumer is about to record the failure: its UPDATE waits for the gate.
    let start = Instant::now();
    loop {
        let at_gate: bool = c
            .query_one(
                "SELECT count(*) > 0 FROM pg_stat_activity
                 WHERE datname = current_database() AND wait_event_type = 'Lock'
                   AND wait_event = 'relation'",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        if at_gate {
            break;
        }
        assert!(
            start.elapsed() < LIMIT,
            "the consumer never came to write the failure"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // Lock waits are granted by the releasing transaction itself: a waiter
    // whose lock is still ungranted now was not let through.
    let still_locked: bool = c
        .query_one(
            "SELECT count(*) > 0 FROM pg_locks WHERE pid = $1 AND NOT granted",
            &[&watcher_pid],
        )
        .await
        .unwrap()
        .get(0);
    if !still_locked {
        // The other session has the row while the failure is not written.
        let seen = tokio::time::timeout(LIMIT, watcher)
            .await
            .expect("the other session reads the row")
            .expect("the watching task");
        gate.batch_execute("COMMIT").await.unwrap();
        panic!(
            "the failed fact's row lock was released before its failure was recorded: \
             another worker took it with (attempts, retry_at in the future) = {seen:?}"
        );
    }
    gate.batch_execute("COMMIT").await.unwrap();
    match tokio::time::timeout(LIMIT, processing)
        .await
        .expect("process_next ends")
        .expect("the processing task")
    {
        Err(ProcessError::Handler { fact, .. }) => assert_eq!(fact, id),
        other => panic!("the handler's failure, got {other:?}"),
    }
    let seen = tokio::time::timeout(LIMIT, watcher)
        .await
        .expect("the other session gets the row")
        .expect("the watching task");
    assert_eq!(
        seen,
        (1, Some(true)),
        "the next holder of the row sees the failure recorded"
    );
    let (attempts, last_error, _, processed) = failure_record(&c, id).await;
    assert_eq!(
        (attempts, last_error.as_deref(), processed),
        (1, Some("injected failure"), false)
    );
}

// ---------------------------------------------------------------------------
// The README's SQL pattern, from raw sessions
// ---------------------------------------------------------------------------

/// The worker loop of the README in plain SQL: BEGIN; CLAIM_SQL; the
/// service's write; DONE_SQL; COMMIT. Ends once the inbox has no
/// unprocessed fact; returns how many facts it processed.
async fn sql_worker(url: String, seed: u64) -> u64 {
    let mut c = sql_at(&url).await;
    let mut rng = Rng::new(seed);
    let mut done = 0;
    loop {
        let tx = c.transaction().await.unwrap();
        let Some(fact) = tx.query_opt(CLAIM_SQL, &[]).await.unwrap() else {
            tx.commit().await.unwrap();
            let left: bool = c
                .query_one(
                    "SELECT EXISTS (SELECT 1 FROM factlib.inbox WHERE processed_at IS NULL)",
                    &[],
                )
                .await
                .unwrap()
                .get(0);
            if !left {
                return done;
            }
            // Every eligible fact is held by another worker.
            tokio::time::sleep(Duration::from_millis(1)).await;
            continue;
        };
        let (id, seq, aggregate_id): (Uuid, i64, String) =
            (fact.get("id"), fact.get("seq"), fact.get("aggregate_id"));
        tx.execute(
            "INSERT INTO processed_log (fact_id, aggregate_id, seq) VALUES ($1, $2, $3)",
            &[&id, &aggregate_id, &seq],
        )
        .await
        .unwrap();
        if rng.below(3) == 0 {
            let micros = u64::try_from(rng.below(2_000)).unwrap();
            tokio::time::sleep(Duration::from_micros(micros)).await;
        }
        tx.execute(DONE_SQL, &[&id]).await.unwrap();
        tx.commit().await.unwrap();
        done += 1;
    }
}

/// The SQL the README shows, from 4 raw sessions: CLAIM_SQL and the
/// processed_at UPDATE in one transaction keep each aggregate's order and
/// process each fact once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_readme_sql_pattern_from_4_raw_sessions_keeps_per_aggregate_order() {
    let seed = seed("raw_sql");
    let mut rng = Rng::new(seed);
    let url = inbox_db("rawsql").await;
    let c = sql_at(&url).await;
    create_log(&c, "processed_log").await;
    let facts = insert_facts(&c, &mut rng, 3_000, 30).await;

    let started = Instant::now();
    let workers: Vec<_> = (0..4)
        .map(|w| tokio::spawn(sql_worker(url.clone(), seed ^ (w + 1))))
        .collect();
    let mut per_worker = Vec::new();
    for w in workers {
        per_worker.push(
            tokio::time::timeout(LIMIT, w)
                .await
                .expect("the SQL workers finish")
                .expect("a SQL worker"),
        );
    }
    let elapsed = started.elapsed();
    let checked = check_processed(&c, "processed_log").await;
    println!(
        "raw SQL: {checked:?} by 4 sessions in {elapsed:?}; processed per session {per_worker:?}"
    );
    assert_eq!((checked.facts, checked.aggregates), (facts.len(), 30));
    assert_eq!(
        per_worker.iter().sum::<u64>(),
        u64::try_from(facts.len()).unwrap()
    );
}

// ---------------------------------------------------------------------------
// examples/inbox/python and examples/inbox/go
// ---------------------------------------------------------------------------

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// The examples and the README carry the claim statement verbatim, so
/// that they cannot drift from the Rust worker's.
#[test]
fn the_examples_use_claim_sql_verbatim() {
    for file in [
        "examples/inbox/python/worker.py",
        "examples/inbox/go/main.go",
        "README.md",
    ] {
        let text = std::fs::read_to_string(repo().join(file))
            .unwrap_or_else(|e| panic!("read {file}: {e}"));
        assert!(
            text.contains(CLAIM_SQL),
            "{file} must contain factlib::inbox::CLAIM_SQL verbatim:\n{CLAIM_SQL}"
        );
    }
}

/// Runs `program args` to completion (bounded), failing the test with
/// `missing` when it cannot be started at all.
async fn output_of(
    program: &str,
    args: &[&str],
    dir: &Path,
    missing: &str,
) -> std::process::Output {
    let mut cmd = Command::new(program);
    cmd.args(args).current_dir(dir).kill_on_drop(true);
    match tokio::time::timeout(Duration::from_secs(300), cmd.output()).await {
        Ok(Ok(out)) => out,
        Ok(Err(e)) => panic!("cannot run {program}: {e}. {missing}"),
        Err(_) => panic!("{program} {args:?} did not finish within 300 s"),
    }
}

/// An inbox database with 1,200 facts over 20 aggregates, the examples'
/// table `example_processed` (the examples' own definition) and a trigger
/// that fails the insert of one fact once. Returns the URL and that fact.
async fn example_inbox(tag: &str, seed: u64) -> (String, Uuid) {
    let mut rng = Rng::new(seed);
    let url = inbox_db(tag).await;
    let c = sql_at(&url).await;
    let facts = insert_facts(&c, &mut rng, 1_200, 20).await;
    let victim = facts[facts.len() / 3].id;
    c.batch_execute(&format!(
        "CREATE TABLE example_processed (
             fact_id      uuid PRIMARY KEY,
             aggregate_id text NOT NULL,
             seq          bigint NOT NULL,
             n            bigserial);
         -- nextval is not rolled back: the first insert of the fact fails, the retry passes.
         CREATE SEQUENCE fail_once;
         CREATE FUNCTION fail_once() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN
           IF NEW.fact_id = '{victim}' AND nextval('fail_once') = 1 THEN
             RAISE EXCEPTION 'injected failure for fact %', NEW.fact_id;
           END IF;
           RETURN NEW;
         END $$;
         CREATE TRIGGER fail_once BEFORE INSERT ON example_processed
             FOR EACH ROW EXECUTE FUNCTION fail_once();"
    ))
    .await
    .unwrap();
    (url, victim)
}

/// Runs two instances of an example worker against `url` until the inbox
/// has no unprocessed fact, then checks the processing.
async fn run_example(
    what: &str,
    program: &Path,
    args: &[&str],
    dir: &Path,
    url: &str,
    victim: Uuid,
) {
    let started = Instant::now();
    let runs = (0..2).map(|_| {
        let mut cmd = Command::new(program);
        cmd.args(args)
            .args([
                "--exit-when-idle",
                "--idle-wait",
                "0.05",
                "--retry-after",
                "0.2",
            ])
            .current_dir(dir)
            .env("FACTLIB_INBOX_DATABASE_URL", url)
            .stdin(std::process::Stdio::null());
        run(cmd, LIMIT)
    });
    let runs = futures_util::future::join_all(runs).await;
    let elapsed = started.elapsed();
    for r in &runs {
        assert_eq!(
            r.code, 0,
            "{what} exited {}:\n{}\n{}",
            r.code, r.stdout, r.stderr
        );
    }
    let c = sql_at(url).await;
    let checked = check_processed(&c, "example_processed").await;
    let logs: String = runs.iter().map(|r| r.stderr.as_str()).collect();
    println!("{what}: {checked:?} by 2 processes in {elapsed:?}; their logs:\n{logs}");
    assert_eq!((checked.facts, checked.aggregates), (1_200, 20));
    let (attempts, last_error, after_retry_at, processed) = failure_record(&c, victim).await;
    assert!(
        processed,
        "{what}: the failed fact was processed on a retry"
    );
    assert_eq!(attempts, 1, "{what}: one failed attempt recorded\n{logs}");
    let last_error = last_error.unwrap_or_default();
    assert!(
        last_error.contains("injected failure for fact"),
        "{what}: last_error is {last_error:?}"
    );
    assert_eq!(
        after_retry_at,
        Some(true),
        "{what}: retried no sooner than retry_at"
    );
}

/// examples/inbox/python/worker.py (psycopg 3), two processes: every fact
/// once, per aggregate in order, one failure retried.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_python_example_processes_every_fact_once_in_order() {
    let dir = repo().join("examples/inbox/python");
    let check = output_of(
        "python3",
        &["-c", "import psycopg; print(psycopg.__version__)"],
        &dir,
        "python3 (>= 3.10) is needed for the Python example",
    )
    .await;
    assert!(
        check.status.success(),
        "the Python example needs psycopg 3: python3 -m pip install -r examples/inbox/python/requirements.txt \
         (tests/env/up does this)\n{}",
        String::from_utf8_lossy(&check.stderr)
    );
    let (url, victim) = example_inbox("pyexample", seed("python")).await;
    run_example(
        "examples/inbox/python",
        Path::new("python3"),
        &["worker.py"],
        &dir,
        &url,
        victim,
    )
    .await;
}

/// examples/inbox/go (pgx v5), built into the test's target dir, two
/// processes: every fact once, per aggregate in order, one failure retried.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_go_example_processes_every_fact_once_in_order() {
    let dir = repo().join("examples/inbox/go");
    let bin: PathBuf = Path::new(env!("CARGO_TARGET_TMPDIR")).join("inbox-worker-go");
    let built = output_of(
        "go",
        &["build", "-o", bin.to_str().expect("a UTF-8 path"), "."],
        &dir,
        "Go (>= 1.25) is needed for the Go example: https://go.dev/doc/install",
    )
    .await;
    assert!(
        built.status.success(),
        "go build in examples/inbox/go failed:\n{}",
        String::from_utf8_lossy(&built.stderr)
    );
    let (url, victim) = example_inbox("goexample", seed("go")).await;
    run_example("examples/inbox/go", &bin, &[], &dir, &url, victim).await;
}
