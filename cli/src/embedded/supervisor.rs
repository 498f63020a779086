//! The workload supervisor of the embedded mesh: it runs each Workload's processes, every app
//! with a sidecar of its own, and keeps them running.
//!
//! A Workload has two arms, as a Deployment has under Flagger: the primary and, during a rollout,
//! the canary. Each arm runs one version with `replicas` instances; an instance is an app
//! process plus a `mesh-proxy` that registers it with the control plane as
//! `<name>-primary.<namespace>:<port>` (or `-canary`). The app listens on `127.0.0.1:$PORT` and
//! reaches other services only through `$HTTP_PROXY`, its sidecar's outbound listener.
//!
//! [`Supervisor::sync`] is given what each arm should run and converges on it without blocking:
//! every instance lives in a task of its own that starts the pair, restarts it with back-off when
//! either process dies, and stops it gracefully (sidecar first, so it deregisters and drains).
//! When an arm changes version the new instances start beside the old ones, which are stopped
//! only once the new ones are ready, so a promotion drops no requests.

use std::{
    collections::BTreeMap,
    ffi::OsString,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Stdio,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use mesh_core::Listening;

use super::pids::PidFiles;
use mesh_crds::{WorkloadSpec, WorkloadVersion};
use mesh_rollout_controller::{embedded::WorkloadKey, owned::Arm};
use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader},
    process::{Child, Command},
    sync::{Mutex, watch},
    task::JoinHandle,
};

/// How long an app may take to accept connections on its port.
const APP_START_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a sidecar may take to announce its admin listener.
const SIDECAR_START_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a process may take to exit after SIGTERM before it is killed.
const STOP_GRACE: Duration = Duration::from_secs(10);
/// Longest wait between restarts of a crashing instance.
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// How long old instances are kept after a version change while the new ones are not ready.
const RETIRE_AFTER: Duration = Duration::from_secs(120);

/// What one arm should run.
#[derive(Clone, Debug, PartialEq)]
pub struct ArmSpec {
    /// The version's name.
    pub version: String,
    /// Its revision (changes when the version's definition does).
    pub revision: String,
    /// How to run it.
    pub run: WorkloadVersion,
    /// The service port, when the workload serves one.
    pub port: Option<u16>,
    /// Instances.
    pub replicas: usize,
}

impl ArmSpec {
    /// The arm spec for `version` of `spec`, if the version exists.
    pub fn of(spec: &WorkloadSpec, version: &str) -> Option<Self> {
        Some(Self {
            version: version.to_string(),
            revision: spec.revision_of(version)?,
            run: spec.versions.get(version)?.clone(),
            port: spec.port.and_then(|p| u16::try_from(p).ok()),
            replicas: spec.replicas(),
        })
    }
}

/// Where the supervisor finds the programs it runs.
#[derive(Clone, Debug)]
pub struct Programs {
    /// The `mesh-proxy` binary.
    pub proxy: PathBuf,
    /// `PATH` for apps: the mesh's own directory first, so `mesh-demo-app` is found.
    pub path: OsString,
    /// Variables every sidecar gets before the mesh's own (which win).
    pub proxy_env: Vec<(String, String)>,
}

impl Programs {
    /// Looks for `mesh-proxy` next to the running `mesh` binary, then on `PATH`.
    pub fn discover() -> anyhow::Result<Self> {
        let exe = std::env::current_exe()?;
        let dir = exe
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from("."));
        let mut dirs = vec![dir];
        if let Some(p) = std::env::var_os("PATH") {
            dirs.extend(std::env::split_paths(&p));
        }
        let proxy = dirs
            .iter()
            .map(|d| d.join("mesh-proxy"))
            .find(|p| p.is_file())
            .ok_or_else(|| {
                anyhow::anyhow!(
                    "mesh-proxy not found next to {} or on PATH; build it with `cargo build \
                     --release --bins`",
                    exe.display()
                )
            })?;
        let path = std::env::join_paths(dirs)?;
        Ok(Self {
            proxy,
            path,
            proxy_env: Vec::new(),
        })
    }
}

/// Shared readiness and address of a running instance.
#[derive(Debug, Default)]
struct Probe {
    ready: AtomicBool,
    admin: std::sync::Mutex<Option<SocketAddr>>,
}

