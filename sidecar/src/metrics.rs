//! Golden metrics with Linkerd's names and labels, so Flagger queries and dashboards written for
//! Linkerd work unchanged, plus `route` and `dst_service` labels the canary judge reads. Every
//! label value is bounded: directions and classifications are fixed words, authorities and
//! services come from the route tables (not from arbitrary Host headers, which are folded into
//! `unknown`), and status codes are at most a few hundred.

use std::sync::Arc;
use std::time::Duration;

use mesh_core::metrics::{self as contract, Classification, ErrorSource, Family as Contract};
use prometheus_client::encoding::{EncodeLabel, EncodeLabelSet, LabelSetEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Metric, Registry};

pub use mesh_core::metrics::LATENCY_BUCKETS_MS;

/// Labels of a request. Values are shared strings: a label set built once (per proxy inbound,
/// per route and backend outbound) is cloned per request without allocating.
#[derive(Clone, Debug, Default, Hash, PartialEq, Eq)]
pub struct RequestLabels {
    /// `outbound` or `inbound` ([`mesh_core::metrics::Direction`]).
    pub direction: &'static str,
    /// The authority the request was routed by.
    pub authority: Arc<str>,
    /// Route (HTTPRoute rule) name.
    pub route: Arc<str>,
    /// Backend service.
    pub dst_service: Arc<str>,
    /// Backend namespace.
    pub dst_namespace: Arc<str>,
    /// The owner of the endpoint the request was sent to (outbound); empty inbound or unknown.
    pub dst_deployment: Arc<str>,
    /// `true` when the request crossed the mesh over mTLS, else empty.
    pub tls: &'static str,
}

impl EncodeLabelSet for RequestLabels {
    fn encode(&self, encoder: &mut LabelSetEncoder<'_>) -> Result<(), std::fmt::Error> {
        let values = [
            self.direction,
            &self.authority,
            &self.route,
            &self.dst_service,
            &self.dst_namespace,
            &self.dst_deployment,
            self.tls,
        ];
        encode_labels(&contract::REQUEST_LABELS, values, encoder)
    }
}

/// The `tls` label value: `true` over mTLS, else empty.
pub fn tls_label(mtls: bool) -> &'static str {
    if mtls { "true" } else { "" }
}

/// Labels of an opaque TCP connection.
#[derive(Clone, Debug, Default, Hash, PartialEq, Eq)]
pub struct TcpLabels {
    /// `outbound` or `inbound`.
    pub direction: &'static str,
    /// The destination: a service's authority, or `ip:port` outside the mesh. Inbound, the
    /// workload's own service.
    pub authority: String,
    /// The destination service; empty outside the mesh.
    pub dst_service: String,
    /// The destination service's namespace; empty outside the mesh.
    pub dst_namespace: String,
    /// `true` when the connection crossed the mesh over mTLS, else empty.
    pub tls: &'static str,
}

impl EncodeLabelSet for TcpLabels {
    fn encode(&self, encoder: &mut LabelSetEncoder<'_>) -> Result<(), std::fmt::Error> {
        let values = [
            self.direction,
            &self.authority,
            &self.dst_service,
            &self.dst_namespace,
            self.tls,
        ];
        encode_labels(&contract::TCP_LABELS, values, encoder)
    }
}

/// Labels of a response: the request's plus status and classification.
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub struct ResponseLabels {
    /// The request's labels.
    pub request: RequestLabels,
    /// HTTP status code; `None` (an empty label) when no response was received.
    pub status_code: Option<u16>,
    /// `success`, or `failure` for 5xx and proxy errors ([`Classification`]).
    pub classification: &'static str,
    /// Where a failure came from: `upstream` (the app answered 5xx), `mesh` (the proxy could not
    /// reach or timed out on the backend), or empty for successes ([`ErrorSource`]).
    pub error: &'static str,
}

