//! TLS to PostgreSQL (libpq `sslmode`) on the replication connection and
//! the SQL sessions, against the real PostgreSQL started by `tests/env/up`
//! with its test CA (`FACTLIB_DATABASE_URL_TLS`, `FACTLIB_PG_CA`,
//! `FACTLIB_PG_OTHER_CA`).
//!
//! Two small in-test proxies stand between a client and the server: one
//! forwards everything and records whether each session asked for TLS and
//! got it (so the commands' own SQL sessions can be seen to be TLS), the
//! other answers `N` to the SSLRequest itself and then forwards, to play a
//! server without TLS.

mod common;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use factlib::source::{
    ConnectionConfig, ReplicationStream, SourceError, SourceSettings, Transport,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// The SSLRequest: length 8, code 80877103.
const SSL_REQUEST: [u8; 8] = [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f];

fn tls_url() -> String {
    env_value("FACTLIB_DATABASE_URL_TLS")
}

fn ca() -> String {
    env_value("FACTLIB_PG_CA")
}

fn other_ca() -> String {
    env_value("FACTLIB_PG_OTHER_CA")
}

/// The real server's address (the plain test URL names it).
fn server_addr() -> SocketAddr {
    let c = ConnectionConfig::from_url(&database_url()).expect("test URL parses");
    format!("{}:{}", c.hosts[0].host, c.hosts[0].port)
        .parse()
        .expect("the test URL names an IP address")
}

/// A key/value connection string for `host` (checked against the
/// certificate) at the real server's address, with `extra` keys.
fn kv_url(host: &str, extra: &str) -> String {
    let a = server_addr();
    format!(
        "host={host} hostaddr={} port={} user=factlib password=factlib dbname=factlib {extra}",
        a.ip(),
        a.port()
    )
}

/// What a proxy saw of one session's start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Seen {
    /// The client's first 8 bytes were an SSLRequest.
    asked_tls: bool,
    /// The answer the client got (`S` / `N`), if it asked.
    answer: Option<u8>,
}

/// A proxy to the real server on a loopback port. With `refuse_tls`, it
/// answers `N` to an SSLRequest itself; otherwise the server answers.
/// Everything after that is forwarded both ways unchanged.
struct Proxy {
    port: u16,
    seen: Arc<Mutex<Vec<Seen>>>,
}

impl Proxy {
    async fn start(refuse_tls: bool) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = Arc::clone(&seen);
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let log = Arc::clone(&log);
                tokio::spawn(async move {
                    if let Some(s) = proxy_session(client, refuse_tls).await {
                        log.lock().unwrap().push(s);
                    }
                });
            }
        });
        Proxy { port, seen }
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }
}

async fn proxy_session(mut client: TcpStream, refuse_tls: bool) -> Option<Seen> {
    let mut first = [0u8; 8];
    client.read_exact(&mut first).await.ok()?;
    let mut server = TcpStream::connect(server_addr()).await.ok()?;
    let asked_tls = first == SSL_REQUEST;
    let mut answer = None;
    if asked_tls && refuse_tls {
        client.write_all(b"N").await.ok()?;
        answer = Some(b'N');
    } else {
        server.write_all(&first).await.ok()?;
        if asked_tls {
            let b = server.read_u8().await.ok()?;
            client.write_u8(b).await.ok()?;
            answer = Some(b);
        }
    }
    let seen = Seen { asked_tls, answer };
    tokio::spawn(async move {
        let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
    });
    Some(seen)
}

fn source_settings(transport: Transport) -> SourceSettings {
    SourceSettings {
        transport,
        read_buffer: 1 << 16,
        read_queue: 8,
        connect_timeout: Duration::from_secs(10),
        ..SourceSettings::default()
    }
}

/// What a replication connection reported.
#[derive(Debug)]
struct Replication {
    transport: Transport,
    tls: bool,
    /// `pg_stat_ssl.ssl` of its walsender, asked over a plain session.
    server_says_tls: bool,
}

