//! The discovery index: a pure structure that turns HTTPRoutes and workload registrations into
//! what proxies are told, a [`RouteTable`] per authority and [`Endpoints`] per service.
//!
//! It also answers what an address is in the mesh ([`MeshAddress`]), for proxies that see a
//! redirected connection's original destination: a Service's ClusterIP and port (fed from the
//! cluster, [`Index::reset_service_addresses`]) or a registered workload's address.
//!
//! Store events and registrations come in through `apply`/`delete`/`reset`; every watched key is
//! recomputed and republished through a `tokio::sync::watch` channel only when its value
//! changed, stamped with a version that grows with every change. A watch channel keeps just the
//! newest value, which is exactly the protocol's promise (each update carries the whole value),
//! so a slow proxy skips intermediate states instead of queueing them.
//!
//! Routing follows Gateway API's GAMMA profile: an HTTPRoute attaches to a Service through a
//! parentRef of kind `Service`; without a port it applies to every port of the service. Rules
//! are expanded to one entry per match and ordered by Gateway API precedence (exact path, then
//! longest prefix, then method, header and query-parameter counts), ties going to the older
//! route, then to the route's namespace/name, then to rule order.

use std::{cmp::Reverse, collections::BTreeMap};

use std::net::SocketAddr;

use mesh_core::Name;
use mesh_core::proxy_api::{
    Endpoint, Endpoints, MeshAddress, PathMatch, PathModifier, Redirect, RouteFilter, RouteMatch,
    RouteRule, RouteTable, ServiceRef, ValueMatch, WeightedBackend, WorkloadRegistration,
};
use mesh_crds::{GrpcRoute, HttpRoute};
use serde_json::Value;
use tokio::sync::watch;

use crate::publish::{Published, send_changed};

#[derive(Clone, Debug, PartialEq)]
struct Parent {
    name: String,
    namespace: String,
    port: Option<u16>,
}

#[derive(Clone, Debug, PartialEq)]
struct Backend {
    /// Its backendRef filters (request header modifiers).
    filters: Vec<RouteFilter>,
    name: String,
    namespace: String,
    port: Option<u16>,
    weight: u32,
}

#[derive(Clone, Debug, PartialEq)]
struct Rule {
    matches: Vec<RouteMatch>,
    filters: Vec<RouteFilter>,
    backends: Vec<Backend>,
    timeout_ms: Option<u64>,
}

#[derive(Clone, Debug, PartialEq)]
struct IndexedRoute {
    name: String,
    created: String,
    parents: Vec<Parent>,
    rules: Vec<Rule>,
}

/// The discovery index.
#[derive(Debug)]
pub struct Index {
    version: u64,
    routes: BTreeMap<(String, String), IndexedRoute>,
    /// GRPCRoutes, in the same shape: a gRPC method is a path.
    grpc_routes: BTreeMap<(String, String), IndexedRoute>,
    workloads: BTreeMap<String, WorkloadRegistration>,
    /// Per authority and the namespace of the proxies asking (consumer routes differ by it).
    route_watches: BTreeMap<(ServiceRef, Option<String>), watch::Sender<Published<RouteTable>>>,
    endpoint_watches: BTreeMap<ServiceRef, watch::Sender<Published<Endpoints>>>,
    service_addrs: BTreeMap<SocketAddr, ServiceRef>,
    address_watches: BTreeMap<SocketAddr, watch::Sender<Published<MeshAddress>>>,
}

fn is_core_service(group: Option<&str>, kind: Option<&str>, default_kind: &str) -> bool {
    group.is_none_or(str::is_empty) && kind.unwrap_or(default_kind) == "Service"
}

fn port(p: Option<i32>) -> Option<u16> {
    p.and_then(|p| u16::try_from(p).ok())
}

fn convert(route: &HttpRoute) -> IndexedRoute {
    let namespace = route.metadata.namespace.clone().unwrap_or_default();
    let parents = route
        .spec
        .parent_refs
        .iter()
        .flatten()
        // A parentRef's kind defaults to Gateway; only Service parents are mesh routes.
        .filter(|p| is_core_service(p.group.as_deref(), p.kind.as_deref(), "Gateway"))
        .map(|p| Parent {
            name: p.name.clone(),
            namespace: p.namespace.clone().unwrap_or_else(|| namespace.clone()),
            port: port(p.port),
        })
        .collect();
    let rules = route
        .spec
        .rules
        .iter()
        .flatten()
        .map(|rule| Rule {
            matches: rule
                .matches
                .iter()
                .flatten()
                .map(|m| convert_match(m, &namespace))
                .collect(),
            filters: rule
                .filters
                .iter()
                .flatten()
                .filter_map(|f| convert_filter(f, &namespace))
                .collect(),
            backends: rule
                .backend_refs
                .iter()
                .flatten()
                .filter(|b| is_core_service(b.group.as_deref(), b.kind.as_deref(), "Service"))
                .map(|b| Backend {
                    filters: b
                        .filters
                        .iter()
                        .flatten()
                        .filter_map(|f| {
                            let m = f.request_header_modifier.as_ref()?;
                            let (set, add, remove) = header_lists(
                                m.set.iter().flatten().map(|h| (&h.name, &h.value)),
                                m.add.iter().flatten().map(|h| (&h.name, &h.value)),
                                m.remove.as_ref(),
                            );
                            Some(RouteFilter::RequestHeaderModifier { set, add, remove })
                        })
                        .collect(),
                    name: b.name.clone(),
                    namespace: b.namespace.clone().unwrap_or_else(|| namespace.clone()),
                    port: port(b.port),
                    weight: b.weight.map_or(1, |w| u32::try_from(w).unwrap_or(0)),
                })
                .collect(),
            timeout_ms: rule
                .timeouts
                .as_ref()
                .and_then(|t| t.request.as_deref())
                .and_then(mesh_crds::validate::parse_duration_ms)
                // Gateway API: a zero timeout disables it.
                .filter(|ms| *ms > 0),
        })
        .collect();
    IndexedRoute {
        name: route.metadata.name.clone().unwrap_or_default(),
        created: route
            .metadata
            .creation_timestamp
            .as_ref()
            .and_then(|t| serde_json::to_value(t).ok())
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_default(),
        parents,
        rules,
    }
}

