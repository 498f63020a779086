//! The proxy's series are bounded by its route tables, not by what clients send: 10,000
//! requests, each with its own path and its own authority, through the outbound and the inbound
//! listener of a real proxy (in-process) in front of a real app, leave the number of series on
//! `/metrics` where a handful of requests of each kind put it. The counts are printed.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stderr)]

use futures_util::{StreamExt, stream};
use mesh_test_support::apps::app;
use mesh_test_support::proxies::{Sidecar, client_via, proxy};

const SERVICE: &str = "web.default:80";
const DISTINCT: usize = 10_000;

/// How many samples `/metrics` holds.
async fn series(p: &impl Sidecar) -> usize {
    p.metrics()
        .await
        .lines()
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .count()
}

/// Sends request `i` of a run: half through the outbound listener (a known authority with path
/// `/p/<i>`, or an unknown authority of its own), half to the inbound listener with its own
/// path and Host.
async fn send(i: usize, outbound: &reqwest::Client, inbound: &reqwest::Client, inbound_addr: &str) {
    let rsp = match i % 3 {
        0 => {
            outbound
                .get(format!("http://web.default:80/p/{i}"))
                .send()
                .await
        }
        1 => {
            outbound
                .get(format!("http://h{i}.default:80/p/{i}"))
                .send()
                .await
        }
        _ => {
            inbound
                .get(format!("http://{inbound_addr}/p/{i}"))
                .header("host", format!("h{i}.example"))
                .send()
                .await
        }
    };
    // Every kind gets an answer (the unknown authority from the proxy itself).
    rsp.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn distinct_paths_and_authorities_do_not_grow_the_series() {
    let web = app("v1").await.unwrap();
    let config = format!(
        "routes:\n  - parent: {SERVICE}\n    rules:\n      - backends: [{{service: {SERVICE}, weight: 1}}]\n\
         endpoints:\n  - service: {SERVICE}\n    endpoints: [{{addr: \"{}\"}}]\n",
        web.addr()
    );
    let p = proxy()
        .outbound(config)
        .app(web.addr())
        .service(SERVICE)
        .env("MESH_PROXY_WORKLOAD_DEPLOYMENT", "web")
        .env("MESH_PROXY_WORKLOAD_POD", "web-v1-0")
        .run()
        .unwrap();
    let outbound = client_via(p.addr("outbound"), None);
    let inbound = mesh_test_support::http_client();
    let inbound_addr = p.addr("inbound").to_string();

    // A few requests of each kind create every series the run can touch.
    for i in 0..30 {
        send(DISTINCT + i, &outbound, &inbound, &inbound_addr).await;
    }
    let before = series(&p).await;
    stream::iter(0..DISTINCT)
        .for_each_concurrent(32, |i| {
            let (outbound, inbound, inbound_addr) = (&outbound, &inbound, &inbound_addr);
            async move { send(i, outbound, inbound, inbound_addr).await }
        })
        .await;
    let after = series(&p).await;
    eprintln!("series on /metrics: {before} before, {after} after {DISTINCT} distinct requests");
    assert_eq!(before, after, "{}", p.metrics().await);

    // And the resource labels are on every sample.
    let text = p.metrics().await;
    let request = text
        .lines()
        .find(|l| l.starts_with("request_total{"))
        .unwrap();
    assert!(
        request
            .starts_with(r#"request_total{namespace="default",deployment="web",pod="web-v1-0","#),
        "{request}"
    );
}
