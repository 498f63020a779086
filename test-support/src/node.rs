//! A real one-node Kubernetes cluster: etcd, kube-apiserver, kube-controller-manager,
//! kube-scheduler, a kubelet on containerd (runc, the bridge CNI), kube-proxy in iptables mode and
//! CoreDNS, for tests that need pods to really run.
//!
//! ```no_run
//! # fn f() -> mesh_test_support::Result<()> {
//! use mesh_test_support::node::Node;
//! let node = Node::shared()?; // started once per test binary
//! node.import_image(std::path::Path::new("/tmp/app.oci.tar"))?;
//! node.kubectl(&["apply", "-f", "/tmp/app.yaml"])?;
//! # Ok(()) }
//! ```
//!
//! Everything runs inside a network namespace the harness creates, so the bridge, the pods' veth
//! pairs and kube-proxy's iptables rules never touch the host's network. The node's processes also
//! share a mount namespace of their own (container root filesystems, volumes and the pods'
//! namespace pins stay out of the host's mount table), and the pods' cgroups sit under a cgroup
//! named after the node. The test process reaches the apiserver on a loopback port forwarded into
//! the namespace, so `kubectl`, `mesh` and kube clients use an ordinary kubeconfig.
//!
//! A small supervisor script owns the namespaces and tears the node down when its stdin closes:
//! when the [`Node`] drops, or when the test process exits or is killed (a [`Node::shared`] node
//! lives in a static, which is never dropped). Teardown kills every process of the node and its
//! pods, removes the cgroups and the namespace, and deletes the node's directory (set
//! `MESH_NODE_KEEP_DIR=1` to keep it, with every component's log, for debugging).
//!
//! The Kubernetes binaries come from `scripts/build-kube-binaries`, like the apiserver's; it also
//! builds CoreDNS and the node's images (pause, CoreDNS, busybox) as OCI archives in
//! `<bin dir>/images`. containerd 1.6, runc, the CNI plugins, `socat`, `nsenter`/`unshare`
//! (util-linux), `iptables`, `conntrack` and `busybox` come from Debian packages.
//!
//! Facts about this machine that shape the configuration: cgroup v1 controllers with a unified
//! hierarchy beside them and no systemd, so the kubelet and runc use the `cgroupfs` driver and the
//! kubelet needs `failCgroupV1: false`; the sandbox cannot lower `oom_score_adj`, so containerd's
//! CRI runs with `restrict_oom_score_adj`; the disk may be fuller than the kubelet's default
//! eviction thresholds, which are set to absolute sizes so pods are not evicted for it. A
//! percentage would not do: 1% of a large, shared disk is gigabytes, and a node under disk
//! pressure taints itself and leaves every pod Pending. [`Node::start`] refuses to start with
//! less than [`MIN_FREE_DISK`] free, naming the directory and what is free.

use std::{
    io::{BufRead, BufReader, Write},
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::{Child, ChildStdin, Command, Output, Stdio},
    sync::{
        OnceLock,
        atomic::{AtomicU32, Ordering},
    },
    time::{Duration, Instant},
};

use crate::{
    HarnessError, Result,
    certs::{Leaf, TestCa, write},
    kube::{bin_dir, find},
    ports::free_port,
    process::{ChildGuard, startup_timeout, tail},
};

/// The node's address inside its namespace (its `InternalIP`); the apiserver advertises it.
pub const NODE_IP: Ipv4Addr = Ipv4Addr::new(10, 203, 0, 2);
/// The pods' subnet on the node's bridge.
pub const POD_CIDR: &str = "10.244.0.0/24";
/// The Services' ClusterIP range.
pub const SERVICE_CIDR: &str = "10.96.0.0/16";
/// The ClusterIP of the cluster DNS (`kube-system/kube-dns`).
pub const DNS_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
/// The node's name.
pub const NODE_NAME: &str = "mesh-node";
/// The cluster's DNS domain.
pub const CLUSTER_DOMAIN: &str = "cluster.local";

/// Keep the node's directory (configs, data, every log) after teardown, for debugging.
pub const ENV_KEEP_DIR: &str = "MESH_NODE_KEEP_DIR";

/// The image every pod sandbox runs (catatonit in pause mode, static, on scratch).
pub const PAUSE_IMAGE: &str = "docker.io/local/pause:1";
/// CoreDNS, built from its Go module.
pub const COREDNS_IMAGE: &str = "docker.io/local/coredns:1";
/// Debian's static busybox on scratch: `sh`, `nc`, `nslookup`, `httpd`, for test pods. (Its
/// `wget` crashes: the static glibc cannot load NSS modules. Use `nc`.)
pub const BUSYBOX_IMAGE: &str = "docker.io/local/busybox:1";

