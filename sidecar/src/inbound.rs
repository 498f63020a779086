//! The inbound listener: every request peers send to the local workload. It tells the protocol
//! from the first byte: a TLS ClientHello is a peer proxy (mTLS with a required client
//! certificate, when the proxy has an identity); anything else is plaintext HTTP/1.1 or h2c.
//! Each request is handed to the local app with a pooled client, keeping the Host the caller
//! used: over HTTP/1.1, unless the request came as HTTP/2 and was not HTTP/1.1 at its origin
//! (peer proxies carry HTTP/1.1 over h2 and mark it with [`ORIG_PROTO_HEADER`]), so gRPC
//! reaches the app as HTTP/2. The caller's verified identity is passed in
//! [`CLIENT_ID_HEADER`]; the header is always removed from what callers send, so only a verified
//! identity reaches the app. Golden metrics are recorded with
//! `direction="inbound"` and the workload's own service as `dst_service`, so the same queries
//! that judge a canary from its callers' side can read it from the workload's side.
//!
//! An `Upgrade` (WebSocket) goes to the app like any request and becomes a tunnel when the app
//! answers 101; a `CONNECT` becomes one when answered 2xx (see [`crate::tunnel`] and
//! [`Inbound::connect`]).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use http::header::HeaderValue;
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{Method, Request, Response, StatusCode, Uri};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use mesh_core::proxy_api::ServiceRef;
use tokio::net::TcpListener;

use crate::authz::Authz;
use crate::drain::{ClientIdentity, OriginalDst, PeerAddr, Watch};
use crate::http::{
    Body, CLIENT_ID_HEADER, CONNECT_TIMEOUT, ORIG_PROTO_HEADER, ORIG_PROTO_HTTP1, TUNNEL_HEADER,
    authority_to_host, error,
};
use crate::identity::SharedCredentials;
use crate::metrics::{Metrics, RequestLabels, RequestSeries};
use crate::tap::TapEvent;
use crate::trace::{Span, attr};
use crate::tunnel;
use opentelemetry::trace::SpanKind;

/// The inbound proxy.
#[derive(Debug)]
pub struct Inbound {
    app: SocketAddr,
    /// `app` as a URI authority.
    app_authority: Option<Authority>,
    metrics: Metrics,
    /// The metrics series of plaintext requests; the label set is fixed per proxy, so its
    /// series are resolved once rather than per request.
    series: RequestSeries,
    /// The same, for requests from a peer proxy over mTLS (`tls="true"`).
    series_mtls: RequestSeries,
    client: crate::pool::Http1<crate::pool::Tcp>,
    h2_client: crate::pool::Http2<crate::pool::Tcp>,
    credentials: Option<SharedCredentials>,
    detect_timeout: std::time::Duration,
    authz: Option<Authz>,
    opaque_ports: crate::opaque::Ports,
    limits: crate::limits::Limits,
}

impl Inbound {
    /// A proxy handing requests to the app at `app`. `service` is the workload's service, if
    /// known; it labels the metrics.
    pub fn new(app: SocketAddr, service: Option<&ServiceRef>, metrics: Metrics) -> Self {
        // Labels are fixed per proxy, never taken from the request, so a peer cannot grow the
        // number of series by sending odd Host headers.
        let labels = RequestLabels {
            direction: "inbound",
            authority: service
                .map(ServiceRef::authority)
                .unwrap_or_default()
                .into(),
            route: "default".into(),
            dst_service: service.map(|s| s.name.as_str()).unwrap_or_default().into(),
            dst_namespace: service
                .map(|s| s.namespace.as_str())
                .unwrap_or_default()
                .into(),
            dst_deployment: "".into(),
            tls: "",
        };
        let labels_mtls = RequestLabels {
            tls: crate::metrics::tls_label(true),
            ..labels.clone()
        };
        Self {
            app,
            app_authority: Authority::try_from(app.to_string()).ok(),
            series: metrics.series(labels),
            series_mtls: metrics.series(labels_mtls),
            metrics,
            client: crate::pool::Http1::new(crate::pool::Tcp {
                timeout: CONNECT_TIMEOUT,
            }),
            h2_client: crate::pool::Http2::new(crate::pool::Tcp {
                timeout: CONNECT_TIMEOUT,
            }),
            credentials: None,
            detect_timeout: crate::opaque::DEFAULT_DETECT_TIMEOUT,
            authz: None,
            opaque_ports: crate::opaque::Ports::default(),
            limits: crate::limits::Limits::default(),
        }
    }

