//! The proxy's metric contract: every series `mesh-proxy` exports on `/metrics`, with its type,
//! help text and label names, the label values that form a closed set, and Linkerd's latency
//! buckets. The proxy registers its families from these definitions; the rollout controller's
//! direct scrape and PromQL source read the same names (see [`crate::gates`]), and the metric
//! table in docs/proxy.md is generated from [`markdown_table`] (a test fails when it drifts).
//!
//! Names and labels are Linkerd's, so Flagger queries and dashboards written for Linkerd work
//! unchanged; renaming anything here breaks them. Label cardinality is bounded by design: the
//! closed sets below are fixed words, and the other values come from route tables and resource
//! names, never from what a client sends.

/// What kind of series a family is, as the exposition's `# TYPE` line says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// A monotonic counter; its samples are named `<name>_total`.
    Counter,
    /// A value that goes up and down; its samples carry the family's name.
    Gauge,
    /// A histogram; its samples are `<name>_bucket` (label `le`), `<name>_sum` and `<name>_count`.
    Histogram,
}

impl Kind {
    /// The word of the `# TYPE` line.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
            Kind::Histogram => "histogram",
        }
    }
}

/// One metric family: what the proxy registers and what readers select by.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Family {
    /// The family's name, as registered (a counter's samples add `_total`).
    pub name: &'static str,
    /// Counter, gauge or histogram.
    pub kind: Kind,
    /// Help text, without the final full stop the exposition adds.
    pub help: &'static str,
    /// Label names, in the order the proxy writes them.
    pub labels: &'static [&'static str],
}

impl Family {
    /// The name of the samples that carry the family's value: `<name>_total` for a counter,
    /// `<name>` for a gauge, `<name>_count` for a histogram.
    pub fn series(&self) -> String {
        format!("{}{}", self.name, self.value_suffix())
    }

    /// Whether `name` is [`Family::series`], without building it.
    pub fn is_series(&self, name: &str) -> bool {
        name.strip_prefix(self.name) == Some(self.value_suffix())
    }

    /// The name of a histogram's bucket samples, `<name>_bucket`.
    pub fn bucket(&self) -> String {
        format!("{}{BUCKET_SUFFIX}", self.name)
    }

    /// Whether `name` is [`Family::bucket`], without building it.
    pub fn is_bucket(&self, name: &str) -> bool {
        name.strip_prefix(self.name) == Some(BUCKET_SUFFIX)
    }

    fn value_suffix(&self) -> &'static str {
        match self.kind {
            Kind::Counter => "_total",
            Kind::Gauge => "",
            Kind::Histogram => "_count",
        }
    }
}

const BUCKET_SUFFIX: &str = "_bucket";

/// Label names.
pub mod label {
    /// The proxy listener a connection arrived on: `inbound` or `outbound`.
    pub const LISTENER: &str = "listener";
    /// `inbound` or `outbound` ([`super::Direction`]).
    pub const DIRECTION: &str = "direction";
    /// The authority a request was routed by.
    pub const AUTHORITY: &str = "authority";
    /// The HTTPRoute rule's name (`default` for inbound requests).
    pub const ROUTE: &str = "route";
    /// The backend service.
    pub const DST_SERVICE: &str = "dst_service";
    /// The backend service's namespace.
    pub const DST_NAMESPACE: &str = "dst_namespace";
    /// The HTTP status code; empty when no response was received.
    pub const STATUS_CODE: &str = "status_code";
    /// `success` or `failure` ([`super::Classification`]).
    pub const CLASSIFICATION: &str = "classification";
    /// Where a failure came from ([`super::ErrorSource`]); empty for successes.
    pub const ERROR: &str = "error";
    /// What decided an inbound policy: `Server/<name>` or `default:<policy>`.
    pub const SERVER: &str = "server";
    /// The authorization that admitted a client: `AuthorizationPolicy/<name>` or
    /// `default:<policy>`; empty on a denial.
    pub const AUTHORIZATION: &str = "authorization";
    /// Whether a request or connection crossed the mesh over mTLS: `true`, or empty.
    pub const TLS: &str = "tls";
    /// A histogram bucket's upper bound.
    pub const LE: &str = "le";
    /// The workload's namespace (a resource label, [`super::RESOURCE_LABELS`]).
    pub const NAMESPACE: &str = "namespace";
    /// The workload's owner: the Deployment in a cluster, the arm (`<target>` or
    /// `<target>-primary`) in the embedded mesh (a resource label).
    pub const DEPLOYMENT: &str = "deployment";
    /// The workload's instance: the pod in a cluster, the supervised instance in the embedded
    /// mesh (a resource label).
    pub const POD: &str = "pod";
    /// The owner of the endpoint a request was sent to (outbound; empty when unknown or
    /// inbound).
    pub const DST_DEPLOYMENT: &str = "dst_deployment";
    /// Why spans were lost: `queue_full` or `export_failed` ([`super::DROP_REASONS`]).
    pub const REASON: &str = "reason";
}

