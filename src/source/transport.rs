//! Socket transports for the replication stream: io_uring and plain tokio,
//! and TLS (rustls over tokio) when `sslmode` asks for it.
//!
//! ```text
//!   connect ──SSLRequest──► 'S' ──TLS handshake──► tokio reader over rustls
//!                           'N' ──► plain (prefer), on the transport asked for
//!   (sslmode=disable: no SSLRequest; the socket is read at once)
//!
//!   socket ──read──► BytesMut (large, reused) ──backend::parse_run──► Vec<Backend>
//!                                                    └─► bounded channel ──► ReplicationStream
//!   ReplicationStream ──Writer::write_all──► socket
//! ```
//!
//! A dedicated reader task owns the read side. It cuts whole messages out
//! of its buffer as zero-copy `Bytes` (each run of CopyData messages as one
//! `CopyRun`) and hands them over in batches, one batch per read. The channel is bounded: when the consumer falls
//! behind, the reader stops reading and TCP pushes back on the walsender.
//!
//! **Invariants**
//! - A read in flight is never cancelled: the reader task runs until the
//!   socket closes or the consumer goes away, so no bytes are lost between
//!   the kernel and the parser (an io_uring read owns its buffer).
//! - A TLS session always runs on the tokio transport: rustls is driven
//!   through tokio's `AsyncRead`/`AsyncWrite`, which io_uring's owned
//!   buffers do not offer. io_uring is used only for plain sessions.
//! - Both transports run on a current-thread runtime with a `LocalSet`
//!   (tokio-uring requires it), so tasks are spawned with `spawn_local`.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::os::fd::AsFd;
use std::rc::Rc;
use std::sync::Once;

use bytes::BytesMut;
use futures_util::FutureExt;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt, WriteHalf};
use tokio::sync::mpsc;
use tokio_rustls::client::TlsStream;
use tokio_uring::buf::BoundedBuf;

use crate::pgwire::backend::{self, Backend};
use crate::pgwire::startup::{self, SslAnswer};

use super::tls::{Connector, TlsError};
use super::{SourceError, Transport};

/// Bytes read from the socket at a time under TLS.
const TLS_SOCKET_BUFFER: usize = 256 * 1024;

/// What the reader task sends: one read's worth of messages, or why it stopped.
pub(crate) type ReadBatch = Result<Vec<Backend>, SourceError>;

/// True when this kernel lets us set up an io_uring instance.
pub fn uring_available() -> bool {
    io_uring::IoUring::new(4).is_ok()
}

/// The transport `auto` resolves to on this machine.
pub(super) fn resolve(t: Transport) -> Transport {
    match t {
        Transport::Auto if uring_available() => Transport::Uring,
        Transport::Auto => Transport::Tokio,
        other => other,
    }
}

/// Runs `fut` to completion on a current-thread runtime suited to the
/// transport: tokio-uring's for `Uring`, a plain tokio one for `Tokio`.
/// Tokio-postgres, timers and signals work on both.
pub fn block_on<F: Future>(t: Transport, fut: F) -> io::Result<F::Output> {
    match resolve(t) {
        Transport::Uring => {
            if !uring_available() {
                return Err(io::Error::new(
                    io::ErrorKind::Unsupported,
                    "io_uring is not available on this kernel (or is blocked by seccomp); use --transport tokio",
                ));
            }
            Ok(tokio_uring::start(fut))
        }
        _ => {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let local = tokio::task::LocalSet::new();
            Ok(local.block_on(&rt, fut))
        }
    }
}

/// The write side of a connection.
pub(crate) enum Writer {
    Tokio(tokio::net::tcp::OwnedWriteHalf),
    Uring(Rc<tokio_uring::net::TcpStream>),
    /// The TLS session's write half, and a duplicate of its socket's
    /// descriptor to send FIN with when dropped.
    Tls(
        WriteHalf<TlsStream<tokio::io::BufReader<tokio::net::TcpStream>>>,
        std::net::TcpStream,
    ),
}

impl Writer {
    /// Writes all of `buf` and returns it, cleared, for reuse.
    pub(crate) async fn write_all(&mut self, mut buf: BytesMut) -> io::Result<BytesMut> {
        match self {
            Writer::Tokio(w) => {
                w.write_all(&buf).await?;
                buf.clear();
                Ok(buf)
            }
            Writer::Uring(s) => {
                let (res, mut buf) = s.write_all(buf).await;
                res?;
                buf.clear();
                Ok(buf)
            }
            Writer::Tls(w, _) => {
                // rustls may hold the last records until flushed.
                w.write_all(&buf).await?;
                w.flush().await?;
                buf.clear();
                Ok(buf)
            }
        }
    }

