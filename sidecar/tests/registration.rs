//! `mesh-proxy` registering its workload with a real `mesh-controlplane`: the inbound listener
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
use mesh_test_support::process::{MeshBinary, MeshProcess};
use mesh_test_support::proxy_api::{MeshCa, ProxyApiAccess};

/// Far longer than the test's patience: an endpoint that leaves was deregistered, not expired.
const TTL: Duration = Duration::from_secs(120);
const SERVICE: &str = "web-canary.default:80";
/// The workload's identity, which its registration carries and its certificate names.
const WEB: &str = "spiffe://cluster.local/ns/default/sa/web";

fn control_plane(state: &Path, proxy_addr: &str, ttl: Duration) -> MeshProcess {
    MeshBinary::workspace("mesh-controlplane")
        .unwrap()
        .env("MESH_CONTROLPLANE_STATE_DIR", state)
        .env("MESH_CONTROLPLANE_API_ADDR", "127.0.0.1:0")
        .env("MESH_CONTROLPLANE_PROXY_ADDR", proxy_addr)
        .env(
            "MESH_CONTROLPLANE_WORKLOAD_TTL",
            format!("{}s", ttl.as_secs()),
        )
        .listener("api")
        .listener("proxy")
        .run()
        .unwrap()
}

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

async fn ready(proxy: &MeshProcess) -> u16 {
    mesh_test_support::http_client()
        .get(format!("http://{}/ready", proxy.addr("admin")))
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

fn sigterm(process: &mut MeshProcess) {
    let status = std::process::Command::new("kill")
        .arg("-TERM")
        .arg(process.child().pid().to_string())
        .status()
        .unwrap();
    assert!(status.success(), "kill -TERM failed: {status}");
}

/// The exit status, once the process has exited (the harness reports it as text).
fn exited(process: &mut MeshProcess) -> Option<String> {
    process.child().check_running().err()
}

#[tokio::test]
async fn the_workload_registers_and_leaves_at_once_on_sigterm() {
    let state = tempfile::tempdir().unwrap();
    let cp = control_plane(state.path(), "127.0.0.1:0", TTL);
    let cp_addr = cp.addr("proxy");
    let (latest, stream) = watch_endpoints(cp_addr, state.path());
    assert_eventually!(addrs(&latest) == Some(vec![]));

    let mut proxy = MeshBinary::new(env!("CARGO_BIN_EXE_mesh-proxy"))
        .env("MESH_PROXY_ADMIN_ADDR", "127.0.0.1:0")
        .env("MESH_PROXY_OUTBOUND_ADDR", "127.0.0.1:0")
        .env("MESH_PROXY_INBOUND_ADDR", "127.0.0.1:0")
        .env("MESH_PROXY_APP_ADDR", app("v2").await.unwrap().to_string())
        .control_plane(
            &ProxyApiAccess::of_control_plane(cp_addr, state.path()),
            WEB,
        )
        .env("MESH_PROXY_WORKLOAD_SERVICE", SERVICE)
        .env("MESH_PROXY_WORKLOAD_LABELS", "version=v2,track=canary")
        .listener("admin")
        .listener("inbound")
        .run()
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
    assert_eventually!(ready(&proxy).await == 200);
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
    assert_eventually!(exited(&mut proxy).is_some(), "the proxy did not exit");
    let status = exited(&mut proxy).unwrap();
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
    let mut first = control_plane(state.path(), "127.0.0.1:0", short_ttl);
    let cp_addr = first.addr("proxy");
    first.child().kill();
    drop(first);
    let proxy = MeshBinary::new(env!("CARGO_BIN_EXE_mesh-proxy"))
        .env("MESH_PROXY_ADMIN_ADDR", "127.0.0.1:0")
        .env("MESH_PROXY_OUTBOUND_ADDR", "127.0.0.1:0")
        .env("MESH_PROXY_INBOUND_ADDR", "127.0.0.1:0")
        .env("MESH_PROXY_APP_ADDR", app("v1").await.unwrap().to_string())
        .control_plane(
            &ProxyApiAccess::of_control_plane(cp_addr, state.path()),
            WEB,
        )
        .env("MESH_PROXY_WORKLOAD_SERVICE", SERVICE)
        .listener("admin")
        .listener("inbound")
        .run()
        .unwrap();
    let inbound = proxy.addr("inbound");
    // Nothing to register with: not ready.
    assert_eq!(ready(&proxy).await, 503);

    let mut cp = control_plane(state.path(), &cp_addr.to_string(), short_ttl);
    let (latest, stream) = watch_endpoints(cp_addr, state.path());
    assert_eventually!(
        addrs(&latest) == Some(vec![inbound]),
        "the proxy did not register once the control plane came up: {:?}",
        addrs(&latest)
    );
    assert_eventually!(ready(&proxy).await == 200);

    // A restarted control plane has forgotten every lease: the next heartbeat gets a 404 and
    // the proxy registers again.
    stream.abort();
    cp.child().kill();
    drop(cp);
    let _cp = control_plane(state.path(), &cp_addr.to_string(), short_ttl);
    let (latest, stream) = watch_endpoints(cp_addr, state.path());
    assert_eventually!(
        addrs(&latest) == Some(vec![inbound]),
        "the proxy did not register again with the restarted control plane: {:?}",
        addrs(&latest)
    );
    // Still ready: the workload never stopped serving.
    assert_eq!(ready(&proxy).await, 200);
    stream.abort();
}
