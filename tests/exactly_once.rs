//! `factlib relay --delivery exactly-once` against the real PostgreSQL and
//! Kafka: kill -9 at random points, a fenced zombie, a slot behind the
//! checkpoint, a transaction too large for one batch, dead letters, and a
//! checkpoint from another database. Every read is `read_committed`.
//! (Broker and PostgreSQL restarts are in `relay_faults.rs`, which runs its
//! tests one at a time.)

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::*;
use factlib::emit::emit;

/// `factlib relay --delivery exactly-once` with topics created (3
/// partitions), fast confirms, and `extra` flags.
fn eo_relay(
    slot: &str,
    publication: &str,
    prefix: &str,
    extra: &[&str],
) -> tokio::process::Command {
    let mut c = factlib(slot, publication, prefix);
    c.env("FACTLIB_BROKERS", brokers())
        .args(["relay", "--delivery", "exactly-once", "--create-topics"])
        .args(["--partitions", "3", "--progress-interval-secs", "1"])
        .args(["--status-interval-ms", "1000", "--max-backoff-ms", "1000"])
        .args(extra);
    c
}

/// How many times each id arrived.
fn counts(records: &[Consumed]) -> HashMap<String, usize> {
    let mut m = HashMap::new();
    for r in records {
        *m.entry(r.header("factlib-id").expect("factlib-id"))
            .or_default() += 1;
    }
    m
}

/// Asserts every id in `want` arrived exactly once and nothing else did.
fn exactly_once(want: &[String], got: &[Consumed]) {
    let c = counts(got);
    let lost = want.iter().filter(|i| !c.contains_key(*i)).count();
    let dups: usize = c.values().map(|n| n - 1).sum();
    assert_eq!((lost, dups), (0, 0), "lost, duplicates of {}", want.len());
    assert_eq!(c.len(), want.len(), "nothing unexpected arrived");
}

async fn read(topics: &[String], want: usize, limit: Duration) -> Vec<Consumed> {
    consume_async(topics, want, Duration::from_secs(3), limit).await
}

/// Each partition's high watermark (end offset) of `topic`.
fn end_offsets(topic: &str) -> HashMap<i32, i64> {
    try_end_offsets(topic).expect("end offsets")
}

/// [`end_offsets`], or the error while the topic is new (no leader yet).
fn try_end_offsets(topic: &str) -> Result<HashMap<i32, i64>, rdkafka::error::KafkaError> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    // read_uncommitted: the offsets asked for are the log ends, not the
    // last stable offsets.
    let c: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .set("isolation.level", "read_uncommitted")
        .create()?;
    let md = c.fetch_metadata(Some(topic), Duration::from_secs(10))?;
    md.topics()
        .iter()
        .flat_map(|t| t.partitions())
        .map(|p| {
            let (_, high) = c.fetch_watermarks(topic, p.id(), Duration::from_secs(10))?;
            Ok((p.id(), high))
        })
        .collect()
}

async fn wait_exit(child: tokio::process::Child, limit: Duration) -> std::process::Output {
    tokio::time::timeout(limit, child.wait_with_output())
        .await
        .expect("the relay exits in time")
        .expect("wait for the relay")
}

