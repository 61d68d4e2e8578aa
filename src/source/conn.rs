//! Where a connection to PostgreSQL goes and how it is secured: the parts
//! of a libpq connection string (URL or `key=value` form) that the
//! replication client and the SQL sessions use, including libpq's TLS keys
//! (`sslmode`, `sslrootcert`, `sslcert`, `sslkey`) and `hostaddr`.
//!
//! ```text
//!  "postgresql://…?sslmode=…&…"  ──split_ssl──► ssl* keys ──► TlsSettings (+ PGSSL* env)
//!  "host=… sslmode=… …"                          rest ──► tokio_postgres::Config ──► host, port, user…
//! ```
//!
//! `tokio_postgres::Config` rejects `verify-ca`, `verify-full` and the
//! certificate keys, so they are taken out of the string here, in both
//! forms, before the rest is handed to it.
//!
//! **Invariants**
//! - A parsed [`ConnectionConfig`] always names at least one TCP host (a
//!   multi-host string gives one [`Endpoint`] per TCP host, in order,
//!   paired with its `hostaddr` and port as libpq pairs them) and a user; the
//!   database defaults to the user, and the password to `PGPASSWORD`, as
//!   with libpq. `sslmode` defaults to `prefer`, as with libpq, and each
//!   `ssl*` key falls back to its `PGSSL*` environment variable.
//! - A string that does not parse is a [`UrlError`] that carries the
//!   parser's reason, not only "invalid connection string".
//! - No `Debug` or `Display` here prints the password, and no error quotes
//!   the connection string.

use std::fmt;
use std::net::IpAddr;
use std::path::PathBuf;

/// A connection string that cannot be used. Definite.
#[derive(Debug, thiserror::Error)]
pub enum UrlError {
    /// The string does not parse.
    #[error("invalid --database-url: {reason}; expected e.g. postgresql://user:password@127.0.0.1:5432/dbname")]
    Parse {
        /// The parser's message with its causes.
        reason: String,
    },
    /// The string names no TCP host.
    #[error("--database-url names no TCP host; the replication client needs host and port (e.g. 127.0.0.1:5432)")]
    NoTcpHost,
    /// The string names no user.
    #[error("--database-url names no user")]
    NoUser,
    /// An `sslmode` libpq does not have, or one factlib does not offer.
    #[error("invalid sslmode {value:?} in --database-url or PGSSLMODE; use disable, prefer, require, verify-ca or verify-full")]
    SslMode {
        /// The value given.
        value: String,
    },
    /// A client certificate without its key, or a key without its
    /// certificate.
    #[error("--database-url (or PGSSLCERT/PGSSLKEY) gives {given} but not {missing}; a client certificate needs both sslcert and sslkey")]
    ClientCertHalf {
        /// The key that was given.
        given: &'static str,
        /// The key that is missing.
        missing: &'static str,
    },
}

/// libpq's `sslmode`: whether to use TLS, and what to check.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SslMode {
    /// Plain TCP; never ask for TLS.
    Disable,
    /// Ask for TLS; go on in plain if the server does not offer it. The
    /// certificate is not checked.
    #[default]
    Prefer,
    /// TLS or nothing. The certificate is not checked, unless
    /// `sslrootcert` is given: then it is checked as with `VerifyCa`.
    Require,
    /// TLS, and the server's certificate must chain to a trusted root; its
    /// host name is not checked.
    VerifyCa,
    /// TLS, the certificate must chain to a trusted root and name the host.
    VerifyFull,
}

impl SslMode {
    fn parse(value: &str) -> Result<SslMode, UrlError> {
        Ok(match value {
            "disable" => SslMode::Disable,
            "prefer" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            _ => {
                return Err(UrlError::SslMode {
                    value: value.to_owned(),
                })
            }
        })
    }

    /// The libpq spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            SslMode::Disable => "disable",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        }
    }
}

impl fmt::Display for SslMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What the server's certificate is checked against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verify {
    /// Nothing: any certificate is accepted (the handshake's signatures
    /// are still verified, so the session is encrypted to whoever answered).
    Nothing,
    /// The chain to a trusted root, not the name.
    Chain,
    /// The chain and the host name.
    ChainAndName,
}

