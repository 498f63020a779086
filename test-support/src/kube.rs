//! A real etcd + kube-apiserver on loopback, with our CRDs installed.
//!
//! The binaries are built from Go modules by `scripts/build-kube-binaries` and cached outside the
//! work tree; this module finds them (`MESH_KUBE_BIN_DIR`, else the cache directory for the
//! pinned version), generates a CA, serving and client certificates and a service-account key,
//! starts both processes on free ports, waits for `/readyz`, installs every CRD from `mesh-crds`
//! and waits until each is Established. Dropping the handle kills both processes.

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use k8s_openapi::api::apps::v1::{Deployment, DeploymentStatus};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::{
    Api, Client, Config,
    api::{ListParams, Patch, PatchParams, PostParams},
    config::{
        AuthInfo, Cluster, Context, KubeConfigOptions, Kubeconfig, NamedAuthInfo, NamedCluster,
        NamedContext,
    },
    runtime::wait::{await_condition, conditions},
};

use crate::{
    HarnessError, Result,
    certs::{Leaf, TestCa, write},
    ports::free_port,
    process::{ChildGuard, startup_timeout},
};

/// Directory holding `kube-apiserver` and `etcd`; overrides the cache lookup.
pub const ENV_KUBE_BIN_DIR: &str = "MESH_KUBE_BIN_DIR";
/// Root of the build cache shared with `scripts/build-kube-binaries`.
pub const ENV_CACHE_DIR: &str = "MESH_CACHE_DIR";

/// The wrapper module the binaries are built from; the pinned version is read from it.
const WRAPPER_GO_MOD: &str = include_str!("../kube/go.mod");

/// The Kubernetes release the harness's binaries are built at, e.g. `v1.36.3`.
pub fn pinned_version() -> &'static str {
    WRAPPER_GO_MOD
        .lines()
        .filter_map(|l| {
            let mut words = l.split_whitespace();
            match (words.next(), words.next()) {
                (Some("k8s.io/kubernetes"), Some(v)) if v.starts_with("v1.") => Some(v),
                (Some("require"), Some("k8s.io/kubernetes")) => words.next(),
                _ => None,
            }
        })
        .next()
        .unwrap_or("unknown")
}

/// Where the built binaries live: `MESH_KUBE_BIN_DIR`, else
/// `${MESH_CACHE_DIR:-${XDG_CACHE_HOME:-~/.cache}/mesh}/kube/<version>`.
pub fn bin_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os(ENV_KUBE_BIN_DIR) {
        return PathBuf::from(dir);
    }
    let root = std::env::var_os(ENV_CACHE_DIR)
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            std::env::var_os("XDG_CACHE_HOME")
                .map(PathBuf::from)
                .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
                .unwrap_or_else(|| PathBuf::from(".cache"))
                .join("mesh")
        });
    root.join("kube").join(pinned_version())
}

pub(crate) fn find(program: &str) -> Result<PathBuf> {
    let path = bin_dir().join(program);
    if path.is_file() {
        return Ok(path);
    }
    // Debian's etcd-server package is an acceptable etcd.
    if program == "etcd" && Path::new("/usr/bin/etcd").is_file() {
        return Ok(PathBuf::from("/usr/bin/etcd"));
    }
    Err(HarnessError::Missing {
        program: program.to_string(),
        hint: format!(
            "expected {}; run scripts/build-kube-binaries (or set {ENV_KUBE_BIN_DIR})",
            path.display()
        ),
    })
}

/// The `kubectl` built beside kube-apiserver (same release), for tests that drive the
/// apiserver as users do.
pub fn kubectl_bin() -> Result<PathBuf> {
    find("kubectl")
}

/// A running etcd + kube-apiserver with the mesh CRDs installed.
pub struct KubeApiServer {
    // Field order is drop order: the apiserver goes before the etcd it talks to.
    apiserver: ChildGuard,
    etcd: ChildGuard,
    client: Client,
    url: String,
    kubeconfig: PathBuf,
    dir: tempfile::TempDir,
}

impl std::fmt::Debug for KubeApiServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubeApiServer")
            .field("url", &self.url)
            .field("pids", &self.pids())
            .field("dir", &self.dir.path())
            .finish_non_exhaustive()
    }
}