/// The image archives the node loads at start, by file name in `<bin dir>/images`.
const NODE_IMAGES: [&str; 3] = ["pause.oci.tar", "coredns.oci.tar", "busybox.oci.tar"];

const SUPERVISE: &str = include_str!("node/supervise.sh");
const COREDNS_MANIFEST: &str = include_str!("node/coredns.yaml");

/// The port the apiserver listens on inside the namespace.
const API_PORT: u16 = 6443;
/// How long one command (kubectl, ctr) may take.
const COMMAND_LIMIT: Duration = Duration::from_secs(120);

/// Tells apart the nodes one test process starts.
static NEXT: AtomicU32 = AtomicU32::new(0);

/// A running one-node cluster. Dropping it tears the node down.
pub struct Node {
    // Field order is drop order: the components go first, then the supervisor's stdin closes and
    // it cleans up what is left.
    components: Vec<ChildGuard>,
    supervisor: Option<Supervisor>,
    netns: String,
    holder: u32,
    kubeconfig: PathBuf,
    kubectl: PathBuf,
    url: String,
    dir: PathBuf,
    started_in: Duration,
}

struct Supervisor {
    child: Child,
    stdin: Option<ChildStdin>,
}

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Node")
            .field("url", &self.url)
            .field("netns", &self.netns)
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

