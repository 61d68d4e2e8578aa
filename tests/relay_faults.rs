//! Fault tests of `factlib relay` that stop shared servers: a Kafka outage
//! and a PostgreSQL restart. They run one at a time (a lock), in their own
//! test binary, so no other test sees the outage.

mod common;

use std::time::Duration;

use common::*;
use factlib::Lsn;
use tokio::sync::Mutex;

static SERIAL: Mutex<()> = Mutex::const_new(());

/// The `factlib-lsn` header (its transaction's commit LSN) of fact `id`'s record.
fn commit_lsn_of(records: &[Consumed], id: &str) -> Lsn {
    records
        .iter()
        .find(|c| c.header("factlib-id").as_deref() == Some(id))
        .and_then(|c| c.header("factlib-lsn"))
        .expect("the fact's record has factlib-lsn")
        .parse()
        .unwrap()
}

async fn insert_lsn() -> Lsn {
    let s: String = sql()
        .await
        .query_one("SELECT pg_current_wal_insert_lsn()::text", &[])
        .await
        .unwrap()
        .get(0);
    s.parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_outage_holds_the_slot_and_bounds_memory_then_delivers_everything() {
    let _serial = SERIAL.lock().await;
    let (slot, publication) = (unique("fkafka"), unique("pub"));
    let prefix = format!("p{slot}");
    let topic = format!("{prefix}.order");
    setup(&slot, &publication).await;
    let mut cmd = relay(&slot, &publication, &prefix);
    small_buffers(&mut cmd);
    let mut child = spawn(cmd);
    let pid = child.id().unwrap();

    let before = emit_ids(&prefix, 10, 10, 0).await;
    let t = topic.clone();
    let got = read_ids(t, 100, Duration::from_secs(60)).await;
    check_all(&before, &got);

    stop_kafka().await;
    let outage_start = insert_lsn().await;
    let during = emit_ids(&prefix, 200, 10, 100).await;
    let mut highest = Lsn::INVALID;
    let mut peak_rss = 0;
    for _ in 0..25 {
        let c: Lsn = confirmed_flush(&slot).await.parse().unwrap();
        highest = highest.max(c);
        peak_rss = peak_rss.max(rss_kib(pid));
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        child.try_wait().unwrap().is_none(),
        "the relay keeps running while Kafka is away"
    );
    println!("kafka outage: 2,000 facts held back; confirmed peaked at {highest} (outage began at {outage_start}); relay peak RSS {} MiB", peak_rss / 1024);

    start_env().await;
    let all: Vec<String> = before.iter().chain(&during).cloned().collect();
    let n = all.len();
    let t = topic.clone();
    let records = consume_async(&[t], n, Duration::from_secs(2), Duration::from_secs(120)).await;
    let got = ids_of(&records);
    let dups = check_all(&all, &got);
    println!("kafka outage: all {n} facts delivered after the restart, {dups} duplicates");
    // The first transaction written during the outage commits at the LSN in
    // its records' factlib-lsn header. While it was unacknowledged the slot
    // must not have passed that commit, or a crash would have skipped it.
    // (A keepalive may move the slot past the open transaction's earlier
    // records: they are decoded again on restart, the commit being ahead.)
    let first_commit = commit_lsn_of(&records, &during[0]);
    assert!(
        highest <= first_commit,
        "during the outage the slot was confirmed to {highest}, past the commit {first_commit} of the first unacknowledged transaction"
    );
    assert!(first_commit > outage_start);
    let end = insert_lsn().await;
    let mut confirmed: Lsn = confirmed_flush(&slot).await.parse().unwrap();
    for _ in 0..100 {
        if confirmed >= end {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        confirmed = confirmed_flush(&slot).await.parse().unwrap();
    }
    assert!(
        confirmed >= end,
        "the slot advances once Kafka is back: {confirmed} < {end}"
    );
    stop_ok(child).await;
    teardown(&slot, &publication).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_restart_mid_stream_reconnects_and_loses_nothing() {
    let _serial = SERIAL.lock().await;
    let (slot, publication) = (unique("fpg"), unique("pub"));
    let prefix = format!("p{slot}");
    let topic = format!("{prefix}.order");
    setup(&slot, &publication).await;
    let first = emit_ids(&prefix, 300, 10, 0).await;
    let child = spawn(relay(&slot, &publication, &prefix));
    tokio::time::sleep(Duration::from_millis(700)).await;

    // Restart the server under the relay.
    pg_ctl_restart("fast").await;

    let second = emit_ids(&prefix, 50, 10, 3_000).await;
    let all: Vec<String> = first.iter().chain(&second).cloned().collect();
    let n = all.len();
    let got = read_ids(topic, n, Duration::from_secs(120)).await;
    let dups = check_all(&all, &got);
    println!("postgres restart: all {n} facts delivered, {dups} duplicates");
    let out = stop_ok(child).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("retrying"),
        "the relay saw the restart and reconnected:\n{stderr}"
    );
    assert!(
        stderr.matches("streaming from slot").count() >= 2,
        "{stderr}"
    );
    teardown(&slot, &publication).await;
}

/// Two bugs: a relay that first looked a topic up while Kafka was away
/// exited with status 2, where it should wait and say so; and while Kafka
/// was away it logged about 40 ERROR lines a second (each librdkafka error
/// twice). Also: a stop during the outage ends the relay cleanly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_started_while_kafka_is_away_waits_quietly_then_delivers() {
    let _serial = SERIAL.lock().await;
    let (slot, publication) = (unique("fnokafka"), unique("pub"));
    let prefix = format!("p{slot}");
    let topic = format!("{prefix}.order");
    setup(&slot, &publication).await;
    stop_kafka().await;
    let ids = emit_ids(&prefix, 5, 4, 0).await;

    // A stop while waiting for Kafka ends the relay cleanly, confirming nothing.
    let first = spawn(relay(&slot, &publication, &prefix));
    tokio::time::sleep(Duration::from_secs(5)).await;
    stop_ok(first).await;

    let mut child = spawn(relay(&slot, &publication, &prefix));
    let outage = Duration::from_secs(15);
    tokio::time::sleep(outage).await;
    assert!(
        child.try_wait().unwrap().is_none(),
        "the relay waits for Kafka instead of exiting"
    );
    let confirmed: Lsn = confirmed_flush(&slot).await.parse().unwrap();
    start_env().await;
    let n = ids.len();
    let records = tokio::task::spawn_blocking(move || {
        consume(
            &[topic],
            n,
            Duration::from_secs(2),
            Duration::from_secs(120),
        )
    })
    .await
    .unwrap();
    check_all(&ids, &ids_of(&records));
    // Nothing was acknowledged, so the slot stayed before the first
    // transaction's commit (a keepalive may pass its earlier records).
    let first_commit = commit_lsn_of(&records, &ids[0]);
    assert!(
        confirmed < first_commit,
        "confirmed {confirmed} while Kafka was away, past the commit {first_commit}"
    );
    let out = stop_ok(child).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("is Kafka reachable") && stderr.contains("retrying"),
        "the relay says why it waits:\n{stderr}"
    );
    // librdkafka's complaints are folded into one line per 10 s, and the
    // relay's own retries are one line each (one attempt per metadata
    // timeout of 10 s): a handful over the outage, not hundreds.
    let complaints = stderr
        .lines()
        .filter(|l| l.contains("WARN") || l.contains("ERROR"))
        .count();
    println!("kafka away at start: {complaints} WARN/ERROR lines over a {outage:?} outage");
    assert!(
        complaints <= 12,
        "{complaints} WARN/ERROR lines over a {outage:?} outage:\n{stderr}"
    );
    teardown(&slot, &publication).await;
}

