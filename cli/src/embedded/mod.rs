//! The embedded mesh: the control plane (its store in a state directory), the rollout controller
//! and the workload supervisor, in one process. `mesh up` and `mesh demo` run it.
//!
//! Three loops share the store:
//! - the control plane serves the resource API and the proxies' watch streams;
//! - the supervisor loop turns Workloads (and the Canaries that target them) into running arms,
//!   and gives every served Workload its HTTPRoute `<name>` -> `<name>-primary`/`<name>-canary`
//!   (built by the rollout controller's [`owned::route`]);
//! - the rollout controller's embedded loop ([`mesh_rollout_controller::embedded::run`])
//!   reconciles every Canary; it keeps weights in that HTTPRoute and what each arm runs in the
//!   Workload's status, so all progress lives in the store and a restarted `mesh up` resumes
//!   where it stopped. This module only assembles it, with the supervisor as its
//!   [`Workloads`].

mod pids;
pub mod supervisor;

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use anyhow::Context;
use mesh_controlplane::{ControlPlane, config::Config as ControlPlaneConfig};
use mesh_crds::{Canary, Workload, validate::ResourceKind};
use mesh_rollout_controller::embedded::{self as rollout, WorkloadKey, Workloads};
use mesh_rollout_controller::owned::{self, Arm, Names};
use mesh_store::{
    ObjectKey, ResourceStore, Selector, StoreError, embedded::EmbeddedStore, update_status,
};
use pids::PidFiles;
use serde_json::{Value, json};
use supervisor::{ArmSpec, Programs, Supervisor};

/// Where the embedded mesh keeps its state and listens.
#[derive(Clone, Debug)]
pub struct Settings {
    /// State directory: the store, the CA, process logs.
    pub state_dir: PathBuf,
    /// The resource API (`mesh apply`, `mesh get`).
    pub api_addr: SocketAddr,
    /// The proxy API (sidecars' watches and registrations).
    pub proxy_addr: SocketAddr,
    /// The inbound policy of workload ports no `Server` selects.
    pub default_inbound_policy: mesh_policies::DefaultPolicy,
    /// Variables every sidecar gets beside the mesh's own (tracing's collector, for instance).
    pub proxy_env: Vec<(String, String)>,
}

/// A running embedded mesh.
pub struct Mesh {
    /// The store.
    pub store: EmbeddedStore,
    /// The resource API's address.
    pub api_addr: SocketAddr,
    /// The proxy API's address (mTLS).
    pub proxy_addr: SocketAddr,
    /// The trust roots that verify the proxy API, PEM (what sidecars are given).
    pub trust_roots_file: PathBuf,
    /// The resource API's token (mode 0600), which `mesh` presents.
    pub api_token_file: PathBuf,
    /// The supervisor.
    pub supervisor: Arc<Supervisor>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Mesh {
    /// Opens the state directory, binds the listeners and starts every loop.
    pub async fn start(settings: &Settings) -> anyhow::Result<Self> {
        let mut programs = Programs::discover()?;
        programs.proxy_env.clone_from(&settings.proxy_env);
        let config = ControlPlaneConfig {
            state_dir: settings.state_dir.join("controlplane"),
            api_addr: settings.api_addr,
            proxy_addr: settings.proxy_addr,
            cert_lifetime: Duration::from_secs(24 * 3600),
            trust_domain: "cluster.local".into(),
            workload_ttl: Duration::from_secs(10),
            watch_history: 10_000,
            default_inbound_policy: settings.default_inbound_policy,
            issuer_dir: None,
            kubernetes: false,
            injector: None,
            scrape_interval: mesh_observe::scrape::DEFAULT_INTERVAL,
        };
        std::fs::create_dir_all(&config.state_dir)
            .with_context(|| format!("creating {}", config.state_dir.display()))?;
        let control_plane = ControlPlane::open(&config)
            .with_context(|| format!("opening the state in {}", config.state_dir.display()))?;
        // Holding the store's lock, we own the state dir. A `mesh up` killed outright leaves
        // its apps and sidecars running: stop them before starting anything, or an old
        // sidecar would re-register its instance with us.
        let pids = PidFiles::new(settings.state_dir.join("run"));
        let reaped = pids.reap().await;
        if !reaped.is_empty() {
            tracing::warn!(
                count = reaped.len(),
                "stopped processes left running by a previous mesh up that did not shut down: {}",
                reaped.join(", ")
            );
        }
        let api = mesh_controlplane::http::listen(settings.api_addr)
            .with_context(|| format!("binding the resource API on {}", settings.api_addr))?;
        let proxy = mesh_controlplane::http::listen(settings.proxy_addr)
            .with_context(|| format!("binding the proxy API on {}", settings.proxy_addr))?;
        let api_addr = api.local_addr()?;
        let proxy_addr = proxy.local_addr()?;
        let store = control_plane.store().clone();
        let trust_roots_file = control_plane.trust_roots_file().to_path_buf();
        let api_token_file = control_plane.api_token_file().to_path_buf();
        let supervisor = Arc::new(Supervisor::new(
            programs,
            proxy_addr,
            settings.state_dir.join("logs"),
            pids,
        ));
        let tasks = vec![
            tokio::spawn(control_plane.serve(api, proxy)),
            tokio::spawn(supervise(store.clone(), Arc::clone(&supervisor))),
            tokio::spawn(rollout::run(
                store.clone(),
                Arc::clone(&supervisor),
                rollout::Settings::default(),
            )),
        ];
        Ok(Self {
            store,
            api_addr,
            proxy_addr,
            trust_roots_file,
            api_token_file,
            supervisor,
            tasks,
        })
    }

    /// Stops the loops, then every supervised process.
    pub async fn shutdown(self) {
        for t in &self.tasks {
            t.abort();
        }
        self.supervisor.shutdown().await;
    }
}

/// Reads every document of `files` (files or directories), as `mesh apply -f` does.
pub fn read_manifests(files: &[PathBuf], namespace: &str) -> anyhow::Result<Vec<Value>> {
    let mut docs = Vec::new();
    for f in files {
        for file in crate::resources::files_of(f)? {
            for mut doc in crate::resources::read_documents(&file)? {
                if doc.pointer("/metadata/namespace").is_none()
                    && let Some(meta) = doc.get_mut("metadata").and_then(Value::as_object_mut)
                {
                    meta.insert("namespace".into(), json!(namespace));
                }
                docs.push(doc);
            }
        }
    }
    Ok(docs)
}

fn typed<T: serde::de::DeserializeOwned>(v: &Value) -> Option<T> {
    serde_json::from_value(v.clone()).ok()
}

/// The Canary that targets a workload, if any: its `targetRef.name` is the workload's name
/// (whatever its kind says, so a Flagger manifest's `kind: Deployment` works unchanged).
fn canary_for<'a>(canaries: &'a [Canary], key: &WorkloadKey) -> Option<&'a Canary> {
    canaries.iter().find(|c| {
        c.metadata.namespace.as_deref() == Some(&key.namespace)
            && c.spec.target_ref.name == key.name
    })
}

