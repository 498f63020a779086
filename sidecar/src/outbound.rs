//! The outbound listener: every request the local app sends to another service. It accepts
//! HTTP/1.1 (origin-form with Host, and absolute-form so apps can use `HTTP_PROXY`) and HTTP/2
//! with prior knowledge, then: authority -> route table -> first matching rule -> filters ->
//! weighted backend pick -> endpoint -> forward with a pooled client, under the rule's timeout.
//! Golden metrics are recorded per request with the rule and backend as labels.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{HOST, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode, Uri};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::{Client, connect::HttpConnector};
use hyper_util::rt::TokioExecutor;
use mesh_core::proxy_api::{RouteFilter, RouteRule, ServiceRef};
use mesh_core::routing::{RequestParts, pick_backend};
use tokio::net::TcpListener;

use crate::discovery::Discovery;
use crate::drain::{Body, Watch};
use crate::metrics::{Metrics, RequestLabels};
use crate::tables::{SharedTables, Tables, parse_authority};

/// Header on responses the proxy made itself, saying why (as Linkerd's `l5d-proxy-error`).
pub const PROXY_ERROR_HEADER: &str = "mesh-proxy-error";

/// Connect timeout to endpoints.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

/// The pooled HTTP/1.1 client the proxy forwards with, outbound to endpoints and inbound to the
/// local app.
pub(crate) fn client() -> Client<HttpConnector, Incoming> {
    let mut connector = HttpConnector::new();
    connector.set_connect_timeout(Some(CONNECT_TIMEOUT));
    connector.set_nodelay(true);
    Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(30))
        .build(connector)
}

/// The outbound proxy.
#[derive(Debug)]
pub struct Outbound {
    tables: SharedTables,
    discovery: Option<Discovery>,
    metrics: Metrics,
    client: Client<HttpConnector, Incoming>,
}

impl Outbound {
    /// A proxy routing by `tables` and recording into `metrics`.
    pub fn new(tables: SharedTables, metrics: Metrics, discovery: Option<Discovery>) -> Self {
        Self {
            tables,
            discovery,
            metrics,
            client: client(),
        }
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
        let start = Instant::now();
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

        let roll = fastrand::f64();
        let Some(pick) = pick_backend(
            &rule.backends,
            |i| tables.available(&rule.backends[i].service),
            roll,
        ) else {
            return error(
                StatusCode::SERVICE_UNAVAILABLE,
                &format!("no backend of {service} has ready endpoints"),
            );
        };
        let backend = rule.backends[pick].service.clone();
        let endpoints = tables.endpoints.get(&backend).cloned().unwrap_or_default();
        let Some(endpoint) = fastrand::choice(endpoints.iter()) else {
            return error(
                StatusCode::SERVICE_UNAVAILABLE,
                &format!("{backend} has no endpoints"),
            );
        };
        let labels = RequestLabels {
            direction: "outbound",
            authority: service.authority(),
            route: route_name,
            dst_service: backend.name.clone(),
            dst_namespace: backend.namespace.clone(),
        };
        self.metrics.requests.get_or_create(&labels).inc();

        // Origin-form towards the endpoint; Host keeps the name the app used.
        let path = req
            .uri()
            .path_and_query()
            .map_or("/", |p| p.as_str())
            .to_string();
        let uri = match Uri::builder()
            .scheme("http")
            .authority(endpoint.addr.to_string())
            .path_and_query(path)
            .build()
        {
            Ok(uri) => uri,
            Err(e) => return error(StatusCode::BAD_REQUEST, &format!("bad request target: {e}")),
        };
        if !req.headers().contains_key(HOST)
            && let Ok(v) = HeaderValue::from_str(&authority)
        {
            req.headers_mut().insert(HOST, v);
        }
        *req.uri_mut() = uri;
        *req.version_mut() = http::Version::HTTP_11;

        let timeout = rule.timeout_ms.map(Duration::from_millis);
        let call = self.client.request(req);
        let result = match timeout {
            Some(t) => match tokio::time::timeout(t, call).await {
                Ok(r) => r.map_err(|e| (StatusCode::BAD_GATEWAY, e.to_string())),
                Err(_) => Err((
                    StatusCode::GATEWAY_TIMEOUT,
                    format!("{backend} did not answer within {}ms", t.as_millis()),
                )),
            },
            None => call
                .await
                .map_err(|e| (StatusCode::BAD_GATEWAY, e.to_string())),
        };
        match result {
            Ok(rsp) => {
                self.metrics
                    .record(&labels, Some(rsp.status().as_u16()), false, start.elapsed());
                rsp.map(BodyExt::boxed)
            }
            Err((status, why)) => {
                self.metrics
                    .record(&labels, Some(status.as_u16()), true, start.elapsed());
                error(status, &format!("{backend} at {}: {why}", endpoint.addr))
            }
        }
    }
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
