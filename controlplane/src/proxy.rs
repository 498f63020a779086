//! The proxy API (see `mesh_core::proxy_api`): discovery watch streams, certificate signing and
//! workload registration, on the proxy listener.
//!
//! The listener speaks mTLS ([`crate::tls`]), and each request is authorized by the identity in
//! its connection's client certificate ([`PeerIdentity`]): `certify` and `/ready` need none
//! (certify is authenticated by the proxy's token, and is how a proxy gets its first
//! certificate); watch streams and workload registration need one (401 without), a registration
//! may only name the identity of its certificate, and a lease is heartbeated and deleted only by
//! the identity that registered it (403 otherwise).
//!
//! Workloads register (`POST /v1/workloads`), heartbeat (`POST /v1/workloads/<id>/heartbeat`)
//! and deregister (`DELETE /v1/workloads/<id>`); a deregistered workload leaves its service's
//! endpoints at once rather than after the lease TTL.
//!
//! A watch stream subscribes to the index's channel for its key and writes the whole current
//! value as one NDJSON line, then one line per change. The channel keeps only the newest value,
//! so a proxy that reads slowly gets the latest state rather than a backlog.

#![allow(
    clippy::result_large_err,
    reason = "the error is the early response to a request, built once per request"
)]

use std::{
    sync::{Arc, Mutex, PoisonError},
    time::{Instant, SystemTime},
};

use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use mesh_core::proxy_api::{
    CERTIFY_PATH, CertifyRequest, NDJSON, PolicyTarget, ServiceRef, WATCH_ADDRESS_PATH,
    WATCH_ENDPOINTS_PATH, WATCH_POLICY_PATH, WATCH_ROUTES_PATH, WORKLOADS_PATH,
    WorkloadRegistration,
};
use serde::de::DeserializeOwned;
use serde_json::json;
use tokio::sync::watch;

use crate::{
    conn_threads::LocalWatch,
    http::{
        Body, PeerIdentity, full, json_response, ndjson_response, query_param, read_body,
        status_error,
    },
    identity::{Ca, IdentityError},
    index::Index,
    policy::PolicyIndex,
    publish::Published,
    workloads::{LeaseError, Leases, new_lease_id},
};

use crate::metrics::{WatchKind, Watcher};

/// What the proxy API works on.
pub struct Shared {
    /// The discovery index.
    pub index: Mutex<Index>,
    /// The policy index.
    pub policy: Mutex<PolicyIndex>,
    /// Workload leases.
    pub leases: Mutex<Leases>,
    /// The CA (shared with the task that renews the listener's certificate).
    pub ca: Arc<Ca>,
    /// In a cluster, the API that checks proxies' projected service-account tokens
    /// (TokenReview); unset, the embedded bootstrap token is the credential.
    pub kube: std::sync::OnceLock<kube::Client>,
    /// The control plane's own metrics: watchers, propagation, certificates.
    pub metrics: Arc<crate::metrics::Metrics>,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("ca", &self.ca)
            .field("in_cluster", &self.kube.get().is_some())
            .finish_non_exhaustive()
    }
}

impl Shared {
    /// Locks the index. Its methods leave it consistent even if a panic interrupts a publish,
    /// so a poisoned lock is used as is.
    pub fn index(&self) -> std::sync::MutexGuard<'_, Index> {
        self.index.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Locks the policy index (a poisoned lock is used as is, as with [`Self::index`]).
    pub fn policy(&self) -> std::sync::MutexGuard<'_, PolicyIndex> {
        self.policy.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn leases(&self) -> std::sync::MutexGuard<'_, Leases> {
        self.leases.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Ends the lease `id`, which `caller` registered, and withdraws its endpoint at once.
    pub fn deregister_workload(&self, id: &str, caller: &str) -> Result<(), LeaseError> {
        // The leases lock is released before the index is taken, as everywhere else, so the two
        // locks are never held together.
        self.leases().remove(id, caller, Instant::now())?;
        self.index().delete_workload(id);
        Ok(())
    }

    /// Drops expired workloads from the endpoints; returns how many.
    pub fn expire_workloads(&self, now: Instant) -> usize {
        let expired = self.leases().expire(now);
        if !expired.is_empty() {
            let mut index = self.index();
            for id in &expired {
                index.delete_workload(id);
            }
        }
        expired.len()
    }
}

fn bad_request(message: impl Into<String>) -> Response<Body> {
    status_error(StatusCode::BAD_REQUEST, "BadRequest", message, None)
}

fn forbidden(message: impl Into<String>) -> Response<Body> {
    status_error(StatusCode::FORBIDDEN, "Forbidden", message, None)
}

/// The verified identity of the request's client certificate, or the 401 that says one is
/// needed.
fn client_identity(req: &Request<Incoming>) -> Result<String, Response<Body>> {
    match req.extensions().get::<PeerIdentity>() {
        Some(PeerIdentity(id)) => Ok(id.clone()),
        None => Err(status_error(
            StatusCode::UNAUTHORIZED,
            "Unauthorized",
            format!(
                "{} {}: a client certificate issued by the mesh CA is required; proxies get one \
                 with POST {CERTIFY_PATH} and present it on the connection",
                req.method(),
                req.uri().path()
            ),
            None,
        )),
    }
}

