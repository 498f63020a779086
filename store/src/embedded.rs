//! The embedded store: a redb file in the state directory, fronted by an in-memory copy.
//!
//! redb gives transactions and crash safety; every apply commits with immediate durability
//! before it is acknowledged, so an acknowledged write survives a crash. Reads and watches are
//! served from memory: the objects and the most recent events (the watch history) are loaded at
//! start and kept in step after each commit. Because every change takes the next version and is
//! logged, the history is a gap-free run of versions, so a watch resumes by index arithmetic.

use std::{
    collections::{BTreeMap, VecDeque},
    path::{Path, PathBuf},
    sync::{Arc, RwLock},
};

use mesh_crds::validate;
use redb::{Database, Durability, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::sync::{Mutex, watch};

use super::{
    Applied, ApplyAction, EventType, Listed, ObjectKey, ResourceStore, Selector, StoreError,
    WatchEvent, Watcher,
};

/// Objects by storage key (`<group>/<plural>/<namespace>/<name>`), as JSON.
const OBJECTS: TableDefinition<'_, &str, &[u8]> = TableDefinition::new("objects");
/// The watch history: events by version, as JSON.
const EVENTS: TableDefinition<'_, u64, &[u8]> = TableDefinition::new("events");
/// Counters.
const META: TableDefinition<'_, &str, u64> = TableDefinition::new("meta");
const RESOURCE_VERSION: &str = "resourceVersion";

/// The database file name inside the state directory.
pub const DB_FILE: &str = "store.redb";

/// Events kept for watches to resume from when nothing else is configured.
pub const DEFAULT_HISTORY: usize = 10_000;

fn storage_key(key: &ObjectKey) -> String {
    format!(
        "{}/{}/{}/{}",
        key.kind.group(),
        key.kind.plural(),
        key.namespace,
        key.name
    )
}

/// One row of a commit: version, storage key, the object (none when deleted), the event.
type Row = (u64, String, Option<Vec<u8>>, Vec<u8>);

#[derive(Serialize, Deserialize)]
struct StoredEvent {
    #[serde(rename = "type")]
    kind: EventType,
    object: Value,
}

#[derive(Clone, Debug)]
struct Event {
    key: ObjectKey,
    event: WatchEvent,
}

#[derive(Default)]
struct State {
    objects: BTreeMap<ObjectKey, Arc<Value>>,
    history: VecDeque<Event>,
    resource_version: u64,
}

impl State {
    /// Events after `from`, or `Gone` if some of them are no longer kept.
    fn events_after(
        &self,
        from: u64,
    ) -> Result<std::collections::vec_deque::Iter<'_, Event>, StoreError> {
        let oldest = self
            .history
            .front()
            .map_or(self.resource_version, |e| e.event.resource_version - 1);
        if from > self.resource_version || (from < oldest && from < self.resource_version) {
            return Err(StoreError::Gone {
                requested: from,
                oldest,
            });
        }
        let start = usize::try_from(from.saturating_sub(oldest)).unwrap_or(usize::MAX);
        Ok(self.history.range(start.min(self.history.len())..))
    }
}

/// The embedded store. Cheap to clone; clones share the database.
#[derive(Clone)]
pub struct EmbeddedStore {
    inner: Arc<Inner>,
}

struct Inner {
    db: Arc<Database>,
    path: PathBuf,
    history: usize,
    state: RwLock<State>,
    /// One writer at a time, held across the database commit and the memory update so both
    /// see changes in the same order.
    writer: Mutex<()>,
    version_tx: watch::Sender<u64>,
}

