//! The Kubernetes driver and controller loop against a real kube-apiserver + etcd, judged on
//! real proxy metrics through a real Prometheus, and read back with the real kubectl.
//!
//! Real: the apiserver and etcd, the controller (in-process, and the `mesh-rollout-controller`
//! binary), Prometheus, the caller's sidecar (`mesh-proxy`, started in-process through
//! `mesh_test_support::proxies`, which records the golden metrics the judge reads), the HTTP
//! requests and the apps answering them (`mesh_test_support::apps`), kubectl.
//!
//! Stand-ins, because no kubelet, controller-manager or mesh control plane for Kubernetes runs
//! here:
//! - the test plays the node: [`KubeApiServer::play_node`] keeps every Deployment's status at
//!   "all replicas updated and available" for its latest generation, and the pods of a
//!   Deployment are the local app of its image (`podinfo:1`, `podinfo:2`), published as an
//!   EndpointSlice of the Service that selects them (none at zero replicas);
//! - the proxy's control plane is a small in-test server speaking the proxy API's watch
//!   streams, serving the HTTPRoute's weights and the EndpointSlices' addresses as it reads them
//!   from the apiserver every 100 ms, behind the proxy API's mTLS with a stand-in CA that
//!   certifies the proxy (`mesh_test_support::proxy_api::StandIn`);
//! - the apps are local HTTP servers without their own sidecar (endpoints are unmeshed), so
//!   only the caller side of each request is proxied.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::events::v1::Event as K8sEvent;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::{Client, CustomResourceExt};
use mesh_core::proxy_api::ServiceRef;
use mesh_crds::{Canary, CanaryPhase, HttpRoute};
use mesh_rollout_controller::judge::JudgeConfig;
use mesh_rollout_controller::kubernetes::{self, ElectionConfig, FINALIZER, Settings, WindowFloor};
use mesh_rollout_controller::owned::{REVISION_ANNOTATION, route_weights};
use mesh_rollout_controller::sources::PrometheusSource;
use mesh_test_support::proxies::{InProcessProxy, Sidecar, proxy};
use mesh_test_support::proxy_api::{StandIn, canary_split, unmeshed_endpoints, watch_line};
use mesh_test_support::{
    apps::app,
    assert_eventually,
    kube::KubeApiServer,
    prometheus::{Prometheus, ScrapeJob},
};
use serde_json::json;
use tokio::sync::watch;

const NS: &str = "default";

/// The two versions the test "deploys": each image runs as one local app process.
const IMAGES: [&str; 2] = ["podinfo:1", "podinfo:2"];

fn svc(name: &str) -> ServiceRef {
    ServiceRef::new(name, NS, 9898)
}

/// What the stand-in control plane serves: the HTTPRoute's weights and each backend's
/// EndpointSlice addresses, as read from the apiserver.
#[derive(Clone, Debug, Default, PartialEq)]
struct Served {
    version: u64,
    weights: Option<(u32, u32)>,
    endpoints: BTreeMap<String, Vec<SocketAddr>>,
}

fn answer(path: &str, query: &str, st: &Served) -> Bytes {
    if path == "/v1/watch/routes" {
        let table = st
            .weights
            .map(|weights| canary_split(&svc("podinfo"), "podinfo", weights));
        watch_line(st.version, table.filter(|_| query.contains("podinfo.")))
    } else {
        let service: ServiceRef = query.trim_start_matches("service=").parse().unwrap();
        let endpoints = st
            .endpoints
            .get(service.name.as_str())
            .map(|addrs| unmeshed_endpoints(service, addrs.iter().copied()));
        watch_line(st.version, endpoints)
    }
}

/// Plays the node's part for traffic: the pods of each Deployment are the app of its image,
/// published as an EndpointSlice of the Service that selects them (none at zero replicas).
async fn publish_endpoints(client: &Client, apps: &BTreeMap<&str, SocketAddr>) {
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), NS);
    let slices: Api<EndpointSlice> = Api::namespaced(client.clone(), NS);
    for (deployment, service) in [
        ("podinfo-primary", "podinfo-primary"),
        ("podinfo", "podinfo-canary"),
    ] {
        let Ok(Some(d)) = deployments.get_opt(deployment).await else {
            continue;
        };
        let running = d.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1) > 0;
        let addr = apps.get(image(&d).as_str()).filter(|_| running);
        let slice = json!({
            "apiVersion": "discovery.k8s.io/v1",
            "kind": "EndpointSlice",
            "metadata": {
                "name": format!("{service}-node"),
                "namespace": NS,
                "labels": {"kubernetes.io/service-name": service},
            },
            "addressType": "IPv4",
            "endpoints": addr.map(|a| vec![json!({
                "addresses": [pod_ip(a)],
                "conditions": {"ready": true},
            })]).unwrap_or_default(),
            "ports": [{"name": "http", "protocol": "TCP", "port": addr.map_or(9898, |a| a.port())}],
        });
        if let Err(e) = slices
            .patch(
                &format!("{service}-node"),
                &PatchParams::apply("test-node").force(),
                &Patch::Apply(&slice),
            )
            .await
        {
            tracing::debug!(error = %e, "publishing an EndpointSlice");
        }
    }
}

