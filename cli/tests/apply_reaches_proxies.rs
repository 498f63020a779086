//! The whole discovery path: `mesh apply` of an HTTPRoute weight change on a real
//! `mesh-controlplane` process reaches several `mesh-proxy`s (started in-process) watching it, and traffic
//! through each of them follows. Workloads are registered the way sidecars register them.
//!
//! Needs the workspace's binaries built (`cargo test --workspace` builds them).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stderr)]

use mesh_core::proxy_api::{WORKLOADS_PATH, WorkloadRegistration};
use std::time::Duration;

use mesh_test_support::{
    apps::primary_and_canary,
    assert_eventually, http_client,
    mesh::{ControlPlane, ControlPlaneBuilder, control_plane},
    proxies::{InProcessProxy, Sidecar, client_via},
    proxy_api::MeshCa,
};

/// The identity of the proxies that watch the route.
const CALLER: &str = "spiffe://cluster.local/ns/default/sa/caller";

fn route(primary: u32, canary: u32) -> String {
    format!(
        "apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata:
  name: web
spec:
  parentRefs: [{{name: web, kind: Service, group: \"\", port: 80}}]
  rules:
    - backendRefs:
        - {{name: web-primary, port: 80, weight: {primary}}}
        - {{name: web-canary, port: 80, weight: {canary}}}
"
    )
}

fn apply(server: &str, dir: &std::path::Path, yaml: &str) {
    let file = dir.join("route.yaml");
    std::fs::write(&file, yaml).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_mesh"))
        .args(["apply", "-f"])
        .arg(&file)
        .env("MESH_SERVER", server)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "mesh apply failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The canary weight a proxy's `/config` shows for web.default:80.
/// The proxy's `/config`, or `None` while it does not answer.
async fn config(proxy: &impl Sidecar) -> Option<serde_json::Value> {
    http_client()
        .get(format!("http://{}/config", proxy.addr("admin")))
        .send()
        .await
        .ok()?
        .json()
        .await
        .ok()
}

async fn canary_weight(proxy: &impl Sidecar) -> Option<u64> {
    let cfg = config(proxy).await?;
    cfg["routes"]
        .as_array()?
        .iter()
        .find(|r| r["parent"] == "web.default:80")?["rules"][0]["backends"]
        .as_array()?
        .iter()
        .find(|b| b["service"] == "web-canary.default:80")?["weight"]
        .as_u64()
}

/// How many endpoints the proxy knows for `service`; `None` while discovery has not answered.
async fn known_endpoints(proxy: &impl Sidecar, service: &str) -> Option<usize> {
    let cfg = config(proxy).await?;
    cfg["endpoints"]
        .as_array()?
        .iter()
        .find(|e| e["service"] == service)
        .and_then(|e| e["endpoints"].as_array())
        .map(Vec::len)
}

async fn versions(proxy: &impl Sidecar, n: usize) -> Vec<String> {
    let client = proxy.client();
    let mut out = Vec::new();
    for _ in 0..n {
        match client.get("http://web.default:80/").send().await {
            Ok(rsp) => out.push(rsp.text().await.unwrap_or_default()),
            Err(e) => out.push(e.to_string()),
        }
    }
    out
}

/// A control plane on `state` whose registrations outlive the test.
fn on_state(state: &std::path::Path) -> ControlPlaneBuilder {
    control_plane()
        .state_dir(state)
        .workload_ttl(Duration::from_secs(600))
}

/// A control plane on `state` (its proxy API at `proxy_addr`, when given) with v1 registered as
/// web-primary, v2 as web-canary, and the route sending everything to v1; and v1 and v2.
async fn serving_v1(
    state: &std::path::Path,
    proxy_addr: Option<std::net::SocketAddr>,
) -> (ControlPlane, std::net::SocketAddr, std::net::SocketAddr) {
    let mut builder = on_state(state);
    if let Some(addr) = proxy_addr {
        builder = builder.proxy_addr(addr);
    }
    let cp = builder.run().unwrap();
    let (v1, v2) = primary_and_canary().await.unwrap();
    register(cp.proxy_api(), state, v1, v2).await;
    apply(&cp.api_url(), state, &route(100, 0));
    (cp, v1, v2)
}

/// Registers v1 as web-primary and v2 as web-canary, as their sidecars would (over mTLS, with a
/// certificate from the CA in the control plane's state directory `state`).
async fn register(
    proxy_api: std::net::SocketAddr,
    state: &std::path::Path,
    v1: std::net::SocketAddr,
    v2: std::net::SocketAddr,
) {
    let client = MeshCa::of_control_plane(state)
        .unwrap()
        .client("spiffe://cluster.local/ns/default/sa/web")
        .unwrap();
    for (service, addr) in [("web-primary", v1), ("web-canary", v2)] {
        let reg = WorkloadRegistration {
            service: format!("{service}.default:80").parse().unwrap(),
            addr,
            identity: None,
            labels: Default::default(),
            admin_addr: None,
            deployment: None,
            pod: None,
        };
        let rsp = client
            .post(format!("https://{proxy_api}{WORKLOADS_PATH}"))
            .json(&reg)
            .send()
            .await
            .unwrap();
        assert!(
            rsp.status().is_success(),
            "registering {service}: {}",
            rsp.status()
        );
    }
}

#[tokio::test]
async fn a_weight_change_applied_with_mesh_reaches_every_proxy() {
    let state = tempfile::tempdir().unwrap();
    let (cp, _, _) = serving_v1(state.path(), None).await;
    let api = cp.api_url();

    let proxies: Vec<InProcessProxy> = (0..3)
        .map(|_| cp.proxy(CALLER).watch("web.default:80").run().unwrap())
        .collect();
    for p in &proxies {
        assert_eventually!(
            canary_weight(p).await == Some(0),
            "proxy never got the route"
        );
        let seen = versions(p, 10).await;
        assert!(seen.iter().all(|v| v == "v1"), "{seen:?}");
    }

    apply(&api, state.path(), &route(0, 100));
    for p in &proxies {
        assert_eventually!(
            canary_weight(p).await == Some(100),
            "proxy {} never saw the weight change",
            p.addr("admin")
        );
        let seen = versions(p, 10).await;
        assert!(seen.iter().all(|v| v == "v2"), "{seen:?}");
    }
}

#[tokio::test]
async fn proxies_serve_through_a_30_second_control_plane_outage_and_resync() {
    let state = tempfile::tempdir().unwrap();
    // A fixed port, so the restarted control plane is where the proxy looks for it.
    let port = mesh_test_support::ports::free_port().unwrap();
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let (mut cp, v1, v2) = serving_v1(state.path(), Some(addr)).await;
    let p = cp.proxy(CALLER).watch("web.default:80").run().unwrap();
    assert_eventually!(
        canary_weight(&p).await == Some(0),
        "proxy never got the route"
    );
    // The route's backends are watched once the route arrives: the proxy has its whole config
    // only when both have answered (on a busy machine the kill could come first).
    for service in ["web-primary.default:80", "web-canary.default:80"] {
        assert_eventually!(
            known_endpoints(&p, service).await == Some(1),
            "proxy never got {service}'s endpoints"
        );
    }

    // The control plane dies outright; for 30 s the proxy serves from its last config.
    cp.process().child().kill();
    let client = p.client();
    let start = std::time::Instant::now();
    let (mut served, mut failed) = (0, Vec::new());
    while start.elapsed() < std::time::Duration::from_secs(30) {
        match client.get("http://web.default:80/").send().await {
            Ok(rsp) if rsp.status().is_success() => {
                let body = rsp.text().await.unwrap_or_default();
                if body == "v1" {
                    served += 1;
                } else {
                    failed.push(body);
                }
            }
            Ok(rsp) => failed.push(rsp.status().to_string()),
            Err(e) => failed.push(e.to_string()),
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(
        failed.is_empty(),
        "{} failed during the outage: {failed:?}",
        failed.len()
    );
    assert!(served > 100, "only {served} requests in 30 s");

    // It comes back on the same state dir and port; the workloads register again (a sidecar
    // does when its heartbeat gets 404) and a change made now reaches the proxy.
    let cp = on_state(state.path()).proxy_addr(addr).run().unwrap();
    let api = cp.api_url();
    register(cp.proxy_api(), state.path(), v1, v2).await;
    apply(&api, state.path(), &route(0, 100));
    assert_eventually!(
        canary_weight(&p).await == Some(100),
        "the proxy never resynced with the returned control plane"
    );
    let seen = versions(&p, 10).await;
    assert!(seen.iter().all(|v| v == "v2"), "{seen:?}");
}

#[tokio::test]
async fn weight_changes_under_load_drop_no_request() {
    let state = tempfile::tempdir().unwrap();
    let (cp, _, _) = serving_v1(state.path(), None).await;
    let api = cp.api_url();
    let p = cp.proxy(CALLER).watch("web.default:80").run().unwrap();
    assert_eventually!(
        canary_weight(&p).await == Some(0),
        "proxy never got the route"
    );

    // Four clients send back to back while the weights move 100/0 -> 50/50 -> 0/100 -> 100/0.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let outbound = p.addr("outbound");
    let clients: Vec<_> = (0..4)
        .map(|_| {
            let stop = std::sync::Arc::clone(&stop);
            tokio::spawn(async move {
                let client = client_via(outbound, None);
                let (mut seen, mut failed) = (std::collections::BTreeMap::new(), Vec::new());
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    match client.get("http://web.default:80/").send().await {
                        Ok(rsp) if rsp.status().is_success() => {
                            let v = rsp.text().await.unwrap_or_default();
                            *seen.entry(v).or_insert(0u64) += 1;
                        }
                        Ok(rsp) => failed.push(rsp.status().to_string()),
                        Err(e) => failed.push(e.to_string()),
                    }
                }
                (seen, failed)
            })
        })
        .collect();
    for (primary, canary) in [(50, 50), (0, 100), (100, 0), (0, 100)] {
        apply(&api, state.path(), &route(primary, canary));
        assert_eventually!(
            canary_weight(&p).await == Some(u64::from(canary)),
            "the proxy never saw {primary}/{canary}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut total = std::collections::BTreeMap::new();
    for c in clients {
        let (seen, failed) = c.await.unwrap();
        assert!(
            failed.is_empty(),
            "{} requests failed: {failed:?}",
            failed.len()
        );
        for (v, n) in seen {
            *total.entry(v).or_insert(0) += n;
        }
    }
    assert!(
        total.get("v1").copied().unwrap_or(0) > 0 && total.get("v2").copied().unwrap_or(0) > 0,
        "traffic did not follow the weights: {total:?}"
    );
}