    /// Shuts the write side down (sends FIN).
    pub(crate) async fn shutdown(&mut self) {
        match self {
            Writer::Tokio(w) => {
                let _ = w.shutdown().await;
            }
            Writer::Uring(s) => {
                let _ = s.shutdown(std::net::Shutdown::Write);
            }
            // Sends close_notify, then FIN.
            Writer::Tls(w, _) => {
                let _ = w.shutdown().await;
            }
        }
    }
}

/// A stream dropped without [`Writer::shutdown`] (its session ended on an
/// error) still ends its connection: the server sees end-of-file, closes,
/// and the reader task, which holds the read side, stops. Dropping a tokio
/// write half does this by itself; an io_uring socket shared with the
/// reader task needs it said.
impl Drop for Writer {
    fn drop(&mut self) {
        match self {
            Writer::Uring(s) => {
                let _ = s.shutdown(std::net::Shutdown::Write);
            }
            Writer::Tls(_, socket) => {
                let _ = socket.shutdown(std::net::Shutdown::Write);
            }
            Writer::Tokio(_) => {}
        }
    }
}

/// A connected, started transport: the write side, the channel the reader
/// task fills, and what the connection ended up using.
pub(crate) struct Connected {
    pub(crate) writer: Writer,
    pub(crate) rx: mpsc::Receiver<ReadBatch>,
    /// The transport actually used (io_uring falls back to tokio for TLS).
    pub(crate) transport: Transport,
    /// True when the session runs over TLS.
    pub(crate) tls: bool,
}

/// Where to connect and how to secure it.
pub(crate) struct Target<'a> {
    /// The address to connect to.
    pub(crate) addr: SocketAddr,
    /// `host:port` (and hostaddr), for errors.
    pub(crate) name: &'a str,
    /// The host the certificate is checked against.
    pub(crate) host: &'a str,
    /// TLS, unless `sslmode=disable`.
    pub(crate) tls: Option<&'a Connector>,
}

/// Connects (negotiating TLS first unless `sslmode=disable`) and spawns the
/// reader task.
pub(crate) async fn connect(
    t: Transport,
    target: Target<'_>,
    read_buffer: usize,
    queue: usize,
) -> Result<Connected, SourceError> {
    let (tx, rx) = mpsc::channel(queue);
    let want = resolve(t);
    let connect_err = |source| SourceError::Connect {
        addr: target.name.to_owned(),
        source,
    };
    let Some(connector) = target.tls else {
        let writer = match want {
            Transport::Uring => {
                let stream = tokio_uring::net::TcpStream::connect(target.addr)
                    .await
                    .map_err(connect_err)?;
                start_uring(stream, read_buffer, tx)?
            }
            _ => {
                let stream = tokio::net::TcpStream::connect(target.addr)
                    .await
                    .map_err(connect_err)?;
                start_tokio(stream, read_buffer, tx)?
            }
        };
        return Ok(Connected {
            writer,
            rx,
            transport: want,
            tls: false,
        });
    };
    // The SSLRequest goes over a tokio socket on either transport: its
    // one-byte answer is read unbuffered, so nothing the server sends
    // after it can be mistaken for part of the TLS session.
    let mut stream = tokio::net::TcpStream::connect(target.addr)
        .await
        .map_err(connect_err)?;
    let mut request = BytesMut::with_capacity(8);
    startup::ssl_request(&mut request);
    stream.write_all(&request).await?;
    let answer = SslAnswer::parse(stream.read_u8().await?)?;
    match answer {
        SslAnswer::Tls => {
            if want == Transport::Uring {
                static ONCE: Once = Once::new();
                ONCE.call_once(|| {
                    tracing::info!(
                        "the replication connection uses TLS, which the io_uring transport does not carry: using the tokio transport"
                    );
                });
            }
            stream.set_nodelay(true)?;
            let socket = std::net::TcpStream::from(stream.as_fd().try_clone_to_owned()?);
            // rustls asks the socket for a few KiB at a time; a large
            // buffer below it makes that one syscall per 256 KiB. In 8
            // drain pairs over TLS it took 0.73-0.76x the time
            // (perf/README.md, "TLS to PostgreSQL").
            let buffered = tokio::io::BufReader::with_capacity(TLS_SOCKET_BUFFER, stream);
            let tls = connector.handshake(target.host, buffered).await?;
            let (r, w) = tokio::io::split(tls);
            spawn_tls_reader(r, read_buffer, tx);
            Ok(Connected {
                writer: Writer::Tls(w, socket),
                rx,
                transport: Transport::Tokio,
                tls: true,
            })
        }
        SslAnswer::Plain => {
            connector.refused()?;
            let writer = match want {
                Transport::Uring => {
                    let stream = stream.into_std()?;
                    // tokio left it non-blocking; io_uring wants it blocking.
                    stream.set_nonblocking(false)?;
                    start_uring(
                        tokio_uring::net::TcpStream::from_std(stream),
                        read_buffer,
                        tx,
                    )?
                }
                _ => start_tokio(stream, read_buffer, tx)?,
            };
            Ok(Connected {
                writer,
                rx,
                transport: want,
                tls: false,
            })
        }
        SslAnswer::Error => Err(TlsError::Answered.into()),
    }
}