/// The apiserver rejects loopback addresses in EndpointSlices, so each app gets a pod IP,
/// `10.244.0.<n>`, and its real port; the stand-in control plane routes every pod IP to
/// 127.0.0.1, as a pod network would route it to the pod.
fn pod_ip(app: &SocketAddr) -> String {
    format!("10.244.0.{}", app.port() % 250 + 1)
}

/// The stand-in control plane's view: the route's weights and the EndpointSlices' addresses.
async fn read_cluster(client: &Client) -> (Option<(u32, u32)>, BTreeMap<String, Vec<SocketAddr>>) {
    let weights = Api::<HttpRoute>::namespaced(client.clone(), NS)
        .get_opt("podinfo")
        .await
        .ok()
        .flatten()
        .and_then(|r| route_weights(&r))
        .map(|(p, c)| (u32::try_from(p).unwrap(), u32::try_from(c).unwrap()));
    let mut endpoints = BTreeMap::new();
    let slices: Api<EndpointSlice> = Api::namespaced(client.clone(), NS);
    if let Ok(list) = slices.list(&ListParams::default()).await {
        for slice in list.items {
            let Some(service) = slice
                .metadata
                .labels
                .as_ref()
                .and_then(|l| l.get("kubernetes.io/service-name"))
                .cloned()
            else {
                continue;
            };
            let port = slice
                .ports
                .as_ref()
                .and_then(|p| p.first())
                .and_then(|p| p.port)
                .and_then(|p| u16::try_from(p).ok())
                .unwrap_or(0);
            let addrs: Vec<SocketAddr> = slice
                .endpoints
                .iter()
                .flatten()
                .flat_map(|e| e.addresses.iter())
                .map(|_pod_ip| SocketAddr::from(([127, 0, 0, 1], port)))
                .collect();
            endpoints
                .entry(service)
                .or_insert_with(Vec::new)
                .extend(addrs);
        }
    }
    (weights, endpoints)
}

/// Real traffic through a real caller proxy: `mesh-proxy` fed by a stand-in control plane that
/// reads the HTTPRoute and EndpointSlices from the apiserver; apps for each image; a steady load
/// to `podinfo.default:9898` through the proxy. Prometheus scrapes the proxy's `/metrics`.
struct Traffic {
    weights: Arc<Mutex<Vec<(i32, i32)>>>,
    proxy: InProcessProxy,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    _stand_in: StandIn,
}

