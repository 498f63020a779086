//! The resource store: one trait, written the way the Kubernetes API behaves, so the control
//! plane's API and indexes, the rollout controller's embedded driver and the CLI work the same
//! over the embedded store ([`embedded::EmbeddedStore`], the default: a redb file in the state
//! directory) and over the Kubernetes API ([`kubernetes::KubernetesStore`], reads from
//! watch-fed caches, writes as server-side applies). It sits below the control plane and the
//! rollout controller, and above `mesh-crds`, whose validation every write passes.
//!
//! Objects are Kubernetes objects in their JSON form (`apiVersion`, `kind`, `metadata`, `spec`,
//! `status`), keyed by kind, namespace and name. Every write takes the next value of one global
//! `resourceVersion` counter; watches start from a version, replay what happened after it and
//! then follow live changes, or fail with [`StoreError::Gone`] once that history is no longer
//! kept, after which a client lists again.

pub mod embedded;
pub mod kubernetes;

use std::{fmt, future::Future, sync::Arc};

use mesh_crds::validate::{ResourceKind, ValidationError};
use serde::Serialize;
use serde_json::Value;

/// Identifies one object.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ObjectKey {
    /// Its kind.
    pub kind: ResourceKind,
    /// Its namespace.
    pub namespace: String,
    /// Its name.
    pub name: String,
}

impl ObjectKey {
    /// A key.
    pub fn new(kind: ResourceKind, namespace: impl Into<String>, name: impl Into<String>) -> Self {
        Self {
            kind,
            namespace: namespace.into(),
            name: name.into(),
        }
    }

    /// The key of a validated object (its namespace must be set).
    pub fn of(kind: ResourceKind, object: &Value) -> Self {
        let field = |f: &str| {
            object
                .pointer(f)
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string()
        };
        Self::new(kind, field("/metadata/namespace"), field("/metadata/name"))
    }
}

impl fmt::Display for ObjectKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}.{} {}/{}",
            self.kind.plural(),
            self.kind.group(),
            self.namespace,
            self.name
        )
    }
}

/// Which objects a list or watch covers.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Selector {
    /// Only this kind.
    pub kind: Option<ResourceKind>,
    /// Only this namespace.
    pub namespace: Option<String>,
    /// Only this name.
    pub name: Option<String>,
}

impl Selector {
    /// Every object of `kind`, optionally in one namespace.
    pub fn kind(kind: ResourceKind, namespace: Option<String>) -> Self {
        Self {
            kind: Some(kind),
            namespace,
            name: None,
        }
    }

    /// Whether `key` is selected.
    pub fn matches(&self, key: &ObjectKey) -> bool {
        self.kind.is_none_or(|k| k == key.kind)
            && self.namespace.as_deref().is_none_or(|n| n == key.namespace)
            && self.name.as_deref().is_none_or(|n| n == key.name)
    }
}

/// What an apply did to one object.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ApplyAction {
    /// It did not exist.
    Created,
    /// It existed and changed.
    Configured,
    /// It existed and the apply changed nothing; no version was used.
    Unchanged,
}

/// The outcome of applying one object.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Applied {
    /// What happened.
    pub action: ApplyAction,
    /// The object as stored, with the metadata the store sets.
    pub object: Arc<Value>,
}

/// A list and the version it was taken at; a watch from that version misses nothing.
#[derive(Clone, Debug, PartialEq)]
pub struct Listed {
    /// The store's version when the list was taken.
    pub resource_version: u64,
    /// The objects, ordered by kind, namespace and name.
    pub items: Vec<Arc<Value>>,
}

/// An object's `metadata.resourceVersion` as a number; 0 when it has none.
pub fn resource_version_of(object: &Value) -> u64 {
    object
        .pointer("/metadata/resourceVersion")
        .and_then(Value::as_str)
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

impl Listed {
    /// The objects of `objects` that `selector` selects, as listed at `resource_version`.
    pub fn select(
        resource_version: u64,
        objects: &std::collections::BTreeMap<ObjectKey, Arc<Value>>,
        selector: &Selector,
    ) -> Self {
        Self {
            resource_version,
            items: objects
                .iter()
                .filter(|(k, _)| selector.matches(k))
                .map(|(_, v)| Arc::clone(v))
                .collect(),
        }
    }
}

/// Kinds of watch events, with Kubernetes' names.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum EventType {
    /// The object was created (or existed when a watch started without a version).
    Added,
    /// The object changed.
    Modified,
    /// The object was deleted; the event carries its last state.
    Deleted,
    /// No object changed; `metadata.resourceVersion` of the event's object says how far the
    /// watch has read, so a client can resume from there.
    Bookmark,
}