    /// What each connection may hold, and how many may be open at once.
    pub fn with_limits(mut self, limits: crate::limits::Limits) -> Self {
        self.limits = limits;
        self
    }

    /// Ports whose redirected connections are forwarded to the app as opaque TCP at once,
    /// never sniffed.
    pub fn with_opaque_ports(mut self, ports: crate::opaque::Ports) -> Self {
        self.opaque_ports = ports;
        self
    }

    /// How long a silent client may wait before it is taken for a server-first protocol and
    /// forwarded as opaque TCP.
    pub fn with_detect_timeout(mut self, timeout: std::time::Duration) -> Self {
        self.detect_timeout = timeout;
        self
    }

    /// Admits only the requests and connections the port's policy authorizes; without this,
    /// everyone is admitted.
    pub fn with_authz(mut self, authz: Authz) -> Self {
        self.authz = Some(authz);
        self
    }

    /// Accepts mTLS from peer proxies with the certificate in `credentials`.
    pub fn with_identity(mut self, credentials: SharedCredentials) -> Self {
        self.credentials = Some(credentials);
        self
    }

    /// Serves the inbound listener until `drain` fires and its requests in flight finish.
    pub async fn serve(
        self: Arc<Self>,
        listener: TcpListener,
        drain: Watch,
    ) -> std::io::Result<()> {
        let tls = match &self.credentials {
            Some(c) => Some(crate::tls::server_config(c).map_err(std::io::Error::other)?),
            None => None,
        };
        let opaque = Arc::new(crate::opaque::Opaque {
            app: self.app,
            metrics: self.metrics.clone(),
            labels: crate::metrics::TcpLabels {
                direction: "inbound",
                authority: self.series.labels().authority.to_string(),
                dst_service: self.series.labels().dst_service.to_string(),
                dst_namespace: self.series.labels().dst_namespace.to_string(),
                tls: "",
            },
            detect_timeout: self.detect_timeout,
            authz: self.authz.clone(),
            opaque_ports: self.opaque_ports.clone(),
        });
        let limits = self.limits;
        let cap = Arc::new(crate::limits::ConnectionCap::new(
            "inbound",
            limits.max_connections,
            &self.metrics,
        ));
        crate::drain::serve_detect(
            listener,
            "inbound",
            drain,
            tls,
            Some(opaque),
            limits,
            cap,
            move |req| {
                let this = self.clone();
                async move { this.handle(req).await }
            },
        )
        .await
    }

