//! Both metric sources over the same endpoint serving proxy-format metrics: the direct scrape
//! reads it itself; the Prometheus source asks a real Prometheus that scrapes it. The endpoint is
//! a stand-in for a proxy's admin server (`mesh_test_support::prometheus::Exporter`; the
//! proxy's own end-to-end coverage lives with the embedded mesh), serving the series names and
//! labels the proxies export.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use mesh_rollout_controller::sources::{DirectScrape, MetricSource, PrometheusSource, Target};
use mesh_test_support::{
    assert_eventually,
    prometheus::{Exporter, Prometheus, ScrapeJob},
};

fn exposition(canary_ok: u64, canary_failed: u64, primary_ok: u64) -> String {
    let mut s = String::new();
    for (svc, class, code, n) in [
        ("web-canary", "success", 200, canary_ok),
        ("web-canary", "failure", 500, canary_failed),
        ("web-primary", "success", 200, primary_ok),
    ] {
        s += &format!(
            "response_total{{direction=\"outbound\",dst_namespace=\"default\",dst_service=\"{svc}\",classification=\"{class}\",status_code=\"{code}\"}} {n}\n"
        );
    }
    for (svc, n) in [
        ("web-canary", canary_ok + canary_failed),
        ("web-primary", primary_ok),
    ] {
        for (le, share) in [("10", 0.9), ("100", 1.0), ("+Inf", 1.0)] {
            let c = (n as f64 * share).round();
            s += &format!(
                "response_latency_ms_bucket{{direction=\"outbound\",dst_namespace=\"default\",dst_service=\"{svc}\",le=\"{le}\"}} {c}\n"
            );
        }
    }
    s
}

fn target() -> Target {
    Target {
        namespace: "default".into(),
        canary: "web-canary".into(),
        primary: "web-primary".into(),
    }
}

#[tokio::test]
async fn direct_scrape_windows_are_counter_differences() {
    let admin = Exporter::start(exposition(100, 0, 400)).await.unwrap();
    let mut source = DirectScrape::new(mesh_test_support::http_client(), vec![admin.addr()]);
    let first = source
        .window(&target(), Duration::from_secs(30))
        .await
        .unwrap();
    assert_eq!(first.canary.requests, 0, "first window is the baseline");
    admin.set(exposition(190, 10, 800));
    let w = source
        .window(&target(), Duration::from_secs(30))
        .await
        .unwrap();
    assert_eq!(w.canary.requests, 100);
    assert_eq!(w.canary.failures, 10);
    assert_eq!(w.primary.requests, 400);
    assert_eq!(w.primary.failures, 0);
    assert_eq!(w.canary.latency.count(), 100);

    // An unreachable proxy is an error naming it, not an empty window.
    let port = mesh_test_support::ports::free_port().unwrap();
    let gone: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    source.set_proxies(vec![gone]);
    let e = source
        .window(&target(), Duration::from_secs(30))
        .await
        .unwrap_err();
    assert!(e.to_string().contains(&gone.to_string()), "{e}");
}

/// Between ticks the judge peeks: the traffic since the last window, leaving the baseline where
/// it is, so the next window still covers the whole interval.
#[tokio::test]
async fn a_direct_scrape_peek_reads_since_the_last_window_and_moves_nothing() {
    let admin = Exporter::start(exposition(100, 0, 400)).await.unwrap();
    let mut source = DirectScrape::new(mesh_test_support::http_client(), vec![admin.addr()]);
    assert!(
        source.peek(&target()).await.unwrap().is_none(),
        "no baseline yet"
    );
    source
        .window(&target(), Duration::from_secs(30))
        .await
        .unwrap();
    admin.set(exposition(140, 5, 600));
    let peek = source.peek(&target()).await.unwrap().unwrap();
    assert_eq!((peek.canary.requests, peek.canary.failures), (45, 5));
    assert_eq!(peek.primary.requests, 200);
    admin.set(exposition(190, 10, 800));
    let peek = source.peek(&target()).await.unwrap().unwrap();
    assert_eq!((peek.canary.requests, peek.canary.failures), (100, 10));
    let w = source
        .window(&target(), Duration::from_secs(30))
        .await
        .unwrap();
    assert_eq!((w.canary.requests, w.canary.failures), (100, 10));
    assert_eq!(w.primary.requests, 400);
}

#[tokio::test]
async fn prometheus_windows_come_from_what_prometheus_scraped() {
    let admin = Exporter::start(exposition(0, 0, 0)).await.unwrap();
    let prometheus = Prometheus::builder()
        .scrape(ScrapeJob::new("proxies", [admin.addr()]).interval(Duration::from_secs(1)))
        .start()
        .await
        .unwrap();
    let mut source = PrometheusSource::new(prometheus.client());
    // Let Prometheus see the zero counters first, so the increase is visible.
    let client = prometheus.client();
    assert_eventually!(
        client
            .query("count_over_time(response_total[1m])")
            .get()
            .await
            .ok()
            .and_then(|r| r
                .data()
                .as_vector()
                .and_then(|v| v.first().map(|s| s.sample().value())))
            .is_some_and(|n| n >= 2.0),
        "Prometheus at {} has not scraped the endpoint twice",
        prometheus.url()
    );
    admin.set(exposition(900, 100, 4000));
    let mut w: mesh_rollout_controller::judge::Window;
    assert_eventually!(
        {
            w = source
                .window(&target(), Duration::from_secs(30))
                .await
                .unwrap();
            w.canary.requests > 0 && w.primary.requests > 0
        },
        "no increase seen through Prometheus at {}",
        prometheus.url()
    );
    // increase() extrapolates, so absolute counts vary with scrape timing; ratios do not.
    let failure_share = w.canary.failures as f64 / w.canary.requests as f64;
    assert!((failure_share - 0.1).abs() < 0.01, "{w:?}");
    let traffic_ratio = w.primary.requests as f64 / w.canary.requests as f64;
    assert!((traffic_ratio - 4.0).abs() < 0.1, "{w:?}");
    assert_eq!(w.canary.latency.buckets.len(), 3, "{w:?}");
    assert!(w.canary.latency.buckets.last().unwrap().0.is_infinite());

    let custom = source
        .template(
            r#"sum(response_total{dst_service="{{ target }}-canary",classification="failure"})"#,
            &[("target".to_string(), "web".to_string())].into(),
        )
        .await
        .unwrap();
    assert_eq!(custom, Some(100.0));
}