/// A client certificate and its private key (PEM files).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientCert {
    /// `sslcert`: the certificate chain.
    pub cert: PathBuf,
    /// `sslkey`: the private key. Only its path is ever printed.
    pub key: PathBuf,
}

/// How to secure the connection (libpq's `ssl*` keys).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TlsSettings {
    /// `sslmode`.
    pub mode: SslMode,
    /// `sslrootcert`: the CA certificates (PEM) to trust. Without it,
    /// `verify-ca` and `verify-full` trust the system's roots.
    pub root_cert: Option<PathBuf>,
    /// `sslcert` and `sslkey`.
    pub client_cert: Option<ClientCert>,
}

impl TlsSettings {
    /// What the certificate is checked against, in libpq's terms:
    /// `require` with a `sslrootcert` behaves like `verify-ca`. `prefer`
    /// never checks: libpq falls back to plain when a check fails, so a
    /// check would protect nothing.
    pub(crate) fn verify(&self) -> Verify {
        match self.mode {
            SslMode::Disable | SslMode::Prefer => Verify::Nothing,
            SslMode::Require if self.root_cert.is_none() => Verify::Nothing,
            SslMode::Require | SslMode::VerifyCa => Verify::Chain,
            SslMode::VerifyFull => Verify::ChainAndName,
        }
    }

    /// The `ssl*` keys taken out of a connection string, with the `PGSSL*`
    /// environment variables (through `env`) for those not given.
    fn from_keys(
        keys: &[(String, String)],
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<TlsSettings, UrlError> {
        let get = |key: &str, var: &str| {
            keys.iter()
                .rev()
                .find(|(k, _)| k == key)
                .map(|(_, v)| v.clone())
                .or_else(|| env(var))
                .filter(|v| !v.is_empty())
        };
        let mode = match get("sslmode", "PGSSLMODE") {
            Some(m) => SslMode::parse(&m)?,
            None => SslMode::default(),
        };
        let root_cert = get("sslrootcert", "PGSSLROOTCERT").map(PathBuf::from);
        let client_cert = match (get("sslcert", "PGSSLCERT"), get("sslkey", "PGSSLKEY")) {
            (Some(cert), Some(key)) => Some(ClientCert {
                cert: cert.into(),
                key: key.into(),
            }),
            (None, None) => None,
            (Some(_), None) => {
                return Err(UrlError::ClientCertHalf {
                    given: "sslcert",
                    missing: "sslkey",
                })
            }
            (None, Some(_)) => {
                return Err(UrlError::ClientCertHalf {
                    given: "sslkey",
                    missing: "sslcert",
                })
            }
        };
        Ok(TlsSettings {
            mode,
            root_cert,
            client_cert,
        })
    }
}

/// One server a connection string names: libpq's `host`, `hostaddr` and
/// `port`, one of each per server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// TCP host; also the name the server's certificate must carry under
    /// `sslmode=verify-full`.
    pub host: String,
    /// `hostaddr`: connect to this address instead of resolving `host`.
    pub hostaddr: Option<IpAddr>,
    /// TCP port.
    pub port: u16,
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.hostaddr {
            Some(a) => write!(f, "{}:{} (hostaddr {a})", self.host, self.port),
            None => write!(f, "{}:{}", self.host, self.port),
        }
    }
}

/// libpq's `target_session_attrs`: which of the listed servers will do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SessionAttrs {
    /// The first server that accepts the connection.
    #[default]
    Any,
    /// The first server whose sessions may write (`SHOW
    /// transaction_read_only` is `off`): the primary, never a hot standby.
    /// With every server of a primary/standby pair listed, a client follows
    /// a failover to the promoted standby.
    ReadWrite,
}

impl SessionAttrs {
    /// The libpq spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            SessionAttrs::Any => "any",
            SessionAttrs::ReadWrite => "read-write",
        }
    }
}

/// Where and how to connect, as parsed from the connection string.
///
/// `Debug` shows whether a password is set, never the password.
#[derive(Clone, PartialEq, Eq)]
pub struct ConnectionConfig {
    /// The servers, in the order they are tried; never empty.
    pub hosts: Vec<Endpoint>,
    /// Which of them will do.
    pub target_session_attrs: SessionAttrs,
    /// Role.
    pub user: String,
    /// Password, from the string or `PGPASSWORD`.
    pub password: Option<String>,
    /// Database name (defaults to the user name, like libpq).
    pub dbname: String,
    /// TLS.
    pub tls: TlsSettings,
}