impl KubeApiServer {
    /// Starts etcd and kube-apiserver, waits for readiness and installs the CRDs.
    pub async fn start() -> Result<Self> {
        let apiserver_bin = find("kube-apiserver")?;
        let etcd_bin = find("etcd")?;
        let dir = tempfile::Builder::new()
            .prefix("mesh-kube-")
            .tempdir()
            .map_err(HarnessError::io("creating the apiserver's directory"))?;
        let d = dir.path();

        let (etcd_client, etcd_peer) = (free_port()?, free_port()?);
        let mut etcd_cmd = Command::new(&etcd_bin);
        etcd_cmd.args([
            "--name=default".to_string(),
            format!("--data-dir={}", d.join("etcd").display()),
            format!("--listen-client-urls=http://127.0.0.1:{etcd_client}"),
            format!("--advertise-client-urls=http://127.0.0.1:{etcd_client}"),
            format!("--listen-peer-urls=http://127.0.0.1:{etcd_peer}"),
            format!("--initial-advertise-peer-urls=http://127.0.0.1:{etcd_peer}"),
            format!("--initial-cluster=default=http://127.0.0.1:{etcd_peer}"),
            "--log-level=warn".to_string(),
        ]);
        let etcd = ChildGuard::spawn("etcd", etcd_cmd, &d.join("etcd.log"))?;

        let ca = TestCa::new("mesh-test-kube-ca")?;
        let serving = ca.issue(
            &Leaf::new("kube-apiserver")
                .san("127.0.0.1")
                .san("localhost")
                .san("kubernetes.default.svc")
                .server(),
        )?;
        let admin = ca.issue(
            &Leaf::new("mesh-test-admin")
                .organization("system:masters")
                .client(),
        )?;
        let sa_key = rcgen::KeyPair::generate()?;

        let ca_path = write(d, "ca.crt", ca.cert_pem())?;
        let serving_cert = write(d, "apiserver.crt", &serving.cert_pem)?;
        let serving_key = write(d, "apiserver.key", &serving.key_pem)?;
        let admin_cert = write(d, "admin.crt", &admin.cert_pem)?;
        let admin_key = write(d, "admin.key", &admin.key_pem)?;
        let sa_private = write(d, "sa.key", &sa_key.serialize_pem())?;
        let sa_public = write(d, "sa.pub", &sa_key.public_key_pem())?;

        let port = free_port()?;
        let mut cmd = Command::new(&apiserver_bin);
        cmd.args([
            format!("--etcd-servers=http://127.0.0.1:{etcd_client}"),
            "--bind-address=127.0.0.1".to_string(),
            "--advertise-address=127.0.0.1".to_string(),
            format!("--secure-port={port}"),
            format!("--cert-dir={}", d.display()),
            format!("--tls-cert-file={}", serving_cert.display()),
            format!("--tls-private-key-file={}", serving_key.display()),
            format!("--client-ca-file={}", ca_path.display()),
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local".to_string(),
            format!("--service-account-key-file={}", sa_public.display()),
            format!(
                "--service-account-signing-key-file={}",
                sa_private.display()
            ),
            "--service-cluster-ip-range=10.0.0.0/24".to_string(),
            "--authorization-mode=RBAC".to_string(),
            // No controller-manager runs, so nothing would create the `default` service
            // account that this admission plugin insists on for every Pod.
            "--disable-admission-plugins=ServiceAccount".to_string(),
            "--allow-privileged=true".to_string(),
            "--profiling=false".to_string(),
            "--v=1".to_string(),
        ]);
        let apiserver = ChildGuard::spawn("kube-apiserver", cmd, &d.join("kube-apiserver.log"))?;

        let url = format!("https://127.0.0.1:{port}");
        let kubeconfig = write_kubeconfig(d, &url, &ca_path, &admin_cert, &admin_key)?;
        let config = Config::from_custom_kubeconfig(
            read_kubeconfig(&kubeconfig)?,
            &KubeConfigOptions::default(),
        )
        .await
        .map_err(|e| HarnessError::Io {
            context: format!("loading {}", kubeconfig.display()),
            source: std::io::Error::other(e),
        })?;
        let client = Client::try_from(config).map_err(HarnessError::kube("building a client"))?;

        let mut server = Self {
            apiserver,
            etcd,
            client,
            url,
            kubeconfig,
            dir,
        };
        server.wait_ready().await?;
        server.install_crds().await?;
        Ok(server)
    }

