//! HTTP plumbing both proxying directions share: the body type of their responses, the
//! responses the proxy makes itself, and the headers proxies use to talk to each other (the
//! pooled clients are [`crate::pool`]). It sits below both listeners, so neither imports the
//! other.

use std::time::Duration;

use bytes::Bytes;
use http::header::{HOST, HeaderValue};
use http::{Request, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;

/// Body of responses on the proxying listeners.
pub type Body = BoxBody<Bytes, hyper::Error>;

/// Header on responses the proxy made itself, saying why (as Linkerd's `l5d-proxy-error`).
pub const PROXY_ERROR_HEADER: &str = "mesh-proxy-error";

/// Header with the SPIFFE ID of the peer proxy whose mTLS connection carried the request.
pub const CLIENT_ID_HEADER: &str = "x-mesh-client-id";

/// Header a proxy adds when it carries an HTTP/1.1 request over HTTP/2 to a peer, so the peer
/// hands it to its app as HTTP/1.1 again.
pub const ORIG_PROTO_HEADER: &str = "mesh-orig-proto";

/// The value of [`ORIG_PROTO_HEADER`].
pub const ORIG_PROTO_HTTP1: &str = "HTTP/1.1";

/// Header on a `CONNECT` a proxy sends to a peer's inbound listener when it carries an app's
/// `CONNECT` to a meshed endpoint: the peer answers it itself and tunnels to its app, rather
/// than handing the `CONNECT` to the app (see [`crate::tunnel`]).
pub const TUNNEL_HEADER: &str = "mesh-tunnel";

/// Default connect timeout to endpoints and to the local app (Linkerd's).
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

/// A response the proxy makes itself, with the reason in a header and the body.
pub fn error(status: StatusCode, why: &str) -> Response<Body> {
    let mut rsp = Response::new(
        Full::new(Bytes::from(format!("{why}\n")))
            .map_err(|never| match never {})
            .boxed(),
    );
    *rsp.status_mut() = status;
    if let Ok(v) = HeaderValue::from_str(why) {
        rsp.headers_mut().insert(PROXY_ERROR_HEADER, v);
    }
    rsp
}

/// An empty body, as responses to HEAD and to upgrades have.
pub fn empty() -> Body {
    Empty::new().map_err(|never| match never {}).boxed()
}

/// Sends `req` on a new HTTP/1.1 connection over `io`, one that can be upgraded: what the
/// proxy uses for `Upgrade` and `CONNECT`, whose connections are never pooled.
pub async fn send_http1(
    io: crate::pool::BoxIo,
    req: Request<crate::pool::RequestBody>,
) -> hyper::Result<Response<Incoming>> {
    let (mut send, conn) = hyper::client::conn::http1::handshake(io).await?;
    tokio::spawn(async move {
        if let Err(error) = conn.with_upgrades().await {
            tracing::debug!(%error, "upgradable HTTP/1.1 connection ended with an error");
        }
    });
    send.send_request(req).await
}

/// Puts the request's authority in Host when it has none: HTTP/2 callers send the authority in
/// the URI, and the far side (an HTTP/1.1 app, or a proxy routing by Host) needs it in Host.
pub fn authority_to_host<B>(req: &mut Request<B>) {
    if !req.headers().contains_key(HOST)
        && let Some(v) = req
            .uri()
            .authority()
            .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
    {
        req.headers_mut().insert(HOST, v);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn proxy_errors_say_why_in_a_header_and_the_body() {
        let rsp = error(StatusCode::SERVICE_UNAVAILABLE, "no endpoints");
        assert_eq!(rsp.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(rsp.headers()[PROXY_ERROR_HEADER], "no endpoints");
        let body = rsp.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(body, "no endpoints\n");
    }

    #[test]
    fn the_authority_goes_to_host_only_when_host_is_missing() {
        let mut h2 = Request::get("http://web.shop:8080/a").body(()).unwrap();
        authority_to_host(&mut h2);
        assert_eq!(h2.headers()[HOST], "web.shop:8080");
        let mut h1 = Request::get("http://web.shop:8080/a")
            .header(HOST, "web")
            .body(())
            .unwrap();
        authority_to_host(&mut h1);
        assert_eq!(h1.headers()[HOST], "web");
    }
}