impl fmt::Debug for ConnectionConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConnectionConfig")
            .field("hosts", &self.hosts)
            .field("target_session_attrs", &self.target_session_attrs)
            .field("user", &self.user)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("dbname", &self.dbname)
            .field("tls", &self.tls)
            .finish()
    }
}

impl ConnectionConfig {
    /// Parses a libpq URL or key/value string, with libpq's environment
    /// fallbacks (`PGPASSWORD`, `PGSSLMODE`, `PGSSLROOTCERT`, `PGSSLCERT`,
    /// `PGSSLKEY`).
    pub fn from_url(url: &str) -> Result<Self, UrlError> {
        Self::from_url_env(url, &|k| std::env::var(k).ok())
    }

    /// [`Self::from_url`] with the environment read through `env`.
    pub(crate) fn from_url_env(
        url: &str,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Self, UrlError> {
        let (cfg, tls) = sql_config_env(url, env)?;
        let hosts = endpoints(&cfg)?;
        let target_session_attrs = match cfg.get_target_session_attrs() {
            tokio_postgres::config::TargetSessionAttrs::ReadWrite => SessionAttrs::ReadWrite,
            _ => SessionAttrs::Any,
        };
        let user = cfg.get_user().ok_or(UrlError::NoUser)?.to_owned();
        let password = cfg
            .get_password()
            .map(|p| String::from_utf8_lossy(p).into_owned());
        let dbname = cfg.get_dbname().unwrap_or(&user).to_owned();
        Ok(ConnectionConfig {
            hosts,
            target_session_attrs,
            user,
            password,
            dbname,
            tls,
        })
    }
}

impl ConnectionConfig {
    /// The same settings with `endpoint` as the only server, of any kind:
    /// for looking at each server of a multi-host string in turn.
    pub(crate) fn only(&self, endpoint: &Endpoint) -> ConnectionConfig {
        ConnectionConfig {
            hosts: vec![endpoint.clone()],
            target_session_attrs: SessionAttrs::Any,
            ..self.clone()
        }
    }
}

/// The TCP servers of a parsed string, paired up as libpq pairs them: the
/// i-th `host` with the i-th `hostaddr` and the i-th `port` (one port
/// serves every host; none means 5432). Unix-socket hosts are left out:
/// the replication client speaks TCP only.
fn endpoints(cfg: &tokio_postgres::Config) -> Result<Vec<Endpoint>, UrlError> {
    let (hosts, addrs, ports) = (cfg.get_hosts(), cfg.get_hostaddrs(), cfg.get_ports());
    let port_of = |i: usize| match ports {
        [] => 5432,
        [one] => *one,
        many => many.get(i).copied().unwrap_or(5432),
    };
    let found: Vec<Endpoint> = (0..hosts.len().max(addrs.len()))
        .filter_map(|i| {
            let hostaddr = addrs.get(i).copied();
            let host = match hosts.get(i) {
                Some(tokio_postgres::config::Host::Tcp(h)) => h.clone(),
                None => hostaddr?.to_string(),
                #[allow(unreachable_patterns)]
                Some(_) => return None,
            };
            Some(Endpoint {
                host,
                hostaddr,
                port: port_of(i),
            })
        })
        .collect();
    if found.is_empty() {
        return Err(UrlError::NoTcpHost);
    }
    Ok(found)
}

/// Parses a connection string for a SQL session: the `tokio_postgres`
/// configuration (its `sslmode` set to what [`TlsSettings::mode`] needs of
/// it, the password defaulting to `PGPASSWORD`) and the TLS settings.
pub(crate) fn sql_config(url: &str) -> Result<(tokio_postgres::Config, TlsSettings), UrlError> {
    sql_config_env(url, &|k| std::env::var(k).ok())
}

fn sql_config_env(
    url: &str,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<(tokio_postgres::Config, TlsSettings), UrlError> {
    let (rest, keys) = split_ssl(url)?;
    let tls = TlsSettings::from_keys(&keys, env)?;
    let mut cfg: tokio_postgres::Config = rest.parse().map_err(|e| UrlError::Parse {
        reason: error_chain(&e),
    })?;
    if !matches!(
        cfg.get_target_session_attrs(),
        tokio_postgres::config::TargetSessionAttrs::Any
            | tokio_postgres::config::TargetSessionAttrs::ReadWrite
    ) {
        // Only the modes the replication client implements (and tests).
        return Err(UrlError::Parse {
            reason: "target_session_attrs must be any or read-write".into(),
        });
    }
    if cfg.get_password().is_none() {
        if let Some(p) = env("PGPASSWORD") {
            cfg.password(p);
        }
    }
    // libpq ignores sslmode on Unix-domain sockets, which never carry TLS.
    let only_unix_sockets = cfg.get_hostaddrs().is_empty()
        && !cfg.get_hosts().is_empty()
        && !cfg
            .get_hosts()
            .iter()
            .any(|h| matches!(h, tokio_postgres::config::Host::Tcp(_)));
    cfg.ssl_mode(match tls.mode {
        _ if only_unix_sockets => tokio_postgres::config::SslMode::Disable,
        SslMode::Disable => tokio_postgres::config::SslMode::Disable,
        SslMode::Prefer => tokio_postgres::config::SslMode::Prefer,
        SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull => {
            tokio_postgres::config::SslMode::Require
        }
    });
    Ok((cfg, tls))
}

/// The keys taken out of a connection string for [`TlsSettings`].
const SSL_KEYS: [&str; 4] = ["sslmode", "sslrootcert", "sslcert", "sslkey"];

/// Splits a connection string into the rest (same form, for
/// `tokio_postgres`) and the [`SSL_KEYS`] it holds, decoded.
fn split_ssl(url: &str) -> Result<(String, Vec<(String, String)>), UrlError> {
    if url.starts_with("postgresql://") || url.starts_with("postgres://") {
        split_ssl_url(url)
    } else {
        split_ssl_key_values(url)
    }
}

/// URL form: the `ssl*` query parameters are removed, the others kept
/// verbatim.
fn split_ssl_url(url: &str) -> Result<(String, Vec<(String, String)>), UrlError> {
    let Some((base, query)) = url.split_once('?') else {
        return Ok((url.to_owned(), Vec::new()));
    };
    let mut kept = Vec::new();
    let mut taken = Vec::new();
    for param in query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = param.split_once('=').unwrap_or((param, ""));
        let key = percent_decode(k)?;
        if SSL_KEYS.contains(&key.as_str()) {
            taken.push((key, percent_decode(v)?));
        } else {
            kept.push(param);
        }
    }
    let rest = if kept.is_empty() {
        base.to_owned()
    } else {
        format!("{base}?{}", kept.join("&"))
    };
    Ok((rest, taken))
}

fn percent_decode(s: &str) -> Result<String, UrlError> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while let Some(&b) = bytes.get(i) {
        if b == b'%' {
            let hex = bytes
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| UrlError::Parse {
                    reason: "a query parameter has an invalid percent-encoding".into(),
                })?;
            out.push(hex);
            i += 3;
        } else {
            out.push(b);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| UrlError::Parse {
        reason: "a query parameter is not UTF-8 once percent-decoded".into(),
    })
}