/// A header modifier's `set`, `add` and `remove`, from any of the generated modifier types.
fn header_lists<'a>(
    set: impl Iterator<Item = (&'a String, &'a String)>,
    add: impl Iterator<Item = (&'a String, &'a String)>,
    remove: Option<&Vec<String>>,
) -> (
    BTreeMap<String, String>,
    BTreeMap<String, String>,
    Vec<String>,
) {
    let own = |(k, v): (&String, &String)| (k.clone(), v.clone());
    (
        set.map(own).collect(),
        add.map(own).collect(),
        remove.cloned().unwrap_or_default(),
    )
}

/// A RequestMirror filter's backendRef, of an HTTPRoute or a GRPCRoute.
#[derive(Clone, Copy)]
struct MirrorRef<'a> {
    group: Option<&'a str>,
    kind: Option<&'a str>,
    name: &'a str,
    /// The backendRef's namespace, else the route's.
    namespace: &'a str,
    port: Option<i32>,
}

/// A RequestMirror filter as proxies apply it; `None` when its backendRef is not a Service with
/// a port.
fn mirror_filter(
    backend: MirrorRef<'_>,
    percent: Option<i32>,
    fraction: Option<(i32, Option<i32>)>,
) -> Option<RouteFilter> {
    if !is_core_service(backend.group, backend.kind, "Service") {
        return None;
    }
    Some(RouteFilter::RequestMirror {
        backend: ServiceRef::new(backend.name, backend.namespace, port(backend.port)?),
        percent: mesh_core::routing::mirror_percent(percent, fraction),
    })
}

/// A rule filter as proxies apply it; `None` for kinds the mesh does not carry (CORS,
/// extension refs), which docs/gateway-api.md lists, and for a mirror whose backendRef is not
/// a Service with a port. `namespace` is the route's, the default for a mirror's backendRef.
fn convert_filter(
    f: &gateway_api_types::HttpRouteRulesFilters,
    namespace: &str,
) -> Option<RouteFilter> {
    use gateway_api_types::{
        HttpRouteRulesFiltersRequestRedirectPathType as R,
        HttpRouteRulesFiltersRequestRedirectScheme as Scheme,
        HttpRouteRulesFiltersUrlRewritePathType as W,
    };
    if let Some(m) = &f.request_header_modifier {
        let (set, add, remove) = header_lists(
            m.set.iter().flatten().map(|h| (&h.name, &h.value)),
            m.add.iter().flatten().map(|h| (&h.name, &h.value)),
            m.remove.as_ref(),
        );
        return Some(RouteFilter::RequestHeaderModifier { set, add, remove });
    }
    if let Some(m) = &f.response_header_modifier {
        let (set, add, remove) = header_lists(
            m.set.iter().flatten().map(|h| (&h.name, &h.value)),
            m.add.iter().flatten().map(|h| (&h.name, &h.value)),
            m.remove.as_ref(),
        );
        return Some(RouteFilter::ResponseHeaderModifier { set, add, remove });
    }
    if let Some(r) = &f.request_redirect {
        let path = r.path.as_ref().and_then(|p| match p.r#type {
            R::ReplaceFullPath => p
                .replace_full_path
                .clone()
                .map(PathModifier::ReplaceFullPath),
            R::ReplacePrefixMatch => p
                .replace_prefix_match
                .clone()
                .map(PathModifier::ReplacePrefixMatch),
        });
        return Some(RouteFilter::RequestRedirect(Redirect {
            scheme: r.scheme.as_ref().map(|s| {
                match s {
                    Scheme::Http => "http",
                    Scheme::Https => "https",
                }
                .to_string()
            }),
            hostname: r.hostname.clone(),
            port: port(r.port),
            path,
            status_code: r
                .status_code
                .and_then(|c| u16::try_from(c).ok())
                .unwrap_or(302),
        }));
    }
    if let Some(m) = &f.request_mirror {
        let b = &m.backend_ref;
        return mirror_filter(
            MirrorRef {
                group: b.group.as_deref(),
                kind: b.kind.as_deref(),
                name: &b.name,
                namespace: b.namespace.as_deref().unwrap_or(namespace),
                port: b.port,
            },
            m.percent,
            m.fraction.as_ref().map(|f| (f.numerator, f.denominator)),
        );
    }
    if let Some(w) = &f.url_rewrite {
        let path = w.path.as_ref().and_then(|p| match p.r#type {
            W::ReplaceFullPath => p
                .replace_full_path
                .clone()
                .map(PathModifier::ReplaceFullPath),
            W::ReplacePrefixMatch => p
                .replace_prefix_match
                .clone()
                .map(PathModifier::ReplacePrefixMatch),
        });
        return Some(RouteFilter::UrlRewrite {
            hostname: w.hostname.clone(),
            path,
        });
    }
    None
}

/// A GRPCRoute as the same rules an HTTPRoute makes: gRPC calls are HTTP/2 POSTs to
/// `/<service>/<method>`, so a method match is a path match (exact for a service and method,
/// a prefix for a service alone, a regular expression otherwise) and header matches carry over.
/// A route's key in the index: its namespace and name.
fn route_key(
    meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
) -> (String, String) {
    (
        meta.namespace.clone().unwrap_or_default(),
        meta.name.clone().unwrap_or_default(),
    )
}

