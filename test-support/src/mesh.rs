//! A real `mesh-controlplane` for tests, and mesh pairs on it: a client proxy and a server proxy
//! in front of an app, certified by the control plane and talking mTLS to each other.
//!
//! ```no_run
//! # async fn f() -> mesh_test_support::Result<()> {
//! use mesh_test_support::{apps::app, mesh::{control_plane, mesh_pair}};
//! let web = app("web").await?;
//! let pair = mesh_pair(web.addr()).run().await?;
//! let rsp = mesh_test_support::http_client()
//!     .get(format!("http://{}/", pair.client_outbound()))
//!     .header("host", "web.default:80")
//!     .send()
//!     .await;
//!
//! let cp = control_plane().cert_lifetime("6s").run()?;
//! let server = cp.proxy("spiffe://cluster.local/ns/default/sa/db").app(web.addr()).run()?;
//! # Ok(()) }
//! ```
//!
//! The control plane runs as the real binary (found beside the test executable; build it with
//! `cargo build -p mesh-controlplane --bins`), with its state in a directory of its own unless
//! the test names one (to restart it on the same state).

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use crate::{
    HarnessError, Result,
    process::{MeshBinary, MeshProcess, workspace_bin},
    proxies::{InProcessProxy, ProxyBuilder, proxy, wait_ready},
    proxy_api::ProxyApiAccess,
};

/// The identity of a [`MeshPair`]'s server workload.
pub const SERVER_ID: &str = "spiffe://cluster.local/ns/default/sa/web";
/// The identity of a [`MeshPair`]'s client workload.
pub const CLIENT_ID: &str = "spiffe://cluster.local/ns/default/sa/client";
/// The service a [`MeshPair`]'s server registers as.
pub const SERVICE: &str = "web.default:80";

/// The embedded mesh, as a user starts it: `mesh up [extra...] -f file --state-dir state`, its
/// resource API and proxy API on free ports of 127.0.0.1 (the `api` and `proxy` listeners). It is
/// given 20 s to stop, so a failing test does not leave its workloads running.
pub fn mesh_up(state: &Path, file: &Path, extra: &[&str]) -> Result<MeshProcess> {
    let mut binary = MeshBinary::workspace("mesh")?.arg("up");
    for arg in extra {
        binary = binary.arg(arg);
    }
    let mut process = binary
        .arg("-f")
        .arg(file)
        .arg("--state-dir")
        .arg(state)
        .arg("--api-addr")
        .arg("127.0.0.1:0")
        .arg("--proxy-addr")
        .arg("127.0.0.1:0")
        .arg("--dashboard-addr")
        .arg("127.0.0.1:0")
        .listener("api")
        .listener("proxy")
        .listener("dashboard")
        .run()?;
    process.child().set_stop_grace(Duration::from_secs(20));
    Ok(process)
}

/// A control plane to start: API and proxy API on 127.0.0.1:0, state in a fresh directory.
pub fn control_plane() -> ControlPlaneBuilder {
    ControlPlaneBuilder {
        binary: None,
        via: Vec::new(),
        state: None,
        env: BTreeMap::from([
            (
                "MESH_CONTROLPLANE_API_ADDR".to_string(),
                "127.0.0.1:0".to_string(),
            ),
            (
                "MESH_CONTROLPLANE_PROXY_ADDR".to_string(),
                "127.0.0.1:0".to_string(),
            ),
        ]),
    }
}

/// A control plane's configuration; [`ControlPlaneBuilder::run`] starts it.
#[derive(Clone, Debug)]
#[must_use = "a control plane starts with run()"]
pub struct ControlPlaneBuilder {
    binary: Option<PathBuf>,
    via: Vec<std::ffi::OsString>,
    state: Option<PathBuf>,
    env: BTreeMap<String, String>,
}

impl ControlPlaneBuilder {
    /// Keeps the state (CA, token, stored resources) in `dir`, which outlives the process.
    pub fn state_dir(mut self, dir: &Path) -> Self {
        self.state = Some(dir.to_path_buf());
        self
    }

    /// Serves the proxy API at `addr` (a fixed port, so a restart is where proxies look).
    pub fn proxy_addr(self, addr: SocketAddr) -> Self {
        self.env("MESH_CONTROLPLANE_PROXY_ADDR", &addr.to_string())
    }

