//! Proxies for tests: `proxy().outbound(config).run()` starts a `mesh-proxy` in-process, through
//! the sidecar library, with its listeners on 127.0.0.1:0; `.spawn()` starts the same proxy
//! as the real binary, for tests of what only a process has (signals, exit codes, its log).
//!
//! ```no_run
//! # async fn f(yaml: &str) -> mesh_test_support::Result<()> {
//! use mesh_test_support::{apps::app, proxies::{Sidecar, proxy}};
//! let v1 = app("v1").await?;
//! let outbound = proxy().outbound(yaml).run()?;
//! let inbound = proxy().app(v1.addr()).service("web.default:80").run()?;
//! let body = outbound.client().get("http://web.default:80/").send().await;
//! # Ok(()) }
//! ```
//!
//! The builder is a set of `MESH_PROXY_*` variables, so both ways read the same configuration
//! the same way; anything without a method of its own is set with [`ProxyBuilder::env`]. Each
//! in-process proxy runs on a runtime of its own, on its own thread: a test's blocking calls do
//! not stall it, and dropping the handle stops everything the proxy started, as killing a
//! process would.

use std::{
    collections::BTreeMap,
    future::Future,
    net::SocketAddr,
    sync::mpsc,
    time::{Duration, Instant},
};

use mesh_sidecar::config::{
    Config, ENV_ADMIN_ADDR, ENV_APP_ADDR, ENV_CONFIG_FILE, ENV_CONTROL_PLANE_ADDR, ENV_IDENTITY,
    ENV_INBOUND_ADDR, ENV_OUTBOUND_ADDR, ENV_TOKEN_FILE, ENV_TRUST_ROOTS_FILE, ENV_WATCH,
    ENV_WORKLOAD_LABELS, ENV_WORKLOAD_SERVICE,
};
use mesh_sidecar::proxy::{Addrs, Proxy};
use tokio::sync::oneshot;

use crate::{
    HarnessError, Result,
    process::{MeshBinary, MeshProcess, workspace_bin},
    proxy_api::ProxyApiAccess,
};

const LOOPBACK_ANY_PORT: &str = "127.0.0.1:0";

/// A static outbound config: `web.default:80` split between `web-primary.default:80` at
/// `primary` and `web-canary.default:80` at `canary` by `weights`, in one rule named `split`.
pub fn split_config(
    primary: impl std::fmt::Display,
    canary: impl std::fmt::Display,
    weights: (u32, u32),
) -> String {
    let (to_primary, to_canary) = weights;
    format!(
        r#"
routes:
  - parent: web.default:80
    rules:
      - name: split
        matches: [{{path: {{type: PathPrefix, value: /}}}}]
        backends:
          - {{service: web-primary.default:80, weight: {to_primary}}}
          - {{service: web-canary.default:80, weight: {to_canary}}}
endpoints:
  - service: web-primary.default:80
    endpoints: [{{addr: "{primary}"}}]
  - service: web-canary.default:80
    endpoints: [{{addr: "{canary}"}}]
"#
    )
}

/// A proxy to start: admin and outbound listeners on 127.0.0.1:0, nothing else until a method
/// adds it.
pub fn proxy() -> ProxyBuilder {
    ProxyBuilder {
        env: BTreeMap::from([
            (ENV_ADMIN_ADDR.to_string(), LOOPBACK_ANY_PORT.to_string()),
            (ENV_OUTBOUND_ADDR.to_string(), LOOPBACK_ANY_PORT.to_string()),
        ]),
        config: None,
        via: Vec::new(),
        binary: None,
    }
}

/// A proxy's configuration; [`ProxyBuilder::run`] or [`ProxyBuilder::spawn`] starts it.
#[derive(Clone, Debug)]
#[must_use = "a proxy starts with run() or spawn()"]
pub struct ProxyBuilder {
    env: BTreeMap<String, String>,
    config: Option<String>,
    via: Vec<std::ffi::OsString>,
    binary: Option<std::path::PathBuf>,
}

impl ProxyBuilder {
    /// Routes and endpoints from a static config (the YAML of `--config FILE`), instead of a
    /// control plane's watch streams.
    pub fn outbound(mut self, config_yaml: impl Into<String>) -> Self {
        self.config = Some(config_yaml.into());
        self
    }

