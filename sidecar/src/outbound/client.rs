//! The bottom of the stack: the request is rewritten for its endpoint and sent on a pooled
//! client chosen by the endpoint. An endpoint with an identity is a peer proxy: the request goes
//! to it over mTLS (the peer must present exactly that identity) as HTTP/2, on one pooled
//! client per peer identity ([`MtlsClients`]), and an HTTP/1.1 request is marked with
//! [`ORIG_PROTO_HEADER`] so the peer restores it. Endpoints without an identity are not meshed
//! and hear what the app spoke ([`PlainClient`]): HTTP/1.1, or h2c when the app sent HTTP/2
//! (gRPC to an unmeshed server).
//!
//! Upgrades and `CONNECT` (see [`crate::tunnel`]) are the exception: to a peer they go as
//! HTTP/1.1 on an mTLS connection of their own, and a `CONNECT` to an unmeshed endpoint is
//! answered here with a TCP connection to it.
//!
//! The choice sits last because it depends on the endpoint picked, and everything above it is
//! the same for both kinds. The clients themselves are inner services, so the choice and the
//! rewriting are tested without a socket.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::TryFutureExt;
use futures_util::future::{BoxFuture, Either, ready};
use http::header::HeaderValue;
use http::uri::{PathAndQuery, Scheme};
use http::{Method, Request, Response, Uri, Version};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use mesh_core::Name;
use tokio::net::TcpStream;
use tower::Service;

use crate::http::{
    Body, CLIENT_ID_HEADER, ORIG_PROTO_HEADER, ORIG_PROTO_HTTP1, TUNNEL_HEADER, authority_to_host,
};
use crate::identity::SharedCredentials;
use crate::outbound::balance::{Endpoint, ToEndpoint};
use crate::outbound::error::{AttemptError, Error};
use crate::pool;
use crate::retry::ReplayBody;
use crate::tls::MtlsConnector;

/// A request to a peer proxy, with the identity it must present.
pub type ToPeer<B> = (Name, Request<B>);

/// Sends each attempt to its endpoint with the plaintext client `P` or the mTLS clients `M`;
/// see the [module](self).
#[derive(Clone, Debug)]
pub struct Client<P, M> {
    plain: P,
    mtls: Option<M>,
}

impl<P, M> Client<P, M> {
    /// Sends to unmeshed endpoints with `plain` and to peer proxies with `mtls`; without
    /// `mtls` (this proxy has no identity), requests to peer proxies fail.
    pub fn new(plain: P, mtls: Option<M>) -> Self {
        Self { plain, mtls }
    }
}

