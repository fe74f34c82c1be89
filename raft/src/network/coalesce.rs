//! Write coalescing for the connections between nodes.
//!
//! An HTTP/2 connection task writes and flushes each time it runs. Under load, several calls
//! forwarded at about the same moment (each woken by its own client connection, or by the
//! same read of an upstream's output) would each cost a `writev` and, on the other node, a
//! wake-up and a read. [`Coalesce`] holds written bytes until the flush, and the first flush
//! after a write yields once to the runtime: every task that was ready by then adds its
//! frames, and one system call carries them all. An idle connection pays one extra poll of
//! its task per flush, no timer, no added wait beyond the tasks already queued.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Above this many pending bytes a write goes out without waiting for the flush.
const MAX_PENDING: usize = 256 * 1024;

/// An I/O stream whose writes are gathered until flushed (see the module docs).
pub(crate) struct Coalesce<T> {
    io: T,
    pending: Vec<u8>,
    /// Bytes of `pending` already written.
    sent: usize,
    /// The current flush has yielded once already.
    yielded: bool,
}

impl<T> Coalesce<T> {
    pub(crate) fn new(io: T) -> Self {
        Coalesce {
            io,
            pending: Vec::new(),
            sent: 0,
            yielded: false,
        }
    }
}

impl<T: AsyncWrite + Unpin> Coalesce<T> {
    /// Write out everything pending.
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.sent < self.pending.len() {
            let n = ready!(Pin::new(&mut self.io).poll_write(cx, &self.pending[self.sent..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.sent += n;
        }
        self.pending.clear();
        self.sent = 0;
        Poll::Ready(Ok(()))
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Coalesce<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Coalesce<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.poll_write_vectored(cx, &[io::IoSlice::new(buf)])
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        if self.pending.len() >= MAX_PENDING {
            ready!(self.poll_drain(cx))?;
        }
        let mut n = 0;
        for b in bufs {
            self.pending.extend_from_slice(b);
            n += b.len();
        }
        Poll::Ready(Ok(n))
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.sent < self.pending.len() && !self.yielded {
            // Let the tasks already queued add their frames first. A task that wakes itself
            // while running goes to the back of the run queue.
            self.yielded = true;
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        ready!(self.poll_drain(cx))?;
        self.yielded = false;
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.poll_drain(cx))?;
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

impl<T: tonic::transport::server::Connected> tonic::transport::server::Connected for Coalesce<T> {
    type ConnectInfo = T::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.io.connect_info()
    }
}

/// Dials the peers (TCP, `TCP_NODELAY`, from a given source address) and wraps each
/// connection in [`Coalesce`]; tonic runs mutual TLS and the connect timeout on top.
#[derive(Clone)]
pub(crate) struct Connector {
    http: hyper_util::client::legacy::connect::HttpConnector,
}

type Io = hyper_util::rt::TokioIo<Coalesce<tokio::net::TcpStream>>;

impl Connector {
    pub(crate) fn new(local_ip: Option<std::net::IpAddr>) -> Self {
        let mut http = hyper_util::client::legacy::connect::HttpConnector::new();
        http.enforce_http(false);
        http.set_nodelay(true);
        http.set_local_address(local_ip);
        Connector { http }
    }
}

impl tonic::codegen::Service<http::Uri> for Connector {
    type Response = Io;
    type Error = Box<dyn std::error::Error + Send + Sync>;
    type Future = Pin<Box<dyn std::future::Future<Output = Result<Io, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.http.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, uri: http::Uri) -> Self::Future {
        let connecting = self.http.call(uri);
        Box::pin(async move {
            let tcp = connecting.await?.into_inner();
            Ok(hyper_util::rt::TokioIo::new(Coalesce::new(tcp)))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn writes_wait_for_the_flush_and_arrive_whole_and_in_order() {
        let (a, mut b) = tokio::io::duplex(1 << 20);
        let mut w = Coalesce::new(a);
        w.write_all(b"hello ").await.unwrap();
        w.write_all(b"world").await.unwrap();
        // Nothing has left before the flush.
        let mut probe = [0u8; 1];
        assert!(
            futures::FutureExt::now_or_never(b.read(&mut probe)).is_none(),
            "bytes left before the flush"
        );
        w.flush().await.unwrap();
        let mut got = vec![0u8; 11];
        b.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"hello world");
    }

    #[tokio::test]
    async fn a_large_backlog_is_written_without_a_flush_and_shutdown_drains() {
        let (a, mut b) = tokio::io::duplex(4 * MAX_PENDING);
        let mut w = Coalesce::new(a);
        let chunk = vec![7u8; MAX_PENDING];
        w.write_all(&chunk).await.unwrap();
        // The next write finds the limit reached and sends the backlog first.
        w.write_all(b"x").await.unwrap();
        let mut got = vec![0u8; MAX_PENDING];
        b.read_exact(&mut got).await.unwrap();
        assert!(got.iter().all(|&c| c == 7));
        w.shutdown().await.unwrap();
        let mut rest = Vec::new();
        b.read_to_end(&mut rest).await.unwrap();
        assert_eq!(rest, b"x");
    }
}
