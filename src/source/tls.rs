//! TLS to PostgreSQL with libpq's `sslmode` meanings, on rustls (the
//! `ring` provider), for the replication connection and, through
//! [`MakeRustls`], the SQL sessions (`tokio_postgres`).
//!
//! ```text
//!  TlsSettings ──Connector::new (reads sslrootcert / sslcert / sslkey)──► Connector
//!  socket ──SSLRequest──► 'S' ──Connector::handshake(host)──► TlsStream ──► startup…
//!                         'N' ──Connector::refused──► plain (prefer) or TlsError::Refused
//! ```
//!
//! | sslmode | certificate check |
//! |---|---|
//! | `prefer`, `require` | none (handshake signatures still verified) |
//! | `require` + `sslrootcert`, `verify-ca` | chain to `sslrootcert` (or the system's roots), not the name |
//! | `verify-full` | chain and host name |
//!
//! **Invariants**
//! - A certificate, configuration or refusal problem is a definite
//!   [`TlsError`] that says what failed and what to do; only an I/O error
//!   in the middle of a handshake is transient.
//! - `verify-ca` accepts a certificate only when the chain verified and
//!   the name check is the one thing that failed: webpki checks the chain
//!   first, so a name error means the chain was good.
//! - Errors and logs name files by path; they never print key material,
//!   certificates' contents or passwords.

use std::fmt;
use std::future::Future;
use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_rustls::client::TlsStream;

use super::conn::{SslMode, TlsSettings, Verify};

/// Why a TLS connection could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// The server answered `N` to the SSLRequest, and the mode needs TLS.
    /// Definite.
    #[error("the server does not accept TLS (it answered N to the SSLRequest) but sslmode={mode}: enable ssl on the server (ssl = on in postgresql.conf) or use sslmode=prefer")]
    Refused {
        /// The mode that needed TLS.
        mode: SslMode,
    },
    /// A certificate or key file cannot be read. Definite.
    #[error("cannot read {key}={}: {source}{}", .path.display(), read_hint(.path))]
    ReadFile {
        /// `sslrootcert`, `sslcert` or `sslkey`.
        key: &'static str,
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// A certificate or key file that is not what it should be. Definite.
    #[error("{key}={} {problem}", .path.display())]
    BadFile {
        /// `sslrootcert`, `sslcert` or `sslkey`.
        key: &'static str,
        /// The file.
        path: PathBuf,
        /// What is wrong with it and what to do.
        problem: String,
    },
    /// The system's trusted roots could not be loaded. Definite.
    #[error("sslmode={mode} without sslrootcert trusts the system's CA certificates, but none could be loaded ({reason}): give sslrootcert=/path/to/ca.crt")]
    NoSystemRoots {
        /// The mode.
        mode: SslMode,
        /// Why.
        reason: String,
    },
    /// rustls refused the configuration (e.g. the client key does not
    /// match its certificate). Definite.
    #[error("cannot use {what}: {reason}")]
    Config {
        /// What was being set up.
        what: String,
        /// rustls's reason.
        reason: String,
    },
    /// The host cannot be used as a TLS server name. Definite.
    #[error("host {host:?} is neither a DNS name nor an IP address, so the server's certificate cannot be checked against it: give the server's name as host (and its address as hostaddr)")]
    HostName {
        /// The host.
        host: String,
    },
    /// The server's certificate was rejected. Definite.
    #[error("{message}")]
    Certificate {
        /// What was wrong with it, against what, and what to do.
        message: String,
    },
    /// The handshake failed for another reason (an alert from the server,
    /// no common protocol version or cipher). Definite.
    #[error("the TLS handshake with {host} failed: {reason}{}", handshake_hint(.reason))]
    Handshake {
        /// The host.
        host: String,
        /// rustls's reason.
        reason: String,
    },
    /// The server answered the SSLRequest with an error message instead of
    /// `S` or `N` (it could not start a backend). Transient.
    #[error("the server answered the SSLRequest with an error instead of S or N (it may be out of processes or memory); see the server's log")]
    Answered,
    /// The connection broke during the handshake. Transient.
    #[error("the connection to {host} broke during the TLS handshake: {source}")]
    Io {
        /// The host.
        host: String,
        /// The socket error.
        #[source]
        source: io::Error,
    },
}

