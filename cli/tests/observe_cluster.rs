//! `mesh stat`, `routes`, `edges` and `dashboard` in a cluster: the resources from a real
//! kube-apiserver (the Deployments and their pods, meshed or not, and a Canary) and the traffic
//! from a real Prometheus (Debian's) scraping real proxies, as a user's would. The numbers agree
//! with the load generator's own counts: success rate within 0.5 points, RPS within 5 %; the
//! dashboard's server-sent data shows the same counts and the cluster's Canary, and its button
//! acts on the Canary in the API server.
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
async fn stat_routes_edges_and_the_dashboard_read_the_cluster_and_prometheus_and_agree_with_the_load()
 {
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

    dashboard_shows_the_cluster(&kube, &url, window, total, sr).await;

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

/// `mesh dashboard --kubeconfig --prometheus`: its server-sent data has web's requests and
/// success rate as the load generator counted them (`total` requests in `window`, success rate
/// `sr`), and the cluster's Canary; its pause button suspends that Canary in the API server;
/// its taps look for the control plane through the API server.
#[allow(
    clippy::print_stderr,
    reason = "the figures measured go in the test's log"
)]
async fn dashboard_shows_the_cluster(
    kube: &KubeApiServer,
    url: &str,
    window: &str,
    total: f64,
    sr: f64,
) {
    use tokio::io::AsyncBufReadExt as _;

    let canaries: Api<mesh_crds::Canary> = Api::namespaced(kube.client(), NS);
    create(
        &canaries,
        json!({
            "apiVersion": "rollouts.mesh.dev/v1alpha1", "kind": "Canary",
            "metadata": {"name": "web", "namespace": NS},
            "spec": {
                "targetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "web"},
                "service": {"port": 80},
                "analysis": {"interval": "30s", "threshold": 5, "stepWeight": 10, "maxWeight": 50},
            },
        }),
    )
    .await;
    let status = json!({"status": {"phase": "Progressing", "canaryWeight": 20, "iterations": 2}});
    canaries
        .patch_status(
            "web",
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(&status),
        )
        .await
        .unwrap();

    let mut dashboard = tokio::process::Command::new(env!("CARGO_BIN_EXE_mesh"))
        .args(["dashboard", "--addr", "127.0.0.1:0", "-t", window, "-n", NS])
        .arg("--kubeconfig")
        .arg(kube.kubeconfig())
        .args(["--prometheus", url])
        .env("MESH_CONFIG_DIR", kube.dir())
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = tokio::io::BufReader::new(dashboard.stdout.take().unwrap()).lines();
    let link = loop {
        let line = lines
            .next_line()
            .await
            .unwrap()
            .expect("mesh dashboard ended before printing its link");
        if let Some(link) = line.strip_prefix("mesh dashboard: ") {
            break link.to_string();
        }
    };
    let base = link.split("/login").next().unwrap().to_string();
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .no_proxy()
        .build()
        .unwrap();

    // Without signing in, nothing; with the printed link, a session.
    let refused = http.get(format!("{base}/api/events")).send().await.unwrap();
    assert_eq!(refused.status(), reqwest::StatusCode::UNAUTHORIZED);
    // A cluster has no API token, so nothing signs in by one.
    let by_token = http
        .get(format!("{base}/login?token="))
        .send()
        .await
        .unwrap();
    assert_eq!(by_token.status(), reqwest::StatusCode::UNAUTHORIZED);
    let login = http.get(&link).send().await.unwrap();
    let cookie = login
        .headers()
        .get(reqwest::header::SET_COOKIE)
        .expect("no session cookie")
        .to_str()
        .unwrap()
        .split(';')
        .next()
        .unwrap()
        .to_string();

    // The first tick of the pages' event stream.
    let mut events = http
        .get(format!("{base}/api/events"))
        .header(reqwest::header::COOKIE, &cookie)
        .send()
        .await
        .unwrap();
    assert!(events.status().is_success(), "{}", events.status());
    let mut buffer = String::new();
    let tick: Value = loop {
        let chunk = events
            .chunk()
            .await
            .unwrap()
            .expect("the event stream ended");
        buffer.push_str(&String::from_utf8_lossy(&chunk));
        if let Some(end) = buffer.find("\n\n") {
            let data = buffer[..end]
                .lines()
                .filter_map(|l| l.strip_prefix("data:"))
                .map(str::trim_start)
                .collect::<String>();
            break serde_json::from_str(&data).unwrap();
        }
    };
    drop(events);

    let web = tick["workloads"]
        .as_array()
        .unwrap_or_else(|| panic!("no workloads: {tick}"))
        .iter()
        .find(|r| r["name"] == "web" && r["namespace"] == NS)
        .unwrap_or_else(|| panic!("no row of web: {tick}"));
    let requests = web["golden"]["requests"].as_f64().unwrap();
    let failures = web["golden"]["failures"].as_f64().unwrap();
    eprintln!(
        "dashboard: {requests:.0} requests, success {:.2} %; the load generator: {total} \
         requests, success {:.2} %",
        100.0 * (1.0 - failures / requests),
        100.0 * sr
    );
    assert!(
        (requests - total).abs() / total < 0.05,
        "{requests} vs {total}: {web}"
    );
    assert!(
        ((1.0 - failures / requests) - sr).abs() * 100.0 <= 0.5,
        "{web} vs {sr}"
    );
    assert_eq!(
        (web["meshed"].as_u64(), web["total"].as_u64()),
        (Some(1), Some(2)),
        "{web}"
    );
    assert!(
        tick["edges"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["src"] == "loadgen" && e["dst"] == "web"),
        "{tick}"
    );
    assert!(
        tick["routes"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["route"] == "main"),
        "{tick}"
    );
    let canary = tick["canaries"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "web")
        .unwrap_or_else(|| panic!("no Canary web: {tick}"));
    assert_eq!(canary["namespace"], NS, "{canary}");
    assert_eq!(canary["phase"], "Progressing", "{canary}");
    assert_eq!(canary["canaryWeight"], 20, "{canary}");

    // The pause button suspends the Canary in the API server, as `mesh rollout pause` does.
    let paused = http
        .post(format!("{base}/api/canaries/web/pause"))
        .header(reqwest::header::COOKIE, &cookie)
        .send()
        .await
        .unwrap();
    let status = paused.status();
    assert!(
        status.is_success(),
        "{status}: {}",
        paused.text().await.unwrap()
    );
    assert!(canaries.get("web").await.unwrap().spec.suspend);

    // Taps go through a port-forward to the control plane, as `mesh tap --kube`'s do; this
    // cluster runs none, and the page is told so.
    let tap = http
        .get(format!("{base}/api/tap?workload=web"))
        .header(reqwest::header::COOKIE, &cookie)
        .send()
        .await
        .unwrap();
    assert_eq!(tap.status(), reqwest::StatusCode::BAD_GATEWAY);
    let body = tap.text().await.unwrap();
    assert!(body.contains("no ready control plane pod"), "{body}");

    dashboard.kill().await.unwrap();
}

