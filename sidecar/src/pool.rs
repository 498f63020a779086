//! The proxy's pooled HTTP clients: how a request reaches an endpoint, a peer proxy or the local
//! app on a connection kept open for the next one.
//!
//! ```text
//! Http1   a stack of idle connections per address; a request takes the most recently used
//!         ready one, or opens its own. The connection goes back when the response body
//!         ends (not when the head arrives), so a finished request costs no task of its own.
//!         A connection the server closed while idle hands the request back unsent, and the
//!         next one is tried.
//! Http2   one connection per address, shared by every request to it; requests that arrive
//!         while it is being made wait for that one instead of opening their own.
//! ```
//!
//! Connections idle for [`POOL_IDLE_TIMEOUT`] are closed by one sleeping task per pool, started
//! with its first connection. How a connection is made (TCP, or mTLS to a peer proxy with the
//! identity it must present) is the [`Connect`] it is given; failing there is
//! [`Error::Connect`], which means nothing was sent.
//!
//! This is what hyper-util's general-purpose pooled client did for the proxy, without what the
//! proxy never needs (name resolution, proxies, keys built from URIs per request, a checkout
//! racing a connect, a spawned task per HTTP/1.1 request waiting for its connection to be
//! ready again).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::FutureExt;
use futures_util::future::{BoxFuture, Shared};
use http::header::{HOST, HeaderValue};
use http::{Request, Response, StatusCode, Uri};
use hyper::body::{Body as HttpBody, Frame, Incoming, SizeHint};
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpStream;

/// How long an idle pooled connection is kept.
pub const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(30);

/// An error that may be shared by every request waiting on one connection.
pub type SharedError = Arc<dyn std::error::Error + Send + Sync>;

/// Why a pooled request got no response.
#[derive(Clone, Debug, thiserror::Error)]
pub enum Error {
    /// No connection could be made (TCP, TLS, or the HTTP handshake): nothing was sent.
    #[error("{source}")]
    Connect {
        /// What failed, naming the address.
        #[source]
        source: SharedError,
    },
    /// The request went out (or may have) on a connection that failed before the response.
    #[error("{source}")]
    Send {
        /// hyper's error.
        #[source]
        source: SharedError,
    },
}

impl Error {
    /// Whether nothing was sent, so the request may be sent elsewhere.
    pub fn is_connect(&self) -> bool {
        matches!(self, Self::Connect { .. })
    }

    fn connect(e: impl std::error::Error + Send + Sync + 'static) -> Self {
        Self::Connect {
            source: Arc::new(e),
        }
    }

    fn send(e: hyper::Error) -> Self {
        Self::Send {
            source: Arc::new(e),
        }
    }
}

/// Why a connection could not be made; it names the address.
pub type ConnectError = Box<dyn std::error::Error + Send + Sync>;

/// A connection's bytes, whatever carries them (TCP, or TLS over TCP).
pub trait Io: hyper::rt::Read + hyper::rt::Write + Send + Unpin + 'static {}

impl<T: hyper::rt::Read + hyper::rt::Write + Send + Unpin + 'static> Io for T {}

/// What every pool sends on: one connection type and one request body type, so hyper's
/// clients are compiled once for the proxy rather than once per pool (their code is most of a
/// proxy's resident memory; see docs/benchmarks.md).
pub type BoxIo = Box<dyn Io>;

/// The body of a request a pool sends.
pub type RequestBody = http_body_util::combinators::BoxBody<Bytes, ConnectError>;

/// How a pool opens a connection to an address.
pub trait Connect: Clone + Send + Sync + 'static {
    /// Opens a connection to `addr`.
    fn connect(&self, addr: SocketAddr) -> BoxFuture<'static, Result<BoxIo, ConnectError>>;
}

/// Plain TCP with `TCP_NODELAY`, failing when the connection is not made within the timeout.
#[derive(Clone, Copy, Debug)]
pub struct Tcp {
    /// How long a connection may take.
    pub timeout: Duration,
}

