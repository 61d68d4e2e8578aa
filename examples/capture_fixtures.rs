//! Captures the golden replication-stream fixtures in `tests/fixtures/pg15/`
//! from a real PostgreSQL server.
//!
//! ```text
//!  tokio-postgres (SQL side) ──emit facts, DML──► WAL ──► walsender (pgoutput)
//!      │ records what it emitted                              │ raw CopyData bytes
//!      ▼                                                      ▼
//!  <name>.expected.json                         TcpStream ──► <name>.stream
//!                                               (driven by factlib::pgwire sans-io pieces)
//! ```
//!
//! Usage (with FACTLIB_DATABASE_URL naming a superuser with REPLICATION):
//!
//! ```text
//! cargo run --example capture_fixtures -- --out tests/fixtures/pg15
//! ```
//!
//! Every run works in a throw-away database (`factlib_fixtures_<pid>`), so
//! other sessions on the cluster cannot add messages to the captured stream
//! (logical decoding only decodes the slot's own database). Each scenario gets
//! a fresh publication and slot, emits through SQL, then opens a plain TCP
//! replication connection, runs `START_REPLICATION`, and records every byte
//! received after CopyBothResponse, cut at the end of the frame that completes
//! the scenario. The database, slots and publications are dropped at the end.
//!
//! **Invariants**
//! - `<name>.expected.json` is written from what the SQL side did (the facts
//!   it built, the LSNs `pg_logical_emit_message` returned, the rows
//!   `RETURNING` gave back, and WAL record positions from `pg_walinspect`);
//!   nothing in it is read back from the captured stream. The stream is only
//!   decoded to know when to stop reading.
//! - `<name>.stream` holds whole backend frames, byte for byte as received.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, ensure, Context as _};
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use bytes::{Bytes, BytesMut};
use factlib::emit::{build, emit, NewFact};
use factlib::fact::{self, Fact, TraceInfo};
use factlib::pgwire::backend::{self, Backend, DEFAULT_MAX_FRAME};
use factlib::pgwire::pgoutput::PgOutput;
use factlib::pgwire::replication::ReplicationMessage;
use factlib::pgwire::startup::{QueryStatus, SimpleQuery, Startup, StartupParams};
use factlib::source::ConnectionConfig;
use factlib::Lsn;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_postgres::types::PgLsn;
use tokio_postgres::{Client, GenericClient, NoTls, SimpleQueryMessage};

/// How long to wait for the walsender to send the next bytes.
const READ_TIMEOUT: Duration = Duration::from_secs(30);
/// The prefix facts are emitted under.
const PREFIX: &str = "factlib";
/// The prefix of the messages that are not facts.
const OTHER: &str = "other";
/// The size of the `large` scenario's payload.
const LARGE_PAYLOAD: usize = 200 * 1024;

fn main() -> anyhow::Result<()> {
    let out = parse_args()?;
    let url = std::env::var("FACTLIB_DATABASE_URL")
        .context("FACTLIB_DATABASE_URL is not set; source target/env/env.sh (tests/env/up)")?;
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(run(&url, &out))
}

fn parse_args() -> anyhow::Result<PathBuf> {
    let mut args = std::env::args().skip(1);
    let mut out = None;
    while let Some(a) = args.next() {
        match a.as_str() {
            "--out" => {
                out = Some(PathBuf::from(
                    args.next().context("--out needs a directory")?,
                ))
            }
            other => bail!("unknown argument {other:?}; usage: capture_fixtures --out DIR"),
        }
    }
    out.context("usage: capture_fixtures --out DIR")
}

async fn connect(cfg: &tokio_postgres::Config) -> anyhow::Result<Client> {
    let (client, conn) = cfg.connect(NoTls).await.context("connect to PostgreSQL")?;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            eprintln!("sql connection error: {e}");
        }
    });
    Ok(client)
}

