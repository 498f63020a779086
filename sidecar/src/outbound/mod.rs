//! The outbound listener: every connection and request the local app sends to another service.
//! What each connection is (redirected or not, to a meshed service or not, HTTP or opaque) is
//! decided first, in [`connection`]. HTTP/1.1 (origin-form with Host, and absolute-form so apps
//! can use `HTTP_PROXY`) and HTTP/2 with prior knowledge are routed: the listener works out each
//! request's [`Target`], waits (briefly) for discovery to answer for it, and hands it to a
//! stack of `tower` layers built once per proxy:
//!
//! ```text
//! route      authority -> route table -> first matching rule (404 when none)     route.rs
//! filters    header modifiers, fault delays and aborts                            filters.rs
//! timeout    the rule's request timeout, over all attempts (504)                  timeout.rs
//! retry      the rule's retry policy under the route's retry budget              retry.rs
//!   mirror   RequestMirror copies of a first attempt, fire and forget           mirror.rs
//!   split    weighted backend pick, per attempt (503 when none can answer)      split.rs
//!   balance  endpoint pick: P2C over peak-EWMA, failure accrual                  balance.rs
//!   metrics  golden metrics per attempt, by route and backend                    metrics.rs
//!   client   origin-form to the endpoint: mTLS + HTTP/2 to peers, else HTTP/1.1  client.rs
//! ```
//!
//! Each layer's module says why it sits where it does. Layers pass typed requests down
//! ([`route::Targeted`] -> [`route::Routed`] -> [`split::ToBackend`] ->
//! [`balance::ToEndpoint`]), so the stack's order is checked by the compiler, and answer with
//! a typed [`Error`] that only the listener turns into a response; each is tested with
//! `oneshot` against a stub inner service, without a socket.

pub mod balance;
pub mod client;
pub mod connection;
pub mod error;
pub mod filters;
pub mod metrics;
pub mod mirror;
pub mod retry;
pub mod route;
pub mod split;
pub mod target;
pub mod timeout;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::Duration;

use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use mesh_core::proxy_api::ServiceRef;
use tower::{Layer, ServiceBuilder, ServiceExt};

use crate::balance::{BalanceConfig, Balancer};
use crate::discovery::Discovery;
use crate::http::{Body, CONNECT_TIMEOUT};
use crate::identity::SharedCredentials;
use crate::metrics::{Metrics, TcpLabels};
use crate::tables::{SharedTables, Tables};
use crate::tunnel;

use self::balance::BalanceLayer;
use self::client::{Client, MtlsClients, PlainClient};
use self::error::Error;
use self::filters::FiltersLayer;
use self::metrics::MetricsLayer;
use self::mirror::MirrorLayer;
use self::retry::{Budgets, RetryLayer};
use self::route::{RouteLayer, Targeted};
use self::split::SplitLayer;
use self::target::Target;
use self::timeout::TimeoutLayer;

/// How long a request to a new authority waits for discovery before it is answered from what
/// is known (a 404 or 503 naming the authority).
pub const DISCOVERY_WAIT: Duration = Duration::from_secs(2);

/// Tunables of the outbound path.
#[derive(Clone, Copy, Debug, Default)]
pub struct Settings {
    /// Connect timeout to endpoints; [`CONNECT_TIMEOUT`] when unset.
    pub connect_timeout: Option<Duration>,
    /// Endpoint selection and failure accrual.
    pub balance: BalanceConfig,
}

/// The stack every outbound request goes through, top to bottom, over the client `C`.
type Stack<C> = route::RouteService<
    filters::Filters<
        timeout::Timeout<
            retry::Retry<mirror::Mirror<split::Split<balance::Balance<metrics::Record<C>>>>>,
        >,
    >,
>;

/// The pooled clients at the bottom of the proxy's stack.
type Clients = Client<PlainClient, MtlsClients>;

/// The bottom of the stack alone (metrics over the clients): requests passed through to an
/// address outside the mesh go here directly.
type Bottom = metrics::Record<Clients>;

