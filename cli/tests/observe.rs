//! `mesh stat`, `routes`, `edges`, `tap` and `top` against `mesh up -f examples/mesh.yaml`:
//! the control plane scrapes the real sidecars into its window and relays their taps; a tap
//! without the resource API's token is refused by the control plane and by the proxy itself.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::{Command, Output, Stdio};

use mesh_test_support::{assert_eventually, process::workspace_bin};
use serde_json::Value;

fn mesh(server: &str, args: &[&str]) -> Output {
    Command::new(workspace_bin("mesh").unwrap())
        .args(args)
        .env("MESH_SERVER", server)
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

fn json(server: &str, args: &[&str]) -> Value {
    let out = mesh(server, args);
    serde_json::from_slice(&out.stdout).unwrap_or_default()
}

fn rows_with_traffic(v: &Value) -> Vec<&Value> {
    v.as_array()
        .map(|rows| {
            rows.iter()
                .filter(|r| r["golden"]["rps"].as_f64().unwrap_or_default() > 0.0)
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread")]
async fn observe_commands_show_the_embedded_mesh_and_tap_needs_the_token() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let manifest = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/mesh.yaml");
    let mut up = mesh_test_support::mesh::mesh_up(&state, &manifest, &[]).unwrap();
    let api = up.addr("api");
    let server = format!("http://{api}");

    // loadgen -> frontend -> backend: frontend's inbound and its calls to backend show up once
    // two scrapes have seen them. Workloads are listed by arm, as Flagger's Deployments are.
    assert_eventually!(
        {
            let wl = json(&server, &["stat", "deploy", "-o", "json"]);
            rows_with_traffic(&wl)
                .iter()
                .any(|r| r["name"] == "frontend-primary")
        },
        "frontend never showed traffic in mesh stat"
    );
    let workloads = json(&server, &["stat", "deploy", "-o", "json"]);
    let frontend = workloads
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["name"] == "frontend-primary")
        .unwrap();
    assert_eq!(frontend["meshed"], 1, "{frontend}");
    assert_eq!(frontend["golden"]["successRate"], 1.0, "{frontend}");
    let table = String::from_utf8(mesh(&server, &["stat", "deploy"]).stdout).unwrap();
    assert!(table.starts_with("NAMESPACE"), "{table}");
    assert!(
        table.contains("LATENCY_P99") && table.contains("TCP_CONN"),
        "{table}"
    );
    assert!(table.contains("frontend-primary"), "{table}");

    assert_eventually!(
        !rows_with_traffic(&json(&server, &["routes", "backend", "-o", "json"])).is_empty(),
        "no route of backend carried traffic"
    );
    let routes = json(&server, &["routes", "backend", "-o", "json"]);
    let route = &routes[0];
    assert!(
        route["authority"]
            .as_str()
            .unwrap()
            .starts_with("backend.default"),
        "{routes}"
    );
    let primary = route["backends"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["service"] == "backend-primary")
        .unwrap_or_else(|| panic!("{routes}"));
    // Before any rollout, the primary takes everything.
    assert_eq!(primary["share"], 1.0, "{routes}");

    let edges = json(&server, &["edges", "-o", "json"]);
    let edge = edges
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["src"] == "frontend-primary" && e["dst"] == "backend-primary")
        .unwrap_or_else(|| panic!("{edges}"));
    assert_eq!(
        edge["srcIdentity"],
        "spiffe://cluster.local/ns/default/sa/frontend"
    );
    assert_eq!(
        edge["dstIdentities"][0],
        "spiffe://cluster.local/ns/default/sa/backend"
    );

    // Tap through the control plane: frontend's calls, with the backend the split chose.
    let out = mesh(
        &server,
        &[
            "tap",
            "frontend",
            "--direction",
            "outbound",
            "--max",
            "10",
            "-o",
            "json",
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let events: Vec<Value> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(events.len(), 10, "{events:?}");
    for e in &events {
        assert_eq!(e["direction"], "outbound", "{e}");
        assert_eq!(e["backend"], "backend-primary.default", "{e}");
        assert_eq!(
            e["srcIdentity"],
            "spiffe://cluster.local/ns/default/sa/frontend"
        );
        assert_eq!(
            e["dstIdentity"],
            "spiffe://cluster.local/ns/default/sa/backend"
        );
        assert!(e["status"].as_u64().is_some(), "{e}");
    }
    let top = json(
        &server,
        &["top", "frontend", "--duration", "3s", "-o", "json"],
    );
    assert!(
        top.as_array()
            .unwrap()
            .iter()
            .any(|r| r["path"] == "/" && r["count"].as_u64() > Some(0)),
        "{top}"
    );

    // Without the token: the control plane refuses, and so does each proxy asked directly.
    let anonymous = mesh_test_support::http_client();
    let rsp = anonymous
        .get(format!("{server}/v1/observe/tap?workload=frontend"))
        .send()
        .await
        .unwrap();
    assert_eq!(rsp.status(), 401);
    let wrong = dir.path().join("wrong-token");
    std::fs::write(&wrong, "not-the-token").unwrap();
    let out = mesh(
        &server,
        &[
            "tap",
            "frontend",
            "--max",
            "1",
            "--token-file",
            wrong.to_str().unwrap(),
        ],
    );
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("401"),
        "{out:?}"
    );
    let token = std::fs::read_to_string(state.join("controlplane/api-token")).unwrap();
    let targets: Value = anonymous
        .get(format!("{server}/v1/prometheus/targets"))
        .bearer_auth(token.trim())
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let admin = targets[0]["targets"][0].as_str().unwrap();
    let rsp = anonymous
        .get(format!("http://{admin}/tap"))
        .send()
        .await
        .unwrap();
    assert_eq!(rsp.status(), 401, "a proxy's tap without a token");
    let rsp = anonymous
        .get(format!("http://{admin}/tap"))
        .bearer_auth("guess")
        .send()
        .await
        .unwrap();
    assert_eq!(rsp.status(), 401, "a proxy's tap with a wrong token");

    up.child().terminate();
}
