//! The whole chain under faults: producer database → WAL → exactly-once
//! relay → Kafka → `factlib inbox` → the consuming service's database.
//! kill -9 loops on both processes, a PostgreSQL restart and a Kafka stop
//! mid-run. These stop shared servers, so they run one at a time (a lock),
//! in their own test binary.

mod common;

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;

static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// A fast, shorter-lived group member: its partitions move on 6 s after a
/// kill -9.
fn quick_inbox(url: &str, topic: &str, group: &str) -> tokio::process::Command {
    let mut c = inbox(url, topic, group);
    c.args(["--session-timeout-ms", "6000"]);
    c
}

/// A small pseudo-random generator for kill points; its seed is printed.
struct Points(u64);

impl Points {
    fn next_ms(&mut self, from: u64, to: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        from + (self.0 >> 33) % (to - from)
    }
}

fn seed() -> u64 {
    u64::from(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .subsec_nanos(),
    )
}

/// Starts `make()` 15 times, each killed with SIGKILL after 1.5–5 s; then
/// once more, left running and returned.
async fn kill_loop(
    what: &'static str,
    make: impl Fn() -> tokio::process::Command,
    mut points: Points,
) -> tokio::process::Child {
    for _ in 0..15 {
        let child = spawn(make());
        tokio::time::sleep(Duration::from_millis(points.next_ms(1_500, 5_000))).await;
        signal(&child, "KILL").await;
        let _ = child.wait_with_output().await;
    }
    println!("{what}: killed 15 times");
    spawn(make())
}

/// Issue 19, test 1: a load of transactions of 1–20 facts (every 7th
/// rolled back) for 65 s; the exactly-once relay and the inbox are each
/// killed with SIGKILL at 15 random points and restarted. Afterwards
/// factlib.inbox holds every committed fact exactly once, as written, no
/// rolled-back one, with the checksum of what was emitted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_both_the_relay_and_the_inbox_fifteen_times_each() {
    let _serial = SERIAL.lock().await;
    let (slot, publication) = (unique("ik9"), unique("pub"));
    let prefix = format!("p{slot}");
    setup(&slot, &publication).await;
    let url = inbox_db("ik9").await;
    let manifest = std::env::temp_dir().join(format!("{slot}.manifest"));
    let load = bench_load(
        (&slot, &publication, &prefix),
        65,
        1000,
        (4, 200),
        &manifest,
    );
    let started = Instant::now();
    let load = spawn(load);
    let topics = format!("{prefix}.order,{prefix}.invoice");
    let s = seed();
    println!("kill points seed {s}");
    let relays = kill_loop(
        "relay",
        || relay_exactly_once(&slot, &publication, &prefix),
        Points(s),
    );
    let inboxes = kill_loop(
        "inbox",
        || quick_inbox(&url, &topics, &slot),
        Points(s ^ 0x9e37_79b9_7f4a_7c15),
    );
    let (relay, inbox) = tokio::join!(relays, inboxes);
    let out = tokio::time::timeout(Duration::from_secs(120), load.wait_with_output())
        .await
        .expect("the load ends")
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    println!(
        "{} (load ran {:.0} s)",
        String::from_utf8_lossy(&out.stdout).trim(),
        started.elapsed().as_secs_f64()
    );

    let r = verify_inbox_run(&url, &manifest, Duration::from_secs(300)).await;
    println!("{}", r.stdout.trim());
    if r.code != 0 {
        let log = String::from_utf8_lossy(&stop_ok(inbox).await.stderr).into_owned();
        panic!("{}\n{}\nthe last inbox's log:\n{log}", r.stdout, r.stderr);
    }
    assert!(
        r.stdout
            .contains("0 missing, 0 duplicates, 0 not as written, 0 unexpected"),
        "{}",
        r.stdout
    );
    stop_ok(inbox).await;
    stop_ok(relay).await;
    std::fs::remove_file(&manifest).ok();
    teardown(&slot, &publication).await;
}

/// What the in-test load wrote: the ids whose COMMIT returned, those
/// rolled back, and those whose COMMIT failed (they may or may not be
/// committed).
#[derive(Default)]
struct Written {
    committed: Vec<String>,
    rolled_back: Vec<String>,
    unknown: Vec<String>,
}