/// Issue 10, test 1: a load of transactions of 1–50 facts (every 7th
/// rolled back) for 65 s, with the relay killed with SIGKILL at 15 random
/// points and restarted each time. A read_committed reader sees every
/// committed fact exactly once, with the checksum of what was written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_fifteen_times_under_load_loses_and_duplicates_nothing() {
    let (slot, publication) = (unique("eok9"), unique("pub"));
    let prefix = format!("p{slot}");
    setup(&slot, &publication).await;
    let manifest = std::env::temp_dir().join(format!("{slot}.manifest"));
    let mut load = factlib(&slot, &publication, &prefix);
    load.args(["bench", "emit", "--rate", "1500", "--duration-secs", "65"])
        .args([
            "--txn-size",
            "1",
            "--txn-size-max",
            "50",
            "--rollback-every",
            "7",
        ])
        .args([
            "--connections",
            "4",
            "--delivery",
            "exactly-once",
            "--manifest",
        ])
        .arg(&manifest);
    let load = spawn(load);

    let mut seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos() as u64;
    println!("kill points seed {seed}");
    let mut kills = 0;
    while kills < 15 {
        let relay = spawn(eo_relay(&slot, &publication, &prefix, &[]));
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let ms = 1500 + (seed >> 33) % 3500;
        tokio::time::sleep(Duration::from_millis(ms)).await;
        signal(&relay, "KILL").await;
        let _ = relay.wait_with_output().await;
        kills += 1;
    }
    let emitted = wait_exit(load, Duration::from_secs(120)).await;
    assert!(
        emitted.status.success(),
        "{}",
        String::from_utf8_lossy(&emitted.stderr)
    );
    println!("{}", String::from_utf8_lossy(&emitted.stdout).trim());

    let relay = spawn(eo_relay(&slot, &publication, &prefix, &[]));
    let mut verify = factlib(&slot, &publication, &prefix);
    verify
        .env("FACTLIB_BROKERS", brokers())
        .args(["bench", "verify", "--timeout-secs", "240", "--manifest"])
        .arg(&manifest);
    let v = run(verify, Duration::from_secs(300)).await;
    println!("{}", v.stdout.trim());
    if !v
        .stdout
        .contains(" 0 missing, 0 duplicates, 0 not as written, 0 unexpected")
    {
        // Show what the last relay did, and where the slot stands.
        signal(&relay, "TERM").await;
        let out = tokio::time::timeout(Duration::from_secs(60), relay.wait_with_output()).await;
        let log = out.map_or_else(
            |_| "(no exit within 60 s)".to_owned(),
            |o| String::from_utf8_lossy(&o.unwrap().stderr).into_owned(),
        );
        panic!(
            "{}\nslot confirmed at {}\nthe last relay's log:\n{log}",
            v.stdout,
            confirmed_flush(&slot).await
        );
    }
    assert!(
        v.stdout.contains("isolation.level=read_committed"),
        "an exactly-once manifest is verified read_committed:\n{}",
        v.stdout
    );
    assert_eq!(v.code, 0, "{}\n{}", v.stdout, v.stderr);
    let out = stop_ok(relay).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("exactly-once: read the checkpoint"),
        "{stderr}"
    );
    std::fs::remove_file(&manifest).ok();
    teardown(&slot, &publication).await;
}

/// Issue 10, test 2: relay A is frozen (SIGSTOP) holding an open Kafka
/// transaction and its walsender is terminated; relay B with the same
/// transactional id takes over. Resumed, A exits non-zero without
/// confirming, and nothing it wrote becomes visible.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_relay_is_fenced_by_its_successor_and_confirms_nothing() {
    let (slot, publication) = (unique("eozo"), unique("pub"));
    let prefix = format!("p{slot}");
    let topic = format!("{prefix}.order");
    setup(&slot, &publication).await;
    let first = emit_ids(&prefix, 20, 10, 0).await;
    // A never commits on its own: its transaction stays open.
    let a = spawn(eo_relay(
        &slot,
        &publication,
        &prefix,
        &["--txn-max-ms", "600000", "--txn-max-facts", "100000000"],
    ));
    // Wait until A's records are in the log, uncommitted.
    let t = topic.clone();
    tokio::task::spawn_blocking(move || {
        for _ in 0..120 {
            // A just-created topic may not have a leader yet: try again.
            let written = try_end_offsets(&t).map_or(0, |o| o.values().sum::<i64>());
            if written >= 200 {
                return;
            }
            std::thread::sleep(Duration::from_millis(500));
        }
        panic!("relay A never wrote its records");
    })
    .await
    .unwrap();
    let invisible = read(std::slice::from_ref(&topic), 1, Duration::from_secs(5)).await;
    assert!(invisible.is_empty(), "A's open transaction is not visible");
    let before = confirmed_flush(&slot).await;

    signal(&a, "STOP").await;
    sql()
        .await
        .execute(
            "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await
        .unwrap();
    assert_eq!(
        confirmed_flush(&slot).await,
        before,
        "A never confirmed: nothing of it was committed"
    );
    let second = emit_ids(&prefix, 10, 10, 1000).await;
    let b = spawn(eo_relay(&slot, &publication, &prefix, &[]));
    let all: Vec<String> = first.iter().chain(&second).cloned().collect();
    let got = read(
        std::slice::from_ref(&topic),
        all.len(),
        Duration::from_secs(120),
    )
    .await;
    exactly_once(&all, &got);

    signal(&a, "CONT").await;
    let out = wait_exit(a, Duration::from_secs(90)).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(2),
        "the zombie must fail:\n{stderr}"
    );
    assert!(stderr.contains("fenced"), "says it was fenced:\n{stderr}");
    assert_eq!(
        stderr.matches("confirmed=").count(),
        0,
        "the zombie never reports a final confirm:\n{stderr}"
    );

    let again = read(
        std::slice::from_ref(&topic),
        all.len(),
        Duration::from_secs(60),
    )
    .await;
    exactly_once(&all, &again);
    stop_ok(b).await;
    teardown(&slot, &publication).await;
}

