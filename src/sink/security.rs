//! How every Kafka client the relay makes reaches the brokers: the security
//! protocol, SASL credentials, and the CA that signs the brokers'
//! certificates, as librdkafka properties.
//!
//! Owns that mapping. The producer, the admin client it lends, the
//! checkpoint reader, `status` and `bench verify` all apply the same
//! [`KafkaSecurity`], so a relay that can produce can also read its
//! checkpoint.
//!
//! **Invariants**
//! - The password is a [`Secret`]: no `Debug` or `Display` of any type here
//!   prints it, so no log line, error or status output can.
//! - A [`KafkaSecurity`] is consistent: SASL credentials exist exactly when
//!   the protocol is a SASL one (the command line checks this before it
//!   builds one).

use std::path::PathBuf;

use rdkafka::config::ClientConfig;

/// A value that must never be shown: `Debug` and `Display` print
/// `<redacted>`.
#[derive(Clone, PartialEq, Eq, Default)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret value.
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }

    /// The value itself, for the one place that hands it to a client.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// True when the value is empty.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

impl std::fmt::Display for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

impl std::str::FromStr for Secret {
    type Err = std::convert::Infallible;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(Secret(s.to_owned()))
    }
}

/// librdkafka's `security.protocol`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SecurityProtocol {
    /// No TLS, no authentication.
    #[default]
    Plaintext,
    /// TLS, no SASL.
    Ssl,
    /// SASL without TLS (the password crosses the network in the clear
    /// with PLAIN).
    SaslPlaintext,
    /// SASL over TLS.
    SaslSsl,
}

impl SecurityProtocol {
    /// The librdkafka value.
    pub fn as_str(self) -> &'static str {
        match self {
            SecurityProtocol::Plaintext => "plaintext",
            SecurityProtocol::Ssl => "ssl",
            SecurityProtocol::SaslPlaintext => "sasl_plaintext",
            SecurityProtocol::SaslSsl => "sasl_ssl",
        }
    }

    /// True for the protocols that authenticate with SASL.
    pub fn uses_sasl(self) -> bool {
        matches!(
            self,
            SecurityProtocol::SaslPlaintext | SecurityProtocol::SaslSsl
        )
    }

    /// True for the protocols that use TLS.
    pub fn uses_tls(self) -> bool {
        matches!(self, SecurityProtocol::Ssl | SecurityProtocol::SaslSsl)
    }
}

/// librdkafka's `sasl.mechanisms`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SaslMechanism {
    /// PLAIN: the password itself is sent (use it over TLS only).
    Plain,
    /// SCRAM-SHA-256.
    ScramSha256,
    /// SCRAM-SHA-512.
    ScramSha512,
}

impl SaslMechanism {
    /// The librdkafka value.
    pub fn as_str(self) -> &'static str {
        match self {
            SaslMechanism::Plain => "PLAIN",
            SaslMechanism::ScramSha256 => "SCRAM-SHA-256",
            SaslMechanism::ScramSha512 => "SCRAM-SHA-512",
        }
    }
}

/// SASL user and password.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SaslCredentials {
    /// The mechanism.
    pub mechanism: SaslMechanism,
    /// The user.
    pub username: String,
    /// The password; never shown.
    pub password: Secret,
}

/// How clients reach the brokers. The default is plaintext, as librdkafka's.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct KafkaSecurity {
    /// `security.protocol`.
    pub protocol: SecurityProtocol,
    /// SASL credentials; present exactly for the SASL protocols.
    pub sasl: Option<SaslCredentials>,
    /// A PEM file of CA certificates that sign the brokers' certificates
    /// (`ssl.ca.location`); without it, the system's CA store.
    pub ca: Option<PathBuf>,
}

impl KafkaSecurity {
    /// Sets the librdkafka properties on a client's configuration.
    pub fn apply(&self, c: &mut ClientConfig) {
        c.set("security.protocol", self.protocol.as_str());
        if let Some(sasl) = &self.sasl {
            c.set("sasl.mechanisms", sasl.mechanism.as_str())
                .set("sasl.username", &sasl.username)
                .set("sasl.password", sasl.password.expose());
        }
        if let Some(ca) = &self.ca {
            c.set("ssl.ca.location", ca.to_string_lossy());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_rendering_shows_the_password() {
        let s = KafkaSecurity {
            protocol: SecurityProtocol::SaslSsl,
            sasl: Some(SaslCredentials {
                mechanism: SaslMechanism::ScramSha512,
                username: "relay".into(),
                password: Secret::new("hunter2-very-secret"),
            }),
            ca: None,
        };
        let shown = format!("{s:?} {s:#?} {}", s.sasl.as_ref().unwrap().password);
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(
            shown.contains("relay") && shown.contains("<redacted>"),
            "{shown}"
        );
    }

    #[test]
    fn properties_reach_the_client_config() {
        let mut c = ClientConfig::new();
        KafkaSecurity {
            protocol: SecurityProtocol::SaslSsl,
            sasl: Some(SaslCredentials {
                mechanism: SaslMechanism::ScramSha256,
                username: "u".into(),
                password: Secret::new("p"),
            }),
            ca: Some("/etc/ca.pem".into()),
        }
        .apply(&mut c);
        assert_eq!(c.get("security.protocol"), Some("sasl_ssl"));
        assert_eq!(c.get("sasl.mechanisms"), Some("SCRAM-SHA-256"));
        assert_eq!(c.get("sasl.username"), Some("u"));
        assert_eq!(c.get("sasl.password"), Some("p"));
        assert_eq!(c.get("ssl.ca.location"), Some("/etc/ca.pem"));

        let mut plain = ClientConfig::new();
        KafkaSecurity::default().apply(&mut plain);
        assert_eq!(plain.get("security.protocol"), Some("plaintext"));
        assert_eq!(plain.get("sasl.username"), None);
    }
}
