//! `mesh stat`, `routes` and `edges` in a cluster: the resources from a real kube-apiserver (the
//! Deployments and their pods, meshed or not) and the traffic from a real Prometheus (Debian's)
//! scraping real proxies, as a user's would. The numbers agree with the load generator's own
//! counts: success rate within 0.5 points, RPS within 5 %.
//!
//! No kubelet runs: the proxies run here with the labels the injector gives a pod's proxy, and
//! the pods are objects in the API server. Needs `mesh-loadgen` (`cargo build -p mesh-demo
//! --bins`) and `prometheus`; scripts/test provides both.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Output;
use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::Api;
use kube::api::PostParams;
use mesh_test_support::apps::app;
use mesh_test_support::assert_eventually;
use mesh_test_support::kube::KubeApiServer;
use mesh_test_support::prometheus::{Prometheus, ScrapeJob};
use mesh_test_support::proxies::{Sidecar, proxy};
use serde_json::{Value, json};

const NS: &str = "shop";

async fn create<K>(api: &Api<K>, value: Value)
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + serde::Serialize + std::fmt::Debug,
{
    let object: K = serde_json::from_value(value).unwrap();
    api.create(&PostParams::default(), &object).await.unwrap();
}

fn deployment(name: &str) -> Value {
    json!({
        "metadata": {"name": name},
        "spec": {"selector": {"matchLabels": {"app": name}},
                 "template": {"metadata": {"labels": {"app": name}},
                              "spec": {"containers": [{"name": "app", "image": format!("{name}:1")}]}}},
    })
}

fn pod(name: &str, app: &str, meshed: bool) -> Value {
    let annotations = if meshed {
        json!({mesh_controlplane::inject::INJECTED_ANNOTATION: "mesh-proxy:dev"})
    } else {
        json!({})
    };
    json!({
        "metadata": {"name": name, "labels": {"app": app}, "annotations": annotations},
        "spec": {"containers": [{"name": "app", "image": format!("{app}:1")}]},
    })
}