/// Issue 10, test 5: Kafka holds transactions the slot was never confirmed
/// past (a crash between the Kafka commit and the confirm). On restart
/// every unit at or below the checkpoint is dropped and counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn units_behind_the_checkpoint_are_dropped_and_counted() {
    let (slot, publication) = (unique("eobh"), unique("pub"));
    let prefix = format!("p{slot}");
    let topic = format!("{prefix}.order");
    setup(&slot, &publication).await;
    let start = confirmed_flush(&slot).await;
    let first = emit_ids(&prefix, 20, 10, 0).await;
    // This relay never confirms: the slot stays where it was created.
    let a = spawn(eo_relay(
        &slot,
        &publication,
        &prefix,
        &["--confirm-interval-ms", "3600000"],
    ));
    let got = read(
        std::slice::from_ref(&topic),
        first.len(),
        Duration::from_secs(120),
    )
    .await;
    exactly_once(&first, &got);
    signal(&a, "KILL").await;
    let _ = a.wait_with_output().await;
    assert_eq!(confirmed_flush(&slot).await, start, "the slot is behind");
    let mut status = factlib(&slot, &publication, &prefix);
    status.env("FACTLIB_BROKERS", brokers()).arg("status");
    let st = run(status, Duration::from_secs(60)).await;
    assert_eq!(st.code, 0, "{}", st.stderr);
    let behind: u64 = st
        .stdout
        .lines()
        .find_map(|l| l.strip_prefix("slot_behind_checkpoint_bytes: "))
        .unwrap_or_else(|| panic!("status shows how far behind:\n{}", st.stdout))
        .parse()
        .unwrap();
    assert!(behind > 0, "status: the slot is behind C:\n{}", st.stdout);
    assert!(
        st.stdout.contains(&format!("(in {prefix}.checkpoints)")),
        "{}",
        st.stdout
    );

    let b = spawn(eo_relay(&slot, &publication, &prefix, &[]));
    let second = emit_ids(&prefix, 5, 10, 1000).await;
    let all: Vec<String> = first.iter().chain(&second).cloned().collect();
    let got = read(
        std::slice::from_ref(&topic),
        all.len(),
        Duration::from_secs(120),
    )
    .await;
    exactly_once(&all, &got);
    let out = stop_ok(b).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    let line = stderr
        .lines()
        .find(|l| l.contains("already in Kafka") && l.contains("dropped"))
        .unwrap_or_else(|| panic!("no dropped line:\n{stderr}"));
    assert!(
        line.contains("units=20") && line.contains("facts=200"),
        "all 20 transactions (200 facts) below the checkpoint dropped: {line}"
    );
    assert_ne!(confirmed_flush(&slot).await, start, "B confirms");
    teardown(&slot, &publication).await;
}

/// Issue 10, test 6: one PostgreSQL transaction of 200,000 facts (4× the
/// default --txn-max-facts) goes into one Kafka transaction: each
/// partition holds its records plus exactly one transaction marker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_200k_fact_transaction_goes_in_one_kafka_transaction() {
    let (slot, publication) = (unique("eobig"), unique("pub"));
    let prefix = format!("p{slot}");
    let topic = format!("{prefix}.order");
    setup(&slot, &publication).await;
    const N: usize = 200_000;
    let mut ids = Vec::with_capacity(N);
    {
        let mut c = sql().await;
        let tx = c.transaction().await.unwrap();
        for chunk in (0..N).collect::<Vec<_>>().chunks(5_000) {
            let mut envelopes = Vec::with_capacity(chunk.len());
            for &i in chunk {
                let f = factlib::emit::build(order_fact(i)).unwrap();
                ids.push(f.id.clone());
                envelopes.push(factlib::fact::encode(&f));
            }
            tx.execute(
                "SELECT count(pg_logical_emit_message(true, $1::text, e)) FROM unnest($2::bytea[]) e",
                &[&prefix, &envelopes],
            )
            .await
            .unwrap();
        }
        tx.commit().await.unwrap();
    }
    let relay = spawn(eo_relay(&slot, &publication, &prefix, &[]));
    let got = read(std::slice::from_ref(&topic), N, Duration::from_secs(300)).await;
    exactly_once(&ids, &got);
    let mut per_partition: HashMap<i32, i64> = HashMap::new();
    for r in &got {
        *per_partition.entry(r.partition).or_default() += 1;
    }
    let ends = end_offsets(&topic);
    assert_eq!(ends.len(), 3);
    for (p, end) in ends {
        let records = per_partition.get(&p).copied().unwrap_or(0);
        assert_eq!(
            end - records,
            1,
            "partition {p}: {records} records and {} transaction markers",
            end - records
        );
    }
    let cp = end_offsets(&format!("{prefix}.checkpoints"));
    assert_eq!(cp.get(&0), Some(&2), "one checkpoint and its marker");
    stop_ok(relay).await;
    teardown(&slot, &publication).await;
}

