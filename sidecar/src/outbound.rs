//! The outbound listener: every request the local app sends to another service. It accepts
//! HTTP/1.1 (origin-form with Host, and absolute-form so apps can use `HTTP_PROXY`) and HTTP/2
//! with prior knowledge, then: authority -> route table -> first matching rule -> filters ->
//! [under the rule's timeout: weighted backend pick -> endpoint pick (P2C over peak-EWMA, skipping
//! endpoints failure accrual took out) -> forward with a pooled client -> retry while the rule's
//! policy and retry budget allow]. Golden metrics are recorded per attempt with the rule and
//! backend as labels; retries are counted per route.
//!
//! An endpoint with an identity is a peer proxy: the request goes to it over mTLS (the peer must
//! present exactly that identity) as HTTP/2, on one pooled client per peer identity; an
//! HTTP/1.1 request is marked with the inbound's orig-proto header so the peer restores it.
//! Endpoints without an identity are not meshed and get plaintext HTTP/1.1.
//!
//! The timeout wraps the retries rather than each attempt because Gateway API's request timeout
//! bounds what the client waits for; the backend is picked again per attempt so a retry can land
//! on a healthy backend or endpoint.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{CONTENT_LENGTH, HOST, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode, Uri};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::{Client, connect::HttpConnector};
use hyper_util::rt::{TokioExecutor, TokioTimer};
use mesh_core::proxy_api::{RetryBudget, RouteFilter, RouteRule, ServiceRef};
use mesh_core::routing::{RequestParts, pick_backend};
use tokio::net::TcpListener;

use crate::balance::{BalanceConfig, Balancer, InFlight, Outcome};
use crate::discovery::Discovery;
use crate::drain::{Body, Watch};
use crate::identity::SharedCredentials;
use crate::inbound::{CLIENT_ID_HEADER, ORIG_PROTO_HEADER, ORIG_PROTO_HTTP1};
use crate::metrics::{Metrics, RequestLabels, RouteLabels};
use crate::retry::{Budget, ReplayBody, Replayable};
use crate::tables::{SharedTables, Tables, parse_authority};
use crate::tls::MtlsConnector;

/// Header on responses the proxy made itself, saying why (as Linkerd's `l5d-proxy-error`).
pub const PROXY_ERROR_HEADER: &str = "mesh-proxy-error";

/// Default connect timeout to endpoints and to the local app (Linkerd's).
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

/// How long an idle pooled connection is kept.
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(30);

/// A pooled HTTP/1.1 client, as the proxy forwards with: outbound to endpoints and inbound to
/// the local app. Connections are pooled per endpoint address and reused across requests; a
/// connection not made within `connect_timeout` fails the attempt as a connect error.
pub(crate) fn client<B>(connect_timeout: Duration) -> Client<HttpConnector, B>
where
    B: hyper::body::Body + Send,
    B::Data: Send,
{
    let mut connector = HttpConnector::new();
    connector.set_connect_timeout(Some(connect_timeout));
    connector.set_nodelay(true);
    Client::builder(TokioExecutor::new())
        .pool_idle_timeout(POOL_IDLE_TIMEOUT)
        // Without a timer the pool never evicts idle connections on its own.
        .pool_timer(TokioTimer::new())
        .build(connector)
}

/// A pooled HTTP/2 client with prior knowledge (h2c), for apps that were called over HTTP/2.
pub(crate) fn h2c_client<B>(connect_timeout: Duration) -> Client<HttpConnector, B>
where
    B: hyper::body::Body + Send + Unpin + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let mut connector = HttpConnector::new();
    connector.set_connect_timeout(Some(connect_timeout));
    connector.set_nodelay(true);
    Client::builder(TokioExecutor::new())
        .pool_idle_timeout(POOL_IDLE_TIMEOUT)
        .pool_timer(TokioTimer::new())
        .http2_only(true)
        .build(connector)
}

/// Pooled mTLS clients to peer proxies, one per peer identity (its TLS configuration checks
/// that identity), each pooling an HTTP/2 connection per endpoint.
#[derive(Debug)]
struct Mtls {
    credentials: SharedCredentials,
    connect_timeout: Duration,
    clients: Mutex<BTreeMap<String, Client<MtlsConnector, ReplayBody>>>,
}

