//! The control plane, `mesh-controlplane`: the single source of truth that tells every proxy
//! where traffic goes and who it is. It stores resources (an embedded transactional store, or
//! the Kubernetes API through reflectors) behind one [`store::ResourceStore`] trait and serves
//! them over a kubectl-style HTTP API ([`api`]); a pure [`index`] turns HTTPRoutes and workload
//! registrations into per-authority route tables and per-service endpoint sets, which long-lived
//! watch streams ([`proxy`]) carry to the sidecars over mTLS ([`tls`]); and it is the CA
//! ([`identity`]) that issues workload certificates, and its own for the proxy listener.

pub mod api;
pub mod config;
pub mod http;
pub mod identity;
pub mod index;
pub mod inject;
pub mod injector;
pub mod kubernetes;
pub mod proxy;
pub mod store;
pub mod tls;
pub mod tokenreview;
pub mod workloads;

use std::{
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use mesh_crds::validate::ResourceKind;
use tokio::net::TcpListener;

use crate::{
    config::Config,
    identity::{Ca, IdentityError},
    index::Index,
    proxy::Shared,
    store::{
        EventType, ObjectKey, ResourceStore, Selector, StoreError, Watcher, embedded::EmbeddedStore,
    },
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
                leases: Mutex::new(Leases::new(config.workload_ttl)),
                ca,
                kube: std::sync::OnceLock::new(),
            }),
            proxy_tls: Arc::new(proxy_tls),
            trust_roots_file,
        })
    }

    /// The file holding the trust roots that verify the proxy listener (and every workload
    /// certificate), PEM.
    pub fn trust_roots_file(&self) -> &Path {
        &self.trust_roots_file
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
    pub async fn serve(self, api: TcpListener, proxy: TcpListener) {
        tokio::spawn(feed_index(self.store.clone(), Arc::clone(&self.shared)));
        tokio::spawn(sweep_workloads(Arc::clone(&self.shared)));
        self.serve_apis(api, proxy).await;
    }

    /// Serves the resource API (plaintext, for the CLI on loopback) and the proxy API (mTLS);
    /// whatever feeds the index runs beside it.
    async fn serve_apis(self, api: TcpListener, proxy: TcpListener) {
        let store = Arc::new(self.store);
        let shared = self.shared;
        tokio::spawn(Arc::clone(&self.proxy_tls).renew(Arc::clone(&shared)));
        let api_server = http::serve(api, "api", move |req| api::handle(Arc::clone(&store), req));
        let proxy_server = http::serve_tls(proxy, "proxy", self.proxy_tls.config(), move |req| {
            proxy::handle(Arc::clone(&shared), req)
        });
        tokio::join!(api_server, proxy_server);
    }
}

/// Keeps the index in step with the store's HTTPRoutes: a snapshot resets it, deltas follow, and
/// a watch that falls out of the store's history starts over with a fresh snapshot.
async fn feed_index<S: ResourceStore>(store: S, shared: Arc<Shared>) {
    let selector = Selector::kind(ResourceKind::HttpRoute, None);
    loop {
        let mut watcher = match store.watch(selector.clone(), None) {
            Ok(w) => w,
            Err(e) => {
                tracing::error!(error = %e, "cannot watch HTTPRoutes; retrying");
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
                    tracing::warn!(error = %e, "HTTPRoute watch ended; relisting");
                    break;
                }
            };
            let route = index::parse_route(&event.object);
            match (event.kind, synced) {
                (EventType::Bookmark, false) => {
                    shared.index().reset_routes(&snapshot);
                    snapshot.clear();
                    synced = true;
                }
                (EventType::Bookmark, true) => {}
                (EventType::Added | EventType::Modified, false) => snapshot.extend(route),
                (EventType::Added | EventType::Modified, true) => {
                    if let Some(route) = route {
                        shared.index().apply_route(&route);
                    }
                }
                (EventType::Deleted, _) => {
                    let key = ObjectKey::of(ResourceKind::HttpRoute, &event.object);
                    shared.index().delete_route(&key.namespace, &key.name);
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
