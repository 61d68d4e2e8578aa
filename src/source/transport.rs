//! Socket transports for the replication stream: io_uring and plain tokio.
//!
//! ```text
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
//! - Both transports run on a current-thread runtime with a `LocalSet`
//!   (tokio-uring requires it), so tasks are spawned with `spawn_local`.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::rc::Rc;

use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio_uring::buf::BoundedBuf;

use crate::pgwire::backend::{self, Backend};

use super::{SourceError, Transport};

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
        if let Writer::Uring(s) = self {
            let _ = s.shutdown(std::net::Shutdown::Write);
        }
    }
}

/// Connects and spawns the reader task. Returns the writer and the channel
/// the reader fills.
pub(crate) async fn connect(
    t: Transport,
    addr: SocketAddr,
    read_buffer: usize,
    queue: usize,
) -> io::Result<(Writer, mpsc::Receiver<ReadBatch>)> {
    let (tx, rx) = mpsc::channel(queue);
    match resolve(t) {
        Transport::Uring => {
            let stream = Rc::new(tokio_uring::net::TcpStream::connect(addr).await?);
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
            Ok((Writer::Uring(stream), rx))
        }
        _ => {
            let stream = tokio::net::TcpStream::connect(addr).await?;
            stream.set_nodelay(true)?;
            let (r, w) = stream.into_split();
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
            Ok((Writer::Tokio(w), rx))
        }
    }
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