/// The answer to a lease call `LeaseError` refused.
fn lease_refused(e: &LeaseError) -> Response<Body> {
    match e {
        LeaseError::Unknown(_) => status_error(
            StatusCode::NOT_FOUND,
            "NotFound",
            format!("{e}; register again"),
            None,
        ),
        LeaseError::NotOwner { .. } => forbidden(e.to_string()),
        LeaseError::Taken { .. } => {
            status_error(StatusCode::CONFLICT, "Conflict", e.to_string(), None)
        }
    }
}

/// Handles one proxy API request.
pub async fn handle(shared: Arc<Shared>, req: Request<Incoming>) -> Response<Body> {
    let path = req.uri().path().to_string();
    let query = req.uri().query().map(str::to_string);
    // Everything but readiness and certify is for holders of a mesh certificate; `caller` is
    // their identity (empty for the two open calls, which do not read it).
    let caller = match (req.method(), path.as_str()) {
        (&Method::GET, "/ready") | (&Method::POST, CERTIFY_PATH) => String::new(),
        _ => match client_identity(&req) {
            Ok(id) => id,
            Err(resp) => return resp,
        },
    };
    match (req.method(), path.as_str()) {
        (&Method::GET, "/ready") => json_response(StatusCode::OK, &json!({"status": "ok"})),
        (&Method::GET, WATCH_ROUTES_PATH) => match service_param(query.as_deref(), "authority") {
            Ok(authority) => {
                // The asking proxy's namespace, from its verified identity: consumer routes
                // in that namespace apply to it alone.
                let client = req
                    .extensions()
                    .get::<PeerIdentity>()
                    .and_then(|PeerIdentity(id)| id.parse::<mesh_core::SpiffeId>().ok())
                    .map(|id| id.namespace().to_string());
                stream(
                    shared
                        .index()
                        .watch_routes_from(&authority, client.as_deref()),
                    shared.metrics.watch(WatchKind::Routes),
                )
            }
            Err(resp) => resp,
        },
        (&Method::GET, WATCH_ENDPOINTS_PATH) => match service_param(query.as_deref(), "service") {
            Ok(service) => stream(
                shared.index().watch_endpoints(&service),
                shared.metrics.watch(WatchKind::Endpoints),
            ),
            Err(resp) => resp,
        },
        (&Method::GET, WATCH_ADDRESS_PATH) => match addr_param(query.as_deref()) {
            Ok(addr) => stream(
                shared.index().watch_address(addr),
                shared.metrics.watch(WatchKind::Address),
            ),
            Err(resp) => resp,
        },
        (&Method::GET, WATCH_POLICY_PATH) => match policy_target(query.as_deref()) {
            Ok(target) => stream(
                shared.policy().watch(&target),
                shared.metrics.watch(WatchKind::Policy),
            ),
            Err(resp) => resp,
        },
        (&Method::POST, CERTIFY_PATH) => {
            let request: CertifyRequest = match json_body(req).await {
                Ok(r) => r,
                Err(resp) => return resp,
            };
            let issued = match shared.kube.get() {
                Some(client) => match token_allows(client, &request).await {
                    Ok(()) => shared.ca.certify_authenticated(&request, SystemTime::now()),
                    Err(why) => {
                        return status_error(StatusCode::FORBIDDEN, "Forbidden", why, None);
                    }
                },
                None => shared.ca.certify(&request, SystemTime::now()),
            };
            match issued {
                Ok(resp) => {
                    shared.metrics.certificate_issued();
                    json_response(StatusCode::OK, &resp)
                }
                Err(e @ IdentityError::BadToken) => {
                    status_error(StatusCode::FORBIDDEN, "Forbidden", e.to_string(), None)
                }
                Err(e @ (IdentityError::BadIdentity { .. } | IdentityError::BadCsr(_))) => {
                    bad_request(e.to_string())
                }
                Err(e) => status_error(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "InternalError",
                    e.to_string(),
                    None,
                ),
            }
        }
        (&Method::POST, WORKLOADS_PATH) => {
            let registration: WorkloadRegistration = match json_body(req).await {
                Ok(r) => r,
                Err(resp) => return resp,
            };
            // Peers are told to expect the registered identity over mTLS: only the holder of
            // that identity's certificate may announce an endpoint under it.
            if let Some(claimed) = &registration.identity
                && *claimed != caller
            {
                return forbidden(format!(
                    "the registration names identity {claimed}, but the client certificate is \
                     for {caller}"
                ));
            }
            let id = new_lease_id();
            let registered =
                shared
                    .leases()
                    .register(id.clone(), registration.clone(), &caller, Instant::now());
            let (lease, replaced) = match registered {
                Ok(r) => r,
                Err(e) => return lease_refused(&e),
            };
            let mut index = shared.index();
            if let Some(old) = replaced {
                index.delete_workload(&old);
            }
            index.apply_workload(&id, registration);
            drop(index);
            json_response(StatusCode::CREATED, &lease)
        }
        (&Method::POST, p) if p.starts_with(WORKLOADS_PATH) => {
            let Some(id) = p
                .strip_prefix(WORKLOADS_PATH)
                .and_then(|r| r.strip_prefix('/'))
                .and_then(|r| r.strip_suffix("/heartbeat"))
            else {
                return status_error(
                    StatusCode::NOT_FOUND,
                    "NotFound",
                    format!("no API at {p}"),
                    None,
                );
            };
            match shared.leases().heartbeat(id, &caller, Instant::now()) {
                Ok(()) => no_content(),
                Err(e) => lease_refused(&e),
            }
        }
        (&Method::DELETE, p) if p.starts_with(WORKLOADS_PATH) => {
            let Some(id) = p
                .strip_prefix(WORKLOADS_PATH)
                .and_then(|r| r.strip_prefix('/'))
                .filter(|id| !id.is_empty() && !id.contains('/'))
            else {
                return status_error(
                    StatusCode::NOT_FOUND,
                    "NotFound",
                    format!("no API at {p}"),
                    None,
                );
            };
            match shared.deregister_workload(id, &caller) {
                Ok(()) => no_content(),
                Err(e) => lease_refused(&e),
            }
        }
        _ => status_error(
            StatusCode::NOT_FOUND,
            "NotFound",
            format!("no API at {path}"),
            None,
        ),
    }
}