impl<P, M, B> Service<ToEndpoint<B>> for Client<P, M>
where
    P: Service<Request<B>, Response = Response<Body>, Error = AttemptError>,
    M: Service<ToPeer<B>, Response = Response<Body>, Error = AttemptError>,
    P::Future: Send + 'static,
    M::Future: Send + 'static,
{
    type Response = Response<Body>;
    type Error = Error;
    type Future = BoxFuture<'static, Result<Response<Body>, Error>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Error>> {
        // The pooled clients are always ready: connections are made per request.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: ToEndpoint<B>) -> Self::Future {
        let ToEndpoint {
            backend,
            endpoint: Endpoint { addr, identity, .. },
            mut request,
            ..
        } = req;
        // Host keeps the name the app used; the URI names the endpoint.
        authority_to_host(&mut request);
        // The path is shared with the app's request, not copied.
        let path = request
            .uri()
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| PathAndQuery::from_static("/"));
        let uri = Uri::builder()
            .scheme(if identity.is_some() {
                Scheme::HTTPS
            } else {
                Scheme::HTTP
            })
            .authority(addr.to_string())
            .path_and_query(path)
            .build();
        let uri = match uri {
            Ok(uri) => uri,
            Err(e) => return Box::pin(ready(Err(Error::BadTarget(e)))),
        };
        let upgrade = crate::tunnel::is_upgrade(&request);
        let (mut parts, body) = request.into_parts();
        let app_version = parts.version;
        parts.uri = uri;
        // What the app spoke goes on: HTTP/2 (gRPC, h2c) stays HTTP/2, HTTP/1.x goes as
        // HTTP/1.1, and to a peer proxy everything but an upgrade goes as HTTP/2 (below).
        if app_version != Version::HTTP_2 {
            parts.version = Version::HTTP_11;
        }
        // What the proxy itself noted on the request stays here.
        parts.extensions = http::Extensions::new();
        // Only the far side's inbound sets these, from what it verified and received.
        parts.headers.remove(CLIENT_ID_HEADER);
        parts.headers.remove(ORIG_PROTO_HEADER);
        parts.headers.remove(TUNNEL_HEADER);
        let sent = match identity {
            None => Either::Left(self.plain.call(Request::from_parts(parts, body))),
            Some(identity) => {
                let Some(mtls) = &mut self.mtls else {
                    let error = AttemptError::NoIdentity(format!(
                        "the endpoint is meshed ({identity}) and this proxy has no identity \
                         (set MESH_PROXY_IDENTITY and MESH_PROXY_TOKEN_FILE)"
                    ));
                    return Box::pin(ready(Err(Error::Endpoint {
                        backend,
                        addr,
                        error,
                    })));
                };
                if upgrade {
                    // Carried as HTTP/1.1 on a connection of its own: see crate::tunnel.
                } else {
                    if app_version < Version::HTTP_2 {
                        parts.headers.insert(
                            ORIG_PROTO_HEADER,
                            HeaderValue::from_static(ORIG_PROTO_HTTP1),
                        );
                    }
                    parts.version = Version::HTTP_2;
                }
                Either::Right(mtls.call((identity, Request::from_parts(parts, body))))
            }
        };
        Box::pin(sent.map_err(move |error| Error::Endpoint {
            backend,
            addr,
            error,
        }))
    }
}

fn boxed(rsp: Response<Incoming>) -> Response<Body> {
    rsp.map(BodyExt::boxed)
}

/// Sends `req` to the endpoint its URI names with `send`, as the client layer wants the answer.
async fn send<F>(
    req: Request<ReplayBody>,
    send: impl FnOnce(SocketAddr, Request<pool::RequestBody>) -> F,
) -> Result<Response<Body>, AttemptError>
where
    F: Future<Output = Result<Response<crate::pool::Body>, crate::pool::Error>>,
{
    let addr = endpoint_addr(&req)?;
    let rsp = send(addr, req.map(BodyExt::boxed)).await?;
    Ok(rsp.map(BodyExt::boxed))
}

/// The pooled plaintext clients to unmeshed endpoints: HTTP/1.1, and h2c for requests the app
/// sent as HTTP/2. A `CONNECT` is answered here, by opening a TCP connection to the endpoint.
#[derive(Clone, Debug)]
pub struct PlainClient {
    http1: pool::Http1<pool::Tcp>,
    h2c: pool::Http2<pool::Tcp>,
    connect_timeout: Duration,
}

impl PlainClient {
    /// Connections fail as connect errors when not made within `connect_timeout`.
    pub fn new(connect_timeout: Duration) -> Self {
        Self {
            http1: pool::Http1::new(pool::Tcp {
                timeout: connect_timeout,
            }),
            h2c: pool::Http2::new(pool::Tcp {
                timeout: connect_timeout,
            }),
            connect_timeout,
        }
    }
}

impl Service<Request<ReplayBody>> for PlainClient {
    type Response = Response<Body>;
    type Error = AttemptError;
    type Future = BoxFuture<'static, Result<Response<Body>, AttemptError>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), AttemptError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<ReplayBody>) -> Self::Future {
        if req.method() == Method::CONNECT {
            let addr = endpoint_addr(&req);
            let timeout = self.connect_timeout;
            return Box::pin(async move {
                let addr = addr?;
                let tcp = tokio::time::timeout(timeout, TcpStream::connect(addr))
                    .await
                    .map_err(|_| connect_error(format!("connecting to {addr} timed out")))?
                    .map_err(|e| connect_error(format!("connecting to {addr}: {e}")))?;
                let _ = tcp.set_nodelay(true);
                Ok(crate::tunnel::connected(tcp))
            });
        }
        if req.version() == Version::HTTP_2 {
            let h2c = self.h2c.clone();
            Box::pin(send(req, move |addr, req| async move {
                h2c.send(addr, req).await
            }))
        } else {
            let http1 = self.http1.clone();
            Box::pin(send(req, move |addr, req| async move {
                http1.send(addr, req).await
            }))
        }
    }
}