impl EncodeLabelSet for ResponseLabels {
    fn encode(&self, encoder: &mut LabelSetEncoder<'_>) -> Result<(), std::fmt::Error> {
        // Formatted at scrape time, never per request.
        let status = self.status_code.map(|s| s.to_string()).unwrap_or_default();
        let r = &self.request;
        let values = [
            r.direction,
            &r.authority,
            &r.route,
            &r.dst_service,
            &r.dst_namespace,
            &r.dst_deployment,
            r.tls,
            &status,
            self.classification,
            self.error,
        ];
        encode_labels(&contract::RESPONSE_LABELS, values, encoder)
    }
}

/// Labels of authorization decisions: what decided the policy (`Server/<name>` or
/// `default:<policy>`) and, for an admitted client, the authorization that admitted it. Both
/// are resource names from the control plane, never values a client sends.
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub struct AuthzLabels {
    /// `Server/<name>` or `default:<policy>`.
    pub server: String,
    /// `AuthorizationPolicy/<name>` or `default:<policy>`; empty on a denial.
    pub authorization: String,
}

impl EncodeLabelSet for AuthzLabels {
    fn encode(&self, encoder: &mut LabelSetEncoder<'_>) -> Result<(), std::fmt::Error> {
        let values = [self.server.as_str(), &self.authorization];
        encode_labels(&contract::AUTHZ_LABELS, values, encoder)
    }
}

/// Labels of the listener series: which listener (`inbound` or `outbound`).
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub struct ListenerLabels {
    /// `inbound` or `outbound`.
    pub listener: &'static str,
}

impl EncodeLabelSet for ListenerLabels {
    fn encode(&self, encoder: &mut LabelSetEncoder<'_>) -> Result<(), std::fmt::Error> {
        encode_labels(&contract::LISTENER_LABELS, [self.listener], encoder)
    }
}

/// Labels of per-route series: the authority and the HTTPRoute rule.
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub struct RouteLabels {
    /// The authority the request was routed by.
    pub authority: String,
    /// Route (HTTPRoute rule) name.
    pub route: String,
}

impl EncodeLabelSet for RouteLabels {
    fn encode(&self, encoder: &mut LabelSetEncoder<'_>) -> Result<(), std::fmt::Error> {
        let values = [self.authority.as_str(), &self.route];
        encode_labels(&contract::ROUTE_LABELS, values, encoder)
    }
}