/// Connects for replication and runs IDENTIFY_SYSTEM on a runtime suited
/// to the transport (off the test's runtime: the client needs a LocalSet).
async fn replicate(url: String, transport: Transport) -> Result<Replication, SourceError> {
    let (tx, rx) = tokio::sync::oneshot::channel::<i32>();
    let (done_tx, done_rx) = tokio::sync::oneshot::channel::<()>();
    let client = tokio::task::spawn_blocking(move || {
        factlib::source::transport::block_on(transport, async move {
            let conn = ConnectionConfig::from_url(&url).expect("valid URL");
            let mut s = ReplicationStream::connect(&conn, &source_settings(transport)).await?;
            s.identify_system().await?;
            let _ = tx.send(s.backend_pid());
            // Stay connected while the test asks the server about us.
            let _ = done_rx.await;
            Ok::<_, SourceError>((s.transport(), s.tls()))
        })
        .expect("runtime")
    });
    let server_says_tls = match rx.await {
        Ok(pid) => ssl_of(pid).await,
        Err(_) => false,
    };
    let _ = done_tx.send(());
    let (transport, tls) = client.await.unwrap()?;
    Ok(Replication {
        transport,
        tls,
        server_says_tls,
    })
}

/// `pg_stat_ssl.ssl` for a backend, asked over the plain test session.
async fn ssl_of(pid: i32) -> bool {
    sql()
        .await
        .query_one("SELECT ssl FROM pg_stat_ssl WHERE pid = $1", &[&pid])
        .await
        .unwrap()
        .get(0)
}

