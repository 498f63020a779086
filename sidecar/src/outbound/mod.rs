//! The outbound listener: every request the local app sends to another service. It accepts
//! HTTP/1.1 (origin-form with Host, and absolute-form so apps can use `HTTP_PROXY`) and HTTP/2
//! with prior knowledge, works out each request's [`Target`], waits (briefly) for discovery to
//! answer for it, and hands it to a stack of `tower` layers built once per proxy:
//!
//! ```text
//! route      authority -> route table -> first matching rule (404 when none)     route.rs
//! filters    header modifiers, fault delays and aborts                            filters.rs
//! timeout    the rule's request timeout, over all attempts (504)                  timeout.rs
//! retry      the rule's retry policy under the route's retry budget              retry.rs
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
pub mod error;
pub mod filters;
pub mod metrics;
pub mod retry;
pub mod route;
pub mod split;
pub mod target;
pub mod timeout;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::Duration;

use http::{Request, Response};
use hyper::body::Incoming;
use mesh_core::proxy_api::ServiceRef;
use tokio::net::TcpListener;
use tower::{ServiceBuilder, ServiceExt};

use crate::balance::{BalanceConfig, Balancer};
use crate::discovery::Discovery;
use crate::drain::Watch;
use crate::http::{Body, CONNECT_TIMEOUT};
use crate::identity::SharedCredentials;
use crate::metrics::Metrics;
use crate::tables::{SharedTables, Tables};

use self::balance::BalanceLayer;
use self::client::{Client, MtlsClients, PlainClient};
use self::error::Error;
use self::filters::FiltersLayer;
use self::metrics::MetricsLayer;
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

/// The stack every outbound request goes through, top to bottom.
type Stack = route::RouteService<
    filters::Filters<
        timeout::Timeout<
            retry::Retry<
                split::Split<balance::Balance<metrics::Record<Client<PlainClient, MtlsClients>>>>,
            >,
        >,
    >,
>;

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
    stack: Stack,
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
        let stack = stack(
            &tables,
            &metrics,
            &balancer,
            &budgets,
            connect_timeout,
            None,
        );
        Self {
            tables,
            discovery,
            metrics,
            connect_timeout,
            balancer,
            budgets,
            mtls: None,
            stack,
            pruned: Mutex::default(),
        }
    }

    /// Reaches meshed endpoints over mTLS with the certificate in `credentials`.
    pub fn with_identity(mut self, credentials: SharedCredentials) -> Self {
        let mtls = MtlsClients::new(credentials, self.connect_timeout);
        self.stack = stack(
            &self.tables,
            &self.metrics,
            &self.balancer,
            &self.budgets,
            self.connect_timeout,
            Some(mtls.clone()),
        );
        self.mtls = Some(mtls);
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
    pub async fn handle(&self, request: Request<Incoming>) -> Response<Body> {
        let target = match Target::from_request(&request) {
            Ok(target) => target,
            Err(e) => return e.into_response(),
        };
        let tables = self.discover(target.service()).await;
        self.prune(&tables);
        let req = Targeted {
            target,
            tables,
            request,
        };
        self.stack
            .clone()
            .oneshot(req)
            .await
            .unwrap_or_else(Error::into_response)
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

/// Assembles the stack, once per proxy; requests carry what differs per route and backend.
fn stack(
    tables: &SharedTables,
    metrics: &Metrics,
    balancer: &Arc<Balancer>,
    budgets: &Arc<Budgets>,
    connect_timeout: Duration,
    mtls: Option<MtlsClients>,
) -> Stack {
    ServiceBuilder::new()
        .layer(RouteLayer)
        .layer(FiltersLayer)
        .layer(TimeoutLayer)
        .layer(RetryLayer::new(
            tables.clone(),
            budgets.clone(),
            metrics.clone(),
        ))
        .layer(SplitLayer::new(balancer.clone()))
        .layer(BalanceLayer::new(balancer.clone()))
        .layer(MetricsLayer::new(metrics.clone()))
        .service(Client::new(PlainClient::new(connect_timeout), mtls))
}
