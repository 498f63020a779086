//! Opaque TCP: connections the proxy does not parse, forwarded byte for byte with Linkerd's
//! `tcp_*` counters, on both listeners.
//!
//! Detection peeks (reads nothing) until the client's first bytes decide: `0x16` opens a TLS
//! handshake; the HTTP/2 preface (`PRI * HTTP/2.0`) or a whole HTTP/1 request line
//! (`METHOD target HTTP/1.x`) is HTTP; anything else is opaque. Checking the whole request line,
//! not its first letter, keeps client-first text protocols that start with a capital letter
//! (Redis inline commands such as `PING` or `GET key`) from being taken for HTTP. A client that
//! sends nothing for the detect timeout is waiting for the server to speak first (SMTP, MySQL):
//! that connection is opaque too. Ports known to carry such protocols can be declared opaque
//! ([`Ports`]) so their connections are never sniffed, and never wait.

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

/// Where the inbound listener's opaque connections go, and how they are counted.
#[derive(Clone, Debug)]
pub struct Opaque {
    /// The local app.
    pub app: SocketAddr,
    /// Golden metrics; the `tcp_*` families count opaque connections.
    pub metrics: Metrics,
    /// The labels of the workload's connections (`direction="inbound"`, its service).
    pub labels: TcpLabels,
    /// See [`DEFAULT_DETECT_TIMEOUT`].
    pub detect_timeout: Duration,
    /// The port's policy, checked before a connection is forwarded.
    pub authz: Option<crate::authz::Authz>,
    /// Ports whose redirected connections are forwarded without detection.
    pub opaque_ports: Ports,
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

/// Longest request line detection waits for; a longer valid prefix is taken for HTTP (a long
/// URI) and left to the HTTP server to judge.
pub const MAX_PEEK: usize = 8 * 1024;

/// The HTTP/2 connection preface's first line.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n";

/// Classifies a connection by the bytes its client sent first; `None` while they do not decide
/// yet (a request line still arriving). See the module docs.
pub fn classify(buf: &[u8]) -> Option<Protocol> {
    let first = *buf.first()?;
    if first == 0x16 {
        return Some(Protocol::Tls);
    }
    let n = buf.len().min(H2_PREFACE.len());
    if buf[..n] == H2_PREFACE[..n] {
        return (n == H2_PREFACE.len()).then_some(Protocol::Http);
    }
    match request_line(buf) {
        Some(true) => Some(Protocol::Http),
        Some(false) => Some(Protocol::Opaque),
        None if buf.len() >= MAX_PEEK => Some(Protocol::Http),
        None => None,
    }
}

/// Whether `buf` opens with an HTTP/1 request line (`METHOD SP target SP HTTP/1.d CRLF`):
/// `Some(true)` when it does, `Some(false)` when it cannot, `None` while it might.
fn request_line(buf: &[u8]) -> Option<bool> {
    let mut i = 0;
    // The method: a token of capitals (`GET`, `PROPFIND`, `VERSION-CONTROL`).
    while i < buf.len() && (buf[i].is_ascii_uppercase() || buf[i] == b'-' || buf[i] == b'_') {
        i += 1;
    }
    if i == buf.len() {
        // No method is this long.
        return if i <= 32 { None } else { Some(false) };
    }
    if i == 0 || buf[i] != b' ' {
        return Some(false);
    }
    i += 1;
    // The request target: visible characters.
    let target = i;
    while i < buf.len() && buf[i] > b' ' && buf[i] != 0x7f {
        i += 1;
    }
    if i == buf.len() {
        return None;
    }
    if i == target || buf[i] != b' ' {
        return Some(false);
    }
    i += 1;
    // The version, then the line's end.
    let rest = &buf[i..];
    for expected in [
        &b"HTTP/1.1\r\n"[..],
        b"HTTP/1.0\r\n",
        b"HTTP/1.1\n",
        b"HTTP/1.0\n",
    ] {
        let n = rest.len().min(expected.len());
        if rest[..n] == expected[..n] {
            return (n == expected.len()).then_some(true);
        }
    }
    Some(false)
}

/// Waits for the client's first bytes (without reading them) and classifies the connection.
/// With `timeout`, a client that has sent nothing, or not enough to decide, by then is
/// [`Protocol::Opaque`]; without one, the first byte decides as it always did (a capital letter
/// is HTTP), since nothing else would bound the wait.
pub async fn detect(io: &TcpStream, timeout: Option<Duration>) -> Protocol {
    let Some(timeout) = timeout else {
        let mut first = [0u8; 1];
        return match io.peek(&mut first).await {
            Ok(1) if first[0] == 0x16 => Protocol::Tls,
            Ok(1) if !first[0].is_ascii_uppercase() => Protocol::Opaque,
            // A capital letter, or closed before a byte: let the HTTP server see it.
            _ => Protocol::Http,
        };
    };
    let peeking = async {
        let mut buf = vec![0u8; MAX_PEEK];
        let mut seen = 0;
        let mut pause = Duration::from_millis(1);
        loop {
            match io.peek(&mut buf).await {
                // Closed before a byte: let the HTTP server see the end.
                Ok(0) | Err(_) => return Protocol::Http,
                Ok(n) => {
                    if let Some(p) = classify(&buf[..n]) {
                        return p;
                    }
                    // A request line still arriving: peeking again at once would return the
                    // same bytes, so wait a little, longer each time nothing new came.
                    pause = if n > seen {
                        Duration::from_millis(1)
                    } else {
                        (pause * 2).min(Duration::from_millis(50))
                    };
                    seen = n;
                    tokio::time::sleep(pause).await;
                }
            }
        }
    };
    tokio::time::timeout(timeout, peeking)
        .await
        .unwrap_or(Protocol::Opaque)
}

/// A set of ports, from a list like `25,587,3306,5432-5433`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Ports(Vec<std::ops::RangeInclusive<u16>>);

/// Ports whose protocols are opaque by default (Linkerd's list): SMTP (25, 587), MySQL (3306),
/// Galera (4444), PostgreSQL (5432), Redis (6379), Elasticsearch transport (9300), memcached
/// (11211). Most of them are server-first, which detection could only learn by waiting.
pub const DEFAULT_OPAQUE_PORTS: &str = "25,587,3306,4444,5432,6379,9300,11211";

impl Ports {
    /// Whether `port` is in the set.
    pub fn contains(&self, port: u16) -> bool {
        self.0.iter().any(|r| r.contains(&port))
    }
}

impl std::str::FromStr for Ports {
    type Err = String;

