//! `factlib status`: where the slot is, how much WAL it holds back, and the
//! exactly-once checkpoint in Kafka.

use std::process::ExitCode;
use std::time::Duration;

use super::{connect_sql, CliError};
use crate::config::{CommonArgs, StatusArgs};
use crate::lsn::Lsn;
use crate::route::checkpoint_topic;
use crate::sink::checkpoint::{self, Source};
use crate::sink::{SinkError, SinkSettings};

/// Runs `factlib status`. Exits 1 if the slot is missing.
pub async fn run(common: &CommonArgs, args: &StatusArgs) -> Result<ExitCode, CliError> {
    let client = connect_sql(&common.database_url).await?;
    let row = client
        .query_opt(
            "SELECT plugin, active, active_pid, confirmed_flush_lsn::text, restart_lsn::text, \
                    pg_current_wal_lsn()::text, \
                    pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn)::bigint, \
                    pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn)::bigint, \
                    wal_status \
             FROM pg_replication_slots WHERE slot_name = $1",
            &[&common.slot],
        )
        .await
        .map_err(|source| CliError::Postgres {
            context: "reading pg_replication_slots".into(),
            source,
        })?;
    let Some(r) = row else {
        eprintln!(
            "error: replication slot \"{}\" does not exist; run `factlib setup` to create it",
            common.slot
        );
        return Ok(ExitCode::from(1));
    };
    let plugin: Option<String> = r.get(0);
    let active: bool = r.get(1);
    let pid: Option<i32> = r.get(2);
    let confirmed: Option<String> = r.get(3);
    let restart: Option<String> = r.get(4);
    let current: String = r.get(5);
    let lag: Option<i64> = r.get(6);
    let retained: Option<i64> = r.get(7);
    let wal_status: Option<String> = r.get(8);
    let none = || "-".to_owned();
    println!("slot:                {}", common.slot);
    println!("plugin:              {}", plugin.unwrap_or_else(none));
    match pid {
        Some(pid) if active => println!("active:              yes (pid {pid})"),
        _ => println!("active:              no"),
    }
    println!(
        "confirmed_flush_lsn: {}",
        confirmed.clone().unwrap_or_else(none)
    );
    println!("restart_lsn:         {}", restart.unwrap_or_else(none));
    println!("current_wal_lsn:     {current}");
    println!(
        "lag_bytes:           {}",
        lag.map_or_else(none, |v| v.to_string())
    );
    println!(
        "retained_wal_bytes:  {}",
        retained.map_or_else(none, |v| v.to_string())
    );
    println!("wal_status:          {}", wal_status.unwrap_or_else(none));
    let topic = checkpoint_topic(&common.prefix);
    match stored_checkpoint(&client, common, args, &topic).await {
        Ok(Some(c)) => {
            println!("checkpoint:          {c} (in {topic})");
            let slot: Option<Lsn> = confirmed.and_then(|c| c.parse().ok());
            let behind = slot.map_or(0, |s| c.0.saturating_sub(s.0));
            println!("slot_behind_checkpoint_bytes: {behind}");
            if behind > 0 {
                println!(
                    "  the slot is behind what Kafka holds (a crash after a commit, before its \
                     confirm): an exactly-once relay drops those units on start"
                );
            }
        }
        Ok(None) => println!("checkpoint:          none (no exactly-once commit in {topic})"),
        Err(e) => println!("checkpoint:          unknown ({e})"),
    }
    Ok(ExitCode::SUCCESS)
}

/// The checkpoint of this source in `topic`; `None` if there is none (or no
/// such topic).
async fn stored_checkpoint(
    client: &tokio_postgres::Client,
    common: &CommonArgs,
    args: &StatusArgs,
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
    let sink = SinkSettings {
        brokers: args.brokers.clone(),
        ..SinkSettings::default()
    };
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