/// What each arm of each workload should run: without a Canary, the primary runs
/// `spec.version`; with one, the arms run what the rollout controller put in the status.
pub fn desired(
    workloads: &[Workload],
    canaries: &[Canary],
) -> BTreeMap<(WorkloadKey, Arm), ArmSpec> {
    let mut out = BTreeMap::new();
    for w in workloads {
        let key = WorkloadKey::of(w);
        let status = w.status.clone().unwrap_or_default();
        let (primary, canary) = if canary_for(canaries, &key).is_some() {
            (status.primary, status.canary)
        } else {
            (Some(w.spec.version.clone()), None)
        };
        for (arm, version) in [(Arm::Primary, primary), (Arm::Canary, canary)] {
            if let Some(spec) = version.and_then(|v| ArmSpec::of(&w.spec, &v)) {
                out.insert((key.clone(), arm), spec);
            }
        }
    }
    out
}

fn list<T: serde::de::DeserializeOwned>(
    store: &EmbeddedStore,
    kind: ResourceKind,
) -> Result<(Vec<Value>, Vec<T>), StoreError> {
    let listed = store.list(&Selector::kind(kind, None))?;
    let raw: Vec<Value> = listed.items.iter().map(|v| (**v).clone()).collect();
    let typed = raw.iter().filter_map(typed).collect();
    Ok((raw, typed))
}

async fn supervise(store: EmbeddedStore, supervisor: Arc<Supervisor>) {
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if let Err(e) = supervise_once(&store, &supervisor).await {
            tracing::warn!(error = %e, "supervisor: reading the store failed");
        }
    }
}

async fn supervise_once(store: &EmbeddedStore, supervisor: &Supervisor) -> anyhow::Result<()> {
    let (_, workloads) = list::<Workload>(store, ResourceKind::Workload)?;
    let (_, canaries) = list::<Canary>(store, ResourceKind::Canary)?;
    supervisor.sync(&desired(&workloads, &canaries)).await;
    for w in &workloads {
        let key = WorkloadKey::of(w);
        let object = ObjectKey::new(ResourceKind::Workload, &key.namespace, &key.name);
        if canary_for(&canaries, &key).is_none() {
            let version = w.spec.version.clone();
            update_status(store, &object, |s| {
                s["primary"] = json!(version);
                if let Some(m) = s.as_object_mut() {
                    m.remove("canary");
                }
            })
            .await?;
        }
        // Every served workload is reached through its route, so a Canary added later only
        // changes weights. The route is created once and then left to the rollout controller.
        if let Some(port) = w.spec.port.filter(|p| u16::try_from(*p).is_ok()) {
            let route = ObjectKey::new(ResourceKind::HttpRoute, &key.namespace, &key.name);
            if store.get(&route)?.is_none() {
                let names = Names::new(&key.namespace, &key.name, &key.name);
                let timeout =
                    canary_for(&canaries, &key).and_then(|c| c.spec.service.timeout.as_deref());
                store
                    .apply(vec![owned::route(&names, port, timeout, 100, 0)])
                    .await?;
            }
        }
    }
    Ok(())
}

impl Workloads for Supervisor {
    async fn ready(&self, key: &WorkloadKey, arm: Arm, revision: &str) -> bool {
        Supervisor::ready(self, key, arm, revision).await
    }

    async fn admin_addrs(&self) -> Vec<SocketAddr> {
        Supervisor::admin_addrs(self).await
    }
}

/// The default state directory of a `mesh.yaml`: `.mesh/` beside it.
pub fn default_state_dir(file: &Path) -> PathBuf {
    file.parent()
        .map_or_else(|| PathBuf::from("."), Path::to_path_buf)
        .join(".mesh")
}
