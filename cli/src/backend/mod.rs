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
mod common;

pub use api::client as api_client;
pub use common::{Applied, ApplyError, Conn, Refused};
use mesh_crds::{Canary, validate::ResourceKind};
use serde_json::Value;

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