/// Writes a label set: the contract's names, in its order, with the values in the same order.
fn encode_labels<const N: usize>(
    names: &[&'static str; N],
    values: [&str; N],
    encoder: &mut LabelSetEncoder<'_>,
) -> Result<(), std::fmt::Error> {
    for (name, value) in names.iter().zip(values) {
        (*name, value).encode(encoder.encode_label())?;
    }
    Ok(())
}

/// Registers a family under the contract's name and help text.
fn register(registry: &mut Registry, family: &Contract, metric: impl Metric) {
    registry.register(family.name, family.help, metric);
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
    /// `outbound_http_route_mirror_requests_total`: mirror copies sent.
    pub mirror_requests: Family<RouteLabels, Counter>,
    /// `outbound_http_route_mirror_skipped_total`: mirror copies given up (they fell behind).
    pub mirror_skipped: Family<RouteLabels, Counter>,
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
    /// Connections each listener holds open now.
    pub listener_open: Family<ListenerLabels, Gauge>,
    /// Times each listener reached its connection cap.
    pub listener_limit_reached: Family<ListenerLabels, Counter>,
    /// Live requests for `/tap`: recorded where the golden metrics are, from the same
    /// attempts, and only while someone taps.
    pub tap: crate::tap::Tap,
    /// `trace_spans_dropped_total`: spans tracing could not deliver.
    pub trace_dropped: Family<crate::trace::DroppedLabels, Counter>,
    /// Spans of each request, when tracing is on ([`crate::trace`]); recorded where the golden
    /// metrics are.
    pub trace: crate::trace::Tracing,
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
            mirror_requests: Family::default(),
            mirror_skipped: Family::default(),
            tcp_open: Family::default(),
            tcp_close: Family::default(),
            tcp_read_bytes: Family::default(),
            tcp_write_bytes: Family::default(),
            tcp_open_connections: Family::default(),
            http_authz_allow: Family::default(),
            http_authz_deny: Family::default(),
            tcp_authz_deny: Family::default(),
            listener_open: Family::default(),
            listener_limit_reached: Family::default(),
            tap: crate::tap::Tap::default(),
            trace_dropped: Family::default(),
            trace: crate::trace::Tracing::off(),
        };
        // Registration order is the exposition's order; it is kept as it always was.
        register(
            registry,
            &contract::HTTP_AUTHZ_ALLOW,
            m.http_authz_allow.clone(),
        );
        register(
            registry,
            &contract::HTTP_AUTHZ_DENY,
            m.http_authz_deny.clone(),
        );
        register(
            registry,
            &contract::TCP_AUTHZ_DENY,
            m.tcp_authz_deny.clone(),
        );
        register(registry, &contract::TCP_OPEN, m.tcp_open.clone());
        register(registry, &contract::TCP_CLOSE, m.tcp_close.clone());
        register(
            registry,
            &contract::TCP_READ_BYTES,
            m.tcp_read_bytes.clone(),
        );
        register(
            registry,
            &contract::TCP_WRITE_BYTES,
            m.tcp_write_bytes.clone(),
        );
        register(
            registry,
            &contract::TCP_OPEN_CONNECTIONS,
            m.tcp_open_connections.clone(),
        );
        register(registry, &contract::REQUEST, m.requests.clone());
        register(registry, &contract::RESPONSE, m.responses.clone());
        register(registry, &contract::RESPONSE_LATENCY_MS, m.latency.clone());
        register(
            registry,
            &contract::RETRY_REQUESTS,
            m.retry_requests.clone(),
        );
        register(
            registry,
            &contract::RETRY_SUCCESSES,
            m.retry_successes.clone(),
        );
        register(
            registry,
            &contract::RETRY_LIMIT_EXCEEDED,
            m.retry_limit_exceeded.clone(),
        );
        register(
            registry,
            &contract::RETRY_OVERFLOW,
            m.retry_overflow.clone(),
        );
        register(
            registry,
            &contract::MIRROR_REQUESTS,
            m.mirror_requests.clone(),
        );
        register(
            registry,
            &contract::MIRROR_SKIPPED,
            m.mirror_skipped.clone(),
        );
        register(
            registry,
            &contract::LISTENER_OPEN_CONNECTIONS,
            m.listener_open.clone(),
        );
        register(
            registry,
            &contract::LISTENER_LIMIT_REACHED,
            m.listener_limit_reached.clone(),
        );
        register(
            registry,
            &contract::TRACE_SPANS_DROPPED,
            m.trace_dropped.clone(),
        );
        m
    }

    /// The series of requests labelled `labels`, looked up once for all the requests that
    /// carry them; see [`RequestSeries`].
    pub fn series(&self, labels: RequestLabels) -> RequestSeries {
        RequestSeries {
            labels,
            requests: std::sync::OnceLock::new(),
            outcomes: std::sync::Mutex::default(),
        }
    }

    /// Records a finished request.
    pub fn record(
        &self,
        req: &RequestLabels,
        status: Option<u16>,
        mesh_error: bool,
        took: Duration,
    ) {
        let labels = self.response_labels(req, status, mesh_error);
        self.responses.get_or_create(&labels).inc();
        self.latency
            .get_or_create(&labels)
            .observe(took.as_secs_f64() * 1000.0);
    }

    /// The labels of a response to a request labelled `req`.
    fn response_labels(
        &self,
        req: &RequestLabels,
        status: Option<u16>,
        mesh_error: bool,
    ) -> ResponseLabels {
        let failure = mesh_error || status.is_none_or(|s| s >= 500);
        ResponseLabels {
            request: req.clone(),
            status_code: status,
            classification: if failure {
                Classification::Failure
            } else {
                Classification::Success
            }
            .as_str(),
            error: ErrorSource::label(match (failure, mesh_error) {
                (false, _) => None,
                (true, true) => Some(ErrorSource::Mesh),
                (true, false) => Some(ErrorSource::Upstream),
            }),
        }
    }
}