/// Why a TCP connection failed.
#[derive(Debug, thiserror::Error)]
pub enum TcpError {
    /// The connect took longer than the timeout.
    #[error("connecting to {0} timed out")]
    Timeout(SocketAddr),
    /// The connect failed.
    #[error("connecting to {addr}: {source}")]
    Io {
        /// Where.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
}

impl Connect for Tcp {
    fn connect(&self, addr: SocketAddr) -> BoxFuture<'static, Result<BoxIo, ConnectError>> {
        let timeout = self.timeout;
        Box::pin(async move {
            let tcp = tokio::time::timeout(timeout, TcpStream::connect(addr))
                .await
                .map_err(|_| TcpError::Timeout(addr))?
                .map_err(|source| TcpError::Io { addr, source })?;
            let _ = tcp.set_nodelay(true);
            Ok(Box::new(TokioIo::new(tcp)) as BoxIo)
        })
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Starts the pool's idle reaper once, on the first connection: it holds the pool weakly and
/// ends with it.
fn start_reaper<S: Reap>(started: &std::sync::atomic::AtomicBool, pool: Weak<S>) {
    use std::sync::atomic::Ordering;
    if started.swap(true, Ordering::Relaxed) {
        return;
    }
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(S::idle_timeout() / 2).await;
            let Some(pool) = pool.upgrade() else { return };
            pool.reap(Instant::now());
        }
    });
}

/// A pool whose idle connections can be closed.
trait Reap: Send + Sync + 'static {
    fn reap(&self, now: Instant);
    fn idle_timeout() -> Duration {
        POOL_IDLE_TIMEOUT
    }
}

/// Pooled HTTP/1.1 connections; see the [module](self).
#[derive(Clone)]
pub struct Http1<C: Connect> {
    inner: Arc<Http1Inner<C>>,
}

impl<C: Connect> Http1<C> {
    /// Idle connections, across addresses.
    pub fn idle_count(&self) -> usize {
        lock(&self.inner.idle).values().map(Vec::len).sum()
    }
}

impl<C: Connect> std::fmt::Debug for Http1<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Http1")
            .field("idle", &self.idle_count())
            .finish()
    }
}

struct Http1Inner<C> {
    connect: C,
    idle: Mutex<BTreeMap<SocketAddr, Vec<Idle>>>,
    reaper: std::sync::atomic::AtomicBool,
}

struct Idle {
    tx: http1::SendRequest<RequestBody>,
    since: Instant,
}

impl<C: Connect> Http1<C> {
    /// A pool opening its connections with `connect`.
    pub fn new(connect: C) -> Self {
        Self {
            inner: Arc::new(Http1Inner {
                connect,
                idle: Mutex::default(),
                reaper: Default::default(),
            }),
        }
    }

    /// Sends `req` to `addr`: on an idle connection when one is ready, else on a new one.
    /// The request's URI may be absolute (Host is set from it when missing); it is sent in
    /// origin form. An `Upgrade` request whose answer is 101 keeps its connection, which is
    /// never pooled again.
    pub async fn send(
        &self,
        addr: SocketAddr,
        mut req: Request<RequestBody>,
    ) -> Result<Response<Body>, Error> {
        if let Some(authority) = req.uri().authority()
            && !req.headers().contains_key(HOST)
            && let Ok(v) = HeaderValue::from_str(authority.as_str())
        {
            req.headers_mut().insert(HOST, v);
        }
        origin_form(req.uri_mut());
        while let Some(mut tx) = self.checkout(addr) {
            match tx.try_send_request(req).await {
                Ok(rsp) => return Ok(self.on_end(addr, tx, rsp)),
                Err(mut e) => match e.take_message() {
                    // Closed by the server while idle, before this request went out.
                    Some(unsent) => req = unsent,
                    None => return Err(Error::send(e.into_error())),
                },
            }
        }
        let io = self
            .inner
            .connect
            .connect(addr)
            .await
            .map_err(|e| Error::Connect { source: e.into() })?;
        let (mut tx, conn) = http1::handshake(io).await.map_err(Error::connect)?;
        tokio::spawn(async move {
            if let Err(error) = conn.with_upgrades().await {
                tracing::debug!(%addr, %error, "pooled HTTP/1.1 connection ended with an error");
            }
        });
        start_reaper(&self.inner.reaper, Arc::downgrade(&self.inner));
        match tx.try_send_request(req).await {
            Ok(rsp) => Ok(self.on_end(addr, tx, rsp)),
            // On a connection just made, a request handed back unsent means it closed at once.
            Err(mut e) => {
                let unsent = e.take_message().is_some();
                let e = e.into_error();
                Err(if unsent {
                    Error::connect(e)
                } else {
                    Error::send(e)
                })
            }
        }
    }

