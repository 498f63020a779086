//! Inbound authorization end to end, with a real `mesh-controlplane` and real `mesh-proxy`
//! processes: policy resources applied through the control plane's resource API reach the
//! server's proxy over the policy watch, and it admits or refuses callers by their mTLS identity
//! and address — HTTP requests with a 403 the app never sees, opaque TCP connections by closing
//! them.
//!
//! The control plane binary is found beside the test executable; build it first with
//! `cargo build -p mesh-controlplane --bins` (same target directory).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use mesh_test_support::assert_eventually;
use mesh_test_support::process::{MeshBinary, MeshProcess};
use mesh_test_support::proxy_api::ProxyApiAccess;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const WEB_ID: &str = "spiffe://cluster.local/ns/default/sa/web";
const CLIENT_ID: &str = "spiffe://cluster.local/ns/default/sa/client";
const INTRUDER_ID: &str = "spiffe://cluster.local/ns/default/sa/intruder";
const AUTHORITY: &str = "web.default:80";

/// An HTTP app that counts the requests it is given.
async fn http_app() -> (SocketAddr, Arc<AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let count = Arc::new(AtomicUsize::new(0));
    let seen = count.clone();
    tokio::spawn(async move {
        while let Ok((io, _)) = listener.accept().await {
            let seen = seen.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |_req| {
                    seen.fetch_add(1, Ordering::SeqCst);
                    async {
                        Ok::<_, std::convert::Infallible>(http::Response::new("web".to_string()))
                    }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(
                    hyper_util::rt::TokioExecutor::new(),
                )
                .serve_connection(hyper_util::rt::TokioIo::new(io), svc)
                .await;
            });
        }
    });
    (addr, count)
}

/// A TCP app that echoes what it reads.
async fn echo_app() -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut io, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = io.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    addr
}

fn control_plane(state: &Path) -> MeshProcess {
    MeshBinary::workspace("mesh-controlplane")
        .unwrap()
        .env("MESH_CONTROLPLANE_STATE_DIR", state)
        .env("MESH_CONTROLPLANE_API_ADDR", "127.0.0.1:0")
        .env("MESH_CONTROLPLANE_PROXY_ADDR", "127.0.0.1:0")
        .listener("api")
        .listener("proxy")
        .run()
        .unwrap()
}

fn proxy(cp: &MeshProcess, state: &Path, id: &str) -> MeshBinary {
    MeshBinary::new(env!("CARGO_BIN_EXE_mesh-proxy"))
        .env("MESH_PROXY_ADMIN_ADDR", "127.0.0.1:0")
        .env("MESH_PROXY_OUTBOUND_ADDR", "127.0.0.1:0")
        .control_plane(
            &ProxyApiAccess::of_control_plane(cp.addr("proxy"), state),
            id,
        )
        .env("RUST_LOG", "info")
        .listener("admin")
        .listener("outbound")
}

/// A proxy in front of `app`, registered as `service` with labels `app=<app_label>`.
fn server(
    cp: &MeshProcess,
    state: &Path,
    app: SocketAddr,
    service: &str,
    label: &str,
) -> MeshProcess {
    proxy(cp, state, WEB_ID)
        .env("MESH_PROXY_INBOUND_ADDR", "127.0.0.1:0")
        .env("MESH_PROXY_APP_ADDR", app.to_string())
        .env("MESH_PROXY_WORKLOAD_SERVICE", service)
        .env("MESH_PROXY_WORKLOAD_LABELS", format!("app={label}"))
        .env("MESH_PROXY_INBOUND_DETECT_TIMEOUT", "200ms")
        .listener("inbound")
        .run()
        .unwrap()
}

fn client(cp: &MeshProcess, state: &Path, id: &str) -> MeshProcess {
    proxy(cp, state, id)
        .env("MESH_PROXY_WATCH", AUTHORITY)
        .run()
        .unwrap()
}

async fn apply(cp: &MeshProcess, yaml: &str) {
    let rsp = mesh_test_support::http_client()
        .post(format!("http://{}/apply?namespace=default", cp.addr("api")))
        .header("content-type", "application/yaml")
        .body(yaml.to_string())
        .send()
        .await
        .unwrap();
    let status = rsp.status();
    assert!(
        status.is_success(),
        "{status}: {}",
        rsp.text().await.unwrap()
    );
}

