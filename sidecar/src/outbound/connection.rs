//! The outbound listener's connections, before any request: where each was going and what it
//! speaks.
//!
//! In a pod, iptables redirects every outbound TCP connection of the app to this listener; the
//! kernel still knows the address the app dialled ([`crate::orig_dst`]). A connection that was
//! not redirected (an app using `HTTP_PROXY`, or naming the service in Host) is HTTP routed by
//! its requests' authority, as it always was. A redirected one is decided per connection:
//!
//! ```text
//! where    original destination -> a meshed service (its ClusterIP or an endpoint)   destination()
//!          or anything else (egress, unmeshed pods) -> passed through
//! what     port declared opaque -> opaque, never sniffed                             opaque::Ports
//!          else peek: HTTP/1 request line or h2 preface -> HTTP; TLS, anything else,
//!          or silence for the detect timeout (server-first) -> opaque                 opaque::detect
//! HTTP     meshed: routed by the service's table through the whole stack
//!          passthrough: each request to the original destination, through the same
//!          client and metrics layers at the bottom of the stack
//! opaque   meshed: a backend by weight and an endpoint by P2C, per connection; over mTLS
//!          (ALPN opaque) to meshed endpoints, whose proxies authorize it by identity
//!          (to the original destination when no endpoint can be picked)
//!          passthrough: byte for byte to the original destination
//! ```
//!
//! Every opaque connection is counted in the `tcp_*` families, labelled with where it went.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use http::{Request, Response};
use hyper::body::Incoming;
use mesh_core::proxy_api::{Endpoint, RouteRule, ServiceRef, WeightedBackend};
use mesh_core::routing::pick_backend;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;
use tower::ServiceExt;

use crate::balance::{InFlight, Outcome};
use crate::drain::Watch;
use crate::http::Body;
use crate::metrics::{RouteLabels, TcpLabels};
use crate::opaque::{Protocol, detect, relay};
use crate::outbound::Outbound;
use crate::outbound::balance::{self, ToEndpoint};
use crate::outbound::error::Error;
use crate::outbound::target::Target;
use crate::retry::Replayable;
use crate::tables::Route;
use crate::tables::Tables;

/// Where a redirected connection goes.
#[derive(Clone, Debug, PartialEq)]
pub enum Destination {
    /// A meshed service: HTTP is routed by its table, opaque TCP split across its backends (or
    /// sent to `endpoint`, when the app dialled one endpoint of the service).
    Meshed {
        /// The address the app dialled.
        addr: SocketAddr,
        /// The service it belongs to.
        service: ServiceRef,
        /// The endpoint, when the address is one.
        endpoint: Option<Endpoint>,
    },
    /// Anything else: forwarded untouched to the address the app dialled.
    Passthrough(SocketAddr),
}

/// Where a connection to the original destination `orig` goes, by what `tables` know of it.
pub fn destination(orig: SocketAddr, tables: &Tables) -> Destination {
    match tables.addresses.get(&orig) {
        Some(Some(known)) => Destination::Meshed {
            addr: orig,
            service: known.service.clone(),
            endpoint: known.endpoint(orig, tables).cloned(),
        },
        _ => Destination::Passthrough(orig),
    }
}

/// The backends an opaque connection to `service` is split across: those of its route table's
/// least specific rule (the last one; a canary's weighted split sits on the catch-all), or the
/// service itself when it has no table. A connection has no path or headers to match.
pub fn tcp_backends(tables: &Tables, service: &ServiceRef) -> Vec<WeightedBackend> {
    tables
        .routes
        .get(service)
        .and_then(|r| r.table().rules.last())
        .map(|rule| rule.backends.clone())
        .unwrap_or_else(|| {
            vec![WeightedBackend {
                service: service.clone(),
                weight: 1,
            }]
        })
}