impl Drop for Traffic {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl Traffic {
    /// Starts the apps (`podinfo:2` failing `canary_fail_rate` of its requests with 500), the
    /// control plane stand-in, the caller's proxy and about 200 requests a second.
    async fn start(client: Client, canary_fail_rate: f64) -> Self {
        // Failures spread evenly: runs of them would trip the proxy's failure accrual, which
        // takes the endpoint out instead of counting errors.
        let canary = app("v2").fail_rate(canary_fail_rate).failing_evenly();
        let apps: BTreeMap<&str, SocketAddr> = BTreeMap::from([
            (IMAGES[0], app("v1").await.unwrap().addr()),
            (IMAGES[1], canary.await.unwrap().addr()),
        ]);
        let weights = Arc::new(Mutex::new(Vec::new()));
        let (state_tx, state_rx) = watch::channel(Served::default());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let cp_addr = listener.local_addr().unwrap();
        let stand_in = StandIn::new().unwrap();
        let mut tasks = vec![tokio::spawn(
            stand_in.serve_watches(listener, state_rx, answer),
        )];
        let seen = weights.clone();
        tasks.push(tokio::spawn(async move {
            loop {
                publish_endpoints(&client, &apps).await;
                let (w, endpoints) = read_cluster(&client).await;
                if let Some((p, c)) = w {
                    let pair = (i32::try_from(p).unwrap(), i32::try_from(c).unwrap());
                    let mut seen = seen.lock().unwrap();
                    if seen.last() != Some(&pair) {
                        seen.push(pair);
                    }
                }
                state_tx.send_if_modified(|st| {
                    if st.weights == w && st.endpoints == endpoints {
                        return false;
                    }
                    st.version += 1;
                    st.weights = w;
                    st.endpoints = endpoints;
                    true
                });
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }));
        let proxy = proxy()
            .control_plane(
                &stand_in.access(cp_addr),
                "spiffe://cluster.local/ns/default/sa/caller",
            )
            .watch("podinfo.default:9898")
            .run()
            .unwrap();
        let caller = proxy.client();
        for _ in 0..2 {
            let caller = caller.clone();
            tasks.push(tokio::spawn(async move {
                loop {
                    if let Ok(rsp) = caller.get("http://podinfo.default:9898/").send().await {
                        let _ = rsp.bytes().await;
                    }
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }));
        }
        Self {
            weights,
            proxy,
            tasks,
            _stand_in: stand_in,
        }
    }

    fn weights(&self) -> Vec<(i32, i32)> {
        self.weights.lock().unwrap().clone()
    }

    /// Waits until the callers saw the route's last change, back to the primary (they poll
    /// it), then checks every weight it went through, in order.
    async fn assert_back_on_the_primary_through(&self, expected: &[(i32, i32)], what: &str) {
        assert_eventually!(
            self.weights().last() == Some(&(100, 0)),
            "the route never went back to the primary: {:?}",
            self.weights()
        );
        assert_eq!(self.weights(), expected, "{what}");
    }

    /// Where Prometheus scrapes the caller proxy's metrics.
    fn metrics_addr(&self) -> SocketAddr {
        self.proxy.addr("admin")
    }
}

/// A cluster with the Gateway API's HTTPRoute installed and the node played by the test.
struct Cluster {
    kube: KubeApiServer,
    _node: mesh_test_support::kube::NodeStandIn,
}

impl Cluster {
    async fn start() -> Self {
        let kube = KubeApiServer::start()
            .await
            .expect("start etcd + kube-apiserver");
        // As in the upstream manifests: *.k8s.io groups need the API-review annotation.
        let mut crd = HttpRoute::crd();
        crd.metadata.annotations = Some(
            [(
                "api-approved.kubernetes.io".to_string(),
                "https://github.com/kubernetes-sigs/gateway-api/pull/2466".to_string(),
            )]
            .into(),
        );
        kube.install_crd(crd).await.unwrap();
        let node = kube.play_node(NS);
        Self { kube, _node: node }
    }

    fn client(&self) -> Client {
        self.kube.client()
    }
}

fn deployment(image: &str) -> Deployment {
    serde_json::from_value(json!({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "podinfo", "namespace": NS},
        "spec": {
            "replicas": 2,
            "selector": {"matchLabels": {"app": "podinfo"}},
            "template": {
                "metadata": {"labels": {"app": "podinfo", "tier": "web"}},
                "spec": {"containers": [{
                    "name": "podinfo",
                    "image": image,
                    "ports": [{"containerPort": 9898}],
                }]},
            },
        },
    }))
    .unwrap()
}

fn canary(skip_analysis: bool) -> Canary {
    serde_json::from_value(json!({
        "apiVersion": "rollouts.mesh.dev/v1alpha1",
        "kind": "Canary",
        "metadata": {"name": "podinfo", "namespace": NS},
        "spec": {
            "targetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "podinfo"},
            "service": {"port": 9898},
            "progressDeadlineSeconds": 60,
            "skipAnalysis": skip_analysis,
            "analysis": {
                "interval": "2s",
                "threshold": 2,
                "maxWeight": 50,
                "stepWeight": 25,
                "metrics": [{"name": "request-success-rate", "thresholdRange": {"min": 99.0}}],
            },
        },
    }))
    .unwrap()
}

/// Runs the controller in this process until dropped.
struct RunningController(tokio::task::JoinHandle<()>);

impl Drop for RunningController {
    fn drop(&mut self) {
        self.0.abort();
    }
}

fn settings(instance: &str) -> Settings {
    Settings {
        namespace: Some(NS.into()),
        tick: Duration::from_millis(250),
        error_backoff: Duration::from_millis(500),
        max_backoff: Duration::from_secs(5),
        instance: Some(instance.into()),
        // Real latencies vary; the sequential tests' false-failure chance per gate per rollout
        // is alpha, so a small one keeps the healthy rollouts here from failing by chance.
        // These tests are about the driver, not the promotion guarantee (simulations/tests/
        // guarantee.rs and the judge's tests hold that): a `promote_alpha` this loose asks for
        // no evidence before promoting, so a healthy rollout takes the few ticks it took before
        // the guarantee, well inside the patience with seven rigs sharing a loaded machine.
        judge: JudgeConfig {
            alpha: 0.001,
            promote_alpha: 1e12,
            ..JudgeConfig::default()
        },
    }
}

fn source(prometheus: &Prometheus) -> WindowFloor<PrometheusSource> {
    // Prometheus scrapes every 250 ms; a 2 s range always holds several scrapes.
    WindowFloor::new(
        PrometheusSource::new(prometheus.client()),
        Duration::from_secs(2),
    )
}

async fn start_controller(client: Client, prometheus: &Prometheus) -> RunningController {
    RunningController(tokio::spawn(kubernetes::run(
        client,
        settings("test"),
        source(prometheus),
        std::future::pending(),
    )))
}

/// What every test here runs on: the cluster, traffic through the caller's proxy (the canary
/// failing `canary_fail_rate` of its requests), and Prometheus scraping that proxy.
struct Rig {
    cluster: Cluster,
    client: Client,
    traffic: Traffic,
    prometheus: Prometheus,
}

impl Rig {
    async fn start(canary_fail_rate: f64) -> Self {
        let cluster = Cluster::start().await;
        let client = cluster.client();
        let traffic = Traffic::start(client.clone(), canary_fail_rate).await;
        let prometheus = prometheus_for(&traffic).await;
        Self {
            cluster,
            client,
            traffic,
            prometheus,
        }
    }
}

async fn prometheus_for(traffic: &Traffic) -> Prometheus {
    Prometheus::builder()
        .scrape(
            ScrapeJob::new("callers", [traffic.metrics_addr()])
                .interval(Duration::from_millis(250)),
        )
        .start()
        .await
        .expect("start prometheus")
}

/// The status, for failure messages: phase, weight, checks and each gate's message.
async fn describe(client: &Client) -> String {
    let api: Api<Canary> = Api::namespaced(client.clone(), NS);
    let Some(status) = api
        .get_opt("podinfo")
        .await
        .ok()
        .flatten()
        .and_then(|c| c.status)
    else {
        return "no status".into();
    };
    let gates: Vec<&str> = status.analysis.iter().map(|g| g.message.as_str()).collect();
    format!(
        "{:?} at weight {} with {} failed checks; gates: {gates:?}",
        status.phase, status.canary_weight, status.failed_checks
    )
}

async fn phase(client: &Client) -> Option<CanaryPhase> {
    let api: Api<Canary> = Api::namespaced(client.clone(), NS);
    api.get_opt("podinfo")
        .await
        .ok()
        .flatten()
        .and_then(|c| c.status)
        .map(|s| s.phase)
}

fn image(d: &Deployment) -> String {
    d.spec
        .as_ref()
        .unwrap()
        .template
        .spec
        .as_ref()
        .unwrap()
        .containers[0]
        .image
        .clone()
        .unwrap()
}

async fn get_deployment(client: &Client, name: &str) -> Option<Deployment> {
    let api: Api<Deployment> = Api::namespaced(client.clone(), NS);
    api.get_opt(name).await.unwrap()
}

async fn replicas(client: &Client, name: &str) -> Option<i32> {
    get_deployment(client, name)
        .await
        .and_then(|d| d.spec.and_then(|s| s.replicas))
}

/// Creates the target and the Canary and waits for Initialized.
async fn initialize(client: &Client, skip_analysis: bool) {
    initialize_canary(client, canary(skip_analysis)).await;
}

/// Creates the target and `canary` and waits for Initialized.
async fn initialize_canary(client: &Client, canary: Canary) {
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), NS);
    deployments
        .create(&PostParams::default(), &deployment("podinfo:1"))
        .await
        .unwrap();
    let canaries: Api<Canary> = Api::namespaced(client.clone(), NS);
    canaries
        .create(&PostParams::default(), &canary)
        .await
        .unwrap();
    assert_eventually!(
        phase(client).await == Some(CanaryPhase::Initialized),
        "canary is {:?}, not Initialized",
        phase(client).await
    );
    // The primary runs the target's template under rewritten selector labels; the target
    // (the canary) is scaled to zero until there is something to roll out.
    let primary = get_deployment(client, "podinfo-primary").await.unwrap();
    assert_eq!(image(&primary), "podinfo:1");
    let spec = primary.spec.as_ref().unwrap();
    assert_eq!(
        spec.selector.match_labels.as_ref().unwrap()["app"],
        "podinfo-primary"
    );
    let labels = spec
        .template
        .metadata
        .as_ref()
        .unwrap()
        .labels
        .clone()
        .unwrap();
    assert_eq!(labels["app"], "podinfo-primary");
    assert_eq!(labels["tier"], "web", "other template labels are kept");
    assert_eq!(spec.replicas, Some(2));
    let owner = &primary.metadata.owner_references.as_ref().unwrap()[0];
    assert_eq!(
        (owner.kind.as_str(), owner.name.as_str()),
        ("Canary", "podinfo")
    );
    assert_eventually!(
        replicas(client, "podinfo").await == Some(0),
        "the target was not scaled to zero after initialization"
    );
    let services: Api<Service> = Api::namespaced(client.clone(), NS);
    for (name, app) in [
        ("podinfo", "podinfo-primary"),
        ("podinfo-primary", "podinfo-primary"),
        ("podinfo-canary", "podinfo"),
    ] {
        let svc = services.get(name).await.unwrap();
        let spec = svc.spec.unwrap();
        assert_eq!(spec.selector.unwrap()["app"], app, "Service {name}");
        assert_eq!(spec.ports.unwrap()[0].port, 9898, "Service {name}");
    }
    let canary = canaries.get("podinfo").await.unwrap();
    assert_eq!(
        canary.metadata.finalizers.as_deref(),
        Some(&[FINALIZER.to_string()][..])
    );
}

