//! What the app spoke is what the far side hears, through the outbound and the inbound
//! listener, unmeshed (static config, plaintext) and meshed (two proxies on a real control
//! plane, mTLS between them), with real clients and servers: curl for HEAD over HTTP/2 and
//! HTTP/1.1, for `CONNECT` (`-p -x`) to an HTTPS server whose certificate curl verifies, and
//! for `Expect: 100-continue`; grpcio's client and server (unary, streaming both ways, a
//! deadline, an error status in trailers); the `websockets` package's client and server; and
//! bodies streamed both ways in lockstep, which a proxy that buffers would never finish.
//!
//! Proxies run in-process, and once as the `mesh-proxy` binary. Needs `python3` with `grpcio`
//! and `websockets` (scripts/test installs them), curl, and the binaries
//! (`cargo build -p mesh-sidecar -p mesh-controlplane --bins`).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::Path;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};
use mesh_test_support::apps::app;
use mesh_test_support::certs::{Leaf, TestCa};
use mesh_test_support::fixtures::{Via, grpc_check, grpc_echo, https_hello, ws_check, ws_echo};
use mesh_test_support::mesh::{SERVICE, mesh_pair};
use mesh_test_support::metric_sum;
use mesh_test_support::proxies::{Sidecar, proxy};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A static config whose only service, `service`, has its one endpoint at `addr`.
fn endpoint(service: &str, addr: SocketAddr) -> String {
    format!("endpoints:\n  - service: {service}\n    endpoints: [{{addr: \"{addr}\"}}]\n")
}

/// curl with `args`: whether it succeeded, its stdout and its stderr.
async fn curl(args: &[&str]) -> (bool, String, String) {
    let out = tokio::process::Command::new("curl")
        .args(["-sS", "--max-time", "60"])
        .args(args)
        .output()
        .await
        .expect("running curl");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test]
async fn head_is_answered_over_http2_and_http1_through_both_listeners() {
    // The app is hyper, which (like many servers) sends a HEAD response's body over HTTP/2;
    // the proxy must not pass it on as DATA.
    let v1 = app("v1").await.unwrap();
    let p = proxy()
        .outbound(endpoint("web.default:80", v1.addr()))
        .app(v1.addr())
        .run()
        .unwrap();
    for (listener, host) in [("inbound", "app"), ("outbound", "web.default:80")] {
        let url = format!("http://{}/hello", p.addr(listener));
        for (h2, status_line) in [(true, "HTTP/2 200"), (false, "HTTP/1.1 200")] {
            let mut args = vec!["-I".to_string(), "-H".into(), format!("host: {host}")];
            if h2 {
                args.push("--http2-prior-knowledge".into());
            }
            args.push(url.clone());
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            let (ok, out, err) = curl(&args).await;
            assert!(ok, "HEAD via {listener} (h2: {h2}): {err}");
            assert!(out.starts_with(status_line), "{listener}: {out}");
            // The GET's headers, and no content.
            assert!(out.contains("content-length: 2"), "{listener}: {out}");
            assert!(out.contains("x-app-version: v1"), "{listener}: {out}");
        }
    }
}

#[tokio::test]
async fn head_is_answered_over_http2_and_http1_across_a_meshed_pair() {
    let v1 = app("v1").await.unwrap();
    let pair = mesh_pair(v1.addr()).run().await.unwrap();
    let url = format!("http://{}/hello", pair.client_outbound());
    let host = format!("host: {SERVICE}");
    for (h2, status_line) in [(true, "HTTP/2 200"), (false, "HTTP/1.1 200")] {
        let mut args = vec!["-I", "-H", &host, &url];
        if h2 {
            args.push("--http2-prior-knowledge");
        }
        let (ok, out, err) = curl(&args).await;
        assert!(ok, "HEAD (h2: {h2}): {err}");
        assert!(out.starts_with(status_line), "{out}");
        assert!(out.contains("content-length: 2"), "{out}");
    }
}

