//! How `mesh tap` and `mesh top` reach a cluster's control plane by themselves: a port-forward
//! through the API server to a running control plane pod (what `kubectl port-forward` does, so a
//! user needs no second terminal), and the caller's bearer token from the kubeconfig (or
//! `--token-file`), which the control plane checks with TokenReview and a SubjectAccessReview.
//!
//! A port-forward rather than the API server's service proxy: the control plane's API listens on
//! the pod's loopback (a port-forward reaches it there), and the API server strips the caller's
//! `Authorization` header before it proxies to a service, so the control plane could not learn
//! who is tapping.

use anyhow::Context;
use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt;
use kube::api::ListParams;
use secrecy::ExposeSecret as _;

use crate::backend::Conn;
use crate::k8s::install::{CONTROLPLANE, NAMESPACE};
use crate::observe_api::Api;

/// The control plane's API port inside its pod (its default `MESH_CONTROLPLANE_ADDR`).
pub const API_PORT: u16 = 4180;

/// Flags of the commands that reach the control plane in a cluster.
#[derive(clap::Args, Debug, Clone)]
pub struct Reach {
    /// In a cluster (the current kubeconfig context): reach the control plane through the API
    /// server (a port-forward to one of its pods), with the kubeconfig's bearer token unless
    /// --token-file names one.
    #[arg(long)]
    pub kube: bool,
    #[command(flatten)]
    pub k8s: crate::k8s::KubeArgs,
    /// The namespace the mesh is installed in.
    #[arg(long, default_value = NAMESPACE)]
    pub mesh_namespace: String,
}

impl Reach {
    /// Whether the flags select a cluster.
    pub fn is_cluster(&self) -> bool {
        self.kube || self.k8s.kubeconfig.is_some() || self.k8s.context.is_some()
    }
}

/// A port-forward to a control plane pod, served on 127.0.0.1 until dropped.
pub struct Forward {
    /// `http://127.0.0.1:<port>`: the control plane's API, through the forward.
    pub server: String,
    /// The kubeconfig user's bearer token, when it has one.
    pub token: Option<String>,
    /// The pod forwarded to.
    pub pod: String,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Forward {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The bearer token of the kubeconfig's user: its `token`, or the contents of its `tokenFile`.
pub fn bearer_token(auth: &kube::config::AuthInfo) -> anyhow::Result<Option<String>> {
    if let Some(token) = &auth.token {
        return Ok(Some(token.expose_secret().trim().to_string()));
    }
    if let Some(path) = &auth.token_file {
        let token = std::fs::read_to_string(path)
            .with_context(|| format!("reading the kubeconfig user's tokenFile {path}"))?;
        return Ok(Some(token.trim().to_string()));
    }
    Ok(None)
}

/// The control plane pod to forward to: a running, ready one that is not being deleted, the
/// first by name so repeated commands pick the same one.
pub fn pick(pods: &[Pod]) -> Option<String> {
    let mut ready: Vec<String> = pods
        .iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .filter(|p| {
            let status = p.status.as_ref();
            status.and_then(|s| s.phase.as_deref()) == Some("Running")
                && status
                    .and_then(|s| s.conditions.as_ref())
                    .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
        })
        .map(ResourceExt::name_any)
        .collect();
    ready.sort();
    ready.into_iter().next()
}

/// Opens a port-forward to a ready control plane pod in `reach`'s mesh namespace, listening on
/// 127.0.0.1 (a port the system picks); every connection to it opens its own forwarded stream.
pub async fn control_plane(reach: &Reach) -> anyhow::Result<Forward> {
    let config = reach.k8s.config().await?;
    let token = bearer_token(&config.auth_info)?;
    let client = kube::Client::try_from(config).context("a client of the cluster")?;
    let ns = &reach.mesh_namespace;
    let pods: kube::Api<Pod> = kube::Api::namespaced(client, ns);
    let selector = format!("app.kubernetes.io/name={CONTROLPLANE}");
    let list = pods
        .list(&ListParams::default().labels(&selector))
        .await
        .with_context(|| format!("listing the control plane's pods ({selector}) in {ns}"))?;
    let pod = pick(&list.items).with_context(|| {
        format!(
            "no ready control plane pod ({selector}) in namespace {ns}: is the mesh installed \
             there (`mesh install`, or --mesh-namespace)?"
        )
    })?;
    // One forward up front: a refusal (no permission to port-forward, no kubelet) is said now,
    // not as a broken stream later.
    let first = pods
        .portforward(&pod, &[API_PORT])
        .await
        .with_context(|| format!("port-forwarding to pod {ns}/{pod}:{API_PORT}"))?;
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0))
        .await
        .context("listening for the port-forward on 127.0.0.1")?;
    let server = format!("http://{}", listener.local_addr()?);
    let name = pod.clone();
    let task = tokio::spawn(async move {
        let mut first = Some(first);
        while let Ok((mut conn, _)) = listener.accept().await {
            let forwarder = match first.take() {
                Some(f) => Ok(f),
                None => pods.portforward(&name, &[API_PORT]).await,
            };
            let mut forwarder = match forwarder {
                Ok(f) => f,
                Err(e) => {
                    tracing::warn!(error = %e, pod = %name, "port-forward");
                    continue;
                }
            };
            tokio::spawn(async move {
                if let Some(mut upstream) = forwarder.take_stream(API_PORT) {
                    let _ = tokio::io::copy_bidirectional(&mut conn, &mut upstream).await;
                }
                drop(forwarder.join().await);
            });
        }
    });
    Ok(Forward {
        server,
        token,
        pod,
        task,
    })
}

