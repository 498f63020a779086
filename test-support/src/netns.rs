//! A pod and the cluster around it, in two network namespaces joined by a veth pair, for tests
//! of the path the injector's iptables rules send an app's connections along.
//!
//! ```no_run
//! # fn f(rules: &str) -> mesh_test_support::Result<()> {
//! use mesh_test_support::netns::{CLUSTER_IP, PodNetwork, Server};
//! let mut net = PodNetwork::create()?;
//! net.redirect(rules)?; // the init container's script, run in the pod
//! net.serve(Server::new("redis", &["redis-server", "--bind", "10.201.0.1"]).listening(6379))?;
//! let out = net.pod().run(None, &["redis-cli", "-h", "10.201.0.1", "PING"])?;
//! # Ok(()) }
//! ```
//!
//! The pod namespace has [`POD_IP`], the cluster namespace [`CLUSTER_IP`]; each has loopback
//! up. Our binaries start inside with [`Netns::exec_prefix`] (`ip netns exec`, then `setpriv` to
//! run as the proxy's uid), other programs with [`PodNetwork::serve`] and [`Netns::run`]. Every
//! command is bounded in time, and dropping the [`PodNetwork`] kills every process left in
//! either namespace and deletes both (the veth pair goes with them), also when a test panics.
//! Nothing in the host's own network namespace is changed.
//!
//! [`meshed_pod`] puts the mesh in it: the pod gets the rules and a `mesh-proxy` running as the
//! proxy's uid, bound where the injector binds it, and the cluster a real control plane;
//! [`MeshedPod::meshed_service`] adds a meshed workload behind a proxy of its own, and
//! [`MeshedPod::wait_metric`] reads the pod proxy's counters, to prove a connection went
//! through it.
//!
//! Needs root or passwordless sudo, `ip` (iproute2), `iptables`, `setpriv` (util-linux),
//! `timeout` (coreutils), `curl` and `bash`.