impl Node {
    /// The node shared by every test of this test binary: the first caller starts it (about half
    /// a minute), later callers get the same one. It is torn down when the test process exits.
    /// A node that failed to start fails every caller with the same message.
    pub fn shared() -> Result<&'static Node> {
        static SHARED: OnceLock<std::result::Result<Node, String>> = OnceLock::new();
        SHARED
            .get_or_init(|| Node::start().map_err(|e| e.to_string()))
            .as_ref()
            .map_err(|e| HarnessError::Command {
                command: "starting the shared test node".into(),
                detail: e.clone(),
            })
    }

    /// Starts a node of its own and waits until it is Ready, its images are loaded and cluster
    /// DNS answers. Blocks the calling thread.
    pub fn start() -> Result<Node> {
        let begun = Instant::now();
        let bins = NodeBinaries::find()?;
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let name = format!("mesh-node-{}-{n}", std::process::id());
        let tmp = std::env::temp_dir();
        check_free_disk(&tmp)?;
        let dir = tmp.join(&name);
        std::fs::create_dir_all(dir.join("logs"))
            .map_err(HarnessError::io(format!("creating {}", dir.display())))?;
        let logs = dir.join("logs");

        let api_port = free_port()?;
        let (supervisor, holder) = Supervisor::start(&name, &dir, api_port)?;
        let mut node = Node {
            components: Vec::new(),
            supervisor: Some(supervisor),
            netns: name.clone(),
            holder,
            kubeconfig: dir.join("kubeconfig"),
            kubectl: bins.kubectl.clone(),
            url: format!("https://127.0.0.1:{api_port}"),
            dir: dir.clone(),
            started_in: Duration::ZERO,
        };

        let pki = Pki::write(&dir)?;
        // Components inside the namespace talk to the apiserver directly; the test process goes
        // through the forwarded loopback port.
        let inner = write_kubeconfig(
            &dir,
            "kubeconfig.node",
            &format!("https://127.0.0.1:{API_PORT}"),
            &pki,
        )?;
        node.kubeconfig = write_kubeconfig(&dir, "kubeconfig", &node.url, &pki)?;
        let configs = Configs::write(&dir, &name, &pki, &inner)?;

        node.spawn("containerd", &logs, |c| {
            c.arg(&bins.containerd)
                .arg("--config")
                .arg(&configs.containerd);
        })?;
        node.spawn("etcd", &logs, |c| {
            c.arg(&bins.etcd).args([
                format!("--data-dir={}", dir.join("etcd").display()),
                "--listen-client-urls=http://127.0.0.1:2379".into(),
                "--advertise-client-urls=http://127.0.0.1:2379".into(),
                "--listen-peer-urls=http://127.0.0.1:2380".into(),
                "--initial-advertise-peer-urls=http://127.0.0.1:2380".into(),
                "--initial-cluster=default=http://127.0.0.1:2380".into(),
                "--log-level=warn".into(),
            ]);
        })?;
        node.spawn("kube-apiserver", &logs, |c| {
            c.arg(&bins.apiserver).args([
                "--etcd-servers=http://127.0.0.1:2379".to_string(),
                "--bind-address=0.0.0.0".into(),
                format!("--advertise-address={NODE_IP}"),
                format!("--secure-port={API_PORT}"),
                format!("--cert-dir={}", pki.dir.display()),
                format!("--tls-cert-file={}", pki.apiserver_cert.display()),
                format!("--tls-private-key-file={}", pki.apiserver_key.display()),
                format!("--client-ca-file={}", pki.ca.display()),
                "--service-account-issuer=https://kubernetes.default.svc.cluster.local".into(),
                format!("--service-account-key-file={}", pki.sa_public.display()),
                format!(
                    "--service-account-signing-key-file={}",
                    pki.sa_private.display()
                ),
                format!("--service-cluster-ip-range={SERVICE_CIDR}"),
                "--authorization-mode=Node,RBAC".into(),
                "--allow-privileged=true".into(),
                "--profiling=false".into(),
                format!("--kubelet-client-certificate={}", pki.admin_cert.display()),
                format!("--kubelet-client-key={}", pki.admin_key.display()),
                // No DNS for the node's name here; `kubectl exec/logs` dial its address.
                "--kubelet-preferred-address-types=InternalIP".into(),
                "--v=1".into(),
            ]);
        })?;
        node.spawn("kube-controller-manager", &logs, |c| {
            c.arg(&bins.controller_manager).args([
                format!("--kubeconfig={}", inner.display()),
                format!(
                    "--service-account-private-key-file={}",
                    pki.sa_private.display()
                ),
                format!("--root-ca-file={}", pki.ca.display()),
                "--use-service-account-credentials=false".into(),
                "--leader-elect=false".into(),
                "--bind-address=127.0.0.1".into(),
                "--allocate-node-cidrs=false".into(),
                "--v=1".into(),
            ]);
        })?;
        node.spawn("kube-scheduler", &logs, |c| {
            c.arg(&bins.scheduler).args([
                format!("--kubeconfig={}", inner.display()),
                "--leader-elect=false".into(),
                "--bind-address=127.0.0.1".into(),
            ]);
        })?;
        // The kubelet exits at once when the runtime's socket is not there yet (a busy machine
        // can take seconds to start containerd), so it starts only once containerd listens.
        {
            let socket = dir.join("containerd.sock");
            let mut components = std::mem::take(&mut node.components);
            let waited = wait(&mut components, &dir, "containerd's socket", || {
                Ok(socket.exists())
            });
            node.components = components;
            waited?;
        }
        node.spawn("kubelet", &logs, |c| {
            c.arg(&bins.kubelet).args([
                format!("--config={}", configs.kubelet.display()),
                format!("--kubeconfig={}", inner.display()),
                format!("--hostname-override={NODE_NAME}"),
                format!("--node-ip={NODE_IP}"),
                "--v=1".into(),
            ]);
        })?;
        node.spawn("kube-proxy", &logs, |c| {
            c.arg(&bins.kube_proxy)
                .arg(format!("--config={}", configs.kube_proxy.display()));
        })?;

        // The checks below borrow the node; its components are polled beside them.
        let mut components = std::mem::take(&mut node.components);
        let dir = node.dir.clone();
        wait(&mut components, &dir, "the apiserver's /readyz", || {
            let out = node.kubectl(&["get", "--raw", "/readyz"])?;
            Ok(out.trim() == "ok")
        })?;
        for image in NODE_IMAGES {
            node.import_image(&bins.images.join(image))?;
        }
        wait(&mut components, &dir, "the node to be Ready", || {
            let out = node.kubectl(&[
                "get",
                "node",
                NODE_NAME,
                "-o",
                "jsonpath={.status.conditions[?(@.type==\"Ready\")].status}",
            ]);
            Ok(matches!(out.as_deref().map(str::trim), Ok("True")))
        })?;
        node.apply_text(COREDNS_MANIFEST)?;
        // DNS answers through the ClusterIP once CoreDNS runs and kube-proxy has its rules.
        let probe = format!("kubernetes.default.svc.{CLUSTER_DOMAIN}");
        wait(&mut components, &dir, "cluster DNS", || {
            Ok(node
                .run_in_node(&["busybox", "nslookup", &probe, &DNS_IP.to_string()])
                .is_ok())
        })?;
        node.components = components;
        node.started_in = begun.elapsed();
        tracing::info!(node = %name, took = ?node.started_in, "one-node cluster ready");
        Ok(node)
    }

    fn spawn(&mut self, name: &str, logs: &Path, args: impl FnOnce(&mut Command)) -> Result<()> {
        let mut cmd = self.in_node_command();
        args(&mut cmd);
        let guard = ChildGuard::spawn(name, cmd, &logs.join(format!("{name}.log")))?;
        self.components.push(guard);
        Ok(())
    }

    /// A command that runs inside the node's network and mount namespaces.
    fn in_node_command(&self) -> Command {
        let mut cmd = Command::new("nsenter");
        cmd.args(["-t", &self.holder.to_string(), "-m", "-n", "--"]);
        cmd
    }

    /// A kubeconfig for a cluster admin (client certificate in `system:masters`), reaching the
    /// apiserver on a loopback port: for `kubectl`, `mesh` and kube clients in the test.
    pub fn kubeconfig(&self) -> &Path {
        &self.kubeconfig
    }

    /// The apiserver's URL as the test process reaches it, e.g. `https://127.0.0.1:38123`.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The `kubectl` built at the node's Kubernetes release.
    pub fn kubectl_bin(&self) -> &Path {
        &self.kubectl
    }

    /// A `kubectl` command with `KUBECONFIG` set to the node's, for tests that need its exit
    /// status or stdin.
    pub fn kubectl_command(&self) -> Command {
        let mut cmd = Command::new(&self.kubectl);
        cmd.env("KUBECONFIG", &self.kubeconfig);
        cmd
    }

    /// Runs `kubectl ARGS` against the node and returns its stdout; fails with its output
    /// unless it exits 0.
    pub fn kubectl(&self, args: &[&str]) -> Result<String> {
        let mut cmd = self.kubectl_command();
        cmd.args(args);
        output_of(&mut cmd, None)
    }

    /// `kubectl apply -f -` of `yaml`; returns kubectl's stdout.
    pub fn apply_text(&self, yaml: &str) -> Result<String> {
        let mut cmd = self.kubectl_command();
        cmd.args(["apply", "-f", "-"]);
        output_of(&mut cmd, Some(yaml.as_bytes()))
    }

    /// A kube client for the node, as a cluster admin. Build one per test: a client belongs to
    /// the runtime it was made on.
    pub async fn client(&self) -> Result<::kube::Client> {
        let kubeconfig = ::kube::config::Kubeconfig::read_from(&self.kubeconfig).map_err(|e| {
            HarnessError::Io {
                context: format!("reading {}", self.kubeconfig.display()),
                source: std::io::Error::other(e),
            }
        })?;
        let config = ::kube::Config::from_custom_kubeconfig(
            kubeconfig,
            &::kube::config::KubeConfigOptions::default(),
        )
        .await
        .map_err(|e| HarnessError::Io {
            context: format!("loading {}", self.kubeconfig.display()),
            source: std::io::Error::other(e),
        })?;
        ::kube::Client::try_from(config).map_err(HarnessError::kube("building a client"))
    }

    /// Loads an OCI image archive (an OCI layout in a tar, as `scripts/lib/oci-archive` and
    /// `scripts/build-images` write) into the node's containerd, where the kubelet finds it:
    /// pods then use it with `imagePullPolicy: Never` or `IfNotPresent`. The image keeps the
    /// name in the archive; the CRI resolves short names under `docker.io/`, so name images
    /// in full.
    pub fn import_image(&self, archive: &Path) -> Result<()> {
        let archive = std::path::absolute(archive)
            .map_err(HarnessError::io(format!("resolving {}", archive.display())))?;
        if !archive.is_file() {
            return Err(HarnessError::Missing {
                program: archive.display().to_string(),
                hint: "an OCI image archive to import; see scripts/build-kube-binaries and \
                       scripts/build-images"
                    .into(),
            });
        }
        let socket = self.dir.join("containerd.sock");
        let socket = socket.to_string_lossy();
        let archive = archive.to_string_lossy();
        self.run_in_node(&[
            "ctr",
            "--address",
            &socket,
            "-n",
            "k8s.io",
            "images",
            "import",
            &archive,
        ])
        .map(|_| ())
    }

    /// Runs a host program inside the node's network (and mount) namespace, e.g. `curl` to a
    /// pod or ClusterIP, and fails with its output unless it exits 0.
    pub fn run_in_node(&self, argv: &[&str]) -> Result<Output> {
        let mut cmd = self.in_node_command();
        cmd.args(argv);
        let out = run_with_limit(&mut cmd, None)?;
        if out.status.success() {
            Ok(out)
        } else {
            Err(command_failed(&cmd, &out))
        }
    }

    /// Starts a long-running host program inside the node's namespaces (e.g. a Prometheus that
    /// scrapes pods, or a server pods call at [`NODE_IP`]), logging to
    /// `<dir>/logs/<name>.log`; dropping the guard kills it, and so does the node's teardown.
    pub fn spawn_in_node(&self, name: &str, argv: &[&str]) -> Result<ChildGuard> {
        let mut cmd = self.in_node_command();
        cmd.args(argv);
        ChildGuard::spawn(
            name,
            cmd,
            &self.dir.join("logs").join(format!("{name}.log")),
        )
    }

    /// A kubeconfig for programs run inside the node (with [`Node::run_in_node`] or
    /// [`Node::spawn_in_node`]): the same admin, reaching the apiserver on the namespace's
    /// loopback.
    pub fn inner_kubeconfig(&self) -> PathBuf {
        self.dir.join("kubeconfig.node")
    }

    /// The network namespace the node runs in (`ip netns list`).
    pub fn netns(&self) -> &str {
        &self.netns
    }

    /// The node's directory: certificates, configs, data, and `logs/<component>.log`.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// How long [`Node::start`] took, from nothing to Ready with DNS answering.
    pub fn started_in(&self) -> Duration {
        self.started_in
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.components.clear();
        if let Some(mut s) = self.supervisor.take() {
            drop(s.stdin.take());
            // Teardown takes well under a second; the limit only guards against a hang.
            let deadline = Instant::now() + Duration::from_secs(30);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = s.child.try_wait() {
                    return;
                }
                pause(Duration::from_millis(50));
            }
            let _ = s.child.kill();
            let _ = s.child.wait();
        }
    }
}