    async fn wait_ready(&mut self) -> Result<()> {
        let waited = startup_timeout();
        let start = Instant::now();
        let mut last = String::from("not polled yet");
        while start.elapsed() < waited {
            self.etcd
                .check_running()
                .map_err(|e| self.etcd.not_ready(waited, e))?;
            self.apiserver
                .check_running()
                .map_err(|e| self.apiserver.not_ready(waited, e))?;
            let req = http::Request::get("/readyz")
                .body(Vec::new())
                .map_err(|e| HarnessError::Io {
                    context: "building /readyz".into(),
                    source: std::io::Error::other(e),
                })?;
            match self.client.request_text(req).await {
                Ok(body) if body.trim() == "ok" => return Ok(()),
                Ok(body) => last = body,
                Err(e) => last = e.to_string(),
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        Err(self.apiserver.not_ready(waited, format!("/readyz: {last}")))
    }

    async fn install_crds(&self) -> Result<()> {
        let api: Api<CustomResourceDefinition> = Api::all(self.client.clone());
        for (_, crd) in mesh_crds::all() {
            let name = crd.metadata.name.clone().unwrap_or_default();
            api.create(&PostParams::default(), &crd)
                .await
                .map_err(HarnessError::kube(format!("creating CRD {name}")))?;
            let waited = startup_timeout();
            let established = await_condition(api.clone(), &name, conditions::is_crd_established());
            match tokio::time::timeout(waited, established).await {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => {
                    return Err(HarnessError::NotReady {
                        what: format!("CRD {name}"),
                        waited,
                        detail: e.to_string(),
                        log: self.apiserver.log().display().to_string(),
                        tail: self.apiserver.log_tail(20),
                    });
                }
                Err(_) => {
                    return Err(self
                        .apiserver
                        .not_ready(waited, format!("CRD {name} not Established")));
                }
            }
        }
        Ok(())
    }

    /// A client authenticated as a cluster admin.
    pub fn client(&self) -> Client {
        self.client.clone()
    }

    /// The apiserver's URL, e.g. `https://127.0.0.1:38123`.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// A kubeconfig for the admin client, for binaries under test.
    pub fn kubeconfig(&self) -> &Path {
        &self.kubeconfig
    }

    /// The directory holding certificates, data and logs.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The (etcd, kube-apiserver) process IDs.
    pub fn pids(&self) -> (u32, u32) {
        (self.etcd.pid(), self.apiserver.pid())
    }
}

/// Stand-ins for the parts of a cluster that are not here: no kubelet or controller-manager
/// runs beside the harness's apiserver, so tests play the node through these.
impl KubeApiServer {
    /// Installs one more CRD (e.g. the Gateway API's HTTPRoute) and waits until it is
    /// Established.
    pub async fn install_crd(&self, crd: CustomResourceDefinition) -> Result<()> {
        let api: Api<CustomResourceDefinition> = Api::all(self.client.clone());
        let name = crd.metadata.name.clone().unwrap_or_default();
        api.create(&PostParams::default(), &crd)
            .await
            .map_err(HarnessError::kube(format!("creating CRD {name}")))?;
        let waited = startup_timeout();
        let established = await_condition(api, &name, conditions::is_crd_established());
        match tokio::time::timeout(waited, established).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(self.apiserver.not_ready(waited, format!("CRD {name}: {e}"))),
            Err(_) => Err(self
                .apiserver
                .not_ready(waited, format!("CRD {name} not Established"))),
        }
    }

    /// Plays the node for every Deployment in `namespace`: until the handle drops, each
    /// Deployment's status is kept at "all `spec.replicas` updated, ready and available" for
    /// its current generation, as the Deployment controller and kubelets would report once
    /// the pods ran.
    pub fn play_node(&self, namespace: &str) -> NodeStandIn {
        let api: Api<Deployment> = Api::namespaced(self.client.clone(), namespace);
        let task = tokio::spawn(async move {
            loop {
                if let Ok(list) = api.list(&ListParams::default()).await {
                    for d in &list.items {
                        if !reports_available(d)
                            && let Some(name) = d.metadata.name.as_deref()
                            && let Err(e) = mark_available(&api, d, name).await
                        {
                            tracing::debug!(deployment = name, error = %e, "marking available");
                        }
                    }
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        });
        NodeStandIn { task }
    }

    /// Marks one Deployment available now, as [`KubeApiServer::play_node`] does continuously.
    pub async fn mark_deployment_available(&self, namespace: &str, name: &str) -> Result<()> {
        let api: Api<Deployment> = Api::namespaced(self.client.clone(), namespace);
        let d = api.get(name).await.map_err(HarnessError::kube(format!(
            "reading Deployment {namespace}/{name}"
        )))?;
        mark_available(&api, &d, name)
            .await
            .map_err(HarnessError::kube(format!(
                "marking Deployment {namespace}/{name} available"
            )))
    }
}

/// The running stand-in for the node; dropping it stops it.
#[derive(Debug)]
pub struct NodeStandIn {
    task: tokio::task::JoinHandle<()>,
}

impl Drop for NodeStandIn {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn reports_available(d: &Deployment) -> bool {
    let want = d.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1);
    d.status.as_ref().is_some_and(|s| {
        s.observed_generation == d.metadata.generation
            && s.replicas == Some(want)
            && s.updated_replicas == Some(want)
            && s.ready_replicas == Some(want)
            && s.available_replicas == Some(want)
    })
}

async fn mark_available(
    api: &Api<Deployment>,
    d: &Deployment,
    name: &str,
) -> std::result::Result<(), ::kube::Error> {
    let want = d.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1);
    let status = Deployment {
        status: Some(DeploymentStatus {
            observed_generation: d.metadata.generation,
            replicas: Some(want),
            updated_replicas: Some(want),
            ready_replicas: Some(want),
            available_replicas: Some(want),
            ..DeploymentStatus::default()
        }),
        ..Deployment::default()
    };
    api.patch_status(name, &PatchParams::default(), &Patch::Merge(&status))
        .await
        .map(|_| ())
}

fn write_kubeconfig(dir: &Path, url: &str, ca: &Path, cert: &Path, key: &Path) -> Result<PathBuf> {
    let path_str = |p: &Path| Some(p.display().to_string());
    let kc = Kubeconfig {
        clusters: vec![NamedCluster {
            name: "mesh-test".into(),
            cluster: Some(Cluster {
                server: Some(url.to_string()),
                certificate_authority: path_str(ca),
                ..Cluster::default()
            }),
            other: Default::default(),
        }],
        auth_infos: vec![NamedAuthInfo {
            name: "admin".into(),
            auth_info: Some(AuthInfo {
                client_certificate: path_str(cert),
                client_key: path_str(key),
                ..AuthInfo::default()
            }),
            other: Default::default(),
        }],
        contexts: vec![NamedContext {
            name: "mesh-test".into(),
            context: Some(Context {
                cluster: "mesh-test".into(),
                user: Some("admin".into()),
                ..Context::default()
            }),
            other: Default::default(),
        }],
        current_context: Some("mesh-test".into()),
        ..Kubeconfig::default()
    };
    let yaml = serde_yaml::to_string(&kc).map_err(|e| HarnessError::Io {
        context: "rendering the kubeconfig".into(),
        source: std::io::Error::other(e),
    })?;
    write(dir, "kubeconfig", &yaml)
}

fn read_kubeconfig(path: &Path) -> Result<Kubeconfig> {
    Kubeconfig::read_from(path).map_err(|e| HarnessError::Io {
        context: format!("reading {}", path.display()),
        source: std::io::Error::other(e),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pinned_version_comes_from_the_wrapper_module() {
        let v = pinned_version();
        assert!(v.starts_with("v1."), "{v}");
        assert!(
            bin_dir().ends_with(Path::new("kube").join(v))
                || std::env::var_os(ENV_KUBE_BIN_DIR).is_some()
        );
    }
}