impl Mtls {
    fn client(&self, identity: &str) -> Result<Client<MtlsConnector, ReplayBody>, rustls::Error> {
        let mut clients = lock(&self.clients);
        if let Some(c) = clients.get(identity) {
            return Ok(c.clone());
        }
        let config = crate::tls::client_config(&self.credentials, identity)?;
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(POOL_IDLE_TIMEOUT)
            .pool_timer(TokioTimer::new())
            .http2_only(true)
            .build(MtlsConnector::new(config, self.connect_timeout));
        clients.insert(identity.to_string(), client.clone());
        Ok(client)
    }

    /// Forgets clients of identities no endpoint has any more.
    fn retain(&self, identities: &BTreeSet<&str>) {
        lock(&self.clients).retain(|id, _| identities.contains(id.as_str()));
    }
}

impl std::fmt::Debug for MtlsConnector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MtlsConnector")
    }
}

/// Why an attempt got no response.
#[derive(Debug, thiserror::Error)]
enum AttemptError {
    /// The client failed (connecting, or the connection broke).
    #[error("{}", chain(.0))]
    Client(hyper_util::client::legacy::Error),
    /// The endpoint is meshed and this proxy has no identity to reach it with.
    #[error("{0}")]
    NoIdentity(String),
}

impl AttemptError {
    /// Whether nothing was sent (safe to retry).
    fn is_connect(&self) -> bool {
        match self {
            Self::Client(e) => e.is_connect(),
            Self::NoIdentity(_) => true,
        }
    }
}

/// Tunables of the outbound path.
#[derive(Clone, Copy, Debug, Default)]
pub struct Settings {
    /// Connect timeout to endpoints; [`CONNECT_TIMEOUT`] when unset.
    pub connect_timeout: Option<Duration>,
    /// Endpoint selection and failure accrual.
    pub balance: BalanceConfig,
}

/// A retry budget, per route.
type Budgets = BTreeMap<(ServiceRef, String), Arc<Mutex<Budget>>>;

