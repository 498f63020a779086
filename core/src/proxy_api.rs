//! The control-plane <-> proxy protocol: what a proxy is told (route tables, endpoints) and how
//! it asks for its identity and registers its workload.
//!
//! Discovery travels as long-lived HTTP/2 watch streams from the control plane's proxy listener.
//! Each stream is newline-delimited JSON; every line is an [`Update`] carrying the *whole* current
//! value for the watched key plus a version that only grows. A proxy therefore never merges deltas:
//! it swaps in the newest value, which keeps a reconnect (resync) identical to a first connect.
//! The same types, in YAML, form the proxy's static config file ([`StaticConfig`]).
//!
//! | stream | path | key |
//! |---|---|---|
//! | routes | `GET /v1/watch/routes?authority=<name>.<namespace>:<port>` | an authority |
//! | endpoints | `GET /v1/watch/endpoints?service=<name>.<namespace>:<port>` | a backend service |
//! | policy | `GET /v1/watch/policy?namespace=<ns>&port=<port>&labels=<k>=<v>,...` | a workload's inbound port ([`PolicyTarget`]); the value is a `mesh_policies::InboundPolicy` |
//! | address | `GET /v1/watch/address?addr=<ip>:<port>` | an original destination; the value is a [`MeshAddress`], absent when the address is not meshed |
//!
//! Identity and registration are unary JSON calls on the same listener:
//! `POST /v1/identity/certify` ([`CertifyRequest`] -> [`CertifyResponse`]),
//! `POST /v1/workloads` ([`WorkloadRegistration`] -> [`WorkloadLease`]),
//! `POST /v1/workloads/<lease id>/heartbeat` (empty body, 204; 404 once the lease expired) and
//! `DELETE /v1/workloads/<lease id>` (204; 404 if unknown), which a proxy sends as it shuts down
//! so its endpoint leaves the service at once instead of after the lease TTL.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::Name;

/// Path of the routes watch stream.
pub const WATCH_ROUTES_PATH: &str = "/v1/watch/routes";
/// Path of the endpoints watch stream.
pub const WATCH_ENDPOINTS_PATH: &str = "/v1/watch/endpoints";
/// Path of the inbound policy watch stream.
pub const WATCH_POLICY_PATH: &str = "/v1/watch/policy";
/// Path of the address watch stream: what a connection's original destination is in the mesh.
pub const WATCH_ADDRESS_PATH: &str = "/v1/watch/address";
/// Path of the certificate-signing call.
pub const CERTIFY_PATH: &str = "/v1/identity/certify";
/// Path of workload registration; heartbeats go to `<this>/<lease id>/heartbeat`, and
/// deregistration is a `DELETE` of `<this>/<lease id>`.
pub const WORKLOADS_PATH: &str = "/v1/workloads";
/// Content type of a watch stream: one JSON [`Update`] per line.
pub const NDJSON: &str = "application/x-ndjson";
/// Path of Prometheus HTTP service discovery (`http_sd_configs`) on the control plane's
/// resource API: every registered proxy's admin address as a [`ScrapeTarget`].
pub const HTTP_SD_PATH: &str = "/v1/prometheus/targets";

/// One message of a watch stream: the whole current value of the watched key.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Update<T> {
    /// Grows with every change the control plane makes to anything it serves; a proxy ignores an
    /// update whose version is not newer than the one it holds.
    pub version: u64,
    /// The value; `None` when the key does not exist (an unknown authority or service).
    pub value: Option<T>,
}

/// A Kubernetes-style service port: `<name>.<namespace>:<port>`, the unit that routes attach to
/// (an HTTPRoute parentRef) and that backends name (a backendRef). Its names are shared
/// [`Name`]s: a proxy holds the same service in its route table, its endpoint lists and its
/// address index, and one namespace in every reference of it.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ServiceRef {
    /// Service name.
    pub name: Name,
    /// Namespace; `default` in the embedded mesh unless a resource says otherwise.
    pub namespace: Name,
    /// Service port.
    pub port: u16,
}

