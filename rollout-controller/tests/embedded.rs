//! The embedded driver over a real embedded store: a whole rollout of a Workload, turn by turn,
//! with the arms always ready and a healthy metrics window. It shows the embedded driver writes
//! the same route the Kubernetes one does (the Canary's request timeout included), keeps what
//! each arm runs in the Workload's status, and stores the Canary's status itself.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use mesh_crds::validate::ResourceKind;
use mesh_crds::{Canary, CanaryPhase, HttpRoute, Workload};
use mesh_rollout_controller::controller::{ReconcileError, reconcile_and_store};
use mesh_rollout_controller::embedded::{EmbeddedDriver, WorkloadKey, Workloads};
use mesh_rollout_controller::error::ErrorKind;
use mesh_rollout_controller::judge::{JudgeConfig, Window};
use mesh_rollout_controller::owned::{Arm, route_weights};
use mesh_rollout_controller::sources::{MetricSource, SourceError, Target};
use mesh_store::embedded::EmbeddedStore;
use mesh_store::{ObjectKey, ResourceStore};
use serde_json::{Value, json};

/// Arms that are ready as soon as they are asked for.
struct AlwaysReady;

impl Workloads for AlwaysReady {
    async fn ready(&self, _: &WorkloadKey, _: Arm, _: &str) -> bool {
        true
    }

    async fn admin_addrs(&self) -> Vec<SocketAddr> {
        Vec::new()
    }
}

/// Plenty of healthy traffic on both arms.
struct Healthy;

impl MetricSource for Healthy {
    async fn window(&mut self, _: &Target, _: Duration) -> Result<Window, SourceError> {
        let mut w = Window::default();
        w.canary.requests = 1000;
        w.primary.requests = 9000;
        // Every request fast: the latency comparison and the promotion guarantee need a
        // histogram, as the proxies export one.
        w.canary.latency.buckets = vec![(10.0, 1000), (f64::INFINITY, 1000)];
        w.primary.latency.buckets = vec![(10.0, 9000), (f64::INFINITY, 9000)];
        Ok(w)
    }
}

fn workload(version: &str) -> Value {
    json!({
        "apiVersion": "workloads.mesh.dev/v1alpha1",
        "kind": "Workload",
        "metadata": {"name": "backend", "namespace": "default"},
        "spec": {
            "port": 9898,
            "version": version,
            "versions": {
                "v1": {"command": ["mesh-demo-app", "--version", "v1"]},
                "v2": {"command": ["mesh-demo-app", "--version", "v2"]},
            },
        },
    })
}

fn canary(service_name: Option<&str>) -> Value {
    json!({
        "apiVersion": "rollouts.mesh.dev/v1alpha1",
        "kind": "Canary",
        "metadata": {"name": "backend", "namespace": "default"},
        "spec": {
            "targetRef": {"apiVersion": "workloads.mesh.dev/v1alpha1", "kind": "Workload", "name": "backend"},
            "service": {"port": 9898, "timeout": "750ms", "name": service_name},
            "analysis": {"interval": "1s", "threshold": 2, "stepWeight": 50, "maxWeight": 50},
        },
    })
}

fn key(kind: ResourceKind) -> ObjectKey {
    ObjectKey::new(kind, "default", "backend")
}

fn stored<T: serde::de::DeserializeOwned>(store: &EmbeddedStore, kind: ResourceKind) -> T {
    let v = store.get(&key(kind)).unwrap().expect("stored");
    serde_json::from_value((*v).clone()).unwrap()
}

/// One reconcile turn of the stored Canary at `now`.
async fn turn(
    store: &EmbeddedStore,
    driver: &mut EmbeddedDriver<EmbeddedStore, AlwaysReady>,
    now: DateTime<Utc>,
) -> Result<CanaryPhase, ReconcileError> {
    let canary: Canary = stored(store, ResourceKind::Canary);
    mesh_core::crypto::install_provider();
    let client = reqwest::Client::new();
    reconcile_and_store(
        &canary,
        driver,
        &mut Healthy,
        &client,
        &JudgeConfig::default(),
        now,
    )
    .await
    .map(|r| r.status.phase)
}

