//! The window over real proxies: the load generator's own counts agree with what `mesh stat`,
//! `routes` and `edges` compute from scrapes, and 10,000 distinct paths make no more series
//! than routes and backends.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::time::Instant;

use mesh_observe::scrape::{SharedWindow, client, scrape_once};
use mesh_observe::window::{Target, Window, WindowConfig};
use mesh_observe::{Query, Resource};
use mesh_test_support::apps::app;
use mesh_test_support::proxies::{Sidecar, proxy};

fn config(primary: SocketAddr, canary: SocketAddr) -> String {
    format!(
        r#"
routes:
  - parent: web.default:80
    rules:
      - name: api
        matches: [{{path: {{type: PathPrefix, value: /api}}}}]
        backends: [{{service: web-primary.default:80, weight: 1}}]
      - name: main
        matches: [{{path: {{type: PathPrefix, value: /}}}}]
        backends:
          - {{service: web-primary.default:80, weight: 80}}
          - {{service: web-canary.default:80, weight: 20}}
endpoints:
  - service: web-primary.default:80
    endpoints: [{{addr: "{primary}"}}]
  - service: web-canary.default:80
    endpoints: [{{addr: "{canary}"}}]
"#
    )
}

fn caller(admin: SocketAddr) -> Target {
    Target {
        admin: admin.to_string(),
        workload: "loadgen".into(),
        namespace: "default".into(),
        service: "loadgen".into(),
        identity: Some("spiffe://mesh.local/ns/default/sa/loadgen".into()),
    }
}

fn window() -> SharedWindow {
    std::sync::Arc::new(std::sync::Mutex::new(Window::new(WindowConfig::default())))
}

#[tokio::test]
async fn ten_thousand_paths_make_no_more_series_than_routes_and_backends() {
    let v1 = app("v1").await.unwrap().addr();
    let v2 = app("v2").await.unwrap().addr();
    let p = proxy().outbound(config(v1, v2)).run().unwrap();
    let window = window();
    let targets = [caller(p.addr("admin"))];
    let http = client();
    let proxied = p.client();
    const PATHS: usize = 10_000;
    let mut sent = 0;
    for chunk in (0..PATHS).collect::<Vec<_>>().chunks(100) {
        let requests = chunk.iter().map(|i| {
            let prefix = if i % 2 == 0 { "/api" } else { "/page" };
            proxied
                .get(format!("http://web.default:80{prefix}/{i}"))
                .send()
        });
        for rsp in futures_util::future::join_all(requests).await {
            assert_eq!(rsp.unwrap().status(), 200);
            sent += 1;
        }
        if sent % 2000 == 0 {
            scrape_once(&window, &http, &targets).await;
        }
    }
    let w = window.lock().unwrap();
    // api -> primary; main -> primary and canary: three series, whatever the paths.
    assert_eq!(w.series_count(), 3, "{w:?}");
    assert_eq!(w.dropped_series(), 0);
    // Five scrapes of three series: a few kilobytes, far under the window's cap.
    assert!(w.approx_bytes() < 16 * 1024, "{} bytes", w.approx_bytes());
    assert!(w.approx_bytes() <= w.max_bytes());
    let rows = w.stat(Resource::Routes, &Query::default(), Instant::now());
    let total: f64 = rows.iter().map(|r| r.golden.requests).sum();
    // The first scrape is the base the window counts from.
    assert_eq!(total, 8000.0, "{rows:?}");
}

/// The load generator's whole-run summary, the last line of its JSON output.
fn summary(stdout: &str) -> serde_json::Value {
    let last = stdout
        .lines()
        .rev()
        .find(|l| l.contains("\"final\":true"))
        .unwrap();
    serde_json::from_str(last).unwrap()
}

#[tokio::test]
async fn stat_routes_and_edges_agree_with_the_load_generators_counts() {
    let v1 = app("v1")
        .fail_rate(0.1)
        .failing_evenly()
        .await
        .unwrap()
        .addr();
    let v2 = app("v2").await.unwrap().addr();
    let p = proxy().outbound(config(v1, v2)).run().unwrap();
    let window = window();
    let targets = [caller(p.addr("admin"))];
    let http = client();
    let loadgen = mesh_test_support::process::workspace_bin("mesh-loadgen").unwrap();

    scrape_once(&window, &http, &targets).await;
    let out = tokio::process::Command::new(loadgen)
        .args(["--url", "http://web.default:80/", "--rate", "200"])
        .args([
            "--duration",
            "10s",
            "--output",
            "json",
            "--report-every",
            "10s",
        ])
        .env("HTTP_PROXY", format!("http://{}", p.addr("outbound")))
        .output()
        .await
        .unwrap();
    scrape_once(&window, &http, &targets).await;
    let now = Instant::now();
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert!(out.status.success(), "{stdout}");
    let truth = summary(&stdout);
    let responses: u64 = truth["status"]
        .as_object()
        .unwrap()
        .values()
        .map(|v| v.as_u64().unwrap())
        .sum();
    assert_eq!(truth["errors"], 0, "{truth}");
    let ok = truth["ok"].as_u64().unwrap();
    let sr = ok as f64 / responses as f64;
    let rps = responses as f64 / truth["t"].as_f64().unwrap();

    let w = window.lock().unwrap();
    let q = Query {
        window_secs: 600,
        ..Query::default()
    };
    let close = |what: &str, got_sr: f64, got_rps: f64| {
        assert!(
            (got_sr - sr).abs() * 100.0 <= 0.5,
            "{what}: success rate {got_sr} vs the load generator's {sr}"
        );
        assert!(
            (got_rps - rps).abs() / rps <= 0.05,
            "{what}: {got_rps} rps vs the load generator's {rps}"
        );
    };
    let services = w.stat(Resource::Services, &q, now);
    let requests: f64 = services.iter().map(|r| r.golden.requests).sum();
    let failures: f64 = services.iter().map(|r| r.golden.failures).sum();
    assert_eq!(requests, responses as f64, "{services:?}");
    let service_rps = services.iter().map(|r| r.golden.rps).sum();
    close("stat services", 1.0 - failures / requests, service_rps);

    let routes = w.routes(
        &Query {
            name: Some("web".into()),
            ..q.clone()
        },
        now,
    );
    assert_eq!(
        routes.len(),
        1,
        "only the main route had traffic: {routes:?}"
    );
    let main = &routes[0];
    close("routes", main.golden.success_rate.unwrap(), main.golden.rps);
    let canary = main
        .backends
        .iter()
        .find(|b| b.service == "web-canary")
        .unwrap();
    // Binomial(2000, 0.2): sd 0.9 points; 4 points is beyond 4 sd.
    assert!((canary.share - 0.2).abs() < 0.04, "{main:?}");
    // Every failure the load generator saw is one the window counted, and the other way.
    assert_eq!(
        main.golden.failures,
        truth["status"]["500"].as_f64().unwrap()
    );

    let edges = w.edges(&q, now);
    assert_eq!(edges.len(), 2, "{edges:?}");
    let primary = edges.iter().find(|e| e.dst == "web-primary").unwrap();
    assert_eq!(primary.src, "loadgen");
    assert_eq!(
        primary.src_identity.as_deref(),
        Some("spiffe://mesh.local/ns/default/sa/loadgen")
    );
    let edge_rps = edges.iter().map(|e| e.golden.rps).sum();
    let edge_requests: f64 = edges.iter().map(|e| e.golden.requests).sum();
    let edge_failures: f64 = edges.iter().map(|e| e.golden.failures).sum();
    close("edges", 1.0 - edge_failures / edge_requests, edge_rps);
}