use std::{
    ffi::OsString,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

use crate::{
    HarnessError, Result,
    mesh::ControlPlane,
    process::ChildGuard,
    proxies::{Sidecar, SpawnedProxy},
    proxy_api::ProxyApiAccess,
};

/// The pod's address on the veth pair.
pub const POD_IP: Ipv4Addr = Ipv4Addr::new(10, 201, 0, 2);
/// The cluster namespace's address on the veth pair: where its servers listen.
pub const CLUSTER_IP: Ipv4Addr = Ipv4Addr::new(10, 201, 0, 1);

/// How long one command run with [`Netns::run`] may take before it is killed.
pub const COMMAND_LIMIT: Duration = Duration::from_secs(30);

/// Tells namespaces created by one test process apart.
static NEXT: AtomicU32 = AtomicU32::new(0);

fn sudo() -> Vec<OsString> {
    if rustix::process::getuid().is_root() {
        Vec::new()
    } else {
        // -E: our binaries are configured through the environment.
        vec!["sudo".into(), "-n".into(), "-E".into()]
    }
}

/// Runs `argv` as root (through sudo when needed), killing it after `limit`.
fn run_privileged(argv: &[&str], limit: Duration) -> Result<Output> {
    let mut full = sudo();
    full.extend(argv.iter().map(OsString::from));
    run_bounded(&full, limit)
}

/// Runs `argv` to completion within `limit` (coreutils `timeout` kills it after), and fails
/// with its stderr unless it exits 0.
fn run_bounded(argv: &[OsString], limit: Duration) -> Result<Output> {
    let shown = || {
        argv.iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect::<Vec<_>>()
            .join(" ")
    };
    let secs = limit.as_secs().max(1).to_string();
    let out = Command::new("timeout")
        .args(["--kill-after=2", &secs])
        .args(argv)
        .stdin(Stdio::null())
        .output()
        .map_err(HarnessError::io(format!("running {}", shown())))?;
    if out.status.success() {
        Ok(out)
    } else {
        let why = if out.status.code() == Some(124) {
            format!("timed out after {secs}s")
        } else {
            format!("{}", out.status)
        };
        Err(HarnessError::Command {
            command: shown(),
            detail: format!(
                "{why}\n--- stdout ---\n{}\n--- stderr ---\n{}",
                String::from_utf8_lossy(&out.stdout).trim_end(),
                String::from_utf8_lossy(&out.stderr).trim_end()
            ),
        })
    }
}

/// A network namespace.
#[derive(Debug)]
pub struct Netns {
    name: String,
}

impl Netns {
    /// Its name (`ip netns list`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The command line that runs a program in this namespace: `ip netns exec <name>`, through
    /// `sudo -n -E` when the tests do not run as root, and with `uid`, `setpriv` to drop to that
    /// user (and its group) with no supplementary groups. The environment passes through.
    pub fn exec_prefix(&self, uid: Option<u32>) -> Vec<OsString> {
        let mut argv = sudo();
        argv.extend(["ip", "netns", "exec", &self.name].map(OsString::from));
        if let Some(uid) = uid {
            argv.extend(
                [
                    "setpriv".to_string(),
                    format!("--reuid={uid}"),
                    format!("--regid={uid}"),
                    "--clear-groups".to_string(),
                    "--".to_string(),
                ]
                .map(OsString::from),
            );
        }
        argv
    }

    /// Runs `argv` in this namespace (as `uid`, if given) to completion within
    /// [`COMMAND_LIMIT`], and fails with its output unless it exits 0.
    pub fn run(&self, uid: Option<u32>, argv: &[&str]) -> Result<Output> {
        self.run_within(uid, argv, COMMAND_LIMIT)
    }

    /// [`Netns::run`] with a limit of its own.
    pub fn run_within(&self, uid: Option<u32>, argv: &[&str], limit: Duration) -> Result<Output> {
        let mut full = self.exec_prefix(uid);
        full.extend(argv.iter().map(OsString::from));
        run_bounded(&full, limit)
    }

    /// [`Netns::run`], returning stdout as text.
    pub fn stdout(&self, uid: Option<u32>, argv: &[&str]) -> Result<String> {
        Ok(String::from_utf8_lossy(&self.run(uid, argv)?.stdout).into_owned())
    }

    /// `GET url` with curl from this namespace: the status and the body. Status 0 means no
    /// answer.
    pub fn http_get(&self, url: &str) -> Result<(u16, String)> {
        let out = self.stdout(
            None,
            &[
                "curl",
                "-sS",
                "--max-time",
                "10",
                "-w",
                "\n%{http_code}",
                url,
            ],
        );
        let out = match out {
            Ok(out) => out,
            // curl exits non-zero when nothing answers.
            Err(HarnessError::Command { .. }) => return Ok((0, String::new())),
            Err(e) => return Err(e),
        };
        let (body, status) = out.rsplit_once('\n').unwrap_or(("", out.as_str()));
        Ok((status.trim().parse().unwrap_or(0), body.to_string()))
    }

    /// The sum of the samples of `name` whose labels contain every one of `labels`, scraped
    /// from the admin server at `admin` in this namespace (see [`crate::metric_sum`]).
    pub fn metric_sum(&self, admin: SocketAddr, name: &str, labels: &[&str]) -> Result<f64> {
        let (status, text) = self.http_get(&format!("http://{}/metrics", reachable(admin)))?;
        if status != 200 {
            return Err(HarnessError::Command {
                command: format!("GET http://{admin}/metrics in {}", self.name),
                detail: format!("status {status}"),
            });
        }
        Ok(crate::metric_sum_in(&text, name, labels))
    }

    /// Waits up to the test patience for the admin server at `admin` in this namespace to
    /// answer `/ready` with 200.
    #[allow(
        clippy::disallowed_methods,
        reason = "polls subprocesses from a plain thread; nothing async to stall"
    )]
    pub fn wait_ready(&self, admin: SocketAddr) -> Result<()> {
        let deadline = Instant::now() + crate::patience();
        loop {
            let (status, body) = self.http_get(&format!("http://{}/ready", reachable(admin)))?;
            if status == 200 {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(HarnessError::Proxy(format!(
                    "{admin} in {} not ready within {:?}: /ready answers {status} {body}",
                    self.name,
                    crate::patience()
                )));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Whether a TCP connection to `addr` from this namespace is accepted (with bash's
    /// `/dev/tcp`, so nothing but bash is needed).
    pub fn accepts(&self, addr: SocketAddr) -> bool {
        let script = format!("exec 3<>/dev/tcp/{}/{}", addr.ip(), addr.port());
        self.run_within(None, &["bash", "-c", &script], Duration::from_secs(5))
            .is_ok()
    }
}

/// Where to reach a listener bound to `addr` from its own namespace: a wildcard bind is
/// reached on loopback.
fn reachable(addr: SocketAddr) -> SocketAddr {
    if addr.ip().is_unspecified() {
        SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), addr.port())
    } else {
        addr
    }
}

/// A server to start in one of a [`PodNetwork`]'s namespaces; [`PodNetwork::serve`] starts it.
#[derive(Clone, Debug)]
#[must_use = "a server starts with PodNetwork::serve"]
pub struct Server {
    name: String,
    argv: Vec<String>,
    in_pod: bool,
    uid: Option<u32>,
    listening: Option<SocketAddr>,
}

impl Server {
    /// `argv`, called `name` in logs and errors, in the cluster namespace, as root.
    pub fn new(name: &str, argv: &[&str]) -> Self {
        Self {
            name: name.to_string(),
            argv: argv.iter().map(ToString::to_string).collect(),
            in_pod: false,
            uid: None,
            listening: None,
        }
    }

    /// Runs in the pod namespace instead.
    pub fn in_pod(mut self) -> Self {
        self.in_pod = true;
        self
    }

    /// Runs as `uid` (its group too).
    pub fn uid(mut self, uid: u32) -> Self {
        self.uid = Some(uid);
        self
    }

    /// Ready once it accepts connections on `port` of [`CLUSTER_IP`] (or [`POD_IP`]).
    pub fn listening(mut self, port: u16) -> Self {
        let ip = if self.in_pod { POD_IP } else { CLUSTER_IP };
        self.listening = Some(SocketAddr::from((ip, port)));
        self
    }

    /// Ready once it accepts connections on `addr` (in its own namespace).
    pub fn listening_on(mut self, addr: SocketAddr) -> Self {
        self.listening = Some(addr);
        self
    }
}

/// A pod namespace and a cluster namespace, joined by a veth pair; see the module docs.
#[derive(Debug)]
pub struct PodNetwork {
    pod: Netns,
    cluster: Netns,
    servers: Vec<ChildGuard>,
    dir: tempfile::TempDir,
}

impl PodNetwork {
    /// Creates both namespaces, the veth pair between them, and a directory every user can
    /// read (for files the proxy, which runs as another user, must open).
    pub fn create() -> Result<Self> {
        remove_stale();
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let id = format!("{}x{n}", std::process::id());
        let dir = tempfile::Builder::new()
            .prefix("mesh-netns-")
            .tempdir()
            .map_err(HarnessError::io("creating a directory for the namespaces"))?;
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).map_err(
            HarnessError::io("opening the namespaces' directory to every user"),
        )?;
        // From here on, drop deletes whatever was created.
        let net = Self {
            pod: Netns {
                name: format!("mesh-pod-{id}"),
            },
            cluster: Netns {
                name: format!("mesh-cluster-{id}"),
            },
            servers: Vec::new(),
            dir,
        };
        // Each end is born in its namespace, so the host's own never sees either, and each
        // namespace can call its end eth0.
        let (veth_pod, veth_cluster) = ("eth0", "eth0");
        let limit = Duration::from_secs(10);
        run_privileged(&["ip", "netns", "add", &net.pod.name], limit)?;
        run_privileged(&["ip", "netns", "add", &net.cluster.name], limit)?;
        run_privileged(
            &[
                "ip",
                "-n",
                &net.pod.name,
                "link",
                "add",
                veth_pod,
                "type",
                "veth",
                "peer",
                "name",
                veth_cluster,
                "netns",
                &net.cluster.name,
            ],
            limit,
        )?;
        for (ns, dev, ip) in [
            (&net.pod, veth_pod, POD_IP),
            (&net.cluster, veth_cluster, CLUSTER_IP),
        ] {
            let addr = format!("{ip}/24");
            run_privileged(
                &["ip", "-n", &ns.name, "addr", "add", &addr, "dev", dev],
                limit,
            )?;
            run_privileged(&["ip", "-n", &ns.name, "link", "set", dev, "up"], limit)?;
            run_privileged(&["ip", "-n", &ns.name, "link", "set", "lo", "up"], limit)?;
        }
        Ok(net)
    }

    /// The pod's namespace.
    pub fn pod(&self) -> &Netns {
        &self.pod
    }

    /// The cluster's namespace.
    pub fn cluster(&self) -> &Netns {
        &self.cluster
    }

    /// A directory every user can read, deleted with the namespaces.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Writes `contents` to `name` in [`PodNetwork::dir`], readable by every user.
    pub fn file(&self, name: &str, contents: &[u8]) -> Result<PathBuf> {
        let path = self.dir.path().join(name);
        std::fs::write(&path, contents)
            .map_err(HarnessError::io(format!("writing {}", path.display())))?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).map_err(
            HarnessError::io(format!("opening {} to every user", path.display())),
        )?;
        Ok(path)
    }

    /// `program` where every user can run it: the proxy's uid cannot reach a target directory
    /// under a private home (CI keeps it in `~/.cache`). A hard link where the file system
    /// allows, else a copy.
    pub fn executable(&self, program: &Path) -> Result<PathBuf> {
        let name = program.file_name().unwrap_or(program.as_os_str());
        let path = self.dir.path().join(name);
        if std::fs::hard_link(program, &path).is_err() {
            std::fs::copy(program, &path).map_err(HarnessError::io(format!(
                "copying {} to {}",
                program.display(),
                path.display()
            )))?;
        }
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).map_err(
            HarnessError::io(format!("making {} executable", path.display())),
        )?;
        Ok(path)
    }

    /// `access` with its trust roots and token copied into [`PodNetwork::dir`], so a proxy
    /// running as another user can read them (as a pod reads its mounted secrets).
    pub fn readable_access(&self, access: &ProxyApiAccess) -> Result<ProxyApiAccess> {
        let copy = |from: &Path, name: &str| -> Result<PathBuf> {
            let bytes = std::fs::read(from)
                .map_err(HarnessError::io(format!("reading {}", from.display())))?;
            self.file(name, &bytes)
        };
        Ok(ProxyApiAccess {
            addr: access.addr,
            trust_roots_file: copy(&access.trust_roots_file, "trust-roots.pem")?,
            token_file: copy(&access.token_file, "bootstrap-token")?,
        })
    }

    /// Runs the init container's `script` (the injector's iptables rules) in the pod.
    pub fn redirect(&self, script: &str) -> Result<()> {
        self.pod.run(None, &["sh", "-c", script]).map(drop)
    }

    /// Starts `server` and, if it names a port, waits up to the test patience until it accepts
    /// connections there. It is killed when the network is dropped.
    #[allow(
        clippy::disallowed_methods,
        reason = "polls subprocesses from a plain thread; nothing async to stall"
    )]
    pub fn serve(&mut self, server: Server) -> Result<()> {
        let Server {
            name,
            argv,
            in_pod,
            uid,
            listening,
        } = server;
        let ns = if in_pod { &self.pod } else { &self.cluster };
        let prefix = ns.exec_prefix(uid);
        let mut cmd = Command::new(&prefix[0]);
        cmd.args(&prefix[1..]).args(argv);
        let log = self.dir.path().join(format!("{name}.log"));
        let mut child = ChildGuard::spawn(&name, cmd, &log)?;
        if let Some(addr) = listening {
            let waited = crate::patience();
            let deadline = Instant::now() + waited;
            while !ns.accepts(addr) {
                child
                    .check_running()
                    .map_err(|e| child.not_ready(waited, e))?;
                if Instant::now() > deadline {
                    return Err(child.not_ready(waited, format!("nothing accepts on {addr}")));
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        self.servers.push(child);
        Ok(())
    }
}

impl Drop for PodNetwork {
    fn drop(&mut self) {
        for server in &mut self.servers {
            server.kill();
        }
        delete(&self.pod.name);
        delete(&self.cluster.name);
    }
}

/// Kills every process in namespace `name` (a proxy or control plane not dropped yet, a
/// server's own children: they would keep its sockets alive) and deletes it.
fn delete(name: &str) {
    let limit = Duration::from_secs(10);
    if let Ok(out) = run_privileged(&["ip", "netns", "pids", name], limit) {
        for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
            let _ = run_privileged(&["kill", "-9", pid], limit);
        }
    }
    let _ = run_privileged(&["ip", "netns", "del", name], limit);
}

/// Deletes the namespaces of test processes that are gone (killed before they could drop
/// their [`PodNetwork`]), found by the pid in their names.
fn remove_stale() {
    let Ok(out) = run_privileged(&["ip", "netns", "list"], Duration::from_secs(10)) else {
        return;
    };
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let name = line.split_whitespace().next().unwrap_or_default();
        if let Some(pid) = owner(name)
            && !Path::new(&format!("/proc/{pid}")).exists()
        {
            delete(name);
        }
    }
}

