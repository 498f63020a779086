//! The rollout controller in the embedded mesh, beside [`crate::kubernetes`]: the same
//! [`controller::reconcile_and_store`] turn and the same [`Backoff`], over the resource store
//! instead of the Kubernetes API.
//!
//! In the embedded mesh a Canary targets a `Workload`, which has two arms, as a Deployment has
//! under Flagger: the primary and, during a rollout, the canary. [`EmbeddedDriver`] keeps what
//! each arm runs in the Workload's `status` (`primary`, `canary`: version names) and the weights
//! in the HTTPRoute `<name>` (built by [`owned::route`], as in a cluster), so all progress lives
//! in the store and a restarted mesh resumes where it stopped. Whoever runs the arms (the `mesh`
//! command's supervisor) implements [`Workloads`]: it reads those statuses, starts and stops
//! processes, and tells the driver which arms are ready and where their proxies' metrics are.
//!
//! A [`Controller`] turn holds its writes back and commits them as one store transaction at its
//! end (see [`EmbeddedDriver::begin_batch`]): with a durable commit per write, 1,000 Canaries
//! analysing once a second spent their turn waiting on the disk. A crash before the commit
//! loses the whole turn and nothing else, so a restart resumes from the status the previous
//! turn stored, as it would after a crash between two writes.

use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use mesh_crds::validate::ResourceKind;
use mesh_crds::workload::version_of_revision;
use mesh_crds::{Canary, CanaryStatus, MetricTemplate, Workload};
use mesh_store::{ObjectKey, ResourceStore, Selector, StoreError, update_status};
use serde_json::{Value, json};
use tokio::time::Instant;

use crate::controller::{self, Backoff, Driver, TargetState};
use crate::error::DriverError;
use crate::judge::JudgeConfig;
use crate::machine::Action;
use crate::owned::{self, Arm, Names};
use crate::sources::DirectScrape;

/// A Workload, by namespace and name.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct WorkloadKey {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
}

impl WorkloadKey {
    /// The key of a stored Workload.
    pub fn of(w: &Workload) -> Self {
        Self {
            namespace: w.metadata.namespace.clone().unwrap_or_default(),
            name: w.metadata.name.clone().unwrap_or_default(),
        }
    }
}

impl std::fmt::Display for WorkloadKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}", self.name, self.namespace)
    }
}

/// What the controller needs from whoever runs the Workloads' arms.
pub trait Workloads: Send + Sync + 'static {
    /// Whether `arm` of `key` runs `revision` with every instance ready.
    fn ready(
        &self,
        key: &WorkloadKey,
        arm: Arm,
        revision: &str,
    ) -> impl Future<Output = bool> + Send;

    /// The admin addresses of every running proxy, for scraping metrics.
    fn admin_addrs(&self) -> impl Future<Output = Vec<SocketAddr>> + Send;
}

/// How the embedded controller runs.
#[derive(Clone, Debug)]
pub struct Settings {
    /// How often the store is read and each Canary reconciled.
    pub tick: Duration,
    /// First backoff after the store failed; it doubles with each failure in a row.
    pub error_backoff: Duration,
    /// The longest backoff, and the wait after an invalid spec (a changed Canary is
    /// reconciled at once).
    pub max_backoff: Duration,
    /// The judge's parameters.
    pub judge: JudgeConfig,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            tick: Duration::from_secs(1),
            error_backoff: Duration::from_secs(1),
            max_backoff: Duration::from_secs(10),
            judge: JudgeConfig::default(),
        }
    }
}

fn typed<T: serde::de::DeserializeOwned>(v: &Value) -> Option<T> {
    serde_json::from_value(v.clone()).ok()
}

/// When a Canary is next due, and what it looked like when it last failed.
struct Due {
    at: Instant,
    version: Option<String>,
    error: Option<String>,
}

/// Reconciles every stored Canary, forever: each one every tick, or after its backoff.
pub async fn run<S, W>(store: S, workloads: Arc<W>, settings: Settings)
where
    S: ResourceStore + Clone,
    W: Workloads,
{
    let mut tick = tokio::time::interval(settings.tick);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut controller = Controller::new(store, workloads, settings);
    loop {
        tick.tick().await;
        controller.turn().await;
    }
}

/// What one [`Controller::turn`] did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Turn {
    /// Canaries in the store.
    pub canaries: usize,
    /// Of those, the ones reconciled (the others were waiting out a backoff).
    pub reconciled: usize,
    /// Of those, the reconciles that failed.
    pub failed: usize,
    /// Objects the turn's one commit wrote (0 when nothing changed or the commit failed).
    pub written: usize,
    /// Whether the turn's commit failed; the next turn starts again from what is stored.
    pub commit_failed: bool,
}

