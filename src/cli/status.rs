//! `factlib status`: where the slot is, how much WAL it holds back, the
//! exactly-once checkpoint in Kafka, and whether a promotion of a standby
//! would keep the slot (`cli::failover`). It reports on a primary only.

use std::process::ExitCode;
use std::time::Duration;

use super::failover::{self, Failover};
use super::{connect_sql, pg, server_major, CliError};
use crate::config::{CommonArgs, StatusArgs};
use crate::lsn::Lsn;
use crate::route::checkpoint_topic;
use crate::sink::checkpoint::{self, Source};
use crate::sink::{SinkError, SinkSettings};

/// What `status` reports, printed as aligned text or (`--json`) as one
/// JSON object.
#[derive(Debug, serde::Serialize)]
struct Status {
    slot: String,
    plugin: Option<String>,
    active: bool,
    active_pid: Option<i32>,
    confirmed_flush_lsn: Option<String>,
    restart_lsn: Option<String>,
    current_wal_lsn: String,
    lag_bytes: Option<i64>,
    /// How far behind in time, where it can be known: 0 with nothing to
    /// confirm; the walsender's `flush_lag` while a relay streams.
    lag_seconds: Option<f64>,
    /// Why `lag_seconds` is unknown.
    lag_seconds_unknown: Option<&'static str>,
    retained_wal_bytes: Option<i64>,
    wal_status: Option<String>,
    checkpoint_topic: String,
    checkpoint: Option<String>,
    /// Why the checkpoint could not be read.
    checkpoint_error: Option<String>,
    slot_behind_checkpoint_bytes: Option<u64>,
    /// Whether a promotion of a standby keeps the slot.
    failover: Failover,
}

/// Runs `factlib status`. Exits 1 if the slot is missing.
pub async fn run(common: &CommonArgs, args: &StatusArgs) -> Result<ExitCode, CliError> {
    let kafka = args.kafka.reader()?;
    let client = connect_sql(&common.database_url).await?;
    let (major, _) = server_major(&client).await?;
    let in_recovery: bool = client
        .query_one("SELECT pg_is_in_recovery()", &[])
        .await
        .map_err(pg("asking whether the server is a standby"))?
        .get(0);
    if in_recovery {
        return Err(CliError::Precondition(
            "the server --database-url reached is a standby in recovery; status reports on the primary.\n  \
             fix: point --database-url at the primary, or list every server with target_session_attrs=read-write \
             (e.g. postgresql://user@primary:5432,standby:5432/db?target_session_attrs=read-write)"
                .into(),
        ));
    }
    // The walsender's flush_lag: the time between WAL being flushed here and
    // the relay confirming it, as of its last status update. NULL once it
    // has caught up and nothing new was written.
    let row = client
        .query_opt(
            "SELECT s.plugin, s.active, s.active_pid, s.confirmed_flush_lsn::text, \
                    s.restart_lsn::text, pg_current_wal_lsn()::text, \
                    pg_wal_lsn_diff(pg_current_wal_lsn(), s.confirmed_flush_lsn)::bigint, \
                    pg_wal_lsn_diff(pg_current_wal_lsn(), s.restart_lsn)::bigint, \
                    s.wal_status, \
                    extract(epoch FROM r.flush_lag)::float8 \
             FROM pg_replication_slots s \
             LEFT JOIN pg_stat_replication r ON r.pid = s.active_pid \
             WHERE s.slot_name = $1",
            &[&common.slot],
        )
        .await
        .map_err(|source| CliError::Postgres {
            context: "reading pg_replication_slots".into(),
            source,
        })?;
    let Some(r) = row else {
        if args.json {
            println!(
                "{}",
                serde_json::json!({ "slot": common.slot, "exists": false })
            );
        }
        eprintln!(
            "error: replication slot \"{}\" does not exist; run `factlib setup` to create it",
            common.slot
        );
        return Ok(ExitCode::from(1));
    };
    let active: bool = r.get(1);
    let lag: Option<i64> = r.get(6);
    let flush_lag: Option<f64> = r.get(9);
    let (lag_seconds, lag_seconds_unknown) = match (lag, active, flush_lag) {
        (Some(0), _, _) => (Some(0.0), None),
        (_, true, Some(secs)) => (Some(secs), None),
        (_, true, None) => (
            None,
            Some("the walsender reports none: caught up, or no status update yet"),
        ),
        (_, false, _) => (None, Some("no relay is streaming from the slot")),
    };
    let topic = checkpoint_topic(&common.prefix);
    let confirmed_flush_lsn: Option<String> = r.get(3);
    let failover = failover::inspect(
        &client,
        &common.database_url,
        major,
        &common.slot,
        confirmed_flush_lsn.as_deref(),
    )
    .await?;
    let mut st = Status {
        slot: common.slot.clone(),
        plugin: r.get(0),
        active,
        active_pid: r.get::<_, Option<i32>>(2).filter(|_| active),
        confirmed_flush_lsn,
        restart_lsn: r.get(4),
        current_wal_lsn: r.get(5),
        lag_bytes: lag,
        lag_seconds,
        lag_seconds_unknown,
        retained_wal_bytes: r.get(7),
        wal_status: r.get(8),
        checkpoint_topic: topic.clone(),
        checkpoint: None,
        checkpoint_error: None,
        slot_behind_checkpoint_bytes: None,
        failover,
    };
    match stored_checkpoint(&client, common, kafka, &topic).await {
        Ok(Some(c)) => {
            let slot: Option<Lsn> = st
                .confirmed_flush_lsn
                .as_deref()
                .and_then(|c| c.parse().ok());
            st.slot_behind_checkpoint_bytes = Some(slot.map_or(0, |s| c.0.saturating_sub(s.0)));
            st.checkpoint = Some(c.to_string());
        }
        Ok(None) => {}
        Err(e) => st.checkpoint_error = Some(e),
    }
    if args.json {
        println!(
            "{}",
            serde_json::to_string(&st).map_err(|e| CliError::Precondition(e.to_string()))?
        );
    } else {
        print_text(&st);
    }
    Ok(ExitCode::SUCCESS)
}

