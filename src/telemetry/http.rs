//! The metrics endpoint (`--metrics-addr`): `/metrics`, `/healthz` and
//! `/readyz` over a small HTTP/1.1 GET server.
//!
//! ```text
//!  relay::run ──serve(settings)──► bind (a failure is a definite start-up error)
//!                                   └─► thread "factlib-metrics": own current-thread runtime
//!  scraper ──GET──► accept ──► read head (≤ 8 KiB, ≤ 5 s) ──parse_request──► route ──► respond, close
//! ```
//!
//! The server runs on a thread of its own with its own small runtime, not on
//! the relay's executor: a scrape never takes time from the pipeline's
//! single thread, and `/healthz` still answers (503) when the relay's
//! thread is wedged, which is what a liveness probe is for. Rendering reads
//! atomics and `/proc/self`; it never waits for the pipeline.
//!
//! One request per connection (`Connection: close`): scrapers open one per
//! scrape, and it keeps the server trivially robust. Slow or oversized
//! requests are cut off; at most [`MAX_CONNECTIONS`] are served at once,
//! more are closed at once.
//!
//! **Invariants**
//! - Nothing here can fail or block the pipeline: the pipeline only writes
//!   atomics this thread reads.
//! - Request parsing is sans-io ([`parse_request`]) and never panics on
//!   input.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use super::{health, metrics};

/// Where to serve the metrics endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetricsSettings {
    /// `HOST:PORT` to listen on (port 0: any free port; the URL logged at
    /// start-up tells which).
    pub addr: String,
}

/// Why the metrics endpoint cannot start. Definite: the configuration or
/// the machine must change.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    /// The address cannot be listened on.
    #[error("cannot listen on --metrics-addr {addr}: {reason}")]
    Listen {
        /// The address given.
        addr: String,
        /// What to do about it.
        reason: String,
        /// The socket error.
        #[source]
        source: io::Error,
    },
    /// The server's thread or runtime could not start.
    #[error("cannot start the metrics server: {0}")]
    Start(#[source] io::Error),
}

impl TelemetryError {
    /// Always false: see the type's documentation.
    pub fn is_transient(&self) -> bool {
        false
    }
}

/// Longest request head accepted.
const MAX_HEAD: usize = 8 << 10;
/// Time allowed to read a request and to write its response.
const IO_TIMEOUT: Duration = Duration::from_secs(5);
/// Connections served at once.
const MAX_CONNECTIONS: usize = 32;

/// Binds `settings.addr` and serves on a thread of its own until the
/// process exits; logs the URL. Returns the address bound.
pub(crate) fn serve(settings: &MetricsSettings) -> Result<SocketAddr, TelemetryError> {
    let listener = std::net::TcpListener::bind(&settings.addr)
        .and_then(|l| l.set_nonblocking(true).map(|()| l))
        .map_err(|source| TelemetryError::Listen {
            addr: settings.addr.clone(),
            reason: listen_advice(&source),
            source,
        })?;
    let local = listener.local_addr().map_err(TelemetryError::Start)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .enable_time()
        .build()
        .map_err(TelemetryError::Start)?;
    std::thread::Builder::new()
        .name("factlib-metrics".into())
        .spawn(move || {
            runtime.block_on(async move {
                match TcpListener::from_std(listener) {
                    Ok(l) => accept_loop(l).await,
                    Err(e) => tracing::warn!(error = %e, "metrics server stopped"),
                }
            });
        })
        .map_err(TelemetryError::Start)?;
    tracing::info!(
        url = %format_args!("http://{local}/metrics"),
        "serving metrics (also /healthz and /readyz)"
    );
    Ok(local)
}