async fn set_image(client: &Client, image: &str) {
    let api: Api<Deployment> = Api::namespaced(client.clone(), NS);
    let patch = json!({"spec": {"template": {"spec": {"containers": [{"name": "podinfo", "image": image}]}}}});
    api.patch("podinfo", &PatchParams::default(), &Patch::Strategic(patch))
        .await
        .unwrap();
}

/// How many times each reason was reported in Events on the Canary. The recorder folds
/// repeats of a reason into one Event with a series count, as `kubectl describe` shows them.
async fn event_counts(client: &Client) -> BTreeMap<String, i32> {
    let api: Api<K8sEvent> = Api::namespaced(client.clone(), NS);
    let mut counts = BTreeMap::new();
    for e in api.list(&ListParams::default()).await.unwrap().items {
        if e.regarding
            .as_ref()
            .is_some_and(|r| r.kind.as_deref() == Some("Canary"))
            && let Some(reason) = e.reason
        {
            *counts.entry(reason).or_default() += e.series.map_or(1, |s| s.count);
        }
    }
    counts
}

fn history_counts(status: &mesh_crds::CanaryStatus) -> BTreeMap<String, i32> {
    let mut counts = BTreeMap::new();
    for h in &status.history {
        *counts.entry(h.reason.clone()).or_default() += 1;
    }
    counts
}

