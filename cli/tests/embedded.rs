//! The embedded mesh end to end, as a user runs it: `mesh demo` for each scenario, and `mesh up`
//! with `mesh apply` and `mesh rollout status` against it, stopped and restarted.
//!
//! Every process is real: the `mesh` binary runs the control plane and the rollout controller,
//! and supervises `mesh-demo-app`, `mesh-loadgen` and a `mesh-proxy` beside each of them, on
//! 127.0.0.1. The demos run one at a time: each keeps a few processes busy at 100 req/s.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::await_holding_lock,
    reason = "tests; the lock only orders tests that each own their processes"
)]

use std::{
    process::{Command, Output, Stdio},
    sync::Mutex,
    time::Duration,
};

use mesh_test_support::{
    assert_eventually,
    process::{MeshBinary, workspace_bin},
};
use serde_json::Value;

static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn demo(scenario: &str) -> Value {
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let out = Command::new(workspace_bin("mesh").unwrap())
        .args(["demo", "--scenario", scenario, "--output", "json"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "mesh demo failed: {stderr}");
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("summary is not JSON ({e}): {stderr}"))
}

fn num(v: &Value, path: &str) -> u64 {
    v.pointer(path)
        .and_then(Value::as_u64)
        .unwrap_or_else(|| panic!("{path} missing in {v:#}"))
}

#[test]
fn a_healthy_canary_is_promoted() {
    let s = demo("good");
    assert_eq!(s["phase"], "Succeeded", "{s:#}");
    assert_eq!(s["primary_version"], "v2", "{s:#}");
    assert!(num(&s, "/canary_requests") > 200, "{s:#}");
    assert_eq!(num(&s, "/canary_failed_requests"), 0, "{s:#}");
    assert!(s["decision_seconds"].as_f64().unwrap() < 120.0, "{s:#}");
    // After promotion the primary (now v2) serves everything, without errors.
    assert!(num(&s, "/after/requests") > 100, "{s:#}");
    assert_eq!(num(&s, "/after/canary"), 0, "{s:#}");
    assert_eq!(num(&s, "/after/failed"), 0, "{s:#}");
}

/// A rolled-back canary leaves v1 serving all traffic, and errors return to v1's baseline (0).
fn assert_rolled_back(s: &Value) {
    assert_eq!(s["phase"], "Failed", "{s:#}");
    assert_eq!(s["primary_version"], "v1", "{s:#}");
    assert!(num(s, "/after/requests") > 100, "{s:#}");
    assert_eq!(
        num(s, "/after/canary"),
        0,
        "traffic still reaches v2: {s:#}"
    );
    assert_eq!(
        num(s, "/after/failed"),
        0,
        "errors did not return to baseline: {s:#}"
    );
}

#[test]
fn an_erroring_canary_is_rolled_back() {
    let s = demo("errors");
    assert_rolled_back(&s);
    assert!(num(&s, "/canary_failed_requests") > 0, "{s:#}");
    assert!(
        s["reason"]
            .as_str()
            .unwrap()
            .contains("request-success-rate"),
        "{s:#}"
    );
}

#[test]
fn a_slow_canary_is_rolled_back() {
    let s = demo("latency");
    assert_rolled_back(&s);
    assert!(
        s["reason"].as_str().unwrap().contains("request-duration"),
        "{s:#}"
    );
}