/// What to tell the user about a failed bind.
fn listen_advice(e: &io::Error) -> String {
    match e.kind() {
        io::ErrorKind::AddrInUse => "address in use; pick another port".into(),
        io::ErrorKind::AddrNotAvailable => {
            "address not available on this machine; use one of its addresses, or 0.0.0.0".into()
        }
        io::ErrorKind::PermissionDenied => {
            "permission denied; ports below 1024 need privileges, pick a higher one".into()
        }
        _ => format!("{e}; give HOST:PORT, e.g. 127.0.0.1:9187"),
    }
}

async fn accept_loop(listener: TcpListener) {
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let (socket, _) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                // Out of file descriptors and the like: wait, try again.
                tracing::debug!(error = %e, "metrics server: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(slot) = Arc::clone(&slots).try_acquire_owned() else {
            continue;
        };
        tokio::spawn(async move {
            let _ = tokio::time::timeout(IO_TIMEOUT, handle(socket)).await;
            drop(slot);
        });
    }
}

async fn handle(mut socket: TcpStream) {
    let mut buf = Vec::with_capacity(1024);
    let parsed = loop {
        if let Some(end) = find_head_end(&buf) {
            break parse_request(&buf[..end]);
        }
        if buf.len() >= MAX_HEAD {
            break Err(HttpError::TooLarge);
        }
        let mut chunk = [0u8; 1024];
        match socket.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    };
    let response = match parsed {
        Ok(req) => respond(&req),
        Err(e) => Response::error(e),
    };
    let head_only = matches!(
        parsed,
        Ok(Request {
            head_only: true,
            ..
        })
    );
    let _ = socket.write_all(&response.to_bytes(head_only)).await;
    let _ = socket.shutdown().await;
}

/// The end of the request head (after its blank line), if it is all there.
fn find_head_end(buf: &[u8]) -> Option<usize> {
    buf.windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|p| p + 4)
        .or_else(|| buf.windows(2).position(|w| w == b"\n\n").map(|p| p + 2))
}

/// A request the server can answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Request {
    pub(crate) route: Route,
    /// `HEAD`: the response without its body.
    pub(crate) head_only: bool,
}

/// The paths served.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Route {
    Metrics,
    Healthz,
    Readyz,
    /// `/`: a list of the others.
    Index,
    NotFound,
}

/// A request that cannot be answered as asked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum HttpError {
    /// Not an HTTP/1.x request line.
    BadRequest,
    /// A method other than GET or HEAD.
    MethodNotAllowed,
    /// The head is larger than [`MAX_HEAD`].
    TooLarge,
}

/// Parses a request head (request line and headers). Only the request line
/// matters; headers are ignored.
pub(crate) fn parse_request(head: &[u8]) -> Result<Request, HttpError> {
    let line_end = head
        .iter()
        .position(|&b| b == b'\n')
        .ok_or(HttpError::BadRequest)?;
    let line = std::str::from_utf8(&head[..line_end])
        .map_err(|_| HttpError::BadRequest)?
        .trim_end_matches('\r');
    let mut parts = line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(HttpError::BadRequest);
    };
    if !version.starts_with("HTTP/1.") || !target.starts_with('/') {
        return Err(HttpError::BadRequest);
    }
    let head_only = match method {
        "GET" => false,
        "HEAD" => true,
        m if !m.is_empty() && m.bytes().all(|b| b.is_ascii_uppercase()) => {
            return Err(HttpError::MethodNotAllowed)
        }
        _ => return Err(HttpError::BadRequest),
    };
    let path = target.split(['?', '#']).next().unwrap_or(target);
    let route = match path {
        "/metrics" => Route::Metrics,
        "/healthz" => Route::Healthz,
        "/readyz" => Route::Readyz,
        "/" => Route::Index,
        _ => Route::NotFound,
    };
    Ok(Request { route, head_only })
}

/// A response to write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Response {
    pub(crate) status: u16,
    pub(crate) content_type: &'static str,
    pub(crate) body: String,
}

const TEXT: &str = "text/plain; charset=utf-8";

impl Response {
    fn text(status: u16, body: impl Into<String>) -> Self {
        let mut body = body.into();
        body.push('\n');
        Response {
            status,
            content_type: TEXT,
            body,
        }
    }