/// The attempt in flight, so a route timeout can record it against its backend.
type Current = Mutex<Option<(RequestLabels, Instant)>>;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The outbound proxy.
#[derive(Debug)]
pub struct Outbound {
    tables: SharedTables,
    discovery: Option<Discovery>,
    metrics: Metrics,
    client: Client<HttpConnector, ReplayBody>,
    balancer: Balancer,
    budgets: Mutex<Budgets>,
    mtls: Option<Mtls>,
    connect_timeout: Duration,
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
        Self {
            tables,
            discovery,
            metrics,
            client: client(settings.connect_timeout.unwrap_or(CONNECT_TIMEOUT)),
            balancer: Balancer::new(settings.balance),
            budgets: Mutex::default(),
            mtls: None,
            connect_timeout: settings.connect_timeout.unwrap_or(CONNECT_TIMEOUT),
            pruned: Mutex::default(),
        }
    }

    /// Reaches meshed endpoints over mTLS with the certificate in `credentials`.
    pub fn with_identity(mut self, credentials: SharedCredentials) -> Self {
        self.mtls = Some(Mtls {
            credentials,
            connect_timeout: self.connect_timeout,
            clients: Mutex::default(),
        });
        self
    }

    /// Serves the outbound listener until `drain` fires and its requests in flight finish.
    pub async fn serve(
        self: Arc<Self>,
        listener: TcpListener,
        drain: Watch,
    ) -> std::io::Result<()> {
        crate::drain::serve(listener, "outbound", drain, move |req| {
            let this = self.clone();
            async move { this.handle(req).await }
        })
        .await
    }

    /// Routes and forwards one request.
    pub async fn handle(&self, mut req: Request<Incoming>) -> Response<Body> {
        let authority = req
            .uri()
            .authority()
            .map(|a| a.as_str().to_string())
            .or_else(|| {
                req.headers()
                    .get(HOST)
                    .and_then(|h| h.to_str().ok())
                    .map(str::to_string)
            });
        let Some(authority) = authority else {
            return error(StatusCode::BAD_REQUEST, "request has no Host or authority");
        };
        let Some(service) = parse_authority(&authority) else {
            return error(
                StatusCode::BAD_REQUEST,
                &format!("authority {authority:?} is not a service name"),
            );
        };
        let tables = self.discover(&service).await;
        self.prune(&tables);
        let Some((rule, route_name)) = select_rule(&tables, &service, &req) else {
            return error(
                StatusCode::NOT_FOUND,
                &format!(
                    "no route for {service} matches {} {}",
                    req.method(),
                    req.uri().path()
                ),
            );
        };

        // Filters: header modification, then fault injection.
        for filter in &rule.filters {
            match filter {
                RouteFilter::RequestHeaderModifier { set, add, remove } => {
                    modify_headers(req.headers_mut(), set, add, remove);
                }
                RouteFilter::Fault { abort, delay } => {
                    if let Some(d) = delay
                        .as_ref()
                        .filter(|d| fastrand::f64() * 100.0 < d.percent)
                    {
                        tokio::time::sleep(Duration::from_millis(d.delay_ms)).await;
                    }
                    if let Some(a) = abort
                        .as_ref()
                        .filter(|a| fastrand::f64() * 100.0 < a.percent)
                    {
                        let status = StatusCode::from_u16(a.status)
                            .unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
                        return error(status, "fault injected by route filter");
                    }
                }
            }
        }

        // Host keeps the name the app used; the URI is rewritten per attempt to the endpoint.
        if !req.headers().contains_key(HOST)
            && let Ok(v) = HeaderValue::from_str(&authority)
        {
            req.headers_mut().insert(HOST, v);
        }
        let route = Route {
            service: &service,
            rule: &rule,
            labels: RouteLabels {
                authority: service.authority(),
                route: route_name,
            },
        };
        // Gateway API's request timeout: it bounds the whole request, retries included, so a
        // request that timed out is never retried.
        let current = Current::default();
        let forward = self.forward(req, &route, tables, &current);
        let Some(timeout) = rule.timeout_ms.map(Duration::from_millis) else {
            return forward.await;
        };
        match tokio::time::timeout(timeout, forward).await {
            Ok(rsp) => rsp,
            Err(_) => {
                let attempt = lock(&current).take();
                let to = match &attempt {
                    Some((labels, started)) => {
                        self.metrics.record(
                            labels,
                            Some(StatusCode::GATEWAY_TIMEOUT.as_u16()),
                            true,
                            started.elapsed(),
                        );
                        format!("{}.{}", labels.dst_service, labels.dst_namespace)
                    }
                    None => service.to_string(),
                };
                error(
                    StatusCode::GATEWAY_TIMEOUT,
                    &format!(
                        "{to} did not answer within {}ms (route {})",
                        timeout.as_millis(),
                        route.labels.route
                    ),
                )
            }
        }
    }

    /// Sends the request to a backend endpoint, and again under the route's retry policy while
    /// the answer is retryable, the body can be replayed, and the budget allows.
    async fn forward(
        &self,
        req: Request<Incoming>,
        route: &Route<'_>,
        mut tables: Arc<Tables>,
        current: &Current,
    ) -> Response<Body> {
        let (parts, body) = req.into_parts();
        let policy = route.rule.retry.as_ref().filter(|p| p.max_retries > 0);
        let length = parts
            .headers
            .get(CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse().ok());
        // Only a route that retries pays for keeping a copy of the body.
        let replayable = Replayable::new(body, policy.is_some(), length);
        let budget = policy.map(|p| self.budget(route, &p.budget));
        if let Some(b) = &budget {
            lock(b).deposit(Instant::now());
        }
        let path = parts
            .uri
            .path_and_query()
            .map_or("/", |p| p.as_str())
            .to_string();

        let mut retries = 0;
        loop {
            // Retries are only sent after `can_replay`, so there is a body for each attempt.
            let Some(body) = replayable.attempt() else {
                return error(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "request body already sent",
                );
            };
            let started = Instant::now();
            let (backend, endpoint) = match self.pick(route, &tables, started) {
                Ok(picked) => picked,
                Err(why) => return error(StatusCode::SERVICE_UNAVAILABLE, &why.to_string()),
            };
            let addr = endpoint.addr();
            let peer = tables
                .endpoints
                .get(&backend)
                .and_then(|eps| eps.iter().find(|e| e.addr == addr))
                .and_then(|e| e.identity.clone());
            let labels = RequestLabels {
                direction: "outbound",
                authority: route.labels.authority.clone(),
                route: route.labels.route.clone(),
                dst_service: backend.name.clone(),
                dst_namespace: backend.namespace.clone(),
            };
            self.metrics.requests.get_or_create(&labels).inc();

            // Origin-form towards the endpoint.
            let uri = match Uri::builder()
                .scheme(if peer.is_some() { "https" } else { "http" })
                .authority(addr.to_string())
                .path_and_query(path.as_str())
                .build()
            {
                Ok(uri) => uri,
                Err(e) => {
                    return error(StatusCode::BAD_REQUEST, &format!("bad request target: {e}"));
                }
            };
            let mut attempt = Request::new(body);
            *attempt.method_mut() = parts.method.clone();
            *attempt.uri_mut() = uri;
            *attempt.version_mut() = http::Version::HTTP_11;
            *attempt.headers_mut() = parts.headers.clone();
            // Only the far side's inbound sets these, from what it verified and received.
            attempt.headers_mut().remove(CLIENT_ID_HEADER);
            attempt.headers_mut().remove(ORIG_PROTO_HEADER);

            *lock(current) = Some((labels.clone(), started));
            let result = match &peer {
                None => self
                    .client
                    .request(attempt)
                    .await
                    .map_err(AttemptError::Client),
                Some(identity) => match self.mtls.as_ref().map(|m| m.client(identity)) {
                    Some(Ok(client)) => {
                        if parts.version < http::Version::HTTP_2 {
                            attempt.headers_mut().insert(
                                ORIG_PROTO_HEADER,
                                HeaderValue::from_static(ORIG_PROTO_HTTP1),
                            );
                        }
                        *attempt.version_mut() = http::Version::HTTP_2;
                        client.request(attempt).await.map_err(AttemptError::Client)
                    }
                    Some(Err(e)) => Err(AttemptError::NoIdentity(format!(
                        "cannot build the TLS client for {identity}: {e}"
                    ))),
                    None => Err(AttemptError::NoIdentity(format!(
                        "the endpoint is meshed ({identity}) and this proxy has no identity \
                         (set MESH_PROXY_IDENTITY and MESH_PROXY_TOKEN_FILE)"
                    ))),
                },
            };
            lock(current).take();
            let done = Instant::now();
            let took = done.saturating_duration_since(started);

            // A retryable answer falls through to the retry decision below; anything else is
            // the answer.
            let answer = match result {
                Ok(rsp) => {
                    let status = rsp.status().as_u16();
                    let failed = rsp.status().is_server_error();
                    let outcome = if failed {
                        Outcome::Failure
                    } else {
                        Outcome::Success
                    };
                    endpoint.finish(outcome, done);
                    self.metrics.record(&labels, Some(status), false, took);
                    let rsp = rsp.map(BodyExt::boxed);
                    if !policy.is_some_and(|p| p.retries_status(status)) {
                        if retries > 0 && !failed {
                            self.metrics
                                .retry_successes
                                .get_or_create(&route.labels)
                                .inc();
                        }
                        return rsp;
                    }
                    rsp
                }
                Err(e) => {
                    // A connect error means nothing was sent, so retrying is always safe; after
                    // the request went out, the app may have acted on it.
                    let connect = e.is_connect();
                    let outcome = if connect {
                        Outcome::ConnectFailure
                    } else {
                        Outcome::Failure
                    };
                    endpoint.finish(outcome, done);
                    let status = StatusCode::BAD_GATEWAY;
                    self.metrics
                        .record(&labels, Some(status.as_u16()), true, took);
                    let rsp = error(status, &format!("{backend} at {addr}: {e}"));
                    if !connect || policy.is_none() {
                        return rsp;
                    }
                    rsp
                }
            };

            // The answer is retryable; is a retry allowed?
            let (Some(policy), Some(budget)) = (policy, &budget) else {
                return answer;
            };
            if !replayable.can_replay() {
                // Longer than can be kept: it cannot be sent again.
                return answer;
            }
            if retries >= policy.max_retries {
                self.metrics
                    .retry_limit_exceeded
                    .get_or_create(&route.labels)
                    .inc();
                return answer;
            }
            if !lock(budget).withdraw(Instant::now()) {
                self.metrics
                    .retry_overflow
                    .get_or_create(&route.labels)
                    .inc();
                return answer;
            }
            retries += 1;
            self.metrics
                .retry_requests
                .get_or_create(&route.labels)
                .inc();
            // A retry sees the newest tables: a weight change or a new endpoint may help it.
            tables = self.tables.borrow().clone();
        }
    }

    /// A backend by weight, then one of its endpoints by P2C. Backends whose endpoints are all
    /// failing count as having no ready endpoints, so they get weight 0 for this pick.
    fn pick(
        &self,
        route: &Route<'_>,
        tables: &Tables,
        now: Instant,
    ) -> Result<(ServiceRef, InFlight), Unavailable> {
        let addrs = |service: &ServiceRef| -> Vec<SocketAddr> {
            tables
                .endpoints
                .get(service)
                .map(|e| e.iter().map(|e| e.addr).collect())
                .unwrap_or_default()
        };
        let backends = &route.rule.backends;
        let picked = pick_backend(
            backends,
            |i| {
                let a = addrs(&backends[i].service);
                !a.is_empty() && self.balancer.any_ready(&a, now)
            },
            fastrand::f64(),
        );
        let endpoint = picked.and_then(|i| {
            let backend = backends[i].service.clone();
            self.balancer
                .pick(&addrs(&backend), now, |n| fastrand::usize(..n))
                .map(|e| (backend, e))
        });
        endpoint.ok_or_else(|| {
            let service = route.service.clone();
            if backends.iter().any(|b| tables.available(&b.service)) {
                Unavailable::AllFailing(service)
            } else {
                Unavailable::NoEndpoints(service)
            }
        })
    }

    /// The retry budget of a route, made on first use and remade when its settings change.
    fn budget(&self, route: &Route<'_>, config: &RetryBudget) -> Arc<Mutex<Budget>> {
        let mut budgets = lock(&self.budgets);
        let key = (route.service.clone(), route.labels.route.clone());
        if let Some(b) = budgets.get(&key)
            && lock(b).config() == config
        {
            return b.clone();
        }
        let b = Arc::new(Mutex::new(Budget::new(config.clone(), Instant::now())));
        budgets.insert(key, b.clone());
        b
    }

    /// Forgets endpoint and budget state that the tables no longer mention, once per tables
    /// update, so the state stays as large as the tables.
    fn prune(&self, tables: &Arc<Tables>) {
        {
            let mut pruned = lock(&self.pruned);
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
        lock(&self.budgets).retain(|(service, _), _| {
            tables.routes.contains_key(service) || tables.endpoints.contains_key(service)
        });
    }
}