async fn delete(cp: &MeshProcess, plural: &str, name: &str) {
    let rsp = mesh_test_support::http_client()
        .delete(format!(
            "http://{}/apis/policy.mesh.dev/v1alpha1/namespaces/default/{plural}/{name}",
            cp.addr("api")
        ))
        .send()
        .await
        .unwrap();
    assert!(rsp.status().is_success(), "{}", rsp.status());
}

/// Status of a GET to `web.default:80` through the outbound listener of `p`.
async fn status_via(p: &MeshProcess) -> u16 {
    mesh_test_support::http_client()
        .get(format!("http://{}/hello", p.addr("outbound")))
        .header("host", AUTHORITY)
        .send()
        .await
        .map_or(0, |r| r.status().as_u16())
}

/// Status of a plaintext GET straight to the server proxy's inbound listener, and the body.
async fn plaintext(p: &MeshProcess) -> (u16, String) {
    let rsp = mesh_test_support::http_client()
        .get(format!("http://{}/hello", p.addr("inbound")))
        .send()
        .await
        .unwrap();
    (rsp.status().as_u16(), rsp.text().await.unwrap())
}

async fn ready(p: &MeshProcess) -> bool {
    mesh_test_support::http_client()
        .get(format!("http://{}/ready", p.addr("admin")))
        .send()
        .await
        .is_ok_and(|r| r.status() == 200)
}

/// Writes `payload` on a fresh connection to `addr` and returns what comes back before the
/// connection closes or goes quiet for a second.
async fn tcp_roundtrip(addr: SocketAddr, payload: &[u8]) -> Vec<u8> {
    let mut io = tokio::net::TcpStream::connect(addr).await.unwrap();
    if io.write_all(payload).await.is_err() {
        return Vec::new();
    }
    let mut got = Vec::new();
    let mut buf = [0u8; 256];
    while got.len() < payload.len() {
        match tokio::time::timeout(std::time::Duration::from_secs(1), io.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => got.extend_from_slice(&buf[..n]),
            _ => break,
        }
    }
    got
}

const ONLY_CLIENT: &str = r"
apiVersion: policy.mesh.dev/v1alpha1
kind: Server
metadata: {name: web-http}
spec:
  podSelector: {matchLabels: {app: web}}
  port: 80
---
apiVersion: policy.mesh.dev/v1alpha1
kind: MeshTLSAuthentication
metadata: {name: client}
spec:
  identityRefs: [{kind: ServiceAccount, name: client}]
---
apiVersion: policy.mesh.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {name: web-from-client}
spec:
  targetRef: {group: policy.mesh.dev, kind: Server, name: web-http}
  requiredAuthenticationRefs:
  - {group: policy.mesh.dev, kind: MeshTLSAuthentication, name: client}
";

const LOOPBACK_TOO: &str = r"
apiVersion: policy.mesh.dev/v1alpha1
kind: NetworkAuthentication
metadata: {name: loopback}
spec:
  networks: [{cidr: 127.0.0.0/8}]
---
apiVersion: policy.mesh.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {name: web-from-loopback}
spec:
  targetRef: {group: policy.mesh.dev, kind: Server, name: web-http}
  requiredAuthenticationRefs:
  - {group: policy.mesh.dev, kind: NetworkAuthentication, name: loopback}
";