    pub(crate) fn error(e: HttpError) -> Self {
        match e {
            HttpError::BadRequest => Response::text(400, "bad request"),
            HttpError::MethodNotAllowed => Response::text(405, "only GET and HEAD are served"),
            HttpError::TooLarge => Response::text(431, "request header too large"),
        }
    }

    fn reason(&self) -> &'static str {
        match self.status {
            200 => "OK",
            400 => "Bad Request",
            404 => "Not Found",
            405 => "Method Not Allowed",
            431 => "Request Header Fields Too Large",
            503 => "Service Unavailable",
            _ => "",
        }
    }

    /// The bytes on the wire; `head_only` leaves the body out (HEAD).
    pub(crate) fn to_bytes(&self, head_only: bool) -> Vec<u8> {
        let allow = if self.status == 405 {
            "Allow: GET, HEAD\r\n"
        } else {
            ""
        };
        let mut out = format!(
            "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\nCache-Control: no-store\r\n{allow}Connection: close\r\n\r\n",
            self.status,
            self.reason(),
            self.content_type,
            self.body.len()
        )
        .into_bytes();
        if !head_only {
            out.extend_from_slice(self.body.as_bytes());
        }
        out
    }
}

/// Answers a parsed request from the current state.
pub(crate) fn respond(req: &Request) -> Response {
    match req.route {
        Route::Metrics => Response {
            status: 200,
            content_type: metrics::CONTENT_TYPE,
            body: metrics::render(),
        },
        Route::Healthz => match health::liveness() {
            Ok(()) => Response::text(200, "ok"),
            Err(why) => Response::text(503, why),
        },
        Route::Readyz => match health::readiness() {
            Ok(()) => Response::text(200, "ready"),
            Err(why) => Response::text(503, why),
        },
        Route::Index => Response::text(
            200,
            match super::role() {
                super::Role::Relay => "factlib relay: /metrics /healthz /readyz",
                super::Role::Inbox => "factlib inbox: /metrics /healthz /readyz",
            },
        ),
        Route::NotFound => Response::text(404, "not found: try /metrics, /healthz or /readyz"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<Request, HttpError> {
        parse_request(s.as_bytes())
    }

    #[test]
    fn request_lines_are_routed() {
        let get = |route| {
            Ok(Request {
                route,
                head_only: false,
            })
        };
        assert_eq!(
            parse("GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"),
            get(Route::Metrics)
        );
        assert_eq!(parse("GET /healthz HTTP/1.0\r\n\r\n"), get(Route::Healthz));
        assert_eq!(
            parse("GET /readyz?verbose=1 HTTP/1.1\n\n"),
            get(Route::Readyz)
        );
        assert_eq!(parse("GET / HTTP/1.1\r\n\r\n"), get(Route::Index));
        assert_eq!(parse("GET /nope HTTP/1.1\r\n\r\n"), get(Route::NotFound));
        assert_eq!(
            parse("GET /metrics/x HTTP/1.1\r\n\r\n"),
            get(Route::NotFound)
        );
        assert_eq!(
            parse("HEAD /metrics HTTP/1.1\r\n\r\n"),
            Ok(Request {
                route: Route::Metrics,
                head_only: true
            })
        );
    }

    #[test]
    fn malformed_requests_are_refused() {
        for bad in [
            "",
            "\r\n\r\n",
            "GET\r\n\r\n",
            "GET /metrics\r\n\r\n",
            "GET /metrics HTTP/2\r\n\r\n",
            "GET metrics HTTP/1.1\r\n\r\n",
            "GET  /metrics HTTP/1.1\r\n\r\n",
            "GET /metrics HTTP/1.1 extra\r\n\r\n",
            "get /metrics HTTP/1.1\r\n\r\n",
            "\u{1}\u{2} / HTTP/1.1\r\n\r\n",
        ] {
            assert_eq!(parse(bad), Err(HttpError::BadRequest), "{bad:?}");
        }
        assert_eq!(
            parse_request(b"GET /\xff HTTP/1.1\r\n\r\n"),
            Err(HttpError::BadRequest)
        );
        assert_eq!(
            parse("POST /metrics HTTP/1.1\r\n\r\n"),
            Err(HttpError::MethodNotAllowed)
        );
    }

    #[test]
    fn responses_have_status_length_and_close() {
        let r = Response::error(HttpError::BadRequest);
        let wire = String::from_utf8(r.to_bytes(false)).unwrap();
        assert!(wire.starts_with("HTTP/1.1 400 Bad Request\r\n"), "{wire}");
        assert!(wire.contains("Content-Length: 12\r\n"), "{wire}");
        assert!(wire.contains("Connection: close\r\n"));
        assert!(wire.ends_with("\r\n\r\nbad request\n"));
        let not_found = respond(&Request {
            route: Route::NotFound,
            head_only: false,
        });
        assert_eq!(not_found.status, 404);
        let wire = String::from_utf8(not_found.to_bytes(true)).unwrap();
        assert!(wire.ends_with("\r\n\r\n"), "HEAD has no body: {wire}");
        let wire = String::from_utf8(Response::error(HttpError::MethodNotAllowed).to_bytes(false))
            .unwrap();
        assert!(wire.contains("Allow: GET, HEAD\r\n"));
        let metrics = respond(&Request {
            route: Route::Metrics,
            head_only: false,
        });
        assert_eq!(metrics.status, 200);
        assert!(metrics
            .content_type
            .starts_with("text/plain; version=0.0.4"));
        assert!(metrics.body.contains("factlib_facts_relayed_total"));
    }

    #[test]
    fn the_head_ends_at_a_blank_line() {
        assert_eq!(
            find_head_end(b"GET / HTTP/1.1\r\nA: b\r\n\r\nbody"),
            Some(24)
        );
        assert_eq!(find_head_end(b"GET / HTTP/1.1\n\n"), Some(16));
        assert_eq!(find_head_end(b"GET / HTTP/1.1\r\nA: b\r\n"), None);
    }

    /// Over a real socket: a bad request line, an unknown path, a slow
    /// client that never finishes, and a bind on a taken port.
    #[test]
    fn the_server_answers_over_tcp_and_refuses_a_taken_port() {
        use std::io::{Read, Write};
        let addr = serve(&MetricsSettings {
            addr: "127.0.0.1:0".into(),
        })
        .unwrap();
        let ask = |req: &[u8]| {
            let mut s = std::net::TcpStream::connect(addr).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            s.write_all(req).unwrap();
            let mut out = String::new();
            s.read_to_string(&mut out).unwrap();
            out
        };
        // A client that connects and says nothing does not hold others up.
        let _idle = std::net::TcpStream::connect(addr).unwrap();
        assert!(ask(b"GARBAGE\r\n\r\n").starts_with("HTTP/1.1 400 "));
        assert!(ask(b"GET /nope HTTP/1.1\r\n\r\n").starts_with("HTTP/1.1 404 "));
        let m = ask(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
        assert!(m.starts_with("HTTP/1.1 200 OK\r\n"), "{m}");
        assert!(m.contains("process_open_fds"));
        let huge = vec![b'a'; MAX_HEAD];
        assert!(ask(&huge).starts_with("HTTP/1.1 431 "));
        let e = serve(&MetricsSettings {
            addr: addr.to_string(),
        })
        .unwrap_err()
        .to_string();
        assert!(
            e.contains(&format!(
                "cannot listen on --metrics-addr {addr}: address in use; pick another port"
            )),
            "{e}"
        );
        let e = serve(&MetricsSettings {
            addr: "no-port".into(),
        })
        .unwrap_err()
        .to_string();
        assert!(e.contains("give HOST:PORT"), "{e}");
    }
}