/// The endpoint address a request's URI names (the client layer put it there).
fn endpoint_addr<B>(req: &Request<B>) -> Result<SocketAddr, AttemptError> {
    let authority = req.uri().authority().map_or("", |a| a.as_str());
    authority
        .parse()
        .map_err(|_| connect_error(format!("endpoint {authority} is not an ip:port")))
}

/// A failure before anything was sent.
fn connect_error(why: String) -> AttemptError {
    AttemptError::Client {
        connect: true,
        error: why.into(),
    }
}

/// Pooled mTLS clients to peer proxies, one per peer identity (its TLS configuration checks
/// that identity), each pooling an HTTP/2 connection per endpoint.
#[derive(Clone, Debug)]
pub struct MtlsClients(Arc<Mtls>);

#[derive(Debug)]
struct Mtls {
    credentials: SharedCredentials,
    connect_timeout: Duration,
    clients: Mutex<BTreeMap<Name, pool::Http2<MtlsConnector>>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl MtlsClients {
    /// Clients presenting the certificate in `credentials`, whose connections fail as connect
    /// errors when TCP and TLS take longer than `connect_timeout`.
    pub fn new(credentials: SharedCredentials, connect_timeout: Duration) -> Self {
        Self(Arc::new(Mtls {
            credentials,
            connect_timeout,
            clients: Mutex::default(),
        }))
    }

    fn client(&self, identity: &Name) -> Result<pool::Http2<MtlsConnector>, rustls::Error> {
        let mut clients = lock(&self.0.clients);
        if let Some(c) = clients.get(identity.as_str()) {
            return Ok(c.clone());
        }
        let config = crate::tls::client_config(&self.0.credentials, identity)?;
        let client = pool::Http2::new(MtlsConnector::new(config, self.0.connect_timeout));
        clients.insert(identity.clone(), client.clone());
        Ok(client)
    }

    /// Forgets clients of identities no endpoint has any more.
    pub fn retain(&self, identities: &BTreeSet<&str>) {
        lock(&self.0.clients).retain(|id, _| identities.contains(id.as_str()));
    }
}

impl MtlsClients {
    /// Sends an upgrade (see [`crate::tunnel`]) to the peer that must be `identity`, as
    /// HTTP/1.1 on an mTLS connection of its own; an app's `CONNECT` goes as a `CONNECT`
    /// marked with [`TUNNEL_HEADER`], which the peer answers by tunnelling to its app.
    fn upgrade(
        &self,
        identity: Name,
        req: Request<ReplayBody>,
    ) -> BoxFuture<'static, Result<Response<Body>, AttemptError>> {
        let credentials = self.0.credentials.clone();
        let timeout = self.0.connect_timeout;
        Box::pin(async move {
            let addr = endpoint_addr(&req)?;
            let mut config =
                (*crate::tls::client_config(&credentials, &identity).map_err(|e| {
                    AttemptError::NoIdentity(format!(
                        "cannot build the TLS client for {identity}: {e}"
                    ))
                })?)
                .clone();
            config.alpn_protocols = vec![b"http/1.1".to_vec()];
            let tls = tokio_rustls::TlsConnector::from(Arc::new(config));
            let io = crate::tls::connect_mtls(&tls, addr, timeout)
                .await
                .map_err(|e| AttemptError::Client {
                    connect: true,
                    error: Box::new(e),
                })?;
            let (mut parts, body) = req.into_parts();
            if parts.method == Method::CONNECT {
                parts.uri = Uri::from(
                    http::uri::Authority::try_from(addr.to_string())
                        .map_err(|e| connect_error(format!("endpoint {addr}: {e}")))?,
                );
                parts
                    .headers
                    .insert(TUNNEL_HEADER, HeaderValue::from_static("app"));
            } else {
                // HTTP/1.1 on a connection of its own goes in origin form.
                let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
                parts.uri = Uri::try_from(path)
                    .map_err(|e| connect_error(format!("request target {path}: {e}")))?;
            }
            let io: pool::BoxIo = Box::new(hyper_util::rt::TokioIo::new(io));
            crate::http::send_http1(io, Request::from_parts(parts, body.boxed()))
                .await
                .map(boxed)
                .map_err(|e| AttemptError::Client {
                    connect: false,
                    error: Box::new(e),
                })
        })
    }
}

