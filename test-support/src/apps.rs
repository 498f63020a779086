//! Upstream apps for tests: real HTTP servers (HTTP/1.1 and h2c on one port) on 127.0.0.1 that
//! answer with their version, and a TCP echo server.
//!
//! ```no_run
//! # async fn f() -> mesh_test_support::Result<()> {
//! use std::time::Duration;
//! use mesh_test_support::apps::{app, tcp_echo};
//! let v1 = app("v1").await?;
//! let v2 = app("v2").latency(Duration::from_millis(50)).fail_rate(0.05).await?;
//! let v3 = app("v3").fail_rate(0.33).failing_evenly().await?;
//! let broken = app("v3").status(503).await?;
//! let smtp = tcp_echo().banner(b"220 mail.example ESMTP\r\n").await?;
//! # Ok(()) }
//! ```
//!
//! An app counts what arrives ([`App::hits`], [`App::attempts`] by `x-request-id`), and tells
//! the caller what it saw in `x-seen-*` response headers: the Host, the HTTP version, the
//! caller's verified identity as the inbound proxy passes it on, and the header a route filter
//! adds. gRPC calls (`content-type: application/grpc`) are answered in gRPC's wire format (see
//! [`grpc`]): a method ending in `/Unary` echoes its message, any other streams back as many
//! messages as the request's number asks for.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::future::{Future, IntoFuture};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, StatusCode};
use http_body_util::{BodyExt, Full, combinators::BoxBody};
use hyper::{Request, Response, body::Incoming, service::service_fn};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::AsyncWriteExt;

use crate::{HarnessError, Result};

/// Response header with the Host the app received.
pub const SEEN_HOST: &str = "x-seen-host";
/// Response header echoing the request's `x-added` header (to check header filters).
pub const SEEN_ADDED: &str = "x-seen-added";
/// Response header with the caller's identity the inbound proxy passed on (`x-mesh-client-id`).
pub const SEEN_CLIENT_ID: &str = "x-seen-client-id";
/// Response header with the HTTP version the app was called with (`HTTP/1.1`, `HTTP/2.0`).
pub const SEEN_VERSION: &str = "x-seen-version";
/// Trace context headers the app echoes back as `x-seen-<name>`, to check what the proxies
/// passed on.
pub const TRACE_HEADERS: [&str; 8] = mesh_core::trace::CONTEXT_HEADERS;
/// Response header with the app's version.
pub const APP_VERSION: &str = "x-app-version";
/// A request to this path is answered after [`SLOW_DELAY`].
pub const SLOW_PATH: &str = "/slow";
/// How long [`SLOW_PATH`] takes.
pub const SLOW_DELAY: Duration = Duration::from_secs(3);

/// What an app saw of one request, for answers decided per request ([`AppBuilder::answer`]).
#[derive(Clone, Debug)]
pub struct Seen {
    /// The request's `x-request-id`, or empty.
    pub id: String,
    /// How many times this id has arrived, this one included.
    pub attempt: u32,
}

type Answer = Arc<dyn Fn(&Seen) -> (u16, Duration) + Send + Sync>;

/// An app to start: `app("v2")`, then how it answers. Await it to start it.
#[must_use = "an app starts when awaited"]
pub struct AppBuilder {
    version: String,
    addr: SocketAddr,
    status: u16,
    latency: Duration,
    fail_rate: f64,
    fail_status: u16,
    fail_evenly: bool,
    seed: Option<u64>,
    first_attempt: Option<u16>,
    answer: Option<Answer>,
    body_len: bool,
}

impl std::fmt::Debug for AppBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AppBuilder")
            .field("version", &self.version)
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

/// An app whose body is `version`, answering 200 at once; see [`AppBuilder`] for the rest.
pub fn app(version: impl Into<String>) -> AppBuilder {
    AppBuilder {
        version: version.into(),
        addr: SocketAddr::from(([127, 0, 0, 1], 0)),
        status: 200,
        latency: Duration::ZERO,
        fail_rate: 0.0,
        fail_status: 500,
        fail_evenly: false,
        seed: None,
        first_attempt: None,
        answer: None,
        body_len: false,
    }
}

impl AppBuilder {
    /// Answers every request with `status`.
    pub fn status(mut self, status: u16) -> Self {
        self.status = status;
        self
    }

    /// Answers every request after `latency`.
    pub fn latency(mut self, latency: Duration) -> Self {
        self.latency = latency;
        self
    }

    /// Fails this share of requests (0 to 1), with 500 unless [`AppBuilder::failing_with`].
    pub fn fail_rate(mut self, rate: f64) -> Self {
        self.fail_rate = rate;
        self
    }

    /// The status failed requests get.
    pub fn failing_with(mut self, status: u16) -> Self {
        self.fail_status = status;
        self
    }