fn read_hint(path: &Path) -> &'static str {
    if path == Path::new("system") {
        "; to trust the system's CA certificates, leave sslrootcert out"
    } else {
        "; check the path and that this user may read it"
    }
}

fn handshake_hint(reason: &str) -> &'static str {
    if reason.contains("CertificateRequired")
        || reason.contains("BadCertificate")
        || reason.contains("UnknownCA")
    {
        "; the server wants a client certificate it trusts: give sslcert and sslkey"
    } else {
        ""
    }
}

impl TlsError {
    /// True only for a connection broken during the handshake and a
    /// server that could not start a backend; every other TLS failure
    /// repeats until someone changes a setting.
    pub fn is_transient(&self) -> bool {
        matches!(self, TlsError::Io { .. } | TlsError::Answered)
    }
}

/// Establishes TLS sessions for one [`TlsSettings`]: the rustls
/// configuration, built once per connection attempt so that renewed
/// certificate files are picked up on reconnect.
pub(crate) struct Connector {
    config: Arc<ClientConfig>,
    mode: SslMode,
    verify: Verify,
    /// Where the trusted roots came from, for error messages.
    roots: String,
}

impl fmt::Debug for Connector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Connector")
            .field("mode", &self.mode)
            .field("verify", &self.verify)
            .field("roots", &self.roots)
            .finish_non_exhaustive()
    }
}

impl Connector {
    /// Reads the certificate files and builds the rustls configuration.
    /// `None` for `sslmode=disable`.
    pub(crate) fn new(settings: &TlsSettings) -> Result<Option<Connector>, TlsError> {
        if settings.mode == SslMode::Disable {
            return Ok(None);
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let verify = settings.verify();
        let (verifier, roots): (Arc<dyn ServerCertVerifier>, String) = match verify {
            Verify::Nothing => (
                Arc::new(NoCheck {
                    provider: Arc::clone(&provider),
                }),
                String::new(),
            ),
            Verify::Chain | Verify::ChainAndName => {
                let (store, roots) = root_store(settings)?;
                let webpki = WebPkiServerVerifier::builder_with_provider(
                    Arc::new(store),
                    Arc::clone(&provider),
                )
                .build()
                .map_err(|e| TlsError::Config {
                    what: format!("the CA certificates of {roots}"),
                    reason: e.to_string(),
                })?;
                if verify == Verify::Chain {
                    (Arc::new(ChainOnly { inner: webpki }), roots)
                } else {
                    (webpki, roots)
                }
            }
        };
        let builder = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::Config {
                what: "the TLS protocol versions".into(),
                reason: e.to_string(),
            })?
            .dangerous()
            .with_custom_certificate_verifier(verifier);
        let mut config = match &settings.client_cert {
            None => builder.with_no_client_auth(),
            Some(c) => {
                let chain = read_certs("sslcert", &c.cert)?;
                let key = read_key(&c.key)?;
                builder
                    .with_client_auth_cert(chain, key)
                    .map_err(|e| TlsError::Config {
                        what: format!(
                            "the client certificate sslcert={} with sslkey={}",
                            c.cert.display(),
                            c.key.display()
                        ),
                        reason: e.to_string(),
                    })?
            }
        };
        // What libpq 17 offers; servers that do not know ALPN ignore it.
        config.alpn_protocols = vec![b"postgresql".to_vec()];
        Ok(Some(Connector {
            config: Arc::new(config),
            mode: settings.mode,
            verify,
            roots,
        }))
    }

    /// The server answered `N`: fine for `prefer` (go on in plain), an
    /// error for every mode that needs TLS.
    pub(crate) fn refused(&self) -> Result<(), TlsError> {
        match self.mode {
            SslMode::Disable | SslMode::Prefer => Ok(()),
            mode => Err(TlsError::Refused { mode }),
        }
    }

