//! The proxy's view of the mesh: route tables by authority and endpoints by service, swapped as a
//! whole whenever the control plane (or the static config) changes them, and read lock-free per
//! request through a `tokio::sync::watch` receiver.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};

use mesh_core::proxy_api::{Endpoint, MeshAddress, RouteRule, ServiceRef, StaticConfig};
use mesh_core::routing::{CompiledRoutes, RouteRegexError};

use crate::metrics::{Metrics, RequestLabels, RequestSeries, RouteLabels, tls_label};

/// Everything the outbound path routes by.
#[derive(Clone, Debug, Default)]
pub struct Tables {
    /// Route tables by parent service.
    pub routes: RouteTables,
    /// The catch-all routes of services without a table, built on first use.
    pub default_routes: DefaultRoutes,
    /// Ready endpoints by service; an empty list means "known to have none".
    pub endpoints: BTreeMap<ServiceRef, Vec<Endpoint>>,
    /// Authorities whose route watch has answered at least once (with or without a table).
    pub answered_routes: std::collections::BTreeSet<ServiceRef>,
    /// What redirected connections' original destinations are in the mesh, as far as asked:
    /// `Some` for a meshed service's address or endpoint, `None` for an address known not to
    /// be meshed. With a static config, addresses it does not name are not meshed.
    pub addresses: BTreeMap<std::net::SocketAddr, Option<Address>>,
}

/// What a meshed address is, as the tables hold it: a [`MeshAddress`] that does not copy an
/// endpoint the tables already list. A static config makes an entry for every endpoint it
/// lists; holding copies, the index of 10,000 endpoints was 3 MB of the proxy's heap.
#[derive(Clone, Debug)]
pub struct Address {
    /// The service the address belongs to.
    pub service: ServiceRef,
    endpoint: AddressEndpoint,
}

#[derive(Clone, Debug)]
enum AddressEndpoint {
    /// The service's own address.
    None,
    /// One endpoint of the service, as the service's endpoint list in the same tables has it.
    Listed,
    /// One endpoint of the service, as discovery answered for the address (the service's
    /// endpoints may not be known yet).
    Answered(Box<Endpoint>),
}

impl Address {
    /// A service's own address.
    pub fn service(service: ServiceRef) -> Self {
        Self {
            service,
            endpoint: AddressEndpoint::None,
        }
    }

    /// What discovery answered for an address.
    pub fn answered(answer: MeshAddress) -> Self {
        Self {
            service: answer.service,
            endpoint: match answer.endpoint {
                Some(e) => AddressEndpoint::Answered(Box::new(e)),
                None => AddressEndpoint::None,
            },
        }
    }

    /// Whether the address is the service's own rather than one of its endpoints.
    pub fn is_service(&self) -> bool {
        matches!(self.endpoint, AddressEndpoint::None)
    }

    /// The endpoint at `addr` (this entry's address), when the address is one: as discovery
    /// answered, or as `tables` list it. A listed endpoint the tables no longer hold leaves the
    /// service's own routing.
    pub fn endpoint<'a>(
        &'a self,
        addr: std::net::SocketAddr,
        tables: &'a Tables,
    ) -> Option<&'a Endpoint> {
        match &self.endpoint {
            AddressEndpoint::None => None,
            AddressEndpoint::Answered(e) => Some(e),
            AddressEndpoint::Listed => tables
                .endpoints
                .get(&self.service)?
                .iter()
                .find(|e| e.addr == addr),
        }
    }
}

impl Tables {
    /// Builds tables from a static config; a bad regex is an error naming its route. The
    /// config is taken, not borrowed: its tables and endpoint lists move in rather than being
    /// copied, which at 10,000 entries would leave the copies' holes in the heap.
    ///
    /// Each map is built at once from all its entries, which packs its nodes full; inserted one
    /// at a time in order, a B-tree's nodes stay a little over half full (a full node splits
    /// 6 + 5, and the left half is not filled again). As when inserting, a later entry for the
    /// same key wins, except that a service's own address wins over an endpoint that shares it,
    /// and the first endpoint listed at an address wins over later ones.
    pub fn from_config(config: StaticConfig) -> Result<Self, RouteRegexError> {
        let routes = config
            .routes
            .into_iter()
            .map(|table| Ok(ServiceRoutes::new(CompiledRoutes::new(table)?)))
            .collect::<Result<RouteTables, RouteRegexError>>()?;
        // Later entries win when collected: endpoints last-listed first, then service addresses.
        let listed = config.endpoints.iter().rev().flat_map(|e| {
            e.endpoints.iter().rev().map(|endpoint| {
                let address = Address {
                    service: e.service.clone(),
                    endpoint: AddressEndpoint::Listed,
                };
                (endpoint.addr, Some(address))
            })
        });
        let own = config
            .addresses
            .into_iter()
            .map(|a| (a.addr, Some(Address::service(a.service))));
        let addresses = listed.chain(own).collect();
        let endpoints = config
            .endpoints
            .into_iter()
            .map(|e| (e.service, e.endpoints))
            .collect();
        Ok(Self {
            routes,
            endpoints,
            addresses,
            ..Self::default()
        })
    }

