//! `mesh-proxy` registering its workload with a real `mesh-controlplane` (the proxy in-process,
//! and as the binary for SIGTERM): the inbound listener
//! becomes an endpoint of the workload's service, `/ready` waits for the registration, a
//! restarted control plane gets the workload back, and on SIGTERM the proxy deregisters (the
//! endpoint leaves at once, long before the lease TTL), drains and exits 0.
//!
//! The control plane binary is found beside the test executable; build it first with
//! `cargo build -p mesh-controlplane --bins` (same target directory).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use mesh_core::proxy_api::{Endpoint, Endpoints, Update, WATCH_ENDPOINTS_PATH};
use mesh_test_support::apps::app;
use mesh_test_support::assert_eventually;
use mesh_test_support::mesh::{ControlPlane, control_plane};
use mesh_test_support::proxies::{Sidecar, SpawnedProxy, proxy};
use mesh_test_support::proxy_api::MeshCa;

/// Far longer than the test's patience: an endpoint that leaves was deregistered, not expired.
const TTL: Duration = Duration::from_secs(120);
const SERVICE: &str = "web-canary.default:80";
/// The workload's identity, which its registration carries and its certificate names.
const WEB: &str = "spiffe://cluster.local/ns/default/sa/web";

/// The latest endpoints of [`SERVICE`] the stream delivered; `None` before the first line.
type Latest = Arc<Mutex<Option<Vec<Endpoint>>>>;

/// Follows the control plane's endpoints stream of [`SERVICE`], keeping the latest value; the
/// control plane's state directory is `state`, whose CA certifies the watcher.
fn watch_endpoints(cp: SocketAddr, state: &Path) -> (Latest, tokio::task::JoinHandle<()>) {
    let latest: Latest = Arc::default();
    let client = MeshCa::of_control_plane(state)
        .unwrap()
        .client("spiffe://cluster.local/ns/test/sa/watcher")
        .unwrap();
    let task = {
        let latest = Arc::clone(&latest);
        tokio::spawn(async move {
            let url = format!("https://{cp}{WATCH_ENDPOINTS_PATH}?service={SERVICE}");
            let mut rsp = client.get(url).send().await.unwrap();
            assert_eq!(rsp.status(), 200);
            let mut buf = Vec::new();
            while let Ok(Some(chunk)) = rsp.chunk().await {
                buf.extend_from_slice(&chunk);
                while let Some(pos) = buf.iter().position(|b| *b == b'\n') {
                    let line: Vec<u8> = buf.drain(..=pos).collect();
                    let update: Update<Endpoints> = serde_json::from_slice(&line).unwrap();
                    *latest.lock().unwrap() =
                        Some(update.value.map(|e| e.endpoints).unwrap_or_default());
                }
            }
        })
    };
    (latest, task)
}

fn addrs(latest: &Mutex<Option<Vec<Endpoint>>>) -> Option<Vec<SocketAddr>> {
    latest
        .lock()
        .unwrap()
        .as_ref()
        .map(|e| e.iter().map(|e| e.addr).collect())
}

fn sigterm(proxy: &mut SpawnedProxy) {
    let status = std::process::Command::new("kill")
        .arg("-TERM")
        .arg(proxy.process().child().pid().to_string())
        .status()
        .unwrap();
    assert!(status.success(), "kill -TERM failed: {status}");
}

/// A control plane on `state`, with registrations living `ttl`.
fn restartable(state: &Path, ttl: Duration) -> mesh_test_support::mesh::ControlPlaneBuilder {
    control_plane().state_dir(state).workload_ttl(ttl)
}

#[tokio::test]
async fn the_workload_registers_and_leaves_at_once_on_sigterm() {
    let cp = control_plane().workload_ttl(TTL).run().unwrap();
    let (latest, stream) = watch_endpoints(cp.proxy_api(), cp.state());
    assert_eventually!(addrs(&latest) == Some(vec![]));

    // Signals and exit codes belong to a process: this proxy is the binary.
    let v2 = app("v2").await.unwrap();
    let mut proxy = cp
        .proxy(WEB)
        .app(v2.addr())
        .service(SERVICE)
        .labels("version=v2,track=canary")
        .spawn()
        .unwrap();
    let inbound = proxy.addr("inbound");

    assert_eventually!(
        addrs(&latest) == Some(vec![inbound]),
        "the inbound listener never became an endpoint: {:?}",
        addrs(&latest)
    );
    let endpoint = latest.lock().unwrap().clone().unwrap().remove(0);
    assert_eq!(endpoint.labels["version"], "v2");
    assert_eq!(endpoint.labels["track"], "canary");
    assert_eq!(endpoint.identity.as_deref(), Some(WEB));
    assert_eventually!(proxy.ready().await == 200);
    // The endpoint leads to the app (plaintext is still accepted inbound).
    let body = mesh_test_support::http_client()
        .get(format!("http://{}/", endpoint.addr))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(body, "v2");

    sigterm(&mut proxy);
    let stopped = tokio::time::Instant::now();
    assert_eventually!(
        addrs(&latest) == Some(vec![]),
        "the endpoint stayed after SIGTERM: {:?}",
        addrs(&latest)
    );
    assert!(
        stopped.elapsed() < TTL,
        "only deregistration explains an endpoint leaving before the TTL"
    );
    assert_eventually!(proxy.exited().is_some(), "the proxy did not exit");
    let status = proxy.exited().unwrap();
    assert!(status.ends_with("exit status: 0"), "{status}");
    stream.abort();
}

#[tokio::test]
async fn the_proxy_waits_for_the_control_plane_and_registers_again_after_its_restart() {
    // A short TTL, so heartbeats (a third of it) soon find out about the restart below.
    let short_ttl = Duration::from_secs(3);
    // A control plane that ran once, so its state (CA, token, trust roots) exists, and is
    // stopped: its port is free, and the proxy starts while nothing listens there.
    let state = tempfile::tempdir().unwrap();
    let mut first: ControlPlane = restartable(state.path(), short_ttl).run().unwrap();
    let cp_addr = first.proxy_api();
    let access = first.access();
    first.process().child().kill();
    drop(first);
    let v1 = app("v1").await.unwrap();
    let proxy = proxy()
        .control_plane(&access, WEB)
        .app(v1.addr())
        .service(SERVICE)
        .run()
        .unwrap();
    let inbound = proxy.addr("inbound");
    // Nothing to register with: not ready.
    assert_eq!(proxy.ready().await, 503);

    let mut cp = restartable(state.path(), short_ttl)
        .proxy_addr(cp_addr)
        .run()
        .unwrap();
    let (latest, stream) = watch_endpoints(cp_addr, state.path());
    assert_eventually!(
        addrs(&latest) == Some(vec![inbound]),
        "the proxy did not register once the control plane came up: {:?}",
        addrs(&latest)
    );
    assert_eventually!(proxy.ready().await == 200);

    // A restarted control plane has forgotten every lease: the next heartbeat gets a 404 and
    // the proxy registers again.
    stream.abort();
    cp.process().child().kill();
    drop(cp);
    let _cp = restartable(state.path(), short_ttl)
        .proxy_addr(cp_addr)
        .run()
        .unwrap();
    let (latest, stream) = watch_endpoints(cp_addr, state.path());
    assert_eventually!(
        addrs(&latest) == Some(vec![inbound]),
        "the proxy did not register again with the restarted control plane: {:?}",
        addrs(&latest)
    );
    // Still ready: the workload never stopped serving.
    assert_eq!(proxy.ready().await, 200);
    stream.abort();
}
