//! `factlib relay --metrics-addr`: `/metrics`, `/healthz` and `/readyz` of
//! a relay running against the real PostgreSQL and Kafka, and the Grafana
//! dashboard's queries against what a relay exports. (`/readyz` through a
//! Kafka outage is in tests/relay_faults.rs, which may stop Kafka.)

mod common;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use common::*;

/// A fresh slot, publication and prefix, set up.
async fn fresh(tag: &str) -> (String, String, String) {
    let (slot, publication) = (unique(tag), unique("pub"));
    let prefix = format!("p{slot}");
    setup(&slot, &publication).await;
    (slot, publication, prefix)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_facts_counter_equals_the_facts_relayed() {
    let (slot, publication, prefix) = fresh("mcount").await;
    let relay = MetricsRelay::spawn(relay(&slot, &publication, &prefix)).await;
    relay
        .wait_status("/readyz", 200, Duration::from_secs(60))
        .await;
    assert_eq!(relay.metric("factlib_facts_relayed_total").await, Some(0.0));

    let (txns, per) = (25, 10);
    let ids = emit_ids(&prefix, txns, per, 0).await;
    let got = consume_async(
        &[format!("{prefix}.order")],
        ids.len(),
        Duration::ZERO,
        Duration::from_secs(60),
    )
    .await;
    if got.len() != ids.len() {
        let seen: std::collections::HashSet<String> =
            got.iter().filter_map(|r| r.header("factlib-id")).collect();
        let missing: Vec<&String> = ids.iter().filter(|id| !seen.contains(*id)).collect();
        // Read again, longer: late or lost?
        let again = consume_async(
            &[format!("{prefix}.order")],
            ids.len(),
            Duration::from_secs(5),
            Duration::from_secs(60),
        )
        .await;
        panic!(
            "{} of {} facts reached Kafka within 60 s; missing {missing:?}; a second read found {}; \
             confirmed_flush {}\n{}",
            got.len(),
            ids.len(),
            again.len(),
            confirmed_flush(&slot).await,
            relay.log()
        );
    }

    let n = ids.len() as f64;
    let relayed = relay
        .wait_metric(
            "factlib_facts_relayed_total",
            Duration::from_secs(30),
            |v| v >= n,
        )
        .await;
    assert_eq!(relayed, n, "counted once each");
    assert_eq!(relay.metric("factlib_facts_produced_total").await, Some(n));
    relay
        .wait_metric("factlib_facts_in_flight", Duration::from_secs(30), |v| {
            v == 0.0
        })
        .await;
    // One observation per transaction, once the watermark passed it.
    relay
        .wait_metric(
            "factlib_commit_to_ack_seconds_count",
            Duration::from_secs(30),
            |v| v == txns as f64,
        )
        .await;
    relay
        .wait_metric("factlib_confirmed_lsn", Duration::from_secs(30), |v| {
            v > 0.0
        })
        .await;
    assert_eq!(relay.metric("factlib_ack_lag_seconds").await, Some(0.0));
    assert_eq!(relay.metric("factlib_dead_letters_total").await, Some(0.0));
    assert_eq!(relay.metric("factlib_streaming").await, Some(1.0));
    assert!(relay.metric("factlib_relayed_bytes_total").await > Some(n * 10.0));
    assert!(relay.metric("process_resident_memory_bytes").await > Some(1e6));
    assert_eq!(
        relay.get("/healthz", Duration::from_secs(10)).await,
        Ok((200, "ok\n".into()))
    );
    relay.stop().await;
    teardown(&slot, &publication).await;
}

/// A backlog drains while /metrics, /healthz and /readyz are asked over
/// and over: each answers within 2 s (a liveness bound, not a speed one).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_endpoints_answer_while_a_backlog_drains() {
    let (slot, publication, prefix) = fresh("mload").await;
    let ids = emit_ids(&prefix, 20, 500, 0).await;
    let mut cmd = relay(&slot, &publication, &prefix);
    cmd.args(["--ring-capacity", "256"]);
    let relay = MetricsRelay::spawn(cmd).await;
    let n = ids.len() as f64;
    let start = Instant::now();
    let mut scrapes = 0;
    let mut busy = 0;
    loop {
        let mut relayed = None;
        for path in ["/metrics", "/healthz", "/readyz"] {
            let (status, body) = relay
                .get(path, Duration::from_secs(2))
                .await
                .unwrap_or_else(|e| panic!("{e}\n{}", relay.log()));
            scrapes += 1;
            match path {
                "/metrics" => {
                    assert_eq!(status, 200);
                    relayed = sample(&body, "factlib_facts_relayed_total");
                    if sample(&body, "factlib_facts_in_flight") > Some(0.0) {
                        busy += 1;
                    }
                }
                "/healthz" => assert_eq!((status, body.as_str()), (200, "ok\n")),
                _ => assert!(status == 200 || status == 503, "{status}"),
            }
        }
        if relayed == Some(n) {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(180),
            "{relayed:?} of {n} facts relayed after 180 s\n{}",
            relay.log()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    eprintln!(
        "{scrapes} requests answered while draining {n} facts ({busy} scrapes saw facts in flight)"
    );
    relay.stop().await;
    teardown(&slot, &publication).await;
}

/// The metric names in a PromQL expression: our namespaces only
/// (`factlib_…`, `process_…`); label names and values, functions and
/// variables never start with them.
fn metric_names(expr: &str) -> Vec<String> {
    let mut out = Vec::new();
    let bytes = expr.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        let word = bytes[i].is_ascii_alphanumeric() || bytes[i] == b'_' || bytes[i] == b':';
        let starts = i == 0
            || !(bytes[i - 1].is_ascii_alphanumeric()
                || bytes[i - 1] == b'_'
                || bytes[i - 1] == b':'
                || bytes[i - 1] == b'$');
        if word && starts {
            let end = bytes[i..]
                .iter()
                .position(|b| !(b.is_ascii_alphanumeric() || *b == b'_' || *b == b':'))
                .map_or(bytes.len(), |p| i + p);
            let w = &expr[i..end];
            if w.starts_with("factlib_") || w.starts_with("process_") {
                out.push(w.to_owned());
            }
            i = end;
        } else {
            i += 1;
        }
    }
    out
}

/// Every `expr` in a dashboard, and the datasources its panels name.
fn walk(v: &serde_json::Value, exprs: &mut Vec<String>, datasources: &mut BTreeSet<String>) {
    match v {
        serde_json::Value::Object(m) => {
            for (k, v) in m {
                match (k.as_str(), v) {
                    ("expr", serde_json::Value::String(e)) => exprs.push(e.clone()),
                    ("datasource", serde_json::Value::Object(d)) => {
                        if let Some(uid) = d.get("uid").and_then(|u| u.as_str()) {
                            datasources.insert(uid.to_owned());
                        }
                    }
                    _ => walk(v, exprs, datasources),
                }
            }
        }
        serde_json::Value::Array(a) => a.iter().for_each(|v| walk(v, exprs, datasources)),
        _ => {}
    }
}

#[test]
fn metric_names_are_found_in_promql() {
    assert_eq!(
        metric_names(
            r#"histogram_quantile(0.99, sum by (le) (rate(factlib_commit_to_ack_seconds_bucket{instance=~"$instance"}[$__rate_interval])))"#
        ),
        ["factlib_commit_to_ack_seconds_bucket"]
    );
    assert_eq!(
        metric_names("rate(process_cpu_seconds_total[5m]) / factlib_x"),
        ["process_cpu_seconds_total", "factlib_x"]
    );
    assert!(metric_names("$factlib_var + not_factlib_x").is_empty());
}

/// Each metric the dashboard queries is exported by a running relay
/// (histograms through their `_bucket`/`_sum`/`_count` series).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_metric_on_the_grafana_dashboard_is_exported() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/grafana/factlib.json");
    let text = std::fs::read_to_string(path).expect("deploy/grafana/factlib.json");
    let dashboard: serde_json::Value = serde_json::from_str(&text).expect("valid JSON");
    let (mut exprs, mut datasources) = (Vec::new(), BTreeSet::new());
    walk(&dashboard, &mut exprs, &mut datasources);
    assert!(exprs.len() >= 11, "{} queries", exprs.len());
    assert_eq!(
        datasources,
        BTreeSet::from(["${DS_PROMETHEUS}".to_owned()]),
        "every panel and query uses the DS_PROMETHEUS variable"
    );
    let vars = dashboard["templating"]["list"]
        .as_array()
        .expect("templating");
    assert!(vars
        .iter()
        .any(|v| v["name"] == "DS_PROMETHEUS" && v["type"] == "datasource"));
    let used: BTreeSet<String> = exprs.iter().flat_map(|e| metric_names(e)).collect();
    for needed in [
        "factlib_facts_relayed_total",
        "factlib_relayed_bytes_total",
        "factlib_facts_in_flight",
        "factlib_slot_lag_bytes",
        "factlib_ack_lag_seconds",
        "factlib_commit_to_ack_seconds_bucket",
        "factlib_dead_letters_total",
        "factlib_produce_errors_total",
        "factlib_reconnects_total",
        "process_cpu_seconds_total",
        "process_resident_memory_bytes",
    ] {
        assert!(used.contains(needed), "no panel shows {needed}");
    }

    let (slot, publication, prefix) = fresh("mgrafana").await;
    let relay = MetricsRelay::spawn(relay(&slot, &publication, &prefix)).await;
    let (status, scrape) = relay
        .get("/metrics", Duration::from_secs(10))
        .await
        .expect("/metrics");
    assert_eq!(status, 200);
    let exported: BTreeSet<&str> = scrape
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| l.split([' ', '{']).next())
        .collect();
    let missing: Vec<&String> = used
        .iter()
        .filter(|m| !exported.contains(m.as_str()))
        .collect();
    assert!(
        missing.is_empty(),
        "the dashboard queries {missing:?}, which the relay does not export:\n{scrape}"
    );
    relay.stop().await;
    teardown(&slot, &publication).await;
}

/// A port already taken is a clear start-up error, not a relay without
/// metrics.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_taken_metrics_port_stops_the_relay_at_once() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let mut cmd = relay("unused_slot", "unused_pub", "unused");
    cmd.args(["--metrics-addr", &addr]);
    let r = run(cmd, Duration::from_secs(60)).await;
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(
        r.stderr.contains(&format!(
            "cannot listen on --metrics-addr {addr}: address in use; pick another port"
        )),
        "{}",
        r.stderr
    );
}