    fn from_str(list: &str) -> Result<Self, String> {
        let mut ranges = Vec::new();
        for item in list.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let port = |p: &str| {
                p.trim()
                    .parse::<u16>()
                    .ok()
                    .filter(|p| *p > 0)
                    .ok_or_else(|| format!("{p:?} is not a port (1-65535)"))
            };
            let range = match item.split_once('-') {
                Some((lo, hi)) => {
                    let (lo, hi) = (port(lo)?, port(hi)?);
                    if lo > hi {
                        return Err(format!("{item:?} is an empty range"));
                    }
                    lo..=hi
                }
                None => {
                    let p = port(item)?;
                    p..=p
                }
            };
            ranges.push(range);
        }
        Ok(Self(ranges))
    }
}

impl std::fmt::Display for Ports {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let items: Vec<String> = self
            .0
            .iter()
            .map(|r| {
                if r.start() == r.end() {
                    r.start().to_string()
                } else {
                    format!("{}-{}", r.start(), r.end())
                }
            })
            .collect();
        f.write_str(&items.join(","))
    }
}

/// Forwards `client` (connected from `peer`, proven as `identity` over mTLS when set) to the
/// app until either side closes, if the port's policy admits it; a refused connection is closed
/// at once.
pub async fn forward<C>(
    client: C,
    peer: SocketAddr,
    identity: Option<&str>,
    opaque: &Opaque,
) -> io::Result<()>
where
    C: AsyncRead + AsyncWrite + Unpin,
{
    if let Some(authz) = &opaque.authz
        && let Err(denied) = authz.check_tcp(peer.ip(), identity)
    {
        tracing::info!(%peer, identity, %denied, "inbound opaque connection refused");
        return Ok(());
    }
    let labels = TcpLabels {
        tls: if identity.is_some() { "true" } else { "" },
        ..opaque.labels.clone()
    };
    let app = opaque.app;
    relay(client, &labels, &opaque.metrics, async move {
        tokio::time::timeout(Duration::from_secs(1), TcpStream::connect(app))
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "connecting to the app"))?
    })
    .await
}

/// Bytes read at a time in each direction of a relayed connection: twice tokio's 8 KiB default,
/// so bulk transfers take fewer system calls per byte, while an idle connection (a pooled
/// database connection) still holds only 32 KiB of buffers.
const RELAY_BUFFER: usize = 16 * 1024;

