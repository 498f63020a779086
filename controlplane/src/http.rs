//! Serving plumbing shared by the resource API and the proxy API: one hyper server loop that
//! speaks HTTP/1.1 and HTTP/2 on the same port, in plaintext (prior knowledge, h2c; the
//! resource API on loopback) or over TLS (the proxy API, [`serve_tls`], which hands each request
//! its connection's verified client identity as a [`PeerIdentity`] extension), JSON and NDJSON
//! bodies, and Kubernetes-style `Status` errors.

#![allow(
    clippy::result_large_err,
    reason = "the error is the early response to a request, built once per request"
)]

use std::{convert::Infallible, future::Future, net::SocketAddr, sync::Arc, time::Duration};

use bytes::Bytes;
use futures_util::Stream;
use http::{Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited, StreamBody, combinators::UnsyncBoxBody};
use hyper::body::{Frame, Incoming};
use hyper_util::{
    rt::{TokioExecutor, TokioIo, TokioTimer},
    server::conn::auto,
};
use serde::Serialize;
use serde_json::{Value, json};
use tokio::{
    io::AsyncWriteExt,
    net::{TcpListener, TcpStream},
};

use crate::conn_threads::ConnectionThreads;

/// Response body: a whole buffer or a stream of NDJSON lines.
pub type Body = UnsyncBoxBody<Bytes, Infallible>;

/// Largest request body accepted (a large multi-document apply fits easily).
pub const MAX_BODY: usize = 16 * 1024 * 1024;

/// Enough concurrent streams on one HTTP/2 connection for a node's worth of proxies (or a
/// benchmark) multiplexed over few connections.
const MAX_STREAMS: u32 = 16_384;

/// How long a client may take to complete its TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The first byte of a TLS handshake record.
const TLS_HANDSHAKE: u8 = 0x16;

/// What a plaintext HTTP client hears from a TLS listener before it is disconnected.
const PLAINTEXT_REFUSAL: &[u8] = b"HTTP/1.1 400 Bad Request\r\ncontent-type: text/plain\r\n\
connection: close\r\ncontent-length: 85\r\n\r\nthis listener speaks TLS: use https:// \
and verify it with the mesh's trust-roots.pem\n";

/// The verified identity of a request's client: the SPIFFE ID in the client certificate its
/// TLS connection presented, which chained to the mesh CA's roots. [`serve_tls`] inserts it
/// into every request of such a connection; a request without it came without a certificate.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerIdentity(pub String);

/// A buffered body.
pub fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into()).boxed_unsync()
}

/// A Prometheus text exposition response.
pub fn text_response(text: String) -> Response<Body> {
    let mut resp = Response::new(full(text.into_bytes()));
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    resp
}

/// A JSON response.
pub fn json_response<T: Serialize + ?Sized>(status: StatusCode, value: &T) -> Response<Body> {
    let body = serde_json::to_vec(value).unwrap_or_else(|e| {
        format!("{{\"kind\":\"Status\",\"message\":\"encoding the response: {e}\"}}").into_bytes()
    });
    let mut resp = Response::new(full(body));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    resp
}

/// A Kubernetes `Status` error.
pub fn status_error(
    status: StatusCode,
    reason: &str,
    message: impl Into<String>,
    details: Option<Value>,
) -> Response<Body> {
    let mut body = json!({
        "kind": "Status",
        "apiVersion": "v1",
        "status": "Failure",
        "message": message.into(),
        "reason": reason,
        "code": status.as_u16(),
    });
    if let Some(details) = details {
        body["details"] = details;
    }
    json_response(status, &body)
}

/// A streaming NDJSON response; each item is one line, newline included.
pub fn ndjson_response(
    content_type: &'static str,
    lines: impl Stream<Item = Bytes> + Send + 'static,
) -> Response<Body> {
    use futures_util::StreamExt;
    let body = StreamBody::new(lines.map(|b| Ok::<_, Infallible>(Frame::data(b))));
    let mut resp = Response::new(BodyExt::boxed_unsync(body));
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(content_type),
    );
    resp
}

/// Reads a whole request body, up to [`MAX_BODY`].
pub async fn read_body(body: Incoming) -> Result<Bytes, Response<Body>> {
    match Limited::new(body, MAX_BODY).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) => Err(status_error(
            StatusCode::PAYLOAD_TOO_LARGE,
            "RequestEntityTooLarge",
            format!("reading the request body: {e}"),
            None,
        )),
    }
}