    /// Picks the failing requests by count instead of at random: request `n` (from 0) fails
    /// when `floor((n + 1) * rate) > floor(n * rate)`. The share is exact at every moment, and
    /// below a rate of one half no two failures come in a row (a run of failures trips a
    /// proxy's failure accrual, which takes the endpoint out instead of counting its errors).
    pub fn failing_evenly(mut self) -> Self {
        self.fail_evenly = true;
        self
    }

    /// Picks the failing requests with a generator seeded with `seed`, so that requests sent
    /// one at a time fail the same way on every run.
    pub fn seed(mut self, seed: u64) -> Self {
        self.seed = Some(seed);
        self
    }

    /// Answers the first attempt of each request (by `x-request-id`) with `status`, and the
    /// attempts after it as usual: a request that succeeds once retried.
    pub fn fail_first_attempt(mut self, status: u16) -> Self {
        self.first_attempt = Some(status);
        self
    }

    /// Decides each answer's status and delay from what the app saw (overrides status,
    /// latency and failures).
    pub fn answer(
        mut self,
        answer: impl Fn(&Seen) -> (u16, Duration) + Send + Sync + 'static,
    ) -> Self {
        self.answer = Some(Arc::new(answer));
        self
    }

    /// Answers `<version> <bytes of request body received>`, to check what a retry carried.
    pub fn body_len(mut self) -> Self {
        self.body_len = true;
        self
    }

    /// Listens on `addr` rather than on a port the kernel picks (to bring back an endpoint
    /// that was closed).
    pub fn on(mut self, addr: SocketAddr) -> Self {
        self.addr = addr;
        self
    }

    /// Starts the app; it serves until the runtime stops.
    pub async fn start(self) -> Result<App> {
        let bind = self.addr;
        let state = Arc::new(State {
            hits: AtomicUsize::new(0),
            attempts: Mutex::new(BTreeMap::new()),
            rng: Mutex::new(match self.seed {
                Some(seed) => fastrand::Rng::with_seed(seed),
                None => fastrand::Rng::new(),
            }),
            app: self,
        });
        let serving = Arc::clone(&state);
        let addr = serve_connections(bind, "a test app", move |io| {
            let state = Arc::clone(&serving);
            async move {
                let svc = service_fn(move |req| Arc::clone(&state).handle(req));
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(io), svc)
                    .await;
            }
        })
        .await?;
        Ok(App { addr, state })
    }
}

impl IntoFuture for AppBuilder {
    type Output = Result<App>;
    type IntoFuture = Pin<Box<dyn Future<Output = Result<App>> + Send>>;

    fn into_future(self) -> Self::IntoFuture {
        Box::pin(self.start())
    }
}

/// A stable version and a canary side by side: apps answering `v1` and `v2`, for the endpoints
/// of `<svc>-primary` and `<svc>-canary`.
pub async fn primary_and_canary() -> Result<(SocketAddr, SocketAddr)> {
    Ok((app("v1").await?.addr(), app("v2").await?.addr()))
}

/// A running app.
#[derive(Clone)]
pub struct App {
    addr: SocketAddr,
    state: Arc<State>,
}

impl std::fmt::Debug for App {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("App")
            .field("version", &self.state.app.version)
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

impl App {
    /// Where it listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Requests that arrived.
    pub fn hits(&self) -> usize {
        self.state.hits.load(Ordering::SeqCst)
    }

