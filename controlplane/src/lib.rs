//! The control plane, `mesh-controlplane`: the single source of truth that tells every proxy
//! where traffic goes and who it is. It stores resources (an embedded transactional store, or
//! the Kubernetes API through reflectors) behind one [`mesh_store::ResourceStore`] trait and serves
//! them over a kubectl-style HTTP API ([`api`]); a pure [`index`] turns HTTPRoutes and workload
//! registrations into per-authority route tables and per-service endpoint sets, which long-lived
//! watch streams ([`proxy`]) carry to the sidecars over mTLS ([`tls`]); and it is the CA
//! ([`identity`]) that issues workload certificates, and its own for the proxy listener.

pub mod access;
pub mod api;
pub mod config;
pub mod conn_threads;
pub mod http;
pub mod identity;
pub mod index;
pub mod inject;
pub mod injector;
pub mod kubernetes;
pub mod metrics;
pub mod observe;
pub mod policy;
pub mod proxy;
pub mod publish;
pub mod route_status;
pub mod tap_access;
pub mod tls;
pub mod tokenreview;
pub mod workloads;

use std::{
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use mesh_crds::validate::ResourceKind;
use mesh_store::{
    EventType, ObjectKey, ResourceStore, Selector, StoreError, Watcher, embedded::EmbeddedStore,
};
use tokio::net::TcpListener;

use crate::{
    config::Config,
    identity::{Ca, IdentityError},
    index::Index,
    proxy::Shared,
    tls::{ProxyTls, ServerNames, TlsError},
    workloads::Leases,
};

/// Why the control plane could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The store could not be opened. (The message leaves the cause to the error chain, so
    /// `{:#}` does not print it twice.)
    #[error("opening the resource store")]
    Store(#[from] StoreError),
    /// The CA could not be loaded or created.
    #[error("loading the identity CA")]
    Identity(#[from] IdentityError),
    /// The proxy listener's TLS could not be set up.
    #[error("setting up the proxy API's TLS")]
    Tls(#[from] TlsError),
}

/// A control plane with its state opened, ready to serve.
pub struct ControlPlane {
    store: EmbeddedStore,
    shared: Arc<Shared>,
    proxy_tls: Arc<ProxyTls>,
    trust_roots_file: PathBuf,
    api_token: access::ApiToken,
    observe: observe::Observe,
    scrape_interval: Duration,
}

impl ControlPlane {
    /// Opens the store and the CA in the configured state directory, writes the trust roots
    /// there ([`identity::TRUST_ROOTS_FILE`]) and issues the proxy listener's certificate.
    pub fn open(config: &Config) -> Result<Self, StartError> {
        let store = EmbeddedStore::open(&config.state_dir, config.watch_history)?;
        let ca = match &config.issuer_dir {
            Some(issuer) => Ca::load_issuer(
                issuer,
                &config.state_dir,
                &config.trust_domain,
                config.cert_lifetime,
            )?,
            None => Ca::load_or_create(
                &config.state_dir,
                &config.trust_domain,
                config.cert_lifetime,
            )?,
        };
        let trust_roots_file = ca.write_trust_roots(&config.state_dir)?;
        let api_token = access::ApiToken::load_or_create(&config.state_dir)?;
        let proxy_tls = ProxyTls::new(&ca, ServerNames::for_listener(config.proxy_addr.ip()))?;
        // Versions proxies see start from the clock, so they keep growing across restarts of
        // the control plane and a proxy never mistakes a fresh value for a stale one.
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX / 2))
            .unwrap_or_default();
        Ok(Self {
            store,
            shared: Arc::new(Shared {
                index: Mutex::new(Index::new(seed)),
                policy: Mutex::new(policy::PolicyIndex::new(
                    seed,
                    &config.trust_domain,
                    config.default_inbound_policy,
                )),
                leases: Mutex::new(Leases::new(config.workload_ttl)),
                ca: Arc::new(ca),
                kube: std::sync::OnceLock::new(),
                metrics: Arc::default(),
            }),
            proxy_tls: Arc::new(proxy_tls),
            trust_roots_file,
            api_token,
            observe: observe::Observe::default(),
            scrape_interval: config.scrape_interval,
        })
    }

    /// The file holding the trust roots that verify the proxy listener (and every workload
    /// certificate), PEM.
    pub fn trust_roots_file(&self) -> &Path {
        &self.trust_roots_file
    }

    /// The file holding the resource API's token ([`access`]).
    pub fn api_token_file(&self) -> &Path {
        self.api_token.path()
    }

    /// The tap token proxies in a cluster admit ([`mesh_core::tap`]); the injector gives
    /// them its digest.
    pub fn tap_token(&self) -> &str {
        self.shared.ca.tap_token()
    }

    /// The trust roots, PEM.
    pub fn trust_roots_pem(&self) -> &str {
        self.shared.ca.trust_roots_pem()
    }

    /// The store.
    pub fn store(&self) -> &EmbeddedStore {
        &self.store
    }

    /// Serves the resource API and the proxy API until the process ends.
    ///
    /// The pointer to the API token ([`access::ApiToken::register`]) is left before this
    /// returns, not when the future is first polled: a caller that announces the address
    /// after calling this may be asked by `mesh` at once.
    pub fn serve(
        self,
        api: TcpListener,
        proxy: TcpListener,
    ) -> impl std::future::Future<Output = ()> + Send {
        if let Ok(addr) = api.local_addr() {
            self.api_token.register(addr);
        }
        async move {
            spawn_feeds(&self.store, &self.shared);
            tokio::spawn(sweep_workloads(Arc::clone(&self.shared)));
            self.observe
                .spawn_scraper(Arc::clone(&self.shared), self.scrape_interval);
            serve_apis(
                self.store,
                self.shared,
                &self.proxy_tls,
                &self.api_token,
                self.observe,
                api,
                proxy,
            )
            .await;
        }
    }
}

/// Feeds the indexes from `store`: HTTPRoutes into the discovery index, the policy kinds into
/// the policy index.
fn spawn_feeds<S: ResourceStore + Clone>(store: &S, shared: &Arc<Shared>) {
    let routes = Arc::clone(shared);
    tokio::spawn(feed(
        store.clone(),
        ResourceKind::HttpRoute,
        move |change| {
            let mut index = routes.index();
            match change {
                Change::Reset(objects) => {
                    let routes: Vec<_> = objects
                        .iter()
                        .filter_map(|o| index::parse_route(o))
                        .collect();
                    index.reset_routes(&routes);
                }
                Change::Apply(object) => {
                    if let Some(route) = index::parse_route(object) {
                        index.apply_route(&route);
                    }
                }
                Change::Delete(key) => index.delete_route(&key.namespace, &key.name),
            }
        },
    ));
    let grpc = Arc::clone(shared);
    tokio::spawn(feed(
        store.clone(),
        ResourceKind::GrpcRoute,
        move |change| {
            let mut index = grpc.index();
            match change {
                Change::Reset(objects) => {
                    let routes: Vec<_> = objects
                        .iter()
                        .filter_map(|o| index::parse_grpc_route(o))
                        .collect();
                    index.reset_grpc_routes(&routes);
                }
                Change::Apply(object) => {
                    if let Some(route) = index::parse_grpc_route(object) {
                        index.apply_grpc_route(&route);
                    }
                }
                Change::Delete(key) => index.delete_grpc_route(&key.namespace, &key.name),
            }
        },
    ));
    for kind in ResourceKind::POLICY {
        let shared = Arc::clone(shared);
        tokio::spawn(feed(store.clone(), kind, move |change| {
            let mut policy = shared.policy();
            match change {
                Change::Reset(objects) => policy.reset(kind, objects),
                Change::Apply(object) => policy.apply(kind, object),
                Change::Delete(key) => policy.delete(kind, &key.namespace, &key.name),
            }
        }));
    }
}

/// Serves the resource API over `store` (plaintext, for the CLI on loopback) and the proxy API
/// over `shared` (mTLS, with the certificate `proxy_tls` keeps renewed).
async fn serve_apis<S: ResourceStore>(
    store: S,
    shared: Arc<Shared>,
    proxy_tls: &Arc<ProxyTls>,
    api_token: &access::ApiToken,
    observe: observe::Observe,
    api: TcpListener,
    proxy: TcpListener,
) {
    // The resource API's and the metrics' store calls are timed.
    let store = Arc::new(metrics::Timed::new(store, Arc::clone(&shared.metrics)));
    tokio::spawn(Arc::clone(proxy_tls).renew(Arc::clone(&shared.ca)));
    let token = api_token.clone();
    // What the control plane presents to open a proxy's tap: in the embedded mesh the proxies
    // accept the resource API's token; in a cluster, the tap token whose digest the injector
    // gave them.
    let proxy_tap = if observe.is_cluster() {
        access::authorization(shared.ca.tap_token()).ok()
    } else {
        token.authorization().ok()
    };
    let sd = Arc::clone(&shared);
    // Both APIs' connections share one set of threads (see `conn_threads`).
    let threads = Arc::new(conn_threads::ConnectionThreads::for_current_runtime("mesh"));
    let api_server = http::serve(api, "api", Arc::clone(&threads), move |req| {
        let store = Arc::clone(&store);
        let admitted = token.admits(&req) || req.uri().path() == "/healthz";
        // Prometheus HTTP service discovery: the registered proxies' admin addresses, from the
        // index (the proxy API's state), behind the resource API's token like everything else.
        let get = admitted && req.method() == ::http::Method::GET;
        let targets = (get && req.uri().path() == mesh_core::proxy_api::HTTP_SD_PATH)
            .then(|| sd.index().scrape_targets());
        // The rollout metrics, from the Canaries in the store, and the control plane's own.
        let metrics = (get && req.uri().path() == METRICS_PATH).then(|| metrics_text(&*store, &sd));
        let observing = admitted && req.uri().path().starts_with(observe::PREFIX);
        let tapping = req.uri().path() == observe::TAP_PATH;
        let (observe, shared, proxy_tap) = (observe.clone(), Arc::clone(&sd), proxy_tap.clone());
        async move {
            match (admitted, targets, metrics) {
                (true, Some(targets), _) => http::json_response(::http::StatusCode::OK, &targets),
                (true, None, Some(text)) => http::text_response(text),
                (true, None, None) if observing => observe.handle(&shared, proxy_tap, &req).await,
                (true, None, None) => api::handle(store, req).await,
                // In a cluster, whoever the API server authorizes may tap.
                (false, ..) if tapping => {
                    observe
                        .handle_authorized_tap(&shared, proxy_tap, &req)
                        .await
                }
                (false, ..) => access::unauthorized(),
            }
        }
    });
    let proxy_server = http::serve_tls(proxy, "proxy", threads, proxy_tls.config(), move |req| {
        proxy::handle(Arc::clone(&shared), req)
    });
    tokio::join!(api_server, proxy_server);
}

/// Path of the control plane's metrics on the resource API: the rollout metrics of every
/// Canary (`mesh_crds::metrics`) and the control plane's own.
pub const METRICS_PATH: &str = "/metrics";

/// The exposition text [`METRICS_PATH`] serves.
fn metrics_text<S: ResourceStore>(store: &S, shared: &Shared) -> String {
    let canaries: Vec<mesh_crds::Canary> = store
        .list(&Selector::kind(ResourceKind::Canary, None))
        .map(|listed| {
            listed
                .items
                .iter()
                .filter_map(|v| serde_json::from_value((**v).clone()).ok())
                .collect()
        })
        .unwrap_or_default();
    let mut text = mesh_crds::metrics::exposition(&canaries, k8s_openapi::jiff::Timestamp::now());
    let proxies = shared.index().scrape_targets().len();
    text.push_str(&format!(
        "# HELP mesh_controlplane_registered_proxies Registered proxies that gave their admin address.\n\
         # TYPE mesh_controlplane_registered_proxies gauge\n\
         mesh_controlplane_registered_proxies {proxies}\n"
    ));
    text.push_str(&shared.metrics.exposition());
    text
}

/// A change to the objects of one kind, as [`feed`] hands it on.
enum Change<'a> {
    /// Every object of the kind, after a (re)list.
    Reset(&'a [Arc<serde_json::Value>]),
    /// An object was added or modified.
    Apply(&'a serde_json::Value),
    /// An object was deleted.
    Delete(ObjectKey),
}

/// Keeps `sink` in step with the store's objects of `kind`: a snapshot resets it, deltas
/// follow, and a watch that falls out of the store's history starts over with a fresh snapshot.
async fn feed<S: ResourceStore>(store: S, kind: ResourceKind, mut sink: impl FnMut(Change<'_>)) {
    let selector = Selector::kind(kind, None);
    loop {
        let mut watcher = match store.watch(selector.clone(), None) {
            Ok(w) => w,
            Err(e) => {
                tracing::error!(error = %e, %kind, "cannot watch the store; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        let mut snapshot = Vec::new();
        let mut synced = false;
        loop {
            let event = match watcher.next().await {
                Ok(e) => e,
                Err(e) => {
                    tracing::warn!(error = %e, %kind, "store watch ended; relisting");
                    break;
                }
            };
            match (event.kind, synced) {
                (EventType::Bookmark, false) => {
                    sink(Change::Reset(&snapshot));
                    snapshot.clear();
                    synced = true;
                }
                (EventType::Bookmark, true) => {}
                (EventType::Added | EventType::Modified, false) => snapshot.push(event.object),
                (EventType::Added | EventType::Modified, true) => {
                    sink(Change::Apply(&event.object));
                }
                (EventType::Deleted, _) => {
                    sink(Change::Delete(ObjectKey::of(kind, &event.object)));
                }
            }
        }
    }
}

async fn sweep_workloads(shared: Arc<Shared>) {
    let ttl = shared
        .leases
        .lock()
        .map(|l| l.ttl())
        .unwrap_or(Duration::from_secs(30));
    // Sweep a few times per TTL so a dead workload leaves within about 1.25 TTL.
    let mut tick = tokio::time::interval((ttl / 4).max(Duration::from_millis(50)));
    loop {
        tick.tick().await;
        let expired = shared.expire_workloads(Instant::now());
        if expired > 0 {
            tracing::info!(expired, "workload leases expired");
        }
    }
}
