//! The replication connection: connect (over TLS as the connection
//! string's `sslmode` says), authenticate, `IDENTIFY_SYSTEM`,
//! `START_REPLICATION`, then stream CopyData and send standby feedback.
//! Also owns what every connection to PostgreSQL shares: the connection
//! string (`conn`), TLS (`tls`), and the SQL sessions over both (`sql`).
//!
//! ```text
//!  ConnectionConfig.hosts, in order ──transport::connect──► [SSLRequest ──► TLS handshake] ──► startup/auth
//!                                    └─(read-write asked, SHOW transaction_read_only = on)──► next host
//!  transport reader task ──batches of Backend──► ReplicationStream::next_run_or ──► CopyRun (relay)
//!                                                  └──────────────► ::next ──► ReplicationMessage
//!  caller ──confirm(lsn)──► ReplicationStream ──status update (flush = confirmed)──► server
//! ```
//!
//! This module does not interpret facts: it hands XLogData up unchanged.
//!
//! **Invariants**
//! - The flush position sent to the server never exceeds what the caller
//!   confirmed, and never moves backwards.
//! - A status update goes out at least every `status_interval`, and at once
//!   when a keepalive asks for a reply, so the walsender never times us out
//!   while we are healthy. Keepalives are noted (server LSN, reply) as their
//!   run arrives, before the caller walks it.
//! - With `sslmode` `require`, `verify-ca` or `verify-full`, no byte of the
//!   startup message (user, password) is sent before TLS is established.
//! - pgoutput's `messages` option is asked for only from a server that has
//!   it (14 and newer, [`MESSAGES_SINCE`]).
//! - With `target_session_attrs=read-write`, a connection is handed out only
//!   from a server whose `transaction_read_only` is `off`: never from a hot
//!   standby. All servers refusing is transient if any refusal is (a
//!   failover under way).

mod conn;
pub mod sql;
mod tls;
pub mod transport;

pub(crate) use conn::{error_chain, sql_config};
pub use conn::{
    ClientCert, ConnectionConfig, Endpoint, SessionAttrs, SslMode, TlsSettings, UrlError,
};
pub use tls::TlsError;
pub(crate) use tls::{Connector, MakeRustls};

use std::collections::VecDeque;
use std::net::{SocketAddr, ToSocketAddrs};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::BytesMut;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use crate::lsn::Lsn;
use crate::pgwire::backend::{Backend, CopyRun, ServerError};
use crate::pgwire::replication::{
    unix_to_pg_micros, ReplicationMessage, ReplicationRef, StandbyStatusUpdate,
};
use crate::pgwire::startup::{
    QueryStatus, Ready, SimpleQuery, Startup, StartupError, StartupParams,
};
use crate::pgwire::DecodeError;

use transport::{ReadBatch, Writer};

/// The oldest PostgreSQL major version Factlib supports.
pub const MIN_SERVER_MAJOR: u32 = 13;

/// The first major version whose pgoutput streams logical decoding
/// messages (`pg_logical_emit_message`, `factlib.emit`): its `messages`
/// option. On 13, only outbox-table rows reach the relay.
pub const MESSAGES_SINCE: u32 = 14;

