//! `mesh-proxy` with a static config, started in-process, in front of real upstream HTTP servers:
//! weighted splitting, exact 0/100 weights, absolute-form and h2c clients (curl), timeouts,
//! fault injection, routing errors, `/config` and the golden metrics the canary judge reads.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;

use mesh_core::{exposition, gates};
use mesh_test_support::apps::{SEEN_ADDED, SEEN_HOST, primary_and_canary};
use mesh_test_support::proxies::{Sidecar, proxy};

fn config(primary: SocketAddr, canary: SocketAddr, weights: (u32, u32)) -> String {
    format!(
        r#"
routes:
  - parent: web.default:80
    rules:
      - name: slow
        matches: [{{path: {{type: Exact, value: /slow}}}}]
        timeoutMs: 200
        backends: [{{service: web-primary.default:80, weight: 1}}]
      - name: fault
        matches: [{{path: {{type: PathPrefix, value: /fault}}}}]
        filters: [{{type: fault, abort: {{status: 418, percent: 100}}}}]
        backends: [{{service: web-primary.default:80, weight: 1}}]
      - name: split
        matches: [{{path: {{type: PathPrefix, value: /}}}}]
        filters: [{{type: requestHeaderModifier, set: {{x-added: yes}}}}]
        backends:
          - {{service: web-primary.default:80, weight: {}}}
          - {{service: web-canary.default:80, weight: {}}}
endpoints:
  - service: web-primary.default:80
    endpoints: [{{addr: "{primary}", labels: {{version: v1}}}}]
  - service: web-canary.default:80
    endpoints: [{{addr: "{canary}", labels: {{version: v2}}}}]
"#,
        weights.0, weights.1
    )
}

