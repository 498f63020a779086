//! The [`ResourceStore`] over the Kubernetes API: the cluster is the store.
//!
//! Reads come from caches that kube-runtime watchers keep, one per kind, so `get` and `list` are
//! as cheap as the embedded store's and never reach the apiserver. Watches start from the cache
//! (every object as `ADDED`, then a `BOOKMARK`) and then follow the watchers' events; a relist
//! of the underlying watcher is turned into the differences it revealed, so a watch of this store
//! never needs to start over. Writes go to the apiserver: an apply validates every object first
//! (with the same field-level rules as the embedded store, before anything is sent) and then
//! server-side applies each one; a delete deletes.
//!
//! What differs from the embedded store, because Kubernetes works that way:
//! - a batch is validated as a whole but written object by object: Kubernetes has no
//!   multi-object transactions, so a write that the apiserver refuses midway leaves the objects
//!   before it applied (the error names the document);
//! - resource versions are the apiserver's, and a watch cannot resume from an old one (it gets
//!   [`StoreError::Gone`] and lists again, which the API allows at any time);
//! - `Workload` exists only in the embedded mesh; in a cluster the Canary targets a Deployment;
//! - `status` is written by the controllers through the status subresource, not by apply.

use std::{
    collections::{BTreeMap, VecDeque},
    sync::{Arc, Mutex, PoisonError},
};

use futures_util::StreamExt;
use kube::{
    Api, Client,
    api::{DeleteParams, DynamicObject, Patch, PatchParams},
    core::{ApiResource, GroupVersionKind},
    runtime::{
        WatchStreamExt,
        watcher::{self, Event},
    },
};
use mesh_crds::validate::{self, FieldError, ResourceKind, ValidationError};
use serde_json::Value;
use tokio::sync::{broadcast, watch};

use super::{
    Applied, ApplyAction, EventType, Listed, ObjectKey, ResourceStore, Selector, StoreError,
    WatchEvent, Watcher, resource_version_of,
};

/// Events a slow watcher may fall behind by before it is told to list again.
const EVENT_BUFFER: usize = 4096;

/// The field manager of server-side applies.
const FIELD_MANAGER: &str = "mesh-controlplane";

/// The kinds a cluster serves: everything but the embedded mesh's `Workload`.
pub fn cluster_kinds() -> impl Iterator<Item = ResourceKind> {
    ResourceKind::ALL
        .into_iter()
        .filter(|k| *k != ResourceKind::Workload)
}

fn api_resource(kind: ResourceKind) -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk(kind.group(), kind.version(), kind.kind()),
        kind.plural(),
    )
}

#[derive(Debug, Default)]
struct Cache {
    objects: BTreeMap<ObjectKey, Arc<Value>>,
    /// The highest resourceVersion seen.
    version: u64,
}

struct Inner {
    client: Client,
    cache: Mutex<Cache>,
    /// Sent under the cache lock, so a watch that snapshots and subscribes under it misses
    /// nothing and sees nothing twice.
    events: broadcast::Sender<WatchEvent>,
    /// How many kinds have completed their first list.
    synced: watch::Sender<usize>,
}

impl std::fmt::Debug for Inner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inner").finish_non_exhaustive()
    }
}

/// The cluster as a [`ResourceStore`].
#[derive(Clone, Debug)]
pub struct KubernetesStore {
    inner: Arc<Inner>,
}

fn backend(e: &kube::Error) -> StoreError {
    StoreError::Database {
        path: "the Kubernetes API".into(),
        message: e.to_string(),
    }
}

impl KubernetesStore {
    /// Starts watching every cluster kind through `client`. Reads see objects once each kind's
    /// first list has arrived; watches wait for it.
    pub fn start(client: Client) -> Self {
        let (events, _) = broadcast::channel(EVENT_BUFFER);
        let inner = Arc::new(Inner {
            client,
            cache: Mutex::default(),
            events,
            synced: watch::channel(0).0,
        });
        for kind in cluster_kinds() {
            tokio::spawn(follow(Arc::clone(&inner), kind));
        }
        Self { inner }
    }

    /// Waits until every kind has been listed once.
    pub async fn synced(&self) {
        let kinds = cluster_kinds().count();
        let mut rx = self.inner.synced.subscribe();
        let _ = rx.wait_for(|n| *n >= kinds).await;
    }

    fn cache(&self) -> std::sync::MutexGuard<'_, Cache> {
        self.inner
            .cache
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn api(&self, kind: ResourceKind, namespace: &str) -> Api<DynamicObject> {
        Api::namespaced_with(self.inner.client.clone(), namespace, &api_resource(kind))
    }
}