/// The embedded loop's state between ticks: [`run`] calls [`Controller::turn`] every tick; a
/// benchmark calls it itself to time each turn.
pub struct Controller<S, W> {
    store: S,
    workloads: Arc<W>,
    settings: Settings,
    client: reqwest::Client,
    source: DirectScrape,
    driver: EmbeddedDriver<S, W>,
    backoff: Backoff,
    due: BTreeMap<String, Due>,
}

impl<S, W> Controller<S, W>
where
    S: ResourceStore + Clone,
    W: Workloads,
{
    /// A controller over `store`, with `workloads` running the arms.
    pub fn new(store: S, workloads: Arc<W>, settings: Settings) -> Self {
        mesh_core::crypto::install_provider();
        let client = reqwest::Client::new();
        Self {
            source: DirectScrape::new(client.clone(), Vec::new()),
            driver: EmbeddedDriver::new(store.clone(), Arc::clone(&workloads)),
            backoff: Backoff::new(settings.tick, settings.error_backoff, settings.max_backoff),
            due: BTreeMap::new(),
            client,
            store,
            workloads,
            settings,
        }
    }

    /// One tick: reads every stored Canary and reconciles each one that is due.
    pub async fn turn(&mut self) -> Turn {
        let canaries: Vec<Canary> =
            match self.store.list(&Selector::kind(ResourceKind::Canary, None)) {
                Ok(listed) => listed.items.iter().filter_map(|v| typed(v)).collect(),
                Err(e) => {
                    tracing::warn!(error = %e, "rollout controller: listing canaries failed");
                    return Turn::default();
                }
            };
        let mut turn = Turn {
            canaries: canaries.len(),
            ..Turn::default()
        };
        let ids: std::collections::BTreeSet<String> = canaries.iter().map(canary_id).collect();
        let backoff = &mut self.backoff;
        self.due.retain(|id, _| {
            let present = ids.contains(id);
            if !present {
                backoff.forget(id);
            }
            present
        });
        self.source.set_proxies(self.workloads.admin_addrs().await);
        self.driver.begin_batch();
        for canary in &canaries {
            let id = canary_id(canary);
            let now = Instant::now();
            let version = canary.metadata.resource_version.clone();
            if let Some(d) = self.due.get(&id)
                && d.at > now
                && d.version == version
            {
                continue;
            }
            turn.reconciled += 1;
            let outcome = controller::reconcile_and_store(
                canary,
                &mut self.driver,
                &mut self.source,
                &self.client,
                &self.settings.judge,
                chrono::Utc::now(),
            )
            .await;
            let delay = self.backoff.next(&id, &outcome);
            let entry = self.due.entry(id.clone()).or_insert(Due {
                at: now,
                version: None,
                error: None,
            });
            entry.at = now + delay;
            entry.version = version;
            match outcome {
                Ok(_) => entry.error = None,
                Err(e) => {
                    turn.failed += 1;
                    // Said once per distinct error, not every tick.
                    let msg = e.to_string();
                    if entry.error.as_ref() != Some(&msg) {
                        tracing::warn!(canary = %id, error = %msg, kind = ?e.kind(), "rollout cannot proceed");
                        entry.error = Some(msg);
                    }
                }
            }
        }
        match self.driver.commit_batch().await {
            Ok(written) => turn.written = written,
            Err(e) => {
                turn.commit_failed = true;
                tracing::warn!(error = %e, "rollout controller: storing the turn's writes failed; the next turn starts again from the stored state");
            }
        }
        turn
    }
}

fn canary_id(canary: &Canary) -> String {
    format!(
        "{}/{}",
        canary.metadata.namespace.as_deref().unwrap_or_default(),
        canary.metadata.name.as_deref().unwrap_or_default()
    )
}

/// The rollout controller's hands in the embedded mesh: weights go into the HTTPRoute, what
/// each arm runs goes into the Workload's status, and the [`Workloads`] make it so.
pub struct EmbeddedDriver<S, W> {
    store: S,
    workloads: Arc<W>,
    /// Between [`Self::begin_batch`] and [`Self::commit_batch`]: the writes held back.
    batch: Option<Batch>,
}

