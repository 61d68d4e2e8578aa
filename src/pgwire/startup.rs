//! Sans-io connection startup, authentication and simple queries.
//!
//! ```text
//!  ssl_request ──► SSLRequest bytes ──► server ──► one byte ──► SslAnswer::parse ──► TLS or plain
//!  Startup::new ──► startup message bytes ──► server
//!  server ──► Backend ──► Startup::handle ──► (reply bytes) ... ──► Ready
//!  SimpleQuery::new(sql) ──► Query bytes; Backend ──► SimpleQuery::handle ──► rows
//! ```
//!
//! Authentication (cleartext, md5 and SCRAM-SHA-256) is done by
//! `postgres-protocol`'s `authentication` module; this file only drives it.
//!
//! **Invariants**
//! - No I/O: every method takes a decoded backend message and appends any
//!   reply to a caller-owned buffer.
//! - A password is only ever sent in the form the server asked for.

use bytes::BytesMut;
use fallible_iterator::FallibleIterator;
use postgres_protocol::authentication::{md5_hash, sasl};
use postgres_protocol::message::backend::Message;
use postgres_protocol::message::frontend;

use super::backend::{Backend, ServerError};
use super::DecodeError;

/// Appends an SSLRequest: the 8 bytes (length 8, code 80877103) that ask
/// the server, before the startup message, whether it will speak TLS.
pub(crate) fn ssl_request(out: &mut BytesMut) {
    frontend::ssl_request(out);
}

/// The server's one-byte answer to an SSLRequest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SslAnswer {
    /// `S`: the TLS handshake comes next.
    Tls,
    /// `N`: the server does not accept TLS; the session may go on in plain.
    Plain,
    /// `E`: the server answered with an error message instead (a server
    /// that could not start a backend, or one older than SSLRequest). Its
    /// text is not read: after an SSLRequest it may be unframed.
    Error,
}

impl SslAnswer {
    /// Decodes the answer byte; anything else is a protocol violation.
    pub(crate) fn parse(byte: u8) -> Result<SslAnswer, DecodeError> {
        match byte {
            b'S' => Ok(SslAnswer::Tls),
            b'N' => Ok(SslAnswer::Plain),
            b'E' => Ok(SslAnswer::Error),
            tag => Err(DecodeError::UnknownTag {
                context: "SSLRequest answer",
                tag,
            }),
        }
    }
}

/// What to start the connection with.
#[derive(Debug, Clone)]
pub struct StartupParams {
    /// Role name.
    pub user: String,
    /// Password, if the server asks for one.
    pub password: Option<String>,
    /// Database name.
    pub database: String,
    /// Shown in `pg_stat_activity` and `pg_stat_replication`.
    pub application_name: String,
    /// Start a logical-replication walsender (`replication=database`).
    pub replication: bool,
}

/// Why startup failed.
///
/// Definite, except a [`StartupError::Server`] whose SQLSTATE says the
/// server is starting, shutting down or out of connections:
/// `source::SourceError::is_transient` reads the SQLSTATE.
#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    /// The server refused us (bad password, unknown role, no pg_hba entry…).
    #[error("server rejected the connection: {0}")]
    Server(Box<ServerError>),
    /// The server wants a password and none was given.
    #[error("the server asks for a password for role {user:?}, but none was given; put it in the database URL (postgresql://user:PASSWORD@host/db) or in PGPASSWORD")]
    PasswordRequired {
        /// The role.
        user: String,
    },
    /// An authentication method we do not implement.
    #[error("the server asks for authentication method {0}, which factlib does not support; use scram-sha-256, md5, password or trust in pg_hba.conf")]
    UnsupportedAuth(&'static str),
    /// SCRAM exchange failed (e.g. the server's proof did not verify).
    #[error("SCRAM-SHA-256 authentication failed: {0}")]
    Scram(std::io::Error),
    /// A message that makes no sense at this point.
    #[error("protocol violation during startup: unexpected {0}")]
    Unexpected(&'static str),
}

/// The connection is authenticated and idle.
#[derive(Debug, Clone, Default)]
pub struct Ready {
    /// The backend's process id (for `pg_stat_replication` and errors).
    pub backend_pid: i32,
    /// `server_version` as reported by ParameterStatus.
    pub server_version: Option<String>,
}

impl Ready {
    /// The server's major version, from `server_version`.
    pub fn server_major(&self) -> Option<u32> {
        self.server_version.as_deref().and_then(server_major)
    }
}

/// The major version a `server_version` string starts with: `13.23`,
/// `17.2 (Debian 17.2-1.pgdg120+1)` and `16beta1` give 13, 17 and 16;
/// anything that does not start with digits gives `None`.
pub fn server_major(version: &str) -> Option<u32> {
    let end = version
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(version.len());
    version[..end].parse().ok()
}

enum State {
    Authenticating,
    Sasl(Box<sasl::ScramSha256>),
    Authenticated,
}

/// Drives the startup and authentication exchange.
pub struct Startup {
    params: StartupParams,
    state: State,
    ready: Ready,
}

impl std::fmt::Debug for Startup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let state = match self.state {
            State::Authenticating => "authenticating",
            State::Sasl(_) => "sasl",
            State::Authenticated => "authenticated",
        };
        f.debug_struct("Startup")
            .field("user", &self.params.user)
            .field("state", &state)
            .finish()
    }
}

