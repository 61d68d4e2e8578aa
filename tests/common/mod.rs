//! Shared helpers for the integration tests. They run against the real
//! PostgreSQL (and Kafka) started by `tests/env/up`, found through
//! `FACTLIB_DATABASE_URL` / `FACTLIB_BROKERS` or `target/env/env.sh`.
#![allow(dead_code)]

use std::path::PathBuf;
use std::process::Stdio;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use tokio::process::{Child, Command};

/// The database URL of the test cluster. Panics (fails the test, never
/// skips it) when the environment is not running.
pub fn database_url() -> String {
    env_value("FACTLIB_DATABASE_URL")
}

/// The Kafka bootstrap servers of the test broker.
pub fn brokers() -> String {
    env_value("FACTLIB_BROKERS")
}

fn env_value(key: &str) -> String {
    if let Ok(v) = std::env::var(key) {
        return v;
    }
    let env_sh = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/env/env.sh");
    let text = std::fs::read_to_string(&env_sh).unwrap_or_default();
    for line in text.lines() {
        let line = line.trim_start_matches("export ").trim();
        if let Some(v) = line.strip_prefix(&format!("{key}=")) {
            return v.trim_matches(|c| c == '"' || c == '\'').to_owned();
        }
    }
    panic!(
        "{key} is not set and {} does not define it: start the test environment with tests/env/up (or run `make test`)",
        env_sh.display()
    );
}

/// A URL for the same cluster with another user and password.
pub fn url_for(user: &str, password: Option<&str>) -> String {
    let base = database_url();
    let rest = base
        .split_once('@')
        .map(|(_, r)| r)
        .expect("URL with user@host");
    match password {
        Some(p) => format!("postgresql://{user}:{p}@{rest}"),
        None => format!("postgresql://{user}@{rest}"),
    }
}

/// A name unique to this test process and call, usable as slot/publication.
pub fn unique(tag: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    let n = N.fetch_add(1, Ordering::Relaxed);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    format!("t_{tag}_{}_{n}_{nanos:x}", std::process::id())
}

/// A SQL session on the test database.
pub async fn sql() -> tokio_postgres::Client {
    let (client, conn) = tokio_postgres::connect(&database_url(), tokio_postgres::NoTls)
        .await
        .expect("connect to the test PostgreSQL (is tests/env/up running?)");
    tokio::spawn(async move {
        let _ = conn.await;
    });
    client
}

/// The `factlib` binary with the test database and the given slot,
/// publication and prefix.
pub fn factlib(slot: &str, publication: &str, prefix: &str) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_factlib"));
    c.env("FACTLIB_DATABASE_URL", database_url())
        .env("FACTLIB_SLOT", slot)
        .env("FACTLIB_PUBLICATION", publication)
        .env("FACTLIB_PREFIX", prefix)
        .env("FACTLIB_LOG", "info")
        .stdin(Stdio::null())
        .kill_on_drop(true);
    c
}

/// Output of a finished command.
pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

/// Runs a command to completion, failing the test after `limit`.
pub async fn run(mut cmd: Command, limit: Duration) -> Run {
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    let child = cmd.spawn().expect("spawn factlib");
    let out = tokio::time::timeout(limit, child.wait_with_output())
        .await
        .expect("command did not finish in time")
        .expect("wait for command");
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// Spawns a command with piped output.
pub fn spawn(mut cmd: Command) -> Child {
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    cmd.spawn().expect("spawn factlib")
}

/// Sends a signal to a child by pid with the `kill` command.
pub async fn signal(child: &Child, sig: &str) {
    let pid = child.id().expect("child still running");
    let st = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status()
        .await
        .expect("run kill");
    assert!(st.success(), "kill -{sig} {pid} failed");
}

/// Creates a messages-only publication and a pgoutput slot via `factlib setup`.
pub async fn setup(slot: &str, publication: &str) {
    let mut c = factlib(slot, publication, "factlib");
    c.arg("setup");
    let r = run(c, Duration::from_secs(60)).await;
    assert_eq!(r.code, 0, "setup failed: {}\n{}", r.stdout, r.stderr);
}

/// Drops the slot (waiting until it is inactive) and the publication.
pub async fn teardown(slot: &str, publication: &str) {
    let c = sql().await;
    for _ in 0..50 {
        let active: Option<bool> = c
            .query_opt(
                "SELECT active FROM pg_replication_slots WHERE slot_name = $1",
                &[&slot],
            )
            .await
            .unwrap()
            .map(|r| r.get(0));
        match active {
            Some(true) => tokio::time::sleep(Duration::from_millis(100)).await,
            Some(false) => {
                c.execute("SELECT pg_drop_replication_slot($1)", &[&slot])
                    .await
                    .unwrap();
                break;
            }
            None => break,
        }
    }
    c.batch_execute(&format!("DROP PUBLICATION IF EXISTS \"{publication}\""))
        .await
        .unwrap();
}

/// The slot's `confirmed_flush_lsn` as text.
pub async fn confirmed_flush(slot: &str) -> String {
    sql()
        .await
        .query_one(
            "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await
        .unwrap()
        .get(0)
}