async fn run(url: &str, out: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(out).with_context(|| format!("create {}", out.display()))?;
    let admin_cfg: tokio_postgres::Config = url.parse().context("parse FACTLIB_DATABASE_URL")?;
    let admin = connect(&admin_cfg).await?;
    let db = format!("factlib_fixtures_{}", std::process::id());
    admin
        .batch_execute(&format!("CREATE DATABASE {db}"))
        .await?;

    let result = async {
        let mut sql_cfg = admin_cfg.clone();
        sql_cfg.dbname(&db);
        let mut repl_cfg = ConnectionConfig::from_url(url)?;
        repl_cfg.dbname.clone_from(&db);
        let mut client = connect(&sql_cfg).await?;
        let walinspect = client
            .batch_execute("CREATE EXTENSION IF NOT EXISTS pg_walinspect")
            .await
            .map_err(|e| {
                eprintln!("pg_walinspect unavailable ({e}); WAL record positions are not recorded")
            })
            .is_ok();
        let env = Env {
            repl: repl_cfg,
            db: db.clone(),
            walinspect,
            server_version: client.query_one("SHOW server_version", &[]).await?.get(0),
            server_version_num: client
                .query_one("SHOW server_version_num", &[])
                .await?
                .get(0),
            captured_at: client
                .query_one(
                    "SELECT to_char(now() AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"')",
                    &[],
                )
                .await?
                .get(0),
        };
        for name in ["single_fact", "mixed", "large", "tables"] {
            let (stream, expected) = scenario(&env, &mut client, name).await?;
            write(out, name, &stream, &expected)?;
        }
        anyhow::Ok(())
    }
    .await;

    // Cleanup runs whatever happened: slots pin the database (and WAL).
    let cleanup = async {
        admin
            .execute(
                "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE database = $1",
                &[&db],
            )
            .await?;
        admin.batch_execute(&format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)")).await?;
        anyhow::Ok(())
    }
    .await;
    result?;
    cleanup.context("cleanup")
}

fn write(out: &Path, name: &str, stream: &[u8], expected: &Value) -> anyhow::Result<()> {
    let s = out.join(format!("{name}.stream"));
    std::fs::write(&s, stream).with_context(|| format!("write {}", s.display()))?;
    let j = out.join(format!("{name}.expected.json"));
    let mut text = serde_json::to_string_pretty(expected)?;
    text.push('\n');
    std::fs::write(&j, text).with_context(|| format!("write {}", j.display()))?;
    println!("{name}: {} stream bytes -> {}", stream.len(), s.display());
    Ok(())
}

struct Env {
    repl: ConnectionConfig,
    db: String,
    walinspect: bool,
    server_version: String,
    server_version_num: String,
    captured_at: String,
}

/// What the SQL side did, in the order the stream must show it.
///
/// The rule (logical decoding's, applied at emit time): a transaction's
/// messages and changes are sent together when it commits, and not at all if
/// it rolls back; a non-transactional message is sent where its WAL record
/// is, even from inside an open (or later rolled-back) transaction.
#[derive(Default)]
struct Recorder {
    sql: Vec<String>,
    stream: Vec<Value>,
    rolled_back: Vec<Value>,
    open: Option<(u64, Vec<Value>)>,
    relations: BTreeMap<String, Value>,
    heap_records: Vec<Value>,
}

impl Recorder {
    fn sql(&mut self, s: impl Into<String>) {
        self.sql.push(s.into());
    }

    fn begin(&mut self, xid: u64) {
        assert!(self.open.is_none(), "nested transaction");
        self.sql("BEGIN");
        self.open = Some((xid, Vec::new()));
    }

    fn item(&mut self, transactional: bool, v: Value) {
        match (&mut self.open, transactional) {
            (Some((_, items)), true) => items.push(v),
            (None, true) => panic!("transactional item outside a transaction"),
            (_, false) => self.stream.push(v),
        }
    }

    fn end(&mut self, committed: bool) {
        let (xid, items) = self.open.take().expect("open transaction");
        let tx = json!({ "kind": "transaction", "xid": xid, "items": items });
        if committed {
            self.sql("COMMIT");
            self.stream.push(tx);
        } else {
            self.sql("ROLLBACK");
            self.rolled_back.push(tx);
        }
    }

    /// Commits and standalone messages the stream must show: the capture
    /// stops after them. PostgreSQL 15's pgoutput skips transactions that
    /// send nothing (no Begin/Commit at all).
    fn want(&self) -> (usize, usize) {
        let commits = self
            .stream
            .iter()
            .filter(|v| {
                v["kind"] == "transaction" && v["items"].as_array().is_some_and(|i| !i.is_empty())
            })
            .count();
        let standalone = self
            .stream
            .iter()
            .filter(|v| v["kind"] == "message")
            .count();
        (commits, standalone)
    }
}

fn lsn_str(l: Lsn) -> String {
    l.to_string()
}