#[tokio::test]
async fn a_healthy_canary_steps_its_weights_and_is_promoted() {
    let Rig {
        cluster: _cluster,
        client,
        traffic,
        prometheus,
    } = Rig::start(0.0).await;
    let _controller = start_controller(client.clone(), &prometheus).await;
    initialize(&client, false).await;

    set_image(&client, "podinfo:2").await;
    assert_eventually!(
        phase(&client).await == Some(CanaryPhase::Succeeded),
        "canary is {}; weights so far {:?}",
        describe(&client).await,
        traffic.weights()
    );

    // Every step of the rollout reached the route, in order, and traffic ended on the primary.
    traffic
        .assert_back_on_the_primary_through(
            &[(100, 0), (75, 25), (50, 50), (100, 0)],
            "weights the route went through",
        )
        .await;
    let primary = get_deployment(&client, "podinfo-primary").await.unwrap();
    assert_eq!(
        image(&primary),
        "podinfo:2",
        "the primary runs the promoted template"
    );
    let target = get_deployment(&client, "podinfo").await.unwrap();
    assert_eq!(
        primary.metadata.annotations.unwrap()[REVISION_ANNOTATION],
        kubernetes::template_revision(&target.spec.unwrap().template)
    );
    assert_eventually!(
        replicas(&client, "podinfo").await == Some(0),
        "the canary was not scaled to zero after promotion"
    );
    let api: Api<Canary> = Api::namespaced(client.clone(), NS);
    let status = api.get("podinfo").await.unwrap().status.unwrap();
    let promoted = status
        .conditions
        .iter()
        .find(|c| c.type_ == "Promoted")
        .unwrap();
    assert_eq!(promoted.status, "True");
    assert!(status.failed_checks == 0, "{status:?}");
    let canary_requests = status.totals.as_ref().unwrap().canary.requests;
    assert!(
        canary_requests > 0,
        "the judge saw canary traffic: {status:?}"
    );

    // Each history entry became an Event on the Canary.
    let history: Vec<String> = status.history.iter().map(|h| h.reason.clone()).collect();
    assert!(
        history.ends_with(&[
            "Progressing".into(),
            "WeightStepped".into(),
            "WeightStepped".into(),
            "Promoting".into(),
            "Succeeded".into()
        ]),
        "{history:?}"
    );
    let expected = history_counts(&status);
    assert_eventually!(
        event_counts(&client).await == expected,
        "events {:?} differ from the history {expected:?}",
        event_counts(&client).await
    );
    drop(prometheus);
    drop(traffic);
}

#[tokio::test]
async fn a_failing_canary_is_rolled_back() {
    // A third of the canary's requests fail; the primary's never do.
    let Rig {
        cluster: _cluster,
        client,
        traffic,
        prometheus,
    } = Rig::start(0.33).await;
    let _controller = start_controller(client.clone(), &prometheus).await;
    initialize(&client, false).await;

    set_image(&client, "podinfo:2").await;
    assert_eventually!(
        phase(&client).await == Some(CanaryPhase::Failed),
        "canary is {}; weights so far {:?}",
        describe(&client).await,
        traffic.weights()
    );
    traffic
        .assert_back_on_the_primary_through(
            &[(100, 0), (75, 25), (100, 0)],
            "the canary got its first step, then all traffic went back to the primary",
        )
        .await;
    let route = Api::<HttpRoute>::namespaced(client.clone(), NS)
        .get("podinfo")
        .await
        .unwrap();
    assert_eq!(route_weights(&route), Some((100, 0)));
    let primary = get_deployment(&client, "podinfo-primary").await.unwrap();
    assert_eq!(image(&primary), "podinfo:1", "the primary was not touched");
    assert_eventually!(
        replicas(&client, "podinfo").await == Some(0),
        "the canary was not scaled to zero after the rollback"
    );
    let status = Api::<Canary>::namespaced(client.clone(), NS)
        .get("podinfo")
        .await
        .unwrap()
        .status
        .unwrap();
    // A third of the requests failing against none: the sequential comparison rolls back at
    // once, or the success-rate gate at its second failed check, whichever comes first.
    let decision = status.decision.clone().unwrap();
    assert_eq!(
        decision.outcome,
        mesh_crds::canary::Outcome::RolledBack,
        "{status:?}"
    );
    assert!(
        decision.decided_by == "canary-vs-primary-errors"
            || (decision.decided_by == "request-success-rate" && status.failed_checks == 2),
        "{decision:?}"
    );
    let success = status
        .analysis
        .iter()
        .find(|g| g.name == "request-success-rate")
        .unwrap();
    assert!(
        success.canary.unwrap() < 99.0,
        "the gate saw the failures: {success:?}"
    );
    assert_eventually!(
        event_counts(&client).await.get("RolledBack") == Some(&1),
        "no RolledBack Event: {:?}",
        event_counts(&client).await
    );
}

#[tokio::test]
async fn deleting_a_canary_mid_rollout_routes_traffic_back_to_the_primary() {
    let Rig {
        cluster: _cluster,
        client,
        traffic,
        prometheus,
    } = Rig::start(0.0).await;
    let controller = start_controller(client.clone(), &prometheus).await;
    initialize(&client, false).await;
    set_image(&client, "podinfo:2").await;
    assert_eventually!(
        traffic.weights().contains(&(75, 25)),
        "no traffic reached the canary: {:?}",
        traffic.weights()
    );
    // Stop the controller first so the rollout cannot move on or finish by itself; a new one
    // (a restart) must then find the deletion and clean up.
    drop(controller);
    let api: Api<Canary> = Api::namespaced(client.clone(), NS);
    api.delete("podinfo", &DeleteParams::default())
        .await
        .unwrap();
    let weight_before = traffic.weights().last().copied();
    assert_ne!(
        weight_before,
        Some((100, 0)),
        "the rollout was still under way"
    );
    let _controller = start_controller(client.clone(), &prometheus).await;
    assert_eventually!(
        api.get_opt("podinfo").await.unwrap().is_none(),
        "the Canary is still there: the finalizer was not removed"
    );
    let route = Api::<HttpRoute>::namespaced(client.clone(), NS)
        .get("podinfo")
        .await
        .unwrap();
    assert_eq!(route_weights(&route), Some((100, 0)));
}

