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

pub fn env_value(key: &str) -> String {
    env_lookup(key).unwrap_or_else(|| {
        panic!(
            "{key} is not set and {} does not define it: start the test environment with tests/env/up (or run `make test`)",
            env_sh().display()
        )
    })
}

fn env_sh() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/env/env.sh")
}

fn env_lookup(key: &str) -> Option<String> {
    if let Ok(v) = std::env::var(key) {
        return Some(v);
    }
    let text = std::fs::read_to_string(env_sh()).unwrap_or_default();
    text.lines().find_map(|line| {
        let line = line.trim_start_matches("export ").trim();
        let v = line.strip_prefix(&format!("{key}="))?;
        Some(v.trim_matches(|c| c == '"' || c == '\'').to_owned())
    })
}

/// The state directory of the running test environment
/// (`FACTLIB_ENV_ROOT` from its env.sh): `target/env` of the checkout whose
/// `tests/env/up` started it, which may not be this one (a worktree).
pub fn env_root() -> PathBuf {
    env_lookup("FACTLIB_ENV_ROOT")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/env"))
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
    // env.sh exports the SASL listener's credentials for the tests that use
    // them; elsewhere they would only draw a warning under plaintext.
    for unused in [
        "FACTLIB_KAFKA_SASL_USERNAME",
        "FACTLIB_KAFKA_SASL_PASSWORD",
        "FACTLIB_KAFKA_CA",
    ] {
        c.env_remove(unused);
    }
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

/// One record read back from Kafka.
#[derive(Debug, Clone)]
pub struct Consumed {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub key: Option<Vec<u8>>,
    pub value: Vec<u8>,
    pub headers: Vec<(String, Vec<u8>)>,
}

impl Consumed {
    /// The value of header `name`, as text.
    pub fn header(&self, name: &str) -> Option<String> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
    }
}

/// Reads `topics` from the beginning until `want` records arrived (then
/// `settle` more, to catch duplicates) or `limit` passed. Topics that do
/// not exist yet are retried.
pub fn consume(topics: &[String], want: usize, settle: Duration, limit: Duration) -> Vec<Consumed> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::message::{Headers, Message};
    use rdkafka::{ClientConfig, Offset, TopicPartitionList};

    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .set("group.id", unique("reader"))
        .set("enable.auto.commit", "false")
        .set("isolation.level", "read_committed")
        .create()
        .expect("consumer");
    let start = std::time::Instant::now();
    let mut assigned: Vec<String> = Vec::new();
    let mut out = Vec::new();
    let mut reached: Option<std::time::Instant> = None;
    loop {
        if assigned.len() < topics.len() {
            for t in topics {
                if assigned.contains(t) {
                    continue;
                }
                if let Ok(md) = consumer.fetch_metadata(Some(t), Duration::from_secs(2)) {
                    if let Some(mt) = md.topics().iter().find(|m| {
                        m.name() == t && m.error().is_none() && !m.partitions().is_empty()
                    }) {
                        // Add only the new topic's partitions: re-assigning the
                        // others would rewind them.
                        let mut tpl = TopicPartitionList::new();
                        for p in mt.partitions() {
                            tpl.add_partition_offset(t, p.id(), Offset::Beginning)
                                .unwrap();
                        }
                        consumer.incremental_assign(&tpl).expect("assign");
                        assigned.push(t.clone());
                    }
                }
            }
        }
        if let Some(r) = consumer.poll(Duration::from_millis(200)) {
            let m = r.expect("consume");
            out.push(Consumed {
                topic: m.topic().to_owned(),
                partition: m.partition(),
                offset: m.offset(),
                key: m.key().map(<[u8]>::to_vec),
                value: m.payload().unwrap_or_default().to_vec(),
                headers: m
                    .headers()
                    .map(|h| {
                        h.iter()
                            .map(|h| (h.key.to_owned(), h.value.unwrap_or_default().to_vec()))
                            .collect()
                    })
                    .unwrap_or_default(),
            });
        }
        if out.len() >= want && reached.is_none() {
            reached = Some(std::time::Instant::now());
        }
        if reached.is_some_and(|r| r.elapsed() >= settle) || start.elapsed() >= limit {
            return out;
        }
    }
}

