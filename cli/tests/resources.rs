//! The `mesh` CLI against a real `mesh-controlplane` process: apply/get/delete, validation
//! errors that name the field (and store nothing), durability across SIGKILL, watch resume, and
//! an HTTPRoute weight change reaching connected proxy watch streams.
//!
//! Needs both binaries built: `cargo test -p mesh-cli -p mesh-controlplane` (or `--workspace`).

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::print_stdout,
    clippy::print_stderr
)]

use std::{
    path::Path,
    process::Output,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
};

use mesh_core::proxy_api::{RouteTable, Update};
use mesh_test_support::{assert_eventually, mesh::control_plane, proxy_api::MeshCa};
use serde_json::Value;

struct ControlPlane {
    process: mesh_test_support::mesh::ControlPlane,
    api: String,
    proxy: String,
}

fn start(state_dir: &Path, extra: &[(&str, &str)]) -> ControlPlane {
    let mut builder = control_plane().state_dir(state_dir);
    for (k, v) in extra {
        builder = builder.env(k, v);
    }
    let process = builder
        .run()
        .expect("build it with `cargo test -p mesh-cli -p mesh-controlplane`");
    let (api, proxy) = (process.api_url(), process.proxy_api_url());
    ControlPlane {
        process,
        api,
        proxy,
    }
}