impl Supervisor {
    /// Starts the supervisor and returns it with the holder's PID.
    fn start(name: &str, dir: &Path, api_port: u16) -> Result<(Self, u32)> {
        let log = dir.join("logs").join("supervisor.log");
        let err = std::fs::File::create(&log)
            .map_err(HarnessError::io(format!("creating {}", log.display())))?;
        let mut child = Command::new("bash")
            .arg("-c")
            .arg(SUPERVISE)
            .arg("supervise")
            .arg(name)
            .arg(name)
            .arg(dir)
            .arg(api_port.to_string())
            .env("NODE_CIDR", format!("{NODE_IP}/24"))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(err)
            .spawn()
            .map_err(HarnessError::io("starting the node's supervisor (bash)"))?;
        let stdin = child.stdin.take();
        let stdout = child.stdout.take();
        let mut supervisor = Supervisor { child, stdin };
        let mut line = String::new();
        if let Some(stdout) = stdout {
            let _ = BufReader::new(stdout).read_line(&mut line);
        }
        match line.trim().strip_prefix("holder ").map(str::parse::<u32>) {
            Some(Ok(pid)) => Ok((supervisor, pid)),
            _ => {
                let _ = supervisor.child.wait();
                Err(HarnessError::Command {
                    command: "preparing the node's namespaces".into(),
                    detail: format!(
                        "the supervisor printed {line:?}\n--- {} ---\n{}",
                        log.display(),
                        tail(&log, 20)
                    ),
                })
            }
        }
    }
}