    /// The tables in their wire form (a [`StaticConfig`]'s shape), for `/config`: written
    /// from the tables as they are. A copy of 10,000 routes and endpoints first left the
    /// proxy's RSS 4.7 MB higher after one request, which the allocator then kept.
    pub fn config_view(&self) -> ConfigView<'_> {
        ConfigView(self)
    }

    /// Whether discovery has answered everything a request to `authority` needs: its route table
    /// (or that it has none) and the endpoints of every backend the table names. A mirror's
    /// endpoints are not waited for: a copy sent before they are known is dropped, and the
    /// original never waits on a mirror.
    pub fn resolved(&self, authority: &ServiceRef) -> bool {
        match self.routes.get(authority) {
            Some(r) => r
                .table()
                .rules
                .iter()
                .flat_map(|rule| &rule.backends)
                .all(|b| self.endpoints.contains_key(&b.service)),
            None => {
                self.answered_routes.contains(authority) && self.endpoints.contains_key(authority)
            }
        }
    }

    /// The addresses of `service`'s ready endpoints.
    pub fn addrs(&self, service: &ServiceRef) -> Vec<std::net::SocketAddr> {
        self.endpoints
            .get(service)
            .map(|e| e.iter().map(|e| e.addr).collect())
            .unwrap_or_default()
    }

    /// Whether `service` has at least one ready endpoint.
    pub fn available(&self, service: &ServiceRef) -> bool {
        self.endpoints.get(service).is_some_and(|e| !e.is_empty())
    }
}

/// [`Tables::config_view`]: serializes as the [`StaticConfig`] the tables hold.
pub struct ConfigView<'a>(&'a Tables);

impl serde::Serialize for ConfigView<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;

        /// An [`mesh_core::proxy_api::Endpoints`] by reference.
        #[derive(serde::Serialize)]
        struct EndpointsRef<'a> {
            service: &'a ServiceRef,
            endpoints: &'a [Endpoint],
        }
        /// A [`mesh_core::proxy_api::ServiceAddress`] by reference.
        #[derive(serde::Serialize)]
        struct AddressRef<'a> {
            addr: &'a std::net::SocketAddr,
            service: &'a ServiceRef,
        }
        /// A list written as it is iterated.
        struct Seq<I>(std::cell::Cell<Option<I>>);
        impl<I> serde::Serialize for Seq<I>
        where
            I: Iterator,
            I::Item: serde::Serialize,
        {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.collect_seq(self.0.take().into_iter().flatten())
            }
        }
        fn seq<I>(i: I) -> Seq<I> {
            Seq(std::cell::Cell::new(Some(i)))
        }

        let t = self.0;
        let addresses = || {
            t.addresses.iter().filter_map(|(addr, known)| match known {
                Some(a) if a.is_service() => Some(AddressRef {
                    addr,
                    service: &a.service,
                }),
                _ => None,
            })
        };
        let with_addresses = addresses().next().is_some();
        let mut out =
            serializer.serialize_struct("StaticConfig", 2 + usize::from(with_addresses))?;
        out.serialize_field("routes", &seq(t.routes.iter().map(|r| r.table())))?;
        out.serialize_field(
            "endpoints",
            &seq(t
                .endpoints
                .iter()
                .map(|(service, endpoints)| EndpointsRef { service, endpoints })),
        )?;
        if with_addresses {
            out.serialize_field("addresses", &seq(addresses()))?;
        }
        out.end()
    }
}

/// The route a request took.
#[derive(Debug)]
pub struct Route {
    /// The service the request was for.
    pub service: ServiceRef,
    /// The rule that matched.
    pub rule: RouteRule,
    /// The authority and the rule's metrics name.
    pub labels: RouteLabels,
    /// The request series of the backends and endpoint owners attempts on this route went to,
    /// resolved once each (see [`Route::series`]).
    series: Mutex<Vec<Arc<RequestSeries>>>,
}