/// Opens a SQL session the way `setup`, `emit`, `status` and `bench` do
/// and returns whether the server sees it as TLS, or the error text.
async fn sql_session(url: String) -> Result<bool, String> {
    tokio::task::spawn_blocking(move || {
        factlib::source::transport::block_on(Transport::Tokio, async move {
            let c = factlib::cli::connect_sql(&url)
                .await
                .map_err(|e| e.to_string())?;
            let row = c
                .query_one(
                    "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
                    &[],
                )
                .await
                .map_err(|e| e.to_string())?;
            Ok(row.get(0))
        })
        .expect("runtime")
    })
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_full_relays_end_to_end_on_both_transports_and_every_session_is_tls() {
    for transport in ["tokio", "uring"] {
        let (slot, publication) = (unique("tls"), unique("pub"));
        let prefix = format!("p{slot}");
        // setup, emit, status and bench go through a recording proxy, as
        // `localhost` (the name in the certificate) at the proxy's port.
        let proxy = Proxy::start(false).await;
        let via_proxy = format!(
            "postgresql://factlib:factlib@localhost:{}/factlib?sslmode=verify-full&sslrootcert={}",
            proxy.port,
            ca()
        );
        let cmd = |args: &[&str]| {
            let mut c = factlib(&slot, &publication, &prefix);
            c.env("FACTLIB_DATABASE_URL", &via_proxy).args(args);
            c
        };
        let r = run(cmd(&["setup"]), Duration::from_secs(60)).await;
        assert_eq!(r.code, 0, "setup over TLS: {}", r.stderr);
        let mut ids = Vec::new();
        for i in 0..3 {
            let r = run(
                cmd(&[
                    "emit",
                    "--aggregate-type",
                    "order",
                    "--aggregate-id",
                    &format!("a{i}"),
                    "--event-type",
                    "order.placed",
                    "--payload",
                    "{}",
                ]),
                Duration::from_secs(60),
            )
            .await;
            assert_eq!(r.code, 0, "emit over TLS: {}", r.stderr);
            let v: serde_json::Value = serde_json::from_str(r.stdout.trim()).unwrap();
            ids.push(v["id"].as_str().unwrap().to_owned());
        }
        let r = run(
            cmd(&[
                "bench",
                "emit",
                "--rate",
                "100",
                "--duration-secs",
                "1",
                "--txn-size",
                "5",
                "--rollback-every",
                "0",
                "--aggregate-types",
                "invoice",
            ]),
            Duration::from_secs(60),
        )
        .await;
        assert_eq!(r.code, 0, "bench emit over TLS: {}", r.stderr);
        let r = run(cmd(&["status"]), Duration::from_secs(60)).await;
        assert_eq!(r.code, 0, "status over TLS: {}\n{}", r.stdout, r.stderr);
        let seen = proxy.seen();
        assert!(seen.len() >= 6, "setup, 3 emits, bench, status: {seen:?}");
        assert!(
            seen.iter().all(|s| s.asked_tls && s.answer == Some(b'S')),
            "every command's session must ask for TLS and get it: {seen:?}"
        );

        // The relay streams over TLS, straight to the server.
        let mut c = relay(&slot, &publication, &prefix);
        c.env("FACTLIB_DATABASE_URL", tls_url())
            .args(["--transport", transport]);
        let child = spawn(c);
        let got = consume_async(
            &[format!("{prefix}.order")],
            ids.len(),
            Duration::from_millis(500),
            Duration::from_secs(60),
        )
        .await;
        let walsender_ssl: Option<bool> = sql()
            .await
            .query_opt(
                "SELECT s.ssl FROM pg_replication_slots r JOIN pg_stat_ssl s ON s.pid = r.active_pid \
                 WHERE r.slot_name = $1",
                &[&slot],
            )
            .await
            .unwrap()
            .map(|r| r.get(0));
        let out = stop_ok(child).await;
        let stderr = String::from_utf8_lossy(&out.stderr);
        let mut got_ids: Vec<String> = got
            .iter()
            .map(|c| c.header("factlib-id").expect("id header"))
            .collect();
        got_ids.sort();
        let mut want = ids.clone();
        want.sort();
        assert_eq!(got_ids, want, "--transport {transport}:\n{stderr}");
        assert_eq!(
            walsender_ssl,
            Some(true),
            "the relay's walsender must be on TLS (--transport {transport})"
        );
        let fell_back = stderr.contains("io_uring transport does not carry");
        assert_eq!(fell_back, transport == "uring", "{stderr}");
        assert!(
            stderr.contains("transport=\"tokio\"") || stderr.contains("transport=tokio"),
            "the streaming line names the transport in use: {stderr}"
        );
        teardown(&slot, &publication).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_from_another_ca_fails_clearly_and_definitely() {
    let url = tls_url().replace(&ca(), &other_ca());
    assert_ne!(url, tls_url());
    for transport in [Transport::Tokio, Transport::Uring] {
        let err = replicate(url.clone(), transport).await.unwrap_err();
        assert!(!err.is_transient(), "a wrong CA will not fix itself: {err}");
        let text = err.to_string();
        assert!(
            text.contains(&format!(
                "not signed by the CA in sslrootcert={}",
                other_ca()
            )) && text.contains("point sslrootcert at the CA that signed it"),
            "{text}"
        );
    }
    let text = sql_session(url.clone()).await.unwrap_err();
    assert!(
        text.contains("not signed by the CA in sslrootcert="),
        "{text}"
    );

    // The relay stops at once rather than retrying, and says why.
    let (slot, publication) = (unique("tlsca"), unique("pub"));
    let mut c = relay(&slot, &publication, "factlib");
    c.env("FACTLIB_DATABASE_URL", &url);
    let r = run(c, Duration::from_secs(60)).await;
    assert_ne!(r.code, 0);
    assert!(
        r.stderr.contains("not signed by the CA in sslrootcert="),
        "{}",
        r.stderr
    );
    assert!(
        !r.stderr.contains("factlib:factlib"),
        "no password: {}",
        r.stderr
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_not_in_the_certificate_fails_with_verify_full_but_passes_verify_ca() {
    let full = kv_url(
        "wrong.example",
        &format!("sslmode=verify-full sslrootcert={}", ca()),
    );
    for transport in [Transport::Tokio, Transport::Uring] {
        let err = replicate(full.clone(), transport).await.unwrap_err();
        assert!(!err.is_transient(), "{err}");
        let text = err.to_string();
        assert!(
            text.contains("not valid for host \"wrong.example\"")
                && text.contains("localhost")
                && text.contains("sslmode=verify-ca"),
            "{text}"
        );
    }
    let text = sql_session(full).await.unwrap_err();
    assert!(
        text.contains("not valid for host \"wrong.example\""),
        "{text}"
    );

    let ca_only = kv_url(
        "wrong.example",
        &format!("sslmode=verify-ca sslrootcert={}", ca()),
    );
    for transport in [Transport::Tokio, Transport::Uring] {
        let r = replicate(ca_only.clone(), transport)
            .await
            .unwrap_or_else(|e| panic!("verify-ca over {transport:?}: {e}"));
        assert!(r.tls && r.server_says_tls, "{r:?}");
        assert_eq!(r.transport, Transport::Tokio, "TLS runs on tokio: {r:?}");
    }
    assert_eq!(sql_session(ca_only).await, Ok(true));

    // verify-ca still checks the chain.
    let wrong_ca = kv_url(
        "wrong.example",
        &format!("sslmode=verify-ca sslrootcert={}", other_ca()),
    );
    let err = replicate(wrong_ca, Transport::Tokio).await.unwrap_err();
    assert!(err.to_string().contains("not signed by"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn against_a_server_without_tls_require_fails_clearly_and_prefer_goes_plain() {
    let proxy = Proxy::start(true).await;
    let url = |mode: &str| {
        format!(
            "postgresql://factlib:factlib@127.0.0.1:{}/factlib?sslmode={mode}",
            proxy.port
        )
    };
    for transport in [Transport::Tokio, Transport::Uring] {
        let err = replicate(url("require"), transport).await.unwrap_err();
        assert!(!err.is_transient(), "{err}");
        let text = err.to_string();
        assert!(
            text.contains(
                "does not accept TLS (it answered N to the SSLRequest) but sslmode=require"
            ) && text.contains("sslmode=prefer"),
            "{text}"
        );
        // verify-full needs TLS just as much.
        let err = replicate(
            format!("{}&sslrootcert={}", url("verify-full"), ca()),
            transport,
        )
        .await
        .unwrap_err();
        assert!(err.to_string().contains("sslmode=verify-full"), "{err}");

        let r = replicate(url("prefer"), transport)
            .await
            .unwrap_or_else(|e| panic!("prefer over {transport:?}: {e}"));
        assert!(!r.tls && !r.server_says_tls, "{r:?}");
        assert_eq!(
            r.transport, transport,
            "a plain session keeps the transport asked for"
        );
    }
    let text = sql_session(url("require")).await.unwrap_err();
    assert!(text.contains("answered N to the SSLRequest"), "{text}");
    assert_eq!(sql_session(url("prefer")).await, Ok(false));
    // The default is prefer, as with libpq.
    assert_eq!(
        sql_session(format!(
            "postgresql://factlib:factlib@127.0.0.1:{}/factlib",
            proxy.port
        ))
        .await,
        Ok(false)
    );
    let seen = proxy.seen();
    assert!(
        !seen.is_empty() && seen.iter().all(|s| s.asked_tls && s.answer == Some(b'N')),
        "{seen:?}"
    );

    // sslmode=disable sends no SSLRequest at all.
    let before = proxy.seen().len();
    let r = replicate(url("disable"), Transport::Tokio).await.unwrap();
    assert!(!r.tls);
    assert_eq!(sql_session(url("disable")).await, Ok(false));
    let seen = proxy.seen();
    assert!(
        seen[before..].iter().all(|s| !s.asked_tls) && seen.len() == before + 2,
        "{seen:?}"
    );
}
