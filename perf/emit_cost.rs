//! perf/emit-cost: µs per fact emitted from SQL (`factlib.emit`,
//! `factlib.emit_json`) against a bare `pg_logical_emit_message` of an
//! envelope built in Rust (`factlib::emit::build` + `factlib::fact::encode`),
//! on one connection, in transactions of TXN calls, one round trip per call
//! (prepared statements), the modes taking turns in rounds so that drift
//! hits them alike.
//!
//! Usage: emit_cost DATABASE_URL N TXN ROUNDS
//! Prints one line per mode: `mode=… calls=… us_per_call=…`.

use std::collections::BTreeMap;
use std::time::Instant;

use bytes::Bytes;
use factlib::emit::{build, NewFact};

const PREFIX: &str = "factlib_emit_cost";
const PAYLOAD: &str = r#"{"order_id":"o-1","total":42,"currency":"EUR","items":[1,2,3]}"#;

#[derive(Clone, Copy)]
enum Mode {
    Rust,
    RustMetadata,
    Sql,
    SqlMetadata,
    SqlJson,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Rust => "rust_build_encode+pg_logical_emit_message",
            Mode::RustMetadata => "rust_build_encode+pg_logical_emit_message(2 metadata)",
            Mode::Sql => "factlib.emit",
            Mode::SqlMetadata => "factlib.emit(2 metadata)",
            Mode::SqlJson => "factlib.emit_json",
        }
    }
}

fn metadata() -> BTreeMap<String, String> {
    BTreeMap::from([
        ("tenant".to_owned(), "acme".to_owned()),
        ("source".to_owned(), "checkout".to_owned()),
    ])
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let [_, url, n, txn, rounds] = args.as_slice() else {
        eprintln!("usage: emit_cost DATABASE_URL N TXN ROUNDS");
        std::process::exit(2);
    };
    let (n, txn, rounds): (usize, usize, usize) = (
        n.parse().expect("N"),
        txn.parse().expect("TXN"),
        rounds.parse().expect("ROUNDS"),
    );
    let (mut client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .expect("connect");
    tokio::spawn(conn);
    let raw = client
        .prepare("SELECT pg_logical_emit_message(true, $1::text, $2::bytea)")
        .await
        .unwrap();
    let emit = client
        .prepare("SELECT factlib.emit($1, $2, $3, $4::bytea, $5::text::jsonb, $6)")
        .await
        .unwrap();
    let emit_json = client
        .prepare("SELECT factlib.emit_json($1, $2, $3, $4::text::jsonb, '{}', $5)")
        .await
        .unwrap();
    let md_json = serde_json::to_string(&metadata()).unwrap();
    let modes = [
        Mode::Rust,
        Mode::Sql,
        Mode::SqlJson,
        Mode::RustMetadata,
        Mode::SqlMetadata,
    ];
    let mut totals = vec![(0usize, 0f64); modes.len()];
    let per_round = n / rounds;
    for round in 0..=rounds {
        for (m, mode) in modes.iter().enumerate() {
            let start = Instant::now();
            let mut done = 0;
            while done < per_round {
                let tx = client.transaction().await.unwrap();
                for i in done..(done + txn).min(per_round) {
                    let id = format!("o-{}", i % 1000);
                    match mode {
                        Mode::Rust | Mode::RustMetadata => {
                            let fact = build(NewFact {
                                aggregate_type: "order".into(),
                                aggregate_id: id,
                                event_type: "order.placed".into(),
                                payload: Bytes::from_static(PAYLOAD.as_bytes()),
                                metadata: match mode {
                                    Mode::RustMetadata => metadata(),
                                    _ => BTreeMap::new(),
                                },
                                trace_info: None,
                            })
                            .unwrap();
                            let envelope = factlib::fact::encode(&fact);
                            tx.query_one(&raw, &[&PREFIX, &envelope]).await.unwrap();
                        }
                        Mode::Sql | Mode::SqlMetadata => {
                            let md = match mode {
                                Mode::SqlMetadata => md_json.as_str(),
                                _ => "{}",
                            };
                            tx.query_one(
                                &emit,
                                &[
                                    &"order",
                                    &id,
                                    &"order.placed",
                                    &PAYLOAD.as_bytes(),
                                    &md,
                                    &PREFIX,
                                ],
                            )
                            .await
                            .unwrap();
                        }
                        Mode::SqlJson => {
                            tx.query_one(
                                &emit_json,
                                &[&"order", &id, &"order.placed", &PAYLOAD, &PREFIX],
                            )
                            .await
                            .unwrap();
                        }
                    }
                }
                tx.commit().await.unwrap();
                done = (done + txn).min(per_round);
            }
            // Round 0 warms the caches and plans; it is not counted.
            if round > 0 {
                totals[m].0 += per_round;
                totals[m].1 += start.elapsed().as_secs_f64();
            }
        }
    }
    for (mode, (calls, secs)) in modes.iter().zip(&totals) {
        println!(
            "mode={} calls={calls} us_per_call={:.2}",
            mode.name(),
            secs * 1e6 / *calls as f64
        );
    }
}