impl EmbeddedStore {
    /// Opens (or creates) the store in `state_dir`, keeping `history` events for watches.
    pub fn open(state_dir: &Path, history: usize) -> Result<Self, StoreError> {
        let path = state_dir.join(DB_FILE);
        let db_err = |e: &dyn std::fmt::Display| StoreError::Database {
            path: path.display().to_string(),
            message: e.to_string(),
        };
        std::fs::create_dir_all(state_dir).map_err(|e| db_err(&e))?;
        let db = Database::create(&path).map_err(|e| match e {
            redb::DatabaseError::DatabaseAlreadyOpen => db_err(
                &"another process (a running `mesh up` or control plane?) has it open; stop that \
                  one, or give this one its own --state-dir",
            ),
            e => db_err(&e),
        })?;
        let mut state = State::default();
        {
            // Create the tables on first start so reads never see them missing.
            let txn = db.begin_write().map_err(|e| db_err(&e))?;
            {
                txn.open_table(OBJECTS).map_err(|e| db_err(&e))?;
                txn.open_table(EVENTS).map_err(|e| db_err(&e))?;
                txn.open_table(META).map_err(|e| db_err(&e))?;
            }
            txn.commit().map_err(|e| db_err(&e))?;
            let read = db.begin_read().map_err(|e| db_err(&e))?;
            let meta = read.open_table(META).map_err(|e| db_err(&e))?;
            state.resource_version = meta
                .get(RESOURCE_VERSION)
                .map_err(|e| db_err(&e))?
                .map_or(0, |v| v.value());
            let objects = read.open_table(OBJECTS).map_err(|e| db_err(&e))?;
            for row in objects.iter().map_err(|e| db_err(&e))? {
                let (_, value) = row.map_err(|e| db_err(&e))?;
                let object: Value =
                    serde_json::from_slice(value.value()).map_err(|e| db_err(&e))?;
                let kind = validate::kind_of(&object).map_err(|e| db_err(&e))?;
                state
                    .objects
                    .insert(ObjectKey::of(kind, &object), Arc::new(object));
            }
            let events = read.open_table(EVENTS).map_err(|e| db_err(&e))?;
            for row in events.iter().map_err(|e| db_err(&e))? {
                let (rv, value) = row.map_err(|e| db_err(&e))?;
                let stored: StoredEvent =
                    serde_json::from_slice(value.value()).map_err(|e| db_err(&e))?;
                let kind = validate::kind_of(&stored.object).map_err(|e| db_err(&e))?;
                state.history.push_back(Event {
                    key: ObjectKey::of(kind, &stored.object),
                    event: WatchEvent {
                        kind: stored.kind,
                        object: Arc::new(stored.object),
                        resource_version: rv.value(),
                    },
                });
            }
        }
        let (version_tx, _) = watch::channel(state.resource_version);
        Ok(Self {
            inner: Arc::new(Inner {
                db: Arc::new(db),
                path,
                history: history.max(1),
                state: RwLock::new(state),
                writer: Mutex::new(()),
                version_tx,
            }),
        })
    }