#[tokio::test]
async fn grpc_reaches_an_unmeshed_server_through_both_listeners() {
    let server = grpc_echo().unwrap();
    let p = proxy()
        .outbound(endpoint("grpc.default:80", server.addr("grpc")))
        .app(server.addr("grpc"))
        .run()
        .unwrap();
    // The outbound listener, to a plaintext endpoint: HTTP/2 must stay HTTP/2.
    grpc_check(p.addr("outbound"), Some("grpc.default:80"))
        .await
        .assert_passed();
    grpc_check(p.addr("inbound"), None).await.assert_passed();
    let admin = p.addr("admin");
    for direction in ["outbound", "inbound"] {
        let ok = metric_sum(
            admin,
            "response_total",
            &[&format!("direction=\"{direction}\""), "status_code=\"200\""],
        )
        .await;
        // Every call but the one cut off by its deadline is a 200 (errors are in trailers).
        assert!(ok >= 5.0, "{direction} counted {ok} calls");
    }
}

#[tokio::test]
async fn the_mesh_proxy_binary_carries_grpc_and_answers_head_over_http2() {
    // The two reports this suite started from, against the binary itself.
    let server = grpc_echo().unwrap();
    let v1 = app("v1").await.unwrap();
    let p = proxy()
        .outbound(endpoint("grpc.default:80", server.addr("grpc")))
        .app(v1.addr())
        .spawn()
        .unwrap();
    grpc_check(p.addr("outbound"), Some("grpc.default:80"))
        .await
        .assert_passed();
    let url = format!("http://{}/", p.addr("inbound"));
    let (ok, out, err) = curl(&["-I", "--http2-prior-knowledge", &url]).await;
    assert!(ok, "{err}");
    assert!(out.starts_with("HTTP/2 200"), "{out}");
}

#[tokio::test]
async fn grpc_crosses_a_meshed_pair() {
    let server = grpc_echo().unwrap();
    let pair = mesh_pair(server.addr("grpc")).run().await.unwrap();
    grpc_check(pair.client_outbound(), Some(SERVICE))
        .await
        .assert_passed();
    let inbound = metric_sum(
        pair.server.addr("admin"),
        "response_total",
        &["direction=\"inbound\""],
    )
    .await;
    assert!(inbound >= 5.0, "the server's proxy saw {inbound} calls");
}

#[tokio::test]
async fn websockets_echo_through_both_listeners_unmeshed() {
    let server = ws_echo().unwrap();
    let p = proxy()
        .outbound(endpoint("ws.default:80", server.addr("ws")))
        .app(server.addr("ws"))
        .run()
        .unwrap();
    ws_check("ws://ws.default:80/echo", Via::Connect(p.addr("outbound")))
        .await
        .assert_passed();
    let inbound = p.addr("inbound");
    ws_check(&format!("ws://{inbound}/echo"), Via::Connect(inbound))
        .await
        .assert_passed();
    let admin = p.addr("admin");
    for direction in ["outbound", "inbound"] {
        let label = format!("direction=\"{direction}\"");
        assert_eq!(metric_sum(admin, "tcp_open_total", &[&label]).await, 1.0);
        let read = metric_sum(admin, "tcp_read_bytes_total", &[&label]).await;
        assert!(read > 1_048_576.0, "{direction} tunnel read {read} bytes");
        let upgraded = metric_sum(admin, "response_total", &[&label, "status_code=\"101\""]).await;
        assert_eq!(upgraded, 1.0, "{direction}");
    }
}

#[tokio::test]
async fn websockets_echo_across_a_meshed_pair() {
    let server = ws_echo().unwrap();
    let pair = mesh_pair(server.addr("ws")).run().await.unwrap();
    ws_check(
        &format!("ws://{SERVICE}/echo"),
        Via::Connect(pair.client_outbound()),
    )
    .await
    .assert_passed();
    // And as an app with HTTPS_PROXY would: a CONNECT to the service, then the WebSocket
    // handshake with the far app inside the tunnel.
    ws_check(
        &format!("ws://{SERVICE}/echo"),
        Via::HttpProxy(pair.client_outbound()),
    )
    .await
    .assert_passed();
    let label = ["direction=\"inbound\""];
    let tunnels = metric_sum(pair.server.addr("admin"), "tcp_open_total", &label).await;
    assert_eq!(tunnels, 2.0, "both tunnels crossed the server's proxy");
    let label = ["direction=\"outbound\""];
    let tunnels = metric_sum(pair.client.addr("admin"), "tcp_open_total", &label).await;
    assert_eq!(tunnels, 2.0);
}

