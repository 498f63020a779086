//! Inbound authorization end to end, with a real `mesh-controlplane` and `mesh-proxy`s started
//! in-process: policy resources applied through the control plane's resource API reach the
//! server's proxy over the policy watch, and it admits or refuses callers by their mTLS identity
//! and address — HTTP requests with a 403 the app never sees, opaque TCP connections by closing
//! them.
//!
//! The control plane binary is found beside the test executable; build it first with
//! `cargo build -p mesh-controlplane --bins` (same target directory).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;

use mesh_test_support::apps::{app, tcp_echo};
use mesh_test_support::assert_eventually;
use mesh_test_support::mesh::{ControlPlane, control_plane};
use mesh_test_support::proxies::{InProcessProxy, Sidecar};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const WEB_ID: &str = "spiffe://cluster.local/ns/default/sa/web";
const CLIENT_ID: &str = "spiffe://cluster.local/ns/default/sa/client";
const INTRUDER_ID: &str = "spiffe://cluster.local/ns/default/sa/intruder";
const AUTHORITY: &str = "web.default:80";

/// The server side: `app` behind a proxy registered as `service` with labels `app=<label>`.
fn server(cp: &ControlPlane, app: SocketAddr, service: &str, label: &str) -> InProcessProxy {
    cp.proxy(WEB_ID)
        .app(app)
        .service(service)
        .labels(&format!("app={label}"))
        .env("MESH_PROXY_INBOUND_DETECT_TIMEOUT", "200ms")
        .run()
        .unwrap()
}

async fn delete(cp: &ControlPlane, plural: &str, name: &str) {
    let rsp = mesh_test_support::http_client()
        .delete(format!(
            "http://{}/apis/policy.mesh.dev/v1alpha1/namespaces/default/{plural}/{name}",
            cp.api()
        ))
        .header("authorization", cp.api_authorization())
        .send()
        .await
        .unwrap();
    assert!(rsp.status().is_success(), "{}", rsp.status());
}

/// Status of a GET to `web.default:80` through the outbound listener of `p`.
async fn status_via(p: &InProcessProxy) -> u16 {
    mesh_test_support::http_client()
        .get(format!("http://{}/hello", p.addr("outbound")))
        .header("host", AUTHORITY)
        .send()
        .await
        .map_or(0, |r| r.status().as_u16())
}

/// Status of a plaintext GET straight to the server proxy's inbound listener, and the body.
async fn plaintext(p: &InProcessProxy) -> (u16, String) {
    let rsp = mesh_test_support::http_client()
        .get(format!("http://{}/hello", p.addr("inbound")))
        .send()
        .await
        .unwrap();
    (rsp.status().as_u16(), rsp.text().await.unwrap())
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
    let cp = control_plane().run().unwrap();
    let served = app("web").await.unwrap();
    let web = server(&cp, served.addr(), AUTHORITY, "web");
    let friend = cp.proxy(CLIENT_ID).watch(AUTHORITY).run().unwrap();
    let intruder = cp.proxy(INTRUDER_ID).watch(AUTHORITY).run().unwrap();
    assert_eventually!(
        web.ready().await == 200 && friend.ready().await == 200 && intruder.ready().await == 200
    );

    // No Server selects the port: the default (all-unauthenticated) admits everyone.
    assert_eventually!(status_via(&friend).await == 200 && status_via(&intruder).await == 200);
    assert_eq!(plaintext(&web).await.0, 200);

    // A Server with one authorization: only the client's identity, and only over mTLS.
    cp.apply(ONLY_CLIENT).await;
    assert_eventually!(status_via(&intruder).await == 403);
    let before = served.hits();
    assert_eq!(status_via(&friend).await, 200);
    assert_eq!(status_via(&intruder).await, 403);
    let (status, body) = plaintext(&web).await;
    assert_eq!(status, 403);
    assert!(
        body.contains("Server/web-http does not authorize unauthenticated 127.0.0.1"),
        "{body}"
    );
    // Refused requests never reach the app.
    assert_eq!(served.hits(), before + 1);
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
    let config = web.config().await;
    assert_eq!(config["inboundPolicy"]["server"], "Server/web-http");
    assert_eq!(
        config["inboundPolicy"]["authorizations"][0]["require"][0]["identities"][0],
        CLIENT_ID
    );

    // A second authorization admits anything from loopback, mTLS or not.
    cp.apply(LOOPBACK_TOO).await;
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
    let cp = control_plane().run().unwrap();
    let echo = tcp_echo().await.unwrap();
    let db = server(&cp, echo, "db.default:5432", "db");
    assert_eventually!(db.ready().await == 200);
    let inbound = db.addr("inbound");

    // The default admits plaintext; a non-HTTP first byte makes the connection opaque.
    assert_eventually!(tcp_roundtrip(inbound, b"\x00ping").await == b"\x00ping");

    // An opaque Server that only admits mTLS identities: plaintext connections are closed,
    // even ones that look like HTTP.
    cp.apply(
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
    cp.apply(
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