/// Records one change in the cache and tells the watches, under the cache lock.
fn publish(inner: &Inner, cache: &mut Cache, kind: EventType, key: ObjectKey, object: Arc<Value>) {
    let version = resource_version_of(&object);
    cache.version = cache.version.max(version);
    match kind {
        EventType::Deleted => {
            cache.objects.remove(&key);
        }
        _ => {
            cache.objects.insert(key, Arc::clone(&object));
        }
    }
    let _ = inner.events.send(WatchEvent {
        kind,
        object,
        resource_version: cache.version,
    });
}

fn to_value(kind: ResourceKind, object: &DynamicObject) -> Value {
    let mut value = serde_json::to_value(object).unwrap_or_default();
    // Watch events of a custom resource carry its type; make sure every object does.
    value["apiVersion"] = kind.api_version().into();
    value["kind"] = kind.kind().into();
    value
}

/// Keeps the cache of `kind` in step with the cluster, forever.
async fn follow(inner: Arc<Inner>, kind: ResourceKind) {
    let api: Api<DynamicObject> = Api::all_with(inner.client.clone(), &api_resource(kind));
    let mut stream = watcher::watcher(api, watcher::Config::default())
        .default_backoff()
        .boxed();
    let mut relist: Option<BTreeMap<ObjectKey, Arc<Value>>> = None;
    let mut synced_once = false;
    while let Some(event) = stream.next().await {
        let event = match event {
            Ok(e) => e,
            Err(error) => {
                tracing::warn!(%error, %kind, "watch of the cluster failed; retrying");
                // A kind the cluster does not serve (its CRD is not installed) reads as empty
                // rather than holding every watch back; it fills in once the CRD appears.
                if !synced_once {
                    synced_once = true;
                    inner.synced.send_modify(|n| *n += 1);
                }
                continue;
            }
        };
        match event {
            Event::Init => relist = Some(BTreeMap::new()),
            Event::InitApply(o) => {
                let value = to_value(kind, &o);
                if let Some(seen) = relist.as_mut() {
                    seen.insert(ObjectKey::of(kind, &value), Arc::new(value));
                }
            }
            Event::InitDone => {
                let seen = relist.take().unwrap_or_default();
                let mut cache = inner.cache.lock().unwrap_or_else(PoisonError::into_inner);
                // What the relist revealed, as the events a watch would have sent.
                let gone: Vec<(ObjectKey, Arc<Value>)> = cache
                    .objects
                    .iter()
                    .filter(|(k, _)| k.kind == kind && !seen.contains_key(*k))
                    .map(|(k, v)| (k.clone(), Arc::clone(v)))
                    .collect();
                for (key, object) in gone {
                    publish(&inner, &mut cache, EventType::Deleted, key, object);
                }
                for (key, object) in seen {
                    let event = match cache.objects.get(&key) {
                        None => EventType::Added,
                        Some(old) if resource_version_of(old) != resource_version_of(&object) => {
                            EventType::Modified
                        }
                        Some(_) => continue,
                    };
                    publish(&inner, &mut cache, event, key, object);
                }
                drop(cache);
                if !synced_once {
                    synced_once = true;
                    inner.synced.send_modify(|n| *n += 1);
                }
            }
            Event::Apply(o) => {
                let value = Arc::new(to_value(kind, &o));
                let key = ObjectKey::of(kind, &value);
                let mut cache = inner.cache.lock().unwrap_or_else(PoisonError::into_inner);
                let event = if cache.objects.contains_key(&key) {
                    EventType::Modified
                } else {
                    EventType::Added
                };
                publish(&inner, &mut cache, event, key, value);
            }
            Event::Delete(o) => {
                let value = Arc::new(to_value(kind, &o));
                let key = ObjectKey::of(kind, &value);
                let mut cache = inner.cache.lock().unwrap_or_else(PoisonError::into_inner);
                publish(&inner, &mut cache, EventType::Deleted, key, value);
            }
        }
    }
}

impl ResourceStore for KubernetesStore {
    type Watcher = KubernetesWatcher;

