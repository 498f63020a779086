//! Discovery from the control plane: long-lived watch streams of route tables (per authority)
//! and endpoints (per backend service), merged into the proxy's [`Tables`].
//!
//! Each stream is newline-delimited JSON, one whole value per line (see
//! `mesh_core::proxy_api`). A broken stream keeps the last value it delivered (fail static) and
//! reconnects with backoff; the first line after a reconnect replaces whatever was held, so a
//! resync needs no special case. Route tables name backends, and watching a table starts
//! watches of its backends' (and its mirrors') endpoints.
//!
//! The control plane serves the streams only to clients presenting a workload certificate, so
//! every stream waits until the proxy holds its first one (its connection then presents it).

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use mesh_core::proxy_api::{
    Endpoints, MeshAddress, PolicyTarget, RouteTable, ServiceRef, Update, WATCH_ADDRESS_PATH,
    WATCH_ENDPOINTS_PATH, WATCH_POLICY_PATH, WATCH_ROUTES_PATH,
};
use mesh_core::routing::CompiledRoutes;
use mesh_policies::InboundPolicy;
use serde::de::DeserializeOwned;
use tokio::sync::watch;

use crate::identity::SharedCredentials;
use crate::tables::Tables;

/// Longest wait between reconnects.
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// Starts and owns the watches.
#[derive(Clone, Debug)]
pub struct Discovery {
    base: String,
    client: reqwest::Client,
    credentials: SharedCredentials,
    tables: watch::Sender<Arc<Tables>>,
    watched_routes: Arc<Mutex<BTreeSet<ServiceRef>>>,
    watched_endpoints: Arc<Mutex<BTreeSet<ServiceRef>>>,
    watched_addresses: Arc<Mutex<BTreeSet<std::net::SocketAddr>>>,
}

impl Discovery {
    /// Discovery from the control plane's proxy API at `base` (`https://host:port`), publishing
    /// into `tables`, once `credentials` hold a certificate for `client` to present.
    pub fn new(
        base: &str,
        client: reqwest::Client,
        credentials: SharedCredentials,
        tables: watch::Sender<Arc<Tables>>,
    ) -> Self {
        Self {
            base: base.to_string(),
            client,
            credentials,
            tables,
            watched_routes: Arc::default(),
            watched_endpoints: Arc::default(),
            watched_addresses: Arc::default(),
        }
    }

    /// Watches the routes of `authority` (idempotent), and the endpoints it leads to.
    pub fn watch_authority(&self, authority: &ServiceRef) {
        let fresh = self
            .watched_routes
            .lock()
            .map(|mut w| w.insert(authority.clone()))
            .unwrap_or(false);
        if !fresh {
            return;
        }
        // An authority with no HTTPRoute is served by its own endpoints.
        self.watch_endpoints(authority);
        let this = self.clone();
        let key = authority.clone();
        let url = format!("{}{WATCH_ROUTES_PATH}?authority={key}", self.base);
        tokio::spawn(async move {
            this.stream::<RouteTable>(url, |this, update| {
                let key = key.clone();
                if let Some(table) = &update.value {
                    for rule in &table.rules {
                        for b in &rule.backends {
                            this.watch_endpoints(&b.service);
                        }
                        // Mirrors too; a request does not wait for them (see `resolved`).
                        for m in rule.mirror_backends() {
                            this.watch_endpoints(m);
                        }
                    }
                }
                // The table is the authority's, whatever parent it names: the tables are
                // looked up by the authority asked for.
                let compiled = update
                    .value
                    .map(|mut table| {
                        table.parent = key.clone();
                        CompiledRoutes::new(table)
                    })
                    .transpose()
                    .map_err(|e| tracing::warn!(%key, error = %e, "ignoring route table"));
                if let Ok(compiled) = compiled {
                    this.tables.send_modify(|t| {
                        let t = Arc::make_mut(t);
                        t.answered_routes.insert(key.clone());
                        match compiled {
                            Some(c) => t.routes.insert(crate::tables::ServiceRoutes::new(c)),
                            None => t.routes.remove(&key),
                        };
                    });
                }
            })
            .await;
        });
    }