/// The outbound proxy.
#[derive(Debug)]
pub struct Outbound {
    tables: SharedTables,
    discovery: Option<Discovery>,
    metrics: Metrics,
    connect_timeout: Duration,
    // What the layers learn across requests; pruned as the tables change.
    balancer: Arc<Balancer>,
    budgets: Arc<Budgets>,
    mtls: Option<MtlsClients>,
    credentials: Option<SharedCredentials>,
    stack: Stack<Clients>,
    bottom: Bottom,
    /// See [`Outbound::with_transparency`].
    detect_timeout: Duration,
    opaque_ports: crate::opaque::Ports,
    /// What each connection may hold, and how many may be open at once.
    limits: crate::limits::Limits,
    /// The tables that per-endpoint and per-route state was last pruned against.
    pruned: Mutex<Weak<Tables>>,
}

impl Outbound {
    /// A proxy routing by `tables` and recording into `metrics`, with default settings.
    pub fn new(tables: SharedTables, metrics: Metrics, discovery: Option<Discovery>) -> Self {
        Self::with_settings(tables, metrics, discovery, Settings::default())
    }

    /// A proxy routing by `tables` and recording into `metrics`.
    pub fn with_settings(
        tables: SharedTables,
        metrics: Metrics,
        discovery: Option<Discovery>,
        settings: Settings,
    ) -> Self {
        let balancer = Arc::new(Balancer::new(settings.balance));
        let budgets = Arc::new(Budgets::default());
        let connect_timeout = settings.connect_timeout.unwrap_or(CONNECT_TIMEOUT);
        let client = Client::new(PlainClient::new(connect_timeout), None);
        let bottom = MetricsLayer::new(metrics.clone()).layer(client.clone());
        let stack = stack(&tables, &metrics, &balancer, &budgets, client);
        Self {
            tables,
            discovery,
            metrics,
            connect_timeout,
            balancer,
            budgets,
            mtls: None,
            credentials: None,
            stack,
            bottom,
            detect_timeout: crate::opaque::DEFAULT_DETECT_TIMEOUT,
            opaque_ports: crate::opaque::Ports::default(),
            limits: crate::limits::Limits::default(),
            pruned: Mutex::default(),
        }
    }

    /// What each connection may hold, and how many may be open at once.
    pub fn with_limits(mut self, limits: crate::limits::Limits) -> Self {
        self.limits = limits;
        self
    }

    /// How redirected connections are told apart: a client silent for `detect_timeout` is
    /// taken for a server-first protocol, and connections to `opaque_ports` are never sniffed.
    pub fn with_transparency(
        mut self,
        detect_timeout: Duration,
        opaque_ports: crate::opaque::Ports,
    ) -> Self {
        self.detect_timeout = detect_timeout;
        self.opaque_ports = opaque_ports;
        self
    }

    /// Reaches meshed endpoints over mTLS with the certificate in `credentials`.
    pub fn with_identity(mut self, credentials: SharedCredentials) -> Self {
        let mtls = MtlsClients::new(credentials.clone(), self.connect_timeout);
        let client = Client::new(PlainClient::new(self.connect_timeout), Some(mtls.clone()));
        self.bottom = MetricsLayer::new(self.metrics.clone()).layer(client.clone());
        self.credentials = Some(credentials);
        self.stack = stack(
            &self.tables,
            &self.metrics,
            &self.balancer,
            &self.budgets,
            client,
        );
        self.mtls = Some(mtls);
        self
    }