fn fact_json(f: &Fact) -> Value {
    json!({
        "id": f.id,
        "aggregate_type": f.aggregate_type,
        "aggregate_id": f.aggregate_id,
        "event_type": f.event_type,
        "payload_b64": B64.encode(&f.payload),
        "created_at": f.created_at,
        "metadata": f.metadata,
        "trace_info": f.trace_info.as_ref().map(|t| json!({
            "trace_id": t.trace_id,
            "span_id": t.span_id,
            "metadata": t.metadata,
        })),
    })
}

async fn xid<C: GenericClient + Sync>(c: &C, rec: &mut Recorder) -> anyhow::Result<u64> {
    let text: String = c
        .query_one("SELECT pg_current_xact_id()::text", &[])
        .await?
        .get(0);
    let xid = text.parse()?;
    rec.begin(xid);
    rec.sql("SELECT pg_current_xact_id()");
    Ok(xid)
}

/// A fact through the library's emitter (transactional).
async fn emit_fact<C: GenericClient + Sync>(
    c: &C,
    rec: &mut Recorder,
    new: NewFact,
) -> anyhow::Result<()> {
    let (fact, lsn) = emit(c, PREFIX, new).await?;
    rec.sql(format!(
        "SELECT pg_logical_emit_message(true, 'factlib', $envelope::bytea) -- factlib::emit::emit, fact {}",
        fact.id
    ));
    rec.item(
        true,
        json!({
            "kind": "message", "prefix": PREFIX, "transactional": true,
            "lsn": lsn_str(lsn), "fact": fact_json(&fact),
        }),
    );
    Ok(())
}

async fn emit_message<C: GenericClient + Sync>(
    c: &C,
    transactional: bool,
    prefix: &str,
    content: &[u8],
) -> anyhow::Result<Lsn> {
    let row = c
        .query_one(
            "SELECT pg_logical_emit_message($1, $2::text, $3::bytea)",
            &[&transactional, &prefix, &content],
        )
        .await?;
    let lsn: PgLsn = row.get(0);
    Ok(Lsn(u64::from(lsn)))
}

/// A fact envelope emitted non-transactionally (not what `emit` does, but
/// what a relay must still handle).
async fn emit_nontx_fact<C: GenericClient + Sync>(
    c: &C,
    rec: &mut Recorder,
    new: NewFact,
) -> anyhow::Result<()> {
    let fact = build(new)?;
    let lsn = emit_message(c, false, PREFIX, &fact::encode(&fact)).await?;
    rec.sql(format!(
        "SELECT pg_logical_emit_message(false, 'factlib', $envelope::bytea) -- fact {}",
        fact.id
    ));
    rec.item(
        false,
        json!({
            "kind": "message", "prefix": PREFIX, "transactional": false,
            "lsn": lsn_str(lsn), "fact": fact_json(&fact),
        }),
    );
    Ok(())
}

async fn emit_other<C: GenericClient + Sync>(
    c: &C,
    rec: &mut Recorder,
    transactional: bool,
    content: &[u8],
) -> anyhow::Result<()> {
    let lsn = emit_message(c, transactional, OTHER, content).await?;
    rec.sql(format!(
        "SELECT pg_logical_emit_message({transactional}, 'other', '{}'::bytea)",
        String::from_utf8_lossy(content).replace('\'', "''")
    ));
    rec.item(
        transactional,
        json!({
            "kind": "message", "prefix": OTHER, "transactional": transactional,
            "lsn": lsn_str(lsn), "content_b64": B64.encode(content),
        }),
    );
    Ok(())
}

async fn exec<C: GenericClient + Sync>(c: &C, rec: &mut Recorder, sql: &str) -> anyhow::Result<()> {
    c.batch_execute(sql).await.with_context(|| sql.to_owned())?;
    rec.sql(sql);
    Ok(())
}

/// Rows as text, exactly as the server's output functions print them (the
/// same text pgoutput sends for a column in text format).
async fn rows<C: GenericClient + Sync>(
    c: &C,
    rec: &mut Recorder,
    sql: &str,
) -> anyhow::Result<Vec<Value>> {
    let msgs = c.simple_query(sql).await.with_context(|| sql.to_owned())?;
    rec.sql(sql);
    Ok(msgs
        .iter()
        .filter_map(|m| match m {
            SimpleQueryMessage::Row(r) => Some(Value::from(
                (0..r.len())
                    .map(|i| r.get(i).map(str::to_owned))
                    .collect::<Vec<_>>(),
            )),
            _ => None,
        })
        .collect())
}