/// Linkerd's resource labels: on every series of a proxy, naming the workload beside it. The
/// proxy writes them itself when it is told its workload (`MESH_PROXY_WORKLOAD_DEPLOYMENT`, as
/// the embedded mesh does); in a cluster the scrape config's relabeling adds them from the pod.
/// They come first in a sample's label set.
pub const RESOURCE_LABELS: [&str; 3] = [label::NAMESPACE, label::DEPLOYMENT, label::POD];

/// Which way a request or connection went through the proxy.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Direction {
    /// From a peer to the local app.
    Inbound,
    /// From the local app to a backend.
    Outbound,
}

impl Direction {
    /// Every value.
    pub const ALL: [Direction; 2] = [Direction::Inbound, Direction::Outbound];

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Inbound => "inbound",
            Direction::Outbound => "outbound",
        }
    }
}

/// Linkerd's classification of a response.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Classification {
    /// Any answer below 500.
    Success,
    /// A 5xx answer, or no answer because of a proxy error.
    Failure,
}

impl Classification {
    /// Every value.
    pub const ALL: [Classification; 2] = [Classification::Success, Classification::Failure];

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Classification::Success => "success",
            Classification::Failure => "failure",
        }
    }
}

/// Where a failed response came from, so the canary judge can tell app errors from mesh errors.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ErrorSource {
    /// The app answered 5xx.
    Upstream,
    /// The proxy could not reach, or timed out on, the backend.
    Mesh,
}

impl ErrorSource {
    /// Every value.
    pub const ALL: [ErrorSource; 2] = [ErrorSource::Upstream, ErrorSource::Mesh];

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorSource::Upstream => "upstream",
            ErrorSource::Mesh => "mesh",
        }
    }

    /// The label value of a response's `error`: empty for a success.
    pub fn label(source: Option<ErrorSource>) -> &'static str {
        source.map_or("", ErrorSource::as_str)
    }
}

/// Linkerd's latency buckets, in milliseconds (the `+Inf` bucket is implied).
pub const LATENCY_BUCKETS_MS: [f64; 25] = [
    1.0, 2.0, 3.0, 4.0, 5.0, 10.0, 20.0, 30.0, 40.0, 50.0, 100.0, 200.0, 300.0, 400.0, 500.0,
    1000.0, 2000.0, 3000.0, 4000.0, 5000.0, 10000.0, 20000.0, 30000.0, 40000.0, 50000.0,
];

/// Labels of a request (after the [`RESOURCE_LABELS`], when the proxy writes them).
pub const REQUEST_LABELS: [&str; 7] = [
    label::DIRECTION,
    label::AUTHORITY,
    label::ROUTE,
    label::DST_SERVICE,
    label::DST_NAMESPACE,
    label::DST_DEPLOYMENT,
    label::TLS,
];

/// Labels of a response: the request's plus status and classification.
pub const RESPONSE_LABELS: [&str; 10] = [
    label::DIRECTION,
    label::AUTHORITY,
    label::ROUTE,
    label::DST_SERVICE,
    label::DST_NAMESPACE,
    label::DST_DEPLOYMENT,
    label::TLS,
    label::STATUS_CODE,
    label::CLASSIFICATION,
    label::ERROR,
];

/// Labels of per-route series.
pub const ROUTE_LABELS: [&str; 2] = [label::AUTHORITY, label::ROUTE];