    async fn apply(&self, objects: Vec<Value>) -> Result<Vec<Applied>, StoreError> {
        // Everything is checked before anything is written.
        let mut checked = Vec::with_capacity(objects.len());
        for (index, object) in objects.into_iter().enumerate() {
            let invalid = |source| StoreError::Invalid { index, source };
            let kind = validate::kind_of(&object).map_err(invalid)?;
            let name = object
                .pointer("/metadata/name")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string();
            if kind == ResourceKind::Workload {
                return Err(invalid(ValidationError::Field {
                    kind,
                    name,
                    error: FieldError::new(
                        "kind",
                        "Workload exists only in the embedded mesh; in a cluster, a Canary \
                         targets a Deployment",
                    ),
                }));
            }
            validate::validate(&object).map_err(invalid)?;
            let key = ObjectKey::of(kind, &object);
            if key.namespace.is_empty() {
                return Err(invalid(ValidationError::Field {
                    kind,
                    name,
                    error: FieldError::new("metadata.namespace", "required"),
                }));
            }
            checked.push((key, object));
        }
        let mut applied = Vec::with_capacity(checked.len());
        for (key, mut object) in checked {
            let before = self.cache().objects.get(&key).cloned();
            // Status belongs to the controllers (the status subresource).
            if let Some(map) = object.as_object_mut() {
                map.remove("status");
            }
            let given = object
                .pointer("/metadata/resourceVersion")
                .and_then(Value::as_str)
                .map(str::to_string);
            let dynamic: DynamicObject =
                serde_json::from_value(object).map_err(|e| StoreError::Database {
                    path: "the Kubernetes API".into(),
                    message: e.to_string(),
                })?;
            let result = self
                .api(key.kind, &key.namespace)
                .patch(
                    &key.name,
                    &PatchParams::apply(FIELD_MANAGER).force(),
                    &Patch::Apply(&dynamic),
                )
                .await;
            let stored = match result {
                Ok(o) => Arc::new(to_value(key.kind, &o)),
                Err(kube::Error::Api(status)) if status.code == 409 => {
                    return Err(StoreError::Conflict {
                        current: before.as_deref().map_or(0, resource_version_of),
                        given: given.unwrap_or_default(),
                        key,
                    });
                }
                Err(e) => return Err(backend(&e)),
            };
            let action = match before {
                None => ApplyAction::Created,
                Some(old) if resource_version_of(&old) == resource_version_of(&stored) => {
                    ApplyAction::Unchanged
                }
                Some(_) => ApplyAction::Configured,
            };
            applied.push(Applied {
                action,
                object: stored,
            });
        }
        Ok(applied)
    }

    fn get(&self, key: &ObjectKey) -> Result<Option<Arc<Value>>, StoreError> {
        Ok(self.cache().objects.get(key).cloned())
    }

    fn list(&self, selector: &Selector) -> Result<Listed, StoreError> {
        let cache = self.cache();
        Ok(Listed::select(cache.version, &cache.objects, selector))
    }

    async fn delete(&self, key: &ObjectKey) -> Result<Arc<Value>, StoreError> {
        let last = self.cache().objects.get(key).cloned();
        match self
            .api(key.kind, &key.namespace)
            .delete(&key.name, &DeleteParams::default())
            .await
        {
            Ok(either) => Ok(either
                .left()
                .map(|o| Arc::new(to_value(key.kind, &o)))
                .or(last)
                .unwrap_or_default()),
            Err(kube::Error::Api(status)) if status.code == 404 => {
                Err(StoreError::NotFound(key.clone()))
            }
            Err(e) => Err(backend(&e)),
        }
    }

    fn watch(
        &self,
        selector: Selector,
        from: Option<u64>,
    ) -> Result<KubernetesWatcher, StoreError> {
        match from {
            None | Some(0) => {}
            Some(requested) => {
                return Err(StoreError::Gone {
                    requested,
                    oldest: self.cache().version,
                });
            }
        }
        Ok(KubernetesWatcher {
            store: self.clone(),
            selector,
            rx: None,
            pending: VecDeque::new(),
        })
    }
}

/// A watch of a [`KubernetesStore`].
#[derive(Debug)]
pub struct KubernetesWatcher {
    store: KubernetesStore,
    selector: Selector,
    rx: Option<broadcast::Receiver<WatchEvent>>,
    pending: VecDeque<WatchEvent>,
}

impl Watcher for KubernetesWatcher {
    async fn next(&mut self) -> Result<WatchEvent, StoreError> {
        if self.rx.is_none() {
            self.store.synced().await;
            let cache = self.store.cache();
            self.rx = Some(self.store.inner.events.subscribe());
            for (key, object) in &cache.objects {
                if self.selector.matches(key) {
                    self.pending.push_back(WatchEvent {
                        kind: EventType::Added,
                        object: Arc::clone(object),
                        resource_version: resource_version_of(object),
                    });
                }
            }
            let version = cache.version;
            self.pending.push_back(WatchEvent {
                kind: EventType::Bookmark,
                object: Arc::new(serde_json::json!({
                    "metadata": {"resourceVersion": version.to_string()},
                })),
                resource_version: version,
            });
        }
        if let Some(event) = self.pending.pop_front() {
            return Ok(event);
        }
        let Some(rx) = self.rx.as_mut() else {
            return Err(StoreError::Closed);
        };
        loop {
            match rx.recv().await {
                Ok(event) => {
                    let kind = validate::kind_of(&event.object).ok();
                    let key = kind.map(|k| ObjectKey::of(k, &event.object));
                    if key.is_some_and(|k| self.selector.matches(&k)) {
                        return Ok(event);
                    }
                }
                Err(broadcast::error::RecvError::Lagged(_)) => {
                    return Err(StoreError::Gone {
                        requested: 0,
                        oldest: self.store.cache().version,
                    });
                }
                Err(broadcast::error::RecvError::Closed) => return Err(StoreError::Closed),
            }
        }
    }
}