struct NodeBinaries {
    etcd: PathBuf,
    apiserver: PathBuf,
    controller_manager: PathBuf,
    scheduler: PathBuf,
    kubelet: PathBuf,
    kube_proxy: PathBuf,
    kubectl: PathBuf,
    containerd: PathBuf,
    images: PathBuf,
}

impl NodeBinaries {
    fn find() -> Result<Self> {
        for tool in [
            "containerd",
            "ctr",
            "runc",
            "containerd-shim-runc-v2",
            "socat",
            "nsenter",
            "unshare",
            "iptables",
            "busybox",
            "ip",
        ] {
            on_path(tool)?;
        }
        if !Path::new("/usr/lib/cni/bridge").is_file() {
            return Err(HarnessError::Missing {
                program: "/usr/lib/cni/bridge".into(),
                hint: "install Debian's containernetworking-plugins".into(),
            });
        }
        let images = bin_dir().join("images");
        for image in NODE_IMAGES {
            if !images.join(image).is_file() {
                return Err(HarnessError::Missing {
                    program: images.join(image).display().to_string(),
                    hint: "run scripts/build-kube-binaries".into(),
                });
            }
        }
        Ok(Self {
            etcd: find("etcd")?,
            apiserver: find("kube-apiserver")?,
            controller_manager: find("kube-controller-manager")?,
            scheduler: find("kube-scheduler")?,
            kubelet: find("kubelet")?,
            kube_proxy: find("kube-proxy")?,
            kubectl: find("kubectl")?,
            containerd: on_path("containerd")?,
            images,
        })
    }
}