/// Why a string is not a `<name>.<namespace>:<port>` service reference.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid service reference {input:?}: expected <name>.<namespace>:<port>")]
pub struct ServiceRefError {
    input: String,
}

impl ServiceRef {
    /// A service reference.
    pub fn new(name: impl Into<Name>, namespace: impl Into<Name>, port: u16) -> Self {
        Self {
            name: name.into(),
            namespace: namespace.into(),
            port,
        }
    }

    /// The authority clients use to reach this service: `<name>.<namespace>:<port>`.
    pub fn authority(&self) -> String {
        self.to_string()
    }

    /// Parses `<name>.<namespace>:<port>`, making its names with `name`.
    fn parse(s: &str, name: impl Fn(&str) -> Name) -> Result<Self, ServiceRefError> {
        let err = || ServiceRefError { input: s.into() };
        let (host, port) = s.rsplit_once(':').ok_or_else(err)?;
        let port = port.parse().map_err(|_| err())?;
        let (n, namespace) = host.split_once('.').ok_or_else(err)?;
        if n.is_empty() || namespace.is_empty() || namespace.contains('.') {
            return Err(err());
        }
        Ok(Self::new(name(n), name(namespace), port))
    }
}

impl fmt::Display for ServiceRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}:{}", self.name, self.namespace, self.port)
    }
}

impl FromStr for ServiceRef {
    type Err = ServiceRefError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s, |n| Name::from(n))
    }
}

impl TryFrom<String> for ServiceRef {
    type Error = ServiceRefError;

    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<ServiceRef> for String {
    fn from(s: ServiceRef) -> Self {
        s.to_string()
    }
}

impl Serialize for ServiceRef {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

/// Decodes `<name>.<namespace>:<port>` from the decoder's own buffer when it can (no temporary
/// `String` per reference), with interned names.
impl<'de> Deserialize<'de> for ServiceRef {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = ServiceRef;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a service reference <name>.<namespace>:<port>")
            }

            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<ServiceRef, E> {
                ServiceRef::parse(v, Name::intern).map_err(E::custom)
            }
        }
        deserializer.deserialize_str(Visitor)
    }
}

/// Decodes a list into an allocation of exactly its length. A decoder that is not told a
/// list's length (JSON's and YAML's are not) grows it to room for four, and giving the room
/// back in place (`shrink_to_fit`) leaves the rest as a hole between the neighbours decoded
/// after it: a proxy holding 10,000 route tables and endpoint lists kept 8.7 MB of such
/// holes beside 11.4 MB of data. Copied out at once, the grown buffer is freed whole and the
/// next list decoded takes it again.
fn exact<'de, D, T>(deserializer: D) -> Result<Vec<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    let grown = Vec::<T>::deserialize(deserializer)?;
    if grown.capacity() == grown.len() {
        return Ok(grown);
    }
    let mut exact = Vec::with_capacity(grown.len());
    exact.extend(grown);
    Ok(exact)
}

/// The outbound routes of one authority, in the Gateway API HTTPRoute model. Rules are tried in
/// order; the first whose match succeeds handles the request. No rule matching is a 404 from the
/// proxy; an authority with no HTTPRoute gets one catch-all rule to its own service.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RouteTable {
    /// The service these routes are attached to (the HTTPRoute parentRef).
    pub parent: ServiceRef,
    /// Rules, in precedence order (the control plane sorts them as Gateway API says).
    #[serde(deserialize_with = "exact")]
    pub rules: Vec<RouteRule>,
}

