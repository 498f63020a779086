//! What the mesh is doing, served on the resource API (behind its token) for `mesh stat|routes|
//! edges|tap|top` and the dashboard: the control plane scrapes every registered proxy's
//! `/metrics` into a bounded window ([`mesh_observe::window`]) and answers from it, and relays
//! tap streams from the proxies of a workload, presenting the resource API's token to them (each
//! proxy refuses a tap without it; see `MESH_PROXY_TAP_TOKEN_FILE`).
//!
//! | method | path | answers |
//! |---|---|---|
//! | GET | `/v1/observe/stat/<workloads\|services\|routes>?namespace=&name=&window=1m` | `[StatRow]` |
//! | GET | `/v1/observe/routes?service=&namespace=&window=` | `[RouteRow]` |
//! | GET | `/v1/observe/edges?namespace=&window=` | `[EdgeRow]` |
//! | GET | `/v1/observe/tap?workload=&namespace=&path=&method=&authority=&max=` | NDJSON, one request per line |
//!
//! In a cluster the proxies are found from the API server's Pods (the injected ones of the
//! workload's Deployment, at their pod IP and admin port), the control plane opens their taps
//! with the tap token only it holds ([`mesh_core::tap`]), and besides the resource API's token
//! it admits any caller the API server authorizes to tap ([`crate::tap_access`]).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Request, Response, StatusCode};
use mesh_core::proxy_api::ScrapeTarget;
use mesh_observe::MetricsView;
use mesh_observe::scrape::{Embedded, SharedWindow};
use mesh_observe::window::{Target, Window, WindowConfig};
use mesh_observe::{Query, Resource};

use crate::http::{Body, json_response, ndjson_response, query_param, status_error};
use crate::proxy::Shared;

/// Where the observe API lives on the resource API listener.
pub const PREFIX: &str = "/v1/observe/";

/// The tap stream's path.
pub const TAP_PATH: &str = "/v1/observe/tap";

/// The metrics window and what feeds it.
#[derive(Clone)]
pub struct Observe {
    window: SharedWindow,
    /// In a cluster: where the proxies to tap are found, and who may tap is asked.
    cluster: Option<kube::Client>,
}

impl std::fmt::Debug for Observe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Observe")
            .field("cluster", &self.cluster.is_some())
            .finish_non_exhaustive()
    }
}

impl Default for Observe {
    fn default() -> Self {
        Self {
            window: Arc::new(Mutex::new(Window::new(WindowConfig::default()))),
            cluster: None,
        }
    }
}

/// A label of a scrape target, from the service discovery listing.
fn meta<'a>(t: &'a ScrapeTarget, name: &str) -> Option<&'a str> {
    t.labels
        .get(&format!("__meta_mesh_{name}"))
        .map(String::as_str)
        .filter(|v| !v.is_empty())
}

/// The proxies to scrape, as the window names them: the workload is the registration's
/// deployment (`web` for a canary arm, `web-primary`), else its `workload` label, else its service.
pub fn targets(shared: &Shared) -> Vec<Target> {
    shared
        .index()
        .scrape_targets()
        .iter()
        .filter_map(|t| {
            let admin = t.targets.first()?.clone();
            let service = meta(t, "service").unwrap_or_default().to_string();
            let workload = meta(t, "deployment")
                .or_else(|| meta(t, "label_workload"))
                .unwrap_or(&service)
                .to_string();
            Some(Target {
                admin,
                workload,
                namespace: meta(t, "namespace").unwrap_or("default").to_string(),
                service,
                identity: meta(t, "identity").map(str::to_string),
            })
        })
        .collect()
}

impl Observe {
    /// The observe API of a control plane in the cluster behind `client`.
    pub fn in_cluster(client: kube::Client) -> Self {
        Self {
            cluster: Some(client),
            ..Self::default()
        }
    }

    /// Whether this is a control plane in a cluster.
    pub fn is_cluster(&self) -> bool {
        self.cluster.is_some()
    }