#[derive(Debug)]
struct Instance {
    probe: Arc<Probe>,
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl Instance {
    fn ready(&self) -> bool {
        self.probe.ready.load(Ordering::Relaxed)
    }

    fn admin(&self) -> Option<SocketAddr> {
        self.probe.admin.lock().ok().and_then(|a| *a)
    }
}

#[derive(Debug)]
struct ArmRun {
    spec: ArmSpec,
    instances: Vec<Instance>,
    retiring: Vec<Instance>,
    since: tokio::time::Instant,
}

/// Runs and watches the workloads' processes.
pub struct Supervisor {
    arms: Mutex<BTreeMap<(WorkloadKey, Arm), ArmRun>>,
    programs: Programs,
    control_plane: SocketAddr,
    logs: PathBuf,
    pids: PidFiles,
}

impl Supervisor {
    /// A supervisor whose sidecars talk to the control plane's proxy API at `control_plane`,
    /// whose processes log under `logs` and are listed in `pids`.
    pub fn new(
        programs: Programs,
        control_plane: SocketAddr,
        logs: PathBuf,
        pids: PidFiles,
    ) -> Self {
        Self {
            arms: Mutex::new(BTreeMap::new()),
            programs,
            control_plane,
            logs,
            pids,
        }
    }

    /// Makes every arm run what `desired` says; arms left out are stopped.
    pub async fn sync(&self, desired: &BTreeMap<(WorkloadKey, Arm), ArmSpec>) {
        let mut arms = self.arms.lock().await;
        let gone: Vec<_> = arms
            .keys()
            .filter(|k| !desired.contains_key(k))
            .cloned()
            .collect();
        for key in gone {
            if let Some(run) = arms.remove(&key) {
                tracing::info!(workload = %key.0, arm = key.1.suffix(), "stopping");
                for i in run.instances.into_iter().chain(run.retiring) {
                    retire(i);
                }
            }
        }
        for (key, spec) in desired {
            match arms.get_mut(key) {
                Some(run) if run.spec == *spec => {}
                Some(run) => {
                    tracing::info!(
                        workload = %key.0, arm = key.1.suffix(), from = %run.spec.version,
                        to = %spec.version, "changing version"
                    );
                    let old = std::mem::take(&mut run.instances);
                    run.retiring.extend(old);
                    run.spec = spec.clone();
                    run.since = tokio::time::Instant::now();
                    run.instances = self.start_all(&key.0, key.1, spec);
                }
                None => {
                    tracing::info!(
                        workload = %key.0, arm = key.1.suffix(), version = %spec.version,
                        "starting"
                    );
                    let instances = self.start_all(&key.0, key.1, spec);
                    arms.insert(
                        key.clone(),
                        ArmRun {
                            spec: spec.clone(),
                            instances,
                            retiring: Vec::new(),
                            since: tokio::time::Instant::now(),
                        },
                    );
                }
            }
        }
        // Old instances go once their replacements serve, or after a bound if they never do.
        for run in arms.values_mut() {
            let replaced =
                run.instances.iter().all(Instance::ready) || run.since.elapsed() > RETIRE_AFTER;
            if replaced && !run.retiring.is_empty() {
                for i in run.retiring.drain(..) {
                    retire(i);
                }
            }
        }
    }

    fn start_all(&self, key: &WorkloadKey, arm: Arm, spec: &ArmSpec) -> Vec<Instance> {
        (0..spec.replicas)
            .map(|n| {
                let probe = Arc::new(Probe::default());
                let (stop, stopped) = watch::channel(false);
                let ctx = InstanceCtx {
                    key: key.clone(),
                    arm,
                    n,
                    spec: spec.clone(),
                    programs: self.programs.clone(),
                    control_plane: self.control_plane,
                    logs: self.logs.clone(),
                    pids: self.pids.clone(),
                    probe: Arc::clone(&probe),
                };
                let task = tokio::spawn(ctx.run(stopped));
                Instance { probe, stop, task }
            })
            .collect()
    }

    /// Whether the arm runs `revision` with every instance ready.
    pub async fn ready(&self, key: &WorkloadKey, arm: Arm, revision: &str) -> bool {
        let arms = self.arms.lock().await;
        arms.get(&(key.clone(), arm)).is_some_and(|run| {
            run.spec.revision == revision
                && !run.instances.is_empty()
                && run.instances.iter().all(Instance::ready)
        })
    }

    /// The admin addresses of every running sidecar, for scraping metrics.
    pub async fn admin_addrs(&self) -> Vec<SocketAddr> {
        let arms = self.arms.lock().await;
        arms.values()
            .flat_map(|r| r.instances.iter().chain(&r.retiring))
            .filter_map(Instance::admin)
            .collect()
    }

