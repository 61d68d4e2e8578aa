//! Issue 11: the relay reaches Kafka through the test broker's SASL_SSL
//! listener (SCRAM-SHA-512, a certificate signed by the test CA), started by
//! `tests/env/up` on 127.0.0.1:19094, and fails clearly, without confirming
//! anything, when the password is wrong.

mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use common::*;

/// `relay` (see common) pointed at the SASL_SSL listener with `password`.
fn sasl_relay(
    slot: &str,
    publication: &str,
    prefix: &str,
    password: &str,
) -> tokio::process::Command {
    let mut c = relay(slot, publication, prefix);
    sasl(&mut c, password);
    c
}

/// Points a factlib command at the SASL_SSL listener, credentials in the
/// environment as a deployment would give them.
fn sasl(c: &mut tokio::process::Command, password: &str) {
    c.env("FACTLIB_BROKERS", env_value("FACTLIB_BROKERS_SASL"))
        .env("FACTLIB_KAFKA_SECURITY_PROTOCOL", "sasl_ssl")
        .env("FACTLIB_KAFKA_SASL_MECHANISM", "SCRAM-SHA-512")
        .env(
            "FACTLIB_KAFKA_SASL_USERNAME",
            env_value("FACTLIB_KAFKA_SASL_USERNAME"),
        )
        .env("FACTLIB_KAFKA_SASL_PASSWORD", password)
        .env("FACTLIB_KAFKA_CA", env_value("FACTLIB_KAFKA_CA"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exactly_once_facts_are_relayed_through_the_sasl_ssl_listener() {
    let (slot, publication) = (unique("sasl"), unique("sasl_pub"));
    let prefix = unique("sasl");
    setup(&slot, &publication).await;
    let ids = emit_ids(&prefix, 4, 5, 0).await;
    let password = env_value("FACTLIB_KAFKA_SASL_PASSWORD");

    let mut cmd = sasl_relay(&slot, &publication, &prefix, &password);
    cmd.args(["--delivery", "exactly-once"]);
    let child = spawn(cmd);
    let topic = format!("{prefix}.order");
    // Read back through the plaintext listener of the same broker.
    let got = consume_async(
        &[topic],
        ids.len(),
        Duration::from_secs(2),
        Duration::from_secs(90),
    )
    .await;
    let out = stop_ok(child).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    let mut seen: HashMap<String, usize> = HashMap::new();
    for r in &got {
        *seen
            .entry(r.header("factlib-id").expect("id header"))
            .or_default() += 1;
    }
    assert_eq!(seen.len(), ids.len(), "every fact arrived:\n{stderr}");
    assert!(
        ids.iter().all(|i| seen.get(i) == Some(&1)),
        "each once:\n{stderr}"
    );
    assert!(
        !stderr.contains(&password),
        "the password was logged:\n{stderr}"
    );

    // `status` reads the checkpoint through the same listener.
    let mut st = factlib(&slot, &publication, &prefix);
    sasl(&mut st, &password);
    st.arg("status");
    let r = run(st, Duration::from_secs(60)).await;
    assert_eq!(r.code, 0, "{}\n{}", r.stdout, r.stderr);
    let line = r
        .stdout
        .lines()
        .find(|l| l.starts_with("checkpoint:"))
        .unwrap_or_default()
        .to_owned();
    assert!(
        line.contains(&format!("(in {prefix}.checkpoints)")),
        "{}",
        r.stdout
    );
    assert!(!r.stdout.contains(&password) && !r.stderr.contains(&password));
    teardown(&slot, &publication).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_password_fails_within_30_s_and_confirms_nothing() {
    let (slot, publication) = (unique("saslbad"), unique("saslbad_pub"));
    let prefix = unique("saslbad");
    setup(&slot, &publication).await;
    emit_ids(&prefix, 2, 3, 0).await;
    let before = confirmed_flush(&slot).await;

    let wrong = "not-the-password-4711";
    for mode in ["at-least-once", "exactly-once"] {
        let started = Instant::now();
        let mut cmd = sasl_relay(&slot, &publication, &prefix, wrong);
        cmd.args(["--delivery", mode]);
        // `run` fails the test if the relay is still running after 30 s.
        let r = run(cmd, Duration::from_secs(30)).await;
        let took = started.elapsed();
        assert_ne!(r.code, 0, "{mode}: the relay must fail:\n{}", r.stderr);
        let err = r.stderr.to_lowercase();
        assert!(
            err.contains("refused the relay's credentials")
                && err.contains("--kafka-sasl-password"),
            "{mode}: the error names the cause and what to check:\n{}",
            r.stderr
        );
        assert!(
            !r.stderr.contains(wrong) && !r.stdout.contains(wrong),
            "{}",
            r.stderr
        );
        assert_eq!(
            confirmed_flush(&slot).await,
            before,
            "{mode}: nothing was confirmed"
        );
        eprintln!("{mode}, wrong password: the relay stopped after {took:?}");
    }
    teardown(&slot, &publication).await;
}