fn convert_grpc(route: &GrpcRoute) -> IndexedRoute {
    use gateway_api::apis::standard::grpcroutes::{
        GrpcRouteRulesMatchesHeadersType as H, GrpcRouteRulesMatchesMethodType as M,
    };
    let namespace = route.metadata.namespace.clone().unwrap_or_default();
    let parents = route
        .spec
        .parent_refs
        .iter()
        .flatten()
        .filter(|p| is_core_service(p.group.as_deref(), p.kind.as_deref(), "Gateway"))
        .map(|p| Parent {
            name: p.name.clone(),
            namespace: p.namespace.clone().unwrap_or_else(|| namespace.clone()),
            port: port(p.port),
        })
        .collect();
    let rules = route
        .spec
        .rules
        .iter()
        .flatten()
        .map(|rule| Rule {
            matches: rule
                .matches
                .iter()
                .flatten()
                .map(|m| {
                    let path = m.method.as_ref().and_then(|method| {
                        let service = method.service.as_deref().filter(|s| !s.is_empty());
                        let name = method.method.as_deref().filter(|s| !s.is_empty());
                        match (method.r#type.as_ref().unwrap_or(&M::Exact), service, name) {
                            (_, None, None) => None,
                            (M::Exact, Some(s), Some(n)) => {
                                Some(PathMatch::Exact(format!("/{s}/{n}")))
                            }
                            (M::Exact, Some(s), None) => {
                                Some(PathMatch::PathPrefix(format!("/{s}")))
                            }
                            (M::Exact, None, Some(n)) => Some(PathMatch::RegularExpression(
                                format!("/[^/]+/{}", regex_escape(n)),
                            )),
                            (M::RegularExpression, s, n) => Some(PathMatch::RegularExpression(
                                format!("/{}/{}", s.unwrap_or("[^/]+"), n.unwrap_or("[^/]+")),
                            )),
                        }
                    });
                    RouteMatch {
                        path,
                        headers: m
                            .headers
                            .iter()
                            .flatten()
                            .map(|h| ValueMatch {
                                name: h.name.clone(),
                                value: h.value.clone(),
                                regex: matches!(h.r#type, Some(H::RegularExpression)),
                            })
                            .collect(),
                        ..RouteMatch::default()
                    }
                })
                .collect(),
            filters: rule
                .filters
                .iter()
                .flatten()
                .filter_map(|f| {
                    if let Some(m) = &f.request_header_modifier {
                        let (set, add, remove) = header_lists(
                            m.set.iter().flatten().map(|h| (&h.name, &h.value)),
                            m.add.iter().flatten().map(|h| (&h.name, &h.value)),
                            m.remove.as_ref(),
                        );
                        return Some(RouteFilter::RequestHeaderModifier { set, add, remove });
                    }
                    if let Some(m) = &f.request_mirror {
                        let b = &m.backend_ref;
                        return mirror_filter(
                            MirrorRef {
                                group: b.group.as_deref(),
                                kind: b.kind.as_deref(),
                                name: &b.name,
                                namespace: b.namespace.as_deref().unwrap_or(namespace.as_str()),
                                port: b.port,
                            },
                            m.percent,
                            m.fraction.as_ref().map(|f| (f.numerator, f.denominator)),
                        );
                    }
                    let m = f.response_header_modifier.as_ref()?;
                    let (set, add, remove) = header_lists(
                        m.set.iter().flatten().map(|h| (&h.name, &h.value)),
                        m.add.iter().flatten().map(|h| (&h.name, &h.value)),
                        m.remove.as_ref(),
                    );
                    Some(RouteFilter::ResponseHeaderModifier { set, add, remove })
                })
                .collect(),
            backends: rule
                .backend_refs
                .iter()
                .flatten()
                .filter(|b| is_core_service(b.group.as_deref(), b.kind.as_deref(), "Service"))
                .map(|b| Backend {
                    filters: Vec::new(),
                    name: b.name.clone(),
                    namespace: b.namespace.clone().unwrap_or_else(|| namespace.clone()),
                    port: port(b.port),
                    weight: b.weight.map_or(1, |w| u32::try_from(w).unwrap_or(0)),
                })
                .collect(),
            timeout_ms: None,
        })
        .collect();
    IndexedRoute {
        name: route.metadata.name.clone().unwrap_or_default(),
        created: route
            .metadata
            .creation_timestamp
            .as_ref()
            .and_then(|t| serde_json::to_value(t).ok())
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_default(),
        parents,
        rules,
    }
}

/// `s` with regex metacharacters escaped, for a literal inside a pattern.
fn regex_escape(s: &str) -> String {
    s.chars()
        .flat_map(|c| {
            let special = "\\.+*?()|[]{}^$#&-~".contains(c);
            special
                .then_some('\\')
                .into_iter()
                .chain(std::iter::once(c))
        })
        .collect()
}

fn convert_match(m: &gateway_api_types::HttpRouteRulesMatches, _namespace: &str) -> RouteMatch {
    use gateway_api_types::{
        HttpRouteRulesMatchesHeadersType as H, HttpRouteRulesMatchesPathType as P,
        HttpRouteRulesMatchesQueryParamsType as Q,
    };
    let path = m.path.as_ref().map(|p| {
        let value = p.value.clone().unwrap_or_else(|| "/".into());
        match p.r#type {
            Some(P::Exact) => PathMatch::Exact(value),
            Some(P::RegularExpression) => PathMatch::RegularExpression(value),
            Some(P::PathPrefix) | None => PathMatch::PathPrefix(value),
        }
    });
    RouteMatch {
        path,
        headers: m
            .headers
            .iter()
            .flatten()
            .map(|h| ValueMatch {
                name: h.name.clone(),
                value: h.value.clone(),
                regex: matches!(h.r#type, Some(H::RegularExpression)),
            })
            .collect(),
        query_params: m
            .query_params
            .iter()
            .flatten()
            .map(|q| ValueMatch {
                name: q.name.clone(),
                value: q.value.clone(),
                regex: matches!(q.r#type, Some(Q::RegularExpression)),
            })
            .collect(),
        method: m.method.as_ref().and_then(|method| {
            serde_json::to_value(method)
                .ok()
                .and_then(|v| v.as_str().map(str::to_string))
        }),
    }
}

/// The generated HTTPRoute types, named once.
mod gateway_api_types {
    pub use gateway_api::apis::standard::httproutes::{
        HttpRouteRulesFilters, HttpRouteRulesFiltersRequestRedirectPathType,
        HttpRouteRulesFiltersRequestRedirectScheme, HttpRouteRulesFiltersUrlRewritePathType,
        HttpRouteRulesMatches, HttpRouteRulesMatchesHeadersType, HttpRouteRulesMatchesPathType,
        HttpRouteRulesMatchesQueryParamsType,
    };
}

/// Gateway API precedence of a match: larger sorts first.
fn precedence(m: Option<&RouteMatch>) -> (u8, usize, bool, usize, usize) {
    let Some(m) = m else {
        return (2, 1, false, 0, 0);
    };
    let (rank, len) = match &m.path {
        Some(PathMatch::Exact(p)) => (3, p.len()),
        Some(PathMatch::PathPrefix(p)) => (2, p.len()),
        Some(PathMatch::RegularExpression(p)) => (1, p.len()),
        None => (2, 1),
    };
    (
        rank,
        len,
        m.method.is_some(),
        m.headers.len(),
        m.query_params.len(),
    )
}

impl Index {
    /// An empty index whose first published version is `initial_version + 1`. The control plane
    /// seeds it from the clock so versions keep growing across its restarts, which proxies rely
    /// on to tell new values from old.
    pub fn new(initial_version: u64) -> Self {
        Self {
            version: initial_version,
            routes: BTreeMap::new(),
            grpc_routes: BTreeMap::new(),
            workloads: BTreeMap::new(),
            route_watches: BTreeMap::new(),
            endpoint_watches: BTreeMap::new(),
            service_addrs: BTreeMap::new(),
            address_watches: BTreeMap::new(),
        }
    }

    /// The version of the latest change.
    pub fn version(&self) -> u64 {
        self.version
    }

    /// Adds or replaces an HTTPRoute.
    pub fn apply_route(&mut self, route: &HttpRoute) {
        self.routes
            .insert(route_key(&route.metadata), convert(route));
        self.publish();
    }

    /// Adds or replaces a GRPCRoute.
    pub fn apply_grpc_route(&mut self, route: &GrpcRoute) {
        self.grpc_routes
            .insert(route_key(&route.metadata), convert_grpc(route));
        self.publish();
    }

    /// Removes a GRPCRoute.
    pub fn delete_grpc_route(&mut self, namespace: &str, name: &str) {
        if self
            .grpc_routes
            .remove(&(namespace.to_string(), name.to_string()))
            .is_some()
        {
            self.publish();
        }
    }

    /// Replaces every GRPCRoute, as after a relist.
    pub fn reset_grpc_routes(&mut self, routes: &[GrpcRoute]) {
        self.grpc_routes = routes
            .iter()
            .map(|r| (route_key(&r.metadata), convert_grpc(r)))
            .collect();
        self.publish();
    }

    /// Removes an HTTPRoute.
    pub fn delete_route(&mut self, namespace: &str, name: &str) {
        if self
            .routes
            .remove(&(namespace.to_string(), name.to_string()))
            .is_some()
        {
            self.publish();
        }
    }

    /// Replaces every HTTPRoute, as after a relist.
    pub fn reset_routes(&mut self, routes: &[HttpRoute]) {
        self.routes = routes
            .iter()
            .map(|r| (route_key(&r.metadata), convert(r)))
            .collect();
        self.publish();
    }

    /// Adds or replaces a workload registration.
    pub fn apply_workload(&mut self, id: &str, registration: WorkloadRegistration) {
        self.workloads.insert(id.to_string(), registration);
        self.publish();
    }

    /// Every registered proxy that sent its admin address, as Prometheus HTTP service discovery
    /// lists it, ordered by admin address.
    pub fn scrape_targets(&self) -> Vec<mesh_core::proxy_api::ScrapeTarget> {
        let mut targets: Vec<_> = self
            .workloads
            .values()
            .filter_map(WorkloadRegistration::scrape_target)
            .collect();
        targets.sort_by(|a, b| a.targets.cmp(&b.targets));
        targets.dedup_by(|a, b| a.targets == b.targets);
        targets
    }

    /// Removes a workload registration.
    pub fn delete_workload(&mut self, id: &str) {
        if self.workloads.remove(id).is_some() {
            self.publish();
        }
    }

    /// Follows the route table of `authority`.
    pub fn watch_routes(
        &mut self,
        authority: &ServiceRef,
    ) -> watch::Receiver<Published<RouteTable>> {
        self.watch_routes_from(authority, None)
    }

    /// Follows the route table of `authority` as proxies in namespace `client` see it (see
    /// [`Index::route_table_from`]).
    pub fn watch_routes_from(
        &mut self,
        authority: &ServiceRef,
        client: Option<&str>,
    ) -> watch::Receiver<Published<RouteTable>> {
        let key = (authority.clone(), client.map(str::to_string));
        if let Some(tx) = self.route_watches.get(&key) {
            return tx.subscribe();
        }
        let update = Published::new(self.version, self.route_table_from(authority, client));
        let (tx, rx) = watch::channel(update);
        self.route_watches.insert(key, tx);
        rx
    }

    /// Follows the endpoints of `service`.
    pub fn watch_endpoints(
        &mut self,
        service: &ServiceRef,
    ) -> watch::Receiver<Published<Endpoints>> {
        if let Some(tx) = self.endpoint_watches.get(service) {
            return tx.subscribe();
        }
        let update = Published::new(self.version, self.endpoints(service));
        let (tx, rx) = watch::channel(update);
        self.endpoint_watches.insert(service.clone(), tx);
        rx
    }

    /// Replaces the services' own addresses (in Kubernetes, every ClusterIP and port).
    pub fn reset_service_addresses(&mut self, addrs: BTreeMap<SocketAddr, ServiceRef>) {
        if self.service_addrs != addrs {
            self.service_addrs = addrs;
            self.publish();
        }
    }

    /// Follows what `addr` is in the mesh.
    pub fn watch_address(&mut self, addr: SocketAddr) -> watch::Receiver<Published<MeshAddress>> {
        if let Some(tx) = self.address_watches.get(&addr) {
            return tx.subscribe();
        }
        let update = Published::new(self.version, self.address(addr));
        let (tx, rx) = watch::channel(update);
        self.address_watches.insert(addr, tx);
        rx
    }

    /// What `addr` is in the mesh: a service's own address, else an endpoint of the first
    /// service (by registration id) a workload registered there belongs to; `None` outside the
    /// mesh.
    pub fn address(&self, addr: SocketAddr) -> Option<MeshAddress> {
        if let Some(service) = self.service_addrs.get(&addr) {
            return Some(MeshAddress {
                service: service.clone(),
                endpoint: None,
            });
        }
        self.workloads
            .values()
            .find(|w| w.addr == addr)
            .map(|w| MeshAddress {
                service: w.service.clone(),
                endpoint: Some(Endpoint {
                    addr: w.addr,
                    identity: w.identity.as_deref().map(Name::from),
                    labels: w.labels.clone(),
                    deployment: w.deployment.as_deref().map(Name::from),
                }),
            })
    }

    fn has_workloads(&self, service: &ServiceRef) -> bool {
        self.workloads.values().any(|w| &w.service == service)
    }

    /// The route table proxies get for `authority`: its HTTPRoutes' rules in precedence order,
    /// a catch-all to the service itself when it has workloads but no routes, else `None`.
    pub fn route_table(&self, authority: &ServiceRef) -> Option<RouteTable> {
        self.route_table_from(authority, None)
    }

    /// The route table proxies in namespace `client` get for `authority` (GAMMA's producer and
    /// consumer routes): the routes in the client's own namespace that attach to the service
    /// when there are any (consumer routes, for that namespace's clients only), else the routes
    /// in the service's namespace (producer routes). Routes in any other namespace never apply.
    pub fn route_table_from(
        &self,
        authority: &ServiceRef,
        client: Option<&str>,
    ) -> Option<RouteTable> {
        let attached: Vec<(&str, &IndexedRoute)> = self
            .routes
            .iter()
            .chain(self.grpc_routes.iter())
            .filter(|(_, r)| {
                r.parents.iter().any(|p| {
                    p.name == authority.name
                        && p.namespace == authority.namespace
                        && p.port.is_none_or(|port| port == authority.port)
                })
            })
            .map(|((ns, _), r)| (ns.as_str(), r))
            .collect();
        let consumer = client.filter(|c| *c != authority.namespace);
        let from = |ns: &str| -> Vec<&IndexedRoute> {
            attached
                .iter()
                .filter(|(n, _)| *n == ns)
                .map(|(_, r)| *r)
                .collect()
        };
        let mut routes = consumer.map(from).unwrap_or_default();
        if routes.is_empty() {
            routes = from(&authority.namespace);
        }
        // BTreeMap order is namespace/name already; a stable sort by age keeps it for ties.
        routes.sort_by(|a, b| a.created.cmp(&b.created));
        let mut rules = Vec::new();
        for route in routes {
            for rule in &route.rules {
                let backends: Vec<WeightedBackend> = rule
                    .backends
                    .iter()
                    .map(|b| WeightedBackend {
                        service: ServiceRef::new(
                            b.name.clone(),
                            b.namespace.clone(),
                            b.port.unwrap_or(authority.port),
                        ),
                        weight: b.weight,
                    })
                    .collect();
                let backend_filters: Vec<Vec<RouteFilter>> =
                    if rule.backends.iter().any(|b| !b.filters.is_empty()) {
                        rule.backends.iter().map(|b| b.filters.clone()).collect()
                    } else {
                        Vec::new()
                    };
                let matches: Vec<Option<&RouteMatch>> = if rule.matches.is_empty() {
                    vec![None]
                } else {
                    rule.matches.iter().map(Some).collect()
                };
                for m in matches {
                    rules.push((
                        precedence(m),
                        RouteRule {
                            name: route.name.as_str().into(),
                            matches: m.cloned().into_iter().collect(),
                            filters: rule.filters.clone(),
                            backends: backends.clone(),
                            backend_filters: backend_filters.clone(),
                            timeout_ms: rule.timeout_ms,
                            retry: None,
                        },
                    ));
                }
            }
        }
        if rules.is_empty() {
            return self.has_workloads(authority).then(|| RouteTable {
                parent: authority.clone(),
                rules: vec![RouteRule {
                    name: "default".into(),
                    backends: vec![WeightedBackend {
                        service: authority.clone(),
                        weight: 1,
                    }],
                    ..RouteRule::default()
                }],
            });
        }
        rules.sort_by_key(|(p, _)| Reverse(*p));
        Some(RouteTable {
            parent: authority.clone(),
            rules: rules.into_iter().map(|(_, r)| r).collect(),
        })
    }

    /// The endpoints of `service`: its registered workloads, ordered by address. `None` when no
    /// workload registered for it and no route sends traffic to it.
    pub fn endpoints(&self, service: &ServiceRef) -> Option<Endpoints> {
        let mut endpoints: Vec<Endpoint> = self
            .workloads
            .values()
            .filter(|w| &w.service == service)
            .map(|w| Endpoint {
                addr: w.addr,
                identity: w.identity.as_deref().map(Name::from),
                labels: w.labels.clone(),
                deployment: w.deployment.as_deref().map(Name::from),
            })
            .collect();
        endpoints.sort_by_key(|e| e.addr);
        endpoints.dedup_by_key(|e| e.addr);
        let referenced = self
            .routes
            .values()
            .chain(self.grpc_routes.values())
            .any(|r| {
                r.rules.iter().any(|rule| {
                    rule.backends
                        .iter()
                        .any(|b| b.name == service.name && b.namespace == service.namespace)
                })
            });
        (!endpoints.is_empty() || referenced).then(|| Endpoints {
            service: service.clone(),
            endpoints,
        })
    }

    /// Recomputes every watched key and sends the ones that changed, all under one new version.
    fn publish(&mut self) {
        // Drop channels nobody follows any more.
        self.route_watches.retain(|_, tx| tx.receiver_count() > 0);
        self.endpoint_watches
            .retain(|_, tx| tx.receiver_count() > 0);
        self.address_watches.retain(|_, tx| tx.receiver_count() > 0);
        let next = self.version + 1;
        let tables: Vec<_> = self
            .route_watches
            .keys()
            .map(|(a, client)| {
                let table = self.route_table_from(a, client.as_deref());
                ((a.clone(), client.clone()), table)
            })
            .collect();
        send_changed(&self.route_watches, tables, next);
        let sets: Vec<_> = self
            .endpoint_watches
            .keys()
            .map(|s| (s.clone(), self.endpoints(s)))
            .collect();
        send_changed(&self.endpoint_watches, sets, next);
        let addresses: Vec<_> = self
            .address_watches
            .keys()
            .map(|a| (*a, self.address(*a)))
            .collect();
        send_changed(&self.address_watches, addresses, next);
        // Unwatched keys change too; the version still moves so a later watcher never sees an
        // older version for a newer value.
        self.version = next;
    }
}

/// Parses a stored HTTPRoute object for the index.
pub fn parse_route(object: &Value) -> Option<HttpRoute> {
    serde_json::from_value(object.clone()).ok()
}

/// Parses a stored GRPCRoute object for the index.
pub fn parse_grpc_route(object: &Value) -> Option<GrpcRoute> {
    serde_json::from_value(object.clone()).ok()
}

#[cfg(test)]
#[allow(
    clippy::needless_pass_by_value,
    reason = "builders read better taking json! values"
)]
mod tests {
    use serde_json::json;

