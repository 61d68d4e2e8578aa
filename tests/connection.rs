//! Connection, authentication and server-error tests of the replication
//! client and the `setup`, `status` and `emit` commands, against the real
//! PostgreSQL started by `tests/env/up`.

mod common;

use std::time::Duration;

use common::*;
use factlib::source::{
    ConnectionConfig, ReplicationStream, SourceError, SourceSettings, Transport,
};
use factlib::Lsn;

fn source_args(transport: Transport) -> SourceSettings {
    SourceSettings {
        transport,
        read_buffer: 1 << 16,
        read_queue: 8,
        ..SourceSettings::default()
    }
}

/// Connects for replication as `user` and runs IDENTIFY_SYSTEM, on a
/// runtime suited to the transport (the client needs a LocalSet).
fn identify(url: String, transport: Transport) -> Result<Lsn, SourceError> {
    factlib::source::transport::block_on(transport, async move {
        let conn = ConnectionConfig::from_url(&url).expect("valid URL");
        let mut s = ReplicationStream::connect(&conn, &source_args(transport)).await?;
        Ok(s.identify_system().await?.xlogpos)
    })
    .expect("runtime")
}

async fn password_kind(role: &str) -> String {
    sql()
        .await
        .query_one(
            "SELECT CASE WHEN rolpassword LIKE 'SCRAM-SHA-256$%' THEN 'scram' \
                         WHEN rolpassword LIKE 'md5%' THEN 'md5' \
                         WHEN rolpassword IS NULL THEN 'none' ELSE 'other' END \
             FROM pg_authid WHERE rolname = $1",
            &[&role],
        )
        .await
        .unwrap()
        .get(0)
}

#[tokio::test(flavor = "current_thread")]
async fn scram_md5_and_trust_roles_connect_on_both_transports() {
    assert_eq!(
        password_kind("factlib").await,
        "scram",
        "the main role must use SCRAM"
    );
    assert_eq!(password_kind("factlib_md5").await, "md5");
    for transport in [Transport::Tokio, Transport::Uring] {
        for url in [
            database_url(),
            url_for("factlib_md5", Some("factlib")),
            url_for("factlib_trust", None),
        ] {
            let r = tokio::task::spawn_blocking({
                let url = url.clone();
                move || identify(url, transport)
            })
            .await
            .unwrap();
            let lsn = r.unwrap_or_else(|e| panic!("{url} over {transport:?}: {e}"));
            assert!(!lsn.is_invalid());
        }
    }
}

#[tokio::test(flavor = "current_thread")]
async fn wrong_or_missing_password_gives_a_clear_error() {
    let err = tokio::task::spawn_blocking(|| {
        identify(url_for("factlib", Some("wrong")), Transport::Tokio)
    })
    .await
    .unwrap()
    .unwrap_err();
    assert_eq!(err.sqlstate(), Some("28P01"), "{err}");
    assert!(!err.is_transient(), "a bad password will not fix itself");
    let msg = err.to_string();
    assert!(msg.contains("password authentication failed"), "{msg}");
    assert!(
        msg.contains("--database-url"),
        "the error says what to do: {msg}"
    );

    let err = tokio::task::spawn_blocking(|| identify(url_for("factlib", None), Transport::Tokio))
        .await
        .unwrap()
        .unwrap_err();
    assert!(err.to_string().contains("PGPASSWORD"), "{err}");

    // The same through the command line.
    let mut c = factlib(&unique("nopw"), "factlib", "factlib");
    c.env("FACTLIB_DATABASE_URL", url_for("factlib", Some("wrong")))
        .args(["tail", "--limit", "1"]);
    let r = run(c, Duration::from_secs(30)).await;
    assert_ne!(r.code, 0);
    assert!(
        r.stderr.contains("password authentication failed") && r.stderr.contains("28P01"),
        "{}",
        r.stderr
    );
}

