//! Requests after which a connection stops being HTTP: an HTTP/1.1 `Upgrade` (WebSocket) that
//! the far side answers `101 Switching Protocols`, and a `CONNECT` answered with a 2xx. Both
//! listeners pass such a request on like any other, and when the answer says the protocol
//! switched, they [`splice`] the caller's connection to the far side's and copy bytes both
//! ways until either closes, counted in the `tcp_*` metrics of their direction.
//!
//! The far side of a tunnel is either the connection the answer came on (hyper hands it over
//! once it has read the 101 or 2xx), or, for a `CONNECT` the proxy answers itself, a connection
//! it opened ([`connected`]). Between proxies an upgrade travels as HTTP/1.1 on an mTLS
//! connection of its own, not on the pooled HTTP/2 connections: an HTTP/1.1 upgrade has no
//! HTTP/2 form that the app's side would understand, and the upgraded connection is used up by
//! the tunnel anyway.

use std::io;
use std::sync::{Arc, Mutex, PoisonError};

use http::header::{CONNECTION, UPGRADE};
use http::{Method, Request, Response, StatusCode, Version};
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};

use crate::http::{Body, empty};
use crate::metrics::{Metrics, TcpLabels};

/// Whether `req` may turn its connection into a tunnel: a `CONNECT`, or an HTTP/1.x request
/// asking to `Upgrade` (`Connection: upgrade` and an `Upgrade` header).
pub fn is_upgrade<B>(req: &Request<B>) -> bool {
    if req.method() == Method::CONNECT {
        return true;
    }
    req.version() <= Version::HTTP_11
        && req.headers().contains_key(UPGRADE)
        && req
            .headers()
            .get_all(CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|token| token.trim().eq_ignore_ascii_case("upgrade"))
}

/// Drops an HTTP/1.1 request's offer to upgrade to h2c (`Upgrade: h2c`, as `curl --http2`
/// sends on plain http): the proxy answers it as HTTP/1.1, so every request stays visible to
/// routing and metrics, instead of the app switching the connection to HTTP/2 behind it.
pub fn refuse_h2c_upgrade<B>(req: &mut Request<B>) {
    let h2c = req
        .headers()
        .get(UPGRADE)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"h2c"));
    if h2c {
        let headers = req.headers_mut();
        headers.remove(UPGRADE);
        headers.remove("http2-settings");
        // Its other tokens are hop-by-hop options for this connection, which ends here.
        headers.remove(CONNECTION);
    }
}

/// Whether the answer to a request for which [`is_upgrade`] held switched the protocol: a 2xx
/// to a `CONNECT`, a 101 to an `Upgrade`.
pub fn switched<B>(connect: bool, rsp: &Response<B>) -> bool {
    if connect {
        rsp.status().is_success()
    } else {
        rsp.status() == StatusCode::SWITCHING_PROTOCOLS
    }
}

/// What a tunnel's far side can be.
pub trait Io: AsyncRead + AsyncWrite + Send + Unpin + 'static {}

impl<T: AsyncRead + AsyncWrite + Send + Unpin + 'static> Io for T {}

/// A connection the proxy opened itself to answer a `CONNECT`, carried to the listener in the
/// response's extensions.
#[derive(Clone)]
struct Opened(Arc<Mutex<Option<Box<dyn Io>>>>);

/// The `200` the proxy answers a `CONNECT` with when it has opened the far side itself (to an
/// unmeshed endpoint, a named host, or the local app); [`splice`] joins the caller to `io`.
pub fn connected(io: impl Io) -> Response<Body> {
    let mut rsp = Response::new(empty());
    rsp.extensions_mut()
        .insert(Opened(Arc::new(Mutex::new(Some(Box::new(io))))));
    rsp
}

/// Joins the caller's connection, upgraded once the listener has sent `rsp` (`downstream`), to
/// the far side `rsp` came from, in a task of its own; `labels` label its `tcp_*` metrics.
/// `rsp` loses its body (an upgrade's answer has none) and is to be sent as it is.
pub fn splice(
    downstream: OnUpgrade,
    rsp: &mut Response<Body>,
    metrics: &Metrics,
    labels: TcpLabels,
) {
    let opened = rsp
        .extensions_mut()
        .remove::<Opened>()
        .and_then(|Opened(io)| io.lock().unwrap_or_else(PoisonError::into_inner).take());
    let upstream = match opened {
        Some(io) => Upstream::Opened(io),
        None => Upstream::Http(hyper::upgrade::on(&mut *rsp)),
    };
    *rsp.body_mut() = empty();
    let metrics = metrics.clone();
    tokio::spawn(async move {
        let direction = labels.direction;
        if let Err(error) = run(downstream, upstream, &metrics, labels).await {
            tracing::debug!(%error, "{direction} tunnel ended with an error");
        }
    });
}