    use super::*;

    fn svc(s: &str) -> ServiceRef {
        s.parse().unwrap()
    }

    fn mk_route(name: &str, parent: &str, rules: Value) -> HttpRoute {
        serde_json::from_value(json!({
            "apiVersion": "gateway.networking.k8s.io/v1",
            "kind": "HTTPRoute",
            "metadata": {"name": name, "namespace": "default"},
            "spec": {
                "parentRefs": [{"name": parent, "kind": "Service", "group": "", "port": 80}],
                "rules": rules
            }
        }))
        .unwrap()
    }

    fn mk_split(name: &str, primary: i32, canary: i32) -> HttpRoute {
        mk_route(
            name,
            "web",
            json!([{"backendRefs": [
                {"name": "web-primary", "port": 80, "weight": primary},
                {"name": "web-canary", "port": 80, "weight": canary}
            ]}]),
        )
    }

    fn mk_workload(service: &str, addr: &str, version: &str) -> WorkloadRegistration {
        WorkloadRegistration {
            service: svc(service),
            addr: addr.parse().unwrap(),
            identity: Some("spiffe://cluster.local/ns/default/sa/web".into()),
            labels: [("version".to_string(), version.to_string())].into(),
            admin_addr: None,
            deployment: None,
            pod: None,
        }
    }