    /// Watches what the original destination `addr` is in the mesh (idempotent), and the
    /// routes of the service it belongs to.
    pub fn watch_address(&self, addr: std::net::SocketAddr) {
        let fresh = self
            .watched_addresses
            .lock()
            .map(|mut w| w.insert(addr))
            .unwrap_or(false);
        if !fresh {
            return;
        }
        let this = self.clone();
        let url = format!("{}{WATCH_ADDRESS_PATH}?addr={addr}", self.base);
        tokio::spawn(async move {
            this.stream::<MeshAddress>(url, move |this, update| {
                if let Some(meshed) = &update.value {
                    this.watch_authority(&meshed.service);
                }
                this.tables.send_modify(|t| {
                    Arc::make_mut(t)
                        .addresses
                        .insert(addr, update.value.map(crate::tables::Address::answered));
                });
            })
            .await;
        });
    }

    fn watch_endpoints(&self, service: &ServiceRef) {
        let fresh = self
            .watched_endpoints
            .lock()
            .map(|mut w| w.insert(service.clone()))
            .unwrap_or(false);
        if !fresh {
            return;
        }
        let this = self.clone();
        let key = service.clone();
        let url = format!("{}{WATCH_ENDPOINTS_PATH}?service={key}", self.base);
        tokio::spawn(async move {
            this.stream::<Endpoints>(url, |this, update| {
                let key = key.clone();
                this.tables.send_modify(|t| {
                    let t = Arc::make_mut(t);
                    // An unknown service is known to have no endpoints: the entry stays, empty.
                    let endpoints = update.value.map(|e| e.endpoints).unwrap_or_default();
                    t.endpoints.insert(key, endpoints);
                });
            })
            .await;
        });
    }

    /// Follows the inbound policy of `target`, publishing each new value into `policy`. Until
    /// the first answer, and whenever the control plane is away, `policy` keeps what it held.
    pub fn watch_policy(&self, target: &PolicyTarget, policy: watch::Sender<Arc<InboundPolicy>>) {
        let url = match reqwest::Url::parse_with_params(
            &format!("{}{WATCH_POLICY_PATH}", self.base),
            [
                ("namespace", target.namespace.clone()),
                ("port", target.port.to_string()),
                ("labels", target.labels_param()),
            ],
        ) {
            Ok(url) => url.to_string(),
            Err(error) => {
                tracing::error!(%error, "cannot build the policy watch URL");
                return;
            }
        };
        let this = self.clone();
        tokio::spawn(async move {
            this.stream::<InboundPolicy>(url, move |_, update| {
                if let Some(value) = update.value {
                    tracing::info!(server = %value.server, "inbound policy updated");
                    policy.send_replace(Arc::new(value));
                }
            })
            .await;
        });
    }

    /// Follows one stream forever, reconnecting with backoff; `apply` sees each newer update.
    async fn stream<T: DeserializeOwned>(&self, url: String, apply: impl Fn(&Self, Update<T>)) {
        // Unauthenticated, the control plane would answer 401.
        let _ = self.credentials.clone().wait_for(Option::is_some).await;
        let mut version = 0u64;
        let mut backoff = Duration::from_millis(100);
        loop {
            match self.follow(&url, &mut version, &apply).await {
                Ok(()) => tracing::info!(%url, "watch ended; reconnecting"),
                Err(error) => tracing::warn!(%url, %error, "watch failed; keeping last config"),
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
    }

    async fn follow<T: DeserializeOwned>(
        &self,
        url: &str,
        version: &mut u64,
        apply: &impl Fn(&Self, Update<T>),
    ) -> Result<(), String> {
        let mut rsp = self
            .client
            .get(url)
            .send()
            .await
            .and_then(reqwest::Response::error_for_status)
            .map_err(|e| mesh_core::error::chain(&e))?;
        let mut buf = Vec::new();
        let mut first = true;
        while let Some(chunk) = rsp.chunk().await.map_err(|e| mesh_core::error::chain(&e))? {
            buf.extend_from_slice(&chunk);
            while let Some(nl) = buf.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = buf.drain(..=nl).collect();
                if line.iter().all(u8::is_ascii_whitespace) {
                    continue;
                }
                let update: Update<T> = serde_json::from_slice(&line)
                    .map_err(|e| format!("bad update from {url}: {e}"))?;
                // After a reconnect the control plane may have restarted with a lower version;
                // its first message is the truth.
                if first || update.version > *version {
                    *version = update.version;
                    first = false;
                    apply(self, update);
                }
            }
        }
        Ok(())
    }
}