    /// Hands one request to the app.
    pub async fn handle(&self, mut req: Request<Incoming>) -> Response<Body> {
        let start = Instant::now();
        // The connection always records its peer; were it missing, the request is judged as
        // coming from nowhere, which no network admits (fail closed).
        let peer = req
            .extensions()
            .get::<PeerAddr>()
            .map_or(std::net::IpAddr::from([0, 0, 0, 0]), |PeerAddr(p)| p.ip());
        if let Some(authz) = &self.authz
            && let Err(denied) = authz.check_http(
                peer,
                req.extensions().get().map(|ClientIdentity(id)| id.as_str()),
            )
        {
            tracing::debug!(%peer, %denied, "inbound request refused");
            return error(StatusCode::FORBIDDEN, &format!("unauthorized: {denied}"));
        }
        let headers = req.headers_mut();
        headers.remove(CLIENT_ID_HEADER);
        let http1 = headers
            .remove(ORIG_PROTO_HEADER)
            .is_some_and(|v| v == ORIG_PROTO_HTTP1);
        // Only a peer proxy (a verified identity) carries its app's CONNECT this way.
        let to_app = headers.remove(TUNNEL_HEADER).is_some()
            && req.extensions().get::<ClientIdentity>().is_some();
        let h2 = req.version() == http::Version::HTTP_2 && !http1;
        if let Some(ClientIdentity(id)) = req.extensions().get::<ClientIdentity>().cloned()
            && let Ok(v) = HeaderValue::from_str(&id)
        {
            req.headers_mut().insert(CLIENT_ID_HEADER, v);
        }
        // A connection redirected to this listener goes to the app port it was meant for; a
        // peer proxy connecting to the listener itself goes to the app's declared port.
        let app = req
            .extensions()
            .get::<OriginalDst>()
            .map_or(self.app, |OriginalDst(dst)| {
                SocketAddr::new(self.app.ip(), dst.port())
            });
        let connect = req.method() == Method::CONNECT;
        let downstream = tunnel::is_upgrade(&req).then(|| hyper::upgrade::on(&mut req));
        // Built only for a request that may become a tunnel; most never do.
        let tunnel_labels = downstream.is_some().then(|| crate::metrics::TcpLabels {
            direction: "inbound",
            authority: self.series.labels().authority.to_string(),
            dst_service: self.series.labels().dst_service.to_string(),
            dst_namespace: self.series.labels().dst_namespace.to_string(),
            tls: if req.extensions().get::<ClientIdentity>().is_some() {
                "true"
            } else {
                ""
            },
        });
        let series = if req.extensions().get::<ClientIdentity>().is_some() {
            &self.series_mtls
        } else {
            &self.series
        };
        series.request(&self.metrics);
        let labels = series.labels();
        // Built only while someone taps; otherwise one atomic load.
        let mut tap = self.metrics.tap.active().then(|| {
            let mut e = TapEvent::of_request("inbound", req.method(), req.uri(), req.headers());
            e.authority = self.series.labels().authority.to_string();
            e.src_identity = req
                .extensions()
                .get::<ClientIdentity>()
                .map(|ClientIdentity(id)| id.clone());
            Box::new(e)
        });
        // One branch while tracing is off.
        let mut span = if self.metrics.trace.is_on() {
            self.server_span(&mut req, labels, peer)
        } else {
            None
        };
        let result = if connect {
            self.connect(app, req, to_app).await
        } else {
            // HTTP/2 callers send the authority in the URI, not in Host; the app speaks
            // HTTP/1.1 and needs it in Host.
            authority_to_host(&mut req);
            // The path is shared with the peer's request, not copied; the app's own address
            // is formatted once per proxy.
            let path = req
                .uri()
                .path_and_query()
                .cloned()
                .unwrap_or_else(|| PathAndQuery::from_static("/"));
            let authority = match &self.app_authority {
                Some(authority) if app == self.app => Ok(authority.clone()),
                _ => Authority::try_from(app.to_string()).map_err(http::Error::from),
            };
            let uri = match authority.and_then(|authority| {
                Uri::builder()
                    .scheme(Scheme::HTTP)
                    .authority(authority)
                    .path_and_query(path)
                    .build()
            }) {
                Ok(uri) => uri,
                Err(e) => {
                    return error(StatusCode::BAD_REQUEST, &format!("bad request target: {e}"));
                }
            };
            *req.uri_mut() = uri;
            let req = req.map(|body| body.map_err(Into::into).boxed());
            let sent = if h2 {
                self.h2_client.send(app, req).await
            } else {
                let mut req = req;
                *req.version_mut() = http::Version::HTTP_11;
                self.client.send(app, req).await
            };
            sent.map(|rsp| rsp.map(BodyExt::boxed))
                .map_err(|e| mesh_core::error::chain(&e))
        };
        let result = result.map(|mut rsp| {
            if let Some(downstream) = downstream
                && let Some(labels) = tunnel_labels
                && tunnel::switched(connect, &rsp)
            {
                tunnel::splice(downstream, &mut rsp, &self.metrics, labels);
            }
            rsp
        });
        match result {
            Ok(rsp) => {
                let status = rsp.status().as_u16();
                series.record(&self.metrics, Some(status), false, start.elapsed());
                if let Some(mut event) = tap.take() {
                    let error = if status >= 500 { "upstream" } else { "" };
                    event.finish(status, error, start.elapsed());
                    self.metrics.tap.publish(*event);
                }
                if let Some(span) = span.take() {
                    let error = if status >= 500 { "upstream" } else { "" };
                    self.metrics.trace.end(span, Some(status), error);
                }
                rsp
            }
            Err(e) => {
                let status = StatusCode::BAD_GATEWAY;
                series.record(&self.metrics, Some(status.as_u16()), true, start.elapsed());
                if let Some(mut event) = tap.take() {
                    event.finish(status.as_u16(), "mesh", start.elapsed());
                    self.metrics.tap.publish(*event);
                }
                if let Some(span) = span.take() {
                    self.metrics.trace.end(span, None, "mesh");
                }
                error(status, &format!("app at {app}: {e}"))
            }
        }
    }

