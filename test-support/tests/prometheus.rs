//! The harness's Prometheus is real: it scrapes a tiny HTTP endpoint started here, and a PromQL
//! query through prometheus-http-query returns the value that endpoint served.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "integration tests fail by panicking"
)]

use std::{
    convert::Infallible,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{SystemTime, UNIX_EPOCH},
};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response, body::Incoming, service::service_fn};
use hyper_util::rt::TokioIo;
use mesh_test_support::{
    assert_eventually,
    prometheus::{Prometheus, ScrapeJob},
};

/// Serves `mesh_harness_probe_value <value>` and counts how often it was scraped.
async fn probe_endpoint(value: u64, scrapes: Arc<AtomicU64>) -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (io, _) = listener.accept().await.unwrap();
            let scrapes = scrapes.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req: Request<Incoming>| {
                    if req.uri().path() == "/metrics" {
                        scrapes.fetch_add(1, Ordering::SeqCst);
                    }
                    let body = format!(
                        "# TYPE mesh_harness_probe_value gauge\nmesh_harness_probe_value {value}\n"
                    );
                    async move { Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(body)))) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(io), svc)
                    .await;
            });
        }
    });
    addr
}

#[tokio::test]
async fn promql_returns_what_prometheus_scraped() {
    // A value no fixture could know in advance.
    let value = u64::from(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .subsec_micros(),
    ) + 1;
    let scrapes = Arc::new(AtomicU64::new(0));
    let target = probe_endpoint(value, scrapes.clone()).await;

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
        scrapes.load(Ordering::SeqCst)
    );
    assert_eq!(seen, Some(value as f64));
    assert!(
        scrapes.load(Ordering::SeqCst) >= 1,
        "the value came without a scrape"
    );

    let up = client.query(r#"up{job="probe"}"#).get().await.unwrap();
    let up = up.data().as_vector().unwrap();
    assert_eq!(up.len(), 1);
    assert_eq!(up[0].sample().value(), 1.0);
    assert_eq!(
        up[0].metric().get("instance").map(String::as_str),
        Some(target.to_string().as_str())
    );
}