    /// Stops everything, gracefully, and waits for it.
    pub async fn shutdown(&self) {
        let mut arms = self.arms.lock().await;
        let mut tasks = Vec::new();
        for (_, run) in std::mem::take(&mut *arms) {
            for i in run.instances.into_iter().chain(run.retiring) {
                let _ = i.stop.send(true);
                tasks.push(i.task);
            }
        }
        for t in tasks {
            let _ = t.await;
        }
    }
}

/// Stops an instance in the background.
fn retire(i: Instance) {
    let _ = i.stop.send(true);
    drop(i.task);
}

struct InstanceCtx {
    key: WorkloadKey,
    arm: Arm,
    n: usize,
    spec: ArmSpec,
    programs: Programs,
    control_plane: SocketAddr,
    logs: PathBuf,
    pids: PidFiles,
    probe: Arc<Probe>,
}

struct Pair {
    app: Child,
    sidecar: Child,
    pids: PidFiles,
    /// The (app, sidecar) PIDs as spawned; `Child::id` forgets them once the child is reaped.
    ids: [Option<u32>; 2],
}

impl InstanceCtx {
    /// The arm's Deployment name, as Flagger names it: the target is the canary, and the
    /// primary is `<target>-primary`.
    fn deployment(&self) -> String {
        match self.arm {
            Arm::Canary => self.key.name.clone(),
            Arm::Primary => format!("{}-primary", self.key.name),
        }
    }

    /// The instance's pod name: `<deployment>-<version>-<n>`.
    fn pod(&self) -> String {
        format!("{}-{}-{}", self.deployment(), self.spec.version, self.n)
    }

    fn label(&self) -> String {
        format!(
            "{}.{}-{}-{}-{}",
            self.key.name,
            self.key.namespace,
            self.arm.suffix(),
            self.spec.version,
            self.n
        )
    }

    /// Starts the pair, restarts it when a process dies, and stops it when told to.
    async fn run(self, mut stop: watch::Receiver<bool>) {
        let mut backoff = Duration::from_secs(1);
        loop {
            if *stop.borrow() {
                return;
            }
            let started = tokio::time::Instant::now();
            let pair = tokio::select! {
                p = self.start() => p,
                _ = stop.changed() => return,
            };
            let mut pair = match pair {
                Ok(p) => p,
                Err(e) => {
                    tracing::warn!(instance = %self.label(), error = %e, "could not start");
                    self.set_ready(false);
                    tokio::select! {
                        () = tokio::time::sleep(backoff) => {}
                        _ = stop.changed() => return,
                    }
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                    continue;
                }
            };
            let exited = loop {
                tokio::select! {
                    s = pair.app.wait() => break format!("app exited ({})", describe(s)),
                    s = pair.sidecar.wait() => break format!("sidecar exited ({})", describe(s)),
                    _ = stop.changed() => {
                        self.set_ready(false);
                        stop_pair(&mut pair).await;
                        return;
                    }
                    () = tokio::time::sleep(Duration::from_millis(250)) => {
                        let ready = self.probe_ready().await;
                        self.set_ready(ready);
                    }
                }
            };
            self.set_ready(false);
            tracing::warn!(instance = %self.label(), "{exited}; restarting");
            stop_pair(&mut pair).await;
            if started.elapsed() > Duration::from_secs(60) {
                backoff = Duration::from_secs(1);
            }
            tokio::select! {
                () = tokio::time::sleep(backoff) => {}
                _ = stop.changed() => return,
            }
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
    }

    fn set_ready(&self, ready: bool) {
        self.probe.ready.store(ready, Ordering::Relaxed);
    }

    async fn probe_ready(&self) -> bool {
        let Some(admin) = self.probe.admin.lock().ok().and_then(|a| *a) else {
            return false;
        };
        // A plain HTTP/1 GET over a fresh connection: cheap, and no client state to keep.
        let Ok(Ok(mut s)) = tokio::time::timeout(
            Duration::from_secs(1),
            tokio::net::TcpStream::connect(admin),
        )
        .await
        else {
            return false;
        };
        let req = format!("GET /ready HTTP/1.1\r\nhost: {admin}\r\nconnection: close\r\n\r\n");
        if s.write_all(req.as_bytes()).await.is_err() {
            return false;
        }
        let mut line = String::new();
        let mut r = BufReader::new(s);
        matches!(
            tokio::time::timeout(Duration::from_secs(1), r.read_line(&mut line)).await,
            Ok(Ok(_))
        ) && line.split_whitespace().nth(1) == Some("200")
    }

    fn log_file(&self, what: &str) -> std::io::Result<std::fs::File> {
        std::fs::create_dir_all(&self.logs)?;
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.logs.join(format!("{}.{what}.log", self.label())))
    }

