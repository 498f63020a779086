//! Two `mesh-proxy`s (in-process) talking mTLS and HTTP/2 to each other, with certificates from
//! a real `mesh-controlplane`: HTTP/1.1, HTTP/2 and gRPC (unary and server streaming) cross from
//! a client through both proxies to an app that sees the caller's verified identity; a peer that
//! presents another identity than discovery promised is refused before any request reaches it;
//! certificates with a 6 s lifetime are renewed under steady traffic without a failed request;
//! and a proxy with a bad bootstrap token says so and stays unready.
//!
//! gRPC is spoken in its wire format over hyper's HTTP/2 client (length-prefixed messages and
//! `grpc-status` trailers) rather than through a gRPC library, to keep the test's build small.
//!
//! The control plane binary is found beside the test executable; build it first with
//! `cargo build -p mesh-controlplane --bins` (same target directory).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use mesh_test_support::apps::grpc::{decode, encode};
use mesh_test_support::apps::{SEEN_CLIENT_ID, SEEN_VERSION, app};
use mesh_test_support::assert_eventually;
use mesh_test_support::mesh::{
    CLIENT_ID, SERVER_ID as WEB_ID, SERVICE as AUTHORITY, control_plane, mesh_pair,
};
use mesh_test_support::proxies::{Sidecar, proxy};

/// The `identity` object of the proxy's `/config`.
async fn identity(p: &impl Sidecar) -> serde_json::Value {
    p.config().await["identity"].clone()
}

/// An HTTP/1.1 GET to `web.default:80` through the outbound listener at `outbound`.
async fn get(outbound: SocketAddr, extra: &[(&str, &str)]) -> reqwest::Response {
    let mut req = mesh_test_support::http_client()
        .get(format!("http://{outbound}/hello"))
        .header("host", AUTHORITY);
    for (k, v) in extra {
        req = req.header(*k, *v);
    }
    req.send().await.unwrap()
}