    /// Routes and forwards one request, by its authority. An `Upgrade` or `CONNECT` whose answer
    /// switches protocols becomes a tunnel to where the stack sent it (see [`crate::tunnel`]);
    /// a `CONNECT` to a host:port that is no known service is tunnelled straight there.
    pub async fn handle(&self, mut request: Request<Incoming>) -> Response<Body> {
        let connect = request.method() == Method::CONNECT;
        if connect && let Some(why) = tunnel::bad_connect_target(&request) {
            return crate::http::error(StatusCode::BAD_REQUEST, &why);
        }
        // Taken before the request goes down the stack, which keeps none of its extensions.
        let downstream = tunnel::is_upgrade(&request).then(|| hyper::upgrade::on(&mut request));
        let target = match Target::from_request(&request) {
            Ok(target) => target,
            Err(_) if connect => return self.passthrough(request, downstream).await,
            Err(e) => return e.into_response(),
        };
        let tables = self.discover(target.service()).await;
        if connect
            && !tables.routes.contains_key(target.service())
            && !tables.available(target.service())
        {
            return self.passthrough(request, downstream).await;
        }
        self.forward(target, tables, request, downstream).await
    }

    /// Routes and forwards one request to `target` (a redirected connection's destination),
    /// tunnelling it when it upgrades.
    async fn handle_target(
        &self,
        target: Target,
        mut request: Request<Incoming>,
    ) -> Response<Body> {
        let downstream = tunnel::is_upgrade(&request).then(|| hyper::upgrade::on(&mut request));
        let tables = self.discover(target.service()).await;
        self.forward(target, tables, request, downstream).await
    }

    /// Sends `request` down the stack; joins the caller to the far side when the answer
    /// switches protocols.
    async fn forward(
        &self,
        target: Target,
        tables: Arc<Tables>,
        request: Request<Incoming>,
        downstream: Option<hyper::upgrade::OnUpgrade>,
    ) -> Response<Body> {
        self.prune(&tables);
        let connect = request.method() == Method::CONNECT;
        // Built only for a request that may become a tunnel; most never do.
        let labels = downstream.as_ref().map(|_| {
            let service = target.service();
            TcpLabels {
                direction: "outbound",
                authority: service.authority(),
                dst_service: service.name.to_string(),
                dst_namespace: service.namespace.to_string(),
                tls: "",
            }
        });
        // Decided once per request, so every attempt (and retry) is a span of the same trace.
        let mut request = request;
        if let Some(decision) = self.metrics.trace.decide(request.headers()) {
            request.extensions_mut().insert(decision);
        }
        let req = Targeted {
            target,
            tables,
            request,
        };
        let mut rsp = self
            .stack
            .clone()
            .oneshot(req)
            .await
            .unwrap_or_else(Error::into_response);
        if let Some(downstream) = downstream
            && let Some(labels) = labels
            && tunnel::switched(connect, &rsp)
        {
            tunnel::splice(downstream, &mut rsp, &self.metrics, labels);
        }
        rsp
    }

    /// Tunnels a `CONNECT` to the host:port it names, which is not a service the mesh knows.
    async fn passthrough(
        &self,
        request: Request<Incoming>,
        downstream: Option<hyper::upgrade::OnUpgrade>,
    ) -> Response<Body> {
        let authority = request
            .uri()
            .authority()
            .map_or_else(String::new, ToString::to_string);
        let connect = tokio::net::TcpStream::connect(authority.as_str());
        let tcp = match tokio::time::timeout(self.connect_timeout, connect).await {
            Ok(Ok(tcp)) => tcp,
            Ok(Err(e)) => {
                let why = format!("CONNECT to {authority}: {e}");
                return crate::http::error(StatusCode::BAD_GATEWAY, &why);
            }
            Err(_) => {
                let why = format!("CONNECT to {authority}: timed out");
                return crate::http::error(StatusCode::GATEWAY_TIMEOUT, &why);
            }
        };
        let _ = tcp.set_nodelay(true);
        let mut rsp = tunnel::connected(tcp);
        if let Some(downstream) = downstream {
            let labels = TcpLabels {
                direction: "outbound",
                authority,
                ..TcpLabels::default()
            };
            tunnel::splice(downstream, &mut rsp, &self.metrics, labels);
        }
        rsp
    }