/// A CA and an HTTPS server whose certificate names `names`; the CA's certificate is written
/// to `dir/ca.pem` for curl's `--cacert`.
fn https_server(dir: &Path, names: &[&str]) -> mesh_test_support::process::MeshProcess {
    let ca = TestCa::new("fidelity test CA").unwrap();
    let mut leaf = Leaf::new("hello").server();
    for n in names {
        leaf = leaf.san(n);
    }
    let key = ca.issue(&leaf).unwrap();
    std::fs::write(dir.join("ca.pem"), ca.cert_pem()).unwrap();
    https_hello(dir, &key.cert_pem, &key.key_pem).unwrap()
}

#[tokio::test]
async fn connect_tunnels_through_the_outbound_listener_by_service_or_to_the_named_host() {
    let dir = tempfile::tempdir().unwrap();
    let server = https_server(dir.path(), &["127.0.0.1", "secure.default"]);
    let https = server.addr("https");
    let p = proxy()
        .outbound(endpoint("secure.default:443", https))
        .run()
        .unwrap();
    let outbound = format!("http://{}", p.addr("outbound"));
    let ca = dir.path().join("ca.pem");
    let ca = ca.to_str().unwrap();
    // A meshed service by name: the route's endpoint; and an address the mesh does not know:
    // straight there. curl verifies the server's own certificate through the tunnel.
    for url in [
        "https://secure.default:443/a".to_string(),
        format!("https://{https}/b"),
    ] {
        let (ok, out, err) = curl(&["--cacert", ca, "-p", "-x", &outbound, &url]).await;
        assert!(ok, "{url}: {err}");
        let path = &url[url.rfind('/').unwrap()..];
        assert_eq!(out, format!("hello over TLS {path}\n"));
    }
    let admin = p.addr("admin");
    let tunnels = metric_sum(admin, "tcp_open_total", &["direction=\"outbound\""]).await;
    assert_eq!(tunnels, 2.0);

    // Bad targets are refused, naming what is wrong.
    for (target, status, why) in [
        (
            "secure.default",
            400,
            "CONNECT target secure.default has no port",
        ),
        (
            "secure.default:0",
            400,
            "CONNECT target secure.default:0 has port 0",
        ),
        ("127.0.0.1:1", 502, "CONNECT to 127.0.0.1:1: "),
    ] {
        let head = raw_connect(p.addr("outbound"), target).await;
        assert!(
            head.starts_with(&format!("HTTP/1.1 {status}")),
            "{target}: {head}"
        );
        assert!(head.contains(&format!("mesh-proxy-error: {why}")), "{head}");
    }
}

/// Sends `CONNECT target` on a new connection to `addr` and returns the response's head.
async fn raw_connect(addr: SocketAddr, target: &str) -> String {
    let mut conn = tokio::net::TcpStream::connect(addr).await.unwrap();
    let req = format!("CONNECT {target} HTTP/1.1\r\nhost: {target}\r\n\r\n");
    conn.write_all(req.as_bytes()).await.unwrap();
    let mut buf = vec![0; 4096];
    let mut got = Vec::new();
    while !got.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = conn.read(&mut buf).await.unwrap();
        assert!(n > 0, "connection closed after {got:?}");
        got.extend_from_slice(&buf[..n]);
    }
    String::from_utf8_lossy(&got).into_owned()
}