impl Startup {
    /// Starts the exchange; appends the startup message to `out`.
    pub fn new(params: StartupParams, out: &mut BytesMut) -> Startup {
        let mut kv: Vec<(&str, &str)> = vec![
            ("user", &params.user),
            ("database", &params.database),
            ("application_name", &params.application_name),
            ("client_encoding", "UTF8"),
        ];
        if params.replication {
            kv.push(("replication", "database"));
            // Row values of outbox tables arrive in text format, written by
            // the walsender with these settings: fix them, so that
            // `outbox` parses one form whatever the server's defaults.
            kv.extend([
                ("DateStyle", "ISO, YMD"),
                ("TimeZone", "UTC"),
                ("bytea_output", "hex"),
            ]);
        }
        // Only fails on a NUL inside a parameter, which config rejects.
        if frontend::startup_message(kv.iter().copied(), out).is_err() {
            out.clear();
        }
        Startup {
            params,
            state: State::Authenticating,
            ready: Ready::default(),
        }
    }

    fn password(&self) -> Result<&str, StartupError> {
        self.params
            .password
            .as_deref()
            .ok_or_else(|| StartupError::PasswordRequired {
                user: self.params.user.clone(),
            })
    }

    /// Feeds one backend message; appends any reply to `out`. Returns
    /// `Some(Ready)` once the server is ready for queries.
    pub fn handle(
        &mut self,
        msg: Backend,
        out: &mut BytesMut,
    ) -> Result<Option<Ready>, StartupError> {
        let msg = match msg {
            Backend::ErrorResponse(e) => return Err(StartupError::Server(Box::new(e))),
            Backend::NoticeResponse(_) => return Ok(None),
            Backend::Other(m) => m,
            _ => return Err(StartupError::Unexpected("copy message")),
        };
        match (&mut self.state, msg) {
            (State::Authenticating, Message::AuthenticationOk) => {
                self.state = State::Authenticated;
            }
            (State::Authenticating, Message::AuthenticationCleartextPassword) => {
                let pw = self.password()?.to_owned();
                frontend::password_message(pw.as_bytes(), out).map_err(StartupError::Scram)?;
            }
            (State::Authenticating, Message::AuthenticationMd5Password(body)) => {
                let pw = self.password()?;
                let hash = md5_hash(self.params.user.as_bytes(), pw.as_bytes(), body.salt());
                frontend::password_message(hash.as_bytes(), out).map_err(StartupError::Scram)?;
            }
            (State::Authenticating, Message::AuthenticationSasl(body)) => {
                let mut has_scram = false;
                let mut mechs = body.mechanisms();
                while let Some(m) = mechs.next().map_err(StartupError::Scram)? {
                    has_scram |= m == sasl::SCRAM_SHA_256;
                }
                if !has_scram {
                    return Err(StartupError::UnsupportedAuth("SASL without SCRAM-SHA-256"));
                }
                let pw = self.password()?;
                let scram =
                    sasl::ScramSha256::new(pw.as_bytes(), sasl::ChannelBinding::unsupported());
                frontend::sasl_initial_response(sasl::SCRAM_SHA_256, scram.message(), out)
                    .map_err(StartupError::Scram)?;
                self.state = State::Sasl(Box::new(scram));
            }
            (State::Sasl(scram), Message::AuthenticationSaslContinue(body)) => {
                scram.update(body.data()).map_err(StartupError::Scram)?;
                frontend::sasl_response(scram.message(), out).map_err(StartupError::Scram)?;
            }
            (State::Sasl(scram), Message::AuthenticationSaslFinal(body)) => {
                scram.finish(body.data()).map_err(StartupError::Scram)?;
            }
            (State::Sasl(_), Message::AuthenticationOk) => {
                self.state = State::Authenticated;
            }
            (_, Message::AuthenticationKerberosV5) => {
                return Err(StartupError::UnsupportedAuth("Kerberos V5"))
            }
            (_, Message::AuthenticationScmCredential) => {
                return Err(StartupError::UnsupportedAuth("SCM credentials"))
            }
            (_, Message::AuthenticationGss) | (_, Message::AuthenticationGssContinue(_)) => {
                return Err(StartupError::UnsupportedAuth("GSSAPI"))
            }
            (_, Message::AuthenticationSspi) => return Err(StartupError::UnsupportedAuth("SSPI")),
            (State::Authenticated, Message::ParameterStatus(p)) => {
                if let (Ok("server_version"), Ok(v)) = (p.name(), p.value()) {
                    self.ready.server_version = Some(v.to_owned());
                }
            }
            (State::Authenticated, Message::BackendKeyData(k)) => {
                self.ready.backend_pid = k.process_id();
            }
            (State::Authenticated, Message::ReadyForQuery(_)) => {
                return Ok(Some(self.ready.clone()));
            }
            _ => return Err(StartupError::Unexpected("message during authentication")),
        }
        Ok(None)
    }
}

