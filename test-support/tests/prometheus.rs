//! The harness's Prometheus is real: it scrapes an endpoint started here (an [`Exporter`]), and a PromQL
//! query through prometheus-http-query returns the value that endpoint served.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "integration tests fail by panicking"
)]

use std::time::{SystemTime, UNIX_EPOCH};

use mesh_test_support::{
    assert_eventually,
    prometheus::{Exporter, Prometheus, ScrapeJob},
};

#[tokio::test]
async fn promql_returns_what_prometheus_scraped() {
    // A value no fixture could know in advance.
    let value = u64::from(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .subsec_micros(),
    ) + 1;
    let probe = Exporter::start(format!(
        "# TYPE mesh_harness_probe_value gauge\nmesh_harness_probe_value {value}\n"
    ))
    .await
    .unwrap();
    let target = probe.addr();

    let prometheus = Prometheus::builder()
        .scrape(ScrapeJob::new("probe", [target]))
        .start()
        .await
        .unwrap();
    let client = prometheus.client();

    let mut seen: Option<f64>;
    assert_eventually!(
        {
            let res = client
                .query(r#"mesh_harness_probe_value{job="probe"}"#)
                .get()
                .await;
            seen = res.ok().and_then(|r| {
                r.data()
                    .as_vector()
                    .and_then(|v| v.first().map(|s| s.sample().value()))
            });
            seen.is_some()
        },
        "Prometheus at {} never returned the probe value (scrapes so far: {})",
        prometheus.url(),
        probe.scrapes()
    );
    assert_eq!(seen, Some(value as f64));
    assert!(probe.scrapes() >= 1, "the value came without a scrape");

    let up = client.query(r#"up{job="probe"}"#).get().await.unwrap();
    let up = up.data().as_vector().unwrap();
    assert_eq!(up.len(), 1);
    assert_eq!(up[0].sample().value(), 1.0);
    assert_eq!(
        up[0].metric().get("instance").map(String::as_str),
        Some(target.to_string().as_str())
    );
}