fn on_path(program: &str) -> Result<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin".into(), "/sbin".into()])
        .map(|d| d.join(program))
        .find(|p| p.is_file())
        .ok_or_else(|| HarnessError::Missing {
            program: program.to_string(),
            hint: "the one-node cluster needs Debian's containerd, runc, \
                   containernetworking-plugins, socat, util-linux, iptables, conntrack and \
                   busybox-static (scripts/test installs them)"
                .into(),
        })
}

struct Pki {
    dir: PathBuf,
    ca: PathBuf,
    apiserver_cert: PathBuf,
    apiserver_key: PathBuf,
    admin_cert: PathBuf,
    admin_key: PathBuf,
    sa_private: PathBuf,
    sa_public: PathBuf,
}

impl Pki {
    fn write(dir: &Path) -> Result<Self> {
        let d = dir.join("pki");
        std::fs::create_dir_all(&d)
            .map_err(HarnessError::io(format!("creating {}", d.display())))?;
        let ca = TestCa::new("mesh-test-node-ca")?;
        let mut leaf = Leaf::new("kube-apiserver")
            .san("127.0.0.1")
            .san(&NODE_IP.to_string())
            // The `kubernetes` Service's ClusterIP: the first address of the range.
            .san("10.96.0.1")
            .san("localhost")
            .server();
        for name in ["kubernetes", "kubernetes.default", "kubernetes.default.svc"] {
            leaf = leaf.san(name);
        }
        let serving = ca.issue(&leaf.san(&format!("kubernetes.default.svc.{CLUSTER_DOMAIN}")))?;
        let admin = ca.issue(
            &Leaf::new("mesh-test-admin")
                .organization("system:masters")
                .client(),
        )?;
        let sa_key = rcgen::KeyPair::generate()?;
        Ok(Self {
            ca: write(&d, "ca.crt", ca.cert_pem())?,
            apiserver_cert: write(&d, "apiserver.crt", &serving.cert_pem)?,
            apiserver_key: write(&d, "apiserver.key", &serving.key_pem)?,
            admin_cert: write(&d, "admin.crt", &admin.cert_pem)?,
            admin_key: write(&d, "admin.key", &admin.key_pem)?,
            sa_private: write(&d, "sa.key", &sa_key.serialize_pem())?,
            sa_public: write(&d, "sa.pub", &sa_key.public_key_pem())?,
            dir: d,
        })
    }
}

fn write_kubeconfig(dir: &Path, file: &str, server: &str, pki: &Pki) -> Result<PathBuf> {
    // JSON is YAML, and quoting every string keeps names like `n` or `on` from turning into
    // booleans.
    let kc = serde_json::json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "mesh-node", "cluster": {
            "server": server,
            "certificate-authority": pki.ca,
        }}],
        "users": [{"name": "admin", "user": {
            "client-certificate": pki.admin_cert,
            "client-key": pki.admin_key,
        }}],
        "contexts": [{"name": "mesh-node", "context": {"cluster": "mesh-node", "user": "admin"}}],
        "current-context": "mesh-node",
    });
    write(dir, file, &kc.to_string())
}

struct Configs {
    containerd: PathBuf,
    kubelet: PathBuf,
    kube_proxy: PathBuf,
}