/// Labels of opaque TCP series: the direction, where the connection went (the service's
/// authority, or `ip:port` for a destination outside the mesh, with empty `dst_*`), and whether
/// it crossed the mesh over mTLS.
pub const TCP_LABELS: [&str; 5] = [
    label::DIRECTION,
    label::AUTHORITY,
    label::DST_SERVICE,
    label::DST_NAMESPACE,
    label::TLS,
];

/// Labels of authorization decisions.
pub const AUTHZ_LABELS: [&str; 2] = [label::SERVER, label::AUTHORIZATION];

/// `request_total`: requests sent (outbound) or received (inbound).
pub const REQUEST: Family = Family {
    name: "request",
    kind: Kind::Counter,
    help: "Requests sent or received",
    labels: &REQUEST_LABELS,
};

/// `response_total`: responses, classified.
pub const RESPONSE: Family = Family {
    name: "response",
    kind: Kind::Counter,
    help: "Responses sent or received",
    labels: &RESPONSE_LABELS,
};

/// `response_latency_ms`: time to response headers, in [`LATENCY_BUCKETS_MS`].
pub const RESPONSE_LATENCY_MS: Family = Family {
    name: "response_latency_ms",
    kind: Kind::Histogram,
    help: "Time from request to response headers, in milliseconds",
    labels: &RESPONSE_LABELS,
};

/// `outbound_http_route_retry_requests_total`: retries sent.
pub const RETRY_REQUESTS: Family = Family {
    name: "outbound_http_route_retry_requests",
    kind: Kind::Counter,
    help: "Retries sent, per route",
    labels: &ROUTE_LABELS,
};

/// `outbound_http_route_retry_successes_total`: requests that succeeded after a retry.
pub const RETRY_SUCCESSES: Family = Family {
    name: "outbound_http_route_retry_successes",
    kind: Kind::Counter,
    help: "Requests that succeeded after at least one retry, per route",
    labels: &ROUTE_LABELS,
};

/// `outbound_http_route_retry_limit_exceeded_total`: requests that still failed in a retryable
/// way after their last allowed retry.
pub const RETRY_LIMIT_EXCEEDED: Family = Family {
    name: "outbound_http_route_retry_limit_exceeded",
    kind: Kind::Counter,
    help: "Requests that failed in a retryable way after their last allowed retry, per route",
    labels: &ROUTE_LABELS,
};

/// `outbound_http_route_retry_overflow_total`: retries not sent because the budget was spent.
pub const RETRY_OVERFLOW: Family = Family {
    name: "outbound_http_route_retry_overflow",
    kind: Kind::Counter,
    help: "Retries not sent because the route's retry budget was spent",
    labels: &ROUTE_LABELS,
};

/// `outbound_http_route_mirror_requests_total`: copies sent by RequestMirror filters.
pub const MIRROR_REQUESTS: Family = Family {
    name: "outbound_http_route_mirror_requests",
    kind: Kind::Counter,
    help: "Copies of requests sent to a RequestMirror filter's backend, per route",
    labels: &ROUTE_LABELS,
};

/// `outbound_http_route_mirror_skipped_total`: sampled mirror copies given up before they were
/// sent whole (the copy fell too far behind its original's body; see the sidecar's `tee`).
pub const MIRROR_SKIPPED: Family = Family {
    name: "outbound_http_route_mirror_skipped",
    kind: Kind::Counter,
    help: "Mirror copies given up because they fell too far behind the original request's body, per route",
    labels: &ROUTE_LABELS,
};

/// `tcp_open_total`: opaque TCP connections opened.
pub const TCP_OPEN: Family = Family {
    name: "tcp_open",
    kind: Kind::Counter,
    help: "Opaque TCP connections opened",
    labels: &TCP_LABELS,
};

/// `tcp_close_total`: opaque TCP connections closed.
pub const TCP_CLOSE: Family = Family {
    name: "tcp_close",
    kind: Kind::Counter,
    help: "Opaque TCP connections closed",
    labels: &TCP_LABELS,
};

/// `tcp_read_bytes_total`: bytes read from the peer, counted as they flow.
pub const TCP_READ_BYTES: Family = Family {
    name: "tcp_read_bytes",
    kind: Kind::Counter,
    help: "Bytes read from peers on opaque TCP connections",
    labels: &TCP_LABELS,
};