/// Why the replication connection failed.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// A socket error.
    #[error("replication connection I/O error: {0}")]
    Io(#[from] std::io::Error),
    /// Could not reach the server.
    #[error("cannot connect to PostgreSQL at {addr}: {source}; is the server running and listening on that address?")]
    Connect {
        /// The address tried.
        addr: String,
        /// The socket error.
        #[source]
        source: std::io::Error,
    },
    /// Connecting took too long.
    #[error("connecting to PostgreSQL at {0} timed out")]
    ConnectTimeout(String),
    /// The server closed the connection.
    #[error("the server closed the replication connection")]
    Closed,
    /// A frame that does not decode.
    #[error("malformed message from the server: {0}")]
    Decode(#[from] DecodeError),
    /// TLS could not be set up (see [`TlsError::is_transient`]).
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// Authentication or startup failed.
    #[error("{}{}", .0, startup_advice(.0))]
    Startup(#[from] StartupError),
    /// The server answered a command with an error.
    #[error("{context} failed: {error}{}", advice(.error))]
    Server {
        /// The command that failed.
        context: String,
        /// What the server said.
        error: Box<ServerError>,
    },
    /// The server answered something we did not expect.
    #[error("protocol violation: {0}")]
    Protocol(String),
    /// `target_session_attrs=read-write` and the server's sessions are
    /// read-only: a hot standby (a failover may be under way), or
    /// `default_transaction_read_only` is on. Transient.
    #[error("{server}: read-only (a hot standby, or default_transaction_read_only is on), and --database-url asks for target_session_attrs=read-write")]
    ReadOnly {
        /// The server.
        server: String,
    },
    /// No server of a multi-host connection string would do.
    #[error("no server in --database-url accepted a {wanted} session: {tried}")]
    NoHost {
        /// `target_session_attrs`.
        wanted: &'static str,
        /// What each server did, in order.
        tried: String,
        /// Whether any of the failures was transient.
        transient: bool,
    },
}

fn advice(e: &ServerError) -> &'static str {
    match e.code.as_str() {
        "55006" => "\n  another process (probably another relay or tail) is streaming from this slot; stop it, or use a different --slot",
        "42704" => "\n  the replication slot does not exist; run `factlib setup` to create it",
        "55000" if e.message.contains("wal_level") => {
            "\n  set wal_level = logical in postgresql.conf and restart PostgreSQL"
        }
        "28P01" => "\n  check the user and password in --database-url / FACTLIB_DATABASE_URL",
        "28000" => "\n  pg_hba.conf has no entry allowing this role to connect for replication from this host; add a `host replication <role> <address> scram-sha-256` line and reload PostgreSQL",
        "42501" => "\n  the role needs the REPLICATION attribute: ALTER ROLE <user> REPLICATION",
        "53300" => "\n  raise max_wal_senders / max_connections, or stop idle replication clients",
        _ => "",
    }
}

fn startup_advice(e: &StartupError) -> &'static str {
    match e {
        StartupError::Server(e) => advice(e),
        _ => "",
    }
}

impl SourceError {
    /// True if retrying later (with backoff) may succeed: lost
    /// connections, a slot busy with another process, a server restarting.
    /// False for errors that will repeat until someone changes something.
    pub fn is_transient(&self) -> bool {
        match self {
            SourceError::Io(_)
            | SourceError::Connect { .. }
            | SourceError::ConnectTimeout(_)
            | SourceError::Closed
            | SourceError::ReadOnly { .. } => true,
            SourceError::NoHost { transient, .. } => *transient,
            SourceError::Tls(e) => e.is_transient(),
            SourceError::Server { error, .. }
            | SourceError::Startup(StartupError::Server(error)) => {
                matches!(
                    error.code.as_str(),
                    "55006" | "53300" | "57P01" | "57P02" | "57P03" | "08006" | "08003"
                )
            }
            _ => false,
        }
    }

    /// The SQLSTATE, for errors the server reported.
    pub fn sqlstate(&self) -> Option<&str> {
        match self {
            SourceError::Server { error, .. }
            | SourceError::Startup(StartupError::Server(error)) => Some(error.code.as_str()),
            _ => None,
        }
    }
}

/// Which socket implementation reads the replication stream. The default
/// is tokio: in paired drains io_uring took the same wall time and 8–9%
/// more CPU (perf/README.md, issue 20).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Transport {
    /// io_uring if the kernel allows it, else tokio.
    Auto,
    /// io_uring through tokio-uring; fails if unavailable.
    Uring,
    /// Plain tokio (epoll).
    #[default]
    Tokio,
}

impl Transport {
    /// The transport this resolves to on this machine: `Auto` becomes
    /// io_uring when the kernel allows it, else tokio.
    pub fn resolve(self) -> Transport {
        transport::resolve(self)
    }

    /// A short name for logs.
    pub fn name(self) -> &'static str {
        match self {
            Transport::Auto => "auto",
            Transport::Uring => "io_uring",
            Transport::Tokio => "tokio",
        }
    }
}

