//! The embedded mesh: the control plane (its store in a state directory), the rollout controller
//! and the workload supervisor, in one process. `mesh up` and `mesh demo` run it.
//!
//! Three loops share the store:
//! - the control plane serves the resource API and the proxies' watch streams;
//! - the supervisor loop turns Workloads (and the Canaries that target them) into running arms,
//!   and gives every served Workload its HTTPRoute `<name>` -> `<name>-primary`/`<name>-canary`;
//! - the rollout loop reconciles every Canary through [`EmbeddedDriver`], which keeps weights in
//!   that HTTPRoute and what each arm runs in the Workload's status, so all progress lives in
//!   the store and a restarted `mesh up` resumes where it stopped.

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
use mesh_controlplane::{
    ControlPlane,
    config::Config as ControlPlaneConfig,
    store::{ObjectKey, ResourceStore, Selector, StoreError, embedded::EmbeddedStore},
};
use mesh_crds::{
    Canary, MetricTemplate, Workload, validate::ResourceKind, workload::version_of_revision,
};
use mesh_rollout_controller::{
    controller::{self, Driver, DriverError, TargetState},
    judge::JudgeConfig,
    machine::Action,
    sources::DirectScrape,
};
use pids::PidFiles;
use serde_json::{Value, json};
use supervisor::{Arm, ArmSpec, Programs, Supervisor, WorkloadKey};
use tokio::net::TcpListener;