/// The series of one set of request labels, held where the labels are fixed (per inbound
/// proxy; per route, backend and endpoint owner outbound), so recording a request is an
/// atomic add for `request_total` and, at its end, a short scan of the outcomes seen so far
/// and two more, instead of hashing the seven labels into three families each time. An
/// outcome seen for the first time is looked up in the families once and kept; there are at
/// most a few per label set (the status codes an endpoint answers with). The families never
/// drop series, so the handles kept here stay the ones the exposition reads. Nothing is
/// looked up before the first request, so a label set never used shows no series.
#[derive(Debug)]
pub struct RequestSeries {
    labels: RequestLabels,
    requests: std::sync::OnceLock<Counter>,
    outcomes: std::sync::Mutex<Vec<Outcome>>,
}

/// The `response_total` and `response_latency_ms` series of one outcome.
#[derive(Debug)]
struct Outcome {
    status: Option<u16>,
    mesh_error: bool,
    responses: Counter,
    latency: Histogram,
}

impl RequestSeries {
    /// The labels.
    pub fn labels(&self) -> &RequestLabels {
        &self.labels
    }

    /// Counts a request as it is sent (`request_total`).
    pub fn request(&self, metrics: &Metrics) {
        self.requests
            .get_or_init(|| metrics.requests.get_or_create(&self.labels).clone())
            .inc();
    }

