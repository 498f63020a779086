//! The same questions through PromQL on a real Prometheus (Debian's `prometheus`) scraping a
//! real proxy: `mesh stat`'s numbers agree with the load generator's own counts.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::time::Duration;

use mesh_observe::prometheus::PrometheusView;
use mesh_observe::{MetricsView, Query, Resource};
use mesh_test_support::apps::app;
use mesh_test_support::assert_eventually;
use mesh_test_support::prometheus::{Prometheus, ScrapeJob};
use mesh_test_support::proxies::{Sidecar, proxy};

fn config(primary: SocketAddr, canary: SocketAddr) -> String {
    format!(
        r#"
routes:
  - parent: web.default:80
    rules:
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

/// Short, so that increase()'s extrapolation past the first and last samples stays small.
const SCRAPE: Duration = Duration::from_millis(200);

/// How long the samples behind increase() span at least, from the warm-up's first scrape.
/// increase() extrapolates the samples' change by up to half a scrape interval before the
/// first and up to 1.1 intervals after the last: at most 0.32 s here, 3.2 % of 10 s, inside the
/// 5 % the counts are held to. (With 500 ms scrapes and an 8 s span it was up to 9 %, and a
/// run measured 1,052 for 1,001.)
const SPAN: Duration = Duration::from_secs(10);

#[tokio::test(flavor = "multi_thread")]
async fn promql_answers_agree_with_the_load_generators_counts() {
    let v1 = app("v1")
        .fail_rate(0.1)
        .failing_evenly()
        .await
        .unwrap()
        .addr();
    let v2 = app("v2").await.unwrap().addr();
    let p = proxy()
        .outbound(config(v1, v2))
        .env("MESH_PROXY_WORKLOAD_NAMESPACE", "default")
        .env("MESH_PROXY_WORKLOAD_DEPLOYMENT", "loadgen")
        .run()
        .unwrap();
    let prometheus = Prometheus::builder()
        .scrape(ScrapeJob::new("proxies", [p.addr("admin")]).interval(SCRAPE))
        .start()
        .await
        .unwrap();
    let view = PrometheusView::new(prometheus.url());
    let q = Query {
        window_secs: 120,
        ..Query::default()
    };
    // Prometheus has seen the proxy's (empty) series before the load starts.
    assert_eventually!(
        reqwest::get(format!("{}/api/v1/query?query=up", prometheus.url()))
            .await
            .is_ok_and(|r| r.status().is_success()),
        "prometheus never answered"
    );
    // Every series exists (each backend answered, the primary failed) and Prometheus has a
    // sample of it before the measured load: a series' first sample is where increase()
    // starts counting.
    let client = p.client();
    for _ in 0..100 {
        client.get("http://web.default:80/").send().await.unwrap();
    }
    assert_eventually!(
        view.stat(Resource::Services, &q)
            .await
            .is_ok_and(|rows| rows.len() == 2),
        "prometheus never scraped the warm-up"
    );
    let warmed = tokio::time::Instant::now();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let loadgen = mesh_test_support::process::workspace_bin("mesh-loadgen").unwrap();
    let out = tokio::process::Command::new(loadgen)
        .args(["--url", "http://web.default:80/", "--rate", "200"])
        .args([
            "--duration",
            "5s",
            "--output",
            "json",
            "--report-every",
            "5s",
        ])
        .env("HTTP_PROXY", format!("http://{}", p.addr("outbound")))
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8(out.stdout).unwrap();
    let truth: serde_json::Value = serde_json::from_str(
        stdout
            .lines()
            .rev()
            .find(|l| l.contains("\"final\":true"))
            .unwrap(),
    )
    .unwrap();
    let ok = truth["ok"].as_f64().unwrap();
    let responses: f64 = truth["status"]
        .as_object()
        .unwrap()
        .values()
        .map(|v| v.as_f64().unwrap())
        .sum();
    let sr = ok / responses;
    // Until Prometheus has scraped past the end of the load.
    assert_eventually!(
        view.stat(Resource::Services, &q)
            .await
            .unwrap()
            .iter()
            .map(|r| r.golden.requests)
            .sum::<f64>()
            >= responses * 0.95,
        "prometheus never saw the load: {:?}",
        view.stat(Resource::Services, &q).await,
    );
    tokio::time::sleep_until(warmed + SPAN).await;
    tokio::time::sleep(SCRAPE * 2).await;
    let services = view.stat(Resource::Services, &q).await.unwrap();
    let requests: f64 = services.iter().map(|r| r.golden.requests).sum();
    let failures: f64 = services.iter().map(|r| r.golden.failures).sum();
    eprintln!("PromQL: {requests:.1} requests; the load generator: {responses} responses");
    // increase() extrapolates to the window's edges (see SPAN); within 5 % of the true count.
    assert!(
        (requests - responses).abs() / responses < 0.05,
        "{requests} vs {responses}: {services:?}"
    );
    assert!(
        ((1.0 - failures / requests) - sr).abs() * 100.0 <= 0.5,
        "{services:?} vs {truth}"
    );

    let routes = view
        .routes(&Query {
            name: Some("web".into()),
            ..q.clone()
        })
        .await
        .unwrap();
    assert_eq!(routes.len(), 1, "{routes:?}");
    let canary = routes[0]
        .backends
        .iter()
        .find(|b| b.service == "web-canary")
        .unwrap();
    assert!((canary.share - 0.2).abs() < 0.05, "{routes:?}");
    assert!(
        (routes[0].golden.success_rate.unwrap() - sr).abs() * 100.0 <= 0.5,
        "{routes:?}"
    );

    let edges = view.edges(&q).await.unwrap();
    assert!(
        edges
            .iter()
            .any(|e| e.src == "loadgen" && e.dst == "web-primary"),
        "{edges:?}"
    );
    let p99 = services
        .iter()
        .find(|r| r.name == "web-primary")
        .unwrap()
        .golden
        .p99_ms;
    assert!(p99.is_some(), "{services:?}");
}
