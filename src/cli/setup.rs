//! `factlib setup`: check the server's version and `wal_level`, create the
//! publication and the slot, install the SQL emitter API (`emit::sql_api`).
//!
//! Idempotent: a second run changes nothing and says so.
//!
//! **Invariants**
//! - Nothing is created on a server older than
//!   [`MIN_SERVER_MAJOR`](crate::source::MIN_SERVER_MAJOR) ([`server_major`]).
//! - `--failover` on a server older than
//!   `FAILOVER_SINCE` (17) creates nothing; on a newer one the slot ends up a
//!   failover slot, whether setup created it or found it.
//! - On a server whose pgoutput streams no logical messages (13), setup
//!   installs no SQL emitter API and leaves no publication without tables:
//!   a fact emitted there would never reach the relay.

use std::process::ExitCode;

use super::failover::{self, FAILOVER_SINCE};
use super::{connect_sql, pg, server_major, CliError};
use crate::config::{CommonArgs, SetupArgs, SqlApiArg};
use crate::emit::sql_api;
use crate::schema::{Installed, SchemaError, Script};
use crate::source::MESSAGES_SINCE;

/// Quotes a possibly schema-qualified table name as `"schema"."table"`.
fn quote_table(name: &str) -> String {
    name.split('.')
        .map(|part| format!("\"{}\"", part.trim().replace('"', "\"\"")))
        .collect::<Vec<_>>()
        .join(".")
}

/// Warns about an outbox table without a replica identity: while it is in a
/// publication that publishes updates and deletes (the default), PostgreSQL
/// refuses UPDATE and DELETE on it, which breaks the insert-then-delete
/// pattern.
async fn warn_without_replica_identity(
    client: &tokio_postgres::Client,
    table: &str,
) -> Result<(), CliError> {
    let row = client
        .query_one(
            "SELECT c.relreplident::text, \
                    EXISTS (SELECT 1 FROM pg_index i WHERE i.indrelid = c.oid AND i.indisprimary) \
             FROM pg_class c WHERE c.oid = $1::text::regclass",
            &[&table],
        )
        .await
        .map_err(pg(format!("checking table {table}")))?;
    let (identity, has_key): (String, bool) = (row.get(0), row.get(1));
    if identity == "n" || (identity == "d" && !has_key) {
        eprintln!(
            "warning: outbox table {table} has no replica identity (no primary key): PostgreSQL now refuses \
             UPDATE and DELETE on it. Add a primary key (Debezium's layout has `id uuid PRIMARY KEY`) or run \
             ALTER TABLE {table} REPLICA IDENTITY FULL"
        );
    }
    Ok(())
}