/// The value of query parameter `name`, decoded as browsers and HTTP clients encode query
/// strings (`application/x-www-form-urlencoded`: `%XX` escapes, and `+` for a space, in names
/// and values alike); the first when the parameter appears more than once.
pub fn query_param(query: Option<&str>, name: &str) -> Option<String> {
    form_urlencoded::parse(query?.as_bytes())
        .find(|(key, _)| key == name)
        .map(|(_, value)| value.into_owned())
}

/// A path segment with its `%XX` escapes decoded; a `+` in a path stays a `+`. Bytes that do
/// not decode to UTF-8 become U+FFFD, so a mangled name is reported as not found rather than
/// matched.
pub fn path_segment(segment: &str) -> String {
    percent_encoding::percent_decode_str(segment)
        .decode_utf8_lossy()
        .into_owned()
}

/// How many connections a listener's kernel queue holds, handshake done, before they are
/// accepted (Linux caps it at `net.core.somaxconn`). tokio's `TcpListener::bind` asks for 128,
/// and the SYNs of a burst past that (proxies reconnecting together after a restart) are
/// dropped, each client then waiting a one-second retransmit. The proxy's listeners ask for
/// the same (`mesh_sidecar::proxy::LISTEN_BACKLOG`).
pub const LISTEN_BACKLOG: u32 = 1024;

/// A listener on `addr` with [`LISTEN_BACKLOG`], its address reusable at once as tokio's own
/// bind makes it (a restarted control plane rebinds while old connections linger).
///
/// # Errors
/// When the socket cannot be made or bound (the address is in use, say).
pub fn listen(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

/// Serves `handler` on `listener` until the process ends, each connection on one of `threads`;
/// every connection may speak HTTP/1.1 or HTTP/2 with prior knowledge.
pub async fn serve<H, F>(
    listener: TcpListener,
    name: &'static str,
    threads: Arc<ConnectionThreads>,
    handler: H,
) where
    H: Fn(Request<Incoming>) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<Body>> + Send + 'static,
{
    serve_with(listener, name, threads, None, handler).await;
}

/// Serves `handler` on `listener` over TLS with `tls` until the process ends, each connection
/// on one of `threads`; ALPN picks HTTP/2 or HTTP/1.1. Requests of a connection that presented
/// a verified client certificate naming a SPIFFE ID carry it as a [`PeerIdentity`] extension.
/// A plaintext HTTP client gets a 400 saying so and is disconnected.
pub async fn serve_tls<H, F>(
    listener: TcpListener,
    name: &'static str,
    threads: Arc<ConnectionThreads>,
    tls: Arc<rustls::ServerConfig>,
    handler: H,
) where
    H: Fn(Request<Incoming>) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<Body>> + Send + 'static,
{
    serve_with(
        listener,
        name,
        threads,
        Some(tokio_rustls::TlsAcceptor::from(tls)),
        handler,
    )
    .await;
}

async fn serve_with<H, F>(
    listener: TcpListener,
    name: &'static str,
    threads: Arc<ConnectionThreads>,
    tls: Option<tokio_rustls::TlsAcceptor>,
    handler: H,
) where
    H: Fn(Request<Incoming>) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<Body>> + Send + 'static,
{
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(MAX_STREAMS)
        .keep_alive_interval(Some(Duration::from_secs(20)));
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(conn) => conn,
            Err(e) => {
                // Out of file descriptors and the like: back off instead of spinning.
                tracing::warn!(listener = name, error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let handler = handler.clone();
        let builder = builder.clone();
        let tls = tls.clone();
        // The handshake runs in the connection's task, so a slow client never holds up accept;
        // the connection and its streams run on one thread (see `conn_threads`).
        threads.run(async move {
            let Some(acceptor) = tls else {
                return serve_connection(&builder, stream, None, handler, name, peer).await;
            };
            let stream =
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake(&acceptor, stream)).await {
                    Ok(Ok(stream)) => stream,
                    Ok(Err(e)) => {
                        tracing::debug!(listener = name, %peer, error = %e, "TLS handshake failed");
                        return;
                    }
                    Err(_) => {
                        tracing::debug!(listener = name, %peer, "TLS handshake timed out");
                        return;
                    }
                };
            let identity = peer_identity(stream.get_ref().1);
            serve_connection(&builder, stream, identity, handler, name, peer).await;
        });
    }
}

/// The verified identity of the client of a server-side TLS connection: the one `spiffe://` URI
/// SAN of the certificate it presented (the verifier has already checked the chain). `None`
/// when it presented none.
pub fn peer_identity(conn: &rustls::ServerConnection) -> Option<PeerIdentity> {
    conn.peer_certificates()
        .and_then(|certs| certs.first())
        .and_then(|cert| mesh_policies::certificate_identity(cert))
        .map(PeerIdentity)
}

/// Accepts a TLS connection. A client whose first byte is not a TLS handshake is refused in
/// plain HTTP/1.1, so a stray `curl http://` or an old proxy learns why.
async fn handshake(
    acceptor: &tokio_rustls::TlsAcceptor,
    mut stream: TcpStream,
) -> std::io::Result<tokio_rustls::server::TlsStream<TcpStream>> {
    let mut first = [0u8; 1];
    if stream.peek(&mut first).await? == 1 && first[0] != TLS_HANDSHAKE {
        let _ = stream.write_all(PLAINTEXT_REFUSAL).await;
        let _ = stream.shutdown().await;
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "the client spoke plaintext to a TLS listener",
        ));
    }
    acceptor.accept(stream).await
}