/// Why an opaque connection could not be forwarded.
#[derive(Debug, thiserror::Error)]
pub enum TcpError {
    /// The endpoint is a peer proxy, and this proxy has no identity to reach it with.
    #[error("endpoint {addr} is meshed ({identity}) and this proxy has no identity")]
    NoIdentity {
        /// The endpoint.
        addr: SocketAddr,
        /// The identity it must present.
        identity: String,
    },
    /// Connecting (TCP, or mTLS to a peer proxy) failed.
    #[error(transparent)]
    Connect(#[from] crate::tls::ConnectError),
    /// The connection ended with an I/O error.
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

impl Outbound {
    /// Serves the outbound listener until `drain` fires and its connections finish.
    pub async fn serve(
        self: Arc<Self>,
        listener: TcpListener,
        mut drain: Watch,
    ) -> std::io::Result<()> {
        let mut connections = JoinSet::new();
        let cap = crate::limits::ConnectionCap::new(
            "outbound",
            self.limits.max_connections,
            &self.metrics,
        );
        // A slot is taken before accepting: at the cap, connections wait in the kernel's queue.
        let mut slot = None;
        loop {
            tokio::select! {
                admitted = cap.admit(), if slot.is_none() => match admitted {
                    Some(admitted) => slot = Some(admitted),
                    None => break,
                },
                accepted = listener.accept(), if slot.is_some() => {
                    let (io, peer) = accepted?;
                    let admitted = slot.take().map(crate::limits::Admitted::accepted);
                    let _ = io.set_nodelay(true);
                    let orig = crate::orig_dst::original_dst(&io);
                    let served = self.clone().serve_connection(io, peer, orig, drain.clone());
                    connections.spawn(async move {
                        // Held for as long as the connection is open.
                        let _admitted = admitted;
                        served.await;
                    });
                }
                // Reaps finished connections so the set only holds open ones.
                Some(_) = connections.join_next() => {}
                () = drain.signaled() => break,
            }
        }
        drop(listener);
        tracing::info!(
            open = connections.len(),
            "outbound listener draining its connections"
        );
        while connections.join_next().await.is_some() {}
        Ok(())
    }

    /// Serves one accepted connection from `peer`: `orig` is its original destination when it
    /// was redirected (see [`crate::orig_dst::original_dst`]), `None` when the app connected to
    /// the listener itself.
    pub async fn serve_connection(
        self: Arc<Self>,
        io: TcpStream,
        peer: SocketAddr,
        orig: Option<SocketAddr>,
        mut drain: Watch,
    ) {
        let Some(orig) = orig else {
            let this = self.clone();
            let handle = move |req| {
                let this = this.clone();
                async move { this.handle(req).await }
            };
            if let Err(error) =
                crate::drain::connection(io, handle, peer, None, drain, &self.limits).await
            {
                tracing::debug!(%peer, %error, "outbound connection ended with an error");
            }
            return;
        };
        let protocol = if self.opaque_ports.contains(orig.port()) {
            Protocol::Opaque
        } else {
            tokio::select! {
                p = detect(&io, Some(self.detect_timeout)) => p,
                () = drain.signaled() => return,
            }
        };
        let tables = self.resolve(orig).await;
        let dst = destination(orig, &tables);
        tracing::debug!(%peer, %orig, ?protocol, ?dst, "redirected outbound connection");
        if protocol != Protocol::Http {
            if let Err(error) = self.forward_tcp(io, &dst).await {
                tracing::debug!(%peer, %orig, %error, "outbound opaque connection ended with an error");
            }
            return;
        }
        let this = self.clone();
        let handle = move |req| {
            let this = this.clone();
            let dst = dst.clone();
            async move { this.handle_redirected(req, &dst).await }
        };
        if let Err(error) =
            crate::drain::connection(io, handle, peer, None, drain, &self.limits).await
        {
            tracing::debug!(%peer, %error, "outbound connection ended with an error");
        }
    }

    /// The tables, after making sure discovery has answered what `orig` is (waiting briefly
    /// the first time), and for a meshed service, its routes and endpoints.
    async fn resolve(&self, orig: SocketAddr) -> Arc<Tables> {
        let current = self.tables.borrow().clone();
        let Some(discovery) = &self.discovery else {
            return current;
        };
        if !current.addresses.contains_key(&orig) {
            discovery.watch_address(orig);
            let mut rx = self.tables.clone();
            let wait = rx.wait_for(|t| t.addresses.contains_key(&orig));
            let _ = tokio::time::timeout(super::DISCOVERY_WAIT, wait).await;
        }
        let tables = self.tables.borrow().clone();
        match destination(orig, &tables) {
            Destination::Meshed { service, .. } => self.discover(&service).await,
            Destination::Passthrough(_) => tables,
        }
    }

    /// One request on a redirected connection to `dst`.
    async fn handle_redirected(
        &self,
        request: Request<Incoming>,
        dst: &Destination,
    ) -> Response<Body> {
        match dst {
            // The app dialled one endpoint of the service (a pod IP, as a headless Service's
            // DNS answers): the request goes to that endpoint, over mTLS when it is meshed, and
            // the service's routes do not apply to it, as the Gateway API's mesh profile asks.
            Destination::Meshed {
                service,
                endpoint: Some(endpoint),
                ..
            } => {
                let route = Arc::new(Route::new(
                    service.clone(),
                    RouteRule::default(),
                    RouteLabels {
                        authority: service.authority(),
                        route: String::new(),
                    },
                ));
                let endpoint = balance::Endpoint {
                    addr: endpoint.addr,
                    identity: endpoint.identity.clone(),
                    deployment: endpoint.deployment.as_deref().unwrap_or_default().into(),
                };
                self.send_to(route, service.clone(), endpoint, request)
                    .await
            }
            Destination::Meshed { addr, service, .. } => {
                // A service with neither routes nor endpoints the proxy knows of: the address
                // the app dialled still leads somewhere, so the request goes there.
                let tables = self.tables.borrow().clone();
                if !tables.routes.contains_key(service) && !tables.available(service) {
                    return self.pass_through(*addr, request).await;
                }
                let target = Target::OrigDst {
                    addr: *addr,
                    service: service.clone(),
                };
                self.handle_target(target, request).await
            }
            Destination::Passthrough(addr) => self.pass_through(*addr, request).await,
        }
    }

    /// Sends a request to an address outside the mesh, as the app sent it, through the client
    /// and metrics layers every routed request ends in. Its metrics name the address as the
    /// authority and no destination service, so they never mix with a service's.
    ///
    /// An `Upgrade` (a WebSocket) the destination accepts becomes a tunnel to it, as on routed
    /// requests (see [`crate::tunnel`]).
    async fn pass_through(&self, addr: SocketAddr, request: Request<Incoming>) -> Response<Body> {
        let outside = ServiceRef::new("", "", addr.port());
        let route = Arc::new(Route::new(
            outside.clone(),
            RouteRule::default(),
            RouteLabels {
                authority: addr.to_string(),
                route: String::new(),
            },
        ));
        let endpoint = balance::Endpoint {
            addr,
            identity: None,
            deployment: "".into(),
        };
        self.send_to(route, outside, endpoint, request).await
    }

    /// Sends a request, as the app sent it, to one endpoint the app chose, through the client
    /// and metrics layers every routed request ends in (`route` names it in the metrics).
    async fn send_to(
        &self,
        route: Arc<Route>,
        backend: ServiceRef,
        endpoint: balance::Endpoint,
        mut request: Request<Incoming>,
    ) -> Response<Body> {
        let connect = request.method() == http::Method::CONNECT;
        // Taken before the request goes down, which keeps none of its extensions.
        let downstream =
            crate::tunnel::is_upgrade(&request).then(|| hyper::upgrade::on(&mut request));
        let authority = route.labels.authority.clone();
        let (parts, body) = request.into_parts();
        // Nothing is retried, so nothing of the body is kept.
        let Some(body) = Replayable::new(body, false, None).attempt() else {
            return Error::BodySent.into_response();
        };
        let attempt = ToEndpoint {
            route,
            backend,
            endpoint,
            request: Request::from_parts(parts, body),
        };
        let mut rsp = self
            .bottom
            .clone()
            .oneshot(attempt)
            .await
            .unwrap_or_else(Error::into_response);
        if let Some(downstream) = downstream
            && crate::tunnel::switched(connect, &rsp)
        {
            let labels = TcpLabels {
                direction: "outbound",
                authority,
                ..TcpLabels::default()
            };
            crate::tunnel::splice(downstream, &mut rsp, &self.metrics, labels);
        }
        rsp
    }

    /// Forwards an opaque connection to `dst` byte for byte.
    async fn forward_tcp(&self, io: TcpStream, dst: &Destination) -> Result<(), TcpError> {
        let tables = self.tables.borrow().clone();
        let (service, endpoint, backend, in_flight) = match dst {
            Destination::Passthrough(addr) => {
                let labels = TcpLabels {
                    direction: "outbound",
                    authority: addr.to_string(),
                    ..TcpLabels::default()
                };
                let timeout = self.connect_timeout;
                let addr = *addr;
                return Ok(relay(io, &labels, &self.metrics, async move {
                    connect_plain(addr, timeout).await
                })
                .await?);
            }
            Destination::Meshed {
                service,
                endpoint: Some(endpoint),
                ..
            } => {
                // The app chose this endpoint; the balancer only learns from it.
                let in_flight = self
                    .balancer
                    .pick(&[endpoint.addr], Instant::now(), |n| fastrand::usize(..n));
                (service, endpoint.clone(), service.clone(), in_flight)
            }
            Destination::Meshed { addr, service, .. } => {
                match self.pick_tcp_endpoint(&tables, service) {
                    Some((backend, endpoint, in_flight)) => {
                        (service, endpoint, backend, Some(in_flight))
                    }
                    // Discovery knows no endpoint that can take it (not answered yet, or all
                    // failing): the address the app dialled still leads somewhere (kube-proxy
                    // balances a ClusterIP), so the connection goes there rather than fail.
                    None => {
                        tracing::debug!(%service, %addr, "no endpoint picked; passing the connection through");
                        let labels = TcpLabels {
                            direction: "outbound",
                            authority: service.authority(),
                            ..TcpLabels::default()
                        };
                        let timeout = self.connect_timeout;
                        let addr = *addr;
                        return Ok(relay(io, &labels, &self.metrics, async move {
                            connect_plain(addr, timeout).await
                        })
                        .await?);
                    }
                }
            }
        };
        let labels = TcpLabels {
            direction: "outbound",
            authority: service.authority(),
            dst_service: backend.name.to_string(),
            dst_namespace: backend.namespace.to_string(),
            tls: if endpoint.identity.is_some() {
                "true"
            } else {
                ""
            },
        };
        let addr = endpoint.addr;
        let timeout = self.connect_timeout;
        let connected = Arc::new(AtomicBool::new(false));
        let mark = connected.clone();
        let result = match &endpoint.identity {
            None => {
                relay(io, &labels, &self.metrics, async move {
                    let tcp = connect_plain(addr, timeout).await?;
                    mark.store(true, Ordering::Relaxed);
                    Ok(tcp)
                })
                .await
            }
            Some(identity) => {
                let Some(credentials) = &self.credentials else {
                    return Err(TcpError::NoIdentity {
                        addr,
                        identity: identity.to_string(),
                    });
                };
                let config = crate::tls::opaque_client_config(credentials, identity)
                    .map_err(std::io::Error::other)?;
                relay(io, &labels, &self.metrics, async move {
                    let tls = crate::tls::connect_opaque(config, addr, timeout)
                        .await
                        .map_err(std::io::Error::other)?;
                    mark.store(true, Ordering::Relaxed);
                    Ok(tls)
                })
                .await
            }
        };
        // A connection's length says nothing of the endpoint's latency: only whether it could
        // be made is learned from.
        if let Some(in_flight) = in_flight {
            let outcome = if connected.load(Ordering::Relaxed) {
                Outcome::Success
            } else {
                Outcome::ConnectFailure
            };
            in_flight.finish(outcome, Instant::now());
        }
        Ok(result?)
    }

    /// A backend of `service` by weight and one of its endpoints by P2C, for one connection.
    fn pick_tcp_endpoint(
        &self,
        tables: &Tables,
        service: &ServiceRef,
    ) -> Option<(ServiceRef, Endpoint, InFlight)> {
        let backends = tcp_backends(tables, service);
        let now = Instant::now();
        let available = |i: usize| {
            let addrs = tables.addrs(&backends[i].service);
            !addrs.is_empty() && self.balancer.any_ready(&addrs, now)
        };
        let backend = backends[pick_backend(&backends, available, fastrand::f64())?]
            .service
            .clone();
        let addrs = tables.addrs(&backend);
        let picked = self.balancer.pick(&addrs, now, |n| fastrand::usize(..n))?;
        let addr = picked.addr();
        let endpoint = tables
            .endpoints
            .get(&backend)?
            .iter()
            .find(|e| e.addr == addr)?
            .clone();
        Some((backend, endpoint, picked))
    }
}

async fn connect_plain(addr: SocketAddr, timeout: Duration) -> std::io::Result<TcpStream> {
    let tcp = tokio::time::timeout(timeout, TcpStream::connect(addr))
        .await
        .map_err(|_| {
            std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("connecting to {addr} timed out"),
            )
        })??;
    let _ = tcp.set_nodelay(true);
    Ok(tcp)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::outbound::route::mk;

    const TABLES: &str = r#"
addresses:
  - {addr: "10.96.0.10:5432", service: db.default:5432}
routes:
  - parent: db.default:5432
    rules:
      - name: reads
        matches: [{path: {type: PathPrefix, value: /read}}]
        backends: [{service: db-replica.default:5432, weight: 1}]
      - name: split
        backends:
          - {service: db-primary.default:5432, weight: 9}
          - {service: db-canary.default:5432, weight: 1}
endpoints:
  - service: db-primary.default:5432
    endpoints: [{addr: "10.0.0.1:5432", identity: "spiffe://cluster.local/ns/default/sa/db"}]
  - service: db-canary.default:5432
    endpoints: [{addr: "10.0.0.2:5432"}]
"#;

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn a_services_address_is_meshed_and_anything_else_passes_through() {
        let tables = mk::tables(TABLES);
        let db = ServiceRef::new("db", "default", 5432);
        assert_eq!(
            destination(addr("10.96.0.10:5432"), &tables),
            Destination::Meshed {
                addr: addr("10.96.0.10:5432"),
                service: db,
                endpoint: None
            }
        );
        // One endpoint of a service, dialled directly: meshed, and pinned to that endpoint.
        let Destination::Meshed {
            service, endpoint, ..
        } = destination(addr("10.0.0.1:5432"), &tables)
        else {
            panic!("an endpoint's address is meshed");
        };
        assert_eq!(service, ServiceRef::new("db-primary", "default", 5432));
        assert_eq!(
            endpoint.unwrap().identity.as_deref(),
            Some("spiffe://cluster.local/ns/default/sa/db")
        );
        // Same IP, another port; an egress address; nothing known.
        for other in ["10.96.0.10:5433", "93.184.216.34:443", "127.0.0.1:6379"] {
            assert_eq!(
                destination(addr(other), &tables),
                Destination::Passthrough(addr(other)),
                "{other}"
            );
        }
    }

    #[test]
    fn discovery_saying_not_meshed_passes_through() {
        let mut tables = Tables::default();
        tables.addresses.insert(addr("10.1.2.3:80"), None);
        assert_eq!(
            destination(addr("10.1.2.3:80"), &tables),
            Destination::Passthrough(addr("10.1.2.3:80"))
        );
    }

    #[test]
    fn connections_split_by_the_catch_all_rule_or_go_to_the_service() {
        let tables = mk::tables(TABLES);
        let backends = tcp_backends(&tables, &ServiceRef::new("db", "default", 5432));
        let names: Vec<(String, u32)> = backends
            .iter()
            .map(|b| (b.service.name.to_string(), b.weight))
            .collect();
        assert_eq!(
            names,
            [("db-primary".to_string(), 9), ("db-canary".to_string(), 1)]
        );
        let unrouted = ServiceRef::new("cache", "default", 6379);
        let backends = tcp_backends(&tables, &unrouted);
        assert_eq!(backends.len(), 1);
        assert_eq!(backends[0].service, unrouted);
    }
}