    /// The store's current version.
    pub fn resource_version(&self) -> u64 {
        *self.inner.version_tx.borrow()
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, State> {
        // A panic while holding the lock leaves consistent data (updates are applied after the
        // commit, each a plain insert), so a poisoned lock is still usable.
        self.inner
            .state
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn db_error(&self, e: &dyn std::fmt::Display) -> StoreError {
        StoreError::Database {
            path: self.inner.path.display().to_string(),
            message: e.to_string(),
        }
    }

    /// Commits `events` (already versioned) and returns once they are durable.
    async fn commit(&self, events: Vec<Event>, resource_version: u64) -> Result<(), StoreError> {
        let db = Arc::clone(&self.inner.db);
        let history = self.inner.history;
        let this = self.clone();
        let rows: Vec<Row> = events
            .iter()
            .map(|e| {
                let object = (e.event.kind != EventType::Deleted)
                    .then(|| serde_json::to_vec(&*e.event.object).unwrap_or_default());
                let stored = serde_json::to_vec(&StoredEvent {
                    kind: e.event.kind,
                    object: (*e.event.object).clone(),
                })
                .unwrap_or_default();
                (
                    e.event.resource_version,
                    storage_key(&e.key),
                    object,
                    stored,
                )
            })
            .collect();
        tokio::task::spawn_blocking(move || -> Result<(), redb::Error> {
            let mut txn = db.begin_write()?;
            txn.set_durability(Durability::Immediate)?;
            {
                let mut objects = txn.open_table(OBJECTS)?;
                let mut log = txn.open_table(EVENTS)?;
                for (rv, key, object, stored) in &rows {
                    match object {
                        Some(bytes) => objects.insert(key.as_str(), bytes.as_slice())?,
                        None => objects.remove(key.as_str())?,
                    };
                    log.insert(rv, stored.as_slice())?;
                }
                let keep_from = resource_version.saturating_sub(history as u64);
                loop {
                    let first = log.first()?.map(|(rv, _)| rv.value());
                    match first {
                        Some(rv) if rv <= keep_from => {
                            log.pop_first()?;
                        }
                        _ => break,
                    }
                }
                txn.open_table(META)?
                    .insert(RESOURCE_VERSION, resource_version)?;
            }
            txn.commit()?;
            Ok(())
        })
        .await
        .map_err(|e| this.db_error(&e))?
        .map_err(|e| this.db_error(&e))?;

        let mut state = self
            .inner
            .state
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for e in events {
            match e.event.kind {
                EventType::Deleted => {
                    state.objects.remove(&e.key);
                }
                _ => {
                    state
                        .objects
                        .insert(e.key.clone(), Arc::clone(&e.event.object));
                }
            }
            state.history.push_back(e);
        }
        while state.history.len() > history {
            state.history.pop_front();
        }
        state.resource_version = resource_version;
        drop(state);
        self.inner.version_tx.send_replace(resource_version);
        Ok(())
    }
}

fn now_rfc3339() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

fn new_uid() -> String {
    let mut b = [0u8; 16];
    // Without OS randomness nothing secure works anyway; fall back to a time-based id rather
    // than failing a write.
    if getrandom::fill(&mut b).is_err() {
        let nanos = chrono::Utc::now().timestamp_nanos_opt().unwrap_or_default();
        b = nanos.to_le_bytes().repeat(2).try_into().unwrap_or_default();
    }
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

fn meta_mut(object: &mut Value) -> &mut serde_json::Map<String, Value> {
    if !object.get("metadata").is_some_and(Value::is_object) {
        object["metadata"] = Value::Object(serde_json::Map::new());
    }
    match object.get_mut("metadata") {
        Some(Value::Object(m)) => m,
        _ => unreachable!("metadata was just made an object"),
    }
}

/// Builds the object to store from the one applied and the one stored, or `None` if nothing
/// changes.
fn merge(mut incoming: Value, existing: Option<&Value>, rv: u64) -> Option<Value> {
    // Fields only the store sets.
    for field in [
        "resourceVersion",
        "uid",
        "creationTimestamp",
        "generation",
        "managedFields",
    ] {
        meta_mut(&mut incoming).remove(field);
    }
    let Some(existing) = existing else {
        let meta = meta_mut(&mut incoming);
        meta.insert("uid".into(), new_uid().into());
        meta.insert("creationTimestamp".into(), now_rfc3339().into());
        meta.insert("generation".into(), 1.into());
        meta.insert("resourceVersion".into(), rv.to_string().into());
        return Some(incoming);
    };
    // An apply that leaves out the status keeps the one the controller wrote, as applying a
    // manifest in Kubernetes never touches the status subresource.
    if incoming.get("status").is_none()
        && let Some(status) = existing.get("status")
    {
        incoming["status"] = status.clone();
    }
    let old_meta = existing.get("metadata");
    let carried = |f: &str| old_meta.and_then(|m| m.get(f)).cloned().unwrap_or_default();
    let generation = carried("generation").as_u64().unwrap_or(1);
    let spec_changed = incoming.get("spec") != existing.get("spec");
    {
        let meta = meta_mut(&mut incoming);
        meta.insert("uid".into(), carried("uid"));
        meta.insert("creationTimestamp".into(), carried("creationTimestamp"));
        meta.insert(
            "generation".into(),
            (generation + u64::from(spec_changed)).into(),
        );
        meta.insert("resourceVersion".into(), carried("resourceVersion"));
    }
    if &incoming == existing {
        return None;
    }
    meta_mut(&mut incoming).insert("resourceVersion".into(), rv.to_string().into());
    Some(incoming)
}

impl ResourceStore for EmbeddedStore {
    type Watcher = EmbeddedWatcher;

    async fn apply(&self, objects: Vec<Value>) -> Result<Vec<Applied>, StoreError> {
        // Validate everything before taking the writer lock: a batch is all or nothing.
        let mut checked = Vec::with_capacity(objects.len());
        for (index, object) in objects.into_iter().enumerate() {
            let invalid = |source| StoreError::Invalid { index, source };
            validate::validate(&object).map_err(invalid)?;
            let kind = validate::kind_of(&object).map_err(invalid)?;
            let key = ObjectKey::of(kind, &object);
            if key.namespace.is_empty() {
                return Err(invalid(validate::ValidationError::Field {
                    kind,
                    name: key.name,
                    error: validate::FieldError::new("metadata.namespace", "required"),
                }));
            }
            checked.push((key, object));
        }

        let _writer = self.inner.writer.lock().await;
        let mut rv = self.resource_version();
        let mut events = Vec::new();
        let mut results = Vec::with_capacity(checked.len());
        {
            let state = self.read();
            // Later documents in a batch see earlier ones, as if applied one after another.
            let mut pending: BTreeMap<ObjectKey, Arc<Value>> = BTreeMap::new();
            for (key, object) in checked {
                let existing = pending
                    .get(&key)
                    .or_else(|| state.objects.get(&key))
                    .cloned();
                let given = object
                    .pointer("/metadata/resourceVersion")
                    .and_then(Value::as_str)
                    .filter(|v| !v.is_empty())
                    .map(str::to_string);
                if let Some(given) = given {
                    let current = existing.as_deref().map_or(0, super::resource_version_of);
                    if given != current.to_string() {
                        return Err(StoreError::Conflict {
                            key,
                            given,
                            current,
                        });
                    }
                }
                match merge(object, existing.as_deref(), rv + 1) {
                    None => results.push(Applied {
                        action: ApplyAction::Unchanged,
                        object: existing.unwrap_or_default(),
                    }),
                    Some(stored) => {
                        rv += 1;
                        let stored = Arc::new(stored);
                        let action = if existing.is_some() {
                            ApplyAction::Configured
                        } else {
                            ApplyAction::Created
                        };
                        pending.insert(key.clone(), Arc::clone(&stored));
                        events.push(Event {
                            key,
                            event: WatchEvent {
                                kind: if existing.is_some() {
                                    EventType::Modified
                                } else {
                                    EventType::Added
                                },
                                object: Arc::clone(&stored),
                                resource_version: rv,
                            },
                        });
                        results.push(Applied {
                            action,
                            object: stored,
                        });
                    }
                }
            }
        }
        if !events.is_empty() {
            self.commit(events, rv).await?;
        }
        Ok(results)
    }

    fn get(&self, key: &ObjectKey) -> Result<Option<Arc<Value>>, StoreError> {
        Ok(self.read().objects.get(key).cloned())
    }

    fn list(&self, selector: &Selector) -> Result<Listed, StoreError> {
        let state = self.read();
        Ok(Listed::select(
            state.resource_version,
            &state.objects,
            selector,
        ))
    }

    async fn delete(&self, key: &ObjectKey) -> Result<Arc<Value>, StoreError> {
        let _writer = self.inner.writer.lock().await;
        let rv = self.resource_version() + 1;
        let existing = self
            .get(key)?
            .ok_or_else(|| StoreError::NotFound(key.clone()))?;
        let mut last = (*existing).clone();
        meta_mut(&mut last).insert("resourceVersion".into(), rv.to_string().into());
        let last = Arc::new(last);
        let event = Event {
            key: key.clone(),
            event: WatchEvent {
                kind: EventType::Deleted,
                object: Arc::clone(&last),
                resource_version: rv,
            },
        };
        self.commit(vec![event], rv).await?;
        Ok(last)
    }

    fn watch(&self, selector: Selector, from: Option<u64>) -> Result<EmbeddedWatcher, StoreError> {
        let mut version_rx = self.inner.version_tx.subscribe();
        version_rx.mark_changed();
        let state = self.read();
        let mut pending = VecDeque::new();
        let last = match from {
            None | Some(0) => {
                for (key, object) in &state.objects {
                    if selector.matches(key) {
                        pending.push_back(WatchEvent {
                            kind: EventType::Added,
                            object: Arc::clone(object),
                            resource_version: state.resource_version,
                        });
                    }
                }
                pending.push_back(bookmark(state.resource_version));
                state.resource_version
            }
            Some(v) => {
                state.events_after(v)?;
                v
            }
        };
        drop(state);
        Ok(EmbeddedWatcher {
            store: self.clone(),
            selector,
            last,
            pending,
            version_rx,
        })
    }
}

/// A `BOOKMARK` event at `rv`.
pub fn bookmark(rv: u64) -> WatchEvent {
    WatchEvent {
        kind: EventType::Bookmark,
        object: Arc::new(serde_json::json!({"metadata": {"resourceVersion": rv.to_string()}})),
        resource_version: rv,
    }
}

/// A watch on the embedded store.
pub struct EmbeddedWatcher {
    store: EmbeddedStore,
    selector: Selector,
    last: u64,
    pending: VecDeque<WatchEvent>,
    version_rx: watch::Receiver<u64>,
}

impl EmbeddedWatcher {
    /// The version of the last event handed out (or skipped as not selected).
    pub fn resource_version(&self) -> u64 {
        self.last
    }
}

impl Watcher for EmbeddedWatcher {
    async fn next(&mut self) -> Result<WatchEvent, StoreError> {
        loop {
            if let Some(event) = self.pending.pop_front() {
                return Ok(event);
            }
            // Mark the current version seen before reading, so a commit landing after the read
            // wakes `changed` below.
            let _ = self.version_rx.borrow_and_update();
            {
                let state = self.store.read();
                let events = state.events_after(self.last)?;
                for e in events {
                    if self.selector.matches(&e.key) {
                        self.pending.push_back(e.event.clone());
                    }
                }
                self.last = state.resource_version.max(self.last);
            }
            if self.pending.is_empty() {
                self.version_rx
                    .changed()
                    .await
                    .map_err(|_| StoreError::Closed)?;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use mesh_crds::validate::ResourceKind;
    use serde_json::json;

    use super::*;

    fn mk_route(name: &str, canary_weight: i64) -> Value {
        json!({
            "apiVersion": "gateway.networking.k8s.io/v1",
            "kind": "HTTPRoute",
            "metadata": {"name": name, "namespace": "default"},
            "spec": {
                "parentRefs": [{"name": "web", "kind": "Service", "port": 80}],
                "rules": [{"backendRefs": [
                    {"name": "web-primary", "port": 80, "weight": 100 - canary_weight},
                    {"name": "web-canary", "port": 80, "weight": canary_weight},
                ]}]
            }
        })
    }

    fn key(name: &str) -> ObjectKey {
        ObjectKey::new(ResourceKind::HttpRoute, "default", name)
    }

    fn rv_of(v: &Value) -> u64 {
        v.pointer("/metadata/resourceVersion")
            .and_then(Value::as_str)
            .unwrap()
            .parse()
            .unwrap()
    }

    #[tokio::test]
    async fn apply_sets_metadata_and_reapply_is_unchanged() {
        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedStore::open(dir.path(), 100).unwrap();
        let out = store.apply(vec![mk_route("web", 10)]).await.unwrap();
        assert_eq!(out[0].action, ApplyAction::Created);
        let obj = &out[0].object;
        assert_eq!(rv_of(obj), 1);
        assert_eq!(obj["metadata"]["generation"], 1);
        assert!(obj["metadata"]["uid"].as_str().unwrap().len() == 36);
        assert!(obj["metadata"]["creationTimestamp"].is_string());

        let again = store.apply(vec![mk_route("web", 10)]).await.unwrap();
        assert_eq!(again[0].action, ApplyAction::Unchanged);
        assert_eq!(store.resource_version(), 1);

        let changed = store.apply(vec![mk_route("web", 20)]).await.unwrap();
        assert_eq!(changed[0].action, ApplyAction::Configured);
        assert_eq!(rv_of(&changed[0].object), 2);
        assert_eq!(changed[0].object["metadata"]["generation"], 2);
        assert_eq!(changed[0].object["metadata"]["uid"], obj["metadata"]["uid"]);
    }

    #[tokio::test]
    async fn a_batch_with_one_invalid_document_stores_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedStore::open(dir.path(), 100).unwrap();
        let err = store
            .apply(vec![mk_route("a", 10), mk_route("b", -5)])
            .await
            .unwrap_err();
        match err {
            StoreError::Invalid { index, source } => {
                assert_eq!(index, 1);
                assert_eq!(source.field(), Some("spec.rules[0].backendRefs[1].weight"));
            }
            other => panic!("unexpected {other}"),
        }
        assert!(store.get(&key("a")).unwrap().is_none());
        assert_eq!(store.resource_version(), 0);
    }

    #[tokio::test]
    async fn stale_resource_versions_conflict() {
        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedStore::open(dir.path(), 100).unwrap();
        store.apply(vec![mk_route("web", 10)]).await.unwrap();
        store.apply(vec![mk_route("web", 20)]).await.unwrap();
        let mut stale = mk_route("web", 30);
        stale["metadata"]["resourceVersion"] = json!("1");
        assert!(matches!(
            store.apply(vec![stale]).await,
            Err(StoreError::Conflict { current: 2, .. })
        ));
    }

    #[tokio::test]
    async fn objects_and_history_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = EmbeddedStore::open(dir.path(), 100).unwrap();
            store
                .apply(vec![mk_route("a", 10), mk_route("b", 20)])
                .await
                .unwrap();
            store.delete(&key("a")).await.unwrap();
        }
        let store = EmbeddedStore::open(dir.path(), 100).unwrap();
        assert_eq!(store.resource_version(), 3);
        assert!(store.get(&key("a")).unwrap().is_none());
        assert_eq!(
            store.get(&key("b")).unwrap().unwrap()["spec"]["rules"][0]["backendRefs"][1]["weight"],
            20
        );
        // Resuming from version 1 replays b's creation and a's deletion.
        let mut w = store.watch(Selector::default(), Some(1)).unwrap();
        let e = w.next().await.unwrap();
        assert_eq!((e.kind, e.resource_version), (EventType::Added, 2));
        let e = w.next().await.unwrap();
        assert_eq!((e.kind, e.resource_version), (EventType::Deleted, 3));
        assert_eq!(e.object["metadata"]["name"], "a");
    }

    #[tokio::test]
    async fn watch_sends_a_snapshot_then_deltas() {
        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedStore::open(dir.path(), 100).unwrap();
        store.apply(vec![mk_route("a", 10)]).await.unwrap();
        let mut w = store
            .watch(Selector::kind(ResourceKind::HttpRoute, None), None)
            .unwrap();
        assert_eq!(w.next().await.unwrap().kind, EventType::Added);
        let b = w.next().await.unwrap();
        assert_eq!((b.kind, b.resource_version), (EventType::Bookmark, 1));
        store.apply(vec![mk_route("a", 50)]).await.unwrap();
        let m = w.next().await.unwrap();
        assert_eq!(m.kind, EventType::Modified);
        assert_eq!(m.object["spec"]["rules"][0]["backendRefs"][1]["weight"], 50);
        store.delete(&key("a")).await.unwrap();
        assert_eq!(w.next().await.unwrap().kind, EventType::Deleted);
    }

    #[tokio::test]
    async fn watches_from_before_the_history_are_gone() {
        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedStore::open(dir.path(), 3).unwrap();
        for w in 0..6 {
            store.apply(vec![mk_route("web", w)]).await.unwrap();
        }
        // History holds versions 4..=6: resuming from 3 works, from 2 does not.
        assert!(store.watch(Selector::default(), Some(3)).is_ok());
        assert!(matches!(
            store.watch(Selector::default(), Some(2)),
            Err(StoreError::Gone {
                requested: 2,
                oldest: 3
            })
        ));
        assert!(matches!(
            store.watch(Selector::default(), Some(99)),
            Err(StoreError::Gone { .. })
        ));
        // After reopening the trimmed history is still the same.
        drop(store);
        let store = EmbeddedStore::open(dir.path(), 3).unwrap();
        let mut w = store.watch(Selector::default(), Some(3)).unwrap();
        assert_eq!(w.next().await.unwrap().resource_version, 4);
        assert!(store.watch(Selector::default(), Some(2)).is_err());
    }

    #[tokio::test]
    async fn status_survives_an_apply_without_one() {
        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedStore::open(dir.path(), 100).unwrap();
        let mut with_status = mk_route("web", 10);
        with_status["status"] = json!({"parents": []});
        store.apply(vec![with_status]).await.unwrap();
        let out = store.apply(vec![mk_route("web", 10)]).await.unwrap();
        assert_eq!(out[0].action, ApplyAction::Unchanged);
        assert_eq!(out[0].object["status"], json!({"parents": []}));
    }
}