/// How often the supervisor and the rollout controller look at the store.
pub const TICK: Duration = Duration::from_secs(1);

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
    /// The supervisor.
    pub supervisor: Arc<Supervisor>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Mesh {
    /// Opens the state directory, binds the listeners and starts every loop.
    pub async fn start(settings: &Settings) -> anyhow::Result<Self> {
        let programs = Programs::discover()?;
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
        let api = TcpListener::bind(settings.api_addr)
            .await
            .with_context(|| format!("binding the resource API on {}", settings.api_addr))?;
        let proxy = TcpListener::bind(settings.proxy_addr)
            .await
            .with_context(|| format!("binding the proxy API on {}", settings.proxy_addr))?;
        let api_addr = api.local_addr()?;
        let proxy_addr = proxy.local_addr()?;
        let store = control_plane.store().clone();
        let trust_roots_file = control_plane.trust_roots_file().to_path_buf();
        let supervisor = Arc::new(Supervisor::new(
            programs,
            proxy_addr,
            settings.state_dir.join("logs"),
            pids,
        ));
        let tasks = vec![
            tokio::spawn(control_plane.serve(api, proxy)),
            tokio::spawn(supervise(store.clone(), Arc::clone(&supervisor))),
            tokio::spawn(roll_out(store.clone(), Arc::clone(&supervisor))),
        ];
        Ok(Self {
            store,
            api_addr,
            proxy_addr,
            trust_roots_file,
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
        let key = WorkloadKey {
            namespace: w.metadata.namespace.clone().unwrap_or_default(),
            name: w.metadata.name.clone().unwrap_or_default(),
        };
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

/// Changes an object's status with `f` and stores it, retrying when someone else wrote first.
pub async fn update_status(
    store: &EmbeddedStore,
    key: &ObjectKey,
    f: impl Fn(&mut Value),
) -> Result<(), StoreError> {
    let mut attempts = 0;
    loop {
        let Some(current) = store.get(key)? else {
            return Err(StoreError::NotFound(key.clone()));
        };
        let mut next = (*current).clone();
        if next.get("status").is_none_or(Value::is_null) {
            next["status"] = json!({});
        }
        f(&mut next["status"]);
        if next == *current {
            return Ok(());
        }
        match store.apply(vec![next]).await {
            Err(StoreError::Conflict { .. }) if attempts < 5 => attempts += 1,
            other => return other.map(|_| ()),
        }
    }
}

/// The HTTPRoute that splits `<svc>` between its arms.
pub fn split_route(namespace: &str, svc: &str, port: u16, primary: i32, canary: i32) -> Value {
    json!({
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": "HTTPRoute",
        "metadata": {
            "name": svc,
            "namespace": namespace,
            "labels": {"app.kubernetes.io/managed-by": "mesh"},
        },
        "spec": {
            "parentRefs": [{"group": "", "kind": "Service", "name": svc, "port": port}],
            "rules": [{"backendRefs": [
                {"name": format!("{svc}-primary"), "port": port, "weight": primary},
                {"name": format!("{svc}-canary"), "port": port, "weight": canary},
            ]}],
        },
    })
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
        let key = WorkloadKey {
            namespace: w.metadata.namespace.clone().unwrap_or_default(),
            name: w.metadata.name.clone().unwrap_or_default(),
        };
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
        if let Some(port) = w.spec.port.and_then(|p| u16::try_from(p).ok()) {
            let route = ObjectKey::new(ResourceKind::HttpRoute, &key.namespace, &key.name);
            if store.get(&route)?.is_none() {
                store
                    .apply(vec![split_route(&key.namespace, &key.name, port, 100, 0)])
                    .await?;
            }
        }
    }
    Ok(())
}

async fn roll_out(store: EmbeddedStore, supervisor: Arc<Supervisor>) {
    let client = reqwest::Client::new();
    let mut source = DirectScrape::new(client.clone(), Vec::new());
    let judge = JudgeConfig::default();
    let mut driver = EmbeddedDriver {
        store: store.clone(),
        supervisor,
    };
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_error: BTreeMap<String, String> = BTreeMap::new();
    loop {
        tick.tick().await;
        let (raw, canaries) = match list::<Canary>(&store, ResourceKind::Canary) {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(error = %e, "rollout controller: listing canaries failed");
                continue;
            }
        };
        source.set_proxies(driver.supervisor.admin_addrs().await);
        for (object, canary) in raw.iter().zip(&canaries) {
            let id = format!(
                "{}/{}",
                canary.metadata.namespace.as_deref().unwrap_or_default(),
                canary.metadata.name.as_deref().unwrap_or_default()
            );
            let now = chrono::Utc::now();
            let result =
                controller::reconcile(canary, &mut driver, &mut source, &client, &judge, now).await;
            match result {
                Ok(r) if Some(&r.status) != canary.status.as_ref() => {
                    last_error.remove(&id);
                    let status = serde_json::to_value(&r.status).unwrap_or_default();
                    let key = ObjectKey::of(ResourceKind::Canary, object);
                    if let Err(e) = update_status(&store, &key, |s| *s = status.clone()).await {
                        tracing::warn!(canary = %id, error = %e, "writing the status failed");
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    // Said once per distinct error, not every tick.
                    let msg = e.to_string();
                    if last_error.get(&id) != Some(&msg) {
                        tracing::warn!(canary = %id, error = %msg, "rollout cannot proceed");
                        last_error.insert(id, msg);
                    }
                }
            }
        }
    }
}

/// The rollout controller's hands in the embedded mesh: weights go into the HTTPRoute, what
/// each arm runs goes into the Workload's status, and the supervisor makes it so.
pub struct EmbeddedDriver {
    store: EmbeddedStore,
    supervisor: Arc<Supervisor>,
}

impl EmbeddedDriver {
    fn workload(&self, canary: &Canary) -> Result<Workload, DriverError> {
        let ns = canary.metadata.namespace.clone().unwrap_or_default();
        let name = &canary.spec.target_ref.name;
        let key = ObjectKey::new(ResourceKind::Workload, &ns, name);
        let found = self
            .store
            .get(&key)
            .map_err(|e| DriverError(e.to_string()))?
            .ok_or_else(|| {
                DriverError(format!(
                    "targetRef: no Workload {name:?} in namespace {ns:?}; declare it in mesh.yaml \
                     or `mesh apply` it"
                ))
            })?;
        typed(&found).ok_or_else(|| DriverError(format!("Workload {name:?} does not parse")))
    }
}

impl Driver for EmbeddedDriver {
    async fn metric_template(
        &mut self,
        namespace: &str,
        name: &str,
    ) -> Result<Option<MetricTemplate>, DriverError> {
        let key = ObjectKey::new(ResourceKind::MetricTemplate, namespace, name);
        match self
            .store
            .get(&key)
            .map_err(|e| DriverError(e.to_string()))?
        {
            Some(found) => typed(&found).map(Some).ok_or_else(|| {
                DriverError(format!("MetricTemplate {namespace}/{name} does not parse"))
            }),
            None => Ok(None),
        }
    }

    async fn observe(&mut self, canary: &Canary) -> Result<TargetState, DriverError> {
        let w = self.workload(canary)?;
        let revision = w.spec.revision().ok_or_else(|| {
            DriverError(format!(
                "Workload: spec.version {:?} is not declared",
                w.spec.version
            ))
        })?;
        let status = w.status.clone().unwrap_or_default();
        let key = WorkloadKey {
            namespace: w.metadata.namespace.clone().unwrap_or_default(),
            name: w.metadata.name.clone().unwrap_or_default(),
        };
        let ready = |version: Option<String>, arm| {
            let supervisor = Arc::clone(&self.supervisor);
            let key = key.clone();
            let rev = version.and_then(|v| w.spec.revision_of(&v));
            async move {
                match rev {
                    Some(r) => supervisor.ready(&key, arm, &r).await,
                    None => false,
                }
            }
        };
        Ok(TargetState {
            primary_ready: ready(status.primary.clone(), Arm::Primary).await,
            canary_ready: ready(status.canary.clone(), Arm::Canary).await,
            revision,
        })
    }

    async fn act(
        &mut self,
        canary: &Canary,
        revision: &str,
        action: &Action,
    ) -> Result<(), DriverError> {
        let w = self.workload(canary)?;
        let ns = w.metadata.namespace.clone().unwrap_or_default();
        let name = w.metadata.name.clone().unwrap_or_default();
        let key = ObjectKey::new(ResourceKind::Workload, &ns, &name);
        let version = version_of_revision(revision).to_string();
        let err = |e: StoreError| DriverError(e.to_string());
        match action {
            Action::InitializePrimary => {
                update_status(&self.store, &key, |s| {
                    if s.get("primary").is_none_or(Value::is_null) {
                        s["primary"] = json!(version);
                    }
                })
                .await
                .map_err(err)?;
            }
            Action::ScaleCanaryUp => {
                update_status(&self.store, &key, |s| s["canary"] = json!(version))
                    .await
                    .map_err(err)?;
            }
            Action::ScaleCanaryDown => {
                update_status(&self.store, &key, |s| {
                    if let Some(m) = s.as_object_mut() {
                        m.remove("canary");
                    }
                })
                .await
                .map_err(err)?;
            }
            Action::Promote => {
                update_status(&self.store, &key, |s| s["primary"] = json!(version))
                    .await
                    .map_err(err)?;
            }
            Action::SetWeights { primary, canary: c } => {
                // The arms register under the Workload's name and port, so the route does too.
                let port = w
                    .spec
                    .port
                    .and_then(|p| u16::try_from(p).ok())
                    .or_else(|| u16::try_from(canary.spec.service.port).ok())
                    .ok_or_else(|| DriverError(format!("Workload {name:?} has no port")))?;
                self.store
                    .apply(vec![split_route(&ns, &name, port, *primary, *c)])
                    .await
                    .map_err(err)?;
            }
            Action::Notify(_) | Action::Event { .. } => {}
        }
        Ok(())
    }
}

/// The default state directory of a `mesh.yaml`: `.mesh/` beside it.
pub fn default_state_dir(file: &Path) -> PathBuf {
    file.parent()
        .map_or_else(|| PathBuf::from("."), Path::to_path_buf)
        .join(".mesh")
}