/// The hang: SIGTERM while Kafka was away mid-stream, with records waiting
/// in the producer's full queue, never ended the relay (its flusher kept
/// retrying the full queue). It must exit 0 after its shutdown timeout,
/// confirm nothing unacknowledged, and a later relay delivers everything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_during_a_kafka_outage_exits_and_a_restart_delivers_everything() {
    sigterm_during_a_kafka_outage(false).await;
}

/// The same with `--delivery exactly-once`, and no duplicates: the open
/// Kafka transaction is given up (not committed, not confirmed) and a
/// restart delivers it once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exactly_once_sigterm_during_a_kafka_outage_exits_and_a_restart_delivers_once() {
    sigterm_during_a_kafka_outage(true).await;
}

async fn sigterm_during_a_kafka_outage(exactly_once: bool) {
    let _serial = SERIAL.lock().await;
    let (slot, publication) = (
        unique(if exactly_once { "eostop" } else { "fstop" }),
        unique("pub"),
    );
    let prefix = format!("p{slot}");
    let topic = format!("{prefix}.order");
    setup(&slot, &publication).await;
    let small = |mut cmd: tokio::process::Command| {
        if exactly_once {
            cmd.args(["--delivery", "exactly-once"]);
        }
        small_buffers(&mut cmd);
        cmd.args(["--shutdown-timeout-secs", "2"]);
        cmd
    };
    let child = spawn(small(relay(&slot, &publication, &prefix)));
    let before = emit_ids(&prefix, 10, 10, 0).await;
    let t = topic.clone();
    let got = read_ids(t, 100, Duration::from_secs(60)).await;
    check_all(&before, &got);

    stop_kafka().await;
    let during = emit_ids(&prefix, 50, 10, 100).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let out = stop_ok(child).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("relay stopped"), "{stderr}");
    let confirmed: Lsn = confirmed_flush(&slot).await.parse().unwrap();

    start_env().await;
    let child = spawn(small(relay(&slot, &publication, &prefix)));
    let all: Vec<String> = before.iter().chain(&during).cloned().collect();
    let n = all.len();
    let t = topic.clone();
    let records = consume_async(&[t], n, Duration::from_secs(2), Duration::from_secs(120)).await;
    let dups = check_all(&all, &ids_of(&records));
    println!("sigterm in an outage: all {n} facts delivered after a restart, {dups} duplicates");
    if exactly_once {
        assert_eq!(dups, 0, "exactly-once: no duplicates");
    }
    let first_commit = commit_lsn_of(&records, &during[0]);
    assert!(
        confirmed < first_commit,
        "stopped in the outage with the slot at {confirmed}, past the commit {first_commit} of an unacknowledged fact"
    );
    stop_ok(child).await;
    teardown(&slot, &publication).await;
}

