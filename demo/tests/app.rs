//! `mesh-demo-app` as a supervisor runs it: started on port 0, reached over real sockets.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "helpers outside #[test] functions fail the test by panicking"
)]

mod support;

use serde_json::Value;
use support::{ForwardProxy, Running, app, direct_client, forward_proxy};

async fn get(url: &str) -> (u16, reqwest::header::HeaderMap, Value) {
    let rsp = direct_client().get(url).send().await.unwrap();
    let status = rsp.status().as_u16();
    let headers = rsp.headers().clone();
    let body = rsp.json().await.unwrap();
    (status, headers, body)
}

fn header<'a>(headers: &'a reqwest::header::HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).map(|v| v.to_str().unwrap())
}

#[tokio::test]
async fn answers_with_its_version() {
    let app = app("v2").start().await;
    let (status, headers, body) = get(&app.url("/")).await;
    assert_eq!(status, 200);
    assert_eq!(header(&headers, "x-demo-version"), Some("v2"));
    assert_eq!(
        body,
        serde_json::json!({"version": "v2", "downstream": null})
    );

    let (status, headers, body) = get(&app.url("/version")).await;
    assert_eq!(status, 200);
    assert_eq!(header(&headers, "x-demo-version"), Some("v2"));
    assert_eq!(body["version"], "v2");
}

#[tokio::test]
async fn error_rate_one_fails_every_request_but_health_checks() {
    // Set through the environment, as the supervisor does.
    let app = app("v1").env("DEMO_ERROR_RATE", "1.0").start().await;
    for _ in 0..20 {
        let (status, headers, body) = get(&app.url("/")).await;
        assert_eq!(status, 500);
        assert_eq!(header(&headers, "x-demo-version"), Some("v1"));
        assert_eq!(body["origin"], "app");
        let (status, _, _) = get(&app.url("/healthz")).await;
        assert_eq!(status, 200);
    }
}

#[tokio::test]
async fn error_rate_zero_never_fails() {
    let app = app("v1").args(["--error-rate", "0.0"]).start().await;
    for _ in 0..50 {
        assert_eq!(get(&app.url("/")).await.0, 200);
    }
}

#[tokio::test]
async fn bursts_use_the_burst_error_rate_from_start() {
    // The first half hour of every hour is a burst, so the whole test runs inside one.
    let app = app("v1")
        .args(["--burst-every", "1h", "--burst-for", "30m"])
        .args(["--burst-error-rate", "1"])
        .start()
        .await;
    for _ in 0..20 {
        assert_eq!(get(&app.url("/")).await.0, 500);
        assert_eq!(get(&app.url("/healthz")).await.0, 200);
    }
}

/// A v1 frontend whose downstream, `backend.default:9898` (a v2 app), it reaches only through
/// a forward proxy given as its HTTP proxy: the backend, the proxy and the frontend.
async fn frontend_calling_backend_via_proxy() -> (Running, ForwardProxy, Running) {
    let backend = app("v2").start().await;
    let proxy = forward_proxy(&[("backend.default:9898", backend.addr())]).await;
    let frontend = app("v1")
        .args(["--downstream", "http://backend.default:9898/"])
        .via(proxy.addr)
        .start()
        .await;
    (backend, proxy, frontend)
}

#[tokio::test]
async fn downstream_calls_go_through_http_proxy() {
    let (_backend, proxy, frontend) = frontend_calling_backend_via_proxy().await;

    let (status, headers, body) = get(&frontend.url("/")).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(header(&headers, "x-demo-version"), Some("v1"));
    assert_eq!(header(&headers, "x-demo-downstream-version"), Some("v2"));
    assert_eq!(body["version"], "v1");
    assert_eq!(body["downstream"]["version"], "v2");
    assert_eq!(
        body["downstream"]["body"],
        serde_json::json!({"version": "v2", "downstream": null})
    );
    // `backend.default` resolves nowhere: the answer could only come through the proxy, which
    // saw the absolute-form request.
    assert_eq!(proxy.seen(), ["http://backend.default:9898/"]);
}

