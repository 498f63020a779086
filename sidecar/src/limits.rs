//! What a peer can make the proxy hold, on both listeners: how long it may take to send a
//! request head, how long a connection may sit silent, how many connections a listener keeps
//! open at once, and how much HTTP/1.1 and HTTP/2 state each connection may grow. Every limit is
//! a `MESH_PROXY_*` setting ([`crate::config`]); docs/proxy.md lists them with the worst-case
//! memory their defaults allow.
//!
//! The connection cap is backpressure, not refusal: at the cap a listener stops accepting, so
//! new connections wait in the kernel's accept queue until one closes. The header-read deadline
//! and the idle timeout are what close connections a slow or silent peer holds, so a peer at
//! the cap cannot keep it there, and a well-behaved client is served once a slot frees.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use hyper_util::rt::{TokioExecutor, TokioTimer};
use hyper_util::server::conn::auto;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, TryAcquireError};

/// Default time a client has, from accepting its connection (or from the end of the previous
/// response on a kept-alive HTTP/1.1 connection, which is therefore closed when idle this
/// long), to send a whole request head; hyper's own default.
pub const DEFAULT_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// Default time a connection may go without a byte either way before it is closed (HTTP/1.1
/// after its response in flight, HTTP/2 with GOAWAY).
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// Default number of connections each listener keeps open at once.
pub const DEFAULT_MAX_CONNECTIONS: usize = 4096;

/// Default HTTP/1.1 buffer bound (read and write, each): a request head longer than this is
/// refused with 431.
pub const DEFAULT_HTTP1_MAX_BUFFER: usize = 64 * 1024;

/// Default number of HTTP/1.1 header fields in a request head; more is refused with 431.
pub const DEFAULT_HTTP1_MAX_HEADERS: usize = 100;

/// Default HTTP/2 concurrent streams per connection.
pub const DEFAULT_H2_MAX_CONCURRENT_STREAMS: u32 = 100;

/// Default HTTP/2 header list size (decoded, per request); it also bounds a CONTINUATION run.
pub const DEFAULT_H2_MAX_HEADER_LIST_SIZE: u32 = 64 * 1024;

/// Default number of streams a client may open and reset before the proxy has accepted them
/// (rapid reset); one more closes the connection.
pub const DEFAULT_H2_MAX_PENDING_RESETS: usize = 20;

/// Default number of streams the proxy may reset for a client's protocol errors before it
/// closes the connection.
pub const DEFAULT_H2_MAX_LOCAL_RESETS: usize = 1024;

/// HTTP/2 flow-control windows: what a client may send before the proxy reads it.
const H2_STREAM_WINDOW: u32 = 256 * 1024;
const H2_CONNECTION_WINDOW: u32 = 1024 * 1024;
/// What the proxy buffers per HTTP/2 stream toward a client that does not read.
const H2_MAX_SEND_BUFFER: usize = 64 * 1024;
/// Bookkeeping of one connection beside its buffers (task, socket, parser state, allocator
/// slack): an allowance above the 10 KiB measured per half-sent request (26 KiB in all with
/// 8 KiB buffers, in a debug build).
pub const CONNECTION_OVERHEAD: usize = 24 * 1024;

/// What a listener lets a peer hold.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// See [`DEFAULT_HEADER_READ_TIMEOUT`].
    pub header_read_timeout: Duration,
    /// See [`DEFAULT_IDLE_TIMEOUT`].
    pub idle_timeout: Duration,
    /// See [`DEFAULT_MAX_CONNECTIONS`].
    pub max_connections: usize,
    /// See [`DEFAULT_HTTP1_MAX_BUFFER`].
    pub http1_max_buffer: usize,
    /// See [`DEFAULT_HTTP1_MAX_HEADERS`].
    pub http1_max_headers: usize,
    /// See [`DEFAULT_H2_MAX_CONCURRENT_STREAMS`].
    pub h2_max_concurrent_streams: u32,
    /// See [`DEFAULT_H2_MAX_HEADER_LIST_SIZE`].
    pub h2_max_header_list_size: u32,
    /// See [`DEFAULT_H2_MAX_PENDING_RESETS`].
    pub h2_max_pending_resets: usize,
    /// See [`DEFAULT_H2_MAX_LOCAL_RESETS`].
    pub h2_max_local_resets: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            header_read_timeout: DEFAULT_HEADER_READ_TIMEOUT,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            http1_max_buffer: DEFAULT_HTTP1_MAX_BUFFER,
            http1_max_headers: DEFAULT_HTTP1_MAX_HEADERS,
            h2_max_concurrent_streams: DEFAULT_H2_MAX_CONCURRENT_STREAMS,
            h2_max_header_list_size: DEFAULT_H2_MAX_HEADER_LIST_SIZE,
            h2_max_pending_resets: DEFAULT_H2_MAX_PENDING_RESETS,
            h2_max_local_resets: DEFAULT_H2_MAX_LOCAL_RESETS,
        }
    }
}