/// Small buffers, so a Kafka outage exercises backpressure into the WAL
/// reader.
fn small_buffers(cmd: &mut tokio::process::Command) {
    cmd.args([
        "--rings",
        "2",
        "--ring-capacity",
        "16",
        "--queue-messages",
        "200",
    ]);
}

/// `factlib relay --delivery exactly-once` with the test settings.
fn eo_relay(slot: &str, publication: &str, prefix: &str) -> tokio::process::Command {
    let mut c = relay(slot, publication, prefix);
    c.args(["--delivery", "exactly-once"]);
    c
}

/// Issue 10, test 3: exactly-once through a Kafka broker stop and restart
/// in mid-run: memory stays bounded while it is away, and afterwards a
/// read_committed reader sees every fact exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exactly_once_through_a_kafka_restart_loses_and_duplicates_nothing() {
    let _serial = SERIAL.lock().await;
    let (slot, publication) = (unique("eokafka"), unique("pub"));
    let prefix = format!("p{slot}");
    let topic = format!("{prefix}.order");
    setup(&slot, &publication).await;
    let mut cmd = eo_relay(&slot, &publication, &prefix);
    small_buffers(&mut cmd);
    let mut child = spawn(cmd);
    let pid = child.id().unwrap();
    let before = emit_ids(&prefix, 10, 10, 0).await;
    let t = topic.clone();
    let got = read_ids(t, 100, Duration::from_secs(60)).await;
    check_exactly_once(&before, &got);

    stop_kafka().await;
    let during = emit_ids(&prefix, 200, 10, 100).await;
    let mut peak_rss = 0;
    for _ in 0..25 {
        peak_rss = peak_rss.max(rss_kib(pid));
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        child.try_wait().unwrap().is_none(),
        "the relay keeps running while Kafka is away"
    );
    start_env().await;
    let after = emit_ids(&prefix, 10, 10, 5_000).await;
    let all: Vec<String> = before
        .iter()
        .chain(&during)
        .chain(&after)
        .cloned()
        .collect();
    let n = all.len();
    let t = topic.clone();
    let got = read_ids(t, n, Duration::from_secs(180)).await;
    check_exactly_once(&all, &got);
    println!(
        "exactly-once through a Kafka restart: {n} facts, 0 lost, 0 duplicates; relay peak RSS {} MiB while Kafka was away",
        peak_rss / 1024
    );
    assert!(
        peak_rss < 256 * 1024,
        "memory stays bounded while Kafka is away: {peak_rss} KiB"
    );
    stop_ok(child).await;
    teardown(&slot, &publication).await;
}

