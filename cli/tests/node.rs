//! The mesh on a real one-node cluster, driven as a user would: `mesh install --crds | kubectl
//! apply -f -`, `mesh install | kubectl apply -f -`, `mesh check`; an annotated namespace with the
//! demo frontend, backend and a load generator, all injected; a Canary that promotes a good
//! backend image and rolls back a bad one, judged from the proxies' metrics in a real
//! Prometheus; a policy that denies an unmeshed pod and admits a meshed one by its identity; and
//! traffic that keeps flowing while the control plane's pod is deleted and rescheduled.
//!
//! Real pods on containerd, real images from `scripts/build-images`, real iptables redirects
//! from the injected init container, real mTLS between the proxies. Needs root, the node's
//! binaries (`scripts/build-kube-binaries --node`) and the workspace's debug binaries
//! (`cargo build --bins -p mesh-sidecar -p mesh-controlplane -p mesh-rollout-controller -p
//! mesh-demo -p mesh-cli`); scripts/test provides both.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::print_stderr,
    clippy::disallowed_methods,
    reason = "integration tests fail by panicking and report what they measured; kubectl runs \
              synchronously, so the polls between its runs block"
)]

use std::time::{Duration, Instant};

use mesh_test_support::node::{BUSYBOX_IMAGE, NODE_IP, Node};

mod support;
use support::{
    REGISTRY, build_and_import_images, canary_phase, kubectl, mesh, mesh_apply, text,
    wait_for_mesh_check, wait_for_rollout, watch_rollout,
};

const VERSION: &str = "dev";
const NS: &str = "demo";