    /// Attempts that arrived for request `id` (its `x-request-id`).
    pub fn attempts(&self, id: &str) -> usize {
        let attempts = self
            .state
            .attempts
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(id)
            .copied()
            .unwrap_or(0);
        usize::try_from(attempts).unwrap_or(usize::MAX)
    }
}

struct State {
    app: AppBuilder,
    hits: AtomicUsize,
    /// Attempts by `x-request-id`.
    attempts: Mutex<BTreeMap<String, u32>>,
    rng: Mutex<fastrand::Rng>,
}

type AppBody = BoxBody<Bytes, Infallible>;

impl State {
    async fn handle(
        self: Arc<Self>,
        req: Request<Incoming>,
    ) -> Result<Response<AppBody>, Infallible> {
        let mut headers = HeaderMap::new();
        for (from, to) in [
            ("host", SEEN_HOST),
            ("x-added", SEEN_ADDED),
            ("x-mesh-client-id", SEEN_CLIENT_ID),
        ] {
            if let Some(v) = req.headers().get(from) {
                headers.insert(to, v.clone());
            }
        }
        for name in TRACE_HEADERS {
            if let (Some(v), Ok(seen)) = (
                req.headers().get(name),
                http::HeaderName::try_from(format!("x-seen-{name}")),
            ) {
                headers.insert(seen, v.clone());
            }
        }
        if let Ok(v) = HeaderValue::from_str(&format!("{:?}", req.version())) {
            headers.insert(SEEN_VERSION, v);
        }
        if let Ok(v) = HeaderValue::from_str(&self.app.version) {
            headers.insert(APP_VERSION, v);
        }
        let id = req
            .headers()
            .get("x-request-id")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string();
        let grpc = req
            .headers()
            .get("content-type")
            .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
        let slow = req.uri().path() == SLOW_PATH;
        let path = req.uri().path().to_string();
        let body = req
            .into_body()
            .collect()
            .await
            .map(http_body_util::Collected::to_bytes)
            .unwrap_or_default();
        let n = self.hits.fetch_add(1, Ordering::SeqCst);
        let attempt = {
            let mut attempts = self.attempts.lock().unwrap_or_else(PoisonError::into_inner);
            let n = attempts.entry(id.clone()).or_insert(0);
            *n += 1;
            *n
        };
        let seen = Seen { id, attempt };
        let (status, delay) = match &self.app.answer {
            Some(answer) => answer(&seen),
            None => {
                let rate = self.app.fail_rate;
                let fail = rate > 0.0
                    && if self.app.fail_evenly {
                        ((n + 1) as f64 * rate).floor() > (n as f64 * rate).floor()
                    } else {
                        self.rng
                            .lock()
                            .unwrap_or_else(PoisonError::into_inner)
                            .f64()
                            < rate
                    };
                let status = match self.app.first_attempt {
                    Some(first) if seen.attempt == 1 => first,
                    _ if fail => self.app.fail_status,
                    _ => self.app.status,
                };
                (status, self.app.latency)
            }
        };
        let delay = if slow { delay.max(SLOW_DELAY) } else { delay };
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        let mut rsp = if grpc {
            grpc::answer(&path, &body)
        } else if self.app.body_len {
            Response::new(
                Full::new(Bytes::from(format!("{} {}", self.app.version, body.len()))).boxed(),
            )
        } else {
            Response::new(Full::new(Bytes::from(self.app.version.clone())).boxed())
        };
        *rsp.status_mut() =
            StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        rsp.headers_mut().extend(headers);
        Ok(rsp)
    }
}

/// Binds `addr` and hands each connection to `serve`, in a task of its own, until the runtime
/// stops; returns the bound address.
pub(crate) async fn serve_connections<F, Fut>(
    addr: SocketAddr,
    what: &str,
    serve: F,
) -> Result<SocketAddr>
where
    F: Fn(tokio::net::TcpStream) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(HarnessError::io(format!("binding {what} to {addr}")))?;
    let addr = listener
        .local_addr()
        .map_err(HarnessError::io(format!("reading {what}'s address")))?;
    tokio::spawn(async move {
        while let Ok((io, _)) = listener.accept().await {
            tokio::spawn(serve(io));
        }
    });
    Ok(addr)
}

/// gRPC's wire format, as the apps speak it: length-prefixed messages and a `grpc-status`
/// trailer, without a gRPC library.
pub mod grpc {
    use std::convert::Infallible;

    use bytes::{Buf, BufMut, Bytes, BytesMut};
    use http::{HeaderMap, HeaderValue, Response};
    use http_body_util::BodyExt;

    use super::AppBody;

    /// One gRPC message: uncompressed flag, big-endian length, bytes.
    pub fn encode(message: &[u8]) -> Bytes {
        let mut b = BytesMut::with_capacity(5 + message.len());
        b.put_u8(0);
        b.put_u32(u32::try_from(message.len()).unwrap_or(u32::MAX));
        b.put_slice(message);
        b.freeze()
    }

    /// The messages in a body.
    ///
    /// # Panics
    /// When the body ends inside a message.
    pub fn decode(mut body: Bytes) -> Vec<Vec<u8>> {
        let mut messages = Vec::new();
        while body.remaining() >= 5 {
            let _compressed = body.get_u8();
            let len = body.get_u32() as usize;
            assert!(body.remaining() >= len, "a truncated gRPC message");
            messages.push(body.split_to(len).to_vec());
        }
        assert!(body.is_empty(), "a truncated gRPC message");
        messages
    }

    /// `/…/Unary` echoes the request's message; any other method streams back `msg-0`,
    /// `msg-1`, … as many as the request's message says.
    pub(super) fn answer(path: &str, body: &Bytes) -> Response<AppBody> {
        let request = decode(body.clone()).pop().unwrap_or_default();
        let (mut tx, rsp_body) = http_body_util::channel::Channel::<Bytes, Infallible>::new(4);
        let unary = path.ends_with("/Unary");
        tokio::spawn(async move {
            if unary {
                let _ = tx.send_data(encode(&request)).await;
            } else {
                let n: usize = String::from_utf8_lossy(&request).parse().unwrap_or(0);
                for i in 0..n {
                    let _ = tx.send_data(encode(format!("msg-{i}").as_bytes())).await;
                }
            }
            let mut trailers = HeaderMap::new();
            trailers.insert("grpc-status", HeaderValue::from_static("0"));
            let _ = tx.send_trailers(trailers).await;
        });
        let mut rsp = Response::new(rsp_body.boxed());
        rsp.headers_mut().insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("application/grpc"),
        );
        rsp
    }
}