/// Issue 10, test 4: exactly-once through a PostgreSQL crash (`pg_ctl
/// restart -m immediate`: PostgreSQL 15 then forgets the slot's confirmed
/// position since its last checkpoint) and a relay killed afterwards, so
/// the next relay streams from the older slot position and the checkpoint
/// must absorb it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exactly_once_through_a_postgres_crash_loses_and_duplicates_nothing() {
    let _serial = SERIAL.lock().await;
    let (slot, publication) = (unique("eopg"), unique("pub"));
    let prefix = format!("p{slot}");
    let topic = format!("{prefix}.order");
    setup(&slot, &publication).await;
    let first = emit_ids(&prefix, 300, 10, 0).await;
    let child = spawn(eo_relay(&slot, &publication, &prefix));
    tokio::time::sleep(Duration::from_millis(700)).await;
    pg_ctl_restart("immediate").await;
    let second = emit_ids(&prefix, 50, 10, 3_000).await;
    let mut all: Vec<String> = first.iter().chain(&second).cloned().collect();
    let (t, n) = (topic.clone(), all.len());
    let got = read_ids(t, n, Duration::from_secs(120)).await;
    check_exactly_once(&all, &got);
    // Crash PostgreSQL again, then kill the relay: the next one starts from
    // whatever the slot remembers.
    pg_ctl_restart("immediate").await;
    signal(&child, "KILL").await;
    let out = child.wait_with_output().await.unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("retrying"),
        "the relay reconnected:\n{stderr}"
    );
    let child = spawn(eo_relay(&slot, &publication, &prefix));
    all.extend(emit_ids(&prefix, 20, 10, 6_000).await);
    let (t, n) = (topic.clone(), all.len());
    let got = read_ids(t, n, Duration::from_secs(120)).await;
    check_exactly_once(&all, &got);
    println!(
        "exactly-once through PostgreSQL crashes: {} facts, 0 lost, 0 duplicates",
        all.len()
    );
    stop_ok(child).await;
    teardown(&slot, &publication).await;
}

/// `/readyz` answers 503 with a reason while Kafka is away and 200 again
/// once it is back; `/healthz` stays 200 throughout (the relay is alive,
/// only waiting).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_follows_kafka_through_an_outage_and_healthz_stays_up() {
    let _serial = SERIAL.lock().await;
    let (slot, publication) = (unique("fready"), unique("pub"));
    let prefix = format!("p{slot}");
    setup(&slot, &publication).await;
    let relay = MetricsRelay::spawn(relay(&slot, &publication, &prefix)).await;
    relay
        .wait_status("/readyz", 200, Duration::from_secs(60))
        .await;

    stop_kafka().await;
    let why = relay
        .wait_status("/readyz", 503, Duration::from_secs(30))
        .await;
    assert!(why.starts_with("kafka: "), "{why}");
    // Past any single report: the relay's loops keep ticking while Kafka
    // is away.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        relay.get("/healthz", Duration::from_secs(10)).await,
        Ok((200, "ok\n".into()))
    );
    assert_eq!(relay.metric("factlib_kafka_brokers_up").await, Some(0.0));

    start_env().await;
    relay
        .wait_status("/readyz", 200, Duration::from_secs(120))
        .await;
    assert!(relay.metric("factlib_kafka_brokers_up").await >= Some(1.0));
    relay.stop().await;
    teardown(&slot, &publication).await;
}