    /// An inbound listener on 127.0.0.1:0 in front of the app at `app`.
    pub fn app(self, app: SocketAddr) -> Self {
        self.env(ENV_INBOUND_ADDR, LOOPBACK_ANY_PORT)
            .env(ENV_APP_ADDR, app.to_string())
    }

    /// The service (`name.namespace:port`) the workload belongs to; with a control plane, the
    /// proxy registers it there.
    pub fn service(self, service: &str) -> Self {
        self.env(ENV_WORKLOAD_SERVICE, service)
    }

    /// The workload's labels, `key=value` pairs separated by commas.
    pub fn labels(self, labels: &str) -> Self {
        self.env(ENV_WORKLOAD_LABELS, labels)
    }

    /// Watches `authority` from the start rather than on its first request.
    pub fn watch(self, authority: &str) -> Self {
        self.env(ENV_WATCH, authority)
    }

    /// The control plane (or stand-in) behind `access`, with `identity` (a SPIFFE ID) for the
    /// proxy's certificate.
    pub fn control_plane(self, access: &ProxyApiAccess, identity: &str) -> Self {
        self.env(ENV_CONTROL_PLANE_ADDR, access.addr.to_string())
            .env(
                ENV_TRUST_ROOTS_FILE,
                access.trust_roots_file.display().to_string(),
            )
            .env(ENV_TOKEN_FILE, access.token_file.display().to_string())
            .env(ENV_IDENTITY, identity)
    }

    /// With [`ProxyBuilder::spawn`], runs the binary through `prefix`, such as
    /// [`crate::netns::Netns::exec_prefix`] to start it in a network namespace as another user.
    pub fn via(mut self, prefix: Vec<std::ffi::OsString>) -> Self {
        self.via = prefix;
        self
    }

    /// With [`ProxyBuilder::spawn`], runs the binary at `path` rather than the workspace's.
    pub fn binary(mut self, path: impl Into<std::path::PathBuf>) -> Self {
        self.binary = Some(path.into());
        self
    }

    /// Sets any `MESH_PROXY_*` variable.
    pub fn env(mut self, key: &str, value: impl Into<String>) -> Self {
        self.env.insert(key.to_string(), value.into());
        self
    }

    /// Writes the static config, if any, into `dir` and points the configuration at it.
    fn write_config(&mut self, dir: &tempfile::TempDir) -> Result<()> {
        if let Some(yaml) = &self.config {
            let path = dir.path().join("proxy.yaml");
            std::fs::write(&path, yaml)
                .map_err(HarnessError::io(format!("writing {}", path.display())))?;
            self.env
                .insert(ENV_CONFIG_FILE.to_string(), path.display().to_string());
        }
        Ok(())
    }

    fn dir() -> Result<tempfile::TempDir> {
        tempfile::Builder::new()
            .prefix("mesh-proxy-")
            .tempdir()
            .map_err(HarnessError::io("creating a proxy's directory"))
    }

    /// Starts the proxy in-process, on a runtime of its own, and returns once its listeners
    /// are bound.
    pub fn run(mut self) -> Result<InProcessProxy> {
        let dir = Self::dir()?;
        self.write_config(&dir)?;
        let config = Config::from_env(&self.env).map_err(|e| HarnessError::Proxy(e.to_string()))?;
        let proxy = Proxy::new(config).map_err(|e| HarnessError::Proxy(chain(&e)))?;
        let (started_tx, started_rx) = mpsc::channel();
        let (stop_tx, stop_rx) = oneshot::channel::<oneshot::Sender<Result<()>>>();
        let thread = std::thread::Builder::new()
            .name("mesh-proxy".into())
            .spawn(move || serve(proxy, &started_tx, stop_rx))
            .map_err(HarnessError::io("starting a proxy's thread"))?;
        let addrs = started_rx
            .recv()
            .map_err(|_| HarnessError::Proxy("the proxy's thread ended while starting".into()))??;
        Ok(InProcessProxy {
            addrs,
            stop: Some(stop_tx),
            thread: Some(thread),
            _dir: dir,
        })
    }