enum Upstream {
    Opened(Box<dyn Io>),
    Http(OnUpgrade),
}

async fn run(
    downstream: OnUpgrade,
    upstream: Upstream,
    metrics: &Metrics,
    labels: TcpLabels,
) -> io::Result<()> {
    let downstream = TokioIo::new(downstream.await.map_err(io::Error::other)?);
    let upstream: Box<dyn Io> = match upstream {
        Upstream::Opened(io) => io,
        Upstream::Http(on) => Box::new(TokioIo::new(on.await.map_err(io::Error::other)?)),
    };
    // The tunnel is relayed and counted like any opaque connection; both sides are open.
    crate::opaque::relay(downstream, &labels, metrics, async { Ok(upstream) }).await
}

/// Why a `CONNECT`'s target cannot be tunnelled to, or `None` when it is a `host:port`.
pub fn bad_connect_target<B>(req: &Request<B>) -> Option<String> {
    let uri = req.uri();
    let Some(authority) = uri.authority() else {
        return Some(format!(
            "CONNECT needs a host:port target (authority form), got {uri:?}"
        ));
    };
    if uri.scheme().is_some() || uri.path_and_query().is_some_and(|p| p.as_str() != "/") {
        return Some(format!(
            "CONNECT needs a host:port target (authority form), got {uri:?}"
        ));
    }
    match authority.port_u16() {
        None => Some(format!("CONNECT target {authority} has no port")),
        Some(0) => Some(format!("CONNECT target {authority} has port 0")),
        Some(_) if authority.host().is_empty() => {
            Some(format!("CONNECT target {authority} has no host"))
        }
        Some(_) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upgrades_are_connect_or_http1_asking_to_upgrade() {
        let ws = || {
            Request::get("/chat")
                .header(UPGRADE, "websocket")
                .header(CONNECTION, "keep-alive, Upgrade")
        };
        assert!(is_upgrade(&ws().body(()).unwrap()));
        assert!(!is_upgrade(
            &ws().version(Version::HTTP_2).body(()).unwrap()
        ));
        let no_connection = Request::get("/").header(UPGRADE, "websocket");
        assert!(!is_upgrade(&no_connection.body(()).unwrap()));
        let connect = Request::connect("web.default:443").body(()).unwrap();
        assert!(is_upgrade(&connect));
        assert!(!is_upgrade(&Request::get("/").body(()).unwrap()));
    }

    #[test]
    fn an_offer_to_upgrade_to_h2c_is_refused() {
        let mut req = Request::get("/")
            .header(UPGRADE, "h2c")
            .header(CONNECTION, "Upgrade, HTTP2-Settings")
            .header("http2-settings", "AAMAAABkAAQAoAAAAAIAAAAA")
            .body(())
            .unwrap();
        refuse_h2c_upgrade(&mut req);
        assert!(!is_upgrade(&req));
        assert!(req.headers().is_empty(), "{:?}", req.headers());
        let mut ws = Request::get("/")
            .header(UPGRADE, "websocket")
            .header(CONNECTION, "upgrade")
            .body(())
            .unwrap();
        refuse_h2c_upgrade(&mut ws);
        assert!(is_upgrade(&ws));
    }

    #[test]
    fn only_a_101_or_a_2xx_to_connect_switches() {
        let rsp = |s: u16| Response::builder().status(s).body(()).unwrap();
        assert!(switched(false, &rsp(101)));
        assert!(!switched(false, &rsp(200)));
        assert!(switched(true, &rsp(200)));
        assert!(!switched(true, &rsp(407)));
    }

    #[test]
    fn connect_targets_must_be_host_and_port() {
        let connect = |t: &str| Request::connect(t).body(()).unwrap();
        assert_eq!(bad_connect_target(&connect("web.default:443")), None);
        assert_eq!(bad_connect_target(&connect("127.0.0.1:8443")), None);
        let why = bad_connect_target(&connect("web.default")).unwrap();
        assert_eq!(why, "CONNECT target web.default has no port");
        let why = bad_connect_target(&connect("web.default:0")).unwrap();
        assert_eq!(why, "CONNECT target web.default:0 has port 0");
        let why = bad_connect_target(&connect("http://web.default:80/a")).unwrap();
        assert!(why.contains("authority form"), "{why}");
    }
}