    /// The most recently used idle connection to `addr` that is ready; closed ones are dropped.
    fn checkout(&self, addr: SocketAddr) -> Option<http1::SendRequest<RequestBody>> {
        let mut idle = lock(&self.inner.idle);
        let list = idle.get_mut(&addr)?;
        while let Some(Idle { tx, .. }) = list.pop() {
            if tx.is_ready() {
                return Some(tx);
            }
        }
        idle.remove(&addr);
        None
    }

    /// The response, its connection going back to the pool when its body ends.
    fn on_end(
        &self,
        addr: SocketAddr,
        tx: http1::SendRequest<RequestBody>,
        rsp: Response<Incoming>,
    ) -> Response<Body> {
        if rsp.status() == StatusCode::SWITCHING_PROTOCOLS {
            // The connection is the tunnel's now.
            return rsp.map(Body::plain);
        }
        let pool = Arc::downgrade(&self.inner);
        rsp.map(|body| Body {
            inner: body,
            on_end: Some(Box::new(move || {
                if let Some(pool) = pool.upgrade() {
                    pool.checkin(addr, tx);
                }
            })),
        })
    }
}

impl<C: Connect> Http1Inner<C> {
    fn checkin(self: Arc<Self>, addr: SocketAddr, mut tx: http1::SendRequest<RequestBody>) {
        if tx.is_ready() {
            self.put(addr, tx);
        } else if !tx.is_closed() {
            // Still writing the request body (the server answered early), or on another
            // thread, not yet back to idle: wait for it without holding anyone up.
            tokio::spawn(async move {
                if tx.ready().await.is_ok() {
                    self.put(addr, tx);
                }
            });
        }
    }

    fn put(&self, addr: SocketAddr, tx: http1::SendRequest<RequestBody>) {
        lock(&self.idle).entry(addr).or_default().push(Idle {
            tx,
            since: Instant::now(),
        });
    }
}

impl<C: Connect> Reap for Http1Inner<C> {
    fn reap(&self, now: Instant) {
        lock(&self.idle).retain(|_, list| {
            list.retain(|i| {
                !i.tx.is_closed() && now.duration_since(i.since) < Self::idle_timeout()
            });
            !list.is_empty()
        });
    }
}

/// The request target of an HTTP/1.1 request to an origin server: its path and query.
fn origin_form(uri: &mut Uri) {
    if uri.scheme().is_none() && uri.authority().is_none() {
        return;
    }
    *uri = match uri.path_and_query() {
        Some(path) if path.as_str() != "/" => Uri::from(path.clone()),
        _ => Uri::default(),
    };
}

/// Pooled HTTP/2 connections, one per address; see the [module](self).
#[derive(Clone)]
pub struct Http2<C: Connect> {
    inner: Arc<Http2Inner<C>>,
}

impl<C: Connect> std::fmt::Debug for Http2<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Http2")
            .field("connections", &lock(&self.inner.conns).len())
            .finish()
    }
}

type Connecting = Shared<BoxFuture<'static, Result<http2::SendRequest<RequestBody>, Error>>>;

struct Http2Inner<C> {
    connect: C,
    conns: Mutex<BTreeMap<SocketAddr, Slot>>,
    reaper: std::sync::atomic::AtomicBool,
}

enum Slot {
    Ready {
        tx: http2::SendRequest<RequestBody>,
        used: Instant,
    },
    Connecting(Connecting),
}

impl<C: Connect> Http2<C> {
    /// A pool opening its connections with `connect`.
    pub fn new(connect: C) -> Self {
        Self {
            inner: Arc::new(Http2Inner {
                connect,
                conns: Mutex::default(),
                reaper: Default::default(),
            }),
        }
    }

    /// Open or opening connections.
    pub fn connection_count(&self) -> usize {
        lock(&self.inner.conns).len()
    }

