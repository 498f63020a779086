//! The embedded mesh's proxies through a real Prometheus, found by the documented scrape config
//! (HTTP service discovery from the control plane), queried with Flagger's built-in Linkerd
//! queries, and checked against the load generator's own counts; the rollout metrics move with
//! the Canary; and every panel of the Grafana dashboards in deploy/grafana returns data while a
//! meshed caller calls a Canary's workload mid-rollout.
//!
//! Everything is real: `mesh up` supervises `mesh-demo-app` with a `mesh-proxy` beside each
//! instance; `mesh-loadgen` sends to the canary's proxy; Debian's `prometheus` scrapes.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stderr)]

use std::{
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
};

use mesh_core::{
    exposition,
    metrics::{self, LATENCY_BUCKETS_MS, label},
    prometheus::embedded_scrape_config,
    proxy_api::{HTTP_SD_PATH, ScrapeTarget},
};
use mesh_test_support::{
    assert_eventually,
    mesh::mesh_up,
    process::{MeshProcess, workspace_bin},
    prometheus::Prometheus,
};
use serde_json::Value;

/// The demo app's configured latency: median and p99, in milliseconds.
const MEDIAN_MS: f64 = 40.0;
const P99_MS: f64 = 150.0;
/// One request in ten fails on v2, the canary.
const ERROR_RATE: f64 = 0.1;