    /// Answers a tap from a caller without the resource API's token: in a cluster, one the
    /// API server authorizes ([`crate::tap_access`]); elsewhere nobody.
    pub async fn handle_authorized_tap<B>(
        &self,
        shared: &Shared,
        authorization: Option<HeaderValue>,
        req: &Request<B>,
    ) -> Response<Body> {
        let Some(client) = &self.cluster else {
            return crate::access::unauthorized();
        };
        if req.method() != http::Method::GET {
            return status_error(
                StatusCode::METHOD_NOT_ALLOWED,
                "MethodNotAllowed",
                "tap only reads (GET)",
                None,
            );
        }
        let query = req.uri().query();
        let Some(workload) = query_param(query, "workload") else {
            return bad_request("tap needs workload=<name>".into());
        };
        let namespace = query_param(query, "namespace").unwrap_or_else(|| "default".into());
        match crate::tap_access::authorize(client, req.headers(), &namespace, &workload).await {
            Ok(user) => {
                tracing::info!(user = %user.name, %namespace, %workload, "tap authorized");
                self.tap(shared, authorization, query).await
            }
            Err(denied) => {
                tracing::info!(%namespace, %workload, %denied, "tap refused");
                status_error(denied.status(), denied.reason(), denied.to_string(), None)
            }
        }
    }

    /// Scrapes the proxies registered in `shared` every `interval`, forever (never when
    /// `interval` is zero).
    pub fn spawn_scraper(&self, shared: Arc<Shared>, interval: Duration) {
        if interval.is_zero() {
            return;
        }
        let window = Arc::clone(&self.window);
        tokio::spawn(mesh_observe::scrape::run(
            window,
            move || targets(&shared),
            interval,
        ));
    }

    /// Answers a request under [`PREFIX`]; `authorization` is what the proxies' taps accept.
    pub async fn handle<B>(
        &self,
        shared: &Shared,
        authorization: Option<HeaderValue>,
        req: &Request<B>,
    ) -> Response<Body> {
        if req.method() != http::Method::GET {
            return status_error(
                StatusCode::METHOD_NOT_ALLOWED,
                "MethodNotAllowed",
                "the observe API only reads (GET)",
                None,
            );
        }
        let query = req.uri().query();
        let rest = req.uri().path().strip_prefix(PREFIX).unwrap_or_default();
        if rest == "tap" {
            return self.tap(shared, authorization, query).await;
        }
        let q = match parse_query(query, if rest == "routes" { "service" } else { "name" }) {
            Ok(q) => q,
            Err(why) => return bad_request(why),
        };
        let view = Embedded(Arc::clone(&self.window));
        let answer = match rest.split_once('/') {
            Some(("stat", resource)) => match resource.parse::<Resource>() {
                Ok(resource) => view
                    .stat(resource, &q)
                    .await
                    .map(|r| json_response(StatusCode::OK, &r)),
                Err(why) => return bad_request(why),
            },
            None if rest == "routes" => view
                .routes(&q)
                .await
                .map(|r| json_response(StatusCode::OK, &r)),
            None if rest == "edges" => view
                .edges(&q)
                .await
                .map(|r| json_response(StatusCode::OK, &r)),
            _ => {
                return status_error(
                    StatusCode::NOT_FOUND,
                    "NotFound",
                    format!("no observe API at {}", req.uri().path()),
                    None,
                );
            }
        };
        answer.unwrap_or_else(|e| {
            status_error(
                StatusCode::SERVICE_UNAVAILABLE,
                "ServiceUnavailable",
                e.to_string(),
                None,
            )
        })
    }
}

fn bad_request(why: String) -> Response<Body> {
    status_error(StatusCode::BAD_REQUEST, "BadRequest", why, None)
}

/// `namespace`, the name (under `name_param`) and `window` (`90s`, `5m`; default one minute).
fn parse_query(query: Option<&str>, name_param: &str) -> Result<Query, String> {
    let param = |name| query_param(query, name).filter(|v| !v.is_empty());
    let window_secs = match param("window") {
        None => mesh_observe::DEFAULT_WINDOW_SECS,
        Some(w) => mesh_core::duration::parse(&w)
            .map_err(|e| format!("window={w}: {e}"))?
            .as_secs()
            .max(1),
    };
    Ok(Query {
        namespace: param("namespace"),
        name: param(name_param),
        window_secs,
    })
}

impl Observe {
    /// Relays the taps of every proxy of `workload=` to the caller, one JSON line per
    /// request, each with the `proxy` and `workload` it came from.
    async fn tap(
        &self,
        shared: &Shared,
        authorization: Option<HeaderValue>,
        query: Option<&str>,
    ) -> Response<Body> {
        match &self.cluster {
            Some(client) => tap_cluster(client, authorization, query).await,
            None => tap(shared, authorization, query).await,
        }
    }
}

