//! `factlib inbox` against the real PostgreSQL and Kafka: facts from an
//! exactly-once relay into `factlib.inbox` once each, a replayed fact, bad
//! records, a rebalance between two inbox processes, retention, setup and
//! metrics. (Kill loops and server restarts are in `inbox_faults.rs`.)

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;

/// A load of `secs` s at `rate` facts/s on 2 sessions over 50 keys.
fn load(
    slot: &str,
    publication: &str,
    prefix: &str,
    secs: u64,
    rate: u64,
    manifest: &Path,
) -> tokio::process::Command {
    bench_load((slot, publication, prefix), secs, rate, (2, 50), manifest)
}

/// `bench verify --inbox-database-url`: every committed fact of `manifest`
/// in the inbox once, as written, nothing else; returns its report.
async fn verify_inbox(url: &str, manifest: &Path) -> String {
    let r = verify_inbox_run(url, manifest, Duration::from_secs(180)).await;
    assert!(
        r.stdout
            .contains("VERIFIED: every committed fact is in factlib.inbox exactly once")
            && r.code == 0,
        "{}\n{}",
        r.stdout,
        r.stderr
    );
    r.stdout
}

fn manifest_path(tag: &str) -> PathBuf {
    std::env::temp_dir().join(format!("{tag}.manifest"))
}

/// The topics `load` writes to.
fn topics(prefix: &str) -> String {
    format!("{prefix}.order,{prefix}.invoice")
}

