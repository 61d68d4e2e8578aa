//! Issue 11, item 4: a second relay on the same slot waits as a standby and
//! takes over, within 5 s, when the active relay is killed (kill -9) or
//! stopped (SIGTERM), mid-load, in exactly-once mode: nothing lost, nothing
//! twice, for a `read_committed` consumer.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::*;
use tokio::process::Child;

/// An exactly-once relay whose log goes to `log`, read while it runs.
fn eo_relay_logged(slot: &str, publication: &str, prefix: &str, log: &Path) -> Child {
    let mut c = relay(slot, publication, prefix);
    c.args(["--delivery", "exactly-once"])
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).expect("create the log file"));
    c.spawn().expect("spawn the relay")
}

/// Waits until `log` holds `needle`; returns when it was seen. Fails the
/// test, showing the log, after `limit`.
async fn wait_for(log: &Path, needle: &str, limit: Duration) -> Instant {
    let start = Instant::now();
    loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        if text.contains(needle) {
            return Instant::now();
        }
        if start.elapsed() >= limit {
            let mut all = String::new();
            for e in std::fs::read_dir(log.parent().unwrap()).unwrap() {
                let p = e.unwrap().path();
                all += &format!(
                    "--- {}:\n{}",
                    p.display(),
                    std::fs::read_to_string(&p).unwrap()
                );
            }
            panic!(
                "{needle:?} not in {} after {limit:?}:\n{all}",
                log.display()
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Load: `txns` transactions of 10 facts, one every 50 ms, from `offset`.
fn load(prefix: &str, txns: usize, offset: usize) -> tokio::task::JoinHandle<Vec<String>> {
    let prefix = prefix.to_owned();
    tokio::spawn(async move {
        let mut ids = Vec::new();
        for t in 0..txns {
            ids.extend(emit_ids(&prefix, 1, 10, offset + t * 10).await);
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        ids
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_takes_over_after_kill_9_and_after_sigterm() {
    let (slot, publication) = (unique("standby"), unique("standby_pub"));
    let prefix = unique("standby");
    setup(&slot, &publication).await;
    let dir = tempfile::tempdir().unwrap();
    let log = |name: &str| -> PathBuf { dir.path().join(name) };
    let limit = Duration::from_secs(60);

    let a = eo_relay_logged(&slot, &publication, &prefix, &log("a"));
    wait_for(&log("a"), "streaming from slot", limit).await;
    let b = eo_relay_logged(&slot, &publication, &prefix, &log("b"));
    wait_for(&log("b"), "standby: replication slot", limit).await;

    // B waits without fencing A: A keeps relaying while B polls.
    let first = load(&prefix, 60, 0);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    signal(&a, "KILL").await;
    let killed = Instant::now();
    let took_over = wait_for(&log("b"), "the slot is free; taking over", limit).await;
    let after_kill = took_over - killed;

    let c = eo_relay_logged(&slot, &publication, &prefix, &log("c"));
    wait_for(&log("c"), "standby: replication slot", limit).await;
    let mut ids = first.await.unwrap();
    let second = load(&prefix, 40, ids.len());
    tokio::time::sleep(Duration::from_millis(1000)).await;
    signal(&b, "TERM").await;
    let stopped = Instant::now();
    let took_over = wait_for(&log("c"), "the slot is free; taking over", limit).await;
    let after_stop = took_over - stopped;
    ids.extend(second.await.unwrap());
    let b_exit = tokio::time::timeout(limit, b.wait_with_output())
        .await
        .expect("B exits after SIGTERM")
        .unwrap();
    assert!(b_exit.status.success(), "B exits 0 after SIGTERM");

    let got = consume_async(
        &[format!("{prefix}.order")],
        ids.len(),
        Duration::from_secs(3),
        Duration::from_secs(120),
    )
    .await;
    let mut seen: HashMap<String, usize> = HashMap::new();
    for r in &got {
        *seen.entry(r.header("factlib-id").expect("id")).or_default() += 1;
    }
    let lost = ids.iter().filter(|i| !seen.contains_key(*i)).count();
    let dups: usize = seen.values().map(|n| n - 1).sum();
    eprintln!(
        "takeover after kill -9: {after_kill:?}; after SIGTERM: {after_stop:?}; \
         {} facts, {lost} lost, {dups} duplicates",
        ids.len()
    );
    let logs: String = ["a", "b", "c"]
        .iter()
        .map(|n| std::fs::read_to_string(log(n)).unwrap_or_default())
        .collect();
    assert_eq!((lost, dups), (0, 0), "lost, duplicates:\n{logs}");
    assert_eq!(seen.len(), ids.len(), "nothing unexpected arrived");
    // The bound on a takeover.
    assert!(
        after_kill <= Duration::from_secs(5),
        "{after_kill:?}:\n{logs}"
    );
    assert!(
        after_stop <= Duration::from_secs(5),
        "{after_stop:?}:\n{logs}"
    );
    let c_log = std::fs::read_to_string(log("c")).unwrap();
    assert!(!c_log.contains("fenced"), "{c_log}");

    signal(&c, "TERM").await;
    let c_exit = tokio::time::timeout(limit, c.wait_with_output())
        .await
        .expect("C exits after SIGTERM")
        .unwrap();
    assert!(c_exit.status.success());
    teardown(&slot, &publication).await;
}