/// The proxies of `workload` in `namespace` a cluster runs: the injected pods of the Deployment
/// (or the pod) of that name that have an IP, at their proxy's admin port, by pod name.
pub fn cluster_tap_targets(
    pods: &[k8s_openapi::api::core::v1::Pod],
    workload: &str,
) -> Vec<(String, String)> {
    use kube::ResourceExt as _;
    pods.iter()
        .filter(|p| {
            p.annotations()
                .contains_key(crate::inject::INJECTED_ANNOTATION)
        })
        .filter(|p| {
            p.name_any() == workload || crate::inject::deployment_of(p).as_deref() == Some(workload)
        })
        .filter_map(|p| {
            let ip: std::net::IpAddr = p.status.as_ref()?.pod_ip.as_deref()?.parse().ok()?;
            let spec = p.spec.as_ref()?;
            let admin = spec
                .containers
                .iter()
                .chain(spec.init_containers.iter().flatten())
                .filter(|c| c.name == crate::inject::PROXY_CONTAINER)
                .flat_map(|c| c.ports.iter().flatten())
                .find(|port| port.name.as_deref() == Some(crate::inject::ADMIN_PORT_NAME))
                .and_then(|port| u16::try_from(port.container_port).ok())
                .unwrap_or(crate::inject::InjectConfig::default().admin_port);
            Some((
                std::net::SocketAddr::new(ip, admin).to_string(),
                p.name_any(),
            ))
        })
        .collect()
}

/// [`tap`] for a control plane in a cluster: the proxies come from the API server's Pods.
async fn tap_cluster(
    client: &kube::Client,
    authorization: Option<HeaderValue>,
    query: Option<&str>,
) -> Response<Body> {
    let Some(workload) = query_param(query, "workload") else {
        return bad_request("tap needs workload=<name>".into());
    };
    let namespace = query_param(query, "namespace").unwrap_or_else(|| "default".into());
    let pods: kube::Api<k8s_openapi::api::core::v1::Pod> =
        kube::Api::namespaced(client.clone(), &namespace);
    let pods = match pods.list(&kube::api::ListParams::default()).await {
        Ok(list) => list.items,
        Err(e) => {
            return status_error(
                StatusCode::SERVICE_UNAVAILABLE,
                "ServiceUnavailable",
                format!("listing the pods of namespace {namespace}: {e}"),
                None,
            );
        }
    };
    let proxies = cluster_tap_targets(&pods, &workload);
    relay(
        proxies,
        &workload,
        &namespace,
        authorization.as_ref(),
        query,
    )
}

/// Relays the taps of every proxy of `workload=` to the caller, one JSON line per request,
/// each with the `proxy` and `workload` it came from.
async fn tap(
    shared: &Shared,
    authorization: Option<HeaderValue>,
    query: Option<&str>,
) -> Response<Body> {
    let Some(workload) = query_param(query, "workload") else {
        return bad_request("tap needs workload=<name>".into());
    };
    let namespace = query_param(query, "namespace").unwrap_or_else(|| "default".into());
    let proxies: Vec<(String, String)> = shared
        .index()
        .scrape_targets()
        .iter()
        .filter(|t| meta(t, "namespace").unwrap_or("default") == namespace)
        .filter(|t| {
            ["label_workload", "deployment", "service"]
                .iter()
                .any(|l| meta(t, l) == Some(workload.as_str()))
        })
        .filter_map(|t| {
            let name = meta(t, "pod")
                .or(meta(t, "deployment"))
                .unwrap_or(&workload);
            Some((t.targets.first()?.clone(), name.to_string()))
        })
        .collect();
    relay(
        proxies,
        &workload,
        &namespace,
        authorization.as_ref(),
        query,
    )
}

