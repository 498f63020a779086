//! Two real `mesh-proxy` processes talking mTLS and HTTP/2 to each other, with certificates from
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
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, combinators::BoxBody};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use mesh_test_support::assert_eventually;
use mesh_test_support::process::{MeshBinary, MeshProcess};
use mesh_test_support::proxy_api::ProxyApiAccess;

const WEB_ID: &str = "spiffe://cluster.local/ns/default/sa/web";
const CLIENT_ID: &str = "spiffe://cluster.local/ns/default/sa/client";
const AUTHORITY: &str = "web.default:80";
/// The app answers with the caller identity it was given, and the HTTP version it was called with.
const SEEN_CLIENT_ID: &str = "x-seen-client-id";
const SEEN_VERSION: &str = "x-seen-version";

/// The test app: counts requests; answers gRPC calls in gRPC's wire format (`/Unary` echoes the
/// message, `/Stream` answers with as many messages as the request asks for) and anything else
/// with `web`.
async fn app() -> (SocketAddr, Arc<AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let count = Arc::new(AtomicUsize::new(0));
    let seen = count.clone();
    tokio::spawn(async move {
        while let Ok((io, _)) = listener.accept().await {
            let seen = seen.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                    seen.fetch_add(1, Ordering::SeqCst);
                    answer(req)
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(io), svc)
                    .await;
            });
        }
    });
    (addr, count)
}

type AppBody = BoxBody<Bytes, Infallible>;

async fn answer(req: Request<Incoming>) -> Result<Response<AppBody>, Infallible> {
    let mut builder = Response::builder().header(SEEN_VERSION, format!("{:?}", req.version()));
    if let Some(id) = req.headers().get("x-mesh-client-id") {
        builder = builder.header(SEEN_CLIENT_ID, id);
    }
    let grpc = req
        .headers()
        .get("content-type")
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
    if !grpc {
        return Ok(builder
            .body(Full::new(Bytes::from_static(b"web")).boxed())
            .unwrap());
    }
    let path = req.uri().path().to_string();
    let body = req.into_body().collect().await.unwrap().to_bytes();
    let request = decode(body).pop().unwrap_or_default();
    let (tx, body) = http_body_util::channel::Channel::<Bytes, Infallible>::new(4);
    let mut tx = tx;
    tokio::spawn(async move {
        if path.ends_with("/Unary") {
            let _ = tx.send_data(encode(&request)).await;
        } else {
            let n: usize = String::from_utf8_lossy(&request).parse().unwrap_or(0);
            for i in 0..n {
                let _ = tx.send_data(encode(format!("msg-{i}").as_bytes())).await;
            }
        }
        let mut trailers = HeaderMap::new();
        trailers.insert("grpc-status", "0".parse().unwrap());
        let _ = tx.send_trailers(trailers).await;
    });
    Ok(builder
        .header("content-type", "application/grpc")
        .body(body.boxed())
        .unwrap())
}

/// One gRPC message: uncompressed flag, big-endian length, bytes.
fn encode(message: &[u8]) -> Bytes {
    let mut b = BytesMut::with_capacity(5 + message.len());
    b.put_u8(0);
    b.put_u32(u32::try_from(message.len()).unwrap());
    b.put_slice(message);
    b.freeze()
}

fn decode(mut body: Bytes) -> Vec<Vec<u8>> {
    let mut messages = Vec::new();
    while body.remaining() >= 5 {
        let _compressed = body.get_u8();
        let len = body.get_u32() as usize;
        messages.push(body.split_to(len).to_vec());
    }
    assert!(body.is_empty(), "a truncated gRPC message");
    messages
}

fn control_plane(state: &Path, lifetime: &str) -> MeshProcess {
    MeshBinary::workspace("mesh-controlplane")
        .unwrap()
        .env("MESH_CONTROLPLANE_STATE_DIR", state)
        .env("MESH_CONTROLPLANE_API_ADDR", "127.0.0.1:0")
        .env("MESH_CONTROLPLANE_PROXY_ADDR", "127.0.0.1:0")
        .env("MESH_CONTROLPLANE_CERT_LIFETIME", lifetime)
        .listener("api")
        .listener("proxy")
        .run()
        .unwrap()
}

/// How proxies reach `cp`, whose state directory is `state`: its proxy API, trust roots and
/// bootstrap token.
fn access(cp: &MeshProcess, state: &Path) -> ProxyApiAccess {
    ProxyApiAccess::of_control_plane(cp.addr("proxy"), state)
}

/// A proxy with identity `id`, certified by the control plane behind `access`.
fn proxy(access: &ProxyApiAccess, id: &str) -> MeshBinary {
    MeshBinary::new(env!("CARGO_BIN_EXE_mesh-proxy"))
        .env("MESH_PROXY_ADMIN_ADDR", "127.0.0.1:0")
        .env("MESH_PROXY_OUTBOUND_ADDR", "127.0.0.1:0")
        .control_plane(access, id)
        .env("RUST_LOG", "info")
        .listener("admin")
        .listener("outbound")
}