    /// The TLS handshake over `stream`, which has had its `S`. `host` is
    /// the name the certificate is checked against (and sent as SNI).
    pub(crate) async fn handshake<S>(&self, host: &str, stream: S) -> Result<TlsStream<S>, TlsError>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let name = ServerName::try_from(host.to_owned()).map_err(|_| TlsError::HostName {
            host: host.to_owned(),
        })?;
        tokio_rustls::TlsConnector::from(Arc::clone(&self.config))
            .connect(name, stream)
            .await
            .map_err(|e| self.handshake_error(host, e))
    }

    fn handshake_error(&self, host: &str, e: io::Error) -> TlsError {
        let Some(err) = e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) else {
            return TlsError::Io {
                host: host.to_owned(),
                source: e,
            };
        };
        let rustls::Error::InvalidCertificate(cert) = err else {
            return TlsError::Handshake {
                host: host.to_owned(),
                reason: err.to_string(),
            };
        };
        let message = match cert {
            CertificateError::UnknownIssuer | CertificateError::BadSignature => format!(
                "the server's certificate (host {host:?}) is not signed by {} ({}): {}",
                self.roots,
                err,
                if self.roots.starts_with("the CA in") {
                    "point sslrootcert at the CA that signed it"
                } else {
                    "give sslrootcert=<the PEM file of the CA that signed it>"
                }
            ),
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. } => {
                let names = match cert {
                    CertificateError::NotValidForNameContext { presented, .. }
                        if !presented.is_empty() =>
                    {
                        presented
                            .iter()
                            .map(|n| plain_name(n))
                            .collect::<Vec<_>>()
                            .join(", ")
                    }
                    _ => "other names".to_owned(),
                };
                format!(
                    "the server's certificate is not valid for host {host:?} (it names {names}): connect with the host name in the certificate (give the address as hostaddr if the name does not resolve), or use sslmode=verify-ca"
                )
            }
            CertificateError::Expired
            | CertificateError::ExpiredContext { .. }
            | CertificateError::NotValidYet
            | CertificateError::NotValidYetContext { .. } => format!(
                "the server's certificate (host {host:?}) is outside its validity period ({err}): renew the server's certificate, or check this machine's clock"
            ),
            _ => format!(
                "the server's certificate (host {host:?}) was rejected with sslmode={} ({err}): fix the server's certificate, or check sslrootcert",
                self.mode
            ),
        };
        TlsError::Certificate { message }
    }
}

/// `DnsName("db.example")` → `db.example`, `IpAddress(10.0.0.1)` →
/// `10.0.0.1`, as rustls reports the names a certificate carries.
fn plain_name(presented: &str) -> &str {
    presented
        .strip_prefix("DnsName(\"")
        .and_then(|n| n.strip_suffix("\")"))
        .or_else(|| {
            presented
                .strip_prefix("IpAddress(")
                .and_then(|n| n.strip_suffix(')'))
        })
        .unwrap_or(presented)
}

/// The roots for a checked mode: `sslrootcert`, else the system's.
fn root_store(settings: &TlsSettings) -> Result<(RootCertStore, String), TlsError> {
    let mut store = RootCertStore::empty();
    match &settings.root_cert {
        Some(path) => {
            let certs = read_certs("sslrootcert", path)?;
            let (_, ignored) = store.add_parsable_certificates(certs);
            if store.is_empty() {
                return Err(TlsError::BadFile {
                    key: "sslrootcert",
                    path: path.clone(),
                    problem: format!(
                        "holds no usable CA certificate ({ignored} could not be parsed): give the PEM file of the CA that signed the server's certificate"
                    ),
                });
            }
            Ok((store, format!("the CA in sslrootcert={}", path.display())))
        }
        None => {
            let found = rustls_native_certs::load_native_certs();
            let (_, _) = store.add_parsable_certificates(found.certs);
            if store.is_empty() {
                let reason = found
                    .errors
                    .first()
                    .map_or_else(|| "the system has none".to_owned(), ToString::to_string);
                return Err(TlsError::NoSystemRoots {
                    mode: settings.mode,
                    reason,
                });
            }
            Ok((
                store,
                "a CA this system trusts (no sslrootcert given)".to_owned(),
            ))
        }
    }
}