/// Key/value form, tokenized as libpq does (`key = value`, values quoted
/// with `'…'`, backslash escapes); the rest is rebuilt with every value
/// quoted.
fn split_ssl_key_values(s: &str) -> Result<(String, Vec<(String, String)>), UrlError> {
    let parse_err = |reason: &str| UrlError::Parse {
        reason: reason.to_owned(),
    };
    let mut chars = s.chars().peekable();
    let mut kept = Vec::new();
    let mut taken = Vec::new();
    loop {
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        if chars.peek().is_none() {
            break;
        }
        let mut key = String::new();
        while let Some(c) = chars.next_if(|c| !c.is_whitespace() && *c != '=') {
            key.push(c);
        }
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        if chars.next() != Some('=') {
            // The word is not quoted: it may be a misplaced password.
            return Err(parse_err(
                "a word without \"=\" (expected key=value pairs separated by spaces)",
            ));
        }
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        let mut value = String::new();
        if chars.next_if_eq(&'\'').is_some() {
            loop {
                match chars.next() {
                    Some('\'') => break,
                    Some('\\') => value.push(
                        chars
                            .next()
                            .ok_or_else(|| parse_err("unterminated quoted value"))?,
                    ),
                    Some(c) => value.push(c),
                    None => return Err(parse_err("unterminated quoted value")),
                }
            }
        } else {
            while let Some(c) = chars.next_if(|c| !c.is_whitespace()) {
                if c == '\\' {
                    if let Some(escaped) = chars.next() {
                        value.push(escaped);
                    }
                } else {
                    value.push(c);
                }
            }
        }
        if SSL_KEYS.contains(&key.as_str()) {
            taken.push((key, value));
        } else {
            let quoted = value.replace('\\', "\\\\").replace('\'', "\\'");
            kept.push(format!("{key}='{quoted}'"));
        }
    }
    Ok((kept.join(" "), taken))
}

