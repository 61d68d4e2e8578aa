//! Integration tests of the replication client and the `setup`, `emit`,
//! `tail` and `status` commands, against the real PostgreSQL started by
//! `tests/env/up`.

mod common;

use std::collections::HashSet;
use std::time::Duration;

use bytes::Bytes;
use common::*;
use factlib::emit::{emit, NewFact};
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader};

fn new_fact(agg: &str, event: &str, payload: &str) -> NewFact {
    NewFact {
        aggregate_type: "order".into(),
        aggregate_id: agg.into(),
        event_type: event.into(),
        payload: Bytes::from(payload.to_owned()),
        metadata: [("src".to_owned(), "test".to_owned())].into(),
        trace_info: None,
    }
}

/// Emits the standard workload and returns the ids `tail` must print, in
/// commit order:
/// - 1,000 facts in 100 committed transactions (10 each, through the Rust
///   emitter API, with other-prefix messages mixed in: 50 in all, half of
///   them transactional);
/// - 10 rolled-back transactions with facts (must never appear);
/// - 20 non-transactional facts under our prefix. One of them is emitted on
///   a second session while a transaction is open, so it must come *before*
///   that transaction's facts (stream order = decode order, not start order).
async fn emit_workload(prefix: &str) -> Vec<String> {
    let mut a = sql().await;
    let b = sql().await;
    let mut expected = Vec::new();
    let mut other_prefix = 0;
    let mut non_tx = 0;
    for t in 0..100 {
        if t % 10 == 5 {
            // A rolled-back transaction: its facts are gone with it.
            let tx = a.transaction().await.unwrap();
            for i in 0..3 {
                emit(
                    &tx,
                    prefix,
                    new_fact(&format!("rb-{t}"), "rolled.back", &format!("{i}")),
                )
                .await
                .unwrap();
            }
            tx.rollback().await.unwrap();
        }
        let tx = a.transaction().await.unwrap();
        let mut ids = Vec::new();
        for i in 0..10 {
            let (f, _) = emit(
                &tx,
                prefix,
                new_fact(
                    &format!("agg-{}", i % 7),
                    "placed",
                    &format!("{{\"t\":{t},\"i\":{i}}}"),
                ),
            )
            .await
            .unwrap();
            ids.push(f.id);
            if i == 4 && other_prefix < 50 && t % 2 == 0 {
                emit(&tx, "other", new_fact("x", "noise", "n"))
                    .await
                    .unwrap();
                other_prefix += 1;
            }
        }
        if t % 5 == 0 && non_tx < 20 {
            // Non-transactional, on the other session, while `tx` is open:
            // decoded (and streamed) before `tx` commits.
            let content =
                factlib::fact::encode(&factlib::emit::build(new_fact("nt", "lone", "nt")).unwrap());
            let id = factlib::fact::decode(Bytes::from(content.clone()))
                .unwrap()
                .id;
            b.execute(
                "SELECT pg_logical_emit_message(false, $1::text, $2::bytea)",
                &[&prefix, &content],
            )
            .await
            .unwrap();
            expected.push(id);
            non_tx += 1;
        }
        if t % 2 == 1 && other_prefix < 50 {
            b.execute(
                "SELECT pg_logical_emit_message(false, 'other', 'noise'::bytea)",
                &[],
            )
            .await
            .unwrap();
            other_prefix += 1;
        }
        tx.commit().await.unwrap();
        expected.extend(ids);
    }
    assert_eq!((other_prefix, non_tx), (50, 20));
    assert_eq!(expected.len(), 1_020);
    expected
}

fn ids_of(stdout: &str) -> Vec<String> {
    stdout
        .lines()
        .map(|l| {
            let v: Value =
                serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}"));
            v["id"]
                .as_str()
                .unwrap_or_else(|| panic!("no id: {l}"))
                .to_owned()
        })
        .collect()
}

/// Compares id lists and reports the first difference compactly.
#[track_caller]
fn assert_ids(got: &[String], want: &[String], what: &str) {
    if let Some(i) = (0..got.len().min(want.len())).find(|&i| got[i] != want[i]) {
        panic!(
            "{what}: first difference at index {i}: got {} want {}",
            got[i], want[i]
        );
    }
    assert_eq!(got.len(), want.len(), "{what}: lengths differ");
}

/// Each test writes under its own prefix: the WAL is shared by all tests,
/// and a slot sees every test's messages.
fn prefix_of(slot: &str) -> String {
    format!("p{slot}")
}

async fn tail(slot: &str, publication: &str, args: &[&str]) -> Run {
    let mut c = factlib(slot, publication, &prefix_of(slot));
    c.arg("tail").args(args);
    run(c, Duration::from_secs(120)).await
}