fn mesh(server: &str, args: &[&str]) -> Output {
    Command::new(workspace_bin("mesh").unwrap())
        .args(args)
        .env("MESH_SERVER", server)
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

fn up(state: &std::path::Path, file: &std::path::Path) -> mesh_test_support::process::MeshProcess {
    MeshBinary::workspace("mesh")
        .unwrap()
        .arg("up")
        .arg("-f")
        .arg(file)
        .arg("--state-dir")
        .arg(state)
        .arg("--api-addr")
        .arg("127.0.0.1:0")
        .arg("--proxy-addr")
        .arg("127.0.0.1:0")
        .listener("api")
        .listener("proxy")
        .run()
        .unwrap()
}

fn terminate(p: &mut mesh_test_support::process::MeshProcess) {
    p.child().terminate();
}

#[tokio::test(flavor = "multi_thread")]
async fn mesh_up_rolls_out_with_apply_gates_with_rollout_status_and_resumes() {
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let manifest = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/mesh.yaml");
    let mut mesh_up = up(&state, &manifest);
    let server = format!("http://{}", mesh_up.addr("api"));

    // v1 comes up and the Canary initializes: the primary serves.
    assert_eventually!(
        mesh(&server, &["rollout", "status", "backend"])
            .status
            .code()
            == Some(0)
            && String::from_utf8_lossy(&mesh(&server, &["rollout", "status", "backend"]).stdout)
                .contains("Initialized"),
        "the canary never initialized"
    );
    let before = mesh(&server, &["get", "canary", "backend", "-o", "json"]);
    let before: Value = serde_json::from_slice(&before.stdout).unwrap();

    // Ctrl-C (SIGTERM) stops everything; a restart resumes from the state dir.
    terminate(&mut mesh_up);
    let status = mesh_up.child().exited_within(Duration::from_secs(30)).await;
    assert_eq!(
        status.and_then(|s| s.code()),
        Some(0),
        "mesh up did not stop cleanly"
    );
    let mut mesh_up = up(&state, &manifest);
    let server = format!("http://{}", mesh_up.addr("api"));
    let after = mesh(&server, &["get", "canary", "backend", "-o", "json"]);
    let after: Value = serde_json::from_slice(&after.stdout).unwrap();
    assert_eq!(
        before["status"]["lastTransitionTime"], after["status"]["lastTransitionTime"],
        "the restart re-initialized the canary instead of resuming"
    );

    // Deploy v2 (which fails 10 % of requests) the way a user would: edit and apply.
    let text = std::fs::read_to_string(&manifest).unwrap();
    let v2 = text.replacen("  version: v1\n  versions:\n    v1:\n      command: [mesh-demo-app, --version, v1, --latency-ms", "  version: v2\n  versions:\n    v1:\n      command: [mesh-demo-app, --version, v1, --latency-ms", 1);
    assert_ne!(text, v2, "the example changed; update this test");
    let v2_file = dir.path().join("mesh-v2.yaml");
    std::fs::write(&v2_file, v2).unwrap();
    let applied = mesh(&server, &["apply", "-f", v2_file.to_str().unwrap()]);
    assert!(
        applied.status.success(),
        "{}",
        String::from_utf8_lossy(&applied.stderr)
    );

    // CI gates on the exit code: 1 means rolled back.
    let summary = dir.path().join("summary.md");
    let gate = Command::new(workspace_bin("mesh").unwrap())
        .args([
            "rollout",
            "status",
            "backend",
            "--watch",
            "--timeout",
            "3m",
            "-o",
            "github",
        ])
        .env("MESH_SERVER", &server)
        .env("GITHUB_STEP_SUMMARY", &summary)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&gate.stdout);
    assert_eq!(gate.status.code(), Some(1), "{stdout}");
    assert!(
        stdout.contains("::error title=Canary backend Failed::"),
        "{stdout}"
    );
    assert!(stdout.contains("RolledBack"), "history missing: {stdout}");
    let md = std::fs::read_to_string(&summary).unwrap();
    assert!(md.contains("| request-success-rate |"), "{md}");

    let json = mesh(&server, &["rollout", "status", "backend", "-o", "json"]);
    assert_eq!(json.status.code(), Some(1));
    let json: Value = serde_json::from_slice(&json.stdout).unwrap();
    assert_eq!(json["phase"], "Failed");
    assert_eq!(json["canaryWeight"], 0);
    // The supervisor stopped the canary; the primary still runs v1.
    let w = mesh(&server, &["get", "workload", "backend", "-o", "json"]);
    let w: Value = serde_json::from_slice(&w.stdout).unwrap();
    assert_eq!(w["status"]["primary"], "v1", "{w:#}");
    assert!(w["status"].get("canary").is_none(), "{w:#}");

    let missing = mesh(&server, &["rollout", "status", "nope"]);
    assert_eq!(missing.status.code(), Some(4));
    assert!(String::from_utf8_lossy(&missing.stderr).contains("not found"));

    terminate(&mut mesh_up);
    let status = mesh_up.child().exited_within(Duration::from_secs(30)).await;
    assert_eq!(status.and_then(|s| s.code()), Some(0));
}