/// A relation as the catalog describes it (for checking Relation messages).
async fn relation(c: &Client, table: &str) -> anyhow::Result<Value> {
    let row = c
        .query_one(
            "SELECT c.oid::int8, n.nspname::text, c.relreplident::text
               FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
              WHERE c.oid = $1::text::regclass",
            &[&table],
        )
        .await?;
    let cols = c
        .query(
            "SELECT a.attname::text, a.atttypid::int8, a.atttypmod,
                    EXISTS (SELECT 1 FROM pg_index i
                             WHERE i.indrelid = a.attrelid AND i.indisprimary AND a.attnum = ANY (i.indkey))
               FROM pg_attribute a
              WHERE a.attrelid = $1::text::regclass AND a.attnum > 0 AND NOT a.attisdropped
              ORDER BY a.attnum",
            &[&table],
        )
        .await?;
    Ok(json!({
        "oid": row.get::<_, i64>(0),
        "namespace": row.get::<_, String>(1),
        "name": table,
        "relreplident": row.get::<_, String>(2),
        "columns": cols.iter().map(|r| json!({
            "name": r.get::<_, String>(0),
            "type_oid": r.get::<_, i64>(1),
            "type_modifier": r.get::<_, i32>(2),
            "primary_key": r.get::<_, bool>(3),
        })).collect::<Vec<_>>(),
    }))
}

fn new_fact(agg: &str, id: &str, event: &str, payload: &[u8]) -> NewFact {
    NewFact {
        aggregate_type: agg.into(),
        aggregate_id: id.into(),
        event_type: event.into(),
        payload: Bytes::copy_from_slice(payload),
        ..Default::default()
    }
}

/// Deterministic, incompressible-looking bytes (xorshift64).
fn noise(len: usize, mut seed: u64) -> Vec<u8> {
    let mut v = Vec::with_capacity(len);
    while v.len() < len {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        v.extend_from_slice(&seed.to_le_bytes());
    }
    v.truncate(len);
    v
}