impl Configs {
    fn write(dir: &Path, cgroup: &str, pki: &Pki, kubeconfig: &Path) -> Result<Self> {
        let d = dir.display();
        let cni = dir.join("cni");
        std::fs::create_dir_all(cni.join("net.d"))
            .map_err(HarnessError::io(format!("creating {}", cni.display())))?;
        let conflist = serde_json::json!({
            "cniVersion": "1.0.0",
            "name": "mesh-node",
            "plugins": [
                {
                    "type": "bridge",
                    "bridge": "cni0",
                    "isGateway": true,
                    "ipMasq": false,
                    "hairpinMode": true,
                    "ipam": {
                        "type": "host-local",
                        "ranges": [[{"subnet": POD_CIDR}]],
                        "routes": [{"dst": "0.0.0.0/0"}],
                        "dataDir": cni.join("ipam"),
                    },
                },
                {"type": "portmap", "capabilities": {"portMappings": true}},
            ],
        });
        write(
            &cni.join("net.d"),
            "10-mesh-node.conflist",
            &conflist.to_string(),
        )?;
        let containerd = write(
            dir,
            "containerd.toml",
            &format!(
                r#"version = 2
root = "{d}/containerd/root"
state = "{d}/containerd/state"
[grpc]
  address = "{d}/containerd.sock"
[ttrpc]
  address = "{d}/containerd.sock.ttrpc"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{PAUSE_IMAGE}"
  # The sandbox may not lower oom_score_adj, which the CRI does for every pod sandbox.
  restrict_oom_score_adj = true
  # Pod network namespaces are pinned under the state dir, in the node's mount namespace.
  netns_mounts_under_state_dir = true
  disable_apparmor = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "{cni}/net.d"
[plugins."io.containerd.internal.v1.opt"]
  path = "{d}/containerd/opt"
"#,
                cni = cni.display()
            ),
        )?;
        let kubelet = write(
            dir,
            "kubelet.yaml",
            &serde_json::json!({
                "apiVersion": "kubelet.config.k8s.io/v1beta1",
                "kind": "KubeletConfiguration",
                // No systemd here, and cgroup v1 controllers.
                "cgroupDriver": "cgroupfs",
                "failCgroupV1": false,
                "cgroupRoot": format!("/{cgroup}"),
                "containerRuntimeEndpoint": format!("unix://{d}/containerd.sock"),
                "readOnlyPort": 0,
                "authentication": {
                    "anonymous": {"enabled": false},
                    "webhook": {"enabled": false},
                    "x509": {"clientCAFile": pki.ca},
                },
                "authorization": {"mode": "AlwaysAllow"},
                "clusterDNS": [DNS_IP.to_string()],
                "clusterDomain": CLUSTER_DOMAIN,
                // No upstream resolvers: pods resolve cluster names only.
                "resolvConf": write(dir, "resolv.conf", "nameserver 127.0.0.1\n")?,
                "failSwapOn": false,
                // A developer's disk may be fuller than the defaults tolerate; evicting test
                // pods for it would only confuse. Sizes, not percentages: 1% of a large shared
                // disk is gigabytes.
                "evictionHard": {
                    "memory.available": "1Mi",
                    "nodefs.available": EVICTION_FREE_DISK,
                    "imagefs.available": EVICTION_FREE_DISK,
                    "nodefs.inodesFree": "1%",
                },
                // Images are imported, never pulled: garbage collection must not remove them.
                "imageGCHighThresholdPercent": 100,
                "imageGCLowThresholdPercent": 99,
                "volumePluginDir": dir.join("kubelet-plugins"),
                "serializeImagePulls": false,
            })
            .to_string(),
        )?;
        let kube_proxy = write(
            dir,
            "kube-proxy.yaml",
            &serde_json::json!({
                "apiVersion": "kubeproxy.config.k8s.io/v1alpha1",
                "kind": "KubeProxyConfiguration",
                "clientConnection": {"kubeconfig": kubeconfig},
                "mode": "iptables",
                "clusterCIDR": POD_CIDR,
                "hostnameOverride": NODE_NAME,
                // Conntrack limits and timeouts are the host's; leave them alone.
                "conntrack": {
                    "maxPerCore": 0,
                    "min": 0,
                    "tcpEstablishedTimeout": "0s",
                    "tcpCloseWaitTimeout": "0s",
                },
                "metricsBindAddress": "127.0.0.1:10249",
            })
            .to_string(),
        )?;
        Ok(Self {
            containerd,
            kubelet,
            kube_proxy,
        })
    }
}

/// What the kubelet keeps free on the node's disk before it evicts pods and taints the node.
const EVICTION_FREE_DISK: &str = "256Mi";

/// The free space [`Node::start`] asks for in the temporary directory. A node's directory (images,
/// container layers, etcd, logs) held 407 and 475 MB at the end of the conformance and HA tests;
/// the rest keeps well clear of [`EVICTION_FREE_DISK`].
pub const MIN_FREE_DISK: u64 = 2 << 30;