    /// Sends `req` (an absolute URI: HTTP/2 carries the scheme and authority) to `addr` on its
    /// connection, made first if there is none.
    pub async fn send(
        &self,
        addr: SocketAddr,
        mut req: Request<RequestBody>,
    ) -> Result<Response<Body>, Error> {
        *req.version_mut() = http::Version::HTTP_2;
        // A connection found closed hands the request back unsent; one more try on a new one.
        for _ in 0..2 {
            let mut tx = match self.connection(addr) {
                Ok(tx) => tx,
                Err(connecting) => connecting.await?,
            };
            match tx.try_send_request(req).await {
                Ok(rsp) => return Ok(rsp.map(Body::plain)),
                Err(mut e) => match e.take_message() {
                    Some(unsent) => {
                        self.forget(addr, &tx);
                        req = unsent;
                    }
                    None => return Err(Error::send(e.into_error())),
                },
            }
        }
        let why: ConnectError =
            format!("the connection to {addr} closed before the request was sent").into();
        Err(Error::Connect { source: why.into() })
    }

    /// The open connection to `addr`, or the connect to wait for (started here if none is).
    fn connection(&self, addr: SocketAddr) -> Result<http2::SendRequest<RequestBody>, Connecting> {
        let mut conns = lock(&self.inner.conns);
        match conns.get_mut(&addr) {
            Some(Slot::Ready { tx, used }) if !tx.is_closed() => {
                *used = Instant::now();
                return Ok(tx.clone());
            }
            Some(Slot::Connecting(c)) => return Err(c.clone()),
            _ => {}
        }
        let pool = Arc::downgrade(&self.inner);
        let io = self.inner.connect.connect(addr);
        let connecting = async move {
            let made = async {
                let io = io.await.map_err(|e| Error::Connect { source: e.into() })?;
                let (tx, conn) = http2::Builder::new(TokioExecutor::new())
                    .timer(TokioTimer::new())
                    .handshake(io)
                    .await
                    .map_err(Error::connect)?;
                tokio::spawn(async move {
                    if let Err(error) = conn.await {
                        tracing::debug!(%addr, %error, "pooled HTTP/2 connection ended with an error");
                    }
                });
                Ok(tx)
            }
            .await;
            if let Some(pool) = pool.upgrade() {
                let mut conns = lock(&pool.conns);
                match &made {
                    Ok(tx) => {
                        conns.insert(
                            addr,
                            Slot::Ready {
                                tx: tx.clone(),
                                used: Instant::now(),
                            },
                        );
                    }
                    // The next request tries again.
                    Err(_) => {
                        conns.remove(&addr);
                    }
                }
                drop(conns);
                start_reaper(&pool.reaper, Arc::downgrade(&pool));
            }
            made
        }
        .boxed()
        .shared();
        conns.insert(addr, Slot::Connecting(connecting.clone()));
        Err(connecting)
    }

    /// Drops the pool's connection to `addr` if it is still `tx`'s.
    fn forget(&self, addr: SocketAddr, tx: &http2::SendRequest<RequestBody>) {
        let mut conns = lock(&self.inner.conns);
        if let Some(Slot::Ready { tx: pooled, .. }) = conns.get(&addr)
            && pooled.is_closed()
            && tx.is_closed()
        {
            conns.remove(&addr);
        }
    }
}

impl<C: Connect> Reap for Http2Inner<C> {
    fn reap(&self, now: Instant) {
        lock(&self.conns).retain(|_, slot| match slot {
            Slot::Ready { tx, used } => {
                !tx.is_closed() && now.duration_since(*used) < Self::idle_timeout()
            }
            Slot::Connecting(_) => true,
        });
    }
}

/// A pooled connection's response body; when it ends, an HTTP/1.1 connection goes back to its
/// pool.
pub struct Body {
    inner: Incoming,
    on_end: Option<Box<dyn FnOnce() + Send + Sync>>,
}

impl std::fmt::Debug for Body {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Body")
            .field("pooled", &self.on_end.is_some())
            .finish()
    }
}

impl Body {
    fn plain(inner: Incoming) -> Self {
        Self {
            inner,
            on_end: None,
        }
    }

