//! `mesh-proxy` (in-process) fed by watch streams: a weight change reaches it, it keeps serving its last
//! config while the control plane is gone (fail static), and resyncs when it comes back.
//!
//! The control plane here is a small stand-in speaking the proxy API (NDJSON watch streams,
//! `mesh_core::proxy_api`) behind the proxy API's mTLS (`mesh_test_support::proxy_api::StandIn`,
//! which also certifies the proxy); the real control plane has its own end-to-end test of the
//! same streams.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;

use bytes::Bytes;
use mesh_core::proxy_api::ServiceRef;
use mesh_test_support::apps::primary_and_canary;
use mesh_test_support::assert_eventually;
use mesh_test_support::proxies::{Sidecar, proxy};
use mesh_test_support::proxy_api::{StandIn, canary_split, unmeshed_endpoints, watch_line};
use tokio::sync::watch;
use tokio::task::JoinSet;

#[derive(Clone)]
struct State {
    version: u64,
    weights: (u32, u32),
    v1: SocketAddr,
    v2: SocketAddr,
}

fn svc(name: &str) -> ServiceRef {
    ServiceRef::new(name, "default", 80)
}

fn answer(path: &str, query: &str, st: &State) -> Bytes {
    if path == "/v1/watch/routes" {
        assert_eq!(query, "authority=web.default:80");
        watch_line(
            st.version,
            Some(canary_split(&svc("web"), "split", st.weights)),
        )
    } else {
        let service: ServiceRef = query.trim_start_matches("service=").parse().unwrap();
        let addr = match service.name.as_str() {
            "web-primary" => Some(st.v1),
            "web-canary" => Some(st.v2),
            _ => None,
        };
        watch_line(
            st.version,
            addr.map(|addr| unmeshed_endpoints(service, [addr])),
        )
    }
}

/// Serves watch streams from `state` on `listener`, behind the stand-in's TLS, until the
/// returned set is dropped.
fn control_plane(
    stand_in: &StandIn,
    listener: tokio::net::TcpListener,
    state: watch::Receiver<State>,
) -> JoinSet<()> {
    let mut set = JoinSet::new();
    set.spawn(stand_in.serve_watches(listener, state, answer));
    set
}

async fn versions(client: &reqwest::Client, n: usize) -> Vec<String> {
    let mut out = Vec::new();
    for _ in 0..n {
        let rsp = client.get("http://web.default:80/").send().await.unwrap();
        out.push(rsp.text().await.unwrap());
    }
    out
}

#[tokio::test]
async fn weight_changes_reach_the_proxy_and_it_fails_static() {
    let (v1, v2) = primary_and_canary().await.unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let cp_addr = listener.local_addr().unwrap();
    let (state_tx, state_rx) = watch::channel(State {
        version: 1,
        weights: (100, 0),
        v1,
        v2,
    });
    let stand_in = StandIn::new().unwrap();
    let cp = control_plane(&stand_in, listener, state_rx.clone());

    let proxy = proxy()
        .control_plane(
            &stand_in.access(cp_addr),
            "spiffe://cluster.local/ns/default/sa/client",
        )
        .run()
        .unwrap();
    let client = proxy.client();

    // The first request to the authority starts discovery and waits for it.
    assert!(versions(&client, 20).await.iter().all(|v| v == "v1"));

    state_tx.send_modify(|s| {
        s.version = 2;
        s.weights = (0, 100);
    });
    assert_eventually!(
        versions(&client, 10).await.iter().all(|v| v == "v2"),
        "weight change 0/100 never reached the proxy"
    );

    // Control plane gone: the proxy keeps its last config.
    drop(cp);
    assert!(versions(&client, 20).await.iter().all(|v| v == "v2"));

    // It comes back (a restart, with a lower version): the proxy resyncs to what it says.
    state_tx.send_modify(|s| {
        s.version = 1;
        s.weights = (100, 0);
    });
    let listener = tokio::net::TcpListener::bind(cp_addr).await.unwrap();
    let _cp = control_plane(&stand_in, listener, state_rx);
    assert_eventually!(
        versions(&client, 10).await.iter().all(|v| v == "v1"),
        "the proxy did not resync after the control plane returned"
    );
}

/// A proxy told about a control plane but not how to trust it, or with no identity to
/// authenticate its watches with, refuses to start (exit 64) and says what is missing.
#[test]
fn a_control_plane_without_trust_roots_or_an_identity_is_bad_config() {
    let run = |env: &[(&str, &str)]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_mesh-proxy"))
            .env("MESH_PROXY_ADMIN_ADDR", "127.0.0.1:0")
            .env("MESH_PROXY_OUTBOUND_ADDR", "127.0.0.1:0")
            .env("MESH_PROXY_CONTROL_PLANE_ADDR", "127.0.0.1:1")
            .envs(env.iter().copied())
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, stderr) = run(&[]);
    assert_eq!(code, Some(64), "{stderr}");
    assert!(stderr.contains("MESH_PROXY_TRUST_ROOTS_FILE"), "{stderr}");

    let dir = tempfile::tempdir().unwrap();
    let roots = dir.path().join("trust-roots.pem");
    std::fs::write(&roots, StandIn::new().unwrap().ca().roots_pem()).unwrap();
    let roots = roots.to_str().unwrap();
    let (code, stderr) = run(&[("MESH_PROXY_TRUST_ROOTS_FILE", roots)]);
    assert_eq!(code, Some(64), "{stderr}");
    assert!(
        stderr.contains("MESH_PROXY_IDENTITY") && stderr.contains("certificate"),
        "{stderr}"
    );

    let (code, stderr) = run(&[
        ("MESH_PROXY_TRUST_ROOTS_FILE", "/no/such/trust-roots.pem"),
        (
            "MESH_PROXY_IDENTITY",
            "spiffe://cluster.local/ns/default/sa/web",
        ),
        ("MESH_PROXY_TOKEN_FILE", "/no/such/token"),
    ]);
    assert_eq!(code, Some(64), "{stderr}");
    assert!(stderr.contains("/no/such/trust-roots.pem"), "{stderr}");
}