/// Smallest HTTP/1.1 buffer hyper accepts.
pub const MIN_HTTP1_BUFFER: usize = 8192;

impl Limits {
    /// The most one HTTP/1.1 connection can make the proxy buffer: its read and write buffers
    /// plus bookkeeping.
    pub fn http1_connection_bytes(&self) -> usize {
        2 * self.http1_max_buffer + CONNECTION_OVERHEAD
    }

    /// The most one HTTP/2 connection can make the proxy buffer: a header list being decoded
    /// on every concurrent stream, the connection's receive window, a send buffer per stream,
    /// plus bookkeeping.
    pub fn h2_connection_bytes(&self) -> usize {
        let streams = self.h2_max_concurrent_streams as usize;
        streams * (self.h2_max_header_list_size as usize + H2_MAX_SEND_BUFFER)
            + H2_CONNECTION_WINDOW as usize
            + CONNECTION_OVERHEAD
    }

    /// The most one listener can make the proxy hold for its clients, when every connection
    /// is at its worst; request and response bodies stream, so this is the whole of it.
    pub fn worst_case_bytes(&self) -> usize {
        self.max_connections
            * self
                .http1_connection_bytes()
                .max(self.h2_connection_bytes())
    }

    /// A connection builder that enforces these limits on HTTP/1.1 and HTTP/2.
    pub(crate) fn builder(&self) -> auto::Builder<TokioExecutor> {
        let mut builder = auto::Builder::new(TokioExecutor::new());
        builder
            .http1()
            .timer(TokioTimer::new())
            .header_read_timeout(self.header_read_timeout)
            .max_buf_size(self.http1_max_buffer)
            .max_headers(self.http1_max_headers);
        builder
            .http2()
            .timer(TokioTimer::new())
            .max_concurrent_streams(self.h2_max_concurrent_streams)
            .max_header_list_size(self.h2_max_header_list_size)
            .max_pending_accept_reset_streams(self.h2_max_pending_resets)
            .max_local_error_reset_streams(self.h2_max_local_resets)
            .initial_stream_window_size(H2_STREAM_WINDOW)
            .initial_connection_window_size(H2_CONNECTION_WINDOW)
            .max_send_buf_size(H2_MAX_SEND_BUFFER);
        builder
    }
}

/// The connection cap of one listener, with its metrics.
#[derive(Debug)]
pub struct ConnectionCap {
    listener: &'static str,
    max: usize,
    permits: Arc<Semaphore>,
    open: Gauge,
    reached: Counter,
    at_cap: AtomicBool,
    last_logged: std::sync::Mutex<Option<Instant>>,
}

/// How often, at most, the cap biting is logged while a flood keeps it at the limit; the
/// counter counts every time.
const CAP_LOG_INTERVAL: Duration = Duration::from_secs(10);

/// A slot for one connection, taken before it is accepted; dropping it frees the slot.
#[derive(Debug)]
pub struct Admitted {
    _permit: OwnedSemaphorePermit,
    open: Option<Gauge>,
    gauge: Gauge,
}

impl Admitted {
    /// Counts the slot's connection as open, once it has been accepted.
    pub fn accepted(mut self) -> Self {
        self.gauge.inc();
        self.open = Some(self.gauge.clone());
        self
    }
}

impl Drop for Admitted {
    fn drop(&mut self) {
        if let Some(open) = &self.open {
            open.dec();
        }
    }
}

impl ConnectionCap {
    /// A cap of `max` connections for the listener named `listener`, counted in `metrics`.
    pub fn new(listener: &'static str, max: usize, metrics: &crate::metrics::Metrics) -> Self {
        let labels = crate::metrics::ListenerLabels { listener };
        Self {
            listener,
            max,
            permits: Arc::new(Semaphore::new(max)),
            open: metrics.listener_open.get_or_create(&labels).clone(),
            reached: metrics
                .listener_limit_reached
                .get_or_create(&labels)
                .clone(),
            at_cap: AtomicBool::new(false),
            last_logged: std::sync::Mutex::new(None),
        }
    }