/// Replication-connection settings, shared by `tail` and `relay`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceSettings {
    /// The socket transport.
    pub transport: Transport,
    /// How often to send a standby status update (also sent whenever the
    /// server asks).
    pub status_interval: Duration,
    /// Size of each socket read buffer, in bytes.
    pub read_buffer: usize,
    /// Read batches queued between the socket reader and the decoder before
    /// the reader stops reading (backpressure).
    pub read_queue: usize,
    /// Give up connecting after this long.
    pub connect_timeout: Duration,
}

impl Default for SourceSettings {
    fn default() -> Self {
        SourceSettings {
            transport: Transport::default(),
            status_interval: Duration::from_secs(10),
            read_buffer: 1 << 20,
            read_queue: 4,
            connect_timeout: Duration::from_secs(10),
        }
    }
}

/// The answer to `IDENTIFY_SYSTEM`.
#[derive(Debug, Clone)]
pub struct SystemIdentity {
    /// The cluster's system identifier.
    pub system_id: String,
    /// Current timeline.
    pub timeline: u32,
    /// Current WAL flush position.
    pub xlogpos: Lsn,
    /// The database we are connected to.
    pub dbname: Option<String>,
}

/// What ends a wait for input early (see [`ReplicationStream::next_or`]).
type Interrupt<'a, 'f> = std::pin::Pin<&'a mut (dyn std::future::Future<Output = ()> + 'f)>;

/// A replication connection.
pub struct ReplicationStream {
    rx: mpsc::Receiver<ReadBatch>,
    pending: VecDeque<Backend>,
    /// The run `next` is taking messages from.
    run: CopyRun,
    writer: Writer,
    transport: Transport,
    tls: bool,
    /// `host:port` of the server.
    server: String,
    out: BytesMut,
    ready: Ready,
    confirmed: Lsn,
    status_interval: Duration,
    next_status: Instant,
    server_lsn: Lsn,
}

impl ReplicationStream {
    /// Connects with `replication=database` (over TLS as `conn.tls` says)
    /// and authenticates, trying `conn.hosts` in order until one accepts
    /// and has the [`SessionAttrs`] asked for. With one host, its error is
    /// returned as it is; with several, [`SourceError::NoHost`] lists what
    /// each one did.
    pub async fn connect(
        conn: &ConnectionConfig,
        settings: &SourceSettings,
    ) -> Result<Self, SourceError> {
        let mut tried = Vec::new();
        let mut transient = false;
        for endpoint in &conn.hosts {
            let failure = match Self::connect_to(endpoint, conn, settings).await {
                Ok(mut s) => match s.read_only_refusal(conn.target_session_attrs).await {
                    Ok(None) => return Ok(s),
                    Ok(Some(refusal)) => refusal,
                    Err(e) => e,
                },
                Err(e) => e,
            };
            if conn.hosts.len() == 1 && !matches!(failure, SourceError::ReadOnly { .. }) {
                return Err(failure);
            }
            transient |= failure.is_transient();
            tried.push(failure.to_string());
        }
        Err(SourceError::NoHost {
            wanted: conn.target_session_attrs.as_str(),
            tried: tried.join("; "),
            transient,
        })
    }

    /// `Some(SourceError::ReadOnly)` if `attrs` asks for a read-write
    /// session and this server's sessions are read-only (libpq's check:
    /// `SHOW transaction_read_only`).
    async fn read_only_refusal(
        &mut self,
        attrs: SessionAttrs,
    ) -> Result<Option<SourceError>, SourceError> {
        if attrs == SessionAttrs::Any {
            return Ok(None);
        }
        let rows = self.query("SHOW transaction_read_only").await?;
        let read_only = rows.first().and_then(|r| r.first()).cloned().flatten();
        Ok(match read_only.as_deref() {
            Some("off") => None,
            _ => Some(SourceError::ReadOnly {
                server: self.server.clone(),
            }),
        })
    }