/// An HTTP/2 (prior knowledge) connection to `addr`.
async fn h2(addr: SocketAddr) -> hyper::client::conn::http2::SendRequest<Full<Bytes>> {
    let io = TokioIo::new(tokio::net::TcpStream::connect(addr).await.unwrap());
    let (send, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
        .await
        .unwrap();
    tokio::spawn(conn);
    send
}

/// A gRPC call over `send`: the answer's headers, messages and trailers.
async fn grpc(
    send: &mut hyper::client::conn::http2::SendRequest<Full<Bytes>>,
    method: &str,
    message: &[u8],
) -> (Response<()>, Vec<Vec<u8>>, HeaderMap) {
    let req = Request::post(format!("http://{AUTHORITY}/test.Echo/{method}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(Full::new(encode(message)))
        .unwrap();
    let rsp = send.send_request(req).await.unwrap();
    let (parts, body) = rsp.into_parts();
    let collected = body.collect().await.unwrap();
    let trailers = collected.trailers().cloned().unwrap_or_default();
    (
        Response::from_parts(parts, ()),
        decode(collected.to_bytes()),
        trailers,
    )
}

#[tokio::test]
async fn http1_h2_and_grpc_cross_two_proxies_over_mtls() {
    let web = app("web").await.unwrap();
    let pair = mesh_pair(web.addr())
        .cert_lifetime("1h")
        .run()
        .await
        .unwrap();
    let (server, client) = (&pair.server, &pair.client);
    assert_eventually!(server.ready().await == 200 && client.ready().await == 200);
    assert_eq!(identity(server).await["identity"], WEB_ID);
    assert_eq!(identity(client).await["identity"], CLIENT_ID);
    let outbound = client.addr("outbound");

    // HTTP/1.1: carried as HTTP/2 between the proxies, restored to HTTP/1.1 for the app. A
    // caller cannot claim an identity by sending the header itself.
    assert_eventually!(get(outbound, &[]).await.status() == 200);
    let rsp = get(
        outbound,
        &[("x-mesh-client-id", "spiffe://cluster.local/ns/x/sa/evil")],
    )
    .await;
    assert_eq!(rsp.status(), 200);
    assert_eq!(rsp.headers()[SEEN_CLIENT_ID], CLIENT_ID);
    assert_eq!(rsp.headers()[SEEN_VERSION], "HTTP/1.1");
    assert_eq!(rsp.text().await.unwrap(), "web");

    // HTTP/2 from the client stays HTTP/2 all the way.
    let mut send = h2(outbound).await;
    let req = Request::get(format!("http://{AUTHORITY}/hello"))
        .body(Full::default())
        .unwrap();
    let rsp = send.send_request(req).await.unwrap();
    assert_eq!(rsp.status(), StatusCode::OK);
    assert_eq!(rsp.headers()[SEEN_CLIENT_ID], CLIENT_ID);
    assert_eq!(rsp.headers()[SEEN_VERSION], "HTTP/2.0");

    // gRPC, unary and server streaming, trailers included.
    let (rsp, messages, trailers) = grpc(&mut send, "Unary", b"ping").await;
    assert_eq!(rsp.status(), StatusCode::OK);
    assert_eq!(rsp.headers()[SEEN_CLIENT_ID], CLIENT_ID);
    assert_eq!(messages, [b"ping".to_vec()]);
    assert_eq!(trailers["grpc-status"], "0");
    let (rsp, messages, trailers) = grpc(&mut send, "Stream", b"5").await;
    assert_eq!(rsp.headers()[SEEN_CLIENT_ID], CLIENT_ID);
    let expected: Vec<Vec<u8>> = (0..5).map(|i| format!("msg-{i}").into_bytes()).collect();
    assert_eq!(messages, expected);
    assert_eq!(trailers["grpc-status"], "0");

    // Plaintext to the inbound listener still works, and carries no identity, whatever the
    // caller claims.
    let rsp = mesh_test_support::http_client()
        .get(format!("http://{}/hello", server.addr("inbound")))
        .header("x-mesh-client-id", CLIENT_ID)
        .send()
        .await
        .unwrap();
    assert_eq!(rsp.status(), 200);
    assert!(rsp.headers().get(SEEN_CLIENT_ID).is_none());
}

#[tokio::test]
async fn a_peer_with_another_identity_is_refused() {
    let cp = control_plane().cert_lifetime("1h").run().unwrap();
    let web = app("web").await.unwrap();
    let server = cp
        .proxy(WEB_ID)
        .app(web.addr())
        .service(AUTHORITY)
        .run()
        .unwrap();
    assert_eventually!(server.ready().await == 200);
    // Discovery (a static file here) promises `other`; the peer proves to be `web`.
    let config = format!(
        "routes:\n  - parent: {AUTHORITY}\n    rules:\n      - backends: [{{service: {AUTHORITY}, weight: 1}}]\n\
         endpoints:\n  - service: {AUTHORITY}\n    endpoints:\n      - addr: {}\n        identity: spiffe://cluster.local/ns/default/sa/other\n",
        server.addr("inbound")
    );
    let client = cp.proxy(CLIENT_ID).outbound(config).run().unwrap();
    assert_eventually!(client.ready().await == 200);
    for _ in 0..3 {
        let rsp = get(client.addr("outbound"), &[]).await;
        assert_eq!(rsp.status(), 502);
        let why = rsp.headers()["mesh-proxy-error"]
            .to_str()
            .unwrap()
            .to_string();
        assert!(
            why.contains("expected spiffe://cluster.local/ns/default/sa/other"),
            "{why}"
        );
    }
    assert_eq!(web.hits(), 0);
}

#[tokio::test]
async fn certificates_are_renewed_under_traffic_without_a_failed_request() {
    let web = app("web").await.unwrap();
    let pair = mesh_pair(web.addr())
        .cert_lifetime("6s")
        .run()
        .await
        .unwrap();
    let (server, client) = (&pair.server, &pair.client);
    assert_eventually!(server.ready().await == 200 && client.ready().await == 200);
    let outbound = client.addr("outbound");
    assert_eventually!(get(outbound, &[]).await.status() == 200);

    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let traffic = {
        let (stop, ok, failed) = (stop.clone(), ok.clone(), failed.clone());
        tokio::spawn(async move {
            while !stop.load(Ordering::SeqCst) {
                let rsp = get(outbound, &[]).await;
                let good = rsp.status() == 200 && rsp.headers()[SEEN_CLIENT_ID] == CLIENT_ID;
                if good { &ok } else { &failed }.fetch_add(1, Ordering::SeqCst);
            }
        })
    };
    let mut serials = [BTreeSet::new(), BTreeSet::new()];
    assert_eventually!(
        {
            for (p, seen) in [server, client].into_iter().zip(&mut serials) {
                if let Some(s) = identity(p).await["serial"].as_str() {
                    seen.insert(s.to_string());
                }
            }
            serials.iter().all(|s| s.len() >= 3)
        },
        "serials seen: {serials:?}"
    );
    stop.store(true, Ordering::SeqCst);
    traffic.await.unwrap();
    assert_eq!(failed.load(Ordering::SeqCst), 0);
    assert!(ok.load(Ordering::SeqCst) > 0);
}

#[tokio::test]
async fn a_bad_token_is_refused_and_the_proxy_stays_unready() {
    let cp = control_plane().cert_lifetime("1h").run().unwrap();
    let mut wrong = cp.access();
    wrong.token_file = cp.state().join("wrong-token");
    std::fs::write(&wrong.token_file, "not-the-token\n").unwrap();
    // What the proxy says is in its log: this proxy is the binary.
    let mut p = proxy().control_plane(&wrong, CLIENT_ID).spawn().unwrap();
    assert_eventually!(
        p.log().contains("refused the bootstrap token"),
        "log: {}",
        p.log_tail(20)
    );
    assert_eq!(p.ready().await, 503);
    assert!(identity(&p).await.is_null());
}

/// The proxy checks the proxy API's certificate before it sends its token: roots of another CA,
/// or a control plane that does not name the control plane's identity in the proxy's trust
/// domain, leave it uncertified and unready, saying why.
#[tokio::test]
async fn the_proxy_verifies_the_control_plane_before_asking_it_anything() {
    let cp = control_plane().cert_lifetime("1h").run().unwrap();

    // What the proxies say is in their logs: these proxies are the binary.
    let mut foreign_roots = cp.access();
    foreign_roots.trust_roots_file = cp.state().join("other-roots.pem");
    let other_ca = mesh_test_support::proxy_api::MeshCa::generate().unwrap();
    std::fs::write(&foreign_roots.trust_roots_file, other_ca.roots_pem()).unwrap();
    let mut untrusting = proxy()
        .control_plane(&foreign_roots, CLIENT_ID)
        .spawn()
        .unwrap();

    // Another trust domain expects spiffe://other.org/ns/mesh-system/sa/mesh-controlplane.
    let mut elsewhere = cp
        .proxy("spiffe://other.org/ns/default/sa/client")
        .spawn()
        .unwrap();

    for (p, why) in [
        (&mut untrusting, "UnknownIssuer"),
        (
            &mut elsewhere,
            "expected spiffe://other.org/ns/mesh-system/sa/mesh-controlplane",
        ),
    ] {
        assert_eventually!(
            p.log().contains(why),
            "no {why:?} in the log: {}",
            p.log_tail(20)
        );
        assert_eq!(p.ready().await, 503);
        assert!(identity(&*p).await.is_null());
    }
}

/// Two proxies agree on the hybrid post-quantum key exchange: the server proxy's log names the
/// group of the mTLS handshake its peer made.
#[tokio::test]
async fn proxies_negotiate_post_quantum_key_exchange() {
    let web = app("v1").await.unwrap();
    let cp = control_plane().run().unwrap();
    let mut server = cp
        .proxy(WEB_ID)
        .app(web.addr())
        .service(AUTHORITY)
        .env("RUST_LOG", "info,mesh_sidecar::drain=debug")
        .spawn()
        .unwrap();
    let client = cp.proxy(CLIENT_ID).run().unwrap();
    mesh_test_support::proxies::wait_ready(&server)
        .await
        .unwrap();
    mesh_test_support::proxies::wait_ready(&client)
        .await
        .unwrap();
    assert_eventually!(get(client.addr("outbound"), &[]).await.status() == StatusCode::OK);
    assert_eventually!(server.log().contains("TLS handshake"));
    let log = server.log();
    let handshakes: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("TLS handshake"))
        .collect();
    assert!(
        handshakes
            .iter()
            .all(|l| l.contains("Some(X25519MLKEM768)")),
        "{handshakes:#?}"
    );
}