impl Route {
    /// The route of `service` taking `rule`, whose metrics name it `labels`.
    pub fn new(service: ServiceRef, rule: RouteRule, labels: RouteLabels) -> Self {
        Self {
            service,
            rule,
            labels,
            series: Mutex::default(),
        }
    }

    /// The `request_total`, `response_total` and `response_latency_ms` series of an attempt on
    /// this route to an endpoint of `backend` owned by `deployment`, over mTLS when `meshed`:
    /// looked up the first time, then shared. A route reaches a few backends and endpoint
    /// owners, so the list stays short.
    pub fn series(
        &self,
        metrics: &Metrics,
        backend: &ServiceRef,
        meshed: bool,
        deployment: &Arc<str>,
    ) -> Arc<RequestSeries> {
        let tls = tls_label(meshed);
        let mut series = self.series.lock().unwrap_or_else(PoisonError::into_inner);
        let known = series.iter().find(|s| {
            let l = s.labels();
            l.tls == tls
                && *l.dst_service == *backend.name
                && *l.dst_namespace == *backend.namespace
                && l.dst_deployment == *deployment
        });
        if let Some(known) = known {
            return known.clone();
        }
        let new = Arc::new(metrics.series(RequestLabels {
            direction: "outbound",
            authority: self.labels.authority.as_str().into(),
            route: self.labels.route.as_str().into(),
            dst_service: backend.name.as_str().into(),
            dst_namespace: backend.namespace.as_str().into(),
            dst_deployment: deployment.clone(),
            tls,
        }));
        series.push(new.clone());
        new
    }
}

/// Route tables by their parent service. A set ordered by each table's parent rather than a
/// map, so a table's key is the parent it holds, not a copy beside it (40 bytes a table).
#[derive(Clone, Debug, Default)]
pub struct RouteTables(BTreeSet<ByParent>);

/// A table, compared and ordered by its parent.
#[derive(Clone, Debug)]
struct ByParent(ServiceRoutes);

impl ByParent {
    fn parent(&self) -> &ServiceRef {
        &self.0.table().parent
    }
}

impl PartialEq for ByParent {
    fn eq(&self, other: &Self) -> bool {
        self.parent() == other.parent()
    }
}

impl Eq for ByParent {}

impl PartialOrd for ByParent {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for ByParent {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.parent().cmp(other.parent())
    }
}

impl std::borrow::Borrow<ServiceRef> for ByParent {
    fn borrow(&self) -> &ServiceRef {
        self.parent()
    }
}

impl RouteTables {
    /// The table of `parent`.
    pub fn get(&self, parent: &ServiceRef) -> Option<&ServiceRoutes> {
        self.0.get(parent).map(|t| &t.0)
    }

    /// Whether `parent` has a table.
    pub fn contains_key(&self, parent: &ServiceRef) -> bool {
        self.0.contains(parent)
    }

    /// Adds a table, in place of the one its parent had.
    pub fn insert(&mut self, routes: ServiceRoutes) {
        self.0.replace(ByParent(routes));
    }

    /// Removes the table of `parent`.
    pub fn remove(&mut self, parent: &ServiceRef) {
        self.0.remove(parent);
    }

    /// The tables, by parent.
    pub fn iter(&self) -> impl Iterator<Item = &ServiceRoutes> {
        self.0.iter().map(|t| &t.0)
    }

    /// The parents.
    pub fn keys(&self) -> impl Iterator<Item = &ServiceRef> {
        self.0.iter().map(ByParent::parent)
    }
}

/// Built at once, with full nodes; of two tables for the same parent, the later is kept.
impl FromIterator<ServiceRoutes> for RouteTables {
    fn from_iter<I: IntoIterator<Item = ServiceRoutes>>(iter: I) -> Self {
        // Collected, a set sorts its elements (stably) and keeps the last of equal ones.
        Self(iter.into_iter().map(ByParent).collect())
    }
}

/// A service's compiled route table, with the [`Route`] of each rule built the first time a
/// request takes it and shared by the requests that follow (so a request does not copy its
/// rule, and the metrics series resolved on the route are kept). The routes live inside the
/// value that holds the table, so a new table from discovery comes with none built.
#[derive(Clone, Debug)]
pub struct ServiceRoutes {
    compiled: CompiledRoutes,
    /// A cell per rule, made on the table's first request: most tables a proxy holds are never
    /// asked for.
    built: OnceLock<Box<[OnceLock<Arc<Route>>]>>,
}