/// A store in a fresh directory (kept alive by the returned guard) holding `documents`, and a
/// driver over it whose arms are always ready.
async fn store_with(
    documents: Vec<Value>,
) -> (
    tempfile::TempDir,
    EmbeddedStore,
    EmbeddedDriver<EmbeddedStore, AlwaysReady>,
) {
    let dir = tempfile::tempdir().unwrap();
    let store = EmbeddedStore::open(dir.path(), 1000).unwrap();
    store.apply(documents).await.unwrap();
    let driver = EmbeddedDriver::new(store.clone(), Arc::new(AlwaysReady));
    (dir, store, driver)
}

#[tokio::test]
async fn the_embedded_driver_rolls_out_with_the_canary_timeout_on_its_route() {
    let (_dir, store, mut driver) = store_with(vec![workload("v1"), canary(None)]).await;
    let t0 = Utc::now();
    let at = |secs: i64| t0 + chrono::Duration::seconds(secs);

    // Initializing -> Initialized: the primary runs v1, all traffic on it.
    let mut phase = CanaryPhase::Initializing;
    for t in 0..5 {
        phase = turn(&store, &mut driver, at(t)).await.unwrap();
    }
    assert_eq!(phase, CanaryPhase::Initialized);
    let w: Workload = stored(&store, ResourceKind::Workload);
    assert_eq!(w.status.unwrap().primary.as_deref(), Some("v1"));

    // v2 is deployed: the canary arm runs it and takes its first step of traffic, through a
    // route that carries the Canary's request timeout.
    let w = workload("v2");
    store.apply(vec![w]).await.unwrap();
    let mut seen_split = false;
    for t in 5..60 {
        phase = turn(&store, &mut driver, at(t)).await.unwrap();
        let route: HttpRoute = stored(&store, ResourceKind::HttpRoute);
        if route_weights(&route) == Some((50, 50)) {
            seen_split = true;
            let rule = &route.spec.rules.as_ref().unwrap()[0];
            let timeout = rule.timeouts.as_ref().and_then(|t| t.request.clone());
            assert_eq!(
                timeout.as_deref(),
                Some("750ms"),
                "spec.service.timeout reaches the route"
            );
            let w: Workload = stored(&store, ResourceKind::Workload);
            assert_eq!(w.status.unwrap().canary.as_deref(), Some("v2"));
        }
        if phase == CanaryPhase::Succeeded {
            break;
        }
    }
    assert!(seen_split, "the canary never took traffic");
    assert_eq!(phase, CanaryPhase::Succeeded);
    let w: Workload = stored(&store, ResourceKind::Workload);
    let status = w.status.unwrap();
    assert_eq!(status.primary.as_deref(), Some("v2"), "promoted");
    assert_eq!(status.canary, None, "the canary arm is scaled down");
    let route: HttpRoute = stored(&store, ResourceKind::HttpRoute);
    assert_eq!(route_weights(&route), Some((100, 0)));
    let c: Canary = stored(&store, ResourceKind::Canary);
    assert_eq!(
        c.status.unwrap().phase,
        CanaryPhase::Succeeded,
        "the driver stored the status"
    );
}

#[tokio::test]
async fn a_canary_whose_service_is_not_its_workload_is_an_invalid_spec() {
    let (_dir, store, mut driver) = store_with(vec![workload("v1"), canary(Some("other"))]).await;
    let e = turn(&store, &mut driver, Utc::now()).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidSpec);
    assert!(e.to_string().contains("spec.service.name \"other\""), "{e}");
}

#[tokio::test]
async fn a_missing_workload_is_not_found() {
    let (_dir, store, mut driver) = store_with(vec![canary(None)]).await;
    let e = turn(&store, &mut driver, Utc::now()).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NotFound);
    assert!(e.to_string().contains("no Workload \"backend\""), "{e}");
}