impl Service<ToPeer<ReplayBody>> for MtlsClients {
    type Response = Response<Body>;
    type Error = AttemptError;
    type Future = BoxFuture<'static, Result<Response<Body>, AttemptError>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), AttemptError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, (identity, req): ToPeer<ReplayBody>) -> Self::Future {
        if crate::tunnel::is_upgrade(&req) {
            return self.upgrade(identity, req);
        }
        match self.client(&identity) {
            Ok(client) => Box::pin(send(req, move |addr, req| async move {
                client.send(addr, req).await
            })),
            Err(e) => Box::pin(ready(Err(AttemptError::NoIdentity(format!(
                "cannot build the TLS client for {identity}: {e}"
            ))))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::outbound::route::{Routed, mk};
    use futures_util::future::Ready;
    use mesh_core::proxy_api::ServiceRef;
    use tower::ServiceExt;

    const RULE: &str = "{name: main, backends: [{service: web-primary.default:80, weight: 1}]}";

    /// What a stub client was asked to send.
    #[derive(Debug)]
    struct Asked {
        identity: Option<String>,
        uri: Uri,
        version: Version,
        headers: http::HeaderMap,
    }

    type Seen = Arc<Mutex<Vec<Asked>>>;

    fn plain(
        seen: &Seen,
    ) -> impl Service<
        Request<()>,
        Response = Response<Body>,
        Error = AttemptError,
        Future = Ready<Result<Response<Body>, AttemptError>>,
    > + Clone {
        let seen = seen.clone();
        tower::service_fn(move |req: Request<()>| {
            seen.lock().unwrap().push(Asked {
                identity: None,
                uri: req.uri().clone(),
                version: req.version(),
                headers: req.headers().clone(),
            });
            ready(Ok(mk::response(200)))
        })
    }

    fn mtls(
        seen: &Seen,
    ) -> impl Service<
        ToPeer<()>,
        Response = Response<Body>,
        Error = AttemptError,
        Future = Ready<Result<Response<Body>, AttemptError>>,
    > + Clone {
        let seen = seen.clone();
        tower::service_fn(move |(identity, req): ToPeer<()>| {
            seen.lock().unwrap().push(Asked {
                identity: Some(identity.to_string()),
                uri: req.uri().clone(),
                version: req.version(),
                headers: req.headers().clone(),
            });
            ready(Ok(mk::response(200)))
        })
    }

    fn attempt(identity: Option<&str>, request: http::request::Builder) -> ToEndpoint<()> {
        let Routed { route, request, .. } =
            mk::routed_with(RULE, &mk::tables("{}"), request.body(()));
        ToEndpoint {
            route,
            backend: ServiceRef::new("web-primary", "default", 80),
            endpoint: Endpoint {
                addr: "127.0.0.1:9000".parse().unwrap(),
                identity: identity.map(Name::from),
                deployment: "".into(),
            },
            request,
        }
    }

    fn app_request() -> http::request::Builder {
        Request::get("http://web.default:80/a?b=c")
            .header(CLIENT_ID_HEADER, "spiffe://forged")
            .header(ORIG_PROTO_HEADER, "HTTP/1.1")
    }

    #[tokio::test]
    async fn unmeshed_endpoints_hear_the_apps_protocol_in_plaintext() {
        let seen = Seen::default();
        let client = Client::new(plain(&seen), Some(mtls(&seen)));
        client
            .clone()
            .oneshot(attempt(None, app_request()))
            .await
            .unwrap();
        let sent = seen.lock().unwrap().pop().unwrap();
        assert_eq!(sent.version, Version::HTTP_11);
        // gRPC and other h2c callers keep HTTP/2: an HTTP/2-only server could not answer
        // HTTP/1.1.
        let req = attempt(None, app_request().version(Version::HTTP_2));
        client.oneshot(req).await.unwrap();
        let sent = seen.lock().unwrap().pop().unwrap();
        assert_eq!(sent.identity, None);
        assert_eq!(sent.uri, "http://127.0.0.1:9000/a?b=c");
        assert_eq!(sent.version, Version::HTTP_2);
        assert_eq!(
            sent.headers[http::header::HOST],
            "web.default:80",
            "Host keeps the name the app used"
        );
        assert!(
            !sent.headers.contains_key(CLIENT_ID_HEADER),
            "only a peer's inbound sets it"
        );
        assert!(!sent.headers.contains_key(ORIG_PROTO_HEADER));
    }

    #[tokio::test]
    async fn peer_proxies_get_http2_over_mtls_marked_with_the_apps_protocol() {
        let seen = Seen::default();
        let client = Client::new(plain(&seen), Some(mtls(&seen)));
        let id = "spiffe://cluster.local/ns/default/sa/web";
        client
            .clone()
            .oneshot(attempt(Some(id), app_request()))
            .await
            .unwrap();
        let sent = seen.lock().unwrap().pop().unwrap();
        assert_eq!(sent.identity.as_deref(), Some(id));
        assert_eq!(sent.uri, "https://127.0.0.1:9000/a?b=c");
        assert_eq!(sent.version, Version::HTTP_2);
        assert_eq!(sent.headers[ORIG_PROTO_HEADER], ORIG_PROTO_HTTP1);
        assert!(!sent.headers.contains_key(CLIENT_ID_HEADER));

        // An app that spoke HTTP/2 (gRPC) is not marked, so the peer keeps HTTP/2.
        let h2 = Request::get("http://web.default:80/").version(Version::HTTP_2);
        client.oneshot(attempt(Some(id), h2)).await.unwrap();
        let sent = seen.lock().unwrap().pop().unwrap();
        assert!(!sent.headers.contains_key(ORIG_PROTO_HEADER));
    }

    #[tokio::test]
    async fn upgrades_go_to_peers_as_http1_unmarked() {
        let seen = Seen::default();
        let client = Client::new(plain(&seen), Some(mtls(&seen)));
        let id = "spiffe://cluster.local/ns/default/sa/web";
        let ws = app_request()
            .header(TUNNEL_HEADER, "app")
            .header(http::header::CONNECTION, "upgrade")
            .header(http::header::UPGRADE, "websocket");
        client.oneshot(attempt(Some(id), ws)).await.unwrap();
        let sent = seen.lock().unwrap().pop().unwrap();
        assert_eq!(sent.identity.as_deref(), Some(id));
        assert_eq!(sent.version, Version::HTTP_11, "HTTP/2 has no Upgrade");
        assert!(!sent.headers.contains_key(ORIG_PROTO_HEADER));
        assert!(
            !sent.headers.contains_key(TUNNEL_HEADER),
            "only the mTLS client sets it"
        );
        assert_eq!(sent.headers[http::header::UPGRADE], "websocket");
    }

    #[tokio::test]
    async fn a_meshed_endpoint_without_an_identity_here_is_a_connect_failure() {
        let seen = Seen::default();
        let client = Client::new(
            plain(&seen),
            None::<tower::util::BoxCloneService<ToPeer<()>, Response<Body>, AttemptError>>,
        );
        let id = "spiffe://cluster.local/ns/default/sa/web";
        let err = client
            .oneshot(attempt(Some(id), app_request()))
            .await
            .unwrap_err();
        assert_eq!(err.status(), http::StatusCode::BAD_GATEWAY);
        assert!(err.is_retryable(), "nothing was sent");
        assert!(
            err.to_string().contains("this proxy has no identity"),
            "{err}"
        );
        assert!(seen.lock().unwrap().is_empty());
    }
}