/// A TCP server that echoes what it reads; await it to start it.
#[derive(Debug, Default)]
#[must_use = "an echo server starts when awaited"]
pub struct TcpEcho {
    banner: &'static [u8],
}

/// A TCP echo server: opaque traffic for the inbound listener.
pub fn tcp_echo() -> TcpEcho {
    TcpEcho::default()
}

impl TcpEcho {
    /// Greets each connection with `banner` before the client says anything, as server-first
    /// protocols (SMTP, MySQL) do.
    pub fn banner(mut self, banner: &'static [u8]) -> Self {
        self.banner = banner;
        self
    }

    /// Starts the server; it serves until the runtime stops.
    pub async fn start(self) -> Result<SocketAddr> {
        let banner = self.banner;
        let loopback = SocketAddr::from(([127, 0, 0, 1], 0));
        serve_connections(loopback, "a test echo server", move |mut io| async move {
            if io.write_all(banner).await.is_err() {
                return;
            }
            let (mut r, mut w) = io.split();
            let _ = tokio::io::copy(&mut r, &mut w).await;
        })
        .await
    }
}

impl IntoFuture for TcpEcho {
    type Output = Result<SocketAddr>;
    type IntoFuture = Pin<Box<dyn Future<Output = Result<SocketAddr>> + Send>>;

    fn into_future(self) -> Self::IntoFuture {
        Box::pin(self.start())
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::AsyncReadExt;

    use super::*;

    #[tokio::test]
    async fn an_app_answers_with_its_version_and_status_over_http1_and_h2c() {
        let v2 = app("v2").status(503).await.unwrap();
        let url = format!("http://{}/", v2.addr());
        let rsp = crate::http_client()
            .get(&url)
            .header("x-request-id", "a")
            .send()
            .await
            .unwrap();
        assert_eq!(rsp.status(), 503);
        assert_eq!(rsp.headers()[APP_VERSION], "v2");
        assert_eq!(rsp.headers()[SEEN_VERSION], "HTTP/1.1");
        assert_eq!(rsp.text().await.unwrap(), "v2");
        let h2c = reqwest::Client::builder()
            .http2_prior_knowledge()
            .build()
            .unwrap();
        let rsp = h2c
            .get(&url)
            .header("x-request-id", "a")
            .send()
            .await
            .unwrap();
        assert_eq!(rsp.headers()[SEEN_VERSION], "HTTP/2.0");
        assert_eq!((v2.hits(), v2.attempts("a")), (2, 2));
    }

    #[tokio::test]
    async fn a_seeded_fail_rate_fails_its_share_the_same_way_every_run() {
        let failures = |seed| async move {
            let flaky = app("v3").fail_rate(0.25).seed(seed).await.unwrap();
            let mut failed = Vec::new();
            for i in 0..400 {
                let rsp = crate::http_client()
                    .get(format!("http://{}/", flaky.addr()))
                    .send()
                    .await
                    .unwrap();
                if rsp.status() == 500 {
                    failed.push(i);
                }
            }
            failed
        };
        let first = failures(7).await;
        // Binomial(400, 0.25): sd 8.7; 40 is beyond 4.5 sd.
        assert!((60..=140).contains(&first.len()), "{} failed", first.len());
        assert_eq!(failures(7).await, first);
    }

    #[tokio::test]
    async fn an_even_fail_rate_fails_its_exact_share_never_twice_in_a_row() {
        let flaky = app("v2").fail_rate(0.33).failing_evenly().await.unwrap();
        let mut statuses = Vec::new();
        for _ in 0..300 {
            let rsp = crate::http_client()
                .get(format!("http://{}/", flaky.addr()))
                .send()
                .await
                .unwrap();
            statuses.push(rsp.status().as_u16());
        }
        assert_eq!(statuses.iter().filter(|s| **s == 500).count(), 99);
        assert!(statuses.windows(2).all(|w| w != [500, 500]), "{statuses:?}");
    }

    #[tokio::test]
    async fn an_echo_server_greets_then_echoes() {
        let addr = tcp_echo().banner(b"hello\n").await.unwrap();
        let mut io = tokio::net::TcpStream::connect(addr).await.unwrap();
        io.write_all(b"ping").await.unwrap();
        let mut got = [0u8; 10];
        io.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"hello\nping");
    }
}