/// The pid of the test process that created namespace `name` (`mesh-pod-<pid>x<n>`,
/// `mesh-cluster-<pid>x<n>`); `None` for anybody else's.
fn owner(name: &str) -> Option<u32> {
    let (pid, n) = ["mesh-pod-", "mesh-cluster-"]
        .iter()
        .find_map(|prefix| name.strip_prefix(prefix))?
        .split_once('x')?;
    n.parse::<u32>().ok()?;
    pid.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_namespaces_named_by_the_harness_have_an_owner() {
        assert_eq!(owner("mesh-pod-4242x0"), Some(4242));
        assert_eq!(owner("mesh-cluster-17x12"), Some(17));
        // controlplane/tests/iptables.rs names its own; other tools name theirs.
        assert_eq!(owner("mesh-pod-4242"), None);
        assert_eq!(owner("mesh-peer-4242"), None);
        assert_eq!(owner("cni-1234x5"), None);
        assert_eq!(owner("mesh-pod-x1"), None);
    }
}

/// The proxy's ports in a pod, as the injector configures them by default.
pub const OUTBOUND_PORT: u16 = 4140;
/// See [`OUTBOUND_PORT`].
pub const INBOUND_PORT: u16 = 4143;
/// See [`OUTBOUND_PORT`].
pub const ADMIN_PORT: u16 = 4191;

