//! Integration tests of `factlib relay` against the real PostgreSQL and the
//! real Kafka broker started by `tests/env/up`: exactness, order, headers,
//! restarts, crashes, dead letters, idle slots and a busy slot.

mod common;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::Duration;

use bytes::Bytes;
use common::*;
use factlib::emit::{emit, NewFact};
use factlib::fact::TraceInfo;
use factlib::Lsn;

/// A committed fact as the test wrote it, in commit order.
#[derive(Debug, Clone)]
struct Written {
    id: String,
    aggregate_type: String,
    aggregate_id: String,
    payload: Vec<u8>,
}

fn fact(agg_type: &str, agg: &str, n: usize, traced: bool) -> NewFact {
    NewFact {
        aggregate_type: agg_type.into(),
        aggregate_id: agg.into(),
        event_type: format!("{agg_type}.changed"),
        payload: Bytes::from(format!("{{\"n\":{n}}}")),
        metadata: BTreeMap::from([("seq".to_owned(), n.to_string())]),
        trace_info: traced.then(|| TraceInfo {
            trace_id: format!("{:032x}", n + 1),
            span_id: format!("{:016x}", n + 1),
            metadata: BTreeMap::new(),
        }),
    }
}

/// Emits `txns` committed transactions of `per` facts each, plus a
/// rolled-back transaction and an other-prefix message every 10th, and
/// returns what was committed, in commit order.
async fn emit_facts(prefix: &str, txns: usize, per: usize, offset: usize) -> Vec<Written> {
    let mut c = sql().await;
    let mut out = Vec::with_capacity(txns * per);
    for t in 0..txns {
        let n0 = (offset + t) * per;
        if t % 10 == 3 {
            let tx = c.transaction().await.unwrap();
            emit(&tx, prefix, fact("order", "rolled-back", n0, false))
                .await
                .unwrap();
            tx.rollback().await.unwrap();
        }
        let tx = c.transaction().await.unwrap();
        let mut batch = Vec::new();
        for i in 0..per {
            let n = n0 + i;
            let agg_type = if n.is_multiple_of(3) {
                "invoice"
            } else {
                "order"
            };
            let agg = format!("a{}", n % 37);
            let (f, _) = emit(&tx, prefix, fact(agg_type, &agg, n, n.is_multiple_of(2)))
                .await
                .unwrap();
            batch.push(Written {
                id: f.id,
                aggregate_type: agg_type.into(),
                aggregate_id: agg,
                payload: f.payload.to_vec(),
            });
        }
        if t % 10 == 7 {
            emit(&tx, "not-ours", fact("order", "x", 0, false))
                .await
                .unwrap();
        }
        tx.commit().await.unwrap();
        out.extend(batch);
    }
    out
}

fn topics(prefix: &str) -> Vec<String> {
    vec![format!("{prefix}.order"), format!("{prefix}.invoice")]
}