impl ServiceRoutes {
    /// A compiled table, no route built yet.
    pub fn new(compiled: CompiledRoutes) -> Self {
        Self {
            compiled,
            built: OnceLock::new(),
        }
    }

    /// The route of rule `i`, built with `build` the first time.
    pub fn built(&self, i: usize, build: impl FnOnce() -> Route) -> Arc<Route> {
        let built = self.built.get_or_init(|| {
            let rules = self.compiled.table().rules.len();
            (0..rules).map(|_| OnceLock::new()).collect()
        });
        match built.get(i) {
            Some(cell) => cell.get_or_init(|| Arc::new(build())).clone(),
            None => Arc::new(build()),
        }
    }
}

impl std::ops::Deref for ServiceRoutes {
    type Target = CompiledRoutes;

    fn deref(&self) -> &CompiledRoutes {
        &self.compiled
    }
}

/// The catch-all routes of services without a route table (see
/// [`Route::select`]), each built on a service's first request and
/// shared by the requests that follow. A catch-all route depends on nothing but its service,
/// so an entry is never stale; copies of the tables start empty and the map is emptied when
/// it reaches [`DefaultRoutes::MAX`], which bounds what services that come and go leave here.
#[derive(Debug, Default)]
pub struct DefaultRoutes(Mutex<BTreeMap<ServiceRef, Arc<Route>>>);

impl DefaultRoutes {
    /// Most routes kept.
    pub const MAX: usize = 4096;

    /// The catch-all route of `service`, built with `build` the first time.
    pub fn get_or_build(&self, service: &ServiceRef, build: impl FnOnce() -> Route) -> Arc<Route> {
        let mut routes = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(route) = routes.get(service) {
            return route.clone();
        }
        if routes.len() >= Self::MAX {
            routes.clear();
        }
        let route = Arc::new(build());
        routes.insert(service.clone(), route.clone());
        route
    }
}

impl Clone for DefaultRoutes {
    fn clone(&self) -> Self {
        Self::default()
    }
}

/// The shared, swappable tables.
pub type SharedTables = tokio::sync::watch::Receiver<Arc<Tables>>;