fn print_text(st: &Status) {
    let none = || "-".to_owned();
    let text = |v: &Option<String>| v.clone().unwrap_or_else(none);
    println!("slot:                {}", st.slot);
    println!("plugin:              {}", text(&st.plugin));
    match st.active_pid {
        Some(pid) => println!("active:              yes (pid {pid})"),
        None => println!("active:              no"),
    }
    println!("confirmed_flush_lsn: {}", text(&st.confirmed_flush_lsn));
    println!("restart_lsn:         {}", text(&st.restart_lsn));
    println!("current_wal_lsn:     {}", st.current_wal_lsn);
    println!(
        "lag_bytes:           {}",
        st.lag_bytes.map_or_else(none, |v| v.to_string())
    );
    match (st.lag_seconds, st.lag_seconds_unknown) {
        (Some(s), _) => println!("lag_seconds:         {s:.3}"),
        (None, why) => println!("lag_seconds:         unknown ({})", why.unwrap_or("-")),
    }
    println!(
        "retained_wal_bytes:  {}",
        st.retained_wal_bytes.map_or_else(none, |v| v.to_string())
    );
    println!("wal_status:          {}", text(&st.wal_status));
    let topic = &st.checkpoint_topic;
    match (&st.checkpoint, &st.checkpoint_error) {
        (Some(c), _) => {
            println!("checkpoint:          {c} (in {topic})");
            let behind = st.slot_behind_checkpoint_bytes.unwrap_or(0);
            println!("slot_behind_checkpoint_bytes: {behind}");
            if behind > 0 {
                println!(
                    "  the slot is behind what Kafka holds (a crash after a commit, before its \
                     confirm): an exactly-once relay drops those units on start"
                );
            }
        }
        (None, Some(e)) => println!("checkpoint:          unknown ({e})"),
        (None, None) => println!("checkpoint:          none (no exactly-once commit in {topic})"),
    }
    print_failover(&st.failover);
}

fn print_failover(f: &Failover) {
    match f.slot_failover {
        Some(true) => println!("failover:            yes (a failover slot)"),
        Some(false) => println!("failover:            no (not a failover slot)"),
        None => println!("failover:            no (failover slots need PostgreSQL 17)"),
    }
    if let Some(s) = &f.synchronized_standby_slots {
        let s = if s.is_empty() { "(empty)" } else { s };
        println!("synchronized_standby_slots: {s}");
    }
    println!("physical_standbys:   {}", f.physical_standbys);
    for v in &f.servers {
        let what = match (&v.error, &v.slot) {
            (Some(e), _) => format!("unreachable: {e}"),
            (None, None) => format!("{}, no copy of the slot", v.role),
            (None, Some(c)) if v.role == "standby" => format!(
                "standby, slot synced: {}, temporary: {}, confirmed_flush_lsn {}{}, ready for failover: {}",
                c.synced.map_or("-", |s| if s { "yes" } else { "no" }),
                if c.temporary { "yes" } else { "no" },
                c.confirmed_flush_lsn.as_deref().unwrap_or("-"),
                c.behind_bytes.map_or(String::new(), |b| format!(" ({b} bytes behind)")),
                if c.ready_for_failover { "yes" } else { "no" },
            ),
            (None, Some(_)) => format!("{}, has the slot", v.role),
        };
        println!("server {}: {what}", v.server);
    }
    for w in &f.warnings {
        println!("warning: {w}");
    }
}

/// The checkpoint of this source in `topic`; `None` if there is none (or no
/// such topic).
async fn stored_checkpoint(
    client: &tokio_postgres::Client,
    common: &CommonArgs,
    sink: SinkSettings,
    topic: &str,
) -> Result<Option<Lsn>, String> {
    let row = client
        .query_one(
            "SELECT system_identifier::text, current_database() FROM pg_control_system()",
            &[],
        )
        .await
        .map_err(|e| format!("cannot read the system identifier: {e}"))?;
    let key = Source {
        system_id: row.get(0),
        database: row.get(1),
        slot: common.slot.clone(),
    }
    .key();
    let topic = topic.to_owned();
    let read = tokio::task::spawn_blocking(move || {
        checkpoint::read(&sink, &topic, &key, Duration::from_secs(10))
    })
    .await
    .map_err(|e| e.to_string())?;
    match read {
        Ok(c) => Ok(c),
        Err(SinkError::CheckpointTopicMissing(_)) => Ok(None),
        Err(e) => Err(e.to_string()),
    }
}
