//! The subcommands: `setup`, `emit`, `tail`, `status`, `bench`, `inbox`
//! (`relay` is `crate::relay::run`).
//!
//! Owns what each command prints and its exit status. Each command is a
//! thin layer over the library stages; no protocol logic lives here.
//!
//! **Invariants**
//! - Errors say what failed and what to do about it.
//! - `tail` confirms only what it has written to stdout and flushed.

pub mod bench;
pub mod inbox;
pub mod setup;
pub mod status;
pub mod tail;

mod emit_cmd;
mod failover;

use std::process::ExitCode;

use crate::config::{check_name, Cli, Command, ConfigError};
use futures_util::StreamExt as _;

use crate::source::sql::{self, pg_message, SqlConnectError};
use crate::source::{SourceError, TlsError, MESSAGES_SINCE, MIN_SERVER_MAJOR};

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
    /// TLS to PostgreSQL could not be set up for a SQL session.
    #[error("cannot connect to PostgreSQL: {0}")]
    Tls(#[from] TlsError),
    /// The replication stream broke the protocol.
    #[error(transparent)]
    Stream(#[from] crate::progress::StreamError),
    /// The relay stopped on an error.
    #[error(transparent)]
    Relay(#[from] crate::relay::RelayError),
    /// Emitting failed.
    #[error(transparent)]
    Emit(#[from] crate::emit::EmitError),
    /// The inbox stopped on an error.
    #[error(transparent)]
    Inbox(#[from] crate::inbox::InboxError),
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

/// Turns a failed query into [`CliError::Postgres`] saying what was being
/// done.
pub(super) fn pg(context: impl Into<String>) -> impl FnOnce(tokio_postgres::Error) -> CliError {
    let context = context.into();
    move |source| CliError::Postgres { context, source }
}

/// The server's major version and its `server_version`; refuses one older
/// than [`MIN_SERVER_MAJOR`].
pub(crate) async fn server_major(
    client: &tokio_postgres::Client,
) -> Result<(u32, String), CliError> {
    let row = client
        .query_one(
            "SELECT current_setting('server_version_num'), current_setting('server_version')",
            &[],
        )
        .await
        .map_err(|source| CliError::Postgres {
            context: "reading the server's version".into(),
            source,
        })?;
    let (num, version): (String, String) = (row.get(0), row.get(1));
    let major = num.parse::<u32>().map_or(0, |n| n / 10_000);
    if major < MIN_SERVER_MAJOR {
        return Err(CliError::Precondition(format!(
            "PostgreSQL {version} is not supported: Factlib needs PostgreSQL {MIN_SERVER_MAJOR} or newer \
             (14 or newer for logical-message facts).\n  \
             fix: upgrade the server (pg_upgrade), then try again"
        )));
    }
    Ok((major, version))
}

/// Refuses to emit a logical-message fact on a server whose pgoutput does
/// not stream logical messages (13): no relay would ever see it.
pub(crate) async fn messages_reach_the_relay(
    client: &tokio_postgres::Client,
) -> Result<(), CliError> {
    let (major, version) = server_major(client).await?;
    if major < MESSAGES_SINCE {
        return Err(CliError::Precondition(format!(
            "PostgreSQL {version}'s pgoutput streams no logical decoding messages (added in {MESSAGES_SINCE}), \
             so a fact emitted here would never reach a relay; nothing was emitted.\n  \
             fix: write the fact as a row of an outbox table (factlib setup --outbox-table), or upgrade to PostgreSQL {MESSAGES_SINCE} or newer"
        )));
    }
    Ok(())
}

/// Connects an ordinary (non-replication) session for SQL, over TLS as
/// the URL's `sslmode` (or `PGSSLMODE`) says; the connection is driven by a
/// local task.
pub async fn connect_sql(url: &str) -> Result<tokio_postgres::Client, CliError> {
    let (client, mut messages) = sql::connect(url).await.map_err(|e| match e {
        SqlConnectError::Url(e) => CliError::Config(e.into()),
        SqlConnectError::Tls(e) => CliError::Tls(e),
        SqlConnectError::Postgres(source) => CliError::Postgres {
            context: "cannot connect to PostgreSQL (check --database-url / FACTLIB_DATABASE_URL and that the server is running)".into(),
            source,
        },
        SqlConnectError::Other(e) => CliError::Precondition(format!("cannot connect to PostgreSQL over TLS: {e}")),
    })?;
    tokio::task::spawn_local(async move {
        while let Some(m) = messages.next().await {
            if let Err(e) = m {
                tracing::warn!(error = %e, "postgres connection ended");
            }
        }
    });
    Ok(client)
}

/// A flag that turns `true` on the first SIGTERM or SIGINT.
///
/// The handlers are registered before this returns, not when the watching
/// task is first polled: a SIGTERM that arrives while the relay starts up
/// (before its first await) must be a stop request, not the default action
/// that kills the process.
pub fn spawn_signal_watch() -> tokio::sync::watch::Receiver<bool> {
    use tokio::signal::unix::{signal, SignalKind};
    let (tx, rx) = tokio::sync::watch::channel(false);
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::warn!(
            "cannot watch SIGTERM/SIGINT; they will end the process without a clean stop"
        );
        return rx;
    };
    tokio::task::spawn_local(async move {
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
        Command::Inbox(args) => inbox::run(&args).await,
        Command::Relay(args) => {
            let settings = args.settings(&cli.common)?;
            let stop = spawn_signal_watch();
            crate::relay::run(settings, stop).await?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::spawn_signal_watch;

    /// A SIGTERM sent before the first await is a stop request. Without the
    /// handler in place it would kill this test binary.
    #[test]
    fn a_sigterm_before_the_first_await_is_a_stop_request() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let local = tokio::task::LocalSet::new();
        let stopped = local.block_on(&rt, async {
            let mut stop = spawn_signal_watch();
            let sent = std::process::Command::new("kill")
                .args(["-TERM", &std::process::id().to_string()])
                .status()
                .expect("run kill");
            assert!(sent.success());
            tokio::time::timeout(std::time::Duration::from_secs(30), stop.changed())
                .await
                .expect("the stop flag turns within 30 s")
                .expect("the watch is alive");
            let stopped = *stop.borrow();
            stopped
        });
        assert!(stopped);
    }
}