/// Describes a PEM parse failure without quoting the file's content.
fn pem_problem(e: &rustls_pki_types::pem::Error) -> &'static str {
    use rustls_pki_types::pem::Error;
    match e {
        Error::MissingSectionEnd { .. } => "has a PEM section without its END line",
        Error::IllegalSectionStart { .. } => "has a malformed PEM BEGIN line",
        Error::Base64Decode(_) => "has invalid base64 inside a PEM section",
        Error::SectionTooLarge => "has a PEM section that is too large",
        _ => "is not valid PEM",
    }
}

fn pem_error(key: &'static str, path: &Path, e: rustls_pki_types::pem::Error) -> TlsError {
    match e {
        rustls_pki_types::pem::Error::Io(source) => TlsError::ReadFile {
            key,
            path: path.to_owned(),
            source,
        },
        other => TlsError::BadFile {
            key,
            path: path.to_owned(),
            problem: format!("{}: give a PEM file", pem_problem(&other)),
        },
    }
}

fn read_certs(key: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| pem_error(key, path, e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem_error(key, path, e))?;
    if certs.is_empty() {
        return Err(TlsError::BadFile {
            key,
            path: path.to_owned(),
            problem: "holds no certificate (no -----BEGIN CERTIFICATE----- section): give a PEM certificate file".into(),
        });
    }
    Ok(certs)
}

fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| match e {
        rustls_pki_types::pem::Error::NoItemsFound => TlsError::BadFile {
            key: "sslkey",
            path: path.to_owned(),
            problem: "holds no unencrypted private key (PKCS#8, PKCS#1 or SEC1 PEM): give the key of sslcert; an encrypted key must be decrypted first (openssl pkey -in key -out plain.key)".into(),
        },
        other => pem_error("sslkey", path, other),
    })
}

/// `prefer` and `require`: any certificate, but the handshake's
/// signatures are still verified with the provider, so the peer holds the
/// key of the certificate it sent.
#[derive(Debug)]
struct NoCheck {
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for NoCheck {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// `verify-ca`: webpki's checks, except the host name.
#[derive(Debug)]
struct ChainOnly {
    inner: Arc<WebPkiServerVerifier>,
}

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self.inner.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        ) {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// [`Connector`] as `tokio_postgres` wants it, for the SQL sessions.
/// tokio-postgres sends the SSLRequest itself and calls
/// [`TlsConnect::connect`](tokio_postgres::tls::TlsConnect::connect) after
/// an `S`, with the host it connected to (its `host`, even with
/// `hostaddr`).
#[derive(Debug, Clone)]
pub(crate) struct MakeRustls {
    connector: Arc<Connector>,
}

impl MakeRustls {
    pub(crate) fn new(connector: Connector) -> MakeRustls {
        MakeRustls {
            connector: Arc::new(connector),
        }
    }
}

impl<S> tokio_postgres::tls::MakeTlsConnect<S> for MakeRustls
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = RustlsStream<S>;
    type TlsConnect = RustlsConnect;
    type Error = TlsError;

    /// Only records the host: it is checked in the handshake, which never
    /// happens for a Unix socket (whose "host" is empty).
    fn make_tls_connect(&mut self, domain: &str) -> Result<RustlsConnect, TlsError> {
        Ok(RustlsConnect {
            connector: Arc::clone(&self.connector),
            host: domain.to_owned(),
        })
    }
}

/// One SQL session's handshake.
#[derive(Debug)]
pub(crate) struct RustlsConnect {
    connector: Arc<Connector>,
    host: String,
}

impl<S> tokio_postgres::tls::TlsConnect<S> for RustlsConnect
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = RustlsStream<S>;
    type Error = TlsError;
    type Future = Pin<Box<dyn Future<Output = Result<RustlsStream<S>, TlsError>> + Send>>;