/// A meshed pod to start: a [`PodNetwork`] whose pod has the init container's iptables
/// `rules` and a `mesh-proxy` running as `proxy_uid`, certified by a control plane that runs in
/// the cluster namespace.
pub fn meshed_pod(rules: &str, proxy_uid: u32) -> MeshedPodBuilder {
    MeshedPodBuilder {
        rules: rules.to_string(),
        proxy_uid,
        identity: crate::mesh::CLIENT_ID.to_string(),
        env: Vec::new(),
    }
}

/// A meshed pod's configuration; [`MeshedPodBuilder::start`] starts it.
#[derive(Clone, Debug)]
#[must_use = "a meshed pod starts with start()"]
pub struct MeshedPodBuilder {
    rules: String,
    proxy_uid: u32,
    identity: String,
    env: Vec<(String, String)>,
}

impl MeshedPodBuilder {
    /// The pod's SPIFFE ID (default [`crate::mesh::CLIENT_ID`]).
    pub fn identity(mut self, id: &str) -> Self {
        self.identity = id.to_string();
        self
    }

    /// Sets a `MESH_PROXY_*` variable of the pod's proxy.
    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.env.push((key.to_string(), value.to_string()));
        self
    }

    /// Creates the namespaces, applies the rules, starts the control plane and the pod's proxy
    /// (outbound on 127.0.0.1:[`OUTBOUND_PORT`], where the rules redirect to; admin on
    /// [`ADMIN_PORT`], as the injector binds them), and waits until the proxy is ready.
    pub fn start(self) -> Result<MeshedPod> {
        use mesh_sidecar::config::{ENV_ADMIN_ADDR, ENV_OUTBOUND_ADDR};
        let net = PodNetwork::create()?;
        net.redirect(&self.rules)?;
        let any_port = SocketAddr::from((CLUSTER_IP, 0)).to_string();
        let control_plane = crate::mesh::control_plane()
            .via(net.cluster.exec_prefix(None))
            .env("MESH_CONTROLPLANE_API_ADDR", &any_port)
            .env("MESH_CONTROLPLANE_PROXY_ADDR", &any_port)
            .run()?;
        let access = net.readable_access(&control_plane.access())?;
        let binary = net.executable(&crate::process::workspace_bin("mesh-proxy")?)?;
        let mut builder = crate::proxies::proxy()
            .binary(binary)
            .control_plane(&access, &self.identity)
            .env(ENV_OUTBOUND_ADDR, format!("127.0.0.1:{OUTBOUND_PORT}"))
            .env(ENV_ADMIN_ADDR, format!("0.0.0.0:{ADMIN_PORT}"))
            .via(net.pod.exec_prefix(Some(self.proxy_uid)));
        for (key, value) in &self.env {
            builder = builder.env(key, value);
        }
        let proxy = builder.spawn()?;
        net.pod.wait_ready(proxy.addr("admin"))?;
        Ok(MeshedPod {
            proxy,
            control_plane,
            net,
        })
    }
}