async fn scenario(env: &Env, client: &mut Client, name: &str) -> anyhow::Result<(Vec<u8>, Value)> {
    let slot = format!("fx_{name}_{}", std::process::id());
    let publication = format!("fx_{name}");
    let mut rec = Recorder::default();

    // Setup: tables, publication, slot. Nothing before the slot is streamed.
    match name {
        "mixed" => {
            exec(
                client,
                &mut rec,
                "CREATE TABLE fixture_unpublished (id serial PRIMARY KEY, note text)",
            )
            .await?;
            exec(
                client,
                &mut rec,
                &format!("CREATE PUBLICATION {publication}"),
            )
            .await?;
        }
        "tables" => {
            for sql in [
                "CREATE TABLE fixture_t (id int PRIMARY KEY, v text, b bytea)",
                "ALTER TABLE fixture_t REPLICA IDENTITY DEFAULT",
                "CREATE TABLE fixture_full (id int PRIMARY KEY, v text)",
                "ALTER TABLE fixture_full REPLICA IDENTITY FULL",
                "INSERT INTO fixture_full VALUES (1, 'before')",
            ] {
                exec(client, &mut rec, sql).await?;
            }
            exec(
                client,
                &mut rec,
                &format!("CREATE PUBLICATION {publication} FOR TABLE fixture_t, fixture_full"),
            )
            .await?;
            for t in ["fixture_t", "fixture_full"] {
                let r = relation(client, t).await?;
                rec.relations.insert(t.to_owned(), r);
            }
        }
        _ => {
            exec(
                client,
                &mut rec,
                &format!("CREATE PUBLICATION {publication}"),
            )
            .await?
        }
    }
    let consistent: PgLsn = client
        .query_one(
            "SELECT lsn FROM pg_create_logical_replication_slot($1, 'pgoutput')",
            &[&slot],
        )
        .await?
        .get(0);
    rec.sql(format!(
        "SELECT lsn FROM pg_create_logical_replication_slot('{slot}', 'pgoutput')"
    ));
    let consistent = Lsn(u64::from(consistent));

    match name {
        "single_fact" => {
            let tx = client.transaction().await?;
            xid(&tx, &mut rec).await?;
            emit_fact(
                &tx,
                &mut rec,
                new_fact("order", "o-1", "order.placed", br#"{"total":42}"#),
            )
            .await?;
            tx.commit().await?;
            rec.end(true);
        }
        "mixed" => mixed(client, &mut rec).await?,
        "large" => {
            let tx = client.transaction().await?;
            xid(&tx, &mut rec).await?;
            let payload = noise(LARGE_PAYLOAD, 0x5eed_f00d_cafe_d00d);
            emit_fact(
                &tx,
                &mut rec,
                new_fact("blob", "b-1", "blob.stored", &payload),
            )
            .await?;
            tx.commit().await?;
            rec.end(true);
        }
        "tables" => tables(client, &mut rec).await?,
        _ => bail!("unknown scenario {name}"),
    }

    let (want_commits, want_standalone) = rec.want();
    let start = format!(
        "START_REPLICATION SLOT {slot} LOGICAL 0/0 (\"proto_version\" '1', \"publication_names\" '\"{publication}\"', \"messages\" 'true')"
    );
    let stream = capture(&env.repl, &start, want_commits, want_standalone)
        .await
        .with_context(|| format!("capture {name}"))?;

    if env.walinspect {
        annotate_wal_records(client, consistent, &mut rec).await?;
    }

    drop_slot(client, &slot).await?;
    client
        .batch_execute(&format!("DROP PUBLICATION {publication}"))
        .await?;
    for t in ["fixture_unpublished", "fixture_t", "fixture_full"] {
        client
            .batch_execute(&format!("DROP TABLE IF EXISTS {t}"))
            .await?;
    }

    let expected = json!({
        "scenario": name,
        "server_version": env.server_version,
        "server_version_num": env.server_version_num,
        "captured_at": env.captured_at,
        "database": env.db,
        "publication": publication,
        "slot": slot,
        "slot_consistent_point": lsn_str(consistent),
        "start_replication": start,
        "wal_records_from": if env.walinspect { Value::from("pg_walinspect") } else { Value::Null },
        "sql": rec.sql,
        "relations": rec.relations,
        "heap_records": rec.heap_records,
        "stream": rec.stream,
        "rolled_back": rec.rolled_back,
    });
    Ok((stream, expected))
}

async fn mixed(client: &mut Client, rec: &mut Recorder) -> anyhow::Result<()> {
    // A: three facts and a transactional message under another prefix.
    let tx = client.transaction().await?;
    xid(&tx, rec).await?;
    emit_fact(
        &tx,
        rec,
        new_fact("order", "o-1", "order.placed", br#"{"total":42}"#),
    )
    .await?;
    emit_other(&tx, rec, true, b"other, transactional").await?;
    emit_fact(
        &tx,
        rec,
        new_fact("order", "o-1", "order.paid", br#"{"amount":42}"#),
    )
    .await?;
    emit_fact(
        &tx,
        rec,
        new_fact("order", "o-2", "order.placed", br#"{"total":7}"#),
    )
    .await?;
    tx.commit().await?;
    rec.end(true);

    // A non-transactional fact on its own.
    emit_nontx_fact(
        client,
        rec,
        new_fact("clock", "c-1", "clock.ticked", b"tick"),
    )
    .await?;

    // R: rolled back. Its facts must not appear; the non-transactional
    // message written inside it survives the rollback.
    let tx = client.transaction().await?;
    xid(&tx, rec).await?;
    emit_fact(
        &tx,
        rec,
        new_fact("order", "o-3", "order.placed", br#"{"rolled":"back"}"#),
    )
    .await?;
    emit_other(
        &tx,
        rec,
        false,
        b"other, non-transactional, inside a rolled-back transaction",
    )
    .await?;
    emit_fact(&tx, rec, new_fact("order", "o-3", "order.cancelled", b"{}")).await?;
    tx.rollback().await?;
    rec.end(false);

    // B: a non-transactional fact emitted in the middle of it (it is sent
    // before B's Begin), and a fact with a binary payload and metadata.
    let tx = client.transaction().await?;
    xid(&tx, rec).await?;
    emit_fact(
        &tx,
        rec,
        new_fact("order", "o-4", "order.placed", br#"{"total":1}"#),
    )
    .await?;
    emit_nontx_fact(&tx, rec, new_fact("clock", "c-2", "clock.ticked", b"tock")).await?;
    let mut binary = new_fact(
        "file",
        "f-1",
        "file.uploaded",
        b"\x00\xff\xfe\x80binary\x00\xc3\x28\xa0\xa1",
    );
    binary.metadata = BTreeMap::from([
        (
            "content-type".to_owned(),
            "application/octet-stream".to_owned(),
        ),
        ("tenant".to_owned(), "acme".to_owned()),
    ]);
    binary.trace_info = Some(TraceInfo {
        trace_id: "4bf92f3577b34da6a3ce929d0e0e4736".into(),
        span_id: "00f067aa0ba902b7".into(),
        metadata: BTreeMap::from([("tracestate".to_owned(), "congo=t61rcWkgMzE".to_owned())]),
    });
    emit_fact(&tx, rec, binary).await?;
    emit_fact(
        &tx,
        rec,
        new_fact("order", "o-4", "order.paid", br#"{"amount":1}"#),
    )
    .await?;
    tx.commit().await?;
    rec.end(true);

    // E: only a row in a table outside the publication: nothing is sent.
    let tx = client.transaction().await?;
    xid(&tx, rec).await?;
    exec(
        &tx,
        rec,
        "INSERT INTO fixture_unpublished (note) VALUES ('alone')",
    )
    .await?;
    tx.commit().await?;
    rec.end(true);

    // C: facts alongside rows in a table outside the publication.
    let tx = client.transaction().await?;
    xid(&tx, rec).await?;
    exec(
        &tx,
        rec,
        "INSERT INTO fixture_unpublished (note) VALUES ('first')",
    )
    .await?;
    emit_fact(
        &tx,
        rec,
        new_fact("user", "u-1", "user.created", br#"{"name":"ada"}"#),
    )
    .await?;
    emit_fact(
        &tx,
        rec,
        new_fact("user", "u-1", "user.renamed", br#"{"name":"ada l."}"#),
    )
    .await?;
    exec(
        &tx,
        rec,
        "INSERT INTO fixture_unpublished (note) VALUES ('second')",
    )
    .await?;
    emit_fact(
        &tx,
        rec,
        new_fact("user", "u-2", "user.created", br#"{"name":"bob"}"#),
    )
    .await?;
    tx.commit().await?;
    rec.end(true);

    // A non-transactional message under another prefix, last.
    emit_other(client, rec, false, b"other, non-transactional, standalone").await?;
    Ok(())
}

async fn tables(client: &mut Client, rec: &mut Recorder) -> anyhow::Result<()> {
    let tx = client.transaction().await?;
    xid(&tx, rec).await?;
    let change = |op: &str, rel: &str, old: Option<&Value>, new: Option<&Value>| json!({ "kind": "change", "op": op, "relation": rel, "old": old, "new": new });
    for r in rows(
        &tx,
        rec,
        r"INSERT INTO fixture_t VALUES (1, 'one', '\x00ff'), (2, 'two', NULL) RETURNING *",
    )
    .await?
    {
        rec.item(true, change("insert", "fixture_t", None, Some(&r)));
    }
    // 4 KiB of incompressible bytes: stored out of line (TOAST).
    for r in rows(
        &tx,
        rec,
        "INSERT INTO fixture_t SELECT 4, 'big', decode(string_agg(md5(i::text), '' ORDER BY i), 'hex') \
         FROM generate_series(1, 256) i RETURNING *",
    )
    .await?
    {
        rec.item(true, change("insert", "fixture_t", None, Some(&r)));
    }
    // Key change: the old key is sent.
    let old = rows(&tx, rec, "SELECT * FROM fixture_t WHERE id = 1").await?;
    let new = rows(
        &tx,
        rec,
        "UPDATE fixture_t SET id = 3, v = 'three' WHERE id = 1 RETURNING *",
    )
    .await?;
    rec.item(
        true,
        change("update", "fixture_t", Some(&old[0]), Some(&new[0])),
    );
    // No key change, TOASTed column untouched: `b` was stored out of line
    // (its chunks are in the TOAST table) and this UPDATE does not write it.
    let toast: String = tx
        .query_one(
            "SELECT reltoastrelid::regclass::text FROM pg_class WHERE oid = 'fixture_t'::regclass",
            &[],
        )
        .await?
        .get(0);
    let chunks: i64 = tx
        .query_one(&format!("SELECT count(*) FROM {toast}"), &[])
        .await?
        .get(0);
    ensure!(chunks > 0, "the 4 KiB value was not stored out of line");
    let old = rows(&tx, rec, "SELECT * FROM fixture_t WHERE id = 4").await?;
    let new = rows(
        &tx,
        rec,
        "UPDATE fixture_t SET v = 'big2' WHERE id = 4 RETURNING *",
    )
    .await?;
    let mut update = change("update", "fixture_t", Some(&old[0]), Some(&new[0]));
    update["unchanged_toast_columns"] = json!(["b"]);
    update["toast_chunks"] = json!(chunks);
    rec.item(true, update);
    let old = rows(&tx, rec, "DELETE FROM fixture_t WHERE id = 2 RETURNING *").await?;
    rec.item(true, change("delete", "fixture_t", Some(&old[0]), None));
    // REPLICA IDENTITY FULL: the whole old row is sent.
    let old = rows(&tx, rec, "SELECT * FROM fixture_full WHERE id = 1").await?;
    let new = rows(
        &tx,
        rec,
        "UPDATE fixture_full SET v = 'after' WHERE id = 1 RETURNING *",
    )
    .await?;
    rec.item(
        true,
        change("update", "fixture_full", Some(&old[0]), Some(&new[0])),
    );
    emit_fact(
        &tx,
        rec,
        new_fact("table", "fixture_t", "table.changed", b"rows changed"),
    )
    .await?;
    exec(&tx, rec, "TRUNCATE fixture_t").await?;
    rec.item(
        true,
        json!({ "kind": "change", "op": "truncate", "relations": ["fixture_t"], "cascade": false, "restart_identity": false }),
    );
    tx.commit().await?;
    rec.end(true);
    Ok(())
}

/// Adds, from `pg_walinspect`, where each message's WAL record starts and
/// ends, where each transaction's commit (or abort) record is, and the Heap
/// records (row changes) our transactions wrote.
async fn annotate_wal_records(
    client: &Client,
    from: Lsn,
    rec: &mut Recorder,
) -> anyhow::Result<()> {
    let recs = client
        .query(
            "SELECT start_lsn, end_lsn, xid::text, resource_manager, record_type
               FROM pg_get_wal_records_info($1, pg_current_wal_flush_lsn())
              WHERE resource_manager IN ('LogicalMessage', 'Transaction', 'Heap')",
            &[&PgLsn::from(from.0)],
        )
        .await?;
    let mut message_by_end = HashMap::new();
    let mut tx_end = HashMap::new();
    let mut heap = Vec::new();
    for r in &recs {
        let start = Lsn(u64::from(r.get::<_, PgLsn>(0)));
        let end = Lsn(u64::from(r.get::<_, PgLsn>(1)));
        let xid: u64 = r.get::<_, String>(2).parse()?;
        match (r.get::<_, &str>(3), r.get::<_, &str>(4)) {
            ("Heap", t) => heap.push((xid, start, end, t.to_owned())),
            (_, "MESSAGE") => {
                message_by_end.insert(end, start);
            }
            (_, t @ ("COMMIT" | "ABORT")) => {
                tx_end.insert(xid, (t.to_owned(), start, end));
            }
            _ => {}
        }
    }
    let annotate_msg = |m: &mut Value| -> anyhow::Result<()> {
        let lsn: Lsn = m["lsn"].as_str().context("lsn")?.parse()?;
        // pg_logical_emit_message returned `lsn`; find the record ending there.
        let start = message_by_end
            .get(&lsn)
            .with_context(|| format!("no LogicalMessage WAL record ends at {lsn}"))?;
        m["wal_record"] = json!({ "start": lsn_str(*start), "end": lsn_str(lsn) });
        Ok(())
    };
    for v in rec.stream.iter_mut().chain(rec.rolled_back.iter_mut()) {
        if v["kind"] == "message" {
            annotate_msg(v)?;
            continue;
        }
        let xid = v["xid"].as_u64().context("xid")?;
        // The xid in WAL is the 32-bit xid; epoch 0 on a fresh cluster.
        let (t, start, end) = tx_end
            .get(&(xid & 0xFFFF_FFFF))
            .with_context(|| format!("no commit/abort WAL record for xid {xid}"))?;
        v["end_record"] = json!({ "type": t, "start": lsn_str(*start), "end": lsn_str(*end) });
        for m in v["items"].as_array_mut().context("items")? {
            if m["kind"] == "message" {
                annotate_msg(m)?;
            }
        }
    }
    // The WAL is the cluster's: keep only the records of our transactions.
    let ours: Vec<u64> = rec
        .stream
        .iter()
        .chain(&rec.rolled_back)
        .filter_map(|v| v["xid"].as_u64())
        .map(|x| x & 0xFFFF_FFFF)
        .collect();
    rec.heap_records = heap
        .into_iter()
        .filter(|(xid, ..)| ours.contains(xid))
        .map(|(xid, start, end, t)| {
            json!({ "xid": xid, "start": lsn_str(start), "end": lsn_str(end), "type": t })
        })
        .collect();
    Ok(())
}

async fn drop_slot(client: &Client, slot: &str) -> anyhow::Result<()> {
    // The walsender may take a moment to exit after we hang up.
    for _ in 0..100 {
        match client
            .execute("SELECT pg_drop_replication_slot($1)", &[&slot])
            .await
        {
            Ok(_) => return Ok(()),
            Err(e) if e.code().is_some_and(|c| c.code() == "55006") => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => return Err(e.into()),
        }
    }
    bail!("replication slot {slot} stayed active")
}

async fn read_some(sock: &mut TcpStream, buf: &mut BytesMut) -> anyhow::Result<()> {
    let n = tokio::time::timeout(READ_TIMEOUT, sock.read_buf(buf))
        .await
        .context("timed out waiting for the server")??;
    ensure!(n > 0, "the server closed the connection");
    Ok(())
}

/// Runs `start` on a fresh replication connection and returns every byte
/// received after CopyBothResponse, up to the end of the frame that brings
/// the stream to `want_commits` commits and `want_standalone` messages
/// outside transactions.
async fn capture(
    cfg: &ConnectionConfig,
    start: &str,
    want_commits: usize,
    want_standalone: usize,
) -> anyhow::Result<Vec<u8>> {
    let mut sock = TcpStream::connect((cfg.hosts[0].host.as_str(), cfg.hosts[0].port)).await?;
    let mut out = BytesMut::new();
    let mut buf = BytesMut::with_capacity(1 << 16);
    let mut startup = Startup::new(
        StartupParams {
            user: cfg.user.clone(),
            password: cfg.password.clone(),
            database: cfg.dbname.clone(),
            application_name: "factlib-capture-fixtures".into(),
            replication: true,
        },
        &mut out,
    );
    sock.write_all(&out).await?;
    out.clear();
    'startup: loop {
        while let Some(msg) = backend::parse(&mut buf, DEFAULT_MAX_FRAME)? {
            let ready = startup.handle(msg, &mut out)?;
            if !out.is_empty() {
                sock.write_all(&out).await?;
                out.clear();
            }
            if ready.is_some() {
                break 'startup;
            }
        }
        read_some(&mut sock, &mut buf).await?;
    }

    let mut query = SimpleQuery::new(start, &mut out);
    sock.write_all(&out).await?;
    out.clear();
    'start: loop {
        while let Some(msg) = backend::parse(&mut buf, DEFAULT_MAX_FRAME)? {
            match query.handle(msg) {
                QueryStatus::Pending => {}
                QueryStatus::CopyBoth => break 'start,
                QueryStatus::Failed(e) => bail!("{start} failed: {e}"),
                QueryStatus::Done(_) => bail!("{start} finished without entering CopyBoth"),
            }
        }
        read_some(&mut sock, &mut buf).await?;
    }

    // From here every received byte is recorded; `buf` is the unparsed tail.
    let mut raw = buf.to_vec();
    let (mut commits, mut standalone, mut in_tx) = (0, 0, false);
    let mut chunk = vec![0u8; 1 << 16];
    loop {
        while let Some(msg) = backend::parse(&mut buf, DEFAULT_MAX_FRAME)? {
            let consumed = raw.len() - buf.len();
            let Backend::CopyData(body) = msg else {
                bail!("unexpected {msg:?} during CopyBoth");
            };
            if let ReplicationMessage::XLogData(x) = ReplicationMessage::parse(body)? {
                match PgOutput::decode(x.data)? {
                    PgOutput::Begin(_) => in_tx = true,
                    PgOutput::Commit(_) => {
                        in_tx = false;
                        commits += 1;
                    }
                    PgOutput::Message(m) if !m.transactional => standalone += 1,
                    _ => {}
                }
            }
            ensure!(
                commits <= want_commits && standalone <= want_standalone,
                "more in the stream than was emitted: {commits} commits, {standalone} standalone messages"
            );
            if !in_tx && commits == want_commits && standalone == want_standalone {
                raw.truncate(consumed);
                // CopyDone, then Terminate; the walsender exits.
                sock.write_all(b"c\0\0\0\x04X\0\0\0\x04").await?;
                return Ok(raw);
            }
        }
        let n = tokio::time::timeout(READ_TIMEOUT, sock.read(&mut chunk))
            .await
            .with_context(|| {
                format!("timed out: have {commits}/{want_commits} commits, {standalone}/{want_standalone} standalone messages")
            })??;
        ensure!(n > 0, "the server closed the replication connection");
        raw.extend_from_slice(&chunk[..n]);
        buf.extend_from_slice(&chunk[..n]);
    }
}