/// Polls `f` every half second until it returns `Some`, for at most `limit`.
fn poll<T>(what: &str, limit: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(start.elapsed() < limit, "{what}: not within {limit:?}");
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// A real Prometheus inside the node scraping every pod's proxy admin port, as a user's would.
/// Debian's Prometheus is built without Kubernetes discovery, so a loop beside it writes the
/// demo namespace's pod addresses to a file it watches.
fn start_prometheus(node: &Node) -> [mesh_test_support::process::ChildGuard; 2] {
    let dir = node.dir().join("prometheus");
    std::fs::create_dir_all(&dir).unwrap();
    let targets = dir.join("targets.json");
    std::fs::write(&targets, "[]").unwrap();
    let config = format!(
        r#"global: {{scrape_interval: 1s, evaluation_interval: 1s}}
scrape_configs:
- job_name: mesh-proxies
  file_sd_configs:
  - files: ["{targets}"]
"#,
        targets = targets.display()
    );
    let path = dir.join("prometheus.yml");
    std::fs::write(&path, config).unwrap();
    let discovery = format!(
        r#"while :; do
  ips=$({kubectl} --kubeconfig {kc} -n {NS} get pods -o jsonpath='{{range .items[*]}}{{.status.podIP}} {{end}}') || ips=
  out='[{{"targets":['; sep=
  for ip in $ips; do out="$out$sep\"$ip:4191\""; sep=,; done
  echo "$out]}}]" > {targets}.tmp && mv {targets}.tmp {targets}
  sleep 1
done"#,
        kubectl = node.kubectl_bin().display(),
        kc = node.inner_kubeconfig().display(),
        targets = targets.display(),
    );
    let discovery = node
        .spawn_in_node("prometheus-discovery", &["bash", "-c", &discovery])
        .unwrap();
    let prometheus = node
        .spawn_in_node(
            "prometheus",
            &[
                "prometheus",
                &format!("--config.file={}", path.display()),
                &format!("--storage.tsdb.path={}", dir.join("data").display()),
                "--web.listen-address=0.0.0.0:9090",
            ],
        )
        .unwrap();
    [discovery, prometheus]
}

fn workloads() -> String {
    let app = |name: &str, image: &str, env: &str| {
        format!(
            r#"
apiVersion: v1
kind: ServiceAccount
metadata: {{name: {name}, namespace: {NS}}}
---
apiVersion: apps/v1
kind: Deployment
metadata: {{name: {name}, namespace: {NS}}}
spec:
  selector: {{matchLabels: {{app: {name}}}}}
  template:
    metadata: {{labels: {{app: {name}}}}}
    spec:
      serviceAccountName: {name}
      containers:
      - name: app
        image: {image}
        ports: [{{name: http, containerPort: 9898}}]
        env: [{env}]
        readinessProbe: {{tcpSocket: {{port: 9898}}, periodSeconds: 1}}
---
apiVersion: v1
kind: Service
metadata: {{name: {name}, namespace: {NS}}}
spec:
  selector: {{app: {name}}}
  ports: [{{name: http, port: 9898, targetPort: 9898}}]
---
"#
        )
    };
    let demo = format!("{REGISTRY}/demo-app:{VERSION}");
    let mut out = String::new();
    out += &app("backend", &demo, "");
    out += &app(
        "frontend",
        &demo,
        &format!("{{name: DEMO_DOWNSTREAM, value: 'http://backend.{NS}:9898/'}}"),
    );
    out += &app("policy-target", &demo, "");
    out += &format!(
        r#"
apiVersion: v1
kind: ServiceAccount
metadata: {{name: loadgen, namespace: {NS}}}
---
apiVersion: apps/v1
kind: Deployment
metadata: {{name: loadgen, namespace: {NS}}}
spec:
  selector: {{matchLabels: {{app: loadgen}}}}
  template:
    metadata: {{labels: {{app: loadgen}}}}
    spec:
      serviceAccountName: loadgen
      containers:
      - name: loadgen
        image: {REGISTRY}/loadgen:{VERSION}
        args: ["--url", "http://frontend.{NS}:9898/", "--rate", "30", "--report-every", "5s"]
"#
    );
    out
}

/// A busybox pod that sleeps, to run `nc` from; meshed unless in an uninjected namespace.
fn client_pod(name: &str, namespace: &str, service_account: &str) -> String {
    format!(
        r#"
apiVersion: v1
kind: ServiceAccount
metadata: {{name: {service_account}, namespace: {namespace}}}
---
apiVersion: v1
kind: Pod
metadata: {{name: {name}, namespace: {namespace}}}
spec:
  serviceAccountName: {service_account}
  terminationGracePeriodSeconds: 0
  containers:
  - name: client
    image: {BUSYBOX_IMAGE}
    imagePullPolicy: Never
    command: ["/bin/sh", "-c", "exec sleep 100000"]
"#
    )
}

/// The status line of `GET /` with `Host: host` to `addr:9898`, sent with `nc` from `pod`.
/// (Static busybox cannot resolve names itself: its glibc has no NSS modules in the image.)
fn status_from(node: &Node, namespace: &str, pod: &str, host: &str, addr: &str) -> String {
    let out = node.kubectl(&[
        "-n",
        namespace,
        "exec",
        pod,
        "-c",
        "client",
        "--",
        "sh",
        "-c",
        // stdin stays open a moment: an HTTP server may drop a request whose client has
        // already shut down its sending side, as nc does at the end of its input.
        &format!("(printf 'GET / HTTP/1.1\\r\\nHost: {host}\\r\\nConnection: close\\r\\n\\r\\n'; sleep 1) | nc -w 5 {addr} 9898 | head -1"),
    ]);
    match out {
        Ok(s) => s.trim().to_string(),
        Err(e) => format!("exec failed: {e}"),
    }
}

fn set_backend_image(node: &Node, tag: &str) {
    kubectl(
        node,
        &[
            "-n",
            NS,
            "set",
            "image",
            "deployment/backend",
            &format!("app={REGISTRY}/demo-app:{tag}"),
        ],
    );
}

fn primary_image(node: &Node) -> String {
    kubectl(
        node,
        &[
            "-n",
            NS,
            "get",
            "deployment",
            "backend-primary",
            "-o",
            "jsonpath={.spec.template.spec.containers[?(@.name==\"app\")].image}",
        ],
    )
}

#[test]
fn the_mesh_installs_rolls_out_enforces_policy_and_survives_its_control_plane() {
    let begun = Instant::now();
    let node = Node::shared().expect("start the one-node cluster");
    eprintln!("node ready in {:?}", node.started_in());
    build_and_import_images(node, VERSION, &[]);
    let _prometheus = start_prometheus(node);

    // Install, as the docs say, and time apply -> passing check.
    mesh_apply(node, &["install", "--crds"]);
    let applied = Instant::now();
    mesh_apply(
        node,
        &[
            "install",
            "--image-registry",
            REGISTRY,
            "--version",
            VERSION,
            "--prometheus-url",
            &format!("http://{NODE_IP}:9090"),
        ],
    );
    let last = wait_for_mesh_check(node, Duration::from_secs(180));
    eprintln!(
        "install: `mesh install | kubectl apply -f -` to a passing `mesh check` in {:?}\n{last}",
        applied.elapsed()
    );

    // An injected namespace with the demo, a load generator and a policy target.
    kubectl(node, &["create", "namespace", NS]);
    kubectl(
        node,
        &["annotate", "namespace", NS, "mesh.dev/inject=enabled"],
    );
    node.apply_text(&workloads()).unwrap();
    for d in ["backend", "frontend", "policy-target", "loadgen"] {
        wait_for_rollout(node, NS, d);
    }
    let containers = kubectl(
        node,
        &[
            "-n",
            NS,
            "get",
            "pods",
            "-l",
            "app=backend",
            "-o",
            "jsonpath={.items[0].spec.initContainers[*].name}",
        ],
    );
    assert!(
        containers.contains("mesh-proxy"),
        "backend is not injected: {containers}"
    );

    // A Canary with short intervals: the good version is promoted...
    node.apply_text(&format!(
        r#"
apiVersion: rollouts.mesh.dev/v1alpha1
kind: Canary
metadata: {{name: backend, namespace: {NS}}}
spec:
  targetRef: {{apiVersion: apps/v1, kind: Deployment, name: backend}}
  service: {{port: 9898}}
  analysis:
    interval: 5s
    threshold: 2
    stepWeight: 50
    maxWeight: 50
    metrics:
    - name: request-success-rate
      interval: 10s
      thresholdRange: {{min: 95}}
"#
    ))
    .unwrap();
    poll("the Canary initializes", Duration::from_secs(180), || {
        matches!(
            canary_phase(node, NS, "backend").as_str(),
            "Initialized" | "Succeeded"
        )
        .then_some(())
    });
    wait_for_rollout(node, NS, "backend-primary");

    let rollout = Instant::now();
    set_backend_image(node, &format!("{VERSION}-v2"));
    let status = watch_rollout(node, NS, "backend");
    assert!(status.status.success(), "promotion: {}", text(&status));
    assert_eq!(
        primary_image(node),
        format!("{REGISTRY}/demo-app:{VERSION}-v2")
    );
    eprintln!("good version promoted in {:?}", rollout.elapsed());

    // ...and the bad one (half of its answers are 500) is rolled back.
    let rollout = Instant::now();
    set_backend_image(node, &format!("{VERSION}-bad"));
    let status = watch_rollout(node, NS, "backend");
    assert_eq!(status.status.code(), Some(1), "rollback: {}", text(&status));
    assert_eq!(canary_phase(node, NS, "backend"), "Failed");
    assert_eq!(
        primary_image(node),
        format!("{REGISTRY}/demo-app:{VERSION}-v2")
    );
    eprintln!("bad version rolled back in {:?}", rollout.elapsed());

    // Policy: only the `allowed` identity may call policy-target.
    kubectl(node, &["create", "namespace", "plain"]);
    node.apply_text(&format!(
        "{}---{}---{}",
        client_pod("allowed", NS, "allowed"),
        client_pod("other", NS, "other"),
        client_pod("unmeshed", "plain", "unmeshed"),
    ))
    .unwrap();
    for (ns, pod) in [(NS, "allowed"), (NS, "other"), ("plain", "unmeshed")] {
        kubectl(
            node,
            &[
                "-n",
                ns,
                "wait",
                "--for=condition=Ready",
                &format!("pod/{pod}"),
                "--timeout=180s",
            ],
        );
    }
    let target = format!("policy-target.{NS}");
    let target_ip = kubectl(
        node,
        &[
            "-n",
            NS,
            "get",
            "svc",
            "policy-target",
            "-o",
            "jsonpath={.spec.clusterIP}",
        ],
    );
    let open = poll(
        "the meshed client reaches policy-target",
        Duration::from_secs(60),
        || {
            let s = status_from(node, NS, "allowed", &target, &target_ip);
            s.contains(" 200").then_some(s)
        },
    );
    eprintln!("before the policy: {open}");
    node.apply_text(&format!(
        r#"
apiVersion: policy.mesh.dev/v1alpha1
kind: Server
metadata: {{name: policy-target-http, namespace: {NS}}}
spec:
  podSelector: {{matchLabels: {{app: policy-target}}}}
  port: 9898
---
apiVersion: policy.mesh.dev/v1alpha1
kind: MeshTLSAuthentication
metadata: {{name: allowed, namespace: {NS}}}
spec:
  identityRefs: [{{kind: ServiceAccount, name: allowed}}]
---
apiVersion: policy.mesh.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {{name: policy-target-from-allowed, namespace: {NS}}}
spec:
  targetRef: {{group: policy.mesh.dev, kind: Server, name: policy-target-http}}
  requiredAuthenticationRefs:
  - {{group: policy.mesh.dev, kind: MeshTLSAuthentication, name: allowed}}
"#
    ))
    .unwrap();
    let denied = poll(
        "the other identity is denied",
        Duration::from_secs(60),
        || {
            let s = status_from(node, NS, "other", &target, &target_ip);
            s.contains(" 403").then_some(s)
        },
    );
    let unmeshed = poll(
        "the unmeshed pod is denied",
        Duration::from_secs(60),
        || {
            let s = status_from(node, "plain", "unmeshed", &target, &target_ip);
            (s.contains(" 403") || s.is_empty()).then_some(s)
        },
    );
    let admitted = status_from(node, NS, "allowed", &target, &target_ip);
    assert!(
        admitted.contains(" 200"),
        "the allowed identity: {admitted}"
    );
    eprintln!("policy: other -> {denied:?}, unmeshed -> {unmeshed:?}, allowed -> {admitted:?}");

    // Tap, as a user would: `mesh tap --kube` reaches the control plane through the API server
    // (a port-forward), and the control plane asks the API server whether the token's user may
    // tap. `tapper` is bound to the mesh-tap role in this namespace; `nosy` is not.
    node.apply_text(&format!(
        r#"
apiVersion: v1
kind: ServiceAccount
metadata: {{name: tapper, namespace: {NS}}}
---
apiVersion: v1
kind: ServiceAccount
metadata: {{name: nosy, namespace: {NS}}}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: RoleBinding
metadata: {{name: tapper-taps, namespace: {NS}}}
roleRef: {{apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: mesh-tap}}
subjects: [{{kind: ServiceAccount, name: tapper, namespace: {NS}}}]
"#
    ))
    .unwrap();
    let tap_as = |account: &str| {
        let token = kubectl(node, &["-n", NS, "create", "token", account]);
        let file = node.dir().join(format!("{account}.token"));
        std::fs::write(&file, token.trim()).unwrap();
        mesh(
            node,
            &[
                "tap",
                "frontend",
                "-n",
                NS,
                "--kube",
                "--token-file",
                file.to_str().unwrap(),
                "--max",
                "3",
            ],
        )
    };
    let tapped = tap_as("tapper");
    assert!(tapped.status.success(), "tap as tapper: {}", text(&tapped));
    let lines = String::from_utf8_lossy(&tapped.stdout).into_owned();
    assert!(
        lines.lines().filter(|l| l.contains("frontend")).count() >= 3,
        "three of frontend's requests, live: {lines}"
    );
    let refused = tap_as("nosy");
    let why = String::from_utf8_lossy(&refused.stderr).into_owned();
    assert!(
        !refused.status.success() && why.contains("may not tap") && why.contains("mesh-tap"),
        "tap as nosy: {}",
        text(&refused)
    );
    eprintln!("tap through the API server: {lines}\nrefused: {why}");

    // The control plane's pod is deleted: a meshed pod's requests keep succeeding meanwhile.
    let old = kubectl(
        node,
        &[
            "-n",
            "mesh-system",
            "get",
            "pods",
            "-l",
            "app.kubernetes.io/name=mesh-controlplane",
            "-o",
            "jsonpath={.items[0].metadata.name}",
        ],
    );
    kubectl(
        node,
        &[
            "-n",
            "mesh-system",
            "delete",
            "pod",
            &old,
            "--wait=false",
            "--force",
            "--grace-period=0",
        ],
    );
    let loop_script = format!(
        "ok=0; for i in $(seq 20); do \
           (printf 'GET / HTTP/1.1\\r\\nHost: {target}\\r\\nConnection: close\\r\\n\\r\\n'; sleep 1) \
             | nc -w 5 {target_ip} 9898 | head -1 | grep -q ' 200' && ok=$((ok+1)); \
           done; echo ok=$ok"
    );
    let during = kubectl(
        node,
        &[
            "-n",
            NS,
            "exec",
            "allowed",
            "-c",
            "client",
            "--",
            "sh",
            "-c",
            &loop_script,
        ],
    );
    let rescheduled = poll(
        "the control plane is rescheduled",
        Duration::from_secs(180),
        || {
            let pods = kubectl(
                node,
                &[
                    "-n",
                    "mesh-system",
                    "get",
                    "pods",
                    "-l",
                    "app.kubernetes.io/name=mesh-controlplane",
                    "-o",
                    "jsonpath={range .items[*]}{.metadata.name}={.status.containerStatuses[0].ready}{\"\\n\"}{end}",
                ],
            );
            pods.lines()
                .find(|l| !l.starts_with(&old) && l.ends_with("=true"))
                .map(str::to_string)
        },
    );
    assert_eq!(
        during.trim(),
        "ok=20",
        "requests while the control plane was away"
    );
    eprintln!("control plane {old} replaced by {rescheduled}; {during}");
    let check = mesh(node, &["check"]);
    assert!(
        check.status.success(),
        "mesh check after the reschedule: {}",
        text(&check)
    );

    eprintln!("end-to-end test took {:?}", begun.elapsed());
}