#[tokio::test]
async fn connect_through_the_inbound_listener_reaches_an_app_that_is_a_proxy() {
    let dir = tempfile::tempdir().unwrap();
    let server = https_server(dir.path(), &["127.0.0.1"]);
    let https = server.addr("https");
    // The app behind the inbound listener is itself an HTTP proxy (another proxy's outbound
    // listener); a CONNECT is for it, and the tunnel runs through both.
    let forward_proxy = proxy().run().unwrap();
    let p = proxy().app(forward_proxy.addr("outbound")).run().unwrap();
    let via = format!("http://{}", p.addr("inbound"));
    let ca = dir.path().join("ca.pem");
    let url = format!("https://{https}/c");
    let ca = ca.to_str().unwrap();
    let (ok, out, err) = curl(&["--cacert", ca, "-p", "-x", &via, &url]).await;
    assert!(ok, "{err}");
    assert_eq!(out, "hello over TLS /c\n");
    // The mark peers put on their apps' CONNECTs means nothing from a plaintext caller: the
    // CONNECT still goes to the app.
    let forged = ["--proxy-header", "mesh-tunnel: app"];
    let (ok, out, err) =
        curl(&[&forged[..], &["--cacert", ca, "-p", "-x", &via, &url]].concat()).await;
    assert!(ok, "{err}");
    assert_eq!(out, "hello over TLS /c\n");
    for (who, direction) in [(&p, "inbound"), (&forward_proxy, "outbound")] {
        let label = format!("direction=\"{direction}\"");
        let tunnels = metric_sum(who.addr("admin"), "tcp_open_total", &[&label]).await;
        assert_eq!(tunnels, 2.0, "{direction}");
    }
}

#[tokio::test]
async fn connect_to_a_meshed_service_crosses_the_pair_over_mtls() {
    let dir = tempfile::tempdir().unwrap();
    let server = https_server(dir.path(), &["web.default"]);
    let pair = mesh_pair(server.addr("https")).run().await.unwrap();
    let via = format!("http://{}", pair.client_outbound());
    let ca = dir.path().join("ca.pem");
    let url = format!("https://{SERVICE}/d");
    let (ok, out, err) = curl(&["--cacert", ca.to_str().unwrap(), "-p", "-x", &via, &url]).await;
    assert!(ok, "{err}");
    assert_eq!(out, "hello over TLS /d\n");
    let label = ["direction=\"inbound\""];
    let tunnels = metric_sum(pair.server.addr("admin"), "tcp_open_total", &label).await;
    assert_eq!(tunnels, 1.0, "the tunnel crossed the server's proxy");
}

/// An app that streams each request's body back as the response's, as it arrives, with a
/// trailer counting the bytes.
async fn echo_app() -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (io, _) = listener.accept().await.unwrap();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(|req: Request<Incoming>| async move {
                    let (tx, rx) =
                        tokio::sync::mpsc::channel::<Result<Frame<Bytes>, Infallible>>(4);
                    let mut body = req.into_body();
                    tokio::spawn(async move {
                        let mut n = 0usize;
                        while let Some(Ok(frame)) = body.frame().await {
                            if let Ok(data) = frame.into_data() {
                                n += data.len();
                                if tx.send(Ok(Frame::data(data))).await.is_err() {
                                    return;
                                }
                            }
                        }
                        let mut trailers = http::HeaderMap::new();
                        trailers.insert("x-echoed-bytes", n.into());
                        let _ = tx.send(Ok(Frame::trailers(trailers))).await;
                    });
                    let stream = tokio_stream(rx);
                    // HTTP/1.1 sends only the trailers the head announces.
                    let rsp = Response::builder()
                        .header(http::header::TRAILER, "x-echoed-bytes")
                        .body(StreamBody::new(stream));
                    Ok::<_, http::Error>(rsp.unwrap())
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(io), svc)
                    .await;
            });
        }
    });
    addr
}