/// One HTTPRoute rule.
#[derive(Clone, Debug, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RouteRule {
    /// Route name for metrics (`<httproute name>` or `default`); bounded by the number of routes.
    #[serde(default)]
    pub name: Name,
    /// Any match selects the rule; an empty list matches every request.
    #[serde(default, deserialize_with = "exact")]
    pub matches: Vec<RouteMatch>,
    /// Filters applied in order before a backend is picked.
    #[serde(default, deserialize_with = "exact")]
    pub filters: Vec<RouteFilter>,
    /// Backends picked per request in proportion to weight.
    #[serde(deserialize_with = "exact")]
    pub backends: Vec<WeightedBackend>,
    /// Filters of each backend (Gateway API backendRef filters), in the order of `backends`,
    /// applied to an attempt once its backend is picked; empty when no backend has any.
    #[serde(
        default,
        skip_serializing_if = "Vec::is_empty",
        deserialize_with = "exact"
    )]
    pub backend_filters: Vec<Vec<RouteFilter>>,
    /// Timeout for the whole request including retries, in milliseconds; none means no timeout.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
    /// Retry policy; none means no retries. Boxed: most rules have none, and a rule is held
    /// for every route table a proxy knows (inline, it was a quarter of the rule's size).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry: Option<Box<RetryPolicy>>,
}

/// Conditions that must all hold for a request to match.
#[derive(Clone, Debug, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RouteMatch {
    /// Path condition.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<PathMatch>,
    /// Header conditions (names case-insensitive).
    #[serde(
        default,
        skip_serializing_if = "Vec::is_empty",
        deserialize_with = "exact"
    )]
    pub headers: Vec<ValueMatch>,
    /// Query-parameter conditions.
    #[serde(
        default,
        skip_serializing_if = "Vec::is_empty",
        deserialize_with = "exact"
    )]
    pub query_params: Vec<ValueMatch>,
    /// HTTP method, upper case.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
}

/// A path condition.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", content = "value")]
pub enum PathMatch {
    /// The path equals the value.
    Exact(String),
    /// The path starts with the value, at a `/` boundary (Gateway API semantics).
    PathPrefix(String),
    /// The whole path matches the regular expression.
    RegularExpression(String),
}

/// A header or query-parameter condition.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ValueMatch {
    /// Header or parameter name.
    pub name: String,
    /// Exact value, or a regular expression when `regex` is true.
    pub value: String,
    /// Treat `value` as a regular expression matching the whole value.
    #[serde(default)]
    pub regex: bool,
}

/// A rule filter.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "camelCase")]
pub enum RouteFilter {
    /// Gateway API RequestHeaderModifier.
    RequestHeaderModifier {
        /// Headers set (replacing existing values).
        #[serde(default)]
        set: BTreeMap<String, String>,
        /// Headers added (kept beside existing values).
        #[serde(default)]
        add: BTreeMap<String, String>,
        /// Header names removed.
        #[serde(default)]
        remove: Vec<String>,
    },
    /// Gateway API ResponseHeaderModifier: applied to the response on its way back to the app.
    ResponseHeaderModifier {
        /// Headers set (replacing existing values).
        #[serde(default)]
        set: BTreeMap<String, String>,
        /// Headers added (kept beside existing values).
        #[serde(default)]
        add: BTreeMap<String, String>,
        /// Header names removed.
        #[serde(default)]
        remove: Vec<String>,
    },
    /// Gateway API RequestRedirect: the proxy answers with a redirect and forwards nothing.
    RequestRedirect(Redirect),
    /// Gateway API URLRewrite: the request's host and/or path change before it is forwarded.
    UrlRewrite {
        /// Replaces the `Host` header (and the authority of an absolute-form URI).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        hostname: Option<String>,
        /// Rewrites the path.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        path: Option<PathModifier>,
    },
    /// Gateway API RequestMirror: a copy of a share of the rule's requests goes to another
    /// service, fire and forget; its answer is discarded and never delays or fails the original.
    RequestMirror {
        /// The service the copies go to.
        backend: ServiceRef,
        /// Share of requests mirrored, 0-100.
        #[serde(default = "all_requests")]
        percent: f64,
    },
    /// Fault injection for testing resilience: abort and/or delay a share of requests.
    Fault {
        /// Answer this share of requests with a status instead of forwarding them.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        abort: Option<FaultAbort>,
        /// Delay this share of requests before forwarding them.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        delay: Option<FaultDelay>,
    },
}

