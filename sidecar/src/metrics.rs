//! Golden metrics with Linkerd's names and labels, so Flagger queries and dashboards written for
//! Linkerd work unchanged, plus `route` and `dst_service` labels the canary judge reads. Every
//! label value is bounded: directions and classifications are fixed words, authorities and
//! services come from the route tables (not from arbitrary Host headers, which are folded into
//! `unknown`), and status codes are at most a few hundred.

use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// Linkerd's latency buckets, in milliseconds.
pub const LATENCY_BUCKETS_MS: [f64; 25] = [
    1.0, 2.0, 3.0, 4.0, 5.0, 10.0, 20.0, 30.0, 40.0, 50.0, 100.0, 200.0, 300.0, 400.0, 500.0,
    1000.0, 2000.0, 3000.0, 4000.0, 5000.0, 10000.0, 20000.0, 30000.0, 40000.0, 50000.0,
];

/// Labels of a request.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// `outbound` or `inbound`.
    pub direction: &'static str,
    /// The authority the request was routed by.
    pub authority: String,
    /// Route (HTTPRoute rule) name.
    pub route: String,
    /// Backend service.
    pub dst_service: String,
    /// Backend namespace.
    pub dst_namespace: String,
}

/// Labels of an opaque TCP connection.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TcpLabels {
    /// `inbound` (opaque TCP is forwarded on the inbound side only).
    pub direction: &'static str,
}

/// Labels of a response: the request's plus status and classification.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResponseLabels {
    /// `outbound` or `inbound`.
    pub direction: &'static str,
    /// The authority the request was routed by.
    pub authority: String,
    /// Route (HTTPRoute rule) name.
    pub route: String,
    /// Backend service.
    pub dst_service: String,
    /// Backend namespace.
    pub dst_namespace: String,
    /// HTTP status code; empty when no response was received.
    pub status_code: String,
    /// `success`, or `failure` for 5xx and proxy errors.
    pub classification: &'static str,
    /// Where a failure came from: `upstream` (the app answered 5xx), `mesh` (the proxy could not
    /// reach or timed out on the backend), or empty for successes.
    pub error: &'static str,
}

/// Labels of authorization decisions: what decided the policy (`Server/<name>` or
/// `default:<policy>`) and, for an admitted client, the authorization that admitted it. Both
/// are resource names from the control plane, never values a client sends.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AuthzLabels {
    /// `Server/<name>` or `default:<policy>`.
    pub server: String,
    /// `AuthorizationPolicy/<name>` or `default:<policy>`; empty on a denial.
    pub authorization: String,
}

/// Labels of per-route series: the authority and the HTTPRoute rule.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabels {
    /// The authority the request was routed by.
    pub authority: String,
    /// Route (HTTPRoute rule) name.
    pub route: String,
}

/// The proxy's metric families.
#[derive(Clone, Debug)]
pub struct Metrics {
    /// `request_total`.
    pub requests: Family<RequestLabels, Counter>,
    /// `response_total`.
    pub responses: Family<ResponseLabels, Counter>,
    /// `response_latency_ms`.
    pub latency: Family<ResponseLabels, Histogram>,
    /// `outbound_http_route_retry_requests_total`: retries sent.
    pub retry_requests: Family<RouteLabels, Counter>,
    /// `outbound_http_route_retry_successes_total`: requests that succeeded after a retry.
    pub retry_successes: Family<RouteLabels, Counter>,
    /// `outbound_http_route_retry_limit_exceeded_total`: requests that still failed in a
    /// retryable way after their last allowed retry.
    pub retry_limit_exceeded: Family<RouteLabels, Counter>,
    /// `outbound_http_route_retry_overflow_total`: retries not sent because the budget was spent.
    pub retry_overflow: Family<RouteLabels, Counter>,
    /// Opaque TCP connections opened (`tcp_open_total`).
    pub tcp_open: Family<TcpLabels, Counter>,
    /// Opaque TCP connections closed (`tcp_close_total`).
    pub tcp_close: Family<TcpLabels, Counter>,
    /// Bytes read from the peer on opaque TCP connections (`tcp_read_bytes_total`).
    pub tcp_read_bytes: Family<TcpLabels, Counter>,
    /// Bytes written to the peer on opaque TCP connections (`tcp_write_bytes_total`).
    pub tcp_write_bytes: Family<TcpLabels, Counter>,
    /// Opaque TCP connections open now.
    pub tcp_open_connections: Family<TcpLabels, Gauge>,
    /// Inbound HTTP requests an authorization admitted.
    pub http_authz_allow: Family<AuthzLabels, Counter>,
    /// Inbound HTTP requests refused by policy (403).
    pub http_authz_deny: Family<AuthzLabels, Counter>,
    /// Inbound opaque TCP connections refused by policy (closed).
    pub tcp_authz_deny: Family<AuthzLabels, Counter>,
}