    fn weights(t: &RouteTable) -> Vec<(String, u32)> {
        t.rules[0]
            .backends
            .iter()
            .map(|b| (b.service.name.to_string(), b.weight))
            .collect()
    }

    #[test]
    fn weights_reach_watchers_with_growing_versions() {
        let mut index = Index::new(100);
        let mut rx = index.watch_routes(&svc("web.default:80"));
        assert_eq!(rx.borrow_and_update().value, None);
        index.apply_route(&mk_split("web", 90, 10));
        assert!(rx.has_changed().unwrap());
        let first = rx.borrow_and_update().update.clone();
        assert!(first.version > 100);
        let table = first.value.unwrap();
        assert_eq!(
            weights(&table),
            [("web-primary".into(), 90), ("web-canary".into(), 10)]
        );
        assert_eq!(
            table.rules[0].backends[0].service,
            svc("web-primary.default:80")
        );

        index.apply_route(&mk_split("web", 50, 50));
        let second = rx.borrow_and_update().update.clone();
        assert!(second.version > first.version);
        assert_eq!(weights(&second.value.unwrap())[1].1, 50);

        // Re-applying the same route publishes nothing new.
        index.apply_route(&mk_split("web", 50, 50));
        assert!(!rx.has_changed().unwrap());
    }