async fn wait_ok(child: tokio::process::Child, what: &str) {
    let out = tokio::time::timeout(Duration::from_secs(120), child.wait_with_output())
        .await
        .unwrap_or_else(|_| panic!("{what} did not finish"))
        .unwrap();
    assert!(
        out.status.success(),
        "{what}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Rows in factlib.inbox.
async fn rows(url: &str) -> i64 {
    sql_at(url)
        .await
        .query_one("SELECT count(*) FROM factlib.inbox", &[])
        .await
        .unwrap()
        .get(0)
}

/// Waits (up to `limit`) until factlib.inbox holds `n` rows.
async fn wait_rows(url: &str, n: i64, limit: Duration) -> i64 {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        let have = rows(url).await;
        if have >= n || tokio::time::Instant::now() >= deadline {
            return have;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Produces raw records (key, value) into `topic`, waiting for the acks.
/// A record to produce: its key and value.
type Raw<'a> = (Option<&'a [u8]>, Option<&'a [u8]>);

fn produce_raw(topic: &str, records: &[Raw<'_>]) {
    use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
    let p: BaseProducer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .create()
        .unwrap();
    for (key, value) in records {
        let mut r: BaseRecord<'_, [u8], [u8]> = BaseRecord::to(topic);
        if let Some(k) = key {
            r = r.key(*k);
        }
        if let Some(v) = value {
            r = r.payload(*v);
        }
        p.send(r).map_err(|(e, _)| e).unwrap();
    }
    p.flush(Duration::from_secs(30)).unwrap();
}

/// Issue 19: an exactly-once relay and the inbox under a load with
/// rolled-back transactions: every committed fact lands in factlib.inbox
/// once, with its fields as emitted, and no rolled-back one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_committed_fact_lands_in_the_inbox_once() {
    let (slot, publication) = (unique("ibe2e"), unique("pub"));
    let prefix = format!("p{slot}");
    setup(&slot, &publication).await;
    let url = inbox_db("ibe2e").await;
    let manifest = manifest_path(&slot);
    let relay = spawn(relay_exactly_once(&slot, &publication, &prefix));
    let inbox = spawn(inbox(&url, &topics(&prefix), &slot));
    wait_ok(
        spawn(load(&slot, &publication, &prefix, 10, 800, &manifest)),
        "bench emit",
    )
    .await;
    let report = verify_inbox(&url, &manifest).await;
    println!("{report}");
    let offsets: i64 = sql_at(&url)
        .await
        .query_one(
            "SELECT count(*) FROM factlib.inbox_offsets WHERE consumer_group = $1",
            &[&slot],
        )
        .await
        .unwrap()
        .get(0);
    assert!(offsets >= 2, "offsets stored per partition: {offsets}");
    // Within a partition (so within an aggregate), seq follows the offsets.
    let out_of_order: i64 = sql_at(&url)
        .await
        .query_one(
            "SELECT count(*) FROM (SELECT \"offset\", lag(\"offset\") OVER (PARTITION BY topic, \"partition\" ORDER BY seq) AS prev FROM factlib.inbox) x WHERE prev > \"offset\"",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        out_of_order, 0,
        "seq order within a partition is offset order"
    );
    let out = stop_ok(inbox).await;
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(
        log.contains("reading from the offset stored in the database"),
        "{log}"
    );
    assert!(log.contains("inbox stopped"), "{log}");
    stop_ok(relay).await;
    std::fs::remove_file(&manifest).ok();
    teardown(&slot, &publication).await;
}

/// Issue 19, test 4: the same fact produced twice into its topic (a
/// replay): one row, and the duplicate counted and logged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fact_produced_twice_is_one_row_and_a_counted_duplicate() {
    let (slot, publication) = (unique("ibdup"), unique("pub"));
    let prefix = format!("p{slot}");
    let topic = format!("{prefix}.order");
    setup(&slot, &publication).await;
    let url = inbox_db("ibdup").await;
    let relay = spawn(relay(&slot, &publication, &prefix));
    let ids = emit_ids(&prefix, 10, 5, 0).await;
    let records = consume_async(
        std::slice::from_ref(&topic),
        ids.len(),
        Duration::from_secs(1),
        Duration::from_secs(60),
    )
    .await;
    assert_eq!(records.len(), ids.len());
    stop_ok(relay).await;
    // The replay: three records again, exactly as they were.
    let again: Vec<Raw<'_>> = records[..3]
        .iter()
        .map(|r| (r.key.as_deref(), Some(r.value.as_slice())))
        .collect();
    produce_raw(&topic, &again);

    let inbox = MetricsRelay::spawn(inbox(&url, &topic, &slot)).await;
    let have = wait_rows(&url, 50, Duration::from_secs(60)).await;
    assert_eq!(have, 50);
    inbox
        .wait_metric(
            "factlib_inbox_duplicates_total",
            Duration::from_secs(30),
            |d| d >= 3.0,
        )
        .await;
    assert_eq!(
        inbox.metric("factlib_inbox_duplicates_total").await,
        Some(3.0),
        "the replayed facts are counted"
    );
    assert_eq!(rows(&url).await, 50, "one row per fact");
    assert_eq!(
        inbox.metric("factlib_inbox_facts_written_total").await,
        Some(50.0)
    );
    let log = inbox.stop().await;
    assert!(log.contains("dropped"), "the duplicates are logged:\n{log}");
    teardown(&slot, &publication).await;
}

/// Issue 19, test 7: a record that is not an envelope, a truncated one and
/// a tombstone go to factlib.inbox_dead_letters with their position and
/// the error; a subscribed topic that does not exist is reported; the
/// facts before and after them arrive.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_records_become_dead_letters_and_the_inbox_goes_on() {
    let (slot, publication) = (unique("ibbad"), unique("pub"));
    let prefix = format!("p{slot}");
    let topic = format!("{prefix}.order");
    setup(&slot, &publication).await;
    let url = inbox_db("ibbad").await;
    let relay = spawn(relay(&slot, &publication, &prefix));
    let before = emit_ids(&prefix, 4, 5, 0).await;
    let good = consume_async(
        std::slice::from_ref(&topic),
        before.len(),
        Duration::from_secs(1),
        Duration::from_secs(60),
    )
    .await;
    let whole = good[0].value.clone();
    produce_raw(
        &topic,
        &[
            (Some(b"k1"), Some(b"this is not a factlib envelope")),
            (Some(b"k2"), Some(&whole[..whole.len() / 2])),
            (Some(b"k3"), None),
        ],
    );
    let after = emit_ids(&prefix, 4, 5, 100).await;
    let missing = format!("{prefix}.nosuchtopic");
    let child = spawn(inbox(&url, &format!("{topic},{missing}"), &slot));
    let have = wait_rows(&url, 40, Duration::from_secs(60)).await;
    assert_eq!(
        have, 40,
        "every good fact, before and after the bad records"
    );
    let c = sql_at(&url).await;
    let mut dead = Vec::new();
    for _ in 0..50 {
        dead = c
            .query(
                "SELECT topic, \"offset\", error, key, value IS NULL FROM factlib.inbox_dead_letters ORDER BY key",
                &[],
            )
            .await
            .unwrap();
        if dead.len() >= 3 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(dead.len(), 3, "three dead letters");
    let errors: Vec<String> = dead.iter().map(|r| r.get(2)).collect();
    println!("dead letters: {errors:#?}");
    assert!(errors[0].contains("does not decode"), "{}", errors[0]);
    assert!(errors[1].contains("does not decode"), "{}", errors[1]);
    assert!(errors[2].contains("no value"), "{}", errors[2]);
    for r in &dead {
        assert_eq!(r.get::<_, String>(0), topic);
    }
    assert_eq!(
        dead[0].get::<_, Option<Vec<u8>>>(3).as_deref(),
        Some(&b"k1"[..])
    );
    assert!(dead[2].get::<_, bool>(4), "the tombstone has no value");
    let ids: Vec<String> = c
        .query("SELECT id::text FROM factlib.inbox", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    check_exactly_once(
        &before.iter().chain(&after).cloned().collect::<Vec<_>>(),
        &ids,
    );
    stop_ok(relay).await;
    let out = stop_ok(child).await;
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(log.contains("record is not a fact"), "{log}");
    assert!(
        log.contains("does not exist"),
        "the missing topic is reported:\n{log}"
    );
    teardown(&slot, &publication).await;
}

/// Issue 19, test 2: two inbox processes in one group share the
/// partitions; one is stopped mid-run and started again (two rebalances):
/// every committed fact once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_inboxes_in_one_group_through_rebalances_lose_and_duplicate_nothing() {
    let (slot, publication) = (unique("ibgrp"), unique("pub"));
    let prefix = format!("p{slot}");
    setup(&slot, &publication).await;
    let url = inbox_db("ibgrp").await;
    let manifest = manifest_path(&slot);
    let relay = spawn(relay_exactly_once(&slot, &publication, &prefix));
    let group = slot.clone();
    let a = spawn(inbox(&url, &topics(&prefix), &group));
    let b = spawn(inbox(&url, &topics(&prefix), &group));
    let emitting = spawn(load(&slot, &publication, &prefix, 24, 600, &manifest));
    tokio::time::sleep(Duration::from_secs(8)).await;
    let first_b = stop_ok(b).await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    let b = spawn(inbox(&url, &topics(&prefix), &group));
    wait_ok(emitting, "bench emit").await;
    println!("{}", verify_inbox(&url, &manifest).await);
    let log_a = String::from_utf8_lossy(&stop_ok(a).await.stderr).into_owned();
    let log_b = String::from_utf8_lossy(&first_b.stderr).into_owned()
        + &String::from_utf8_lossy(&stop_ok(b).await.stderr);
    assert!(
        log_a.contains("partitions revoked"),
        "A went through rebalances:\n{log_a}"
    );
    for (name, log) in [("A", &log_a), ("B", &log_b)] {
        assert!(
            log.contains("reading from the offset stored in the database"),
            "{name} was assigned partitions:\n{log}"
        );
    }
    stop_ok(relay).await;
    std::fs::remove_file(&manifest).ok();
    teardown(&slot, &publication).await;
}

/// `inbox setup` is idempotent, and `factlib inbox` on a database without
/// the schema stops at once and says to run it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn setup_is_idempotent_and_a_missing_schema_says_run_setup() {
    let url = inbox_db("ibset").await;
    let mut again = factlib("factlib", "factlib", "factlib");
    again.args(["inbox", "setup", "--inbox-database-url", &url]);
    let r = run(again, Duration::from_secs(60)).await;
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(r.stdout.contains("v2 exists, unchanged"), "{}", r.stdout);

    let bare = unique("ibbare");
    sql()
        .await
        .batch_execute(&format!("CREATE DATABASE {bare}"))
        .await
        .unwrap();
    let r = run(inbox(&url_for_db(&bare), "t", "g"), Duration::from_secs(60)).await;
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(
        r.stderr.contains("run `factlib inbox setup`"),
        "{}",
        r.stderr
    );

    let mut no_url = factlib("factlib", "factlib", "factlib");
    no_url
        .env_remove("FACTLIB_INBOX_DATABASE_URL")
        .args(["inbox", "--topics", "t"]);
    let r = run(no_url, Duration::from_secs(60)).await;
    assert_ne!(r.code, 0);
    assert!(r.stderr.contains("--inbox-database-url"), "{}", r.stderr);
}

/// `--inbox-retention` deletes processed rows older than it, and nothing
/// else: not unprocessed ones, however old, nor recent processed ones.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_deletes_only_old_processed_facts() {
    let url = inbox_db("ibret").await;
    let c = sql_at(&url).await;
    c.batch_execute(
        "INSERT INTO factlib.inbox (id, topic, partition, \"offset\", aggregate_type, aggregate_id, event_type, payload, received_at, processed_at)
         SELECT gen_random_uuid(), 't', 0, g, 'order', 'a' || (g % 7), 'e', '\\x00',
                now() - interval '3 days',
                CASE WHEN g <= 12000 THEN now() - interval '2 days'
                     WHEN g <= 12100 THEN now() - interval '1 hour'
                     ELSE NULL END
         FROM generate_series(1, 12200) g;
         INSERT INTO factlib.inbox_claims (consumer, fact_id, claimed_at)
         SELECT 'svc', gen_random_uuid(), now() - interval '2 days' FROM generate_series(1, 30);",
    )
    .await
    .unwrap();
    let mut cmd = inbox(&url, "t-none", "g");
    cmd.args(["--inbox-retention", "1d"]);
    let child = spawn(cmd);
    let claims_left = || async {
        c.query_one("SELECT count(*) FROM factlib.inbox_claims", &[])
            .await
            .unwrap()
            .get::<_, i64>(0)
    };
    // Old claims go after the rows, in the same retention pass: wait for both.
    let mut left = 0;
    for _ in 0..100 {
        left = rows(&url).await;
        if left == 200 && claims_left().await == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        left, 200,
        "12,000 old processed rows deleted (in batches of 5,000)"
    );
    let kept: (i64, i64) = {
        let r = c
            .query_one(
                "SELECT count(*) FILTER (WHERE processed_at IS NULL), count(*) FILTER (WHERE processed_at IS NOT NULL) FROM factlib.inbox",
                &[],
            )
            .await
            .unwrap();
        (r.get(0), r.get(1))
    };
    assert_eq!(
        kept,
        (100, 100),
        "unprocessed and recent processed rows stay"
    );
    assert_eq!(claims_left().await, 0, "old claims go too");
    let out = stop_ok(child).await;
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(
        log.contains("inbox retention: deleted processed facts") && log.contains("rows=12030"),
        "{log}"
    );
}

/// The inbox's `/metrics`: facts written, the lag per partition (labelled
/// topic and partition) back to 0 once caught up; `/readyz` 200 while
/// consuming.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_show_facts_written_and_the_lag_per_partition() {
    let (slot, publication) = (unique("ibmet"), unique("pub"));
    let prefix = format!("p{slot}");
    let topic = format!("{prefix}.order");
    setup(&slot, &publication).await;
    let url = inbox_db("ibmet").await;
    let relay = spawn(relay(&slot, &publication, &prefix));
    let ids = emit_ids(&prefix, 30, 10, 0).await;
    consume_async(
        std::slice::from_ref(&topic),
        ids.len(),
        Duration::from_secs(1),
        Duration::from_secs(60),
    )
    .await;
    let inbox = MetricsRelay::spawn(inbox(&url, &topic, &slot)).await;
    assert_eq!(wait_rows(&url, 300, Duration::from_secs(60)).await, 300);
    let mut text = String::new();
    let mut lag_lines = Vec::new();
    for _ in 0..100 {
        text = http_get(&inbox.base, "/metrics", Duration::from_secs(5))
            .await
            .unwrap()
            .1;
        lag_lines = text
            .lines()
            .filter(|l| l.starts_with("factlib_inbox_lag_records{"))
            .map(str::to_owned)
            .collect();
        if lag_lines.len() == 3 && lag_lines.iter().all(|l| l.ends_with(" 0")) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(lag_lines.len(), 3, "one lag series per partition:\n{text}");
    for l in &lag_lines {
        assert!(
            l.contains(&format!("topic=\"{topic}\"")) && l.contains("partition=\""),
            "{l}"
        );
        assert!(l.ends_with(" 0"), "caught up: {l}");
    }
    assert_eq!(
        sample(&text, "factlib_inbox_facts_written_total"),
        Some(300.0)
    );
    assert_eq!(sample(&text, "factlib_inbox_consuming"), Some(1.0));
    assert!(text.contains("factlib_inbox_batch_seconds_count"), "{text}");
    assert!(
        !text.contains("factlib_facts_relayed_total"),
        "the relay's metrics are not an inbox's"
    );
    let (status, body) = http_get(&inbox.base, "/readyz", Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(status, 200, "{body}");
    inbox.stop().await;
    stop_ok(relay).await;
    teardown(&slot, &publication).await;
}

/// The README's "no fork after a rebalance": inbox A is frozen (SIGSTOP)
/// mid-run until its session times out and B takes its partitions, then
/// resumed while it still holds what it had read. Sampled every 20 ms, no
/// partition's stored offset ever goes back; every committed fact once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_inbox_resumed_after_losing_its_partitions_moves_no_offset_back() {
    let (slot, publication) = (unique("ibzom"), unique("pub"));
    let prefix = format!("p{slot}");
    setup(&slot, &publication).await;
    let url = inbox_db("ibzom").await;
    let manifest = manifest_path(&slot);
    let relay = spawn(relay_exactly_once(&slot, &publication, &prefix));
    let group = slot.clone();
    let quick = |url: &str| {
        let mut c = inbox(url, &topics(&prefix), &group);
        c.args(["--session-timeout-ms", "6000"]);
        c
    };
    let a = spawn(quick(&url));
    let b = spawn(quick(&url));
    let emitting = spawn(load(&slot, &publication, &prefix, 24, 600, &manifest));

    // Samples every partition's stored offset until told to stop; returns
    // the moves backwards it saw.
    let sampling = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let sampler = {
        let (url, group, sampling) = (url.clone(), group.clone(), sampling.clone());
        tokio::spawn(async move {
            let c = sql_at(&url).await;
            let mut last: std::collections::HashMap<(String, i32), i64> = Default::default();
            let mut back = Vec::new();
            while sampling.load(std::sync::atomic::Ordering::Relaxed) {
                for r in c
                    .query(
                        "SELECT topic, \"partition\", next_offset FROM factlib.inbox_offsets WHERE consumer_group = $1",
                        &[&group],
                    )
                    .await
                    .unwrap()
                {
                    let key = (r.get::<_, String>(0), r.get::<_, i32>(1));
                    let next: i64 = r.get(2);
                    if let Some(prev) = last.insert(key.clone(), next) {
                        if next < prev {
                            back.push((key, prev, next));
                        }
                    }
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            back
        })
    };
    tokio::time::sleep(Duration::from_secs(6)).await;
    signal(&a, "STOP").await;
    // B notices A's silence after the 6 s session timeout and takes over.
    tokio::time::sleep(Duration::from_secs(12)).await;
    signal(&a, "CONT").await;
    wait_ok(emitting, "bench emit").await;
    println!("{}", verify_inbox(&url, &manifest).await);
    sampling.store(false, std::sync::atomic::Ordering::Relaxed);
    let back = sampler.await.unwrap();
    assert!(back.is_empty(), "stored offsets went back: {back:?}");
    let log_a = String::from_utf8_lossy(&stop_ok(a).await.stderr).into_owned();
    let log_b = String::from_utf8_lossy(&stop_ok(b).await.stderr).into_owned();
    let fenced = [&log_a, &log_b]
        .iter()
        .filter(|l| l.contains("moved under this inbox"))
        .count();
    println!("inboxes whose batch was fenced: {fenced}");
    stop_ok(relay).await;
    std::fs::remove_file(&manifest).ok();
    teardown(&slot, &publication).await;
}
