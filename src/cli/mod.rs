//! The subcommands: `setup`, `emit`, `tail`, `status`.
//!
//! Owns what each command prints and its exit status. Each command is a
//! thin layer over the library stages; no protocol logic lives here.
//!
//! **Invariants**
//! - Errors say what failed and what to do about it.
//! - `tail` confirms only what it has written to stdout and flushed.

pub mod bench;
pub mod setup;
pub mod status;
pub mod tail;

mod emit_cmd;

use std::process::ExitCode;

use crate::config::{check_name, Cli, Command, ConfigError};
use crate::source::SourceError;

/// A failed command.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// Bad configuration.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// A PostgreSQL query failed.
    #[error("{context}: {}", pg_message(.source))]
    Postgres {
        /// What we were doing.
        context: String,
        /// The driver error.
        #[source]
        source: tokio_postgres::Error,
    },
    /// The replication stream failed.
    #[error(transparent)]
    Source(#[from] SourceError),
    /// The replication stream broke the protocol.
    #[error(transparent)]
    Stream(#[from] crate::progress::StreamError),
    /// The relay stopped on an error.
    #[error(transparent)]
    Relay(#[from] crate::relay::RelayError),
    /// Emitting failed.
    #[error(transparent)]
    Emit(#[from] crate::emit::EmitError),
    /// Something the user must fix before the command can work.
    #[error("{0}")]
    Precondition(String),
    /// Local I/O (stdout, a payload file).
    #[error("{context}: {source}")]
    Io {
        /// What we were doing.
        context: String,
        /// The error.
        #[source]
        source: std::io::Error,
    },
}

fn pg_message(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{} (SQLSTATE {})", db.message(), db.code().code()),
        None => crate::source::error_chain(e),
    }
}

/// Connects an ordinary (non-replication) session for SQL.
pub async fn connect_sql(url: &str) -> Result<tokio_postgres::Client, CliError> {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .map_err(|source| CliError::Postgres {
            context: "cannot connect to PostgreSQL (check --database-url / FACTLIB_DATABASE_URL and that the server is running)".into(),
            source,
        })?;
    tokio::task::spawn_local(async move {
        if let Err(e) = conn.await {
            tracing::warn!(error = %e, "postgres connection ended");
        }
    });
    Ok(client)
}

/// A flag that turns `true` on the first SIGTERM or SIGINT.
pub fn spawn_signal_watch() -> tokio::sync::watch::Receiver<bool> {
    let (tx, rx) = tokio::sync::watch::channel(false);
    tokio::task::spawn_local(async move {
        use tokio::signal::unix::{signal, SignalKind};
        let (Ok(mut term), Ok(mut int)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) else {
            return;
        };
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        tracing::info!("stop requested");
        let _ = tx.send(true);
    });
    rx
}

/// Runs one parsed command line.
pub async fn run(cli: Cli) -> Result<ExitCode, CliError> {
    check_name("slot", &cli.common.slot)?;
    check_name("publication", &cli.common.publication)?;
    match cli.command {
        Command::Setup(args) => setup::run(&cli.common, &args).await,
        Command::Emit(args) => emit_cmd::run(&cli.common, args).await,
        Command::Tail(args) => tail::run(&cli.common, &args).await,
        Command::Status(args) => status::run(&cli.common, &args).await,
        Command::Bench(cmd) => bench::run(&cli.common, &cmd).await,
        Command::Relay(args) => {
            let settings = args.settings(&cli.common)?;
            let stop = spawn_signal_watch();
            crate::relay::run(settings, stop).await?;
            Ok(ExitCode::SUCCESS)
        }
    }
}