    /// The tables, after making sure discovery watches `service`: the first request to an
    /// authority starts its watches and waits (briefly) for their first answer.
    async fn discover(&self, service: &ServiceRef) -> Arc<Tables> {
        let current = self.tables.borrow().clone();
        let Some(discovery) = &self.discovery else {
            return current;
        };
        if current.resolved(service) {
            return current;
        }
        discovery.watch_authority(service);
        let mut rx = self.tables.clone();
        let wait = rx.wait_for(|t| t.resolved(service));
        match tokio::time::timeout(DISCOVERY_WAIT, wait).await {
            Ok(Ok(t)) => t.clone(),
            _ => self.tables.borrow().clone(),
        }
    }

    /// Forgets endpoint, client and budget state that the tables no longer mention, once per
    /// tables update, so the state stays as large as the tables.
    fn prune(&self, tables: &Arc<Tables>) {
        {
            let mut pruned = self.pruned.lock().unwrap_or_else(PoisonError::into_inner);
            if std::ptr::eq(pruned.as_ptr(), Arc::as_ptr(tables)) {
                return;
            }
            *pruned = Arc::downgrade(tables);
        }
        let addrs: BTreeSet<SocketAddr> = tables
            .endpoints
            .values()
            .flatten()
            .map(|e| e.addr)
            .collect();
        self.balancer.retain(|a| addrs.contains(a));
        if let Some(mtls) = &self.mtls {
            let identities: BTreeSet<&str> = tables
                .endpoints
                .values()
                .flatten()
                .filter_map(|e| e.identity.as_deref())
                .collect();
            mtls.retain(&identities);
        }
        let services: BTreeSet<&ServiceRef> = tables
            .routes
            .keys()
            .chain(tables.endpoints.keys())
            .collect();
        self.budgets.retain(&services);
    }
}

/// Assembles the stack over `client`, once per proxy; requests carry what differs per route
/// and backend.
fn stack<C>(
    tables: &SharedTables,
    metrics: &Metrics,
    balancer: &Arc<Balancer>,
    budgets: &Arc<Budgets>,
    client: C,
) -> Stack<C> {
    ServiceBuilder::new()
        .layer(RouteLayer)
        .layer(FiltersLayer)
        .layer(TimeoutLayer)
        .layer(RetryLayer::new(
            tables.clone(),
            budgets.clone(),
            metrics.clone(),
        ))
        .layer(MirrorLayer::new(metrics.clone()))
        .layer(SplitLayer::new(balancer.clone()))
        .layer(BalanceLayer::new(balancer.clone()))
        .layer(MetricsLayer::new(metrics.clone()))
        .service(client)
}

/// The layers together, over a stub client: what their order means.
#[cfg(test)]
mod tests {
    use super::*;
    use crate::balance::FailureAccrual;
    use crate::outbound::balance::ToEndpoint;
    use crate::outbound::error::AttemptError;
    use crate::outbound::route::mk;
    use crate::retry::ReplayBody;
    use bytes::Bytes;
    use http_body_util::Full;
    use prometheus_client::registry::Registry;

    const TABLES: &str = r#"
routes:
  - parent: web.default:80
    rules:
      - name: fault
        matches: [{path: {type: PathPrefix, value: /fault}}]
        filters: [{type: fault, abort: {status: 418, percent: 100}}]
        backends: [{service: web-primary.default:80, weight: 1}]
      - name: slow
        matches: [{path: {type: PathPrefix, value: /slow}}]
        timeoutMs: 100
        retry: {statuses: [504], maxRetries: 2}
        backends: [{service: web-primary.default:80, weight: 1}]
      - name: mirror
        matches: [{path: {type: PathPrefix, value: /mirror}}]
        filters: [{type: requestMirror, backend: web-shadow.default:80}]
        backends: [{service: web-canary.default:80, weight: 1}]
      - name: main
        matches: [{path: {type: PathPrefix, value: /}}]
        retry: {statuses: [503], maxRetries: 1}
        backends:
          - {service: web-primary.default:80, weight: 1}
          - {service: web-canary.default:80, weight: 1}
endpoints:
  - service: web-primary.default:80
    endpoints: [{addr: "127.0.0.1:9001"}]
  - service: web-canary.default:80
    endpoints: [{addr: "127.0.0.1:9002"}]
  - service: web-shadow.default:80
    endpoints: [{addr: "127.0.0.1:9003"}]
"#;