/// The server side: the app behind a proxy registered as `web.default:80` with [`WEB_ID`].
fn server_proxy(cp: &MeshProcess, state: &Path, app: SocketAddr) -> MeshProcess {
    proxy(&access(cp, state), WEB_ID)
        .env("MESH_PROXY_INBOUND_ADDR", "127.0.0.1:0")
        .env("MESH_PROXY_APP_ADDR", app.to_string())
        .env("MESH_PROXY_WORKLOAD_SERVICE", AUTHORITY)
        .listener("inbound")
        .run()
        .unwrap()
}

async fn ready(p: &MeshProcess) -> u16 {
    mesh_test_support::http_client()
        .get(format!("http://{}/ready", p.addr("admin")))
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

/// The `identity` object of the proxy's `/config`.
async fn identity(p: &MeshProcess) -> serde_json::Value {
    let config: serde_json::Value = mesh_test_support::http_client()
        .get(format!("http://{}/config", p.addr("admin")))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    config["identity"].clone()
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
    let state = tempfile::tempdir().unwrap();
    let cp = control_plane(state.path(), "1h");
    let (app, _) = app().await;
    let server = server_proxy(&cp, state.path(), app);
    let client = proxy(&access(&cp, state.path()), CLIENT_ID).run().unwrap();
    assert_eventually!(ready(&server).await == 200 && ready(&client).await == 200);
    assert_eq!(identity(&server).await["identity"], WEB_ID);
    assert_eq!(identity(&client).await["identity"], CLIENT_ID);
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
    let state = tempfile::tempdir().unwrap();
    let cp = control_plane(state.path(), "1h");
    let (app, requests) = app().await;
    let server = server_proxy(&cp, state.path(), app);
    assert_eventually!(ready(&server).await == 200);
    // Discovery (a static file here) promises `other`; the peer proves to be `web`.
    let config = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(
        config.path(),
        format!(
            "routes:\n  - parent: {AUTHORITY}\n    rules:\n      - backends: [{{service: {AUTHORITY}, weight: 1}}]\n\
             endpoints:\n  - service: {AUTHORITY}\n    endpoints:\n      - addr: {}\n        identity: spiffe://cluster.local/ns/default/sa/other\n",
            server.addr("inbound")
        ),
    )
    .unwrap();
    let client = proxy(&access(&cp, state.path()), CLIENT_ID)
        .env("MESH_PROXY_CONFIG", config.path())
        .run()
        .unwrap();
    assert_eventually!(ready(&client).await == 200);
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
    assert_eq!(requests.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn certificates_are_renewed_under_traffic_without_a_failed_request() {
    let state = tempfile::tempdir().unwrap();
    let cp = control_plane(state.path(), "6s");
    let (app, _) = app().await;
    let server = server_proxy(&cp, state.path(), app);
    let client = proxy(&access(&cp, state.path()), CLIENT_ID).run().unwrap();
    assert_eventually!(ready(&server).await == 200 && ready(&client).await == 200);
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
            for (p, seen) in [&server, &client].into_iter().zip(&mut serials) {
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
    let state = tempfile::tempdir().unwrap();
    let cp = control_plane(state.path(), "1h");
    let mut wrong = access(&cp, state.path());
    wrong.token_file = state.path().join("wrong-token");
    std::fs::write(&wrong.token_file, "not-the-token\n").unwrap();
    let mut p = proxy(&wrong, CLIENT_ID).run().unwrap();
    assert_eventually!(
        std::fs::read_to_string(p.child().log())
            .unwrap()
            .contains("refused the bootstrap token"),
        "log: {}",
        p.child().log_tail(20)
    );
    assert_eq!(ready(&p).await, 503);
    assert!(identity(&p).await.is_null());
}

/// The proxy checks the proxy API's certificate before it sends its token: roots of another CA,
/// or a control plane that does not name the control plane's identity in the proxy's trust
/// domain, leave it uncertified and unready, saying why.
#[tokio::test]
async fn the_proxy_verifies_the_control_plane_before_asking_it_anything() {
    let state = tempfile::tempdir().unwrap();
    let cp = control_plane(state.path(), "1h");

    let mut foreign_roots = access(&cp, state.path());
    foreign_roots.trust_roots_file = state.path().join("other-roots.pem");
    let other_ca = mesh_test_support::proxy_api::MeshCa::generate().unwrap();
    std::fs::write(&foreign_roots.trust_roots_file, other_ca.roots_pem()).unwrap();
    let mut untrusting = proxy(&foreign_roots, CLIENT_ID).run().unwrap();

    // Another trust domain expects spiffe://other.org/ns/mesh-system/sa/mesh-controlplane.
    let mut elsewhere = proxy(
        &access(&cp, state.path()),
        "spiffe://other.org/ns/default/sa/client",
    )
    .run()
    .unwrap();

    for (p, why) in [
        (&mut untrusting, "UnknownIssuer"),
        (
            &mut elsewhere,
            "expected spiffe://other.org/ns/mesh-system/sa/mesh-controlplane",
        ),
    ] {
        assert_eventually!(
            std::fs::read_to_string(p.child().log())
                .unwrap()
                .contains(why),
            "no {why:?} in the log: {}",
            p.child().log_tail(20)
        );
        assert_eq!(ready(p).await, 503);
        assert!(identity(p).await.is_null());
    }
}