/// Issue 10, test 7: a fact that cannot be relayed lands in the DLQ once,
/// in the same Kafka transaction as the good facts around it; a restart
/// does not write it again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_lands_once_between_the_good_facts() {
    let (slot, publication) = (unique("eodlq"), unique("pub"));
    let prefix = format!("p{slot}");
    let (topic, dlq) = (format!("{prefix}.order"), format!("{prefix}.dlq"));
    setup(&slot, &publication).await;
    let bad = b"\xff\xffnot an envelope".to_vec();
    let mut good = Vec::new();
    {
        let mut c = sql().await;
        let tx = c.transaction().await.unwrap();
        good.push(emit(&tx, &prefix, order_fact(1)).await.unwrap().0.id);
        tx.execute(
            "SELECT pg_logical_emit_message(true, $1::text, $2::bytea)",
            &[&prefix, &bad],
        )
        .await
        .unwrap();
        good.push(emit(&tx, &prefix, order_fact(2)).await.unwrap().0.id);
        tx.commit().await.unwrap();
    }
    good.extend(emit_ids(&prefix, 3, 2, 10).await);
    let relay = spawn(eo_relay(&slot, &publication, &prefix, &[]));
    let topics = vec![topic.clone(), dlq.clone()];
    let n = good.len() + 1;
    let got = read(&topics, n, Duration::from_secs(120)).await;
    let (dead, facts): (Vec<_>, Vec<_>) = got.into_iter().partition(|c| c.topic == dlq);
    assert_eq!(dead.len(), 1, "one dead letter");
    assert_eq!(dead[0].value, bad);
    exactly_once(&good, &facts);
    stop_ok(relay).await;

    // Again, after a restart with one more fact.
    let relay = spawn(eo_relay(&slot, &publication, &prefix, &[]));
    good.extend(emit_ids(&prefix, 1, 1, 100).await);
    let topics = vec![topic.clone(), dlq.clone()];
    let n = good.len() + 1;
    let got = read(&topics, n, Duration::from_secs(120)).await;
    let (dead, facts): (Vec<_>, Vec<_>) = got.into_iter().partition(|c| c.topic == dlq);
    assert_eq!(dead.len(), 1, "still one dead letter");
    exactly_once(&good, &facts);
    stop_ok(relay).await;
    teardown(&slot, &publication).await;
}