    /// Starts the `mesh-proxy` binary (found beside the test executable; see
    /// [`workspace_bin`]) and waits for its listeners' announcements. Its log is at
    /// `info` unless `RUST_LOG` is set here.
    pub fn spawn(mut self) -> Result<SpawnedProxy> {
        let dir = Self::dir()?;
        self.write_config(&dir)?;
        let path = match self.binary.take() {
            Some(path) => path,
            None => workspace_bin("mesh-proxy")?,
        };
        let mut binary = MeshBinary::new(path)
            .via(self.via.clone())
            .env("RUST_LOG", "info")
            .listener("admin")
            .listener("outbound");
        if self.env.contains_key(ENV_APP_ADDR) {
            binary = binary.listener("inbound");
        }
        for (key, value) in &self.env {
            binary = binary.env(key, value);
        }
        Ok(SpawnedProxy {
            process: binary.run()?,
            _dir: dir,
        })
    }
}

/// An error and its causes, `: `-separated.
fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// The proxy's thread: start, report the addresses, serve until told to stop (gracefully,
/// reporting how the drain went) or until the handle is gone.
fn serve(
    proxy: Proxy,
    started: &mpsc::Sender<Result<Addrs>>,
    stop: oneshot::Receiver<oneshot::Sender<Result<()>>>,
) {
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("mesh-proxy-worker")
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            let _ = started.send(Err(HarnessError::io("starting a proxy's runtime")(e)));
            return;
        }
    };
    runtime.block_on(async move {
        let mut running = match proxy.start().await {
            Ok(running) => running,
            Err(e) => {
                let _ = started.send(Err(HarnessError::Proxy(chain(&e))));
                return;
            }
        };
        if started.send(Ok(running.addrs())).is_err() {
            return;
        }
        tokio::select! {
            res = running.stopped() => {
                tracing::error!(error = ?res, "an in-process proxy stopped serving");
            }
            stop = stop => {
                // A dropped handle (no reply channel) stops at once, as a kill would.
                if let Ok(reply) = stop {
                    let res = running.shutdown().await.map_err(|e| HarnessError::Proxy(chain(&e)));
                    let _ = reply.send(res);
                }
            }
        }
    });
    // Every task the proxy spawned (discovery, registration, connections) ends with the runtime.
    runtime.shutdown_timeout(Duration::from_secs(1));
}

/// A proxy running in this process. Dropping it stops the proxy at once.
#[derive(Debug)]
pub struct InProcessProxy {
    addrs: Addrs,
    stop: Option<oneshot::Sender<oneshot::Sender<Result<()>>>>,
    thread: Option<std::thread::JoinHandle<()>>,
    _dir: tempfile::TempDir,
}

impl InProcessProxy {
    /// Stops the proxy as SIGTERM stops `mesh-proxy`: not ready, deregistered, drained.
    pub async fn shutdown(mut self) -> Result<()> {
        let (reply_tx, reply_rx) = oneshot::channel();
        let stopped = || HarnessError::Proxy("the proxy had already stopped".into());
        self.stop
            .take()
            .ok_or_else(stopped)?
            .send(reply_tx)
            .map_err(|_| stopped())?;
        reply_rx.await.map_err(|_| stopped())?
    }
}

impl Drop for InProcessProxy {
    fn drop(&mut self) {
        self.stop.take();
        if let Some(thread) = self.thread.take() {
            // Quick: the runtime shuts down without waiting for its tasks to finish.
            let _ = thread.join();
        }
    }
}

/// A `mesh-proxy` process started by [`ProxyBuilder::spawn`].
#[derive(Debug)]
pub struct SpawnedProxy {
    process: MeshProcess,
    _dir: tempfile::TempDir,
}

impl SpawnedProxy {
    /// The process.
    pub fn process(&mut self) -> &mut MeshProcess {
        &mut self.process
    }

    /// Sends SIGTERM, as a supervisor stops the proxy.
    pub fn terminate(&mut self) {
        self.process.child().terminate();
    }

    /// The exit status as text (`exit status: 0`), once the process has exited.
    pub fn exited(&mut self) -> Option<String> {
        self.process.child().check_running().err()
    }

    /// The process's log so far.
    pub fn log(&mut self) -> String {
        std::fs::read_to_string(self.process.child().log()).unwrap_or_default()
    }

    /// The last `n` lines of its log.
    pub fn log_tail(&mut self, n: usize) -> String {
        self.process.child().log_tail(n)
    }
}

/// What tests ask of a proxy, in-process or spawned: its listeners and its admin server.
pub trait Sidecar {
    /// The address of listener `name` (`admin`, `outbound`, `inbound`).
    ///
    /// # Panics
    /// When the proxy has no such listener.
    fn addr(&self, name: &str) -> SocketAddr;

