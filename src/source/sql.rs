//! SQL sessions (`tokio_postgres`) over the same connection string and TLS
//! as the replication connection: for `setup`, `status`, `emit` and the
//! inbox.
//!
//! ```text
//!  url ──sql_config──► (Config, TlsSettings) ──connect (rustls if sslmode asks)──► Client + Messages
//! ```
//!
//! [`connect`] leaves driving the connection to the caller: its
//! [`Messages`] stream must be polled (to its end) for the client to work,
//! and carries the server's notices and `NOTIFY`s.
//!
//! **Invariants**
//! - TLS failures are told as the replication client tells them
//!   ([`TlsError`]), whichever way tokio-postgres reports them.

use std::pin::Pin;

use futures_util::Stream;
use tokio_postgres::{AsyncMessage, Client};

use super::{error_chain, sql_config, Connector, MakeRustls, SslMode, TlsError, UrlError};

/// What the server sends outside any query; polling it drives the
/// connection, which ends with the stream.
pub type Messages = Pin<Box<dyn Stream<Item = Result<AsyncMessage, tokio_postgres::Error>> + Send>>;

/// Why a SQL session could not start.
#[derive(Debug, thiserror::Error)]
pub enum SqlConnectError {
    /// The connection string is wrong.
    #[error(transparent)]
    Url(#[from] UrlError),
    /// TLS could not be set up or was refused.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// Connecting or authenticating failed.
    #[error("cannot connect to PostgreSQL: {}", pg_message(.0))]
    Postgres(#[source] tokio_postgres::Error),
    /// TLS failed in a way tokio-postgres did not pass on.
    #[error("cannot connect to PostgreSQL over TLS: {0}")]
    Other(String),
}

impl SqlConnectError {
    /// True if trying again later may succeed: the server unreachable,
    /// starting or shutting down, or out of connections; not a wrong
    /// password, a missing database or a bad URL.
    pub fn is_transient(&self) -> bool {
        match self {
            SqlConnectError::Url(_) | SqlConnectError::Other(_) => false,
            SqlConnectError::Tls(e) => e.is_transient(),
            SqlConnectError::Postgres(e) => match e.code() {
                Some(code) => is_transient_state(code.code()),
                None => true,
            },
        }
    }
}

/// SQLSTATEs that a later attempt may not see: connection failures, the
/// server starting, stopping or out of connections, serialization
/// failures and deadlocks.
pub(crate) fn is_transient_state(code: &str) -> bool {
    code.starts_with("08")
        || matches!(
            code,
            "57P01" | "57P02" | "57P03" | "53300" | "53400" | "40001" | "40P01"
        )
}

/// The server's message and SQLSTATE, or the error chain.
pub(crate) fn pg_message(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{} (SQLSTATE {})", db.message(), db.code().code()),
        None => error_chain(e),
    }
}

/// Connects a SQL session as `url` says (TLS per its `sslmode`, or
/// `PGSSLMODE`). Poll the returned [`Messages`] to drive the connection.
pub async fn connect(url: &str) -> Result<(Client, Messages), SqlConnectError> {
    let (config, tls) = sql_config(url)?;
    let result = match Connector::new(&tls)? {
        None => config
            .connect(tokio_postgres::NoTls)
            .await
            .map(|(client, conn)| (client, messages(conn))),
        Some(connector) => config
            .connect(MakeRustls::new(connector))
            .await
            .map(|(client, conn)| (client, messages(conn))),
    };
    result.map_err(|e| connect_error(e, tls.mode))
}

fn messages<S, T>(mut conn: tokio_postgres::Connection<S, T>) -> Messages
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    Box::pin(futures_util::stream::poll_fn(move |cx| {
        conn.poll_message(cx)
    }))
}

/// A failed connect, with TLS failures told as the replication client
/// tells them.
fn connect_error(source: tokio_postgres::Error, mode: SslMode) -> SqlConnectError {
    // tokio-postgres 0.7 reports an `N` to its SSLRequest under
    // sslmode=require with this text and no error type of its own.
    let refused = source.as_db_error().is_none()
        && std::error::Error::source(&source)
            .is_some_and(|s| s.to_string() == "server does not support TLS");
    if refused {
        return SqlConnectError::Tls(TlsError::Refused { mode });
    }
    let is_ours = std::error::Error::source(&source).is_some_and(|s| s.is::<TlsError>());
    if !is_ours {
        return SqlConnectError::Postgres(source);
    }
    match source.into_source().map(|s| s.downcast::<TlsError>()) {
        Some(Ok(tls)) => SqlConnectError::Tls(*tls),
        // Not reached: the source was checked to be a TlsError.
        Some(Err(other)) => SqlConnectError::Other(error_chain(&*other)),
        None => SqlConnectError::Other("no cause given".into()),
    }
}