/// Fact `i` of the fault and exactly-once tests: an order, one of 11 keys.
pub fn order_fact(i: usize) -> factlib::emit::NewFact {
    factlib::emit::NewFact {
        aggregate_type: "order".into(),
        aggregate_id: format!("a{}", i % 11),
        event_type: "order.changed".into(),
        payload: bytes::Bytes::from(format!("{{\"i\":{i}}}")),
        ..Default::default()
    }
}

/// Emits `txns` transactions of `per` facts ([`order_fact`] from `offset`
/// on); returns the ids in commit order.
pub async fn emit_ids(prefix: &str, txns: usize, per: usize, offset: usize) -> Vec<String> {
    let mut c = sql().await;
    let mut ids = Vec::new();
    for t in 0..txns {
        let tx = c.transaction().await.unwrap();
        for i in 0..per {
            let f = factlib::emit::emit(&tx, prefix, order_fact(offset + t * per + i)).await;
            ids.push(f.unwrap().0.id);
        }
        tx.commit().await.unwrap();
    }
    ids
}

/// [`consume`] on a blocking thread, from async tests.
pub async fn consume_async(
    topics: &[String],
    want: usize,
    settle: Duration,
    limit: Duration,
) -> Vec<Consumed> {
    let topics = topics.to_vec();
    tokio::task::spawn_blocking(move || consume(&topics, want, settle, limit))
        .await
        .expect("the consumer thread")
}

/// `factlib relay` with test-friendly settings: topics created, 3
/// partitions, fast confirms and progress lines, reconnect waits capped at
/// 1 s.
pub fn relay(slot: &str, publication: &str, prefix: &str) -> Command {
    let mut c = relay_defaults(slot, publication, prefix);
    c.args(["--max-backoff-ms", "1000"]);
    c
}

/// [`relay`] with the default reconnect cap (`--max-backoff-ms`).
pub fn relay_defaults(slot: &str, publication: &str, prefix: &str) -> Command {
    let mut c = factlib(slot, publication, prefix);
    c.env("FACTLIB_BROKERS", brokers())
        .args([
            "relay",
            "--create-topics",
            "--partitions",
            "3",
            "--confirm-interval-ms",
            "100",
        ])
        .args([
            "--progress-interval-secs",
            "1",
            "--status-interval-ms",
            "1000",
        ]);
    c
}