    #[test]
    fn routes_attach_only_to_their_parent_port_and_kind() {
        let mut index = Index::new(0);
        index.apply_route(&mk_split("web", 90, 10));
        assert!(index.route_table(&svc("web.default:8080")).is_none());
        assert!(index.route_table(&svc("web.other:80")).is_none());
        let gateway: HttpRoute = serde_json::from_value(json!({
            "metadata": {"name": "gw", "namespace": "default"},
            "spec": {"parentRefs": [{"name": "web"}],
                     "rules": [{"backendRefs": [{"name": "x", "port": 80}]}]}
        }))
        .unwrap();
        index.apply_route(&gateway);
        assert_eq!(
            index
                .route_table(&svc("web.default:80"))
                .unwrap()
                .rules
                .len(),
            1
        );
    }

    #[test]
    fn rules_follow_gateway_api_precedence() {
        let mut index = Index::new(0);
        index.apply_route(&mk_route(
            "web",
            "web",
            json!([
                {"backendRefs": [{"name": "catchall", "port": 80}]},
                {"matches": [{"path": {"type": "PathPrefix", "value": "/api"}}],
                 "backendRefs": [{"name": "api", "port": 80}]},
                {"matches": [{"path": {"type": "Exact", "value": "/api/health"}},
                             {"path": {"type": "PathPrefix", "value": "/api/v2"}, "method": "POST"}],
                 "backendRefs": [{"name": "special", "port": 80}]}
            ]),
        ));
        let table = index.route_table(&svc("web.default:80")).unwrap();
        let order: Vec<String> = table
            .rules
            .iter()
            .map(|r| format!("{:?}", r.matches.first().and_then(|m| m.path.clone())))
            .collect();
        assert_eq!(
            order,
            [
                "Some(Exact(\"/api/health\"))",
                "Some(PathPrefix(\"/api/v2\"))",
                "Some(PathPrefix(\"/api\"))",
                "None"
            ]
        );
        assert_eq!(table.rules[1].matches[0].method.as_deref(), Some("POST"));
        assert_eq!(table.rules[3].backends[0].weight, 1, "weight defaults to 1");
    }

    #[test]
    fn filters_and_timeouts_are_carried() {
        let mut index = Index::new(0);
        index.apply_route(&mk_route(
            "web",
            "web",
            json!([{
                "filters": [{"type": "RequestHeaderModifier", "requestHeaderModifier": {
                    "set": [{"name": "x-canary", "value": "1"}], "remove": ["x-debug"]}}],
                "timeouts": {"request": "1500ms"},
                "matches": [{"headers": [{"name": "x-user", "value": "^a.*", "type": "RegularExpression"}]}],
                "backendRefs": [{"name": "web-canary", "port": 80}]
            }]),
        ));
        let rule = &index.route_table(&svc("web.default:80")).unwrap().rules[0];
        assert_eq!(rule.timeout_ms, Some(1500));
        assert!(rule.matches[0].headers[0].regex);
        match &rule.filters[0] {
            RouteFilter::RequestHeaderModifier { set, remove, .. } => {
                assert_eq!(set.get("x-canary").map(String::as_str), Some("1"));
                assert_eq!(remove, &["x-debug".to_string()]);
            }
            other => panic!("unexpected filter {other:?}"),
        }
    }

    #[test]
    fn request_mirrors_are_carried_with_their_share() {
        let mut index = Index::new(0);
        index.apply_route(&mk_route(
            "web",
            "web",
            json!([{
                "filters": [
                    {"type": "RequestMirror", "requestMirror": {
                        "backendRef": {"name": "shadow", "port": 8080}}},
                    {"type": "RequestMirror", "requestMirror": {
                        "backendRef": {"name": "audit", "namespace": "ops", "port": 80},
                        "percent": 50}},
                    {"type": "RequestMirror", "requestMirror": {
                        "backendRef": {"name": "tenth", "port": 80},
                        "fraction": {"numerator": 1, "denominator": 10}}},
                    {"type": "RequestMirror", "requestMirror": {
                        "backendRef": {"name": "no-port"}}},
                    {"type": "RequestMirror", "requestMirror": {
                        "backendRef": {"group": "example.org", "kind": "Bucket",
                                       "name": "b", "port": 80}}}],
                "backendRefs": [{"name": "web", "port": 80}]
            }]),
        ));
        let rule = &index.route_table(&svc("web.default:80")).unwrap().rules[0];
        assert_eq!(
            rule.filters,
            [
                RouteFilter::RequestMirror {
                    backend: svc("shadow.default:8080"),
                    percent: 100.0
                },
                RouteFilter::RequestMirror {
                    backend: svc("audit.ops:80"),
                    percent: 50.0
                },
                RouteFilter::RequestMirror {
                    backend: svc("tenth.default:80"),
                    percent: 10.0
                },
            ],
            "a mirror without a port or of another kind is not carried"
        );
    }