    async fn connect_to(
        endpoint: &Endpoint,
        conn: &ConnectionConfig,
        settings: &SourceSettings,
    ) -> Result<Self, SourceError> {
        let target = endpoint.to_string();
        let addr: SocketAddr = match endpoint.hostaddr {
            Some(a) => SocketAddr::new(a, endpoint.port),
            None => (endpoint.host.as_str(), endpoint.port)
                .to_socket_addrs()
                .map_err(|source| SourceError::Connect {
                    addr: target.clone(),
                    source,
                })?
                .next()
                .ok_or_else(|| SourceError::Connect {
                    addr: target.clone(),
                    source: std::io::Error::new(
                        std::io::ErrorKind::NotFound,
                        "host did not resolve",
                    ),
                })?,
        };
        let connector = Connector::new(&conn.tls)?;
        let connecting = transport::connect(
            settings.transport,
            transport::Target {
                addr,
                name: &target,
                host: &endpoint.host,
                tls: connector.as_ref(),
            },
            settings.read_buffer,
            settings.read_queue,
        );
        let connected = tokio::time::timeout(settings.connect_timeout, connecting)
            .await
            .map_err(|_| SourceError::ConnectTimeout(target.clone()))??;
        let mut s = ReplicationStream {
            rx: connected.rx,
            pending: VecDeque::new(),
            run: CopyRun::default(),
            writer: connected.writer,
            transport: connected.transport,
            tls: connected.tls,
            server: target,
            out: BytesMut::with_capacity(1024),
            ready: Ready::default(),
            confirmed: Lsn::INVALID,
            status_interval: settings.status_interval,
            next_status: Instant::now() + settings.status_interval,
            server_lsn: Lsn::INVALID,
        };
        let params = StartupParams {
            user: conn.user.clone(),
            password: conn.password.clone(),
            database: conn.dbname.clone(),
            application_name: "factlib".to_owned(),
            replication: true,
        };
        let mut startup = Startup::new(params, &mut s.out);
        s.flush().await?;
        loop {
            let msg = s.recv_backend().await?;
            let ready = startup.handle(msg, &mut s.out)?;
            if !s.out.is_empty() {
                s.flush().await?;
            }
            if let Some(r) = ready {
                s.ready = r;
                return Ok(s);
            }
        }
    }

    /// The server this stream is connected to (`host:port`).
    pub fn server(&self) -> &str {
        &self.server
    }

    /// The walsender's process id.
    pub fn backend_pid(&self) -> i32 {
        self.ready.backend_pid
    }

    /// The transport in use: io_uring falls back to tokio for TLS.
    pub fn transport(&self) -> Transport {
        self.transport
    }

    /// True when the connection runs over TLS.
    pub fn tls(&self) -> bool {
        self.tls
    }

    /// The server's version string.
    pub fn server_version(&self) -> Option<&str> {
        self.ready.server_version.as_deref()
    }

    /// Whether pgoutput on this server can stream logical decoding
    /// messages (its `messages` option, PostgreSQL 14 and newer). A server
    /// that does not say its version is taken to be able to.
    pub fn streams_messages(&self) -> bool {
        self.ready
            .server_major()
            .is_none_or(|major| major >= MESSAGES_SINCE)
    }

    async fn flush(&mut self) -> Result<(), SourceError> {
        let out = std::mem::take(&mut self.out);
        self.out = self.writer.write_all(out).await?;
        Ok(())
    }

    async fn recv_backend(&mut self) -> Result<Backend, SourceError> {
        loop {
            if let Some(m) = self.pending.pop_front() {
                return Ok(m);
            }
            match self.rx.recv().await {
                Some(Ok(batch)) => self.pending.extend(batch),
                Some(Err(e)) => return Err(e),
                None => return Err(SourceError::Closed),
            }
        }
    }

    /// Runs one replication command and returns its rows (text values).
    pub async fn query(&mut self, sql: &str) -> Result<Vec<Vec<Option<String>>>, SourceError> {
        let mut q = SimpleQuery::new(sql, &mut self.out);
        self.flush().await?;
        loop {
            let m = self.recv_backend().await?;
            match q.handle(m) {
                QueryStatus::Pending => {}
                QueryStatus::Done(rows) => return Ok(rows),
                QueryStatus::Failed(error) => {
                    return Err(SourceError::Server {
                        context: sql.to_owned(),
                        error: Box::new(error),
                    })
                }
                QueryStatus::CopyBoth => {
                    return Err(SourceError::Protocol(format!(
                        "{sql} unexpectedly started a copy"
                    )))
                }
            }
        }
    }

