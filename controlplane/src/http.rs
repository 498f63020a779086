//! Serving plumbing shared by the resource API and the proxy API: one hyper server loop that
//! speaks HTTP/1.1 and HTTP/2 (prior knowledge, h2c) on the same port, JSON and NDJSON bodies,
//! and Kubernetes-style `Status` errors.

#![allow(
    clippy::result_large_err,
    reason = "the error is the early response to a request, built once per request"
)]

use std::{convert::Infallible, future::Future, net::SocketAddr, time::Duration};

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
use tokio::net::TcpListener;

/// Response body: a whole buffer or a stream of NDJSON lines.
pub type Body = UnsyncBoxBody<Bytes, Infallible>;

/// Largest request body accepted (a large multi-document apply fits easily).
pub const MAX_BODY: usize = 16 * 1024 * 1024;

/// Enough concurrent streams on one HTTP/2 connection for a node's worth of proxies (or a
/// benchmark) multiplexed over few connections.
const MAX_STREAMS: u32 = 16_384;

/// A buffered body.
pub fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into()).boxed_unsync()
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

/// One JSON line.
pub fn json_line<T: Serialize + ?Sized>(value: &T) -> Bytes {
    let mut line = serde_json::to_vec(value).unwrap_or_default();
    line.push(b'\n');
    Bytes::from(line)
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

/// The value of query parameter `name`.
pub fn query_param<'a>(query: Option<&'a str>, name: &str) -> Option<&'a str> {
    query?
        .split('&')
        .filter_map(|pair| pair.split_once('=').or(Some((pair, ""))))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

/// Decodes `%XX` escapes (enough for authorities and names in query strings).
pub fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && let Some(hex) = s.get(i + 1..i + 3)
            && let Ok(b) = u8::from_str_radix(hex, 16)
        {
            out.push(b);
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Serves `handler` on `listener` until the process ends; every connection may speak HTTP/1.1
/// or HTTP/2 with prior knowledge.
pub async fn serve<H, F>(listener: TcpListener, name: &'static str, handler: H)
where
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
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let handler = handler.clone();
                async move { Ok::<_, Infallible>(handler(req).await) }
            });
            if let Err(e) = builder
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                log_conn_error(name, peer, e.as_ref());
            }
        });
    }
}

fn log_conn_error(name: &str, peer: SocketAddr, e: &(dyn std::error::Error + 'static)) {
    tracing::debug!(listener = name, %peer, error = %e, "connection ended with an error");
}
