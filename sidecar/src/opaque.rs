//! Opaque TCP on the inbound listener: a connection that is neither TLS nor HTTP is forwarded
//! to the app byte for byte, with Linkerd's `tcp_*` counters.
//!
//! Detection reads nothing: it peeks at the first byte. `0x16` opens a TLS handshake; an
//! uppercase ASCII letter opens an HTTP/1 request line (`GET `, `POST `, ...) or the HTTP/2
//! preface (`PRI * HTTP/2.0`); anything else is opaque. A client that sends nothing for
//! [`DEFAULT_DETECT_TIMEOUT`] is waiting for the server to speak first (SMTP, MySQL): that
//! connection is opaque too. Client-first text protocols whose first byte is an uppercase
//! letter (Redis inline commands, for one) are taken for HTTP and get a 400; name them opaque
//! by sending them some other way, as in Linkerd.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use crate::metrics::{Metrics, TcpLabels};

/// How long a silent client may wait before its connection is taken for a server-first
/// protocol (Linkerd's default).
pub const DEFAULT_DETECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Where opaque connections go, and how they are counted.
#[derive(Clone, Debug)]
pub struct Opaque {
    /// The local app.
    pub app: SocketAddr,
    /// Golden metrics; the `tcp_*` families count opaque connections.
    pub metrics: Metrics,
    /// See [`DEFAULT_DETECT_TIMEOUT`].
    pub detect_timeout: Duration,
    /// The port's policy, checked before a connection is forwarded.
    pub authz: Option<crate::authz::Authz>,
}

impl Opaque {
    /// Whether the port's Server declares it opaque.
    pub fn declared_opaque(&self) -> bool {
        self.authz.as_ref().is_some_and(crate::authz::Authz::opaque)
    }
}

/// What a connection speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    /// A TLS ClientHello.
    Tls,
    /// HTTP/1 or HTTP/2 (prior knowledge).
    Http,
    /// Anything else.
    Opaque,
}

/// Classifies a connection's first byte; see the module docs.
pub fn classify(first: Option<u8>) -> Protocol {
    match first {
        Some(0x16) => Protocol::Tls,
        Some(b'A'..=b'Z') | None => Protocol::Http,
        Some(_) => Protocol::Opaque,
    }
}

/// Waits for the client's first byte (without reading it) and classifies the connection; with
/// `timeout`, a silent client is [`Protocol::Opaque`].
pub async fn detect(io: &TcpStream, timeout: Option<Duration>) -> Protocol {
    let mut first = [0u8; 1];
    let peek = io.peek(&mut first);
    let peeked = match timeout {
        Some(t) => match tokio::time::timeout(t, peek).await {
            Ok(r) => r,
            Err(_) => return Protocol::Opaque,
        },
        None => peek.await,
    };
    match peeked {
        Ok(1) => classify(Some(first[0])),
        // Closed or failed before a byte: let the HTTP server see the end.
        _ => classify(None),
    }
}

/// Forwards `client` (connected from `peer`) to the app until either side closes, if the port's
/// policy admits it; a refused connection is closed at once.
pub async fn forward(client: TcpStream, peer: SocketAddr, opaque: &Opaque) -> io::Result<()> {
    if let Some(authz) = &opaque.authz
        && let Err(denied) = authz.check_tcp(peer.ip())
    {
        tracing::info!(%peer, %denied, "inbound opaque connection refused");
        return Ok(());
    }
    let labels = TcpLabels {
        direction: "inbound",
    };
    let m = &opaque.metrics;
    m.tcp_open.get_or_create(&labels).inc();
    m.tcp_open_connections.get_or_create(&labels).inc();
    let result = async {
        let app = tokio::time::timeout(Duration::from_secs(1), TcpStream::connect(opaque.app))
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "connecting to the app"))??;
        let _ = app.set_nodelay(true);
        let mut from_client = Counted {
            inner: client,
            read: m.tcp_read_bytes.get_or_create(&labels).clone(),
        };
        let mut from_app = Counted {
            inner: app,
            read: m.tcp_write_bytes.get_or_create(&labels).clone(),
        };
        tokio::io::copy_bidirectional(&mut from_client, &mut from_app)
            .await
            .map(|_| ())
    }
    .await;
    m.tcp_open_connections.get_or_create(&labels).dec();
    m.tcp_close.get_or_create(&labels).inc();
    result
}

/// A stream whose reads are added to a counter as they happen, so long-lived connections show
/// their bytes before they close.
struct Counted<S> {
    inner: S,
    read: Counter,
}

impl<S: AsyncRead + Unpin> AsyncRead for Counted<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let poll = Pin::new(&mut self.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = &poll {
            let n = buf.filled().len().saturating_sub(before);
            self.read.inc_by(u64::try_from(n).unwrap_or(u64::MAX));
        }
        poll
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Counted<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_bytes_name_the_protocol() {
        assert_eq!(classify(Some(0x16)), Protocol::Tls);
        for b in *b"GPDHOCTP" {
            assert_eq!(classify(Some(b)), Protocol::Http, "{}", b as char);
        }
        for b in [0u8, 0x03, b'*', b'g', 0xff] {
            assert_eq!(classify(Some(b)), Protocol::Opaque, "{b:#x}");
        }
        assert_eq!(classify(None), Protocol::Http);
    }
}