#[tokio::test]
async fn weights_split_requests_and_metrics_count_them_per_backend() {
    let (v1, v2) = primary_and_canary().await.unwrap();
    let p = proxy().outbound(config(v1, v2, (80, 20))).run().unwrap();
    let client = p.client();
    let mut canary = 0;
    for _ in 0..1000 {
        let rsp = client.get("http://web.default:80/").send().await.unwrap();
        // The app sees the name the client used, not the endpoint address.
        let host = rsp.headers()[SEEN_HOST].to_str().unwrap().to_string();
        assert!(host.starts_with("web.default"), "{host}");
        assert_eq!(
            rsp.headers()[SEEN_ADDED],
            "yes",
            "header filter not applied"
        );
        if rsp.text().await.unwrap() == "v2" {
            canary += 1;
        }
    }
    // Binomial(1000, 0.2): sd 12.6; 60 is beyond 4.7 sd.
    assert!(
        (140..=260).contains(&canary),
        "canary got {canary} of 1000 at weight 20"
    );

    let text = p.metrics().await;
    let samples = exposition::parse(&text).unwrap();
    let c = gates::counters(&samples, "web-canary");
    let pr = gates::counters(&samples, "web-primary");
    assert_eq!(c.requests, f64::from(canary), "{text}");
    assert_eq!(pr.requests, f64::from(1000 - canary));
    assert_eq!(c.failures, 0.0);
    assert!(text.contains(r#"route="split""#), "{text}");
    assert!(text.contains("response_latency_ms_bucket"), "{text}");
}

#[tokio::test]
async fn a_90_10_split_over_10000_requests_lands_within_one_and_a_half_points() {
    let (v1, v2) = primary_and_canary().await.unwrap();
    let p = proxy().outbound(config(v1, v2, (90, 10))).run().unwrap();
    let client = p.client();
    let canary = std::sync::Arc::new(std::sync::atomic::AtomicU32::new(0));
    let mut tasks = tokio::task::JoinSet::new();
    // Eight clients at once, 1250 requests each.
    for _ in 0..8 {
        let (client, canary) = (client.clone(), canary.clone());
        tasks.spawn(async move {
            for _ in 0..1250 {
                let rsp = client.get("http://web.default:80/").send().await.unwrap();
                assert_eq!(rsp.status(), 200);
                if rsp.text().await.unwrap() == "v2" {
                    canary.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
            }
        });
    }
    while let Some(done) = tasks.join_next().await {
        done.unwrap();
    }
    let canary = canary.load(std::sync::atomic::Ordering::Relaxed);
    // Binomial(10000, 0.1): sd 30 requests (0.3 points); 1.5 points is 5 sd.
    assert!(
        (850..=1150).contains(&canary),
        "canary got {canary} of 10000 at weight 10"
    );
}

#[tokio::test]
async fn weights_of_zero_and_one_hundred_are_exact() {
    let (v1, v2) = primary_and_canary().await.unwrap();
    for (weights, want) in [((100, 0), "v1"), ((0, 100), "v2")] {
        let p = proxy().outbound(config(v1, v2, weights)).run().unwrap();
        let client = p.client();
        for _ in 0..300 {
            let body = client
                .get("http://web.default:80/")
                .send()
                .await
                .unwrap()
                .text()
                .await
                .unwrap();
            assert!(body.starts_with(want), "weights {weights:?} sent to {body}");
        }
    }
}

#[tokio::test]
async fn origin_form_and_h2c_clients_are_routed() {
    let (v1, v2) = primary_and_canary().await.unwrap();
    let p = proxy().outbound(config(v1, v2, (100, 0))).run().unwrap();
    let outbound = p.addr("outbound");
    for extra in [&[][..], &["--http2-prior-knowledge"][..]] {
        let out = tokio::process::Command::new("curl")
            .args(["-sS", "-H", "Host: web:80"])
            .args(extra)
            .arg(format!("http://{outbound}/"))
            .output()
            .await
            .unwrap();
        let body = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "curl {extra:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(body.starts_with("v1"), "curl {extra:?}: {body}");
    }
}

#[tokio::test]
async fn timeouts_faults_and_unknown_routes_answer_from_the_proxy() {
    let (v1, v2) = primary_and_canary().await.unwrap();
    let p = proxy().outbound(config(v1, v2, (100, 0))).run().unwrap();
    let client = p.client();

    let rsp = client
        .get("http://web.default:80/slow")
        .send()
        .await
        .unwrap();
    assert_eq!(rsp.status(), 504);
    assert!(rsp.headers().contains_key("mesh-proxy-error"));

    let rsp = client
        .get("http://web.default:80/fault/x")
        .send()
        .await
        .unwrap();
    assert_eq!(rsp.status(), 418);

    let rsp = client
        .get("http://nowhere.default:80/")
        .send()
        .await
        .unwrap();
    assert_eq!(rsp.status(), 404);
    assert!(rsp.text().await.unwrap().contains("nowhere.default:80"));

    // The timed-out request counts as a mesh failure against its backend.
    let text = p.metrics().await;
    assert!(
        text.lines().any(|l| l.starts_with("response_total")
            && l.contains(r#"route="slow""#)
            && l.contains(r#"classification="failure""#)
            && l.contains(r#"error="mesh""#)
            && l.contains(r#"status_code="504""#)),
        "{text}"
    );
}

#[tokio::test]
async fn config_endpoint_shows_the_tables() {
    let (v1, v2) = primary_and_canary().await.unwrap();
    let p = proxy().outbound(config(v1, v2, (70, 30))).run().unwrap();
    let cfg = p.config().await;
    assert_eq!(cfg["routes"][0]["parent"], "web.default:80");
    assert_eq!(cfg["routes"][0]["rules"][2]["backends"][1]["weight"], 30);
    let canary = cfg["endpoints"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["service"] == "web-canary.default:80")
        .unwrap();
    assert_eq!(canary["endpoints"][0]["addr"], v2.to_string());
    assert_eq!(canary["endpoints"][0]["labels"]["version"], "v2");
}

#[test]
fn a_bad_config_file_exits_64_naming_the_file_and_field() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.yaml");
    std::fs::write(
        &path,
        "routes:\n  - parent: web.default:80\n    rules:\n      - backends:\n          - {service: web.default:80, weight: lots}\n",
    )
    .unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_mesh-proxy"))
        .arg("--config")
        .arg(&path)
        .env("MESH_PROXY_ADMIN_ADDR", "127.0.0.1:0")
        .env("MESH_PROXY_OUTBOUND_ADDR", "127.0.0.1:0")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("bad.yaml"), "{stderr}");
    assert!(
        stderr.contains("routes[0].rules[0].backends[0].weight"),
        "{stderr}"
    );
}