    type Attempt = ToEndpoint<ReplayBody<Full<Bytes>>>;

    /// The client at the bottom: the primary's endpoint refuses connections, the canary's
    /// answers 200, `/slow` and the shadow (a mirror) hang. Counts the attempts, and records
    /// the bodies the canary and the shadow read.
    fn client(
        attempts: &Arc<Mutex<Vec<String>>>,
        bodies: &Arc<Mutex<Vec<String>>>,
    ) -> tower::util::BoxCloneService<Attempt, Response<Body>, Error> {
        let (attempts, bodies) = (attempts.clone(), bodies.clone());
        tower::util::BoxCloneService::new(tower::service_fn(move |req: Attempt| {
            attempts.lock().unwrap().push(req.backend.name.to_string());
            let bodies = bodies.clone();
            async move {
                let name = req.backend.name.clone();
                let (parts, body) = req.request.into_parts();
                let req = ToEndpoint {
                    route: req.route,
                    backend: req.backend,
                    endpoint: req.endpoint,
                    request: Request::from_parts(parts, ()),
                };
                if name != "web-primary" {
                    let body = http_body_util::BodyExt::collect(body)
                        .await
                        .unwrap()
                        .to_bytes();
                    if !body.is_empty() {
                        let body = String::from_utf8_lossy(&body);
                        bodies.lock().unwrap().push(format!("{name}: {body}"));
                    }
                }
                if req.request.uri().path() == "/slow" || req.backend.name == "web-shadow" {
                    tokio::time::sleep(Duration::from_secs(600)).await;
                }
                if req.backend.name == "web-primary" {
                    return Err(Error::Endpoint {
                        backend: req.backend,
                        addr: req.endpoint.addr,
                        error: AttemptError::Client {
                            connect: true,
                            error: "connection refused".into(),
                        },
                    });
                }
                Ok(mk::response(200))
            }
        }))
    }

    struct Setup {
        stack: Stack<tower::util::BoxCloneService<Attempt, Response<Body>, Error>>,
        attempts: Arc<Mutex<Vec<String>>>,
        bodies: Arc<Mutex<Vec<String>>>,
        registry: Registry,
        tables: Arc<Tables>,
    }

    fn setup() -> Setup {
        let mut registry = Registry::default();
        let metrics = Metrics::register(&mut registry);
        let tables = mk::tables(TABLES);
        let (_, rx) = tokio::sync::watch::channel(tables.clone());
        // One failure takes an endpoint out.
        let balancer = Arc::new(Balancer::new(BalanceConfig {
            accrual: FailureAccrual {
                consecutive_failures: 1,
                ..FailureAccrual::default()
            },
            ..BalanceConfig::default()
        }));
        let (attempts, bodies) = (Arc::default(), Arc::default());
        let stack = stack(
            &rx,
            &metrics,
            &balancer,
            &Arc::default(),
            client(&attempts, &bodies),
        );
        Setup {
            stack,
            attempts,
            bodies,
            registry,
            tables,
        }
    }

    impl Setup {
        async fn get(&self, path: &str) -> u16 {
            let request = Request::get(format!("http://web.default:80{path}"))
                .body(Full::new(Bytes::new()))
                .unwrap();
            let req = Targeted {
                target: Target::from_request(&request).unwrap(),
                tables: self.tables.clone(),
                request,
            };
            match self.stack.clone().oneshot(req).await {
                Ok(rsp) => rsp.status().as_u16(),
                Err(e) => e.status().as_u16(),
            }
        }

        fn attempts(&self) -> Vec<String> {
            std::mem::take(&mut *self.attempts.lock().unwrap())
        }