/// Checks that `got` holds every written fact (at least once), with the
/// right topic, key, partition, value and headers, and that per aggregate
/// the first occurrences come in commit order. Returns the duplicate count.
fn check_delivery(written: &[Written], got: &[Consumed], partitions: u32) -> usize {
    let index: HashMap<&str, usize> = written
        .iter()
        .enumerate()
        .map(|(i, w)| (w.id.as_str(), i))
        .collect();
    let mut seen = HashSet::new();
    let mut dups = 0;
    let mut last_per_key: HashMap<(String, Vec<u8>), usize> = HashMap::new();
    let mut sorted: Vec<&Consumed> = got.iter().collect();
    sorted.sort_by_key(|c| (c.topic.clone(), c.partition, c.offset));
    for c in sorted {
        let id = c.header("factlib-id").expect("factlib-id header");
        let &i = index
            .get(id.as_str())
            .unwrap_or_else(|| panic!("unexpected fact {id} in {}", c.topic));
        let w = &written[i];
        assert!(
            c.topic.ends_with(&format!(".{}", w.aggregate_type)),
            "{id} on {}",
            c.topic
        );
        assert_eq!(
            c.key.as_deref(),
            Some(w.aggregate_id.as_bytes()),
            "key of {id}"
        );
        assert_eq!(
            u32::try_from(c.partition).unwrap(),
            factlib::route::murmur2::partition_for_key(w.aggregate_id.as_bytes(), partitions),
            "{id}: partition must be the Java producer's"
        );
        let decoded =
            factlib::fact::decode(Bytes::from(c.value.clone())).expect("value is the envelope");
        assert_eq!(decoded.id, w.id);
        assert_eq!(decoded.payload.to_vec(), w.payload);
        assert_eq!(
            c.header("factlib-event-type").unwrap(),
            format!("{}.changed", w.aggregate_type)
        );
        assert_eq!(
            c.header("factlib-aggregate-type"),
            None,
            "the default --headers standard leaves the aggregate type to the topic and envelope"
        );
        let lsn: Lsn = c
            .header("factlib-lsn")
            .unwrap()
            .parse()
            .expect("factlib-lsn is X/Y");
        assert!(!lsn.is_invalid());
        assert_eq!(
            c.header("seq"),
            decoded.metadata.get("seq").cloned(),
            "metadata header"
        );
        if decoded.trace_info.is_some() {
            let tp = c
                .header("traceparent")
                .expect("traceparent for traced facts");
            assert!(tp.starts_with("00-") && tp.len() == 55, "{tp}");
        }
        if !seen.insert(i) {
            dups += 1;
            continue;
        }
        // First deliveries of one key come in commit order.
        let agg = (c.topic.clone(), c.key.clone().unwrap());
        if let Some(&prev) = last_per_key.get(&agg) {
            assert!(
                prev < i,
                "aggregate {} out of commit order: fact #{i} after #{prev}",
                w.aggregate_id
            );
        }
        last_per_key.insert(agg, i);
    }
    let missing: Vec<_> = (0..written.len())
        .filter(|i| !seen.contains(i))
        .take(5)
        .collect();
    assert!(
        missing.is_empty(),
        "lost {} facts, e.g. {:?}",
        written.len() - seen.len(),
        missing.iter().map(|&i| &written[i].id).collect::<Vec<_>>()
    );
    dups
}