#[tokio::test(flavor = "current_thread")]
async fn tail_prints_exactly_the_committed_facts_in_commit_order_on_both_transports() {
    let (slot, publication) = (unique("exact"), unique("pub"));
    setup(&slot, &publication).await;
    let before = confirmed_flush(&slot).await;
    let expected = emit_workload(&prefix_of(&slot)).await;

    for transport in ["tokio", "uring"] {
        let r = tail(
            &slot,
            &publication,
            &["--limit", "1020", "--no-confirm", "--transport", transport],
        )
        .await;
        assert_eq!(
            r.code, 0,
            "tail --transport {transport} failed: {}",
            r.stderr
        );
        let got = ids_of(&r.stdout);
        assert_eq!(got.len(), 1_020, "{transport}: wrong count");
        assert_ids(
            &got,
            &expected,
            &format!("{transport}: committed facts in commit order"),
        );
        assert_eq!(
            confirmed_flush(&slot).await,
            before,
            "--no-confirm must not move the slot"
        );
    }

    // Fields are printed as written. The first fact is the lone
    // (non-transactional) one, the second is from a transaction.
    let r = tail(&slot, &publication, &["--limit", "2", "--no-confirm"]).await;
    let lines: Vec<Value> = r
        .stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines[0]["event_type"], "lone");
    assert!(
        lines[0]["commit_lsn"].is_null() && lines[0]["xid"].is_null(),
        "{}",
        lines[0]
    );
    let v = &lines[1];
    assert_eq!(v["aggregate_type"], "order");
    assert_eq!(v["aggregate_id"], "agg-0");
    assert_eq!(v["event_type"], "placed");
    assert_eq!(v["payload"], "{\"t\":0,\"i\":0}");
    assert_eq!(v["payload_encoding"], "utf8");
    assert_eq!(v["metadata"]["src"], "test");
    assert!(v["commit_lsn"].is_string() && v["xid"].is_u64(), "{v}");
    assert!(v["created_at"].as_i64().unwrap() > 1_600_000_000_000_000_000);
    let lsn: factlib::Lsn = v["lsn"].as_str().unwrap().parse().unwrap();
    let commit: factlib::Lsn = v["commit_lsn"].as_str().unwrap().parse().unwrap();
    assert!(lsn <= commit, "a fact sits before its commit");
    teardown(&slot, &publication).await;
}

#[tokio::test(flavor = "current_thread")]
async fn tail_resumes_after_what_it_confirmed_without_loss_or_repeats() {
    let (slot, publication) = (unique("resume"), unique("pub"));
    setup(&slot, &publication).await;
    let expected = emit_workload(&prefix_of(&slot)).await;

    // 1. A limit that falls inside a transaction (index 25 is in the middle
    //    of one): the cut transaction is not confirmed, so its printed
    //    facts come again and nothing is lost.
    let r1 = tail(
        &slot,
        &publication,
        &["--limit", "25", "--transport", "tokio"],
    )
    .await;
    assert_eq!(r1.code, 0, "{}", r1.stderr);
    let first = ids_of(&r1.stdout);
    assert_ids(&first, &expected[..25], "first run");

    // 2. Stop by SIGTERM in mid-stream: tail finishes the open transaction,
    //    confirms it, and exits 0.
    let mut c = factlib(&slot, &publication, &prefix_of(&slot));
    c.args(["tail"]);
    let mut child = spawn(c);
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut second = Vec::new();
    let first_line = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
        .await
        .expect("tail prints within 30 s")
        .unwrap()
        .expect("a line");
    second.extend(ids_of(&first_line));
    signal(&child, "TERM").await;
    while let Some(l) = lines.next_line().await.unwrap() {
        second.extend(ids_of(&l));
    }
    let status = tokio::time::timeout(Duration::from_secs(30), child.wait())
        .await
        .expect("tail exits after SIGTERM")
        .unwrap();
    assert!(status.success(), "tail exits 0 after SIGTERM, got {status}");

    // The second run starts where the first confirmed: the start of the
    // transaction the limit cut (index 21: 1 lone fact + 2 transactions).
    let resume_at = expected
        .iter()
        .position(|id| id == &second[0])
        .expect("a known fact");
    assert_eq!(resume_at, 21, "second run starts at the cut transaction");
    assert_ids(
        &second,
        &expected[resume_at..resume_at + second.len()],
        "second run is contiguous",
    );
    let done = resume_at + second.len();
    let rest = expected.len() - done;
    let third = if rest > 0 {
        let r = tail(
            &slot,
            &publication,
            &["--limit", &rest.to_string(), "--transport", "uring"],
        )
        .await;
        assert_eq!(r.code, 0, "{}", r.stderr);
        ids_of(&r.stdout)
    } else {
        Vec::new()
    };
    assert_ids(
        &third,
        &expected[done..],
        "third run continues exactly after the second",
    );

    // Nothing is left, and the only repeats are the cut transaction's facts.
    let r = tail(&slot, &publication, &["--limit", "1", "--no-confirm"]);
    let r = tokio::time::timeout(Duration::from_secs(5), r).await;
    assert!(
        r.is_err(),
        "after everything was confirmed, tail must have nothing to print"
    );
    let all: HashSet<_> = first.iter().chain(&second).chain(&third).collect();
    assert_eq!(all.len(), expected.len(), "nothing lost");
    teardown(&slot, &publication).await;
}