    fn connect(self, stream: S) -> Self::Future {
        Box::pin(async move {
            let s = self.connector.handshake(&self.host, stream).await?;
            Ok(RustlsStream(s))
        })
    }
}

/// A SQL session's TLS stream.
pub(crate) struct RustlsStream<S>(TlsStream<S>);

impl<S: AsyncRead + AsyncWrite + Unpin> tokio_postgres::tls::TlsStream for RustlsStream<S> {
    /// No `tls-server-end-point` binding: SCRAM runs without channel
    /// binding, as on the replication connection.
    fn channel_binding(&self) -> tokio_postgres::tls::ChannelBinding {
        tokio_postgres::tls::ChannelBinding::none()
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for RustlsStream<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for RustlsStream<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::conn::ClientCert;

    fn settings(mode: SslMode, root: Option<&Path>) -> TlsSettings {
        TlsSettings {
            mode,
            root_cert: root.map(Path::to_path_buf),
            client_cert: None,
        }
    }

    #[test]
    fn disable_needs_no_connector_and_prefer_accepts_a_refusal() {
        assert!(Connector::new(&settings(SslMode::Disable, None))
            .unwrap()
            .is_none());
        let c = Connector::new(&settings(SslMode::Prefer, None))
            .unwrap()
            .unwrap();
        assert!(c.refused().is_ok());
        let c = Connector::new(&settings(SslMode::Require, None))
            .unwrap()
            .unwrap();
        let e = c.refused().unwrap_err();
        assert!(!e.is_transient());
        let text = e.to_string();
        assert!(
            text.contains("answered N") && text.contains("sslmode=require"),
            "{text}"
        );
    }

    #[test]
    fn unreadable_files_are_named() {
        let missing = Path::new("/nonexistent/factlib-ca.crt");
        let e = Connector::new(&settings(SslMode::VerifyFull, Some(missing))).unwrap_err();
        assert!(!e.is_transient());
        let text = e.to_string();
        assert!(
            text.contains("sslrootcert=/nonexistent/factlib-ca.crt"),
            "{text}"
        );

        let dir = tempfile::tempdir().unwrap();
        let junk = dir.path().join("junk.pem");
        std::fs::write(&junk, "not a certificate\n").unwrap();
        let e = Connector::new(&settings(SslMode::VerifyCa, Some(&junk))).unwrap_err();
        assert!(e.to_string().contains("holds no certificate"), "{e}");

        // A key file that is not a key says so, and never echoes its content.
        let key = dir.path().join("c.key");
        std::fs::write(
            &key,
            "-----BEGIN PRIVATE KEY-----\nc2VjcmV0LWtleS1tYXRlcmlhbA==\n",
        )
        .unwrap();
        let s = TlsSettings {
            mode: SslMode::Require,
            root_cert: None,
            client_cert: Some(ClientCert {
                cert: junk.clone(),
                key: key.clone(),
            }),
        };
        let e = Connector::new(&s).unwrap_err();
        assert!(
            e.to_string().contains("sslcert="),
            "the cert is read first: {e}"
        );
        let e = read_key(&key).unwrap_err();
        let text = e.to_string();
        assert!(text.contains("sslkey="), "{text}");
        assert!(!text.contains("c2VjcmV0"), "no key material: {text}");
    }

    #[test]
    fn presented_names_read_plainly() {
        assert_eq!(plain_name("DnsName(\"localhost\")"), "localhost");
        assert_eq!(plain_name("IpAddress(127.0.0.1)"), "127.0.0.1");
        assert_eq!(plain_name("URI(x)"), "URI(x)");
    }

    #[test]
    fn only_handshake_io_is_transient() {
        let io = TlsError::Io {
            host: "h".into(),
            source: io::Error::new(io::ErrorKind::ConnectionReset, "reset"),
        };
        assert!(io.is_transient());
        assert!(!TlsError::Certificate {
            message: String::new()
        }
        .is_transient());
        assert!(!TlsError::HostName { host: "h".into() }.is_transient());
    }
}