/// Flagger's built-in `request-success-rate` for the Linkerd provider: the inbound non-failure
/// share of the target's responses, in percent.
fn flagger_success_rate(namespace: &str, target: &str, interval: &str) -> String {
    let sel = format!(r#"namespace="{namespace}",deployment=~"{target}",direction="inbound""#);
    format!(
        r#"sum(rate(response_total{{{sel},classification!="failure"}}[{interval}])) / sum(rate(response_total{{{sel}}}[{interval}])) * 100"#
    )
}

/// Flagger's built-in `request-duration` for the Linkerd provider: the inbound p99, in ms.
fn flagger_request_duration(namespace: &str, target: &str, interval: &str) -> String {
    let sel = format!(r#"namespace="{namespace}",deployment=~"{target}",direction="inbound""#);
    format!(
        "histogram_quantile(0.99, sum(rate(response_latency_ms_bucket{{{sel}}}[{interval}])) by (le))"
    )
}

fn manifest(dir: &Path, version: &str) -> PathBuf {
    let app = |v: &str| {
        format!(
            "[mesh-demo-app, --version, {v}, --latency-ms, \"{MEDIAN_MS}\", --latency-p99-ms, \"{P99_MS}\"]"
        )
    };
    let text = format!(
        "apiVersion: workloads.mesh.dev/v1alpha1
kind: Workload
metadata:
  name: backend
spec:
  port: 9898
  version: {version}
  versions:
    v1:
      command: {}
    v2:
      command: {}
      env:
        DEMO_ERROR_RATE: \"{ERROR_RATE}\"
---
apiVersion: rollouts.mesh.dev/v1alpha1
kind: Canary
metadata:
  name: backend
spec:
  targetRef:
    apiVersion: workloads.mesh.dev/v1alpha1
    kind: Workload
    name: backend
  service:
    port: 9898
  analysis:
    # The canary holds its first step for the whole test: no analysis runs before it ends.
    interval: 10m
    threshold: 5
    stepWeight: 50
    maxWeight: 50
",
        app("v1"),
        app("v2"),
    );
    let path = dir.join(format!("mesh-{version}.yaml"));
    std::fs::write(&path, text).unwrap();
    path
}

fn mesh(server: &str, args: &[&str]) -> Output {
    Command::new(workspace_bin("mesh").unwrap())
        .args(args)
        .env("MESH_SERVER", server)
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

fn canary(server: &str) -> Value {
    let out = mesh(server, &["get", "canary", "backend", "-o", "json"]);
    serde_json::from_slice(&out.stdout).unwrap_or_default()
}

async fn query(prometheus: &Prometheus, promql: &str) -> Option<f64> {
    let rsp = prometheus.client().query(promql).get().await.ok()?;
    let vector = rsp.data().as_vector()?;
    let value = vector.first()?.sample().value();
    value.is_finite().then_some(value)
}

/// The inbound responses on one proxy's `/metrics`: (all, failures).
async fn direct_scrape(admin: &str) -> (f64, f64) {
    let text = mesh_test_support::http_client()
        .get(format!("http://{admin}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let samples = exposition::parse(&text).unwrap();
    let inbound = samples.iter().filter(|s| {
        metrics::RESPONSE.is_series(&s.name)
            && s.labels.get(label::DIRECTION).map(String::as_str) == Some("inbound")
    });
    inbound.fold((0.0, 0.0), |(all, failed), s| {
        let failure = s.labels.get(label::CLASSIFICATION).map(String::as_str) == Some("failure");
        (all + s.value, failed + if failure { s.value } else { 0.0 })
    })
}

/// The index of the latency bucket holding `ms` (the `+Inf` bucket is past the last bound).
fn bucket_of(ms: f64) -> usize {
    LATENCY_BUCKETS_MS
        .iter()
        .position(|b| ms <= *b)
        .unwrap_or(LATENCY_BUCKETS_MS.len())
}

/// The tests that run an embedded mesh take turns: two started together sometimes left their
/// Canaries uninitialized past the patience on the 2-core machine.
static ONE_MESH: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// `mesh up` on `file` in `dir`, once its Canary `backend` is initialized, and a real Prometheus
/// scraping it with the documented scrape config: the mesh, its API's URL, the API token's
/// file, the scrape config and Prometheus.
async fn mesh_with_prometheus(
    dir: &Path,
    file: &Path,
) -> (MeshProcess, String, PathBuf, String, Prometheus) {
    let state = dir.join("state");
    let up = mesh_up(&state, file, &[]).unwrap();
    let server = format!("http://{}", up.addr("api"));
    assert_eventually!(canary(&server)["status"]["phase"] == "Initialized");
    let token = state.join("controlplane").join("api-token");
    let scrape = embedded_scrape_config(&server, token.to_str().unwrap(), "1s");
    let prometheus = Prometheus::builder()
        .scrape_config(&scrape)
        .start()
        .await
        .unwrap();
    (up, server, token, scrape, prometheus)
}

#[tokio::test(flavor = "multi_thread")]
async fn flagger_s_linkerd_queries_on_prometheus_match_the_load_generator() {
    let _one_at_a_time = ONE_MESH.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let (mut up, server, token, scrape, prometheus) =
        mesh_with_prometheus(dir.path(), &manifest(dir.path(), "v1")).await;

    // The rollout metrics, scraped from the control plane: Flagger's series before the rollout.
    let weight =
        r#"flagger_canary_weight{job="mesh-controlplane",namespace="default",workload="backend"}"#;
    let primary_weight = r#"flagger_canary_weight{namespace="default",workload="backend-primary"}"#;
    let status = r#"flagger_canary_status{namespace="default",name="backend"}"#;
    assert_eventually!(query(&prometheus, weight).await == Some(0.0));
    assert_eq!(query(&prometheus, primary_weight).await, Some(100.0));
    assert_eq!(query(&prometheus, status).await, Some(1.0));

    // v2 rolls out: the canary arm (Deployment `backend`) starts and holds at 50 %.
    let applied = mesh(
        &server,
        &["apply", "-f", manifest(dir.path(), "v2").to_str().unwrap()],
    );
    assert!(
        applied.status.success(),
        "{}",
        String::from_utf8_lossy(&applied.stderr)
    );
    assert_eventually!(canary(&server)["status"]["canaryWeight"] == 50);
    // ... and the rollout metrics move with it.
    assert_eventually!(query(&prometheus, weight).await == Some(50.0));
    assert_eq!(query(&prometheus, primary_weight).await, Some(50.0));
    assert_eq!(query(&prometheus, status).await, Some(0.0));
    let progressing = r#"mesh_canary_phase{name="backend",phase="Progressing"}"#;
    assert_eq!(query(&prometheus, progressing).await, Some(1.0));
    // The rollout's duration so far grows from one scrape to the next while it runs.
    let analysis = r#"mesh_canary_analysis_seconds{namespace="default",name="backend"}"#;
    assert_eventually!(query(&prometheus, analysis).await.is_some());
    let first = query(&prometheus, analysis).await.unwrap();
    assert_eventually!(query(&prometheus, analysis).await.unwrap_or_default() > first);

    // The control plane lists the canary's proxy for Prometheus, with its deployment.
    let secret = std::fs::read_to_string(&token).unwrap();
    let sd = || async {
        let rsp = mesh_test_support::http_client()
            .get(format!("{server}{HTTP_SD_PATH}"))
            .bearer_auth(secret.trim())
            .send()
            .await
            .ok()?;
        rsp.json::<Vec<ScrapeTarget>>().await.ok()
    };
    let canary_target = || async {
        sd().await?
            .into_iter()
            .find(|t| t.labels.get("__meta_mesh_deployment").map(String::as_str) == Some("backend"))
    };
    assert_eventually!(canary_target().await.is_some());
    let target = canary_target().await.unwrap();
    let admin = target.targets[0].clone();
    let inbound = target.labels["__meta_mesh_addr"].clone();
    assert_eq!(target.labels["__meta_mesh_namespace"], "default");
    assert_eq!(target.labels["__meta_mesh_service"], "backend-canary");
    let up_query = format!(r#"up{{job="mesh-proxy",instance="{admin}"}}"#);
    let targets_api = format!("{}/api/v1/targets", prometheus.url());
    assert_eventually!(
        query(&prometheus, &up_query).await == Some(1.0),
        "Prometheus does not scrape {admin}: {}\n{scrape}",
        mesh_test_support::http_client()
            .get(&targets_api)
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    );

    // The load generator's truth: every status it got from the canary.
    let out = Command::new(workspace_bin("mesh-loadgen").unwrap())
        .args([
            "--url",
            &format!("http://{inbound}/"),
            "--rate",
            "200",
            "--duration",
            "20s",
            "--output",
            "json",
        ])
        .env_remove("HTTP_PROXY")
        .env_remove("http_proxy")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: Value = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find(|r| r["final"] == true)
        .expect("a final report");
    let statuses = report["status"].as_object().unwrap();
    let total: u64 = statuses.values().map(|n| n.as_u64().unwrap()).sum();
    let failed: u64 = statuses
        .iter()
        .filter(|(code, _)| code.parse::<u16>().is_ok_and(|c| c >= 500))
        .map(|(_, n)| n.as_u64().unwrap())
        .sum();
    assert_eq!(report["errors"], 0, "{report}");
    assert!(total > 3000, "{report}");
    #[allow(clippy::cast_precision_loss, reason = "counts far below 2^52")]
    let truth = 100.0 * (total - failed) as f64 / total as f64;

    // The direct scrape counts what the load generator sent, and Prometheus has it all.
    let (scraped, scraped_failed) = direct_scrape(&admin).await;
    #[allow(clippy::cast_precision_loss, reason = "counts far below 2^52")]
    let (sent, sent_failed) = (total as f64, failed as f64);
    assert_eq!((scraped, scraped_failed), (sent, sent_failed));
    let count =
        r#"sum(response_total{namespace="default",deployment="backend",direction="inbound"})"#;
    assert_eventually!(query(&prometheus, count).await == Some(scraped));

    let success = query(
        &prometheus,
        &flagger_success_rate("default", "backend", "1m"),
    )
    .await
    .expect("the success-rate query returns a value");
    eprintln!(
        "request-success-rate: Prometheus {success:.3} %, load generator {truth:.3} % \
         ({total} responses, {failed} failed)"
    );
    assert!((success - truth).abs() <= 0.5, "{success} vs {truth}");

    let p99 = query(
        &prometheus,
        &flagger_request_duration("default", "backend", "1m"),
    )
    .await
    .expect("the request-duration query returns a value");
    eprintln!(
        "request-duration p99: Prometheus {p99:.1} ms, configured {P99_MS} ms, load generator {} ms",
        report["p99_ms"]
    );
    let (got, want) = (bucket_of(p99), bucket_of(P99_MS));
    assert!(
        got.abs_diff(want) <= 1,
        "p99 {p99} ms is in bucket {got}, the configured {P99_MS} ms in {want}"
    );

    up.child().terminate();
    drop(prometheus);
}

/// The panels of deploy/grafana whose query, with the variables filled in from `vars`, returns
/// no series (each as "file: title: query"), and how many queries were run.
async fn empty_panels(prometheus: &Prometheus, vars: &[(&str, &str)]) -> (Vec<String>, usize) {
    let dashboards = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/grafana");
    let (mut empty, mut queries) = (Vec::new(), 0);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dashboards)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    for path in files {
        let dashboard: Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        for panel in dashboard["panels"].as_array().unwrap() {
            for target in panel["targets"].as_array().unwrap() {
                let mut promql = target["expr"].as_str().unwrap().to_string();
                for (var, value) in vars {
                    promql = promql.replace(var, value);
                }
                assert!(!promql.contains('$'), "a variable is left in {promql}");
                queries += 1;
                let answer = prometheus.client().query(promql.as_str()).get().await;
                let series = answer
                    .as_ref()
                    .ok()
                    .and_then(|a| a.data().as_vector())
                    .map_or(0, |v| v.len());
                if series == 0 {
                    empty.push(format!(
                        "{}: {}: {promql}",
                        path.file_name().unwrap().to_string_lossy(),
                        panel["title"]
                    ));
                }
            }
        }
    }
    (empty, queries)
}

/// The example mesh's shape, rolled out fast: `frontend` (meshed) calls `backend`, whose Canary
/// steps to 50 % with two gates; `loadgen` calls `frontend`.
fn meshed_caller_manifest(dir: &Path, version: &str) -> PathBuf {
    let text = format!(
        "apiVersion: workloads.mesh.dev/v1alpha1
kind: Workload
metadata:
  name: frontend
spec:
  port: 8080
  version: v1
  versions:
    v1:
      command: [mesh-demo-app, --version, v1, --downstream, \"http://backend.default:9898/\"]
---
apiVersion: workloads.mesh.dev/v1alpha1
kind: Workload
metadata:
  name: backend
spec:
  port: 9898
  version: {version}
  versions:
    v1:
      command: [mesh-demo-app, --version, v1, --latency-ms, \"5\"]
    v2:
      command: [mesh-demo-app, --version, v2, --latency-ms, \"5\"]
---
apiVersion: workloads.mesh.dev/v1alpha1
kind: Workload
metadata:
  name: loadgen
spec:
  version: v1
  versions:
    v1:
      command: [mesh-loadgen, --url, \"http://frontend.default:8080/\", --rate, \"100\"]
---
apiVersion: rollouts.mesh.dev/v1alpha1
kind: Canary
metadata:
  name: backend
spec:
  targetRef:
    apiVersion: workloads.mesh.dev/v1alpha1
    kind: Workload
    name: backend
  service:
    port: 9898
  progressDeadlineSeconds: 600
  analysis:
    interval: 2s
    threshold: 5
    stepWeight: 50
    maxWeight: 50
    metrics:
      - name: request-success-rate
        thresholdRange: {{min: 90}}
        interval: 10s
      - name: request-duration
        thresholdRange: {{max: 5000}}
        interval: 10s
"
    );
    let path = dir.join(format!("meshed-{version}.yaml"));
    std::fs::write(&path, text).unwrap();
    path
}

#[tokio::test(flavor = "multi_thread")]
async fn every_grafana_panel_returns_data_over_a_meshed_caller_and_a_rollout() {
    let _one_at_a_time = ONE_MESH.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let (mut up, server, _, _, prometheus) =
        mesh_with_prometheus(dir.path(), &meshed_caller_manifest(dir.path(), "v1")).await;

    // v2 steps to 50 %; once its gates have been judged, the rollout is paused there, so every
    // series the dashboards read exists at once: both arms, the caller's split and its gates.
    let applied = mesh(
        &server,
        &[
            "apply",
            "-f",
            meshed_caller_manifest(dir.path(), "v2").to_str().unwrap(),
        ],
    );
    assert!(
        applied.status.success(),
        "{}",
        String::from_utf8_lossy(&applied.stderr)
    );
    assert_eventually!(
        canary(&server)["status"]["canaryWeight"] == 50
            && canary(&server)["status"]["analysis"]
                .as_array()
                .is_some_and(|gates| gates.iter().filter(|g| g["canary"].is_number()).count() >= 2),
        "the canary never reached 50 % with two gates' values: {}",
        canary(&server)["status"]
    );
    let paused = mesh(&server, &["rollout", "pause", "backend"]);
    assert!(
        paused.status.success(),
        "{}",
        String::from_utf8_lossy(&paused.stderr)
    );
    let vars = [
        ("$namespace", "default"),
        ("$deployment", "backend"),
        // A workload without a Canary runs as its primary arm, named as Flagger names it.
        ("$caller", "frontend-primary"),
        ("$canary", "backend"),
        ("$__rate_interval", "1m"),
    ];
    assert_eventually!(
        empty_panels(&prometheus, &vars).await.0.is_empty(),
        "panels without data: {:#?}",
        empty_panels(&prometheus, &vars).await.0
    );
    let (_, queries) = empty_panels(&prometheus, &vars).await;
    eprintln!("{queries} Grafana panel queries returned data");
    assert!(queries >= 17, "{queries}");

    up.child().terminate();
    drop(prometheus);
}

/// Both scrape configs, as `mesh install --prometheus` and docs/metrics.md give them, are
/// accepted by the Prometheus that runs the test above (its `promtool check config`). Debian
/// builds Prometheus without Kubernetes discovery, so in the cluster's config the pod discovery
/// is swapped for a static target: what is checked there is the relabeling.
#[test]
fn the_rendered_scrape_configs_are_valid_prometheus_config() {
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("api-token");
    std::fs::write(&token, "secret\n").unwrap();
    let out = Command::new(workspace_bin("mesh").unwrap())
        .args(["install", "--prometheus"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let docs: Vec<Value> = serde_yaml_docs(&String::from_utf8_lossy(&out.stdout));
    let cluster = docs
        .iter()
        .find(|d| d["kind"] == "ConfigMap" && d["metadata"]["name"] == "mesh-prometheus")
        .and_then(|d| d["data"]["scrape-configs.yaml"].as_str())
        .expect("mesh install --prometheus renders the scrape config")
        .replacen(
            "kubernetes_sd_configs:\n    - role: pod\n",
            "static_configs:\n    - targets: [\"127.0.0.1:4191\"]\n",
            1,
        );
    assert!(cluster.contains("static_configs"), "{cluster}");
    let embedded = embedded_scrape_config("http://127.0.0.1:7000", token.to_str().unwrap(), "10s");
    for (name, jobs) in [("cluster", cluster), ("embedded", embedded)] {
        let indented: String = jobs.lines().map(|l| format!("  {l}\n")).collect();
        let path = dir.path().join(format!("{name}.yml"));
        std::fs::write(&path, format!("scrape_configs:\n{indented}")).unwrap();
        let check = Command::new("promtool")
            .args(["check", "config", path.to_str().unwrap()])
            .output()
            .expect("promtool (Debian's prometheus package) runs");
        assert!(
            check.status.success(),
            "{name}: {}{}",
            String::from_utf8_lossy(&check.stdout),
            String::from_utf8_lossy(&check.stderr)
        );
    }
}

fn serde_yaml_docs(text: &str) -> Vec<Value> {
    text.split("\n---\n")
        .filter_map(|d| serde_yaml::from_str::<Value>(d).ok())
        .filter(|d| !d.is_null())
        .collect()
}