/// Runs the kubectl built beside the harness's kube-apiserver against its kubeconfig.
fn kubectl(kube: &KubeApiServer) -> tokio::process::Command {
    let bin = mesh_test_support::kube::kubectl_bin().expect("kubectl");
    let mut cmd = tokio::process::Command::new(bin);
    cmd.arg("--kubeconfig")
        .arg(kube.kubeconfig())
        .arg("--namespace")
        .arg(NS)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    cmd
}

async fn output(mut cmd: tokio::process::Command) -> (bool, String) {
    let out = cmd.output().await.unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[tokio::test]
async fn kubectl_shows_the_columns_and_waits_for_promotion() {
    let Rig {
        cluster,
        client,
        traffic: _traffic,
        prometheus,
    } = Rig::start(0.0).await;
    let _controller = start_controller(client.clone(), &prometheus).await;
    initialize(&client, true).await;

    let mut get = kubectl(&cluster.kube);
    get.args(["get", "canaries"]);
    let (ok, text) = output(get).await;
    assert!(ok, "{text}");
    let mut lines = text.lines();
    let header: Vec<&str> = lines.next().unwrap().split_whitespace().collect();
    assert_eq!(
        header,
        [
            "NAME",
            "STATUS",
            "WEIGHT",
            "FAILEDCHECKS",
            "LASTTRANSITIONTIME"
        ],
        "{text}"
    );
    let row: Vec<&str> = lines.next().unwrap().split_whitespace().collect();
    assert_eq!(&row[..4], ["podinfo", "Initialized", "0", "0"], "{text}");
    let mut wide = kubectl(&cluster.kube);
    wide.args(["get", "canaries", "-o", "wide"]);
    let (ok, text) = output(wide).await;
    assert!(ok, "{text}");
    assert!(
        text.lines().next().unwrap().contains("FAILEDCHECKS"),
        "{text}"
    );

    // Not promoted yet: a short wait times out.
    let mut early = kubectl(&cluster.kube);
    early.args([
        "wait",
        "--for=condition=Promoted",
        "canary/podinfo",
        "--timeout=1s",
    ]);
    let (ok, text) = output(early).await;
    assert!(!ok, "kubectl wait returned before any promotion: {text}");

    // Started before the new image, the wait returns 0 once the Promoted condition is True.
    let mut wait = kubectl(&cluster.kube);
    wait.args([
        "wait",
        "--for=condition=Promoted",
        "canary/podinfo",
        "--timeout=120s",
    ]);
    let waiting = tokio::spawn(output(wait));
    set_image(&client, "podinfo:2").await;
    let (ok, text) = waiting.await.unwrap();
    assert!(ok, "kubectl wait failed: {text}");
    assert!(text.contains("condition met"), "{text}");
    assert_eq!(phase(&client).await, Some(CanaryPhase::Succeeded));

    let mut get = kubectl(&cluster.kube);
    get.args(["get", "canary", "podinfo", "--no-headers"]);
    let (ok, text) = output(get).await;
    assert!(ok, "{text}");
    let row: Vec<&str> = text.split_whitespace().collect();
    assert_eq!(&row[..3], ["podinfo", "Succeeded", "0"], "{text}");
}

/// The `mesh-rollout-controller` binary, pointed at the harness's apiserver and Prometheus.
fn controller_binary(
    kube: &KubeApiServer,
    prometheus: &Prometheus,
    log: &str,
) -> tokio::process::Child {
    let log = std::fs::File::create(kube.dir().join(log)).unwrap();
    tokio::process::Command::new(env!("CARGO_BIN_EXE_mesh-rollout-controller"))
        .arg("--kubeconfig")
        .arg(kube.kubeconfig())
        .args(["--context", "mesh-test", "--namespace", NS])
        .args(["--prometheus-url", prometheus.url()])
        .args(["--metrics-interval", "2s", "--reconcile-interval", "250ms"])
        // Leader election is on by default; a short Lease lets the restart take over quickly
        // from the killed process, which never released it.
        .args(["--lease-duration", "2s", "--lease-renew-interval", "250ms"])
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .unwrap()
}

async fn canary_weight(client: &Client) -> Option<i32> {
    Api::<Canary>::namespaced(client.clone(), NS)
        .get_opt("podinfo")
        .await
        .ok()
        .flatten()
        .and_then(|c| c.status)
        .map(|s| s.canary_weight)
}

#[tokio::test]
async fn the_binary_killed_mid_rollout_resumes_from_the_status() {
    let Rig {
        cluster,
        client,
        traffic,
        prometheus,
    } = Rig::start(0.0).await;
    let mut first = controller_binary(&cluster.kube, &prometheus, "controller-1.log");
    initialize(&client, false).await;
    set_image(&client, "podinfo:2").await;
    assert_eventually!(
        canary_weight(&client).await == Some(25),
        "the rollout did not reach 25 %: {:?}, log in {}",
        phase(&client).await,
        cluster.kube.dir().display()
    );

    // SIGKILL: nothing is flushed or cleaned up, as when a node dies.
    first.kill().await.unwrap();
    let _second = controller_binary(&cluster.kube, &prometheus, "controller-2.log");
    // The new process takes the Lease over, finishes the last step and gathers the promotion's
    // evidence, tens of seconds of traffic on their own: it gets four times the usual patience.
    let deadline = tokio::time::Instant::now() + 4 * mesh_test_support::eventually::patience();
    while phase(&client).await != Some(CanaryPhase::Succeeded) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "canary is {} after the restart; weights {:?}\n--- the restarted controller's log\n{}",
            describe(&client).await,
            traffic.weights(),
            mesh_test_support::process::tail(&cluster.kube.dir().join("controller-2.log"), 40)
        );
        tokio::time::sleep(mesh_test_support::eventually::POLL_INTERVAL).await;
    }
    // The new process went on from 25 %: no second start from 0, no step repeated.
    traffic
        .assert_back_on_the_primary_through(
            &[(100, 0), (75, 25), (50, 50), (100, 0)],
            "weights the route went through",
        )
        .await;
    let status = Api::<Canary>::namespaced(client.clone(), NS)
        .get("podinfo")
        .await
        .unwrap()
        .status
        .unwrap();
    let starts = status
        .history
        .iter()
        .filter(|h| h.reason == "Progressing")
        .count();
    assert_eq!(starts, 1, "the rollout started once: {:?}", status.history);
    let primary = get_deployment(&client, "podinfo-primary").await.unwrap();
    assert_eq!(image(&primary), "podinfo:2");
}

