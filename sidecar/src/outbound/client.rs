//! The bottom of the stack: the request is rewritten for its endpoint and sent on a pooled
//! client chosen by the endpoint. An endpoint with an identity is a peer proxy: the request goes
//! to it over mTLS (the peer must present exactly that identity) as HTTP/2, on one pooled
//! client per peer identity ([`MtlsClients`]), and an HTTP/1.1 request is marked with
//! [`ORIG_PROTO_HEADER`] so the peer restores it. Endpoints without an identity are not meshed
//! and get plaintext HTTP/1.1 ([`PlainClient`]).
//!
//! The choice sits last because it depends on the endpoint picked, and everything above it is
//! the same for both kinds. The clients themselves are inner services, so the choice and the
//! rewriting are tested without a socket.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::TryFutureExt;
use futures_util::future::{BoxFuture, Either, Ready, ready};
use http::header::HeaderValue;
use http::{Request, Response, Uri, Version};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use tower::Service;

use crate::http::{
    Body, CLIENT_ID_HEADER, ORIG_PROTO_HEADER, ORIG_PROTO_HTTP1, POOL_IDLE_TIMEOUT,
    authority_to_host,
};
use crate::identity::SharedCredentials;
use crate::outbound::balance::{Endpoint, ToEndpoint};
use crate::outbound::error::{AttemptError, Error};
use crate::retry::ReplayBody;
use crate::tls::MtlsConnector;

/// A request to a peer proxy, with the identity it must present.
pub type ToPeer<B> = (String, Request<B>);

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
            endpoint: Endpoint { addr, identity },
            mut request,
            ..
        } = req;
        // Host keeps the name the app used; the URI names the endpoint.
        authority_to_host(&mut request);
        let path = request.uri().path_and_query().map_or("/", |p| p.as_str());
        let uri = Uri::builder()
            .scheme(if identity.is_some() { "https" } else { "http" })
            .authority(addr.to_string())
            .path_and_query(path)
            .build();
        let uri = match uri {
            Ok(uri) => uri,
            Err(e) => return Box::pin(ready(Err(Error::BadTarget(e)))),
        };
        let (mut parts, body) = request.into_parts();
        let app_version = parts.version;
        parts.uri = uri;
        parts.version = Version::HTTP_11;
        // What the proxy itself noted on the request stays here.
        parts.extensions = http::Extensions::new();
        // Only the far side's inbound sets these, from what it verified and received.
        parts.headers.remove(CLIENT_ID_HEADER);
        parts.headers.remove(ORIG_PROTO_HEADER);
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
                if app_version < Version::HTTP_2 {
                    parts.headers.insert(
                        ORIG_PROTO_HEADER,
                        HeaderValue::from_static(ORIG_PROTO_HTTP1),
                    );
                }
                parts.version = Version::HTTP_2;
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

/// What a pooled hyper client answers, as the client layer wants it.
type Sent = futures_util::future::MapErr<
    futures_util::future::MapOk<
        hyper_util::client::legacy::ResponseFuture,
        fn(Response<Incoming>) -> Response<Body>,
    >,
    fn(hyper_util::client::legacy::Error) -> AttemptError,
>;

fn send<C>(
    client: &hyper_util::client::legacy::Client<C, ReplayBody>,
    req: Request<ReplayBody>,
) -> Sent
where
    C: hyper_util::client::legacy::connect::Connect + Clone + Send + Sync + 'static,
{
    client
        .request(req)
        .map_ok(boxed as fn(_) -> _)
        .map_err(AttemptError::from as fn(_) -> _)
}

/// The pooled plaintext HTTP/1.1 client to unmeshed endpoints.
#[derive(Clone, Debug)]
pub struct PlainClient(hyper_util::client::legacy::Client<HttpConnector, ReplayBody>);

impl PlainClient {
    /// Connections fail as connect errors when not made within `connect_timeout`.
    pub fn new(connect_timeout: Duration) -> Self {
        Self(crate::http::client(connect_timeout))
    }
}

impl Service<Request<ReplayBody>> for PlainClient {
    type Response = Response<Body>;
    type Error = AttemptError;
    type Future = Sent;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), AttemptError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<ReplayBody>) -> Sent {
        send(&self.0, req)
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
    clients: Mutex<BTreeMap<String, hyper_util::client::legacy::Client<MtlsConnector, ReplayBody>>>,
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

    fn client(
        &self,
        identity: &str,
    ) -> Result<hyper_util::client::legacy::Client<MtlsConnector, ReplayBody>, rustls::Error> {
        let mut clients = lock(&self.0.clients);
        if let Some(c) = clients.get(identity) {
            return Ok(c.clone());
        }
        let config = crate::tls::client_config(&self.0.credentials, identity)?;
        let client = hyper_util::client::legacy::Client::builder(TokioExecutor::new())
            .pool_idle_timeout(POOL_IDLE_TIMEOUT)
            .pool_timer(TokioTimer::new())
            .http2_only(true)
            .build(MtlsConnector::new(config, self.0.connect_timeout));
        clients.insert(identity.to_string(), client.clone());
        Ok(client)
    }

    /// Forgets clients of identities no endpoint has any more.
    pub fn retain(&self, identities: &BTreeSet<&str>) {
        lock(&self.0.clients).retain(|id, _| identities.contains(id.as_str()));
    }
}

impl Service<ToPeer<ReplayBody>> for MtlsClients {
    type Response = Response<Body>;
    type Error = AttemptError;
    type Future = Either<Ready<Result<Response<Body>, AttemptError>>, Sent>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), AttemptError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, (identity, req): ToPeer<ReplayBody>) -> Self::Future {
        match self.client(&identity) {
            Ok(client) => Either::Right(send(&client, req)),
            Err(e) => Either::Left(ready(Err(AttemptError::NoIdentity(format!(
                "cannot build the TLS client for {identity}: {e}"
            ))))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::outbound::route::{Routed, mk};
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
                identity: Some(identity),
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
                identity: identity.map(str::to_string),
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
    async fn unmeshed_endpoints_get_plaintext_http1_in_origin_form() {
        let seen = Seen::default();
        let client = Client::new(plain(&seen), Some(mtls(&seen)));
        let req = attempt(None, app_request().version(Version::HTTP_2));
        client.oneshot(req).await.unwrap();
        let sent = seen.lock().unwrap().pop().unwrap();
        assert_eq!(sent.identity, None);
        assert_eq!(sent.uri, "http://127.0.0.1:9000/a?b=c");
        assert_eq!(sent.version, Version::HTTP_11);
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