/// Opens the tap of each of `proxies` (admin address, pod name) with `authorization` and merges
/// their lines into one stream, each labelled with where it came from.
fn relay(
    proxies: Vec<(String, String)>,
    workload: &str,
    namespace: &str,
    authorization: Option<&HeaderValue>,
    query: Option<&str>,
) -> Response<Body> {
    // What the proxies filter by, passed on as given.
    let forward: Vec<&str> = query
        .unwrap_or_default()
        .split('&')
        .filter(|p| !p.is_empty() && !p.starts_with("workload=") && !p.starts_with("namespace="))
        .collect();
    let forward = forward.join("&");
    if proxies.is_empty() {
        return status_error(
            StatusCode::NOT_FOUND,
            "NotFound",
            format!("no registered proxy of workload {workload} in namespace {namespace}"),
            None,
        );
    }
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(1024);
    let client = mesh_observe::scrape::client_without_timeout();
    for (admin, pod) in proxies {
        let mut req = client.get(format!("http://{admin}/tap?{forward}"));
        if let Some(a) = authorization {
            req = req.header(http::header::AUTHORIZATION, a.clone());
        }
        let tx = tx.clone();
        let workload = workload.to_string();
        tokio::spawn(async move {
            let label = |mut v: serde_json::Value| {
                if let Some(o) = v.as_object_mut() {
                    o.insert("proxy".into(), admin.clone().into());
                    o.insert("workload".into(), workload.clone().into());
                    o.insert("pod".into(), pod.clone().into());
                }
                let mut line = serde_json::to_vec(&v).unwrap_or_default();
                line.push(b'\n');
                Bytes::from(line)
            };
            let mut rsp = match req.send().await {
                Ok(rsp) if rsp.status().is_success() => rsp,
                Ok(rsp) => {
                    let status = rsp.status().as_u16();
                    let why = rsp.text().await.unwrap_or_default();
                    let why = format!("the proxy refused the tap ({status}): {}", why.trim());
                    let _ = tx.send(label(serde_json::json!({ "error": why }))).await;
                    return;
                }
                Err(e) => {
                    let why = format!("cannot reach the proxy: {e}");
                    let _ = tx.send(label(serde_json::json!({ "error": why }))).await;
                    return;
                }
            };
            let mut buffer = Vec::new();
            while let Ok(Some(chunk)) = rsp.chunk().await {
                buffer.extend_from_slice(&chunk);
                while let Some(end) = buffer.iter().position(|b| *b == b'\n') {
                    let line: Vec<u8> = buffer.drain(..=end).collect();
                    let Ok(v) = serde_json::from_slice::<serde_json::Value>(&line) else {
                        continue;
                    };
                    if tx.send(label(v)).await.is_err() {
                        // The caller went away: dropping the response closes the proxy's tap.
                        return;
                    }
                }
            }
        });
    }
    drop(tx);
    let lines = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|line| (line, rx))
    });
    ndjson_response("application/x-ndjson", lines)
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::Pod;
    use serde_json::Value;

    fn pod(
        name: &str,
        owner: Option<&str>,
        injected: bool,
        ip: Option<&str>,
        admin: &Value,
    ) -> Pod {
        let mut metadata =
            serde_json::json!({"name": name, "labels": {"pod-template-hash": "abc12"}});
        if injected {
            metadata["annotations"] =
                serde_json::json!({crate::inject::INJECTED_ANNOTATION: "proxy:1"});
        }
        if let Some(owner) = owner {
            metadata["ownerReferences"] = serde_json::json!([{"apiVersion": "apps/v1",
                "kind": "ReplicaSet", "name": owner, "uid": "u"}]);
        }
        let proxy = serde_json::json!({"name": crate::inject::PROXY_CONTAINER, "ports": admin});
        serde_json::from_value(serde_json::json!({
            "metadata": metadata,
            "spec": {"initContainers": [proxy], "containers": [{"name": "app"}]},
            "status": {"podIP": ip},
        }))
        .unwrap()
    }

    #[test]
    fn a_workload_s_proxies_are_its_injected_pods_with_an_ip_at_their_admin_port() {
        let admin = |port: u16| serde_json::json!([{"name": crate::inject::ADMIN_PORT_NAME, "containerPort": port}]);
        let pods = [
            pod(
                "web-abc12-a",
                Some("web-abc12"),
                true,
                Some("10.0.0.1"),
                &admin(4191),
            ),
            pod(
                "web-abc12-b",
                Some("web-abc12"),
                true,
                Some("10.0.0.2"),
                &admin(5191),
            ),
            // Not meshed, not started yet, another Deployment.
            pod(
                "web-abc12-c",
                Some("web-abc12"),
                false,
                Some("10.0.0.3"),
                &admin(4191),
            ),
            pod("web-abc12-d", Some("web-abc12"), true, None, &admin(4191)),
            pod(
                "webhook-abc12-e",
                Some("webhook-abc12"),
                true,
                Some("10.0.0.5"),
                &admin(4191),
            ),
            // A bare pod, tapped by its own name; no declared port means the default.
            pod(
                "debug",
                None,
                true,
                Some("10.0.0.6"),
                &serde_json::json!([]),
            ),
        ];
        assert_eq!(
            cluster_tap_targets(&pods, "web"),
            [
                ("10.0.0.1:4191".to_string(), "web-abc12-a".to_string()),
                ("10.0.0.2:5191".to_string(), "web-abc12-b".to_string()),
            ]
        );
        assert_eq!(
            cluster_tap_targets(&pods, "debug"),
            [("10.0.0.6:4191".to_string(), "debug".to_string())]
        );
        assert!(cluster_tap_targets(&pods, "api").is_empty());
    }
}