fn mesh(server: &str, args: &[&str]) -> Output {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_mesh"))
        .args(args)
        .env("MESH_SERVER", server)
        .output()
        .unwrap();
    eprintln!(
        "$ mesh {}\n{}{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn route_yaml(name: &str, primary: i64, canary: i64) -> String {
    format!(
        "apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata:
  name: {name}
spec:
  parentRefs:
    - name: web
      kind: Service
      group: \"\"
      port: 80
  rules:
    - backendRefs:
        - name: web-primary
          port: 80
          weight: {primary}
        - name: web-canary
          port: 80
          weight: {canary}
"
    )
}

/// A Canary with a custom metric and its MetricTemplate, shared by the resource tests of
/// both modes.
const CANARY_AND_TEMPLATE: &str = include_str!("fixtures/canary-and-template.yaml");

fn write(dir: &Path, name: &str, text: &str) -> std::path::PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

fn routes_json(server: &str) -> Vec<Value> {
    let out = mesh(server, &["get", "httproutes", "-o", "json"]);
    assert!(out.status.success());
    let list: Value = serde_json::from_slice(&out.stdout).unwrap();
    list["items"].as_array().unwrap().clone()
}

#[tokio::test]
async fn apply_get_delete_round_trip() {
    let state = tempfile::tempdir().unwrap();
    let cp = start(state.path(), &[]);
    let files = tempfile::tempdir().unwrap();
    write(files.path(), "route.yaml", &route_yaml("web", 90, 10));
    write(files.path(), "canary.yml", CANARY_AND_TEMPLATE);
    write(files.path(), "README.txt", "not a manifest: ignored");

    let out = mesh(&cp.api, &["apply", "-f", files.path().to_str().unwrap()]);
    assert!(out.status.success());
    let text = stdout(&out);
    assert!(
        text.contains("canary.rollouts.mesh.dev/web created"),
        "{text}"
    );
    assert!(
        text.contains("metrictemplate.rollouts.mesh.dev/errors created"),
        "{text}"
    );
    assert!(
        text.contains("httproute.gateway.networking.k8s.io/web created"),
        "{text}"
    );

    let out = mesh(&cp.api, &["get", "httproute", "web", "-o", "json"]);
    let route: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(route["spec"]["rules"][0]["backendRefs"][1]["weight"], 10);
    assert_eq!(route["metadata"]["namespace"], "default");
    assert!(route["metadata"]["uid"].is_string());
    assert_eq!(route["metadata"]["generation"], 1);

    let out = mesh(&cp.api, &["get", "canaries"]);
    let table = stdout(&out);
    assert!(table.starts_with("NAME"), "{table}");
    assert!(table.lines().nth(1).unwrap().starts_with("web "), "{table}");
    let out = mesh(&cp.api, &["get", "httproutes"]);
    assert!(stdout(&out).contains("web-primary=90,web-canary=10"));
    let out = mesh(&cp.api, &["get", "mt", "errors", "-o", "yaml"]);
    assert!(stdout(&out).contains("kind: MetricTemplate"));

    // Reapplying changes nothing; a changed weight is configured.
    let out = mesh(&cp.api, &["apply", "-f", files.path().to_str().unwrap()]);
    assert!(stdout(&out).contains("httproute.gateway.networking.k8s.io/web unchanged"));
    let changed = write(files.path(), "route.yaml", &route_yaml("web", 50, 50));
    let out = mesh(&cp.api, &["apply", "-f", changed.to_str().unwrap()]);
    assert!(stdout(&out).contains("web configured"), "{}", stdout(&out));
    assert_eq!(routes_json(&cp.api)[0]["metadata"]["generation"], 2);

    // Other namespaces are separate.
    let out = mesh(&cp.api, &["get", "httproutes", "-n", "shop"]);
    assert!(out.status.success());
    assert!(stderr(&out).contains("No resources found in shop namespace."));

    let out = mesh(&cp.api, &["delete", "httproute", "web"]);
    assert!(out.status.success());
    assert!(stdout(&out).contains("\"web\" deleted"));
    let out = mesh(&cp.api, &["get", "httproute", "web"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("NotFound"), "{}", stderr(&out));
    let out = mesh(&cp.api, &["get", "pods"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("no kind \"pods\""));
}

#[tokio::test]
async fn invalid_documents_name_the_field_and_store_nothing() {
    let state = tempfile::tempdir().unwrap();
    let cp = start(state.path(), &[]);
    let files = tempfile::tempdir().unwrap();
    let good = route_yaml("good", 90, 10);
    let cases: Vec<(&str, String, &str)> = vec![
        (
            "negative weight",
            route_yaml("bad", 90, -10),
            "spec.rules[0].backendRefs[1].weight",
        ),
        (
            "weight not an integer",
            route_yaml("bad", 90, 10).replace("weight: 10", "weight: ten"),
            "spec.rules[0].backendRefs[1].weight",
        ),
        (
            "fractional weight",
            route_yaml("bad", 90, 10).replace("weight: 10", "weight: 10.5"),
            "spec.rules[0].backendRefs[1].weight",
        ),
        (
            "missing field",
            CANARY_AND_TEMPLATE.replace(
                "  targetRef: {apiVersion: apps/v1, kind: Deployment, name: web}\n",
                "",
            ),
            "spec.targetRef",
        ),
        (
            "stepWeight above maxWeight",
            CANARY_AND_TEMPLATE.replace("stepWeight: 10", "stepWeight: 60"),
            "spec.analysis.stepWeight",
        ),
        (
            "missing parentRefs",
            route_yaml("bad", 1, 1).replace(
                "  parentRefs:\n    - name: web\n      kind: Service\n      group: \"\"\n      port: 80\n",
                "",
            ),
            "spec.parentRefs",
        ),
        (
            "unknown kind",
            "apiVersion: v1\nkind: Pod\nmetadata: {name: x}\n".to_string(),
            "unknown kind \"Pod\"",
        ),
        (
            "malformed YAML",
            "apiVersion: v1\nkind: [unclosed\n".to_string(),
            "malformed YAML",
        ),
    ];
    for (what, doc, expected) in cases {
        let file = write(files.path(), "manifest.yaml", &format!("{good}---\n{doc}"));
        let out = mesh(&cp.api, &["apply", "-f", file.to_str().unwrap()]);
        assert!(!out.status.success(), "{what}: accepted");
        let err = stderr(&out);
        assert!(
            err.contains(expected),
            "{what}: {err:?} does not name {expected:?}"
        );
        assert!(err.contains("manifest.yaml (document 2)"), "{what}: {err}");
        // Atomic: the valid first document was not stored either.
        assert!(
            routes_json(&cp.api).is_empty(),
            "{what}: something was stored"
        );
    }
    let list: Value = cp
        .process
        .api_client()
        .get(format!(
            "{}/apis/rollouts.mesh.dev/v1alpha1/canaries",
            cp.api
        ))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(list["items"], Value::Array(vec![]));
    assert_eq!(list["metadata"]["resourceVersion"], "0");
}

#[tokio::test]
async fn acknowledged_applies_survive_sigkill() {
    let state = tempfile::tempdir().unwrap();
    let mut cp = start(state.path(), &[]);
    let acked = Arc::new(AtomicU64::new(0));
    // A stream of applies, each its own route so every acknowledgement is checkable.
    let writer = {
        let api = cp.api.clone();
        let acked = Arc::clone(&acked);
        let client = cp.process.api_client();
        tokio::spawn(async move {
            for i in 0..10_000u64 {
                let doc: Value =
                    serde_yaml::from_str(&route_yaml(&format!("r{i}"), 90, 10)).unwrap();
                let resp = client
                    .post(format!("{api}/apply?namespace=default"))
                    .json(&doc)
                    .send()
                    .await;
                match resp {
                    Ok(r) if r.status().is_success() => {
                        acked.store(i + 1, Ordering::SeqCst);
                    }
                    _ => return,
                }
            }
        })
    };
    assert_eventually!(acked.load(Ordering::SeqCst) >= 25);
    cp.process.process().child().kill();
    writer.await.unwrap();
    let acknowledged = acked.load(Ordering::SeqCst);
    assert!(acknowledged >= 25);

    let cp = start(state.path(), &[]);
    let names: std::collections::BTreeSet<String> = routes_json(&cp.api)
        .iter()
        .map(|r| r["metadata"]["name"].as_str().unwrap().to_string())
        .collect();
    for i in 0..acknowledged {
        assert!(
            names.contains(&format!("r{i}")),
            "acknowledged r{i} lost after SIGKILL"
        );
    }
    eprintln!(
        "{acknowledged} acknowledged applies, {} routes after restart",
        names.len()
    );
}

/// Reads NDJSON lines from a streaming response.
struct Lines {
    resp: reqwest::Response,
    buf: Vec<u8>,
}

impl Lines {
    fn new(resp: reqwest::Response) -> Self {
        Self {
            resp,
            buf: Vec::new(),
        }
    }

    async fn next(&mut self) -> Option<Value> {
        loop {
            if let Some(pos) = self.buf.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = self.buf.drain(..=pos).collect();
                return Some(serde_json::from_slice(&line).unwrap());
            }
            let chunk = self.resp.chunk().await.ok()??;
            self.buf.extend_from_slice(&chunk);
        }
    }
}

#[tokio::test]
async fn watches_resume_from_a_version_across_restarts() {
    let state = tempfile::tempdir().unwrap();
    let history = [("MESH_CONTROLPLANE_WATCH_HISTORY", "3")];
    let files = tempfile::tempdir().unwrap();
    let cp = start(state.path(), &history);
    for (i, canary) in [10, 20].into_iter().enumerate() {
        let f = write(
            files.path(),
            &format!("r{i}.yaml"),
            &route_yaml("web", 100 - canary, canary),
        );
        assert!(
            mesh(&cp.api, &["apply", "-f", f.to_str().unwrap()])
                .status
                .success()
        );
    }
    let url = format!(
        "{}/apis/gateway.networking.k8s.io/v1/namespaces/default/httproutes",
        cp.api
    );
    let client = cp.process.api_client();
    // A watch without a version starts with a snapshot and a bookmark.
    let mut snapshot = Lines::new(
        client
            .get(format!("{url}?watch=true"))
            .send()
            .await
            .unwrap(),
    );
    let added = snapshot.next().await.unwrap();
    assert_eq!(added["type"], "ADDED");
    assert_eq!(
        added["object"]["spec"]["rules"][0]["backendRefs"][1]["weight"],
        20
    );
    let bookmark = snapshot.next().await.unwrap();
    assert_eq!(bookmark["type"], "BOOKMARK");
    assert_eq!(bookmark["object"]["metadata"]["resourceVersion"], "2");
    drop(snapshot);
    drop(cp);

    // After a restart, resuming from version 1 replays version 2 and then follows live changes.
    let cp = start(state.path(), &history);
    let url = url.replace(&url[..url.find("/apis").unwrap()], &cp.api);
    let mut resumed = Lines::new(
        client
            .get(format!("{url}?watch=true&resourceVersion=1"))
            .send()
            .await
            .unwrap(),
    );
    let e = resumed.next().await.unwrap();
    assert_eq!(e["type"], "MODIFIED");
    assert_eq!(e["object"]["metadata"]["resourceVersion"], "2");
    assert!(
        mesh(&cp.api, &["delete", "httproute", "web"])
            .status
            .success()
    );
    let e = resumed.next().await.unwrap();
    assert_eq!(e["type"], "DELETED");
    assert_eq!(e["object"]["metadata"]["resourceVersion"], "3");

    // With three events kept, history older than them is gone (410).
    for canary in [30, 40] {
        let f = write(
            files.path(),
            "r.yaml",
            &route_yaml("web", 100 - canary, canary),
        );
        assert!(
            mesh(&cp.api, &["apply", "-f", f.to_str().unwrap()])
                .status
                .success()
        );
    }
    let gone = client
        .get(format!("{url}?watch=true&resourceVersion=1"))
        .send()
        .await
        .unwrap();
    assert_eq!(gone.status(), reqwest::StatusCode::GONE);
    let status: Value = gone.json().await.unwrap();
    assert_eq!(status["reason"], "Expired");
}

#[tokio::test]
async fn a_weight_change_made_with_mesh_apply_reaches_every_watching_proxy() {
    const WATCHERS: usize = 25;
    let state = tempfile::tempdir().unwrap();
    let cp = start(state.path(), &[]);
    let files = tempfile::tempdir().unwrap();
    let f = write(files.path(), "route.yaml", &route_yaml("web", 90, 10));
    assert!(
        mesh(&cp.api, &["apply", "-f", f.to_str().unwrap()])
            .status
            .success()
    );

    // Proxies watch over HTTP/2 and mTLS, as the sidecar does (with a certificate from the
    // control plane's CA); several connections, many streams.
    let seen: Arc<Vec<AtomicU64>> = Arc::new((0..WATCHERS).map(|_| AtomicU64::new(0)).collect());
    let versions: Arc<Vec<AtomicU64>> =
        Arc::new((0..WATCHERS).map(|_| AtomicU64::new(0)).collect());
    let ca = MeshCa::of_control_plane(state.path()).unwrap();
    let clients: Vec<reqwest::Client> = (0..5)
        .map(|_| {
            ca.client("spiffe://cluster.local/ns/default/sa/watcher")
                .unwrap()
        })
        .collect();
    let mut tasks = Vec::new();
    for i in 0..WATCHERS {
        let client = clients[i % clients.len()].clone();
        let url = format!("{}/v1/watch/routes?authority=web.default:80", cp.proxy);
        let seen = Arc::clone(&seen);
        let versions = Arc::clone(&versions);
        tasks.push(tokio::spawn(async move {
            let resp = client.get(url).send().await.unwrap();
            assert_eq!(resp.version(), reqwest::Version::HTTP_2);
            let mut lines = Lines::new(resp);
            while let Some(line) = lines.next().await {
                let update: Update<RouteTable> = serde_json::from_value(line).unwrap();
                let previous = versions[i].swap(update.version, Ordering::SeqCst);
                assert!(update.version > previous, "versions must grow");
                if let Some(table) = update.value {
                    seen[i].store(
                        u64::from(table.rules[0].backends[1].weight),
                        Ordering::SeqCst,
                    );
                }
            }
        }));
    }
    assert_eventually!(
        seen.iter().all(|w| w.load(Ordering::SeqCst) == 10),
        "not every watcher has the initial 10 % canary weight"
    );
    let f = write(files.path(), "route.yaml", &route_yaml("web", 40, 60));
    assert!(
        mesh(&cp.api, &["apply", "-f", f.to_str().unwrap()])
            .status
            .success()
    );
    assert_eventually!(
        seen.iter().all(|w| w.load(Ordering::SeqCst) == 60),
        "weights seen: {:?}",
        seen.iter()
            .map(|w| w.load(Ordering::SeqCst))
            .collect::<Vec<_>>()
    );
    for t in tasks {
        t.abort();
    }
}

/// A typo on the command line is exit 4 ("could not run"), never clap's default 2, which a
/// pipeline gating on `mesh rollout status` would read as "timed out"; `--help` is still 0.
#[test]
fn usage_errors_exit_4_not_the_timed_out_code() {
    let run = |args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_mesh"))
            .args(args)
            .output()
            .unwrap()
    };
    let typo = run(&["rollout", "status", "web", "--no-such-flag"]);
    assert_eq!(typo.status.code(), Some(4), "{typo:?}");
    assert!(
        String::from_utf8_lossy(&typo.stderr).contains("--no-such-flag"),
        "{typo:?}"
    );
    let missing = run(&["rollout", "promote"]);
    assert_eq!(missing.status.code(), Some(4), "{missing:?}");
    let help = run(&["rollout", "status", "--help"]);
    assert_eq!(help.status.code(), Some(0), "{help:?}");
}