/// A Gateway API RequestRedirect: each part left out keeps the request's own.
#[derive(Clone, Debug, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Redirect {
    /// `http` or `https`; the request's scheme when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scheme: Option<String>,
    /// The host; the request's when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    /// The port; when absent, the scheme's well-known port if `scheme` is set, else the
    /// request's port. A scheme's well-known port is left out of the `Location`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// Rewrites the path; the request's path when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<PathModifier>,
    /// 301, 302 (the default), 303, 307 or 308.
    #[serde(default = "default_redirect_status")]
    pub status_code: u16,
}

fn all_requests() -> f64 {
    100.0
}

fn default_redirect_status() -> u16 {
    302
}

/// How a redirect or rewrite changes the path (Gateway API HTTPPathModifier).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", content = "value")]
pub enum PathModifier {
    /// The whole path becomes the value.
    ReplaceFullPath(String),
    /// The part of the path the rule's PathPrefix match matched becomes the value.
    ReplacePrefixMatch(String),
}

/// The abort half of a fault filter.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FaultAbort {
    /// Status returned.
    pub status: u16,
    /// Share of requests aborted, 0-100.
    pub percent: f64,
}

/// The delay half of a fault filter.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FaultDelay {
    /// Added delay in milliseconds.
    pub delay_ms: u64,
    /// Share of requests delayed, 0-100.
    pub percent: f64,
}

/// A backend and its weight. Weights are relative; 0 receives nothing, and a backend with no
/// ready endpoints is treated as weight 0 for that pick.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WeightedBackend {
    /// The backend service.
    pub service: ServiceRef,
    /// Relative weight.
    pub weight: u32,
}

/// Retries of one rule, bounded by a budget so retries cannot multiply load during an outage.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RetryPolicy {
    /// Response statuses that are retried (connection failures always are).
    pub statuses: Vec<u16>,
    /// Most retries of one request.
    #[serde(default = "default_attempts")]
    pub max_retries: u32,
    /// The retry budget.
    #[serde(default)]
    pub budget: RetryBudget,
}

fn default_attempts() -> u32 {
    2
}

/// Linkerd's retry budget: retries may add at most `ratio` of the original requests seen over
/// `ttl_ms`, plus `min_per_second` regardless of traffic.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RetryBudget {
    /// Extra load retries may add, as a share of requests (0.2 = 20 %).
    pub ratio: f64,
    /// Retries always allowed per second.
    pub min_per_second: u32,
    /// Window over which requests are counted, in milliseconds.
    pub ttl_ms: u64,
}

impl Default for RetryBudget {
    fn default() -> Self {
        Self {
            ratio: 0.2,
            min_per_second: 10,
            ttl_ms: 10_000,
        }
    }
}

/// The ready endpoints of one backend service.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Endpoints {
    /// The service.
    pub service: ServiceRef,
    /// Its ready endpoints; empty means the backend is unavailable.
    #[serde(deserialize_with = "exact")]
    pub endpoints: Vec<Endpoint>,
}

/// One endpoint of a service.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Endpoint {
    /// Where to connect: the peer proxy's inbound listener when `identity` is set (meshed), else
    /// the app itself.
    pub addr: SocketAddr,
    /// SPIFFE ID the peer must present over mTLS; none means plaintext (unmeshed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity: Option<Name>,
    /// Workload labels (for example `version`), shown in `/config` and metrics.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// The workload's owner ([`WorkloadRegistration::deployment`]): the `dst_deployment` label
    /// of requests sent to this endpoint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deployment: Option<Name>,
}

/// What an address (a redirected connection's original destination) is in the mesh: a
/// service's own address (its Kubernetes ClusterIP and port, or an address a static config
/// gives it), or one endpoint of a service (a registered workload's address, a pod's IP and
/// port). Addresses the mesh does not know are answered with no value.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MeshAddress {
    /// The service the address belongs to; HTTP to it is routed by its route table.
    pub service: ServiceRef,
    /// Set when the address is one endpoint of the service: opaque connections go to that
    /// endpoint (over mTLS when it has an identity) instead of being split across the service.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<Endpoint>,
}