    /// An HTTP client that sends absolute-form requests through the outbound listener, as an
    /// app with `HTTP_PROXY` set does.
    fn client(&self) -> reqwest::Client {
        client_via(self.addr("outbound"), None)
    }

    /// [`Sidecar::client`] that gives up on a request after `timeout`.
    fn client_with_timeout(&self, timeout: Duration) -> reqwest::Client {
        client_via(self.addr("outbound"), Some(timeout))
    }

    /// The status of `/ready` (0 when the admin server does not answer).
    fn ready(&self) -> impl Future<Output = u16> + Send {
        let admin = admin_get(self.addr("admin"), "/ready");
        async move { admin.await.map_or(0, |r| r.status().as_u16()) }
    }

    /// `/config`: the route and endpoint tables, the identity, the inbound policy.
    ///
    /// # Panics
    /// When the admin server does not answer with JSON.
    #[allow(
        clippy::expect_used,
        reason = "a test helper fails its test by panicking"
    )]
    fn config(&self) -> impl Future<Output = serde_json::Value> + Send {
        let admin = admin_get(self.addr("admin"), "/config");
        async move {
            let rsp = admin.await.expect("asking for /config");
            rsp.json().await.expect("/config is JSON")
        }
    }

    /// `/metrics`, the OpenMetrics text.
    ///
    /// # Panics
    /// When the scrape fails.
    fn metrics(&self) -> impl Future<Output = String> + Send {
        crate::metrics_text(self.addr("admin"))
    }

    /// The sum of the samples of `name` whose labels contain every one of `labels`; see
    /// [`crate::metric_sum`].
    fn metric_sum(&self, name: &str, labels: &[&str]) -> impl Future<Output = f64> + Send {
        let admin = self.addr("admin");
        let name = name.to_string();
        let labels: Vec<String> = labels.iter().map(ToString::to_string).collect();
        async move {
            let labels: Vec<&str> = labels.iter().map(String::as_str).collect();
            crate::metric_sum(admin, &name, &labels).await
        }
    }
}

/// A GET of `path` on the admin server at `admin`.
fn admin_get(
    admin: SocketAddr,
    path: &str,
) -> impl Future<Output = reqwest::Result<reqwest::Response>> + Send + use<> {
    crate::http_client()
        .get(format!("http://{admin}{path}"))
        .send()
}

#[allow(
    clippy::panic,
    reason = "a test asked for a listener the proxy does not have"
)]
fn addr_of(addrs: &Addrs, name: &str) -> SocketAddr {
    match (name, addrs.inbound) {
        ("admin", _) => addrs.admin,
        ("outbound", _) => addrs.outbound,
        ("inbound", Some(inbound)) => inbound,
        _ => panic!("the proxy has no {name:?} listener: {addrs:?}"),
    }
}

impl Sidecar for InProcessProxy {
    fn addr(&self, name: &str) -> SocketAddr {
        addr_of(&self.addrs, name)
    }
}

impl Sidecar for SpawnedProxy {
    fn addr(&self, name: &str) -> SocketAddr {
        self.process.addr(name)
    }
}

impl Sidecar for MeshProcess {
    fn addr(&self, name: &str) -> SocketAddr {
        MeshProcess::addr(self, name)
    }
}

/// A client whose requests go through the outbound listener at `outbound`.
#[allow(
    clippy::expect_used,
    reason = "a proxy URL from a socket address always parses"
)]
pub fn client_via(outbound: SocketAddr, timeout: Option<Duration>) -> reqwest::Client {
    let _ = crate::http_client();
    let mut builder = reqwest::Client::builder()
        .proxy(reqwest::Proxy::http(format!("http://{outbound}")).expect("a proxy URL"));
    if let Some(timeout) = timeout {
        builder = builder.timeout(timeout);
    }
    builder.build().expect("an HTTP client")
}

/// Waits up to the test patience for `proxy`'s `/ready` to answer 200.
pub async fn wait_ready(proxy: &impl Sidecar) -> Result<()> {
    let deadline = Instant::now() + crate::patience();
    loop {
        let status = proxy.ready().await;
        if status == 200 {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(HarnessError::Proxy(format!(
                "{} not ready within {:?}: /ready answers {status}",
                proxy.addr("admin"),
                crate::patience()
            )));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