/// Kubernetes stops a pod with SIGTERM: the binary gives the Lease up and exits 0, so a standby
/// need not wait out the lease duration.
#[tokio::test]
async fn the_binary_releases_its_lease_on_sigterm() {
    let Rig {
        cluster,
        client,
        traffic: _traffic,
        prometheus,
    } = Rig::start(0.0).await;
    let mut controller = controller_binary(&cluster.kube, &prometheus, "controller.log");
    assert_eventually!(
        lease_holder(&client).await.is_some(),
        "the controller never took the Lease; log in {}",
        cluster.kube.dir().display()
    );
    let pid = controller.id().expect("a running controller");
    let status = std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let exited = tokio::time::timeout(Duration::from_secs(30), controller.wait())
        .await
        .expect("the controller did not stop on SIGTERM")
        .unwrap();
    assert_eq!(
        exited.code(),
        Some(0),
        "log in {}",
        cluster.kube.dir().display()
    );
    let api: Api<Lease> = Api::namespaced(client.clone(), NS);
    let spec = api
        .get("mesh-rollout-controller")
        .await
        .unwrap()
        .spec
        .unwrap();
    assert_eq!(
        spec.holder_identity, None,
        "the Lease was not released: {spec:?}"
    );
}

async fn lease_holder(client: &Client) -> Option<(String, i32)> {
    let api: Api<Lease> = Api::namespaced(client.clone(), NS);
    let spec = api.get_opt("mesh-rollout-controller").await.ok()??.spec?;
    Some((spec.holder_identity?, spec.lease_transitions.unwrap_or(0)))
}

/// The reporting instances of the Events on the Canary.
async fn event_instances(client: &Client) -> BTreeSet<String> {
    let api: Api<K8sEvent> = Api::namespaced(client.clone(), NS);
    api.list(&ListParams::default())
        .await
        .unwrap()
        .items
        .into_iter()
        // Only the Canary's: the apiserver's own controllers report on other objects in the
        // namespace (the ipallocator repair controller on the Services, for one).
        .filter(|e| e.regarding.as_ref().and_then(|r| r.kind.as_deref()) == Some("Canary"))
        .filter_map(|e| e.reporting_instance)
        .collect()
}

#[tokio::test]
async fn only_the_leader_reconciles_and_a_standby_takes_over() {
    let Rig {
        cluster: _cluster,
        client,
        traffic: _traffic,
        prometheus,
    } = Rig::start(0.0).await;
    let replica = |identity: &str| {
        let election = ElectionConfig {
            namespace: NS.into(),
            name: "mesh-rollout-controller".into(),
            identity: identity.into(),
            lease_duration: Duration::from_secs(2),
            renew_interval: Duration::from_millis(250),
        };
        RunningController(tokio::spawn({
            let run = kubernetes::run_elected(
                client.clone(),
                settings(identity),
                source(&prometheus),
                election,
                std::future::pending(),
            );
            async move {
                run.await;
            }
        }))
    };
    let a = replica("a");
    assert_eventually!(
        lease_holder(&client).await == Some(("a".into(), 0)),
        "a did not take the Lease: {:?}",
        lease_holder(&client).await
    );
    let _b = replica("b");
    initialize(&client, false).await;
    assert_eq!(
        event_instances(&client).await,
        BTreeSet::from(["a".to_string()]),
        "only the leader reconciled"
    );

    // a dies without releasing the Lease; b takes over once it expires and finishes the job.
    drop(a);
    set_image(&client, "podinfo:2").await;
    assert_eventually!(
        phase(&client).await == Some(CanaryPhase::Succeeded),
        "canary is {:?}; Lease {:?}",
        phase(&client).await,
        lease_holder(&client).await
    );
    assert_eq!(lease_holder(&client).await, Some(("b".into(), 1)));
    assert_eq!(
        event_instances(&client).await,
        BTreeSet::from(["a".to_string(), "b".to_string()])
    );
    let primary = get_deployment(&client, "podinfo-primary").await.unwrap();
    assert_eq!(image(&primary), "podinfo:2");
}