#[tokio::test]
async fn http_callers_are_admitted_by_identity_and_network_as_policy_changes() {
    let state = tempfile::tempdir().unwrap();
    let cp = control_plane(state.path());
    let (app, served) = http_app().await;
    let web = server(&cp, state.path(), app, AUTHORITY, "web");
    let friend = client(&cp, state.path(), CLIENT_ID);
    let intruder = client(&cp, state.path(), INTRUDER_ID);
    assert_eventually!(ready(&web).await && ready(&friend).await && ready(&intruder).await);

    // No Server selects the port: the default (all-unauthenticated) admits everyone.
    assert_eventually!(status_via(&friend).await == 200 && status_via(&intruder).await == 200);
    assert_eq!(plaintext(&web).await.0, 200);

    // A Server with one authorization: only the client's identity, and only over mTLS.
    apply(&cp, ONLY_CLIENT).await;
    assert_eventually!(status_via(&intruder).await == 403);
    let before = served.load(Ordering::SeqCst);
    assert_eq!(status_via(&friend).await, 200);
    assert_eq!(status_via(&intruder).await, 403);
    let (status, body) = plaintext(&web).await;
    assert_eq!(status, 403);
    assert!(
        body.contains("Server/web-http does not authorize unauthenticated 127.0.0.1"),
        "{body}"
    );
    // Refused requests never reach the app.
    assert_eq!(served.load(Ordering::SeqCst), before + 1);
    assert!(
        web.metric_sum(
            "inbound_http_authz_deny_total",
            &["server=\"Server/web-http\""]
        )
        .await
            >= 2.0
    );
    assert!(
        web.metric_sum(
            "inbound_http_authz_allow_total",
            &["authorization=\"AuthorizationPolicy/web-from-client\""]
        )
        .await
            >= 1.0
    );

    // The proxy shows the policy in force.
    let config: serde_json::Value = mesh_test_support::http_client()
        .get(format!("http://{}/config", web.addr("admin")))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(config["inboundPolicy"]["server"], "Server/web-http");
    assert_eq!(
        config["inboundPolicy"]["authorizations"][0]["require"][0]["identities"][0],
        CLIENT_ID
    );

    // A second authorization admits anything from loopback, mTLS or not.
    apply(&cp, LOOPBACK_TOO).await;
    assert_eventually!(plaintext(&web).await.0 == 200);
    assert_eq!(status_via(&intruder).await, 200);

    // Without the Server the port is back on the default.
    delete(&cp, "authorizationpolicies", "web-from-loopback").await;
    assert_eventually!(status_via(&intruder).await == 403);
    delete(&cp, "servers", "web-http").await;
    assert_eventually!(status_via(&intruder).await == 200);
    assert_eq!(plaintext(&web).await.0, 200);
}

#[tokio::test]
async fn opaque_connections_are_closed_unless_authorized() {
    let state = tempfile::tempdir().unwrap();
    let cp = control_plane(state.path());
    let echo = echo_app().await;
    let db = server(&cp, state.path(), echo, "db.default:5432", "db");
    assert_eventually!(ready(&db).await);
    let inbound = db.addr("inbound");

    // The default admits plaintext; a non-HTTP first byte makes the connection opaque.
    assert_eventually!(tcp_roundtrip(inbound, b"\x00ping").await == b"\x00ping");

    // An opaque Server that only admits mTLS identities: plaintext connections are closed,
    // even ones that look like HTTP.
    apply(
        &cp,
        r"
apiVersion: policy.mesh.dev/v1alpha1
kind: Server
metadata: {name: db}
spec:
  podSelector: {matchLabels: {app: db}}
  port: 5432
  proxyProtocol: opaque
---
apiVersion: policy.mesh.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {name: db-meshed}
spec:
  targetRef: {group: policy.mesh.dev, kind: Server, name: db}
  requiredAuthenticationRefs:
  - {kind: ServiceAccount, name: web}
",
    )
    .await;
    assert_eventually!(tcp_roundtrip(inbound, b"\x00ping").await.is_empty());
    assert!(
        tcp_roundtrip(inbound, b"GET / HTTP/1.1\r\n\r\n")
            .await
            .is_empty()
    );
    assert!(
        db.metric_sum("inbound_tcp_authz_deny_total", &["server=\"Server/db\""])
            .await
            >= 2.0
    );

    // Admitting loopback lets them through, and an HTTP-looking payload is echoed as bytes:
    // the port is opaque.
    apply(
        &cp,
        r"
apiVersion: policy.mesh.dev/v1alpha1
kind: NetworkAuthentication
metadata: {name: loopback}
spec:
  networks: [{cidr: 127.0.0.1}]
---
apiVersion: policy.mesh.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {name: db-local}
spec:
  targetRef: {group: policy.mesh.dev, kind: Server, name: db}
  requiredAuthenticationRefs:
  - {group: policy.mesh.dev, kind: NetworkAuthentication, name: loopback}
",
    )
    .await;
    assert_eventually!(tcp_roundtrip(inbound, b"\x00ping").await == b"\x00ping");
    assert_eq!(
        tcp_roundtrip(inbound, b"GET / HTTP/1.1\r\n\r\n").await,
        b"GET / HTTP/1.1\r\n\r\n"
    );
}