    /// `IDENTIFY_SYSTEM`.
    pub async fn identify_system(&mut self) -> Result<SystemIdentity, SourceError> {
        let rows = self.query("IDENTIFY_SYSTEM").await?;
        let bad = || SourceError::Protocol("IDENTIFY_SYSTEM returned an unexpected row".to_owned());
        let row = rows.first().filter(|r| r.len() >= 3).ok_or_else(bad)?;
        let field = |i: usize| row.get(i).cloned().flatten();
        Ok(SystemIdentity {
            system_id: field(0).ok_or_else(bad)?,
            timeline: field(1).and_then(|t| t.parse().ok()).ok_or_else(bad)?,
            xlogpos: field(2).and_then(|l| l.parse().ok()).ok_or_else(bad)?,
            dbname: field(3),
        })
    }

    /// `START_REPLICATION SLOT slot LOGICAL start (options…)`; on success
    /// the connection is in CopyBoth mode and [`Self::next`] yields messages.
    /// `start` may be `0/0`: the server then resumes from the slot.
    pub async fn start_logical(
        &mut self,
        slot: &str,
        start: Lsn,
        options: &[(&str, &str)],
    ) -> Result<(), SourceError> {
        let opts = options
            .iter()
            .map(|(k, v)| format!("\"{}\" '{}'", k.replace('"', "\"\""), v.replace('\'', "''")))
            .collect::<Vec<_>>()
            .join(", ");
        let sql = format!(
            "START_REPLICATION SLOT \"{}\" LOGICAL {start} ({opts})",
            slot.replace('"', "\"\"")
        );
        let mut q = SimpleQuery::new(&sql, &mut self.out);
        self.flush().await?;
        self.confirmed = start;
        loop {
            let m = self.recv_backend().await?;
            match q.handle(m) {
                QueryStatus::CopyBoth => {
                    self.next_status = Instant::now() + self.status_interval;
                    return Ok(());
                }
                QueryStatus::Pending => {}
                QueryStatus::Failed(error) => {
                    return Err(SourceError::Server {
                        context: format!("START_REPLICATION on slot \"{slot}\""),
                        error: Box::new(error),
                    })
                }
                QueryStatus::Done(_) => {
                    return Err(SourceError::Protocol(
                        "START_REPLICATION ended without streaming".into(),
                    ))
                }
            }
        }
    }

    /// `START_REPLICATION` with pgoutput protocol 1, the publication, and
    /// logical messages on where the server has them
    /// ([`Self::streams_messages`]; PostgreSQL 13's pgoutput refuses the
    /// option and streams table changes only): what `tail` and `relay`
    /// stream.
    pub async fn start_pgoutput(
        &mut self,
        slot: &str,
        start: Lsn,
        publication: &str,
    ) -> Result<(), SourceError> {
        let publications = format!("\"{}\"", publication.replace('"', "\"\""));
        let mut options = vec![
            ("proto_version", "1"),
            ("publication_names", publications.as_str()),
        ];
        if self.streams_messages() {
            options.push(("messages", "true"));
        } else {
            tracing::warn!(
                server_version = self.server_version().unwrap_or("?"),
                "this server's pgoutput streams no logical decoding messages (PostgreSQL 14 added them): \
                 facts emitted with pg_logical_emit_message or factlib.emit are not relayed from it, \
                 only outbox-table rows (factlib setup --outbox-table); upgrade to 14 or newer for message facts"
            );
        }
        self.start_logical(slot, start, &options).await
    }

    /// The next message from the stream. Sends standby status updates when
    /// due or asked for, while waiting.
    pub async fn next(&mut self) -> Result<ReplicationMessage, SourceError> {
        match self.next_inner(None).await? {
            Some(m) => Ok(m),
            None => Err(SourceError::Closed),
        }
    }

