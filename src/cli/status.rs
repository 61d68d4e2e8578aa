//! `factlib status`: where the slot is, and how much WAL it holds back.

use std::process::ExitCode;

use super::{connect_sql, CliError};
use crate::config::CommonArgs;

/// Runs `factlib status`. Exits 1 if the slot is missing.
pub async fn run(common: &CommonArgs) -> Result<ExitCode, CliError> {
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
    println!("confirmed_flush_lsn: {}", confirmed.unwrap_or_else(none));
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
    Ok(ExitCode::SUCCESS)
}