/// Fails, naming `dir` and what is free there, when its filesystem has less than
/// [`MIN_FREE_DISK`] available to this user.
fn check_free_disk(dir: &Path) -> Result<()> {
    let fs = rustix::fs::statvfs(dir).map_err(|e| HarnessError::Io {
        context: format!("reading the free space of {}", dir.display()),
        source: e.into(),
    })?;
    enough_free_disk(dir, fs.f_bavail.saturating_mul(fs.f_frsize))
}

/// Fails, naming `dir` and `free`, when `free` is less than [`MIN_FREE_DISK`].
fn enough_free_disk(dir: &Path, free: u64) -> Result<()> {
    if free < MIN_FREE_DISK {
        return Err(HarnessError::Command {
            command: "starting a test node".into(),
            detail: format!(
                "{} has {} MiB free; a node needs at least {} MiB (set TMPDIR to a roomier \
                 filesystem or free some space)",
                dir.display(),
                free >> 20,
                MIN_FREE_DISK >> 20
            ),
        });
    }
    Ok(())
}

/// Polls `ready` until it returns true, failing after the startup timeout (at least two minutes)
/// with the logs of the components, or at once when one of them died.
fn wait(
    components: &mut [ChildGuard],
    dir: &Path,
    what: &str,
    mut ready: impl FnMut() -> Result<bool>,
) -> Result<()> {
    let waited = startup_timeout().max(Duration::from_secs(120));
    let start = Instant::now();
    let mut last = String::from("not polled yet");
    while start.elapsed() < waited {
        for c in components.iter_mut() {
            c.check_running().map_err(|e| c.not_ready(waited, e))?;
        }
        match ready() {
            Ok(true) => return Ok(()),
            Ok(false) => last = "not yet".into(),
            Err(e) => last = e.to_string(),
        }
        pause(Duration::from_millis(250));
    }
    Err(HarnessError::NotReady {
        what: what.to_string(),
        waited,
        detail: last,
        log: dir.join("logs").display().to_string(),
        tail: components
            .iter()
            .map(|c| format!("--- {} ---\n{}", c.log().display(), c.log_tail(8)))
            .collect::<Vec<_>>()
            .join("\n"),
    })
}

/// Runs `cmd` (feeding `stdin`) and returns its stdout, or an error with its output.
fn output_of(cmd: &mut Command, stdin: Option<&[u8]>) -> Result<String> {
    let out = run_with_limit(cmd, stdin)?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(command_failed(cmd, &out))
    }
}

fn command_failed(cmd: &Command, out: &Output) -> HarnessError {
    HarnessError::Command {
        command: shown(cmd),
        detail: format!(
            "{}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout).trim_end(),
            String::from_utf8_lossy(&out.stderr).trim_end()
        ),
    }
}

fn shown(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|a| a.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}

/// Runs `cmd` to completion, killing it after [`COMMAND_LIMIT`].
fn run_with_limit(cmd: &mut Command, stdin: Option<&[u8]>) -> Result<Output> {
    cmd.stdin(if stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .map_err(HarnessError::io(format!("running {}", shown(cmd))))?;
    if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(input)
            .map_err(HarnessError::io(format!("writing to {}", shown(cmd))))?;
    }
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    let waiter = std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(COMMAND_LIMIT) {
        Ok(out) => {
            let _ = waiter.join();
            out.map_err(HarnessError::io(format!("running {}", shown(cmd))))
        }
        Err(_) => {
            if let Some(pid) = i32::try_from(pid)
                .ok()
                .and_then(rustix::process::Pid::from_raw)
            {
                let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
            }
            Err(HarnessError::Command {
                command: shown(cmd),
                detail: format!("timed out after {COMMAND_LIMIT:?}"),
            })
        }
    }
}

#[allow(
    clippy::disallowed_methods,
    reason = "the node starts and stops outside any runtime (a static shared by tests on many runtimes)"
)]
fn pause(d: Duration) {
    std::thread::sleep(d);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_node_is_refused_on_a_full_disk_with_what_is_free() {
        let dir = Path::new("/tmp");
        let err = enough_free_disk(dir, 842 << 20).unwrap_err().to_string();
        assert!(err.contains("/tmp has 842 MiB free"), "{err}");
        assert!(err.contains("at least 2048 MiB"), "{err}");
        enough_free_disk(dir, MIN_FREE_DISK).unwrap();
    }

    #[test]
    fn a_directory_that_cannot_be_read_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let err = check_free_disk(&dir.path().join("missing")).unwrap_err();
        assert!(err.to_string().contains("missing"), "{err}");
    }
}