#[tokio::test(flavor = "current_thread")]
async fn a_slot_in_use_or_missing_gives_a_clear_error() {
    let (slot, publication) = (unique("busy"), unique("pub"));
    setup(&slot, &publication).await;

    let mut c = factlib(&slot, &publication, "factlib");
    c.arg("tail");
    let holder = spawn(c);
    let client = sql().await;
    let mut pid = None;
    for _ in 0..100 {
        pid = client
            .query_one(
                "SELECT active_pid FROM pg_replication_slots WHERE slot_name = $1",
                &[&slot],
            )
            .await
            .unwrap()
            .get::<_, Option<i32>>(0);
        if pid.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let pid = pid.expect("the first tail holds the slot");

    let mut c = factlib(&slot, &publication, "factlib");
    c.args(["tail", "--limit", "1"]);
    let r = run(c, Duration::from_secs(30)).await;
    assert_ne!(r.code, 0, "a second reader of a busy slot must fail");
    assert!(
        r.stderr.contains(&format!("is active for PID {pid}")),
        "{}",
        r.stderr
    );
    assert!(
        r.stderr.contains("55006") && r.stderr.contains("another process"),
        "{}",
        r.stderr
    );

    // Through the library: classified transient (another relay may stop).
    let url = database_url();
    let slot2 = slot.clone();
    let err = tokio::task::spawn_blocking(move || {
        factlib::source::transport::block_on(Transport::Tokio, async move {
            let conn = ConnectionConfig::from_url(&url).unwrap();
            let mut s = ReplicationStream::connect(&conn, &source_args(Transport::Tokio)).await?;
            s.start_logical(
                &slot2,
                Lsn::INVALID,
                &[("proto_version", "1"), ("publication_names", "x")],
            )
            .await
        })
        .unwrap()
    })
    .await
    .unwrap()
    .unwrap_err();
    assert_eq!(err.sqlstate(), Some("55006"));
    assert!(err.is_transient());

    signal(&holder, "TERM").await;
    let out = holder.wait_with_output().await.unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // A slot that does not exist says to run setup.
    let mut c = factlib("t_no_such_slot", &publication, "factlib");
    c.args(["tail", "--limit", "1"]);
    let r = run(c, Duration::from_secs(30)).await;
    assert_ne!(r.code, 0);
    assert!(
        r.stderr.contains("does not exist") && r.stderr.contains("factlib setup"),
        "{}",
        r.stderr
    );
    teardown(&slot, &publication).await;
}

#[tokio::test(flavor = "current_thread")]
async fn setup_is_idempotent_and_status_reports_the_slot() {
    let (slot, publication) = (unique("setup"), unique("pub"));
    let mut c = factlib(&slot, &publication, "factlib");
    c.arg("setup");
    let first = run(c, Duration::from_secs(30)).await;
    assert_eq!(first.code, 0, "{}", first.stderr);
    assert!(
        first.stdout.contains("wal_level: logical"),
        "{}",
        first.stdout
    );
    assert!(
        first
            .stdout
            .contains(&format!("publication \"{publication}\": created")),
        "{}",
        first.stdout
    );
    assert!(
        first.stdout.contains(&format!("slot \"{slot}\": created")),
        "{}",
        first.stdout
    );

    let mut c = factlib(&slot, &publication, "factlib");
    c.arg("setup");
    let second = run(c, Duration::from_secs(30)).await;
    assert_eq!(second.code, 0, "{}", second.stderr);
    assert!(
        second.stdout.contains("exists, unchanged"),
        "{}",
        second.stdout
    );
    assert_eq!(slots_named(&slot).await, 1);

    let mut c = factlib(&slot, &publication, "factlib");
    c.arg("status");
    let st = run(c, Duration::from_secs(30)).await;
    assert_eq!(st.code, 0, "{}", st.stderr);
    for field in [
        "plugin:              pgoutput",
        "active:              no",
        "confirmed_flush_lsn: ",
        "restart_lsn:",
        "lag_bytes:",
        "retained_wal_bytes:",
    ] {
        assert!(
            st.stdout.contains(field),
            "missing {field:?} in\n{}",
            st.stdout
        );
    }

    teardown(&slot, &publication).await;
    let mut c = factlib(&slot, &publication, "factlib");
    c.arg("status");
    let st = run(c, Duration::from_secs(30)).await;
    assert_eq!(st.code, 1, "status exits 1 for a missing slot");
    assert!(st.stderr.contains("factlib setup"), "{}", st.stderr);
}

#[tokio::test(flavor = "current_thread")]
async fn emit_command_writes_a_fact_and_checks_its_fields() {
    let (slot, publication) = (unique("emit"), unique("pub"));
    let prefix = format!("p{slot}");
    setup(&slot, &publication).await;

    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("payload.bin");
    std::fs::write(&file, [0u8, 159, 146, 150, 255]).unwrap();
    let mut c = factlib(&slot, &publication, &prefix);
    c.args([
        "emit",
        "--aggregate-type",
        "invoice",
        "--aggregate-id",
        "i-1",
        "--event-type",
        "issued",
    ])
    .arg("--payload-file")
    .arg(&file)
    .args(["--metadata", "tenant=acme", "--metadata", "region=eu"]);
    let r = run(c, Duration::from_secs(30)).await;
    assert_eq!(r.code, 0, "{}", r.stderr);
    let emitted: serde_json::Value = serde_json::from_str(r.stdout.trim()).unwrap();

    let mut c = factlib(&slot, &publication, &prefix);
    c.args([
        "emit",
        "--aggregate-type",
        "invoice",
        "--aggregate-id",
        "",
        "--event-type",
        "x",
        "--payload",
        "p",
    ]);
    let bad = run(c, Duration::from_secs(30)).await;
    assert_ne!(bad.code, 0);
    assert!(
        bad.stderr.contains("aggregate_id is required"),
        "{}",
        bad.stderr
    );

    let mut c = factlib(&slot, &publication, &prefix);
    c.args(["tail", "--limit", "1"]);
    let r = run(c, Duration::from_secs(60)).await;
    assert_eq!(r.code, 0, "{}", r.stderr);
    let v: serde_json::Value = serde_json::from_str(r.stdout.trim()).unwrap();
    assert_eq!(v["id"], emitted["id"]);
    assert_eq!(v["lsn"], emitted["lsn"], "emit reports the LSN tail sees");
    assert_eq!(
        v["payload_encoding"], "base64",
        "non-UTF-8 payloads are base64"
    );
    assert_eq!(v["payload"], "AJ+Slv8=");
    assert_eq!(v["metadata"]["tenant"], "acme");
    assert_eq!(v["metadata"]["region"], "eu");
    teardown(&slot, &publication).await;
}

/// `factlib setup` does what the README's "PostgreSQL versions" says for
/// the server it runs against (the version matrix, tests/matrix, runs this
/// against 12, 13, 14, 16 and 17, and `make test` against 15): before 13 it
/// refuses and creates nothing; on 13, whose pgoutput streams no logical
/// messages, it refuses a publication without tables and installs no SQL
/// emitter API, and with an outbox table it sets up; from 14 on it sets up
/// a messages-only publication and the SQL API. On 13 `factlib emit`
/// refuses too: its fact could never be relayed.
#[tokio::test(flavor = "current_thread")]
async fn setup_does_what_the_servers_version_allows() {
    let c = sql().await;
    let num: String = c
        .query_one("SHOW server_version_num", &[])
        .await
        .unwrap()
        .get(0);
    let major = num.parse::<u32>().unwrap() / 10_000;
    let (slot, publication) = (unique("setup_v"), unique("pub_v"));
    let mut cmd = factlib(&slot, &publication, "factlib");
    cmd.arg("setup");
    let plain = run(cmd, Duration::from_secs(30)).await;
    match major {
        ..=12 => {
            assert_ne!(plain.code, 0, "{}", plain.stdout);
            assert!(
                plain.stderr.contains("is not supported")
                    && plain.stderr.contains("PostgreSQL 13 or newer"),
                "{}",
                plain.stderr
            );
            assert_eq!(slots_named(&slot).await, 0, "nothing is created");
        }
        13 => {
            assert_ne!(plain.code, 0, "{}", plain.stdout);
            assert!(
                plain
                    .stderr
                    .contains("only outbox-table rows reach the relay")
                    && plain.stderr.contains("--outbox-table"),
                "{}",
                plain.stderr
            );
            assert_eq!(slots_named(&slot).await, 0, "nothing is created");
            let mut cmd = factlib(&slot, &publication, "factlib");
            cmd.args([
                "emit",
                "--aggregate-type",
                "order",
                "--aggregate-id",
                "o-1",
                "--event-type",
                "order.placed",
                "--payload",
                "{}",
            ]);
            let emit = run(cmd, Duration::from_secs(30)).await;
            assert_ne!(emit.code, 0, "{}", emit.stdout);
            assert!(
                emit.stderr.contains("would never reach a relay")
                    && emit.stderr.contains("nothing was emitted"),
                "{}",
                emit.stderr
            );
            let table = format!("public.{}", unique("outbox_v"));
            c.batch_execute(&format!(
                "CREATE TABLE {table} (id uuid PRIMARY KEY, aggregatetype text, aggregateid text, type text, payload jsonb)"
            ))
            .await
            .unwrap();
            let mut cmd = factlib(&slot, &publication, "factlib");
            cmd.args(["setup", "--outbox-table", &table]);
            let with_table = run(cmd, Duration::from_secs(30)).await;
            assert_eq!(with_table.code, 0, "{}", with_table.stderr);
            assert!(
                with_table.stdout.contains("sql api: not installed"),
                "{}",
                with_table.stdout
            );
            assert_eq!(slots_named(&slot).await, 1);
            teardown(&slot, &publication).await;
            c.batch_execute(&format!("DROP TABLE {table}"))
                .await
                .unwrap();
        }
        _ => {
            assert_eq!(plain.code, 0, "{}", plain.stderr);
            assert!(
                plain
                    .stdout
                    .contains(&format!("server: PostgreSQL {major}")),
                "{}",
                plain.stdout
            );
            let api = plain
                .stdout
                .lines()
                .find(|l| l.starts_with("sql api: "))
                .unwrap_or_default();
            assert!(
                api.starts_with("sql api: installed") || api.ends_with("exists, unchanged"),
                "{}",
                plain.stdout
            );
            assert_eq!(slots_named(&slot).await, 1);
            teardown(&slot, &publication).await;
        }
    }
}

/// How many replication slots are named `slot`.
async fn slots_named(slot: &str) -> i64 {
    sql()
        .await
        .query_one(
            "SELECT count(*) FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await
        .unwrap()
        .get(0)
}