/// Runs `factlib setup`.
pub async fn run(common: &CommonArgs, args: &SetupArgs) -> Result<ExitCode, CliError> {
    let mut client = connect_sql(&common.database_url).await?;

    let (major, version) = server_major(&client).await?;
    let messages = major >= MESSAGES_SINCE;
    println!("server: PostgreSQL {version}");
    if !messages {
        println!(
            "warning: PostgreSQL {major}'s pgoutput streams no logical decoding messages (added in {MESSAGES_SINCE}): \
             facts emitted with pg_logical_emit_message reach no relay here; only outbox-table rows do"
        );
    }

    if args.failover && major < FAILOVER_SINCE {
        return Err(CliError::Precondition(format!(
            "--failover needs PostgreSQL {FAILOVER_SINCE} or newer (failover slots); this server is {version}, \
             and nothing was created.\n  \
             fix: run setup without --failover, and see the README's \"Failover before PostgreSQL 17\" for what \
             a promotion of a standby means for the slot"
        )));
    }

    let wal_level: String = client
        .query_one("SHOW wal_level", &[])
        .await
        .map_err(pg("reading wal_level"))?
        .get(0);
    if wal_level != "logical" {
        return Err(CliError::Precondition(format!(
            "wal_level is '{wal_level}', but logical replication needs 'logical'.\n  \
             fix: run ALTER SYSTEM SET wal_level = logical; as a superuser (or set it in postgresql.conf), then restart PostgreSQL"
        )));
    }
    println!("wal_level: logical");

    let publication = &common.publication;
    let exists = client
        .query_opt(
            "SELECT 1 FROM pg_publication WHERE pubname = $1",
            &[publication],
        )
        .await
        .map_err(pg("looking up the publication"))?
        .is_some();
    if !messages && args.tables.is_empty() {
        let tables: i64 = client
            .query_one(
                "SELECT count(*) FROM pg_publication_tables WHERE pubname = $1",
                &[publication],
            )
            .await
            .map_err(pg("counting the publication's tables"))?
            .get(0);
        if tables == 0 {
            return Err(CliError::Precondition(format!(
                "publication \"{publication}\" would have no tables, and on PostgreSQL {major} only outbox-table rows reach the relay.\n  \
                 fix: name an outbox table (factlib setup --outbox-table schema.table), or upgrade to PostgreSQL {MESSAGES_SINCE} or newer for message facts"
            )));
        }
    }
    if !exists {
        let sql = if args.tables.is_empty() {
            format!("CREATE PUBLICATION \"{publication}\"")
        } else {
            let tables: Vec<_> = args.tables.iter().map(|t| quote_table(t)).collect();
            format!(
                "CREATE PUBLICATION \"{publication}\" FOR TABLE {}",
                tables.join(", ")
            )
        };
        client
            .batch_execute(&sql)
            .await
            .map_err(pg(format!("creating publication \"{publication}\"")))?;
        if args.tables.is_empty() {
            println!("publication \"{publication}\": created (logical messages only, no tables)");
        } else {
            println!(
                "publication \"{publication}\": created with tables {}",
                args.tables.join(", ")
            );
        }
    } else {
        let mut added = Vec::new();
        for t in &args.tables {
            let present = client
                .query_opt(
                    "SELECT 1 FROM pg_publication_rel pr JOIN pg_publication p ON p.oid = pr.prpubid \
                     WHERE p.pubname = $1 AND pr.prrelid = $2::text::regclass",
                    &[publication, t],
                )
                .await
                .map_err(pg(format!("checking table {t}")))?
                .is_some();
            if !present {
                client
                    .batch_execute(&format!(
                        "ALTER PUBLICATION \"{publication}\" ADD TABLE {}",
                        quote_table(t)
                    ))
                    .await
                    .map_err(pg(format!(
                        "adding table {t} to publication \"{publication}\""
                    )))?;
                added.push(t.as_str());
            }
        }
        if added.is_empty() {
            println!("publication \"{publication}\": exists, unchanged");
        } else {
            println!(
                "publication \"{publication}\": exists, added tables {}",
                added.join(", ")
            );
        }
    }

    for t in &args.tables {
        warn_without_replica_identity(&client, t).await?;
    }

    let slot = &common.slot;
    let row = client
        .query_opt(
            &format!(
                "SELECT plugin, slot_type, database, {} FROM pg_replication_slots WHERE slot_name = $1",
                if major >= FAILOVER_SINCE { "failover" } else { "false" }
            ),
            &[slot],
        )
        .await
        .map_err(pg("looking up the replication slot"))?;
    let kind = if args.failover {
        "pgoutput, failover"
    } else {
        "pgoutput"
    };
    match row {
        Some(r) => {
            let plugin: Option<String> = r.get(0);
            let slot_type: String = r.get(1);
            if slot_type != "logical" || plugin.as_deref() != Some("pgoutput") {
                return Err(CliError::Precondition(format!(
                    "replication slot \"{slot}\" exists but is a {slot_type} slot with plugin {}; \
                     factlib needs a logical pgoutput slot. Drop it (SELECT pg_drop_replication_slot('{slot}')) or choose another --slot",
                    plugin.as_deref().unwrap_or("none")
                )));
            }
            let is_failover: bool = r.get(3);
            if args.failover && !is_failover {
                failover::enable(&common.database_url, slot).await?;
                println!("slot \"{slot}\": exists (pgoutput), now a failover slot");
            } else if is_failover {
                println!("slot \"{slot}\": exists (pgoutput, failover), unchanged");
            } else {
                println!("slot \"{slot}\": exists (pgoutput), unchanged");
            }
        }
        None => {
            // The five-argument form (failover) is new in 17.
            let sql = if args.failover {
                "SELECT lsn::text FROM pg_create_logical_replication_slot($1, 'pgoutput', false, false, true)"
            } else {
                "SELECT lsn::text FROM pg_create_logical_replication_slot($1, 'pgoutput')"
            };
            let lsn: String = client
                .query_one(sql, &[slot])
                .await
                .map_err(pg(format!("creating replication slot \"{slot}\"")))?
                .get(0);
            println!("slot \"{slot}\": created ({kind}) at {lsn}");
        }
    }
    if args.failover {
        print_failover_requirements(&client).await?;
    }

    match args.sql_api {
        SqlApiArg::None => println!("sql api: skipped (--sql-api none)"),
        SqlApiArg::V1 if !messages => println!(
            "sql api: not installed: on PostgreSQL {major} the facts it emits would not reach the relay"
        ),
        SqlApiArg::V1 => {
            let installed = sql_api::SCRIPT.install(&mut client).await;
            report_install(
                "sql api",
                &sql_api::SCRIPT,
                sql_api::FUNCTIONS,
                installed,
                "or skip it with --sql-api none",
            )?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Prints the settings a failover slot needs, with this primary's
/// physical slots filled in, and warns if `synchronized_standby_slots` is
/// empty.
async fn print_failover_requirements(client: &tokio_postgres::Client) -> Result<(), CliError> {
    let physical: Vec<String> = client
        .query(
            "SELECT slot_name::text FROM pg_replication_slots WHERE slot_type = 'physical' ORDER BY 1",
            &[],
        )
        .await
        .map_err(pg("listing the physical slots"))?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let row = client
        .query_one(
            "SELECT current_database()::text, current_user::text, current_setting('synchronized_standby_slots')",
            &[],
        )
        .await
        .map_err(pg("reading synchronized_standby_slots"))?;
    let (dbname, user, synchronized): (String, String, String) =
        (row.get(0), row.get(1), row.get(2));
    println!("{}", failover::requirements(&physical, &dbname, &user));
    if synchronized.is_empty() {
        println!(
            "warning: synchronized_standby_slots is empty on this primary: until it names the standby's \
             physical slot, the relay can receive facts the standby has not, and a failover loses them"
        );
    } else {
        println!("synchronized_standby_slots: {synchronized}");
    }
    Ok(())
}

/// Prints what installing `script` did (`label: installed v2 (what)`, …),
/// or turns its error into the command's, with `hint` on a failed
/// statement.
pub(super) fn report_install(
    label: &str,
    script: &Script,
    what: &str,
    installed: Result<Installed, SchemaError>,
    hint: &str,
) -> Result<(), CliError> {
    let v = script.version;
    match installed {
        Ok(Installed::Created) => println!("{label}: installed v{v} ({what})"),
        Ok(Installed::Upgraded { from }) => println!("{label}: upgraded v{from} to v{v} ({what})"),
        Ok(Installed::Unchanged) => println!("{label}: v{v} exists, unchanged"),
        Ok(Installed::Newer { installed }) => {
            println!("{label}: v{installed} exists, newer than this factlib's v{v}; left unchanged")
        }
        Err(SchemaError::Postgres { context, source }) => {
            return Err(CliError::Postgres {
                context: format!("{context} ({hint})"),
                source,
            })
        }
        Err(e @ SchemaError::Inconsistent { .. }) => {
            return Err(CliError::Precondition(e.to_string()))
        }
    }
    Ok(())
}