/// Runs `mesh` with `args` against the cluster and Prometheus; its JSON answer.
async fn mesh(kube: &KubeApiServer, prometheus: &str, args: &[&str]) -> Value {
    let out: Output = tokio::process::Command::new(env!("CARGO_BIN_EXE_mesh"))
        .args(args)
        .args(["-n", NS, "-o", "json", "--kubeconfig"])
        .arg(kube.kubeconfig())
        .args(["--prometheus", prometheus])
        .env("MESH_CONFIG_DIR", kube.dir())
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "mesh {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// The load generator's final summary: (responses, ok, seconds).
fn summary(out: &std::process::Output) -> (f64, f64, f64) {
    let stdout = String::from_utf8_lossy(&out.stdout);
    let last: Value = serde_json::from_str(
        stdout
            .lines()
            .rev()
            .find(|l| l.contains("\"final\":true"))
            .unwrap_or_else(|| panic!("no summary: {stdout}")),
    )
    .unwrap();
    let responses: f64 = last["status"]
        .as_object()
        .unwrap()
        .values()
        .map(|v| v.as_f64().unwrap())
        .sum();
    (
        responses,
        last["ok"].as_f64().unwrap(),
        last["t"].as_f64().unwrap(),
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn stat_routes_and_edges_read_the_cluster_and_prometheus_and_agree_with_the_load() {
    let kube = KubeApiServer::start()
        .await
        .expect("start etcd + kube-apiserver");
    let client = kube.client();
    create(
        &Api::<Namespace>::all(client.clone()),
        json!({"metadata": {"name": NS}}),
    )
    .await;
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), NS);
    for name in ["web", "loadgen", "idle"] {
        create(&deployments, deployment(name)).await;
    }
    // web runs two pods, one of them meshed; loadgen one, meshed; idle none.
    let pods: Api<Pod> = Api::namespaced(client.clone(), NS);
    create(&pods, pod("web-1", "web", true)).await;
    create(&pods, pod("web-2", "web", false)).await;
    create(&pods, pod("loadgen-1", "loadgen", true)).await;

    // web's proxy in front of an app failing one request in ten; loadgen's proxy sending to it,
    // each labelled as the injector labels a pod's proxy.
    let upstream = app("v1")
        .fail_rate(0.1)
        .failing_evenly()
        .await
        .unwrap()
        .addr();
    let web = proxy()
        .app(upstream)
        .service(&format!("web.{NS}:80"))
        .env("MESH_PROXY_WORKLOAD_NAMESPACE", NS)
        .env("MESH_PROXY_WORKLOAD_DEPLOYMENT", "web")
        .env("MESH_PROXY_WORKLOAD_POD", "web-1")
        .run()
        .unwrap();
    let loadgen = proxy()
        .outbound(format!(
            r#"
routes:
  - parent: web.{NS}:80
    rules:
      - name: main
        matches: [{{path: {{type: PathPrefix, value: /}}}}]
        backends: [{{service: web.{NS}:80, weight: 1}}]
endpoints:
  - service: web.{NS}:80
    endpoints: [{{addr: "{}"}}]
"#,
            web.addr("inbound")
        ))
        .env("MESH_PROXY_WORKLOAD_NAMESPACE", NS)
        .env("MESH_PROXY_WORKLOAD_DEPLOYMENT", "loadgen")
        .env("MESH_PROXY_WORKLOAD_POD", "loadgen-1")
        .run()
        .unwrap();
    let prometheus = Prometheus::builder()
        .scrape(
            ScrapeJob::new("proxies", [web.addr("admin"), loadgen.addr("admin")])
                .interval(Duration::from_millis(500)),
        )
        .start()
        .await
        .unwrap();
    let url = prometheus.url().to_string();

    // Every series exists and Prometheus has a sample of it before the measured load (a
    // series' first sample is where increase() starts counting).
    let warm = loadgen.client();
    for _ in 0..100 {
        warm.get(format!("http://web.{NS}:80/"))
            .send()
            .await
            .unwrap();
    }
    assert_eventually!(
        reqwest::get(format!(
            "{url}/api/v1/query?query=sum(response_total{{direction=\"inbound\",deployment=\"web\"}})"
        ))
        .await
        .unwrap()
        .json::<Value>()
        .await
        .unwrap()["data"]["result"][0]["value"][1]
            .as_str()
            .and_then(|v| v.parse::<f64>().ok())
            .is_some_and(|v| v >= 100.0),
        "prometheus never scraped the warm-up"
    );
    tokio::time::sleep(Duration::from_secs(1)).await;

    // The measured load: 200 req/s for 16 s through loadgen's proxy.
    let loadgen_bin = mesh_test_support::process::workspace_bin("mesh-loadgen").unwrap();
    let load = tokio::process::Command::new(loadgen_bin)
        .args(["--url", &format!("http://web.{NS}:80/"), "--rate", "200"])
        .args([
            "--duration",
            "16s",
            "--output",
            "json",
            "--report-every",
            "16s",
        ])
        .env("HTTP_PROXY", format!("http://{}", loadgen.addr("outbound")))
        .output();
    let load = tokio::spawn(load);

    // RPS while the load runs, over the last 10 seconds.
    tokio::time::sleep(Duration::from_secs(13)).await;
    let during = mesh(&kube, &url, &["stat", "deploy", "web", "-t", "10s"]).await;

    let out = load.await.unwrap().unwrap();
    let (responses, ok, secs) = summary(&out);
    let rate = responses / secs;
    let sr = ok / responses;
    let rps = during[0]["golden"]["rps"].as_f64().unwrap();
    eprintln!("mesh stat: {rps:.1} req/s; the load generator: {rate:.1} req/s");
    assert!(
        (rps - rate).abs() / rate < 0.05,
        "{rps} vs {rate}: {during}"
    );

    // Until Prometheus has scraped past the end of the load; then the whole load's window.
    let window = "2m";
    let requests_of = |rows: &Value, name: &str| {
        rows.as_array()
            .unwrap()
            .iter()
            .find(|r| r["name"] == name)
            .map_or(0.0, |r| r["golden"]["requests"].as_f64().unwrap_or(0.0))
    };
    for _ in 0..60 {
        let stat = mesh(&kube, &url, &["stat", "deploy", "-t", window]).await;
        if requests_of(&stat, "web") >= (responses + 100.0) * 0.95 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let stat = mesh(&kube, &url, &["stat", "deploy", "-t", window]).await;
    let rows = stat.as_array().unwrap();
    let row = |name: &str| rows.iter().find(|r| r["name"] == name).unwrap();
    // The warm-up's 100 requests are in the window too, one in ten failing like the rest.
    let total = responses + 100.0;
    let web_row = row("web");
    let requests = web_row["golden"]["requests"].as_f64().unwrap();
    let failures = web_row["golden"]["failures"].as_f64().unwrap();
    eprintln!(
        "mesh stat: {requests:.0} requests, success {:.2} %; the load generator: {total} \
         requests, success {:.2} %",
        100.0 * (1.0 - failures / requests),
        100.0 * sr
    );
    assert!(
        (requests - total).abs() / total < 0.05,
        "{requests} vs {total}: {stat}"
    );
    assert!(
        ((1.0 - failures / requests) - sr).abs() * 100.0 <= 0.5,
        "{stat} vs success rate {sr}"
    );
    // Meshed and total pods come from the cluster; a Deployment without traffic is listed.
    assert_eq!(
        (web_row["meshed"].as_u64(), web_row["total"].as_u64()),
        (Some(1), Some(2)),
        "{stat}"
    );
    assert_eq!(
        (
            row("loadgen")["meshed"].as_u64(),
            row("loadgen")["total"].as_u64()
        ),
        (Some(1), Some(1)),
        "{stat}"
    );
    assert_eq!(
        (
            row("idle")["meshed"].as_u64(),
            row("idle")["total"].as_u64()
        ),
        (Some(0), Some(0)),
        "{stat}"
    );

    // As a user reads it.
    let table = tokio::process::Command::new(env!("CARGO_BIN_EXE_mesh"))
        .args(["stat", "deploy", "-n", NS, "-t", window, "--kubeconfig"])
        .arg(kube.kubeconfig())
        .args(["--prometheus", &url])
        .output()
        .await
        .unwrap();
    eprintln!("{}", String::from_utf8_lossy(&table.stdout));

    let routes = mesh(&kube, &url, &["routes", "web", "-t", window]).await;
    let route = &routes[0];
    assert_eq!(route["route"], "main", "{routes}");
    let route_sr = route["golden"]["successRate"].as_f64().unwrap();
    assert!((route_sr - sr).abs() * 100.0 <= 0.5, "{routes} vs {sr}");
    let route_requests = route["golden"]["requests"].as_f64().unwrap();
    assert!(
        (route_requests - total).abs() / total < 0.05,
        "{route_requests} vs {total}: {routes}"
    );

    let edges = mesh(&kube, &url, &["edges", "-t", window]).await;
    assert!(
        edges
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["src"] == "loadgen" && e["dst"] == "web"),
        "{edges}"
    );

    // Without Prometheus, a cluster's metrics have nowhere to come from: the error says so.
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_mesh"))
        .args(["stat", "deploy", "-n", NS, "--kubeconfig"])
        .arg(kube.kubeconfig())
        .env_remove("MESH_PROMETHEUS_URL")
        .output()
        .await
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("give --prometheus URL"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