/// A pod with the injector's rules and a proxy, and a cluster with a control plane; servers
/// are added with [`MeshedPod::serve`] and [`MeshedPod::meshed_service`]. Dropping it stops
/// everything and deletes the namespaces.
#[derive(Debug)]
pub struct MeshedPod {
    // Dropped in this order: the proxy, the control plane, then whatever is left in the
    // namespaces, and the namespaces.
    proxy: SpawnedProxy,
    control_plane: ControlPlane,
    net: PodNetwork,
}

impl MeshedPod {
    /// The namespaces.
    pub fn net(&self) -> &PodNetwork {
        &self.net
    }

    /// The pod's proxy.
    pub fn proxy(&mut self) -> &mut SpawnedProxy {
        &mut self.proxy
    }

    /// The control plane.
    pub fn control_plane(&self) -> &ControlPlane {
        &self.control_plane
    }

    /// Starts `server`; see [`PodNetwork::serve`].
    pub fn serve(&mut self, server: Server) -> Result<()> {
        self.net.serve(server)
    }

    /// Runs `argv` in the pod as the app (root, whose connections the rules redirect) and
    /// returns its stdout; see [`Netns::run`].
    pub fn app_run(&self, argv: &[&str]) -> Result<String> {
        self.net.pod.stdout(None, argv)
    }