/// `tcp_write_bytes_total`: bytes written to the peer, counted as they flow.
pub const TCP_WRITE_BYTES: Family = Family {
    name: "tcp_write_bytes",
    kind: Kind::Counter,
    help: "Bytes written to peers on opaque TCP connections",
    labels: &TCP_LABELS,
};

/// `tcp_open_connections`: opaque TCP connections open now.
pub const TCP_OPEN_CONNECTIONS: Family = Family {
    name: "tcp_open_connections",
    kind: Kind::Gauge,
    help: "Opaque TCP connections open now",
    labels: &TCP_LABELS,
};

/// `inbound_http_authz_allow_total`: inbound HTTP requests an authorization admitted.
pub const HTTP_AUTHZ_ALLOW: Family = Family {
    name: "inbound_http_authz_allow",
    kind: Kind::Counter,
    help: "Inbound HTTP requests admitted by an authorization",
    labels: &AUTHZ_LABELS,
};

/// `inbound_http_authz_deny_total`: inbound HTTP requests refused by policy (403).
pub const HTTP_AUTHZ_DENY: Family = Family {
    name: "inbound_http_authz_deny",
    kind: Kind::Counter,
    help: "Inbound HTTP requests refused by the port's policy",
    labels: &AUTHZ_LABELS,
};

/// `inbound_tcp_authz_deny_total`: inbound opaque TCP connections refused by policy (closed).
pub const TCP_AUTHZ_DENY: Family = Family {
    name: "inbound_tcp_authz_deny",
    kind: Kind::Counter,
    help: "Inbound opaque TCP connections refused by the port's policy",
    labels: &AUTHZ_LABELS,
};

/// Labels of the listener families.
pub const LISTENER_LABELS: [&str; 1] = [label::LISTENER];

/// `listener_open_connections`: connections a listener holds open now (under its cap).
pub const LISTENER_OPEN_CONNECTIONS: Family = Family {
    name: "listener_open_connections",
    kind: Kind::Gauge,
    help: "Connections a proxy listener holds open now",
    labels: &LISTENER_LABELS,
};

/// `listener_connection_limit_reached_total`: times a listener reached its connection cap and
/// stopped accepting until a connection closed.
pub const LISTENER_LIMIT_REACHED: Family = Family {
    name: "listener_connection_limit_reached",
    kind: Kind::Counter,
    help: "Times a proxy listener reached its connection cap and paused accepting",
    labels: &LISTENER_LABELS,
};

/// Labels of `trace_spans_dropped_total`.
pub const TRACE_DROPPED_LABELS: [&str; 1] = [label::REASON];

/// A finished span found the export queue full (the collector is slow or away).
pub const DROP_QUEUE_FULL: &str = "queue_full";
/// The collector refused a batch, or could not be reached.
pub const DROP_EXPORT_FAILED: &str = "export_failed";
/// Every `reason` of `trace_spans_dropped_total`.
pub const DROP_REASONS: [&str; 2] = [DROP_QUEUE_FULL, DROP_EXPORT_FAILED];

/// `trace_spans_dropped_total`: spans the proxy recorded but never delivered; export never
/// holds up a request, so spans are dropped instead (docs/tracing.md).
pub const TRACE_SPANS_DROPPED: Family = Family {
    name: "trace_spans_dropped",
    kind: Kind::Counter,
    help: "Spans recorded but not delivered to the trace collector, by reason",
    labels: &TRACE_DROPPED_LABELS,
};

/// Every family the proxy exports: golden HTTP metrics, per-route retries, opaque TCP,
/// inbound authorization, the listeners' connection cap, then tracing (the order of the reference table
/// in docs/proxy.md).
pub const FAMILIES: [Family; 20] = [
    REQUEST,
    RESPONSE,
    RESPONSE_LATENCY_MS,
    RETRY_REQUESTS,
    RETRY_SUCCESSES,
    RETRY_LIMIT_EXCEEDED,
    RETRY_OVERFLOW,
    MIRROR_REQUESTS,
    MIRROR_SKIPPED,
    TCP_OPEN,
    TCP_CLOSE,
    TCP_READ_BYTES,
    TCP_WRITE_BYTES,
    TCP_OPEN_CONNECTIONS,
    HTTP_AUTHZ_ALLOW,
    HTTP_AUTHZ_DENY,
    TCP_AUTHZ_DENY,
    LISTENER_OPEN_CONNECTIONS,
    LISTENER_LIMIT_REACHED,
    TRACE_SPANS_DROPPED,
];