/// Turns what a client put in Host (or an absolute-form URI) into the service it means:
/// `name:port` is in namespace `default`; `name.ns`, `name.ns.svc` and
/// `name.ns.svc.cluster.local` all name service `name` in `ns`. Port 80 is implied when absent.
pub fn parse_authority(authority: &str) -> Option<ServiceRef> {
    let (host, port) = match authority.rsplit_once(':') {
        Some((h, p)) => (h, p.parse().ok()?),
        None => (authority, 80),
    };
    let host = host
        .trim_end_matches('.')
        .trim_end_matches(".cluster.local")
        .trim_end_matches(".svc");
    let mut parts = host.split('.');
    let name = parts.next().filter(|n| !n.is_empty())?;
    let namespace = parts.next().unwrap_or("default");
    if parts.next().is_some() {
        return None;
    }
    Some(ServiceRef::new(name, namespace, port))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `/config` shows what the tables were built from, in the same shape, with no copy.
    #[test]
    fn the_config_view_is_the_config_the_tables_hold() {
        let config: StaticConfig = serde_yaml::from_str(
            r#"
routes:
  - parent: web.shop:80
    rules:
      - name: main
        matches: [{path: {type: PathPrefix, value: /api}}]
        backends: [{service: web-v1.shop:80, weight: 90}, {service: web-v2.shop:80, weight: 10}]
endpoints:
  - service: web-v1.shop:80
    endpoints: [{addr: "10.0.0.1:8080", identity: "spiffe://cluster.local/ns/shop/sa/web"}]
  - service: web-v2.shop:80
    endpoints: []
addresses:
  - {addr: "10.96.0.10:80", service: web.shop:80}
"#,
        )
        .unwrap();
        let tables = Tables::from_config(config.clone()).unwrap();
        let shown = serde_json::to_value(tables.config_view()).unwrap();
        assert_eq!(shown, serde_json::to_value(&config).unwrap());
        // Without service addresses the key is left out, as a StaticConfig leaves it.
        let bare = Tables::from_config(StaticConfig {
            addresses: Vec::new(),
            ..config
        })
        .unwrap();
        let shown = serde_json::to_value(bare.config_view()).unwrap();
        assert!(shown.get("addresses").is_none(), "{shown}");
        assert_eq!(shown["endpoints"].as_array().unwrap().len(), 2);
    }

    /// Built at once, the maps keep what inserting one entry at a time kept: a later table or
    /// endpoint list for the same service wins, a service's own address wins over an endpoint
    /// at it, and the first endpoint listed at an address wins over later ones.
    #[test]
    fn a_static_config_keeps_the_entries_that_win() {
        let config: StaticConfig = serde_yaml::from_str(
            r#"
routes:
  - parent: web.shop:80
    rules: [{name: first, backends: [{service: web-v1.shop:80, weight: 1}]}]
  - parent: web.shop:80
    rules: [{name: second, backends: [{service: web-v2.shop:80, weight: 1}]}]
endpoints:
  - service: web-v1.shop:80
    endpoints: [{addr: "10.0.0.1:8080", identity: "spiffe://cluster.local/ns/shop/sa/v1"}]
  - service: web-v2.shop:80
    endpoints: [{addr: "10.0.0.1:8080"}, {addr: "10.0.0.2:8080"}, {addr: "10.96.0.10:80"}]
  - service: web-v2.shop:80
    endpoints: [{addr: "10.0.0.2:8080", identity: "spiffe://cluster.local/ns/shop/sa/v2"}]
addresses:
  - {addr: "10.96.0.10:80", service: web.shop:80}
"#,
        )
        .unwrap();
        let t = Tables::from_config(config).unwrap();
        let web = ServiceRef::new("web", "shop", 80);
        let v1 = ServiceRef::new("web-v1", "shop", 80);
        let v2 = ServiceRef::new("web-v2", "shop", 80);
        assert_eq!(t.routes.get(&web).unwrap().table().rules[0].name, "second");
        assert_eq!(t.routes.keys().count(), 1);
        assert_eq!(t.endpoints[&v2].len(), 1, "the later list wins");
        let at = |addr: &str| {
            let addr: std::net::SocketAddr = addr.parse().unwrap();
            let known = t.addresses[&addr].as_ref().unwrap();
            let identity = known
                .endpoint(addr, &t)
                .map(|e| e.identity.as_deref().unwrap_or("none").to_string());
            (known.service.clone(), identity)
        };
        // Listed first under web-v1: its endpoint, read from web-v1's list.
        assert_eq!(
            at("10.0.0.1:8080"),
            (v1, Some("spiffe://cluster.local/ns/shop/sa/v1".into()))
        );
        // The endpoint is read from the list the tables hold, not a copy of the first one.
        assert_eq!(
            at("10.0.0.2:8080"),
            (v2, Some("spiffe://cluster.local/ns/shop/sa/v2".into()))
        );
        // The service's own address, though an endpoint was listed at it.
        assert_eq!(at("10.96.0.10:80"), (web, None));
        assert!(
            t.addresses[&"10.96.0.10:80".parse().unwrap()]
                .as_ref()
                .unwrap()
                .is_service()
        );
    }

    /// What discovery answers for an address is kept as answered: the service's endpoints may
    /// not be known yet.
    #[test]
    fn an_answered_endpoint_needs_no_endpoint_list() {
        let addr: std::net::SocketAddr = "10.0.0.9:8080".parse().unwrap();
        let endpoint = Endpoint {
            addr,
            identity: Some("spiffe://cluster.local/ns/shop/sa/db".into()),
            labels: Default::default(),
            deployment: Some("db".into()),
        };
        let known = Address::answered(MeshAddress {
            service: ServiceRef::new("db", "shop", 5432),
            endpoint: Some(endpoint.clone()),
        });
        assert!(!known.is_service());
        assert_eq!(known.endpoint(addr, &Tables::default()), Some(&endpoint));
        let own = Address::answered(MeshAddress {
            service: ServiceRef::new("db", "shop", 5432),
            endpoint: None,
        });
        assert!(own.is_service());
        assert_eq!(own.endpoint(addr, &Tables::default()), None);
    }

    #[test]
    fn authorities_name_services_the_kubernetes_way() {
        let web = ServiceRef::new("web", "default", 8080);
        assert_eq!(parse_authority("web:8080"), Some(web.clone()));
        assert_eq!(parse_authority("web.default:8080"), Some(web.clone()));
        assert_eq!(parse_authority("web.default.svc:8080"), Some(web.clone()));
        assert_eq!(
            parse_authority("web.default.svc.cluster.local:8080"),
            Some(web)
        );
        assert_eq!(
            parse_authority("web.shop"),
            Some(ServiceRef::new("web", "shop", 80))
        );
        assert_eq!(parse_authority("example.com.evil.org:80"), None);
        assert_eq!(parse_authority("web:http"), None);
    }
}