    /// The sum of the pod proxy's samples of `name` whose labels contain every one of `labels`.
    pub fn metric(&self, name: &str, labels: &[&str]) -> Result<f64> {
        self.net
            .pod
            .metric_sum(self.proxy.addr("admin"), name, labels)
    }

    /// The last `n` lines of the pod proxy's log, for failure messages.
    pub fn proxy_log(&mut self, n: usize) -> String {
        self.proxy.log_tail(n)
    }

    /// A meshed workload of `service` (`name.namespace:port`) with `identity` in the cluster
    /// namespace: `app` (which must listen on 127.0.0.1:`app_port` there) behind a proxy whose
    /// inbound listener is [`CLUSTER_IP`]:`inbound_port`, registered with the control plane at
    /// that address. Returns once the proxy is ready.
    pub fn meshed_service(
        &mut self,
        service: &str,
        identity: &str,
        app: Server,
        app_port: u16,
        inbound_port: u16,
    ) -> Result<SpawnedProxy> {
        use mesh_sidecar::config::{ENV_ADMIN_ADDR, ENV_INBOUND_ADDR};
        let app_addr = SocketAddr::from((Ipv4Addr::LOCALHOST, app_port));
        self.net.serve(app.listening_on(app_addr))?;
        let proxy = self
            .control_plane
            .proxy(identity)
            .app(app_addr)
            .service(service)
            .env(
                ENV_INBOUND_ADDR,
                SocketAddr::from((CLUSTER_IP, inbound_port)).to_string(),
            )
            .env(ENV_ADMIN_ADDR, "127.0.0.1:0")
            .via(self.net.cluster.exec_prefix(None))
            .spawn()?;
        self.net.cluster.wait_ready(proxy.addr("admin"))?;
        Ok(proxy)
    }
}

impl MeshedPod {
    /// Waits up to the test patience until [`MeshedPod::metric`] reaches `at_least`, and
    /// returns it; the error names the series, the last value and the proxy's log tail.
    #[allow(
        clippy::disallowed_methods,
        reason = "polls subprocesses from a plain thread; nothing async to stall"
    )]
    pub fn wait_metric(&mut self, name: &str, labels: &[&str], at_least: f64) -> Result<f64> {
        let deadline = Instant::now() + crate::patience();
        loop {
            // An empty sum is -0.0; shown as 0.
            let value = self.metric(name, labels)? + 0.0;
            if value >= at_least {
                return Ok(value);
            }
            if Instant::now() > deadline {
                let (_, text) = self.net.pod.http_get(&format!(
                    "http://{}/metrics",
                    reachable(self.proxy.addr("admin"))
                ))?;
                let family: Vec<&str> = text.lines().filter(|l| l.starts_with(name)).collect();
                return Err(HarnessError::Proxy(format!(
                    "the pod's proxy counted {value} for {name} {labels:?} within {:?}, \
                     wanted at least {at_least}\n--- its {name} series ---\n{}\n\
                     --- its log ---\n{}",
                    crate::patience(),
                    family.join("\n"),
                    self.proxy.log_tail(20)
                )));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}
