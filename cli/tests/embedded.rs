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

use mesh_test_support::{assert_eventually, process::workspace_bin};
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
    // Flagger's success-rate gate or the sequential failure comparison, whichever is first.
    let reason = s["reason"].as_str().unwrap();
    assert!(
        reason.contains("request-success-rate") || reason.contains("failures: canary"),
        "{s:#}"
    );
    assert_eq!(s["outcome"], "RolledBack", "{s:#}");
}

/// The bounded version of `scripts/rollout-trials`: one real rollout of a trial scenario, whose
/// outcome the judge's guarantee fixes (a canary failing 5 % against the primary's 0.1 % is
/// promoted with a chance far below 1e-6), and whose decision is explained.
#[test]
fn a_trial_rollout_ends_as_the_guarantee_says_and_explains_itself() {
    let s = demo("errors-5pct");
    assert_eq!(s["scenario"], "errors-5pct", "{s:#}");
    assert_eq!(s["outcome"], "RolledBack", "{s:#}");
    assert_eq!(s["primary_version"], "v1", "{s:#}");
    assert!(s["analysis_seconds"].as_f64().is_some(), "{s:#}");
    assert!(num(&s, "/canary_failed_requests") > 0, "{s:#}");
}

#[test]
fn a_slow_canary_is_rolled_back() {
    let s = demo("latency");
    assert_rolled_back(&s);
    // Flagger's p99 gate or the sequential slow-request comparison, whichever is first.
    let reason = s["reason"].as_str().unwrap();
    assert!(
        reason.contains("request-duration") || reason.contains("requests slower than"),
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
    up_with(state, file, &[])
}

fn up_with(
    state: &std::path::Path,
    file: &std::path::Path,
    extra: &[&str],
) -> mesh_test_support::process::MeshProcess {
    mesh_test_support::mesh::mesh_up(state, file, extra).unwrap()
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
    // At once, as a user would after reading the announcement: the token's pointer for the
    // new address is already there.
    let after = mesh(&server, &["get", "canary", "backend", "-o", "json"]);
    assert!(
        after.status.success(),
        "mesh get right after the restart: {}",
        String::from_utf8_lossy(&after.stderr)
    );
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

/// examples/mesh.yaml with backend v2 failing 5 % of requests and a healthy v3 added.
fn manifest_with(dir: &std::path::Path, version: &str) -> std::path::PathBuf {
    let manifest = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/mesh.yaml");
    let text = std::fs::read_to_string(&manifest).unwrap();
    let v1 = "  version: v1\n  versions:\n    v1:\n      command: [mesh-demo-app, --version, v1, --latency-ms";
    let edited = text
        .replacen(v1, &v1.replacen("version: v1", &format!("version: {version}"), 1), 1)
        .replacen("DEMO_ERROR_RATE: \"0.1\"", "DEMO_ERROR_RATE: \"0.05\"", 1)
        .replacen(
            "    v2:\n",
            "    v3:\n      command: [mesh-demo-app, --version, v3, --latency-ms, \"5\", --latency-p99-ms, \"20\"]\n    v2:\n",
            1,
        );
    // A request timeout on the Canary's service, which its route must carry.
    let edited = edited.replacen(
        "  service:\n    port: 9898\n",
        "  service:\n    port: 9898\n    timeout: 5s\n",
        1,
    );
    assert!(
        edited.contains(
            "    v3:
"
        ),
        "the example changed; update this test"
    );
    assert!(
        edited.contains("\"0.05\""),
        "the example changed; update this test"
    );
    assert!(
        edited.contains("    timeout: 5s\n"),
        "the example changed; update this test"
    );
    let path = dir.join(format!("mesh-{version}.yaml"));
    std::fs::write(&path, edited).unwrap();
    path
}

fn canary(server: &str) -> Value {
    let out = mesh(server, &["get", "canary", "backend", "-o", "json"]);
    serde_json::from_slice(&out.stdout).unwrap_or_default()
}

/// Polls the Canary until `done` holds, for up to `limit`.
async fn wait_for(
    server: &str,
    limit: Duration,
    what: &str,
    done: impl Fn(&Value) -> bool,
) -> Value {
    let start = std::time::Instant::now();
    loop {
        let c = canary(server);
        if done(&c) {
            return c;
        }
        assert!(
            start.elapsed() < limit,
            "{what}: not after {limit:?}; the canary is {:#}",
            c["status"]
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

fn phase(c: &Value) -> &str {
    c["status"]["phase"].as_str().unwrap_or("")
}

fn apply(server: &str, file: &std::path::Path) {
    let out = mesh(server, &["apply", "-f", file.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn pid_alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        !s.rsplit_once(')')
            .is_some_and(|(_, r)| r.trim_start().starts_with('Z'))
    })
}

/// The PIDs `mesh up` listed in its state dir's `run/`.
fn listed_pids(state: &std::path::Path) -> Vec<u32> {
    std::fs::read_dir(state.join("run"))
        .map(|d| {
            d.flatten()
                .filter_map(|e| e.path().file_stem()?.to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// `mesh up` on the example with backend at v1, once its Canary has initialized.
async fn up_initialized(
    dir: &std::path::Path,
    state: &std::path::Path,
) -> (mesh_test_support::process::MeshProcess, String) {
    let mesh_up = up(state, &manifest_with(dir, "v1"));
    let server = format!("http://{}", mesh_up.addr("api"));
    wait_for(&server, Duration::from_secs(60), "initialized", |c| {
        phase(c) == "Initialized"
    })
    .await;
    (mesh_up, server)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_killed_controller_resumes_mid_rollout_and_rolls_back_a_5pct_canary() {
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let (mut mesh_up, server) = up_initialized(dir.path(), &state).await;

    // v2 fails 5 % of requests. Kill `mesh up` outright once the canary takes traffic, before
    // the analysis has decided.
    apply(&server, &manifest_with(dir.path(), "v2"));
    let before = wait_for(&server, Duration::from_secs(60), "canary at 10 %", |c| {
        phase(c) == "Progressing" && c["status"]["canaryWeight"].as_i64() >= Some(10)
    })
    .await;
    assert!(
        before["status"]["failedChecks"].as_i64() < Some(2),
        "decided before the kill: {:#}",
        before["status"]
    );
    let orphans = listed_pids(&state);
    mesh_up.child().kill();
    assert!(
        orphans.len() >= 6,
        "expected apps and sidecars listed, got {orphans:?}"
    );
    assert!(
        orphans.iter().all(|p| pid_alive(*p)),
        "SIGKILL should leave the children running: {orphans:?}"
    );

    // The restart stops what the killed run left behind, then carries on from the stored status.
    let mut mesh_up = up(&state, &manifest_with(dir.path(), "v2"));
    let server = format!("http://{}", mesh_up.addr("api"));
    assert!(
        orphans.iter().all(|p| !pid_alive(*p)),
        "left-over processes still run: {orphans:?}"
    );
    let resumed = canary(&server);
    assert_eq!(phase(&resumed), "Progressing", "{:#}", resumed["status"]);
    assert_eq!(
        resumed["status"]["lastTransitionTime"], before["status"]["lastTransitionTime"],
        "the rollout restarted instead of resuming"
    );
    let done = wait_for(&server, Duration::from_secs(120), "a decision", |c| {
        matches!(phase(c), "Failed" | "Succeeded")
    })
    .await;
    let s = &done["status"];
    assert_eq!(phase(&done), "Failed", "{s:#}");
    assert_eq!(s["canaryWeight"], 0);
    // The judge's numbers are in the status: the decision names the canary's requests and
    // failures it judged, from its own traffic (the success-rate gate at a tick, or the failure
    // comparison, at a tick or at a look between ticks).
    let d = &s["decision"];
    let (failed, requests) = (
        d["canaryEvents"].as_u64().unwrap_or_default(),
        d["canaryRequests"].as_u64().unwrap_or_default(),
    );
    assert!(requests > 0, "{d:#}");
    let rate = 100.0 * (requests - failed) as f64 / requests as f64;
    assert!(
        (80.0..99.0).contains(&rate),
        "canary success rate {rate}: {d:#}"
    );
    let starts = s["history"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|h| h["reason"] == "Progressing")
        .count();
    assert_eq!(starts, 1, "the analysis started twice: {:#}", s["history"]);

    terminate(&mut mesh_up);
    let status = mesh_up.child().exited_within(Duration::from_secs(30)).await;
    assert_eq!(status.and_then(|s| s.code()), Some(0));
    assert!(
        listed_pids(&state).is_empty(),
        "a clean stop leaves no PID files"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn rollout_pause_resume_promote_abort_and_history() {
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let (mut mesh_up, server) = up_initialized(dir.path(), &state).await;
    let refused = mesh(&server, &["rollout", "promote", "backend"]);
    assert_eq!(refused.status.code(), Some(4));
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("no rollout in progress"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );

    // A healthy v3: pause freezes it mid-way, resume lets it go on, promote ends it at once.
    apply(&server, &manifest_with(dir.path(), "v3"));
    wait_for(&server, Duration::from_secs(60), "canary at 10 %", |c| {
        phase(c) == "Progressing" && c["status"]["canaryWeight"].as_i64() >= Some(10)
    })
    .await;
    // The route the rollout steps carries the Canary's request timeout (spec.service.timeout).
    let route = mesh(&server, &["get", "httproute", "backend", "-o", "json"]);
    let route: Value = serde_json::from_slice(&route.stdout).unwrap();
    assert_eq!(
        route["spec"]["rules"][0]["timeouts"]["request"], "5s",
        "{route:#}"
    );
    assert!(
        route["spec"]["rules"][0]["backendRefs"][1]["weight"].as_i64() >= Some(10),
        "{route:#}"
    );
    let paused = mesh(&server, &["rollout", "pause", "backend"]);
    assert!(
        paused.status.success(),
        "{}",
        String::from_utf8_lossy(&paused.stderr)
    );
    let held = canary(&server)["status"]["canaryWeight"].clone();
    tokio::time::sleep(Duration::from_secs(12)).await; // more than two analysis intervals
    let c = canary(&server);
    assert_eq!(c["spec"]["suspend"], true);
    assert_eq!(c["status"]["canaryWeight"], held, "a paused rollout moved");
    // In progress: without --watch that is "timed out" at once, and so is a short --timeout.
    let now = mesh(&server, &["rollout", "status", "backend"]);
    assert_eq!(
        now.status.code(),
        Some(2),
        "{}",
        String::from_utf8_lossy(&now.stdout)
    );
    let short = mesh(
        &server,
        &["rollout", "status", "backend", "--watch", "--timeout", "2s"],
    );
    assert_eq!(short.status.code(), Some(2));
    let resumed = mesh(&server, &["rollout", "resume", "backend"]);
    assert!(resumed.status.success());
    assert_eq!(canary(&server)["spec"]["suspend"], false);

    let promoted = mesh(&server, &["rollout", "promote", "backend"]);
    assert!(
        promoted.status.success(),
        "{}",
        String::from_utf8_lossy(&promoted.stderr)
    );
    let c = wait_for(&server, Duration::from_secs(60), "promotion", |c| {
        phase(c) == "Succeeded"
    })
    .await;
    assert!(
        c["status"]["canaryWeight"] == 0
            && c["status"]["lastPromotedSpec"]
                .as_str()
                .is_some_and(|r| r.starts_with("v3-")),
        "{:#}",
        c["status"]
    );
    let history = mesh(&server, &["rollout", "history", "backend"]);
    let history = String::from_utf8_lossy(&history.stdout);
    assert!(history.contains("ManualPromotion"), "{history}");
    assert!(history.contains("Succeeded"), "{history}");

    // v2 is aborted by hand before the judge gets to it.
    apply(&server, &manifest_with(dir.path(), "v2"));
    wait_for(&server, Duration::from_secs(60), "v2 progressing", |c| {
        phase(c) == "Progressing"
            && c["status"]["lastAppliedSpec"]
                .as_str()
                .is_some_and(|r| r.starts_with("v2-"))
    })
    .await;
    let aborted = mesh(&server, &["rollout", "abort", "backend"]);
    assert!(
        aborted.status.success(),
        "{}",
        String::from_utf8_lossy(&aborted.stderr)
    );
    let c = wait_for(&server, Duration::from_secs(30), "abort", |c| {
        phase(c) == "Failed"
    })
    .await;
    let json = mesh(&server, &["rollout", "history", "backend", "-o", "json"]);
    let events: Value = serde_json::from_slice(&json.stdout).unwrap();
    assert!(
        events
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["reason"] == "RolledBack"
                && e["message"]
                    .as_str()
                    .unwrap()
                    .contains("aborted by request")),
        "{events:#}"
    );
    assert_eq!(
        c["status"]["lastPromotedSpec"].as_str().map(|r| &r[..3]),
        Some("v3-")
    );
    let w = mesh(&server, &["get", "workload", "backend", "-o", "json"]);
    let w: Value = serde_json::from_slice(&w.stdout).unwrap();
    assert_eq!(w["status"]["primary"], "v3", "{w:#}");

    terminate(&mut mesh_up);
    let status = mesh_up.child().exited_within(Duration::from_secs(30)).await;
    assert_eq!(status.and_then(|s| s.code()), Some(0));
}

/// The address a workload's sidecar announced for `listener` in its log under `state`.
fn sidecar_addr(state: &std::path::Path, workload: &str, listener: &str) -> Option<String> {
    let log = std::fs::read_to_string(
        state
            .join("logs")
            .join(format!("{workload}.default-primary-v1-0.proxy.log")),
    )
    .ok()?;
    let prefix = format!("mesh: listening {listener} ");
    log.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .map(str::to_string)
}

/// `mesh up --default-inbound-policy all-authenticated` refuses plaintext callers on every
/// port while the meshed chain (loadgen -> frontend -> backend, all mTLS) keeps working; then
/// examples/policy.yaml narrows backend to frontend alone, and frontend's calls are admitted by
/// that policy.
#[tokio::test(flavor = "multi_thread")]
async fn inbound_policy_in_the_embedded_mesh() {
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let examples = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
    let mesh_up = up_with(
        &state,
        &examples.join("mesh.yaml"),
        &["--default-inbound-policy", "all-authenticated"],
    );
    let server = format!("http://{}", mesh_up.addr("api"));
    let http = mesh_test_support::http_client();
    assert_eventually!(
        sidecar_addr(&state, "backend", "inbound").is_some()
            && sidecar_addr(&state, "backend", "admin").is_some()
    );
    let inbound = sidecar_addr(&state, "backend", "inbound").unwrap();
    let admin = sidecar_addr(&state, "backend", "admin").unwrap();

    // Plaintext is refused by the default; frontend's mTLS calls are admitted by it.
    let plaintext = |http: reqwest::Client| {
        let url = format!("http://{inbound}/");
        async move {
            http.get(url)
                .send()
                .await
                .map(|r| r.status().as_u16())
                .unwrap_or(0)
        }
    };
    assert_eventually!(plaintext(http.clone()).await == 403);
    assert_eventually!(
        mesh_test_support::metric_sum(
            &admin,
            "inbound_http_authz_allow_total",
            &["authorization=\"default:all-authenticated\""]
        )
        .await
            > 0.0
    );

    // The example policy: only frontend, over mTLS.
    let applied = mesh(
        &server,
        &[
            "apply",
            "-f",
            examples.join("policy.yaml").to_str().unwrap(),
        ],
    );
    assert!(
        applied.status.success(),
        "{}",
        String::from_utf8_lossy(&applied.stderr)
    );
    assert_eventually!(
        mesh_test_support::metric_sum(
            &admin,
            "inbound_http_authz_allow_total",
            &["authorization=\"AuthorizationPolicy/backend-from-frontend\""]
        )
        .await
            > 10.0,
        "frontend's calls are not admitted by the example policy"
    );
    assert_eq!(plaintext(http.clone()).await, 403);
}

/// [`manifest_with`] whose Canary asks for a confirm-promotion gate the mesh holds (a webhook
/// without a url), stepping 25 % at a time to 50 %.
fn gated_manifest(dir: &std::path::Path, version: &str) -> std::path::PathBuf {
    let path = manifest_with(dir, version);
    let text = std::fs::read_to_string(&path).unwrap();
    let gated = text
        .replacen(
            "    stepWeight: 10\n",
            "    stepWeight: 25\n    webhooks:\n      - name: approval\n        type: confirm-promotion\n",
            1,
        );
    assert!(
        gated.contains("type: confirm-promotion"),
        "the example changed; update this test"
    );
    let path = dir.join(format!("mesh-gated-{version}.yaml"));
    std::fs::write(&path, gated).unwrap();
    path
}

/// A Canary that asks for a confirm-promotion gate stops at WaitingPromotion (status exits 3
/// and says how to open it), keeps waiting across a killed and restarted `mesh up`, and
/// `mesh rollout promote --by <run URL>` opens it: the rollout
/// ends Succeeded and the history names the URL.
#[tokio::test(flavor = "multi_thread")]
async fn a_gated_canary_waits_for_promote_and_records_who_opened_it() {
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let mut mesh_up = up(&state, &gated_manifest(dir.path(), "v1"));
    let server = format!("http://{}", mesh_up.addr("api"));
    wait_for(&server, Duration::from_secs(60), "initialized", |c| {
        phase(c) == "Initialized"
    })
    .await;
    apply(&server, &gated_manifest(dir.path(), "v3"));

    let waiting = mesh(
        &server,
        &[
            "rollout",
            "status",
            "backend",
            "--watch",
            "--timeout",
            "3m",
            "-o",
            "json",
        ],
    );
    let report: Value = serde_json::from_slice(&waiting.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&waiting.stderr)));
    assert_eq!(waiting.status.code(), Some(3), "{report:#}");
    assert_eq!(report["phase"], "WaitingPromotion", "{report:#}");
    assert_eq!(report["result"], "waiting-promotion");
    assert_eq!(report["canaryWeight"], 50);
    let gate = &report["gate"];
    assert_eq!(gate["type"], "confirm-promotion", "{gate:#}");
    assert_eq!(gate["hooks"], serde_json::json!(["approval"]));
    assert_eq!(gate["waiting"], true);
    assert_eq!(gate["openWith"], "mesh rollout promote backend -n default");
    let id = gate["id"].as_str().unwrap().to_string();
    let text = mesh(&server, &["rollout", "status", "backend"]);
    assert_eq!(text.status.code(), Some(3));
    assert!(
        String::from_utf8_lossy(&text.stdout).contains("confirm-promotion approval waiting since"),
        "{}",
        String::from_utf8_lossy(&text.stdout)
    );

    // Killed mid-wait (SIGKILL, no clean stop), a restart resumes the same wait: it does not
    // promote, fail or wait anew.
    mesh_up.child().kill();
    let mut mesh_up = up(&state, &gated_manifest(dir.path(), "v3"));
    let server = format!("http://{}", mesh_up.addr("api"));
    let again = mesh(&server, &["rollout", "status", "backend", "-o", "json"]);
    assert_eq!(again.status.code(), Some(3));
    let again: Value = serde_json::from_slice(&again.stdout).unwrap();
    assert_eq!(again["gate"]["id"], id.as_str(), "{again:#}");

    let run = "https://github.com/acme/shop/actions/runs/4242";
    let opened = mesh(&server, &["rollout", "promote", "backend", "--by", run]);
    let said = String::from_utf8_lossy(&opened.stdout);
    assert!(
        opened.status.success(),
        "{}",
        String::from_utf8_lossy(&opened.stderr)
    );
    assert!(
        said.contains("confirm-promotion gate approval opened by") && said.contains(run),
        "{said}"
    );
    let done = mesh(
        &server,
        &[
            "rollout",
            "status",
            "backend",
            "--watch",
            "--timeout",
            "2m",
            "-o",
            "json",
        ],
    );
    let done_report: Value = serde_json::from_slice(&done.stdout).unwrap();
    assert_eq!(done.status.code(), Some(0), "{done_report:#}");
    assert_eq!(done_report["result"], "promoted");
    assert_eq!(done_report["gate"]["openedBy"], run, "{done_report:#}");
    assert_eq!(done_report["gate"]["waiting"], false);

    let history = mesh(&server, &["rollout", "history", "backend"]);
    let history = String::from_utf8_lossy(&history.stdout);
    assert!(
        history
            .lines()
            .any(|l| l.contains("GateOpened") && l.contains(run)),
        "{history}"
    );
    assert_eq!(
        history
            .lines()
            .filter(|l| l.contains("GateWaiting"))
            .count(),
        1,
        "{history}"
    );
    assert!(!history.contains("ManualPromotion"), "{history}");
    assert!(history.contains("Succeeded"), "{history}");
    let w = mesh(&server, &["get", "workload", "backend", "-o", "json"]);
    let w: Value = serde_json::from_slice(&w.stdout).unwrap();
    assert_eq!(w["status"]["primary"], "v3", "{w:#}");

    terminate(&mut mesh_up);
    let status = mesh_up.child().exited_within(Duration::from_secs(30)).await;
    assert_eq!(status.and_then(|s| s.code()), Some(0));
}