    #[test]
    fn redirects_rewrites_and_response_header_modifiers_are_carried() {
        let mut index = Index::new(0);
        index.apply_route(&mk_route(
            "web",
            "web",
            json!([
                {"matches": [{"path": {"type": "PathPrefix", "value": "/old"}}],
                 "filters": [{"type": "RequestRedirect", "requestRedirect": {
                    "scheme": "https", "hostname": "example.org", "port": 8443, "statusCode": 301,
                    "path": {"type": "ReplacePrefixMatch", "replacePrefixMatch": "/new"}}}]},
                {"matches": [{"path": {"type": "PathPrefix", "value": "/moved"}}],
                 "filters": [{"type": "RequestRedirect", "requestRedirect": {"hostname": "a.b"}}]},
                {"matches": [{"path": {"type": "PathPrefix", "value": "/rw"}}],
                 "filters": [
                    {"type": "URLRewrite", "urlRewrite": {"hostname": "inner",
                     "path": {"type": "ReplaceFullPath", "replaceFullPath": "/x"}}},
                    {"type": "ResponseHeaderModifier", "responseHeaderModifier": {
                     "add": [{"name": "x-a", "value": "1"}], "remove": ["server"]}}],
                 "backendRefs": [{"name": "web", "port": 80}]}
            ]),
        ));
        let table = index.route_table(&svc("web.default:80")).unwrap();
        let filters = |prefix: &str| {
            table
                .rules
                .iter()
                .find(|r| r.matched_prefix() == Some(prefix))
                .unwrap()
                .filters
                .clone()
        };
        assert_eq!(
            filters("/old"),
            [RouteFilter::RequestRedirect(Redirect {
                scheme: Some("https".into()),
                hostname: Some("example.org".into()),
                port: Some(8443),
                path: Some(PathModifier::ReplacePrefixMatch("/new".into())),
                status_code: 301,
            })]
        );
        assert_eq!(
            filters("/moved"),
            [RouteFilter::RequestRedirect(Redirect {
                hostname: Some("a.b".into()),
                status_code: 302,
                ..Default::default()
            })],
            "302 is the default status"
        );
        assert_eq!(
            filters("/rw"),
            [
                RouteFilter::UrlRewrite {
                    hostname: Some("inner".into()),
                    path: Some(PathModifier::ReplaceFullPath("/x".into())),
                },
                RouteFilter::ResponseHeaderModifier {
                    set: BTreeMap::new(),
                    add: [("x-a".to_string(), "1".to_string())].into(),
                    remove: vec!["server".into()],
                }
            ]
        );
    }

    #[test]
    fn consumer_routes_apply_to_their_namespaces_clients_only() {
        let mut index = Index::new(0);
        let route = |ns: &str, backend: &str| -> HttpRoute {
            serde_json::from_value(json!({
                "metadata": {"name": "r", "namespace": ns},
                "spec": {
                    "parentRefs": [{"name": "web", "namespace": "default", "kind": "Service", "group": ""}],
                    "rules": [{"backendRefs": [{"name": backend, "namespace": "default", "port": 80}]}]
                }
            }))
            .unwrap()
        };
        index.apply_route(&route("default", "producer"));
        index.apply_route(&route("shop", "consumer"));
        index.apply_route(&route("other", "other"));
        let web = svc("web.default:80");
        let backend = |client: Option<&str>| {
            index.route_table_from(&web, client).unwrap().rules[0].backends[0]
                .service
                .name
                .clone()
        };
        assert_eq!(backend(None), "producer");
        assert_eq!(backend(Some("default")), "producer");
        assert_eq!(
            backend(Some("shop")),
            "consumer",
            "a consumer route wins for its clients"
        );
        assert_eq!(backend(Some("elsewhere")), "producer");
        let mut shop = index.watch_routes_from(&web, Some("shop"));
        let plain = index.watch_routes(&web);
        index.delete_route("shop", "r");
        assert!(shop.has_changed().unwrap());
        assert!(
            !plain.has_changed().unwrap(),
            "producer clients saw no change"
        );
        let table = shop.borrow_and_update().value.clone().unwrap();
        assert_eq!(table.rules[0].backends[0].service.name, "producer");
    }

    #[test]
    fn backend_request_header_modifiers_are_carried_per_backend() {
        let mut index = Index::new(0);
        index.apply_route(&mk_route(
            "web",
            "web",
            json!([{"backendRefs": [
                {"name": "a", "port": 80, "filters": [{"type": "RequestHeaderModifier",
                  "requestHeaderModifier": {"set": [{"name": "x-b", "value": "a"}]}}]},
                {"name": "b", "port": 80}
            ]}]),
        ));
        let rule = &index.route_table(&svc("web.default:80")).unwrap().rules[0];
        assert_eq!(rule.backend_filters.len(), 2);
        assert!(matches!(
            &rule.backend_filters[0][..],
            [RouteFilter::RequestHeaderModifier { set, .. }] if set["x-b"] == "a"
        ));
        assert!(rule.backend_filters[1].is_empty());
    }

    #[test]
    fn grpc_routes_split_by_weight_and_match_methods_as_paths() {
        let mut index = Index::new(0);
        let route: GrpcRoute = serde_json::from_value(json!({
            "metadata": {"name": "grpc", "namespace": "default"},
            "spec": {
                "parentRefs": [{"name": "echo", "kind": "Service", "group": "", "port": 7070}],
                "rules": [
                    {"matches": [{"method": {"service": "echo.Echo", "method": "Say"}}],
                     "backendRefs": [{"name": "say", "port": 7070}]},
                    {"matches": [{"method": {"service": "echo.Echo"}},
                                 {"method": {"method": "Other"}, "headers": [{"name": "x-a", "value": "1"}]}],
                     "backendRefs": [{"name": "svc", "port": 7070}]},
                    {"backendRefs": [{"name": "echo-v1", "port": 7070, "weight": 70},
                                     {"name": "echo-v2", "port": 7070, "weight": 30}]}
                ]
            }
        }))
        .unwrap();
        index.apply_grpc_route(&route);
        assert!(index.route_table(&svc("echo.default:80")).is_none());
        let table = index.route_table(&svc("echo.default:7070")).unwrap();
        let paths: Vec<String> = table
            .rules
            .iter()
            .map(|r| format!("{:?}", r.matches.first().and_then(|m| m.path.clone())))
            .collect();
        assert_eq!(
            paths,
            [
                "Some(Exact(\"/echo.Echo/Say\"))",
                "Some(PathPrefix(\"/echo.Echo\"))",
                // A method without a service is a regular expression, which ranks below a
                // rule without matches, as regular-expression paths do in HTTPRoutes.
                "None",
                "Some(RegularExpression(\"/[^/]+/Other\"))",
            ]
        );
        assert_eq!(table.rules[3].matches[0].headers[0].name, "x-a");
        assert_eq!(
            weights(&RouteTable {
                parent: table.parent.clone(),
                rules: vec![table.rules[2].clone()],
            }),
            [("echo-v1".to_string(), 70), ("echo-v2".to_string(), 30)]
        );
        index.delete_grpc_route("default", "grpc");
        assert!(index.route_table(&svc("echo.default:7070")).is_none());
    }