/// `mesh tap --kubeconfig` finds the control plane through the API server by itself: with no
/// control plane pod it says so, naming the label and namespace it looked in; with a ready one
/// it asks the API server for a port-forward to that pod. (The forward itself needs a kubelet,
/// which this API server has none of: the API server's refusal is what the user sees here.)
#[tokio::test(flavor = "multi_thread")]
async fn tap_finds_the_control_plane_through_the_api_server() {
    let kube = KubeApiServer::start()
        .await
        .expect("start etcd + kube-apiserver");
    let client = kube.client();
    let tap = || async {
        let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_mesh"))
            .args(["tap", "web", "-n", NS, "--kubeconfig"])
            .arg(kube.kubeconfig())
            .env("MESH_CONFIG_DIR", kube.dir())
            .output()
            .await
            .unwrap();
        assert!(!out.status.success());
        String::from_utf8_lossy(&out.stderr).to_string()
    };
    let stderr = tap().await;
    assert!(
        stderr.contains(
            "no ready control plane pod (app.kubernetes.io/name=mesh-controlplane) in namespace \
             mesh-system"
        ),
        "{stderr}"
    );

    create(
        &Api::<Namespace>::all(client.clone()),
        json!({"metadata": {"name": "mesh-system"}}),
    )
    .await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), "mesh-system");
    for name in ["mesh-controlplane-b", "mesh-controlplane-a"] {
        create(
            &pods,
            json!({
                "metadata": {"name": name, "labels": {"app.kubernetes.io/name": "mesh-controlplane"}},
                "spec": {"containers": [{"name": "controlplane", "image": "controlplane:1"}]},
            }),
        )
        .await;
    }
    // Only b is ready: the forward goes to it.
    let ready = json!({"status": {"phase": "Running",
                                  "conditions": [{"type": "Ready", "status": "True"}]}});
    pods.patch_status(
        "mesh-controlplane-b",
        &kube::api::PatchParams::default(),
        &kube::api::Patch::Merge(&ready),
    )
    .await
    .unwrap();
    let stderr = tap().await;
    eprintln!("{stderr}");
    assert!(
        stderr.contains("port-forwarding to pod mesh-system/mesh-controlplane-b:4180"),
        "{stderr}"
    );
}