/// Where the next WAL record will be inserted (everything written so far
/// ends at or before it).
async fn current_wal_lsn() -> Lsn {
    let s: String = sql()
        .await
        .query_one("SELECT pg_current_wal_insert_lsn()::text", &[])
        .await
        .unwrap()
        .get(0);
    s.parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relays_exactly_the_committed_facts_with_keys_headers_and_order() {
    let (slot, publication) = (unique("rx"), unique("pub"));
    let prefix = format!("p{slot}");
    setup(&slot, &publication).await;
    let written = emit_facts(&prefix, 1_000, 10, 0).await;
    assert_eq!(written.len(), 10_000);
    let end = current_wal_lsn().await;

    let child = spawn(relay(&slot, &publication, &prefix));
    let t = topics(&prefix);
    let got = tokio::task::spawn_blocking(move || {
        consume(&t, 10_000, Duration::from_secs(3), Duration::from_secs(120))
    })
    .await
    .unwrap();
    // Give the final confirmation a moment, then stop.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let out = stop_ok(child).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "relay exit: {}\n{stderr}", out.status);
    assert_eq!(got.len(), 10_000, "exactly the 10,000 committed facts");
    assert_eq!(check_delivery(&written, &got, 3), 0, "no duplicates");
    assert!(
        stderr.contains("progress"),
        "progress lines are printed:\n{stderr}"
    );

    let confirmed: Lsn = confirmed_flush(&slot).await.parse().unwrap();
    assert!(
        confirmed >= end,
        "the slot advanced past every relayed fact: {confirmed} < {end}"
    );
    teardown(&slot, &publication).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_mid_stream_then_restart_loses_and_repeats_nothing() {
    let (slot, publication) = (unique("rterm"), unique("pub"));
    let prefix = format!("p{slot}");
    setup(&slot, &publication).await;
    let emitter = tokio::spawn({
        let prefix = prefix.clone();
        async move {
            let mut all = Vec::new();
            for round in 0..30 {
                all.extend(emit_facts(&prefix, 10, 10, round * 10).await);
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            all
        }
    });
    let first = spawn(relay(&slot, &publication, &prefix));
    tokio::time::sleep(Duration::from_millis(1500)).await;
    stop_ok(first).await;
    let second = spawn(relay(&slot, &publication, &prefix));
    let written = emitter.await.unwrap();
    let t = topics(&prefix);
    let n = written.len();
    let got = tokio::task::spawn_blocking(move || {
        consume(&t, n, Duration::from_secs(3), Duration::from_secs(120))
    })
    .await
    .unwrap();
    stop_ok(second).await;
    assert_eq!(
        check_delivery(&written, &got, 3),
        0,
        "a graceful restart repeats nothing"
    );
    assert_eq!(got.len(), written.len());
    teardown(&slot, &publication).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_at_ten_points_loses_nothing() {
    let (slot, publication) = (unique("rkill"), unique("pub"));
    let prefix = format!("p{slot}");
    setup(&slot, &publication).await;
    let emitter = tokio::spawn({
        let prefix = prefix.clone();
        async move {
            let mut all = Vec::new();
            for round in 0..40 {
                all.extend(emit_facts(&prefix, 10, 10, round * 10).await);
                tokio::time::sleep(Duration::from_millis(40)).await;
            }
            all
        }
    });
    // Pseudo-random kill points (fixed seed: reproducible), 150..750 ms apart.
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    for _ in 0..10 {
        let child = spawn(relay(&slot, &publication, &prefix));
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        tokio::time::sleep(Duration::from_millis(150 + x % 600)).await;
        signal(&child, "KILL").await;
        let _ = child.wait_with_output().await;
    }
    let last = spawn(relay(&slot, &publication, &prefix));
    let written = emitter.await.unwrap();
    let t = topics(&prefix);
    let n = written.len();
    let got = tokio::task::spawn_blocking(move || {
        consume(&t, n, Duration::from_secs(3), Duration::from_secs(180))
    })
    .await
    .unwrap();
    stop_ok(last).await;
    let dups = check_delivery(&written, &got, 3);
    println!("crash test: {} facts written, {} records read, {dups} duplicates after 10 x kill -9 (at-least-once)", written.len(), got.len());
    teardown(&slot, &publication).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_envelope_goes_to_the_dlq_and_later_facts_flow() {
    let (slot, publication) = (unique("rdlq"), unique("pub"));
    let prefix = format!("p{slot}");
    setup(&slot, &publication).await;
    let before = emit_facts(&prefix, 5, 2, 0).await;
    let bad: &[u8] = b"\xff\xfe not a protobuf envelope";
    sql()
        .await
        .execute(
            "SELECT pg_logical_emit_message(true, $1::text, $2::bytea)",
            &[&prefix, &bad],
        )
        .await
        .unwrap();
    let after = emit_facts(&prefix, 5, 2, 5).await;
    let child = spawn(relay(&slot, &publication, &prefix));
    let mut want_topics = topics(&prefix);
    want_topics.push(format!("{prefix}.dlq"));
    let got = tokio::task::spawn_blocking(move || {
        consume(
            &want_topics,
            21,
            Duration::from_secs(2),
            Duration::from_secs(60),
        )
    })
    .await
    .unwrap();
    let out = stop_ok(child).await;
    let (dlq, facts): (Vec<_>, Vec<_>) = got.into_iter().partition(|c| c.topic.ends_with(".dlq"));
    assert_eq!(dlq.len(), 1, "one dead letter");
    assert_eq!(dlq[0].value, bad, "the raw bytes");
    assert!(
        dlq[0].header("factlib-error").unwrap().contains("envelope"),
        "{:?}",
        dlq[0].header("factlib-error")
    );
    assert!(dlq[0].header("factlib-lsn").unwrap().parse::<Lsn>().is_ok());
    let written: Vec<_> = before.into_iter().chain(after).collect();
    assert_eq!(check_delivery(&written, &facts, 3), 0);
    assert!(String::from_utf8_lossy(&out.stderr).contains("dead-letter"));
    teardown(&slot, &publication).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_slot_advances_on_wal_outside_the_publication() {
    let (slot, publication) = (unique("ridle"), unique("pub"));
    let prefix = format!("p{slot}");
    setup(&slot, &publication).await;
    let c = sql().await;
    let table = unique("idle_t");
    c.batch_execute(&format!(
        "CREATE TABLE {table} (id serial primary key, v text)"
    ))
    .await
    .unwrap();
    let child = spawn(relay(&slot, &publication, &prefix));
    tokio::time::sleep(Duration::from_secs(1)).await;
    for _ in 0..20 {
        c.batch_execute(&format!(
            "INSERT INTO {table} (v) SELECT md5(g::text) FROM generate_series(1, 500) g"
        ))
        .await
        .unwrap();
    }
    let target = current_wal_lsn().await;
    let mut confirmed: Lsn = confirmed_flush(&slot).await.parse().unwrap();
    for _ in 0..100 {
        if confirmed >= target {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        confirmed = confirmed_flush(&slot).await.parse().unwrap();
    }
    stop_ok(child).await;
    assert!(
        confirmed >= target,
        "idle slot must advance: confirmed {confirmed} < {target}"
    );
    c.batch_execute(&format!("DROP TABLE {table}"))
        .await
        .unwrap();
    teardown(&slot, &publication).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn second_relay_on_a_busy_slot_waits_as_a_standby_and_says_so_once() {
    let (slot, publication) = (unique("rbusy"), unique("pub"));
    let prefix = format!("p{slot}");
    setup(&slot, &publication).await;
    let first = spawn(relay(&slot, &publication, &prefix));
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut second = relay(&slot, &publication, &prefix);
    second.args(["--standby-poll-ms", "200"]);
    let mut second = spawn(second);
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert!(
        second.try_wait().unwrap().is_none(),
        "the second relay waits, it does not exit"
    );
    let out2 = stop_ok(second).await;
    let err2 = String::from_utf8_lossy(&out2.stderr);
    assert!(out2.status.success(), "{err2}");
    assert!(
        err2.contains("standby: replication slot") && err2.contains("is in use by PID"),
        "it says it waits as a standby, and for whom:\n{err2}"
    );
    assert_eq!(
        err2.matches("standby:").count(),
        1,
        "about 20 polls, one line:\n{err2}"
    );
    assert!(
        !err2.contains("retrying"),
        "a standby is not a failure:\n{err2}"
    );
    stop_ok(first).await;
    teardown(&slot, &publication).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn permanent_produce_error_stops_without_confirming_past_the_fact() {
    let (slot, publication) = (unique("rperm"), unique("pub"));
    let prefix = format!("p{slot}");
    setup(&slot, &publication).await;
    let small = emit_facts(&prefix, 3, 1, 0).await;
    let mut c = sql().await;
    let tx = c.transaction().await.unwrap();
    let mut big = fact("order", "big", 999, false);
    big.payload = Bytes::from(vec![b'x'; 20_000]);
    let (_, big_lsn) = emit(&tx, &prefix, big).await.unwrap();
    tx.commit().await.unwrap();

    let mut cmd = relay(&slot, &publication, &prefix);
    cmd.args(["--producer-property", "message.max.bytes=10000"]);
    let r = run(cmd, Duration::from_secs(60)).await;
    assert_ne!(r.code, 0, "a permanent produce error stops the relay");
    assert!(
        r.stderr.contains("refused a fact for good") || r.stderr.contains("failed permanently"),
        "{}",
        r.stderr
    );
    let confirmed: Lsn = confirmed_flush(&slot).await.parse().unwrap();
    assert!(
        confirmed < big_lsn,
        "slot confirmed past the failed fact: {confirmed} >= {big_lsn}"
    );
    let t = topics(&prefix);
    let got = tokio::task::spawn_blocking(move || {
        consume(&t, 3, Duration::from_secs(1), Duration::from_secs(30))
    })
    .await
    .unwrap();
    check_delivery(&small, &got, 3);
    teardown(&slot, &publication).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_emit_and_verify_prove_end_to_end_delivery() {
    let (slot, publication) = (unique("rbench"), unique("pub"));
    let prefix = format!("p{slot}");
    setup(&slot, &publication).await;
    let dir = tempfile::tempdir().unwrap();
    let manifest = dir.path().join("manifest.tsv");
    let child = spawn(relay(&slot, &publication, &prefix));

    let mut c = factlib(&slot, &publication, &prefix);
    c.args([
        "bench",
        "emit",
        "--rate",
        "500",
        "--duration-secs",
        "2",
        "--txn-size",
        "5",
        "--rollback-every",
        "4",
    ])
    .arg("--manifest")
    .arg(&manifest);
    let emitted = run(c, Duration::from_secs(60)).await;
    assert_eq!(emitted.code, 0, "{}", emitted.stderr);
    let committed = std::fs::read_to_string(&manifest).unwrap().lines().count();
    assert!(committed > 0);
    assert!(
        emitted
            .stdout
            .contains(&format!("emitted: {committed} facts committed")),
        "{}",
        emitted.stdout
    );
    assert!(
        !emitted.stdout.contains(" 0 facts rolled back"),
        "rolled-back transactions are mixed in: {}",
        emitted.stdout
    );

    let verify = |manifest: std::path::PathBuf, timeout: &str| {
        let mut c = factlib(&slot, &publication, &prefix);
        c.env("FACTLIB_BROKERS", brokers())
            .args(["bench", "verify", "--timeout-secs", timeout])
            .arg("--manifest")
            .arg(manifest);
        run(c, Duration::from_secs(90))
    };
    let ok = verify(manifest.clone(), "30").await;
    if ok.code != 0 {
        // Show what the relay said before failing: a fact that did not
        // arrive is either stuck or lost, and its log tells which.
        let out = stop_ok(child).await;
        eprintln!("relay log:\n{}", String::from_utf8_lossy(&out.stderr));
        panic!("verify failed:\n{}\n{}", ok.stdout, ok.stderr);
    }
    assert_eq!(ok.code, 0, "{}\n{}", ok.stdout, ok.stderr);
    assert!(
        ok.stdout
            .contains("VERIFIED: every committed fact arrived exactly once"),
        "{}",
        ok.stdout
    );
    assert!(
        ok.stdout
            .contains(&format!("{committed} arrived, 0 missing, 0 duplicates")),
        "{}",
        ok.stdout
    );

    // A manifest naming a fact that was never written must fail.
    let bad = dir.path().join("bad.tsv");
    let mut text = std::fs::read_to_string(&manifest).unwrap();
    let topic = text
        .lines()
        .next()
        .unwrap()
        .split('\t')
        .next()
        .unwrap()
        .to_owned();
    text.push_str(&format!(
        "{topic}\t00000000-0000-7000-8000-000000000000\tnobody\t0000000000000001\n"
    ));
    std::fs::write(&bad, text).unwrap();
    let failed = verify(bad, "5").await;
    assert_eq!(failed.code, 1, "{}", failed.stdout);
    assert!(
        failed.stdout.contains("1 missing") && failed.stdout.contains("FAILED"),
        "{}",
        failed.stdout
    );

    stop_ok(child).await;
    teardown(&slot, &publication).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_topic_stops_clearly_and_payload_mode_sends_the_payload() {
    let (slot, publication) = (unique("rtopic"), unique("pub"));
    let prefix = format!("p{slot}");
    setup(&slot, &publication).await;
    let written = emit_facts(&prefix, 3, 2, 0).await;

    let mut c = factlib(&slot, &publication, &prefix);
    c.env("FACTLIB_BROKERS", brokers())
        .args(["relay", "--progress-interval-secs", "0"]);
    let r = run(c, Duration::from_secs(60)).await;
    assert_ne!(
        r.code, 0,
        "without --create-topics a missing topic stops the relay"
    );
    assert!(
        r.stderr.contains("does not exist") && r.stderr.contains("--create-topics"),
        "the error says what to do:\n{}",
        r.stderr
    );
    let confirmed: Lsn = confirmed_flush(&slot).await.parse().unwrap();
    let mut payload_relay = relay(&slot, &publication, &prefix);
    payload_relay.args(["--value", "payload"]);
    let child = spawn(payload_relay);
    let t = topics(&prefix);
    let got = tokio::task::spawn_blocking(move || {
        consume(&t, 6, Duration::from_secs(2), Duration::from_secs(60))
    })
    .await
    .unwrap();
    stop_ok(child).await;
    assert_eq!(
        got.len(),
        6,
        "nothing was confirmed by the failed run ({confirmed}), so every fact comes now"
    );
    for c in &got {
        let id = c.header("factlib-id").unwrap();
        let w = written.iter().find(|w| w.id == id).expect("a written fact");
        assert_eq!(
            c.value, w.payload,
            "--value payload sends the payload bytes only"
        );
    }
    teardown(&slot, &publication).await;
}

/// Two bugs: a protobuf holding only `aggregate_type` was relayed as an
/// ordinary fact (empty key, empty `factlib-id`), and `aggregate_type =
/// "dlq"` rendered to the dead-letter topic, mixing with dead letters.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn incomplete_facts_and_reserved_topics_become_dead_letters() {
    let (slot, publication) = (unique("rreq"), unique("pub"));
    let prefix = format!("p{slot}");
    setup(&slot, &publication).await;
    let incomplete = factlib::fact::encode(&factlib::fact::Fact {
        aggregate_type: "order".into(),
        ..Default::default()
    });
    sql()
        .await
        .execute(
            "SELECT pg_logical_emit_message(true, $1::text, $2::bytea)",
            &[&prefix, &incomplete],
        )
        .await
        .unwrap();
    let mut c = sql().await;
    let tx = c.transaction().await.unwrap();
    let (reserved, _) = emit(&tx, &prefix, fact("dlq", "d-1", 0, false))
        .await
        .unwrap();
    tx.commit().await.unwrap();
    let after = emit_facts(&prefix, 3, 2, 1).await;

    let child = spawn(relay(&slot, &publication, &prefix));
    let mut want_topics = topics(&prefix);
    want_topics.push(format!("{prefix}.dlq"));
    let got = tokio::task::spawn_blocking(move || {
        consume(
            &want_topics,
            8,
            Duration::from_secs(2),
            Duration::from_secs(60),
        )
    })
    .await
    .unwrap();
    stop_ok(child).await;
    let (dlq, facts): (Vec<_>, Vec<_>) = got.into_iter().partition(|c| c.topic.ends_with(".dlq"));
    assert_eq!(dlq.len(), 2, "two dead letters: {dlq:?}");
    assert_eq!(dlq[0].value, incomplete, "the raw bytes");
    let error = dlq[0].header("factlib-error").unwrap_or_default();
    assert!(error.contains("required field id"), "{error}");
    let error = dlq[1].header("factlib-error").unwrap_or_default();
    assert!(error.contains("reserved"), "{error}");
    assert_eq!(
        dlq[1].value,
        factlib::fact::encode(&reserved),
        "the fact's own bytes"
    );
    assert_eq!(check_delivery(&after, &facts, 3), 0);
    teardown(&slot, &publication).await;
}

/// The bug: a 3 MiB fact failed on librdkafka's own `message.max.bytes`
/// (1,000,000), but the error blamed only the broker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fact_over_the_size_limit_names_every_limit_and_passes_once_raised() {
    let big_fact = |prefix: String| async move {
        let mut c = sql().await;
        let tx = c.transaction().await.unwrap();
        let mut big = fact("order", "big", 1, false);
        big.payload = Bytes::from(vec![b'x'; 3 << 20]);
        let (f, lsn) = emit(&tx, &prefix, big).await.unwrap();
        tx.commit().await.unwrap();
        (f, lsn)
    };

    // With the default limit: stopped, with every setting named.
    let (slot, publication) = (unique("rbig"), unique("pub"));
    let prefix = format!("p{slot}");
    setup(&slot, &publication).await;
    let (_, big_lsn) = big_fact(prefix.clone()).await;
    let r = run(relay(&slot, &publication, &prefix), Duration::from_secs(60)).await;
    assert_ne!(r.code, 0, "the relay stops");
    for part in [
        "--max-message-bytes",
        "message.max.bytes, now 1000000",
        "topic's max.message.bytes",
        "broker's message.max.bytes",
    ] {
        assert!(r.stderr.contains(part), "{part:?} missing:\n{}", r.stderr);
    }
    let confirmed: Lsn = confirmed_flush(&slot).await.parse().unwrap();
    assert!(confirmed < big_lsn, "{confirmed} >= {big_lsn}");
    teardown(&slot, &publication).await;

    // Raised: the topic is created with the same limit, and the fact goes through.
    let (slot, publication) = (unique("rbig"), unique("pub"));
    let prefix = format!("p{slot}");
    setup(&slot, &publication).await;
    let (want, _) = big_fact(prefix.clone()).await;
    let mut cmd = relay(&slot, &publication, &prefix);
    cmd.args(["--max-message-bytes", "4194304"]);
    let child = spawn(cmd);
    let t = vec![format!("{prefix}.order")];
    let got = tokio::task::spawn_blocking(move || {
        consume(&t, 1, Duration::from_secs(1), Duration::from_secs(60))
    })
    .await
    .unwrap();
    stop_ok(child).await;
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].value, factlib::fact::encode(&want));
    teardown(&slot, &publication).await;
}

/// Three small bugs of the command line: the relay dropped the cause of a
/// bad connection string, an invalid `--log` filter silently fell back to
/// `info`, and with stderr closed the process panicked (exit 101).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn command_line_errors_say_why_and_a_closed_stderr_is_no_panic() {
    let (slot, publication) = (unique("rcli"), unique("pub"));
    let prefix = format!("p{slot}");
    let mut cmd = relay(&slot, &publication, &prefix);
    cmd.env(
        "FACTLIB_DATABASE_URL",
        "postgresql://u@127.0.0.1:notaport/db",
    );
    let r = run(cmd, Duration::from_secs(30)).await;
    assert_eq!(r.code, 2);
    assert!(r.stderr.contains("invalid --database-url"), "{}", r.stderr);
    assert!(r.stderr.contains("port"), "the cause is kept: {}", r.stderr);

    let mut cmd = relay(&slot, &publication, &prefix);
    cmd.env("FACTLIB_LOG", "factlib=notalevel");
    let r = run(cmd, Duration::from_secs(30)).await;
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(r.stderr.contains("invalid --log"), "{}", r.stderr);

    setup(&slot, &publication).await;
    let mut child = spawn(relay(&slot, &publication, &prefix));
    // Read the first line, then close stderr, as `2>&1 | head -1` does.
    let mut err = child.stderr.take().unwrap();
    let mut first = [0u8; 64];
    let n = tokio::io::AsyncReadExt::read(&mut err, &mut first)
        .await
        .unwrap();
    assert!(n > 0);
    drop(err);
    // Progress lines every second now fail to write.
    tokio::time::sleep(Duration::from_secs(3)).await;
    stop_ok(child).await;
    teardown(&slot, &publication).await;
}

/// `factlib status --json` for `slot`, parsed.
async fn status_json(slot: &str, publication: &str, prefix: &str) -> serde_json::Value {
    let mut c = factlib(slot, publication, prefix);
    c.env("FACTLIB_BROKERS", brokers())
        .args(["status", "--json"]);
    let r = run(c, Duration::from_secs(60)).await;
    assert_eq!(r.code, 0, "{}\n{}", r.stdout, r.stderr);
    serde_json::from_str(r.stdout.trim())
        .unwrap_or_else(|e| panic!("status --json prints one JSON object ({e}):\n{}", r.stdout))
}

/// Issue 11, item 6: `status` gives the lag in time where it can be known
/// (while a relay streams), says why where it can't, and `--json` carries
/// the same fields.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_shows_the_lag_in_time_and_as_json() {
    let (slot, publication) = (unique("lagt"), unique("lagt_pub"));
    let prefix = unique("lagt");
    setup(&slot, &publication).await;
    let ids = emit_ids(&prefix, 2, 3, 0).await;
    // The cluster commits with synchronous_commit = off: status compares
    // the slot with pg_current_wal_lsn(), which lags the commits until the
    // WAL writer runs.
    wait_wal_flushed(&sql().await).await;

    let idle = status_json(&slot, &publication, &prefix).await;
    assert_eq!(idle["slot"], slot.as_str());
    assert_eq!(idle["active"], false);
    assert!(idle["lag_bytes"].as_i64().unwrap() > 0, "{idle}");
    assert!(idle["lag_seconds"].is_null(), "{idle}");
    assert!(
        idle["lag_seconds_unknown"]
            .as_str()
            .unwrap()
            .contains("no relay"),
        "{idle}"
    );
    assert!(idle["confirmed_flush_lsn"]
        .as_str()
        .unwrap()
        .parse::<Lsn>()
        .is_ok());

    let child = spawn(relay(&slot, &publication, &prefix));
    let got = consume_async(
        &[format!("{prefix}.order")],
        ids.len(),
        Duration::ZERO,
        Duration::from_secs(60),
    )
    .await;
    assert_eq!(got.len(), ids.len());
    // Other tests keep writing WAL, so the walsender keeps reporting a lag.
    let mut last = serde_json::Value::Null;
    for _ in 0..60 {
        last = status_json(&slot, &publication, &prefix).await;
        if last["active"] == true && last["lag_seconds"].is_f64() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    eprintln!("status while streaming: {last}");
    assert_eq!(last["active"], true, "{last}");
    let secs = last["lag_seconds"]
        .as_f64()
        .unwrap_or_else(|| panic!("{last}"));
    assert!((0.0..60.0).contains(&secs), "{last}");
    assert!(last["active_pid"].as_i64().is_some(), "{last}");

    let mut c = factlib(&slot, &publication, &prefix);
    c.env("FACTLIB_BROKERS", brokers()).arg("status");
    let text = run(c, Duration::from_secs(60)).await;
    assert!(text.stdout.contains("lag_seconds:"), "{}", text.stdout);
    stop_ok(child).await;
    teardown(&slot, &publication).await;
}