/// Connects with `connect` and copies bytes both ways between `client` and the connection until
/// either side closes, counting the connection and its bytes as they flow under `labels`.
pub async fn relay<C, S>(
    client: C,
    labels: &TcpLabels,
    metrics: &Metrics,
    connect: impl std::future::Future<Output = io::Result<S>>,
) -> io::Result<()>
where
    C: AsyncRead + AsyncWrite + Unpin,
    S: AsyncRead + AsyncWrite + Unpin,
{
    let m = metrics;
    m.tcp_open.get_or_create(labels).inc();
    m.tcp_open_connections.get_or_create(labels).inc();
    let result = async {
        let server = connect.await?;
        let mut from_client = Counted {
            inner: client,
            read: m.tcp_read_bytes.get_or_create(labels).clone(),
        };
        let mut from_server = Counted {
            inner: server,
            read: m.tcp_write_bytes.get_or_create(labels).clone(),
        };
        tokio::io::copy_bidirectional_with_sizes(
            &mut from_client,
            &mut from_server,
            RELAY_BUFFER,
            RELAY_BUFFER,
        )
        .await
        .map(|_| ())
    }
    .await;
    m.tcp_open_connections.get_or_create(labels).dec();
    m.tcp_close.get_or_create(labels).inc();
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
        let http = [
            &b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"[..],
            b"POST /a?b=c HTTP/1.0\r\n",
            b"PROPFIND /x HTTP/1.1\n",
            b"CONNECT db:5432 HTTP/1.1\r\n",
            b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
        ];
        for b in http {
            assert_eq!(classify(b), Some(Protocol::Http), "{}", b.escape_ascii());
        }
        assert_eq!(classify(&[0x16, 0x03, 0x01]), Some(Protocol::Tls));
        let opaque = [
            // Redis: RESP and inline commands.
            &b"*1\r\n$4\r\nPING\r\n"[..],
            b"PING\r\n",
            b"GET key\r\n",
            b"SET key value\r\n",
            // Not a request: a response, lowercase, binary, a bad version.
            b"HTTP/1.1 200 OK\r\n",
            b"get / HTTP/1.1\r\n",
            &[0u8, 0, 0, 8, 4, 210, 22, 47],
            b"GET / HTTP/3.0\r\n",
            b"GET  / HTTP/1.1\r\n",
        ];
        for b in opaque {
            assert_eq!(classify(b), Some(Protocol::Opaque), "{}", b.escape_ascii());
        }
    }

    #[test]
    fn a_request_line_still_arriving_waits_for_more() {
        for b in [
            &b""[..],
            b"G",
            b"GET",
            b"GET /index",
            b"GET / HTTP/1",
            b"GET / HTTP/1.1\r",
            b"PRI * HTT",
        ] {
            assert_eq!(classify(b), None, "{}", b.escape_ascii());
        }
        // A very long target is left to the HTTP server.
        let mut long = b"GET /".to_vec();
        long.resize(MAX_PEEK, b'a');
        assert_eq!(classify(&long), Some(Protocol::Http));
    }

    #[test]
    fn port_lists_take_ranges_and_name_what_is_wrong() {
        let ports: Ports = "25, 3306,5432-5433".parse().unwrap();
        for p in [25, 3306, 5432, 5433] {
            assert!(ports.contains(p), "{p}");
        }
        for p in [24, 26, 5431, 5434] {
            assert!(!ports.contains(p), "{p}");
        }
        assert_eq!(ports.to_string(), "25,3306,5432-5433");
        let defaults: Ports = DEFAULT_OPAQUE_PORTS.parse().unwrap();
        assert!(defaults.contains(6379) && !defaults.contains(80));
        assert_eq!("".parse::<Ports>().unwrap(), Ports::default());
        for bad in ["http", "0", "70000", "9-1", "1-"] {
            let err = bad.parse::<Ports>().unwrap_err();
            assert!(
                err.contains("is not a port") || err.contains("empty range"),
                "{bad}: {err}"
            );
        }
    }

    /// Real sockets: a client that sends nothing is opaque after the timeout; one that trickles
    /// a request line in pieces is HTTP once the line is whole.
    #[tokio::test]
    async fn detection_waits_for_the_line_and_gives_up_on_silence() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let _silent = TcpStream::connect(addr).await.unwrap();
        let (io, _) = listener.accept().await.unwrap();
        let timeout = Some(Duration::from_millis(100));
        assert_eq!(detect(&io, timeout).await, Protocol::Opaque);

        let mut trickle = TcpStream::connect(addr).await.unwrap();
        let (io, _) = listener.accept().await.unwrap();
        let writer = tokio::spawn(async move {
            use tokio::io::AsyncWriteExt;
            for part in [&b"GET /pa"[..], b"th HTTP/1", b".1\r\nHost: x\r\n\r\n"] {
                trickle.write_all(part).await.unwrap();
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            trickle
        });
        assert_eq!(
            detect(&io, Some(Duration::from_secs(30))).await,
            Protocol::Http
        );
        drop(writer.await.unwrap());
    }
}