/// Why no endpoint could be picked for a request: the proxy answers 503.
#[derive(Debug, thiserror::Error)]
enum Unavailable {
    /// Discovery knows no endpoints for any backend with weight.
    #[error("no backend of {0} has ready endpoints")]
    NoEndpoints(ServiceRef),
    /// There are endpoints, but failure accrual has taken all of them out for now.
    #[error("every endpoint of the backends of {0} is failing; they are probed with backoff")]
    AllFailing(ServiceRef),
}

/// The route a request took.
struct Route<'a> {
    service: &'a ServiceRef,
    rule: &'a RouteRule,
    labels: RouteLabels,
}

/// An error with its causes, for the proxy's error header and body.
fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

impl Outbound {
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
}

/// How long a request to a new authority waits for discovery before it is answered from what
/// is known (a 404 or 503 naming the authority).
pub const DISCOVERY_WAIT: Duration = Duration::from_secs(2);

/// The rule a request takes and its metrics name. A service with no route table gets one
/// catch-all rule to itself, as Linkerd does for unrouted services.
fn select_rule<B>(
    tables: &Tables,
    service: &ServiceRef,
    req: &Request<B>,
) -> Option<(RouteRule, String)> {
    let Some(routes) = tables.routes.get(service) else {
        return tables.available(service).then(|| {
            (
                RouteRule {
                    name: "default".into(),
                    backends: vec![mesh_core::proxy_api::WeightedBackend {
                        service: service.clone(),
                        weight: 1,
                    }],
                    ..Default::default()
                },
                "default".to_string(),
            )
        });
    };
    let headers = req.headers();
    let lookup = |name: &str| {
        headers
            .get_all(name)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .collect::<Vec<_>>()
    };
    let parts = RequestParts {
        method: req.method().as_str(),
        path: req.uri().path(),
        query: req.uri().query(),
        headers: &lookup,
    };
    routes.route(&parts).map(|(i, rule)| {
        let name = if rule.name.is_empty() {
            format!("rule-{i}")
        } else {
            rule.name.clone()
        };
        (rule.clone(), name)
    })
}

fn modify_headers(
    headers: &mut http::HeaderMap,
    set: &std::collections::BTreeMap<String, String>,
    add: &std::collections::BTreeMap<String, String>,
    remove: &[String],
) {
    let parse = |k: &str, v: &str| {
        Some((
            HeaderName::from_bytes(k.as_bytes()).ok()?,
            HeaderValue::from_str(v).ok()?,
        ))
    };
    for (k, v) in set {
        if let Some((k, v)) = parse(k, v) {
            headers.insert(k, v);
        }
    }
    for (k, v) in add {
        if let Some((k, v)) = parse(k, v) {
            headers.append(k, v);
        }
    }
    for k in remove {
        headers.remove(k.as_str());
    }
}

/// A response the proxy makes itself, with the reason in a header and the body.
pub(crate) fn error(status: StatusCode, why: &str) -> Response<Body> {
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