/// Stops a relay (or tail) with SIGTERM and requires a clean exit 0 within
/// a minute; returns its output.
pub async fn stop_ok(child: Child) -> std::process::Output {
    signal(&child, "TERM").await;
    let out = tokio::time::timeout(Duration::from_secs(60), child.wait_with_output())
        .await
        .expect("exits within 60 s of SIGTERM")
        .expect("wait for the child");
    assert!(
        out.status.success(),
        "exit {} after SIGTERM:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// A relay serving `/metrics`, `/healthz` and `/readyz` on a free port
/// (`--metrics-addr 127.0.0.1:0`); its stderr is read in the background
/// and kept for failure messages.
pub struct MetricsRelay {
    pub child: Child,
    /// `http://127.0.0.1:PORT`, from the URL it logs at start-up.
    pub base: String,
    log: std::sync::Arc<std::sync::Mutex<String>>,
}

impl MetricsRelay {
    /// Starts `cmd` (a `factlib relay` command) with metrics on a free
    /// port; waits (up to 60 s) for the URL it logs.
    pub async fn spawn(mut cmd: Command) -> Self {
        use tokio::io::{AsyncBufReadExt, BufReader};
        cmd.args(["--metrics-addr", "127.0.0.1:0"]);
        let mut child = spawn(cmd);
        let stderr = child.stderr.take().expect("piped stderr");
        let log = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        let (url_tx, url_rx) = tokio::sync::oneshot::channel();
        let kept = std::sync::Arc::clone(&log);
        tokio::spawn(async move {
            let mut url_tx = Some(url_tx);
            let mut lines = BufReader::new(stderr).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                // `url=http://…` in text logs, `"url":"http://…"` in JSON.
                if let Some(at) = line.find("http://127.0.0.1:") {
                    let url = line[at..]
                        .split(|c: char| c.is_whitespace() || c == '"')
                        .next()
                        .unwrap_or("");
                    if let (Some(tx), Some(base)) = (url_tx.take(), url.strip_suffix("/metrics")) {
                        let _ = tx.send(base.to_owned());
                    }
                }
                let mut log = kept.lock().unwrap();
                log.push_str(&line);
                log.push('\n');
            }
        });
        let base = match tokio::time::timeout(Duration::from_secs(60), url_rx).await {
            Ok(Ok(base)) => base,
            _ => panic!(
                "the relay logged no metrics URL within 60 s:\n{}",
                log.lock().unwrap()
            ),
        };
        MetricsRelay { child, base, log }
    }

    /// What the relay logged so far.
    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// `GET path`, answered within `limit`.
    pub async fn get(&self, path: &str, limit: Duration) -> Result<(u16, String), String> {
        http_get(&self.base, path, limit).await
    }

    /// The value of the sample `series` (no labels) in a `/metrics` scrape
    /// answered within 10 s.
    pub async fn metric(&self, series: &str) -> Option<f64> {
        match self.get("/metrics", Duration::from_secs(10)).await {
            Ok((200, text)) => sample(&text, series),
            other => panic!("/metrics failed: {other:?}\n{}", self.log()),
        }
    }

    /// Polls `series` every 200 ms until `want` holds, for at most `limit`;
    /// returns the last value.
    pub async fn wait_metric(
        &self,
        series: &str,
        limit: Duration,
        want: impl Fn(f64) -> bool,
    ) -> f64 {
        let start = std::time::Instant::now();
        loop {
            let v = self.metric(series).await;
            if v.is_some_and(&want) {
                return v.unwrap_or_default();
            }
            assert!(
                start.elapsed() < limit,
                "{series} is {v:?} after {limit:?}\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Polls `path` every 200 ms until it answers `status`, for at most
    /// `limit`; returns the body.
    pub async fn wait_status(&self, path: &str, status: u16, limit: Duration) -> String {
        let start = std::time::Instant::now();
        loop {
            let got = self.get(path, Duration::from_secs(10)).await;
            if let Ok((s, body)) = &got {
                if *s == status {
                    return body.clone();
                }
            }
            assert!(
                start.elapsed() < limit,
                "{path} answered {got:?}, not {status}, for {limit:?}\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// SIGTERM; requires a clean exit 0 within a minute. Returns all it
    /// logged.
    pub async fn stop(self) -> String {
        signal(&self.child, "TERM").await;
        let status = tokio::time::timeout(Duration::from_secs(60), self.child.wait_with_output())
            .await
            .expect("exits within 60 s of SIGTERM")
            .expect("wait for the relay")
            .status;
        // The reader sees the end of stderr once the relay has exited.
        tokio::time::sleep(Duration::from_millis(100)).await;
        let log = self.log.lock().unwrap().clone();
        assert!(status.success(), "exit {status} after SIGTERM:\n{log}");
        log
    }
}

/// A plain HTTP/1.1 `GET base+path`, answered within `limit`: (status, body).
pub async fn http_get(base: &str, path: &str, limit: Duration) -> Result<(u16, String), String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let addr = base
        .strip_prefix("http://")
        .ok_or("not an http URL")?
        .to_owned();
    let exchange = async move {
        let mut s = tokio::net::TcpStream::connect(&addr).await?;
        s.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await?;
        let mut out = Vec::new();
        s.read_to_end(&mut out).await?;
        Ok::<_, std::io::Error>(String::from_utf8_lossy(&out).into_owned())
    };
    let text = tokio::time::timeout(limit, exchange)
        .await
        .map_err(|_| format!("GET {path}: no answer within {limit:?}"))?
        .map_err(|e| format!("GET {path}: {e}"))?;
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or("no blank line after the head")?;
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("bad status line: {head}"))?;
    Ok((status, body.to_owned()))
}

/// The value of the label-less sample `series` in a Prometheus text scrape.
pub fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
}

/// Waits (at most 10 s) until the WAL written so far is flushed. Logical
/// decoding reads only flushed WAL, and the test cluster commits with
/// `synchronous_commit = off`, so a slot read through SQL right after a
/// commit may otherwise miss it.
pub async fn wait_wal_flushed(c: &tokio_postgres::Client) {
    let written: String = c
        .query_one("SELECT pg_current_wal_insert_lsn()::text", &[])
        .await
        .unwrap()
        .get(0);
    for _ in 0..1000 {
        let flushed: bool = c
            .query_one(
                "SELECT pg_current_wal_flush_lsn() >= $1::text::pg_lsn",
                &[&written],
            )
            .await
            .unwrap()
            .get(0);
        if flushed {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("the WAL up to {written} was not flushed within 10 s");
}

/// The ids (`factlib-id`) of the records read from `topic`: [`consume_async`]
/// until `want` arrived (then 2 s more, to catch duplicates) or `limit`.
pub async fn read_ids(topic: String, want: usize, limit: Duration) -> Vec<String> {
    ids_of(&consume_async(&[topic], want, Duration::from_secs(2), limit).await)
}

/// The `factlib-id` of each record.
pub fn ids_of(records: &[Consumed]) -> Vec<String> {
    records
        .iter()
        .map(|c| c.header("factlib-id").expect("factlib-id"))
        .collect()
}

/// Checks every id arrived; returns how many arrived more than once.
pub fn check_all(ids: &[String], got: &[String]) -> usize {
    let set: std::collections::HashSet<_> = got.iter().collect();
    let missing = ids.iter().filter(|i| !set.contains(i)).count();
    assert_eq!(missing, 0, "{missing} of {} facts lost", ids.len());
    got.len() - set.len()
}

/// Asserts every id arrived exactly once.
pub fn check_exactly_once(ids: &[String], got: &[String]) {
    let dups = check_all(ids, got);
    assert_eq!(dups, 0, "{dups} duplicates among {} facts", ids.len());
    assert_eq!(got.len(), ids.len(), "nothing unexpected arrived");
}

/// Runs `pg_ctl <args> -w -D <data> -l <log>` on the test PostgreSQL, as
/// the cluster owner.
pub async fn pg_ctl(args: &[&str]) {
    let data = env_root().join("pg/data");
    let pg_bin =
        std::env::var("FACTLIB_ENV_PG_BIN").unwrap_or_else(|_| "/usr/lib/postgresql/15/bin".into());
    let as_root = std::process::Command::new("id")
        .arg("-u")
        .output()
        .unwrap()
        .stdout
        .starts_with(b"0\n");
    let mut cmd = if as_root {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"])
            .arg(format!("{pg_bin}/pg_ctl"));
        c
    } else {
        Command::new(format!("{pg_bin}/pg_ctl"))
    };
    cmd.args(args)
        .args(["-w", "-D"])
        .arg(&data)
        .arg("-l")
        .arg(env_root().join("pg/log"));
    let st = cmd.output().await.unwrap();
    assert!(
        st.status.success(),
        "pg_ctl {args:?}: {}",
        String::from_utf8_lossy(&st.stderr)
    );
}

/// Restarts the test PostgreSQL with `pg_ctl restart -m mode`.
pub async fn pg_ctl_restart(mode: &str) {
    pg_ctl(&["restart", "-m", mode]).await;
}

/// The test cluster's URL with database `dbname` instead.
pub fn url_for_db(dbname: &str) -> String {
    let base = database_url();
    let (head, query) = base
        .split_once('?')
        .map_or((base.as_str(), None), |(h, q)| (h, Some(q)));
    let (server, _) = head.rsplit_once('/').expect("URL with /dbname");
    match query {
        Some(q) => format!("{server}/{dbname}?{q}"),
        None => format!("{server}/{dbname}"),
    }
}

/// A SQL session on the database at `url`.
pub async fn sql_at(url: &str) -> tokio_postgres::Client {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .unwrap_or_else(|e| panic!("connect to {url}: {e}"));
    tokio::spawn(async move {
        let _ = conn.await;
    });
    client
}

/// A new database on the test cluster for one test's inbox, with the
/// inbox schema installed by `factlib inbox setup`. Returns its URL.
pub async fn inbox_db(tag: &str) -> String {
    let name = unique(tag);
    sql()
        .await
        .batch_execute(&format!("CREATE DATABASE {name}"))
        .await
        .unwrap();
    let url = url_for_db(&name);
    let mut c = factlib("factlib", "factlib", "factlib");
    c.args(["inbox", "setup", "--inbox-database-url", &url]);
    let r = run(c, Duration::from_secs(60)).await;
    assert_eq!(r.code, 0, "inbox setup: {}\n{}", r.stdout, r.stderr);
    url
}

/// `factlib inbox` into `url` from `topics` in group `group`, with
/// test-friendly settings (progress lines every second, reconnect waits
/// capped at 1 s).
pub fn inbox(url: &str, topics: &str, group: &str) -> Command {
    let mut c = factlib("factlib", "factlib", "factlib");
    c.env("FACTLIB_BROKERS", brokers()).args([
        "inbox",
        "--inbox-database-url",
        url,
        "--topics",
        topics,
        "--group",
        group,
        "--progress-interval-secs",
        "1",
        "--max-backoff-ms",
        "1000",
    ]);
    c
}

/// The resident memory of process `pid`, in KiB (0 once it is gone).
pub fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

/// Stops the test broker (SIGTERM) and waits until its process is gone.
pub async fn stop_kafka() {
    let pid_file = env_root().join("kafka/kafka.pid");
    let pid = std::fs::read_to_string(&pid_file)
        .expect("kafka.pid")
        .trim()
        .to_owned();
    let st = tokio::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .await
        .unwrap();
    assert!(st.success());
    for _ in 0..300 {
        if !PathBuf::from(format!("/proc/{pid}")).exists()
            || std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .is_ok_and(|s| s.contains(") Z "))
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("kafka did not stop");
}

/// Starts what is stopped, with the `tests/env/up` of the checkout that
/// owns the running environment.
pub async fn start_env() {
    let up = env_root().join("../../tests/env/up");
    let out = tokio::process::Command::new(up).output().await.unwrap();
    assert!(
        out.status.success(),
        "tests/env/up: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// [`relay`] with `--delivery exactly-once` and fast commits
/// (`--txn-max-ms 50`).
pub fn relay_exactly_once(slot: &str, publication: &str, prefix: &str) -> Command {
    let mut c = relay(slot, publication, prefix);
    c.args(["--delivery", "exactly-once", "--txn-max-ms", "50"]);
    c
}

/// `factlib bench emit` into `prefix` for `secs` seconds at `rate` facts/s
/// on `connections` sessions: transactions of 1–20 facts (every 7th rolled
/// back) over `aggregates` keys, the committed ones recorded in `manifest`
/// for an exactly-once relay.
pub fn bench_load(
    (slot, publication, prefix): (&str, &str, &str),
    secs: u64,
    rate: u64,
    (connections, aggregates): (u32, u32),
    manifest: &std::path::Path,
) -> Command {
    let mut c = factlib(slot, publication, prefix);
    c.args(["bench", "emit", "--rate", &rate.to_string()])
        .args(["--duration-secs", &secs.to_string()])
        .args([
            "--txn-size",
            "1",
            "--txn-size-max",
            "20",
            "--rollback-every",
            "7",
        ])
        .args(["--connections", &connections.to_string()])
        .args(["--aggregates", &aggregates.to_string()])
        .args(["--delivery", "exactly-once", "--manifest"])
        .arg(manifest);
    c
}

/// `factlib bench verify --inbox-database-url url --manifest manifest`,
/// allowed `limit`.
pub async fn verify_inbox_run(url: &str, manifest: &std::path::Path, limit: Duration) -> Run {
    let mut v = factlib("factlib", "factlib", "factlib");
    v.args(["bench", "verify", "--inbox-database-url", url])
        .args(["--timeout-secs", &(limit.as_secs() * 4 / 5).to_string()])
        .arg("--manifest")
        .arg(manifest);
    run(v, limit).await
}