/// An error's message followed by each of its causes, `: `-separated.
pub(crate) fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(inner) = src {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        src = inner.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn no_env(_: &str) -> Option<String> {
        None
    }

    fn parse(url: &str) -> ConnectionConfig {
        ConnectionConfig::from_url_env(url, &no_env).unwrap()
    }

    #[test]
    fn parses_urls() {
        let c = parse("postgresql://u:p@127.0.0.1:5433/db");
        assert_eq!(
            (
                c.hosts[0].host.as_str(),
                c.hosts[0].port,
                c.user.as_str(),
                c.password.as_deref(),
                c.dbname.as_str()
            ),
            ("127.0.0.1", 5433, "u", Some("p"), "db")
        );
        let c = parse("host=localhost user=x");
        assert_eq!((c.hosts[0].port, c.dbname.as_str()), (5432, "x"));
        assert_eq!(c.hosts.len(), 1);
        assert_eq!(c.target_session_attrs, SessionAttrs::Any);
        assert!(matches!(
            ConnectionConfig::from_url_env("postgresql://127.0.0.1/db", &no_env),
            Err(UrlError::NoUser)
        ));
        assert!(ConnectionConfig::from_url_env("not a url ===", &no_env).is_err());
    }

    /// The bug: the relay printed only "invalid connection string".
    #[test]
    fn a_bad_url_says_why() {
        let e = ConnectionConfig::from_url_env("postgresql://u@127.0.0.1:notaport/db", &no_env)
            .unwrap_err();
        let text = e.to_string();
        assert!(text.contains("invalid connection string"), "{text}");
        assert!(text.contains("port"), "the cause is kept: {text}");
    }

    #[test]
    fn sslmode_defaults_to_prefer_without_checks() {
        let c = parse("postgresql://u@h/db");
        assert_eq!(c.tls, TlsSettings::default());
        assert_eq!(c.tls.mode, SslMode::Prefer);
        assert_eq!(c.tls.verify(), Verify::Nothing);
    }

    #[test]
    fn ssl_keys_in_a_url_query() {
        let c = parse(
            "postgresql://u:p@db.example:5433/d?sslmode=verify-full&sslrootcert=/etc/ca%20dir/ca.crt\
             &application_name=x&sslcert=/c.crt&sslkey=/c.key",
        );
        assert_eq!(
            (c.hosts[0].host.as_str(), c.hosts[0].port, c.dbname.as_str()),
            ("db.example", 5433, "d")
        );
        assert_eq!(c.tls.mode, SslMode::VerifyFull);
        assert_eq!(c.tls.root_cert, Some(PathBuf::from("/etc/ca dir/ca.crt")));
        assert_eq!(
            c.tls.client_cert,
            Some(ClientCert {
                cert: "/c.crt".into(),
                key: "/c.key".into()
            })
        );
        assert_eq!(c.tls.verify(), Verify::ChainAndName);
    }

    #[test]
    fn ssl_keys_in_key_value_form() {
        let c = parse(
            "host=wrong.example hostaddr=127.0.0.1 port=54329 user=factlib password='a b\\'c' \
             dbname=factlib sslmode = verify-ca sslrootcert='/tmp/my ca.crt'",
        );
        assert_eq!(c.hosts[0].host, "wrong.example");
        assert_eq!(c.hosts[0].hostaddr, Some("127.0.0.1".parse().unwrap()));
        assert_eq!(c.hosts[0].port, 54329);
        assert_eq!(c.password.as_deref(), Some("a b'c"));
        assert_eq!(c.tls.mode, SslMode::VerifyCa);
        assert_eq!(c.tls.root_cert, Some(PathBuf::from("/tmp/my ca.crt")));
        assert_eq!(c.tls.verify(), Verify::Chain);
    }

    #[test]
    fn hostaddr_in_a_url_and_alone() {
        let c = parse("postgresql://u@wrong.example:5432/d?hostaddr=127.0.0.1&sslmode=require");
        assert_eq!(
            (c.hosts[0].host.as_str(), c.hosts[0].hostaddr),
            ("wrong.example", Some("127.0.0.1".parse().unwrap()))
        );
        let c = parse("hostaddr=10.0.0.1 user=u");
        assert_eq!(c.hosts[0].host, "10.0.0.1");
    }

    /// A primary and its standby in one string: both are tried in order,
    /// each with its own port (or the one port for all), and
    /// `target_session_attrs` says which will do.
    #[test]
    fn several_hosts_with_target_session_attrs() {
        let c =
            parse("postgresql://u:p@10.0.0.1:5433,10.0.0.2:5434/d?target_session_attrs=read-write");
        let hosts: Vec<_> = c.hosts.iter().map(|e| e.to_string()).collect();
        assert_eq!(hosts, ["10.0.0.1:5433", "10.0.0.2:5434"]);
        assert_eq!(c.target_session_attrs, SessionAttrs::ReadWrite);
        let c = parse("host=a,b port=6000 user=u target_session_attrs=any");
        let hosts: Vec<_> = c.hosts.iter().map(|e| e.to_string()).collect();
        assert_eq!(hosts, ["a:6000", "b:6000"]);
        assert_eq!(c.target_session_attrs, SessionAttrs::Any);
        let c = parse("host=a,b hostaddr=10.0.0.1,10.0.0.2 user=u");
        assert_eq!(c.hosts[1].to_string(), "b:5432 (hostaddr 10.0.0.2)");
        // Unix sockets are left out; the TCP host stays.
        let c = parse("host=/tmp,db.example user=u");
        assert_eq!(c.hosts.len(), 1);
        assert_eq!(c.hosts[0].host, "db.example");
        let e = ConnectionConfig::from_url_env(
            "postgresql://u@a,b/d?target_session_attrs=read-only",
            &no_env,
        )
        .unwrap_err();
        assert!(e.to_string().contains("any or read-write"), "{e}");
        assert!(sql_config_env("host=a user=u target_session_attrs=read-only", &no_env).is_err());
    }

    #[test]
    fn require_with_a_root_cert_checks_the_chain() {
        let c = parse("postgresql://u@h/d?sslmode=require");
        assert_eq!(c.tls.verify(), Verify::Nothing);
        let c = parse("postgresql://u@h/d?sslmode=require&sslrootcert=/ca.crt");
        assert_eq!(c.tls.verify(), Verify::Chain);
        let c = parse("postgresql://u@h/d?sslmode=prefer&sslrootcert=/ca.crt");
        assert_eq!(c.tls.verify(), Verify::Nothing);
        assert_eq!(
            parse("postgresql://u@h/d?sslmode=disable").tls.mode,
            SslMode::Disable
        );
    }

    #[test]
    fn env_fills_in_what_the_string_leaves_out() {
        let env = |k: &str| {
            Some(
                match k {
                    "PGSSLMODE" => "verify-full",
                    "PGSSLROOTCERT" => "/env/ca.crt",
                    "PGSSLCERT" => "/env/c.crt",
                    "PGSSLKEY" => "/env/c.key",
                    "PGPASSWORD" => "envpw",
                    _ => return None,
                }
                .to_owned(),
            )
        };
        let c = ConnectionConfig::from_url_env("postgresql://u@h/d", &env).unwrap();
        assert_eq!(c.tls.mode, SslMode::VerifyFull);
        assert_eq!(c.tls.root_cert, Some(PathBuf::from("/env/ca.crt")));
        assert_eq!(
            c.tls.client_cert.as_ref().map(|c| c.key.clone()),
            Some(PathBuf::from("/env/c.key"))
        );
        assert_eq!(c.password.as_deref(), Some("envpw"));
        // The string wins over the environment.
        let c = ConnectionConfig::from_url_env(
            "host=h user=u password=pw sslmode=disable sslrootcert=/s.crt",
            &env,
        )
        .unwrap();
        assert_eq!(c.tls.mode, SslMode::Disable);
        assert_eq!(c.tls.root_cert, Some(PathBuf::from("/s.crt")));
        assert_eq!(c.password.as_deref(), Some("pw"));
        // And the SQL side reads the same.
        let (cfg, tls) = sql_config_env("postgresql://u@h/d", &env).unwrap();
        assert_eq!(tls.mode, SslMode::VerifyFull);
        assert_eq!(cfg.get_password(), Some(&b"envpw"[..]));
        assert_eq!(cfg.get_ssl_mode(), tokio_postgres::config::SslMode::Require);
    }

    #[test]
    fn bad_ssl_values_are_clear() {
        let e = ConnectionConfig::from_url_env("postgresql://u@h/d?sslmode=verify", &no_env)
            .unwrap_err();
        assert!(e.to_string().contains("verify-full"), "{e}");
        let e = ConnectionConfig::from_url_env("host=h user=u sslmode=allow", &no_env).unwrap_err();
        assert!(matches!(e, UrlError::SslMode { .. }), "{e}");
        let e =
            ConnectionConfig::from_url_env("host=h user=u sslcert=/c.crt", &no_env).unwrap_err();
        assert!(e.to_string().contains("sslkey"), "{e}");
        let e =
            ConnectionConfig::from_url_env("host=h user=u sslrootcert='/x", &no_env).unwrap_err();
        assert!(e.to_string().contains("unterminated"), "{e}");
    }

    #[test]
    fn the_sql_side_keeps_other_keys_and_maps_sslmode() {
        let (cfg, _) = sql_config_env(
            "postgresql://u:p@h:1/d?application_name=a%20b&sslmode=verify-ca&connect_timeout=3",
            &no_env,
        )
        .unwrap();
        assert_eq!(cfg.get_application_name(), Some("a b"));
        assert_eq!(
            cfg.get_connect_timeout(),
            Some(&std::time::Duration::from_secs(3))
        );
        assert_eq!(cfg.get_ssl_mode(), tokio_postgres::config::SslMode::Require);
        let (cfg, _) =
            sql_config_env("host=h user=u options='-c a=b' sslmode=disable", &no_env).unwrap();
        assert_eq!(cfg.get_options(), Some("-c a=b"));
        assert_eq!(cfg.get_ssl_mode(), tokio_postgres::config::SslMode::Disable);
    }

    #[test]
    fn unix_sockets_ignore_sslmode_and_stray_words_are_not_quoted() {
        let (cfg, tls) = sql_config_env(
            "host=/var/run/postgresql user=u sslmode=verify-full",
            &no_env,
        )
        .unwrap();
        assert_eq!(tls.mode, SslMode::VerifyFull);
        assert_eq!(cfg.get_ssl_mode(), tokio_postgres::config::SslMode::Disable);
        let e = sql_config_env("host=h user=u hunter2", &no_env).unwrap_err();
        assert!(!e.to_string().contains("hunter2"), "{e}");
    }

    #[test]
    fn debug_does_not_print_the_password() {
        let c = parse("postgresql://u:s3cr3t-pw@h/d?sslmode=require");
        let text = format!("{c:?} {c:#?}");
        assert!(!text.contains("s3cr3t-pw"), "{text}");
        assert!(text.contains("<redacted>"), "{text}");
        let c = parse("host=h user=u password=s3cr3t-pw");
        assert!(!format!("{c:?}").contains("s3cr3t-pw"));
        let (cfg, _) = sql_config_env("postgresql://u:s3cr3t-pw@h/d", &no_env).unwrap();
        assert!(!format!("{cfg:?}").contains("s3cr3t-pw"));
    }
}
