//! Where the replication connection goes: the parts of a libpq connection
//! string (URL or `key=value` form) the replication client uses.
//!
//! **Invariants**
//! - A parsed [`ConnectionConfig`] always names a TCP host and a user; the
//!   database defaults to the user, and the password to `PGPASSWORD`, as
//!   with libpq.
//! - A string that does not parse is a [`UrlError`] that carries the
//!   parser's reason, not only "invalid connection string".

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
}

/// Where and how to connect, as parsed from the connection string.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectionConfig {
    /// TCP host.
    pub host: String,
    /// TCP port.
    pub port: u16,
    /// Role.
    pub user: String,
    /// Password, from the string or `PGPASSWORD`.
    pub password: Option<String>,
    /// Database name (defaults to the user name, like libpq).
    pub dbname: String,
}

impl ConnectionConfig {
    /// Parses a libpq URL or key/value string.
    pub fn from_url(url: &str) -> Result<Self, UrlError> {
        let cfg: tokio_postgres::Config = url.parse().map_err(|e| UrlError::Parse {
            reason: error_chain(&e),
        })?;
        let host = cfg
            .get_hosts()
            .iter()
            .find_map(|h| match h {
                tokio_postgres::config::Host::Tcp(h) => Some(h.clone()),
                #[allow(unreachable_patterns)]
                _ => None,
            })
            .ok_or(UrlError::NoTcpHost)?;
        let port = cfg.get_ports().first().copied().unwrap_or(5432);
        let user = cfg.get_user().ok_or(UrlError::NoUser)?.to_owned();
        let password = cfg
            .get_password()
            .map(|p| String::from_utf8_lossy(p).into_owned())
            .or_else(|| std::env::var("PGPASSWORD").ok());
        let dbname = cfg.get_dbname().unwrap_or(&user).to_owned();
        Ok(ConnectionConfig {
            host,
            port,
            user,
            password,
            dbname,
        })
    }
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

    #[test]
    fn parses_urls() {
        let c = ConnectionConfig::from_url("postgresql://u:p@127.0.0.1:5433/db").unwrap();
        assert_eq!(
            (
                c.host.as_str(),
                c.port,
                c.user.as_str(),
                c.password.as_deref(),
                c.dbname.as_str()
            ),
            ("127.0.0.1", 5433, "u", Some("p"), "db")
        );
        let c = ConnectionConfig::from_url("host=localhost user=x").unwrap();
        assert_eq!((c.port, c.dbname.as_str()), (5432, "x"));
        assert!(matches!(
            ConnectionConfig::from_url("postgresql://127.0.0.1/db"),
            Err(UrlError::NoUser)
        ));
        assert!(ConnectionConfig::from_url("not a url ===").is_err());
    }

    /// The bug: the relay printed only "invalid connection string".
    #[test]
    fn a_bad_url_says_why() {
        let e = ConnectionConfig::from_url("postgresql://u@127.0.0.1:notaport/db").unwrap_err();
        let text = e.to_string();
        assert!(text.contains("invalid connection string"), "{text}");
        assert!(text.contains("port"), "the cause is kept: {text}");
    }
}