    fn ended(&mut self) {
        if let Some(on_end) = self.on_end.take() {
            on_end();
        }
    }
}

impl HttpBody for Body {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(None) => self.ended(),
            Poll::Ready(Some(Ok(_))) if self.inner.is_end_stream() => self.ended(),
            // An error breaks the connection; it is not returned.
            Poll::Ready(Some(Err(_))) => drop(self.on_end.take()),
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for Body {
    fn drop(&mut self) {
        // A body read to its end, or empty from the start (HEAD, 204, 304), that its reader
        // did not poll again: the connection is idle.
        if self.inner.is_end_stream() {
            self.ended();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, Empty, Full};
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    const TCP: Tcp = Tcp {
        timeout: Duration::from_secs(1),
    };

    /// A server on 127.0.0.1 that counts the connections it accepts and hands each to `serve`
    /// on a task of its own.
    async fn server<F>(
        serve: impl Fn(TcpStream) -> F + Send + 'static,
    ) -> (SocketAddr, Arc<AtomicUsize>)
    where
        F: std::future::Future<Output: Send> + Send + 'static,
    {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        tokio::spawn(async move {
            loop {
                let (io, _) = listener.accept().await.unwrap();
                count.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(serve(io));
            }
        });
        (addr, accepted)
    }

    /// An HTTP/1.1 server that counts its connections and answers each request with its path,
    /// closing a connection after `per_connection` requests.
    async fn counting_server(per_connection: usize) -> (SocketAddr, Arc<AtomicUsize>) {
        server(move |io| {
            let served = Arc::new(AtomicUsize::new(0));
            hyper::server::conn::http1::Builder::new().serve_connection(
                TokioIo::new(io),
                hyper::service::service_fn(move |req: Request<Incoming>| {
                    let n = served.fetch_add(1, Ordering::SeqCst) + 1;
                    let host = req.headers().get(HOST).cloned();
                    async move {
                        let mut rsp = Response::new(Full::new(Bytes::from(format!(
                            "{} {}",
                            req.uri(),
                            host.as_ref().map_or("", |h| h.to_str().unwrap())
                        ))));
                        if n >= per_connection {
                            rsp.headers_mut()
                                .insert("connection", HeaderValue::from_static("close"));
                        }
                        Ok::<_, std::convert::Infallible>(rsp)
                    }
                }),
            )
        })
        .await
    }

    async fn text(rsp: Response<Body>) -> String {
        let body = rsp.into_body().collect().await.unwrap().to_bytes();
        String::from_utf8(body.to_vec()).unwrap()
    }

    fn get(addr: SocketAddr, path: &str) -> Request<RequestBody> {
        Request::get(format!("http://{addr}{path}"))
            .body(Empty::new().map_err(|never| match never {}).boxed())
            .unwrap()
    }

    #[tokio::test]
    async fn http1_reuses_a_connection_once_its_response_body_ends() {
        let (addr, accepted) = counting_server(usize::MAX).await;
        let pool = Http1::new(TCP);
        for i in 0..5 {
            let rsp = pool
                .send(addr, get(addr, &format!("/{i}?q=1")))
                .await
                .unwrap();
            // Origin form on the wire, Host from the URI.
            assert_eq!(text(rsp).await, format!("/{i}?q=1 {addr}"));
        }
        assert_eq!(
            accepted.load(Ordering::SeqCst),
            1,
            "one connection for five requests"
        );
        assert_eq!(pool.idle_count(), 1);

        // A response whose body is still unread holds its connection: a second request in the
        // meantime opens another.
        let first = pool.send(addr, get(addr, "/a")).await.unwrap();
        let second = pool.send(addr, get(addr, "/b")).await.unwrap();
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
        assert_eq!(text(second).await, format!("/b {addr}"));
        assert_eq!(text(first).await, format!("/a {addr}"));
        assert_eq!(pool.idle_count(), 2);

        // A body dropped before its end closes its connection instead of pooling it.
        let rsp = pool.send(addr, get(addr, "/c")).await.unwrap();
        assert_eq!(pool.idle_count(), 1);
        drop(rsp);
        assert_eq!(pool.idle_count(), 1, "a body dropped unread is not pooled");
    }

    #[tokio::test]
    async fn http1_an_empty_response_returns_its_connection_even_unread() {
        let (addr, accepted) = counting_server(usize::MAX).await;
        let pool = Http1::new(TCP);
        for _ in 0..3 {
            let head = Request::head(format!("http://{addr}/"))
                .body(Empty::new().map_err(|never| match never {}).boxed())
                .unwrap();
            // A response to HEAD has no body; dropping it unread frees the connection.
            drop(pool.send(addr, head).await.unwrap());
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn http1_a_connection_the_server_closed_is_not_reused() {
        // The server closes each connection after its one response.
        let (addr, accepted) = counting_server(1).await;
        let pool = Http1::new(TCP);
        for i in 0..3 {
            let rsp = pool.send(addr, get(addr, &format!("/{i}"))).await.unwrap();
            assert_eq!(text(rsp).await, format!("/{i} {addr}"));
            // Let the connection see its close.
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn http1_a_request_on_a_connection_closed_while_idle_goes_on_a_new_one() {
        // A server that answers one request per connection and then closes it without saying
        // so, as servers with short keep-alive timeouts do.
        let (addr, accepted) = server(|mut io| async move {
            let mut buf = [0u8; 1024];
            let _ = io.read(&mut buf).await;
            let _ = io
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                .await;
            let _ = io.shutdown().await;
        })
        .await;
        let pool = Http1::new(TCP);
        assert_eq!(
            text(pool.send(addr, get(addr, "/")).await.unwrap()).await,
            "ok"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(
            text(pool.send(addr, get(addr, "/")).await.unwrap()).await,
            "ok"
        );
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_refused_connection_is_a_connect_error_naming_the_address() {
        let addr = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap()
        };
        let e = Http1::new(TCP)
            .send(addr, get(addr, "/"))
            .await
            .unwrap_err();
        assert!(e.is_connect(), "{e:?}");
        assert!(e.to_string().contains(&addr.to_string()), "{e}");
        let e = Http2::new(TCP)
            .send(addr, get(addr, "/"))
            .await
            .unwrap_err();
        assert!(e.is_connect(), "{e:?}");
        assert!(e.to_string().contains(&addr.to_string()), "{e}");
    }

    /// An h2c server that counts its connections and answers each request with its authority
    /// and path.
    async fn h2c_server() -> (SocketAddr, Arc<AtomicUsize>) {
        server(|io| {
            hyper::server::conn::http2::Builder::new(TokioExecutor::new()).serve_connection(
                TokioIo::new(io),
                hyper::service::service_fn(|req: Request<Incoming>| async move {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    Ok::<_, std::convert::Infallible>(Response::new(Full::new(Bytes::from(
                        req.uri().to_string(),
                    ))))
                }),
            )
        })
        .await
    }

    #[tokio::test]
    async fn http2_shares_one_connection_even_among_requests_that_raced_to_make_it() {
        let (addr, accepted) = h2c_server().await;
        let pool = Http2::new(TCP);
        let sent = (0..20).map(|i| {
            let pool = pool.clone();
            async move { text(pool.send(addr, get(addr, &format!("/{i}"))).await.unwrap()).await }
        });
        let answers = futures_util::future::join_all(sent).await;
        for (i, a) in answers.iter().enumerate() {
            assert_eq!(a, &format!("http://{addr}/{i}"));
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
        assert_eq!(pool.connection_count(), 1);
    }

    #[tokio::test]
    async fn idle_connections_are_closed_after_the_idle_timeout() {
        let (addr, _) = counting_server(usize::MAX).await;
        let (h2, _) = h2c_server().await;
        let http1 = Http1::new(TCP);
        let http2 = Http2::new(TCP);
        text(http1.send(addr, get(addr, "/")).await.unwrap()).await;
        text(http2.send(h2, get(h2, "/")).await.unwrap()).await;
        let now = Instant::now();
        http1.inner.reap(now);
        http2.inner.reap(now);
        assert_eq!((http1.idle_count(), http2.connection_count()), (1, 1));
        let later = now + POOL_IDLE_TIMEOUT;
        http1.inner.reap(later);
        http2.inner.reap(later);
        assert_eq!((http1.idle_count(), http2.connection_count()), (0, 0));
    }
}