impl Metrics {
    /// Creates the families and registers them.
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self {
            requests: Family::default(),
            responses: Family::default(),
            latency: Family::new_with_constructor(|| {
                Histogram::new(LATENCY_BUCKETS_MS.iter().copied())
            }),
            retry_requests: Family::default(),
            retry_successes: Family::default(),
            retry_limit_exceeded: Family::default(),
            retry_overflow: Family::default(),
            tcp_open: Family::default(),
            tcp_close: Family::default(),
            tcp_read_bytes: Family::default(),
            tcp_write_bytes: Family::default(),
            tcp_open_connections: Family::default(),
            http_authz_allow: Family::default(),
            http_authz_deny: Family::default(),
            tcp_authz_deny: Family::default(),
        };
        registry.register(
            "inbound_http_authz_allow",
            "Inbound HTTP requests admitted by an authorization",
            m.http_authz_allow.clone(),
        );
        registry.register(
            "inbound_http_authz_deny",
            "Inbound HTTP requests refused by the port's policy",
            m.http_authz_deny.clone(),
        );
        registry.register(
            "inbound_tcp_authz_deny",
            "Inbound opaque TCP connections refused by the port's policy",
            m.tcp_authz_deny.clone(),
        );
        registry.register(
            "tcp_open",
            "Opaque TCP connections opened",
            m.tcp_open.clone(),
        );
        registry.register(
            "tcp_close",
            "Opaque TCP connections closed",
            m.tcp_close.clone(),
        );
        registry.register(
            "tcp_read_bytes",
            "Bytes read from peers on opaque TCP connections",
            m.tcp_read_bytes.clone(),
        );
        registry.register(
            "tcp_write_bytes",
            "Bytes written to peers on opaque TCP connections",
            m.tcp_write_bytes.clone(),
        );
        registry.register(
            "tcp_open_connections",
            "Opaque TCP connections open now",
            m.tcp_open_connections.clone(),
        );
        registry.register("request", "Requests sent or received", m.requests.clone());
        registry.register(
            "response",
            "Responses sent or received",
            m.responses.clone(),
        );
        registry.register(
            "response_latency_ms",
            "Time from request to response headers, in milliseconds",
            m.latency.clone(),
        );
        registry.register(
            "outbound_http_route_retry_requests",
            "Retries sent, per route",
            m.retry_requests.clone(),
        );
        registry.register(
            "outbound_http_route_retry_successes",
            "Requests that succeeded after at least one retry, per route",
            m.retry_successes.clone(),
        );
        registry.register(
            "outbound_http_route_retry_limit_exceeded",
            "Requests that failed in a retryable way after their last allowed retry, per route",
            m.retry_limit_exceeded.clone(),
        );
        registry.register(
            "outbound_http_route_retry_overflow",
            "Retries not sent because the route's retry budget was spent",
            m.retry_overflow.clone(),
        );
        m
    }

    /// Records a finished request.
    pub fn record(
        &self,
        req: &RequestLabels,
        status: Option<u16>,
        mesh_error: bool,
        took: Duration,
    ) {
        let failure = mesh_error || status.is_none_or(|s| s >= 500);
        let labels = ResponseLabels {
            direction: req.direction,
            authority: req.authority.clone(),
            route: req.route.clone(),
            dst_service: req.dst_service.clone(),
            dst_namespace: req.dst_namespace.clone(),
            status_code: status.map(|s| s.to_string()).unwrap_or_default(),
            classification: if failure { "failure" } else { "success" },
            error: match (failure, mesh_error) {
                (false, _) => "",
                (true, true) => "mesh",
                (true, false) => "upstream",
            },
        };
        self.responses.get_or_create(&labels).inc();
        self.latency
            .get_or_create(&labels)
            .observe(took.as_secs_f64() * 1000.0);
    }
}