/// One event of a watch.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct WatchEvent {
    /// What happened.
    #[serde(rename = "type")]
    pub kind: EventType,
    /// The object after the change (before it, for a deletion).
    pub object: Arc<Value>,
    /// The version of the change.
    #[serde(skip)]
    pub resource_version: u64,
}

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A document failed validation; nothing of the request was stored.
    #[error("document {index}: {source}")]
    Invalid {
        /// Position of the document in the request, from 0.
        index: usize,
        /// What was wrong with it.
        source: ValidationError,
    },
    /// The document's `metadata.resourceVersion` is not the stored one.
    #[error(
        "{key}: the object has been modified (resourceVersion {given} given, {current} stored); \
         get it again and reapply"
    )]
    Conflict {
        /// The object.
        key: ObjectKey,
        /// The version the client sent.
        given: String,
        /// The stored version (0 when the object does not exist).
        current: u64,
    },
    /// No such object.
    #[error("{0} not found")]
    NotFound(ObjectKey),
    /// A watch asked for history that is no longer kept.
    #[error(
        "resourceVersion {requested} is too old: history starts after {oldest}; list again and \
         watch from the list's resourceVersion"
    )]
    Gone {
        /// The version asked for.
        requested: u64,
        /// The oldest version a watch can start from.
        oldest: u64,
    },
    /// The database failed.
    #[error("store database at {path}: {message}")]
    Database {
        /// The database file.
        path: String,
        /// The error.
        message: String,
    },
    /// The store is shutting down.
    #[error("the store is closed")]
    Closed,
}

/// A running watch.
pub trait Watcher: Send {
    /// The next event; waits until there is one.
    fn next(&mut self) -> impl Future<Output = Result<WatchEvent, StoreError>> + Send;
}

/// A store of mesh resources with Kubernetes semantics.
pub trait ResourceStore: Send + Sync + 'static {
    /// The watch type.
    type Watcher: Watcher + 'static;

    /// Creates or replaces each object after validating all of them; a batch is atomic: either
    /// every object is stored or none is. Objects must carry their namespace.
    fn apply(
        &self,
        objects: Vec<Value>,
    ) -> impl Future<Output = Result<Vec<Applied>, StoreError>> + Send;

    /// The stored object, if any.
    fn get(&self, key: &ObjectKey) -> Result<Option<Arc<Value>>, StoreError>;

    /// The selected objects and the version they were read at.
    fn list(&self, selector: &Selector) -> Result<Listed, StoreError>;

    /// Deletes an object, returning its last state.
    fn delete(
        &self,
        key: &ObjectKey,
    ) -> impl Future<Output = Result<Arc<Value>, StoreError>> + Send;

    /// Watches the selected objects. Without a version (or with 0) the watch first sends every
    /// selected object as `ADDED` and a `BOOKMARK` carrying the snapshot's version; with a
    /// version it sends what changed after it.
    fn watch(&self, selector: Selector, from: Option<u64>) -> Result<Self::Watcher, StoreError>;
}

/// Changes an object's `status` with `edit` and stores it, retrying from a fresh read when
/// someone else wrote first (a few times, then the conflict is returned). A status that `edit`
/// leaves unchanged is not written.
pub async fn update_status<S: ResourceStore>(
    store: &S,
    key: &ObjectKey,
    edit: impl Fn(&mut Value),
) -> Result<(), StoreError> {
    let mut attempts = 0;
    loop {
        let Some(current) = store.get(key)? else {
            return Err(StoreError::NotFound(key.clone()));
        };
        let mut next = (*current).clone();
        if next.get("status").is_none_or(Value::is_null) {
            next["status"] = Value::Object(serde_json::Map::new());
        }
        edit(&mut next["status"]);
        if next == *current {
            return Ok(());
        }
        match store.apply(vec![next]).await {
            Err(StoreError::Conflict { .. }) if attempts < 5 => attempts += 1,
            other => return other.map(|_| ()),
        }
    }
}
