//! Issue 11, item 5: no password ever appears in what factlib writes: logs
//! (text and JSON, at debug level), errors, `status`. Each run below sets a
//! PostgreSQL password and a Kafka SASL password, both made up for this
//! run, and every byte it writes is searched for them.

mod common;

use std::time::Duration;

use common::*;

/// A role with a password nobody else uses, able to replicate.
async fn secret_role() -> (String, String) {
    let role = "factlib_secret".to_owned();
    let password = format!("pg-pw-{}", unique("s").replace('_', "-"));
    let c = sql().await;
    c.batch_execute(&format!(
        "DO $$ BEGIN
           IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '{role}') THEN
             CREATE ROLE {role};
           END IF;
         END $$;
         ALTER ROLE {role} WITH LOGIN REPLICATION SUPERUSER PASSWORD '{password}';"
    ))
    .await
    .expect("create the role");
    (role, password)
}

/// Fails the test if `secret` occurs in `text`, showing where.
fn assert_absent(what: &str, text: &str, secret: &str) {
    if let Some(at) = text.find(secret) {
        let from = text[..at].rfind('\n').map_or(0, |i| i + 1);
        let to = text[at..].find('\n').map_or(text.len(), |i| at + i);
        panic!("{what} shows a password: {}", &text[from..to]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_password_appears_in_any_output() {
    let (role, pg_password) = secret_role().await;
    let kafka_password = env_value("FACTLIB_KAFKA_SASL_PASSWORD");
    let url = url_for(&role, Some(&pg_password));
    let (slot, publication) = (unique("secret"), unique("secret_pub"));
    let prefix = unique("secret");
    setup(&slot, &publication).await;
    let ids = emit_ids(&prefix, 3, 4, 0).await;

    let with = |c: &mut tokio::process::Command, url: &str, kafka_password: &str| {
        c.env("FACTLIB_DATABASE_URL", url)
            .env("FACTLIB_LOG", "debug")
            .env("FACTLIB_BROKERS", env_value("FACTLIB_BROKERS_SASL"))
            .env("FACTLIB_KAFKA_SECURITY_PROTOCOL", "sasl_ssl")
            .env("FACTLIB_KAFKA_SASL_MECHANISM", "SCRAM-SHA-512")
            .env(
                "FACTLIB_KAFKA_SASL_USERNAME",
                env_value("FACTLIB_KAFKA_SASL_USERNAME"),
            )
            .env("FACTLIB_KAFKA_SASL_PASSWORD", kafka_password)
            .env("FACTLIB_KAFKA_CA", env_value("FACTLIB_KAFKA_CA"));
    };
    let mut outputs: Vec<(String, String)> = Vec::new();

    // A relay that works, in both log formats, with debug logs, serving
    // metrics: its logs and every endpoint's answer are searched too.
    // Over TLS (verify-full) for the JSON run: TLS logs are searched too.
    let tls_url = env_value("FACTLIB_DATABASE_URL_TLS").replacen(
        "factlib:factlib@",
        &format!("{role}:{pg_password}@"),
        1,
    );
    assert!(tls_url.contains(&pg_password), "{tls_url}");
    for (format, url) in [("text", &url), ("json", &tls_url)] {
        let mut c = relay(&slot, &publication, &prefix);
        with(&mut c, url, &kafka_password);
        c.args(["--delivery", "exactly-once", "--log-format", format]);
        let relay = MetricsRelay::spawn(c).await;
        let got = consume_async(
            &[format!("{prefix}.order")],
            ids.len(),
            Duration::from_secs(1),
            Duration::from_secs(90),
        )
        .await;
        for path in ["/metrics", "/healthz", "/readyz"] {
            let (_, body) = relay.get(path, Duration::from_secs(10)).await.unwrap();
            outputs.push((format!("{path} ({format})"), body));
        }
        let stderr = relay.stop().await;
        assert!(
            got.len() >= ids.len(),
            "facts relayed ({format}):\n{stderr}"
        );
        if format == "json" {
            let first = stderr.lines().next().unwrap_or_default();
            let v: serde_json::Value = serde_json::from_str(first)
                .unwrap_or_else(|e| panic!("a JSON log line ({e}): {first}"));
            assert!(
                v.get("level").is_some() && v.get("timestamp").is_some(),
                "{first}"
            );
        }
        outputs.push((format!("relay --log-format {format} stderr"), stderr));
    }

    // `status`, and commands that fail: the wrong Kafka password, the wrong
    // PostgreSQL password, an unreachable server. Their errors must not
    // echo either password.
    let wrong_pg = url_for(&role, Some("wrong-pg-pw-Zq9"));
    let unreachable = format!("postgresql://{role}:{pg_password}@127.0.0.1:1/factlib");
    let runs: [(&str, &str, &str, &[&str], bool); 5] = [
        ("status", &url, &kafka_password, &["status"], true),
        (
            "status, wrong Kafka password",
            &url,
            "wrong-kafka-pw-Zq9",
            &["status"],
            true,
        ),
        (
            "relay, wrong Kafka password",
            &url,
            "wrong-kafka-pw-Zq9",
            &["relay", "--create-topics"],
            false,
        ),
        (
            "relay, wrong PostgreSQL password",
            &wrong_pg,
            &kafka_password,
            &["relay"],
            false,
        ),
        (
            "status, unreachable PostgreSQL",
            &unreachable,
            &kafka_password,
            &["status"],
            false,
        ),
    ];
    for (what, url, kafka_password, args, succeeds) in runs {
        let mut c = factlib(&slot, &publication, &prefix);
        with(&mut c, url, kafka_password);
        c.args(args);
        let r = run(c, Duration::from_secs(60)).await;
        assert_eq!(r.code == 0, succeeds, "{what}:\n{}\n{}", r.stdout, r.stderr);
        outputs.push((format!("{what}: stdout"), r.stdout));
        outputs.push((format!("{what}: stderr"), r.stderr));
    }

    for (what, text) in &outputs {
        for secret in [
            pg_password.as_str(),
            kafka_password.as_str(),
            "wrong-kafka-pw-Zq9",
            "wrong-pg-pw-Zq9",
        ] {
            assert_absent(what, text, secret);
        }
    }
    // The searches can fail: the role name is in the debug logs.
    assert!(outputs.iter().any(|(_, t)| t.contains(&role)));
    teardown(&slot, &publication).await;
}
