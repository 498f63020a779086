//! The control plane's own metrics as a real Prometheus scrapes them, with the documented
//! embedded scrape config (`mesh_core::prometheus::embedded_scrape_config`): a real
//! `mesh-controlplane` certifies two in-process proxies, which watch it; an HTTPRoute applied
//! afterwards propagates to the client's routes watch, through the (timed) store.
//!
//! The control plane binary is found beside the test executable; build it first with
//! `cargo build -p mesh-controlplane --bins` (same target directory).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use mesh_test_support::apps::app;
use mesh_test_support::assert_eventually;
use mesh_test_support::mesh::{SERVICE, mesh_pair};
use mesh_test_support::prometheus::Prometheus;

/// The value of an instant PromQL query with one result, if it has one.
async fn value(prometheus: &Prometheus, query: &str) -> Option<f64> {
    let rsp: serde_json::Value = mesh_test_support::http_client()
        .get(format!("{}/api/v1/query", prometheus.url()))
        .query(&[("query", query)])
        .send()
        .await
        .ok()?
        .json()
        .await
        .ok()?;
    rsp["data"]["result"][0]["value"][1].as_str()?.parse().ok()
}

#[tokio::test]
async fn prometheus_sees_watchers_propagation_certificates_and_store_calls() {
    let web = app("v1").await.unwrap();
    let pair = mesh_pair(web.addr()).run().await.unwrap();
    // The client's first request opens its watches of the service's routes and endpoints.
    let rsp = mesh_test_support::http_client()
        .get(format!("http://{}/", pair.client_outbound()))
        .header("host", SERVICE)
        .send()
        .await
        .unwrap();
    assert_eq!(rsp.status(), 200);

    let cp = &pair.control_plane;
    let token = cp.state().join("api-token");
    let prometheus = Prometheus::builder()
        .scrape_config(&mesh_core::prometheus::embedded_scrape_config(
            &cp.api_url(),
            &token.display().to_string(),
            "1s",
        ))
        .start()
        .await
        .unwrap();

    // Both proxies were certified once each.
    let mut issued: Option<f64>;
    assert_eventually!(
        {
            issued = value(&prometheus, "mesh_controlplane_certificates_issued_total").await;
            issued == Some(2.0)
        },
        "certificates issued: {issued:?}"
    );
    // The server watches its port's policy; the client the service's routes and endpoints.
    for kind in ["routes", "endpoints", "policy"] {
        let query = format!("mesh_controlplane_watchers{{kind=\"{kind}\"}}");
        let mut n: Option<f64>;
        assert_eventually!(
            {
                n = value(&prometheus, &query).await;
                n.is_some_and(|n| n >= 1.0)
            },
            "{query}: {n:?}"
        );
    }

    // A route for the service changes what the client's routes watch holds: the change is
    // written on that stream, and timed.
    let before = value(&prometheus, "mesh_controlplane_propagation_seconds_count")
        .await
        .unwrap_or_default();
    cp.apply(
        "apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata:
  name: web
spec:
  parentRefs: [{name: web, kind: Service, group: \"\", port: 80}]
  rules:
    - name: main
      backendRefs: [{name: web, port: 80}]
",
    )
    .await;
    let mut after: Option<f64>;
    assert_eventually!(
        {
            after = value(&prometheus, "mesh_controlplane_propagation_seconds_count").await;
            after.is_some_and(|n| n > before)
        },
        "propagations: {before} before, {after:?} after"
    );
    // The apply went through the store, timed.
    let applies = value(
        &prometheus,
        "mesh_controlplane_store_seconds_count{op=\"apply\"}",
    )
    .await;
    assert!(applies.is_some_and(|n| n >= 1.0), "{applies:?}");
    let p99 = value(
        &prometheus,
        "histogram_quantile(0.99, mesh_controlplane_propagation_seconds_bucket)",
    )
    .await;
    assert!(p99.is_some_and(f64::is_finite), "{p99:?}");
    #[allow(clippy::print_stderr, reason = "the figure the test measured")]
    {
        eprintln!(
            "propagations: {before} -> {after:?}; p99 {p99:?} s; certificates issued {issued:?}"
        );
    }
}