/// The receiver as a stream of frames.
fn tokio_stream<T: Send + 'static>(
    mut rx: tokio::sync::mpsc::Receiver<T>,
) -> impl futures_util::Stream<Item = T> + Send {
    futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

/// Streams `chunks` chunks of 64 KiB to `addr` (a proxy listener) for `host`, each sent only
/// once the echo of the one before has come back, so a proxy that held either body back would
/// stall it; then checks the echo's trailer. `h2` picks HTTP/2 with prior knowledge.
async fn lockstep(addr: SocketAddr, host: &str, h2: bool, chunks: usize) {
    let io = TokioIo::new(tokio::net::TcpStream::connect(addr).await.unwrap());
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, Infallible>>(1);
    let body = StreamBody::new(tokio_stream(rx));
    let mut req = Request::post(format!("http://{host}/stream"))
        .header("te", "trailers")
        .body(body)
        .unwrap();
    let rsp = if h2 {
        let (mut send, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
            .await
            .unwrap();
        tokio::spawn(conn);
        send.send_request(req).await.unwrap()
    } else {
        req.headers_mut()
            .insert(http::header::HOST, host.parse().unwrap());
        *req.uri_mut() = "/stream".parse().unwrap();
        let (mut send, conn) = hyper::client::conn::http1::handshake(io).await.unwrap();
        tokio::spawn(conn);
        // hyper's HTTP/1.1 client only waits for the response once the body is under way.
        let sent = tokio::spawn(async move { send.send_request(req).await });
        tx.send(Ok(Frame::data(Bytes::from_static(b"0"))))
            .await
            .unwrap();
        let rsp = sent.await.unwrap().unwrap();
        return finish_lockstep(rsp, tx, chunks, 1).await;
    };
    finish_lockstep(rsp, tx, chunks, 0).await;
}

async fn finish_lockstep(
    rsp: Response<Incoming>,
    tx: tokio::sync::mpsc::Sender<Result<Frame<Bytes>, Infallible>>,
    chunks: usize,
    already_sent: usize,
) {
    assert_eq!(rsp.status(), StatusCode::OK);
    let mut body = rsp.into_body();
    let chunk = Bytes::from(vec![7u8; 64 * 1024]);
    let mut echoed = 0usize;
    let mut sent = already_sent;
    let patience = mesh_test_support::patience();
    for i in 0..chunks {
        tx.send(Ok(Frame::data(chunk.clone()))).await.unwrap();
        sent += chunk.len();
        while echoed < sent {
            let frame = tokio::time::timeout(patience, body.frame())
                .await
                .unwrap_or_else(|_| panic!("chunk {i} never came back: a body was held back"))
                .expect("the response ended early")
                .unwrap();
            if let Ok(data) = frame.into_data() {
                echoed += data.len();
            }
        }
    }
    drop(tx);
    let mut trailers = None;
    while let Some(frame) = body.frame().await {
        match frame.unwrap().into_trailers() {
            Ok(t) => trailers = Some(t),
            Err(data) => echoed += data.into_data().map_or(0, |d| d.len()),
        }
    }
    assert_eq!(echoed, sent);
    let trailers = trailers.expect("the trailers were lost");
    assert_eq!(trailers["x-echoed-bytes"], sent.to_string().as_str());
}

#[tokio::test(flavor = "multi_thread")]
async fn bodies_stream_both_ways_with_trailers_through_both_listeners() {
    let echo = echo_app().await;
    // The test itself, without a proxy.
    for h2 in [true, false] {
        eprintln!("direct, HTTP/2: {h2}");
        lockstep(echo, "echo", h2, 16).await;
    }
    let p = proxy()
        .outbound(endpoint("echo.default:80", echo))
        .app(echo)
        .run()
        .unwrap();
    for (listener, host) in [("outbound", "echo.default:80"), ("inbound", "echo")] {
        for h2 in [true, false] {
            eprintln!("{listener}, HTTP/2: {h2}");
            lockstep(p.addr(listener), host, h2, 256).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn bodies_stream_both_ways_with_trailers_across_a_meshed_pair() {
    let echo = echo_app().await;
    let pair = mesh_pair(echo).run().await.unwrap();
    for h2 in [true, false] {
        lockstep(pair.client_outbound(), SERVICE, h2, 256).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn expect_100_continue_is_answered_through_both_listeners() {
    let echo = echo_app().await;
    let p = proxy()
        .outbound(endpoint("echo.default:80", echo))
        .app(echo)
        .run()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("8MiB");
    std::fs::write(&file, vec![b'x'; 8 << 20]).unwrap();
    let data = format!("@{}", file.display());
    for (listener, host) in [("outbound", "echo.default:80"), ("inbound", "echo")] {
        let url = format!("http://{}/upload", p.addr(listener));
        let (ok, out, err) = curl(&[
            "-v",
            "-H",
            &format!("host: {host}"),
            "-H",
            "expect: 100-continue",
            "--data-binary",
            &data,
            "-o",
            "/dev/null",
            "-w",
            "%{http_code} %{size_download}",
            &url,
        ])
        .await;
        assert!(ok, "{listener}: {err}");
        assert!(err.contains("< HTTP/1.1 100 Continue"), "{listener}: {err}");
        assert_eq!(out, format!("200 {}", 8 << 20), "{listener}");
    }
}