/// Collects the text rows of one simple query.
#[derive(Debug, Default)]
pub struct SimpleQuery {
    rows: Vec<Vec<Option<String>>>,
    error: Option<ServerError>,
}

/// Progress of a simple query.
#[derive(Debug)]
pub enum QueryStatus {
    /// More messages are expected.
    Pending,
    /// The server is ready again; here are the rows.
    Done(Vec<Vec<Option<String>>>),
    /// The server answered `START_REPLICATION` with CopyBoth.
    CopyBoth,
    /// The query failed.
    Failed(ServerError),
}

impl SimpleQuery {
    /// Appends a Query message for `sql` to `out`.
    pub fn new(sql: &str, out: &mut BytesMut) -> SimpleQuery {
        if frontend::query(sql, out).is_err() {
            out.clear();
        }
        SimpleQuery::default()
    }

    /// Feeds one backend message.
    pub fn handle(&mut self, msg: Backend) -> QueryStatus {
        match msg {
            Backend::ErrorResponse(e) => {
                self.error = Some(e);
                QueryStatus::Pending
            }
            Backend::CopyBothResponse => QueryStatus::CopyBoth,
            Backend::Other(Message::DataRow(row)) => {
                let buf = row.buffer();
                let mut ranges = row.ranges();
                let mut vals = Vec::new();
                while let Ok(Some(r)) = ranges.next() {
                    vals.push(
                        r.and_then(|r| buf.get(r))
                            .map(|b| String::from_utf8_lossy(b).into_owned()),
                    );
                }
                self.rows.push(vals);
                QueryStatus::Pending
            }
            Backend::Other(Message::ReadyForQuery(_)) => match self.error.take() {
                Some(e) => QueryStatus::Failed(e),
                None => QueryStatus::Done(std::mem::take(&mut self.rows)),
            },
            _ => QueryStatus::Pending,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pgwire::backend::{parse, DEFAULT_MAX_FRAME};

    fn backend(tag: u8, body: &[u8]) -> Backend {
        let mut v = vec![tag];
        v.extend_from_slice(&(i32::try_from(body.len()).unwrap() + 4).to_be_bytes());
        v.extend_from_slice(body);
        parse(&mut BytesMut::from(&v[..]), DEFAULT_MAX_FRAME)
            .unwrap()
            .unwrap()
    }

    fn params(pw: Option<&str>) -> StartupParams {
        StartupParams {
            user: "u".into(),
            password: pw.map(Into::into),
            database: "d".into(),
            application_name: "t".into(),
            replication: true,
        }
    }

    #[test]
    fn ssl_request_is_the_eight_byte_code() {
        let mut out = BytesMut::new();
        ssl_request(&mut out);
        assert_eq!(&out[..], &[0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f]);
        assert_eq!(i32::from_be_bytes([0x04, 0xd2, 0x16, 0x2f]), 80_877_103);
    }

    #[test]
    fn ssl_answers_decode_and_others_are_errors() {
        assert_eq!(SslAnswer::parse(b'S'), Ok(SslAnswer::Tls));
        assert_eq!(SslAnswer::parse(b'N'), Ok(SslAnswer::Plain));
        assert_eq!(SslAnswer::parse(b'E'), Ok(SslAnswer::Error));
        for b in [0u8, b'R', 0x16, 0xff] {
            assert!(matches!(
                SslAnswer::parse(b),
                Err(DecodeError::UnknownTag { tag, .. }) if tag == b
            ));
        }
    }

    #[test]
    fn startup_message_asks_for_replication() {
        let mut out = BytesMut::new();
        Startup::new(params(None), &mut out);
        let s = String::from_utf8_lossy(&out);
        assert!(s.contains("replication\0database\0"), "{s:?}");
        assert!(s.contains("user\0u\0"));
    }

    #[test]
    fn md5_reply_uses_library_hash() {
        let mut out = BytesMut::new();
        let mut st = Startup::new(params(Some("pw")), &mut out);
        out.clear();
        let r = st
            .handle(backend(b'R', &[0, 0, 0, 5, 1, 2, 3, 4]), &mut out)
            .unwrap();
        assert!(r.is_none());
        let expected = md5_hash(b"u", b"pw", [1, 2, 3, 4]);
        assert_eq!(out[0], b'p');
        assert_eq!(&out[5..out.len() - 1], expected.as_bytes());
    }

    #[test]
    fn password_required_is_clear() {
        let mut out = BytesMut::new();
        let mut st = Startup::new(params(None), &mut out);
        let err = st
            .handle(backend(b'R', &[0, 0, 0, 3]), &mut out)
            .unwrap_err();
        assert!(err.to_string().contains("PGPASSWORD"), "{err}");
    }

    #[test]
    fn reaches_ready_after_ok() {
        let mut out = BytesMut::new();
        let mut st = Startup::new(params(None), &mut out);
        assert!(st
            .handle(backend(b'R', &[0, 0, 0, 0]), &mut out)
            .unwrap()
            .is_none());
        assert!(st
            .handle(backend(b'S', b"server_version\x0015.4\0"), &mut out)
            .unwrap()
            .is_none());
        assert!(st
            .handle(backend(b'K', &[0, 0, 0, 42, 0, 0, 0, 1]), &mut out)
            .unwrap()
            .is_none());
        let ready = st.handle(backend(b'Z', b"I"), &mut out).unwrap().unwrap();
        assert_eq!(ready.backend_pid, 42);
        assert_eq!(ready.server_version.as_deref(), Some("15.4"));
        assert_eq!(ready.server_major(), Some(15));
    }

    #[test]
    fn server_error_is_surfaced() {
        let mut out = BytesMut::new();
        let mut st = Startup::new(params(Some("x")), &mut out);
        let err = st
            .handle(
                backend(
                    b'E',
                    b"VFATAL\0C28P01\0Mpassword authentication failed for user \"u\"\0\0",
                ),
                &mut out,
            )
            .unwrap_err();
        assert!(matches!(err, StartupError::Server(ref e) if e.code == "28P01"));
    }

    #[test]
    fn simple_query_collects_rows() {
        let mut out = BytesMut::new();
        let mut q = SimpleQuery::new("IDENTIFY_SYSTEM", &mut out);
        assert_eq!(out[0], b'Q');
        // DataRow: 2 columns, "ab" and NULL.
        let row = [0, 2, 0, 0, 0, 2, b'a', b'b', 0xff, 0xff, 0xff, 0xff];
        assert!(matches!(
            q.handle(backend(b'D', &row)),
            QueryStatus::Pending
        ));
        assert!(matches!(
            q.handle(backend(b'C', b"IDENTIFY_SYSTEM\0")),
            QueryStatus::Pending
        ));
        match q.handle(backend(b'Z', b"I")) {
            QueryStatus::Done(rows) => assert_eq!(rows, vec![vec![Some("ab".to_owned()), None]]),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn the_major_version_is_the_leading_number_of_server_version() {
        for (v, major) in [
            ("13.23", Some(13)),
            ("14.25", Some(14)),
            ("17.2 (Debian 17.2-1.pgdg120+1)", Some(17)),
            ("16beta1", Some(16)),
            ("9.6.24", Some(9)),
            ("", None),
            ("beta", None),
            ("99999999999999999999", None),
        ] {
            assert_eq!(server_major(v), major, "{v:?}");
        }
    }
}