    async fn start(&self) -> anyhow::Result<Pair> {
        // Ports are chosen here so the app can be told its proxy before the proxy starts: the
        // app must accept connections before its sidecar registers it.
        let (app_port, outbound_port) = free_ports()?;
        let run = &self.spec.run;
        let program = run
            .command
            .first()
            .ok_or_else(|| anyhow::anyhow!("empty command"))?;
        let proxy_url = format!("http://127.0.0.1:{outbound_port}");
        let mut app = Command::new(program);
        app.args(&run.command[1..])
            .env("PATH", &self.programs.path)
            .env("PORT", app_port.to_string())
            .env("HTTP_PROXY", &proxy_url)
            .env("http_proxy", &proxy_url)
            .env_remove("NO_PROXY")
            .env_remove("no_proxy")
            .env("MESH_WORKLOAD", &self.key.name)
            .env("MESH_NAMESPACE", &self.key.namespace)
            .env("MESH_VERSION", &self.spec.version)
            .env("MESH_ARM", self.arm.suffix())
            .envs(&run.env)
            .stdin(Stdio::null())
            .stdout(self.log_file("app")?)
            .stderr(self.log_file("app")?)
            .kill_on_drop(true);
        let mut app = app
            .spawn()
            .map_err(|e| anyhow::anyhow!("starting {program}: {e}"))?;
        self.pids.record(app.id(), &format!("{} app", self.label()));
        if self.spec.port.is_some() {
            let deadline = tokio::time::Instant::now() + APP_START_TIMEOUT;
            loop {
                if let Ok(Some(s)) = app.try_wait() {
                    anyhow::bail!("{program} exited ({}) before listening", describe(Ok(s)));
                }
                if tokio::net::TcpStream::connect(("127.0.0.1", app_port))
                    .await
                    .is_ok()
                {
                    break;
                }
                if tokio::time::Instant::now() > deadline {
                    let _ = app.start_kill();
                    anyhow::bail!(
                        "{program} did not listen on 127.0.0.1:{app_port} ($PORT) within {}s",
                        APP_START_TIMEOUT.as_secs()
                    );
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        let mut sidecar = Command::new(&self.programs.proxy);
        sidecar
            .envs(self.programs.proxy_env.iter().map(|(k, v)| (k, v)))
            .env(
                "MESH_PROXY_OUTBOUND_ADDR",
                format!("127.0.0.1:{outbound_port}"),
            )
            .env("MESH_PROXY_ADMIN_ADDR", "127.0.0.1:0")
            .env(
                "MESH_PROXY_CONTROL_PLANE_ADDR",
                self.control_plane.to_string(),
            )
            // Every sidecar gets a certificate for its workload's identity and speaks mTLS to
            // its peers and to the proxy API. The bootstrap token and the trust roots are the
            // files the control plane keeps in its state dir, `<state>/controlplane`, beside our
            // `<state>/logs`.
            .env(
                "MESH_PROXY_IDENTITY",
                format!(
                    "spiffe://cluster.local/ns/{}/sa/{}",
                    self.key.namespace, self.key.name
                ),
            )
            .env(
                "MESH_PROXY_TOKEN_FILE",
                self.logs
                    .with_file_name("controlplane")
                    .join(mesh_controlplane::identity::TOKEN_FILE),
            )
            .env(
                "MESH_PROXY_TRUST_ROOTS_FILE",
                self.logs
                    .with_file_name("controlplane")
                    .join(mesh_controlplane::identity::TRUST_ROOTS_FILE),
            )
            // Tap is for holders of the resource API's token: the control plane relays taps
            // to `mesh tap` and the dashboard with it.
            .env(
                "MESH_PROXY_TAP_TOKEN_FILE",
                self.logs
                    .with_file_name("controlplane")
                    .join(mesh_controlplane::access::API_TOKEN_FILE),
            )
            // Linkerd's resource labels, written by the proxy on every series: the arm is the
            // Deployment (`<target>` is the canary, `<target>-primary` the primary, as under
            // Flagger), the instance is the pod.
            .env("MESH_PROXY_WORKLOAD_NAMESPACE", &self.key.namespace)
            .env("MESH_PROXY_WORKLOAD_DEPLOYMENT", self.deployment())
            .env("MESH_PROXY_WORKLOAD_POD", self.pod())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(self.log_file("proxy")?)
            .kill_on_drop(true);
        if let Some(port) = self.spec.port {
            sidecar
                .env("MESH_PROXY_INBOUND_ADDR", "127.0.0.1:0")
                .env("MESH_PROXY_APP_ADDR", format!("127.0.0.1:{app_port}"))
                .env(
                    "MESH_PROXY_WORKLOAD_SERVICE",
                    format!(
                        "{}.{}:{port}",
                        self.arm.service(&self.key.name),
                        self.key.namespace
                    ),
                )
                .env(
                    "MESH_PROXY_WORKLOAD_LABELS",
                    format!(
                        "app={},workload={},version={},arm={}",
                        self.key.name,
                        self.key.name,
                        self.spec.version,
                        self.arm.suffix()
                    ),
                );
        }
        let mut sidecar = match sidecar.spawn() {
            Ok(s) => s,
            Err(e) => {
                let _ = app.start_kill();
                anyhow::bail!("starting {}: {e}", self.programs.proxy.display());
            }
        };
        self.pids
            .record(sidecar.id(), &format!("{} sidecar", self.label()));
        let admin = match self.read_admin(&mut sidecar).await {
            Ok(a) => a,
            Err(e) => {
                let _ = app.start_kill();
                let _ = sidecar.start_kill();
                return Err(e);
            }
        };
        if let Ok(mut a) = self.probe.admin.lock() {
            *a = Some(admin);
        }
        tracing::debug!(instance = %self.label(), %admin, app_port, "started");
        let ids = [app.id(), sidecar.id()];
        Ok(Pair {
            app,
            sidecar,
            pids: self.pids.clone(),
            ids,
        })
    }

    /// Reads the sidecar's announcements until its admin listener, then copies the rest of its
    /// stdout to its log.
    async fn read_admin(&self, sidecar: &mut Child) -> anyhow::Result<SocketAddr> {
        let stdout = sidecar
            .stdout
            .take()
            .ok_or_else(|| anyhow::anyhow!("sidecar stdout not captured"))?;
        let mut lines = BufReader::new(stdout).lines();
        let mut log = tokio::fs::File::from_std(self.log_file("proxy")?);
        let found = tokio::time::timeout(SIDECAR_START_TIMEOUT, async {
            while let Ok(Some(line)) = lines.next_line().await {
                let _ = log.write_all(format!("{line}\n").as_bytes()).await;
                if let Ok(l) = line.parse::<Listening>()
                    && l.name == "admin"
                {
                    return Some(l.addr);
                }
            }
            None
        })
        .await;
        let admin = match found {
            Ok(Some(a)) => a,
            Ok(None) => anyhow::bail!(
                "sidecar exited before announcing its admin listener; see {}",
                self.logs
                    .join(format!("{}.proxy.log", self.label()))
                    .display()
            ),
            Err(_) => anyhow::bail!("sidecar did not announce its admin listener in time"),
        };
        tokio::spawn(async move {
            while let Ok(Some(line)) = lines.next_line().await {
                let _ = log.write_all(format!("{line}\n").as_bytes()).await;
            }
        });
        Ok(admin)
    }
}

/// Two distinct free ports on 127.0.0.1, held open together so they differ.
fn free_ports() -> std::io::Result<(u16, u16)> {
    let a = std::net::TcpListener::bind("127.0.0.1:0")?;
    let b = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok((a.local_addr()?.port(), b.local_addr()?.port()))
}

fn describe(s: std::io::Result<std::process::ExitStatus>) -> String {
    match s {
        Ok(s) => s.to_string(),
        Err(e) => e.to_string(),
    }
}

/// Stops the sidecar first (it deregisters, then drains), then the app.
async fn stop_pair(pair: &mut Pair) {
    terminate(&mut pair.sidecar).await;
    terminate(&mut pair.app).await;
    for pid in pair.ids {
        pair.pids.forget(pid);
    }
}

/// SIGTERM, then SIGKILL after [`STOP_GRACE`].
async fn terminate(child: &mut Child) {
    if let Ok(Some(_)) = child.try_wait() {
        return;
    }
    if let Some(pid) = child.id().and_then(|p| i32::try_from(p).ok())
        && let Some(pid) = rustix::process::Pid::from_raw(pid)
    {
        let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
    }
    if tokio::time::timeout(STOP_GRACE, child.wait())
        .await
        .is_err()
    {
        let _ = child.start_kill();
        let _ = child.wait().await;
    }
}