    #[test]
    fn grpc_route_mirrors_are_carried_with_their_share() {
        let mut index = Index::new(0);
        let route: GrpcRoute = serde_json::from_value(json!({
            "metadata": {"name": "grpc", "namespace": "default"},
            "spec": {
                "parentRefs": [{"name": "echo", "kind": "Service", "group": "", "port": 7070}],
                "rules": [{
                    "filters": [
                        {"type": "RequestMirror", "requestMirror": {
                            "backendRef": {"name": "shadow", "port": 7070}, "percent": 25}},
                        {"type": "RequestMirror", "requestMirror": {
                            "backendRef": {"name": "other", "namespace": "audit", "port": 9000},
                            "fraction": {"numerator": 1, "denominator": 3}}},
                        {"type": "RequestMirror", "requestMirror": {
                            "backendRef": {"name": "no-port"}}}
                    ],
                    "backendRefs": [{"name": "echo-v1", "port": 7070}]
                }]
            }
        }))
        .unwrap();
        index.apply_grpc_route(&route);
        let table = index.route_table(&svc("echo.default:7070")).unwrap();
        let mirrors: Vec<(String, String)> = table.rules[0]
            .filters
            .iter()
            .filter_map(|f| match f {
                RouteFilter::RequestMirror { backend, percent } => {
                    Some((backend.to_string(), format!("{percent:.2}")))
                }
                _ => None,
            })
            .collect();
        assert_eq!(
            mirrors,
            [
                ("shadow.default:7070".to_string(), "25.00".to_string()),
                ("other.audit:9000".to_string(), "33.33".to_string()),
            ],
            "a mirror without a port is not carried"
        );
    }

    #[test]
    fn addresses_name_their_service_or_endpoint_and_follow_changes() {
        let mut index = Index::new(0);
        let vip: SocketAddr = "10.96.0.10:80".parse().unwrap();
        let pod: SocketAddr = "10.1.0.5:8080".parse().unwrap();
        let outside: SocketAddr = "93.184.216.34:443".parse().unwrap();
        let mut vip_rx = index.watch_address(vip);
        let pod_rx = index.watch_address(pod);
        assert_eq!(vip_rx.borrow().value, None);
        index.reset_service_addresses(BTreeMap::from([(vip, svc("web.default:80"))]));
        assert!(vip_rx.has_changed().unwrap());
        let seen = vip_rx.borrow_and_update().value.clone().unwrap();
        assert_eq!(seen.service, svc("web.default:80"));
        assert_eq!(seen.endpoint, None);
        index.apply_workload(
            "a",
            mk_workload("web-canary.default:80", "10.1.0.5:8080", "v2"),
        );
        let seen = pod_rx.borrow().value.clone().unwrap();
        assert_eq!(seen.service, svc("web-canary.default:80"));
        assert_eq!(seen.endpoint.unwrap().addr, pod);
        assert_eq!(index.address(outside), None);
        // The same addresses again change nothing.
        let version = index.version();
        index.reset_service_addresses(BTreeMap::from([(vip, svc("web.default:80"))]));
        assert_eq!(index.version(), version);
        index.delete_workload("a");
        assert_eq!(pod_rx.borrow().value, None);
    }

    #[test]
    fn endpoints_follow_registrations() {
        let mut index = Index::new(0);
        let mut rx = index.watch_endpoints(&svc("web-canary.default:80"));
        assert_eq!(rx.borrow_and_update().value, None);
        index.apply_workload(
            "a",
            mk_workload("web-canary.default:80", "127.0.0.1:9002", "v2"),
        );
        index.apply_workload(
            "b",
            mk_workload("web-canary.default:80", "127.0.0.1:9001", "v2"),
        );
        index.apply_workload(
            "c",
            mk_workload("web-primary.default:80", "127.0.0.1:9000", "v1"),
        );
        let eps = rx.borrow_and_update().value.clone().unwrap();
        let addrs: Vec<String> = eps.endpoints.iter().map(|e| e.addr.to_string()).collect();
        assert_eq!(addrs, ["127.0.0.1:9001", "127.0.0.1:9002"]);
        assert_eq!(eps.endpoints[0].labels["version"], "v2");
        index.delete_workload("a");
        index.delete_workload("b");
        assert_eq!(rx.borrow_and_update().value, None);
        // A service a route sends traffic to exists even with no workloads: it is unavailable.
        index.apply_route(&mk_split("web", 90, 10));
        assert_eq!(
            rx.borrow_and_update()
                .value
                .as_ref()
                .map(|e| e.endpoints.len()),
            Some(0)
        );
    }

    #[test]
    fn services_without_routes_get_a_catch_all_and_reset_replaces_routes() {
        let mut index = Index::new(0);
        index.apply_workload("a", mk_workload("web.default:80", "127.0.0.1:9000", "v1"));
        let table = index.route_table(&svc("web.default:80")).unwrap();
        assert_eq!(table.rules[0].name, "default");
        assert_eq!(table.rules[0].backends[0].service, svc("web.default:80"));
        index.apply_route(&mk_split("web", 90, 10));
        index.reset_routes(&[mk_split("other", 1, 1)]);
        assert_eq!(
            index.route_table(&svc("web.default:80")).unwrap().rules[0].name,
            "other"
        );
        index.delete_route("default", "other");
        assert_eq!(
            index.route_table(&svc("web.default:80")).unwrap().rules[0].name,
            "default"
        );
    }
}