fn no_content() -> Response<Body> {
    let mut resp = Response::new(full(""));
    *resp.status_mut() = StatusCode::NO_CONTENT;
    resp
}

fn service_param(query: Option<&str>, name: &str) -> Result<ServiceRef, Response<Body>> {
    let raw = query_param(query, name)
        .ok_or_else(|| bad_request(format!("{name}: required, as <name>.<namespace>:<port>")))?;
    raw.parse().map_err(|e| bad_request(format!("{name}: {e}")))
}

fn addr_param(query: Option<&str>) -> Result<std::net::SocketAddr, Response<Body>> {
    let raw =
        query_param(query, "addr").ok_or_else(|| bad_request("addr: required, as <ip>:<port>"))?;
    raw.parse()
        .map_err(|_| bad_request(format!("addr: {raw:?} is not <ip>:<port>")))
}

fn policy_target(query: Option<&str>) -> Result<PolicyTarget, Response<Body>> {
    let param = |name| query_param(query, name);
    let port = param("port")
        .ok_or_else(|| bad_request("port: required, the workload port whose policy to watch"))?;
    let port = port
        .parse::<u16>()
        .ok()
        .filter(|p| *p > 0)
        .ok_or_else(|| bad_request(format!("port: {port:?} is not a port number")))?;
    let labels = mesh_core::proxy_api::parse_labels(&param("labels").unwrap_or_default())
        .map_err(|e| bad_request(format!("labels: {e}")))?;
    Ok(PolicyTarget {
        namespace: param("namespace")
            .filter(|ns| !ns.is_empty())
            .unwrap_or_else(|| "default".into()),
        port,
        labels,
    })
}

async fn json_body<T: DeserializeOwned>(req: Request<Incoming>) -> Result<T, Response<Body>> {
    let body = read_body(req.into_body()).await?;
    let de = &mut serde_json::Deserializer::from_slice(&body);
    serde_path_to_error::deserialize(de)
        .map_err(|e| bad_request(format!("{}: {}", e.path(), e.inner())))
}

/// A watch stream: the current value, then each change, counted by `watcher` while the
/// caller stays (the stream is dropped when the caller goes).
fn stream<T>(rx: watch::Receiver<Published<T>>, watcher: Watcher) -> Response<Body>
where
    T: Send + Sync + 'static,
{
    // On a connection thread, the stream waits on that thread's relay of the channel, so that a
    // change wakes all the thread's streams at once (see `conn_threads`).
    let state = (LocalWatch::new(rx), true, watcher);
    let lines = futures_util::stream::unfold(state, |(mut rx, first, watcher)| async move {
        if !first && !rx.changed().await {
            return None;
        }
        let published = rx.borrow_and_update();
        let line = published.line.clone();
        // The snapshot a stream starts with was published whenever; only changes propagate.
        if !first {
            watcher.propagated(published.at.elapsed());
        }
        drop(published);
        Some((line, (rx, false, watcher)))
    });
    ndjson_response(NDJSON, lines)
}

/// Whether the request's token, reviewed by the API server, belongs to the service account its
/// identity names.
async fn token_allows(client: &kube::Client, request: &CertifyRequest) -> Result<(), String> {
    let sa =
        crate::tokenreview::review(client, request.token.trim(), crate::inject::TOKEN_AUDIENCE)
            .await
            .map_err(|e| e.to_string())?;
    let id: mesh_core::SpiffeId = request
        .identity
        .parse()
        .map_err(|e: mesh_core::identity::SpiffeIdError| e.to_string())?;
    if id.namespace() == sa.namespace && id.service_account() == sa.name {
        Ok(())
    } else {
        Err(format!(
            "the token belongs to service account {}/{}, which may not be {}",
            sa.namespace, sa.name, request.identity
        ))
    }
}