    /// How long the certificates it issues live (`6s`, `1h`).
    pub fn cert_lifetime(self, lifetime: &str) -> Self {
        self.env("MESH_CONTROLPLANE_CERT_LIFETIME", lifetime)
    }

    /// How long a workload registration lives without a heartbeat.
    pub fn workload_ttl(self, ttl: Duration) -> Self {
        let ttl = if ttl.subsec_millis() == 0 {
            format!("{}s", ttl.as_secs())
        } else {
            format!("{}ms", ttl.as_millis())
        };
        self.env("MESH_CONTROLPLANE_WORKLOAD_TTL", &ttl)
    }

    /// Sets any `MESH_CONTROLPLANE_*` (or other) variable.
    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.env.insert(key.to_string(), value.to_string());
        self
    }

    /// Runs the binary at `path` (`env!("CARGO_BIN_EXE_mesh-controlplane")` in the control
    /// plane's own tests) rather than the workspace's.
    pub fn binary(mut self, path: impl Into<PathBuf>) -> Self {
        self.binary = Some(path.into());
        self
    }

    /// Runs the binary through `prefix`, such as [`crate::netns::Netns::exec_prefix`] to start
    /// it in a network namespace.
    pub fn via(mut self, prefix: Vec<std::ffi::OsString>) -> Self {
        self.via = prefix;
        self
    }

    /// Starts the control plane and waits for its listeners.
    pub fn run(self) -> Result<ControlPlane> {
        let (state, dir) = match self.state {
            Some(state) => (state, None),
            None => {
                let dir = tempfile::Builder::new()
                    .prefix("mesh-controlplane-state-")
                    .tempdir()
                    .map_err(HarnessError::io(
                        "creating the control plane's state directory",
                    ))?;
                (dir.path().to_path_buf(), Some(dir))
            }
        };
        let binary = match self.binary {
            Some(path) => path,
            None => workspace_bin("mesh-controlplane")?,
        };
        let mut bin = MeshBinary::new(binary)
            .via(self.via)
            .env("MESH_CONTROLPLANE_STATE_DIR", &state)
            .listener("api")
            .listener("proxy");
        for (key, value) in &self.env {
            bin = bin.env(key, value);
        }
        Ok(ControlPlane {
            process: bin.run()?,
            state,
            _dir: dir,
        })
    }
}

/// A running control plane.
#[derive(Debug)]
pub struct ControlPlane {
    process: MeshProcess,
    state: PathBuf,
    _dir: Option<tempfile::TempDir>,
}

impl ControlPlane {
    /// The resource API (`mesh apply`, `MESH_SERVER`).
    pub fn api(&self) -> SocketAddr {
        self.process.addr("api")
    }

    /// The resource API's URL, `http://…`.
    pub fn api_url(&self) -> String {
        format!("http://{}", self.api())
    }

    /// The proxy API (mTLS).
    pub fn proxy_api(&self) -> SocketAddr {
        self.process.addr("proxy")
    }

    /// The proxy API's URL, `https://…` (its certificate names 127.0.0.1).
    pub fn proxy_api_url(&self) -> String {
        format!("https://{}", self.proxy_api())
    }

    /// The state directory.
    pub fn state(&self) -> &Path {
        &self.state
    }

    /// What a proxy needs to reach it: the proxy API, trust roots and bootstrap token.
    pub fn access(&self) -> ProxyApiAccess {
        ProxyApiAccess::of_control_plane(self.proxy_api(), &self.state)
    }

    /// A proxy pointed at this control plane, with `identity` for its certificate.
    pub fn proxy(&self, identity: &str) -> ProxyBuilder {
        proxy().control_plane(&self.access(), identity)
    }

    /// The process, to kill it or read its log.
    pub fn process(&mut self) -> &mut MeshProcess {
        &mut self.process
    }

    /// The `Authorization` value the resource API admits: its token, from the state directory.
    ///
    /// # Panics
    /// When the control plane has not written its token.
    #[allow(
        clippy::expect_used,
        reason = "a test helper fails its test by panicking"
    )]
    pub fn api_authorization(&self) -> String {
        api_authorization(&self.state)
    }

    /// An HTTP client of the resource API that presents its token.
    pub fn api_client(&self) -> reqwest::Client {
        api_client(&self.state)
    }

    /// Applies a multi-document YAML in namespace `default` through the resource API.
    ///
    /// # Panics
    /// When the control plane refuses it.
    #[allow(
        clippy::expect_used,
        reason = "a test helper fails its test by panicking"
    )]
    pub async fn apply(&self, yaml: &str) {
        let rsp = crate::http_client()
            .post(format!("{}/apply?namespace=default", self.api_url()))
            .header("authorization", self.api_authorization())
            .header("content-type", "application/yaml")
            .body(yaml.to_string())
            .send()
            .await
            .expect("calling the resource API");
        let status = rsp.status();
        let body = rsp.text().await.unwrap_or_default();
        assert!(status.is_success(), "apply: {status}: {body}");
    }
}