/// The label values that form a closed set, by label name.
pub fn closed_values(label: &str) -> Option<Vec<&'static str>> {
    match label {
        label::DIRECTION | label::LISTENER => Some(Direction::ALL.map(Direction::as_str).to_vec()),
        label::CLASSIFICATION => Some(Classification::ALL.map(Classification::as_str).to_vec()),
        label::ERROR => Some(
            std::iter::once(ErrorSource::label(None))
                .chain(ErrorSource::ALL.map(ErrorSource::as_str))
                .collect(),
        ),
        label::REASON => Some(DROP_REASONS.to_vec()),
        _ => None,
    }
}

/// The reference table of docs/proxy.md: one row per family with its series, type, labels (and
/// their closed sets of values) and meaning.
pub fn markdown_table() -> String {
    let mut out = String::from("| series | type | labels | meaning |\n|---|---|---|---|\n");
    for f in FAMILIES {
        let series = match f.kind {
            Kind::Histogram => format!("`{}` (`_bucket`, `_sum`, `_count`)", f.name),
            Kind::Counter | Kind::Gauge => format!("`{}`", f.series()),
        };
        let labels: Vec<String> = f
            .labels
            .iter()
            .map(|l| match closed_values(l) {
                Some(values) => {
                    let values: Vec<String> = values
                        .iter()
                        .map(|v| match *v {
                            "" => "empty".to_string(),
                            v => format!("`{v}`"),
                        })
                        .collect();
                    format!("`{l}` ({})", values.join(", "))
                }
                None => format!("`{l}`"),
            })
            .collect();
        out.push_str(&format!(
            "| {series} | {} | {} | {} |\n",
            f.kind.as_str(),
            labels.join(", "),
            f.help
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sample_names_follow_the_exposition_format() {
        assert_eq!(RESPONSE.series(), "response_total");
        assert_eq!(REQUEST.series(), "request_total");
        assert_eq!(TCP_OPEN_CONNECTIONS.series(), "tcp_open_connections");
        assert_eq!(RESPONSE_LATENCY_MS.bucket(), "response_latency_ms_bucket");
        assert_eq!(RESPONSE_LATENCY_MS.series(), "response_latency_ms_count");
        assert!(RESPONSE.is_series("response_total"));
        assert!(!RESPONSE.is_series("response_latency_ms_bucket"));
        assert!(!RESPONSE.is_series("response"));
        assert!(RESPONSE_LATENCY_MS.is_bucket("response_latency_ms_bucket"));
        assert!(!RESPONSE.is_bucket("response_latency_ms_bucket"));
    }

    #[test]
    fn family_names_are_unique_and_buckets_ascend() {
        let mut names: Vec<&str> = FAMILIES.iter().map(|f| f.name).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), FAMILIES.len());
        assert!(LATENCY_BUCKETS_MS.windows(2).all(|w| w[0] < w[1]));
        assert_eq!(LATENCY_BUCKETS_MS.first(), Some(&1.0));
        assert_eq!(LATENCY_BUCKETS_MS.last(), Some(&50_000.0));
    }

    /// The reference table in docs/proxy.md is this module's, between its markers.
    #[test]
    fn the_proxy_doc_lists_the_contract() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/proxy.md");
        let doc = std::fs::read_to_string(path).unwrap_or_default();
        let table = doc
            .split_once(DOC_BEGIN)
            .and_then(|(_, rest)| rest.split_once(DOC_END))
            .map(|(table, _)| table.trim_start_matches('\n'));
        let want = markdown_table();
        assert_eq!(
            table,
            Some(want.as_str()),
            "docs/proxy.md's metric table differs from mesh_core::metrics; put this between \
             {DOC_BEGIN} and {DOC_END}:\n{want}"
        );
    }

    const DOC_BEGIN: &str = "<!-- metrics table: generated from mesh_core::metrics -->";
    const DOC_END: &str = "<!-- end of metrics table -->";
}