/// One edit of an object's status, kept as data so it can be replayed on a fresh copy when
/// the object changed under a held-back batch.
#[derive(Clone, Debug)]
enum StatusEdit {
    /// The whole status (a Canary's, which the controller alone writes).
    Replace(Value),
    /// One field.
    Set(&'static str, Value),
    /// One field, unless it is already set.
    SetIfUnset(&'static str, Value),
    /// One field removed.
    Remove(&'static str),
}

impl StatusEdit {
    fn apply(&self, status: &mut Value) {
        match self {
            Self::Replace(v) => *status = v.clone(),
            Self::Set(field, v) => status[*field] = v.clone(),
            Self::SetIfUnset(field, v) => {
                if status.get(*field).is_none_or(Value::is_null) {
                    status[*field] = v.clone();
                }
            }
            Self::Remove(field) => {
                if let Some(m) = status.as_object_mut() {
                    m.remove(*field);
                }
            }
        }
    }
}

/// The writes of one turn, not yet stored.
#[derive(Debug, Default)]
struct Batch {
    /// Objects whose status the turn edited, as the turn left them: later steps read these.
    edited: BTreeMap<ObjectKey, Value>,
    /// The status edits in order, by object.
    edits: BTreeMap<ObjectKey, Vec<StatusEdit>>,
    /// Documents applied as they are (routes), in order.
    applied: Vec<Value>,
}

/// The status of `object` after `edits`, as update_status shapes it.
fn with_status(object: &Value, edits: &[StatusEdit]) -> Value {
    let mut next = object.clone();
    if next.get("status").is_none_or(Value::is_null) {
        next["status"] = Value::Object(serde_json::Map::new());
    }
    for edit in edits {
        edit.apply(&mut next["status"]);
    }
    next
}

impl<S: ResourceStore, W: Workloads> EmbeddedDriver<S, W> {
    /// A driver over `store`, with `workloads` running the arms. It writes each change at
    /// once until [`Self::begin_batch`].
    pub fn new(store: S, workloads: Arc<W>) -> Self {
        Self {
            store,
            workloads,
            batch: None,
        }
    }

    /// Holds every write back until [`Self::commit_batch`]; reads in between see them.
    pub fn begin_batch(&mut self) {
        self.batch.get_or_insert_with(Batch::default);
    }

    /// Stores the writes held back since [`Self::begin_batch`] in one transaction and returns
    /// how many objects changed. Each status edit is replayed on the object as stored now; if
    /// one of them changes before the transaction takes the store's writer lock, the writes go
    /// one by one instead, each edit replayed on a fresh copy. On an error the batch is gone:
    /// what is stored is the previous turn's state, from which the next turn starts again.
    pub async fn commit_batch(&mut self) -> Result<usize, StoreError> {
        let Some(batch) = self.batch.take() else {
            return Ok(0);
        };
        let mut documents = Vec::with_capacity(batch.edits.len() + batch.applied.len());
        for (key, edits) in &batch.edits {
            let Some(current) = self.store.get(key)? else {
                return Err(StoreError::NotFound(key.clone()));
            };
            let next = with_status(&current, edits);
            if next != *current {
                documents.push(next);
            }
        }
        documents.extend(batch.applied.iter().cloned());
        if documents.is_empty() {
            return Ok(0);
        }
        match self.store.apply(documents).await {
            Ok(applied) => Ok(applied
                .iter()
                .filter(|a| a.action != mesh_store::ApplyAction::Unchanged)
                .count()),
            Err(StoreError::Conflict { .. }) => {
                let mut written = 0;
                for (key, edits) in &batch.edits {
                    update_status(&self.store, key, |s| {
                        for edit in edits {
                            edit.apply(s);
                        }
                    })
                    .await?;
                    written += 1;
                }
                for document in batch.applied {
                    self.store.apply(vec![document]).await?;
                    written += 1;
                }
                Ok(written)
            }
            Err(e) => Err(e),
        }
    }

    /// An object as this driver sees it: with the batch's edits, if any.
    fn read(&self, key: &ObjectKey) -> Result<Option<Value>, StoreError> {
        if let Some(edited) = self.batch.as_ref().and_then(|b| b.edited.get(key)) {
            return Ok(Some(edited.clone()));
        }
        Ok(self.store.get(key)?.map(|v| (*v).clone()))
    }

    /// Edits the status of `key`: at once, or in the batch.
    async fn edit_status(&mut self, key: &ObjectKey, edit: StatusEdit) -> Result<(), StoreError> {
        if self.batch.is_none() {
            return update_status(&self.store, key, |s| edit.apply(s)).await;
        }
        let Some(current) = self.read(key)? else {
            return Err(StoreError::NotFound(key.clone()));
        };
        let next = with_status(&current, std::slice::from_ref(&edit));
        if let Some(batch) = &mut self.batch
            && next != current
        {
            batch.edited.insert(key.clone(), next);
            batch.edits.entry(key.clone()).or_default().push(edit);
        }
        Ok(())
    }

    /// Applies `document`: at once, or in the batch.
    async fn apply(&mut self, document: Value) -> Result<(), StoreError> {
        match &mut self.batch {
            Some(batch) => batch.applied.push(document),
            None => {
                self.store.apply(vec![document]).await?;
            }
        }
        Ok(())
    }

    fn workload(&self, canary: &Canary) -> Result<Workload, DriverError> {
        let ns = canary.metadata.namespace.clone().unwrap_or_default();
        let name = &canary.spec.target_ref.name;
        let key = ObjectKey::new(ResourceKind::Workload, &ns, name);
        let found = self
            .read(&key)
            .map_err(|e| DriverError::store(format!("reading Workload {ns}/{name}"), &e))?
            .ok_or_else(|| {
                DriverError::not_found(format!(
                    "targetRef: no Workload {name:?} in namespace {ns:?}; declare it in mesh.yaml \
                     or `mesh apply` it"
                ))
            })?;
        typed(&found)
            .ok_or_else(|| DriverError::invalid(format!("Workload {name:?} does not parse")))
    }

    /// The names of the Canary's objects. A Workload's arms serve as `<workload>-primary` and
    /// `<workload>-canary`, so the Canary's service must be the Workload's name.
    fn names(canary: &Canary) -> Result<Names, DriverError> {
        let names = Names::of(canary);
        if names.service != names.target {
            return Err(DriverError::invalid(format!(
                "spec.service.name {:?}: in the embedded mesh a Workload serves under its own \
                 name; leave it unset or set it to {:?}",
                names.service, names.target
            )));
        }
        Ok(names)
    }
}

impl<S: ResourceStore, W: Workloads> Driver for EmbeddedDriver<S, W> {
    async fn metric_template(
        &mut self,
        namespace: &str,
        name: &str,
    ) -> Result<Option<MetricTemplate>, DriverError> {
        let key = ObjectKey::new(ResourceKind::MetricTemplate, namespace, name);
        match self.store.get(&key).map_err(|e| {
            DriverError::store(format!("reading MetricTemplate {namespace}/{name}"), &e)
        })? {
            Some(found) => typed(&found).map(Some).ok_or_else(|| {
                DriverError::invalid(format!("MetricTemplate {namespace}/{name} does not parse"))
            }),
            None => Ok(None),
        }
    }

    async fn observe(&mut self, canary: &Canary) -> Result<TargetState, DriverError> {
        Self::names(canary)?;
        let w = self.workload(canary)?;
        let revision = w.spec.revision().ok_or_else(|| {
            DriverError::invalid(format!(
                "Workload: spec.version {:?} is not declared",
                w.spec.version
            ))
        })?;
        let status = w.status.clone().unwrap_or_default();
        let key = WorkloadKey::of(&w);
        let ready = async |version: Option<String>, arm| match version
            .and_then(|v| w.spec.revision_of(&v))
        {
            Some(r) => self.workloads.ready(&key, arm, &r).await,
            None => false,
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
        let names = Self::names(canary)?;
        let w = self.workload(canary)?;
        let key = ObjectKey::new(ResourceKind::Workload, &names.namespace, &names.target);
        let version = json!(version_of_revision(revision));
        let edit = match action {
            Action::InitializePrimary => StatusEdit::SetIfUnset("primary", version),
            Action::ScaleCanaryUp => StatusEdit::Set("canary", version),
            Action::ScaleCanaryDown => StatusEdit::Remove("canary"),
            Action::Promote => StatusEdit::Set("primary", version),
            Action::SetWeights { primary, canary: c } => {
                // The arms register under the Workload's port, so the route does too.
                let port = [w.spec.port, Some(canary.spec.service.port)]
                    .into_iter()
                    .flatten()
                    .find(|p| u16::try_from(*p).is_ok_and(|p| p > 0))
                    .ok_or_else(|| {
                        DriverError::invalid(format!("Workload {:?} has no port", names.target))
                    })?;
                let route = owned::route(
                    &names,
                    port,
                    canary.spec.service.timeout.as_deref(),
                    *primary,
                    *c,
                );
                return self.apply(route).await.map_err(|e| {
                    DriverError::store(format!("writing HTTPRoute {}", names.service), &e)
                });
            }
            Action::Notify(_) | Action::Event { .. } => return Ok(()),
        };
        self.edit_status(&key, edit)
            .await
            .map_err(|e| DriverError::store(format!("updating the status of {key}"), &e))
    }

    async fn write_status(
        &mut self,
        canary: &Canary,
        status: &CanaryStatus,
    ) -> Result<(), DriverError> {
        let status = serde_json::to_value(status)
            .map_err(|e| DriverError::invalid(format!("serializing a Canary status: {e}")))?;
        let key = ObjectKey::new(
            ResourceKind::Canary,
            canary.metadata.namespace.as_deref().unwrap_or_default(),
            canary.metadata.name.as_deref().unwrap_or_default(),
        );
        self.edit_status(&key, StatusEdit::Replace(status))
            .await
            .map_err(|e| DriverError::store(format!("writing the status of {key}"), &e))
    }
}
