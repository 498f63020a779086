//! `mesh-proxy`'s inbound listener in front of a real app, started in-process: requests over
//! HTTP/1.1 and h2c reach the app with their Host, inbound golden metrics count them apart from
//! outbound ones, an unreachable app is a 502 the proxy signs, and a malformed request is a 400.
//! As the binary: on SIGTERM a request in flight completes before the proxy exits 0.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use mesh_test_support::apps::{SEEN_HOST, SLOW_PATH, app};
use mesh_test_support::assert_eventually;
use mesh_test_support::proxies::{Sidecar, proxy};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The service the proxied workload belongs to, which inbound metrics name.
const SERVICE: &str = "web-canary.default:80";

/// The value of the one `name` series whose labels contain every one of `labels`.
async fn metric(p: &impl Sidecar, name: &str, labels: &[&str]) -> Option<u64> {
    let text = p.metrics().await;
    let series: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with(&format!("{name}{{")))
        .filter(|l| labels.iter().all(|label| l.contains(label)))
        .collect();
    assert!(
        series.len() <= 1,
        "{labels:?} match several series: {series:?}"
    );
    series
        .first()
        .and_then(|l| l.rsplit(' ').next())
        .map(|v| v.parse().unwrap())
}

#[tokio::test]
async fn requests_reach_the_app_and_are_counted_as_inbound() {
    let v1 = app("v1").await.unwrap();
    let p = proxy().app(v1.addr()).service(SERVICE).run().unwrap();
    let inbound = p.addr("inbound");

    let http1 = mesh_test_support::http_client();
    for _ in 0..3 {
        let rsp = http1
            .get(format!("http://{inbound}/hello"))
            .send()
            .await
            .unwrap();
        assert_eq!(rsp.status(), 200);
        // The app sees the Host the caller used, not its own address.
        assert_eq!(rsp.headers()[SEEN_HOST], inbound.to_string().as_str());
        assert_eq!(rsp.text().await.unwrap(), "v1");
    }
    let h2c = reqwest::Client::builder()
        .http2_prior_knowledge()
        .build()
        .unwrap();
    let rsp = h2c
        .get(format!("http://{inbound}/hello"))
        .send()
        .await
        .unwrap();
    assert_eq!(rsp.version(), reqwest::Version::HTTP_2);
    assert_eq!(rsp.status(), 200);
    assert_eq!(rsp.headers()[SEEN_HOST], inbound.to_string().as_str());
    assert_eq!(rsp.text().await.unwrap(), "v1");

    let inbound_ok = [
        r#"direction="inbound""#,
        r#"dst_service="web-canary""#,
        r#"classification="success""#,
        r#"status_code="200""#,
    ];
    assert_eq!(metric(&p, "response_total", &inbound_ok).await, Some(4));
    assert_eq!(
        metric(&p, "request_total", &[r#"direction="inbound""#]).await,
        Some(4)
    );
    assert_eq!(
        metric(
            &p,
            "response_latency_ms_count",
            &[r#"direction="inbound""#, r#"status_code="200""#]
        )
        .await,
        Some(4)
    );
    // Inbound traffic leaves the outbound series, which the canary judge reads, alone.
    assert_eq!(
        metric(&p, "response_total", &[r#"direction="outbound""#]).await,
        None
    );
}

#[tokio::test]
async fn an_unreachable_app_is_a_502_from_the_proxy() {
    let closed = {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        l.local_addr().unwrap()
    };
    let p = proxy().app(closed).service(SERVICE).run().unwrap();
    let rsp = mesh_test_support::http_client()
        .get(format!("http://{}/", p.addr("inbound")))
        .send()
        .await
        .unwrap();
    assert_eq!(rsp.status(), 502);
    let why = rsp.headers()["mesh-proxy-error"].to_str().unwrap();
    assert!(why.contains(&closed.to_string()), "{why}");
    assert_eq!(
        metric(
            &p,
            "response_total",
            &[
                r#"direction="inbound""#,
                r#"classification="failure""#,
                r#"error="mesh""#,
                r#"status_code="502""#,
            ]
        )
        .await,
        Some(1)
    );
}

#[tokio::test]
async fn a_malformed_request_is_a_400() {
    let v1 = app("v1").await.unwrap();
    let p = proxy().app(v1.addr()).service(SERVICE).run().unwrap();
    let mut conn = tokio::net::TcpStream::connect(p.addr("inbound"))
        .await
        .unwrap();
    conn.write_all(b"GET / HTTP/1.1\r\nHost: web\r\nbroken header line\r\n\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    conn.read_to_end(&mut answer).await.unwrap();
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
}

#[tokio::test]
async fn sigterm_lets_requests_in_flight_finish_then_exits_0() {
    // Signals and exit codes belong to a process: this proxy is the binary.
    let v1 = app("v1").await.unwrap();
    let mut p = proxy().app(v1.addr()).service(SERVICE).spawn().unwrap();
    let inbound = p.addr("inbound");
    let admin = p.addr("admin");
    let client = mesh_test_support::http_client();
    let slow = tokio::spawn({
        let client = client.clone();
        async move {
            let rsp = client
                .get(format!("http://{inbound}{SLOW_PATH}"))
                .send()
                .await
                .unwrap();
            (rsp.status(), rsp.text().await.unwrap())
        }
    });
    // Forwarded to the app, whose answer takes seconds.
    assert_eventually!(metric(&p, "request_total", &[r#"direction="inbound""#]).await == Some(1));

    let killed = std::process::Command::new("kill")
        .arg("-TERM")
        .arg(p.process().child().pid().to_string())
        .status()
        .unwrap();
    assert!(killed.success());
    // Draining: not ready, no new connections, but the admin server still answers.
    assert_eventually!(
        client
            .get(format!("http://{admin}/ready"))
            .send()
            .await
            .is_ok_and(|r| r.status() == 503),
        "/ready did not turn 503 while draining"
    );
    assert_eventually!(
        tokio::net::TcpStream::connect(inbound).await.is_err(),
        "the inbound listener still accepts connections while draining"
    );
    let (status, body) = slow.await.unwrap();
    assert_eq!((status.as_u16(), body.as_str()), (200, "v1"));
    assert_eventually!(
        p.process().child().check_running().is_err(),
        "the proxy did not exit"
    );
    let exit = p.process().child().check_running().unwrap_err();
    assert!(exit.ends_with("exit status: 0"), "{exit}");
}

#[test]
fn a_bad_app_address_exits_64_naming_the_variable() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_mesh-proxy"))
        .env("MESH_PROXY_APP_ADDR", "localhost:8080")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("MESH_PROXY_APP_ADDR") && stderr.contains("localhost:8080"),
        "{stderr}"
    );
}

#[test]
fn registration_without_an_app_exits_64() {
    let roots = mesh_test_support::proxy_api::MeshCa::generate().unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_mesh-proxy"))
        .env("MESH_PROXY_CONTROL_PLANE_ADDR", "127.0.0.1:1")
        .env("MESH_PROXY_TRUST_ROOTS", roots.roots_pem())
        .env(
            "MESH_PROXY_IDENTITY",
            "spiffe://cluster.local/ns/default/sa/web",
        )
        .env("MESH_PROXY_TOKEN_FILE", "/nonexistent/token")
        .env("MESH_PROXY_WORKLOAD_SERVICE", "web.default:80")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("MESH_PROXY_WORKLOAD_SERVICE") && stderr.contains("MESH_PROXY_APP_ADDR"),
        "{stderr}"
    );
}