/// The `mesh` CLI against the harness's apiserver, run without blocking the controller that
/// runs in this test's runtime.
async fn mesh_cli(kube: &KubeApiServer, args: &[&str]) -> std::process::Output {
    let bin = mesh_test_support::process::workspace_bin("mesh").expect("the mesh binary");
    tokio::process::Command::new(bin)
        .args(args)
        .arg("--kubeconfig")
        .arg(kube.kubeconfig())
        .args(["-n", NS])
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output()
        .await
        .unwrap()
}

/// A Canary with a confirm-promotion webhook without a url stops at WaitingPromotion in the
/// cluster; `mesh rollout status` exits 3 and names the gate; `mesh rollout promote --by`
/// opens it (an annotation naming the wait), and the rollout finishes: Succeeded, the route
/// back on the promoted primary, and the opener in the status history and the Events.
#[tokio::test]
async fn a_gate_the_mesh_holds_waits_for_mesh_rollout_promote_in_the_cluster() {
    let Rig {
        cluster,
        client,
        traffic,
        prometheus,
    } = Rig::start(0.0).await;
    let _controller = start_controller(client.clone(), &prometheus).await;
    let mut gated = canary(false);
    gated.spec.analysis.webhooks = vec![mesh_crds::canary::CanaryWebhook {
        type_: Some(mesh_crds::canary::WebhookType::ConfirmPromotion),
        name: "approval".into(),
        url: None,
        timeout: None,
        metadata: None,
    }];
    initialize_canary(&client, gated).await;
    set_image(&client, "podinfo:2").await;

    let waiting = mesh_cli(
        &cluster.kube,
        &[
            "rollout",
            "status",
            "podinfo",
            "--watch",
            "--timeout",
            "3m",
            "-o",
            "json",
        ],
    )
    .await;
    let report: serde_json::Value = serde_json::from_slice(&waiting.stdout).unwrap_or_else(|e| {
        panic!("{e}: {}", String::from_utf8_lossy(&waiting.stderr));
    });
    assert_eq!(waiting.status.code(), Some(3), "{report:#}");
    assert_eq!(report["phase"], "WaitingPromotion", "{report:#}");
    assert_eq!(report["result"], "waiting-promotion");
    assert_eq!(report["canaryWeight"], 50);
    assert_eq!(report["gate"]["type"], "confirm-promotion", "{report:#}");
    assert_eq!(report["gate"]["waiting"], true);
    let id = report["gate"]["id"].as_str().unwrap().to_string();
    // The wait survived the apiserver's schema (a pruned status.gate would lose it).
    let api: Api<Canary> = Api::namespaced(client.clone(), NS);
    let stored = api.get("podinfo").await.unwrap().status.unwrap();
    assert_eq!(stored.gate.map(|g| g.id), Some(id.clone()));
    assert_eventually!(
        event_counts(&client).await.contains_key("GateWaiting"),
        "no GateWaiting Event: {:?}",
        event_counts(&client).await
    );

    let run = "https://github.com/acme/podinfo/actions/runs/7";
    let opened = mesh_cli(
        &cluster.kube,
        &["rollout", "promote", "podinfo", "--by", run],
    )
    .await;
    assert!(
        opened.status.success(),
        "{}",
        String::from_utf8_lossy(&opened.stderr)
    );
    let annotations = api
        .get("podinfo")
        .await
        .unwrap()
        .metadata
        .annotations
        .unwrap();
    assert_eq!(annotations["rollouts.mesh.dev/open-gate"], id);
    assert_eq!(annotations["rollouts.mesh.dev/open-gate-by"], run);
    assert!(
        !annotations.contains_key("rollouts.mesh.dev/promote"),
        "opening a gate is not a promote-now"
    );

    let done = mesh_cli(
        &cluster.kube,
        &["rollout", "status", "podinfo", "--watch", "--timeout", "2m"],
    )
    .await;
    assert_eq!(
        done.status.code(),
        Some(0),
        "{}{}",
        String::from_utf8_lossy(&done.stdout),
        describe(&client).await
    );
    traffic
        .assert_back_on_the_primary_through(
            &[(100, 0), (75, 25), (50, 50), (100, 0)],
            "weights the route went through",
        )
        .await;
    let status = api.get("podinfo").await.unwrap().status.unwrap();
    assert_eq!(status.phase, CanaryPhase::Succeeded);
    assert_eq!(status.gate.and_then(|g| g.opened_by).as_deref(), Some(run));
    assert!(
        status
            .history
            .iter()
            .any(|h| h.reason == "GateOpened" && h.message.contains(run)),
        "{:?}",
        status.history
    );
    let waits = status
        .history
        .iter()
        .filter(|h| h.reason == "GateWaiting")
        .count();
    assert_eq!(waits, 1, "{:?}", status.history);
    assert_eventually!(
        event_counts(&client).await.get("GateOpened") == Some(&1),
        "Events: {:?}",
        event_counts(&client).await
    );
    let history = mesh_cli(&cluster.kube, &["rollout", "history", "podinfo"]).await;
    let history = String::from_utf8_lossy(&history.stdout);
    assert!(
        history
            .lines()
            .any(|l| l.contains("GateOpened") && l.contains(run)),
        "{history}"
    );
}