/// The `Authorization` value the resource API of the control plane whose state is in `state`
/// admits: its token.
///
/// # Panics
/// When the control plane has not written its token.
#[allow(
    clippy::expect_used,
    reason = "a test helper fails its test by panicking"
)]
pub fn api_authorization(state: &Path) -> String {
    // mesh_controlplane::access::API_TOKEN_FILE, named here so this crate stays below it.
    let path = state.join("api-token");
    let token = std::fs::read_to_string(&path).expect("reading the control plane's api-token");
    format!("Bearer {}", token.trim())
}

/// An HTTP client of the resource API of the control plane whose state is in `state`, which
/// presents its token on every request.
///
/// # Panics
/// When the control plane has not written its token.
#[allow(
    clippy::expect_used,
    reason = "a test helper fails its test by panicking"
)]
pub fn api_client(state: &Path) -> reqwest::Client {
    let _ = crate::http_client();
    let mut value = reqwest::header::HeaderValue::from_str(&api_authorization(state))
        .expect("a token is a header value");
    value.set_sensitive(true);
    let headers = reqwest::header::HeaderMap::from_iter([(reqwest::header::AUTHORIZATION, value)]);
    reqwest::Client::builder()
        .default_headers(headers)
        .build()
        .expect("an HTTP client")
}

/// A mesh pair to start: a control plane, a server proxy in front of `app` registered as
/// [`SERVICE`] with [`SERVER_ID`], and a client proxy with [`CLIENT_ID`].
pub fn mesh_pair(app: SocketAddr) -> MeshPairBuilder {
    MeshPairBuilder {
        app,
        control_plane: control_plane(),
        proxy_env: Vec::new(),
    }
}

/// A mesh pair's configuration; [`MeshPairBuilder::run`] starts it.
#[derive(Debug)]
#[must_use = "a mesh pair starts with run()"]
pub struct MeshPairBuilder {
    app: SocketAddr,
    control_plane: ControlPlaneBuilder,
    proxy_env: Vec<(String, String)>,
}

impl MeshPairBuilder {
    /// How long certificates live.
    pub fn cert_lifetime(mut self, lifetime: &str) -> Self {
        self.control_plane = self.control_plane.cert_lifetime(lifetime);
        self
    }

    /// Sets a variable on both proxies (tracing's collector, for instance).
    pub fn proxy_env(mut self, key: &str, value: impl Into<String>) -> Self {
        self.proxy_env.push((key.to_string(), value.into()));
        self
    }

    /// Starts the control plane and both proxies, and waits until both are ready (certified,
    /// and the server registered).
    pub async fn run(self) -> Result<MeshPair> {
        let control_plane = self.control_plane.run()?;
        let with_env = |mut proxy: ProxyBuilder| {
            for (k, v) in &self.proxy_env {
                proxy = proxy.env(k, v.clone());
            }
            proxy
        };
        let server = with_env(control_plane.proxy(SERVER_ID))
            .app(self.app)
            .service(SERVICE)
            .run()?;
        let client = with_env(control_plane.proxy(CLIENT_ID)).run()?;
        wait_ready(&server).await?;
        wait_ready(&client).await?;
        Ok(MeshPair {
            client,
            server,
            control_plane,
        })
    }
}

/// Client proxy -> server proxy -> app, over mTLS, on a real control plane.
#[derive(Debug)]
pub struct MeshPair {
    /// The caller's proxy; send requests for [`SERVICE`] to its outbound listener.
    pub client: InProcessProxy,
    /// The app's proxy.
    pub server: InProcessProxy,
    /// The control plane that certified both.
    pub control_plane: ControlPlane,
}

impl MeshPair {
    /// The client proxy's outbound listener.
    pub fn client_outbound(&self) -> SocketAddr {
        crate::proxies::Sidecar::addr(&self.client, "outbound")
    }
}