/// Emits transactions of 5 facts (about 1 KiB each, every 5th transaction
/// rolled back) every 10 ms until `stop`, reconnecting across a
/// PostgreSQL restart.
fn load(prefix: String, stop: Arc<AtomicBool>) -> tokio::task::JoinHandle<Written> {
    tokio::spawn(async move {
        let mut w = Written::default();
        let mut n = 0usize;
        let pad = "x".repeat(1_000);
        while !stop.load(Ordering::Relaxed) {
            let Ok((mut c, conn)) =
                tokio_postgres::connect(&database_url(), tokio_postgres::NoTls).await
            else {
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            };
            tokio::spawn(conn);
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                let rollback = n.is_multiple_of(5);
                let Ok(tx) = c.transaction().await else { break };
                let mut ids = Vec::new();
                let mut failed = false;
                for i in 0..5 {
                    let mut f = order_fact(n * 5 + i);
                    f.payload = bytes::Bytes::from(format!("{{\"n\":{n},\"pad\":\"{pad}\"}}"));
                    match factlib::emit::emit(&tx, &prefix, f).await {
                        Ok((fact, _)) => ids.push(fact.id),
                        Err(_) => {
                            failed = true;
                            break;
                        }
                    }
                }
                if failed {
                    break;
                }
                if rollback {
                    if tx.rollback().await.is_ok() {
                        w.rolled_back.extend(ids);
                    }
                } else if tx.commit().await.is_ok() {
                    w.committed.extend(ids);
                } else {
                    w.unknown.extend(ids);
                    break;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
        w
    })
}

/// Issue 19, test 3: PostgreSQL (the inbox's database with it) restarted
/// and Kafka stopped for 10 s, both mid-run, under load: every committed
/// fact once, no rolled-back one, and the inbox's memory stays bounded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_restart_and_a_kafka_outage_mid_run_lose_and_duplicate_nothing() {
    let _serial = SERIAL.lock().await;
    let (slot, publication) = (unique("irst"), unique("pub"));
    let prefix = format!("p{slot}");
    let topic = format!("{prefix}.order");
    setup(&slot, &publication).await;
    let url = inbox_db("irst").await;
    let relay = spawn(relay_exactly_once(&slot, &publication, &prefix));
    let inbox = spawn(inbox(&url, &topic, &slot));
    let pid = inbox.id().expect("the inbox runs");
    let peak = Arc::new(AtomicU64::new(0));
    let sampling = Arc::new(AtomicBool::new(true));
    let sampler = {
        let (peak, sampling) = (Arc::clone(&peak), Arc::clone(&sampling));
        tokio::spawn(async move {
            while sampling.load(Ordering::Relaxed) {
                peak.fetch_max(rss_kib(pid), Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };
    let stop = Arc::new(AtomicBool::new(false));
    let writing = load(prefix.clone(), Arc::clone(&stop));
    tokio::time::sleep(Duration::from_secs(8)).await;
    pg_ctl_restart("fast").await;
    println!("postgres restarted");
    tokio::time::sleep(Duration::from_secs(8)).await;
    stop_kafka().await;
    println!("kafka stopped");
    tokio::time::sleep(Duration::from_secs(10)).await;
    start_env().await;
    println!("kafka started");
    tokio::time::sleep(Duration::from_secs(8)).await;
    stop.store(true, Ordering::Relaxed);
    let w = writing.await.unwrap();
    println!(
        "load: {} committed, {} rolled back, {} of unknown outcome",
        w.committed.len(),
        w.rolled_back.len(),
        w.unknown.len()
    );
    assert!(
        w.committed.len() > 1_000,
        "a real load: {}",
        w.committed.len()
    );

    let c = sql_at(&url).await;
    let committed: HashSet<&String> = w.committed.iter().collect();
    let deadline = Instant::now() + Duration::from_secs(180);
    let got: Vec<String> = loop {
        let ids: Vec<String> = c
            .query(
                "SELECT id::text FROM factlib.inbox WHERE topic = $1",
                &[&topic],
            )
            .await
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect();
        let present = ids.iter().filter(|i| committed.contains(i)).count();
        if present == committed.len() || Instant::now() >= deadline {
            break ids;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    sampling.store(false, Ordering::Relaxed);
    sampler.await.unwrap();
    let got_set: HashSet<&String> = got.iter().collect();
    let lost = w.committed.iter().filter(|i| !got_set.contains(i)).count();
    let rolled_back = w.rolled_back.iter().filter(|i| got_set.contains(i)).count();
    let unknown: HashSet<&String> = w.unknown.iter().collect();
    let unexpected = got
        .iter()
        .filter(|i| !committed.contains(i) && !unknown.contains(i))
        .count();
    let peak_mib = peak.load(Ordering::Relaxed) / 1024;
    println!(
        "inbox: {} rows; lost {lost}, duplicates {}, rolled back present {rolled_back}, unexpected {unexpected}; peak RSS {peak_mib} MiB",
        got.len(),
        got.len() - got_set.len()
    );
    assert_eq!(
        (lost, got.len() - got_set.len(), rolled_back, unexpected),
        (0, 0, 0, 0)
    );
    // librdkafka's fetch queue (16 MiB by default) plus two batches per writer: no
    // backlog is held in memory.
    assert!(peak_mib < 100, "peak RSS {peak_mib} MiB");
    let out = stop_ok(inbox).await;
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(
        log.contains("transient failure"),
        "the inbox saw the restart:\n{log}"
    );
    stop_ok(relay).await;
    teardown(&slot, &publication).await;
}