    /// Records a finished request, as [`Metrics::record`] does with these labels.
    pub fn record(&self, metrics: &Metrics, status: Option<u16>, mesh_error: bool, took: Duration) {
        let mut outcomes = self
            .outcomes
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let i = match outcomes
            .iter()
            .position(|o| o.status == status && o.mesh_error == mesh_error)
        {
            Some(i) => i,
            None => {
                let labels = metrics.response_labels(&self.labels, status, mesh_error);
                outcomes.push(Outcome {
                    status,
                    mesh_error,
                    responses: metrics.responses.get_or_create(&labels).clone(),
                    latency: metrics.latency.get_or_create(&labels).clone(),
                });
                outcomes.len() - 1
            }
        };
        let outcome = &outcomes[i];
        outcome.responses.inc();
        outcome.latency.observe(took.as_secs_f64() * 1000.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One sample in every family, written through the proxy's own types.
    fn exposition() -> String {
        let mut registry = Registry::default();
        let m = Metrics::register(&mut registry);
        let req = RequestLabels {
            direction: "outbound",
            authority: "web.default:80".into(),
            route: "split".into(),
            dst_service: "web-canary".into(),
            dst_namespace: "default".into(),
            dst_deployment: "web".into(),
            tls: "true",
        };
        m.requests.get_or_create(&req).inc();
        m.record(&req, Some(503), false, Duration::from_millis(12));
        let route = RouteLabels {
            authority: "web.default:80".into(),
            route: "split".into(),
        };
        for f in [
            &m.retry_requests,
            &m.retry_successes,
            &m.retry_limit_exceeded,
            &m.retry_overflow,
            &m.mirror_requests,
            &m.mirror_skipped,
        ] {
            f.get_or_create(&route).inc();
        }
        let tcp = TcpLabels {
            direction: "inbound",
            authority: "db.default:5432".into(),
            dst_service: "db".into(),
            dst_namespace: "default".into(),
            tls: "true",
        };
        for f in [
            &m.tcp_open,
            &m.tcp_close,
            &m.tcp_read_bytes,
            &m.tcp_write_bytes,
        ] {
            f.get_or_create(&tcp).inc();
        }
        m.tcp_open_connections.get_or_create(&tcp).inc();
        let authz = AuthzLabels {
            server: "Server/web".into(),
            authorization: "AuthorizationPolicy/web".into(),
        };
        for f in [&m.http_authz_allow, &m.http_authz_deny, &m.tcp_authz_deny] {
            f.get_or_create(&authz).inc();
        }
        let listener = ListenerLabels {
            listener: "inbound",
        };
        m.listener_open.get_or_create(&listener).inc();
        m.listener_limit_reached.get_or_create(&listener).inc();
        m.trace_dropped
            .get_or_create(&crate::trace::DroppedLabels {
                reason: "queue_full",
            })
            .inc();
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        text
    }

    /// Requests recorded through a [`RequestSeries`] land in the same series, with the same
    /// counts and histograms, as through the families; a series nothing was recorded in shows
    /// nothing.
    #[test]
    fn a_request_series_records_what_the_families_would() {
        let req = RequestLabels {
            direction: "inbound",
            authority: "web.default:80".into(),
            route: "default".into(),
            dst_service: "web".into(),
            dst_namespace: "default".into(),
            dst_deployment: "".into(),
            tls: "true",
        };
        let outcomes = [
            (Some(200), false, 3),
            (Some(503), false, 40),
            (Some(200), false, 7),
            (Some(502), true, 1),
            (None, true, 2),
        ];
        // Series come out in hash order, which differs between two families: compare the
        // lines as sets.
        let encode = |registry: &Registry| {
            let mut text = String::new();
            prometheus_client::encoding::text::encode(&mut text, registry).unwrap();
            let mut lines: Vec<String> = text.lines().map(str::to_string).collect();
            lines.sort();
            lines.join("\n")
        };
        let mut by_family = Registry::default();
        let m = Metrics::register(&mut by_family);
        for (status, mesh_error, ms) in outcomes {
            m.requests.get_or_create(&req).inc();
            m.record(&req, status, mesh_error, Duration::from_millis(ms));
        }
        let mut by_series = Registry::default();
        let m = Metrics::register(&mut by_series);
        let series = m.series(req.clone());
        let unused = m.series(RequestLabels {
            tls: "",
            ..req.clone()
        });
        for (status, mesh_error, ms) in outcomes {
            series.request(&m);
            series.record(&m, status, mesh_error, Duration::from_millis(ms));
        }
        assert_eq!(m.requests.get_or_create(&req).get(), 5);
        assert_eq!(encode(&by_series), encode(&by_family));
        assert_eq!(unused.labels().tls, "");
        assert!(
            !encode(&by_series).contains("tls=\"\""),
            "a label set never recorded shows no series"
        );
    }

    /// The text dashboards and Flagger queries read, byte for byte, as it was before the
    /// families were registered from the contract.
    #[test]
    fn the_exposition_is_unchanged() {
        assert_eq!(exposition(), include_str!("../tests/golden/metrics.txt"));
    }

    /// Every family the proxy registers is in the contract, with its type and help text, and
    /// the other way round.
    #[test]
    fn the_exposition_follows_the_contract() {
        let text = exposition();
        let types: Vec<&str> = text.lines().filter(|l| l.starts_with("# TYPE ")).collect();
        assert_eq!(types.len(), contract::FAMILIES.len(), "{text}");
        for f in contract::FAMILIES {
            let help = format!("# HELP {} {}.", f.name, f.help);
            let kind = format!("# TYPE {} {}", f.name, f.kind.as_str());
            assert!(text.lines().any(|l| l == help), "{help}\n{text}");
            assert!(types.contains(&kind.as_str()), "{kind}\n{text}");
            let sample = match f.kind {
                contract::Kind::Histogram => f.bucket(),
                contract::Kind::Counter | contract::Kind::Gauge => f.series(),
            };
            let line = text
                .lines()
                .find(|l| l.starts_with(&format!("{sample}{{")))
                .unwrap_or_else(|| panic!("no {sample} sample\n{text}"));
            let names: Vec<&str> = line
                .split(['{', ','])
                .skip(1)
                .filter_map(|kv| kv.split_once('=').map(|(k, _)| k))
                .filter(|k| *k != contract::label::LE)
                .collect();
            assert_eq!(names, f.labels, "{line}");
        }
    }
}