fn start_uring(
    stream: tokio_uring::net::TcpStream,
    read_buffer: usize,
    tx: mpsc::Sender<ReadBatch>,
) -> io::Result<Writer> {
    let stream = Rc::new(stream);
    stream.set_nodelay(true)?;
    let reader = Rc::clone(&stream);
    tokio::task::spawn_local(read_loop(
        move |buf| {
            let reader = Rc::clone(&reader);
            async move {
                // Read into the spare capacity after what is
                // buffered: a plain `read(buf)` would overwrite it.
                let start = buf.len();
                let (res, slice) = reader.read(buf.slice(start..)).await;
                (res, slice.into_inner())
            }
        },
        read_buffer,
        tx,
    ));
    Ok(Writer::Uring(stream))
}

fn start_tokio(
    stream: tokio::net::TcpStream,
    read_buffer: usize,
    tx: mpsc::Sender<ReadBatch>,
) -> io::Result<Writer> {
    stream.set_nodelay(true)?;
    let (r, w) = stream.into_split();
    spawn_tokio_reader(r, read_buffer, tx);
    Ok(Writer::Tokio(w))
}

fn spawn_tokio_reader<R: AsyncRead + Unpin + 'static>(
    r: R,
    read_buffer: usize,
    tx: mpsc::Sender<ReadBatch>,
) {
    let r = Rc::new(tokio::sync::Mutex::new(r));
    tokio::task::spawn_local(read_loop(
        move |mut buf: BytesMut| {
            let r = Rc::clone(&r);
            async move {
                let res = r.lock().await.read_buf(&mut buf).await;
                (res, buf)
            }
        },
        read_buffer,
        tx,
    ));
}

/// Like [`spawn_tokio_reader`], but each read also takes whatever more is
/// ready without waiting: rustls hands over one record (at most 16 KiB)
/// per read, and a batch per record would be far smaller than a plain
/// read's.
fn spawn_tls_reader<R: AsyncRead + Unpin + 'static>(
    r: R,
    read_buffer: usize,
    tx: mpsc::Sender<ReadBatch>,
) {
    /// Stop topping up below this much spare room (one TLS record).
    const MIN_SPARE: usize = 16 * 1024;
    let r = Rc::new(tokio::sync::Mutex::new(r));
    tokio::task::spawn_local(read_loop(
        move |mut buf: BytesMut| {
            let r = Rc::clone(&r);
            async move {
                let mut r = r.lock().await;
                let first = r.read_buf(&mut buf).await;
                let Ok(mut n) = first else {
                    return (first, buf);
                };
                // A read that is not ready is dropped unpolled further,
                // which loses nothing: what rustls decrypted stays in it.
                // An error or end of stream here is not lost: the next
                // read meets it (or the end of the stream) again, after
                // this data is handed on.
                while n > 0 && buf.capacity() - buf.len() >= MIN_SPARE {
                    match r.read_buf(&mut buf).now_or_never() {
                        Some(Ok(more)) if more > 0 => n += more,
                        _ => break,
                    }
                }
                (Ok(n), buf)
            }
        },
        read_buffer,
        tx,
    ));
}

/// The reader task: read, frame, send a batch; repeat until EOF, an error,
/// or the consumer dropping the channel.
async fn read_loop<R, Fut>(mut read: R, read_buffer: usize, tx: mpsc::Sender<ReadBatch>)
where
    R: FnMut(BytesMut) -> Fut,
    Fut: Future<Output = (io::Result<usize>, BytesMut)>,
{
    let mut buf = BytesMut::with_capacity(read_buffer);
    loop {
        if buf.capacity() - buf.len() < read_buffer / 4 {
            buf.reserve(read_buffer);
        }
        let (res, b) = read(buf).await;
        buf = b;
        let n = match res {
            Ok(n) => n,
            Err(e) => {
                let _ = tx.send(Err(SourceError::Io(e))).await;
                return;
            }
        };
        if n == 0 {
            let _ = tx.send(Err(SourceError::Closed)).await;
            return;
        }
        let mut batch = Vec::new();
        loop {
            match backend::parse_run(&mut buf, backend::DEFAULT_MAX_FRAME) {
                Ok(Some(m)) => batch.push(m),
                Ok(None) => break,
                Err(e) => {
                    if !batch.is_empty() {
                        let _ = tx.send(Ok(batch)).await;
                    }
                    let _ = tx.send(Err(SourceError::Decode(e))).await;
                    return;
                }
            }
        }
        if !batch.is_empty() && tx.send(Ok(batch)).await.is_err() {
            return;
        }
    }
}