/// Where a tap goes: the control plane at --server with the token of --token-file; in a
/// cluster, through a port-forward to a control plane pod (kept open while the returned
/// forward lives), with the kubeconfig's bearer token unless --token-file names one.
pub async fn api(conn: &Conn, reach: &Reach) -> anyhow::Result<(Api, Option<Forward>)> {
    if !reach.is_cluster() {
        return Ok((Api::new(conn)?, None));
    }
    let forward = control_plane(reach).await?;
    tracing::debug!(pod = %forward.pod, server = %forward.server, "port-forward to the control plane");
    let api = match (&conn.token_file, &forward.token) {
        (Some(_), _) => Api::new(&Conn {
            server: forward.server.clone(),
            ..conn.clone()
        })?,
        (None, Some(token)) => Api::with_token(&forward.server, token)?,
        (None, None) => anyhow::bail!(
            "the kubeconfig's user has no bearer token to show the control plane (client \
             certificates and exec plugins stay with the API server): give --token-file, e.g. \
             from `kubectl create token <service account> -n <namespace>`"
        ),
    };
    Ok((api, Some(forward)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(name: &str, phase: &str, ready: bool, deleting: bool) -> Pod {
        let mut metadata = serde_json::json!({"name": name});
        if deleting {
            metadata["deletionTimestamp"] = "2026-01-01T00:00:00Z".into();
        }
        serde_json::from_value(serde_json::json!({
            "metadata": metadata,
            "status": {"phase": phase, "conditions": [
                {"type": "Ready", "status": if ready { "True" } else { "False" }}]},
        }))
        .unwrap()
    }

    #[test]
    fn the_forward_goes_to_a_ready_running_pod_not_being_deleted() {
        let pods = [
            pod("a", "Running", true, true),
            pod("b", "Pending", false, false),
            pod("c", "Running", false, false),
            pod("e", "Running", true, false),
            pod("d", "Running", true, false),
        ];
        assert_eq!(pick(&pods).as_deref(), Some("d"));
        assert_eq!(pick(&pods[..3]), None);
    }

    #[test]
    fn the_token_is_the_kubeconfig_users_or_its_token_file() {
        let mut auth = kube::config::AuthInfo {
            token: Some("  abc\n".to_string().into()),
            ..Default::default()
        };
        assert_eq!(bearer_token(&auth).unwrap().as_deref(), Some("abc"));
        let file = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(file.path(), "from-file\n").unwrap();
        auth.token = None;
        auth.token_file = Some(file.path().display().to_string());
        assert_eq!(bearer_token(&auth).unwrap().as_deref(), Some("from-file"));
        auth.token_file = None;
        assert_eq!(bearer_token(&auth).unwrap(), None);
    }
}