/// A service's own address in a static config (what a ClusterIP is in Kubernetes).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServiceAddress {
    /// The address apps connect to.
    pub addr: SocketAddr,
    /// The service it stands for.
    pub service: ServiceRef,
}

/// A proxy's static configuration file (`mesh-proxy --config FILE`), used standalone and in tests
/// instead of the control plane's streams.
#[derive(Clone, Debug, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StaticConfig {
    /// Route tables by authority.
    #[serde(default)]
    pub routes: Vec<RouteTable>,
    /// Endpoints by service.
    #[serde(default)]
    pub endpoints: Vec<Endpoints>,
    /// Services' own addresses, so redirected connections to them are routed (endpoint
    /// addresses are known from `endpoints`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub addresses: Vec<ServiceAddress>,
}

/// A proxy asks for a certificate.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CertifyRequest {
    /// Bootstrap token: in the embedded mesh the token file the control plane wrote at start; in
    /// Kubernetes a projected ServiceAccount token.
    pub token: String,
    /// PEM PKCS#10 CSR; its key never leaves the proxy. The SAN is set by the control plane.
    pub csr_pem: String,
    /// The identity asked for, `spiffe://<trust-domain>/ns/<ns>/sa/<sa>`; the control plane
    /// checks the token allows it.
    pub identity: String,
}

/// The control plane's answer to a [`CertifyRequest`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CertifyResponse {
    /// Leaf certificate followed by any intermediates, PEM.
    pub certificate_chain_pem: String,
    /// Trust roots proxies verify peers against, PEM.
    pub trust_roots_pem: String,
    /// Expiry of the leaf, RFC 3339.
    pub not_after: String,
    /// Seconds of validity at issue; the proxy renews at 70 % of it.
    pub lifetime_seconds: u64,
}

/// A sidecar registers the workload next to it; endpoints of a service are derived from these.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WorkloadRegistration {
    /// The service whose endpoints this workload joins (for a canary, `<svc>-canary`).
    pub service: ServiceRef,
    /// Address peers connect to (the sidecar's inbound listener).
    pub addr: SocketAddr,
    /// The workload's SPIFFE ID.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity: Option<String>,
    /// Labels, such as `version`.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// The proxy's admin server (`/metrics`, `/ready`), where Prometheus and `mesh` scrape it;
    /// absent from proxies older than this field, which are then not scrape targets.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub admin_addr: Option<SocketAddr>,
    /// The workload's owner, Linkerd's `deployment` label (in the embedded mesh, the arm:
    /// `<target>` for the canary, `<target>-primary` for the primary); peers label what they
    /// send to this endpoint `dst_deployment` with it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deployment: Option<String>,
    /// The instance, Linkerd's `pod` label.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<String>,
}

impl WorkloadRegistration {
    /// Where Prometheus scrapes this workload's proxy, with what it knows of the workload as
    /// `__meta_mesh_*` labels; `None` when the proxy did not send its admin address.
    ///
    /// The labels are meta labels (dropped after relabeling unless a rule keeps them) because
    /// the proxy already writes `namespace`, `deployment` and `pod` on its own series when it
    /// knows them; target labels of the same names would rename those to `exported_*`.
    pub fn scrape_target(&self) -> Option<ScrapeTarget> {
        let admin = self.admin_addr?;
        let mut labels = BTreeMap::new();
        let mut put = |name: &str, value: &str| {
            labels.insert(format!("{SD_META_PREFIX}{name}"), value.to_string());
        };
        put("namespace", &self.service.namespace);
        put("service", &self.service.name);
        put("authority", &self.service.to_string());
        put("addr", &self.addr.to_string());
        if let Some(d) = &self.deployment {
            put("deployment", d);
        }
        if let Some(p) = &self.pod {
            put("pod", p);
        }
        if let Some(id) = &self.identity {
            put("identity", id);
        }
        for (k, v) in &self.labels {
            put(&format!("label_{}", sd_label_name(k)), v);
        }
        Some(ScrapeTarget {
            targets: vec![admin.to_string()],
            labels,
        })
    }
}