    /// The request's server span, with its context written into the headers the app gets, so
    /// the app's own spans are its children; `None` when the request is not sampled.
    fn server_span(
        &self,
        req: &mut Request<Incoming>,
        labels: &RequestLabels,
        peer: std::net::IpAddr,
    ) -> Option<Span> {
        let decision = self.metrics.trace.decide(req.headers())?;
        let name = format!("{} {}", req.method(), labels.route);
        let method = req.method().to_string();
        let path = req.uri().path().to_string();
        let identity = req
            .extensions()
            .get::<ClientIdentity>()
            .map(|ClientIdentity(id)| id.clone());
        let mut span =
            self.metrics
                .trace
                .span(&decision, SpanKind::Server, name, req.headers_mut())?;
        span.set("http.request.method", method);
        span.set("url.path", path);
        span.set("server.address", labels.authority.to_string());
        span.set("client.address", peer.to_string());
        span.set(attr::DIRECTION, "inbound");
        span.set(attr::ROUTE, labels.route.to_string());
        span.set(attr::TLS, identity.is_some());
        if let Some(id) = identity {
            span.set(attr::PEER_IDENTITY, id);
        }
        Some(span)
    }

    /// A `CONNECT` for the app: from a peer proxy carrying its app's `CONNECT`
    /// ([`TUNNEL_HEADER`]), answered here with a connection to the app; from anyone else,
    /// handed to the app as it came (the app is the proxy it was meant for) on a connection of
    /// its own, which the app's 2xx turns into the tunnel.
    async fn connect(
        &self,
        app: SocketAddr,
        req: Request<Incoming>,
        to_app: bool,
    ) -> Result<Response<Body>, String> {
        let connect = tokio::net::TcpStream::connect(app);
        let tcp = match tokio::time::timeout(CONNECT_TIMEOUT, connect).await {
            Ok(Ok(tcp)) => tcp,
            Ok(Err(e)) => return Err(e.to_string()),
            Err(_) => return Err("connecting timed out".to_string()),
        };
        let _ = tcp.set_nodelay(true);
        if to_app {
            return Ok(crate::tunnel::connected(tcp));
        }
        let io: crate::pool::BoxIo = Box::new(hyper_util::rt::TokioIo::new(tcp));
        crate::http::send_http1(io, req.map(|body| body.map_err(Into::into).boxed()))
            .await
            .map(|rsp| rsp.map(BodyExt::boxed))
            .map_err(|e| mesh_core::error::chain(&e))
    }
}
