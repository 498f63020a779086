//! Where the commands that read and change mesh resources (`mesh get|apply|delete` and
//! `mesh rollout ...`) find them: the embedded control plane's resource API (the default,
//! `--server`), or a Kubernetes cluster (`--kube`, `--kubeconfig` or `--context`).
//!
//! Both backends speak in Kubernetes' terms, objects as JSON and refusals as a `Status`, so a
//! command is written once and prints the same tables, objects and errors in either mode. What
//! differs is said where it differs: the embedded API validates a batch and stores all of it or
//! nothing; in a cluster the batch is validated here first with the same rules (so a bad
//! document still writes nothing) and then server-side applied object by object, since
//! Kubernetes has no multi-object transactions; and `Workload` exists only in the embedded mesh.

mod api;
mod cluster;

use mesh_crds::{Canary, validate::ResourceKind};
use serde_json::Value;

/// Where the control plane is and which namespace to work in.
#[derive(clap::Args, Debug, Clone)]
pub struct Conn {
    /// The control plane's resource API.
    #[arg(long, env = "MESH_SERVER", default_value = "http://127.0.0.1:4180")]
    pub server: String,
    /// Namespace of the resources.
    #[arg(short = 'n', long, default_value = "default")]
    pub namespace: String,
}

/// Where the resources live: the embedded control plane (`--server`, the default), or a
/// Kubernetes cluster (`--kube`, `--kubeconfig` or `--context`).
#[derive(clap::Args, Debug, Clone)]
pub struct Where {
    #[command(flatten)]
    pub conn: Conn,
    /// Work on the Kubernetes cluster of the current kubeconfig context instead of the
    /// embedded control plane.
    #[arg(long)]
    pub kube: bool,
    #[command(flatten)]
    pub k8s: crate::k8s::KubeArgs,
}

impl Where {
    /// Whether the flags select a cluster.
    pub fn is_cluster(&self) -> bool {
        self.kube || self.k8s.kubeconfig.is_some() || self.k8s.context.is_some()
    }
}

/// What an apply did to one object.
#[derive(Clone, Debug, PartialEq)]
pub struct Applied {
    /// `created`, `configured` or `unchanged`.
    pub action: String,
    /// The object as stored.
    pub object: Value,
}

/// A request the store refused, as its Kubernetes `Status` tells it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refused {
    /// The HTTP status code.
    pub code: u16,
    /// The `Status` reason (`NotFound`, `Invalid`, `Conflict`, ...).
    pub reason: String,
    /// What the store said.
    pub message: String,
}

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "from server ({}): {}", self.reason, self.message)
    }
}

impl std::error::Error for Refused {}

impl Refused {
    /// Whether `e` is a refusal because the object does not exist.
    pub fn is_not_found(e: &anyhow::Error) -> bool {
        e.downcast_ref::<Self>().is_some_and(|r| r.code == 404)
    }
}

/// Why an apply stopped.
#[derive(Debug)]
pub enum ApplyError {
    /// One document was refused, by validation or by the store.
    Document {
        /// Its position in the batch, from 0.
        index: usize,
        /// The field at fault, when one is named.
        field: Option<String>,
        /// What is wrong.
        message: String,
        /// What was written before it: nothing through the embedded API, whose batches are
        /// atomic, nor when validation refused it; in a cluster, the documents before it when
        /// the apiserver refused it.
        applied: Vec<Applied>,
    },
    /// The request failed as a whole; nothing was written.
    Request(anyhow::Error),
}

impl From<anyhow::Error> for ApplyError {
    fn from(e: anyhow::Error) -> Self {
        Self::Request(e)
    }
}

/// The store the commands read and change.
pub enum Backend {
    /// The embedded control plane's resource API over HTTP.
    Api(api::ResourceApi),
    /// A Kubernetes cluster.
    Cluster(cluster::Cluster),
}

impl Backend {
    /// Connects to the store `at` selects.
    pub async fn connect(at: &Where) -> anyhow::Result<Self> {
        if at.is_cluster() {
            let config = at.k8s.config().await?;
            Ok(Self::Cluster(cluster::Cluster::new(
                config,
                &at.conn.namespace,
            )?))
        } else {
            Ok(Self::Api(api::ResourceApi::new(&at.conn)?))
        }
    }

    /// The namespace the commands work in.
    pub fn namespace(&self) -> &str {
        match self {
            Self::Api(a) => a.namespace(),
            Self::Cluster(c) => c.namespace(),
        }
    }

    /// One object; a [`Refused`] with code 404 when there is none.
    pub async fn get(&self, kind: ResourceKind, name: &str) -> anyhow::Result<Value> {
        match self {
            Self::Api(a) => a.get(kind, name).await,
            Self::Cluster(c) => c.get(kind, name).await,
        }
    }

    /// Every object of `kind` in the namespace, as a Kubernetes list (`<Kind>List` with
    /// `items`).
    pub async fn list(&self, kind: ResourceKind) -> anyhow::Result<Value> {
        match self {
            Self::Api(a) => a.list(kind).await,
            Self::Cluster(c) => c.list(kind).await,
        }
    }

    /// Creates or updates `documents`; those without a namespace go to the backend's.
    pub async fn apply(&self, documents: Vec<Value>) -> Result<Vec<Applied>, ApplyError> {
        match self {
            Self::Api(a) => a.apply(documents).await,
            Self::Cluster(c) => c.apply(documents).await,
        }
    }

    /// Deletes one object.
    pub async fn delete(&self, kind: ResourceKind, name: &str) -> anyhow::Result<()> {
        match self {
            Self::Api(a) => a.delete(kind, name).await,
            Self::Cluster(c) => c.delete(kind, name).await,
        }
    }

    /// Applies a JSON merge patch (RFC 7386) to an object's metadata and spec, never its
    /// status (which belongs to the controllers); returns the object as stored.
    pub async fn merge_patch(
        &self,
        kind: ResourceKind,
        name: &str,
        patch: &Value,
    ) -> anyhow::Result<Value> {
        match self {
            Self::Api(a) => a.merge_patch(kind, name, patch).await,
            Self::Cluster(c) => c.merge_patch(kind, name, patch).await,
        }
    }

    /// The revision the Canary's target asks for: an embedded Workload's, or in a cluster the
    /// hash of the target Deployment's pod template, as the Kubernetes driver computes it.
    /// `None` when the target cannot be read. A rollout whose status has not caught up with it
    /// is still to come, however its phase reads (right after `mesh apply`, the controller has
    /// not seen the new version yet).
    pub async fn target_revision(&self, canary: &Canary) -> Option<String> {
        match self {
            Self::Api(a) => a.workload_revision(&canary.spec.target_ref.name).await,
            Self::Cluster(c) => c.deployment_revision(&canary.spec.target_ref.name).await,
        }
    }
}