#[tokio::test]
async fn a_batch_holds_writes_back_shows_them_to_the_turn_and_stores_them_together() {
    let (_dir, store, mut driver) = store_with(vec![workload("v1"), canary(None)]).await;
    let t0 = Utc::now();
    let before = store.resource_version();

    // Two turns in one batch: the second reads what the first held back.
    driver.begin_batch();
    turn(&store, &mut driver, t0).await.unwrap();
    assert_eq!(
        store.resource_version(),
        before,
        "nothing is stored before the commit"
    );
    let written = driver.commit_batch().await.unwrap();
    assert!(
        written >= 2,
        "the Workload's and the Canary's status: {written}"
    );
    let w: Workload = stored(&store, ResourceKind::Workload);
    assert_eq!(w.status.unwrap().primary.as_deref(), Some("v1"));
    let c: Canary = stored(&store, ResourceKind::Canary);
    assert!(c.status.is_some(), "the Canary's status is stored");
    assert_eq!(driver.commit_batch().await.unwrap(), 0, "the batch is gone");
}

#[tokio::test]
async fn an_uncommitted_batch_is_lost_whole_and_the_next_turn_resumes_from_the_store() {
    let (_dir, store, mut driver) = store_with(vec![workload("v1"), canary(None)]).await;
    let t0 = Utc::now();
    let at = |secs: i64| t0 + chrono::Duration::seconds(secs);
    let mut phase = CanaryPhase::Initializing;
    for t in 0..5 {
        phase = turn(&store, &mut driver, at(t)).await.unwrap();
    }
    assert_eq!(phase, CanaryPhase::Initialized);
    store.apply(vec![workload("v2")]).await.unwrap();
    let stored_before: Canary = stored(&store, ResourceKind::Canary);

    // A controller that dies mid-turn: its batch never reaches the store.
    let mut dying = EmbeddedDriver::new(store.clone(), Arc::new(AlwaysReady));
    dying.begin_batch();
    for t in 5..8 {
        turn(&store, &mut dying, at(t)).await.unwrap();
    }
    drop(dying);
    let c: Canary = stored(&store, ResourceKind::Canary);
    assert_eq!(
        c.status, stored_before.status,
        "nothing of the lost turn is stored"
    );
    let w: Workload = stored(&store, ResourceKind::Workload);
    assert_eq!(
        w.status.unwrap().canary,
        None,
        "the canary arm was never stored"
    );

    // A new controller, batching too, carries the rollout through from the stored status.
    let mut driver = EmbeddedDriver::new(store.clone(), Arc::new(AlwaysReady));
    for t in 5..60 {
        driver.begin_batch();
        phase = turn(&store, &mut driver, at(t)).await.unwrap();
        driver.commit_batch().await.unwrap();
        if phase == CanaryPhase::Succeeded {
            break;
        }
    }
    assert_eq!(phase, CanaryPhase::Succeeded);
    let w: Workload = stored(&store, ResourceKind::Workload);
    assert_eq!(w.status.unwrap().primary.as_deref(), Some("v2"), "promoted");
    let route: HttpRoute = stored(&store, ResourceKind::HttpRoute);
    assert_eq!(route_weights(&route), Some((100, 0)));
}

#[tokio::test]
async fn a_batch_keeps_a_spec_change_made_while_it_was_held_back() {
    let (_dir, store, mut driver) = store_with(vec![workload("v1"), canary(None)]).await;
    driver.begin_batch();
    turn(&store, &mut driver, Utc::now()).await.unwrap();
    // The user edits the Canary while the turn's writes wait.
    let mut edited = canary(None);
    edited["spec"]["analysis"]["threshold"] = json!(7);
    store.apply(vec![edited]).await.unwrap();
    driver.commit_batch().await.unwrap();
    let c: Canary = stored(&store, ResourceKind::Canary);
    assert_eq!(c.spec.analysis.threshold, 7, "the user's change is kept");
    assert!(
        c.status.is_some(),
        "and the turn's status is stored over it"
    );
}