async fn serve_connection<S, H, F>(
    builder: &auto::Builder<TokioExecutor>,
    stream: S,
    identity: Option<PeerIdentity>,
    handler: H,
    name: &'static str,
    peer: SocketAddr,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    H: Fn(Request<Incoming>) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<Body>> + Send + 'static,
{
    let service = hyper::service::service_fn(move |mut req: Request<Incoming>| {
        if let Some(identity) = &identity {
            req.extensions_mut().insert(identity.clone());
        }
        let handler = handler.clone();
        async move { Ok::<_, Infallible>(handler(req).await) }
    });
    if let Err(e) = builder
        .serve_connection(TokioIo::new(stream), service)
        .await
    {
        log_conn_error(name, peer, e.as_ref());
    }
}

fn log_conn_error(name: &str, peer: SocketAddr, e: &(dyn std::error::Error + 'static)) {
    tracing::debug!(listener = name, %peer, error = %e, "connection ended with an error");
}

#[cfg(test)]
mod tests {
    use super::{listen, path_segment, query_param};

    /// Proxies reconnecting together wait in the kernel's queue instead of losing their SYNs
    /// (with tokio's default backlog only 129 of 600 get in).
    #[tokio::test]
    async fn a_listener_holds_a_burst_of_600_handshakes_before_accepting_any() {
        let listener = listen("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = listener.local_addr().unwrap();
        assert_eq!(mesh_test_support::handshakes_held(addr, 600).await, 600);
    }

    #[test]
    fn query_values_and_names_are_decoded() {
        let q = Some("workload=web%2Dv2&namespace=team+a&w%69ndow=90s&empty=&bare&x=a%3Db");
        assert_eq!(query_param(q, "workload").as_deref(), Some("web-v2"));
        // `+` is a space in a query string, as form encoding (and reqwest's `.query`) writes it.
        assert_eq!(query_param(q, "namespace").as_deref(), Some("team a"));
        assert_eq!(query_param(q, "window").as_deref(), Some("90s"));
        assert_eq!(query_param(q, "empty").as_deref(), Some(""));
        assert_eq!(query_param(q, "bare").as_deref(), Some(""));
        assert_eq!(query_param(q, "x").as_deref(), Some("a=b"));
        assert_eq!(query_param(q, "missing"), None);
        assert_eq!(query_param(None, "workload"), None);
        // The first of a repeated parameter.
        assert_eq!(query_param(Some("a=1&a=2"), "a").as_deref(), Some("1"));
    }

    #[test]
    fn path_segments_decode_escapes_but_keep_plus() {
        assert_eq!(path_segment("web%2Dv2"), "web-v2");
        assert_eq!(path_segment("a+b"), "a+b");
        assert_eq!(path_segment("caf%C3%A9"), "café");
        // A malformed escape is kept as written; bytes that are not UTF-8 are replaced.
        assert_eq!(path_segment("100%"), "100%");
        assert_eq!(path_segment("%FF"), "\u{FFFD}");
    }
}