/// The prefix of the labels [`WorkloadRegistration::scrape_target`] gives a target.
pub const SD_META_PREFIX: &str = "__meta_mesh_";

/// A workload label's key as a Prometheus label name: anything but `[a-zA-Z0-9_]` becomes `_`.
fn sd_label_name(key: &str) -> String {
    key.chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect()
}

/// One target group of Prometheus HTTP service discovery, in its JSON shape
/// (`[{"targets": ["host:port"], "labels": {...}}]`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScrapeTarget {
    /// `host:port` of the proxy's admin server.
    pub targets: Vec<String>,
    /// `__meta_mesh_*` labels: `namespace`, `service`, `authority`, `addr` (the inbound
    /// address), `deployment`, `pod`, `identity` when known, and `label_<key>` per workload label.
    pub labels: BTreeMap<String, String>,
}

/// The key of a policy watch: one inbound port of a workload, which `Server`s select by the
/// workload's namespace and labels.
#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PolicyTarget {
    /// The workload's namespace.
    pub namespace: String,
    /// The port the workload is called on.
    pub port: u16,
    /// The workload's labels.
    pub labels: BTreeMap<String, String>,
}

impl PolicyTarget {
    /// The labels as the `labels` query parameter: `k=v` pairs joined by commas.
    pub fn labels_param(&self) -> String {
        self.labels
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(",")
    }
}

/// Reads labels written `key=value,key=value` (the `labels` query parameter of a policy watch,
/// and the proxy's `MESH_PROXY_WORKLOAD_LABELS`); blanks around entries are ignored, an empty
/// key is not.
pub fn parse_labels(list: &str) -> Result<BTreeMap<String, String>, String> {
    list.split(',')
        .map(str::trim)
        .filter(|entry| !entry.is_empty())
        .map(|entry| match entry.split_once('=') {
            Some((k, v)) if !k.trim().is_empty() => {
                Ok((k.trim().to_string(), v.trim().to_string()))
            }
            _ => Err(format!("{entry:?} is not key=value")),
        })
        .collect()
}