    /// Like [`Self::next`], but returns `Ok(None)` as soon as `stop` holds
    /// `true` while waiting for input. Safe to call again afterwards.
    pub async fn next_or_stop(
        &mut self,
        stop: &mut watch::Receiver<bool>,
    ) -> Result<Option<ReplicationMessage>, SourceError> {
        self.next_or(async {
            let _ = stop.wait_for(|v| *v).await;
        })
        .await
    }

    /// Like [`Self::next`], but returns `Ok(None)` when `interrupt`
    /// completes while waiting for input (a stop signal, an ack wake-up, a
    /// timer). Messages already received are returned first. The interrupt
    /// is only polled at points where giving up loses nothing: never in the
    /// middle of a write.
    pub async fn next_or<F: std::future::Future<Output = ()>>(
        &mut self,
        interrupt: F,
    ) -> Result<Option<ReplicationMessage>, SourceError> {
        self.next_inner(Some(std::pin::pin!(interrupt))).await
    }

    async fn next_inner<'f>(
        &mut self,
        mut interrupt: Option<Interrupt<'_, 'f>>,
    ) -> Result<Option<ReplicationMessage>, SourceError> {
        loop {
            if let Some(body) = self.run.next_body() {
                let body = self.run.bytes().slice(body);
                return Ok(Some(ReplicationMessage::parse(body)?));
            }
            match self
                .run_inner(interrupt.as_mut().map(|f| f.as_mut()))
                .await?
            {
                Some(run) => self.run = run,
                None => return Ok(None),
            }
        }
    }

    /// The rest of the current run of messages, or the next one: the
    /// zero-copy way to read the stream. The caller decodes each body with
    /// `ReplicationRef::parse`. Keepalives in the run have already raised
    /// [`Self::server_lsn`] and, when they asked for one, been answered.
    /// Returns `Ok(None)` when `interrupt` completes while waiting, as
    /// [`Self::next_or`] does.
    pub async fn next_run_or<F: std::future::Future<Output = ()>>(
        &mut self,
        interrupt: F,
    ) -> Result<Option<CopyRun>, SourceError> {
        if self.run.bodies().next().is_some() {
            return Ok(Some(std::mem::take(&mut self.run)));
        }
        self.run_inner(Some(std::pin::pin!(interrupt))).await
    }

    /// Waits for the next run of CopyData messages, handling everything
    /// else the server sends meanwhile.
    async fn run_inner<'f>(
        &mut self,
        mut interrupt: Option<Interrupt<'_, 'f>>,
    ) -> Result<Option<CopyRun>, SourceError> {
        loop {
            while let Some(m) = self.pending.pop_front() {
                match m {
                    Backend::CopyRun(run) => {
                        self.keepalives(&run).await?;
                        return Ok(Some(run));
                    }
                    // The reader frames with `parse_run`, which never
                    // returns a lone CopyData.
                    Backend::CopyData(_) => {
                        return Err(SourceError::Protocol(
                            "the reader handed over a lone CopyData instead of a run".into(),
                        ))
                    }
                    Backend::ErrorResponse(error) => {
                        return Err(SourceError::Server {
                            context: "replication stream".into(),
                            error: Box::new(error),
                        })
                    }
                    Backend::CopyDone => return Err(SourceError::Closed),
                    Backend::NoticeResponse(n) => {
                        tracing::warn!(notice = %n, "server notice on replication stream");
                    }
                    _ => {}
                }
            }
            if Instant::now() >= self.next_status {
                self.send_status(false).await?;
            }
            // Only cancel-safe futures below: an interrupt never cuts a write.
            let interrupted = async {
                match interrupt.as_mut() {
                    Some(f) => f.as_mut().await,
                    None => std::future::pending::<()>().await,
                }
            };
            tokio::select! {
                batch = self.rx.recv() => match batch {
                    Some(Ok(b)) => self.pending.extend(b),
                    Some(Err(e)) => return Err(e),
                    None => return Err(SourceError::Closed),
                },
                _ = tokio::time::sleep_until(self.next_status) => self.send_status(false).await?,
                _ = interrupted => return Ok(None),
            }
        }
    }

    /// Takes note of the keepalives in a run as it arrives: the server's
    /// end of WAL, and a reply at once when one is asked for. A malformed
    /// body is left for the caller's decode to report.
    async fn keepalives(&mut self, run: &CopyRun) -> Result<(), SourceError> {
        let mut reply = false;
        for body in run.bodies().filter(|b| b.first() == Some(&b'k')) {
            if let Ok(ReplicationRef::Keepalive(k)) = ReplicationRef::parse(body) {
                self.server_lsn = self.server_lsn.max(k.wal_end);
                reply |= k.reply_requested;
            }
        }
        if reply {
            self.send_status(false).await?;
        }
        Ok(())
    }

    /// Sends a standby status update if one is due. For callers that are
    /// busy elsewhere (e.g. waiting for ring space) and not calling `next`.
    pub async fn keep_alive(&mut self) -> Result<(), SourceError> {
        if Instant::now() >= self.next_status {
            self.send_status(false).await?;
        }
        Ok(())
    }

    /// The highest WAL position the server has reported (keepalives).
    pub fn server_lsn(&self) -> Lsn {
        self.server_lsn
    }

    /// Raises the confirmed (flush) position. Lower values are ignored: the
    /// position never moves backwards. Sent with the next status update.
    pub fn confirm(&mut self, lsn: Lsn) {
        if lsn > self.confirmed {
            self.confirmed = lsn;
        }
    }

    /// The confirmed position.
    pub fn confirmed(&self) -> Lsn {
        self.confirmed
    }

    /// Sends a standby status update now with flush = the confirmed position.
    pub async fn send_status(&mut self, reply_requested: bool) -> Result<(), SourceError> {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX))
            .unwrap_or(0);
        StandbyStatusUpdate {
            write: self.confirmed,
            flush: self.confirmed,
            apply: self.confirmed,
            client_clock: unix_to_pg_micros(now),
            reply_requested,
        }
        .encode(&mut self.out);
        self.flush().await?;
        self.next_status = Instant::now() + self.status_interval;
        Ok(())
    }

    /// Ends the stream cleanly: sends the final status update, waits (up to
    /// `wait`) until the server has processed it, then terminates and waits
    /// for the server to close the connection, so the slot is free when this
    /// returns.
    pub async fn shutdown(mut self, wait: Duration) -> Result<(), SourceError> {
        self.pending.clear();
        self.run = CopyRun::default();
        self.send_status(true).await?;
        let deadline = Instant::now() + wait;
        // The server answers a requested reply with a keepalive, after it has
        // applied our update. Data in between is beyond what we confirmed and
        // will be sent again next time.
        let acked = tokio::time::timeout_at(deadline, async {
            loop {
                match self.next().await? {
                    ReplicationMessage::Keepalive(_) => return Ok::<_, SourceError>(()),
                    ReplicationMessage::XLogData(_) => {}
                }
            }
        })
        .await;
        if let Ok(Err(e)) = acked {
            return Err(e);
        }
        postgres_protocol::message::frontend::copy_done(&mut self.out);
        postgres_protocol::message::frontend::terminate(&mut self.out);
        let _ = self.flush().await;
        self.writer.shutdown().await;
        let _ = tokio::time::timeout_at(deadline + Duration::from_secs(1), async {
            while let Some(Ok(_)) = self.rx.recv().await {}
        })
        .await;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// During a failover every server refuses for a while (the primary is
    /// gone, the standby still read-only): the relay must retry, not stop.
    /// A definite refusal from every server stops it.
    #[test]
    fn no_server_is_transient_exactly_when_a_refusal_is() {
        let read_only = SourceError::ReadOnly {
            server: "b:5432".into(),
        };
        assert!(read_only.is_transient());
        let during_failover = SourceError::NoHost {
            wanted: "read-write",
            tried: format!("a:5432: refused; {read_only}"),
            transient: true,
        };
        assert!(during_failover.is_transient());
        assert!(during_failover.to_string().contains("b:5432: read-only"));
        let all_definite = SourceError::NoHost {
            wanted: "any",
            tried: "a:5432: password authentication failed".into(),
            transient: false,
        };
        assert!(!all_definite.is_transient());
    }
}