/// The sanity check: a checkpoint beyond the server's WAL (a restored or
/// different database under the same key) stops the relay with advice;
/// `--reset-checkpoint` starts from the slot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_checkpoint_beyond_the_servers_wal_is_refused_until_reset() {
    use rdkafka::producer::{BaseRecord, Producer};
    let (slot, publication) = (unique("eoah"), unique("pub"));
    let prefix = format!("p{slot}");
    setup(&slot, &publication).await;
    let system_id: String = sql()
        .await
        .query_one(
            "SELECT system_identifier::text FROM pg_control_system()",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    let key = factlib::sink::checkpoint::Source {
        system_id,
        database: "factlib".into(),
        slot: slot.clone(),
    }
    .key();
    let far = factlib::sink::checkpoint::value("FFFF/0".parse().unwrap());
    let cp_topic = format!("{prefix}.checkpoints");
    // The topic, as the relay would create it, then a checkpoint from the
    // "other" database.
    let admin: rdkafka::admin::AdminClient<_> = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .create()
        .unwrap();
    let new =
        rdkafka::admin::NewTopic::new(&cp_topic, 1, rdkafka::admin::TopicReplication::Fixed(1))
            .set("cleanup.policy", "compact");
    admin
        .create_topics([&new], &rdkafka::admin::AdminOptions::new())
        .await
        .unwrap();
    let producer: rdkafka::producer::BaseProducer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .create()
        .unwrap();
    let mut sent = false;
    for _ in 0..50 {
        if producer
            .send(
                BaseRecord::to(&cp_topic)
                    .key(&key[..])
                    .payload(&far[..])
                    .partition(0),
            )
            .is_ok()
            && producer.flush(Duration::from_secs(5)).is_ok()
        {
            sent = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(sent, "wrote the foreign checkpoint");

    let ids = emit_ids(&prefix, 3, 2, 0).await;
    let refused = run(
        eo_relay(&slot, &publication, &prefix, &[]),
        Duration::from_secs(90),
    )
    .await;
    assert_ne!(refused.code, 0, "refuses to start:\n{}", refused.stderr);
    assert!(
        refused.stderr.contains("FFFF/0") && refused.stderr.contains("--reset-checkpoint"),
        "explains and names --reset-checkpoint:\n{}",
        refused.stderr
    );

    let relay = spawn(eo_relay(
        &slot,
        &publication,
        &prefix,
        &["--reset-checkpoint"],
    ));
    let t = format!("{prefix}.order");
    let n = ids.len();
    let got = read(&[t], n, Duration::from_secs(120)).await;
    exactly_once(&ids, &got);
    stop_ok(relay).await;
    // The stored checkpoint was replaced: a plain restart works.
    let relay = spawn(eo_relay(&slot, &publication, &prefix, &[]));
    tokio::time::sleep(Duration::from_secs(3)).await;
    stop_ok(relay).await;
    teardown(&slot, &publication).await;
}

/// The checkpoint reader reads back from the end in growing windows: it
/// must still find the newest committed checkpoint of its source behind
/// thousands of other sources' records, skip an aborted one, and say
/// "none" for an empty topic and for a topic without its key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_checkpoint_reader_finds_its_newest_committed_record_far_back() {
    use factlib::sink::checkpoint::{read, value, Source};
    use rdkafka::producer::{BaseProducer, BaseRecord, Producer as _};

    let topic = format!("{}.checkpoints", unique("cpread"));
    let admin: rdkafka::admin::AdminClient<_> = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .create()
        .unwrap();
    let new = rdkafka::admin::NewTopic::new(&topic, 1, rdkafka::admin::TopicReplication::Fixed(1))
        .set("cleanup.policy", "compact");
    admin
        .create_topics([&new], &rdkafka::admin::AdminOptions::new())
        .await
        .unwrap();
    let sink = factlib::sink::SinkSettings {
        brokers: brokers(),
        ..Default::default()
    };
    let source = |slot: &str| {
        Source {
            system_id: "7".into(),
            database: "factlib".into(),
            slot: slot.into(),
        }
        .key()
    };
    let (mine, other) = (source("mine"), source("other"));
    let read_now = |key: bytes::Bytes| {
        let (sink, topic) = (sink.clone(), topic.clone());
        tokio::task::spawn_blocking(move || read(&sink, &topic, &key, Duration::from_secs(30)))
    };
    // Metadata lags creation: retry until the reader sees the topic.
    let mut empty = None;
    for _ in 0..50 {
        match read_now(mine.clone()).await.unwrap() {
            Ok(c) => {
                empty = Some(c);
                break;
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
    assert_eq!(empty, Some(None), "an empty topic holds no checkpoint");

    let producer: BaseProducer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .set("transactional.id", format!("{topic}-writer"))
        .set("linger.ms", "5")
        .create()
        .unwrap();
    producer.init_transactions(Duration::from_secs(30)).unwrap();
    let write = |key: &bytes::Bytes, lsn: &str, n: usize, commit: bool| {
        producer.begin_transaction().unwrap();
        let v = value(lsn.parse().unwrap());
        for _ in 0..n {
            loop {
                match producer.send(
                    BaseRecord::to(&topic)
                        .key(&key[..])
                        .payload(&v[..])
                        .partition(0),
                ) {
                    Ok(()) => break,
                    Err(_) => producer.poll(Duration::from_millis(10)),
                }
            }
        }
        if commit {
            producer
                .commit_transaction(Duration::from_secs(30))
                .unwrap();
        } else {
            producer.flush(Duration::from_secs(30)).unwrap();
            producer.abort_transaction(Duration::from_secs(30)).unwrap();
        }
    };
    write(&other, "0/1", 1, true);
    assert_eq!(
        read_now(mine.clone()).await.unwrap().unwrap(),
        None,
        "no record under this source's key"
    );
    write(&mine, "0/A", 1, true);
    write(&other, "0/2", 3000, true);
    write(&mine, "0/B", 1, true);
    write(&other, "0/3", 5000, true);
    // Aborted, and the newest: read_committed never sees it.
    write(&mine, "0/FFFF", 1, false);
    write(&other, "0/4", 10, true);
    assert_eq!(
        read_now(mine.clone()).await.unwrap().unwrap(),
        Some("0/B".parse().unwrap()),
        "the newest committed checkpoint of this source, about 5,000 records back"
    );
    assert_eq!(
        read_now(other.clone()).await.unwrap().unwrap(),
        Some("0/4".parse().unwrap())
    );
}