    /// A slot for the next connection, waiting (not accepting) while the listener is at its
    /// cap. `None` only if the cap was closed, which nothing does.
    pub async fn admit(&self) -> Option<Admitted> {
        let permit = match self.permits.clone().try_acquire_owned() {
            Ok(permit) => permit,
            Err(TryAcquireError::Closed) => return None,
            Err(TryAcquireError::NoPermits) => {
                // Once per wait, however often the wait is restarted.
                if !self.at_cap.swap(true, Ordering::Relaxed) {
                    self.reached.inc();
                    self.log_reached();
                }
                let permit = self.permits.clone().acquire_owned().await.ok()?;
                self.at_cap.store(false, Ordering::Relaxed);
                permit
            }
        };
        Some(Admitted {
            _permit: permit,
            open: None,
            gauge: self.open.clone(),
        })
    }

    fn log_reached(&self) {
        let now = Instant::now();
        let Ok(mut last) = self.last_logged.lock() else {
            return;
        };
        if last.is_none_or(|at| now.duration_since(at) >= CAP_LOG_INTERVAL) {
            *last = Some(now);
            tracing::warn!(
                listener = self.listener,
                max_connections = self.max,
                times = self.reached.get(),
                "{} listener at its connection limit; new connections wait until one closes",
                self.listener
            );
        }
    }
}

/// When a connection last carried a byte either way, shared between its I/O and the task that
/// closes it when idle.
#[derive(Clone, Debug)]
pub(crate) struct Activity {
    start: Instant,
    last_ms: Arc<AtomicU64>,
}

impl Activity {
    pub(crate) fn new() -> Self {
        Self {
            start: Instant::now(),
            last_ms: Arc::new(AtomicU64::new(0)),
        }
    }

    fn touch(&self) {
        let ms = u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_ms.store(ms, Ordering::Relaxed);
    }

    /// When the connection last carried a byte.
    pub(crate) fn last(&self) -> Instant {
        self.start + Duration::from_millis(self.last_ms.load(Ordering::Relaxed))
    }
}

/// A connection's I/O that records its activity.
#[derive(Debug)]
pub(crate) struct Tracked<I> {
    io: I,
    activity: Activity,
}

impl<I> Tracked<I> {
    pub(crate) fn new(io: I, activity: Activity) -> Self {
        Self { io, activity }
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for Tracked<I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.io).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.activity.touch();
        }
        polled
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for Tracked<I> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let polled = Pin::new(&mut self.io).poll_write(cx, buf);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        polled
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let polled = Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        polled
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_state_a_bounded_worst_case() {
        let limits = Limits::default();
        // HTTP/1.1: two 64 KiB buffers and bookkeeping.
        assert_eq!(limits.http1_connection_bytes(), 152 * 1024);
        // HTTP/2: 100 streams x (64 KiB headers + 64 KiB send buffer) + 1 MiB window + 24 KiB.
        assert_eq!(
            limits.h2_connection_bytes(),
            100 * 128 * 1024 + 1024 * 1024 + 24 * 1024
        );
        assert_eq!(
            limits.worst_case_bytes(),
            4096 * limits.h2_connection_bytes()
        );
    }

    #[tokio::test]
    async fn the_cap_admits_up_to_its_limit_and_counts_each_wait_once() {
        let mut registry = prometheus_client::registry::Registry::default();
        let metrics = crate::metrics::Metrics::register(&mut registry);
        let cap = ConnectionCap::new("inbound", 2, &metrics);
        let a = cap.admit().await.unwrap().accepted();
        let b = cap.admit().await.unwrap();
        // A slot waiting for its connection is not an open connection.
        assert_eq!(cap.open.get(), 1);
        let _b = b.accepted();
        assert_eq!(cap.open.get(), 2);
        // At the cap: the third waits; restarting the wait does not count it twice.
        for _ in 0..3 {
            let waited = tokio::time::timeout(Duration::from_millis(10), cap.admit()).await;
            assert!(
                waited.is_err(),
                "a third connection was admitted at a cap of 2"
            );
        }
        assert_eq!(cap.reached.get(), 1);
        drop(a);
        assert_eq!(cap.open.get(), 1);
        let _c = cap.admit().await.unwrap().accepted();
        assert_eq!(cap.open.get(), 2);
    }
}