/// The control plane's answer to a registration.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WorkloadLease {
    /// Lease id used in heartbeat paths.
    pub id: String,
    /// The workload drops out of endpoints if no heartbeat arrives for this long.
    pub ttl_seconds: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A decoded table holds its lists in allocations of their length, and its names shared:
    /// what keeps a proxy with 10,000 services from carrying holes and copies.
    #[test]
    fn decoded_tables_hold_exact_lists_and_shared_names() {
        let config: StaticConfig = serde_json::from_str(
            r#"{"routes": [{"parent": "web.shop:80", "rules": [{"name": "main",
                "matches": [{"headers": [{"name": "x", "value": "1"}]}],
                "backends": [{"service": "web-v1.shop:80", "weight": 1}]}]}],
              "endpoints": [{"service": "web-v1.shop:80", "endpoints": [
                {"addr": "10.0.0.1:80", "identity": "spiffe://cluster.local/ns/shop/sa/web"},
                {"addr": "10.0.0.2:80", "identity": "spiffe://cluster.local/ns/shop/sa/web"}]}]}"#,
        )
        .unwrap();
        let table = &config.routes[0];
        let rule = &table.rules[0];
        assert_eq!(table.rules.capacity(), 1);
        assert_eq!(rule.backends.capacity(), 1);
        assert_eq!(rule.matches.capacity(), 1);
        assert_eq!(rule.matches[0].headers.capacity(), 1);
        let endpoints = &config.endpoints[0];
        assert_eq!(endpoints.endpoints.capacity(), 2);
        // One namespace and one identity, however often they are named.
        let id = |i: usize| -> std::sync::Arc<str> {
            endpoints.endpoints[i].identity.clone().unwrap().into()
        };
        assert!(std::sync::Arc::ptr_eq(&id(0), &id(1)));
        let ns: std::sync::Arc<str> = table.parent.namespace.clone().into();
        let backend_ns: std::sync::Arc<str> = endpoints.service.namespace.clone().into();
        assert!(std::sync::Arc::ptr_eq(&ns, &backend_ns));
        // A bad reference still says what is wrong.
        let err = serde_json::from_str::<ServiceRef>("\"web:80\"").unwrap_err();
        assert!(
            err.to_string()
                .contains("expected <name>.<namespace>:<port>"),
            "{err}"
        );
    }

    #[test]
    fn service_refs_round_trip_and_reject_garbage() {
        let s: ServiceRef = "web.default:8080".parse().unwrap();
        assert_eq!(s, ServiceRef::new("web", "default", 8080));
        assert_eq!(s.to_string(), "web.default:8080");
        for bad in [
            "web:80",
            "web.default",
            "web.default:http",
            ".default:80",
            "a.b.c:80",
        ] {
            assert!(bad.parse::<ServiceRef>().is_err(), "{bad} parsed");
        }
    }

    #[test]
    fn a_registration_with_an_admin_address_is_a_scrape_target() {
        let json = r#"{"service": "web-canary.shop:80", "addr": "127.0.0.1:4143",
                      "adminAddr": "127.0.0.1:4191", "deployment": "web", "pod": "web-v2-0",
                      "labels": {"app.kubernetes.io/version": "v2"}}"#;
        let reg: WorkloadRegistration = serde_json::from_str(json).unwrap();
        let target = reg.scrape_target().unwrap();
        assert_eq!(target.targets, ["127.0.0.1:4191"]);
        let label = |k: &str| target.labels.get(k).map(String::as_str);
        assert_eq!(label("__meta_mesh_namespace"), Some("shop"));
        assert_eq!(label("__meta_mesh_deployment"), Some("web"));
        assert_eq!(label("__meta_mesh_pod"), Some("web-v2-0"));
        assert_eq!(label("__meta_mesh_service"), Some("web-canary"));
        assert_eq!(
            label("__meta_mesh_label_app_kubernetes_io_version"),
            Some("v2")
        );
        // An older proxy, without the field: no target.
        let old: WorkloadRegistration =
            serde_json::from_str(r#"{"service": "web.shop:80", "addr": "127.0.0.1:4143"}"#)
                .unwrap();
        assert_eq!(old.scrape_target(), None);
    }

    #[test]
    fn static_config_reads_from_yaml_shape() {
        let json = r#"{
          "routes": [{"parent": "web.default:80", "rules": [{
            "matches": [{"path": {"type": "PathPrefix", "value": "/api"}, "method": "GET"}],
            "filters": [{"type": "fault", "abort": {"status": 503, "percent": 10.0}}],
            "backends": [{"service": "web-primary.default:80", "weight": 90},
                         {"service": "web-canary.default:80", "weight": 10}],
            "timeoutMs": 2000,
            "retry": {"statuses": [503]}
          }]}],
          "endpoints": [{"service": "web-primary.default:80",
                         "endpoints": [{"addr": "127.0.0.1:9000", "labels": {"version": "v1"}}]}]
        }"#;
        let cfg: StaticConfig = serde_json::from_str(json).unwrap();
        let rule = &cfg.routes[0].rules[0];
        assert_eq!(rule.backends[1].weight, 10);
        assert_eq!(rule.retry.as_ref().unwrap().max_retries, 2);
        assert_eq!(rule.retry.as_ref().unwrap().budget, RetryBudget::default());
        assert_eq!(
            rule.matches[0].path,
            Some(PathMatch::PathPrefix("/api".into()))
        );
        let back: StaticConfig =
            serde_json::from_str(&serde_json::to_string(&cfg).unwrap()).unwrap();
        assert_eq!(back, cfg);
    }
}
