//! `/tap` on a real proxy's admin port, in front of real upstream servers: it is refused to a
//! caller without the tap token, and shows an authorized caller each request as it happens,
//! with the backend the split chose (so the canary's share in tap follows its weight), never a
//! query string, a body or a header off the allowlist.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;

use mesh_sidecar::config::ENV_TAP_TOKEN_FILE;
use mesh_test_support::apps::primary_and_canary;
use mesh_test_support::proxies::{Sidecar, proxy, split_config};

const TOKEN: &str = "tap-secret-1";

fn config(primary: SocketAddr, canary: SocketAddr) -> String {
    split_config(primary, canary, (70, 30))
}

async fn tap(admin: SocketAddr, query: &str, token: Option<&str>) -> reqwest::Response {
    let mut req = reqwest::Client::new().get(format!("http://{admin}/tap?{query}"));
    if let Some(token) = token {
        req = req.bearer_auth(token);
    }
    req.send().await.unwrap()
}

#[tokio::test]
async fn tap_is_refused_without_the_token_and_off_without_a_token_file() {
    let (v1, v2) = primary_and_canary().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, TOKEN).unwrap();
    let p = proxy()
        .outbound(config(v1, v2))
        .env(ENV_TAP_TOKEN_FILE, token_file.display().to_string())
        .run()
        .unwrap();
    let admin = p.addr("admin");
    let rsp = tap(admin, "", None).await;
    assert_eq!(rsp.status(), 401);
    assert!(rsp.text().await.unwrap().contains("no bearer token"));
    let rsp = tap(admin, "", Some("guess")).await;
    assert_eq!(rsp.status(), 401);
    assert!(rsp.text().await.unwrap().contains("not accepted"));
    // A bad filter is named.
    let rsp = tap(admin, "body=1", Some(TOKEN)).await;
    assert_eq!(rsp.status(), 400);
    assert!(rsp.text().await.unwrap().contains("\"body\""));

    let off = proxy().outbound(config(v1, v2)).run().unwrap();
    let rsp = tap(off.addr("admin"), "", Some(TOKEN)).await;
    assert_eq!(rsp.status(), 403);
    assert!(rsp.text().await.unwrap().contains("not enabled"));
}

#[tokio::test]
async fn an_authorized_tap_sees_each_request_with_the_backend_the_split_chose() {
    let (v1, v2) = primary_and_canary().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, format!("{TOKEN}\n")).unwrap();
    let p = proxy()
        .outbound(config(v1, v2))
        .env(ENV_TAP_TOKEN_FILE, token_file.display().to_string())
        .run()
        .unwrap();
    const N: usize = 1000;
    // Only /items passes the filter; /other requests are carried but not shown.
    let mut rsp = tap(
        p.addr("admin"),
        &format!("path=/items&max={N}"),
        Some(TOKEN),
    )
    .await;
    assert_eq!(rsp.status(), 200);
    assert_eq!(rsp.headers()["content-type"], "application/x-ndjson");
    let client = p.client();
    let load = tokio::spawn(async move {
        for i in 0..N {
            client
                .get(format!("http://web.default:80/other/{i}"))
                .send()
                .await
                .unwrap();
            client
                .get(format!("http://web.default:80/items/{i}?token=hunter2"))
                .header("authorization", "Bearer app-secret")
                .header("x-request-id", format!("req-{i}"))
                .send()
                .await
                .unwrap();
        }
    });
    let mut text = String::new();
    while let Some(chunk) = rsp.chunk().await.unwrap() {
        text.push_str(std::str::from_utf8(&chunk).unwrap());
    }
    load.await.unwrap();
    let events: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(events.len(), N, "max={N} ends the stream after {N} events");
    let mut canary = 0;
    for (i, e) in events.iter().enumerate() {
        assert_eq!(e["direction"], "outbound");
        assert_eq!(e["method"], "GET");
        assert_eq!(
            e["path"],
            format!("/items/{i}"),
            "in order, without the query"
        );
        assert_eq!(e["authority"], "web.default:80");
        assert_eq!(e["route"], "split");
        assert_eq!(e["status"], 200);
        assert_eq!(e["headers"]["x-request-id"], format!("req-{i}"));
        assert!(e["latencyMs"].as_f64().unwrap() >= 0.0);
        match e["backend"].as_str().unwrap() {
            "web-canary.default" => canary += 1,
            "web-primary.default" => {}
            other => panic!("backend {other}"),
        }
    }
    assert!(!text.contains("hunter2"), "the query is never shown");
    assert!(
        !text.contains("app-secret"),
        "authorization is not allowlisted"
    );
    // Binomial(1000, 0.3): sd 14.5; 75 is beyond 5 sd.
    assert!(
        (225..=375).contains(&canary),
        "the canary got {canary} of {N} tapped requests at weight 30"
    );
}