        /// The `response_total` series in the metrics text.
        fn responses(&self) -> Vec<String> {
            let mut text = String::new();
            prometheus_client::encoding::text::encode(&mut text, &self.registry).unwrap();
            text.lines()
                .filter(|l| l.starts_with("response_total{"))
                .map(str::to_string)
                .collect()
        }
    }

    #[tokio::test]
    async fn a_connect_failure_is_retried_on_the_backend_that_can_answer() {
        let s = setup();
        for _ in 0..20 {
            assert_eq!(s.get("/").await, 200);
        }
        let attempts = s.attempts();
        // The primary's endpoint failed once and was taken out; every later pick avoids it.
        let to_primary = attempts.iter().filter(|b| *b == "web-primary").count();
        assert!(to_primary <= 1, "{attempts:?}");
        assert_eq!(attempts.len(), 20 + to_primary);
    }

    #[tokio::test(start_paused = true)]
    async fn a_timed_out_request_is_not_retried_and_counts_as_a_504_for_its_backend() {
        let s = setup();
        // `/slow` hangs at the primary, the rule's only backend.
        assert_eq!(s.get("/slow").await, 504);
        assert_eq!(
            s.attempts(),
            ["web-primary"],
            "the timeout bounds the retries"
        );
        let responses = s.responses();
        assert_eq!(responses.len(), 1, "{responses:?}");
        assert!(responses[0].contains(r#"route="slow""#), "{responses:?}");
        assert!(
            responses[0].contains(r#"dst_service="web-primary""#),
            "{responses:?}"
        );
        assert!(
            responses[0].contains(r#"status_code="504""#),
            "{responses:?}"
        );
    }

    #[tokio::test]
    async fn a_mirror_gets_a_copy_that_never_holds_up_the_original() {
        let s = setup();
        // The shadow never answers; the original is answered by the canary all the same.
        assert_eq!(s.get("/mirror").await, 200);
        for _ in 0..100 {
            if s.attempts.lock().unwrap().len() == 2 {
                break;
            }
            tokio::task::yield_now().await;
        }
        let mut attempts = s.attempts();
        attempts.sort();
        assert_eq!(attempts, ["web-canary", "web-shadow"]);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &s.registry).unwrap();
        assert!(
            text.contains(
                r#"outbound_http_route_mirror_requests_total{authority="web.default:80",route="mirror"} 1"#
            ),
            "{text}"
        );
    }

    #[tokio::test]
    async fn a_request_with_a_body_is_mirrored_with_its_body() {
        let s = setup();
        let request = Request::post("http://web.default:80/mirror")
            .body(Full::new(Bytes::from_static(b"payload")))
            .unwrap();
        let req = Targeted {
            target: Target::from_request(&request).unwrap(),
            tables: s.tables.clone(),
            request,
        };
        let rsp = s.stack.clone().oneshot(req).await.unwrap();
        assert_eq!(rsp.status(), 200);
        for _ in 0..100 {
            if s.bodies.lock().unwrap().len() == 2 {
                break;
            }
            tokio::task::yield_now().await;
        }
        let mut bodies = s.bodies.lock().unwrap().clone();
        bodies.sort();
        assert_eq!(bodies, ["web-canary: payload", "web-shadow: payload"]);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &s.registry).unwrap();
        assert!(
            text.contains(
                r#"outbound_http_route_mirror_requests_total{authority="web.default:80",route="mirror"} 1"#
            ),
            "{text}"
        );
        assert!(
            !text.contains(r#"outbound_http_route_mirror_skipped_total{authority="web.default:80",route="mirror"} 1"#),
            "{text}"
        );
    }

    #[tokio::test]
    async fn answers_the_proxy_makes_itself_are_not_attempts() {
        let s = setup();
        assert_eq!(s.get("/fault").await, 418);
        assert!(s.attempts().is_empty());
        assert!(s.responses().is_empty());
    }
}