#[tokio::test]
async fn downstream_calls_carry_the_trace_context_on() {
    let (_backend, proxy, frontend) = frontend_calling_backend_via_proxy().await;
    let traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let rsp = direct_client()
        .get(frontend.url("/"))
        .header("traceparent", traceparent)
        .header("tracestate", "vendor=opaque")
        .header("x-unrelated", "kept here")
        .send()
        .await
        .unwrap();
    assert_eq!(rsp.status(), 200);
    let seen = proxy.seen_headers();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0]["traceparent"], traceparent);
    assert_eq!(seen[0]["tracestate"], "vendor=opaque");
    assert!(
        seen[0].get("x-unrelated").is_none(),
        "only trace headers go on"
    );
}

#[tokio::test]
async fn downstream_failures_are_502s() {
    let backend = app("v2").args(["--error-rate", "1"]).start().await;
    let proxy = forward_proxy(&[("backend.default:9898", backend.addr())]).await;
    let frontend = app("v1")
        .args(["--downstream", "http://backend.default:9898/"])
        .via(proxy.addr)
        .start()
        .await;
    let (status, headers, body) = get(&frontend.url("/")).await;
    assert_eq!(status, 502);
    assert_eq!(header(&headers, "x-demo-version"), Some("v1"));
    assert_eq!(header(&headers, "x-demo-downstream-version"), Some("v2"));
    assert_eq!(body["origin"], "downstream");
    let error = body["error"].as_str().unwrap();
    assert!(
        error.contains("http://backend.default:9898/") && error.contains("500"),
        "{error}"
    );

    // A service the proxy does not know: the proxy's own 502 is relayed as a downstream failure.
    let orphan = app("v1")
        .args(["--downstream", "http://nowhere.default:9898/"])
        .via(proxy.addr)
        .start()
        .await;
    let (status, headers, body) = get(&orphan.url("/")).await;
    assert_eq!(status, 502);
    assert_eq!(header(&headers, "x-demo-downstream-version"), None);
    assert!(
        body["error"].as_str().unwrap().contains("nowhere.default"),
        "{body}"
    );
}

#[tokio::test]
async fn health_checks_ignore_latency_and_errors() {
    let app = app("v1")
        .args(["--error-rate", "1", "--latency-ms", "60000"])
        .start()
        .await;
    // Would take a minute if the latency applied; the client's patience is shorter by default.
    let (status, _, body) = get(&app.url("/healthz")).await;
    assert_eq!(status, 200, "{body}");
}

#[tokio::test]
async fn sigterm_stops_gracefully() {
    let mut app = app("v1").start().await;
    assert_eq!(get(&app.url("/")).await.0, 200);
    app.terminate().await;
    let status = app.wait().await;
    assert!(status.success(), "{status}");
}

#[tokio::test]
async fn bad_flags_exit_2_naming_the_flag() {
    for (args, env, name) in [
        (&["--error-rate", "1.5"][..], None, "--error-rate"),
        (&[][..], Some(("DEMO_ERROR_RATE", "-0.1")), "--error-rate"),
        (
            &["--latency-ms", "100", "--latency-p99-ms", "50"][..],
            None,
            "--latency-p99-ms",
        ),
        (
            &["--burst-every", "soon", "--burst-for", "1s"][..],
            None,
            "--burst-every",
        ),
        (
            &["--burst-every", "5s", "--burst-for", "10s"][..],
            None,
            "--burst-for",
        ),
        (&["--burst-every", "5s"][..], None, "--burst-for"),
        (&["--port", "70000"][..], None, "--port"),
    ] {
        let mut bin = app("v1").args(args);
        if let Some((k, v)) = env {
            bin = bin.env(k, v);
        }
        let (status, stdout, stderr) = bin.output().await;
        assert_eq!(status.code(), Some(2), "{args:?} {env:?}: {stderr}");
        assert!(stderr.contains(name), "{args:?} {env:?}: {stderr}");
        assert!(stdout.is_empty(), "{stdout}");
    }
}
